//! Snapshots (`pitr backup --source mongo`): every non-system collection's documents as raw BSON
//! cut into blocks named by their keyed hash (stored once, as PostgreSQL backup blocks are), the
//! collections' options and index definitions, and the newest oplog `ts` before and after the
//! dump. The snapshot plus the oplog between those is consistent at `ts_after`, as
//! `mongodump --oplog`. The manifest is written last: a snapshot without one does not exist.

use std::time::Duration;

use bson::{doc, Document, RawDocumentBuf};
use pitr_archive::backup::block_hasher;
use pitr_archive::{now_us, ObjectKind, ObjectMeta, PutOutcome, Repository};

use crate::apply::is_system_db;
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
        let listed = db
            .run_command(doc! { "listCollections": 1 })
            .await
            .map_err(conn.server_err(format!("listing collections of {db_name}")))?;
        let batch =
            listed.get_document("cursor").and_then(|c| c.get_array("firstBatch")).map_err(|_| MongoError::Corrupt {
                object: db_name.clone(),
                what: "listCollections reply without cursor.firstBatch".into(),
            })?;
        let mut specs: Vec<Document> = batch.iter().filter_map(|b| b.as_document().cloned()).collect();
        specs.sort_by(|a, b| a.get_str("name").unwrap_or("").cmp(b.get_str("name").unwrap_or("")));
        for spec in specs {
            let name = spec.get_str("name").unwrap_or("").to_string();
            if name.is_empty() || name.starts_with("system.") {
                continue;
            }
            let kind = CollectionKind::from(spec.get_str("type").unwrap_or("collection").to_string());
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
                let ns = format!("{db_name}.{name}");
                let listed = db
                    .run_command(doc! { "listIndexes": &name })
                    .await
                    .map_err(conn.server_err(format!("listing indexes of {ns}")))?;
                dump.indexes = listed
                    .get_document("cursor")
                    .and_then(|c| c.get_array("firstBatch"))
                    .map(|b| b.iter().filter_map(|i| i.as_document().cloned()).collect())
                    .unwrap_or_default();
                let coll = db.collection::<RawDocumentBuf>(&name);
                let mut cursor = coll.find(doc! {}).await.map_err(conn.server_err(format!("reading {ns}")))?;
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
    #[test]
    fn ids_are_compact_utc_seconds() {
        assert_eq!(super::snapshot_id(1_796_162_730_123_456), "20261201T220530Z");
    }
}
