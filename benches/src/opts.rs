//! Command-line options (and their `WALBENCH_<NAME>` environment variables).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Catchup,
    Lag,
    Sync,
    Backup,
    S3,
    Throttle,
    Rto,
    Put,
}

impl Phase {
    pub const ALL: [Phase; 8] =
        [Phase::Catchup, Phase::Lag, Phase::Sync, Phase::Backup, Phase::S3, Phase::Throttle, Phase::Rto, Phase::Put];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Catchup => "catchup",
            Phase::Lag => "lag",
            Phase::Sync => "sync",
            Phase::Backup => "backup",
            Phase::S3 => "s3",
            Phase::Throttle => "throttle",
            Phase::Rto => "rto",
            Phase::Put => "put",
        }
    }

    fn parse(s: &str) -> Result<Phase> {
        Ok(match s.trim() {
            "catchup" | "catch-up" => Phase::Catchup,
            "lag" => Phase::Lag,
            "sync" => Phase::Sync,
            "backup" | "restore" => Phase::Backup,
            "s3" => Phase::S3,
            "throttle" => Phase::Throttle,
            "rto" => Phase::Rto,
            "put" => Phase::Put,
            other => bail!("unknown phase {other:?} (catchup, lag, sync, backup, s3, throttle, rto, put)"),
        })
    }
}

#[derive(Debug, Clone)]
pub struct Opts {
    pub quick: bool,
    pub phases: Vec<Phase>,
    pub rounds: usize,
    // catch-up
    pub scale: u32,
    pub bulk_rows: u64,
    pub md5_rows: u64,
    pub catchup_timeout_secs: u64,
    // lag / sync / s3 load
    pub lag_scale: u32,
    pub lag_secs: u32,
    pub lag_rate: u32,
    pub clients: u32,
    pub jobs: u32,
    pub sample_ms: u64,
    pub risk_ms: u64,
    pub sync_secs: u32,
    pub s3_secs: u32,
    pub s3_flush_ms: u64,
    /// pitr's `flush_interval` on the local repository (catch-up, lag, sync); `None`: its default.
    pub local_flush_ms: Option<u64>,
    pub baseline: bool,
    // backup + restore
    pub backup_scale: u32,
    pub restore_wal_mb: u64,
    // bandwidth limits
    pub throttle_scale: u32,
    pub throttle_rate: u64,
    pub throttle_max_rate: u64,
    // predicted RTO
    pub rto_scales: Vec<u32>,
    pub rto_drills: usize,
    // the put path alone
    pub put_secs: u32,
    pub put_segments: usize,
    // receivers
    pub pitr_log: String,
    pub receivewal_compress: String,
    pub samples_csv: Option<PathBuf>,
}

pub const USAGE: &str = "\
usage: pitr-benches [options]        (cargo run --release -p pitr-benches -- [options])

Runs every comparison of issue 15 against the real peers (pg_receivewal --synchronous,
pgBackRest) in one invocation and prints a summary table of ratios and goals.

