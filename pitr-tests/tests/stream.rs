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
    cmd.args(["-D", &dir.display().to_string(), "-S", "reference", "-h", "127.0.0.1", "-p", &cluster.port.to_string(), "-U", "postgres", "--synchronous", "-n"]);
    spawn_logged(cmd, &dir.with_extension("log"))
}

fn current_lsn(cluster: &PgCluster) -> Result<u64> {
    Ok(lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?))
}

/// Switches WAL so the current segment completes, and returns the name of the completed segment.
fn switch_wal(cluster: &PgCluster) -> Result<String> {
    // A switch on an idle segment is a no-op; write something first.
    cluster.psql("create table if not exists switch_marker(x int); insert into switch_marker values (1)")?;
    Ok(cluster.psql("select pg_walfile_name(pg_switch_wal())")?)
}

fn wait_archived(env: &PitrEnv, lsn: u64, what: &str) -> Result<()> {
    wait_until(what, Duration::from_secs(60), || Ok(env.archived_end(SEG)? >= lsn))
        .with_context(|| env.stream_logs())
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
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-c", "4", "-T", &secs.to_string(), "-n", "postgres"])
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
        let flush = cluster.psql("select coalesce(flush_lsn, '0/0') from pg_stat_replication where application_name = 'pitr_main'")?;
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
    let end = current_lsn(&cluster)?;
    wait_archived(&env, end - end % SEG, "pitr to archive the switched segment")?;
    wait_until("pg_receivewal to finish the segment", Duration::from_secs(60), || Ok(reference.join(&last).exists()))?;
    let compared = compare_with_reference(&env, &reference, &last)?;
    assert!(compared >= 8, "only {compared} segments compared");
    assert_continuous(&env, &last)?;
    Ok(())
}
