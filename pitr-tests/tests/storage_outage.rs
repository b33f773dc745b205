//! Storage outages during a workload, against a real S3 server (s3s-fs, which keeps its objects on
//! disk): the server killed for 60 s and started again on the same port with the same data; and a
//! TCP proxy that cuts uploads half-way and swallows replies. Afterwards: no gap, exact restores,
//! nothing half-written.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::proxy::FaultyProxy;
use pitr_tests::{lsn_to_u64, wait_until, PgCluster, PgOptions, S3sFs};

const STATE: &str = "select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t";
const BENCH_STATE: &str = "select (select count(*) || ' ' || sum(abalance) from pgbench_accounts) || ' ' || \
     (select count(*) || ' ' || coalesce(sum(delta), 0) from pgbench_history)";

/// A repository on `endpoint` with short retry budgets, so that failed puts reach the sidecar's
/// own retry loop (and its error counter) within the outage.
fn s3_env(name: &str, cluster: &PgCluster, endpoint: &str) -> Result<PitrEnv> {
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let env = PitrEnv::new(name, cluster, "")?;
    let repo_line = format!("path = {:?}", env.repo_path().display().to_string());
    env.edit_config(
        &repo_line,
        &format!(
            "url = \"s3://pitr/clusters/main\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\nallow_http = true\n\
             force_path_style = true\nconnect_timeout = \"2s\"\nrequest_timeout = \"10s\"\nretry_timeout = \"5s\"\n\
             retry_max_backoff = \"2s\""
        ),
    )?;
    env.init()?;
    env.share_with_pg_user()?;
    Ok(env)
}

/// Restores to `moment` (only `t` is compared: pgbench was running then) and to latest (all of
/// it), and checks the archive has no gap.
fn check_restores(env: &PitrEnv, cluster: &PgCluster, moment: &str, at_moment: &str) -> Result<()> {
    let (restored, out) = env.restore_started(moment, cluster.bin_dir(), &["--json"])?;
    assert_eq!(restored.psql(STATE)?, at_moment, "restore to {moment}: {}", String::from_utf8_lossy(&out.stdout));
    drop(restored);
    let (restored, out) = env.restore_started("latest", cluster.bin_dir(), &["--json"])?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(restored.psql(STATE)?, cluster.psql(STATE)?, "restore to latest: {report}");
    assert_eq!(restored.psql(BENCH_STATE)?, cluster.psql(BENCH_STATE)?, "restore to latest: {report}");
    drop(restored);
    let verify: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--deep", "--json"])?)?;
    assert_eq!(verify["ok"], true, "{verify:#}");
    Ok(())
}

/// Inserts rows `from..from+n` into `t`.
fn insert(cluster: &PgCluster, from: u32, n: u32) -> Result<()> {
    cluster.psql(&format!("insert into t select g, md5(g::text) from generate_series({from}, {}) g", from + n - 1))?;
    Ok(())
}

