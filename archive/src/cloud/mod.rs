//! Object storage behind the [`Store`] trait, on `object_store`: S3 and S3-compatible servers
//! (`s3://bucket/prefix`, [`crate::cloud::s3`]), Google Cloud Storage (`gs://bucket/prefix`,
//! [`crate::cloud::gcs`]) and Azure Blob Storage (`az://container/prefix`, [`crate::cloud::azure`]).
//!
//! What this layer adds to `object_store`:
//! - put-if-absent for large objects too: above `multipart_threshold` an S3 object goes up in
//!   parts (an Azure blob in blocks) and the completion is conditional (`If-None-Match: *`), so a
//!   name is never replaced;
//! - retries of conditional creates that timed out or lost their connection (object_store does not
//!   retry those, as a create is not idempotent), with an identical object found afterwards taken
//!   as our own earlier attempt;
//! - a bound on concurrent requests per repository across the whole process, with slots of their
//!   own for the WAL stream's requests (its writer lease, WAL and completeness marks), so that
//!   these never queue behind a base backup's parts;
//! - connect and request timeouts, so a dead or frozen server gives errors and retries rather than
//!   requests that hang;
//! - S3 Object Lock retention on every object written ([`ObjectLock`]), and extending it
//!   ([`Store::extend_retention`], which `pitr expire` uses for backups kept longer).

pub mod aws_profile;
pub mod azure;
pub mod gcs;
pub mod options;
pub mod s3;

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload};
use rand::Rng;
use tokio::sync::Semaphore;

use crate::store::{validate_name, ObjectInfo, PutOutcome, Store, StoreError};

/// How to reach and use the bucket. Unset S3 fields come from the environment (`AWS_REGION`,
/// `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`…); GCS credentials from `service_account_key`, else
/// `GOOGLE_APPLICATION_CREDENTIALS` / `GOOGLE_SERVICE_ACCOUNT*`, else the instance metadata server;
/// Azure credentials from the `AZURE_*` environment (see [`crate::cloud::azure`]).
#[derive(Debug, Clone)]
pub struct CloudOptions {
    /// S3 endpoint URL, for S3-compatible servers (MinIO, Ceph…) or a private endpoint; `None`:
    /// AWS's, or `AWS_ENDPOINT_URL`. Azure: the blob service URL (Azurite:
    /// `http://127.0.0.1:10000/devstoreaccount1`); `None`: `AZURE_STORAGE_ENDPOINT`, else
    /// `https://<account>.blob.core.windows.net`.
    pub endpoint: Option<String>,
    /// S3 region; `None`: `AWS_REGION`, else the profile's, else `us-east-1`.
    pub region: Option<String>,
    /// Accept plain `http://` endpoints (test servers, a MinIO on localhost).
    pub allow_http: bool,
    /// Address S3 buckets as `endpoint/bucket/key` rather than `bucket.endpoint/key` (most
    /// S3-compatible servers want this).
    pub force_path_style: bool,
    /// GCS service-account JSON key file.
    pub service_account_key: Option<PathBuf>,
    /// Azure storage account name; `None`: `AZURE_STORAGE_ACCOUNT_NAME`.
    pub storage_account: Option<String>,
    /// Requests in flight at once to this repository, across the process (the WAL stream's
    /// requests have [`STREAM_REQUESTS`] slots of their own on top).
    pub max_concurrency: usize,
    /// Objects larger than this go up as a multipart upload (S3).
    pub multipart_threshold: usize,
    /// Part size of a multipart upload (S3 wants at least 5 MiB except for the last part).
    pub multipart_part_size: usize,
    /// Limit on establishing a connection, so that an unreachable server fails fast and is retried.
    pub connect_timeout: Duration,
    /// Whole-request limit, from connecting to the end of the response body.
    pub request_timeout: Duration,
    /// Retries of one request (connect errors, 5xx, 429, timeouts of idempotent requests).
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// Wait before the first retry; each later one waits up to twice as long (with jitter).
    pub retry_initial_backoff: Duration,
    /// Cap on the wait between two retries.
    pub retry_max_backoff: Duration,
    /// S3 Object Lock retention for every object written; `None`: no retention (refused on GCS).
    pub object_lock: Option<ObjectLock>,
}

impl Default for CloudOptions {
    fn default() -> Self {
        CloudOptions {
            endpoint: None,
            region: None,
            allow_http: false,
            force_path_style: false,
            service_account_key: None,
            storage_account: None,
            max_concurrency: 16,
            multipart_threshold: 32 << 20,
            multipart_part_size: 16 << 20,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(15),
            object_lock: None,
        }
    }
}

/// S3 Object Lock: every object is written with `x-amz-object-lock-mode` and a
/// retain-until date `days` after the write, so nobody (COMPLIANCE), or nobody without
/// `s3:BypassGovernanceRetention` (GOVERNANCE), can delete or overwrite that version before then.
/// [`Store::extend_retention`] moves that date later (never earlier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectLock {
    /// The retention mode every object is written with.
    pub mode: LockMode,
    /// Retention period of a new object, in days from its write (`object_lock_days`).
    pub days: u32,
}

/// S3 Object Lock retention mode (parsed case-insensitively from `governance` / `compliance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Principals with `s3:BypassGovernanceRetention` may still delete or shorten the retention.
    Governance,
    /// Nobody, the root account included, can delete the version or shorten its retention.
    Compliance,
}

