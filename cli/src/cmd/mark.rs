//! `pitr mark NAME`: a named restore point on the primary (`pg_create_restore_point`), waited for
//! until the archive holds it: the sidecar indexes every restore point it streams (see
//! `pitr_archive::restore_points`), so `mark` only creates one and watches the repository for its
//! index entry and its WAL. It writes nothing to the repository itself.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::restore_points::{self, RestorePoint};
use pitr_archive::{Repository, WalLayout, WalObject};
use pitr_pgformat::lsn::{format_lsn, parse_lsn};
use pitr_pgwire::connection::{ConnectOptions, Connection};
use pitr_restore::target::RestorePointName;

use crate::config::Config;
use crate::{open, output};

/// How often the repository is looked at while waiting.
const POLL: Duration = Duration::from_millis(500);

#[derive(serde::Serialize)]
struct Marked {
    name: String,
    lsn: String,
    end_lsn: String,
    timeline: u32,
    time: String,
    system_id: u64,
}

/// `name` as a string literal of PostgreSQL's, whatever `standard_conforming_strings` says:
/// `E'…'` with `\` and `'` doubled.
fn sql_literal(name: &str) -> String {
    format!("E'{}'", name.replace('\\', "\\\\").replace('\'', "''"))
}

/// `pitr mark NAME`: creates the restore point on the primary, waits (up to `timeout`) until the
/// archive holds its WAL and has indexed it, and prints where it is. A name the index holds
/// already is refused unless `allow_duplicate` (see [`refuse_known_name`]).
pub async fn run(config_path: &Path, name: &str, json: bool, timeout: Duration, allow_duplicate: bool) -> Result<()> {
    let config = Config::load(config_path)?;
    RestorePointName::new(name).map_err(|why| anyhow!("restore point name {name:?}: {why}"))?;
    let pg = config.postgres()?;
    let repo = open::reader(&config, None)?;
    let cluster = open::checked_cluster(&config, &repo).await?;
    if !allow_duplicate {
        refuse_known_name(&repo, cluster.system_id, name).await?;
    }
    let info = pg.connection_info()?;
    let shown = info.redacted();
    let opts = ConnectOptions { replication: false, application_name: format!("{}_mark", pg.application_name()) };
    let mut conn = Connection::connect(&info, &opts).await.with_context(|| format!("connecting to {shown}"))?;
    // The wrong server (another cluster than the repository's) is refused before anything is
    // created on it.
    let rows = conn
        .simple_query("SELECT system_identifier::text, current_setting('server_encoding') FROM pg_control_system()")
        .await
        .with_context(|| format!("{shown}: reading the system identifier"))?;
    let server_id: u64 =
        rows.text(0, 0).and_then(|t| t.parse().ok()).ok_or_else(|| anyhow!("{shown}: no system identifier"))?;
    if server_id != cluster.system_id {
        bail!(
            "{shown} is cluster {server_id}, but the repository's cluster is {}: a restore point there would never \
             reach this archive; nothing was created",
            cluster.system_id
        );
    }
    // The server converts the name into its encoding, and the index keeps only names it can write
    // back byte for byte (UTF-8): another encoding would make one that is never indexed.
    let encoding = rows.text(0, 1).unwrap_or_default();
    if !name.is_ascii() && !encoding.eq_ignore_ascii_case("UTF8") {
        bail!(
            "{shown} keeps text in {encoding}, not UTF8: a restore point named {name:?} (not ASCII) would be stored \
             in {encoding}, which pitr cannot index or restore to by name; use an ASCII name. Nothing was created"
        );
    }
    let sql = format!("SELECT pg_create_restore_point({})::text", sql_literal(name));
    let rows = conn.simple_query(&sql).await.with_context(|| {
        format!("{shown}: pg_create_restore_point (the role needs EXECUTE on it, and the server must be the primary)")
    })?;
    conn.close().await;
    let end_lsn = rows
        .text(0, 0)
        .and_then(parse_lsn)
        .ok_or_else(|| anyhow!("{shown}: pg_create_restore_point returned no LSN"))?;
    tracing::info!(restore_point = %name, end_lsn = %format_lsn(end_lsn), "restore point created; waiting for the archive");

    let layout = WalLayout::new(&cluster);
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    let point = loop {
        // Storage that fails now may answer at the next look: only the deadline ends the wait.
        match archived(&repo, layout, cluster.system_id, name, end_lsn).await {
            Ok(Some(point)) => break point,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "looking for the restore point in the archive; retrying");
                last_error = Some(format!("{e:#}"));
            }
        }
        if Instant::now() >= deadline {
            let start = record_start(end_lsn, cluster.wal_page_size, cluster.wal_segment_size);
            bail!(
                "restore point {name:?} was created on the primary (its WAL record ends at {end}), but within {} the \
                 archive did not index it and hold its WAL{}: is `pitr stream` running for cluster {}? (`pitr status` \
                 tells). The restore point exists on the primary: do not run `pitr mark` again (a second restore \
                 point of this name would leave --to name:{name} unable to reach it without a backup between the \
                 two). Once the sidecar archives that WAL, `pitr list` shows it and --to name:{name} restores to it; \
                 --to lsn:{} (where its record starts) stops right after it either way",
                humantime::format_duration(timeout),
                last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default(),
                cluster.system_id,
                format_lsn(start),
                end = format_lsn(end_lsn),
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let marked = Marked {
        name: point.name.clone(),
        lsn: format_lsn(point.lsn),
        end_lsn: format_lsn(point.end_lsn),
        timeline: point.timeline,
        time: pitr_restore::format_time(point.time_us),
        system_id: cluster.system_id,
    };
    if json {
        output::print_json(&marked)?;
    } else {
        println!(
            "restore point {:?} at {} on timeline {}, {} (archived; restore with --to name:{})",
            marked.name, marked.lsn, marked.timeline, marked.time, marked.name
        );
    }
    Ok(())
}

/// Refuses `name` if the index holds a restore point of that name already: PostgreSQL stops at
/// the first one of a name it replays, so a second one without a backup between them (an
/// operator running `mark` again after a timeout) cannot be restored to by name. An index that
/// cannot be listed refuses too (nothing was created yet: running it again is safe); unreadable
/// entries only earn a warning (`pitr list` names them).
async fn refuse_known_name(repo: &Repository, system_id: u64, name: &str) -> Result<()> {
    let index = restore_points::load(repo, system_id, false).await;
    let prefix = pitr_archive::names::pg::restore_points_prefix(system_id);
    if let Some(failed) = index.problems.iter().find(|p| p.object == prefix) {
        bail!("cannot check that restore point {name:?} is new: {failed}; nothing was created (run it again later)");
    }
    if !index.problems.is_empty() {
        tracing::warn!(
            unreadable = index.problems.len(),
            "the index of restore points has entries that cannot be read (`pitr list` names them): one of them may \
             already be named {name:?}"
        );
    }
    if let Some(known) = index.points.iter().rfind(|p| p.name == name) {
        bail!(
            "a restore point named {name:?} exists already (at {}, {}, timeline {}): PostgreSQL stops at the first \
             of a name it replays, so --to name:{name} could reach only one of them; if an earlier `pitr mark` timed \
             out, its restore point is this one. Choose another name, or pass --allow-duplicate. Nothing was created",
            format_lsn(known.lsn),
            pitr_restore::format_time(known.time_us),
            known.timeline
        );
    }
    Ok(())
}

/// The restore point `name` whose record ends at `end_lsn`, once the index holds it and the
/// archive its WAL. Reads only the index entries named just before `end_lsn`.
async fn archived(
    repo: &Repository,
    layout: WalLayout,
    system_id: u64,
    name: &str,
    end_lsn: u64,
) -> Result<Option<RestorePoint>> {
    let near =
        restore_points::ending_at(repo, system_id, end_lsn).await.context("listing the index of restore points")?;
    let Some(point) = near.points.into_iter().find(|p| p.name == name) else {
        if let Some(problem) = near.problems.first() {
            return Err(anyhow!("reading the index of restore points: {problem}"));
        }
        return Ok(None);
    };
    Ok(wal_archived(repo, layout, point.timeline, end_lsn).await?.then_some(point))
}

/// Where the restore point record `mark` made starts, from where it ends (what
/// `pg_create_restore_point` returns): 98 bytes (`XLogRecord`, a short data header and
/// `xl_restore_point`; `mark`'s session has no subtransaction or replication origin to add
/// more), 104 MAXALIGNed, plus a page header where it crosses into a page (the long one at a
/// segment's start).
fn record_start(end_lsn: u64, page_size: u64, segment_size: u64) -> u64 {
    const ALIGNED_LEN: u64 = 104;
    let offset = end_lsn % page_size;
    let page = end_lsn - offset;
    let header = if page.is_multiple_of(segment_size) { 40 } else { 24 };
    if offset == 0 || offset >= header + ALIGNED_LEN {
        end_lsn - ALIGNED_LEN
    } else {
        end_lsn - ALIGNED_LEN - header
    }
}

/// Whether the archive holds WAL up to `end_lsn` on `timeline`: the segment holding its last
/// byte whole, or a chunk of it reaching that far (the sidecar puts WAL in order, so the rest
/// before it is there too).
async fn wal_archived(repo: &Repository, layout: WalLayout, timeline: u32, end_lsn: u64) -> Result<bool> {
    let segno = layout.segno_of(end_lsn - 1);
    let start = layout.segment_start(segno);
    let listed =
        repo.list(&layout.segment_objects_prefix(timeline, segno)).await.context("listing the archive's WAL")?;
    Ok(listed.iter().filter_map(|o| layout.parse_object_name(&o.name)).any(|object| match object {
        WalObject::Segment { .. } => true,
        WalObject::Chunk { to, .. } => start + u64::from(to) >= end_lsn,
        WalObject::History { .. } => false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_record_starts_104_bytes_before_its_end_plus_a_crossed_page_header() {
        let (page, seg) = (8192, 16 << 20);
        assert_eq!(record_start(seg + 0x1000, page, seg), seg + 0x1000 - 104);
        // Ends exactly at a page boundary: it did not cross one.
        assert_eq!(record_start(seg + 2 * page, page, seg), seg + 2 * page - 104);
        // Starts 8 bytes before a page boundary: 96 bytes follow the 24-byte header.
        assert_eq!(record_start(seg + page + 24 + 96, page, seg), seg + page - 8);
        // Starts 96 bytes before: 8 bytes follow the header.
        assert_eq!(record_start(seg + page + 24 + 8, page, seg), seg + page - 96);
        // The first page of a segment has the 40-byte header.
        assert_eq!(record_start(2 * seg + 40 + 8, page, seg), 2 * seg - 96);
        // Right after a long header, not crossing: 104 back.
        assert_eq!(record_start(2 * seg + 40 + 104, page, seg), 2 * seg + 40);
    }

    #[test]
    fn names_are_quoted_for_any_standard_conforming_strings() {
        assert_eq!(sql_literal("before-cleanup"), "E'before-cleanup'");
        assert_eq!(sql_literal(r"it's a\path"), r"E'it''s a\\path'");
    }
}
