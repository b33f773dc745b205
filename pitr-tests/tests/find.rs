//! `pitr find` on PostgreSQL 15: a TRUNCATE of one table, a DROP TABLE of another and a big
//! DELETE among a few thousand small commits. `find --table` names each with its xid (the one
//! `txid_current()` gave inside it) and time; `--op` filters; `--json` parses; `--xid` and
//! `--lsn` describe one; restoring to the targets it prints (the command's `--to lsn:X/Y
//! --exclusive` for the DROP, the alternative `--to xid:N --exclusive` for the TRUNCATE) gives the
//! table exactly as it was just before (rows and md5). With
//! the index objects deleted, `find` decodes the WAL (saying so) and finds the same. Refusals:
//! `--exclusive` with latest/immediate/name, an unknown table (naming the snapshots searched),
//! `--since` after `--until`. A TRUNCATE + reload + ANALYZE in one transaction is "TRUNCATE, or
//! a rewrite" and destructive, a VACUUM FULL a harmless rewrite, and a partitioned table (no
//! storage of its own) is found through its partitions.

use anyhow::{Context, Result};
use pitr_tests::checks::expect_failure;
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{PgCluster, PgOptions};

fn state(table: &str) -> String {
    format!("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from {table}")
}

/// A few hundred small commits into `noise` (each its own transaction).
fn small_commits(cluster: &PgCluster, n: usize) -> Result<()> {
    cluster.psql(&format!(
        "do $$ begin for i in 1..{n} loop insert into noise (v) values (md5(i::text)); \
         update a set v = v where id = 1 + i % 100; commit; end loop; end $$"
    ))?;
    Ok(())
}

fn find_json(env: &PitrEnv, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["find", "--json"];
    all.extend_from_slice(args);
    let out = env.run_ok(&all)?;
    serde_json::from_str(&out).with_context(|| out.clone())
}

/// The commit of `xid` among `found`'s commits.
fn commit_of(found: &serde_json::Value, xid: u64) -> Option<serde_json::Value> {
    found["commits"].as_array()?.iter().find(|c| c["xid"] == xid).cloned()
}

