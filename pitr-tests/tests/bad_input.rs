//! Bad input and a hostile world: every failure a user or the world can cause gets one clear
//! error message naming the problem and the place, a non-zero exit, and leaves the repository
//! byte-for-byte as it was.
//!
//! Only one PostgreSQL server is started (by the first test that needs a streamed archive): it
//! streams a little WAL into a repository, which is kept in memory and copied into each test's
//! own scratch directory, so tests can damage their copy freely.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::checks::{
    assert_untouched, expect_failure, expect_success, failure_of, materialise, snapshot, Snapshot,
};
use pitr_tests::pitr::{LocalObjects, PitrEnv};
use pitr_tests::{free_port, is_root, pitr_bin, scratch_dir, spawn_logged, wait_until, PgCluster, PgOptions};

// ---------------------------------------------------------------------------
// Scratch set-ups
// ---------------------------------------------------------------------------

/// A scratch directory with places for a repository, a key file and configs. Nothing but the
/// directory exists until a test makes it.
struct Scratch {
    dir: tempfile::TempDir,
    repo: PathBuf,
    key: PathBuf,
    /// `[repository] path = repo`, `[encryption] key_file = key`, no `[postgres]`.
    config: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = scratch_dir(&format!("bad-input-{name}"));
        let repo = dir.path().join("repo");
        let key = dir.path().join("key");
        let config = dir.path().join("pitr.toml");
        let s = Scratch { dir, repo, key, config };
        s.write_config("pitr.toml", &s.key, "", None, "");
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The config text for this scratch's repository with `key_file`, extra `[repository]` and
    /// `[stream]` lines and, if given, a `[postgres]` conninfo. The status file stays in here.
    fn config_text(
        &self,
        key_file: &Path,
        repository_extra: &str,
        conninfo: Option<&str>,
        stream_extra: &str,
    ) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut lines = vec!["[repository]".to_string(), format!("path = {}", q(&self.repo))];
        lines.extend(Some(repository_extra).filter(|e| !e.is_empty()).map(str::to_string));
        lines.extend(["[encryption]".to_string(), format!("key_file = {}", q(key_file))]);
        if let Some(c) = conninfo {
            lines.extend(["[postgres]".to_string(), format!("conninfo = {c:?}")]);
        }
        // No metrics server and no scheduled jobs: tests run in parallel and must not share a port.
        lines.extend(["[metrics]".to_string(), "listen = \"\"".to_string()]);
        lines.extend(["[schedule]".to_string(), "full_backup = \"\"".to_string()]);
        // wal-fetch's prefetch spool would appear beside the destinations these tests watch.
        lines.extend(["[backup]".to_string(), "prefetch_segments = 0".to_string()]);
        lines.extend(["[stream]".to_string(), format!("status_file = {}", q(&self.path("status.json")))]);
        lines.extend(Some(stream_extra).filter(|e| !e.is_empty()).map(str::to_string));
        lines.push(String::new());
        lines.join("\n")
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    fn write_config(
        &self,
        name: &str,
        key_file: &Path,
        repository_extra: &str,
        conninfo: Option<&str>,
        stream_extra: &str,
    ) -> PathBuf {
        self.write(name, &self.config_text(key_file, repository_extra, conninfo, stream_extra))
    }

    /// A config whose `[postgres]` points at a port where nothing listens and gives up quickly.
    fn unreachable_config(&self, name: &str, key_file: &Path) -> PathBuf {
        let port = free_port().expect("a free port");
        let conninfo = format!("host=127.0.0.1 port={port} user=postgres connect_timeout=2");
        self.write_config(name, key_file, "", Some(&conninfo), "startup_timeout = \"2s\"")
    }

    /// A directory for wal-fetch destinations, empty.
    fn dest_dir(&self) -> PathBuf {
        let d = self.path("dest");
        std::fs::create_dir_all(&d).expect("mkdir dest");
        d
    }
}

