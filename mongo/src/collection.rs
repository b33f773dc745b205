//! One collection to a moment (`pitr restore --source mongo --to TIME --ns DB.COLL [--as
//! DB.NEWCOLL]`): from the snapshot a whole restore to TIME would start from, only that
//! collection's documents, then the archived oplog entries that concern it (its inserts, updates
//! and deletes, its DDL, its part of transactions) up to TIME, then the snapshot's indexes of it
//! that the oplog left, all written into a new collection on a running server. Nothing else on
//! that server is written. What cannot be told to be another collection's (an unknown op, a
//! command restore does not know in its database) is kept, so that translation refuses it as the
//! whole restore does rather than leave it out.
//!
//! The oplog is read twice. The first pass writes nothing: it finds TIME's `ts` and whether the
//! collection existed at TIME, so that every refusal (not there yet, dropped, its database
//! dropped, renamed away, renamed into, a view) comes before the first write. The second pass
//! applies.
//!
//! Renames are not followed. A collection renamed away before TIME (and not created again) did
//! not exist under its name at TIME, which is what the error says. A collection that got its
//! documents from a rename into its name before TIME (and kept them up to TIME) is refused:
//! those documents were another collection's before the rename, which this restore does not
//! read; the error names that collection and the rename's `ts` (or, for the temporary
//! collection of `$out`, mapReduce or convertToCapped, what replaced the collection then).

use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use pitr_archive::time::{format_compact, format_rfc3339_micros as format_us};
use pitr_archive::Repository;

use crate::apply::{is_system_db, Entry, Group, Grouper, Ns, Write};
use crate::layout::{slice_entries, CollectionKind, MongoCatalog, SnapshotManifest};
use crate::restore::{
    apply_write, build_indexes, choose, load_collection, tolerate, MongoTarget, PendingIndexes, NAMESPACE_EXISTS,
    NAMESPACE_NOT_FOUND,
};
use crate::{connect, Connected, MongoError, Ts};

/// What [`restore_collection`] restores, to when, and where.
#[derive(Debug, Clone)]
pub struct CollectionRestoreOptions {
    /// Where the replay stops.
    pub target: MongoTarget,
    /// The collection restored, as the backed-up replica set names it.
    pub ns: Ns,
    /// The new collection written; `None`: [`default_name`].
    pub restore_as: Option<Ns>,
    /// The server written to (it may be the backed-up one: only the new collection is written).
    pub target_uri: String,
    /// How long connecting to the target may take.
    pub connect_timeout: Duration,
}

/// What a collection restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CollectionRestoreReport {
    /// The collection restored (`db.coll`).
    pub ns: String,
    /// The collection it was written to.
    pub restored_as: String,
    /// The target as asked for ([`MongoTarget`]'s display form).
    pub target: String,
    /// The server written to, password redacted.
    pub target_uri: String,
    /// The layout name the objects were read from.
    pub name: String,
    /// The snapshot the collection was loaded from.
    pub snapshot_id: String,
    /// Documents of the collection in that snapshot (0 when it was created after it).
    pub snapshot_documents: u64,
    /// Indexes built from the snapshot (`_id_` not counted), plus those the oplog created.
    pub indexes_built: usize,
    /// Oplog entries that concern the collection, applied to the new one.
    pub entries_applied: u64,
    /// Of those, transactions (each counted once).
    pub transactions_applied: u64,
    /// The `ts` of the last entry applied; `None` when nothing after the snapshot concerned it.
    pub last_applied_ts: Option<String>,
    /// Its wall time (RFC 3339, µs).
    pub last_applied_time: Option<String>,
    /// Documents in the new collection at the end.
    pub documents: u64,
    /// The whole restore, connecting included.
    pub seconds: f64,
}

/// Why a collection restore refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectionError {
    /// `--ns` or `--as` is not a namespace of a user collection.
    #[error("{arg} {given:?}: {why}")]
    BadNamespace {
        /// Which argument (`--ns`, `--as`).
        arg: &'static str,
        /// What was given.
        given: String,
        /// What is wrong with it.
        why: String,
    },
    /// The target server already has the collection a restore would create.
    #[error("the target {uri} already has a collection {ns}; a collection restore never writes into an existing one: choose another name with --as DB.NEWCOLL")]
    TargetExists {
        /// The target's URI, password redacted.
        uri: String,
        /// The collection found.
        ns: String,
    },
    /// The collection did not exist (under that name) at the target moment.
    #[error("{ns} did not exist at {target}: {why}")]
    Absent {
        /// The collection asked for.
        ns: String,
        /// The target as asked for.
        target: String,
        /// Why: when it was dropped or renamed away, or that it was not there yet.
        why: String,
    },
    /// At the target moment the collection held documents renamed into it from another one.
    #[error("{ns} at {target} holds what renameCollection moved into it from {from} at {ts} ({time}); a collection restore does not follow renames: restore {from} to a moment before {ts} instead (what the rename moved were its documents then), or the whole replica set with `pitr restore --source mongo`")]
    RenamedInto {
        /// The collection asked for.
        ns: String,
        /// The target as asked for.
        target: String,
        /// The collection renamed into it.
        from: String,
        /// The rename's `ts`.
        ts: String,
        /// The rename's wall time.
        time: String,
    },
    /// At the target moment the collection held what `$out`, mapReduce or convertToCapped had
    /// built in a temporary collection and renamed over it.
    #[error("{ns} at {target} is what {by} put in place at {ts} by renaming its temporary collection {from} over it; a collection restore does not follow that rename: restore {ns} to a moment before {ts}, or the whole replica set with `pitr restore --source mongo`")]
    Replaced {
        /// The collection asked for.
        ns: String,
        /// The target as asked for.
        target: String,
        /// What replaced it (`$out`, `mapReduce`, `convertToCapped`).
        by: &'static str,
        /// The temporary collection renamed into it.
        from: String,
        /// The rename's `ts` and wall time: `ts:S:I (RFC 3339)`.
        ts: String,
    },
    /// At the target moment the namespace was a view or a collection type restore cannot load.
    #[error("{ns} at {target} is {what}, not a collection whose documents restore can load")]
    NotACollection {
        /// The namespace asked for.
        ns: String,
        /// The target as asked for.
        target: String,
        /// What it was.
        what: String,
    },
    /// Reading the archive or talking to the server failed before anything was written.
    #[error(transparent)]
    Mongo(#[from] MongoError),
    /// Everything was written but the final count of the new collection's documents failed.
    #[error("{restored_as} was written completely (restored from {ns}), but counting its documents afterwards failed: {error}; it is left in place")]
    Uncounted {
        /// The collection restored.
        ns: String,
        /// The collection written.
        restored_as: String,
        /// What failed.
        error: Box<MongoError>,
    },
    /// Writing failed part-way; `cleanup` says what became of the new collection.
    #[error("restoring {ns} as {restored_as} failed: {error}; {cleanup}")]
    Failed {
        /// The collection restored.
        ns: String,
        /// The collection being written.
        restored_as: String,
        /// What failed.
        error: Box<MongoError>,
        /// Whether the partly written collection was dropped.
        cleanup: String,
    },
}

