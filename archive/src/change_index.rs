//! The change index: per WAL segment, which transactions committed in it and which relations
//! they changed (for `pitr find`).
//!
//! ```text
//! pg/<system id>/index/<segment file name>.idx     sealed (kind Meta), create-only
//! ```
//! (built and parsed by [`names::pg::change_index`] and [`names::pg::parse_change_index`]).
//!
//! Owns the object's format ([`SegmentIndex::encode`]/[`SegmentIndex::decode`]: a versioned
//! compact binary), decoding archived WAL into it ([`decode_segment`], the same code the sidecar,
//! `verify --rebuild-index` and `find` use), reading a range of it with segments that have no
//! index object decoded on the fly ([`load_range`]), and writing missing objects ([`rebuild`]).
//! It does not decide when the sidecar indexes (pitr-walstream's indexer) and does not name
//! tables (catalog snapshots do).
//!
//! One object covers the records that *start* in `[from_lsn, to_lsn)`: `from_lsn` is the previous
//! object's `to_lsn` (or where decoding started), `to_lsn` the start of the first record not
//! complete within the segment (so at most the segment's end). It holds the commit entries of
//! commit records starting there and `carry`: the open transactions' partial counts at `to_lsn`,
//! so decoding resumes at the next segment without re-reading older WAL.
//!
//! Trust: an object is written only once the segment's WAL is in the archive (the sidecar waits
//! for its durable end; rebuild decodes archived WAL), so an index object never claims WAL the
//! archive does not hold. Readers refuse objects larger than [`INDEX_MAX_BYTES`] (unread), objects
//! that do not open (the name is bound into the sealing), and contents that do not match their
//! name or are out of range; such a segment is decoded from the WAL instead and named in
//! [`ChangeView::problems`].

use std::collections::BTreeMap;

use pitr_pgformat::changes::{AccumulatorState, ChangeAccumulator, Horizon, OpenXact};
/// The entry types, from the decoder that makes them (callers need not depend on pitr-pgformat).
pub use pitr_pgformat::changes::{CommitEntry, RelCounts, RelFileLocator, RelOid};
use pitr_pgformat::walreader::WalDecoder;

use crate::chunk_run::cover;
use crate::names;
use crate::repository::{ClusterInfo, Repository, RepositoryError, RECORD_READ_MAX};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::StoreError;
use crate::wal::{WalLayout, WalObject};
use crate::wal_catalog::WalCatalog;

/// The format version written in every index object.
pub const FORMAT_VERSION: u8 = 1;
const MAGIC: &[u8; 8] = b"PITRCIDX";

/// The largest stored index object read (a 16 MiB segment of tiny transactions encodes to a few
/// MiB before compression); a larger one is not pitr's and is not downloaded.
pub const INDEX_MAX_BYTES: u64 = RECORD_READ_MAX;

/// One segment's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentIndex {
    /// The timeline of the segment.
    pub timeline: u32,
    /// The segment number.
    pub segno: u64,
    /// Records starting at or after this LSN were decoded.
    pub from_lsn: u64,
    /// Records starting before this LSN were decoded (at most the segment's end).
    pub to_lsn: u64,
    /// Decoding started afresh here (nothing carried in): commits may be `incomplete`.
    pub fresh: bool,
    /// Commits whose record starts in `[from_lsn, to_lsn)`, in WAL order.
    pub entries: Vec<CommitEntry>,
    /// The open transactions at `to_lsn`.
    pub carry: AccumulatorState,
}

/// Why an index object could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {why}")]
pub struct IndexProblem {
    /// The object (or WAL segment) concerned.
    pub object: String,
    /// What is wrong.
    pub why: String,
}

/// Errors of reading or writing the index.
#[derive(Debug, thiserror::Error)]
pub enum ChangeIndexError {
    /// The repository failed.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// The decoding thread did not finish (the runtime is shutting down).
    #[error("WAL decoding of segment {segment} did not finish: {why}")]
    Stopped {
        /// The segment's file name.
        segment: String,
        /// What stopped it.
        why: String,
    },
}

/// A WAL segment's bytes from its start, as far as the archive holds them contiguously.
struct HeldSegment {
    bytes: Vec<u8>,
}

impl SegmentIndex {
    /// The object name.
    pub fn object_name(&self, layout: &WalLayout) -> String {
        names::pg::change_index(layout.system_id, &layout.segment_file_name(self.timeline, self.segno))
    }

