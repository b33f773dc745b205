//! `pitr drill`: restore to a moment into a scratch server, check it, measure RTO and RPO against
//! the targets, stop and clean up, and report in the seed runbook's "Recovery Test Report" layout.
//!
//! A drill holds a running marker (kind `drill`) from before it reads the catalog until it has
//! cleaned up, as a restore does (see [`crate::recover`]): `pitr expire` meanwhile removes nothing
//! it reads, and a repository that refuses the marker only earns a warning.

use pitr_archive::now_us;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pitr_archive::{ObjectKind, ObjectMeta, Repository, RepositoryError};
use rand::Rng;

use crate::plan::Catalog;
use crate::recover::{
    announce, current_catalog, preflight, restore_marked, RestoreOptions, RestoreReport, StartOptions,
};
use crate::target::{format_time, parse_time, RecoveryTarget};
use crate::RestoreError;
use pitr_archive::running::{RunKind, RunMarker};

/// A checks file: `[[check]]` tables.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksFile {
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckSpec>,
}

/// One check: a SQL query (PostgreSQL drills), or a count of the documents of `collection`
/// matching `filter` (MongoDB drills; `database` is then the MongoDB database). `expect`: `rows`,
/// `no rows`, or a comparison of the first value of the first row (the count): `> N`, `>= N`,
/// `< N`, `<= N`, `= V`, `!= V`. `recorded`: values of the same check taken on the primary at
/// given moments; a drill to exactly such a moment expects that value. A drill skips the checks
/// of the other source.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    pub sql: Option<String>,
    pub collection: Option<String>,
    /// MongoDB query filter, as a TOML table (default: every document).
    pub filter: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default = "default_database")]
    pub database: String,
    pub expect: Option<String>,
    #[serde(default)]
    pub recorded: Vec<Recorded>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    pub at: String,
    pub value: String,
}

fn default_database() -> String {
    "postgres".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrillTarget {
    Random,
    At(RecoveryTarget),
}

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub target: DrillTarget,
    pub scratch_root: PathBuf,
    pub bin_dir: PathBuf,
    pub db_user: String,
    pub restore_command: crate::recover::WalFetchCommand,
    pub workers: usize,
    pub rto_target_seconds: f64,
    pub rpo_target_seconds: f64,
    pub checks: ChecksFile,
    pub keep: bool,
    pub timeout: Duration,
    pub test_type: String,
    /// Where the running marker goes, when not the repository read (see
    /// [`RestoreOptions::marker_repository`]).
    pub marker_repository: Option<Repository>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    pub name: String,
    /// `pass`, `fail` or `skipped`.
    pub result: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DrillReport {
    /// `postgres` or `mongo`.
    pub source: String,
    pub date: String,
    pub test_type: String,
    pub scenario: String,
    pub target: String,
    pub start_time: String,
    pub end_time: String,
    pub duration_seconds: f64,
    /// PASS, FAIL or PARTIAL.
    pub outcome: String,
    pub rto_achieved_seconds: Option<f64>,
    pub rto_target_seconds: f64,
    pub rpo_achieved_seconds: Option<f64>,
    pub rpo_target_seconds: f64,
    pub data_integrity: String,
    pub service_availability: String,
    pub checks: Vec<CheckResult>,
    pub issues: Vec<String>,
    pub improvements: Vec<String>,
    /// The restore's own report (PostgreSQL's or MongoDB's), when it finished.
    pub restore: Option<serde_json::Value>,
    /// One line on what was restored, for the markdown report.
    pub restore_summary: Option<String>,
}

impl ChecksFile {
    /// Every check is one of a SQL check or a MongoDB count, named.
    pub fn validate(&self) -> Result<(), String> {
        for c in &self.checks {
            match (&c.sql, &c.collection) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => return Err(format!("check {:?}: give either `sql` or `collection`", c.name)),
            }
            if c.sql.is_some() && c.filter.is_some() {
                return Err(format!("check {:?}: `filter` goes with `collection`, not `sql`", c.name));
            }
        }
        Ok(())
    }
}

/// What one drill did, whichever database it restored; [`assess`] turns it into the report.
#[derive(Debug, Clone)]
pub struct DrillRun {
    pub source: &'static str,
    pub scenario: String,
    pub target: String,
    pub started_us: i64,
    pub started: Instant,
    /// The restore's report and a one-line summary, or why it failed.
    pub restore: Result<(serde_json::Value, String), String>,
    pub rto_seconds: Option<f64>,
    pub rpo_seconds: Option<f64>,
    /// Of the RTO, the time spent replaying WAL or oplog (for the improvement hint).
    pub replay_seconds: Option<f64>,
    pub checks: Vec<CheckResult>,
    /// What the hint says to take more often to shorten replay.
    pub backup_word: &'static str,
}

