//! Which servers can take incremental backups: `BASE_BACKUP ( INCREMENTAL )` exists from
//! PostgreSQL 17 on (and needs `summarize_wal = on`, which only the server can say). On older
//! servers the archived WAL covers every change between full backups, and deduplicated blocks
//! keep each full backup to the blocks that changed.

/// The first `server_version_num` with incremental backups.
pub const FIRST_VERSION_NUM: u32 = 170000;

/// Whether a server of `server_version_num` can take incremental backups at all.
pub fn supported(server_version_num: u32) -> bool {
    server_version_num >= FIRST_VERSION_NUM
}

/// Why a server of `server_version_num` cannot take an incremental backup; `None` if its
/// version allows one.
pub fn unsupported_reason(server_version_num: u32) -> Option<String> {
    if supported(server_version_num) {
        return None;
    }
    Some(format!(
        "PostgreSQL {} has no incremental backups (they need 17 or later; the archived WAL already covers \
         every change since the last full backup)",
        server_version_num / 10000
    ))
}

/// How changes between full backups are kept on a server version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `BASE_BACKUP ( INCREMENTAL )` against the newest backup (PostgreSQL 17+).
    BlockIncremental,
    /// No incrementals: the archived WAL between deduplicated full backups.
    Wal,
}

/// What scheduled incremental backups do on a server version, for people (`pitr list`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Incrementals {
    /// The mechanism.
    pub mode: Mode,
    /// One sentence saying what it means for this version.
    pub summary: String,
}

/// What incremental backups are on a server of `server_version_num`.
pub fn incrementals(server_version_num: u32) -> Incrementals {
    let major = server_version_num / 10000;
    if supported(server_version_num) {
        Incrementals {
            mode: Mode::BlockIncremental,
            summary: format!(
                "PostgreSQL {major}: BASE_BACKUP INCREMENTAL against the newest backup (needs summarize_wal = on; \
                 a full backup is taken, with a warning, when it is off)"
            ),
        }
    } else {
        Incrementals {
            mode: Mode::Wal,
            summary: format!(
                "PostgreSQL {major} has none (17+): the archived WAL covers every change between full backups, \
                 and each full backup stores only the blocks that changed (deduplicated)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seventeen_is_the_first_version() {
        assert!(!supported(169999) && supported(170000) && supported(180001));
        assert_eq!(unsupported_reason(170004), None);
        assert!(unsupported_reason(150007).unwrap().starts_with("PostgreSQL 15 has no incremental backups"));
    }

    #[test]
    fn modes_serialize_as_list_shows_them() {
        let json = serde_json::to_value(incrementals(170004)).unwrap();
        assert_eq!(json["mode"], "block-incremental");
        assert!(json["summary"].as_str().unwrap().starts_with("PostgreSQL 17: BASE_BACKUP INCREMENTAL"));
        let json = serde_json::to_value(incrementals(160002)).unwrap();
        assert_eq!(json["mode"], "wal");
        assert!(json["summary"].as_str().unwrap().starts_with("PostgreSQL 16 has none (17+)"));
    }
}
