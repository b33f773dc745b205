//! Holes are errors: a WAL segment lost from the middle of the archive must fail a restore that
//! needs it (naming it) instead of ending recovery early and reporting success, against a real
//! PostgreSQL 15 and a local repository with a local secondary:
//! - twelve batches of 20 000 rows, a `pg_switch_wal()` after each, the segment of the sixth
//!   deleted from the primary: with the secondary holding a copy but down, `restore --to latest`
//!   fails before writing anything, naming the segment and the secondary, the repository
//!   unchanged; `wal-fetch` of it exits 126; a restore to a moment before the hole, and to the
//!   last moment the error names, are exact; with the secondary up again `latest` is exact;
//! - a gap like the one retention leaves behind a yearly backup: `list` shows two ranges, a
//!   target in the gap is refused before anything is written, and `drill --to random` lands in
//!   a range.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_tests::checks::{assert_untouched, failure_of, snapshot};
use pitr_tests::pitr::{LocalObjects, PitrEnv};
use pitr_tests::{scratch_dir, wait_until, PgCluster, PgOptions};

fn table_state(psql: impl Fn(&str) -> Result<String>) -> Result<String> {
    psql("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t")
}

fn json(out: &str) -> Result<serde_json::Value> {
    serde_json::from_str(out).with_context(|| out.to_string())
}

/// One batch in its own transaction, then the moment just after its commit (the server's clock)
/// and the table's state then.
fn batch(cluster: &PgCluster, i: i32, rows: i32) -> Result<(String, String)> {
    let from = i * rows + 1;
    cluster
        .psql(&format!("insert into t select g, md5(g::text) from generate_series({from}, {}) g", from + rows - 1))?;
    let moment = cluster.psql("select clock_timestamp()")?;
    Ok((moment, table_state(|q| cluster.psql(q))?))
}

fn restore_exact(env: &PitrEnv, cluster: &PgCluster, to: &str, expected: &str) -> Result<serde_json::Value> {
    let (restored, out) = env.restore_started(to, cluster.bin_dir(), &["--json"])?;
    let got = table_state(|q| restored.psql(q))?;
    let report = json(&String::from_utf8_lossy(&out.stdout))?;
    if got != expected {
        bail!("restore to {to}: got {got}, expected {expected}; report {report:#}");
    }
    Ok(report)
}

fn copy_caught_up(env: &PitrEnv, name: &str) -> Result<bool> {
    let s = json(&env.run_ok(&["status", "--json"])?)?;
    let secondaries = s["secondaries"].as_array().cloned().unwrap_or_default();
    let copy = secondaries.iter().find(|c| c["name"] == name).map(|c| c["copy"].clone()).unwrap_or_default();
    Ok(copy["queued_objects"] == 0 && copy["state"] != "retrying" && copy["copied_objects"].as_u64() > Some(0))
}

