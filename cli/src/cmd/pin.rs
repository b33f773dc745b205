//! `pitr pin ID [--until DATE] [--note TEXT]`, `pitr unpin ID`, and the pin and note that
//! `pitr backup --keep-forever --note TEXT` records: PostgreSQL backups only (MongoDB snapshots
//! are never expired, so a pin would keep nothing).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::pins::{self, Change, Changed, Pin, PinRecord};
use pitr_archive::time::format_rfc3339_seconds;

use crate::config::Config;
use crate::{open, output};

/// A backup's pin and note as `list`, `status`, `pin` and `backup` show them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShownPin {
    /// `forever`, `until <RFC 3339>`, or `None` when not pinned now (never, unpinned, or its date
    /// has passed).
    pub pinned: Option<String>,
    /// The date of an `--until` pin in force, RFC 3339.
    pub pinned_until: Option<String>,
    /// The note, if any.
    pub note: Option<String>,
}

impl ShownPin {
    /// What `record` says at `now_us`.
    pub fn of(record: Option<&PinRecord>, now_us: i64) -> ShownPin {
        let active = record.and_then(|r| r.active(now_us));
        ShownPin {
            pinned: active.map(Pin::describe),
            pinned_until: match active {
                Some(Pin::Until(us)) => Some(format_rfc3339_seconds(us)),
                _ => None,
            },
            note: record.and_then(|r| r.note.clone()),
        }
    }

    /// ` pinned forever; note: …` or empty, for a listing line.
    pub fn suffix(&self) -> String {
        let mut out = String::new();
        if let Some(p) = &self.pinned {
            out.push_str(&format!("  pinned {p}"));
        }
        if let Some(n) = &self.note {
            out.push_str(&format!("  note: {n}"));
        }
        out
    }
}

fn postgres_only(config: &Config, command: &str) -> Result<()> {
    if config.postgres.is_none() {
        bail!(
            "`pitr {command}` works on PostgreSQL backups and the config has no [postgres] section \
             (MongoDB snapshots are never expired, so there is nothing to pin)"
        );
    }
    Ok(())
}

/// `--note` and `--keep-forever` of `pitr backup` as the change to record with the backup (just
/// before its manifest); checked before the backup is taken, so that a bad note costs no backup.
pub fn backup_change(keep_forever: bool, note: Option<String>) -> Result<Option<Change>> {
    if let Some(n) = &note {
        pins::check_note(n).context("--note")?;
    }
    Ok(match (keep_forever, note) {
        (true, note) => Some(Change::Pin { pin: Pin::Forever, note }),
        (false, Some(note)) => Some(Change::Note(note)),
        (false, None) => None,
    })
}

/// `pitr pin ID [--until DATE] [--note TEXT]`.
pub async fn pin(config_path: &Path, id: &str, until: Option<&str>, note: Option<String>, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    postgres_only(&config, "pin")?;
    let pin = match until {
        None => Pin::Forever,
        Some(text) => Pin::Until(pins::parse_until(text).ok_or_else(|| {
            anyhow!("--until {text:?}: not a date or time (give YYYY-MM-DD, or YYYY-MM-DD HH:MM:SS[+TZ] / RFC 3339); nothing written")
        })?),
    };
    let repo = open::writer(&config)?;
    let cluster = open::checked_cluster(&config, &repo).await?;
    let now = pitr_archive::now_us();
    let changed = pins::change(&repo, cluster.system_id, id, Change::Pin { pin, note }, now)
        .await
        .with_context(|| format!("pin in {}", repo.location()))?;
    let Changed::Recorded(record) = changed else { bail!("backup {id}: nothing was recorded") };
    let shown = ShownPin::of(Some(&record), now);
    if json {
        return output::print_json(&serde_json::json!({ "backup": id, "seq": record.seq, "pin": shown }));
    }
    println!(
        "pinned backup {id} {}{}",
        shown.pinned.as_deref().unwrap_or("-"),
        shown.note.as_deref().map(|n| format!(" (note: {n})")).unwrap_or_default()
    );
    Ok(())
}

/// `pitr unpin ID`: a backup that is not pinned is said and is no error (exit 0), so that
/// scripts can unpin whatever the state.
pub async fn unpin(config_path: &Path, id: &str, json: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    postgres_only(&config, "unpin")?;
    let repo = open::writer(&config)?;
    let cluster = open::checked_cluster(&config, &repo).await?;
    let now = pitr_archive::now_us();
    let changed = pins::change(&repo, cluster.system_id, id, Change::Unpin, now)
        .await
        .with_context(|| format!("unpin in {}", repo.location()))?;
    let was_pinned = matches!(changed, Changed::Recorded(_));
    if json {
        return output::print_json(&serde_json::json!({ "backup": id, "unpinned": was_pinned }));
    }
    if was_pinned {
        println!("unpinned backup {id}: retention judges it like any other from now on");
    } else {
        println!(
            "backup {id} is not pinned (never, unpinned already, or its --until date has passed); nothing written"
        );
    }
    Ok(())
}
