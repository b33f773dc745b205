//! The S3 (and S3-compatible) backend, on `object_store`: conditional create with
//! `If-None-Match: *` for put-if-absent, its built-in retries with backoff, credentials from the
//! standard chain (environment, profile, instance/IRSA roles).

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use crate::store::{validate_name, ObjectInfo, PutOutcome, Store, StoreError};

/// Where and how to reach the bucket; unset fields come from the environment (`AWS_REGION`,
/// `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`…).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: bool,
    pub force_path_style: bool,
}

#[derive(Debug, Clone)]
pub struct S3Store {
    inner: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    prefix: String,
    location: String,
}

impl S3Store {
    /// `url` is `s3://bucket[/prefix]`.
    pub fn new(url: &str, opts: &S3Options) -> Result<S3Store, StoreError> {
        let bad = |message: String| StoreError::Backend {
            op: "open",
            name: String::new(),
            location: url.to_string(),
            message,
        };
        let rest = url.strip_prefix("s3://").ok_or_else(|| bad("expected s3://bucket/prefix".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name".into()));
        }
        let prefix = prefix.trim_matches('/').to_string();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(e) = &opts.endpoint {
            builder = builder.with_endpoint(e);
        }
        if let Some(r) = &opts.region {
            builder = builder.with_region(r);
        }
        builder = builder.with_allow_http(opts.allow_http).with_virtual_hosted_style_request(!opts.force_path_style);
        let inner = builder.build().map_err(|e| bad(e.to_string()))?;
        Ok(S3Store { inner: Arc::new(inner), prefix, location: url.trim_end_matches('/').to_string() })
    }

    fn key(&self, name: &str) -> Result<ObjectPath, StoreError> {
        validate_name(name)?;
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) };
        Ok(ObjectPath::from(full))
    }

    fn err(&self, op: &'static str, name: &str, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => {
                StoreError::NotFound { name: name.to_string(), location: self.location.clone() }
            }
            other => StoreError::Backend {
                op,
                name: name.to_string(),
                location: self.location.clone(),
                message: other.to_string(),
            },
        }
    }
}

#[async_trait]
impl Store for S3Store {
    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let key = self.key(name)?;
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.inner.put_opts(&key, PutPayload::from(data), opts).await {
            Ok(_) => Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(self.err("put", name, e)),
        }
    }

    async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        let key = self.key(name)?;
        let result = self.inner.get(&key).await.map_err(|e| self.err("get", name, e))?;
        result.bytes().await.map_err(|e| self.err("get", name, e))
    }

    async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let key = self.key(name)?;
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
        let full_dir = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (true, false) => Some(ObjectPath::from(dir)),
            (false, true) => Some(ObjectPath::from(self.prefix.as_str())),
            (false, false) => Some(ObjectPath::from(format!("{}/{dir}", self.prefix))),
        };
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
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

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let key = self.key(name)?;
        match self.inner.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", name, e)),
        }
    }

    async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let key = self.key(name)?;
        match self.inner.head(&key).await {
            Ok(m) => Ok(Some(ObjectInfo { name: name.to_string(), size: m.size })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("head", name, e)),
        }
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}
