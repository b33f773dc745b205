//! What `pitr find` says about committed transactions: names for the relfilenodes a commit
//! entry of the change index lists (through catalog snapshots), whether a dropped relfilenode
//! was a DROP, a TRUNCATE or a rewrite, the destructive rule, matching a table and an operation,
//! and the last safe recovery target before a commit.
//!
//! Pure: the commit entries ([`pitr_pgformat::changes::CommitEntry`]) and snapshots
//! ([`pitr_archive::catalog::Snapshots`]) are read by the caller; this module reads nothing and
//! prints nothing.

use pitr_archive::catalog::{CatalogRelation, Snapshots};
use pitr_pgformat::changes::{CommitEntry, RelFileLocator};
use pitr_pgformat::lsn::format_lsn;
use serde::Serialize;

/// `pg_class`'s relfilenode in a fresh cluster (a mapped catalog: it can change after a VACUUM
/// FULL of pg_class, then this fallback says "unknown").
const PG_CLASS_RELFILENODE: u32 = 1259;

/// When a DELETE or UPDATE is destructive (`[find]`).
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// From this many rows deleted + updated …
    pub min_rows: u64,
    /// … and this fraction of the table's estimated rows, whichever is larger.
    pub destructive_fraction: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules { min_rows: 1000, destructive_fraction: 0.1 }
    }
}

/// What became of a relfilenode dropped at commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dropped {
    /// The relation is gone (DROP TABLE, DROP SCHEMA … CASCADE, …).
    Drop,
    /// The relation lives on under new, empty storage (TRUNCATE).
    Truncate,
    /// The relation lives on under new storage with its rows (VACUUM FULL, CLUSTER, a rewriting
    /// ALTER TABLE): not destructive.
    Rewrite,
    /// No catalog snapshot after the commit tells which (the sidecar takes one soon after DDL).
    Unknown,
    /// The relation lives on under new storage, but nothing shows its rows survived: a TRUNCATE
    /// (then loaded again), or a rewrite that re-inserts its rows (`ALTER TABLE … TYPE`), or a
    /// rewrite whose estimate a later analyze, vacuum or second rewrite replaced before the
    /// snapshot was taken. Destructive: calling a TRUNCATE harmless is the worse mistake.
    TruncateOrRewrite,
}

/// What one commit did to one relation.
#[derive(Debug, Clone, Serialize)]
pub struct Touch {
    /// The database's OID.
    pub db_oid: u32,
    /// The tablespace's OID.
    pub spc_oid: u32,
    /// The relfilenode the WAL names.
    pub relfilenode: u32,
    /// The database's name, if a snapshot names the relation.
    pub database: Option<String>,
    /// `schema.name`, if a snapshot names the relation.
    pub table: Option<String>,
    /// `pg_class.oid`, if known.
    #[serde(skip)]
    pub oid: Option<u32>,
    /// Rows inserted.
    pub inserted: u64,
    /// Rows updated.
    pub updated: u64,
    /// Rows deleted.
    pub deleted: u64,
    /// The storage was dropped at commit, and what that was.
    pub dropped: Option<Dropped>,
    /// The table's estimated rows before the commit (from the snapshot that named it).
    pub reltuples: Option<f64>,
    /// Whether this touch is destructive by [`Rules`].
    pub destructive: bool,
    /// The touch is of the table's TOAST table (counts are of TOAST chunks, not rows).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub toast: bool,
    /// The partitioned table this is a partition of (`schema.name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_of: Option<String>,
}

impl Touch {
    /// `db:schema.name` or, unnamed, `db/spc/relfilenode (unknown name)`. Control characters in
    /// names (the server's, and any byte but NUL is allowed in a quoted identifier) are escaped,
    /// so that a name cannot rewrite the terminal.
    pub fn shown(&self) -> String {
        let clean = |s: &str| -> String {
            if s.chars().any(char::is_control) {
                s.escape_debug().to_string()
            } else {
                s.to_string()
            }
        };
        match (&self.table, &self.database) {
            (Some(t), Some(d)) if self.toast => format!("{}:{} (TOAST)", clean(d), clean(t)),
            (Some(t), Some(d)) => match &self.partition_of {
                Some(p) => format!("{}:{} (partition of {})", clean(d), clean(t), clean(p)),
                None => format!("{}:{}", clean(d), clean(t)),
            },
            _ => format!("{}/{}/{} (unknown name)", self.db_oid, self.spc_oid, self.relfilenode),
        }
    }

