//! Predicted RTO: how long a restore of the newest backup chain to the newest archived WAL would
//! take now, from the timings the newest drills (and restores run by hand) measured.
//!
//! Owns the model (pure: [`fit`] and [`Model::predict`], unit-tested), the samples it learns from
//! ([`Sample`], read from stored drill results and restore timing records by [`load_samples`]),
//! the restore timing record a restore run by hand stores ([`store_restore_timing`]), the
//! estimate of what a restore of a chain writes ([`chain_bytes`]) and the
//! `pitr_predicted_rto_seconds` gauge ([`record_gauge`]).
//!
//! It does not choose the backup nor find the newest archived LSN: the caller (the sidecar,
//! `pitr status`, `pitr list`) holds the restore catalog and passes the chain and the WAL span.
//!
//! The model: per phase, `seconds = overhead + bytes × seconds_per_byte`, fitted by a median
//! line (Theil–Sen, robust to a slow run) over the newest [`SAMPLES`] samples. The download phase is learnt against the bytes
//! the restore wrote into the data directory (`bytes_restored`: the restored files' logical
//! length, not the stored, compressed bytes), the replay phase against the WAL replayed (from the
//! backup's start LSN to where replay ended). The prediction feeds it the same quantities for a
//! restore to the newest archived WAL: [`chain_bytes`] of the newest chain and the WAL from its
//! start LSN to the archive's end.

use pitr_archive::backup::BackupManifest;
use pitr_archive::names;
use pitr_archive::{ObjectKind, ObjectMeta, Repository, RepositoryError};

use crate::results::Subject;

/// How many of the newest samples the model learns from: recent enough to follow a changed
/// storage or machine, enough to average out one slow run.
pub const SAMPLES: usize = 10;

/// A phase time beyond this (30 days) is no measurement: a planted or broken record, dropped.
const MAX_SECONDS: f64 = 30.0 * 86400.0;

/// Byte counts beyond this (1 EiB) are no measurement either.
const MAX_BYTES: f64 = (1u64 << 60) as f64;

/// What one finished restore (a drill's, or one run by hand) measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// When it started (`YYYY-MM-DD HH:MM:SS.ffffff+00`): samples sort by it.
    pub start_time: String,
    /// Bytes written into the data directory.
    pub bytes_restored: f64,
    /// Planning and writing the data directory.
    pub download_seconds: f64,
    /// WAL replayed, from the backup's start LSN.
    pub wal_replayed_bytes: f64,
    /// Starting the server and replaying to the target.
    pub replay_seconds: f64,
}

impl Sample {
    /// The sample a PostgreSQL restore report (`RestoreReport` as JSON) gives, when it is one the
    /// model can learn from: the server was run to a target (`started`), it was no standby and no
    /// `--delta` restore (those write or replay something else than a restore from scratch), and
    /// every number is finite, not negative and not absurd. `None` otherwise.
    pub fn from_restore_report(start_time: &str, restore: &serde_json::Value) -> Option<Sample> {
        let flag = |k: &str| restore.get(k).and_then(serde_json::Value::as_bool);
        if flag("started") != Some(true) || flag("standby") == Some(true) {
            return None;
        }
        if restore.get("delta").is_some_and(|d| !d.is_null()) {
            return None;
        }
        let num = |k: &str| restore.get(k).and_then(serde_json::Value::as_f64);
        let sample = Sample {
            start_time: start_time.to_string(),
            bytes_restored: num("bytes_restored")?,
            download_seconds: num("download_seconds")?,
            wal_replayed_bytes: num("wal_replayed_bytes")?,
            replay_seconds: num("replay_seconds")?,
        };
        sample.is_sane().then_some(sample)
    }

    fn is_sane(&self) -> bool {
        let seconds = |s: f64| s.is_finite() && (0.0..=MAX_SECONDS).contains(&s);
        let bytes = |b: f64| b.is_finite() && (0.0..=MAX_BYTES).contains(&b);
        seconds(self.download_seconds)
            && seconds(self.replay_seconds)
            && bytes(self.bytes_restored)
            && bytes(self.wal_replayed_bytes)
    }
}

