//! The weekly partial-restore drill (`pitr drill --partial`) against a real PostgreSQL and a real
//! file tree: a table restored as it was at a moment into a fresh database on a scratch server and
//! proved equal, random files of a file set checked against the manifest and the live tree, and
//! silent corruption of a live file (same size, same mtime, other bytes) failing the drill. Also
//! the sidecar's scheduled jobs of file sets and dumps beside PostgreSQL: their metrics.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{wait_until, PgCluster, PgOptions};

/// Files in the set: fewer than the drill's sample of 20, so every one is drawn.
const FILES: usize = 12;

/// A small tree: files of mixed sizes in two directories, one name with glob characters.
fn make_tree(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root.join("docs/2026"))?;
    for i in 0..FILES - 1 {
        let dir = if i % 2 == 0 { root.join("docs") } else { root.join("docs/2026") };
        let body: Vec<u8> = (0..(i * 7919 + 13)).map(|b| (b * 31 + i) as u8).collect();
        std::fs::write(dir.join(format!("file-{i}.bin")), body)?;
    }
    std::fs::write(root.join("report [final]*.txt"), b"quarterly numbers\n")?;
    Ok(())
}

/// Rewrites `path` with other bytes of the same length and puts its mtime back: what silent
/// corruption (a bad disk, a bad copy) looks like from outside.
fn corrupt_keeping_size_and_mtime(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)?;
    let mut bytes = std::fs::read(path)?;
    bytes[0] ^= 0xff;
    std::fs::write(path, &bytes)?;
    let times = [
        libc::timespec { tv_sec: meta.atime(), tv_nsec: meta.atime_nsec() },
        libc::timespec { tv_sec: meta.mtime(), tv_nsec: meta.mtime_nsec() },
    ];
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path and two timespecs, as utimensat(2) takes them.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } != 0 {
        anyhow::bail!("utimensat {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// `pitr drill --partial --json --db-user postgres <extra>` as the server user.
fn partial_drill(env: &PitrEnv, extra: &[&str]) -> Result<(bool, serde_json::Value)> {
    let mut args = vec!["drill", "--partial", "--json", "--db-user", "postgres"];
    args.extend_from_slice(extra);
    env.run_json_as_pg_user(&args)
}

fn check<'a>(report: &'a serde_json::Value, name_starts: &str) -> Vec<&'a serde_json::Value> {
    report["checks"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with(name_starts))).collect())
        .unwrap_or_default()
}

fn no_scratch_left() -> Result<()> {
    for entry in std::fs::read_dir(std::env::temp_dir())? {
        let name = entry?.file_name().to_string_lossy().to_string();
        assert!(
            !(name.starts_with("pitr-table-") || name.starts_with("pitr-partial-drill-")),
            "a partial drill left {name} in {}",
            std::env::temp_dir().display()
        );
    }
    Ok(())
}

