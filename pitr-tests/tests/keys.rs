//! `pitr keys rotate | rewrap | retire` against a real PostgreSQL 15 and a local repository:
//! - rotate (a new master key in the key file, a new repository key), more WAL and a backup,
//!   rewrap, retire the old master key (gone from the key file): restores to moments before and
//!   after the rotation are exact, `verify --deep` passes, and objects planted with the retired
//!   key are named by `verify` (a history file) and `verify --deep` (a WAL segment);
//! - a kill -9 in the middle of `rewrap` (slowed down by strace): some repository keys moved,
//!   some not, a restore works in that state, a rerun finishes, retire works, restore works;
//! - retire refused (active key, key still wrapping a repository key), changing nothing;
//! - master keys from `key_env` and `key_command`: stream, backup, exact restore; a failing
//!   `key_command` is one clear error naming it and its stderr.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_archive::names::pg;
use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta, Repository};
use pitr_tests::checks::{assert_untouched, expect_failure, expect_success, snapshot};
use pitr_tests::pitr::{PitrEnv, WAL_SEGMENT_SIZE};
use pitr_tests::{client_bin, lsn_to_u64, scratch_dir, spawn_logged, wait_until, Child, PgCluster, PgOptions};

/// The table's state: row count and a hash of its content.
const STATE_SQL: &str =
    "select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t";

fn json(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| text.to_string())
}

/// The `(id, hex)` of each key line of a key file (or key text).
fn key_lines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| l.starts_with("pitr-key-v1 "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace().skip(1);
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

fn key_bytes(hex: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).context("short key")?, 16)?;
    }
    Ok(out)
}

/// `keys list --json`.
fn key_listing(env: &PitrEnv) -> Result<serde_json::Value> {
    json(&env.run_ok(&["keys", "list", "--json"])?)
}

/// Repository key id → the master keys wrapping it, from `keys list --json`.
fn wrapped_by(listing: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    listing["repository_keys"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| {
            let by = k["wrapped_by"].as_array().into_iter().flatten().filter_map(|m| m.as_str().map(String::from));
            (k["id"].as_str().unwrap_or_default().to_string(), by.collect())
        })
        .collect()
}

fn wait_archived(env: &PitrEnv, cluster: &PgCluster) -> Result<()> {
    let lsn = lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    env.wait_archived(lsn, "the archive to catch up")
}

/// Inserts rows `from..from+n`, then notes the moment and the table's state at it.
fn insert_and_note(cluster: &PgCluster, from: i32, n: i32) -> Result<(String, String)> {
    cluster.psql(&format!("insert into t select g, md5(g::text) from generate_series({from}, {}) g", from + n - 1))?;
    std::thread::sleep(Duration::from_millis(300));
    let at = cluster.psql("select clock_timestamp()")?;
    let state = cluster.psql(STATE_SQL)?;
    std::thread::sleep(Duration::from_millis(300));
    // A commit after the moment, so that the archive reaches past it once this WAL is archived.
    cluster.psql("create table if not exists after_moment (x int); insert into after_moment values (1)")?;
    Ok((at, state))
}

/// A server `pitr restore --start` brought up; stopped when dropped.
struct Restored {
    dir: tempfile::TempDir,
    port: u16,
    bin_dir: PathBuf,
}

impl Restored {
    fn target(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new(client_bin("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", &self.target().display().to_string()])
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql on the restored server: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let mut cmd = Command::new(self.bin_dir.join("pg_ctl"));
        cmd.args(["-D", &self.target().display().to_string(), "-m", "immediate", "-w", "stop"]);
        pitr_tests::as_pg_user(&mut cmd);
        let _ = cmd.output();
    }
}

/// `pitr <args>` as the server user, with `vars` in its environment only.
fn run_as_pg_user_with(env: &PitrEnv, args: &[&str], vars: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = env.command(args);
    cmd.envs(vars.iter().copied());
    pitr_tests::as_pg_user(&mut cmd);
    if let Some(u) = pitr_tests::pg_user() {
        cmd.env("USER", &u.name).env("HOME", env.dir.path());
    }
    cmd.output().with_context(|| format!("running pitr {args:?} as the server user"))
}

