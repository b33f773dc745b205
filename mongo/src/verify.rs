//! `pitr verify --source mongo`: checks, by listing, that the archived oplog chains (each slice
//! follows the one before, see [`crate::layout`]), that every snapshot's blocks are there and its
//! oplog is archived; with `deep`, opens and authenticates every slice and block, checks each
//! slice's entries against its name, translates every entry as restore would, and counts each
//! snapshot's documents.
//!
//! Findings make verification fail. A gap the tailer recorded (the oplog rolled over while it was
//! away) is a known, already-reported loss: it is listed as a warning, so that one past incident
//! does not fail every later check; a hole without such a record is a lost slice and a finding.

use std::collections::BTreeSet;

use bson::Document;
use pitr_archive::Repository;
use serde::Serialize;

use crate::apply::{Entry, Grouper};
use crate::layout::{split_entries, MongoCatalog, Window};
use crate::{MongoError, Ts};

/// One problem found (or, among warnings, one known loss).
#[derive(Debug, Clone, Serialize)]
pub struct MongoFinding {
    /// A stable kebab-case tag: `missing-oplog`, `oplog-gap`, `missing-block`, `slice-order`…
    pub kind: &'static str,
    /// The object concerned (a slice, gap, block or manifest name).
    pub object: String,
    /// What is wrong, and what it means for restores.
    pub message: String,
}

/// What [`verify`] checked and found.
#[derive(Debug, Clone, Serialize)]
pub struct MongoVerifyReport {
    /// No findings (warnings do not count).
    pub ok: bool,
    /// Whether slices and blocks were opened and read ([`verify`]'s `deep`).
    pub deep: bool,
    /// The layout name checked.
    pub name: String,
    /// Oplog slices listed.
    pub slices: usize,
    /// Runs those slices form (more than one: the oplog has holes).
    pub runs: usize,
    /// Snapshot manifests.
    pub snapshots: usize,
    /// Blocks listed.
    pub blocks: usize,
    /// Listed blocks no snapshot refers to (counted, not a finding).
    pub unreferenced_blocks: usize,
    /// Objects opened and authenticated (only with `deep`).
    pub objects_opened: usize,
    /// Oplog entries read and translated (only with `deep`).
    pub entries_checked: u64,
    /// What can be restored to ([`MongoCatalog::windows`]).
    pub windows: Vec<Window>,
    /// Problems: any makes verification fail.
    pub findings: Vec<MongoFinding>,
    /// Known or transient conditions that do not fail it (a recorded gap, a snapshot whose
    /// oplog is not sealed yet).
    pub warnings: Vec<MongoFinding>,
}

fn finding(kind: &'static str, object: impl Into<String>, message: impl Into<String>) -> MongoFinding {
    MongoFinding { kind, object: object.into(), message: message.into() }
}