impl From<crate::apply::TranslateError> for CollectionError {
    fn from(e: crate::apply::TranslateError) -> Self {
        CollectionError::Mongo(e.into())
    }
}

/// Parses `DB.COLLECTION` (`arg` names the option in errors): a user collection's namespace as
/// MongoDB allows it. The collection part may hold dots; the database part may not.
pub fn parse_ns(arg: &'static str, given: &str) -> Result<Ns, CollectionError> {
    let bad = |why: String| CollectionError::BadNamespace { arg, given: given.to_string(), why };
    let ns = Ns::parse(given)
        .ok_or_else(|| bad("expected DB.COLLECTION (a database, a dot, a collection), e.g. shop.orders".into()))?;
    if let Some(c) = ns.db.chars().find(|c| "/\\ \"$*<>:|?\0".contains(*c)) {
        return Err(bad(format!("a database name cannot contain {c:?}")));
    }
    if ns.db.len() >= 64 {
        return Err(bad("a database name is at most 63 bytes".into()));
    }
    if let Some(c) = ns.coll.chars().find(|c| "$\0".contains(*c)) {
        return Err(bad(format!("a collection name cannot contain {c:?}")));
    }
    if given.len() > 255 {
        return Err(bad("a namespace is at most 255 bytes".into()));
    }
    if ns.is_system() {
        return Err(bad(format!(
            "{} collections are the server's own; pitr neither archives nor restores them",
            if is_system_db(&ns.db) { format!("the {} database's", ns.db) } else { "system.*".to_string() }
        )));
    }
    Ok(ns)
}

/// What made `from` a temporary collection whose rename over a collection replaced it: mongod's
/// `$out` (and mapReduce since 4.4) build in `tmp.agg_out.<uuid>`, older mapReduce in
/// `tmp.mr.<coll>_<n>`, convertToCapped in `tmp<random>.convertToCapped.<coll>`.
fn temporary_source(from: &Ns) -> Option<&'static str> {
    let c = from.coll.as_str();
    if c.starts_with("tmp.agg_out.") {
        Some("$out or mapReduce")
    } else if c.starts_with("tmp.mr.") {
        Some("mapReduce")
    } else if c.starts_with("tmp") && c.contains(".convertToCapped.") {
        Some("convertToCapped")
    } else {
        None
    }
}

/// `<coll>_at_<YYYYMMDDHHMMSS>` (UTC) in the same database: the name a restore writes to when
/// none is given. The moment is the target's (for `latest`, the newest archived entry's; for a
/// `ts` target, its second).
pub fn default_name(ns: &Ns, target: MongoTarget, catalog: &MongoCatalog) -> Ns {
    let us = match target {
        MongoTarget::Time(us) => us,
        MongoTarget::Ts(t) => t.secs_us(),
        MongoTarget::Latest => match catalog.last_archived() {
            Some((_, Some(us))) => us,
            Some((t, None)) => t.secs_us(),
            None => pitr_archive::now_us(),
        },
    };
    let stamp: String = format_compact(us).chars().filter(char::is_ascii_digit).collect();
    Ns { db: ns.db.clone(), coll: format!("{}_at_{stamp}", ns.coll) }
}

/// Commands that act on the one collection they name first and on no other: left out when that
/// is another collection. Any other command in the collection's database is kept, so that one
/// restore does not understand (`cloneCollectionAsCapped` into it, `applyOps` forms, newer
/// commands) is refused by translation rather than silently missing from the collection.
const SINGLE_COLLECTION_COMMANDS: [&str; 9] = [
    "create",
    "drop",
    "collMod",
    "createIndexes",
    "commitIndexBuild",
    "startIndexBuild",
    "abortIndexBuild",
    "dropIndexes",
    "deleteIndexes",
];

/// Whether an oplog operation (`op`, its `ns`, its `o`) may write to or change `ns`; `applyOps`
/// is looked into by [`concerning`], not here. What cannot be told apart as another
/// collection's (an unknown op, a malformed entry) is kept: translation then refuses it, as the
/// whole restore does, instead of the collection restore leaving it out.
fn op_concerns(op: &str, entry_ns: &str, o: &Document, ns: &Ns) -> bool {
    match op {
        "n" => false,
        "c" => {
            let Some(db) = entry_ns.strip_suffix(".$cmd") else { return true };
            let Some((name, first)) = o.iter().next() else { return db == ns.db };
            let names_it = |v: Option<&str>| v.and_then(Ns::parse).as_ref() == Some(ns);
            match name.as_str() {
                "renameCollection" => names_it(first.as_str()) || names_it(o.get_str("to").ok()),
                _ if db != ns.db => false,
                n if SINGLE_COLLECTION_COMMANDS.contains(&n) => first.as_str().is_none_or(|c| c == ns.coll),
                _ => true,
            }
        }
        // Inserts, updates, deletes and op types restore does not know: another collection's
        // are left out, the rest kept.
        _ => Ns::parse(entry_ns).is_none_or(|n| n == *ns),
    }
}

