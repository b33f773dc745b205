//! `[encryption] kms_key_id` end to end: `pitr init`, `stream`, `backup` and an exact `restore`
//! with AWS KMS as the only key source, and a KMS outage during streaming.
//!
//! KMS here is an **emulator**: moto's server mode on loopback, which implements the KMS JSON API
//! (`GenerateDataKey`, `Encrypt`, `Decrypt`, `CreateKey`), not AWS itself. It serves KMS only; the
//! repository is a local directory, so an outage of the emulator is a KMS outage and nothing else.
//! The pitr processes get the emulator's test credentials (`AWS_ACCESS_KEY_ID=testing`…) in
//! their own environment only ([`PitrEnv::set_child_env`]), never in the test process's.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{kms_create_key, lsn_to_u64, wait_until, PgCluster, PgOptions, S3Server};

const STATE: &str = "select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t";

/// A pitr environment for `cluster` whose only key source is a fresh key on the KMS emulator,
/// with `encryption_extra` lines added to `[encryption]`; `pitr init` done.
fn kms_env(name: &str, cluster: &PgCluster, moto: &S3Server, encryption_extra: &str) -> Result<(PitrEnv, String)> {
    let mut env = PitrEnv::new(name, cluster, "")?;
    for (k, v) in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")]
    {
        env.set_child_env(k, v);
    }
    let key_id = kms_create_key(&moto.endpoint())?;
    let key_line = format!("key_file = {:?}", env.key_file.display().to_string());
    env.edit_config(
        &key_line,
        &format!("kms_key_id = \"{key_id}\"\nkms_endpoint = \"{}\"\n{encryption_extra}", moto.endpoint()),
    )?;
    env.init()?;
    env.share_with_pg_user()?;
    Ok((env, key_id))
}

/// Every wrap record of the repository: (name under keys/wraps/, its JSON).
fn wrap_records(repo: &Path) -> Result<Vec<(String, serde_json::Value)>> {
    let mut out = Vec::new();
    let wraps = repo.join("keys/wraps");
    for rk in std::fs::read_dir(&wraps).with_context(|| format!("listing {}", wraps.display()))? {
        let rk = rk?;
        for mk in std::fs::read_dir(rk.path())? {
            let mk = mk?;
            let name = format!("{}/{}", rk.file_name().to_string_lossy(), mk.file_name().to_string_lossy());
            if name.contains(".tmp.") {
                continue;
            }
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(mk.path())?).with_context(|| format!("wrap record {name}"))?;
            out.push((name, json));
        }
    }
    Ok(out)
}

