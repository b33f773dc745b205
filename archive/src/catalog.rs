//! Catalog snapshots: which table each relfilenode was, so that `pitr find` can name the
//! relations the WAL (and the change index) knows only as `spc/db/relfilenode`.
//!
//! ```text
//! pg/<system id>/catalog/<timeline>.<lsn>     (hex, fixed width; names::pg::catalog_snapshot)
//! ```
//! The sidecar reads `pg_current_wal_lsn()` and then the catalogs of every database that allows
//! connections, and puts a snapshot only when what it holds differs from the newest one stored
//! ([`CatalogSnapshot::differs_from`]). The LSN is read *before* the catalog query, so every
//! relation a snapshot lists existed at its LSN or was created after it; a relation a snapshot
//! lacks was dropped before the query ran or created after it.
//!
//! Name resolution for a commit at LSN `C` ([`Snapshots::resolve`]): the newest snapshot with
//! `lsn <= C` that lists the relfilenode; failing that, the oldest with `lsn > C` (a table created
//! after the snapshot before `C`). A relfilenode is reused only after its relation is gone, so a
//! name found that way is right unless a relation was created and dropped between two snapshots
//! (then: unknown name).
//!
//! This module owns the object (format, names, putting, reading, resolution); taking a snapshot
//! from a server is the sidecar's (`cli/src/catalog_poll.rs`), and what a commit means is
//! `pitr_restore::find`'s. Snapshots are plain metadata (JSON, sealed like every object): a
//! planted, renamed or oversized one does not open, does not match its name or is not read, and
//! is reported as a problem, never taken.

use serde::{Deserialize, Serialize};

use crate::names;
use crate::repository::{Repository, RepositoryError};
use crate::seal::{ObjectKind, ObjectMeta};

/// The format version this pitr writes and reads.
pub const VERSION: u32 = 1;

/// The largest stored size of a snapshot pitr reads: ~100 bytes a relation, so a million
/// relations. One listed larger is not pitr's and is not downloaded.
pub const SNAPSHOT_MAX_BYTES: u64 = 128 << 20;

/// One relation with storage, as the catalog named it when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogRelation {
    /// The database's OID (`dbOid` of the WAL's RelFileLocator).
    pub db_oid: u32,
    /// The database's name.
    pub db_name: String,
    /// The tablespace's OID as the WAL names it (the database's default resolved, not 0).
    pub spc_oid: u32,
    /// `pg_relation_filenode(oid)`: the WAL's relNumber.
    pub relfilenode: u32,
    /// `pg_class.oid`: stays the same across TRUNCATE and rewrites, gone after DROP.
    pub oid: u32,
    /// The schema.
    pub schema: String,
    /// The relation's name.
    pub name: String,
    /// `relkind`: `r` table, `p` partitioned table, `m` materialized view, `t` TOAST table.
    pub relkind: String,
    /// `reltuples` (an estimate; -1 never vacuumed or analyzed since its storage was created).
    pub reltuples: f64,
    /// The newest (auto)vacuum or (auto)analyze of the relation the server's statistics know
    /// of, µs since the Unix epoch (server clock): an estimate set after a commit is not that
    /// commit's, so `find` cannot take it as evidence of a rewrite. Not counted as a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_us: Option<i64>,
    /// For a partition, its partitioned root table as `schema.name` (which has no storage of
    /// its own): `find --table ROOT` finds its partitions' commits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_of: Option<String>,
}

impl CatalogRelation {
    /// `schema.name`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Whether this is `schema.name`, or a partition of it.
    pub fn is_or_partition_of(&self, schema: &str, name: &str) -> bool {
        (self.schema == schema && self.name == name)
            || self.partition_of.as_deref().is_some_and(|p| p.split_once('.') == Some((schema, name)))
    }

    /// Whether `other` is the same relation under the same storage and name (the estimate
    /// aside).
    fn same_place(&self, other: &CatalogRelation) -> bool {
        (self.db_oid, self.spc_oid, self.relfilenode, self.oid)
            == (other.db_oid, other.spc_oid, other.relfilenode, other.oid)
            && (&self.db_name, &self.schema, &self.name, &self.relkind, &self.partition_of)
                == (&other.db_name, &other.schema, &other.name, &other.relkind, &other.partition_of)
    }
}

