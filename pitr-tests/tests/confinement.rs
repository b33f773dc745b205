//! A restore writes only inside its target directory, whatever the backup manifest says, and
//! `restore --force` never replaces the data directory of a running server.
//!
//! Against a real PostgreSQL 15 server, its streamed archive and one real backup, with the real
//! `pitr` binary (run as root here, so the file system itself would stop nothing):
//! - `--force` onto the running server's own data directory is refused, naming the pid and the
//!   directory, and the server keeps running; once the server has crashed (kill -9: its
//!   postmaster.pid stays, stale) the same command replaces the directory.
//! - Manifests crafted with the archive crate's own API and the repository's key (a link out of
//!   the target with a file written "through" it, a `../` path, an absolute path) are refused,
//!   naming the backup and the path; a sentinel directory outside, the directory the target
//!   would be in and the repository stay byte-for-byte as they were.
//! - setuid/setgid/sticky modes in a manifest are dropped: the restore succeeds without them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use pitr_archive::backup::{BackupEntry, BackupEntryKind, BackupManifest};
use pitr_archive::{KeyRing, LocalStore, Repository};
use pitr_tests::checks::{assert_untouched, expect_failure, expect_success, snapshot};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{scratch_dir, wait_until, PgCluster, PgOptions};

/// The pid on the first line of `dir/postmaster.pid`.
fn postmaster_pid(dir: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).context("reading postmaster.pid")?;
    text.lines().next().context("empty postmaster.pid")?.trim().parse().context("postmaster.pid's first line")
}

/// Whether `pid` still runs (a zombie does not).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|s| s.split_whitespace().next()).is_some_and(|s| s != "Z"),
        Err(_) => false,
    }
}

/// Every path under `dir` whose mode has setuid, setgid or sticky bits (links not followed).
fn special_modes(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, _) in snapshot(dir) {
        let path = dir.join(&rel);
        let mode = std::fs::symlink_metadata(&path).map(|m| m.permissions().mode()).unwrap_or(0);
        if mode & 0o7000 != 0 && !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_symlink()) {
            out.push(format!("{} {:o}", rel.display(), mode & 0o7777));
        }
    }
    out
}