/// One phase's fit: `seconds = overhead_seconds + bytes × seconds_per_byte`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PhaseFit {
    /// Time the phase takes whatever its size (server start, planning).
    pub overhead_seconds: f64,
    /// Time per byte (the inverse of its throughput).
    pub seconds_per_byte: f64,
    /// `theil_sen` (sizes apart by 5 % or more: a median line), `rate` (one size: the time taken
    /// as proportional to the bytes, no overhead), `constant` (no bytes at all: the time taken as
    /// overhead).
    pub method: &'static str,
}

impl PhaseFit {
    /// The phase's predicted seconds for `bytes`; never negative.
    pub fn seconds(&self, bytes: f64) -> f64 {
        (self.overhead_seconds + bytes * self.seconds_per_byte).max(0.0)
    }

    /// Bytes per second, when the fit has a rate.
    pub fn bytes_per_second(&self) -> Option<f64> {
        (self.seconds_per_byte > 0.0).then(|| 1.0 / self.seconds_per_byte).filter(|r| r.is_finite())
    }
}

/// The median of `v` (not empty, finite); the mean of the middle two for an even count.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A robust line `y = a + b·x` through `points` (Theil–Sen): the slope is the median of the
/// slopes between pairs of points of clearly different sizes, the overhead the median of
/// `y − b·x`. Least squares would let one slow drill (a cold cache, a busy host) among ten pull
/// the line, and its slope extrapolates that to every bigger chain; a median ignores it until
/// it is most of the samples. Kept physical: no negative overhead nor rate.
/// One size (a spread under 5 %) cannot separate overhead from rate: the time is then taken as
/// proportional to the bytes (`rate`: the median of the samples' seconds per byte), or as
/// overhead alone when the bytes are zero (`constant`).
fn fit_phase(points: &[(f64, f64)]) -> Option<PhaseFit> {
    if points.is_empty() {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    // Sizes closer than 5 % of the mean (the same backup restored, a few more bytes of WAL) are
    // one size: a slope between them, from noisy times, would be anything.
    let apart = 0.05 * mean_x.abs().max(1.0);
    let mut slopes = Vec::new();
    for (i, p) in points.iter().enumerate() {
        for q in &points[i + 1..] {
            if (q.0 - p.0).abs() > apart {
                slopes.push((q.1 - p.1) / (q.0 - p.0));
            }
        }
    }
    let rate = || {
        let rates: Vec<f64> = points.iter().filter(|p| p.0 > 0.0).map(|p| p.1 / p.0).collect();
        (!rates.is_empty()).then(|| median(rates))
    };
    let fit = if slopes.is_empty() {
        match rate() {
            Some(r) if mean_x > 0.0 => PhaseFit { overhead_seconds: 0.0, seconds_per_byte: r, method: "rate" },
            _ => PhaseFit {
                overhead_seconds: median(points.iter().map(|p| p.1).collect()),
                seconds_per_byte: 0.0,
                method: "constant",
            },
        }
    } else {
        let b = median(slopes);
        let a = median(points.iter().map(|p| p.1 - b * p.0).collect());
        if b < 0.0 {
            // Larger took less: noise around a constant.
            let c = median(points.iter().map(|p| p.1).collect());
            PhaseFit { overhead_seconds: c, seconds_per_byte: 0.0, method: "theil_sen" }
        } else if a < 0.0 {
            // No negative overhead: through the origin, at the median rate.
            PhaseFit { overhead_seconds: 0.0, seconds_per_byte: rate()?, method: "theil_sen" }
        } else {
            PhaseFit { overhead_seconds: a, seconds_per_byte: b, method: "theil_sen" }
        }
    };
    let finite = fit.overhead_seconds.is_finite() && fit.seconds_per_byte.is_finite();
    finite.then_some(fit)
}

/// The fitted model: one [`PhaseFit`] per phase.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Model {
    /// Writing the data directory, against `bytes_restored`.
    pub download: PhaseFit,
    /// Starting the server and replaying WAL, against the WAL replayed.
    pub replay: PhaseFit,
    /// Samples it was fitted on.
    pub samples: usize,
    /// The newest sample's start time.
    pub newest_sample: String,
}

