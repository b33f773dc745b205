//! Completeness marks from the replication stream: moments at which the archive provably held
//! everything the primary had (see `pitr_archive::complete`).
//!
//! A *claim* is (timeline, WAL end, the primary's clock) read off a message of the stream; it
//! becomes a mark once the archive durably holds the WAL up to that end. Which messages may
//! claim, and why:
//!
//! - XLogData: the walsender reads its flush pointer (the message's `wal_end`) and then takes the
//!   send time, so every transaction whose commit record had been flushed by then is in the WAL
//!   up to `wal_end`.
//! - A keepalive carries the walsender's *sent* position, which may lag its flush pointer: the
//!   walsender answers our reply request before it looks for new WAL, and it may have slept since
//!   it last looked. A keepalive therefore claims only when the next message shows the walsender
//!   looked again after it and found nothing: another keepalive at the same position with no
//!   WAL between. (Between answering two of our requests the walsender runs its send step,
//!   unless its output was blocked; we ask again only after reading the previous answer, so its
//!   output had drained, and a pause in our reading drops the pending claim.) The last XLogData
//!   must also have ended where the keepalive says (the walsender had sent all it had seen).
//!
//! Caveat, PostgreSQL's: a backend takes its commit timestamp before it inserts and flushes the
//! commit record. A backend paused between the two (the walsender read the flush pointer in
//! between) commits with a timestamp before the claim's time but a record after its WAL end.
//! Such a transaction had not been acknowledged to its client at the claim's time. A claim is
//! dropped if such a record arrives before the claim is recorded.
//!
//! Cheap: a small task writes the newest mark at most once per `complete_interval`, so the
//! stream never waits on this put; a failed put is a warning and a metric.

use std::collections::VecDeque;
use std::time::Duration;

use pitr_archive::complete::{record_pg, CompleteMark};
use pitr_archive::lease::LeaseGuard;
use pitr_archive::Repository;
use tokio::sync::watch;

use crate::pipeline::Durable;

/// Claims waiting for the archive to hold their WAL. Claims come with every XLogData; when
/// more wait, the newest is replaced, so the ones the archive reaches first stay.
const MAX_WAITING: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// A keepalive's claim, until the next message shows whether the walsender found WAL after it.
    unconfirmed: Option<CompleteMark>,
    /// Claims the stream supports, oldest first, until the archive holds their WAL.
    waiting: VecDeque<CompleteMark>,
    /// `wal_end` of the newest XLogData on this connection.
    last_wal_end: Option<u64>,
}

impl Tracker {
    /// A new replication connection (or START_REPLICATION): what the previous one said about
    /// the walsender's state does not carry over; claims it supported do.
    pub fn connection_started(&mut self) {
        self.unconfirmed = None;
        self.last_wal_end = None;
    }

    /// The timeline ended: its claims can no longer be matched against durability.
    pub fn timeline_ended(&mut self) {
        *self = Tracker::default();
    }

    /// We stopped reading (memory bound): the walsender's output may have blocked, so the next
    /// keepalive does not show that it looked for WAL again.
    pub fn paused(&mut self) {
        self.unconfirmed = None;
    }

    /// XLogData on `timeline`: `wal_end` and `send_time_us` from its header, `commits` the
    /// (end LSN, time µs) of the commit/abort records decoded from its bytes.
    pub fn on_data(&mut self, timeline: u32, wal_end: u64, send_time_us: i64, commits: &[(u64, i64)]) {
        // The walsender found WAL after the pending keepalive: that one claimed too much, or
        // cannot be told apart from one that did.
        self.unconfirmed = None;
        self.last_wal_end = Some(wal_end);
        self.waiting.retain(|c| !contradicted(c, commits));
        self.wait_for(CompleteMark { timeline, lsn: wal_end, server_time_us: send_time_us });
    }

    pub fn on_keepalive(&mut self, timeline: u32, wal_end: u64, send_time_us: i64) {
        if let Some(pending) = self.unconfirmed.take() {
            if pending.timeline == timeline && pending.lsn == wal_end {
                self.wait_for(pending);
            }
        }
        if self.last_wal_end.is_none_or(|end| end == wal_end) {
            self.unconfirmed = Some(CompleteMark { timeline, lsn: wal_end, server_time_us: send_time_us });
        }
    }

    fn wait_for(&mut self, claim: CompleteMark) {
        if let Some(last) = self.waiting.back_mut() {
            if last.timeline == claim.timeline && last.lsn == claim.lsn {
                // The same WAL end, later: the archive was complete for longer.
                last.server_time_us = last.server_time_us.max(claim.server_time_us);
                return;
            }
        }
        if self.waiting.len() >= MAX_WAITING {
            self.waiting.pop_back();
        }
        self.waiting.push_back(claim);
    }

    /// The newest claim whose WAL the archive now holds (`durable`), if any; it and every
    /// claim it covers stop waiting.
    pub fn take_durable(&mut self, durable: Durable) -> Option<CompleteMark> {
        let mut best: Option<CompleteMark> = None;
        self.waiting.retain(|c| {
            if c.timeline != durable.timeline || c.lsn > durable.lsn {
                return true;
            }
            if best.is_none_or(|b| c.server_time_us > b.server_time_us) {
                best = Some(*c);
            }
            false
        });
        best
    }
}

/// A commit at or before the claim's time whose record ends after the claim's WAL end.
fn contradicted(claim: &CompleteMark, commits: &[(u64, i64)]) -> bool {
    commits.iter().any(|&(end, time)| end > claim.lsn && time <= claim.server_time_us)
}

