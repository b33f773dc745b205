//! Where MongoDB objects live in the repository, and the catalog built by listing them.
//!
//! ```text
//! mongo/<name>/oplog/<after ts>-<last ts>.slice   oplog entries with after < ts <= last, raw BSON, as read
//! mongo/<name>/gaps/<archived ts>-<next ts>.gap    entries lost between these (the oplog rolled over)
//! mongo/<name>/blocks/<hh>/<hash>                  snapshot documents, raw BSON, named by keyed hash
//! mongo/<name>/snapshots/<id>.manifest             BSON: what a snapshot is made of (written last)
//! mongo/<name>/complete/<ts>.<server time µs hex>   completeness mark: the archive held every
//!                                                  entry up to `ts`, and the server nothing newer,
//!                                                  at that time (see `pitr_archive::complete`)
//! ```
//! `<name>` is `[mongo] name`, by default the replica set's name. A `ts` in a name is
//! `<seconds>.<increment>`, both ten digits, so names sort in oplog order.
//!
//! A slice names the `ts` it follows (the previous slice's last), not its own first, so that the
//! names alone chain: a slice whose `after` is not the previous slice's `last` starts a new run,
//! and a lost slice shows as a hole in the window (and in `verify`) instead of a silent skip in
//! replay. The first slice of a run (a fresh archive, or after the oplog rolled over) follows its
//! first entry's predecessor ([`Ts::pred`]).

use bson::{Document, RawDocument};
use pitr_archive::names;
use pitr_archive::{ObjectKind, ObjectMeta, Repository};
use serde::{Deserialize, Serialize};

use crate::ts::Ts;
use crate::MongoError;

/// Where a MongoDB source's objects live. The names are [`names::mongo`]'s; this gives them in
/// terms of [`Ts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MongoLayout {
    /// The `<name>` in `mongo/<name>/`: `[mongo] name`, by default the replica set's name.
    pub name: String,
}

fn oplog_ts(ts: Ts) -> names::mongo::OplogTs {
    (ts.secs, ts.inc)
}

fn ts_of((secs, inc): names::mongo::OplogTs) -> Ts {
    Ts { secs, inc }
}

impl MongoLayout {
    /// The layout of the objects kept under `name`.
    pub fn new(name: &str) -> MongoLayout {
        MongoLayout { name: name.to_string() }
    }

    /// `mongo/<name>/`: every object of this source.
    pub fn prefix(&self) -> String {
        names::mongo::prefix(&self.name)
    }

    /// `mongo/<name>/oplog/`: the oplog slices.
    pub fn oplog_prefix(&self) -> String {
        names::mongo::oplog_prefix(&self.name)
    }

    /// The slice holding the entries after `after` up to and including `last`.
    pub fn slice_name(&self, after: Ts, last: Ts) -> String {
        names::mongo::slice(&self.name, oplog_ts(after), oplog_ts(last))
    }

    /// The `after` and `last` of a slice's name.
    pub fn parse_slice_name(&self, name: &str) -> Option<(Ts, Ts)> {
        names::mongo::parse_slice(&self.name, name).map(|(after, last)| (ts_of(after), ts_of(last)))
    }

    /// The gap record saying entries after `archived` (the newest archived) and before `next`
    /// (the oldest the oplog still held) were lost.
    pub fn gap_name(&self, archived: Ts, next: Ts) -> String {
        names::mongo::gap(&self.name, oplog_ts(archived), oplog_ts(next))
    }

    /// The `archived` and `next` of a gap's name.
    pub fn parse_gap_name(&self, name: &str) -> Option<(Ts, Ts)> {
        names::mongo::parse_gap(&self.name, name).map(|(archived, next)| (ts_of(archived), ts_of(next)))
    }

    /// `mongo/<name>/blocks/`: the snapshots' document blocks.
    pub fn blocks_prefix(&self) -> String {
        names::mongo::blocks_prefix(&self.name)
    }

    /// The block whose keyed hash is `block_id`.
    pub fn block_name(&self, block_id: &str) -> String {
        names::mongo::block(&self.name, block_id)
    }

