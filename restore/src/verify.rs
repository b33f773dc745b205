//! `pitr verify`: is the archive whole? WAL continuity per timeline and from every backup to the
//! archive's end (or, for a backup retention kept past its WAL, to its timeline's floor), history
//! files present and consistent, every block of every backup present;
//! with `deep`, every object opened, authenticated and its plaintext checked.
//!
//! Objects that decide what other commands do are read, not trusted by name: each retention
//! floor, running marker and expire lock must open with the repository's keys and agree with its
//! name (`bad-floor`, `bad-marker`, `bad-lock` otherwise; such a floor is treated as absent, so
//! the WAL holes it would excuse are reported too); so must pin records (`bad-pin`) and restore
//! point index entries (`bad-restore-point`). A marker or lock that does open but names
//! implausible times (far ahead of this host's clock, or a lock longer than a day) is obeyed by
//! the other commands, so it is a warning in the notes, not a finding.
//!
//! Keys: an object whose header names a retired master key (`pitr keys retire`) or a key pitr
//! cannot find is `retired-key` / `unknown-key`, naming the object and the key: planted by someone
//! holding an old key, or missed by a rewrap. Without `deep` the objects verify reads anyway
//! (marker, cluster record, history files, manifests, floors, leases, running markers) have their
//! first bytes read for this; with `deep` every object opened is judged so. Records under `keys/`
//! that do not parse are `bad-key-record`; a wrap made by a retired master key is `retired-key`.
//!
//! A *rolled-back* archive (its newest objects deleted) is caught by two witnesses the bucket
//! alone cannot rewrite: a backup manifest whose stop LSN lies past the archive's end on its
//! timeline (a backup is written only once its WAL to its stop LSN is archived), and, where the
//! server is reachable, the restart LSN of pitr's physical replication slot, which the server
//! advances only to what pitr acknowledged as durable ([`SlotWitness`]). Both are `rolled-back`.
//! What neither can see: everything newer than the newest surviving manifest deleted while the
//! slot is also gone or recreated (or the server unreachable).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use pitr_archive::keys::record::{self, RetiredRecord, WrapRecord};
use pitr_archive::names::{pg, MARKER};
use pitr_archive::running::{self, Activity, Trust};
use pitr_archive::{expire, lease, now_us, retention, seal};
use pitr_archive::{HistoryProblem, KeyError, Repository, RepositoryError, SealError, WalLayout, WalObject};
use pitr_pgformat::lsn::format_lsn;
use pitr_pgformat::timeline::HistoryEntry;
use tokio::task::JoinSet;

use crate::continuity::TimelinePath;
use crate::plan::Catalog;

/// One problem, naming the object it is about.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// A stable kebab-case tag: `wal-gap`, `missing-history`, `bad-history`, `missing-parent`,
    /// `missing-block`, `bad-size`, `corrupt`, `unreadable`, `bad-floor`, `bad-marker`,
    /// `bad-lock`, `bad-manifest`, `bad-lease`, `bad-pin`, `bad-restore-point`, `rolled-back`,
    /// `retired-key`, `unknown-key`, `bad-key-record`.
    pub kind: &'static str,
    /// The object concerned (a WAL segment, history file, backup manifest or block name).
    pub object: String,
    /// What is wrong, and what it means for restores.
    pub message: String,
}

/// What [`verify`] checked and found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// No findings.
    pub ok: bool,
    /// Whether every object was opened and authenticated ([`verify`]'s `deep`).
    pub deep: bool,
    /// The timelines that have WAL in the archive.
    pub timelines: Vec<u32>,
    /// WAL segments held (whole or in chunks).
    pub segments: usize,
    /// Backup manifests.
    pub backups: usize,
    /// Distinct blocks the backups refer to.
    pub blocks: usize,
    /// Objects opened (only with `deep`).
    pub objects_opened: usize,
    /// Problems, sorted by kind then object: any makes verification fail.
    pub findings: Vec<Finding>,
    /// What was checked beyond the repository, or skipped and why (the server's slot).
    pub notes: Vec<String>,
}

