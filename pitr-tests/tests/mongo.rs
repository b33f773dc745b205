//! MongoDB: oplog streaming, snapshots and restore, against SecantusDB (a MongoDB-compatible
//! server; no mongod can be installed here).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bson::{doc, Bson, Document};
use mongodb::Client;
use pitr_tests::mongo::{client, newest, MongoEnv, MongoOptions, MongoServer};
use pitr_tests::{free_port, wait_until};

async fn oldest(c: &Client) -> Result<(u32, u32)> {
    let e = c
        .database("local")
        .collection::<Document>("oplog.rs")
        .find_one(doc! {})
        .sort(doc! { "$natural": 1 })
        .await?
        .context("empty oplog")?;
    match e.get("ts") {
        Some(Bson::Timestamp(t)) => Ok((t.time, t.increment)),
        _ => bail!("entry without ts: {e}"),
    }
}

/// Every non-system collection's documents by `_id`, and its index names.
async fn state(c: &Client) -> Result<Vec<(String, Vec<Document>, Vec<String>)>> {
    let mut out = Vec::new();
    let mut dbs = c.list_database_names().await?;
    dbs.sort();
    for db in dbs.iter().filter(|d| !matches!(d.as_str(), "admin" | "local" | "config")) {
        let mut colls = c.database(db).list_collection_names().await?;
        colls.sort();
        for coll in colls.iter().filter(|c| !c.starts_with("system.")) {
            let h = c.database(db).collection::<Document>(coll);
            let mut cursor = h.find(doc! {}).sort(doc! { "_id": 1 }).await?;
            let mut docs = Vec::new();
            while cursor.advance().await? {
                docs.push(Document::try_from(cursor.current())?);
            }
            let mut indexes = h.list_index_names().await?;
            indexes.sort();
            if !docs.is_empty() || indexes.len() > 1 {
                out.push((format!("{db}.{coll}"), docs, indexes));
            }
        }
    }
    Ok(out)
}

/// What differs between two states, by collection and `_id`.
fn differences(got: &[(String, Vec<Document>, Vec<String>)], want: &[(String, Vec<Document>, Vec<String>)]) -> String {
    let mut out = Vec::new();
    let names: std::collections::BTreeSet<&String> = got.iter().chain(want).map(|(n, _, _)| n).collect();
    for n in names {
        let find =
            |s: &[(String, Vec<Document>, Vec<String>)]| s.iter().find(|(m, _, _)| m == n).cloned().unwrap_or_default();
        let (g, w) = (find(got), find(want));
        if g.2 != w.2 {
            out.push(format!("{n}: indexes {:?}, want {:?}", g.2, w.2));
        }
        for d in &g.1 {
            if !w.1.contains(d) {
                out.push(format!("{n}: unexpected {d}"));
            }
        }
        for d in &w.1 {
            if !g.1.contains(d) {
                out.push(format!("{n}: missing {d}"));
            }
        }
    }
    out.truncate(20);
    out.join("\n")
}

/// A moment of the workload: where the oplog was and what the data looked like.
struct Moment {
    what: &'static str,
    ts: (u32, u32, i64),
    state: Vec<(String, Vec<Document>, Vec<String>)>,
}

async fn moment(c: &Client, what: &'static str) -> Result<Moment> {
    let m = Moment { what, ts: newest(c).await?, state: state(c).await? };
    // The next write must fall in a later millisecond, so that a TIME target at this moment's
    // wall time is unambiguous.
    while SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64 <= m.ts.2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(m)
}

