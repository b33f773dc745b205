//! Sampling one receiver from inside the primary, on its own connection and thread.
//!
//! Every `interval` one statement reads, in this order, the receiver's row of
//! `pg_stat_replication` (flush_lsn, flush_lag) and then `clock_timestamp()` and
//! `pg_current_wal_lsn()`. From the series:
//!
//! - flush_lag as PostgreSQL reports it;
//! - data at risk: at sample i, `ts_i - ts_j` for the newest sample j <= i whose
//!   `pg_current_wal_lsn()` is <= the receiver's flush_lsn at i. Every transaction that had
//!   committed by `ts_j` is in the receiver's hands; later ones may not be. Unlike flush_lag (which
//!   PostgreSQL times for the newest LSN a reply covers only), this counts group commit and
//!   replies that do not move. It overstates by at most one sampling interval.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use pitr_tests::parse_lsn;

#[derive(Clone, Debug)]
pub struct Sample {
    /// Seconds since the caller's `t0` (local monotonic clock), when the answer arrived.
    pub t: f64,
    /// The primary's `clock_timestamp()`, seconds since the epoch.
    pub ts: f64,
    /// The primary's `pg_current_wal_lsn()`.
    pub lsn: u64,
    /// The receiver's flush_lsn (None: absent or NULL).
    pub flush: Option<u64>,
    /// The receiver's flush_lag in seconds (None: NULL or absent).
    pub flush_lag: Option<f64>,
    /// Whether the receiver had a row in pg_stat_replication.
    pub present: bool,
}

const QUERY: &str = "\
select extract(epoch from clock_timestamp())::float8, pg_current_wal_lsn()::text, \
       r.flush_lsn::text, extract(epoch from r.flush_lag)::float8, r.pid is not null \
from (select 1) one left join lateral \
     (select pid, flush_lsn, flush_lag from pg_stat_replication where application_name = $1 \
      order by flush_lsn desc nulls last limit 1) r on true";

pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Vec<Sample>>>>,
}

impl Sampler {
    /// Connects with `conninfo` and samples `app` every `interval` until [`Sampler::finish`].
    pub fn start(conninfo: String, app: &str, interval: Duration, t0: Instant) -> Result<Sampler> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let flag = stop.clone();
        let app = app.to_string();
        let handle = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || -> Result<Vec<Sample>> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                        .await
                        .context("sampler: connect to the primary")?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            eprintln!("sampler: connection ended: {e}");
                        }
                    });
                    let stmt = client.prepare(QUERY).await?;
                    let mut samples = Vec::new();
                    let mut next = tokio::time::Instant::now();
                    let mut ready = Some(ready_tx);
                    while !flag.load(Ordering::Relaxed) {
                        let row = client.query_one(&stmt, &[&app]).await.context("sampler query")?;
                        let t = t0.elapsed().as_secs_f64();
                        let lsn: String = row.get(1);
                        let flush: Option<String> = row.get(2);
                        samples.push(Sample {
                            t,
                            ts: row.get(0),
                            lsn: parse_lsn(&lsn)?,
                            flush: flush.map(|f| parse_lsn(&f)).transpose()?,
                            flush_lag: row.get(3),
                            present: row.get(4),
                        });
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                        next += interval;
                        let now = tokio::time::Instant::now();
                        if next < now {
                            // Behind schedule (a slow answer): do not burst to catch up.
                            next = now;
                        }
                        tokio::time::sleep_until(next).await;
                    }
                    Ok(samples)
                })
            })
            .context("spawn the sampler thread")?;
        let mut sampler = Sampler { stop, handle: Some(handle) };
        // Wait for the first sample, so that the caller's load starts with the sampler running.
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            return Err(sampler.join().err().unwrap_or_else(|| anyhow!("the sampler did not start within 30 s")));
        }
        Ok(sampler)
    }

    fn join(&mut self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow!("the sampler thread panicked"))?,
            None => Err(anyhow!("the sampler was already stopped")),
        }
    }

    /// Stops sampling; every sample taken.
    pub fn finish(mut self) -> Result<Vec<Sample>> {
        self.join()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        if self.handle.is_some() {
            let _ = self.join();
        }
    }
}