    /// The manifest of snapshot `id`.
    pub fn manifest_name(&self, id: &str) -> String {
        names::mongo::snapshot_manifest(&self.name, id)
    }

    /// `mongo/<name>/complete/`: the completeness marks.
    pub fn complete_prefix(&self) -> String {
        names::mongo::complete_prefix(&self.name)
    }

    /// The completeness mark for "every entry up to `ts` archived, nothing newer on the server,
    /// at server time `time_us`".
    pub fn complete_name(&self, ts: Ts, time_us: i64) -> String {
        names::mongo::complete_mark(&self.name, oplog_ts(ts), time_us)
    }

    fn parse_complete_name(&self, name: &str) -> Option<(Ts, i64)> {
        names::mongo::parse_complete_mark(&self.name, name).map(|(ts, time_us)| (ts_of(ts), time_us))
    }
}

/// Records a completeness mark (and prunes older ones): at the server's `time_us`, the archive
/// held every entry up to `ts` and the server had nothing newer.
pub async fn record_complete(repo: &Repository, layout: &MongoLayout, ts: Ts, time_us: i64) -> Result<(), MongoError> {
    let text = format!("ts={}\ntime_us={time_us}\n", ts.to_name());
    pitr_archive::complete::record_named(repo, &layout.complete_prefix(), &layout.complete_name(ts, time_us), text)
        .await?;
    Ok(())
}

/// The newest authentic completeness mark: (`ts`, server time µs).
pub async fn newest_complete(repo: &Repository, layout: &MongoLayout) -> Result<Option<(Ts, i64)>, MongoError> {
    Ok(pitr_archive::complete::newest_named(repo, &layout.complete_prefix(), |name, text| {
        let (ts, time_us) = layout.parse_complete_name(name)?;
        (text == format!("ts={}\ntime_us={time_us}\n", ts.to_name())).then_some((ts, time_us))
    })
    .await?)
}

/// The names under `mongo/` in a repository: `[mongo] name` when it is not set.
pub async fn names(repo: &Repository) -> Result<Vec<String>, MongoError> {
    let mut out = std::collections::BTreeSet::new();
    for o in repo.list(names::mongo::ROOT).await? {
        if let Some(name) = names::mongo::parse_source(&o.name) {
            out.insert(name.to_string());
        }
    }
    Ok(out.into_iter().collect())
}

/// An oplog slice's header metadata: its `ts` range (packed as MongoDB packs a timestamp into 64
/// bits) and the wall times of its first and last entries.
pub fn slice_meta(first: Ts, last: Ts, first_wall_us: Option<i64>, last_wall_us: Option<i64>) -> ObjectMeta {
    let pack = |t: Ts| (u64::from(t.secs) << 32) | u64::from(t.inc);
    ObjectMeta {
        start_lsn: pack(first),
        end_lsn: pack(last),
        first_commit_us: first_wall_us,
        last_commit_us: last_wall_us,
        ..ObjectMeta::plain(ObjectKind::Meta)
    }
}

/// The entries of the oplog slice `name`, in order: opened (authenticated), split and each
/// translated; one that does not parse is [`MongoError::Corrupt`] naming the slice.
pub(crate) async fn slice_entries(
    repo: &pitr_archive::Repository,
    name: &str,
) -> Result<Vec<crate::apply::Entry>, MongoError> {
    let (_, bytes) = repo.get_opened(name).await?;
    let mut out = Vec::new();
    for raw in split_entries(name, &bytes)? {
        let d: bson::Document = raw
            .try_into()
            .map_err(|e: bson::raw::Error| MongoError::Corrupt { object: name.to_string(), what: e.to_string() })?;
        out.push(crate::apply::Entry::from_document(&d)?);
    }
    Ok(out)
}

