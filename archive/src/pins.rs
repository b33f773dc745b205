//! Pins and notes on PostgreSQL backups: `pitr pin`, `pitr unpin`, `pitr backup --keep-forever
//! --note`.
//!
//! ```text
//! pg/<system id>/pins/<backup id>.<seq>.pin     sealed JSON: one change of a backup's pin and note
//! ```
//! Manifests are never rewritten, so a pin is its own object: every change (pin, unpin, a new
//! note) is a new record under the next change number `seq`, put create-only, and the record
//! with the highest `seq` that opens (and repeats its name's backup and `seq`) is in force. Two
//! `pin` commands racing for one `seq` cannot both create it: the loser reads the state again and
//! puts the next one, so no change is silently dropped (the later one wins, as if run after).
//! A record names its whole state (pinned forever, until a date, or not; and the note), so the
//! one in force says everything.
//!
//! A pin keeps its backup from `pitr expire` (reason `pinned`), and with it the backup's chain
//! and the WAL from its start to its stop (see [`crate::retention::keep_pinned`]); a pin whose
//! date has passed keeps nothing. Expire reads the pins after it has put its lock; `pin` puts its
//! record, then waits while a live expire lock exists, for the lock's whole lifetime
//! ([`crate::running::wait_for_expire`]), then checks that the manifest is still there. Of two
//! such runs at least one sees the other (each puts before it looks, on strongly consistent
//! storage), so a pin either protects its backup or reports that an expire removed it meanwhile.
//! Expire deletes the records of the backups it removes, after their manifests.
//!
//! `pitr backup --keep-forever --note` writes the new backup's first record before its manifest
//! ([`record_for_new_backup`]), so that no crash leaves the backup stored and unpinned. Expire
//! reads the pins after listing the manifests, so a manifest it sees has its record seen too. A
//! record whose backup never got its manifest (the backup failed or died) keeps nothing; expire
//! deletes it once no backup is running and it is older than `stale_backup_after`.
//!
//! Records that do not open (planted, damaged, another repository's key, too big to be one) are
//! not obeyed and are reported ([`PinSet::untrusted`]); a lower record that opens is then in force.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::backup::BackupManifest;
use crate::names::pg;
use crate::repository::{Repository, RepositoryError};
use crate::running::{self, Untrusted};
use crate::seal::{ObjectKind, ObjectMeta};
use crate::store::{PutOutcome, StoreError};
use crate::time::format_rfc3339_seconds;

/// The longest note, in bytes.
pub const MAX_NOTE_BYTES: usize = 1024;

/// How often a change is retried with the next `seq` after another writer took it.
const PUT_TRIES: usize = 16;

/// How long a backup is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pin {
    /// Until unpinned.
    Forever,
    /// Until this moment (µs since the Unix epoch); from then on an ordinary backup again.
    Until(i64),
}

impl Pin {
    /// Whether the pin keeps its backup at `now_us`.
    pub fn holds_at(self, now_us: i64) -> bool {
        match self {
            Pin::Forever => true,
            Pin::Until(until) => until > now_us,
        }
    }

    /// `forever` or `until <RFC 3339>`, for listings.
    pub fn describe(self) -> String {
        match self {
            Pin::Forever => "forever".into(),
            Pin::Until(us) => format!("until {}", format_rfc3339_seconds(us)),
        }
    }
}

/// One change of a backup's pin and note: its whole state from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// The backup id, as in the record's name.
    pub backup: String,
    /// The change number, as in the record's name.
    pub seq: u64,
    /// `None`: not pinned (an unpin, or a note alone).
    pub pin: Option<Pin>,
    /// The operator's note, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When it was written, µs since the Unix epoch.
    pub written_us: i64,
    /// The host that wrote it.
    pub host: String,
}

impl PinRecord {
    /// The pin in force at `now_us`: `None` when unpinned or its date has passed.
    pub fn active(&self, now_us: i64) -> Option<Pin> {
        self.pin.filter(|p| p.holds_at(now_us))
    }
}

/// Every backup's pin record in force, as found in the repository.
#[derive(Debug, Clone, Default)]
pub struct PinSet {
    /// By backup id: the highest record that opens. Backups that no longer exist may be here too
    /// (an expire that stopped between a manifest and its records).
    pub current: BTreeMap<String, PinRecord>,
    /// Records that do not open or disagree with their names: not obeyed.
    pub untrusted: Vec<Untrusted>,
    /// Every record name by backup id, whatever its state (expire deletes them with the backup).
    pub names: BTreeMap<String, Vec<String>>,
}

