//! `pitr expire` against a real PostgreSQL 15 and a local repository:
//! - a policy that removes the older of two backups: `--dry-run` leaves the repository
//!   byte-identical and says what a real run then removes; stopped after any of several numbers of
//!   deletes (as by `kill -9`), the repository passes `pitr verify`; after the run `verify --deep`
//!   passes and a restore to a moment inside the window is exact;
//! - backups racing expire runs never end with a manifest that references a missing block;
//! - a bad `[retention]` value is one error naming the key.

use std::ops::Range;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use pitr_archive::{KeyRing, LocalStore, ObjectInfo, PutOutcome, Repository, Store, StoreError};
use pitr_tests::checks::{assert_untouched, failure_of, materialise, snapshot};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{scratch_dir, PgCluster, PgOptions};

const FINGERPRINT: &str = "select count(*) || ':' || sum(abalance) || ':' || (select count(*) from pgbench_history) \
     from pgbench_accounts";

fn json(out: &str) -> Result<serde_json::Value> {
    serde_json::from_str(out).with_context(|| out.to_string())
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|b| b["id"].as_str().map(String::from)).collect()
}

fn verify_ok(env_config: &Path, deep: bool) -> Result<serde_json::Value> {
    let mut args = vec!["verify", "--json"];
    if deep {
        args.push("--deep");
    }
    let out = pitr_tests::checks::run_pitr(env_config, &args);
    let report = json(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    assert!(out.status.success() && report["ok"] == true, "verify failed: {report:#}");
    Ok(report)
}

/// Fault injection over the real local store: deletes after the first `allowed` fail, as if
/// the process had been killed there.
#[derive(Debug)]
struct StopAfterDeletes {
    inner: LocalStore,
    allowed: usize,
    done: AtomicUsize,
}

#[async_trait]
impl Store for StopAfterDeletes {
    async fn put_if_absent(&self, name: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.inner.put_if_absent(name, data).await
    }
    async fn get(&self, name: &str) -> Result<Bytes, StoreError> {
        self.inner.get(name).await
    }
    async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.inner.get_range(name, range).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        if self.done.fetch_add(1, Ordering::SeqCst) >= self.allowed {
            return Err(StoreError::Backend {
                op: "delete",
                name: name.into(),
                location: self.inner.location(),
                message: "stopped here by the test".into(),
            });
        }
        self.inner.delete(name).await
    }
    async fn delete_many(&self, names: &[String]) -> Result<(), StoreError> {
        for name in names {
            self.delete(name).await?;
        }
        Ok(())
    }
    async fn head(&self, name: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.inner.head(name).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

#[test]
fn pg15_expire_dry_run_changes_nothing_stops_anywhere_consistently_and_the_window_restores_exactly() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.pgbench(&["-i", "-s", "1"])?;
    // Keep the newest backup of today and the window from it on: the older backup goes.
    let retention = "\n[retention]\ndaily = 1\nweekly = 0\nmonthly = 0\nyearly = 0\nwindow = \"0s\"\n";
    let mut env = PitrEnv::new("expire", &cluster, retention)?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;

    let old = json(&env.run_ok(&["backup", "--json"])?)?;
    for _ in 0..2 {
        cluster.pgbench(&["-n", "-t", "500"])?;
        cluster.psql("select pg_switch_wal()")?;
    }
    let kept = json(&env.run_ok(&["backup", "--json"])?)?;
    let (old_id, kept_id) = (old["id"].as_str().context("id")?, kept["id"].as_str().context("id")?);
    cluster.pgbench(&["-n", "-t", "300"])?;
    std::thread::sleep(Duration::from_millis(300));
    let moment = cluster.psql("select clock_timestamp()")?;
    let expected = cluster.psql(FINGERPRINT)?;
    std::thread::sleep(Duration::from_millis(300));
    cluster.pgbench(&["-n", "-t", "300"])?;
    cluster.psql("create table tick as select 1")?;
    env.wait_archived(cluster.current_lsn()?, "the workload archived")?;
    // The repository must stand still for the byte-for-byte comparisons.
    env.stop_stream(&mut stream)?;

    let before = snapshot(env.repo_path());
    let dry = json(&env.run_ok(&["expire", "--dry-run", "--json"])?)?;
    assert_untouched(env.repo_path(), &before, "expire --dry-run --json");
    let text = env.run_ok(&["expire", "--dry-run"])?;
    assert_untouched(env.repo_path(), &before, "expire --dry-run");
    assert!(text.contains(&format!("would remove backup {old_id}")), "{text}");
    assert_eq!(ids(&dry["removed_backups"]), vec![old_id.to_string()], "{dry:#}");
    assert_eq!(dry["window_base"], kept_id, "{dry:#}");
    let wal_objects = dry["removed_wal_objects"].as_u64().context("count")? as usize;
    let blocks = dry["removed_blocks"].as_u64().context("count")? as usize;
    assert!(wal_objects >= 2 && blocks > 0, "{dry:#}");

    // Stopped after k deletes (manifest first, then WAL, then blocks), the repository is one
    // `pitr verify` accepts; a rerun completes it.
    let system_id = json(&env.run_ok(&["list", "--json"])?)?["system_id"].as_u64().context("system_id")?;
    let runtime = tokio::runtime::Runtime::new()?;
    for allowed in [0, 1, 2, 1 + wal_objects / 2, 1 + wal_objects, 1 + wal_objects + blocks / 2] {
        let copy = scratch_dir("expire-stopped");
        let root = copy.path().join("repo");
        materialise(&root, &before)?;
        let config = copy.path().join("pitr.toml");
        let text = std::fs::read_to_string(&env.config)?
            .replace(&env.repo_path().display().to_string(), &root.display().to_string());
        std::fs::write(&config, text)?;
        let store = Arc::new(StopAfterDeletes { inner: LocalStore::new(&root), allowed, done: AtomicUsize::new(0) });
        let repo = Repository::new(store, KeyRing::load(&env.key_file)?);
        let err = runtime.block_on(async {
            let cluster = repo.resolve_cluster(Some(system_id)).await?;
            let opts = pitr_archive::expire::ExpireOptions {
                policy: pitr_archive::retention::Policy { daily: 1, weekly: 0, monthly: 0, yearly: 0, window_us: 0 },
                now_us: pitr_archive::now_us(),
                dry_run: false,
                stale_backup_after: Duration::from_secs(86_400),
                lock_ttl: Duration::from_secs(3600),
                keep_forever_lock: Duration::from_secs(86_400),
            };
            anyhow::Ok(pitr_archive::expire::expire(&repo, &cluster, &opts).await)
        })?;
        assert!(err.is_err(), "stopping after {allowed} deletes did not stop it");
        let report = verify_ok(&config, false).with_context(|| format!("stopped after {allowed} deletes"))?;
        let listed = report["backups"].as_u64().unwrap_or(0);
        assert!((1..=2).contains(&listed), "stopped after {allowed}: {report}");
        // A lock left behind (the stop hit its removal too) is what a kill -9 leaves: it keeps
        // other runs out until it expires; here the rerun stands for the run after that.
        let _ = std::fs::remove_dir_all(root.join("running"));
        pitr_tests::checks::expect_success(&config, &["expire"]);
        verify_ok(&config, false)?;
    }

    let done = json(&env.run_ok(&["expire", "--json"])?)?;
    for key in ["removed_backups", "removed_wal", "removed_wal_objects", "removed_blocks", "removed_bytes"] {
        assert_eq!(done[key], dry[key], "the run removed other {key} than the dry run said: {done:#}");
    }
    assert!(done["retained"].as_array().is_some_and(Vec::is_empty), "{done:#}");
    let manifests = env.repo_path().join(format!("pg/{system_id}/backups"));
    assert!(!manifests.join(format!("{old_id}.manifest")).exists());
    let list = json(&env.run_ok(&["list", "--json"])?)?;
    assert_eq!(ids(&list["backups"]), vec![kept_id.to_string()], "{list:#}");
    let old_start = pitr_tests::lsn_to_u64(old["start_lsn"].as_str().context("lsn")?);
    let old_segment = format!("00000001{:08X}{:08X}.seg", old_start >> 32, (old_start & 0xFFFF_FFFF) >> 24);
    assert!(!env.wal_objects()?.contains(&old_segment), "{old_segment} is still there");
    let floors = std::fs::read_dir(env.repo_path().join(format!("pg/{system_id}/retention")))?.count();
    assert_eq!(floors, 1);
    assert!(
        !env.repo_path().join("running").exists() || std::fs::read_dir(env.repo_path().join("running"))?.count() == 0
    );
    verify_ok(&env.config, true)?;

    let (server, out) = env.restore_started(&moment, cluster.bin_dir(), &["--json", "--timeout", "120s"])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["backup_id"], kept_id, "{report:#}");
    assert_eq!(server.psql(FINGERPRINT)?, expected, "restore to {moment} differs");

    // Nothing more to do: a second run removes nothing.
    let again = json(&env.run_ok(&["expire", "--json"])?)?;
    assert!(
        ids(&again["removed_backups"]).is_empty() && again["removed_wal_objects"] == 0 && again["removed_blocks"] == 0,
        "{again:#}"
    );
    Ok(())
}

