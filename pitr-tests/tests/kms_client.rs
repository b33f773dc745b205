//! pitr's AWS KMS client (`pitr_archive::keys::kms`) against an emulator: moto's server mode on
//! loopback, which implements the KMS JSON API (not AWS itself). Requests are signed with
//! explicit test credentials (moto accepts any), passed to the client rather than set in the
//! environment, so that parallel tests see nothing of them.
//!
//! Proves: GenerateDataKey → Decrypt and Encrypt → Decrypt round trips; refusals are
//! [`KmsError::Refused`] with KMS's code and are not retried (wrong encryption context, a blob
//! made under another key while our key id is passed, an unknown key); a frozen server is
//! [`KmsError::Unreachable`] within the configured timeout, and an operation that started during
//! an outage shorter than its timeout succeeds through its retries; without explicit
//! credentials the client takes keys and region from the standard chain (here a profile of the
//! AWS shared files, in a child process with an environment of its own).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pitr_archive::keys::kms::{KmsClient, KmsError, KmsOptions, StaticCredentials};
use pitr_tests::{kms_create_key, kms_create_key_in, kms_request, scratch_dir, S3Server};

fn credentials() -> StaticCredentials {
    StaticCredentials { access_key_id: "testing".into(), secret_access_key: "testing".into(), session_token: None }
}

/// A client for `key_id` on the emulator (moto's keys from [`kms_create_key`] live in us-east-1).
fn client(moto: &S3Server, key_id: &str, timeout: Duration) -> Result<KmsClient> {
    let opts = KmsOptions {
        endpoint: Some(moto.endpoint()),
        region: Some("us-east-1".into()),
        timeout,
        ..KmsOptions::new(key_id)
    };
    Ok(KmsClient::with_static_credentials(&opts, credentials())?)
}

/// The code of a refusal; anything else fails the test.
fn refused_code(result: Result<impl std::fmt::Debug, KmsError>, what: &str) -> Result<String> {
    match result {
        Err(KmsError::Refused { code, message, key_id, operation }) => {
            eprintln!("{what}: refused {operation} with {key_id}: {code}: {message}");
            Ok(code)
        }
        other => anyhow::bail!("{what}: expected a refusal, got {other:?}"),
    }
}

