//! `pitr check`, the preflight: against a well-configured PostgreSQL 15 primary every line is OK
//! and it exits 0; each misconfiguration an SRE meets (a role without REPLICATION, pg_hba
//! rejecting replication, another key, a repository path that is a file, restore binaries
//! missing, a missing slot with `create_slot = false`, `wal_level = minimal`, a broken config)
//! turns exactly its line into a FAIL with a fix, and the exit status into 1.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use pitr_tests::checks::{expect_success, run_pitr};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{PgCluster, PgOptions};
use serde_json::Value;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const KEY: &str = "key opens repository";
const WRITABLE: &str = "repository writable";
const ROLE: &str = "postgres role has REPLICATION";
const REPL: &str = "replication connection (pg_hba)";
const SLOT: &str = "replication slot";
const WAL_LEVEL: &str = "wal_level";
const BINS: &str = "postgres binaries for restores";

/// Runs `pitr check --json` with `config`: (exit code, the checks by name, the whole report).
fn check(config: &Path) -> Result<(i32, Vec<Value>, Value)> {
    let out = run_pitr(config, &["check", "--json"]);
    let code = out.status.code().context("pitr check killed by a signal")?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!("pitr check --json printed no JSON:\n{}\n{}", lossy(&out.stdout), lossy(&out.stderr))
    })?;
    let checks = report["checks"].as_array().context("no \"checks\" array")?.clone();
    ensure!(report["ok"].as_bool() == Some(code == 0), "\"ok\" disagrees with exit {code}: {report:#}");
    Ok((code, checks, report))
}

fn line<'a>(checks: &'a [Value], name: &str) -> Result<&'a Value> {
    checks.iter().find(|c| c["name"] == name).with_context(|| format!("no check {name:?} in {checks:#?}"))
}

/// `pitr check` with `config` exits 1 and check `name` fails, its fix naming `fix`; the checks in
/// `also_ok` still pass (the failure is pinned to its own line).
fn expect_fail(config: &Path, name: &str, fix: &str, also_ok: &[&str]) -> Result<()> {
    let (code, checks, report) = check(config)?;
    ensure!(code == 1, "exit {code}, expected 1 for a failing {name:?}: {report:#}");
    let c = line(&checks, name)?;
    ensure!(c["ok"] == false, "{name:?} passed: {report:#}");
    let got = c["fix"].as_str().unwrap_or_default();
    ensure!(got.contains(fix), "{name:?}: the fix {got:?} does not name {fix:?}");
    for ok in also_ok {
        ensure!(line(&checks, ok)?["ok"] == true, "{ok:?} failed too: {report:#}");
    }
    Ok(())
}

/// A copy of `env`'s config with `from` replaced by `to`, in `env`'s directory as `file`.
fn variant(env: &PitrEnv, file: &str, from: &str, to: &str) -> Result<PathBuf> {
    let text = std::fs::read_to_string(&env.config)?;
    ensure!(text.contains(from), "{from:?} not in {}", env.config.display());
    let path = env.dir.path().join(file);
    std::fs::write(&path, text.replacen(from, to, 1))?;
    Ok(path)
}

