//! The receiving side: connect (and reconnect), find where to resume, follow timelines, hand WAL
//! to the pipeline, and report its durable position back to the primary.
//!
//! Everything here is I/O around the sans-IO `WalPipeline` (`pipeline/`): the socket, history
//! files, timers and status updates (what lives across reconnects is in `session.rs`). The
//! pipeline decides what is reportable; this only sends it.

use std::time::{Duration, Instant};

use pitr_archive::lease::LeaseError;
use pitr_archive::restore_points::RestorePoint;
use pitr_archive::{ObjectKind, ObjectMeta, Repository, WalObject};
use pitr_pgformat::lsn::format_lsn;
use pitr_pgformat::timeline::parse_history;
use pitr_pgformat::walreader::{pg_timestamp_to_unix_micros, RestorePointRecord};
use pitr_pgwire::connection::{ConnectOptions, Connection, StreamEvent};
use pitr_pgwire::{PgError, ReplicationMessage};
use tokio::sync::watch;

use crate::api::{StreamConfig, StreamError, StreamStatus};
use crate::pipeline::{PipelineError, Switch};
use crate::session::{offer_mark, open_session, publish, take_lease, uploader_failure, Session};

/// The status the sidecar shows moves at most this often with puts (the status tick and a stop
/// publish at once); a put landing meanwhile is shown at the end of the spacing.
const PUBLISH_SPACING: Duration = Duration::from_millis(50);

/// When the connected status was last published, and whether a put landed since.
struct Shown {
    at: Instant,
    owed: bool,
}