/// Splits a slice's plaintext into its raw BSON entries.
pub fn split_entries<'a>(object: &str, bytes: &'a [u8]) -> Result<Vec<&'a RawDocument>, MongoError> {
    let corrupt = |what: String| MongoError::Corrupt { object: object.to_string(), what };
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let len_bytes: [u8; 4] = bytes
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| corrupt(format!("truncated at {at}")))?;
        let len = i32::from_le_bytes(len_bytes);
        if len < 5 || at + len as usize > bytes.len() {
            return Err(corrupt(format!("bad document length {len} at {at}")));
        }
        let doc = RawDocument::from_bytes(&bytes[at..at + len as usize])
            .map_err(|e| corrupt(format!("document at {at}: {e}")))?;
        out.push(doc);
        at += len as usize;
    }
    Ok(out)
}

/// What `listCollections` says a namespace is (its `type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum CollectionKind {
    /// Documents: dumped, and loaded back with its indexes.
    Collection,
    /// A view: only its definition, created after the collections it reads.
    View,
    /// Any other type the server reports (time series…), kept as the server wrote it; a
    /// snapshot records it and restore does not load it.
    Other(String),
}

impl From<String> for CollectionKind {
    fn from(s: String) -> Self {
        match s.as_str() {
            "collection" => CollectionKind::Collection,
            "view" => CollectionKind::View,
            _ => CollectionKind::Other(s),
        }
    }
}

impl From<CollectionKind> for String {
    fn from(k: CollectionKind) -> String {
        match k {
            CollectionKind::Collection => "collection".into(),
            CollectionKind::View => "view".into(),
            CollectionKind::Other(s) => s,
        }
    }
}

/// One collection (or view) of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CollectionDump {
    /// Its database.
    pub db: String,
    /// Its name within the database.
    pub name: String,
    /// Collection, view, or another type the server reported.
    pub kind: CollectionKind,
    /// As `listCollections` reports them (capped, validator, collation, viewOn, pipeline…).
    pub options: Document,
    /// As `listIndexes` reports them, `_id_` included.
    pub indexes: Vec<Document>,
    /// Blocks of raw BSON documents, in order.
    pub blocks: Vec<String>,
    /// Documents dumped.
    pub documents: u64,
    /// Raw BSON bytes of those documents.
    pub bytes: u64,
}

/// A snapshot: consistent at `ts_after` once the oplog from `ts_before` is applied over it
/// (as `mongodump --oplog`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotManifest {
    /// `YYYYMMDDTHHMMSSZ` of when the dump started (UTC); names the manifest.
    pub id: String,
    /// The layout name it was stored under ([`MongoLayout::name`]).
    pub name: String,
    /// The newest oplog entry before the dump began, and before it ended.
    pub ts_before: Ts,
    /// The newest oplog entry once the dump ended: the snapshot's consistent point.
    pub ts_after: Ts,
    /// Wall times of those entries, µs since the Unix epoch.
    pub time_before_us: i64,
    /// Wall time of `ts_after` (its second where the entry has no wall time).
    pub time_after_us: i64,
    /// This host's clock when the dump started, µs since the Unix epoch.
    pub started_us: i64,
    /// This host's clock when the dump ended.
    pub finished_us: i64,
    /// Every non-system collection and view, by database then name.
    pub collections: Vec<CollectionDump>,
    /// Documents dumped, all collections together.
    pub documents: u64,
    /// Raw BSON bytes dumped, all collections together.
    pub logical_bytes: u64,
    /// Sealed bytes of blocks this snapshot added (others were stored already).
    pub stored_bytes: u64,
}

impl SnapshotManifest {
    /// The manifest as BSON, as stored (sealed) in the repository.
    pub fn to_bytes(&self) -> Result<Vec<u8>, MongoError> {
        bson::to_vec(self).map_err(|e| MongoError::Corrupt { object: self.id.clone(), what: e.to_string() })
    }

    /// Reads a manifest back from its opened bytes; `object` names it in the error.
    pub fn from_bytes(object: &str, bytes: &[u8]) -> Result<SnapshotManifest, MongoError> {
        bson::from_slice(bytes).map_err(|e| MongoError::Corrupt { object: object.to_string(), what: e.to_string() })
    }
}