Every option can also be given as an environment variable WALBENCH_<NAME>
(upper case, '-' -> '_'), e.g. WALBENCH_SCALE=10. Flags win over the environment.

  --quick                  small data, short runs (a few minutes on 2 cores); other flags still win
  --only P1,P2             phases to run: catchup, lag, sync, backup (= restore), s3, throttle, rto, put
                           (default all)
  --rounds N               rounds of catch-up, lag, sync and of the files-only restores (each
                           receiver/tool once per round, order alternating) (default 3; quick 2)

 catch-up (phase 1): WAL generated with no receiver running, then each receiver alone
  --scale S                `pgbench -i -s S` (default 50; quick 5)
  --bulk-rows N            plus N rows of 128 random hex chars (poorly compressible) (default 1000000; quick 300000)
  --md5-rows N             instead of the two above: N inserts of repeat(md5(g::text), 3), the issue's
                           generator (6000000 = ~918 MB) (default 0 = off)
  --catchup-timeout SECS   give up on a receiver after this long (default 300)

 lag (2), sync (3), s3 (5): pgbench -n -c C -j J -T T on a pgbench database
  --lag-scale S            `pgbench -i -s S` first (default 10)
  --lag-secs T             lag phase: pgbench -T per receiver and round (default 30; quick 10)
  --lag-rate R             lag phase: pgbench -R R (default 0 = unthrottled)
  --clients C              pgbench -c (default 4)  [alias --lag-clients]
  --jobs J                 pgbench -j (default 2)
  --sample-ms MS           flush_lag sampling interval (default 100)
  --risk-ms MS             data-at-risk sampling interval (default 20)
  --sync-secs T            sync phase: pgbench -T per receiver and round (default 30; quick 10)
  --s3-secs T              s3 phase: pgbench -T (default 30; quick 10)
  --s3-flush-ms MS         s3 phase: pitr [stream] flush_interval (default 1000, pitr's default for
                           object storage); the goal is p99 <= flush_interval + 200 ms
  --local-flush-ms MS      catchup, lag, sync, backup: pitr [stream] flush_interval on the local repository
                           (default: pitr's, auto: 2 ms unless the primary names pitr as a
                           synchronous standby, then 0 = put as soon as the previous put is done)
  --baseline               lag and sync phases: also one pgbench run with no receiver

 backup + restore (phase 4), vs pgBackRest
  --backup-scale S         `pgbench -i -s S` (default 70, ~1 GiB; quick 10)
  --restore-wal-mb M       WAL generated after the backups for the restore to a chosen second;
                           the target is in the middle (default 900; quick 100)

 bandwidth limits (phase 6, issue 20): a backup and a restore under pitr's limits and a backup
 under the server's MAX_RATE, each against bytes / rate
  --throttle-scale S       `pgbench -i -s S` (default 5; quick 2)
  --throttle-rate B        [repository] max_upload_rate and max_download_rate, bytes/s, at least 32768 (default 2000000)
  --throttle-max-rate B    [backup] max_rate, bytes/s (default 16777216; 32768 to 1073741824)

 predicted RTO (phase 7, issue 21): drills teach the model, the next drill is compared with it
  --rto-scales S1,S2       pgbench scales, one fresh cluster each (default 5,20,50; quick 5,20)
  --rto-drills N           drills before the prediction (default 3; quick 2)

 the put path alone (phase 8): CPU per WAL chunk put, in-process, against write+fdatasync
  --put-secs T             pgbench -T whose WAL is put (default 10: ~50 MiB of WAL here, for a whole segment at the least)
  --put-segments N         whole segments of it put, in 4 KiB chunks (default 3; quick 1)

 receivers
  --pitr-log FILTER        PITR_LOG for `pitr stream` (default info; e.g. debug)
  --receivewal-compress M  pg_receivewal --compress=M (default none: plain files)
  --samples-csv FILE       write every lag/s3 sample to FILE
  --keep                   keep scratch directories (sets PITR_KEEP_TEST_DIRS)
  -h, --help               this text

PITR_BIN: the pitr binary to benchmark; when unset, `cargo build --release -p pitr --bin pitr`
is run first and target/release/pitr is used (a debug binary would not be a fair comparison).";

const FLAGS_WITHOUT_VALUE: &[&str] = &["quick", "keep", "baseline"];

impl Opts {
    /// pitr's local repository, spaced as `--local-flush-ms` says.
    pub fn local_repo(&self) -> crate::receivers::Repo {
        match self.local_flush_ms {
            Some(flush_ms) => crate::receivers::Repo::LocalSpaced { flush_ms },
            None => crate::receivers::Repo::Local,
        }
    }

    fn defaults(quick: bool) -> Opts {
        Opts {
            quick,
            phases: Phase::ALL.to_vec(),
            rounds: if quick { 2 } else { 3 },
            scale: if quick { 5 } else { 50 },
            bulk_rows: if quick { 300_000 } else { 1_000_000 },
            md5_rows: 0,
            catchup_timeout_secs: 300,
            lag_scale: 10,
            lag_secs: if quick { 10 } else { 30 },
            lag_rate: 0,
            clients: 4,
            jobs: 2,
            sample_ms: 100,
            risk_ms: 20,
            sync_secs: if quick { 10 } else { 30 },
            s3_secs: if quick { 10 } else { 30 },
            s3_flush_ms: 1000,
            local_flush_ms: None,
            baseline: false,
            backup_scale: if quick { 10 } else { 70 },
            restore_wal_mb: if quick { 100 } else { 900 },
            throttle_scale: if quick { 2 } else { 5 },
            throttle_rate: 2_000_000,
            throttle_max_rate: 16 << 20,
            rto_scales: if quick { vec![5, 20] } else { vec![5, 20, 50] },
            rto_drills: if quick { 2 } else { 3 },
            put_secs: 10,
            put_segments: if quick { 1 } else { 3 },
            pitr_log: "info".into(),
            receivewal_compress: "none".into(),
            samples_csv: None,
        }
    }