impl PinSet {
    /// Reads the pins of cluster `system_id`: per backup, from the highest `seq` down, the
    /// first record that opens and agrees with its name. A storage error is an error: a
    /// record that could not be read might be a pin.
    pub async fn load(repo: &Repository, system_id: u64) -> Result<PinSet, RepositoryError> {
        let mut by_backup: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        for o in repo.list(&pg::pins_prefix(system_id)).await? {
            if let Some((id, seq)) = pg::parse_pin(system_id, &o.name) {
                by_backup.entry(id.to_string()).or_default().push((seq, o.name.clone()));
            }
        }
        let mut set = PinSet::default();
        for (id, mut records) in by_backup {
            records.sort();
            set.names.insert(id.clone(), records.iter().map(|(_, n)| n.clone()).collect());
            for (seq, name) in records.into_iter().rev() {
                match read_record(repo, &id, seq, &name).await? {
                    Read::Sound(r) => {
                        set.current.insert(id.clone(), r);
                        break;
                    }
                    Read::Gone => {}
                    Read::Untrusted(why) => set.untrusted.push(Untrusted { object: name, why }),
                }
            }
        }
        Ok(set)
    }

    /// The backups pinned at `now_us`, each with its pin.
    pub fn active(&self, now_us: i64) -> BTreeMap<String, Pin> {
        self.current.iter().filter_map(|(id, r)| Some((id.clone(), r.active(now_us)?))).collect()
    }

    /// The note and pin of `backup`, if it has records.
    pub fn of(&self, backup: &str) -> Option<&PinRecord> {
        self.current.get(backup)
    }
}

enum Read {
    Sound(PinRecord),
    Gone,
    Untrusted(String),
}

async fn read_record(repo: &Repository, id: &str, seq: u64, name: &str) -> Result<Read, RepositoryError> {
    let text = match repo.get_record(name).await {
        Ok((_, text)) => text,
        Err(RepositoryError::Store(e)) if e.is_not_found() => return Ok(Read::Gone),
        Err(e) if e.is_bad_object() => {
            return Ok(Read::Untrusted(format!("does not open with this repository's keys ({e})")))
        }
        // Far bigger than any record pitr writes: planted, and not read.
        Err(e @ RepositoryError::Store(StoreError::TooLarge { .. })) => {
            return Ok(Read::Untrusted(format!("is too big to be a pin record ({e})")))
        }
        Err(e) => return Err(e),
    };
    match serde_json::from_slice::<PinRecord>(&text) {
        Ok(r) if r.backup == id && r.seq == seq => Ok(Read::Sound(r)),
        Ok(r) => Ok(Read::Untrusted(format!(
            "its record names backup {} change {}, its name backup {id} change {seq}",
            r.backup, r.seq
        ))),
        Err(e) => Ok(Read::Untrusted(format!("not a pin record ({e})"))),
    }
}

/// What to record for a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Pin it (again), with a new note or (`None`) the note it has.
    Pin {
        /// Forever, or until a date in the future.
        pin: Pin,
        /// Replaces the note; `None` keeps the current one.
        note: Option<String>,
    },
    /// A note alone (a backup taken with `--note` and no `--keep-forever`): the pin stays as it is.
    Note(String),
    /// Unpin it; the note stays.
    Unpin,
}

/// What [`change`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// The record now in force.
    Recorded(PinRecord),
    /// An unpin of a backup that is not pinned (never, unpinned already, or its date has
    /// passed): nothing was written.
    NotPinned,
}

