//! Sans-IO PostgreSQL WAL reader.
//!
//! Owns the framing of raw WAL bytes — page headers, records that cross page and segment
//! boundaries, resynchronisation after gaps, switches and garbage — and the decoding of
//! transaction commit/abort records into [`XactRecord`]s (xid and commit timestamp) and of
//! restore points (`pg_create_restore_point`) into [`RestorePointRecord`]s. It does no I/O:
//! callers push bytes as they arrive, in any chunking, with [`WalDecoder::feed`] (or
//! [`WalDecoder::feed_all`] to get restore points too).
//!
//! Layouts follow PostgreSQL 14–18 on little-endian 64-bit platforms (MAXALIGN = 8):
//! `XLogPageHeaderData`/`XLogLongPageHeaderData` (`xlog_internal.h`), `XLogRecord` and the
//! block/data fragment headers (`xlogrecord.h`), `xl_xact_commit`/`xl_xact_abort` with
//! their `xinfo` sub-records (`xact.h`), and `xl_restore_point` (`xlog_internal.h`).

use std::fmt;

use tracing::{debug, warn};

use crate::changes::{self, RelFileLocator, WalEvent};

/// Oldest WAL page magic this reader is written for (PostgreSQL 14).
///
/// `XLOG_PAGE_MAGIC` changes whenever the WAL format changes. Released values:
/// PG14 `0xD10D`, PG15 `0xD110`, PG16 `0xD113`, PG17 `0xD116`, PG18 `0xD118`.
/// Unknown magics are not rejected: any magic >= [`XLOG_PAGE_MAGIC_ACCEPT_MIN`] on a page
/// whose `xlp_pageaddr` matches its position is accepted, and version-dependent layouts are
/// chosen by comparing against the per-version constants below.
pub const XLOG_PAGE_MAGIC_MIN: u16 = XLOG_PAGE_MAGIC_PG14;
/// `XLOG_PAGE_MAGIC` of PostgreSQL 14.
pub const XLOG_PAGE_MAGIC_PG14: u16 = 0xD10D;
/// `XLOG_PAGE_MAGIC` of PostgreSQL 15 (new `bimg_info` compression flags).
pub const XLOG_PAGE_MAGIC_PG15: u16 = 0xD110;
/// `XLOG_PAGE_MAGIC` of PostgreSQL 16.
pub const XLOG_PAGE_MAGIC_PG16: u16 = 0xD113;
/// `XLOG_PAGE_MAGIC` of PostgreSQL 17.
pub const XLOG_PAGE_MAGIC_PG17: u16 = 0xD116;
/// `XLOG_PAGE_MAGIC` of PostgreSQL 18 (64-bit object ids in dropped-stats items).
pub const XLOG_PAGE_MAGIC_PG18: u16 = 0xD118;
/// Smallest page magic accepted as a WAL page at all.
pub const XLOG_PAGE_MAGIC_ACCEPT_MIN: u16 = 0xD101;

/// PostgreSQL's default `XLOG_BLCKSZ`.
pub const DEFAULT_PAGE_SIZE: u64 = 8192;
/// PostgreSQL's default `wal_segment_size`.
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;
/// Largest record the decoder buffers; larger transaction records are skipped with a warning.
pub const MAX_BUFFERED_RECORD_LEN: u32 = 64 * 1024 * 1024;
/// Largest heap/heap2/standby record the changes mode buffers (a heap record is a few blocks
/// with their full-page images at most); a larger one is reported as [`WalEvent::Lost`].
pub const MAX_CHANGE_RECORD_LEN: u32 = 1024 * 1024;

const SIZE_OF_SHORT_PHD: usize = 24;
const SIZE_OF_LONG_PHD: usize = 40;
const SIZE_OF_XLOG_RECORD: usize = 24;
/// Offset of `xl_crc` in `XLogRecord`; the CRC covers the header only up to here.
const XLOG_RECORD_CRC_OFFSET: usize = 20;
/// No supported version can produce a record this large; a bigger `xl_tot_len` is garbage.
const XLOG_RECORD_MAX_SIZE: u32 = 1024 * 1024 * 1024;
const MAXALIGN: u64 = 8;

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
/// PG14–18 set `XLP_BKP_REMOVABLE` (0x0004) on most pages and mark overwrite-contrecord
/// pages with 0x0008. PostgreSQL development after 18 (magic 0xD120) dropped
/// `XLP_BKP_REMOVABLE` and renumbered the overwrite flag to 0x0004, so the bit's meaning
/// depends on the page magic; see [`overwrite_contrecord_flag`].
const XLP_FIRST_IS_OVERWRITE_CONTRECORD_PG14: u16 = 0x0008;
const XLP_FIRST_IS_OVERWRITE_CONTRECORD_PG19: u16 = 0x0004;
const XLOG_PAGE_MAGIC_PG19_DEVEL: u16 = 0xD120;
/// Union of the flag bits defined by any supported version.
const XLP_ALL_FLAGS: u16 = 0x000F;

const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const XLR_RMGR_INFO_MASK: u8 = 0xF0;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;
/// `MAXFNAMELEN`: the size of `xl_restore_point.rp_name`, its NUL included.
pub const RESTORE_POINT_NAME_LEN: usize = 64;
/// `sizeof(xl_restore_point)`: TimestampTz rp_time, then char rp_name[MAXFNAMELEN].
const SIZE_OF_RESTORE_POINT: usize = 8 + RESTORE_POINT_NAME_LEN;

const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_HAS_INFO: u8 = 0x80;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;

const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILELOCATORS: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
const XACT_XINFO_HAS_ORIGIN: u32 = 1 << 5;
const XACT_XINFO_HAS_GID: u32 = 1 << 7;
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

const SIZE_OF_DBINFO: usize = 8;
const SIZE_OF_RELFILELOCATOR: usize = 12;
const SIZE_OF_INVAL_MSG: usize = 16;
const SIZE_OF_XACT_ORIGIN: usize = 16;
/// `xl_xact_stats_item` is {kind, dboid, objoid} before PG18 and {kind, dboid, objid_lo,
/// objid_hi} from PG18 on.
const SIZE_OF_STATS_ITEM_PRE18: usize = 12;
const SIZE_OF_STATS_ITEM_PG18: usize = 16;

const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// PG14 and older: a single "compressed" bit.
const BKPIMAGE_IS_COMPRESSED_PG14: u8 = 0x02;
/// PG15+: one bit per method (pglz 0x04, lz4 0x08, zstd 0x10).
const BKPIMAGE_COMPRESSED_MASK_PG15: u8 = 0x04 | 0x08 | 0x10;

/// Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Which transaction-end record was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XactKind {
    /// `XLOG_XACT_COMMIT`: a transaction committed.
    Commit,
    /// `XLOG_XACT_ABORT`: a transaction rolled back.
    Abort,
    /// `XLOG_XACT_COMMIT_PREPARED`: a prepared (two-phase) transaction committed.
    CommitPrepared,
    /// `XLOG_XACT_ABORT_PREPARED`: a prepared (two-phase) transaction rolled back.
    AbortPrepared,
}

/// A transaction commit or abort found in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XactRecord {
    /// Start LSN of the record.
    pub lsn: u64,
    /// LSN just past the record, MAXALIGNed like PostgreSQL's `EndRecPtr` (so it may equal
    /// the next page boundary rather than the first byte of the next record).
    pub end_lsn: u64,
    /// The transaction id. For plain commits/aborts this is the record's `xl_xid`; for
    /// COMMIT PREPARED / ABORT PREPARED it is the prepared transaction's xid taken from the
    /// record's two-phase sub-record (the header's `xl_xid` belongs to the session running
    /// the command, usually 0), falling back to `xl_xid` only if that cannot be parsed.
    pub xid: u32,
    /// Which of the transaction-end records this is.
    pub kind: XactKind,
    /// `xact_time`: microseconds since 2000-01-01 00:00:00 UTC, as stored in the record.
    pub timestamp: i64,
}

/// A restore point (`XLOG_RESTORE_POINT`, written by `pg_create_restore_point`) found in the
/// WAL: what `recovery_target_name` stops after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePointRecord {
    /// Start LSN of the record.
    pub lsn: u64,
    /// LSN just past the record, MAXALIGNed: what `pg_create_restore_point` returns.
    pub end_lsn: u64,
    /// `rp_time`: microseconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: i64,
    /// `rp_name` up to its NUL, as bytes (the server's encoding; at most 63 bytes).
    pub name: Vec<u8>,
}

/// Convert a PostgreSQL timestamp (µs since 2000-01-01 UTC) to µs since the Unix epoch.
pub fn pg_timestamp_to_unix_micros(ts: i64) -> i64 {
    // Saturating keeps PostgreSQL's ±infinity sentinels (i64::MIN/MAX) at the extremes.
    ts.saturating_add(PG_EPOCH_OFFSET_MICROS)
}

/// Convert µs since the Unix epoch to a PostgreSQL timestamp (µs since 2000-01-01 UTC).
pub fn unix_micros_to_pg_timestamp(us: i64) -> i64 {
    us.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// Framing state: where in the page structure the next byte lies.
#[derive(Debug)]
enum Phase {
    /// Not synchronised (or skipping switch padding): discard `remaining` raw bytes, then
    /// read the page header found there.
    Seek { remaining: u64 },
    /// At a page boundary, gathering the page header (24 bytes, or 40 for a long header).
    PageHeader { buf: [u8; SIZE_OF_LONG_PHD], have: usize },
    /// Inside a page's data area; `Rec` says what the bytes belong to.
    Body,
}

/// Record state: what the next data-area byte belongs to.
#[derive(Debug)]
enum Rec {
    /// Between records: skip alignment padding, then a record header starts.
    Between,
    /// Gathering a record header (which may itself be split across pages).
    Header { start: u64, buf: [u8; SIZE_OF_XLOG_RECORD], have: usize },
    /// Buffering a whole record we want to decode (transaction end or XLOG_SWITCH).
    Keep { start: u64, tot_len: usize, buf: Vec<u8> },
    /// Discarding the rest of a record: one we do not care about (`start` is where it began),
    /// or the tail of one that began before we synchronised (`start` is `None`).
    Skip { start: Option<u64>, remaining: u64 },
}

/// The fixed `XLogRecord` header.
#[derive(Debug, Clone, Copy)]
struct RecordHeader {
    tot_len: u32,
    xid: u32,
    prev: u64,
    info: u8,
    rmid: u8,
    crc: u32,
}

impl RecordHeader {
    fn parse(b: &[u8; SIZE_OF_XLOG_RECORD]) -> Self {
        RecordHeader {
            tot_len: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            xid: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            prev: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            info: b[16],
            rmid: b[17],
            crc: u32::from_le_bytes([b[20], b[21], b[22], b[23]]),
        }
    }

    fn is_switch(&self) -> bool {
        self.rmid == RM_XLOG_ID && self.info & XLR_RMGR_INFO_MASK == XLOG_SWITCH
    }

    fn is_restore_point(&self) -> bool {
        self.rmid == RM_XLOG_ID && self.info & XLR_RMGR_INFO_MASK == XLOG_RESTORE_POINT
    }

    fn xact_kind(&self) -> Option<XactKind> {
        if self.rmid != RM_XACT_ID {
            return None;
        }
        match self.info & XLOG_XACT_OPMASK {
            XLOG_XACT_COMMIT => Some(XactKind::Commit),
            XLOG_XACT_ABORT => Some(XactKind::Abort),
            XLOG_XACT_COMMIT_PREPARED => Some(XactKind::CommitPrepared),
            XLOG_XACT_ABORT_PREPARED => Some(XactKind::AbortPrepared),
            _ => None,
        }
    }
}

/// Where decoded records go during one feed.
struct Sink<'a> {
    xacts: &'a mut Vec<XactRecord>,
    restore_points: &'a mut Vec<RestorePointRecord>,
    /// Changes mode: commits, aborts and row changes go here instead of `xacts`.
    events: Option<&'a mut Vec<WalEvent>>,
}

