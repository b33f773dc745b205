//! `pitr backup` beside `pg_basebackup -Ft`, and `pitr restore` beside a plain copy, on a pgbench
//! database (default scale 70, about 1 GiB), PostgreSQL 15; replay with and without wal-fetch
//! prefetch; restore with 1 worker and with cores × 2.
//!
//! Run: `cargo build --release -p pitr && PITR_BIN=$PWD/target/release/pitr \
//!       cargo run --release -p pitr-benches --bin backup_restore [-- SCALE]`

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{client_bin, lsn_to_u64, scratch_dir, wait_until, PgCluster, PgOptions};

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn du(path: &std::path::Path) -> Result<u64> {
    let out = Command::new("du").args(["-sb"]).arg(path).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("0").parse()?)
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

fn main() -> Result<()> {
    let scale: u32 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(70);
    let bin = pitr_tests::pitr_bin();
    let mut opts = PgOptions::new(15);
    opts.extra_conf.push("max_wal_size = '4GB'".into());
    let cluster = PgCluster::start(opts)?;
    let mut env = PitrEnv::new("bench-backup", &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    println!("pgbench -i -s {scale} ...");
    cluster.pgbench(&["-i", "-s", &scale.to_string(), "-q"])?;
    cluster.psql("checkpoint")?;
    let db_bytes: u64 = cluster.psql("select sum(pg_database_size(oid)) from pg_database")?.parse()?;
    let lsn = lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    wait_until("the archive to catch up", Duration::from_secs(600), || Ok(env.archived_end(16 << 20)? >= lsn))?;

    // Backups: pg_basebackup -Ft (no WAL: pitr's archive holds the WAL, so compare data transfer), then pitr.
    let bb = scratch_dir("bench-basebackup");
    pitr_tests::chown_to_pg_user(bb.path())?;
    let bb_dir = bb.path().join("tar");
    let (_, bb_secs) = timed(|| {
        let mut c = Command::new(client_bin("pg_basebackup"));
        c.args(["-D", &bb_dir.display().to_string(), "-Ft", "-X", "none", "-c", "fast", "-h", "127.0.0.1"]).args([
            "-p",
            &cluster.port.to_string(),
            "-U",
            "postgres",
        ]);
        pitr_tests::as_pg_user(&mut c);
        run(&mut c)
    })?;
    let bb_size = du(&bb_dir)?;
    let (first, pitr_secs) =
        timed(|| Ok(serde_json::from_str::<serde_json::Value>(&env.run_ok(&["backup", "--json"])?)?))?;
    let (second, pitr2_secs) =
        timed(|| Ok(serde_json::from_str::<serde_json::Value>(&env.run_ok(&["backup", "--json"])?)?))?;

    // Restores: a plain copy of the data directory vs pitr restore (files only, then with --start).
    let copy = scratch_dir("bench-copy");
    let (_, cp_secs) =
        timed(|| run(Command::new("cp").arg("-a").arg(&cluster.data_dir).arg(copy.path().join("data"))))?;
    let restored = scratch_dir("bench-restore");
    pitr_tests::chown_to_pg_user(restored.path())?;
    let target = restored.path().join("data");
    let (report, restore_secs) = timed(|| {
        let out = env.run_as_pg_user(&[
            "restore",
            "--to",
            "latest",
            "--target-dir",
            &target.display().to_string(),
            "--json",
        ])?;
        if !out.status.success() {
            bail!("restore: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?)
    })?;
    let (report2, start_secs) = timed(|| {
        let (server, out) = env.restore_started("latest", cluster.bin_dir(), &["--json"])?;
        server.stop("fast");
        Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?)
    })?;

    // Replay with and without wal-fetch prefetch: WAL from a pgbench run after the backups.
    println!("pgbench -n -c 4 -T 60 (WAL to replay) ...");
    let wal_start = lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    cluster.pgbench(&["-n", "-c", "4", "-T", "60"])?;
    let wal_end = lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    wait_until("the archive to catch up", Duration::from_secs(600), || Ok(env.archived_end(16 << 20)? >= wal_end))?;
    let mut replay = Vec::new();
    for prefetch in [0usize, 8] {
        set_backup_option(&env, "prefetch_segments", prefetch)?;
        let (server, out) = env.restore_started("latest", cluster.bin_dir(), &["--json"])?;
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        replay.push((
            prefetch,
            r["replay_seconds"].as_f64().unwrap_or(0.0),
            r["total_seconds"].as_f64().unwrap_or(0.0),
        ));
        server.stop("fast");
    }

    // Restore (files only) with one worker and with the default (cores × 2).
    let default_workers = std::thread::available_parallelism().map(|n| n.get() * 2).unwrap_or(4);
    let mut by_workers = Vec::new();
    for workers in [1, default_workers] {
        set_backup_option(&env, "parallel", workers)?;
        let dir = scratch_dir("bench-restore-workers");
        pitr_tests::chown_to_pg_user(dir.path())?;
        let target = dir.path().join("data");
        let (_, secs) = timed(|| {
            let out = env.run_as_pg_user(&[
                "restore",
                "--to",
                "latest",
                "--target-dir",
                &target.display().to_string(),
                "--json",
            ])?;
            if !out.status.success() {
                bail!("restore: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        })?;
        by_workers.push((workers, secs));
    }

    let mib = |b: f64| b / 1048576.0;
    let read = first["bytes_read"].as_f64().unwrap_or(0.0);
    println!("\n===== base backup and restore, PostgreSQL 15, pgbench scale {scale} =====");
    println!(
        "machine: nproc={}, pitr binary {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        bin.display()
    );
    println!("database size (pg_database_size, all dbs): {:.0} MiB", mib(db_bytes as f64));
    println!(
        "pg_basebackup -Ft -X none -c fast:  {bb_secs:7.2} s  {:7.1} MiB/s  output {:.0} MiB (uncompressed tar)",
        mib(read) / bb_secs,
        mib(bb_size as f64)
    );
    println!("pitr backup (first, empty repo):    {pitr_secs:7.2} s  {:7.1} MiB/s  stored {:.0} MiB (zstd+AES, dedup)  ratio vs pg_basebackup time {:.2}",
        mib(read) / pitr_secs, mib(first["bytes_stored"].as_f64().unwrap_or(0.0)), pitr_secs / bb_secs);
    println!(
        "pitr backup (second, unchanged):    {pitr2_secs:7.2} s  stored {:.2} MiB",
        mib(second["bytes_stored"].as_f64().unwrap_or(0.0))
    );
    println!("cp -a of the data directory:         {cp_secs:7.2} s");
    println!(
        "pitr restore --to latest (files):    {restore_secs:7.2} s  ratio vs cp {:.2}  (report: download {:.2} s)",
        restore_secs / cp_secs,
        report["download_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "pitr restore --to latest --start:    {start_secs:7.2} s  (download {:.2} s, replay {:.2} s, RPO {} s)",
        report2["download_seconds"].as_f64().unwrap_or(0.0),
        report2["replay_seconds"].as_f64().unwrap_or(0.0),
        report2["data_loss_window_seconds"]
    );
    println!(
        "replay of {:.0} MiB of WAL (pgbench -c 4 -T 60 after the backups), restore --to latest --start:",
        mib((wal_end - wal_start) as f64)
    );
    for (prefetch, replay_s, total_s) in &replay {
        println!("  prefetch_segments = {prefetch}:  replay {replay_s:7.2} s  total {total_s:7.2} s");
    }
    println!("pitr restore --to latest (files only) by [backup] parallel:");
    for (workers, secs) in &by_workers {
        println!("  parallel = {workers}:  {secs:7.2} s  {:7.1} MiB/s", mib(db_bytes as f64) / secs);
    }
    Ok(())
}

/// Sets `[backup] <key> = <value>` in the environment's config file.
fn set_backup_option(env: &PitrEnv, key: &str, value: usize) -> Result<()> {
    let text = std::fs::read_to_string(&env.config)?;
    let needle = format!("\n{key} = ");
    let text = match text.find(&needle) {
        Some(at) => {
            let at = at + 1;
            let end = text[at..].find('\n').map(|e| at + e).unwrap_or(text.len());
            format!("{}{key} = {value}{}", &text[..at], &text[end..])
        }
        None if text.contains("[backup]\n") => text.replace("[backup]\n", &format!("[backup]\n{key} = {value}\n")),
        None => text.replace("[stream]\n", &format!("[backup]\n{key} = {value}\n[stream]\n")),
    };
    std::fs::write(&env.config, text)?;
    Ok(())
}
