//! Every object name in a repository, built and parsed here and nowhere else.
//!
//! ```text
//! pitr-repository                                    MARKER: sealed, proves the key opens this repository
//! pitr-dedup-key                                     DEDUP_KEY: sealed, the key of block names
//! running/<kind>.<started µs>.<renewed µs>.<id>      run_marker: a backup, restore or drill in progress
//! running/expire.<started µs>.<expires µs>.<random>  expire_lock
//! pg/<system id>/cluster                             pg::cluster_info
//! pg/<system id>/wal/<segment>.seg                   pg::wal_segment (<segment>: PostgreSQL's file name)
//! pg/<system id>/wal/<segment>.<from>-<to>.chunk     pg::wal_chunk: bytes [from, to) of a segment
//! pg/<system id>/wal/<timeline>.history              pg::wal_history
//! pg/<system id>/blocks/<hh>/<hash>                  pg::block: base-backup content, by keyed hash
//! pg/<system id>/backups/<backup id>.manifest        pg::backup_manifest
//! pg/<system id>/lease/<generation>                  pg::lease: the WAL writer's lease
//! pg/<system id>/retention/<timeline>-<segno>.floor  pg::floor: below it retention removed WAL
//! pg/<system id>/pins/<backup id>.<seq>.pin          pg::pin: a backup's pin and note, newest seq wins
//! pg/<system id>/complete/<timeline>.<lsn>.<time µs> pg::complete_mark
//! pg/<system id>/restore-points/<timeline>.<lsn>     pg::restore_point: one restore point's index entry
//! pg/<system id>/drills/<start time>.json            pg::drill_result
//! pg/<system id>/index/<segment>.idx                pg::change_index: one WAL segment's commits
//! pg/<system id>/restores/<start µs>.json           pg::restore_timing: a restore run by hand, its timings
//! pg/<system id>/catalog/<timeline>.<lsn>            pg::catalog_snapshot: table names by relfilenode
//! mongo/<name>/oplog/<after ts>-<last ts>.slice      mongo::slice
//! mongo/<name>/gaps/<archived ts>-<next ts>.gap      mongo::gap
//! mongo/<name>/blocks/<hh>/<hash>                    mongo::block
//! mongo/<name>/snapshots/<id>.manifest               mongo::snapshot_manifest
//! mongo/<name>/complete/<ts>.<time µs>               mongo::complete_mark
//! mongo/<name>/drills/<start time>.json              mongo::drill_result
//! files/blocks/<hh>/<hash>                           files::block: file-set and dump content, by keyed hash
//! files/sets/<set>/<backup id>.manifest              files::tree_manifest: a file-tree backup
//! files/dumps/<set>/<dump id>.manifest               files::dump_manifest: a logical dump
//! journal/<seq>                                    journal::batch: signed batch <seq> (20 decimal digits) of the journal
//! ```
//! Numbers in names are fixed-width upper-case hex (µs times, LSNs and generations 16 digits,
//! timelines and chunk offsets 8), so that names sort in the order of what they count; an oplog
//! `ts` is `<seconds>.<increment>`, ten decimal digits each. `docs/archive-format.md` is the spec.
//!
//! Pure: no I/O, no policy. What a name means (a [`crate::WalObject`], a
//! [`crate::complete::CompleteMark`], a [`crate::running::RunKind`]) belongs to the module that
//! uses it; this module owns the bytes, so that a reader of the repository finds every kind of
//! object in one file, and a new kind of object starts here.

/// The repository marker: sealed, written by `pitr init`; every command checks the key opens it.
pub const MARKER: &str = "pitr-repository";

/// The dedup key: sealed 32 random bytes, the key of the block hash (shared by PostgreSQL and
/// MongoDB blocks).
pub const DEDUP_KEY: &str = "pitr-dedup-key";

/// Where running markers and the expire lock live (one repository's coordination, not data).
pub const RUNNING: &str = "running/";

/// One generation of a run's marker. `kind` is the run's word (`backup`, `restore`, `drill`).
pub fn run_marker(kind: &str, started_us: i64, renewed_us: i64, id: &str) -> String {
    format!("{RUNNING}{kind}.{started_us:016X}.{renewed_us:016X}.{id}")
}

/// The expire lock, valid until `expires_us`; `random` keeps two racing locks apart.
pub fn expire_lock(started_us: i64, expires_us: i64, random: &str) -> String {
    format!("{RUNNING}expire.{started_us:016X}.{expires_us:016X}.{random}")
}

/// What a name under [`RUNNING`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunningName<'a> {
    /// One generation of a run's marker.
    Run {
        /// The run's word, unchecked (`backup`, `restore`, `drill`).
        kind: &'a str,
        /// When the run began, µs since the Unix epoch.
        started_us: i64,
        /// When this generation was put (the start, for a marker of a pitr before renewal).
        renewed_us: i64,
        /// The run's random id.
        id: &'a str,
    },
    /// The expire lock.
    Expire {
        /// When the lock was taken.
        started_us: i64,
        /// When it stops holding anyone off.
        expires_us: i64,
    },
}

