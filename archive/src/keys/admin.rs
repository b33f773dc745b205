//! The operator's key commands: what needs which key (`keys list`), moving repository keys from
//! one master key to another (`keys rewrap`) and retiring a master key (`keys retire`).
//!
//! Rewrap writes only key records: for each repository key wrapped by the old master key it puts
//! a wrap under the active master key, then deletes the old wrap. Each step is idempotent and
//! every moment leaves each repository key wrapped at least once, so a kill at any point loses
//! nothing and a rerun finishes the job. Objects are never rewritten.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use serde::Serialize;

use super::master::{self, MasterSource};
use super::record::{self, RetiredRecord, WrapRecord};
use super::ring::{read_wrap, store_access, KeyRing};
use super::KeyError;
use crate::seal;
use crate::store::{PutOutcome, Store};

/// How many objects' first bytes are read at once by a scan.
const SCAN_CONCURRENCY: usize = 16;

/// How many objects name each key id in their header, over the whole repository (the key records
/// aside), read from each object's first bytes. Objects that are not sealed objects are counted
/// under `unreadable`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct KeyUsage {
    /// Key id → objects naming it.
    pub objects: BTreeMap<String, u64>,
    /// Objects whose first bytes name no key (not sealed, cut short).
    pub unreadable: u64,
}

/// Reads the key id of every object (except the key records).
pub async fn scan(store: &dyn Store) -> Result<KeyUsage, KeyError> {
    let listed = store.list("").await.map_err(|e| store_access(store, "list", e))?;
    let names: Vec<String> = listed.into_iter().map(|o| o.name).filter(|n| !n.starts_with(record::KEYS)).collect();
    let mut usage = KeyUsage::default();
    let mut reads = futures_util::stream::iter(names.into_iter().map(|name| async move {
        let bytes = store.get_range(&name, 0..seal::KEY_ID_PREFIX_LEN).await;
        (name, bytes)
    }))
    .buffer_unordered(SCAN_CONCURRENCY);
    while let Some((name, bytes)) = reads.next().await {
        match bytes {
            // Deleted since the listing (a compacted chunk, an expired object): not counted.
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(store_access(store, "read", format!("{name}: {e}"))),
            Ok(bytes) => match seal::peek_key_id(&name, &bytes) {
                Ok(id) => *usage.objects.entry(id).or_default() += 1,
                Err(_) => usage.unreadable += 1,
            },
        }
    }
    Ok(usage)
}

/// One master key as `keys list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MasterKeyInfo {
    /// Its id.
    pub id: String,
    /// `key_file`, `key_env`, `key_command`, `kms`, or `not configured` for a key the records name
    /// that no source holds.
    pub source: String,
    /// The source in words (`key file /etc/pitr/key`).
    pub location: String,
    /// When it was made, if known (RFC 3339).
    pub created: Option<String>,
    /// Whether it wraps new repository keys.
    pub active: bool,
    /// When it was retired, if it was (RFC 3339).
    pub retired: Option<String>,
    /// The repository keys it wraps.
    pub wraps: Vec<String>,
    /// Objects that only this key opens: those of repository keys it alone wraps, and those
    /// naming it directly. `None` without a scan.
    pub objects_needing_it: Option<u64>,
}

/// One repository key as `keys list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RepositoryKeyInfo {
    /// Its id.
    pub id: String,
    /// When it was made (RFC 3339), from a wrap record.
    pub created: Option<String>,
    /// Whether it seals new objects.
    pub active: bool,
    /// The master keys wrapping it.
    pub wrapped_by: Vec<String>,
    /// Objects sealed with it. `None` without a scan.
    pub objects: Option<u64>,
}