/// Why a pin, unpin or note was refused or failed. Each refusal comes before anything is
/// written, except [`PinError::RemovedMeanwhile`].
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The id cannot be a backup id.
    #[error("{id:?} is not a backup id (pitr's are like 20261206T101500Z; see `pitr list`)")]
    BadId {
        /// As given.
        id: String,
    },
    /// No manifest of that backup in the repository.
    #[error("no backup {id} in {location} (see `pitr list`)")]
    UnknownBackup {
        /// The backup id.
        id: String,
        /// The repository.
        location: String,
    },
    /// The backup's manifest does not open: pinning it would keep something that cannot be
    /// restored.
    #[error("the manifest of backup {id} ({name}) cannot be used: {why}; not pinned (run `pitr verify`)")]
    DamagedManifest {
        /// The backup id.
        id: String,
        /// The manifest's object name.
        name: String,
        /// Why.
        why: String,
    },
    /// `--until` is not in the future.
    #[error("--until {until} is not in the future (now {now}); nothing written")]
    UntilPast {
        /// The date given.
        until: String,
        /// The clock it was checked against.
        now: String,
    },
    /// The note is too long or has control characters.
    #[error("the note {why}; nothing written")]
    BadNote {
        /// What is wrong with it.
        why: String,
    },
    /// A backup the pinned one is built on (an incremental's chain) has no manifest that opens:
    /// pinning it would keep something that cannot be restored.
    #[error("backup {id} is built on backup {parent}, whose manifest ({name}) cannot be used: {why}; not pinned (run `pitr verify`)")]
    BrokenChain {
        /// The backup id given.
        id: String,
        /// The ancestor that cannot be used.
        parent: String,
        /// Its manifest's object name.
        name: String,
        /// Why.
        why: String,
    },
    /// The record of a new backup would go to a backup id whose manifest exists already.
    #[error("a backup {id} exists already in {location}; the new backup's pin or note was not written")]
    BackupExists {
        /// The backup id.
        id: String,
        /// The repository.
        location: String,
    },
    /// Other writers took every `seq` tried.
    #[error(
        "the pin of backup {id} was changed by others {tries} times while this change was being written; try again"
    )]
    Contended {
        /// The backup id.
        id: String,
        /// How many `seq`s were tried.
        tries: usize,
    },
    /// The record was written, but an expire running meanwhile removed the backup: the pin
    /// protects nothing.
    #[error("backup {id} was removed by a pitr expire that ran while it was being pinned ({record} was written and protects nothing)")]
    RemovedMeanwhile {
        /// The backup id.
        id: String,
        /// The record written.
        record: String,
    },
    /// Reading or writing the repository failed.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
}

/// `--until` as a user writes it: a time [`crate::time::parse_time`] takes, or a date alone
/// (`YYYY-MM-DD`, 00:00 UTC). `None` for anything else.
pub fn parse_until(text: &str) -> Option<i64> {
    let text = text.trim();
    if text.len() == 10 {
        // chrono's parser is strict about the calendar (no 2027-02-30).
        let day = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
        return Some(day.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros());
    }
    crate::time::parse_time(text)
}

/// Checks a note: at most [`MAX_NOTE_BYTES`], no control characters and no invisible format
/// characters (it is printed in listings and terminals).
pub fn check_note(note: &str) -> Result<(), PinError> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(PinError::BadNote { why: format!("is {} bytes, more than {MAX_NOTE_BYTES}", note.len()) });
    }
    if note.chars().any(char::is_control) {
        return Err(PinError::BadNote { why: "has a control character (a line break, a tab…)".into() });
    }
    if let Some(c) = note.chars().find(|&c| is_format_char(c)) {
        return Err(PinError::BadNote {
            why: format!(
                "has the invisible format character U+{:04X} (a direction override or a zero-width character makes a listing show other text than is stored)",
                u32::from(c)
            ),
        });
    }
    Ok(())
}

/// Unicode general category Cf (format characters), as of Unicode 15.1: the standard library
/// has no test for it, and the list is short and changes rarely.
fn is_format_char(c: char) -> bool {
    const CF: &[(u32, u32)] = &[
        (0x00AD, 0x00AD),
        (0x0600, 0x0605),
        (0x061C, 0x061C),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x0890, 0x0891),
        (0x08E2, 0x08E2),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x110CD, 0x110CD),
        (0x13430, 0x1343F),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
    ];
    let c = u32::from(c);
    CF.iter().any(|&(from, to)| (from..=to).contains(&c))
}

