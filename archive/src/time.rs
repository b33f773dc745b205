//! Wall-clock times as pitr writes and reads them: µs since the Unix epoch inside, text outside.
//!
//! One formatter for every form pitr prints — RFC 3339 in UTC for reports, listings and storage
//! headers, the numeric-offset form PostgreSQL takes in `recovery_target_time`, the compact form
//! of backup ids — and the parser of the times a user gives on the command line or in a checks
//! file. Pure and calendar-only (proleptic Gregorian, UTC, no leap seconds), so it needs no time
//! zone database.

/// `YYYY-MM-DDTHH:MM:SSZ` for `us` µs since the Unix epoch: whole seconds, the fraction cut (not
/// rounded). Running markers, the expire lock, leases and S3 retention dates.
pub fn format_rfc3339_seconds(us: i64) -> String {
    let c = Civil::from_us(us);
    format!("{}Z", c.rfc3339_seconds())
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`: always six fraction digits. Status, MongoDB reports and listings.
pub fn format_rfc3339_micros(us: i64) -> String {
    let c = Civil::from_us(us);
    format!("{}.{:06}Z", c.rfc3339_seconds(), c.micros)
}

/// `YYYY-MM-DDTHH:MM:SS[.fff[fff]]Z`: no, three or six fraction digits, the fewest that show
/// every non-zero one. Expire reports.
pub fn format_rfc3339_auto(us: i64) -> String {
    let c = Civil::from_us(us);
    match c.micros {
        0 => format!("{}Z", c.rfc3339_seconds()),
        m if m % 1000 == 0 => format!("{}.{:03}Z", c.rfc3339_seconds(), m / 1000),
        m => format!("{}.{m:06}Z", c.rfc3339_seconds()),
    }
}

/// `YYYY-MM-DD HH:MM:SS.ffffff+00`: the numeric-offset form PostgreSQL accepts in
/// `recovery_target_time` at server start (it rejects zone abbreviations such as `Z` there).
pub fn format_postgres(us: i64) -> String {
    let c = Civil::from_us(us);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        c.year, c.month, c.day, c.hour, c.minute, c.second, c.micros
    )
}

/// `YYYYMMDDTHHMMSSZ`: whole seconds, no separators, so that names built from it sort by time.
pub fn format_compact(us: i64) -> String {
    let c = Civil::from_us(us);
    format!("{:04}{:02}{:02}T{:02}{:02}{:02}Z", c.year, c.month, c.day, c.hour, c.minute, c.second)
}

/// A time as a user writes it → µs since the Unix epoch:
/// `YYYY-MM-DD[T ]HH:MM:SS[.f…][Z|z|UTC|±HH|±HHMM|±HH:MM]`, with no zone meaning UTC and up to
/// nine fraction digits (beyond six cut). `None` for anything else, a date alone included.
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
            if !z.is_ascii() {
                return None;
            }
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

/// A moment split into calendar fields, UTC.
struct Civil {
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
    micros: i64,
}

impl Civil {
    fn from_us(us: i64) -> Civil {
        let secs = us.div_euclid(1_000_000);
        let (year, month, day) = civil_from_days(secs.div_euclid(86400));
        let rem = secs.rem_euclid(86400);
        Civil {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
            micros: us.rem_euclid(1_000_000),
        }
    }

    /// `YYYY-MM-DDTHH:MM:SS`, no fraction, no zone.
    fn rfc3339_seconds(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`]: (year, month, day).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_accepted_form() {
        let base = parse_time("2026-11-25T14:03:00Z").unwrap();
        assert_eq!(base, 1_795_615_380_000_000);
        assert_eq!(parse_time("2026-11-25 14:03:00"), Some(base));
        assert_eq!(parse_time("2026-11-25 14:03:00+00"), Some(base));
        assert_eq!(parse_time("2026-11-25 14:03:00 UTC"), Some(base));
        assert_eq!(parse_time("2026-11-25 16:03:00+02"), Some(base));
        assert_eq!(parse_time("2026-11-25 16:03:00+0200"), Some(base));
        assert_eq!(parse_time("2026-11-25T09:33:00-04:30"), Some(base));
        assert_eq!(parse_time("2026-11-25T14:03:00.123456Z"), Some(base + 123_456));
        assert_eq!(parse_time("2026-11-25T14:03:00.123456789Z"), Some(base + 123_456));
        assert_eq!(parse_time("2026-11-25T14:03:00.5Z"), Some(base + 500_000));
        for bad in ["2026-11-25", "2026-13-01 00:00:00", "2026-11-25 14:03:00 CET", "2026-11-25T14:03:00.Z", "x"]
            .into_iter()
            .chain(["2026-11-25 14:03:00+1é1", "2026-11-25 14:03:00+1é", "2026-11-25 14:0é:00"])
        {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_form_formats_the_same_moment() {
        let base = 1_795_615_380_000_000;
        assert_eq!(format_postgres(base + 123_456), "2026-11-25 14:03:00.123456+00");
        assert_eq!(format_rfc3339_seconds(base + 123_456), "2026-11-25T14:03:00Z");
        assert_eq!(format_rfc3339_micros(base + 123_456), "2026-11-25T14:03:00.123456Z");
        assert_eq!(format_rfc3339_micros(base), "2026-11-25T14:03:00.000000Z");
        assert_eq!(format_rfc3339_auto(base), "2026-11-25T14:03:00Z");
        assert_eq!(format_rfc3339_auto(base + 120_000), "2026-11-25T14:03:00.120Z");
        assert_eq!(format_rfc3339_auto(base + 7), "2026-11-25T14:03:00.000007Z");
        assert_eq!(format_compact(base + 999_999), "20261125T140300Z");
        assert_eq!(format_rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_postgres(-1), "1969-12-31 23:59:59.999999+00");
    }

    #[test]
    fn formats_read_back() {
        for us in [0, 7, 951_782_400_123_456, 1_795_615_380_000_007, 4_107_542_400_000_000] {
            assert_eq!(parse_time(&format_postgres(us)), Some(us));
            assert_eq!(parse_time(&format_rfc3339_micros(us)), Some(us));
            assert_eq!(parse_time(&format_rfc3339_auto(us)), Some(us));
        }
    }

    #[test]
    fn the_same_text_as_chrono_wrote() {
        // running markers, the expire lock, expire reports and S3 retention dates were formatted
        // by chrono; objects and reports already written hold its text.
        use chrono::SecondsFormat;
        let mut us = -86_400_000_000i64 * 800;
        while us < 4_102_444_800_000_000 {
            let t = chrono::DateTime::from_timestamp_micros(us).unwrap();
            assert_eq!(format_rfc3339_seconds(us), t.to_rfc3339_opts(SecondsFormat::Secs, true));
            assert_eq!(format_rfc3339_auto(us), t.to_rfc3339_opts(SecondsFormat::AutoSi, true));
            assert_eq!(format_rfc3339_micros(us), t.to_rfc3339_opts(SecondsFormat::Micros, true));
            assert_eq!(format_compact(us), t.format("%Y%m%dT%H%M%SZ").to_string());
            us += 3_601_000_017 * 7 + [0, 120_000, 5, 999_999][(us.rem_euclid(4)) as usize];
        }
    }
}
