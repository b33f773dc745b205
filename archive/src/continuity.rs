//! Is the WAL a restore needs all there? Pure checks over a [`WalCatalog`] and timeline history.
//!
//! PostgreSQL treats a WAL file that `restore_command` cannot supply as the end of the archive,
//! so a hole in the middle of the archive silently ends recovery early. Everything here exists so
//! that a hole is named before a restore writes a file ([`reach`]), so that a base backup whose
//! WAL has a hole is not recorded (the same [`reach`], from the backup's start), and so that
//! `wal-fetch` can tell a hole from the end ([`needed_end`]).

use std::collections::BTreeMap;

use crate::{WalCatalog, WalLayout, WalObject};
use pitr_pgformat::timeline::HistoryEntry;

/// The timelines recovery follows to reach `newest`: each with the LSN where it begins (the
/// first at 0, each next at its parent's switch point), oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePath {
    /// The timeline recovery ends on (the target's).
    pub newest: u32,
    begins: Vec<(u32, u64)>,
}

impl TimelinePath {
    /// The path to `newest` from its history file's entries (empty for timeline 1, or when the
    /// history is unknown: then only `newest` itself is followed).
    pub fn new(newest: u32, history: &[HistoryEntry]) -> TimelinePath {
        let mut begins = Vec::with_capacity(history.len() + 1);
        let mut begin = 0;
        for e in history {
            begins.push((e.timeline, begin));
            begin = e.switch_lsn;
        }
        begins.push((newest, begin));
        TimelinePath { newest, begins }
    }

    /// The timeline recovery reads segment `segno` from: as PostgreSQL does, the newest one that
    /// begins at or before the segment (so a switch segment comes from the new timeline).
    pub fn timeline_of(&self, layout: WalLayout, segno: u64) -> u32 {
        self.begins.iter().rev().find(|(_, b)| layout.segno_of(*b) <= segno).map(|(t, _)| *t).unwrap_or(self.newest)
    }

    /// Where `timeline` was left for the next one on this path (`None` for the newest, or a
    /// timeline not on the path).
    pub fn switch_lsn(&self, timeline: u32) -> Option<u64> {
        let i = self.begins.iter().position(|(t, _)| *t == timeline)?;
        self.begins.get(i + 1).map(|(_, b)| *b)
    }

    /// Whether position `lsn` of `timeline` lies on this path (a backup taken there can be
    /// recovered along it).
    pub fn contains(&self, timeline: u32, lsn: u64) -> bool {
        if !self.begins.iter().any(|(t, _)| *t == timeline) {
            return false;
        }
        self.switch_lsn(timeline).is_none_or(|switch| lsn <= switch)
    }

    /// The timelines on the path, oldest first (`newest` last).
    pub fn timelines(&self) -> impl Iterator<Item = u32> + '_ {
        self.begins.iter().map(|(t, _)| *t)
    }
}

/// The newest archived LSN along `path`: WAL of an ancestor past its switch point is not on it.
pub fn path_end(wal: &WalCatalog, path: &TimelinePath) -> Option<u64> {
    path.timelines()
        .filter_map(|t| {
            let end = wal.end_lsn(t)?;
            Some(path.switch_lsn(t).map_or(end, |s| end.min(s)))
        })
        .max()
}

/// A segment recovery needs that the archive does not hold (or holds only the start of).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    /// The timeline recovery reads the segment from.
    pub timeline: u32,
    /// The segment's number (its start LSN divided by the segment size).
    pub segno: u64,
    /// Bytes of it held from its start (0: none).
    pub held: u64,
}

impl Hole {
    /// The object that is missing, as the repository would name it.
    pub fn object_name(&self, layout: WalLayout) -> String {
        layout.object_name(&WalObject::Segment { timeline: self.timeline, segno: self.segno })
    }

    /// For messages: `segment 000000010000000000000005 (pg/…/…seg) on timeline 1`, with what
    /// is held of it.
    pub fn describe(&self, layout: WalLayout) -> String {
        let held = if self.held > 0 { format!(", only its first {} bytes are held", self.held) } else { String::new() };
        format!(
            "WAL segment {} ({}) on timeline {}{held}",
            layout.segment_file_name(self.timeline, self.segno),
            self.object_name(layout),
            self.timeline
        )
    }
}

/// How far WAL is held without a break from a starting position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Recovery from the start can replay up to here.
    pub end_lsn: u64,
    /// Why it stops before the archive's end along the path; `None` when it reaches it.
    pub hole: Option<Hole>,
}

