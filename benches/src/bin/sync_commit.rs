//! The commit-latency cost of RPO 0: pgbench with no synchronous standby, with `pitr stream` as
//! the synchronous standby, and with `pg_receivewal --synchronous` as the synchronous standby
//! (the peer), on one PostgreSQL 15 primary.
//!
//! Run: `cargo build --release -p pitr && PITR_BIN=$PWD/target/release/pitr \
//!       cargo run --release -p pitr-benches --bin sync_commit [-- SECONDS]`

use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{client_bin, spawn_logged, wait_until, PgCluster, PgOptions};

fn latency_and_tps(out: &str) -> (f64, f64) {
    let grab = |prefix: &str| {
        out.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (grab("latency average"), grab("tps"))
}

fn run_load(cluster: &PgCluster, secs: &str) -> Result<(f64, f64)> {
    Ok(latency_and_tps(&cluster.pgbench(&["-n", "-c", "4", "-T", secs])?))
}

fn set_sync(cluster: &PgCluster, name: &str) -> Result<()> {
    cluster.psql(&format!("alter system set synchronous_standby_names = '{name}'"))?;
    cluster.psql("select pg_reload_conf()")?;
    if !name.is_empty() {
        wait_until("the synchronous standby", Duration::from_secs(30), || {
            Ok(cluster
                .psql(&format!("select sync_state from pg_stat_replication where application_name = '{name}'"))?
                == "sync")
        })?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let secs = std::env::args().nth(1).unwrap_or_else(|| "20".into());
    let mut opts = PgOptions::new(15);
    opts.extra_conf.push("max_wal_size = '2GB'".into());
    let cluster = PgCluster::start(opts)?;
    cluster.pgbench(&["-i", "-s", "10", "-q"])?;
    let mut env = PitrEnv::new("bench-sync", &cluster, "")?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    let wal = env.dir.path().join("receivewal");
    std::fs::create_dir_all(&wal)?;
    cluster.psql("select pg_create_physical_replication_slot('receivewal', true)")?;
    let mut rw = std::process::Command::new(client_bin("pg_receivewal"));
    rw.args(["-D", &wal.display().to_string(), "-S", "receivewal", "--synchronous", "-n"])
        .arg("-d")
        .arg(format!("host=127.0.0.1 port={} user=postgres application_name=receivewal", cluster.port));
    let _rw = spawn_logged(rw, &env.dir.path().join("receivewal.log"))?;
    wait_until("both receivers", Duration::from_secs(30), || {
        Ok(cluster.psql("select count(*) from pg_stat_replication")? == "2")
    })?;

    let mut rows = Vec::new();
    for (label, sync) in [
        ("no synchronous standby", ""),
        ("pitr stream synchronous", "pitr_main"),
        ("pg_receivewal --synchronous synchronous", "receivewal"),
    ] {
        set_sync(&cluster, sync)?;
        let (lat, tps) = run_load(&cluster, &secs).with_context(|| label.to_string())?;
        rows.push((label, lat, tps));
    }
    set_sync(&cluster, "")?;
    println!(
        "\n===== commit latency with a synchronous standby (PostgreSQL 15, pgbench -c 4 -T {secs}, scale 10) ====="
    );
    println!(
        "machine: nproc={}; pitr: local repository, flush_interval 0",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    for (label, lat, tps) in &rows {
        println!("{label:<42} latency avg {lat:7.3} ms   tps {tps:8.1}");
    }
    Ok(())
}