#[test]
fn restores_stay_inside_the_target_and_force_spares_a_running_server() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.psql("create table t as select g from generate_series(1, 1000) g")?;
    let mut env = PitrEnv::new("confinement", &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    let backup: serde_json::Value = serde_json::from_str(&env.run_ok(&["backup", "--json"])?)?;
    let backup_id = backup["id"].as_str().context("no backup id")?.to_string();
    // Nothing may write to the repository from here on: the restores below must leave it as is.
    env.stop_stream(&mut stream)?;
    let config = env.config.clone();

    // 1. --force onto a running server's data directory.
    let data = cluster.data_dir.clone();
    let data_arg = data.display().to_string();
    let pid = postmaster_pid(&data)?;
    ensure!(running(pid), "the server's postmaster {pid} is not running");
    let parent = data.parent().context("data directory without a parent")?.to_path_buf();
    let names = |dir: &Path| -> Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(dir)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        v.sort();
        Ok(v)
    };
    let beside = names(&parent)?;
    let restore = |id: &str, target: &str, force: bool| {
        let mut args = vec!["restore", "--to", "latest", "--backup", id, "--target-dir", target];
        if force {
            args.push("--force");
        }
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let args = restore(&backup_id, &data_arg, true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, message) = expect_failure(&config, &args, &[&data_arg, &format!("pid {pid}"), "running"]);
    println!("--force onto a running server -> {message}");
    ensure!(cluster.psql("select count(*) from t")? == "1000", "the server lost its data");
    ensure!(postmaster_pid(&data)? == pid, "postmaster.pid changed");
    ensure!(names(&parent)? == beside, "the refused restore left something beside the data directory");

    // 2. Crafted manifests, sealed with the repository's own key.
    let repo = Repository::new(Arc::new(LocalStore::new(&env.repo)), KeyRing::load(&env.key_file)?);
    let system_id: u64 = std::fs::read_dir(env.repo.join("pg"))?
        .next()
        .context("no cluster in the repository")??
        .file_name()
        .to_string_lossy()
        .parse()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let real = rt.block_on(BackupManifest::load(&repo, system_id, &backup_id))?;
    let pg_version = real.files.iter().find(|f| f.path == "PG_VERSION").context("no PG_VERSION in the backup")?;

    let sentinel = scratch_dir("sentinel");
    std::fs::write(sentinel.path().join("keep"), b"nothing may change this")?;
    std::fs::create_dir(sentinel.path().join("sub"))?;
    std::fs::write(sentinel.path().join("sub/keep"), b"nor this")?;
    let restores = scratch_dir("restores");
    let target = restores.path().join("data");
    let target_arg = target.display().to_string();
    // The staging directory is beside the target: two levels up is the scratch base, where the
    // sentinel is.
    let sentinel_name = sentinel.path().file_name().context("sentinel name")?.to_string_lossy().into_owned();
    let escape = format!("../../{sentinel_name}/planted");
    let absolute = sentinel.path().join("planted").display().to_string();
    let sentinel_str = sentinel.path().display().to_string();
    // (backup id, the path its restore must refuse (empty: none, it restores), how it is made)
    type Crafted<'a> = (&'a str, &'a str, Box<dyn Fn(&mut BackupManifest) + 'a>);
    let crafted: Vec<Crafted> = vec![
        (
            "20990101T000001Z",
            "pg_log",
            Box::new(|m| {
                m.entries.push(BackupEntry {
                    path: "pg_log".into(),
                    mode: 0o777,
                    kind: BackupEntryKind::Symlink { target: sentinel_str.clone() },
                });
                m.entries.push(BackupEntry {
                    path: "pg_log/sub".into(),
                    mode: 0o700,
                    kind: BackupEntryKind::Directory,
                });
                let mut f = pg_version.clone();
                f.path = "pg_log/planted".into();
                m.files.push(f);
            }),
        ),
        (
            "20990101T000002Z",
            &escape,
            Box::new(|m| {
                let mut f = pg_version.clone();
                f.path = escape.clone();
                m.files.push(f);
            }),
        ),
        (
            "20990101T000003Z",
            &absolute,
            Box::new(|m| {
                let mut f = pg_version.clone();
                f.path = absolute.clone();
                m.files.push(f);
            }),
        ),
        (
            "20990101T000004Z",
            "",
            Box::new(|m| {
                for f in m.files.iter_mut().filter(|f| f.path == "PG_VERSION") {
                    f.mode = 0o6755;
                }
                for e in m.entries.iter_mut().filter(|e| e.path == "base") {
                    e.mode = 0o3700;
                }
            }),
        ),
    ];
    for (id, _, craft) in &crafted {
        let mut m = real.clone();
        m.id = id.to_string();
        craft(&mut m);
        rt.block_on(m.store(&repo))?;
    }
    let (repo_before, sentinel_before, restores_before) =
        (snapshot(&env.repo), snapshot(sentinel.path()), snapshot(restores.path()));
    for (id, path, _) in crafted.iter().filter(|c| !c.1.is_empty()) {
        let args = restore(id, &target_arg, false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, message) = expect_failure(&config, &args, &["refusing", id, path]);
        println!("crafted manifest {id} -> {message}");
        let what = format!("restoring crafted backup {id}");
        assert_untouched(sentinel.path(), &sentinel_before, &what);
        assert_untouched(restores.path(), &restores_before, &what);
        assert_untouched(&env.repo, &repo_before, &what);
    }
    // setuid/setgid/sticky are dropped, the rest restored.
    let args = restore("20990101T000004Z", &target_arg, false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_success(&config, &args);
    let mode = |p: &str| std::fs::metadata(target.join(p)).map(|m| m.permissions().mode() & 0o7777);
    ensure!(mode("PG_VERSION")? == 0o755, "PG_VERSION restored with mode {:o}", mode("PG_VERSION")?);
    ensure!(mode("base")? == 0o700, "base restored with mode {:o}", mode("base")?);
    let special = special_modes(&target);
    ensure!(special.is_empty(), "setuid/setgid/sticky modes restored: {special:?}");
    assert_untouched(sentinel.path(), &sentinel_before, "restoring crafted backup 20990101T000004Z");
    assert_untouched(&env.repo, &repo_before, "restoring crafted backup 20990101T000004Z");

    // 3. The server crashes: its postmaster.pid stays, naming a pid that no longer runs.
    // SAFETY: a plain kill(2) of the test's own server process.
    ensure!(unsafe { libc::kill(pid, libc::SIGKILL) } == 0, "kill -9 {pid}");
    wait_until("the killed postmaster to be gone", Duration::from_secs(30), || Ok(!running(pid)))?;
    ensure!(postmaster_pid(&data)? == pid, "the crashed server's postmaster.pid is gone");
    let args = restore(&backup_id, &data_arg, true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_success(&config, &args);
    ensure!(!data.join("postmaster.pid").exists(), "the stale postmaster.pid survived the restore");
    ensure!(data.join("PG_VERSION").exists() && data.join("backup_label").exists(), "the restore is incomplete");
    let leftovers: Vec<PathBuf> =
        names(&parent)?.into_iter().filter(|n| n.contains("pitr-partial")).map(PathBuf::from).collect();
    ensure!(leftovers.is_empty(), "staging left beside the target: {leftovers:?}");
    Ok(())
}