/// The sum of every series of `name` on the sidecar's /metrics (0 when it has none yet).
fn metric_sum(env: &PitrEnv, name: &str) -> Result<f64> {
    let (code, body) = env.http_get("/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    Ok(body
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn insert(cluster: &PgCluster, from: u32, n: u32) -> Result<()> {
    cluster.psql(&format!("insert into t select g, md5(g::text) from generate_series({from}, {}) g", from + n - 1))?;
    Ok(())
}

#[test]
fn stream_backup_restore_with_kms() -> Result<()> {
    let moto = S3Server::start()?;
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let (mut env, key_id) = kms_env("kms-e2e", &cluster, &moto, "")?;
    // KMS is the only source: init made no key file.
    assert!(!env.key_file.exists(), "pitr init created {} with kms_key_id configured", env.key_file.display());
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert(&cluster, 1, 1000)?;
    env.run_ok(&["backup"])?;
    insert(&cluster, 1001, 500)?;
    std::thread::sleep(Duration::from_millis(1100));
    let moment = cluster.psql("select clock_timestamp()")?;
    let at_moment = cluster.psql(STATE)?;
    std::thread::sleep(Duration::from_millis(1100));
    insert(&cluster, 1501, 500)?;
    env.wait_archived(cluster.current_lsn()?, "the archive to catch up")?;

    // The repository keys are wrapped by KMS, under the KMS master key's id.
    let records = wrap_records(env.repo_path())?;
    let kms: Vec<&(String, serde_json::Value)> =
        records.iter().filter(|(name, _)| name.split('/').nth(1).is_some_and(|mk| mk.starts_with("kms-"))).collect();
    ensure!(!kms.is_empty(), "no keys/wraps/*/kms-* record: {records:?}");
    for (name, json) in &kms {
        assert_eq!(json["method"], "aws-kms", "{name}: {json}");
        assert_eq!(json["kms_key_id"].as_str(), Some(key_id.as_str()), "{name}: {json}");
        assert!(json.get("nonce").is_none(), "{name}: {json}");
    }
    assert!(!env.key_file.exists(), "a key file appeared at {}", env.key_file.display());

    let (restored, out) = env.restore_started(&moment, cluster.bin_dir(), &["--json"])?;
    assert_eq!(restored.psql(STATE)?, at_moment, "restore to {moment}: {}", String::from_utf8_lossy(&out.stdout));
    drop(restored);
    let verify: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--deep", "--json"])?)?;
    assert_eq!(verify["ok"], true, "{verify:#}");
    Ok(())
}

#[test]
fn kms_outage_during_streaming() -> Result<()> {
    let mut moto = S3Server::start()?;
    let cluster = PgCluster::start(PgOptions::new(15))?;
    // Keys are unwrapped again every 2 s, so a 30 s outage reaches sealing; each KMS call gives up
    // after 2 s, so failures show within the outage.
    let (mut env, key_id) = kms_env("kms-outage", &cluster, &moto, "key_cache_ttl = \"2s\"\nkms_timeout = \"2s\"")?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert(&cluster, 1, 1000)?;
    env.run_ok(&["backup"])?;
    let before = cluster.current_lsn()?;
    env.wait_archived(before, "the archive to catch up before the outage")?;
    let errors_before = metric_sum(&env, "pitr_key_access_errors_total")?;

    // A light, steady write load: one row every 100 ms, through the outage and after it, into a
    // table of its own (`t` changes only at known moments, so a restore of it can be exact).
    cluster.psql("create table load (id serial primary key, at timestamptz default clock_timestamp())")?;
    let stop = AtomicBool::new(false);
    let (moment, at_moment, durable_in_outage) = std::thread::scope(|scope| -> Result<_> {
        let load = scope.spawn(|| -> Result<()> {
            while !stop.load(Ordering::SeqCst) {
                cluster.psql("insert into load default values")?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });
        let result = (|| -> Result<_> {
            std::thread::sleep(Duration::from_secs(2));
            moto.freeze(true)?;
            let outage = Instant::now();
            wait_until("key access errors to be counted", Duration::from_secs(25), || {
                Ok(metric_sum(&env, "pitr_key_access_errors_total")? > errors_before)
            })
            .with_context(|| env.stream_logs())?;
            std::thread::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed()));
            let durable_early = env.sidecar_status()?["durable_lsn"].as_u64().context("durable_lsn")?;
            insert(&cluster, 1001, 200)?;
            std::thread::sleep(Duration::from_millis(1100));
            let moment = cluster.psql("select clock_timestamp()")?;
            let at_moment = cluster.psql(STATE)?;
            std::thread::sleep(Duration::from_millis(1100));
            insert(&cluster, 1201, 200)?;
            std::thread::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed()));
            // The archive stood still while the primary went on: the lag grew.
            let status = env.sidecar_status()?;
            let durable = status["durable_lsn"].as_u64().context("durable_lsn")?;
            ensure!(durable == durable_early, "WAL was sealed during the KMS outage: {durable_early:X} → {durable:X}");
            ensure!(status["lag_bytes"].as_u64() > Some(0), "no lag during the outage: {status:#}");
            ensure!(metric_sum(&env, "pitr_archive_lag_bytes")? > 0.0, "pitr_archive_lag_bytes is 0 during the outage");
            ensure!(cluster.current_lsn()? > durable, "the load wrote no WAL during the outage");
            moto.freeze(false)?;
            Ok((moment, at_moment, durable))
        })();
        // Thawed whatever happened, so that the server can be stopped.
        let _ = moto.freeze(false);
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::SeqCst);
        load.join().expect("load thread panicked")?;
        result
    })?;

    // The sidecar lived through it, kept its lease, and said what failed and where.
    assert!(stream.is_running(), "pitr stream died during the KMS outage:\n{}", env.stream_logs());
    let logs = env.stream_logs();
    assert!(!logs.contains("taken over"), "{logs}");
    let log_text = std::fs::read_to_string(env.dir.path().join("stream-1.log"))?;
    let named = log_text.lines().find(|l| {
        l.contains(&format!("KMS key {key_id}")) && l.contains("decrypt failed") && l.contains("unreachable")
    });
    assert!(named.is_some(), "no log line names the KMS key and the operation:\n{logs}");
    eprintln!("the sidecar said: {}", named.unwrap_or_default());
    let errors = metric_sum(&env, "pitr_key_access_errors_total")?;
    assert!(errors > errors_before, "pitr_key_access_errors_total did not rise: {errors_before} → {errors}");
    let (code, body) = env.http_get("/metrics")?;
    assert!(code == 200 && body.contains("pitr_key_access_errors_total{operation=\"decrypt\"}"), "{body}");

    // After the thaw the lag goes back to (near) zero: everything written is archived.
    let end = cluster.current_lsn()?;
    assert!(end > durable_in_outage);
    wait_until("the sidecar to catch up after the outage", Duration::from_secs(90), || {
        Ok(env.sidecar_status()?["durable_lsn"].as_u64().unwrap_or(0) >= end)
    })
    .with_context(|| env.stream_logs())?;
    let status: serde_json::Value = serde_json::from_str(&env.run_ok(&["status", "--json"])?)?;
    assert!(status["archived_lsn"].as_str().map(lsn_to_u64).unwrap_or(0) >= end, "{status:#}");

    // A moment inside the outage restores exactly: nothing was lost, and there is no gap.
    let (restored, out) = env.restore_started(&moment, cluster.bin_dir(), &["--json"])?;
    assert_eq!(restored.psql(STATE)?, at_moment, "restore to {moment}: {}", String::from_utf8_lossy(&out.stdout));
    drop(restored);
    let verify: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--deep", "--json"])?)?;
    assert_eq!(verify["ok"], true, "{verify:#}");
    env.stop_stream(&mut stream)?;
    Ok(())
}