/// RFC 3339 with milliseconds, UTC (what `--to` accepts).
fn rfc3339_ms(ms: i64) -> String {
    let d = Duration::from_millis(ms as u64);
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn json(env: &MongoEnv, args: &[&str]) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&env.run_ok(args)?)?)
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Documents of `ns` in a recorded state.
fn count_in(state: &[(String, Vec<Document>, Vec<String>)], ns: &str) -> usize {
    state.iter().find(|(n, _, _)| n == ns).map(|(_, d, _)| d.len()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_match_recorded_moments_and_kill9_leaves_no_gap() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let target = MongoServer::start(MongoOptions::default())?;
    let drill_target = format!("drill_target_uri = {:?}", target.direct_uri());
    let mut env = MongoEnv::new("mongo-round-trip", &source.uri(), &drill_target)?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let items = c.database("shop").collection::<Document>("items");
    let orders = c.database("shop").collection::<Document>("orders");

    items.insert_many((0..50).map(|i| doc! { "_id": i, "n": i, "tags": ["a", "b", "c"], "sub": { "x": i } })).await?;
    items.create_index(mongodb::IndexModel::builder().keys(doc! { "n": 1 }).build()).await?;
    let before_snapshot = newest(&c).await?;
    env.wait_archived((before_snapshot.0, before_snapshot.1))?;
    let snap = json(&env, &["backup", "--source", "mongo", "--json"])?;
    assert_eq!(snap["documents"], 50, "{snap}");

    let mut moments = Vec::new();
    for i in 0..10 {
        items
            .update_one(doc! { "_id": i }, doc! { "$set": { "n": i * 100, "sub.y": true }, "$unset": { "sub.x": "" } })
            .await?;
    }
    moments.push(moment(&c, "updates").await?);

    // kill -9 of the sidecar while writes go on.
    let writer = {
        let items = items.clone();
        tokio::spawn(async move {
            for i in 50..250 {
                items.insert_one(doc! { "_id": i, "n": i }).await?;
            }
            anyhow::Ok(())
        })
    };
    // One slice past those that existed at the backup, so the kill lands with part of the
    // workload archived, and so a slice after the snapshot exists for the hole test below.
    let slices_at_backup = env.slices().len();
    wait_until("the workload to be under way", Duration::from_secs(60), || Ok(env.slices().len() > slices_at_backup))?;
    stream.kill9();
    let mut stream = {
        let s = env.spawn_stream()?;
        writer.await??;
        s
    };
    items.delete_many(doc! { "_id": { "$gte": 200 } }).await?;
    moments.push(moment(&c, "inserts across a kill -9, then deletes").await?);

    let mut session = c.start_session().await?;
    session.start_transaction().await?;
    items.insert_one(doc! { "_id": 1000, "n": 1 }).session(&mut session).await?;
    items.update_one(doc! { "_id": 1 }, doc! { "$inc": { "n": 1 } }).session(&mut session).await?;
    orders.insert_one(doc! { "_id": "o1", "item": 1000 }).session(&mut session).await?;
    items.delete_one(doc! { "_id": 2 }).session(&mut session).await?;
    session.commit_transaction().await?;
    moments.push(moment(&c, "a multi-document transaction").await?);

    items.update_one(doc! { "_id": 3 }, doc! { "$pop": { "tags": 1 } }).await?;
    items.replace_one(doc! { "_id": 4 }, doc! { "replaced": true }).await?;
    orders.update_one(doc! { "_id": "o1" }, doc! { "$set": { "paid": true } }).await?;
    c.database("shop")
        .run_command(doc! { "createIndexes": "orders", "indexes": [{ "key": { "paid": 1 }, "name": "paid_1" }] })
        .await?;
    moments.push(moment(&c, "array pop, replace, index").await?);

    let last = moments.last().map(|m| m.ts).context("no moments")?;
    env.wait_archived((last.0, last.1))?;
    env.stop_stream_cleanly(&mut stream)?;

    let listed = json(&env, &["list", "--json"])?;
    assert_eq!(listed["mongo"]["gaps"], serde_json::json!([]), "a kill -9 must leave no gap: {listed}");

    let t = client(&target.direct_uri()).await?;
    for (i, m) in moments.iter().enumerate() {
        // One target given as TIME, the rest as ts:SECONDS:INC.
        let to = if i == 1 { rfc3339_ms(m.ts.2) } else { format!("ts:{}:{}", m.ts.0, m.ts.1) };
        let report = json(
            &env,
            &["restore", "--source", "mongo", "--to", &to, "--target-uri", &target.direct_uri(), "--drop", "--json"],
        )?;
        let got = state(&t).await?;
        if report["last_applied_ts"] != format!("ts:{}:{}", m.ts.0, m.ts.1) || got != m.state {
            let mut entries = Vec::new();
            let mut cursor = c
                .database("local")
                .collection::<Document>("oplog.rs")
                .find(doc! {})
                .projection(doc! { "ts": 1, "wall": 1, "op": 1, "o._id": 1, "o2": 1 })
                .await?;
            while cursor.advance().await? {
                entries.push(cursor.deserialize_current()?.to_string());
            }
            bail!(
                "restore to {} ({to}, moment {:?}): {report}\ndiffers: {}\n{}\noplog:\n{}",
                m.what,
                m.ts,
                differences(&got, &m.state),
                env.stream_logs(),
                entries.join("\n")
            );
        }
    }
    let report = json(
        &env,
        &["restore", "--source", "mongo", "--to", "latest", "--target-uri", &target.direct_uri(), "--drop", "--json"],
    )?;
    assert_eq!(report["data_loss_window_seconds"], 0.0, "{report}");
    assert_eq!(state(&t).await?, moments[3].state);

    // Bad input on restore: a non-empty target without --drop, a target outside the window.
    let out = env.run(&["restore", "--source", "mongo", "--to", "latest", "--target-uri", &target.direct_uri()])?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("is not empty") && stderr_of(&out).contains("--drop"), "{}", stderr_of(&out));
    let out =
        env.run(&["restore", "--source", "mongo", "--to", "ts:1:1", "--target-uri", &target.direct_uri(), "--drop"])?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("outside the recoverable MongoDB window"), "{}", stderr_of(&out));
    let out = env.run(&["restore", "--source", "mongo", "--to", "ts:12", "--target-uri", &target.direct_uri()])?;
    assert!(!out.status.success() && stderr_of(&out).contains("ts:SECONDS:INC"), "{}", stderr_of(&out));

    // verify: the slices chain, every block is there, every entry translates.
    let verified = json(&env, &["verify", "--source", "mongo", "--deep", "--json"])?;
    assert_eq!(verified["ok"], true, "{verified}");
    assert!(verified["entries_checked"].as_u64().unwrap_or(0) >= 250, "{verified}");

    // A drill to the transaction's moment with a count recorded there, and a random one.
    let at_txn = &moments[2];
    let checks = env.dir.path().join("checks.toml");
    std::fs::write(
        &checks,
        format!(
            "[[check]]\nname = \"items\"\ndatabase = \"shop\"\ncollection = \"items\"\nexpect = \"> 0\"\n\
             [[check.recorded]]\nat = \"ts:{}:{}\"\nvalue = \"{}\"\n\
             [[check]]\nname = \"paid orders\"\ndatabase = \"shop\"\ncollection = \"orders\"\n\
             filter = {{ paid = true }}\nexpect = \"= 0\"\n",
            at_txn.ts.0,
            at_txn.ts.1,
            count_in(&at_txn.state, "shop.items")
        ),
    )?;
    let to = format!("ts:{}:{}", at_txn.ts.0, at_txn.ts.1);
    let report_path = env.dir.path().join("drill.md");
    let out = env.run(&[
        "drill",
        "--source",
        "mongo",
        "--to",
        &to,
        "--checks",
        checks.to_str().context("path")?,
        "--report",
        report_path.to_str().context("path")?,
    ])?;
    let markdown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{markdown}\n{}", stderr_of(&out));
    assert!(markdown.contains("**Outcome**: PASS") && markdown.contains("**RTO Achieved**"), "{markdown}");
    let drill: serde_json::Value = serde_json::from_slice(&std::fs::read(report_path.with_extension("json"))?)?;
    assert_eq!(drill["source"], "mongo", "{drill}");
    assert_eq!(drill["restore"]["last_applied_ts"], to, "{drill}");
    let passed: Vec<&str> = drill["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["result"] == "pass")
        .filter_map(|c| c["name"].as_str())
        .collect();
    for name in
        ["items", "paid orders", "built-in: replay stopped at the target", "built-in: every collection is readable"]
    {
        assert!(passed.contains(&name), "check {name:?} did not pass: {drill}");
    }
    assert_eq!(state(&t).await?, at_txn.state, "the drill restored a different state");
    let random = json(&env, &["drill", "--source", "mongo", "--json"])?;
    assert_eq!(random["outcome"], "PASS", "{random}");

    // The drill refuses a host of the backed-up replica set as its scratch server.
    let out = env.command(&["drill", "--source", "mongo"]).env("PITR_MONGO_DRILL_TARGET_URI", source.uri()).output()?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("a host of the backed-up replica set"), "{}", stderr_of(&out));

    // A slice lost from the repository: verify names the hole, and restores stop before it
    // instead of replaying past it.
    let snap_after: Vec<u32> = snap["ts_after"]
        .as_str()
        .and_then(|t| t.strip_prefix("ts:"))
        .map(|t| t.split(':').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    let slices = env.slices();
    // A slice holds entries after the snapshot when it ends after it (its start may be at or
    // before the snapshot's ts_after: the sidecar does not cut slices at backups).
    let after_snapshot: Vec<&String> = slices
        .iter()
        .filter(|n| {
            let end = n.split('-').nth(1).unwrap_or("").trim_end_matches(".slice");
            let end: Vec<u32> = end.split('.').filter_map(|x| x.parse().ok()).collect();
            end > snap_after
        })
        .collect();
    // Not the newest slice: a hole needs a slice after it.
    assert!(after_snapshot.len() >= 2, "too few slices after the snapshot: {slices:?}");
    let lost = after_snapshot[0].clone();
    let set_dir = std::fs::read_dir(env.repo.join("mongo"))?.next().context("no mongo dir")??.path();
    std::fs::remove_file(set_dir.join("oplog").join(&lost))?;
    let out = env.run(&["verify", "--source", "mongo"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("FINDING missing-oplog"), "{text}\nremoved {lost} of {slices:?}");
    let last = &moments[3];
    let out = env.run(&[
        "restore",
        "--source",
        "mongo",
        "--to",
        &format!("ts:{}:{}", last.ts.0, last.ts.1),
        "--target-uri",
        &target.direct_uri(),
        "--drop",
    ])?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("outside the recoverable MongoDB window"), "{}", stderr_of(&out));
    Ok(())
}

