//! `pitr find --source mongo`: drops, renames and large deletes in the archived oplog, each with
//! the last restore target before it.
//!
//! [`Finder`] is pure: it takes the oplog as [`Group`]s (what restore applies together: one
//! entry, or one whole transaction) in oplog order and yields [`Event`]s. `drop`, `dropDatabase`
//! and `renameCollection` are events of their own (destructive, a rename only when it replaced
//! a collection); deletes and updates of one collection are summed per transaction, or, outside
//! transactions, per run of entries within one second of `ts` (a `deleteMany` writes one `d`
//! entry per document), destructive from `min_rows` documents. [`scan`] reads the slices of the
//! archive into it (the I/O edge). MongoDB names its namespaces itself: no catalog is needed.

use std::collections::BTreeMap;

use pitr_archive::Repository;
use serde::Serialize;

use crate::apply::{Group, Grouper, Write};
use crate::layout::{slice_entries, MongoCatalog};
use crate::ts::Ts;
use crate::MongoError;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    /// `drop` of the collection.
    Drop,
    /// `dropDatabase` of its database.
    DropDatabase,
    /// `renameCollection` from or to it.
    RenameCollection,
    /// Documents deleted.
    Delete,
    /// Documents updated with update operators (replacements are replayed as upserts, which
    /// look like inserts here, and are not counted).
    Update,
}

impl Kind {
    /// Parses `--op`: drop, dropDatabase, rename, delete (or deleteMany), update.
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s.to_ascii_lowercase().as_str() {
            "drop" => Kind::Drop,
            "dropdatabase" => Kind::DropDatabase,
            "rename" | "renamecollection" => Kind::RenameCollection,
            "delete" | "deletemany" => Kind::Delete,
            "update" | "updatemany" => Kind::Update,
            _ => return None,
        })
    }
}

/// One thing `find` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// What happened.
    pub kind: Kind,
    /// The collection (`db.coll`; for `dropDatabase` the database's name; for a rename its
    /// source), and for a rename the target.
    pub ns: String,
    /// A rename's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Documents deleted or updated (1 for commands).
    pub count: u64,
    /// The oplog `ts` of the first entry (`ts:SECONDS:INC`).
    pub first_ts: String,
    /// The `ts` of the last entry.
    pub last_ts: String,
    /// Wall time of the first entry, µs since the Unix epoch.
    pub time_us: i64,
    /// Part of a multi-document transaction.
    pub transaction: bool,
    /// Drops, replacing renames, and deletes/updates of at least `min_rows` documents.
    pub destructive: bool,
    /// The restore target just before it (`ts:S:I`, inclusive as MongoDB targets are).
    pub safe_target: String,
    #[serde(skip)]
    first: Ts,
}

/// The `ts` just before `t` (restoring to it applies every entry before `t` and none after).
pub fn before(t: Ts) -> Ts {
    t.pred()
}

/// Where in the oplog an event lies.
#[derive(Clone, Copy)]
struct Span {
    first: Ts,
    last: Ts,
    time_us: i64,
    transaction: bool,
}

impl Span {
    fn of(g: &Group) -> Span {
        Span { first: g.ts, last: g.ts, time_us: g.time_us, transaction: g.transaction }
    }
}

struct Run {
    key: (bool, u64),
    count: u64,
    first: Ts,
    last: Ts,
    time_us: i64,
}

/// Turns groups into events (see the module's doc).
pub struct Finder {
    min_rows: u64,
    runs: BTreeMap<(String, bool), Run>,
    events: Vec<Event>,
}

impl Finder {
    /// Deletes/updates are destructive from `min_rows` documents.
    pub fn new(min_rows: u64) -> Finder {
        Finder { min_rows, runs: BTreeMap::new(), events: Vec::new() }
    }

    fn event(kind: Kind, ns: String, to: Option<String>, count: u64, span: Span, destructive: bool) -> Event {
        Event {
            kind,
            ns,
            to,
            count,
            first_ts: span.first.to_string(),
            last_ts: span.last.to_string(),
            time_us: span.time_us,
            transaction: span.transaction,
            destructive,
            safe_target: before(span.first).to_string(),
            first: span.first,
        }
    }

    fn flush(&mut self, ns: &str, delete: bool) {
        if let Some(run) = self.runs.remove(&(ns.to_string(), delete)) {
            let kind = if delete { Kind::Delete } else { Kind::Update };
            let destructive = run.count >= self.min_rows;
            let e = Finder::event(
                kind,
                ns.to_string(),
                None,
                run.count,
                Span { first: run.first, last: run.last, time_us: run.time_us, transaction: run.key.0 },
                destructive,
            );
            self.events.push(e);
        }
    }

    fn count(&mut self, ns: String, delete: bool, g: &Group) {
        // Per transaction (its commit ts), else per second of ts.
        let key = if g.transaction {
            (true, (u64::from(g.ts.secs) << 32) | u64::from(g.ts.inc))
        } else {
            (false, u64::from(g.ts.secs))
        };
        if self.runs.get(&(ns.clone(), delete)).is_some_and(|r| r.key != key) {
            self.flush(&ns, delete);
        }
        let run =
            self.runs.entry((ns, delete)).or_insert(Run { key, count: 0, first: g.ts, last: g.ts, time_us: g.time_us });
        run.count += 1;
        run.last = g.ts;
    }