const CONTEXT: [(&str, &str); 2] = [("pitr-repository-key", "r00c0ffee"), ("pitr-created-us", "1796544608000000")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_and_refusals() -> Result<()> {
    let moto = S3Server::start()?;
    let key = kms_create_key(&moto.endpoint())?;
    let other_key = kms_create_key(&moto.endpoint())?;
    let kms = client(&moto, &key, Duration::from_secs(10))?;
    assert_eq!(kms.key_id(), key);
    assert_eq!(kms.endpoint(), moto.endpoint());

    // GenerateDataKey: fresh bytes each time, and the blob opens to them.
    let (material, blob) = kms.generate_data_key(&CONTEXT).await?;
    let (second, _) = kms.generate_data_key(&CONTEXT).await?;
    ensure!(*material != *second && *material != [0u8; 32], "GenerateDataKey gave the same or no bytes");
    ensure!(blob.len() > 32, "a ciphertext blob of {} bytes", blob.len());
    let opened = kms.decrypt(&blob, &CONTEXT).await?;
    ensure!(*opened == *material, "Decrypt of a GenerateDataKey blob gave other bytes");

    // Encrypt an existing key (a rewrap), then Decrypt.
    let existing = [0xa5u8; 32];
    let wrapped = kms.encrypt(&existing, &CONTEXT).await?;
    ensure!(*kms.decrypt(&wrapped, &CONTEXT).await? == existing, "Encrypt → Decrypt changed the key");
    // The context binds the blob: the context of another repository key does not open it.
    let wrong_context = [("pitr-repository-key", "r0badbad0"), CONTEXT[1]];
    let code = refused_code(kms.decrypt(&wrapped, &wrong_context).await, "decrypt with another context")?;
    assert_eq!(code, "InvalidCiphertextException");
    let code = refused_code(kms.decrypt(&wrapped, &[]).await, "decrypt without a context")?;
    assert_eq!(code, "InvalidCiphertextException");

    // A blob made under another key: KMS would open it (the blob names its key), but we pass our
    // key id, so it is refused (AWS says IncorrectKeyException, moto AccessDeniedException).
    let foreign = client(&moto, &other_key, Duration::from_secs(10))?;
    let foreign_blob = foreign.encrypt(&existing, &CONTEXT).await?;
    ensure!(*foreign.decrypt(&foreign_blob, &CONTEXT).await? == existing, "the other key's own round trip");
    let code = refused_code(kms.decrypt(&foreign_blob, &CONTEXT).await, "decrypt of another key's blob")?;
    ensure!(["AccessDeniedException", "IncorrectKeyException"].contains(&code.as_str()), "code {code}");

    // A key KMS does not know: refused at once (no retries), naming the key and the operation.
    let missing = client(&moto, "alias/pitr-no-such-key", Duration::from_secs(10))?;
    let started = Instant::now();
    let result = missing.generate_data_key(&CONTEXT).await;
    let elapsed = started.elapsed();
    let err = result.as_ref().map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("alias/pitr-no-such-key") && err.contains("GenerateDataKey"), "{err}");
    let code = refused_code(result, "generate under an unknown alias")?;
    assert_eq!(code, "NotFoundException");
    ensure!(elapsed < Duration::from_secs(2), "a refusal took {elapsed:?} (retried?)");
    let err = missing.encrypt(&existing, &CONTEXT).await.unwrap_err();
    ensure!(!err.is_transient(), "a refusal is transient: {err}");

    // Garbage where a blob should be: refused by KMS, not taken for an outage.
    let code = refused_code(kms.decrypt(b"not a kms blob", &CONTEXT).await, "decrypt of garbage")?;
    assert_eq!(code, "InvalidCiphertextException");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_kms_is_unreachable_within_the_timeout_and_usable_again() -> Result<()> {
    let mut moto = S3Server::start()?;
    let key = kms_create_key(&moto.endpoint())?;
    let timeout = Duration::from_secs(3);
    let kms = client(&moto, &key, timeout)?;
    let (material, blob) = kms.generate_data_key(&CONTEXT).await?;

    // Requests hang: every attempt times out, and the operation ends within its budget.
    moto.freeze(true)?;
    let started = Instant::now();
    let result = kms.decrypt(&blob, &CONTEXT).await;
    let elapsed = started.elapsed();
    let err = match result {
        Err(e) => e,
        Ok(_) => {
            moto.freeze(false)?;
            anyhow::bail!("Decrypt succeeded against a frozen server");
        }
    };
    eprintln!("frozen: {err} (after {elapsed:?})");
    ensure!(matches!(err, KmsError::Unreachable { .. }) && err.is_transient(), "{err:?}");
    let text = err.to_string();
    ensure!(
        text.contains(&key) && text.contains("Decrypt") && text.contains(&moto.endpoint()),
        "the error does not name key, operation and endpoint: {text}"
    );
    ensure!(text.contains("attempts"), "no retries: {text}");
    ensure!(elapsed >= timeout - Duration::from_millis(500), "gave up after {elapsed:?}, budget {timeout:?}");
    ensure!(elapsed <= timeout + Duration::from_millis(500), "took {elapsed:?}, budget {timeout:?}");
    let generate = kms.generate_data_key(&CONTEXT).await;
    ensure!(matches!(generate, Err(KmsError::Unreachable { operation: "GenerateDataKey", .. })), "{generate:?}");

    // Thawed: the same client works again.
    moto.freeze(false)?;
    let opened = kms.decrypt(&blob, &CONTEXT).await.context("Decrypt after the outage")?;
    ensure!(*opened == *material, "Decrypt after the outage gave other bytes");

    // An outage shorter than the budget is bridged by the retries.
    let patient = client(&moto, &key, Duration::from_secs(10))?;
    moto.freeze(true)?;
    let started = Instant::now();
    let (result, thawed) = tokio::join!(patient.decrypt(&blob, &CONTEXT), async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        moto.freeze(false)
    });
    thawed?;
    let opened = result.context("Decrypt across a 2 s outage with a 10 s budget")?;
    ensure!(*opened == *material, "Decrypt across the outage gave other bytes");
    ensure!(started.elapsed() >= Duration::from_secs(2), "answered during the outage?");
    Ok(())
}

