//! The sidecar's /metrics and /healthz against a real PostgreSQL, and its scheduler.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{wait_until, PgCluster, PgOptions};

/// Parses Prometheus text exposition format strictly enough to catch malformed output:
/// every sample belongs to a metric with HELP and TYPE, names and labels are well formed, values
/// are numbers. Returns `series → value`.
fn parse_exposition(text: &str) -> Result<BTreeMap<String, f64>> {
    let mut typed = BTreeMap::new();
    let mut helped = std::collections::BTreeSet::new();
    let mut samples = BTreeMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split_whitespace().next().context("HELP without a name")?;
            helped.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().context("TYPE name")?, parts.next().context("TYPE kind")?);
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                bail!("bad TYPE line {line:?}");
            }
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').with_context(|| format!("sample line {line:?}"))?;
        let value: f64 = value.parse().with_context(|| format!("value in {line:?}"))?;
        let name = series.split('{').next().unwrap_or(series);
        if !valid_name(name) {
            bail!("bad metric name in {line:?}");
        }
        if let Some(labels) = series.strip_prefix(name) {
            let braced = labels.starts_with('{') && labels.ends_with('}');
            if !(labels.is_empty() || braced) {
                bail!("bad labels in {line:?}");
            }
            for pair in labels.trim_matches(|c| c == '{' || c == '}').split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').with_context(|| format!("label {pair:?} in {line:?}"))?;
                let quoted = v.starts_with('"') && v.ends_with('"');
                if !(valid_name(k) && quoted) {
                    bail!("bad label {pair:?} in {line:?}");
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| typed.contains_key(*f))
            .unwrap_or(name);
        if !typed.contains_key(family) || !helped.contains(family) {
            bail!("sample {name} has no TYPE/HELP for {family}");
        }
        samples.insert(series.to_string(), value);
    }
    Ok(samples)
}

fn scrape(env: &PitrEnv) -> Result<BTreeMap<String, f64>> {
    let (code, body) = env.http_get("/metrics")?;
    if code != 200 {
        bail!("/metrics answered {code}");
    }
    parse_exposition(&body).with_context(|| body.clone())
}

fn value(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(f64::NAN)
}

#[test]
fn pg15_metrics_health_and_a_scheduled_backup() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("pg15-metrics", &cluster, "")?;
    // A full backup every 20 s: with no backup in the repository the first runs at start-up.
    env.edit_config("full_backup = \"\"", "full_backup = \"*/20 * * * * *\"")?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    wait_until("/healthz to be 200", Duration::from_secs(30), || {
        Ok(env.http_get("/healthz").map(|r| r.0 == 200).unwrap_or(false))
    })
    .with_context(|| env.stream_logs())?;

    let before = scrape(&env)?;
    assert_eq!(value(&before, "pitr_up"), 1.0);
    let archived_before = value(&before, "pitr_wal_archived_lsn_bytes");
    cluster.pgbench(&["-i", "-s", "3"])?;
    cluster.pgbench(&["-n", "-c", "2", "-T", "3"])?;
    wait_until("the archived LSN to advance and lag to return to 0", Duration::from_secs(30), || {
        let m = scrape(&env)?;
        Ok(value(&m, "pitr_wal_archived_lsn_bytes") > archived_before + 1e6
            && value(&m, "pitr_archive_lag_bytes") == 0.0
            && value(&m, "pitr_archive_lag_seconds") < 1.0)
    })
    .with_context(|| format!("{:?}", scrape(&env)))?;
    let m = scrape(&env)?;
    assert!(value(&m, "pitr_objects_archived_total") > 0.0);
    assert!(m.keys().any(|k| k.starts_with("pitr_upload_duration_seconds_bucket")), "no histogram buckets");

    wait_until("the scheduled backup", Duration::from_secs(90), || {
        let m = scrape(&env)?;
        Ok(value(&m, "backup_success{backup_type=\"full\",source=\"postgres\"}") == 1.0
            && value(&m, "backup_size_bytes{backup_type=\"full\",source=\"postgres\"}") > 1e6)
    })
    .with_context(|| env.stream_logs())?;
    let m = scrape(&env)?;
    assert!(value(&m, "pitr_last_backup_timestamp_seconds{backup_type=\"full\",source=\"postgres\"}") > 1.7e9);

    // Prometheus' own linter agrees the exposition is well formed and well named.
    let (_, body) = env.http_get("/metrics")?;
    let mut promtool = std::process::Command::new(pitr_tests::promtool()?)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut promtool.stdin.take().context("stdin")?, body.as_bytes())?;
    let out = promtool.wait_with_output()?;
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Health follows the primary.
    cluster.stop("fast")?;
    wait_until("/healthz to turn 503", Duration::from_secs(30), || Ok(env.http_get("/healthz")?.0 == 503))?;
    let (_, why) = env.http_get("/healthz")?;
    assert!(why.contains("not streaming"), "{why}");
    cluster.start_again()?;
    wait_until("/healthz to be 200 again", Duration::from_secs(60), || Ok(env.http_get("/healthz")?.0 == 200))
        .with_context(|| env.stream_logs())?;
    Ok(())
}

