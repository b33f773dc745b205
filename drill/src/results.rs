//! After the report: the result stored in the repository (where the sidecar finds drills run by
//! hand), read back, and exported as metrics and logs.

use pitr_archive::names;
use pitr_archive::{ObjectKind, ObjectMeta, Repository, RepositoryError};

use crate::report::{DrillReport, Outcome, Source};

/// The database a drill restored, as the repository files its results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A PostgreSQL cluster: results under `pg/<system id>/drills/`.
    Postgres {
        /// The cluster's system identifier.
        system_id: u64,
    },
    /// A MongoDB replica set: results under `mongo/<name>/drills/`.
    Mongo {
        /// `[mongo] name`, or the one name the repository holds.
        name: String,
    },
}

impl Subject {
    /// Which database this is.
    pub fn source(&self) -> Source {
        match self {
            Subject::Postgres { .. } => Source::Postgres,
            Subject::Mongo { .. } => Source::Mongo,
        }
    }

    fn drills_prefix(&self) -> String {
        match self {
            Subject::Postgres { system_id } => names::pg::drills_prefix(*system_id),
            Subject::Mongo { name } => names::mongo::drills_prefix(name),
        }
    }

    fn drill_result(&self, start_time: &str) -> String {
        match self {
            Subject::Postgres { system_id } => names::pg::drill_result(*system_id, start_time),
            Subject::Mongo { name } => names::mongo::drill_result(name, start_time),
        }
    }
}

/// Stores the drill's report in the repository, where the sidecar picks it up for its metrics.
pub async fn store_result(repo: &Repository, subject: &Subject, report: &DrillReport) -> Result<(), RepositoryError> {
    let name = subject.drill_result(&report.start_time);
    let json =
        serde_json::to_vec(report).map_err(|e| RepositoryError::Invalid { name: name.clone(), what: e.to_string() })?;
    repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await?;
    Ok(())
}

/// The newest stored drill result; `None` when there is none. A newest result that opens but is
/// not a report is [`RepositoryError::Invalid`], naming it: the caller must not take an older
/// drill, or nothing, for it.
pub async fn latest_result(repo: &Repository, subject: &Subject) -> Result<Option<DrillReport>, RepositoryError> {
    let prefix = subject.drills_prefix();
    let Some(newest) = repo.list(&prefix).await?.into_iter().map(|o| o.name).max() else { return Ok(None) };
    let (_, json) = repo.get_opened(&newest).await?;
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| RepositoryError::Invalid { name: newest, what: format!("not a drill report: {e}") })
}

/// Sets the drill gauges of `subject` from its newest stored result. One that cannot be read (not
/// a report, or not opening: damaged, planted, wrong key) is no pass: `pitr_drill_success` 0,
/// with a warning naming it. `Err` only when the repository cannot be listed or read.
pub async fn record_latest(repo: &Repository, subject: &Subject) -> Result<(), RepositoryError> {
    match latest_result(repo, subject).await {
        Ok(Some(report)) => record_gauges(subject.source(), Some(&report)),
        Ok(None) => {}
        Err(e @ (RepositoryError::Invalid { .. } | RepositoryError::Seal(_))) => {
            tracing::warn!(error = %e, "the newest drill result cannot be read: counted as a failed drill");
            record_gauges(subject.source(), None);
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Sets `pitr_drill_success`, `pitr_drill_rto_seconds` and `pitr_drill_rpo_seconds` from the
/// newest drill of `source`; `None` is a drill that could not run, a failure. PostgreSQL's
/// gauges carry no label, MongoDB's `source="mongo"`, the weekly partial-restore drill's
/// `drill="partial"` (so that the monthly drills' series keep their meaning).
pub fn record_gauges(source: Source, report: Option<&DrillReport>) {
    let mongo = [("source", Source::Mongo.as_str().to_string())];
    let partial = [("drill", Source::Partial.as_str().to_string())];
    let labels: &[(&'static str, String)] = match source {
        Source::Postgres => &[],
        Source::Mongo => &mongo,
        Source::Partial => &partial,
    };
    let outcome = report.map_or(Outcome::Fail, |r| r.outcome);
    metrics::gauge!("pitr_drill_success", labels).set(if outcome.is_pass() { 1.0 } else { 0.0 });
    if let Some(rto) = report.and_then(|r| r.rto_achieved_seconds) {
        metrics::gauge!("pitr_drill_rto_seconds", labels).set(rto);
    }
    if let Some(rpo) = report.and_then(|r| r.rpo_achieved_seconds) {
        metrics::gauge!("pitr_drill_rpo_seconds", labels).set(rpo);
    }
}

/// The end of a scheduled drill, job `job` of the sidecar's scheduler: sets the drill gauges,
/// logs the outcome (or `error`, why the drill could not run) and counts the run in
/// `pitr_scheduled_runs_total` (`success` only for a PASS).
pub fn scheduled_drill_ended(job: &'static str, source: Source, result: Result<&DrillReport, String>) {
    let database = match source {
        Source::Postgres => "",
        Source::Mongo => "MongoDB ",
        Source::Partial => "partial-restore ",
    };
    let success = match result {
        Ok(r) => {
            record_gauges(source, Some(r));
            tracing::info!(job, event = "end", result = %r.outcome, rto = ?r.rto_achieved_seconds,
                rpo = ?r.rpo_achieved_seconds, issues = ?r.issues, "scheduled {database}drill done");
            r.outcome.is_pass()
        }
        Err(error) => {
            record_gauges(source, None);
            tracing::error!(job, event = "end", result = "failure", error = %error, "scheduled {database}drill failed");
            false
        }
    };
    let result = if success { "success" } else { "failure" };
    metrics::counter!("pitr_scheduled_runs_total", "job" => job, "result" => result).increment(1);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pitr_archive::{KeyRing, LocalStore};

    use super::*;

    #[tokio::test]
    async fn a_newest_result_that_is_not_a_report_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let subject = Subject::Postgres { system_id: 7 };
        assert!(latest_result(&repo, &subject).await.unwrap().is_none(), "no drill yet");

        let report =
            DrillReport { outcome: Outcome::Pass, start_time: "2026-12-01T00:00:00Z".into(), ..Default::default() };
        store_result(&repo, &subject, &report).await.unwrap();
        assert_eq!(latest_result(&repo, &subject).await.unwrap().map(|r| r.outcome), Some(Outcome::Pass));

        // A newer result whose outcome no version of pitr writes: not a report, and not the
        // older PASS either.
        let name = names::pg::drill_result(7, "2026-12-02T00:00:00Z");
        let json = br#"{"outcome":"MAYBE","start_time":"2026-12-02T00:00:00Z"}"#.to_vec();
        repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        let err = latest_result(&repo, &subject).await.unwrap_err();
        assert!(matches!(&err, RepositoryError::Invalid { name: n, .. } if *n == name), "{err}");
        assert!(err.to_string().contains("not a drill report"), "{err}");
        record_latest(&repo, &subject).await.expect("an unreadable result is a failed drill, not an error");
    }
}
