//! One MongoDB collection to a moment (`pitr restore --source mongo --to TIME --ns DB.COLL --as
//! DB.NEWCOLL`), against SecantusDB: the collection as it was, under a new name, in the running
//! server; nothing else written; bad input refused before anything is.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bson::{doc, Document};
use mongodb::Client;
use pitr_tests::checks::expect_failure;
use pitr_tests::mongo::{client, newest, MongoEnv, MongoOptions, MongoServer};

/// The newest entry, after which the next write falls in a later millisecond (so that a TIME
/// target at its wall time is unambiguous).
async fn moment(c: &Client) -> Result<(u32, u32, i64)> {
    let m = newest(c).await?;
    while SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64 <= m.2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(m)
}

fn rfc3339_ms(ms: i64) -> Result<String> {
    let t = chrono::DateTime::from_timestamp_millis(ms).context("time out of range")?;
    Ok(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// A collection's documents in `_id` order.
async fn documents(c: &Client, db: &str, coll: &str) -> Result<Vec<Document>> {
    let mut cursor = c.database(db).collection::<Document>(coll).find(doc! {}).sort(doc! { "_id": 1 }).await?;
    let mut out = Vec::new();
    while cursor.advance().await? {
        out.push(Document::try_from(cursor.current())?);
    }
    Ok(out)
}

/// Every user collection: name, documents in `_id` order, index names.
async fn state(c: &Client) -> Result<Vec<(String, Vec<Document>, Vec<String>)>> {
    let mut out = Vec::new();
    let mut dbs = c.list_database_names().await?;
    dbs.sort();
    for db in dbs.iter().filter(|d| !matches!(d.as_str(), "admin" | "local" | "config")) {
        let mut colls = c.database(db).list_collection_names().await?;
        colls.sort();
        for coll in colls.iter().filter(|c| !c.starts_with("system.")) {
            let mut indexes = c.database(db).collection::<Document>(coll).list_index_names().await?;
            indexes.sort();
            out.push((format!("{db}.{coll}"), documents(c, db, coll).await?, indexes));
        }
    }
    Ok(out)
}

fn without(state: &[(String, Vec<Document>, Vec<String>)], ns: &str) -> Vec<(String, Vec<Document>, Vec<String>)> {
    state.iter().filter(|(n, _, _)| n != ns).cloned().collect()
}

/// Oplog entries after `after` that write anything but the collection `db.coll`: what a
/// collection restore into this server must not produce.
async fn writes_elsewhere(c: &Client, after: (u32, u32), db: &str, coll: &str) -> Result<Vec<String>> {
    let since = bson::Timestamp { time: after.0, increment: after.1 };
    let mut cursor =
        c.database("local").collection::<Document>("oplog.rs").find(doc! { "ts": { "$gt": since } }).await?;
    let mut out = Vec::new();
    while cursor.advance().await? {
        let e = Document::try_from(cursor.current())?;
        let ours = match e.get_str("op")? {
            "n" => true,
            "c" => {
                e.get_str("ns")? == format!("{db}.$cmd")
                    && e.get_document("o")?.iter().next().is_some_and(|(_, v)| v.as_str() == Some(coll))
            }
            _ => e.get_str("ns")? == format!("{db}.{coll}"),
        };
        if !ours {
            out.push(e.to_string());
        }
    }
    Ok(out)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn json(env: &MongoEnv, args: &[&str]) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&env.run_ok(args)?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_restored_to_a_moment_is_that_moment_and_nothing_else_is_written() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let mut env = MongoEnv::new("mongo-collection", &source.uri(), "")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let shop = c.database("shop");
    let items = shop.collection::<Document>("items");
    let orders = shop.collection::<Document>("orders");

    items.insert_many((0..60).map(|i| doc! { "_id": i, "n": i, "tags": ["a", "b"], "sub": { "x": i } })).await?;
    items.create_index(mongodb::IndexModel::builder().keys(doc! { "n": 1 }).build()).await?;
    orders.insert_many((0..10).map(|i| doc! { "_id": format!("o{i}"), "item": i })).await?;
    shop.collection::<Document>("audit").insert_one(doc! { "_id": 1, "what": "opened" }).await?;
    let before_snapshot = newest(&c).await?;
    env.wait_archived((before_snapshot.0, before_snapshot.1))?;
    let snap = json(&env, &["backup", "--source", "mongo", "--json"])?;
    assert_eq!(snap["documents"], 71, "{snap}");

    // Between the snapshot and T: updates, deletes, inserts, and a transaction that also writes
    // another collection.
    for i in 0..10 {
        items.update_one(doc! { "_id": i }, doc! { "$set": { "n": i * 10 }, "$unset": { "sub.x": "" } }).await?;
    }
    items.delete_many(doc! { "_id": { "$gte": 50 } }).await?;
    items.insert_many((100..110).map(|i| doc! { "_id": i, "n": i, "new": true })).await?;
    let mut session = c.start_session().await?;
    session.start_transaction().await?;
    items.insert_one(doc! { "_id": 200, "n": 1 }).session(&mut session).await?;
    items.update_one(doc! { "_id": 20 }, doc! { "$inc": { "n": 1 } }).session(&mut session).await?;
    orders.insert_one(doc! { "_id": "o-txn", "item": 200 }).session(&mut session).await?;
    session.commit_transaction().await?;
    let t = moment(&c).await?;
    let items_at_t = documents(&c, "shop", "items").await?;
    let mut indexes_at_t = items.list_index_names().await?;
    indexes_at_t.sort();

    // After T: more of the same, a field added to some documents, a new index, a collection
    // created, and other collections written.
    for i in 10..20 {
        items.update_one(doc! { "_id": i }, doc! { "$set": { "n": -i } }).await?;
    }
    items.update_many(doc! { "_id": { "$lt": 30 } }, doc! { "$set": { "added": "after t" } }).await?;
    items.delete_many(doc! { "_id": { "$gte": 100, "$lt": 105 } }).await?;
    items.insert_many((300..320).map(|i| doc! { "_id": i, "n": i })).await?;
    items.create_index(mongodb::IndexModel::builder().keys(doc! { "added": 1 }).build()).await?;
    shop.collection::<Document>("late").insert_one(doc! { "_id": 1 }).await?;
    orders.delete_one(doc! { "_id": "o1" }).await?;
    let mut session = c.start_session().await?;
    session.start_transaction().await?;
    items.delete_one(doc! { "_id": 0 }).session(&mut session).await?;
    orders.update_one(doc! { "_id": "o2" }, doc! { "$set": { "paid": true } }).session(&mut session).await?;
    session.commit_transaction().await?;
    let end = newest(&c).await?;
    env.wait_archived((end.0, end.1))?;
    env.stop_stream_cleanly(&mut stream)?;
    assert_ne!(documents(&c, "shop", "items").await?, items_at_t, "the workload did not change the collection after T");

    // Restored into the running server itself, under a new name.
    let target_uri = source.direct_uri();
    let before = state(&c).await?;
    let oplog_before = newest(&c).await?;
    let to = rfc3339_ms(t.2)?;
    let report = json(
        &env,
        &[
            "restore",
            "--source",
            "mongo",
            "--to",
            &to,
            "--ns",
            "shop.items",
            "--as",
            "shop.items_at_t",
            "--target-uri",
            &target_uri,
            "--json",
        ],
    )?;
    let restored = documents(&c, "shop", "items_at_t").await?;
    assert_eq!(restored, items_at_t, "the restored collection is not the collection at T; report: {report}");
    let mut restored_indexes = shop.collection::<Document>("items_at_t").list_index_names().await?;
    restored_indexes.sort();
    assert_eq!(restored_indexes, indexes_at_t, "{report}");
    assert_eq!(report["ns"], "shop.items", "{report}");
    assert_eq!(report["restored_as"], "shop.items_at_t", "{report}");
    let reported_target = report["target"].as_str().and_then(pitr_restore::target::parse_time);
    assert_eq!(reported_target, Some(t.2 * 1000), "{report}");
    assert_eq!(report["documents"], items_at_t.len(), "{report}");
    assert_eq!(report["snapshot_documents"], 60, "{report}");
    assert_eq!(report["last_applied_ts"], format!("ts:{}:{}", t.0, t.1), "{report}");
    assert_eq!(report["transactions_applied"], 1, "{report}");
    // 10 updates, 10 deletes, 10 inserts, the transaction's 2 entries on items.
    assert_eq!(report["entries_applied"], 32, "{report}");
    assert!(report["seconds"].as_f64().is_some_and(|s| s > 0.0), "{report}");
    // The original and every other collection are as they were; the oplog shows no other write.
    assert_eq!(without(&state(&c).await?, "shop.items_at_t"), before);
    let elsewhere = writes_elsewhere(&c, (oplog_before.0, oplog_before.1), "shop", "items_at_t").await?;
    assert!(elsewhere.is_empty(), "the restore wrote elsewhere:\n{}", elsewhere.join("\n"));

    // The same moment as an oplog ts, without --as: a new name is chosen from the moment, and
    // the text report says what was done.
    let out = env.run_ok(&[
        "restore",
        "--source",
        "mongo",
        "--to",
        &format!("ts:{}:{}", t.0, t.1),
        "--ns",
        "shop.items",
        "--target-uri",
        &target_uri,
    ])?;
    let chosen = format!(
        "items_at_{}",
        chrono::DateTime::from_timestamp(i64::from(t.0), 0).context("t")?.format("%Y%m%d%H%M%S")
    );
    assert!(out.contains(&format!("into shop.{chosen}")) && out.contains("oplog applied:       32 entries"), "{out}");
    assert_eq!(documents(&c, "shop", &chosen).await?, items_at_t, "{out}");

    // Bad input: one clear error each, nothing written.
    let before = state(&c).await?;
    let oplog_before = newest(&c).await?;
    let restore = |ns: &str, as_name: &str| {
        vec!["restore", "--source", "mongo", "--to", &to, "--ns", ns, "--as", as_name, "--target-uri", &target_uri]
            .into_iter()
            .map(String::from)
            .collect::<Vec<String>>()
    };
    let late = restore("shop.late", "shop.late_at_t");
    expect_failure(&env.config, &strs(&late), &["shop.late did not exist at", "not in snapshot"]);
    let exists = restore("shop.items", "shop.orders");
    expect_failure(&env.config, &strs(&exists), &["already has a collection shop.orders", "--as"]);
    let malformed = restore("shop", "shop.x");
    expect_failure(&env.config, &strs(&malformed), &["--ns \"shop\"", "expected DB.COLLECTION"]);
    let system = restore("admin.system.users", "shop.x");
    expect_failure(&env.config, &strs(&system), &["server's own"]);
    let mut outside = restore("shop.items", "shop.x");
    outside[4] = "ts:1:1".into();
    expect_failure(&env.config, &strs(&outside), &["outside the recoverable MongoDB window"]);
    let mut dropping = restore("shop.items", "shop.x");
    dropping.push("--drop".into());
    expect_failure(&env.config, &strs(&dropping), &["never drops or overwrites"]);
    assert_eq!(state(&c).await?, before, "a refused restore wrote to the server");
    assert_eq!(newest(&c).await?, oplog_before, "a refused restore wrote to the server's oplog");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_and_renames_decide_existence_and_a_failed_restore_drops_what_it_wrote() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let target = MongoServer::start(MongoOptions::default())?;
    let mut env = MongoEnv::new("mongo-collection-ddl", &source.uri(), "")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let shop = c.database("shop");
    for name in ["gone", "moved", "kept"] {
        shop.collection::<Document>(name).insert_many((0..5).map(|i| doc! { "_id": i, "from": name })).await?;
    }
    c.database("scratch").collection::<Document>("notes").insert_one(doc! { "_id": 1 }).await?;
    let before_snapshot = newest(&c).await?;
    env.wait_archived((before_snapshot.0, before_snapshot.1))?;
    env.run_ok(&["backup", "--source", "mongo"])?;
    shop.collection::<Document>("gone").insert_one(doc! { "_id": 5, "last": true }).await?;
    let t1 = moment(&c).await?;
    let gone_at_t1 = documents(&c, "shop", "gone").await?;
    shop.collection::<Document>("gone").drop().await?;
    c.database("admin").run_command(doc! { "renameCollection": "shop.moved", "to": "shop.moved2" }).await?;
    shop.collection::<Document>("moved2").insert_one(doc! { "_id": 9 }).await?;
    c.database("scratch").drop().await?;
    let t2 = moment(&c).await?;
    let end = newest(&c).await?;
    env.wait_archived((end.0, end.1))?;
    env.stop_stream_cleanly(&mut stream)?;

    let t_uri = target.direct_uri();
    let tc = client(&t_uri).await?;
    let at = |t: (u32, u32, i64)| format!("ts:{}:{}", t.0, t.1);
    let run = |ns: &str, to: &str, as_name: &str| {
        ["restore", "--source", "mongo", "--to", to, "--ns", ns, "--as", as_name, "--target-uri", &t_uri]
            .map(String::from)
    };

    // Before its drop, a dropped collection restores (into another server); after, it did not exist.
    let (to1, to2) = (at(t1), at(t2));
    env.run_ok(&strs(&run("shop.gone", &to1, "shop.gone_back")))?;
    assert_eq!(documents(&tc, "shop", "gone_back").await?, gone_at_t1);
    expect_failure(
        &env.config,
        &strs(&run("shop.gone", &to2, "shop.gone2")),
        &["did not exist at", "it was dropped at"],
    );
    expect_failure(
        &env.config,
        &strs(&run("scratch.notes", &to2, "shop.notes")),
        &["scratch.notes did not exist at", "its database was dropped at"],
    );
    // Renamed away: not there under its old name; the new name holds what the rename moved, refused.
    expect_failure(
        &env.config,
        &strs(&run("shop.moved", &to2, "shop.m")),
        &["did not exist at", "renamed to shop.moved2"],
    );
    expect_failure(
        &env.config,
        &strs(&run("shop.moved2", &to2, "shop.m")),
        &["renameCollection moved into it from shop.moved", "does not follow renames"],
    );
    let mut names = tc.database("shop").list_collection_names().await?;
    names.sort();
    assert_eq!(names, vec!["gone_back".to_string()], "refused restores wrote to the target");

    // A block the load needs is damaged: the restore fails part-way and drops what it created.
    let blocks = std::fs::read_dir(env.repo.join("mongo"))?.next().context("no mongo dir")??.path().join("blocks");
    let mut damaged = 0;
    for dir in std::fs::read_dir(&blocks)? {
        for f in std::fs::read_dir(dir?.path())? {
            let path = f?.path();
            let mut bytes = std::fs::read(&path)?;
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            std::fs::write(&path, bytes)?;
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no snapshot blocks in {}", blocks.display());
    expect_failure(
        &env.config,
        &strs(&run("shop.kept", &to2, "shop.kept_at_t2")),
        &["restoring shop.kept as shop.kept_at_t2 failed", "shop.kept_at_t2 was dropped again"],
    );
    let mut names = tc.database("shop").list_collection_names().await?;
    names.sort();
    assert_eq!(names, vec!["gone_back".to_string()], "the failed restore left a collection behind");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_collection_restores_alone_and_a_later_validator_rejects_nothing() -> Result<()> {
    let source = MongoServer::start(MongoOptions::default())?;
    let whole_target = MongoServer::start(MongoOptions::default())?;
    let mut env = MongoEnv::new("mongo-collection-recreate", &source.uri(), "")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    let c = client(&source.uri()).await?;
    let shop = c.database("shop");
    let items = shop.collection::<Document>("items");
    let typed = shop.collection::<Document>("typed");
    items.insert_many((0..20).map(|i| doc! { "_id": i, "a": i, "first": true })).await?;
    items.create_index(mongodb::IndexModel::builder().keys(doc! { "a": 1 }).build()).await?;
    // Documents written before a validator that rejects them was added.
    typed.insert_many((0..10).map(|i| doc! { "_id": i, "n": format!("text {i}") })).await?;
    shop.run_command(
        doc! { "collMod": "typed", "validator": { "n": { "$type": "int" } }, "validationLevel": "strict" },
    )
    .await?;
    shop.collection::<Document>("report").insert_one(doc! { "_id": "stale" }).await?;
    let refused = typed.insert_one(doc! { "_id": 99, "n": "not an int" }).await;
    assert!(refused.is_err(), "the server does not enforce the validator, so this test proves nothing");
    let before_snapshot = newest(&c).await?;
    env.wait_archived((before_snapshot.0, before_snapshot.1))?;
    env.run_ok(&["backup", "--source", "mongo"])?;

    // Before T: the collection dropped and created again with other documents and another index;
    // writes the validator would reject, let through as a migration would.
    items.drop().await?;
    items.insert_many((100..105).map(|i| doc! { "_id": i, "b": i, "second": true })).await?;
    items.create_index(mongodb::IndexModel::builder().keys(doc! { "b": 1 }).build()).await?;
    typed.update_one(doc! { "_id": 1 }, doc! { "$set": { "seen": true } }).bypass_document_validation(true).await?;
    typed.insert_one(doc! { "_id": 20, "n": "late text" }).bypass_document_validation(true).await?;
    typed.insert_one(doc! { "_id": 21, "n": 21 }).await?;
    // $out replaces a collection (SecantusDB logs a drop and the inserts).
    items.aggregate([doc! { "$match": { "b": { "$lt": 102 } } }, doc! { "$out": "report" }]).await?;
    let t = moment(&c).await?;
    let report_at_t = documents(&c, "shop", "report").await?;
    assert_eq!(report_at_t.len(), 2);
    let items_at_t = documents(&c, "shop", "items").await?;
    let typed_at_t = documents(&c, "shop", "typed").await?;
    assert!(items_at_t.iter().all(|d| d.get_bool("second").is_ok()) && items_at_t.len() == 5);
    items.insert_one(doc! { "_id": 200 }).await?;
    typed.delete_one(doc! { "_id": 2 }).await?;
    let end = newest(&c).await?;
    env.wait_archived((end.0, end.1))?;
    env.stop_stream_cleanly(&mut stream)?;

    let uri = source.direct_uri();
    let to = format!("ts:{}:{}", t.0, t.1);
    let restore = |ns: &str, as_name: &str| {
        ["restore", "--source", "mongo", "--to", &to, "--ns", ns, "--as", as_name, "--target-uri", &uri, "--json"]
            .map(String::from)
    };
    // Only the re-created collection's documents and indexes: nothing of the one dropped before T.
    let report = json(&env, &strs(&restore("shop.items", "shop.items_back")))?;
    assert_eq!(documents(&c, "shop", "items_back").await?, items_at_t, "{report}");
    let mut indexes = shop.collection::<Document>("items_back").list_index_names().await?;
    indexes.sort();
    assert_eq!(indexes, vec!["_id_".to_string(), "b_1".to_string()], "{report}");
    assert_eq!(report["documents"], 5, "{report}");
    // Documents the validator rejects come back, from the snapshot and from the replay.
    let report = json(&env, &strs(&restore("shop.typed", "shop.typed_back")))?;
    assert_eq!(documents(&c, "shop", "typed_back").await?, typed_at_t, "{report}");
    let report = json(&env, &strs(&restore("shop.report", "shop.report_back")))?;
    assert_eq!(documents(&c, "shop", "report_back").await?, report_at_t, "{report}");

    // The whole restore likewise.
    let whole_uri = whole_target.direct_uri();
    env.run_ok(&["restore", "--source", "mongo", "--to", &to, "--target-uri", &whole_uri])?;
    let w = client(&whole_uri).await?;
    assert_eq!(documents(&w, "shop", "items").await?, items_at_t);
    assert_eq!(documents(&w, "shop", "typed").await?, typed_at_t);
    let mut indexes = w.database("shop").collection::<Document>("items").list_index_names().await?;
    indexes.sort();
    assert_eq!(indexes, vec!["_id_".to_string(), "b_1".to_string()]);
    Ok(())
}