/// Writes a well-formed key file (mode 0600) holding one key.
fn write_key_file(path: &Path, id: &str, fill: u8) {
    let line = format!("pitr-key-v1 {id} {}\n", format!("{fill:02x}").repeat(32));
    std::fs::write(path, line).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    chmod(path, 0o600);
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn assert_dir_empty(dir: &Path, after_what: &str) {
    let left: Vec<_> = std::fs::read_dir(dir).expect("read dest dir").map(|e| e.expect("entry").file_name()).collect();
    assert!(left.is_empty(), "{after_what} left {left:?} in {}", dir.display());
}

// ---------------------------------------------------------------------------
// The one streamed archive
// ---------------------------------------------------------------------------

/// A repository `pitr stream` filled from a PostgreSQL 15 server, and its key.
struct Archive {
    repo: Snapshot,
    key: Vec<u8>,
    /// A segment the archive holds as a whole-segment object.
    segment: String,
    /// That object's name (its path relative to the repository).
    seg_object: String,
}

fn streamed_archive() -> &'static Archive {
    static ARCHIVE: OnceLock<Result<Archive, String>> = OnceLock::new();
    match ARCHIVE.get_or_init(|| stream_archive().map_err(|e| format!("{e:#}"))) {
        Ok(a) => a,
        Err(e) => panic!("could not stream the shared archive: {e}"),
    }
}

fn stream_archive() -> Result<Archive> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("bad-input-archive", &cluster, "")?;
    env.init()?;
    let mut stream = env.spawn_stream()?;
    env.wait_streaming(&cluster)?;
    cluster.psql("create table filler as select g, md5(g::text) as h from generate_series(1, 20000) g")?;
    let segment = cluster.psql("select pg_walfile_name(pg_switch_wal())")?;
    wait_until(&format!("{segment}.seg in the repository"), Duration::from_secs(60), || {
        Ok(env.wal_objects().is_ok_and(|names| names.contains(&format!("{segment}.seg"))))
    })
    .with_context(|| env.stream_logs())?;
    env.stop_stream(&mut stream)?;
    let seg_object = format!("{}{segment}.seg", env.wal_prefix()?);
    Ok(Archive { repo: snapshot(&env.repo), key: std::fs::read(&env.key_file)?, segment, seg_object })
}

/// A private copy of the streamed archive: its repository and key (mode 0600) in a scratch dir.
fn archive_copy(name: &str) -> (Scratch, &'static Archive) {
    let archive = streamed_archive();
    let s = Scratch::new(name);
    materialise(&s.repo, &archive.repo).expect("copying the archive");
    std::fs::write(&s.key, &archive.key).expect("writing the key");
    chmod(&s.key, 0o600);
    (s, archive)
}

/// The id of the (only) key in a key file pitr wrote.
fn key_id(key_file: &[u8]) -> String {
    let text = String::from_utf8_lossy(key_file);
    let line = text.lines().find(|l| l.starts_with("pitr-key-v1 ")).expect("a key line");
    line.split_whitespace().nth(1).expect("a key id").to_string()
}

// ---------------------------------------------------------------------------
// 1-4: the config file
// ---------------------------------------------------------------------------

/// Runs every subcommand against a bad config: each fails with the phrases, and nothing (no
/// repository, no key file) is created.
fn assert_config_refused(s: &Scratch, config: &Path, phrases: &[&str]) {
    let dest = s.path("fetched");
    let dest_arg = dest.display().to_string();
    for args in [&["init"][..], &["status"], &["stream"], &["wal-fetch", "000000010000000000000001", &dest_arg]] {
        let (code, _) = expect_failure(config, args, phrases);
        if args[0] == "wal-fetch" {
            assert_eq!(code, 126, "wal-fetch with a bad config must abort recovery (exit 126)");
        }
    }
    assert!(!s.repo.exists(), "a repository was created at {} despite a bad config", s.repo.display());
    assert!(!s.key.exists(), "a key file was created at {} despite a bad config", s.key.display());
    assert!(!dest.exists(), "wal-fetch wrote {} despite a bad config", dest.display());
}

