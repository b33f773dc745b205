//! The rules for object-storage settings as a person writes them (every one optional), turned
//! into [`CloudOptions`] with the client defaults filled in. Which settings go together (Object
//! Lock needs S3, a service-account key needs GCS, a storage account needs Azure) and which values a server or the client cannot
//! work with are checked here, once, so that a bad value fails at start-up and not at the first
//! put.
//!
//! Error texts name the settings by their configuration keys; the caller says where they came
//! from (`[repository]`).

use std::path::PathBuf;
use std::time::Duration;

use crate::cloud::{CloudOptions, LockMode, ObjectLock};

/// S3's smallest part of a multipart upload (every part but the last).
const MIN_PART_SIZE: usize = 5 << 20;

/// Object-storage settings as given, before checking: `None` means the client default.
#[derive(Debug, Clone, Default)]
pub struct CloudSettings {
    /// S3 endpoint for S3-compatible servers.
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// Allow plain-HTTP endpoints.
    pub allow_http: bool,
    /// Path-style requests instead of virtual-hosted style.
    pub force_path_style: bool,
    /// GCS service-account JSON key file.
    pub service_account_key: Option<PathBuf>,
    /// Azure storage account name.
    pub storage_account: Option<String>,
    /// Requests in flight at once, across the process.
    pub max_concurrency: Option<usize>,
    /// S3: objects above this many bytes go up as multipart uploads.
    pub multipart_threshold: Option<usize>,
    /// S3: part size of multipart uploads.
    pub multipart_part_size: Option<usize>,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Option<Duration>,
    /// Limit on one whole request, body included.
    pub request_timeout: Option<Duration>,
    /// Retries of one request.
    pub max_retries: Option<usize>,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Option<Duration>,
    /// First backoff between retries.
    pub retry_initial_backoff: Option<Duration>,
    /// Longest backoff between retries.
    pub retry_max_backoff: Option<Duration>,
    /// S3 Object Lock: retention in days of every object written.
    pub object_lock_days: Option<u32>,
    /// S3 Object Lock mode, `GOVERNANCE` or `COMPLIANCE` (any case).
    pub object_lock_mode: Option<String>,
}

/// A setting, or a combination of settings, that object storage cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudOptionsError {
    /// A lock mode without a retention period.
    #[error("object_lock_mode needs object_lock_days")]
    LockModeWithoutDays,
    /// A retention period of zero days.
    #[error("object_lock_days must be at least 1")]
    LockDaysZero,
    /// Object Lock on Azure, which has immutability policies instead (not managed by pitr).
    #[error(
        "object_lock_days / object_lock_mode: S3 Object Lock is not available on Azure (az://), and pitr does \
         not manage Azure immutability policies (a container-level one refuses the deletes pitr makes as it \
         works; see \"Immutability\" in docs/operations.md)"
    )]
    LockNotOnAzure,
    /// Object Lock on a store other than S3.
    #[error("object_lock_days: S3 Object Lock needs an s3:// url (on GCS use a bucket retention policy)")]
    LockNeedsS3,
    /// An unknown lock mode (the text says which and what is expected).
    #[error("object_lock_mode = {0}")]
    LockMode(String),
    /// A service-account key for a store other than GCS.
    #[error("service_account_key applies to a gs:// url only")]
    KeyNeedsGcs,
    /// A storage account for a store other than Azure.
    #[error("storage_account applies to an az:// url only")]
    AccountNeedsAzure,
    /// A storage account name Azure cannot have.
    #[error("storage_account: {0}")]
    BadAccount(String),
    /// An S3-only setting with an Azure url, where the client would ignore it.
    #[error("{0} applies to an s3:// url only, not to az://")]
    S3OnlyNotOnAzure(&'static str),
    /// No request could ever run.
    #[error("max_concurrency must be at least 1")]
    NoConcurrency,
    /// A part size S3 refuses.
    #[error("multipart_part_size = {0}: S3 needs at least 5 MiB (5242880)")]
    PartTooSmall(usize),
    /// Objects between the threshold and the part size would go up as a single part.
    #[error("multipart_threshold must be at least multipart_part_size")]
    ThresholdBelowPartSize,
    /// A timeout of zero fails every request.
    #[error("connect_timeout and request_timeout must be greater than 0")]
    ZeroTimeout,
    /// Backoffs that cannot grow from the first to the longest.
    #[error("retry_initial_backoff must be greater than 0 and at most retry_max_backoff")]
    Backoff,
}

