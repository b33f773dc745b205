//! Base backups in the repository: deduplicated blocks and the backup manifest.
//!
//! ```text
//! pitr-dedup-key                                  sealed: the key of the block hash
//! pg/<system id>/blocks/<hh>/<hash>               a block of file content, named by its keyed hash
//! pg/<system id>/backups/<backup id>.manifest     sealed JSON: what a backup is made of
//! ```
//! A block's name is HMAC-SHA256(dedup key, plaintext): equal content is stored once, and the
//! name reveals nothing about the content to someone without the key. The manifest is written
//! last, after every block is durable: a backup without a manifest does not exist.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::layout::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::PutOutcome;

const DEDUP_KEY: &str = "pitr-dedup-key";

/// Keyed hash of block plaintext.
#[derive(Clone)]
pub struct BlockHasher {
    key: [u8; 32],
}

impl std::fmt::Debug for BlockHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockHasher")
    }
}

impl BlockHasher {
    pub fn block_id(&self, plaintext: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(plaintext);
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The repository's dedup key, created on first use. Two writers racing both end up with
/// whichever key was stored first.
pub async fn block_hasher(repo: &Repository) -> Result<BlockHasher, RepositoryError> {
    let read = |bytes: Vec<u8>| -> Result<BlockHasher, RepositoryError> {
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| RepositoryError::Invalid { name: DEDUP_KEY.into(), what: "not 32 bytes".into() })?;
        Ok(BlockHasher { key })
    };
    match repo.get_opened(DEDUP_KEY).await {
        Ok((_, bytes)) => return read(bytes),
        Err(RepositoryError::Store(e)) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    match repo.put_sealed(DEDUP_KEY, key.to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await {
        Ok(_) => Ok(BlockHasher { key }),
        // Someone else stored a different key first: use theirs.
        Err(RepositoryError::Conflict { .. }) => read(repo.get_opened(DEDUP_KEY).await?.1),
        Err(e) => Err(e),
    }
}

pub fn block_name(system_id: u64, block_id: &str) -> String {
    format!("pg/{system_id}/blocks/{}/{block_id}", &block_id[..2.min(block_id.len())])
}

pub fn manifest_name(system_id: u64, backup_id: &str) -> String {
    format!("pg/{system_id}/backups/{backup_id}.manifest")
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFile {
    /// Relative to the data directory (tablespace files under `pg_tblspc/<oid>/`).
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub mtime: u64,
    /// CRC-32C of the content as the server's backup manifest records it (hex, PostgreSQL's byte order).
    pub checksum: Option<String>,
    pub blocks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupEntryKind {
    Directory,
    Symlink { target: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupEntry {
    pub path: String,
    pub mode: u32,
    pub kind: BackupEntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub oid: u32,
    pub location: String,
}

/// Everything needed to materialise a backup, and to judge what it can restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub id: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// The backup an incremental was taken against (full → incremental → incremental …);
    /// `None` for a full backup. Restoring an incremental needs every ancestor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub system_id: u64,
    pub server_version_num: u32,
    pub timeline: u32,
    pub start_lsn: u64,
    pub stop_lsn: u64,
    /// µs since the Unix epoch.
    pub start_time_us: i64,
    pub stop_time_us: i64,
    pub block_size: u64,
    /// The server's relation block size (BLCKSZ), the unit of its incremental files.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    pub tablespaces: Vec<Tablespace>,
    pub entries: Vec<BackupEntry>,
    pub files: Vec<BackupFile>,
    /// The server's own backup_manifest, verbatim.
    pub server_manifest: String,
    /// Bytes read from the server and bytes newly stored (after dedup and compression).
    pub logical_bytes: u64,
    pub stored_bytes: u64,
}

fn default_page_size() -> u32 {
    8192
}

impl BackupManifest {
    pub fn is_incremental(&self) -> bool {
        self.parent.is_some()
    }

    pub async fn store(&self, repo: &Repository) -> Result<PutOutcome, RepositoryError> {
        let name = manifest_name(self.system_id, &self.id);
        let json = serde_json::to_vec(self)
            .map_err(|e| RepositoryError::Invalid { name: name.clone(), what: format!("serialising: {e}") })?;
        let meta = ObjectMeta {
            timeline: self.timeline,
            start_lsn: self.start_lsn,
            end_lsn: self.stop_lsn,
            ..ObjectMeta::plain(ObjectKind::Meta)
        };
        repo.put_sealed(&name, json, meta).await
    }

    pub async fn load(repo: &Repository, system_id: u64, backup_id: &str) -> Result<BackupManifest, RepositoryError> {
        let name = manifest_name(system_id, backup_id);
        let (_, json) = repo.get_opened(&name).await?;
        serde_json::from_slice(&json).map_err(|e| RepositoryError::Invalid { name, what: format!("manifest: {e}") })
    }

    /// Every backup of the cluster, oldest first.
    pub async fn list(repo: &Repository, system_id: u64) -> Result<Vec<BackupManifest>, RepositoryError> {
        let prefix = format!("pg/{system_id}/backups/");
        let mut out = BTreeMap::new();
        for obj in repo.list(&prefix).await? {
            if let Some(id) = obj.name.strip_prefix(&prefix).and_then(|n| n.strip_suffix(".manifest")) {
                let m = Self::load(repo, system_id, id).await?;
                out.insert((m.stop_lsn, m.id.clone()), m);
            }
        }
        Ok(out.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, LocalStore};
    use std::sync::Arc;

    #[tokio::test]
    async fn dedup_key_is_created_once_and_hashes_are_keyed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let repo = Repository::new(Arc::new(store), KeyRing::from_key("k", [1; 32]));
        let a = block_hasher(&repo).await.unwrap();
        let b = block_hasher(&repo).await.unwrap();
        assert_eq!(a.block_id(b"x"), b.block_id(b"x"));
        assert_ne!(a.block_id(b"x"), a.block_id(b"y"));
        let other = BlockHasher { key: [9; 32] };
        assert_ne!(a.block_id(b"x"), other.block_id(b"x"));
        assert_eq!(block_name(7, "abcd"), "pg/7/blocks/ab/abcd");
    }
}
