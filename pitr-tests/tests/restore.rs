//! Base backups and restores to moments, against real servers: every restored state must equal
//! the state recorded at that moment, across a kill -9 of the sidecar and a second backup.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{client_bin, lsn_to_u64, scratch_dir, wait_until, PgCluster, PgOptions};

const SEG: u64 = 16 << 20;

/// The table's state: row count and a hash of its content.
fn table_state(cluster_psql: impl Fn(&str) -> Result<String>) -> Result<String> {
    cluster_psql("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t")
}

fn psql_at(socket_dir: &std::path::Path, port: u16, sql: &str) -> Result<String> {
    let out = std::process::Command::new(client_bin("psql"))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", &socket_dir.display().to_string()])
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-c", sql])
        .output()?;
    if !out.status.success() {
        bail!("psql on port {port}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wait_archived(env: &PitrEnv, cluster: &PgCluster) -> Result<()> {
    let lsn = lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    wait_until("the archive to catch up", Duration::from_secs(60), || Ok(env.archived_end(SEG)? >= lsn))
        .with_context(|| env.stream_logs())
}

fn backup_json(env: &PitrEnv) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&env.run_ok(&["backup", "--json"])?)?)
}

struct Restored {
    dir: tempfile::TempDir,
    port: u16,
    report: serde_json::Value,
    bin_dir: std::path::PathBuf,
}

impl Restored {
    fn target(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }
    fn psql(&self, sql: &str) -> Result<String> {
        psql_at(&self.target(), self.port, sql)
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let mut cmd = std::process::Command::new(self.bin_dir.join("pg_ctl"));
        cmd.args(["-D", &self.target().display().to_string(), "-m", "immediate", "-w", "stop"]);
        pitr_tests::as_pg_user(&mut cmd);
        let _ = cmd.output();
    }
}

/// `pitr restore --to <to> --start` as the server user, into a fresh directory.
fn restore_and_start(env: &PitrEnv, cluster: &PgCluster, to: &str) -> Result<Restored> {
    let dir = scratch_dir("restored");
    pitr_tests::chown_to_pg_user(dir.path())?;
    let port = pitr_tests::free_port()?;
    let target = dir.path().join("data");
    let out = env.run_as_pg_user(&[
        "restore",
        "--to",
        to,
        "--target-dir",
        &target.display().to_string(),
        "--start",
        "--port",
        &port.to_string(),
        "--db-user",
        "postgres",
        "--json",
        "--timeout",
        "120s",
    ])?;
    let mut restored =
        Restored { dir, port, report: serde_json::Value::Null, bin_dir: cluster.bin_dir().to_path_buf() };
    if !out.status.success() {
        bail!(
            "pitr restore --to {to} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    restored.report =
        serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    Ok(restored)
}

fn round_trip(major: u32) -> Result<()> {
    let mut opts = PgOptions::new(major);
    opts.extra_conf.push("max_wal_size = '1GB'".into());
    let cluster = PgCluster::start(opts)?;
    // A tablespace, so that restores must bring back more than the main data directory.
    let ts_dir = scratch_dir("tablespace");
    pitr_tests::chown_to_pg_user(ts_dir.path())?;
    cluster.psql(&format!("create tablespace ts location '{}'", ts_dir.path().display()))?;
    cluster.psql("create table t (id int primary key, v text) tablespace ts")?;

    let mut env = PitrEnv::new(&format!("pg{major}-restore"), &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;

    let mut moments: Vec<(String, String)> = Vec::new();
    let mut next_id = 0;
    let mut batch = |cluster: &PgCluster, rows: i32| -> Result<()> {
        cluster.psql(&format!(
            "insert into t select g, md5(g::text) from generate_series({}, {}) g; update t set v = v || 'x' where id % 7 = {}",
            next_id,
            next_id + rows - 1,
            next_id % 7
        ))?;
        next_id += rows;
        std::thread::sleep(Duration::from_millis(300));
        let at = cluster.psql("select clock_timestamp()")?;
        let state = table_state(|q| cluster.psql(q))?;
        moments.push((at, state));
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    };

    batch(&cluster, 1000)?;
    let first = backup_json(&env)?;
    for _ in 0..3 {
        batch(&cluster, 500)?;
    }
    // kill -9 of the sidecar in the middle of the workload.
    stream.kill9();
    batch(&cluster, 500)?;
    let _stream2 = env.spawn_stream()?;
    batch(&cluster, 500)?;
    wait_archived(&env, &cluster)?;
    let second = backup_json(&env)?;
    assert!(
        second["bytes_stored"].as_u64() < first["bytes_stored"].as_u64(),
        "second backup stored more: {second} vs {first}"
    );
    for _ in 0..3 {
        batch(&cluster, 500)?;
    }
    let final_state = table_state(|q| cluster.psql(q))?;
    wait_archived(&env, &cluster)?;

    let list = env.run_ok(&["list", "--json"])?;
    let list: serde_json::Value = serde_json::from_str(&list)?;
    assert_eq!(list["backups"].as_array().map(Vec::len), Some(2), "{list}");

    // Moments from the first backup's range, around the kill, and after the second backup.
    for &i in &[1usize, 3, 4, 6, 7] {
        let (at, expected) = &moments[i];
        let restored = restore_and_start(&env, &cluster, at)?;
        let got = restored
            .psql("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t")?;
        assert_eq!(&got, expected, "restore to {at} (moment {i}) differs; report {}", restored.report);
        let window = restored.report["data_loss_window_seconds"].as_f64().context("no data-loss window")?;
        assert!(window >= 0.0, "{}", restored.report);
        let expected_backup = if i < 5 { &first } else { &second };
        assert_eq!(restored.report["backup_id"], expected_backup["id"], "restore to moment {i} used the wrong backup");
        if major == 15 && i == 7 {
            let out = std::process::Command::new(client_bin("pg_amcheck"))
                .args([
                    "-h",
                    &restored.target().display().to_string(),
                    "-p",
                    &restored.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .args(["--all", "--install-missing", "--heapallindexed"])
                .output()?;
            assert!(
                out.status.success(),
                "pg_amcheck: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let latest = restore_and_start(&env, &cluster, "latest")?;
    assert_eq!(
        latest
            .psql("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t")?,
        final_state
    );
    assert_eq!(latest.report["data_loss_window_seconds"].as_f64(), Some(0.0), "{}", latest.report);
    Ok(())
}

#[test]
fn pg15_restores_to_moments_across_kill9_and_two_backups() -> Result<()> {
    round_trip(15)
}

#[test]
fn pg17_restores_to_moments_across_kill9_and_two_backups() -> Result<()> {
    round_trip(17)
}

/// PostgreSQL 14 sends BASE_BACKUP in the older format (a CopyOut per tablespace).
#[test]
fn pg14_restores_to_moments_across_kill9_and_two_backups() -> Result<()> {
    round_trip(14)
}

#[test]
fn pg16_restores_to_moments_across_kill9_and_two_backups() -> Result<()> {
    round_trip(16)
}

#[test]
fn pg18_restores_to_moments_across_kill9_and_two_backups() -> Result<()> {
    round_trip(18)
}
