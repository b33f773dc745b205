//! Which PostgreSQL binaries run a restored cluster: those of the major version the archive
//! recorded for it (a data directory only starts under its own major version), from a
//! configured directory or the Debian/Ubuntu layout `/usr/lib/postgresql/<major>/bin`.

use std::path::{Path, PathBuf};

/// No usable binaries where they were looked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no pg_ctl in {} for PostgreSQL {major}", dir.display())]
pub struct PgBinError {
    /// The directory looked in.
    pub dir: PathBuf,
    /// The cluster's major version.
    pub major: u32,
}

/// The major version of a `server_version_num` (170002 → 17).
pub fn major(server_version_num: u32) -> u32 {
    server_version_num / 10000
}

/// Where the packaged binaries of `major` live by default.
pub fn default_dir(major: u32) -> PathBuf {
    PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))
}

/// The binary directory for a cluster of `server_version_num`: `configured` if given, else the
/// default for its major version. It must hold `pg_ctl`, which starts and stops the server.
pub fn bin_dir(configured: Option<&Path>, server_version_num: u32) -> Result<PathBuf, PgBinError> {
    let major = major(server_version_num);
    let dir = configured.map(Path::to_path_buf).unwrap_or_else(|| default_dir(major));
    if !dir.join("pg_ctl").exists() {
        return Err(PgBinError { dir, major });
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_directory_wins_and_must_hold_pg_ctl() {
        let tmp = tempfile::tempdir().unwrap();
        let err = bin_dir(Some(tmp.path()), 160004).unwrap_err();
        assert_eq!(err, PgBinError { dir: tmp.path().to_path_buf(), major: 16 });
        assert_eq!(err.to_string(), format!("no pg_ctl in {} for PostgreSQL 16", tmp.path().display()));
        std::fs::write(tmp.path().join("pg_ctl"), b"").unwrap();
        assert_eq!(bin_dir(Some(tmp.path()), 160004).unwrap(), tmp.path());
    }

    #[test]
    fn the_default_follows_the_major_version() {
        assert_eq!(major(170002), 17);
        assert_eq!(default_dir(15), PathBuf::from("/usr/lib/postgresql/15/bin"));
    }
}
