//! Which rows each committed transaction changed, from WAL records: the sans-IO half of the
//! change index (`pitr find`).
//!
//! Owns two things. (1) Decoding the few record kinds the index needs from a CRC-checked record
//! (the framing, CRC check and buffering are [`crate::walreader`]'s, which calls in here when a
//! [`WalDecoder`](crate::walreader::WalDecoder) runs in changes mode): heap INSERT, DELETE,
//! UPDATE, HOT_UPDATE and TRUNCATE, heap2 MULTI_INSERT, standby RUNNING_XACTS, and the
//! subtransactions and dropped relfilelocators of commit/abort records, into [`WalEvent`]s.
//! (2) The per-transaction [`ChangeAccumulator`] that folds events into one [`CommitEntry`] per
//! committed transaction, with bounded memory and an honest [`CommitEntry::incomplete`] flag.
//!
//! It does not name tables (the WAL names relfilenodes; the catalog snapshots of `pitr find` do
//! that), and it does not store anything (`pitr-archive`'s `change_index` does).
//!
//! Relations are block reference 0's RelFileLocator. A record on a relation whose relNumber is
//! below `FirstNormalObjectId` (16384) changes a system catalog: the transaction is flagged
//! [`CommitEntry::ddl`]. Caveat: a catalog rewritten by `VACUUM FULL` gets a relfilenode above
//! that bound (DDL on it then goes unflagged, while its rows are still counted), and `ANALYZE`
//! (pg_statistic) is flagged like DDL.

use std::collections::HashMap;

/// `FirstNormalObjectId`: relfilenodes below it belong to system catalogs (as initdb made them).
pub const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

pub(crate) const RM_STANDBY_ID: u8 = 8;
pub(crate) const RM_HEAP2_ID: u8 = 9;
pub(crate) const RM_HEAP_ID: u8 = 10;
const XLOG_HEAP_OPMASK: u8 = 0x70;
const XLOG_HEAP_INSERT: u8 = 0x00;
const XLOG_HEAP_DELETE: u8 = 0x10;
const XLOG_HEAP_UPDATE: u8 = 0x20;
const XLOG_HEAP_TRUNCATE: u8 = 0x30;
const XLOG_HEAP_HOT_UPDATE: u8 = 0x40;
const XLOG_HEAP2_MULTI_INSERT: u8 = 0x50;
const XLOG_RUNNING_XACTS: u8 = 0x10;
/// `SizeOfHeapTruncate`: dbId, nrelids, flags (padded), then the relation OIDs.
const SIZE_OF_HEAP_TRUNCATE: usize = 12;

/// How many relations, dropped relfilelocators and truncated OIDs one entry keeps; past it the
/// entry says `more_relations`.
pub const MAX_RELATIONS_PER_XACT: usize = 256;
/// How many open transactions the accumulator tracks; past it, changes of new ones are not kept
/// and commits are flagged `incomplete` until the server says the lost ones ended.
pub const MAX_OPEN_XACTS: usize = 100_000;
/// How many relation and truncated-OID slots all open transactions hold together: without it,
/// [`MAX_OPEN_XACTS`] × [`MAX_RELATIONS_PER_XACT`] would allow about a gigabyte of counts (and a
/// carry no reader takes). Past it, a transaction touching a relation it has no slot for says
/// `more_relations`. About 10 MiB of memory, and a carry of a few MiB.
pub const MAX_OPEN_SLOTS: usize = 250_000;

/// A relation's storage: `RelFileLocator` (`RelFileNode` before PostgreSQL 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelFileLocator {
    /// Tablespace OID (`spcOid`).
    pub spc: u32,
    /// Database OID (`dbOid`; 0 for shared catalogs).
    pub db: u32,
    /// The relfilenode (`relNumber`).
    pub rel: u32,
}

impl RelFileLocator {
    /// Whether this is a system catalog's storage (relfilenode below 16384).
    pub fn is_catalog(&self) -> bool {
        self.rel < FIRST_NORMAL_OBJECT_ID
    }
}

/// What a heap record did to rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    /// INSERT or MULTI_INSERT.
    Insert,
    /// UPDATE or HOT_UPDATE.
    Update,
    /// DELETE.
    Delete,
}

