//! `pitr verify` on a healthy and on damaged archives, and `pitr drill` end to end.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{wait_until, PgCluster, PgOptions};

const SEG: u64 = 16 << 20;

fn verify(env: &PitrEnv, deep: bool) -> Result<(bool, serde_json::Value)> {
    let mut args = vec!["verify", "--json"];
    if deep {
        args.push("--deep");
    }
    let out = env.run(&args)?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))?;
    assert_eq!(
        out.status.success(),
        report["ok"].as_bool().unwrap_or(false),
        "exit status and report disagree: {report}"
    );
    Ok((out.status.success(), report))
}

/// Asserts one finding of `kind` naming `object`, while it is damaged; then puts it back as it was.
fn expect_finding(
    env: &PitrEnv,
    object: &str,
    deep: bool,
    kind: &str,
    damage: impl FnOnce(&str) -> Result<()>,
) -> Result<()> {
    let saved = env.objects().read(object)?;
    damage(object)?;
    let (ok, report) = verify(env, deep)?;
    env.objects().replace(object, saved)?;
    assert!(!ok, "verify passed with {object} damaged");
    let findings = report["findings"].as_array().context("findings")?;
    assert!(
        findings.iter().any(|f| f["kind"] == kind && f["object"].as_str() == Some(object)),
        "no {kind} finding naming {object}: {report:#}"
    );
    Ok(())
}

/// `pitr drill --to <to> --checks <checks> --json --db-user postgres <extra>` as the server user:
/// whether it exited 0, and its JSON report.
fn drill(env: &PitrEnv, to: &str, checks: &Path, extra: &[&str]) -> Result<(bool, serde_json::Value)> {
    let checks = checks.display().to_string();
    let mut args = vec!["drill", "--to", to, "--checks", &checks, "--json", "--db-user", "postgres"];
    args.extend_from_slice(extra);
    env.run_json_as_pg_user(&args)
}

#[test]
fn pg15_verify_names_gaps_blocks_flipped_bytes_and_missing_history() -> Result<()> {
    let primary = PgCluster::start(PgOptions::new(15))?;
    primary.pgbench(&["-i", "-s", "2"])?;
    let (_standby_dir, standby) = pitr_tests::standby_of(&primary)?;
    let mut env = PitrEnv::new("verify", &primary, "")?;
    env.connect_to_read_write(&primary, &standby)?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    env.run_ok(&["backup"])?;
    for _ in 0..3 {
        primary.pgbench(&["-n", "-t", "500"])?;
        primary.psql("select pg_switch_wal()")?;
    }
    let lsn = primary.current_lsn()?;
    env.wait_archived(lsn, "archive")?;
    standby.wait_replayed(lsn)?;
    primary.stop("fast")?;
    standby.promote()?;
    standby.pgbench(&["-n", "-t", "300"])?;
    standby.psql("select pg_switch_wal()")?;
    let lsn = standby.current_lsn()?;
    wait_until("timeline 2 archived", Duration::from_secs(90), || {
        Ok(env.archived_objects()?.keys().any(|k| k.starts_with("00000002"))
            && env.archived_end(SEG)? >= lsn - lsn % SEG)
    })
    .with_context(|| env.stream_logs())?;

    let (ok, report) = verify(&env, true)?;
    assert!(ok, "healthy archive has findings: {report:#}");
    assert_eq!(report["timelines"], serde_json::json!([1, 2]));

    let wal = env.wal_prefix()?;
    let segments: Vec<String> = env
        .wal_objects()?
        .into_iter()
        .filter(|n| n.ends_with(".seg") && n.starts_with("00000001"))
        .map(|n| format!("{wal}{n}"))
        .collect();
    assert!(segments.len() >= 3, "{segments:?}");
    let middle = segments[segments.len() / 2].clone();
    let remove = |name: &str| env.objects().delete(&[name.to_string()]);
    expect_finding(&env, &middle, false, "wal-gap", remove)?;
    // A store cannot change an object in place: the flipped bytes are put under the same name.
    expect_finding(&env, &middle, true, "corrupt", |name| {
        let mut bytes = env.objects().read(name)?;
        let i = bytes.len() / 2;
        bytes[i] ^= 0x40;
        env.objects().replace(name, bytes)
    })?;
    expect_finding(&env, &format!("{wal}00000002.history"), false, "missing-history", remove)?;
    let blocks = format!("{}blocks/", wal.strip_suffix("wal/").context("WAL prefix")?);
    let some_block = env.objects().list(&blocks)?.into_iter().next().context("no block")?;
    expect_finding(&env, &some_block, false, "missing-block", remove)?;
    let (ok, report) = verify(&env, true)?;
    assert!(ok, "repaired archive still has findings: {report:#}");
    Ok(())
}