/// `text` as a number if it is exactly `width` upper-case hex digits, as pitr writes numbers in
/// names. Anything else (lower case, a sign, another width) is not a name pitr wrote: accepting it
/// would let a second name stand for the same object, e.g. a planted `…2a.seg` beside a missing
/// `…2A.seg`.
fn canonical_hex(text: &str, width: usize) -> Option<u64> {
    if text.len() != width || !text.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)) {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// Parses a marker or lock name; `None` for anything else.
pub fn parse_running(name: &str) -> Option<RunningName<'_>> {
    let rest = name.strip_prefix(RUNNING)?;
    let parts: Vec<&str> = rest.split('.').collect();
    let us = |s: &str| canonical_hex(s, 16).and_then(|v| i64::try_from(v).ok());
    let id_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    match parts.as_slice() {
        ["expire", started, expires, _] => {
            Some(RunningName::Expire { started_us: us(started)?, expires_us: us(expires)? })
        }
        [kind, started, renewed, id] if id_ok(id) => {
            Some(RunningName::Run { kind, started_us: us(started)?, renewed_us: us(renewed)?, id })
        }
        // `running/backup.<started µs>.<id>`, before renewal existed: renewed at its start.
        ["backup", started, id] if id_ok(id) => {
            let started_us = us(started)?;
            Some(RunningName::Run { kind: "backup", started_us, renewed_us: started_us, id })
        }
        _ => None,
    }
}

/// Whether `name` is a running marker or the expire lock.
pub fn is_running(name: &str) -> bool {
    name.starts_with(RUNNING)
}

/// `<prefix>blocks/<first two characters>/<block id>`: 256 directories, so that no directory of
/// a local repository grows to millions of entries.
fn block_under(prefix: &str, block_id: &str) -> String {
    format!("{prefix}blocks/{}/{block_id}", &block_id[..2.min(block_id.len())])
}

/// `<prefix>drills/<start time>.json`, the start time as the report prints it with the
/// characters some stores dislike replaced.
fn drill_result_under(prefix: &str, start_time: &str) -> String {
    format!("{prefix}drills/{}.json", start_time.replace([' ', ':', '+', '.'], "_"))
}

/// The journal: repository-wide, signed batches that chain every journaled put and delete
/// (`crate::journal` owns what they hold).
pub mod journal {
    /// Where the journal's batches live.
    pub const PREFIX: &str = "journal/";

    /// Batch `seq`: 20 decimal digits, zero-padded, so that names sort in seq order.
    pub fn batch(seq: u64) -> String {
        format!("{PREFIX}{seq:020}")
    }

    /// The seq of a batch name; `None` for anything that is not exactly what [`batch`] builds.
    pub fn parse_batch(name: &str) -> Option<u64> {
        let digits = name.strip_prefix(PREFIX)?;
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }
}

/// PostgreSQL clusters: everything under `pg/<system id>/`.
pub mod pg {
    use pitr_pgformat::timeline::{history_file_name, parse_history_file_name, HISTORY_SUFFIX};

    /// Where every PostgreSQL cluster lives.
    pub const ROOT: &str = "pg/";

    /// Where one cluster lives: `pg/<system id>/`.
    pub fn prefix(system_id: u64) -> String {
        format!("{ROOT}{system_id}/")
    }

    /// The cluster's record (segment size, page size, server version).
    pub fn cluster_info(system_id: u64) -> String {
        format!("{}cluster", prefix(system_id))
    }

