//! Restore into a running server: the newest snapshot whose window holds the target, then the
//! archived oplog from the snapshot's `ts_before` up to and including the target, each entry
//! translated into ordinary writes ([`crate::apply`]), then the snapshot's indexes
//! ([`PendingIndexes`]). A transaction's writes are applied together or, beyond the target, not
//! at all. Documents are written with `bypassDocumentValidation`: a validator added after a
//! document was written does not reject that document on the way back.

use std::time::{Duration, Instant};

use bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::options::InsertManyOptions;
use pitr_archive::time::{format_rfc3339_micros as format_us, parse_time};
use pitr_archive::Repository;

use crate::apply::{is_system_db, Entry, Grouper, Ns, Write};
use crate::layout::{slice_entries, split_entries, CollectionDump, CollectionKind, MongoCatalog, SnapshotManifest};
use crate::{code_of, connect, Connected, MongoError, Ts};

/// Where a MongoDB restore stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MongoTarget {
    /// The newest archived entry: the end of the newest run (some snapshot must replay along it).
    Latest,
    /// Every entry up to and including this oplog `ts`.
    Ts(Ts),
    /// µs since the Unix epoch: every entry whose wall time is at or before it.
    Time(i64),
}

impl MongoTarget {
    /// `latest`, `ts:SECONDS:INC`, or a time as PostgreSQL targets take it (RFC 3339, or
    /// `YYYY-MM-DD HH:MM:SS[.ffffff][+TZ]`).
    pub fn parse(s: &str) -> Result<MongoTarget, String> {
        if s.trim().eq_ignore_ascii_case("latest") {
            return Ok(MongoTarget::Latest);
        }
        if s.trim().starts_with("ts:") {
            return Ts::parse_arg(s)
                .map(MongoTarget::Ts)
                .ok_or_else(|| format!("{s:?}: an oplog timestamp is ts:SECONDS:INC, e.g. ts:1796162730:16"));
        }
        if let Some(us) = parse_time(s.trim()) {
            return Ok(MongoTarget::Time(us));
        }
        if ["lsn:", "xid:"].iter().any(|p| s.trim().starts_with(p)) {
            return Err(format!("{s:?}: for MongoDB, use TIME, ts:SECONDS:INC or latest"));
        }
        // Worded as PostgreSQL targets' error, as it was when both shared one parser.
        Err(format!(
            "invalid recovery target {s:?}: not a time pitr understands (use a time like 2026-11-25T14:03:00Z or \
             \"2026-11-25 14:03:00+02\", lsn:X/Y, xid:N or latest)"
        ))
    }
}

impl std::fmt::Display for MongoTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MongoTarget::Latest => f.write_str("latest"),
            MongoTarget::Ts(t) => write!(f, "{t}"),
            MongoTarget::Time(us) => f.write_str(&format_us(*us)),
        }
    }
}

/// What [`restore`] restores to, and where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Where the replay stops.
    pub target: MongoTarget,
    /// The server written to (any MongoDB-compatible server; it need not be a replica set).
    pub target_uri: String,
    /// Drop the target's non-system databases first; without it a target holding user data is
    /// refused ([`MongoError::TargetNotEmpty`]).
    pub drop: bool,
    /// How long connecting to the target may take.
    pub connect_timeout: Duration,
    /// The backed-up server (`[mongo] uri`): with `drop`, a target that is this server or a
    /// member of its replica set ([`crate::ServerIdentity`]) is refused.
    pub source_uri: Option<String>,
}

