//! The sidecar's catalog poller: takes catalog snapshots ([`pitr_archive::catalog`]) over normal
//! SQL connections to every database that allows connections, at start, every
//! `[find] catalog_interval`, and about a second after the change index reports a DDL commit.
//!
//! It owns the SQL and the schedule; the object, its names and "store only when changed" are the
//! archive's. A failure (server down, a database that refuses us, the repository unreachable) is
//! logged and retried at the next tick: snapshots are names for `pitr find`, never needed to
//! archive or restore, so nothing here may stop streaming.
//!
//! Only the cluster's writer takes snapshots: given the stream's status ([`Poller::writer`]),
//! the poller waits until the stream is connected (its session opened, which takes the writer
//! lease, or a reconnect that checked it), takes none while it is not, and stops when the stream
//! ends (a fenced sidecar's stream ends with the lease lost). A passive sidecar, which never gets
//! the lease, never writes one.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pitr_archive::catalog::{self, CatalogRelation, CatalogSnapshot};
use pitr_archive::Repository;
use pitr_pgformat::lsn::parse_lsn;
use pitr_pgwire::connection::{ConnectOptions, Connection};
use pitr_pgwire::ConnInfo;
use pitr_walstream::StreamStatus;
use tokio::sync::watch;

/// How long after a DDL commit the snapshot is taken: DDL tends to come in bursts (a migration),
/// one snapshot after the burst names all of it.
const DDL_DEBOUNCE: Duration = Duration::from_secs(1);

/// The least time between two snapshots a DDL commit asks for. Every ANALYZE and temporary
/// table is DDL to the change index, and a snapshot is one connection and one query per
/// database: on a busy server with many databases that must not run every second. (A late
/// snapshot costs only precision: `find` then says "TRUNCATE, or a rewrite", never "harmless".)
const DDL_MIN_SPACING: Duration = Duration::from_secs(5);

/// The longest one snapshot may take (connections, queries, the put). A server that accepts
/// connections and then hangs must not stop the poller for good: the attempt is abandoned and
/// the next tick tries again.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The relations of the current database a snapshot lists: tables, partitioned tables,
/// materialized views and TOAST tables with storage (system catalogs left out: `find` names
/// them by OID, and their changes are DDL).
const RELATIONS_SQL: &str = "SELECT c.oid::text, pg_relation_filenode(c.oid)::text, \
     (CASE WHEN c.reltablespace = 0 THEN d.dattablespace ELSE c.reltablespace END)::text, \
     n.nspname, c.relname, c.relkind::text, c.reltuples::float8::text, d.oid::text, \
     (extract(epoch FROM GREATEST(pg_stat_get_last_vacuum_time(c.oid), pg_stat_get_last_autovacuum_time(c.oid), \
     pg_stat_get_last_analyze_time(c.oid), pg_stat_get_last_autoanalyze_time(c.oid))) * 1000000)::bigint::text, \
     (SELECT rn.nspname || '.' || rc.relname FROM pg_class rc JOIN pg_namespace rn ON rn.oid = rc.relnamespace \
      WHERE c.relispartition AND rc.oid = pg_partition_root(c.oid)) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     JOIN pg_database d ON d.datname = current_database() \
     WHERE c.relkind IN ('r', 'p', 'm', 't') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND c.relpersistence <> 't' AND pg_relation_filenode(c.oid) IS NOT NULL";

/// What the poller needs.
pub struct Poller {
    /// The repository snapshots go to.
    pub repo: Repository,
    /// `[postgres] system_id`, when pinned: a server of another cluster is not snapshotted.
    /// Otherwise the server's own (the one the sidecar streams).
    pub system_id: Option<u64>,
    /// `[postgres] conninfo` (the database is replaced per database read).
    pub conninfo: ConnInfo,
    /// application_name of its connections.
    pub application_name: String,
    /// `[find] catalog_interval`.
    pub interval: Duration,
    /// How long one snapshot may take ([`SNAPSHOT_TIMEOUT`]).
    pub timeout: Duration,
    /// The WAL stream's status, in the sidecar: a snapshot is taken only while it says
    /// connected (the writer lease held), and the poller stops when it closes (the stream
    /// ended: stopped, or fenced by another writer). `None`: no such gate (tests).
    pub writer: Option<watch::Receiver<StreamStatus>>,
}

