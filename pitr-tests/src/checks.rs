//! Checks for tests of failures: running `pitr` with a given config and judging how it failed
//! (one error message naming the problem), and snapshots of a directory tree to prove a command
//! left it (the repository, a target directory) exactly as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};

use crate::{lossy, pitr_bin};

// ---------------------------------------------------------------------------
// Running pitr and judging its failures
// ---------------------------------------------------------------------------

/// Runs `pitr --config <config> <args>` to completion; panics if it cannot be run at all.
pub fn run_pitr(config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(pitr_bin());
    cmd.arg("--config").arg(config).args(args);
    cmd.output().unwrap_or_else(|e| panic!("running pitr {args:?}: {e}"))
}

/// Runs `pitr --config <config> <args>` and panics (with its output) unless it exits 0; returns
/// stdout.
pub fn expect_success(config: &Path, args: &[&str]) -> String {
    let out = run_pitr(config, args);
    assert!(
        out.status.success(),
        "pitr {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        lossy(&out.stdout),
        lossy(&out.stderr)
    );
    lossy(&out.stdout)
}

/// Checks that a pitr run failed: a non-zero exit and exactly one error message on stderr, the
/// `pitr: ...` or `pitr wal-fetch: ...` line and anything after it, containing every phrase. Log
/// lines (which start with a time stamp) may come before it; any other line starting with `pitr`
/// counts as a second message. Returns the exit code and the message.
pub fn failure_of(what: &str, out: &Output, phrases: &[&str]) -> (i32, String) {
    let (status, stderr) = (out.status, lossy(&out.stderr));
    let code = status.code().unwrap_or_else(|| panic!("{what}: killed by a signal ({status})\nstderr:\n{stderr}"));
    assert_ne!(code, 0, "{what} succeeded but should have failed\nstdout:\n{}\nstderr:\n{stderr}", lossy(&out.stdout));
    let lines: Vec<&str> = stderr.lines().collect();
    let starts: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].starts_with("pitr")).collect();
    assert_eq!(starts.len(), 1, "{what}: expected exactly one error message on stderr:\n{stderr}");
    let first = lines[starts[0]];
    assert!(
        first.starts_with("pitr: ") || first.starts_with("pitr wal-fetch: "),
        "{what}: the message is not a `pitr: ` or `pitr wal-fetch: ` line:\n{stderr}"
    );
    let message = lines[starts[0]..].join("\n");
    for phrase in phrases {
        assert!(message.contains(phrase), "{what}: the error message does not contain {phrase:?}:\n{message}");
    }
    (code, message)
}

/// Runs `pitr --config <config> <args>` and checks it fails as [`failure_of`] describes.
pub fn expect_failure(config: &Path, args: &[&str], phrases: &[&str]) -> (i32, String) {
    let out = run_pitr(config, args);
    failure_of(&format!("pitr {}", args.join(" ")), &out, phrases)
}

// ---------------------------------------------------------------------------
// Snapshots of a directory tree
// ---------------------------------------------------------------------------

/// What a [`Snapshot`] holds of one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir,
    /// A file, by its whole contents.
    File(Vec<u8>),
    /// A symlink, by its target (it is never followed).
    Symlink(PathBuf),
}

/// Every directory, file and symlink under a root, by path relative to it; the root itself is the
/// entry `""`. A missing root gives an empty snapshot. Whole file contents are kept, so that a
/// snapshot can be written out again ([`materialise`]); the trees tests take them of (scratch
/// repositories) are tens of MB at most.
pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Takes a [`Snapshot`] of `root`; panics if anything below it cannot be read.
pub fn snapshot(root: &Path) -> Snapshot {
    fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
        let rel = |p: &Path| p.strip_prefix(root).expect("below the root").to_path_buf();
        out.insert(rel(dir), Entry::Dir);
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())).path();
            let meta = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
            let found = if meta.is_dir() {
                walk(root, &path, out);
                continue;
            } else if meta.file_type().is_symlink() {
                std::fs::read_link(&path).map(Entry::Symlink)
            } else {
                std::fs::read(&path).map(Entry::File)
            };
            out.insert(rel(&path), found.unwrap_or_else(|e| panic!("reading {}: {e}", path.display())));
        }
    }
    let mut out = Snapshot::new();
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

/// One line per path removed, changed or created between two snapshots.
pub fn differences(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut diffs = Vec::new();
    for (path, old) in before {
        match after.get(path) {
            None => diffs.push(format!("removed: {}", path.display())),
            Some(new) if new != old => diffs.push(format!("changed: {}", path.display())),
            _ => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        diffs.push(format!("created: {}", path.display()));
    }
    diffs
}

/// Fails naming every path that appeared, vanished or changed under `root` since `before`.
pub fn assert_untouched(root: &Path, before: &Snapshot, after_what: &str) {
    let after = snapshot(root);
    if &after == before {
        return;
    }
    let diffs = differences(before, &after);
    panic!("{} was modified by {after_what}:\n  {}", root.display(), diffs.join("\n  "));
}

/// Writes `snap` out below `root` (which must not exist yet).
pub fn materialise(root: &Path, snap: &Snapshot) -> Result<()> {
    for (rel, entry) in snap {
        let path = root.join(rel);
        match entry {
            Entry::Dir => std::fs::create_dir_all(&path),
            Entry::File(data) => std::fs::write(&path, data),
            Entry::Symlink(target) => std::os::unix::fs::symlink(target, &path),
        }
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