/// The same shape as the PostgreSQL restore report: what was used, how far it got, what was lost,
/// how long it took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MongoRestoreReport {
    /// The target as asked for ([`MongoTarget`]'s display form).
    pub target: String,
    /// The server restored into, password redacted.
    pub target_uri: String,
    /// The layout name the objects were read from.
    pub name: String,
    /// The snapshot loaded.
    pub snapshot_id: String,
    /// The snapshot's `ts_before`: replay starts after it.
    pub snapshot_ts_before: String,
    /// The snapshot's `ts_after`: its consistent point.
    pub snapshot_ts_after: String,
    /// Wall time of `ts_after` (RFC 3339, µs).
    pub snapshot_consistent_time: String,
    /// Collections and views in the snapshot.
    pub collections: usize,
    /// Documents in the snapshot.
    pub documents: u64,
    /// Plaintext bytes of the snapshot blocks loaded.
    pub bytes_restored: u64,
    /// The snapshot's indexes built after the replay (`_id_` not counted: the server builds it;
    /// nor those the oplog created, which the replay built).
    pub indexes_built: usize,
    /// Collections the snapshot lists but restore cannot load (`db.name (type)`): only in
    /// snapshots taken before pitr refused such collections at snapshot time.
    pub not_restored: Vec<String>,
    /// Oplog entries replayed over the snapshot.
    pub entries_applied: u64,
    /// Of those, transactions replayed (each counted once).
    pub transactions_applied: u64,
    /// The newest `ts` in the archive.
    pub newest_archived_ts: Option<String>,
    /// Wall time of that entry (RFC 3339, µs), where its slice recorded one.
    pub newest_archived_time: Option<String>,
    /// The `ts` of the last group replayed; `None` when nothing was replayed.
    pub last_applied_ts: Option<String>,
    /// Its wall time (RFC 3339, µs).
    pub last_applied_time: Option<String>,
    /// Target (for `latest`, the newest archived entry) minus the last applied entry.
    pub data_loss_window_seconds: f64,
    /// Loading the snapshot: dropping, documents, views, and building its indexes after the
    /// replay.
    pub load_seconds: f64,
    /// Replaying the oplog (a time target's scan for its `ts` included).
    pub replay_seconds: f64,
    /// The whole restore, connecting included.
    pub total_seconds: f64,
}