    /// What it did, in words (`deleted 5000, truncate`).
    pub fn what(&self) -> String {
        let mut parts = Vec::new();
        for (n, word) in [(self.inserted, "inserted"), (self.updated, "updated"), (self.deleted, "deleted")] {
            if n > 0 {
                parts.push(format!("{word} {n}"));
            }
        }
        match self.dropped {
            Some(Dropped::Drop) => parts.push("DROP".into()),
            Some(Dropped::Truncate) => parts.push("TRUNCATE".into()),
            Some(Dropped::Rewrite) => parts.push("rewritten".into()),
            Some(Dropped::Unknown) => parts.push("storage dropped (DROP or TRUNCATE)".into()),
            Some(Dropped::TruncateOrRewrite) => parts.push("storage replaced (TRUNCATE, or a rewrite)".into()),
            None => {}
        }
        parts.join(", ")
    }
}

/// One commit as `find` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Commit {
    /// The top-level transaction id.
    pub xid: u32,
    /// Start of the commit record.
    pub commit_lsn: String,
    /// Just past it.
    pub end_lsn: String,
    /// Commit time, µs since the Unix epoch.
    pub time_us: i64,
    /// Commit time as `YYYY-MM-DD HH:MM:SS.ffffff+00`.
    pub time: String,
    /// The relations it touched (system catalogs left out: those are `ddl`).
    pub relations: Vec<Touch>,
    /// It touched more relations than the index keeps.
    pub more_relations: bool,
    /// It changed a system catalog.
    pub ddl: bool,
    /// Its counts may be short (decoding began while it ran).
    pub incomplete: bool,
    /// Any touch is destructive.
    pub destructive: bool,
    /// The last target before it as an xid: `xid:N` with `--exclusive` (the alternative: a
    /// restore to an xid replays from the oldest backup, see [`restore_command`]).
    pub safe_target_xid: String,
    /// The last target before it as an LSN: `lsn:X/Y` (its commit record's start) with
    /// `--exclusive`; the one [`restore_command`] uses.
    pub safe_target_lsn: String,
}

/// Rows of `pg_class` updated and deleted by `entry` in database `db`.
fn pg_class_counts(entry: &CommitEntry, db: u32) -> (u64, u64) {
    entry
        .relations
        .iter()
        .filter(|r| r.rel.db == db && r.rel.rel == PG_CLASS_RELFILENODE)
        .fold((0, 0), |(u, d), r| (u + r.updated, d + r.deleted))
}

/// What became of `loc`, dropped by `entry`, named `named` before. `others` are the other
/// commits known (sorted by commit LSN), to see whether the relation's storage may have been
/// replaced again before the snapshot that tells.
fn classify_drop(
    entry: &CommitEntry,
    loc: RelFileLocator,
    named: Option<&CatalogRelation>,
    snaps: &Snapshots,
    others: &[CommitEntry],
) -> Dropped {
    if let Some(rel) = named {
        if entry.truncated.iter().any(|t| t.db == loc.db && t.oid == rel.oid) {
            return Dropped::Truncate;
        }
        if let Some(after) = snaps.first_after(entry.commit_lsn) {
            // A snapshot taken after the commit still has the relation: same OID, new storage.
            let Some(now) = after.relation_by_oid(loc.db, rel.oid) else {
                return if after.unread_databases.contains(&rel.db_name) { Dropped::Unknown } else { Dropped::Drop };
            };
            // TRUNCATE leaves empty storage with no estimate (-1); VACUUM FULL and CLUSTER set the
            // estimate of the rows they copied, without heap inserts (pages are logged whole).
            if now.reltuples <= 0.0 {
                return Dropped::Truncate;
            }
            // Rows inserted into the new storage by the commit itself: TRUNCATE + load (+ ANALYZE)
            // in one transaction, or an ALTER TABLE rewrite. The estimate proves nothing then.
            let loaded = entry.relations.iter().any(|r| {
                r.inserted > 0 && (r.rel.db, r.rel.spc, r.rel.rel) == (now.db_oid, now.spc_oid, now.relfilenode)
            });
            // The estimate is the commit's only when nothing set it later: no (auto)vacuum or
            // analyze at or after the commit, and no other storage replaced in that database
            // between the commit and the snapshot (a TRUNCATE followed by a VACUUM FULL). The
            // snapshot's catalog query runs after its LSN was read: commits up to the time it
            // was taken count too.
            let analyzed_later = now.stats_us.is_some_and(|s| s >= entry.time_us);
            let from = others.partition_point(|o| o.commit_lsn <= entry.commit_lsn);
            let replaced_again =
                others[from..].iter().take_while(|o| o.commit_lsn < after.lsn || o.time_us <= after.time_us).any(|o| {
                    // A commit that dropped another table's storage (named, another OID) was about
                    // that table: the unnamed storage it dropped too is that table's indexes and
                    // TOAST. One that dropped only unnamed storage (or ours) may have replaced the
                    // storage this commit created. (A TRUNCATE of ours and another together is
                    // still caught when rows were loaded and analyzed: `stats_us`.)
                    let mut dropped = o.dropped.iter().filter(|d| d.db == loc.db && !d.is_catalog()).peekable();
                    dropped.peek().is_some()
                        && dropped
                            .all(|d| snaps.resolve(o.commit_lsn, d.db, d.spc, d.rel).is_none_or(|r| r.oid == rel.oid))
                });
            return if loaded || analyzed_later || replaced_again {
                Dropped::TruncateOrRewrite
            } else {
                Dropped::Rewrite
            };
        }
    }
    // No snapshot after it: pg_class tells whether the relation's row went (DROP) or was updated
    // to point at new storage (TRUNCATE or a rewrite).
    // (A transaction that dropped one table and truncated another shows both as DROP here.)
    match pg_class_counts(entry, loc.db) {
        (_, d) if d > 0 => Dropped::Drop,
        _ => Dropped::Unknown,
    }
}

