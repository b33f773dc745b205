//! The shared block store of file sets and dumps: byte streams cut into content-defined blocks
//! (FastCDC), each stored once under `files/blocks/<hh>/<keyed hash>` ([`names::files::block`]),
//! sealed like every object.
//!
//! Content-defined cut points move with the content: a line inserted at the top of a large file,
//! or one more row in the middle of a dump, changes the blocks around it and no others, so an
//! unchanged tree or a mostly unchanged dump stores almost nothing. The block id is the same
//! keyed hash as base-backup blocks ([`pitr_archive::backup::BlockHasher`], the repository's
//! dedup key), so names reveal nothing about the content to someone without the key.
//!
//! Writers put blocks beside reading (at most `parallel` puts in flight, each at most
//! [`MAX_BLOCK`] bytes), and a run's writers share what they have already stored, so a file seen
//! twice in one run costs one `head`, not two. A block is reused when the store already holds it;
//! a manifest naming blocks is written by the caller only after every writer has finished.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use pitr_archive::backup::{block_hasher, BlockHasher};
use pitr_archive::names;
use pitr_archive::{ObjectKind, ObjectMeta, PutOutcome, Repository};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::FilesError;

/// No block is shorter than this, but a stream's last (a small file is one block).
pub const MIN_BLOCK: u32 = 64 * 1024;
/// The average block the cut points aim at.
pub const AVG_BLOCK: u32 = 256 * 1024;
/// No block is longer than this.
pub const MAX_BLOCK: u32 = 1024 * 1024;

/// One block of a stream: its id (keyed hash of the plaintext) and length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    /// 64 lower-case hex digits: HMAC-SHA256(dedup key, plaintext).
    pub id: String,
    /// Plaintext bytes.
    pub len: u64,
}

/// What a finished [`BlockWriter`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredStream {
    /// The stream is these blocks' plaintexts, concatenated.
    pub blocks: Vec<BlockRef>,
    /// Bytes written.
    pub len: u64,
    /// SHA-256 of the whole stream, lower-case hex (what `sha256sum` prints).
    pub sha256: String,
    /// Blocks this writer put.
    pub new_blocks: u64,
    /// Blocks the store already held (or another writer of the run put).
    pub reused_blocks: u64,
    /// Bytes this writer's new blocks take in the repository (sealed: compressed, encrypted).
    pub stored_bytes: u64,
}

/// The block store of one run (a backup, a dump, a restore).
#[derive(Clone)]
pub struct BlockStore {
    repo: Repository,
    hasher: BlockHasher,
    parallel: usize,
    /// Ids this run has stored or seen stored: a second copy needs no `head`.
    known: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStore").field("repository", &self.repo.location()).finish_non_exhaustive()
    }
}

type Put = JoinHandle<Result<(PutOutcome, u64), FilesError>>;

impl BlockStore {
    /// The block store of `repo`, with its dedup key (created on first use), putting or
    /// fetching up to 4 blocks at a time.
    pub async fn open(repo: &Repository) -> Result<BlockStore, FilesError> {
        let hasher = block_hasher(repo).await?;
        Ok(BlockStore { repo: repo.clone(), hasher, parallel: 4, known: Arc::default() })
    }

    /// Up to `n` (at least 1) block puts or gets in flight per writer or reader.
    pub fn with_parallel(mut self, n: usize) -> BlockStore {
        self.parallel = n.max(1);
        self
    }

    /// The repository the blocks live in.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The id `plaintext` has (or would have) in this store.
    pub fn block_id(&self, plaintext: &[u8]) -> String {
        self.hasher.block_id(plaintext)
    }

    /// A writer for one stream (a file's content, a dump).
    pub fn writer(&self) -> BlockWriter {
        BlockWriter {
            store: self.clone(),
            buf: Vec::new(),
            blocks: Vec::new(),
            puts: VecDeque::new(),
            sha: Sha256::new(),
            len: 0,
            new_blocks: 0,
            reused_blocks: 0,
            stored_bytes: 0,
        }
    }

    /// Block `block`'s plaintext, checked against its id and length: a block that opens but
    /// holds other content (or another length) is [`FilesError::BadBlock`].
    pub async fn read_block(&self, block: &BlockRef) -> Result<Vec<u8>, FilesError> {
        read_block(&self.repo, &self.hasher, block).await
    }