    /// The system id of a cluster record's name (a name listed under [`ROOT`]).
    pub fn parse_cluster_info(name: &str) -> Option<u64> {
        let mut parts = name.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("pg"), Some(id), Some("cluster")) => id.parse::<u64>().ok(),
            _ => None,
        }
    }

    /// Where the cluster's WAL lives: segments, chunks and history files.
    pub fn wal_prefix(system_id: u64) -> String {
        format!("{}wal/", prefix(system_id))
    }

    /// A whole segment; `segment_file` is PostgreSQL's name of it
    /// ([`pitr_pgformat::segment::segment_file_name`]).
    pub fn wal_segment(system_id: u64, segment_file: &str) -> String {
        format!("{}{segment_file}.seg", wal_prefix(system_id))
    }

    /// Bytes [`from`, `to`) of a segment (offsets within it), written before the segment is whole.
    pub fn wal_chunk(system_id: u64, segment_file: &str, from: u32, to: u32) -> String {
        format!("{}{segment_file}.{from:08X}-{to:08X}.chunk", wal_prefix(system_id))
    }

    /// What every object of one segment starts with: its chunks and the whole segment.
    pub fn wal_segment_objects_prefix(system_id: u64, segment_file: &str) -> String {
        format!("{}{segment_file}.", wal_prefix(system_id))
    }

    /// A timeline history file, under PostgreSQL's name for it.
    pub fn wal_history(system_id: u64, timeline: u32) -> String {
        format!("{}{}", wal_prefix(system_id), history_file_name(timeline))
    }

    /// What a name under [`wal_prefix`] says. Whether the segment file name is one of the
    /// cluster's segment size, and the offsets within it, is for [`crate::WalLayout`] to check.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum WalName<'a> {
        /// A whole segment.
        Segment {
            /// PostgreSQL's name of the segment (unchecked).
            segment_file: &'a str,
        },
        /// Bytes [`from`, `to`) of a segment; `from < to`.
        Chunk {
            /// PostgreSQL's name of the segment (unchecked).
            segment_file: &'a str,
            /// First byte held, offset within the segment.
            from: u32,
            /// Just past the last byte held.
            to: u32,
        },
        /// A timeline history file.
        History {
            /// The timeline it describes.
            timeline: u32,
        },
    }

    /// Parses a WAL object name of cluster `system_id`; `None` for anything else.
    pub fn parse_wal(system_id: u64, name: &str) -> Option<WalName<'_>> {
        let rest = name.strip_prefix(&wal_prefix(system_id))?;
        // PostgreSQL names segments and history files in upper-case hex only.
        let segment_file_ok = |f: &str| {
            f.len() == 24 && super::canonical_hex(&f[..8], 8).is_some() && super::canonical_hex(&f[8..], 16).is_some()
        };
        if let Some(segment_file) = rest.strip_suffix(".seg") {
            return segment_file_ok(segment_file).then_some(WalName::Segment { segment_file });
        }
        if let Some(chunk) = rest.strip_suffix(".chunk") {
            let (segment_file, range) = chunk.split_once('.')?;
            let (from, to) = range.split_once('-')?;
            let from = u32::try_from(super::canonical_hex(from, 8)?).ok()?;
            let to = u32::try_from(super::canonical_hex(to, 8)?).ok()?;
            if from >= to || !segment_file_ok(segment_file) {
                return None;
            }
            return Some(WalName::Chunk { segment_file, from, to });
        }
        if let Some(stem) = rest.strip_suffix(HISTORY_SUFFIX) {
            super::canonical_hex(stem, 8)?;
            return Some(WalName::History { timeline: parse_history_file_name(rest)? });
        }
        None
    }

    /// Where base-backup blocks live.
    pub fn blocks_prefix(system_id: u64) -> String {
        format!("{}blocks/", prefix(system_id))
    }

    /// A block of base-backup file content, named by the keyed hash of its plaintext.
    pub fn block(system_id: u64, block_id: &str) -> String {
        super::block_under(&prefix(system_id), block_id)
    }

    /// Where backup manifests live.
    pub fn backups_prefix(system_id: u64) -> String {
        format!("{}backups/", prefix(system_id))
    }

    /// A backup's manifest (written last: a backup without one does not exist).
    pub fn backup_manifest(system_id: u64, backup_id: &str) -> String {
        format!("{}{backup_id}.manifest", backups_prefix(system_id))
    }

    /// The backup id of a manifest's name.
    pub fn parse_backup_manifest(system_id: u64, name: &str) -> Option<&str> {
        name.strip_prefix(&backups_prefix(system_id))?.strip_suffix(".manifest")
    }

    /// Where the generations of the WAL writer's lease live.
    pub fn lease_prefix(system_id: u64) -> String {
        format!("{}lease/", prefix(system_id))
    }

    /// One generation of the lease.
    pub fn lease(system_id: u64, generation: u64) -> String {
        format!("{}{generation:016X}", lease_prefix(system_id))
    }

    /// The generation of a lease object's name.
    pub fn parse_lease(system_id: u64, name: &str) -> Option<u64> {
        super::canonical_hex(name.strip_prefix(&lease_prefix(system_id))?, 16)
    }

    /// Whether `name` is a lease generation of any cluster.
    pub fn is_lease(name: &str) -> bool {
        let mut parts = name.split('/');
        parts.next() == Some("pg") && parts.next().is_some() && parts.next() == Some("lease")
    }

    /// Where retention floors live.
    pub fn floors_prefix(system_id: u64) -> String {
        format!("{}retention/", prefix(system_id))
    }

    /// The floor of `timeline` at segment number `segno`.
    pub fn floor(system_id: u64, timeline: u32, segno: u64) -> String {
        format!("{}{timeline:08X}-{segno:016X}.floor", floors_prefix(system_id))
    }

    /// The timeline and segment number of a floor's name.
    pub fn parse_floor(system_id: u64, name: &str) -> Option<(u32, u64)> {
        let rest = name.strip_prefix(&floors_prefix(system_id))?.strip_suffix(".floor")?;
        let (timeline, segno) = rest.split_once('-')?;
        Some((u32::try_from(super::canonical_hex(timeline, 8)?).ok()?, super::canonical_hex(segno, 16)?))
    }

    /// Where pin records live.
    pub fn pins_prefix(system_id: u64) -> String {
        format!("{}pins/", prefix(system_id))
    }

    /// Whether `id` can be a backup id in a pin's name: 1 to 64 ASCII letters and digits (pitr's
    /// ids are `YYYYMMDDTHHMMSSZ`), so that a name built from what a user typed has no `.` or `/`
    /// to be misread.
    pub fn is_pinnable_id(id: &str) -> bool {
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
    }

    /// Change number `seq` of the pin of backup `backup_id` (the highest that opens is in force).
    pub fn pin(system_id: u64, backup_id: &str, seq: u64) -> String {
        format!("{}{backup_id}.{seq:016X}.pin", pins_prefix(system_id))
    }

    /// The backup id and change number of a pin record's name.
    pub fn parse_pin(system_id: u64, name: &str) -> Option<(&str, u64)> {
        let rest = name.strip_prefix(&pins_prefix(system_id))?.strip_suffix(".pin")?;
        let (id, seq) = rest.split_once('.')?;
        is_pinnable_id(id).then_some(())?;
        Some((id, super::canonical_hex(seq, 16)?))
    }

    /// Where completeness marks live.
    pub fn complete_prefix(system_id: u64) -> String {
        format!("{}complete/", prefix(system_id))
    }

    /// What the marks of one timeline start with (they are pruned per timeline).
    pub fn complete_timeline_prefix(system_id: u64, timeline: u32) -> String {
        format!("{}{timeline:08X}.", complete_prefix(system_id))
    }

    /// A completeness mark: at the primary's clock `server_time_us`, its WAL on `timeline` ended
    /// at `lsn`, all of it archived. A negative time is written as 0.
    pub fn complete_mark(system_id: u64, timeline: u32, lsn: u64, server_time_us: i64) -> String {
        format!("{}{lsn:016X}.{:016X}", complete_timeline_prefix(system_id, timeline), server_time_us.max(0) as u64)
    }

    /// The timeline, LSN and server time of a mark's name.
    pub fn parse_complete_mark(system_id: u64, name: &str) -> Option<(u32, u64, i64)> {
        let rest = name.strip_prefix(&complete_prefix(system_id))?;
        let mut parts = rest.split('.');
        let (t, l, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Some((
            u32::try_from(super::canonical_hex(t, 8)?).ok()?,
            super::canonical_hex(l, 16)?,
            i64::try_from(super::canonical_hex(s, 16)?).ok()?,
        ))
    }

    /// Where the index of restore points lives.
    pub fn restore_points_prefix(system_id: u64) -> String {
        format!("{}restore-points/", prefix(system_id))
    }

    /// The index entry of the restore point whose WAL record starts at `lsn` on `timeline`
    /// (one record, one name: WAL at a place on a timeline never changes).
    pub fn restore_point(system_id: u64, timeline: u32, lsn: u64) -> String {
        format!("{}{timeline:08X}.{lsn:016X}", restore_points_prefix(system_id))
    }

    /// The timeline and record LSN of an index entry's name.
    pub fn parse_restore_point(system_id: u64, name: &str) -> Option<(u32, u64)> {
        let rest = name.strip_prefix(&restore_points_prefix(system_id))?;
        let (timeline, lsn) = rest.split_once('.')?;
        Some((u32::try_from(super::canonical_hex(timeline, 8)?).ok()?, super::canonical_hex(lsn, 16)?))
    }

    /// Where catalog snapshots live (`pitr find`'s names of relfilenodes).
    pub fn catalog_prefix(system_id: u64) -> String {
        format!("{}catalog/", prefix(system_id))
    }

    /// The catalog snapshot taken on `timeline` when the server's WAL insert position was `lsn`
    /// (read before the catalog query).
    pub fn catalog_snapshot(system_id: u64, timeline: u32, lsn: u64) -> String {
        format!("{}{timeline:08X}.{lsn:016X}", catalog_prefix(system_id))
    }

    /// The timeline and LSN of a catalog snapshot's name.
    pub fn parse_catalog_snapshot(system_id: u64, name: &str) -> Option<(u32, u64)> {
        let rest = name.strip_prefix(&catalog_prefix(system_id))?;
        let (timeline, lsn) = rest.split_once('.')?;
        Some((u32::try_from(super::canonical_hex(timeline, 8)?).ok()?, super::canonical_hex(lsn, 16)?))
    }

    /// Where drill results live.
    pub fn drills_prefix(system_id: u64) -> String {
        format!("{}drills/", prefix(system_id))
    }

    /// Where the change index lives (one object per WAL segment).
    pub fn change_index_prefix(system_id: u64) -> String {
        format!("{}index/", prefix(system_id))
    }

    /// The change index of one WAL segment; `segment_file` is PostgreSQL's name of it.
    pub fn change_index(system_id: u64, segment_file: &str) -> String {
        format!("{}{segment_file}.idx", change_index_prefix(system_id))
    }

    /// The segment file name of a change index object's name (upper-case hex only); whether it
    /// is one of the cluster's segment size is for [`crate::WalLayout`] to check.
    pub fn parse_change_index(system_id: u64, name: &str) -> Option<&str> {
        let rest = name.strip_prefix(&change_index_prefix(system_id))?;
        let segment_file = rest.strip_suffix(".idx")?;
        let ok = segment_file.len() == 24
            && super::canonical_hex(&segment_file[..8], 8).is_some()
            && super::canonical_hex(&segment_file[8..], 16).is_some();
        ok.then_some(segment_file)
    }

    /// The result of the drill that started at `start_time` (as its report prints it).
    pub fn drill_result(system_id: u64, start_time: &str) -> String {
        super::drill_result_under(&prefix(system_id), start_time)
    }

    /// Where the timings of restores run by hand live (the predicted RTO learns from them).
    pub fn restore_timings_prefix(system_id: u64) -> String {
        format!("{}restores/", prefix(system_id))
    }

    /// The timings of the restore that started at `start_us` (µs since the epoch; negative as 0).
    pub fn restore_timing(system_id: u64, start_us: i64) -> String {
        format!("{}{:016X}.json", restore_timings_prefix(system_id), start_us.max(0) as u64)
    }

    /// The start time (µs) of a restore timing record's name.
    pub fn parse_restore_timing(system_id: u64, name: &str) -> Option<i64> {
        let rest = name.strip_prefix(&restore_timings_prefix(system_id))?.strip_suffix(".json")?;
        i64::try_from(super::canonical_hex(rest, 16)?).ok()
    }
}

