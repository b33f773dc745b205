//! A small AWS KMS client: the three calls the key ring needs to keep repository keys under a KMS
//! key — `GenerateDataKey` (a fresh repository key and its blob), `Encrypt` (wrap an existing
//! repository key) and `Decrypt` (unwrap one).
//!
//! It speaks KMS's JSON protocol directly (`POST /`, `X-Amz-Target: TrentService.<Operation>`,
//! `application/x-amz-json-1.1`) over `object_store`'s HTTP client and SigV4 signer, as the S3
//! backend's retention requests do ([`crate::cloud::s3`]), rather than pulling in the AWS SDK
//! crates for three requests. Credentials come from the same standard chain as the S3 backend's:
//! environment, a profile of the AWS shared files ([`crate::cloud::aws_profile`]), then web
//! identity/IRSA, container and instance credentials.
//!
//! Each operation has one time budget ([`KmsOptions::timeout`]) that covers its retries:
//! network failures, timeouts, 5xx and throttling are retried with backoff inside it and then
//! reported as [`KmsError::Unreachable`]; an error KMS answers with (access denied, unknown or
//! disabled key, a blob that does not authenticate…) is [`KmsError::Refused`] at once.
//!
//! The plaintext key is held in [`Zeroizing`] buffers from the reply's parsing on, and our own
//! copies of request and reply bodies (which carry it in base64) are wiped once used. Copies
//! inside the HTTP stack (socket buffers, TLS records) are out of our reach. Nothing here logs or
//! prints a key.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, StatusCode};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer, AwsCredentialProvider};
use object_store::client::{HttpClient, HttpConnector, HttpRequest, ReqwestConnector};
use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// [`KmsOptions::timeout`] unless configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts of one operation at most (the time budget usually ends them first).
const MAX_ATTEMPTS: u32 = 4;

/// Wait before the first retry; each later one waits up to twice as long.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Cap on the wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A single attempt gets this share of the budget (but at least [`MIN_ATTEMPT_TIMEOUT`]), so
/// that one request lost to a dead connection still leaves time to try again.
const ATTEMPT_SHARE: u32 = 3;

/// Floor of one attempt's time limit.
const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// KMS error codes that mean "not now" rather than "no": retried, then
/// [`KmsError::Unreachable`].
const TRANSIENT_CODES: [&str; 6] = [
    "ThrottlingException",
    "KMSInternalException",
    "DependencyTimeoutException",
    "ServiceUnavailableException",
    "InternalFailure",
    "RequestTimeoutException",
];

/// Where and how to reach AWS KMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsOptions {
    /// The KMS key: key id, key ARN, `alias/NAME` or alias ARN, as KMS accepts it.
    pub key_id: String,
    /// Endpoint URL, for a VPC endpoint or a KMS-compatible server; `None`:
    /// `https://kms.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    /// `None`: `AWS_REGION`, else `AWS_DEFAULT_REGION`, else the AWS profile's, else `us-east-1`.
    pub region: Option<String>,
    /// Budget of one operation, retries included.
    pub timeout: Duration,
}

impl KmsOptions {
    /// Options for `key_id` with the default endpoint, region and timeout.
    pub fn new(key_id: impl Into<String>) -> KmsOptions {
        KmsOptions { key_id: key_id.into(), endpoint: None, region: None, timeout: DEFAULT_TIMEOUT }
    }
}

/// Explicit static credentials instead of the standard chain: for tests against an emulator,
/// which must not set process-wide environment variables that parallel tests would see.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"******")
            .field("session_token", &self.session_token.as_ref().map(|_| "******"))
            .finish()
    }
}

