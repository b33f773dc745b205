//! The Azure Blob Storage backend (`az://container/prefix`) against Azurite, Microsoft's emulator,
//! on loopback: the store's contract (put-if-absent for single puts and for block uploads, whose
//! commit must be conditional too; ranges, listings, deletes; errors that name the container and
//! the object and never a secret), and the S3 tests' scenarios through the `pitr` binary: stream,
//! backup, an outage with the server down mid-stream (started again with the same data), the
//! sidecar killed and its writer lease held against another host, a secondary repository on
//! Azure, and exact restores.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use pitr_archive::cloud::{CloudOptions, CloudStore};
use pitr_archive::{KeyRing, ObjectKind, ObjectMeta, PutOutcome, Repository, RepositoryError, Store};
use pitr_tests::azurite::{Azurite, ACCOUNT, ACCOUNT_KEY};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::proxy::FaultyProxy;
use pitr_tests::{lsn_to_u64, pitr_bin, wait_until, PgCluster, PgOptions};

fn pseudo_random(len: usize, seed: u64) -> Bytes {
    pitr_tests::pseudo_random(len, seed).into()
}

/// Small blocks, so that a 13 MiB object takes three; short retries, so that failures surface
/// within the test.
fn azure_options(azurite: &Azurite) -> CloudOptions {
    CloudOptions {
        endpoint: Some(azurite.endpoint()),
        storage_account: Some(ACCOUNT.into()),
        allow_http: true,
        multipart_threshold: 6 << 20,
        multipart_part_size: 5 << 20,
        connect_timeout: Duration::from_secs(2),
        max_retries: 2,
        retry_timeout: Duration::from_secs(3),
        retry_max_backoff: Duration::from_millis(500),
        ..CloudOptions::default()
    }
}

/// One test, run in two steps one after the other: the store's contract needs the process's own
/// AZURE_* variables (object_store reads credentials from there only) and changes them, which is
/// unsound while another thread reads the environment or starts a process, as the binary's
/// scenario does all along (it passes the variables to the processes it starts instead). So the
/// contract runs first, on a runtime of one thread that is gone before the scenario starts.
#[test]
fn azure_backend_on_azurite() -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(store_contract())?;
    pg15_round_trip_and_outage()
}

/// The bytes of `key` (base64) as `{:?}` shows a `Vec<u8>` or an array, without the brackets:
/// how object_store's `AzureAccessKey` appears in a derived Debug dump.
fn debug_bytes(key: &str) -> Result<String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(key)?;
    Ok(format!("{:?}", &bytes[..8]).trim_end_matches(']').trim_start_matches('[').to_string())
}