#[test]
fn missing_config_file_is_named() {
    let s = Scratch::new("no-config");
    for missing in [PathBuf::from("/nonexistent/pitr.toml"), s.path("nope.toml")] {
        let m = missing.display().to_string();
        assert_config_refused(&s, &missing, &[&m, "not found"]);
    }
}

#[test]
fn malformed_toml_names_the_line() {
    let s = Scratch::new("malformed");
    let good = s.config_text(&s.key, "", None, "");
    // An unclosed table header on line 3.
    let broken = good.replacen("[encryption]", "[encryption", 1);
    assert_eq!(broken.lines().nth(2), Some("[encryption"), "the test's config layout changed");
    let config = s.write("header.toml", &broken);
    assert_config_refused(&s, &config, &[&config.display().to_string(), "line 3"]);
    // An unterminated string on line 4.
    let line = good.lines().position(|l| l.starts_with("key_file")).map(|i| i + 1);
    assert_eq!(line, Some(4), "the test's config layout changed");
    let broken = {
        let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
        lines[3] = "key_file = \"/etc/pitr/key".into();
        lines.join("\n")
    };
    let config = s.write("string.toml", &broken);
    assert_config_refused(&s, &config, &[&config.display().to_string(), "line 4"]);
}

#[test]
fn unknown_keys_and_sections_are_named() {
    let s = Scratch::new("unknown-key");
    let cases = [
        (s.config_text(&s.key, "", None, "flush_intervall = \"1s\""), vec!["flush_intervall", "stream"]),
        (s.config_text(&s.key, "compression = 3", None, ""), vec!["compression", "repository"]),
        (format!("{}[postgress]\nconninfo = \"host=db\"\n", s.config_text(&s.key, "", None, "")), vec!["postgress"]),
    ];
    for (i, (config_text, phrases)) in cases.into_iter().enumerate() {
        let config = s.write(&format!("unknown-{i}.toml"), &config_text);
        let config_name = config.display().to_string();
        let mut phrases = phrases;
        phrases.push(&config_name);
        assert_config_refused(&s, &config, &phrases);
    }
}

#[test]
fn bad_values_name_the_key() {
    let s = Scratch::new("bad-value");
    let k = &s.key;
    let relative = s.config_text(k, "", None, "").replace(&format!("{:?}", s.repo.display().to_string()), "\"repo\"");
    let cases = [
        (s.config_text(k, "", None, "flush_interval = \"soon\""), vec!["stream.flush_interval", "soon"]),
        (s.config_text(k, "", None, "startup_timeout = 5"), vec!["stream.startup_timeout"]),
        (s.config_text(k, "", None, "max_pending_bytes = 0"), vec!["[stream] max_pending_bytes"]),
        (s.config_text(k, "", Some("port=abc"), ""), vec!["[postgres] conninfo", "abc"]),
        (s.config_text(k, "", Some("host=db sslmode=sometimes"), ""), vec!["[postgres] conninfo", "sometimes"]),
        (s.config_text(k, "zstd_level = 99", None, ""), vec!["[repository] zstd_level", "99"]),
        (s.config_text(k, "wal_zstd_level = 0", None, ""), vec!["[repository] wal_zstd_level", "0"]),
        (relative, vec!["[repository] path", "absolute"]),
    ];
    for (i, (config_text, phrases)) in cases.into_iter().enumerate() {
        let config = s.write(&format!("bad-{i}.toml"), &config_text);
        let config_name = config.display().to_string();
        let mut phrases = phrases;
        phrases.push(&config_name);
        assert_config_refused(&s, &config, &phrases);
    }
}

// ---------------------------------------------------------------------------
// 5: the server is not there
// ---------------------------------------------------------------------------