/// Records `change` for backup `id` of cluster `system_id` at `now_us` (see the module
/// documentation for the order and why). Refusals (a bad id or note, a date not in the future,
/// an unknown backup or one whose manifest does not open) write nothing; so does an unpin of a
/// backup that is not pinned ([`Changed::NotPinned`]).
pub async fn change(
    repo: &Repository,
    system_id: u64,
    id: &str,
    change: Change,
    now_us: i64,
) -> Result<Changed, PinError> {
    if !pg::is_pinnable_id(id) {
        return Err(PinError::BadId { id: id.into() });
    }
    match &change {
        Change::Pin { pin: Pin::Until(until), .. } if *until <= now_us => {
            return Err(PinError::UntilPast {
                until: format_rfc3339_seconds(*until),
                now: format_rfc3339_seconds(now_us),
            })
        }
        Change::Pin { note: Some(note), .. } | Change::Note(note) => check_note(note)?,
        _ => {}
    }
    manifest_usable(repo, system_id, id).await?;
    let Some((name, record)) = put_change(repo, system_id, id, &change, now_us).await? else {
        return Ok(Changed::NotPinned);
    };
    if record.pin.is_some() {
        // The record is durable; an expire that took its lock before now may have read the pins
        // before it: let it finish, then see whether the backup is still there. The wait lasts
        // the lock's whole lifetime, not only its sweep deadline as for a restore: that deadline
        // runs on the expire's clock from when its lock was put, which this host cannot see.
        let waited =
            running::wait_for_expire(repo, false, "pitr expire is running; the pin waits until it is done").await?;
        match manifest_usable(repo, system_id, id).await {
            Ok(()) => {}
            Err(PinError::UnknownBackup { .. }) => {
                return Err(PinError::RemovedMeanwhile { id: id.into(), record: name })
            }
            Err(e) => return Err(e),
        }
        if let running::ExpireWait::TimedOut(locks) = waited {
            tracing::warn!(
                locks = %locks.join(", "),
                "the pin stopped waiting when the expire lock's lifetime ran out, not because the expire finished; \
                 the manifest of backup {id} was checked again after that and is there"
            );
        }
    }
    Ok(Changed::Recorded(record))
}

/// Records the pin or note of the backup `id` that `pitr backup` is about to store, before its
/// manifest is put (see the module documentation): no manifest check and no wait for an expire
/// (a running backup holds every expire off, and expire reads the pins after the manifests).
/// Refused if a manifest of that id exists already (it would be another backup's). `None`: an
/// unpin, which a new backup has nothing to undo, wrote nothing.
pub async fn record_for_new_backup(
    repo: &Repository,
    system_id: u64,
    id: &str,
    change: Change,
    now_us: i64,
) -> Result<Option<PinRecord>, PinError> {
    if !pg::is_pinnable_id(id) {
        return Err(PinError::BadId { id: id.into() });
    }
    if let Change::Pin { note: Some(note), .. } | Change::Note(note) = &change {
        check_note(note)?;
    }
    if repo.store().head(&pg::backup_manifest(system_id, id)).await.map_err(RepositoryError::from)?.is_some() {
        return Err(PinError::BackupExists { id: id.into(), location: repo.location() });
    }
    Ok(put_change(repo, system_id, id, &change, now_us).await?.map(|(_, record)| record))
}