/// What `keys list` shows.
#[derive(Debug, Clone, Serialize)]
pub struct KeyListing {
    /// Master keys: configured ones first, then ones the records name that no source holds.
    pub master_keys: Vec<MasterKeyInfo>,
    /// Repository keys, oldest first.
    pub repository_keys: Vec<RepositoryKeyInfo>,
    /// Objects whose header names a key that is neither (planted, or left from a lost key).
    pub objects_with_unknown_keys: BTreeMap<String, u64>,
}

/// Every key and, with `count`, how many objects need each (a scan of every object's first bytes).
pub async fn list(ring: &KeyRing, store: &dyn Store, count: bool) -> Result<KeyListing, KeyError> {
    let masters = ring.masters();
    let active = ring.active_info(store, false).await.ok();
    let wraps = ring.list_wraps(store).await?;
    let retired = retired_records(store).await?;
    let usage = if count { Some(scan(store).await?) } else { None };
    let mut repository_keys = Vec::new();
    for (rk, mks) in &wraps {
        let name = record::wrap_name(rk, &mks[0]);
        let created = match store.get_limited(&name, record::RECORD_MAX).await {
            Ok(bytes) => {
                WrapRecord::parse(&name, &bytes).ok().map(|r| crate::time::format_rfc3339_seconds(r.created_us))
            }
            Err(_) => None,
        };
        repository_keys.push(RepositoryKeyInfo {
            id: rk.clone(),
            created,
            active: active.as_ref().is_some_and(|a| &a.id == rk),
            wrapped_by: mks.clone(),
            objects: usage.as_ref().map(|u| u.objects.get(rk).copied().unwrap_or(0)),
        });
    }
    repository_keys.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    let needing = |id: &str| -> Option<u64> {
        let usage = usage.as_ref()?;
        let through_wraps: u64 = wraps
            .iter()
            .filter(|(_, mks)| mks.len() == 1 && mks[0] == id)
            .map(|(rk, _)| usage.objects.get(rk).copied().unwrap_or(0))
            .sum();
        let direct = if wraps.contains_key(id) { 0 } else { usage.objects.get(id).copied().unwrap_or(0) };
        Some(through_wraps + direct)
    };
    let wraps_of = |id: &str| -> Vec<String> {
        wraps.iter().filter(|(_, mks)| mks.iter().any(|m| m == id)).map(|(rk, _)| rk.clone()).collect()
    };
    let mut master_keys = Vec::new();
    for k in masters.all() {
        master_keys.push(MasterKeyInfo {
            id: k.id.clone(),
            source: k.source.kind().to_string(),
            location: k.source.to_string(),
            created: k.created_us.map(crate::time::format_rfc3339_seconds),
            active: k.id == masters.active().id,
            retired: retired.get(&k.id).map(|us| crate::time::format_rfc3339_seconds(*us)),
            wraps: wraps_of(&k.id),
            objects_needing_it: needing(&k.id),
        });
    }
    let mut unconfigured: Vec<String> =
        wraps.values().flatten().filter(|m| masters.get(m).is_none()).cloned().collect();
    unconfigured.extend(retired.keys().filter(|m| masters.get(m).is_none()).cloned());
    unconfigured.sort();
    unconfigured.dedup();
    for id in unconfigured {
        master_keys.push(MasterKeyInfo {
            source: "not configured".into(),
            location: "no configured source holds it".into(),
            created: None,
            active: false,
            retired: retired.get(&id).map(|us| crate::time::format_rfc3339_seconds(*us)),
            wraps: wraps_of(&id),
            objects_needing_it: needing(&id),
            id,
        });
    }
    let mut objects_with_unknown_keys = BTreeMap::new();
    if let Some(usage) = &usage {
        for (id, n) in &usage.objects {
            if !wraps.contains_key(id) && masters.get(id).is_none() {
                objects_with_unknown_keys.insert(id.clone(), *n);
            }
        }
    }
    Ok(KeyListing { master_keys, repository_keys, objects_with_unknown_keys })
}

