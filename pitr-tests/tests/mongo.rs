//! MongoDB: oplog streaming, snapshots and restore, against SecantusDB (a MongoDB-compatible
//! server; no mongod can be installed here).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bson::{doc, Bson, Document};
use mongodb::options::ClientOptions;
use mongodb::Client;
use pitr_tests::mongo::{MongoEnv, MongoOptions, MongoServer};
use pitr_tests::{free_port, wait_until};

async fn client(uri: &str) -> Result<Client> {
    let mut opts = ClientOptions::parse(uri).await?;
    opts.server_selection_timeout = Some(Duration::from_secs(30));
    Ok(Client::with_options(opts)?)
}

/// The newest oplog entry: (ts seconds, increment, wall ms).
async fn newest(c: &Client) -> Result<(u32, u32, i64)> {
    let e = c
        .database("local")
        .collection::<Document>("oplog.rs")
        .find_one(doc! {})
        .sort(doc! { "$natural": -1 })
        .await?
        .context("empty oplog")?;
    let ts = match e.get("ts") {
        Some(Bson::Timestamp(t)) => *t,
        _ => bail!("entry without ts: {e}"),
    };
    Ok((ts.time, ts.increment, e.get_datetime("wall")?.timestamp_millis()))
}

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
    wait_until("the workload to be under way", Duration::from_secs(60), || Ok(env.slices().len() >= 3))?;
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
    let after_snapshot: Vec<&String> = slices
        .iter()
        .filter(|n| {
            let after: Vec<u32> = n.split('-').next().unwrap_or("").split('.').filter_map(|x| x.parse().ok()).collect();
            after > snap_after
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
