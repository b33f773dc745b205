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
    /// The restore point of this name (`recovery_target_name`), resolved against the index of
    /// restore points by [`crate::Catalog::restore_point`].
    Name(RestorePointName),
    /// The backup's consistency point (`recovery_target = 'immediate'`).
    Immediate,
}

/// A restore point's name as `recovery_target_name` takes it: 1 to 63 bytes (PostgreSQL keeps
/// 63 in the WAL record), no line break, carriage return or NUL (postgresql.auto.conf cannot
/// hold them). Held inline so that a [`RecoveryTarget`] stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RestorePointName {
    len: u8,
    bytes: [u8; RestorePointName::MAX_LEN],
}

impl RestorePointName {
    /// The longest name PostgreSQL keeps (`MAXFNAMELEN - 1`).
    pub const MAX_LEN: usize = 63;

    /// `name` if a restore can target it; else why not.
    pub fn new(name: &str) -> Result<RestorePointName, &'static str> {
        if name.is_empty() {
            return Err("a restore point's name is not empty");
        }
        if name.len() > Self::MAX_LEN {
            return Err("a restore point's name is at most 63 bytes (PostgreSQL keeps no more)");
        }
        if name.contains(['\n', '\r', '\0']) {
            return Err("a restore point's name holds no line break, carriage return or NUL");
        }
        let mut bytes = [0; Self::MAX_LEN];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(RestorePointName { len: name.len() as u8, bytes })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Built from a &str in `new`, cut at its own length: always UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for RestorePointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryTarget::Time(us) => f.write_str(&format_time(*us)),
            RecoveryTarget::Lsn(l) => write!(f, "lsn:{}", format_lsn(*l)),
            RecoveryTarget::Xid(x) => write!(f, "xid:{x}"),
            RecoveryTarget::Latest => f.write_str("latest"),
            RecoveryTarget::Name(n) => write!(f, "name:{}", n.as_str()),
            RecoveryTarget::Immediate => f.write_str("immediate"),
        }
    }
}

/// A `--to` that is none of the forms [`parse_target`] takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid recovery target {input:?}: {why} (use a time like 2026-11-25T14:03:00Z or \"2026-11-25 14:03:00+02\", lsn:X/Y, xid:N, name:NAME, immediate or latest)")]
pub struct TargetError {
    input: String,
    why: &'static str,
}

/// `latest`, `immediate`, `lsn:X/Y`, `xid:N`, `name:NAME` or a time ([`parse_time`]). A name is
/// taken as given after `name:` (spaces included).
pub fn parse_target(s: &str) -> Result<RecoveryTarget, TargetError> {
    let err = |why| TargetError { input: s.to_string(), why };
    let s_trim = s.trim();
    if let Some(name) = s.trim_start().strip_prefix("name:") {
        return RestorePointName::new(name).map(RecoveryTarget::Name).map_err(err);
    }
    if s_trim.eq_ignore_ascii_case("latest") {
        return Ok(RecoveryTarget::Latest);
    }
    if s_trim.eq_ignore_ascii_case("immediate") {
        return Ok(RecoveryTarget::Immediate);
    }
    if let Some(lsn) = s_trim.strip_prefix("lsn:") {
        return parse_lsn(lsn).map(RecoveryTarget::Lsn).ok_or_else(|| err("an LSN is X/Y in hex"));
    }
    if let Some(xid) = s_trim.strip_prefix("xid:") {
        return xid.parse().map(RecoveryTarget::Xid).map_err(|_| err("a transaction id is a number"));
    }
    parse_time(s_trim).map(RecoveryTarget::Time).ok_or_else(|| err("not a time pitr understands"))
}

/// `--exclusive` with a target that has no "just before": `latest`, `immediate`, `name:`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--exclusive stops just before a transaction, an LSN or a time; {0} has no \"before\" (use xid:N, lsn:X/Y or a time)")]
pub struct ExclusiveError(String);

/// `target` made exclusive: recovery stops just before it. The target to give recovery and
/// whether `recovery_target_inclusive = off` goes with it. A time becomes the microsecond before
/// it, inclusive (commit times are whole microseconds, so that is the same stop, and the
/// restore's planning of time targets then needs nothing new).
pub fn exclusive(target: RecoveryTarget) -> Result<(RecoveryTarget, bool), ExclusiveError> {
    match target {
        RecoveryTarget::Time(us) => Ok((RecoveryTarget::Time(us.saturating_sub(1)), false)),
        RecoveryTarget::Xid(_) | RecoveryTarget::Lsn(_) => Ok((target, true)),
        RecoveryTarget::Latest | RecoveryTarget::Immediate | RecoveryTarget::Name(_) => {
            Err(ExclusiveError(target.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_targets() {
        assert_eq!(exclusive(RecoveryTarget::Xid(7)), Ok((RecoveryTarget::Xid(7), true)));
        assert_eq!(exclusive(RecoveryTarget::Lsn(0x10)), Ok((RecoveryTarget::Lsn(0x10), true)));
        assert_eq!(exclusive(RecoveryTarget::Time(1_000_000)), Ok((RecoveryTarget::Time(999_999), false)));
        for refused in ["latest", "immediate", "name:x"] {
            let e = exclusive(parse_target(refused).unwrap()).unwrap_err().to_string();
            assert!(e.contains(refused) && e.contains("--exclusive"), "{e}");
        }
    }

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
        assert_eq!(parse_target("immediate"), Ok(RecoveryTarget::Immediate));
        let named = parse_target("name:before cleanup").unwrap();
        assert_eq!(named.to_string(), "name:before cleanup");
        assert!(matches!(named, RecoveryTarget::Name(n) if n.as_str() == "before cleanup"));
        let longest = format!("name:{}", "é".repeat(31) + "x");
        assert!(parse_target(&longest).is_ok(), "63 bytes");
        for (bad, why) in [
            ("name:", "not empty"),
            (&*format!("name:{}", "x".repeat(64)), "63 bytes"),
            ("name:a\nb", "line break"),
            ("name:a\0b", "NUL"),
        ] {
            let e = parse_target(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