/// Retired master keys → when (µs). A record that does not parse counts as retired at 0.
async fn retired_records(store: &dyn Store) -> Result<BTreeMap<String, i64>, KeyError> {
    let listed = store.list(record::RETIRED).await.map_err(|e| store_access(store, "list", e))?;
    let mut out = BTreeMap::new();
    for o in listed {
        let Some(id) = record::parse_retired_name(&o.name) else { continue };
        let when = match store.get_limited(&o.name, record::RECORD_MAX).await {
            Ok(bytes) => RetiredRecord::parse(&o.name, &bytes).map(|r| r.retired_us).unwrap_or(0),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(store_access(store, "read", e)),
        };
        out.insert(id.to_string(), when);
    }
    Ok(out)
}

/// What `keys rewrap` did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RewrapReport {
    /// The master key now wrapping them.
    pub to: String,
    /// Repository keys given a wrap under the active master key (or found with one already).
    pub rewrapped: Vec<String>,
    /// Master keys whose material was adopted as a repository key of the same id, because
    /// objects written before repository keys existed name them directly.
    pub adopted: Vec<String>,
    /// Wrap records deleted.
    pub removed: Vec<String>,
    /// A repository key made under the active master key first, because there was none.
    pub rotated: Option<String>,
}

/// Moves every repository key wrapped by `from` (default: by any master key but the active one)
/// under the active master key, then deletes the old wraps.
pub async fn rewrap(ring: &KeyRing, store: &dyn Store, from: Option<&str>) -> Result<RewrapReport, KeyError> {
    ring.invalidate();
    let masters = ring.masters();
    let active = masters.active().clone();
    if from == Some(active.id.as_str()) {
        return Err(KeyError::Refused(format!(
            "{} is the active master key; rewrap moves keys onto it (rotate first, or set active_key)",
            active.id
        )));
    }
    let moves = |mk: &str| mk != active.id && from.is_none_or(|f| f == mk);
    let mut report = RewrapReport { to: active.id.clone(), ..Default::default() };

    // A repository key made under the active master key comes first: without one, the newest key
    // moved onto it would seal new objects from now on, an old (perhaps the exposed) key.
    let wraps = ring.list_wraps(store).await?;
    if !wraps.values().any(|mks| mks.contains(&active.id)) {
        report.rotated = Some(ring.rotate(store).await?.id);
    }

    // Objects that name a master key directly: that key's material becomes a repository key of
    // its own id, wrapped by the active master key, before anything else changes. A record under
    // its id counts only if it really holds that key.
    let mut legacy_candidates = Vec::new();
    for k in masters.all().iter().filter(|k| moves(&k.id) && k.as_wrapping_key().is_some()) {
        if !is_adopted(ring, store, k, wraps.get(&k.id).map(Vec::as_slice).unwrap_or(&[])).await {
            legacy_candidates.push(k);
        }
    }
    if !legacy_candidates.is_empty() {
        let usage = scan(store).await?;
        for k in legacy_candidates {
            if usage.objects.get(&k.id).copied().unwrap_or(0) == 0 {
                continue;
            }
            let Some(material) = k.as_wrapping_key() else { continue };
            let created_us = k.created_us.unwrap_or(0);
            put_wrap(store, &active, &k.id, created_us, material.material()).await?;
            report.adopted.push(k.id.clone());
        }
    }

    let wraps = ring.list_wraps(store).await?;
    let mut failed = Vec::new();
    for (rk, mks) in &wraps {
        let old: Vec<String> = mks.iter().filter(|m| moves(m)).cloned().collect();
        if old.is_empty() {
            continue;
        }
        // One key that cannot be moved does not stop the others; its old wraps stay.
        match move_one(ring, store, &active, rk, mks, &old).await {
            Ok(mut removed) => {
                report.rewrapped.push(rk.clone());
                report.removed.append(&mut removed);
            }
            Err(e) => failed.push(format!("{rk}: {e}")),
        }
    }
    ring.invalidate();
    if !failed.is_empty() {
        return Err(KeyError::Refused(format!(
            "rewrap moved {} repository keys but not {}: {}; their old wraps are kept; rerun after fixing",
            report.rewrapped.len(),
            failed.len(),
            failed.join("; ")
        )));
    }
    Ok(report)
}

