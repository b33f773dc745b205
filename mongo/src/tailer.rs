//! The oplog tailer: a tailable-await cursor on `local.oplog.rs` from the archive's last `ts`,
//! entries kept as the server sent them (raw BSON) and sealed into slices named by their `ts`
//! range, every `flush_interval` and whenever `max_slice_bytes` are pending.
//!
//! Resuming: the last slice's last `ts`, and how many of its entries carry that `ts` (a
//! SecantusDB transaction's entries share one), say where to continue; after any restart the
//! cursor starts at that `ts` and skips what is archived. If the oplog no longer holds that `ts`
//! (it rolled over while the tailer was away), the hole is recorded as a gap object, logged as an
//! error and counted in `pitr_mongo_oplog_gaps_total`; streaming continues from the oldest entry.
//!
//! A transaction's entries (SecantusDB: several sharing one `ts`, with `lsid`/`txnNumber`) are
//! archived together: a trailing one is held back until an entry with a later `ts` arrives or the
//! cursor has gone quiet (nothing for [`QUIET`]; the driver exposes no batch boundaries, and the
//! server makes a transaction's entries visible at once, so a batch cut inside one is followed at
//! once by the rest).

use std::time::{Duration, Instant};

use bson::{doc, Bson, RawDocumentBuf};
use mongodb::options::CursorType;
use pitr_archive::Repository;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::layout::{slice_meta, split_entries, MongoCatalog, MongoLayout};
use crate::ts::Ts;
use crate::{connect, MongoError};

/// How the tailer connects, where it archives and how often it seals.
#[derive(Debug, Clone)]
pub struct TailerConfig {
    /// The replica-set member to tail.
    pub uri: String,
    /// Objects are kept under this name; default the replica set's name.
    pub name: Option<String>,
    /// How long received entries may wait before they are sealed into a slice (bounds the RPO).
    pub flush_interval: Duration,
    /// Pending raw BSON bytes that seal a slice at once, whatever the interval.
    pub max_slice_bytes: usize,
    /// How long connecting (and each reconnection) may take.
    pub connect_timeout: Duration,
    /// Entries per getMore.
    pub batch_size: u32,
    /// Longest wait for any answer of the server (a getMore, a count, a look at the oplog's
    /// ends): past it the cursor is given up with [`MongoError::Timeout`] and the tailer
    /// reconnects. Must exceed the getMore's 1 s await time.
    pub read_timeout: Duration,
    /// How often, while caught up, a completeness mark is recorded.
    pub complete_interval: Duration,
}

/// How long the cursor must deliver nothing before a trailing transaction counts as whole.
pub const QUIET: Duration = Duration::from_millis(100);

/// What the tailer reports while it runs.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MongoStatus {
    /// The layout name objects are stored under.
    pub name: String,
    /// Whether the tailer is connected and tailing now.
    pub connected: bool,
    /// The newest `ts` sealed in the archive.
    pub archived_ts: Option<Ts>,
    /// That entry's wall time, µs since the Unix epoch.
    pub archived_time_us: Option<i64>,
    /// The newest `ts` received from the cursor (possibly not yet sealed).
    pub received_ts: Option<Ts>,
    /// Slices sealed since this tailer started.
    pub slices_archived: u64,
    /// Gaps recorded since this tailer started (the oplog rolled past the archive).
    pub gaps_found: u64,
    /// Newest minus oldest entry on the server: how long the tailer can be away.
    pub server_window_seconds: Option<f64>,
    /// Wall time of the newest entry received minus that of the newest archived: how much an
    /// outage now would lose.
    pub lag_seconds: f64,
    /// The newest completeness mark: when the archive last held every entry the server had
    /// (server clock, µs since the Unix epoch).
    #[serde(default)]
    pub complete_up_to_us: Option<i64>,
}

/// One entry as read.
struct Raw {
    doc: RawDocumentBuf,
    ts: Ts,
    wall_us: Option<i64>,
    in_txn: bool,
}

