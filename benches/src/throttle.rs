//! Phase 6: bandwidth limits (issue 20). A backup under `[repository] max_upload_rate`, a backup
//! under `[backup] max_rate` (the server's MAX_RATE) and a files-only restore under
//! `max_download_rate`, each against the time its bytes need at that rate; and the same restore
//! unlimited beside it. The limits' claim: a limited transfer of B bytes takes at least B ÷ rate
//! (the token bucket starts empty and holds at most one second's worth, which it can only have
//! saved while the process did something else first).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_tests::pitr::{PitrEnv, WAL_SEGMENT_SIZE};
use pitr_tests::{chown_to_pg_user, scratch_dir, wait_until};

use crate::opts::Opts;
use crate::receivers::{current_lsn, start_cluster, PitrSetup, Repo};
use crate::report::{Goal, Row};
use crate::util::{dir_bytes, log_tail, timed, MIB};
use crate::Bench;

/// One measured transfer.
pub struct Transfer {
    pub what: &'static str,
    /// The limit in bytes per second; `None` unlimited.
    pub rate: Option<u64>,
    /// Bytes the limit applies to.
    pub bytes: u64,
    pub secs: f64,
}

impl Transfer {
    /// bytes ÷ rate, the least time the limit allows.
    fn floor_secs(&self) -> Option<f64> {
        self.rate.map(|r| self.bytes as f64 / r as f64)
    }
}

pub struct ThrottleResult {
    pub scale: u32,
    pub transfers: Vec<Transfer>,
}

/// Bytes of base-backup blocks and manifests in a local repository: what a backup uploads to a
/// fresh repository and a restore of that backup downloads (each block at least once).
fn bulk_bytes(repo: &Path) -> Result<u64> {
    let mut total = 0;
    for cluster in std::fs::read_dir(repo.join("pg")).with_context(|| format!("{}/pg", repo.display()))? {
        let cluster = cluster?.path();
        total += dir_bytes(&cluster.join("blocks")) + dir_bytes(&cluster.join("backups"));
    }
    Ok(total)
}

/// The config as written by the harness, with these limits added.
fn with_limits(original: &str, upload: Option<u64>, download: Option<u64>, max_rate: Option<u64>) -> String {
    let mut repository = String::new();
    if let Some(r) = upload {
        repository.push_str(&format!("max_upload_rate = \"{r}B/s\"\n"));
    }
    if let Some(r) = download {
        repository.push_str(&format!("max_download_rate = \"{r}B/s\"\n"));
    }
    let mut text = original.replacen("[encryption]\n", &format!("{repository}[encryption]\n"), 1);
    if let Some(r) = max_rate {
        text.push_str(&format!("[backup]\nmax_rate = \"{r}B/s\"\n"));
    }
    text
}

