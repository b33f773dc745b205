//! Phase 2: flush_lag, data at risk and pgbench tps under an unthrottled pgbench load, each
//! receiver ALONE on the primary (order alternating per round), sampled from inside the primary.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use pitr_tests::PgCluster;

use crate::opts::Opts;
use crate::receivers::{
    create_slot, current_lsn, drop_slot, fresh_tables, pgbench_cluster, spawn, wait_flushed, wal_segment_size, Kind,
};
use crate::report::{Goal, Row};
use crate::sampler::{Sample, Sampler, Series};
use crate::util::{cpu_ticks, log_tail, median, pgbench_value, Dist, MIB};
use crate::Bench;

/// The first second of a load is not sampled: pgbench is still connecting.
pub const WARMUP_SECS: f64 = 1.0;

pub struct LoadRun {
    pub kind: Option<Kind>,
    pub round: usize,
    pub tps: f64,
    pub latency_ms: f64,
    pub cpu_secs: f64,
    /// CPU of the walsender serving the receiver during the load: what the receiver costs the
    /// primary besides its own CPU (None without a receiver, or if it was not found).
    pub walsender_cpu_secs: Option<f64>,
    pub wall_secs: f64,
    pub wal_bytes: u64,
    /// pitr's objects and plaintext bytes put during the load.
    pub puts: Option<(u64, u64)>,
    pub series: Series,
}

pub struct LagResult {
    pub pgbench_cmd: String,
    pub seg: u64,
    pub runs: Vec<LoadRun>,
    pub baseline: Option<LoadRun>,
}

/// Starts `kind` on a fresh slot of `cluster`, waits until it has flushed the current LSN.
pub fn start_caught_up(
    bench: &Bench,
    cluster: &PgCluster,
    client: &tokio_postgres::Client,
    kind: Kind,
    name: &str,
) -> Result<crate::receivers::Running> {
    drop_slot(cluster, kind)?;
    create_slot(cluster, kind)?;
    let mut run = spawn(cluster, kind, name, &bench.opts)?;
    let target = current_lsn(cluster)?;
    wait_flushed(&bench.rt, client, &mut run, target, Duration::from_secs(bench.opts.catchup_timeout_secs))?;
    Ok(run)
}

/// One pgbench load with `kind`'s receiver running (or none), sampled throughout.
pub fn sampled_load(
    bench: &Bench,
    cluster: &PgCluster,
    run: Option<&mut crate::receivers::Running>,
    app: &str,
    args: &[String],
    phase: &str,
    round: usize,
) -> Result<(LoadRun, Vec<Sample>)> {
    let o = &bench.opts;
    let t0 = Instant::now();
    let sampler = Sampler::start(cluster.conninfo("postgres"), app, Duration::from_millis(o.risk_ms), t0)?;
    // Some idle samples first: the data-at-risk lookup needs history from before the load.
    std::thread::sleep(Duration::from_millis(300));
    let pid = run.as_ref().map(|r| r.child.id());
    let walsender = if run.is_some() { walsender_pid(cluster, app) } else { None };
    let ws0 = walsender.and_then(cpu_ticks);
    let cpu0 = pid.and_then(cpu_ticks);
    let puts0 = run.as_ref().and_then(|r| r.pitr_puts());
    let lsn0 = current_lsn(cluster)?;
    let from = t0.elapsed().as_secs_f64();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cluster.pgbench(&args);
    let to = t0.elapsed().as_secs_f64();
    let cpu1 = pid.and_then(cpu_ticks);
    let ws1 = walsender.and_then(cpu_ticks);
    let samples = sampler.finish()?;
    let out = out?;
    let lsn1 = current_lsn(cluster)?;
    let mut puts = None;
    let kind = run.as_ref().map(|r| r.kind);
    if let Some(r) = run {
        r.ensure_alive()?;
        r.stop();
        puts = match (puts0, r.pitr_puts()) {
            (Some(a), Some(b)) => Some((b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))),
            _ => None,
        };
        if r.kind == Kind::Pitr && o.pitr_log != "info" {
            eprintln!(
                "--- pitr stream log, {phase} (last 25 lines; {}) ---\n{}",
                r.log.display(),
                log_tail(&r.log, 25)
            );
        }
    }
    let lag_every = (o.sample_ms / o.risk_ms).max(1) as usize;
    let series = Series::of(&samples, from + WARMUP_SECS, to, lag_every);
    let cpu_secs = match (cpu0, cpu1) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / bench.tck,
        _ => 0.0,
    };
    let walsender_cpu_secs = match (ws0, ws1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / bench.tck),
        _ => None,
    };
    bench.add_csv(phase, round, kind.map_or("none", |k| k.app()), &samples);
    Ok((
        LoadRun {
            kind,
            round,
            tps: pgbench_value(&out, "tps").unwrap_or(f64::NAN),
            latency_ms: pgbench_value(&out, "latency average").unwrap_or(f64::NAN),
            cpu_secs,
            walsender_cpu_secs,
            wall_secs: to - from,
            wal_bytes: lsn1.saturating_sub(lsn0),
            puts,
            series,
        },
        samples,
    ))
}