#[test]
fn unreachable_server_is_named_and_stream_gives_up() {
    let s = Scratch::new("unreachable");
    expect_success(&s.config, &["init"]);
    let port = free_port().expect("a free port");
    let config = s.write_config(
        "unreachable.toml",
        &s.key,
        "",
        Some(&format!("host=127.0.0.1 port={port} user=postgres")),
        "startup_timeout = \"2s\"",
    );
    let before = snapshot(&s.repo);

    let log = s.path("stream.log");
    let mut cmd = Command::new(pitr_bin());
    cmd.arg("--config").arg(&config).arg("stream");
    let mut child = spawn_logged(cmd, &log).expect("spawning pitr stream");
    // A guard, not a measurement: startup_timeout is 2 s.
    let status = child.wait_timeout(Duration::from_secs(60)).expect("waiting for pitr stream");
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        child.kill9();
        panic!("pitr stream still runs 60 s after startup_timeout = 2s against a closed port:\n{stderr}")
    });
    let out = Output { status, stdout: Vec::new(), stderr: stderr.into_bytes() };
    failure_of("pitr stream", &out, &["cannot connect", &format!("127.0.0.1:{port}")]);
    assert_untouched(&s.repo, &before, "pitr stream against an unreachable server");
}

// ---------------------------------------------------------------------------
// 6-8: the key file
// ---------------------------------------------------------------------------

/// stream, status, expire, list and wal-fetch with `config` all fail with `phrases`; wal-fetch
/// exits 126 and writes nothing; the repository is untouched.
fn assert_key_refused(s: &Scratch, config: &Path, segment: &str, phrases: &[&str]) {
    let before = snapshot(&s.repo);
    let dest_dir = s.dest_dir();
    let dest = dest_dir.join(segment).display().to_string();
    for args in [&["stream"][..], &["status"], &["expire"], &["list"]] {
        expect_failure(config, args, phrases);
    }
    let (code, _) = expect_failure(config, &["wal-fetch", segment, &dest], phrases);
    assert_eq!(code, 126, "wal-fetch with an unusable key must abort recovery (exit 126)");
    assert_dir_empty(&dest_dir, "a refused wal-fetch");
    assert_untouched(&s.repo, &before, "commands with an unusable key file");
}

#[test]
fn wrong_key_file_is_refused() {
    let (s, archive) = archive_copy("wrong-key");
    let real_id = key_id(&archive.key);

    // A valid key file with another key id.
    let other = s.path("other-key");
    write_key_file(&other, "kother", 0x5a);
    let config = s.unreachable_config("other-id.toml", &other);
    let other_name = other.display().to_string();
    assert_key_refused(&s, &config, &archive.segment, &[&other_name, "wrong key", &real_id]);

    // The right key id with the wrong key material.
    let forged = s.path("forged-key");
    write_key_file(&forged, &real_id, 0xa5);
    let config = s.unreachable_config("forged.toml", &forged);
    let forged_name = forged.display().to_string();
    assert_key_refused(&s, &config, &archive.segment, &[&forged_name, "wrong key"]);

    // The real key still opens it all: the refusals were about the key alone.
    let dest = s.dest_dir().join("ok");
    expect_success(&s.config, &["wal-fetch", &archive.segment, &dest.display().to_string()]);
    assert_eq!(std::fs::metadata(&dest).expect("fetched segment").len(), 16 << 20);
}

#[test]
fn key_file_readable_by_others_is_refused() {
    let s = Scratch::new("open-key");
    expect_success(&s.config, &["init"]);
    let key_before = std::fs::read(&s.key).expect("key file");
    let key_name = s.key.display().to_string();
    let config = s.unreachable_config("open-key.toml", &s.key);
    for mode in [0o644, 0o640, 0o604] {
        chmod(&s.key, mode);
        let mode_text = format!("mode {mode:o}");
        assert_key_refused(&s, &config, "000000010000000000000001", &[&key_name, "chmod 600", &mode_text]);
        let before = snapshot(&s.repo);
        expect_failure(&config, &["init"], &[&key_name, "chmod 600"]);
        assert_untouched(&s.repo, &before, "pitr init with an open key file");
        let now = std::fs::metadata(&s.key).expect("key file").permissions().mode() & 0o777;
        assert_eq!(now, mode, "pitr changed the key file's mode itself");
    }
    assert_eq!(std::fs::read(&s.key).expect("key file"), key_before, "the key file was modified");
}

