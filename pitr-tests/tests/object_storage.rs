//! The object-storage backends against real servers on loopback: multipart put-if-absent on moto
//! and s3s-fs, S3 Object Lock on moto (retention at write, extending it, and `expire` extending
//! it for backups kept longer than the window), and the process-wide bound on
//! concurrent requests (seen by a TCP proxy in front of the server).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use pitr_archive::backup::BackupManifest;
use pitr_archive::cloud::{CloudOptions, CloudStore, LockMode, ObjectLock};
use pitr_archive::expire::{expire, ExpireOptions};
use pitr_archive::names::pg;
use pitr_archive::retention::Policy;
use pitr_archive::{ClusterInfo, KeyRing, PutOutcome, Repository, Store, WalLayout, WalObject};
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
    pitr_tests::pseudo_random(len, seed).into()
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

/// The reply to a multipart completion is lost after the server completed it: the client sends
/// the completion again and hears that the name is taken (moto: the completion is conditional)
/// or that the upload is gone (MinIO's 404 NoSuchUpload, given here by the proxy in the server's
/// place). Either way the object under the name is ours: the put succeeded, and a 404 there is
/// not taken for a missing bucket.
async fn lost_completion_reply(port: u16, bucket_url: &str) -> Result<()> {
    const NO_SUCH_UPLOAD: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchUpload</Code>\
         <Message>The specified multipart upload does not exist.</Message></Error>";
    let completion = ["POST ", "uploadId="];
    for (i, resend) in ["taken", "gone"].into_iter().enumerate() {
        let proxy = FaultyProxy::start(port)?;
        let store = CloudStore::open(bucket_url, &s3_options(proxy.endpoint()))?;
        let name = format!("wal/lost-reply-{resend}");
        let data = pseudo_random(13 << 20, 3 + i as u64);
        proxy.swallow_reply_of_next(&completion);
        if resend == "gone" {
            proxy.answer_next(&completion, "404 Not Found", NO_SUCH_UPLOAD);
        }
        assert_eq!(store.put_if_absent(&name, data.clone()).await?, PutOutcome::Created, "{resend}");
        ensure!(proxy.stats.swallowed_replies.load(Ordering::SeqCst) == 1, "{resend}: no completion reply was lost");
        let answered = proxy.stats.answered.load(Ordering::SeqCst);
        ensure!(answered == u64::from(resend == "gone"), "{resend}: {answered} requests answered by the proxy");
        assert_eq!(store.get(&name).await?, data, "{resend}");
    }
    Ok(())
}