/// An `applyOps` command document with only its operations that concern `ns` (nested
/// `applyOps` likewise), its other fields (`partialTxn`, `prepare`) kept.
fn filter_apply_ops(o: &Document, ns: &Ns) -> Document {
    let mut out = o.clone();
    if let Ok(ops) = o.get_array("applyOps") {
        let kept: Vec<Bson> = ops
            .iter()
            .filter_map(|op| {
                // Something that is not an operation is kept: translation then fails on it, as it
                // would in a whole restore.
                let Some(d) = op.as_document() else { return Some(op.clone()) };
                let inner_o = d.get_document("o").ok();
                if let Some(inner) = inner_o.filter(|i| i.contains_key("applyOps")) {
                    let filtered = filter_apply_ops(inner, ns);
                    let empty = filtered.get_array("applyOps").map(|a| a.is_empty()).unwrap_or(false);
                    let mut d = d.clone();
                    d.insert("o", filtered);
                    return (!empty).then_some(Bson::Document(d));
                }
                // Without `op` it is not known to be another collection's: kept, and refused.
                let Ok(op_kind) = d.get_str("op") else { return Some(op.clone()) };
                let op_ns = d.get_str("ns").unwrap_or("");
                let empty = Document::new();
                op_concerns(op_kind, op_ns, inner_o.unwrap_or(&empty), ns).then(|| op.clone())
            })
            .collect();
        out.insert("applyOps", kept);
    }
    out
}

/// The part of `e` that concerns `ns`, or `None`. Every `applyOps` entry is kept, filtered (an
/// empty one may still end a transaction chain), and so are `commitTransaction` and
/// `abortTransaction`, which end prepared ones.
fn concerning(e: &Entry, ns: &Ns) -> Option<Entry> {
    if e.op == "c" {
        if e.o.contains_key("applyOps") {
            let mut out = e.clone();
            out.o = filter_apply_ops(&e.o, ns);
            return Some(out);
        }
        if e.o.contains_key("commitTransaction") || e.o.contains_key("abortTransaction") {
            return Some(e.clone());
        }
    }
    op_concerns(&e.op, &e.ns, &e.o, ns).then(|| e.clone())
}

/// Whether a write translated from an entry that concerns `ns` acts on `ns`.
fn touches(w: &Write, ns: &Ns) -> bool {
    match w {
        Write::Upsert { ns: n, .. }
        | Write::Update { ns: n, .. }
        | Write::Delete { ns: n, .. }
        | Write::Create { ns: n, .. }
        | Write::Drop { ns: n }
        | Write::CreateIndexes { ns: n, .. }
        | Write::DropIndexes { ns: n, .. }
        | Write::CollMod { ns: n, .. } => n == ns,
        Write::DropDatabase { db } => *db == ns.db,
        Write::Rename { from, to, .. } => from == ns || to == ns,
    }
}

/// What a write does to whether the collection exists (the first pass's record).
#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// Documents or indexes written: the collection exists from here (an insert creates it).
    Written,
    /// `create`: of a view when it has `viewOn`.
    Created {
        view: bool,
    },
    Dropped,
    DatabaseDropped,
    RenamedAway {
        to: Ns,
    },
    RenamedInto {
        from: Ns,
    },
}

fn event_of(w: &Write, ns: &Ns) -> Event {
    match w {
        Write::Create { options, .. } => Event::Created { view: options.contains_key("viewOn") },
        Write::Drop { .. } => Event::Dropped,
        Write::DropDatabase { .. } => Event::DatabaseDropped,
        Write::Rename { from, to, .. } if from == ns => Event::RenamedAway { to: to.clone() },
        Write::Rename { from, .. } => Event::RenamedInto { from: from.clone() },
        _ => Event::Written,
    }
}

/// What the namespace is at a point of the oplog.
#[derive(Debug, Clone, PartialEq)]
enum Presence {
    Collection,
    View,
    /// A type restore cannot load (`listCollections`' word for it).
    Other(String),
    /// Not there; why.
    Absent(String),
    RenamedInto {
        from: Ns,
        ts: Ts,
        time_us: i64,
    },
}

/// What `ns` was in `snapshot`.
fn in_snapshot(snapshot: &SnapshotManifest, ns: &Ns) -> (Presence, u64) {
    match snapshot.collections.iter().find(|c| c.db == ns.db && c.name == ns.coll) {
        Some(c) => match &c.kind {
            CollectionKind::Collection => (Presence::Collection, c.documents),
            CollectionKind::View => (Presence::View, 0),
            CollectionKind::Other(t) => (Presence::Other(t.clone()), 0),
        },
        None => (
            Presence::Absent(format!(
                "it is not in snapshot {} (consistent at {}) and nothing created it between that and the target",
                snapshot.id,
                format_us(snapshot.time_after_us)
            )),
            0,
        ),
    }
}

/// `start` after the events up to and including `limit` (all of them: `None`).
fn presence_at(start: Presence, events: &[(Ts, i64, Event)], limit: Option<Ts>) -> Presence {
    let at = |ts: Ts, us: i64| format!("at {ts} ({})", format_us(us));
    let mut p = start;
    for (ts, us, e) in events.iter().filter(|(ts, _, _)| limit.is_none_or(|l| *ts <= l)) {
        p = match (e, p) {
            (Event::Written, Presence::Absent(_)) => Presence::Collection,
            (Event::Written, p) => p,
            (Event::Created { view }, Presence::Absent(_) | Presence::RenamedInto { .. }) => {
                if *view {
                    Presence::View
                } else {
                    Presence::Collection
                }
            }
            // Created again while there: the snapshot was dumped after the create it replays.
            (Event::Created { .. }, p) => p,
            (Event::Dropped, _) => Presence::Absent(format!("it was dropped {}", at(*ts, *us))),
            (Event::DatabaseDropped, _) => Presence::Absent(format!("its database was dropped {}", at(*ts, *us))),
            (Event::RenamedAway { to }, _) => Presence::Absent(format!("it was renamed to {to} {}", at(*ts, *us))),
            (Event::RenamedInto { from }, _) => Presence::RenamedInto { from: from.clone(), ts: *ts, time_us: *us },
        };
    }
    p
}

/// The first pass's result.
struct Scan {
    /// The newest `ts` replayed (`None`: the whole run).
    limit: Option<Ts>,
    /// What happened to the namespace, in oplog order; consecutive writes recorded once.
    events: Vec<(Ts, i64, Event)>,
}

/// The slices of `run` that hold entries after the snapshot's `ts_before`.
fn slices_after<'a>(catalog: &'a MongoCatalog, run: usize, snapshot: &SnapshotManifest) -> Vec<&'a String> {
    catalog.runs[run]
        .slices
        .iter()
        .filter(|name| catalog.layout.parse_slice_name(name).is_some_and(|(_, end)| end > snapshot.ts_before))
        .collect()
}