#[test]
fn pg15_backups_racing_expire_never_reference_a_missing_block() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.pgbench(&["-i", "-s", "2"])?;
    let mut env = PitrEnv::new("expire-race", &cluster, "")?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    let system_id = {
        let first = json(&env.run_ok(&["backup", "--json"])?)?;
        let list = json(&env.run_ok(&["list", "--json"])?)?;
        let id = list["system_id"].as_u64().context("system_id")?;
        // Its manifest gone, its blocks are unreferenced, and the next backup of the same data
        // would reuse them: just what a sweep must not delete under it.
        std::fs::remove_file(
            env.repo_path().join(format!("pg/{id}/backups/{}.manifest", first["id"].as_str().unwrap_or(""))),
        )?;
        id
    };
    let (mut waited, mut skipped, mut swept) = (0, 0, 0);
    for round in 0..6u64 {
        cluster.pgbench(&["-n", "-t", "200"])?;
        let backup = env.command(&["backup", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        // Different offsets put the sweep at different points of the backup (no timing is
        // asserted: every outcome must leave a consistent repository).
        std::thread::sleep(Duration::from_millis(150 * round));
        let report = json(&env.run_ok(&["expire", "--json"])?)?;
        let out = backup.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "round {round}: backup failed: {stderr}");
        let summary = json(&String::from_utf8_lossy(&out.stdout))?;
        waited += stderr.contains("sweeping blocks") as usize;
        skipped += !report["blocks_skipped"].is_null() as usize;
        swept += (report["removed_blocks"].as_u64().unwrap_or(0) > 0) as usize;
        let verified = verify_ok(&env.config, false).with_context(|| format!("round {round}: {report:#}"))?;
        assert_eq!(verified["backups"], 1, "{verified}");
        let id = summary["id"].as_str().context("id")?;
        std::fs::remove_file(env.repo_path().join(format!("pg/{system_id}/backups/{id}.manifest")))?;
    }
    eprintln!("6 rounds: the backup waited for the sweep {waited} times, expire skipped the sweep {skipped} times, swept blocks {swept} times");
    Ok(())
}

