//! Two `pitr stream` sidecars started on one cluster by mistake (the same slot name on "two
//! hosts": different `lease_holder`s, one repository), with a short `lease_ttl`:
//!
//! - while A streams, B refuses to start and names A;
//! - A is paused (SIGSTOP) past the TTL; B watches the expired lease for a whole TTL, takes it
//!   over and streams; WAL is generated, some of it sent to the paused A's socket;
//! - B stops cleanly; A is resumed (SIGCONT) with WAL to put: it writes nothing at all into the
//!   repository (every file compared, the lease included) and exits non-zero saying it lost the
//!   lease to B;
//! - the archive is byte-identical to the server's WAL across the handover.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use pitr_tests::checks::{differences, snapshot, Snapshot};
use pitr_tests::pitr::{segment_number, PitrEnv, WAL_SEGMENT_SIZE};
use pitr_tests::{pitr_bin, spawn_logged, wait_until, Child, PgCluster, PgOptions};

const TTL_SECS: u64 = 4;

/// The repository without the sidecars' pools of recycled files (`.tmp.recycle/<pid>.*`, removed
/// by a sidecar as it exits: not objects).
fn objects(repo: &Path) -> Snapshot {
    let mut snap = snapshot(repo);
    snap.retain(|path, _| !path.starts_with(".tmp.recycle"));
    snap
}

/// Fails naming every object created, removed or changed since `before`.
fn assert_same_objects(repo: &Path, before: &Snapshot, what: &str) -> Result<()> {
    let diffs = differences(before, &objects(repo));
    ensure!(diffs.is_empty(), "{what} touched the repository:\n  {}", diffs.join("\n  "));
    Ok(())
}

fn spawn_b(env: &PitrEnv, config: &Path, log: &Path) -> Result<Child> {
    let mut cmd = std::process::Command::new(pitr_bin());
    cmd.arg("--config").arg(config).arg("stream").env("PITR_LOG", "info,pitr_walstream=debug");
    spawn_logged(cmd, log).with_context(|| format!("starting the second sidecar of {}", env.dir.path().display()))
}

/// Walsenders of the sidecars: all of them, or only those streaming (a sidecar connects, and so
/// has a walsender, before it asks for the lease).
fn sidecar_walsenders(cluster: &PgCluster, streaming: bool) -> Result<String> {
    let state = if streaming { " and state = 'streaming'" } else { "" };
    cluster.psql(&format!("select count(*) from pg_stat_replication where application_name = 'pitr_main'{state}"))
}

