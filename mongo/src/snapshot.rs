//! Snapshots (`pitr backup --source mongo`): every non-system collection's documents as raw BSON
//! cut into blocks named by their keyed hash (stored once, as PostgreSQL backup blocks are), the
//! collections' options and index definitions, and the newest oplog `ts` before and after the
//! dump. The snapshot plus the oplog between those is consistent at `ts_after`, as
//! `mongodump --oplog`. The manifest is written last: a snapshot without one does not exist.

use std::time::Duration;

use bson::{doc, Document, RawDocumentBuf};
use pitr_archive::backup::block_hasher;
use pitr_archive::{now_us, ObjectKind, ObjectMeta, PutOutcome, Repository};

use crate::apply::{is_system_db, unrestorable_system_collection};
use crate::layout::{CollectionDump, CollectionKind, MongoLayout, SnapshotManifest};
use crate::{connect, Connected, MongoError, Ts};

/// What to snapshot and how.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// The replica-set member to dump.
    pub uri: String,
    /// Objects are kept under this name; default the replica set's name.
    pub name: Option<String>,
    /// Raw BSON bytes collected before a block is cut (a block ends at a document boundary, so
    /// it may be a little larger).
    pub block_size: usize,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// Documents (and collection and index descriptions) per batch the server sends: what the
    /// dump holds in memory at once besides the block being filled.
    pub batch_size: u32,
}

/// `YYYYMMDDTHHMMSSZ` of `us`, as snapshot ids.
fn snapshot_id(us: i64) -> String {
    pitr_archive::time::format_compact(us)
}

async fn edge(conn: &Connected) -> Result<(Ts, i64), MongoError> {
    match conn.oplog_edge(true).await? {
        Some((ts, wall)) => Ok((ts, wall.unwrap_or_else(|| ts.secs_us()))),
        None => Err(MongoError::Corrupt {
            object: "local.oplog.rs".into(),
            what: format!("the oplog on {} is empty", conn.uri),
        }),
    }
}

/// Why the collection `db.name` of type `kind` cannot be part of a snapshot, if it cannot.
/// Ordinary collections (capped, clustered, with validators or collations, and SecantusDB's
/// time series, which it keeps as ordinary collections with a `timeseries` option) are dumped
/// and restored with their options; views are metadata, restored from their definitions.
fn refusal(db: &str, name: &str, kind: &CollectionKind) -> Option<String> {
    if let Some(what) = unrestorable_system_collection(db, name) {
        return Some(format!("it holds {what}, which restore cannot write back"));
    }
    match kind {
        CollectionKind::Collection | CollectionKind::View => None,
        CollectionKind::Other(t) if t == "timeseries" => Some(
            "a time-series collection (mongod keeps its data in system.buckets.*, which restore cannot replay); \
             move its data into an ordinary collection or leave it to another backup tool"
                .to_string(),
        ),
        CollectionKind::Other(t) => Some(format!("listCollections calls it a {t:?}, a type pitr does not know")),
    }
}

/// Every document of a command's cursor (`listCollections`, `listIndexes`), however many
/// batches the server cuts it into, each at most `batch_size` long.
async fn list_cursor(
    conn: &Connected,
    db: &mongodb::Database,
    mut command: Document,
    batch_size: u32,
    what: &str,
) -> Result<Vec<Document>, MongoError> {
    let verb = command.keys().next().cloned().unwrap_or_default();
    let err = || conn.server_err(format!("{verb} of {what}"));
    command.insert("cursor", doc! { "batchSize": i64::from(batch_size) });
    let mut cursor = db.run_cursor_command(command).batch_size(batch_size).await.map_err(err())?;
    let mut out = Vec::new();
    while cursor.advance().await.map_err(err())? {
        out.push(cursor.deserialize_current().map_err(err())?);
    }
    Ok(out)
}