/// The first pass over the entries after the snapshot's `ts_before`, in oplog order: the
/// target's `ts` and what happened to `ns` up to it. Groups are formed as in the second pass,
/// without the limit (which a time target only knows at the end): a group is applied there
/// exactly when it ends at or before the limit here. An entry that cannot be translated fails the
/// restore only if it is at or before the limit.
struct Scanner<'a> {
    ns: &'a Ns,
    target: MongoTarget,
    /// For a time target: the newest `ts` whose wall time is at or before it.
    newest: Ts,
    grouper: Grouper,
    events: Vec<(Ts, i64, Event)>,
    failed: Option<(Ts, crate::apply::TranslateError)>,
}

impl<'a> Scanner<'a> {
    fn new(ns: &'a Ns, target: MongoTarget, ts_before: Ts) -> Scanner<'a> {
        Scanner { ns, target, newest: ts_before, grouper: Grouper::new(), events: Vec::new(), failed: None }
    }

    fn record(&mut self, groups: Vec<Group>) {
        for g in groups {
            for w in g.writes.iter().filter(|w| touches(w, self.ns)) {
                let e = event_of(w, self.ns);
                if e == Event::Written && self.events.last().is_some_and(|(_, _, last)| *last == Event::Written) {
                    continue;
                }
                self.events.push((g.ts, g.time_us, e));
            }
        }
    }

    /// Takes the next entry; `false` once past a `ts` target (nothing after it matters).
    fn feed(&mut self, e: &Entry) -> bool {
        match self.target {
            MongoTarget::Ts(t) if e.ts > t => return false,
            MongoTarget::Time(us) if e.time_us() <= us && e.ts > self.newest => self.newest = e.ts,
            _ => {}
        }
        if self.failed.is_some() {
            return true;
        }
        let Some(e) = concerning(e, self.ns) else { return true };
        // The groups the entry closed count even when the entry itself fails: they end before it.
        let mut closed = Vec::new();
        let pushed = self.grouper.push_into(&e, &mut closed);
        self.record(closed);
        if let Err(err) = pushed {
            self.failed = Some((e.ts, err));
        }
        true
    }

    fn finish(mut self) -> Result<Scan, MongoError> {
        if self.failed.is_none() {
            let (open, _) = self.grouper.finish();
            self.record(open.into_iter().collect());
        }
        let limit = match self.target {
            MongoTarget::Latest => None,
            MongoTarget::Ts(t) => Some(t),
            MongoTarget::Time(_) => Some(self.newest),
        };
        if let Some((ts, err)) = self.failed {
            if limit.is_none_or(|l| ts <= l) {
                return Err(err.into());
            }
        }
        Ok(Scan { limit, events: self.events })
    }
}

/// [`Scanner`] over the archived slices.
async fn scan(
    repo: &Repository,
    slices: &[&String],
    snapshot: &SnapshotManifest,
    target: MongoTarget,
    ns: &Ns,
) -> Result<Scan, MongoError> {
    let mut scanner = Scanner::new(ns, target, snapshot.ts_before);
    'slices: for name in slices {
        for e in slice_entries(repo, name).await? {
            if e.ts > snapshot.ts_before && !scanner.feed(&e) {
                break 'slices;
            }
        }
    }
    scanner.finish()
}

/// The second pass's state: whether the new collection is there now (created by this restore),
/// and what was applied.
#[derive(Default)]
struct Applied {
    have: bool,
    created: bool,
    indexes_built: usize,
    entries: u64,
    transactions: u64,
    last: Option<(Ts, i64)>,
    /// The snapshot's indexes of the collection (keyed by its name, `ns`), built after the replay.
    pending: PendingIndexes,
}

/// `create` of `into`, refused when it exists (never `tolerate`d: it may be someone else's).
async fn create_new(conn: &Connected, into: &Ns, options: &Document, state: &mut Applied) -> Result<(), MongoError> {
    let mut create = doc! { "create": &into.coll };
    create.extend(options.clone());
    conn.client.database(&into.db).run_command(create).await.map_err(conn.server_err(format!("creating {into}")))?;
    state.have = true;
    state.created = true;
    Ok(())
}

/// What became of the target when the restore failed before it had created `into`: `e` may be
/// the server refusing that `create` because someone else created the name meanwhile.
fn nothing_written(into: &Ns, e: &MongoError) -> String {
    if matches!(e, MongoError::Server { source, .. } if crate::code_of(source) == Some(NAMESPACE_EXISTS)) {
        format!(
            "{into} was created on the target by someone else meanwhile; this restore wrote nothing to it and left it as it is"
        )
    } else {
        "nothing was written to the target".into()
    }
}

async fn drop_new(conn: &Connected, into: &Ns) -> Result<(), MongoError> {
    tolerate(conn.client.database(&into.db).run_command(doc! { "drop": &into.coll }).await, &[NAMESPACE_NOT_FOUND])
        .map_err(conn.server_err(format!("dropping {into}")))
}

/// Applies one write on `ns` to `into` instead.
async fn apply_to_new(conn: &Connected, w: &Write, into: &Ns, state: &mut Applied) -> Result<(), MongoError> {
    let redirected = match w {
        Write::Upsert { filter, doc, .. } => {
            Write::Upsert { ns: into.clone(), filter: filter.clone(), doc: doc.clone() }
        }
        Write::Update { filter, update, .. } => {
            Write::Update { ns: into.clone(), filter: filter.clone(), update: update.clone() }
        }
        Write::Delete { filter, .. } => Write::Delete { ns: into.clone(), filter: filter.clone() },
        Write::CreateIndexes { indexes, .. } => {
            state.indexes_built += indexes.iter().filter(|i| i.get_str("name") != Ok("_id_")).count();
            Write::CreateIndexes { ns: into.clone(), indexes: indexes.clone() }
        }
        Write::DropIndexes { index, .. } => Write::DropIndexes { ns: into.clone(), index: index.clone() },
        Write::CollMod { command, .. } => {
            // The command names its collection first; the rest are its options.
            let mut renamed = doc! { "collMod": &into.coll };
            renamed.extend(command.iter().skip(1).map(|(k, v)| (k.clone(), v.clone())));
            Write::CollMod { ns: into.clone(), command: renamed }
        }
        Write::Create { options, .. } => {
            if !state.have {
                create_new(conn, into, options, state).await?;
            }
            return Ok(());
        }
        Write::Drop { .. } | Write::DropDatabase { .. } | Write::Rename { .. } => {
            if state.have {
                drop_new(conn, into).await?;
                state.have = false;
            }
            return Ok(());
        }
    };
    let needs_collection =
        !matches!(redirected, Write::Delete { .. } | Write::DropIndexes { .. } | Write::CollMod { .. });
    if !state.have {
        if !needs_collection {
            return Ok(());
        }
        // The server would create it implicitly; created here so that it is never one that
        // appeared meanwhile.
        create_new(conn, into, &Document::new(), state).await?;
    }
    apply_write(conn, &redirected).await
}