    /// Writes the plaintext of `blocks`, in order, to `out`, fetching up to `parallel` blocks
    /// ahead; returns the bytes written. `out` is flushed, not synced.
    pub async fn read_to<W: AsyncWrite + Unpin>(&self, blocks: &[BlockRef], out: &mut W) -> Result<u64, FilesError> {
        let mut ahead: VecDeque<JoinHandle<Result<Vec<u8>, FilesError>>> = VecDeque::new();
        let mut next = blocks.iter();
        let mut written = 0u64;
        loop {
            while ahead.len() < self.parallel {
                let Some(block) = next.next() else { break };
                let (repo, hasher, block) = (self.repo.clone(), self.hasher.clone(), block.clone());
                ahead.push_back(tokio::spawn(async move { read_block(&repo, &hasher, &block).await }));
            }
            let Some(fetch) = ahead.pop_front() else { break };
            let data = joined(fetch.await)?;
            out.write_all(&data).await.map_err(|e| FilesError::Other(format!("writing restored content: {e}")))?;
            written += data.len() as u64;
        }
        out.flush().await.map_err(|e| FilesError::Other(format!("writing restored content: {e}")))?;
        Ok(written)
    }

    /// Whether this run already stored (or found) `id`; marks it as known either way.
    fn first_sight(&self, id: &str) -> bool {
        // A poisoned lock only means another writer panicked; the set is still a valid cache.
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.insert(id.to_string())
    }
}

async fn read_block(repo: &Repository, hasher: &BlockHasher, block: &BlockRef) -> Result<Vec<u8>, FilesError> {
    let (_, data) = repo.get_opened(&names::files::block(&block.id)).await?;
    if data.len() as u64 != block.len {
        return Err(FilesError::BadBlock {
            id: block.id.clone(),
            what: format!("holds {} bytes, the manifest says {}", data.len(), block.len),
        });
    }
    if hasher.block_id(&data) != block.id {
        return Err(FilesError::BadBlock { id: block.id.clone(), what: "content does not match its name".into() });
    }
    Ok(data)
}

fn joined<T>(r: Result<Result<T, FilesError>, tokio::task::JoinError>) -> Result<T, FilesError> {
    r.map_err(|e| FilesError::Other(format!("a block task failed: {e}")))?
}

/// Cuts one stream into blocks and stores the new ones. Write with [`BlockWriter::write`], then
/// [`BlockWriter::finish`]: only a finished writer's blocks are all durable.
pub struct BlockWriter {
    store: BlockStore,
    /// Bytes not yet cut (less than [`MAX_BLOCK`] between writes).
    buf: Vec<u8>,
    blocks: Vec<BlockRef>,
    puts: VecDeque<Put>,
    sha: Sha256,
    len: u64,
    new_blocks: u64,
    reused_blocks: u64,
    stored_bytes: u64,
}

impl BlockWriter {
    /// Appends `data` to the stream; blocks are cut and put as they fill.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), FilesError> {
        self.sha.update(data);
        self.len += data.len() as u64;
        self.buf.extend_from_slice(data);
        while self.buf.len() >= MAX_BLOCK as usize {
            // With at least MAX_BLOCK bytes buffered, the first cut is where a cutter reading the
            // whole stream would put it: the bytes after it cannot move it.
            let cut = first_cut(&self.buf);
            let block: Vec<u8> = self.buf.drain(..cut).collect();
            self.emit(block).await?;
        }
        Ok(())
    }

    /// Cuts the rest, waits for every put, and says what the stream became.
    pub async fn finish(mut self) -> Result<StoredStream, FilesError> {
        let rest = std::mem::take(&mut self.buf);
        let cuts: Vec<(usize, usize)> = if rest.is_empty() {
            Vec::new()
        } else {
            fastcdc::v2020::FastCDC::new(&rest, MIN_BLOCK, AVG_BLOCK, MAX_BLOCK).map(|c| (c.offset, c.length)).collect()
        };
        for (offset, length) in cuts {
            self.emit(rest[offset..offset + length].to_vec()).await?;
        }
        while let Some(put) = self.puts.pop_front() {
            self.count(joined(put.await)?);
        }
        Ok(StoredStream {
            blocks: self.blocks,
            len: self.len,
            sha256: hex::encode(self.sha.finalize()),
            new_blocks: self.new_blocks,
            reused_blocks: self.reused_blocks,
            stored_bytes: self.stored_bytes,
        })
    }

    async fn emit(&mut self, block: Vec<u8>) -> Result<(), FilesError> {
        let id = self.store.block_id(&block);
        self.blocks.push(BlockRef { id: id.clone(), len: block.len() as u64 });
        if !self.store.first_sight(&id) {
            self.reused_blocks += 1;
            return Ok(());
        }
        while self.puts.len() >= self.store.parallel {
            if let Some(put) = self.puts.pop_front() {
                self.count(joined(put.await)?);
            }
        }
        let repo = self.store.repo.clone();
        self.puts.push_back(tokio::spawn(async move {
            let name = names::files::block(&id);
            if repo.store().head(&name).await.map_err(pitr_archive::RepositoryError::from)?.is_some() {
                return Ok((PutOutcome::AlreadyExists, 0));
            }
            Ok(repo.put_sealed_sized(&name, block, ObjectMeta::plain(ObjectKind::BackupBlock)).await?)
        }));
        Ok(())
    }

    fn count(&mut self, (outcome, size): (PutOutcome, u64)) {
        if outcome == PutOutcome::Created {
            self.new_blocks += 1;
            self.stored_bytes += size;
        } else {
            self.reused_blocks += 1;
        }
    }
}

