//! Running markers against a real PostgreSQL 15 and a local repository (`[retention]
//! stale_backup_after` at its lower bound, 1 minute):
//! - a backup held (its WAL not archived: the sidecar is stopped) until its marker is older than
//!   `stale_backup_after`, beside `pitr expire`: the marker is renewed, expire skips the block sweep
//!   (which would delete the blocks the backup reuses), and afterwards `verify --deep` passes and
//!   the backup restores exactly;
//! - a `restore --start` paused (SIGSTOP) once it has recorded its plan, beside `pitr expire`: the
//!   backup it reads and the WAL it replays are kept although the policy expires them, the restore
//!   then finishes exactly, and the next expire removes them;
//! - a restore killed (`kill -9`) while it waits for an expire lock: its marker keeps every backup
//!   and all WAL while live, and once not renewed for `stale_backup_after` it is removed and
//!   expire does its work.
//!
//! No timing is asserted: each step waits for a condition (a marker's age or plan, a log line, a
//! process's exit), with a timeout.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_archive::running::{self, ReaderNeeds, Run, RunKind};
use pitr_archive::{now_us, KeyRing, LocalStore, Repository};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{scratch_dir, wait_until, Child, PgCluster, PgOptions};

const FINGERPRINT: &str = "select count(*) || ':' || sum(abalance) || ':' || (select count(*) from pgbench_history) \
     from pgbench_accounts";

/// Backups and restores wait up to this for the conditions the tests set up.
const PATIENCE: Duration = Duration::from_secs(300);

const STALE_US: i64 = 60_000_000;

fn retention(extra: &str) -> String {
    format!(
        "\n[retention]\ndaily = 1\nweekly = 0\nmonthly = 0\nyearly = 0\nwindow = \"0s\"\nstale_backup_after = \"1m\"\n{extra}"
    )
}

fn json(out: &str) -> Result<serde_json::Value> {
    serde_json::from_str(out).with_context(|| out.to_string())
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|b| b["id"].as_str().map(String::from)).collect()
}