/// Incremental decoder of a WAL byte stream into transaction commit/abort records.
///
/// Only the record currently being decoded is buffered, and only if it is a transaction-end
/// or XLOG_SWITCH record; everything else is skipped as it streams past. Buffered records are
/// CRC-checked before anything is reported, so a reported commit is a real one.
pub struct WalDecoder {
    segment_size: u64,
    page_size: u64,
    /// LSN of the next byte expected; meaningful only when `started`.
    pos: u64,
    started: bool,
    phase: Phase,
    rec: Rec,
    /// Start of the last record whose header was accepted, to check the next `xl_prev`.
    prev: Option<u64>,
    /// Magic of the most recent valid page header; selects version-dependent layouts.
    magic: u16,
    /// Changes mode ([`WalDecoder::with_changes`]): heap records are buffered and decoded too.
    changes: bool,
}

impl fmt::Debug for WalDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match &self.phase {
            Phase::Seek { .. } => "seek",
            Phase::PageHeader { .. } => "page-header",
            Phase::Body => "body",
        };
        f.debug_struct("WalDecoder")
            .field("segment_size", &self.segment_size)
            .field("page_size", &self.page_size)
            .field("position", &self.position())
            .field("phase", &phase)
            .field("magic", &format_args!("{:#06X}", self.magic))
            .finish()
    }
}

impl Default for WalDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_SEGMENT_SIZE, DEFAULT_PAGE_SIZE)
    }
}

impl WalDecoder {
    /// Create a decoder for a cluster with the given `wal_segment_size` and `XLOG_BLCKSZ`.
    ///
    /// The page size must be a power of two between 1 KiB and 64 KiB and the segment size a
    /// power of two between the page size and 1 GiB (PostgreSQL's own limits, except that
    /// segments smaller than 1 MiB are allowed for tests). Invalid values are replaced by the
    /// defaults with a warning rather than panicking.
    pub fn new(segment_size: u64, page_size: u64) -> Self {
        let page_size = if page_size.is_power_of_two() && (1024..=65536).contains(&page_size) {
            page_size
        } else {
            warn!(page_size, "invalid WAL page size; using {DEFAULT_PAGE_SIZE}");
            DEFAULT_PAGE_SIZE
        };
        let segment_size = if segment_size.is_power_of_two() && segment_size >= page_size && segment_size <= 1 << 30 {
            segment_size
        } else {
            warn!(segment_size, "invalid WAL segment size; using {DEFAULT_SEGMENT_SIZE}");
            DEFAULT_SEGMENT_SIZE
        };
        WalDecoder {
            segment_size,
            page_size,
            pos: 0,
            started: false,
            phase: Phase::Seek { remaining: 0 },
            rec: Rec::Between,
            prev: None,
            magic: XLOG_PAGE_MAGIC_MIN,
            changes: false,
        }
    }

    /// A decoder in changes mode: [`feed_events`](Self::feed_events) also reports row changes
    /// (heap/heap2 records), RUNNING_XACTS, and the subtransactions and dropped relations of
    /// commits, for the change index. It buffers and CRC-checks every heap record, so it costs
    /// more than [`feed`](Self::feed) on a decoder made by [`new`](Self::new), which is unchanged.
    pub fn with_changes(segment_size: u64, page_size: u64) -> Self {
        let mut d = Self::new(segment_size, page_size);
        d.changes = true;
        d
    }

    /// Where the next record not yet completely decoded starts (or, between records, the next
    /// byte): a decoder started afresh at this LSN's page and ignoring events before it sees
    /// exactly the records this one has not reported yet. `None` before the first feed.
    pub fn record_boundary(&self) -> Option<u64> {
        if !self.started {
            return None;
        }
        Some(match (&self.phase, &self.rec) {
            (Phase::Seek { .. }, _) => self.pos,
            (_, Rec::Header { start, .. } | Rec::Keep { start, .. } | Rec::Skip { start: Some(start), .. }) => *start,
            _ => self.pos,
        })
    }

    /// Changes mode: feed WAL bytes that begin at `lsn` (as [`feed`](Self::feed)) and collect
    /// the [`WalEvent`]s completed by them. On a decoder not in changes mode only commits and
    /// aborts (without subtransactions or dropped relations) are reported.
    pub fn feed_events(&mut self, lsn: u64, data: &[u8], events: &mut Vec<WalEvent>) {
        let (mut xacts, mut points) = (Vec::new(), Vec::new());
        self.feed_sink(lsn, data, &mut Sink { xacts: &mut xacts, restore_points: &mut points, events: Some(events) });
    }

    /// The LSN the next [`feed`](Self::feed) must start at to be contiguous, if any.
    pub fn position(&self) -> Option<u64> {
        self.started.then_some(self.pos)
    }

    /// Whether the decoder is following the WAL structure, as opposed to skipping raw bytes
    /// towards the next page boundary (before the first page header, after a gap or garbage)
    /// or towards the next segment (after an XLOG_SWITCH).
    pub fn is_synced(&self) -> bool {
        self.started && !matches!(self.phase, Phase::Seek { .. })
    }

    /// Feed WAL bytes that begin at `lsn`. Feeds must be contiguous; a feed that does not
    /// start where the previous one ended resets the decoder and resynchronises at the next
    /// page boundary (or at `lsn` itself if it is a page boundary).
    pub fn feed(&mut self, lsn: u64, data: &[u8], out: &mut Vec<XactRecord>) {
        self.feed_all(lsn, data, out, &mut Vec::new());
    }

    /// As [`feed`](Self::feed), also collecting the restore points completed by these bytes.
    pub fn feed_all(
        &mut self,
        lsn: u64,
        data: &[u8],
        xacts: &mut Vec<XactRecord>,
        restore_points: &mut Vec<RestorePointRecord>,
    ) {
        self.feed_sink(lsn, data, &mut Sink { xacts, restore_points, events: None });
    }

    fn feed_sink(&mut self, lsn: u64, data: &[u8], out: &mut Sink<'_>) {
        if !self.started || self.pos != lsn {
            if self.started {
                debug!(expected = self.pos, got = lsn, "non-contiguous WAL feed; resynchronising");
            }
            self.restart_at(lsn);
        }
        let mut rest = data;
        let mut stalls = 0u32;
        while !rest.is_empty() {
            let n = self.step(rest, out);
            if n == 0 {
                // Zero-byte steps are state transitions that always lead to a consuming
                // state; more than a few in a row would mean a bug, so never spin on it.
                stalls += 1;
                debug_assert!(stalls <= 4, "WAL decoder made no progress");
                if stalls > 4 {
                    self.pos = self.pos.wrapping_add(1);
                    rest = rest.get(1..).unwrap_or_default();
                    self.lose_sync();
                    stalls = 0;
                }
                continue;
            }
            stalls = 0;
            rest = rest.get(n..).unwrap_or_default();
        }
    }

    /// Forget all state; the next feed starts unsynchronised at whatever LSN it carries.
    pub fn reset(&mut self) {
        self.started = false;
        self.pos = 0;
        self.phase = Phase::Seek { remaining: 0 };
        self.rec = Rec::Between;
        self.prev = None;
    }

    fn restart_at(&mut self, lsn: u64) {
        self.started = true;
        self.pos = lsn;
        self.lose_sync();
    }

    /// Abandon the current record and wait for the next page boundary (immediately if we
    /// are on one). Record starts can only be found from a page header's `xlp_rem_len`.
    fn lose_sync(&mut self) {
        self.rec = Rec::Between;
        self.prev = None;
        self.phase = Phase::Seek { remaining: bytes_to_boundary(self.pos, self.page_size) };
    }

    /// Consume some prefix of `data` (possibly nothing, for a pure state transition).
    fn step(&mut self, data: &[u8], out: &mut Sink<'_>) -> usize {
        match &mut self.phase {
            Phase::Seek { remaining } => {
                if *remaining == 0 {
                    self.phase = Phase::PageHeader { buf: [0; SIZE_OF_LONG_PHD], have: 0 };
                    return 0;
                }
                let n = clamp_len(*remaining, data.len());
                *remaining -= n as u64;
                self.pos = self.pos.wrapping_add(n as u64);
                n
            }
            Phase::PageHeader { buf, have } => {
                let want = page_header_len(buf, *have);
                let n = want.saturating_sub(*have).min(data.len());
                let (Some(dst), Some(src)) = (buf.get_mut(*have..*have + n), data.get(..n)) else {
                    return 0;
                };
                dst.copy_from_slice(src);
                *have += n;
                self.pos = self.pos.wrapping_add(n as u64);
                let (hdr, have) = (*buf, *have);
                if have == page_header_len(&hdr, have) {
                    self.on_page_header(&hdr, have);
                }
                n
            }
            Phase::Body => self.step_body(data, out),
        }
    }

    fn step_body(&mut self, data: &[u8], out: &mut Sink<'_>) -> usize {
        let to_page_end = self.page_size - (self.pos & (self.page_size - 1));
        let avail = clamp_len(to_page_end, data.len());
        let chunk = data.get(..avail).unwrap_or_default();
        let n = match &mut self.rec {
            Rec::Between => {
                let pad = self.pos.wrapping_neg() & (MAXALIGN - 1);
                if pad == 0 {
                    self.rec = Rec::Header { start: self.pos, buf: [0; SIZE_OF_XLOG_RECORD], have: 0 };
                    return 0;
                }
                // Alignment padding; it is zeros in practice but nothing depends on that.
                let n = clamp_len(pad, avail);
                self.pos = self.pos.wrapping_add(n as u64);
                n
            }
            Rec::Header { start, buf, have } => {
                let n = (SIZE_OF_XLOG_RECORD - *have).min(avail);
                let (Some(dst), Some(src)) = (buf.get_mut(*have..*have + n), chunk.get(..n)) else {
                    return 0;
                };
                dst.copy_from_slice(src);
                *have += n;
                self.pos = self.pos.wrapping_add(n as u64);
                let (start, hdr, have) = (*start, *buf, *have);
                self.on_record_header_bytes(start, &hdr, have, out);
                n
            }
            Rec::Keep { tot_len, buf, .. } => {
                let n = tot_len.saturating_sub(buf.len()).min(avail);
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                self.pos = self.pos.wrapping_add(n as u64);
                if buf.len() >= *tot_len {
                    if let Rec::Keep { start, buf, .. } = std::mem::replace(&mut self.rec, Rec::Between) {
                        self.finish_record(start, &buf, out);
                    }
                }
                n
            }
            Rec::Skip { remaining, .. } => {
                let n = clamp_len(*remaining, avail);
                *remaining -= n as u64;
                self.pos = self.pos.wrapping_add(n as u64);
                if *remaining == 0 {
                    self.rec = Rec::Between;
                }
                n
            }
        };
        if n > 0 && matches!(self.phase, Phase::Body) && self.pos & (self.page_size - 1) == 0 {
            self.phase = Phase::PageHeader { buf: [0; SIZE_OF_LONG_PHD], have: 0 };
        }
        n
    }

