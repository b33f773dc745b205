//! Tests of the test harness itself (pitr-tests/src/lib.rs).

use std::process::Command;
use std::time::Duration;

use pitr_tests::{lsn_to_u64, parse_lsn, spawn_logged, u64_to_lsn, wait_until, PgCluster, PgOptions};

/// Create, insert, read back through `client()`, stop fast, start again,
/// and check the data survived.
async fn roundtrip(major: u32) -> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::new(major))?;
    let version = pg.psql("SHOW server_version_num")?;
    assert!(version.starts_with(&major.to_string()), "expected PostgreSQL {major}, server says {version}");
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text)")?;
    pg.psql("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g")?;
    {
        let client = pg.client().await?;
        let row = client.query_one("SELECT count(*), max(v) FROM t WHERE id <= $1", &[&50i32]).await?;
        assert_eq!(row.get::<_, i64>(0), 50);
        assert_eq!(row.get::<_, String>(1), "row 9");
    }
    let wal_files = std::fs::read_dir(pg.wal_dir())?.count();
    assert!(wal_files > 0, "no files in {}", pg.wal_dir().display());

    pg.stop("fast")?;
    assert!(pg.psql("SELECT 1").is_err(), "server still answers after stop");
    pg.start_again()?;
    assert_eq!(pg.psql("SELECT count(*) FROM t")?, "100", "{}", pg.log_tail());
    let client = pg.client().await?;
    let n: i64 = client.query_one("SELECT sum(id) FROM t", &[]).await?.get(0);
    assert_eq!(n, 5050);
    drop(client);

    pg.restart("immediate")?;
    assert_eq!(pg.psql("SELECT count(*) FROM t")?, "100");
    assert!(pg.log_tail().contains("database system is ready"));
    Ok(())
}

#[tokio::test]
async fn pg15_roundtrip() -> anyhow::Result<()> {
    roundtrip(15).await
}

#[tokio::test]
async fn pg17_roundtrip() -> anyhow::Result<()> {
    roundtrip(17).await
}

#[test]
fn pgbench_on_17() -> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::new(17))?;
    pg.pgbench(&["-i", "-s", "1", "-q"])?;
    assert_eq!(pg.psql("SELECT count(*) FROM pgbench_accounts")?, "100000");
    let before = lsn_to_u64(&pg.psql("SELECT pg_current_wal_lsn()")?);
    let out = pg.pgbench(&["-T", "2", "-c", "2"])?;
    assert!(out.contains("tps"), "unexpected pgbench output: {out}");
    let after = lsn_to_u64(&pg.psql("SELECT pg_current_wal_lsn()")?);
    assert!(after > before, "no WAL written by pgbench");
    Ok(())
}

#[test]
fn extra_conf_and_hba_are_applied() -> anyhow::Result<()> {
    let mut opts = PgOptions::new(15);
    opts.extra_conf.push("wal_sender_timeout = '7s'".into());
    opts.hba.push("host all nobody_here 127.0.0.1/32 reject".into());
    let pg = PgCluster::start(opts)?;
    assert_eq!(pg.psql("SHOW wal_sender_timeout")?, "7s");
    assert_eq!(pg.psql("SHOW wal_level")?, "replica");
    assert_eq!(pg.psql("SHOW fsync")?, "on");
    let first = pg.psql("SELECT user_name FROM pg_hba_file_rules ORDER BY line_number LIMIT 1")?;
    assert_eq!(first, "{nobody_here}");
    Ok(())
}

#[test]
fn psql_errors_carry_stderr() -> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::new(15))?;
    let err = pg.psql("SELECT * FROM no_such_table").unwrap_err();
    assert!(format!("{err:#}").contains("no_such_table"), "{err:#}");
    Ok(())
}

#[test]
fn lsn_helpers_round_trip() {
    assert_eq!(lsn_to_u64("16/B374D848"), 0x16_B374_D848);
    assert_eq!(u64_to_lsn(0x16_B374_D848), "16/B374D848");
    assert_eq!(u64_to_lsn(0), "0/0");
    assert_eq!(lsn_to_u64("0/0"), 0);
    assert_eq!(lsn_to_u64("0/0100000A"), 0x100_000A); // zero-padded (PG 19+ style)
    for v in [1u64, 0xFFFF_FFFF, 0x1_0000_0000, u64::MAX, 0x0123_4567_89AB_CDEF] {
        assert_eq!(lsn_to_u64(&u64_to_lsn(v)), v);
    }
    assert!(parse_lsn("nonsense").is_err());
    assert!(parse_lsn("1/2/3").is_err());
}

#[test]
fn child_guard_and_wait_until() -> anyhow::Result<()> {
    let dir = pitr_tests::scratch_dir("child");
    let log = dir.path().join("logs/sleep.log");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo started; echo oops >&2; exec sleep 30"]);
    let mut child = spawn_logged(cmd, &log)?;
    wait_until("child output", Duration::from_secs(10), || Ok(std::fs::read_to_string(&log)?.contains("oops")))?;
    assert!(std::fs::read_to_string(&log)?.contains("started"));
    assert!(child.wait_timeout(Duration::from_millis(200))?.is_none());
    child.signal(libc::SIGTERM)?;
    let status = child.wait_timeout(Duration::from_secs(10))?;
    assert!(status.is_some_and(|s| !s.success()));

    let mut sleeper = spawn_logged(
        {
            let mut c = Command::new("sleep");
            c.arg("30");
            c
        },
        &log,
    )?;
    let pid = sleeper.id();
    sleeper.kill9();
    assert!(!sleeper.is_running());
    drop(sleeper);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());

    let err = wait_until("the impossible", Duration::from_millis(300), || Ok(false)).unwrap_err();
    assert!(err.to_string().contains("the impossible"), "{err}");
    Ok(())
}
