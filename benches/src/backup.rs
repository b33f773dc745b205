//! Phase 4: full backup and restore beside pgBackRest on one pgbench database, and pitr's
//! restore to a chosen second with `--start` after WAL generated on top of the backup.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use pitr_tests::pitr::WAL_SEGMENT_SIZE;
use pitr_tests::{as_pg_user, chown_to_pg_user, scratch_dir, u64_to_lsn, wait_until};

use crate::catchup::md5_rows;
use crate::opts::Opts;
use crate::receivers::{current_lsn, start_cluster, PitrSetup};
use crate::report::{Goal, Row};
use crate::util::{dir_bytes, log_tail, median, run_ok, timed, MIB};
use crate::Bench;

/// Rows of `repeat(md5(g::text), 3)` per MB of WAL: the 6 M rows made ~918 MB.
const MD5_ROWS_PER_MB: u64 = 6_000_000 / 918;
const STANZA: &str = "bench";
/// The default sizes the restore goal (<= 10 s) is stated for.
const GOAL_SCALE: u32 = 70;
const GOAL_WAL_MB: u64 = 900;

pub struct BackupResult {
    pub scale: u32,
    pub db_bytes: u64,
    pub pgbackrest_version: String,
    pub pitr_backup_secs: f64,
    pub pitr_backup: serde_json::Value,
    pub pgbr_backup_secs: f64,
    pub pgbr_stored: u64,
    pub restores: Vec<RestoreRound>,
    /// pitr's report of its last files-only restore.
    pub pitr_restore_report: serde_json::Value,
    // restore to a chosen second
    pub wal_generated: u64,
    pub gen_secs: f64,
    pub target: String,
    pub archive_wait_secs: f64,
    pub pitr_start_secs: f64,
    pub pitr_start_report: serde_json::Value,
    pub check: String,
}

/// One round of files-only restores.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreRound {
    pub pitr_first: bool,
    pub pitr_secs: f64,
    pub pitr_bytes: u64,
    pub pgbr_secs: f64,
    pub pgbr_bytes: u64,
}

/// pgBackRest's binary, as a full path: run as the server's OS user, a bare name would be
/// looked up in a PATH of root's that user may not read (spawning then fails with "permission
/// denied", which says nothing about a missing install).
fn pgbackrest_bin() -> Result<PathBuf> {
    Some(PathBuf::from("/usr/bin/pgbackrest"))
        .filter(|p| p.is_file())
        .or_else(|| pitr_tests::on_path("pgbackrest"))
        .context("pgBackRest not found (not /usr/bin/pgbackrest, not on PATH): apt-get install -y pgbackrest")
}

/// `pgbackrest --config=<conf> --stanza=bench <args>` as the server's OS user.
fn pgbackrest(conf: &Path, cwd: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(pgbackrest_bin()?);
    cmd.arg(format!("--config={}", conf.display())).arg(format!("--stanza={STANZA}")).args(args).current_dir(cwd);
    as_pg_user(&mut cmd);
    run_ok(&mut cmd, &format!("pgbackrest {}", args.join(" ")))
}

fn json(out: &[u8], what: &str) -> Result<serde_json::Value> {
    serde_json::from_slice(out).with_context(|| format!("{what}: not JSON: {}", String::from_utf8_lossy(out)))
}