/// A TOAST table's touch is its table's: dropped where the table has a touch of its own (a DROP
/// or TRUNCATE drops both storages), else shown under the table's name, marked `toast`.
fn fold_toast(relations: &mut Vec<Touch>, snaps: &Snapshots) {
    let parent = |t: &Touch| -> Option<CatalogRelation> {
        let oid: u32 = t.table.as_deref()?.strip_prefix("pg_toast.pg_toast_")?.parse().ok()?;
        snaps.snapshots.iter().rev().find_map(|s| s.relation_by_oid(t.db_oid, oid)).cloned()
    };
    let parents: Vec<Option<CatalogRelation>> = relations.iter().map(parent).collect();
    let mut keep = vec![true; relations.len()];
    for (i, p) in parents.iter().enumerate() {
        let Some(p) = p else { continue };
        if relations.iter().any(|t| t.db_oid == p.db_oid && t.oid == Some(p.oid) && !t.toast) {
            keep[i] = false;
        } else {
            let t = &mut relations[i];
            t.table = Some(p.qualified());
            t.oid = Some(p.oid);
            t.reltuples = Some(p.reltuples);
            t.toast = true;
            t.partition_of = p.partition_of.clone();
        }
    }
    let mut i = 0;
    relations.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

/// `entry` with names, drops classified and the destructive rule applied, knowing no other
/// commits (see [`describe_among`]).
pub fn describe(entry: &CommitEntry, snaps: &Snapshots, rules: Rules) -> Commit {
    describe_among(entry, snaps, rules, &[])
}

/// [`describe`], with the other commits known (`others`, sorted by commit LSN): a relation whose
/// storage another commit replaced before the snapshot that would tell a TRUNCATE from a rewrite
/// is not called a rewrite.
pub fn describe_among(entry: &CommitEntry, snaps: &Snapshots, rules: Rules, others: &[CommitEntry]) -> Commit {
    let mut relations: Vec<Touch> = Vec::new();
    let new_touch = |loc: RelFileLocator, named: Option<&CatalogRelation>| Touch {
        db_oid: loc.db,
        spc_oid: loc.spc,
        relfilenode: loc.rel,
        database: named.map(|r| r.db_name.clone()),
        table: named.map(CatalogRelation::qualified),
        oid: named.map(|r| r.oid),
        inserted: 0,
        updated: 0,
        deleted: 0,
        dropped: None,
        reltuples: named.map(|r| r.reltuples),
        destructive: false,
        toast: false,
        partition_of: named.and_then(|r| r.partition_of.clone()),
    };
    let same = |t: &Touch, loc: RelFileLocator| (t.db_oid, t.spc_oid, t.relfilenode) == (loc.db, loc.spc, loc.rel);
    for r in entry.relations.iter().filter(|r| !r.rel.is_catalog()) {
        let i = match relations.iter().position(|t| same(t, r.rel)) {
            Some(i) => i,
            None => {
                relations.push(new_touch(r.rel, snaps.resolve(entry.commit_lsn, r.rel.db, r.rel.spc, r.rel.rel)));
                relations.len() - 1
            }
        };
        relations[i].inserted += r.inserted;
        relations[i].updated += r.updated;
        relations[i].deleted += r.deleted;
    }
    for &loc in entry.dropped.iter().filter(|l| !l.is_catalog()) {
        let named = snaps.resolve(entry.commit_lsn, loc.db, loc.spc, loc.rel).cloned();
        let kind = classify_drop(entry, loc, named.as_ref(), snaps, others);
        match relations.iter_mut().find(|t| same(t, loc)) {
            Some(t) => t.dropped = Some(kind),
            None => relations.push(Touch { dropped: Some(kind), ..new_touch(loc, named.as_ref()) }),
        }
    }
    fold_toast(&mut relations, snaps);
    for t in &mut relations {
        let threshold = (rules.min_rows as f64).max(rules.destructive_fraction * t.reltuples.unwrap_or(0.0).max(0.0));
        let rows = t.deleted + t.updated;
        t.destructive = matches!(
            t.dropped,
            Some(Dropped::Drop | Dropped::Truncate | Dropped::Unknown | Dropped::TruncateOrRewrite)
        ) || (!t.toast && rows > 0 && rows as f64 >= threshold);
    }
    Commit {
        xid: entry.xid,
        commit_lsn: format_lsn(entry.commit_lsn),
        end_lsn: format_lsn(entry.end_lsn),
        time_us: entry.time_us,
        time: crate::target::format_time(entry.time_us),
        destructive: relations.iter().any(|t| t.destructive),
        relations,
        more_relations: entry.more_relations,
        ddl: entry.ddl,
        incomplete: entry.incomplete,
        safe_target_xid: format!("xid:{}", entry.xid),
        safe_target_lsn: format!("lsn:{}", format_lsn(entry.commit_lsn)),
    }
}

/// A table as `--table` gives it: `SCHEMA.NAME`, or a bare `NAME` in `public`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The name.
    pub name: String,
}

