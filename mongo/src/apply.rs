//! Oplog entries into ordinary writes. Pure: an entry (or a run of entries) in, a list of writes
//! out, so that restore works on any MongoDB-compatible server (no `applyOps` needed) and the
//! translation is tested without one.
//!
//! Two update layouts are understood: SecantusDB's `{$v: 2, diff: {updatedFields, removedFields,
//! truncatedArrays}}` and mongod's `{$v: 2, diff: {u, i, d, s<field>, a, l, u<index>}}` (and the
//! old `$v: 1` operator documents). Transactions: SecantusDB writes a transaction's operations as
//! separate entries sharing one `ts` (each with `lsid` and `txnNumber`); mongod writes one
//! `applyOps` command entry, or for large transactions a chain of `applyOps` entries with
//! `partialTxn: true` ended by one without it (or by `commitTransaction` when prepared).
//! [`Grouper`] turns either into one [`Group`] applied all together.

use std::collections::HashMap;

use bson::{doc, Bson, Document};

use crate::ts::Ts;

/// A namespace, `db.collection`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ns {
    /// The database's name.
    pub db: String,
    /// The collection's name (may itself contain dots).
    pub coll: String,
}

impl Ns {
    /// Splits `db.collection` at its first dot; `None` when either part would be empty.
    pub fn parse(ns: &str) -> Option<Ns> {
        let (db, coll) = ns.split_once('.')?;
        if db.is_empty() || coll.is_empty() {
            return None;
        }
        Some(Ns { db: db.to_string(), coll: coll.to_string() })
    }

    /// `admin`, `local`, `config` and `system.*` collections are the server's, never restored.
    pub fn is_system(&self) -> bool {
        is_system_db(&self.db) || self.coll.starts_with("system.")
    }
}

impl std::fmt::Display for Ns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.db, self.coll)
    }
}

/// What a user collection in a `system.*` namespace holds, where restore cannot bring it back
/// and must therefore say so instead of skipping it: mongod's time-series buckets (the
/// collection's real data; SecantusDB keeps time series as ordinary collections and never writes
/// these) and stored JavaScript. `system.views` and `system.profile` are not data: views are
/// restored from their definitions, the profiler's log is the server's.
pub fn unrestorable_system_collection(db: &str, coll: &str) -> Option<&'static str> {
    if is_system_db(db) {
        None
    } else if coll.starts_with("system.buckets.") {
        Some("the buckets of a MongoDB time-series collection")
    } else if coll == "system.js" {
        Some("stored JavaScript (system.js)")
    } else {
        None
    }
}

/// Whether `db` is one of the server's own databases (`admin`, `local`, `config`), never
/// snapshotted nor restored.
pub fn is_system_db(db: &str) -> bool {
    matches!(db, "admin" | "local" | "config")
}

/// One ordinary write that every MongoDB server accepts.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Insert, or replace the document with this `_id`: an insert replayed over a snapshot that
    /// already holds it (taken while the oplog ran) must not fail.
    Upsert {
        /// The collection written.
        ns: Ns,
        /// Selects the document: `{_id: …}`, or an update entry's `o2`.
        filter: Document,
        /// The whole new document.
        doc: Document,
    },
    /// An update-operator document (`$set`, `$unset`, `$push` with `$slice`) for one document.
    Update {
        /// The collection written.
        ns: Ns,
        /// Selects the document (the entry's `o2`, its `_id`).
        filter: Document,
        /// The update-operator document.
        update: Document,
    },
    /// Delete the document with this `_id`.
    Delete {
        /// The collection written.
        ns: Ns,
        /// `{_id: …}` of the document.
        filter: Document,
    },
    /// `create` a collection (or view) with the entry's options.
    Create {
        /// The collection created.
        ns: Ns,
        /// The `create` command's other fields (`capped`, `validator`, `viewOn`, …), without
        /// `idIndex`.
        options: Document,
    },
    /// `drop` a collection.
    Drop {
        /// The collection dropped.
        ns: Ns,
    },
    /// `renameCollection`.
    Rename {
        /// The collection renamed.
        from: Ns,
        /// Its new namespace, possibly in another database.
        to: Ns,
        /// Whether an existing collection at `to` is dropped first (`dropTarget`).
        drop_target: bool,
    },
    /// `createIndexes` (from `createIndexes` or a two-phase build's `commitIndexBuild`).
    CreateIndexes {
        /// The collection indexed.
        ns: Ns,
        /// The index specifications, as the entry holds them.
        indexes: Vec<Document>,
    },
    /// `index` is a name, a key pattern, or `"*"`.
    DropIndexes {
        /// The collection whose indexes are dropped.
        ns: Ns,
        /// Which index(es).
        index: Bson,
    },
    /// `dropDatabase` of a user database.
    DropDatabase {
        /// The database dropped.
        db: String,
    },
    /// `collMod`, sent as the entry holds it.
    CollMod {
        /// The collection modified.
        ns: Ns,
        /// The whole `collMod` command document.
        command: Document,
    },
}