/// A moment after the last write, while the sidecar is caught up: the archive's completeness
/// mark says nothing happened up to then, so the restore is exact with a data-loss window of 0,
/// and a moment past the mark is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moment_after_the_last_write_restores_exactly_inside_the_completeness_mark() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let target = MongoServer::start(MongoOptions::default())?;
    let mut env = MongoEnv::new("mongo-complete", &source.uri(), "complete_interval = \"1s\"")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let items = c.database("shop").collection::<Document>("items");
    items.insert_many((0..20).map(|i| doc! { "_id": i })).await?;
    let before = newest(&c).await?;
    env.wait_archived((before.0, before.1))?;
    env.run_ok(&["backup", "--source", "mongo"])?;
    items.insert_many((20..40).map(|i| doc! { "_id": i })).await?;
    let last = moment(&c, "the last write").await?;
    // 0.7 s after the last write, as the issue found refused.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let to = rfc3339_ms(after_ms);
    wait_until("a completeness mark past the moment", Duration::from_secs(60), || {
        let listed = json(&env, &["list", "--json"])?;
        let complete = listed["mongo"]["complete_up_to"].as_str().map(String::from);
        Ok(complete.as_deref().and_then(pitr_restore::target::parse_time).is_some_and(|c| c >= after_ms * 1000))
    })
    .with_context(|| env.stream_logs())?;
    env.stop_stream_cleanly(&mut stream)?;
    let report = json(
        &env,
        &["restore", "--source", "mongo", "--to", &to, "--target-uri", &target.direct_uri(), "--drop", "--json"],
    )?;
    assert_eq!(report["data_loss_window_seconds"], 0.0, "{report}");
    assert_eq!(report["last_applied_ts"], format!("ts:{}:{}", last.ts.0, last.ts.1), "{report}");
    let t = client(&target.direct_uri()).await?;
    assert_eq!(state(&t).await?, last.state);
    // An hour later is past what the archive knows: refused, saying up to when it is complete.
    let out = env.run(&[
        "restore",
        "--source",
        "mongo",
        "--to",
        &rfc3339_ms(after_ms + 3_600_000),
        "--target-uri",
        &target.direct_uri(),
        "--drop",
    ])?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("outside the recoverable MongoDB window"), "{}", stderr_of(&out));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_over_oplog_is_reported_as_a_gap() -> Result<()> {
    let source = MongoServer::start(MongoOptions { oplog_max_entries: Some(100), ..Default::default() })?;
    let mut env = MongoEnv::new("mongo-gap", &source.uri(), "")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let items = c.database("shop").collection::<Document>("items");
    items.insert_many((0..10).map(|i| doc! { "_id": i })).await?;
    let archived = newest(&c).await?;
    env.wait_archived((archived.0, archived.1))?;
    env.stop_stream_cleanly(&mut stream)?;

    // SecantusDB prunes every 1000 writes, down to --oplog-max-entries.
    for i in 10..1200 {
        items.insert_one(doc! { "_id": i }).await?;
    }
    let first_left = oldest(&c).await?;
    assert!(first_left > (archived.0, archived.1), "the oplog did not roll over: oldest {first_left:?}");

    let mut stream = env.spawn_stream()?;
    wait_until("the gap to be recorded", Duration::from_secs(60), || {
        Ok(json(&env, &["list", "--json"])?["mongo"]["gaps"].as_array().is_some_and(|g| !g.is_empty()))
    })
    .with_context(|| env.stream_logs())?;
    let listed = json(&env, &["list", "--json"])?;
    assert_eq!(listed["mongo"]["gaps"][0]["after"], format!("ts:{}:{}", archived.0, archived.1), "{listed}");
    assert_eq!(listed["mongo"]["gaps"][0]["before"], format!("ts:{}:{}", first_left.0, first_left.1), "{listed}");
    assert!(env.stream_logs().contains("GAP"), "{}", env.stream_logs());
    let (code, body) = env.http_get("/healthz")?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("gap"), "{body}");
    let (_, metrics) = env.http_get("/metrics")?;
    assert!(metrics.contains("pitr_mongo_oplog_gaps_total 1"), "{metrics}");

    // A snapshot after the gap restores; a time inside the gap is outside every window.
    let end = newest(&c).await?;
    env.wait_archived((end.0, end.1))?;
    env.run_ok(&["backup", "--source", "mongo"])?;
    env.stop_stream_cleanly(&mut stream)?;
    let listed = json(&env, &["list", "--json"])?;
    assert_eq!(listed["mongo"]["recoverable_windows"].as_array().map(Vec::len), Some(1), "{listed}");
    // A recorded gap is a warning for verify, not a finding: it was reported when it happened.
    let verified = json(&env, &["verify", "--source", "mongo", "--json"])?;
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(verified["warnings"][0]["kind"], "oplog-gap", "{verified}");
    let target = MongoServer::start(MongoOptions::default())?;
    let inside = format!("ts:{}:{}", first_left.0, first_left.1);
    let out = env.run(&["restore", "--source", "mongo", "--to", &inside, "--target-uri", &target.direct_uri()])?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("outside the recoverable MongoDB window"), "{}", stderr_of(&out));
    Ok(())
}

