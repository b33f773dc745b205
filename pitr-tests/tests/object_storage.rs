//! The object-storage backends against real servers on loopback: multipart put-if-absent on moto
//! and s3s-fs, S3 Object Lock on moto, and the process-wide bound on
//! concurrent requests (seen by a TCP proxy in front of the server).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use pitr_archive::cloud::{CloudOptions, CloudStore, LockMode, ObjectLock};
use pitr_archive::{PutOutcome, Store};
use pitr_tests::proxy::FaultyProxy;
use pitr_tests::{http_request, S3Server, S3sFs};

fn aws_test_credentials() {
    // moto accepts any key; s3s-fs is started with test/test.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
}

/// Small parts so a 13 MiB object takes three.
fn s3_options(endpoint: String) -> CloudOptions {
    CloudOptions {
        endpoint: Some(endpoint),
        region: Some("us-east-1".into()),
        allow_http: true,
        force_path_style: true,
        multipart_threshold: 6 << 20,
        multipart_part_size: 5 << 20,
        ..CloudOptions::default()
    }
}

fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

async fn put_if_absent_contract(store: &CloudStore, big: usize) -> Result<()> {
    let a = pseudo_random(big, 1);
    let b = pseudo_random(big, 2);
    assert_eq!(store.put_if_absent("wal/big", a.clone()).await?, PutOutcome::Created);
    assert_eq!(store.get("wal/big").await?, a);
    assert_eq!(store.head("wal/big").await?.context("head")?.size, big as u64);
    // Someone else's bytes under a taken name: refused (for a multipart upload, by its
    // conditional completion), the object unchanged.
    assert_eq!(store.put_if_absent("wal/big", b.clone()).await?, PutOutcome::AlreadyExists);
    assert_eq!(store.get("wal/big").await?, a);
    // Our own bytes again (a retry whose first reply was lost): it is there, so Created.
    assert_eq!(store.put_if_absent("wal/big", a.clone()).await?, PutOutcome::Created);
    assert_eq!(store.put_if_absent("wal/small", Bytes::from_static(b"small")).await?, PutOutcome::Created);
    assert_eq!(store.put_if_absent("wal/small", Bytes::from_static(b"other")).await?, PutOutcome::AlreadyExists);
    assert_eq!(&store.get_range("wal/big", 10..20).await?[..], &a[10..20]);
    assert_eq!(&store.get_range("wal/small", 3..100).await?[..], b"ll");
    let names: Vec<String> = store.list("wal/").await?.into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["wal/big", "wal/small"]);
    store.delete_many(&["wal/small".to_string(), "wal/missing".to_string()]).await?;
    assert!(store.head("wal/small").await?.is_none());
    assert!(store.get("wal/small").await.unwrap_err().is_not_found());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_put_if_absent_on_moto_and_s3s_fs() -> Result<()> {
    aws_test_credentials();
    let moto = S3Server::start()?;
    moto.create_bucket("pitr")?;
    let store = CloudStore::open("s3://pitr/m", &s3_options(moto.endpoint()))?;
    put_if_absent_contract(&store, 13 << 20).await?;
    // Nothing left half-uploaded: no multipart upload in progress.
    let uploads = http_request(moto.port, "GET", "/pitr?uploads", &[], b"")?;
    ensure!(uploads.status == 200 && !uploads.text().contains("<Upload>"), "{}", uploads.text());

    let fs = S3sFs::start(&["pitr"])?;
    let store = CloudStore::open("s3://pitr/f", &s3_options(fs.endpoint()))?;
    put_if_absent_contract(&store, 13 << 20).await?;
    Ok(())
}

