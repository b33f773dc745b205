//! The receiving side: connect (and reconnect), find where to resume, follow timelines, stream
//! into [`Pending`], and report durable positions back to the primary.

use pitr_archive::now_us;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pitr_archive::complete::CompleteMark;
use pitr_archive::layout::{WalLayout, WalObject};
use pitr_archive::lease::{Lease, LeaseError};
use pitr_archive::{ClusterInfo, ObjectKind, ObjectMeta, Repository, RepositoryError};
use pitr_pgwire::connection::{ConnectOptions, Connection, StreamEvent};
use pitr_pgwire::messages::format_lsn;
use pitr_pgwire::timeline::{parse_history, switch_point};
use pitr_pgwire::walreader::{pg_timestamp_to_unix_micros, WalDecoder};
use pitr_pgwire::{ConnInfo, PgError, ReplicationMessage};
use tokio::sync::{watch, Notify};

use crate::marks::{write_marks, Tracker};
use crate::pending::{lock, Durable, Pending, UploadStats, Uploader};
use crate::resume;

#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub conninfo: ConnInfo,
    pub slot: String,
    pub create_slot: bool,
    pub application_name: String,
    /// Minimum spacing between chunk puts (0: put as soon as the previous put is done).
    pub flush_interval: Duration,
    /// How often a status update goes to the primary even when nothing changed.
    pub status_interval: Duration,
    /// Received-but-not-durable bytes held in memory before reading from the primary pauses.
    pub max_pending_bytes: usize,
    /// How long the first connection may keep failing before pitr gives up.
    pub startup_timeout: Duration,
    /// Refuse a primary whose system identifier differs (when set).
    pub system_id: Option<u64>,
    /// Who holds the writer lease: stable across restarts of this sidecar (`<host>/<slot>`).
    pub lease_holder: String,
    pub lease_ttl: Duration,
    /// Completeness marks (moments at which the archive held everything the primary had) are
    /// written at most this often while caught up; zero writes none.
    pub complete_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("{0}")]
    Postgres(#[from] PgError),
    #[error("{0}")]
    Fatal(String),
    #[error("cannot resume from the archive: chunk {chunk} holds {bytes} bytes, but its name says {named}")]
    ChunkLength { chunk: String, bytes: usize, named: usize },
    #[error(
        "cannot resume from the archive: chunk {chunk} disagrees with {earlier} about the WAL they both hold; \
         one of them is not this cluster's WAL (remove it to stream that range again, if the primary still has it)"
    )]
    ChunkMismatch { chunk: String, earlier: String },
}

/// A snapshot of the receiver's state, published for `pitr status` and metrics.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamStatus {
    pub connected: bool,
    pub host: Option<String>,
    pub system_id: Option<u64>,
    pub timeline: u32,
    pub received_lsn: u64,
    pub durable_lsn: u64,
    pub primary_lsn: u64,
    pub lag_bytes: u64,
    /// Age of the oldest WAL received but not yet durable; 0 when caught up.
    pub lag_seconds: f64,
    /// Time (µs since the Unix epoch) of the newest commit/abort made durable.
    pub last_commit_time_us: Option<i64>,
    /// The primary's clock (µs since the Unix epoch) at the newest completeness mark recorded:
    /// the archive held everything the primary had then.
    #[serde(default)]
    pub complete_up_to_us: Option<i64>,
    pub objects_archived: u64,
    pub bytes_archived: u64,
    pub upload_errors: u64,
    pub last_error: Option<String>,
    pub updated_at_us: i64,
}

/// Where the receiver is: the timeline being streamed and the end of what was received.
struct Position {
    timeline: u32,
    received: u64,
    /// Start of streaming on `timeline`: everything before it is durable (or was, on an ancestor).
    timeline_start: u64,
}