/// Fits the model on the newest [`SAMPLES`] sane samples; `None` when there is none.
pub fn fit(samples: &[Sample]) -> Option<Model> {
    let mut sane: Vec<&Sample> = samples.iter().filter(|s| s.is_sane()).collect();
    sane.sort_by(|a, b| b.start_time.cmp(&a.start_time));
    sane.truncate(SAMPLES);
    let newest = sane.first()?.start_time.clone();
    let download: Vec<(f64, f64)> = sane.iter().map(|s| (s.bytes_restored, s.download_seconds)).collect();
    let replay: Vec<(f64, f64)> = sane.iter().map(|s| (s.wal_replayed_bytes, s.replay_seconds)).collect();
    Some(Model {
        download: fit_phase(&download)?,
        replay: fit_phase(&replay)?,
        samples: sane.len(),
        newest_sample: newest,
    })
}

/// A prediction and what it was computed from (for `pitr status --json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// Predicted restore time: download plus replay.
    pub seconds: f64,
    /// Of it, writing the data directory.
    pub download_seconds: f64,
    /// Of it, starting the server and replaying the WAL.
    pub replay_seconds: f64,
    /// The backup restored (the newest of its chain).
    pub backup_id: String,
    /// Backups in the chain.
    pub chain_length: usize,
    /// [`chain_bytes`] of the chain.
    pub chain_bytes: u64,
    /// WAL from the chain's start LSN to the newest archived LSN.
    pub wal_bytes: u64,
    /// The model used.
    pub model: Model,
}

impl Model {
    /// The predicted seconds for a restore writing `chain_bytes` and replaying `wal_bytes`;
    /// `None` when the numbers do not make a finite, non-negative time.
    pub fn predict(&self, chain_bytes: u64, wal_bytes: u64) -> Option<(f64, f64, f64)> {
        let download = self.download.seconds(chain_bytes as f64);
        let replay = self.replay.seconds(wal_bytes as f64);
        let total = download + replay;
        (total.is_finite() && total >= 0.0).then_some((total, download, replay))
    }

    /// [`Model::predict`] for `chain` (oldest first) restored to `end_lsn`.
    pub fn predict_chain(&self, chain: &[&BackupManifest], end_lsn: u64) -> Option<Prediction> {
        let newest = chain.last()?;
        let bytes = chain_bytes(chain);
        let wal = end_lsn.saturating_sub(newest.start_lsn);
        let (seconds, download_seconds, replay_seconds) = self.predict(bytes, wal)?;
        Some(Prediction {
            seconds,
            download_seconds,
            replay_seconds,
            backup_id: newest.id.clone(),
            chain_length: chain.len(),
            chain_bytes: bytes,
            wal_bytes: wal,
            model: self.clone(),
        })
    }
}

/// What a restore of `chain` (oldest first) writes into the data directory, as its report's
/// `bytes_restored` counts it: the length of every file of the newest backup. An incremental
/// file (`INCREMENTAL.<name>`) restores the whole relation, whose length only its header tells:
/// the estimate takes the newest full copy of that file in an ancestor, else the incremental
/// file's own length (a relation created after the full backup).
pub fn chain_bytes(chain: &[&BackupManifest]) -> u64 {
    let Some(newest) = chain.last() else { return 0 };
    let mut total = 0u64;
    for f in &newest.files {
        let size = match incremental_target(&f.path) {
            None => f.size,
            Some(full_path) => chain
                .iter()
                .rev()
                .skip(1)
                .find_map(|b| b.files.iter().find(|g| g.path == full_path).map(|g| g.size))
                .unwrap_or(f.size),
        };
        total = total.saturating_add(size);
    }
    total
}