#[test]
fn missing_or_unreadable_key_file_is_named() {
    let s = Scratch::new("no-key");
    expect_success(&s.config, &["init"]);
    let seg = "000000010000000000000001";

    let missing = s.path("missing-key");
    let config = s.unreachable_config("missing.toml", &missing);
    let name = missing.display().to_string();
    assert_key_refused(&s, &config, seg, &["[encryption] key_file", &name, "No such file"]);
    assert!(!missing.exists(), "a command created the missing key file {name}");

    let dir = s.path("key-dir");
    std::fs::create_dir(&dir).expect("mkdir");
    let config = s.unreachable_config("dir.toml", &dir);
    let name = dir.display().to_string();
    assert_key_refused(&s, &config, seg, &["[encryption] key_file", &name, "directory"]);

    let under_file = s.key.join("key");
    let config = s.unreachable_config("under-file.toml", &under_file);
    let name = under_file.display().to_string();
    assert_key_refused(&s, &config, seg, &["[encryption] key_file", &name]);

    let empty = s.path("empty-key");
    std::fs::write(&empty, "# nothing here\n").expect("write");
    chmod(&empty, 0o600);
    let config = s.unreachable_config("empty.toml", &empty);
    let name = empty.display().to_string();
    assert_key_refused(&s, &config, seg, &[&name, "holds no key"]);

    let garbled = s.path("garbled-key");
    std::fs::write(&garbled, "# comment\npitr-key-v1 k1 not-hex\n").expect("write");
    chmod(&garbled, 0o600);
    let config = s.unreachable_config("garbled.toml", &garbled);
    let name = garbled.display().to_string();
    assert_key_refused(&s, &config, seg, &[&name, "line 2", "64 hex digits"]);

    if !is_root() {
        // Root reads any file, so this case only exists for other users.
        let unreadable = s.path("unreadable-key");
        write_key_file(&unreadable, "k1", 1);
        chmod(&unreadable, 0o000);
        let config = s.unreachable_config("unreadable.toml", &unreadable);
        let name = unreadable.display().to_string();
        assert_key_refused(&s, &config, seg, &[&name, "ermission denied"]);
    }
}

// ---------------------------------------------------------------------------
// 9-11: damaged and missing objects
// ---------------------------------------------------------------------------

/// wal-fetch of `segment` fails with exit 126, names the object and one of `reasons`, and
/// neither writes the destination nor touches the repository.
fn assert_fetch_aborts(s: &Scratch, archive: &Archive, reasons: &[&str], what: &str) {
    let before = snapshot(&s.repo);
    let dest_dir = s.dest_dir();
    let dest = dest_dir.join("x").display().to_string();
    let (code, message) = expect_failure(&s.config, &["wal-fetch", &archive.segment, &dest], &[&archive.seg_object]);
    assert_eq!(code, 126, "wal-fetch of {what} must exit 126 so that PostgreSQL stops recovery:\n{message}");
    assert!(
        reasons.iter().any(|r| message.contains(r)),
        "wal-fetch of {what}: expected one of {reasons:?} in:\n{message}"
    );
    assert_dir_empty(&dest_dir, &format!("wal-fetch of {what}"));
    assert_untouched(&s.repo, &before, &format!("wal-fetch of {what}"));
}

#[test]
fn flipped_byte_in_a_wal_object_aborts_recovery() {
    let (s, archive) = archive_copy("flipped");
    // Intact, it fetches.
    let dest = s.dest_dir().join("intact");
    expect_success(&s.config, &["wal-fetch", &archive.segment, &dest.display().to_string()]);
    std::fs::remove_file(&dest).expect("remove the fetched segment");

    let objects = LocalObjects::new(&s.repo);
    let mut data = objects.read(&archive.seg_object).expect("the .seg object");
    let middle = data.len() / 2;
    data[middle] ^= 0x01;
    // A store cannot change an object in place: the flipped bytes are put under the same name.
    objects.replace(&archive.seg_object, data).expect("rewrite the object");
    assert_fetch_aborts(&s, archive, &["authentication failed"], "an object with a flipped byte");
}

