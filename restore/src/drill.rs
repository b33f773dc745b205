//! `pitr drill`, PostgreSQL's steps: restore to a moment into a scratch data directory, start a
//! server there, check it (the server answers, every database is reachable, `pg_amcheck`, the
//! operator's SQL checks), stop it and remove the directory. The skeleton, the judgement and the
//! report are `pitr_drill`'s.
//!
//! A drill holds a running marker (kind `drill`) from before it reads the catalog until it has
//! cleaned up, as a restore does (see [`crate::recover`]): `pitr expire` meanwhile removes nothing
//! it reads, and a repository that refuses the marker only earns a warning.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pitr_archive::running::{RunKind, RunMarker};
use pitr_archive::Repository;
use pitr_drill::{random_moment, CheckResult, ChecksFile, Drill, DrillReport, Measured, Objectives, Source};

use crate::plan::Catalog;
use crate::recover::{
    announce, current_catalog, preflight, restore_marked_as, RestoreOptions, RestoreReport, ServerLaunch, StartOptions,
};
use crate::target::{parse_time, RecoveryTarget};
use crate::RestoreError;

/// Which moment a PostgreSQL drill restores to.
pub type DrillTarget = pitr_drill::DrillTarget<RecoveryTarget>;

/// How to run a PostgreSQL drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// A chosen target, or a random second of the restorable window.
    pub target: DrillTarget,
    /// Where the scratch data directory is made (and removed).
    pub scratch_root: PathBuf,
    /// The PostgreSQL binaries (`pg_ctl`, `postgres`, `pg_amcheck`) matching the backup.
    pub bin_dir: PathBuf,
    /// The user the checks connect as, over the scratch server's Unix socket.
    pub db_user: String,
    /// How the scratch server fetches WAL.
    pub restore_command: crate::recover::WalFetchCommand,
    /// Parallel block downloads.
    pub workers: usize,
    /// Recovery time objective.
    pub rto_target_seconds: f64,
    /// Recovery point objective.
    pub rpo_target_seconds: f64,
    /// The operator's checks (the SQL ones run here).
    pub checks: ChecksFile,
    /// Leave the scratch directory behind (to look at it).
    pub keep: bool,
    /// How long the scratch server may take to reach the target.
    pub timeout: Duration,
    /// The report's "Test Type".
    pub test_type: String,
    /// Where the running marker goes, when not the repository read (see
    /// [`RestoreOptions::marker_repository`]).
    pub marker_repository: Option<Repository>,
}

/// Runs a PostgreSQL drill against `repo`, whose catalog is `catalog`.
pub async fn drill(repo: &Repository, catalog: &Catalog, opts: &DrillOptions) -> Result<DrillReport, RestoreError> {
    let mut steps = PostgresDrill { repo, opts, catalog: Cow::Borrowed(catalog), marker: None, scratch: None };
    let objectives = Objectives {
        test_type: &opts.test_type,
        rto_seconds: opts.rto_target_seconds,
        rpo_seconds: opts.rpo_target_seconds,
    };
    pitr_drill::run(&mut steps, &objectives).await
}

/// One PostgreSQL drill in progress.
struct PostgresDrill<'a> {
    repo: &'a Repository,
    opts: &'a DrillOptions,
    /// As given, or as read again once the marker protects it.
    catalog: Cow<'a, Catalog>,
    marker: Option<RunMarker>,
    /// The scratch directory and the scratch server's port, once made.
    scratch: Option<(PathBuf, u16)>,
}

impl PostgresDrill<'_> {
    fn data_dir(scratch: &Path) -> PathBuf {
        scratch.join("data")
    }
}