    /// The metadata of its sealed header.
    pub fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            timeline: self.timeline,
            start_lsn: self.from_lsn,
            end_lsn: self.to_lsn,
            first_commit_us: self.entries.first().map(|e| e.time_us),
            last_commit_us: self.entries.last().map(|e| e.time_us),
            ..ObjectMeta::plain(ObjectKind::Meta)
        }
    }

    /// The object's plaintext. Deterministic: the same decoding gives the same bytes (a second
    /// put of it is then taken as already there).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64 + self.entries.len() * 24);
        w.extend_from_slice(MAGIC);
        w.push(FORMAT_VERSION);
        put(&mut w, u64::from(self.timeline));
        put(&mut w, self.segno);
        put(&mut w, self.from_lsn);
        put(&mut w, self.to_lsn);
        put(&mut w, u64::from(self.fresh));
        put(&mut w, self.entries.len() as u64);
        for e in &self.entries {
            put(&mut w, u64::from(e.xid));
            put(&mut w, e.commit_lsn);
            put(&mut w, e.end_lsn.wrapping_sub(e.commit_lsn));
            put(&mut w, zigzag(e.time_us));
            put(&mut w, u64::from(e.ddl) | u64::from(e.incomplete) << 1 | u64::from(e.more_relations) << 2);
            put_rels(&mut w, &e.relations);
            put(&mut w, e.dropped.len() as u64);
            for d in &e.dropped {
                put_loc(&mut w, d);
            }
            put_oids(&mut w, &e.truncated);
        }
        match self.carry.horizon {
            Horizon::Unknown => put(&mut w, 0),
            Horizon::Below(x) => {
                put(&mut w, 1);
                put(&mut w, u64::from(x));
            }
            Horizon::Complete => put(&mut w, 2),
        }
        match self.carry.overflow {
            None => put(&mut w, 0),
            Some(x) => {
                put(&mut w, 1);
                put(&mut w, u64::from(x));
            }
        }
        put(&mut w, self.carry.open.len() as u64);
        for (xid, x) in &self.carry.open {
            put(&mut w, u64::from(*xid));
            put(&mut w, u64::from(x.ddl) | u64::from(x.incomplete) << 1 | u64::from(x.more_relations) << 2);
            put_rels(&mut w, &x.relations);
            put_oids(&mut w, &x.truncated);
        }
        w
    }

    /// Parses an object's plaintext; `None` if it is not a well-formed version-1 index.
    pub fn decode(bytes: &[u8]) -> Option<SegmentIndex> {
        let mut r = Reader { b: bytes, off: 0 };
        if r.take(8)? != MAGIC || r.take(1)? != [FORMAT_VERSION] {
            return None;
        }
        let timeline = u32::try_from(r.get()?).ok()?;
        let segno = r.get()?;
        let from_lsn = r.get()?;
        let to_lsn = r.get()?;
        let fresh = match r.get()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let n = r.count()?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let xid = r.u32()?;
            let commit_lsn = r.get()?;
            let end_lsn = commit_lsn.checked_add(r.get()?)?;
            let time_us = unzigzag(r.get()?);
            let flags = r.get()?;
            if flags > 7 {
                return None;
            }
            let relations = r.rels()?;
            let nd = r.count()?;
            let mut dropped = Vec::with_capacity(nd);
            for _ in 0..nd {
                dropped.push(r.loc()?);
            }
            let truncated = r.oids()?;
            entries.push(CommitEntry {
                xid,
                commit_lsn,
                end_lsn,
                time_us,
                relations,
                more_relations: flags & 4 != 0,
                dropped,
                truncated,
                ddl: flags & 1 != 0,
                incomplete: flags & 2 != 0,
            });
        }
        let horizon = match r.get()? {
            0 => Horizon::Unknown,
            1 => Horizon::Below(r.u32()?),
            2 => Horizon::Complete,
            _ => return None,
        };
        let overflow = match r.get()? {
            0 => None,
            1 => Some(r.u32()?),
            _ => return None,
        };
        let n = r.count()?;
        let mut open = Vec::with_capacity(n);
        for _ in 0..n {
            let xid = r.u32()?;
            let flags = r.get()?;
            if flags > 7 {
                return None;
            }
            let relations = r.rels()?;
            let truncated = r.oids()?;
            open.push((
                xid,
                OpenXact {
                    relations,
                    more_relations: flags & 4 != 0,
                    truncated,
                    ddl: flags & 1 != 0,
                    incomplete: flags & 2 != 0,
                },
            ));
        }
        if r.off != bytes.len() {
            return None;
        }
        Some(SegmentIndex {
            timeline,
            segno,
            from_lsn,
            to_lsn,
            fresh,
            entries,
            carry: AccumulatorState { open, horizon, overflow },
        })
    }

    /// Whether the content is what an object under the name of (`timeline`, `segno`) of this
    /// layout may hold: the same segment, LSNs within it (`from_lsn` may lie in the previous
    /// segment, where a record crossing into this one began) and entries inside the range.
    pub fn fits(&self, layout: &WalLayout, timeline: u32, segno: u64) -> bool {
        let start = layout.segment_start(segno);
        let end = start.saturating_add(layout.segment_size);
        self.timeline == timeline
            && self.segno == segno
            && self.from_lsn >= start.saturating_sub(layout.segment_size)
            && self.from_lsn <= self.to_lsn
            && self.to_lsn <= end
            && self.entries.iter().all(|e| e.commit_lsn >= self.from_lsn && e.commit_lsn < self.to_lsn)
    }
}

