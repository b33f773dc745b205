//! pitr-drill: the restore drill, whichever database it restores.
//!
//! Owns the drill's skeleton ([`skeleton`]: the [`Drill`] steps a database supplies, and [`run`],
//! which picks a moment, restores, checks, measures RTO and RPO and judges them against the
//! [`Objectives`]), the checks file and the comparison of a check's value with its expectation
//! ([`checks`]), the report in the seed runbook's "Recovery Test Report" layout, as JSON and
//! markdown ([`report`]), and what follows a drill: its result stored in the repository and read
//! back, its gauges, and the log line and run count of a scheduled drill ([`results`]); and the
//! predicted RTO learnt from the stored drills and timed restores ([`rto`]).
//!
//! It does not restore anything nor talk to a database: PostgreSQL's steps are in
//! `pitr_restore::drill`, MongoDB's in `pitr_mongo::drill`, each implementing [`Drill`]. Object
//! names come from `pitr_archive::names`, the report's timestamps from `pitr_archive::time`.

#![deny(missing_docs)]

pub mod checks;
pub mod report;
pub mod results;
pub mod rto;
pub mod skeleton;

pub use checks::{evaluate, CheckResult, CheckSpec, CheckStatus, ChecksFile, Recorded};
pub use report::{render_markdown, DrillReport, Integrity, KeyRotationDrill, Outcome, Source, KEY_ROTATION_SCENARIO};
pub use results::{latest_result, record_gauges, record_latest, scheduled_drill_ended, store_result, Subject};
pub use skeleton::{random_moment, run, Drill, DrillTarget, Measured, Objectives};