/// What went wrong with a KMS operation. [`KmsError::is_transient`] tells whether trying again
/// later can help.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// Network failure, timeout, 5xx or throttling, still so after the retries within the
    /// operation's budget.
    #[error("AWS KMS {operation} with key {key_id} at {endpoint}: unreachable: {cause}")]
    Unreachable {
        /// The KMS key as configured.
        key_id: String,
        /// The KMS API operation (`GenerateDataKey`, `Encrypt`, `Decrypt`).
        operation: &'static str,
        /// The endpoint URL.
        endpoint: String,
        /// The last attempt's failure, and how many attempts were made.
        cause: String,
    },
    /// KMS answered with an error: the key or the blob is not usable by these credentials.
    #[error("AWS KMS refused {operation} with key {key_id}: {code}: {message}")]
    Refused {
        /// The KMS key as configured.
        key_id: String,
        /// The KMS API operation.
        operation: &'static str,
        /// KMS's error code (`AccessDeniedException`, `NotFoundException`, `DisabledException`,
        /// `InvalidCiphertextException`, `KMSInvalidStateException`, `IncorrectKeyException`…),
        /// or `HTTP <status>` when the answer carried none.
        code: String,
        /// KMS's message (may be empty).
        message: String,
    },
    /// A successful answer that pitr cannot use.
    #[error("AWS KMS {operation} with key {key_id}: {what}")]
    Invalid {
        /// The KMS key as configured.
        key_id: String,
        /// The KMS API operation.
        operation: &'static str,
        /// What is wrong with it (`unusable reply: …`, or `cannot build the request: …`).
        what: String,
    },
    /// Bad configuration, or the credential chain could not be set up.
    #[error("AWS KMS configuration: {what}")]
    Config {
        /// What is wrong.
        what: String,
    },
}

impl KmsError {
    /// Whether the same operation may succeed later: KMS could not be reached, was overloaded or
    /// throttled us. Refusals, unusable replies and configuration errors stay as they are.
    pub fn is_transient(&self) -> bool {
        matches!(self, KmsError::Unreachable { .. })
    }

    /// The KMS API operation the error is about (`None` for configuration errors).
    pub fn operation(&self) -> Option<&'static str> {
        match self {
            KmsError::Unreachable { operation, .. }
            | KmsError::Refused { operation, .. }
            | KmsError::Invalid { operation, .. } => Some(operation),
            KmsError::Config { .. } => None,
        }
    }
}

/// A KMS API operation this client calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    GenerateDataKey,
    Encrypt,
    Decrypt,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::GenerateDataKey => "GenerateDataKey",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
        }
    }
}

/// A client for one KMS key. Cheap to clone (the connection pool and credentials are shared).
#[derive(Clone)]
pub struct KmsClient {
    inner: Arc<Inner>,
}

struct Inner {
    key_id: String,
    /// Without a trailing slash.
    endpoint: String,
    region: String,
    timeout: Duration,
    credentials: AwsCredentialProvider,
    http: HttpClient,
}

impl fmt::Debug for KmsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsClient")
            .field("key_id", &self.inner.key_id)
            .field("endpoint", &self.inner.endpoint)
            .field("region", &self.inner.region)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// Why one attempt failed.
#[derive(Debug)]
enum Failure {
    /// Worth another attempt.
    Transient(String),
    /// Final: the error to return.
    Final(FinalFailure),
}

#[derive(Debug, PartialEq, Eq)]
enum FinalFailure {
    Refused {
        code: String,
        message: String,
    },
    Invalid(String),
    /// The request could not be put together (a URL the `http` crate refuses).
    BadRequest(String),
}

impl KmsClient {
    /// A client with credentials from the standard AWS chain, as the S3 backend gets them.
    pub fn new(opts: &KmsOptions) -> Result<KmsClient, KmsError> {
        Self::build(opts, None)
    }

    /// A client that signs with `credentials` instead of the standard chain (tests against an
    /// emulator).
    pub fn with_static_credentials(opts: &KmsOptions, credentials: StaticCredentials) -> Result<KmsClient, KmsError> {
        Self::build(opts, Some(credentials))
    }