fn put(w: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        w.push((v as u8) | 0x80);
        v >>= 7;
    }
    w.push(v as u8);
}

fn put_loc(w: &mut Vec<u8>, l: &RelFileLocator) {
    put(w, u64::from(l.spc));
    put(w, u64::from(l.db));
    put(w, u64::from(l.rel));
}

fn put_rels(w: &mut Vec<u8>, rels: &[RelCounts]) {
    put(w, rels.len() as u64);
    for r in rels {
        put_loc(w, &r.rel);
        put(w, r.inserted);
        put(w, r.updated);
        put(w, r.deleted);
    }
}

fn put_oids(w: &mut Vec<u8>, oids: &[RelOid]) {
    put(w, oids.len() as u64);
    for o in oids {
        put(w, u64::from(o.db));
        put(w, u64::from(o.oid));
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

struct Reader<'a> {
    b: &'a [u8],
    off: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.off..self.off.checked_add(n)?)?;
        self.off += n;
        Some(s)
    }

    fn get(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.off)?;
            self.off += 1;
            v |= u64::from(byte & 0x7F).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.get()?).ok()
    }

    /// A count of items, each at least one byte: never more than the bytes left (so a garbage
    /// count cannot make a huge allocation).
    fn count(&mut self) -> Option<usize> {
        let n = usize::try_from(self.get()?).ok()?;
        (n <= self.b.len() - self.off).then_some(n)
    }

    fn loc(&mut self) -> Option<RelFileLocator> {
        Some(RelFileLocator { spc: self.u32()?, db: self.u32()?, rel: self.u32()? })
    }

    fn rels(&mut self) -> Option<Vec<RelCounts>> {
        let n = self.count()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(RelCounts { rel: self.loc()?, inserted: self.get()?, updated: self.get()?, deleted: self.get()? });
        }
        Some(v)
    }

    fn oids(&mut self) -> Option<Vec<RelOid>> {
        let n = self.count()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(RelOid { db: self.u32()?, oid: self.u32()? });
        }
        Some(v)
    }
}

/// Where decoding of a segment starts: after the previous segment's index (its `to_lsn` and
/// carry), or afresh at the segment's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Nothing carried in: decode from the segment's first page.
    Fresh,
    /// Resume at `from_lsn` (the previous segment's `to_lsn`) with its carried state.
    After {
        /// Where the first record to decode starts.
        from_lsn: u64,
        /// The accumulator's state there.
        carry: AccumulatorState,
    },
}

impl Start {
    /// The start after `index` (for the next segment).
    pub fn after(index: &SegmentIndex) -> Start {
        Start::After { from_lsn: index.to_lsn, carry: index.carry.clone() }
    }
}

