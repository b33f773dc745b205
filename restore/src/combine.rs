//! Rebuilding full relation files from a chain of incremental backups, as pg_combinebackup does,
//! without materialising any backup of the chain: the plan says, for every block of the output
//! file, which stored backup block holds its bytes, so each stored block is fetched once and its
//! pieces written straight to their places in the target.
//!
//! The rule (PostgreSQL's `reconstruct.c`): a block comes from the newest incremental file that
//! carries it; walking back the chain, older incrementals and finally the first full copy supply
//! the rest, but only below the newest file's truncation length; blocks nobody supplies are
//! zeros (extended but never written, so no WAL summary mentions them).

use pitr_pgformat::incremental::IncrementalHeader;

/// One version of a file in the chain, newest first in the slices below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The whole file, of this many bytes.
    Full {
        /// The file's length in bytes.
        size: u64,
    },
    /// An `INCREMENTAL.` file: the blocks changed since the previous backup of the chain, with
    /// the file's truncation length.
    Incremental(IncrementalHeader),
}

/// Where output block `n` comes from: `(source index, byte offset in that source file)`, or
/// `None` for a zero block.
pub type BlockMap = Vec<Option<(usize, u64)>>;

/// The block map of a file whose newest version, `sources[0]`, is incremental. `sources` runs
/// newest to oldest and ends at the first full copy; `Err(n)` if the chain runs out before one
/// (the number of sources looked at).
pub fn block_map(sources: &[Source], page_size: u32) -> Result<BlockMap, usize> {
    let Some(Source::Incremental(newest)) = sources.first() else { return Ok(Vec::new()) };
    let length = newest.reconstructed_block_length() as usize;
    let limit = newest.truncation_block_length as usize;
    let mut map: BlockMap = vec![None; length];
    for (i, &b) in newest.block_numbers.iter().enumerate() {
        map[b as usize] = Some((0, newest.block_offset(i, page_size)));
    }
    for (index, source) in sources.iter().enumerate().skip(1) {
        match source {
            Source::Incremental(h) => {
                for (i, &b) in h.block_numbers.iter().enumerate() {
                    let b = b as usize;
                    if b < limit && map[b].is_none() {
                        map[b] = Some((index, h.block_offset(i, page_size)));
                    }
                }
            }
            Source::Full { size } => {
                let blocks = (*size / page_size as u64) as usize;
                for (b, slot) in map.iter_mut().enumerate().take(limit.min(blocks)) {
                    if slot.is_none() {
                        *slot = Some((index, b as u64 * page_size as u64));
                    }
                }
                return Ok(map);
            }
        }
    }
    Err(sources.len())
}

/// A contiguous copy: `len` bytes from `src_offset` of source file `source` to `dst_offset` of
/// the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Index of the source file in the chain (0: newest).
    pub source: usize,
    /// Where the bytes start in that source file.
    pub src_offset: u64,
    /// Where they go in the output file.
    pub dst_offset: u64,
    /// How many bytes (a whole number of pages).
    pub len: u64,
}

/// The block map as few runs as possible (zero blocks are left out: the output starts zeroed).
pub fn runs(map: &BlockMap, page_size: u32) -> Vec<Run> {
    let page = page_size as u64;
    let mut out: Vec<Run> = Vec::new();
    for (b, slot) in map.iter().enumerate() {
        let Some((source, src_offset)) = *slot else { continue };
        let dst_offset = b as u64 * page;
        match out.last_mut() {
            Some(r)
                if r.source == source && r.src_offset + r.len == src_offset && r.dst_offset + r.len == dst_offset =>
            {
                r.len += page
            }
            _ => out.push(Run { source, src_offset, dst_offset, len: page }),
        }
    }
    out
}

/// A piece of one stored block: bytes `offset..offset + len` of stored block `block` (its index
/// in the source file's block list) go to `dst_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Index of the source file in the chain (0: newest).
    pub source: usize,
    /// Index of the stored block in that source file's block list.
    pub block: usize,
    /// Where the bytes start within the stored block.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
    /// Where they go in the output file.
    pub dst_offset: u64,
}