/// File trees (`[[files]]`) and logical dumps (`[[dumps]]`): one block store shared by every
/// set, so that equal content in two sets (or two days' dumps) is stored once.
pub mod files {
    /// Where every file-set and dump object lives.
    pub const ROOT: &str = "files/";

    /// Whether `set` may name a file set or dump set: 1 to 64 of `a-z 0-9 _ -`, not starting
    /// with `-`. Names become object-name components and directory names, so nothing else.
    pub fn valid_set_name(set: &str) -> bool {
        !set.is_empty()
            && set.len() <= 64
            && !set.starts_with('-')
            && set.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    }

    /// Where the blocks of every set live.
    pub const BLOCKS: &str = "files/blocks/";

    /// A block of file or dump content, named by the keyed hash of its plaintext.
    pub fn block(block_id: &str) -> String {
        super::block_under(ROOT, block_id)
    }

    /// The block id of a name under [`BLOCKS`] (64 lower-case hex digits under their first two).
    pub fn parse_block(name: &str) -> Option<&str> {
        let rest = name.strip_prefix(BLOCKS)?;
        let (hh, id) = rest.split_once('/')?;
        let hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (id.len() == 64 && hex(id) && id.starts_with(hh) && hh.len() == 2).then_some(id)
    }

    /// Where the backups of file set `set` live.
    pub fn sets_prefix(set: &str) -> String {
        format!("{ROOT}sets/{set}/")
    }

