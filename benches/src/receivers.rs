//! The primary and the two receivers: `pitr stream` (local or S3 repository) and
//! `pg_receivewal --synchronous`, each on its own physical slot.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{client_bin, parse_lsn, pitr_bin, scratch_dir, spawn_logged, u64_to_lsn, Child, PgCluster, PgOptions};

use crate::util::log_tail;

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
pub const PITR_APP: &str = "pitr_main";
pub const PITR_SLOT: &str = "pitr_main";
pub const RW_APP: &str = "receivewal";
pub const RW_SLOT: &str = "receivewal";
/// s3s-fs's fixed credentials.
const S3_KEY: &str = "test";

pub const CLUSTER_CONF: &str =
    "harness defaults (wal_level=replica, fsync=on, max_wal_senders=10, wal_keep_size=0) + max_wal_size='4GB'";

pub fn start_cluster(extra: &[&str]) -> Result<PgCluster> {
    let mut o = PgOptions::new(15);
    o.extra_conf.push("max_wal_size = '4GB'".into());
    o.extra_conf.extend(extra.iter().map(|s| s.to_string()));
    PgCluster::start(o)
}

/// A fresh cluster with a pgbench database of `scale` (checkpointed) and a client on it, for the
/// load phases (`phase` names it in progress lines).
pub fn pgbench_cluster(
    rt: &tokio::runtime::Runtime,
    phase: &str,
    scale: u32,
) -> Result<(PgCluster, tokio_postgres::Client)> {
    let cluster = start_cluster(&[])?;
    let client = rt.block_on(cluster.client())?;
    eprintln!("{phase}: pgbench -i -s {scale} ...");
    cluster.pgbench(&["-i", "-s", &scale.to_string(), "-q"])?;
    cluster.psql("checkpoint")?;
    Ok((cluster, client))
}

/// Before each run of a round: the pgbench tables made anew and a checkpoint. Without it every
/// run meets the dead rows and the longer history table of the runs before it, and tps falls
/// from run to run, which favoured whichever receiver ran first in a round.
pub fn fresh_tables(cluster: &PgCluster, scale: u32) -> Result<()> {
    cluster.pgbench(&["-i", "-s", &scale.to_string(), "-q"])?;
    cluster.psql("checkpoint")?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Pitr,
    Receivewal,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Pitr => "pitr stream",
            Kind::Receivewal => "pg_receivewal",
        }
    }
    pub fn app(self) -> &'static str {
        match self {
            Kind::Pitr => PITR_APP,
            Kind::Receivewal => RW_APP,
        }
    }
    pub fn slot(self) -> &'static str {
        match self {
            Kind::Pitr => PITR_SLOT,
            Kind::Receivewal => RW_SLOT,
        }
    }
    /// Round `round` (1-based) runs pitr first when odd, pg_receivewal first when even.
    pub fn order(round: usize) -> [Kind; 2] {
        if round % 2 == 1 {
            [Kind::Pitr, Kind::Receivewal]
        } else {
            [Kind::Receivewal, Kind::Pitr]
        }
    }
}

/// Where pitr's repository lives.
#[derive(Clone, Debug)]
pub enum Repo {
    /// A directory in the scratch dir (the harness's default).
    Local,
    /// The same, with this fixed `[stream] flush_interval` in ms instead of pitr's default for a
    /// local repository (`auto`: 2 ms unless a synchronous standby; 0: put as soon as the
    /// previous put is done).
    LocalSpaced { flush_ms: u64 },
    /// `s3://pitr/bench` on this endpoint (s3s-fs), with this `flush_interval` in ms.
    S3 { endpoint: String, flush_ms: u64 },
}

/// A pitr scratch environment (config, key, repository) and how to run pitr on it.
pub struct PitrSetup {
    pub env: PitrEnv,
    s3: bool,
}

impl PitrSetup {
    /// A config for `cluster` (schedules off, status file every 1 s) and `pitr init`.
    pub fn new(cluster: &PgCluster, name: &str, repo: &Repo) -> Result<PitrSetup> {
        let stream_conf = match repo {
            Repo::Local => String::new(),
            Repo::LocalSpaced { flush_ms } | Repo::S3 { flush_ms, .. } => format!("flush_interval = \"{flush_ms}ms\""),
        };
        let env = PitrEnv::new(name, cluster, &stream_conf)?;
        let setup = match repo {
            Repo::Local | Repo::LocalSpaced { .. } => PitrSetup { env, s3: false },
            Repo::S3 { endpoint, .. } => {
                let repo_line = format!("path = {:?}", env.repo_path().display().to_string());
                env.edit_config(
                    &repo_line,
                    &format!(
                        "url = \"s3://pitr/bench\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\n\
                         allow_http = true\nforce_path_style = true"
                    ),
                )?;
                PitrSetup { env, s3: true }
            }
        };
        let out = setup.command(&["init"]).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!("pitr init failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(setup)
    }

    /// `pitr --config <scratch>/pitr.toml <args>`, without the harness's own `PITR_*` variables
    /// (`PITR_BIN`, `PITR_KEEP_TEST_DIRS`, ...), which are no business of pitr's; with s3s-fs's
    /// credentials for an S3 repository.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.env.command(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PITR_") {
                cmd.env_remove(&k);
            }
        }
        if self.s3 {
            cmd.env("AWS_ACCESS_KEY_ID", S3_KEY).env("AWS_SECRET_ACCESS_KEY", S3_KEY);
        }
        cmd
    }

    /// `pitr stream` in the background with `PITR_LOG=<log_filter>`, logging to `log`.
    pub fn spawn_stream(&self, log_filter: &str, log: &std::path::Path) -> Result<Child> {
        let mut cmd = self.command(&["stream"]);
        cmd.env("PITR_LOG", log_filter);
        spawn_logged(cmd, log)
    }
}

