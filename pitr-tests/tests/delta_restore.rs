//! `pitr restore --delta` against a real PostgreSQL 15: a primary stopped after more writes is
//! restored into its own data directory to a moment after its backup, writing far fewer bytes
//! than a full restore, leaving exactly the files a plain restore to that moment writes (what
//! the backup lacks, planted before, gone; a link's target untouched), and recovers to exactly
//! that moment; a delta restore killed half-way
//! leaves a directory PostgreSQL refuses to start from, and the same command run again
//! completes it; the directory then comes back once more as a standby of the archive
//! (`--delta --standby`). A running server's directory, a directory that is not a data
//! directory and another cluster's are refused, nothing in them changed.

use std::time::Duration;

use anyhow::{Context, Result};
use std::path::Path;

use pitr_tests::checks::{assert_untouched, differences, expect_failure, snapshot};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{as_pg_user, chown_to_pg_user, scratch_dir, spawn_logged, wait_until, PgCluster, PgOptions};

fn table_state(cluster: &PgCluster, table: &str) -> Result<String> {
    cluster.psql(&format!(
        "select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from {table}"
    ))
}

/// The `delta` part of a restore report, and its bytes written.
fn delta_of(report: &serde_json::Value) -> Result<(serde_json::Value, u64)> {
    let delta = report["delta"].clone();
    let written = delta["bytes_written"].as_u64().with_context(|| format!("no delta in the report: {report:#}"))?;
    Ok((delta, written))
}

