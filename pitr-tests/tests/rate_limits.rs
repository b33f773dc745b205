//! Bandwidth limits against a real PostgreSQL 15 and a local repository:
//! - `pitr stream` under `[repository] max_upload_rate = "32KiB/s"` (the lowest allowed) still
//!   archives WAL at once (WAL is never slowed; a 16 MiB segment at that rate would take over
//!   eight minutes), and says that the limit cannot hold
//!   (`pitr_upload_over_limit_bytes_total{kind="wal"}`, a warning);
//! - a backup with `[backup] max_rate` (BASE_BACKUP's MAX_RATE, seen in the server's log of
//!   replication commands) and upload and download limits waits for the upload limit (its
//!   `--json` counts the seconds) and restores exactly.
//!
//! That the limits hold their rate is measured in the token bucket's unit tests (paused time)
//! and the `throttle` benchmark, not here: no timing thresholds in tests.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{wait_until, PgCluster, PgOptions};

fn table_state(psql: impl Fn(&str) -> Result<String>) -> Result<String> {
    psql("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t")
}

/// The value of the counter `name{labels}` on the sidecar's /metrics, 0 while absent.
fn counter(env: &PitrEnv, name: &str, labels: &str) -> Result<f64> {
    let (code, body) = env.http_get("/metrics")?;
    if code != 200 {
        bail!("/metrics answered {code}: {body}");
    }
    let series = format!("{name}{{{labels}}} ");
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.trim().parse::<f64>())
        .transpose()
        .with_context(|| format!("{series} in {body}"))?
        .unwrap_or(0.0))
}

#[test]
fn pg15_limits_slow_backups_not_wal_and_a_limited_backup_restores_exactly() -> Result<()> {
    let mut opts = PgOptions::new(15);
    opts.extra_conf.push("log_replication_commands = on".into());
    let cluster = PgCluster::start(opts)?;
    let mut env = PitrEnv::new("rate-limits", &cluster, "")?;
    env.edit_config("[encryption]\n", "max_upload_rate = \"32KiB/s\"\n[encryption]\n")?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;

    // A few MB of WAL through a sidecar limited to 32 KiB per second.
    cluster.psql("create table t (id int primary key, v text)")?;
    cluster.psql("insert into t select g, md5(g::text) from generate_series(1, 20000) g")?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "WAL to be archived despite max_upload_rate = 32KiB/s")?;
    let over = counter(&env, "pitr_upload_over_limit_bytes_total", "kind=\"wal\"")?;
    assert!(over > 0.0, "WAL beyond a 32 KiB/s limit is not counted: {over}");
    wait_until("the over-limit warning in the sidecar's log", Duration::from_secs(30), || {
        Ok(env.stream_logs().contains("alone exceed the configured rate limit"))
    })
    .with_context(|| env.stream_logs())?;

    // Backup and restore under limits they can live with; the sidecar (still at 32 KiB/s)
    // archives the WAL that completes the backup.
    env.edit_config(
        "max_upload_rate = \"32KiB/s\"\n",
        "max_upload_rate = \"1MiB/s\"\nmax_download_rate = \"8MB/s\"\n",
    )?;
    std::fs::write(
        &env.config,
        format!("{}[backup]\nmax_rate = \"64MiB/s\"\n", std::fs::read_to_string(&env.config)?),
    )?;
    let backup: serde_json::Value = serde_json::from_str(&env.run_ok(&["backup", "--json"])?)?;
    // The bucket holds at most one second's worth (1 MiB) when the first block comes, so a
    // backup storing more must wait: a limit that slowed nothing would show 0.
    assert!(backup["bytes_stored"].as_u64() > Some(1 << 20), "too small to be slowed: {backup:#}");
    let throttled = backup["upload_throttled_seconds"].as_f64();
    assert!(throttled.is_some_and(|t| t > 0.0), "the backup's uploads never waited for max_upload_rate: {backup:#}");
    let server_log = std::fs::read_to_string(cluster.log_path())?;
    assert!(
        server_log.lines().any(|l| l.contains("BASE_BACKUP") && l.contains("MAX_RATE 65536")),
        "the server was not asked for MAX_RATE 65536 (64 MiB/s):\n{}",
        cluster.log_tail()
    );

    cluster.psql("insert into t select g, md5(g::text) from generate_series(20001, 30000) g")?;
    cluster.psql("update t set v = 'x' where id % 7 = 0")?;
    let expected = table_state(|q| cluster.psql(q))?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the writes after the backup")?;
    env.stop_stream(&mut stream)?;

    let (restored, _) = env.restore_started("latest", cluster.bin_dir(), &[])?;
    assert_eq!(table_state(|q| restored.psql(q))?, expected, "restore under max_download_rate");
    Ok(())
}