impl TableName {
    /// Parses `SCHEMA.NAME` or `NAME` (then `public`). Names are compared as stored: unquoted
    /// identifiers are stored lower case, so `Orders` finds nothing unless created quoted.
    pub fn parse(s: &str) -> Option<TableName> {
        let (schema, name) = s.split_once('.').unwrap_or(("public", s));
        (!schema.is_empty() && !name.is_empty()).then(|| TableName { schema: schema.into(), name: name.into() })
    }

    /// `schema.name`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// Why a table cannot be looked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// No snapshot names it.
    #[error("no table {table}{in_db} in the catalog snapshots searched ({searched}); \
             a table created and dropped between two snapshots has no name to find it by (try `pitr find --destructive`)")]
    Unknown {
        /// The table asked for.
        table: String,
        /// ` in database D`, when given.
        in_db: String,
        /// [`Snapshots::describe`].
        searched: String,
    },
    /// It exists in several databases.
    #[error("table {table} exists in several databases ({databases}): say which with --database")]
    Ambiguous {
        /// The table asked for.
        table: String,
        /// Where.
        databases: String,
    },
}

/// The database `table` is in: `database` when given (and it is there), else the one database
/// whose snapshots name it.
pub fn table_database(snaps: &Snapshots, table: &TableName, database: Option<&str>) -> Result<String, TableError> {
    let mut dbs: Vec<&str> = snaps
        .snapshots
        .iter()
        .flat_map(|s| &s.relations)
        .filter(|r| r.is_or_partition_of(&table.schema, &table.name))
        .filter(|r| database.is_none_or(|d| d == r.db_name))
        .map(|r| r.db_name.as_str())
        .collect();
    dbs.sort_unstable();
    dbs.dedup();
    match dbs.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(TableError::Unknown {
            table: table.qualified(),
            in_db: database.map(|d| format!(" in database {d}")).unwrap_or_default(),
            searched: snaps.describe(),
        }),
        many => Err(TableError::Ambiguous { table: table.qualified(), databases: many.join(", ") }),
    }
}

/// The OIDs `table` has had in `database` (a dropped and re-created table has several), so that
/// its TOAST table (`pg_toast.pg_toast_<oid>`) counts as the table.
fn table_oids(snaps: &Snapshots, table: &TableName, database: &str) -> Vec<u32> {
    let mut oids: Vec<u32> = snaps
        .snapshots
        .iter()
        .flat_map(|s| &s.relations)
        .filter(|r| r.db_name == database && r.is_or_partition_of(&table.schema, &table.name))
        .map(|r| r.oid)
        .collect();
    oids.sort_unstable();
    oids.dedup();
    oids
}

