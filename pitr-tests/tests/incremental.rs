//! Incremental backups (PostgreSQL 17+, `BASE_BACKUP ( INCREMENTAL )`) against real servers:
//! a full backup and three incrementals under a workload; restores to moments between them are
//! exact; the chain and the full backup alone restore the same target to the same data, the
//! chain with a far shorter replay; older servers and `summarize_wal = off` fall back to a full
//! backup and say why.

use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{lsn_to_u64, wait_until, PgCluster, PgOptions};

const SEG: u64 = 16 << 20;

/// Every user table's rows, hashed, plus the sequences: equal output means equal data.
const FINGERPRINT: &str = "select string_agg(x, ' ' order by x) from (\
     select 't=' || count(*) || ':' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') as x from t \
     union all select 'big=' || count(*) || ':' || md5(string_agg(g || ':' || h, ',' order by g)) from big \
     union all select 'gone=' || count(*) from pg_class where relname = 'dropped_later' \
     union all select 'tables=' || string_agg(relname, ',' order by relname) from pg_class \
        where relnamespace = 'public'::regnamespace and relname <> 'tick') s";

fn wait_archived(env: &PitrEnv, cluster: &PgCluster) -> Result<()> {
    let lsn = lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    wait_until("the archive to catch up", Duration::from_secs(60), || Ok(env.archived_end(SEG)? >= lsn))
        .with_context(|| env.stream_logs())
}

fn backup(env: &PitrEnv, incremental: bool) -> Result<serde_json::Value> {
    let args: &[&str] = if incremental { &["backup", "--incremental", "--json"] } else { &["backup", "--json"] };
    Ok(serde_json::from_str(&env.run_ok(args)?)?)
}