#[test]
fn pg15_drill_passes_with_measurements_and_fails_on_a_check_that_cannot_hold() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("drill", &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    cluster.psql("create table users(id int primary key, name text)")?;
    cluster.psql("insert into users select g, 'u' || g from generate_series(1, 100) g")?;
    env.run_ok(&["backup"])?;
    cluster.psql("insert into users select g, 'u' || g from generate_series(101, 200) g")?;
    std::thread::sleep(Duration::from_millis(1100));
    let moment = cluster.psql("select clock_timestamp()")?;
    let recorded = cluster.psql("select count(*) || ':' || sum(id) from users")?;
    std::thread::sleep(Duration::from_millis(1100));
    cluster.psql("insert into users select g, 'u' || g from generate_series(201, 300) g")?;
    env.wait_archived(cluster.current_lsn()?, "archive")?;

    let checks = env.dir.path().join("checks.toml");
    std::fs::write(
        &checks,
        format!(
            "[[check]]\nname = \"users exist\"\nsql = \"select count(*) from users\"\nexpect = \">= 100\"\n\n\
             [[check]]\nname = \"users as recorded on the primary\"\nsql = \"select count(*) || ':' || sum(id) from users\"\n\
             [[check.recorded]]\nat = \"{moment}\"\nvalue = \"{recorded}\"\n"
        ),
    )?;
    pitr_tests::chown_to_pg_user(&checks)?;
    let report_md = env.dir.path().join("report.md");
    let report_arg = report_md.display().to_string();
    let (ok, report) = drill(&env, "random", &checks, &["--report", &report_arg, "--test-type", "Monthly"])?;
    assert!(ok, "random drill did not pass: {report:#}");
    assert_eq!(report["outcome"], "PASS", "{report:#}");
    assert!(report["rto_achieved_seconds"].as_f64().is_some_and(|s| s > 0.0), "{report:#}");
    assert!(report["rpo_achieved_seconds"].as_f64().is_some_and(|s| s >= 0.0), "{report:#}");
    let md = std::fs::read_to_string(&report_md)?;
    for field in [
        "**Date**: 2",
        "**Test Type**: Monthly",
        "**Scenario**: Point-in-time restore",
        "**Start Time**: ",
        "**End Time**: ",
        "**Duration**: ",
        "**Outcome**: PASS",
        "**RTO Achieved**: ",
        "(Target: 30 minutes)",
        "**RPO Achieved**: ",
        "(Target: 5 minutes)",
        "**Data Integrity**: PASS",
        "**Service Availability**: 100 %",
        "## Issues Identified",
        "## Improvements",
        "**Test Lead**: pitr drill",
    ] {
        assert!(md.contains(field), "report lacks {field:?}:\n{md}");
    }
    assert!(
        !md.contains("not measured") && !md.contains("YYYY") && !md.contains("[PASS/FAIL"),
        "unfilled field:\n{md}"
    );
    assert!(env.dir.path().join("report.json").exists());

    // To the recorded moment, the recorded value must come back.
    let (ok, report) = drill(&env, &moment, &checks, &[])?;
    assert!(ok, "{report:#}");
    let recorded_check = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "users as recorded on the primary").cloned());
    assert_eq!(recorded_check.as_ref().map(|c| c["result"].clone()), Some(serde_json::json!("pass")), "{report:#}");

    // A check that cannot hold: FAIL, non-zero exit, the check named in the issues.
    std::fs::write(
        &checks,
        "[[check]]\nname = \"impossible\"\nsql = \"select count(*) from users\"\nexpect = \"> 1000000\"\n",
    )?;
    let (ok, report) = drill(&env, "latest", &checks, &[])?;
    assert!(!ok, "{report:#}");
    assert_eq!(report["outcome"], "FAIL");
    assert!(report["issues"].to_string().contains("impossible"), "{report:#}");
    // Scratch servers are gone.
    assert!(!std::fs::read_dir(std::env::temp_dir())?
        .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("pitr-drill-"))));
    Ok(())
}