/// `base/5/INCREMENTAL.16384` → `base/5/16384`; `None` for a plain file.
fn incremental_target(path: &str) -> Option<String> {
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    let name = file.strip_prefix("INCREMENTAL.")?;
    Some(if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") })
}

/// A restore run by hand, as it stores its timings (`pg/<id>/restores/<start µs>.json`) so that
/// the model learns from it too.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RestoreTiming {
    /// Format version: 1.
    pub version: u32,
    /// When the restore started (`YYYY-MM-DD HH:MM:SS.ffffff+00`).
    pub start_time: String,
    /// The restore's report, as `pitr restore --json` prints it.
    pub restore: serde_json::Value,
}

/// Stores the timings of a restore run by hand that started at `start_us`. Only restores the
/// model can learn from are worth a record: others return `Ok(false)` and store nothing.
pub async fn store_restore_timing(
    repo: &Repository,
    system_id: u64,
    start_us: i64,
    restore: serde_json::Value,
) -> Result<bool, RepositoryError> {
    let start_time = pitr_archive::time::format_postgres(start_us);
    if Sample::from_restore_report(&start_time, &restore).is_none() {
        return Ok(false);
    }
    let name = names::pg::restore_timing(system_id, start_us);
    let record = RestoreTiming { version: 1, start_time, restore };
    let json = serde_json::to_vec(&record)
        .map_err(|e| RepositoryError::Invalid { name: name.clone(), what: e.to_string() })?;
    repo.put_sealed(&name, json, ObjectMeta::plain(ObjectKind::Meta)).await?;
    Ok(true)
}

/// The newest [`SAMPLES`] samples of a PostgreSQL cluster: from its drill results and its restore
/// timing records, newest first. A record that does not open or parse (damaged, planted, wrong
/// key) is skipped with a warning naming it: it teaches the model nothing, and no one record can
/// stop the prediction. `Err` only when the repository cannot be listed.
pub async fn load_samples(repo: &Repository, subject: &Subject) -> Result<Vec<Sample>, RepositoryError> {
    let Subject::Postgres { system_id } = subject else { return Ok(Vec::new()) };
    let mut names_found: Vec<(String, String)> = Vec::new();
    for o in repo.list(&names::pg::drills_prefix(*system_id)).await? {
        if o.name.ends_with(".json") {
            names_found.push((o.name.clone(), o.name));
        }
    }
    for o in repo.list(&names::pg::restore_timings_prefix(*system_id)).await? {
        if let Some(us) = names::pg::parse_restore_timing(*system_id, &o.name) {
            // Sorted with the drills by the start time both print.
            names_found.push((pitr_archive::time::format_postgres(us), o.name));
        }
    }
    // Drill result names carry the start time with ' ', ':', '+', '.' replaced by '_'; the
    // restore timings sort by the formatted time. Both read as the same digits in order.
    let key = |k: &str| k.rsplit('/').next().unwrap_or(k).chars().filter(char::is_ascii_digit).collect::<String>();
    names_found.sort_by_key(|(k, _)| std::cmp::Reverse(key(k)));
    let mut samples = Vec::new();
    // Read a few more than needed: a drill that failed before it restored gives no sample.
    for (_, name) in names_found.into_iter().take(SAMPLES * 3) {
        if samples.len() >= SAMPLES {
            break;
        }
        // A record: a planted huge object is refused unread, not loaded every minute.
        let json = match repo.get_record(&name).await {
            Ok((_, json)) => json,
            Err(e @ (RepositoryError::Seal(_) | RepositoryError::Invalid { .. })) => {
                tracing::warn!(object = %name, error = %e, "left out of the predicted RTO: does not open");
                continue;
            }
            // Removed between the listing and the read.
            Err(RepositoryError::Store(e)) if e.is_not_found() => continue,
            Err(RepositoryError::Store(e @ pitr_archive::StoreError::TooLarge { .. })) => {
                tracing::warn!(object = %name, error = %e, "left out of the predicted RTO: too large for a record");
                continue;
            }
            Err(e) => return Err(e),
        };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&json) else {
            tracing::warn!(object = %name, "left out of the predicted RTO: not JSON");
            continue;
        };
        let start = value.get("start_time").and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
        if let Some(s) = value.get("restore").and_then(|r| Sample::from_restore_report(&start, r)) {
            samples.push(s);
        }
    }
    Ok(samples)
}

