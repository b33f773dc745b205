//! The drill's skeleton, the same for every database: pick a moment, restore to it, check the
//! restored server, measure RTO and RPO, judge them against the objectives, and write the
//! report. A database supplies the steps through [`Drill`]; [`run`] calls them in order.

use std::fmt;
use std::future::Future;
use std::time::Instant;

use pitr_archive::now_us;
use pitr_archive::time::format_postgres;
use rand::Rng;

use crate::checks::{CheckResult, CheckStatus};
use crate::report::{DrillReport, Integrity, Outcome, Source};

/// Which moment a drill restores to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrillTarget<T> {
    /// A second drawn uniformly from what the archive can restore.
    Random,
    /// The operator's choice.
    At(T),
}

/// What a drill is judged against, and how its report is titled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objectives<'a> {
    /// The report's "Test Type": `On demand`, `Monthly (scheduled)`…
    pub test_type: &'a str,
    /// Recovery time objective: a longer restore makes the drill PARTIAL.
    pub rto_seconds: f64,
    /// Recovery point objective: a wider data-loss window makes the drill PARTIAL.
    pub rpo_seconds: f64,
}

/// What a finished restore achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measured {
    /// From the start of the restore to a server that answers at the target.
    pub rto_seconds: Option<f64>,
    /// The data-loss window: the target (or the newest archived change) minus the last change
    /// restored; `None` where it cannot be told.
    pub rpo_seconds: Option<f64>,
    /// Of the RTO, the time spent replaying WAL or oplog (for the improvement hint).
    pub replay_seconds: Option<f64>,
}

/// One database's steps of a drill. [`run`] calls them in order: [`choose_target`], [`prepare`],
/// [`restore`], [`verify`] (only after a restore that finished), then [`clean_up`] whatever
/// happened.
///
/// [`choose_target`]: Drill::choose_target
/// [`prepare`]: Drill::prepare
/// [`restore`]: Drill::restore
/// [`verify`]: Drill::verify
/// [`clean_up`]: Drill::clean_up
pub trait Drill: Send {
    /// The moment restored to, as the restore takes it.
    type Target: Copy + fmt::Display + Send + Sync;
    /// The restore's own report; stored in the drill's report as JSON.
    type Restored: serde::Serialize + Send + Sync;
    /// Why a drill could not run at all (no report is written then).
    type Error: Send;

    /// The database restored.
    const SOURCE: Source;
    /// What the RTO hint says to take more often to shorten replay.
    const BACKUP_WORD: &'static str;

    /// Picks the moment to restore to, protecting what the restore will read where the
    /// database needs it.
    fn choose_target(&mut self) -> impl Future<Output = Result<Self::Target, Self::Error>> + Send;

    /// Makes room for the restore (scratch space, a port); a failure here ends the drill with
    /// an error rather than a report.
    fn prepare(&mut self, target: Self::Target) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = target;
        async { Ok(()) }
    }

    /// Restores to `target`. A failure is reported (the drill then FAILs), so it comes as text.
    fn restore(&mut self, target: Self::Target) -> impl Future<Output = Result<Self::Restored, String>> + Send;

    /// Checks the restored server: built-in checks first, then the operator's.
    fn verify(
        &mut self,
        target: Self::Target,
        restored: &Self::Restored,
    ) -> impl Future<Output = Vec<CheckResult>> + Send;

    /// Stops what the drill started and removes what it made; called once, however far the
    /// drill got.
    fn clean_up(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The report's scenario sentence.
    fn scenario(&self, target: Self::Target) -> String;

    /// RTO, RPO and replay time of a restore that finished.
    fn measure(&self, restored: &Self::Restored) -> Measured;

    /// One line on what was restored, for the markdown report.
    fn summary(&self, restored: &Self::Restored) -> String;
}

