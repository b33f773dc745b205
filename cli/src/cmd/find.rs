//! `pitr find`: the moment to restore to. Reads the change index (segments without an index
//! object are decoded from the archived WAL), names relations through the catalog snapshots and
//! prints the matching commits newest first with the last safe target before each
//! ([`pitr_restore::find`] holds the logic). `--source mongo` is [`pitr_mongo::find`] on the
//! archived oplog slices.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use pitr_archive::catalog;
use pitr_archive::change_index;
use pitr_archive::continuity::TimelinePath;
use pitr_pgformat::changes::CommitEntry;
use pitr_pgformat::lsn::{format_lsn, parse_lsn};
use pitr_restore::find::{self, Commit, Op, Query, Rules, TableName};

use crate::config::Config;
use crate::{open, output};

/// What `pitr find` was asked.
pub struct FindArgs {
    /// `--table SCHEMA.NAME` (PostgreSQL).
    pub table: Option<String>,
    /// `--database DB`.
    pub database: Option<String>,
    /// `--ns DB.COLL` (MongoDB).
    pub ns: Option<String>,
    /// `--op`.
    pub op: Option<String>,
    /// `--since TIME`.
    pub since: Option<String>,
    /// `--until TIME`.
    pub until: Option<String>,
    /// `--limit N`.
    pub limit: usize,
    /// `--xid N`.
    pub xid: Option<u32>,
    /// `--lsn X/Y`.
    pub lsn: Option<String>,
    /// `--destructive`.
    pub destructive: bool,
    /// `--json`.
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Found<'a> {
    commits: &'a [Commit],
    /// How many matched (before `--limit`).
    matched: usize,
    /// Segments read from index objects / decoded from WAL now.
    segments_indexed: usize,
    segments_decoded: usize,
    /// Where reading began (commits before it were not searched).
    read_from_lsn: String,
    problems: Vec<String>,
}

fn time_arg(flag: &str, value: Option<&str>) -> Result<Option<i64>> {
    value
        .map(|v| pitr_archive::time::parse_time(v).ok_or_else(|| anyhow!("{flag} {v:?}: not a time pitr understands")))
        .transpose()
}

/// `--since` and `--until` as µs; one after the other is refused.
fn time_window(args: &FindArgs) -> Result<(Option<i64>, Option<i64>)> {
    let since_us = time_arg("--since", args.since.as_deref())?;
    let until_us = time_arg("--until", args.until.as_deref())?;
    if let (Some(s), Some(u)) = (since_us, until_us) {
        if s > u {
            bail!(
                "--since {} is after --until {}",
                args.since.as_deref().unwrap_or_default(),
                args.until.as_deref().unwrap_or_default()
            );
        }
    }
    Ok((since_us, until_us))
}