async fn store_contract() -> Result<()> {
    let mut azurite = Azurite::start(&["pitr"])?;
    std::env::set_var("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY);
    let opts = azure_options(&azurite);
    let store = CloudStore::open("az://pitr/repo", &opts)?;
    // A single Put Blob and a two-block upload, each created twice.
    store
        .check_conditional_create()
        .await
        .context("Azurite honours If-None-Match: * on Put Blob and Put Block List")?;

    let (a, b) = (pseudo_random(13 << 20, 1), pseudo_random(13 << 20, 2));
    assert_eq!(store.put_if_absent("wal/big", a.clone()).await?, PutOutcome::Created);
    assert_eq!(store.get("wal/big").await?, a);
    assert_eq!(store.head("wal/big").await?.context("head")?.size, a.len() as u64);
    // Someone else's bytes under a taken name: refused by the conditional commit of the block
    // list (object_store sends it unconditionally; our layer adds the condition), object unchanged.
    assert_eq!(store.put_if_absent("wal/big", b.clone()).await?, PutOutcome::AlreadyExists);
    assert_eq!(store.get("wal/big").await?, a);
    // Our own bytes again (a retry whose first reply was lost): it is there, so Created.
    assert_eq!(store.put_if_absent("wal/big", a.clone()).await?, PutOutcome::Created);
    assert_eq!(store.put_if_absent("wal/small", Bytes::from_static(b"small")).await?, PutOutcome::Created);
    assert_eq!(store.put_if_absent("wal/small", Bytes::from_static(b"other")).await?, PutOutcome::AlreadyExists);
    assert_eq!(&store.get_range("wal/big", 10..20).await?[..], &a[10..20]);
    assert_eq!(&store.get_range("wal/small", 3..100).await?[..], b"ll");
    let names: Vec<String> = store.list("wal/").await?.into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["wal/big", "wal/small"]);
    assert_eq!(store.list_children("").await?, ["wal/"]);
    store.delete_many(&["wal/small".to_string(), "wal/missing".to_string()]).await?;
    assert!(store.head("wal/small").await?.is_none());
    let missing = store.get("wal/small").await.unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    assert!(missing.to_string().contains("wal/small") && missing.to_string().contains("az://pitr/repo"), "{missing}");

    // A blob planted around pitr under a name it is about to write is never replaced.
    let planted = azurite.request("PUT", "/pitr/repo/wal/planted", &[], &[("x-ms-blob-type", "BlockBlob")], b"x")?;
    ensure!(planted.status == 201, "planting a blob: {} {}", planted.status, planted.text());
    assert_eq!(store.put_if_absent("wal/planted", a.clone()).await?, PutOutcome::AlreadyExists);
    assert_eq!(&store.get("wal/planted").await?[..], b"x");
    // Only committed blobs exist: the refused block uploads left none, and the probe is gone.
    let mut blobs = azurite.list_blobs("pitr")?;
    blobs.sort();
    assert_eq!(blobs, ["repo/wal/big", "repo/wal/planted"]);

    // The repository over it maps a taken name as over S3: the same plaintext again is our own
    // earlier write, another is a conflict.
    let repo = Repository::new(Arc::new(CloudStore::open("az://pitr/sealed", &opts)?), KeyRing::from_key("k", [3; 32]));
    assert_eq!(repo.init().await?, PutOutcome::Created);
    assert_eq!(repo.init().await?, PutOutcome::AlreadyExists);
    let meta = ObjectMeta::plain(ObjectKind::Meta);
    assert_eq!(repo.put_sealed("x", b"one".to_vec(), meta.clone()).await?, PutOutcome::Created);
    assert_eq!(repo.put_sealed("x", b"one".to_vec(), meta.clone()).await?, PutOutcome::AlreadyExists);
    let conflict = repo.put_sealed("x", b"two".to_vec(), meta).await.unwrap_err();
    assert!(matches!(conflict, RepositoryError::Conflict { .. }), "{conflict}");

    // A container that does not exist: the error names the repository and the object, for a
    // single put and for a block upload (whose first request, a block's, gets the 404).
    let nowhere = CloudStore::open("az://no-such-container/x", &opts)?;
    for (name, data) in [("wal/a", Bytes::from_static(b"a")), ("wal/b", a.clone())] {
        let err = nowhere.put_if_absent(name, data).await.unwrap_err().to_string();
        assert!(err.contains("az://no-such-container/x") && err.contains(name), "{err}");
        assert!(err.contains("does not exist (create it first)") && err.contains("ContainerNotFound"), "{err}");
    }

    // The reply to a block-list commit is lost (the blob was committed): the client's resend is
    // refused as the name is taken, and the blob found there is ours, so the put succeeded.
    let proxy = FaultyProxy::start(azurite.port)?;
    let through = CloudOptions { endpoint: Some(format!("{}/{ACCOUNT}", proxy.endpoint())), ..opts.clone() };
    let lossy = CloudStore::open("az://pitr/repo", &through)?;
    let c = pseudo_random(13 << 20, 3);
    proxy.swallow_reply_of_next(&["PUT ", "comp=blocklist"]);
    assert_eq!(lossy.put_if_absent("wal/lost-reply", c.clone()).await?, PutOutcome::Created);
    ensure!(proxy.stats.swallowed_replies.load(Ordering::SeqCst) == 1, "no commit reply was lost");
    assert_eq!(store.get("wal/lost-reply").await?, c);
    store.delete("wal/lost-reply").await?;
    // A delete refused by an immutability policy (Azurite has none: the proxy answers as Azure
    // does) is a refusal that names immutability, which `expire` counts as retained.
    let immutable = "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>BlobImmutableDueToPolicy</Code>\
         <Message>This operation is not permitted as the blob is immutable due to a policy.</Message></Error>";
    proxy.answer_next(&["DELETE ", "/repo/wal/big"], "409 Conflict", immutable);
    let err = lossy.delete("wal/big").await.unwrap_err();
    ensure!(proxy.stats.answered.load(Ordering::SeqCst) == 1, "the delete reached Azurite");
    assert!(err.is_denied() && pitr_archive::expire::refused(&err), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("wal/big") && text.contains("immutability policy") && text.contains("BlobImmutableDueToPolicy"),
        "{text}"
    );
    assert_eq!(store.get("wal/big").await?, a);
    drop(proxy);

    // A wrong key is refused, typed, and the key is not in the message.
    let wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk=";
    std::env::set_var("AZURE_STORAGE_ACCOUNT_KEY", wrong_key);
    let denied = CloudStore::open("az://pitr/repo", &opts)?;
    let err = denied.get("wal/big").await.unwrap_err();
    let text = err.to_string();
    assert!(err.is_denied(), "{text}");
    assert!(text.contains("wal/big") && !text.contains(wrong_key), "{text}");

    // A SAS token (here one Azurite refuses) never shows in errors: not for a refusal, and not
    // for a server that is down.
    std::env::remove_var("AZURE_STORAGE_ACCOUNT_KEY");
    std::env::set_var(
        "AZURE_STORAGE_SAS_TOKEN",
        "sv=2023-11-03&ss=b&srt=sco&sp=rwdl&se=2099-01-01T00:00:00Z&sig=SECRETSIG",
    );
    let sas = CloudStore::open("az://pitr/repo", &opts)?;
    // Nor in the stores' Debug form (a `{:?}` in a log line), which also hold the keys: not as
    // text, and not as the key's bytes the way a derived Debug would show them.
    let shown = format!("{sas:?} {denied:?} {store:?}");
    assert!(!shown.contains("SECRETSIG") && !shown.contains("AccessKey"), "{shown}");
    for key in [ACCOUNT_KEY, wrong_key] {
        assert!(!shown.contains(key) && !shown.contains(&debug_bytes(key)?), "{shown}");
    }
    assert!(shown.contains("az://pitr/repo"), "{shown}");
    let refused = sas.get("wal/big").await.unwrap_err().to_string();
    azurite.stop()?;
    let down = sas.get("wal/big").await.unwrap_err().to_string();
    std::env::remove_var("AZURE_STORAGE_SAS_TOKEN");
    for text in [&refused, &down] {
        assert!(text.contains("wal/big") && !text.contains("SECRETSIG"), "{text}");
    }
    Ok(())
}