/// `pitr restore --to <to> --start` as the server user into a fresh directory; the restored
/// table's state.
fn restore_state(env: &PitrEnv, cluster: &PgCluster, to: &str, vars: &[(&str, &str)]) -> Result<String> {
    let dir = scratch_dir("keys-restored");
    pitr_tests::chown_to_pg_user(dir.path())?;
    let port = pitr_tests::free_port()?;
    let restored = Restored { dir, port, bin_dir: cluster.bin_dir().to_path_buf() };
    let target = restored.target().display().to_string();
    let port = port.to_string();
    let args = ["restore", "--to", to, "--target-dir", &target, "--start", "--port", &port, "--db-user", "postgres"];
    let out = run_as_pg_user_with(env, &[&args[..], &["--timeout", "120s"]].concat(), vars)?;
    if !out.status.success() {
        bail!(
            "pitr restore --to {to} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    restored.psql(STATE_SQL)
}

/// `verify [--deep] --json`: whether it passed, and the report.
fn verify(env: &PitrEnv, deep: bool) -> Result<(bool, serde_json::Value)> {
    let mut args = vec!["verify", "--json"];
    if deep {
        args.push("--deep");
    }
    let out = env.run(&args)?;
    let report = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .with_context(|| format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))?;
    assert_eq!(out.status.success(), report["ok"].as_bool() == Some(true), "exit status and report disagree: {report}");
    Ok((out.status.success(), report))
}

/// The findings of `kind` naming `object`.
fn findings_about<'a>(report: &'a serde_json::Value, kind: &str, object: &str) -> Vec<&'a serde_json::Value> {
    report["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == kind && f["object"].as_str() == Some(object))
        .collect()
}

/// The system id of the (only) cluster in the local repository.
fn system_id(env: &PitrEnv) -> Result<u64> {
    let dir = env.wal_dir()?;
    let id = dir.parent().and_then(|p| p.file_name()).context("no cluster directory")?;
    Ok(id.to_string_lossy().parse()?)
}

/// Seals `plaintext` as `name` in the local repository with the master key `(id, key)` itself,
/// as someone holding that key (but not the repository's current keys) can.
fn plant_sealed(
    env: &PitrEnv,
    id: &str,
    key: [u8; 32],
    name: &str,
    plaintext: Vec<u8>,
    kind: ObjectKind,
) -> Result<()> {
    env.objects().run(|store| async move {
        let repo = Repository::new(Arc::new(store), KeyRing::from_key(id, key));
        repo.put_sealed(name, plaintext, ObjectMeta::plain(kind)).await
    })?;
    Ok(())
}