/// Decodes WAL bytes `[feed_from, feed_from + bytes.len())` (which must cover `start`'s
/// `from_lsn`, from its page's beginning) into segment `segno`'s index. Pure: what
/// [`decode_segment`] and the sidecar's indexer both call. `complete` says whether `bytes`
/// reach the segment's end; when not, `to_lsn` is where decoding got to.
pub fn decode_bytes(
    info: &ClusterInfo,
    timeline: u32,
    segno: u64,
    start: Start,
    feed_from: u64,
    bytes: &[u8],
) -> SegmentIndex {
    let seg_start = segno.saturating_mul(info.wal_segment_size);
    let (from_lsn, mut acc, fresh) = match start {
        Start::Fresh => (seg_start, ChangeAccumulator::new(), true),
        Start::After { from_lsn, carry } => (from_lsn, ChangeAccumulator::from_state(carry), false),
    };
    let mut decoder = WalDecoder::with_changes(info.wal_segment_size, info.wal_page_size);
    let mut events = Vec::new();
    let mut entries = Vec::new();
    // In pieces, so that memory for events stays small.
    let mut lsn = feed_from;
    for piece in bytes.chunks(1 << 20) {
        events.clear();
        decoder.feed_events(lsn, piece, &mut events);
        for ev in events.iter().filter(|e| e.lsn() >= from_lsn) {
            acc.push(ev, &mut entries);
        }
        lsn += piece.len() as u64;
    }
    let end = feed_from + bytes.len() as u64;
    let to_lsn = decoder.record_boundary().unwrap_or(end).clamp(from_lsn, end);
    SegmentIndex { timeline, segno, from_lsn, to_lsn, fresh, entries, carry: acc.state() }
}

/// Reads what the archive holds of segment (`timeline`, `segno`) from its start: the whole
/// segment, or its chunks from offset 0 as far as they are contiguous. `None` when nothing is
/// held from the segment's start.
async fn read_held(
    repo: &Repository,
    catalog: &WalCatalog,
    timeline: u32,
    segno: u64,
) -> Result<Option<HeldSegment>, RepositoryError> {
    let layout = catalog.layout;
    let Some(entry) = catalog.segments.get(&(timeline, segno)) else { return Ok(None) };
    if entry.whole {
        let name = layout.object_name(&WalObject::Segment { timeline, segno });
        let (_, bytes) = repo.get_opened(&name).await?;
        return Ok(Some(HeldSegment { bytes }));
    }
    let read = cover(&entry.chunks, 0);
    if read.is_empty() {
        return Ok(None);
    }
    match repo.read_chunk_run(&layout, timeline, segno, &read).await {
        Ok(run) => Ok(Some(HeldSegment { bytes: run.data })),
        // Compacted since the listing: the whole segment is there now.
        Err(crate::chunk_run::ChunkRunError::Repository(RepositoryError::Store(e))) if e.is_not_found() => {
            let name = layout.object_name(&WalObject::Segment { timeline, segno });
            let (_, bytes) = repo.get_opened(&name).await?;
            Ok(Some(HeldSegment { bytes }))
        }
        Err(e) => Err(e.into_repository_error()),
    }
}

/// The archived WAL bytes `[from_lsn, to_lsn)` of `timeline`, read from its segments' objects;
/// `None` if the archive does not hold all of them.
pub async fn read_wal(
    repo: &Repository,
    catalog: &WalCatalog,
    timeline: u32,
    from_lsn: u64,
    to_lsn: u64,
) -> Result<Option<Vec<u8>>, RepositoryError> {
    let seg_size = catalog.layout.segment_size;
    let mut out = Vec::with_capacity(usize::try_from(to_lsn.saturating_sub(from_lsn)).unwrap_or(0).min(64 << 20));
    let mut lsn = from_lsn;
    while lsn < to_lsn {
        let segno = lsn / seg_size;
        let seg_start = segno * seg_size;
        let Some(held) = read_held(repo, catalog, timeline, segno).await? else { return Ok(None) };
        let from = usize::try_from(lsn - seg_start).unwrap_or(usize::MAX);
        let to = usize::try_from(to_lsn.min(seg_start + seg_size) - seg_start).unwrap_or(usize::MAX);
        let Some(part) = held.bytes.get(from..to) else { return Ok(None) };
        out.extend_from_slice(part);
        lsn = seg_start + to as u64;
    }
    Ok(Some(out))
}