fn write_rows(cluster: &PgCluster, from: u32, n: u32) -> Result<()> {
    cluster.psql(&format!(
        "insert into handover select g, repeat(md5(g::text), 20) from generate_series({from}, {}) g",
        from + n - 1
    ))?;
    Ok(())
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Every complete segment from the first archived one up to (not including) the server's
/// current one: held by the archive without a gap, and `pitr wal-fetch` of it equal to the
/// server's own file. Returns how many were compared.
fn compare_with_server(env: &PitrEnv, cluster: &PgCluster) -> Result<usize> {
    let archived = env.archived_objects()?;
    let first = archived.keys().next().context("the archive is empty")?.clone();
    let current = cluster.psql("select pg_walfile_name(pg_current_wal_lsn())")?;
    let tli = &first[..8];
    let (a, b) = (segment_number(&first, WAL_SEGMENT_SIZE), segment_number(&current, WAL_SEGMENT_SIZE));
    let mut compared = 0;
    for segno in a..b {
        let name = format!("{tli}{:08X}{:08X}", segno / 256, segno % 256);
        ensure!(archived.contains_key(&name), "gap: segment {name} is missing from the archive");
        let expected = std::fs::read(cluster.wal_dir().join(&name))
            .with_context(|| format!("reading {name} from the server's pg_wal"))?;
        let got = env.wal_fetch(&name)?;
        if expected != got {
            let first_diff = expected.iter().zip(&got).position(|(x, y)| x != y);
            bail!(
                "segment {name} differs from the server's (first difference at byte {first_diff:?}, lengths {} and {})",
                expected.len(),
                got.len()
            );
        }
        compared += 1;
    }
    Ok(compared)
}

#[test]
fn pg15_a_paused_sidecar_taken_over_writes_nothing_after_it_resumes() -> Result<()> {
    let mut opts = PgOptions::new(15);
    // The paused sidecar's walsender goes soon, so the slot is free for the one taking over;
    // the server keeps every segment for the comparison at the end.
    opts.extra_conf.push("wal_sender_timeout = '3s'".into());
    opts.extra_conf.push("wal_keep_size = '1GB'".into());
    opts.extra_conf.push("max_wal_size = '1GB'".into());
    let cluster = PgCluster::start(opts)?;
    let stream_extra = format!("lease_ttl = \"{TTL_SECS}s\"\nlease_holder = \"host-a/pitr_main\"");
    let mut env = PitrEnv::new("lease-handover", &cluster, &stream_extra)?;
    env.init()?;
    let config_b = env.other_host_config()?;

    let mut a = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table handover(id int, pad text)")?;
    write_rows(&cluster, 1, 20_000)?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "A to archive the first rows")?;

    // B, on "another host", refuses while A's lease is live, and says who holds it.
    let refused_log = env.dir.path().join("stream-b-refused.log");
    let mut refused = spawn_b(&env, &config_b, &refused_log)?;
    let status = refused.wait_timeout(Duration::from_secs(60))?.context("B did not stop beside a live lease")?;
    let text = log_of(&refused_log);
    ensure!(!status.success(), "B started beside A's live lease:\n{text}");
    ensure!(
        text.contains("is being written by host-a/pitr_main") && text.contains("refusing to write beside it"),
        "B's refusal does not name A's lease:\n{text}"
    );
    ensure!(a.is_running(), "A stopped when B was refused\n{}", env.stream_logs());

    // A is paused with nothing left to put; WAL written meanwhile reaches its socket only.
    env.wait_archived(cluster.current_lsn()?, "A to be caught up before the pause")?;
    a.signal(libc::SIGSTOP)?;
    let paused = Instant::now();
    write_rows(&cluster, 20_001, 2_000)?;
    wait_until("the paused sidecar's walsender to time out", Duration::from_secs(60), || {
        Ok(sidecar_walsenders(&cluster, false)? == "0")
    })?;

    // Past A's TTL by every clock here (B would still refuse before it, as above).
    std::thread::sleep(Duration::from_secs(TTL_SECS + 1).saturating_sub(paused.elapsed()));
    // A sidecar stopped while it watches the expired lease stops at once and writes nothing.
    let watching_log = env.dir.path().join("stream-b-stopped-watching.log");
    let before_watch = objects(&env.repo);
    let mut watching = spawn_b(&env, &config_b, &watching_log)?;
    wait_until("B to watch the expired lease", Duration::from_secs(30), || {
        Ok(log_of(&watching_log).contains("taking it over if it is not renewed meanwhile"))
    })?;
    watching.signal(libc::SIGTERM)?;
    let status = watching.wait_timeout(Duration::from_secs(2))?.context("B ignored SIGTERM while watching")?;
    ensure!(status.success(), "B stopped while watching exited with {status}:\n{}", log_of(&watching_log));
    assert_same_objects(&env.repo, &before_watch, "a sidecar stopped while it watched the lease")?;

    // B takes over, but only after watching the expired lease for a whole TTL.
    let b_log = env.dir.path().join("stream-b.log");
    let mut b = spawn_b(&env, &config_b, &b_log)?;
    wait_until("B to stream", Duration::from_secs(60), || Ok(sidecar_walsenders(&cluster, true)? == "1"))
        .with_context(|| log_of(&b_log))?;
    ensure!(
        paused.elapsed() >= Duration::from_secs(2 * TTL_SECS),
        "B streamed {:?} after A's pause, before A's lease expired and was watched for a TTL",
        paused.elapsed()
    );
    ensure!(
        log_of(&b_log).contains("taking it over if it is not renewed meanwhile"),
        "B did not watch the expired lease:\n{}",
        log_of(&b_log)
    );
    for i in 0..3 {
        write_rows(&cluster, 30_000 + i * 20_000, 20_000)?;
        cluster.psql("select pg_switch_wal()")?;
    }
    write_rows(&cluster, 100_000, 1_000)?;
    let end = cluster.current_lsn()?;
    wait_until("B to archive the rows written after the takeover", Duration::from_secs(60), || {
        Ok(env.archived_end(WAL_SEGMENT_SIZE)? >= end)
    })
    .with_context(|| log_of(&b_log))?;
    env.stop_stream(&mut b).with_context(|| log_of(&b_log))?;

    // A resumes with WAL in its socket and its buffers: it must find its lease gone before any
    // write, and stop.
    let before = objects(&env.repo);
    a.signal(libc::SIGCONT)?;
    let status = a.wait_timeout(Duration::from_secs(60))?.context("A kept running after it was taken over")?;
    let a_log = env.stream_logs();
    ensure!(!status.success(), "A exited 0 after losing its lease:\n{a_log}");
    ensure!(
        a_log.contains("lost the lease of cluster") && a_log.contains("to host-b/pitr_main"),
        "A's exit does not say it lost the lease to B:\n{a_log}"
    );
    assert_same_objects(&env.repo, &before, "the resumed sidecar A")?;

    // Nothing interleaved: the archive holds the server's WAL exactly, across the handover.
    let compared = compare_with_server(&env, &cluster)?;
    ensure!(compared >= 4, "only {compared} segments compared");
    env.run_ok(&["verify"])?;
    Ok(())
}