/// One catalog snapshot of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogSnapshot {
    /// [`VERSION`].
    pub version: u32,
    /// The timeline the server was on.
    pub timeline: u32,
    /// `pg_current_wal_lsn()` read before the catalog query.
    pub lsn: u64,
    /// When it was taken (the sidecar's clock), µs since the Unix epoch.
    pub time_us: i64,
    /// Databases that allow connections but could not be read (named so that `find` can say
    /// its names there may be missing).
    #[serde(default)]
    pub unread_databases: Vec<String>,
    /// Every relation with storage of the kinds above, sorted by (db, spc, relfilenode).
    pub relations: Vec<CatalogRelation>,
    /// Positions in `relations` sorted by (db, oid), for [`CatalogSnapshot::relation_by_oid`].
    #[serde(skip)]
    by_oid: Vec<usize>,
}

/// A snapshot that could not be taken into account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{object}: {why}")]
pub struct SnapshotProblem {
    /// The object (the prefix when listing failed).
    pub object: String,
    /// What is wrong.
    pub why: String,
}

impl CatalogSnapshot {
    /// A snapshot of `relations` (sorted here).
    pub fn new(timeline: u32, lsn: u64, time_us: i64, mut relations: Vec<CatalogRelation>) -> CatalogSnapshot {
        relations.sort_by_key(|r| (r.db_oid, r.spc_oid, r.relfilenode));
        let mut s = CatalogSnapshot {
            version: VERSION,
            timeline,
            lsn,
            time_us,
            unread_databases: Vec::new(),
            relations,
            by_oid: Vec::new(),
        };
        s.index();
        s
    }

    fn index(&mut self) {
        let mut by_oid: Vec<usize> = (0..self.relations.len()).collect();
        by_oid.sort_by_key(|&i| (self.relations[i].db_oid, self.relations[i].oid));
        self.by_oid = by_oid;
    }

    /// The relation with `pg_class.oid` `oid` in database `db_oid`, if listed (binary search;
    /// a linear one when `relations` was changed after this snapshot was made or read).
    pub fn relation_by_oid(&self, db_oid: u32, oid: u32) -> Option<&CatalogRelation> {
        if self.by_oid.len() != self.relations.len() {
            return self.relations.iter().find(|r| (r.db_oid, r.oid) == (db_oid, oid));
        }
        let i = self
            .by_oid
            .binary_search_by_key(&(db_oid, oid), |&i| (self.relations[i].db_oid, self.relations[i].oid))
            .ok()?;
        self.relations.get(self.by_oid[i]).filter(|r| (r.db_oid, r.oid) == (db_oid, oid))
    }

    /// The object name of this snapshot.
    pub fn object_name(&self, system_id: u64) -> String {
        names::pg::catalog_snapshot(system_id, self.timeline, self.lsn)
    }

    /// Whether this snapshot says something `previous` does not: another relation set, storage
    /// or name, other unread databases, or an estimate of rows that moved by more than half
    /// (row estimates change with every analyze; storing each would make a snapshot a minute).
    pub fn differs_from(&self, previous: &CatalogSnapshot) -> bool {
        if self.relations.len() != previous.relations.len() || self.unread_databases != previous.unread_databases {
            return true;
        }
        self.relations.iter().zip(&previous.relations).any(|(a, b)| {
            let moved = if a.reltuples <= 0.0 || b.reltuples <= 0.0 {
                (a.reltuples > 0.0) != (b.reltuples > 0.0)
            } else {
                let ratio = a.reltuples / b.reltuples;
                !(0.5..=2.0).contains(&ratio)
            };
            !a.same_place(b) || moved
        })
    }

    /// The relation stored at `(db, spc, relfilenode)`, if this snapshot lists it.
    pub fn relation(&self, db_oid: u32, spc_oid: u32, relfilenode: u32) -> Option<&CatalogRelation> {
        self.relations
            .binary_search_by_key(&(db_oid, spc_oid, relfilenode), |r| (r.db_oid, r.spc_oid, r.relfilenode))
            .ok()
            .map(|i| &self.relations[i])
    }

    fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a snapshot's plaintext; `None` for anything this pitr did not write.
    pub fn from_bytes(bytes: &[u8]) -> Option<CatalogSnapshot> {
        let mut s: CatalogSnapshot = serde_json::from_slice(bytes).ok()?;
        if s.version != VERSION {
            return None;
        }
        // Sorted for lookups even if a future writer does not sort.
        s.relations.sort_by_key(|r| (r.db_oid, r.spc_oid, r.relfilenode));
        s.index();
        Some(s)
    }
}