/// Decodes segment (`timeline`, `segno`) from the archived WAL, from `start`. `Ok(None)` when
/// the archive holds none of it from its start (or, resuming in the previous segment, not that
/// segment's tail). The result's `to_lsn` is below the segment's end when the archive holds only
/// part of it (the current segment): such an index is for reading, never stored.
pub async fn decode_segment(
    repo: &Repository,
    info: &ClusterInfo,
    catalog: &WalCatalog,
    timeline: u32,
    segno: u64,
    start: Start,
) -> Result<Option<(SegmentIndex, bool)>, ChangeIndexError> {
    let seg_size = info.wal_segment_size;
    let seg_start = segno.saturating_mul(seg_size);
    let Some(held) = read_held(repo, catalog, timeline, segno).await? else { return Ok(None) };
    let complete = held.bytes.len() as u64 >= seg_size;
    let page = info.wal_page_size.max(1);
    let (feed_from, bytes) = match &start {
        Start::After { from_lsn, .. } if *from_lsn < seg_start => {
            // The first record began in the previous segment: its tail, from that page on.
            let prev_from = from_lsn - from_lsn % page;
            let Some(segno_prev) = segno.checked_sub(1) else { return Ok(None) };
            let Some(prev) = read_held(repo, catalog, timeline, segno_prev).await? else { return Ok(None) };
            let off = usize::try_from(prev_from - segno_prev * seg_size).unwrap_or(usize::MAX);
            let Some(tail) = prev.bytes.get(off..) else { return Ok(None) };
            if tail.len() as u64 != seg_start - prev_from {
                return Ok(None);
            }
            let mut bytes = tail.to_vec();
            bytes.extend_from_slice(&held.bytes);
            (prev_from, bytes)
        }
        Start::After { from_lsn, .. } => {
            let from = from_lsn - from_lsn % page;
            let off = usize::try_from(from - seg_start).unwrap_or(usize::MAX);
            match held.bytes.get(off..) {
                Some(b) => (from, b.to_vec()),
                None => return Ok(None),
            }
        }
        Start::Fresh => (seg_start, held.bytes),
    };
    // Decoding a segment is up to 16 MiB of CPU work: off the async runtime's workers, which the
    // sidecar shares with its WAL receiver, uploader and lease renewal.
    let owned = info.clone();
    let decoding =
        tokio::task::spawn_blocking(move || decode_bytes(&owned, timeline, segno, start, feed_from, &bytes)).await;
    let index = match decoding {
        Ok(index) => index,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => {
            let segment = WalLayout::new(info).segment_file_name(timeline, segno);
            return Err(ChangeIndexError::Stopped { segment, why: e.to_string() });
        }
    };
    Ok(Some((index, complete)))
}

/// Reads the index object of (`timeline`, `segno`): `Ok(None)` if there is none, `Err` with the
/// problem if one is there but cannot be used (too large, does not open, does not fit its name).
pub async fn read_index(
    repo: &Repository,
    layout: &WalLayout,
    timeline: u32,
    segno: u64,
) -> Result<Option<SegmentIndex>, IndexProblem> {
    let name = names::pg::change_index(layout.system_id, &layout.segment_file_name(timeline, segno));
    let problem = |why: String| IndexProblem { object: name.clone(), why };
    match repo.get_record(&name).await {
        Ok((_, bytes)) => match SegmentIndex::decode(&bytes) {
            Some(index) if index.fits(layout, timeline, segno) => Ok(Some(index)),
            Some(_) => Err(problem("its content is for another segment or out of range".into())),
            None => Err(problem("not a change index pitr can read".into())),
        },
        Err(RepositoryError::Store(e)) if e.is_not_found() => Ok(None),
        Err(RepositoryError::Store(StoreError::TooLarge { size, .. })) => {
            Err(problem(format!("{size} bytes, larger than any index pitr writes; not read")))
        }
        Err(e) => Err(problem(e.to_string())),
    }
}

/// The segments of `timeline` that have an index object, by segment number (object sizes).
pub async fn list_indexed(
    repo: &Repository,
    layout: &WalLayout,
    timeline: u32,
) -> Result<BTreeMap<u64, u64>, ChangeIndexError> {
    let mut out = BTreeMap::new();
    for o in repo.list(&names::pg::change_index_prefix(layout.system_id)).await? {
        let Some(file) = names::pg::parse_change_index(layout.system_id, &o.name) else { continue };
        if let Some((tli, segno)) = layout.parse_segment_file_name(file) {
            if tli == timeline {
                out.insert(segno, o.size);
            }
        }
    }
    Ok(out)
}