/// Follows `path` from `start_lsn` segment by segment while the archive holds each one whole;
/// the last segment of the path may be held only in part (the newest, still being written).
pub fn reach(wal: &WalCatalog, path: &TimelinePath, start_lsn: u64) -> Reach {
    let layout = wal.layout;
    let Some(end) = path_end(wal, path) else {
        return Reach { end_lsn: start_lsn, hole: None };
    };
    if end <= start_lsn {
        return Reach { end_lsn: end, hole: None };
    }
    let last = layout.segno_of(end - 1);
    for segno in layout.segno_of(start_lsn)..=last {
        let timeline = path.timeline_of(layout, segno);
        let held = wal.segments.get(&(timeline, segno)).map_or(0, |e| e.held_from_start(layout.segment_size));
        let seg_start = layout.segment_start(segno);
        // What this segment must hold: all of it, but for the path's last segment up to the end,
        // and for an ancestor's last segment up to where the path left it.
        let needed = if segno == last {
            end - seg_start
        } else {
            match path.switch_lsn(timeline) {
                Some(switch) if layout.segno_of(switch) == segno => switch - seg_start,
                _ => layout.segment_size,
            }
        };
        if held < needed {
            return Reach { end_lsn: seg_start + held, hole: Some(Hole { timeline, segno, held }) };
        }
    }
    Reach { end_lsn: end, hole: None }
}

/// How much of segment `segno` of `timeline` the archive must hold, judging by what it holds
/// after it: the whole segment if `timeline` has WAL in a later segment, up to a later timeline's
/// fork point from `timeline` if one lies in or after it; `None` if nothing says the segment
/// existed (then a missing segment is the end of the archive, not a hole).
///
/// `begins` is where `timeline` itself begins (its parent's switch point; 0 for timeline 1), and
/// `forks` the switch points at which later timelines left `timeline` (from their histories).
pub fn needed_end(wal: &WalCatalog, timeline: u32, segno: u64, begins: u64, forks: &[u64]) -> Option<u64> {
    let layout = wal.layout;
    if segno < layout.segno_of(begins) {
        return None;
    }
    let seg_end = layout.segment_start(segno + 1);
    let mut needed = None;
    if wal.segments.range((timeline, segno + 1)..=(timeline, u64::MAX)).next().is_some() {
        needed = Some(seg_end);
    }
    for &fork in forks {
        if fork > layout.segment_start(segno) {
            needed = needed.max(Some(fork.min(seg_end)));
        }
    }
    needed
}

/// Where each timeline begins and where later timelines forked from it, from histories.
#[derive(Debug, Clone, Default)]
pub struct Forks {
    begins: BTreeMap<u32, u64>,
    forks: BTreeMap<u32, Vec<u64>>,
}

