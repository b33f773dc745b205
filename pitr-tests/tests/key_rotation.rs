//! Repository key rotation by the sidecar (`[schedule] key_rotation`, `pitr_key_age_seconds`) and
//! the key rotation and re-encryption drill (`pitr drill --key-rotation`), against real
//! PostgreSQL servers and a local repository with a key file.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{as_pg_user, spawn_logged, wait_until, PgCluster, PgOptions};

/// (repository key, master key) of every wrap record.
fn wraps(repo: &Path) -> Result<BTreeSet<(String, String)>> {
    let mut out = BTreeSet::new();
    let dir = repo.join("keys/wraps");
    for rk in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let rk = rk?;
        for mk in std::fs::read_dir(rk.path())? {
            let mk = mk?.file_name().to_string_lossy().into_owned();
            if !mk.starts_with(".tmp.") {
                out.insert((rk.file_name().to_string_lossy().into_owned(), mk));
            }
        }
    }
    Ok(out)
}

fn repository_keys(repo: &Path) -> Result<BTreeSet<String>> {
    Ok(wraps(repo)?.into_iter().map(|(rk, _)| rk).collect())
}

/// The value of the unlabelled metric `name` on the sidecar's /metrics, if it is there.
fn metric(env: &PitrEnv, name: &str) -> Result<Option<f64>> {
    let (code, body) = env.http_get("/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    Ok(body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()))
}

/// The key id named in the header of the newest WAL object (whose name sorts last).
fn newest_wal_object_key(env: &PitrEnv) -> Result<(String, String)> {
    let name = env
        .wal_objects()?
        .into_iter()
        .rfind(|n| n.ends_with(".seg") || n.ends_with(".chunk"))
        .context("no WAL object")?;
    let bytes =
        env.objects().read(&format!("{}{name}", env.wal_prefix()?)).with_context(|| format!("reading {name}"))?;
    let prefix = &bytes[..bytes.len().min(pitr_archive::seal::KEY_ID_PREFIX_LEN as usize)];
    Ok((name.clone(), pitr_archive::seal::peek_key_id(&name, prefix)?))
}

#[test]
fn sidecar_rotates_the_repository_key_and_exports_its_age() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("key-rotation", &cluster, "")?;
    env.edit_config("expire = \"\"", "expire = \"\"\nkey_rotation = \"5s\"")?;
    env.init()?;
    let initial = repository_keys(env.repo_path())?;
    assert_eq!(initial.len(), 1, "pitr init made {initial:?}");
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key)")?;

    // The age is exported, grows, and drops when the sidecar makes a new key (checked every
    // 2.5 s with a 5 s rotation).
    let started = Instant::now();
    let (mut highest, mut dropped) = (0.0f64, false);
    let mut seen = Vec::new();
    while started.elapsed() < Duration::from_secs(70) {
        if let Some(age) = metric(&env, "pitr_key_age_seconds")? {
            seen.push(age);
            if age + 1.0 < highest {
                dropped = true;
            }
            highest = highest.max(age);
        }
        if dropped && repository_keys(env.repo_path())?.len() > 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let keys = repository_keys(env.repo_path())?;
    assert!(keys.len() > 1, "no new repository key within 70 s: {keys:?}\n{}", env.stream_logs());
    assert!(!seen.is_empty(), "/metrics never showed pitr_key_age_seconds");
    assert!(dropped && highest >= 2.0, "pitr_key_age_seconds did not grow then drop: {seen:?}");

    // Objects written after the rotation name a new key.
    cluster.psql("insert into t select generate_series(1, 1000)")?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to catch up")?;
    let mut found = None;
    wait_until("the newest WAL object to be readable", Duration::from_secs(30), || {
        found = newest_wal_object_key(&env).ok();
        Ok(found.is_some())
    })?;
    let (object, key) = found.context("no WAL object read")?;
    assert!(!initial.contains(&key), "{object} is sealed with the first key {key}, not a rotated one");
    assert!(repository_keys(env.repo_path())?.contains(&key), "{object} names {key}, which has no wrap");

    let logs = env.stream_logs();
    assert!(logs.contains("rotated the repository key"), "{logs}");
    let (_, body) = env.http_get("/metrics")?;
    assert!(body.contains("pitr_scheduled_runs_total{job=\"key_rotation\",result=\"success\"}"), "{body}");
    env.stop_stream(&mut stream)?;
    Ok(())
}