/// A receiver process and where its output goes.
pub struct Running {
    pub kind: Kind,
    pub child: Child,
    pub log: PathBuf,
    /// Where the WAL ends up (pitr's repository or pg_receivewal's -D).
    pub out_dir: PathBuf,
    /// Just before the process was spawned (after any preparation such as `pitr init`).
    pub spawned_at: Instant,
    // Keep the scratch directories alive while the receiver runs.
    pitr: Option<PitrSetup>,
    _dir: Option<Box<dyn std::any::Any>>,
}

impl Running {
    pub fn ensure_alive(&mut self) -> Result<()> {
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
    pub fn pitr_puts(&self) -> Option<(u64, u64)> {
        let setup = self.pitr.as_ref()?;
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&setup.env.status_file).ok()?).ok()?;
        Some((v["objects_archived"].as_u64()?, v["bytes_archived"].as_u64()?))
    }

    /// Graceful stop (pitr: SIGTERM drains; pg_receivewal: SIGINT), SIGKILL after 30 s.
    pub fn stop(&mut self) {
        let sig = if self.kind == Kind::Pitr { SIGTERM } else { SIGINT };
        if self.child.signal(sig).is_ok() && matches!(self.child.wait_timeout(Duration::from_secs(30)), Ok(Some(_))) {
            return;
        }
        self.child.kill9();
    }
}

pub fn pitr_command_line(log: &str) -> String {
    format!("PITR_LOG={log} {} --config <scratch>/pitr.toml stream", pitr_bin().display())
}

pub fn spawn_pitr(cluster: &PgCluster, name: &str, log_filter: &str, repo: &Repo) -> Result<Running> {
    let setup = PitrSetup::new(cluster, name, repo)?;
    let log = setup.env.dir.path().join("stream.log");
    let spawned_at = Instant::now();
    let child = setup.spawn_stream(log_filter, &log)?;
    Ok(Running {
        kind: Kind::Pitr,
        child,
        log,
        spawned_at,
        out_dir: setup.env.repo.clone(),
        pitr: Some(setup),
        _dir: None,
    })
}

pub fn receivewal_args(dir: &str, port: u16, compress: &str) -> Vec<String> {
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

pub fn receivewal_command_line(compress: &str) -> String {
    format!(
        "{} {}",
        client_bin("pg_receivewal").display(),
        receivewal_args("<scratch>/wal", 0, compress)
            .iter()
            .map(|a| if a.contains(' ') { format!("\"{a}\"") } else { a.clone() })
            .collect::<Vec<_>>()
            .join(" ")
            .replace("port=0", "port=<port>")
    )
}

pub fn spawn_receivewal(cluster: &PgCluster, name: &str, compress: &str) -> Result<Running> {
    let dir = scratch_dir(name);
    let wal = dir.path().join("wal");
    std::fs::create_dir_all(&wal)?;
    let log = dir.path().join("pg_receivewal.log");
    let mut cmd = Command::new(client_bin("pg_receivewal"));
    cmd.args(receivewal_args(&wal.display().to_string(), cluster.port, compress));
    let spawned_at = Instant::now();
    let child = spawn_logged(cmd, &log)?;
    Ok(Running { kind: Kind::Receivewal, child, log, spawned_at, out_dir: wal, pitr: None, _dir: Some(Box::new(dir)) })
}

/// Starts `kind` against `cluster` (pitr on a local repository).
pub fn spawn(cluster: &PgCluster, kind: Kind, name: &str, o: &crate::opts::Opts) -> Result<Running> {
    match kind {
        Kind::Pitr => spawn_pitr(cluster, &format!("{name}-pitr"), &o.pitr_log, &o.local_repo()),
        Kind::Receivewal => spawn_receivewal(cluster, &format!("{name}-rw"), &o.receivewal_compress),
    }
}

/// Creates the physical slot of `kind`, reserving WAL from now on.
pub fn create_slot(cluster: &PgCluster, kind: Kind) -> Result<()> {
    cluster.psql(&format!("select pg_create_physical_replication_slot('{}', true)", kind.slot()))?;
    Ok(())
}

/// Drops the slot of `kind` if it exists (its receiver must have stopped).
pub fn drop_slot(cluster: &PgCluster, kind: Kind) -> Result<()> {
    cluster.psql(&format!(
        "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = '{}'",
        kind.slot()
    ))?;
    Ok(())
}

pub fn current_lsn(cluster: &PgCluster) -> Result<u64> {
    parse_lsn(&cluster.psql("select pg_current_wal_lsn()")?)
}

pub fn wal_segment_size(cluster: &PgCluster) -> Result<u64> {
    let v = cluster.psql("select setting from pg_settings where name = 'wal_segment_size'")?;
    Ok(v.parse::<u64>()?)
}

async fn flush_lsn(client: &tokio_postgres::Client, app: &str) -> Result<Option<u64>> {
    let rows =
        client.query("select flush_lsn::text from pg_stat_replication where application_name = $1", &[&app]).await?;
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
pub fn wait_flushed(
    rt: &tokio::runtime::Runtime,
    client: &tokio_postgres::Client,
    run: &mut Running,
    target: u64,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let flushed = rt.block_on(flush_lsn(client, run.kind.app()))?;
        if flushed.is_some_and(|f| f >= target) {
            return Ok(run.spawned_at.elapsed());
        }
        run.ensure_alive()?;
        if started.elapsed() > timeout {
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