#[test]
fn unreachable_and_standalone_servers_are_refused() -> Result<()> {
    let nobody = format!("mongodb://127.0.0.1:{}/?replicaSet=rs0", free_port()?);
    let env = MongoEnv::new("mongo-unreachable", &nobody, "")?;
    env.run_ok(&["init"])?;
    for args in [&["stream"][..], &["backup", "--source", "mongo"][..]] {
        let out = env.run(args)?;
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr_of(&out).contains("cannot reach MongoDB at mongodb://127.0.0.1:"),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }

    let standalone = MongoServer::start(MongoOptions { standalone: true, ..Default::default() })?;
    let env = MongoEnv::new("mongo-standalone", &standalone.uri(), "")?;
    env.run_ok(&["init"])?;
    for args in [&["stream"][..], &["backup", "--source", "mongo"][..]] {
        let out = env.run(args)?;
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr_of(&out).contains("is not a replica-set member"), "{args:?}: {}", stderr_of(&out));
    }
    Ok(())
}

/// Snapshots on `[mongo] snapshot_schedule` (one at start-up, as none exists yet), and the
/// tailer's and the scheduler's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_snapshots_and_metrics() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let mut env = MongoEnv::new("mongo-scheduled", &source.uri(), "snapshot_schedule = \"*/2 * * * * *\"")?;
    env.run_ok(&["init"])?;
    let c = client(&source.uri()).await?;
    c.database("shop").collection::<Document>("items").insert_many((0..20).map(|i| doc! { "_id": i })).await?;
    let mut stream = env.spawn_stream()?;
    wait_until("two scheduled snapshots", Duration::from_secs(60), || {
        Ok(json(&env, &["list", "--json"])?["mongo"]["snapshots"].as_array().is_some_and(|s| s.len() >= 2))
    })
    .with_context(|| env.stream_logs())?;
    let end = newest(&c).await?;
    env.wait_archived((end.0, end.1))?;
    let (_, metrics) = env.http_get("/metrics")?;
    for name in [
        "pitr_mongo_oplog_lag_seconds",
        "pitr_mongo_archived_ts_seconds",
        "pitr_mongo_slices_archived_total",
        "pitr_mongo_oplog_window_seconds",
        "backup_success{backup_type=\"full\",source=\"mongo\"} 1",
        "pitr_last_backup_timestamp_seconds{backup_type=\"full\",source=\"mongo\"}",
        "pitr_scheduled_runs_total{job=\"mongo_snapshot\",result=\"success\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    env.stop_stream_cleanly(&mut stream)?;
    assert!(
        env.stream_logs().contains("event=\"catch-up\"") || env.stream_logs().contains("catch-up"),
        "{}",
        env.stream_logs()
    );
    Ok(())
}

