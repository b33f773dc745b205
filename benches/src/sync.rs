//! Phase 3: the commit-latency cost of RPO 0. Each receiver alone as THE synchronous standby
//! (`synchronous_standby_names = '<its application_name>'`), pgbench tps and latency.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pitr_tests::{wait_until, PgCluster};

use crate::lag::{pgbench_cmd, start_caught_up};
use crate::opts::Opts;
use crate::receivers::{drop_slot, fresh_tables, pgbench_cluster, Kind};
use crate::report::{Goal, Row};
use crate::util::{cpu_ticks, median, pgbench_value};
use crate::Bench;

pub struct SyncRun {
    pub kind: Option<Kind>,
    pub round: usize,
    pub tps: f64,
    pub latency_ms: f64,
    pub cpu_secs: f64,
}

pub struct SyncResult {
    pub pgbench_cmd: String,
    pub runs: Vec<SyncRun>,
}

fn set_sync(cluster: &PgCluster, name: &str) -> Result<()> {
    cluster.psql(&format!("alter system set synchronous_standby_names = '{name}'"))?;
    cluster.psql("select pg_reload_conf()")?;
    if !name.is_empty() {
        wait_until("the synchronous standby", Duration::from_secs(30), || {
            Ok(cluster
                .psql(&format!("select sync_state from pg_stat_replication where application_name = '{name}'"))?
                == "sync")
        })?;
    }
    Ok(())
}

impl Bench {
    pub fn sync_phase(&self) -> Result<SyncResult> {
        let o = &self.opts;
        let (cluster, client) = pgbench_cluster(&self.rt, "sync", o.lag_scale)?;
        let args = o.load_args(o.sync_secs, 0);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut runs = Vec::new();
        if o.baseline {
            eprintln!("sync: baseline, no standby: {}", pgbench_cmd(&args));
            cluster.psql("checkpoint")?;
            let out = cluster.pgbench(&argv)?;
            runs.push(SyncRun {
                kind: None,
                round: 0,
                tps: pgbench_value(&out, "tps").unwrap_or(f64::NAN),
                latency_ms: pgbench_value(&out, "latency average").unwrap_or(f64::NAN),
                cpu_secs: 0.0,
            });
        }
        for round in 1..=o.rounds {
            for kind in Kind::order(round) {
                fresh_tables(&cluster, o.lag_scale)?;
                let mut run = start_caught_up(self, &cluster, &client, kind, &format!("bench-sync{round}"))?;
                set_sync(&cluster, kind.app())
                    .with_context(|| format!("{} as the synchronous standby", kind.label()))?;
                eprintln!("sync round {round}: {} synchronous, {}", kind.label(), pgbench_cmd(&args));
                let cpu0 = cpu_ticks(run.child.id());
                // pgbench in a thread: should the standby die, commits would wait for it forever,
                // so it is watched and the primary made asynchronous again.
                let out = std::thread::scope(|s| {
                    let load = s.spawn(|| cluster.pgbench(&argv));
                    let mut released = false;
                    while !load.is_finished() {
                        if !released && !run.child.is_running() {
                            let _ = set_sync(&cluster, "");
                            released = true;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    load.join().unwrap_or_else(|_| Err(anyhow!("the pgbench thread panicked")))
                });
                let cpu1 = cpu_ticks(run.child.id());
                // Back to asynchronous before the standby goes, or commits would wait for it.
                set_sync(&cluster, "")?;
                run.ensure_alive()?;
                let out = out?;
                run.stop();
                drop(run);
                drop_slot(&cluster, kind)?;
                let r = SyncRun {
                    kind: Some(kind),
                    round,
                    tps: pgbench_value(&out, "tps").unwrap_or(f64::NAN),
                    latency_ms: pgbench_value(&out, "latency average").unwrap_or(f64::NAN),
                    cpu_secs: match (cpu0, cpu1) {
                        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / self.tck,
                        _ => f64::NAN,
                    },
                };
                eprintln!("sync round {round}: {:<13} tps {:.0}, latency {:.3} ms", kind.label(), r.tps, r.latency_ms);
                runs.push(r);
            }
        }
        Ok(SyncResult { pgbench_cmd: pgbench_cmd(&args), runs })
    }
}

pub fn report(r: &mut String, o: &Opts, s: &SyncResult) -> Vec<Row> {
    let _ = writeln!(r, "\n-- 3. each receiver alone as the synchronous standby --");
    let _ = writeln!(
        r,
        "setup: pgbench -i -s {} -q; per run: pgbench -i again (fresh tables) and a checkpoint; fresh slot; receiver caught up; \
         synchronous_standby_names = '<its application_name>' (sync_state = sync); {} round(s), order alternating",
        o.lag_scale, o.rounds
    );
    let _ = writeln!(r, "load: {}  (synchronous_commit = on)", s.pgbench_cmd);
    let _ = writeln!(r, "{:>5} {:<24} {:>9} {:>10} {:>8}", "round", "synchronous standby", "tps", "lat ms", "cpu s");
    for x in &s.runs {
        let _ = writeln!(
            r,
            "{:>5} {:<24} {:>9.1} {:>10.3} {:>8.2}",
            x.round,
            x.kind.map_or("(none: baseline)", Kind::label),
            x.tps,
            x.latency_ms,
            x.cpu_secs
        );
    }
    let med = |k: Kind, f: fn(&SyncRun) -> f64| {
        median(&s.runs.iter().filter(|x| x.kind == Some(k)).map(f).collect::<Vec<_>>())
    };
    let (tp, tr) = (med(Kind::Pitr, |x| x.tps), med(Kind::Receivewal, |x| x.tps));
    let (lp, lr) = (med(Kind::Pitr, |x| x.latency_ms), med(Kind::Receivewal, |x| x.latency_ms));
    let _ = writeln!(
        r,
        "median: pitr {tp:.1} tps ({lp:.3} ms), pg_receivewal {tr:.1} tps ({lr:.3} ms); ratio of tps pitr/rw = {:.3}",
        tp / tr
    );
    vec![
        Row::new("pgbench tps, receiver as synchronous standby", "tps")
            .peer(tr)
            .pitr(tp)
            .ratio(tp / tr)
            .goal(Goal::RatioAtLeast(0.8)),
        Row::new("  its average latency (ratio = pitr/rw)", "ms").peer(lr).pitr(lp).ratio(lp / lr),
    ]
}