#[test]
fn pg15_delta_restore_writes_only_what_differs_survives_a_kill_and_makes_a_standby() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    // `still` never changes after the backup: its bytes are what a delta restore skips. Frozen
    // and left alone by autovacuum, so that no later vacuum or hint bit changes its pages.
    cluster.psql("create table still (id int primary key, v text) with (autovacuum_enabled = off)")?;
    cluster.psql("insert into still select g, md5(g::text) from generate_series(1, 100000) g")?;
    cluster.psql("vacuum (freeze) still")?;
    let still_rel = cluster.psql("select pg_relation_filepath('still')")?;
    cluster.psql("create table t (id int primary key, v text)")?;
    cluster.psql("insert into t select g, md5(g::text) from generate_series(1, 60000) g")?;
    let mut env = PitrEnv::new("pg15-delta", &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    env.run_ok(&["backup"])?;
    // t's file as the backup has it: a delta restore cuts it back to this size before it fetches.
    let t_file = cluster.data_dir.join(cluster.psql("select pg_relation_filepath('t')")?);
    let t_backed_up: u64 = cluster.psql("select pg_relation_size('t')")?.parse()?;

    // The moment restored to: after the backup and a few more rows.
    cluster.psql("insert into t select g, 'after the backup' from generate_series(60001, 61000) g")?;
    let at_target = table_state(&cluster, "t")?;
    let target =
        cluster.psql("select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")?;
    std::thread::sleep(Duration::from_millis(50));
    // After it: every page of t changes, a table comes.
    cluster.psql("update t set v = md5(v)")?;
    cluster.psql("create table later as select 1 as id, 'later'::text as v")?;
    let at_end = table_state(&cluster, "t")?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold every write")?;
    let data = cluster.data_dir.clone();
    let data_arg = data.display().to_string();
    let delta_args = ["restore", "--delta", "--to", target.as_str(), "--target-dir", data_arg.as_str(), "--json"];

    // Refused, one error each, nothing changed: the running primary's own directory…
    expect_failure(&env.config, &delta_args, &["in use", &data_arg]);
    assert!(data.join("global/pg_control").exists() && !data.join("pitr-delta-in-progress").exists());
    // … a directory that is not a data directory …
    let other = scratch_dir("not-a-cluster");
    std::fs::write(other.path().join("notes.txt"), b"mine")?;
    let other_arg = other.path().display().to_string();
    let before = snapshot(other.path());
    expect_failure(
        &env.config,
        &["restore", "--delta", "--to", &target, "--target-dir", &other_arg],
        &["no PG_VERSION", "not a PostgreSQL data directory", "nothing was changed"],
    );
    assert_untouched(other.path(), &before, "--delta into a directory that is not a cluster's");
    // … another cluster's (stopped) …
    let stranger = PgCluster::start(PgOptions::new(15))?;
    stranger.stop("fast")?;
    let stranger_arg = stranger.data_dir.display().to_string();
    let before = snapshot(&stranger.data_dir);
    expect_failure(
        &env.config,
        &["restore", "--delta", "--to", &target, "--target-dir", &stranger_arg],
        &["another cluster", "system identifier", "nothing was changed"],
    );
    assert_untouched(&stranger.data_dir, &before, "--delta into another cluster's directory");
    // … and a table restore.
    expect_failure(
        &env.config,
        &["restore", "--delta", "--to", &target, "--table", "public.t", "--into", &cluster.conninfo("postgres")],
        &["--delta", "--table"],
    );

    // What a full restore writes, for comparison: --delta into a missing directory is one.
    let full_dir = scratch_dir("full");
    let full_arg = full_dir.path().join("data").display().to_string();
    let full: serde_json::Value = serde_json::from_str(&env.run_ok(&[
        "restore",
        "--delta",
        "--to",
        &target,
        "--target-dir",
        &full_arg,
        "--json",
    ])?)?;
    let full_bytes = full["bytes_restored"].as_u64().with_context(|| format!("{full:#}"))?;
    assert!(full["delta"].is_null(), "{full:#}");

    // The primary fails; its directory is restored in place, slowly enough to be killed.
    cluster.stop("fast")?;
    env.stop_stream(&mut stream)?;
    // Things the backup lacks are planted first: a replication slot, a segment and a fork of a
    // relation, a relation cache file, and base/1 (template1) moved out and a link left in its
    // place, whose target a restore must never write to.
    std::fs::create_dir_all(data.join("pg_replslot/planted"))?;
    std::fs::write(data.join("pg_replslot/planted/state"), b"a slot the backup lacks")?;
    std::fs::write(data.join(format!("{still_rel}.1")), b"a segment the backup lacks")?;
    std::fs::write(data.join(format!("{still_rel}_init")), b"a fork the backup lacks")?;
    let db_dir = data.join(&still_rel).parent().context("a relation path has a parent")?.to_path_buf();
    std::fs::write(db_dir.join("pg_internal.init"), b"a relation cache file")?;
    let outside = scratch_dir("delta-outside");
    let moved = outside.path().join("1");
    std::fs::rename(data.join("base/1"), &moved)?;
    std::os::unix::fs::symlink(&moved, data.join("base/1"))?;
    chown_to_pg_user(&data)?;
    let outside_before = snapshot(outside.path());
    env.edit_config("[encryption]\n", "max_download_rate = \"1MiB/s\"\n[encryption]\n")?;
    let mut cmd = env.command(&delta_args);
    as_pg_user(&mut cmd);
    let mut killed = spawn_logged(cmd, &env.dir.path().join("killed-delta.log"))?;
    wait_until("the delta restore to compare t and begin fetching", Duration::from_secs(60), || {
        Ok(data.join("pitr-delta-in-progress").exists() && std::fs::metadata(&t_file)?.len() == t_backed_up)
    })?;
    // Into the fetching: several MB at 1 MiB/s.
    std::thread::sleep(Duration::from_secs(1));
    assert!(killed.is_running(), "the delta restore finished before it could be killed: make it slower");
    killed.kill9();
    assert!(data.join("pitr-delta-in-progress").exists());
    let start = cluster.start_again();
    assert!(start.is_err(), "PostgreSQL started from a half-done delta restore");
    assert!(cluster.log_tail().contains("global/pg_control"), "{}", cluster.log_tail());

    // The same command again completes it.
    env.edit_config("max_download_rate = \"1MiB/s\"\n", "")?;
    let (ok, report) = env.run_json_as_pg_user(&delta_args)?;
    assert!(ok, "the delta restore run again failed: {report:#}");
    let (delta, written) = delta_of(&report)?;
    assert_eq!(delta["resumed"], true, "{report:#}");
    assert!(delta["bytes_unchanged"].as_u64() > Some(0) && delta["files_unchanged"].as_u64() > Some(0), "{report:#}");
    println!("bytes written: full restore {full_bytes}, delta restore {written} (after the kill: {delta})");
    assert!(written < full_bytes, "a delta restore wrote {written} bytes, a full one {full_bytes}");
    assert!(!data.join("pitr-delta-in-progress").exists());
    assert_untouched(outside.path(), &outside_before, "a delta restore over a link base/1 leading there");
    // The directory is what the plain restore to the same moment wrote: the same paths, kinds
    // and contents (before any server starts and writes its own), the planted things gone; only
    // postmaster.opts, which the stopped server left and a restore keeps, is extra.
    let mut restored = snapshot(&data);
    assert!(restored.remove(Path::new("postmaster.opts")).is_some());
    let diffs = differences(&snapshot(Path::new(&full_arg)), &restored);
    assert!(diffs.is_empty(), "the delta restore differs from a plain restore:\n  {}", diffs.join("\n  "));
    for (file, present) in [("recovery.signal", true), ("standby.signal", false), ("backup_label", true)] {
        assert_eq!(data.join(file).exists(), present, "{file}");
    }
    let conf = std::fs::read_to_string(data.join("postgresql.auto.conf"))?;
    assert_eq!(conf.matches("# Added by pitr restore").count(), 1, "{conf}");
    assert!(conf.contains("recovery_target_time"), "{conf}");

    // It recovers to exactly the moment.
    cluster.start_again()?;
    wait_until("recovery to the target", Duration::from_secs(120), || {
        Ok(cluster.psql("select pg_is_in_recovery()")? == "f")
    })
    .with_context(|| cluster.log_tail())?;
    assert_eq!(table_state(&cluster, "t")?, at_target);
    assert_eq!(cluster.psql("select count(*) from pg_class where relname = 'later'")?, "0");

    // Once more, as a standby of the archive (`--start`: run until it takes read-only
    // connections): it replays every write the primary made.
    cluster.stop("fast")?;
    let port = cluster.port.to_string();
    let (ok, report) = env.run_json_as_pg_user(&[
        "restore",
        "--delta",
        "--standby",
        "--target-dir",
        &data_arg,
        "--start",
        "--port",
        &port,
        "--db-user",
        "postgres",
        "--timeout",
        "120s",
        "--json",
    ])?;
    assert!(ok, "--delta --standby --start failed: {report:#}");
    assert_eq!((&report["standby"], &report["started"]), (&true.into(), &true.into()), "{report:#}");
    let (delta, written) = delta_of(&report)?;
    println!("bytes written: delta restore as a standby {written} ({delta})");
    // A clean run over a directory that recovered to a moment shortly after the backup: a
    // small part of a full restore, and nothing of the table unchanged since the backup.
    assert!(written < full_bytes / 4, "a delta restore wrote {written} bytes, a full one {full_bytes}: {report:#}");
    let written_files = delta["written"].as_object().with_context(|| format!("no written files: {report:#}"))?;
    assert!(!written_files.contains_key(&still_rel), "{still_rel} (still) was written: {report:#}");
    assert!(written_files.contains_key("global/pg_control"), "{report:#}");
    assert!(data.join("standby.signal").exists() && !data.join("recovery.signal").exists());
    wait_until("the standby to replay the archive", Duration::from_secs(120), || {
        Ok(table_state(&cluster, "t")? == at_end)
    })
    .with_context(|| std::fs::read_to_string(data.join("pitr-restore-server.log")).unwrap_or_default())?;
    assert_eq!(cluster.psql("select pg_is_in_recovery()")?, "t");
    assert_eq!(table_state(&cluster, "later")?, format!("1 {}", cluster.psql("select md5('1:later')")?));

    // The text report says what was skipped.
    cluster.stop("fast")?;
    let out = env.run_as_pg_user(&["restore", "--delta", "--standby", "--target-dir", &data_arg])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for line in ["delta, written:", "delta, unchanged:", "bytes skipped", "delta, fetched:", "delta, removed:"] {
        assert!(text.contains(line), "{line:?} is not in the report:\n{text}");
    }
    println!("{text}");
    Ok(())
}