impl Forks {
    /// Collects, from `(timeline, its history file's entries)` pairs, where each timeline began
    /// (its last entry's switch point) and where each ancestor was forked from.
    pub fn from_histories<'a>(histories: impl IntoIterator<Item = (u32, &'a [HistoryEntry])>) -> Forks {
        let mut out = Forks::default();
        for (timeline, entries) in histories {
            if let Some(parent) = entries.last() {
                out.begins.insert(timeline, parent.switch_lsn);
            }
            for e in entries {
                out.forks.entry(e.timeline).or_default().push(e.switch_lsn);
            }
        }
        out
    }

    /// [`needed_end`] for `timeline` with what the histories say about it.
    pub fn needed_end(&self, wal: &WalCatalog, timeline: u32, segno: u64) -> Option<u64> {
        let begins = self.begins.get(&timeline).copied().unwrap_or(0);
        let forks = self.forks.get(&timeline).map(Vec::as_slice).unwrap_or(&[]);
        needed_end(wal, timeline, segno, begins, forks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn layout() -> WalLayout {
        WalLayout { system_id: 1, segment_size: SEG }
    }

    fn catalog(objects: &[WalObject]) -> WalCatalog {
        let l = layout();
        let names: Vec<String> = objects.iter().map(|o| l.object_name(o)).collect();
        WalCatalog::from_names(l, names.iter().map(String::as_str))
    }

    fn seg(timeline: u32, segno: u64) -> WalObject {
        WalObject::Segment { timeline, segno }
    }

    fn chunk(timeline: u32, segno: u64, from: u32, to: u32) -> WalObject {
        WalObject::Chunk { timeline, segno, from, to }
    }

    #[test]
    fn a_missing_middle_segment_is_a_hole_and_the_end_is_not() {
        let wal = catalog(&[seg(1, 1), seg(1, 2), seg(1, 4), chunk(1, 5, 0, 100)]);
        let path = TimelinePath::new(1, &[]);
        assert_eq!(path_end(&wal, &path), Some(5 * SEG + 100));
        let r = reach(&wal, &path, SEG + 40);
        assert_eq!(r, Reach { end_lsn: 3 * SEG, hole: Some(Hole { timeline: 1, segno: 3, held: 0 }) });
        assert_eq!(reach(&wal, &path, 4 * SEG), Reach { end_lsn: 5 * SEG + 100, hole: None });
        // Asked for segment 3: WAL after it on timeline 1 says it existed.
        let forks = Forks::default();
        assert_eq!(forks.needed_end(&wal, 1, 3), Some(4 * SEG));
        // Asked for segment 6: past the end.
        assert_eq!(forks.needed_end(&wal, 1, 6), None);
    }

    #[test]
    fn chunks_only_segments_count_when_they_cover_it() {
        let full = SEG as u32;
        let wal = catalog(&[seg(1, 1), chunk(1, 2, 0, 100), chunk(1, 2, 100, full), seg(1, 3)]);
        let path = TimelinePath::new(1, &[]);
        assert_eq!(reach(&wal, &path, SEG), Reach { end_lsn: 4 * SEG, hole: None });
        // Only the start of a middle segment: a hole that says how much is there.
        let wal = catalog(&[seg(1, 1), chunk(1, 2, 0, 100), seg(1, 3)]);
        assert_eq!(
            reach(&wal, &path, SEG),
            Reach { end_lsn: 2 * SEG + 100, hole: Some(Hole { timeline: 1, segno: 2, held: 100 }) }
        );
        // Chunks that do not start at the segment's start hold nothing recovery can use.
        let wal = catalog(&[seg(1, 1), chunk(1, 2, 50, 100), seg(1, 3)]);
        assert_eq!(reach(&wal, &path, SEG).hole, Some(Hole { timeline: 1, segno: 2, held: 0 }));
    }

    #[test]
    fn timelines_are_followed_through_their_switch_points() {
        // Timeline 2 forks from 1 in the middle of segment 3.
        let history = [HistoryEntry { timeline: 1, switch_lsn: 3 * SEG + 500 }];
        let path = TimelinePath::new(2, &history);
        assert_eq!(path.timeline_of(layout(), 2), 1);
        assert_eq!(path.timeline_of(layout(), 3), 2);
        assert!(path.contains(1, 3 * SEG + 500));
        assert!(!path.contains(1, 3 * SEG + 501));
        assert!(path.contains(2, 10 * SEG));
        assert!(!path.contains(3, 0));
        // Timeline 1 ran on past the fork (an old primary): its tail is not on the path.
        let wal = catalog(&[seg(1, 1), seg(1, 2), chunk(1, 3, 0, 4000), seg(2, 3), chunk(2, 4, 0, 10)]);
        assert_eq!(reach(&wal, &path, SEG), Reach { end_lsn: 4 * SEG + 10, hole: None });
        // The fork segment missing from the new timeline is a hole, though timeline 1 has it.
        let wal = catalog(&[seg(1, 1), seg(1, 2), seg(1, 3), chunk(2, 4, 0, 10)]);
        assert_eq!(reach(&wal, &path, SEG).hole, Some(Hole { timeline: 2, segno: 3, held: 0 }));
        // Segment 2 of timeline 1 missing, with no later WAL on timeline 1: the fork at 3 says
        // timeline 1 reached segment 3, so 2 is a hole (wal-fetch's view) ...
        let wal = catalog(&[seg(1, 1), seg(2, 3)]);
        let forks = Forks::from_histories([(2, &history[..])]);
        assert_eq!(forks.needed_end(&wal, 1, 2), Some(3 * SEG));
        assert_eq!(forks.needed_end(&wal, 1, 3), Some(3 * SEG + 500));
        assert_eq!(forks.needed_end(&wal, 1, 4), None);
        // ... and timeline 2 never had segments before its fork segment.
        assert_eq!(forks.needed_end(&wal, 2, 2), None);
        assert_eq!(forks.needed_end(&wal, 2, 4), None);
        // The restore's view agrees.
        assert_eq!(reach(&wal, &path, SEG).hole, Some(Hole { timeline: 1, segno: 2, held: 0 }));
    }

    #[test]
    fn a_start_past_the_end_reaches_nothing() {
        let wal = catalog(&[seg(1, 1)]);
        let path = TimelinePath::new(1, &[]);
        assert_eq!(reach(&wal, &path, 5 * SEG), Reach { end_lsn: 2 * SEG, hole: None });
        let empty = catalog(&[]);
        assert_eq!(reach(&empty, &path, SEG), Reach { end_lsn: SEG, hole: None });
    }
}
