//! The key ring: master keys from their sources, and the repository keys they unwrap, kept in
//! memory for a bounded time.
//!
//! Sealing asks for the active repository key (the newest one wrapped by the active master key);
//! opening asks for the key an object's header names. Both are answered from memory while fresh
//! (`key_cache_ttl`); then the key records are listed and unwrapped again — a KMS `Decrypt` with a
//! KMS master key — and the sources re-read, so that a rotation, rewrap or retirement done by
//! another process reaches a running sidecar within the TTL, and a master key that can no longer
//! be used stops being used.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;

use super::master::{KeySources, MasterKey, MasterKeys, DEFAULT_CACHE_TTL};
use super::record::{self, RetiredRecord, WrapRecord};
use super::set::{KeySet, WrappingKey};
use super::KeyError;
use crate::store::{PutOutcome, Store};

/// The most repository keys kept unwrapped at once.
const CACHE_MAX: usize = 1024;

/// Master keys plus the repository keys they unwrap, cached. Cheap to clone (shared).
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("KeyRing")
            .field("masters", &state.masters)
            .field("direct", &self.inner.direct)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Where the master keys come from; `None` for a ring held only in memory.
    sources: Option<KeySources>,
    /// Seal with the active master key itself, no repository keys (tests and benchmarks: the
    /// format repositories had before repository keys).
    direct: bool,
    ttl: Duration,
    state: Mutex<State>,
    /// One refresh at a time: concurrent misses wait for it rather than all listing and calling KMS.
    refresh: tokio::sync::Mutex<()>,
}

struct State {
    masters: MasterKeys,
    masters_loaded: Instant,
    keys: HashMap<String, Cached>,
    /// The active repository key's id, until when it stays active without a fresh look.
    active: Option<(String, Instant)>,
    /// Retired master key ids, as last listed, and until when that listing is fresh.
    retired: Option<(BTreeSet<String>, Instant)>,
}

struct Cached {
    key: WrappingKey,
    expires: Instant,
}

/// The active repository key, as [`KeyRing::active_info`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveKey {
    /// Its id.
    pub id: String,
    /// When it was made (µs); for objects sealed directly with a master key, 0.
    pub created_us: i64,
    /// The master key wrapping it.
    pub master_key: String,
}

/// The storage failing under the key records: an access error (transient), counted.
pub(super) fn store_access(store: &dyn Store, operation: &'static str, e: impl ToString) -> KeyError {
    KeyError::access("key-records", format!("key records in {}", store.location()), operation, e)
}

/// The wrap record `name`; `None` if it is gone (a rewrap removed it since it was listed). One
/// too big to be a record is a bad record, not a storage failure.
pub(super) async fn read_wrap(store: &dyn Store, name: &str) -> Result<Option<WrapRecord>, KeyError> {
    match store.get_limited(name, record::RECORD_MAX).await {
        Ok(bytes) => WrapRecord::parse(name, &bytes).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(crate::StoreError::TooLarge { .. }) => {
            Err(KeyError::BadRecord { name: name.into(), what: format!("over {} bytes", record::RECORD_MAX) })
        }
        Err(e) => Err(store_access(store, "read", e)),
    }
}

impl KeyRing {
    /// A ring of one key held only in memory that seals with it directly (tests, benchmarks).
    pub fn from_key(id: &str, key: [u8; 32]) -> KeyRing {
        KeyRing::build(None, MasterKeys::single(MasterKey::in_memory(id, key)), true, DEFAULT_CACHE_TTL)
    }

    /// The master keys of `sources`, with repository keys.
    pub fn open(sources: KeySources) -> Result<KeyRing, KeyError> {
        let masters = sources.load()?;
        let ttl = if sources.cache_ttl.is_zero() { DEFAULT_CACHE_TTL } else { sources.cache_ttl };
        Ok(KeyRing::build(Some(sources), masters, false, ttl))
    }