/// PostgreSQL 17, a full backup and an incremental on it: a delta restore of the stopped
/// primary combines the chain in place, skipping by hash what the full backup holds and the
/// directory has (a table unchanged since is neither fetched nor written), and leaves exactly
/// the directory a plain restore of the chain writes.
#[test]
fn pg17_delta_restore_of_an_incremental_chain_skips_what_the_full_backup_holds_unchanged() -> Result<()> {
    let mut opts = PgOptions::new(17);
    opts.extra_conf.push("summarize_wal = on".into());
    let cluster = PgCluster::start(opts)?;
    cluster.psql("create table still (id int primary key, v text) with (autovacuum_enabled = off)")?;
    cluster.psql("insert into still select g, md5(g::text) from generate_series(1, 100000) g")?;
    cluster.psql("vacuum (freeze) still")?;
    let still_rel = cluster.psql("select pg_relation_filepath('still')")?;
    cluster.psql("create table t (id int primary key, v text)")?;
    cluster.psql("insert into t select g, md5(g::text) from generate_series(1, 20000) g")?;
    let mut env = PitrEnv::new("pg17-delta", &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    env.run_ok(&["backup"])?;
    cluster.psql("update t set v = 'changed' where id % 100 = 0")?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the update")?;
    let incremental: serde_json::Value = serde_json::from_str(&env.run_ok(&["backup", "--incremental", "--json"])?)?;
    assert_eq!(incremental["kind"], "incremental", "{incremental:#}");
    cluster.psql("insert into t select g, 'after the incremental' from generate_series(20001, 20100) g")?;
    let at_target = table_state(&cluster, "t")?;
    let target =
        cluster.psql("select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")?;
    std::thread::sleep(Duration::from_millis(50));
    cluster.psql("update t set v = md5(v)")?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold every write")?;

    let full_dir = scratch_dir("pg17-full");
    let full_arg = full_dir.path().join("data").display().to_string();
    let full: serde_json::Value =
        serde_json::from_str(&env.run_ok(&["restore", "--to", &target, "--target-dir", &full_arg, "--json"])?)?;
    assert_eq!(full["backup_chain"].as_array().map(Vec::len), Some(2), "{full:#}");
    let full_bytes = full["bytes_restored"].as_u64().with_context(|| format!("{full:#}"))?;

    cluster.stop("fast")?;
    env.stop_stream(&mut stream)?;
    let data = cluster.data_dir.clone();
    let data_arg = data.display().to_string();
    let (ok, report) =
        env.run_json_as_pg_user(&["restore", "--delta", "--to", &target, "--target-dir", &data_arg, "--json"])?;
    assert!(ok, "the delta restore failed: {report:#}");
    assert_eq!(report["backup_chain"].as_array().map(Vec::len), Some(2), "{report:#}");
    let (delta, written) = delta_of(&report)?;
    let fetched = delta["bytes_fetched"].as_u64().with_context(|| format!("{report:#}"))?;
    println!("PG17 chain: full restore {full_bytes} bytes, delta restore fetched {fetched}, wrote {written} ({delta})");
    assert!(fetched < full_bytes / 4, "fetched {fetched} of a full restore's {full_bytes}: {report:#}");
    let written_files = delta["written"].as_object().with_context(|| format!("no written files: {report:#}"))?;
    assert!(!written_files.contains_key(&still_rel), "{still_rel} (still) was written: {report:#}");

    let mut restored = snapshot(&data);
    assert!(restored.remove(Path::new("postmaster.opts")).is_some());
    let diffs = differences(&snapshot(Path::new(&full_arg)), &restored);
    assert!(diffs.is_empty(), "the delta restore differs from a plain restore:\n  {}", diffs.join("\n  "));
    cluster.start_again()?;
    wait_until("recovery to the target", Duration::from_secs(120), || {
        Ok(cluster.psql("select pg_is_in_recovery()")? == "f")
    })
    .with_context(|| cluster.log_tail())?;
    assert_eq!(table_state(&cluster, "t")?, at_target);
    Ok(())
}
