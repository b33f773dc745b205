//! `pitr verify`'s journal checks: the signed chains of the primary and every secondary, which
//! is the longest, whether they agree, and whether the repository verified holds every object the
//! chain says is live (name, stored length, hash of the stored bytes) and the WAL up to each
//! `wal_through`. Reading and judging batches is `pitr_archive::journal`'s; this module compares
//! a chain with what one repository holds and words the findings.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use pitr_archive::journal::{self, Chain, Op, WalThrough};
use pitr_archive::repository::OBJECT_READ_MAX;
use pitr_archive::{Repository, WalCatalog, WalLayout};
use pitr_pgformat::lsn::format_lsn;
use pitr_restore::verify::Finding;
use sha2::{Digest, Sha256};

use crate::config::{Config, PRIMARY_NAME};
use crate::{open, sidecar};

/// What the journal checks found: findings fail verification, notes do not.
#[derive(Debug, Default)]
pub struct JournalCheck {
    /// Problems (each names the object).
    pub findings: Vec<Finding>,
    /// What was checked, and what is worth knowing but not wrong.
    pub notes: Vec<String>,
}

fn finding(kind: &'static str, object: impl Into<String>, message: impl Into<String>) -> Finding {
    Finding { kind, object: object.into(), message: message.into() }
}

/// A live object as the chain says it: stored length, hash, and the batch that put it.
struct Live {
    len: u64,
    sha256: String,
    seq: u64,
}

/// The prefixes journaled objects live under ([`journal::is_journaled`]): per cluster its WAL,
/// backup manifests, pins and restore points; per MongoDB source its oplog slices, gaps and
/// snapshot manifests; the file sets' and dumps' manifests. Never a block prefix: listing those
/// reads every block of the repository.
pub async fn journaled_prefixes(repo: &Repository) -> Result<Vec<String>> {
    use pitr_archive::names::{files, mongo, pg};
    let mut out = vec![files::SETS.to_string(), files::DUMPS.to_string()];
    for child in repo.store().list_children(pg::ROOT).await? {
        let Some(id) =
            child.strip_prefix(pg::ROOT).and_then(|c| c.strip_suffix('/')).and_then(|c| c.parse::<u64>().ok())
        else {
            continue;
        };
        out.extend([pg::wal_prefix(id), pg::backups_prefix(id), pg::pins_prefix(id), pg::restore_points_prefix(id)]);
    }
    for child in repo.store().list_children(mongo::ROOT).await? {
        let Some(source) = child.strip_prefix(mongo::ROOT).and_then(|c| c.strip_suffix('/')) else { continue };
        if source.is_empty() || source.contains('/') {
            continue;
        }
        out.extend([mongo::oplog_prefix(source), mongo::gaps_prefix(source), mongo::snapshots_prefix(source)]);
    }
    Ok(out)
}

/// The journaled objects `repo` holds, with their stored sizes: [`journaled_prefixes`] listed.
async fn list_journaled(repo: &Repository) -> Result<BTreeMap<String, u64>> {
    let mut listed = BTreeMap::new();
    for prefix in journaled_prefixes(repo).await? {
        for o in repo.list(&prefix).await.with_context(|| format!("listing {prefix}"))? {
            if journal::is_journaled(&o.name) {
                listed.insert(o.name, o.size);
            }
        }
    }
    Ok(listed)
}

/// [`check`], with a journal that cannot be read (storage down, a key that does not load) made a
/// `journal-unreadable` finding: the rest of a verify report is still printed and counted. Used
/// by `pitr verify` and the sidecar's scheduled verification.
pub async fn check_or_finding(config: &Config, from: Option<&str>, repo: &Repository, deep: bool) -> JournalCheck {
    // Boxed as `Send` here, where the lifetimes are concrete: the scheduler spawns this.
    let checked: std::pin::Pin<Box<dyn std::future::Future<Output = Result<JournalCheck>> + Send + '_>> =
        Box::pin(check(config, from, repo, deep));
    match checked.await {
        Ok(c) => c,
        Err(e) => JournalCheck {
            findings: vec![finding(
                "journal-unreadable",
                pitr_archive::names::journal::PREFIX,
                format!("the journal could not be checked: {e:#}"),
            )],
            notes: Vec::new(),
        },
    }
}

