//! Secondary repositories against real servers: a local secondary and one on moto's S3 server
//! receive every object; with objects deleted and damaged in the primary, restores are still
//! exact (reads fall back), `--from` reads a secondary first, `pitr copy --to` back-fills a
//! secondary added later, and a secondary that is down holds up the WAL acknowledgement only when
//! it is `required`.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pitr_tests::pitr::{LocalObjects, PitrEnv};
use pitr_tests::{lsn_to_u64, wait_until, PgCluster, PgOptions, S3Server};

fn table_state(psql: impl Fn(&str) -> Result<String>) -> Result<String> {
    psql("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t")
}

fn insert(cluster: &PgCluster, from: i32, rows: i32) -> Result<()> {
    cluster.psql(&format!(
        "insert into t select g, md5(g::text) || repeat('x', 400) from generate_series({from}, {}) g",
        from + rows - 1
    ))?;
    Ok(())
}

fn add_secondary(env: &PitrEnv, lines: &str) -> Result<()> {
    let mut text = std::fs::read_to_string(&env.config)?;
    text.push_str(&format!("[[repository.secondary]]\n{lines}\n"));
    std::fs::write(&env.config, text)?;
    Ok(())
}

fn status(env: &PitrEnv) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&env.run_ok(&["status", "--json"])?)?)
}

/// The sidecar's copy state of secondary `name` (from `pitr status --json`).
fn copy_state(env: &PitrEnv, name: &str) -> Result<serde_json::Value> {
    let s = status(env)?;
    let entry = s["secondaries"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name))
        .with_context(|| format!("no secondary {name} in {s:#}"))?;
    Ok(entry["copy"].clone())
}

fn wait_caught_up(env: &PitrEnv, name: &str) -> Result<()> {
    wait_until(&format!("secondary {name} to catch up"), Duration::from_secs(120), || {
        let c = copy_state(env, name)?;
        Ok(c["state"] == "caught_up" && c["queued_objects"] == 0)
    })
    .with_context(|| env.stream_logs())
}

/// pitr's flush position as the primary sees it (its acknowledgement).
fn acknowledged(cluster: &PgCluster) -> Result<u64> {
    let lsn = cluster
        .psql("select coalesce(flush_lsn, '0/0') from pg_stat_replication where application_name = 'pitr_main'")?;
    Ok(if lsn.is_empty() { 0 } else { lsn_to_u64(&lsn) })
}

/// Objects in the local repository at `root`, by name; the lease and `running/` (coordination
/// on the primary only, never copied) excluded.
fn objects(root: &Path) -> Result<Vec<String>> {
    let mut out = LocalObjects::new(root).list("")?;
    out.retain(|name| !name.contains("/lease/") && !name.starts_with("running/"));
    Ok(out)
}

/// Fails naming what `copy` lacks of `primary` (a copy may also hold a few chunks whose
/// deletion was still queued when the sidecar stopped: that is no gap).
fn assert_holds(copy: &Path, primary: &Path) -> Result<()> {
    let held: std::collections::BTreeSet<String> = objects(copy)?.into_iter().collect();
    let lacking: Vec<String> = objects(primary)?.into_iter().filter(|o| !held.contains(o)).collect();
    if !lacking.is_empty() {
        bail!("{} lacks {lacking:?}", copy.display());
    }
    Ok(())
}

/// `pitr copy --to NAME --json`.
fn copy_to(env: &PitrEnv, name: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&env.run_ok(&["copy", "--to", name, "--json"])?)?)
}

fn restore_exact(env: &PitrEnv, cluster: &PgCluster, to: &str, extra: &[&str], expected: &str) -> Result<String> {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let (restored, out) = env.restore_started(to, cluster.bin_dir(), &args)?;
    let got = table_state(|q| restored.psql(q))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if got != expected {
        bail!("restore to {to} {extra:?}: got {got}, expected {expected}\n{stderr}");
    }
    let auto_conf = std::fs::read_to_string(restored.target.join("postgresql.auto.conf"))?;
    Ok(format!("{stderr}\n{auto_conf}"))
}

