//! `pitr stream` side by side with `pg_receivewal --synchronous` (PostgreSQL 15 client) on the same
//! PostgreSQL 15 primary.
//!
//! 1. Catch-up throughput: per round a fresh cluster, both physical slots created before a fixed
//!    amount of WAL is generated with no receiver running, then each receiver alone (one after the
//!    other, order alternating per round) is timed until `pg_stat_replication.flush_lsn` reaches
//!    the end LSN measured before it started.
//! 2. flush_lag under a steady, rate-limited pgbench load with both receivers running at once,
//!    sampled from `pg_stat_replication` at a fixed interval.
//!
//! Run: `cargo run --release -p pitr-benches -- [options]` (`--help` lists them). Unless `PITR_BIN`
//! is set, the release `pitr` binary is built first (`cargo build --release -p pitr --bin pitr`).
//! See benches/README.md.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{client_bin, parse_lsn, pitr_bin, scratch_dir, spawn_logged, u64_to_lsn, Child, PgCluster, PgOptions};

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
const MIB: f64 = 1024.0 * 1024.0;
const PITR_APP: &str = "pitr_main";
const PITR_SLOT: &str = "pitr_main";
const RW_APP: &str = "receivewal";
const RW_SLOT: &str = "receivewal";

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Opts {
    rounds: usize,
    scale: u32,
    bulk_rows: u64,
    lag_scale: u32,
    lag_secs: u32,
    lag_rate: u32,
    lag_clients: u32,
    sample_ms: u64,
    pitr_log: String,
    receivewal_compress: String,
    catchup_timeout_secs: u64,
    skip_catchup: bool,
    skip_lag: bool,
    samples_csv: Option<PathBuf>,
}

const USAGE: &str = "\
usage: cargo run --release -p pitr-benches -- [options]