    fn build(opts: &KmsOptions, credentials: Option<StaticCredentials>) -> Result<KmsClient, KmsError> {
        let config = |what: String| KmsError::Config { what };
        let key_id = opts.key_id.trim();
        if key_id.is_empty() {
            return Err(config("no KMS key id".into()));
        }
        if opts.timeout.is_zero() {
            return Err(config(format!("timeout of KMS key {key_id} is zero")));
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut region = opts.region.clone().or_else(|| env("AWS_REGION")).or_else(|| env("AWS_DEFAULT_REGION"));
        // object_store has no client for KMS, but its S3 client carries the credential chain
        // (web identity, container and instance credentials with their refresh). We build one
        // only to take its credential provider; it never sends a request, so the bucket name is
        // a placeholder.
        let mut builder = match &credentials {
            Some(c) => {
                let b = AmazonS3Builder::new()
                    .with_access_key_id(&c.access_key_id)
                    .with_secret_access_key(&c.secret_access_key);
                match &c.session_token {
                    Some(t) => b.with_token(t),
                    None => b,
                }
            }
            None => AmazonS3Builder::from_env(),
        };
        // The chain's order as the S3 backend has it (cloud::s3::build): environment keys, then
        // a profile, then object_store's own providers.
        if credentials.is_none() && builder.get_config_value(&AmazonS3ConfigKey::AccessKeyId).is_none() {
            let profile = crate::cloud::aws_profile::from_environment().map_err(config)?;
            if let Some(p) = profile {
                builder = builder.with_access_key_id(p.access_key_id).with_secret_access_key(p.secret_access_key);
                if let Some(t) = p.session_token {
                    builder = builder.with_token(t);
                }
                region = region.or(p.region);
            }
        }
        let region = region.unwrap_or_else(|| "us-east-1".into());
        let endpoint = match &opts.endpoint {
            Some(e) => check_endpoint(e).map_err(config)?,
            None => format!("https://kms.{region}.amazonaws.com"),
        };
        let attempt_timeout = attempt_timeout(opts.timeout);
        let client_options = object_store::ClientOptions::new()
            // An `http://` endpoint is written out by whoever configured it (a test server or a
            // local proxy); nothing else turns it on.
            .with_allow_http(endpoint.starts_with("http://"))
            .with_connect_timeout(attempt_timeout)
            // Each attempt has its own, shorter limit (`attempts`), which names itself in the
            // error; this one only backs it up.
            .with_timeout(opts.timeout);
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig { init_backoff: INITIAL_BACKOFF, max_backoff: MAX_BACKOFF, base: 2.0 },
            max_retries: MAX_ATTEMPTS as usize,
            retry_timeout: opts.timeout,
        };
        let s3 = builder
            .with_bucket_name("pitr-kms-credentials-only")
            .with_region(&region)
            .with_client_options(client_options.clone())
            .with_retry(retry)
            .build()
            .map_err(|e| config(format!("AWS credentials for KMS key {key_id}: {e}")))?;
        let http = ReqwestConnector::default()
            .connect(&client_options)
            .map_err(|e| config(format!("HTTP client for KMS endpoint {endpoint}: {e}")))?;
        Ok(KmsClient {
            inner: Arc::new(Inner {
                key_id: key_id.to_string(),
                endpoint,
                region,
                timeout: opts.timeout,
                credentials: s3.credentials().clone(),
                http,
            }),
        })
    }

    /// The KMS key as configured.
    pub fn key_id(&self) -> &str {
        &self.inner.key_id
    }

    /// The endpoint URL requests go to.
    pub fn endpoint(&self) -> String {
        self.inner.endpoint.clone()
    }

    /// The region requests are signed for.
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// 32 fresh bytes from KMS and the ciphertext blob of them under the key (`KeySpec`
    /// `AES_256`), bound to `context` (KMS's encryption context).
    pub async fn generate_data_key(
        &self,
        context: &[(&str, &str)],
    ) -> Result<(Zeroizing<[u8; 32]>, Vec<u8>), KmsError> {
        let op = Operation::GenerateDataKey;
        let body = generate_data_key_body(self.key_id(), context).map_err(|what| self.invalid_request(op, what))?;
        let reply = self.call(op, body).await?;
        let parsed = parse_generate_data_key_reply(&reply);
        wipe(reply);
        parsed.map_err(|what| self.invalid_reply(op, what))
    }

    /// The ciphertext blob of `plaintext` under the key, bound to `context`.
    pub async fn encrypt(&self, plaintext: &[u8; 32], context: &[(&str, &str)]) -> Result<Vec<u8>, KmsError> {
        let op = Operation::Encrypt;
        let body = encrypt_body(self.key_id(), plaintext, context).map_err(|what| self.invalid_request(op, what))?;
        let reply = self.call(op, body).await?;
        parse_encrypt_reply(&reply).map_err(|what| self.invalid_reply(op, what))
    }