#[test]
fn rotate_rewrap_retire_keeps_every_moment_restorable() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("keys-rotate", &cluster, "")?;
    // The sidecar picks up the new repository key within a second of the rotation.
    env.edit_config("[encryption]\n", "[encryption]\nkey_cache_ttl = \"1s\"\n")?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert_and_note(&cluster, 0, 500)?;
    env.run_ok(&["backup"])?;
    let (t1, state1) = insert_and_note(&cluster, 500, 500)?;
    wait_archived(&env, &cluster)?;

    let before = key_lines(&std::fs::read_to_string(&env.key_file)?);
    assert_eq!(before.len(), 1, "{before:?}");
    let (old_id, old_hex) = before[0].clone();
    let old_listing = key_listing(&env)?;
    let old_rk = wrapped_by(&old_listing);
    assert_eq!(old_rk.len(), 1, "{old_listing:#}");

    let rotated = json(&env.run_ok(&["keys", "rotate", "--json"])?)?;
    let new_id = rotated["new_master_key"].as_str().context("no new master key")?.to_string();
    let after = key_lines(&std::fs::read_to_string(&env.key_file)?);
    assert_eq!(after.iter().map(|k| k.0.clone()).collect::<Vec<_>>(), vec![old_id.clone(), new_id.clone()]);
    let listing = key_listing(&env)?;
    let rks = listing["repository_keys"].as_array().context("repository_keys")?;
    assert_eq!(rks.len(), 2, "{listing:#}");
    let active: Vec<&str> = rks.iter().filter(|k| k["active"] == true).filter_map(|k| k["id"].as_str()).collect();
    assert_eq!(active, vec![rotated["repository_key"].as_str().context("repository_key")?], "{listing:#}");
    let active_master: Vec<&str> = listing["master_keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| k["active"] == true)
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert_eq!(active_master, vec![new_id.as_str()], "{listing:#}");

    std::thread::sleep(Duration::from_millis(1500));
    insert_and_note(&cluster, 1000, 500)?;
    cluster.psql("select pg_switch_wal()")?;
    env.run_ok(&["backup"])?;
    let (t2, state2) = insert_and_note(&cluster, 1500, 500)?;
    wait_archived(&env, &cluster)?;

    let rewrap = json(&env.run_ok(&["keys", "rewrap", "--json"])?)?;
    assert_eq!(rewrap["to"], new_id.as_str(), "{rewrap:#}");
    assert_eq!(rewrap["rewrapped"].as_array().map(Vec::len), Some(1), "only the old repository key moves: {rewrap:#}");
    let old_key_file = std::fs::read_to_string(&env.key_file)?;
    let retired = json(&env.run_ok(&["keys", "retire", &old_id, "--json"])?)?;
    assert_eq!(retired["removed_from_key_file"], true, "{retired:#}");
    let left = key_lines(&std::fs::read_to_string(&env.key_file)?);
    assert_eq!(left.iter().map(|k| k.0.clone()).collect::<Vec<_>>(), vec![new_id.clone()]);
    assert!(old_key_file.contains(&old_hex));
    let listing = key_listing(&env)?;
    for (rk, by) in wrapped_by(&listing) {
        assert_eq!(
            by,
            vec![new_id.clone()],
            "repository key {rk} is not wrapped by the new master key alone: {listing:#}"
        );
    }
    // Both repository keys seal objects: the old one what came before the rotation, the new one after.
    for k in listing["repository_keys"].as_array().into_iter().flatten() {
        assert!(k["objects"].as_u64() > Some(0), "repository key {} seals nothing: {listing:#}", k["id"]);
    }

    // Every moment restores exactly with the new master key alone.
    assert_eq!(restore_state(&env, &cluster, &t1, &[])?, state1, "restore to {t1} (before the rotation)");
    assert_eq!(restore_state(&env, &cluster, &t2, &[])?, state2, "restore to {t2} (after the rotation)");
    let (ok, report) = verify(&env, true)?;
    assert!(ok, "verify --deep after rotate, rewrap, retire: {report:#}");
    env.stop_stream(&mut stream)?;

    // Planted with the retired key: a history file (which `verify` reads without --deep) ...
    let old_key = key_bytes(&old_hex)?;
    let sysid = system_id(&env)?;
    let history = pg::wal_history(sysid, 7);
    plant_sealed(
        &env,
        &old_id,
        old_key,
        &history,
        b"1\t0/3000000\tno recovery target specified\n".to_vec(),
        ObjectKind::TimelineHistory,
    )?;
    let out = env.run(&["verify"])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "verify passed with {history} planted:\n{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("retired-key") && l.contains(&history) && l.contains(&format!("retired key {old_id}"))),
        "verify does not name {history} and retired key {old_id}:\n{text}"
    );
    let (ok, report) = verify(&env, false)?;
    assert!(!ok && findings_about(&report, "retired-key", &history).len() == 1, "{report:#}");
    env.objects().delete(&[history])?;

    // ... and a WAL segment in place of an archived one, which only --deep opens.
    let victim = env.wal_objects()?.into_iter().find(|n| n.ends_with(".seg")).context("no whole segment archived")?;
    let name = format!("{}{victim}", env.wal_prefix()?);
    let saved = env.objects().read(&name)?;
    env.objects().delete(std::slice::from_ref(&name))?;
    plant_sealed(&env, &old_id, old_key, &name, vec![0; WAL_SEGMENT_SIZE as usize], ObjectKind::WalSegment)?;
    let (ok, report) = verify(&env, true)?;
    assert!(!ok, "verify --deep passed with {name} planted: {report:#}");
    let found = findings_about(&report, "retired-key", &name);
    assert_eq!(found.len(), 1, "no retired-key finding naming {name}: {report:#}");
    assert!(found[0]["message"].as_str().is_some_and(|m| m.contains(&format!("retired key {old_id}"))), "{report:#}");
    env.objects().replace(&name, saved)?;
    let (ok, report) = verify(&env, true)?;
    assert!(ok, "verify --deep with the planted objects gone: {report:#}");
    Ok(())
}

