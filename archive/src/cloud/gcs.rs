//! The Google Cloud Storage client for [`crate::cloud::CloudStore`]: `object_store`'s GCS builder
//! (XML API for objects, JSON API for listing). Conditional create is
//! `x-goog-if-generation-match: 0`. Credentials: `[repository] service_account_key` (a
//! service-account JSON file), else the standard environment (`GOOGLE_APPLICATION_CREDENTIALS`,
//! `GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_SERVICE_ACCOUNT_KEY`, gcloud's application-default
//! credentials), else the instance metadata server (GKE workload identity, GCE).

use object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder};

use crate::cloud::{client_options, retry_config, CloudOptions};

pub(crate) fn build(bucket: &str, opts: &CloudOptions) -> Result<GoogleCloudStorage, String> {
    let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
    if let Some(key) = &opts.service_account_key {
        if !key.is_file() {
            return Err(format!("service_account_key {}: no such file", key.display()));
        }
        builder = builder.with_service_account_path(key.display().to_string());
    }
    builder.with_client_options(client_options(opts)).with_retry(retry_config(opts)).build().map_err(|e| e.to_string())
}