/// One thing the changes mode of the decoder found in the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalEvent {
    /// Rows changed in one relation by transaction (or subtransaction) `xid`.
    Change {
        /// Start of the record.
        lsn: u64,
        /// `xl_xid`: possibly a subtransaction's.
        xid: u32,
        /// Block reference 0's relation.
        rel: RelFileLocator,
        /// What was done.
        op: ChangeOp,
        /// How many rows (MULTI_INSERT: `ntuples`; otherwise 1).
        rows: u32,
    },
    /// A heap TRUNCATE record (only written at `wal_level = logical`): relation OIDs, not
    /// relfilenodes.
    Truncate {
        /// Start of the record.
        lsn: u64,
        /// `xl_xid`.
        xid: u32,
        /// The database.
        db: u32,
        /// The truncated relations' OIDs.
        relids: Vec<u32>,
    },
    /// A record whose changes could not be decoded (too large to buffer, malformed): the
    /// transaction's counts are incomplete.
    Lost {
        /// Start of the record.
        lsn: u64,
        /// `xl_xid`.
        xid: u32,
    },
    /// A transaction committed (plain or prepared).
    Commit {
        /// Start of the commit record.
        lsn: u64,
        /// Just past it, MAXALIGNed.
        end_lsn: u64,
        /// The transaction (for COMMIT PREPARED, the prepared one's).
        xid: u32,
        /// `xact_time`, µs since 2000-01-01 UTC.
        timestamp: i64,
        /// Its committed subtransactions.
        subxacts: Vec<u32>,
        /// Storage dropped at commit (DROP TABLE, TRUNCATE, rewrites).
        dropped: Vec<RelFileLocator>,
        /// More relfilelocators were dropped than are listed.
        more_dropped: bool,
    },
    /// A transaction (or subtransaction) aborted.
    Abort {
        /// Start of the abort record.
        lsn: u64,
        /// The transaction.
        xid: u32,
        /// Subtransactions aborted with it.
        subxacts: Vec<u32>,
    },
    /// `XLOG_RUNNING_XACTS`: which transactions were running.
    RunningXacts {
        /// Start of the record.
        lsn: u64,
        /// The next xid to be assigned.
        next_xid: u32,
        /// The oldest still running.
        oldest_running_xid: u32,
    },
}

impl WalEvent {
    /// Where the event's record starts.
    pub fn lsn(&self) -> u64 {
        match self {
            WalEvent::Change { lsn, .. }
            | WalEvent::Truncate { lsn, .. }
            | WalEvent::Lost { lsn, .. }
            | WalEvent::Commit { lsn, .. }
            | WalEvent::Abort { lsn, .. }
            | WalEvent::RunningXacts { lsn, .. } => *lsn,
        }
    }
}

/// Whether a record of this resource manager and `xl_info` is one the changes mode buffers.
pub(crate) fn is_change_record(rmid: u8, info: u8) -> bool {
    match rmid {
        RM_HEAP_ID => matches!(
            info & XLOG_HEAP_OPMASK,
            XLOG_HEAP_INSERT | XLOG_HEAP_DELETE | XLOG_HEAP_UPDATE | XLOG_HEAP_TRUNCATE | XLOG_HEAP_HOT_UPDATE
        ),
        RM_HEAP2_ID => info & XLOG_HEAP_OPMASK == XLOG_HEAP2_MULTI_INSERT,
        RM_STANDBY_ID => info & 0xF0 == XLOG_RUNNING_XACTS,
        _ => false,
    }
}