    /// The 32 bytes `blob` wraps. Passes KeyId so that a blob made under another key is refused
    /// by KMS, and `context`, which must be the one the blob was made with.
    pub async fn decrypt(&self, blob: &[u8], context: &[(&str, &str)]) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        let op = Operation::Decrypt;
        let body = decrypt_body(self.key_id(), blob, context).map_err(|what| self.invalid_request(op, what))?;
        let reply = self.call(op, body).await?;
        let parsed = parse_decrypt_reply(&reply);
        wipe(reply);
        parsed.map_err(|what| self.invalid_reply(op, what))
    }

    fn invalid_request(&self, op: Operation, what: String) -> KmsError {
        KmsError::Invalid {
            key_id: self.inner.key_id.clone(),
            operation: op.name(),
            what: format!("cannot build the request: {what}"),
        }
    }

    fn invalid_reply(&self, op: Operation, what: String) -> KmsError {
        KmsError::Invalid {
            key_id: self.inner.key_id.clone(),
            operation: op.name(),
            what: format!("unusable reply: {what}"),
        }
    }

    /// One operation: attempts with backoff until success, a final failure, or the budget ends.
    /// The request body is wiped afterwards (it may carry a key).
    async fn call(&self, op: Operation, mut body: Zeroizing<Vec<u8>>) -> Result<Bytes, KmsError> {
        // Moved, not copied, into the buffer the attempts share.
        let body = Bytes::from(std::mem::take(&mut *body));
        let outcome = self.attempts(op, &body).await;
        wipe(body);
        outcome
    }

    async fn attempts(&self, op: Operation, body: &Bytes) -> Result<Bytes, KmsError> {
        let inner = &self.inner;
        let start = Instant::now();
        let deadline = start + inner.timeout;
        let per_attempt = attempt_timeout(inner.timeout);
        let mut backoff = INITIAL_BACKOFF;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let limit = per_attempt.min(deadline.saturating_duration_since(Instant::now()));
            let failure = match tokio::time::timeout(limit, self.attempt(op, body.clone())).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(f)) => f,
                Err(_) => Failure::Transient(format!("no answer within {} ms", limit.as_millis())),
            };
            let cause = match failure {
                Failure::Transient(cause) => cause,
                Failure::Final(FinalFailure::Refused { code, message }) => {
                    return Err(KmsError::Refused { key_id: inner.key_id.clone(), operation: op.name(), code, message })
                }
                Failure::Final(FinalFailure::Invalid(what)) => return Err(self.invalid_reply(op, what)),
                Failure::Final(FinalFailure::BadRequest(what)) => return Err(self.invalid_request(op, what)),
            };
            let wait = rand::thread_rng().gen_range(backoff / 2..=backoff);
            if attempt >= MAX_ATTEMPTS || Instant::now() + wait >= deadline {
                return Err(KmsError::Unreachable {
                    key_id: inner.key_id.clone(),
                    operation: op.name(),
                    endpoint: inner.endpoint.clone(),
                    cause: format!(
                        "{cause} ({attempt} attempt{} in {:.1} s)",
                        if attempt == 1 { "" } else { "s" },
                        start.elapsed().as_secs_f64()
                    ),
                });
            }
            tracing::debug!(key_id = %inner.key_id, operation = op.name(), attempt, %cause, "AWS KMS request failed; retrying");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn attempt(&self, op: Operation, body: Bytes) -> Result<Bytes, Failure> {
        let inner = &self.inner;
        let credential = inner
            .credentials
            .get_credential()
            .await
            .map_err(|e| Failure::Transient(format!("AWS credentials: {e}")))?;
        let url = format!("{}/", inner.endpoint);
        let mut req: HttpRequest = http::Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/x-amz-json-1.1"))
            .header("x-amz-target", format!("TrentService.{}", op.name()))
            .body(body.into())
            .map_err(|e| Failure::Final(FinalFailure::BadRequest(format!("POST {url}: {e}"))))?;
        AwsAuthorizer::new(&credential, "kms", &inner.region).authorize(&mut req, None);
        let response = inner.http.execute(req).await.map_err(|e| Failure::Transient(format!("POST {url}: {e}")))?;
        let status = response.status();
        let error_type = response.headers().get("x-amzn-errortype").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| Failure::Transient(format!("reading the reply from {url}: {e}")))?;
        if status.is_success() {
            return Ok(body);
        }
        Err(classify_error(status, error_type.as_deref(), &body))
    }
}

