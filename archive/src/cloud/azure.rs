//! The Azure Blob Storage client for [`crate::cloud::CloudStore`] (`az://container/prefix`):
//! `object_store`'s Azure builder, block blobs. Conditional create is `If-None-Match: *` on Put
//! Blob; a large object goes up as blocks (Put Block) and is committed by Put Block List, which
//! object_store 0.12 sends unconditionally, so an HTTP layer under it adds `If-None-Match: *` to
//! the commit and, with a shared key, signs the request again (Shared Key signs that header).
//!
//! Settings: `[repository] storage_account` (else `AZURE_STORAGE_ACCOUNT_NAME`) and `endpoint`
//! (else `AZURE_STORAGE_ENDPOINT`, else `https://<account>.blob.core.windows.net`). Credentials
//! come only from the environment, as object_store reads it: `AZURE_STORAGE_ACCOUNT_KEY` (or
//! `AZURE_STORAGE_ACCESS_KEY`), `AZURE_STORAGE_SAS_TOKEN`, `AZURE_STORAGE_TOKEN`, a service
//! principal (`AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`, `AZURE_TENANT_ID`), workload identity
//! (`AZURE_FEDERATED_TOKEN_FILE`), else the instance's managed identity. None of them passes
//! through pitr's own types, so none can reach a `{:?}` or an error text; object_store leaves
//! request URLs out of its errors when they carry a SAS token.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use http::header::{HeaderValue, AUTHORIZATION, IF_NONE_MATCH};
use http::Method;
use object_store::azure::{AzureAuthorizer, AzureConfigKey, AzureCredential, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::ClientOptions;

use crate::cloud::{client_options, retry_config, CloudOptions};

/// Azure's rule for container names: 3 to 63 lowercase letters, digits and single hyphens, a
/// letter or digit first and last. Checked here, so that a typo fails at start-up and not as a
/// 400 on the first put.
pub(crate) fn check_container_name(name: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "container name {name:?}: Azure wants 3 to 63 lowercase letters, digits and single hyphens, \
             starting and ending with a letter or digit"
        ))
    }
}

/// Azure's rule for storage account names: 3 to 24 lowercase letters and digits.
pub fn check_account_name(name: &str) -> Result<(), String> {
    if (3..=24).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(format!("storage account name {name:?}: Azure wants 3 to 24 lowercase letters and digits"))
    }
}

/// A boolean setting as object_store reads it (its `Parse for bool`): `1`, `true`, `on`, `yes`,
/// `y`, any case.
fn truthy(value: &str) -> bool {
    matches!(value.to_ascii_lowercase().as_str(), "1" | "true" | "on" | "yes" | "y")
}

pub(crate) fn build(container: &str, opts: &CloudOptions) -> Result<MicrosoftAzure, String> {
    let builder = configure(MicrosoftAzureBuilder::from_env(), container, opts)?;
    let credentials = Arc::new(OnceLock::new());
    let azure = builder
        .with_client_options(client_options(opts))
        .with_retry(retry_config(opts))
        .with_http_connector(CommitConnector { credentials: credentials.clone() })
        .build()
        .map_err(|e| e.to_string())?;
    let _ = credentials.set(azure.credentials().clone());
    Ok(azure)
}

/// `builder` (the environment's settings) with the container and pitr's settings, checked.
fn configure(
    builder: MicrosoftAzureBuilder,
    container: &str,
    opts: &CloudOptions,
) -> Result<MicrosoftAzureBuilder, String> {
    check_container_name(container)?;
    let mut builder = builder.with_container_name(container);
    if let Some(account) = &opts.storage_account {
        builder = builder.with_account(account);
    }
    let emulator = builder.get_config_value(&AzureConfigKey::UseEmulator).is_some_and(|v| truthy(&v));
    if let Some(e) = &opts.endpoint {
        // In emulator mode object_store takes the address from AZURITE_BLOB_STORAGE_URL and
        // would drop this one without a word.
        if emulator {
            return Err(format!(
                "endpoint = {e:?} cannot be used with AZURE_STORAGE_USE_EMULATOR (the emulator's address then comes \
                 from AZURITE_BLOB_STORAGE_URL): unset one of them"
            ));
        }
        // A trailing `/` would double the one object_store puts before the container.
        builder = builder.with_endpoint(e.trim_end_matches('/').to_string());
    }
    match builder.get_config_value(&AzureConfigKey::AccountName) {
        Some(account) => check_account_name(&account)?,
        None if emulator => {}
        None => {
            return Err("no storage account: set [repository] storage_account or AZURE_STORAGE_ACCOUNT_NAME".to_string())
        }
    }
    Ok(builder)
}

#[derive(Debug)]
struct CommitConnector {
    credentials: Arc<OnceLock<object_store::azure::AzureCredentialProvider>>,
}

impl HttpConnector for CommitConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(CommitHttp { inner, credentials: self.credentials.clone() }))
    }
}

#[derive(Debug)]
struct CommitHttp {
    inner: HttpClient,
    credentials: Arc<OnceLock<object_store::azure::AzureCredentialProvider>>,
}

/// Put Block List: `PUT …?comp=blocklist`.
fn is_block_list_commit(req: &HttpRequest) -> bool {
    req.method() == Method::PUT && req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "comp=blocklist"))
}

fn layer_error(message: String) -> HttpError {
    HttpError::new(HttpErrorKind::Unknown, std::io::Error::other(message))
}

