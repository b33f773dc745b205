//! Base backups and restores where something is wrong, plus the two properties a good backup
//! must have: a second backup of an unchanged cluster stores almost nothing (deduplication), and
//! a materialised backup passes PostgreSQL's own pg_verifybackup.
//!
//! Every refusal must exit non-zero with one `pitr: error:` line naming what is wrong and where,
//! leave no target or staging directory behind, and never write to the repository.
//!
//! One PostgreSQL 15 server (pgbench data, partly in a tablespace), one streamed archive and two
//! backups are shared by all cases: building them is most of the cost, and the machines running
//! this have few cores. The cases run one after another in a single test, each in its own
//! labelled section; a failing section is reported and the remaining ones still run.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use pitr_tests::checks::{assert_untouched, expect_success, failure_of, run_pitr, snapshot, Entry};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{client_bin, free_port, is_root, parse_lsn, scratch_dir, u64_to_lsn, PgCluster, PgOptions};

const SEG: u64 = 16 << 20;

// ---------------------------------------------------------------------------
// Running pitr and judging its failures
// ---------------------------------------------------------------------------

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Checks that a pitr run failed as [`failure_of`] describes, with a `pitr: error: ` line as the
/// message (every refusal here comes from pitr's own error path); prints and returns the message.
fn assert_failed(what: &str, out: &Output, phrases: &[&str]) -> String {
    let (_, message) = failure_of(what, out, phrases);
    assert!(
        message.starts_with("pitr: error: "),
        "{what}: the message is not a `pitr: error:` line:\n{}",
        text(&out.stderr)
    );
    println!("  {what}\n    -> {message}");
    message
}

/// Runs `pitr --config <config> <args>` and checks it fails as [`assert_failed`] describes.
fn expect_failure(config: &Path, args: &[&str], phrases: &[&str]) -> String {
    let out = run_pitr(config, args);
    assert_failed(&format!("pitr {}", args.join(" ")), &out, phrases)
}

// ---------------------------------------------------------------------------
// Leftovers
// ---------------------------------------------------------------------------