    /// Where the backups of every file set live.
    pub const SETS: &str = "files/sets/";

    /// A file-tree backup's manifest (written last).
    pub fn tree_manifest(set: &str, id: &str) -> String {
        format!("{}{id}.manifest", sets_prefix(set))
    }

    /// The set and backup id of a name under [`SETS`].
    pub fn parse_tree_manifest(name: &str) -> Option<(&str, &str)> {
        parse_manifest(SETS, name)
    }

    /// Where the dumps of every dump set live.
    pub const DUMPS: &str = "files/dumps/";

    /// Where the dumps of dump set `set` live.
    pub fn dumps_prefix(set: &str) -> String {
        format!("{DUMPS}{set}/")
    }

    /// A logical dump's manifest (written last).
    pub fn dump_manifest(set: &str, id: &str) -> String {
        format!("{}{id}.manifest", dumps_prefix(set))
    }

    /// The set and dump id of a name under [`DUMPS`].
    pub fn parse_dump_manifest(name: &str) -> Option<(&str, &str)> {
        parse_manifest(DUMPS, name)
    }

    fn parse_manifest<'a>(root: &str, name: &'a str) -> Option<(&'a str, &'a str)> {
        let (set, file) = name.strip_prefix(root)?.split_once('/')?;
        let id = file.strip_suffix(".manifest")?;
        (valid_set_name(set) && valid_id(id)).then_some((set, id))
    }

    /// Whether `id` is a backup or dump id: its start in UTC as `YYYYMMDDTHHMMSSZ`.
    pub fn valid_id(id: &str) -> bool {
        let b = id.as_bytes();
        b.len() == 16
            && b[..8].iter().all(u8::is_ascii_digit)
            && b[8] == b'T'
            && b[9..15].iter().all(u8::is_ascii_digit)
            && b[15] == b'Z'
    }
}

/// MongoDB replica sets: everything under `mongo/<name>/`, `<name>` being `[mongo] name`.
pub mod mongo {
    /// Where every MongoDB source lives.
    pub const ROOT: &str = "mongo/";