/// Decodes a CRC-checked heap/heap2/standby record. `block0` is block reference 0's relation
/// and `main` the main data, as the record's fragment headers locate them.
pub(crate) fn decode_change(
    lsn: u64,
    xid: u32,
    rmid: u8,
    info: u8,
    block0: Option<RelFileLocator>,
    main: &[u8],
) -> Option<WalEvent> {
    let op = info & XLOG_HEAP_OPMASK;
    match rmid {
        RM_STANDBY_ID => {
            Some(WalEvent::RunningXacts { lsn, next_xid: u32_at(main, 12)?, oldest_running_xid: u32_at(main, 16)? })
        }
        RM_HEAP_ID if op == XLOG_HEAP_TRUNCATE => {
            let db = u32_at(main, 0)?;
            let n = usize::try_from(u32_at(main, 4)?).ok()?;
            let ids = main.get(SIZE_OF_HEAP_TRUNCATE..SIZE_OF_HEAP_TRUNCATE.checked_add(n.checked_mul(4)?)?)?;
            let relids = ids.chunks_exact(4).take(MAX_RELATIONS_PER_XACT).filter_map(|c| u32_at(c, 0)).collect();
            Some(WalEvent::Truncate { lsn, xid, db, relids })
        }
        RM_HEAP_ID => {
            let op = match op {
                XLOG_HEAP_INSERT => ChangeOp::Insert,
                XLOG_HEAP_DELETE => ChangeOp::Delete,
                XLOG_HEAP_UPDATE | XLOG_HEAP_HOT_UPDATE => ChangeOp::Update,
                _ => return None,
            };
            Some(WalEvent::Change { lsn, xid, rel: block0?, op, rows: 1 })
        }
        RM_HEAP2_ID if op == XLOG_HEAP2_MULTI_INSERT => {
            // xl_heap_multi_insert: uint8 flags, (pad), uint16 ntuples, offsets...
            let rows = u32::from(u16::from_le_bytes(main.get(2..4)?.try_into().ok()?));
            Some(WalEvent::Change { lsn, xid, rel: block0?, op: ChangeOp::Insert, rows })
        }
        _ => None,
    }
}

/// Reads `n` relfilelocators of 12 bytes each at `off`, at most [`MAX_RELATIONS_PER_XACT`].
pub(crate) fn locators(b: &[u8], n: usize) -> (Vec<RelFileLocator>, bool) {
    let list = b
        .chunks_exact(12)
        .take(n.min(MAX_RELATIONS_PER_XACT))
        .filter_map(|c| Some(RelFileLocator { spc: u32_at(c, 0)?, db: u32_at(c, 4)?, rel: u32_at(c, 8)? }))
        .collect();
    (list, n > MAX_RELATIONS_PER_XACT)
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

/// Row counts of one relation in one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelCounts {
    /// The relation's storage.
    pub rel: RelFileLocator,
    /// Rows inserted.
    pub inserted: u64,
    /// Rows updated.
    pub updated: u64,
    /// Rows deleted.
    pub deleted: u64,
}

/// A relation named by OID (what a TRUNCATE record names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelOid {
    /// The database.
    pub db: u32,
    /// The relation's OID.
    pub oid: u32,
}

/// One committed transaction, as the change index keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitEntry {
    /// The top-level transaction id.
    pub xid: u32,
    /// Start of the commit record: `--to lsn:<commit_lsn> --exclusive` stops just before it.
    pub commit_lsn: u64,
    /// Just past the commit record.
    pub end_lsn: u64,
    /// Commit time, µs since the Unix epoch (the primary's clock).
    pub time_us: i64,
    /// Rows changed per relation (subtransactions folded in), in first-touched order.
    pub relations: Vec<RelCounts>,
    /// More relations were touched than are listed (counts of those are not kept).
    pub more_relations: bool,
    /// Storage dropped at commit: DROP TABLE, TRUNCATE, table rewrites.
    pub dropped: Vec<RelFileLocator>,
    /// Relations a TRUNCATE record named (at `wal_level = logical` only).
    pub truncated: Vec<RelOid>,
    /// The transaction changed a system catalog (DDL).
    pub ddl: bool,
    /// Changes of this transaction may precede what was decoded (decoding started or resumed
    /// after a gap while it was running, or a record could not be decoded): counts are a floor.
    pub incomplete: bool,
}

/// A transaction still open: what it changed so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpenXact {
    /// Rows changed per relation.
    pub relations: Vec<RelCounts>,
    /// More relations than kept.
    pub more_relations: bool,
    /// TRUNCATE records' relations.
    pub truncated: Vec<RelOid>,
    /// Touched a catalog.
    pub ddl: bool,
    /// Some of its changes were not decoded.
    pub incomplete: bool,
}

impl OpenXact {
    /// Relation and truncated-OID slots held (see [`MAX_OPEN_SLOTS`]).
    fn slots(&self) -> usize {
        self.relations.len() + self.truncated.len()
    }