impl Drill for PostgresDrill<'_> {
    type Target = RecoveryTarget;
    type Restored = RestoreReport;
    type Error = RestoreError;
    const SOURCE: Source = Source::Postgres;
    const BACKUP_WORD: &'static str = "base backups";

    async fn choose_target(&mut self) -> Result<RecoveryTarget, RestoreError> {
        // An unknown or unreachable restore point is refused before the marker: nothing written.
        if let DrillTarget::At(RecoveryTarget::Name(name)) = self.opts.target {
            self.catalog.restore_point(&name)?;
        }
        self.marker = announce(self.opts.marker_repository.as_ref().unwrap_or(self.repo), RunKind::Drill).await;
        let mut target = choose_target(&self.catalog, self.opts.target)?;
        if self.marker.is_some() {
            if let Cow::Owned(current) = current_catalog(self.repo, &self.catalog, target, None).await? {
                // Drawn again: a random target comes from the window as it is now.
                if self.opts.target == DrillTarget::Random {
                    target = choose_target(&current, self.opts.target)?;
                }
                self.catalog = Cow::Owned(current);
            }
        }
        Ok(target)
    }

    async fn prepare(&mut self, _: RecoveryTarget) -> Result<(), RestoreError> {
        let scratch = self.opts.scratch_root.join(format!(
            "pitr-drill-{}-{}",
            pitr_archive::now_us() / 1_000_000,
            std::process::id()
        ));
        let port = free_port()?;
        std::fs::create_dir_all(&scratch).map_err(|e| RestoreError::Io { path: scratch.clone(), cause: e })?;
        self.scratch = Some((scratch, port));
        Ok(())
    }

    async fn restore(&mut self, target: RecoveryTarget) -> Result<RestoreReport, String> {
        let Some((scratch, port)) = &self.scratch else { return Err("no scratch directory".into()) };
        let opts = self.opts;
        let restore_opts = RestoreOptions {
            target,
            target_dir: Self::data_dir(scratch),
            force: false,
            restore_command: opts.restore_command.clone(),
            workers: opts.workers,
            backup_id: None,
            start: Some(StartOptions {
                bin_dir: opts.bin_dir.clone(),
                port: *port,
                db_user: opts.db_user.clone(),
                timeout: opts.timeout,
            }),
            marker_repository: None,
            standby: None,
            tablespace_map: Default::default(),
            delta: false,
            exclusive: false,
        };
        let restored = match preflight(&restore_opts) {
            Ok(()) => {
                restore_marked_as(
                    self.repo,
                    &self.catalog,
                    &restore_opts,
                    &|_, _| {},
                    self.marker.as_ref(),
                    Instant::now(),
                    &ServerLaunch::scratch("localhost", Vec::new()),
                )
                .await
            }
            Err(e) => Err(e),
        };
        restored.map_err(|e| e.to_string())
    }

    async fn verify(&mut self, target: RecoveryTarget, _: &RestoreReport) -> Vec<CheckResult> {
        match &self.scratch {
            Some((scratch, port)) => run_checks(&Self::data_dir(scratch), *port, self.opts, target).await,
            None => Vec::new(),
        }
    }

    async fn clean_up(&mut self) {
        if let Some((scratch, _)) = self.scratch.take() {
            stop_server(&self.opts.bin_dir, &Self::data_dir(&scratch));
            if !self.opts.keep {
                let _ = std::fs::remove_dir_all(&scratch);
            }
        }
        if let Some(marker) = self.marker.take() {
            marker.release().await;
        }
    }

    fn scenario(&self, target: RecoveryTarget) -> String {
        format!(
            "Point-in-time restore of cluster {} to {} ({}) into a scratch server",
            self.catalog.cluster.system_id,
            target,
            if self.opts.target == DrillTarget::Random {
                "a random second in the recoverable window"
            } else {
                "a chosen target"
            }
        )
    }

    fn measure(&self, r: &RestoreReport) -> Measured {
        Measured {
            rto_seconds: Some(r.total_seconds),
            rpo_seconds: r.data_loss_window_seconds,
            replay_seconds: r.replay_seconds,
        }
    }

    fn summary(&self, r: &RestoreReport) -> String {
        format!(
            "Restored from backup {} to {}: last replayed commit {}, LSN {}; {:.1} s writing files, {:.1} s replaying.",
            r.backup_id,
            r.target,
            r.last_replayed_commit_time.as_deref().unwrap_or("-"),
            r.last_replayed_lsn.as_deref().unwrap_or("-"),
            r.download_seconds,
            r.replay_seconds.unwrap_or(0.0)
        )
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

fn stop_server(bin_dir: &Path, dir: &Path) {
    if dir.join("postmaster.pid").exists() {
        let _ = Command::new(bin_dir.join("pg_ctl")).arg("-D").arg(dir).args(["-m", "fast", "-w", "stop"]).output();
    }
}

/// The first value of the first row of `sql` (`None`: no rows; `Some(None)`: NULL).
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
            out.push(CheckResult::new("built-in: server accepts connections", true, ""));
            let mut bad = Vec::new();
            for db in list.split(',') {
                if let Err(e) = query_first_value(dir, port, user, db, "select 1").await {
                    bad.push(format!("{db}: {e}"));
                }
            }
            out.push(CheckResult::new(
                "built-in: every database is listed and reachable",
                bad.is_empty(),
                if bad.is_empty() { format!("databases: {list}") } else { bad.join("; ") },
            ));
        }
        other => {
            out.push(CheckResult::new("built-in: server accepts connections", false, format!("{other:?}")));
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
        let (ok, detail) = match result {
            Ok(o) if o.status.success() => (true, "pg_amcheck --all: no corruption".to_string()),
            Ok(o) => (
                false,
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
                    .trim()
                    .to_string(),
            ),
            Err(e) => (false, format!("running {}: {e}", amcheck.display())),
        };
        out.push(CheckResult::new("built-in: pg_amcheck", ok, detail));
    } else {
        out.push(CheckResult::skipped("built-in: pg_amcheck", format!("no pg_amcheck in {}", opts.bin_dir.display())));
    }
    for check in &opts.checks.checks {
        let Some(sql) = &check.sql else { continue };
        let expectation = match check.expectation(|at| match target {
            RecoveryTarget::Time(t) => parse_time(at) == Some(t),
            _ => false,
        }) {
            Ok(e) => e,
            Err(skipped) => {
                out.push(skipped);
                continue;
            }
        };
        let first = query_first_value(dir, port, user, &check.database, sql).await;
        let (ok, detail) = match first
            .map_err(|e| format!("query failed: {e}"))
            .and_then(|f| pitr_drill::evaluate(&expectation, &f).map(|()| f))
        {
            Ok(f) => (true, format!("{} (expected {expectation})", f.flatten().unwrap_or_else(|| "rows".into()))),
            Err(e) => (false, e),
        };
        out.push(CheckResult::new(check.name.clone(), ok, detail));
    }
    out
}
