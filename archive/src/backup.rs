//! Base backups in the repository: deduplicated blocks and the backup manifest.
//!
//! ```text
//! pitr-dedup-key                                  sealed: the key of the block hash
//! pg/<system id>/blocks/<hh>/<hash>               a block of file content, named by its keyed hash
//! pg/<system id>/backups/<backup id>.manifest     sealed JSON: what a backup is made of
//! ```
//! (names built by [`crate::names`]: [`DEDUP_KEY`], [`names::pg::block`], [`names::pg::backup_manifest`]).
//! A block's name is HMAC-SHA256(dedup key, plaintext): equal content is stored once, and the
//! name reveals nothing about the content to someone without the key. The manifest is written
//! last, after every block is durable: a backup without a manifest does not exist.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::names::{self, DEDUP_KEY};
use crate::repository::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::PutOutcome;

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
    /// The block's name component: HMAC-SHA256(dedup key, plaintext) as 64 lower-case hex
    /// digits. Equal content gets the same id, so it is stored once.
    pub fn block_id(&self, plaintext: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(plaintext);
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The repository's dedup key if it has one; never creates it (a restore, which only reads).
pub async fn existing_block_hasher(repo: &Repository) -> Result<Option<BlockHasher>, RepositoryError> {
    match repo.get_record(DEDUP_KEY).await {
        Ok((_, bytes)) => {
            let key: [u8; 32] = bytes
                .try_into()
                .map_err(|_| RepositoryError::Invalid { name: DEDUP_KEY.into(), what: "not 32 bytes".into() })?;
            Ok(Some(BlockHasher { key }))
        }
        Err(RepositoryError::Store(e)) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
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
    match repo.get_record(DEDUP_KEY).await {
        Ok((_, bytes)) => return read(bytes),
        Err(RepositoryError::Store(e)) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    match repo.put_sealed(DEDUP_KEY, key.to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await {
        Ok(_) => Ok(BlockHasher { key }),
        // Someone else stored a different key first: use theirs.
        Err(RepositoryError::Conflict { .. }) => read(repo.get_record(DEDUP_KEY).await?.1),
        Err(e) => Err(e),
    }
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFile {
    /// Relative to the data directory (tablespace files under `pg_tblspc/<oid>/`).
    pub path: String,
    /// Length in bytes, as the tar stream gave it (for an `INCREMENTAL.<name>` file, that file's
    /// own length, not the relation's).
    pub size: u64,
    /// Permission bits, as the server's tar stream gave them.
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch, from the tar stream.
    pub mtime: u64,
    /// CRC-32C of the content as the server's backup manifest records it (hex, PostgreSQL's byte order).
    pub checksum: Option<String>,
    /// Block ids ([`BlockHasher::block_id`]) of its content, in order: the file is their
    /// plaintexts concatenated (every block `block_size` bytes but the last).
    pub blocks: Vec<String>,
}

/// What a non-file entry of a backup is (serialised as `"Directory"` or
/// `{"Symlink": {"target": …}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupEntryKind {
    /// A directory (recorded so that empty ones are recreated too).
    Directory,
    /// A symbolic link.
    Symlink {
        /// Where it points, verbatim.
        target: String,
    },
}

/// A directory or symbolic link of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupEntry {
    /// Relative to the data directory, like [`BackupFile::path`].
    pub path: String,
    /// Permission bits, as the server's tar stream gave them.
    pub mode: u32,
    /// Directory or symbolic link.
    pub kind: BackupEntryKind,
}

/// A tablespace of the backed-up cluster; its files are under `pg_tblspc/<oid>/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    /// The tablespace's OID.
    pub oid: u32,
    /// Its directory on the server, as `BASE_BACKUP` reported it.
    pub location: String,
}

/// Whether a backup stands alone or builds on a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// Every file whole.
    Full,
    /// PostgreSQL 17+ `BASE_BACKUP ( INCREMENTAL )`: changed blocks since [`BackupManifest::parent`].
    Incremental,
}

impl BackupKind {
    /// `full` or `incremental`: in manifests, listings, reports and the `backup_type` label.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
        }
    }
}

impl std::fmt::Display for BackupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Which kind of server a backup was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerRole {
    /// The primary the archive streams from (`[postgres] conninfo`).
    Primary,
    /// A streaming standby of it (`[backup] conninfo`).
    Standby,
}

impl ServerRole {
    /// `primary` or `standby`: in manifests, listings and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerRole::Primary => "primary",
            ServerRole::Standby => "standby",
        }
    }
}