    fn on_page_header(&mut self, hdr: &[u8; SIZE_OF_LONG_PHD], len: usize) {
        let page_lsn = self.pos.wrapping_sub(len as u64);
        let magic = u16::from_le_bytes([hdr[0], hdr[1]]);
        let info = u16::from_le_bytes([hdr[2], hdr[3]]);
        let pageaddr = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
        let rem_len = u32::from_le_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
        let is_long = info & XLP_LONG_HEADER != 0;
        let segment_start = page_lsn & (self.segment_size - 1) == 0;

        let mut valid = magic >= XLOG_PAGE_MAGIC_ACCEPT_MIN
            && info & !XLP_ALL_FLAGS == 0
            && pageaddr == page_lsn
            && (is_long || !segment_start);
        if valid && is_long {
            let seg_size = u32::from_le_bytes([hdr[32], hdr[33], hdr[34], hdr[35]]);
            let blcksz = u32::from_le_bytes([hdr[36], hdr[37], hdr[38], hdr[39]]);
            if u64::from(seg_size) != self.segment_size || u64::from(blcksz) != self.page_size {
                warn!(
                    page_lsn,
                    wal_seg_size = seg_size,
                    wal_block_size = blcksz,
                    configured_seg_size = self.segment_size,
                    configured_block_size = self.page_size,
                    "WAL long page header disagrees with the configured sizes; ignoring page"
                );
                valid = false;
            }
        }
        if !valid {
            debug!(page_lsn, "no valid WAL page header; waiting for the next page");
            self.lose_sync();
            return;
        }

        self.magic = magic;
        self.phase = Phase::Body;
        // An overwrite-contrecord page replaces a record that was never completed: whatever
        // we had of it is void, and records start right after this header.
        let contrec = info & XLP_FIRST_IS_CONTRECORD != 0 && info & overwrite_contrecord_flag(magic) == 0;
        // None: no record in progress. Some(n): a record is in progress and the page should
        // continue it with n bytes left (None if that count cannot be known).
        let expected: Option<Option<u64>> = match &self.rec {
            Rec::Between => None,
            Rec::Header { have: 0, .. } => None,
            Rec::Header { buf, have, .. } => Some(if *have >= 4 {
                let tot_len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                u64::from(tot_len).checked_sub(*have as u64)
            } else {
                None
            }),
            Rec::Keep { tot_len, buf, .. } => Some(tot_len.checked_sub(buf.len()).map(|r| r as u64)),
            Rec::Skip { remaining, .. } => Some(Some(*remaining)),
        };
        match expected {
            None => {
                if contrec {
                    // Either we are resynchronising, or we believed the previous record
                    // ended before this page: in both cases the chain is broken here.
                    self.prev = None;
                }
                self.resume_after_header(contrec, rem_len);
            }
            Some(Some(remaining)) if contrec && u64::from(rem_len) == remaining => {}
            Some(_) => {
                debug!(page_lsn, rem_len, "WAL continuation does not match the partial record; discarding it");
                self.prev = None;
                self.resume_after_header(contrec, rem_len);
            }
        }
    }

    /// After a page header that does not continue our record: skip the tail of whatever
    /// record it continues, and start decoding at the next record.
    fn resume_after_header(&mut self, contrec: bool, rem_len: u32) {
        self.rec = if contrec && rem_len > 0 {
            Rec::Skip { start: None, remaining: u64::from(rem_len) }
        } else {
            Rec::Between
        };
    }

    fn on_record_header_bytes(&mut self, start: u64, hdr: &[u8; SIZE_OF_XLOG_RECORD], have: usize, out: &mut Sink<'_>) {
        if have < 4 {
            return;
        }
        let tot_len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        if (tot_len as usize) < SIZE_OF_XLOG_RECORD || tot_len > XLOG_RECORD_MAX_SIZE {
            // Zeroes (end of written WAL, padding) or garbage: nothing more on this page.
            debug!(lsn = start, tot_len, "no WAL record here; waiting for the next page");
            self.lose_sync();
            return;
        }
        if have < SIZE_OF_XLOG_RECORD {
            return;
        }
        let header = RecordHeader::parse(hdr);
        let prev_ok = match self.prev {
            Some(prev) => header.prev == prev,
            None => header.prev < start,
        };
        if !prev_ok {
            debug!(lsn = start, xl_prev = header.prev, "WAL record with a broken prev-link; waiting for the next page");
            self.lose_sync();
            return;
        }
        self.prev = Some(start);

        let body = u64::from(header.tot_len) - SIZE_OF_XLOG_RECORD as u64;
        let change = self.changes && changes::is_change_record(header.rmid, header.info);
        let wanted = header.is_switch() || header.xact_kind().is_some() || header.is_restore_point() || change;
        let cap = if change { MAX_CHANGE_RECORD_LEN } else { MAX_BUFFERED_RECORD_LEN };
        if wanted && tot_len <= cap {
            let mut buf = Vec::with_capacity((tot_len as usize).min(64 * 1024));
            buf.extend_from_slice(hdr);
            if body == 0 {
                self.rec = Rec::Between;
                self.finish_record(start, &buf, out);
            } else {
                self.rec = Rec::Keep { start, tot_len: tot_len as usize, buf };
            }
            return;
        }
        if change {
            // Not CRC-checked (not buffered): at worst an xid is wrongly marked incomplete.
            if let Some(events) = out.events.as_deref_mut() {
                events.push(WalEvent::Lost { lsn: start, xid: header.xid });
            }
        } else if wanted {
            warn!(lsn = start, tot_len, "transaction WAL record larger than the buffering cap; skipping it");
        }
        self.rec = if body == 0 { Rec::Between } else { Rec::Skip { start: Some(start), remaining: body } };
    }

    /// A wanted record is complete (its last byte was just consumed).
    fn finish_record(&mut self, start: u64, rec: &[u8], out: &mut Sink<'_>) {
        let Some(hdr_bytes) =
            rec.get(..SIZE_OF_XLOG_RECORD).and_then(|h| <[u8; SIZE_OF_XLOG_RECORD]>::try_from(h).ok())
        else {
            self.lose_sync();
            return;
        };
        let header = RecordHeader::parse(&hdr_bytes);
        if record_crc(rec) != Some(header.crc) {
            warn!(lsn = start, "WAL record CRC mismatch; resynchronising");
            self.lose_sync();
            return;
        }
        if header.is_switch() {
            // The rest of the segment is padding; the next record is on the next segment.
            self.rec = Rec::Between;
            self.phase = Phase::Seek { remaining: bytes_to_boundary(self.pos, self.segment_size) };
            return;
        }
        let end_lsn = align_up(self.pos);
        if header.is_restore_point() {
            match decode_restore_point(rec, self.magic) {
                Some((timestamp, name)) => {
                    out.restore_points.push(RestorePointRecord { lsn: start, end_lsn, timestamp, name })
                }
                None => warn!(lsn = start, "malformed restore point WAL record; skipping it"),
            }
            return;
        }
        if let Some(events) = out.events.as_deref_mut() {
            if header.xact_kind().is_none() {
                let decoded = record_parts(rec, self.magic).and_then(|(block0, main)| {
                    changes::decode_change(start, header.xid, header.rmid, header.info, block0, main)
                });
                match decoded {
                    Some(event) => events.push(event),
                    None if header.xid != 0 => events.push(WalEvent::Lost { lsn: start, xid: header.xid }),
                    None => {}
                }
                return;
            }
            match decode_xact(rec, &header, self.magic) {
                Some((kind, xid, timestamp)) => {
                    let details = xact_details(rec, self.magic);
                    if details.is_none() {
                        // Its subtransactions (and their changes) are unknown: counts are a floor.
                        events.push(WalEvent::Lost { lsn: start, xid });
                    }
                    let (subxacts, dropped, more_dropped) = details.unwrap_or_default();
                    events.push(match kind {
                        XactKind::Commit | XactKind::CommitPrepared => {
                            WalEvent::Commit { lsn: start, end_lsn, xid, timestamp, subxacts, dropped, more_dropped }
                        }
                        XactKind::Abort | XactKind::AbortPrepared => WalEvent::Abort { lsn: start, xid, subxacts },
                    });
                }
                None => warn!(lsn = start, "malformed transaction WAL record; skipping it"),
            }
            return;
        }
        if header.xact_kind().is_none() {
            // A change record buffered by a changes-mode decoder fed through `feed`: not asked for.
            return;
        }
        match decode_xact(rec, &header, self.magic) {
            Some((kind, xid, timestamp)) => out.xacts.push(XactRecord { lsn: start, end_lsn, xid, kind, timestamp }),
            None => warn!(lsn = start, "malformed transaction WAL record; skipping it"),
        }
    }
}

/// Bytes from `pos` to the next multiple of `size` (0 if already on one); `size` is a power
/// of two, so this is exact modulo 2^64 and never overflows.
fn bytes_to_boundary(pos: u64, size: u64) -> u64 {
    pos.wrapping_neg() & (size - 1)
}

/// The `xlp_info` bit marking an overwrite-contrecord page for a given page magic. Between
/// PG18 and the first development magic known to use the new numbering the bit is unknown;
/// then none is honoured, which costs nothing in practice because such pages never carry
/// `XLP_FIRST_IS_CONTRECORD` and so end any partial record anyway.
fn overwrite_contrecord_flag(magic: u16) -> u16 {
    if magic <= XLOG_PAGE_MAGIC_PG18 {
        XLP_FIRST_IS_OVERWRITE_CONTRECORD_PG14
    } else if magic >= XLOG_PAGE_MAGIC_PG19_DEVEL {
        XLP_FIRST_IS_OVERWRITE_CONTRECORD_PG19
    } else {
        0
    }
}

fn align_up(pos: u64) -> u64 {
    pos.wrapping_add(bytes_to_boundary(pos, MAXALIGN))
}

fn clamp_len(limit: u64, len: usize) -> usize {
    usize::try_from(limit).map_or(len, |l| l.min(len))
}