/// What the PostgreSQL server says pitr archived: the restart LSN of pitr's physical slot, which
/// the server moves only to the flush position pitr reports, and pitr reports only what is
/// durable in the archive. Read before the archive is listed, so that WAL archived meanwhile
/// only moves the archive's end further past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotWitness {
    /// The server's system identifier (IDENTIFY_SYSTEM): the witness is only for that cluster.
    pub system_id: u64,
    /// The server's current timeline.
    pub timeline: u32,
    /// The slot's name.
    pub slot: String,
    /// The slot's restart LSN: WAL up to here was acknowledged as archived.
    pub flushed_lsn: u64,
}

/// The history of each timeline (parsed), from the archived history files.
async fn histories(
    repo: &Repository,
    catalog: &Catalog,
    findings: &mut Vec<Finding>,
) -> Result<BTreeMap<u32, Vec<HistoryEntry>>, RepositoryError> {
    let layout = catalog.wal.layout;
    let mut read = catalog.wal.read_histories(repo).await?;
    let mut out = BTreeMap::new();
    let mut needed: BTreeSet<u32> = catalog.wal.segments.keys().map(|(t, _)| *t).filter(|t| *t > 1).collect();
    needed.extend(catalog.wal.histories.iter().copied());
    for t in needed {
        let name = layout.object_name(&WalObject::History { timeline: t });
        if !catalog.wal.histories.contains(&t) {
            findings.push(Finding {
                kind: "missing-history",
                object: name,
                message: format!("timeline {t} has WAL but no history file: recovery cannot follow it"),
            });
            continue;
        }
        match read.remove(&t) {
            Some(Ok(entries)) => {
                let increasing =
                    entries.windows(2).all(|w| w[0].timeline < w[1].timeline && w[0].switch_lsn <= w[1].switch_lsn);
                if entries.is_empty() || !increasing || entries.last().is_some_and(|e| e.timeline >= t) {
                    findings.push(Finding {
                        kind: "bad-history",
                        object: name,
                        message: "entries are not increasing ancestors of this timeline".into(),
                    });
                } else {
                    out.insert(t, entries);
                }
            }
            Some(Err(HistoryProblem::Malformed(e))) => {
                findings.push(Finding { kind: "bad-history", object: name, message: e })
            }
            Some(Err(problem)) => {
                findings.push(Finding { kind: "unreadable", object: name, message: problem.to_string() })
            }
            None => {}
        }
    }
    // A timeline's history must extend its parent's.
    for (t, entries) in &out {
        let parent = entries.last().map(|e| e.timeline).unwrap_or(0);
        if let Some(parent_entries) = out.get(&parent) {
            if entries.len() != parent_entries.len() + 1 || entries[..parent_entries.len()] != parent_entries[..] {
                findings.push(Finding {
                    kind: "bad-history",
                    object: layout.object_name(&WalObject::History { timeline: *t }),
                    message: format!("does not extend the history of its parent timeline {parent}"),
                });
            }
        }
    }
    Ok(out)
}

/// The segments recovery reads from `start` to the newest archived LSN: (timeline, segno) pairs,
/// each from the timeline [`TimelinePath`] says recovery reads it from.
fn recovery_path(
    layout: WalLayout,
    start_timeline: u32,
    start: u64,
    newest: u32,
    end: u64,
    history: &[HistoryEntry],
) -> Vec<(u32, u64)> {
    let path = TimelinePath::new(newest, history);
    let first = layout.segno_of(start);
    let last = layout.segno_of(end.saturating_sub(1));
    (first..=last).map(|segno| (path.timeline_of(layout, segno).max(start_timeline), segno)).collect()
}

/// Checks the archive `catalog` lists (see the module's documentation); `deep` also opens every
/// WAL object, history file, manifest and referenced block, `workers` at a time.
pub async fn verify(
    repo: &Repository,
    catalog: &Catalog,
    deep: bool,
    workers: usize,
) -> Result<VerifyReport, RepositoryError> {
    verify_with(repo, catalog, deep, workers, None).await
}