/// Creates `name` in the lease directory with bytes that are no lease; false if the name exists
/// (never replaces a generation the sidecar wrote).
fn plant_junk(lease_dir: &Path, name: &str) -> Result<bool> {
    use std::io::Write;
    match std::fs::OpenOptions::new().write(true).create_new(true).open(lease_dir.join(name)) {
        Ok(mut f) => {
            f.write_all(b"not a lease")?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("planting {name} in {}", lease_dir.display())),
    }
}

/// An object under a lease name that does not open (planted, or sealed with another key) is
/// nobody's lease: the running sidecar keeps renewing past it and archiving, and a restart takes
/// the lease as usual.
#[test]
fn pg15_a_junk_lease_object_stops_neither_the_sidecar_nor_its_restart() -> Result<()> {
    let mut opts = PgOptions::new(15);
    // The server keeps every segment for the comparison at the end.
    opts.extra_conf.push("wal_keep_size = '1GB'".into());
    let cluster = PgCluster::start(opts)?;
    let stream_extra = format!("lease_ttl = \"{TTL_SECS}s\"\nlease_holder = \"host-a/pitr_main\"");
    let mut env = PitrEnv::new("lease-junk", &cluster, &stream_extra)?;
    env.init()?;
    let mut a = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table handover(id int, pad text)")?;
    write_rows(&cluster, 1, 2_000)?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "the first rows to be archived")?;

    // The highest generation number there is, and the next few after the sidecar's own.
    let lease_dir = env.wal_dir()?.parent().context("no cluster directory")?.join("lease");
    ensure!(plant_junk(&lease_dir, "FFFFFFFFFFFFFFFF")?, "FFFFFFFFFFFFFFFF exists already");
    let newest = std::fs::read_dir(&lease_dir)?
        .flatten()
        .filter_map(|e| u64::from_str_radix(&e.file_name().to_string_lossy(), 16).ok())
        .filter(|g| *g != u64::MAX)
        .max()
        .context("no lease generation")?;
    let mut planted = 0;
    for g in newest + 1..newest + 4 {
        planted += usize::from(plant_junk(&lease_dir, &format!("{g:016X}"))?);
    }
    ensure!(planted > 0, "every generation after {newest:016X} was taken before it could be planted");

    // Several renewals later the sidecar still archives.
    std::thread::sleep(Duration::from_secs(2 * TTL_SECS));
    write_rows(&cluster, 2_001, 2_000)?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "rows written after the junk was planted to be archived")?;
    ensure!(a.is_running(), "the sidecar stopped over a junk lease object\n{}", env.stream_logs());
    let log = log_of(&env.dir.path().join("stream-1.log"));
    ensure!(
        log.contains("does not open") && log.contains("lease/FFFFFFFFFFFFFFFF"),
        "no warning names the junk lease object:\n{}",
        env.stream_logs()
    );
    env.stop_stream(&mut a)?;

    // A restart takes the lease at once (it was released) and streams on.
    let started = Instant::now();
    let mut again = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    ensure!(started.elapsed() < Duration::from_secs(2 * TTL_SECS), "the restart waited {:?}", started.elapsed());
    write_rows(&cluster, 4_001, 2_000)?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "rows written after the restart to be archived")?;
    env.stop_stream(&mut again)?;
    let compared = compare_with_server(&env, &cluster)?;
    // The segments written after the junk was planted and after the restart.
    ensure!(compared >= 2, "only {compared} segments compared");
    Ok(())
}