fn describe_windows(c: &MongoCatalog) -> String {
    let w = c.windows();
    if w.is_empty() {
        return if c.snapshots.is_empty() {
            "no snapshot yet: run `pitr backup --source mongo`".into()
        } else {
            "no snapshot has its oplog archived".into()
        };
    }
    w.iter()
        .map(|w| {
            format!(
                "{} ({}) to {} ({})",
                format_us(w.from_us),
                w.from_ts,
                w.to_us.map(format_us).unwrap_or_else(|| "?".into()),
                w.to_ts
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The snapshot to start from and the run its oplog is in.
pub(crate) fn choose(c: &MongoCatalog, target: MongoTarget) -> Result<(&SnapshotManifest, usize), MongoError> {
    let outside = || MongoError::OutsideWindow { target: target.to_string(), windows: describe_windows(c) };
    let mut best = None;
    for s in &c.snapshots {
        let Some(run) = c.run_of(s) else { continue };
        let end_us = c.run_known_until_us(run);
        let fits = match target {
            MongoTarget::Latest => run + 1 == c.runs.len(),
            MongoTarget::Ts(t) => s.ts_after <= t && t <= c.runs[run].last,
            MongoTarget::Time(us) => s.time_after_us <= us && end_us.is_none_or(|e| us <= e),
        };
        if fits {
            best = Some((s, run));
        }
    }
    best.ok_or_else(outside)
}

/// Non-system namespaces on the target.
async fn existing(conn: &Connected) -> Result<Vec<String>, MongoError> {
    let mut out = Vec::new();
    for db in conn.client.list_database_names().await.map_err(conn.server_err("listing databases"))? {
        if is_system_db(&db) {
            continue;
        }
        for c in
            conn.client.database(&db).list_collection_names().await.map_err(conn.server_err(format!("listing {db}")))?
        {
            if !c.starts_with("system.") {
                out.push(format!("{db}.{c}"));
            }
        }
    }
    Ok(out)
}

/// Fails when the target is the backed-up server (or its replica set), told by identity, not by
/// the host names in the URIs. A source that cannot be reached cannot be the target that was
/// just reached by this process, unless the network splits the two; that is warned about.
async fn refuse_the_source(target: &Connected, opts: &RestoreOptions) -> Result<(), MongoError> {
    let Some(source_uri) = &opts.source_uri else { return Ok(()) };
    let target_id = target.identity().await?;
    let source_id = async { connect(source_uri, opts.connect_timeout).await?.identity().await };
    match source_id.await {
        Ok(source_id) => match target_id.same_as(&source_id) {
            Some(why) => Err(MongoError::TargetIsSource { uri: target.uri.clone(), why }),
            None => Ok(()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "could not read the backed-up server's identity; the --drop target was not compared with it");
            Ok(())
        }
    }
}

pub(crate) fn tolerate(r: Result<Document, mongodb::error::Error>, codes: &[i32]) -> Result<(), mongodb::error::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if code_of(&e).is_some_and(|c| codes.contains(&c)) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) const NAMESPACE_NOT_FOUND: i32 = 26;
const INDEX_NOT_FOUND: i32 = 27;
pub(crate) const NAMESPACE_EXISTS: i32 = 48;

/// Fields servers report in index specs (listIndexes, createIndexes oplog entries) that
/// `createIndexes` refuses: `ns` (old mongod) and SecantusDB's `entryFormat`.
const INDEX_REPORT_ONLY_FIELDS: [&str; 2] = ["ns", "entryFormat"];

fn index_specs(indexes: &[Document]) -> Vec<Document> {
    indexes
        .iter()
        .filter(|i| i.get_str("name") != Ok("_id_"))
        .map(|i| {
            let mut i = i.clone();
            for f in INDEX_REPORT_ONLY_FIELDS {
                i.remove(f);
            }
            i
        })
        .collect()
}

pub(crate) async fn apply_write(conn: &Connected, w: &Write) -> Result<(), MongoError> {
    let c = &conn.client;
    let what = || format!("applying {w:?}");
    let res: Result<(), mongodb::error::Error> = match w {
        Write::Upsert { ns, filter, doc } => c
            .database(&ns.db)
            .collection::<Document>(&ns.coll)
            .replace_one(filter.clone(), doc.clone())
            .upsert(true)
            .bypass_document_validation(true)
            .await
            .map(|_| ()),
        Write::Update { ns, filter, update } => c
            .database(&ns.db)
            .collection::<Document>(&ns.coll)
            .update_one(filter.clone(), update.clone())
            .bypass_document_validation(true)
            .await
            .map(|_| ()),
        Write::Delete { ns, filter } => {
            c.database(&ns.db).collection::<Document>(&ns.coll).delete_one(filter.clone()).await.map(|_| ())
        }
        Write::Create { ns, options } => {
            let mut cmd = doc! { "create": &ns.coll };
            cmd.extend(options.clone());
            tolerate(c.database(&ns.db).run_command(cmd).await, &[NAMESPACE_EXISTS])
        }
        Write::Drop { ns } => {
            tolerate(c.database(&ns.db).run_command(doc! { "drop": &ns.coll }).await, &[NAMESPACE_NOT_FOUND])
        }
        Write::Rename { from, to, drop_target } => tolerate(
            c.database("admin")
                .run_command(
                    doc! { "renameCollection": from.to_string(), "to": to.to_string(), "dropTarget": *drop_target },
                )
                .await,
            &[NAMESPACE_NOT_FOUND],
        ),
        Write::CreateIndexes { ns, indexes } => {
            let specs = index_specs(indexes);
            if specs.is_empty() {
                Ok(())
            } else {
                c.database(&ns.db).run_command(doc! { "createIndexes": &ns.coll, "indexes": specs }).await.map(|_| ())
            }
        }
        Write::DropIndexes { ns, index } => tolerate(
            c.database(&ns.db).run_command(doc! { "dropIndexes": &ns.coll, "index": index.clone() }).await,
            &[NAMESPACE_NOT_FOUND, INDEX_NOT_FOUND],
        ),
        Write::DropDatabase { db } => c.database(db).drop().await,
        Write::CollMod { ns, command } => c.database(&ns.db).run_command(command.clone()).await.map(|_| ()),
    };
    res.map_err(|e| MongoError::Server { uri: conn.uri.clone(), what: what(), source: Box::new(e) })
}

/// The snapshot's index specs, built after the oplog replay instead of before it. The snapshot's
/// documents were read while the collections changed, so until the replay has brought them to
/// one moment they may break a unique index (two documents read at different moments holding the
/// same key). What the replay does to a collection meanwhile is followed: a drop or its
/// database's drop forgets its pending indexes, a rename carries them along (and forgets those of
/// a collection it replaces), `dropIndexes` removes them, `createIndexes` of the same name
/// supersedes them, and a `collMod` that changes an index needs them built first.
#[derive(Debug, Default)]
pub(crate) struct PendingIndexes {
    /// In snapshot order, so that builds happen in a stable order.
    by_ns: Vec<(Ns, Vec<Document>)>,
}

impl PendingIndexes {
    /// The snapshot's `indexes` of the collection loaded as `ns` (`_id_` and the fields
    /// `createIndexes` refuses left out).
    pub(crate) fn add(&mut self, ns: Ns, indexes: &[Document]) {
        let specs = index_specs(indexes);
        if !specs.is_empty() {
            self.by_ns.push((ns, specs));
        }
    }

    /// Takes the pending indexes of `ns`.
    pub(crate) fn take(&mut self, ns: &Ns) -> Option<Vec<Document>> {
        let i = self.by_ns.iter().position(|(n, _)| n == ns)?;
        Some(self.by_ns.remove(i).1)
    }

    /// Follows `w`, about to be applied; returns indexes that must be built before it.
    pub(crate) fn before(&mut self, w: &Write) -> Option<(Ns, Vec<Document>)> {
        match w {
            Write::Drop { ns } => {
                self.take(ns);
            }
            Write::DropDatabase { db } => self.by_ns.retain(|(n, _)| n.db != *db),
            Write::Rename { from, to, .. } => {
                self.take(to);
                if let Some(specs) = self.take(from) {
                    self.by_ns.push((to.clone(), specs));
                }
            }
            Write::CreateIndexes { ns, indexes } => {
                let names: Vec<&str> = indexes.iter().filter_map(|i| i.get_str("name").ok()).collect();
                self.remove_where(ns, |spec| spec.get_str("name").is_ok_and(|n| names.contains(&n)));
            }
            Write::DropIndexes { ns, index } => match index {
                Bson::String(name) if name == "*" => {
                    self.take(ns);
                }
                Bson::String(name) => self.remove_where(ns, |spec| spec.get_str("name") == Ok(name.as_str())),
                Bson::Document(key) => self.remove_where(ns, |spec| spec.get_document("key") == Ok(key)),
                Bson::Array(names) => self.remove_where(ns, |spec| {
                    spec.get_str("name").is_ok_and(|n| names.iter().any(|x| x.as_str() == Some(n)))
                }),
                _ => {}
            },
            Write::CollMod { ns, command } if command.contains_key("index") => {
                return self.take(ns).map(|specs| (ns.clone(), specs));
            }
            Write::CollMod { .. } | Write::Create { .. } | Write::Upsert { .. } | Write::Update { .. } => {}
            Write::Delete { .. } => {}
        }
        None
    }

    fn remove_where(&mut self, ns: &Ns, gone: impl Fn(&Document) -> bool) {
        if let Some((_, specs)) = self.by_ns.iter_mut().find(|(n, _)| n == ns) {
            specs.retain(|s| !gone(s));
        }
        self.by_ns.retain(|(_, specs)| !specs.is_empty());
    }

    /// Everything still pending, in snapshot order.
    pub(crate) fn drain(&mut self) -> Vec<(Ns, Vec<Document>)> {
        std::mem::take(&mut self.by_ns)
    }
}

/// Builds `specs` (already [`index_specs`]) on `into`.
pub(crate) async fn build_indexes(conn: &Connected, into: &Ns, specs: Vec<Document>) -> Result<(), MongoError> {
    conn.client
        .database(&into.db)
        .run_command(doc! { "createIndexes": &into.coll, "indexes": specs })
        .await
        .map_err(conn.server_err(format!("building indexes of {into}")))
        .map(|_| ())
}

/// Loads the documents of the snapshot's collection `c` into the existing collection `into`
/// (its indexes are the caller's, after the replay: [`PendingIndexes`]); returns the plaintext
/// bytes of the blocks read.
pub(crate) async fn load_collection(
    repo: &Repository,
    catalog: &MongoCatalog,
    conn: &Connected,
    c: &CollectionDump,
    into: &Ns,
) -> Result<u64, MongoError> {
    let db = conn.client.database(&into.db);
    let coll = db.collection::<RawDocumentBuf>(&into.coll);
    let mut bytes_restored = 0u64;
    for id in &c.blocks {
        let object = catalog.layout.block_name(id);
        let (_, bytes) = repo.get_opened(&object).await?;
        bytes_restored += bytes.len() as u64;
        let docs: Vec<RawDocumentBuf> =
            split_entries(&object, &bytes)?.into_iter().map(|d| d.to_raw_document_buf()).collect();
        if docs.is_empty() {
            continue;
        }
        coll.insert_many(docs)
            .with_options(InsertManyOptions::builder().ordered(true).bypass_document_validation(true).build())
            .await
            .map_err(conn.server_err(format!("loading {into}")))?;
    }
    Ok(bytes_restored)
}

/// Restores `opts.target` into the server at `opts.target_uri`: picks the newest snapshot whose
/// window holds the target, loads it (documents, then views), replays the archived oplog after
/// its `ts_before` up to the target, builds the snapshot's indexes, and reports what was achieved.
pub async fn restore(
    repo: &Repository,
    catalog: &MongoCatalog,
    opts: &RestoreOptions,
) -> Result<MongoRestoreReport, MongoError> {
    let started = Instant::now();
    let (snapshot, run) = choose(catalog, opts.target)?;
    let conn = connect(&opts.target_uri, opts.connect_timeout).await?;
    if opts.drop {
        refuse_the_source(&conn, opts).await?;
    }
    let present = existing(&conn).await?;
    if !present.is_empty() {
        if !opts.drop {
            let mut shown: Vec<_> = present.iter().take(5).cloned().collect();
            if present.len() > 5 {
                shown.push(format!("and {} more", present.len() - 5));
            }
            return Err(MongoError::TargetNotEmpty { uri: conn.uri.clone(), namespaces: shown.join(", ") });
        }
        let mut dbs: Vec<&str> = present.iter().filter_map(|n| n.split('.').next()).collect();
        dbs.dedup();
        for db in dbs {
            conn.client.database(db).drop().await.map_err(conn.server_err(format!("dropping database {db}")))?;
        }
    }

    // Documents first, indexes after the replay: building an index once is faster than
    // maintaining it, and only after the replay do the documents belong to one moment.
    let mut bytes_restored = 0u64;
    let mut indexes_built = 0usize;
    let mut pending = PendingIndexes::default();
    for c in snapshot.collections.iter().filter(|c| c.kind == CollectionKind::Collection) {
        let db = conn.client.database(&c.db);
        let mut create = doc! { "create": &c.name };
        create.extend(c.options.clone());
        db.run_command(create).await.map_err(conn.server_err(format!("creating {}.{}", c.db, c.name)))?;
        let into = Ns { db: c.db.clone(), coll: c.name.clone() };
        bytes_restored += load_collection(repo, catalog, &conn, c, &into).await?;
        pending.add(into, &c.indexes);
    }
    // Views after the collections they read.
    for c in snapshot.collections.iter().filter(|c| c.kind == CollectionKind::View) {
        let mut create = doc! { "create": &c.name };
        create.extend(c.options.clone());
        conn.client
            .database(&c.db)
            .run_command(create)
            .await
            .map_err(conn.server_err(format!("creating view {}.{}", c.db, c.name)))?;
    }
    let not_restored: Vec<String> = snapshot
        .collections
        .iter()
        .filter_map(|c| match &c.kind {
            CollectionKind::Other(t) => Some(format!("{}.{} ({t})", c.db, c.name)),
            _ => None,
        })
        .collect();
    if !not_restored.is_empty() {
        tracing::warn!(snapshot = %snapshot.id, collections = %not_restored.join(", "),
            "the snapshot lists collections restore cannot load; they are NOT restored");
    }
    let mut load_seconds = started.elapsed().as_secs_f64();

    let replay_started = Instant::now();
    let mut grouper = Grouper::new();
    let (mut entries_applied, mut transactions_applied) = (0u64, 0u64);
    let mut last: Option<(Ts, i64)> = None;
    let slices: Vec<&String> = catalog.runs[run]
        .slices
        .iter()
        .filter(|name| catalog.layout.parse_slice_name(name).is_some_and(|(_, end)| end > snapshot.ts_before))
        .collect();
    // A time target becomes the newest ts whose wall time is at or before it: wall times need
    // not rise in ts order, and replay must stay a prefix of the oplog.
    let ts_limit = match opts.target {
        MongoTarget::Latest => None,
        MongoTarget::Ts(t) => Some(t),
        MongoTarget::Time(us) => {
            let mut newest = snapshot.ts_before;
            for name in &slices {
                for e in slice_entries(repo, name).await? {
                    if e.time_us() <= us && e.ts > newest {
                        newest = e.ts;
                    }
                }
            }
            Some(newest)
        }
    };
    let within = |e: &Entry| ts_limit.is_none_or(|t| e.ts <= t);
    'slices: for name in slices {
        for e in slice_entries(repo, name).await? {
            if e.ts <= snapshot.ts_before {
                continue;
            }
            if !within(&e) {
                break 'slices;
            }
            for g in grouper.push(&e)? {
                for w in &g.writes {
                    if let Some((ns, specs)) = pending.before(w) {
                        indexes_built += specs.len();
                        build_indexes(&conn, &ns, specs).await?;
                    }
                    apply_write(&conn, w).await?;
                }
                entries_applied += g.entries as u64;
                transactions_applied += u64::from(g.transaction);
                last = Some((g.ts, g.time_us));
            }
        }
    }
    let (open, _unfinished) = grouper.finish();
    if let Some(g) = open {
        for w in &g.writes {
            if let Some((ns, specs)) = pending.before(w) {
                indexes_built += specs.len();
                build_indexes(&conn, &ns, specs).await?;
            }
            apply_write(&conn, w).await?;
        }
        entries_applied += g.entries as u64;
        transactions_applied += u64::from(g.transaction);
        last = Some((g.ts, g.time_us));
    }
    let replay_seconds = replay_started.elapsed().as_secs_f64();
    let indexes_started = Instant::now();
    for (ns, specs) in pending.drain() {
        indexes_built += specs.len();
        build_indexes(&conn, &ns, specs).await?;
    }
    load_seconds += indexes_started.elapsed().as_secs_f64();

    let newest = catalog.last_archived();
    let consistent_us = snapshot.time_after_us;
    let last_us = last.map(|(_, us)| us).unwrap_or(consistent_us).max(consistent_us);
    let target_us = match opts.target {
        MongoTarget::Latest => catalog.run_end_us[run].unwrap_or(last_us),
        // Past the newest entry but inside the completeness mark, the state at the target is the
        // state after the newest entry: nothing was lost.
        MongoTarget::Time(us) => match catalog.run_end_us[run] {
            Some(newest) if us > newest && catalog.run_known_until_us(run).is_some_and(|k| us <= k) => newest,
            _ => us,
        },
        MongoTarget::Ts(t) if last.is_some_and(|(ts, _)| ts == t) => last_us,
        MongoTarget::Ts(t) => t.secs_us().max(last_us),
    };
    Ok(MongoRestoreReport {
        target: opts.target.to_string(),
        target_uri: conn.uri.clone(),
        name: catalog.layout.name.clone(),
        snapshot_id: snapshot.id.clone(),
        snapshot_ts_before: snapshot.ts_before.to_string(),
        snapshot_ts_after: snapshot.ts_after.to_string(),
        snapshot_consistent_time: format_us(consistent_us),
        collections: snapshot.collections.len(),
        documents: snapshot.documents,
        bytes_restored,
        indexes_built,
        not_restored,
        entries_applied,
        transactions_applied,
        newest_archived_ts: newest.map(|(t, _)| t.to_string()),
        newest_archived_time: newest.and_then(|(_, us)| us).map(format_us),
        last_applied_ts: last.map(|(t, _)| t.to_string()),
        last_applied_time: last.map(|(_, us)| format_us(us)),
        data_loss_window_seconds: ((target_us - last_us).max(0)) as f64 / 1e6,
        load_seconds,
        replay_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(c: &str) -> Ns {
        Ns { db: "shop".into(), coll: c.into() }
    }

    fn spec(name: &str, field: &str) -> Document {
        doc! { "v": 2, "key": { field: 1 }, "name": name, "ns": "shop.x" }
    }

    fn names(p: &mut PendingIndexes) -> Vec<(String, Vec<String>)> {
        p.drain()
            .into_iter()
            .map(|(n, specs)| (n.to_string(), specs.iter().map(|s| s.get_str("name").unwrap().to_string()).collect()))
            .collect()
    }

    #[test]
    fn snapshot_indexes_wait_for_the_replay_and_follow_what_it_does() {
        let loaded = || {
            let mut p = PendingIndexes::default();
            let id = doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" };
            p.add(ns("items"), &[id.clone(), spec("a_1", "a"), spec("b_1", "b"), spec("c_1", "c")]);
            p.add(ns("orders"), &[id.clone(), spec("o_1", "o")]);
            p.add(ns("empty"), &[id]);
            p
        };
        // Untouched: everything but `_id_`, without the fields createIndexes refuses.
        let mut p = loaded();
        let all = p.drain();
        assert_eq!(all.len(), 2);
        assert!(all[0].1.iter().all(|s| !s.contains_key("ns")));
        // Writes to documents change nothing.
        let mut p = loaded();
        let upsert = Write::Upsert { ns: ns("items"), filter: doc! { "_id": 1 }, doc: doc! { "_id": 1 } };
        assert_eq!(p.before(&upsert), None);
        assert_eq!(
            names(&mut p),
            vec![
                ("shop.items".into(), vec!["a_1".into(), "b_1".into(), "c_1".into()]),
                ("shop.orders".into(), vec!["o_1".into()])
            ]
        );
        // dropIndexes by name, by key, by list; createIndexes of the same name supersedes.
        let mut p = loaded();
        p.before(&Write::DropIndexes { ns: ns("items"), index: Bson::String("a_1".into()) });
        p.before(&Write::DropIndexes { ns: ns("items"), index: Bson::Document(doc! { "b": 1 }) });
        p.before(&Write::CreateIndexes { ns: ns("items"), indexes: vec![spec("c_1", "c")] });
        p.before(&Write::DropIndexes { ns: ns("orders"), index: Bson::Array(vec![Bson::String("o_1".into())]) });
        assert_eq!(names(&mut p), vec![]);
        let mut p = loaded();
        p.before(&Write::DropIndexes { ns: ns("items"), index: Bson::String("*".into()) });
        assert_eq!(names(&mut p), vec![("shop.orders".into(), vec!["o_1".into()])]);
        // Drops forget; a rename carries them along and forgets those of what it replaces.
        let mut p = loaded();
        p.before(&Write::Drop { ns: ns("orders") });
        p.before(&Write::Rename { from: ns("items"), to: ns("moved"), drop_target: false });
        assert_eq!(names(&mut p), vec![("shop.moved".into(), vec!["a_1".into(), "b_1".into(), "c_1".into()])]);
        let mut p = loaded();
        p.before(&Write::Rename { from: ns("orders"), to: ns("items"), drop_target: true });
        assert_eq!(names(&mut p), vec![("shop.items".into(), vec!["o_1".into()])]);
        let mut p = loaded();
        p.before(&Write::DropDatabase { db: "shop".into() });
        assert_eq!(names(&mut p), vec![]);
        // A collMod that changes one of them needs them built now; other collMods do not.
        let mut p = loaded();
        let validator = doc! { "collMod": "items", "validator": {} };
        assert_eq!(p.before(&Write::CollMod { ns: ns("items"), command: validator }), None);
        let hide = doc! { "collMod": "items", "index": { "name": "a_1", "hidden": true } };
        let now = p.before(&Write::CollMod { ns: ns("items"), command: hide }).unwrap();
        assert_eq!((now.0, now.1.len()), (ns("items"), 3));
        assert_eq!(names(&mut p), vec![("shop.orders".into(), vec!["o_1".into()])]);
    }
}