/// The names in the target's parent directory other than the target. Every target here is the
/// only intended entry of a fresh directory, so anything listed is a leftover, such as a
/// `.<name>.pitr-partial-*` staging directory.
fn entries_beside(target: &Path) -> Vec<String> {
    let parent = target.parent().expect("the target has a parent");
    let mut names: Vec<String> = std::fs::read_dir(parent)
        .unwrap_or_else(|e| panic!("listing {}: {e}", parent.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| Some(n.as_str()) != target.file_name().and_then(|t| t.to_str()))
        .collect();
    names.sort();
    names
}

/// Neither the target directory nor anything beside it (a staging directory) exists.
fn assert_no_restore_left(target: &Path, after_what: &str) {
    assert!(
        std::fs::symlink_metadata(target).is_err(),
        "{after_what} left the target directory {} behind",
        target.display()
    );
    assert_no_staging_left(target, after_what);
}

/// Nothing but the target exists in its parent directory.
fn assert_no_staging_left(target: &Path, after_what: &str) {
    let left = entries_beside(target);
    assert!(left.is_empty(), "{after_what} left {left:?} beside {}", target.display());
}

/// Block objects (paths relative to the repository) in the repository now. Only the blocks
/// directories are read: WAL chunks may vanish under a running sidecar's compaction.
fn block_objects(repo: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for cluster in std::fs::read_dir(repo.join("pg")).into_iter().flatten().flatten() {
        let blocks = cluster.path().join("blocks");
        for (path, entry) in snapshot(&blocks) {
            if entry != Entry::Dir {
                out.insert(blocks.strip_prefix(repo).expect("below the repository").join(path));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The shared cluster, archive and backups
// ---------------------------------------------------------------------------

/// Fields drop in declaration order: the server stops before its tablespace directory goes.
struct Fixture {
    /// Running (cases 6 and 7 take backups), but no longer streamed into the archive.
    _cluster: PgCluster,
    _tablespace: tempfile::TempDir,
    env: PitrEnv,
    /// `pitr backup --json` of the first and the second backup, taken back to back.
    first: serde_json::Value,
    second: serde_json::Value,
    /// Block objects the second backup stored (so the newest backup needs each of them).
    new_in_second: Vec<PathBuf>,
    /// A server time between the data load and the first backup.
    before_backups: String,
    /// A day after the newest commit.
    a_day_later: String,
    /// `pitr list --json` once the archive stopped growing.
    list: serde_json::Value,
}

impl Fixture {
    fn build() -> Result<Fixture> {
        let tablespace = scratch_dir("bre-tablespace");
        pitr_tests::chown_to_pg_user(tablespace.path())?;
        let mut opts = PgOptions::new(15);
        opts.extra_conf.push("max_wal_size = '1GB'".into());
        let cluster = PgCluster::start(opts)?;
        cluster.psql(&format!("create tablespace ts location '{}'", tablespace.path().display()))?;
        // Tables in the tablespace, their indexes in the main data directory.
        cluster.pgbench(&["-i", "-s", "5", "-q", "--tablespace=ts"])?;

        let mut env = PitrEnv::new("backup-restore-errors", &cluster, "")?;
        env.init()?;
        let mut stream = env.spawn_stream()?;
        env.wait_streaming(&cluster)?;
        cluster.psql("create table marks (at timestamptz default clock_timestamp())")?;
        cluster.psql("insert into marks default values")?;
        std::thread::sleep(Duration::from_millis(300));
        let before_backups = cluster.psql("select clock_timestamp()")?;
        std::thread::sleep(Duration::from_millis(300));

        let first: serde_json::Value = serde_json::from_str(&env.run_ok(&["backup", "--json"])?)?;
        let after_first = block_objects(&env.repo);
        let second: serde_json::Value = serde_json::from_str(&env.run_ok(&["backup", "--json"])?)?;
        let new_in_second: Vec<PathBuf> = block_objects(&env.repo).difference(&after_first).cloned().collect();

        // A commit after the backups, so the window extends past them; then let the archive
        // catch up and stop the sidecar: from here on the repository only changes when a case
        // changes it.
        std::thread::sleep(Duration::from_millis(300));
        cluster.psql("insert into marks default values")?;
        let a_day_later = cluster.psql("select clock_timestamp() + interval '1 day'")?;
        env.wait_archived(cluster.current_lsn()?, "the archive to catch up")?;
        env.stop_stream(&mut stream)?;
        let list: serde_json::Value = serde_json::from_str(&env.run_ok(&["list", "--json"])?)?;
        ensure!(list["backups"].as_array().map(Vec::len) == Some(2), "expected two backups: {list}");
        Ok(Fixture {
            _cluster: cluster,
            _tablespace: tablespace,
            env,
            first,
            second,
            new_in_second,
            before_backups,
            a_day_later,
            list,
        })
    }

    fn config(&self) -> &Path {
        &self.env.config
    }

    /// A config file like the fixture's, with `edit` applied to its text.
    fn config_with(&self, name: &str, edit: impl FnOnce(String) -> String) -> Result<PathBuf> {
        let original = std::fs::read_to_string(&self.env.config)?;
        let edited = edit(original.clone());
        ensure!(edited != original, "editing the config for {name} changed nothing");
        let path = self.env.dir.path().join(name);
        std::fs::write(&path, edited)?;
        Ok(path)
    }

    /// The newest timeline's recoverable window as `pitr list --json` reports it.
    fn window(&self) -> &serde_json::Value {
        self.list["recoverable_windows"].as_array().and_then(|w| w.last()).expect("a recoverable window")
    }

    fn backup_ids(list: &serde_json::Value) -> Vec<String> {
        let backups = list["backups"].as_array().expect("a backups array");
        backups.iter().map(|b| b["id"].as_str().expect("an id").to_string()).collect()
    }
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

/// Case 1: two backups of an unchanged cluster in a row: the second stores under 5 % of the first.
fn dedup(fx: &Fixture) -> Result<()> {
    let number = |b: &serde_json::Value, k: &str| b[k].as_u64().with_context(|| format!("no {k} in {b}"));
    let (first, second) = (number(&fx.first, "bytes_stored")?, number(&fx.second, "bytes_stored")?);
    println!(
        "  first backup:  {} bytes read, {first} bytes stored ({} new blocks)\n  second backup: {} bytes read, {second} bytes stored ({} new blocks, {} reused) = {:.2} % of the first",
        number(&fx.first, "bytes_read")?,
        number(&fx.first, "blocks_new")?,
        number(&fx.second, "bytes_read")?,
        number(&fx.second, "blocks_new")?,
        number(&fx.second, "blocks_reused")?,
        second as f64 * 100.0 / first as f64
    );
    // The premise: a first backup of tens of MB.
    ensure!(number(&fx.first, "bytes_read")? > 50 << 20, "the first backup read too little to judge: {}", fx.first);
    ensure!(second * 20 < first, "the second backup stored {second} bytes, not under 5 % of the first's {first}");
    ensure!(!fx.new_in_second.is_empty(), "the second backup stored no block (it has a new backup_label at least)");
    Ok(())
}

/// Case 2: a backup materialised without --start passes pg_verifybackup, except for what pitr
/// deliberately adds or changes.
fn verify_backup(fx: &Fixture) -> Result<()> {
    let dir = scratch_dir("bre-verify");
    let target = dir.path().join("data");
    let t = target.display().to_string();
    expect_success(fx.config(), &["restore", "--to", "latest", "--target-dir", &t]);
    assert_no_staging_left(&target, "a restore");

    // What pitr adds: recovery settings, and tablespaces inside the target behind pg_tblspc links.
    ensure!(target.join("recovery.signal").is_file(), "no recovery.signal in {t}");
    let auto_conf = std::fs::read_to_string(target.join("postgresql.auto.conf"))?;
    ensure!(auto_conf.contains("restore_command = "), "no restore_command in postgresql.auto.conf:\n{auto_conf}");
    let links: Vec<PathBuf> =
        std::fs::read_dir(target.join("pg_tblspc"))?.map(|e| Ok(e?.path())).collect::<Result<_>>()?;
    ensure!(links.len() == 1, "expected one tablespace link in pg_tblspc, found {links:?}");
    let oid = links[0].file_name().context("link name")?.to_owned();
    ensure!(
        std::fs::read_link(&links[0])? == target.join("pitr_tablespaces").join(&oid),
        "pg_tblspc/{} does not point into the target's pitr_tablespaces",
        oid.to_string_lossy()
    );

    // -n: no WAL to parse. pg_verifybackup ignores postgresql.auto.conf and recovery.signal by
    // default; they are named to make every exception explicit. pitr_tablespaces holds the
    // tablespace files, which are verified through the pg_tblspc links the manifest's paths use.
    let out = Command::new(client_bin("pg_verifybackup"))
        .args(["-n", "-i", "postgresql.auto.conf", "-i", "recovery.signal", "-i", "pitr_tablespaces", &t])
        .output()?;
    println!("  pg_verifybackup: {}{}", text(&out.stdout).trim(), text(&out.stderr).trim());
    ensure!(
        out.status.success(),
        "pg_verifybackup failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(())
}

/// Case 3: targets outside the recoverable window, and one that is no target at all: refused with
/// what is wrong and the window, and no directory is made.
fn targets_outside_the_window(fx: &Fixture) -> Result<()> {
    let window = fx.window();
    let from = window["from"].as_str().context("window start")?;
    let to = window["to"].as_str().context("window end")?;
    let end_lsn = window["to_lsn"].as_str().context("window end LSN")?;
    let past_end = u64_to_lsn(parse_lsn(end_lsn)? + SEG);
    let wal_end = format!("archived WAL at {end_lsn}");
    let lsn_target = format!("lsn:{past_end}");
    let window_phrases = ["recoverable window on timeline", from, to];
    let cases: [(&str, &str, Vec<&str>); 4] = [
        ("a time before the oldest backup", &fx.before_backups, vec!["before the oldest backup"]),
        ("a day after the newest commit", &fx.a_day_later, vec!["after the newest archived commit"]),
        ("an LSN past the archived WAL", &lsn_target, vec![&lsn_target, "past the end of the", &wal_end]),
        ("an unparseable target", "yesterday", vec!["invalid recovery target", "\"yesterday\"", "lsn:X/Y"]),
    ];
    let dir = scratch_dir("bre-window");
    let before = snapshot(&fx.env.repo);
    for (what, to, mut phrases) in cases {
        if to != "yesterday" {
            phrases.extend(window_phrases);
        }
        let target = dir.path().join("data");
        let t = target.display().to_string();
        println!("  {what}: --to {to}");
        expect_failure(fx.config(), &["restore", "--to", to, "--target-dir", &t], &phrases);
        assert_no_restore_left(&target, &format!("a restore to {what}"));
    }
    assert_untouched(&fx.env.repo, &before, "refused restores");
    Ok(())
}

/// Case 4: a non-empty target directory is refused, naming it and --force, and left as it was;
/// with --force its contents are replaced.
fn non_empty_target(fx: &Fixture) -> Result<()> {
    let dir = scratch_dir("bre-nonempty");
    let target = dir.path().join("data");
    let t = target.display().to_string();
    std::fs::create_dir_all(target.join("sub"))?;
    std::fs::write(target.join("keep-me"), "someone's data")?;
    std::fs::write(target.join("sub").join("more"), "more of it")?;
    let before = snapshot(&target);

    expect_failure(fx.config(), &["restore", "--to", "latest", "--target-dir", &t], &[&t, "not empty", "--force"]);
    assert_untouched(&target, &before, "a refused restore into a non-empty directory");
    assert_no_staging_left(&target, "a refused restore into a non-empty directory");

    expect_success(fx.config(), &["restore", "--to", "latest", "--target-dir", &t, "--force"]);
    ensure!(!target.join("keep-me").exists() && !target.join("sub").exists(), "--force kept the old contents");
    ensure!(target.join("PG_VERSION").is_file() && target.join("global/pg_control").is_file(), "no cluster in {t}");
    ensure!(target.join("recovery.signal").is_file(), "no recovery.signal in {t}");
    assert_no_staging_left(&target, "a restore with --force");
    Ok(())
}

/// Case 5: a block object of the newest backup is missing: the restore fails naming it, and leaves
/// neither the target nor its staging directory.
fn missing_block(fx: &Fixture) -> Result<()> {
    let block = fx.new_in_second.first().context("no block of the second backup known")?;
    let object = fx.env.repo.join(block);
    let aside = fx.env.dir.path().join("block-set-aside");
    let before = snapshot(&fx.env.repo);
    let dir = scratch_dir("bre-missing-block");
    let target = dir.path().join("data");
    let t = target.display().to_string();

    std::fs::rename(&object, &aside)?;
    let out = run_pitr(fx.config(), &["restore", "--to", "latest", "--target-dir", &t]);
    std::fs::rename(&aside, &object)?;

    let name = block.display().to_string();
    assert_failed("pitr restore with a block missing", &out, &[&name, "not found", &fx.env.repo.display().to_string()]);
    assert_no_restore_left(&target, "a restore that met a missing block");
    assert_untouched(&fx.env.repo, &before, "a restore that met a missing block");
    Ok(())
}

/// Case 6: another key file: restore, backup and list fail naming the key file; nothing is written.
fn wrong_key(fx: &Fixture) -> Result<()> {
    let other = fx.env.dir.path().join("other-key");
    std::fs::write(&other, format!("pitr-key-v1 kother {}\n", "5a".repeat(32)))?;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600))?;
    let q = |p: &Path| format!("key_file = {:?}", p.display().to_string());
    let config = fx.config_with("other-key.toml", |t| t.replace(&q(&fx.env.key_file), &q(&other)))?;
    let other_name = other.display().to_string();
    let phrases = [other_name.as_str(), "key file"];

    let dir = scratch_dir("bre-wrong-key");
    let target = dir.path().join("data");
    let t = target.display().to_string();
    let before = snapshot(&fx.env.repo);
    expect_failure(&config, &["restore", "--to", "latest", "--target-dir", &t], &phrases);
    assert_no_restore_left(&target, "a restore with the wrong key");
    expect_failure(&config, &["backup"], &phrases);
    expect_failure(&config, &["list"], &phrases);
    assert_untouched(&fx.env.repo, &before, "commands with the wrong key");
    Ok(())
}

/// Case 7: `pitr backup` while no `pitr stream` archives the WAL: it fails after [backup] wal_timeout
/// saying so, and no backup is recorded.
fn backup_without_sidecar(fx: &Fixture) -> Result<()> {
    let config = fx.config_with("short-wal-timeout.toml", |t| format!("{t}\n[backup]\nwal_timeout = \"3s\"\n"))?;
    let manifests = |repo: &Path| -> Vec<PathBuf> {
        snapshot(repo).into_keys().filter(|p| p.extension().is_some_and(|e| e == "manifest")).collect()
    };
    let manifests_before = manifests(&fx.env.repo);
    ensure!(manifests_before.len() == 2, "expected two backup manifests, found {manifests_before:?}");

    let repo = fx.env.repo.display().to_string();
    let blocks_before = block_objects(&fx.env.repo);
    let started = Instant::now();
    let out = run_pitr(&config, &["backup", "--json"]);
    let took = started.elapsed();
    assert_failed(
        "pitr backup without pitr stream",
        &out,
        &[&repo, "does not hold the WAL", "is `pitr stream` running", "after 3s", "not recorded"],
    );
    ensure!(took < Duration::from_secs(100), "pitr backup took {took:?}: [backup] wal_timeout = \"3s\" was not used");
    ensure!(out.stdout.is_empty(), "a failed backup printed a summary: {}", text(&out.stdout));

    let list: serde_json::Value = serde_json::from_str(&expect_success(fx.config(), &["list", "--json"]))?;
    ensure!(
        Fixture::backup_ids(&list) == Fixture::backup_ids(&fx.list),
        "pitr list changed after a failed backup: {list}"
    );
    ensure!(manifests(&fx.env.repo) == manifests_before, "a failed backup wrote a manifest");
    let orphans = block_objects(&fx.env.repo).difference(&blocks_before).count();
    println!("  the failed backup left {orphans} new block objects that no manifest refers to");
    Ok(())
}

/// Case 8: `pitr restore --start` as root is refused before anything is written.
fn start_as_root(fx: &Fixture) -> Result<()> {
    if !is_root() {
        println!("  skipped: not running as root");
        return Ok(());
    }
    let dir = scratch_dir("bre-root");
    let target = dir.path().join("data");
    let t = target.display().to_string();
    let port = free_port()?.to_string();
    let before = snapshot(&fx.env.repo);
    expect_failure(
        fx.config(),
        &["restore", "--to", "latest", "--target-dir", &t, "--start", "--port", &port],
        &["refuses to run as root", "--start", "the database's OS user"],
    );
    assert_no_restore_left(&target, "a restore --start as root");
    assert_untouched(&fx.env.repo, &before, "a restore --start as root");
    Ok(())
}

#[test]
fn pg15_backup_and_restore_errors() {
    let fx = Fixture::build().unwrap_or_else(|e| panic!("setting up the shared cluster and archive: {e:#}"));
    type Case = fn(&Fixture) -> Result<()>;
    let cases: [(&str, Case); 8] = [
        ("1. dedup of a second backup", dedup),
        ("2. pg_verifybackup on a materialised backup", verify_backup),
        ("3. targets outside the window", targets_outside_the_window),
        ("4. non-empty target directory", non_empty_target),
        ("5. missing block object", missing_block),
        ("6. wrong key file", wrong_key),
        ("7. backup without a sidecar", backup_without_sidecar),
        ("8. restore --start as root", start_as_root),
    ];
    let mut failed = Vec::new();
    for (name, case) in cases {
        println!("=== {name}");
        match std::panic::catch_unwind(AssertUnwindSafe(|| case(&fx))) {
            Ok(Ok(())) => println!("=== {name}: ok"),
            Ok(Err(e)) => {
                println!("=== {name}: FAILED: {e:#}");
                failed.push(format!("{name}: {e:#}"));
            }
            Err(_) => failed.push(format!("{name}: panicked (see above)")),
        }
    }
    if !failed.is_empty() {
        panic!("{} of {} cases failed:\n  {}", failed.len(), cases.len(), failed.join("\n  "));
    }
}