/// Repository keys in the local repository's `keys/wraps/` (read straight from the directories):
/// (wrapped by `old` still, wrapped by `new` only).
fn wraps_on_disk(repo: &Path, old: &str, new: &str) -> (usize, usize) {
    let (mut with_old, mut moved) = (0, 0);
    for rk in std::fs::read_dir(repo.join("keys/wraps")).into_iter().flatten().flatten() {
        let has = |m: &str| rk.path().join(m).exists();
        if has(old) {
            with_old += 1;
        } else if has(new) {
            moved += 1;
        }
    }
    (with_old, moved)
}

#[test]
fn kill_during_rewrap_then_rerun_finishes() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("keys-kill", &cluster, "")?;
    env.edit_config("[encryption]\n", "[encryption]\nkey_cache_ttl = \"1s\"\n")?;
    env.init()?;
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert_and_note(&cluster, 0, 300)?;
    env.run_ok(&["backup"])?;
    // 30 repository keys under the first master key, objects sealed with several of them.
    let old_id = key_lines(&std::fs::read_to_string(&env.key_file)?)[0].0.clone();
    let store = LocalStore::new(&env.repo);
    let ring = KeyRing::load(&env.key_file)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for i in 0..30 {
        rt.block_on(ring.rotate(&store))?;
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(1200));
            insert_and_note(&cluster, 300 + i * 100, 100)?;
            cluster.psql("select pg_switch_wal()")?;
        }
    }
    let (t, state) = insert_and_note(&cluster, 5000, 100)?;
    wait_archived(&env, &cluster)?;
    let rotated = json(&env.run_ok(&["keys", "rotate", "--json"])?)?;
    let new_id = rotated["new_master_key"].as_str().context("no new master key")?.to_string();
    let listing = key_listing(&env)?;
    let used =
        listing["repository_keys"].as_array().into_iter().flatten().filter(|k| k["objects"].as_u64() > Some(0)).count();
    assert!(used >= 3, "objects are sealed with fewer than 3 repository keys: {listing:#}");
    assert_eq!(wraps_on_disk(&env.repo, &old_id, &new_id), (31, 1));

    // Each unlink (every delete, and every put's temporary file) slowed down by 200 ms.
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o", "/dev/null", "-e", "inject=unlink:delay_exit=200000"]);
    cmd.arg(pitr_tests::pitr_bin()).arg("--config").arg(&env.config).args(["keys", "rewrap"]);
    cmd.process_group(0);
    let mut rewrap: Child = spawn_logged(cmd, &env.dir.path().join("rewrap.log"))?;
    wait_until("rewrap to be half-way", Duration::from_secs(120), || {
        if let Some(status) = rewrap.try_wait()? {
            bail!(
                "rewrap finished ({status}) before it could be killed: {:?}",
                std::fs::read_to_string(env.dir.path().join("rewrap.log"))
            );
        }
        let (with_old, moved) = wraps_on_disk(&env.repo, &old_id, &new_id);
        Ok(moved >= 6 && with_old >= 5)
    })?;
    // SAFETY: kill has no memory-safety preconditions; the group is strace's and pitr's.
    let pgid = libc::pid_t::try_from(rewrap.id())?;
    assert_eq!(unsafe { libc::kill(-pgid, libc::SIGKILL) }, 0, "kill -9 of the rewrap");
    rewrap.wait_timeout(Duration::from_secs(10))?.context("rewrap did not die")?;

    let listing = key_listing(&env)?;
    let keys = wrapped_by(&listing);
    let moved = keys.iter().filter(|(_, by)| !by.contains(&old_id)).count();
    let not_moved = keys.iter().filter(|(_, by)| by.contains(&old_id)).count();
    assert!(moved > 0 && not_moved > 0, "expected some keys moved and some not after the kill: {listing:#}");
    assert!(keys.iter().all(|(_, by)| !by.is_empty()), "a repository key lost every wrap: {listing:#}");
    assert_eq!(restore_state(&env, &cluster, &t, &[])?, state, "restore to {t} in the middle of the rewrap");
    let retire_early = env.run(&["keys", "retire", &old_id])?;
    assert!(!retire_early.status.success(), "retire succeeded with keys still wrapped by {old_id}");

    let rerun = json(&env.run_ok(&["keys", "rewrap", "--json"])?)?;
    assert!(rerun["rewrapped"].as_array().map(Vec::len) == Some(not_moved), "the rerun moves what was left: {rerun:#}");
    assert_eq!(wraps_on_disk(&env.repo, &old_id, &new_id), (0, 32));
    env.run_ok(&["keys", "retire", &old_id])?;
    assert!(!std::fs::read_to_string(&env.key_file)?.contains(&old_id));
    assert_eq!(restore_state(&env, &cluster, &t, &[])?, state, "restore to {t} after the rewrap and retire");
    let (ok, report) = verify(&env, false)?;
    assert!(ok, "{report:#}");
    Ok(())
}