Every option can also be given as an environment variable WALBENCH_<NAME>
(upper case, '-' -> '_'), e.g. WALBENCH_SCALE=10. Flags win over the environment.

  --rounds N               catch-up rounds, one fresh cluster each (default 3)
  --scale S                catch-up WAL: `pgbench -i -s S` (default 50)
  --bulk-rows N            plus N rows of random hex (poorly compressible; ~4 md5s = 128 B/row) (default 1000000)
  --lag-scale S            flush_lag phase: `pgbench -i -s S` before the receivers start (default 10)
  --lag-secs T             flush_lag phase: pgbench -T (default 30)
  --lag-rate R             flush_lag phase: pgbench -R, transactions/s (default 500)
  --lag-clients C          flush_lag phase: pgbench -c (default 4)
  --sample-ms MS           pg_stat_replication sampling interval (default 100)
  --pitr-log FILTER        PITR_LOG for `pitr stream` (default info; e.g. debug)
  --receivewal-compress M  pg_receivewal --compress=M (default none, as pitr's peer without it)
  --catchup-timeout SECS   give up on a receiver after this long (default 300)
  --skip-catchup           run only the flush_lag phase
  --skip-lag               run only the catch-up phase
  --samples-csv FILE       write every flush_lag sample (t, receiver, lag, flush_lsn, primary lsn) to FILE
  --keep                   keep scratch directories (sets PITR_KEEP_TEST_DIRS)
  -h, --help               this text

PITR_BIN: the pitr binary to benchmark; when unset, `cargo build --release -p pitr --bin pitr`
is run first and target/release/pitr is used (a debug binary would not be a fair comparison).";

impl Opts {
    fn parse() -> Result<Opts> {
        let mut o = Opts {
            rounds: 3,
            scale: 50,
            bulk_rows: 1_000_000,
            lag_scale: 10,
            lag_secs: 30,
            lag_rate: 500,
            lag_clients: 4,
            sample_ms: 100,
            pitr_log: "info".into(),
            receivewal_compress: "none".into(),
            catchup_timeout_secs: 300,
            skip_catchup: false,
            skip_lag: false,
            samples_csv: None,
        };
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
                None if matches!(flag, "skip-catchup" | "skip-lag" | "keep") => (flag.to_string(), "1".to_string()),
                None => {
                    let v = args.next().ok_or_else(|| anyhow!("--{flag} needs a value\n\n{USAGE}"))?;
                    (flag.to_string(), v)
                }
            };
            pairs.push((name, value));
        }
        for (name, v) in pairs {
            let num =
                |v: &str| -> Result<u64> { v.parse::<u64>().with_context(|| format!("--{name}: not a number: {v:?}")) };
            let flag = |v: &str| !matches!(v, "" | "0" | "false" | "no");
            match name.as_str() {
                "rounds" => o.rounds = num(&v)?.max(1) as usize,
                "scale" => o.scale = num(&v)?.max(1) as u32,
                "bulk-rows" => o.bulk_rows = num(&v)?,
                "lag-scale" => o.lag_scale = num(&v)?.max(1) as u32,
                "lag-secs" => o.lag_secs = num(&v)?.max(1) as u32,
                "lag-rate" => o.lag_rate = num(&v)?.max(1) as u32,
                "lag-clients" => o.lag_clients = num(&v)?.max(1) as u32,
                "sample-ms" => o.sample_ms = num(&v)?.max(10),
                "pitr-log" => o.pitr_log = v,
                "receivewal-compress" => o.receivewal_compress = v,
                "catchup-timeout" => o.catchup_timeout_secs = num(&v)?.max(1),
                "skip-catchup" => o.skip_catchup = flag(&v),
                "skip-lag" => o.skip_lag = flag(&v),
                "samples-csv" => o.samples_csv = Some(PathBuf::from(v)),
                "keep" => {
                    if flag(&v) {
                        std::env::set_var("PITR_KEEP_TEST_DIRS", "1");
                    }
                }
                _ => bail!("unknown option --{name}\n\n{USAGE}"),
            }
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// Makes sure `PITR_BIN` names a release build; builds one when it is unset.
fn ensure_release_pitr() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PITR_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.components().any(|c| c.as_os_str() == "debug") {
            eprintln!("warning: PITR_BIN={} looks like a debug build; the comparison is not fair", p.display());
        }
        return Ok(p);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // This crate's workspace (the parent of benches/), wherever it was built.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(manifest).to_path_buf();
    eprintln!("building the release pitr binary: {cargo} build --release -p pitr --bin pitr");
    let out = Command::new(&cargo)
        .args(["build", "--release", "-p", "pitr", "--bin", "pitr", "--message-format=json-render-diagnostics"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo} build"))?;
    if !out.status.success() {
        bail!("`cargo build --release -p pitr` failed ({})", out.status);
    }
    let mut exe = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "pitr" {
            if let Some(e) = msg["executable"].as_str() {
                exe = Some(PathBuf::from(e));
            }
        }
    }
    let exe = match exe {
        Some(e) => e,
        None => {
            let target =
                std::env::var_os("CARGO_TARGET_DIR").map(|t| root.join(t)).unwrap_or_else(|| root.join("target"));
            target.join("release").join("pitr")
        }
    };
    if !exe.is_file() {
        bail!("release build reported no pitr executable ({})", exe.display());
    }
    // Set before any thread exists (the tokio runtime is created afterwards).
    std::env::set_var("PITR_BIN", &exe);
    Ok(exe)
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: field 3 (state) is f[0]; utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(p).map(|rd| rd.flatten().map(|e| dir_bytes(&e.path())).sum()).unwrap_or(0)
    } else {
        meta.len()
    }
}

/// Removes terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_tail(p: &Path, n: usize) -> String {
    let text = strip_ansi(&std::fs::read_to_string(p).unwrap_or_default());
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of a sorted slice.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

fn machine_info() -> String {
    let nproc = std::thread::available_parallelism().map(|n| n.get().to_string()).unwrap_or_else(|_| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    format!("nproc={nproc}, cpu={cpu}, mem={mem}, kernel={kernel}, loadavg at start={load}")
}

// ---------------------------------------------------------------------------
// Cluster and receivers
// ---------------------------------------------------------------------------

struct Bench {
    rt: tokio::runtime::Runtime,
    opts: Opts,
    tck: f64,
}

fn start_cluster(extra: &[&str]) -> Result<PgCluster> {
    let mut o = PgOptions::new(15);
    o.extra_conf.push("max_wal_size = '4GB'".into());
    o.extra_conf.extend(extra.iter().map(|s| s.to_string()));
    PgCluster::start(o)
}

const CLUSTER_CONF: &str = "harness defaults (wal_level=replica, fsync=on, max_wal_senders=10) + max_wal_size='4GB'";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Pitr,
    Receivewal,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Pitr => "pitr stream",
            Kind::Receivewal => "pg_receivewal",
        }
    }
    fn app(self) -> &'static str {
        match self {
            Kind::Pitr => PITR_APP,
            Kind::Receivewal => RW_APP,
        }
    }
}

struct Running {
    kind: Kind,
    child: Child,
    log: PathBuf,
    /// Where the WAL ends up (pitr's repository or pg_receivewal's -D).
    out_dir: PathBuf,
    /// Just before the process was spawned (after any preparation such as `pitr init`).
    spawned_at: Instant,
    // Keep the scratch directories alive while the receiver runs.
    _pitr_env: Option<PitrEnv>,
    _dir: Option<Box<dyn std::any::Any>>,
}