/// How many header bytes the page header at hand needs, given the bytes seen so far.
fn page_header_len(buf: &[u8; SIZE_OF_LONG_PHD], have: usize) -> usize {
    if have >= SIZE_OF_SHORT_PHD && u16::from_le_bytes([buf[2], buf[3]]) & XLP_LONG_HEADER != 0 {
        SIZE_OF_LONG_PHD
    } else {
        SIZE_OF_SHORT_PHD
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let bytes = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn i64_at(b: &[u8], off: usize) -> Option<i64> {
    let bytes = b.get(off..off.checked_add(8)?)?;
    Some(i64::from_le_bytes(bytes.try_into().ok()?))
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as PostgreSQL's `pg_crc32c`.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// Slicing-by-8 tables: `CRC32C_SLICES[k][b]` is the CRC of byte `b` followed by `k` zero bytes,
/// so eight bytes fold in per step (the changes mode checks every heap record: the CRC is most of
/// its cost).
const CRC32C_SLICES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    t[0] = CRC32C_TABLE;
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ CRC32C_TABLE[(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let t = &CRC32C_SLICES;
        crc = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][c[4] as usize]
            ^ t[2][c[5] as usize]
            ^ t[1][c[6] as usize]
            ^ t[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

/// The record CRC as PostgreSQL computes it: payload first, then the header up to `xl_crc`.
fn record_crc(rec: &[u8]) -> Option<u32> {
    let payload = rec.get(SIZE_OF_XLOG_RECORD..)?;
    let head = rec.get(..XLOG_RECORD_CRC_OFFSET)?;
    let crc = crc32c_update(!0, payload);
    Some(!crc32c_update(crc, head))
}

/// Locate the record's main data by walking its fragment headers, as `DecodeXLogRecord`
/// does: block references (with optional image, compression-hole and relation fields),
/// origin and top-level-xid fragments, up to the main-data header. The main data is the
/// last `main_data_len` bytes of the record.
fn main_data(rec: &[u8], magic: u16) -> Option<&[u8]> {
    record_parts(rec, magic).map(|(_, main)| main)
}

/// As [`main_data`], also returning block reference 0's relation (the first block reference
/// with a relation; `None` when the record has no block references).
fn record_parts(rec: &[u8], magic: u16) -> Option<(Option<RelFileLocator>, &[u8])> {
    let mut block0 = None;
    let tot = rec.len();
    let mut off = SIZE_OF_XLOG_RECORD;
    let mut datatotal: usize = 0;
    let mut main_len: usize = 0;
    while tot.checked_sub(off)? > datatotal {
        let id = *rec.get(off)?;
        off += 1;
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = usize::from(*rec.get(off)?);
                off += 1;
                datatotal = datatotal.checked_add(main_len)?;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = usize::try_from(u32_at(rec, off)?).ok()?;
                off += 4;
                datatotal = datatotal.checked_add(main_len)?;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => off += 2,
            XLR_BLOCK_ID_TOPLEVEL_XID => off += 4,
            0..=XLR_MAX_BLOCK_ID => {
                let fork_flags = *rec.get(off)?;
                let data_len = u16_at(rec, off + 1)?;
                off += 3;
                datatotal = datatotal.checked_add(usize::from(data_len))?;
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let bimg_len = u16_at(rec, off)?;
                    let bimg_info = *rec.get(off + 4)?;
                    off += 5;
                    if image_compressed(bimg_info, magic) && bimg_info & BKPIMAGE_HAS_HOLE != 0 {
                        // XLogRecordBlockCompressHeader: the hole length.
                        off += 2;
                    }
                    datatotal = datatotal.checked_add(usize::from(bimg_len))?;
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    if block0.is_none() {
                        block0 = Some(RelFileLocator {
                            spc: u32_at(rec, off)?,
                            db: u32_at(rec, off + 4)?,
                            rel: u32_at(rec, off + 8)?,
                        });
                    }
                    off += SIZE_OF_RELFILELOCATOR;
                }
                // BlockNumber.
                off += 4;
            }
            _ => return None,
        }
    }
    if tot.checked_sub(off)? != datatotal {
        return None;
    }
    Some((block0, rec.get(tot - main_len..)?))
}

/// Subtransactions and dropped relfilelocators of a CRC-checked commit/abort record (empty when
/// it has no `xinfo`). They come before every version-dependent sub-record.
fn xact_details(rec: &[u8], magic: u16) -> Option<(Vec<u32>, Vec<RelFileLocator>, bool)> {
    let info = *rec.get(16)?;
    let main = main_data(rec, magic)?;
    if info & XLOG_XACT_HAS_INFO == 0 {
        return Some((Vec::new(), Vec::new(), false));
    }
    let xinfo = u32_at(main, 8)?;
    let mut off: usize = 12;
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        off = off.checked_add(SIZE_OF_DBINFO)?;
    }
    let count = |off: usize| -> Option<usize> {
        usize::try_from(i32::from_le_bytes(main.get(off..off.checked_add(4)?)?.try_into().ok()?)).ok()
    };
    let mut subxacts = Vec::new();
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        let n = count(off)?;
        let ids = main.get(off + 4..(off + 4).checked_add(n.checked_mul(4)?)?)?;
        subxacts = ids.chunks_exact(4).filter_map(|c| u32_at(c, 0)).collect();
        off = off + 4 + n * 4;
    }
    let (mut dropped, mut more) = (Vec::new(), false);
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        let n = count(off)?;
        let list = main.get(off + 4..(off + 4).checked_add(n.checked_mul(SIZE_OF_RELFILELOCATOR)?)?)?;
        (dropped, more) = changes::locators(list, n);
    }
    Some((subxacts, dropped, more))
}

fn image_compressed(bimg_info: u8, magic: u16) -> bool {
    if magic >= XLOG_PAGE_MAGIC_PG15 {
        bimg_info & BKPIMAGE_COMPRESSED_MASK_PG15 != 0
    } else {
        bimg_info & BKPIMAGE_IS_COMPRESSED_PG14 != 0
    }
}

/// Decode a CRC-checked `XLOG_RESTORE_POINT` record into (rp_time, rp_name up to its NUL).
/// The main data must be exactly an `xl_restore_point` whose name is NUL-terminated, as
/// `XLogRestorePoint` writes it (`strlcpy` into the 64 bytes).
fn decode_restore_point(rec: &[u8], magic: u16) -> Option<(i64, Vec<u8>)> {
    let main = main_data(rec, magic)?;
    if main.len() != SIZE_OF_RESTORE_POINT {
        return None;
    }
    let timestamp = i64_at(main, 0)?;
    let name = main.get(8..)?;
    let nul = name.iter().position(|&b| b == 0)?;
    Some((timestamp, name.get(..nul)?.to_vec()))
}

/// Decode a CRC-checked transaction record into (kind, xid, xact_time).
fn decode_xact(rec: &[u8], header: &RecordHeader, magic: u16) -> Option<(XactKind, u32, i64)> {
    let kind = header.xact_kind()?;
    let main = main_data(rec, magic)?;
    // xl_xact_commit and xl_xact_abort both begin with TimestampTz xact_time.
    let timestamp = i64_at(main, 0)?;
    let xid = match kind {
        XactKind::Commit | XactKind::Abort => header.xid,
        XactKind::CommitPrepared | XactKind::AbortPrepared => {
            twophase_xid(main, header.info, kind == XactKind::CommitPrepared, magic).unwrap_or(header.xid)
        }
    };
    Some((kind, xid, timestamp))
}

/// The prepared transaction's xid from `xl_xact_twophase`, if the sub-records before it can
/// be walked. A walk that accounts for the main data exactly is preferred; since the size of
/// a dropped-stats item changed in PG18, the other size is tried before settling for an
/// inexact walk.
fn twophase_xid(main: &[u8], info: u8, commit: bool, magic: u16) -> Option<u32> {
    if info & XLOG_XACT_HAS_INFO == 0 {
        return None;
    }
    let xinfo = u32_at(main, 8)?;
    if xinfo & XACT_XINFO_HAS_TWOPHASE == 0 {
        return None;
    }
    let (primary, alternate) = if magic >= XLOG_PAGE_MAGIC_PG18 {
        (SIZE_OF_STATS_ITEM_PG18, SIZE_OF_STATS_ITEM_PRE18)
    } else {
        (SIZE_OF_STATS_ITEM_PRE18, SIZE_OF_STATS_ITEM_PG18)
    };
    let first = walk_xinfo(main, xinfo, commit, primary);
    if let Some((xid, true)) = first {
        return Some(xid);
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        if let Some((xid, true)) = walk_xinfo(main, xinfo, commit, alternate) {
            return Some(xid);
        }
    }
    first.map(|(xid, _)| xid)
}