/// Runs a drill's steps and judges the result against `objectives`.
pub async fn run<D: Drill>(drill: &mut D, objectives: &Objectives<'_>) -> Result<DrillReport, D::Error> {
    let started_us = now_us();
    let started = Instant::now();
    let attempt = restore_and_verify(drill).await;
    drill.clean_up().await;
    let (target, restored, checks) = attempt?;
    let (measured, restore) = match restored {
        Ok(r) => {
            (drill.measure(&r), serde_json::to_value(&r).map(|v| (v, drill.summary(&r))).map_err(|e| e.to_string()))
        }
        Err(e) => (Measured::default(), Err(e)),
    };
    let run = DrillRun {
        source: D::SOURCE,
        scenario: drill.scenario(target),
        target: target.to_string(),
        started_us,
        started,
        restore,
        measured,
        checks,
        backup_word: D::BACKUP_WORD,
    };
    Ok(assess(run, objectives))
}

/// The target, the restore's report or why it failed, and the checks (none without a restore).
type Attempt<D> = (<D as Drill>::Target, Result<<D as Drill>::Restored, String>, Vec<CheckResult>);

async fn restore_and_verify<D: Drill>(drill: &mut D) -> Result<Attempt<D>, D::Error> {
    let target = drill.choose_target().await?;
    drill.prepare(target).await?;
    let restored = drill.restore(target).await;
    let checks = match &restored {
        Ok(r) => drill.verify(target, r).await,
        Err(_) => Vec::new(),
    };
    Ok((target, restored, checks))
}

/// What one drill did, whichever database it restored; [`assess`] turns it into the report.
struct DrillRun {
    source: Source,
    scenario: String,
    target: String,
    started_us: i64,
    started: Instant,
    /// The restore's report and a one-line summary, or why it failed.
    restore: Result<(serde_json::Value, String), String>,
    measured: Measured,
    checks: Vec<CheckResult>,
    backup_word: &'static str,
}

/// Judges a drill against the RTO and RPO objectives: FAIL if the restore or a check failed,
/// PARTIAL if a target was missed, PASS otherwise.
fn assess(run: DrillRun, objectives: &Objectives<'_>) -> DrillReport {
    let (rto_target_seconds, rpo_target_seconds) = (objectives.rto_seconds, objectives.rpo_seconds);
    let mut issues = Vec::new();
    let (restore, restore_summary) = match run.restore {
        Ok((report, summary)) => (Some(report), Some(summary)),
        Err(e) => {
            issues.push(format!("the restore failed: {e}"));
            (None, None)
        }
    };
    let (rto, rpo) =
        if restore.is_some() { (run.measured.rto_seconds, run.measured.rpo_seconds) } else { (None, None) };
    let checks = run.checks;
    let failed: Vec<&CheckResult> = checks.iter().filter(|c| c.result == CheckStatus::Fail).collect();
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
    let intact = restore.is_some() && failed.is_empty();
    let outcome = if !intact {
        Outcome::Fail
    } else if over_target {
        Outcome::Partial
    } else {
        Outcome::Pass
    };
    let mut improvements = Vec::new();
    if let Some(rto) = rto {
        if rto > rto_target_seconds * 0.5 {
            improvements.push(format!(
                "RTO uses {:.0} % of its target: take {} more often to shorten replay ({:.1} s of {:.1} s)",
                rto / rto_target_seconds * 100.0,
                run.backup_word,
                run.measured.replay_seconds.unwrap_or(0.0),
                rto
            ));
        }
    }
    if !checks.iter().any(|c| !c.is_built_in()) {
        improvements
            .push("add application checks (--checks FILE) so the drill proves the data, not only the server".into());
    }
    let start_time = format_postgres(run.started_us);
    DrillReport {
        source: run.source,
        date: start_time[..10].to_string(),
        test_type: objectives.test_type.into(),
        scenario: run.scenario,
        target: run.target,
        end_time: format_postgres(now_us()),
        start_time,
        duration_seconds: run.started.elapsed().as_secs_f64(),
        outcome,
        rto_achieved_seconds: rto,
        rto_target_seconds,
        rpo_achieved_seconds: rpo,
        rpo_target_seconds,
        data_integrity: if intact { Integrity::Pass } else { Integrity::Fail },
        service_availability: "100 % (the drill ran on a scratch server; the primary was not touched)".into(),
        checks,
        issues,
        improvements,
        restore,
        restore_summary,
        key_rotation: None,
    }
}

