//! One cluster's WAL in the repository: which object holds which bytes ([`WalObject`]), and the
//! segment arithmetic of one cluster ([`WalLayout`]). Object names are [`crate::names::pg`]'s,
//! PostgreSQL's segment file names and arithmetic [`pitr_pgformat::segment`]'s.

use pitr_pgformat::segment;

use crate::names::pg::{self, WalName};
use crate::repository::ClusterInfo;

/// Names and segment arithmetic of one cluster's WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalLayout {
    /// The cluster's system identifier.
    pub system_id: u64,
    /// Its WAL segment size in bytes.
    pub segment_size: u64,
}

/// A WAL object: what part of the WAL it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum WalObject {
    /// Bytes [`from`, `to`) of a segment still being written (offsets within the segment).
    Chunk {
        /// The timeline.
        timeline: u32,
        /// The segment number (LSN / segment size).
        segno: u64,
        /// First byte held.
        from: u32,
        /// Just past the last byte held.
        to: u32,
    },
    /// A whole segment.
    Segment {
        /// The timeline.
        timeline: u32,
        /// The segment number (LSN / segment size).
        segno: u64,
    },
    /// A timeline history file.
    History {
        /// The timeline it describes.
        timeline: u32,
    },
}

impl WalLayout {
    /// The layout of `info`'s cluster.
    pub fn new(info: &ClusterInfo) -> WalLayout {
        WalLayout { system_id: info.system_id, segment_size: info.wal_segment_size }
    }

    /// What every WAL object of the cluster starts with.
    pub fn prefix(&self) -> String {
        pg::wal_prefix(self.system_id)
    }

    /// PostgreSQL's file name for a segment: timeline, then the segment number in two halves.
    pub fn segment_file_name(&self, timeline: u32, segno: u64) -> String {
        segment::segment_file_name(timeline, segno, self.segment_size)
    }

    /// The timeline and segment number of a segment file name; `None` if it is not one, or not
    /// one of this segment size.
    pub fn parse_segment_file_name(&self, name: &str) -> Option<(u32, u64)> {
        segment::parse_segment_file_name(name, self.segment_size)
    }

    /// The segment number holding `lsn`.
    pub fn segno_of(&self, lsn: u64) -> u64 {
        segment::segment_of(lsn, self.segment_size)
    }

    /// The LSN at which segment `segno` begins.
    pub fn segment_start(&self, segno: u64) -> u64 {
        segment::segment_start(segno, self.segment_size)
    }

    /// What every object of one segment starts with (its chunks and the whole segment).
    pub fn segment_objects_prefix(&self, timeline: u32, segno: u64) -> String {
        pg::wal_segment_objects_prefix(self.system_id, &self.segment_file_name(timeline, segno))
    }

    /// The object's name.
    pub fn object_name(&self, obj: &WalObject) -> String {
        match *obj {
            WalObject::Segment { timeline, segno } => {
                pg::wal_segment(self.system_id, &self.segment_file_name(timeline, segno))
            }
            WalObject::Chunk { timeline, segno, from, to } => {
                pg::wal_chunk(self.system_id, &self.segment_file_name(timeline, segno), from, to)
            }
            WalObject::History { timeline } => pg::wal_history(self.system_id, timeline),
        }
    }

    /// The object a name stands for; `None` for a name that is not a WAL object of this cluster
    /// and segment size.
    pub fn parse_object_name(&self, name: &str) -> Option<WalObject> {
        match pg::parse_wal(self.system_id, name)? {
            WalName::Segment { segment_file } => {
                let (timeline, segno) = self.parse_segment_file_name(segment_file)?;
                Some(WalObject::Segment { timeline, segno })
            }
            WalName::Chunk { segment_file, from, to } => {
                let (timeline, segno) = self.parse_segment_file_name(segment_file)?;
                if u64::from(to) > self.segment_size {
                    return None;
                }
                Some(WalObject::Chunk { timeline, segno, from, to })
            }
            WalName::History { timeline } => Some(WalObject::History { timeline }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> WalLayout {
        WalLayout { system_id: 7, segment_size: 16 << 20 }
    }

    #[test]
    fn segment_names_match_postgres() {
        let l = layout();
        assert_eq!(l.segment_file_name(1, 0x1_0000_0000 / (16 << 20) + 0x2A), "00000001000000010000002A");
        assert_eq!(l.parse_segment_file_name("00000001000000010000002A"), Some((1, 256 + 0x2A)));
        assert_eq!(l.parse_segment_file_name("000000010000000100000100"), None);
        for obj in [
            WalObject::Segment { timeline: 2, segno: 77 },
            WalObject::Chunk { timeline: 1, segno: 3, from: 0, to: 0x2000 },
            WalObject::History { timeline: 3 },
        ] {
            assert_eq!(l.parse_object_name(&l.object_name(&obj)), Some(obj));
        }
        assert_eq!(l.parse_object_name("pg/7/wal/junk"), None);
        assert_eq!(l.parse_object_name("pg/7/wal/000000010000000000000003.00002000-00001000.chunk"), None);
        // Past the end of a 16 MiB segment, and a segment number a 16 MiB layout never makes.
        assert_eq!(l.parse_object_name("pg/7/wal/000000010000000000000003.00000000-01000001.chunk"), None);
        assert_eq!(l.parse_object_name("pg/7/wal/000000010000000000000100.seg"), None);
        assert_eq!(
            l.segment_objects_prefix(1, 3),
            "pg/7/wal/000000010000000000000003.",
            "a prefix of the segment's objects and of no other segment's"
        );
    }
}