impl LockMode {
    /// The mode as S3 spells it in `x-amz-object-lock-mode`: `GOVERNANCE` or `COMPLIANCE`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }
}

impl std::str::FromStr for LockMode {
    type Err = String;
    fn from_str(s: &str) -> Result<LockMode, String> {
        match s.to_ascii_uppercase().as_str() {
            "GOVERNANCE" => Ok(LockMode::Governance),
            "COMPLIANCE" => Ok(LockMode::Compliance),
            _ => Err(format!("{s:?}: expected COMPLIANCE or GOVERNANCE")),
        }
    }
}

/// An S3 or GCS bucket or an Azure container (under a prefix) as a [`Store`].
#[derive(Clone)]
pub struct CloudStore {
    inner: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    prefix: String,
    location: String,
    permits: Arc<Semaphore>,
    /// The WAL stream's own request slots ([`is_stream_request`]).
    stream_permits: Arc<Semaphore>,
    /// `None`: every object in one request (GCS).
    multipart: Option<(usize, usize)>,
    /// The part size of the start-up probe's upload (with `multipart`).
    probe_part_size: Option<usize>,
    retry_timeout: Duration,
    backoff: (Duration, Duration),
    max_retries: usize,
    object_lock: Option<ObjectLock>,
    /// With Object Lock on S3: reading and extending retention.
    retention: Option<Arc<crate::cloud::s3::RetentionApi>>,
}

/// Not derived: object_store's clients print their credentials in their `Debug` form (an Azure
/// account key's bytes, a SAS token, AWS secret keys), and a store may end up in a `{:?}`.
impl std::fmt::Debug for CloudStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudStore")
            .field("location", &self.location)
            .field("multipart", &self.multipart)
            .field("object_lock", &self.object_lock)
            .finish_non_exhaustive()
    }
}

/// Where the start-up check of conditional creates ([`Store::check_conditional_create`]) puts
/// its probe objects (each under a random name, deleted straight after): outside `pg/` and
/// `mongo/`, so nothing that reads the archive mistakes one for data.
pub const PROBE_PREFIX: &str = "pitr-probe/";

const EXPECTED_URL: &str = "expected s3://bucket/prefix, gs://bucket/prefix or az://container/prefix";

/// S3 takes at most 5 GiB in one PUT.
const S3_MAX_SINGLE_PUT: usize = 5 << 30;

/// Parts of one multipart upload in flight at once (each also takes a request permit).
const PARTS_IN_FLIGHT: usize = 4;

/// Request slots of the WAL stream (lease, WAL, completeness marks), per repository location
/// and apart from `max_concurrency`: a renewal (LIST, GET, PUT) or a WAL put waiting behind a
/// base backup's multipart parts would let the lease lapse and pause WAL archiving for the
/// backup's length. The stream itself has at most a couple of puts, a renewal and a batch of
/// deletes in flight. Requests are told apart by name, so other requests for those names (a
/// scheduled expire deleting WAL, a restore fetching it) take these slots too: short requests,
/// never a backup's parts.
pub const STREAM_REQUESTS: usize = 8;

/// Whether a request for `name` (an object, or a listing prefix) is the WAL stream's: under
/// `pg/<id>/lease/`, `pg/<id>/wal/` or `pg/<id>/complete/`.
fn is_stream_request(name: &str) -> bool {
    let mut parts = name.split('/');
    parts.next() == Some("pg")
        && parts.next().is_some_and(|id| !id.is_empty())
        && matches!(parts.next(), Some("lease" | "wal" | "complete"))
}

/// One semaphore per repository location, shared by every store the process opens on it, so
/// that `max_concurrency` bounds the process and not each command's share of it.
fn permits_for(location: &str, max: usize) -> Arc<Semaphore> {
    static ALL: OnceLock<Mutex<HashMap<String, Arc<Semaphore>>>> = OnceLock::new();
    let mut all = ALL.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    all.entry(location.to_string()).or_insert_with(|| Arc::new(Semaphore::new(max.max(1)))).clone()
}

