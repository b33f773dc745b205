//! Re-assembling a segment held as chunks: which chunks cover it, and their bytes as one run.
//!
//! A segment still being written is archived as chunks `[from, to)`; a crash, a retry or an older
//! pitr can leave chunks that overlap (`0-100` and `0-250`), that leave a gap, or that start past
//! offset 0. Whoever reads such a segment back (the receiver resuming, `wal-fetch` serving the
//! newest segment, compaction of a segment left as chunks) reads the run the same way: from a
//! first offset, each next chunk the one that starts within what is read so far and reaches
//! farthest, so every byte is read once or, where chunks overlap, checked once.
//!
//! [`cover`] and [`RunAssembler`] are pure (names and bytes in, bytes or a typed error naming the
//! objects out); [`Repository::read_chunk_run`] is the thin reader around them.

use crate::{ObjectMeta, Repository, RepositoryError, WalLayout, WalObject};

/// Why a run of chunks cannot be read back as one run of WAL.
#[derive(Debug, thiserror::Error)]
pub enum ChunkRunError {
    /// Reading a chunk failed (a chunk deleted meanwhile is a not-found store error).
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// A chunk holds another number of bytes than its name says.
    #[error("chunk {chunk} holds {bytes} bytes, but its name says {named}")]
    Length {
        /// The chunk's object name.
        chunk: String,
        /// How many bytes it holds.
        bytes: usize,
        /// How many its name says (`to - from`).
        named: usize,
    },
    /// A chunk holds other bytes than the chunks before it where they overlap: one of them is
    /// not this segment's WAL.
    #[error("chunk {chunk} disagrees with {earlier} about the WAL they both hold")]
    Mismatch {
        /// The chunk read last.
        chunk: String,
        /// The chunks read before it, comma-separated.
        earlier: String,
    },
    /// A chunk does not continue the run: it starts past its end (a gap) or before its start.
    #[error("chunk {chunk} starts at offset {from}, outside the run [{base}, {end}) read before it")]
    NotContiguous {
        /// The chunk's object name.
        chunk: String,
        /// Where the chunk starts in its segment.
        from: u32,
        /// Where the run starts.
        base: u32,
        /// Where the run read so far ends.
        end: u32,
    },
}

impl ChunkRunError {
    /// The error as a repository error about one object, for callers that report damaged
    /// objects that way (`object <name>: <what>`).
    pub fn into_repository_error(self) -> RepositoryError {
        match self {
            ChunkRunError::Repository(e) => e,
            ChunkRunError::Length { chunk, bytes, named } => {
                RepositoryError::Invalid { name: chunk, what: format!("holds {bytes} bytes, its name says {named}") }
            }
            ChunkRunError::Mismatch { chunk, earlier } => RepositoryError::Invalid {
                name: chunk,
                what: format!("disagrees with {earlier} about the WAL they both hold"),
            },
            ChunkRunError::NotContiguous { chunk, from, base, end } => RepositoryError::Invalid {
                name: chunk,
                what: format!("starts at offset {from}, outside the run [{base}, {end}) read before it"),
            },
        }
    }
}

/// The chunks to read to cover a segment from offset `from` as far as its chunks reach without a
/// gap, in order: each starts within what the ones before it cover and reaches past them (the
/// farthest-reaching such chunk). Empty when no chunk covers `from`.
///
/// `chunks` are `[from, to)` ranges within the segment, in any order.
pub fn cover(chunks: &[(u32, u32)], from: u32) -> Vec<(u32, u32)> {
    let mut read = Vec::new();
    let mut end = from;
    // Only a chunk that starts exactly at `from` may begin the run; after that, any chunk that
    // starts within it and reaches past its end continues it.
    let mut first = true;
    while let Some(&next) =
        chunks.iter().filter(|c| (if first { c.0 == from } else { c.0 <= end }) && c.1 > end).max_by_key(|c| c.1)
    {
        read.push(next);
        end = next.1;
        first = false;
    }
    read
}

/// Assembles a run of chunks, one chunk at a time, checking each against what the run holds:
/// its length against its name, where it starts against the run, and the bytes it shares with
/// the chunks before it.
#[derive(Debug, Clone)]
pub struct RunAssembler {
    base: u32,
    data: Vec<u8>,
    read: Vec<String>,
}

