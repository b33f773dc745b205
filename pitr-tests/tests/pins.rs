//! Pins and notes against a real PostgreSQL 15 and a local repository: three backups under a
//! policy that keeps only the newest; the oldest pinned with `pitr pin` and the middle one taken
//! with `--keep-forever --note` survive `pitr expire` with the WAL to their consistency points
//! (`verify` passes, the oldest restores exactly), and `list`, `status` and `expire --dry-run`
//! show the pins and notes; once unpinned, the next expire removes them and their pin records.
//! Bad input (an unknown id, a date in the past or not a date, a bad note) is one error each
//! and writes nothing; `unpin` of a backup that is not pinned says so and exits 0.
//!
//! `backup --keep-forever` whose pin cannot be recorded stores no backup (the record goes before
//! the manifest).
//!
//! With S3 Object Lock (moto): `expire` extends the retention of a pinned backup's manifest,
//! blocks, WAL and pin record in force to its pin's date or now + the lock period, whichever is
//! sooner (moved on by each run), and the cluster record and repository marker with them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use pitr_archive::backup::BackupManifest;
use pitr_archive::cloud::{CloudOptions, CloudStore, LockMode, ObjectLock};
use pitr_archive::expire::{expire, ExpireOptions};
use pitr_archive::names::pg;
use pitr_archive::pins::{self, Change, Pin};
use pitr_archive::retention::Policy;
use pitr_archive::{ClusterInfo, KeyRing, Repository, WalLayout, WalObject};
use pitr_tests::checks::{assert_untouched, expect_failure, snapshot};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{http_request, PgCluster, PgOptions, S3Server};

const STATE: &str = "select count(*) || ' ' || md5(string_agg(id || ':' || v, ',' order by id)) from t";

fn json(out: &str) -> Result<serde_json::Value> {
    serde_json::from_str(out).with_context(|| out.to_string())
}

/// `list --json`'s backups by id.
fn listed(env: &PitrEnv) -> Result<Vec<serde_json::Value>> {
    let list = json(&env.run_ok(&["list", "--json"])?)?;
    Ok(list["backups"].as_array().context("backups")?.clone())
}

fn find<'a>(backups: &'a [serde_json::Value], id: &str) -> Option<&'a serde_json::Value> {
    backups.iter().find(|b| b["id"] == id)
}

