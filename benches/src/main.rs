//! Every comparison of issue 15 in one invocation: pitr against the real peers on the same
//! throwaway PostgreSQL 15 primary, each ratio printed, then a summary table with the issue's
//! goals.
//!
//! 1. catchup: `pitr stream` vs `pg_receivewal --synchronous` catching up a slot (MiB/s, CPU/GiB).
//! 2. lag: each receiver alone under unthrottled pgbench: flush_lag, data at risk, tps beside it.
//! 3. sync: each receiver alone as the synchronous standby: pgbench tps.
//! 4. backup: full backup and files-only restore vs pgBackRest; restore to a chosen second with
//!    `--start` after WAL on top of the backup.
//! 5. s3: pitr streaming to s3s-fs on loopback: data at risk at its flush_interval.
//! 6. throttle: backup and restore under pitr's bandwidth limits and the server's MAX_RATE,
//!    elapsed against bytes ÷ rate (issue 20).
//! 7. rto: predicted RTO after a few drills against the measured RTO of the next (issue 21).
//! 8. put: the CPU of one WAL chunk put (seal + local store), in-process, against pg_receivewal's
//!    write + fdatasync of the same bytes.
//!
//! Run: `cargo run --release -p pitr-benches -- [--quick] [--only ...]` (`--help` lists the
//! options). Unless `PITR_BIN` is set, the release `pitr` binary is built first. See
//! benches/README.md.

mod backup;
mod catchup;
mod lag;
mod opts;
mod put;
mod receivers;
mod report;
mod rto;
mod s3;
mod sampler;
mod sync;
mod throttle;
mod util;

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pitr_tests::{client_bin, u64_to_lsn, PG15_BIN_DIR};

use crate::opts::{Opts, Phase};
use crate::report::Row;
use crate::sampler::{data_at_risk, Sample};
use crate::util::{loadavg, machine_info, nproc, version_of};

pub struct Bench {
    pub rt: tokio::runtime::Runtime,
    pub opts: Opts,
    pub tck: f64,
    csv: RefCell<String>,
}

impl Bench {
    /// Records samples for `--samples-csv`.
    pub fn add_csv(&self, phase: &str, round: usize, receiver: &str, samples: &[Sample]) {
        if self.opts.samples_csv.is_none() {
            return;
        }
        let mut csv = self.csv.borrow_mut();
        if csv.is_empty() {
            csv.push_str("phase,round,receiver,t_secs,primary_epoch,flush_lag_secs,flush_lsn,primary_lsn,risk_secs\n");
        }
        for (s, risk) in samples.iter().zip(data_at_risk(samples)) {
            let _ = writeln!(
                csv,
                "{phase},{round},{receiver},{:.3},{:.6},{},{},{},{}",
                s.t,
                s.ts,
                s.flush_lag.map_or(String::new(), |l| format!("{l:.6}")),
                s.flush.map_or(String::new(), u64_to_lsn),
                u64_to_lsn(s.lsn),
                risk.map_or(String::new(), |r| format!("{r:.6}"))
            );
        }
    }
}

fn run_phase(bench: &Bench, phase: Phase, text: &mut String) -> Result<Vec<Row>> {
    let o = &bench.opts;
    Ok(match phase {
        Phase::Catchup => {
            let mut rounds = Vec::new();
            for round in 1..=o.rounds {
                rounds.push(bench.catchup_round(round)?);
            }
            catchup::report(text, o, &rounds)
        }
        Phase::Lag => {
            let l = bench.lag_phase()?;
            lag::report(text, o, &l)
        }
        Phase::Sync => {
            let s = bench.sync_phase()?;
            sync::report(text, o, &s)
        }
        Phase::Backup => {
            let b = bench.backup_phase()?;
            backup::report(text, o, &b)
        }
        Phase::S3 => {
            let s = bench.s3_phase()?;
            s3::report(text, o, &s)
        }
        Phase::Throttle => {
            let t = bench.throttle_phase()?;
            throttle::report(text, o, &t)
        }
        Phase::Rto => {
            let cases = bench.rto_phase()?;
            rto::report(text, o, &cases)
        }
        Phase::Put => {
            let r = bench.put_phase()?;
            put::report(text, o, &r)
        }
    })
}

/// nproc, load, binaries and versions: printed at the start and at the end.
fn environment(pitr: &Path, when: &str) -> String {
    format!(
        "{when}: nproc={} loadavg={} | pitr binary {} ({}) | {} | {}",
        nproc(),
        loadavg(),
        pitr.display(),
        version_of(pitr),
        version_of(&Path::new(PG15_BIN_DIR).join("postgres")),
        version_of(&client_bin("pg_receivewal"))
    )
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let opts = Opts::parse()?;
    let pitr = util::ensure_release_pitr()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let bench = Bench { rt, opts: opts.clone(), tck: util::clk_tck(), csv: RefCell::new(String::new()) };
    let t_all = Instant::now();

    println!("===== pitr-benches: issue 15 comparisons ({}) =====", if opts.quick { "quick" } else { "full size" });
    println!("{}", environment(&pitr, "start"));
    println!("machine: {}", machine_info());
    println!("phases: {}; rounds {}", opts.phases.iter().map(|p| p.name()).collect::<Vec<_>>().join(","), opts.rounds);
    println!("server: PostgreSQL 15 ({PG15_BIN_DIR}), {}", receivers::CLUSTER_CONF);
    println!("pitr:          {}", receivers::pitr_command_line(&opts.pitr_log));
    println!(
        "               config: local repository (unless s3), WAL at wal_zstd_level (default) + AES-256-GCM, \
         slot/application_name {}, flush_interval {}, status_interval 1s, schedules off",
        receivers::PITR_APP,
        opts.local_flush_ms.map_or("default (auto)".to_string(), |ms| format!("{ms}ms (--local-flush-ms)"))
    );
    println!("pg_receivewal: {}", receivers::receivewal_command_line(&opts.receivewal_compress));

    let mut rows: Vec<Row> = Vec::new();
    let mut failed: Vec<&str> = Vec::new();
    for &phase in &opts.phases {
        eprintln!("\n=== phase {} (loadavg {}) ===", phase.name(), loadavg());
        let t = Instant::now();
        let mut text = String::new();
        match run_phase(&bench, phase, &mut text) {
            Ok(r) => {
                rows.extend(r);
                print!("{text}");
                println!(
                    "(phase {} took {:.0}s; loadavg after {})",
                    phase.name(),
                    t.elapsed().as_secs_f64(),
                    loadavg()
                );
            }
            Err(e) => {
                println!("\n-- phase {} FAILED after {:.0}s: {e:#}", phase.name(), t.elapsed().as_secs_f64());
                failed.push(phase.name());
                rows.push(Row::new(format!("{}: FAILED (see above)", phase.name()), ""));
            }
        }
    }

    if let Some(path) = &opts.samples_csv {
        std::fs::write(path, bench.csv.borrow().as_bytes()).with_context(|| format!("write {}", path.display()))?;
        eprintln!("samples written to {}", path.display());
    }

    println!(
        "\n===== summary (peer = pg_receivewal --synchronous or pgBackRest; ratio as named, else pitr/peer) ====="
    );
    print!("{}", report::table(&rows));
    println!("{}", environment(&pitr, "end"));
    println!("total runtime {:.0}s", t_all.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("phase(s) failed: {}", failed.join(", "));
    }
    Ok(())
}
