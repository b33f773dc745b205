//! Base backups taken from a PostgreSQL 15 streaming standby (`[backup] conninfo`,
//! `pitr backup --from-standby`) while `pitr stream` archives the WAL from the primary: the
//! backup restores exactly to a moment after it with the primary's WAL, and says where it was
//! taken; the sidecar's scheduled backups and `pitr check` use the standby too; after a failover
//! to the standby, its timeline-1 backup restores to a moment on timeline 2. A server that is not
//! a standby of this cluster, a primary, an unreachable one (or an unreachable primary to check
//! it against), an incremental from a standby and a standby whose restartpoint predates the
//! archive are refused with one error naming the host; a refusal before the transfer writes
//! nothing to the repository, the restartpoint's as BASE_BACKUP starts stores no block, and a
//! password in `--from-standby` is never repeated back.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::checks::{assert_untouched, expect_failure, failure_of, snapshot};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{free_port, standby_of, wait_until, PgCluster, PgOptions};

const FINGERPRINT: &str = "select count(*) || ' ' || md5(string_agg(id || ':' || v, ',' order by id)) from t";

/// `pitr check --json`'s line for the backup standby: (ok, detail, fix).
fn standby_check(env: &PitrEnv) -> Result<(bool, String, String)> {
    let out = env.run(&["check", "--json"])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))?;
    let checks = report["checks"].as_array().with_context(|| format!("{report}"))?;
    let line = checks.iter().find(|c| c["name"] == "backup standby").with_context(|| format!("{report:#}"))?;
    let text = |k: &str| line[k].as_str().unwrap_or_default().to_string();
    Ok((line["ok"] == true, text("detail"), text("fix")))
}

/// How many backup blocks the local repository at `dir` holds (`…/blocks/<xx>/<id>`).
fn stored_blocks(dir: &std::path::Path) -> Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            count += stored_blocks(&entry.path())?;
        } else if entry.path().components().any(|c| c.as_os_str() == "blocks") {
            count += 1;
        }
    }
    Ok(count)
}

/// The backups `pitr list --json` shows.
fn backups(env: &PitrEnv) -> Result<Vec<serde_json::Value>> {
    let list: serde_json::Value = serde_json::from_str(&env.run_ok(&["list", "--json"])?)?;
    Ok(list["backups"].as_array().cloned().unwrap_or_default())
}