/// Initialises the repository, starts `pitr stream`, creates the table and takes a first backup.
fn streaming_with_a_backup(env: &mut PitrEnv, cluster: &PgCluster) -> Result<pitr_tests::Child> {
    env.init()?;
    env.share_with_pg_user()?;
    let stream = env.spawn_stream()?;
    env.wait_streaming(cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    env.run_ok(&["backup"])?;
    Ok(stream)
}

#[test]
fn pg15_a_lost_segment_fails_the_restore_by_name_and_a_secondary_fills_it() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("holes", &cluster, "")?;
    let nas = env.dir.path().join("nas");
    let mut text = std::fs::read_to_string(&env.config)?;
    text.push_str(&format!("[[repository.secondary]]\nname = \"nas\"\npath = {:?}\n", nas.display().to_string()));
    std::fs::write(&env.config, text)?;
    let mut stream = streaming_with_a_backup(&mut env, &cluster)?;

    let mut moments = Vec::new();
    let mut segments = Vec::new();
    for i in 0..12 {
        moments.push(batch(&cluster, i, 20_000)?);
        segments.push(cluster.psql("select pg_walfile_name(pg_current_wal_lsn())")?);
        cluster.psql("select pg_switch_wal()")?;
    }
    let last = table_state(|q| cluster.psql(q))?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the batches")?;
    let lost = &segments[5];
    let lost_object = format!("{}{lost}.seg", env.wal_prefix()?);
    wait_until("the sixth batch's segment to be compacted", Duration::from_secs(60), || {
        env.objects().exists(&lost_object)
    })?;
    wait_until("the secondary to catch up", Duration::from_secs(120), || copy_caught_up(&env, "nas"))
        .with_context(|| env.stream_logs())?;
    env.stop_stream(&mut stream)?;
    assert!(LocalObjects::new(&nas).exists(&lost_object)?, "the secondary lacks {lost}");

    // The segment goes from the primary; the secondary holding it is down.
    env.objects().delete(&[lost_object])?;
    let away = env.dir.path().join("nas-away");
    std::fs::rename(&nas, &away)?;
    let repo_before = snapshot(&env.repo);
    let target_root = scratch_dir("hole-restore");
    pitr_tests::chown_to_pg_user(target_root.path())?;
    let target = target_root.path().join("data");
    let target_arg = target.display().to_string();

    let out = env.run_as_pg_user(&["restore", "--to", "latest", "--target-dir", &target_arg])?;
    let (_, message) = failure_of("restore --to latest over a hole", &out, &[lost, "missing", "nas", "last moment"]);
    assert!(!target.exists(), "the failed restore wrote {}", target.display());
    assert_untouched(&env.repo, &repo_before, "a restore refused for a hole");
    // The message names the last moment that restores exactly: restoring to it works.
    let last_exact = message
        .split("the last moment it restores to exactly is ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .map(str::trim)
        .context("no last exact moment in the message")?
        .to_string();

    // PostgreSQL's restore_command: a hole is an error (126), not the end of the archive (1).
    let dest = env.dir.path().join("fetched");
    let out = env.run(&["wal-fetch", lost, &dest.display().to_string()])?;
    let (code, _) = failure_of("wal-fetch of the lost segment", &out, &[lost, "missing from the archive"]);
    assert_eq!(code, 126, "wal-fetch of a hole must abort recovery");
    assert!(!dest.exists());
    let past_end = format!("{}{}", &segments[11][..16], "000000FF");
    let out = env.run(&["wal-fetch", &past_end, &dest.display().to_string()])?;
    assert_eq!(out.status.code(), Some(1), "past the end: {out:?}");
    // Every other way out of wal-fetch is an error for PostgreSQL too, never "not found".
    let out = env.run(&["wal-fetch"])?;
    assert_eq!(out.status.code(), Some(126), "wal-fetch without arguments: {out:?}");
    let out = pitr_tests::checks::run_pitr(&env.dir.path().join("missing.toml"), &["wal-fetch", lost, "x"]);
    assert_eq!(out.status.code(), Some(126), "wal-fetch with a missing config: {out:?}");

    // Before the hole: exact. Batch 4's moment has batch 5's commit after it in held WAL.
    let (moment, state) = &moments[3];
    restore_exact(&env, &cluster, moment, state)?;
    // The last exact moment is batch 5's commit (nothing later is held before the hole).
    let report = restore_exact(&env, &cluster, &last_exact, &moments[4].1)?;
    assert_eq!(report["data_loss_window_seconds"].as_f64(), Some(0.0), "{report:#}");
    assert!(report["recovery_settings"].to_string().contains("--until-lsn"), "{report:#}");
    assert_untouched(&env.repo, &repo_before, "restores before the hole");

    // The secondary is back: its copy fills the hole and `latest` is exact.
    std::fs::rename(&away, &nas)?;
    let report = restore_exact(&env, &cluster, "latest", &last)?;
    assert_eq!(report["data_loss_window_seconds"].as_f64(), Some(0.0), "{report:#}");
    Ok(())
}

/// Deletes the WAL objects of the segments `drop_from..keep_from` (by name) from the repository,
/// as `pitr expire` does for WAL between a kept yearly backup and the PITR window; their names.
fn expire_like_retention(env: &PitrEnv, keep_from: &str, drop_from: &str) -> Result<Vec<String>> {
    let removed: Vec<String> = env
        .wal_objects()?
        .into_iter()
        .filter(|name| !name.ends_with(".history") && name.len() >= 24)
        .filter(|name| (drop_from..keep_from).contains(&&name[..24]))
        .collect();
    env.delete_wal_objects(&removed)?;
    Ok(removed)
}

#[test]
fn pg15_a_retention_gap_is_listed_refused_and_never_drilled() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("gap", &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    // The old backup and a little WAL after it (its own range)...
    let old = json(&env.run_ok(&["backup", "--json"])?)?;
    let (old_moment, old_state) = batch(&cluster, 0, 1000)?;
    batch(&cluster, 1, 1000)?;
    cluster.psql("select pg_switch_wal()")?;
    // ...then WAL retention will drop, with commits in it...
    std::thread::sleep(Duration::from_millis(1500));
    let (gap_moment, _) = batch(&cluster, 2, 1000)?;
    let drop_from = cluster.psql("select pg_walfile_name(pg_current_wal_lsn())")?;
    std::thread::sleep(Duration::from_millis(1500));
    cluster.psql("select pg_switch_wal()")?;
    // ...then the window: a new backup and the workload after it.
    let new = json(&env.run_ok(&["backup", "--json"])?)?;
    let start_lsn = new["start_lsn"].as_str().context("no start_lsn")?.to_string();
    let keep_from = cluster.psql(&format!("select pg_walfile_name('{start_lsn}'::pg_lsn)"))?;
    batch(&cluster, 3, 1000)?;
    let (new_moment, new_state) = batch(&cluster, 4, 1000)?;
    let (_, final_state) = batch(&cluster, 5, 1000)?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the workload")?;
    env.stop_stream(&mut stream)?;
    assert!(drop_from < keep_from, "{drop_from} {keep_from}");
    let removed = expire_like_retention(&env, &keep_from, &drop_from)?;
    assert!(!removed.is_empty());

    // `list` shows the two ranges and the gap between them.
    let list = json(&env.run_ok(&["list", "--json"])?)?;
    let window = &list["recoverable_windows"][0];
    let ranges = window["ranges"].as_array().cloned().unwrap_or_default();
    assert_eq!(ranges.len(), 2, "{list:#}");
    let text = env.run_ok(&["list"])?;
    assert!(text.contains("gap:") && text.contains("cannot be restored"), "{text}");
    let old_listed = list["backups"].as_array().into_iter().flatten().find(|b| b["id"] == old["id"]).cloned();
    assert_eq!(ranges[0]["from"], old_listed.unwrap_or_default()["stop_time"], "{list:#}");

    // A target in the gap is refused before anything is written.
    let repo_before = snapshot(&env.repo);
    let target = scratch_dir("gap-restore");
    let target_dir = target.path().join("data");
    let out = env.run(&["restore", "--to", &gap_moment, "--target-dir", &target_dir.display().to_string()])?;
    failure_of("restore into the gap", &out, &["gap", &drop_from]);
    assert!(!target_dir.exists());
    assert_untouched(&env.repo, &repo_before, "a restore refused for a gap");

    // Both ranges restore exactly.
    restore_exact(&env, &cluster, &old_moment, &old_state)?;
    restore_exact(&env, &cluster, &new_moment, &new_state)?;
    // Exactly the newest commit, the end of the newest range: no later commit exists for
    // PostgreSQL to stop at, and the restore still ends there (a drill drew it once).
    let newest_commit = ranges[1]["to"].as_str().context("no end of the newest range")?;
    restore_exact(&env, &cluster, newest_commit, &final_state)?;

    // Random drills land in a range, never in the gap.
    let in_range = |t: i64| {
        ranges.iter().any(|r| {
            let from = r["from"].as_str().and_then(pitr_restore::target::parse_time).unwrap_or(i64::MAX);
            let to = r["to"].as_str().and_then(pitr_restore::target::parse_time).unwrap_or(i64::MIN);
            from <= t && t <= to
        })
    };
    for _ in 0..2 {
        let out = env.run_as_pg_user(&["drill", "--to", "random", "--json", "--db-user", "postgres"])?;
        let report = json(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
        let drawn = report["target"]
            .as_str()
            .and_then(pitr_restore::target::parse_time)
            .with_context(|| format!("no target time in {report:#}"))?;
        assert!(in_range(drawn), "drill drew {drawn}, outside {ranges:?}");
        assert!(out.status.success(), "drill failed: {report:#}");
    }
    Ok(())
}

/// A moment after the last commit, while the sidecar is caught up: its completeness mark says
/// nothing happened up to then, so the restore is exact with a data-loss window of 0; a moment
/// past the mark is refused naming it. Then the newest WAL is lost from the repository's end:
/// the mark tells that from the end of the archive, and `latest` is refused.
#[test]
fn pg15_a_moment_after_the_last_commit_restores_exactly_inside_the_completeness_mark() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("complete", &cluster, "")?;
    env.edit_config("[metrics]", "complete_interval = \"1s\"\n[metrics]")?;
    let mut stream = streaming_with_a_backup(&mut env, &cluster)?;
    let (_, last_state) = batch(&cluster, 0, 5000)?;
    // 0.7 s after the last write.
    std::thread::sleep(Duration::from_millis(700));
    let after = cluster.psql("select clock_timestamp()")?;
    let after_us = pitr_restore::target::parse_time(&after).context("clock_timestamp")?;
    wait_until("a completeness mark past the moment", Duration::from_secs(60), || {
        let list = json(&env.run_ok(&["list", "--json"])?)?;
        let complete = list["recoverable_windows"][0]["complete_up_to"].as_str().map(String::from);
        Ok(complete.as_deref().and_then(pitr_restore::target::parse_time).is_some_and(|c| c >= after_us))
    })
    .with_context(|| env.stream_logs())?;
    let status = json(&env.run_ok(&["status", "--json"])?)?;
    assert!(status["sidecar"]["complete_up_to"].is_string(), "status does not show the completeness mark: {status:#}");
    env.stop_stream(&mut stream)?;

    let report = restore_exact(&env, &cluster, &after, &last_state)?;
    assert_eq!(report["data_loss_window_seconds"].as_f64(), Some(0.0), "{report:#}");
    assert!(report["recovery_settings"].to_string().contains("--until-lsn"), "{report:#}");
    let out = env.run(&[
        "restore",
        "--to",
        &pitr_restore::format_time(after_us + 3_600_000_000),
        "--target-dir",
        &scratch_dir("late").path().join("data").display().to_string(),
    ])?;
    failure_of("restore past the completeness mark", &out, &["known complete up to"]);

    // The newest segment's objects go: the archive now ends before what the mark vouched for.
    let names: Vec<String> = env.wal_objects()?.into_iter().filter(|n| !n.ends_with(".history")).collect();
    let newest_segment = names.last().map(|n| n[..24].to_string()).context("no WAL")?;
    let newest: Vec<String> = names.into_iter().filter(|n| n.starts_with(&newest_segment)).collect();
    env.delete_wal_objects(&newest)?;
    let repo_before = snapshot(&env.repo);
    let out = env.run(&[
        "restore",
        "--to",
        "latest",
        "--target-dir",
        &scratch_dir("tail").path().join("data").display().to_string(),
    ])?;
    failure_of("restore latest with the tail lost", &out, &["WAL was lost from its end", "completeness mark"]);
    assert_untouched(&env.repo, &repo_before, "restores refused");
    Ok(())
}