/// An oplog entry restore cannot turn into writes; the restore stops there rather than skip it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TranslateError {
    /// A field restore needs is missing or of the wrong type.
    #[error("oplog entry {ts}: {what}")]
    Malformed {
        /// The entry's `ts` as text (`?` where it has none).
        ts: String,
        /// What is wrong.
        what: String,
    },
    /// A command restore has no ordinary write for.
    #[error("oplog entry {ts}: command {command:?} on {ns} is not supported by restore")]
    Unsupported {
        /// The entry's `ts` as text.
        ts: String,
        /// The entry's namespace.
        ns: String,
        /// The command's name (or a description of the case).
        command: String,
    },
}

/// The fields of an entry that restore looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// `ts`: the entry's position in the oplog.
    pub ts: Ts,
    /// `wall`, µs since the Unix epoch (absent on old servers).
    pub wall_us: Option<i64>,
    /// `op`: `i` insert, `u` update, `d` delete, `c` command, `n` no-op.
    pub op: String,
    /// `ns`: `db.collection`, or `db.$cmd` for commands (empty where the entry has none).
    pub ns: String,
    /// `o`: the document inserted, the update, the `_id` deleted, or the command (empty for a
    /// no-op without one).
    pub o: Document,
    /// `o2`: an update's selector (the document's `_id`).
    pub o2: Option<Document>,
    /// `(lsid.id, txnNumber)` when the entry belongs to a transaction.
    pub txn: Option<(Vec<u8>, i64)>,
}

impl Entry {
    /// Reads the fields restore needs from a raw oplog document; fails without `ts`, `op`, or
    /// (except for a no-op) `o`.
    pub fn from_document(d: &Document) -> Result<Entry, TranslateError> {
        let bad = |what: &str| TranslateError::Malformed {
            ts: d.get("ts").map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
            what: what.to_string(),
        };
        let ts = match d.get("ts") {
            Some(Bson::Timestamp(t)) => Ts::from_bson(*t),
            _ => return Err(bad("no `ts` timestamp")),
        };
        let wall_us = match d.get("wall") {
            Some(Bson::DateTime(w)) => Some(w.timestamp_millis() * 1000),
            _ => None,
        };
        let op = d.get_str("op").map_err(|_| bad("no `op`"))?.to_string();
        let ns = d.get_str("ns").unwrap_or("").to_string();
        let o = match d.get("o") {
            Some(Bson::Document(o)) => o.clone(),
            None if op == "n" => Document::new(),
            _ => return Err(bad("no `o` document")),
        };
        let o2 = d.get_document("o2").ok().cloned();
        let txn = match (d.get_document("lsid").ok().and_then(|l| l.get("id")), d.get("txnNumber")) {
            (Some(Bson::Binary(id)), Some(n)) => {
                n.as_i64().or_else(|| n.as_i32().map(i64::from)).map(|n| (id.bytes.clone(), n))
            }
            _ => None,
        };
        Ok(Entry { ts, wall_us, op, ns, o, o2, txn })
    }

    /// The entry's wall time, or the second of its `ts` where it has none.
    pub fn time_us(&self) -> i64 {
        self.wall_us.unwrap_or_else(|| self.ts.secs_us())
    }

    fn ts_text(&self) -> String {
        self.ts.to_string()
    }
}

/// The writes one entry stands for; empty for no-ops and the server's own namespaces.
pub fn translate(e: &Entry) -> Result<Vec<Write>, TranslateError> {
    let bad = |what: String| TranslateError::Malformed { ts: e.ts_text(), what };
    if e.op == "n" {
        return Ok(Vec::new());
    }
    if e.op == "c" {
        return translate_command(e);
    }
    let ns = Ns::parse(&e.ns).ok_or_else(|| bad(format!("bad namespace {:?}", e.ns)))?;
    if let Some(what) = unrestorable_system_collection(&ns.db, &ns.coll) {
        return Err(TranslateError::Unsupported {
            ts: e.ts_text(),
            ns: ns.to_string(),
            command: format!("writes to {what}"),
        });
    }
    if ns.is_system() {
        return Ok(Vec::new());
    }
    match e.op.as_str() {
        "i" => {
            let id = e.o.get("_id").ok_or_else(|| bad("insert without `_id`".into()))?;
            Ok(vec![Write::Upsert { ns, filter: doc! { "_id": id.clone() }, doc: e.o.clone() }])
        }
        "d" => {
            let id = e.o.get("_id").ok_or_else(|| bad("delete without `_id`".into()))?;
            Ok(vec![Write::Delete { ns, filter: doc! { "_id": id.clone() } }])
        }
        "u" => {
            let filter = e.o2.clone().ok_or_else(|| bad("update without `o2`".into()))?;
            update_writes(ns, filter, &e.o).map_err(bad)
        }
        other => Err(bad(format!("unknown op {other:?}"))),
    }
}