impl RunAssembler {
    /// An empty run that starts at offset `base` of its segment.
    pub fn new(base: u32) -> RunAssembler {
        RunAssembler { base, data: Vec::new(), read: Vec::new() }
    }

    /// Where the run starts in its segment.
    pub fn base(&self) -> u32 {
        self.base
    }

    /// Where the run read so far ends in its segment.
    pub fn end(&self) -> u32 {
        self.base + self.data.len() as u32
    }

    /// Adds chunk `name`, holding `bytes` as bytes `[from, to)` of the segment.
    pub fn push(&mut self, name: &str, from: u32, to: u32, bytes: &[u8]) -> Result<(), ChunkRunError> {
        let named = to.saturating_sub(from) as usize;
        if bytes.len() != named {
            return Err(ChunkRunError::Length { chunk: name.to_string(), bytes: bytes.len(), named });
        }
        let end = self.end();
        if from < self.base || from > end {
            return Err(ChunkRunError::NotContiguous { chunk: name.to_string(), from, base: self.base, end });
        }
        let shared = ((end - from) as usize).min(bytes.len());
        let at = (from - self.base) as usize;
        if self.data[at..at + shared] != bytes[..shared] {
            return Err(ChunkRunError::Mismatch { chunk: name.to_string(), earlier: self.read.join(", ") });
        }
        self.data.extend_from_slice(&bytes[shared..]);
        self.read.push(name.to_string());
        Ok(())
    }

    /// The run's bytes, from [`RunAssembler::base`] on.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }
}

/// One chunk of a run read back: its range and what its header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRead {
    /// Where the chunk starts in its segment.
    pub from: u32,
    /// Where it ends (exclusive).
    pub to: u32,
    /// The chunk's header metadata (LSN range, first and last commit time).
    pub meta: ObjectMeta,
}

/// A run of chunks of one segment, read back and assembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRun {
    /// Where the run starts in its segment.
    pub base: u32,
    /// The run's bytes: `[base, base + data.len())` of the segment.
    pub data: Vec<u8>,
    /// The chunks read, in order.
    pub chunks: Vec<ChunkRead>,
}

impl ChunkRun {
    /// Where the run ends in its segment (exclusive).
    pub fn end(&self) -> u32 {
        self.base + self.data.len() as u32
    }
}