/// One attempt's time limit within an operation's budget.
fn attempt_timeout(budget: Duration) -> Duration {
    (budget / ATTEMPT_SHARE).max(MIN_ATTEMPT_TIMEOUT).min(budget)
}

/// `endpoint` as requests use it: an `http(s)://host[:port][/path]` URL without a trailing slash.
fn check_endpoint(endpoint: &str) -> Result<String, String> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    let uri: http::Uri = trimmed.parse().map_err(|e| format!("KMS endpoint {endpoint:?}: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) if uri.query().is_none() => Ok(trimmed.to_string()),
        _ => Err(format!("KMS endpoint {endpoint:?}: expected http(s)://host[:port]")),
    }
}

/// Wipes a buffer that held key material in base64, if nothing else still shares it.
fn wipe(buffer: Bytes) {
    if let Ok(mut owned) = buffer.try_into_mut() {
        owned.as_mut().zeroize();
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// KMS's `EncryptionContext`: a map, so every key at most once.
fn context_map<'a>(context: &[(&'a str, &'a str)]) -> Result<BTreeMap<&'a str, &'a str>, String> {
    let mut map = BTreeMap::new();
    for (k, v) in context {
        if map.insert(*k, *v).is_some() {
            return Err(format!("encryption context names {k:?} twice"));
        }
    }
    Ok(map)
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RequestBody<'a> {
    key_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_spec: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext_blob: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    encryption_context: BTreeMap<&'a str, &'a str>,
}

/// Room for `body` serialised: enough from the start, so that no reallocation leaves a copy of a
/// key behind (JSON escapes a string to at most 6 bytes per byte; base64 needs none).
fn capacity_for(body: &RequestBody<'_>) -> usize {
    let context: usize = body.encryption_context.iter().map(|(k, v)| 6 * (k.len() + v.len()) + 6).sum();
    128 + 6 * body.key_id.len()
        + body.key_spec.map_or(0, str::len)
        + body.plaintext.map_or(0, str::len)
        + body.ciphertext_blob.map_or(0, str::len)
        + context
}

fn serialize(body: &RequestBody<'_>) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut out = Zeroizing::new(Vec::with_capacity(capacity_for(body)));
    serde_json::to_writer(&mut *out, body).map_err(|e| e.to_string())?;
    Ok(out)
}

fn generate_data_key_body(key_id: &str, context: &[(&str, &str)]) -> Result<Zeroizing<Vec<u8>>, String> {
    serialize(&RequestBody {
        key_id,
        key_spec: Some("AES_256"),
        plaintext: None,
        ciphertext_blob: None,
        encryption_context: context_map(context)?,
    })
}

fn encrypt_body(key_id: &str, plaintext: &[u8; 32], context: &[(&str, &str)]) -> Result<Zeroizing<Vec<u8>>, String> {
    let encoded = Zeroizing::new(b64().encode(plaintext));
    serialize(&RequestBody {
        key_id,
        key_spec: None,
        plaintext: Some(&encoded),
        ciphertext_blob: None,
        encryption_context: context_map(context)?,
    })
}

fn decrypt_body(key_id: &str, blob: &[u8], context: &[(&str, &str)]) -> Result<Zeroizing<Vec<u8>>, String> {
    if blob.is_empty() {
        return Err("empty ciphertext blob".into());
    }
    let encoded = b64().encode(blob);
    serialize(&RequestBody {
        key_id,
        key_spec: None,
        plaintext: None,
        ciphertext_blob: Some(&encoded),
        encryption_context: context_map(context)?,
    })
}

#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "Plaintext", default, deserialize_with = "secret")]
    plaintext: Option<Zeroizing<String>>,
    #[serde(rename = "CiphertextBlob", default)]
    ciphertext_blob: Option<String>,
}

/// The plaintext field straight into a wiped-on-drop string (also when a later field fails).
fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Zeroizing<String>>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(Zeroizing::new))
}

fn parse_reply(body: &[u8]) -> Result<Reply, String> {
    serde_json::from_slice(body).map_err(|e| format!("not the JSON KMS answers with ({e})"))
}