/// Markers and locks under `running/` that are not obeyed ([`running::check`]), as findings;
/// a storage error reading one is `unreadable`. Obeyed ones naming implausible times
/// ([`running::implausible`]) are warnings in `notes`.
async fn running_findings(
    repo: &Repository,
    findings: &mut Vec<Finding>,
    notes: &mut Vec<String>,
) -> Result<(), RepositoryError> {
    let now = now_us();
    for o in running::list(repo).await? {
        let kind = match o.activity {
            Activity::Run { .. } => "bad-marker",
            Activity::Expire { .. } => "bad-lock",
        };
        match running::check(repo, &o, now).await {
            Trust::Sound { .. } => {
                if let Some(why) = running::implausible(&o.activity, now) {
                    notes.push(format!(
                        "warning: {}: {why}; it is pitr's (it opens), so it is obeyed: check that host's clock",
                        o.name
                    ));
                }
            }
            Trust::Gone => {}
            Trust::Unknown(why) => findings.push(Finding { kind: "unreadable", object: o.name, message: why }),
            Trust::Untrusted(u) => findings.push(Finding {
                kind,
                object: u.object,
                message: format!(
                    "{}: not obeyed (planted, damaged, or sealed with a key this pitr lacks); inspect it, \
                     then delete it by hand",
                    u.why
                ),
            }),
        }
    }
    Ok(())
}

/// The finding for object `object` that names a key that is retired or that pitr cannot find;
/// `None` for any other key error (one that does not unwrap is `corrupt` where it is opened).
fn key_finding(object: &str, e: &KeyError) -> Option<Finding> {
    match e {
        KeyError::Retired { key_id, retired_at, .. } => Some(Finding {
            kind: "retired-key",
            object: object.to_string(),
            message: format!(
                "sealed with retired key {key_id} (retired at {retired_at}): planted by someone holding the old key, \
                 or missed by `pitr keys rewrap`; nothing reads it: inspect it, then delete it by hand"
            ),
        }),
        KeyError::UnknownKey { key_id, searched, .. } => Some(Finding {
            kind: "unknown-key",
            object: object.to_string(),
            message: format!(
                "sealed with unknown key {key_id}, which {searched}: planted, or its key is missing from the \
                 configured sources; restores cannot open it"
            ),
        }),
        _ => None,
    }
}

/// [`key_finding`] of an error opening `object`.
fn open_key_finding(object: &str, e: &RepositoryError) -> Option<Finding> {
    match e {
        RepositoryError::Seal(SealError::Key(k)) => key_finding(object, k),
        _ => None,
    }
}

/// The objects verify reads without `deep` (beside WAL and blocks, which it only lists): each
/// one's first bytes are read and the key its header names looked up. Objects that are not sealed
/// are left to the checks that read them.
async fn header_key_findings(repo: &Repository, catalog: &Catalog) -> Result<Vec<Finding>, RepositoryError> {
    let system_id = catalog.cluster.system_id;
    let layout = catalog.wal.layout;
    let mut names = vec![MARKER.to_string(), pg::cluster_info(system_id)];
    names.extend(catalog.wal.histories.iter().map(|&timeline| layout.object_name(&WalObject::History { timeline })));
    for prefix in [
        pg::backups_prefix(system_id),
        pg::floors_prefix(system_id),
        pg::lease_prefix(system_id),
        pg::pins_prefix(system_id),
        pg::restore_points_prefix(system_id),
    ] {
        names.extend(repo.list(&prefix).await?.into_iter().map(|o| o.name));
    }
    names.extend(running::list(repo).await?.into_iter().map(|o| o.name));
    names.sort();
    names.dedup();
    named_key_findings(repo, names).await
}

