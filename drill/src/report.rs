//! The drill's report: the seed runbook's "Recovery Test Report", as JSON (stored in the
//! repository and printed with `--json`) and as markdown.

use std::fmt;

use crate::checks::CheckResult;

/// Which database a drill restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A PostgreSQL cluster. Reports written before MongoDB drills existed name no source: they
    /// are PostgreSQL's.
    #[default]
    Postgres,
    /// A MongoDB replica set.
    Mongo,
    /// The weekly partial-restore drill (`pitr drill --partial`): a table, a collection or a file
    /// set's files restored on their own, whichever the config has.
    Partial,
}

impl Source {
    /// `postgres` or `mongo`, as reports and metric labels write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Postgres => "postgres",
            Source::Mongo => "mongo",
            Source::Partial => "partial",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// How a drill came out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    /// Restored, every check passed, both targets met.
    Pass,
    /// Restored and every check passed, but the RTO or the RPO missed its target.
    Partial,
    /// The restore or a check failed. A stored report that names no outcome counts as this.
    #[default]
    Fail,
}

impl Outcome {
    /// `PASS`, `PARTIAL` or `FAIL`, as reports write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Partial => "PARTIAL",
            Outcome::Fail => "FAIL",
        }
    }

    /// Only a pass is a success: for the exit code, the `pitr_drill_success` gauge and the
    /// scheduled-run counter.
    pub fn is_pass(self) -> bool {
        self == Outcome::Pass
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Whether the restored data held up: restored, and no check failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Integrity {
    /// Restored, and no check failed.
    Pass,
    /// The restore or a check failed.
    #[default]
    Fail,
}

impl Integrity {
    /// `PASS` or `FAIL`, as reports write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Integrity::Pass => "PASS",
            Integrity::Fail => "FAIL",
        }
    }
}

impl fmt::Display for Integrity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A drill's report, and the drill result stored in the repository. Every field has a default
/// so that results stored by older versions read back.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DrillReport {
    /// The database restored.
    pub source: Source,
    /// The day the drill started, `YYYY-MM-DD`.
    pub date: String,
    /// `On demand`, `Monthly (scheduled)` or the operator's words.
    pub test_type: String,
    /// One sentence on what was restored where.
    pub scenario: String,
    /// The target restored to, as the command line writes it.
    pub target: String,
    /// When the drill started and ended (`YYYY-MM-DD HH:MM:SS.ffffff+00`).
    pub start_time: String,
    /// See [`DrillReport::start_time`].
    pub end_time: String,
    /// From start to end.
    pub duration_seconds: f64,
    /// How it came out.
    pub outcome: Outcome,
    /// Time to restore, when the restore finished.
    pub rto_achieved_seconds: Option<f64>,
    /// The configured RTO target.
    pub rto_target_seconds: f64,
    /// Data-loss window achieved, when the restore finished and it could be measured.
    pub rpo_achieved_seconds: Option<f64>,
    /// The configured RPO target.
    pub rpo_target_seconds: f64,
    /// Restored, and no check failed.
    pub data_integrity: Integrity,
    /// The drill never touches the primary; said for the template's sake.
    pub service_availability: String,
    /// Every check, built-in ones first.
    pub checks: Vec<CheckResult>,
    /// What went wrong or missed a target.
    pub issues: Vec<String>,
    /// What would shorten the RTO or strengthen the proof.
    pub improvements: Vec<String>,
    /// The restore's own report (PostgreSQL's or MongoDB's), when it finished.
    pub restore: Option<serde_json::Value>,
    /// One line on what was restored, for the markdown report.
    pub restore_summary: Option<String>,
    /// A key rotation and re-encryption drill's key steps (`pitr drill --key-rotation`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_rotation: Option<KeyRotationDrill>,
}

/// What a key rotation and re-encryption drill did with the keys: it rotated (a new repository
/// key), wrapped every repository key under a master key made for the drill alone and held in
/// memory, restored with only that key, and deleted those wraps again.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KeyRotationDrill {
    /// The repository key the rotation made: it seals new objects from now on.
    pub new_repository_key: String,
    /// The drill-only master key (`drill-<hex>`); forgotten, its wraps deleted, after the drill.
    pub drill_master_key: String,
    /// Repository keys wrapped under it (the repository's, the new one included).
    pub rewrapped_keys: usize,
    /// Whether the restore finished with the drill-only master key as its only key.
    pub restored_with_drill_key_alone: bool,
    /// Drill wrap records deleted afterwards.
    pub wraps_removed: usize,
    /// What went wrong in the key steps (a key that could not be rewrapped, a wrap left behind).
    pub problems: Vec<String>,
}

