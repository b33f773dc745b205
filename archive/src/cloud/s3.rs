//! The S3 (and S3-compatible) client for [`crate::cloud::CloudStore`]: `object_store`'s S3
//! builder with credentials from the standard chain (environment, a profile of the AWS shared
//! files read by [`crate::cloud::aws_profile`], web identity/IRSA, container and instance roles),
//! conditional create with `If-None-Match: *`, and an HTTP layer under it for what
//! `object_store` 0.12 cannot send:
//! - `If-None-Match: *` on CompleteMultipartUpload (its multipart API completes unconditionally);
//! - Object Lock headers. `PutOptions` attributes cover only content headers and metadata, and
//!   client default headers are added after signing, but S3 requires every `x-amz-*` header to be
//!   signed and wants a retention date per object. So our puts carry a [`LockedPut`] request
//!   extension; this layer adds `x-amz-object-lock-mode`, `x-amz-object-lock-retain-until-date`
//!   and `Content-MD5` (which S3 requires on object-lock puts) and signs the request again with
//!   the same credentials.
//!
//! Reading and extending an object's retention (`HEAD`, `PUT ?retention`), which object_store
//! has no API for, is [`RetentionApi`]: raw requests to the URL object_store uses for the object,
//! on a client with the same options, signed with the same credentials.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, IF_NONE_MATCH};
use http::Method;
use md5::Digest;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer, AwsCredentialProvider, Checksum};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer as _;
use object_store::ClientOptions;

use crate::cloud::{client_options, retry_config, CloudOptions, LockMode, ObjectLock};

/// Marks a request as one of our puts that must carry the Object Lock retention.
#[derive(Debug, Clone)]
pub(crate) struct LockedPut {
    /// Base64 MD5 of the body, for a single-request put (multipart parts carry
    /// `x-amz-checksum-sha256` instead, which object_store adds and signs).
    content_md5: Option<String>,
}

impl LockedPut {
    pub(crate) fn single(data: &Bytes) -> LockedPut {
        let digest = md5::Md5::digest(data);
        LockedPut { content_md5: Some(base64::engine::general_purpose::STANDARD.encode(digest)) }
    }

    pub(crate) fn multipart() -> LockedPut {
        LockedPut { content_md5: None }
    }
}

/// What re-signing needs; filled in once the client (and so its credential chain) exists.
#[derive(Debug)]
struct Signer {
    credentials: AwsCredentialProvider,
    region: String,
}

#[derive(Debug)]
struct PitrConnector {
    lock: Option<ObjectLock>,
    signer: Arc<OnceLock<Signer>>,
}

impl HttpConnector for PitrConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(PitrHttp { inner, lock: self.lock.clone(), signer: self.signer.clone() }))
    }
}

#[derive(Debug)]
struct PitrHttp {
    inner: HttpClient,
    lock: Option<ObjectLock>,
    signer: Arc<OnceLock<Signer>>,
}

fn has_query(req: &HttpRequest, key: &str) -> bool {
    req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some(key)))
}

fn layer_error(message: String) -> HttpError {
    HttpError::new(HttpErrorKind::Unknown, std::io::Error::other(message))
}

#[async_trait]
impl HttpService for PitrHttp {
    async fn call(&self, mut req: HttpRequest) -> Result<HttpResponse, HttpError> {
        // CompleteMultipartUpload: POST ?uploadId=…. A standard header need not be signed.
        if req.method() == Method::POST && has_query(&req, "uploadId") {
            req.headers_mut().insert(IF_NONE_MATCH, HeaderValue::from_static("*"));
        }
        if let (Some(lock), Some(put)) = (&self.lock, req.extensions().get::<LockedPut>().cloned()) {
            self.add_retention(&mut req, lock, &put).await?;
        }
        self.inner.execute(req).await
    }
}