    /// An oplog `ts` as names carry it: (seconds, increment).
    pub type OplogTs = (u32, u32);

    /// Where one source lives: `mongo/<name>/`.
    pub fn prefix(source: &str) -> String {
        format!("{ROOT}{source}/")
    }

    /// The source name of any object under [`ROOT`].
    pub fn parse_source(name: &str) -> Option<&str> {
        name.strip_prefix(ROOT).and_then(|rest| rest.split('/').next())
    }

    /// A `ts` in a name: `<seconds>.<increment>`, ten digits each, so that names sort in oplog
    /// order.
    pub fn ts(ts: OplogTs) -> String {
        format!("{:010}.{:010}", ts.0, ts.1)
    }

    /// Parses a `ts` as [`ts`] writes it.
    pub fn parse_ts(text: &str) -> Option<OplogTs> {
        let (secs, inc) = text.split_once('.')?;
        if secs.len() != 10 || inc.len() != 10 {
            return None;
        }
        Some((secs.parse().ok()?, inc.parse().ok()?))
    }

    /// Where oplog slices live.
    pub fn oplog_prefix(source: &str) -> String {
        format!("{}oplog/", prefix(source))
    }

    /// The slice holding the entries after `after` up to and including `last`.
    pub fn slice(source: &str, after: OplogTs, last: OplogTs) -> String {
        format!("{}{}-{}.slice", oplog_prefix(source), ts(after), ts(last))
    }

    /// The `after` and `last` of a slice's name.
    pub fn parse_slice(source: &str, name: &str) -> Option<(OplogTs, OplogTs)> {
        parse_range(&oplog_prefix(source), ".slice", name)
    }

    /// Where recorded gaps live.
    pub fn gaps_prefix(source: &str) -> String {
        format!("{}gaps/", prefix(source))
    }

    /// A recorded gap: the entries between `archived` and `next` were lost (the oplog rolled over).
    pub fn gap(source: &str, archived: OplogTs, next: OplogTs) -> String {
        format!("{}{}-{}.gap", gaps_prefix(source), ts(archived), ts(next))
    }

    /// The `archived` and `next` of a gap's name.
    pub fn parse_gap(source: &str, name: &str) -> Option<(OplogTs, OplogTs)> {
        parse_range(&gaps_prefix(source), ".gap", name)
    }

    fn parse_range(prefix: &str, ext: &str, name: &str) -> Option<(OplogTs, OplogTs)> {
        let rest = name.strip_prefix(prefix)?.strip_suffix(ext)?;
        let (a, b) = rest.split_once('-')?;
        Some((parse_ts(a)?, parse_ts(b)?))
    }

    /// Where snapshot blocks live.
    pub fn blocks_prefix(source: &str) -> String {
        format!("{}blocks/", prefix(source))
    }

    /// A block of snapshot documents, named by the keyed hash of its plaintext.
    pub fn block(source: &str, block_id: &str) -> String {
        super::block_under(&prefix(source), block_id)
    }

    /// Where snapshot manifests live.
    pub fn snapshots_prefix(source: &str) -> String {
        format!("{}snapshots/", prefix(source))
    }

    /// A snapshot's manifest (written last).
    pub fn snapshot_manifest(source: &str, id: &str) -> String {
        format!("{}{id}.manifest", snapshots_prefix(source))
    }

    /// Whether `name` is a snapshot manifest of `source`.
    pub fn is_snapshot_manifest(source: &str, name: &str) -> bool {
        name.starts_with(&snapshots_prefix(source)) && name.ends_with(".manifest")
    }

    /// Where completeness marks live.
    pub fn complete_prefix(source: &str) -> String {
        format!("{}complete/", prefix(source))
    }

    /// A completeness mark: at the server's clock `time_us` the archive held every entry up to
    /// `ts` and the server nothing newer. A negative time is written as 0.
    pub fn complete_mark(source: &str, ts: OplogTs, time_us: i64) -> String {
        format!("{}{}.{:016X}", complete_prefix(source), self::ts(ts), time_us.max(0) as u64)
    }

    /// The `ts` and server time of a mark's name.
    pub fn parse_complete_mark(source: &str, name: &str) -> Option<(OplogTs, i64)> {
        let rest = name.strip_prefix(&complete_prefix(source))?;
        let (ts, time) = rest.rsplit_once('.')?;
        Some((parse_ts(ts)?, i64::try_from(super::canonical_hex(time, 16)?).ok()?))
    }

    /// Where drill results live.
    pub fn drills_prefix(source: &str) -> String {
        format!("{}drills/", prefix(source))
    }