/// Where a backup was taken: the server's role and address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakenFrom {
    /// Primary or standby.
    pub role: ServerRole,
    /// The server's `host:port` (or socket directory) as pitr connected to it.
    pub host: String,
}

impl std::fmt::Display for TakenFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.role.as_str(), self.host)
    }
}

/// Everything needed to materialise a backup, and to judge what it can restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// The backup id: its start time in UTC, `YYYYMMDDTHHMMSSZ`, also its manifest's name.
    pub id: String,
    /// Full, or incremental on [`BackupManifest::parent`].
    pub kind: BackupKind,
    /// The backup an incremental was taken against (full → incremental → incremental …);
    /// `None` for a full backup. Restoring an incremental needs every ancestor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The cluster's PostgreSQL system identifier.
    pub system_id: u64,
    /// The server's `server_version_num` (e.g. 170002): incrementals need a parent of the same
    /// major version.
    pub server_version_num: u32,
    /// The timeline the backup was taken on, as `BASE_BACKUP` reported it.
    pub timeline: u32,
    /// The backup's start LSN: WAL replay begins here.
    pub start_lsn: u64,
    /// The backup's stop LSN: the archive must hold WAL up to here for it to be consistent.
    pub stop_lsn: u64,
    /// µs since the Unix epoch.
    pub start_time_us: i64,
    /// When it stopped, µs since the Unix epoch: its consistency point, the earliest moment it
    /// restores to.
    pub stop_time_us: i64,
    /// Bytes per block: files are cut into pieces of this size (the last one shorter).
    pub block_size: u64,
    /// The server's relation block size (BLCKSZ), the unit of its incremental files.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// The cluster's tablespaces.
    pub tablespaces: Vec<Tablespace>,
    /// Directories and symbolic links.
    pub entries: Vec<BackupEntry>,
    /// Regular files, each as its list of blocks.
    pub files: Vec<BackupFile>,
    /// The server's own backup_manifest, verbatim.
    pub server_manifest: String,
    /// Bytes read from the server and bytes newly stored (after dedup and compression).
    pub logical_bytes: u64,
    /// See `logical_bytes`.
    pub stored_bytes: u64,
    /// Where the backup was taken; absent in manifests written before pitr recorded it (those
    /// were all taken from the primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_from: Option<TakenFrom>,
}

fn default_page_size() -> u32 {
    8192
}

impl BackupManifest {
    /// Whether it builds on a parent (it has one), so restoring it needs its chain.
    pub fn is_incremental(&self) -> bool {
        self.parent.is_some()
    }

