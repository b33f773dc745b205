//! A full disk (ENOSPC) under `pitr stream`, `pitr backup` and `pitr restore`, on small tmpfs
//! mounts the tests make: one clear error each, no flush acknowledged past what the archive
//! durably holds, nothing half-written left behind, and after space returns streaming resumes,
//! the archive matches the server's WAL and `verify --deep` passes.
//!
//! Mounting needs root (this machine and CI run the tests as root); a refused mount fails the
//! test with the reason rather than letting it pass untested.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pitr_tests::checks::expect_failure;
use pitr_tests::pitr::{PitrEnv, WAL_SEGMENT_SIZE};
use pitr_tests::{lsn_to_u64, scratch_dir, wait_until, PgCluster, PgOptions};

/// A tmpfs of a fixed size mounted on a directory; unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(path)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "this test needs to mount a small tmpfs (as root) to fill it, and `mount -t tmpfs -o size={size} tmpfs {}` \
                 was refused: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Tmpfs { path: path.to_path_buf() })
    }

    /// Bytes still free for files.
    fn available(&self) -> Result<u64> {
        let out = Command::new("df").args(["-B1", "--output=avail"]).arg(&self.path).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).and_then(|l| l.trim().parse().ok()).with_context(|| format!("df: {text}"))
    }

    /// Fills it up to `leave` free bytes with the file `name` (a `.tmp.` name, which the
    /// repository's listings never show); the file is deleted to give the space back.
    fn fill(&self, name: &str, leave: u64) -> Result<PathBuf> {
        let path = self.path.join(name);
        let size = self.available()?.saturating_sub(leave);
        // Written, not set_len: a sparse file would take no space.
        std::fs::write(&path, vec![0x5a; size as usize]).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}

/// Temporary files a put, a backup or a restore left under `dir` (besides the local store's
/// pool of recycled chunk files and `keep`).
fn leftovers(dir: &Path, keep: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let (path, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
            if path == keep || name == ".tmp.recycle" {
                continue;
            }
            if name.starts_with(".tmp.") || name.contains("pitr-partial") || name.contains("pitr-tmp") {
                out.push(path.clone());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            }
        }
    }
    out
}

/// Rows of random text: WAL that compresses poorly, so the repository fills quickly.
fn insert(cluster: &PgCluster, rows: u32) -> Result<()> {
    cluster.psql(&format!(
        "insert into t select g, md5(random()::text) || md5(random()::text) from generate_series(1, {rows}) g"
    ))?;
    Ok(())
}

/// (restart_lsn of the sidecar's slot, flush position it reported): what the primary was told
/// is durable.
fn acknowledged(cluster: &PgCluster) -> Result<(u64, u64)> {
    let restart = cluster.psql("select restart_lsn from pg_replication_slots where slot_name = 'pitr_main'")?;
    let flush = cluster.psql(
        "select coalesce(flush_lsn::text, '0/0') from pg_stat_replication where application_name = 'pitr_main'",
    )?;
    Ok((lsn_to_u64(&restart), if flush.is_empty() { 0 } else { lsn_to_u64(&flush) }))
}