#[test]
fn retire_is_refused_while_needed() -> Result<()> {
    let dir = scratch_dir("keys-refused");
    let (repo, key_file, config) = (dir.path().join("repo"), dir.path().join("key"), dir.path().join("pitr.toml"));
    std::fs::write(&config, format!("[repository]\npath = {:?}\n[encryption]\nkey_file = {:?}\n", repo, key_file))?;
    expect_success(&config, &["init"]);
    let first = key_lines(&std::fs::read_to_string(&key_file)?)[0].0.clone();

    let unchanged = |what: &str, f: &dyn Fn()| {
        let (repo_before, key_before) = (snapshot(&repo), std::fs::read(&key_file).unwrap_or_default());
        f();
        assert_untouched(&repo, &repo_before, what);
        assert_eq!(std::fs::read(&key_file).unwrap_or_default(), key_before, "{what} changed the key file");
    };
    unchanged("retire of the active key", &|| {
        expect_failure(&config, &["keys", "retire", &first], &[&first, "active master key", "pitr keys rotate"]);
    });
    expect_success(&config, &["keys", "rotate"]);
    unchanged("retire of a key wrapping a repository key", &|| {
        let (_, message) = expect_failure(
            &config,
            &["keys", "retire", &first],
            &[&format!("master key {first} still wraps repository keys"), &format!("pitr keys rewrap --from {first}")],
        );
        assert!(message.contains(" r"), "the message names no repository key: {message}");
    });
    unchanged("retire --json of a key wrapping a repository key", &|| {
        expect_failure(&config, &["keys", "retire", &first, "--json"], &["still wraps"]);
    });
    // Once rewrapped, the same retire goes through.
    expect_success(&config, &["keys", "rewrap", "--from", &first]);
    expect_success(&config, &["keys", "retire", &first]);
    assert!(!std::fs::read_to_string(&key_file)?.contains(&first));
    Ok(())
}