/// State that lives across reconnects.
struct Session {
    layout: WalLayout,
    pos: Position,
    decoder: WalDecoder,
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    freed: Arc<Notify>,
    durable: watch::Receiver<Durable>,
    stats: Arc<Mutex<UploadStats>>,
    uploader: tokio::task::JoinHandle<Result<(), RepositoryError>>,
    stop_uploader: watch::Sender<bool>,
    primary_lsn: u64,
    /// Set by the lease keeper if another writer took the cluster over.
    lease_lost: watch::Receiver<Option<String>>,
    /// Tells the lease keeper to release the lease and end.
    release_lease: watch::Sender<bool>,
    lease_keeper: tokio::task::JoinHandle<()>,
    /// Claims of completeness read off the stream, until durable.
    tracker: Tracker,
    /// The connected server's timeline: while we stream an older one (its history), the
    /// server's messages say nothing about what it has now, so nothing is claimed.
    server_timeline: u32,
    /// Hands durable claims to the mark writer (`None`: marks are off).
    marks: Option<watch::Sender<Option<CompleteMark>>>,
    /// The newest mark recorded.
    marks_recorded: watch::Receiver<Option<CompleteMark>>,
    /// Tasks that only save work (compacting segments left as chunks, writing marks): stopped
    /// with the session, whatever they were doing.
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    fn stop_background(&self) {
        for task in &self.background {
            task.abort();
        }
    }
}

/// How one replication connection ended.
enum Finished {
    Reconnect(String),
    Shutdown,
}

/// How one START_REPLICATION ended.
enum Outcome {
    Finished(Finished),
    /// The server switched us to the next timeline; streaming goes on on the same connection.
    NextTimeline,
}