/// Checks the archive `catalog` lists (see the module's documentation); `deep` also opens every
/// slice and block.
pub async fn verify(repo: &Repository, catalog: &MongoCatalog, deep: bool) -> Result<MongoVerifyReport, MongoError> {
    let layout = &catalog.layout;
    let mut findings = Vec::new();
    let mut warnings = Vec::new();

    // Holes between runs: recorded gaps are warnings, anything else a lost slice.
    for pair in catalog.runs.windows(2) {
        let (before, next) = (&pair[0], &pair[1]);
        let first_after = next.slices.first().cloned().unwrap_or_default();
        if next.after < before.last {
            findings.push(finding(
                "overlapping-slices",
                first_after,
                format!(
                    "this slice starts after {} but the archive already holds entries up to {} \
                     (two tailers writing under the same name?)",
                    next.after, before.last
                ),
            ));
        } else if let Some((archived, on_server)) = catalog.gaps.iter().find(|(a, _)| *a == before.last) {
            warnings.push(finding(
                "oplog-gap",
                layout.gap_name(*archived, *on_server),
                format!(
                    "entries after {archived} and before {on_server} were lost: the oplog rolled over while the \
                     tailer was away (times in between cannot be restored)"
                ),
            ));
        } else {
            findings.push(finding(
                "missing-oplog",
                first_after,
                format!(
                    "no archived slice holds the oplog after {} up to {}: a slice is missing from the repository \
                     (restores stop at {})",
                    before.last, next.after, before.last
                ),
            ));
        }
    }

    let blocks_listed: BTreeSet<String> =
        repo.list(&layout.blocks_prefix()).await?.into_iter().map(|o| o.name).collect();
    let mut referenced = BTreeSet::new();
    let mut objects_opened = 0usize;
    let newest_run = catalog.runs.len().checked_sub(1);
    for s in &catalog.snapshots {
        let manifest = layout.manifest_name(&s.id);
        for c in &s.collections {
            let mut documents = 0u64;
            for id in &c.blocks {
                let object = layout.block_name(id);
                referenced.insert(object.clone());
                if !blocks_listed.contains(&object) {
                    findings.push(finding(
                        "missing-block",
                        &object,
                        format!("block of {}.{} in snapshot {} is missing", c.db, c.name, s.id),
                    ));
                    continue;
                }
                if deep {
                    let (_, bytes) = repo.get_opened(&object).await?;
                    objects_opened += 1;
                    match split_entries(&object, &bytes) {
                        Ok(docs) => documents += docs.len() as u64,
                        Err(e) => findings.push(finding("corrupt-block", &object, e.to_string())),
                    }
                }
            }
            if deep && documents != c.documents {
                findings.push(finding(
                    "document-count",
                    &manifest,
                    format!(
                        "{}.{}: the manifest says {} documents, its blocks hold {documents}",
                        c.db, c.name, c.documents
                    ),
                ));
            }
        }
        match catalog.run_of(s) {
            Some(_) => {}
            // The tailer may simply not have sealed the end of the newest snapshot's dump yet.
            None if newest_run.is_some_and(|r| {
                let run = &catalog.runs[r];
                run.after <= s.ts_before && run.last < s.ts_after
            }) =>
            {
                warnings.push(finding(
                    "snapshot-oplog-pending",
                    &manifest,
                    format!("the oplog up to {} (the end of this snapshot's dump) is not archived yet", s.ts_after),
                ));
            }
            None => findings.push(finding(
                "snapshot-without-oplog",
                &manifest,
                format!(
                    "no unbroken archived oplog covers {} to {}, which this snapshot needs to be consistent: \
                     it cannot be restored",
                    s.ts_before, s.ts_after
                ),
            )),
        }
    }
    let unreferenced_blocks = blocks_listed.difference(&referenced).count();

    let mut entries_checked = 0u64;
    if deep {
        for run in &catalog.runs {
            let mut grouper = Grouper::new();
            let mut previous = run.after;
            for name in &run.slices {
                let Some((after, last)) = layout.parse_slice_name(name) else { continue };
                let (header, bytes) = repo.get_opened(name).await?;
                objects_opened += 1;
                let entries = match split_entries(name, &bytes) {
                    Ok(e) => e,
                    Err(e) => {
                        findings.push(finding("corrupt-slice", name, e.to_string()));
                        continue;
                    }
                };
                let mut seen_last = None;
                for raw in entries {
                    let entry = Document::try_from(raw)
                        .map_err(|e| e.to_string())
                        .and_then(|d| Entry::from_document(&d).map_err(|e| e.to_string()));
                    let entry = match entry {
                        Ok(e) => e,
                        Err(e) => {
                            findings.push(finding("corrupt-slice", name, e));
                            break;
                        }
                    };
                    entries_checked += 1;
                    if entry.ts <= after || entry.ts > last || entry.ts < previous {
                        findings.push(finding(
                            "slice-order",
                            name,
                            format!("entry {} is outside the slice's range or out of order", entry.ts),
                        ));
                        break;
                    }
                    previous = entry.ts;
                    seen_last = Some(entry.ts);
                    if let Err(e) = grouper.push(&entry) {
                        findings.push(finding("untranslatable-entry", name, e.to_string()));
                    }
                }
                if seen_last != Some(last) {
                    findings.push(finding(
                        "slice-order",
                        name,
                        format!("the slice's name says it ends at {last}, its last entry is {}", show(seen_last)),
                    ));
                }
                let packed = (u64::from(last.secs) << 32) | u64::from(last.inc);
                if header.meta.end_lsn != packed {
                    findings.push(finding("slice-header", name, "the header's range does not match the name"));
                }
            }
        }
    }

    Ok(MongoVerifyReport {
        ok: findings.is_empty(),
        deep,
        name: layout.name.clone(),
        slices: catalog.runs.iter().map(|r| r.slices.len()).sum(),
        runs: catalog.runs.len(),
        snapshots: catalog.snapshots.len(),
        blocks: blocks_listed.len(),
        unreferenced_blocks,
        objects_opened,
        entries_checked,
        windows: catalog.windows(),
        findings,
        warnings,
    })
}

fn show(t: Option<Ts>) -> String {
    t.map(|t| t.to_string()).unwrap_or_else(|| "none".into())
}