fn key_from(reply: &Reply) -> Result<Zeroizing<[u8; 32]>, String> {
    let encoded = reply.plaintext.as_ref().ok_or("no Plaintext in the reply")?;
    let decoded =
        Zeroizing::new(b64().decode(encoded.as_bytes()).map_err(|e| format!("Plaintext is not base64 ({e})"))?);
    let mut key = Zeroizing::new([0u8; 32]);
    if decoded.len() != key.len() {
        return Err(format!("Plaintext is {} bytes, expected 32", decoded.len()));
    }
    key.copy_from_slice(&decoded);
    Ok(key)
}

fn blob_from(reply: &Reply) -> Result<Vec<u8>, String> {
    let encoded = reply.ciphertext_blob.as_deref().ok_or("no CiphertextBlob in the reply")?;
    let blob = b64().decode(encoded).map_err(|e| format!("CiphertextBlob is not base64 ({e})"))?;
    if blob.is_empty() {
        return Err("empty CiphertextBlob".into());
    }
    Ok(blob)
}

fn parse_generate_data_key_reply(body: &[u8]) -> Result<(Zeroizing<[u8; 32]>, Vec<u8>), String> {
    let reply = parse_reply(body)?;
    Ok((key_from(&reply)?, blob_from(&reply)?))
}

fn parse_encrypt_reply(body: &[u8]) -> Result<Vec<u8>, String> {
    blob_from(&parse_reply(body)?)
}

fn parse_decrypt_reply(body: &[u8]) -> Result<Zeroizing<[u8; 32]>, String> {
    key_from(&parse_reply(body)?)
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "__type")]
    error_type: Option<String>,
    #[serde(alias = "Message")]
    message: Option<String>,
}