/// `o` of an update entry: a replacement document, a `$v: 2` diff in either layout, or a
/// `$v: 1` (or unversioned) operator document.
fn update_writes(ns: Ns, filter: Document, o: &Document) -> Result<Vec<Write>, String> {
    let is_operator = o.keys().any(|k| k.starts_with('$'));
    if !is_operator {
        return Ok(vec![Write::Upsert { ns, filter, doc: o.clone() }]);
    }
    let version = o.get("$v").and_then(|v| v.as_i32().or_else(|| v.as_i64().map(|v| v as i32)));
    if version == Some(2) {
        let diff = o.get_document("diff").map_err(|_| "`$v: 2` update without a `diff` document".to_string())?;
        let ops = if ["updatedFields", "removedFields", "truncatedArrays"].iter().any(|k| diff.contains_key(*k)) {
            description_ops(diff)?
        } else {
            let mut ops = DiffOps::default();
            mongod_diff(diff, "", &mut ops)?;
            ops
        };
        return Ok(ops.into_writes(ns, filter));
    }
    let mut update = o.clone();
    update.remove("$v");
    if update.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![Write::Update { ns, filter, update }])
}

/// What a diff does, as `$set`, `$unset` and array truncations (applied first, as mongod does:
/// an array is resized, then its elements set).
#[derive(Debug, Default)]
struct DiffOps {
    set: Document,
    unset: Document,
    truncate: Vec<(String, i64)>,
}

impl DiffOps {
    fn into_writes(self, ns: Ns, filter: Document) -> Vec<Write> {
        let mut out = Vec::new();
        if !self.truncate.is_empty() {
            let mut push = Document::new();
            for (field, size) in self.truncate {
                push.insert(field, doc! { "$each": [], "$slice": size });
            }
            out.push(Write::Update { ns: ns.clone(), filter: filter.clone(), update: doc! { "$push": push } });
        }
        let mut update = Document::new();
        if !self.set.is_empty() {
            update.insert("$set", self.set);
        }
        if !self.unset.is_empty() {
            update.insert("$unset", self.unset);
        }
        if !update.is_empty() {
            out.push(Write::Update { ns, filter, update });
        }
        out
    }
}

/// SecantusDB's layout (a change stream's update description).
fn description_ops(diff: &Document) -> Result<DiffOps, String> {
    let mut ops = DiffOps::default();
    if let Ok(set) = diff.get_document("updatedFields") {
        ops.set = set.clone();
    }
    if let Ok(removed) = diff.get_array("removedFields") {
        for f in removed {
            let f = f.as_str().ok_or("removedFields holds a non-string")?;
            ops.unset.insert(f, "");
        }
    }
    if let Ok(truncated) = diff.get_array("truncatedArrays") {
        for t in truncated {
            let t = t.as_document().ok_or("truncatedArrays holds a non-document")?;
            let field = t.get_str("field").map_err(|_| "truncatedArrays entry without `field`")?;
            let size = t.get("newSize").and_then(as_i64).ok_or("truncatedArrays entry without `newSize`")?;
            ops.truncate.push((field.to_string(), size));
        }
    }
    Ok(ops)
}

fn as_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// mongod's layout: `u` (update), `i` (insert), `d` (delete) hold fields of this level,
/// `s<field>` a sub-diff; an array sub-diff has `a: true`, `l` (new length), `u<index>` and
/// `s<index>`.
fn mongod_diff(diff: &Document, prefix: &str, ops: &mut DiffOps) -> Result<(), String> {
    let is_array = diff.get("a").is_some_and(|a| a == &Bson::Boolean(true));
    for (key, value) in diff {
        match key.as_str() {
            "a" if is_array => {}
            "l" if is_array => {
                let size = as_i64(value).ok_or("array diff `l` is not a number")?;
                ops.truncate.push((prefix.to_string(), size));
            }
            "u" | "i" if !is_array => {
                let fields = value.as_document().ok_or_else(|| format!("diff `{key}` is not a document"))?;
                for (f, v) in fields {
                    ops.set.insert(join(prefix, f), v.clone());
                }
            }
            "d" if !is_array => {
                let fields = value.as_document().ok_or("diff `d` is not a document")?;
                for (f, _) in fields {
                    ops.unset.insert(join(prefix, f), "");
                }
            }
            k if k.len() > 1 && k.starts_with('s') => {
                let sub = value.as_document().ok_or_else(|| format!("diff `{k}` is not a document"))?;
                mongod_diff(sub, &join(prefix, &k[1..]), ops)?;
            }
            k if is_array && k.len() > 1 && k.starts_with('u') => {
                ops.set.insert(join(prefix, &k[1..]), value.clone());
            }
            k => {
                return Err(format!(
                    "unknown diff field {k:?} at {:?}",
                    if prefix.is_empty() { "(top)" } else { prefix }
                ))
            }
        }
    }
    Ok(())
}