/// `pitr find` for PostgreSQL.
pub async fn run(config_path: &Path, args: FindArgs) -> Result<()> {
    let config = Config::load(config_path)?;
    let (since_us, until_us) = time_window(&args)?;
    let op = args
        .op
        .as_deref()
        .map(|o| Op::parse(o).ok_or_else(|| anyhow!("--op {o:?}: one of drop, truncate, delete, update, insert, ddl")))
        .transpose()?;
    let lsn = args
        .lsn
        .as_deref()
        .map(|l| parse_lsn(l).ok_or_else(|| anyhow!("--lsn {l:?}: an LSN is X/Y in hex")))
        .transpose()?;
    if args.ns.is_some() {
        bail!("--ns names a MongoDB collection: use it with --source mongo");
    }
    let asked =
        [args.table.is_some(), args.xid.is_some(), lsn.is_some(), args.destructive].iter().filter(|b| **b).count();
    if asked == 0 {
        bail!("say what to find: --table SCHEMA.NAME, --xid N, --lsn X/Y or --destructive");
    }
    if args.xid.is_some() && lsn.is_some() {
        bail!("--xid and --lsn each name one transaction: give one");
    }
    let table = args
        .table
        .as_deref()
        .map(|t| TableName::parse(t).ok_or_else(|| anyhow!("--table {t:?}: expected SCHEMA.NAME or NAME")))
        .transpose()?;

    let repo = open::reader(&config, None)?;
    let info = open::checked_cluster(&config, &repo).await?;
    let system_id = info.system_id;
    // Every timeline's commits, oldest first; a commit copied into a newer timeline's first
    // segment (before its switch point) is the same commit: kept once.
    // The newest timeline's history: its ancestors up to their switch points. Commits of an
    // abandoned branch are not on it (a restore along the path cannot reach them).
    let restore_catalog = open::checked_catalog(&config, &repo).await?;
    let wal = &restore_catalog.wal;
    let timelines: std::collections::BTreeSet<u32> = wal.segments.keys().map(|(t, _)| *t).collect();
    let newest = timelines.iter().next_back().copied().unwrap_or(1);
    let path = TimelinePath::new(newest, restore_catalog.histories.get(&newest).map(Vec::as_slice).unwrap_or(&[]));
    let on_path: Vec<u32> = path.timelines().filter(|t| timelines.contains(t)).collect();
    let off_path: Vec<String> = timelines.iter().filter(|t| !on_path.contains(t)).map(u32::to_string).collect();
    let mut entries: Vec<CommitEntry> = Vec::new();
    let (mut indexed, mut decoded, mut problems) = (0, 0, Vec::new());
    if !off_path.is_empty() {
        problems.push(format!(
            "timeline(s) {} are not on the history of timeline {newest}: not searched",
            off_path.join(", ")
        ));
    }
    // With --since, nothing before the start of the newest backup that ended before it needs
    // reading: a commit record written before that backup's stop carries an earlier time (the
    // backup's whole duration is the margin for clock steps). Without it, `[find] window` back
    // from now (each segment read is a GET); `--lsn` reads from its own segment (the one before
    // too, for a commit record that began there).
    let layout = pitr_archive::WalLayout::new(&info);
    let window_start =
        pitr_archive::now_us().saturating_sub(i64::try_from(config.find.window.as_micros()).unwrap_or(i64::MAX));
    let read_since = since_us.unwrap_or(window_start);
    let from_segno = match lsn {
        Some(l) if since_us.is_none() => layout.segno_of(l).saturating_sub(1),
        _ => restore_catalog
            .backups
            .iter()
            .filter(|b| b.stop_time_us < read_since)
            .map(|b| b.start_lsn)
            .max()
            .map_or(0, |lsn| layout.segno_of(lsn)),
    };
    let bounded = from_segno > 0 && since_us.is_none() && lsn.is_none();
    let mut snaps = catalog::load_from(&repo, system_id, from_segno.saturating_mul(info.wal_segment_size)).await;
    // Without the listing, every table would look unknown: that is an error, not an answer.
    if let Some(p) = snaps.problems.iter().find(|p| p.object == pitr_archive::names::pg::catalog_prefix(system_id)) {
        bail!("catalog snapshots {p}");
    }
    // Snapshots of an abandoned branch (a timeline not on the path, or one past where the path
    // left it) describe relfilenodes that branch assigned: they would name and classify this
    // history's relations wrongly.
    snaps.snapshots.retain(|s| {
        path.timelines().any(|t| t == s.timeline) && path.switch_lsn(s.timeline).is_none_or(|switch| s.lsn < switch)
    });
    let table = match table {
        Some(t) => {
            let db = find::table_database(&snaps, &t, args.database.as_deref())?;
            Some((t, db))
        }
        None => None,
    };
    let bar = crate::output::progress_count_bar(!args.json, "reading the change index (timelines)");
    if let Some(bar) = &bar {
        bar.set_length(on_path.len() as u64);
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
    }
    for &tli in &on_path {
        let view = change_index::load_range_with(&repo, &info, wal, tli, from_segno, None)
            .await
            .with_context(|| format!("reading the change index of timeline {tli}"))?;
        indexed += view.segments.iter().filter(|c| c.indexed).count();
        decoded += view.segments.iter().filter(|c| !c.indexed).count();
        problems.extend(view.problems.iter().map(|p| p.to_string()));
        for w in view.segments.windows(2) {
            if w[1].segno != w[0].segno + 1 {
                problems.push(format!(
                    "timeline {tli}: no WAL archived between {} and {}: commits there are not known",
                    format_lsn(w[0].to_lsn),
                    format_lsn(w[1].from_lsn)
                ));
            }
        }
        let switch = path.switch_lsn(tli);
        entries.extend(view.entries.into_iter().filter(|e| switch.is_none_or(|s| e.end_lsn <= s)));
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let searched_from = if bounded {
        format!(
            "; read from WAL segment {} ([find] window {}; --since TIME reads further back)",
            layout.segment_file_name(on_path.first().copied().unwrap_or(newest), from_segno),
            humantime::format_duration(config.find.window)
        )
    } else {
        String::new()
    };
    entries.sort_by_key(|e| (e.commit_lsn, e.xid));
    entries.dedup_by_key(|e| (e.commit_lsn, e.xid));
    problems.extend(snaps.problems.iter().map(|p| format!("catalog snapshot {p}")));
    if decoded > 0 {
        eprintln!(
            "note: {decoded} of {} WAL segment(s) have no change index object and were decoded from the archived WAL \
             now (the sidecar indexes as it streams; `pitr verify --rebuild-index` writes missing ones)",
            decoded + indexed
        );
    }
    for p in &problems {
        eprintln!("warning: {p}");
    }

    let rules = Rules { min_rows: config.find.min_rows, destructive_fraction: config.find.destructive_fraction };
    let query =
        Query { table: table.clone(), op, destructive_only: args.destructive, since_us, until_us, table_toast: None }
            .prepare(&snaps);
    let mut commits: Vec<Commit> = entries
        .iter()
        .rev()
        .filter(|e| args.xid.is_none_or(|x| e.xid == x))
        .filter(|e| lsn.is_none_or(|l| e.commit_lsn <= l && l < e.end_lsn || e.commit_lsn == l))
        .filter_map(|e| find::select(find::describe_among(e, &snaps, rules, &entries), &query, &snaps))
        .collect();
    if let Some(l) = lsn {
        // `--lsn` names a transaction by any LSN inside its commit record, or else the first
        // commit at or after it.
        if commits.is_empty() {
            commits = entries
                .iter()
                .find(|e| e.commit_lsn >= l)
                .and_then(|e| find::select(find::describe_among(e, &snaps, rules, &entries), &query, &snaps))
                .into_iter()
                .collect();
        }
    }
    let matched = commits.len();
    commits.truncate(args.limit);
    let config_shown = Some(config_path.display().to_string());
    if args.json {
        return output::print_json(&Found {
            commits: &commits,
            matched,
            segments_indexed: indexed,
            segments_decoded: decoded,
            read_from_lsn: format_lsn(from_segno.saturating_mul(info.wal_segment_size)),
            problems,
        });
    }
    if commits.is_empty() {
        let what = match (&table, args.xid, lsn) {
            (Some((t, db)), _, _) => format!(" touching {db}:{}", t.qualified()),
            (_, Some(x), _) => format!(" of transaction {x} (it may have aborted, or be outside the archive)"),
            (_, _, Some(l)) => format!(" at or after {}", format_lsn(l)),
            _ => String::new(),
        };
        println!("no commits found{what} ({} commits searched{searched_from})", entries.len());
        return Ok(());
    }
    for c in &commits {
        println!(
            "{}  xid {}  commit {}{}{}{}",
            c.time,
            c.xid,
            c.commit_lsn,
            if c.destructive { "  DESTRUCTIVE" } else { "" },
            if c.ddl { "  ddl" } else { "" },
            if c.incomplete { "  (counts may be short)" } else { "" }
        );
        for t in &c.relations {
            println!("    {}: {}", t.shown(), t.what());
        }
        if c.more_relations {
            println!("    … and more relations");
        }
        // The LSN form is the command: an xid target replays from the oldest backup.
        println!(
            "    last safe target: --to {} --exclusive  (or --to {} --exclusive, which replays from the oldest backup)",
            c.safe_target_lsn, c.safe_target_xid
        );
        println!("    {}", find::restore_command(c, config_shown.as_deref()));
    }
    if matched > commits.len() {
        println!("({} more; --limit to see them)", matched - commits.len());
    }
    Ok(())
}

/// `s` with control characters escaped: a namespace is the server's (MongoDB allows newlines
/// and escape sequences in collection names), and must not rewrite the operator's terminal.
fn terminal_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.escape_debug().to_string().into()
    } else {
        s.into()
    }
}