#[test]
fn truncated_wal_object_aborts_recovery() {
    let (s, archive) = archive_copy("truncated");
    let objects = LocalObjects::new(&s.repo);
    let whole = objects.read(&archive.seg_object).expect("the .seg object");
    let reasons = ["truncated", "authentication failed"];
    for keep in [whole.len() - 7, whole.len() / 2, 40, 3, 0] {
        // A store cannot cut an object in place: the shorter bytes are put under the same name.
        objects.replace(&archive.seg_object, whole[..keep].to_vec()).expect("truncate the object");
        assert_fetch_aborts(&s, archive, &reasons, &format!("an object cut to {keep} of {} bytes", whole.len()));
    }
}

#[test]
fn segment_not_in_the_archive_is_exit_1() {
    let (s, archive) = archive_copy("not-archived");
    let before = snapshot(&s.repo);
    let dest_dir = s.dest_dir();
    let dest = dest_dir.join("x").display().to_string();
    // Far past the end, on a timeline the archive never saw, and a history file it lacks.
    let tli = &archive.segment[..8];
    let far = format!("{tli}0000000A00000001");
    for file in [far.as_str(), "000000050000000000000001", "00000002.history"] {
        let (code, message) = expect_failure(&s.config, &["wal-fetch", file, &dest], &[file, "not in the archive"]);
        assert_eq!(code, 1, "a file that is not archived must exit 1 (the end of the archive), not abort:\n{message}");
        assert_dir_empty(&dest_dir, &format!("wal-fetch of {file}"));
    }
    assert_untouched(&s.repo, &before, "wal-fetch of files that are not archived");
}

// ---------------------------------------------------------------------------
// 12 and init
// ---------------------------------------------------------------------------

#[test]
fn uninitialised_repository_says_run_init() {
    let s = Scratch::new("uninitialised");
    write_key_file(&s.key, "k1", 7);
    let config = s.unreachable_config("uninit.toml", &s.key);
    let repo_name = s.repo.display().to_string();
    let check = |what: &str| {
        let before = snapshot(&s.repo);
        let dest_dir = s.dest_dir();
        let dest = dest_dir.join("x").display().to_string();
        let phrases = [repo_name.as_str(), "pitr init"];
        expect_failure(&config, &["status"], &phrases);
        expect_failure(&config, &["stream"], &phrases);
        let (code, _) = expect_failure(&config, &["wal-fetch", "000000010000000000000001", &dest], &phrases);
        assert_eq!(code, 126, "wal-fetch from {what} must abort recovery");
        assert_dir_empty(&dest_dir, &format!("wal-fetch from {what}"));
        assert_untouched(&s.repo, &before, &format!("commands against {what}"));
    };
    // No directory at all (an unmounted volume, a typo): nothing may create it.
    check("a repository directory that does not exist");
    assert!(!s.repo.exists());
    // An empty directory.
    std::fs::create_dir(&s.repo).expect("mkdir repo");
    check("an empty repository directory");
}