/// A run of oplog slices, each following the one before: every entry after `after` up to `last`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    /// The `ts` the first slice follows (the run holds no entry at or before it).
    pub after: Ts,
    /// The newest entry of the last slice.
    pub last: Ts,
    /// Slice names, in order.
    pub slices: Vec<String>,
}

/// Targets reachable from one snapshot: its consistent point to the end of its run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// The snapshot's id.
    pub snapshot: String,
    /// The snapshot's consistent point (its `ts_after`): the oldest target.
    pub from_ts: Ts,
    /// Wall time of `from_ts`, µs since the Unix epoch.
    pub from_us: i64,
    /// The newest entry of the run the snapshot replays along: the newest target.
    pub to_ts: Ts,
    /// Wall time of the newest entry of the run.
    pub to_us: Option<i64>,
}

/// What the repository holds for one MongoDB source, from listing `mongo/<name>/` (and reading
/// the manifests, the last slice headers and the newest completeness mark).
#[derive(Debug, Clone)]
pub struct MongoCatalog {
    /// Whose objects these are.
    pub layout: MongoLayout,
    /// Runs of slices that follow each other, oldest first; a new run starts wherever the oplog
    /// rolled past the archive or a slice is missing.
    pub runs: Vec<Run>,
    /// Recorded gaps, (newest archived `ts`, oldest `ts` the oplog still held), oldest first.
    pub gaps: Vec<(Ts, Ts)>,
    /// Oldest first.
    pub snapshots: Vec<SnapshotManifest>,
    /// Newest-entry wall time per run (from the last slice's header), by index in `runs`.
    pub run_end_us: Vec<Option<i64>>,
    /// Up to when the archive is known to hold everything the server had: the newest
    /// completeness mark, when its `ts` is the last run's (so nothing after it was lost since).
    pub complete_up_to_us: Option<i64>,
}

impl MongoCatalog {
    /// Lists and reads what the repository holds under `layout`.
    pub async fn load(repo: &Repository, layout: MongoLayout) -> Result<MongoCatalog, MongoError> {
        let mut slices = Vec::new();
        let mut gaps = Vec::new();
        let mut manifests = Vec::new();
        for o in repo.list(&layout.prefix()).await? {
            if let Some((a, b)) = layout.parse_slice_name(&o.name) {
                slices.push((a, b, o.name));
            } else if let Some(g) = layout.parse_gap_name(&o.name) {
                gaps.push(g);
            } else if names::mongo::is_snapshot_manifest(&layout.name, &o.name) {
                manifests.push(o.name);
            }
        }
        slices.sort();
        gaps.sort();
        let runs = runs_of(&slices);
        let mut run_end_us = Vec::new();
        for r in &runs {
            let last = r.slices.last().map(String::as_str).unwrap_or_default();
            run_end_us.push(repo.read_header(last).await?.meta.last_commit_us);
        }
        let mut snapshots = Vec::new();
        for m in manifests {
            let (_, bytes) = repo.get_opened(&m).await?;
            snapshots.push(SnapshotManifest::from_bytes(&m, &bytes)?);
        }
        snapshots.sort_by_key(|s| s.ts_after);
        let complete_up_to_us = match (newest_complete(repo, &layout).await?, runs.last()) {
            (Some((ts, time_us)), Some(run)) if run.after < ts && ts <= run.last => Some(time_us),
            _ => None,
        };
        Ok(MongoCatalog { layout, runs, gaps, snapshots, run_end_us, complete_up_to_us })
    }

    /// The last moment run `i` restores to exactly: its newest entry's wall time, or for the
    /// last run a later completeness mark.
    pub fn run_known_until_us(&self, i: usize) -> Option<i64> {
        let end = self.run_end_us.get(i).copied().flatten();
        if i + 1 == self.runs.len() {
            end.max(self.complete_up_to_us)
        } else {
            end
        }
    }

    /// The newest archived entry.
    pub fn last_archived(&self) -> Option<(Ts, Option<i64>)> {
        self.runs.last().map(|r| (r.last, self.run_end_us.last().copied().flatten()))
    }