impl Bench {
    pub fn backup_phase(&self) -> Result<BackupResult> {
        let o = &self.opts;
        let cluster = start_cluster(&[])?;
        let setup = PitrSetup::new(&cluster, "bench-backup", &o.local_repo())?;
        setup.env.share_with_pg_user()?;
        let stream_log = setup.env.dir.path().join("stream.log");
        let mut stream = setup.spawn_stream(&o.pitr_log, &stream_log)?;
        let env = &setup.env;
        let archive_timeout = Duration::from_secs(o.catchup_timeout_secs);
        let wait_archived = |lsn: u64, what: &str| -> Result<()> {
            wait_until(what, archive_timeout, || Ok(env.archived_end(WAL_SEGMENT_SIZE)? >= lsn))
                .with_context(|| format!("pitr stream log {}:\n{}", stream_log.display(), log_tail(&stream_log, 40)))
        };

        eprintln!("backup: pgbench -i -s {} ...", o.backup_scale);
        cluster.pgbench(&["-i", "-s", &o.backup_scale.to_string(), "-q"])?;
        cluster.psql("checkpoint")?;
        let db_bytes: u64 = cluster.psql("select sum(pg_database_size(oid)) from pg_database")?.parse()?;
        wait_archived(current_lsn(&cluster)?, "pitr's archive to catch up with pgbench -i")?;

        // Full backups: pitr first, then pgBackRest (zst, AES-256-CBC, 2 processes; no WAL
        // archive check: pitr holds the WAL, pgBackRest is measured for data transfer only).
        eprintln!("backup: pitr backup ...");
        let (pitr_backup, pitr_backup_secs) = timed(|| {
            let out = setup.command(&["backup", "--json"]).output().context("running pitr backup")?;
            if !out.status.success() {
                bail!("pitr backup failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
            }
            json(&out.stdout, "pitr backup --json")
        })?;

        let br = scratch_dir("bench-pgbackrest");
        let data_dir = cluster.psql("show data_directory")?;
        let conf = br.path().join("pgbackrest.conf");
        let repo = br.path().join("repo");
        for d in ["repo", "lock", "log", "spool"] {
            std::fs::create_dir_all(br.path().join(d))?;
        }
        std::fs::write(
            &conf,
            format!(
                "[global]\nrepo1-path={}\nrepo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=pitr-bench-cipher-pass\n\
                 compress-type=zst\nprocess-max=2\narchive-check=n\nstart-fast=y\n\
                 lock-path={}\nlog-path={}\nspool-path={}\nlog-level-console=warn\nlog-level-file=detail\n\
                 [{STANZA}]\npg1-path={data_dir}\npg1-port={}\npg1-socket-path={}\npg1-user=postgres\n",
                repo.display(),
                br.path().join("lock").display(),
                br.path().join("log").display(),
                br.path().join("spool").display(),
                cluster.port,
                cluster.socket_dir.display(),
            ),
        )?;
        chown_to_pg_user(br.path())?;
        let pgbackrest_version = Command::new(pgbackrest_bin()?)
            .arg("version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|e| format!("(pgbackrest version: {e})"));
        pgbackrest(&conf, br.path(), &["stanza-create"])?;
        eprintln!("backup: pgbackrest backup --type=full ...");
        let (_, pgbr_backup_secs) = timed(|| pgbackrest(&conf, br.path(), &["backup", "--type=full"]))?;
        let pgbr_stored = dir_bytes(&repo);

        // Restore, files only, into empty directories: each tool once per round, order
        // alternating (the backups are taken once; restores can be repeated).
        let wal_end = current_lsn(&cluster)?;
        wait_archived(wal_end, "pitr's archive to hold the backups' WAL")?;
        let mut restores = Vec::new();
        let mut pitr_restore_report = serde_json::Value::Null;
        for round in 1..=o.rounds {
            let order = if round % 2 == 1 { [true, false] } else { [false, true] };
            let mut row = RestoreRound { pitr_first: order[0], ..RestoreRound::default() };
            for pitr in order {
                let restored = scratch_dir(if pitr { "bench-restore-pitr" } else { "bench-restore-pgbr" });
                let target = restored.path().join("data");
                if pitr {
                    eprintln!("backup: round {round}: pitr restore --to latest (files only) ...");
                    chown_to_pg_user(restored.path())?;
                    let target_arg = target.display().to_string();
                    let (report, secs) = timed(|| {
                        let out =
                            env.run_as_pg_user(&["restore", "--to", "latest", "--target-dir", &target_arg, "--json"])?;
                        if !out.status.success() {
                            bail!("pitr restore failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
                        }
                        json(&out.stdout, "pitr restore --json")
                    })?;
                    pitr_restore_report = report;
                    row.pitr_secs = secs;
                    row.pitr_bytes = dir_bytes(&target);
                } else {
                    eprintln!("backup: round {round}: pgbackrest restore (files only) ...");
                    std::fs::create_dir(&target)?;
                    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
                    chown_to_pg_user(restored.path())?;
                    let pg1 = format!("--pg1-path={}", target.display());
                    let (_, secs) = timed(|| pgbackrest(&conf, br.path(), &["restore", &pg1, "--type=immediate"]))?;
                    row.pgbr_secs = secs;
                    row.pgbr_bytes = dir_bytes(&target);
                }
            }
            restores.push(row);
        }

        // Restore to a chosen second: WAL on top of the backup, a marker and the target time in
        // the middle of it.
        let rows = (o.restore_wal_mb * MD5_ROWS_PER_MB).max(2);
        let half = rows / 2;
        eprintln!(
            "backup: generating ~{} MB of WAL ({rows} inserts of repeat(md5(g::text), 3)), target in the middle ...",
            o.restore_wal_mb
        );
        let lsn0 = current_lsn(&cluster)?;
        let t = Instant::now();
        md5_rows(&cluster, "rgen", 1, half)?;
        cluster
            .psql("create table marker(id int, at timestamptz); insert into marker values (1, clock_timestamp())")?;
        let target_time = cluster.psql("select clock_timestamp()")?;
        // Commits after the target are clearly after it.
        std::thread::sleep(Duration::from_millis(1100));
        md5_rows(&cluster, "rgen", half + 1, rows - half)?;
        let gen_secs = t.elapsed().as_secs_f64();
        let lsn1 = current_lsn(&cluster)?;
        let t = Instant::now();
        wait_archived(lsn1, "pitr's archive to hold the generated WAL")?;
        let archive_wait_secs = t.elapsed().as_secs_f64();
        if let Some(st) = stream.try_wait()? {
            bail!("pitr stream exited ({st}); log {}:\n{}", stream_log.display(), log_tail(&stream_log, 40));
        }
        eprintln!(
            "backup: {:.0} MiB of WAL ({} .. {}) in {gen_secs:.1}s; pitr restore --to '{target_time}' --start ...",
            (lsn1 - lsn0) as f64 / MIB,
            u64_to_lsn(lsn0),
            u64_to_lsn(lsn1)
        );
        let ((server, out), pitr_start_secs) =
            timed(|| env.restore_started(&target_time, cluster.bin_dir(), &["--json"]))?;
        let pitr_start_report = json(&out.stdout, "pitr restore --start --json")?;
        let marker = server.psql("select count(*) from marker")?;
        let split = server.psql(&format!(
            "select count(*) filter (where id <= {half}) || '/' || count(*) filter (where id > {half}) from rgen"
        ))?;
        server.stop("fast");
        drop(server);
        let check = format!("marker rows {marker} (want 1); rows before/after the target {split} (want {half}/0)");
        ensure!(marker == "1" && split == format!("{half}/0"), "restore to {target_time}: {check}");

        // SIGTERM: pitr drains and exits; SIGKILL on drop otherwise.
        let _ = stream.signal(15);
        let _ = stream.wait_timeout(Duration::from_secs(30));
        Ok(BackupResult {
            scale: o.backup_scale,
            db_bytes,
            pgbackrest_version,
            pitr_backup_secs,
            pitr_backup,
            pgbr_backup_secs,
            pgbr_stored,
            restores,
            pitr_restore_report,
            wal_generated: lsn1 - lsn0,
            gen_secs,
            target: target_time,
            archive_wait_secs,
            pitr_start_secs,
            pitr_start_report,
            check,
        })
    }
}

pub fn report(r: &mut String, o: &Opts, b: &BackupResult) -> Vec<Row> {
    let mib = |x: f64| x / MIB;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(r, "\n-- 4. full backup and restore vs pgBackRest, pgbench scale {} --", b.scale);
    let _ = writeln!(
        r,
        "database size (sum of pg_database_size): {:.0} MiB; pitr stream running (local repository) throughout; \
         {}",
        mib(b.db_bytes as f64),
        b.pgbackrest_version
    );
    let _ = writeln!(
        r,
        "pgBackRest: compress-type=zst (level 3), repo1-cipher-type=aes-256-cbc, process-max=2, archive-check=n, \
         start-fast=y; run as the server's OS user"
    );
    let read = f(&b.pitr_backup, "bytes_read");
    let _ = writeln!(
        r,
        "full backup   pitr backup:                      {:7.2} s  {:7.1} MiB/s  stored {:7.1} MiB (bytes_stored; \
         report duration {:.2} s)",
        b.pitr_backup_secs,
        mib(read) / b.pitr_backup_secs,
        mib(f(&b.pitr_backup, "bytes_stored")),
        f(&b.pitr_backup, "duration_seconds")
    );
    let _ = writeln!(
        r,
        "              pgbackrest backup --type=full:    {:7.2} s  {:7.1} MiB/s  stored {:7.1} MiB (repository \
         size)",
        b.pgbr_backup_secs,
        mib(read) / b.pgbr_backup_secs,
        mib(b.pgbr_stored as f64)
    );
    let _ = writeln!(
        r,
        "restore, files only, into an empty directory ({} round(s), order alternating): pitr restore --to latest \
         --target-dir vs pgbackrest restore --type=immediate --pg1-path",
        b.restores.len()
    );
    let _ =
        writeln!(r, "{:>5} {:>6} | {:>8} {:>10} | {:>8} {:>10}", "round", "first", "pitr s", "MiB", "pgbr s", "MiB");
    for (i, x) in b.restores.iter().enumerate() {
        let _ = writeln!(
            r,
            "{:>5} {:>6} | {:>8.2} {:>10.1} | {:>8.2} {:>10.1}",
            i + 1,
            if x.pitr_first { "pitr" } else { "pgbr" },
            x.pitr_secs,
            mib(x.pitr_bytes as f64),
            x.pgbr_secs,
            mib(x.pgbr_bytes as f64)
        );
    }
    let pitr_restore = median(&b.restores.iter().map(|x| x.pitr_secs).collect::<Vec<_>>());
    let pgbr_restore = median(&b.restores.iter().map(|x| x.pgbr_secs).collect::<Vec<_>>());
    let _ = writeln!(
        r,
        "median: pitr {pitr_restore:.2} s, pgBackRest {pgbr_restore:.2} s (pitr's last report: download {:.2} s)",
        f(&b.pitr_restore_report, "download_seconds")
    );
    let _ = writeln!(
        r,
        "to a second   {:.0} MiB of WAL after the backups ({:.1}s to generate, archive caught up {:.1}s later), \
         target '{}' in the middle:",
        mib(b.wal_generated as f64),
        b.gen_secs,
        b.archive_wait_secs,
        b.target
    );
    let s = &b.pitr_start_report;
    let _ = writeln!(
        r,
        "              pitr restore --to TIME --start:   {:7.2} s wall; report: download {:.2} s, replay {:.2} s, \
         total {:.2} s; WAL replayed {:.0} MiB; last replayed commit {}",
        b.pitr_start_secs,
        f(s, "download_seconds"),
        f(s, "replay_seconds"),
        f(s, "total_seconds"),
        mib(f(s, "wal_replayed_bytes")),
        s["last_replayed_commit_time"].as_str().unwrap_or("-")
    );
    let _ = writeln!(r, "              check on the restored server: {}", b.check);

    let at_goal_size = b.scale >= GOAL_SCALE && o.restore_wal_mb >= GOAL_WAL_MB;
    vec![
        Row::new("full backup time (ratio = pgBackRest/pitr)", "s")
            .peer(b.pgbr_backup_secs)
            .pitr(b.pitr_backup_secs)
            .ratio(b.pgbr_backup_secs / b.pitr_backup_secs)
            .goal(Goal::RatioAbove(1.0)),
        Row::new("full backup stored (ratio = pgBackRest/pitr)", "MiB")
            .peer(mib(b.pgbr_stored as f64))
            .pitr(mib(f(&b.pitr_backup, "bytes_stored")))
            .ratio(b.pgbr_stored as f64 / f(&b.pitr_backup, "bytes_stored")),
        Row::new("restore, files only (ratio = pgBackRest/pitr)", "s")
            .peer(pgbr_restore)
            .pitr(pitr_restore)
            .ratio(pgbr_restore / pitr_restore)
            .goal(Goal::RatioAtLeast(1.0)),
        Row::new(
            format!(
                "restore --to TIME --start ({:.0} MiB db + {:.0} MiB WAL)",
                mib(b.db_bytes as f64),
                mib(b.wal_generated as f64)
            ),
            "s",
        )
        .pitr(b.pitr_start_secs)
        .goal(Goal::PitrAtMost(10.0))
        .note(if at_goal_size { "" } else { "goal is for scale 70 + 900 MB" }),
    ]
}