/// Every collection of `db` as listCollections describes it (name, type, options), by name.
async fn described(c: &Client, db: &str) -> Result<Vec<(String, String, Document)>> {
    let mut cursor = c.database(db).run_cursor_command(doc! { "listCollections": 1 }).await?;
    let mut out = Vec::new();
    while cursor.advance().await? {
        let spec = cursor.deserialize_current()?;
        out.push((
            spec.get_str("name")?.to_string(),
            spec.get_str("type").unwrap_or("collection").to_string(),
            spec.get_document("options").cloned().unwrap_or_default(),
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The documents of `db.coll` in `_id` order.
async fn documents(c: &Client, db: &str, coll: &str) -> Result<Vec<Document>> {
    let mut cursor = c.database(db).collection::<Document>(coll).find(doc! {}).sort(doc! { "_id": 1 }).await?;
    let mut out = Vec::new();
    while cursor.advance().await? {
        out.push(cursor.deserialize_current()?);
    }
    Ok(out)
}

/// A time-series collection (SecantusDB keeps them as ordinary collections with a `timeseries`
/// option, and logs their writes under their own name), a capped, a clustered and a validated
/// collection, a view, and more collections and indexes than one listCollections / listIndexes
/// batch (`[mongo] batch_size = 2`): all in the snapshot and restored exactly, with the oplog
/// replayed over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_kinds_and_listings_longer_than_one_batch_round_trip() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let target = MongoServer::start(MongoOptions::default())?;
    let mut env = MongoEnv::new("mongo-kinds", &source.uri(), "batch_size = 2")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let kinds = c.database("kinds");
    kinds.run_command(doc! { "create": "weather", "timeseries": { "timeField": "t", "metaField": "station" } }).await?;
    kinds.run_command(doc! { "create": "recent", "capped": true, "size": 4096, "max": 3 }).await?;
    kinds
        .run_command(doc! { "create": "clustered", "clusteredIndex": { "key": { "_id": 1 }, "unique": true } })
        .await?;
    kinds.run_command(doc! { "create": "checked", "validator": { "n": { "$type": "int" } } }).await?;
    kinds
        .run_command(
            doc! { "create": "warm", "viewOn": "weather", "pipeline": [{ "$match": { "temp": { "$gt": 20 } } }] },
        )
        .await?;
    let t0 = bson::DateTime::from_millis(1_796_000_000_000);
    let reading = |i: i64| doc! { "_id": i, "t": bson::DateTime::from_millis(t0.timestamp_millis() + i * 1000), "station": i % 3, "temp": 15 + i };
    kinds.collection::<Document>("weather").insert_many((0..10).map(reading)).await?;
    kinds.collection::<Document>("recent").insert_many((0..5).map(|i| doc! { "_id": i })).await?;
    kinds.collection::<Document>("clustered").insert_many((0..5).map(|i| doc! { "_id": i, "v": i })).await?;
    kinds.collection::<Document>("checked").insert_many((0..5).map(|i| doc! { "_id": i, "n": i })).await?;
    let many = c.database("many");
    for i in 0..7 {
        many.collection::<Document>(&format!("c{i}")).insert_one(doc! { "_id": i, "c": i }).await?;
    }
    many.run_command(doc! { "createIndexes": "c0", "indexes": [
        { "key": { "a": 1 }, "name": "a_1" }, { "key": { "b": 1 }, "name": "b_1" }, { "key": { "c": 1 }, "name": "c_1" },
    ] })
    .await?;
    let before = newest(&c).await?;
    env.wait_archived((before.0, before.1))?;
    let snap = json(&env, &["backup", "--source", "mongo", "--json"])?;
    assert_eq!(snap["collections"], 5 + 7, "{snap}");

    // After the snapshot: replayed from the oplog.
    kinds.collection::<Document>("weather").insert_many((10..15).map(reading)).await?;
    kinds.collection::<Document>("recent").insert_many((5..7).map(|i| doc! { "_id": i })).await?;
    kinds.collection::<Document>("clustered").delete_one(doc! { "_id": 0 }).await?;
    many.collection::<Document>("c7").insert_one(doc! { "_id": 7 }).await?;
    let end = newest(&c).await?;
    env.wait_archived((end.0, end.1))?;
    env.stop_stream_cleanly(&mut stream)?;

    let report = json(
        &env,
        &["restore", "--source", "mongo", "--to", "latest", "--target-uri", &target.direct_uri(), "--drop", "--json"],
    )?;
    let t = client(&target.direct_uri()).await?;
    for db in ["kinds", "many"] {
        let (want, got) = (described(&c, db).await?, described(&t, db).await?);
        let names =
            |d: &[(String, String, Document)]| d.iter().map(|(n, k, _)| format!("{n} ({k})")).collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{db}: {report}");
        for ((name, kind, want_options), (_, _, got_options)) in want.iter().zip(&got) {
            assert_eq!(got_options, want_options, "{db}.{name}: options");
            assert_eq!(
                documents(&t, db, name).await?,
                documents(&c, db, name).await?,
                "{db}.{name} ({kind}): documents"
            );
        }
    }
    assert_eq!(documents(&t, "kinds", "weather").await?.len(), 15);
    assert_eq!(documents(&t, "kinds", "recent").await?.len(), 3, "the capped collection keeps its cap");
    let mut indexes = t.database("many").collection::<Document>("c0").list_index_names().await?;
    indexes.sort();
    assert_eq!(indexes, ["_id_", "a_1", "b_1", "c_1"]);
    Ok(())
}

/// `restore --drop` into the backed-up server itself, reached under another name (`localhost`
/// instead of 127.0.0.1, which a comparison of host strings lets through), is refused by the
/// server's identity, and so is a drill onto it; another server with the same replica-set name
/// is a fine target. A target URI with a password is refused on the command line, and taken
/// from `$PITR_MONGO_TARGET_URI` or `--target-uri-file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_targets_are_told_apart_by_identity_and_passwords_stay_off_the_command_line() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let target = MongoServer::start(MongoOptions::default())?;
    let alias = format!("mongodb://localhost:{}/?directConnection=true", source.port);
    let mut env = MongoEnv::new("mongo-identity", &source.uri(), &format!("drill_target_uri = {alias:?}"))?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let items = c.database("shop").collection::<Document>("items");
    items.insert_many((0..10).map(|i| doc! { "_id": i })).await?;
    let end = newest(&c).await?;
    env.wait_archived((end.0, end.1))?;
    env.run_ok(&["backup", "--source", "mongo"])?;
    env.stop_stream_cleanly(&mut stream)?;

    let out = env.run(&["restore", "--source", "mongo", "--to", "latest", "--target-uri", &alias, "--drop"])?;
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("is the backed-up server") && stderr_of(&out).contains("processId"),
        "{}",
        stderr_of(&out)
    );
    let out = env.run(&["drill", "--source", "mongo", "--to", "latest", "--json"])?;
    assert!(!out.status.success(), "a drill onto the source passed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("is the backed-up server"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(items.count_documents(doc! {}).await?, 10, "the source lost data");

    // A password on the command line is refused, and not echoed.
    let with_password = format!("mongodb://restorer:hunter2@127.0.0.1:{}/?directConnection=true", target.port);
    let out = env.run(&["restore", "--source", "mongo", "--to", "latest", "--target-uri", &with_password])?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("process list") && !stderr_of(&out).contains("hunter2"), "{}", stderr_of(&out));

    // From the environment, then from a file: the other server (same set name) restores.
    let out = env
        .command(&["restore", "--source", "mongo", "--to", "latest", "--drop", "--json"])
        .env("PITR_MONGO_TARGET_URI", target.direct_uri())
        .output()?;
    assert!(out.status.success(), "{}", stderr_of(&out));
    let t = client(&target.direct_uri()).await?;
    assert_eq!(t.database("shop").collection::<Document>("items").count_documents(doc! {}).await?, 10);
    let file = env.dir.path().join("target-uri");
    std::fs::write(&file, format!("# scratch server\n{}\n", target.direct_uri()))?;
    let file = file.to_str().context("path")?;
    let report =
        json(&env, &["restore", "--source", "mongo", "--to", "latest", "--target-uri-file", file, "--drop", "--json"])?;
    assert_eq!(report["documents"], 10, "{report}");
    Ok(())
}

/// A server that stops answering (SIGSTOP: connections open, no replies) ends the tailer's
/// getMore after `read_timeout` with a clear error; the tailer reconnects and, once the server
/// answers again, archives what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_times_out_the_tailer_which_reconnects() -> Result<()> {
    let mut source = MongoServer::start(MongoOptions::default())?;
    let mut env = MongoEnv::new("mongo-hung", &source.uri(), "read_timeout = \"2s\"")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let items = c.database("shop").collection::<Document>("items");
    items.insert_many((0..10).map(|i| doc! { "_id": i })).await?;
    let first = newest(&c).await?;
    env.wait_archived((first.0, first.1))?;

    source.signal(libc::SIGSTOP)?;
    let timed_out = wait_until("the tailer to give up on the hung getMore", Duration::from_secs(30), || {
        Ok(env.stream_log(1).contains("no answer to the oplog cursor's getMore within 2 s"))
    });
    source.signal(libc::SIGCONT)?;
    timed_out.with_context(|| env.stream_logs())?;
    assert!(stream.is_running(), "the sidecar exited:\n{}", env.stream_logs());

    items.insert_many((10..20).map(|i| doc! { "_id": i })).await?;
    let last = newest(&c).await?;
    env.wait_archived((last.0, last.1))?;
    env.stop_stream_cleanly(&mut stream)?;
    let tailing = env.stream_log(1).matches("tailing local.oplog.rs").count();
    assert!(tailing >= 2, "the tailer did not reconnect:\n{}", env.stream_logs());
    let listed = json(&env, &["list", "--json"])?;
    assert_eq!(listed["mongo"]["gaps"], serde_json::json!([]), "{listed}");
    Ok(())
}

