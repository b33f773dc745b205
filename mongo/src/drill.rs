//! `pitr drill --source mongo`, MongoDB's steps: restore to a moment (by default a random second
//! of the newest window) into a scratch server and check it (the server answers, replay stopped
//! at the target, every collection counts and validates, the operator's counts). The skeleton,
//! the judgement and the report are `pitr_drill`'s, shared with PostgreSQL drills.
//!
//! MongoDB servers cannot be started by pitr the way a PostgreSQL data directory can, so the
//! scratch server is configured (`[mongo] drill_target_uri`) and owned by the drill: every
//! database on it is dropped before each drill. The drill refuses a scratch server that is one of
//! the hosts of the backed-up replica set.

use std::time::Duration;

use bson::{doc, Document};
use pitr_archive::time::{format_rfc3339_micros, parse_time};
use pitr_archive::Repository;
use pitr_drill::{evaluate, random_moment, CheckResult, ChecksFile, Drill, DrillReport, Measured, Objectives, Source};

use crate::layout::MongoCatalog;
use crate::restore::{restore, MongoRestoreReport, MongoTarget, RestoreOptions};
use crate::{code_of, connect, Connected, MongoError, Ts};

/// How to run a MongoDB drill.
#[derive(Debug, Clone)]
pub struct MongoDrillOptions {
    /// `None`: a uniformly chosen second of the newest window.
    pub target: Option<MongoTarget>,
    /// The backed-up replica set (`[mongo] uri`), only to refuse it as the scratch server.
    pub source_uri: String,
    /// The scratch server (`[mongo] drill_target_uri`); its databases are dropped.
    pub drill_uri: String,
    /// How long connecting to the scratch server may take.
    pub connect_timeout: Duration,
    /// The operator's checks (the collection counts run here).
    pub checks: ChecksFile,
    /// Recovery time objective.
    pub rto_target_seconds: f64,
    /// Recovery point objective.
    pub rpo_target_seconds: f64,
    /// The report's "Test Type".
    pub test_type: String,
}

/// The hosts (`host:port`, lower case) a MongoDB URI names.
fn hosts(uri: &str) -> Vec<String> {
    let rest = uri.split_once("://").map(|(_, r)| r).unwrap_or(uri);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    authority
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| if h.contains(':') { h.to_ascii_lowercase() } else { format!("{}:27017", h.to_ascii_lowercase()) })
        .collect()
}

/// A random second of the newest window, as a time target.
fn random_target(catalog: &MongoCatalog) -> Result<MongoTarget, MongoError> {
    let window = catalog.windows().into_iter().next_back().ok_or_else(|| MongoError::OutsideWindow {
        target: "random".into(),
        windows: "no snapshot has its oplog archived yet (run `pitr backup --source mongo` with the sidecar streaming)"
            .into(),
    })?;
    let span = (window.from_us, window.to_us.unwrap_or(window.from_us));
    Ok(MongoTarget::Time(random_moment(&[span], &mut rand::thread_rng())))
}

/// Runs a MongoDB drill against `repo`, whose MongoDB catalog is `catalog`.
pub async fn drill(
    repo: &Repository,
    catalog: &MongoCatalog,
    opts: &MongoDrillOptions,
) -> Result<DrillReport, MongoError> {
    let source_hosts = hosts(&opts.source_uri);
    if let Some(h) = hosts(&opts.drill_uri).iter().find(|h| source_hosts.contains(h)) {
        return Err(MongoError::BadUri {
            uri: crate::redact(&opts.drill_uri),
            why: format!(
                "[mongo] drill_target_uri names {h}, a host of the backed-up replica set ([mongo] uri); a drill \
                 drops every database on its scratch server, so it must be a server of its own"
            ),
        });
    }
    let objectives = Objectives {
        test_type: &opts.test_type,
        rto_seconds: opts.rto_target_seconds,
        rpo_seconds: opts.rpo_target_seconds,
    };
    pitr_drill::run(&mut MongoDrill { repo, catalog, opts }, &objectives).await
}

/// One MongoDB drill in progress.
struct MongoDrill<'a> {
    repo: &'a Repository,
    catalog: &'a MongoCatalog,
    opts: &'a MongoDrillOptions,
}