#[test]
fn check_passes_a_good_setup_and_pins_each_misconfiguration_to_its_line() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let env = PitrEnv::new("check", &cluster, "")?;
    expect_success(&env.config, &["init"]);

    // Well configured: every line OK, exit 0, and the text form says so line by line.
    let (code, checks, report) = check(&env.config)?;
    ensure!(code == 0, "exit {code} on a good setup: {report:#}");
    for name in [
        "config",
        KEY,
        WRITABLE,
        ROLE,
        REPL,
        SLOT,
        WAL_LEVEL,
        "max_wal_senders",
        "synchronous_standby_names",
        BINS,
        "clock skew",
    ] {
        ensure!(line(&checks, name)?["ok"] == true, "{name:?} failed on a good setup: {report:#}");
    }
    let sync = line(&checks, "synchronous_standby_names")?["detail"].to_string();
    ensure!(sync.contains("does not name pitr_main") && sync.contains("2 ms apart"), "{sync}");
    // Named (in a list, another case): the check says commits wait for the archive. Nothing commits
    // on the server meanwhile (no sidecar runs to confirm it), and it is reset at once.
    cluster.psql("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (other, \"PITR_Main\")'")?;
    cluster.psql("SELECT pg_reload_conf()")?;
    let (_, checks, report) = check(&env.config)?;
    cluster.psql("ALTER SYSTEM RESET synchronous_standby_names")?;
    cluster.psql("SELECT pg_reload_conf()")?;
    let sync = line(&checks, "synchronous_standby_names")?;
    ensure!(sync["ok"] == true, "{report:#}");
    ensure!(sync["detail"].to_string().contains("names pitr_main: the primary's commits wait"), "{report:#}");
    let text = expect_success(&env.config, &["check"]);
    eprintln!("pitr check on a good setup:\n{text}");
    ensure!(text.lines().all(|l| l.starts_with("OK   ")), "not all OK:\n{text}");
    // The probe object is gone again.
    let probes = env.repo.join("pitr-probe");
    ensure!(
        !probes.exists() || std::fs::read_dir(&probes)?.next().is_none(),
        "probe objects left in {}",
        probes.display()
    );

    // Another key file (made by `pitr init` of a second repository).
    let other = PitrEnv::new("check-other", &cluster, "")?;
    expect_success(&other.config, &["init"]);
    let wrong_key = variant(
        &env,
        "wrong-key.toml",
        &format!("key_file = {:?}", env.key_file.display().to_string()),
        &format!("key_file = {:?}", other.key_file.display().to_string()),
    )?;
    expect_fail(&wrong_key, KEY, "key_file", &[WRITABLE, ROLE, REPL])?;

    // A file where the repository directory should be.
    let blocker = env.dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"a file")?;
    let unwritable = variant(
        &env,
        "unwritable.toml",
        &format!("path = {:?}", env.repo.display().to_string()),
        &format!("path = {:?}", blocker.display().to_string()),
    )?;
    expect_fail(&unwritable, WRITABLE, "[repository] path", &[ROLE, REPL])?;

    // bin_dir without pg_ctl and postgres.
    let empty = env.dir.path().join("empty-bin");
    std::fs::create_dir(&empty)?;
    let no_bins = variant(
        &env,
        "no-bins.toml",
        &format!("bin_dir = {:?}", cluster.bin_dir().display().to_string()),
        &format!("bin_dir = {:?}", empty.display().to_string()),
    )?;
    expect_fail(&no_bins, BINS, "bin_dir", &[KEY, ROLE, REPL, SLOT])?;

    // The slot does not exist and pitr may not create it.
    let no_slot = variant(&env, "no-slot.toml", "[metrics]", "create_slot = false\n[metrics]")?;
    expect_fail(&no_slot, SLOT, "pg_create_physical_replication_slot('pitr_main'", &[KEY, ROLE, REPL])?;
    cluster.psql("SELECT pg_create_physical_replication_slot('pitr_main')")?;
    let (code, checks, report) = check(&no_slot)?;
    ensure!(code == 0 && line(&checks, SLOT)?["ok"] == true, "an existing slot still fails: {report:#}");
    cluster.psql("SELECT pg_drop_replication_slot('pitr_main')")?;

    // A login role without REPLICATION: no replication connection, and its own line.
    cluster.psql("CREATE ROLE norepl LOGIN")?;
    let no_repl = variant(&env, "no-repl.toml", "user=postgres", "user=norepl")?;
    expect_fail(&no_repl, ROLE, "ALTER ROLE norepl REPLICATION", &[KEY, WRITABLE, WAL_LEVEL])?;
    expect_fail(&no_repl, REPL, "REPLICATION", &[])?;

    // [[files]] and [[dumps]] sets: a readable tree and a reachable database pass, a missing
    // path and a database refusing the role fail on their own lines.
    let tree = env.dir.path().join("tree");
    std::fs::create_dir(&tree)?;
    let sets = |path: &Path, user: &str| {
        format!(
            "\n[[files]]\nname = \"etc\"\npath = {:?}\n[[dumps]]\nname = \"app\"\nconninfo = {:?}\n",
            path.display().to_string(),
            cluster.conninfo(user)
        )
    };
    let good_sets = env.dir.path().join("sets.toml");
    std::fs::write(&good_sets, std::fs::read_to_string(&env.config)? + &sets(&tree, "postgres"))?;
    let (code, checks, report) = check(&good_sets)?;
    ensure!(code == 0, "good [[files]] and [[dumps]] sets fail: {report:#}");
    for name in ["files etc", "dump app: pg_dump", "dump app: connection"] {
        ensure!(line(&checks, name)?["ok"] == true, "{name:?} failed: {report:#}");
    }
    let bad_sets = env.dir.path().join("bad-sets.toml");
    std::fs::write(
        &bad_sets,
        std::fs::read_to_string(&env.config)? + &sets(&env.dir.path().join("gone"), "no_such_role"),
    )?;
    expect_fail(&bad_sets, "files etc", "path", &[KEY, ROLE, "dump app: pg_dump"])?;
    expect_fail(&bad_sets, "dump app: connection", "conninfo", &[])?;

    // A config error is one FAIL line and exit 1, not an error exit.
    let broken = variant(&env, "broken.toml", "[metrics]", "no_such_setting = 1\n[metrics]")?;
    expect_fail(&broken, "config", "broken.toml", &[])?;

    // pg_hba rejects replication connections (placed before the harness's trust lines).
    let hba = cluster.data_dir.join("pg_hba.conf");
    let original = std::fs::read_to_string(&hba)?;
    std::fs::write(&hba, format!("host replication all 127.0.0.1/32 reject\n{original}"))?;
    cluster.psql("SELECT pg_reload_conf()")?;
    expect_fail(&env.config, REPL, "pg_hba.conf", &[KEY, WRITABLE, ROLE, WAL_LEVEL])?;
    std::fs::write(&hba, original)?;
    cluster.psql("SELECT pg_reload_conf()")?;
    let (code, _, report) = check(&env.config)?;
    ensure!(code == 0, "still failing after pg_hba.conf was restored: {report:#}");

    // wal_level = minimal (which needs max_wal_senders = 0 and a restart).
    cluster.psql("ALTER SYSTEM SET wal_level = minimal")?;
    cluster.psql("ALTER SYSTEM SET max_wal_senders = 0")?;
    cluster.restart("fast")?;
    expect_fail(&env.config, WAL_LEVEL, "wal_level = replica", &[KEY, WRITABLE, ROLE])?;
    expect_fail(&env.config, REPL, "max_wal_senders", &[])?;
    let out = run_pitr(&env.config, &["check"]);
    let text = lossy(&out.stdout);
    eprintln!("pitr check with wal_level = minimal:\n{text}");
    ensure!(out.status.code() == Some(1), "text form exit {:?}", out.status.code());
    ensure!(
        text.lines().any(|l| l.starts_with("FAIL wal_level: minimal") && l.contains(" — fix: ")),
        "no FAIL line for wal_level with its fix:\n{text}"
    );
    Ok(())
}
