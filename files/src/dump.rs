//! Logical dumps (`[[dumps]]` sets) in the repository: the byte stream `pg_dump` wrote, as blocks
//! of the shared store, and the manifest that lists them.
//!
//! ```text
//! files/dumps/<set>/<dump id>.manifest    sealed JSON: a DumpManifest (written last)
//! files/blocks/<hh>/<hash>                the dump's content, shared with file sets
//! ```
//! A dump without a manifest does not exist: its blocks are unreferenced and the next sweep
//! removes them.

use std::collections::BTreeMap;

use pitr_archive::names;
use pitr_archive::{ObjectKind, ObjectMeta, PutOutcome, Repository, RepositoryError};
use serde::{Deserialize, Serialize};

use crate::{BlockRef, FilesError};

/// What a logical dump is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpManifest {
    /// The dump set (`[[dumps]] name`).
    pub set: String,
    /// The dump id: its start in UTC, `YYYYMMDDTHHMMSSZ`.
    pub id: String,
    /// The database dumped (as the server named it).
    pub database: String,
    /// The server's `server_version_num`.
    pub server_version_num: u32,
    /// What `pg_dump --version` printed.
    pub pg_dump_version: String,
    /// `custom`: `pg_restore` reads it.
    pub format: String,
    /// µs since the Unix epoch: when `pg_dump` was started. Its snapshot is taken just after,
    /// so the dump shows the database as of (about) this moment.
    pub start_time_us: i64,
    /// µs since the Unix epoch: when the last block was durable.
    pub stop_time_us: i64,
    /// The dump's bytes are these blocks' plaintexts, concatenated.
    pub blocks: Vec<BlockRef>,
    /// Bytes of the dump.
    pub len: u64,
    /// SHA-256 of the dump, lower-case hex.
    pub sha256: String,
    /// Bytes this dump added to the repository (new blocks and the manifest, sealed).
    pub stored_bytes: u64,
}

impl DumpManifest {
    /// Seals and puts the manifest (create-only). Call it last, once every block is durable.
    pub async fn store(&self, repo: &Repository) -> Result<PutOutcome, FilesError> {
        let name = names::files::dump_manifest(&self.set, &self.id);
        let json = serde_json::to_vec(self)
            .map_err(|e| RepositoryError::Invalid { name: name.clone(), what: format!("serialising: {e}") })?;
        Ok(repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await?)
    }

    /// Opens and parses the manifest of dump `id` of `set`; one whose fields disagree with its
    /// name is [`RepositoryError::Invalid`] (a bad object).
    pub async fn load(repo: &Repository, set: &str, id: &str) -> Result<DumpManifest, FilesError> {
        let name = names::files::dump_manifest(set, id);
        let (_, json) = repo.get_opened(&name).await?;
        let m: DumpManifest = serde_json::from_slice(&json)
            .map_err(|e| RepositoryError::Invalid { name: name.clone(), what: format!("dump manifest: {e}") })?;
        if m.set != set || m.id != id {
            let what = format!("it says it is dump {} of set {}", m.id, m.set);
            return Err(RepositoryError::Invalid { name, what }.into());
        }
        Ok(m)
    }

    /// Every dump of `set` (or of every set, with `None`), oldest first. Strict: a manifest that
    /// cannot be read is an error, for expire's block sweep, which must know every reference.
    pub async fn list(repo: &Repository, set: Option<&str>) -> Result<Vec<DumpManifest>, FilesError> {
        let (sound, damaged) = Self::scan(repo, set).await?;
        match damaged.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(sound),
        }
    }

    /// Every dump of `set` (or of every set) that opens, oldest first, and the manifest names
    /// that do not, with why: for listings and restores, which a planted or damaged manifest
    /// must not stop. Storage errors stay errors.
    pub async fn list_sound(
        repo: &Repository,
        set: Option<&str>,
    ) -> Result<(Vec<DumpManifest>, Vec<(String, String)>), FilesError> {
        let (sound, damaged) = Self::scan(repo, set).await?;
        Ok((sound, damaged.into_iter().map(|(name, e)| (name, e.to_string())).collect()))
    }

    async fn scan(
        repo: &Repository,
        set: Option<&str>,
    ) -> Result<(Vec<DumpManifest>, Vec<(String, FilesError)>), FilesError> {
        let prefix = set.map_or_else(|| names::files::DUMPS.to_string(), names::files::dumps_prefix);
        let mut out = BTreeMap::new();
        let mut damaged = Vec::new();
        for obj in repo.list(&prefix).await? {
            let Some((set, id)) = names::files::parse_dump_manifest(&obj.name) else { continue };
            match Self::load(repo, set, id).await {
                Ok(m) => {
                    out.insert((m.start_time_us, m.set.clone(), m.id.clone()), m);
                }
                // Removed since the listing (an expire): not a dump any more.
                Err(FilesError::Repository(RepositoryError::Store(e))) if e.is_not_found() => {}
                Err(FilesError::Repository(e)) if e.is_bad_object() => damaged.push((obj.name.clone(), e.into())),
                Err(e) => return Err(e),
            }
        }
        Ok((out.into_values().collect(), damaged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::{KeyRing, LocalStore, Store};
    use std::sync::Arc;

    fn dump(set: &str, id: &str, start: i64) -> DumpManifest {
        DumpManifest {
            set: set.into(),
            id: id.into(),
            database: "dev".into(),
            server_version_num: 150000,
            pg_dump_version: "pg_dump (PostgreSQL) 15.14".into(),
            format: "custom".into(),
            start_time_us: start,
            stop_time_us: start + 1,
            blocks: vec![BlockRef { id: "ab".repeat(32), len: 3 }],
            len: 3,
            sha256: String::new(),
            stored_bytes: 0,
        }
    }

    #[tokio::test]
    async fn dumps_list_in_time_order_and_a_planted_or_misnamed_manifest_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [1; 32]));
        dump("dev", "20261206T010000Z", 2).store(&repo).await.unwrap();
        dump("dev", "20261205T010000Z", 1).store(&repo).await.unwrap();
        dump("other", "20261205T010000Z", 3).store(&repo).await.unwrap();
        let all = DumpManifest::list(&repo, None).await.unwrap();
        assert_eq!(all.iter().map(|d| d.start_time_us).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(DumpManifest::list(&repo, Some("dev")).await.unwrap().len(), 2);

        // Not sealed by pitr, and a sealed manifest stored under another dump's name.
        store
            .put_if_absent(&names::files::dump_manifest("dev", "20261207T010000Z"), bytes::Bytes::from_static(b"junk"))
            .await
            .unwrap();
        let moved = dump("dev", "20261206T010000Z", 9);
        let json = serde_json::to_vec(&moved).unwrap();
        let name = names::files::dump_manifest("dev", "20261208T010000Z");
        repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();

        assert!(DumpManifest::list(&repo, Some("dev")).await.is_err());
        let (sound, damaged) = DumpManifest::list_sound(&repo, Some("dev")).await.unwrap();
        assert_eq!(sound.len(), 2);
        assert_eq!(damaged.len(), 2, "{damaged:?}");
    }
}