/// Puts `change` of backup `id` as a record under the next free change number: the record
/// written and its name, or `None` for an unpin of a backup that is not pinned.
async fn put_change(
    repo: &Repository,
    system_id: u64,
    id: &str,
    change: &Change,
    now_us: i64,
) -> Result<Option<(String, PinRecord)>, PinError> {
    // Past names found taken: another writer's record (read at the next try) or a planted one.
    let mut next_free = 0u64;
    for _ in 0..PUT_TRIES {
        let (newest, taken) = state_of(repo, system_id, id).await?;
        let note_now = newest.as_ref().and_then(|r| r.note.clone());
        let pin_now = newest.as_ref().and_then(|r| r.pin);
        let (pin, note) = match change {
            Change::Pin { pin, note } => (Some(*pin), note.clone().or(note_now)),
            Change::Note(note) => (pin_now, Some(note.clone())),
            Change::Unpin => {
                if newest.as_ref().and_then(|r| r.active(now_us)).is_none() {
                    return Ok(None);
                }
                (None, note_now)
            }
        };
        let mut seq = newest.as_ref().map_or(0, |r| r.seq.saturating_add(1)).max(next_free);
        while taken.contains(&seq) && seq < u64::MAX {
            seq += 1;
        }
        next_free = seq.saturating_add(1);
        let record = PinRecord { backup: id.into(), seq, pin, note, written_us: now_us, host: crate::hostname() };
        let name = pg::pin(system_id, id, seq);
        let json = serde_json::to_vec(&record)
            .map_err(|e| RepositoryError::Invalid { name: name.clone(), what: format!("serialising: {e}") })?;
        match repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await {
            Ok(PutOutcome::Created) => return Ok(Some((name, record))),
            // Another writer took this seq: read its change and go after it.
            Ok(PutOutcome::AlreadyExists) | Err(RepositoryError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(PinError::Contended { id: id.into(), tries: PUT_TRIES })
}

/// The record in force for `id`, and every number taken by a name. A change goes to the first
/// free number above the record in force: records that do not open are ignored, so names planted
/// above it (at the highest number, or a run of them) block no change.
async fn state_of(
    repo: &Repository,
    system_id: u64,
    id: &str,
) -> Result<(Option<PinRecord>, BTreeSet<u64>), RepositoryError> {
    let mut seqs: Vec<(u64, String)> = repo
        .list(&pg::pins_prefix(system_id))
        .await?
        .into_iter()
        .filter_map(|o| match pg::parse_pin(system_id, &o.name) {
            Some((backup, seq)) if backup == id => Some((seq, o.name)),
            _ => None,
        })
        .collect();
    seqs.sort();
    let taken: BTreeSet<u64> = seqs.iter().map(|(s, _)| *s).collect();
    for (seq, name) in seqs.into_iter().rev() {
        if let Read::Sound(r) = read_record(repo, id, seq, &name).await? {
            return Ok((Some(r), taken));
        }
    }
    Ok((None, taken))
}

/// Whether backup `id` can be restored as far as its manifests go: its own manifest and those
/// of the backups it is built on (an incremental's chain, to its full backup) open and name
/// themselves.
async fn manifest_usable(repo: &Repository, system_id: u64, id: &str) -> Result<(), PinError> {
    let damaged =
        |why: String| PinError::DamagedManifest { id: id.into(), name: pg::backup_manifest(system_id, id), why };
    let mut parent = match BackupManifest::load(repo, system_id, id).await {
        Ok(m) if m.id == id => m.parent,
        Ok(m) => return Err(damaged(format!("it names backup {}", m.id))),
        Err(RepositoryError::Store(e)) if e.is_not_found() => {
            return Err(PinError::UnknownBackup { id: id.into(), location: repo.location() })
        }
        Err(e) if e.is_untrusted_object() => return Err(damaged(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let mut seen = BTreeSet::from([id.to_string()]);
    while let Some(p) = parent {
        let broken = |why: String| PinError::BrokenChain {
            id: id.into(),
            parent: p.clone(),
            name: pg::backup_manifest(system_id, &p),
            why,
        };
        if !seen.insert(p.clone()) {
            return Err(broken("the chain comes back to it (a loop)".into()));
        }
        if !pg::is_pinnable_id(&p) {
            return Err(broken("that is not a backup id".into()));
        }
        parent = match BackupManifest::load(repo, system_id, &p).await {
            Ok(m) if m.id == p => m.parent,
            Ok(m) => return Err(broken(format!("it names backup {}", m.id))),
            Err(RepositoryError::Store(e)) if e.is_not_found() => return Err(broken("it is missing".into())),
            Err(e) if e.is_untrusted_object() => return Err(broken(e.to_string())),
            Err(e) => return Err(e.into()),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::Store;
    use crate::{KeyRing, LocalStore};

    const NOW: i64 = 1_780_000_000_000_000;
    const DAY: i64 = 86_400_000_000;

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::new(Arc::new(LocalStore::new(dir)), KeyRing::from_key("k", [5; 32]))
    }

    async fn backup(repo: &Repository, id: &str) {
        // From JSON: fields other work adds later have defaults.
        let m: BackupManifest = serde_json::from_value(serde_json::json!({
            "id": id, "kind": "full", "system_id": 7, "server_version_num": 150000, "timeline": 1,
            "start_lsn": 0x100_0000, "stop_lsn": 0x200_0000, "start_time_us": 0, "stop_time_us": 1,
            "block_size": 8192, "tablespaces": [], "entries": [], "files": [], "server_manifest": "{}",
            "logical_bytes": 0, "stored_bytes": 0
        }))
        .unwrap();
        m.store(repo).await.unwrap();
    }

    async fn incremental(repo: &Repository, id: &str, parent: &str) {
        let m: BackupManifest = serde_json::from_value(serde_json::json!({
            "id": id, "kind": "incremental", "parent": parent, "system_id": 7, "server_version_num": 170000,
            "timeline": 1, "start_lsn": 0x300_0000, "stop_lsn": 0x400_0000, "start_time_us": 2, "stop_time_us": 3,
            "block_size": 8192, "tablespaces": [], "entries": [], "files": [], "server_manifest": "{}",
            "logical_bytes": 0, "stored_bytes": 0
        }))
        .unwrap();
        m.store(repo).await.unwrap();
    }

    async fn names(dir: &std::path::Path) -> Vec<String> {
        LocalStore::new(dir).list("pg/7/pins/").await.unwrap().into_iter().map(|o| o.name).collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn changes_are_new_records_and_the_newest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        backup(&repo, "A").await;
        let pin = |until| Change::Pin { pin: Pin::Until(until), note: Some("before the upgrade".into()) };
        let Changed::Recorded(r) = change(&repo, 7, "A", pin(NOW + DAY), NOW).await.unwrap() else { panic!() };
        assert_eq!((r.seq, r.pin), (0, Some(Pin::Until(NOW + DAY))));
        // A pin without a note keeps the note; unpin keeps it too.
        let forever = Change::Pin { pin: Pin::Forever, note: None };
        let Changed::Recorded(r) = change(&repo, 7, "A", forever, NOW).await.unwrap() else { panic!() };
        assert_eq!((r.seq, r.pin, r.note.as_deref()), (1, Some(Pin::Forever), Some("before the upgrade")));
        let Changed::Recorded(r) = change(&repo, 7, "A", Change::Unpin, NOW).await.unwrap() else { panic!() };
        assert_eq!((r.seq, r.pin, r.note.as_deref()), (2, None, Some("before the upgrade")));
        assert_eq!(change(&repo, 7, "A", Change::Unpin, NOW).await.unwrap(), Changed::NotPinned);
        assert_eq!(names(dir.path()).await.len(), 3, "the second unpin wrote nothing");

        let set = PinSet::load(&repo, 7).await.unwrap();
        assert_eq!(set.of("A").map(|r| r.seq), Some(2));
        assert!(set.active(NOW).is_empty());
        assert_eq!(set.names["A"].len(), 3);
        // A pin whose date passed is no pin: unpinning it writes nothing.
        change(&repo, 7, "A", pin(NOW + DAY), NOW).await.unwrap();
        let set = PinSet::load(&repo, 7).await.unwrap();
        assert_eq!(set.active(NOW + DAY - 1).get("A"), Some(&Pin::Until(NOW + DAY)));
        assert!(set.active(NOW + DAY).is_empty());
        assert_eq!(change(&repo, 7, "A", Change::Unpin, NOW + DAY).await.unwrap(), Changed::NotPinned);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refusals_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        backup(&repo, "A").await;
        let forever = || Change::Pin { pin: Pin::Forever, note: None };
        assert!(matches!(change(&repo, 7, "B", forever(), NOW).await, Err(PinError::UnknownBackup { .. })));
        assert!(matches!(change(&repo, 7, "../A", forever(), NOW).await, Err(PinError::BadId { .. })));
        let past = Change::Pin { pin: Pin::Until(NOW), note: None };
        assert!(matches!(change(&repo, 7, "A", past, NOW).await, Err(PinError::UntilPast { .. })));
        let noted = Change::Pin { pin: Pin::Forever, note: Some("two\nlines".into()) };
        assert!(matches!(change(&repo, 7, "A", noted, NOW).await, Err(PinError::BadNote { .. })));
        let long = Change::Note("x".repeat(MAX_NOTE_BYTES + 1));
        assert!(matches!(change(&repo, 7, "A", long, NOW).await, Err(PinError::BadNote { .. })));
        // Invisible format characters: a right-to-left override, a zero-width space, a BOM.
        for hidden in ["keep \u{202E}gnp.exe", "a\u{200B}b", "\u{FEFF}x", "tag\u{E0041}"] {
            let err = change(&repo, 7, "A", Change::Note(hidden.into()), NOW).await.unwrap_err();
            assert!(matches!(&err, PinError::BadNote { why } if why.contains("format character")), "{hidden:?}: {err}");
        }
        check_note("Überprüfung vor dem Upgrade — 升级前 ✓").unwrap();
        // A manifest planted under a backup's name.
        let planted = pg::backup_manifest(7, "C");
        LocalStore::new(dir.path()).put_if_absent(&planted, bytes::Bytes::from_static(b"junk")).await.unwrap();
        let err = change(&repo, 7, "C", forever(), NOW).await.unwrap_err();
        assert!(matches!(err, PinError::DamagedManifest { .. }), "{err}");
        assert!(names(dir.path()).await.is_empty());
        assert_eq!(parse_until("2027-01-01"), Some(1_798_761_600_000_000));
        assert_eq!(parse_until("2027-01-01T00:00:00Z"), Some(1_798_761_600_000_000));
        assert_eq!(parse_until("next week"), None);
        assert_eq!(parse_until("2027-02-30"), None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_taken_seq_moves_the_change_on_and_planted_records_are_not_obeyed() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let raw = LocalStore::new(dir.path());
        backup(&repo, "A").await;
        change(&repo, 7, "A", Change::Pin { pin: Pin::Forever, note: Some("keep".into()) }, NOW).await.unwrap();
        // Planted above it: junk, and a record sealed with another key.
        raw.put_if_absent(&pg::pin(7, "A", 5), bytes::Bytes::from_static(b"junk")).await.unwrap();
        let other = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k2", [6; 32]));
        let unpinned =
            PinRecord { backup: "A".into(), seq: 3, pin: None, note: None, written_us: NOW, host: "h".into() };
        other
            .put_sealed(
                &pg::pin(7, "A", 3),
                serde_json::to_vec(&unpinned).unwrap(),
                ObjectMeta::plain(ObjectKind::Meta),
            )
            .await
            .unwrap();
        // Sealed with the key but naming another change.
        let liar = PinRecord { seq: 9, ..unpinned.clone() };
        repo.put_sealed(&pg::pin(7, "A", 4), serde_json::to_vec(&liar).unwrap(), ObjectMeta::plain(ObjectKind::Meta))
            .await
            .unwrap();
        // Bigger than any record: not read, not obeyed, and no error for every reader.
        let huge = bytes::Bytes::from(vec![0u8; crate::repository::RECORD_READ_MAX as usize + 1]);
        raw.put_if_absent(&pg::pin(7, "A", 2), huge).await.unwrap();
        let set = PinSet::load(&repo, 7).await.unwrap();
        assert_eq!(set.active(NOW).get("A"), Some(&Pin::Forever), "{set:?}");
        assert_eq!(set.untrusted.len(), 4, "{:?}", set.untrusted);
        assert!(set.untrusted.iter().any(|u| u.object == pg::pin(7, "A", 2) && u.why.contains("too big")));
        assert_eq!(set.of("A").map(|r| r.seq), Some(0));
        // The next change goes one above the record in force, past names planted there; one
        // planted at the highest number blocks nothing.
        raw.put_if_absent(&pg::pin(7, "A", 1), bytes::Bytes::from_static(b"junk")).await.unwrap();
        raw.put_if_absent(&pg::pin(7, "A", u64::MAX), bytes::Bytes::from_static(b"junk")).await.unwrap();
        let Changed::Recorded(r) = change(&repo, 7, "A", Change::Unpin, NOW).await.unwrap() else { panic!() };
        assert_eq!((r.seq, r.note.as_deref()), (6, Some("keep")), "1 to 5 are taken");
        let Changed::Recorded(r) = change(&repo, 7, "A", Change::Note("again".into()), NOW).await.unwrap() else {
            panic!()
        };
        assert_eq!((r.seq, r.pin), (7, None));
        // A run of planted names above the record in force: the change goes past them at once.
        for seq in 8..40 {
            raw.put_if_absent(&pg::pin(7, "A", seq), bytes::Bytes::from_static(b"junk")).await.unwrap();
        }
        let Changed::Recorded(r) = change(&repo, 7, "A", Change::Note("past".into()), NOW).await.unwrap() else {
            panic!()
        };
        assert_eq!(r.seq, 40);
        assert_eq!(PinSet::load(&repo, 7).await.unwrap().of("A"), Some(&r));
        // Two racing changes: both are recorded, under different seqs.
        backup(&repo, "B").await;
        let (a, b) = tokio::join!(
            change(&repo, 7, "B", Change::Pin { pin: Pin::Forever, note: Some("one".into()) }, NOW),
            change(&repo, 7, "B", Change::Pin { pin: Pin::Until(NOW + DAY), note: Some("two".into()) }, NOW),
        );
        let (Changed::Recorded(a), Changed::Recorded(b)) = (a.unwrap(), b.unwrap()) else { panic!() };
        let mut seqs = [a.seq, b.seq];
        seqs.sort();
        assert_eq!(seqs, [0, 1]);
        let newest = if a.seq == 1 { a } else { b };
        assert_eq!(PinSet::load(&repo, 7).await.unwrap().of("B"), Some(&newest));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_pin_made_while_an_expire_holds_its_lock_waits_and_reports_a_removed_backup() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        backup(&repo, "A").await;
        let lock =
            running::ExpireLock::acquire(&repo, crate::now_us(), std::time::Duration::from_secs(600)).await.unwrap();
        let pinning = {
            let repo = repo.clone();
            tokio::spawn(async move {
                change(&repo, 7, "A", Change::Pin { pin: Pin::Forever, note: None }, crate::now_us()).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert!(!pinning.is_finished(), "the pin did not wait for the expire");
        // The expire, having read the pins before this one was written, removes the backup.
        repo.delete(&pg::backup_manifest(7, "A")).await.unwrap();
        lock.release().await;
        let err = pinning.await.unwrap().unwrap_err();
        assert!(matches!(err, PinError::RemovedMeanwhile { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_incremental_is_pinned_only_with_its_whole_chain() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let forever = || Change::Pin { pin: Pin::Forever, note: None };
        // J on I on F: all there.
        backup(&repo, "F").await;
        incremental(&repo, "I", "F").await;
        incremental(&repo, "J", "I").await;
        assert!(matches!(change(&repo, 7, "J", forever(), NOW).await, Ok(Changed::Recorded(_))));
        // K on a parent whose manifest is missing, L on one whose manifest does not open.
        incremental(&repo, "K", "G").await;
        let err = change(&repo, 7, "K", forever(), NOW).await.unwrap_err();
        assert!(matches!(&err, PinError::BrokenChain { parent, .. } if parent == "G"), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
        incremental(&repo, "L", "H").await;
        LocalStore::new(dir.path())
            .put_if_absent(&pg::backup_manifest(7, "H"), bytes::Bytes::from_static(b"junk"))
            .await
            .unwrap();
        let err = change(&repo, 7, "L", forever(), NOW).await.unwrap_err();
        assert!(matches!(&err, PinError::BrokenChain { parent, .. } if parent == "H"), "{err}");
        // M on N on M: a loop ends.
        incremental(&repo, "M", "N").await;
        incremental(&repo, "N", "M").await;
        let err = change(&repo, 7, "M", forever(), NOW).await.unwrap_err();
        assert!(matches!(&err, PinError::BrokenChain { .. }), "{err}");
        let written = names(dir.path()).await;
        assert_eq!(written, vec![pg::pin(7, "J", 0)], "a refused pin wrote a record");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_new_backups_record_goes_before_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let keep = Change::Pin { pin: Pin::Forever, note: Some("before the upgrade".into()) };
        // No manifest yet, and no wait: the record is the backup's first.
        let r = record_for_new_backup(&repo, 7, "A", keep.clone(), NOW).await.unwrap().unwrap();
        assert_eq!((r.seq, r.pin), (0, Some(Pin::Forever)));
        backup(&repo, "A").await;
        assert_eq!(PinSet::load(&repo, 7).await.unwrap().active(NOW).get("A"), Some(&Pin::Forever));
        // A manifest of that id exists already: another backup's, not recorded for.
        let err = record_for_new_backup(&repo, 7, "A", keep.clone(), NOW).await.unwrap_err();
        assert!(matches!(err, PinError::BackupExists { .. }), "{err}");
        let bad = Change::Note("two\nlines".into());
        assert!(matches!(record_for_new_backup(&repo, 7, "B", bad, NOW).await, Err(PinError::BadNote { .. })));
        assert_eq!(record_for_new_backup(&repo, 7, "B", Change::Unpin, NOW).await.unwrap(), None);
        assert_eq!(names(dir.path()).await, vec![pg::pin(7, "A", 0)]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_pin_waits_for_an_expire_lock_its_whole_lifetime_and_says_when_time_ran_out() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        backup(&repo, "A").await;
        let forever = || Change::Pin { pin: Pin::Forever, note: None };
        // Taken 400 s ago for 600 s: past the sweep deadline plus a minute a restore waits for,
        // within the lifetime, which is what the expire's own clock may still be deleting in.
        let lock =
            running::ExpireLock::acquire(&repo, crate::now_us() - 400_000_000, std::time::Duration::from_secs(600))
                .await
                .unwrap();
        assert_eq!(
            running::wait_for_expire(&repo, true, "a reader").await.unwrap(),
            running::ExpireWait::Clear,
            "a reader does not wait past the sweep deadline"
        );
        let pinning = {
            let repo = repo.clone();
            tokio::spawn(async move { change(&repo, 7, "A", forever(), crate::now_us()).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert!(!pinning.is_finished(), "the pin stopped waiting at the sweep deadline");
        lock.release().await;
        assert!(matches!(pinning.await.unwrap(), Ok(Changed::Recorded(_))));

        // A lock never released (its expire crashed): the wait ends with its lifetime, says so,
        // and the pin checks the manifest after it.
        let ttl = std::time::Duration::from_secs(60);
        let stuck = running::ExpireLock::acquire(&repo, crate::now_us() - 58_500_000, ttl).await.unwrap();
        let waited = running::wait_for_expire(&repo, false, "a pin").await.unwrap();
        assert_eq!(waited, running::ExpireWait::TimedOut(vec![stuck.name().to_string()]));
        assert!(matches!(change(&repo, 7, "A", forever(), crate::now_us()).await, Ok(Changed::Recorded(_))));
        stuck.release().await;
    }
}
