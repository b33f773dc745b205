//! An S3-compatible endpoint that ignores `If-None-Match: *` (made here from moto, which honours
//! it, by a proxy that strips the header from every request, or only from the completions of
//! multipart uploads) is refused by `pitr init` and at `pitr stream` start-up, with a message that
//! says why; the same server without the proxy works, and the start-up probes leave nothing behind.

use std::process::Command;
use std::sync::atomic::Ordering;

use anyhow::{ensure, Result};
use pitr_tests::checks::{expect_failure, failure_of};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::proxy::HeaderStrippingProxy;
use pitr_tests::{http_request, pitr_bin, PgCluster, PgOptions, S3Server};

/// What the refusal must say: what is wrong, and what pitr needs conditional creates for.
const WHY: &[&str] =
    &["ignores `If-None-Match: *`", "412 Precondition Failed", "put-if-absent", "writer lease", "conflicting writers"];

/// The keys in bucket `pitr`, read around pitr (moto checks no signatures).
fn keys_in_bucket(moto: &S3Server) -> Result<Vec<String>> {
    let auth = [("Authorization", "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request")];
    let listing = http_request(moto.port, "GET", "/pitr?list-type=2", &auth, b"")?;
    ensure!(listing.status == 200, "listing the bucket: {} {}", listing.status, listing.text());
    let text = listing.text();
    Ok(text.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()).map(str::to_string).collect())
}

fn s3_lines(endpoint: &str) -> String {
    format!(
        "url = \"s3://pitr/clusters/main\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\nallow_http = true\n\
         force_path_style = true"
    )
}

#[test]
fn an_endpoint_ignoring_if_none_match_is_refused_at_init_and_at_stream_start() -> Result<()> {
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let moto = S3Server::start()?;
    moto.create_bucket("pitr")?;
    let proxy = HeaderStrippingProxy::start(moto.port, "If-None-Match")?;
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("put-if-absent", &cluster, "")?;
    let repo_line = format!("path = {:?}", env.repo_path().display().to_string());
    env.edit_config(&repo_line, &s3_lines(&proxy.endpoint()))?;

    // init through the proxy: refused before anything is created, the key file included.
    let (_, message) = expect_failure(&env.config, &["init"], WHY);
    eprintln!("init through the proxy: {message}");
    ensure!(proxy.stripped.load(Ordering::SeqCst) > 0, "the proxy removed no If-None-Match header");
    let left = keys_in_bucket(&moto)?;
    ensure!(left.is_empty(), "a refused init left objects behind: {left:?}");
    ensure!(!env.key_file.exists(), "a refused init created the key file");

    // A server that honours the header on a single PUT but not on CompleteMultipartUpload (which
    // commits every object above multipart_threshold): refused too, by the probe's one-part upload.
    let commits = HeaderStrippingProxy::start_for(moto.port, "If-None-Match", &["POST ", "uploadId="])?;
    env.edit_config(&proxy.endpoint(), &commits.endpoint())?;
    let (_, message) = expect_failure(&env.config, &["init"], WHY);
    ensure!(message.contains("pitr-probe/if-none-match-upload."), "not refused by the upload probe: {message}");
    ensure!(commits.stripped.load(Ordering::SeqCst) > 0, "the proxy removed no If-None-Match header from a completion");
    let left = keys_in_bucket(&moto)?;
    ensure!(left.is_empty(), "a refused init left objects behind: {left:?}");
    ensure!(!env.key_file.exists(), "a refused init created the key file");

    // The same server without the proxy honours it: init works.
    env.edit_config(&commits.endpoint(), &moto.endpoint())?;
    env.init()?;

    // stream start-up through the proxy: refused at once (bounded by `timeout`, so that a
    // sidecar that started streaming instead fails the test rather than hanging it).
    env.edit_config(&moto.endpoint(), &proxy.endpoint())?;
    let stripped_before = proxy.stripped.load(Ordering::SeqCst);
    let out =
        Command::new("timeout").arg("60").arg(pitr_bin()).arg("--config").arg(&env.config).arg("stream").output()?;
    failure_of("pitr stream through the stripping proxy", &out, WHY);
    ensure!(proxy.stripped.load(Ordering::SeqCst) > stripped_before, "stream sent no conditional create");
    let streaming = cluster.psql("select count(*) from pg_stat_replication where application_name = 'pitr_main'")?;
    ensure!(streaming == "0", "the refused sidecar connected to the server");

    // Without the proxy the sidecar starts and streams.
    env.edit_config(&proxy.endpoint(), &moto.endpoint())?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    env.stop_stream(&mut stream)?;

    // Every probe (init's and the two stream start-ups') was deleted.
    let probes: Vec<String> = keys_in_bucket(&moto)?.into_iter().filter(|k| k.contains("pitr-probe/")).collect();
    ensure!(probes.is_empty(), "probe objects left behind: {probes:?}");
    Ok(())
}