/// Checks `repo` (the repository `from` names, the primary without it) against the journal.
/// `deep` also hashes WAL segments (always: every other journaled object).
pub async fn check(config: &Config, from: Option<&str>, repo: &Repository, deep: bool) -> Result<JournalCheck> {
    let mut out = JournalCheck::default();
    let here_name = from.unwrap_or(PRIMARY_NAME).to_string();
    let Some(section) = config.journal.as_ref() else {
        let batches = repo.list(pitr_archive::names::journal::PREFIX).await?.len();
        out.notes.push(if batches == 0 {
            "no journal".to_string()
        } else {
            format!("journal: {batches} batches present, not checked: the config has no [journal] section")
        });
        return Ok(out);
    };
    let key = section.verifying_key()?;
    let keys = open::key_ring(config)?;
    // The local high-water mark is read before any chain: a batch is stored before its mark is
    // written, so a running sidecar's newer mark cannot look like a rollback of what we load.
    let hwm_path = sidecar::journal_high_water_file(&config.status_file());
    let high_water = journal::HighWater::read(&hwm_path);
    let mut chains: Vec<(String, Chain)> = Vec::new();
    // Secondaries first, the primary last: batches are copied from the primary, so one written
    // while we read is never in a secondary's chain without being in the primary's.
    let mut stores = open::named_stores(config)?;
    stores.rotate_left(1);
    for named in stores {
        let what = || format!("reading the journal of repository {:?} ({})", named.name, named.store.location());
        match journal::load_chain(named.store.clone(), keys.clone(), &key).await {
            Ok(chain) => chains.push((named.name, chain)),
            // Another repository out of reach: checked without its journal, and said so.
            Err(e) if named.name != here_name => {
                out.notes.push(format!("{}: {e} (its journal is not compared)", what()))
            }
            Err(e) => return Err(e).with_context(what),
        }
    }
    let Some(here_index) = chains.iter().position(|(n, _)| *n == here_name) else {
        anyhow::bail!("--from {here_name}: no repository of that name");
    };
    let head_text = |c: &Chain| c.head_seq().map(|s| s.to_string()).unwrap_or_else(|| "nothing (no batch)".into());

    // Refused objects under journal/ in the repository verified are findings; elsewhere, notes.
    for (name, chain) in &chains {
        for p in &chain.problems {
            if *name == here_name {
                out.findings.push(finding("journal-bad-batch", &p.name, p.what.clone()));
            } else {
                out.notes.push(format!("journal of {name}: {} {}", p.name, p.what));
            }
        }
    }
    // Two chains that disagree at a seq: one of them is not the history this key signed in order.
    let (here, others) = (&chains[here_index].1, &chains);
    for (name, other) in others.iter().filter(|(n, _)| *n != here_name) {
        if let Some(seq) =
            here.batches.iter().find_map(|b| other.at(b.body.seq).filter(|o| o.hash != b.hash).map(|_| b.body.seq))
        {
            out.findings.push(finding(
                "journal-fork",
                pitr_archive::names::journal::batch(seq),
                format!(
                    "the journals of {here_name} and {name} disagree at seq {seq}: a fork of the archive's history"
                ),
            ));
        }
    }
    // A seq one chain holds a signed batch at and another chained past as untrusted: that
    // repository's batch was replaced (or deleted) after it was copied, and a writer skipped it.
    for (name, other) in others.iter().filter(|(n, _)| *n != here_name) {
        let skipped_here = other.batches.iter().map(|b| b.body.seq).find(|s| here.passes_over(*s));
        let skipped_there = here.batches.iter().map(|b| b.body.seq).find(|s| other.passes_over(*s));
        for (seq, skipper, holder) in
            [(skipped_here, here_name.as_str(), name.as_str()), (skipped_there, name.as_str(), here_name.as_str())]
        {
            if let Some(seq) = seq {
                out.findings.push(finding(
                    "journal-fork",
                    pitr_archive::names::journal::batch(seq),
                    format!(
                        "{holder} holds a signed batch at seq {seq} that the journal of {skipper} chained past as untrusted: the batch in {skipper} was replaced or deleted"
                    ),
                ));
            }
        }
    }
    // The longest valid chain is the history the repository is held to.
    let (best_name, best) = chains
        .iter()
        .max_by_key(|(n, c)| (c.head_seq().map(|s| s + 1).unwrap_or(0), *n == here_name))
        .map(|(n, c)| (n.clone(), c))
        .unwrap_or((here_name.clone(), here));
    let Some(best_head) = best.head_seq() else {
        if chains.iter().all(|(_, c)| c.problems.is_empty()) {
            out.findings.push(finding(
                "journal-none",
                pitr_archive::names::journal::PREFIX,
                "[journal] is configured but no repository holds a journal batch: nothing was journaled yet, or every batch was deleted",
            ));
        } else {
            out.notes.push("no trusted journal batch in any repository".into());
        }
        return Ok(out);
    };
    let is_primary = here_name == PRIMARY_NAME;
    let here_head = here.head_seq();
    if best_name != here_name {
        let message = format!(
            "the repository's journal ends at seq {}, {} holds up to {best_head}",
            head_text(here),
            if best_name == PRIMARY_NAME { "the primary".to_string() } else { format!("secondary {best_name}") }
        );
        if is_primary {
            out.findings.push(finding(
                "journal-rolled-back",
                pitr_archive::names::journal::batch(here_head.map(|s| s + 1).unwrap_or(0)),
                format!("{message}: the repository was rolled back or its newest objects deleted"),
            ));
        } else {
            out.notes.push(format!(
                "{message}: this copy lags (objects journaled after its own head are not required here)"
            ));
        }
    }
    for (name, other) in chains.iter().filter(|(n, _)| *n != here_name && *n != best_name) {
        if other.head_seq() < Some(best_head) {
            out.notes.push(format!(
                "the journal of {name} ends at seq {}, {best_name}'s at {best_head}{}",
                head_text(other),
                if name == PRIMARY_NAME {
                    ": the primary was rolled back or lost its newest objects (verify it)"
                } else {
                    ""
                }
            ));
        }
    }
    // The sidecar's local high-water mark (this host's last batch) witnesses the primary.
    if is_primary {
        let origin = best.at(0).map(|b| hex::encode(b.hash));
        match high_water {
            Ok(Some(mark)) if !mark.same_journal(&journal::key_id(&key), origin.as_deref()) => out.notes.push(format!(
                "journal high-water mark {} ignored: it is of another {} (re-initialised, or the key was replaced); the sidecar replaces it at its next batch",
                hwm_path.display(),
                if mark.key_id.is_empty() || mark.key_id == journal::key_id(&key) { "repository" } else { "signing key" }
            )),
            Ok(Some(mark)) => match best.at(mark.seq) {
                Some(b) if hex::encode(b.hash) == mark.hash => {}
                Some(_) => out.findings.push(finding(
                    "journal-fork",
                    pitr_archive::names::journal::batch(mark.seq),
                    format!("the local high-water mark {} names another batch at seq {}: the journal was rewritten", hwm_path.display(), mark.seq),
                )),
                None => out.findings.push(finding(
                    "journal-rolled-back",
                    pitr_archive::names::journal::batch(mark.seq),
                    format!(
                        "the repository's journal ends at seq {best_head}, the local high-water mark {} says seq {} was written: the repository was rolled back or its newest objects deleted",
                        hwm_path.display(),
                        mark.seq
                    ),
                )),
            },
            Ok(None) => {}
            Err(e) => out.notes.push(format!("journal high-water mark {} unreadable: {e}", hwm_path.display())),
        }
    }

    // Replay: what is live, with the batch that put it, and the newest wal_through per cluster.
    // A copy is held only to what its own journal reached.
    let required_through = if is_primary { best_head } else { here_head.unwrap_or(0) };
    let mut live: BTreeMap<String, Live> = BTreeMap::new();
    let mut deleted = std::collections::BTreeSet::new();
    let mut wal_through: BTreeMap<u64, (WalThrough, u64)> = BTreeMap::new();
    for b in &best.batches {
        for e in &b.body.entries {
            match e.op {
                Op::Put => {
                    deleted.remove(&e.name);
                    live.insert(e.name.clone(), Live { len: e.len, sha256: e.sha256.clone(), seq: b.body.seq });
                }
                Op::Delete => {
                    live.remove(&e.name);
                    deleted.insert(e.name.clone());
                }
            }
        }
        if b.body.seq <= required_through || is_primary {
            for w in &b.body.wal_through {
                wal_through.insert(w.cluster, (*w, b.body.seq));
            }
        }
    }
    let listed = list_journaled(repo).await?;
    let (mut checked, mut lagging, mut hashed) = (0usize, 0usize, 0usize);
    let mut missing: Vec<(&String, &Live)> = Vec::new();
    for (name, l) in &live {
        let required = l.seq <= required_through;
        let Some(size) = listed.get(name) else {
            if required {
                missing.push((name, l));
            } else {
                lagging += 1;
            }
            continue;
        };
        checked += 1;
        if *size != l.len {
            out.findings.push(finding(
                "journal-changed",
                name,
                format!("holds {size} bytes, the journal (batch {}) says {}: replaced", l.seq, l.len),
            ));
            continue;
        }
        let is_segment = name.ends_with(".seg");
        if deep || !is_segment {
            let bytes = match repo.store().get_limited(name, OBJECT_READ_MAX).await {
                Ok(bytes) => bytes,
                Err(e @ pitr_archive::StoreError::TooLarge { .. }) => {
                    out.findings.push(finding("journal-changed", name, format!("{e}: not the journaled object")));
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("reading {name} to check its journaled hash")),
            };
            hashed += 1;
            if hex::encode(Sha256::digest(&bytes)) != l.sha256 {
                out.findings.push(finding(
                    "journal-changed",
                    name,
                    format!("its stored bytes are not the ones journaled in batch {}: replaced", l.seq),
                ));
            }
        }
    }
    // An expire running since the chain was read journals its deletes in batches after our head,
    // then deletes: read those (few) before calling anything missing.
    if !missing.is_empty() {
        let late = deleted_after(repo, &key, here_head.map(|s| s.saturating_add(1)).unwrap_or(0)).await?;
        for (name, l) in missing.into_iter().filter(|(n, _)| !late.contains(*n)) {
            out.findings.push(finding(
                "journal-missing",
                name,
                format!(
                    "journaled as stored (batch {}, {} bytes) but not in the repository: deleted or rolled back",
                    l.seq, l.len
                ),
            ));
        }
    }
    if lagging > 0 {
        out.notes.push(format!(
            "journal: {lagging} objects journaled after this repository's own journal head are not here yet"
        ));
    }
    let unjournaled = listed.keys().filter(|n| !live.contains_key(*n) && !deleted.contains(*n)).count();
    let leftover = listed.keys().filter(|n| deleted.contains(*n)).count();
    if unjournaled > 0 {
        out.notes.push(format!(
            "journal: {unjournaled} objects are not journaled (newer than the journal's head, or written without the journal key)"
        ));
    }
    if leftover > 0 {
        out.notes.push(format!(
            "journal: {leftover} objects the journal says were deleted are still present (a stop between the journaled delete and the delete; the next expire removes them)"
        ));
    }

    // WAL up to each cluster's newest wal_through.
    for (cluster, (w, seq)) in &wal_through {
        let info = match repo.cluster_info(*cluster).await {
            Ok(info) => info,
            Err(e) => {
                out.findings.push(finding(
                    "journal-wal",
                    pitr_archive::names::pg::cluster_info(*cluster),
                    format!("the journal (batch {seq}) says WAL of cluster {cluster} was archived, but its record does not read: {e}"),
                ));
                continue;
            }
        };
        let layout = WalLayout::new(&info);
        let catalog = WalCatalog::build(repo, layout).await?;
        if w.lsn == 0 {
            continue;
        }
        let segno = layout.segno_of(w.lsn - 1);
        let need = w.lsn - layout.segment_start(segno);
        let held = catalog.segments.get(&(w.tli, segno)).map(|e| e.held_from_start(layout.segment_size)).unwrap_or(0);
        if held < need {
            let segment = layout.segment_file_name(w.tli, segno);
            out.findings.push(finding(
                "journal-wal",
                pitr_archive::names::pg::wal_segment(*cluster, &segment),
                format!(
                    "the journal (batch {seq}) says WAL was archived through {} on timeline {}, the repository holds segment {segment} only up to {}: its newest WAL was deleted or rolled back",
                    format_lsn(w.lsn),
                    w.tli,
                    format_lsn(layout.segment_start(segno) + held)
                ),
            ));
        }
    }
    out.notes.push(format!(
        "journal: chain of {} batches (head seq {best_head}, from {best_name}), {checked} journaled objects present, {hashed} hashed{}",
        best.batches.len(),
        if deep { "" } else { " (WAL segments by length; --deep hashes them)" }
    ));
    Ok(out)
}