/// An operation `--op` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A DROP of the table.
    Drop,
    /// A TRUNCATE of the table.
    Truncate,
    /// Rows deleted.
    Delete,
    /// Rows updated.
    Update,
    /// Rows inserted.
    Insert,
    /// A commit that changed the catalogs (and, with `--table`, touched the table).
    Ddl,
}

impl Op {
    /// Parses `drop|truncate|delete|update|insert|ddl`.
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s.to_ascii_lowercase().as_str() {
            "drop" => Op::Drop,
            "truncate" => Op::Truncate,
            "delete" => Op::Delete,
            "update" => Op::Update,
            "insert" => Op::Insert,
            "ddl" => Op::Ddl,
            _ => return None,
        })
    }

    fn matches(self, commit: &Commit, t: &Touch) -> bool {
        match self {
            Op::Drop => t.dropped == Some(Dropped::Drop) || t.dropped == Some(Dropped::Unknown),
            Op::Truncate => {
                matches!(t.dropped, Some(Dropped::Truncate | Dropped::Unknown | Dropped::TruncateOrRewrite))
            }
            Op::Delete => t.deleted > 0,
            Op::Update => t.updated > 0,
            Op::Insert => t.inserted > 0,
            Op::Ddl => commit.ddl,
        }
    }
}

/// What a query asks for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// `--table` and the database it was found in.
    pub table: Option<(TableName, String)>,
    /// `--op`.
    pub op: Option<Op>,
    /// `--destructive`.
    pub destructive_only: bool,
    /// `--since`, µs.
    pub since_us: Option<i64>,
    /// `--until`, µs.
    pub until_us: Option<i64>,
    /// The names of the table's TOAST tables (`pg_toast.pg_toast_<oid>`), once worked out by
    /// [`Query::prepare`] (else for every commit: that scans every snapshot).
    pub table_toast: Option<Vec<String>>,
}

impl Query {
    /// Works out what [`select`] needs for every commit once.
    pub fn prepare(mut self, snaps: &Snapshots) -> Query {
        if let Some((table, db)) = &self.table {
            self.table_toast = Some(toast_names(snaps, table, db));
        }
        self
    }
}

fn toast_names(snaps: &Snapshots, table: &TableName, db: &str) -> Vec<String> {
    table_oids(snaps, table, db).iter().map(|o| format!("pg_toast.pg_toast_{o}")).collect()
}

/// Whether `commit` is one `query` asks for. With a table, only the touches of that table (its
/// TOAST table included) count, and the others are dropped from the commit shown.
pub fn select(mut commit: Commit, query: &Query, snaps: &Snapshots) -> Option<Commit> {
    if query.since_us.is_some_and(|s| commit.time_us < s) || query.until_us.is_some_and(|u| commit.time_us > u) {
        return None;
    }
    if let Some((table, db)) = &query.table {
        let computed;
        let toast = match &query.table_toast {
            Some(t) => t,
            None => {
                computed = toast_names(snaps, table, db);
                &computed
            }
        };
        let wanted = table.qualified();
        commit.relations.retain(|t| {
            t.database.as_deref() == Some(db.as_str())
                && (t.table.as_deref().is_some_and(|n| n == wanted || toast.iter().any(|x| x == n))
                    || t.partition_of.as_deref() == Some(wanted.as_str()))
        });
        if commit.relations.is_empty() {
            return None;
        }
        commit.destructive = commit.relations.iter().any(|t| t.destructive);
    }
    if query.destructive_only && !commit.destructive {
        return None;
    }
    if let Some(op) = query.op {
        let ddl_anywhere = op == Op::Ddl && query.table.is_none() && commit.ddl;
        if !ddl_anywhere && !commit.relations.iter().any(|t| op.matches(&commit, t)) {
            return None;
        }
    }
    Some(commit)
}

