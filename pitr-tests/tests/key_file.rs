//! The key file `pitr init` creates is durable before anything is sealed with it: the file and
//! the directory holding it are fsynced. Watched with strace on the real binary.

use std::process::Command;

use anyhow::{bail, Context, Result};
use pitr_tests::{pitr_bin, scratch_dir};

/// The fd a line such as `123 openat(AT_FDCWD, "/x/key", O_WRONLY|…) = 9` returned for `path`.
fn opened_fd(line: &str, path: &str) -> Option<String> {
    if !line.contains("openat(") || !line.contains(&format!("\"{path}\"")) {
        return None;
    }
    line.rsplit_once("= ").map(|(_, fd)| fd.trim().to_string()).filter(|fd| fd.chars().all(|c| c.is_ascii_digit()))
}

#[test]
fn init_fsyncs_the_new_key_file_and_its_directory() -> Result<()> {
    let dir = scratch_dir("key-file-fsync");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys)?;
    let key = keys.join("key");
    let config = dir.path().join("pitr.toml");
    std::fs::write(
        &config,
        format!("[repository]\npath = {:?}\n[encryption]\nkey_file = {:?}\n", dir.path().join("repo"), key),
    )?;
    let trace = dir.path().join("trace");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=openat,fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(pitr_bin())
        .arg("--config")
        .arg(&config)
        .arg("init")
        .output()
        .context("running strace (install it: apt-get install strace)")?;
    if !out.status.success() {
        bail!(
            "strace pitr init failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let trace = std::fs::read_to_string(&trace)?;
    let (key, keys) = (key.display().to_string(), keys.display().to_string());
    // In order: the key file is created, written and fsynced, then its directory opened and fsynced.
    let mut key_fd = None;
    let (mut key_synced, mut dir_fd, mut dir_synced) = (false, None, false);
    for line in trace.lines() {
        if key_fd.is_none() {
            key_fd = opened_fd(line, &key).filter(|_| line.contains("O_CREAT"));
        } else if !key_synced {
            key_synced = key_fd.as_ref().is_some_and(|fd| line.contains(&format!("fsync({fd})")));
        } else if dir_fd.is_none() {
            dir_fd = opened_fd(line, &keys);
        } else if dir_fd.as_ref().is_some_and(|fd| line.contains(&format!("fsync({fd})"))) {
            dir_synced = true;
            break;
        }
    }
    assert!(key_synced, "the key file was not fsynced after its creation:\n{trace}");
    assert!(dir_synced, "the key file's directory was not fsynced after the key file was created:\n{trace}");
    Ok(())
}
