//! File-tree backups (`[[files]]` sets) end to end, through the `pitr` binary and a local
//! repository: a tree of thousands of files backed up, changed and backed up again (the second
//! stores only the changes), restored to both moments and compared exactly (content, modes,
//! symlinks, mtimes, owners), a `--path` restore, `verify --live` listing exactly what changed
//! (and silent corruption), a file written during the backup reported, bad input refused without
//! writing anything, planted manifests refused, and expire's retention and block sweep.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta, Repository};
use pitr_tests::checks::{assert_untouched, expect_failure, expect_success, run_pitr, snapshot};
use pitr_tests::scratch_dir;

/// A scratch directory with a repository, a key file, a tree and a config with one set `up`.
struct Env {
    dir: tempfile::TempDir,
    repo: PathBuf,
    key: PathBuf,
    tree: PathBuf,
    config: PathBuf,
}

impl Env {
    fn new(name: &str, keep_days: u32) -> Env {
        let dir = scratch_dir(&format!("files-{name}"));
        let (repo, key, tree) = (dir.path().join("repo"), dir.path().join("key"), dir.path().join("tree"));
        std::fs::create_dir(&tree).unwrap();
        let config = dir.path().join("pitr.toml");
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let text = format!(
            "[repository]\npath = {}\n[encryption]\nkey_file = {}\n[metrics]\nlisten = \"\"\n\
             [[files]]\nname = \"up\"\npath = {}\nexclude = [\"*.tmp\", \"cache/**\"]\nkeep_days = {keep_days}\n\
             [[files]]\nname = \"cfg\"\npath = {}\n",
            q(&repo),
            q(&key),
            q(&tree),
            q(&dir.path().join("cfg")),
        );
        std::fs::write(&config, text).unwrap();
        let env = Env { dir, repo, key, tree, config };
        expect_success(&env.config, &["init"]);
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = expect_success(&self.config, args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("pitr {args:?}: not JSON ({e}):\n{out}"))
    }

    fn backup(&self, incremental: bool) -> serde_json::Value {
        let mut args = vec!["backup", "--source", "files", "--set", "up", "--json"];
        if incremental {
            args.push("--incremental");
        }
        self.json(&args)
    }

    fn restore(&self, to: &str, target: &Path, paths: &[&str]) {
        let target = target.display().to_string();
        let mut args = vec!["restore", "--source", "files", "--set", "up", "--to", to, "--target-dir", &target];
        for p in paths {
            args.extend(["--path", p]);
        }
        expect_success(&self.config, &args);
    }

    fn sealed_repo(&self) -> Repository {
        Repository::new(Arc::new(LocalStore::new(&self.repo)), KeyRing::load(&self.key).unwrap())
    }

    fn blocks(&self) -> usize {
        fn count(dir: &Path) -> usize {
            std::fs::read_dir(dir)
                .map(|rd| rd.map(|e| e.unwrap().path()).map(|p| if p.is_dir() { count(&p) } else { 1 }).sum())
                .unwrap_or(0)
        }
        count(&self.repo.join("files/blocks"))
    }
}

// ---------------------------------------------------------------------------
// Trees: made, recorded, compared
// ---------------------------------------------------------------------------

/// The harness's noise, with small seeds spread over the whole word first.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    pitr_tests::pseudo_random(len, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn write(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Sets `path`'s mtime (not following a symlink).
fn set_mtime(path: &Path, secs: i64, nsec: i64) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let times =
        [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }, libc::timespec { tv_sec: secs, tv_nsec: nsec }];
    // SAFETY: a NUL-terminated path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {}: {}", path.display(), std::io::Error::last_os_error());
}