/// Commands (`op: "c"`, `ns: "<db>.$cmd"`).
fn translate_command(e: &Entry) -> Result<Vec<Write>, TranslateError> {
    let bad = |what: String| TranslateError::Malformed { ts: e.ts_text(), what };
    let db = e.ns.strip_suffix(".$cmd").ok_or_else(|| bad(format!("command on {:?}, not <db>.$cmd", e.ns)))?;
    if is_system_db(db) && !e.o.contains_key("applyOps") {
        return Ok(Vec::new());
    }
    let Some((name, first)) = e.o.iter().next() else {
        return Err(bad("empty command".into()));
    };
    let coll = |v: &Bson| -> Result<Ns, TranslateError> {
        let c = v.as_str().ok_or_else(|| bad(format!("{name}: collection name is not a string")))?;
        Ok(Ns { db: db.to_string(), coll: c.to_string() })
    };
    let keep = |ns: Ns, w: Write| -> Result<Vec<Write>, TranslateError> {
        if let Some(what) = unrestorable_system_collection(&ns.db, &ns.coll) {
            return Err(TranslateError::Unsupported {
                ts: e.ts_text(),
                ns: ns.to_string(),
                command: format!("{name} of {what}"),
            });
        }
        Ok(if ns.is_system() { Vec::new() } else { vec![w] })
    };
    Ok(match name.as_str() {
        "create" => {
            let ns = coll(first)?;
            let mut options = e.o.clone();
            options.remove("create");
            // The server builds the `_id` index itself; `idIndex` only describes it.
            options.remove("idIndex");
            keep(ns.clone(), Write::Create { ns, options })?
        }
        "drop" => {
            let ns = coll(first)?;
            keep(ns.clone(), Write::Drop { ns })?
        }
        "dropDatabase" => {
            if is_system_db(db) {
                Vec::new()
            } else {
                vec![Write::DropDatabase { db: db.to_string() }]
            }
        }
        "renameCollection" => {
            let from = first.as_str().and_then(Ns::parse).ok_or_else(|| bad("renameCollection: bad source".into()))?;
            let to =
                e.o.get_str("to").ok().and_then(Ns::parse).ok_or_else(|| bad("renameCollection: bad `to`".into()))?;
            let drop_target =
                e.o.get_bool("dropTarget").unwrap_or(false) || matches!(e.o.get("dropTarget"), Some(Bson::Binary(_)));
            match (from.is_system(), to.is_system()) {
                (true, true) => Vec::new(),
                (false, false) => vec![Write::Rename { from, to, drop_target }],
                // Out of or into the server's namespaces: what restore sees is a create or a drop.
                (true, false) => Err(TranslateError::Unsupported {
                    ts: e.ts_text(),
                    ns: from.to_string(),
                    command: "renameCollection from a system namespace".into(),
                })?,
                (false, true) => vec![Write::Drop { ns: from }],
            }
        }
        "createIndexes" | "commitIndexBuild" => {
            let ns = coll(first)?;
            let indexes = match e.o.get_array("indexes") {
                Ok(list) => list.iter().filter_map(|i| i.as_document().cloned()).collect(),
                // mongod's single-index form: the spec's fields beside `createIndexes`.
                Err(_) => {
                    let mut spec = e.o.clone();
                    spec.remove(name);
                    vec![spec]
                }
            };
            keep(ns.clone(), Write::CreateIndexes { ns, indexes })?
        }
        "dropIndexes" | "deleteIndexes" => {
            let ns = coll(first)?;
            let index = e.o.get("index").cloned().ok_or_else(|| bad("dropIndexes without `index`".into()))?;
            keep(ns.clone(), Write::DropIndexes { ns, index })?
        }
        "collMod" => {
            let ns = coll(first)?;
            keep(ns.clone(), Write::CollMod { ns, command: e.o.clone() })?
        }
        // Two-phase index builds: the index exists once committed (commitIndexBuild above).
        "startIndexBuild" | "abortIndexBuild" => Vec::new(),
        "applyOps" => {
            let mut out = Vec::new();
            for inner in apply_ops_entries(e)? {
                out.extend(translate(&inner)?);
            }
            out
        }
        other => {
            return Err(TranslateError::Unsupported { ts: e.ts_text(), ns: e.ns.clone(), command: other.to_string() })
        }
    })
}

/// The operations inside an `applyOps` entry, as entries of their own (with the outer `ts`).
fn apply_ops_entries(e: &Entry) -> Result<Vec<Entry>, TranslateError> {
    let bad = |what: String| TranslateError::Malformed { ts: e.ts_text(), what };
    let ops = e.o.get_array("applyOps").map_err(|_| bad("applyOps is not an array".into()))?;
    let mut out = Vec::new();
    for op in ops {
        let op = op.as_document().ok_or_else(|| bad("applyOps holds a non-document".into()))?;
        let mut d = op.clone();
        d.insert("ts", e.ts.to_bson());
        let mut inner = Entry::from_document(&d)?;
        inner.wall_us = e.wall_us;
        out.push(inner);
    }
    Ok(out)
}