/// The pid of the walsender streaming to `app` (an application_name the bench chose), if any.
fn walsender_pid(cluster: &PgCluster, app: &str) -> Option<u32> {
    let sql = format!("select pid from pg_stat_replication where application_name = '{app}'");
    cluster.psql(&sql).ok()?.trim().parse().ok()
}

pub fn pgbench_cmd(args: &[String]) -> String {
    format!("pgbench -h 127.0.0.1 -p <port> -U postgres {} postgres", args.join(" "))
}

impl Bench {
    pub fn lag_phase(&self) -> Result<LagResult> {
        let o = &self.opts;
        let (cluster, client) = pgbench_cluster(&self.rt, "lag", o.lag_scale)?;
        let seg = wal_segment_size(&cluster)?;
        let args = o.load_args(o.lag_secs, o.lag_rate);
        let mut runs = Vec::new();
        let baseline = if o.baseline {
            eprintln!("lag: baseline, no receiver: {}", pgbench_cmd(&args));
            cluster.psql("checkpoint")?;
            Some(sampled_load(self, &cluster, None, "none", &args, "lag", 0)?.0)
        } else {
            None
        };
        for round in 1..=o.rounds {
            for kind in Kind::order(round) {
                fresh_tables(&cluster, o.lag_scale)?;
                let mut run = start_caught_up(self, &cluster, &client, kind, &format!("bench-lag{round}"))?;
                std::thread::sleep(Duration::from_secs(1));
                eprintln!("lag round {round}: {} alone, {}", kind.label(), pgbench_cmd(&args));
                let (r, _) = sampled_load(self, &cluster, Some(&mut run), kind.app(), &args, "lag", round)?;
                drop(run);
                drop_slot(&cluster, kind)?;
                eprintln!(
                    "lag round {round}: {:<13} tps {:.0}, flush_lag p99 {:.2} ms, data at risk p99 {:.1} ms",
                    kind.label(),
                    r.tps,
                    Dist::of(&r.series.lag).p99 * 1000.0,
                    Dist::of(&r.series.risk).p99 * 1000.0
                );
                runs.push(r);
            }
        }
        Ok(LagResult { pgbench_cmd: pgbench_cmd(&args), seg, runs, baseline })
    }
}

/// All runs of `kind` pooled.
fn pooled(runs: &[LoadRun], kind: Kind) -> (Series, Vec<&LoadRun>) {
    let mine: Vec<&LoadRun> = runs.iter().filter(|r| r.kind == Some(kind)).collect();
    let mut s = Series::default();
    for r in &mine {
        s.extend(&r.series);
    }
    (s, mine)
}

fn lag_row(r: &mut String, name: &str, s: &Series, runs: &[&LoadRun]) {
    let lag = Dist::of(&s.lag);
    let b = Dist::of(&s.bytes);
    let risk = Dist::of(&s.risk);
    let cpu: f64 = runs.iter().map(|x| x.cpu_secs).sum();
    let wall: f64 = runs.iter().map(|x| x.wall_secs).sum();
    let ms = |x: f64| x * 1000.0;
    let _ = writeln!(
        r,
        "{:<14} {:>7} {:>5} {:>4} | {:>7.2} {:>7.2} {:>7.2} {:>7.2} | {:>8.1} {:>8.1} {:>8.1} | {:>7.1} {:>7.1} {:>7.1} | {:>5.1}%",
        name,
        s.lag.len(),
        s.lag_nulls,
        s.missing,
        ms(lag.p50),
        ms(lag.p90),
        ms(lag.p99),
        ms(lag.max),
        b.p50 / 1024.0,
        b.p99 / 1024.0,
        b.max / 1024.0,
        ms(risk.p50),
        ms(risk.p99),
        ms(risk.max),
        100.0 * cpu / wall.max(1e-9)
    );
}