/// Judges a drill against the RTO and RPO targets: FAIL if the restore or a check failed,
/// PARTIAL if a target was missed, PASS otherwise.
pub fn assess(run: DrillRun, test_type: &str, rto_target_seconds: f64, rpo_target_seconds: f64) -> DrillReport {
    let mut issues = Vec::new();
    let (restore, restore_summary) = match run.restore {
        Ok((report, summary)) => (Some(report), Some(summary)),
        Err(e) => {
            issues.push(format!("the restore failed: {e}"));
            (None, None)
        }
    };
    let (rto, rpo) = if restore.is_some() { (run.rto_seconds, run.rpo_seconds) } else { (None, None) };
    let checks = run.checks;
    let failed: Vec<&CheckResult> = checks.iter().filter(|c| c.result == "fail").collect();
    for c in &failed {
        issues.push(format!("check {:?} failed: {}", c.name, c.detail));
    }
    let mut over_target = false;
    if let Some(rto) = rto {
        if rto > rto_target_seconds {
            over_target = true;
            issues.push(format!("RTO {rto:.1} s is over the target {rto_target_seconds:.0} s"));
        }
    }
    if let Some(rpo) = rpo {
        if rpo > rpo_target_seconds {
            over_target = true;
            issues.push(format!("RPO {rpo:.1} s is over the target {rpo_target_seconds:.0} s"));
        }
    }
    let outcome = if restore.is_none() || !failed.is_empty() {
        "FAIL"
    } else if over_target {
        "PARTIAL"
    } else {
        "PASS"
    };
    let mut improvements = Vec::new();
    if let Some(rto) = rto {
        if rto > rto_target_seconds * 0.5 {
            improvements.push(format!(
                "RTO uses {:.0} % of its target: take {} more often to shorten replay ({:.1} s of {:.1} s)",
                rto / rto_target_seconds * 100.0,
                run.backup_word,
                run.replay_seconds.unwrap_or(0.0),
                rto
            ));
        }
    }
    if checks.iter().filter(|c| !c.name.starts_with("built-in")).count() == 0 {
        improvements
            .push("add application checks (--checks FILE) so the drill proves the data, not only the server".into());
    }
    let ended_us = now_us();
    DrillReport {
        source: run.source.into(),
        date: format_time(run.started_us)[..10].to_string(),
        test_type: test_type.into(),
        scenario: run.scenario,
        target: run.target,
        start_time: format_time(run.started_us),
        end_time: format_time(ended_us),
        duration_seconds: run.started.elapsed().as_secs_f64(),
        outcome: outcome.into(),
        rto_achieved_seconds: rto,
        rto_target_seconds,
        rpo_achieved_seconds: rpo,
        rpo_target_seconds,
        data_integrity: if restore.is_some() && failed.is_empty() { "PASS".into() } else { "FAIL".into() },
        service_availability: "100 % (the drill ran on a scratch server; the primary was not touched)".into(),
        checks,
        issues,
        improvements,
        restore,
        restore_summary,
    }
}

fn free_port() -> Result<u16, RestoreError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| RestoreError::Other(format!("finding a free port: {e}")))?;
    l.local_addr().map(|a| a.port()).map_err(|e| RestoreError::Other(format!("finding a free port: {e}")))
}

/// Picks the drill's target: for `Random`, a second drawn uniformly from the restorable ranges
/// (never from a gap between them that retention or a lost object left).
pub fn choose_target(catalog: &Catalog, target: DrillTarget) -> Result<RecoveryTarget, RestoreError> {
    match target {
        DrillTarget::At(t) => Ok(t),
        DrillTarget::Random => {
            let w = catalog
                .current_window()
                .ok_or_else(|| RestoreError::OutsideWindow("the archive holds no WAL".into()))?;
            let spans: Vec<(i64, i64)> =
                w.ranges.iter().filter_map(|r| r.end_us.map(|end| (r.start_us, end))).collect();
            if spans.is_empty() {
                return Err(RestoreError::OutsideWindow(
                    "no recoverable window yet (no backup with its WAL archived, or no archived commit)".into(),
                ));
            }
            Ok(RecoveryTarget::Time(random_moment(&spans, &mut rand::thread_rng())))
        }
    }
}

