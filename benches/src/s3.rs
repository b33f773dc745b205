//! Phase 5: pitr streaming to an S3 repository (s3s-fs on loopback) at its flush_interval, under
//! pgbench; data at risk sampled inside the primary (see [`crate::sampler`]).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use pitr_tests::S3sFs;

use crate::lag::{pgbench_cmd, sampled_load, LoadRun, WARMUP_SECS};
use crate::opts::Opts;
use crate::receivers::{create_slot, current_lsn, pgbench_cluster, spawn_pitr, wait_flushed, Kind, Repo};
use crate::report::{Goal, Row};
use crate::util::{Dist, MIB};
use crate::Bench;

pub struct S3Result {
    pub pgbench_cmd: String,
    pub s3s_fs: String,
    pub run: LoadRun,
}

impl Bench {
    pub fn s3_phase(&self) -> Result<S3Result> {
        let o = &self.opts;
        let s3 = S3sFs::start(&["pitr"])?;
        let (cluster, client) = pgbench_cluster(&self.rt, "s3", o.lag_scale)?;
        create_slot(&cluster, Kind::Pitr)?;
        let repo = Repo::S3 { endpoint: s3.endpoint(), flush_ms: o.s3_flush_ms };
        let mut run = spawn_pitr(&cluster, "bench-s3-pitr", &o.pitr_log, &repo)?;
        let target = current_lsn(&cluster)?;
        wait_flushed(&self.rt, &client, &mut run, target, Duration::from_secs(o.catchup_timeout_secs))?;
        std::thread::sleep(Duration::from_secs(1));
        let args = o.load_args(o.s3_secs, 0);
        eprintln!("s3: pitr stream to s3s-fs, {}", pgbench_cmd(&args));
        let (r, _) = sampled_load(self, &cluster, Some(&mut run), Kind::Pitr.app(), &args, "s3", 1)?;
        eprintln!(
            "s3: tps {:.0}, data at risk p99 {:.0} ms, flush_lag p99 {:.0} ms",
            r.tps,
            Dist::of(&r.series.risk).p99 * 1000.0,
            Dist::of(&r.series.lag).p99 * 1000.0
        );
        Ok(S3Result { pgbench_cmd: pgbench_cmd(&args), s3s_fs: format!("s3s-fs on {}", s3.endpoint()), run: r })
    }
}

pub fn report(r: &mut String, o: &Opts, s: &S3Result) -> Vec<Row> {
    let _ = writeln!(r, "\n-- 5. pitr stream to S3 (s3s-fs on loopback), data at risk --");
    let _ = writeln!(
        r,
        "repository: s3://pitr/bench on {} (path style, http); [stream] flush_interval = {} ms",
        s.s3s_fs, o.s3_flush_ms
    );
    let _ = writeln!(r, "load: {}; first {WARMUP_SECS:.0}s skipped", s.pgbench_cmd);
    let _ = writeln!(
        r,
        "data at risk = clock_timestamp() - the newest sampled moment whose pg_current_wal_lsn() <= pitr's flush_lsn, \
         sampled inside the primary every {} ms (overstates by up to one interval)",
        o.risk_ms
    );
    let risk = Dist::of(&s.run.series.risk);
    let lag = Dist::of(&s.run.series.lag);
    let ms = 1000.0;
    let _ = writeln!(
        r,
        "data at risk: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} samples, {} without a value)",
        risk.p50 * ms,
        risk.p90 * ms,
        risk.p99 * ms,
        risk.max * ms,
        risk.n,
        s.run.series.risk_unknown
    );
    let _ = writeln!(
        r,
        "flush_lag (for comparison): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; tps {:.1}, latency {:.3} ms, pitr cpu \
         {:.2} s, WAL {:.1} MiB, puts {}",
        lag.p50 * ms,
        lag.p99 * ms,
        lag.max * ms,
        s.run.tps,
        s.run.latency_ms,
        s.run.cpu_secs,
        s.run.wal_bytes as f64 / MIB,
        s.run.puts.map_or("-".into(), |(n, b)| format!("{n} objects / {:.1} MiB", b as f64 / MIB))
    );
    let goal = o.s3_flush_ms as f64 + 200.0;
    vec![
        Row::new(format!("S3 data at risk p99 (flush_interval {} ms)", o.s3_flush_ms), "ms")
            .pitr(risk.p99 * ms)
            .goal(Goal::PitrAtMost(goal)),
        Row::new("S3 data at risk max", "ms").pitr(risk.max * ms),
    ]
}