/// The length of the first block of `buf` (which holds at least [`MAX_BLOCK`] bytes).
fn first_cut(buf: &[u8]) -> usize {
    fastcdc::v2020::FastCDC::new(buf, MIN_BLOCK, AVG_BLOCK, MAX_BLOCK).next().map_or(buf.len(), |c| c.length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::{KeyRing, LocalStore};

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    async fn store_in(dir: &std::path::Path) -> BlockStore {
        let repo = Repository::new(Arc::new(LocalStore::new(dir)), KeyRing::from_key("k", [3; 32]));
        repo.init().await.unwrap();
        BlockStore::open(&repo).await.unwrap()
    }

    async fn store_stream(store: &BlockStore, data: &[u8], piece: usize) -> StoredStream {
        let mut w = store.writer();
        for part in data.chunks(piece.max(1)) {
            w.write(part).await.unwrap();
        }
        w.finish().await.unwrap()
    }

    #[tokio::test]
    async fn a_stream_reads_back_whole_and_cuts_do_not_depend_on_write_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path()).await;
        let data = pseudo_random(5 * 1024 * 1024 + 123, 7);
        let a = store_stream(&store, &data, 4096).await;
        let b = store_stream(&store, &data, 3 * 1024 * 1024).await;
        assert_eq!(a.blocks, b.blocks);
        assert!(a.blocks.len() > 5, "{} blocks", a.blocks.len());
        assert!(a.blocks.iter().all(|b| b.len <= MAX_BLOCK as u64));
        assert_eq!(a.len, data.len() as u64);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&data)));
        // The second copy stored nothing: every block was known.
        assert_eq!((b.new_blocks, b.stored_bytes), (0, 0));
        let mut out = Vec::new();
        assert_eq!(store.read_to(&a.blocks, &mut out).await.unwrap(), data.len() as u64);
        assert_eq!(out, data);
    }

    #[tokio::test]
    async fn an_insertion_changes_only_the_blocks_around_it_and_another_run_reuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let data = pseudo_random(8 * 1024 * 1024, 11);
        let first = store_stream(&store_in(dir.path()).await, &data, 65536).await;
        let mut changed = data.clone();
        changed.splice(3 * 1024 * 1024..3 * 1024 * 1024, b"a line inserted in the middle\n".iter().copied());
        // A new run (a new BlockStore) finds the old blocks with `head`.
        let second = store_stream(&store_in(dir.path()).await, &changed, 65536).await;
        assert!(second.new_blocks <= 2, "{} new of {} blocks", second.new_blocks, second.blocks.len());
        assert!(second.reused_blocks >= second.blocks.len() as u64 - 2);
        assert!(first.blocks.len() >= 8);
    }

    #[tokio::test]
    async fn empty_and_small_streams() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path()).await;
        let empty = store_stream(&store, b"", 1).await;
        assert!(empty.blocks.is_empty());
        assert_eq!(empty.sha256, hex::encode(Sha256::digest(b"")));
        let small = store_stream(&store, b"hello", 1).await;
        assert_eq!(small.blocks.len(), 1);
        assert_eq!(small.new_blocks, 1);
    }

    #[tokio::test]
    async fn a_block_with_other_content_under_its_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_in(dir.path()).await;
        let a = store_stream(&store, b"the real content", 1).await;
        let b = store_stream(&store, b"other content", 1).await;
        // Claim b's block under a's id and length: it opens, but not as a's content.
        let forged = BlockRef { id: a.blocks[0].id.clone(), len: b.blocks[0].len };
        let err = store.read_block(&forged).await.unwrap_err();
        assert!(matches!(err, FilesError::BadBlock { .. }), "{err}");
        let missing = BlockRef { id: "ab".repeat(32), len: 1 };
        assert!(store.read_block(&missing).await.is_err());
    }
}