fn read_raw(doc: RawDocumentBuf) -> Option<Raw> {
    let ts = match doc.get("ts").ok()?? {
        bson::RawBsonRef::Timestamp(t) => Ts::from_bson(t),
        _ => return None,
    };
    let wall_us = match doc.get("wall").ok().flatten() {
        Some(bson::RawBsonRef::DateTime(w)) => Some(w.timestamp_millis() * 1000),
        _ => None,
    };
    let op = doc.get_str("op").unwrap_or("");
    let in_txn = matches!(op, "i" | "u" | "d")
        && doc.get("lsid").ok().flatten().is_some()
        && doc.get("txnNumber").ok().flatten().is_some();
    Some(Raw { doc, ts, wall_us, in_txn })
}

enum Msg {
    /// An entry, holding its share of the bytes the reader may have in flight until it is taken.
    Entry(Raw, OwnedSemaphorePermit),
    Failed(MongoError),
}

/// Bytes of entries the cursor's reader may have handed over and not yet taken: with pending
/// entries bounded by `max_slice_bytes` and the driver's reply by the server's advertised
/// maximum message size ([`crate::MAX_MESSAGE_BYTES`] at most), the tailer's memory is bounded
/// even while a seal waits out a storage outage.
const IN_FLIGHT_BYTES: usize = 16 << 20;

/// Where the archive ends: the last `ts` and how many archived entries carry it.
async fn archive_end(
    repo: &Repository,
    catalog: &MongoCatalog,
) -> Result<Option<(Ts, usize, Option<i64>)>, MongoError> {
    let Some(run) = catalog.runs.last() else { return Ok(None) };
    let Some(name) = run.slices.last() else { return Ok(None) };
    let (header, bytes) = repo.get_opened(name).await?;
    let entries = split_entries(name, &bytes)?;
    let at_end = entries
        .iter()
        .filter(|e| matches!(e.get("ts"), Ok(Some(bson::RawBsonRef::Timestamp(t))) if Ts::from_bson(t) == run.last))
        .count();
    Ok(Some((run.last, at_end, header.meta.last_commit_us)))
}

fn set_gauges(s: &MongoStatus) {
    metrics::gauge!("pitr_mongo_oplog_lag_seconds").set(s.lag_seconds);
    if let Some(t) = s.archived_ts {
        metrics::gauge!("pitr_mongo_archived_ts_seconds").set(f64::from(t.secs));
        metrics::gauge!("pitr_mongo_archived_ts_increment").set(f64::from(t.inc));
    }
    if let Some(w) = s.server_window_seconds {
        metrics::gauge!("pitr_mongo_oplog_window_seconds").set(w);
    }
    metrics::gauge!("pitr_mongo_connected").set(if s.connected { 1.0 } else { 0.0 });
}