/// What is under a name is looked at after a refused create, and only a definite answer is a
/// verdict: a refusal (412) for a name that holds nothing is put again, not taken for someone
/// else's object; a read that fails is an error, not "already exists". The proxy gives those
/// answers in the server's place, once each.
async fn refused_creates_are_looked_into(port: u16, bucket_url: &str) -> Result<()> {
    let proxy = FaultyProxy::start(port)?;
    let store = CloudStore::open(bucket_url, &s3_options(proxy.endpoint()))?;
    let refused = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>PreconditionFailed</Code></Error>";
    proxy.answer_next(&["PUT ", "/wal/refused-empty "], "412 Precondition Failed", refused);
    let data = Bytes::from_static(b"refused, and nothing there");
    assert_eq!(store.put_if_absent("wal/refused-empty", data.clone()).await?, PutOutcome::Created);
    ensure!(proxy.stats.answered.load(Ordering::SeqCst) == 1, "the refusal was not given");
    assert_eq!(store.get("wal/refused-empty").await?, data);

    // Taken, and the read of what is there is refused: an error naming the object.
    let denied = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code></Error>";
    proxy.answer_next(&["GET ", "/wal/refused-empty "], "403 Forbidden", denied);
    let err = store.put_if_absent("wal/refused-empty", data.clone()).await.unwrap_err().to_string();
    ensure!(proxy.stats.answered.load(Ordering::SeqCst) == 2, "the read was not refused");
    assert!(err.contains("wal/refused-empty") && err.contains("reading what is under the name"), "{err}");
    // Answered by the server itself, the same bytes are our own earlier write.
    assert_eq!(store.put_if_absent("wal/refused-empty", data).await?, PutOutcome::Created);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_put_if_absent_on_moto_and_s3s_fs() -> Result<()> {
    aws_test_credentials();
    let moto = S3Server::start()?;
    moto.create_bucket("pitr")?;
    let store = CloudStore::open("s3://pitr/m", &s3_options(moto.endpoint()))?;
    put_if_absent_contract(&store, 13 << 20).await?;
    lost_completion_reply(moto.port, "s3://pitr/m").await?;
    refused_creates_are_looked_into(moto.port, "s3://pitr/m").await?;
    // Nothing left half-uploaded: no multipart upload in progress.
    let uploads = http_request(moto.port, "GET", "/pitr?uploads", &[], b"")?;
    ensure!(uploads.status == 200 && !uploads.text().contains("<Upload>"), "{}", uploads.text());

    let fs = S3sFs::start(&["pitr"])?;
    let store = CloudStore::open("s3://pitr/f", &s3_options(fs.endpoint()))?;
    put_if_absent_contract(&store, 13 << 20).await?;
    // Not the lost completion reply: s3s-fs answers a completion resent for an upload it has
    // completed with 403 AccessDenied, which is a refusal and not a verdict on the upload.
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

/// moto checks no signatures, but treats a request without Authorization as anonymous.
const MOTO_AUTH: [(&str, &str); 1] =
    [("Authorization", "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request")];

fn create_locked_bucket(moto: &S3Server, bucket: &str) -> Result<()> {
    let created =
        http_request(moto.port, "PUT", &format!("/{bucket}"), &[("x-amz-bucket-object-lock-enabled", "true")], b"")?;
    ensure!(created.status == 200, "create bucket with object lock: {} {}", created.status, created.text());
    Ok(())
}

/// An object's (mode, retain-until date, version id) as the server's HEAD reports them.
fn lock_of(moto: &S3Server, path: &str) -> Result<(String, String, String)> {
    let head = http_request(moto.port, "HEAD", path, &MOTO_AUTH, b"")?;
    ensure!(head.status == 200, "HEAD {path}: {}", head.status);
    let get = |h: &str| head.header(h).map(str::to_string).with_context(|| format!("HEAD {path}: no {h}"));
    Ok((get("x-amz-object-lock-mode")?, get("x-amz-object-lock-retain-until-date")?, get("x-amz-version-id")?))
}

/// Sets a retention directly (moto, unlike S3, lets it be shortened): a lock that has passed.
fn set_retention_raw(moto: &S3Server, path: &str, mode: &str, until: &str) -> Result<()> {
    let body = format!("<Retention><Mode>{mode}</Mode><RetainUntilDate>{until}</RetainUntilDate></Retention>");
    let set = http_request(moto.port, "PUT", &format!("{path}?retention"), &MOTO_AUTH, body.as_bytes())?;
    ensure!(set.status == 200, "PUT {path}?retention: {} {}", set.status, set.text());
    Ok(())
}

/// Deletes the object's current version itself (not a delete marker): what ransomware holding
/// the host's credentials would try. The HTTP status.
fn delete_version(moto: &S3Server, path: &str) -> Result<u16> {
    let (_, _, version) = lock_of(moto, path)?;
    Ok(http_request(moto.port, "DELETE", &format!("{path}?versionId={version}"), &MOTO_AUTH, b"")?.status)
}

/// S3's date form of a time (whole seconds, rounded up as `extend_retention` does).
fn s3_date(us: i64) -> String {
    let secs = (us + 999_999).div_euclid(1_000_000);
    chrono::DateTime::from_timestamp(secs, 0).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Written with a one-day lock, an object's retention is moved to seven years, read back
/// through the server, never moved earlier, never weakened from COMPLIANCE; and it is what stops
/// the object's version from being deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_object_lock_retention_is_extended_and_never_shortened() -> Result<()> {
    aws_test_credentials();
    let moto = S3Server::start()?;
    create_locked_bucket(&moto, "locked")?;
    let lock = |mode| CloudOptions { object_lock: Some(ObjectLock { mode, days: 1 }), ..s3_options(moto.endpoint()) };
    let store = CloudStore::open("s3://locked/repo", &lock(LockMode::Governance))?;
    assert!(store.has_retention());
    for name in ["blocks/a", "blocks/b", "blocks/c"] {
        assert_eq!(store.put_if_absent(name, Bytes::from_static(b"a block")).await?, PutOutcome::Created);
    }
    let (mode, written_until, _) = lock_of(&moto, "/locked/repo/blocks/a")?;
    assert_eq!(mode, "GOVERNANCE");
    let today = chrono_like_today();
    ensure!(written_until[..10] > *today, "written with a one-day lock, yet retained until {written_until}");

    let now = pitr_archive::now_us();
    let seven_years = now + 7 * 366 * 86_400_000_000;
    assert!(store.extend_retention("blocks/a", seven_years).await?);
    assert_eq!(lock_of(&moto, "/locked/repo/blocks/a")?.0, "GOVERNANCE");
    assert_eq!(lock_of(&moto, "/locked/repo/blocks/a")?.1, s3_date(seven_years));
    // An earlier date, or the same one again: nothing sent, nothing changed (moto would accept
    // a shorter date, so the date read back shows that none was sent).
    assert!(!store.extend_retention("blocks/a", now + 365 * 86_400_000_000).await?);
    assert!(!store.extend_retention("blocks/a", seven_years).await?);
    assert_eq!(lock_of(&moto, "/locked/repo/blocks/a")?.1, s3_date(seven_years));
    assert_eq!(delete_version(&moto, "/locked/repo/blocks/a")?, 403);

    // b's and c's locks have passed. Deleting c's version now works: the server enforces the
    // date, so what protects b below is the extension.
    set_retention_raw(&moto, "/locked/repo/blocks/b", "GOVERNANCE", "2020-01-01T00:00:00Z")?;
    set_retention_raw(&moto, "/locked/repo/blocks/c", "GOVERNANCE", "2020-01-01T00:00:00Z")?;
    assert_eq!(delete_version(&moto, "/locked/repo/blocks/c")?, 204);
    assert!(store.extend_retention("blocks/b", now + 2 * 86_400_000_000).await?);
    assert_eq!(delete_version(&moto, "/locked/repo/blocks/b")?, 403);
    assert_eq!(&store.get("blocks/b").await?[..], b"a block");

    // A COMPLIANCE object stays COMPLIANCE when a GOVERNANCE store extends it; a GOVERNANCE one
    // is raised by a COMPLIANCE store.
    let compliance = CloudStore::open("s3://locked/repo", &lock(LockMode::Compliance))?;
    compliance.put_if_absent("blocks/d", Bytes::from_static(b"d")).await?;
    assert!(store.extend_retention("blocks/d", seven_years).await?);
    let (mode, until, _) = lock_of(&moto, "/locked/repo/blocks/d")?;
    assert_eq!((mode.as_str(), until), ("COMPLIANCE", s3_date(seven_years)));
    assert!(compliance.extend_retention("blocks/b", seven_years).await?);
    assert_eq!(lock_of(&moto, "/locked/repo/blocks/b")?.0, "COMPLIANCE");

    let err = store.extend_retention("blocks/missing", seven_years).await.unwrap_err();
    assert!(err.is_not_found() && err.to_string().contains("blocks/missing"), "{err}");
    // Without Object Lock there is nothing to extend, and nothing is sent.
    moto.create_bucket("plain")?;
    let plain = CloudStore::open("s3://plain/repo", &s3_options(moto.endpoint()))?;
    plain.put_if_absent("x", Bytes::from_static(b"x")).await?;
    assert!(!plain.has_retention());
    assert!(!plain.extend_retention("x", seven_years).await?);
    Ok(())
}

/// `expire` (not a dry run) on a repository with Object Lock: the objects a backup kept by a
/// GFS rule needs are retained until the date the policy may keep it to (an object several need:
/// the latest), what only the window keeps is left at its write-time lock, an object whose
/// retention cannot be handled is reported by name while the rest goes on, and a later run finds
/// everything retained already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_expire_extends_the_retention_of_backups_kept_longer_than_the_window() -> Result<()> {
    const SYS: u64 = 7;
    const SEG: u64 = 16 << 20;
    const DAY: i64 = 86_400_000_000;
    aws_test_credentials();
    let moto = S3Server::start()?;
    create_locked_bucket(&moto, "locked")?;
    let opts = CloudOptions {
        object_lock: Some(ObjectLock { mode: LockMode::Compliance, days: 1 }),
        ..s3_options(moto.endpoint())
    };
    let repo = Repository::new(Arc::new(CloudStore::open("s3://locked/repo", &opts)?), KeyRing::from_key("k", [3; 32]));
    repo.init().await?;
    let cluster =
        ClusterInfo { system_id: SYS, wal_segment_size: SEG, wal_page_size: 8192, server_version_num: 170000 };
    repo.put_cluster_info(&cluster).await?;
    let layout = WalLayout::new(&cluster);

    // The policy's clock: mid-June of next year, so that every date below is in the future of
    // the server's clock, whatever today is.
    use chrono::Datelike;
    let year = chrono::Utc::now().year() + 1;
    let june = |d: u32| chrono::NaiveDate::from_ymd_opt(year, 6, d).unwrap().and_hms_opt(12, 0, 0).unwrap().and_utc();
    let now = june(15).timestamp_micros();
    // a: two years back (kept as its year's newest); b: the window's base; c: an incremental on
    // b, the newest (kept as this year's newest). Block "shared" is in a and b.
    let backups = [
        ("a", None, now - 800 * DAY, 3, vec!["aa01", "5501"]),
        ("b", None, now - 3 * DAY, 10, vec!["5501", "bb01"]),
        ("c", Some("b"), now - DAY / 12, 12, vec!["cc01"]),
    ];
    for segno in [3, 5, 10, 11, 12] {
        let name = layout.object_name(&WalObject::Segment { timeline: 1, segno });
        repo.store().put_if_absent(&name, Bytes::from_static(b"wal")).await?;
    }
    let block = |id: &str| pg::block(SYS, &format!("{id}{}", "0".repeat(60)));
    for (id, parent, start_us, segno, blocks) in &backups {
        let blocks: Vec<String> = blocks.iter().map(|b| format!("{b}{}", "0".repeat(60))).collect();
        for b in &blocks {
            repo.store().put_if_absent(&pg::block(SYS, b), Bytes::from_static(b"block")).await?;
        }
        let manifest: BackupManifest = serde_json::from_value(serde_json::json!({
            "id": id, "kind": if parent.is_some() { "incremental" } else { "full" }, "parent": parent,
            "system_id": SYS, "server_version_num": 170000, "timeline": 1,
            "start_lsn": segno * SEG + 40, "stop_lsn": segno * SEG + 5000,
            "start_time_us": start_us, "stop_time_us": start_us + 60_000_000,
            "block_size": 1 << 20, "tablespaces": [], "entries": [],
            "files": [{ "path": "base/1/1", "size": 1, "mode": 384, "mtime": 0, "checksum": null, "blocks": blocks }],
            "server_manifest": "", "logical_bytes": 1, "stored_bytes": 1,
        }))?;
        assert_eq!(manifest.store(&repo).await?, PutOutcome::Created);
    }

    let policy = Policy { daily: 0, weekly: 0, monthly: 0, yearly: 3, window_us: DAY };
    let mut expire_opts = ExpireOptions {
        policy,
        now_us: now,
        dry_run: true,
        stale_backup_after: std::time::Duration::from_secs(86_400),
        lock_ttl: std::time::Duration::from_secs(600),
        keep_forever_lock: std::time::Duration::from_secs(86_400),
    };
    let path = |name: &str| format!("/locked/repo/{name}");
    let segment = |segno| path(&layout.object_name(&WalObject::Segment { timeline: 1, segno }));
    let written = lock_of(&moto, &path(&pg::backup_manifest(SYS, "a")))?.1;
    let written_11 = lock_of(&moto, &segment(11))?.1;

    // c is this year's newest (rank 1 of 3: until January 1 three years on), b its parent, a the
    // second year with a backup (rank 2: two years on). Manifest, blocks, and the WAL segment
    // of each: a 4 objects, b 4, c 3.
    let later = |years: i32| format!("{}-01-01T00:00:00Z", year + years);
    let want = [("a", later(2), 4), ("b", later(3), 4), ("c", later(3), 3)];
    let dry = expire(&repo, &cluster, &expire_opts).await?;
    let targets: Vec<(String, String, usize)> =
        dry.retention_until.iter().map(|t| (t.id.clone(), t.until.clone(), t.objects)).collect();
    assert_eq!(targets, want.iter().map(|(i, u, n)| (i.to_string(), u.clone(), *n)).collect::<Vec<_>>());
    assert_eq!((dry.retention_checked, dry.retention_extended), (0, 0));
    assert_eq!(lock_of(&moto, &path(&pg::backup_manifest(SYS, "a")))?.1, written, "a dry run extended a retention");

    // One object whose retention cannot be handled: the server reports a date that is not one
    // (moto stores what it is given).
    set_retention_raw(&moto, &path(&block("bb01")), "COMPLIANCE", "not-a-date")?;
    expire_opts.dry_run = false;
    let report = expire(&repo, &cluster, &expire_opts).await?;
    assert!(report.removed_backups.is_empty());
    // 10 distinct objects of the backups (the shared block counted once) plus what every restore
    // reads (the repository marker and the cluster record; this hand-made repository has no
    // dedup key, counted as missing): that one failed, named, and the rest were extended all the
    // same.
    let failed: Vec<&str> = report.retention_failed.iter().map(|r| r.object.as_str()).collect();
    assert_eq!(failed, [block("bb01")]);
    let why = &report.retention_failed[0].why;
    assert!(why.contains(&block("bb01")) && why.contains("not-a-date"), "{why}");
    assert_eq!((report.retention_checked, report.retention_extended, report.retention_missing), (11, 11, 1));
    assert!(report.removed_wal_objects > 0, "the deletes went on: {report:?}");
    set_retention_raw(&moto, &path(&block("bb01")), "COMPLIANCE", "2020-01-01T00:00:00Z")?;
    let report = expire(&repo, &cluster, &expire_opts).await?;
    ensure!(report.retention_failed.is_empty(), "{:?}", report.retention_failed);
    assert_eq!((report.retention_checked, report.retention_extended), (12, 1));
    let until = |p: &str| -> Result<String> { Ok(lock_of(&moto, p)?.1) };
    assert_eq!(until(&path(&pg::backup_manifest(SYS, "a")))?, later(2));
    assert_eq!(until(&path(&block("aa01")))?, later(2));
    assert_eq!(until(&segment(3))?, later(2));
    // In a and b: b's (inherited from c) date.
    assert_eq!(until(&path(&block("5501")))?, later(3));
    for name in [pg::backup_manifest(SYS, "b"), pg::backup_manifest(SYS, "c"), block("bb01"), block("cc01")] {
        assert_eq!(until(&path(&name))?, later(3), "{name}");
    }
    assert_eq!(until(&segment(10))?, later(3));
    assert_eq!(until(&segment(12))?, later(3));
    // What every restore reads: the latest date of all.
    assert_eq!(until(&path(pitr_archive::names::MARKER))?, later(3));
    assert_eq!(until(&path(&pg::cluster_info(SYS)))?, later(3));
    // Segment 11 only the window needs: its write-time lock stays.
    assert_eq!(lock_of(&moto, &segment(11))?, ("COMPLIANCE".to_string(), written_11, lock_of(&moto, &segment(11))?.2));
    // Segment 5 (between a and b) went: a delete marker, and its locked version stays.
    assert!(repo.store().head(&layout.object_name(&WalObject::Segment { timeline: 1, segno: 5 })).await?.is_none());

    let again = expire(&repo, &cluster, &expire_opts).await?;
    assert_eq!((again.retention_checked, again.retention_extended), (12, 0));
    ensure!(again.retention_failed.is_empty(), "{:?}", again.retention_failed);
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

/// The profile step of the credential chain, through the CLI against s3s-fs (which checks
/// signatures with test/test): keys from `AWS_PROFILE` in the shared files, a wrong secret there
/// refused by the server, a named profile that does not exist refused by pitr.
#[test]
fn s3_credentials_from_an_aws_profile() -> Result<()> {
    let server = S3sFs::start(&["pitr"])?;
    let dir = pitr_tests::scratch_dir("aws-profile");
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".aws"))?;
    std::fs::write(
        home.join(".aws/credentials"),
        "[backup]\naws_access_key_id = test\naws_secret_access_key = test\n\
         [wrong]\naws_access_key_id = test\naws_secret_access_key = not-the-secret\n",
    )?;
    std::fs::write(home.join(".aws/config"), "[profile backup]\nregion = us-east-1\n")?;
    let config = dir.path().join("pitr.toml");
    let write_config = |prefix: &str| {
        std::fs::write(
            &config,
            format!(
                "[repository]\nurl = \"s3://pitr/{prefix}\"\nendpoint = {:?}\nallow_http = true\nforce_path_style = true\n\
                 retry_timeout = \"2s\"\n[encryption]\nkey_file = {:?}\n",
                server.endpoint(),
                dir.path().join("key").display().to_string()
            ),
        )
    };
    let init = |profile: &str| {
        std::process::Command::new(pitr_tests::pitr_bin())
            .arg("--config")
            .arg(&config)
            .arg("init")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_SHARED_CREDENTIALS_FILE")
            .env_remove("AWS_CONFIG_FILE")
            .env("HOME", &home)
            .env("AWS_PROFILE", profile)
            .output()
    };
    write_config("a")?;
    let out = init("backup")?;
    ensure!(out.status.success(), "init with profile keys: {}", String::from_utf8_lossy(&out.stderr));
    write_config("b")?;
    let out = init("wrong")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a wrong secret was accepted");
    ensure!(stderr.contains("SignatureDoesNotMatch") || stderr.contains("403"), "{stderr}");
    let out = init("nosuch")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("AWS_PROFILE=nosuch"), "{stderr}");
    Ok(())
}