impl CloudStore {
    /// Opens `s3://bucket[/prefix]`, `gs://bucket[/prefix]` or `az://container[/prefix]`
    /// (`azure://` too). Nothing is contacted yet.
    pub fn open(url: &str, opts: &CloudOptions) -> Result<CloudStore, StoreError> {
        let bad = |message: String| StoreError::Backend {
            op: "open",
            name: String::new(),
            location: url.to_string(),
            message,
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad(EXPECTED_URL.into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket or container name".into()));
        }
        if opts.multipart_part_size < 5 << 20 || opts.multipart_threshold < opts.multipart_part_size {
            return Err(bad(format!(
                "multipart_part_size {} must be at least 5 MiB and multipart_threshold {} at least the part size",
                opts.multipart_part_size, opts.multipart_threshold
            )));
        }
        let prefix = prefix.trim_matches('/');
        // object_store drops empty path segments and percent-encodes `..`, `~`, `%`, `#`… in a key:
        // objects would be written under another prefix than the one listed, and every listing
        // would come back empty. Refused here rather than seen as an empty repository.
        if ObjectPath::from(prefix).as_ref() != prefix {
            return Err(bad(format!(
                "prefix {prefix:?}: object_store would store it as {:?}; use path segments of letters, digits, \
                 `.`, `_` and `-` separated by single `/`",
                ObjectPath::from(prefix).as_ref()
            )));
        }
        let mut retention = None;
        let mut probe_part_size = None;
        let (inner, multipart): (Arc<dyn ObjectStore>, _) = match scheme {
            "s3" => {
                // With Object Lock every object up to S3's single-PUT limit goes up in one request:
                // that is the retention path the test server verifies (moto applies no retention
                // to multipart uploads); beyond it parts carry x-amz-checksum-sha256.
                let threshold = match opts.object_lock {
                    Some(_) => opts.multipart_threshold.max(S3_MAX_SINGLE_PUT),
                    None => opts.multipart_threshold,
                };
                let (s3, api) = crate::cloud::s3::build(bucket, opts).map_err(bad)?;
                retention = api.map(Arc::new);
                // One part (the last may be under S3's 5 MiB minimum).
                probe_part_size = Some(1 << 20);
                (Arc::new(s3), Some((threshold, opts.multipart_part_size)))
            }
            "gs" => {
                if opts.object_lock.is_some() {
                    return Err(bad("object lock is an S3 feature; on GCS use a bucket retention policy".into()));
                }
                // GCS takes objects up to 5 TiB in one PUT, and object_store's GCS multipart
                // completion cannot be made conditional: single requests only.
                (Arc::new(crate::cloud::gcs::build(bucket, opts).map_err(bad)?), None)
            }
            "az" | "azure" => {
                if opts.object_lock.is_some() {
                    return Err(bad(options::CloudOptionsError::LockNotOnAzure.to_string()));
                }
                // Up to the threshold one Put Blob; above it blocks, committed conditionally.
                let azure = crate::cloud::azure::build(bucket, opts).map_err(bad)?;
                // Two blocks, as a large blob has several (Azure has no minimum block size).
                probe_part_size = Some(16);
                (Arc::new(azure), Some((opts.multipart_threshold, opts.multipart_part_size)))
            }
            other => return Err(bad(format!("unknown scheme {other}://; {EXPECTED_URL}"))),
        };
        let location = url.trim_end_matches('/').to_string();
        Ok(CloudStore {
            inner,
            prefix: prefix.to_string(),
            permits: permits_for(&location, opts.max_concurrency),
            // Keyed apart from the location's general slots.
            stream_permits: permits_for(&format!("{location}#stream"), STREAM_REQUESTS),
            location,
            multipart,
            probe_part_size,
            retry_timeout: opts.retry_timeout,
            backoff: (opts.retry_initial_backoff, opts.retry_max_backoff),
            max_retries: opts.max_retries,
            object_lock: opts.object_lock.clone(),
            retention,
        })
    }

    fn key(&self, name: &str) -> Result<ObjectPath, StoreError> {
        validate_name(name)?;
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) };
        Ok(ObjectPath::from(full))
    }

    fn err(&self, op: &'static str, name: &str, e: object_store::Error) -> StoreError {
        let (name, location) = (name.to_string(), self.location.clone());
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound { name, location },
            e @ object_store::Error::PermissionDenied { .. } => {
                StoreError::Denied { op, name, location, message: e.to_string() }
            }
            other => StoreError::Backend { op, name, location, message: other.to_string() },
        }
    }

    /// [`CloudStore::err`] for a single put or the start of an upload: a 404 there (NoSuchBucket,
    /// ContainerNotFound) says the bucket or container is missing; the object cannot be, and "not
    /// found" would read as if it were. (A 404 on a part or a completion is about the upload:
    /// [`Store::put_if_absent`] looks at the name then.)
    fn put_err(&self, op: &'static str, name: &str, e: object_store::Error) -> StoreError {
        match e {
            e @ object_store::Error::NotFound { .. } => StoreError::Backend {
                op,
                name: name.to_string(),
                location: self.location.clone(),
                message: format!("the bucket or container does not exist (create it first): {e}"),
            },
            other => self.err(op, name, other),
        }
    }

    /// The bucket path to list for the directory `dir` of names (no trailing `/`; `""` for the
    /// top), and the bucket prefix to strip from what comes back to get names.
    fn listing_path(&self, dir: &str) -> (Option<ObjectPath>, String) {
        let full_dir = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (true, false) => Some(ObjectPath::from(dir)),
            (false, true) => Some(ObjectPath::from(self.prefix.as_str())),
            (false, false) => Some(ObjectPath::from(format!("{}/{dir}", self.prefix))),
        };
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        (full_dir, strip)
    }

    /// A request slot for a request about `name` (an object, or a listing prefix).
    async fn permit(&self, name: &str) -> tokio::sync::OwnedSemaphorePermit {
        let permits = if is_stream_request(name) { &self.stream_permits } else { &self.permits };
        // The semaphore is never closed.
        permits.clone().acquire_owned().await.expect("request semaphore closed")
    }

    fn put_options(&self, data: &Bytes) -> PutOptions {
        let mut opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        if self.object_lock.is_some() {
            opts.extensions.insert(crate::cloud::s3::LockedPut::single(data));
        }
        opts
    }

    async fn put_single(&self, name: &str, key: &ObjectPath, data: &Bytes) -> Result<(), object_store::Error> {
        let _permit = self.permit(name).await;
        self.inner.put_opts(key, PutPayload::from(data.clone()), self.put_options(data)).await.map(|_| ())
    }

    /// Creates the upload, sends the parts (a few at a time), completes it conditionally; on any
    /// failure aborts it, so no parts are left behind to pay for (S3 never shows an unfinished
    /// upload as an object). On Azure the abort is a no-op: uncommitted blocks are never a blob
    /// and Azure discards them after a week.
    async fn put_multipart(
        &self,
        name: &str,
        key: &ObjectPath,
        data: &Bytes,
        part_size: usize,
    ) -> Result<(), PutFailure> {
        let mut opts = PutMultipartOptions::default();
        if self.object_lock.is_some() {
            opts.extensions.insert(crate::cloud::s3::LockedPut::multipart());
        }
        let mut upload = {
            let _permit = self.permit(name).await;
            self.inner.put_multipart_opts(key, opts).await.map_err(PutFailure::at_start)?
        };
        let mut parts = tokio::task::JoinSet::new();
        let mut result = Ok(());
        for start in (0..data.len()).step_by(part_size) {
            while parts.len() >= PARTS_IN_FLIGHT {
                result = result.and(join_part(parts.join_next().await));
            }
            if result.is_err() {
                break;
            }
            let permit = self.permit(name).await;
            let part = upload.put_part(PutPayload::from(data.slice(start..(start + part_size).min(data.len()))));
            // Spawned, so that a part holding a permit makes progress while we wait for another.
            parts.spawn(async move {
                let r = part.await;
                drop(permit);
                r
            });
        }
        while let Some(joined) = parts.join_next().await {
            result = result.and(join_part(Some(joined)));
        }
        let result = match result {
            Ok(()) => {
                let _permit = self.permit(name).await;
                upload.complete().await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _permit = self.permit(name).await;
            if let Err(e) = upload.abort().await {
                tracing::warn!(object = %key, error = %e, "could not abort a failed multipart upload; a lifecycle rule (AbortIncompleteMultipartUpload) cleans it up");
            }
        }
        result.map_err(PutFailure::in_upload)
    }

    /// What is under a name a create was refused for (or whose upload vanished). An object with
    /// exactly our bytes is our own earlier attempt whose response was lost (sealed objects carry
    /// a fresh random data key, so nobody else writes those bytes); anything else is someone
    /// else's object. A failed read is an error, not a verdict: the object_store client has
    /// already retried it.
    async fn existing(&self, name: &str, key: &ObjectPath, data: &Bytes) -> Result<Existing, object_store::Error> {
        let _permit = self.permit(name).await;
        let found = match self.inner.get(key).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Ok(Existing::Nothing),
            Err(e) => return Err(e),
        };
        // Of another size it is not ours: not read, so a huge object planted under the name
        // costs nothing.
        if found.meta.size != data.len() as u64 {
            return Ok(Existing::Other);
        }
        match found.bytes().await {
            Ok(bytes) if bytes == *data => Ok(Existing::Ours),
            Ok(_) => Ok(Existing::Other),
            Err(object_store::Error::NotFound { .. }) => Ok(Existing::Nothing),
            Err(e) => Err(e),
        }
    }

    /// The error of a put whose name was looked at after a refusal or a vanished upload, and
    /// the read failed.
    fn read_back_err(&self, name: &str, refusal: &object_store::Error, e: object_store::Error) -> StoreError {
        StoreError::Backend {
            op: "put",
            name: name.to_string(),
            location: self.location.clone(),
            message: format!(
                "the create was answered \"{refusal}\", and reading what is under the name to tell our own \
                 earlier attempt from another object failed: {e}"
            ),
        }
    }

    /// One retention request, with a request permit, retried (it is idempotent) on transient
    /// failures within `max_retries` and `retry_timeout`.
    async fn retention_request<T, F, Fut>(&self, op: &'static str, name: &str, request: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::cloud::s3::RetentionFailure>>,
    {
        use crate::cloud::s3::RetentionFailure;
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let result = {
                let _permit = self.permit(name).await;
                request().await
            };
            let (name, location) = (name.to_string(), self.location.clone());
            match result {
                Ok(v) => return Ok(v),
                Err(RetentionFailure::Transient(message))
                    if (attempt as usize) < self.max_retries && started.elapsed() < self.retry_timeout =>
                {
                    let wait = self.backoff(attempt);
                    attempt += 1;
                    tracing::debug!(object = %name, %location, error = %message, retry_in = ?wait, attempt, "{op} failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(RetentionFailure::NotFound) => return Err(StoreError::NotFound { name, location }),
                Err(RetentionFailure::Denied(message)) => {
                    return Err(StoreError::Denied { op, name, location, message })
                }
                Err(RetentionFailure::Transient(message) | RetentionFailure::Failed(message)) => {
                    return Err(StoreError::Backend { op, name, location, message })
                }
            }
        }
    }

    /// Creates a probe object under a random name, then tries to create it again with other
    /// bytes, which must be refused; deletes it. `part_size`: as a multipart upload in parts of
    /// that many bytes, else one put.
    async fn probe_conditional_create(&self, kind: &str, part_size: Option<usize>) -> Result<(), StoreError> {
        let mut random = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut random);
        let name = format!("{PROBE_PREFIX}{kind}.{}", hex::encode(random));
        let key = self.key(&name)?;
        let create = |data: &'static [u8]| {
            let (name, key, data) = (&name, &key, Bytes::from_static(data));
            async move {
                match part_size {
                    Some(part_size) => self.put_multipart(name, key, &data, part_size).await,
                    None => self.put_single(name, key, &data).await.map_err(PutFailure::at_start),
                }
            }
        };
        create(b"pitr probe: the first create")
            .await
            .map_err(|f| self.put_err("probe conditional create of", &name, f.error))?;
        // Other bytes, so that no answer could be taken for our own first attempt.
        let second = create(b"pitr probe: a second create").await;
        if let Err(e) = self.delete(&name).await {
            tracing::warn!(object = %name, location = %self.location, error = %e,
                "could not delete the conditional-create probe object; it is safe to delete by hand");
        }
        match second {
            Err(f) if taken(&f.error) => Ok(()),
            Ok(()) => Err(StoreError::IgnoresConditionalCreate { location: self.location.clone(), probe: name }),
            Err(f) => Err(self.put_err("probe conditional create of", &name, f.error)),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        // Exponential with full jitter: concurrent writers that failed together spread out.
        let (initial, max) = self.backoff;
        let cap = initial.saturating_mul(1u32 << attempt.min(16)).min(max);
        let jittered =
            rand::thread_rng().gen_range(initial.as_secs_f64()..=cap.as_secs_f64().max(initial.as_secs_f64()));
        Duration::from_secs_f64(jittered)
    }
}