/// Stream, backup and an exact restore with the master key from `source` (config lines put in
/// place of `key_file`), with `vars` in each pitr process's environment only.
fn source_round_trip(
    name: &str,
    source: &str,
    vars: &[(&str, &str)],
    before_init: impl FnOnce(&PitrEnv) -> Result<()>,
) -> Result<PitrEnv> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let env = PitrEnv::new(name, &cluster, "")?;
    env.edit_config(&format!("key_file = {:?}", env.key_file.display().to_string()), source)?;
    before_init(&env)?;
    let run_ok = |args: &[&str]| -> Result<String> {
        let out = env.command(args).envs(vars.iter().copied()).output()?;
        if !out.status.success() {
            bail!(
                "pitr {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let init = run_ok(&["init"])?;
    assert!(!env.key_file.exists(), "init made a key file although {source} is configured: {init}");
    env.share_with_pg_user()?;
    let mut stream_cmd = env.command(&["stream"]);
    stream_cmd.envs(vars.iter().copied());
    let _stream = spawn_logged(stream_cmd, &env.dir.path().join("stream.log"))?;
    wait_until("pitr stream to be streaming", Duration::from_secs(60), || {
        Ok(cluster.psql("select count(*) from pg_stat_replication where application_name = 'pitr_main'")? == "1")
    })
    .with_context(|| std::fs::read_to_string(env.dir.path().join("stream.log")).unwrap_or_default())?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert_and_note(&cluster, 0, 500)?;
    run_ok(&["backup"])?;
    let (at, state) = insert_and_note(&cluster, 500, 500)?;
    let lsn = lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    wait_until("the archive to catch up", Duration::from_secs(60), || Ok(env.archived_end(WAL_SEGMENT_SIZE)? >= lsn))?;
    let listing = json(&run_ok(&["keys", "list", "--json"])?)?;
    let kinds: Vec<&str> =
        listing["master_keys"].as_array().into_iter().flatten().filter_map(|k| k["source"].as_str()).collect();
    assert_eq!(kinds.len(), 1, "{listing:#}");
    assert!(source.starts_with(kinds[0]), "keys list says source {} for {source}", kinds[0]);
    assert_eq!(restore_state(&env, &cluster, &at, vars)?, state, "restore to {at} with {source}");
    Ok(env)
}

#[test]
fn key_env_and_key_command_sources() -> Result<()> {
    let line = format!("pitr-key-v1 e1 {}", "5a".repeat(32));
    let env = source_round_trip(
        "keys-env",
        "key_env = \"PITR_TEST_MASTER_KEYS\"",
        &[("PITR_TEST_MASTER_KEYS", &line)],
        |_| Ok(()),
    )?;
    // Without the variable (this process does not have it), one clear error naming it.
    expect_failure(&env.config, &["list"], &["key_env PITR_TEST_MASTER_KEYS"]);

    let cmd_line = format!("pitr-key-v1 c1 {}", "c3".repeat(32));
    let script: std::cell::RefCell<PathBuf> = Default::default();
    let env = source_round_trip("keys-command", "key_command = [\"@SCRIPT@\"]", &[], |env| {
        let path = env.dir.path().join("print-key");
        std::fs::write(&path, format!("#!/bin/sh\necho '# from the secret manager'\necho '{cmd_line}'\n"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        env.edit_config("@SCRIPT@", &path.display().to_string())?;
        *script.borrow_mut() = path;
        Ok(())
    })?;
    let script = script.into_inner();
    // A key_command that fails: one error naming the command and what it said on stderr.
    std::fs::write(&script, "#!/bin/sh\necho 'vault is sealed' >&2\nexit 3\n")?;
    let (_, message) =
        expect_failure(&env.config, &["list"], &["key_command", &script.display().to_string(), "vault is sealed"]);
    assert!(message.contains("exit"), "{message}");
    Ok(())
}