pub fn report(r: &mut String, o: &Opts, l: &LagResult) -> Vec<Row> {
    let _ = writeln!(r, "\n-- 2. flush_lag, data at risk and tps under load (each receiver ALONE, one primary) --");
    let _ = writeln!(
        r,
        "setup: pgbench -i -s {} -q; per run: pgbench -i again (fresh tables) and a checkpoint; fresh slot; receiver started and waited for until it \
         flushed the current LSN; {} round(s), order alternating",
        o.lag_scale, o.rounds
    );
    let _ = writeln!(r, "load: {}", l.pgbench_cmd);
    let _ = writeln!(
        r,
        "sampled inside the primary every {} ms: (clock_timestamp(), pg_current_wal_lsn(), the receiver's flush_lsn \
         and flush_lag); flush_lag statistics use every {}th sample ({} ms); the first {WARMUP_SECS:.0}s of each load \
         is skipped.",
        o.risk_ms,
        (o.sample_ms / o.risk_ms).max(1),
        (o.sample_ms / o.risk_ms).max(1) * o.risk_ms
    );
    let _ = writeln!(
        r,
        "flush_lag NULL (caught up, no lag measurement pending) counts as 0 (NULL column); 'miss' = receiver absent. \
         data at risk = now - newest sampled moment whose pg_current_wal_lsn() <= flush_lsn (overstates by up to \
         one sampling interval: under load it is at least ~{} ms).",
        o.risk_ms
    );
    let _ = writeln!(
        r,
        "{:<14} {:>7} {:>5} {:>4} | {:>7} {:>7} {:>7} {:>7} | {:>8} {:>8} {:>8} | {:>7} {:>7} {:>7} | {:>6}",
        "receiver",
        "samples",
        "NULL",
        "miss",
        "lag p50",
        "p90 ms",
        "p99 ms",
        "max ms",
        "p50 KiB",
        "p99 KiB",
        "max KiB",
        "risk50",
        "p99 ms",
        "max ms",
        "cpu"
    );
    let (sp, rp) = pooled(&l.runs, Kind::Pitr);
    let (sr, rr) = pooled(&l.runs, Kind::Receivewal);
    lag_row(r, "pitr stream", &sp, &rp);
    lag_row(r, "pg_receivewal", &sr, &rr);
    let _ = writeln!(
        r,
        "{:>5} {:<14} {:>9} {:>10} {:>8} {:>11} {:>9} {:>12}",
        "round", "receiver", "tps", "lat ms", "cpu s", "walsnd cpu", "WAL MiB", "pitr puts"
    );
    for x in l.baseline.iter().chain(l.runs.iter()) {
        let _ = writeln!(
            r,
            "{:>5} {:<14} {:>9.1} {:>10.3} {:>8.2} {:>11} {:>9.1} {:>12}",
            x.round,
            x.kind.map_or("(none)", Kind::label),
            x.tps,
            x.latency_ms,
            x.cpu_secs,
            x.walsender_cpu_secs.map_or("-".into(), |c| format!("{c:.2}")),
            x.wal_bytes as f64 / MIB,
            x.puts.map_or("-".into(), |(n, b)| format!("{n} / {:.0} MiB", b as f64 / MIB))
        );
    }
    // A sample is "at a boundary" when flush_lsn sits exactly on a segment boundary (or in an
    // earlier segment) while the primary has already written past it.
    let seg = l.seg.max(1);
    let at_boundary =
        |flush: &Option<u64>, cur: u64| flush.is_some_and(|f| f < cur && (f % seg == 0 || f / seg != cur / seg));
    for (name, s) in [("pitr stream", &sp), ("pg_receivewal", &sr)] {
        let stuck = s.raw.iter().filter(|x| at_boundary(&x.2, x.3)).count();
        let mut worst: Vec<_> = s.raw.iter().filter(|x| x.1.is_some()).collect();
        worst.sort_by(|a, b| b.1.unwrap_or(0.0).total_cmp(&a.1.unwrap_or(0.0)).then(a.0.total_cmp(&b.0)));
        // One entry per distinct value: flush_lag only changes when the receiver replies.
        worst.dedup_by(|a, b| a.1 == b.1);
        let list: Vec<String> = worst
            .iter()
            .take(3)
            .map(|(t, lag, flush, cur)| {
                format!(
                    "t={t:.1}s {:.1} ms{}",
                    lag.unwrap_or(0.0) * 1000.0,
                    if at_boundary(flush, *cur) { " [at boundary]" } else { "" }
                )
            })
            .collect();
        let _ = writeln!(
            r,
            "{name}: {stuck}/{} samples with flush_lsn stuck at a segment boundary the primary had passed; worst \
             flush_lag: {}",
            s.raw.len(),
            list.join(", ")
        );
    }

    let lp = Dist::of(&sp.lag);
    let lr = Dist::of(&sr.lag);
    let kp = Dist::of(&sp.risk);
    let kr = Dist::of(&sr.risk);
    let tps_p = median(&rp.iter().map(|x| x.tps).collect::<Vec<_>>());
    let tps_r = median(&rr.iter().map(|x| x.tps).collect::<Vec<_>>());
    // Each round runs both receivers back to back: its ratio shows how far one run's noise goes.
    let round_ratios: Vec<f64> =
        rp.iter().filter_map(|p| rr.iter().find(|x| x.round == p.round).map(|w| p.tps / w.tps)).collect();
    let per_round: Vec<String> = round_ratios.iter().map(|x| format!("{x:.3}")).collect();
    let _ = writeln!(
        r,
        "ratios pitr/pg_receivewal: flush_lag p50 {:.2}, p99 {:.2}, max {:.2}; data at risk p99 {:.2}; tps (median) \
         {:.3}, per round {}",
        lp.p50 / lr.p50,
        lp.p99 / lr.p99,
        lp.max / lr.max,
        kp.p99 / kr.p99,
        tps_p / tps_r,
        per_round.join(", ")
    );
    let ms = 1000.0;
    vec![
        Row::new("flush_lag p99, local repository", "ms")
            .peer(lr.p99 * ms)
            .pitr(lp.p99 * ms)
            .ratio(lp.p99 / lr.p99)
            .goal(Goal::RatioAtMost(2.5)),
        Row::new("flush_lag max, local repository", "ms")
            .peer(lr.max * ms)
            .pitr(lp.max * ms)
            .ratio(lp.max / lr.max)
            .goal(Goal::PitrAtMost(100.0)),
        Row::new("data at risk p99, local repository", "ms")
            .peer(kr.p99 * ms)
            .pitr(kp.p99 * ms)
            .ratio(kp.p99 / kr.p99)
            .goal(Goal::None),
        Row::new("data at risk max, local repository", "ms")
            .peer(kr.max * ms)
            .pitr(kp.max * ms)
            .ratio(kp.max / kr.max)
            .goal(Goal::None),
        Row::new("pgbench tps beside the receiver", "tps")
            .peer(tps_r)
            .pitr(tps_p)
            .ratio(tps_p / tps_r)
            .goal(Goal::RatioAtLeast(0.95))
            .note(round_range(&round_ratios)),
    ]
}

/// The spread of the per-round tps ratios beside the summary's ratio of medians: one run's own
/// noise, so that a goal met or missed by less than it reads as what it is.
fn round_range(ratios: &[f64]) -> String {
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match ratios.len() {
        0 => String::new(),
        1 => format!("its one round {min:.2}"),
        n => format!("its {n} rounds {min:.2}-{max:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::round_range;

    #[test]
    fn the_summary_note_gives_the_spread_of_the_rounds() {
        assert_eq!(round_range(&[]), "");
        assert_eq!(round_range(&[0.9561]), "its one round 0.96");
        assert_eq!(round_range(&[0.891, 0.978, 0.956]), "its 3 rounds 0.89-0.98");
    }
}
