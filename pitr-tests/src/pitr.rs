//! Running the `pitr` binary in tests: a scratch repository, key and config per test, one-shot
//! commands, the `pitr stream` sidecar as a guarded background process, an independent reading
//! of the archive's extent straight from object names (a second opinion on `pitr status`), and
//! blocking access to a local repository's objects ([`LocalObjects`]) for tests that delete,
//! damage or plant them.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pitr_archive::{LocalStore, PutOutcome, Store};

use crate::{pitr_bin, scratch_dir, spawn_logged, wait_until, Child, PgCluster};

/// The WAL segment size of the test clusters (initdb's default).
pub const WAL_SEGMENT_SIZE: u64 = 16 << 20;

/// The objects of a local repository (or secondary), read and changed through the storage API
/// pitr itself uses, with blocking calls. Tests go through this rather than the files under the
/// directory: the local backend need not keep each object in a file of its own (WAL chunks are
/// records in log files), and only its API says which objects there are and what they hold.
pub struct LocalObjects {
    root: PathBuf,
}

impl LocalObjects {
    pub fn new(root: impl Into<PathBuf>) -> LocalObjects {
        LocalObjects { root: root.into() }
    }

    /// Runs `op` on a [`LocalStore`] at the root to completion. The harness is blocking and is
    /// called from plain `#[test]`s and from inside `#[tokio::test]`s alike, and a runtime must
    /// not be blocked on from inside another: the future gets a runtime of its own on a thread of
    /// its own, which this waits for.
    pub fn run<T, E, Fut>(&self, op: impl FnOnce(LocalStore) -> Fut + Send) -> Result<T>
    where
        T: Send,
        Fut: Future<Output = std::result::Result<T, E>>,
        anyhow::Error: From<E>,
    {
        let store = LocalStore::new(&self.root);
        let joined = std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<T> {
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    Ok(runtime.block_on(op(store))?)
                })
                .join()
        });
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// The names of the objects under `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let listed = self.run(|store| async move { store.list(prefix).await })?;
        Ok(listed.into_iter().map(|o| o.name).collect())
    }

    pub fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.run(|store| async move { store.head(name).await })?.is_some())
    }

    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let bytes = self.run(|store| async move { store.get(name).await })?;
        Ok(bytes.to_vec())
    }

    /// Stores `bytes` as `name`, which must not exist (as a bucket writer without the key
    /// plants an object, or a test puts back one it took away).
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let outcome = self.run(|store| async move { store.put_if_absent(name, bytes.into()).await })?;
        ensure!(outcome == PutOutcome::Created, "{name} exists already in {}", self.root.display());
        Ok(())
    }

    /// Deletes the objects `names` (a missing one is no error).
    pub fn delete(&self, names: &[String]) -> Result<()> {
        self.run(|store| async move { store.delete_many(names).await })
    }

    /// Makes `bytes` the contents of the existing object `name` (damaged, truncated, or the
    /// original put back). Objects are create-only and the API cannot rewrite one in place: this
    /// deletes it and puts the new bytes under the same name.
    pub fn replace(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.run(|store| async move {
            store.delete(name).await?;
            store.put_if_absent(name, bytes.into()).await
        })?;
        Ok(())
    }
}

/// A cluster restored by `pitr restore --start` into its own scratch directory, owned by the
/// server user; stopped (immediate) when dropped.
pub struct RestoredServer {
    pub dir: tempfile::TempDir,
    pub target: PathBuf,
    pub port: u16,
    bin_dir: PathBuf,
}

