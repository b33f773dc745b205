//! PostgreSQL 17's incremental relation files, as `BASE_BACKUP ( INCREMENTAL )` sends them.
//!
//! A relation segment that changed little since the prior backup arrives as
//! `<dir>/INCREMENTAL.<name>` instead of `<dir>/<name>`:
//!
//! ```text
//! u32 magic (0xd3ae1f0d)   u32 block count n   u32 truncation block length
//! u32 block number × n     zero padding up to a multiple of BLCKSZ (only when n > 0)
//! BLCKSZ bytes × n         the blocks, in the order of the block numbers
//! ```
//! Integers are in the server's byte order; pitr reads little-endian (every platform it runs on).
//! The truncation block length says how long the file was, in blocks, as far as the prior backup
//! is concerned: blocks at or past it must not be taken from older backups.
//!
//! How a full file is rebuilt from a chain of these (as pg_combinebackup does) lives in
//! pitr-restore; this module only reads the format.

/// The first four bytes of every incremental file (`INCREMENTAL_MAGIC` in `basebackup_incremental.h`).
pub const INCREMENTAL_MAGIC: u32 = 0xd3ae_1f0d;
/// What the server puts before a relation file's name when it sends the file incrementally.
pub const INCREMENTAL_PREFIX: &str = "INCREMENTAL.";
/// A relation segment holds at most this many blocks (1 GiB of 8 KiB blocks); the server
/// refuses larger counts too.
const RELSEG_SIZE: u32 = 131_072;

/// Why bytes are not a readable incremental file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IncrementalError {
    /// The file does not start with [`INCREMENTAL_MAGIC`].
    #[error("bad incremental magic number 0x{0:08x} (expected 0x{INCREMENTAL_MAGIC:08x})")]
    BadMagic(u32),
    /// The block count or truncation block length is more than a relation segment can hold.
    #[error("{what} {value} is larger than a relation segment ({RELSEG_SIZE} blocks)")]
    TooLarge {
        /// Which header field.
        what: &'static str,
        /// Its value.
        value: u32,
    },
    /// The file is shorter than its header says.
    #[error("incremental file is {have} bytes; its header says {want}")]
    Truncated {
        /// The file's size in bytes.
        have: u64,
        /// The size its header implies.
        want: u64,
    },
}

/// The header of one incremental file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncrementalHeader {
    /// Block numbers whose contents the file carries, in file order.
    pub block_numbers: Vec<u32>,
    /// The relation segment's length in blocks as of the prior backup (see the module docs).
    pub truncation_block_length: u32,
    /// Where the first block's bytes start (the header, padded to BLCKSZ when there are blocks).
    pub data_offset: u64,
}

impl IncrementalHeader {
    /// How many header bytes must be read before [`parse_header`] can succeed: 12 at first, then
    /// the whole block-number array once the count is known.
    pub fn bytes_needed(prefix: &[u8]) -> usize {
        if prefix.len() < 12 {
            return 12;
        }
        12 + 4 * u32_at(prefix, 4) as usize
    }

    /// Byte offset of the `i`-th carried block in the file.
    pub fn block_offset(&self, i: usize, blcksz: u32) -> u64 {
        self.data_offset + i as u64 * blcksz as u64
    }

    /// The size the file must have for its header to be true.
    pub fn expected_file_size(&self, blcksz: u32) -> u64 {
        self.block_offset(self.block_numbers.len(), blcksz)
    }

    /// Length in blocks of the file rebuilt from this, the newest, incremental file: the
    /// truncation length, extended to cover any block it carries beyond it.
    pub fn reconstructed_block_length(&self) -> u32 {
        self.block_numbers.iter().map(|b| b + 1).fold(self.truncation_block_length, u32::max)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses a header from the first bytes of an incremental file; `Ok(None)` if `bytes` is too short
/// (read [`IncrementalHeader::bytes_needed`] of them).
pub fn parse_header(bytes: &[u8], blcksz: u32) -> Result<Option<IncrementalHeader>, IncrementalError> {
    if bytes.len() < 12 {
        return Ok(None);
    }
    let magic = u32_at(bytes, 0);
    if magic != INCREMENTAL_MAGIC {
        return Err(IncrementalError::BadMagic(magic));
    }
    let count = u32_at(bytes, 4);
    let truncation_block_length = u32_at(bytes, 8);
    for (what, value) in [("block count", count), ("truncation block length", truncation_block_length)] {
        if value > RELSEG_SIZE {
            return Err(IncrementalError::TooLarge { what, value });
        }
    }
    let end = 12 + 4 * count as usize;
    if bytes.len() < end {
        return Ok(None);
    }
    let block_numbers: Vec<u32> = (0..count as usize).map(|i| u32_at(bytes, 12 + 4 * i)).collect();
    let mut data_offset = end as u64;
    let blcksz = blcksz as u64;
    if count > 0 && !data_offset.is_multiple_of(blcksz) {
        data_offset += blcksz - data_offset % blcksz;
    }
    Ok(Some(IncrementalHeader { block_numbers, truncation_block_length, data_offset }))
}

/// `base/5/INCREMENTAL.16384` → `Some("base/5/16384")`; `None` for a file sent whole.
pub fn full_path_of(path: &str) -> Option<String> {
    let (dir, name) = match path.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, path),
    };
    let bare = name.strip_prefix(INCREMENTAL_PREFIX).filter(|b| !b.is_empty())?;
    Some(match dir {
        Some(dir) => format!("{dir}/{bare}"),
        None => bare.to_string(),
    })
}