/// 3000 small files in 30 directories, three of 4 MiB, an empty directory, symlinks (one
/// dangling), odd modes, and files the set excludes.
fn make_tree(root: &Path) {
    for d in 0..30 {
        for f in 0..100 {
            let n = d * 100 + f;
            let len = (n * 37) % 8192;
            write(&root.join(format!("d{d:02}/f{f:03}")), &pseudo_random(len, n as u64 + 1));
        }
    }
    for b in 0..3 {
        write(&root.join(format!("big/b{b}")), &pseudo_random(4 << 20, 1000 + b));
    }
    std::fs::create_dir_all(root.join("empty/inner")).unwrap();
    std::os::unix::fs::symlink("../d00/f001", root.join("big/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    chmod(&root.join("d00/f002"), 0o600);
    chmod(&root.join("d00/f003"), 0o755);
    chmod(&root.join("d00/f004"), 0o4755);
    chmod(&root.join("d01"), 0o750);
    set_mtime(&root.join("d00/f005"), 1_000_000_000, 123_456_789);
    write(&root.join("d02/scratch.tmp"), b"excluded by name");
    write(&root.join("cache/x/y"), b"excluded by path");
}

/// One path as a comparison sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Directories' mtimes are compared too (restore sets them last).
    mtime: (i64, i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
}

/// Every path under `root` (the root itself as `.`), what the set would back up: `*.tmp` and
/// `cache/**` left out (the `cache` directory itself stays).
fn record(root: &Path) -> BTreeMap<String, Rec> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Rec>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            if rel.ends_with(".tmp") || rel.starts_with("cache/") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let kind = if meta.is_dir() {
                walk(root, &path, out);
                Kind::Dir
            } else if meta.file_type().is_symlink() {
                Kind::Symlink(std::fs::read_link(&path).unwrap())
            } else {
                Kind::File(std::fs::read(&path).unwrap())
            };
            out.insert(rel, rec(&meta, kind));
        }
    }
    fn rec(meta: &std::fs::Metadata, kind: Kind) -> Rec {
        // A symlink's own mode is always 0777 on Linux; nothing to restore.
        let mode = if matches!(kind, Kind::Symlink(_)) { 0o777 } else { meta.mode() & 0o7777 };
        Rec { kind, mode, uid: meta.uid(), gid: meta.gid(), mtime: (meta.mtime(), meta.mtime_nsec()) }
    }
    let mut out = BTreeMap::new();
    out.insert(".".to_string(), rec(&std::fs::metadata(root).unwrap(), Kind::Dir));
    walk(root, root, &mut out);
    out
}

