//! Named restore points on PostgreSQL 15: `pitr mark` creates one on the primary and waits for
//! the archive; the sidecar indexes every restore point it streams (one made with plain SQL too,
//! and one made while it was down, once it is back); `list` shows them; `restore --to name:NAME`
//! lands exactly on the marked state; `--to immediate` on the backup's state. Entries lost while
//! the sidecar is down come back from the segment it reads back at start-up. An unknown name is
//! refused before anything is written; so are names PostgreSQL or postgresql.auto.conf cannot
//! hold, and a restore point another one of its name would shadow. A drill and a table restore
//! take `name:` too. A name with a quote, a backslash, a space and non-ASCII letters round-trips;
//! `mark` refuses a name the index holds; a restore landing on an earlier restore point of the
//! name that the index lacks fails naming both LSNs; a junk object planted in the index neither
//! stops streaming nor a restore to a time, but a restore to a name refuses naming it.

use anyhow::{Context, Result};
use pitr_tests::checks::{assert_untouched, expect_failure, snapshot};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{scratch_dir, PgCluster, PgOptions};

const STATE: &str = "select count(*) || ' ' || md5(string_agg(id || ':' || v, ',' order by id)) from t";

/// Quote, backslash, spaces and non-ASCII: what SQL, postgresql.auto.conf and the index must
/// all carry byte for byte.
const ODD_NAME: &str = "it's a \\ back-slashed Überprüfung ✓";

/// Where `pitr mark`'s own restore point record starts, from its end, as PostgreSQL lays it out
/// (104 bytes MAXALIGNed, plus a page header it crosses; 8 KiB pages, 16 MiB segments).
fn record_start(end: u64) -> u64 {
    let offset = end % 8192;
    let header = if (end - offset).is_multiple_of(16 << 20) { 40 } else { 24 };
    if offset == 0 || offset >= header + 104 {
        end - 104
    } else {
        end - 104 - header
    }
}

/// The index entry object of the restore point at `lsn` on timeline 1, in a local repository.
fn entry_path(env: &PitrEnv, lsn: u64) -> Result<std::path::PathBuf> {
    let cluster_dir = std::fs::read_dir(env.repo.join("pg"))?.next().context("no cluster in the repository")??.path();
    Ok(cluster_dir.join("restore-points").join(format!("00000001.{lsn:016X}")))
}

/// The restore points `pitr list --json` shows: (name, restorable).
fn listed(env: &PitrEnv) -> Result<Vec<(String, bool, serde_json::Value)>> {
    let out = env.run_ok(&["list", "--json"])?;
    let list: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let points = list["restore_points"].as_array().with_context(|| format!("no restore_points in {list}"))?;
    Ok(points
        .iter()
        .map(|p| (p["name"].as_str().unwrap_or_default().to_string(), p["restorable"] == true, p.clone()))
        .collect())
}

