//! Predicted RTO (`pitr_drill::rto`) against a real PostgreSQL 17: no prediction before the first
//! drill ("no drill yet", no gauge); after one drill, `pitr status`, `pitr list` and the sidecar's
//! `pitr_predicted_rto_seconds` show the model of the stored result, fed the bytes the drill
//! measured; a restore run by hand stores its timings too; with `[schedule] incremental = "auto"`
//! the sidecar takes no backup while the prediction is under the target, and an incremental by
//! itself once the target is tiny.

use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{wait_until, PgCluster, PgOptions};

/// The series of `name` in the sidecar's `/metrics` (no label), if exported.
fn gauge(env: &PitrEnv, name: &str) -> Result<Option<f64>> {
    let (code, body) = env.http_get("/metrics")?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    Ok(body
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok()))
}

fn status(env: &PitrEnv) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&env.run_ok(&["status", "--json"])?)?)
}

fn backups(env: &PitrEnv) -> Result<Vec<serde_json::Value>> {
    let list: serde_json::Value = serde_json::from_str(&env.run_ok(&["list", "--json"])?)?;
    Ok(list["backups"].as_array().cloned().unwrap_or_default())
}

fn f(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

#[test]
fn pg17_predicted_rto_after_a_drill_and_the_auto_schedule() -> Result<()> {
    let mut opts = PgOptions::new(17);
    opts.extra_conf.push("summarize_wal = on".into());
    let cluster = PgCluster::start(opts)?;
    cluster.pgbench(&["-i", "-s", "2"])?;
    let mut env = PitrEnv::new("predicted-rto", &cluster, "")?;
    // Automatic backups, checked every 2 s; a target no small restore reaches.
    env.edit_config("incremental = \"\"", "incremental = \"auto\"\nauto_min_spacing = \"2s\"")?;
    let text = std::fs::read_to_string(&env.config)?;
    std::fs::write(&env.config, format!("{text}\n[targets]\nrto_seconds = 100000\n"))?;
    env.init()?;
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    env.run_ok(&["backup"])?;
    cluster.pgbench(&["-n", "-t", "300"])?;
    env.wait_archived(cluster.current_lsn()?, "the workload")?;

    // No drill yet: no prediction, no gauge, and no automatic backup (nothing to judge by).
    let s = status(&env)?;
    assert!(s["predicted_rto"].is_null(), "{s:#}");
    assert_eq!(s["predicted_rto_note"], "no drill yet", "{s:#}");
    assert!(env.run_ok(&["status"])?.contains("predicted RTO:          no drill yet"));
    wait_until("/metrics to answer", Duration::from_secs(30), || Ok(env.http_get("/metrics").is_ok()))?;
    assert_eq!(gauge(&env, "pitr_predicted_rto_seconds")?, None, "a prediction before any drill");
    assert_eq!(gauge(&env, "pitr_rto_target_seconds")?, Some(100000.0));

    // One drill to the newest WAL, as the server user (who must be able to store its result).
    env.share_with_pg_user()?;
    let (ok, drill) = env.run_json_as_pg_user(&["drill", "--to", "latest", "--json", "--db-user", "postgres"])?;
    assert!(ok, "drill failed: {drill:#}");
    let restore = &drill["restore"];

    // The model of one result: each phase's time scaled by the bytes (no overhead). The download
    // input is what the drill's restore wrote (the same full backup): equal to its bytes.
    let s = status(&env)?;
    let p = &s["predicted_rto"];
    assert!(p.is_object(), "{s:#}\ndrill: {drill:#}");
    assert_eq!(p["chain_bytes"].as_u64(), restore["bytes_restored"].as_u64(), "{p:#}\n{restore:#}");
    assert!(p["wal_bytes"].as_u64() >= restore["wal_replayed_bytes"].as_u64(), "{p:#}\n{restore:#}");
    let expected = f(restore, "download_seconds") * f(p, "chain_bytes") / f(restore, "bytes_restored")
        + f(restore, "replay_seconds") * f(p, "wal_bytes") / f(restore, "wal_replayed_bytes");
    assert!((f(p, "seconds") - expected).abs() <= 1e-6 * expected.max(1.0), "{expected} vs {p:#}");
    assert_eq!(p["model"]["samples"], 1, "{p:#}");
    let list = env.run_ok(&["list"])?;
    assert!(list.contains("predicted RTO: ") && list.contains("learnt from 1 drill"), "{list}");

    // The sidecar exports it (its automatic-backup check recomputes it every 2 s).
    wait_until("the predicted RTO gauge", Duration::from_secs(90), || {
        Ok(gauge(&env, "pitr_predicted_rto_seconds")?.is_some())
    })
    .with_context(|| env.stream_logs())?;
    let exported = gauge(&env, "pitr_predicted_rto_seconds")?.context("gauge")?;
    let now = f(&status(&env)?["predicted_rto"], "seconds");
    assert!(exported.is_finite() && exported > 0.0, "{exported}");
    // Both are the model on the same result; the archive's end may have moved in between.
    assert!((exported - now).abs() <= 0.25 * now, "gauge {exported} vs status {now}");
    // With it, when it was computed: a stale gauge shows as a timestamp that stops moving.
    let computed = gauge(&env, "pitr_predicted_rto_timestamp_seconds")?.context("timestamp gauge")?;
    let unix_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    assert!(computed <= unix_now + 1.0 && computed > unix_now - 600.0, "{computed} vs {unix_now}");

    // A restore run by hand stores its timings: two samples now.
    let (_server, out) = env.restore_started("latest", cluster.bin_dir(), &["--json"])?;
    assert!(out.status.success());
    let s = status(&env)?;
    assert_eq!(s["predicted_rto"]["model"]["samples"], 2, "{s:#}");

    // Under the target: the automatic check takes no backup.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(backups(&env)?.len(), 1, "an automatic backup under the target");

    // A target even a restore just after a backup misses (writing the data directory takes
    // longer): backups cannot help, none is taken, and the log says why.
    env.edit_config("rto_seconds = 100000", "rto_seconds = 0.001")?;
    wait_until("the warning that backups cannot help", Duration::from_secs(60), || {
        Ok(env.stream_logs().contains("more backups cannot bring it under"))
    })
    .with_context(|| env.stream_logs())?;
    assert_eq!(backups(&env)?.len(), 1, "an automatic backup that cannot help");

    // A target between the restore just after a backup and the restore now: an incremental on
    // the full backup, by itself. (One size learnt: no overhead, so after a backup only the
    // data directory's time remains.)
    let p = status(&env)?["predicted_rto"].clone();
    let target = (f(&p, "download_seconds") + 0.5 * f(&p, "replay_seconds")) / 0.8;
    env.edit_config("rto_seconds = 0.001", &format!("rto_seconds = {target}"))?;
    wait_until("an automatic backup", Duration::from_secs(120), || Ok(backups(&env)?.len() >= 2))
        .with_context(|| env.stream_logs())?;
    let all = backups(&env)?;
    assert_eq!(all[1]["kind"], "incremental", "{all:#?}");
    assert_eq!(all[1]["parent"], all[0]["id"], "{all:#?}");
    assert!(env.stream_logs().contains("automatic backup: predicted RTO"), "{}", env.stream_logs());
    Ok(())
}
