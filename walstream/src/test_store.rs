//! A local store whose requests a test slows down (storage under load, or being cut off).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pitr_archive::names::pg;
use pitr_archive::{KeyRing, LocalStore, ObjectInfo, PutOutcome, Repository, Store, StoreError};

/// What a request is, for the delay rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    Put,
    List,
    Other,
}

type Rule = dyn Fn(Request, &str, u64) -> Duration + Send + Sync;

/// Delays each request by what `rule` says for (the request, the object name or listing prefix,
/// how many lease generations were put so far); the request is made after the delay, so a
/// request dropped while delayed never reaches the store.
pub(crate) struct Delayed {
    inner: LocalStore,
    lease_puts: AtomicU64,
    rule: Box<Rule>,
}

impl std::fmt::Debug for Delayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delayed").field("inner", &self.inner).finish_non_exhaustive()
    }
}

/// A repository on `dir` whose requests `rule` delays.
pub(crate) fn delayed(
    dir: &std::path::Path,
    key: [u8; 32],
    rule: impl Fn(Request, &str, u64) -> Duration + Send + Sync + 'static,
) -> Repository {
    let store = Delayed { inner: LocalStore::new(dir), lease_puts: AtomicU64::new(0), rule: Box::new(rule) };
    Repository::new(Arc::new(store), KeyRing::from_key("k", key))
}

impl Delayed {
    async fn wait(&self, request: Request, name: &str) {
        let delay = (self.rule)(request, name, self.lease_puts.load(Ordering::SeqCst));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

#[async_trait::async_trait]
impl Store for Delayed {
    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.wait(Request::Put, name).await;
        let outcome = self.inner.put_if_absent(name, data).await;
        if pg::is_lease(name) {
            self.lease_puts.fetch_add(1, Ordering::SeqCst);
        }
        outcome
    }
    async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        self.wait(Request::Other, name).await;
        self.inner.get(name).await
    }
    async fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<Bytes, StoreError> {
        self.wait(Request::Other, name).await;
        self.inner.get_range(name, range).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.wait(Request::List, prefix).await;
        self.inner.list(prefix).await
    }
    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.wait(Request::Other, name).await;
        self.inner.delete(name).await
    }
    async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.wait(Request::Other, name).await;
        self.inner.head(name).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}