/// Writes applied together: one entry, or one whole transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The `ts` of the entry that ends the group (a transaction's commit).
    pub ts: Ts,
    /// That entry's time ([`Entry::time_us`]), µs since the Unix epoch: what a time target is
    /// compared with.
    pub time_us: i64,
    /// The writes, in order.
    pub writes: Vec<Write>,
    /// Oplog entries the group stands for.
    pub entries: usize,
    /// Whether the group is a transaction rather than a single entry (counted in the restore's
    /// report).
    pub transaction: bool,
}

/// Groups entries, in oplog order, into what is applied together.
#[derive(Debug, Default)]
pub struct Grouper {
    /// A SecantusDB transaction being collected: its entries share one `ts` and one txn.
    open: Option<(Vec<u8>, i64, Group)>,
    /// mongod `partialTxn` chains, by transaction.
    partial: HashMap<(Vec<u8>, i64), Group>,
}

fn flag(o: &Document, k: &str) -> bool {
    o.get_bool(k).unwrap_or(false)
}

impl Grouper {
    /// A grouper with nothing open.
    pub fn new() -> Grouper {
        Grouper::default()
    }

    /// Feeds the next entry; returns the groups it completes. On failure the groups it closed
    /// before failing are lost: callers that go on past a failure use [`Grouper::push_into`].
    pub fn push(&mut self, e: &Entry) -> Result<Vec<Group>, TranslateError> {
        let mut out = Vec::new();
        self.push_into(e, &mut out)?;
        Ok(out)
    }

    /// Feeds the next entry and appends the groups it completes to `out`, also when it then
    /// fails on the entry itself: a group it closed (a SecantusDB transaction ended by this
    /// entry) is complete and stays valid whatever becomes of the entry.
    pub fn push_into(&mut self, e: &Entry, out: &mut Vec<Group>) -> Result<(), TranslateError> {
        let secantus_txn = e.txn.clone().filter(|_| matches!(e.op.as_str(), "i" | "u" | "d"));
        if let Some((lsid, n)) = &secantus_txn {
            if let Some((open_lsid, open_n, group)) = &mut self.open {
                if open_lsid == lsid && open_n == n && group.ts == e.ts {
                    group.writes.extend(translate(e)?);
                    group.entries += 1;
                    return Ok(());
                }
            }
            out.extend(self.close_open());
            let group = Group { ts: e.ts, time_us: e.time_us(), writes: translate(e)?, entries: 1, transaction: true };
            self.open = Some((lsid.clone(), *n, group));
            return Ok(());
        }
        out.extend(self.close_open());
        if e.op == "c" {
            let key = e.txn.clone();
            if e.o.contains_key("applyOps") {
                let writes = translate(e)?;
                let mut group = match key.as_ref().and_then(|k| self.partial.remove(k)) {
                    Some(mut g) => {
                        g.writes.extend(writes);
                        g.entries += 1;
                        g
                    }
                    None => Group { ts: e.ts, time_us: e.time_us(), writes, entries: 1, transaction: true },
                };
                group.ts = e.ts;
                group.time_us = e.time_us();
                if flag(&e.o, "partialTxn") || flag(&e.o, "prepare") {
                    let key = key.ok_or_else(|| TranslateError::Malformed {
                        ts: e.ts.to_string(),
                        what: "partial applyOps without lsid/txnNumber".into(),
                    })?;
                    self.partial.insert(key, group);
                } else {
                    out.push(group);
                }
                return Ok(());
            }
            if e.o.contains_key("commitTransaction") {
                if let Some(mut g) = key.and_then(|k| self.partial.remove(&k)) {
                    g.ts = e.ts;
                    g.time_us = e.time_us();
                    g.entries += 1;
                    out.push(g);
                }
                return Ok(());
            }
            if e.o.contains_key("abortTransaction") {
                if let Some(k) = key {
                    self.partial.remove(&k);
                }
                return Ok(());
            }
        }
        out.push(Group { ts: e.ts, time_us: e.time_us(), writes: translate(e)?, entries: 1, transaction: false });
        Ok(())
    }

    fn close_open(&mut self) -> Option<Group> {
        self.open.take().map(|(_, _, g)| g)
    }

    /// At the end of the entries to apply: the SecantusDB transaction still open (complete: the
    /// tailer archives a transaction's entries together). Unfinished mongod chains are dropped —
    /// their commit is beyond the target — and counted.
    pub fn finish(&mut self) -> (Option<Group>, usize) {
        let dropped = self.partial.len();
        self.partial.clear();
        (self.close_open(), dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{spec::BinarySubtype, Binary, Timestamp};

    fn entry(d: Document) -> Entry {
        Entry::from_document(&d).unwrap()
    }

    fn ns() -> Ns {
        Ns { db: "shop".into(), coll: "items".into() }
    }

    fn lsid(b: u8) -> Document {
        doc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: vec![b; 16] } }
    }