#[test]
fn pg15_restores_stay_exact_with_objects_lost_from_the_primary() -> Result<()> {
    let s3 = S3Server::start()?;
    s3.create_bucket("pitr-dr")?;
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("secondary", &cluster, "")?;
    let nas = env.dir.path().join("nas");
    add_secondary(&env, &format!("name = \"nas\"\npath = {:?}", nas.display().to_string()))?;
    add_secondary(
        &env,
        &format!(
            "name = \"cloud\"\nurl = \"s3://pitr-dr/copy\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nallow_http = true\nforce_path_style = true",
            s3.endpoint()
        ),
    )?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert(&cluster, 1, 5000)?;
    env.run_ok(&["backup"])?;
    // A whole segment after the backup, which every restore below replays.
    insert(&cluster, 5001, 5000)?;
    let needed = cluster.psql("select pg_walfile_name(pg_current_wal_lsn())")?;
    cluster.psql("select pg_switch_wal()")?;
    insert(&cluster, 10001, 3000)?;
    std::thread::sleep(Duration::from_millis(1100));
    let moment = cluster.psql("select clock_timestamp()")?;
    let at_moment = table_state(|q| cluster.psql(q))?;
    std::thread::sleep(Duration::from_millis(1100));
    cluster.psql("delete from t where id % 3 = 0")?;
    insert(&cluster, 20001, 2000)?;
    let last = table_state(|q| cluster.psql(q))?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the workload")?;
    for name in ["nas", "cloud"] {
        wait_caught_up(&env, name)?;
    }
    env.stop_stream(&mut stream)?;

    // Everything was copied as it was written: a back-fill finds nothing missing.
    let primary_objects = objects(&env.repo)?;
    assert_holds(&nas, &env.repo)?;
    for name in ["nas", "cloud"] {
        let copied = copy_to(&env, name)?;
        assert_eq!(copied["missing"], 0, "{name}: {copied:#}");
        assert_eq!(copied["primary_objects"].as_u64(), Some(primary_objects.len() as u64), "{copied:#}");
    }

    // Lose a segment the restores need and a backup block, and damage another block.
    let wal = env.wal_prefix()?;
    let segment = format!("{wal}{needed}.seg");
    ensure!(env.objects().exists(&segment)?, "{segment} is not in the repository");
    env.objects().delete(&[segment])?;
    let blocks = env.objects().list(&format!("{}blocks/", wal.strip_suffix("wal/").context("WAL prefix")?))?;
    assert!(blocks.len() >= 2, "{blocks:?}");
    env.objects().delete(&blocks[..1])?;
    let mut damaged = env.objects().read(&blocks[1])?;
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x20;
    // A store cannot change an object in place: the damaged bytes are put under the same name.
    env.objects().replace(&blocks[1], damaged)?;
    let block_id = |name: &str| name.rsplit('/').next().unwrap_or_default().to_string();

    // The primary alone is no longer whole, and verify says so; the secondaries are.
    let verify = env.run(&["verify", "--json"])?;
    assert!(!verify.status.success(), "verify of the damaged primary passed");
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout)?;
    let findings = report["findings"].to_string();
    assert!(findings.contains(&needed) && findings.contains(&block_id(&blocks[0])), "{report:#}");
    for name in ["nas", "cloud"] {
        let v: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--deep", "--json", "--from", name])?)?;
        assert_eq!(v["ok"], true, "{name}: {v:#}");
    }

    // wal-fetch of the lost segment falls back, naming the object and where it came from.
    let fetched = env.run(&["wal-fetch", &needed, &env.dir.path().join("fetched").display().to_string()])?;
    let stderr = String::from_utf8_lossy(&fetched.stderr);
    assert!(fetched.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("{needed}.seg")) && stderr.contains("nas"), "{stderr}");

    let log = restore_exact(&env, &cluster, &moment, &[], &at_moment)?;
    for block in &blocks[..2] {
        assert!(log.contains(&block_id(block)), "no fallback warning for {block}:\n{log}");
    }
    restore_exact(&env, &cluster, "latest", &[], &last)?;
    // From the S3 secondary first; the restore_command carries the choice.
    let log = restore_exact(&env, &cluster, "latest", &["--from", "cloud"], &last)?;
    assert!(log.contains("wal-fetch --from cloud"), "{log}");
    let listed: serde_json::Value = serde_json::from_str(&env.run_ok(&["list", "--json", "--from", "cloud"])?)?;
    assert_eq!(listed["backups"].as_array().map(Vec::len), Some(1), "{listed:#}");
    let err = env.run(&["restore", "--to", "latest", "--target-dir", "/nonexistent/x", "--from", "tape"])?;
    assert!(String::from_utf8_lossy(&err.stderr).contains("--from tape: no repository of that name"));
    Ok(())
}