    /// Counts rows; `room`: a new relation may take a slot.
    fn count(&mut self, rel: RelFileLocator, op: ChangeOp, rows: u64, room: bool) {
        let i = match self.relations.iter().position(|r| r.rel == rel) {
            Some(i) => i,
            None if room && self.relations.len() < MAX_RELATIONS_PER_XACT => {
                self.relations.push(RelCounts { rel, inserted: 0, updated: 0, deleted: 0 });
                self.relations.len() - 1
            }
            None => {
                self.more_relations = true;
                return;
            }
        };
        let counts = &mut self.relations[i];
        let field = match op {
            ChangeOp::Insert => &mut counts.inserted,
            ChangeOp::Update => &mut counts.updated,
            ChangeOp::Delete => &mut counts.deleted,
        };
        *field = field.saturating_add(rows);
    }

    fn merge(&mut self, other: OpenXact) {
        // At commit, both leave the open map: the merged entry takes no budgeted slot.
        for r in other.relations {
            self.count(r.rel, ChangeOp::Insert, r.inserted, true);
            self.count(r.rel, ChangeOp::Update, r.updated, true);
            self.count(r.rel, ChangeOp::Delete, r.deleted, true);
        }
        self.more_relations |= other.more_relations;
        for t in other.truncated {
            if self.truncated.len() < MAX_RELATIONS_PER_XACT {
                self.truncated.push(t);
            } else {
                self.more_relations = true;
            }
        }
        self.ddl |= other.ddl;
        self.incomplete |= other.incomplete;
    }
}

/// Below which xid decoded changes may be missing (what decoding started or resumed after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Horizon {
    /// Decoding (re)started mid-stream and no RUNNING_XACTS seen since: any transaction may have
    /// changed rows before; every commit is `incomplete`.
    Unknown,
    /// Transactions older than this xid (RUNNING_XACTS' `nextXid`, the first seen after the
    /// start) may have changed rows before; newer ones are complete.
    Below(u32),
    /// Everything since decoding started was seen.
    Complete,
}

/// `TransactionIdPrecedes` for normal xids: modulo-2^32 comparison.
pub fn xid_precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The accumulator's whole state, as it is carried from one index object to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccumulatorState {
    /// Open transactions (and subtransactions) by xid, sorted by xid.
    pub open: Vec<(u32, OpenXact)>,
    /// See [`Horizon`].
    pub horizon: Horizon,
    /// Some: the open-transaction map overflowed; the newest xid whose changes were not kept.
    pub overflow: Option<u32>,
}

impl Default for AccumulatorState {
    fn default() -> Self {
        AccumulatorState { open: Vec::new(), horizon: Horizon::Unknown, overflow: None }
    }
}

/// Folds [`WalEvent`]s into [`CommitEntry`]s: per open xid, per relation, counts; subtransactions
/// folded into their top-level transaction at commit; aborted ones discarded.
#[derive(Debug, Clone)]
pub struct ChangeAccumulator {
    open: HashMap<u32, OpenXact>,
    horizon: Horizon,
    overflow: Option<u32>,
    max_open: usize,
    /// Slots the open transactions hold ([`MAX_OPEN_SLOTS`]).
    slots: usize,
}

impl Default for ChangeAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeAccumulator {
    /// A fresh accumulator: decoding starts mid-stream, so commits are `incomplete` until a
    /// RUNNING_XACTS record bounds what may have been missed.
    pub fn new() -> Self {
        Self::from_state(AccumulatorState::default())
    }

    /// Resumes from a carried state.
    pub fn from_state(state: AccumulatorState) -> Self {
        let open: HashMap<u32, OpenXact> = state.open.into_iter().collect();
        let slots = open.values().map(OpenXact::slots).sum();
        ChangeAccumulator { open, horizon: state.horizon, overflow: state.overflow, max_open: MAX_OPEN_XACTS, slots }
    }

    /// Removes an open transaction, giving back its slots.
    fn remove(&mut self, xid: u32) -> Option<OpenXact> {
        let x = self.open.remove(&xid)?;
        self.slots = self.slots.saturating_sub(x.slots());
        Some(x)
    }