    #[test]
    fn inserts_replace_by_id_and_deletes_delete_by_id() {
        let i = entry(
            doc! { "op": "i", "ns": "shop.items", "ts": Timestamp { time: 5, increment: 1 }, "o": { "_id": 1, "a": 1 } },
        );
        assert_eq!(
            translate(&i).unwrap(),
            vec![Write::Upsert { ns: ns(), filter: doc! { "_id": 1 }, doc: doc! { "_id": 1, "a": 1 } }]
        );
        let d =
            entry(doc! { "op": "d", "ns": "shop.items", "ts": Timestamp { time: 5, increment: 2 }, "o": { "_id": 1 } });
        assert_eq!(translate(&d).unwrap(), vec![Write::Delete { ns: ns(), filter: doc! { "_id": 1 } }]);
    }

    #[test]
    fn noops_and_system_namespaces_are_skipped() {
        for d in [
            doc! { "op": "n", "ns": "", "ts": Timestamp { time: 1, increment: 1 }, "o": { "msg": "initiating set" } },
            doc! { "op": "i", "ns": "admin.system.users", "ts": Timestamp { time: 1, increment: 2 }, "o": { "_id": 1 } },
            doc! { "op": "i", "ns": "config.transactions", "ts": Timestamp { time: 1, increment: 3 }, "o": { "_id": 1 } },
            doc! { "op": "i", "ns": "shop.system.views", "ts": Timestamp { time: 1, increment: 4 }, "o": { "_id": 1 } },
            doc! { "op": "c", "ns": "admin.$cmd", "ts": Timestamp { time: 1, increment: 5 }, "o": { "create": "x" } },
        ] {
            assert_eq!(translate(&entry(d)).unwrap(), vec![]);
        }
    }

    #[test]
    fn time_series_buckets_and_stored_javascript_are_refused_not_skipped() {
        for d in [
            doc! { "op": "i", "ns": "m.system.buckets.weather", "ts": Timestamp { time: 1, increment: 1 }, "o": { "_id": 1 } },
            doc! { "op": "u", "ns": "m.system.buckets.weather", "ts": Timestamp { time: 1, increment: 2 },
            "o": { "$v": 2, "diff": {} }, "o2": { "_id": 1 } },
            doc! { "op": "c", "ns": "m.$cmd", "ts": Timestamp { time: 1, increment: 3 },
            "o": { "create": "system.buckets.weather", "timeseries": { "timeField": "t" } } },
            doc! { "op": "i", "ns": "m.system.js", "ts": Timestamp { time: 1, increment: 4 }, "o": { "_id": "f" } },
        ] {
            let err = translate(&entry(d.clone())).unwrap_err();
            assert!(matches!(err, TranslateError::Unsupported { .. }), "{d}: {err}");
        }
    }

    #[test]
    fn secantus_diff_layout() {
        // As SecantusDB wrote it for {$set: {a: 5, "sub.y": 2}, $unset: {b: 1}} (probed here).
        let e = entry(doc! {
            "op": "u", "ns": "shop.items", "ts": Timestamp { time: 5, increment: 3 },
            "o": { "$v": 2, "diff": { "updatedFields": { "a": 5, "sub.y": 2 }, "removedFields": ["b"],
                   "truncatedArrays": [{ "field": "arr", "newSize": 2 }] } },
            "o2": { "_id": 1 },
        });
        assert_eq!(
            translate(&e).unwrap(),
            vec![
                Write::Update {
                    ns: ns(),
                    filter: doc! { "_id": 1 },
                    update: doc! { "$push": { "arr": { "$each": [], "$slice": 2_i64 } } }
                },
                Write::Update {
                    ns: ns(),
                    filter: doc! { "_id": 1 },
                    update: doc! { "$set": { "a": 5, "sub.y": 2 }, "$unset": { "b": "" } }
                },
            ]
        );
    }

    #[test]
    fn mongod_diff_layout() {
        // mongod 5+: u/i/d at each level, s<field> sub-diffs, arrays with a: true, l, u<index>.
        let e = entry(doc! {
            "op": "u", "ns": "shop.items", "ts": Timestamp { time: 5, increment: 4 },
            "o": { "$v": 2, "diff": {
                "d": { "old": false },
                "u": { "a": 6 },
                "i": { "new": "x" },
                "ssub": { "u": { "y": 3 }, "sdeep": { "d": { "z": false } } },
                "sarr": { "a": true, "l": 3, "u2": 30, "s0": { "u": { "k": 1 } } },
            } },
            "o2": { "_id": 7 },
        });
        let filter = doc! { "_id": 7 };
        assert_eq!(
            translate(&e).unwrap(),
            vec![
                Write::Update {
                    ns: ns(),
                    filter: filter.clone(),
                    update: doc! { "$push": { "arr": { "$each": [], "$slice": 3_i64 } } }
                },
                Write::Update {
                    ns: ns(),
                    filter,
                    update: doc! {
                        "$set": { "a": 6, "new": "x", "sub.y": 3, "arr.2": 30, "arr.0.k": 1 },
                        "$unset": { "old": "", "sub.deep.z": "" },
                    }
                },
            ]
        );
    }