/// Every object is written with a retention date; an object version cannot be deleted before
/// it, while pitr's own delete only adds a delete marker (the bytes stay, restorable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_object_lock_on_moto() -> Result<()> {
    aws_test_credentials();
    let moto = S3Server::start()?;
    let created = http_request(moto.port, "PUT", "/locked", &[("x-amz-bucket-object-lock-enabled", "true")], b"")?;
    ensure!(created.status == 200, "create bucket with object lock: {} {}", created.status, created.text());
    let opts = CloudOptions {
        object_lock: Some(ObjectLock { mode: LockMode::Compliance, days: 3 }),
        ..s3_options(moto.endpoint())
    };
    let store = CloudStore::open("s3://locked/repo", &opts)?;
    let small = Bytes::from_static(b"a sealed WAL chunk");
    let big = pseudo_random(11 << 20, 3);
    assert_eq!(store.put_if_absent("wal/chunk", small.clone()).await?, PutOutcome::Created);
    assert_eq!(store.put_if_absent("wal/segment", big.clone()).await?, PutOutcome::Created);
    assert_eq!(store.put_if_absent("wal/chunk", Bytes::from_static(b"overwrite")).await?, PutOutcome::AlreadyExists);
    assert_eq!(store.get("wal/chunk").await?, small);
    assert_eq!(store.get("wal/segment").await?, big);

    let today = chrono_like_today();
    // moto checks no signatures, but treats a request without Authorization as anonymous.
    let auth = [("Authorization", "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request")];
    for key in ["wal/chunk", "wal/segment"] {
        let head = http_request(moto.port, "HEAD", &format!("/locked/repo/{key}"), &auth, b"")?;
        ensure!(head.status == 200, "HEAD {key}: {}", head.status);
        assert_eq!(head.header("x-amz-object-lock-mode"), Some("COMPLIANCE"), "{key}: {:?}", head.headers);
        let until = head.header("x-amz-object-lock-retain-until-date").context("no retain-until date")?;
        // Three days from the write: not today, and after today.
        ensure!(&until[..10] > today.as_str(), "{key}: retained until {until}, today is {today}");
    }

    // pitr's delete succeeds but only hides the object behind a delete marker.
    store.delete("wal/chunk").await?;
    assert!(store.head("wal/chunk").await?.is_none());
    let versions = http_request(moto.port, "GET", "/locked?versions&prefix=repo/wal/chunk", &auth, b"")?.text();
    let version_id = versions
        .split("<Version>")
        .nth(1)
        .and_then(|v| v.split("<VersionId>").nth(1))
        .and_then(|v| v.split("</VersionId>").next())
        .with_context(|| format!("no object version listed: {versions}"))?
        .to_string();
    // Deleting the version itself — what ransomware with the host's credentials would try — is refused.
    let path = format!("/locked/repo/wal/chunk?versionId={version_id}");
    let refused = http_request(moto.port, "DELETE", &path, &auth, b"")?;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(refused.text().contains("AccessDenied"), "{}", refused.text());
    let kept = http_request(moto.port, "GET", &path, &auth, b"")?;
    assert_eq!((kept.status, &kept.body[..]), (200, &small[..]));

    // A bucket policy that denies deletes (credentials that may write but not delete): pitr
    // reports a typed refusal, which `pitr expire` counts as retained, and the object stays.
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Principal":"*","Action":"s3:DeleteObject","Resource":"arn:aws:s3:::locked/*"}]}"#;
    let set = http_request(moto.port, "PUT", "/locked?policy", &auth, policy.as_bytes())?;
    ensure!(set.status / 100 == 2, "put bucket policy: {} {}", set.status, set.text());
    let err = store.delete("wal/segment").await.unwrap_err();
    assert!(err.is_denied(), "{err}");
    assert!(err.to_string().contains("wal/segment") && err.to_string().contains("refused"), "{err}");
    let err = store.delete_many(&["wal/segment".to_string()]).await.unwrap_err();
    assert!(err.is_denied(), "{err}");
    assert_eq!(store.get("wal/segment").await?, big);
    Ok(())
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
fn chrono_like_today() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%d"]).output().expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `max_concurrency` bounds the requests of every store on one repository in the process: of 24
/// puts started at once from two stores, the server never sees more than 2 in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_bounded() -> Result<()> {
    aws_test_credentials();
    let moto = S3Server::start()?;
    moto.create_bucket("pitr")?;
    let proxy = FaultyProxy::start(moto.port)?;
    let opts = CloudOptions { max_concurrency: 2, ..s3_options(proxy.endpoint()) };
    let stores = [
        Arc::new(CloudStore::open("s3://pitr/bounded", &opts)?),
        Arc::new(CloudStore::open("s3://pitr/bounded", &opts)?),
    ];
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..24 {
        let store = stores[i % 2].clone();
        puts.spawn(
            async move { store.put_if_absent(&format!("obj/{i:02}"), pseudo_random(256 << 10, i as u64)).await },
        );
    }
    while let Some(r) = puts.join_next().await {
        assert_eq!(r??, PutOutcome::Created);
    }
    assert_eq!(stores[0].list("obj/").await?.len(), 24);
    let max_in_flight = proxy.stats.max_in_flight.load(Ordering::SeqCst);
    assert!((1..=2).contains(&max_in_flight), "{max_in_flight} requests in flight with max_concurrency = 2");
    Ok(())
}