/// [`key_finding`]s of the objects `names`, from the first bytes of each.
async fn named_key_findings(repo: &Repository, names: Vec<String>) -> Result<Vec<Finding>, RepositoryError> {
    let store = repo.store().as_ref();
    let mut findings = Vec::new();
    for name in names {
        let bytes = match store.get_range(&name, 0..seal::KEY_ID_PREFIX_LEN).await {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let Ok(key_id) = seal::peek_key_id(&name, &bytes) else { continue };
        match repo.keys().opening_set(store, &name, &key_id).await {
            Ok(_) => {}
            Err(e) if e.is_access() => return Err(RepositoryError::KeyAccess(e)),
            Err(e) => findings.extend(key_finding(&name, &e)),
        }
    }
    Ok(findings)
}

/// The records under `keys/`: each must parse as the record its name says (`bad-key-record`), and
/// no wrap may be made by a retired master key (`retired-key`: `pitr keys retire` refuses while
/// one exists, so it was written afterwards).
async fn key_record_findings(repo: &Repository) -> Result<Vec<Finding>, RepositoryError> {
    let store = repo.store().as_ref();
    let listed = repo.list(record::KEYS).await?;
    let mut findings = Vec::new();
    let bad = |object: &str, what: String| Finding {
        kind: "bad-key-record",
        object: object.to_string(),
        message: format!("{what}; pitr ignores it: inspect it, then delete it by hand"),
    };
    let mut retired = BTreeMap::new();
    for o in listed.iter().filter(|o| o.name.starts_with(record::RETIRED)) {
        let Some(id) = record::parse_retired_name(&o.name) else {
            findings.push(bad(&o.name, "not a key record's name".into()));
            continue;
        };
        match store.get_limited(&o.name, record::RECORD_MAX).await {
            Ok(bytes) => match RetiredRecord::parse(&o.name, &bytes) {
                Ok(r) => {
                    retired.insert(id.to_string(), pitr_archive::time::format_rfc3339_seconds(r.retired_us));
                }
                // Still obeyed: a retirement record that does not parse retires the key all the same.
                Err(e) => {
                    retired.insert(id.to_string(), "an unknown time".into());
                    findings.push(bad(&o.name, e.to_string()));
                }
            },
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    for o in listed.iter().filter(|o| !o.name.starts_with(record::RETIRED)) {
        let Some((rk, mk)) = record::parse_wrap_name(&o.name) else {
            findings.push(bad(&o.name, "not a key record's name".into()));
            continue;
        };
        match store.get_limited(&o.name, record::RECORD_MAX).await {
            Ok(bytes) => {
                if let Err(e) = WrapRecord::parse(&o.name, &bytes) {
                    findings.push(bad(&o.name, e.to_string()));
                    continue;
                }
            }
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        }
        if let Some(at) = retired.get(mk) {
            findings.push(Finding {
                kind: "retired-key",
                object: o.name.clone(),
                message: format!(
                    "repository key {rk} wrapped by retired key {mk} (retired at {at}): written after the retirement, \
                     with the old key; pitr never unwraps it: inspect it, then delete it by hand"
                ),
            });
        }
    }
    Ok(findings)
}

/// As [`verify`], with what the server's slot says was archived (see [`SlotWitness`]); `None`
/// where the server was not asked or not reachable.
pub async fn verify_with(
    repo: &Repository,
    catalog: &Catalog,
    deep: bool,
    workers: usize,
    server: Option<&SlotWitness>,
) -> Result<VerifyReport, RepositoryError> {
    let layout = catalog.wal.layout;
    let mut findings = Vec::new();
    let mut notes = Vec::new();
    let histories = histories(repo, catalog, &mut findings).await?;
    let timelines: BTreeSet<u32> = catalog.wal.segments.keys().map(|(t, _)| *t).collect();
    // Below a timeline's floor `pitr expire` removed the WAL that no kept backup or the window
    // needs: holes there are retention's, not losses. Only floors that open and agree with
    // their names count.
    let system_id = catalog.cluster.system_id;
    let (floors, untrusted_floors) = expire::read_floors(repo, system_id).await?;
    for u in untrusted_floors {
        findings.push(Finding {
            kind: "bad-floor",
            object: u.object,
            message: format!(
                "{}: not pitr's (planted or damaged), so the WAL below it is checked as if it were absent; \
                 inspect it, then delete it by hand",
                u.why
            ),
        });
    }
    running_findings(repo, &mut findings, &mut notes).await?;
    findings.extend(key_record_findings(repo).await?);
    findings.extend(header_key_findings(repo, catalog).await?);
    let junk_leases = lease::untrusted_generations(repo, system_id).await.map_err(|e| match e {
        lease::LeaseError::Repository(e) => e,
        other => RepositoryError::Invalid { name: pg::lease_prefix(system_id), what: other.to_string() },
    })?;
    for (object, why) in junk_leases {
        findings.push(Finding {
            kind: "bad-lease",
            object,
            message: format!(
                "{why}: not a writer lease (planted, damaged, or sealed with a key this pitr lacks); sidecars skip it, \
                 inspect it, then delete it by hand"
            ),
        });
    }
    // Pin records and restore point entries are read, not trusted by name, by the commands that
    // use them: one that does not open is ignored there (a pin not obeyed) or refuses restores
    // to a name; either way an operator has to look at it.
    for u in pitr_archive::pins::PinSet::load(repo, system_id).await?.untrusted {
        findings.push(Finding {
            kind: "bad-pin",
            object: u.object,
            message: format!(
                "{}: not pitr's (planted or damaged), so `expire` does not obey it (the backup may be removed as \
                 if unpinned); inspect it, then delete it by hand (pin the backup again if it was meant to be)",
                u.why
            ),
        });
    }
    for p in pitr_archive::restore_points::load(repo, system_id, false).await.problems {
        findings.push(Finding {
            kind: "bad-restore-point",
            object: p.object,
            message: format!(
                "{}: the index of restore points may lack an entry, so `restore --to name:` refuses while it \
                 could be an earlier restore point of the name; inspect it, then delete it by hand",
                p.why
            ),
        });
    }
    for d in &catalog.damaged_manifests {
        findings.push(Finding {
            kind: "bad-manifest",
            object: d.name.clone(),
            message: format!(
                "{}: restores, backups and listings leave it out, and `expire` refuses to run until it is gone; \
                 if no secondary holds a sound copy, inspect it, then delete it by hand",
                d.why
            ),
        });
    }

    // Rolled back: a backup or the server's slot says WAL was archived past the archive's end.
    for b in &catalog.backups {
        let end = catalog.wal.end_lsn(b.timeline);
        if end.is_none_or(|end| end < b.stop_lsn) {
            findings.push(Finding {
                kind: "rolled-back",
                object: pg::backup_manifest(b.system_id, &b.id),
                message: format!(
                    "rolled back: backup {} was written after its WAL up to {} on timeline {} was archived, \
                     the archive's WAL of timeline {} ends at {}: newer WAL objects were deleted",
                    b.id,
                    format_lsn(b.stop_lsn),
                    b.timeline,
                    b.timeline,
                    end.map(format_lsn).unwrap_or_else(|| "nothing (none is held)".into())
                ),
            });
        }
    }
    match server {
        None => {}
        Some(w) if w.system_id != system_id => notes.push(format!(
            "server slot check skipped: the server is cluster {}, this archive is cluster {system_id}",
            w.system_id
        )),
        Some(w) => match catalog.wal.end_lsn(w.timeline) {
            None => notes.push(format!(
                "server slot check skipped: the archive holds no WAL of the server's timeline {} yet",
                w.timeline
            )),
            Some(end) if end < w.flushed_lsn => findings.push(Finding {
                kind: "rolled-back",
                object: layout.object_name(&WalObject::Segment { timeline: w.timeline, segno: layout.segno_of(end) }),
                message: format!(
                    "rolled back: the server's slot {} says WAL up to {} was archived, the archive ends at {} \
                     on timeline {}: acknowledged WAL objects were deleted",
                    w.slot,
                    format_lsn(w.flushed_lsn),
                    format_lsn(end),
                    w.timeline
                ),
            }),
            Some(end) => notes.push(format!(
                "the server's slot {} says WAL up to {} was archived; the archive ends at {} on timeline {}",
                w.slot,
                format_lsn(w.flushed_lsn),
                format_lsn(end),
                w.timeline
            )),
        },
    }

    // Within each timeline, from its floor on: no hole between its first and last segment, and
    // each held segment either whole or chunks from its start.
    for &t in &timelines {
        let segs: Vec<u64> = catalog
            .wal
            .segments
            .range((t, 0)..=(t, u64::MAX))
            .map(|((_, s), _)| *s)
            .filter(|&s| !retention::below_floor(&floors, t, s))
            .collect();
        let (Some(&first), Some(&last)) = (segs.first(), segs.last()) else { continue };
        for segno in first..=last {
            match catalog.wal.segments.get(&(t, segno)) {
                None => findings.push(Finding {
                    kind: "wal-gap",
                    object: layout.object_name(&WalObject::Segment { timeline: t, segno }),
                    message: format!("segment {} is missing from timeline {t}", layout.segment_file_name(t, segno)),
                }),
                Some(e) if !e.whole && e.contiguous_chunk_end().map(|(from, _)| from) != Some(0) && segno != first => {
                    findings.push(Finding {
                        kind: "wal-gap",
                        object: layout.object_name(&WalObject::Segment { timeline: t, segno }),
                        message: format!("segment {} is held only from its middle", layout.segment_file_name(t, segno)),
                    })
                }
                Some(e) if !e.is_complete(layout.segment_size) && segno != last => findings.push(Finding {
                    kind: "wal-gap",
                    object: layout.object_name(&WalObject::Segment { timeline: t, segno }),
                    message: format!(
                        "segment {} is incomplete (chunks only) but later segments exist",
                        layout.segment_file_name(t, segno)
                    ),
                }),
                _ => {}
            }
        }
    }

    // From every backup's start to the newest archived LSN, along the newest timeline's history.
    let newest = timelines.iter().max().copied().unwrap_or(1);
    let end = catalog.wal.end_lsn(newest).unwrap_or(0);
    let history = histories.get(&newest).cloned().unwrap_or_default();
    let mut reported = BTreeSet::new();
    for b in &catalog.backups {
        for (t, segno) in recovery_path(layout, b.timeline, b.start_lsn, newest, end, &history) {
            let missing = !catalog.wal.segments.contains_key(&(t, segno));
            // An older backup kept by retention recovers to its stop point and past it only as
            // far as its WAL was kept.
            if missing && segno > layout.segno_of(b.stop_lsn) && retention::below_floor(&floors, t, segno) {
                break;
            }
            if missing && reported.insert((t, segno)) {
                findings.push(Finding {
                    kind: "wal-gap",
                    object: layout.object_name(&WalObject::Segment { timeline: t, segno }),
                    message: format!(
                        "segment {} is missing: backup {} cannot be recovered past it",
                        layout.segment_file_name(t, segno),
                        b.id
                    ),
                });
            }
        }
    }

    // Every incremental's chain reaches a full backup.
    for b in &catalog.backups {
        if let Err(e) = catalog.chain(b) {
            findings.push(Finding {
                kind: "missing-parent",
                object: pg::backup_manifest(b.system_id, &b.id),
                message: e.to_string(),
            });
        }
    }

    // Every block of every backup present.
    let prefix = pg::blocks_prefix(catalog.cluster.system_id);
    let present: BTreeSet<String> = repo.list(&prefix).await?.into_iter().map(|o| o.name).collect();
    let mut referenced = BTreeSet::new();
    for b in &catalog.backups {
        for f in &b.files {
            for id in &f.blocks {
                let name = pg::block(b.system_id, id);
                if !present.contains(&name) {
                    findings.push(Finding {
                        kind: "missing-block",
                        object: name.clone(),
                        message: format!("block of {} in backup {} is missing", f.path, b.id),
                    });
                }
                referenced.insert(name);
            }
        }
    }

    let mut opened = 0;
    if deep {
        let mut names: Vec<String> = Vec::new();
        for (&(timeline, segno), e) in &catalog.wal.segments {
            if e.whole {
                names.push(layout.object_name(&WalObject::Segment { timeline, segno }));
            }
            for &(from, to) in &e.chunks {
                names.push(layout.object_name(&WalObject::Chunk { timeline, segno, from, to }));
            }
        }
        names
            .extend(catalog.wal.histories.iter().map(|&timeline| layout.object_name(&WalObject::History { timeline })));
        names.extend(catalog.backups.iter().map(|b| pg::backup_manifest(b.system_id, &b.id)));
        names.extend(referenced.iter().filter(|n| present.contains(*n)).cloned());
        opened = names.len();
        let queue = Arc::new(tokio::sync::Mutex::new(names.into_iter()));
        let mut set = JoinSet::new();
        for _ in 0..workers.max(1) {
            let (queue, repo) = (queue.clone(), repo.clone());
            set.spawn(async move {
                let mut found = Vec::new();
                loop {
                    let next = queue.lock().await.next();
                    let Some(name) = next else { return found };
                    let result = repo.get_opened(&name).await;
                    match result {
                        Ok((_, data)) => {
                            if let Some(problem) = size_problem(layout, &name, data.len()) {
                                found.push(Finding { kind: "bad-size", object: name, message: problem });
                            }
                        }
                        // Compacted away since the listing: not a finding.
                        Err(RepositoryError::Store(e))
                            if e.is_not_found()
                                && matches!(layout.parse_object_name(&name), Some(WalObject::Chunk { .. })) => {}
                        Err(e) => found.push(open_key_finding(&name, &e).unwrap_or_else(|| Finding {
                            kind: "corrupt",
                            object: name,
                            message: e.to_string(),
                        })),
                    }
                }
            });
        }
        while let Some(r) = set.join_next().await {
            findings.extend(r.unwrap_or_default());
        }
    }

    findings.sort_by(|a, b| (a.kind, &a.object).cmp(&(b.kind, &b.object)));
    // A history file or manifest under a retired key is found by its header and again when opened.
    findings.dedup_by(|a, b| a.kind == b.kind && a.object == b.object && a.kind.ends_with("-key"));
    Ok(VerifyReport {
        ok: findings.is_empty(),
        deep,
        timelines: timelines.into_iter().collect(),
        segments: catalog.wal.segments.len(),
        backups: catalog.backups.len(),
        blocks: referenced.len(),
        objects_opened: opened,
        findings,
        notes,
    })
}

fn size_problem(layout: WalLayout, name: &str, len: usize) -> Option<String> {
    match layout.parse_object_name(name)? {
        WalObject::Segment { .. } if len as u64 != layout.segment_size => {
            Some(format!("holds {len} bytes, a segment is {}", layout.segment_size))
        }
        WalObject::Chunk { from, to, .. } if len as u64 != u64::from(to - from) => {
            Some(format!("holds {len} bytes, its name says {}", to - from))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_path_switches_to_the_new_timeline_at_the_switch_segment() {
        let layout = WalLayout { system_id: 1, segment_size: 16 << 20 };
        let seg = 16u64 << 20;
        let history = vec![HistoryEntry { timeline: 1, switch_lsn: 3 * seg + 100 }];
        let path = recovery_path(layout, 1, seg + 40, 2, 5 * seg + 10, &history);
        assert_eq!(path, vec![(1, 1), (1, 2), (2, 3), (2, 4), (2, 5)]);
        let path = recovery_path(layout, 1, seg, 1, 2 * seg + 1, &[]);
        assert_eq!(path, vec![(1, 1), (1, 2)]);
    }

    #[tokio::test]
    async fn objects_and_wraps_under_retired_keys_and_junk_key_records_are_named() {
        use pitr_archive::keys::{MasterKey, MasterKeys};
        use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn pitr_archive::Store> = Arc::new(LocalStore::new(dir.path()));
        let masters = MasterKeys::single(MasterKey::in_memory("k1", [1; 32]));
        let ring = KeyRing::with_masters(masters, std::time::Duration::from_secs(60));
        let repo = Repository::new(store.clone(), ring.clone());
        repo.put_sealed("good", b"x".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        // Sealed directly with master key k0, which is then retired; and with a key nobody has.
        let old = Repository::new(store.clone(), KeyRing::from_key("k0", [7; 32]));
        old.put_sealed("planted", b"x".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        let stranger = Repository::new(store.clone(), KeyRing::from_key("k9", [9; 32]));
        stranger.put_sealed("stranger", b"x".to_vec(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        std::fs::create_dir_all(dir.path().join("keys/retired")).unwrap();
        store.put_if_absent(&record::retired_name("k0"), RetiredRecord::new("k0").to_bytes().into()).await.unwrap();
        // As a fresh process sees it (this one listed the retired keys while sealing "good").
        ring.invalidate();
        let names = vec!["good".to_string(), "planted".to_string(), "stranger".to_string()];
        let found = named_key_findings(&repo, names).await.unwrap();
        let kinds: Vec<(&str, &str)> = found.iter().map(|f| (f.kind, f.object.as_str())).collect();
        assert_eq!(kinds, vec![("retired-key", "planted"), ("unknown-key", "stranger")], "{found:?}");
        assert!(found[0].message.contains("retired key k0"), "{found:?}");
        // Opened, as `deep` does: the same finding.
        let e = repo.get_opened("planted").await.unwrap_err();
        assert_eq!(open_key_finding("planted", &e).map(|f| f.kind), Some("retired-key"), "{e}");

        // The key records: the repository key made above is sound; a wrap made with the retired
        // key afterwards and junk under a record's name are named.
        assert!(key_record_findings(&repo).await.unwrap().is_empty());
        let k0 = MasterKey::in_memory("k0", [7; 32]);
        let (_, wrapped) = k0.generate("r00000001", 5).await.unwrap();
        let rec = WrapRecord { repository_key: "r00000001".into(), master_key: "k0".into(), created_us: 5, wrapped };
        std::fs::create_dir_all(dir.path().join("keys/wraps/r00000001")).unwrap();
        std::fs::write(dir.path().join(record::wrap_name("r00000001", "k0")), rec.to_bytes()).unwrap();
        std::fs::create_dir_all(dir.path().join("keys/wraps/r00000002")).unwrap();
        std::fs::write(dir.path().join(record::wrap_name("r00000002", "k1")), b"junk").unwrap();
        let found = key_record_findings(&repo).await.unwrap();
        let kinds: Vec<(&str, &str)> = found.iter().map(|f| (f.kind, f.object.as_str())).collect();
        assert_eq!(
            kinds,
            vec![("retired-key", "keys/wraps/r00000001/k0"), ("bad-key-record", "keys/wraps/r00000002/k1")],
            "{found:?}"
        );
        assert!(found[0].message.contains("retired key k0"), "{found:?}");
    }

    #[tokio::test]
    async fn markers_that_open_are_not_findings_but_far_future_times_are_warned_of() {
        use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta};
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let now = now_us();
        // A backup on a host whose clock is an hour ahead: pitr's, obeyed, warned of.
        let ahead = now + 3_600_000_000;
        let fast = running::marker_name(running::RunKind::Backup, ahead, ahead, "fast");
        let text = format!("host=h\npid=1\nkind=backup\nstarted_us={ahead}\nrenewed_us={ahead}\nid=fast\n");
        repo.put_sealed(&fast, text.into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        // A marker of this host's time, and one planted.
        let near = running::marker_name(running::RunKind::Restore, now, now, "near");
        let text = format!("host=h\npid=1\nkind=restore\nstarted_us={now}\nrenewed_us={now}\nid=near\n");
        repo.put_sealed(&near, text.into_bytes(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        let planted = running::marker_name(running::RunKind::Backup, ahead, ahead, "planted");
        // As a bucket writer without the key can: a file in the local repository.
        std::fs::write(dir.path().join(&planted), b"junk").unwrap();

        let (mut findings, mut notes) = (Vec::new(), Vec::new());
        running_findings(&repo, &mut findings, &mut notes).await.unwrap();
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!((findings[0].kind, findings[0].object.as_str()), ("bad-marker", planted.as_str()));
        assert!(findings[0].message.contains("does not open"), "{findings:?}");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with(&format!("warning: {fast}: ")) && notes[0].contains("ahead"), "{notes:?}");
    }

    /// Pin records and restore point entries that do not open are named, as floors and markers
    /// are: `expire` ignores such a pin, and such an entry refuses restores to a name.
    #[tokio::test]
    async fn pin_records_and_restore_point_entries_that_do_not_open_are_findings() {
        use pitr_archive::restore_points::{self, RestorePoint};
        use pitr_archive::{ClusterInfo, KeyRing, LocalStore};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn pitr_archive::Store> = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("k", [3; 32]));
        let cluster =
            ClusterInfo { system_id: 7, wal_segment_size: 16 << 20, wal_page_size: 8192, server_version_num: 150000 };
        repo.put_cluster_info(&cluster).await.unwrap();
        let sound = RestorePoint { name: "ok".into(), timeline: 1, lsn: 0x100_0028, end_lsn: 0x100_0090, time_us: 1 };
        restore_points::record(&repo, 7, &sound).await.unwrap();
        let catalog = Catalog::load(&repo, cluster.clone()).await.unwrap();
        let kinds = |report: &VerifyReport| -> Vec<(&'static str, String)> {
            report
                .findings
                .iter()
                .filter(|f| f.kind == "bad-pin" || f.kind == "bad-restore-point")
                .map(|f| (f.kind, f.object.clone()))
                .collect()
        };
        let report = verify_with(&repo, &catalog, false, 1, None).await.unwrap();
        assert_eq!(kinds(&report), vec![], "a sound entry is no finding: {:?}", report.findings);

        let (pin, entry) = (pg::pin(7, "20260101T000000Z", 0), pg::restore_point(7, 1, 0x200_0028));
        store.put_if_absent(&pin, b"PITRjunk".to_vec().into()).await.unwrap();
        store.put_if_absent(&entry, b"PITRjunk".to_vec().into()).await.unwrap();
        let report = verify_with(&repo, &catalog, false, 1, None).await.unwrap();
        assert_eq!(kinds(&report), vec![("bad-pin", pin), ("bad-restore-point", entry)], "{:?}", report.findings);
        assert!(!report.ok, "{report:?}");
    }
}