/// The name the report gives this kind of drill (the seed runbook's "Encryption key rotation and
/// backup re-encryption test").
pub const KEY_ROTATION_SCENARIO: &str = "Key rotation and re-encryption drill";

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
        md.push_str(&format!("- {} — **{}** {}\n", c.name, c.result.as_str().to_uppercase(), c.detail));
    }
    if let Some(summary) = &r.restore_summary {
        md.push_str(&format!("\n{summary}\n"));
    }
    if let Some(k) = &r.key_rotation {
        md.push_str(&format!("\n## {KEY_ROTATION_SCENARIO}\n"));
        md.push_str(&format!("- **New Repository Key**: {}\n", k.new_repository_key));
        md.push_str(&format!(
            "- **Repository Keys Rewrapped**: {} (under the drill-only master key {})\n",
            k.rewrapped_keys, k.drill_master_key
        ));
        md.push_str(&format!(
            "- **Restore With The Rewrapped Keys Alone**: {}\n",
            if k.restored_with_drill_key_alone { "PASS" } else { "FAIL" }
        ));
        md.push_str(&format!("- **Drill Wraps Removed**: {}\n", k.wraps_removed));
        for p in &k.problems {
            md.push_str(&format!("- **Problem**: {p}\n"));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> DrillReport {
        DrillReport {
            source: Source::Postgres,
            date: "2026-11-25".into(),
            test_type: "Monthly".into(),
            scenario: "s".into(),
            target: "t".into(),
            start_time: "2026-11-25 14:03:00.000000+00".into(),
            end_time: "2026-11-25 14:05:30.000000+00".into(),
            duration_seconds: 150.0,
            outcome: Outcome::Pass,
            rto_achieved_seconds: Some(90.0),
            rto_target_seconds: 1800.0,
            rpo_achieved_seconds: Some(0.5),
            rpo_target_seconds: 300.0,
            data_integrity: Integrity::Pass,
            service_availability: "100 %".into(),
            checks: vec![],
            issues: vec![],
            improvements: vec![],
            restore: None,
            restore_summary: None,
            key_rotation: None,
        }
    }

    #[test]
    fn a_key_rotation_drill_says_so_with_its_key_and_count() {
        let mut r = report();
        r.key_rotation = Some(KeyRotationDrill {
            new_repository_key: "r0123abcd".into(),
            drill_master_key: "drill-00ff".into(),
            rewrapped_keys: 3,
            restored_with_drill_key_alone: true,
            wraps_removed: 3,
            problems: vec![],
        });
        let md = render_markdown(&r);
        for field in [
            "## Key rotation and re-encryption drill",
            "**New Repository Key**: r0123abcd",
            "**Repository Keys Rewrapped**: 3 (under the drill-only master key drill-00ff)",
            "**Restore With The Rewrapped Keys Alone**: PASS",
        ] {
            assert!(md.contains(field), "missing {field:?} in\n{md}");
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["key_rotation"]["rewrapped_keys"], 3);
        assert_eq!(serde_json::from_value::<DrillReport>(json).unwrap(), r);
        assert!(serde_json::to_value(report()).unwrap().get("key_rotation").is_none());
    }

    #[test]
    fn markdown_has_every_field_of_the_template() {
        let md = render_markdown(&report());
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

    #[test]
    fn json_keeps_the_strings_of_stored_reports() {
        let mut r = report();
        r.checks.push(CheckResult::new("c", true, ""));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["source"], "postgres");
        assert_eq!(json["outcome"], "PASS");
        assert_eq!(json["data_integrity"], "PASS");
        assert_eq!(json["checks"][0]["result"], "pass");
        assert_eq!(serde_json::from_value::<DrillReport>(json).unwrap(), r);
        for (outcome, word) in [(Outcome::Partial, "PARTIAL"), (Outcome::Fail, "FAIL")] {
            assert_eq!(serde_json::to_value(outcome).unwrap(), word);
            assert_eq!(outcome.to_string(), word);
        }
        assert_eq!(serde_json::to_value(Source::Mongo).unwrap(), "mongo");
    }

    #[test]
    fn results_stored_before_mongo_drills_read_back() {
        // As a PostgreSQL drill stored it before reports named their source.
        let old = serde_json::json!({
            "date": "2026-11-25", "test_type": "On demand", "scenario": "s", "target": "latest",
            "start_time": "2026-11-25 14:03:00.000000+00", "end_time": "2026-11-25 14:04:00.000000+00",
            "duration_seconds": 60.0, "outcome": "PARTIAL", "rto_achieved_seconds": 50.0,
            "rto_target_seconds": 30.0, "rpo_achieved_seconds": null, "rpo_target_seconds": 300.0,
            "data_integrity": "PASS", "service_availability": "100 %",
            "checks": [{"name": "built-in: pg_amcheck", "result": "skipped", "detail": "no pg_amcheck"}],
            "issues": ["RTO 50.0 s is over the target 30 s"], "improvements": [],
            "restore": {"backup_id": "20261125T140000Z", "backup_kind": "full"},
        });
        let r: DrillReport = serde_json::from_value(old).unwrap();
        assert_eq!((r.source, r.outcome, r.rto_achieved_seconds), (Source::Postgres, Outcome::Partial, Some(50.0)));
        assert_eq!(r.restore_summary, None);
        let bare: DrillReport = serde_json::from_str("{}").unwrap();
        assert_eq!(bare.outcome, Outcome::Fail);
    }
}