impl Running {
    fn ensure_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "{} exited early ({st}); log {}:\n{}",
                self.kind.label(),
                self.log.display(),
                log_tail(&self.log, 40)
            );
        }
        Ok(())
    }

    /// pitr's own counters from its status file: (objects put, plaintext bytes put).
    fn pitr_puts(&self) -> Option<(u64, u64)> {
        let env = self._pitr_env.as_ref()?;
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&env.status_file).ok()?).ok()?;
        Some((v["objects_archived"].as_u64()?, v["bytes_archived"].as_u64()?))
    }

    /// Graceful stop (pitr: SIGTERM drains; pg_receivewal: SIGINT), SIGKILL after 30 s.
    fn stop(&mut self) {
        let sig = if self.kind == Kind::Pitr { SIGTERM } else { SIGINT };
        if self.child.signal(sig).is_ok() && matches!(self.child.wait_timeout(Duration::from_secs(30)), Ok(Some(_))) {
            return;
        }
        self.child.kill9();
    }
}

fn pitr_command_line(log: &str) -> String {
    format!("PITR_LOG={log} PITR_BIN={} stream --config <scratch>/pitr.toml", pitr_bin().display())
}

/// `pitr <args>` for `env`, without the harness's own `PITR_*` variables (`PITR_BIN`,
/// `PITR_KEEP_TEST_DIRS`, ...): pitr reads every `PITR_<SECTION>_<KEY>` as a config override and
/// refuses to start on one that matches no section.
fn pitr_command(env: &PitrEnv, args: &[&str]) -> Command {
    let mut cmd = env.command(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PITR_") {
            cmd.env_remove(&k);
        }
    }
    cmd
}

fn spawn_pitr(cluster: &PgCluster, name: &str, log_filter: &str) -> Result<Running> {
    let env = PitrEnv::new(name, cluster, "")?;
    let out = pitr_command(&env, &["init"]).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("pitr init failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let log = env.dir.path().join("stream.log");
    let mut cmd = pitr_command(&env, &["stream"]);
    cmd.env("PITR_LOG", log_filter);
    let spawned_at = Instant::now();
    let child = spawn_logged(cmd, &log)?;
    Ok(Running {
        kind: Kind::Pitr,
        child,
        log,
        spawned_at,
        out_dir: env.repo.clone(),
        _pitr_env: Some(env),
        _dir: None,
    })
}

fn receivewal_args(dir: &str, port: u16, compress: &str) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-D".into(),
        dir.into(),
        "-S".into(),
        RW_SLOT.into(),
        "--synchronous".into(),
        "-n".into(),
        "-d".into(),
        format!("host=127.0.0.1 port={port} user=postgres application_name={RW_APP}"),
    ];
    if compress != "none" {
        a.push(format!("--compress={compress}"));
    }
    a
}

fn spawn_receivewal(cluster: &PgCluster, name: &str, compress: &str) -> Result<Running> {
    let dir = scratch_dir(name);
    let wal = dir.path().join("wal");
    std::fs::create_dir_all(&wal)?;
    let log = dir.path().join("pg_receivewal.log");
    let mut cmd = Command::new(client_bin("pg_receivewal"));
    cmd.args(receivewal_args(&wal.display().to_string(), cluster.port, compress));
    let spawned_at = Instant::now();
    let child = spawn_logged(cmd, &log)?;
    Ok(Running {
        kind: Kind::Receivewal,
        child,
        log,
        spawned_at,
        out_dir: wal,
        _pitr_env: None,
        _dir: Some(Box::new(dir)),
    })
}

fn create_slots(cluster: &PgCluster) -> Result<()> {
    cluster.psql(&format!(
        "select pg_create_physical_replication_slot('{PITR_SLOT}', true), \
         pg_create_physical_replication_slot('{RW_SLOT}', true)"
    ))?;
    Ok(())
}

fn current_lsn(cluster: &PgCluster) -> Result<u64> {
    parse_lsn(&cluster.psql("select pg_current_wal_lsn()")?)
}

impl Bench {
    async fn flush_lsn(client: &tokio_postgres::Client, app: &str) -> Result<Option<u64>> {
        let rows = client
            .query("select flush_lsn::text from pg_stat_replication where application_name = $1", &[&app])
            .await?;
        let mut best: Option<u64> = None;
        for r in rows {
            let v: Option<String> = r.get(0);
            if let Some(v) = v {
                let l = parse_lsn(&v)?;
                best = Some(best.map_or(l, |b| b.max(l)));
            }
        }
        Ok(best)
    }

