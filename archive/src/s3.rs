//! The S3 (and S3-compatible) client for [`crate::cloud::CloudStore`]: `object_store`'s S3
//! builder with credentials from the standard chain (environment, profile, instance/IRSA roles),
//! conditional create with `If-None-Match: *`, and an HTTP layer under it for what
//! `object_store` 0.12 cannot send:
//! - `If-None-Match: *` on CompleteMultipartUpload (its multipart API completes unconditionally);
//! - Object Lock headers. `PutOptions` attributes cover only content headers and metadata, and
//!   client default headers are added after signing, but S3 requires every `x-amz-*` header to be
//!   signed and wants a retention date per object. So our puts carry a [`LockedPut`] request
//!   extension; this layer adds `x-amz-object-lock-mode`, `x-amz-object-lock-retain-until-date`
//!   and `Content-MD5` (which S3 requires on object-lock puts) and signs the request again with
//!   the same credentials.

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
use object_store::ClientOptions;

use crate::cloud::{client_options, retry_config, CloudOptions, ObjectLock};

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
        let until = chrono::Utc::now() + chrono::Duration::days(i64::from(lock.days));
        let until = until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
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

pub(crate) fn build(bucket: &str, opts: &CloudOptions) -> Result<AmazonS3, String> {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
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
    let _ = signer.set(Signer { credentials: s3.credentials().clone(), region });
    Ok(s3)
}
