//! MongoDB for the tests: SecantusDB (PyPI `SecantusDB`, a MongoDB-compatible server speaking
//! the real wire protocol, with a one-member replica set, `local.oplog.rs`, tailable cursors and
//! transactions), installed with pip on first use and run on a free port with its own data
//! directory. No mongod can be installed here, so the MongoDB path is tested against this server.
//!
//! [`MongoEnv`] is a pitr config with a `[mongo]` section and no `[postgres]` one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{free_port, lossy, pitr_bin, scratch_dir, spawn_logged, wait_until, Child};

/// The PyPI release the tests run against.
pub const SECANTUS_VERSION: &str = "0.7.0b3";
/// The replica set SecantusDB presents.
pub const REPLICA_SET: &str = "secantus";

fn find_server() -> Option<PathBuf> {
    crate::on_path("secantusd-py")
}

/// `secantusd-py`, installed with pip if missing.
pub fn secantus_bin() -> Result<PathBuf> {
    if let Some(b) = find_server() {
        return Ok(b);
    }
    let _lock = crate::flock_exclusive(Path::new("/tmp/pitr-tests-pip.lock"))?;
    if find_server().is_none() {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", &format!("SecantusDB=={SECANTUS_VERSION}")])
            .stdin(Stdio::null())
            .output()
            .context("running pip")?;
        if !out.status.success() {
            bail!("pip install SecantusDB=={SECANTUS_VERSION} failed: {}", lossy(&out.stderr));
        }
    }
    find_server().context("secantusd-py not on PATH after pip install SecantusDB")
}

#[derive(Debug, Clone, Default)]
pub struct MongoOptions {
    /// No replica-set advertisement (`--standalone`): drivers see a standalone server.
    pub standalone: bool,
    /// `--oplog-max-entries`: SecantusDB prunes the oldest entries above this count (checked
    /// every 1000 writes).
    pub oplog_max_entries: Option<u64>,
}

/// A running SecantusDB server; killed when dropped.
pub struct MongoServer {
    pub port: u16,
    pub opts: MongoOptions,
    dir: tempfile::TempDir,
    process: Option<Child>,
    starts: usize,
}

impl MongoServer {
    pub fn start(opts: MongoOptions) -> Result<MongoServer> {
        let dir = scratch_dir("secantus");
        let mut server = MongoServer { port: free_port()?, opts, dir, process: None, starts: 0 };
        server.start_again()?;
        Ok(server)
    }

    /// Starts the server (again) on the same port and data directory.
    pub fn start_again(&mut self) -> Result<()> {
        self.starts += 1;
        let mut cmd = Command::new(secantus_bin()?);
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string(), "--storage-path"])
            .arg(self.dir.path().join("data"));
        if self.opts.standalone {
            cmd.arg("--standalone");
        }
        if let Some(n) = self.opts.oplog_max_entries {
            cmd.args(["--oplog-max-entries", &n.to_string()]);
        }
        let log = self.dir.path().join(format!("secantus-{}.log", self.starts));
        self.process = Some(spawn_logged(cmd, &log)?);
        let port = self.port;
        wait_until("SecantusDB to listen", Duration::from_secs(120), || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        })
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }

    /// Sends `sig` to the server (e.g. SIGSTOP, so that it accepts connections and answers
    /// nothing, then SIGCONT).
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        self.process.as_mut().context("the server is not running")?.signal(sig)
    }

    /// A connection string naming the replica set (none for a standalone server).
    pub fn uri(&self) -> String {
        if self.opts.standalone {
            format!("mongodb://127.0.0.1:{}/", self.port)
        } else {
            format!("mongodb://127.0.0.1:{}/?replicaSet={REPLICA_SET}", self.port)
        }
    }

    /// A connection string without the replica-set option (for a restore target).
    pub fn direct_uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A pitr config for MongoDB only, its repository and key, and the sidecar runs.
pub struct MongoEnv {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub config: PathBuf,
    pub metrics_port: u16,
    stream_runs: usize,
}