/// A whole second inside one of `spans` (µs, inclusive), uniformly over their total length; a
/// span shorter than a second offers its end.
fn random_moment(spans: &[(i64, i64)], rng: &mut impl Rng) -> i64 {
    let seconds: Vec<(i64, i64)> = spans
        .iter()
        .map(|&(start, end)| (start.div_euclid(1_000_000) + 1, end.div_euclid(1_000_000)))
        .filter(|(first, last)| first <= last)
        .collect();
    let total: i64 = seconds.iter().map(|(first, last)| last - first + 1).sum();
    if total == 0 {
        return spans.last().map(|s| s.1).unwrap_or(0);
    }
    let mut pick = rng.gen_range(0..total);
    for (first, last) in seconds {
        let len = last - first + 1;
        if pick < len {
            return (first + pick) * 1_000_000;
        }
        pick -= len;
    }
    spans.last().map(|s| s.1).unwrap_or(0)
}

pub async fn drill(repo: &Repository, catalog: &Catalog, opts: &DrillOptions) -> Result<DrillReport, RestoreError> {
    let started_us = now_us();
    let started = Instant::now();
    let marker = announce(opts.marker_repository.as_ref().unwrap_or(repo), RunKind::Drill).await;
    let result = drill_marked(repo, catalog, opts, marker.as_ref(), started_us, started).await;
    if let Some(marker) = marker {
        marker.release().await;
    }
    result
}