/// Gives repository key `rk` (wrapped by `mks`) a wrap under `active` and deletes its wraps by
/// `old`. The new wrap is written, or an existing one proven to hold the same key, before any
/// old wrap goes: a junk record under the active master key's name must not cost the only good
/// wrap.
async fn move_one(
    ring: &KeyRing,
    store: &dyn Store,
    active: &master::MasterKey,
    rk: &str,
    mks: &[String],
    old: &[String],
) -> Result<Vec<String>, KeyError> {
    // The material through an old wrap (one a configured master key opens), else any other.
    let from_old = unwrap_any(ring, store, rk, old).await;
    if mks.iter().any(|m| m == &active.id) {
        let (present, present_created) = unwrap_any(ring, store, rk, std::slice::from_ref(&active.id)).await?;
        if let Ok((material, created_us)) = &from_old {
            if **material != *present || *created_us != present_created {
                return Err(KeyError::BadRecord {
                    name: record::wrap_name(rk, &active.id),
                    what: "holds another key than the old wraps: not deleting them".into(),
                });
            }
        }
    } else {
        let (material, created_us) = match from_old {
            Ok(found) => found,
            Err(_) => unwrap_any(ring, store, rk, mks).await?,
        };
        put_wrap(store, active, rk, created_us, &material).await?;
    }
    let mut removed = Vec::new();
    for m in old {
        let name = record::wrap_name(rk, m);
        match store.delete(&name).await {
            Ok(()) => removed.push(name),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(store_access(store, "delete", format!("{name}: {e}"))),
        }
    }
    Ok(removed)
}

/// Whether master key `k`'s material is a repository key of its own id: some wrap of that id
/// under a configured master key (`wrapped_by`) unwraps to exactly `k`'s key.
async fn is_adopted(ring: &KeyRing, store: &dyn Store, k: &master::MasterKey, wrapped_by: &[String]) -> bool {
    let Some(own) = k.as_wrapping_key() else { return false };
    let others: Vec<String> = wrapped_by.iter().filter(|m| **m != k.id).cloned().collect();
    match unwrap_any(ring, store, &k.id, &others).await {
        Ok((material, _)) => *material == **own.material(),
        Err(_) => false,
    }
}

async fn unwrap_any(
    ring: &KeyRing,
    store: &dyn Store,
    rk: &str,
    mks: &[String],
) -> Result<(zeroize::Zeroizing<[u8; 32]>, i64), KeyError> {
    let masters = ring.masters();
    let mut last = None;
    for mk in mks {
        let Some(master) = masters.get(mk) else { continue };
        let name = record::wrap_name(rk, mk);
        let attempt = async {
            let rec = read_wrap(store, &name)
                .await?
                .ok_or_else(|| store_access(store, "read", format!("{name}: not found")))?;
            let material = master.unwrap(&name, rk, rec.created_us, &rec.wrapped).await?;
            Ok::<_, KeyError>((material, rec.created_us))
        };
        match attempt.await {
            Ok(found) => return Ok(found),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        KeyError::Refused(format!(
            "repository key {rk} is wrapped only by master keys that are not configured ({}): add one of them to a key source to rewrap it",
            mks.join(", ")
        ))
    }))
}

/// Wraps repository key `rk` under `master` as well (`keys/wraps/<rk>/<master>`), which need not
/// be a configured key: the key rotation drill's in-memory master key. The material comes from
/// whichever of `wrapped_by` (as [`KeyRing::list_wraps`] lists them) a configured master key of
/// `ring` opens. Put-if-absent; an existing record must unwrap to the same key.
pub async fn add_wrap(
    ring: &KeyRing,
    store: &dyn Store,
    rk: &str,
    wrapped_by: &[String],
    master: &master::MasterKey,
) -> Result<(), KeyError> {
    let (material, created_us) = unwrap_any(ring, store, rk, wrapped_by).await?;
    put_wrap(store, master, rk, created_us, &material).await
}

