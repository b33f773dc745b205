//! Recovery targets as the command line gives them, and times in the forms pitr accepts.

use std::fmt;

/// Where a restore should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// µs since the Unix epoch.
    Time(i64),
    Lsn(u64),
    Xid(u32),
    Latest,
}

impl fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryTarget::Time(us) => f.write_str(&format_time(*us)),
            RecoveryTarget::Lsn(l) => write!(f, "lsn:{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF),
            RecoveryTarget::Xid(x) => write!(f, "xid:{x}"),
            RecoveryTarget::Latest => f.write_str("latest"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid recovery target {input:?}: {why} (use a time like 2026-11-25T14:03:00Z or \"2026-11-25 14:03:00+02\", lsn:X/Y, xid:N or latest)")]
pub struct TargetError {
    input: String,
    why: &'static str,
}

pub fn parse_target(s: &str) -> Result<RecoveryTarget, TargetError> {
    let err = |why| TargetError { input: s.to_string(), why };
    let s_trim = s.trim();
    if s_trim.eq_ignore_ascii_case("latest") {
        return Ok(RecoveryTarget::Latest);
    }
    if let Some(lsn) = s_trim.strip_prefix("lsn:") {
        let (hi, lo) = lsn.split_once('/').ok_or_else(|| err("an LSN is X/Y in hex"))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err("an LSN is X/Y in hex"))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err("an LSN is X/Y in hex"))?;
        return Ok(RecoveryTarget::Lsn((u64::from(hi) << 32) | u64::from(lo)));
    }
    if let Some(xid) = s_trim.strip_prefix("xid:") {
        return xid.parse().map(RecoveryTarget::Xid).map_err(|_| err("a transaction id is a number"));
    }
    parse_time(s_trim).map(RecoveryTarget::Time).ok_or_else(|| err("not a time pitr understands"))
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.ffffff][Z|±HH[:MM]]` (no zone = UTC) → µs since the Unix epoch.
pub fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) && !part.is_empty() {
            part.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let mut f = frac[..digits].to_string();
        f.truncate(6);
        while f.len() < 6 {
            f.push('0');
        }
        micros = f.parse().ok()?;
        rest = &frac[digits..];
    }
    let rest = rest.trim_start();
    let offset_secs = match rest {
        "" | "Z" | "z" | "UTC" | "+00" | "+00:00" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let z = &rest[1..];
            let (oh, om) = match z.len() {
                2 => (z.parse::<i64>().ok()?, 0),
                4 => (z[..2].parse::<i64>().ok()?, z[2..].parse::<i64>().ok()?),
                5 if z.as_bytes()[2] == b':' => (z[..2].parse::<i64>().ok()?, z[3..].parse::<i64>().ok()?),
                _ => return None,
            };
            if oh > 15 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86400 + h * 3600 + mi * 60 + sec - offset_secs;
    Some(secs * 1_000_000 + micros)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD HH:MM:SS.ffffff+00`: the numeric-offset form PostgreSQL accepts in
/// recovery_target_time at server start (it rejects zone abbreviations such as `Z` there).
pub fn format_time(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let rem = secs.rem_euclid(86400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{micros:06}+00", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_accepted_form() {
        let base = parse_time("2026-11-25T14:03:00Z").unwrap();
        assert_eq!(base, 1_795_615_380_000_000);
        assert_eq!(parse_time("2026-11-25 14:03:00"), Some(base));
        assert_eq!(parse_time("2026-11-25 14:03:00+00"), Some(base));
        assert_eq!(parse_time("2026-11-25 16:03:00+02"), Some(base));
        assert_eq!(parse_time("2026-11-25T09:33:00-04:30"), Some(base));
        assert_eq!(parse_time("2026-11-25T14:03:00.123456Z"), Some(base + 123_456));
        assert_eq!(parse_time("2026-11-25T14:03:00.5Z"), Some(base + 500_000));
        for bad in ["2026-11-25", "2026-13-01 00:00:00", "2026-11-25 14:03:00 CET", "2026-11-25T14:03:00.Z", "x"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(format_time(base + 123_456), "2026-11-25 14:03:00.123456+00");
        assert_eq!(parse_time(&format_time(base + 7)), Some(base + 7));
    }

    #[test]
    fn targets() {
        assert_eq!(parse_target("latest"), Ok(RecoveryTarget::Latest));
        assert_eq!(parse_target("lsn:16/B374D848"), Ok(RecoveryTarget::Lsn(0x16_B374_D848)));
        assert_eq!(parse_target("xid:1234"), Ok(RecoveryTarget::Xid(1234)));
        assert!(parse_target("lsn:zz").is_err());
        assert!(parse_target("yesterday").unwrap_err().to_string().contains("yesterday"));
        assert_eq!(RecoveryTarget::Lsn(0x1_0000_00A0).to_string(), "lsn:1/A0");
    }
}