#[test]
fn marked_and_sql_made_restore_points_are_indexed_listed_and_restored_to_exactly() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.psql("create table t (id int primary key, v text); insert into t select g, md5(g::text) from generate_series(1, 1000) g")?;
    let mut env = PitrEnv::new("pg15-restore-points", &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    env.run_ok(&["backup"])?;
    let at_backup = cluster.psql(STATE)?;

    // Names PostgreSQL or recovery_target_name cannot take are refused before the primary is
    // asked (nothing to clean up there either).
    for (name, why) in [("", "not empty"), (&*"x".repeat(64), "63 bytes"), ("a\nb", "line break")] {
        expect_failure(&env.config, &["mark", name], &["restore point name", why]);
    }

    cluster.psql("insert into t select g, md5(g::text) from generate_series(1001, 1500) g")?;
    let marked_state = cluster.psql(STATE)?;
    let out = env.run_ok(&["mark", "before-cleanup", "--json"])?;
    let mark: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    assert_eq!(mark["name"], "before-cleanup", "{mark}");
    assert_eq!(mark["timeline"], 1, "{mark}");
    let mark_lsn = mark["lsn"].as_str().with_context(|| format!("{mark}"))?.to_string();
    let mark_end = pitr_tests::parse_lsn(mark["end_lsn"].as_str().unwrap_or_default())?;
    assert_eq!(record_start(mark_end), pitr_tests::parse_lsn(&mark_lsn)?, "{mark}");
    // The same state under an odd name, marked in the same way.
    let out = env.run_ok(&["mark", ODD_NAME, "--json"])?;
    let odd: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    assert_eq!(odd["name"], ODD_NAME, "{odd}");
    // `mark` returned once the archive held it: `list` shows it at once, restorable.
    let points = listed(&env)?;
    assert_eq!(
        points.iter().map(|p| (p.0.as_str(), p.1)).collect::<Vec<_>>(),
        [("before-cleanup", true), (ODD_NAME, true)]
    );
    assert_eq!(points[0].2["lsn"], mark_lsn.as_str());
    // A name the index holds is refused (after a timed-out `mark`, it is there already): a second
    // one could not be restored to by name.
    expect_failure(&env.config, &["mark", "before-cleanup"], &["exists already", &mark_lsn, "--allow-duplicate"]);

    // The cleanup, then a restore point made with plain SQL, more writes.
    cluster.psql("delete from t where id % 2 = 0; update t set v = 'cleaned' where id < 100")?;
    cluster.psql("select pg_create_restore_point('sql-made')")?;
    cluster.psql("insert into t values (5000, 'after sql-made')")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the WAL after sql-made")?;
    pitr_tests::wait_until("sql-made to be listed", std::time::Duration::from_secs(30), || {
        Ok(listed(&env)?.iter().any(|p| p.0 == "sql-made" && p.1))
    })?;
    let text = env.run_ok(&["list"])?;
    for name in ["\"before-cleanup\"", "\"sql-made\"", &mark_lsn] {
        assert!(text.contains(name), "{name} not in `pitr list`:\n{text}");
    }

    // The sidecar dies. `mark` then times out saying why; the restore point it made on the
    // primary is indexed once the sidecar is back (resuming from the archive's end).
    stream.kill9();
    let (_, err) = expect_failure(
        &env.config,
        &["mark", "while-down", "--timeout", "3s"],
        &["while-down", "was created on the primary", "is `pitr stream` running", "do not run `pitr mark` again"],
    );
    assert!(!err.contains("password"), "{err}");
    let told_lsn = err
        .split("--to lsn:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("no --to lsn: in {err}"))?
        .to_string();

    // Unknown names are refused before anything is written: no target, no running marker.
    let refused = scratch_dir("refused");
    let target = refused.path().join("data");
    let target_arg = target.display().to_string();
    let before = snapshot(&env.repo);
    expect_failure(
        &env.config,
        &["restore", "--to", "name:nope", "--target-dir", &target_arg],
        &["no restore point \"nope\"", "\"before-cleanup\"", "\"sql-made\""],
    );
    expect_failure(&env.config, &["restore", "--to", "name:", "--target-dir", &target_arg], &["not empty"]);
    assert!(!target.exists(), "a refused restore wrote {}", target.display());
    // A drill, a partial drill and a table restore too (as the database's OS user, as they run).
    let into = cluster.conninfo("postgres");
    for args in [
        vec!["drill", "--to", "name:nope", "--db-user", "postgres"],
        vec!["drill", "--partial", "--to", "name:nope", "--db-user", "postgres"],
        vec!["restore", "--to", "name:nope", "--table", "public.t", "--into", &into],
    ] {
        let out = env.run_as_pg_user(&args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("no restore point \"nope\""), "{args:?}: {err}");
    }
    assert_untouched(&env.repo, &before, "restores and drills to unknown restore points");

    // Index entries lost while the sidecar is down (or WAL archived by a pitr that indexed none):
    // the segment it reads back at start-up is indexed again.
    let index = std::fs::read_dir(env.repo.join("pg"))?.next().context("no cluster in the repository")??.path();
    let index = index.join("restore-points");
    for entry in std::fs::read_dir(&index)? {
        std::fs::remove_file(entry?.path())?;
    }
    let mut restarted = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("insert into t values (5001, 'after restart')")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the WAL after the restart")?;
    pitr_tests::wait_until("while-down to be listed", std::time::Duration::from_secs(30), || {
        Ok(listed(&env)?.iter().any(|p| p.0 == "while-down" && p.1))
    })?;
    let points = listed(&env)?;
    let names: Vec<&str> = points.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["before-cleanup", ODD_NAME, "sql-made", "while-down"], "the index after a sidecar restart");
    // What the timed-out `mark` said to restore to is where the record starts.
    assert_eq!(points[3].2["lsn"], told_lsn.as_str(), "{:?}", points[3]);

    // To the odd name: exactly the state marked, whatever came after, and seen to stop there.
    let (restored, out) = env.restore_started(&format!("name:{ODD_NAME}"), cluster.bin_dir(), &["--json"])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let achieved = report["target"].as_str().unwrap_or_default();
    assert!(
        achieved.contains(&format!("{ODD_NAME:?}")) && achieved.contains(odd["lsn"].as_str().unwrap_or("?")),
        "{report}"
    );
    assert!(
        report["recovery_settings"]
            .as_array()
            .is_some_and(|s| s.iter().any(|l| l == "recovery_target_name = 'it''s a \\\\ back-slashed Überprüfung ✓'")),
        "{report}"
    );
    assert_eq!(report["landing"]["verified"], true, "{report}");
    assert_eq!(restored.psql(STATE)?, marked_state, "restored to name:{ODD_NAME}");
    drop(restored);
    // Without --start, the report says the landing is not verified yet.
    let unstarted = scratch_dir("unstarted");
    let unstarted_arg = unstarted.path().join("data").display().to_string();
    let out = env.run_ok(&["restore", "--to", "name:before-cleanup", "--target-dir", &unstarted_arg, "--json"])?;
    let report: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    assert_eq!(report["landing"]["verified"], false, "{report}");
    assert!(report["landing"]["detail"].as_str().is_some_and(|d| d.contains("not verified")), "{report}");
    drop(unstarted);

    // To the backup's consistency point.
    let (restored, out) = env.restore_started("immediate", cluster.bin_dir(), &["--json"])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(report["target"].as_str().is_some_and(|t| t.starts_with("immediate: the consistency point")), "{report}");
    assert_eq!(restored.psql(STATE)?, at_backup, "restored to immediate");
    drop(restored);

    // A drill and a table restore take a restore point as well.
    let out = env.run_as_pg_user(&["drill", "--to", "name:before-cleanup", "--json", "--db-user", "postgres"])?;
    assert!(out.status.success(), "drill --to name:before-cleanup: {}", String::from_utf8_lossy(&out.stderr));
    let out =
        env.run_as_pg_user(&["restore", "--to", "name:before-cleanup", "--table", "public.t", "--into", &into])?;
    assert!(out.status.success(), "--table at name:before-cleanup: {}", String::from_utf8_lossy(&out.stderr));
    let copied = cluster.psql(&STATE.replace("from t", "from t_at_before_cleanup"))?;
    assert_eq!(copied, marked_state, "the table copied as it was at before-cleanup");

    // A second "sql-made": recovery from the only backup would stop at the first one, so the
    // newest cannot be reached and the restore says why, writing nothing.
    cluster.psql("select pg_create_restore_point('sql-made')")?;
    cluster.psql("insert into t values (5002, 'after the second sql-made')")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the second sql-made")?;
    pitr_tests::wait_until("the second sql-made to be listed", std::time::Duration::from_secs(30), || {
        Ok(listed(&env)?.iter().filter(|p| p.0 == "sql-made").count() == 2)
    })?;
    expect_failure(
        &env.config,
        &["restore", "--to", "name:sql-made", "--target-dir", &target_arg],
        &["sql-made", "earlier restore point"],
    );
    assert!(!target.exists(), "a refused restore wrote {}", target.display());

    // The first one's entry lost (or never made: WAL archived before pitr indexed restore
    // points): the index knows only the second, recovery stops at the first. The restore fails
    // naming both ends instead of reporting the one asked for.
    let made: Vec<serde_json::Value> = listed(&env)?.into_iter().filter(|p| p.0 == "sql-made").map(|p| p.2).collect();
    let lsn_of = |p: &serde_json::Value, key: &str| pitr_tests::parse_lsn(p[key].as_str().unwrap_or_default());
    std::fs::remove_file(entry_path(&env, lsn_of(&made[0], "lsn")?)?)?;
    let err = match env.restore_started("name:sql-made", cluster.bin_dir(), &[]) {
        Ok(_) => anyhow::bail!("a restore to name:sql-made landed on the unindexed first one and succeeded"),
        Err(e) => e.to_string(),
    };
    for phrase in [
        format!("recovery stopped at {}", made[0]["end_lsn"].as_str().unwrap_or("?")),
        format!("not at the end of restore point \"sql-made\" ({})", made[1]["end_lsn"].as_str().unwrap_or("?")),
        format!("--to lsn:{}", made[1]["lsn"].as_str().unwrap_or("?")),
    ] {
        assert!(err.contains(&phrase), "{phrase:?} not in {err}");
    }

    // A junk object planted at the place of the next restore point's entry, while the sidecar is
    // down: streaming goes on past it, list names it, a restore to a time works, and a restore
    // to a name refuses naming it.
    env.stop_stream(&mut restarted)?;
    let end = pitr_tests::parse_lsn(&cluster.psql("select pg_create_restore_point('planted-over')")?)?;
    cluster.psql("insert into t values (5003, 'after planted-over')")?;
    let planted = entry_path(&env, record_start(end))?;
    std::fs::write(&planted, b"PITRjunk, not sealed with the key")?;
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    let after_planted = cluster.psql(STATE)?;
    let now = cluster.psql("select to_char(now() at time zone 'utc', 'YYYY-MM-DD HH24:MI:SS.US+00')")?;
    cluster.psql("insert into t values (5004, 'after the time')")?;
    env.wait_archived(cluster.current_lsn()?, "the archive to hold the WAL past the planted entry")?;
    let planted_name = planted.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let logs = env.stream_logs();
    assert!(
        logs.lines().any(|l| l.contains("restore point not indexed") && l.contains(&planted_name)),
        "the sidecar met the planted object at the restore point's place:\n{logs}"
    );
    let text = env.run_ok(&["list"])?;
    assert!(text.contains("restore point index incomplete") && text.contains(&planted_name), "{text}");
    let (restored, _) = env.restore_started(&now, cluster.bin_dir(), &[])?;
    assert_eq!(restored.psql(STATE)?, after_planted, "restored to a time past the planted entry");
    drop(restored);
    expect_failure(
        &env.config,
        &["restore", "--to", "name:before-cleanup", "--target-dir", &target_arg],
        &["index of restore points is incomplete", &planted_name],
    );
    assert!(!target.exists(), "a refused restore wrote {}", target.display());
    Ok(())
}