fn join_part(
    joined: Option<Result<Result<(), object_store::Error>, tokio::task::JoinError>>,
) -> Result<(), object_store::Error> {
    match joined {
        None => Ok(()),
        Some(Ok(r)) => r,
        Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Some(Err(e)) => Err(object_store::Error::JoinError { source: e }),
    }
}

/// A conditional create that failed this way may or may not have landed, and object_store does
/// not retry it (it is not idempotent): we do, and look at what is there if the name is taken.
fn ambiguous_put_failure(e: &object_store::Error) -> bool {
    use object_store::client::HttpErrorKind;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(http) = err.downcast_ref::<object_store::client::HttpError>() {
            return matches!(http.kind(), HttpErrorKind::Timeout | HttpErrorKind::Interrupted | HttpErrorKind::Unknown);
        }
        source = err.source();
    }
    false
}

/// A failed create, and where: a 404 answer to a single put or to the start of an upload says
/// the bucket is missing; one to a part or to the completion is about the upload (S3
/// `NoSuchUpload`: gone after an abort, a lifecycle rule, or a completion whose first reply was
/// lost and that the client sent again).
struct PutFailure {
    error: object_store::Error,
    in_upload: bool,
}

impl PutFailure {
    fn at_start(error: object_store::Error) -> PutFailure {
        PutFailure { error, in_upload: false }
    }

