//! WAL segments: which segment an LSN falls in, and PostgreSQL's segment file names
//! (`XLogFileName`: timeline, then the segment number split at each 4 GiB of WAL, each as eight
//! hex digits, e.g. `000000010000000A000000FF`).
//!
//! `segment_size` is the cluster's `wal_segment_size`: a power of two from 1 MiB to 1 GiB.
//! Callers validate it once where they learn it (a zero size would divide by zero here).

/// Length of a segment file name.
pub const SEGMENT_FILE_NAME_LEN: usize = 24;

/// How many segments one 4 GiB "xlog id" (the middle eight digits of a file name) holds.
pub fn segments_per_xlog_id(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

/// The segment number holding `lsn` (`XLByteToSeg`).
pub fn segment_of(lsn: u64, segment_size: u64) -> u64 {
    lsn / segment_size
}

/// The LSN where segment `segno` begins.
pub fn segment_start(segno: u64, segment_size: u64) -> u64 {
    segno * segment_size
}

/// PostgreSQL's file name for segment `segno` of `timeline`.
pub fn segment_file_name(timeline: u32, segno: u64, segment_size: u64) -> String {
    let per = segments_per_xlog_id(segment_size);
    format!("{timeline:08X}{:08X}{:08X}", segno / per, segno % per)
}

/// `(timeline, segment number)` from a segment file name; `None` for anything else, including a
/// name whose low part is past the last segment of an xlog id for this segment size.
pub fn parse_segment_file_name(name: &str, segment_size: u64) -> Option<(u32, u64)> {
    if name.len() != SEGMENT_FILE_NAME_LEN || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let timeline = u32::from_str_radix(&name[0..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let per = segments_per_xlog_id(segment_size);
    if seg >= per {
        return None;
    }
    Some((timeline, log * per + seg))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB16: u64 = 16 << 20;

    #[test]
    fn names_match_postgres() {
        assert_eq!(segment_file_name(1, 0, MIB16), "000000010000000000000000");
        // 16 MiB segments: 256 per xlog id.
        assert_eq!(segment_file_name(1, 0x1FF, MIB16), "0000000100000001000000FF");
        assert_eq!(segment_file_name(0xA, 0x300, 1 << 20), "0000000A0000000000000300");
        assert_eq!(parse_segment_file_name("0000000100000001000000FF", MIB16), Some((1, 0x1FF)));
        assert_eq!(parse_segment_file_name("0000000a0000000000000300", 1 << 20), Some((10, 0x300)));
        for bad in
            ["", "00000001000000010000010", "000000010000000100000100", "00000002.history", "+00000010000000100000000"]
        {
            assert_eq!(parse_segment_file_name(bad, MIB16), None, "{bad}");
        }
        for segno in [0, 1, 255, 256, 0x12345] {
            assert_eq!(parse_segment_file_name(&segment_file_name(3, segno, MIB16), MIB16), Some((3, segno)));
        }
    }

    #[test]
    fn lsns_and_segments() {
        assert_eq!(segment_of(0x3000160, MIB16), 3);
        assert_eq!(segment_of(0x2FFFFFF, MIB16), 2);
        assert_eq!(segment_start(3, MIB16), 0x3000000);
        assert_eq!(segments_per_xlog_id(1 << 30), 4);
    }
}