async fn apply_group(conn: &Connected, g: &Group, ns: &Ns, into: &Ns, state: &mut Applied) -> Result<(), MongoError> {
    let writes: Vec<&Write> = g.writes.iter().filter(|w| touches(w, ns)).collect();
    if writes.is_empty() {
        return Ok(());
    }
    for w in writes {
        if let Some((_, specs)) = state.pending.before(w).filter(|_| state.have) {
            state.indexes_built += specs.len();
            build_indexes(conn, into, specs).await?;
        }
        apply_to_new(conn, w, into, state).await?;
    }
    state.entries += g.entries as u64;
    state.transactions += u64::from(g.transaction);
    state.last = Some((g.ts, g.time_us));
    Ok(())
}

/// The second pass: the snapshot's documents, then the oplog up to `limit`, then the snapshot's
/// indexes (those the oplog left: [`PendingIndexes`]).
#[allow(clippy::too_many_arguments)]
async fn write(
    repo: &Repository,
    catalog: &MongoCatalog,
    conn: &Connected,
    snapshot: &SnapshotManifest,
    slices: &[&String],
    limit: Option<Ts>,
    ns: &Ns,
    into: &Ns,
    state: &mut Applied,
) -> Result<(), MongoError> {
    if let Some(c) =
        snapshot.collections.iter().find(|c| c.db == ns.db && c.name == ns.coll && c.kind == CollectionKind::Collection)
    {
        create_new(conn, into, &c.options, state).await?;
        load_collection(repo, catalog, conn, c, into).await?;
        state.pending.add(ns.clone(), &c.indexes);
    }
    let mut grouper = Grouper::new();
    'slices: for name in slices {
        for e in slice_entries(repo, name).await? {
            if e.ts <= snapshot.ts_before {
                continue;
            }
            if limit.is_some_and(|l| e.ts > l) {
                break 'slices;
            }
            let Some(e) = concerning(&e, ns) else { continue };
            for g in grouper.push(&e)? {
                apply_group(conn, &g, ns, into, state).await?;
            }
        }
    }
    let (open, _unfinished) = grouper.finish();
    if let Some(g) = open {
        apply_group(conn, &g, ns, into, state).await?;
    }
    if let Some(specs) = state.pending.take(ns).filter(|_| state.have) {
        state.indexes_built += specs.len();
        build_indexes(conn, into, specs).await?;
    }
    Ok(())
}

