//! `pitr restore --standby`: a PostgreSQL 15 standby built from the archive keeps following it,
//! and the primary when it is given one; it never gets a partial segment from the archive, and
//! it can be promoted. A recovery target or a table with --standby is refused before anything
//! is written.

use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::checks::{assert_untouched, expect_failure, run_pitr, snapshot};
use pitr_tests::pitr::{PitrEnv, RestoredServer, WAL_SEGMENT_SIZE};
use pitr_tests::{lsn_to_u64, scratch_dir, wait_until, PgCluster, PgOptions};

/// Whether the standby sees the row `id` of `t` yet.
fn has_row(standby: &RestoredServer, id: i32) -> Result<bool> {
    Ok(standby.psql(&format!("select count(*) from t where id = {id}"))? == "1")
}

fn wait_for_row(standby: &RestoredServer, id: i32, what: &str) -> Result<()> {
    wait_until(what, Duration::from_secs(60), || has_row(standby, id)).with_context(|| server_log(standby))
}

fn server_log(standby: &RestoredServer) -> String {
    let log = standby.target.join("pitr-restore-server.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("standby log {} (last lines):\n{}", log.display(), lines[lines.len().saturating_sub(30)..].join("\n"))
}

/// `pitr restore --standby --start` (plus `extra`); checks the report is a standby's and never
/// shows the primary's conninfo.
fn start_standby(env: &PitrEnv, cluster: &PgCluster, extra: &[&str]) -> Result<RestoredServer> {
    let mut args = vec!["--standby", "--json", "--timeout", "120s"];
    args.extend_from_slice(extra);
    let (standby, out) = env.restore_started("latest", cluster.bin_dir(), &args)?;
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    assert_eq!(report["standby"], true, "{report}");
    assert_eq!(report["started"], true, "{report}");
    assert!(report["last_replayed_lsn"].is_string(), "{report}");
    assert!(report["data_loss_window_seconds"].is_null(), "a standby has no target to measure against: {report}");
    let settings = report["recovery_settings"].as_array().with_context(|| format!("{report}"))?;
    let shown = settings.iter().filter_map(|l| l.as_str()).find(|l| l.starts_with("primary_conninfo = "));
    match extra.iter().position(|a| *a == "--primary-conninfo") {
        Some(_) => assert_eq!(shown, Some("primary_conninfo = (set; see postgresql.auto.conf)"), "{report}"),
        None => assert_eq!(shown, Some("primary_conninfo = ''"), "{report}"),
    }
    assert!(!String::from_utf8_lossy(&out.stdout).contains("host="), "the report shows the conninfo: {report}");
    assert_eq!(standby.psql("select pg_is_in_recovery()")?, "t", "the standby left recovery");
    assert!(standby.target.join("standby.signal").exists());
    assert!(!standby.target.join("recovery.signal").exists());
    Ok(standby)
}

#[test]
fn a_standby_from_the_archive_follows_the_primary_and_the_archive_and_promotes() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.psql("create table t (id int primary key, v text); insert into t select g, md5(g::text) from generate_series(1, 1000) g")?;
    let mut env = PitrEnv::new("pg15-standby", &cluster, "")?;
    env.init()?;
    env.share_with_pg_user()?;

    // Bad input: one clear error each, and nothing written (no target, repository as it was).
    let refused = scratch_dir("refused");
    let target = refused.path().join("data");
    let target_arg = target.display().to_string();
    let before = snapshot(&env.repo);
    expect_failure(
        &env.config,
        &["restore", "--standby", "--to", "2026-11-25T14:03:00Z", "--target-dir", &target_arg],
        &["--standby", "no recovery target"],
    );
    expect_failure(
        &env.config,
        &["restore", "--standby", "--table", "public.t", "--into", &cluster.conninfo("postgres")],
        &["--standby", "--table", "nothing was restored"],
    );
    // A usage error (clap's own message).
    let out = run_pitr(
        &env.config,
        &["restore", "--primary-conninfo", "host=x", "--to", "latest", "--target-dir", &target_arg],
    );
    assert_eq!(out.status.code(), Some(2), "--primary-conninfo without --standby: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--standby"), "{out:?}");
    assert!(!target.exists(), "a refused standby restore wrote {}", target.display());
    assert_untouched(&env.repo, &before, "refused standby restores");

    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    env.run_ok(&["backup"])?;

    // Without --start and without --to: the settings of a standby, no target, no end.
    let unstarted = scratch_dir("standby-unstarted");
    let dir = unstarted.path().join("data");
    env.run_ok(&["restore", "--standby", "--target-dir", &dir.display().to_string()])?;
    let conf = std::fs::read_to_string(dir.join("postgresql.auto.conf"))?;
    assert!(dir.join("standby.signal").exists() && !dir.join("recovery.signal").exists());
    assert!(conf.contains("wal-fetch --whole-segments"), "{conf}");
    assert!(conf.contains("recovery_target_timeline = 'latest'"), "{conf}");
    for absent in ["--until-lsn", "recovery_target_time =", "recovery_target_action"] {
        assert!(!conf.contains(absent), "{absent} in a standby's settings:\n{conf}");
    }
    // No primary of the backup's own (a server that was a standby once) is inherited.
    assert!(conf.ends_with("primary_conninfo = ''\nprimary_slot_name = ''\n"), "{conf}");

    // A conninfo with libpq's own quoting (\' and \\ inside '…'), as PostgreSQL reads it back.
    let primary_conninfo = format!(r"{} application_name='pitr\'s \\standby'", cluster.conninfo("postgres"));
    let follower = start_standby(&env, &cluster, &["--primary-conninfo", &primary_conninfo])?;
    let archive_only = start_standby(&env, &cluster, &[])?;
    assert_eq!(follower.psql("select count(*) from t")?, "1000");
    assert_eq!(archive_only.psql("select count(*) from t")?, "1000");

    // (a) A commit on the primary reaches the standby that streams from it, with no WAL switch:
    // its segment is not whole in the archive yet.
    cluster.psql("insert into t values (1001, 'streamed')")?;
    wait_for_row(&follower, 1001, "the streaming standby to see row 1001")?;
    assert_eq!(follower.psql("select status from pg_stat_wal_receiver")?, "streaming");
    assert_eq!(follower.psql("show primary_conninfo")?, primary_conninfo, "primary_conninfo as PostgreSQL read it");
    assert_eq!(
        cluster.psql("select application_name from pg_stat_replication where application_name like 'pitr''s%'")?,
        r"pitr's \standby",
        "the application_name the standby streams as"
    );

    // The archive holds that commit only in part of a segment: wal-fetch gives it to a restore
    // (zero-padded) but tells a standby it is not there yet, and writes nothing.
    let lsn = cluster.current_lsn()?;
    env.wait_archived(lsn, "the archive to hold row 1001")?;
    let segment = cluster.psql("select pg_walfile_name(pg_current_wal_lsn())")?;
    let fetch_dir = scratch_dir("fetch");
    let dest = fetch_dir.path().join("seg");
    let dest_arg = dest.display().to_string();
    let (code, _) = expect_failure(
        &env.config,
        &["wal-fetch", "--whole-segments", &segment, &dest_arg],
        &["not in the archive as a whole segment yet"],
    );
    assert_eq!(code, 1, "a partial segment must be \"not there yet\" (exit 1) to a standby");
    assert!(!dest.exists(), "wal-fetch --whole-segments wrote {}", dest.display());
    // A repository that cannot be read stops a restore (126: PostgreSQL's FATAL) but not a
    // standby, which asks again (1), the error on stderr either way.
    for (whole, code) in [(true, 1), (false, 126)] {
        let mut args = vec!["wal-fetch", "--from", "no-such-repository"];
        args.extend(whole.then_some("--whole-segments"));
        args.extend([segment.as_str(), dest_arg.as_str()]);
        let (got, _) = expect_failure(&env.config, &args, &["no-such-repository"]);
        assert_eq!(got, code, "{args:?}");
        assert!(!dest.exists(), "{args:?} wrote {}", dest.display());
    }
    assert_eq!(env.wal_fetch(&segment)?.len() as u64, WAL_SEGMENT_SIZE, "a restore gets the partial segment");

    // (b) The standby without a primary sees the commit once its segment is whole in the archive.
    cluster.psql("insert into t values (1002, 'archived')")?;
    let switched = lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(switched.next_multiple_of(WAL_SEGMENT_SIZE), "the archive to hold the switched segment")?;
    wait_for_row(&archive_only, 1002, "the archive-only standby to see row 1002")?;
    assert!(has_row(&archive_only, 1001)?);
    assert_eq!(archive_only.psql("select count(*) from pg_stat_wal_receiver")?, "0", "it has no primary");

    // Promoted, it takes writes.
    archive_only.psql("select pg_promote()")?;
    wait_until(
        "the promotion",
        Duration::from_secs(60),
        || Ok(archive_only.psql("select pg_is_in_recovery()")? == "f"),
    )
    .with_context(|| server_log(&archive_only))?;
    archive_only.psql("insert into t values (2001, 'after promotion')")?;
    assert_eq!(archive_only.psql("select v from t where id = 2001")?, "after promotion");
    Ok(())
}