/// Puts the wrap of `rk` under `master`; if it exists, it must unwrap to the same material.
async fn put_wrap(
    store: &dyn Store,
    master: &master::MasterKey,
    rk: &str,
    created_us: i64,
    material: &[u8; 32],
) -> Result<(), KeyError> {
    let name = record::wrap_name(rk, &master.id);
    let wrapped = master.wrap(rk, created_us, material).await?;
    let rec = WrapRecord { repository_key: rk.into(), master_key: master.id.clone(), created_us, wrapped };
    match store.put_if_absent(&name, rec.to_bytes().into()).await.map_err(|e| store_access(store, "write", e))? {
        PutOutcome::Created => Ok(()),
        PutOutcome::AlreadyExists => {
            let existing = read_wrap(store, &name)
                .await?
                .ok_or_else(|| store_access(store, "read", format!("{name}: not found")))?;
            let found = master.unwrap(&name, rk, existing.created_us, &existing.wrapped).await?;
            if *found == *material && existing.created_us == created_us {
                Ok(())
            } else {
                Err(KeyError::BadRecord { name, what: "exists with another key or creation time".into() })
            }
        }
    }
}

/// What `keys retire` did.
#[derive(Debug, Clone, Serialize)]
pub struct RetireReport {
    /// The retired master key.
    pub id: String,
    /// Where it was configured (`key file …`), if anywhere.
    pub source: Option<String>,
    /// Whether its line was removed from the key file.
    pub removed_from_key_file: bool,
    /// What the operator still has to do (remove it from a variable or secret manager, schedule
    /// the KMS key's deletion).
    pub next_steps: Vec<String>,
}