#[test]
fn find_names_truncate_drop_and_big_delete_and_restores_just_before() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.psql(
        "create table a (id int primary key, v text); insert into a select g, md5(g::text) from generate_series(1, 2000) g; \
         create table b (id int primary key, v text); insert into b select g, md5(g::text) from generate_series(1, 700) g; \
         create table c (id int primary key, v text); insert into c select g, md5(g::text) from generate_series(1, 8000) g; \
         create table d (id int primary key, v text); insert into d select g, md5(g::text) from generate_series(1, 3000) g; \
         create table e (id int primary key, v text); insert into e select g, md5(g::text) from generate_series(1, 3000) g; \
         create table m (id int, v text) partition by range (id); \
         create table m1 partition of m for values from (0) to (1000); \
         create table m2 partition of m for values from (1000) to (2000); \
         insert into m select g, md5(g::text) from generate_series(1, 1999) g; \
         create table noise (id serial primary key, v text); analyze",
    )?;
    let mut env = PitrEnv::new("pg15-find", &cluster, "\n[find]\ncatalog_interval = \"1h\"")?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    env.run_ok(&["backup"])?;

    small_commits(&cluster, 1000)?;
    let a_before = cluster.psql(&state("a"))?;
    let truncate_xid: u64 = cluster.psql("select txid_current(); truncate a")?.trim().parse()?;
    cluster.psql("insert into a values (1, 'after truncate')")?;
    small_commits(&cluster, 1000)?;
    let b_before = cluster.psql(&state("b"))?;
    let drop_xid: u64 = cluster.psql("select txid_current(); drop table b")?.trim().parse()?;
    small_commits(&cluster, 500)?;
    let delete_xid: u64 = cluster.psql("select txid_current(); delete from c where id <= 5000")?.trim().parse()?;
    // A reload in one transaction (TRUNCATE, load, ANALYZE: the estimate after it is the new
    // rows') is not a harmless rewrite; a VACUUM FULL is.
    let reload_xid: u64 = cluster
        .psql(
            "select txid_current(); truncate d; \
             insert into d select g, 'reloaded' from generate_series(1, 3000) g; analyze d",
        )?
        .trim()
        .parse()?;
    small_commits(&cluster, 100)?;
    cluster.psql("vacuum full e")?;
    let m_xid: u64 = cluster.psql("select txid_current(); drop table m")?.trim().parse()?;
    small_commits(&cluster, 500)?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the workload")?;

    // The sidecar takes a catalog snapshot soon after DDL (the interval, an hour, does not come
    // round in this test): the TRUNCATE is told from the DROP once one after each is stored.
    pitr_tests::wait_until("find to tell the TRUNCATE and the DROP apart", std::time::Duration::from_secs(60), || {
        let a = find_json(&env, &["--table", "a", "--op", "truncate"])?;
        let b = find_json(&env, &["--table", "public.b", "--op", "drop"])?;
        let told = |c: Option<serde_json::Value>, what: &str| c.is_some_and(|c| c["relations"][0]["dropped"] == what);
        let e = find_json(&env, &["--table", "e"])?;
        let e_told = e["commits"].as_array().is_some_and(|c| {
            c.iter().any(|c| c["relations"].as_array().is_some_and(|r| r.iter().any(|t| t["dropped"] == "rewrite")))
        });
        Ok(told(commit_of(&a, truncate_xid), "truncate") && told(commit_of(&b, drop_xid), "drop") && e_told)
    })?;
    let d = find_json(&env, &["--table", "d", "--op", "truncate"])?;
    let reload = commit_of(&d, reload_xid).context("the reload of d")?;
    let dropped: Vec<&serde_json::Value> =
        reload["relations"].as_array().context("relations")?.iter().map(|t| &t["dropped"]).collect();
    assert!(dropped.contains(&&serde_json::json!("truncate_or_rewrite")), "{reload}");
    assert_eq!(reload["destructive"], true, "a TRUNCATE + reload is not a harmless rewrite: {reload}");
    // A partitioned table (no storage of its own) is found through its partitions.
    let m = find_json(&env, &["--table", "m", "--op", "drop"])?;
    let m_drop = commit_of(&m, m_xid).context("the DROP of partitioned m")?;
    assert_eq!(m_drop["relations"].as_array().map(Vec::len), Some(2), "{m_drop}");
    assert_eq!(m_drop["relations"][0]["partition_of"], "public.m", "{m_drop}");
    let e = find_json(&env, &["--table", "e", "--destructive"])?;
    assert_eq!(e["commits"], serde_json::json!([]), "VACUUM FULL is not destructive: {e}");

    // --table a: newest first; the TRUNCATE with its xid, time, targets and destructive flag.
    let a = find_json(&env, &["--table", "a", "--limit", "10000"])?;
    let commits = a["commits"].as_array().context("commits")?;
    assert!(commits.len() > 1000, "the small updates of a are found too: {}", commits.len());
    let times: Vec<i64> = commits.iter().map(|c| c["time_us"].as_i64().unwrap_or_default()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    let t = commit_of(&a, truncate_xid).context("the TRUNCATE")?;
    assert_eq!(t["destructive"], true, "{t}");
    assert_eq!(t["relations"][0]["table"], "public.a", "{t}");
    assert_eq!(t["relations"][0]["dropped"], "truncate", "{t}");
    assert_eq!(t["safe_target_xid"], format!("xid:{truncate_xid}"), "{t}");
    let truncate_lsn = t["commit_lsn"].as_str().context("commit_lsn")?.to_string();
    assert_eq!(t["safe_target_lsn"], format!("lsn:{truncate_lsn}"), "{t}");
    let truncate_time = t["time"].as_str().context("time")?.to_string();
    // Only destructive commits of a: exactly the TRUNCATE.
    let text = env.run_ok(&["find", "--table", "a", "--op", "truncate"])?;
    assert!(text.contains(&format!("xid {truncate_xid}")) && text.contains("TRUNCATE"), "{text}");
    // The command restores to the LSN (from the newest backup before it); the xid is the
    // alternative.
    assert!(
        text.contains(&format!("pitr --config {} restore --to lsn:{truncate_lsn} --exclusive", env.config.display())),
        "{text}"
    );
    assert!(text.contains(&format!("--to xid:{truncate_xid} --exclusive")), "{text}");
    assert!(text.contains(&truncate_time[..19]), "the time is shown: {text}");

    // --since: from the TRUNCATE's own time it is found, from just after it not.
    let found = find_json(&env, &["--table", "a", "--op", "truncate", "--since", &truncate_time])?;
    assert!(commit_of(&found, truncate_xid).is_some(), "{found}");
    let later = pitr_archive::time::format_postgres(t["time_us"].as_i64().unwrap_or_default() + 1);
    let found = find_json(&env, &["--table", "a", "--op", "truncate", "--since", &later])?;
    assert_eq!(found["commits"], serde_json::json!([]), "{found}");

    // The DROP and the big DELETE.
    let b = find_json(&env, &["--table", "b", "--op", "drop"])?;
    let d = commit_of(&b, drop_xid).context("the DROP")?;
    assert_eq!((d["destructive"].clone(), d["relations"][0]["dropped"].clone()), (true.into(), "drop".into()), "{d}");
    let c = find_json(&env, &["--table", "c", "--op", "delete"])?;
    let del = commit_of(&c, delete_xid).context("the DELETE")?;
    assert_eq!(del["relations"][0]["deleted"], 5000, "{del}");
    assert_eq!(del["destructive"], true, "{del}");
    let text = env.run_ok(&["find", "--table", "c", "--op", "truncate"])?;
    assert!(text.starts_with("no commits found"), "{text}");
    let destructive = find_json(&env, &["--destructive"])?;
    let xids: Vec<u64> =
        destructive["commits"].as_array().context("commits")?.iter().filter_map(|c| c["xid"].as_u64()).collect();
    for x in [truncate_xid, drop_xid, delete_xid] {
        assert!(xids.contains(&x), "--destructive lists {x}: {xids:?}");
    }
    // --xid and --lsn describe one transaction.
    let one = find_json(&env, &["--xid", &truncate_xid.to_string()])?;
    assert_eq!(one["commits"].as_array().map(Vec::len), Some(1), "{one}");
    let by_lsn = find_json(&env, &["--lsn", &truncate_lsn])?;
    assert_eq!(by_lsn["commits"][0]["xid"], truncate_xid, "{by_lsn}");

    // Refusals.
    expect_failure(&env.config, &["find", "--table", "nope"], &["public.nope", "catalog snapshot"]);
    expect_failure(
        &env.config,
        &["find", "--table", "a", "--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"],
        &["--since", "after --until"],
    );
    let dir = pitr_tests::scratch_dir("refused");
    let target = dir.path().join("data").display().to_string();
    for to in ["latest", "immediate", "name:x"] {
        expect_failure(&env.config, &["restore", "--to", to, "--exclusive", "--target-dir", &target], &["--exclusive"]);
    }

    // Restoring to the printed targets gives each table as it was just before: the xid form
    // for the TRUNCATE, the command's LSN form for the DROP.
    let (restored, _) = env.restore_started(&format!("xid:{truncate_xid}"), cluster.bin_dir(), &["--exclusive"])?;
    assert_eq!(restored.psql(&state("a"))?, a_before, "a just before the TRUNCATE");
    drop(restored);
    let (restored, _) = env.restore_started(
        &format!("lsn:{}", d["commit_lsn"].as_str().unwrap_or_default()),
        cluster.bin_dir(),
        &["--exclusive"],
    )?;
    assert_eq!(restored.psql(&state("b"))?, b_before, "b just before the DROP");
    drop(restored);

    // Without index objects, find decodes the archived WAL (and says so) and finds the same.
    env.stop_stream(&mut stream)?;
    let cluster_dir = std::fs::read_dir(env.repo.join("pg"))?.next().context("no cluster")??.path();
    let index_dir = cluster_dir.join("index");
    if index_dir.exists() {
        std::fs::remove_dir_all(&index_dir)?;
    }
    // A planted object under a catalog snapshot's name is named and left out, not fatal.
    let planted = cluster_dir.join("catalog").join("00000001.00000000FFFFFFF0");
    std::fs::write(&planted, b"PITRjunk")?;
    let out = env.run(&["find", "--json", "--table", "a", "--op", "truncate"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("decoded from the archived WAL"), "{stderr}");
    assert!(stderr.contains("00000001.00000000FFFFFFF0") && stderr.contains("does not open"), "{stderr}");
    let again: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(commit_of(&again, truncate_xid).is_some(), "{again}");
    Ok(())
}

/// MongoDB (SecantusDB): a `deleteMany` of 1500 documents and a `drop` among ordinary writes are
/// found by `find --source mongo --ns`, destructive, each with the `ts` just before it; restoring
/// to that `ts` would apply everything before it. `--op` filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_names_mongo_drop_and_delete_many() -> Result<()> {
    use bson::{doc, Document};
    use pitr_tests::mongo::{client, newest, MongoEnv, MongoOptions, MongoServer};
    let source = MongoServer::start(MongoOptions::default())?;
    let mut env = MongoEnv::new("mongo-find", &source.uri(), "")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let items = c.database("shop").collection::<Document>("items");
    let logs = c.database("shop").collection::<Document>("logs");
    items.insert_many((0..2000).map(|i| doc! { "_id": i, "n": i })).await?;
    logs.insert_many((0..10).map(|i| doc! { "_id": i })).await?;
    for i in 0..50 {
        items.update_one(doc! { "_id": i }, doc! { "$set": { "n": -1 } }).await?;
    }
    items.delete_many(doc! { "_id": { "$gte": 500 } }).await?;
    items.insert_one(doc! { "_id": 5000 }).await?;
    logs.drop().await?;
    items.insert_one(doc! { "_id": 5001 }).await?;
    let end = newest(&c).await?;
    env.wait_archived((end.0, end.1))?;

    let out = env.run_ok(&["find", "--source", "mongo", "--ns", "shop.items", "--json"])?;
    let found: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let events = found["events"].as_array().context("events")?;
    let deletes: Vec<&serde_json::Value> = events.iter().filter(|e| e["kind"] == "delete").collect();
    let deleted: u64 = deletes.iter().filter_map(|e| e["count"].as_u64()).sum();
    assert_eq!(deleted, 1500, "{found}");
    assert!(deletes.iter().any(|e| e["destructive"] == true), "a deleteMany of 1500 is destructive: {found}");
    assert!(events.iter().any(|e| e["kind"] == "update" && e["count"].as_u64() > Some(0)), "{found}");
    // The newest delete run comes first and its safe target is the ts before its first entry.
    let first_delete = deletes.last().context("a delete")?;
    assert!(first_delete["safe_target"].as_str().is_some_and(|t| t.starts_with("ts:")), "{first_delete}");

    let out = env.run_ok(&["find", "--source", "mongo", "--ns", "shop.logs", "--op", "drop", "--json"])?;
    let dropped: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let drops = dropped["events"].as_array().context("events")?;
    assert_eq!(drops.len(), 1, "the drop of shop.logs: {dropped}");
    assert_eq!(drops[0]["destructive"], true, "{dropped}");
    let text = env.run_ok(&["find", "--source", "mongo", "--ns", "shop.logs", "--op", "delete"])?;
    assert!(text.starts_with("no oplog entries found"), "{text}");
    expect_failure(&env.config, &["find", "--source", "mongo", "--ns", "nodot"], &["DB.COLL"]);
    env.stop_stream_cleanly(&mut stream)?;
    Ok(())
}