/// How one segment of a [`ChangeView`] was covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Covered {
    /// The segment number.
    pub segno: u64,
    /// First record start covered.
    pub from_lsn: u64,
    /// Records starting before this were covered.
    pub to_lsn: u64,
    /// From an index object (else decoded from the archived WAL just now).
    pub indexed: bool,
}

/// A range of the change index, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeView {
    /// The timeline read.
    pub timeline: u32,
    /// Every commit found, in WAL order (oldest first).
    pub entries: Vec<CommitEntry>,
    /// What each segment was covered by, in order. A segment missing here (between two that
    /// are) is a hole: the archive holds no WAL of it from its start.
    pub segments: Vec<Covered>,
    /// Index objects that could not be used (their segments were decoded from the WAL instead)
    /// and segments whose WAL could not be read.
    pub problems: Vec<IndexProblem>,
}

impl ChangeView {
    /// Just past the last record start covered (0 when nothing is).
    pub fn end_lsn(&self) -> u64 {
        self.segments.last().map_or(0, |c| c.to_lsn)
    }
}

/// Reads the change index of `timeline` for segments `from_segno..=to_segno` (`None`: up to the
/// newest archived), in order. A segment with a usable index object is read from it; one without
/// is decoded from the archived WAL with the same code the sidecar uses (the current, incomplete
/// segment included, up to the archive's newest byte), carrying state from the segment before.
///
/// Entries are those of one timeline: where a newer timeline branched off (its history file's
/// switch LSN), entries of this one at or past that LSN are not on the newer one's history — the
/// caller picks timelines along its path.
pub async fn load_range(
    repo: &Repository,
    info: &ClusterInfo,
    timeline: u32,
    from_segno: u64,
    to_segno: Option<u64>,
) -> Result<ChangeView, ChangeIndexError> {
    let layout = WalLayout::new(info);
    let catalog = WalCatalog::build(repo, layout).await?;
    load_range_with(repo, info, &catalog, timeline, from_segno, to_segno).await
}

/// [`load_range`] with a WAL catalog the caller already listed.
pub async fn load_range_with(
    repo: &Repository,
    info: &ClusterInfo,
    catalog: &WalCatalog,
    timeline: u32,
    from_segno: u64,
    to_segno: Option<u64>,
) -> Result<ChangeView, ChangeIndexError> {
    let layout = WalLayout::new(info);
    let indexed = list_indexed(repo, &layout, timeline).await?;
    let to = to_segno.unwrap_or(u64::MAX);
    let mut segnos: Vec<u64> = catalog
        .segments
        .keys()
        .filter(|(t, s)| *t == timeline && (from_segno..=to).contains(s))
        .map(|(_, s)| *s)
        .collect();
    segnos.extend(indexed.keys().filter(|s| (from_segno..=to).contains(*s)));
    segnos.sort_unstable();
    segnos.dedup();

    let mut view = ChangeView { timeline, ..Default::default() };
    // What the segment before carried, when it was covered.
    let mut carried: Option<(u64, SegmentIndex)> = None;
    if let Some(&first) = segnos.first() {
        if let Some(prev) = first.checked_sub(1) {
            if let Ok(Some(index)) = read_index(repo, &layout, timeline, prev).await {
                carried = Some((prev, index));
            }
        }
    }
    for segno in segnos {
        let prev_ok = matches!(&carried, Some((s, _)) if s + 1 == segno);
        let from_index = if indexed.contains_key(&segno) {
            match read_index(repo, &layout, timeline, segno).await {
                Ok(found) => found,
                Err(p) => {
                    view.problems.push(p);
                    None
                }
            }
        } else {
            None
        };
        // An index object that does not continue the previous one (written after a gap) is still
        // used; its own flags say what may be missing.
        let (index, indexed_here) = match from_index {
            Some(index) => (index, true),
            None => {
                let start = match (&carried, prev_ok) {
                    (Some((_, prev)), true) => Start::after(prev),
                    _ => Start::Fresh,
                };
                match decode_segment(repo, info, catalog, timeline, segno, start).await {
                    Ok(Some((index, _complete))) => (index, false),
                    Ok(None) => {
                        carried = None;
                        continue;
                    }
                    Err(ChangeIndexError::Repository(e)) => {
                        view.problems.push(IndexProblem {
                            object: layout.segment_file_name(timeline, segno),
                            why: format!("WAL could not be read: {e}"),
                        });
                        carried = None;
                        continue;
                    }
                    Err(e @ ChangeIndexError::Stopped { .. }) => return Err(e),
                }
            }
        };
        view.segments.push(Covered { segno, from_lsn: index.from_lsn, to_lsn: index.to_lsn, indexed: indexed_here });
        view.entries.extend(index.entries.iter().cloned());
        carried = Some((segno, index));
    }
    Ok(view)
}

