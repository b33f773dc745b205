//! `pitr stream` against real PostgreSQL servers: byte-identical WAL, durability of the reported
//! flush position, kill -9 and primary restarts.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{client_bin, lsn_to_u64, spawn_logged, wait_until, Child, PgCluster, PgOptions};

const SEG: u64 = 16 << 20;

fn start_cluster(major: u32) -> Result<PgCluster> {
    let mut opts = PgOptions::new(major);
    opts.extra_conf.push("max_wal_size = '1GB'".into());
    PgCluster::start(opts)
}

/// pg_receivewal (PostgreSQL 15's client) into `dir` with its own slot, as the reference.
fn spawn_pg_receivewal(cluster: &PgCluster, dir: &std::path::Path) -> Result<Child> {
    std::fs::create_dir_all(dir)?;
    cluster.psql("select pg_create_physical_replication_slot('reference', true)")?;
    let mut cmd = std::process::Command::new(client_bin("pg_receivewal"));
    cmd.args([
        "-D",
        &dir.display().to_string(),
        "-S",
        "reference",
        "-h",
        "127.0.0.1",
        "-p",
        &cluster.port.to_string(),
        "-U",
        "postgres",
        "--synchronous",
        "-n",
    ]);
    spawn_logged(cmd, &dir.with_extension("log"))
}

/// Switches WAL so the current segment completes, and returns the name of the completed segment.
fn switch_wal(cluster: &PgCluster) -> Result<String> {
    // A switch on an idle segment is a no-op; write something first.
    cluster.psql("create table if not exists switch_marker(x int); insert into switch_marker values (1)")?;
    cluster.psql("select pg_walfile_name(pg_switch_wal())")
}

/// Compares every complete segment pg_receivewal wrote with `pitr wal-fetch` of it.
fn compare_with_reference(env: &PitrEnv, reference: &std::path::Path, upto_segment: &str) -> Result<usize> {
    let mut compared = 0;
    let mut names: Vec<String> = std::fs::read_dir(reference)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.len() == 24 && n.as_str() <= upto_segment)
        .collect();
    names.sort();
    let archived = env.archived_objects()?;
    for name in names {
        if !archived.contains_key(&name) {
            // pg_receivewal started a little earlier or later than pitr; only the overlap counts,
            // but there may be no hole inside it (checked below by continuity).
            continue;
        }
        let expected = std::fs::read(reference.join(&name))?;
        let got = env.wal_fetch(&name)?;
        if expected != got {
            let first_diff = expected.iter().zip(&got).position(|(a, b)| a != b);
            bail!("segment {name} differs from pg_receivewal's (first difference at byte {first_diff:?}, lengths {} and {})", expected.len(), got.len());
        }
        compared += 1;
    }
    Ok(compared)
}

/// Every segment from the first archived one to `last` is held (whole or as chunks from 0).
fn assert_continuous(env: &PitrEnv, last: &str) -> Result<()> {
    let archived = env.archived_objects()?;
    let first = archived.keys().next().context("archive is empty")?.clone();
    let tli = &first[..8];
    let a = pitr_tests::pitr::segment_number(&first, SEG);
    let b = pitr_tests::pitr::segment_number(last, SEG);
    for segno in a..=b {
        let name = format!("{tli}{:08X}{:08X}", segno / 256, segno % 256);
        match archived.get(&name) {
            Some(r) if r.iter().any(|&(from, _)| from == 0) => {}
            _ => bail!("gap: segment {name} is missing from the archive (first {first}, last {last})"),
        }
    }
    Ok(())
}

