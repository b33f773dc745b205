//! The journal proves the archive whole, against a real PostgreSQL 15, a local repository and a
//! local secondary, with `[journal]` configured (a signing key `pitr init` creates):
//! - the sidecar and two backups journal their WAL segments and manifests; a clean repository
//!   verifies, saying how long the chain is; so does it after `pitr expire` deleted the first
//!   backup and its WAL (the deletes are journaled first);
//! - a planted garbage batch and a valid batch copied to another seq are refused and named;
//! - the newest WAL segments (with the current segment's chunks: the archive just ends earlier)
//!   and the newest manifest deleted from the primary: `verify` fails naming each of them and
//!   the WAL the journal says was archived;
//! - the newest journal batches deleted from the primary too (a rollback): `verify` still names
//!   the same objects, from the secondary's copy of the journal, and says the primary's journal
//!   is behind it; `verify --from` the secondary (which holds everything) passes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{wait_until, PgCluster, PgOptions};

fn verify(env: &PitrEnv, args: &[&str]) -> Result<(bool, String)> {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    let out = env.run(&all)?;
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn copy_caught_up(env: &PitrEnv, name: &str) -> Result<bool> {
    let s: serde_json::Value = serde_json::from_str(&env.run_ok(&["status", "--json"])?)?;
    let secondaries = s["secondaries"].as_array().cloned().unwrap_or_default();
    let copy = secondaries.iter().find(|c| c["name"] == name).map(|c| c["copy"].clone()).unwrap_or_default();
    Ok(copy["queued_objects"] == 0 && copy["state"] != "retrying" && copy["copied_objects"].as_u64() > Some(0))
}

/// Files directly in `dir`, sorted by name.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    out.retain(|p| p.is_file());
    out.sort();
    Ok(out)
}

/// A `PitrEnv` with `[journal]` (a signing key file in its directory, batches every second) and a
/// local secondary `nas`: the environment, the secondary's directory and the key file.
fn journal_env(name: &str, cluster: &PgCluster, extra: &str) -> Result<(PitrEnv, PathBuf, PathBuf)> {
    let env = PitrEnv::new(name, cluster, extra)?;
    let nas = env.dir.path().join("nas");
    let journal_key = env.dir.path().join("journal.key");
    let mut text = std::fs::read_to_string(&env.config)?;
    text.push_str(&format!(
        "[journal]\nsigning_key_file = {:?}\ninterval = \"1s\"\n[[repository.secondary]]\nname = \"nas\"\npath = {:?}\n",
        journal_key.display().to_string(),
        nas.display().to_string()
    ));
    std::fs::write(&env.config, text)?;
    Ok((env, nas, journal_key))
}

fn modified(p: &Path) -> Result<SystemTime> {
    Ok(std::fs::metadata(p)?.modified()?)
}

