//! Names are not trusted alone, against a real PostgreSQL 15 and a local repository. Objects are
//! planted the way someone with write access to the bucket but without the key can: raw files
//! under names pitr would use, far in the future, empty or junk.
//! - a planted expire lock: `pitr backup` does not wait for it and names it; a planted running
//!   marker: `pitr expire` still sweeps the blocks of the backup it removes; junk under the name
//!   of the floor that expire writes: replaced by the floor, and the WAL still goes; a planted
//!   floor above a deleted segment: `pitr verify` reports the floor, the marker, the lock and the
//!   missing segment, and passes again once they are gone and the segment is back; junk under a
//!   backup manifest's name: `pitr list` leaves it out, `pitr expire` refuses naming it, and
//!   `pitr verify` reports it, as it reports junk under a lease generation's name;
//! - the newest WAL objects of a streamed archive deleted (a rolled-back bucket): `pitr verify`
//!   reports it from the server's slot, and from a backup manifest when the server is not
//!   reachable.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_tests::pitr::{segment_number, PitrEnv, WAL_SEGMENT_SIZE};
use pitr_tests::{lsn_to_u64, Child, PgCluster, PgOptions};

/// A year ahead: a planted time far past any clock skew.
const YEAR_US: i64 = 366 * 86_400 * 1_000_000;

fn json(out: &str) -> Result<serde_json::Value> {
    serde_json::from_str(out).with_context(|| out.to_string())
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|b| b["id"].as_str().map(String::from)).collect()
}

fn now_us() -> i64 {
    pitr_archive::now_us()
}