    /// Lower the open-transaction bound (tests).
    pub fn with_max_open(mut self, max_open: usize) -> Self {
        self.max_open = max_open;
        self
    }

    /// The state to carry (deterministic: sorted by xid).
    pub fn state(&self) -> AccumulatorState {
        let mut open: Vec<(u32, OpenXact)> = self.open.iter().map(|(x, o)| (*x, o.clone())).collect();
        open.sort_by_key(|(x, _)| *x);
        AccumulatorState { open, horizon: self.horizon, overflow: self.overflow }
    }

    /// How many transactions are open.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// WAL was skipped (a gap in the input): whatever happened in it is unknown.
    pub fn lose_continuity(&mut self) {
        self.horizon = Horizon::Unknown;
    }

    fn entry(&mut self, xid: u32) -> Option<&mut OpenXact> {
        if xid == 0 {
            return None;
        }
        if !self.open.contains_key(&xid) && self.open.len() >= self.max_open {
            self.overflow = Some(match self.overflow {
                Some(x) if xid_precedes(xid, x) => x,
                _ => xid,
            });
            return None;
        }
        Some(self.open.entry(xid).or_default())
    }

    /// Takes one event; a commit appends its entry to `out`.
    pub fn push(&mut self, event: &WalEvent, out: &mut Vec<CommitEntry>) {
        match event {
            WalEvent::Change { xid, rel, op, rows, .. } => {
                let room = self.slots < MAX_OPEN_SLOTS;
                if let Some(x) = self.entry(*xid) {
                    let before = x.slots();
                    x.count(*rel, *op, u64::from(*rows), room);
                    x.ddl |= rel.is_catalog();
                    let added = x.slots() - before;
                    self.slots += added;
                }
            }
            WalEvent::Truncate { xid, db, relids, .. } => {
                let mut room = MAX_OPEN_SLOTS.saturating_sub(self.slots);
                if let Some(x) = self.entry(*xid) {
                    let before = x.slots();
                    for &oid in relids {
                        if x.truncated.len() < MAX_RELATIONS_PER_XACT && room > 0 {
                            room -= 1;
                            x.truncated.push(RelOid { db: *db, oid });
                        } else {
                            x.more_relations = true;
                        }
                    }
                    let added = x.slots() - before;
                    self.slots += added;
                }
            }
            WalEvent::Lost { xid, .. } => {
                if let Some(x) = self.entry(*xid) {
                    x.incomplete = true;
                }
            }
            WalEvent::RunningXacts { next_xid, oldest_running_xid, .. } => {
                self.horizon = match self.horizon {
                    Horizon::Unknown => Horizon::Below(*next_xid),
                    Horizon::Below(n) if !xid_precedes(*oldest_running_xid, n) => Horizon::Complete,
                    h => h,
                };
                if matches!(self.overflow, Some(x) if xid_precedes(x, *oldest_running_xid)) {
                    self.overflow = None;
                }
                // Every xid older than the oldest running one has ended (a subtransaction's xid is
                // newer than its running parent's). One still open here ended without a record
                // we saw: a crash-aborted transaction (no abort record is written), or one whose
                // commit fell in a gap. Kept, they would be carried in every later index object
                // and fill the map until every commit is flagged `incomplete` for good.
                let oldest = *oldest_running_xid;
                self.open.retain(|x, _| !xid_precedes(*x, oldest));
                self.slots = self.open.values().map(OpenXact::slots).sum();
            }
            WalEvent::Abort { xid, subxacts, .. } => {
                self.remove(*xid);
                for s in subxacts {
                    self.remove(*s);
                }
            }
            WalEvent::Commit { lsn, end_lsn, xid, timestamp, subxacts, dropped, more_dropped } => {
                let mut x = self.remove(*xid).unwrap_or_default();
                for s in subxacts {
                    if let Some(sub) = self.remove(*s) {
                        x.merge(sub);
                    }
                }
                let before_horizon = match self.horizon {
                    Horizon::Unknown => true,
                    Horizon::Below(n) => xid_precedes(*xid, n),
                    Horizon::Complete => false,
                };
                out.push(CommitEntry {
                    xid: *xid,
                    commit_lsn: *lsn,
                    end_lsn: *end_lsn,
                    time_us: crate::walreader::pg_timestamp_to_unix_micros(*timestamp),
                    relations: x.relations,
                    more_relations: x.more_relations || *more_dropped,
                    dropped: dropped.clone(),
                    truncated: x.truncated,
                    ddl: x.ddl,
                    incomplete: x.incomplete || before_horizon || self.overflow.is_some(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: RelFileLocator = RelFileLocator { spc: 1663, db: 5, rel: 16400 };
    const CAT: RelFileLocator = RelFileLocator { spc: 1663, db: 5, rel: 1259 };

    fn change(xid: u32, rel: RelFileLocator, op: ChangeOp, rows: u32) -> WalEvent {
        WalEvent::Change { lsn: 1, xid, rel, op, rows }
    }

    fn commit(xid: u32, subxacts: Vec<u32>) -> WalEvent {
        WalEvent::Commit { lsn: 100, end_lsn: 140, xid, timestamp: 0, subxacts, dropped: vec![A], more_dropped: false }
    }

    #[test]
    fn subxacts_fold_into_the_top_and_aborted_ones_vanish() {
        let mut acc =
            ChangeAccumulator::from_state(AccumulatorState { horizon: Horizon::Complete, ..Default::default() });
        let mut out = Vec::new();
        acc.push(&change(10, A, ChangeOp::Insert, 3), &mut out);
        acc.push(&change(11, A, ChangeOp::Delete, 1), &mut out);
        acc.push(&change(12, A, ChangeOp::Update, 1), &mut out);
        acc.push(&WalEvent::Abort { lsn: 50, xid: 12, subxacts: vec![] }, &mut out);
        acc.push(&change(10, CAT, ChangeOp::Insert, 1), &mut out);
        acc.push(&commit(10, vec![11, 12]), &mut out);
        assert_eq!(out.len(), 1);
        let e = &out[0];
        assert_eq!(e.relations[0], RelCounts { rel: A, inserted: 3, updated: 0, deleted: 1 });
        assert!(e.ddl && !e.incomplete);
        assert_eq!(e.dropped, vec![A]);
        assert_eq!(acc.open_count(), 0);
    }

    #[test]
    fn horizon_flags_older_transactions_until_they_are_over() {
        let mut acc = ChangeAccumulator::new();
        let mut out = Vec::new();
        acc.push(&commit(5, vec![]), &mut out);
        acc.push(&WalEvent::RunningXacts { lsn: 2, next_xid: 20, oldest_running_xid: 7 }, &mut out);
        acc.push(&commit(8, vec![]), &mut out);
        acc.push(&commit(20, vec![]), &mut out);
        acc.push(&WalEvent::RunningXacts { lsn: 3, next_xid: 30, oldest_running_xid: 21 }, &mut out);
        acc.push(&commit(9, vec![]), &mut out);
        let flags: Vec<bool> = out.iter().map(|e| e.incomplete).collect();
        assert_eq!(flags, vec![true, true, false, false]);
    }

    #[test]
    fn overflow_is_bounded_and_reported() {
        let mut acc =
            ChangeAccumulator::from_state(AccumulatorState { horizon: Horizon::Complete, ..Default::default() })
                .with_max_open(2);
        let mut out = Vec::new();
        for xid in 1..=5 {
            acc.push(&change(xid, A, ChangeOp::Insert, 1), &mut out);
        }
        assert_eq!(acc.open_count(), 2);
        acc.push(&commit(1, vec![]), &mut out);
        assert!(out[0].incomplete, "while changes were dropped every commit is suspect");
        acc.push(&WalEvent::RunningXacts { lsn: 9, next_xid: 10, oldest_running_xid: 6 }, &mut out);
        acc.push(&commit(7, vec![]), &mut out);
        assert!(!out[1].incomplete);
        // Many relations in one transaction: the first are kept.
        let mut acc =
            ChangeAccumulator::from_state(AccumulatorState { horizon: Horizon::Complete, ..Default::default() });
        for rel in 0..(MAX_RELATIONS_PER_XACT as u32 + 10) {
            acc.push(&change(3, RelFileLocator { spc: 1, db: 1, rel: 20000 + rel }, ChangeOp::Insert, 1), &mut out);
        }
        acc.push(&commit(3, vec![]), &mut out);
        let e = out.last().unwrap();
        assert!(e.more_relations && e.relations.len() == MAX_RELATIONS_PER_XACT);
    }

    /// Many open transactions with many relations each: the slots of all of them together are
    /// bounded; a transaction refused a slot says `more_relations`, and its known counts stay.
    #[test]
    fn open_relations_are_bounded_in_total() {
        let mut acc =
            ChangeAccumulator::from_state(AccumulatorState { horizon: Horizon::Complete, ..Default::default() });
        let mut out = Vec::new();
        let per = MAX_RELATIONS_PER_XACT as u32;
        let xacts = (MAX_OPEN_SLOTS as u32).div_ceil(per) + 10;
        for xid in 100..100 + xacts {
            for rel in 0..per {
                acc.push(
                    &change(xid, RelFileLocator { spc: 1, db: 1, rel: 20000 + rel }, ChangeOp::Insert, 1),
                    &mut out,
                );
            }
        }
        let held: usize = acc.state().open.iter().map(|(_, x)| x.relations.len()).sum();
        assert_eq!(held, MAX_OPEN_SLOTS);
        let last = 100 + xacts - 1;
        acc.push(&commit(last, vec![]), &mut out);
        let e = out.last().unwrap();
        assert!(e.more_relations && e.relations.is_empty(), "{e:?}");
        // Commits give slots back.
        acc.push(&commit(100, vec![]), &mut out);
        acc.push(&change(last + 1, A, ChangeOp::Insert, 1), &mut out);
        acc.push(&commit(last + 1, vec![]), &mut out);
        let e = out.last().unwrap();
        assert!(!e.more_relations && e.relations.len() == 1);
    }

    /// A transaction cut short by a server crash writes no abort record: RUNNING_XACTS' oldest
    /// running xid says it is over, and it is dropped instead of being carried (and filling the
    /// open map) for ever.
    #[test]
    fn transactions_the_server_says_are_over_are_forgotten() {
        let mut acc =
            ChangeAccumulator::from_state(AccumulatorState { horizon: Horizon::Complete, ..Default::default() })
                .with_max_open(2);
        let mut out = Vec::new();
        acc.push(&change(10, A, ChangeOp::Insert, 1), &mut out);
        acc.push(&change(11, A, ChangeOp::Insert, 1), &mut out);
        acc.push(&change(12, A, ChangeOp::Insert, 1), &mut out);
        assert_eq!(acc.open_count(), 2);
        // 10 and 11 died in a crash; 12 was not kept (overflow). The server restarts: xids go on.
        acc.push(&WalEvent::RunningXacts { lsn: 5, next_xid: 13, oldest_running_xid: 13 }, &mut out);
        assert_eq!(acc.open_count(), 0);
        acc.push(&change(13, A, ChangeOp::Delete, 1), &mut out);
        acc.push(&change(14, A, ChangeOp::Delete, 1), &mut out);
        acc.push(&commit(13, vec![]), &mut out);
        acc.push(&commit(14, vec![]), &mut out);
        assert!(out.iter().all(|e| !e.incomplete), "{out:?}");
        // A running transaction (and its subtransaction, newer than it) is kept.
        acc.push(&change(20, A, ChangeOp::Insert, 1), &mut out);
        acc.push(&change(21, A, ChangeOp::Insert, 1), &mut out);
        acc.push(&WalEvent::RunningXacts { lsn: 6, next_xid: 22, oldest_running_xid: 20 }, &mut out);
        assert_eq!(acc.open_count(), 2);
        acc.push(&commit(20, vec![21]), &mut out);
        assert_eq!(out.last().unwrap().relations[0].inserted, 2);
    }

    #[test]
    fn state_round_trips() {
        let mut acc = ChangeAccumulator::new();
        let mut out = Vec::new();
        acc.push(&change(4, A, ChangeOp::Insert, 2), &mut out);
        acc.push(&change(3, CAT, ChangeOp::Update, 1), &mut out);
        let state = acc.state();
        assert_eq!(state.open.iter().map(|(x, _)| *x).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(ChangeAccumulator::from_state(state.clone()).state(), state);
    }
}