impl Shown {
    fn publish(&mut self, s: &Session, status: &watch::Sender<StreamStatus>) {
        publish(s, status, true);
        (self.at, self.owed) = (Instant::now(), false);
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
    // Lives until the end of this function, after the uploader (which may wait for a compaction
    // running there) has finished.
    let background = crate::background::Background::start()?;
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
        let result = stream_on(&repo, &cfg, background.handle(), &mut conn, &mut session, &status, &mut shutdown).await;
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
                    s.pipeline.stop();
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
    s.pipeline.stop();
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
    background: &tokio::runtime::Handle,
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
    // The lease before the slot: a refused sidecar must not leave a slot holding WAL. Then the
    // slot: from the moment it exists the primary keeps the WAL we start from.
    let lease = match session {
        // Taking over an expired lease waits up to a TTL: a stop request ends the wait.
        None => tokio::select! {
            lease = take_lease(repo, cfg, ident.system_id) => Some(lease?),
            _ = shutdown.wait_for(|stop| *stop) => return Ok(Finished::Shutdown),
        },
        Some(_) => None,
    };
    let fresh = lease.is_some();
    let mut created_at = None;
    if cfg.create_slot {
        if let Some(lsn) = conn.create_physical_slot(&cfg.slot).await? {
            tracing::info!(slot = %cfg.slot, restart_lsn = %format_lsn(lsn), "created physical replication slot");
            created_at = Some(lsn);
        }
    }
    if let Some(lease) = lease {
        *session = Some(open_session(repo, cfg, background, conn, &ident, created_at, lease).await?);
    }
    let s = session.as_mut().ok_or_else(|| StreamError::Fatal("no session".into()))?;
    if !fresh {
        // A reconnect (perhaps after this process was paused): a writer that lost the lease
        // must stop here rather than stream again. Bounded, so that a storage outage (the lease
        // unconfirmed) does not hold the connection up for long: the puts wait on the lease
        // anyway.
        match tokio::time::timeout(cfg.lease_ttl / 3, s.guard.check()).await {
            Ok(Err(e @ (LeaseError::Lost { .. } | LeaseError::Released { .. }))) => return Err(e.into()),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not check the writer lease on reconnect"),
            Ok(Ok(())) | Err(_) => {}
        }
    }

    status.send_modify(|st| {
        st.connected = true;
        st.host = Some(conn.host().to_string());
        st.system_id = Some(ident.system_id);
        st.last_error = None;
    });
    s.primary_lsn = s.primary_lsn.max(ident.xlog_pos);
    s.server_timeline = ident.timeline;

    let timeline = s.timeline();
    if ident.timeline < timeline {
        return Ok(Finished::Reconnect(format!(
            "{} is on timeline {}, behind the archive's timeline {timeline} (a stale former primary?)",
            conn.host(),
            ident.timeline,
        )));
    }
    if ident.timeline > timeline {
        follow_history(repo, conn, s, ident.timeline).await?;
    }

    loop {
        let (timeline, start) = s.pipeline.with(|p| (p.timeline(), p.received()));
        tracing::info!(host = %conn.host(), timeline, start = %format_lsn(start), slot = %cfg.slot, "starting replication");
        if let Err(e) = conn.start_replication(&cfg.slot, start, timeline).await {
            return Err(match e.sqlstate() {
                // undefined_file: the primary already removed WAL the archive still needs.
                Some("58P01") => StreamError::Fatal(format!(
                    "the primary no longer has the WAL the archive needs next ({} on timeline {}): {e}. \
                     The archive has a gap from there; take a new base backup once streaming runs again \
                     (keep the replication slot so this cannot recur)",
                    format_lsn(start),
                    timeline
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
                let next = s.timeline();
                store_history(repo, conn, s, next).await?;
                continue;
            }
            Outcome::Finished(f) => return Ok(f),
        }
    }
}

/// The server is on a later timeline: store the history files and move the pipeline onto the
/// timeline that holds its position, as the server's history says.
async fn follow_history(
    repo: &Repository,
    conn: &mut Connection,
    s: &mut Session,
    server_timeline: u32,
) -> Result<(), StreamError> {
    for t in (s.timeline() + 1)..=server_timeline {
        store_history(repo, conn, s, t).await?;
    }
    let (_, content) = conn.timeline_history(server_timeline).await?;
    let history = parse_history(&String::from_utf8_lossy(&content)).map_err(|e| {
        StreamError::Fatal(format!("history file of timeline {server_timeline} from {}: {e}", conn.host()))
    })?;
    let switches = s.pipeline.with(|p| p.follow_history(&history, server_timeline)).map_err(|e| match e {
        PipelineError::NotDescendant { timeline, .. } => StreamError::Fatal(format!(
            "timeline {timeline} of the archive is not in the history of {}'s timeline {server_timeline}: \
             this server did not descend from the archived one",
            conn.host()
        )),
        other => StreamError::Fatal(other.to_string()),
    })?;
    for switch in switches {
        s.switched(switch);
    }
    Ok(())
}

async fn store_history(
    repo: &Repository,
    conn: &mut Connection,
    s: &Session,
    timeline: u32,
) -> Result<(), StreamError> {
    if timeline <= 1 {
        return Ok(());
    }
    let (file, content) = conn.timeline_history(timeline).await?;
    let name = s.layout.object_name(&WalObject::History { timeline });
    let meta = ObjectMeta { timeline, ..ObjectMeta::plain(ObjectKind::TimelineHistory) };
    s.guard.fenced(repo.put_sealed(&name, content.to_vec(), meta)).await??;
    tracing::info!(file = %file, "stored timeline history");
    Ok(())
}

/// The restore points the decoder found, as the index keeps them. A name that is not UTF-8 (a
/// server encoding other than UTF-8) is not indexed: pitr could not write it back into
/// `recovery_target_name` byte for byte.
pub(crate) fn restore_points(timeline: u32, found: &[RestorePointRecord]) -> Vec<RestorePoint> {
    found
        .iter()
        .filter_map(|r| match String::from_utf8(r.name.clone()) {
            Ok(name) => Some(RestorePoint {
                name,
                timeline,
                lsn: r.lsn,
                end_lsn: r.end_lsn,
                time_us: pg_timestamp_to_unix_micros(r.timestamp),
            }),
            Err(_) => {
                tracing::warn!(lsn = %format_lsn(r.lsn), "restore point whose name is not UTF-8: not indexed");
                None
            }
        })
        .collect()
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
    let mut found_points = Vec::new();
    // At most one reply request in flight: completeness claims from keepalives rely on the
    // walsender having drained its output between answering two of them (see marks.rs).
    let mut awaiting_reply = false;
    let mut shown = Shown { at: Instant::now(), owed: false };
    s.tracker.connection_started();
    loop {
        let backpressured = s.pipeline.with(|p| p.held_bytes()) > cfg.max_pending_bytes;
        if backpressured {
            s.tracker.paused();
        }
        tokio::select! {
            ev = conn.recv_replication(), if !backpressured => {
                last_recv = Instant::now();
                match ev? {
                    StreamEvent::Message(ReplicationMessage::XLogData { wal_start, wal_end, send_time, data }) => {
                        let expected = s.pipeline.with(|p| p.received());
                        if wal_start != expected {
                            let why = PipelineError::Misplaced { expected, got: wal_start }.to_string();
                            return Ok(Outcome::Finished(Finished::Reconnect(why)));
                        }
                        records.clear();
                        found_points.clear();
                        s.decoder.feed_all(wal_start, &data, &mut records, &mut found_points);
                        commits.clear();
                        commits.extend(records.iter().map(|r| (r.end_lsn, pg_timestamp_to_unix_micros(r.timestamp))));
                        let appended = s.pipeline.with(|p| {
                            p.note_server_end(wal_end);
                            let appended = p.append(wal_start, &data, &commits, Instant::now());
                            if appended.is_ok() && !found_points.is_empty() {
                                p.note_restore_points(&restore_points(p.timeline(), &found_points));
                            }
                            appended.map(|end| (p.timeline(), end))
                        });
                        let (timeline, received) = match appended {
                            Ok(position) => position,
                            Err(e) => return Ok(Outcome::Finished(Finished::Reconnect(e.to_string()))),
                        };
                        if let Some(indexer) = &s.indexer {
                            indexer.offer(timeline, wal_start, &data);
                        }
                        s.pipeline.wake_uploader();
                        s.primary_lsn = s.primary_lsn.max(wal_end).max(received);
                        if timeline == s.server_timeline {
                            let claim_end = wal_end.max(received);
                            let time = pg_timestamp_to_unix_micros(send_time);
                            s.tracker.on_data(timeline, claim_end, time, &commits);
                            offer_mark(s);
                        }
                    }
                    StreamEvent::Message(ReplicationMessage::Keepalive { wal_end, send_time, reply_requested }) => {
                        s.primary_lsn = s.primary_lsn.max(wal_end);
                        awaiting_reply = false;
                        let (timeline, received) = s.pipeline.with(|p| (p.timeline(), p.received()));
                        if timeline == s.server_timeline {
                            let claim_end = wal_end.max(received);
                            s.tracker.on_keepalive(timeline, claim_end, pg_timestamp_to_unix_micros(send_time));
                            offer_mark(s);
                        }
                        if reply_requested {
                            let r = s.reportable();
                            conn.send_status(r, r, false).await?;
                            last_reported = r;
                        }
                    }
                    StreamEvent::EndOfTimeline { next_timeline, next_start } => {
                        let from = s.timeline();
                        let start = s.pipeline.with(|p| p.switch_timeline(next_timeline, next_start));
                        s.switched(Switch { from, to: next_timeline, start });
                        return Ok(Outcome::NextTimeline);
                    }
                    StreamEvent::Ended => {
                        return Ok(Outcome::Finished(Finished::Reconnect("the server ended streaming".into())))
                    }
                }
            }
            changed = s.progress.changed() => {
                if changed.is_err() {
                    return Err(uploader_failure(s).await);
                }
                let r = s.reportable();
                if r != last_reported {
                    conn.send_status(r, r, false).await?;
                    last_reported = r;
                }
                offer_mark(s);
                // At most every PUBLISH_SPACING: each publication wakes the sidecar's status
                // readers (gauges, status file, journal) on other threads, hundreds of times a
                // second under a synchronous load, for readers that look a few times a second.
                if shown.at.elapsed() >= PUBLISH_SPACING {
                    shown.publish(s, status);
                } else {
                    shown.owed = true;
                }
            }
            _ = tokio::time::sleep_until((shown.at + PUBLISH_SPACING).into()), if shown.owed => shown.publish(s, status),
            _ = tick.tick() => {
                if last_recv.elapsed() > cfg.status_interval * 3 {
                    let why = format!("nothing heard from the server for {:?}", last_recv.elapsed());
                    return Ok(Outcome::Finished(Finished::Reconnect(why)));
                }
                if s.uploader.is_finished() {
                    return Err(uploader_failure(s).await);
                }
                let r = s.reportable();
                // Ask for a reply so a dead connection is noticed even when the primary is idle
                // (unless one is still on its way: then the check above notices).
                let ask = !awaiting_reply;
                conn.send_status(r, r, ask).await?;
                awaiting_reply |= ask;
                last_reported = r;
                shown.publish(s, status);
            }
            why = lease_keeper_stopped(&mut s.lease_lost) => return Err(why),
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    drain(s, conn).await?;
                    return Ok(Outcome::Finished(Finished::Shutdown));
                }
            }
        }
    }
}

/// Resolves when the lease keeper reports a takeover, or ends without one (it failed): either
/// way the lease is no longer kept, so nothing more may be written.
async fn lease_keeper_stopped(lost: &mut watch::Receiver<Option<String>>) -> StreamError {
    loop {
        let ended = lost.changed().await.is_err();
        if let Some(why) = lost.borrow_and_update().clone() {
            return StreamError::Fatal(why);
        }
        if ended {
            return StreamError::Fatal("the writer lease's keeper stopped unexpectedly; no more WAL is written".into());
        }
    }
}

/// On shutdown: wait until everything received is durable and tell the primary, so a clean
/// stop leaves nothing only in memory.
async fn drain(s: &mut Session, conn: &mut Connection) -> Result<(), StreamError> {
    s.pipeline.stop();
    loop {
        let done = s.pipeline.with(|p| p.all_durable());
        if done || s.uploader.is_finished() {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), s.progress.changed()).await;
    }
    let r = s.reportable();
    conn.send_status(r, r, false).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lease_keeper_that_ends_stops_the_stream_once() {
        let (tx, mut rx) = watch::channel(None::<String>);
        drop(tx);
        let stopped = tokio::time::timeout(Duration::from_secs(5), lease_keeper_stopped(&mut rx)).await;
        let why = stopped.expect("an ended keeper was not noticed").to_string();
        assert!(why.contains("keeper stopped unexpectedly"), "{why}");

        let (tx, mut rx) = watch::channel(None::<String>);
        let waiting = tokio::spawn(async move { lease_keeper_stopped(&mut rx).await.to_string() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a live keeper stopped the stream");
        tx.send(Some("lost the lease of cluster 1 to b".into())).unwrap();
        drop(tx);
        let why = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert!(why.contains("lost the lease"), "{why}");
    }
}