/// Runs until `shutdown` turns true (sealing what is pending) or the first connection fails.
/// Later failures (server restarts, network cuts, storage outages) are retried.
pub async fn run(
    repo: Repository,
    cfg: TailerConfig,
    status: watch::Sender<MongoStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), MongoError> {
    let mut first = true;
    let mut backoff = Duration::from_millis(200);
    loop {
        let starting = first;
        match run_once(&repo, &cfg, &status, &mut shutdown, &mut first).await {
            Ok(()) => return Ok(()),
            // Bad configuration (unreachable at start, not a replica set) ends the sidecar.
            Err(e) if starting && first => return Err(e),
            Err(e) => {
                status.send_modify(|s| s.connected = false);
                set_gauges(&status.borrow());
                tracing::warn!(error = %e, retry_in = ?backoff, "oplog tailing interrupted; resuming from the archive");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn run_once(
    repo: &Repository,
    cfg: &TailerConfig,
    status: &watch::Sender<MongoStatus>,
    shutdown: &mut watch::Receiver<bool>,
    first: &mut bool,
) -> Result<(), MongoError> {
    let conn = connect(&cfg.uri, cfg.connect_timeout).await?;
    let set_name = conn.require_replica_set()?.to_string();
    let layout = MongoLayout::new(cfg.name.as_deref().unwrap_or(&set_name));
    let catalog = MongoCatalog::load(repo, layout.clone()).await?;
    let end = archive_end(repo, &catalog).await?;
    let oldest = conn.oplog_edge(false).await?;
    *first = false;

    let (start, mut skip) = match (end, oldest) {
        (None, None) => (Ts::ZERO, 0),
        (None, Some((o, _))) => (o, 0),
        (Some((last, n, _)), Some((o, _))) if o > last => {
            let gap = layout.gap_name(last, o);
            let text = format!(
                "oplog entries after {last} and before {o} were lost: the server's oplog no longer held {last} when pitr resumed\n"
            );
            repo.put_sealed(&gap, text.into_bytes(), pitr_archive::ObjectMeta::plain(pitr_archive::ObjectKind::Meta))
                .await?;
            metrics::counter!("pitr_mongo_oplog_gaps_total").increment(1);
            status.send_modify(|s| s.gaps_found += 1);
            tracing::error!(archived = %last, oldest_on_server = %o, gap = %gap, name = %layout.name,
                "GAP: the oplog rolled past the last archived entry while pitr was away; times between them cannot be restored (recorded as a gap)");
            let _ = n;
            (o, 0)
        }
        (Some((last, n, _)), _) => (last, n),
    };
    // The next slice follows the archive's last entry only where the cursor continues from it.
    let follows = match end {
        Some((last, _, _)) if start == last => Some(last),
        _ => None,
    };
    status.send_modify(|s| {
        s.name = layout.name.clone();
        s.connected = true;
        if let Some((t, _, w)) = end {
            s.archived_ts = Some(t);
            s.archived_time_us = w;
        }
    });
    tracing::info!(name = %layout.name, from = %start, skip, server = %conn.uri, "tailing local.oplog.rs");

    let oplog = conn.client.database("local").collection::<RawDocumentBuf>("oplog.rs");
    let filter = if start == Ts::ZERO {
        doc! {}
    } else {
        doc! { "ts": { "$gte": Bson::Timestamp(start.to_bson()) } }
    };
    let mut cursor = oplog
        .find(filter)
        .cursor_type(CursorType::TailableAwait)
        .max_await_time(Duration::from_secs(1))
        .batch_size(cfg.batch_size)
        .await
        .map_err(conn.server_err("opening a tailable cursor on local.oplog.rs"))?;

    // The cursor is read in its own task: the sealer's timers never cancel a getMore halfway
    // (only `read_timeout` gives one up), and the sealer keeps its timers while the cursor waits
    // for new entries.
    let (tx, mut rx) = mpsc::channel::<Msg>(4096);
    let in_flight = std::sync::Arc::new(Semaphore::new(IN_FLIGHT_BYTES));
    let uri = conn.uri.clone();
    let read_timeout = cfg.read_timeout;
    let reader = tokio::spawn(async move {
        loop {
            // A getMore is given up only when the server has not answered for `read_timeout`:
            // the connection is then of no use, and the tailer reconnects.
            let Ok(advanced) = tokio::time::timeout(read_timeout, cursor.advance()).await else {
                let _ = tx
                    .send(Msg::Failed(MongoError::Timeout {
                        uri: uri.clone(),
                        what: "the oplog cursor's getMore".into(),
                        after: read_timeout,
                    }))
                    .await;
                return;
            };
            match advanced {
                Ok(true) => {
                    let raw = match RawDocumentBuf::from_bytes(cursor.current().as_bytes().to_vec()) {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = tx
                                .send(Msg::Failed(MongoError::Corrupt {
                                    object: "local.oplog.rs".into(),
                                    what: e.to_string(),
                                }))
                                .await;
                            return;
                        }
                    };
                    let Some(raw) = read_raw(raw) else {
                        let _ = tx
                            .send(Msg::Failed(MongoError::Corrupt {
                                object: "local.oplog.rs".into(),
                                what: "an entry without `ts`".into(),
                            }))
                            .await;
                        return;
                    };
                    let share = raw.doc.as_bytes().len().clamp(1, IN_FLIGHT_BYTES) as u32;
                    let Ok(permit) = in_flight.clone().acquire_many_owned(share).await else { return };
                    if tx.send(Msg::Entry(raw, permit)).await.is_err() {
                        return;
                    }
                }
                Ok(false) => {
                    let _ = tx
                        .send(Msg::Failed(MongoError::Corrupt {
                            object: "local.oplog.rs".into(),
                            what: format!("the tailable cursor on {uri} was closed by the server"),
                        }))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx
                        .send(Msg::Failed(MongoError::Server {
                            uri: uri.clone(),
                            what: "tailing local.oplog.rs".into(),
                            source: Box::new(e),
                        }))
                        .await;
                    return;
                }
            }
        }
    });

    let mut sealer = Sealer {
        repo,
        layout: &layout,
        status,
        pending: Vec::new(),
        pending_bytes: 0,
        last_seal: Instant::now(),
        last_entry: Instant::now(),
        cfg,
        safe: 0,
        after: follows,
        oplog: conn.client.database("local").collection::<RawDocumentBuf>("oplog.rs"),
    };
    let mut window_tick = tokio::time::interval(Duration::from_secs(10));
    let mut complete_tick = tokio::time::interval(cfg.complete_interval);
    complete_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush_tick = tokio::time::interval(cfg.flush_interval.max(Duration::from_millis(50)));
    let result = loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Entry(raw, _in_flight)) => {
                    if skip > 0 && raw.ts == start {
                        skip -= 1;
                        continue;
                    }
                    skip = 0;
                    if let Err(e) = sealer.push(raw).await { break Err(e) }
                }
                Some(Msg::Failed(e)) => break Err(e),
                None => break Ok(()),
            },
            _ = flush_tick.tick() => {
                if let Err(e) = sealer.maybe_seal(false).await { break Err(e) }
            }
            _ = window_tick.tick() => {
                let edges = async { (conn.oplog_edge(false).await, conn.oplog_edge(true).await) };
                let window = match tokio::time::timeout(cfg.read_timeout, edges).await {
                    Ok((Ok(Some((_, Some(o)))), Ok(Some((_, Some(n)))))) => Some((n - o) as f64 / 1e6),
                    _ => None,
                };
                status.send_modify(|s| s.server_window_seconds = window);
                set_gauges(&status.borrow());
            }
            _ = complete_tick.tick(), if sealer.pending.is_empty() => {
                mark_complete(repo, &conn, &layout, status, cfg.read_timeout).await;
            }
            _ = shutdown.changed() => break Ok(()),
        }
    };
    reader.abort();
    // Whatever is complete is sealed before returning, success or not.
    let sealed = sealer.maybe_seal(true).await;
    result.and(sealed)
}