/// Retires master key `id`: refused while it is active, wraps a repository key, or objects name
/// it directly; then records it retired and removes it from the key file.
pub async fn retire(ring: &KeyRing, store: &dyn Store, id: &str) -> Result<RetireReport, KeyError> {
    ring.invalidate();
    let masters = ring.masters();
    if masters.active().id == id {
        return Err(KeyError::Refused(format!(
            "{id} is the active master key: rotate to another (`pitr keys rotate`, or active_key) first"
        )));
    }
    let wraps = ring.list_wraps(store).await?;
    let still: Vec<&String> = wraps.iter().filter(|(_, mks)| mks.iter().any(|m| m == id)).map(|(rk, _)| rk).collect();
    if !still.is_empty() {
        return Err(KeyError::Refused(format!(
            "master key {id} still wraps repository keys {}: run `pitr keys rewrap --from {id}` first",
            still.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    // Only a configured master key, or one retired before (a rerun after a kill), is retired:
    // a repository key's id or a mistyped id would be recorded "retired" while nothing changed.
    let known = masters.get(id).is_some() || retired_records(store).await?.contains_key(id);
    if wraps.contains_key(id) && !known {
        return Err(KeyError::Refused(format!(
            "{id} is a repository key, not a master key: retire retires master keys (see `pitr keys list`); a \
             repository key is needed as long as objects sealed with it are kept"
        )));
    }
    // Objects naming it directly need it unless its material is provably a repository key of
    // its own (adopted by rewrap); a record merely named after it proves nothing.
    let adopted = match masters.get(id) {
        Some(k) => is_adopted(ring, store, k, wraps.get(id).map(Vec::as_slice).unwrap_or(&[])).await,
        None => wraps.contains_key(id),
    };
    if !adopted {
        let usage = scan(store).await?;
        let direct = usage.objects.get(id).copied().unwrap_or(0);
        if direct > 0 {
            return Err(KeyError::Refused(format!(
                "{direct} objects are sealed with master key {id} directly (written before repository keys): run `pitr keys rewrap --from {id}` first"
            )));
        }
        if !known {
            return Err(KeyError::Refused(format!(
                "no configured key source holds master key {id} and it was never retired: check the id (`pitr keys list`)"
            )));
        }
    }
    let master = masters.get(id).cloned();
    if let Some(MasterSource::KeyFile(path)) = master.as_ref().map(|m| &m.source) {
        if master::load_key_file(path)?.len() == 1 {
            return Err(KeyError::Refused(format!(
                "{id} is the only key in key file {}: a key file must keep one key; point key_file elsewhere first",
                path.display()
            )));
        }
    }
    let name = record::retired_name(id);
    store
        .put_if_absent(&name, RetiredRecord::new(id).to_bytes().into())
        .await
        .map_err(|e| store_access(store, "write", e))?;
    // A process that read the sources before the rotation may have made a repository key under
    // this key since the check above; with the record in place none can be made any more, so a
    // second look settles it before the key leaves its source.
    let late: Vec<String> = ring
        .list_wraps(store)
        .await?
        .into_iter()
        .filter(|(_, mks)| mks.iter().any(|m| m == id))
        .map(|(rk, _)| rk)
        .collect();
    if !late.is_empty() {
        return Err(KeyError::Refused(format!(
            "while retiring, another process wrapped repository keys {} under {id}; it is recorded retired, so it \
             makes no more: run `pitr keys rewrap --from {id}`, then retire again (the key stays in its source until then)",
            late.join(", ")
        )));
    }
    let mut removed_from_key_file = false;
    let mut next_steps = Vec::new();
    match master.as_ref().map(|m| &m.source) {
        Some(MasterSource::KeyFile(path)) => {
            removed_from_key_file = master::remove_from_key_file(path, id)?;
            next_steps.push(format!(
                "remove key {id} from every copy and backup of the key file (escrow included) once you no longer need it"
            ));
        }
        Some(MasterSource::Env(var)) => next_steps.push(format!("remove key {id} from the variable {var} where it is set")),
        Some(MasterSource::Command(cmd)) => {
            next_steps.push(format!("remove key {id} from the secret that {cmd} prints"))
        }
        Some(MasterSource::Kms { key_id, .. }) => next_steps.push(format!(
            "remove kms_key_id {key_id} from the config; the KMS key can then be scheduled for deletion if nothing else uses it"
        )),
        Some(MasterSource::Memory) | None => {}
    }
    ring.invalidate();
    Ok(RetireReport { id: id.into(), source: master.map(|m| m.source.to_string()), removed_from_key_file, next_steps })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::keys::{MasterKey, MasterKeys};
    use crate::LocalStore;

    fn ring(keys: &[(&str, u8)]) -> KeyRing {
        let mut all = keys.iter().map(|(id, b)| MasterKey::in_memory(id, [*b; 32]));
        let mut masters = MasterKeys::single(all.next().unwrap());
        for k in all {
            masters = masters.with(k);
        }
        KeyRing::with_masters(masters, Duration::from_secs(60))
    }

    #[tokio::test]
    async fn add_wrap_lets_a_key_outside_the_sources_open_a_repository_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let configured = ring(&[("k1", 1)]);
        let rk = configured.sealing_set(&store).await.unwrap().active().id.clone();
        let drill = MasterKey::in_memory("drill-1", [9; 32]);
        let wraps = configured.list_wraps(&store).await.unwrap();
        add_wrap(&configured, &store, &rk, &wraps[&rk], &drill).await.unwrap();
        // Idempotent; the same id with other material is refused rather than overwritten.
        add_wrap(&configured, &store, &rk, &wraps[&rk], &drill).await.unwrap();
        let impostor = MasterKey::in_memory("drill-1", [8; 32]);
        assert!(add_wrap(&configured, &store, &rk, &wraps[&rk], &impostor).await.is_err());
        // A ring holding only the drill key opens the repository key.
        let alone = KeyRing::with_masters(MasterKeys::single(drill), Duration::from_secs(60));
        assert_eq!(alone.opening_set(&store, "obj", &rk).await.unwrap().active().id, rk);
    }

    #[tokio::test]
    async fn retire_takes_only_master_keys_and_a_rerun_goes_through() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let rk = ring(&[("k1", 1)]).sealing_set(&store).await.unwrap().active().id.clone();
        let both = ring(&[("k1", 1), ("k2", 2)]);
        assert_eq!(rewrap(&both, &store, None).await.unwrap().rewrapped, vec![rk.clone()]);
        let e = retire(&both, &store, &rk).await.unwrap_err();
        assert!(e.to_string().contains("is a repository key"), "{e}");
        let e = retire(&both, &store, "k7").await.unwrap_err();
        assert!(e.to_string().contains("never retired"), "{e}");
        assert!(store.list(record::RETIRED).await.unwrap().is_empty(), "a refused retire wrote a record");
        retire(&both, &store, "k1").await.unwrap();
        // Killed after the record, then the key removed from its source by hand: the rerun is fine.
        retire(&ring(&[("k2", 2)]), &store, "k1").await.unwrap();
    }

    fn junk_wrap(rk: &str, mk: &str) -> (String, bytes::Bytes) {
        let rec = WrapRecord {
            repository_key: rk.into(),
            master_key: mk.into(),
            created_us: 1,
            wrapped: crate::keys::master::Wrapped::Aes { nonce: [0; 12], ciphertext: vec![0; 48] },
        };
        (record::wrap_name(rk, mk), rec.to_bytes().into())
    }

    #[tokio::test]
    async fn a_junk_wrap_under_the_active_key_never_costs_the_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let rk = ring(&[("k1", 1)]).sealing_set(&store).await.unwrap().active().id.clone();
        let (name, junk) = junk_wrap(&rk, "k2");
        store.put_if_absent(&name, junk).await.unwrap();
        let both = ring(&[("k1", 1), ("k2", 2)]);
        let e = rewrap(&both, &store, None).await.unwrap_err();
        assert!(e.to_string().contains(&rk), "{e}");
        assert!(store.head(&record::wrap_name(&rk, "k1")).await.unwrap().is_some(), "the good wrap was deleted");
        assert!(ring(&[("k1", 1)]).opening_set(&store, "obj", &rk).await.is_ok());
        assert!(retire(&both, &store, "k1").await.is_err());
    }

    #[tokio::test]
    async fn a_record_named_after_a_legacy_key_does_not_make_it_retirable() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(LocalStore::new(dir.path()));
        // An object sealed directly with master key k0, as before repository keys.
        let legacy = crate::Repository::new(store.clone(), KeyRing::from_key("k0", [7; 32]));
        legacy.put_sealed("obj", b"old".to_vec(), crate::ObjectMeta::plain(crate::ObjectKind::Meta)).await.unwrap();
        let (name, junk) = junk_wrap("k0", "k9");
        store.put_if_absent(&name, junk).await.unwrap();
        let both = ring(&[("k0", 7), ("k1", 1)]);
        let e = retire(&both, store.as_ref(), "k0").await.unwrap_err();
        assert!(e.to_string().contains("directly"), "{e}");
        // Rewrap adopts it for real; then it may go, and the old object still opens.
        let report = rewrap(&both, store.as_ref(), Some("k0")).await.unwrap();
        assert_eq!(report.adopted, vec!["k0".to_string()]);
        retire(&both, store.as_ref(), "k0").await.unwrap();
        let after = crate::Repository::new(store.clone(), ring(&[("k1", 1)]));
        assert_eq!(after.get_opened("obj").await.unwrap().1, b"old");
    }
}