/// The command line that restores to just before `commit`: by its commit LSN, which lets the
/// restore start from the newest backup before it. An xid names no place in the WAL, so a
/// restore to `xid:` starts from the oldest backup that can reach it (weeks of replay), and an
/// xid that wrapped around since may stop at an older transaction of the same number: that
/// form is only the alternative ([`Commit::safe_target_xid`]).
pub fn restore_command(commit: &Commit, config: Option<&str>) -> String {
    let config = config.map(|c| format!(" --config {c}")).unwrap_or_default();
    format!("pitr{config} restore --to {} --exclusive --target-dir DIR", commit.safe_target_lsn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::catalog::CatalogSnapshot;
    use pitr_pgformat::changes::{RelCounts, RelOid};

    fn rel(relfilenode: u32, oid: u32, name: &str, reltuples: f64) -> CatalogRelation {
        CatalogRelation {
            db_oid: 5,
            db_name: "app".into(),
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

    fn loc(rel: u32) -> RelFileLocator {
        RelFileLocator { spc: 1663, db: 5, rel }
    }

    fn counts(rel: u32, inserted: u64, updated: u64, deleted: u64) -> RelCounts {
        RelCounts { rel: loc(rel), inserted, updated, deleted }
    }

    fn snaps() -> Snapshots {
        Snapshots {
            snapshots: vec![
                CatalogSnapshot::new(
                    1,
                    0x100,
                    0,
                    vec![
                        rel(16400, 16400, "orders", 50_000.0),
                        rel(16410, 16410, "items", 100.0),
                        rel(16420, 16420, "log", 10.0),
                    ],
                ),
                // After: orders truncated (new storage, no estimate), items dropped, log rewritten.
                CatalogSnapshot::new(
                    1,
                    0x900,
                    0,
                    vec![rel(16500, 16400, "orders", -1.0), rel(16510, 16420, "log", 10.0)],
                ),
            ],
            problems: vec![],
        }
    }

    fn entry(xid: u32, lsn: u64) -> CommitEntry {
        CommitEntry {
            xid,
            commit_lsn: lsn,
            end_lsn: lsn + 0x20,
            time_us: 1_795_615_380_000_000 + lsn as i64,
            ..Default::default()
        }
    }

    #[test]
    fn drops_truncates_rewrites_and_big_deletes_are_told_apart() {
        let s = snaps();
        let rules = Rules::default();
        let truncate = CommitEntry {
            dropped: vec![loc(16400)],
            ddl: true,
            relations: vec![counts(1259, 0, 1, 0)],
            ..entry(700, 0x500)
        };
        let c = describe(&truncate, &s, rules);
        assert_eq!(c.relations.len(), 1, "pg_class is not shown: {c:?}");
        assert_eq!(c.relations[0].table.as_deref(), Some("public.orders"));
        assert_eq!(c.relations[0].dropped, Some(Dropped::Truncate));
        assert!(c.destructive);
        assert_eq!((c.safe_target_xid.as_str(), c.safe_target_lsn.as_str()), ("xid:700", "lsn:0/500"));

        let drop = CommitEntry { dropped: vec![loc(16410)], ddl: true, ..entry(701, 0x600) };
        let c = describe(&drop, &s, rules);
        assert_eq!(c.relations[0].dropped, Some(Dropped::Drop));
        assert!(c.destructive);

        let rewrite = CommitEntry { dropped: vec![loc(16420)], ddl: true, ..entry(702, 0x700) };
        let c = describe(&rewrite, &s, rules);
        assert_eq!(c.relations[0].dropped, Some(Dropped::Rewrite));
        assert!(!c.destructive, "VACUUM FULL is not destructive");

        // Logged at wal_level=logical: the TRUNCATE record says so, whatever the snapshots.
        let logged = CommitEntry { truncated: vec![RelOid { db: 5, oid: 16420 }], ..rewrite.clone() };
        assert_eq!(describe(&logged, &s, rules).relations[0].dropped, Some(Dropped::Truncate));

        // After the newest snapshot: pg_class's row deleted is a DROP, else unknown (flagged).
        let late =
            CommitEntry { dropped: vec![loc(16510)], relations: vec![counts(1259, 0, 0, 1)], ..entry(800, 0xA00) };
        assert_eq!(describe(&late, &s, rules).relations[0].dropped, Some(Dropped::Drop));
        let late =
            CommitEntry { dropped: vec![loc(16510)], relations: vec![counts(1259, 0, 1, 0)], ..entry(801, 0xA10) };
        let c = describe(&late, &s, rules);
        assert_eq!(c.relations[0].dropped, Some(Dropped::Unknown));
        assert!(c.destructive);

        // Deletes: 10 % of 50 000 is 5 000, above min_rows.
        let small = CommitEntry { relations: vec![counts(16400, 0, 0, 4_999)], ..entry(703, 0x200) };
        assert!(!describe(&small, &s, rules).destructive);
        let big = CommitEntry { relations: vec![counts(16400, 0, 2_000, 3_000)], ..entry(704, 0x210) };
        assert!(describe(&big, &s, rules).destructive);
        // A small table: min_rows rules.
        let items = CommitEntry { relations: vec![counts(16410, 0, 0, 999)], ..entry(705, 0x220) };
        assert!(!describe(&items, &s, rules).destructive);

        // A TOAST table's storage dropped with its table's: one touch, the table's.
        let mut with_toast = s.clone();
        let toast = CatalogRelation {
            schema: "pg_toast".into(),
            name: "pg_toast_16400".into(),
            relkind: "t".into(),
            ..rel(16401, 16401, "", -1.0)
        };
        with_toast.snapshots[0].relations.push(toast);
        with_toast.snapshots[0].relations.sort_by_key(|r| (r.db_oid, r.spc_oid, r.relfilenode));
        let both = CommitEntry { dropped: vec![loc(16401), loc(16400)], ..entry(707, 0x500) };
        let c = describe(&both, &with_toast, rules);
        assert_eq!(c.relations.len(), 1, "{c:?}");
        assert_eq!(c.relations[0].table.as_deref(), Some("public.orders"));
        let only_toast = CommitEntry { relations: vec![counts(16401, 1, 0, 0)], ..entry(708, 0x300) };
        let c = describe(&only_toast, &with_toast, rules);
        assert_eq!((c.relations[0].table.as_deref(), c.relations[0].toast), (Some("public.orders"), true));

        // Unknown relfilenode: shown by number.
        let unknown = CommitEntry { relations: vec![counts(17000, 1, 0, 0)], ..entry(706, 0x230) };
        assert_eq!(describe(&unknown, &s, rules).relations[0].shown(), "5/1663/17000 (unknown name)");
    }

    /// A TRUNCATE is a rewrite only on evidence that is the commit's own: not when the commit
    /// loaded the new storage itself, not when an analyze or vacuum after it set the estimate,
    /// not when another commit replaced storage before the snapshot.
    #[test]
    fn a_truncate_is_not_taken_for_a_rewrite() {
        let rules = Rules::default();
        let commit = CommitEntry { dropped: vec![loc(16400)], ddl: true, ..entry(900, 0x500) };
        let snaps_with = |stats_us: Option<i64>| Snapshots {
            snapshots: vec![
                CatalogSnapshot::new(1, 0x100, 0, vec![rel(16400, 16400, "orders", 50_000.0)]),
                CatalogSnapshot::new(
                    1,
                    0x900,
                    0,
                    vec![CatalogRelation { stats_us, ..rel(16500, 16400, "orders", 300.0) }],
                ),
            ],
            problems: vec![],
        };
        // VACUUM FULL: the estimate is the copied rows', set by the commit: a rewrite.
        let quiet = snaps_with(Some(commit.time_us - 1_000_000));
        let c = describe_among(&commit, &quiet, rules, std::slice::from_ref(&commit));
        assert_eq!((c.relations[0].dropped, c.destructive), (Some(Dropped::Rewrite), false));
        // TRUNCATE; INSERT …; ANALYZE in one transaction: rows inserted into the new storage.
        let loaded = CommitEntry { relations: vec![counts(16500, 300, 0, 0)], ..commit.clone() };
        let c = describe(&loaded, &quiet, rules);
        assert_eq!(c.relations.iter().find_map(|t| t.dropped), Some(Dropped::TruncateOrRewrite), "{c:?}");
        assert!(c.destructive);
        // TRUNCATE, then a load and an (auto)analyze before the snapshot.
        let c = describe(&commit, &snaps_with(Some(commit.time_us + 500_000)), rules);
        assert_eq!((c.relations[0].dropped, c.destructive), (Some(Dropped::TruncateOrRewrite), true));
        // TRUNCATE, then a VACUUM FULL (storage replaced again: the new storage, which no
        // snapshot names) before the snapshot.
        let again = CommitEntry { dropped: vec![loc(16450)], ddl: true, ..entry(901, 0x600) };
        let c = describe_among(&commit, &quiet, rules, &[commit.clone(), again]);
        assert_eq!((c.relations[0].dropped, c.destructive), (Some(Dropped::TruncateOrRewrite), true));
        let q = Query { op: Some(Op::Truncate), ..Default::default() };
        assert!(select(c, &q, &quiet).is_some(), "--op truncate finds it");
        // Another table's storage dropped meanwhile says nothing about this one.
        let mut with_other = quiet.clone();
        for s in &mut with_other.snapshots {
            s.relations.push(rel(16700, 16700, "other", 5.0));
            s.relations.sort_by_key(|r| (r.db_oid, r.spc_oid, r.relfilenode));
        }
        let other = CommitEntry { dropped: vec![loc(16700), loc(16701)], ddl: true, ..entry(902, 0x600) };
        let c = describe_among(&commit, &with_other, rules, &[commit.clone(), other]);
        assert_eq!((c.relations[0].dropped, c.destructive), (Some(Dropped::Rewrite), false));
    }

    /// A partitioned table has no storage: `--table ROOT` finds its partitions' commits.
    #[test]
    fn a_partitioned_table_is_found_through_its_partitions() {
        let part = |relfilenode, name: &str| CatalogRelation {
            partition_of: Some("public.measurements".into()),
            ..rel(relfilenode, relfilenode, name, 10.0)
        };
        let s = Snapshots {
            snapshots: vec![CatalogSnapshot::new(1, 0x100, 0, vec![part(16600, "m_2026"), part(16610, "m_2027")])],
            problems: vec![],
        };
        let root = TableName::parse("measurements").unwrap();
        assert_eq!(table_database(&s, &root, None).unwrap(), "app");
        let q = Query { table: Some((root, "app".into())), ..Default::default() }.prepare(&s);
        let drop = CommitEntry { dropped: vec![loc(16600), loc(16610)], ..entry(5, 0x200) };
        let c = select(describe(&drop, &s, Rules::default()), &q, &s).expect("the partitions' commit");
        assert_eq!(c.relations.len(), 2);
        assert!(c.relations[0].shown().contains("(partition of public.measurements)"), "{}", c.relations[0].shown());
    }

    #[test]
    fn selecting_by_table_op_and_time() {
        let s = snaps();
        let rules = Rules::default();
        let orders = TableName::parse("orders").unwrap();
        assert_eq!(orders.qualified(), "public.orders");
        assert_eq!(table_database(&s, &orders, None).unwrap(), "app");
        let e = table_database(&s, &TableName::parse("x.nope").unwrap(), None).unwrap_err().to_string();
        assert!(e.contains("x.nope") && e.contains("2 catalog snapshot(s), from 0/100 to 0/900"), "{e}");
        assert!(table_database(&s, &orders, Some("other")).is_err());

        let q = Query { table: Some((orders.clone(), "app".into())), ..Default::default() };
        let both = CommitEntry { relations: vec![counts(16400, 1, 0, 0), counts(16410, 0, 0, 5)], ..entry(1, 0x300) };
        let c = select(describe(&both, &s, rules), &q, &s).unwrap();
        assert_eq!(c.relations.len(), 1, "only the table's own touches are shown");
        let items_only = CommitEntry { relations: vec![counts(16410, 0, 0, 5)], ..entry(2, 0x310) };
        assert!(select(describe(&items_only, &s, rules), &q, &s).is_none());
        // The table's storage after TRUNCATE is still the table.
        let after = CommitEntry { relations: vec![counts(16500, 3, 0, 0)], ..entry(3, 0x950) };
        assert!(select(describe(&after, &s, rules), &q, &s).is_some());

        let truncate = CommitEntry { dropped: vec![loc(16400)], ..entry(4, 0x500) };
        let with_op = |op| Query { op: Some(op), ..q.clone() };
        assert!(select(describe(&truncate, &s, rules), &with_op(Op::Truncate), &s).is_some());
        assert!(select(describe(&truncate, &s, rules), &with_op(Op::Drop), &s).is_none());
        assert!(select(describe(&both, &s, rules), &with_op(Op::Insert), &s).is_some());
        assert!(select(describe(&both, &s, rules), &with_op(Op::Delete), &s).is_none());
        let destructive = Query { destructive_only: true, ..Default::default() };
        assert!(select(describe(&truncate, &s, rules), &destructive, &s).is_some());
        assert!(select(describe(&both, &s, rules), &destructive, &s).is_none());
        let since = Query { since_us: Some(truncate.time_us + 1), ..Default::default() };
        assert!(select(describe(&truncate, &s, rules), &since, &s).is_none());
        assert_eq!(Op::parse("TRUNCATE"), Some(Op::Truncate));
        assert_eq!(Op::parse("merge"), None);
        assert!(
            restore_command(&describe(&truncate, &s, rules), None)
                .starts_with(&format!("pitr restore --to lsn:{} --exclusive", format_lsn(truncate.commit_lsn))),
            "{}",
            restore_command(&describe(&truncate, &s, rules), None)
        );
    }
}