const STATE: &str = "select count(*) || ' ' || coalesce(md5(string_agg(id || ':' || v, ',' order by id)), '-') from t";

fn insert(cluster: &PgCluster, from: u32, n: u32) -> Result<()> {
    cluster.psql(&format!("insert into t select g, md5(g::text) from generate_series({from}, {}) g", from + n - 1))?;
    Ok(())
}

/// Stream, backup, an outage, a killed sidecar and restores, through the binary.
fn pg15_round_trip_and_outage() -> Result<()> {
    let mut azurite = Azurite::start(&["pitr", "copy"])?;
    let cluster = PgCluster::start(PgOptions::new(15))?;
    // A lease that outlives the test: a restarted sidecar that streams again within a minute
    // took its own lease back rather than waiting for it to expire.
    let mut env = PitrEnv::new("azure", &cluster, "lease_holder = \"host-a/pitr_main\"\nlease_ttl = \"10m\"")?;
    // The key from the environment, as in production; the secondary's account too (it has no
    // storage_account key of its own). Short retry budgets, so that failed puts reach the
    // sidecar's own retry loop (and its error counter) within the outage; an upload limit, so
    // that the throttling wrapper is in the path (well above what the test writes: the backup
    // stores about 1 MB, and waiting is tests/rate_limits.rs's subject).
    env.set_child_env("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY);
    env.set_child_env("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT);
    let repo_line = format!("path = {:?}", env.repo_path().display().to_string());
    let endpoint = azurite.endpoint();
    env.edit_config(
        &repo_line,
        &format!(
            "url = \"az://pitr/clusters/main\"\nendpoint = \"{endpoint}\"\nstorage_account = \"{ACCOUNT}\"\n\
             allow_http = true\nconnect_timeout = \"2s\"\nrequest_timeout = \"10s\"\nretry_timeout = \"5s\"\n\
             retry_max_backoff = \"2s\"\nmax_upload_rate = \"100MB/s\"\n\
             [[repository.secondary]]\nname = \"copy\"\nurl = \"az://copy/clusters/main\"\nendpoint = \"{endpoint}\"\n\
             allow_http = true"
        ),
    )?;
    env.init()?;
    env.share_with_pg_user()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    insert(&cluster, 1, 1000)?;
    let backup: serde_json::Value = serde_json::from_str(&env.run_ok(&["backup", "--json"])?)?;
    // The backup went through the throttling wrapper over the Azure store (it reports the wait).
    ensure!(backup["upload_throttled_seconds"].is_f64(), "{backup:#}");
    insert(&cluster, 1001, 1000)?;
    let before = cluster.current_lsn()?;
    wait_until("the archive to catch up before the outage", Duration::from_secs(60), || {
        Ok(env.archived_lsn()? >= before)
    })
    .with_context(|| env.stream_logs())?;
    let errors_before = env.metric("pitr_upload_errors_total")?;

    // The server goes away mid-stream; writes go on.
    azurite.stop()?;
    let outage = Instant::now();
    insert(&cluster, 2001, 500)?;
    std::thread::sleep(Duration::from_millis(1100));
    let moment = cluster.psql("select clock_timestamp()")?;
    let at_moment = cluster.psql(STATE)?;
    std::thread::sleep(Duration::from_millis(1100));
    insert(&cluster, 2501, 500)?;
    cluster.psql("delete from t where id % 7 = 0")?;
    wait_until("upload errors to be counted", Duration::from_secs(30), || {
        Ok(env.metric("pitr_upload_errors_total")? > errors_before)
    })
    .with_context(|| env.stream_logs())?;
    let archive_end = env.sidecar_status()?["durable_lsn"].as_u64().context("durable_lsn")?;
    // `pitr status` fails with one error that names the repository, and still shows the lag.
    let out = env.run(&["status", "--json"])?;
    ensure!(!out.status.success(), "pitr status succeeded with the storage down");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let error = shown["repository_error"].as_str().unwrap_or_default();
    eprintln!("pitr status with Azurite down: {error}");
    ensure!(error.contains("az://pitr/clusters/main"), "{shown:#}");
    ensure!(shown["sidecar"]["lag_bytes"].as_u64() > Some(0), "{shown:#}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.lines().filter(|l| l.starts_with("pitr: error: ")).count() == 1, "{stderr}");
    ensure!(!stderr.contains(ACCOUNT_KEY), "{stderr}");
    // The primary keeps what the archive lacks.
    let restart_lsn =
        lsn_to_u64(&cluster.psql("select restart_lsn from pg_replication_slots where slot_name = 'pitr_main'")?);
    ensure!(cluster.current_lsn()? > archive_end, "the workload wrote no WAL during the outage");
    ensure!(restart_lsn <= archive_end, "slot restart_lsn {restart_lsn:X} passed the archive's end {archive_end:X}");
    if let Some(rest) = Duration::from_secs(10).checked_sub(outage.elapsed()) {
        std::thread::sleep(rest);
    }
    azurite.start_again()?;

    insert(&cluster, 3001, 100)?;
    let end = cluster.current_lsn()?;
    wait_until("the sidecar to catch up after the outage", Duration::from_secs(120), || {
        Ok(env.sidecar_status()?["durable_lsn"].as_u64().unwrap_or(0) >= end)
    })
    .with_context(|| env.stream_logs())?;
    ensure!(env.archived_lsn()? >= end, "the repository lacks WAL the sidecar reported durable");
    let logs = env.stream_logs();
    ensure!(
        logs.contains("archive put failed; retrying") || logs.contains("WAL puts are paused until a renewal succeeds"),
        "{logs}"
    );
    ensure!(!logs.contains(ACCOUNT_KEY), "the account key is in the sidecar's log");

    // The sidecar is killed (-9). Its writer lease, a conditionally created blob, is still live:
    // a sidecar on another host is refused and told who holds it; the same host takes its own
    // lease back at once and streams what was written meanwhile.
    stream.kill9();
    insert(&cluster, 3101, 100)?;
    let out = Command::new("timeout")
        .arg("60")
        .arg(pitr_bin())
        .arg("--config")
        .arg(env.other_host_config()?)
        .arg("stream")
        .envs([("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY), ("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)])
        .output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(!out.status.success(), "a sidecar on another host started beside a live lease:\n{text}");
    ensure!(text.contains("is being written by host-a/pitr_main"), "the refusal does not name the holder:\n{text}");
    let _stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    let last = cluster.psql(STATE)?;
    let end = cluster.current_lsn()?;
    wait_until("the restarted sidecar to catch up", Duration::from_secs(60), || Ok(env.archived_lsn()? >= end))
        .with_context(|| env.stream_logs())?;

    for (to, expected) in [(moment.as_str(), &at_moment), ("latest", &last)] {
        let (restored, out) = env.restore_started(to, cluster.bin_dir(), &["--json"])?;
        assert_eq!(&restored.psql(STATE)?, expected, "restore to {to}: {}", String::from_utf8_lossy(&out.stdout));
    }
    let verify: serde_json::Value = serde_json::from_str(&env.run_ok(&["verify", "--deep", "--json"])?)?;
    assert_eq!(verify["ok"], true, "{verify:#}");
    // The secondary on Azure: what the outage dropped is back-filled, and then it holds the
    // whole archive on its own (`verify --from` reads only it).
    env.run_ok(&["copy", "--to", "copy", "--json"])?;
    let verify: serde_json::Value =
        serde_json::from_str(&env.run_ok(&["verify", "--deep", "--json", "--from", "copy"])?)?;
    assert_eq!(verify["ok"], true, "the secondary: {verify:#}");
    Ok(())
}