impl Drill for MongoDrill<'_> {
    type Target = MongoTarget;
    type Restored = MongoRestoreReport;
    type Error = MongoError;
    const SOURCE: Source = Source::Mongo;
    const BACKUP_WORD: &'static str = "snapshots (`pitr backup --source mongo`)";

    async fn choose_target(&mut self) -> Result<MongoTarget, MongoError> {
        match self.opts.target {
            Some(t) => Ok(t),
            None => random_target(self.catalog),
        }
    }

    async fn restore(&mut self, target: MongoTarget) -> Result<MongoRestoreReport, String> {
        let restore_opts = RestoreOptions {
            target,
            target_uri: self.opts.drill_uri.clone(),
            drop: true,
            connect_timeout: self.opts.connect_timeout,
            source_uri: Some(self.opts.source_uri.clone()),
        };
        restore(self.repo, self.catalog, &restore_opts).await.map_err(|e| e.to_string())
    }

    async fn verify(&mut self, target: MongoTarget, restored: &MongoRestoreReport) -> Vec<CheckResult> {
        match connect(&self.opts.drill_uri, self.opts.connect_timeout).await {
            Ok(conn) => {
                let mut checks = built_in_checks(&conn, target, restored).await;
                checks.extend(user_checks(&conn, &self.opts.checks, target).await);
                checks
            }
            Err(e) => vec![CheckResult::new("built-in: server accepts connections", false, e.to_string())],
        }
    }

    fn scenario(&self, target: MongoTarget) -> String {
        format!(
            "Point-in-time restore of MongoDB {} to {target} ({}) into the scratch server {}",
            self.catalog.layout.name,
            if self.opts.target.is_none() { "a random second in the newest window" } else { "a chosen target" },
            crate::redact(&self.opts.drill_uri)
        )
    }

    fn measure(&self, r: &MongoRestoreReport) -> Measured {
        Measured {
            rto_seconds: Some(r.total_seconds),
            rpo_seconds: Some(r.data_loss_window_seconds),
            replay_seconds: Some(r.replay_seconds),
        }
    }

    fn summary(&self, r: &MongoRestoreReport) -> String {
        format!(
            "Restored snapshot {} ({} documents in {} collections) to {}: {} oplog entries applied ({} transactions), \
             last {} at {}; {:.1} s loading, {:.1} s replaying.",
            r.snapshot_id,
            r.documents,
            r.collections,
            r.target,
            r.entries_applied,
            r.transactions_applied,
            r.last_applied_ts.as_deref().unwrap_or("-"),
            r.last_applied_time.as_deref().unwrap_or("-"),
            r.load_seconds,
            r.replay_seconds
        )
    }
}

async fn namespaces(conn: &Connected) -> Result<Vec<(String, String)>, mongodb::error::Error> {
    let mut out = Vec::new();
    for db in conn.client.list_database_names().await? {
        if crate::apply::is_system_db(&db) {
            continue;
        }
        for c in conn.client.database(&db).list_collection_names().await? {
            if !c.starts_with("system.") {
                out.push((db.clone(), c));
            }
        }
    }
    out.sort();
    Ok(out)
}

const COMMAND_NOT_FOUND: i32 = 59;