/// The names trusted batches from seq `from` on (written since the chain was read) journal as
/// deleted; stops at the first absent seq, after at most [`LATE_BATCHES_MAX`] batches.
async fn deleted_after(
    repo: &Repository,
    key: &journal::VerifyingKey,
    from: u64,
) -> Result<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    for seq in (from..).take(LATE_BATCHES_MAX) {
        let name = pitr_archive::names::journal::batch(seq);
        let plaintext = match repo.get_record_here(&name).await {
            Ok((_, plaintext)) => plaintext,
            Err(pitr_archive::RepositoryError::Store(e)) if e.is_not_found() => break,
            // Untrusted: named by the chain's checks already.
            Err(e) if e.is_untrusted_object() => continue,
            Err(e) => return Err(e).with_context(|| format!("reading journal batch {name}")),
        };
        if let Ok(b) = journal::check_batch(&name, &plaintext, key) {
            out.extend(b.body.entries.into_iter().filter(|e| e.op == Op::Delete).map(|e| e.name));
        }
    }
    Ok(out)
}

/// How many batches written while verify ran it reads for late deletes.
const LATE_BATCHES_MAX: usize = 1000;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pitr_archive::{KeyRing, LocalStore, Store};

    use super::*;

    #[tokio::test]
    async fn a_journal_that_cannot_be_checked_is_a_finding_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let public = journal::public_key_text(&journal::JournalSigner::from_seed([2; 32]).verifying_key());
        let text = format!(
            "[repository]\npath = {:?}\n[encryption]\nkey_file = {:?}\n[journal]\npublic_key = {public:?}\n",
            dir.path().join("repo").display().to_string(),
            dir.path().join("missing.key").display().to_string()
        );
        let config = Config::parse(&text, &[]).unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store, KeyRing::from_key("a", [1; 32]));
        let checked = check_or_finding(&config, None, &repo, false).await;
        assert_eq!(checked.findings.len(), 1, "{:?}", checked.findings);
        assert_eq!(checked.findings[0].kind, "journal-unreadable");
        assert!(checked.findings[0].message.contains("could not be checked"), "{}", checked.findings[0].message);
    }

    #[tokio::test]
    async fn only_journaled_prefixes_are_listed_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let repo = Repository::new(store.clone(), KeyRing::from_key("a", [1; 32]));
        let block = format!("pg/7/blocks/ab/ab{}", "0".repeat(62));
        let wanted = [
            "pg/7/wal/000000010000000000000001.seg",
            "pg/7/backups/20261121T000000Z.manifest",
            "files/sets/etc/20261121T000000Z.manifest",
        ];
        for name in wanted.iter().copied().chain([block.as_str(), "pg/7/cluster"]) {
            store.put_if_absent(name, hyper::body::Bytes::from_static(b"x")).await.unwrap();
        }
        let prefixes = journaled_prefixes(&repo).await.unwrap();
        assert!(prefixes.iter().all(|p| !p.contains("blocks")), "{prefixes:?}");
        assert!(prefixes.contains(&"pg/7/wal/".to_string()), "{prefixes:?}");
        let listed = list_journaled(&repo).await.unwrap();
        assert_eq!(listed.keys().map(String::as_str).collect::<Vec<_>>(), {
            let mut w = wanted.to_vec();
            w.sort();
            w
        });
    }
}