/// Records that the archive holds every entry the server has, if it does: the server's clock is
/// read first, then its newest entry; when that is the newest archived entry, nothing newer
/// existed when the clock was read. Best effort: a failure is a warning and a metric, never a
/// reason to stop tailing.
async fn mark_complete(
    repo: &Repository,
    conn: &crate::Connected,
    layout: &MongoLayout,
    status: &watch::Sender<MongoStatus>,
    read_timeout: Duration,
) {
    let Some(archived) = status.borrow().archived_ts else { return };
    let result = async {
        let timeout =
            |what: &str| MongoError::Timeout { uri: conn.uri.clone(), what: what.into(), after: read_timeout };
        let now = tokio::time::timeout(read_timeout, conn.server_time_us())
            .await
            .map_err(|_| timeout("hello (the server's clock)"))??;
        let newest = tokio::time::timeout(read_timeout, conn.oplog_edge(true))
            .await
            .map_err(|_| timeout("reading the newest oplog entry"))??
            .map(|(ts, _)| ts);
        if newest != Some(archived) {
            return Ok(None);
        }
        crate::layout::record_complete(repo, layout, archived, now).await?;
        Ok::<_, MongoError>(Some(now))
    }
    .await;
    match result {
        Ok(Some(now)) => {
            status.send_modify(|s| s.complete_up_to_us = Some(now));
            metrics::gauge!("pitr_mongo_complete_time_seconds").set(now as f64 / 1e6);
        }
        Ok(None) => {}
        Err(e) => {
            metrics::counter!("pitr_complete_mark_errors_total", "source" => "mongo").increment(1);
            tracing::warn!(error = %e, "could not record a completeness mark; retrying at the next interval");
        }
    }
}