#[derive(serde::Serialize)]
struct FoundMongo<'a> {
    events: &'a [pitr_mongo::find::Event],
    matched: usize,
    /// Oplog gaps recorded (entries lost between the two `ts`): events there are not known.
    gaps: Vec<String>,
}

/// `pitr find --source mongo --ns DB.COLL [--op …]`: drops, renames and deletes/updates of
/// the collection in the archived oplog, newest first, each with the restore target before it.
pub async fn run_mongo(config_path: &Path, args: FindArgs) -> Result<()> {
    use pitr_mongo::find::{self as mfind, Kind};
    let config = Config::load(config_path)?;
    if args.table.is_some() || args.xid.is_some() || args.lsn.is_some() || args.database.is_some() {
        bail!("--table, --database, --xid and --lsn are PostgreSQL's; with --source mongo use --ns DB.COLL or --destructive");
    }
    if args.ns.is_none() && !args.destructive {
        bail!("say what to find: --ns DB.COLL or --destructive");
    }
    if let Some(ns) = &args.ns {
        if pitr_mongo::apply::Ns::parse(ns).is_none() {
            bail!("--ns {ns:?}: expected DB.COLL");
        }
    }
    let (since_us, until_us) = time_window(&args)?;
    let op = args
        .op
        .as_deref()
        .map(|o| Kind::parse(o).ok_or_else(|| anyhow!("--op {o:?}: one of drop, dropDatabase, rename, delete, update")))
        .transpose()?;
    let repo = open::reader(&config, None)?;
    repo.check().await?;
    let catalog = open::mongo_catalog(&config, &repo).await?;
    let events = mfind::scan(&repo, &catalog, config.find.min_rows).await.context("reading the archived oplog")?;
    let mut found: Vec<mfind::Event> = events
        .into_iter()
        .rev()
        .filter(|e| args.ns.as_deref().is_none_or(|ns| mfind::concerns(e, ns)))
        .filter(|e| op.is_none_or(|k| e.kind == k))
        .filter(|e| !args.destructive || e.destructive)
        .filter(|e| since_us.is_none_or(|s| e.time_us >= s) && until_us.is_none_or(|u| e.time_us <= u))
        .collect();
    let gaps: Vec<String> = catalog.gaps.iter().map(|(a, b)| format!("{a} .. {b}")).collect();
    for g in &gaps {
        eprintln!("warning: the oplog rolled past the archive between {g}: what happened there is not known");
    }
    let matched = found.len();
    found.truncate(args.limit);
    if args.json {
        return output::print_json(&FoundMongo { events: &found, matched, gaps });
    }
    if found.is_empty() {
        println!(
            "no oplog entries found{}",
            args.ns.map(|n| format!(" for {}", terminal_safe(&n))).unwrap_or_default()
        );
        return Ok(());
    }
    for e in &found {
        let what = match e.kind {
            Kind::Drop => "drop".to_string(),
            Kind::DropDatabase => format!("dropDatabase {}", terminal_safe(&e.ns)),
            Kind::RenameCollection => format!("renameCollection to {}", terminal_safe(e.to.as_deref().unwrap_or("?"))),
            Kind::Delete => format!("deleted {}", e.count),
            Kind::Update => format!("updated {}", e.count),
        };
        println!(
            "{}  {}  {}: {what}{}{}",
            pitr_restore::format_time(e.time_us),
            e.first_ts,
            terminal_safe(&e.ns),
            if e.transaction { " (transaction)" } else { "" },
            if e.destructive { "  DESTRUCTIVE" } else { "" }
        );
        println!(
            "    last safe target: --to {}   pitr --config {} restore --source mongo --to {} --target-uri URI",
            e.safe_target,
            config_path.display(),
            e.safe_target
        );
    }
    if matched > found.len() {
        println!("({} more; --limit to see them)", matched - found.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn namespaces_cannot_rewrite_the_terminal() {
        assert_eq!(super::terminal_safe("shop.items"), "shop.items");
        assert_eq!(super::terminal_safe("shop.a\nb\u{1b}[2J"), "shop.a\\nb\\u{1b}[2J");
    }
}