/// A key named by its ARN is the same key as by its id (moto's own DescribeKey gives the ARN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_by_arn_is_the_key_by_id() -> Result<()> {
    let moto = S3Server::start()?;
    let key = kms_create_key(&moto.endpoint())?;
    let described = kms_request(&moto.endpoint(), "us-east-1", "DescribeKey", &serde_json::json!({"KeyId": key}))?;
    assert_eq!(described["KeyMetadata"]["KeyState"], "Enabled", "{described}");
    let arn = described["KeyMetadata"]["Arn"].as_str().context("key ARN")?.to_string();
    // The same key by ARN: its blobs open under either name.
    let by_arn = client(&moto, &arn, Duration::from_secs(10))?;
    let by_id = client(&moto, &key, Duration::from_secs(10))?;
    let blob = by_arn.encrypt(&[7u8; 32], &CONTEXT).await?;
    assert_eq!(*by_id.decrypt(&blob, &CONTEXT).await?, [7u8; 32]);
    Ok(())
}

/// The standard credential chain, as the S3 backend reads it: keys and region from the profile
/// `AWS_PROFILE` names in the AWS shared files. Environment variables are process-wide, so the
/// client runs in a child process (this test binary running only [`chain_child`]) with an
/// environment of its own, and the key lives in eu-west-1, so that a client that missed the
/// profile's region (and looked in us-east-1) would not find it.
#[test]
fn the_standard_chain_reads_keys_and_region_from_a_profile() -> Result<()> {
    let moto = S3Server::start()?;
    let key = kms_create_key_in(&moto.endpoint(), "eu-west-1")?;
    let dir = scratch_dir("kms-profile");
    let credentials = dir.path().join("credentials");
    let config = dir.path().join("config");
    std::fs::write(&credentials, "[pitr-kms]\naws_access_key_id = AKIAPITRPROFILE\naws_secret_access_key = testing\n")?;
    std::fs::write(&config, "[profile pitr-kms]\nregion = eu-west-1\n")?;
    let mut child = Command::new(std::env::current_exe()?);
    child.args(["chain_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"]);
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"] {
        child.env_remove(var);
    }
    let out = child
        .env("AWS_PROFILE", "pitr-kms")
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
        .env("AWS_CONFIG_FILE", &config)
        .env("PITR_TEST_KMS_ENDPOINT", moto.endpoint())
        .env("PITR_TEST_KMS_KEY", &key)
        .output()?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "the child ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    Ok(())
}

/// The client side of [`the_standard_chain_reads_keys_and_region_from_a_profile`], which sets its
/// environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the_standard_chain_reads_keys_and_region_from_a_profile in a child process"]
async fn chain_child() -> Result<()> {
    let endpoint =
        std::env::var("PITR_TEST_KMS_ENDPOINT").context("PITR_TEST_KMS_ENDPOINT (set by the parent test)")?;
    let key = std::env::var("PITR_TEST_KMS_KEY").context("PITR_TEST_KMS_KEY")?;
    let kms = KmsClient::new(&KmsOptions { endpoint: Some(endpoint), ..KmsOptions::new(key) })?;
    assert_eq!(kms.region(), "eu-west-1", "{kms:?}");
    let (material, blob) = kms.generate_data_key(&CONTEXT).await?;
    assert_eq!(*kms.decrypt(&blob, &CONTEXT).await?, *material);
    Ok(())
}