impl Repository {
    /// Reads chunks `read` of segment `segno` on `timeline` (as [`cover`] picks them: contiguous,
    /// in order) and assembles them into one run, checking that they agree.
    pub async fn read_chunk_run(
        &self,
        layout: &WalLayout,
        timeline: u32,
        segno: u64,
        read: &[(u32, u32)],
    ) -> Result<ChunkRun, ChunkRunError> {
        let mut run = RunAssembler::new(read.first().map_or(0, |c| c.0));
        let mut chunks = Vec::with_capacity(read.len());
        for &(from, to) in read {
            let name = layout.object_name(&WalObject::Chunk { timeline, segno, from, to });
            let (header, bytes) = self.get_opened(&name).await?;
            run.push(&name, from, to, &bytes)?;
            chunks.push(ChunkRead { from, to, meta: header.meta });
        }
        let base = run.base();
        Ok(ChunkRun { base, data: run.into_bytes(), chunks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, LocalStore, ObjectKind};
    use std::sync::Arc;

    /// The segment's bytes: one for each offset.
    fn wal(from: u32, to: u32) -> Vec<u8> {
        (from..to).map(|o| (o % 251) as u8).collect()
    }

    fn assemble(chunks: &[(u32, u32)]) -> Result<(u32, Vec<u8>), ChunkRunError> {
        let mut run = RunAssembler::new(chunks.first().map_or(0, |c| c.0));
        for &(from, to) in chunks {
            run.push(&format!("c{from}-{to}"), from, to, &wal(from, to))?;
        }
        Ok((run.base(), run.into_bytes()))
    }

    #[test]
    fn cover_reads_each_byte_once_as_far_as_the_chunks_reach() {
        assert_eq!(cover(&[], 0), vec![]);
        assert_eq!(cover(&[(100, 200), (0, 100)], 0), vec![(0, 100), (100, 200)]);
        // Overlapping (a retry): the wider one only.
        assert_eq!(cover(&[(0, 100), (0, 250)], 0), vec![(0, 250)]);
        assert_eq!(cover(&[(0, 100), (50, 300), (100, 200)], 0), vec![(0, 100), (50, 300)]);
        // A gap ends the run.
        assert_eq!(cover(&[(0, 100), (200, 300)], 0), vec![(0, 100)]);
        // Nothing at the first offset: no run from there.
        assert_eq!(cover(&[(100, 200)], 0), vec![]);
        assert_eq!(cover(&[(100, 200), (150, 400)], 100), vec![(100, 200), (150, 400)]);
        // A chunk inside the run adds nothing.
        assert_eq!(cover(&[(0, 300), (100, 200)], 0), vec![(0, 300)]);
    }

    #[test]
    fn assembles_contiguous_and_overlapping_chunks() {
        assert_eq!(assemble(&[(0, 100), (100, 250)]).unwrap(), (0, wal(0, 250)));
        assert_eq!(assemble(&[(0, 100), (50, 300)]).unwrap(), (0, wal(0, 300)));
        assert_eq!(assemble(&[(100, 200), (150, 400)]).unwrap(), (100, wal(100, 400)));
        // A chunk within what is held is checked, not appended.
        assert_eq!(assemble(&[(0, 300), (100, 200)]).unwrap(), (0, wal(0, 300)));
        assert_eq!(assemble(&[]).unwrap(), (0, vec![]));
    }

    #[test]
    fn contradictions_name_the_objects() {
        let mut run = RunAssembler::new(0);
        run.push("a", 0, 100, &wal(0, 100)).unwrap();
        run.push("b", 100, 200, &wal(100, 200)).unwrap();
        let mut other = wal(150, 300);
        other[10] ^= 1;
        let err = run.clone().push("c", 150, 300, &other).unwrap_err();
        assert!(
            matches!(&err, ChunkRunError::Mismatch { chunk, earlier } if chunk == "c" && earlier == "a, b"),
            "{err}"
        );
        assert_eq!(err.to_string(), "chunk c disagrees with a, b about the WAL they both hold");

        let err = run.clone().push("d", 200, 300, &wal(200, 290)).unwrap_err();
        assert!(matches!(err, ChunkRunError::Length { bytes: 90, named: 100, .. }), "{err}");
        assert_eq!(err.into_repository_error().to_string(), "object d: holds 90 bytes, its name says 100");

        let err = run.clone().push("e", 250, 300, &wal(250, 300)).unwrap_err();
        assert!(matches!(err, ChunkRunError::NotContiguous { from: 250, base: 0, end: 200, .. }), "{err}");
        let mut late = RunAssembler::new(100);
        let err = late.push("f", 50, 150, &wal(50, 150)).unwrap_err();
        assert!(matches!(err, ChunkRunError::NotContiguous { from: 50, .. }), "{err}");
        // A failed push leaves the run as it was.
        run.push("g", 200, 300, &wal(200, 300)).unwrap();
        assert_eq!(run.end(), 300);
    }

    #[tokio::test]
    async fn reads_a_run_from_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [5; 32]));
        let layout = WalLayout { system_id: 7, segment_size: 1 << 20 };
        for (from, to, commit) in [(0u32, 100u32, Some(10)), (0, 250, Some(20)), (250, 400, None)] {
            let meta = ObjectMeta {
                kind: ObjectKind::WalChunk,
                timeline: 1,
                start_lsn: (3 << 20) + u64::from(from),
                end_lsn: (3 << 20) + u64::from(to),
                first_commit_us: commit,
                last_commit_us: commit,
            };
            let name = layout.object_name(&WalObject::Chunk { timeline: 1, segno: 3, from, to });
            repo.put_sealed(&name, wal(from, to), meta).await.unwrap();
        }
        let read = cover(&[(0, 100), (0, 250), (250, 400)], 0);
        let run = repo.read_chunk_run(&layout, 1, 3, &read).await.unwrap();
        assert_eq!((run.base, run.end(), run.data.clone()), (0, 400, wal(0, 400)));
        assert_eq!(
            run.chunks.iter().map(|c| (c.from, c.to, c.meta.last_commit_us)).collect::<Vec<_>>(),
            vec![(0, 250, Some(20)), (250, 400, None)]
        );
        // A chunk that is gone is the store's not-found (a reader racing a compaction retries).
        let err = repo.read_chunk_run(&layout, 1, 3, &[(0, 100), (100, 200)]).await.unwrap_err();
        assert!(matches!(&err, ChunkRunError::Repository(RepositoryError::Store(e)) if e.is_not_found()), "{err}");
    }
}