impl MongoEnv {
    /// `[mongo] uri = uri` plus `mongo_extra` lines in that section.
    pub fn new(name: &str, uri: &str, mongo_extra: &str) -> Result<MongoEnv> {
        let dir = scratch_dir(name);
        let repo = dir.path().join("repo");
        let config = dir.path().join("pitr.toml");
        let metrics_port = free_port()?;
        let text = format!(
            "[repository]\npath = {:?}\n[encryption]\nkey_file = {:?}\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             [schedule]\nfull_backup = \"\"\nincremental = \"\"\nverify = \"\"\ndrill = \"\"\n\
             [stream]\nstatus_file = {:?}\n\
             [mongo]\nuri = {uri:?}\nflush_interval = \"200ms\"\nconnect_timeout = \"5s\"\n{mongo_extra}\n",
            repo.display().to_string(),
            dir.path().join("key").display().to_string(),
            dir.path().join("status.json").display().to_string(),
        );
        std::fs::write(&config, text)?;
        Ok(MongoEnv { dir, repo, config, metrics_port, stream_runs: 0 })
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(pitr_bin());
        cmd.arg("--config").arg(&self.config).args(args);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.command(args).output().with_context(|| format!("running pitr {args:?}"))
    }

    /// Runs `pitr <args>`; fails unless it exits 0; returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "pitr {args:?} failed with {}:\nstdout: {}\nstderr: {}",
                out.status,
                lossy(&out.stdout),
                lossy(&out.stderr)
            );
        }
        Ok(lossy(&out.stdout))
    }

    pub fn spawn_stream(&mut self) -> Result<Child> {
        self.stream_runs += 1;
        let log = self.dir.path().join(format!("stream-{}.log", self.stream_runs));
        let mut cmd = self.command(&["stream"]);
        cmd.env("PITR_LOG", "info,pitr_mongo=debug");
        spawn_logged(cmd, &log)
    }

    /// SIGTERM; fails unless the sidecar exits 0 within 60 s.
    pub fn stop_stream_cleanly(&self, stream: &mut Child) -> Result<()> {
        stream.signal(libc::SIGTERM)?;
        let status = stream.wait_timeout(Duration::from_secs(60))?.context("pitr stream did not stop on SIGTERM")?;
        if !status.success() {
            bail!("pitr stream exited with {status} on SIGTERM\n{}", self.stream_logs());
        }
        Ok(())
    }

    pub fn stream_log(&self, run: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("stream-{run}.log"))).unwrap_or_default()
    }

    pub fn stream_logs(&self) -> String {
        (1..=self.stream_runs).map(|i| format!("--- stream-{i}.log\n{}\n", self.stream_log(i))).collect()
    }

    /// Oplog slices in the repository, by name.
    pub fn slices(&self) -> Vec<String> {
        let mut out = Vec::new();
        let root = self.repo.join("mongo");
        for set in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            for s in std::fs::read_dir(set.path().join("oplog")).into_iter().flatten().flatten() {
                out.push(s.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        out
    }

    /// The newest archived `ts` as (seconds, increment), read from slice names alone.
    pub fn archived_end(&self) -> Option<(u32, u32)> {
        let last = self.slices().pop()?;
        let end = last.strip_suffix(".slice")?.split('-').nth(1)?.to_string();
        let (s, i) = end.split_once('.')?;
        Some((s.parse().ok()?, i.parse().ok()?))
    }

    /// Waits until the archive holds the oplog up to `ts`.
    pub fn wait_archived(&self, ts: (u32, u32)) -> Result<()> {
        wait_until("the oplog to be archived", Duration::from_secs(60), || {
            Ok(self.archived_end().is_some_and(|e| e >= ts))
        })
        .with_context(|| self.stream_logs())
    }

    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let reply = crate::http_request(self.metrics_port, "GET", path, &[], &[])?;
        Ok((reply.status, reply.text()))
    }
}

/// A driver client for `uri` that waits up to 30 s for a server.
pub async fn client(uri: &str) -> Result<mongodb::Client> {
    let mut opts = mongodb::options::ClientOptions::parse(uri).await?;
    opts.server_selection_timeout = Some(Duration::from_secs(30));
    Ok(mongodb::Client::with_options(opts)?)
}

/// The newest oplog entry: (ts seconds, increment, wall ms).
pub async fn newest(c: &mongodb::Client) -> Result<(u32, u32, i64)> {
    use bson::{doc, Bson, Document};
    let e = c
        .database("local")
        .collection::<Document>("oplog.rs")
        .find_one(doc! {})
        .sort(doc! { "$natural": -1 })
        .await?
        .context("empty oplog")?;
    let ts = match e.get("ts") {
        Some(Bson::Timestamp(t)) => *t,
        _ => bail!("entry without ts: {e}"),
    };
    Ok((ts.time, ts.increment, e.get_datetime("wall")?.timestamp_millis()))
}