/// Takes a snapshot: the newest oplog `ts`, every non-system collection's documents (stored as
/// blocks, each stored once however many snapshots share it), options and indexes, the newest
/// `ts` again, then the manifest, which is returned.
pub async fn snapshot(repo: &Repository, opts: &SnapshotOptions) -> Result<SnapshotManifest, MongoError> {
    let conn = connect(&opts.uri, opts.connect_timeout).await?;
    let set_name = conn.require_replica_set()?.to_string();
    let layout = MongoLayout::new(opts.name.as_deref().unwrap_or(&set_name));
    repo.check().await?;
    let hasher = block_hasher(repo).await?;
    let started_us = now_us();
    let (ts_before, time_before_us) = edge(&conn).await?;

    let mut collections = Vec::new();
    let (mut documents, mut logical_bytes, mut stored_bytes) = (0u64, 0u64, 0u64);
    let dbs = conn.client.list_database_names().await.map_err(conn.server_err("listing databases"))?;
    for db_name in dbs.iter().filter(|d| !is_system_db(d)) {
        let db = conn.client.database(db_name);
        let mut specs = list_cursor(&conn, &db, doc! { "listCollections": 1 }, opts.batch_size, db_name).await?;
        // `system.*` last: a refusal then names mongod's time-series collection, not its buckets.
        let order = |d: &Document| {
            let name = d.get_str("name").unwrap_or("").to_string();
            (name.starts_with("system."), name)
        };
        specs.sort_by_key(order);
        for spec in specs {
            let name = spec.get_str("name").unwrap_or("").to_string();
            if name.is_empty() {
                return Err(MongoError::Corrupt {
                    object: db_name.clone(),
                    what: format!("listCollections named no collection in {spec}"),
                });
            }
            let ns = format!("{db_name}.{name}");
            let kind = CollectionKind::from(spec.get_str("type").unwrap_or("collection").to_string());
            if let Some(what) = refusal(db_name, &name, &kind) {
                return Err(MongoError::Unsupported { uri: conn.uri.clone(), ns, what });
            }
            if name.starts_with("system.") {
                continue;
            }
            let options = spec.get_document("options").cloned().unwrap_or_default();
            let mut dump = CollectionDump {
                db: db_name.clone(),
                name: name.clone(),
                kind: kind.clone(),
                options,
                indexes: Vec::new(),
                blocks: Vec::new(),
                documents: 0,
                bytes: 0,
            };
            if kind == CollectionKind::Collection {
                dump.indexes = list_cursor(&conn, &db, doc! { "listIndexes": &name }, opts.batch_size, &ns).await?;
                let coll = db.collection::<RawDocumentBuf>(&name);
                let mut cursor = coll
                    .find(doc! {})
                    .batch_size(opts.batch_size)
                    .await
                    .map_err(conn.server_err(format!("reading {ns}")))?;
                let mut block = Vec::with_capacity(opts.block_size);
                loop {
                    let more = cursor.advance().await.map_err(conn.server_err(format!("reading {ns}")))?;
                    if more {
                        let d = cursor.current().as_bytes();
                        block.extend_from_slice(d);
                        dump.documents += 1;
                        dump.bytes += d.len() as u64;
                    }
                    if !block.is_empty() && (block.len() >= opts.block_size || !more) {
                        let id = hasher.block_id(&block);
                        let object = layout.block_name(&id);
                        let (outcome, sealed) = repo
                            .put_sealed_sized(
                                &object,
                                std::mem::take(&mut block),
                                ObjectMeta::plain(ObjectKind::BackupBlock),
                            )
                            .await?;
                        if outcome == PutOutcome::Created {
                            stored_bytes += sealed;
                        }
                        dump.blocks.push(id);
                    }
                    if !more {
                        break;
                    }
                }
            }
            documents += dump.documents;
            logical_bytes += dump.bytes;
            collections.push(dump);
        }
    }
    let (ts_after, time_after_us) = edge(&conn).await?;
    let finished_us = now_us();
    let manifest = SnapshotManifest {
        id: snapshot_id(started_us),
        name: layout.name.clone(),
        ts_before,
        ts_after,
        time_before_us,
        time_after_us,
        started_us,
        finished_us,
        collections,
        documents,
        logical_bytes,
        stored_bytes,
    };
    repo.put_sealed(&layout.manifest_name(&manifest.id), manifest.to_bytes()?, ObjectMeta::plain(ObjectKind::Meta))
        .await?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use crate::layout::CollectionKind;

    #[test]
    fn collections_restore_cannot_write_back_are_refused_not_skipped() {
        let kind = |t: &str| CollectionKind::from(t.to_string());
        assert_eq!(super::refusal("shop", "items", &kind("collection")), None);
        assert_eq!(super::refusal("shop", "cheap_items", &kind("view")), None);
        // Not data: views come back from their definitions, the profiler's log is the server's.
        assert_eq!(super::refusal("shop", "system.views", &kind("collection")), None);
        assert_eq!(super::refusal("shop", "system.profile", &kind("collection")), None);
        for (name, t, needle) in [
            ("weather", "timeseries", "time-series"),
            ("system.buckets.weather", "collection", "time-series"),
            ("system.js", "collection", "stored JavaScript"),
            ("odd", "materialized", "\"materialized\""),
        ] {
            let why = super::refusal("shop", name, &kind(t));
            assert!(why.as_deref().is_some_and(|w| w.contains(needle)), "{name} ({t}): {why:?}");
        }
    }

    #[test]
    fn ids_are_compact_utc_seconds() {
        assert_eq!(super::snapshot_id(1_796_162_730_123_456), "20261201T220530Z");
    }
}