/// A KMS error reply: its code (from the body's `__type`, else the `X-Amzn-ErrorType` header)
/// and message, transient or final.
fn classify_error(status: StatusCode, error_type: Option<&str>, body: &[u8]) -> Failure {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    // `__type` may be qualified (`com.amazonaws.kms#NotFoundException`); the header may carry a
    // suffix (`NotFoundException:http://internal.amazon.com/…`).
    let code = parsed
        .as_ref()
        .and_then(|b| b.error_type.as_deref())
        .map(|t| t.rsplit('#').next().unwrap_or(t))
        .or_else(|| error_type.map(|t| t.split(':').next().unwrap_or(t)))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    let message = match (&parsed, &code) {
        (Some(b), _) => b.message.clone().unwrap_or_default(),
        // Not JSON: a proxy or load balancer answered; keep the start of what it said.
        (None, _) => String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_string(),
    };
    let transient = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || code.as_deref().is_some_and(|c| TRANSIENT_CODES.contains(&c));
    if transient {
        let what = match &code {
            Some(c) if message.is_empty() => format!("HTTP {status}: {c}"),
            Some(c) => format!("HTTP {status}: {c}: {message}"),
            None if message.is_empty() => format!("HTTP {status}"),
            None => format!("HTTP {status}: {message}"),
        };
        return Failure::Transient(what);
    }
    if status.is_client_error() {
        let code = code.unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
        return Failure::Final(FinalFailure::Refused { code, message });
    }
    Failure::Final(FinalFailure::Invalid(format!("unexpected HTTP {status}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn request_bodies() {
        let ctx = [("pitr-repository-key", "r0123abcd"), ("pitr-created-us", "1700000000000000")];
        let g = json(&generate_data_key_body("alias/pitr", &ctx).unwrap());
        assert_eq!(
            g,
            serde_json::json!({"KeyId": "alias/pitr", "KeySpec": "AES_256", "EncryptionContext":
                {"pitr-repository-key": "r0123abcd", "pitr-created-us": "1700000000000000"}})
        );
        let e = json(&encrypt_body("k", &[7u8; 32], &[]).unwrap());
        assert_eq!(e, serde_json::json!({"KeyId": "k", "Plaintext": b64().encode([7u8; 32])}));
        let d = json(&decrypt_body("arn:aws:kms:eu-west-1:1:key/x", &[1, 2, 3], &ctx[..1]).unwrap());
        assert_eq!(
            d,
            serde_json::json!({"KeyId": "arn:aws:kms:eu-west-1:1:key/x", "CiphertextBlob": "AQID",
                "EncryptionContext": {"pitr-repository-key": "r0123abcd"}})
        );
        assert!(decrypt_body("k", &[], &[]).unwrap_err().contains("empty"));
        assert!(generate_data_key_body("k", &[("a", "1"), ("a", "2")]).unwrap_err().contains("\"a\" twice"));
    }

    #[test]
    fn request_body_buffers_do_not_grow() {
        // Worst cases for escaping: control characters in the context and the key id.
        let ctx = [("pitr-repository-key\u{1}\"", "r0123abcd\u{1f}"), ("pitr-created-us", "\u{0}\u{0}\u{0}")];
        let long_id = "arn:aws:kms:ap-southeast-2:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab\u{1}";
        let big_blob = vec![9u8; 6000];
        for (key, blob) in [(Some([0xffu8; 32]), None), (None, Some(&big_blob[..])), (None, Some(&[1u8][..]))] {
            let (encoded_key, encoded_blob) = (key.map(|k| b64().encode(k)), blob.map(|b| b64().encode(b)));
            let request = RequestBody {
                key_id: long_id,
                key_spec: None,
                plaintext: encoded_key.as_deref(),
                ciphertext_blob: encoded_blob.as_deref(),
                encryption_context: context_map(&ctx).unwrap(),
            };
            let body = serialize(&request).unwrap();
            assert!(body.len() <= capacity_for(&request), "{} > {}", body.len(), capacity_for(&request));
            assert_eq!(body.capacity(), Vec::<u8>::with_capacity(capacity_for(&request)).capacity());
        }
    }

    #[test]
    fn replies() {
        let key = [0x5au8; 32];
        let blob = b"moto-or-kms-blob";
        let reply = format!(
            r#"{{"CiphertextBlob":"{}","Plaintext":"{}","KeyId":"arn:aws:kms:us-east-1:1:key/k"}}"#,
            b64().encode(blob),
            b64().encode(key)
        );
        let (k, b) = parse_generate_data_key_reply(reply.as_bytes()).unwrap();
        assert_eq!((*k, b.as_slice()), (key, &blob[..]));
        assert_eq!(parse_encrypt_reply(reply.as_bytes()).unwrap(), blob);
        assert_eq!(*parse_decrypt_reply(reply.as_bytes()).unwrap(), key);

        let short = format!(r#"{{"Plaintext":"{}"}}"#, b64().encode([1u8; 16]));
        assert!(parse_decrypt_reply(short.as_bytes()).unwrap_err().contains("16 bytes, expected 32"));
        assert!(parse_decrypt_reply(b"{}").unwrap_err().contains("no Plaintext"));
        assert!(parse_decrypt_reply(br#"{"Plaintext":"%%%"}"#).unwrap_err().contains("not base64"));
        assert!(parse_encrypt_reply(br#"{"KeyId":"k"}"#).unwrap_err().contains("no CiphertextBlob"));
        assert!(parse_encrypt_reply(br#"{"CiphertextBlob":""}"#).unwrap_err().contains("empty"));
        assert!(parse_generate_data_key_reply(b"<html>").unwrap_err().contains("not the JSON"));
        // A blob but no key: the data key would be unknown.
        let no_key = format!(r#"{{"CiphertextBlob":"{}"}}"#, b64().encode(blob));
        assert!(parse_generate_data_key_reply(no_key.as_bytes()).unwrap_err().contains("no Plaintext"));
    }

    fn refused(f: Failure) -> (String, String) {
        match f {
            Failure::Final(FinalFailure::Refused { code, message }) => (code, message),
            other => panic!("not refused: {other:?}"),
        }
    }

    fn transient(f: Failure) -> String {
        match f {
            Failure::Transient(what) => what,
            other => panic!("not transient: {other:?}"),
        }
    }

    #[test]
    fn error_classification() {
        let bad = StatusCode::BAD_REQUEST;
        let (code, message) = refused(classify_error(
            bad,
            None,
            br#"{"__type":"AccessDeniedException","message":"User: x is not authorized"}"#,
        ));
        assert_eq!((code.as_str(), message.as_str()), ("AccessDeniedException", "User: x is not authorized"));
        let (code, message) = refused(classify_error(
            bad,
            None,
            br#"{"__type":"com.amazonaws.kms#DisabledException","Message":"arn:aws:kms:x is disabled."}"#,
        ));
        assert_eq!((code.as_str(), message.as_str()), ("DisabledException", "arn:aws:kms:x is disabled."));
        let (code, message) = refused(classify_error(bad, None, br#"{"__type":"InvalidCiphertextException"}"#));
        assert_eq!((code.as_str(), message.as_str()), ("InvalidCiphertextException", ""));
        // The code only in the header.
        let (code, _) = refused(classify_error(bad, Some("KMSInvalidStateException:http://internal"), b"{}"));
        assert_eq!(code, "KMSInvalidStateException");
        // Not from KMS (a proxy): the status stands in for the code.
        let (code, message) = refused(classify_error(StatusCode::FORBIDDEN, None, b"<html>Forbidden</html>"));
        assert_eq!((code.as_str(), message.as_str()), ("HTTP 403", "<html>Forbidden</html>"));

        let t = transient(classify_error(bad, None, br#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#));
        assert!(t.contains("ThrottlingException: Rate exceeded"), "{t}");
        let t =
            transient(classify_error(StatusCode::INTERNAL_SERVER_ERROR, None, br#"{"__type":"KMSInternalException"}"#));
        assert!(t.contains("500") && t.contains("KMSInternalException"), "{t}");
        assert!(transient(classify_error(StatusCode::SERVICE_UNAVAILABLE, None, b"")).contains("503"));
        assert!(transient(classify_error(StatusCode::TOO_MANY_REQUESTS, None, b"slow down")).contains("slow down"));
        match classify_error(StatusCode::MOVED_PERMANENTLY, None, b"") {
            Failure::Final(FinalFailure::Invalid(what)) => assert!(what.contains("301"), "{what}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_key_operation_and_endpoint() {
        let e = KmsError::Unreachable {
            key_id: "alias/pitr".into(),
            operation: "Decrypt",
            endpoint: "https://kms.eu-west-1.amazonaws.com".into(),
            cause: "no answer within 3333 ms (3 attempts in 10.0 s)".into(),
        };
        let text = e.to_string();
        assert!(text.contains("alias/pitr") && text.contains("Decrypt") && text.contains("kms.eu-west-1"), "{text}");
        assert!(e.is_transient());
        assert_eq!(e.operation(), Some("Decrypt"));
        let e = KmsError::Refused {
            key_id: "k".into(),
            operation: "Encrypt",
            code: "DisabledException".into(),
            message: "m".into(),
        };
        assert!(!e.is_transient());
        assert!(e.to_string().contains("refused Encrypt with key k: DisabledException: m"));
        assert!(!KmsError::Config { what: "x".into() }.is_transient());
    }

    #[test]
    fn options_and_endpoints() {
        assert_eq!(check_endpoint("http://127.0.0.1:5000/").unwrap(), "http://127.0.0.1:5000");
        assert_eq!(
            check_endpoint(" https://vpce-1.kms.eu-west-1.vpce.amazonaws.com ").unwrap(),
            "https://vpce-1.kms.eu-west-1.vpce.amazonaws.com"
        );
        for bad in ["kms.local", "ftp://h", "http://h/?x=1", ""] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
        let creds = StaticCredentials {
            access_key_id: "AKIATEST".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("token-secret".into()),
        };
        let opts = KmsOptions { region: Some("eu-central-1".into()), ..KmsOptions::new("alias/pitr") };
        let client = KmsClient::with_static_credentials(&opts, creds.clone()).unwrap();
        assert_eq!(client.endpoint(), "https://kms.eu-central-1.amazonaws.com");
        assert_eq!(client.key_id(), "alias/pitr");
        let debug = format!("{client:?} {creds:?}");
        assert!(!debug.contains("very-secret") && !debug.contains("token-secret"), "{debug}");
        let err = KmsClient::with_static_credentials(&KmsOptions::new(" "), creds.clone()).unwrap_err();
        assert!(matches!(err, KmsError::Config { .. }), "{err}");
        let opts = KmsOptions { endpoint: Some("kms.local".into()), ..KmsOptions::new("k") };
        let err = KmsClient::with_static_credentials(&opts, creds).unwrap_err();
        assert!(err.to_string().contains("kms.local"), "{err}");
        assert_eq!(attempt_timeout(Duration::from_secs(10)), Duration::from_secs(10) / 3);
        assert_eq!(attempt_timeout(Duration::from_millis(500)), Duration::from_millis(500));
    }
}