    /// The run a snapshot can be replayed along: one holding every entry after its `ts_before`
    /// and reaching its `ts_after`.
    pub fn run_of(&self, s: &SnapshotManifest) -> Option<usize> {
        self.runs.iter().position(|r| r.after <= s.ts_before && r.last >= s.ts_after)
    }

    /// What can be restored to: one window per snapshot that has a run to replay along, oldest
    /// snapshot first.
    pub fn windows(&self) -> Vec<Window> {
        self.snapshots
            .iter()
            .filter_map(|s| {
                let i = self.run_of(s)?;
                Some(Window {
                    snapshot: s.id.clone(),
                    from_ts: s.ts_after,
                    from_us: s.time_after_us,
                    to_ts: self.runs[i].last,
                    to_us: self.run_known_until_us(i),
                })
            })
            .collect()
    }
}

/// Slices (sorted by name) into runs, broken wherever a slice does not follow the one before.
/// Recorded gaps need no part in this: the slice after a gap follows an entry the archive lacks.
fn runs_of(slices: &[(Ts, Ts, String)]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (after, last, name) in slices {
        let follows = runs.last().is_some_and(|r| r.last == *after);
        if !follows {
            runs.push(Run { after: *after, last: *last, slices: vec![name.clone()] });
        } else if let Some(r) = runs.last_mut() {
            r.last = *last;
            r.slices.push(name.clone());
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_kinds_keep_the_servers_words() {
        for (word, kind) in [
            ("collection", CollectionKind::Collection),
            ("view", CollectionKind::View),
            ("timeseries", CollectionKind::Other("timeseries".into())),
        ] {
            assert_eq!(CollectionKind::from(word.to_string()), kind);
            assert_eq!(serde_json::to_value(&kind).unwrap(), word);
            assert_eq!(bson::to_bson(&kind).unwrap(), bson::Bson::String(word.into()));
        }
    }

    fn t(secs: u32, inc: u32) -> Ts {
        Ts { secs, inc }
    }

    #[test]
    fn names_round_trip_and_only_following_slices_make_a_run() {
        let l = MongoLayout::new("secantus");
        let n = l.slice_name(t(10, 0), t(10, 5));
        assert_eq!(n, "mongo/secantus/oplog/0000000010.0000000000-0000000010.0000000005.slice");
        assert_eq!(l.parse_slice_name(&n), Some((t(10, 0), t(10, 5))));
        assert_eq!(l.parse_gap_name(&l.gap_name(t(1, 1), t(2, 2))), Some((t(1, 1), t(2, 2))));
        assert_eq!(l.parse_gap_name(&n), None);
        let slices = vec![
            (t(10, 0), t(10, 5), "a".to_string()),
            (t(10, 5), t(11, 1), "b".to_string()),
            // The oplog rolled over (or a slice was lost): this one follows an entry nobody holds.
            (t(20, 0), t(21, 1), "c".to_string()),
            (t(21, 1), t(22, 1), "d".to_string()),
        ];
        let runs = runs_of(&slices);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].after, runs[0].last, runs[0].slices.len()), (t(10, 0), t(11, 1), 2));
        assert_eq!((runs[1].after, runs[1].last, runs[1].slices.len()), (t(20, 0), t(22, 1), 2));
        let without_b: Vec<_> = slices.iter().filter(|s| s.2 != "b").cloned().collect();
        assert_eq!(runs_of(&without_b).len(), 2, "a lost slice breaks the run");
        assert_eq!(runs_of(&without_b)[0].last, t(10, 5));
    }

    #[test]
    fn entries_split_and_truncation_is_an_error() {
        let a = bson::rawdoc! { "op": "n", "x": 1 };
        let b = bson::rawdoc! { "op": "i", "y": "two" };
        let mut bytes = a.as_bytes().to_vec();
        bytes.extend_from_slice(b.as_bytes());
        let got = split_entries("s", &bytes).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].get_str("y").unwrap(), "two");
        let err = split_entries("s", &bytes[..bytes.len() - 1]).unwrap_err();
        assert!(err.to_string().contains("object s"), "{err}");
    }
}