/// Data at risk per sample (see the module docs); None when the receiver had no flush position
/// or it was older than the first sample.
pub fn data_at_risk(samples: &[Sample]) -> Vec<Option<f64>> {
    let mut out = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        let Some(flush) = s.flush else {
            out.push(None);
            continue;
        };
        // pg_current_wal_lsn() never goes back, so the samples are sorted by lsn.
        let k = samples[..=i].partition_point(|x| x.lsn <= flush);
        out.push(if k == 0 { None } else { Some((s.ts - samples[k - 1].ts).max(0.0)) });
    }
    out
}

/// What one receiver's samples say over the window `[from, to]` (seconds since `t0`).
#[derive(Default, Clone)]
pub struct Series {
    /// Data at risk, seconds, every sample in the window.
    pub risk: Vec<f64>,
    /// Samples in the window without a data-at-risk value.
    pub risk_unknown: usize,
    /// flush_lag, seconds, every `lag_every`-th sample (NULL recorded as 0).
    pub lag: Vec<f64>,
    pub lag_nulls: usize,
    /// Samples (of the flush_lag ones) without the receiver in pg_stat_replication.
    pub missing: usize,
    /// pg_current_wal_lsn() - flush_lsn, bytes, at the flush_lag samples.
    pub bytes: Vec<f64>,
    /// (t, flush_lag, flush_lsn, primary lsn) of the flush_lag samples.
    pub raw: Vec<(f64, Option<f64>, Option<u64>, u64)>,
}

impl Series {
    pub fn of(samples: &[Sample], from: f64, to: f64, lag_every: usize) -> Series {
        let risk = data_at_risk(samples);
        let mut s = Series::default();
        let lag_every = lag_every.max(1);
        // Samples until the next flush_lag sample (0: this one is).
        let mut skip = 0usize;
        for (x, r) in samples.iter().zip(risk) {
            if x.t < from || x.t > to {
                continue;
            }
            match r {
                Some(r) => s.risk.push(r),
                None => s.risk_unknown += 1,
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            skip = lag_every - 1;
            if !x.present {
                s.missing += 1;
                continue;
            }
            if x.flush_lag.is_none() {
                s.lag_nulls += 1;
            }
            s.lag.push(x.flush_lag.unwrap_or(0.0));
            if let Some(f) = x.flush {
                s.bytes.push(x.lsn.saturating_sub(f) as f64);
            }
            s.raw.push((x.t, x.flush_lag, x.flush, x.lsn));
        }
        s
    }

    pub fn extend(&mut self, other: &Series) {
        self.risk.extend_from_slice(&other.risk);
        self.risk_unknown += other.risk_unknown;
        self.lag.extend_from_slice(&other.lag);
        self.lag_nulls += other.lag_nulls;
        self.missing += other.missing;
        self.bytes.extend_from_slice(&other.bytes);
        self.raw.extend_from_slice(&other.raw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ts: f64, lsn: u64, flush: u64) -> Sample {
        Sample { t: ts, ts, lsn, flush: Some(flush), flush_lag: None, present: true }
    }

    #[test]
    fn risk_is_time_since_newest_covered_moment() {
        let v = [s(0.0, 100, 100), s(0.02, 200, 100), s(0.04, 300, 250), s(0.06, 300, 300), s(0.08, 400, 50)];
        let r = data_at_risk(&v);
        assert_eq!(r[0], Some(0.0));
        assert!((r[1].unwrap_or(-1.0) - 0.02).abs() < 1e-9);
        assert!((r[2].unwrap_or(-1.0) - 0.02).abs() < 1e-9);
        assert_eq!(r[3], Some(0.0));
        assert_eq!(r[4], None);
    }
}
