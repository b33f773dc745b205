//! Recovery targets as the command line gives them, and times in the forms pitr accepts.

use std::fmt;

use pitr_pgformat::lsn::{format_lsn, parse_lsn};

/// `YYYY-MM-DD HH:MM:SS.ffffff+00`, the form written into `recovery_target_time` and reports.
pub use pitr_archive::time::format_postgres as format_time;
/// The times a user gives (`--to`, a checks file's `recorded.at`), parsed as everywhere in pitr.
pub use pitr_archive::time::parse_time;

/// Where a restore should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// The last commit at or before this moment, µs since the Unix epoch.
    Time(i64),
    /// This WAL position.
    Lsn(u64),
    /// The commit of this transaction.
    Xid(u32),
    /// The end of the archived WAL.
    Latest,
}

impl fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryTarget::Time(us) => f.write_str(&format_time(*us)),
            RecoveryTarget::Lsn(l) => write!(f, "lsn:{}", format_lsn(*l)),
            RecoveryTarget::Xid(x) => write!(f, "xid:{x}"),
            RecoveryTarget::Latest => f.write_str("latest"),
        }
    }
}

/// A `--to` that is none of the forms [`parse_target`] takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid recovery target {input:?}: {why} (use a time like 2026-11-25T14:03:00Z or \"2026-11-25 14:03:00+02\", lsn:X/Y, xid:N or latest)")]
pub struct TargetError {
    input: String,
    why: &'static str,
}

/// `latest`, `lsn:X/Y`, `xid:N` or a time ([`parse_time`]).
pub fn parse_target(s: &str) -> Result<RecoveryTarget, TargetError> {
    let err = |why| TargetError { input: s.to_string(), why };
    let s_trim = s.trim();
    if s_trim.eq_ignore_ascii_case("latest") {
        return Ok(RecoveryTarget::Latest);
    }
    if let Some(lsn) = s_trim.strip_prefix("lsn:") {
        return parse_lsn(lsn).map(RecoveryTarget::Lsn).ok_or_else(|| err("an LSN is X/Y in hex"));
    }
    if let Some(xid) = s_trim.strip_prefix("xid:") {
        return xid.parse().map(RecoveryTarget::Xid).map_err(|_| err("a transaction id is a number"));
    }
    parse_time(s_trim).map(RecoveryTarget::Time).ok_or_else(|| err("not a time pitr understands"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("latest"), Ok(RecoveryTarget::Latest));
        assert_eq!(parse_target("lsn:16/B374D848"), Ok(RecoveryTarget::Lsn(0x16_B374_D848)));
        assert_eq!(parse_target("xid:1234"), Ok(RecoveryTarget::Xid(1234)));
        assert!(parse_target("lsn:zz").is_err());
        assert!(parse_target("yesterday").unwrap_err().to_string().contains("yesterday"));
        assert_eq!(RecoveryTarget::Lsn(0x1_0000_00A0).to_string(), "lsn:1/A0");
        let t = parse_target("2026-11-25 16:03:00.5+02").unwrap();
        assert_eq!(t, RecoveryTarget::Time(1_795_615_380_500_000));
        assert_eq!(t.to_string(), "2026-11-25 14:03:00.500000+00");
    }
}