impl PitrHttp {
    async fn add_retention(&self, req: &mut HttpRequest, lock: &ObjectLock, put: &LockedPut) -> Result<(), HttpError> {
        let signer = self.signer.get().ok_or_else(|| layer_error("S3 client used before it was set up".into()))?;
        // S3 wants whole seconds (ISO 8601, UTC); retention counts from the write.
        let until = s3_date(crate::now_us() + i64::from(lock.days) * 86_400_000_000);
        let headers = req.headers_mut();
        let value = |v: &str| HeaderValue::from_str(v).map_err(|e| layer_error(format!("header value {v:?}: {e}")));
        headers.insert(HeaderName::from_static("x-amz-object-lock-mode"), value(lock.mode.as_str())?);
        headers.insert(HeaderName::from_static("x-amz-object-lock-retain-until-date"), value(&until)?);
        if let Some(md5) = &put.content_md5 {
            headers.insert(HeaderName::from_static("content-md5"), value(md5)?);
        }
        headers.remove(AUTHORIZATION);
        // object_store signed the payload hash into x-amz-content-sha256; sign with the same one.
        let digest =
            headers.get("x-amz-content-sha256").and_then(|v| v.to_str().ok()).and_then(|v| hex::decode(v).ok());
        let credential =
            signer.credentials.get_credential().await.map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))?;
        let authorizer = AwsAuthorizer::new(&credential, "s3", &signer.region).with_sign_payload(digest.is_some());
        authorizer.authorize(req, digest.as_deref());
        Ok(())
    }
}

/// An object's Object Lock retention, as HEAD reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Retention {
    pub mode: Option<LockMode>,
    /// Retain-until, µs since the Unix epoch; `None`: no retention.
    pub until_us: Option<i64>,
    /// The current version, which `PUT ?retention` then names (so a version written in between
    /// is never the one changed).
    pub version_id: Option<String>,
}

/// Why a retention request failed.
#[derive(Debug)]
pub(crate) enum RetentionFailure {
    NotFound,
    /// 403: no `s3:PutObjectRetention` (or `GetObjectRetention`), or shortening a COMPLIANCE
    /// retention.
    Denied(String),
    /// Worth another attempt: connection errors, timeouts, 5xx, 429.
    Transient(String),
    Failed(String),
}

/// Raw retention requests; see the module documentation.
#[derive(Debug)]
pub(crate) struct RetentionApi {
    s3: AmazonS3,
    http: HttpClient,
    region: String,
}

/// `<Code>: <Message>` of an S3 error body, else the status line.
fn s3_error(status: http::StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{t}>"))? + start;
        Some(text[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("HTTP {status}: {code}: {message}"),
        (Some(code), None) => format!("HTTP {status}: {code}"),
        _ => format!("HTTP {status}"),
    }
}

/// S3's date format: ISO 8601, UTC, whole seconds.
pub(crate) fn s3_date(until_us: i64) -> String {
    crate::time::format_rfc3339_seconds(until_us)
}

impl RetentionApi {
    async fn send(
        &self,
        method: Method,
        key: &ObjectPath,
        query: &[(&str, &str)],
        body: Bytes,
    ) -> Result<HttpResponse, RetentionFailure> {
        // The URL object_store itself uses for the object (endpoint, bucket style, encoding),
        // without the presigning query.
        let mut url = self
            .s3
            .signed_url(method.clone(), key, std::time::Duration::from_secs(60))
            .await
            .map_err(|e| RetentionFailure::Transient(format!("object URL / credentials: {e}")))?;
        url.set_query(None);
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
        }
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .body(object_store::client::HttpRequestBody::from(body.clone()))
            .map_err(|e| RetentionFailure::Failed(format!("request {url}: {e}")))?;
        if !body.is_empty() {
            let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&body));
            let md5 = HeaderValue::from_str(&md5).map_err(|e| RetentionFailure::Failed(e.to_string()))?;
            req.headers_mut().insert(HeaderName::from_static("content-md5"), md5);
            req.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
        }
        let credential = self
            .s3
            .credentials()
            .get_credential()
            .await
            .map_err(|e| RetentionFailure::Transient(format!("credentials: {e}")))?;
        AwsAuthorizer::new(&credential, "s3", &self.region).authorize(&mut req, None);
        self.http.execute(req).await.map_err(|e| RetentionFailure::Transient(format!("{method} {url}: {e}")))
    }

    async fn check(response: HttpResponse) -> Result<HttpResponse, RetentionFailure> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.into_body().bytes().await.unwrap_or_default();
        let message = s3_error(status, &body);
        Err(match status.as_u16() {
            404 => RetentionFailure::NotFound,
            403 => RetentionFailure::Denied(message),
            429 | 500..=599 => RetentionFailure::Transient(message),
            _ => RetentionFailure::Failed(message),
        })
    }

    /// The object's current retention (HEAD: its `x-amz-object-lock-*` headers).
    pub(crate) async fn get(&self, key: &ObjectPath) -> Result<Retention, RetentionFailure> {
        let response = Self::check(self.send(Method::HEAD, key, &[], Bytes::new()).await?).await?;
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mode = match header("x-amz-object-lock-mode") {
            Some(m) => Some(m.parse::<LockMode>().map_err(RetentionFailure::Failed)?),
            None => None,
        };
        let until_us = match header("x-amz-object-lock-retain-until-date") {
            Some(d) => Some(
                chrono::DateTime::parse_from_rfc3339(&d)
                    .map_err(|e| RetentionFailure::Failed(format!("retain-until date {d:?}: {e}")))?
                    .timestamp_micros(),
            ),
            None => None,
        };
        Ok(Retention { mode, until_us, version_id: header("x-amz-version-id") })
    }

    /// Sets the retention of `version_id` (the current version if `None`) to `mode` until
    /// `until` (an [`s3_date`]).
    pub(crate) async fn put(
        &self,
        key: &ObjectPath,
        version_id: Option<&str>,
        mode: LockMode,
        until: &str,
    ) -> Result<(), RetentionFailure> {
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode><RetainUntilDate>{until}</RetainUntilDate></Retention>",
            mode.as_str()
        );
        let mut query = vec![("retention", "")];
        if let Some(v) = version_id {
            query.push(("versionId", v));
        }
        Self::check(self.send(Method::PUT, key, &query, Bytes::from(body)).await?).await?;
        Ok(())
    }
}