/// `pitr drill --key-rotation --to <to> --checks <checks> --json --db-user postgres <extra>` as
/// the server user: whether it exited 0, and its JSON report.
fn key_drill(env: &PitrEnv, to: &str, checks: &Path, extra: &[&str]) -> Result<(bool, serde_json::Value)> {
    let checks = checks.display().to_string();
    let mut args = vec!["drill", "--key-rotation", "--to", to, "--checks", &checks, "--json", "--db-user", "postgres"];
    args.extend_from_slice(extra);
    env.run_json_as_pg_user(&args)
}

#[test]
fn key_rotation_drill_restores_with_the_rewrapped_keys_alone() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("key-drill", &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table users(id int primary key, name text)")?;
    cluster.psql("insert into users select g, 'u' || g from generate_series(1, 100) g")?;
    env.run_ok(&["backup"])?;
    cluster.psql("insert into users select g, 'u' || g from generate_series(101, 200) g")?;
    std::thread::sleep(Duration::from_millis(1100));
    let moment = cluster.psql("select clock_timestamp()")?;
    let recorded = cluster.psql("select count(*) || ':' || sum(id) from users")?;
    std::thread::sleep(Duration::from_millis(1100));
    cluster.psql("insert into users select g, 'u' || g from generate_series(201, 300) g")?;
    env.wait_archived(cluster.current_lsn()?, "archive")?;
    let before = repository_keys(env.repo_path())?;

    let checks = env.dir.path().join("checks.toml");
    std::fs::write(
        &checks,
        format!(
            "[[check]]\nname = \"users as recorded on the primary\"\nsql = \"select count(*) || ':' || sum(id) from users\"\n\
             [[check.recorded]]\nat = \"{moment}\"\nvalue = \"{recorded}\"\n"
        ),
    )?;
    pitr_tests::chown_to_pg_user(&checks)?;
    let report_md = env.dir.path().join("report.md");
    let report_arg = report_md.display().to_string();
    let (ok, report) = key_drill(&env, &moment, &checks, &["--report", &report_arg])?;
    assert!(ok, "key rotation drill did not pass: {report:#}");
    assert_eq!(report["outcome"], "PASS", "{report:#}");
    let k = &report["key_rotation"];
    let new_key = k["new_repository_key"].as_str().context("new_repository_key")?.to_string();
    let after = repository_keys(env.repo_path())?;
    assert!(!before.contains(&new_key) && after.contains(&new_key), "{new_key}: before {before:?}, after {after:?}");
    // Every repository key (the old one and the new one) was wrapped under the drill key, the
    // restore used that key alone, and its wraps are gone.
    assert_eq!(k["rewrapped_keys"].as_u64(), Some(after.len() as u64), "{report:#}");
    assert_eq!(k["wraps_removed"], k["rewrapped_keys"], "{report:#}");
    assert_eq!(k["restored_with_drill_key_alone"], true, "{report:#}");
    let drill_key = k["drill_master_key"].as_str().context("drill_master_key")?;
    assert!(drill_key.starts_with("drill-"), "{drill_key}");
    let left: Vec<_> = wraps(env.repo_path())?.into_iter().filter(|(_, mk)| mk.starts_with("drill-")).collect();
    assert!(left.is_empty(), "drill wraps left behind: {left:?}");
    let recorded_check = report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "users as recorded on the primary").cloned());
    assert_eq!(recorded_check.map(|c| c["result"].clone()), Some(serde_json::json!("pass")), "{report:#}");
    let md = std::fs::read_to_string(&report_md)?;
    for field in [
        "**Scenario**: Key rotation and re-encryption drill: ",
        "## Key rotation and re-encryption drill",
        &format!("**New Repository Key**: {new_key}"),
        &format!("**Repository Keys Rewrapped**: {} (under the drill-only master key {drill_key})", after.len()),
        "**Restore With The Rewrapped Keys Alone**: PASS",
        "**Outcome**: PASS",
    ] {
        assert!(md.contains(field), "report lacks {field:?}:\n{md}");
    }
    // No key file of the drill is left in the temporary directory.
    assert!(!std::fs::read_dir(std::env::temp_dir())?
        .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("pitr-key-drill-"))));

    // A drill that fails (a check that cannot hold) removes its wraps too.
    std::fs::write(
        &checks,
        "[[check]]\nname = \"impossible\"\nsql = \"select count(*) from users\"\nexpect = \"> 1000000\"\n",
    )?;
    let (ok, report) = key_drill(&env, "latest", &checks, &[])?;
    assert!(!ok, "{report:#}");
    assert_eq!(report["outcome"], "FAIL", "{report:#}");
    assert_eq!(report["key_rotation"]["wraps_removed"], report["key_rotation"]["rewrapped_keys"], "{report:#}");
    let left: Vec<_> = wraps(env.repo_path())?.into_iter().filter(|(_, mk)| mk.starts_with("drill-")).collect();
    assert!(left.is_empty(), "drill wraps left behind after a failed drill: {left:?}");
    // Restores with the configured keys still work after two drill rotations.
    let verify: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--json"])?)?;
    assert_eq!(verify["ok"], true, "{verify:#}");
    Ok(())
}