    fn in_upload(error: object_store::Error) -> PutFailure {
        PutFailure { error, in_upload: true }
    }

    /// A 404 about the upload and not about the bucket or container. Azure has no request that
    /// starts an upload (its first is a block's), so its missing container is told by its code.
    fn upload_vanished(&self) -> bool {
        self.in_upload
            && matches!(self.error, object_store::Error::NotFound { .. })
            && !names_missing_container(&self.error)
    }
}

/// Whether the storage's answer names a missing bucket or container (S3 `NoSuchBucket`, Azure
/// `ContainerNotFound`; object_store keeps the error body of a 4xx in the message).
fn names_missing_container(e: &object_store::Error) -> bool {
    let text = e.to_string();
    text.contains("NoSuchBucket") || text.contains("ContainerNotFound")
}

/// What [`CloudStore::existing`] found under a name.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    /// Exactly the bytes we were putting.
    Ours,
    /// Another object.
    Other,
    /// No object.
    Nothing,
}

/// The message of a delete the storage refused with 409 Conflict. On Azure that is an
/// immutability policy or a legal hold (`BlobImmutableDueToPolicy`) keeping the blob, or a
/// lease on it; object_store reports a 409 as "already exists", which would mislead.
fn delete_conflict_message(e: &object_store::Error) -> String {
    let text = e.to_string();
    if text.contains("Immutable") || text.contains("immutable") {
        format!(
            "the blob is immutable (an Azure immutability policy or legal hold keeps it): pitr cannot delete it \
             before its retention passes. pitr deletes objects of its own as it works (writer leases, locks, \
             running markers, compacted WAL), which a time-based immutability policy on the container refuses; \
             see \"Immutability\" in docs/operations.md ({text})"
        )
    } else {
        format!("409 Conflict: the storage keeps the object (on Azure: a lease, or an immutability policy) ({text})")
    }
}

fn taken(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. })
}