#[test]
fn pg15_partial_drill_restores_a_table_at_a_moment_and_files_and_catches_silent_corruption() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("partial-drill", &cluster, "")?;
    let tree = env.dir.path().join("uploads");
    make_tree(&tree)?;
    let mut config = std::fs::read_to_string(&env.config)?;
    config.push_str(&format!(
        "[[files]]\nname = \"uploads\"\npath = {:?}\nfull = \"\"\nincremental = \"\"\n",
        tree.display().to_string()
    ));
    std::fs::write(&env.config, config)?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    cluster.psql("create table orders(id int primary key, item text, qty int)")?;
    cluster.psql("insert into orders select g, 'item ' || g, g % 7 from generate_series(1, 300) g")?;
    env.run_ok(&["backup"])?;
    cluster.psql("update orders set qty = qty + 100 where id <= 50")?;
    cluster.psql("delete from orders where id > 280")?;
    std::thread::sleep(Duration::from_millis(1100));
    let moment = cluster.psql("select clock_timestamp()")?;
    let at_moment = cluster.psql("select count(*) || ':' || sum(qty) from orders")?;
    std::thread::sleep(Duration::from_millis(1100));
    // After the moment: rows the drill must not see, and a column it must not see either.
    cluster.psql("insert into orders select g, 'late ' || g, 1 from generate_series(1000, 1099) g")?;
    cluster.psql("alter table orders add column note text default 'after'")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the changes")?;
    env.run_ok(&["backup", "--source", "files", "--set", "uploads"])?;
    env.share_with_pg_user()?;

    let report_md = env.dir.path().join("weekly.md");
    let report_arg = report_md.display().to_string();
    let (ok, report) = partial_drill(&env, &["--to", &moment, "--report", &report_arg])?;
    assert!(ok, "the partial drill did not pass: {report:#}");
    assert_eq!(report["outcome"], "PASS", "{report:#}");
    assert_eq!(report["source"], "partial", "{report:#}");
    assert_eq!(report["data_integrity"], "PASS", "{report:#}");
    let scenario = report["scenario"].as_str().unwrap_or_default();
    assert!(
        scenario.starts_with("Weekly partial restore: table postgres.public.orders")
            && scenario.contains("file set uploads"),
        "{scenario}"
    );
    // The table as it was at the moment: its rows, not the later ones.
    let table = &report["restore"]["table"];
    let (rows, _) = at_moment.split_once(':').context("count:sum")?;
    assert_eq!(table["original"]["rows"].to_string(), rows, "{report:#}");
    assert_eq!(table["original"], table["copy"], "{report:#}");
    assert_eq!(table["copied_rows"].to_string(), rows, "{report:#}");
    for name in ["table: postgres.public.orders row count", "table: postgres.public.orders md5 fingerprint"] {
        let c = check(&report, name);
        assert_eq!(c.len(), 1, "no check {name:?}: {report:#}");
        assert_eq!(c[0]["result"], "pass", "{report:#}");
    }
    // Every file of the set was drawn and came back equal to the manifest and the live tree.
    let files = &report["restore"]["files"];
    assert_eq!(files["sampled"].as_array().map(Vec::len), Some(FILES), "{report:#}");
    assert!(files["sampled"].as_array().into_iter().flatten().all(|f| f["live"] == "equal"), "{report:#}");
    assert_eq!(check(&report, "files: 12 random files of set uploads restored")[0]["result"], "pass", "{report:#}");
    assert_eq!(check(&report, "files: unchanged live files of set uploads")[0]["result"], "pass", "{report:#}");
    let md = std::fs::read_to_string(&report_md)?;
    for field in [
        "# Recovery Test Report",
        "**Test Type**: Weekly (on demand)",
        "**Scenario**: Weekly partial restore: table postgres.public.orders",
        "**Outcome**: PASS",
        "**Data Integrity**: PASS",
        "**RTO Achieved**: ",
        "**RPO Achieved**: ",
        "table: postgres.public.orders md5 fingerprint — **PASS**",
    ] {
        assert!(md.contains(field), "the report lacks {field:?}:\n{md}");
    }
    // Production was not written: no drill database, no copy of the table, the table as it is.
    assert_eq!(cluster.psql("select count(*) from pg_database where datname like 'pitr_drill%'")?, "0");
    assert_eq!(cluster.psql("select count(*) from pg_class where relname like 'orders_at_%'")?, "0");
    assert_eq!(cluster.psql("select count(*) from orders")?, (rows.parse::<u64>()? + 100).to_string());
    no_scratch_left()?;

    // Silent corruption of a live file: same size, same mtime, other bytes. The drill fails and
    // names it.
    let victim = tree.join("docs/2026/file-3.bin");
    corrupt_keeping_size_and_mtime(&victim)?;
    let (ok, report) = partial_drill(&env, &[])?;
    assert!(!ok, "the drill passed over a corrupt live file: {report:#}");
    assert_eq!(report["outcome"], "FAIL", "{report:#}");
    assert_eq!(report["data_integrity"], "FAIL", "{report:#}");
    let live = check(&report, "files: unchanged live files of set uploads");
    assert_eq!(live[0]["result"], "fail", "{report:#}");
    let issues = report["issues"].to_string();
    assert!(issues.contains("docs/2026/file-3.bin") && issues.contains("silent corruption"), "{report:#}");
    // The table part (a random second this time) still passed and says so.
    assert!(check(&report, "table: postgres.public.orders").iter().all(|c| c["result"] == "pass"), "{report:#}");
    no_scratch_left()?;
    Ok(())
}

/// Series → value from the sidecar's /metrics (no parsing beyond what the assertions need).
fn scrape(env: &PitrEnv) -> Result<std::collections::BTreeMap<String, f64>> {
    let (code, body) = env.http_get("/metrics")?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(s, v)| Some((s.to_string(), v.parse().ok()?))))
        .collect())
}

fn value(m: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(f64::NAN)
}