/// Puts `snapshot` unless `previous` (the newest stored) already says the same. `Ok(true)` when
/// it was put. A snapshot at the same place with other content (two sidecars racing, a clock of
/// LSNs that did not move) is left as it is: the first one stands.
pub async fn record(
    repo: &Repository,
    system_id: u64,
    snapshot: &CatalogSnapshot,
    previous: Option<&CatalogSnapshot>,
) -> Result<bool, RepositoryError> {
    if previous.is_some_and(|p| !snapshot.differs_from(p)) {
        return Ok(false);
    }
    let meta =
        ObjectMeta { timeline: snapshot.timeline, start_lsn: snapshot.lsn, ..ObjectMeta::plain(ObjectKind::Meta) };
    let (name, bytes) = (snapshot.object_name(system_id), snapshot.to_bytes());
    // Readers do not download one stored over the limit: one that could be is not written (the
    // sealed object is compressed, so the plaintext's size is a safe bound).
    if bytes.len() as u64 > SNAPSHOT_MAX_BYTES {
        return Err(RepositoryError::Invalid {
            name,
            what: format!(
                "a catalog snapshot of {} relations is {} bytes, more than readers accept ({SNAPSHOT_MAX_BYTES}): not stored",
                snapshot.relations.len(),
                bytes.len()
            ),
        });
    }
    match repo.put_sealed(&name, bytes, meta).await {
        Ok(_) => Ok(true),
        Err(RepositoryError::Conflict { name, .. }) => {
            tracing::info!(object = %name, "a catalog snapshot is already stored at this LSN; kept");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The snapshots no restore can need once WAL before `floor_lsn` is gone (`pitr expire`): all
/// but the newest at or before `floor_lsn`, which still names the relations of the oldest WAL
/// kept; the ones after it all stay. `names` are listed object names; others are ignored.
pub fn expired<'a>(system_id: u64, names: impl IntoIterator<Item = &'a str>, floor_lsn: u64) -> Vec<String> {
    let mut below: Vec<(u64, &str)> = names
        .into_iter()
        .filter_map(|n| names::pg::parse_catalog_snapshot(system_id, n).map(|(_, lsn)| (lsn, n)))
        .filter(|(lsn, _)| *lsn <= floor_lsn)
        .collect();
    below.sort_unstable();
    below.pop();
    below.into_iter().map(|(_, n)| n.to_string()).collect()
}

/// Deletes the snapshots [`expired`] names (for `pitr expire`, with the lowest LSN of the WAL it
/// keeps on any timeline). Returns what it deleted; one already gone is not an error. The one
/// kept is read first: an object planted under a snapshot's name just below the floor is left
/// in place, and the authentic snapshot below it is the one kept, so a planted object cannot
/// make expire delete the names of the oldest WAL kept. With none authentic, nothing goes.
pub async fn prune(repo: &Repository, system_id: u64, floor_lsn: u64) -> Result<Vec<String>, RepositoryError> {
    let listed = repo.list(&names::pg::catalog_prefix(system_id)).await?;
    let mut below: Vec<(u64, u32, String, u64)> = listed
        .into_iter()
        .filter_map(|o| names::pg::parse_catalog_snapshot(system_id, &o.name).map(|(t, lsn)| (lsn, t, o.name, o.size)))
        .filter(|(lsn, ..)| *lsn <= floor_lsn)
        .collect();
    below.sort_unstable();
    while let Some((lsn, timeline, name, size)) = below.pop() {
        if read_named(repo, &name, timeline, lsn, size).await?.is_some() {
            break;
        }
    }
    let gone: Vec<String> = below.into_iter().map(|(.., name, _)| name).collect();
    for name in &gone {
        match repo.delete(name).await {
            Ok(_) => {}
            Err(RepositoryError::Store(e)) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(gone)
}

/// The newest authentic snapshot stored, reading only it (the sidecar compares a new snapshot
/// with it at each start: years of DDL must not all be downloaded for that). A newest one that
/// does not open, or is oversized, is logged and passed over for the next below it, so a planted
/// object with a high LSN cannot make every snapshot look unchanged or new. `Err` only when
/// the listing fails.
pub async fn newest(repo: &Repository, system_id: u64) -> Result<Option<CatalogSnapshot>, RepositoryError> {
    let mut listed: Vec<(u64, u32, String, u64)> = repo
        .list(&names::pg::catalog_prefix(system_id))
        .await?
        .into_iter()
        .filter_map(|o| names::pg::parse_catalog_snapshot(system_id, &o.name).map(|(t, lsn)| (lsn, t, o.name, o.size)))
        .collect();
    listed.sort_unstable();
    while let Some((lsn, timeline, name, size)) = listed.pop() {
        if let Some(s) = read_named(repo, &name, timeline, lsn, size).await? {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// The snapshot stored as `name` (`size` bytes listed), if it is the authentic one its name
/// says; one that is not (oversized, does not open, other content) is logged and `None`, as is
/// one gone meanwhile. `Err` when the storage fails.
async fn read_named(
    repo: &Repository,
    name: &str,
    timeline: u32,
    lsn: u64,
    size: u64,
) -> Result<Option<CatalogSnapshot>, RepositoryError> {
    if size > SNAPSHOT_MAX_BYTES {
        tracing::warn!(object = %name, size, "catalog snapshot larger than any pitr writes: not read, passed over");
        return Ok(None);
    }
    match repo.get_record(name).await {
        Ok((_, bytes)) => match CatalogSnapshot::from_bytes(&bytes) {
            Some(s) if s.timeline == timeline && s.lsn == lsn => Ok(Some(s)),
            _ => {
                tracing::warn!(object = %name, "catalog snapshot is not the one its name says: passed over");
                Ok(None)
            }
        },
        Err(RepositoryError::Store(e)) if e.is_not_found() => Ok(None),
        Err(e @ RepositoryError::Seal(_)) => {
            tracing::warn!(object = %name, error = %e, "catalog snapshot does not open: passed over");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Every catalog snapshot read, in LSN order, and the ones that could not be.
#[derive(Debug, Clone, Default)]
pub struct Snapshots {
    /// Authentic snapshots, sorted by LSN (LSNs grow across timelines).
    pub snapshots: Vec<CatalogSnapshot>,
    /// Objects that are there but could not be taken into account, or a failed listing.
    pub problems: Vec<SnapshotProblem>,
}

/// Reads every snapshot of the cluster. Never fails: see [`Snapshots::problems`]. Names pitr
/// does not write are ignored (not read).
pub async fn load(repo: &Repository, system_id: u64) -> Snapshots {
    load_from(repo, system_id, 0).await
}

/// [`load`], downloading only the snapshots that can name relations of commits from
/// `from_lsn` on: the newest at or before it and every one after (a cluster with years of DDL
/// holds many; `find` reads a window).
pub async fn load_from(repo: &Repository, system_id: u64, from_lsn: u64) -> Snapshots {
    let prefix = names::pg::catalog_prefix(system_id);
    let listed = match repo.list(&prefix).await {
        Ok(l) => l,
        Err(e) => {
            return Snapshots {
                snapshots: Vec::new(),
                problems: vec![SnapshotProblem { object: prefix, why: format!("could not be listed: {e}") }],
            }
        }
    };
    let mut out = Snapshots::default();
    let newest_before = listed
        .iter()
        .filter_map(|o| names::pg::parse_catalog_snapshot(system_id, &o.name).map(|(_, lsn)| lsn))
        .filter(|lsn| *lsn <= from_lsn)
        .max();
    for object in listed {
        let Some((timeline, lsn)) = names::pg::parse_catalog_snapshot(system_id, &object.name) else {
            continue;
        };
        if lsn <= from_lsn && Some(lsn) != newest_before {
            continue;
        }
        let problem = |why: String| SnapshotProblem { object: object.name.clone(), why };
        if object.size > SNAPSHOT_MAX_BYTES {
            out.problems.push(problem(format!(
                "{} bytes stored, more than any snapshot pitr reads (at most {SNAPSHOT_MAX_BYTES}): not read",
                object.size
            )));
            continue;
        }
        match repo.get_record(&object.name).await {
            Ok((_, bytes)) => match CatalogSnapshot::from_bytes(&bytes) {
                Some(s) if s.timeline == timeline && s.lsn == lsn => out.snapshots.push(s),
                _ => out.problems.push(problem("opens, but is not the catalog snapshot its name says".into())),
            },
            Err(RepositoryError::Store(e)) if e.is_not_found() => {}
            Err(e @ RepositoryError::Seal(_)) => out.problems.push(problem(format!("does not open ({e})"))),
            Err(e) => out.problems.push(problem(format!("could not be read ({e})"))),
        }
    }
    out.snapshots.sort_by_key(|s| s.lsn);
    for p in &out.problems {
        tracing::warn!(object = %p.object, why = %p.why, "catalog snapshot left out");
    }
    out
}

impl Snapshots {
    /// The newest snapshot stored (the one a new snapshot is compared with).
    pub fn newest(&self) -> Option<&CatalogSnapshot> {
        self.snapshots.last()
    }

    /// The relation `(db, spc, relfilenode)` was at LSN `lsn`: the newest snapshot at or before
    /// `lsn` that lists it, else the oldest after `lsn` (created after the snapshot before).
    pub fn resolve(&self, lsn: u64, db_oid: u32, spc_oid: u32, relfilenode: u32) -> Option<&CatalogRelation> {
        let split = self.snapshots.partition_point(|s| s.lsn <= lsn);
        let (before, after) = self.snapshots.split_at(split);
        if let Some(r) = before.last().and_then(|s| s.relation(db_oid, spc_oid, relfilenode)) {
            return Some(r);
        }
        if let Some(r) = after.iter().find_map(|s| s.relation(db_oid, spc_oid, relfilenode)) {
            return Some(r);
        }
        // Listed by an older snapshot only: the relation was dropped later, and its name was
        // the one it had then (a relfilenode is not reused while its relation lives).
        before.iter().rev().find_map(|s| s.relation(db_oid, spc_oid, relfilenode))
    }

    /// The oldest snapshot taken after `lsn`, if any.
    pub fn first_after(&self, lsn: u64) -> Option<&CatalogSnapshot> {
        self.snapshots.iter().find(|s| s.lsn > lsn)
    }

    /// The range of LSNs the snapshots span, for messages.
    pub fn describe(&self) -> String {
        match (self.snapshots.first(), self.snapshots.last()) {
            (Some(a), Some(b)) => format!(
                "{} catalog snapshot(s), from {} to {}",
                self.snapshots.len(),
                pitr_pgformat::lsn::format_lsn(a.lsn),
                pitr_pgformat::lsn::format_lsn(b.lsn)
            ),
            _ => "no catalog snapshot".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRing, LocalStore, Store};
    use std::sync::Arc;

    fn rel(relfilenode: u32, oid: u32, name: &str, reltuples: f64) -> CatalogRelation {
        CatalogRelation {
            db_oid: 5,
            db_name: "postgres".into(),
            spc_oid: 1663,
            relfilenode,
            oid,
            schema: "public".into(),
            name: name.into(),
            relkind: "r".into(),
            reltuples,
            stats_us: None,
            partition_of: None,
        }
    }

    #[tokio::test]
    async fn snapshots_are_put_when_changed_and_resolve_names_around_ddl() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [5; 32]));
        let a =
            CatalogSnapshot::new(1, 0x100, 1, vec![rel(16400, 16400, "orders", 1000.0), rel(16410, 16410, "t", -1.0)]);
        assert!(record(&repo, 7, &a, None).await.unwrap());
        // Only the estimate moved a little: not stored again.
        let a2 =
            CatalogSnapshot::new(1, 0x180, 2, vec![rel(16400, 16400, "orders", 1200.0), rel(16410, 16410, "t", -1.0)]);
        assert!(!record(&repo, 7, &a2, Some(&a)).await.unwrap());
        // TRUNCATE orders (new relfilenode, same oid), DROP t, CREATE u.
        let b =
            CatalogSnapshot::new(1, 0x200, 3, vec![rel(16420, 16400, "orders", -1.0), rel(16430, 16430, "u", -1.0)]);
        assert!(record(&repo, 7, &b, Some(&a)).await.unwrap());
        // Planted bytes under a snapshot's name, and a name pitr does not write: one problem.
        store
            .put_if_absent(&names::pg::catalog_snapshot(7, 1, 0x300), bytes::Bytes::from_static(b"junk"))
            .await
            .unwrap();
        store.put_if_absent("pg/7/catalog/junk", bytes::Bytes::from_static(b"junk")).await.unwrap();
        let loaded = load(&repo, 7).await;
        assert_eq!(loaded.snapshots, vec![a.clone(), b.clone()]);
        assert_eq!(loaded.problems.len(), 1, "{:?}", loaded.problems);
        assert!(loaded.problems[0].why.contains("does not open"), "{:?}", loaded.problems);

        assert_eq!(loaded.resolve(0x150, 5, 1663, 16400).map(|r| r.name.as_str()), Some("orders"));
        // Dropped at 0x1F0: the snapshot before names it.
        assert_eq!(loaded.resolve(0x1F0, 5, 1663, 16410).map(|r| r.name.as_str()), Some("t"));
        // Created after the first snapshot: the one after names it.
        assert_eq!(loaded.resolve(0x150, 5, 1663, 16430).map(|r| r.name.as_str()), Some("u"));
        // After both, a relfilenode only the old one lists: its name then.
        assert_eq!(loaded.resolve(0x900, 5, 1663, 16410).map(|r| r.name.as_str()), Some("t"));
        assert!(loaded.resolve(0x150, 5, 1663, 99999).is_none());
        assert_eq!(loaded.first_after(0x150).map(|s| s.lsn), Some(0x200));
    }

    #[tokio::test]
    async fn newest_reads_only_the_highest_authentic_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [5; 32]));
        assert_eq!(newest(&repo, 7).await.unwrap(), None);
        for (i, lsn) in [0x100u64, 0x200].into_iter().enumerate() {
            let s = CatalogSnapshot::new(1, lsn, 1, vec![rel(16400 + i as u32, 16400, "orders", 1.0)]);
            assert!(record(&repo, 7, &s, None).await.unwrap());
        }
        assert_eq!(newest(&repo, 7).await.unwrap().map(|s| s.lsn), Some(0x200));
        // Planted above them: passed over, the authentic newest is returned.
        store
            .put_if_absent(&names::pg::catalog_snapshot(7, 1, u64::MAX >> 8), bytes::Bytes::from_static(b"junk"))
            .await
            .unwrap();
        assert_eq!(newest(&repo, 7).await.unwrap().map(|s| s.lsn), Some(0x200));
    }

    #[tokio::test]
    async fn expire_keeps_the_snapshot_naming_the_oldest_wal_kept_and_all_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [5; 32]));
        for (i, lsn) in [0x100u64, 0x200, 0x300, 0x400].into_iter().enumerate() {
            let s = CatalogSnapshot::new(1, lsn, 1, vec![rel(16400 + i as u32, 16400, "orders", 1.0)]);
            assert!(record(&repo, 7, &s, None).await.unwrap());
        }
        let name = |lsn| names::pg::catalog_snapshot(7, 1, lsn);
        assert_eq!(expired(7, [name(0x100).as_str(), "pg/7/catalog/junk"], 0x50), Vec::<String>::new());
        assert_eq!(prune(&repo, 7, 0x2FF).await.unwrap(), vec![name(0x100)]);
        let left: Vec<u64> = load(&repo, 7).await.snapshots.iter().map(|s| s.lsn).collect();
        assert_eq!(left, vec![0x200, 0x300, 0x400], "the one at or before the floor stays, and all after");
        assert_eq!(prune(&repo, 7, 0x2FF).await.unwrap(), Vec::<String>::new());
        let window: Vec<u64> = load_from(&repo, 7, 0x350).await.snapshots.iter().map(|s| s.lsn).collect();
        assert_eq!(window, vec![0x300, 0x400], "find reads the one before its window and those in it");
        // Planted just below the floor: left in place, and the authentic one under it is kept.
        let planted = names::pg::catalog_snapshot(7, 1, 0x3F0);
        store.put_if_absent(&planted, bytes::Bytes::from_static(b"junk")).await.unwrap();
        assert_eq!(prune(&repo, 7, 0x3FF).await.unwrap(), vec![name(0x200)]);
        let left: Vec<u64> = load(&repo, 7).await.snapshots.iter().map(|s| s.lsn).collect();
        assert_eq!(left, vec![0x300, 0x400]);
        assert!(store.get(&planted).await.is_ok(), "a planted object is left for inspection");
    }

    #[test]
    fn only_canonical_names_are_snapshots() {
        let name = names::pg::catalog_snapshot(7, 2, 0x1_0000_0128);
        assert_eq!(name, "pg/7/catalog/00000002.0000000100000128");
        assert_eq!(names::pg::parse_catalog_snapshot(7, &name), Some((2, 0x1_0000_0128)));
        for other in [
            "pg/7/catalog/00000002.000000010000012a",
            "pg/7/catalog/2.0000000100000128",
            "pg/7/catalog/00000002.0000000100000128.x",
            "pg/8/catalog/00000002.0000000100000128",
        ] {
            assert_eq!(names::pg::parse_catalog_snapshot(7, other), None, "{other}");
        }
    }
}