#[test]
fn pg15_the_journal_names_what_a_repository_lost() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    // Retention keeps the newest backup only: `pitr expire` journals what it deletes.
    let retention = "\n[retention]\ndaily = 1\nweekly = 0\nmonthly = 0\nyearly = 0\nwindow = \"0s\"\n";
    let (mut env, _, journal_key) = journal_env("journal", &cluster, retention)?;
    let init = env.run_ok(&["init"])?;
    assert!(init.contains("created journal signing key"), "{init}");
    assert!(journal_key.exists());
    let public = env.run_ok(&["keys", "journal-init"])?;
    assert!(public.contains("existing journal signing key") && public.contains("public_key = \""), "{public}");
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key, v text)")?;
    env.run_ok(&["backup"])?;
    let batch = |i: i32| -> Result<()> {
        cluster.psql(&format!(
            "insert into t select g, md5(g::text) from generate_series({}, {}) g",
            i * 5000 + 1,
            i * 5000 + 5000
        ))?;
        cluster.psql("select pg_switch_wal()")?;
        Ok(())
    };
    for i in 0..2 {
        batch(i)?;
    }
    env.run_ok(&["backup"])?;
    for i in 2..5 {
        batch(i)?;
    }
    cluster.psql("insert into t values (100000, 'last')")?;
    let end = cluster.current_lsn()?;
    env.wait_archived(end, "the archive to hold the inserts")?;
    wait_until("the secondary to catch up", Duration::from_secs(60), || copy_caught_up(&env, "nas"))
        .with_context(|| env.stream_logs())?;
    // A clean stop writes the last batch (with the WAL made durable at the stop).
    env.stop_stream(&mut stream)?;

    let (ok, out) = verify(&env, &[])?;
    assert!(ok, "a clean repository fails verify:\n{out}");
    eprintln!("verify of the clean primary:\n{out}");
    assert!(out.contains("journal: chain of"), "{out}");
    let (ok, out) = verify(&env, &["--from", "nas"])?;
    assert!(ok, "the clean secondary fails verify:\n{out}");

    // Expire deletes the first backup and the WAL before the second: journaled before the
    // deletes, so the repository still verifies.
    let expired = env.run_ok(&["expire", "--json"])?;
    let (ok, out) = verify(&env, &[])?;
    assert!(ok, "verify fails after expire ({expired}):\n{out}");
    eprintln!("verify after expire:\n{out}");

    // Planted batches: garbage, and a real batch copied to another seq.
    let journal_dir = env.repo.join("journal");
    let batches = files(&journal_dir)?;
    let head: u64 = batches.last().context("no journal batch")?.file_name().unwrap().to_str().unwrap().parse()?;
    let garbage = format!("{:020}", head + 1);
    let copied = format!("{:020}", head + 2);
    std::fs::write(journal_dir.join(&garbage), b"not a batch")?;
    std::fs::copy(&batches[0], journal_dir.join(&copied))?;
    let (ok, out) = verify(&env, &[])?;
    assert!(!ok, "planted batches pass verify:\n{out}");
    for name in [&garbage, &copied] {
        assert!(
            out.contains(&format!("FINDING journal-bad-batch: journal/{name}: refused")),
            "{name} not refused:\n{out}"
        );
    }
    std::fs::remove_file(journal_dir.join(&garbage))?;
    std::fs::remove_file(journal_dir.join(&copied))?;

    // The newest two WAL segments and the newest manifest go from the primary.
    let wal_prefix = env.wal_prefix()?;
    let segments: Vec<String> = env.wal_objects()?.into_iter().filter(|n| n.ends_with(".seg")).collect();
    assert!(segments.len() >= 3, "{segments:?}");
    let lost_segments = &segments[segments.len() - 2..];
    let backups_dir = env.wal_dir()?.parent().unwrap().join("backups");
    let manifests = files(&backups_dir)?;
    assert_eq!(manifests.len(), 1, "expire kept more than the newest backup: {manifests:?}");
    let lost_manifest = &manifests[0];
    let manifest_time = modified(lost_manifest)?;
    let mut lost: Vec<String> = lost_segments.iter().map(|n| format!("{wal_prefix}{n}")).collect();
    lost.push(lost_manifest.strip_prefix(&env.repo)?.display().to_string());
    env.objects().delete(&lost)?;
    // And the current segment's chunks: the archive now just ends earlier, no hole in it.
    let newest_stem = &lost_segments[1][..24];
    let chunks: Vec<String> =
        env.wal_objects()?.into_iter().filter(|n| n.ends_with(".chunk") && &n[..24] > newest_stem).collect();
    assert!(!chunks.is_empty(), "no chunk after {newest_stem}");
    env.delete_wal_objects(&chunks)?;
    let (ok, out) = verify(&env, &[])?;
    assert!(!ok, "verify passes without the newest objects:\n{out}");
    for name in &lost {
        assert!(out.contains(&format!("FINDING journal-missing: {name}: journaled")), "{name} not named:\n{out}");
    }
    assert!(out.contains("FINDING journal-wal:"), "{out}");
    assert!(out.contains("its newest WAL was deleted or rolled back"), "{out}");

    // A rollback: the journal batches from the newest manifest on go too.
    let mut removed = 0;
    for b in files(&journal_dir)? {
        if modified(&b)? >= manifest_time {
            std::fs::remove_file(&b)?;
            removed += 1;
        }
    }
    assert!(removed > 0);
    let (ok, out) = verify(&env, &[])?;
    assert!(!ok, "verify passes a rolled-back repository:\n{out}");
    for name in &lost {
        assert!(out.contains(&format!("FINDING journal-missing: {name}: journaled")), "{name} not named:\n{out}");
    }
    eprintln!("verify of the rolled-back primary:\n{out}");
    assert!(out.contains("FINDING journal-rolled-back"), "{out}");
    assert!(out.contains("secondary nas holds up to"), "{out}");
    assert!(out.contains("the repository was rolled back or its newest objects deleted"), "{out}");
    // The secondary holds everything its journal says.
    let (ok, out) = verify(&env, &["--from", "nas"])?;
    assert!(ok, "the intact secondary fails verify:\n{out}");
    assert!(out.contains("the journal of primary ends at seq"), "{out}");
    Ok(())
}

/// A writer chains past a newest batch someone replaced with garbage; the garbage is then
/// removed too, so the primary's chain alone is consistent again. `verify` still names the seq:
/// the primary holds nothing where a signed batch chained past something, and the secondary holds
/// the signed batch the primary's chain passed over.
#[test]
fn pg15_a_batch_replaced_then_removed_behind_a_writer_is_named() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let (mut env, nas, _) = journal_env("journal-skip", &cluster, "")?;
    env.run_ok(&["init"])?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table t (id int primary key)")?;
    env.run_ok(&["backup"])?;
    let end = cluster.current_lsn()?;
    env.wait_archived(end, "the archive to hold the backup's WAL")?;
    wait_until("the secondary to catch up", Duration::from_secs(60), || copy_caught_up(&env, "nas"))
        .with_context(|| env.stream_logs())?;
    env.stop_stream(&mut stream)?;
    // The pin below copies what it writes; this makes sure the stop's batch is on nas too.
    env.run_ok(&["copy", "--to", "nas"])?;
    let (ok, out) = verify(&env, &[])?;
    assert!(ok, "a clean repository fails verify:\n{out}");

    let journal_dir = env.repo.join("journal");
    let newest = files(&journal_dir)?.pop().context("no journal batch")?;
    let seq = newest.file_name().unwrap().to_str().unwrap().to_string();
    assert!(nas.join("journal").join(&seq).exists(), "batch {seq} not copied");
    std::fs::remove_file(&newest)?;
    std::fs::write(&newest, b"not a batch")?;
    let backups_dir = env.wal_dir()?.parent().unwrap().join("backups");
    let manifest = files(&backups_dir)?.pop().context("no manifest")?;
    let id = manifest.file_stem().unwrap().to_str().unwrap().to_string();
    env.run_ok(&["pin", &id])?;
    std::fs::remove_file(&newest)?;
    let (ok, out) = verify(&env, &[])?;
    assert!(!ok, "a replaced-then-removed batch passes verify:\n{out}");
    assert!(out.contains(&format!("FINDING journal-bad-batch: journal/{seq}: absent, but batch")), "{out}");
    assert!(out.contains(&format!("FINDING journal-fork: journal/{seq}: nas holds a signed batch")), "{out}");
    Ok(())
}