    /// Seals and puts the manifest (create-only), with the backup's timeline and start..stop LSNs
    /// in the header. Call it last, once every block and the WAL up to `stop_lsn` are durable:
    /// from then on the backup exists.
    pub async fn store(&self, repo: &Repository) -> Result<PutOutcome, RepositoryError> {
        let name = names::pg::backup_manifest(self.system_id, &self.id);
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

    /// Opens and parses the manifest of backup `backup_id` of cluster `system_id`.
    pub async fn load(repo: &Repository, system_id: u64, backup_id: &str) -> Result<BackupManifest, RepositoryError> {
        let name = names::pg::backup_manifest(system_id, backup_id);
        let (_, json) = repo.get_opened(&name).await?;
        serde_json::from_slice(&json).map_err(|e| RepositoryError::Invalid { name, what: format!("manifest: {e}") })
    }

    /// Every backup of the cluster, oldest first. Strict: any manifest that cannot be read is an
    /// error, for `expire`, which must know every backup's blocks and WAL before deleting any.
    pub async fn list(repo: &Repository, system_id: u64) -> Result<Vec<BackupManifest>, RepositoryError> {
        let mut out = BTreeMap::new();
        for obj in repo.list(&names::pg::backups_prefix(system_id)).await? {
            if let Some(id) = names::pg::parse_backup_manifest(system_id, &obj.name) {
                let m = Self::load(repo, system_id, id).await?;
                out.insert((m.stop_lsn, m.id.clone()), m);
            }
        }
        Ok(out.into_values().collect())
    }

    /// Every backup of the cluster that opens, oldest first, and the manifest names that do not
    /// (with why), for restores, backups and listings: an object planted under a manifest's name
    /// (or one damaged beyond what a fallback repository can serve) must not stop them from using
    /// the others, and leaving one out only narrows their choice (a restore still checks the WAL
    /// from the backup it picks). That includes a key id the ring lacks or a newer format
    /// version, which a planted object can claim as easily; the caller says why each was left
    /// out. Storage errors stay errors: they say nothing about the object.
    pub async fn list_sound(
        repo: &Repository,
        system_id: u64,
    ) -> Result<(Vec<BackupManifest>, Vec<DamagedManifest>), RepositoryError> {
        let mut out = BTreeMap::new();
        let mut damaged = Vec::new();
        for obj in repo.list(&names::pg::backups_prefix(system_id)).await? {
            let Some(id) = names::pg::parse_backup_manifest(system_id, &obj.name) else { continue };
            match Self::load(repo, system_id, id).await {
                Ok(m) => {
                    out.insert((m.stop_lsn, m.id.clone()), m);
                }
                // Deleted since the listing (an expire): not a backup any more.
                Err(RepositoryError::Store(e)) if e.is_not_found() => {}
                Err(e) if e.is_bad_object() => {
                    damaged.push(DamagedManifest { name: obj.name.clone(), why: e.to_string() })
                }
                Err(e) => return Err(e),
            }
        }
        Ok((out.into_values().collect(), damaged))
    }
}

/// A backup manifest name whose object does not open, or opens to something that is not a
/// manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedManifest {
    /// The object's name.
    pub name: String,
    /// Why it cannot be used.
    pub why: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, LocalStore, Store};
    use std::sync::Arc;

    #[test]
    fn backup_kinds_read_and_write_the_words_of_existing_manifests() {
        for (kind, word) in [(BackupKind::Full, "full"), (BackupKind::Incremental, "incremental")] {
            assert_eq!(serde_json::to_value(kind).unwrap(), word);
            assert_eq!(serde_json::from_value::<BackupKind>(word.into()).unwrap(), kind);
        }
        // Listings pad it into a column.
        assert_eq!(format!("{:<11}|", BackupKind::Full), "full       |");
    }

    #[test]
    fn where_a_backup_was_taken_is_optional_and_written_in_words() {
        let mut m = serde_json::json!({
            "id": "20261206T000000Z", "kind": "full", "system_id": 7, "server_version_num": 150000,
            "timeline": 1, "start_lsn": 1, "stop_lsn": 2, "start_time_us": 0, "stop_time_us": 1,
            "block_size": 8192, "tablespaces": [], "entries": [], "files": [], "server_manifest": "{}",
            "logical_bytes": 0, "stored_bytes": 0
        });
        // A manifest written before the field existed.
        let old: BackupManifest = serde_json::from_value(m.clone()).unwrap();
        assert_eq!(old.taken_from, None);
        assert!(!serde_json::to_value(&old).unwrap().as_object().unwrap().contains_key("taken_from"));
        m["taken_from"] = serde_json::json!({"role": "standby", "host": "db2:5432"});
        let new: BackupManifest = serde_json::from_value(m).unwrap();
        let from = new.taken_from.clone().unwrap();
        assert_eq!(from, TakenFrom { role: ServerRole::Standby, host: "db2:5432".into() });
        assert_eq!(from.to_string(), "standby db2:5432");
        assert_eq!(serde_json::to_value(&new).unwrap()["taken_from"]["role"], "standby");
    }

    #[tokio::test]
    async fn a_planted_manifest_stops_the_strict_list_and_is_left_out_of_the_sound_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [1; 32]));
        let good = BackupManifest {
            id: "20261206T000000Z".into(),
            kind: BackupKind::Full,
            parent: None,
            system_id: 7,
            server_version_num: 150000,
            timeline: 1,
            start_lsn: 0x100_0000,
            stop_lsn: 0x200_0000,
            start_time_us: 0,
            stop_time_us: 1,
            block_size: 8192,
            page_size: 8192,
            tablespaces: Vec::new(),
            entries: Vec::new(),
            files: Vec::new(),
            server_manifest: "{}".into(),
            logical_bytes: 0,
            stored_bytes: 0,
            taken_from: None,
        };
        good.store(&repo).await.unwrap();
        let planted = names::pg::backup_manifest(7, "20261207T000000Z");
        store.put_if_absent(&planted, bytes::Bytes::from_static(b"not sealed by pitr")).await.unwrap();

        assert!(matches!(BackupManifest::list(&repo, 7).await, Err(RepositoryError::Seal(_))));
        let (sound, damaged) = BackupManifest::list_sound(&repo, 7).await.unwrap();
        assert_eq!(sound.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [good.id.as_str()]);
        assert_eq!(damaged.len(), 1);
        assert_eq!(damaged[0].name, planted);
        assert!(damaged[0].why.contains("not a pitr object"), "{}", damaged[0].why);
    }

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
    }
}