#[test]
fn a_backup_from_a_standby_restores_with_the_primarys_wal() -> Result<()> {
    let primary = PgCluster::start(PgOptions::new(15))?;
    primary.psql("create table t (id int primary key, v text); insert into t select g, md5(g::text) from generate_series(1, 2000) g")?;
    let mut env = PitrEnv::new("pg15-standby-backup", &primary, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let (_standby_dir, standby) = standby_of(&primary)?;
    // Another cluster's server in recovery (a standby of nothing): same version, other system id.
    let other = PgCluster::start(PgOptions::new(15))?;
    other.stop("fast")?;
    std::fs::write(other.data_dir.join("standby.signal"), b"")?;
    other.start_again()?;
    assert_eq!(other.psql("select pg_is_in_recovery()")?, "t");

    // Refused before anything is written: one error naming the host each.
    let before = snapshot(&env.repo);
    let other_conninfo = other.conninfo("postgres");
    let other_host = format!("127.0.0.1:{}", other.port);
    expect_failure(
        &env.config,
        &["backup", "--from-standby", &other_conninfo],
        &[&other_host, "belongs to another cluster", "nothing was written to the repository"],
    );
    let primary_host = format!("127.0.0.1:{}", primary.port);
    expect_failure(
        &env.config,
        &["backup", "--from-standby", &primary.conninfo("postgres")],
        &[&primary_host, "is not in recovery", "nothing was written"],
    );
    let closed_port = free_port()?;
    let nowhere = format!("host=127.0.0.1 port={closed_port} user=postgres connect_timeout=2");
    expect_failure(
        &env.config,
        &["backup", "--from-standby", &nowhere],
        &[&format!("the standby 127.0.0.1:{closed_port}"), "unreachable", "nothing was written"],
    );
    // A password on the command line is not repeated back, on stderr or stdout (the docs say
    // to keep it off the command line altogether: ps and shell history show it).
    let unreachable = format!("host=127.0.0.1 port={closed_port} user=postgres password=hunter2 connect_timeout=2");
    for (with_password, says) in [(unreachable.as_str(), "unreachable"), ("port=x password=hunter2", "--from-standby")]
    {
        let args = ["backup", "--from-standby", with_password];
        let out = env.run(&args)?;
        failure_of(&format!("pitr {}", args.join(" ")), &out, &[says]);
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!said.contains("hunter2"), "{said}");
    }
    let standby_conninfo = standby.conninfo("postgres");
    let standby_host = format!("127.0.0.1:{}", standby.port);
    // The standby is fine, but the primary it is checked against does not answer.
    let primary_conninfo = primary.conninfo("postgres");
    let primary_nowhere = format!("host=127.0.0.1 port={closed_port} user=postgres connect_timeout=2");
    env.edit_config(&primary_conninfo, &primary_nowhere)?;
    expect_failure(
        &env.config,
        &["backup", "--from-standby", &standby_conninfo],
        &[
            &format!("the standby {standby_host}: could not be checked against the primary 127.0.0.1:{closed_port}"),
            "nothing was written",
        ],
    );
    env.edit_config(&primary_nowhere, &primary_conninfo)?;
    expect_failure(
        &env.config,
        &["backup", "--incremental", "--from-standby", &standby_conninfo],
        &[&standby_host, "incremental backups are not taken from a standby"],
    );
    expect_failure(&env.config, &["backup", "--from-standby", "port=x"], &["--from-standby"]);
    assert_untouched(&env.repo, &before, "refused backups from a standby");

    // A standby whose replay lags (paused here; recovery_min_apply_delay does the same) keeps
    // its restartpoint from pg_basebackup's checkpoint, while the sidecar's slot, and so the
    // archive, starts at a later checkpoint: its backup could never be restored. Refused.
    standby.psql("select pg_wal_replay_pause()")?;
    primary.psql("select pg_switch_wal()")?;
    primary.psql("checkpoint")?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&primary)?;
    // Refused as BASE_BACKUP reports its start position, before any file is stored.
    expect_failure(
        &env.config,
        &["backup", "--from-standby", &standby_conninfo],
        &[
            "lacks WAL segment",
            &format!("which the backup from the standby {standby_host} needs"),
            "CHECKPOINT on the primary",
            "the transfer was stopped before any file was stored",
            "the backup was not recorded",
        ],
    );
    assert_eq!(backups(&env)?.len(), 0);
    assert_eq!(stored_blocks(&env.repo)?, 0, "a refused backup stored blocks");

    // Configured for every backup, `pitr check` included.
    let mut config = std::fs::OpenOptions::new().append(true).open(&env.config)?;
    writeln!(config, "[backup]\nconninfo = {standby_conninfo:?}\nwal_timeout = \"60s\"")?;
    let (ok, detail, fix) = standby_check(&env)?;
    assert!(ok && detail.contains(&standby_host) && detail.contains("in recovery"), "{detail} / {fix}");

    // A restartpoint the archive covers: the standby replays the primary's checkpoint.
    standby.psql("select pg_wal_replay_resume()")?;
    standby.wait_replayed(primary.current_lsn()?)?;
    let out = env.run_ok(&["backup", "--json"])?;
    let summary: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(summary["taken_from"]["role"], "standby", "{summary:#}");
    assert_eq!(summary["taken_from"]["host"], standby_host.as_str(), "{summary:#}");
    assert_eq!(summary["kind"], "full", "{summary:#}");

    // The primary moves on after the backup; the standby need not keep up.
    primary.psql("insert into t select g, md5(g::text) from generate_series(2001, 3000) g; update t set v = 'after' where id % 5 = 0")?;
    std::thread::sleep(Duration::from_millis(300));
    let moment = primary.psql("select clock_timestamp()")?;
    let expected = primary.psql(FINGERPRINT)?;
    std::thread::sleep(Duration::from_millis(300));
    primary.psql("delete from t where id > 2500; insert into t values (9999, 'later')")?;
    env.wait_archived(primary.current_lsn()?, "the archive to hold the commits after the moment")?;

    let listed = backups(&env)?;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["taken_from"]["role"], "standby", "{listed:#?}");
    let text = env.run_ok(&["list"])?;
    assert!(text.contains(&format!("standby {standby_host}")), "{text}");

    let (restored, out) = env.restore_started(&moment, primary.bin_dir(), &["--json", "--timeout", "120s"])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["backup_id"], summary["id"], "{report:#}");
    assert_eq!(restored.psql(FINGERPRINT)?, expected, "restore to {moment} from the standby's backup differs");
    assert_eq!(restored.psql("select count(*) from t where v = 'after'")?, "600");

    // The sidecar's scheduled backups come from the standby too; its scheduled incrementals
    // do nothing there, and say why once.
    env.stop_stream(&mut stream)?;
    env.edit_config("full_backup = \"\"", "full_backup = \"*/2 * * * * *\"")?;
    env.edit_config("incremental = \"\"", "incremental = \"*/2 * * * * *\"")?;
    let mut stream = env.spawn_stream()?;
    const NO_INCREMENTALS: &str = "scheduled incremental backups do nothing while backups come from a standby";
    wait_until("a scheduled backup and an incremental's turn", Duration::from_secs(60), || {
        Ok(backups(&env)?.len() >= 2 && env.stream_logs().contains(NO_INCREMENTALS))
    })
    .with_context(|| env.stream_logs())?;
    env.stop_stream(&mut stream)?;
    for b in backups(&env)? {
        assert_eq!(b["taken_from"]["role"], "standby", "{b:#}");
        assert_eq!(b["kind"], "full", "{b:#}");
    }

    // A failover: the sidecar follows the promoted standby onto timeline 2, and a backup the
    // standby took on timeline 1 restores to a moment on timeline 2 through the history file.
    env.edit_config("full_backup = \"*/2 * * * * *\"", "full_backup = \"\"")?;
    env.edit_config("incremental = \"*/2 * * * * *\"", "incremental = \"\"")?;
    env.connect_to_read_write(&primary, &standby)?;
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&primary)?;
    primary.psql("insert into t values (10001, 'before the failover')")?;
    primary.stop("fast")?;
    standby.promote()?;
    env.wait_streaming(&standby)?;
    standby.psql("insert into t values (10002, 'on timeline 2')")?;
    std::thread::sleep(Duration::from_millis(300));
    let moment = standby.psql("select clock_timestamp()")?;
    let expected = standby.psql(FINGERPRINT)?;
    std::thread::sleep(Duration::from_millis(300));
    standby.psql("insert into t values (10003, 'later')")?;
    env.wait_archived(standby.current_lsn()?, "the archive to hold timeline 2")?;
    let (restored, out) = env.restore_started(&moment, standby.bin_dir(), &["--json", "--timeout", "120s"])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let used =
        backups(&env)?.into_iter().find(|b| b["id"] == report["backup_id"]).with_context(|| format!("{report:#}"))?;
    assert_eq!((used["timeline"].as_u64(), &used["taken_from"]["role"]), (Some(1), &"standby".into()), "{used:#}");
    assert_eq!(restored.psql(FINGERPRINT)?, expected, "restore to {moment} on timeline 2 differs");

    // `pitr check` names another cluster's server as what it is, with the fix.
    env.edit_config(&standby_conninfo, &other_conninfo)?;
    let (ok, detail, fix) = standby_check(&env)?;
    assert!(!ok && detail.contains(&other_host) && detail.contains("another cluster"), "{detail}");
    assert!(fix.contains("[backup] conninfo"), "{fix}");

    // The old primary, back in recovery with nothing to follow, is of this cluster but stays on
    // timeline 1 while the primary is on 2.
    std::fs::write(primary.data_dir.join("standby.signal"), b"")?;
    primary.start_again()?;
    expect_failure(
        &env.config,
        &["backup", "--from-standby", &primary.conninfo("postgres")],
        &[
            &primary_host,
            "is on timeline 1",
            &format!("127.0.0.1:{} on timeline 2", standby.port),
            "nothing was written",
        ],
    );
    Ok(())
}