#[test]
fn a_repository_of_a_newer_format_is_refused_by_every_command() {
    use pitr_archive::{KeyRing, LocalStore, ObjectKind, ObjectMeta, Repository};
    let (s, archive) = archive_copy("newer-format");
    // What a newer pitr's `init` would have written: the marker sealed with the same key, naming
    // format 2. (This pitr's own commands read the archive's WAL before the marker is swapped.)
    let marker = s.repo.join("pitr-repository");
    std::fs::remove_file(&marker).expect("removing the marker");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let repo =
            Repository::new(std::sync::Arc::new(LocalStore::new(&s.repo)), KeyRing::load(&s.key).expect("the key"));
        let meta = ObjectMeta::plain(ObjectKind::Meta);
        repo.put_sealed("pitr-repository", b"pitr repository format 2\n".to_vec(), meta).await.expect("marker");
    });
    // A file set too, so that its backup and restore are judged as well.
    let tree = s.path("tree");
    std::fs::create_dir(&tree).expect("mkdir tree");
    std::fs::write(tree.join("a.txt"), b"file-set data").expect("writing a file of the set");
    let text = std::fs::read_to_string(s.unreachable_config("newer.toml", &s.key)).expect("config");
    let config =
        s.write("newer.toml", &format!("{text}[[files]]\nname = \"up\"\npath = {:?}\n", tree.display().to_string()));
    let repo_name = s.repo.display().to_string();
    let phrases = [repo_name.as_str(), "format 2", "newer than this pitr reads", "use a newer pitr"];
    let before = snapshot(&s.repo);
    let dest_dir = s.dest_dir();
    let dest = dest_dir.join(&archive.segment).display().to_string();
    let target = s.path("restored").display().to_string();
    for args in [
        &["init"][..],
        &["status"],
        &["stream"],
        &["verify"],
        &["expire"],
        &["list"],
        &["restore", "--to", "latest", "--target-dir", &target],
        &["backup", "--source", "files", "--set", "up"],
        &["restore", "--source", "files", "--set", "up", "--to", "latest", "--target-dir", &target],
        &["find", "--destructive"],
        &["find", "--source", "mongo", "--destructive"],
    ] {
        expect_failure(&config, args, &phrases);
        assert_untouched(&s.repo, &before, &format!("pitr {} against a repository of a newer format", args.join(" ")));
    }
    let (code, _) = expect_failure(&config, &["wal-fetch", &archive.segment, &dest], &phrases);
    assert_eq!(code, 126, "wal-fetch from a newer repository must abort recovery (exit 126)");
    assert_dir_empty(&dest_dir, "a refused wal-fetch");
    assert!(!Path::new(&target).exists(), "a refused restore made {target}");
    assert_untouched(&s.repo, &before, "commands against a repository of a newer format");
}

#[test]
fn init_twice_is_fine_and_init_with_another_key_is_refused() {
    let s = Scratch::new("init");
    let out = expect_success(&s.config, &["init"]);
    assert!(out.contains("initialised repository"), "{out}");
    let repo_before = snapshot(&s.repo);
    let key_before = std::fs::read(&s.key).expect("key file");

    let out = expect_success(&s.config, &["init"]);
    assert!(out.contains("already initialised"), "second init: {out}");
    assert_untouched(&s.repo, &repo_before, "a second pitr init");
    assert_eq!(std::fs::read(&s.key).expect("key file"), key_before, "a second init rewrote the key file");

    // A key path that does not exist yet: init must not mint a key that cannot open the repository.
    let fresh = s.path("fresh-key");
    let config = s.write_config("fresh.toml", &fresh, "", None, "");
    let fresh_name = fresh.display().to_string();
    let repo_name = s.repo.display().to_string();
    expect_failure(&config, &["init"], &[&fresh_name, &repo_name, "already initialised"]);
    assert!(!fresh.exists(), "pitr init left a new key file {fresh_name} that cannot open the repository");
    assert_untouched(&s.repo, &repo_before, "pitr init with a missing key file");

    // An existing, different key.
    let other = s.path("other-key");
    write_key_file(&other, "kother", 3);
    let config = s.write_config("other.toml", &other, "", None, "");
    let other_name = other.display().to_string();
    expect_failure(&config, &["init"], &[&other_name, "wrong key"]);
    assert_untouched(&s.repo, &repo_before, "pitr init with another key");

    // Same id, different material.
    let forged = s.path("forged-key");
    write_key_file(&forged, &key_id(&key_before), 4);
    let config = s.write_config("forged.toml", &forged, "", None, "");
    let forged_name = forged.display().to_string();
    expect_failure(&config, &["init"], &[&forged_name, "wrong key"]);
    assert_untouched(&s.repo, &repo_before, "pitr init with a forged key");
}