    #[test]
    fn replacements_and_v1_updates() {
        let r = entry(doc! { "op": "u", "ns": "shop.items", "ts": Timestamp { time: 5, increment: 5 },
        "o": { "_id": 2, "z": 9 }, "o2": { "_id": 2 } });
        assert_eq!(
            translate(&r).unwrap(),
            vec![Write::Upsert { ns: ns(), filter: doc! { "_id": 2 }, doc: doc! { "_id": 2, "z": 9 } }]
        );
        let v1 = entry(doc! { "op": "u", "ns": "shop.items", "ts": Timestamp { time: 5, increment: 6 },
        "o": { "$v": 1, "$set": { "a": 1 } }, "o2": { "_id": 2 } });
        assert_eq!(
            translate(&v1).unwrap(),
            vec![Write::Update { ns: ns(), filter: doc! { "_id": 2 }, update: doc! { "$set": { "a": 1 } } }]
        );
        let bad = entry(doc! { "op": "u", "ns": "shop.items", "ts": Timestamp { time: 5, increment: 7 },
        "o": { "$v": 2, "diff": { "q": 1 } }, "o2": { "_id": 2 } });
        assert!(translate(&bad).unwrap_err().to_string().contains("unknown diff field \"q\""));
    }

    #[test]
    fn ddl_commands() {
        let c = |o: Document| {
            entry(doc! { "op": "c", "ns": "shop.$cmd", "ts": Timestamp { time: 6, increment: 1 }, "o": o })
        };
        assert_eq!(
            translate(&c(doc! { "create": "capped", "capped": true, "size": 100000, "idIndex": { "v": 2, "key": { "_id": 1 }, "name": "_id_" } })).unwrap(),
            vec![Write::Create { ns: Ns { db: "shop".into(), coll: "capped".into() }, options: doc! { "capped": true, "size": 100000 } }]
        );
        assert_eq!(
            translate(&c(doc! { "createIndexes": "items", "indexes": [{ "v": 2, "key": { "a": 1 }, "name": "a_1" }] }))
                .unwrap(),
            vec![Write::CreateIndexes { ns: ns(), indexes: vec![doc! { "v": 2, "key": { "a": 1 }, "name": "a_1" }] }]
        );
        // mongod's single-index form.
        assert_eq!(
            translate(&c(
                doc! { "createIndexes": "items", "v": 2, "key": { "b": -1 }, "name": "b_-1", "unique": true }
            ))
            .unwrap(),
            vec![Write::CreateIndexes {
                ns: ns(),
                indexes: vec![doc! { "v": 2, "key": { "b": -1 }, "name": "b_-1", "unique": true }]
            }]
        );
        assert_eq!(
            translate(&c(doc! { "dropIndexes": "items", "index": "a_1" })).unwrap(),
            vec![Write::DropIndexes { ns: ns(), index: Bson::String("a_1".into()) }]
        );
        assert_eq!(
            translate(&c(doc! { "renameCollection": "shop.other", "to": "shop.other2", "dropTarget": false })).unwrap(),
            vec![Write::Rename {
                from: Ns { db: "shop".into(), coll: "other".into() },
                to: Ns { db: "shop".into(), coll: "other2".into() },
                drop_target: false
            }]
        );
        assert_eq!(translate(&c(doc! { "drop": "items" })).unwrap(), vec![Write::Drop { ns: ns() }]);
        assert_eq!(translate(&c(doc! { "dropDatabase": 1 })).unwrap(), vec![Write::DropDatabase { db: "shop".into() }]);
        assert_eq!(translate(&c(doc! { "startIndexBuild": "items", "indexes": [] })).unwrap(), vec![]);
        let err = translate(&c(doc! { "convertToCapped": "items", "size": 1 })).unwrap_err();
        assert!(err.to_string().contains("\"convertToCapped\" on shop.$cmd is not supported"), "{err}");
    }

    #[test]
    fn secantus_transactions_share_one_ts_and_group() {
        let t = Timestamp { time: 9, increment: 16 };
        let es = [
            doc! { "op": "i", "ns": "shop.items", "ts": Timestamp { time: 9, increment: 15 }, "o": { "_id": 0 } },
            doc! { "op": "i", "ns": "shop.items", "ts": t, "o": { "_id": 10 }, "lsid": lsid(1), "txnNumber": 7_i64 },
            doc! { "op": "u", "ns": "shop.items", "ts": t, "o": { "$v": 2, "diff": { "updatedFields": { "a": 6 }, "removedFields": [], "truncatedArrays": [] } }, "o2": { "_id": 1 }, "lsid": lsid(1), "txnNumber": 7_i64 },
            doc! { "op": "i", "ns": "shop.other", "ts": t, "o": { "_id": "o" }, "lsid": lsid(1), "txnNumber": 7_i64 },
            doc! { "op": "d", "ns": "shop.items", "ts": Timestamp { time: 9, increment: 20 }, "o": { "_id": 0 } },
        ];
        let mut g = Grouper::new();
        let mut groups = Vec::new();
        for d in es {
            groups.extend(g.push(&entry(d)).unwrap());
        }
        assert_eq!(g.finish(), (None, 0));
        let shape: Vec<_> = groups.iter().map(|g| (g.ts.inc, g.entries, g.writes.len(), g.transaction)).collect();
        assert_eq!(shape, vec![(15, 1, 1, false), (16, 3, 3, true), (20, 1, 1, false)]);
    }