fn backup_manifests(repo: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for cluster in std::fs::read_dir(repo.join("pg")).into_iter().flatten().flatten() {
        for m in std::fs::read_dir(cluster.path().join("backups")).into_iter().flatten().flatten() {
            out.push(m.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn pg15_stream_and_backup_onto_a_full_repository() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    // Keeps every segment in pg_wal, so that the server's own files are the reference.
    cluster.psql("select pg_create_physical_replication_slot('pin', true)")?;
    let mut env = PitrEnv::new("enospc-stream", &cluster, "")?;
    let repo = env.repo_path().to_path_buf();
    let disk = Tmpfs::mount(&repo, "64m")?;
    env.init()?;
    let filler = disk.fill(".tmp.filler", 3 << 20)?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int, v text)")?;

    // (a) Streaming: WAL until the repository is full.
    wait_until("the repository to fill up", Duration::from_secs(120), || {
        insert(&cluster, 10_000)?;
        Ok(env.stream_logs().contains("no space left on device"))
    })
    .with_context(|| env.stream_logs())?;
    let logs = env.stream_logs();
    let message = format!("repository {}: no space left on device", repo.display());
    ensure!(logs.contains(&message), "the sidecar's error does not say {message:?}:\n{logs}");
    // While it is full: more WAL, and the primary is never told more is durable than the archive
    // holds. The acknowledgement is read first: the archive only grows.
    for _ in 0..5 {
        insert(&cluster, 5_000)?;
        std::thread::sleep(Duration::from_secs(1));
        let (restart, flush) = acknowledged(&cluster)?;
        let archived = env.archived_end(WAL_SEGMENT_SIZE)?;
        ensure!(
            restart <= archived && flush <= archived,
            "acknowledged past the archive: slot restart_lsn {restart:X}, flush {flush:X}, archive ends at {archived:X}"
        );
        ensure!(cluster.current_lsn()? > archived, "the archive kept up: the disk was not full");
    }
    ensure!(stream.is_running(), "pitr stream exited on a full disk:\n{}", env.stream_logs());
    let left = leftovers(&repo, &filler);
    ensure!(left.is_empty(), "half-written files in the repository: {left:?}");

    // (b) A backup onto the full repository: one clear error, no manifest.
    let (_, message) =
        expect_failure(&env.config, &["backup"], &["no space left on device", &repo.display().to_string()]);
    eprintln!("backup onto a full repository: {message}");
    let manifests = backup_manifests(&repo);
    ensure!(manifests.is_empty(), "a failed backup left manifests: {manifests:?}");
    let left = leftovers(&repo, &filler);
    ensure!(left.is_empty(), "half-written files in the repository after the backup: {left:?}");

    // Space returns: streaming resumes on its own, a backup works.
    std::fs::remove_file(&filler)?;
    insert(&cluster, 1_000)?;
    let last = cluster.psql(
        "create table if not exists switch_marker(x int); insert into switch_marker values (1); \
         select pg_walfile_name(pg_switch_wal())",
    )?;
    let end = cluster.current_lsn()?;
    wait_until("the sidecar to catch up once space returned", Duration::from_secs(120), || {
        Ok(env.archived_end(WAL_SEGMENT_SIZE)? >= end - end % WAL_SEGMENT_SIZE)
    })
    .with_context(|| env.stream_logs())?;
    env.run_ok(&["backup"])?;
    ensure!(backup_manifests(&repo).len() == 1, "the backup after the disk was freed left no manifest");

    let compared = env.compare_with_pg_wal(&cluster.wal_dir(), &last)?;
    ensure!(compared >= 1, "no whole segment to compare with the server's");
    let verify: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--deep", "--json"])?)?;
    ensure!(verify["ok"] == true, "verify --deep after the disk was freed: {verify:#}");
    env.stop_stream(&mut stream)?;
    Ok(())
}

#[test]
fn pg15_restore_into_a_full_target_fails_and_leaves_nothing() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("enospc-restore", &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int, v text)")?;
    insert(&cluster, 1_000)?;
    env.run_ok(&["backup"])?;

    // A restored data directory takes tens of MB; the target's file system has 8.
    let scratch = scratch_dir("enospc-target");
    let disk = Tmpfs::mount(&scratch.path().join("mnt"), "8m")?;
    let target = disk.path.join("data");
    let target_arg = target.display().to_string();
    let (_, message) = expect_failure(
        &env.config,
        &["restore", "--to", "latest", "--target-dir", &target_arg],
        &["no space left on device", "restore target", "partial restore is removed"],
    );
    eprintln!("restore into a full target: {message}");
    let left: Vec<String> =
        std::fs::read_dir(&disk.path)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    ensure!(left.is_empty(), "the failed restore left {left:?} on the target's file system");
    env.stop_stream(&mut stream)?;
    Ok(())
}