/// A whole second inside one of `spans` (µs, inclusive), uniformly over their total length, so
/// that a random drill never lands in a gap between restorable ranges; where no span holds a
/// whole second, the end of the last one.
pub fn random_moment(spans: &[(i64, i64)], rng: &mut impl Rng) -> i64 {
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

    /// A database whose restore and checks are given.
    struct Scripted {
        restore: Result<f64, String>,
        checks: Vec<CheckResult>,
        steps: Vec<&'static str>,
    }

    impl Drill for Scripted {
        type Target = u32;
        type Restored = f64;
        type Error = String;
        const SOURCE: Source = Source::Mongo;
        const BACKUP_WORD: &'static str = "snapshots";

        async fn choose_target(&mut self) -> Result<u32, String> {
            self.steps.push("choose");
            Ok(7)
        }
        async fn restore(&mut self, _: u32) -> Result<f64, String> {
            self.steps.push("restore");
            self.restore.clone()
        }
        async fn verify(&mut self, _: u32, _: &f64) -> Vec<CheckResult> {
            self.steps.push("verify");
            self.checks.clone()
        }
        async fn clean_up(&mut self) {
            self.steps.push("clean up");
        }
        fn scenario(&self, target: u32) -> String {
            format!("to {target}")
        }
        fn measure(&self, rto: &f64) -> Measured {
            Measured { rto_seconds: Some(*rto), rpo_seconds: Some(1.0), replay_seconds: Some(rto / 2.0) }
        }
        fn summary(&self, rto: &f64) -> String {
            format!("restored in {rto} s")
        }
    }

    async fn drill(restore: Result<f64, String>, checks: Vec<CheckResult>) -> (DrillReport, Vec<&'static str>) {
        let mut d = Scripted { restore, checks, steps: Vec::new() };
        let objectives = Objectives { test_type: "On demand", rto_seconds: 60.0, rpo_seconds: 300.0 };
        let report = run(&mut d, &objectives).await.unwrap();
        (report, d.steps)
    }

    #[tokio::test]
    async fn a_drill_passes_when_restored_checked_and_in_time() {
        let (r, steps) = drill(Ok(20.0), vec![CheckResult::new("orders", true, "42")]).await;
        assert_eq!(steps, ["choose", "restore", "verify", "clean up"]);
        assert_eq!((r.outcome, r.data_integrity, r.source), (Outcome::Pass, Integrity::Pass, Source::Mongo));
        assert_eq!((r.rto_achieved_seconds, r.rpo_achieved_seconds), (Some(20.0), Some(1.0)));
        assert_eq!((r.target.as_str(), r.scenario.as_str()), ("7", "to 7"));
        assert_eq!(r.restore, Some(serde_json::json!(20.0)));
        assert_eq!(r.restore_summary.as_deref(), Some("restored in 20 s"));
        assert!(r.issues.is_empty() && r.improvements.is_empty(), "{r:?}");
        assert_eq!(r.date, &r.start_time[..10]);
    }

    #[tokio::test]
    async fn a_missed_objective_is_partial_and_a_failed_check_fails() {
        let (r, _) = drill(Ok(90.0), vec![CheckResult::new("built-in: x", true, "")]).await;
        assert_eq!((r.outcome, r.data_integrity), (Outcome::Partial, Integrity::Pass));
        assert_eq!(r.issues, ["RTO 90.0 s is over the target 60 s"]);
        assert!(r.improvements[0].contains("take snapshots more often"), "{:?}", r.improvements);
        assert!(r.improvements[1].contains("add application checks"), "{:?}", r.improvements);

        let (r, _) = drill(Ok(20.0), vec![CheckResult::new("orders", false, "got \"0\", expected > 0")]).await;
        assert_eq!((r.outcome, r.data_integrity), (Outcome::Fail, Integrity::Fail));
        assert_eq!(r.issues, ["check \"orders\" failed: got \"0\", expected > 0"]);
    }

    #[tokio::test]
    async fn a_failed_restore_is_reported_unchecked_and_unmeasured() {
        let (r, steps) = drill(Err("no backup".into()), vec![CheckResult::new("orders", true, "")]).await;
        assert_eq!(steps, ["choose", "restore", "clean up"]);
        assert_eq!((r.outcome, r.rto_achieved_seconds, r.restore.as_ref()), (Outcome::Fail, None, None));
        assert_eq!(r.issues, ["the restore failed: no backup"]);
        assert!(r.checks.is_empty());
    }
}