#[test]
fn s3_server_killed_for_60s_during_pgbench() -> Result<()> {
    let mut s3 = S3sFs::start(&["pitr"])?;
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = s3_env("outage-kill", &cluster, &s3.endpoint())?;
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert(&cluster, 1, 1000)?;
    cluster.pgbench(&["-i", "-s", "2", "-q"])?;
    env.run_ok(&["backup"])?;
    let before = cluster.current_lsn()?;
    wait_until("the archive to catch up before the outage", Duration::from_secs(60), || {
        Ok(env.archived_lsn()? >= before)
    })
    .with_context(|| env.stream_logs())?;
    let errors_before = env.metric("pitr_upload_errors_total")?;

    s3.stop();
    let outage = Instant::now();
    let (moment, at_moment, archive_end, restart_lsn, current) = std::thread::scope(|scope| -> Result<_> {
        let bench = scope.spawn(|| cluster.pgbench(&["-n", "-c", "2", "-T", "50"]));
        insert(&cluster, 1001, 500)?;
        std::thread::sleep(Duration::from_secs(20));
        let moment = cluster.psql("select clock_timestamp()")?;
        let at_moment = cluster.psql(STATE)?;
        std::thread::sleep(Duration::from_millis(1100));
        insert(&cluster, 1501, 500)?;
        // The sidecar has been failing puts and counting them; the archive cannot have grown.
        wait_until("upload errors to be counted", Duration::from_secs(30), || {
            Ok(env.metric("pitr_upload_errors_total")? > errors_before)
        })
        .with_context(|| env.stream_logs())?;
        let status = env.sidecar_status()?;
        let archive_end = status["durable_lsn"].as_u64().context("durable_lsn")?;
        // `pitr status` still shows the sidecar and the primary, names the repository's error,
        // and fails.
        let out = env.run(&["status", "--json"])?;
        ensure!(!out.status.success(), "pitr status succeeded with the storage down");
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(shown["repository_error"].as_str().is_some_and(|e| !e.is_empty()), "{shown:#}");
        ensure!(shown["sidecar"]["lag_bytes"].as_u64() > Some(0) && shown["primary_lsn"].is_string(), "{shown:#}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(stderr.lines().filter(|l| l.starts_with("pitr: error: ")).count() == 1, "{stderr}");
        ensure!(status["lag_bytes"].as_u64() > Some(0), "no lag during the outage: {status:#}");
        let restart_lsn =
            lsn_to_u64(&cluster.psql("select restart_lsn from pg_replication_slots where slot_name = 'pitr_main'")?);
        let current = cluster.current_lsn()?;
        bench.join().expect("pgbench thread panicked")?;
        Ok((moment, at_moment, archive_end, restart_lsn, current))
    })?;
    // The primary keeps what the archive lacks: the slot was not advanced past the archive's end.
    assert!(current > archive_end, "the workload wrote no WAL during the outage");
    assert!(restart_lsn <= archive_end, "slot restart_lsn {restart_lsn:X} passed the archive's end {archive_end:X}");
    let kept = cluster.psql(&format!(
        "select count(*) from pg_ls_waldir() where name = pg_walfile_name('{}')",
        pitr_tests::u64_to_lsn(restart_lsn)
    ))?;
    assert_eq!(kept, "1", "the segment holding the slot's restart_lsn is gone from pg_wal");
    if let Some(rest) = Duration::from_secs(60).checked_sub(outage.elapsed()) {
        std::thread::sleep(rest);
    }
    s3.start_again()?;

    insert(&cluster, 2001, 100)?;
    let end = cluster.current_lsn()?;
    // The lag recovers: the sidecar reports everything durable, and the repository holds it.
    wait_until("the sidecar to catch up after the outage", Duration::from_secs(180), || {
        Ok(env.sidecar_status()?["durable_lsn"].as_u64().unwrap_or(0) >= end)
    })
    .with_context(|| env.stream_logs())?;
    ensure!(env.archived_lsn()? >= end, "the repository lacks WAL the sidecar reported durable");
    // The whole logs: the message may be more than a tail's length before the end.
    let logs = env.stream_logs_whole();
    // Which the outage meets first depends on timing: a put (retried), or the lease renewal,
    // whose failure pauses the puts until a renewal succeeds (seen once in a full run).
    assert!(
        logs.contains("archive put failed; retrying") || logs.contains("WAL puts are paused until a renewal succeeds"),
        "neither a failed put nor paused puts logged during the outage:\n{}",
        env.stream_logs()
    );
    check_restores(&env, &cluster, &moment, &at_moment)
}

#[test]
fn proxy_cutting_uploads_and_swallowing_replies() -> Result<()> {
    let s3 = S3sFs::start(&["pitr"])?;
    let proxy = FaultyProxy::start(s3.port)?;
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = s3_env("outage-proxy", &cluster, &proxy.endpoint())?;
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert(&cluster, 1, 1000)?;
    cluster.pgbench(&["-i", "-s", "1", "-q"])?;

    // From here the connection of every fifth request breaks: half of those mid-request, half by
    // losing the reply to a request that landed. The backup runs through it too.
    proxy.break_every(5);
    let (moment, at_moment) = std::thread::scope(|scope| -> Result<_> {
        let bench = scope.spawn(|| cluster.pgbench(&["-n", "-c", "2", "-T", "30"]));
        insert(&cluster, 1001, 500)?;
        env.run_ok(&["backup"])?;
        std::thread::sleep(Duration::from_secs(5));
        let moment = cluster.psql("select clock_timestamp()")?;
        let at_moment = cluster.psql(STATE)?;
        std::thread::sleep(Duration::from_millis(1100));
        insert(&cluster, 1501, 500)?;
        bench.join().expect("pgbench thread panicked")?;
        Ok((moment, at_moment))
    })?;
    let end = cluster.current_lsn()?;
    wait_until("the archive to catch up through the faults", Duration::from_secs(180), || {
        Ok(env.archived_lsn()? >= end)
    })
    .with_context(|| env.stream_logs())?;
    proxy.off();
    let stats = &proxy.stats;
    let (cut, swallowed) = (
        stats.cut_requests.load(std::sync::atomic::Ordering::SeqCst),
        stats.swallowed_replies.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert!(cut > 0 && swallowed > 0, "the proxy broke nothing: {cut} requests cut, {swallowed} replies swallowed");
    eprintln!(
        "proxy: {} connections, {} requests, {cut} cut, {swallowed} replies swallowed; sidecar upload errors: {}",
        stats.connections.load(std::sync::atomic::Ordering::SeqCst),
        stats.requests.load(std::sync::atomic::Ordering::SeqCst),
        env.metric("pitr_upload_errors_total")?
    );
    // `verify --deep` opens and authenticates every object: a half-written one would fail.
    check_restores(&env, &cluster, &moment, &at_moment)
}