    /// [`KeyRing::open`] of a key file alone.
    pub fn load(path: &Path) -> Result<KeyRing, KeyError> {
        KeyRing::open(KeySources::key_file(path))
    }

    /// Master keys fixed in memory, with repository keys (tests).
    pub fn with_masters(masters: MasterKeys, ttl: Duration) -> KeyRing {
        KeyRing::build(None, masters, false, ttl)
    }

    fn build(sources: Option<KeySources>, masters: MasterKeys, direct: bool, ttl: Duration) -> KeyRing {
        KeyRing {
            inner: Arc::new(Inner {
                sources,
                direct,
                ttl,
                state: Mutex::new(State {
                    masters,
                    masters_loaded: Instant::now(),
                    keys: HashMap::new(),
                    active: None,
                    retired: None,
                }),
                refresh: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The master keys as last read from the sources.
    pub fn masters(&self) -> MasterKeys {
        self.state().masters.clone()
    }

    /// The configured sources (`None` for a ring held in memory).
    pub fn sources(&self) -> Option<&KeySources> {
        self.inner.sources.as_ref()
    }

    /// Whether this ring seals with the master key directly (no repository keys).
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// Forgets every unwrapped key and listing, so the next use reads the sources and records
    /// again (after this process changed them).
    pub fn invalidate(&self) {
        let mut state = self.state();
        state.keys.clear();
        state.active = None;
        state.retired = None;
        state.masters_loaded = Instant::now() - self.inner.ttl - Duration::from_secs(1);
    }

    fn cached(&self, id: &str) -> Option<WrappingKey> {
        let state = self.state();
        state.keys.get(id).filter(|c| c.expires > Instant::now()).map(|c| c.key.clone())
    }

    fn remember(&self, key: WrappingKey) {
        let now = Instant::now();
        let mut state = self.state();
        if state.keys.len() >= CACHE_MAX {
            state.keys.retain(|_, c| c.expires > now);
            while state.keys.len() >= CACHE_MAX {
                let Some(oldest) = state.keys.iter().min_by_key(|(_, c)| c.expires).map(|(id, _)| id.clone()) else {
                    break;
                };
                state.keys.remove(&oldest);
            }
        }
        state.keys.insert(key.id.clone(), Cached { key, expires: now + self.inner.ttl });
    }

    /// Re-reads the sources when the last read is older than the TTL. A source that fails now
    /// leaves the keys read before in use (and is counted and logged): a secret manager's hiccup
    /// must not stop a stream that has its keys.
    async fn reload_masters_if_stale(&self) {
        let Some(sources) = self.inner.sources.clone() else { return };
        if self.state().masters_loaded.elapsed() < self.inner.ttl {
            return;
        }
        let loaded = tokio::task::spawn_blocking(move || sources.load())
            .await
            .unwrap_or_else(|e| Err(KeyError::Refused(format!("reading the key sources panicked: {e}"))));
        let mut state = self.state();
        state.masters_loaded = Instant::now();
        match loaded {
            Ok(masters) => state.masters = masters,
            Err(e) => {
                tracing::warn!(error = %e, "could not re-read the key sources; using the master keys read before")
            }
        }
    }

    async fn retired(&self, store: &dyn Store) -> Result<BTreeSet<String>, KeyError> {
        if let Some((set, fresh_until)) = &self.state().retired {
            if *fresh_until > Instant::now() {
                return Ok(set.clone());
            }
        }
        let listed = store.list(record::RETIRED).await.map_err(|e| store_access(store, "list", e))?;
        let set: BTreeSet<String> =
            listed.iter().filter_map(|o| record::parse_retired_name(&o.name)).map(str::to_string).collect();
        self.state().retired = Some((set.clone(), Instant::now() + self.inner.ttl));
        Ok(set)
    }

    /// Unwraps `rec` with its master key (which must be configured and not retired).
    async fn unwrap_record(&self, name: &str, rec: &WrapRecord, master: &MasterKey) -> Result<WrappingKey, KeyError> {
        let material = master.unwrap(name, &rec.repository_key, rec.created_us, &rec.wrapped).await?;
        Ok(WrappingKey::new(
            &rec.repository_key,
            format!("repository key {} ({name}, master key from {})", rec.repository_key, master.source),
            material,
        ))
    }

    /// The keys to seal a new object with: the active repository key (made if the repository has
    /// none under the active master key yet).
    pub async fn sealing_set(&self, store: &dyn Store) -> Result<KeySet, KeyError> {
        if self.inner.direct {
            return self.direct_set();
        }
        if let Some(key) = self.fresh_active() {
            return Ok(KeySet::single(key));
        }
        let _refresh = self.inner.refresh.lock().await;
        if let Some(key) = self.fresh_active() {
            return Ok(KeySet::single(key));
        }
        let (key, _created_us) = self.find_active(store, true).await?;
        let id = key.id.clone();
        self.remember(key.clone());
        self.state().active = Some((id, Instant::now() + self.inner.ttl));
        Ok(KeySet::single(key))
    }

    fn direct_set(&self) -> Result<KeySet, KeyError> {
        let masters = self.masters();
        masters.active().as_wrapping_key().map(KeySet::single).ok_or_else(|| {
            KeyError::Refused("a KMS master key cannot seal objects directly; it wraps repository keys".into())
        })
    }

    fn fresh_active(&self) -> Option<WrappingKey> {
        let id = {
            let state = self.state();
            match &state.active {
                Some((id, until)) if *until > Instant::now() => id.clone(),
                _ => return None,
            }
        };
        self.cached(&id)
    }

    /// The newest repository key wrapped by the active master key, unwrapped; with `create`, a
    /// new one when there is none.
    async fn find_active(&self, store: &dyn Store, create: bool) -> Result<(WrappingKey, i64), KeyError> {
        self.reload_masters_if_stale().await;
        let master = self.masters().active().clone();
        if self.retired(store).await?.contains(&master.id) {
            // Counted and retried like a key source that cannot be reached: the sources may not
            // have been re-read since another process rotated and retired the key, and if the
            // retirement record was planted, the alert is what brings an operator.
            return Err(KeyError::access(
                "key-records",
                format!("master key {} ({})", master.id, master.source),
                "seal",
                format!(
                    "it is the active master key but is retired ({}); configure another key, or delete that record if nobody retired it",
                    record::retired_name(&master.id)
                ),
            ));
        }
        let listed = store.list(record::WRAPS).await.map_err(|e| store_access(store, "list", e))?;
        let mut candidates: Vec<(String, WrapRecord)> = Vec::new();
        for o in &listed {
            let Some((_, mk)) = record::parse_wrap_name(&o.name) else { continue };
            if mk != master.id {
                continue;
            }
            match read_wrap(store, &o.name).await {
                Ok(Some(rec)) => candidates.push((o.name.clone(), rec)),
                Ok(None) => {}
                Err(e @ KeyError::Access { .. }) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "key record ignored"),
            }
        }
        // Newest first; one that does not unwrap (planted by someone without the master key) is
        // passed over, so that it cannot stop sealing.
        candidates.sort_by(|(_, a), (_, b)| (b.created_us, &b.repository_key).cmp(&(a.created_us, &a.repository_key)));
        let mut newest = None;
        let mut unreachable = None;
        for (name, rec) in candidates {
            match self.unwrap_record(&name, &rec, &master).await {
                Ok(key) => {
                    newest = Some((key, rec.created_us));
                    break;
                }
                Err(e @ KeyError::Access { .. }) => {
                    unreachable.get_or_insert(e);
                }
                Err(e) => tracing::warn!(error = %e, "key record does not unwrap; passed over"),
            }
        }
        match (newest, unreachable) {
            (Some(found), _) => Ok(found),
            // Never a new key because the master key could not be reached for the existing ones.
            (None, Some(e)) => Err(e),
            (None, None) if create => {
                // Only with the sources and retirements as they are now: a process whose view is
                // a TTL old must not make a key under a master key retired meanwhile.
                self.state().masters_loaded = Instant::now() - self.inner.ttl - Duration::from_secs(1);
                self.state().retired = None;
                self.reload_masters_if_stale().await;
                let fresh = self.masters().active().clone();
                if fresh.id != master.id || self.retired(store).await?.contains(&fresh.id) {
                    return Err(KeyError::access(
                        "key-records",
                        format!("master key {}", master.id),
                        "seal",
                        "the key sources or retirements changed while looking for the active key; retrying",
                    ));
                }
                let (key, created_us) = self.create_with(store, &fresh).await?;
                Ok((key, created_us))
            }
            (None, None) => Err(KeyError::Refused(format!(
                "the repository has no repository key wrapped by the active master key {} ({})",
                master.id, master.source
            ))),
        }
    }

    async fn create_with(&self, store: &dyn Store, master: &MasterKey) -> Result<(WrappingKey, i64), KeyError> {
        let mut id_bytes = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut id_bytes);
        let id = format!("r{}", hex::encode(id_bytes));
        let created_us = crate::now_us();
        let (material, wrapped) = master.generate(&id, created_us).await?;
        let rec = WrapRecord { repository_key: id.clone(), master_key: master.id.clone(), created_us, wrapped };
        let name = record::wrap_name(&id, &master.id);
        match store.put_if_absent(&name, rec.to_bytes().into()).await.map_err(|e| store_access(store, "write", e))? {
            PutOutcome::Created => {}
            PutOutcome::AlreadyExists => {
                return Err(KeyError::Refused(format!("key record {name} exists already (a random id repeated?)")))
            }
        }
        tracing::info!(repository_key = %id, master_key = %master.id, "made a new repository key");
        let key =
            WrappingKey::new(&id, format!("repository key {id} ({name}, master key from {})", master.source), material);
        Ok((key, created_us))
    }

    /// Makes a new repository key wrapped by the active master key, which seals new objects from
    /// now on (here at once; in other processes within their TTL). Returns its id.
    pub async fn rotate(&self, store: &dyn Store) -> Result<ActiveKey, KeyError> {
        if self.inner.direct {
            return Err(KeyError::Refused("a key ring held in memory has no repository keys to rotate".into()));
        }
        let _refresh = self.inner.refresh.lock().await;
        self.reload_masters_if_stale().await;
        let master = self.masters().active().clone();
        if self.retired(store).await?.contains(&master.id) {
            return Err(KeyError::Refused(format!("the active master key {} is retired", master.id)));
        }
        let (key, created_us) = self.create_with(store, &master).await?;
        let id = key.id.clone();
        self.remember(key);
        self.state().active = Some((id.clone(), Instant::now() + self.inner.ttl));
        Ok(ActiveKey { id, created_us, master_key: master.id })
    }

    /// The active repository key (made if there is none and `create`), for `keys list` and
    /// `pitr_key_age_seconds`.
    pub async fn active_info(&self, store: &dyn Store, create: bool) -> Result<ActiveKey, KeyError> {
        if self.inner.direct {
            let masters = self.masters();
            return Ok(ActiveKey {
                id: masters.active().id.clone(),
                created_us: 0,
                master_key: masters.active().id.clone(),
            });
        }
        let _refresh = self.inner.refresh.lock().await;
        let (key, created_us) = self.find_active(store, create).await?;
        let id = key.id.clone();
        self.remember(key);
        self.state().active = Some((id.clone(), Instant::now() + self.inner.ttl));
        Ok(ActiveKey { id, created_us, master_key: self.masters().active().id.clone() })
    }

    /// The key to open object `object`, whose header names `key_id`.
    pub async fn opening_set(&self, store: &dyn Store, object: &str, key_id: &str) -> Result<KeySet, KeyError> {
        if let Some(key) = self.cached(key_id) {
            return Ok(KeySet::single(key));
        }
        if self.inner.direct {
            let masters = self.masters();
            return match masters.get(key_id).and_then(MasterKey::as_wrapping_key) {
                Some(key) => Ok(KeySet::single(key)),
                None => Err(KeyError::UnknownKey {
                    object: object.into(),
                    key_id: key_id.into(),
                    searched: format!("is not the key in memory ({})", masters.active().id),
                }),
            };
        }
        let _refresh = self.inner.refresh.lock().await;
        if let Some(key) = self.cached(key_id) {
            return Ok(KeySet::single(key));
        }
        self.reload_masters_if_stale().await;
        let (key, _created_us) = self.resolve(store, object, key_id).await?;
        self.remember(key.clone());
        Ok(KeySet::single(key))
    }

    async fn resolve(&self, store: &dyn Store, object: &str, key_id: &str) -> Result<(WrappingKey, i64), KeyError> {
        let masters = self.masters();
        let retired = self.retired(store).await?;
        let prefix = format!("{}{key_id}/", record::WRAPS);
        let mut failures: Vec<KeyError> = Vec::new();
        let mut wrapped_by = Vec::new();
        // A second listing when a listed wrap vanished: a rewrap beside us put the new wrap
        // before it deleted the old one.
        for _listing in 0..2 {
            let listed = store.list(&prefix).await.map_err(|e| store_access(store, "list", e))?;
            let mut vanished = false;
            failures.clear();
            wrapped_by.clear();
            for o in &listed {
                let Some((rk, mk)) = record::parse_wrap_name(&o.name) else { continue };
                if rk != key_id {
                    continue;
                }
                wrapped_by.push(mk.to_string());
                let Some(master) = masters.get(mk) else { continue };
                if retired.contains(mk) {
                    continue;
                }
                let rec = match read_wrap(store, &o.name).await {
                    Ok(Some(rec)) => rec,
                    Ok(None) => {
                        vanished = true;
                        continue;
                    }
                    Err(e) => {
                        failures.push(e);
                        continue;
                    }
                };
                match self.unwrap_record(&o.name, &rec, master).await {
                    Ok(key) => return Ok((key, rec.created_us)),
                    Err(e) => failures.push(e),
                }
            }
            if !vanished {
                break;
            }
        }
        // An object written before repository keys existed names its master key.
        if !retired.contains(key_id) {
            if let Some(key) = masters.get(key_id).and_then(MasterKey::as_wrapping_key) {
                return Ok((key, 0));
            }
        }
        // A storage or KMS failure says more (and is transient) than "not found".
        if let Some(pos) = failures.iter().position(KeyError::is_access) {
            return Err(failures.swap_remove(pos));
        }
        if retired.contains(key_id) {
            let name = record::retired_name(key_id);
            let retired_at = match store.get_limited(&name, record::RECORD_MAX).await {
                Ok(bytes) => RetiredRecord::parse(&name, &bytes)
                    .map(|r| crate::time::format_rfc3339_seconds(r.retired_us))
                    .unwrap_or_else(|_| "an unknown time".into()),
                Err(_) => "an unknown time".into(),
            };
            return Err(KeyError::Retired { object: object.into(), key_id: key_id.into(), retired_at });
        }
        if let Some(e) = failures.into_iter().next() {
            return Err(e);
        }
        let configured: Vec<String> = masters.all().iter().map(|k| format!("{} from {}", k.id, k.source)).collect();
        let searched = if wrapped_by.is_empty() {
            format!(
                "is neither a repository key ({prefix} holds nothing) nor a configured master key ({})",
                configured.join(", ")
            )
        } else {
            format!(
                "is a repository key wrapped only by master keys that are not configured or retired ({}; configured: {})",
                wrapped_by.join(", "),
                configured.join(", ")
            )
        };
        Err(KeyError::UnknownKey { object: object.into(), key_id: key_id.into(), searched })
    }

    /// Every repository key's wraps as listed now: repository key → master keys wrapping it.
    pub async fn list_wraps(&self, store: &dyn Store) -> Result<BTreeMap<String, Vec<String>>, KeyError> {
        let listed = store.list(record::WRAPS).await.map_err(|e| store_access(store, "list", e))?;
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for o in &listed {
            if let Some((rk, mk)) = record::parse_wrap_name(&o.name) {
                out.entry(rk.to_string()).or_default().push(mk.to_string());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    fn ring(keys: &[(&str, u8)], ttl: Duration) -> KeyRing {
        let mut all = keys.iter().map(|(id, b)| MasterKey::in_memory(id, [*b; 32]));
        let first = all.next().unwrap();
        let mut masters = MasterKeys::single(first);
        for k in all {
            masters = masters.with(k);
        }
        KeyRing::with_masters(masters, ttl)
    }

    #[tokio::test]
    async fn seals_with_a_repository_key_that_another_ring_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let a = ring(&[("k1", 1)], Duration::from_secs(60));
        let set = a.sealing_set(&store).await.unwrap();
        let id = set.active().id.clone();
        assert!(id.starts_with('r'), "{id}");
        assert_eq!(a.list_wraps(&store).await.unwrap().get(&id), Some(&vec!["k1".to_string()]));
        // Same id again while fresh; a second ring finds the same key rather than making one.
        assert_eq!(a.sealing_set(&store).await.unwrap().active().id, id);
        let b = ring(&[("k1", 1)], Duration::from_secs(60));
        assert_eq!(b.sealing_set(&store).await.unwrap().active().id, id);
        assert!(b.opening_set(&store, "obj", &id).await.is_ok());
        // Another master key cannot open it, and says which keys it looked for.
        let c = ring(&[("k2", 2)], Duration::from_secs(60));
        let e = c.opening_set(&store, "obj", &id).await.unwrap_err();
        assert!(matches!(e, KeyError::UnknownKey { .. }) && e.to_string().contains("k1"), "{e}");
        // A wrong key under the same id fails to unwrap.
        let d = ring(&[("k1", 9)], Duration::from_secs(60));
        assert!(matches!(d.opening_set(&store, "obj", &id).await, Err(KeyError::Unwrap { .. })));
    }

    #[tokio::test]
    async fn a_planted_newer_wrap_that_does_not_unwrap_cannot_stop_sealing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let a = ring(&[("k1", 1)], Duration::from_millis(1));
        let real = a.sealing_set(&store).await.unwrap().active().id.clone();
        let planted = WrapRecord {
            repository_key: "rbad".into(),
            master_key: "k1".into(),
            created_us: i64::MAX,
            wrapped: super::super::master::Wrapped::Aes { nonce: [0; 12], ciphertext: vec![0; 48] },
        };
        store.put_if_absent(&record::wrap_name("rbad", "k1"), planted.to_bytes().into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(a.sealing_set(&store).await.unwrap().active().id, real);
        assert!(matches!(a.opening_set(&store, "obj", "rbad").await, Err(KeyError::Unwrap { .. })));
    }

    #[tokio::test]
    async fn rotate_makes_the_newest_key_active_and_legacy_ids_open_with_the_master() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let a = ring(&[("k1", 1)], Duration::from_millis(1));
        let first = a.sealing_set(&store).await.unwrap().active().id.clone();
        let rotated = a.rotate(&store).await.unwrap();
        assert_ne!(rotated.id, first);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(a.sealing_set(&store).await.unwrap().active().id, rotated.id);
        assert_eq!(a.opening_set(&store, "legacy", "k1").await.unwrap().active().id, "k1");
        std::fs::create_dir_all(dir.path().join("keys/retired")).unwrap();
        store.put_if_absent(&record::retired_name("k1"), RetiredRecord::new("k1").to_bytes().into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let e = a.opening_set(&store, "planted", "k1").await.unwrap_err();
        assert!(matches!(e, KeyError::Retired { .. }), "{e}");
        assert!(a.sealing_set(&store).await.is_err(), "a retired active master key is refused");
    }
}