/// What [`rebuild`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RebuildReport {
    /// Index objects written.
    pub written: u64,
    /// Valid index objects already there (kept).
    pub present: u64,
    /// Unusable objects deleted and written again (`force`).
    pub replaced: u64,
    /// Complete segments left unindexed, and why.
    pub problems: Vec<String>,
}

/// Decodes the archived WAL of every complete segment of every timeline (from `since_segno` on)
/// and writes the index objects that are missing. A valid object is never overwritten; one that
/// cannot be used is reported, or with `force` deleted and written again. Create-only puts: a
/// concurrent writer of the same object (the sidecar) writes the same bytes.
pub async fn rebuild(
    repo: &Repository,
    info: &ClusterInfo,
    since_segno: Option<u64>,
    force: bool,
) -> Result<RebuildReport, ChangeIndexError> {
    rebuild_range(repo, info, since_segno, None, force).await
}

/// [`rebuild`] of segments `since_segno..=until_segno` only (the sidecar's backfill: it leaves
/// newer segments to its live indexer, whose objects carry state from the one before).
pub async fn rebuild_range(
    repo: &Repository,
    info: &ClusterInfo,
    since_segno: Option<u64>,
    until_segno: Option<u64>,
    force: bool,
) -> Result<RebuildReport, ChangeIndexError> {
    let until = until_segno.unwrap_or(u64::MAX);
    let layout = WalLayout::new(info);
    let catalog = WalCatalog::build(repo, layout).await?;
    let mut report = RebuildReport::default();
    let timelines: std::collections::BTreeSet<u32> = catalog.segments.keys().map(|(t, _)| *t).collect();
    for timeline in timelines {
        let indexed = list_indexed(repo, &layout, timeline).await?;
        let since = since_segno.unwrap_or(0);
        let segnos: Vec<u64> = catalog
            .segments
            .iter()
            .filter(|((t, s), e)| *t == timeline && (since..=until).contains(s) && e.is_complete(info.wal_segment_size))
            .map(|((_, s), _)| *s)
            .collect();
        let mut carried: Option<SegmentIndex> = match segnos.first().and_then(|s| s.checked_sub(1)) {
            Some(prev) => read_index(repo, &layout, timeline, prev).await.ok().flatten(),
            None => None,
        };
        for segno in segnos {
            let name = names::pg::change_index(layout.system_id, &layout.segment_file_name(timeline, segno));
            let mut replace = false;
            if indexed.contains_key(&segno) {
                match read_index(repo, &layout, timeline, segno).await {
                    Ok(Some(index)) => {
                        report.present += 1;
                        carried = Some(index);
                        continue;
                    }
                    Ok(None) => {}
                    Err(p) if force => {
                        tracing::warn!(object = %name, problem = %p.why, "replacing an unusable change index object");
                        replace = true;
                    }
                    Err(p) => {
                        report.problems.push(format!("{p} (kept; --force replaces it)"));
                        carried = None;
                        continue;
                    }
                }
            }
            let start = match &carried {
                Some(prev) if prev.segno + 1 == segno && prev.timeline == timeline => Start::after(prev),
                _ => Start::Fresh,
            };
            let decoded = match decode_segment(repo, info, &catalog, timeline, segno, start).await {
                Ok(Some((index, true))) => index,
                Ok(_) => {
                    report.problems.push(format!("{}: WAL not held whole", layout.segment_file_name(timeline, segno)));
                    carried = None;
                    continue;
                }
                Err(ChangeIndexError::Repository(e)) => {
                    report.problems.push(format!("{}: {e}", layout.segment_file_name(timeline, segno)));
                    carried = None;
                    continue;
                }
                Err(e @ ChangeIndexError::Stopped { .. }) => return Err(e),
            };
            if replace {
                repo.delete(&name).await?;
            }
            match repo.put_sealed(&name, decoded.encode(), decoded.meta()).await {
                Ok(_) => {
                    if replace {
                        report.replaced += 1;
                    } else {
                        report.written += 1;
                    }
                }
                // Written meanwhile (by the sidecar, from a different start: another carry or
                // flags). A readable object for the segment is as good as ours: keep it.
                Err(e @ RepositoryError::Conflict { .. }) => match read_index(repo, &layout, timeline, segno).await {
                    Ok(Some(existing)) => {
                        report.present += 1;
                        carried = Some(existing);
                        continue;
                    }
                    Ok(None) | Err(_) => report.problems.push(e.to_string()),
                },
                Err(e) => return Err(e.into()),
            }
            carried = Some(decoded);
        }
    }
    Ok(report)
}