    #[test]
    fn a_failing_entry_still_hands_over_the_transaction_it_closed() {
        let t = Timestamp { time: 9, increment: 16 };
        let txn = |id: i32| {
            entry(
                doc! { "op": "i", "ns": "shop.items", "ts": t, "o": { "_id": id }, "lsid": lsid(1), "txnNumber": 7_i64 },
            )
        };
        let mut g = Grouper::new();
        let mut out = Vec::new();
        g.push_into(&txn(1), &mut out).unwrap();
        g.push_into(&txn(2), &mut out).unwrap();
        assert!(out.is_empty());
        let unknown =
            entry(doc! { "op": "x", "ns": "shop.items", "ts": Timestamp { time: 9, increment: 17 }, "o": {} });
        let err = g.push_into(&unknown, &mut out).unwrap_err();
        assert!(err.to_string().contains("unknown op \"x\""), "{err}");
        let shape: Vec<_> = out.iter().map(|g| (g.ts.inc, g.entries, g.writes.len(), g.transaction)).collect();
        assert_eq!(shape, vec![(16, 2, 2, true)]);
        assert_eq!(g.finish(), (None, 0));
    }

    #[test]
    fn mongod_apply_ops_transactions() {
        // The documented mongod form: one applyOps command entry with lsid and txnNumber.
        let commit = doc! {
            "op": "c", "ns": "admin.$cmd", "ts": Timestamp { time: 10, increment: 1 }, "lsid": lsid(2), "txnNumber": 1_i64,
            "o": { "applyOps": [
                { "op": "i", "ns": "shop.items", "ui": Binary { subtype: BinarySubtype::Uuid, bytes: vec![0; 16] }, "o": { "_id": 1 } },
                { "op": "u", "ns": "shop.items", "o": { "$v": 2, "diff": { "u": { "a": 2 } } }, "o2": { "_id": 3 } },
                { "op": "d", "ns": "shop.items", "o": { "_id": 4 } },
            ] },
        };
        let mut g = Grouper::new();
        let groups = g.push(&entry(commit)).unwrap();
        assert_eq!(groups.len(), 1);
        assert!(groups[0].transaction);
        assert_eq!(groups[0].writes.len(), 3);
        assert!(matches!(&groups[0].writes[2], Write::Delete { filter, .. } if filter == &doc! { "_id": 4 }));

        // A large transaction: partialTxn entries, then the final applyOps; one group at the end.
        let part = |inc: u32, id: i32, partial: bool| {
            let mut o = doc! { "applyOps": [{ "op": "i", "ns": "shop.items", "o": { "_id": id } }] };
            if partial {
                o.insert("partialTxn", true);
            }
            entry(
                doc! { "op": "c", "ns": "admin.$cmd", "ts": Timestamp { time: 11, increment: inc }, "lsid": lsid(3), "txnNumber": 2_i64, "o": o },
            )
        };
        assert_eq!(g.push(&part(1, 1, true)).unwrap(), vec![]);
        assert_eq!(g.push(&part(2, 2, true)).unwrap(), vec![]);
        let done = g.push(&part(3, 3, false)).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].ts.inc, done[0].entries, done[0].writes.len()), (3, 3, 3));

        // A chain whose end is beyond the target is not applied at all.
        assert_eq!(g.push(&part(4, 4, true)).unwrap(), vec![]);
        assert_eq!(g.finish(), (None, 1));

        // Prepared: applyOps with prepare, then commitTransaction; abortTransaction discards.
        let prepared = entry(
            doc! { "op": "c", "ns": "admin.$cmd", "ts": Timestamp { time: 12, increment: 1 }, "lsid": lsid(4), "txnNumber": 3_i64,
            "o": { "applyOps": [{ "op": "i", "ns": "shop.items", "o": { "_id": 5 } }], "prepare": true } },
        );
        let commit = entry(
            doc! { "op": "c", "ns": "admin.$cmd", "ts": Timestamp { time: 12, increment: 2 }, "lsid": lsid(4), "txnNumber": 3_i64,
            "o": { "commitTransaction": 1, "commitTimestamp": Timestamp { time: 12, increment: 1 } } },
        );
        assert_eq!(g.push(&prepared).unwrap(), vec![]);
        let done = g.push(&commit).unwrap();
        assert_eq!((done.len(), done[0].ts.inc), (1, 2));
    }
}
