//! The whole stream → backup → restore round trip against a real S3-compatible server on
//! loopback (moto's server mode), not an in-process fake.

use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{client_bin, wait_until, PgCluster, PgOptions, S3Server};

fn state(psql: impl Fn(&str) -> Result<String>) -> Result<String> {
    psql("select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t")
}

#[test]
fn pg15_round_trip_through_s3() -> Result<()> {
    let mut s3 = S3Server::start()?;
    s3.create_bucket("pitr")?;
    // The standard credential chain: moto accepts any key.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("s3", &cluster, "")?;
    let repo_line = format!("path = {:?}", env.repo_path().display().to_string());
    env.edit_config(
        &repo_line,
        &format!(
            "url = \"s3://pitr/clusters/main\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nallow_http = true\nforce_path_style = true",
            s3.endpoint()
        ),
    )?;
    env.init()?;
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    cluster.psql("create table t (id int primary key, v text)")?;
    cluster.psql("insert into t select g, md5(g::text) from generate_series(1, 1000) g")?;
    env.run_ok(&["backup"])?;
    cluster.psql("insert into t select g, md5(g::text) from generate_series(1001, 2000) g")?;
    std::thread::sleep(Duration::from_millis(1100));
    let moment = cluster.psql("select clock_timestamp()")?;
    let at_moment = state(|q| cluster.psql(q))?;
    std::thread::sleep(Duration::from_millis(1100));
    // A storage outage during the workload: the server stops answering for 20 s. The sidecar
    // retries, the primary keeps the WAL in the slot, and afterwards nothing is missing.
    s3.freeze(true)?;
    let load = cluster.pgbench(&["-i", "-s", "1", "-q"]);
    std::thread::sleep(Duration::from_secs(20));
    s3.freeze(false)?;
    load?;
    cluster.psql("delete from t where id % 3 = 0")?;
    let last = state(|q| cluster.psql(q))?;
    let lsn = pitr_tests::lsn_to_u64(&cluster.psql("select pg_current_wal_lsn()")?);
    // flush_interval defaults to 1 s for object storage.
    wait_until("the S3 archive to catch up", Duration::from_secs(60), || Ok(env.archived_lsn()? >= lsn))
        .with_context(|| env.stream_logs())?;

    for (to, expected) in [(moment.as_str(), &at_moment), ("latest", &last)] {
        let (restored, out) = env.restore_started(to, cluster.bin_dir(), &["--json"])?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let got = std::process::Command::new(client_bin("psql"))
            .args(["-X", "-A", "-t", "-h", &restored.target.display().to_string(), "-p", &restored.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-c",
                "select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t",
            ])
            .output()?;
        assert_eq!(
            String::from_utf8_lossy(&got.stdout).trim(),
            expected.as_str(),
            "restore to {to} from S3: {report:#}"
        );
    }
    let verify: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--deep", "--json"])?)?;
    assert_eq!(verify["ok"], true, "{verify:#}");
    Ok(())
}