#[async_trait]
impl Store for CloudStore {
    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let key = self.key(name)?;
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let result = match self.multipart {
                // No HEAD first: the conditional completion is the one check that holds against
                // a concurrent writer, and a taken name is rare (a retry after a crash).
                Some((threshold, part_size)) if data.len() > threshold => {
                    self.put_multipart(name, &key, &data, part_size).await
                }
                _ => self.put_single(name, &key, &data).await.map_err(PutFailure::at_start),
            };
            let failure = match result {
                Ok(()) => return Ok(PutOutcome::Created),
                Err(f) => f,
            };
            let again = if taken(&failure.error) {
                match self.existing(name, &key, &data).await {
                    Ok(Existing::Ours) => return Ok(PutOutcome::Created),
                    Ok(Existing::Other) => return Ok(PutOutcome::AlreadyExists),
                    // Refused as taken, and nothing is there: deleted since (or a refusal for
                    // another reason, which the next attempt shows). Put again.
                    Ok(Existing::Nothing) => "the name was refused as taken, but no object is there",
                    Err(e) => return Err(self.read_back_err(name, &failure.error, e)),
                }
            } else if failure.upload_vanished() {
                match self.existing(name, &key, &data).await {
                    // The completion landed and its reply was lost; the client's resend found
                    // the upload gone.
                    Ok(Existing::Ours) => return Ok(PutOutcome::Created),
                    Ok(found) => {
                        let holds = match found {
                            Existing::Other => "another object is under the name",
                            _ => "nothing is under the name",
                        };
                        return Err(StoreError::Backend {
                            op: "put",
                            name: name.to_string(),
                            location: self.location.clone(),
                            message: format!(
                                "the multipart upload vanished before it was completed (aborted elsewhere, or \
                                 removed by a lifecycle rule), and {holds}: {}",
                                failure.error
                            ),
                        });
                    }
                    Err(e) => return Err(self.read_back_err(name, &failure.error, e)),
                }
            } else if ambiguous_put_failure(&failure.error) {
                "put failed; retrying"
            } else {
                return Err(self.put_err("put", name, failure.error));
            };
            if started.elapsed() >= self.retry_timeout {
                if taken(&failure.error) {
                    return Err(StoreError::Backend {
                        op: "put",
                        name: name.to_string(),
                        location: self.location.clone(),
                        message: format!("{again}, still after {:?} of retries: {}", started.elapsed(), failure.error),
                    });
                }
                return Err(self.put_err("put", name, failure.error));
            }
            let wait = self.backoff(attempt);
            attempt += 1;
            tracing::warn!(object = name, location = %self.location, error = %failure.error, retry_in = ?wait, attempt, "{again}");
            tokio::time::sleep(wait).await;
        }
    }

    async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        let key = self.key(name)?;
        let _permit = self.permit(name).await;
        let result = self.inner.get(&key).await.map_err(|e| self.err("get", name, e))?;
        result.bytes().await.map_err(|e| self.err("get", name, e))
    }

    async fn get_limited(&self, name: &str, limit: u64) -> Result<Bytes, StoreError> {
        let key = self.key(name)?;
        let _permit = self.permit(name).await;
        let result = self.inner.get(&key).await.map_err(|e| self.err("get", name, e))?;
        // The response head gives the size: a body over the limit is never read.
        let size = result.meta.size;
        if size > limit {
            return Err(StoreError::TooLarge { name: name.to_string(), location: self.location.clone(), size, limit });
        }
        result.bytes().await.map_err(|e| self.err("get", name, e))
    }

    async fn check_conditional_create(&self) -> Result<(), StoreError> {
        self.probe_conditional_create("if-none-match", None).await?;
        // Large objects are committed by another request (S3 CompleteMultipartUpload, Azure Put
        // Block List), which a server may treat differently: probed too, with a small upload
        // (S3: one part, which may be under 5 MiB as it is the last; Azure: two blocks).
        if let Some(part_size) = self.probe_part_size {
            self.probe_conditional_create("if-none-match-upload", Some(part_size)).await?;
        }
        Ok(())
    }

    async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let key = self.key(name)?;
        let _permit = self.permit(name).await;
        // A range past the end is cut at the end, as the trait promises.
        let size = self.inner.head(&key).await.map_err(|e| self.err("get range", name, e))?.size;
        let range = range.start.min(size)..range.end.min(size);
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        self.inner.get_range(&key, range).await.map_err(|e| self.err("get range", name, e))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        // object_store lists by path components; names may share a partial last component.
        let dir = prefix.rfind('/').map(|i| &prefix[..i]).unwrap_or("");
        let (full_dir, strip) = self.listing_path(dir);
        let _permit = self.permit(prefix).await;
        let metas: Vec<object_store::ObjectMeta> =
            self.inner.list(full_dir.as_ref()).try_collect().await.map_err(|e| self.err("list", prefix, e))?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.as_ref().strip_prefix(&strip)?.to_string();
                name.starts_with(prefix).then_some(ObjectInfo { name, size: m.size })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn list_children(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let (full_dir, strip) = self.listing_path(dir.trim_end_matches('/'));
        let _permit = self.permit(dir).await;
        let listed = self.inner.list_with_delimiter(full_dir.as_ref()).await.map_err(|e| self.err("list", dir, e))?;
        let mut out: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| Some(format!("{}/", p.as_ref().strip_prefix(&strip)?)))
            .chain(listed.objects.iter().filter_map(|m| Some(m.location.as_ref().strip_prefix(&strip)?.to_string())))
            .filter(|name| name.starts_with(dir))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let key = self.key(name)?;
        let _permit = self.permit(name).await;
        match self.inner.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            // Not transient, and the object stays: a refusal, as S3's 403 under Object Lock.
            Err(e @ object_store::Error::AlreadyExists { .. }) => Err(StoreError::Denied {
                op: "delete",
                name: name.to_string(),
                location: self.location.clone(),
                message: delete_conflict_message(&e),
            }),
            Err(e) => Err(self.err("delete", name, e)),
        }
    }

    async fn delete_many(&self, names: &[String]) -> Result<(), StoreError> {
        // Single deletes, a few at a time: each refusal keeps its typed error (DeleteObjects
        // reports them as text), and S3 does not charge for DELETE requests.
        for chunk in names.chunks(8) {
            let mut deletes = Vec::with_capacity(chunk.len());
            for name in chunk {
                deletes.push(self.delete(name));
            }
            for result in futures_util::future::join_all(deletes).await {
                result?;
            }
        }
        Ok(())
    }

    async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let key = self.key(name)?;
        let _permit = self.permit(name).await;
        match self.inner.head(&key).await {
            Ok(m) => Ok(Some(ObjectInfo { name: name.to_string(), size: m.size })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("head", name, e)),
        }
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn has_retention(&self) -> bool {
        self.retention.is_some()
    }

    async fn extend_retention(&self, name: &str, until_us: i64) -> Result<bool, StoreError> {
        let (Some(api), Some(lock)) = (&self.retention, &self.object_lock) else { return Ok(false) };
        let key = self.key(name)?;
        // S3 keeps whole seconds: round up, so that the date read back next time compares as
        // reaching `until_us` and is not extended again.
        let until_us = until_us.saturating_add(999_999).div_euclid(1_000_000).saturating_mul(1_000_000);
        let until = crate::cloud::s3::s3_date(until_us);
        // Read first: only ever extend (S3 refuses shortening a COMPLIANCE retention, and a
        // GOVERNANCE one without the bypass permission), and a HEAD is cheaper than a PUT.
        let current = self.retention_request("read retention of", name, || api.get(&key)).await?;
        if current.until_us.is_some_and(|u| u >= until_us) {
            return Ok(false);
        }
        // Never weaken: a COMPLIANCE object stays COMPLIANCE (S3 refuses the change) even if the
        // configuration now says GOVERNANCE; GOVERNANCE may be raised to COMPLIANCE.
        let mode = match (current.mode, lock.mode) {
            (Some(LockMode::Compliance), _) | (_, LockMode::Compliance) => LockMode::Compliance,
            _ => LockMode::Governance,
        };
        let version = current.version_id.as_deref();
        self.retention_request("extend retention of", name, || api.put(&key, version, mode, &until)).await?;
        Ok(true)
    }
}