fn backup(setup: &PitrSetup) -> Result<(serde_json::Value, f64)> {
    timed(|| {
        let out = setup.command(&["backup", "--json"]).output().context("running pitr backup")?;
        if !out.status.success() {
            bail!("pitr backup failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).context("pitr backup --json")
    })
}

fn restore(env: &PitrEnv) -> Result<f64> {
    let dir = scratch_dir("bench-throttle-restore");
    chown_to_pg_user(dir.path())?;
    let target = dir.path().join("data").display().to_string();
    let (_, secs) = timed(|| {
        let out = env.run_as_pg_user(&["restore", "--to", "latest", "--target-dir", &target, "--json"])?;
        if !out.status.success() {
            bail!("pitr restore failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    })?;
    Ok(secs)
}

impl Bench {
    pub fn throttle_phase(&self) -> Result<ThrottleResult> {
        let o = &self.opts;
        let cluster = start_cluster(&[])?;
        let setup = PitrSetup::new(&cluster, "bench-throttle", &Repo::Local)?;
        let env = &setup.env;
        env.share_with_pg_user()?;
        let original = std::fs::read_to_string(&env.config)?;
        let stream_log = env.dir.path().join("stream.log");
        // The sidecar runs unlimited: it only archives the WAL the backups wait for.
        let mut stream = setup.spawn_stream(&o.pitr_log, &stream_log)?;
        eprintln!("throttle: pgbench -i -s {} ...", o.throttle_scale);
        cluster.pgbench(&["-i", "-s", &o.throttle_scale.to_string(), "-q"])?;
        cluster.psql("checkpoint")?;
        let lsn = current_lsn(&cluster)?;
        wait_until("pitr's archive to catch up with pgbench -i", Duration::from_secs(o.catchup_timeout_secs), || {
            Ok(env.archived_end(WAL_SEGMENT_SIZE)? >= lsn)
        })
        .with_context(|| log_tail(&stream_log, 40))?;

        let rate = o.throttle_rate;
        let mut transfers = Vec::new();
        eprintln!("throttle: pitr backup, max_upload_rate = {rate} B/s ...");
        std::fs::write(&env.config, with_limits(&original, Some(rate), None, None))?;
        let (_, secs) = backup(&setup)?;
        let bulk = bulk_bytes(env.repo_path())?;
        transfers.push(Transfer { what: "backup, max_upload_rate", rate: Some(rate), bytes: bulk, secs });

        // A second backup uploads nothing new (every block is there): what it reads from the
        // server is what MAX_RATE paces.
        let max_rate = o.throttle_max_rate;
        eprintln!("throttle: pitr backup, [backup] max_rate = {max_rate} B/s ...");
        std::fs::write(&env.config, with_limits(&original, None, None, Some(max_rate)))?;
        let (report, secs) = backup(&setup)?;
        let read = report["bytes_read"].as_u64().context("no bytes_read in the backup report")?;
        // PostgreSQL's unit is 1024 bytes; pitr rounds to the nearest.
        let asked = (max_rate + 512) / 1024 * 1024;
        transfers.push(Transfer { what: "backup, [backup] max_rate", rate: Some(asked), bytes: read, secs });

        // The restores read the newest backup: the same blocks, and its own manifest.
        let bulk = bulk_bytes(env.repo_path())?;
        eprintln!("throttle: pitr restore (files only), max_download_rate = {rate} B/s ...");
        std::fs::write(&env.config, with_limits(&original, None, Some(rate), None))?;
        let secs = restore(env)?;
        transfers.push(Transfer { what: "restore, max_download_rate", rate: Some(rate), bytes: bulk, secs });
        eprintln!("throttle: pitr restore (files only), unlimited ...");
        std::fs::write(&env.config, &original)?;
        let secs = restore(env)?;
        transfers.push(Transfer { what: "restore, unlimited", rate: None, bytes: bulk, secs });

        let _ = stream.signal(15);
        let _ = stream.wait_timeout(Duration::from_secs(30));
        Ok(ThrottleResult { scale: o.throttle_scale, transfers })
    }
}

pub fn report(r: &mut String, _o: &Opts, t: &ThrottleResult) -> Vec<Row> {
    let _ = writeln!(
        r,
        "\n-- 6. bandwidth limits, pgbench scale {} (local repository; bytes: blocks + manifests, or bytes read \
         from the server for MAX_RATE) --",
        t.scale
    );
    let _ = writeln!(
        r,
        "{:<28} {:>12} {:>12} {:>10} {:>14} {:>16}",
        "transfer", "bytes", "rate B/s", "elapsed s", "bytes/rate s", "elapsed/(b/r)"
    );
    let mut rows = Vec::new();
    for x in &t.transfers {
        let floor = x.floor_secs();
        let ratio = floor.map(|f| x.secs / f);
        let _ = writeln!(
            r,
            "{:<28} {:>12} {:>12} {:>10.2} {:>14} {:>16}",
            x.what,
            x.bytes,
            x.rate.map_or("-".into(), |r| r.to_string()),
            x.secs,
            floor.map_or("-".into(), |f| format!("{f:.2}")),
            ratio.map_or("-".into(), |q| format!("{q:.3}"))
        );
        let mut row = Row::new(format!("throttle: {} ({:.1} MiB)", x.what, x.bytes as f64 / MIB), "s").pitr(x.secs);
        if let (Some(f), Some(q)) = (floor, ratio) {
            row = row.peer(f).ratio(q);
            // pitr's own limits guarantee the floor; MAX_RATE is PostgreSQL's pacing, shown only.
            row = if x.what.contains("max_rate") {
                row.note("peer = bytes ÷ rate; PostgreSQL paces MAX_RATE")
            } else {
                row.goal(Goal::RatioAtLeast(1.0)).note("peer = bytes ÷ rate")
            };
        }
        rows.push(row);
    }
    rows
}