/// Writes `bytes` as the object `name` of the local repository, as a bucket writer without the
/// key can.
fn plant(env: &PitrEnv, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = env.repo_path().join(name);
    std::fs::create_dir_all(path.parent().context("object path")?)?;
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// The system identifier of the (only) cluster in the repository.
fn system_id(env: &PitrEnv) -> Result<u64> {
    let wal = env.wal_dir()?;
    let id = wal.parent().and_then(Path::file_name).context("cluster directory")?;
    Ok(id.to_string_lossy().parse()?)
}

/// `pitr verify --json`: (exit success, report).
fn verify(env: &PitrEnv) -> Result<(bool, serde_json::Value)> {
    let out = env.run(&["verify", "--json"])?;
    let report = json(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    Ok((out.status.success(), report))
}

/// The findings of `kind` in a verify report: (object, message).
fn findings(report: &serde_json::Value, kind: &str) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == kind)
        .map(|f| (f["object"].as_str().unwrap_or("").to_string(), f["message"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// Object names (relative to the WAL prefix) of every WAL object of segments `segno` and later.
fn wal_objects_from(env: &PitrEnv, segno: u64) -> Result<Vec<String>> {
    let mut out = env.wal_objects()?;
    out.retain(|name| {
        let segment = name.split('.').next().unwrap_or("");
        segment.len() == 24 && segment_number(segment, WAL_SEGMENT_SIZE) >= segno
    });
    Ok(out)
}

/// The WAL objects `names` (relative to the WAL prefix) taken out of the repository, with their
/// contents, for [`put_back`].
fn set_aside(env: &PitrEnv, names: &[String]) -> Result<Vec<(String, Vec<u8>)>> {
    let prefix = env.wal_prefix()?;
    let mut aside = Vec::new();
    for n in names {
        let name = format!("{prefix}{n}");
        aside.push((name.clone(), env.objects().read(&name)?));
        env.objects().delete(&[name])?;
    }
    Ok(aside)
}

/// Puts objects [`set_aside`] took back under their names.
fn put_back(env: &PitrEnv, aside: Vec<(String, Vec<u8>)>) -> Result<()> {
    for (name, bytes) in aside {
        env.objects().put(&name, bytes)?;
    }
    Ok(())
}

/// `pitr backup` that must finish within `limit` (a backup waiting on a lock would not); its
/// stderr.
fn backup_within(env: &PitrEnv, limit: Duration) -> Result<String> {
    let log = env.dir.path().join("backup.log");
    let mut cmd = env.command(&["backup"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log)?);
    let mut child = Child(cmd.spawn()?);
    let status = child.wait_timeout(limit)?;
    let stderr = std::fs::read_to_string(&log)?;
    match status {
        None => bail!("pitr backup still running after {limit:?} (waiting for a planted lock?):\n{stderr}"),
        Some(s) if !s.success() => bail!("pitr backup failed with {s}:\n{stderr}"),
        Some(_) => Ok(stderr),
    }
}

#[test]
fn pg15_planted_floor_marker_and_lock_are_reported_and_obeyed_by_nobody() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("planted", &cluster, "")?;
    let mut text = std::fs::read_to_string(&env.config)?;
    text.push_str("[retention]\ndaily = 1\nweekly = 0\nmonthly = 0\nyearly = 0\nwindow = \"0s\"\n");
    std::fs::write(&env.config, text)?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.pgbench(&["-i", "-s", "1"])?;
    env.run_ok(&["backup"])?;
    let id = system_id(&env)?;

    // A lock an expire would hold for a year: a backup that obeyed it would never start.
    let now = now_us();
    let lock = format!("running/expire.{now:016X}.{:016X}.planted", now + YEAR_US);
    plant(&env, &lock, b"")?;
    // Pages the first backup has and the second does not: its blocks go when it goes.
    cluster.psql("update pgbench_accounts set abalance = abalance + 1, filler = md5(aid::text)")?;
    let stderr = backup_within(&env, Duration::from_secs(180))?;
    assert!(
        stderr.contains(&lock) && stderr.contains("not pitr's"),
        "the backup did not name the planted lock:\n{stderr}"
    );
    let list = json(&env.run_ok(&["list", "--json"])?)?;
    let backups = ids(&list["backups"]);
    assert_eq!(backups.len(), 2, "{list:#}");

    // A backup "renewed" a year from now: obeyed, it would keep expire off every block forever.
    let marker = format!("running/backup.{now:016X}.{:016X}.planted", now + YEAR_US);
    plant(&env, &marker, b"junk")?;
    // Junk under the name of the floor this expire writes (the kept backup's start segment, a
    // predictable name): it must not stop the expire before any WAL goes.
    let kept_start = pitr_tests::lsn_to_u64(list["backups"][1]["start_lsn"].as_str().context("start_lsn")?);
    let taken_floor = format!("pg/{id}/retention/00000001-{:016X}.floor", kept_start / WAL_SEGMENT_SIZE);
    let taken_path = plant(&env, &taken_floor, b"junk")?;
    let report = json(&env.run_ok(&["expire", "--json"])?)?;
    assert_eq!(ids(&report["removed_backups"]), vec![backups[0].clone()], "{report:#}");
    assert!(report["blocks_skipped"].is_null(), "{report:#}");
    assert!(report["removed_blocks"].as_u64() > Some(0), "{report:#}");
    assert!(report["removed_wal_objects"].as_u64() > Some(0), "{report:#}");
    let untrusted: Vec<&str> =
        report["untrusted"].as_array().into_iter().flatten().filter_map(|u| u["object"].as_str()).collect();
    assert!(untrusted.contains(&marker.as_str()) && untrusted.contains(&lock.as_str()), "{report:#}");
    let replaced = report["untrusted"].as_array().into_iter().flatten().find(|u| u["object"] == taken_floor.as_str());
    let why = replaced.and_then(|u| u["why"].as_str()).unwrap_or("");
    assert!(why.contains("does not open") && why.contains("wrote the floor in its place"), "{report:#}");
    // Left for inspection, not deleted.
    assert!(env.repo_path().join(&marker).exists() && env.repo_path().join(&lock).exists());
    // The junk floor replaced by the real one (verify below finds only the floor planted later).
    assert_ne!(std::fs::read(&taken_path)?, b"junk", "the floor's name still holds the junk");

    // WAL after the second backup, then one segment of it gone, and a floor above everything
    // that would excuse the hole as retention's.
    for i in 0..4 {
        cluster
            .psql(&format!("insert into pgbench_history (tid, bid, aid, delta, mtime) values (1, 1, {i}, 1, now())"))?;
        cluster.psql("select pg_switch_wal()")?;
    }
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the new segments")?;
    env.stop_stream(&mut stream)?;
    let objects = env.archived_objects()?;
    let segments: Vec<&String> = objects.keys().collect();
    assert!(segments.len() >= 4, "{segments:?}");
    let middle = segments[segments.len() - 2].clone();
    let held: Vec<String> = wal_objects_from(&env, segment_number(&middle, WAL_SEGMENT_SIZE))?
        .into_iter()
        .filter(|n| n.starts_with(&middle))
        .collect();
    let aside = set_aside(&env, &held)?;
    let floor = format!("pg/{id}/retention/00000001-FFFFFFFFFFFFFFFF.floor");
    plant(&env, &floor, b"")?;
    // Junk under a backup manifest's name: listings and restores leave it out (and say so),
    // expire refuses to run beside a manifest it cannot read, verify reports it.
    let manifest = format!("pg/{id}/backups/99991231T000000Z.manifest");
    plant(&env, &manifest, b"junk")?;
    let lease = format!("pg/{id}/lease/FFFFFFFFFFFFFFFF");
    plant(&env, &lease, b"junk")?;
    let listed = json(&env.run_ok(&["list", "--json"])?)?;
    let listed_ids = ids(&listed["backups"]);
    assert!(!listed_ids.is_empty() && !listed_ids.iter().any(|b| b.starts_with("9999")), "{listed:#}");
    let out = env.run(&["expire"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(&manifest), "expire beside a planted manifest:\n{stderr}");

    let (ok, report) = verify(&env)?;
    assert!(!ok && report["ok"] == false, "verify passed with planted objects: {report:#}");
    let bad_floor = findings(&report, "bad-floor");
    assert!(bad_floor.len() == 1 && bad_floor[0].0 == floor && bad_floor[0].1.contains("does not open"), "{report:#}");
    let bad_marker = findings(&report, "bad-marker");
    assert!(bad_marker.len() == 1 && bad_marker[0].0 == marker, "{report:#}");
    let bad_lock = findings(&report, "bad-lock");
    assert!(bad_lock.len() == 1 && bad_lock[0].0 == lock, "{report:#}");
    let bad_manifest = findings(&report, "bad-manifest");
    assert!(bad_manifest.len() == 1 && bad_manifest[0].0 == manifest, "{report:#}");
    let bad_lease = findings(&report, "bad-lease");
    assert!(bad_lease.len() == 1 && bad_lease[0].0 == lease, "{report:#}");
    let gaps = findings(&report, "wal-gap");
    assert!(gaps.iter().any(|(object, _)| object.contains(&middle)), "the hole under the planted floor: {report:#}");
    // The text output names them too.
    let out = env.run(&["verify"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains(&format!("FINDING bad-floor: {floor}")), "{text}");

    // The planted objects gone and the segment back: nothing else was wrong.
    for name in [&floor, &marker, &lock, &manifest, &lease] {
        std::fs::remove_file(env.repo_path().join(name))?;
    }
    put_back(&env, aside)?;
    let (ok, report) = verify(&env)?;
    assert!(ok && report["ok"] == true, "{report:#}");
    Ok(())
}

#[test]
fn pg15_a_rolled_back_archive_is_reported_from_the_slot_and_from_a_manifest() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("rolled-back", &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    cluster.psql("insert into t select g, md5(g::text) from generate_series(1, 20000) g")?;
    let backup = json(&env.run_ok(&["backup", "--json"])?)?;
    let stop_lsn = lsn_to_u64(backup["stop_lsn"].as_str().context("stop_lsn")?);
    for i in 0..3 {
        cluster.psql(&format!(
            "insert into t select g, 'x' from generate_series({}, {}) g",
            100_000 * (i + 1),
            100_000 * (i + 1) + 5000
        ))?;
        cluster.psql("select pg_switch_wal()")?;
    }
    cluster.psql("insert into t values (999999, 'last')")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the workload")?;
    env.stop_stream(&mut stream)?;

    // Whole: the slot agrees with the archive.
    let (ok, report) = verify(&env)?;
    assert!(ok, "{report:#}");
    let notes = report["notes"].to_string();
    assert!(notes.contains("the server's slot pitr_main says WAL up to"), "{report:#}");

    // The newest objects deleted: the archive now ends before what the slot acknowledged.
    let acknowledged =
        lsn_to_u64(&cluster.psql("select restart_lsn from pg_replication_slots where slot_name = 'pitr_main'")?);
    let archived = env.archived_end(WAL_SEGMENT_SIZE)?;
    assert!(acknowledged <= archived, "slot {acknowledged:X} past the archive's end {archived:X}");
    let from = (acknowledged - 1) / WAL_SEGMENT_SIZE;
    let newest = wal_objects_from(&env, from)?;
    assert!(!newest.is_empty());
    let aside = set_aside(&env, &newest)?;
    let (ok, report) = verify(&env)?;
    assert!(!ok, "{report:#}");
    let rolled = findings(&report, "rolled-back");
    assert!(
        rolled.iter().any(|(_, m)| m.contains("the server's slot pitr_main says WAL up to")
            && m.contains(&pitr_tests::u64_to_lsn(acknowledged))),
        "{report:#}"
    );
    // The backup's WAL is still there: its manifest says nothing is missing.
    assert!(!rolled.iter().any(|(o, _)| o.ends_with(".manifest")), "{report:#}");

    // Back as it was, then rolled back past the backup's stop with the server out of reach:
    // the manifest is the witness.
    put_back(&env, aside)?;
    assert!(verify(&env)?.0);
    let unreachable = format!("host=127.0.0.1 port={} user=postgres connect_timeout=2", pitr_tests::free_port()?);
    env.edit_config(&cluster.conninfo("postgres"), &unreachable)?;
    let past_backup = wal_objects_from(&env, stop_lsn / WAL_SEGMENT_SIZE)?;
    set_aside(&env, &past_backup)?;
    let (ok, report) = verify(&env)?;
    assert!(!ok, "{report:#}");
    assert!(report["notes"].to_string().contains("server slot check skipped"), "{report:#}");
    let rolled = findings(&report, "rolled-back");
    assert!(
        rolled.iter().any(|(o, m)| o.ends_with(".manifest") && m.contains(&pitr_tests::u64_to_lsn(stop_lsn))),
        "{report:#}"
    );
    Ok(())
}