/// The object_store client settings shared by S3, GCS and Azure.
pub(crate) fn client_options(opts: &CloudOptions) -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_allow_http(opts.allow_http)
        .with_connect_timeout(opts.connect_timeout)
        .with_timeout(opts.request_timeout)
}

pub(crate) fn retry_config(opts: &CloudOptions) -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: opts.retry_initial_backoff,
            max_backoff: opts.retry_max_backoff,
            base: 2.0,
        },
        max_retries: opts.max_retries,
        retry_timeout: opts.retry_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_options_are_checked() {
        let opts = CloudOptions::default();
        for (url, needle) in [("s3:/x", "expected s3://"), ("s3:///p", "no bucket"), ("ftp://b/p", "unknown scheme")] {
            let err = CloudStore::open(url, &opts).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
        let small_parts = CloudOptions { multipart_part_size: 1 << 20, ..CloudOptions::default() };
        assert!(CloudStore::open("s3://b/p", &small_parts).unwrap_err().to_string().contains("5 MiB"));
        let locked_gcs = CloudOptions {
            object_lock: Some(ObjectLock { mode: LockMode::Compliance, days: 1 }),
            ..CloudOptions::default()
        };
        assert!(CloudStore::open("gs://b/p", &locked_gcs).unwrap_err().to_string().contains("S3 feature"));
        let no_key = CloudOptions { service_account_key: Some("/nonexistent/key.json".into()), ..Default::default() };
        assert!(CloudStore::open("gs://b/p", &no_key).unwrap_err().to_string().contains("/nonexistent/key.json"));
        assert_eq!("governance".parse::<LockMode>().unwrap(), LockMode::Governance);
        assert!("legal".parse::<LockMode>().is_err());
    }

    #[test]
    fn azure_urls_open_and_bad_ones_are_named() {
        let opts = CloudOptions {
            storage_account: Some("devstoreaccount1".into()),
            endpoint: Some("http://127.0.0.1:9/devstoreaccount1".into()),
            allow_http: true,
            ..Default::default()
        };
        for url in ["az://pitr/clusters/a/", "azure://pitr/clusters/a"] {
            let store = CloudStore::open(url, &opts).unwrap();
            assert_eq!((store.prefix.as_str(), store.multipart), ("clusters/a", Some((32 << 20, 16 << 20))));
        }
        let err = CloudStore::open("az://Pitr_Repo/x", &opts).unwrap_err().to_string();
        assert!(
            err.contains("az://Pitr_Repo/x") && err.contains("\"Pitr_Repo\"") && err.contains("lowercase"),
            "{err}"
        );
        let locked = CloudOptions { object_lock: Some(ObjectLock { mode: LockMode::Governance, days: 1 }), ..opts };
        let err = CloudStore::open("az://pitr/x", &locked).unwrap_err().to_string();
        assert!(err.contains("Azure immutability policies"), "{err}");
        if std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_none() {
            let err = CloudStore::open("az://pitr/x", &CloudOptions::default()).unwrap_err().to_string();
            assert!(err.contains("storage_account") && err.contains("AZURE_STORAGE_ACCOUNT_NAME"), "{err}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_capped() {
        let store =
            CloudStore::open("s3://b/p", &CloudOptions { region: Some("us-east-1".into()), ..Default::default() })
                .unwrap();
        for attempt in 0..40 {
            let d = store.backoff(attempt);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_secs(15), "{attempt}: {d:?}");
        }
    }

    #[test]
    fn gcs_opens_with_a_service_account_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("sa.json");
        // object_store's test hooks: no OAuth, a base URL of our choosing; nothing is contacted.
        std::fs::write(
            &key,
            r#"{"client_email":"","private_key":"","private_key_id":"","gcs_base_url":"http://127.0.0.1:9","disable_oauth":true}"#,
        )
        .unwrap();
        let opts = CloudOptions { service_account_key: Some(key.clone()), ..Default::default() };
        let store = CloudStore::open("gs://bucket/clusters/a/", &opts).unwrap();
        assert_eq!(store.location(), "gs://bucket/clusters/a");
        assert!(store.multipart.is_none());
        std::fs::write(&key, "not json").unwrap();
        assert!(CloudStore::open("gs://bucket/x", &opts).is_err());
    }

    #[test]
    fn denied_is_typed() {
        let store =
            CloudStore::open("s3://b/p", &CloudOptions { region: Some("us-east-1".into()), ..Default::default() })
                .unwrap();
        let source = Box::new(std::io::Error::other("AccessDenied"));
        let e = store.err("delete", "x/y", object_store::Error::PermissionDenied { path: "p/x/y".into(), source });
        assert!(e.is_denied() && e.to_string().contains("x/y"), "{e}");
    }

    /// An error as object_store makes it from an answer: the 4xx body in its source's text.
    fn answered(status: u16, body: &str) -> object_store::Error {
        let source = Box::new(std::io::Error::other(format!("Server returned non-2xx status code: {status}: {body}")));
        let path = "p/x/y".to_string();
        match status {
            404 => object_store::Error::NotFound { path, source },
            409 => object_store::Error::AlreadyExists { path, source },
            _ => object_store::Error::Generic { store: "test", source },
        }
    }

    #[test]
    fn a_404_is_about_the_bucket_or_the_upload_by_where_and_what_it_names() {
        let no_upload = answered(404, "<Error><Code>NoSuchUpload</Code></Error>");
        assert!(PutFailure::in_upload(no_upload).upload_vanished());
        // The start of an upload or a single put: the bucket.
        assert!(!PutFailure::at_start(answered(404, "<Code>NoSuchUpload</Code>")).upload_vanished());
        // Azure's first request of an upload is a block's: a missing container is told by its code.
        for missing in ["<Code>ContainerNotFound</Code>", "<Code>NoSuchBucket</Code>"] {
            assert!(!PutFailure::in_upload(answered(404, missing)).upload_vanished(), "{missing}");
        }
        assert!(!PutFailure::in_upload(answered(409, "<Code>BlobAlreadyExists</Code>")).upload_vanished());
    }

    #[test]
    fn a_refused_delete_names_immutability() {
        let immutable = answered(
            409,
            "<Error><Code>BlobImmutableDueToPolicy</Code><Message>This operation is not permitted as the blob is \
             immutable due to a policy.</Message></Error>",
        );
        let message = delete_conflict_message(&immutable);
        assert!(
            message.contains("immutability policy or legal hold") && message.contains("docs/operations.md"),
            "{message}"
        );
        assert!(message.contains("BlobImmutableDueToPolicy"), "{message}");
        let lease = delete_conflict_message(&answered(409, "<Code>LeaseIdMissing</Code>"));
        assert!(lease.starts_with("409 Conflict") && lease.contains("LeaseIdMissing"), "{lease}");
    }

    #[test]
    fn prefixes_object_store_would_rewrite_are_refused_at_open() {
        let opts = CloudOptions {
            storage_account: Some("devstoreaccount1".into()),
            endpoint: Some("http://127.0.0.1:9/devstoreaccount1/".into()),
            allow_http: true,
            ..Default::default()
        };
        for prefix in ["a//b", "a/../b", "..", "a~b", "50%", "a#b", "a b?"] {
            let url = format!("az://pitr/{prefix}");
            let err = CloudStore::open(&url, &opts).unwrap_err().to_string();
            assert!(err.contains(&format!("prefix {prefix:?}")) && err.contains("single `/`"), "{url}: {err}");
        }
        for fine in ["", "clusters/a-1/b_2.c", "/clusters/a/"] {
            assert!(CloudStore::open(&format!("az://pitr/{fine}"), &opts).is_ok(), "{fine}");
        }
    }

    #[tokio::test]
    async fn the_wal_streams_requests_do_not_wait_behind_a_backups() {
        let opts = CloudOptions { region: Some("us-east-1".into()), max_concurrency: 2, ..Default::default() };
        let store = CloudStore::open("s3://stream-slots/x", &opts).unwrap();
        // A base backup's parts hold every general slot.
        let _backup = [store.permit("pg/1/blocks/ab/cd").await, store.permit("pg/1/blocks/ef/01").await];
        for name in
            ["pg/1/lease/", "pg/1/lease/0000000000000002", "pg/1/wal/000000010000000000000003", "pg/1/complete/"]
        {
            let permit = tokio::time::timeout(Duration::from_secs(5), store.permit(name)).await;
            assert!(permit.is_ok(), "{name} waited behind the backup");
        }
        let other = tokio::time::timeout(Duration::from_millis(100), store.permit("pg/1/backups/x")).await;
        assert!(other.is_err(), "max_concurrency no longer bounds other requests");
        for name in ["pg/", "pg//wal/x", "mongo/rs/lease/1", "pg/1/walrus", "pg/1/backups/wal/x"] {
            assert!(!is_stream_request(name), "{name}");
        }
    }

    #[test]
    fn one_semaphore_per_location() {
        let a = permits_for("s3://shared/x", 3);
        let b = permits_for("s3://shared/x", 7);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.available_permits(), 3);
    }
}