/// Writes the newest mark sent on `marks`, then waits `interval` before the next, until the
/// sender goes. Publishes each recorded mark on `recorded`.
pub(crate) async fn write_marks(
    repo: Repository,
    guard: LeaseGuard,
    system_id: u64,
    interval: Duration,
    mut marks: watch::Receiver<Option<CompleteMark>>,
    recorded: watch::Sender<Option<CompleteMark>>,
) {
    let mut last: Option<CompleteMark> = None;
    loop {
        if marks.changed().await.is_err() {
            return;
        }
        let Some(mark) = *marks.borrow_and_update() else { continue };
        // Clocks of different primaries are not comparable: compare within a timeline.
        if last.is_some_and(|l| l.timeline == mark.timeline && l.server_time_us >= mark.server_time_us) {
            continue;
        }
        // Written for the cluster, so through the writer lease's guard like the WAL.
        match guard.fenced(record_pg(&repo, system_id, &mark)).await {
            Ok(Ok(())) => {
                metrics::gauge!("pitr_archive_complete_time_seconds").set(mark.server_time_us as f64 / 1e6);
                recorded.send_replace(Some(mark));
                last = Some(mark);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not record a completeness mark; the next one follows");
                metrics::counter!("pitr_complete_mark_errors_total").increment(1);
            }
            Err(e) => {
                if guard.lost_to().is_some() {
                    return;
                }
                tracing::warn!(error = %e, "could not record a completeness mark under the writer lease; the next one follows");
                metrics::counter!("pitr_complete_mark_errors_total").increment(1);
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn durable(timeline: u32, lsn: u64) -> Durable {
        Durable { timeline, lsn, last_commit_us: None }
    }

    fn mark(lsn: u64, time: i64) -> Option<CompleteMark> {
        Some(CompleteMark { timeline: 1, lsn, server_time_us: time })
    }

    #[test]
    fn data_claims_wait_for_durability() {
        let mut t = Tracker::default();
        t.on_data(1, 0x300, 10, &[(0x100, 5)]);
        t.on_data(1, 0x500, 20, &[]);
        assert_eq!(t.take_durable(durable(1, 0x200)), None);
        assert_eq!(t.take_durable(durable(1, 0x300)), mark(0x300, 10));
        assert_eq!(t.take_durable(durable(2, 0x900)), None, "another timeline's durability");
        assert_eq!(t.take_durable(durable(1, 0x900)), mark(0x500, 20));
        assert_eq!(t.take_durable(durable(1, 0x900)), None);
    }

    #[test]
    fn a_keepalive_claims_only_once_the_next_one_shows_nothing_new() {
        let mut t = Tracker::default();
        t.on_data(1, 0x300, 10, &[]);
        assert_eq!(t.take_durable(durable(1, 0x300)), mark(0x300, 10));
        t.on_keepalive(1, 0x300, 20);
        assert_eq!(t.take_durable(durable(1, 0x300)), None, "unconfirmed");
        t.on_keepalive(1, 0x300, 30);
        assert_eq!(t.take_durable(durable(1, 0x300)), mark(0x300, 20));

        // WAL after the keepalive: it may have claimed what the walsender had not looked at.
        t.on_data(1, 0x400, 35, &[]);
        t.take_durable(durable(1, 0x400));
        t.on_keepalive(1, 0x400, 40);
        t.on_data(1, 0x480, 41, &[]);
        t.on_keepalive(1, 0x480, 50);
        assert_eq!(t.take_durable(durable(1, 0x480)), mark(0x480, 41));

        // A keepalive behind the last XLogData's end: the walsender was still sending.
        t.on_data(1, 0x600, 60, &[]);
        t.on_keepalive(1, 0x580, 61);
        t.on_keepalive(1, 0x580, 62);
        assert_eq!(t.take_durable(durable(1, 0x600)), mark(0x600, 60));

        // Reading paused between two keepalives: not confirmed.
        t.on_keepalive(1, 0x600, 70);
        t.paused();
        t.on_keepalive(1, 0x600, 80);
        assert_eq!(t.take_durable(durable(1, 0x600)), None);
        t.on_keepalive(1, 0x600, 90);
        assert_eq!(t.take_durable(durable(1, 0x600)), mark(0x600, 80));

        // A new connection: the first keepalive needs its successor too.
        t.connection_started();
        t.on_keepalive(1, 0x600, 100);
        assert_eq!(t.take_durable(durable(1, 0x600)), None);
        t.on_keepalive(1, 0x600, 110);
        assert_eq!(t.take_durable(durable(1, 0x600)), mark(0x600, 100));
    }

    #[test]
    fn a_commit_after_the_end_but_not_after_the_time_drops_the_claim() {
        let mut t = Tracker::default();
        t.on_data(1, 0x300, 10, &[]);
        // A backend that took its timestamp (9) before the claim's time but flushed after.
        t.on_data(1, 0x400, 20, &[(0x320, 9), (0x380, 15)]);
        assert_eq!(t.take_durable(durable(1, 0x300)), None);
        assert_eq!(t.take_durable(durable(1, 0x400)), mark(0x400, 20));
    }

    #[test]
    fn waiting_claims_are_bounded_and_timelines_reset() {
        let mut t = Tracker::default();
        for i in 1..=200 {
            t.on_data(1, i * 0x100, i as i64, &[]);
        }
        assert_eq!(t.waiting.len(), MAX_WAITING);
        assert_eq!(t.take_durable(durable(1, 0x100)), mark(0x100, 1));
        assert_eq!(t.take_durable(durable(1, 200 * 0x100)), mark(200 * 0x100, 200));
        t.on_data(1, 0x10000, 300, &[]);
        t.timeline_ended();
        assert_eq!(t.take_durable(durable(1, 0x10000)), None);
    }
}