    /// The result of the drill that started at `start_time` (as its report prints it).
    pub fn drill_result(source: &str, start_time: &str) -> String {
        super::drill_result_under(&prefix(source), start_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The literals pin the format: objects already in repositories carry these names.
    #[test]
    fn pg_names_are_the_archived_ones() {
        let file = "00000001000000010000002A";
        assert_eq!(pg::cluster_info(7), "pg/7/cluster");
        assert_eq!(pg::parse_cluster_info("pg/7/cluster"), Some(7));
        assert_eq!(pg::parse_cluster_info("pg/x/cluster"), None);
        assert_eq!(pg::parse_cluster_info("pg/7/wal/"), None);
        assert_eq!(pg::wal_segment(7, file), "pg/7/wal/00000001000000010000002A.seg");
        assert_eq!(pg::wal_chunk(7, file, 0, 0x2000), "pg/7/wal/00000001000000010000002A.00000000-00002000.chunk");
        assert_eq!(pg::wal_segment_objects_prefix(7, file), "pg/7/wal/00000001000000010000002A.");
        assert_eq!(pg::wal_history(7, 3), "pg/7/wal/00000003.history");
        assert_eq!(pg::restore_timing(7, 0x2A), "pg/7/restores/000000000000002A.json");
        assert_eq!(pg::parse_restore_timing(7, "pg/7/restores/000000000000002A.json"), Some(0x2A));
        assert_eq!(pg::parse_restore_timing(7, "pg/7/restores/000000000000002a.json"), None);
        assert_eq!(pg::parse_restore_timing(7, "pg/7/restores/2A.json"), None);
        for (name, parsed) in [
            ("pg/7/wal/00000001000000010000002A.seg", pg::WalName::Segment { segment_file: file }),
            (
                "pg/7/wal/00000001000000010000002A.00000000-00002000.chunk",
                pg::WalName::Chunk { segment_file: file, from: 0, to: 0x2000 },
            ),
            ("pg/7/wal/00000003.history", pg::WalName::History { timeline: 3 }),
        ] {
            assert_eq!(pg::parse_wal(7, name), Some(parsed), "{name}");
            assert_eq!(pg::parse_wal(8, name), None, "{name}");
        }
        for junk in [
            "pg/7/wal/junk",
            "pg/7/wal/00000001000000010000002A.00002000-00001000.chunk",
            "pg/7/wal/00000001000000010000002A.0000-2000.chunk",
            "pg/7/wal/0003.history",
            // Lower case, signs and other widths are not names pitr (or PostgreSQL) writes.
            "pg/7/wal/00000001000000010000002a.seg",
            "pg/7/wal/00000001000000010000002a.00000000-00002000.chunk",
            "pg/7/wal/00000001000000010000002A.00000000-00002a00.chunk",
            "pg/7/wal/00000001000000010000002A.+0000000-00002000.chunk",
            "pg/7/wal/0000000100000001000002A.seg",
            "pg/7/wal/0000000a.history",
        ] {
            assert_eq!(pg::parse_wal(7, junk), None, "{junk}");
        }
        assert_eq!(pg::block(7, "abcd"), "pg/7/blocks/ab/abcd");
        assert_eq!(pg::backup_manifest(7, "20260101T000000Z"), "pg/7/backups/20260101T000000Z.manifest");
        assert_eq!(pg::parse_backup_manifest(7, "pg/7/backups/b1.manifest"), Some("b1"));
        assert_eq!(pg::parse_backup_manifest(7, "pg/7/backups/b1.json"), None);
        assert_eq!(pg::lease(7, 10), "pg/7/lease/000000000000000A");
        assert_eq!(pg::parse_lease(7, "pg/7/lease/000000000000000A"), Some(10));
        assert!(pg::is_lease("pg/7/lease/000000000000000A"));
        assert!(!pg::is_lease("pg/7/wal/00000003.history"));
        assert_eq!(pg::floor(7, 2, 0x1F), "pg/7/retention/00000002-000000000000001F.floor");
        assert_eq!(pg::parse_floor(7, "pg/7/retention/00000002-000000000000001F.floor"), Some((2, 0x1F)));
        assert_eq!(pg::parse_floor(7, "pg/7/retention/x"), None);
        for junk in [
            "pg/7/retention/00000002-000000000000001f.floor",
            "pg/7/retention/2-1F.floor",
            "pg/7/retention/00000002-+00000000000001F.floor",
        ] {
            assert_eq!(pg::parse_floor(7, junk), None, "{junk}");
        }
        assert_eq!(pg::parse_lease(7, "pg/7/lease/000000000000000a"), None);
        let mark = pg::complete_mark(7, 2, 0x1_0000_0100, 5);
        assert_eq!(mark, "pg/7/complete/00000002.0000000100000100.0000000000000005");
        assert_eq!(pg::parse_complete_mark(7, &mark), Some((2, 0x1_0000_0100, 5)));
        assert_eq!(pg::parse_complete_mark(7, "pg/7/complete/junk"), None);
        assert_eq!(pg::parse_complete_mark(7, "pg/7/complete/00000002.000000010000010a.0000000000000005"), None);
        assert_eq!(pg::drill_result(7, "2026-11-25 14:03:00.5+00"), "pg/7/drills/2026-11-25_14_03_00_5_00.json");
        assert_eq!(pg::drills_prefix(7), "pg/7/drills/");
        let point = pg::restore_point(7, 2, 0x1_0000_0128);
        assert_eq!(point, "pg/7/restore-points/00000002.0000000100000128");
        assert_eq!(pg::parse_restore_point(7, &point), Some((2, 0x1_0000_0128)));
        for junk in [
            "pg/7/restore-points/00000002.000000010000012a",
            "pg/7/restore-points/2.0000000100000128",
            "pg/7/restore-points/00000002.0000000100000128.x",
            "pg/8/restore-points/00000002.0000000100000128",
        ] {
            assert_eq!(pg::parse_restore_point(7, junk), None, "{junk}");
        }
    }

    #[test]
    fn running_names_are_the_archived_ones() {
        let run = run_marker("drill", 1, 2, "ab12");
        assert_eq!(run, "running/drill.0000000000000001.0000000000000002.ab12");
        assert_eq!(
            parse_running(&run),
            Some(RunningName::Run { kind: "drill", started_us: 1, renewed_us: 2, id: "ab12" })
        );
        let lock = expire_lock(1, 3, "ff");
        assert_eq!(lock, "running/expire.0000000000000001.0000000000000003.ff");
        assert_eq!(parse_running(&lock), Some(RunningName::Expire { started_us: 1, expires_us: 3 }));
        assert_eq!(
            parse_running("running/backup.0000000000000001.ab12"),
            Some(RunningName::Run { kind: "backup", started_us: 1, renewed_us: 1, id: "ab12" })
        );
        assert_eq!(parse_running("running/drill.0000000000000001.0000000000000002.a-b"), None);
        assert_eq!(parse_running("pg/7/running/x"), None);
        for junk in [
            "running/drill.000000000000000a.0000000000000002.ab12",
            "running/drill.1.2.ab12",
            "running/expire.0000000000000001.+000000000000003.ff",
        ] {
            assert_eq!(parse_running(junk), None, "{junk}");
        }
        assert!(is_running(&lock));
    }

    #[test]
    fn mongo_names_are_the_archived_ones() {
        let slice = mongo::slice("rs0", (10, 0), (10, 5));
        assert_eq!(slice, "mongo/rs0/oplog/0000000010.0000000000-0000000010.0000000005.slice");
        assert_eq!(mongo::parse_slice("rs0", &slice), Some(((10, 0), (10, 5))));
        assert_eq!(mongo::parse_gap("rs0", &slice), None);
        let gap = mongo::gap("rs0", (1, 1), (2, 2));
        assert_eq!(gap, "mongo/rs0/gaps/0000000001.0000000001-0000000002.0000000002.gap");
        assert_eq!(mongo::parse_gap("rs0", &gap), Some(((1, 1), (2, 2))));
        assert_eq!(mongo::parse_ts("12.3"), None);
        assert_eq!(mongo::block("rs0", "abcd"), "mongo/rs0/blocks/ab/abcd");
        assert_eq!(mongo::snapshot_manifest("rs0", "s1"), "mongo/rs0/snapshots/s1.manifest");
        assert!(mongo::is_snapshot_manifest("rs0", "mongo/rs0/snapshots/s1.manifest"));
        let mark = mongo::complete_mark("rs0", (9, 20), 255);
        assert_eq!(mark, "mongo/rs0/complete/0000000009.0000000020.00000000000000FF");
        assert_eq!(mongo::parse_complete_mark("rs0", &mark), Some(((9, 20), 255)));
        assert_eq!(mongo::parse_source(&mark), Some("rs0"));
        assert_eq!(
            mongo::drill_result("rs0", "2026-11-25 14:03:00+00"),
            "mongo/rs0/drills/2026-11-25_14_03_00_00.json"
        );
    }

    #[test]
    fn pin_names_round_trip_and_refuse_what_a_user_could_smuggle_in() {
        let name = pg::pin(7, "20261206T101500Z", 3);
        assert_eq!(name, "pg/7/pins/20261206T101500Z.0000000000000003.pin");
        assert_eq!(pg::parse_pin(7, &name), Some(("20261206T101500Z", 3)));
        assert_eq!(pg::parse_pin(8, &name), None);
        for junk in [
            "pg/7/pins/20261206T101500Z.000000000000000a.pin",
            "pg/7/pins/20261206T101500Z.3.pin",
            "pg/7/pins/2026.1206.0000000000000003.pin",
            "pg/7/pins/.0000000000000003.pin",
            "pg/7/pins/20261206T101500Z.0000000000000003",
        ] {
            assert_eq!(pg::parse_pin(7, junk), None, "{junk}");
        }
        assert!(pg::is_pinnable_id("20261206T101500Z"));
        for bad in ["", "../x", "a.b", "a/b", "a b", &"x".repeat(65)] {
            assert!(!pg::is_pinnable_id(bad), "{bad}");
        }
    }
}