/// Sets `pitr_predicted_rto_seconds` (PostgreSQL: no label, as the drill gauges) and, with it,
/// `pitr_predicted_rto_timestamp_seconds` (when it was computed); without a prediction (no drill
/// yet) neither is set: an absent series, never NaN.
///
/// The metrics facade cannot remove a series: once set, the gauge keeps its last value when a
/// later computation fails (storage down) or finds no prediction; the timestamp then stops
/// moving, which is how a stale prediction shows (`time() - pitr_predicted_rto_timestamp_seconds`).
pub fn record_gauge(prediction: Option<&Prediction>) {
    if let Some(s) = prediction.map(|p| p.seconds).filter(|s| s.is_finite()) {
        metrics::gauge!("pitr_predicted_rto_seconds").set(s);
        metrics::gauge!("pitr_predicted_rto_timestamp_seconds").set(pitr_archive::now_us() as f64 / 1e6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: &str, bytes: f64, dl: f64, wal: f64, replay: f64) -> Sample {
        Sample {
            start_time: t.into(),
            bytes_restored: bytes,
            download_seconds: dl,
            wal_replayed_bytes: wal,
            replay_seconds: replay,
        }
    }

    #[test]
    fn no_sample_no_model() {
        assert!(fit(&[]).is_none());
        // Only insane samples: none either.
        assert!(fit(&[sample("a", 1e6, f64::NAN, 1.0, 1.0), sample("b", 1e6, -1.0, 1.0, 1.0)]).is_none());
        assert!(fit(&[sample("a", 1e6, 1e300, 1.0, 1.0), sample("b", f64::INFINITY, 1.0, 1.0, 1.0)]).is_none());
    }

    #[test]
    fn one_sample_is_a_rate_without_overhead() {
        let m = fit(&[sample("a", 1e9, 10.0, 1e8, 5.0)]).unwrap();
        assert_eq!(m.download.method, "rate");
        assert_eq!(m.samples, 1);
        let (total, dl, replay) = m.predict(2_000_000_000, 200_000_000).unwrap();
        assert!((dl - 20.0).abs() < 1e-9 && (replay - 10.0).abs() < 1e-9 && (total - 30.0).abs() < 1e-9);
        // The same size predicts what was measured.
        assert!((m.predict(1_000_000_000, 100_000_000).unwrap().0 - 15.0).abs() < 1e-9);
    }

    #[test]
    fn zero_bytes_are_overhead() {
        let m = fit(&[sample("a", 0.0, 2.0, 0.0, 3.0)]).unwrap();
        assert_eq!(m.replay.method, "constant");
        assert_eq!(m.predict(10, 10).unwrap().0, 5.0);
    }

    #[test]
    fn two_equal_sizes_average() {
        let m = fit(&[sample("a", 1e9, 10.0, 1e8, 4.0), sample("b", 1e9, 12.0, 1e8, 6.0)]).unwrap();
        assert_eq!(m.download.method, "rate");
        let (total, _, _) = m.predict(1_000_000_000, 100_000_000).unwrap();
        assert!((total - 16.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn nearly_equal_sizes_are_one_size() {
        // 100 bytes apart out of 20 MB, times noisy: no slope from that.
        let m = fit(&[sample("a", 2e7, 3.0, 2e7, 2.0), sample("b", 2e7 + 100.0, 3.0, 2e7 + 100.0, 2.5)]).unwrap();
        assert_eq!((m.download.method, m.replay.method), ("rate", "rate"));
        let (t, _, _) = m.predict(20_000_050, 20_000_050).unwrap();
        assert!((t - 5.25).abs() < 1e-3, "{t}");
    }

    #[test]
    fn a_line_recovers_overhead_and_rate() {
        // 2 s + 100 MB/s download, 1 s + 50 MB/s replay.
        let s: Vec<Sample> = (1..=5)
            .map(|i| {
                let b = i as f64 * 1e8;
                sample(&format!("2026-12-0{i}"), b, 2.0 + b / 1e8, b / 2.0, 1.0 + (b / 2.0) / 5e7)
            })
            .collect();
        let m = fit(&s).unwrap();
        assert_eq!(m.download.method, "theil_sen");
        assert!((m.download.overhead_seconds - 2.0).abs() < 1e-6, "{m:?}");
        assert!((m.download.bytes_per_second().unwrap() - 1e8).abs() < 1.0, "{m:?}");
        assert!((m.replay.overhead_seconds - 1.0).abs() < 1e-6, "{m:?}");
        let (total, _, _) = m.predict(1_000_000_000, 100_000_000).unwrap();
        assert!((total - (12.0 + 3.0)).abs() < 1e-6, "{total}");
        assert_eq!(m.newest_sample, "2026-12-05");
    }

    #[test]
    fn one_slow_run_does_not_pull_the_line() {
        // 2 s + 100 MB/s, sizes 100..=900 MB; the largest run took three times as long (a busy
        // host). Least squares would predict about 40 s for 2 GB instead of 22 s.
        let mut s: Vec<Sample> = (1..=9)
            .map(|i| {
                let b = i as f64 * 1e8;
                sample(&format!("2026-12-0{i}"), b, 2.0 + b / 1e8, 0.0, 0.0)
            })
            .collect();
        s[8].download_seconds *= 3.0;
        let m = fit(&s).unwrap();
        let (t, _, _) = m.predict(2_000_000_000, 0).unwrap();
        assert!((t - 22.0).abs() < 0.5, "{t}: {m:?}");
        // Of one size: the median rate, not the mean.
        let mut s: Vec<Sample> = (1..=5).map(|i| sample(&format!("2026-12-0{i}"), 1e9, 10.0, 1e8, 5.0)).collect();
        s[4].download_seconds = 30.0;
        s[4].replay_seconds = 15.0;
        let (t, _, _) = fit(&s).unwrap().predict(1_000_000_000, 100_000_000).unwrap();
        assert!((t - 15.0).abs() < 1e-9, "{t}");
    }

    #[test]
    fn fits_stay_physical() {
        // Larger took less: a constant, not a negative rate.
        let m = fit(&[sample("a", 1e6, 10.0, 1e6, 1.0), sample("b", 2e6, 8.0, 2e6, 1.0)]).unwrap();
        assert_eq!(m.download.seconds_per_byte, 0.0);
        assert_eq!(m.download.overhead_seconds, 9.0);
        // A line that would cross zero above zero bytes: through the origin instead.
        let m = fit(&[sample("a", 1e6, 1.0, 0.0, 0.0), sample("b", 2e6, 5.0, 0.0, 0.0)]).unwrap();
        assert_eq!(m.download.overhead_seconds, 0.0);
        assert!(m.download.seconds_per_byte > 0.0);
        for bytes in [0, 1, u64::MAX] {
            let (t, _, _) = m.predict(bytes, u64::MAX).unwrap();
            assert!(t.is_finite() && t >= 0.0);
        }
    }

    #[test]
    fn only_the_newest_samples_count_and_absurd_ones_none() {
        let mut s: Vec<Sample> = (0..15).map(|i| sample(&format!("2026-12-{i:02}"), 1e6, 100.0, 1e6, 100.0)).collect();
        for i in 15..25 {
            s.push(sample(&format!("2026-12-{i:02}"), 1e6, 1.0, 1e6, 1.0));
        }
        s.push(sample("2026-12-31", 1e6, 1e300, 1e6, 1.0));
        let m = fit(&s).unwrap();
        assert_eq!(m.samples, SAMPLES);
        assert_eq!(m.predict(1_000_000, 1_000_000).unwrap().0, 2.0);
    }

    #[test]
    fn only_restores_from_scratch_that_ran_to_a_target_are_samples() {
        let report = serde_json::json!({
            "started": true, "standby": false, "delta": null, "bytes_restored": 1000,
            "download_seconds": 1.5, "wal_replayed_bytes": 2000, "replay_seconds": 2.5, "total_seconds": 4.0,
        });
        let s = Sample::from_restore_report("t", &report).unwrap();
        assert_eq!((s.bytes_restored, s.replay_seconds), (1000.0, 2.5));
        for (k, v) in [
            ("started", serde_json::json!(false)),
            ("standby", serde_json::json!(true)),
            ("delta", serde_json::json!({"bytes_written": 1})),
            ("download_seconds", serde_json::json!(-1.0)),
            ("replay_seconds", serde_json::json!(1e300)),
            ("wal_replayed_bytes", serde_json::Value::Null),
        ] {
            let mut r = report.clone();
            r[k] = v;
            assert!(Sample::from_restore_report("t", &r).is_none(), "{k}");
        }
    }

    #[test]
    fn incremental_files_count_as_the_relation_they_restore() {
        assert_eq!(incremental_target("base/5/INCREMENTAL.16384").as_deref(), Some("base/5/16384"));
        assert_eq!(incremental_target("base/5/16384"), None);
        assert_eq!(incremental_target("INCREMENTAL.x").as_deref(), Some("x"));
    }

    #[tokio::test]
    async fn samples_come_from_drills_and_restores_and_skip_what_does_not_open() {
        use std::sync::Arc;

        use pitr_archive::{KeyRing, LocalStore};

        use crate::report::DrillReport;
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(dir.path())), KeyRing::from_key("k", [3; 32]));
        let subject = Subject::Postgres { system_id: 7 };
        assert!(load_samples(&repo, &subject).await.unwrap().is_empty());
        let restore = |dl: f64| {
            serde_json::json!({"started": true, "standby": false, "bytes_restored": 100, "download_seconds": dl,
                "wal_replayed_bytes": 10, "replay_seconds": 1.0})
        };
        let report = DrillReport {
            start_time: "2026-12-01 00:00:00.000000+00".into(),
            restore: Some(restore(1.0)),
            ..Default::default()
        };
        crate::results::store_result(&repo, &subject, &report).await.unwrap();
        // 2026-12-02 00:00:00 UTC.
        let us = 1_796_169_600_000_000;
        assert!(store_restore_timing(&repo, 7, us, restore(2.0)).await.unwrap());
        assert!(!store_restore_timing(&repo, 7, us + 1, serde_json::json!({"started": false})).await.unwrap());
        // A planted drill result that is not sealed with the key.
        let planted = names::pg::drill_result(7, "2026-12-03 00:00:00.000000+00");
        repo.store().put_if_absent(&planted, b"garbage".to_vec().into()).await.unwrap();
        // And one too large to be a record: refused unread.
        let huge = names::pg::drill_result(7, "2026-12-04 00:00:00.000000+00");
        let big = vec![0u8; pitr_archive::repository::RECORD_READ_MAX as usize + 1];
        repo.store().put_if_absent(&huge, big.into()).await.unwrap();
        let samples = load_samples(&repo, &subject).await.unwrap();
        assert_eq!(samples.len(), 2, "{samples:?}");
        assert_eq!(samples[0].download_seconds, 2.0, "newest first: {samples:?}");
        let m = fit(&samples).unwrap();
        assert_eq!(m.predict(100, 10).unwrap().0, 2.5);
    }
}