impl RestoredServer {
    /// `psql -c sql` as postgres over the restored server's socket; the trimmed output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new(crate::client_bin("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", &self.target.display().to_string()])
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-c", sql])
            .output()
            .context("running psql on the restored server")?;
        if !out.status.success() {
            bail!("psql on the restored server (port {}): {}", self.port, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `pg_ctl stop -m <mode>` as the server user.
    pub fn stop(&self, mode: &str) {
        let mut cmd = Command::new(self.bin_dir.join("pg_ctl"));
        cmd.arg("-D").arg(&self.target).args(["-m", mode, "-w", "stop"]);
        crate::as_pg_user(&mut cmd);
        let _ = cmd.output();
    }
}

impl Drop for RestoredServer {
    fn drop(&mut self) {
        if self.target.join("postmaster.pid").exists() {
            self.stop("immediate");
        }
    }
}

pub struct PitrEnv {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub key_file: PathBuf,
    pub config: PathBuf,
    pub status_file: PathBuf,
    /// Where `pitr stream` serves /metrics and /healthz.
    pub metrics_port: u16,
    stream_runs: usize,
    /// Variables set in the environment of every pitr process started from here (and of what
    /// those start: a restored server's `pitr wal-fetch`), not in the test process's own.
    child_env: Vec<(String, String)>,
}

impl PitrEnv {
    /// A config pointing at `cluster` with the given extra `[stream]` lines.
    pub fn new(name: &str, cluster: &PgCluster, stream_extra: &str) -> Result<PitrEnv> {
        let dir = scratch_dir(name);
        let repo = dir.path().join("repo");
        let key_file = dir.path().join("key");
        let config = dir.path().join("pitr.toml");
        let status_file = dir.path().join("status.json");
        let metrics_port = crate::free_port()?;
        // Scheduled jobs are off unless a test turns them on (replace `full_backup = ""`).
        let text = format!(
            "[repository]\npath = {:?}\n[encryption]\nkey_file = {:?}\n[postgres]\nconninfo = {:?}\nbin_dir = {:?}\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             [schedule]\nfull_backup = \"\"\nincremental = \"\"\nverify = \"\"\ndrill = \"\"\nexpire = \"\"\npartial_drill = \"\"\n\
             [stream]\nstatus_file = {:?}\nstatus_interval = \"1s\"\n{stream_extra}\n",
            repo.display().to_string(),
            key_file.display().to_string(),
            cluster.conninfo("postgres"),
            cluster.bin_dir().display().to_string(),
            status_file.display().to_string(),
        );
        std::fs::write(&config, text)?;
        Ok(PitrEnv { dir, repo, key_file, config, status_file, metrics_port, stream_runs: 0, child_env: Vec::new() })
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(pitr_bin());
        cmd.arg("--config").arg(&self.config).args(args);
        cmd.envs(self.child_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Sets `name=value` in the environment of the pitr processes this starts from now on
    /// (credentials for an emulator, say), leaving the test process's own alone: parallel tests
    /// must not see them.
    pub fn set_child_env(&mut self, name: &str, value: &str) {
        self.child_env.push((name.to_string(), value.to_string()));
    }

    /// GET `path` from the sidecar's metrics server: (status code, body).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        write!(conn, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((code, body))
    }

    /// The archive's end as `pitr status --json` reports it (0 before anything is archived).
    pub fn archived_lsn(&self) -> Result<u64> {
        let status: serde_json::Value = serde_json::from_str(&self.run_ok(&["status", "--json"])?)?;
        Ok(status["archived_lsn"].as_str().map(crate::lsn_to_u64).unwrap_or(0))
    }

    /// The sidecar's own status file (`pitr status` needs the repository, which may be down).
    pub fn sidecar_status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(&self.status_file)?)?)
    }

    /// A metric's value from the sidecar's `/metrics` (the first series of that name; 0 if absent).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let (code, body) = self.http_get("/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }

    /// A second config for the same cluster and repository, as a sidecar on "another host"
    /// would have: another lease holder, metrics port and status file.
    pub fn other_host_config(&self) -> Result<PathBuf> {
        let text = std::fs::read_to_string(&self.config)?
            .replace("lease_holder = \"host-a/pitr_main\"", "lease_holder = \"host-b/pitr_main\"")
            .replace(&format!("127.0.0.1:{}", self.metrics_port), &format!("127.0.0.1:{}", crate::free_port()?))
            .replace(
                &format!("{:?}", self.status_file.display().to_string()),
                &format!("{:?}", self.dir.path().join("status-b.json").display().to_string()),
            );
        if !text.contains("host-b/pitr_main") {
            bail!("the second config names no second holder");
        }
        let path = self.dir.path().join("pitr-b.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Replaces `from` with `to` in the config file (to turn on a schedule, change a setting…).
    pub fn edit_config(&self, from: &str, to: &str) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)?;
        if !text.contains(from) {
            bail!("{from:?} is not in {}", self.config.display());
        }
        std::fs::write(&self.config, text.replacen(from, to, 1))?;
        Ok(())
    }

    /// Points the config, made for `primary`, at both `primary` and `standby` with
    /// `target_session_attrs=read-write`: the sidecar must pick whichever is the primary.
    pub fn connect_to_read_write(&self, primary: &PgCluster, standby: &PgCluster) -> Result<()> {
        let conninfo = format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user=postgres target_session_attrs=read-write connect_timeout=2",
            primary.port, standby.port
        );
        self.edit_config(&primary.conninfo("postgres"), &conninfo)
    }

    /// Hands the whole scratch directory (config, key, repository) to the unprivileged server
    /// user, so that `pitr restore --start` and the restored server's `pitr wal-fetch` can run as
    /// that user, as they do in production.
    pub fn share_with_pg_user(&self) -> Result<()> {
        crate::chown_to_pg_user(self.dir.path())
    }

    /// `pitr <args>` run as the unprivileged server user.
    pub fn run_as_pg_user(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.command(args);
        crate::as_pg_user(&mut cmd);
        if let Some(u) = crate::pg_user() {
            cmd.env("USER", &u.name).env("HOME", self.dir.path());
        }
        cmd.output().with_context(|| format!("running pitr {args:?} as the server user"))
    }

    /// [`PitrEnv::run_as_pg_user`] of a command printing JSON (`--json`): whether it exited 0,
    /// and what it printed (an error names both streams when that is not JSON).
    pub fn run_json_as_pg_user(&self, args: &[&str]) -> Result<(bool, serde_json::Value)> {
        let out = self.run_as_pg_user(args)?;
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        })?;
        Ok((out.status.success(), value))
    }

    /// `pitr restore --to <to> --start --db-user postgres <extra>` as the server user into a fresh
    /// directory on a free port, the way an operator runs it. Fails with pitr's stderr.
    pub fn restore_started(&self, to: &str, bin_dir: &Path, extra: &[&str]) -> Result<(RestoredServer, Output)> {
        let dir = scratch_dir("restored");
        crate::chown_to_pg_user(dir.path())?;
        let target = dir.path().join("data");
        let port = crate::free_port()?;
        let (target_arg, port_arg) = (target.display().to_string(), port.to_string());
        let mut args = vec!["restore", "--to", to, "--target-dir", &target_arg, "--start", "--port", &port_arg];
        args.extend(["--db-user", "postgres"]);
        args.extend_from_slice(extra);
        let out = self.run_as_pg_user(&args)?;
        let server = RestoredServer { dir, target, port, bin_dir: bin_dir.to_path_buf() };
        if !out.status.success() {
            bail!("pitr restore --to {to} --start failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((server, out))
    }

    /// Runs `pitr <args>` to completion.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        let out = self.command(args).output().with_context(|| format!("running pitr {args:?}"))?;
        Ok(out)
    }

    /// Runs `pitr <args>` and fails unless it exits 0; returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "pitr {args:?} failed with {}:\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn init(&self) -> Result<()> {
        self.run_ok(&["init"]).map(|_| ())
    }

    /// Starts `pitr stream` in the background, logging to `stream-<n>.log`.
    pub fn spawn_stream(&mut self) -> Result<Child> {
        self.stream_runs += 1;
        let log = self.dir.path().join(format!("stream-{}.log", self.stream_runs));
        let mut cmd = self.command(&["stream"]);
        cmd.env("PITR_LOG", "info,pitr_walstream=debug");
        spawn_logged(cmd, &log)
    }

    /// Waits up to 60 s until `cluster` shows the sidecar (`pitr_main`) streaming.
    pub fn wait_streaming(&self, cluster: &PgCluster) -> Result<()> {
        wait_until("pitr stream to be streaming", Duration::from_secs(60), || {
            let n = cluster.psql(
                "select count(*) from pg_stat_replication where application_name = 'pitr_main' and state = 'streaming'",
            )?;
            Ok(n == "1")
        })
        .with_context(|| self.stream_logs())
    }

    /// Stops a sidecar [`spawn_stream`](Self::spawn_stream) started with SIGTERM; fails unless it
    /// exits 0 within 60 s and leaves none of its recycled chunk files (`.tmp.recycle/<pid>.*` in
    /// a local repository) behind.
    pub fn stop_stream(&self, stream: &mut Child) -> Result<()> {
        stream.signal(libc::SIGTERM)?;
        let status = stream.wait_timeout(Duration::from_secs(60))?.context("pitr stream did not stop on SIGTERM")?;
        if !status.success() {
            bail!("pitr stream exited with {status} on SIGTERM\n{}", self.stream_logs());
        }
        let ours = format!("{}.", stream.id());
        let left: Vec<String> = std::fs::read_dir(self.repo.join(".tmp.recycle"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&ours))
            .collect();
        if !left.is_empty() {
            bail!("pitr stream stopped but left {} recycled files in {}: {left:?}", left.len(), self.repo.display());
        }
        Ok(())
    }

    /// Waits up to 60 s (naming `what` on timeout, with the sidecar's logs) until the archive,
    /// read from object names alone, holds the WAL up to `lsn`.
    pub fn wait_archived(&self, lsn: u64, what: &str) -> Result<()> {
        wait_until(what, Duration::from_secs(60), || Ok(self.archived_end(WAL_SEGMENT_SIZE)? >= lsn))
            .with_context(|| self.stream_logs())
    }

    /// Everything every `pitr stream` of this environment logged (for checks that a message was
    /// logged at all: [`PitrEnv::stream_logs`] shows only the tails).
    pub fn stream_logs_whole(&self) -> String {
        (1..=self.stream_runs)
            .map(|i| std::fs::read_to_string(self.dir.path().join(format!("stream-{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn stream_logs(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.stream_runs {
            let log = self.dir.path().join(format!("stream-{i}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out.push_str(&format!("--- {} (last {} lines)\n{}\n", log.display(), tail.len(), tail.join("\n")));
        }
        out
    }

    /// The repository's objects ([`LocalObjects`]).
    pub fn objects(&self) -> LocalObjects {
        LocalObjects::new(&self.repo)
    }

    /// The WAL prefix of the (only) cluster in the repository: `pg/<system id>/wal/`.
    pub fn wal_prefix(&self) -> Result<String> {
        let clusters = self.objects().run(|store| async move { store.list_children("pg/").await })?;
        let cluster = clusters.into_iter().find(|c| c.ends_with('/')).context("no cluster in the repository")?;
        Ok(format!("{cluster}wal/"))
    }

    /// The directory of [`PitrEnv::wal_prefix`], for the paths beside it (`../lease`,
    /// `../backups`). WAL objects are not necessarily files in it: read them with
    /// [`PitrEnv::wal_objects`] and [`PitrEnv::objects`].
    pub fn wal_dir(&self) -> Result<PathBuf> {
        Ok(self.repo.join(self.wal_prefix()?))
    }

    /// The names of the cluster's WAL objects (segments, chunks, history files) after
    /// [`PitrEnv::wal_prefix`], sorted: `000000010000000000000003.seg`,
    /// `000000010000000000000004.00000000-00012000.chunk`, `00000002.history`.
    pub fn wal_objects(&self) -> Result<Vec<String>> {
        let prefix = self.wal_prefix()?;
        let names = self.objects().list(&prefix)?;
        Ok(names.into_iter().filter_map(|n| n.strip_prefix(&prefix).map(String::from)).collect())
    }

    /// Deletes the cluster's WAL objects `names` (as [`PitrEnv::wal_objects`] gives them).
    pub fn delete_wal_objects(&self, names: &[String]) -> Result<()> {
        let prefix = self.wal_prefix()?;
        self.objects().delete(&names.iter().map(|n| format!("{prefix}{n}")).collect::<Vec<_>>())
    }

    /// (timeline, segment file name) → byte ranges held, read from object names alone.
    pub fn archived_objects(&self) -> Result<BTreeMap<String, Vec<(u64, u64)>>> {
        let mut out: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        // Nothing archived yet: no cluster in the repository, or no repository.
        let Ok(names) = self.wal_objects() else { return Ok(out) };
        for name in names {
            if let Some(seg) = name.strip_suffix(".seg") {
                out.entry(seg.to_string()).or_default().push((0, u64::MAX));
            } else if let Some(chunk) = name.strip_suffix(".chunk") {
                let (seg, range) = chunk.split_once('.').context("chunk name")?;
                let (a, b) = range.split_once('-').context("chunk range")?;
                out.entry(seg.to_string())
                    .or_default()
                    .push((u64::from_str_radix(a, 16)?, u64::from_str_radix(b, 16)?));
            }
        }
        Ok(out)
    }

    /// The LSN up to which the newest timeline's WAL is archived, from object names alone.
    pub fn archived_end(&self, segment_size: u64) -> Result<u64> {
        let objects = self.archived_objects()?;
        let Some((seg, ranges)) = objects.iter().next_back() else { return Ok(0) };
        let segno = segment_number(seg, segment_size);
        let start = segno * segment_size;
        let mut ranges = ranges.clone();
        ranges.sort();
        if ranges.iter().any(|r| r.1 == u64::MAX) {
            return Ok(start + segment_size);
        }
        let mut end = 0;
        for (a, b) in ranges {
            if a > end {
                break;
            }
            end = end.max(b);
        }
        Ok(start + end)
    }

    /// `pitr wal-fetch` of `segment` into a file in the scratch dir; its bytes.
    pub fn wal_fetch(&self, segment: &str) -> Result<Vec<u8>> {
        let dest = self.dir.path().join(format!("fetched-{segment}"));
        self.run_ok(&["wal-fetch", segment, &dest.display().to_string()])?;
        let data = std::fs::read(&dest)?;
        std::fs::remove_file(&dest)?;
        Ok(data)
    }

    /// Every whole segment archived up to `upto_segment` equals the server's own file in
    /// `wal_dir` (kept there by a slot that never advances); how many were compared.
    pub fn compare_with_pg_wal(&self, wal_dir: &Path, upto_segment: &str) -> Result<usize> {
        let mut compared = 0;
        for (name, ranges) in self.archived_objects()? {
            if name.as_str() > upto_segment || !ranges.iter().any(|r| r.1 == u64::MAX) {
                continue;
            }
            let expected = std::fs::read(wal_dir.join(&name)).with_context(|| format!("server's {name}"))?;
            let got = self.wal_fetch(&name)?;
            if expected != got {
                let first_diff = expected.iter().zip(&got).position(|(a, b)| a != b);
                bail!("segment {name} differs from the server's pg_wal file (first difference at byte {first_diff:?})");
            }
            compared += 1;
        }
        Ok(compared)
    }

    pub fn repo_path(&self) -> &Path {
        &self.repo
    }
}

/// Segment number from a 24-hex-digit segment file name.
pub fn segment_number(name: &str, segment_size: u64) -> u64 {
    let log = u64::from_str_radix(&name[8..16], 16).unwrap_or(0);
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap_or(0);
    log * (0x1_0000_0000 / segment_size) + seg
}