#[test]
fn pg15_sidecar_runs_file_set_and_dump_jobs_beside_postgres_without_waiting_for_the_stream() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.psql("create table t(x int)")?;
    // The stream waits for a server that is down at start-up rather than exiting.
    let mut env = PitrEnv::new("set-jobs-pg", &cluster, "startup_timeout = \"300s\"")?;
    let tree = env.dir.path().join("uploads");
    make_tree(&tree)?;
    let mut config = std::fs::read_to_string(&env.config)?;
    config.push_str(&format!(
        "[[files]]\nname = \"uploads\"\npath = {:?}\nfull = \"*/4 * * * * *\"\nincremental = \"*/3 * * * * *\"\n\
         [[dumps]]\nname = \"devdb\"\nconninfo = {:?}\nschedule = \"*/5 * * * * *\"\ntime_zone = \"UTC\"\n",
        tree.display().to_string(),
        cluster.conninfo("postgres"),
    ));
    std::fs::write(&env.config, config)?;
    env.init()?;
    // The server goes away before the sidecar starts: PostgreSQL's jobs wait for the stream's
    // first connection, the file set's and the dump's jobs must not (the dump then fails, and
    // says so).
    cluster.stop("fast")?;
    let _stream = env.spawn_stream()?;
    wait_until("/metrics to answer", Duration::from_secs(30), || Ok(scrape(&env).is_ok()))
        .with_context(|| env.stream_logs())?;
    wait_until("scheduled backups of the file set", Duration::from_secs(60), || {
        let m = scrape(&env)?;
        Ok(value(&m, r#"backup_success{backup_type="full",source="files",set="uploads"}"#) == 1.0
            && value(&m, r#"backup_success{backup_type="incremental",source="files",set="uploads"}"#) == 1.0
            && value(&m, r#"pitr_scheduled_runs_total{job="files_incremental",set="uploads",result="success"}"#) >= 2.0)
    })
    .with_context(|| env.stream_logs())?;
    wait_until("the dump to fail while the server is down", Duration::from_secs(60), || {
        Ok(value(&scrape(&env)?, r#"backup_success{backup_type="full",source="dump",set="devdb"}"#) == 0.0)
    })
    .with_context(|| env.stream_logs())?;
    cluster.start_again()?;
    wait_until("a scheduled dump", Duration::from_secs(60), || {
        Ok(value(&scrape(&env)?, r#"backup_success{backup_type="full",source="dump",set="devdb"}"#) == 1.0)
    })
    .with_context(|| env.stream_logs())?;
    let m = scrape(&env)?;
    for (series, expected) in [
        (r#"pitr_backup_expected_interval_seconds{source="files",set="uploads",backup_type="full"}"#, 4.0),
        (r#"pitr_backup_expected_interval_seconds{source="files",set="uploads",backup_type="incremental"}"#, 3.0),
        (r#"pitr_backup_expected_interval_seconds{source="dump",set="devdb",backup_type="full"}"#, 5.0),
    ] {
        assert_eq!(value(&m, series), expected, "{series} in {m:#?}");
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let last = value(&m, r#"pitr_last_backup_timestamp_seconds{backup_type="full",source="files",set="uploads"}"#);
    assert!((now - last).abs() < 60.0, "last file-set backup at {last}, now {now}");
    assert!(value(&m, r#"backup_size_bytes{backup_type="full",source="files",set="uploads"}"#) > 300_000.0, "{m:#?}");
    let manifests = |dir: &str| -> Result<usize> {
        Ok(std::fs::read_dir(env.repo_path().join(dir))?
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".manifest")))
            .count())
    };
    assert!(manifests("files/sets/uploads")? >= 3, "backups of the file set in the repository");
    assert!(manifests("files/dumps/devdb")? >= 1, "dumps in the repository");
    // PostgreSQL's own jobs are off here; the stream is up again.
    wait_until("/healthz to be 200", Duration::from_secs(60), || Ok(env.http_get("/healthz")?.0 == 200))
        .with_context(|| env.stream_logs())?;
    Ok(())
}

/// A sidecar of file sets alone (no `[postgres]`, no `[mongo]`): its own config, repository and
/// metrics port.
struct SetsOnly {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    port: u16,
    runs: usize,
}

impl SetsOnly {
    fn new(tree: &Path, full: &str, verify: &str, partial: &str) -> Result<SetsOnly> {
        let dir = pitr_tests::scratch_dir("sets-only");
        let port = pitr_tests::free_port()?;
        let config = dir.path().join("pitr.toml");
        let s = SetsOnly { dir, config, port, runs: 0 };
        s.write_config(tree, full, verify, partial)?;
        Ok(s)
    }

    fn write_config(&self, tree: &Path, full: &str, verify: &str, partial: &str) -> Result<()> {
        let p = self.dir.path();
        std::fs::write(
            &self.config,
            format!(
                "[repository]\npath = {:?}\n[encryption]\nkey_file = {:?}\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\
                 [schedule]\nverify = {verify:?}\npartial_drill = {partial:?}\n\
                 [[files]]\nname = \"uploads\"\npath = {:?}\nfull = {full:?}\nincremental = \"\"\n",
                p.join("repo").display().to_string(),
                p.join("key").display().to_string(),
                self.port,
                tree.display().to_string(),
            ),
        )?;
        Ok(())
    }

    fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out =
            std::process::Command::new(pitr_tests::pitr_bin()).arg("--config").arg(&self.config).args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "pitr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn spawn(&mut self) -> Result<(pitr_tests::Child, std::path::PathBuf)> {
        self.runs += 1;
        let log = self.dir.path().join(format!("stream-{}.log", self.runs));
        let mut cmd = std::process::Command::new(pitr_tests::pitr_bin());
        cmd.arg("--config").arg(&self.config).args(["--log-format", "json", "stream"]).env("PITR_LOG", "info");
        Ok((pitr_tests::spawn_logged(cmd, &log)?, log))
    }

    fn get(&self, path: &str) -> Result<(u16, String)> {
        let reply = pitr_tests::http_request(self.port, "GET", path, &[], b"")?;
        Ok((reply.status, reply.text()))
    }

    fn scrape(&self) -> Result<std::collections::BTreeMap<String, f64>> {
        let (code, body) = self.get("/metrics")?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(s, v)| Some((s.to_string(), v.parse().ok()?))))
            .collect())
    }

    /// A rewrite from userland moves the file's ctime, which `verify --live` calls a change
    /// (`cp -p`, `rsync -t`), not corruption; a bad disk moves none. The newest backup's entry
    /// for `rel` is given `file`'s present ctime, as if its content had changed under unchanged
    /// stamps.
    fn as_if_the_disk_did_it(&self, rel: &str, file: &Path) -> Result<()> {
        use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta, Repository};
        let p = self.dir.path();
        let repo =
            Repository::new(std::sync::Arc::new(LocalStore::new(p.join("repo"))), KeyRing::load(&p.join("key"))?);
        let newest = std::fs::read_dir(p.join("repo/files/sets/uploads"))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".manifest"))
            .max()
            .context("no manifest")?;
        let name = format!("files/sets/uploads/{newest}");
        let meta = std::fs::symlink_metadata(file)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let (_, json) = repo.get_opened(&name).await?;
            let mut m: serde_json::Value = serde_json::from_slice(&json)?;
            let entry = m["entries"]
                .as_array_mut()
                .and_then(|es| es.iter_mut().find(|e| e["path"] == rel))
                .context("no such entry")?;
            entry["ctime"] = meta.ctime().into();
            entry["ctime_nsec"] = meta.ctime_nsec().into();
            repo.delete(&name).await?;
            repo.put_sealed(&name, serde_json::to_vec(&m)?, ObjectMeta::plain(ObjectKind::Meta)).await?;
            anyhow::Ok(())
        })
    }

    fn manifests(&self) -> Result<usize> {
        Ok(std::fs::read_dir(self.dir.path().join("repo/files/sets/uploads"))?
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".manifest")))
            .count())
    }
}

