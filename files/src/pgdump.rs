//! The edge to PostgreSQL's own client programs: `pg_dump` writes a dump into the block store,
//! `pg_restore` reads one back from it, and one SQL connection names the database and server
//! version a dump came from.
//!
//! Passwords never reach a command line, which every user of the host can read in the process
//! list. The conninfo passed with `-d` is the parsed one without its password
//! ([`ConnInfo::redacted`]); a password the conninfo carried goes to `pg_dump` in a temporary
//! password file (mode 0600, named by `PGPASSFILE`, removed when the program ends) rather than in
//! `PGPASSWORD`, which PostgreSQL's documentation advises against because some systems show a
//! process's environment to other users. Without a password in the conninfo the programs find one
//! as libpq always does (`PGPASSWORD`, `~/.pgpass`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use pitr_pgwire::{ConnInfo, ConnectOptions, Connection};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use crate::{BlockRef, BlockStore, FilesError, StoredStream};

/// How much of a program's stderr is kept for its error message (the end of it: the reason
/// `pg_dump` gives comes last).
const STDERR_KEPT: usize = 16 * 1024;

/// How much of the dump is read from `pg_dump` at a time.
const READ_SIZE: usize = 256 * 1024;

/// What every custom-format archive starts with.
const CUSTOM_MAGIC: &[u8] = b"PGDMP";

/// Where `pg_dump` and `pg_restore` are taken from: a configured directory, else `PATH`.
#[derive(Debug, Clone, Default)]
pub struct PgTools {
    bin_dir: Option<PathBuf>,
}

impl PgTools {
    /// The programs in `bin_dir` if given, else the first found on `PATH`.
    pub fn new(bin_dir: Option<&Path>) -> PgTools {
        PgTools { bin_dir: bin_dir.map(Path::to_path_buf) }
    }