async fn built_in_checks(conn: &Connected, target: MongoTarget, report: &MongoRestoreReport) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let pinged = conn.client.database("admin").run_command(doc! { "ping": 1 }).await;
    let failed = pinged.as_ref().err().map(|e| e.to_string());
    out.push(CheckResult::new(
        "built-in: server accepts connections",
        failed.is_none(),
        failed.clone().unwrap_or_default(),
    ));
    if failed.is_some() {
        return out;
    }

    // Replay must stop at the target: never an entry beyond it.
    let last_ts = report.last_applied_ts.as_deref().and_then(Ts::parse_arg);
    let (ok, detail) = match target {
        MongoTarget::Ts(t) => (
            last_ts.is_none_or(|l| l <= t),
            format!("last applied {} (target {t})", report.last_applied_ts.as_deref().unwrap_or("none")),
        ),
        MongoTarget::Time(us) => (
            report.last_applied_time.as_deref().and_then(parse_time).is_none_or(|t| t <= us),
            format!(
                "last applied entry written at {} (target {})",
                report.last_applied_time.as_deref().unwrap_or("none"),
                format_rfc3339_micros(us)
            ),
        ),
        MongoTarget::Latest => (true, format!("last applied {}", report.last_applied_ts.as_deref().unwrap_or("none"))),
    };
    out.push(CheckResult::new("built-in: replay stopped at the target", ok, detail));

    // Every collection answers a count and, where the server has it, `validate`.
    match namespaces(conn).await {
        Ok(list) => {
            let (mut documents, mut bad, mut validated, mut no_validate) = (0u64, Vec::new(), 0usize, false);
            for (db, coll) in &list {
                let c = conn.client.database(db).collection::<Document>(coll);
                match c.count_documents(doc! {}).await {
                    Ok(n) => documents += n,
                    Err(e) => bad.push(format!("{db}.{coll}: count failed: {e}")),
                }
                match conn.client.database(db).run_command(doc! { "validate": coll.as_str() }).await {
                    Ok(r) if r.get_bool("valid").unwrap_or(true) => validated += 1,
                    Ok(r) => bad.push(format!("{db}.{coll}: validate says invalid: {r}")),
                    Err(e) if code_of(&e) == Some(COMMAND_NOT_FOUND) => no_validate = true,
                    Err(e) => bad.push(format!("{db}.{coll}: validate failed: {e}")),
                }
            }
            let detail = if bad.is_empty() {
                format!(
                    "{} collections, {documents} documents; {}",
                    list.len(),
                    if no_validate {
                        "the server has no `validate` command".to_string()
                    } else {
                        format!("{validated} validated")
                    }
                )
            } else {
                bad.join("; ")
            };
            out.push(CheckResult::new("built-in: every collection is readable", bad.is_empty(), detail));
        }
        Err(e) => out.push(CheckResult::new("built-in: every collection is readable", false, format!("listing: {e}"))),
    }
    out
}

/// Whether a check's recorded moment is this drill's target.
fn recorded_at(at: &str, target: MongoTarget) -> bool {
    match (MongoTarget::parse(at), target) {
        (Ok(MongoTarget::Ts(a)), MongoTarget::Ts(t)) => a == t,
        (Ok(MongoTarget::Time(a)), MongoTarget::Time(t)) => a == t,
        _ => false,
    }
}

async fn user_checks(conn: &Connected, checks: &ChecksFile, target: MongoTarget) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for spec in &checks.checks {
        let Some(collection) = &spec.collection else { continue };
        let expectation = match spec.expectation(|at| recorded_at(at, target)) {
            Ok(e) => e,
            Err(skipped) => {
                out.push(skipped);
                continue;
            }
        };
        let filter = match spec.filter.as_ref().map(bson::to_document).transpose() {
            Ok(f) => f.unwrap_or_default(),
            Err(e) => {
                out.push(CheckResult::new(spec.name.clone(), false, format!("filter is not a MongoDB query: {e}")));
                continue;
            }
        };
        let counted =
            conn.client.database(&spec.database).collection::<Document>(collection).count_documents(filter).await;
        let (ok, detail) = match counted {
            Ok(n) => match evaluate(&expectation, &Some(Some(n.to_string()))) {
                Ok(()) => (true, format!("{n} (expected {expectation})")),
                Err(e) => (false, e),
            },
            Err(e) => (false, format!("count failed: {e}")),
        };
        out.push(CheckResult::new(spec.name.clone(), ok, detail));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_uris() {
        assert_eq!(hosts("mongodb://u:p@A:1,b/?replicaSet=rs"), vec!["a:1", "b:27017"]);
        assert_eq!(hosts("mongodb://127.0.0.1:27018"), vec!["127.0.0.1:27018"]);
    }

    #[test]
    fn recorded_moments_match_only_their_own_target() {
        let t = Ts { secs: 10, inc: 2 };
        assert!(recorded_at("ts:10:2", MongoTarget::Ts(t)));
        assert!(!recorded_at("ts:10:3", MongoTarget::Ts(t)));
        assert!(recorded_at("2026-12-01T00:00:01Z", MongoTarget::Time(1_796_083_201_000_000)));
        assert!(!recorded_at("garbage", MongoTarget::Latest));
    }
}