/// The newest usable index object of `timeline` at or below `segno`, for the sidecar to resume
/// after (it continues only if it is `segno` itself or the one just before).
pub async fn newest_at_or_before(
    repo: &Repository,
    layout: &WalLayout,
    timeline: u32,
    segno: u64,
) -> Result<Option<SegmentIndex>, ChangeIndexError> {
    let indexed = list_indexed(repo, layout, timeline).await?;
    for (&s, _) in indexed.range(..=segno).rev().take(4) {
        if let Ok(Some(index)) = read_index(repo, layout, timeline, s).await {
            return Ok(Some(index));
        }
    }
    Ok(None)
}

/// The index objects of segments `expire` removes: same name stem as the WAL segment.
pub fn object_for_segment(layout: &WalLayout, timeline: u32, segno: u64) -> String {
    names::pg::change_index(layout.system_id, &layout.segment_file_name(timeline, segno))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegmentIndex {
        let rel = RelFileLocator { spc: 1663, db: 5, rel: 16384 };
        SegmentIndex {
            timeline: 1,
            segno: 3,
            from_lsn: 3 << 24,
            to_lsn: (4 << 24) - 8,
            fresh: false,
            entries: vec![CommitEntry {
                xid: 900,
                commit_lsn: (3 << 24) + 100,
                end_lsn: (3 << 24) + 180,
                time_us: -5,
                relations: vec![RelCounts { rel, inserted: 1, updated: 2, deleted: 300 }],
                more_relations: true,
                dropped: vec![rel],
                truncated: vec![RelOid { db: 5, oid: 16390 }],
                ddl: true,
                incomplete: false,
            }],
            carry: AccumulatorState {
                open: vec![(
                    901,
                    OpenXact {
                        relations: vec![],
                        more_relations: false,
                        truncated: vec![],
                        ddl: true,
                        incomplete: true,
                    },
                )],
                horizon: Horizon::Below(850),
                overflow: Some(7),
            },
        }
    }

    #[test]
    fn round_trips_and_refuses_garbage() {
        let s = sample();
        let bytes = s.encode();
        assert_eq!(SegmentIndex::decode(&bytes), Some(s.clone()));
        let layout = WalLayout { system_id: 1, segment_size: 1 << 24 };
        assert!(s.fits(&layout, 1, 3));
        assert!(!s.fits(&layout, 1, 4));
        assert!(!s.fits(&layout, 2, 3));
        // Every truncation and a trailing byte are refused; random mutations never panic.
        for n in 0..bytes.len() {
            assert_eq!(SegmentIndex::decode(&bytes[..n]), None);
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(SegmentIndex::decode(&long), None);
        let mut x: u64 = 0x1234_5678;
        for _ in 0..2000 {
            let mut m = bytes.clone();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % m.len();
            m[i] = (x >> 32) as u8;
            let _ = SegmentIndex::decode(&m);
        }
        // A huge count is refused without allocating it.
        let mut huge = bytes[..9].to_vec();
        for v in [1u64, 3, 0, 0, 0, u64::MAX >> 1] {
            put(&mut huge, v);
        }
        assert_eq!(SegmentIndex::decode(&huge), None);
    }

    #[test]
    fn names_are_canonical() {
        let n = names::pg::change_index(7, "000000010000000000000003");
        assert_eq!(n, "pg/7/index/000000010000000000000003.idx");
        assert_eq!(names::pg::parse_change_index(7, &n), Some("000000010000000000000003"));
        assert_eq!(names::pg::parse_change_index(7, "pg/7/index/00000001000000000000000a.idx"), None);
        assert_eq!(names::pg::parse_change_index(7, "pg/7/index/000000010000000000000003.idx.x"), None);
    }
}