/// Streams until `shutdown` turns true (then everything received is made durable first) or a
/// fatal error. Connection losses and storage errors are retried.
pub async fn run(
    repo: Repository,
    cfg: StreamConfig,
    status: watch::Sender<StreamStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), StreamError> {
    repo.check().await?;
    let opts = ConnectOptions { replication: true, application_name: cfg.application_name.clone() };
    let mut session: Option<Session> = None;
    let started = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return finish(session, &status).await;
        }
        let conn = tokio::select! {
            c = Connection::connect(&cfg.conninfo, &opts) => c,
            _ = shutdown.changed() => continue,
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                let retryable = !matches!(e, PgError::Auth { .. } | PgError::Tls { .. }) || session.is_some();
                if session.is_none() && (!retryable || started.elapsed() > cfg.startup_timeout) {
                    return Err(StreamError::Fatal(format!(
                        "cannot connect to PostgreSQL ({}): {e}",
                        cfg.conninfo.redacted()
                    )));
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot connect to PostgreSQL; retrying");
                status.send_modify(|s| {
                    s.connected = false;
                    s.last_error = Some(e.to_string());
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let result = stream_on(&repo, &cfg, &mut conn, &mut session, &status, &mut shutdown).await;
        status.send_modify(|s| s.connected = false);
        match result {
            Ok(Finished::Shutdown) => {
                conn.close().await;
                return finish(session, &status).await;
            }
            Ok(Finished::Reconnect(why)) => {
                tracing::warn!(reason = %why, "replication connection lost; reconnecting");
                status.send_modify(|s| s.last_error = Some(why));
            }
            Err(StreamError::Postgres(e)) if session.is_some() && is_transient(&e) => {
                tracing::warn!(error = %e, "replication connection failed; reconnecting");
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                if let Some(s) = session.take() {
                    let _ = s.stop_uploader.send(true);
                    s.uploader.abort();
                    s.lease_keeper.abort();
                    s.stop_background();
                }
                return Err(e);
            }
        }
    }
}

fn is_transient(e: &PgError) -> bool {
    match e {
        PgError::Io { .. } | PgError::Closed { .. } | PgError::Timeout { .. } | PgError::Connect { .. } => true,
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now, 08xxx connection errors
        PgError::Server { error, .. } => error.code.starts_with("57P") || error.code.starts_with("08"),
        _ => false,
    }
}

async fn finish(session: Option<Session>, status: &watch::Sender<StreamStatus>) -> Result<(), StreamError> {
    let Some(mut s) = session else { return Ok(()) };
    s.stop_background();
    let _ = s.stop_uploader.send(true);
    s.wake.notify_one();
    let result = (&mut s.uploader).await;
    publish(&s, status, false);
    let _ = s.release_lease.send(true);
    let _ = (&mut s.lease_keeper).await;
    match result {
        Ok(r) => Ok(r?),
        Err(e) => Err(StreamError::Fatal(format!("uploader task failed: {e}"))),
    }
}

async fn stream_on(
    repo: &Repository,
    cfg: &StreamConfig,
    conn: &mut Connection,
    session: &mut Option<Session>,
    status: &watch::Sender<StreamStatus>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Finished, StreamError> {
    let ident = conn.identify_system().await?;
    if let Some(want) = cfg.system_id {
        if want != ident.system_id {
            return Err(StreamError::Fatal(format!(
                "{} has system identifier {}, but the configuration expects {want}",
                conn.host(),
                ident.system_id
            )));
        }
    }
    if let Some(s) = session.as_ref() {
        if s.layout.system_id != ident.system_id {
            return Err(StreamError::Fatal(format!(
                "{} is a different cluster (system identifier {}, was {}); refusing to mix their WAL",
                conn.host(),
                ident.system_id,
                s.layout.system_id
            )));
        }
    }
    // The slot first: from the moment it exists the primary keeps the WAL we start from.
    let mut created_at = None;
    if cfg.create_slot {
        if let Some(lsn) = conn.create_physical_slot(&cfg.slot).await? {
            tracing::info!(slot = %cfg.slot, restart_lsn = %format_lsn(lsn), "created physical replication slot");
            created_at = Some(lsn);
        }
    }
    if session.is_none() {
        *session = Some(open_session(repo, cfg, conn, &ident, created_at).await?);
    }
    let s = session.as_mut().ok_or_else(|| StreamError::Fatal("no session".into()))?;

    status.send_modify(|st| {
        st.connected = true;
        st.host = Some(conn.host().to_string());
        st.system_id = Some(ident.system_id);
        st.last_error = None;
    });
    s.primary_lsn = s.primary_lsn.max(ident.xlog_pos);
    s.server_timeline = ident.timeline;

    if ident.timeline < s.pos.timeline {
        return Ok(Finished::Reconnect(format!(
            "{} is on timeline {}, behind the archive's timeline {} (a stale former primary?)",
            conn.host(),
            ident.timeline,
            s.pos.timeline
        )));
    }
    if ident.timeline > s.pos.timeline {
        follow_history(repo, conn, s, ident.timeline).await?;
    }

    loop {
        let start = s.pos.received;
        tracing::info!(host = %conn.host(), timeline = s.pos.timeline, start = %format_lsn(start), slot = %cfg.slot, "starting replication");
        if let Err(e) = conn.start_replication(&cfg.slot, start, s.pos.timeline).await {
            return Err(match e.sqlstate() {
                // undefined_file: the primary already removed WAL the archive still needs.
                Some("58P01") => StreamError::Fatal(format!(
                    "the primary no longer has the WAL the archive needs next ({} on timeline {}): {e}. \
                     The archive has a gap from there; take a new base backup once streaming runs again \
                     (keep the replication slot so this cannot recur)",
                    format_lsn(start),
                    s.pos.timeline
                )),
                Some("42704") => StreamError::Fatal(format!(
                    "replication slot {:?} does not exist on {} (set create_slot = true or create it): {e}",
                    cfg.slot,
                    conn.host()
                )),
                _ => StreamError::Postgres(e),
            });
        }
        match pump(cfg, conn, s, status, shutdown).await? {
            Outcome::NextTimeline => {
                let next = s.pos.timeline;
                store_history(repo, conn, s.layout, next).await?;
                continue;
            }
            Outcome::Finished(f) => return Ok(f),
        }
    }
}

/// Reads the cluster's description, builds the WAL catalog and decides where streaming resumes.
async fn open_session(
    repo: &Repository,
    cfg: &StreamConfig,
    conn: &mut Connection,
    ident: &pitr_pgwire::SystemIdentity,
    slot_created_at: Option<u64>,
) -> Result<Session, StreamError> {
    let settings = conn.server_settings().await?;
    let (segment_size, page_size) = (settings.wal_segment_size, settings.wal_page_size);
    let info = ClusterInfo {
        system_id: ident.system_id,
        wal_segment_size: segment_size,
        wal_page_size: page_size,
        server_version_num: settings.server_version_num,
    };
    repo.put_cluster_info(&info).await?;
    let layout = WalLayout::new(&info);
    let lease = Lease::acquire(repo, ident.system_id, &cfg.lease_holder, cfg.lease_ttl)
        .await
        .map_err(|e| StreamError::Fatal(e.to_string()))?;
    let (lease_lost_tx, lease_lost) = watch::channel(None);
    let (release_lease, release_rx) = watch::channel(false);
    let lease_keeper = tokio::spawn(keep_lease(lease, cfg.lease_ttl, lease_lost_tx, release_rx));
    let (plan, partial) = resume::prepare(repo, layout).await?;

    let mut decoder = WalDecoder::new(segment_size, page_size);
    let mut pending = Pending::default();
    let pos = match plan.start {
        Some((timeline, end)) => {
            // Resume from the archive's end. A partial segment's chunks come back into memory so
            // that it can be compacted into a whole segment when it completes.
            if let Some(buf) = partial {
                let start = layout.segment_start(buf.segno) + u64::from(buf.base);
                decoder.feed(start, &buf.data, &mut Vec::new());
                pending.segments.push_back(buf);
            }
            tracing::info!(timeline, end = %format_lsn(end), "resuming from the end of the archive");
            Position { timeline, received: end, timeline_start: end }
        }
        None => {
            let slot_lsn = match conn.read_replication_slot(&cfg.slot).await {
                Ok(Some((kind, lsn))) if kind == "physical" => lsn.or(slot_created_at),
                Ok(Some((kind, _))) => {
                    return Err(StreamError::Fatal(format!(
                        "replication slot {:?} is a {kind} slot; pitr needs a physical one",
                        cfg.slot
                    )))
                }
                Ok(None) => None,
                // READ_REPLICATION_SLOT is PostgreSQL 15+; older servers start where the slot was
                // created, or from the current position.
                Err(PgError::Server { .. }) => slot_created_at.filter(|l| *l != 0),
                Err(e) => return Err(e.into()),
            };
            let from = slot_lsn.unwrap_or(ident.xlog_pos);
            let start = from - from % segment_size;
            tracing::info!(timeline = ident.timeline, start = %format_lsn(start), "empty archive: starting at the segment the slot holds");
            Position { timeline: ident.timeline, received: start, timeline_start: start }
        }
    };
    let durable_init = Durable { timeline: pos.timeline, lsn: pos.received, last_commit_us: None };
    let (durable_tx, durable_rx) = watch::channel(durable_init);
    let pending = Arc::new(Mutex::new(pending));
    let wake = Arc::new(Notify::new());
    let freed = Arc::new(Notify::new());
    let stats = Arc::new(Mutex::new(UploadStats::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let uploader = Uploader {
        repo: repo.clone(),
        layout,
        pending: pending.clone(),
        wake: wake.clone(),
        freed: freed.clone(),
        durable: durable_tx,
        stats: stats.clone(),
        flush_interval: cfg.flush_interval,
    };
    let handle = tokio::spawn(uploader.run(stop_rx));
    let mut background = Vec::new();
    if !plan.orphans.is_empty() {
        tracing::info!(
            segments = plan.orphans.len(),
            "segments held entirely as chunks: compacting them in the background"
        );
        background.push(tokio::spawn(resume::compact_orphans(repo.clone(), layout, plan.orphans)));
    }
    let (recorded_tx, marks_recorded) = watch::channel(None);
    let marks = if cfg.complete_interval.is_zero() {
        None
    } else {
        let (tx, rx) = watch::channel(None);
        let writer = write_marks(repo.clone(), ident.system_id, cfg.complete_interval, rx, recorded_tx);
        background.push(tokio::spawn(writer));
        Some(tx)
    };
    Ok(Session {
        layout,
        pos,
        decoder,
        pending,
        wake,
        freed,
        durable: durable_rx,
        stats,
        uploader: handle,
        stop_uploader: stop_tx,
        primary_lsn: 0,
        lease_lost,
        release_lease,
        lease_keeper,
        tracker: Tracker::default(),
        server_timeline: ident.timeline,
        marks,
        marks_recorded,
        background,
    })
}

/// Renews the writer lease every third of its lifetime; reports a takeover; releases on request.
async fn keep_lease(
    mut lease: Lease,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
    mut release: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ttl / 3) => {}
            _ = release.changed() => {
                if let Err(e) = lease.release().await {
                    tracing::warn!(error = %e, "could not release the writer lease; it will expire");
                }
                return;
            }
        }
        match lease.renew().await {
            Ok(()) => {}
            Err(e @ LeaseError::Lost { .. }) => {
                let _ = lost.send(Some(e.to_string()));
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the writer lease; retrying"),
        }
    }
}

/// The server is on a later timeline: store the history files and move our position onto the
/// timeline that holds it, as the server's history says.
async fn follow_history(
    repo: &Repository,
    conn: &mut Connection,
    s: &mut Session,
    server_timeline: u32,
) -> Result<(), StreamError> {
    for t in (s.pos.timeline + 1)..=server_timeline {
        store_history(repo, conn, s.layout, t).await?;
    }
    let (_, content) = conn.timeline_history(server_timeline).await?;
    let history = parse_history(&String::from_utf8_lossy(&content)).map_err(|e| {
        StreamError::Fatal(format!("history file of timeline {server_timeline} from {}: {e}", conn.host()))
    })?;
    while s.pos.timeline < server_timeline {
        let Some((switch_lsn, next)) = switch_point(&history, s.pos.timeline, server_timeline) else {
            return Err(StreamError::Fatal(format!(
                "timeline {} of the archive is not in the history of {}'s timeline {server_timeline}: \
                 this server did not descend from the archived one",
                s.pos.timeline,
                conn.host()
            )));
        };
        if s.pos.received < switch_lsn {
            // Stream the rest of our timeline; the server moves us on at its end.
            break;
        }
        // We hold WAL of the old timeline up to or past the fork (the old primary ran ahead of
        // the promoted standby): that tail stays archived on the old timeline, and the new
        // timeline starts over at the beginning of the segment holding the switch point.
        switch_to(s, next, switch_lsn);
    }
    Ok(())
}

fn switch_to(s: &mut Session, timeline: u32, switch_lsn: u64) {
    let seg_start = switch_lsn - switch_lsn % s.layout.segment_size;
    lock(&s.pending).close_all();
    s.tracker.timeline_ended();
    s.wake.notify_one();
    tracing::info!(from = s.pos.timeline, to = timeline, at = %format_lsn(seg_start), "following timeline switch");
    s.pos = Position { timeline, received: seg_start, timeline_start: seg_start };
    s.decoder.reset();
}

async fn store_history(
    repo: &Repository,
    conn: &mut Connection,
    layout: WalLayout,
    timeline: u32,
) -> Result<(), StreamError> {
    if timeline <= 1 {
        return Ok(());
    }
    let (file, content) = conn.timeline_history(timeline).await?;
    let name = layout.object_name(&WalObject::History { timeline });
    let meta = ObjectMeta { timeline, ..ObjectMeta::plain(ObjectKind::TimelineHistory) };
    repo.put_sealed(&name, content.to_vec(), meta).await?;
    tracing::info!(file = %file, "stored timeline history");
    Ok(())
}

/// The position to report as written and flushed: the durable end on the streamed timeline,
/// never anything the archive does not hold.
fn reportable(s: &Session) -> u64 {
    let d = *s.durable.borrow();
    if d.timeline == s.pos.timeline {
        return d.lsn;
    }
    let older_pending = lock(&s.pending).segments.iter().any(|seg| seg.timeline != s.pos.timeline && !seg.is_durable());
    if older_pending {
        0 // InvalidXLogRecPtr: the server ignores it and keeps the slot where it is.
    } else {
        s.pos.timeline_start
    }
}

async fn pump(
    cfg: &StreamConfig,
    conn: &mut Connection,
    s: &mut Session,
    status: &watch::Sender<StreamStatus>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Outcome, StreamError> {
    let mut tick = tokio::time::interval(cfg.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_recv = Instant::now();
    let mut last_reported = 0u64;
    let mut records = Vec::new();
    let mut commits = Vec::new();
    // At most one reply request in flight: completeness claims from keepalives rely on the
    // walsender having drained its output between answering two of them (see marks.rs).
    let mut awaiting_reply = false;
    s.tracker.connection_started();
    loop {
        let backpressured = lock(&s.pending).held_bytes() > cfg.max_pending_bytes;
        if backpressured {
            s.tracker.paused();
        }
        tokio::select! {
            ev = conn.recv_replication(), if !backpressured => {
                last_recv = Instant::now();
                match ev? {
                    StreamEvent::Message(ReplicationMessage::XLogData { wal_start, wal_end, send_time, data }) => {
                        if wal_start != s.pos.received {
                            let why = format!(
                                "server sent WAL at {} but {} was expected", format_lsn(wal_start), format_lsn(s.pos.received));
                            return Ok(Outcome::Finished(Finished::Reconnect(why)));
                        }
                        records.clear();
                        s.decoder.feed(wal_start, &data, &mut records);
                        commits.clear();
                        commits.extend(records.iter().map(|r| (r.end_lsn, pg_timestamp_to_unix_micros(r.timestamp))));
                        append(s, wal_start, &data, &commits);
                        s.primary_lsn = s.primary_lsn.max(wal_end).max(s.pos.received);
                        if s.pos.timeline == s.server_timeline {
                            let claim_end = wal_end.max(s.pos.received);
                            let time = pg_timestamp_to_unix_micros(send_time);
                            s.tracker.on_data(s.pos.timeline, claim_end, time, &commits);
                            offer_mark(s);
                        }
                    }
                    StreamEvent::Message(ReplicationMessage::Keepalive { wal_end, send_time, reply_requested }) => {
                        s.primary_lsn = s.primary_lsn.max(wal_end);
                        awaiting_reply = false;
                        if s.pos.timeline == s.server_timeline {
                            let claim_end = wal_end.max(s.pos.received);
                            s.tracker.on_keepalive(s.pos.timeline, claim_end, pg_timestamp_to_unix_micros(send_time));
                            offer_mark(s);
                        }
                        if reply_requested {
                            let r = reportable(s);
                            conn.send_status(r, r, false).await?;
                            last_reported = r;
                        }
                    }
                    StreamEvent::EndOfTimeline { next_timeline, next_start } => {
                        switch_to(s, next_timeline, next_start);
                        return Ok(Outcome::NextTimeline);
                    }
                    StreamEvent::Ended => {
                        return Ok(Outcome::Finished(Finished::Reconnect("the server ended streaming".into())))
                    }
                }
            }
            changed = s.durable.changed() => {
                if changed.is_err() {
                    return Err(uploader_failure(s).await);
                }
                let r = reportable(s);
                if r != last_reported {
                    conn.send_status(r, r, false).await?;
                    last_reported = r;
                }
                offer_mark(s);
                publish(s, status, true);
            }
            _ = tick.tick() => {
                if last_recv.elapsed() > cfg.status_interval * 3 {
                    let why = format!("nothing heard from the server for {:?}", last_recv.elapsed());
                    return Ok(Outcome::Finished(Finished::Reconnect(why)));
                }
                if s.uploader.is_finished() {
                    return Err(uploader_failure(s).await);
                }
                let r = reportable(s);
                // Ask for a reply so a dead connection is noticed even when the primary is idle
                // (unless one is still on its way: then the check above notices).
                let ask = !awaiting_reply;
                conn.send_status(r, r, ask).await?;
                awaiting_reply |= ask;
                last_reported = r;
                publish(s, status, true);
            }
            _ = s.freed.notified(), if backpressured => {}
            _ = s.lease_lost.changed() => {
                if let Some(why) = s.lease_lost.borrow().clone() {
                    return Err(StreamError::Fatal(why));
                }
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    drain(s, conn).await?;
                    return Ok(Outcome::Finished(Finished::Shutdown));
                }
            }
        }
    }
}

/// On shutdown: close the open segment buffers' intake, wait until everything is durable and
/// tell the primary, so a clean stop leaves nothing only in memory.
async fn drain(s: &mut Session, conn: &mut Connection) -> Result<(), StreamError> {
    let _ = s.stop_uploader.send(true);
    s.wake.notify_one();
    loop {
        let done = lock(&s.pending).all_durable();
        if done || s.uploader.is_finished() {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), s.durable.changed()).await;
    }
    let r = reportable(s);
    conn.send_status(r, r, false).await?;
    Ok(())
}

async fn uploader_failure(s: &mut Session) -> StreamError {
    match (&mut s.uploader).await {
        Ok(Err(e)) => StreamError::Repository(e),
        Ok(Ok(())) => StreamError::Fatal("the uploader stopped unexpectedly".into()),
        Err(e) => StreamError::Fatal(format!("the uploader task failed: {e}")),
    }
}

/// Appends received WAL (with its commits: end LSN, µs since the Unix epoch) to the segment
/// buffers and wakes the uploader.
fn append(s: &mut Session, lsn: u64, data: &[u8], commits: &[(u64, i64)]) {
    let end = lock(&s.pending).append(s.pos.timeline, lsn, data, commits, s.layout.segment_size, Instant::now());
    s.pos.received = end;
    s.wake.notify_one();
}

/// Hands the newest claim the archive now holds to the mark writer (which writes it when its
/// interval allows; never waited for here).
fn offer_mark(s: &mut Session) {
    let durable = *s.durable.borrow();
    if let Some(mark) = s.tracker.take_durable(durable) {
        if let Some(marks) = &s.marks {
            marks.send_replace(Some(mark));
        }
    }
}

fn publish(s: &Session, status: &watch::Sender<StreamStatus>, connected: bool) {
    let d = *s.durable.borrow();
    let (oldest, _) = {
        let p = lock(&s.pending);
        (p.oldest_undurable(), p.held_bytes())
    };
    let stats = lock(&s.stats).clone();
    let complete = *s.marks_recorded.borrow();
    status.send_modify(|st| {
        st.connected = connected;
        st.timeline = s.pos.timeline;
        st.received_lsn = s.pos.received;
        st.durable_lsn = d.lsn;
        st.primary_lsn = s.primary_lsn.max(s.pos.received);
        st.lag_bytes = st.primary_lsn.saturating_sub(d.lsn);
        st.lag_seconds = oldest.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        if d.last_commit_us.is_some() {
            st.last_commit_time_us = d.last_commit_us;
        }
        if let Some(mark) = complete {
            st.complete_up_to_us = Some(mark.server_time_us);
        }
        st.objects_archived = stats.objects;
        st.bytes_archived = stats.bytes;
        st.upload_errors = stats.errors;
        if stats.last_error.is_some() {
            st.last_error = stats.last_error.clone();
        }
        st.updated_at_us = now_us();
    });
}