#[test]
fn bad_retention_values_are_one_error_naming_the_key() -> Result<()> {
    let dir = scratch_dir("expire-bad-config");
    let base = format!(
        "[repository]\npath = {:?}\n[encryption]\nkey_file = {:?}\n",
        dir.path().join("repo").display().to_string(),
        dir.path().join("key").display().to_string()
    );
    let config = dir.path().join("pitr.toml");
    for (section, phrases) in [
        ("[retention]\nwindow = \"forever\"\n", &["window"][..]),
        ("[retention]\ndaily = -1\n", &["daily"][..]),
        ("[retention]\nkeep_last = 3\n", &["keep_last"][..]),
        ("[retention]\nlock_ttl = \"5s\"\n", &["lock_ttl", "1 minute"][..]),
        ("[schedule]\nexpire = \"nightly\"\n", &["expire", "cron"][..]),
    ] {
        std::fs::write(&config, format!("{base}{section}"))?;
        pitr_tests::checks::expect_failure(&config, &["expire"], phrases);
    }
    std::fs::write(&config, &base)?;
    let out = std::process::Command::new(pitr_tests::pitr_bin())
        .arg("--config")
        .arg(&config)
        .arg("expire")
        .env("PITR_RETENTION_WEEKLY", "lots")
        .output()?;
    failure_of("PITR_RETENTION_WEEKLY=lots", &out, &["weekly"]);
    Ok(())
}