#[test]
fn pg15_copy_back_fills_a_secondary_added_later() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("secondary-late", &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert(&cluster, 1, 3000)?;
    env.run_ok(&["backup"])?;
    insert(&cluster, 3001, 3000)?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the workload")?;
    env.stop_stream(&mut stream)?;

    let late = env.dir.path().join("late");
    add_secondary(&env, &format!("name = \"late\"\npath = {:?}", late.display().to_string()))?;
    let out = env.run(&["copy", "--to", "late"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `pitr init`"), "{out:?}");
    let out = env.run(&["copy", "--to", "elsewhere"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("--to elsewhere: no [[repository.secondary]]"), "{out:?}");
    env.init()?;
    // Initialised, but empty: verify checks that repository alone, with no fallback.
    assert!(!env.run(&["verify", "--from", "late"])?.status.success());
    let first = copy_to(&env, "late")?;
    let primary_objects = objects(&env.repo)?;
    // Everything but the marker and the key records, which init copied.
    let bound = 1 + primary_objects.iter().filter(|n| n.starts_with("keys/")).count() as u64;
    assert!(bound >= 2, "init made a repository key: {primary_objects:?}");
    assert_eq!(first["copied_objects"].as_u64(), Some(primary_objects.len() as u64 - bound), "{first:#}");
    assert_eq!(first["missing"], first["copied_objects"], "{first:#}");
    assert_eq!(objects(&late)?, primary_objects);
    let again = copy_to(&env, "late")?;
    assert_eq!((again["missing"].as_u64(), again["copied_objects"].as_u64()), (Some(0), Some(0)), "{again:#}");
    let v: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--deep", "--json", "--from", "late"])?)?;
    assert_eq!(v["ok"], true, "{v:#}");
    Ok(())
}

#[test]
fn pg15_a_down_secondary_holds_up_the_ack_only_when_required() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("secondary-down", &cluster, "")?;
    let nas = env.dir.path().join("nas");
    let away = env.dir.path().join("nas-unmounted");
    add_secondary(&env, &format!("name = \"nas\"\npath = {:?}\nrequired = false", nas.display().to_string()))?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    wait_caught_up(&env, "nas")?;

    // The volume goes away: copies fail, and the primary's WAL is acknowledged regardless.
    std::fs::rename(&nas, &away)?;
    insert(&cluster, 1, 2000)?;
    let target = cluster.current_lsn()?;
    wait_until("the acknowledgement to pass the new WAL", Duration::from_secs(60), || {
        Ok(acknowledged(&cluster)? >= target)
    })
    .with_context(|| env.stream_logs())?;
    // The copy in flight when the volume went away fails in its own time: wait for it.
    wait_until("the copies to fail and be retried", Duration::from_secs(60), || {
        let c = copy_state(&env, "nas")?;
        Ok(c["state"] == "retrying" && c["errors"].as_u64() > Some(0) && c["queued_objects"].as_u64() > Some(0))
    })
    .with_context(|| format!("{:#}", copy_state(&env, "nas").unwrap_or_default()))?;
    // Back: the queue drains and the secondary holds everything.
    std::fs::rename(&away, &nas)?;
    wait_caught_up(&env, "nas")?;
    env.stop_stream(&mut stream)?;
    assert_holds(&nas, &env.repo)?;

    // Required: while it is down, the acknowledgement stops.
    env.edit_config("required = false", "required = true")?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    wait_caught_up(&env, "nas")?;
    let before = acknowledged(&cluster)?;
    std::fs::rename(&nas, &away)?;
    insert(&cluster, 2001, 2000)?;
    let target = cluster.current_lsn()?;
    // The sidecar has received the new WAL and failed to copy it several times...
    wait_until("the sidecar to receive the WAL and retry its copy", Duration::from_secs(60), || {
        let s = status(&env)?;
        let received = s["sidecar"]["received_lsn"].as_str().map(lsn_to_u64).unwrap_or(0);
        let c = &s["secondaries"][0]["copy"];
        Ok(received >= target && c["errors"].as_u64() >= Some(3))
    })
    .with_context(|| env.stream_logs())?;
    // ...and has not acknowledged it: the primary would keep that WAL in the slot.
    let held = acknowledged(&cluster)?;
    assert!(held < target, "acknowledged {held:X} ≥ {target:X} with the required secondary down");
    assert!(held >= before);
    std::fs::rename(&away, &nas)?;
    wait_until("the acknowledgement to resume", Duration::from_secs(120), || Ok(acknowledged(&cluster)? >= target))
        .with_context(|| env.stream_logs())?;
    wait_caught_up(&env, "nas")?;
    env.stop_stream(&mut stream)?;
    assert_holds(&nas, &env.repo)?;
    let v: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--json", "--from", "nas"])?)?;
    assert_eq!(v["ok"], true, "{v:#}");
    Ok(())
}