    /// One group, in oplog order. A mongod transaction's entries come before its commit, but
    /// restore applies it at the commit, so the group's own `ts` is what a target before it must
    /// stay under.
    pub fn push(&mut self, g: &Group) {
        for w in &g.writes {
            match w {
                Write::Delete { ns, .. } => self.count(ns.to_string(), true, g),
                Write::Update { ns, .. } => self.count(ns.to_string(), false, g),
                Write::Drop { ns } => {
                    self.flush(&ns.to_string(), true);
                    self.flush(&ns.to_string(), false);
                    let e = Finder::event(Kind::Drop, ns.to_string(), None, 1, Span::of(g), true);
                    self.events.push(e);
                }
                Write::DropDatabase { db } => {
                    let e = Finder::event(Kind::DropDatabase, db.clone(), None, 1, Span::of(g), true);
                    self.events.push(e);
                }
                Write::Rename { from, to, drop_target } => {
                    let e = Finder::event(
                        Kind::RenameCollection,
                        from.to_string(),
                        Some(to.to_string()),
                        1,
                        Span::of(g),
                        *drop_target,
                    );
                    self.events.push(e);
                }
                _ => {}
            }
        }
    }

    /// Every event, oldest first.
    pub fn finish(mut self) -> Vec<Event> {
        let open: Vec<(String, bool)> = self.runs.keys().cloned().collect();
        for (ns, delete) in open {
            self.flush(&ns, delete);
        }
        let mut events = self.events;
        events.sort_by_key(|e| e.first);
        events
    }
}

/// Whether `event` concerns collection `ns` (`db.coll`): its own, its database's drop, or a
/// rename from or to it.
pub fn concerns(event: &Event, ns: &str) -> bool {
    match event.kind {
        Kind::DropDatabase => ns.split_once('.').is_some_and(|(db, _)| db == event.ns),
        _ => event.ns == ns || event.to.as_deref() == Some(ns),
    }
}

/// Reads every archived slice of `catalog` (oldest run first) into a [`Finder`]. A slice that
/// does not open or parse is the error, naming it.
pub async fn scan(repo: &Repository, catalog: &MongoCatalog, min_rows: u64) -> Result<Vec<Event>, MongoError> {
    let mut finder = Finder::new(min_rows);
    for run in &catalog.runs {
        let mut grouper = Grouper::new();
        for name in &run.slices {
            for e in slice_entries(repo, name).await? {
                for g in grouper.push(&e)? {
                    finder.push(&g);
                }
            }
        }
        if let (Some(g), _) = grouper.finish() {
            finder.push(&g);
        }
    }
    Ok(finder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::Entry;
    use bson::{doc, Bson, Document};

    fn entry(secs: u32, inc: u32, op: &str, ns: &str, o: Document) -> Entry {
        Entry {
            ts: Ts { secs, inc },
            wall_us: Some(i64::from(secs) * 1_000_000),
            op: op.into(),
            ns: ns.into(),
            o,
            o2: None,
            txn: None,
        }
    }

    fn events(entries: &[Entry], min_rows: u64) -> Vec<Event> {
        let mut grouper = Grouper::new();
        let mut finder = Finder::new(min_rows);
        for e in entries {
            for g in grouper.push(e).unwrap() {
                finder.push(&g);
            }
        }
        if let (Some(g), _) = grouper.finish() {
            finder.push(&g);
        }
        finder.finish()
    }

    #[test]
    fn drops_renames_and_delete_many_are_found_with_the_ts_before() {
        let mut oplog = vec![entry(100, 1, "i", "shop.items", doc! { "_id": 1 })];
        // A deleteMany of 1500 documents within two seconds, another collection's delete between.
        for i in 0..1500u32 {
            oplog.push(entry(200 + i / 1000, 1 + i % 1000, "d", "shop.items", doc! { "_id": Bson::Int64(i.into()) }));
        }
        oplog.push(entry(202, 1, "d", "shop.orders", doc! { "_id": 1 }));
        oplog.push(entry(300, 5, "c", "shop.$cmd", doc! { "drop": "items" }));
        oplog.push(entry(
            301,
            1,
            "c",
            "shop.$cmd",
            doc! { "renameCollection": "shop.a", "to": "shop.b", "dropTarget": true },
        ));
        oplog.push(entry(302, 0, "c", "shop.$cmd", doc! { "dropDatabase": 1 }));
        let found = events(&oplog, 1000);
        let kinds: Vec<(Kind, &str, u64, bool)> =
            found.iter().map(|e| (e.kind, e.ns.as_str(), e.count, e.destructive)).collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::Delete, "shop.items", 1000, true),
                (Kind::Delete, "shop.items", 500, false),
                (Kind::Delete, "shop.orders", 1, false),
                (Kind::Drop, "shop.items", 1, true),
                (Kind::RenameCollection, "shop.a", 1, true),
                (Kind::DropDatabase, "shop", 1, true),
            ]
        );
        assert_eq!(found[0].safe_target, "ts:200:0");
        assert_eq!(found[3].safe_target, "ts:300:4");
        assert_eq!(found[3].first_ts, "ts:300:5");
        assert!(concerns(&found[5], "shop.items"), "dropDatabase concerns its collections");
        assert!(concerns(&found[4], "shop.b") && !concerns(&found[4], "shop.c"));
        assert_eq!(Kind::parse("deleteMany"), Some(Kind::Delete));
        assert_eq!(before(Ts { secs: 5, inc: 3 }), Ts { secs: 5, inc: 2 });
    }
}