/// Fails naming the first differences between two recordings.
fn assert_same(what: &str, want: &BTreeMap<String, Rec>, got: &BTreeMap<String, Rec>, compare_root: bool) {
    let mut diffs = Vec::new();
    for (path, w) in want {
        if path == "." && !compare_root {
            continue;
        }
        match got.get(path) {
            None => diffs.push(format!("missing: {path}")),
            Some(g) if g != w => {
                let show = |r: &Rec| {
                    let k = match &r.kind {
                        Kind::File(d) => format!("file of {} bytes", d.len()),
                        Kind::Dir => "dir".into(),
                        Kind::Symlink(t) => format!("symlink to {}", t.display()),
                    };
                    format!("{k}, mode {:o}, owner {}:{}, mtime {:?}", r.mode, r.uid, r.gid, r.mtime)
                };
                diffs.push(format!("differs: {path}: want {}; got {}", show(w), show(g)));
            }
            _ => {}
        }
    }
    diffs.extend(
        got.keys()
            .filter(|p| !want.contains_key(*p) && (compare_root || *p != "."))
            .map(|p| format!("unexpected: {p}")),
    );
    assert!(
        diffs.is_empty(),
        "{what}: {} differences:\n  {}",
        diffs.len(),
        diffs.iter().take(20).cloned().collect::<Vec<_>>().join("\n  ")
    );
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x["path"].as_str().unwrap().to_string()))
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[test]
fn a_tree_backed_up_changed_and_backed_up_again_restores_exactly_to_both_moments() {
    let env = Env::new("tree", 90);
    make_tree(&env.tree);
    let first_state = record(&env.tree);
    assert!(first_state.len() > 3000, "{} paths", first_state.len());
    // A file whose stamps are within 2 s of its read is read again by the next incremental
    // (racily clean): let the tree settle, so the incremental below reads only what changes.
    std::thread::sleep(Duration::from_millis(2100));

    let first = env.backup(false);
    assert_eq!(first["kind"], "full");
    assert_eq!(first["files"], 3003, "{first}");
    assert!(first["changed"].as_array().unwrap().is_empty(), "{first}");
    let first_stored = first["stored_bytes"].as_u64().unwrap();
    let logical = first["logical_bytes"].as_u64().unwrap();
    assert!(first_stored > logical / 2, "{first}");

    // Ids are start seconds; and changed files must get other mtimes.
    std::thread::sleep(Duration::from_millis(1100));
    for f in ["d04/f000", "d04/f001", "d05/f050", "d06/f099", "d07/f007"] {
        write(&env.tree.join(f), &pseudo_random(3000, 77 + f.len() as u64));
    }
    // A line inserted into a big file: content-defined blocks change only around it.
    let mut big = std::fs::read(env.tree.join("big/b1")).unwrap();
    big.splice(2 << 20..2 << 20, b"inserted in the middle\n".iter().copied());
    write(&env.tree.join("big/b1"), &big);
    for d in 0..10 {
        std::fs::remove_file(env.tree.join(format!("d08/f{d:03}"))).unwrap();
    }
    for n in 0..20 {
        write(&env.tree.join(format!("new/n{n:02}")), &pseudo_random(2048, 5000 + n));
    }
    for n in 0..5 {
        std::fs::rename(env.tree.join(format!("d09/f{n:03}")), env.tree.join(format!("d09/renamed{n}"))).unwrap();
    }
    chmod(&env.tree.join("d10/f010"), 0o640);
    std::fs::remove_file(env.tree.join("dangling")).unwrap();
    std::os::unix::fs::symlink("d00/f000", env.tree.join("dangling")).unwrap();
    let second_state = record(&env.tree);

    let second = env.backup(true);
    assert_eq!(second["kind"], "incremental", "{second}");
    assert_eq!(second["parent"], first["id"], "{second}");
    let second_stored = second["stored_bytes"].as_u64().unwrap();
    // The changes: about 60 kB of small files and a block or two of a big one (at most 2 MiB of
    // 1 MiB blocks). A full re-store would be the first backup's size again (over 20 MB).
    assert!(second_stored < 3 << 20, "the second backup stored {second_stored} bytes: {second}");
    assert!(second_stored * 5 < first_stored, "{second_stored} vs {first_stored}");
    // Unchanged files were not read again.
    let read = second["bytes_read"].as_u64().unwrap();
    assert!(read < (4 << 20) + 200_000, "the incremental read {read} bytes");
    println!("first backup stored {first_stored} bytes, the second {second_stored} ({read} bytes read)");

    let listing = env.json(&["list", "--json"]);
    let backups = listing["file_sets"]["up"]["backups"].as_array().unwrap().clone();
    assert_eq!(backups.len(), 2, "{listing}");
    let first_stop = backups[0]["stop_time"].as_str().unwrap().to_string();
    let text = expect_success(&env.config, &["list"]);
    assert!(text.contains("file sets:") && text.contains(first["id"].as_str().unwrap()), "{text}");

    // Both moments, exactly (the root's own mtime changed with the second backup's edits).
    let out1 = env.path("out1");
    env.restore(&first_stop, &out1, &[]);
    assert_same("restore to the first backup", &first_state, &record(&out1), true);
    let out2 = env.path("out2");
    env.restore("latest", &out2, &[]);
    assert_same("restore to the second backup", &second_state, &record(&out2), true);

    // A few paths only: a directory and a pattern, with their parents.
    let out3 = env.path("out3");
    env.restore("latest", &out3, &["d03", "d07/f01*", "big/link"]);
    let want: BTreeMap<String, Rec> = second_state
        .iter()
        .filter(|(p, _)| {
            p.starts_with("d03/")
                || p.starts_with("d07/f01")
                || *p == "big/link"
                || ["d03", "d07", "big"].contains(&p.as_str())
        })
        .map(|(p, r)| (p.clone(), r.clone()))
        .collect();
    assert_eq!(want.len(), 1 + 100 + 1 + 10 + 1 + 1, "{:?}", want.keys().collect::<Vec<_>>());
    assert_same("--path restore", &want, &record(&out3), false);

    // The live tree against the newest backup: exactly what changed since.
    let clean = run_pitr(&env.config, &["verify", "--source", "files", "--set", "up", "--live", "--json"]);
    assert!(clean.status.success(), "{}", String::from_utf8_lossy(&clean.stdout));
    write(&env.tree.join("d11/f000"), &pseudo_random(999, 1));
    std::fs::remove_file(env.tree.join("d11/f001")).unwrap();
    write(&env.tree.join("d11/added"), b"added");
    chmod(&env.tree.join("d11/f002"), 0o700);
    let live = env.json(&["verify", "--source", "files", "--set", "up", "--live", "--json"]);
    let r = &live["sets"][0]["live"];
    assert_eq!(strings(&r["added"]), ["d11/added"], "{live}");
    assert_eq!(strings(&r["removed"]), ["d11/f001"], "{live}");
    assert_eq!(strings(&r["modified"]), ["d11/f000"], "{live}");
    assert_eq!(strings(&r["metadata"]), ["d11/f002"], "{live}");
    assert!(strings(&r["corrupt"]).is_empty(), "{live}");
    assert_eq!(live["ok"], true, "a living tree's changes are listed, not failures: {live}");

    // Without --live: every manifest opens and every block is there.
    expect_success(&env.config, &["verify", "--source", "files"]);
}