impl CloudSettings {
    /// Checks the settings for a store at `url` (`s3://…`, `gs://…`, `az://…`; `None` for a store that is
    /// not object storage, where only the absence of cloud-only settings matters) and returns
    /// the client options with every unset value at its default.
    pub fn options(&self, url: Option<&str>) -> Result<CloudOptions, CloudOptionsError> {
        let d = CloudOptions::default();
        let scheme = url.and_then(|u| u.split_once("://")).map(|(s, _)| s);
        let azure = matches!(scheme, Some("az" | "azure"));
        if azure && (self.object_lock_days.is_some() || self.object_lock_mode.is_some()) {
            return Err(CloudOptionsError::LockNotOnAzure);
        }
        let object_lock = match (self.object_lock_days, &self.object_lock_mode) {
            (None, None) => None,
            (None, Some(_)) => return Err(CloudOptionsError::LockModeWithoutDays),
            (Some(0), _) => return Err(CloudOptionsError::LockDaysZero),
            (Some(days), mode) => {
                if scheme != Some("s3") {
                    return Err(CloudOptionsError::LockNeedsS3);
                }
                let mode = match mode {
                    Some(m) => m.parse::<LockMode>().map_err(CloudOptionsError::LockMode)?,
                    None => LockMode::Governance,
                };
                Some(ObjectLock { mode, days })
            }
        };
        if self.service_account_key.is_some() && scheme != Some("gs") {
            return Err(CloudOptionsError::KeyNeedsGcs);
        }
        if self.storage_account.is_some() && !azure {
            return Err(CloudOptionsError::AccountNeedsAzure);
        }
        if let Some(account) = &self.storage_account {
            crate::cloud::azure::check_account_name(account).map_err(CloudOptionsError::BadAccount)?;
        }
        if azure && self.region.is_some() {
            return Err(CloudOptionsError::S3OnlyNotOnAzure("region"));
        }
        if azure && self.force_path_style {
            return Err(CloudOptionsError::S3OnlyNotOnAzure("force_path_style"));
        }
        if self.max_concurrency == Some(0) {
            return Err(CloudOptionsError::NoConcurrency);
        }
        let opts = CloudOptions {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            allow_http: self.allow_http,
            force_path_style: self.force_path_style,
            service_account_key: self.service_account_key.clone(),
            storage_account: self.storage_account.clone(),
            max_concurrency: self.max_concurrency.unwrap_or(d.max_concurrency),
            multipart_threshold: self.multipart_threshold.unwrap_or(d.multipart_threshold),
            multipart_part_size: self.multipart_part_size.unwrap_or(d.multipart_part_size),
            connect_timeout: self.connect_timeout.unwrap_or(d.connect_timeout),
            request_timeout: self.request_timeout.unwrap_or(d.request_timeout),
            max_retries: self.max_retries.unwrap_or(d.max_retries),
            retry_timeout: self.retry_timeout.unwrap_or(d.retry_timeout),
            retry_initial_backoff: self.retry_initial_backoff.unwrap_or(d.retry_initial_backoff),
            retry_max_backoff: self.retry_max_backoff.unwrap_or(d.retry_max_backoff),
            object_lock,
        };
        if opts.multipart_part_size < MIN_PART_SIZE {
            return Err(CloudOptionsError::PartTooSmall(opts.multipart_part_size));
        }
        if opts.multipart_threshold < opts.multipart_part_size {
            return Err(CloudOptionsError::ThresholdBelowPartSize);
        }
        if opts.connect_timeout.is_zero() || opts.request_timeout.is_zero() {
            return Err(CloudOptionsError::ZeroTimeout);
        }
        if opts.retry_initial_backoff.is_zero() || opts.retry_max_backoff < opts.retry_initial_backoff {
            return Err(CloudOptionsError::Backoff);
        }
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_is_unset() {
        let opts = CloudSettings::default().options(Some("gs://b/p")).unwrap();
        let d = CloudOptions::default();
        assert_eq!((opts.max_concurrency, opts.multipart_part_size), (d.max_concurrency, d.multipart_part_size));
        assert!(opts.object_lock.is_none());
        let azure = CloudSettings { storage_account: Some("acct".into()), ..Default::default() };
        assert_eq!(azure.options(Some("az://c/p")).unwrap().storage_account.as_deref(), Some("acct"));
        let local = CloudSettings::default().options(None).unwrap();
        assert_eq!(local.max_retries, d.max_retries);
    }

    #[test]
    fn object_lock_needs_s3_days_and_a_known_mode() {
        let lock = |days, mode: Option<&str>| CloudSettings {
            object_lock_days: days,
            object_lock_mode: mode.map(String::from),
            ..Default::default()
        };
        let l = lock(Some(30), Some("compliance")).options(Some("s3://b/p")).unwrap().object_lock.unwrap();
        assert_eq!((l.mode, l.days), (LockMode::Compliance, 30));
        let l = lock(Some(1), None).options(Some("s3://b")).unwrap().object_lock.unwrap();
        assert_eq!(l.mode, LockMode::Governance);
        assert_eq!(
            lock(None, Some("COMPLIANCE")).options(Some("s3://b")).unwrap_err(),
            CloudOptionsError::LockModeWithoutDays
        );
        assert_eq!(lock(Some(0), None).options(Some("s3://b")).unwrap_err(), CloudOptionsError::LockDaysZero);
        assert_eq!(lock(Some(3), None).options(Some("gs://b")).unwrap_err(), CloudOptionsError::LockNeedsS3);
        assert_eq!(lock(Some(3), None).options(None).unwrap_err(), CloudOptionsError::LockNeedsS3);
        for azure in ["az://c/p", "azure://c"] {
            assert_eq!(lock(Some(3), None).options(Some(azure)).unwrap_err(), CloudOptionsError::LockNotOnAzure);
            assert_eq!(
                lock(None, Some("GOVERNANCE")).options(Some(azure)).unwrap_err(),
                CloudOptionsError::LockNotOnAzure
            );
        }
        let err = lock(Some(3), Some("strict")).options(Some("s3://b")).unwrap_err().to_string();
        assert!(err.starts_with("object_lock_mode = \"strict\"") && err.contains("COMPLIANCE"), "{err}");
    }

    #[test]
    fn values_the_client_cannot_use_are_named() {
        let s3 = Some("s3://b/p");
        let cases: [(CloudSettings, &str); 8] = [
            (CloudSettings { storage_account: Some("acct".into()), ..Default::default() }, "az://"),
            (CloudSettings { service_account_key: Some("/k.json".into()), ..Default::default() }, "gs://"),
            (CloudSettings { max_concurrency: Some(0), ..Default::default() }, "max_concurrency"),
            (CloudSettings { multipart_part_size: Some(1 << 20), ..Default::default() }, "5 MiB"),
            (
                CloudSettings {
                    multipart_threshold: Some(6 << 20),
                    multipart_part_size: Some(8 << 20),
                    ..Default::default()
                },
                "multipart_threshold",
            ),
            (CloudSettings { request_timeout: Some(Duration::ZERO), ..Default::default() }, "request_timeout"),
            (
                CloudSettings { retry_initial_backoff: Some(Duration::ZERO), ..Default::default() },
                "retry_initial_backoff",
            ),
            (
                CloudSettings {
                    retry_initial_backoff: Some(Duration::from_secs(2)),
                    retry_max_backoff: Some(Duration::from_secs(1)),
                    ..Default::default()
                },
                "at most retry_max_backoff",
            ),
        ];
        for (settings, needle) in cases {
            let err = settings.options(s3).unwrap_err().to_string();
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
    }

    #[test]
    fn s3_settings_and_bad_account_names_are_refused_with_azure() {
        let az = Some("az://container/p");
        let cases = [
            (CloudSettings { region: Some("eu-west-1".into()), ..Default::default() }, "region applies to an s3://"),
            (CloudSettings { force_path_style: true, ..Default::default() }, "force_path_style applies to an s3://"),
            (CloudSettings { storage_account: Some("My-Account".into()), ..Default::default() }, "\"My-Account\""),
            (CloudSettings { storage_account: Some("ab".into()), ..Default::default() }, "3 to 24"),
        ];
        for (settings, needle) in cases {
            let err = settings.options(az).unwrap_err().to_string();
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
        // The same region is fine on S3.
        assert!(CloudSettings { region: Some("eu-west-1".into()), ..Default::default() }
            .options(Some("s3://b"))
            .is_ok());
    }
}