fn report_of(out: &std::process::Output) -> Result<serde_json::Value> {
    serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn chain_round_trip(major: u32) -> Result<()> {
    let mut opts = PgOptions::new(major);
    opts.extra_conf.push("summarize_wal = on".into());
    opts.extra_conf.push("max_wal_size = '1GB'".into());
    let cluster = PgCluster::start(opts)?;
    // A table big enough that a full backup dwarfs what a few batches change.
    cluster.psql("create table big as select g, md5(g::text) as h from generate_series(1, 300000) g")?;
    cluster.psql("create table t (id int primary key, v text)")?;
    cluster.psql("create table dropped_later as select g from generate_series(1, 1000) g")?;

    let mut env = PitrEnv::new(&format!("pg{major}-incremental"), &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;

    let mut moments: Vec<(String, String)> = Vec::new();
    let mut next_id = 0;
    let mut batch = |cluster: &PgCluster, rows: i32| -> Result<()> {
        cluster.psql(&format!(
            "insert into t select g, md5(g::text) from generate_series({}, {}) g; \
             update t set v = v || 'x' where id % 7 = {}; update big set h = h || 'y' where g % 5000 = {}",
            next_id,
            next_id + rows - 1,
            next_id % 7,
            next_id % 5000
        ))?;
        next_id += rows;
        std::thread::sleep(Duration::from_millis(300));
        let at = cluster.psql("select clock_timestamp()")?;
        moments.push((at, cluster.psql(FINGERPRINT)?));
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    };

    batch(&cluster, 1000)?;
    wait_archived(&env, &cluster)?;
    let full = backup(&env, false)?;
    let mut backups = vec![full.clone()];
    for round in 0..3 {
        batch(&cluster, 500)?;
        if round == 1 {
            // A dropped relation must not come back from the older backups of the chain.
            cluster.psql("drop table dropped_later")?;
        }
        batch(&cluster, 500)?;
        wait_archived(&env, &cluster)?;
        backups.push(backup(&env, true)?);
    }
    batch(&cluster, 500)?;
    // A commit after the last moment, so that it lies inside the recoverable window (which ends
    // at the newest archived commit).
    cluster.psql("create table tick as select 1")?;
    wait_archived(&env, &cluster)?;

    for (i, b) in backups.iter().enumerate().skip(1) {
        assert_eq!(b["kind"], "incremental", "{b}");
        assert_eq!(b["parent"], backups[i - 1]["id"], "incremental {i} is not on the previous backup: {b}");
        assert!(b["fallback"].is_null(), "{b}");
        let (stored, full_stored) =
            (b["bytes_stored"].as_u64().unwrap_or(0), full["bytes_stored"].as_u64().unwrap_or(0));
        eprintln!(
            "PG{major} incremental {i}: read {} stored {stored} bytes; the full backup read {} stored {full_stored}",
            b["bytes_read"], full["bytes_read"]
        );
        assert!(stored * 5 < full_stored, "incremental {i} stored {stored} bytes, the full {full_stored}");
    }
    let list: serde_json::Value = serde_json::from_str(&env.run_ok(&["list", "--json"])?)?;
    assert_eq!(list["incrementals"]["mode"], "block-incremental", "{list}");
    assert_eq!(list["backups"].as_array().map(Vec::len), Some(4), "{list}");

    // Moments 0 and 1 lie after the full backup, 2..3 after the first incremental, and so on:
    // each restore must use the newest backup before it and give exactly that moment's data.
    let bin_dir = cluster.bin_dir().to_path_buf();
    for (i, (at, expected)) in moments.iter().enumerate() {
        if i == 0 {
            continue; // before the full backup
        }
        let backup_index = ((i - 1) / 2).min(3);
        let (server, out) = env.restore_started(at, &bin_dir, &["--json", "--timeout", "120s"])?;
        let report = report_of(&out)?;
        let got = server.psql(FINGERPRINT)?;
        assert_eq!(&got, expected, "restore to moment {i} ({at}) differs; report {report}");
        assert_eq!(report["backup_id"], backups[backup_index]["id"], "moment {i}: {report}");
        assert_eq!(report["backup_chain"].as_array().map(Vec::len), Some(backup_index + 1), "{report}");
    }

    // The newest moment from the chain and from the full backup alone: the same data, with
    // the chain replaying only the WAL since the last incremental.
    let (at, expected) = moments.last().context("no moments")?;
    let (chain_server, out) = env.restore_started(at, &bin_dir, &["--json", "--timeout", "120s"])?;
    let chain = report_of(&out)?;
    let full_id = full["id"].as_str().context("no id")?;
    let (full_server, out) =
        env.restore_started(at, &bin_dir, &["--json", "--timeout", "120s", "--backup", full_id])?;
    let alone = report_of(&out)?;
    let chain_data = chain_server.psql(FINGERPRINT)?;
    let alone_data = full_server.psql(FINGERPRINT)?;
    assert_eq!(&chain_data, expected);
    assert_eq!(chain_data, alone_data);
    let (chain_replay, alone_replay) =
        (chain["wal_replayed_bytes"].as_u64().unwrap_or(u64::MAX), alone["wal_replayed_bytes"].as_u64().unwrap_or(0));
    let last_incremental_start = lsn_to_u64(backups[3]["start_lsn"].as_str().unwrap_or("0/0"));
    eprintln!(
        "PG{major} replay to {at}: {chain_replay} bytes of WAL from the chain (from {}), {alone_replay} from the full alone; \
         replay {:.2} s vs {:.2} s",
        chain["backup_start_lsn"], chain["replay_seconds"], alone["replay_seconds"]
    );
    assert_eq!(chain["backup_start_lsn"], backups[3]["start_lsn"], "{chain}");
    let last_replayed = lsn_to_u64(chain["last_replayed_lsn"].as_str().unwrap_or("0/0"));
    assert_eq!(chain_replay, last_replayed - last_incremental_start, "{chain}");
    assert!(chain_replay < alone_replay, "chain replayed {chain_replay}, full alone {alone_replay}");
    // A combined directory is a plain data directory: the server's own checker agrees.
    let out = std::process::Command::new(pitr_tests::client_bin("pg_amcheck"))
        .args(["-h", &chain_server.target.display().to_string(), "-p", &chain_server.port.to_string()])
        .args(["-U", "postgres", "--all", "--install-missing", "--heapallindexed"])
        .output()?;
    assert!(
        out.status.success(),
        "pg_amcheck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // summarize_wal off: an incremental is asked for, a full backup taken, and the reason said.
    cluster.psql("alter system set summarize_wal = off")?;
    cluster.psql("select pg_reload_conf()")?;
    let fallback = backup(&env, true)?;
    assert_eq!(fallback["kind"], "full", "{fallback}");
    assert!(fallback["fallback"].as_str().is_some_and(|f| f.contains("summarize_wal")), "{fallback}");

    // A chain with a lost middle backup: verify names it, a restore through it refuses and
    // names it, and the full backup still restores.
    let middle = backups[2]["id"].as_str().context("no id")?;
    let manifests = env.repo_path().join("pg").join(list["system_id"].to_string()).join("backups");
    std::fs::remove_file(manifests.join(format!("{middle}.manifest")))?;
    let verify = env.run(&["verify", "--json"])?;
    assert!(!verify.status.success());
    let verify: serde_json::Value = serde_json::from_slice(&verify.stdout)?;
    let findings = verify["findings"].as_array().context("no findings")?;
    assert!(
        findings
            .iter()
            .any(|f| f["kind"] == "missing-parent" && f["message"].as_str().is_some_and(|m| m.contains(middle))),
        "{verify:#}"
    );
    let target = pitr_tests::scratch_dir("orphan-restore");
    let out = env.run(&["restore", "--to", at, "--target-dir", &target.path().join("data").display().to_string()])?;
    let (_, message) = pitr_tests::checks::failure_of("restore through a lost parent", &out, &[middle, "--backup"]);
    assert!(!target.path().join("data").exists(), "{message}");
    let out = env.run(&[
        "restore",
        "--to",
        at,
        "--backup",
        full_id,
        "--target-dir",
        &target.path().join("data").display().to_string(),
    ])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn pg17_full_and_three_incrementals_restore_exactly() -> Result<()> {
    chain_round_trip(17)
}

#[test]
fn pg18_full_and_three_incrementals_restore_exactly() -> Result<()> {
    chain_round_trip(18)
}

/// PostgreSQL 14–16 have no incrementals: asking for one takes a full backup and says why, and
/// `list` says what the incremental schedule does there.
#[test]
fn pg15_incremental_request_takes_a_full_backup_and_says_why() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("pg15-incremental", &cluster, "")?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    let out = env.run_ok(&["backup", "--incremental"])?;
    assert!(out.contains("PostgreSQL 15 has no incremental backups"), "{out}");
    assert!(out.contains("full backup"), "{out}");
    let list: serde_json::Value = serde_json::from_str(&env.run_ok(&["list", "--json"])?)?;
    assert_eq!(list["incrementals"]["mode"], "wal", "{list}");
    assert_eq!(list["backups"][0]["kind"], "full", "{list}");
    Ok(())
}