struct Sealer<'a> {
    repo: &'a Repository,
    layout: &'a MongoLayout,
    status: &'a watch::Sender<MongoStatus>,
    cfg: &'a TailerConfig,
    pending: Vec<Raw>,
    pending_bytes: usize,
    last_seal: Instant,
    last_entry: Instant,
    /// How many of `pending` may be sealed: all but a trailing transaction that may go on.
    safe: usize,
    /// The last archived `ts` the next slice follows; `None` at the start of a run.
    after: Option<Ts>,
    /// For the completeness check before each seal.
    oplog: mongodb::Collection<RawDocumentBuf>,
}

impl Sealer<'_> {
    async fn push(&mut self, raw: Raw) -> Result<(), MongoError> {
        self.pending_bytes += raw.doc.as_bytes().len();
        self.last_entry = Instant::now();
        let (ts, in_txn) = (raw.ts, raw.in_txn);
        let new_ts = self.pending.last().is_none_or(|p| p.ts != ts);
        self.pending.push(raw);
        self.status.send_modify(|s| s.received_ts = Some(ts));
        if !in_txn {
            self.safe = self.pending.len();
        } else if new_ts {
            // Everything before a new `ts` is whole.
            self.safe = self.pending.len() - 1;
        }
        if self.pending_bytes >= self.cfg.max_slice_bytes {
            self.seal_safe().await?;
        } else {
            self.maybe_seal(false).await?;
        }
        self.update_lag();
        Ok(())
    }

    fn update_lag(&self) {
        let newest = self.pending.last().and_then(|r| r.wall_us);
        let archived = self.status.borrow().archived_time_us;
        let lag = match (newest, archived) {
            (Some(n), Some(a)) if n > a => (n - a) as f64 / 1e6,
            (Some(_), None) => self.last_seal.elapsed().as_secs_f64(),
            _ => 0.0,
        };
        self.status.send_modify(|s| s.lag_seconds = lag);
        set_gauges(&self.status.borrow());
    }

    async fn maybe_seal(&mut self, force: bool) -> Result<(), MongoError> {
        if self.last_entry.elapsed() >= QUIET {
            self.safe = self.pending.len();
        }
        if self.safe > 0 && (force || self.last_seal.elapsed() >= self.cfg.flush_interval) {
            self.seal_safe().await?;
        }
        Ok(())
    }

    async fn seal_safe(&mut self) -> Result<(), MongoError> {
        if self.safe == 0 {
            return Ok(());
        }
        let mut batch: Vec<Raw> = self.pending.drain(..self.safe).collect();
        self.safe = 0;
        let after = self.after.unwrap_or(batch[0].ts.pred());
        self.complete(after, &mut batch).await;
        let mut plaintext = Vec::with_capacity(batch.iter().map(|r| r.doc.as_bytes().len()).sum());
        for r in &batch {
            plaintext.extend_from_slice(r.doc.as_bytes());
        }
        self.pending_bytes = self.pending.iter().map(|r| r.doc.as_bytes().len()).sum();
        let (first, last) = (&batch[0], &batch[batch.len() - 1]);
        let name = self.layout.slice_name(after, last.ts);
        let meta = slice_meta(first.ts, last.ts, first.wall_us, last.wall_us);
        let mut delay = Duration::from_millis(100);
        loop {
            match self.repo.put_sealed(&name, plaintext.clone(), meta.clone()).await {
                Ok(_) => break,
                // Storage, or the keys (a KMS outage), failing for now: the slice waits in memory
                // and is put again; nothing past it is acknowledged meanwhile.
                Err(e @ (pitr_archive::RepositoryError::Store(_) | pitr_archive::RepositoryError::KeyAccess(_))) => {
                    metrics::counter!("pitr_mongo_upload_errors_total").increment(1);
                    tracing::warn!(object = %name, error = %e, retry_in = ?delay, "oplog slice not stored yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.last_seal = Instant::now();
        self.after = Some(last.ts);
        metrics::counter!("pitr_mongo_slices_archived_total").increment(1);
        metrics::counter!("pitr_mongo_archived_entries_total").increment(batch.len() as u64);
        let (ts, wall) = (last.ts, last.wall_us);
        self.status.send_modify(|s| {
            s.archived_ts = Some(ts);
            s.archived_time_us = wall.or(s.archived_time_us);
            s.slices_archived += 1;
        });
        tracing::debug!(object = %name, entries = batch.len(), "oplog slice archived");
        self.update_lag();
        Ok(())
    }

    /// Makes sure `batch` holds every entry the server has in `(after, last]` before it is
    /// sealed under a name that claims exactly that. A tailable cursor should never skip an
    /// entry, but SecantusDB's was seen to (one insert, committed before the next began, missing
    /// from a cursor opened while writes went on): one count per slice finds that, and the
    /// range is then read again with a plain query. On mongod this never finds anything. If the
    /// count cannot be made (the server went away), the entries in hand are sealed as they are:
    /// they are real, and losing them could matter more.
    async fn complete(&self, after: Ts, batch: &mut Vec<Raw>) {
        let last = batch[batch.len() - 1].ts;
        let range = doc! { "ts": { "$gt": Bson::Timestamp(after.to_bson()), "$lte": Bson::Timestamp(last.to_bson()) } };
        let counted = tokio::time::timeout(self.cfg.read_timeout, self.oplog.count_documents(range.clone())).await;
        let on_server = match counted {
            Ok(Ok(n)) => n,
            Err(_) => {
                tracing::warn!(after = %after, last = %last, timeout = ?self.cfg.read_timeout,
                    "the server did not answer the slice's count; sealing the entries received");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, after = %after, last = %last, "could not check the slice against the oplog; sealing the entries received");
                return;
            }
        };
        if on_server <= batch.len() as u64 {
            return;
        }
        // The range read again is the slice's plus what the cursor missed; a server that
        // returns far more than that is not believed, and its extra bytes are not kept.
        let limit = 2 * self.cfg.max_slice_bytes.max(batch.iter().map(|r| r.doc.as_bytes().len()).sum());
        let reread = async {
            let mut cursor = self.oplog.find(range).sort(doc! { "$natural": 1 }).await?;
            let (mut out, mut bytes) = (Vec::new(), 0usize);
            while cursor.advance().await? {
                bytes += cursor.current().as_bytes().len();
                if bytes > limit {
                    return Err(mongodb::error::Error::custom(format!(
                        "the range holds more than {limit} bytes of entries, twice what a slice may"
                    )));
                }
                if let Some(raw) =
                    RawDocumentBuf::from_bytes(cursor.current().as_bytes().to_vec()).ok().and_then(read_raw)
                {
                    out.push(raw);
                }
            }
            Ok::<_, mongodb::error::Error>(out)
        };
        let reread = async {
            tokio::time::timeout(self.cfg.read_timeout, reread).await.unwrap_or_else(|_| {
                Err(mongodb::error::Error::custom(format!("no answer within {:?}", self.cfg.read_timeout)))
            })
        };
        match reread.await {
            Ok(mut all) if all.len() > batch.len() => {
                // Entries sharing a `ts` keep their order; different `ts` go in `ts` order.
                all.sort_by_key(|r| r.ts);
                let missed = all.len() - batch.len();
                metrics::counter!("pitr_mongo_reread_entries_total").increment(missed as u64);
                tracing::warn!(after = %after, last = %last, missed,
                    "the oplog cursor skipped entries the server holds; read the range again before sealing it");
                *batch = all;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, after = %after, last = %last, "could not read the slice's range again; sealing the entries received")
            }
        }
    }
}