#[test]
fn the_scheduled_drill_can_be_a_key_rotation_drill() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let env = PitrEnv::new("key-drill-scheduled", &cluster, "")?;
    // A drill every 20 s, of the key rotation kind.
    env.edit_config("drill = \"\"", "drill = \"*/20 * * * * *\"")?;
    std::fs::write(&env.config, format!("{}\n[drill]\nkey_rotation = true\n", std::fs::read_to_string(&env.config)?))?;
    env.init()?;
    env.share_with_pg_user()?;
    // The scheduled drill starts a scratch server, which refuses to run as root: the sidecar
    // runs as the server user, as it does in production.
    let log = env.dir.path().join("stream-sidecar.log");
    let mut cmd = env.command(&["stream"]);
    as_pg_user(&mut cmd);
    if let Some(u) = pitr_tests::pg_user() {
        cmd.env("USER", &u.name).env("HOME", env.dir.path());
    }
    cmd.env("PITR_LOG", "info");
    let mut stream = spawn_logged(cmd, &log)?;
    env.wait_streaming(&cluster).with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    cluster.psql("create table t (id int primary key)")?;
    cluster.psql("insert into t select generate_series(1, 100)")?;
    let out = env.run_as_pg_user(&["backup"])?;
    ensure!(out.status.success(), "pitr backup: {}", String::from_utf8_lossy(&out.stderr));
    cluster.psql("insert into t select generate_series(101, 200)")?;
    let before = repository_keys(env.repo_path())?;

    let mut text = String::new();
    wait_until("a scheduled key rotation drill", Duration::from_secs(120), || {
        text = std::fs::read_to_string(&log)?;
        // A drill that ran before the backup fails (nothing to restore yet); the next one passes.
        // The job's own line comes after the drill's, once its metrics are set.
        Ok(text.contains("Key rotation and re-encryption drill done") && text.contains("result=PASS"))
    })
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    let done = text.lines().find(|l| l.contains("Key rotation and re-encryption drill done")).map(str::to_string);
    let done = done.with_context(|| format!("no key rotation drill line in the log:\n{text}"))?;
    assert!(done.contains("restored_with_drill_key_alone=true"), "{done}");
    assert!(text.contains("scheduled drill done") && text.contains("result=PASS"), "{text}");
    let after = repository_keys(env.repo_path())?;
    assert!(after.len() > before.len(), "the drill made no new repository key: {before:?} → {after:?}");
    let left: Vec<_> = wraps(env.repo_path())?.into_iter().filter(|(_, mk)| mk.starts_with("drill-")).collect();
    assert!(left.is_empty(), "drill wraps left behind: {left:?}");
    assert_eq!(metric(&env, "pitr_drill_success")?, Some(1.0));
    stream.signal(libc::SIGTERM)?;
    stream.wait_timeout(Duration::from_secs(60))?.context("pitr stream did not stop")?;
    Ok(())
}
