//! `cargo run -p pitr-tests --bin demo`: pitr end to end on the embedded default.
//!
//! Starts a throwaway PostgreSQL 15 (as an unprivileged user), creates a local-filesystem
//! repository and key, runs `pitr stream` beside it, takes a base backup, runs a pgbench
//! workload, shows `pitr status` and `pitr list`, proves a fetched segment equals the server's
//! own file, then restores to a moment in the middle of the workload, starts the restored server
//! and prints the RPO/RTO report, and checks the restored data equals what it was at that moment.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{lsn_to_u64, wait_until, PgCluster, PgOptions};

fn step(text: &str) {
    println!("\n==> {text}");
}

fn main() -> Result<()> {
    step("starting a throwaway PostgreSQL 15");
    let cluster = PgCluster::start(PgOptions::new(15))?;
    println!("    port {}, data directory {}", cluster.port, cluster.data_dir.display());

    step("pitr init (local repository, new key file)");
    let mut env = PitrEnv::new("demo", &cluster, "")?;
    print!("{}", env.run_ok(&["init"])?);

    step("pitr stream (the sidecar) in the background");
    let mut stream = env.spawn_stream()?;

    step("pgbench -i -s 5, then pitr backup");
    cluster.pgbench(&["-i", "-s", "5"])?;
    env.share_with_pg_user()?;
    print!("{}", env.run_ok(&["backup"])?);

    step("a workload: 5 s of pgbench, note the moment and the data, 5 s more");
    let state_sql = "select sum(abalance) || ' ' || count(*) from pgbench_accounts";
    let tps = |out: String| out.lines().find(|l| l.starts_with("tps")).map(str::to_string).unwrap_or_default();
    println!("    {}", tps(cluster.pgbench(&["-n", "-c", "4", "-T", "5"])?));
    std::thread::sleep(Duration::from_millis(500));
    let moment = cluster.psql("select clock_timestamp()")?;
    let state_then = cluster.psql(state_sql)?;
    std::thread::sleep(Duration::from_millis(500));
    println!("    moment {moment}: sum(abalance), count(*) = {state_then}");
    println!("    {}", tps(cluster.pgbench(&["-n", "-c", "4", "-T", "5"])?));

    step("pitr status");
    let end = lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    wait_until("the archive to catch up", Duration::from_secs(60), || Ok(env.archived_end(16 << 20)? >= end))?;
    std::thread::sleep(Duration::from_millis(1200));
    print!("{}", env.run_ok(&["status"])?);

    step("select pg_switch_wal(); pitr wal-fetch of the completed segment vs the server's own file");
    cluster.psql("insert into pgbench_history select * from pgbench_history limit 1")?;
    let segment = cluster.psql("select pg_walfile_name(pg_switch_wal())")?;
    wait_until("the segment object", Duration::from_secs(60), || {
        Ok(env.archived_objects()?.get(&segment).is_some_and(|r| r.iter().any(|x| x.1 == u64::MAX)))
    })?;
    let fetched = env.wal_fetch(&segment)?;
    let original = std::fs::read(cluster.wal_dir().join(&segment))?;
    if fetched != original {
        bail!("{segment} differs from the server's file");
    }
    println!("    {segment}: {} bytes, identical to pg_wal/{segment}", fetched.len());

    step("pitr list");
    print!("{}", env.run_ok(&["list"])?);

    step(&format!("pitr restore --to '{moment}' --start (as the database's OS user)"));
    let (restored, out) = env.restore_started(&moment, cluster.bin_dir(), &[])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let restored_state = Command::new(pitr_tests::client_bin("psql"))
        .args(["-X", "-A", "-t", "-h", &restored.target.display().to_string(), "-p", &restored.port.to_string()])
        .args(["-U", "postgres", "-c", state_sql])
        .output()?;
    let restored_state = String::from_utf8_lossy(&restored_state.stdout).trim().to_string();
    println!(
        "    restored data: {restored_state} ({})",
        if restored_state == state_then { "equal to the moment" } else { "DIFFERENT" }
    );
    restored.stop("fast");
    if restored_state != state_then {
        bail!("the restored data differs from the moment's");
    }

    step("stopping the sidecar (SIGTERM: it makes everything received durable first)");
    stream.signal(libc::SIGTERM)?;
    let status = stream.wait_timeout(Duration::from_secs(30))?.context("pitr stream did not stop")?;
    println!("    pitr stream exited with {status}");

    let objects: usize = env.archived_objects()?.values().map(Vec::len).sum();
    let size: u64 = walk_size(env.repo_path())?;
    step("done");
    println!(
        "    repository {} holds {objects} WAL objects, {size} bytes on disk (compressed and encrypted)",
        env.repo_path().display()
    );
    println!(
        "    (the throwaway server stops now; run with PITR_KEEP_TEST_DIRS=1 to keep {} and inspect it with",
        env.dir.path().display()
    );
    println!("     {} --config {} status)", pitr_tests::pitr_bin().display(), env.config.display());
    Ok(())
}

fn walk_size(dir: &std::path::Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() { walk_size(&e.path())? } else { m.len() };
    }
    Ok(total)
}