async fn drill_marked(
    repo: &Repository,
    catalog: &Catalog,
    opts: &DrillOptions,
    marker: Option<&RunMarker>,
    started_us: i64,
    started: Instant,
) -> Result<DrillReport, RestoreError> {
    let mut target = choose_target(catalog, opts.target)?;
    let catalog = match marker {
        Some(_) => current_catalog(repo, catalog, target, None).await?,
        None => std::borrow::Cow::Borrowed(catalog),
    };
    // Read again: a random target is drawn from the window as it is now.
    if matches!(catalog, std::borrow::Cow::Owned(_)) && opts.target == DrillTarget::Random {
        target = choose_target(&catalog, opts.target)?;
    }
    let catalog: &Catalog = &catalog;
    let scratch = opts.scratch_root.join(format!("pitr-drill-{}-{}", started_us / 1_000_000, std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| RestoreError::Io { path: scratch.clone(), cause: e })?;
    let target_dir = scratch.join("data");
    let port = free_port()?;
    let restore_opts = RestoreOptions {
        target,
        target_dir: target_dir.clone(),
        force: false,
        restore_command: opts.restore_command.clone(),
        workers: opts.workers,
        backup_id: None,
        start: Some(StartOptions {
            bin_dir: opts.bin_dir.clone(),
            port,
            db_user: opts.db_user.clone(),
            timeout: opts.timeout,
        }),
        marker_repository: None,
    };
    let restored = match preflight(&restore_opts) {
        Ok(()) => restore_marked(repo, catalog, &restore_opts, &|_, _| {}, marker, Instant::now()).await,
        Err(e) => Err(e),
    };
    let mut checks = Vec::new();
    if restored.is_ok() {
        checks = run_checks(&target_dir, port, opts, target).await;
    }
    stop_server(&opts.bin_dir, &target_dir);
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let scenario = format!(
        "Point-in-time restore of cluster {} to {} ({}) into a scratch server",
        catalog.cluster.system_id,
        target,
        if opts.target == DrillTarget::Random {
            "a random second in the recoverable window"
        } else {
            "a chosen target"
        }
    );
    let (rto, rpo, replay) = match &restored {
        Ok(r) => (Some(r.total_seconds), r.data_loss_window_seconds, r.replay_seconds),
        Err(_) => (None, None, None),
    };
    let restore = match restored {
        Ok(r) => serde_json::to_value(&r).map(|v| (v, summary_of(&r))).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let run = DrillRun {
        source: "postgres",
        scenario,
        target: target.to_string(),
        started_us,
        started,
        restore,
        rto_seconds: rto,
        rpo_seconds: rpo,
        replay_seconds: replay,
        checks,
        backup_word: "base backups",
    };
    Ok(assess(run, &opts.test_type, opts.rto_target_seconds, opts.rpo_target_seconds))
}

fn summary_of(restore: &RestoreReport) -> String {
    format!(
        "Restored from backup {} to {}: last replayed commit {}, LSN {}; {:.1} s writing files, {:.1} s replaying.",
        restore.backup_id,
        restore.target,
        restore.last_replayed_commit_time.as_deref().unwrap_or("-"),
        restore.last_replayed_lsn.as_deref().unwrap_or("-"),
        restore.download_seconds,
        restore.replay_seconds.unwrap_or(0.0)
    )
}

fn stop_server(bin_dir: &Path, dir: &Path) {
    if dir.join("postmaster.pid").exists() {
        let _ = Command::new(bin_dir.join("pg_ctl")).arg("-D").arg(dir).args(["-m", "fast", "-w", "stop"]).output();
    }
}

async fn query_first_value(
    dir: &Path,
    port: u16,
    user: &str,
    db: &str,
    sql: &str,
) -> Result<Option<Option<String>>, String> {
    let conninfo = format!("host={} port={port} user={user} dbname={db} connect_timeout=10", dir.display());
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let rows = client.simple_query(sql).await.map_err(|e| e.to_string());
    drop(client);
    task.abort();
    let rows = rows?;
    for msg in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = msg {
            return Ok(Some(row.get(0).map(str::to_string)));
        }
    }
    Ok(None)
}

/// Compares a check's first value with an expectation.
pub fn evaluate(expect: &str, first: &Option<Option<String>>) -> Result<(), String> {
    let expect = expect.trim();
    match expect {
        "rows" => return first.as_ref().map(|_| ()).ok_or_else(|| "returned no rows".to_string()),
        "no rows" => return if first.is_none() { Ok(()) } else { Err("returned rows".into()) },
        _ => {}
    }
    let value = match first {
        None => return Err("returned no rows".into()),
        Some(None) => return Err("returned NULL".into()),
        Some(Some(v)) => v.clone(),
    };
    let (op, want) = ["!=", ">=", "<=", "=", ">", "<"]
        .iter()
        .find_map(|op| expect.strip_prefix(op).map(|rest| (*op, rest.trim())))
        .ok_or_else(|| {
            format!("unknown expectation {expect:?} (use rows, no rows, > N, >= N, < N, <= N, = V, != V)")
        })?;
    let ok = match op {
        "=" => value == want,
        "!=" => value != want,
        _ => {
            let (v, w): (f64, f64) = match (value.parse(), want.parse()) {
                (Ok(v), Ok(w)) => (v, w),
                _ => return Err(format!("{value:?} {op} {want:?}: not numbers")),
            };
            match op {
                ">" => v > w,
                ">=" => v >= w,
                "<" => v < w,
                _ => v <= w,
            }
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("got {value:?}, expected {op} {want}"))
    }
}

async fn run_checks(dir: &Path, port: u16, opts: &DrillOptions, target: RecoveryTarget) -> Vec<CheckResult> {
    let user = &opts.db_user;
    let mut out = Vec::new();
    // Built-in: the server answers, and every database that allows connections does too.
    match query_first_value(
        dir,
        port,
        user,
        "postgres",
        "select string_agg(datname, ',' order by datname) from pg_database where datallowconn",
    )
    .await
    {
        Ok(Some(Some(list))) => {
            out.push(CheckResult {
                name: "built-in: server accepts connections".into(),
                result: "pass",
                detail: String::new(),
            });
            let mut bad = Vec::new();
            for db in list.split(',') {
                if let Err(e) = query_first_value(dir, port, user, db, "select 1").await {
                    bad.push(format!("{db}: {e}"));
                }
            }
            out.push(CheckResult {
                name: "built-in: every database is listed and reachable".into(),
                result: if bad.is_empty() { "pass" } else { "fail" },
                detail: if bad.is_empty() { format!("databases: {list}") } else { bad.join("; ") },
            });
        }
        other => {
            out.push(CheckResult {
                name: "built-in: server accepts connections".into(),
                result: "fail",
                detail: format!("{other:?}"),
            });
            return out;
        }
    }
    let amcheck = opts.bin_dir.join("pg_amcheck");
    if amcheck.exists() {
        let result = Command::new(&amcheck)
            .arg("-h")
            .arg(dir)
            .args(["-p", &port.to_string(), "-U", user, "--all", "--install-missing"])
            .output();
        let (result, detail) = match result {
            Ok(o) if o.status.success() => ("pass", "pg_amcheck --all: no corruption".to_string()),
            Ok(o) => (
                "fail",
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
                    .trim()
                    .to_string(),
            ),
            Err(e) => ("fail", format!("running {}: {e}", amcheck.display())),
        };
        out.push(CheckResult { name: "built-in: pg_amcheck".into(), result, detail });
    } else {
        out.push(CheckResult {
            name: "built-in: pg_amcheck".into(),
            result: "skipped",
            detail: format!("no pg_amcheck in {}", opts.bin_dir.display()),
        });
    }
    for check in &opts.checks.checks {
        let Some(sql) = &check.sql else { continue };
        let recorded = match target {
            RecoveryTarget::Time(t) => check.recorded.iter().find(|r| parse_time(&r.at) == Some(t)),
            _ => None,
        };
        let expectation = match (recorded, &check.expect) {
            (Some(r), _) => format!("= {}", r.value),
            (None, Some(e)) => e.clone(),
            (None, None) => {
                out.push(CheckResult {
                    name: check.name.clone(),
                    result: "skipped",
                    detail: "no expectation, and no value recorded on the primary for this target".into(),
                });
                continue;
            }
        };
        let first = query_first_value(dir, port, user, &check.database, sql).await;
        let (result, detail) = match first
            .map_err(|e| format!("query failed: {e}"))
            .and_then(|f| evaluate(&expectation, &f).map(|()| f))
        {
            Ok(f) => ("pass", format!("{} (expected {expectation})", f.flatten().unwrap_or_else(|| "rows".into()))),
            Err(e) => ("fail", e),
        };
        out.push(CheckResult { name: check.name.clone(), result, detail });
    }
    out
}

fn minutes(s: Option<f64>) -> String {
    s.map(|s| format!("{:.2} minutes ({s:.1} s)", s / 60.0)).unwrap_or_else(|| "not measured".into())
}

/// The seed runbook's Recovery Test Report, filled in.
pub fn render_markdown(r: &DrillReport) -> String {
    let mut md = String::new();
    let time = |t: &str| t.get(11..16).map(|hm| format!("{hm} UTC")).unwrap_or_default();
    md.push_str("# Recovery Test Report\n\n");
    md.push_str(&format!("**Date**: {}\n**Test Type**: {}\n**Scenario**: {}\n\n", r.date, r.test_type, r.scenario));
    md.push_str("## Execution Summary\n");
    md.push_str(&format!("- **Start Time**: {} ({})\n", time(&r.start_time), r.start_time));
    md.push_str(&format!("- **End Time**: {} ({})\n", time(&r.end_time), r.end_time));
    md.push_str(&format!("- **Duration**: {:.2} minutes\n", r.duration_seconds / 60.0));
    md.push_str(&format!("- **Outcome**: {}\n\n", r.outcome));
    md.push_str("## Metrics\n");
    md.push_str(&format!(
        "- **RTO Achieved**: {} (Target: {:.0} minutes)\n",
        minutes(r.rto_achieved_seconds),
        r.rto_target_seconds / 60.0
    ));
    md.push_str(&format!(
        "- **RPO Achieved**: {} (Target: {:.0} minutes)\n",
        minutes(r.rpo_achieved_seconds),
        r.rpo_target_seconds / 60.0
    ));
    md.push_str(&format!("- **Data Integrity**: {}\n", r.data_integrity));
    md.push_str(&format!("- **Service Availability**: {}\n\n", r.service_availability));
    md.push_str("## Checks\n");
    for c in &r.checks {
        md.push_str(&format!("- {} — **{}** {}\n", c.name, c.result.to_uppercase(), c.detail));
    }
    if let Some(summary) = &r.restore_summary {
        md.push_str(&format!("\n{summary}\n"));
    }
    md.push_str("\n## Issues Identified\n");
    if r.issues.is_empty() {
        md.push_str("None.\n");
    }
    for (i, issue) in r.issues.iter().enumerate() {
        md.push_str(&format!("{}. {issue}\n", i + 1));
    }
    md.push_str("\n## Improvements\n");
    if r.improvements.is_empty() {
        md.push_str("- None suggested by this drill.\n");
    }
    for imp in &r.improvements {
        md.push_str(&format!("- {imp}\n"));
    }
    md.push_str(&format!(
        "\n## Sign-off\n- **Test Lead**: pitr drill (automated)\n- **Operations Lead**: (to sign)\n- **Date**: {}\n",
        r.date
    ));
    md
}

/// Stores the drill's result in the repository, where the sidecar picks it up for its metrics.
pub async fn store_result(repo: &Repository, system_id: u64, report: &DrillReport) -> Result<(), RepositoryError> {
    store_result_under(repo, &format!("pg/{system_id}/"), report).await
}

/// As [`store_result`], under `prefix` (`mongo/<name>/` for MongoDB drills).
pub async fn store_result_under(repo: &Repository, prefix: &str, report: &DrillReport) -> Result<(), RepositoryError> {
    let name = format!("{prefix}drills/{}.json", report.start_time.replace([' ', ':', '+', '.'], "_"));
    let json =
        serde_json::to_vec(report).map_err(|e| RepositoryError::Invalid { name: name.clone(), what: e.to_string() })?;
    repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await?;
    Ok(())
}

/// The newest stored drill result: (outcome, RTO seconds, RPO seconds).
pub async fn latest_result(repo: &Repository, system_id: u64) -> Result<Option<serde_json::Value>, RepositoryError> {
    latest_result_under(repo, &format!("pg/{system_id}/")).await
}

/// As [`latest_result`], under `prefix`.
pub async fn latest_result_under(
    repo: &Repository,
    prefix: &str,
) -> Result<Option<serde_json::Value>, RepositoryError> {
    let prefix = format!("{prefix}drills/");
    let Some(newest) = repo.list(&prefix).await?.into_iter().map(|o| o.name).max() else { return Ok(None) };
    let (_, json) = repo.get_opened(&newest).await?;
    Ok(serde_json::from_slice(&json).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_moments_never_fall_in_a_gap() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let s = 1_000_000i64;
        // A yearly backup's one minute, a year of nothing, then the PITR window's ten minutes.
        let spans = [(100 * s, 160 * s), (31_536_000 * s, 31_536_600 * s)];
        let mut in_old = 0;
        for _ in 0..10_000 {
            let t = random_moment(&spans, &mut rng);
            assert!(spans.iter().any(|&(a, b)| a <= t && t <= b), "{t} is in a gap");
            if t <= 160 * s {
                in_old += 1;
            }
        }
        // Weighted by length: about 60 of 660 seconds are in the old span.
        assert!((500..1300).contains(&in_old), "{in_old}");
        // A span shorter than a second offers its end.
        assert_eq!(random_moment(&[(5 * s + 10, 5 * s + 20)], &mut rng), 5 * s + 20);
    }

    #[test]
    fn expectations() {
        let v = |s: &str| Some(Some(s.to_string()));
        assert!(evaluate("> 0", &v("5")).is_ok());
        assert!(evaluate("> 10", &v("5")).is_err());
        assert!(evaluate(">= 5", &v("5")).is_ok());
        assert!(evaluate("= abc", &v("abc")).is_ok());
        assert!(evaluate("!= abc", &v("abc")).is_err());
        assert!(evaluate("rows", &v("x")).is_ok());
        assert!(evaluate("rows", &None).is_err());
        assert!(evaluate("no rows", &None).is_ok());
        assert!(evaluate("> 1", &Some(None)).unwrap_err().contains("NULL"));
        assert!(evaluate("~ 1", &v("1")).unwrap_err().contains("unknown"));
        assert!(evaluate("> x", &v("1")).unwrap_err().contains("not numbers"));
    }

    #[test]
    fn markdown_has_every_field_of_the_template() {
        let r = DrillReport {
            source: "postgres".into(),
            date: "2026-11-25".into(),
            test_type: "Monthly".into(),
            scenario: "s".into(),
            target: "t".into(),
            start_time: "2026-11-25 14:03:00.000000+00".into(),
            end_time: "2026-11-25 14:05:30.000000+00".into(),
            duration_seconds: 150.0,
            outcome: "PASS".into(),
            rto_achieved_seconds: Some(90.0),
            rto_target_seconds: 1800.0,
            rpo_achieved_seconds: Some(0.5),
            rpo_target_seconds: 300.0,
            data_integrity: "PASS".into(),
            service_availability: "100 %".into(),
            checks: vec![],
            issues: vec![],
            improvements: vec![],
            restore: None,
            restore_summary: None,
        };
        let md = render_markdown(&r);
        for field in [
            "**Date**: 2026-11-25",
            "**Test Type**: Monthly",
            "**Scenario**: s",
            "**Start Time**: 14:03 UTC",
            "**End Time**: 14:05 UTC",
            "**Duration**: 2.50 minutes",
            "**Outcome**: PASS",
            "**RTO Achieved**: 1.50 minutes (90.0 s) (Target: 30 minutes)",
            "**RPO Achieved**: 0.01 minutes (0.5 s) (Target: 5 minutes)",
            "**Data Integrity**: PASS",
            "**Service Availability**: 100 %",
            "## Issues Identified",
            "## Improvements",
            "**Test Lead**",
        ] {
            assert!(md.contains(field), "missing {field:?} in\n{md}");
        }
    }
}