/// Restores the collection `opts.ns` as it was at `opts.target` into a new collection on the
/// server at `opts.target_uri`. Refuses, before writing anything, a target that already has the
/// new collection, a collection that did not exist at the target (or was a view, or got its
/// documents from a rename), and a target outside the archive's windows. A failure while writing
/// drops the new collection.
pub async fn restore_collection(
    repo: &Repository,
    catalog: &MongoCatalog,
    opts: &CollectionRestoreOptions,
) -> Result<CollectionRestoreReport, CollectionError> {
    let started = Instant::now();
    let ns = parse_ns("--ns", &opts.ns.to_string())?;
    let into = match &opts.restore_as {
        Some(n) => parse_ns("--as", &n.to_string())?,
        None => parse_ns("--as", &default_name(&ns, opts.target, catalog).to_string())?,
    };
    let (snapshot, run) = choose(catalog, opts.target)?;
    let conn = connect(&opts.target_uri, opts.connect_timeout).await?;
    let present = conn
        .client
        .database(&into.db)
        .list_collection_names()
        .await
        .map_err(conn.server_err(format!("listing the collections of {}", into.db)))?;
    if present.contains(&into.coll) {
        return Err(CollectionError::TargetExists { uri: conn.uri.clone(), ns: into.to_string() });
    }

    let slices = slices_after(catalog, run, snapshot);
    let scan = scan(repo, &slices, snapshot, opts.target, &ns).await?;
    let (start, snapshot_documents) = in_snapshot(snapshot, &ns);
    let target = opts.target.to_string();
    match presence_at(start, &scan.events, scan.limit) {
        Presence::Collection => {}
        Presence::Absent(why) => return Err(CollectionError::Absent { ns: ns.to_string(), target, why }),
        Presence::View => {
            return Err(CollectionError::NotACollection { ns: ns.to_string(), target, what: "a view".into() })
        }
        Presence::Other(t) => {
            return Err(CollectionError::NotACollection { ns: ns.to_string(), target, what: format!("a {t:?}") })
        }
        Presence::RenamedInto { from, ts, time_us } => {
            if let Some(by) = temporary_source(&from) {
                return Err(CollectionError::Replaced {
                    ns: ns.to_string(),
                    target,
                    by,
                    from: from.to_string(),
                    ts: format!("{ts} ({})", format_us(time_us)),
                });
            }
            return Err(CollectionError::RenamedInto {
                ns: ns.to_string(),
                target,
                from: from.to_string(),
                ts: ts.to_string(),
                time: format_us(time_us),
            });
        }
    }

    let mut state = Applied::default();
    let written = write(repo, catalog, &conn, snapshot, &slices, scan.limit, &ns, &into, &mut state).await;
    let documents = match written {
        Ok(()) => {
            // A collection the oplog leaves empty and never created explicitly still exists at
            // the target moment (the first pass said so): it is created empty.
            if !state.have {
                create_new(&conn, &into, &Document::new(), &mut state).await.map_err(|e| CollectionError::Failed {
                    ns: ns.to_string(),
                    restored_as: into.to_string(),
                    cleanup: nothing_written(&into, &e),
                    error: Box::new(e),
                })?;
            }
            conn.client
                .database(&into.db)
                .collection::<Document>(&into.coll)
                .count_documents(doc! {})
                .await
                .map_err(conn.server_err(format!("counting the documents of {into}")))
                .map_err(|e| CollectionError::Uncounted {
                    ns: ns.to_string(),
                    restored_as: into.to_string(),
                    error: Box::new(e),
                })?
        }
        Err(error) => {
            let cleanup = if !state.have {
                if state.created {
                    "the collection it had created was dropped again by the restore".to_string()
                } else {
                    nothing_written(&into, &error)
                }
            } else {
                match drop_new(&conn, &into).await {
                    Ok(()) => format!("{into} was dropped again"),
                    Err(e) => format!("{into} could NOT be dropped ({e}): it is partly written; drop it by hand"),
                }
            };
            return Err(CollectionError::Failed {
                ns: ns.to_string(),
                restored_as: into.to_string(),
                error: Box::new(error),
                cleanup,
            });
        }
    };
    Ok(CollectionRestoreReport {
        ns: ns.to_string(),
        restored_as: into.to_string(),
        target,
        target_uri: conn.uri.clone(),
        name: catalog.layout.name.clone(),
        snapshot_id: snapshot.id.clone(),
        snapshot_documents,
        indexes_built: state.indexes_built,
        entries_applied: state.entries,
        transactions_applied: state.transactions,
        last_applied_ts: state.last.map(|(t, _)| t.to_string()),
        last_applied_time: state.last.map(|(_, us)| format_us(us)),
        documents,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{spec::BinarySubtype, Binary, Timestamp};

    fn ns() -> Ns {
        Ns { db: "shop".into(), coll: "items".into() }
    }

    fn entry(d: Document) -> Entry {
        Entry::from_document(&d).unwrap()
    }

    fn ts(inc: u32) -> Timestamp {
        Timestamp { time: 100, increment: inc }
    }

    #[test]
    fn namespaces_are_checked_before_anything_runs() {
        assert_eq!(parse_ns("--ns", "shop.items").unwrap(), ns());
        let dotted = parse_ns("--as", "shop.items.at.t").unwrap();
        assert_eq!((dotted.db.as_str(), dotted.coll.as_str()), ("shop", "items.at.t"));
        for (given, why) in [
            ("shop", "expected DB.COLLECTION"),
            ("shop.", "expected DB.COLLECTION"),
            (".items", "expected DB.COLLECTION"),
            ("my shop.items", "cannot contain ' '"),
            ("shop.it$ems", "cannot contain '$'"),
            ("admin.users", "the admin database's"),
            ("local.oplog.rs", "the local database's"),
            ("shop.system.views", "system.*"),
        ] {
            let err = parse_ns("--ns", given).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--ns {given:?}")) && err.contains(why), "{given}: {err}");
        }
        let long = format!("{}.x", "d".repeat(64));
        assert!(parse_ns("--as", &long).unwrap_err().to_string().contains("at most 63 bytes"));
    }

    #[test]
    fn only_what_concerns_the_collection_is_kept() {
        let kept = |d: Document| concerning(&entry(d), &ns()).is_some();
        assert!(kept(doc! { "op": "i", "ns": "shop.items", "ts": ts(1), "o": { "_id": 1 } }));
        assert!(!kept(doc! { "op": "i", "ns": "shop.other", "ts": ts(1), "o": { "_id": 1 } }));
        assert!(!kept(doc! { "op": "i", "ns": "shop2.items", "ts": ts(1), "o": { "_id": 1 } }));
        assert!(!kept(doc! { "op": "n", "ns": "", "ts": ts(1), "o": { "msg": "x" } }));
        let cmd = |db: &str, o: Document| doc! { "op": "c", "ns": format!("{db}.$cmd"), "ts": ts(2), "o": o };
        assert!(kept(cmd("shop", doc! { "create": "items" })));
        assert!(kept(cmd("shop", doc! { "drop": "items" })));
        assert!(kept(cmd("shop", doc! { "collMod": "items", "validator": {} })));
        assert!(kept(cmd("shop", doc! { "convertToCapped": "items", "size": 1 })));
        assert!(!kept(cmd("shop", doc! { "drop": "other" })));
        assert!(!kept(cmd("other", doc! { "drop": "items" })));
        assert!(!kept(cmd("shop", doc! { "create": "v", "viewOn": "items" })));
        assert!(kept(cmd("shop", doc! { "dropDatabase": 1 })));
        assert!(!kept(cmd("other", doc! { "dropDatabase": 1 })));
        assert!(kept(cmd("shop", doc! { "renameCollection": "shop.items", "to": "shop.old" })));
        assert!(kept(cmd("shop", doc! { "renameCollection": "shop.new", "to": "shop.items" })));
        assert!(!kept(cmd("shop", doc! { "renameCollection": "shop.a", "to": "shop.b" })));
        assert!(kept(cmd("admin", doc! { "commitTransaction": 1 })));

        // A transaction keeps only its operations on the collection, and its own fields.
        let uuid = Binary { subtype: BinarySubtype::Uuid, bytes: vec![1; 16] };
        let txn = entry(doc! {
            "op": "c", "ns": "admin.$cmd", "ts": ts(3), "lsid": { "id": uuid }, "txnNumber": 4_i64,
            "o": { "applyOps": [
                { "op": "i", "ns": "shop.items", "o": { "_id": 1 } },
                { "op": "i", "ns": "shop.orders", "o": { "_id": 2 } },
                { "op": "c", "ns": "admin.$cmd", "o": { "applyOps": [
                    { "op": "d", "ns": "shop.items", "o": { "_id": 3 } },
                    { "op": "d", "ns": "shop.orders", "o": { "_id": 4 } },
                ] } },
                { "op": "c", "ns": "admin.$cmd", "o": { "applyOps": [{ "op": "d", "ns": "x.y", "o": { "_id": 5 } }] } },
            ], "partialTxn": true },
        });
        let kept = concerning(&txn, &ns()).unwrap();
        assert_eq!(kept.txn, txn.txn);
        assert!(kept.o.get_bool("partialTxn").unwrap());
        let writes = crate::apply::translate(&kept).unwrap();
        assert_eq!(
            writes,
            vec![
                Write::Upsert { ns: ns(), filter: doc! { "_id": 1 }, doc: doc! { "_id": 1 } },
                Write::Delete { ns: ns(), filter: doc! { "_id": 3 } },
            ]
        );
        // One that touches nothing of it is still kept (it may end a chain), empty.
        let other = entry(doc! { "op": "c", "ns": "admin.$cmd", "ts": ts(4),
        "o": { "applyOps": [{ "op": "i", "ns": "shop.orders", "o": { "_id": 2 } }] } });
        assert_eq!(crate::apply::translate(&concerning(&other, &ns()).unwrap()).unwrap(), vec![]);
    }

    fn t(inc: u32) -> Ts {
        Ts { secs: 100, inc }
    }

    #[test]
    fn presence_follows_creates_drops_and_renames_up_to_the_limit() {
        let absent = || Presence::Absent("not in the snapshot".into());
        let ev = |inc: u32, e: Event| (t(inc), 100_000_000 + i64::from(inc), e);
        // Created after the snapshot by its first insert: absent before it, there from it on.
        let events = vec![ev(5, Event::Written)];
        assert_eq!(presence_at(absent(), &events, Some(t(4))), absent());
        assert_eq!(presence_at(absent(), &events, Some(t(5))), Presence::Collection);
        assert_eq!(presence_at(absent(), &events, None), Presence::Collection);
        // Dropped, then created again.
        let events = vec![ev(2, Event::Dropped), ev(7, Event::Created { view: false }), ev(8, Event::Written)];
        let at3 = presence_at(Presence::Collection, &events, Some(t(3)));
        assert!(matches!(&at3, Presence::Absent(why) if why.contains("dropped at ts:100:2")), "{at3:?}");
        assert_eq!(presence_at(Presence::Collection, &events, Some(t(7))), Presence::Collection);
        let gone = presence_at(Presence::Collection, &[ev(3, Event::DatabaseDropped)], None);
        assert!(matches!(&gone, Presence::Absent(why) if why.contains("its database was dropped")), "{gone:?}");
        // Renamed away: absent under its name, with the new name in the reason.
        let away = presence_at(
            Presence::Collection,
            &[ev(4, Event::RenamedAway { to: Ns::parse("shop.old").unwrap() })],
            None,
        );
        assert!(matches!(&away, Presence::Absent(why) if why.contains("renamed to shop.old")), "{away:?}");
        // Renamed into: refused while it holds what the rename brought, not after a drop.
        let from = Ns::parse("shop.staging").unwrap();
        let events =
            vec![ev(4, Event::RenamedInto { from: from.clone() }), ev(5, Event::Written), ev(9, Event::Dropped)];
        assert_eq!(
            presence_at(absent(), &events, Some(t(5))),
            Presence::RenamedInto { from, ts: t(4), time_us: 100_000_004 }
        );
        assert!(matches!(presence_at(absent(), &events, Some(t(9))), Presence::Absent(_)));
        // A view stays one; a create replayed over a snapshot that already holds it changes nothing.
        assert_eq!(presence_at(absent(), &[ev(1, Event::Created { view: true })], None), Presence::View);
        assert_eq!(
            presence_at(Presence::Collection, &[ev(1, Event::Created { view: true })], None),
            Presence::Collection
        );
    }

    #[test]
    fn what_may_concern_the_collection_is_kept_so_that_translation_refuses_it() {
        let kept = |d: Document| concerning(&entry(d), &ns());
        let refused = |d: Document| {
            let e = kept(d.clone()).unwrap_or_else(|| panic!("left out: {d}"));
            crate::apply::translate(&e).unwrap_err().to_string()
        };
        // Unknown op types on the collection (or on no parseable namespace) are refused…
        let err = refused(doc! { "op": "x", "ns": "shop.items", "ts": ts(1), "o": { "_id": 1 } });
        assert!(err.contains("unknown op \"x\""), "{err}");
        assert!(refused(doc! { "op": "x", "ns": "", "ts": ts(1), "o": {} }).contains("bad namespace"));
        // …another collection's are not its business.
        assert!(kept(doc! { "op": "x", "ns": "shop.other", "ts": ts(1), "o": {} }).is_none());
        // A command entry outside `<db>.$cmd`.
        let err = refused(doc! { "op": "c", "ns": "shop.items", "ts": ts(2), "o": { "drop": "items" } });
        assert!(err.contains("not <db>.$cmd"), "{err}");
        // Commands in its database that fill it without naming it first, and unknown ones.
        let cmd = |o: Document| doc! { "op": "c", "ns": "shop.$cmd", "ts": ts(3), "o": o };
        let err = refused(cmd(doc! { "cloneCollectionAsCapped": "src", "toCollection": "items", "size": 1 }));
        assert!(err.contains("\"cloneCollectionAsCapped\" on shop.$cmd is not supported"), "{err}");
        assert!(refused(cmd(doc! { "someFutureCommand": "x" })).contains("someFutureCommand"));
        assert!(refused(cmd(doc! {})).contains("empty command"));
        // The known single-collection commands on other collections are left out.
        for o in [
            doc! { "create": "other" },
            doc! { "drop": "other" },
            doc! { "collMod": "other", "validator": {} },
            doc! { "createIndexes": "other", "indexes": [] },
            doc! { "commitIndexBuild": "other", "indexes": [] },
            doc! { "startIndexBuild": "other", "indexes": [] },
            doc! { "dropIndexes": "other", "index": "a_1" },
        ] {
            assert!(kept(cmd(o.clone())).is_none(), "{o}");
        }
        // Another database's unknown commands cannot touch it.
        assert!(
            kept(doc! { "op": "c", "ns": "other.$cmd", "ts": ts(3), "o": { "someFutureCommand": "items" } }).is_none()
        );
        // An applyOps operation without `op` is kept, and refused.
        let txn = entry(doc! { "op": "c", "ns": "admin.$cmd", "ts": ts(4),
        "o": { "applyOps": [{ "ns": "shop.other", "o": { "_id": 1 } }] } });
        let err = crate::apply::translate(&concerning(&txn, &ns()).unwrap()).unwrap_err().to_string();
        assert!(err.contains("no `op`"), "{err}");
    }

    #[test]
    fn temporary_collections_renamed_over_it_are_named_for_what_made_them() {
        let by = |c: &str| temporary_source(&Ns { db: "shop".into(), coll: c.into() });
        assert_eq!(by("tmp.agg_out.5f0c1d2e-aaaa-bbbb-cccc-0123456789ab"), Some("$out or mapReduce"));
        assert_eq!(by("tmp.mr.items_3"), Some("mapReduce"));
        assert_eq!(by("tmpAbCdE.convertToCapped.items"), Some("convertToCapped"));
        assert_eq!(by("staging"), None);
        assert_eq!(by("tmp_items"), None);
        let e = CollectionError::Replaced {
            ns: "shop.items".into(),
            target: "ts:100:9".into(),
            by: "$out or mapReduce",
            from: "shop.tmp.agg_out.1".into(),
            ts: "ts:100:4 (2026-11-25T14:03:07.000000Z)".into(),
        }
        .to_string();
        assert!(e.contains("is what $out or mapReduce put in place at ts:100:4 (2026-11-25T14:03:07.000000Z)"), "{e}");
        assert!(e.contains("restore shop.items to a moment before ts:100:4"), "{e}");
        assert!(!e.contains("restore shop.tmp"), "{e}");
    }

    /// mongod-style entries through the first pass: what it says the collection was at the target.
    fn scan_of(entries: &[Document], target: MongoTarget, start: Presence) -> Result<Presence, MongoError> {
        let ns = ns();
        let mut scanner = Scanner::new(&ns, target, t(0));
        for d in entries {
            if !scanner.feed(&entry(d.clone())) {
                break;
            }
        }
        let scan = scanner.finish()?;
        Ok(presence_at(start, &scan.events, scan.limit))
    }

    fn wall(inc: u32) -> bson::DateTime {
        bson::DateTime::from_millis(100_000 + i64::from(inc))
    }

    #[test]
    fn the_first_pass_applies_no_transaction_whose_commit_is_after_the_target() {
        let uuid = Binary { subtype: BinarySubtype::Uuid, bytes: vec![7; 16] };
        let part = |inc: u32, id: i32, partial: bool| {
            let mut o = doc! { "applyOps": [{ "op": "i", "ns": "shop.items", "o": { "_id": id } }] };
            if partial {
                o.insert("partialTxn", true);
            }
            doc! { "op": "c", "ns": "admin.$cmd", "ts": ts(inc), "wall": wall(inc),
            "lsid": { "id": uuid.clone() }, "txnNumber": 1_i64, "o": o }
        };
        let entries = [
            part(5, 1, true),
            part(6, 2, true),
            doc! { "op": "i", "ns": "shop.other", "ts": ts(7), "wall": wall(7), "o": { "_id": 1 } },
            part(8, 3, false),
        ];
        let absent = || Presence::Absent("not in the snapshot".into());
        // The chain's entries before the target created nothing: its commit is after it.
        let p = scan_of(&entries, MongoTarget::Ts(t(7)), absent()).unwrap();
        assert!(matches!(p, Presence::Absent(_)), "{p:?}");
        let p = scan_of(&entries, MongoTarget::Time(100_007_000), absent()).unwrap();
        assert!(matches!(p, Presence::Absent(_)), "{p:?}");
        assert_eq!(scan_of(&entries, MongoTarget::Ts(t(8)), absent()).unwrap(), Presence::Collection);
        assert_eq!(scan_of(&entries, MongoTarget::Latest, absent()).unwrap(), Presence::Collection);
    }

    #[test]
    fn the_first_pass_refuses_an_unknown_op_up_to_the_target_only() {
        let entries = [
            doc! { "op": "i", "ns": "shop.items", "ts": ts(1), "wall": wall(1), "o": { "_id": 1 } },
            doc! { "op": "x", "ns": "shop.items", "ts": ts(2), "wall": wall(2), "o": { "_id": 1 } },
        ];
        let absent = || Presence::Absent("not in the snapshot".into());
        let err = scan_of(&entries, MongoTarget::Ts(t(2)), absent()).unwrap_err().to_string();
        assert!(err.contains("unknown op \"x\""), "{err}");
        assert!(scan_of(&entries, MongoTarget::Latest, absent()).is_err());
        assert_eq!(scan_of(&entries, MongoTarget::Ts(t(1)), absent()).unwrap(), Presence::Collection);
        assert_eq!(scan_of(&entries, MongoTarget::Time(100_001_000), absent()).unwrap(), Presence::Collection);
    }

    #[test]
    fn a_failure_after_the_target_keeps_the_transaction_it_closed() {
        // SecantusDB's form: the transaction's entries share one ts; it creates the collection.
        let uuid = Binary { subtype: BinarySubtype::Uuid, bytes: vec![8; 16] };
        let txn = |id: i32| {
            doc! { "op": "i", "ns": "shop.items", "ts": ts(3), "wall": wall(3), "o": { "_id": id },
            "lsid": { "id": uuid.clone() }, "txnNumber": 2_i64 }
        };
        let entries = [txn(1), txn(2), doc! { "op": "x", "ns": "shop.items", "ts": ts(4), "wall": wall(4), "o": {} }];
        let absent = || Presence::Absent("not in the snapshot".into());
        assert_eq!(scan_of(&entries, MongoTarget::Ts(t(3)), absent()).unwrap(), Presence::Collection);
        assert_eq!(scan_of(&entries, MongoTarget::Time(100_003_000), absent()).unwrap(), Presence::Collection);
    }

    #[test]
    fn a_name_taken_meanwhile_is_told_from_nothing_written() {
        let server = |code: i32| {
            let c: mongodb::error::CommandError =
                bson::from_document(doc! { "code": code, "codeName": "X", "errmsg": "refused" }).unwrap();
            MongoError::Server {
                uri: "mongodb://h".into(),
                what: "creating shop.new".into(),
                source: Box::new(mongodb::error::ErrorKind::Command(c).into()),
            }
        };
        let into = Ns { db: "shop".into(), coll: "new".into() };
        let taken = nothing_written(&into, &server(NAMESPACE_EXISTS));
        assert!(taken.contains("shop.new was created on the target by someone else meanwhile"), "{taken}");
        assert_eq!(nothing_written(&into, &server(13)), "nothing was written to the target");
        let e = CollectionError::Uncounted {
            ns: "shop.items".into(),
            restored_as: "shop.new".into(),
            error: Box::new(server(6)),
        }
        .to_string();
        assert!(e.starts_with("shop.new was written completely (restored from shop.items), but counting"), "{e}");
        assert!(e.ends_with("it is left in place"), "{e}");
    }

    #[test]
    fn the_default_name_carries_the_moment() {
        let catalog = MongoCatalog {
            layout: crate::MongoLayout::new("rs"),
            runs: Vec::new(),
            gaps: Vec::new(),
            snapshots: Vec::new(),
            run_end_us: Vec::new(),
            complete_up_to_us: None,
        };
        let us = pitr_archive::time::parse_time("2026-11-25T14:03:07.123456Z").unwrap();
        assert_eq!(default_name(&ns(), MongoTarget::Time(us), &catalog).to_string(), "shop.items_at_20261125140307");
        let at = Ts { secs: (us / 1_000_000) as u32, inc: 3 };
        assert_eq!(default_name(&ns(), MongoTarget::Ts(at), &catalog).to_string(), "shop.items_at_20261125140307");
    }
}