    pub fn parse() -> Result<Opts> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (k, v) in std::env::vars() {
            if let Some(name) = k.strip_prefix("WALBENCH_") {
                pairs.push((name.to_ascii_lowercase().replace('_', "-"), v));
            }
        }
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let Some(flag) = arg.strip_prefix("--") else {
                bail!("unexpected argument {arg:?}\n\n{USAGE}");
            };
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None if FLAGS_WITHOUT_VALUE.contains(&flag) => (flag.to_string(), "1".to_string()),
                None => {
                    let v = args.next().ok_or_else(|| anyhow!("--{flag} needs a value\n\n{USAGE}"))?;
                    (flag.to_string(), v)
                }
            };
            pairs.push((name, value));
        }
        let truthy = |v: &str| !matches!(v, "" | "0" | "false" | "no");
        // --quick changes the defaults; every other option, given anywhere, wins over them.
        let quick = pairs.iter().rev().find(|(n, _)| n == "quick").is_some_and(|(_, v)| truthy(v));
        let mut o = Opts::defaults(quick);
        for (name, v) in pairs {
            let num =
                |v: &str| -> Result<u64> { v.parse::<u64>().with_context(|| format!("--{name}: not a number: {v:?}")) };
            let small = |v: &str| -> Result<u32> {
                u32::try_from(num(v)?).with_context(|| format!("--{name}: too large: {v:?}"))
            };
            match name.as_str() {
                "quick" => {}
                "only" => {
                    let mut phases = Vec::new();
                    for p in v.split(',').filter(|p| !p.trim().is_empty()) {
                        let p = Phase::parse(p)?;
                        if !phases.contains(&p) {
                            phases.push(p);
                        }
                    }
                    if phases.is_empty() {
                        bail!("--only: no phase given");
                    }
                    // Always in the canonical order.
                    o.phases = Phase::ALL.iter().copied().filter(|p| phases.contains(p)).collect();
                }
                "rounds" => o.rounds = num(&v)?.max(1) as usize,
                "scale" => o.scale = small(&v)?.max(1),
                "bulk-rows" => o.bulk_rows = num(&v)?,
                "md5-rows" => o.md5_rows = num(&v)?,
                "catchup-timeout" => o.catchup_timeout_secs = num(&v)?.max(1),
                "lag-scale" => o.lag_scale = small(&v)?.max(1),
                "lag-secs" => o.lag_secs = small(&v)?.max(2),
                "lag-rate" => o.lag_rate = small(&v)?,
                "clients" | "lag-clients" => o.clients = small(&v)?.max(1),
                "jobs" => o.jobs = small(&v)?.max(1),
                "sample-ms" => o.sample_ms = num(&v)?.max(10),
                "risk-ms" => o.risk_ms = num(&v)?.max(5),
                "sync-secs" => o.sync_secs = small(&v)?.max(2),
                "s3-secs" => o.s3_secs = small(&v)?.max(2),
                "s3-flush-ms" => o.s3_flush_ms = num(&v)?,
                "local-flush-ms" => o.local_flush_ms = Some(num(&v)?),
                "baseline" => o.baseline = truthy(&v),
                "backup-scale" => o.backup_scale = small(&v)?.max(1),
                "restore-wal-mb" => o.restore_wal_mb = num(&v)?.max(2),
                "throttle-scale" => o.throttle_scale = small(&v)?.max(1),
                "throttle-rate" => o.throttle_rate = num(&v)?.max(32 << 10),
                "throttle-max-rate" => o.throttle_max_rate = num(&v)?.clamp(32 << 10, 1 << 30),
                "rto-scales" => {
                    o.rto_scales = v
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(|s| small(s.trim()))
                        .collect::<Result<_>>()?;
                    if o.rto_scales.is_empty() {
                        bail!("--rto-scales: no scale given");
                    }
                }
                "rto-drills" => o.rto_drills = num(&v)?.max(1) as usize,
                "put-secs" => o.put_secs = num(&v)?.max(1) as u32,
                "put-segments" => o.put_segments = num(&v)?.max(1) as usize,
                "pitr-log" => o.pitr_log = v,
                "receivewal-compress" => o.receivewal_compress = v,
                "samples-csv" => o.samples_csv = Some(PathBuf::from(v)),
                "keep" => {
                    if truthy(&v) {
                        // Before any thread exists (Opts::parse runs first in main).
                        std::env::set_var("PITR_KEEP_TEST_DIRS", "1");
                    }
                }
                _ => bail!("unknown option --{name}\n\n{USAGE}"),
            }
        }
        // pgbench refuses -j greater than -c.
        o.jobs = o.jobs.min(o.clients);
        Ok(o)
    }

    pub fn runs(&self, p: Phase) -> bool {
        self.phases.contains(&p)
    }

    /// The pgbench load of the lag, sync and s3 phases: `-n -c C -j J -T secs [-R rate]`.
    pub fn load_args(&self, secs: u32, rate: u32) -> Vec<String> {
        let mut a: Vec<String> = ["-n", "-c", &self.clients.to_string(), "-j", &self.jobs.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["-T".to_string(), secs.to_string()]);
        if rate > 0 {
            a.extend(["-R".to_string(), rate.to_string()]);
        }
        a
    }
}