    /// Polls every 20 ms until `run`'s flush_lsn reaches `target`; the time since it was spawned.
    fn wait_flushed(&self, client: &tokio_postgres::Client, run: &mut Running, target: u64) -> Result<Duration> {
        let timeout = Duration::from_secs(self.opts.catchup_timeout_secs);
        loop {
            let flushed = self.rt.block_on(Self::flush_lsn(client, run.kind.app()))?;
            if flushed.is_some_and(|f| f >= target) {
                return Ok(run.spawned_at.elapsed());
            }
            run.ensure_alive()?;
            if run.spawned_at.elapsed() > timeout {
                bail!(
                    "{} did not flush up to {} within {timeout:?} (at {}); log {}:\n{}",
                    run.kind.label(),
                    u64_to_lsn(target),
                    flushed.map_or("-".into(), u64_to_lsn),
                    run.log.display(),
                    log_tail(&run.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------------------
// Phase 1: catch-up throughput
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default)]
struct CatchupRun {
    secs: f64,
    cpu_secs: f64,
    out_bytes: u64,
    /// pitr only: objects put and plaintext bytes put (from its status file).
    puts: (u64, u64),
}

struct CatchupRound {
    first: Kind,
    generated: u64,
    streamed: u64,
    gen_secs: f64,
    pitr: CatchupRun,
    rw: CatchupRun,
}

impl Bench {
    fn catchup_round(&self, round: usize) -> Result<CatchupRound> {
        let o = &self.opts;
        let cluster = start_cluster(&["autovacuum = off"])?;
        let client = self.rt.block_on(cluster.client())?;
        cluster.psql("checkpoint")?;
        create_slots(&cluster)?;
        let start = current_lsn(&cluster)?;
        let restart = parse_lsn(&cluster.psql(&format!(
            "select min(restart_lsn) from pg_replication_slots where slot_name in ('{PITR_SLOT}', '{RW_SLOT}')"
        ))?)?;
        let seg: u64 = cluster.psql("show wal_segment_size")?.trim_end_matches("MB").parse::<u64>()? << 20;

        eprintln!("round {round}: generating WAL (pgbench -i -s {}) ...", o.scale);
        let t = Instant::now();
        cluster.pgbench(&["-i", "-s", &o.scale.to_string(), "-q"])?;
        if o.bulk_rows > 0 {
            cluster.psql(&format!(
                "create table bulk(id bigint, pad text); \
                 insert into bulk select g, md5(random()::text) || md5(random()::text) || \
                 md5(random()::text) || md5(random()::text) from generate_series(1, {}) g",
                o.bulk_rows
            ))?;
        }
        // Let the checkpointer finish before any timing starts.
        cluster.psql("checkpoint")?;
        let gen_secs = t.elapsed().as_secs_f64();
        let end = current_lsn(&cluster)?;
        // Both receivers start at the beginning of the slot's restart segment.
        let stream_start = restart - restart % seg;
        eprintln!(
            "round {round}: WAL {} .. {} ({:.1} MiB generated, {:.1} MiB to stream) in {gen_secs:.1}s",
            u64_to_lsn(start),
            u64_to_lsn(end),
            (end - start) as f64 / MIB,
            (end - stream_start) as f64 / MIB
        );

        let first = if round % 2 == 1 { Kind::Pitr } else { Kind::Receivewal };
        let second = if first == Kind::Pitr { Kind::Receivewal } else { Kind::Pitr };
        let mut pitr = CatchupRun::default();
        let mut rw = CatchupRun::default();
        for kind in [first, second] {
            // Settle: no leftover I/O from the previous receiver's stop.
            std::thread::sleep(Duration::from_millis(500));
            let mut run = match kind {
                Kind::Pitr => spawn_pitr(&cluster, &format!("bench-pitr-r{round}"), &o.pitr_log)?,
                Kind::Receivewal => spawn_receivewal(&cluster, &format!("bench-rw-r{round}"), &o.receivewal_compress)?,
            };
            let elapsed = self.wait_flushed(&client, &mut run, end)?;
            let cpu = cpu_ticks(run.child.id()).unwrap_or(0) as f64 / self.tck;
            run.stop();
            let r = CatchupRun {
                secs: elapsed.as_secs_f64(),
                cpu_secs: cpu,
                out_bytes: dir_bytes(&run.out_dir),
                puts: run.pitr_puts().unwrap_or_default(),
            };
            eprintln!(
                "round {round}: {:<13} {:.2}s  {:.1} MiB/s  cpu {:.2}s  (log {})",
                kind.label(),
                r.secs,
                (end - stream_start) as f64 / MIB / r.secs,
                r.cpu_secs,
                run.log.display()
            );
            if kind == Kind::Pitr {
                if o.pitr_log != "info" {
                    eprintln!("--- pitr stream log (last 25 lines) ---\n{}", log_tail(&run.log, 25));
                }
                pitr = r;
            } else {
                rw = r;
            }
        }
        Ok(CatchupRound { first, generated: end - start, streamed: end - stream_start, gen_secs, pitr, rw })
    }
}

// ---------------------------------------------------------------------------
// Phase 2: flush_lag under steady load
// ---------------------------------------------------------------------------

#[derive(Default)]
struct LagSeries {
    /// flush_lag in seconds (NULL recorded as 0).
    lag: Vec<f64>,
    nulls: usize,
    missing: usize,
    /// pg_current_wal_lsn() - flush_lsn in bytes.
    bytes: Vec<f64>,
    cpu_secs: f64,
    /// (seconds since load start, flush_lag s, flush_lsn, primary's current LSN) per sample.
    raw: Vec<(f64, Option<f64>, Option<u64>, u64)>,
}

struct LagResult {
    /// pitr's objects and plaintext bytes put during the load.
    pitr_puts: Option<(u64, u64)>,
    /// WAL the primary wrote during the load.
    wal_bytes: u64,
    seg: u64,
    pitr: LagSeries,
    rw: LagSeries,
    samples: usize,
    wall_secs: f64,
    pgbench_cmd: String,
    latency_avg: String,
    tps: String,
    schedule_lag: String,
}

fn pgbench_line(out: &str, prefix: &str) -> String {
    out.lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| format!("{prefix}: (not reported)"))
}

impl Bench {
    fn lag_phase(&self) -> Result<LagResult> {
        let o = &self.opts;
        let cluster = start_cluster(&[])?;
        let client = self.rt.block_on(cluster.client())?;
        eprintln!("lag: pgbench -i -s {} ...", o.lag_scale);
        cluster.pgbench(&["-i", "-s", &o.lag_scale.to_string(), "-q"])?;
        cluster.psql("checkpoint")?;
        create_slots(&cluster)?;
        let mut pitr = spawn_pitr(&cluster, "bench-lag-pitr", &o.pitr_log)?;
        let mut rw = spawn_receivewal(&cluster, "bench-lag-rw", &o.receivewal_compress)?;
        let target = current_lsn(&cluster)?;
        self.wait_flushed(&client, &mut pitr, target)?;
        self.wait_flushed(&client, &mut rw, target)?;
        std::thread::sleep(Duration::from_secs(1));

        let port = cluster.port.to_string();
        let args: Vec<String> = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-n",
            "-c",
            &o.lag_clients.to_string(),
            "-T",
            &o.lag_secs.to_string(),
            "-R",
            &o.lag_rate.to_string(),
            "postgres",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pgbench_cmd = format!("pgbench {}", args.join(" ").replace(&port, "<port>"));
        eprintln!("lag: {pgbench_cmd} (sampling every {} ms)", o.sample_ms);
        let cpu0 = (cpu_ticks(pitr.child.id()), cpu_ticks(rw.child.id()));
        let puts0 = pitr.pitr_puts();
        let lsn0 = current_lsn(&cluster)?;
        let seg: u64 = cluster.psql("show wal_segment_size")?.trim_end_matches("MB").parse::<u64>()? << 20;
        let load = std::thread::spawn(move || -> Result<String> {
            let out = Command::new(client_bin("pgbench")).args(&args).stdin(Stdio::null()).output()?;
            if !out.status.success() {
                bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        });

        let mut res_p = LagSeries::default();
        let mut res_r = LagSeries::default();
        let interval = Duration::from_millis(o.sample_ms);
        let t0 = Instant::now();
        let mut next = t0;
        let mut samples = 0;
        // Skip the first second: pgbench's connections are still being made.
        let warmup = Duration::from_secs(1);
        while !load.is_finished() {
            next += interval;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            let rows = self.rt.block_on(client.query(
                "select application_name, extract(epoch from flush_lag)::float8, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::float8, \
                 flush_lsn::text, pg_current_wal_lsn()::text \
                 from pg_stat_replication where application_name in ($1, $2)",
                &[&PITR_APP, &RW_APP],
            ))?;
            let t = t0.elapsed();
            if t < warmup {
                continue;
            }
            samples += 1;
            let (mut seen_p, mut seen_r) = (false, false);
            for r in rows {
                let app: String = r.get(0);
                let lag: Option<f64> = r.get(1);
                let bytes: Option<f64> = r.get(2);
                let flush: Option<String> = r.get(3);
                let cur: String = r.get(4);
                let s = if app == PITR_APP {
                    seen_p = true;
                    &mut res_p
                } else {
                    seen_r = true;
                    &mut res_r
                };
                if lag.is_none() {
                    s.nulls += 1;
                }
                s.lag.push(lag.unwrap_or(0.0));
                s.raw.push((t.as_secs_f64(), lag, flush.and_then(|f| parse_lsn(&f).ok()), parse_lsn(&cur)?));
                if let Some(b) = bytes {
                    s.bytes.push(b);
                }
            }
            if !seen_p {
                res_p.missing += 1;
            }
            if !seen_r {
                res_r.missing += 1;
            }
        }
        let wall_secs = t0.elapsed().as_secs_f64();
        let out = load.join().map_err(|_| anyhow!("pgbench thread panicked"))??;
        let cpu1 = (cpu_ticks(pitr.child.id()), cpu_ticks(rw.child.id()));
        let wal_bytes = current_lsn(&cluster)?.saturating_sub(lsn0);
        // The status file is rewritten at least every second; give it that second.
        std::thread::sleep(Duration::from_millis(1100));
        let pitr_puts = match (puts0, pitr.pitr_puts()) {
            (Some(a), Some(b)) => Some((b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))),
            _ => None,
        };
        if let (Some(a), Some(b)) = (cpu0.0, cpu1.0) {
            res_p.cpu_secs = b.saturating_sub(a) as f64 / self.tck;
        }
        if let (Some(a), Some(b)) = (cpu0.1, cpu1.1) {
            res_r.cpu_secs = b.saturating_sub(a) as f64 / self.tck;
        }
        pitr.ensure_alive()?;
        rw.ensure_alive()?;
        pitr.stop();
        rw.stop();
        if o.pitr_log != "info" {
            eprintln!(
                "--- pitr stream log, lag phase (last 25 lines; {}) ---\n{}",
                pitr.log.display(),
                log_tail(&pitr.log, 25)
            );
        }
        if let Some(path) = &o.samples_csv {
            let mut csv = String::from("t_secs,receiver,flush_lag_secs,flush_lsn,primary_lsn\n");
            for (name, s) in [(PITR_APP, &res_p), (RW_APP, &res_r)] {
                for (t, lag, flush, cur) in &s.raw {
                    let _ = writeln!(
                        csv,
                        "{t:.3},{name},{},{},{}",
                        lag.map_or(String::new(), |l| format!("{l:.6}")),
                        flush.map_or(String::new(), u64_to_lsn),
                        u64_to_lsn(*cur)
                    );
                }
            }
            std::fs::write(path, csv).with_context(|| format!("write {}", path.display()))?;
            eprintln!("lag: samples written to {}", path.display());
        }
        Ok(LagResult {
            pitr_puts,
            wal_bytes,
            seg,
            pitr: res_p,
            rw: res_r,
            samples,
            wall_secs,
            pgbench_cmd,
            latency_avg: pgbench_line(&out, "latency average"),
            tps: pgbench_line(&out, "tps"),
            schedule_lag: pgbench_line(&out, "rate limit schedule lag"),
        })
    }
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn mibs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB / secs
}

fn catchup_report(r: &mut String, o: &Opts, rounds: &[CatchupRound]) {
    let _ = writeln!(r, "\n-- 1. catch-up throughput (each receiver alone, same WAL, fresh cluster per round) --");
    let _ = writeln!(
        r,
        "WAL: checkpoint; create both slots (immediately_reserve); pgbench -i -s {} -q{}; checkpoint; \
         end LSN = pg_current_wal_lsn(). autovacuum=off.",
        o.scale,
        if o.bulk_rows > 0 {
            format!(" + insert of {} rows of 128 random hex chars (bulk)", o.bulk_rows)
        } else {
            String::new()
        }
    );
    let _ =
        writeln!(r, "time = receiver process spawn -> pg_stat_replication.flush_lsn >= end LSN (polled every 20 ms).");
    let _ = writeln!(
        r,
        "MiB/s = bytes streamed (end LSN - start of the slot's restart segment) / time; CPU = receiver utime+stime."
    );
    let _ = writeln!(
        r,
        "{:>5} {:>6} {:>9} {:>9} | {:>7} {:>8} {:>6} | {:>7} {:>8} {:>6} | {:>10}",
        "round", "first", "gen MiB", "strm MiB", "pitr s", "MiB/s", "cpu s", "rw s", "MiB/s", "cpu s", "pitr/rw"
    );
    let mut ratios = Vec::new();
    let (mut ps, mut rs) = (Vec::new(), Vec::new());
    for (i, c) in rounds.iter().enumerate() {
        let p = mibs(c.streamed, c.pitr.secs);
        let w = mibs(c.streamed, c.rw.secs);
        ratios.push(p / w);
        ps.push(p);
        rs.push(w);
        let _ = writeln!(
            r,
            "{:>5} {:>6} {:>9.1} {:>9.1} | {:>7.2} {:>8.1} {:>6.2} | {:>7.2} {:>8.1} {:>6.2} | {:>10.2}",
            i + 1,
            if c.first == Kind::Pitr { "pitr" } else { "rw" },
            c.generated as f64 / MIB,
            c.streamed as f64 / MIB,
            c.pitr.secs,
            p,
            c.pitr.cpu_secs,
            c.rw.secs,
            w,
            c.rw.cpu_secs,
            p / w
        );
    }
    let med_p = median(&ps);
    let med_r = median(&rs);
    let _ = writeln!(
        r,
        "median: pitr {med_p:.1} MiB/s, pg_receivewal {med_r:.1} MiB/s, ratio of medians pitr/pg_receivewal = {:.2}, median of per-round ratios = {:.2}",
        med_p / med_r,
        median(&ratios)
    );
    let cpu_p =
        median(&rounds.iter().map(|c| c.pitr.cpu_secs / (c.streamed as f64 / MIB / 1024.0)).collect::<Vec<_>>());
    let cpu_r = median(&rounds.iter().map(|c| c.rw.cpu_secs / (c.streamed as f64 / MIB / 1024.0)).collect::<Vec<_>>());
    let _ = writeln!(r, "receiver CPU per GiB streamed (median): pitr {cpu_p:.2} s, pg_receivewal {cpu_r:.2} s");
    if let Some(c) = rounds.last() {
        let _ = writeln!(
            r,
            "output size (last round): pitr repository {:.1} MiB (zstd + AES-GCM sealed), pg_receivewal dir {:.1} MiB (compress={})",
            c.pitr.out_bytes as f64 / MIB,
            c.rw.out_bytes as f64 / MIB,
            o.receivewal_compress
        );
    }
    if let Some(c) = rounds.last() {
        let (n, b) = c.pitr.puts;
        let _ = writeln!(
            r,
            "pitr puts (last round, from its status file): {n} objects, {:.1} MiB plaintext put for {:.1} MiB streamed ({:.2}x)",
            b as f64 / MIB,
            c.streamed as f64 / MIB,
            b as f64 / c.streamed as f64
        );
    }
    let gen = median(&rounds.iter().map(|c| c.gen_secs).collect::<Vec<_>>());
    let _ = writeln!(r, "WAL generation (pgbench -i + checkpoint) took {gen:.1}s per round (median)");
}

fn lag_row(r: &mut String, name: &str, s: &LagSeries, wall: f64) {
    let mut v = s.lag.clone();
    v.sort_by(f64::total_cmp);
    let mut b = s.bytes.clone();
    b.sort_by(f64::total_cmp);
    let ms = |x: f64| x * 1000.0;
    let _ = writeln!(
        r,
        "{:<14} {:>7} {:>5} {:>4} | {:>7.2} {:>7.2} {:>7.2} {:>7.2} | {:>8.1} {:>8.1} {:>8.1} | {:>5.1}%",
        name,
        s.lag.len(),
        s.nulls,
        s.missing,
        ms(pct(&v, 50.0)),
        ms(pct(&v, 90.0)),
        ms(pct(&v, 99.0)),
        ms(v.last().copied().unwrap_or(f64::NAN)),
        pct(&b, 50.0) / 1024.0,
        pct(&b, 99.0) / 1024.0,
        b.last().copied().unwrap_or(f64::NAN) / 1024.0,
        100.0 * s.cpu_secs / wall
    );
}

fn lag_report(r: &mut String, o: &Opts, l: &LagResult) {
    let _ = writeln!(r, "\n-- 2. flush_lag under steady load (both receivers at once, one primary) --");
    let _ = writeln!(
        r,
        "setup: pgbench -i -s {} -q; checkpoint; create both slots; start both; wait until both flushed the current LSN",
        o.lag_scale
    );
    let _ = writeln!(r, "load: {}", l.pgbench_cmd);
    let _ = writeln!(
        r,
        "sampled: select extract(epoch from flush_lag), pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn) \
         from pg_stat_replication every {} ms ({} samples over {:.1}s, first 1s skipped).",
        o.sample_ms, l.samples, l.wall_secs
    );
    let _ = writeln!(
        r,
        "flush_lag NULL (= caught up, no lag measurement pending) is recorded as 0 and counted in the NULL column; \
         'miss' = receiver absent from pg_stat_replication."
    );
    let _ = writeln!(
        r,
        "{:<14} {:>7} {:>5} {:>4} | {:>7} {:>7} {:>7} {:>7} | {:>8} {:>8} {:>8} | {:>6}",
        "receiver",
        "samples",
        "NULL",
        "miss",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "p50 KiB",
        "p99 KiB",
        "max KiB",
        "cpu"
    );
    lag_row(r, "pitr stream", &l.pitr, l.wall_secs);
    lag_row(r, "pg_receivewal", &l.rw, l.wall_secs);
    let rp = {
        let mut v = l.pitr.lag.clone();
        v.sort_by(f64::total_cmp);
        v
    };
    let rr = {
        let mut v = l.rw.lag.clone();
        v.sort_by(f64::total_cmp);
        v
    };
    let _ = writeln!(
        r,
        "ratio pitr/pg_receivewal flush_lag: p50 {:.2}, p90 {:.2}, p99 {:.2}",
        pct(&rp, 50.0) / pct(&rr, 50.0),
        pct(&rp, 90.0) / pct(&rr, 90.0),
        pct(&rp, 99.0) / pct(&rr, 99.0)
    );
    let _ = writeln!(r, "pgbench: {}; {}; {}", l.latency_avg, l.schedule_lag, l.tps);
    let _ = writeln!(r, "WAL written by the primary during the load: {:.1} MiB", l.wal_bytes as f64 / MIB);
    if let Some((n, b)) = l.pitr_puts {
        let _ = writeln!(
            r,
            "pitr puts during the load: {n} objects ({:.0}/s), {:.1} MiB plaintext put ({:.2}x the WAL)",
            n as f64 / l.wall_secs,
            b as f64 / MIB,
            b as f64 / l.wal_bytes.max(1) as f64
        );
    }
    // A sample is "at a boundary" when flush_lsn sits exactly on a segment boundary (or in an
    // earlier segment) while the primary has already written past it.
    let at_boundary =
        |flush: &Option<u64>, cur: u64| flush.is_some_and(|f| f < cur && (f % l.seg == 0 || f / l.seg != cur / l.seg));
    for (name, s) in [("pitr stream", &l.pitr), ("pg_receivewal", &l.rw)] {
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
            "{name}: {stuck}/{} samples with flush_lsn stuck at a segment boundary the primary had passed; \
             worst: {}",
            s.raw.len(),
            list.join(", ")
        );
    }
}

fn main() -> Result<()> {
    let opts = Opts::parse()?;
    let pitr = ensure_release_pitr()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let bench = Bench { rt, opts: opts.clone(), tck: clk_tck() };
    let machine = machine_info();
    let t_all = Instant::now();

    let mut rounds = Vec::new();
    if !opts.skip_catchup {
        for round in 1..=opts.rounds {
            rounds.push(bench.catchup_round(round)?);
        }
    }
    let lag = if opts.skip_lag { None } else { Some(bench.lag_phase()?) };

    let pg_version = Command::new(client_bin("pg_receivewal"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut r = String::new();
    let _ = writeln!(r, "\n===== pitr stream vs pg_receivewal --synchronous =====");
    let _ = writeln!(r, "machine: {machine}");
    let _ = writeln!(r, "server: PostgreSQL 15 ({}), {CLUSTER_CONF}; {pg_version}", pitr_tests::PG15_BIN_DIR);
    let _ = writeln!(r, "pitr:          {}", pitr_command_line(&opts.pitr_log));
    let _ = writeln!(
        r,
        "               config: local repository, WAL at wal_zstd_level 1 (default), AES-256-GCM, slot/application_name {PITR_APP}, \
         flush_interval 0 (default), status_interval 1s"
    );
    let _ = writeln!(
        r,
        "pg_receivewal: {} {}",
        client_bin("pg_receivewal").display(),
        receivewal_args("<scratch>/wal", 0, &opts.receivewal_compress)
            .iter()
            .map(|a| if a.contains(' ') { format!("\"{a}\"") } else { a.clone() })
            .collect::<Vec<_>>()
            .join(" ")
            .replace("port=0", "port=<port>")
    );
    let _ = writeln!(r, "pitr binary: {}", pitr.display());
    if !rounds.is_empty() {
        catchup_report(&mut r, &opts, &rounds);
    }
    if let Some(l) = &lag {
        lag_report(&mut r, &opts, l);
    }
    let _ = writeln!(r, "\ntotal runtime {:.0}s", t_all.elapsed().as_secs_f64());
    println!("{r}");
    Ok(())
}