#[async_trait]
impl HttpService for CommitHttp {
    async fn call(&self, mut req: HttpRequest) -> Result<HttpResponse, HttpError> {
        // pitr only ever creates: every commit is conditional, like every Put Blob.
        if is_block_list_commit(&req) {
            req.headers_mut().insert(IF_NONE_MATCH, HeaderValue::from_static("*"));
            let shared_key = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
                let (account, _) = v.strip_prefix("SharedKey ")?.split_once(':')?;
                Some(account.to_string())
            });
            // A bearer token or a SAS token does not cover the header; a shared-key signature does.
            if let Some(account) = shared_key {
                let provider = self
                    .credentials
                    .get()
                    .ok_or_else(|| layer_error("Azure client used before it was set up".into()))?;
                let credential =
                    provider.get_credential().await.map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))?;
                if let AzureCredential::AccessKey(_) = credential.as_ref() {
                    req.headers_mut().remove(AUTHORIZATION);
                    AzureAuthorizer::new(&credential, &account).authorize(&mut req);
                }
            }
        }
        self.inner.execute(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_block_list_commit_is_made_conditional() {
        let request = |method: Method, uri: &str| {
            http::Request::builder()
                .method(method)
                .uri(uri)
                .body(object_store::client::HttpRequestBody::from(bytes::Bytes::new()))
                .unwrap()
        };
        let base = "http://127.0.0.1:10000/devstoreaccount1/pitr/wal/x";
        assert!(is_block_list_commit(&request(Method::PUT, &format!("{base}?comp=blocklist"))));
        assert!(is_block_list_commit(&request(Method::PUT, &format!("{base}?sv=1&comp=blocklist&sig=s"))));
        for (method, query) in [
            (Method::PUT, "?comp=block&blockid=MDA%3D"),
            (Method::PUT, ""),
            (Method::GET, "?comp=blocklist"),
            (Method::PUT, "?comp=blocklistx"),
        ] {
            assert!(!is_block_list_commit(&request(method.clone(), &format!("{base}{query}"))), "{method} {query}");
        }
    }

    #[test]
    fn account_names_and_emulator_switches_are_read_as_azure_and_object_store_do() {
        for good in ["abc", "devstoreaccount1", &"a1".repeat(12)] {
            assert!(check_account_name(good).is_ok(), "{good}");
        }
        for bad in ["ab", "Acct", "my-acct", "my_acct", &"a".repeat(25), ""] {
            let err = check_account_name(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")) && err.contains("3 to 24"), "{bad}: {err}");
        }
        for on in ["1", "true", "TRUE", "on", "Yes", "y"] {
            assert!(truthy(on), "{on}");
        }
        for off in ["0", "false", "off", "no", "n", ""] {
            assert!(!truthy(off), "{off}");
        }
    }

    #[test]
    fn endpoints_accounts_and_emulator_mode_are_checked() {
        let opts = |endpoint: Option<&str>, account: Option<&str>| CloudOptions {
            endpoint: endpoint.map(str::to_string),
            storage_account: account.map(str::to_string),
            ..Default::default()
        };
        let endpoint = |b: &MicrosoftAzureBuilder| b.get_config_value(&AzureConfigKey::Endpoint);
        // A trailing `/` is dropped.
        let b = configure(MicrosoftAzureBuilder::new(), "pitr", &opts(Some("http://h:1/acct/"), Some("acct"))).unwrap();
        assert_eq!(endpoint(&b).as_deref(), Some("http://h:1/acct"));
        // The account from the environment is checked as the configured one.
        let env = MicrosoftAzureBuilder::new().with_config(AzureConfigKey::AccountName, "My_Account");
        let err = configure(env, "pitr", &opts(None, None)).unwrap_err();
        assert!(err.contains("\"My_Account\"") && err.contains("3 to 24"), "{err}");
        let err = configure(MicrosoftAzureBuilder::new(), "pitr", &opts(None, None)).unwrap_err();
        assert!(err.contains("storage_account") && err.contains("AZURE_STORAGE_ACCOUNT_NAME"), "{err}");
        // Emulator mode, spelt as object_store accepts it: no account needed, an endpoint refused
        // (object_store would ignore it).
        for on in ["1", "yes", "TRUE"] {
            let env = || MicrosoftAzureBuilder::new().with_config(AzureConfigKey::UseEmulator, on);
            assert!(configure(env(), "pitr", &opts(None, None)).is_ok(), "{on}");
            let err = configure(env(), "pitr", &opts(Some("http://h:1/acct"), None)).unwrap_err();
            assert!(err.contains("AZURE_STORAGE_USE_EMULATOR") && err.contains("http://h:1/acct"), "{on}: {err}");
        }
        let off = MicrosoftAzureBuilder::new().with_config(AzureConfigKey::UseEmulator, "no");
        assert!(configure(off, "pitr", &opts(None, None)).is_err());
    }

    #[test]
    fn container_names_follow_azures_rules() {
        for good in ["pitr", "abc", "a-1-b", &"x".repeat(63)] {
            assert!(check_container_name(good).is_ok(), "{good}");
        }
        for bad in ["ab", "Pitr", "a_b", "-ab", "ab-", "a--b", &"x".repeat(64), "a.b"] {
            let err = check_container_name(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")) && err.contains("lowercase"), "{bad}: {err}");
        }
    }
}