fn verify_deep(env: &PitrEnv) -> Result<()> {
    let out = env.run(&["verify", "--deep", "--json"])?;
    let report = json(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    if !out.status.success() || report["ok"] != true {
        bail!("verify --deep failed: {report:#}");
    }
    Ok(())
}

fn repository(env: &PitrEnv) -> Result<Repository> {
    Ok(Repository::new(Arc::new(LocalStore::new(env.repo_path())), KeyRing::load(&env.key_file)?))
}

/// The runs announced in the repository, from the marker names alone.
fn runs(env: &PitrEnv) -> Result<Vec<Run>> {
    let dir = env.repo_path().join("running");
    let mut objects = Vec::new();
    if dir.is_dir() {
        for e in std::fs::read_dir(&dir)? {
            let name = format!("running/{}", e?.file_name().to_string_lossy());
            if let Some(activity) = running::parse_name(&name) {
                objects.push(running::RunningObject { name, activity });
            }
        }
    }
    Ok(running::runs(&objects))
}

fn runs_of(env: &PitrEnv, kind: RunKind) -> Result<Vec<Run>> {
    Ok(runs(env)?.into_iter().filter(|r| r.kind == kind).collect())
}

/// A `pitr restore --to … --start` running in the background as the server user, the way an
/// operator runs it; the restored server is stopped when this is dropped.
struct BackgroundRestore {
    child: Child,
    _dir: tempfile::TempDir,
    target: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl BackgroundRestore {
    fn spawn(env: &PitrEnv, to: &str, bin_dir: &Path) -> Result<BackgroundRestore> {
        let dir = scratch_dir("restored");
        pitr_tests::chown_to_pg_user(dir.path())?;
        let target = dir.path().join("data");
        let port = pitr_tests::free_port()?;
        let (target_arg, port_arg) = (target.display().to_string(), port.to_string());
        let mut cmd = env.command(&[
            "restore",
            "--to",
            to,
            "--target-dir",
            &target_arg,
            "--start",
            "--port",
            &port_arg,
            "--db-user",
            "postgres",
            "--timeout",
            "600s",
            "--json",
        ]);
        pitr_tests::as_pg_user(&mut cmd);
        if let Some(u) = pitr_tests::pg_user() {
            cmd.env("USER", &u.name).env("HOME", env.dir.path());
        }
        let (stdout, stderr) = (dir.path().join("restore.out"), dir.path().join("restore.err"));
        cmd.stdin(Stdio::null()).stdout(std::fs::File::create(&stdout)?).stderr(std::fs::File::create(&stderr)?);
        let child = Child(cmd.spawn().context("spawning pitr restore")?);
        Ok(BackgroundRestore { child, _dir: dir, target, port, bin_dir: bin_dir.to_path_buf(), stdout, stderr })
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the restore to end; its JSON report.
    fn finish(&mut self) -> Result<serde_json::Value> {
        let status = self.child.wait_timeout(PATIENCE)?.context("pitr restore did not finish")?;
        if !status.success() {
            bail!("pitr restore failed ({status}): {}", self.stderr());
        }
        json(&std::fs::read_to_string(&self.stdout)?)
    }

    fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new(pitr_tests::client_bin("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", &self.target.display().to_string()])
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql on the restored server: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for BackgroundRestore {
    fn drop(&mut self) {
        // A paused restore must not be left stopped behind the test.
        let _ = self.child.signal(libc::SIGCONT);
        if self.target.join("postmaster.pid").exists() {
            let mut cmd = Command::new(self.bin_dir.join("pg_ctl"));
            cmd.arg("-D").arg(&self.target).args(["-m", "immediate", "-w", "stop"]);
            pitr_tests::as_pg_user(&mut cmd);
            let _ = cmd.output();
        }
    }
}

#[test]
fn pg15_a_backup_running_longer_than_stale_backup_after_keeps_expire_off_its_blocks() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.pgbench(&["-i", "-s", "2"])?;
    // The backup waits for its WAL for as long as the test holds the sidecar back.
    let mut env = PitrEnv::new("running-backup", &cluster, &retention("[backup]\nwal_timeout = \"10m\"\n"))?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    let first = json(&env.run_ok(&["backup", "--json"])?)?;
    let system_id = json(&env.run_ok(&["list", "--json"])?)?["system_id"].as_u64().context("system_id")?;
    // Its manifest gone, its blocks are unreferenced, and the next backup of the same data reuses
    // them: just what a sweep must not delete under it.
    std::fs::remove_file(
        env.repo_path().join(format!("pg/{system_id}/backups/{}.manifest", first["id"].as_str().context("id")?)),
    )?;
    let blocks_dir = env.repo_path().join(format!("pg/{system_id}/blocks"));
    let count_blocks = || -> Result<usize> {
        let mut n = 0;
        for d in std::fs::read_dir(&blocks_dir)? {
            n += std::fs::read_dir(d?.path())?.count();
        }
        Ok(n)
    };
    cluster.pgbench(&["-n", "-t", "300"])?;
    env.stop_stream(&mut stream)?;

    let backup_log = env.dir.path().join("backup.log");
    let mut cmd = env.command(&["backup", "--json"]);
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(env.dir.path().join("backup.json"))?)
        .stderr(std::fs::File::create(&backup_log)?);
    let mut backup = Child(cmd.spawn()?);
    // Held until its marker is older than stale_backup_after, with the server done sending it
    // (every block written or reused; only the WAL wait is left).
    wait_until("the backup to run longer than stale_backup_after", PATIENCE, || {
        if !backup.is_running() {
            bail!("the backup ended early: {}", std::fs::read_to_string(&backup_log).unwrap_or_default());
        }
        let old = runs_of(&env, RunKind::Backup)?.iter().any(|r| now_us() - r.started_us > STALE_US + 1_000_000);
        Ok(old && cluster.psql("select count(*) from pg_stat_progress_basebackup")? == "0")
    })?;
    let marker = runs_of(&env, RunKind::Backup)?.pop().context("no backup marker")?;
    // Renewed: live by its last renewal, where its start alone would make it stale.
    assert!(marker.is_live(now_us(), Duration::from_secs(60)), "{marker:?}");
    assert!(marker.renewed_us - marker.started_us > STALE_US / 2, "{marker:?}");
    assert!(marker.generations.len() <= 3, "{marker:?}");

    let blocks_before = count_blocks()?;
    let report = json(&env.run_ok(&["expire", "--json"])?)?;
    assert!(
        report["blocks_skipped"].as_str().is_some_and(|s| s.contains("a backup is running")),
        "expire did not see the running backup: {report:#}"
    );
    assert_eq!(report["running_backups"].as_array().map(Vec::len), Some(1), "{report:#}");
    assert_eq!(report["removed_blocks"], 0, "{report:#}");
    assert_eq!(count_blocks()?, blocks_before);

    // The sidecar back, the backup's WAL arrives and it completes.
    let mut stream = env.spawn_stream()?;
    let status = backup.wait_timeout(PATIENCE)?.context("the backup did not finish")?;
    assert!(status.success(), "backup failed: {}", std::fs::read_to_string(&backup_log)?);
    let summary = json(&std::fs::read_to_string(env.dir.path().join("backup.json"))?)?;
    assert!(summary["blocks_reused"].as_u64().unwrap_or(0) > 0, "{summary:#}");
    assert!(runs_of(&env, RunKind::Backup)?.is_empty(), "the marker was not released");

    cluster.pgbench(&["-n", "-t", "300"])?;
    std::thread::sleep(Duration::from_millis(300));
    let moment = cluster.psql("select clock_timestamp()")?;
    let expected = cluster.psql(FINGERPRINT)?;
    std::thread::sleep(Duration::from_millis(300));
    cluster.pgbench(&["-n", "-t", "100"])?;
    cluster.psql("create table tick as select 1")?;
    env.wait_archived(cluster.current_lsn()?, "the workload archived")?;
    env.stop_stream(&mut stream)?;
    verify_deep(&env)?;
    // With nothing running, the next expire sweeps the first backup's leftover blocks, and the
    // repository stays whole.
    let report = json(&env.run_ok(&["expire", "--json"])?)?;
    assert!(report["blocks_skipped"].is_null(), "{report:#}");
    verify_deep(&env)?;

    env.share_with_pg_user()?;
    let (server, out) = env.restore_started(&moment, cluster.bin_dir(), &["--json", "--timeout", "120s"])?;
    let restored: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(restored["backup_id"], summary["id"], "{restored:#}");
    assert_eq!(server.psql(FINGERPRINT)?, expected, "restore to {moment} differs");
    Ok(())
}

/// Two backups, the older one and the WAL between them expired by the policy (daily 1, no
/// window); a moment between them (restored from the older one) and its fingerprint.
struct TwoBackups {
    old: String,
    new: String,
    moment: String,
    expected: String,
    /// WAL objects an expire removes with nothing running.
    wal_to_remove: u64,
}

fn two_backups(env: &mut PitrEnv, cluster: &PgCluster) -> Result<TwoBackups> {
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(cluster)?;
    let old = json(&env.run_ok(&["backup", "--json"])?)?;
    cluster.pgbench(&["-n", "-t", "500"])?;
    std::thread::sleep(Duration::from_millis(300));
    let moment = cluster.psql("select clock_timestamp()")?;
    let expected = cluster.psql(FINGERPRINT)?;
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..2 {
        cluster.pgbench(&["-n", "-t", "300"])?;
        cluster.psql("select pg_switch_wal()")?;
    }
    let new = json(&env.run_ok(&["backup", "--json"])?)?;
    cluster.pgbench(&["-n", "-t", "100"])?;
    cluster.psql("create table tick as select 1")?;
    env.wait_archived(cluster.current_lsn()?, "the workload archived")?;
    // The repository stands still: what expire may remove depends on nothing else.
    env.stop_stream(&mut stream)?;
    let old = old["id"].as_str().context("id")?.to_string();
    let new = new["id"].as_str().context("id")?.to_string();
    // What expire removes with nothing running: the older backup and WAL.
    let dry = json(&env.run_ok(&["expire", "--dry-run", "--json"])?)?;
    assert_eq!(ids(&dry["removed_backups"]), vec![old.clone()], "{dry:#}");
    let wal_to_remove = dry["removed_wal_objects"].as_u64().unwrap_or(0);
    assert!(wal_to_remove > 0, "{dry:#}");
    Ok(TwoBackups { old, new, moment, expected, wal_to_remove })
}

#[test]
fn pg15_a_restore_in_progress_keeps_the_backup_and_wal_it_reads_from_expire() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.pgbench(&["-i", "-s", "5"])?;
    let mut env = PitrEnv::new("running-restore", &cluster, &retention(""))?;
    env.init()?;
    let b = two_backups(&mut env, &cluster)?;
    let wal_before = env.wal_objects()?;
    let repo = repository(&env)?;
    let runtime = tokio::runtime::Runtime::new()?;
    env.share_with_pg_user()?;

    // Paused once it has recorded what it reads (a small restore may get there and finish
    // between two looks: then it runs again).
    let mut attempt = 0;
    let (mut restore, replay_from) = loop {
        attempt += 1;
        let mut r = BackgroundRestore::spawn(&env, &b.moment, cluster.bin_dir())?;
        let mut planned = None;
        wait_until("the restore to record its plan", PATIENCE, || {
            for run in runs_of(&env, RunKind::Restore)? {
                if let ReaderNeeds::Planned(plan) = runtime.block_on(running::reader_needs(&repo, &run)) {
                    planned = Some(plan);
                    return Ok(true);
                }
            }
            Ok(!r.child.is_running())
        })?;
        if let Some(plan) = planned {
            if r.child.signal(libc::SIGSTOP).is_ok() {
                // Still holding its marker (not past its release): paused in the middle.
                if !runs_of(&env, RunKind::Restore)?.is_empty() {
                    assert_eq!(plan.backups, vec![b.old.clone()], "{plan:?}");
                    break (r, plan.wal_from_lsn / pitr_tests::pitr::WAL_SEGMENT_SIZE);
                }
                r.child.signal(libc::SIGCONT)?;
            }
        }
        r.finish()?;
        assert!(attempt < 3, "the restore finished before it could be paused, {attempt} times");
    };

    let report = json(&env.run_ok(&["expire", "--json"])?)?;
    let running = report["running_restores"].as_array().context("running_restores")?;
    assert_eq!(running.len(), 1, "{report:#}");
    assert!(running[0].as_str().is_some_and(|s| s.contains(&b.old)), "{report:#}");
    assert!(ids(&report["removed_backups"]).is_empty(), "{report:#}");
    let kept = report["kept"].as_array().context("kept")?;
    let old_kept = kept.iter().find(|k| k["id"] == b.old.as_str()).context("the old backup is not kept")?;
    assert!(old_kept["reasons"].as_array().is_some_and(|r| r.iter().any(|x| x == "restore")), "{report:#}");
    // WAL from before the older backup's start may go; none from where the replay starts.
    assert!(report["removed_wal_objects"].as_u64().unwrap_or(u64::MAX) < b.wal_to_remove, "{report:#}");
    for range in report["removed_wal"].as_array().into_iter().flatten() {
        let to = range["to"].as_str().context("to")?;
        let segno = pitr_tests::pitr::segment_number(to, pitr_tests::pitr::WAL_SEGMENT_SIZE);
        assert!(segno < replay_from, "removed WAL up to {to}, the restore replays from segment {replay_from}");
    }
    // Segments and chunks (history files have shorter names, and always stay).
    let wal_after = env.wal_objects()?;
    for name in wal_before.iter().filter(|n| n.len() > 24) {
        let segno = pitr_tests::pitr::segment_number(name, pitr_tests::pitr::WAL_SEGMENT_SIZE);
        if segno >= replay_from {
            assert!(wal_after.contains(name), "{name} went under the restore: {report:#}");
        }
    }

    restore.child.signal(libc::SIGCONT)?;
    let restored = restore.finish()?;
    assert_eq!(restored["backup_id"], b.old.as_str(), "{restored:#}");
    assert_eq!(restore.psql(FINGERPRINT)?, b.expected, "restore to {} differs", b.moment);
    assert!(runs_of(&env, RunKind::Restore)?.is_empty(), "the restore's marker was not released");
    verify_deep(&env)?;

    // Released: now the policy has its way.
    let report = json(&env.run_ok(&["expire", "--json"])?)?;
    assert_eq!(ids(&report["removed_backups"]), vec![b.old.clone()], "{report:#}");
    assert!(report["removed_wal_objects"].as_u64().unwrap_or(0) > 0, "{report:#}");
    let list = json(&env.run_ok(&["list", "--json"])?)?;
    assert_eq!(ids(&list["backups"]), vec![b.new.clone()], "{list:#}");
    verify_deep(&env)?;
    Ok(())
}

#[test]
fn pg15_a_killed_restores_marker_holds_expire_off_only_until_it_is_stale() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.pgbench(&["-i", "-s", "1"])?;
    let mut env = PitrEnv::new("killed-restore", &cluster, &retention(""))?;
    env.init()?;
    let b = two_backups(&mut env, &cluster)?;
    let repo = repository(&env)?;
    let runtime = tokio::runtime::Runtime::new()?;

    // An expire holds its lock: the restore announces itself, then waits for it, before it reads
    // anything. Killed there, it leaves a marker without a plan.
    let lock = runtime.block_on(running::ExpireLock::acquire(&repo, now_us(), Duration::from_secs(600)))?;
    // The restore's marker goes into running/, which root created.
    env.share_with_pg_user()?;
    let mut restore = BackgroundRestore::spawn(&env, "latest", cluster.bin_dir())?;
    wait_until("the restore to wait for the expire lock", PATIENCE, || {
        if !restore.child.is_running() {
            bail!("the restore ended: {}", restore.stderr());
        }
        Ok(restore.stderr().contains("waits until it is done") && !runs_of(&env, RunKind::Restore)?.is_empty())
    })?;
    restore.child.kill9();
    runtime.block_on(lock.release());
    let left = runs_of(&env, RunKind::Restore)?;
    assert_eq!(left.len(), 1, "{left:?}");

    // Live: it has not said what it reads, so nothing goes.
    let report = json(&env.run_ok(&["expire", "--json"])?)?;
    let running = report["running_restores"].as_array().context("running_restores")?;
    assert!(
        running.len() == 1 && running[0].as_str().is_some_and(|s| s.contains("not chosen its backup")),
        "{report:#}"
    );
    assert!(ids(&report["removed_backups"]).is_empty() && report["removed_wal_objects"] == 0, "{report:#}");
    assert!(report["stale_removed"].as_array().is_some_and(Vec::is_empty), "{report:#}");

    // Not renewed since the kill: stale a minute after its last renewal.
    let renewed = left[0].renewed_us;
    wait_until("the killed restore's marker to go stale", PATIENCE, || Ok(now_us() - renewed > STALE_US + 1_000_000))?;
    let report = json(&env.run_ok(&["expire", "--json"])?)?;
    let removed: Vec<&str> =
        report["stale_removed"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
    assert!(left[0].generations.iter().all(|g| removed.contains(&g.as_str())), "{report:#}");
    assert!(report["running_restores"].as_array().is_some_and(Vec::is_empty), "{report:#}");
    assert_eq!(ids(&report["removed_backups"]), vec![b.old.clone()], "{report:#}");
    assert!(runs(&env)?.is_empty(), "markers left: {:?}", runs(&env)?);
    verify_deep(&env)?;
    Ok(())
}