#[test]
fn a_sidecar_of_file_sets_alone_backs_up_on_schedule_and_its_verification_finds_silent_corruption() -> Result<()> {
    let tree_dir = pitr_tests::scratch_dir("sets-only-tree");
    let tree = tree_dir.path().join("uploads");
    make_tree(&tree)?;
    let mut sidecar = SetsOnly::new(&tree, "*/3 * * * * *", "", "*/5 * * * * *")?;
    sidecar.run_ok(&["init"])?;
    let (mut stream, log) = sidecar.spawn()?;
    let logs = |log: &Path| std::fs::read_to_string(log).unwrap_or_default();
    wait_until("/metrics to answer", Duration::from_secs(30), || Ok(sidecar.scrape().is_ok()))
        .with_context(|| logs(&log))?;
    const FULL_OK: &str = r#"backup_success{backup_type="full",source="files",set="uploads"}"#;
    wait_until("three scheduled backups", Duration::from_secs(60), || {
        let m = sidecar.scrape()?;
        Ok(value(&m, FULL_OK) == 1.0
            && value(&m, r#"pitr_scheduled_runs_total{job="files_full",set="uploads",result="success"}"#) >= 3.0)
    })
    .with_context(|| logs(&log))?;
    assert!(sidecar.manifests()? >= 3);
    wait_until("a scheduled partial drill that passes", Duration::from_secs(60), || {
        Ok(value(&sidecar.scrape()?, r#"pitr_drill_success{drill="partial"}"#) == 1.0)
    })
    .with_context(|| logs(&log))?;
    let m = sidecar.scrape()?;
    assert_eq!(
        value(&m, r#"pitr_backup_expected_interval_seconds{source="files",set="uploads",backup_type="full"}"#),
        3.0
    );
    assert_eq!(value(&m, "pitr_up"), 1.0);
    // Nothing of a database: no stream to judge, so /healthz says what it is.
    assert!(!m.keys().any(|k| k.starts_with("pitr_stream_connected")), "{m:#?}");
    let (code, body) = sidecar.get("/healthz")?;
    assert_eq!((code, body.trim()), (200, "ok: no database stream in this sidecar (file sets and dumps only)"));
    // The first run was the start-up catch-up (the set had no backup).
    let first = logs(&log)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["job"] == "files_full")
        .map(|v| v["fields"]["event"].clone());
    assert_eq!(first, Some(serde_json::json!("catch-up")), "{}", logs(&log));
    stream.signal(libc::SIGTERM)?;
    let status = stream.wait_timeout(Duration::from_secs(30))?.context("pitr stream did not stop on SIGTERM")?;
    assert!(status.success(), "{status}: {}", logs(&log));

    // Silent corruption of a live file after its backup; the sidecar comes back with full
    // backups due only on January 1st (so none runs: the newest is seconds old) and verification
    // every 2 seconds.
    let backups = sidecar.manifests()?;
    corrupt_keeping_size_and_mtime(&tree.join("docs/file-4.bin"))?;
    sidecar.as_if_the_disk_did_it("docs/file-4.bin", &tree.join("docs/file-4.bin"))?;
    sidecar.write_config(&tree, "0 0 0 1 1 *", "*/2 * * * * *", "*/3 * * * * *")?;
    let (_stream, log) = sidecar.spawn()?;
    wait_until("/metrics to answer", Duration::from_secs(30), || Ok(sidecar.scrape().is_ok()))
        .with_context(|| logs(&log))?;
    wait_until("the scheduled verification to count the corrupt file", Duration::from_secs(60), || {
        Ok(value(&sidecar.scrape()?, r#"pitr_files_verify_mismatches{set="uploads"}"#) == 1.0)
    })
    .with_context(|| logs(&log))?;
    let m = sidecar.scrape()?;
    assert_eq!(value(&m, r#"pitr_files_missing_objects{source="files",set="uploads"}"#), 0.0, "{m:#?}");
    assert!(value(&m, r#"pitr_scheduled_runs_total{job="files_verify",result="failure"}"#) >= 1.0, "{m:#?}");
    assert!(logs(&log).contains("docs/file-4.bin"), "the log does not name the corrupt file: {}", logs(&log));
    // The newest backup's time comes from the repository after the restart, before any run.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let last = value(&m, r#"pitr_last_backup_timestamp_seconds{backup_type="full",source="files",set="uploads"}"#);
    assert!(now - last < 120.0, "newest backup at {last}, now {now}: {m:#?}");
    assert!(
        value(&m, r#"pitr_backup_expected_interval_seconds{source="files",set="uploads",backup_type="full"}"#)
            > 300.0 * 86_400.0
    );
    assert_eq!(sidecar.manifests()?, backups, "a backup ran although none was due");
    // The scheduled partial drill (files only here) restores the set's files and fails on the
    // corrupt one, under its own label.
    wait_until("a scheduled partial drill", Duration::from_secs(60), || {
        Ok(value(&sidecar.scrape()?, r#"pitr_scheduled_runs_total{job="partial_drill",result="failure"}"#) >= 1.0)
    })
    .with_context(|| logs(&log))?;
    let m = sidecar.scrape()?;
    assert_eq!(value(&m, r#"pitr_drill_success{drill="partial"}"#), 0.0, "{m:#?}");
    assert!(value(&m, r#"pitr_drill_rto_seconds{drill="partial"}"#) > 0.0, "{m:#?}");
    assert!(!m.contains_key("pitr_drill_success"), "the monthly drill's series appeared: {m:#?}");
    Ok(())
}