/// `base/5/16384` → `base/5/INCREMENTAL.16384`.
pub fn incremental_path_of(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{INCREMENTAL_PREFIX}{name}"),
        None => format!("{INCREMENTAL_PREFIX}{path}"),
    }
}

/// The backup_label of an incremental backup names its parent (`INCREMENTAL FROM LSN:` and
/// `INCREMENTAL FROM TLI:`); PostgreSQL refuses to start from such a label, which is how it
/// stops anyone from running an uncombined incremental. A combined directory carries the label
/// without those lines, as pg_combinebackup writes it.
pub fn combined_backup_label(label: &str) -> String {
    label.lines().filter(|l| !l.starts_with("INCREMENTAL FROM ")).map(|l| format!("{l}\n")).collect()
}

/// Builds an incremental file (for tests of readers and of reconstruction).
pub fn build_incremental_file(blocks: &[(u32, Vec<u8>)], truncation_block_length: u32, blcksz: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&INCREMENTAL_MAGIC.to_le_bytes());
    out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    out.extend_from_slice(&truncation_block_length.to_le_bytes());
    for (b, _) in blocks {
        out.extend_from_slice(&b.to_le_bytes());
    }
    if !blocks.is_empty() {
        let padded = out.len().div_ceil(blcksz as usize) * blcksz as usize;
        out.resize(padded, 0);
    }
    for (_, data) in blocks {
        assert_eq!(data.len(), blcksz as usize, "a block is BLCKSZ bytes");
        out.extend_from_slice(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_with_padding() {
        let blocks = vec![(7, vec![1u8; 8192]), (2, vec![2u8; 8192]), (20, vec![3u8; 8192])];
        let file = build_incremental_file(&blocks, 10, 8192);
        assert_eq!(IncrementalHeader::bytes_needed(&file[..4]), 12);
        assert_eq!(IncrementalHeader::bytes_needed(&file), 24);
        assert_eq!(parse_header(&file[..23], 8192).unwrap(), None);
        let h = parse_header(&file, 8192).unwrap().unwrap();
        assert_eq!(h.block_numbers, vec![7, 2, 20]);
        assert_eq!(h.truncation_block_length, 10);
        assert_eq!(h.data_offset, 8192);
        assert_eq!(h.expected_file_size(8192), file.len() as u64);
        assert_eq!(&file[h.block_offset(1, 8192) as usize..][..8192], &[2u8; 8192][..]);
        assert_eq!(h.reconstructed_block_length(), 21);
    }

    #[test]
    fn empty_incremental_has_no_padding() {
        let file = build_incremental_file(&[], 5, 8192);
        assert_eq!(file.len(), 12);
        let h = parse_header(&file, 8192).unwrap().unwrap();
        assert_eq!(h.data_offset, 12);
        assert_eq!(h.reconstructed_block_length(), 5);
    }

    #[test]
    fn damaged_headers_are_refused() {
        let mut file = build_incremental_file(&[], 5, 8192);
        file[0] ^= 1;
        assert!(matches!(parse_header(&file, 8192), Err(IncrementalError::BadMagic(_))));
        let mut file = build_incremental_file(&[], 5, 8192);
        file[4..8].copy_from_slice(&(RELSEG_SIZE + 1).to_le_bytes());
        assert!(matches!(parse_header(&file, 8192), Err(IncrementalError::TooLarge { .. })));
    }

    #[test]
    fn paths_and_labels() {
        assert_eq!(full_path_of("base/5/INCREMENTAL.16384").as_deref(), Some("base/5/16384"));
        assert_eq!(full_path_of("base/5/16384"), None);
        assert_eq!(full_path_of("base/5/INCREMENTAL."), None);
        assert_eq!(incremental_path_of("base/5/16384_vm"), "base/5/INCREMENTAL.16384_vm");
        let label = "START WAL LOCATION: 0/6000028 (file 000000010000000000000006)\nCHECKPOINT LOCATION: 0/6000080\n\
                     INCREMENTAL FROM LSN: 0/4000028\nINCREMENTAL FROM TLI: 1\nSTART TIMELINE: 1\n";
        assert_eq!(
            combined_backup_label(label),
            "START WAL LOCATION: 0/6000028 (file 000000010000000000000006)\nCHECKPOINT LOCATION: 0/6000080\nSTART TIMELINE: 1\n"
        );
    }
}