/// A TCP proxy in front of a MongoDB server that, while `stall` is set, stops passing the
/// server's replies on any connection that has sent a `getMore`: the server keeps answering
/// everything else (the driver's monitor sees a healthy server), only the cursor's connection
/// goes silent, as on a half-broken network path or a server stuck in one operation. With
/// `inflate_max_message`, every `hello` reply advertises `maxMessageSizeBytes` = 2^31 - 1, as a
/// hostile server could.
async fn proxy(
    upstream: u16,
    inflate_max_message: bool,
) -> Result<(u16, std::sync::Arc<std::sync::atomic::AtomicBool>)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let stall = Arc::new(AtomicBool::new(false));
    let stall_all = stall.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let stalled = Arc::new(AtomicBool::new(false));
            let (stall_all, stalled_up) = (stall_all.clone(), stalled.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = client_read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if stall_all.load(Ordering::SeqCst) && buf[..n].windows(7).any(|w| w == b"getMore") {
                        stalled_up.store(true, Ordering::SeqCst);
                    }
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = server_read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    // A stalled connection stays open and silent for good.
                    while stalled.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    const FIELD: &[u8] = b"\x10maxMessageSizeBytes\x00";
                    if inflate_max_message {
                        // Same length in, same length out: the message's length fields hold.
                        if let Some(at) = buf[..n].windows(FIELD.len()).position(|w| w == FIELD) {
                            if let Some(value) = buf.get_mut(at + FIELD.len()..at + FIELD.len() + 4) {
                                value.copy_from_slice(&i32::MAX.to_le_bytes());
                            }
                        }
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok((port, stall))
}

/// Only the oplog cursor's connection goes silent (the server answers the driver's monitor and
/// every other command): the getMore is given up after `read_timeout` with a clear error, the
/// tailer reconnects on a new connection, and streaming goes on without a gap. Without the
/// timeout the tailer waits for that reply for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_getmore_that_never_returns_times_out_while_the_server_answers_everything_else() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let (port, stall) = proxy(source.port, false).await?;
    // A direct connection: the driver would otherwise follow `hello.hosts` around the proxy.
    let through_proxy = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let mut env = MongoEnv::new("mongo-stalled-getmore", &through_proxy, "read_timeout = \"2s\"")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let items = c.database("shop").collection::<Document>("items");
    items.insert_many((0..10).map(|i| doc! { "_id": i })).await?;
    let first = newest(&c).await?;
    env.wait_archived((first.0, first.1))?;

    stall.store(true, std::sync::atomic::Ordering::SeqCst);
    let timed_out = wait_until("the tailer to give up on the silent getMore", Duration::from_secs(30), || {
        Ok(env.stream_log(1).contains("no answer to the oplog cursor's getMore within 2 s"))
    });
    stall.store(false, std::sync::atomic::Ordering::SeqCst);
    timed_out.with_context(|| env.stream_logs())?;

    items.insert_many((10..20).map(|i| doc! { "_id": i })).await?;
    let last = newest(&c).await?;
    env.wait_archived((last.0, last.1))?;
    env.stop_stream_cleanly(&mut stream)?;
    assert!(env.stream_log(1).matches("tailing local.oplog.rs").count() >= 2, "{}", env.stream_logs());
    let listed = json(&env, &["list", "--json"])?;
    assert_eq!(listed["mongo"]["gaps"], serde_json::json!([]), "{listed}");
    Ok(())
}

/// A server that advertises a huge `maxMessageSizeBytes` (which the driver would then accept as
/// the length of each reply, allocating it whole) is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_advertising_huge_messages_is_refused() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let (port, _) = proxy(source.port, true).await?;
    let through_proxy = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let env = MongoEnv::new("mongo-huge-messages", &through_proxy, "")?;
    env.run_ok(&["init"])?;
    let out = env.run(&["backup", "--source", "mongo"])?;
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("maxMessageSizeBytes = 2147483647, more than the 50331648 pitr accepts"),
        "{}",
        stderr_of(&out)
    );
    // The same server unaltered is fine.
    let direct = MongoEnv::new("mongo-normal-messages", &source.uri(), "")?;
    direct.run_ok(&["init"])?;
    direct.run_ok(&["backup", "--source", "mongo"])?;
    Ok(())
}