    /// The path of program `name`.
    pub fn program(&self, name: &str) -> Result<PathBuf, FilesError> {
        match &self.bin_dir {
            Some(dir) => {
                let path = dir.join(name);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(FilesError::Program { program: name.into(), what: format!("not found in {}", dir.display()) })
                }
            }
            None => std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| FilesError::Program {
                    program: name.into(),
                    what: "not found on PATH (set [postgres] bin_dir to PostgreSQL's binary directory)".into(),
                }),
        }
    }

    /// What `name --version` prints (`pg_dump (PostgreSQL) 15.18`), trimmed.
    pub async fn version(&self, name: &str) -> Result<String, FilesError> {
        let path = self.program(name)?;
        let out = Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| FilesError::io(&path, e))?;
        if !out.status.success() {
            return Err(FilesError::Program {
                program: path.display().to_string(),
                what: format!("--version failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// The database a conninfo leads to, as the server names it, and the server's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `current_database()`.
    pub database: String,
    /// `server_version_num`.
    pub server_version_num: u32,
}

/// Connects once (as `application_name` `pitr_dump`) and asks the server who it is.
pub async fn server_identity(info: &ConnInfo) -> Result<ServerIdentity, FilesError> {
    let opts = ConnectOptions { replication: false, application_name: "pitr_dump".into() };
    let database_error = |cause| FilesError::Database { server: info.redacted(), cause };
    let mut conn = Connection::connect(info, &opts).await.map_err(database_error)?;
    let result = conn.simple_query("SELECT current_database(), current_setting('server_version_num')").await;
    conn.close().await;
    let result = result.map_err(database_error)?;
    let database = result.text(0, 0).map(str::to_string);
    let version = result.text(0, 1).and_then(|v| v.parse::<u32>().ok());
    match (database, version) {
        (Some(database), Some(server_version_num)) => Ok(ServerIdentity { database, server_version_num }),
        _ => Err(FilesError::Other(format!(
            "{}: the server did not say which database and version it is",
            info.redacted()
        ))),
    }
}

/// A conninfo ready for a libpq program: the `-d` argument (no password) and the password file
/// that carries the password, if there is one (removed when this is dropped).
struct Libpq {
    conninfo: String,
    passfile: Option<tempfile::TempPath>,
}

impl Libpq {
    /// For a program that printed `version` (`--version`; `None` if it could not say).
    fn new(info: &ConnInfo, version: Option<&str>) -> Result<Libpq, FilesError> {
        let passfile = match &info.password {
            None => None,
            Some(password) => Some(passfile(password)?),
        };
        Ok(Libpq { conninfo: libpq_conninfo(info, version), passfile })
    }

    fn apply(&self, cmd: &mut Command) {
        cmd.arg("--no-password").arg("-d").arg(&self.conninfo);
        if let Some(path) = &self.passfile {
            // PGPASSWORD would win over the file: the conninfo's password is the one meant.
            cmd.env("PGPASSFILE", path.as_os_str()).env_remove("PGPASSWORD");
        }
    }
}

/// The major version in `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`.
fn major_of(version: &str) -> Option<u32> {
    let rest = &version[version.find("(PostgreSQL) ")? + "(PostgreSQL) ".len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// `info` without its password for a libpq program that printed `version`. libpq before 16 does
/// not know `require_auth` and refuses the whole conninfo with it, so it is left out for those
/// (pitr's own connection, made first, has checked the server against it).
fn libpq_conninfo(info: &ConnInfo, version: Option<&str>) -> String {
    match version.and_then(major_of) {
        Some(major) if major < 16 && info.require_auth.is_some() => {
            ConnInfo { require_auth: None, ..info.clone() }.redacted()
        }
        _ => info.redacted(),
    }
}

/// A password file (mode 0600, as libpq insists) whose one line matches every server.
fn passfile(password: &str) -> Result<tempfile::TempPath, FilesError> {
    if password.contains(['\n', '\r']) {
        return Err(FilesError::Other(
            "the conninfo's password holds a line break, which a PostgreSQL password file cannot carry".into(),
        ));
    }
    let escaped = password.replace('\\', "\\\\").replace(':', "\\:");
    let dir = std::env::temp_dir();
    let mut file =
        tempfile::Builder::new().prefix("pitr-pgpass-").tempfile_in(&dir).map_err(|e| FilesError::io(&dir, e))?;
    let path = file.path().to_path_buf();
    writeln!(file, "*:*:*:*:{escaped}").and_then(|()| file.flush()).map_err(|e| FilesError::io(&path, e))?;
    Ok(file.into_temp_path())
}

/// Reads a program's stderr to its end, keeping the last [`STDERR_KEPT`] bytes.
fn keep_stderr(child: &mut Child) -> tokio::task::JoinHandle<String> {
    let stderr = child.stderr.take();
    tokio::spawn(async move {
        let Some(mut stderr) = stderr else { return String::new() };
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * STDERR_KEPT {
                        kept.drain(..kept.len() - STDERR_KEPT);
                    }
                }
            }
        }
        if kept.len() > STDERR_KEPT {
            kept.drain(..kept.len() - STDERR_KEPT);
        }
        String::from_utf8_lossy(&kept).trim().to_string()
    })
}

fn failed(program: &str, status: ExitStatus, stderr: &str) -> FilesError {
    let said = if stderr.is_empty() { "(nothing on stderr)".to_string() } else { stderr.to_string() };
    FilesError::Program { program: program.into(), what: format!("failed ({status}): {said}") }
}

fn spawn(cmd: &mut Command, path: &Path) -> Result<Child, FilesError> {
    cmd.kill_on_drop(true).spawn().map_err(|e| FilesError::io(path, e))
}

/// What [`pg_dump`] stored.
#[derive(Debug, Clone)]
pub struct DumpRun {
    /// The dump, as blocks of the store.
    pub stream: StoredStream,
    /// µs since the Unix epoch: when `pg_dump` was started.
    pub start_time_us: i64,
    /// µs since the Unix epoch: when the last block was durable.
    pub stop_time_us: i64,
}

/// Runs `pg_dump --format=custom --compress=0` against `info` and stores what it writes as blocks
/// of `store`, with no copy on disk. Uncompressed, so that a day's dump shares its unchanged
/// blocks with the day before's (a compressed stream changes throughout after the first change);
/// the repository compresses every block it seals.
///
/// A `pg_dump` that fails (authentication, no such database, a server newer than it) is
/// [`FilesError::Program`] with the end of its stderr; the blocks it did write are referenced by
/// nothing and go with the next block sweep.
pub async fn pg_dump(tools: &PgTools, info: &ConnInfo, store: &BlockStore) -> Result<DumpRun, FilesError> {
    let path = tools.program("pg_dump")?;
    let libpq = Libpq::new(info, tools.version("pg_dump").await.ok().as_deref())?;
    let mut cmd = Command::new(&path);
    cmd.args(["--format=custom", "--compress=0"]);
    libpq.apply(&mut cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start_time_us = pitr_archive::now_us();
    let mut child = spawn(&mut cmd, &path)?;
    let stderr = keep_stderr(&mut child);
    let stored = match child.stdout.take() {
        Some(stdout) => store_stream(stdout, store).await,
        None => Err(FilesError::Other("pg_dump: no output pipe".into())),
    };
    let status = match &stored {
        // Stop it before it writes more: what it wrote is not going to be a dump.
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await
        }
        Ok(_) => child.wait().await,
    }
    .map_err(|e| FilesError::io(&path, e))?;
    let stderr = stderr.await.unwrap_or_default();
    if !status.success() {
        return Err(failed("pg_dump", status, &stderr));
    }
    let stream = stored?;
    Ok(DumpRun { stream, start_time_us, stop_time_us: pitr_archive::now_us() })
}

async fn store_stream(mut from: impl AsyncRead + Unpin, store: &BlockStore) -> Result<StoredStream, FilesError> {
    let mut writer = store.writer();
    let mut buf = vec![0u8; READ_SIZE];
    let mut head = Vec::with_capacity(CUSTOM_MAGIC.len());
    loop {
        let n = from.read(&mut buf).await.map_err(|e| FilesError::Other(format!("reading pg_dump's output: {e}")))?;
        if n == 0 {
            break;
        }
        if head.len() < CUSTOM_MAGIC.len() {
            let take = (CUSTOM_MAGIC.len() - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        writer.write(&buf[..n]).await?;
    }
    if head != CUSTOM_MAGIC {
        return Err(FilesError::Other(format!(
            "pg_dump's output does not start as a custom-format archive does (it starts with {:?})",
            String::from_utf8_lossy(&head)
        )));
    }
    writer.finish().await
}

/// Streams the dump made of `blocks` into `pg_restore --exit-on-error --single-transaction
/// --no-owner` connected to `info` (the database must exist). All or nothing: a `pg_restore`
/// error rolls its transaction back, and if the dump cannot be read to its end `pg_restore` is
/// killed before it sees the end of its input, so it never commits part of it. Returns the bytes
/// streamed.
pub async fn pg_restore(
    tools: &PgTools,
    info: &ConnInfo,
    store: &BlockStore,
    blocks: &[BlockRef],
) -> Result<u64, FilesError> {
    let path = tools.program("pg_restore")?;
    let libpq = Libpq::new(info, tools.version("pg_restore").await.ok().as_deref())?;
    let mut cmd = Command::new(&path);
    cmd.args(["--exit-on-error", "--single-transaction", "--no-owner"]);
    libpq.apply(&mut cmd);
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = spawn(&mut cmd, &path)?;
    let stderr = keep_stderr(&mut child);
    let Some(mut stdin) = child.stdin.take() else {
        return Err(FilesError::Other("pg_restore: no input pipe".into()));
    };
    let streamed = store.read_to(blocks, &mut stdin).await;
    if streamed.is_err() {
        // Killed before its input ends: a pg_restore that saw EOF might take a cut-short
        // archive's end for the real one.
        let status = child.try_wait().ok().flatten();
        if status.is_none() {
            let _ = child.start_kill();
        }
    }
    drop(stdin);
    let status = child.wait().await.map_err(|e| FilesError::io(&path, e))?;
    let stderr = stderr.await.unwrap_or_default();
    match streamed {
        Ok(n) if status.success() => Ok(n),
        // A pg_restore that stopped (an error in the dump's SQL) closes its input: its own
        // reason is the one to give, not the broken pipe.
        Ok(_) => Err(failed("pg_restore", status, &stderr)),
        Err(_) if !status.success() && !stderr.is_empty() && status.code().is_some() => {
            Err(failed("pg_restore", status, &stderr))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_archive::{KeyRing, LocalStore, Repository};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    async fn store_in(dir: &Path) -> BlockStore {
        let repo = Repository::new(Arc::new(LocalStore::new(dir)), KeyRing::from_key("k", [5; 32]));
        repo.init().await.unwrap();
        BlockStore::open(&repo).await.unwrap()
    }

    /// A `pg_dump` stand-in: records its arguments, environment and password file, then runs `body`.
    fn fake_program(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let script = format!(
            "#!/bin/sh\n[ \"$1\" = --version ] && {{ echo '{name} (PostgreSQL) 15.18'; exit 0; }}\nlog={log:?}\n\
             echo \"args: $*\" > \"$log\"\n\
             echo \"PGPASSWORD=${{PGPASSWORD-unset}}\" >> \"$log\"\n\
             echo \"PGPASSFILE=$PGPASSFILE\" >> \"$log\"\n\
             if [ -n \"$PGPASSFILE\" ]; then stat -c 'mode=%a' \"$PGPASSFILE\" >> \"$log\"; cat \"$PGPASSFILE\" >> \"$log\"; fi\n\
             {body}\n"
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn the_password_goes_in_a_private_file_never_on_the_command_line_and_the_file_is_removed() {
        let bin = tempfile::tempdir().unwrap();
        let repo = tempfile::tempdir().unwrap();
        fake_program(bin.path(), "pg_dump", "printf 'PGDMP the dump'");
        let tools = PgTools::new(Some(bin.path()));
        let info: ConnInfo = "host=db.example port=5433 user=dev dbname=devdb password='s3:cr\\\\et'".parse().unwrap();
        // The caller's PGPASSWORD is not handed on: it would override the conninfo's password.
        std::env::set_var("PGPASSWORD", "from-the-environment");
        let run = pg_dump(&tools, &info, &store_in(repo.path()).await).await.unwrap();
        assert_eq!(run.stream.len, 14);
        let log = std::fs::read_to_string(bin.path().join("pg_dump.log")).unwrap();
        let args = log.lines().next().unwrap();
        assert!(
            args.starts_with("args: --format=custom --compress=0 --no-password -d host=db.example port=5433"),
            "{log}"
        );
        assert!(args.contains("user=dev") && args.contains("dbname=devdb"), "{log}");
        assert!(!args.contains("s3") && !args.contains("password="), "{log}");
        assert!(log.contains("PGPASSWORD=unset"), "{log}");
        assert!(log.contains("mode=600"), "{log}");
        assert!(log.contains("*:*:*:*:s3\\:cr\\\\et"), "{log}");
        let passfile = log.lines().find_map(|l| l.strip_prefix("PGPASSFILE=")).unwrap();
        assert!(!passfile.is_empty() && !Path::new(passfile).exists(), "{passfile} is left behind");
    }

    #[test]
    fn require_auth_reaches_only_programs_whose_libpq_knows_it() {
        let info: ConnInfo = "host=db dbname=dev require_auth=scram-sha-256".parse().unwrap();
        assert_eq!(major_of("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"), Some(15));
        assert_eq!(major_of("pg_restore (PostgreSQL) 17beta1"), Some(17));
        let old = libpq_conninfo(&info, Some("pg_dump (PostgreSQL) 15.18"));
        assert!(!old.contains("require_auth") && old.contains("dbname=dev"), "{old}");
        let new = libpq_conninfo(&info, Some("pg_dump (PostgreSQL) 16.4"));
        assert!(new.contains("require_auth=scram-sha-256"), "{new}");
        assert_eq!(libpq_conninfo(&info, None), new);
    }

    #[tokio::test]
    async fn a_failing_pg_dump_is_its_own_error_and_output_that_is_no_custom_archive_is_refused() {
        let bin = tempfile::tempdir().unwrap();
        let repo = tempfile::tempdir().unwrap();
        let store = store_in(repo.path()).await;
        let info: ConnInfo = "host=127.0.0.1 dbname=nope".parse().unwrap();
        fake_program(
            bin.path(),
            "pg_dump",
            "printf PGDMP; echo 'pg_dump: error: database \"nope\" does not exist' >&2; exit 1",
        );
        let err = pg_dump(&PgTools::new(Some(bin.path())), &info, &store).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("pg_dump: failed (exit status: 1)") && text.contains("database \"nope\" does not exist"),
            "{text}"
        );

        fake_program(bin.path(), "pg_dump", "echo 'SELECT 1;'");
        let err = pg_dump(&PgTools::new(Some(bin.path())), &info, &store).await.unwrap_err();
        assert!(err.to_string().contains("custom-format"), "{err}");

        let err = pg_dump(&PgTools::new(Some(&bin.path().join("none"))), &info, &store).await.unwrap_err();
        assert!(err.to_string().contains("pg_dump: not found in"), "{err}");
    }

    #[tokio::test]
    async fn pg_restore_gets_the_dump_on_stdin_and_its_own_error_when_it_fails() {
        let bin = tempfile::tempdir().unwrap();
        let repo = tempfile::tempdir().unwrap();
        let store = store_in(repo.path()).await;
        let mut w = store.writer();
        let dump: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        w.write(&dump).await.unwrap();
        let stored = w.finish().await.unwrap();
        let received = bin.path().join("received");
        fake_program(bin.path(), "pg_restore", &format!("cat > {received:?}"));
        let info: ConnInfo = "host=127.0.0.1 dbname=copy".parse().unwrap();
        let tools = PgTools::new(Some(bin.path()));
        assert_eq!(pg_restore(&tools, &info, &store, &stored.blocks).await.unwrap(), dump.len() as u64);
        assert_eq!(std::fs::read(&received).unwrap(), dump);
        let log = std::fs::read_to_string(bin.path().join("pg_restore.log")).unwrap();
        assert!(
            log.starts_with("args: --exit-on-error --single-transaction --no-owner --no-password -d host=127.0.0.1")
        );

        // Stops reading at once, as pg_restore does on an error: its message, not the broken pipe.
        fake_program(bin.path(), "pg_restore", "echo 'pg_restore: error: relation \"t\" already exists' >&2; exit 1");
        let err = pg_restore(&tools, &info, &store, &stored.blocks).await.unwrap_err();
        assert!(err.to_string().contains("relation \"t\" already exists"), "{err}");

        // A block that cannot be read: pg_restore is killed before it sees the end of its input.
        let ended = bin.path().join("ended");
        fake_program(bin.path(), "pg_restore", &format!("cat > /dev/null; touch {ended:?}"));
        let mut blocks = stored.blocks.clone();
        blocks.push(BlockRef { id: "ab".repeat(32), len: 1 });
        assert!(pg_restore(&tools, &info, &store, &blocks).await.is_err());
        assert!(!ended.exists(), "pg_restore saw the end of its input");
    }
}