fn pin_records(env: &PitrEnv) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for cluster in std::fs::read_dir(env.repo_path().join("pg"))? {
        let dir = cluster?.path().join("pins");
        if dir.is_dir() {
            for e in std::fs::read_dir(dir)? {
                out.push(e?.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[test]
fn pinned_backups_survive_expire_with_their_wal_and_restore_exactly() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.psql("create table t (id int primary key, v text); insert into t select g, md5(g::text) from generate_series(1, 2000) g")?;
    let retention = "\n[retention]\ndaily = 1\nweekly = 0\nmonthly = 0\nyearly = 0\nwindow = \"0s\"\n";
    let mut env = PitrEnv::new("pg15-pins", &cluster, retention)?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;

    // Oldest: the state at its consistency point is what a restore of it must give.
    let oldest = json(&env.run_ok(&["backup", "--json"])?)?;
    let oldest_id = oldest["id"].as_str().context("id")?.to_string();
    let oldest_state = cluster.psql(STATE)?;
    cluster.psql("select pg_switch_wal()")?;
    cluster.psql("insert into t select g, md5(g::text) from generate_series(2001, 4000) g")?;
    cluster.psql("select pg_switch_wal()")?;

    // A bad note is refused before any backup is taken (the stream still writes WAL meanwhile).
    expect_failure(
        &env.config,
        &["backup", "--keep-forever", "--note", "two\nlines"],
        &["--note", "control character"],
    );
    expect_failure(&env.config, &["backup", "--source", "mongo", "--note", "x"], &["PostgreSQL backups"]);
    assert_eq!(listed(&env)?.len(), 1, "a refused backup was taken");
    assert!(pin_records(&env)?.is_empty());

    // The pin cannot be written (a file where the pins directory goes): no backup is stored,
    // rather than one stored unpinned.
    let system_dir = std::fs::read_dir(env.repo_path().join("pg"))?.next().context("pg/<id>")??.path();
    let blocker = system_dir.join("pins");
    std::fs::write(&blocker, b"in the way")?;
    expect_failure(
        &env.config,
        &["backup", "--keep-forever", "--note", "not stored"],
        &["pin or note of the new backup was not recorded", "the backup was not recorded"],
    );
    std::fs::remove_file(&blocker)?;
    assert_eq!(listed(&env)?.len(), 1, "a backup whose pin failed was stored");

    let middle = json(&env.run_ok(&["backup", "--json", "--keep-forever", "--note", "before the 16 upgrade"])?)?;
    let middle_id = middle["id"].as_str().context("id")?.to_string();
    assert_eq!(middle["pin"]["pinned"], "forever", "{middle:#}");
    assert_eq!(middle["pin"]["note"], "before the 16 upgrade", "{middle:#}");
    cluster.psql("select pg_switch_wal()")?;
    cluster.psql("update t set v = 'changed' where id % 7 = 0")?;
    cluster.psql("select pg_switch_wal()")?;
    let newest = json(&env.run_ok(&["backup", "--json"])?)?;
    let newest_id = newest["id"].as_str().context("id")?.to_string();
    cluster.psql("insert into t values (5000, 'after')")?;
    env.wait_archived(cluster.current_lsn()?, "the last commit archived")?;
    // The repository stands still from here on, for the byte comparisons.
    env.stop_stream(&mut stream)?;

    // Bad input: one error each, nothing written.
    let before = snapshot(env.repo_path());
    expect_failure(&env.config, &["pin", "20200101T000000Z"], &["no backup 20200101T000000Z"]);
    expect_failure(&env.config, &["pin", "../x"], &["not a backup id"]);
    expect_failure(
        &env.config,
        &["pin", &oldest_id, "--until", "2020-01-01"],
        &["not in the future", "nothing written"],
    );
    expect_failure(&env.config, &["pin", &oldest_id, "--until", "next tuesday"], &["--until", "not a date"]);
    expect_failure(&env.config, &["pin", &oldest_id, "--note", &"x".repeat(1025)], &["note", "1024"]);
    expect_failure(&env.config, &["unpin", "20200101T000000Z"], &["no backup 20200101T000000Z"]);
    let not_pinned = env.run_ok(&["unpin", &newest_id])?;
    assert!(not_pinned.contains("is not pinned") && not_pinned.contains("nothing written"), "{not_pinned}");
    assert_untouched(env.repo_path(), &before, "refused pins and an unpin of an unpinned backup");

    let pinned = env.run_ok(&["pin", &oldest_id, "--note", "audit 2026"])?;
    assert!(pinned.contains(&format!("pinned backup {oldest_id} forever")), "{pinned}");

    // list (JSON and text) and status show the pins and notes.
    let backups = listed(&env)?;
    let o = find(&backups, &oldest_id).context("oldest listed")?;
    assert_eq!((o["pinned"].as_str(), o["note"].as_str()), (Some("forever"), Some("audit 2026")), "{o:#}");
    let m = find(&backups, &middle_id).context("middle listed")?;
    assert_eq!((m["pinned"].as_str(), m["note"].as_str()), (Some("forever"), Some("before the 16 upgrade")), "{m:#}");
    let n = find(&backups, &newest_id).context("newest listed")?;
    assert!(n["pinned"].is_null() && n["note"].is_null(), "{n:#}");
    let text = env.run_ok(&["list"])?;
    assert!(text.contains("pinned forever  note: audit 2026"), "{text}");
    let status = json(&String::from_utf8_lossy(&env.run(&["status", "--json"])?.stdout))?;
    let shown: Vec<&str> =
        status["pinned_backups"].as_array().into_iter().flatten().filter_map(|b| b["id"].as_str()).collect();
    assert_eq!(shown, vec![oldest_id.as_str(), middle_id.as_str()], "{status:#}");

    // Pins that cannot be read (the listing fails: a file where the pins directory goes) do not
    // take list and status down: everything else is shown, and why the pins are not.
    let pins_dir = system_dir.join("pins");
    let aside = system_dir.join("pins.aside");
    std::fs::rename(&pins_dir, &aside)?;
    std::fs::write(&pins_dir, b"in the way")?;
    let list = json(&env.run_ok(&["list", "--json"])?)?;
    let ids: Vec<&str> = list["backups"].as_array().into_iter().flatten().filter_map(|b| b["id"].as_str()).collect();
    assert_eq!(ids, vec![oldest_id.as_str(), middle_id.as_str(), newest_id.as_str()], "{list:#}");
    assert!(list["pins_error"].as_str().is_some_and(|e| e.contains("reading the pins")), "{list:#}");
    assert!(list["recoverable_windows"].as_array().is_some_and(|w| !w.is_empty()), "{list:#}");
    let text = env.run_ok(&["list"])?;
    assert!(text.contains("pins error: reading the pins") && text.contains(&newest_id), "{text}");
    let status = json(&String::from_utf8_lossy(&env.run(&["status", "--json"])?.stdout))?;
    assert!(status["pins_error"].as_str().is_some_and(|e| e.contains("reading the pins")), "{status:#}");
    assert!(status["repository_error"].is_null() && status["archived_lsn"].is_string(), "{status:#}");
    let status_text = String::from_utf8_lossy(&env.run(&["status"])?.stdout).into_owned();
    assert!(status_text.contains("pins error:"), "{status_text}");
    std::fs::remove_file(&pins_dir)?;
    std::fs::rename(&aside, &pins_dir)?;

    // The dry run says why each is kept.
    let dry = json(&env.run_ok(&["expire", "--dry-run", "--json"])?)?;
    let kept = dry["kept"].as_array().context("kept")?;
    let reasons = |id: &str| kept.iter().find(|k| k["id"] == id).map(|k| k["reasons"].clone());
    assert_eq!(reasons(&oldest_id), Some(serde_json::json!(["pinned"])), "{dry:#}");
    assert_eq!(reasons(&middle_id), Some(serde_json::json!(["pinned"])), "{dry:#}");
    assert!(dry["removed_backups"].as_array().is_some_and(|r| r.is_empty()), "{dry:#}");
    let dry_text = env.run_ok(&["expire", "--dry-run"])?;
    assert!(dry_text.contains("pinned (forever); note: audit 2026"), "{dry_text}");

    // expire removes the WAL between them, keeps theirs; the archive is sound.
    let report = json(&env.run_ok(&["expire", "--json"])?)?;
    assert!(report["removed_backups"].as_array().is_some_and(|r| r.is_empty()), "{report:#}");
    assert!(report["removed_wal_objects"].as_u64().unwrap_or(0) > 0, "nothing to expire between them: {report:#}");
    let verify = json(&env.run_ok(&["verify", "--deep", "--json"])?)?;
    assert_eq!(verify["ok"], true, "{verify:#}");
    let ids: Vec<String> = listed(&env)?.iter().filter_map(|b| b["id"].as_str().map(String::from)).collect();
    assert_eq!(ids, vec![oldest_id.clone(), middle_id.clone(), newest_id.clone()]);

    // The pinned oldest backup restores exactly to its consistency point.
    let stop = format!("lsn:{}", oldest["stop_lsn"].as_str().context("stop_lsn")?);
    let (server, _) = env.restore_started(&stop, cluster.bin_dir(), &["--backup", &oldest_id, "--timeout", "120s"])?;
    assert_eq!(server.psql(STATE)?, oldest_state, "restore of the pinned backup to {stop}");
    drop(server);

    // Unpinned, they are ordinary backups again: the next expire removes them and their records.
    assert!(env.run_ok(&["unpin", &oldest_id])?.contains(&format!("unpinned backup {oldest_id}")));
    let unpinned = json(&env.run_ok(&["unpin", &middle_id, "--json"])?)?;
    assert_eq!(unpinned["unpinned"], true, "{unpinned:#}");
    let m = find(&listed(&env)?, &middle_id).cloned().context("middle listed")?;
    assert!(m["pinned"].is_null() && m["note"] == "before the 16 upgrade", "the note stays: {m:#}");
    let report = json(&env.run_ok(&["expire", "--json"])?)?;
    let removed: Vec<&str> =
        report["removed_backups"].as_array().into_iter().flatten().filter_map(|b| b["id"].as_str()).collect();
    assert_eq!(removed, vec![middle_id.as_str(), oldest_id.as_str()], "{report:#}");
    assert!(pin_records(&env)?.is_empty(), "pin records left: {:?}", pin_records(&env)?);
    let verify = json(&env.run_ok(&["verify", "--json"])?)?;
    assert_eq!(verify["ok"], true, "{verify:#}");
    Ok(())
}

/// moto checks no signatures, but treats a request without Authorization as anonymous.
const MOTO_AUTH: [(&str, &str); 1] =
    [("Authorization", "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request")];

/// An object's retain-until date as moto's HEAD reports it.
fn retained_until(moto: &S3Server, name: &str) -> Result<String> {
    let path = format!("/locked/repo/{name}");
    let head = http_request(moto.port, "HEAD", &path, &MOTO_AUTH, b"")?;
    ensure!(head.status == 200, "HEAD {path}: {}", head.status);
    head.header("x-amz-object-lock-retain-until-date").map(str::to_string).with_context(|| format!("{path}: no lock"))
}

/// S3's date form of a time (whole seconds, rounded up as `extend_retention` does).
fn s3_date(us: i64) -> String {
    let secs = (us + 999_999).div_euclid(1_000_000);
    chrono::DateTime::from_timestamp(secs, 0).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_lock_retention_follows_the_pins() -> Result<()> {
    const SYS: u64 = 7;
    const SEG: u64 = 16 << 20;
    const DAY: i64 = 86_400_000_000;
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let moto = S3Server::start()?;
    let created = http_request(moto.port, "PUT", "/locked", &[("x-amz-bucket-object-lock-enabled", "true")], b"")?;
    ensure!(created.status == 200, "create bucket with object lock: {} {}", created.status, created.text());
    let opts = CloudOptions {
        endpoint: Some(moto.endpoint()),
        region: Some("us-east-1".into()),
        allow_http: true,
        force_path_style: true,
        object_lock: Some(ObjectLock { mode: LockMode::Governance, days: 1 }),
        ..CloudOptions::default()
    };
    let repo = Repository::new(Arc::new(CloudStore::open("s3://locked/repo", &opts)?), KeyRing::from_key("k", [3; 32]));
    repo.init().await?;
    let cluster =
        ClusterInfo { system_id: SYS, wal_segment_size: SEG, wal_page_size: 8192, server_version_num: 150000 };
    repo.put_cluster_info(&cluster).await?;
    let layout = WalLayout::new(&cluster);

    // f: old, pinned forever; u: old, pinned until a date; n: the newest, kept by `daily = 1`.
    let now = pitr_archive::now_us();
    for segno in [4u64, 6] {
        let name = layout.object_name(&WalObject::Segment { timeline: 1, segno });
        repo.store().put_if_absent(&name, Bytes::from_static(b"wal")).await?;
    }
    let until = now + 10 * DAY;
    for (id, start_us, segno) in [("f", now - 20 * DAY, 3u64), ("u", now - 10 * DAY, 5), ("n", now - DAY / 24, 8)] {
        let block = format!("{id}{}", "0".repeat(63));
        repo.store().put_if_absent(&pg::block(SYS, &block), Bytes::from_static(b"block")).await?;
        let name = layout.object_name(&WalObject::Segment { timeline: 1, segno });
        repo.store().put_if_absent(&name, Bytes::from_static(b"wal")).await?;
        let manifest: BackupManifest = serde_json::from_value(serde_json::json!({
            "id": id, "kind": "full", "system_id": SYS, "server_version_num": 150000, "timeline": 1,
            "start_lsn": segno * SEG + 40, "stop_lsn": segno * SEG + 5000,
            "start_time_us": start_us, "stop_time_us": start_us + 60_000_000,
            "block_size": 1 << 20, "tablespaces": [], "entries": [],
            "files": [{ "path": "base/1/1", "size": 1, "mode": 384, "mtime": 0, "checksum": null, "blocks": [block] }],
            "server_manifest": "", "logical_bytes": 1, "stored_bytes": 1,
        }))?;
        manifest.store(&repo).await?;
    }
    pins::change(&repo, SYS, "f", Change::Pin { pin: Pin::Forever, note: None }, now).await?;
    pins::change(&repo, SYS, "u", Change::Pin { pin: Pin::Until(until), note: None }, now).await?;

    let expire_opts = |lock_days: u64| ExpireOptions {
        policy: Policy { daily: 1, weekly: 0, monthly: 0, yearly: 0, window_us: 0 },
        now_us: now,
        dry_run: false,
        stale_backup_after: Duration::from_secs(86_400),
        lock_ttl: Duration::from_secs(600),
        keep_forever_lock: Duration::from_secs(lock_days * 86_400),
    };
    // Each run locks a pin's objects up to now + the lock period, no further: a pin until a date
    // beyond it is not locked in at once (an unpin could not undo that), the next run moves on.
    for (lock_days, want) in
        [(5, [("f", now + 5 * DAY), ("u", now + 5 * DAY)]), (30, [("f", now + 30 * DAY), ("u", until)])]
    {
        let report = expire(&repo, &cluster, &expire_opts(lock_days)).await?;
        assert!(report.removed_backups.is_empty(), "{report:?}");
        ensure!(report.retention_failed.is_empty(), "{:?}", report.retention_failed);
        for (id, _) in &want {
            let target = report.retention_until.iter().find(|t| t.id == *id).with_context(|| format!("{report:?}"))?;
            assert_eq!(target.objects, 4, "{id}: manifest, pin record, block, WAL segment");
        }
        for ((id, date), segno) in want.iter().zip([3u64, 5]) {
            let block = pg::block(SYS, &format!("{id}{}", "0".repeat(63)));
            let segment = layout.object_name(&WalObject::Segment { timeline: 1, segno });
            for name in [pg::backup_manifest(SYS, id), pg::pin(SYS, id, 0), block, segment] {
                assert_eq!(retained_until(&moto, &name)?, s3_date(*date), "{name} with a {lock_days}-day lock");
            }
        }
        // What every restore reads besides: until the latest date of all.
        for name in [pg::cluster_info(SYS), pitr_archive::names::MARKER.to_string()] {
            assert_eq!(retained_until(&moto, &name)?, s3_date(now + lock_days as i64 * DAY), "{name}");
        }
    }
    // The WAL between them (segments 4 and 6) no pin needs: it went.
    for segno in [4u64, 6] {
        let name = layout.object_name(&WalObject::Segment { timeline: 1, segno });
        assert!(repo.store().head(&name).await?.is_none(), "{name} is still there");
    }
    Ok(())
}