/// Runs pgbench for `secs` in the background; joined by the caller.
fn background_pgbench(cluster: &PgCluster, secs: u32) -> std::thread::JoinHandle<Result<String>> {
    let port = cluster.port;
    std::thread::spawn(move || {
        let out = std::process::Command::new(client_bin("pgbench"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-c",
                "4",
                "-T",
                &secs.to_string(),
                "-n",
                "postgres",
            ])
            .output()?;
        if !out.status.success() {
            bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

#[test]
fn pg15_byte_identical_with_pg_receivewal_and_kill9() -> Result<()> {
    let cluster = start_cluster(15)?;
    let mut env = PitrEnv::new("pg15-identical", &cluster, "")?;
    env.init()?;
    let reference = env.dir.path().join("reference");
    let _receivewal = spawn_pg_receivewal(&cluster, &reference)?;
    let mut stream = env.spawn_stream()?;
    cluster.pgbench(&["-i", "-s", "10"])?;

    // The flush position the primary sees never passes what the archive holds.
    let load = background_pgbench(&cluster, 8);
    let mut samples = 0;
    while !load.is_finished() {
        let flush = cluster
            .psql("select coalesce(flush_lsn, '0/0') from pg_stat_replication where application_name = 'pitr_main'")?;
        if !flush.is_empty() {
            let flush = lsn_to_u64(&flush);
            let archived = env.archived_end(SEG)?;
            assert!(flush <= archived, "primary sees flush {flush:X} but the archive ends at {archived:X}");
            samples += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    load.join().map_err(|_| anyhow::anyhow!("pgbench thread panicked"))??;
    assert!(samples > 20, "only {samples} flush samples");

    // kill -9 in the middle of a workload, then restart.
    let load = background_pgbench(&cluster, 6);
    std::thread::sleep(Duration::from_secs(2));
    stream.kill9();
    std::thread::sleep(Duration::from_secs(1));
    let _stream2 = env.spawn_stream()?;
    load.join().map_err(|_| anyhow::anyhow!("pgbench thread panicked"))??;

    let last = switch_wal(&cluster)?;
    let end = cluster.current_lsn()?;
    env.wait_archived(end - end % SEG, "pitr to archive the switched segment")?;
    wait_until("pg_receivewal to finish the segment", Duration::from_secs(60), || Ok(reference.join(&last).exists()))?;
    let compared = compare_with_reference(&env, &reference, &last)?;
    assert!(compared >= 8, "only {compared} segments compared");
    assert_continuous(&env, &last)?;
    Ok(())
}

#[test]
fn pg17_matches_server_wal_across_primary_restarts() -> Result<()> {
    matches_server_wal_across_primary_restarts(17)
}

#[test]
fn pg14_matches_server_wal_across_primary_restarts() -> Result<()> {
    matches_server_wal_across_primary_restarts(14)
}

#[test]
fn pg16_matches_server_wal_across_primary_restarts() -> Result<()> {
    matches_server_wal_across_primary_restarts(16)
}

#[test]
fn pg18_matches_server_wal_across_primary_restarts() -> Result<()> {
    matches_server_wal_across_primary_restarts(18)
}

fn matches_server_wal_across_primary_restarts(major: u32) -> Result<()> {
    let cluster = start_cluster(major)?;
    // Keeps every segment in pg_wal so the server's own files can serve as the reference.
    cluster.psql("select pg_create_physical_replication_slot('pin', true)")?;
    let mut env = PitrEnv::new(&format!("pg{major}-restarts"), &cluster, "")?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    cluster.pgbench(&["-i", "-s", "5"])?;
    for mode in ["fast", "immediate"] {
        let before = cluster.current_lsn()?;
        env.wait_archived(before, "pitr to catch up before the restart")?;
        cluster.restart(mode)?;
        cluster.pgbench(&["-n", "-c", "2", "-t", "2000"])?;
        let after = cluster.current_lsn()?;
        env.wait_archived(after, &format!("pitr to resume after a {mode} restart"))?;
    }
    let last = switch_wal(&cluster)?;
    let end = cluster.current_lsn()?;
    env.wait_archived(end - end % SEG, "pitr to archive the switched segment")?;
    let compared = env.compare_with_pg_wal(&cluster.wal_dir(), &last)?;
    assert!(compared >= 4, "only {compared} segments compared");
    assert_continuous(&env, &last)?;
    let logs = env.stream_logs();
    assert!(logs.contains("reconnecting"), "the sidecar never noticed the restarts:\n{logs}");
    Ok(())
}

#[test]
fn pg15_follows_a_promoted_standby_onto_the_new_timeline() -> Result<()> {
    let primary = start_cluster(15)?;
    primary.psql("create table t(x int); insert into t select generate_series(1, 1000)")?;
    // A streaming standby made with pg_basebackup -R; its postgresql.conf (max_wal_size included) is the
    // primary's.
    let (_standby_dir, standby) = pitr_tests::standby_of(&primary)?;

    // Both hosts in the conninfo; the sidecar must pick whichever is read-write.
    let mut env = PitrEnv::new("pg15-failover", &primary, "")?;
    env.connect_to_read_write(&primary, &standby)?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    primary.pgbench(&["-i", "-s", "2"])?;
    let before = primary.current_lsn()?;
    env.wait_archived(before, "pitr to archive timeline 1")?;
    standby.wait_replayed(before)?;

    primary.stop("immediate")?;
    standby.promote()?;
    standby.psql("select pg_create_physical_replication_slot('pin', true)")?;
    standby.pgbench(&["-n", "-c", "2", "-t", "1000"])?;
    let last = switch_wal(&standby)?;
    assert!(last.starts_with("00000002"), "expected timeline 2, got {last}");
    let end = standby.current_lsn()?;
    wait_until("pitr to archive timeline 2", Duration::from_secs(90), || {
        Ok(env.archived_objects()?.get(&last).is_some_and(|r| r.iter().any(|x| x.1 == u64::MAX)))
    })
    .with_context(|| env.stream_logs())?;
    assert!(env.wal_objects()?.iter().any(|n| n == "00000002.history"), "history file not stored");
    let history = env.wal_fetch("00000002.history")?;
    assert_eq!(history, std::fs::read(standby.wal_dir().join("00000002.history"))?);
    let compared = env.compare_with_pg_wal(&standby.wal_dir(), &last)?;
    assert!(compared >= 1, "no timeline-2 segment compared");
    assert!(end > 0);
    Ok(())
}

/// `pitr stream` as a second sidecar for `env`'s cluster and repository: another host, its own slot.
fn other_sidecar(env: &PitrEnv) -> std::process::Command {
    let mut cmd = env.command(&["stream"]);
    cmd.env("PITR_STREAM_LEASE_HOLDER", "other-host/pitr_b")
        .env("PITR_POSTGRES_SLOT", "pitr_b")
        .env("PITR_METRICS_LISTEN", "")
        .env("PITR_STREAM_STATUS_FILE", env.dir.path().join("other-status.json"));
    cmd
}

#[test]
fn pg15_one_writer_per_cluster_lease() -> Result<()> {
    let cluster = start_cluster(15)?;
    let mut env = PitrEnv::new("pg15-lease", &cluster, "")?;
    env.init()?;
    let mut first = env.spawn_stream()?;
    cluster.psql("create table t(x int); insert into t values (1)")?;
    let lsn = cluster.current_lsn()?;
    env.wait_archived(lsn, "the first sidecar to archive")?;

    // A second sidecar (another host, its own slot) for the same cluster and repository is refused.
    let out = other_sidecar(&env).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second writer was allowed: {stderr}");
    assert!(stderr.contains("is being written by") && stderr.contains("/pitr_main"), "{stderr}");
    // Refused before it created its slot: nothing of it holds WAL on the primary.
    let slots = cluster.psql("select count(*) from pg_replication_slots where slot_name = 'pitr_b'")?;
    assert_eq!(slots.trim(), "0", "the refused sidecar left its replication slot behind");

    // The first sidecar, killed and restarted on the same host, takes its own lease back at once.
    first.kill9();
    let mut first_again = env.spawn_stream()?;
    cluster.psql("insert into t values (2)")?;
    let lsn = cluster.current_lsn()?;
    env.wait_archived(lsn, "the restarted sidecar to archive")?;

    // A clean stop releases the lease: the other sidecar may start now.
    first_again.signal(libc::SIGTERM)?;
    first_again.wait_timeout(Duration::from_secs(30))?.context("pitr stream did not stop")?;
    let log = env.dir.path().join("other.log");
    let mut other = spawn_logged(other_sidecar(&env), &log)?;
    wait_until("the other sidecar to stream", Duration::from_secs(30), || {
        Ok(std::fs::read_to_string(&log)?.contains("starting replication"))
    })?;
    assert!(other.is_running(), "{}", std::fs::read_to_string(&log)?);
    Ok(())
}

/// With pitr as the synchronous standby, a commit returns only once its WAL is in the archive:
/// right after each commit, the archive (read from object names) already holds it. RPO 0.
#[test]
fn pg15_synchronous_commit_waits_for_the_archive() -> Result<()> {
    let cluster = start_cluster(15)?;
    let mut env = PitrEnv::new("pg15-sync", &cluster, "")?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    cluster.psql("create table t(x int)")?;
    wait_until("pitr to stream", Duration::from_secs(30), || {
        Ok(cluster.psql("select count(*) from pg_stat_replication where application_name = 'pitr_main'")? == "1")
    })?;
    // flush_interval is "auto" by default: spaced (2 ms locally) while the primary does not wait
    // for the sidecar.
    wait_for_spacing(&env, Some(false), 0.002)?;
    // Lower case on the server, a name in the list: PostgreSQL matches application names
    // case-insensitively, and so must the sidecar.
    cluster.psql("alter system set synchronous_standby_names = 'FIRST 1 (replica_elsewhere, PITR_MAIN)'")?;
    cluster.psql("select pg_reload_conf()")?;
    wait_until("pitr to be the synchronous standby", Duration::from_secs(30), || {
        Ok(cluster.psql("select sync_state from pg_stat_replication where application_name = 'pitr_main'")? == "sync")
    })?;
    // A reload, not a reconnect: the sidecar learns it from its watch and stops spacing puts.
    wait_for_spacing(&env, Some(true), 0.0)?;
    assert_eq!(env.metric("pitr_wal_synchronous_standby")?, 1.0);
    assert_eq!(env.metric("pitr_wal_flush_interval_seconds")?, 0.0);
    let status = env.run_ok(&["status"])?;
    assert!(
        status.contains("sidecar WAL puts:       back to back (synchronous_standby_names names this sidecar"),
        "{status}"
    );
    for i in 0..20 {
        // The insert position before the commit record: the commit ends after it.
        let before_commit =
            cluster.psql(&format!("begin; insert into t values ({i}); select pg_current_wal_insert_lsn(); commit;"))?;
        let before_commit = lsn_to_u64(before_commit.lines().next().context("no LSN")?);
        let archived = env.archived_end(SEG)?;
        assert!(archived > before_commit, "commit {i} returned before the archive held it: archive ends at {archived:X}, commit after {before_commit:X}");
    }
    // Named no more: spaced again.
    cluster.psql("alter system set synchronous_standby_names = 'replica_elsewhere'")?;
    cluster.psql("select pg_reload_conf()")?;
    wait_for_spacing(&env, Some(false), 0.002)?;
    assert_eq!(env.metric("pitr_wal_synchronous_standby")?, 0.0);
    let status: serde_json::Value = serde_json::from_str(&env.run_ok(&["status", "--json"])?)?;
    assert_eq!(status["sidecar"]["synchronous_standby"], false, "{status}");
    assert_eq!(status["sidecar"]["flush_interval_seconds"], 0.002, "{status}");
    let log = env.stream_logs_whole();
    assert!(log.contains("synchronous_standby_names names this sidecar"), "{log}");
    Ok(())
}

/// Waits until the sidecar's status file shows `synchronous` and a put spacing of `seconds`.
fn wait_for_spacing(env: &PitrEnv, synchronous: Option<bool>, seconds: f64) -> Result<()> {
    let mut seen = serde_json::Value::Null;
    wait_until(
        &format!("the sidecar to show synchronous_standby {synchronous:?}, spacing {seconds} s"),
        Duration::from_secs(30),
        || {
            let s = env.sidecar_status()?;
            let shown = (s["synchronous_standby"].as_bool(), s["flush_interval_seconds"].as_f64());
            seen = s;
            Ok(shown == (synchronous, Some(seconds)))
        },
    )
    .with_context(|| format!("last status: {seen}\n{}", env.stream_logs()))
}

/// Where the sidecar cannot read `synchronous_standby_names` (pg_hba admits its role only for
/// replication), `auto` does not guess: no spacing, as for a synchronous standby, and a warning.
/// Streaming is not disturbed; once the setting can be read, the spacing comes back.
#[test]
fn pg15_auto_spacing_is_off_while_the_primary_cannot_be_asked() -> Result<()> {
    let mut opts = PgOptions::new(15);
    opts.hba.push("host all replicator 127.0.0.1/32 reject".into());
    let cluster = PgCluster::start(opts)?;
    cluster.psql("create role replicator login replication")?;
    let mut env = PitrEnv::new("pg15-auto-unreadable", &cluster, "")?;
    let text = std::fs::read_to_string(&env.config)?;
    std::fs::write(&env.config, text.replace("user=postgres", "user=replicator"))?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    wait_until("the watch's warning", Duration::from_secs(30), || {
        Ok(env.stream_logs_whole().contains("cannot tell whether the primary waits for this sidecar"))
    })
    .with_context(|| env.stream_logs())?;
    wait_for_spacing(&env, None, 0.0)?;
    // Streaming goes on meanwhile.
    cluster.psql("create table t as select 1 as x")?;
    let lsn = cluster.current_lsn()?;
    env.wait_archived(lsn, "WAL while the setting is unreadable")?;
    // Admitted: the watch reads it and spaces puts again.
    let hba = cluster.data_dir.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba)?;
    std::fs::write(&hba, text.replace("host all replicator 127.0.0.1/32 reject", ""))?;
    cluster.psql("select pg_reload_conf()")?;
    wait_for_spacing(&env, Some(false), 0.002)?;
    assert!(env.stream_logs_whole().contains("synchronous_standby_names readable again"));
    env.stop_stream(&mut stream)?;
    Ok(())
}