/// (event, timestamp) of the scheduler's full_backup log lines, in order.
fn schedule_events(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["job"] == "full_backup")
        .filter_map(|v| v["fields"]["event"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn pg15_scheduler_runs_without_overlap_and_catches_up_once() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.pgbench(&["-i", "-s", "1"])?;
    let env = PitrEnv::new("pg15-schedule", &cluster, "")?;
    env.edit_config("full_backup = \"\"", "full_backup = \"*/3 * * * * *\"")?;
    env.init()?;
    let log1 = env.dir.path().join("sched-1.log");
    let mut cmd = env.command(&["--log-format", "json", "stream"]);
    cmd.env("PITR_LOG", "info");
    let mut first = pitr_tests::spawn_logged(cmd, &log1)?;
    wait_until("three scheduled backups", Duration::from_secs(120), || {
        Ok(schedule_events(&std::fs::read_to_string(&log1)?).iter().filter(|e| *e == "end").count() >= 3)
    })?;
    first.kill9();
    let events = schedule_events(&std::fs::read_to_string(&log1)?);
    assert_no_overlap(&events)?;
    assert_eq!(events.first().map(String::as_str), Some("catch-up"), "no start-up run without a backup: {events:?}");

    // Down for several ticks: on restart exactly one catch-up run, then the schedule goes on.
    std::thread::sleep(Duration::from_secs(8));
    let log2 = env.dir.path().join("sched-2.log");
    let mut cmd = env.command(&["--log-format", "json", "stream"]);
    cmd.env("PITR_LOG", "info");
    let _second = pitr_tests::spawn_logged(cmd, &log2)?;
    wait_until("the catch-up and one more run", Duration::from_secs(120), || {
        Ok(schedule_events(&std::fs::read_to_string(&log2)?).iter().filter(|e| *e == "end").count() >= 2)
    })?;
    let events = schedule_events(&std::fs::read_to_string(&log2)?);
    assert_no_overlap(&events)?;
    assert_eq!(events.iter().filter(|e| *e == "catch-up").count(), 1, "{events:?}");
    assert_eq!(events.first().map(String::as_str), Some("catch-up"), "{events:?}");
    let list: serde_json::Value = serde_json::from_str(&env.run_ok(&["list", "--json"])?)?;
    assert!(list["backups"].as_array().map(Vec::len).unwrap_or(0) >= 5, "{list}");
    Ok(())
}

/// Every run's start is followed by its end before the next run starts.
fn assert_no_overlap(events: &[String]) -> Result<()> {
    let mut running = false;
    for e in events {
        match e.as_str() {
            "start" if running => bail!("a run started while another was running: {events:?}"),
            "start" => running = true,
            "end" => running = false,
            _ => {}
        }
    }
    Ok(())
}