/// Stores a copy of backup `id` of set `up` as the newest backup, edited by `edit`; its id.
fn plant_newest(env: &Env, id: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let repo = env.sealed_repo();
        let (_, json) = repo.get_opened(&format!("files/sets/up/{id}.manifest")).await.unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let planted_id = "20990101T000000Z".to_string();
        m["id"] = planted_id.clone().into();
        m["stop_time_us"] = 4_000_000_000_000_000i64.into();
        edit(&mut m);
        let name = format!("files/sets/up/{planted_id}.manifest");
        repo.put_sealed(&name, serde_json::to_vec(&m).unwrap(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
        planted_id
    })
}

#[test]
fn verify_live_tells_silent_corruption_from_a_rewrite_that_kept_the_mtime_and_deep_finds_junk_blocks() {
    let env = Env::new("live", 90);
    for f in ["kept-mtime", "victim", "moving", "plain"] {
        write(&env.tree.join(f), &pseudo_random(5000, f.len() as u64));
    }
    std::thread::sleep(Duration::from_millis(2100));
    let backup = env.backup(false);
    let id = backup["id"].as_str().unwrap().to_string();
    let live = || {
        let out = run_pitr(&env.config, &["verify", "--source", "files", "--set", "up", "--live", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.code(), v)
    };
    assert_eq!(live().0, Some(0));

    // Rewritten in place with the same size and its mtime put back (rsync -t, cp -p): the ctime
    // moved, so it is a change, not corruption.
    let victim = env.tree.join("kept-mtime");
    let meta = std::fs::metadata(&victim).unwrap();
    let mut data = std::fs::read(&victim).unwrap();
    data[0] ^= 0xff;
    std::fs::OpenOptions::new().write(true).open(&victim).unwrap().write_all(&data).unwrap();
    set_mtime(&victim, meta.mtime(), meta.mtime_nsec());
    let (code, v) = live();
    let r = &v["sets"][0]["live"];
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(strings(&r["modified"]), ["kept-mtime"], "{v}");
    assert!(r["modified"][0]["what"].as_str().unwrap().contains("ctime moved"), "{v}");
    assert!(strings(&r["corrupt"]).is_empty(), "{v}");

    // Content that differs from the backup's while size, mtime and ctime are the backup's:
    // silent corruption (here of the backup's side). A path the backup listed as changing
    // while it was read is not: its backed-up content was a read of a moving file.
    let other = "0".repeat(64);
    plant_newest(&env, &id, |m| {
        for e in m["entries"].as_array_mut().unwrap() {
            if e["path"] == "victim" || e["path"] == "moving" {
                e["sha256"] = other.clone().into();
            }
        }
        m["changed"] = serde_json::json!(["moving"]);
    });
    let (code, v) = live();
    let r = &v["sets"][0]["live"];
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(strings(&r["corrupt"]), ["victim"], "{v}");
    let mut modified = strings(&r["modified"]);
    modified.sort();
    assert_eq!(modified, ["kept-mtime", "moving"], "{v}");
    let out = run_pitr(&env.config, &["verify", "--source", "files", "--set", "up", "--live"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CORRUPT victim"), "{text}");

    // Junk under a block's name: there by a listing, found only by opening it (--deep).
    let block = {
        let mut dirs = std::fs::read_dir(env.repo.join("files/blocks")).unwrap();
        let hh = dirs.next().unwrap().unwrap().path();
        std::fs::read_dir(hh).unwrap().next().unwrap().unwrap().path()
    };
    std::fs::write(&block, b"not a sealed block").unwrap();
    expect_success(&env.config, &["verify", "--source", "files", "--set", "up"]);
    let out = run_pitr(&env.config, &["verify", "--source", "files", "--set", "up", "--deep"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let name = block.file_name().unwrap().to_string_lossy().to_string();
    assert!(text.contains("damaged block") && text.contains(&name), "{text}");
}

#[test]
fn a_restore_by_a_user_who_is_not_root_gives_directories_modes_that_lock_the_user_out() {
    let env = Env::new("locked", 90);
    for (d, mode) in [("none", 0o000), ("wx", 0o300), ("x", 0o100)] {
        write(&env.tree.join(d).join("sub/f"), d.as_bytes());
        chmod(&env.tree.join(d), mode);
    }
    let backup = env.backup(false);
    assert_eq!(backup["dirs"], 7, "{backup}");
    pitr_tests::chown_to_pg_user(env.dir.path()).unwrap();
    let target = env.path("restored");
    let t = target.display().to_string();
    let mut cmd = std::process::Command::new(pitr_tests::pitr_bin());
    cmd.arg("--config").arg(&env.config);
    cmd.args(["restore", "--source", "files", "--set", "up", "--to", "latest", "--target-dir", &t]);
    let out = pitr_tests::as_pg_user(&mut cmd).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for (d, mode) in [("none", 0o000), ("wx", 0o300), ("x", 0o100)] {
        let m = std::fs::symlink_metadata(target.join(d)).unwrap();
        assert_eq!(m.mode() & 0o7777, mode, "{d}");
        assert_eq!(std::fs::read(target.join(d).join("sub/f")).unwrap(), d.as_bytes());
    }
    let names: Vec<String> =
        std::fs::read_dir(&target).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(names.len(), 3, "no staging directory is left: {names:?}");
}

#[test]
fn a_file_written_during_the_backup_is_reported() {
    let env = Env::new("changing", 90);
    write(&env.tree.join("steady"), b"steady");
    let growing = env.tree.join("growing.log");
    write(&growing, &pseudo_random(24 << 20, 3));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, growing) = (stop.clone(), growing.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().append(true).open(&growing).unwrap();
            while !stop.load(Ordering::Relaxed) {
                f.write_all(b"another log line\n").unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let summary = env.backup(false);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(strings(&summary["changed"]), ["growing.log"], "{summary}");
    let text = expect_success(&env.config, &["list"]);
    let row = text.lines().find(|l| l.contains(summary["id"].as_str().unwrap())).unwrap();
    assert!(row.trim_end().ends_with(" 1"), "the changed count is listed: {text}");

    // The text output names it too.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, growing) = (stop.clone(), growing.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().append(true).open(&growing).unwrap();
            while !stop.load(Ordering::Relaxed) {
                f.write_all(b"more\n").unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let out = expect_success(&env.config, &["backup", "--source", "files", "--set", "up"]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(out.contains("CHANGED DURING BACKUP growing.log"), "{out}");
}

#[test]
fn bad_input_is_one_clear_error_and_writes_nothing() {
    let env = Env::new("bad", 90);
    write(&env.tree.join("a/b.txt"), b"b");
    env.backup(false);
    let repo_before = snapshot(&env.repo);
    let target = env.path("target");
    let t = target.display().to_string();
    let restore = |extra: &[&str], to: &str| -> Vec<String> {
        let mut args: Vec<String> =
            ["restore", "--source", "files", "--set", "up", "--to", to, "--target-dir", &t].map(String::from).to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let check = |args: Vec<String>, phrases: &[&str]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_failure(&env.config, &args, phrases);
        assert!(!target.exists(), "pitr {args:?} created {}", target.display());
        assert_untouched(&env.repo, &repo_before, &format!("pitr {args:?}"));
    };

    expect_failure(&env.config, &["backup", "--source", "files", "--set", "nope"], &["\"nope\"", "up, cfg"]);
    assert_untouched(&env.repo, &repo_before, "a backup of an unknown set");
    let mut unknown = restore(&[], "latest");
    unknown[4] = "nope".into();
    check(unknown, &["no file set \"nope\"", "up, cfg"]);
    check(restore(&["--path", "nothing/*"], "latest"), &["--path \"nothing/*\" matches nothing"]);
    check(restore(&["--path", "../a"], "latest"), &["--path \"../a\"", "stay inside"]);
    check(restore(&["--path", "/etc/passwd"], "latest"), &["--path \"/etc/passwd\""]);
    check(restore(&[], "2001-01-01 00:00:00"), &["no backup of file set up had finished by 2001-01-01", "the oldest"]);
    check(restore(&[], "yesterday"), &["--to \"yesterday\": not a time"]);
    let mut empty_set = restore(&[], "latest");
    empty_set[4] = "cfg".into();
    check(empty_set, &["file set cfg has no backups"]);

    std::fs::create_dir(&target).unwrap();
    write(&target.join("precious"), b"mine");
    let target_before = snapshot(&target);
    let args = restore(&[], "latest");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_failure(&env.config, &args, &[&format!("target directory {t} is not empty")]);
    assert_untouched(&target, &target_before, "a restore into a non-empty directory");
    assert_untouched(&env.repo, &repo_before, "a restore into a non-empty directory");
}

#[tokio::test]
async fn planted_manifests_with_paths_outside_the_target_are_refused() {
    let env = Env::new("planted", 90);
    write(&env.tree.join("a/b.txt"), b"b");
    let genuine = env.backup(false);
    let repo = env.sealed_repo();
    let id = genuine["id"].as_str().unwrap();
    let name = format!("files/sets/up/{id}.manifest");
    let (_, json) = repo.get_opened(&name).await.unwrap();
    let original: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let file_entry = original["entries"].as_array().unwrap().iter().find(|e| e["path"] == "a/b.txt").unwrap().clone();
    let outside = env.path("outside");
    let cases: Vec<(&str, Vec<serde_json::Value>)> = vec![
        ("dotdot", vec![serde_json::json!({ "path": "../outside/escaped" })]),
        ("absolute", vec![serde_json::json!({ "path": format!("{}/abs", outside.display()) })]),
        (
            "through-a-symlink",
            vec![
                serde_json::json!({ "path": "lnk", "type": "symlink", "target": outside.display().to_string() }),
                serde_json::json!({ "path": "lnk/evil" }),
            ],
        ),
    ];
    std::fs::create_dir(&outside).unwrap();
    for (n, (case, extra)) in cases.into_iter().enumerate() {
        let mut planted = original.clone();
        let planted_id = format!("2099010{}T000000Z", n + 1);
        planted["id"] = planted_id.clone().into();
        planted["stop_time_us"] = (4_000_000_000_000_000i64 + n as i64).into();
        let entries = planted["entries"].as_array_mut().unwrap();
        for e in extra {
            let mut entry = file_entry.clone();
            for (k, v) in e.as_object().unwrap() {
                entry[k] = v.clone();
            }
            if entry["type"] == "symlink" {
                entry.as_object_mut().unwrap().retain(|k, _| !["size", "sha256", "blocks"].contains(&k.as_str()));
            }
            entries.push(entry);
        }
        entries.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
        let planted_name = format!("files/sets/up/{planted_id}.manifest");
        repo.put_sealed(&planted_name, serde_json::to_vec(&planted).unwrap(), ObjectMeta::plain(ObjectKind::Meta))
            .await
            .unwrap();
        let target = env.path(&format!("target-{case}"));
        let t = target.display().to_string();
        expect_failure(
            &env.config,
            &["restore", "--source", "files", "--set", "up", "--to", "latest", "--target-dir", &t],
            &["refusing to restore", &planted_id],
        );
        assert!(!target.exists(), "{case}: the target was created");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "{case}: something was written outside");
        assert!(!env.dir.path().join("outside/escaped").exists());
    }
    // The genuine backup still restores.
    let target = env.path("genuine");
    env.restore(genuine["stop_time"].as_str().unwrap(), &target, &[]);
    assert_eq!(std::fs::read(target.join("a/b.txt")).unwrap(), b"b");
}

#[tokio::test]
async fn expire_removes_old_backups_keeps_the_newest_and_sweeps_only_unreferenced_blocks() {
    let env = Env::new("expire", 3);
    write(&env.tree.join("kept"), &pseudo_random(100_000, 1));
    write(&env.tree.join("gone"), &pseudo_random(100_000, 2));
    let first = env.backup(false);
    std::fs::remove_file(env.tree.join("gone")).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let second = env.backup(false);
    assert_eq!(env.blocks(), 2);

    // Age both backups (re-sealed with the repository's key): 10 and 5 days old, both past the
    // set's 3 days; the newer is the newest and stays.
    let repo = env.sealed_repo();
    age(&repo, &first, 10).await;
    age(&repo, &second, 5).await;

    let before = snapshot(&env.repo);
    let dry = env.json(&["expire", "--dry-run", "--json"]);
    assert_eq!(dry["file_sets"]["removed_backups"].as_array().unwrap().len(), 1, "{dry}");
    assert_untouched(&env.repo, &before, "expire --dry-run");

    let report = env.json(&["expire", "--json"]);
    let f = &report["file_sets"];
    assert_eq!(f["removed_backups"][0]["id"], first["id"], "{report}");
    assert_eq!(f["removed_backups"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!((f["removed_blocks"].as_u64(), f["referenced_blocks"].as_u64()), (Some(1), Some(1)), "{report}");
    assert_eq!(env.blocks(), 1);
    let listing = env.json(&["list", "--json"]);
    let ids: Vec<&str> =
        listing["file_sets"]["up"]["backups"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [second["id"].as_str().unwrap()]);
    // What stays is whole.
    expect_success(&env.config, &["verify", "--source", "files", "--set", "up"]);
    let target = env.path("restored");
    env.restore("latest", &target, &[]);
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), pseudo_random(100_000, 1));
    assert!(!target.join("gone").exists());

    // Again: nothing more goes, the newest stays although it is older than keep_days.
    let again = env.json(&["expire", "--json"]);
    assert_eq!(again["file_sets"]["removed_backups"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["file_sets"]["removed_blocks"], 0, "{again}");
}

/// Re-seals backup `b`'s manifest of set `up` as finished `days` ago.
async fn age(repo: &Repository, b: &serde_json::Value, days: i64) {
    let name = format!("files/sets/up/{}.manifest", b["id"].as_str().unwrap());
    let (_, json) = repo.get_opened(&name).await.unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&json).unwrap();
    m["stop_time_us"] = (pitr_archive::now_us() - days * 86_400_000_000).into();
    repo.delete(&name).await.unwrap();
    repo.put_sealed(&name, serde_json::to_vec(&m).unwrap(), ObjectMeta::plain(ObjectKind::Meta)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_of_file_sets_expires_them_on_schedule() {
    let env = Env::new("scheduled-expire", 3);
    write(&env.tree.join("kept"), &pseudo_random(100_000, 3));
    write(&env.tree.join("gone"), &pseudo_random(100_000, 4));
    let first = env.backup(false);
    std::fs::remove_file(env.tree.join("gone")).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let second = env.backup(false);
    let repo = env.sealed_repo();
    age(&repo, &first, 10).await;
    age(&repo, &second, 5).await;

    // The sidecar with no database and no backup jobs: only expire, every 2 s.
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let config = env.path("sidecar.toml");
    let text = format!(
        "[repository]\npath = {}\n[encryption]\nkey_file = {}\n[metrics]\nlisten = \"\"\n\
         [schedule]\nexpire = \"*/2 * * * * *\"\nverify = \"\"\npartial_drill = \"\"\n\
         [[files]]\nname = \"up\"\npath = {}\nkeep_days = 3\nfull = \"\"\nincremental = \"\"\n",
        q(&env.repo),
        q(&env.key),
        q(&env.tree),
    );
    std::fs::write(&config, text).unwrap();
    let log = env.path("sidecar.log");
    let mut cmd = std::process::Command::new(pitr_tests::pitr_bin());
    cmd.arg("--config").arg(&config).arg("stream");
    let mut sidecar = pitr_tests::spawn_logged(cmd, &log).expect("spawning pitr stream");
    let listed = |env: &Env| -> Vec<String> {
        let listing = env.json(&["list", "--json"]);
        listing["file_sets"]["up"]["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while listed(&env) != [second["id"].as_str().unwrap()] {
        assert!(
            std::time::Instant::now() < deadline,
            "the scheduled expire did not remove the old backup in 60 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Its unreferenced block went with it; the newest stays whole.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env.blocks() != 1 {
        assert!(std::time::Instant::now() < deadline, "blocks left: {}", env.blocks());
        std::thread::sleep(Duration::from_millis(500));
    }
    sidecar.signal(libc::SIGTERM).unwrap();
    let status = sidecar.wait_timeout(Duration::from_secs(60)).unwrap().expect("pitr stream did not stop");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "pitr stream: {status}\n{text}");
    assert!(text.contains("scheduled expire of file sets and dumps done"), "{text}");
    expect_success(&env.config, &["verify", "--source", "files", "--set", "up"]);
}
