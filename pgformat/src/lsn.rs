//! LSNs in their text form, `X/Y`: the high and low 32 bits in hex, as PostgreSQL prints them
//! (`LSN_FORMAT_ARGS`) and as `pg_lsn`, replication commands and history files carry them.

/// `X/Y`, as PostgreSQL prints an LSN (upper-case hex, no leading zeros).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `X/Y` (each half 1–8 hex digits; surrounding whitespace is ignored), `None` if `s` is
/// not an LSN.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    // Bounding the halves keeps the shift below from dropping bits of an over-long high half.
    if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
        return None;
    }
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_as_postgres_does() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn(" 0/3000160\n"), Some(0x3000160));
        assert_eq!(parse_lsn("ffffffff/ffffffff"), Some(u64::MAX));
        for bad in ["", "1", "/1", "1/", "x/1", "123456789/0", "0/123456789", "1/2/3"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
        for lsn in [0, 1, 0x1_0000_0000, 0xFFFF_FFFF, u64::MAX] {
            assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
    }
}