/// Walk the `xinfo` sub-records of a commit/abort body up to the two-phase xid and beyond.
/// Returns the xid and whether the walk ended exactly at the end of the main data.
fn walk_xinfo(main: &[u8], xinfo: u32, commit: bool, stats_item: usize) -> Option<(u32, bool)> {
    // xact_time (8) + xinfo (4).
    let mut off: usize = 12;
    let counted = |off: usize, item: usize| -> Option<usize> {
        let n = usize::try_from(i32::from_le_bytes(main.get(off..off.checked_add(4)?)?.try_into().ok()?)).ok()?;
        off.checked_add(4)?.checked_add(n.checked_mul(item)?)
    };
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        off = off.checked_add(SIZE_OF_DBINFO)?;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        off = counted(off, 4)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        off = counted(off, SIZE_OF_RELFILELOCATOR)?;
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        off = counted(off, stats_item)?;
    }
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        off = counted(off, SIZE_OF_INVAL_MSG)?;
    }
    let xid = u32_at(main, off)?;
    off += 4;
    if xinfo & XACT_XINFO_HAS_GID != 0 {
        let nul = main.get(off..)?.iter().position(|&b| b == 0)?;
        off = off.checked_add(nul + 1)?;
    }
    if xinfo & XACT_XINFO_HAS_ORIGIN != 0 {
        off = off.checked_add(SIZE_OF_XACT_ORIGIN)?;
    }
    Some((xid, off == main.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 8192;
    const SEG: u64 = 64 * 1024;

    /// Builds synthetic WAL the way PostgreSQL lays it out: page headers (long on segment
    /// starts), MAXALIGNed records, continuation pages with `xlp_rem_len`.
    struct WalBuilder {
        seg: u64,
        page: u64,
        magic: u16,
        start: u64,
        bytes: Vec<u8>,
        prev: u64,
    }

    impl WalBuilder {
        fn new(start: u64, magic: u16) -> Self {
            assert_eq!(start % PAGE, 0);
            WalBuilder { seg: SEG, page: PAGE, magic, start, bytes: Vec::new(), prev: start.saturating_sub(0x100) }
        }

        fn pos(&self) -> u64 {
            self.start + self.bytes.len() as u64
        }

        fn page_header_with(&mut self, flags: u16, rem_len: u32, pageaddr: u64) {
            let p = self.pos();
            assert_eq!(p % self.page, 0);
            let long = on(p, self.seg);
            let mut info = flags | if long { XLP_LONG_HEADER } else { 0 };
            if self.magic <= XLOG_PAGE_MAGIC_PG18 {
                // Real PG14–18 WAL has XLP_BKP_REMOVABLE on nearly every page.
                info |= 0x0004;
            }
            self.bytes.extend_from_slice(&self.magic.to_le_bytes());
            self.bytes.extend_from_slice(&info.to_le_bytes());
            self.bytes.extend_from_slice(&1u32.to_le_bytes());
            self.bytes.extend_from_slice(&pageaddr.to_le_bytes());
            self.bytes.extend_from_slice(&rem_len.to_le_bytes());
            self.bytes.extend_from_slice(&[0; 4]);
            if long {
                self.bytes.extend_from_slice(&0x7300_0000_0000_1234u64.to_le_bytes());
                self.bytes.extend_from_slice(&(self.seg as u32).to_le_bytes());
                self.bytes.extend_from_slice(&(self.page as u32).to_le_bytes());
            }
        }

        fn page_header(&mut self, flags: u16, rem_len: u32) {
            let p = self.pos();
            self.page_header_with(flags, rem_len, p);
        }

        fn align(&mut self) {
            while !on(self.pos(), 8) {
                self.bytes.push(0);
            }
        }

        /// Lay a complete record down at the next aligned position.
        fn put(&mut self, rec: &[u8]) -> (u64, u64) {
            self.align();
            if on(self.pos(), self.page) {
                self.page_header(0, 0);
            }
            let start = self.pos();
            let mut rest = rec;
            while !rest.is_empty() {
                if on(self.pos(), self.page) {
                    self.page_header(XLP_FIRST_IS_CONTRECORD, rest.len() as u32);
                }
                let space = (self.page - self.pos() % self.page) as usize;
                let n = space.min(rest.len());
                self.bytes.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            self.prev = start;
            (start, align_up(self.pos()))
        }

        /// A full record with a correct header and CRC; `payload` is everything after the
        /// fixed header.
        fn record(&self, xid: u32, rmid: u8, info: u8, payload: &[u8]) -> Vec<u8> {
            let mut rec = Vec::with_capacity(24 + payload.len());
            rec.extend_from_slice(&((24 + payload.len()) as u32).to_le_bytes());
            rec.extend_from_slice(&xid.to_le_bytes());
            rec.extend_from_slice(&self.prev.to_le_bytes());
            rec.push(info);
            rec.push(rmid);
            rec.extend_from_slice(&[0, 0]);
            rec.extend_from_slice(&[0; 4]);
            rec.extend_from_slice(payload);
            let crc = record_crc(&rec).unwrap();
            rec[20..24].copy_from_slice(&crc.to_le_bytes());
            rec
        }

        fn xact(&mut self, xid: u32, info: u8, main: &[u8]) -> (u64, u64) {
            let rec = self.record(xid, RM_XACT_ID, info, &main_only(main));
            self.put(&rec)
        }

        fn commit(&mut self, xid: u32, ts: i64) -> (u64, u64) {
            self.xact(xid, XLOG_XACT_COMMIT, &ts.to_le_bytes())
        }

        fn abort(&mut self, xid: u32, ts: i64) -> (u64, u64) {
            self.xact(xid, XLOG_XACT_ABORT, &ts.to_le_bytes())
        }

        /// A commit with `n` subtransactions, so its size is controllable.
        fn big_commit(&mut self, xid: u32, ts: i64, nsub: usize) -> (u64, u64) {
            let mut main = ts.to_le_bytes().to_vec();
            main.extend_from_slice(&XACT_XINFO_HAS_SUBXACTS.to_le_bytes());
            main.extend_from_slice(&(nsub as i32).to_le_bytes());
            for i in 0..nsub {
                main.extend_from_slice(&(xid + 1 + i as u32).to_le_bytes());
            }
            self.xact(xid, XLOG_XACT_COMMIT | XLOG_XACT_HAS_INFO, &main)
        }

        /// A heap record of exactly `tot_len` bytes.
        fn filler(&mut self, tot_len: usize) -> (u64, u64) {
            assert!(tot_len >= 26);
            let payload = if tot_len - 26 <= 255 {
                main_only(&vec![0xAB; tot_len - 26])
            } else {
                let mut p = vec![XLR_BLOCK_ID_DATA_LONG];
                p.extend_from_slice(&((tot_len - 29) as u32).to_le_bytes());
                p.extend_from_slice(&vec![0xCD; tot_len - 29]);
                p
            };
            let rec = self.record(0, 10, 0x00, &payload);
            assert_eq!(rec.len(), tot_len);
            self.put(&rec)
        }

        /// Add fillers so that the next record starts at `offset` within a page (possibly
        /// a later page).
        fn filler_to_page_offset(&mut self, offset: u64) {
            self.align();
            let mut target = self.pos() - self.pos() % self.page + offset;
            while target < self.pos() + 128 {
                target += self.page;
            }
            // A filler's size counts only its own bytes, not page headers it crosses.
            let mut len = target - self.pos();
            let first_page = self.pos() / self.page;
            let last_page = target / self.page;
            for p in first_page + 1..=last_page {
                len -= if on(p * self.page, self.seg) { 40 } else { 24 };
            }
            if on(self.pos(), self.page) {
                len -= if on(self.pos(), self.seg) { 40 } else { 24 };
            }
            self.filler(len as usize);
            assert_eq!(self.pos() % self.page, offset);
        }

        fn switch(&mut self) -> (u64, u64) {
            let rec = self.record(0, RM_XLOG_ID, XLOG_SWITCH, &[]);
            self.put(&rec)
        }

        fn zeros_to(&mut self, lsn: u64) {
            while self.pos() < lsn {
                self.bytes.push(0);
            }
        }

        fn next_segment(&self) -> u64 {
            (self.pos() / self.seg + 1) * self.seg
        }
    }

    /// Whether `pos` is on a boundary of the power-of-two `size`.
    fn on(pos: u64, size: u64) -> bool {
        pos & (size - 1) == 0
    }

    fn main_only(main: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        if main.len() <= 255 {
            p.push(XLR_BLOCK_ID_DATA_SHORT);
            p.push(main.len() as u8);
        } else {
            p.push(XLR_BLOCK_ID_DATA_LONG);
            p.extend_from_slice(&(main.len() as u32).to_le_bytes());
        }
        p.extend_from_slice(main);
        p
    }

    fn decode_chunks(start: u64, bytes: &[u8], chunk: usize) -> Vec<XactRecord> {
        let mut dec = WalDecoder::new(SEG, PAGE);
        let mut out = Vec::new();
        let mut lsn = start;
        for piece in bytes.chunks(chunk.max(1)) {
            dec.feed(lsn, piece, &mut out);
            lsn += piece.len() as u64;
        }
        out
    }

    fn decode(start: u64, bytes: &[u8]) -> Vec<XactRecord> {
        decode_chunks(start, bytes, bytes.len().max(1))
    }

    fn xids(recs: &[XactRecord]) -> Vec<u32> {
        recs.iter().map(|r| r.xid).collect()
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    const TS: i64 = 800_000_000_000_000;

    #[test]
    fn crc32c_known_vector() {
        assert_eq!(!crc32c_update(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn sliced_crc_matches_the_bytewise_one() {
        let bytewise = |mut crc: u32, data: &[u8]| {
            for &b in data {
                crc = CRC32C_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
            }
            crc
        };
        let mut rng = XorShift(0x5EED);
        for len in (0..100).chain([1000, 8191, 8192, 8193]) {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert_eq!(crc32c_update(!0, &data), bytewise(!0, &data), "len {len}");
            assert_eq!(crc32c_update(0x1234_5678, &data), bytewise(0x1234_5678, &data), "len {len}");
        }
    }

    #[test]
    fn timestamp_conversions() {
        assert_eq!(pg_timestamp_to_unix_micros(0), 946_684_800_000_000);
        assert_eq!(unix_micros_to_pg_timestamp(946_684_800_000_000), 0);
        assert_eq!(unix_micros_to_pg_timestamp(0), -946_684_800_000_000);
        assert_eq!(pg_timestamp_to_unix_micros(i64::MAX), i64::MAX);
        assert_eq!(unix_micros_to_pg_timestamp(i64::MIN), i64::MIN);
        let t = 1_234_567_890_123_456;
        assert_eq!(pg_timestamp_to_unix_micros(unix_micros_to_pg_timestamp(t)), t);
    }

    #[test]
    fn finds_commit_with_xid_and_timestamp() {
        let start = 3 * SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        let (lsn, end) = b.commit(700, TS);
        assert_eq!(lsn, start + 40);
        let out = decode(start, &b.bytes);
        assert_eq!(out, vec![XactRecord { lsn, end_lsn: end, xid: 700, kind: XactKind::Commit, timestamp: TS }]);
        assert_eq!(end, lsn + 40, "34-byte record MAXALIGNed");
    }

    #[test]
    fn finds_abort_among_other_records() {
        let start = SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG17);
        b.filler(100);
        b.commit(10, TS);
        b.filler(300);
        let (lsn, _) = b.abort(11, TS + 5);
        b.filler(50);
        let out = decode(start, &b.bytes);
        assert_eq!(xids(&out), vec![10, 11]);
        assert_eq!(out[1].kind, XactKind::Abort);
        assert_eq!(out[1].lsn, lsn);
        assert_eq!(out[1].timestamp, TS + 5);
    }

    #[test]
    fn record_header_split_across_pages() {
        for offset in [PAGE - 8, PAGE - 16] {
            let start = SEG;
            let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG15);
            b.filler_to_page_offset(offset);
            let (lsn, end) = b.commit(4242, TS);
            assert_eq!(lsn % PAGE, offset);
            b.commit(4243, TS + 1);
            for chunk in [1, 5, 4096, usize::MAX] {
                let out = decode_chunks(start, &b.bytes, chunk);
                assert_eq!(xids(&out), vec![4242, 4243], "offset {offset} chunk {chunk}");
                assert_eq!(out[0].lsn, lsn);
                assert_eq!(out[0].end_lsn, end);
                assert_eq!(out[0].timestamp, TS);
            }
        }
    }

    #[test]
    fn large_record_spanning_three_pages() {
        let start = 2 * SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        b.commit(1, TS);
        let (lsn, end) = b.big_commit(2, TS + 2, 5000);
        assert_eq!(end / PAGE - lsn / PAGE, 2, "spans three pages");
        b.commit(3, TS + 3);
        let out = decode(start, &b.bytes);
        assert_eq!(xids(&out), vec![1, 2, 3]);
        assert_eq!(out[1].lsn, lsn);
        assert_eq!(out[1].end_lsn, end);
        assert_eq!(out[1].timestamp, TS + 2);
    }

    #[test]
    fn record_crossing_segment_boundary() {
        let start = 5 * SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG17);
        b.commit(1, TS);
        // Land near the end of the segment's last page, then cross into the next segment.
        while b.pos() < 6 * SEG - PAGE {
            b.filler(5000);
        }
        b.filler_to_page_offset(PAGE - 200);
        let (lsn, end) = b.big_commit(2, TS + 2, 300);
        assert!(lsn < 6 * SEG && end > 6 * SEG);
        b.commit(3, TS + 3);
        for chunk in [1, 7, usize::MAX] {
            let out = decode_chunks(start, &b.bytes, chunk);
            assert_eq!(xids(&out), vec![1, 2, 3]);
            assert_eq!((out[1].lsn, out[1].end_lsn), (lsn, end));
        }
    }

    fn rich_stream() -> (u64, Vec<u8>) {
        let start = 7 * SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        let mut xid = 1000;
        for round in 0..12u64 {
            b.commit(xid, TS + xid as i64);
            xid += 1;
            b.filler(100 + (round as usize * 977) % 9000);
            b.abort(xid, TS + xid as i64);
            xid += 1;
            if round % 3 == 0 {
                b.filler_to_page_offset(PAGE - 8);
                b.commit(xid, TS);
                xid += 1;
            }
            if round % 4 == 1 {
                b.big_commit(xid, TS, 2500);
                xid += 1;
            }
            if round == 7 {
                b.switch();
                let next = b.next_segment();
                b.zeros_to(next);
            }
        }
        (start, b.bytes)
    }

    #[test]
    fn chunking_does_not_change_results() {
        let (start, bytes) = rich_stream();
        let whole = decode(start, &bytes);
        assert!(whole.len() > 30, "got {}", whole.len());
        assert_eq!(decode_chunks(start, &bytes, 1), whole);
        assert_eq!(decode_chunks(start, &bytes, 7), whole);
        assert_eq!(decode_chunks(start, &bytes, 8192), whole);
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut dec = WalDecoder::new(SEG, PAGE);
        let mut out = Vec::new();
        let mut off = 0usize;
        while off < bytes.len() {
            let n = (1 + rng.below(3000) as usize).min(bytes.len() - off);
            dec.feed(start + off as u64, &bytes[off..off + n], &mut out);
            off += n;
        }
        assert_eq!(out, whole);
    }

    #[test]
    fn resync_mid_stream_skips_partial_record() {
        let start = SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        b.commit(1, TS);
        let (big_start, big_end) = b.filler(20_000);
        let (c2, _) = b.commit(2, TS);
        b.commit(3, TS);
        b.filler(9000);
        b.commit(4, TS);
        let all = decode(start, &b.bytes);
        assert_eq!(xids(&all), vec![1, 2, 3, 4]);

        // Fed at a page boundary inside the big record: that page's header is read at once
        // and its xlp_rem_len skipped.
        let boundary = (big_start / PAGE + 1) * PAGE;
        assert!(boundary < big_end);
        let from = (boundary - start) as usize;
        let out = decode(boundary, &b.bytes[from..]);
        assert_eq!(xids(&out), vec![2, 3, 4]);
        assert_eq!(out[0].lsn, c2);

        // Fed mid-page inside the big record: skip to the next page first.
        for lsn in [big_start + 100, boundary + 3] {
            let from = (lsn - start) as usize;
            for chunk in [1, 7, usize::MAX] {
                let out = decode_chunks(lsn, &b.bytes[from..], chunk);
                assert_eq!(xids(&out), vec![2, 3, 4], "lsn {lsn:X} chunk {chunk}");
            }
        }

        // Fed mid-page on the page where the big record ends: commits 2 and 3 sit on that
        // same page and are lost; the next page header resynchronises.
        let lsn = boundary + PAGE + 17;
        assert!(lsn < c2);
        let out = decode(lsn, &b.bytes[(lsn - start) as usize..]);
        assert_eq!(xids(&out), vec![4]);

        // Fed mid-page right before commit 1: it is on the same page, so it is lost, but
        // the following records are found once a page header is seen.
        let out = decode(start + 48, &b.bytes[48..]);
        assert_eq!(xids(&out), vec![2, 3, 4]);
    }

    #[test]
    fn non_contiguous_feed_resets() {
        let start = SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        b.commit(1, TS);
        b.filler(20_000);
        b.commit(2, TS);
        let mut dec = WalDecoder::new(SEG, PAGE);
        let mut out = Vec::new();
        dec.feed(start, &b.bytes[..100], &mut out);
        assert_eq!(xids(&out), vec![1]);
        assert_eq!(dec.position(), Some(start + 100));
        // Jump ahead into the middle of the filler.
        let lsn = start + 9000;
        dec.feed(lsn, &b.bytes[9000..], &mut out);
        assert_eq!(xids(&out), vec![1, 2]);
        dec.reset();
        assert_eq!(dec.position(), None);
        assert!(!dec.is_synced());
        dec.feed(start, &b.bytes, &mut out);
        assert_eq!(xids(&out), vec![1, 2, 1, 2]);
    }

    #[test]
    fn switch_then_zero_filled_tail() {
        let start = 2 * SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG15);
        b.commit(1, TS);
        b.switch();
        let next = b.next_segment();
        b.zeros_to(next);
        b.commit(2, TS);
        for chunk in [1, 7, usize::MAX] {
            assert_eq!(xids(&decode_chunks(start, &b.bytes, chunk)), vec![1, 2]);
        }

        // Only zeros after the switch, several pages of them.
        let mut z = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG15);
        z.commit(1, TS);
        z.switch();
        z.zeros_to(start + 3 * SEG);
        assert_eq!(xids(&decode_chunks(start, &z.bytes, 7)), vec![1]);

        // Zeros straight after a commit in the middle of a page (end of a partial segment),
        // and zero pages after it: nothing found, no panic, and a later valid page resyncs.
        let mut p = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG15);
        p.commit(1, TS);
        p.zeros_to(start + 3 * PAGE);
        p.page_header(0, 0);
        p.commit(2, TS);
        assert_eq!(xids(&decode_chunks(start, &p.bytes, 1)), vec![1, 2]);
    }

    #[test]
    fn invalid_page_address_is_skipped() {
        let start = 2 * SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        b.commit(1, TS);
        b.zeros_to(start + PAGE);
        // A recycled page: valid magic but the address of an older segment.
        b.page_header_with(0, 0, start + PAGE - SEG);
        b.commit(2, TS);
        b.zeros_to(start + 2 * PAGE);
        b.page_header(0, 0);
        b.commit(3, TS);
        assert_eq!(xids(&decode(start, &b.bytes)), vec![1, 3]);
    }

    #[test]
    fn crc_mismatch_is_not_reported() {
        let start = SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        b.commit(1, TS);
        let (lsn, _) = b.commit(2, TS);
        b.commit(3, TS);
        b.zeros_to(start + PAGE);
        b.page_header(0, 0);
        b.commit(4, TS);
        // Corrupt the timestamp of commit 2.
        let at = (lsn - start) as usize + 26;
        b.bytes[at] ^= 0x55;
        assert_eq!(xids(&decode(start, &b.bytes)), vec![1, 4]);
    }

    #[test]
    fn overwrite_contrecord_discards_partial_record() {
        // The overwrite flag is 0x0008 up to PG18 and 0x0004 from PG19 development on (where
        // 0x0004 no longer means XLP_BKP_REMOVABLE). Even with a remaining length that would
        // match, the flag voids the partial record.
        for (magic, flag) in [
            (XLOG_PAGE_MAGIC_PG14, XLP_FIRST_IS_OVERWRITE_CONTRECORD_PG14),
            (XLOG_PAGE_MAGIC_PG16, XLP_FIRST_IS_OVERWRITE_CONTRECORD_PG14),
            (XLOG_PAGE_MAGIC_PG19_DEVEL, XLP_FIRST_IS_OVERWRITE_CONTRECORD_PG19),
        ] {
            for with_contrec_flag in [false, true] {
                let start = SEG;
                let mut b = WalBuilder::new(start, magic);
                b.commit(1, TS);
                b.filler_to_page_offset(PAGE - 400);
                // The first part of a record that never got finished.
                let big = b.record(77, RM_XACT_ID, XLOG_XACT_COMMIT, &main_only(&[0u8; 1000]));
                b.bytes.extend_from_slice(&big[..400]);
                let (extra, rem) =
                    if with_contrec_flag { (XLP_FIRST_IS_CONTRECORD, (big.len() - 400) as u32) } else { (0, 0) };
                b.page_header(flag | extra, rem);
                b.prev = start + 40; // the chain restarts after a discard
                b.commit(2, TS);
                assert_eq!(
                    xids(&decode_chunks(start, &b.bytes, 3)),
                    vec![1, 2],
                    "magic {magic:#X} contrec {with_contrec_flag}"
                );
            }
        }

        // A continuation page with the wrong remaining length is also a break.
        let start = SEG;
        let mut w = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        w.commit(1, TS);
        w.filler_to_page_offset(PAGE - 400);
        let big = w.record(77, RM_XACT_ID, XLOG_XACT_COMMIT, &main_only(&[0u8; 1000]));
        w.bytes.extend_from_slice(&big[..400]);
        w.page_header(XLP_FIRST_IS_CONTRECORD, 16);
        w.bytes.extend_from_slice(&[0; 16]);
        w.commit(2, TS);
        assert_eq!(xids(&decode(start, &w.bytes)), vec![1, 2]);
    }

    #[test]
    fn bad_prev_link_stops_decoding_until_next_page() {
        let start = SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        b.commit(1, TS);
        b.prev = 0x1234;
        b.commit(2, TS);
        b.zeros_to(start + PAGE);
        b.page_header(0, 0);
        b.commit(3, TS);
        assert_eq!(xids(&decode(start, &b.bytes)), vec![1, 3]);
    }

    #[test]
    fn prepared_transactions_use_twophase_xid() {
        for magic in [XLOG_PAGE_MAGIC_PG15, XLOG_PAGE_MAGIC_PG17, XLOG_PAGE_MAGIC_PG18] {
            let stats_item = if magic >= XLOG_PAGE_MAGIC_PG18 { 16 } else { 12 };
            let start = SEG;
            let mut b = WalBuilder::new(start, magic);
            let body = |prepared_xid: u32, commit: bool| {
                let mut xinfo = XACT_XINFO_HAS_DBINFO
                    | XACT_XINFO_HAS_SUBXACTS
                    | XACT_XINFO_HAS_RELFILELOCATORS
                    | XACT_XINFO_HAS_DROPPED_STATS
                    | XACT_XINFO_HAS_TWOPHASE
                    | XACT_XINFO_HAS_GID
                    | XACT_XINFO_HAS_ORIGIN;
                if commit {
                    xinfo |= XACT_XINFO_HAS_INVALS;
                }
                let mut m = (TS + 9).to_le_bytes().to_vec();
                m.extend_from_slice(&xinfo.to_le_bytes());
                m.extend_from_slice(&[5, 0, 0, 0, 0x67, 0x06, 0, 0]);
                m.extend_from_slice(&2i32.to_le_bytes());
                m.extend_from_slice(&[9; 8]);
                m.extend_from_slice(&1i32.to_le_bytes());
                m.extend_from_slice(&[7; 12]);
                m.extend_from_slice(&3i32.to_le_bytes());
                m.extend_from_slice(&vec![8u8; 3 * stats_item]);
                if commit {
                    m.extend_from_slice(&2i32.to_le_bytes());
                    m.extend_from_slice(&[6; 32]);
                }
                m.extend_from_slice(&prepared_xid.to_le_bytes());
                m.extend_from_slice(b"my-gid\0");
                m.extend_from_slice(&[1; 16]);
                m
            };
            let cp = body(555, true);
            b.xact(0, XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_HAS_INFO, &cp);
            let ap = body(556, false);
            b.xact(0, XLOG_XACT_ABORT_PREPARED | XLOG_XACT_HAS_INFO, &ap);
            // Without xinfo there is no two-phase record: fall back to xl_xid.
            b.xact(99, XLOG_XACT_COMMIT_PREPARED, &TS.to_le_bytes());
            let out = decode(start, &b.bytes);
            let got: Vec<_> = out.iter().map(|r| (r.kind, r.xid, r.timestamp)).collect();
            assert_eq!(
                got,
                vec![
                    (XactKind::CommitPrepared, 555, TS + 9),
                    (XactKind::AbortPrepared, 556, TS + 9),
                    (XactKind::CommitPrepared, 99, TS),
                ],
                "magic {magic:#X}"
            );
        }
    }

    /// A block reference with a compressed, holed image; `bimg_info` bits differ by version.
    fn block_ref_payload(magic: u16, main: &[u8]) -> Vec<u8> {
        let compressed_with_hole = if magic >= XLOG_PAGE_MAGIC_PG15 {
            BKPIMAGE_HAS_HOLE | 0x08 // lz4
        } else {
            BKPIMAGE_HAS_HOLE | BKPIMAGE_IS_COMPRESSED_PG14
        };
        let mut p = Vec::new();
        // Block 0: image + data, with relation.
        p.extend_from_slice(&[0, BKPBLOCK_HAS_IMAGE | 0x20]);
        p.extend_from_slice(&10u16.to_le_bytes());
        p.extend_from_slice(&300u16.to_le_bytes()); // image length
        p.extend_from_slice(&100u16.to_le_bytes()); // hole offset
                                                    // PG15 also has BKPIMAGE_APPLY (0x02), which must not be mistaken for compression.
        let apply = if magic >= XLOG_PAGE_MAGIC_PG15 { 0x02 } else { 0 };
        p.push(compressed_with_hole | apply);
        p.extend_from_slice(&50u16.to_le_bytes()); // hole length
        p.extend_from_slice(&[1; 12]);
        p.extend_from_slice(&7u32.to_le_bytes());
        // Block 1: data only, same relation.
        p.extend_from_slice(&[1, BKPBLOCK_SAME_REL | 0x20]);
        p.extend_from_slice(&4u16.to_le_bytes());
        p.extend_from_slice(&8u32.to_le_bytes());
        // Block 2: uncompressed image with hole: no hole-length field.
        p.extend_from_slice(&[2, BKPBLOCK_HAS_IMAGE | BKPBLOCK_SAME_REL]);
        p.extend_from_slice(&0u16.to_le_bytes());
        p.extend_from_slice(&200u16.to_le_bytes());
        p.extend_from_slice(&64u16.to_le_bytes());
        p.push(BKPIMAGE_HAS_HOLE);
        p.extend_from_slice(&9u32.to_le_bytes());
        p.extend_from_slice(&[XLR_BLOCK_ID_ORIGIN, 3, 0]);
        p.extend_from_slice(&[XLR_BLOCK_ID_TOPLEVEL_XID, 1, 2, 3, 4]);
        p.push(XLR_BLOCK_ID_DATA_LONG);
        p.extend_from_slice(&(main.len() as u32).to_le_bytes());
        p.extend_from_slice(&[0xEE; 300 + 10 + 4 + 200]);
        p.extend_from_slice(main);
        p
    }

    #[test]
    fn block_headers_are_walked_per_version() {
        for magic in [XLOG_PAGE_MAGIC_PG14, XLOG_PAGE_MAGIC_PG15, XLOG_PAGE_MAGIC_PG18] {
            let start = SEG;
            let mut b = WalBuilder::new(start, magic);
            let payload = block_ref_payload(magic, &(TS + 77).to_le_bytes());
            let rec = b.record(31, RM_XACT_ID, XLOG_XACT_ABORT, &payload);
            b.put(&rec);
            let out = decode(start, &b.bytes);
            assert_eq!(out.len(), 1, "magic {magic:#X}");
            assert_eq!((out[0].xid, out[0].timestamp), (31, TS + 77));
        }
        // The PG14 layout read as PG15 (and vice versa) does not add up: not reported.
        let mut b = WalBuilder::new(SEG, XLOG_PAGE_MAGIC_PG15);
        let payload = block_ref_payload(XLOG_PAGE_MAGIC_PG14, &(TS + 77).to_le_bytes());
        let rec = b.record(31, RM_XACT_ID, XLOG_XACT_ABORT, &payload);
        b.put(&rec);
        assert!(decode(SEG, &b.bytes).is_empty());
    }

    #[test]
    fn unknown_newer_magic_is_accepted() {
        let start = SEG;
        let mut b = WalBuilder::new(start, 0xD120);
        b.commit(5, TS);
        assert_eq!(xids(&decode(start, &b.bytes)), vec![5]);
        let mut old = WalBuilder::new(start, 0xD0FF);
        old.commit(5, TS);
        assert!(decode(start, &old.bytes).is_empty());
    }

    #[test]
    fn wrong_configured_sizes_find_nothing() {
        let start = SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        b.commit(5, TS);
        let mut dec = WalDecoder::new(2 * SEG, PAGE);
        let mut out = Vec::new();
        dec.feed(start - SEG, &vec![0; SEG as usize], &mut out);
        dec.feed(start, &b.bytes, &mut out);
        assert!(out.is_empty());
        // Nonsense sizes fall back to defaults instead of panicking.
        let dec = WalDecoder::new(0, 3);
        assert_eq!((dec.segment_size, dec.page_size), (DEFAULT_SEGMENT_SIZE, DEFAULT_PAGE_SIZE));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
        for round in 0..200 {
            let len = rng.below(40_000) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let start = match round % 4 {
                0 => rng.below(1 << 40),
                1 => u64::MAX - rng.below(3 * PAGE),
                2 => rng.below(1 << 30) * PAGE,
                _ => rng.next(),
            };
            let mut dec = WalDecoder::new(SEG, PAGE);
            let mut out = Vec::new();
            let mut off = 0;
            let mut lsn = start;
            while off < data.len() {
                let n = (1 + rng.below(5000) as usize).min(data.len() - off);
                dec.feed(lsn, &data[off..off + n], &mut out);
                lsn = lsn.wrapping_add(n as u64);
                off += n;
            }
        }
    }

    #[test]
    fn random_page_headers_with_garbage_bodies_never_panic() {
        let mut rng = XorShift(0x0123_4567_89AB_CDEF);
        for _ in 0..100 {
            let start = SEG * (1 + rng.below(100));
            let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
            for _ in 0..(1 + rng.below(20)) {
                let flags = rng.below(16) as u16;
                let rem = match rng.below(3) {
                    0 => 0,
                    1 => rng.below(PAGE * 3) as u32,
                    _ => rng.next() as u32,
                };
                b.page_header(flags & !XLP_LONG_HEADER, rem);
                while !on(b.pos(), PAGE) {
                    let v = match rng.below(4) {
                        0 => 0,
                        1 => 24 + rng.below(100) as u8,
                        _ => rng.next() as u8,
                    };
                    b.bytes.push(v);
                }
            }
            for chunk in [1, 13, usize::MAX] {
                decode_chunks(start, &b.bytes, chunk);
            }
        }
    }

    #[test]
    fn mutated_valid_streams_never_panic() {
        let (start, bytes) = rich_stream();
        let clean = decode(start, &bytes);
        let mut rng = XorShift(0xFEED_FACE_1234_5678);
        for _ in 0..60 {
            let mut m = bytes.clone();
            for _ in 0..(1 + rng.below(30)) {
                let i = rng.below(m.len() as u64) as usize;
                m[i] = rng.next() as u8;
            }
            let chunk = 1 + rng.below(10_000) as usize;
            let out = decode_chunks(start, &m, chunk);
            // Corruption can only lose records (CRC-checked), never invent them.
            for r in &out {
                assert!(clean.contains(r), "invented {r:?}");
            }
        }
    }

    /// An `xl_restore_point` as `XLogRestorePoint` lays it out: the time, then the name
    /// `strlcpy`'d into 64 bytes (what follows the NUL is whatever the stack held).
    fn restore_point_main(ts: i64, name: &[u8]) -> Vec<u8> {
        let mut main = ts.to_le_bytes().to_vec();
        let mut field = [0xEEu8; RESTORE_POINT_NAME_LEN];
        field[..name.len()].copy_from_slice(name);
        field[name.len()] = 0;
        main.extend_from_slice(&field);
        main
    }

    fn restore_point(b: &mut WalBuilder, ts: i64, name: &[u8]) -> (u64, u64) {
        let rec = b.record(0, RM_XLOG_ID, XLOG_RESTORE_POINT, &main_only(&restore_point_main(ts, name)));
        b.put(&rec)
    }

    fn decode_points(start: u64, bytes: &[u8], chunk: usize) -> (Vec<XactRecord>, Vec<RestorePointRecord>) {
        let mut dec = WalDecoder::new(SEG, PAGE);
        let (mut xacts, mut points) = (Vec::new(), Vec::new());
        let mut lsn = start;
        for piece in bytes.chunks(chunk.max(1)) {
            dec.feed_all(lsn, piece, &mut xacts, &mut points);
            lsn += piece.len() as u64;
        }
        (xacts, points)
    }

    #[test]
    fn restore_points_are_found_with_their_name_time_and_lsns_in_any_chunking() {
        let start = 3 * SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG15);
        b.commit(700, TS);
        let first = restore_point(&mut b, TS + 1, b"before-cleanup");
        b.commit(701, TS + 2);
        // One that crosses a page boundary, with the longest name PostgreSQL keeps (63 bytes).
        b.filler_to_page_offset(PAGE - 40);
        let long = [b'x'; 63];
        let second = restore_point(&mut b, TS + 3, &long);
        let (_, end) = b.commit(702, TS + 4);
        assert_eq!(second.0 / PAGE + 1, second.1 / PAGE, "the second restore point crosses a page");
        assert_eq!(first.1 - first.0, 104, "24 header + 2 data header + 72 data, MAXALIGNed");
        for chunk in [1, 7, 100, 8192, usize::MAX] {
            let (xacts, points) = decode_points(start, &b.bytes, chunk);
            assert_eq!(xids(&xacts), vec![700, 701, 702], "chunk {chunk}");
            assert_eq!(
                points,
                vec![
                    RestorePointRecord {
                        lsn: first.0,
                        end_lsn: first.1,
                        timestamp: TS + 1,
                        name: b"before-cleanup".to_vec()
                    },
                    RestorePointRecord { lsn: second.0, end_lsn: second.1, timestamp: TS + 3, name: long.to_vec() },
                ],
                "chunk {chunk}"
            );
        }
        assert!(end > second.1);
        // `feed` alone still finds the commits (and drops the restore points).
        assert_eq!(xids(&decode(start, &b.bytes)), vec![700, 701, 702]);
    }

    #[test]
    fn damaged_or_malformed_restore_points_are_not_reported() {
        let start = SEG;
        let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
        let good = restore_point(&mut b, TS, b"kept");
        // A name without its NUL within the 64 bytes is not what PostgreSQL writes.
        let mut main = TS.to_le_bytes().to_vec();
        main.extend_from_slice(&[b'y'; RESTORE_POINT_NAME_LEN]);
        let rec = b.record(0, RM_XLOG_ID, XLOG_RESTORE_POINT, &main_only(&main));
        b.put(&rec);
        // Too short a body.
        let rec = b.record(0, RM_XLOG_ID, XLOG_RESTORE_POINT, &main_only(&TS.to_le_bytes()));
        b.put(&rec);
        // A good one whose payload is flipped after its CRC was computed.
        let (bad, _) = restore_point(&mut b, TS + 9, b"flipped");
        let at = (bad - start) as usize + 30;
        b.bytes[at] ^= 0x01;
        b.commit(9, TS + 10);
        let (_, points) = decode_points(start, &b.bytes, usize::MAX);
        assert_eq!(points.len(), 1, "{points:?}");
        assert_eq!(points[0].lsn, good.0);
        assert_eq!(points[0].name, b"kept");
    }

    mod changes_mode {
        use super::*;
        use crate::changes::{ChangeAccumulator, ChangeOp, CommitEntry, RelCounts, RelFileLocator, WalEvent};

        const T1: RelFileLocator = RelFileLocator { spc: 1663, db: 5, rel: 16401 };
        const T2: RelFileLocator = RelFileLocator { spc: 1663, db: 5, rel: 16500 };
        const PG_CLASS: RelFileLocator = RelFileLocator { spc: 1663, db: 5, rel: 1259 };

        /// A heap-style record payload: block 0 on `rel` (with a full-page image when `image`),
        /// optionally block 1 on the same relation, then the main data.
        fn heap_payload(rel: RelFileLocator, image: bool, second_block: bool, main: &[u8]) -> Vec<u8> {
            let mut p = Vec::new();
            let mut datas = Vec::new();
            let flags = if image { BKPBLOCK_HAS_IMAGE | 0x20 } else { 0x20 };
            p.extend_from_slice(&[0, flags]);
            p.extend_from_slice(&6u16.to_le_bytes());
            if image {
                p.extend_from_slice(&4000u16.to_le_bytes());
                p.extend_from_slice(&0u16.to_le_bytes());
                p.push(0);
                datas.extend_from_slice(&vec![0x5A; 4000]);
            }
            p.extend_from_slice(&rel.spc.to_le_bytes());
            p.extend_from_slice(&rel.db.to_le_bytes());
            p.extend_from_slice(&rel.rel.to_le_bytes());
            p.extend_from_slice(&3u32.to_le_bytes());
            datas.extend_from_slice(&[1; 6]);
            if second_block {
                p.extend_from_slice(&[1, BKPBLOCK_SAME_REL | 0x20]);
                p.extend_from_slice(&6u16.to_le_bytes());
                p.extend_from_slice(&4u32.to_le_bytes());
                datas.extend_from_slice(&[2; 6]);
            }
            p.push(XLR_BLOCK_ID_DATA_SHORT);
            p.push(main.len() as u8);
            p.extend_from_slice(&datas);
            p.extend_from_slice(main);
            p
        }

        fn heap(
            b: &mut WalBuilder,
            xid: u32,
            rmid: u8,
            info: u8,
            rel: RelFileLocator,
            image: bool,
            main: &[u8],
        ) -> u64 {
            let rec = b.record(xid, rmid, info, &heap_payload(rel, image, info == 0x20, main));
            b.put(&rec).0
        }

        /// A commit with subtransactions and dropped relations (and a DBINFO before them).
        fn rich_commit(b: &mut WalBuilder, xid: u32, ts: i64, subs: &[u32], dropped: &[RelFileLocator]) -> (u64, u64) {
            let xinfo = XACT_XINFO_HAS_DBINFO | XACT_XINFO_HAS_SUBXACTS | XACT_XINFO_HAS_RELFILELOCATORS;
            let mut main = ts.to_le_bytes().to_vec();
            main.extend_from_slice(&xinfo.to_le_bytes());
            main.extend_from_slice(&[5, 0, 0, 0, 0x7F, 0x06, 0, 0]);
            main.extend_from_slice(&(subs.len() as i32).to_le_bytes());
            for s in subs {
                main.extend_from_slice(&s.to_le_bytes());
            }
            main.extend_from_slice(&(dropped.len() as i32).to_le_bytes());
            for d in dropped {
                main.extend_from_slice(&d.spc.to_le_bytes());
                main.extend_from_slice(&d.db.to_le_bytes());
                main.extend_from_slice(&d.rel.to_le_bytes());
            }
            b.xact(xid, XLOG_XACT_COMMIT | XLOG_XACT_HAS_INFO, &main)
        }

        fn running_xacts(b: &mut WalBuilder, next: u32, oldest: u32) {
            let mut main = vec![0u8; 24];
            main[12..16].copy_from_slice(&next.to_le_bytes());
            main[16..20].copy_from_slice(&oldest.to_le_bytes());
            let rec = b.record(0, crate::changes::RM_STANDBY_ID, 0x10, &main_only(&main));
            b.put(&rec);
        }

        /// A workload: inserts with images, a multi-insert, update, delete, a subtransaction, an
        /// aborted transaction, DDL (a catalog insert), a DROP (dropped relation), over pages.
        fn workload(magic: u16) -> (u64, Vec<u8>, Vec<(u32, u64)>) {
            let start = 2 * SEG;
            let mut b = WalBuilder::new(start, magic);
            let mut commits = Vec::new();
            running_xacts(&mut b, 100, 100);
            for i in 0..5 {
                heap(&mut b, 100, 10, 0x00, T1, i % 2 == 0, &[0, 0, 0]);
            }
            let mut multi = vec![0u8, 0];
            multi.extend_from_slice(&250u16.to_le_bytes());
            multi.extend_from_slice(&[0; 8]);
            heap(&mut b, 100, 9, 0x50, T1, true, &multi);
            commits.push((100, rich_commit(&mut b, 100, TS, &[], &[]).0));
            // 101: update 2 rows, delete 3 in a subtransaction 102, an aborted subxact 103.
            heap(&mut b, 101, 10, 0x20, T1, true, &[0; 14]);
            heap(&mut b, 101, 10, 0x40, T1, false, &[0; 14]);
            for _ in 0..3 {
                heap(&mut b, 102, 10, 0x10, T1, false, &[0; 8]);
            }
            heap(&mut b, 103, 10, 0x10, T2, false, &[0; 8]);
            b.abort(103, TS + 1);
            commits.push((101, rich_commit(&mut b, 101, TS + 2, &[102], &[]).0));
            // 104 aborts entirely.
            heap(&mut b, 104, 10, 0x10, T1, false, &[0; 8]);
            b.abort(104, TS + 3);
            // 105: DDL + DROP TABLE.
            heap(&mut b, 105, 10, 0x10, PG_CLASS, true, &[0; 8]);
            commits.push((105, rich_commit(&mut b, 105, TS + 4, &[], &[T2]).0));
            (start, b.bytes, commits)
        }

        fn events(dec: &mut WalDecoder, start: u64, bytes: &[u8], chunk: usize) -> Vec<WalEvent> {
            let mut out = Vec::new();
            let mut lsn = start;
            for piece in bytes.chunks(chunk.max(1)) {
                dec.feed_events(lsn, piece, &mut out);
                lsn += piece.len() as u64;
            }
            out
        }

        fn entries(evs: &[WalEvent]) -> Vec<CommitEntry> {
            let mut acc = ChangeAccumulator::new();
            let mut out = Vec::new();
            for e in evs {
                acc.push(e, &mut out);
            }
            out
        }

        #[test]
        fn heap_changes_fold_into_commit_entries_in_any_chunking() {
            for magic in [XLOG_PAGE_MAGIC_PG14, XLOG_PAGE_MAGIC_PG15, XLOG_PAGE_MAGIC_PG17, XLOG_PAGE_MAGIC_PG18] {
                let (start, bytes, commits) = workload(magic);
                let reference = events(&mut WalDecoder::with_changes(SEG, PAGE), start, &bytes, usize::MAX);
                for chunk in [1, 7, 1000, 8192] {
                    assert_eq!(events(&mut WalDecoder::with_changes(SEG, PAGE), start, &bytes, chunk), reference);
                }
                let got = entries(&reference);
                assert_eq!(got.iter().map(|e| (e.xid, e.commit_lsn)).collect::<Vec<_>>(), commits, "{magic:#X}");
                let c = |inserted, updated, deleted| RelCounts { rel: T1, inserted, updated, deleted };
                assert_eq!(got[0].relations, vec![c(255, 0, 0)]);
                assert_eq!(got[1].relations, vec![c(0, 2, 3)], "subxact folded in, aborted subxact gone");
                assert!(!got[0].ddl && !got[1].ddl && got[2].ddl);
                assert_eq!(got[2].dropped, vec![T2]);
                assert!(got.iter().all(|e| !e.incomplete), "RUNNING_XACTS came first");
                assert_eq!(got[0].time_us, pg_timestamp_to_unix_micros(TS));
                // The plain decoder still finds the same commits (and aborts).
                let plain = decode(start, &bytes);
                assert_eq!(plain.iter().filter(|r| r.kind == XactKind::Commit).count(), 3);
            }
        }

        #[test]
        fn ops_are_what_the_records_say() {
            let (start, bytes, _) = workload(XLOG_PAGE_MAGIC_PG16);
            let evs = events(&mut WalDecoder::with_changes(SEG, PAGE), start, &bytes, usize::MAX);
            let ops: Vec<(u32, ChangeOp, u32)> = evs
                .iter()
                .filter_map(|e| match e {
                    WalEvent::Change { xid, op, rows, .. } => Some((*xid, *op, *rows)),
                    _ => None,
                })
                .collect();
            assert_eq!(ops[5], (100, ChangeOp::Insert, 250));
            assert_eq!(ops[6], (101, ChangeOp::Update, 1));
            assert_eq!(ops[7], (101, ChangeOp::Update, 1));
            assert_eq!(ops[8], (102, ChangeOp::Delete, 1));
        }

        /// Decoding in two halves, the second started afresh at the first's record boundary
        /// (from that page, ignoring earlier events), gives exactly the events of one pass.
        #[test]
        fn record_boundary_resumes_without_loss_or_duplicates() {
            let (start, bytes, _) = workload(XLOG_PAGE_MAGIC_PG16);
            let whole = events(&mut WalDecoder::with_changes(SEG, PAGE), start, &bytes, usize::MAX);
            for cut in (1..bytes.len()).step_by(97) {
                let mut first = WalDecoder::with_changes(SEG, PAGE);
                let mut a = events(&mut first, start, &bytes[..cut], usize::MAX);
                let boundary = first.record_boundary().unwrap();
                assert!(boundary <= start + cut as u64);
                let from = boundary - boundary % PAGE;
                let off = (from - start) as usize;
                let b = events(&mut WalDecoder::with_changes(SEG, PAGE), from, &bytes[off..], usize::MAX);
                a.extend(b.into_iter().filter(|e| e.lsn() >= boundary));
                assert_eq!(a, whole, "cut at {cut}");
            }
        }

        #[test]
        fn damaged_or_oversized_changes_are_not_counted() {
            let start = SEG;
            let mut b = WalBuilder::new(start, XLOG_PAGE_MAGIC_PG16);
            running_xacts(&mut b, 50, 50);
            let at = heap(&mut b, 60, 10, 0x00, T1, false, &[0; 3]);
            heap(&mut b, 60, 10, 0x00, T1, false, &[0; 3]);
            b.commit(60, TS);
            let i = (at - start) as usize + 30;
            b.bytes[i] ^= 0xFF;
            // The CRC failure resyncs at the next page: the commit on this page is lost too,
            // never a count that was not written.
            let evs = events(&mut WalDecoder::with_changes(SEG, PAGE), start, &b.bytes, usize::MAX);
            assert!(evs.iter().all(|e| !matches!(e, WalEvent::Change { xid: 60, .. })), "{evs:?}");
        }

        #[test]
        fn garbage_never_panics_and_mutations_never_invent_events() {
            let mut rng = XorShift(0xC0FF_EE00_1234_9876);
            for _ in 0..100 {
                let len = rng.below(30_000) as usize;
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let start = rng.below(1 << 30) * PAGE;
                events(&mut WalDecoder::with_changes(SEG, PAGE), start, &data, 1 + rng.below(5000) as usize);
            }
            let (start, bytes, _) = workload(XLOG_PAGE_MAGIC_PG17);
            let clean = events(&mut WalDecoder::with_changes(SEG, PAGE), start, &bytes, usize::MAX);
            for _ in 0..80 {
                let mut m = bytes.clone();
                for _ in 0..(1 + rng.below(20)) {
                    let i = rng.below(m.len() as u64) as usize;
                    m[i] = rng.next() as u8;
                }
                let got = events(&mut WalDecoder::with_changes(SEG, PAGE), start, &m, 1 + rng.below(9000) as usize);
                for e in &got {
                    // Lost markers come from unchecked headers; anything else must be real.
                    if !matches!(e, WalEvent::Lost { .. }) {
                        assert!(clean.contains(e), "invented {e:?}");
                    }
                }
                entries(&got);
            }
        }

        /// Throughput on a real WAL sample (run by hand, ideally `--release`):
        /// `PITR_WAL_SAMPLE=<file>` holds raw WAL starting at the LSN in `<file>.lsn`, e.g. as
        /// pitr-tests' `decoding_throughput_on_pgbench_wal` writes it. Prints MB/s of the plain
        /// decoder and of the changes mode with the accumulator.
        #[test]
        #[ignore]
        fn throughput_on_a_sample() {
            let Ok(path) = std::env::var("PITR_WAL_SAMPLE") else { return };
            let bytes = std::fs::read(&path).unwrap();
            let start: u64 = std::fs::read_to_string(format!("{path}.lsn")).unwrap().trim().parse().unwrap();
            let seg = 16 << 20;
            let mb = bytes.len() as f64 / 1e6;
            for round in 0..2 {
                let t = std::time::Instant::now();
                let mut dec = WalDecoder::new(seg, PAGE);
                let mut out = Vec::new();
                let mut lsn = start;
                for piece in bytes.chunks(128 << 10) {
                    dec.feed(lsn, piece, &mut out);
                    lsn += piece.len() as u64;
                }
                let plain = t.elapsed().as_secs_f64();
                let t = std::time::Instant::now();
                let mut dec = WalDecoder::with_changes(seg, PAGE);
                let mut acc = ChangeAccumulator::new();
                let (mut evs, mut entries) = (Vec::new(), Vec::new());
                let mut lsn = start;
                for piece in bytes.chunks(128 << 10) {
                    evs.clear();
                    dec.feed_events(lsn, piece, &mut evs);
                    for e in &evs {
                        acc.push(e, &mut entries);
                    }
                    lsn += piece.len() as u64;
                }
                let changes = t.elapsed().as_secs_f64();
                println!(
                    "round {round}: {mb:.1} MB: plain feed {:.0} MB/s ({} xact records); changes mode {:.0} MB/s ({} commits)",
                    mb / plain,
                    out.len(),
                    mb / changes,
                    entries.len()
                );
            }
        }
    }
}