/// The S3 client, and with Object Lock the retention requests.
pub(crate) fn build(bucket: &str, opts: &CloudOptions) -> Result<(AmazonS3, Option<RetentionApi>), String> {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    // The chain's order, as the AWS SDKs have it: environment keys, then a profile, then
    // object_store's own web identity (IRSA), container and instance credentials.
    if builder.get_config_value(&AmazonS3ConfigKey::AccessKeyId).is_none() {
        if let Some(p) = crate::cloud::aws_profile::from_environment()? {
            builder = builder.with_access_key_id(p.access_key_id).with_secret_access_key(p.secret_access_key);
            if let Some(t) = p.session_token {
                builder = builder.with_token(t);
            }
            if let (Some(r), None) = (p.region, builder.get_config_value(&AmazonS3ConfigKey::Region)) {
                builder = builder.with_region(r);
            }
        }
    }
    if let Some(e) = &opts.endpoint {
        builder = builder.with_endpoint(e);
    }
    if let Some(r) = &opts.region {
        builder = builder.with_region(r);
    }
    if opts.object_lock.is_some() {
        // Object-lock uploads need an integrity header on every part, not only on single puts.
        builder = builder.with_checksum_algorithm(Checksum::SHA256);
    }
    let region = builder.get_config_value(&AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
    let signer = Arc::new(OnceLock::new());
    let s3 = builder
        .with_allow_http(opts.allow_http)
        .with_virtual_hosted_style_request(!opts.force_path_style)
        .with_client_options(client_options(opts))
        .with_retry(retry_config(opts))
        .with_http_connector(PitrConnector { lock: opts.object_lock.clone(), signer: signer.clone() })
        .build()
        .map_err(|e| e.to_string())?;
    let _ = signer.set(Signer { credentials: s3.credentials().clone(), region: region.clone() });
    let retention = match opts.object_lock {
        Some(_) => {
            // A client of its own with the same options: requests on it are ours, signed once,
            // and pass no layer.
            let http = ReqwestConnector::default().connect(&client_options(opts)).map_err(|e| e.to_string())?;
            Some(RetentionApi { s3: s3.clone(), http, region })
        }
        None => None,
    };
    Ok((s3, retention))
}