impl Poller {
    /// Runs until `shutdown`; `ddl` (the change index's newest DDL commit LSN) wakes it early.
    pub async fn run(mut self, mut ddl: Option<watch::Receiver<Option<u64>>>, mut shutdown: watch::Receiver<bool>) {
        // Nothing before the stream holds the lease (the first tick would otherwise snapshot at
        // once, lease or not).
        if let Some(writer) = self.writer.as_mut() {
            tokio::select! {
                ended = async { writer.wait_for(|s| s.connected).await.is_err() } => if ended { return },
                _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => return,
            }
        }
        // The newest snapshot stored, once read (after the first snapshot names the cluster).
        let mut previous: Option<Option<CatalogSnapshot>> = None;
        // `interval` panics on zero: "0s" in the config means as often as sensible.
        let mut tick = tokio::time::interval(self.interval.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = async {
                    match ddl.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if !changed {
                        ddl = None;
                        continue;
                    }
                    let spaced = last.map_or(DDL_DEBOUNCE, |l| DDL_MIN_SPACING.saturating_sub(l.elapsed()));
                    tokio::select! {
                        _ = tokio::time::sleep(spaced.max(DDL_DEBOUNCE)) => {}
                        _ = shutdown.changed() => return,
                    }
                    if let Some(rx) = ddl.as_mut() {
                        rx.borrow_and_update();
                    }
                }
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            if let Some(writer) = self.writer.as_ref() {
                if writer.has_changed().is_err() {
                    // The stream ended (stopped, or fenced): no more snapshots from here.
                    return;
                }
                if !writer.borrow().connected {
                    tracing::debug!("catalog snapshot skipped: the WAL stream is not connected");
                    continue;
                }
            }
            last = Some(tokio::time::Instant::now());
            tokio::select! {
                done = tokio::time::timeout(self.timeout, self.once(&mut previous)) => match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "catalog snapshot not taken; retrying later"),
                    Err(_) => tracing::warn!(
                        timeout_s = self.timeout.as_secs(),
                        "catalog snapshot not taken: the server or the repository did not answer in time; retrying later"
                    ),
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Takes one snapshot and stores it if it differs from `previous` (the newest stored: read
    /// from the repository the first time, when still `None`).
    pub async fn once(&self, previous: &mut Option<Option<CatalogSnapshot>>) -> Result<()> {
        let (system_id, snapshot) = take(&self.conninfo, &self.application_name, self.system_id).await?;
        if previous.is_none() {
            // Only the newest is read: the others are never compared with.
            let stored = catalog::newest(&self.repo, system_id).await.context("reading the newest catalog snapshot")?;
            *previous = Some(stored);
        }
        let newest = previous.as_ref().and_then(|p| p.as_ref());
        if catalog::record(&self.repo, system_id, &snapshot, newest).await.context("storing it")? {
            tracing::info!(
                lsn = %pitr_pgformat::lsn::format_lsn(snapshot.lsn),
                relations = snapshot.relations.len(),
                "catalog snapshot stored"
            );
            *previous = Some(Some(snapshot));
        }
        Ok(())
    }
}

async fn connect(info: &ConnInfo, application_name: &str, dbname: Option<&str>) -> Result<Connection> {
    let mut info = info.clone();
    if let Some(db) = dbname {
        info.dbname = Some(db.to_string());
    }
    let opts = ConnectOptions { replication: false, application_name: application_name.to_string() };
    Connection::connect(&info, &opts).await.with_context(|| format!("connecting to {}", info.redacted()))
}

/// One snapshot of the server's catalogs: the WAL position first, then each database.
pub async fn take(info: &ConnInfo, application_name: &str, expected: Option<u64>) -> Result<(u64, CatalogSnapshot)> {
    let mut conn = connect(info, application_name, None).await?;
    let rows = conn
        .simple_query(
            "SELECT system_identifier::text, \
             (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, \
             (CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint()) \
             ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END)::text \
             FROM pg_control_system()",
        )
        .await
        .context("reading the WAL position")?;
    let server_id: u64 = rows.text(0, 0).and_then(|t| t.parse().ok()).ok_or_else(|| anyhow!("no system identifier"))?;
    if let Some(expected) = expected.filter(|e| *e != server_id) {
        return Err(anyhow!(
            "the server is cluster {server_id}, [postgres] system_id is {expected}: no snapshot taken"
        ));
    }
    let lsn = rows.text(0, 1).and_then(parse_lsn).ok_or_else(|| anyhow!("no WAL position"))?;
    let timeline: u32 = rows.text(0, 2).and_then(|t| t.parse().ok()).ok_or_else(|| anyhow!("no timeline"))?;
    let dbs = conn
        .simple_query("SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname")
        .await
        .context("listing databases")?;
    conn.close().await;
    let mut relations = Vec::new();
    let mut unread = Vec::new();
    for row in 0..dbs.rows.len() {
        let Some(db) = dbs.text(row, 0) else { continue };
        match relations_of(info, application_name, db).await {
            Ok(mut r) => relations.append(&mut r),
            Err(e) => {
                tracing::warn!(database = %db, error = %format!("{e:#}"), "catalog of a database not read");
                unread.push(db.to_string());
            }
        }
    }
    let mut snapshot = CatalogSnapshot::new(timeline, lsn, pitr_archive::now_us(), relations);
    snapshot.unread_databases = unread;
    Ok((server_id, snapshot))
}

async fn relations_of(info: &ConnInfo, application_name: &str, db: &str) -> Result<Vec<CatalogRelation>> {
    let mut conn = connect(info, application_name, Some(db)).await?;
    let rows = conn.simple_query(RELATIONS_SQL).await.context("reading pg_class")?;
    conn.close().await;
    let mut out = Vec::with_capacity(rows.rows.len());
    for row in 0..rows.rows.len() {
        let num = |col: usize| rows.text(row, col).and_then(|t| t.parse::<u32>().ok());
        let (Some(oid), Some(relfilenode), Some(spc_oid), Some(db_oid)) = (num(0), num(1), num(2), num(7)) else {
            continue;
        };
        out.push(CatalogRelation {
            db_oid,
            db_name: db.to_string(),
            spc_oid,
            relfilenode,
            oid,
            schema: rows.text(row, 3).unwrap_or_default().to_string(),
            name: rows.text(row, 4).unwrap_or_default().to_string(),
            relkind: rows.text(row, 5).unwrap_or_default().to_string(),
            reltuples: rows.text(row, 6).and_then(|t| t.parse().ok()).unwrap_or(-1.0),
            stats_us: rows.text(row, 8).and_then(|t| t.parse().ok()),
            partition_of: rows.text(row, 9).map(str::to_string),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A server on loopback that accepts connections, holds them and never answers: its port and
    /// how many connections it has taken.
    async fn hung_server() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        (port, accepted)
    }

    /// A poller of the server on `port` into a local repository in `dir`.
    fn poller_of(
        port: u16,
        dir: &std::path::Path,
        interval: Duration,
        timeout: Duration,
        writer: Option<watch::Receiver<StreamStatus>>,
    ) -> Poller {
        Poller {
            repo: local_repo(dir),
            system_id: None,
            conninfo: pitr_pgwire::conninfo::parse(&format!("host=127.0.0.1 port={port} user=u sslmode=disable"))
                .unwrap(),
            application_name: "t".into(),
            interval,
            timeout,
            writer,
        }
    }

    fn local_repo(dir: &std::path::Path) -> Repository {
        Repository::new(Arc::new(pitr_archive::LocalStore::new(dir)), pitr_archive::KeyRing::from_key("k", [1; 32]))
    }

    /// A server that accepts connections and never answers must not stop the poller for good:
    /// each attempt is abandoned after its timeout and tried again, and a stop is obeyed at once.
    #[tokio::test]
    async fn a_hung_server_is_abandoned_and_retried() {
        let (port, accepted) = hung_server().await;
        let dir = tempfile::tempdir().unwrap();
        let poller = poller_of(port, dir.path(), Duration::from_millis(200), Duration::from_millis(300), None);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(poller.run(None, stopped));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(accepted.load(Ordering::SeqCst) >= 2, "tried again after the hung attempt");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("stops when told").unwrap();
    }

    /// Only the writer snapshots: nothing is tried before the stream says connected (the lease
    /// held), and the poller ends with the stream (a fenced sidecar's stream ends).
    #[tokio::test]
    async fn no_snapshot_before_the_stream_holds_the_lease_and_none_after_it_ends() {
        let (port, accepted) = hung_server().await;
        let dir = tempfile::tempdir().unwrap();
        let (status, writer) = watch::channel(StreamStatus::default());
        let poller = poller_of(port, dir.path(), Duration::from_millis(100), Duration::from_millis(100), Some(writer));
        let (_stop, stopped) = watch::channel(false);
        let task = tokio::spawn(poller.run(None, stopped));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "passive: no connection, no snapshot");
        status.send_modify(|s| s.connected = true);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(accepted.load(Ordering::SeqCst) >= 1, "the writer snapshots");
        drop(status);
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("ends with the stream").unwrap();
    }
}