/// Cuts runs at the boundaries of the stored blocks of their sources (`block_sizes[source]`
/// bytes each: the block size may differ between backups of a chain).
pub fn pieces(runs: &[Run], block_sizes: &[u64]) -> Vec<Piece> {
    let mut out = Vec::new();
    for r in runs {
        let block_size = block_sizes[r.source];
        let (mut src, mut dst, mut left) = (r.src_offset, r.dst_offset, r.len);
        while left > 0 {
            let block = (src / block_size) as usize;
            let offset = src % block_size;
            let len = left.min(block_size - offset);
            out.push(Piece { source: r.source, block, offset, len, dst_offset: dst });
            src += len;
            dst += len;
            left -= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_pgformat::incremental::{build_incremental_file, parse_header};

    const PAGE: u32 = 8192;

    fn page(tag: u8) -> Vec<u8> {
        vec![tag; PAGE as usize]
    }

    fn incremental(blocks: &[(u32, u8)], truncation: u32) -> (Source, Vec<u8>) {
        let blocks: Vec<(u32, Vec<u8>)> = blocks.iter().map(|&(b, t)| (b, page(t))).collect();
        let file = build_incremental_file(&blocks, truncation, PAGE);
        (Source::Incremental(parse_header(&file, PAGE).unwrap().unwrap()), file)
    }

    /// Applies a plan the slow, obvious way: the reference the tests compare against.
    fn apply(map: &BlockMap, files: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for slot in map {
            match *slot {
                None => out.extend_from_slice(&page(0)),
                Some((s, off)) => out.extend_from_slice(&files[s][off as usize..][..PAGE as usize]),
            }
        }
        out
    }

    /// The same result by pieces of stored blocks of `block_size` bytes.
    fn apply_pieces(map: &BlockMap, files: &[Vec<u8>], block_size: u64) -> Vec<u8> {
        let mut out = vec![0u8; map.len() * PAGE as usize];
        for p in pieces(&runs(map, PAGE), &vec![block_size; files.len()]) {
            let stored: Vec<&[u8]> = files[p.source].chunks(block_size as usize).collect();
            let bytes = &stored[p.block][p.offset as usize..][..p.len as usize];
            out[p.dst_offset as usize..][..p.len as usize].copy_from_slice(bytes);
        }
        out
    }

    #[test]
    fn newest_wins_truncation_limits_older_and_gaps_are_zero() {
        // Full: 6 blocks, tagged 10..15. Then an incremental changing block 1 (tag 21) with the
        // file truncated to 4 blocks; then the newest changing block 2 (tag 32) and extending to
        // block 7 (tag 37), with truncation length 4.
        let full: Vec<u8> = (0..6).flat_map(|t| page(10 + t)).collect();
        let (mid, mid_file) = incremental(&[(1, 21), (5, 25)], 4);
        let (newest, newest_file) = incremental(&[(2, 32), (7, 37)], 4);
        let sources = vec![newest, mid, Source::Full { size: full.len() as u64 }];
        let files = vec![newest_file, mid_file, full];
        let map = block_map(&sources, PAGE).unwrap();
        assert_eq!(map.len(), 8);
        let tags: Vec<u8> = apply(&map, &files).chunks(PAGE as usize).map(|p| p[0]).collect();
        // Block 5 of the middle backup and 4..6 of the full are beyond the newest truncation
        // length: zeros, as pg_combinebackup writes them.
        assert_eq!(tags, vec![10, 21, 32, 13, 0, 0, 0, 37]);
        for block_size in [8192, 16384, 3 * 8192, 1 << 20, 12_000] {
            assert_eq!(apply_pieces(&map, &files, block_size), apply(&map, &files), "block size {block_size}");
        }
    }

    #[test]
    fn unchanged_file_is_one_run_from_the_full_copy() {
        let full: Vec<u8> = (0..4).flat_map(|t| page(t + 1)).collect();
        let (newest, _) = incremental(&[], 4);
        let map = block_map(&[newest, Source::Full { size: full.len() as u64 }], PAGE).unwrap();
        assert_eq!(runs(&map, PAGE), vec![Run { source: 1, src_offset: 0, dst_offset: 0, len: 4 * 8192 }]);
    }

    #[test]
    fn a_chain_without_a_full_copy_is_an_error() {
        let (newest, _) = incremental(&[(0, 1)], 3);
        let (older, _) = incremental(&[(1, 2)], 3);
        assert_eq!(block_map(&[newest, older], PAGE), Err(2));
    }

    #[test]
    fn random_chains_agree_with_a_page_by_page_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            // A model file evolving across backups: the full copy, then incrementals.
            let mut model: Vec<u8> = (0..rng.gen_range(0..12)).map(|_| rng.gen_range(1..250)).collect();
            let full: Vec<u8> = model.iter().flat_map(|&t| page(t)).collect();
            let mut sources = vec![Source::Full { size: full.len() as u64 }];
            let mut files = vec![full];
            for _ in 0..rng.gen_range(1..4) {
                // Truncate, then extend and modify some blocks; the incremental carries every
                // block written since the previous backup.
                let truncate_to = rng.gen_range(0..=model.len());
                model.truncate(truncate_to);
                let new_len = truncate_to + rng.gen_range(0..4);
                let mut changed = std::collections::BTreeSet::new();
                while model.len() < new_len {
                    changed.insert(model.len() as u32);
                    model.push(rng.gen_range(1..250));
                }
                for _ in 0..rng.gen_range(0..3) {
                    if !model.is_empty() {
                        let b = rng.gen_range(0..model.len());
                        model[b] = rng.gen_range(1..250);
                        changed.insert(b as u32);
                    }
                }
                let blocks: Vec<(u32, u8)> = changed.iter().map(|&b| (b, model[b as usize])).collect();
                let (src, file) = incremental(&blocks, truncate_to as u32);
                sources.insert(0, src);
                files.insert(0, file);
            }
            let map = block_map(&sources, PAGE).unwrap();
            let want: Vec<u8> = model.iter().flat_map(|&t| page(t)).collect();
            assert_eq!(apply(&map, &files), want);
            assert_eq!(apply_pieces(&map, &files, 3 * 8192), want);
        }
    }
}
