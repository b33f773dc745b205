//! `pitr`: the command line. Parses arguments and the config, wires the library crates together
//! and turns their typed errors into messages for people. No archive or protocol logic lives here.
//!
//! Map: this file holds the clap definitions and the dispatch; [`cmd`] one module per subcommand;
//! [`config`] parsing and validation; [`open`] config → repository, cluster, catalog; [`tasks`]
//! the work a command and a scheduled job share; [`schedule`] the sidecar's jobs; [`sidecar`]
//! its metrics server, gauges and status file; [`output`] printing helpers. Dependencies point
//! down that list's reverse: nothing below `cmd` depends on it.

mod catalog_poll;
mod cmd;
mod config;
mod open;
mod output;
mod partial;
mod schedule;
mod sidecar;
mod tasks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "pitr", version, about = "Continuous backup and point-in-time recovery for PostgreSQL")]
struct Cli {
    /// Config file (default ./pitr.toml, or $PITR_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log level filter (e.g. info, debug, pitr_walstream=debug); also $PITR_LOG.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Source {
    Postgres,
    Mongo,
    /// A file tree (`[[files]]` set).
    Files,
    /// A logical dump (`[[dumps]]` set).
    Dump,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of the largest variant (restore's options) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Create the repository and, if missing, the key file.
    Init,
    /// The sidecar: stream WAL from the primary into the repository until stopped.
    Stream,
    /// Received, durable and primary LSN, lag, newest archived commit.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Preflight after a config change: config, key, repository, role, slot, pg_hba, WAL settings,
    /// restore binaries, clock skew; one OK/FAIL line each, exit 1 on any FAIL.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// PostgreSQL's restore_command: fetch SEGMENT (or a .history file) into DEST.
    WalFetch {
        segment: String,
        dest: PathBuf,
        /// Read from this repository first (`primary` or a secondary's name).
        #[arg(long)]
        from: Option<String>,
        /// Serve no WAL at or past this LSN (X/Y): written by `pitr restore` for a target after
        /// the newest archived commit, so replay stops at the archive's end as it was planned.
        #[arg(long, value_parser = parse_lsn_arg)]
        until_lsn: Option<u64>,
        /// Serve whole segments only; one the archive holds in part is not there yet (exit 1):
        /// written by `pitr restore --standby`, whose server asks again later.
        #[arg(long, conflicts_with = "until_lsn")]
        whole_segments: bool,
    },
    /// (internal) Spool the segments after SEGMENT into SPOOL; started by wal-fetch.
    #[command(hide = true)]
    WalPrefetch {
        segment: String,
        spool: PathBuf,
        #[arg(long, default_value_t = 8)]
        count: usize,
        #[arg(long)]
        from: Option<String>,
        #[arg(long, value_parser = parse_lsn_arg)]
        until_lsn: Option<u64>,
    },
    /// Copy to secondary NAME every object of the primary it lacks (idempotent; never deletes).
    Copy {
        /// A `[[repository.secondary]]` name.
        #[arg(long)]
        to: String,
        #[arg(long)]
        json: bool,
    },
    /// Take a base backup (the sidecar must be streaming to archive its WAL).
    Backup {
        /// An incremental against the newest backup (PostgreSQL 17+ with summarize_wal = on;
        /// otherwise a full backup, with a warning).
        #[arg(long)]
        incremental: bool,
        /// Take the backup from this streaming standby (a conninfo) instead of the primary, for
        /// this run (`[backup] conninfo` sets it for every backup); WAL still comes from the primary.
        /// Put no password in it (ps and shell history show it): use ~/.pgpass or $PGPASSFILE.
        #[arg(long, value_name = "CONNINFO")]
        from_standby: Option<String>,
        #[arg(long)]
        json: bool,
        /// What to back up: the `[postgres]` cluster, the `[mongo]` replica set or a `[[files]]`
        /// set (`--source files --set NAME`).
        #[arg(long, value_enum, default_value = "postgres")]
        source: Source,
        /// The `[[files]]` set to back up (with `--source files`).
        #[arg(long)]
        set: Option<String>,
        /// Pin the new backup: `pitr expire` keeps it (with its chain and WAL) until `pitr unpin`.
        /// PostgreSQL only.
        #[arg(long)]
        keep_forever: bool,
        /// A note on the new backup, shown by `list` (and by `status` while the backup is pinned;
        /// one line, at most 1024 bytes).
        /// PostgreSQL only.
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// Pin a PostgreSQL backup: `pitr expire` keeps it, its chain and the WAL to its consistency
    /// point, forever or until DATE.
    Pin {
        /// The backup id (from `pitr list`).
        id: String,
        /// Keep it until then only (YYYY-MM-DD, or a time as --to takes it); from then on it is
        /// an ordinary backup again.
        #[arg(long, value_name = "DATE")]
        until: Option<String>,
        /// A note, shown by `list` and, while the backup is pinned, `status` (replaces the
        /// backup's note; one line).
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Unpin a backup: retention judges it like any other again (not pinned: said, exit 0).
    Unpin {
        /// The backup id.
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// A logical dump of a `[[dumps]]` set, taken with the server's own `pg_dump`.
    Dump {
        /// The `[[dumps]]` set.
        #[arg(long)]
        set: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a named restore point on the primary (pg_create_restore_point) and wait until the
    /// archive holds it; restore to it with `restore --to name:NAME`.
    Mark {
        /// 1 to 63 bytes; no line break, carriage return or NUL.
        name: String,
        #[arg(long)]
        json: bool,
        /// How long to wait for the sidecar to archive it.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Create it even if the index holds a restore point of that name already (PostgreSQL
        /// stops at the first of a name it replays: --to name: reaches the newer one only from a
        /// backup taken between the two).
        #[arg(long)]
        allow_duplicate: bool,
    },
    /// Backups and the recoverable window per timeline.
    List {
        #[arg(long)]
        json: bool,
        /// List this repository (`primary` or a secondary's name).
        #[arg(long)]
        from: Option<String>,
    },
    /// Check the archive: WAL continuity, history files, every backup's blocks (--deep: open every object).
    Verify {
        #[arg(long)]
        deep: bool,
        #[arg(long)]
        json: bool,
        /// Check this repository alone (`primary` or a secondary's name); default the primary.
        #[arg(long)]
        from: Option<String>,
        /// What to check: the `[postgres]` cluster's archive, the `[mongo]` replica set's, the
        /// `[[files]]` sets' or the `[[dumps]]` sets'.
        #[arg(long, value_enum, default_value = "postgres")]
        source: Source,
        /// With `--source files`: only this set (default: every `[[files]]` set).
        #[arg(long)]
        set: Option<String>,
        /// With `--source files`: compare the newest backup's checksums with the live tree.
        #[arg(long)]
        live: bool,
        /// Decode the archived WAL and write the change index objects (`pitr find`) that are
        /// missing; a valid one is never overwritten.
        #[arg(long, conflicts_with_all = ["deep", "set", "live"])]
        rebuild_index: bool,
        /// With `--rebuild-index`: only segments holding commits at or after this time.
        #[arg(long = "since", value_name = "TIME", requires = "rebuild_index")]
        index_since: Option<String>,
        /// With `--rebuild-index`: replace index objects that cannot be read (deleted first).
        #[arg(long = "force", requires = "rebuild_index")]
        force_index: bool,
    },
    /// Keys: list master and repository keys, rotate, rewrap repository keys onto the active
    /// master key, retire an old master key.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Apply [retention]: remove expired backups, WAL no kept backup or the window needs, and
    /// blocks no manifest references.
    Expire {
        /// Say what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Restore drill: restore to a moment into a scratch server, check it, measure RTO and RPO.
    Drill {
        /// TIME, lsn:X/Y, xid:N, name:NAME (a restore point), immediate, latest, or random (a
        /// uniformly chosen second in the recoverable window); with --source mongo, TIME,
        /// ts:SECONDS:INC, latest or random.
        #[arg(long, default_value = "random")]
        to: String,
        /// `postgres` restores into a scratch data directory; `mongo` into `[mongo] drill_target_uri`.
        #[arg(long, value_enum, default_value = "postgres")]
        source: Source,
        /// TOML file of checks ([[check]] name, sql or collection + filter, expect, database, recorded).
        #[arg(long)]
        checks: Option<PathBuf>,
        /// Write the markdown report here (and the JSON beside it, FILE.json).
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Keep the scratch directory (stopped server) for inspection.
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        db_user: Option<String>,
        #[arg(long, default_value = "On demand")]
        test_type: String,
        /// Read from this repository first (`primary` or a secondary's name).
        #[arg(long)]
        from: Option<String>,
        /// A key rotation and re-encryption drill (PostgreSQL): make a new repository key, wrap
        /// the repository keys under a drill-only master key, restore with that key alone, then
        /// delete its wraps. The scheduled drill does this with `[drill] key_rotation = true`.
        #[arg(long)]
        key_rotation: bool,
        /// The weekly partial-restore drill: a random table (at --to, default a random second)
        /// copied into a fresh database on a scratch server and compared with the original, and
        /// random files of a random [[files]] set's newest backup checked against the manifest
        /// and the live files. The sidecar runs it on `[schedule] partial_drill`.
        #[arg(long)]
        partial: bool,
    },
    /// Restore to a moment: TIME (RFC 3339 or "YYYY-MM-DD HH:MM:SS[.ffffff][+TZ]"), latest, lsn:X/Y, xid:N, name:NAME (a restore point) or immediate (the backup's consistency point).
    Restore {
        /// With --source mongo: TIME, ts:SECONDS:INC or latest. With --standby: latest, the
        /// default there.
        #[arg(
            long,
            required = false,
            required_unless_present = "standby",
            default_value_if("standby", clap::builder::ArgPredicate::IsPresent, "latest")
        )]
        to: String,
        /// PostgreSQL: the data directory to restore into.
        #[arg(long)]
        target_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "postgres")]
        source: Source,
        /// MongoDB: the server to restore into (`mongodb://host:port/`), without a password (the
        /// process list shows it); default `[mongo] target_uri` / $PITR_MONGO_TARGET_URI.
        #[arg(long)]
        target_uri: Option<String>,
        /// MongoDB: a file whose first line is the URI of the server to restore into.
        #[arg(long, conflicts_with = "target_uri")]
        target_uri_file: Option<PathBuf>,
        /// MongoDB: drop the target's databases first (a non-empty target is refused without it).
        #[arg(long)]
        drop: bool,
        /// Run the server until the target is reached and report the achieved RPO and RTO; with
        /// --standby, until the standby is consistent and takes read-only connections.
        #[arg(long)]
        start: bool,
        /// Build a standby instead: it replays the archive and keeps following it (standby.signal,
        /// no recovery target, a restore_command without end), and the primary with
        /// --primary-conninfo. PostgreSQL only (no --table, --source other than postgres).
        #[arg(long)]
        standby: bool,
        /// With --standby: the primary it also streams from (a libpq conninfo), written as
        /// primary_conninfo.
        #[arg(long, value_name = "CONNINFO", requires = "standby")]
        primary_conninfo: Option<String>,
        /// Restore tablespace OID into DIR (absolute; missing or empty unless --force) instead of
        /// inside the target, pg_tblspc/OID linking there (repeatable). By OID only: backups do
        /// not record tablespace names.
        #[arg(long = "tablespace-map", value_name = "OID=DIR")]
        tablespace_map: Vec<String>,
        /// Restore into the existing data directory (--target-dir) of the same cluster, stopped:
        /// only blocks that differ from the backup are fetched and written, what the backup lacks
        /// is removed. A missing or empty directory gets a plain restore. PostgreSQL only.
        #[arg(long)]
        delta: bool,
        #[arg(long, default_value_t = 5433)]
        port: u16,
        /// Replace a non-empty target directory.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
        /// Database user for the report's queries; with --table, the scratch server's role, a
        /// superuser of the restored cluster (default $USER).
        #[arg(long)]
        db_user: Option<String>,
        /// How long --start waits for recovery to finish.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Restore from this backup (an id from `pitr list`) instead of the newest one before the
        /// target; an older one means a longer replay.
        #[arg(long)]
        backup: Option<String>,
        /// Read from this repository first (`primary` or a secondary's name); others fill in
        /// whatever it lacks. Carried into the restore_command.
        #[arg(long)]
        from: Option<String>,
        /// With `--source files` or `--source dump`: the set to restore from.
        #[arg(long)]
        set: Option<String>,
        /// With `--source files`: restore only the paths matching this glob (repeatable).
        #[arg(long = "path", value_name = "GLOB")]
        paths: Vec<String>,
        /// Restore one table (`SCHEMA.NAME`) as it was at `--to` into a running database.
        #[arg(long, value_name = "SCHEMA.NAME", conflicts_with_all = ["target_dir", "start", "ns"])]
        table: Option<String>,
        /// With `--source mongo`: restore one collection (`DB.COLL`) as it was at `--to`.
        #[arg(long, value_name = "DB.COLL")]
        ns: Option<String>,
        /// The new name of a restored table (`SCHEMA.NEW`) or collection (`DB.NEWCOLL`).
        #[arg(long = "as", value_name = "NEW NAME")]
        as_name: Option<String>,
        /// The database a table or a dump is restored into (a libpq conninfo).
        #[arg(long, value_name = "CONNINFO")]
        into: Option<String>,
        /// With `--source dump`: write the dump to this file (for `pg_restore` elsewhere).
        #[arg(long, value_name = "FILE", conflicts_with = "into")]
        output: Option<PathBuf>,
        /// Stop just before the target (xid:N, lsn:X/Y or a time) instead of just after it:
        /// `recovery_target_inclusive = off`. What `pitr find` prints as the safe target.
        #[arg(long)]
        exclusive: bool,
    },
    /// Find the moment to restore to: the commits that touched a table (DROP, TRUNCATE, big
    /// DELETEs…), what a transaction did, every destructive commit; newest first, each with the
    /// last safe target before it and the restore command.
    Find {
        /// The table, SCHEMA.NAME (a bare NAME is public.NAME).
        #[arg(long, value_name = "SCHEMA.NAME")]
        table: Option<String>,
        /// The database of --table, when several have a table of that name.
        #[arg(long, requires = "table")]
        database: Option<String>,
        /// MongoDB (--source mongo): the collection, DB.COLL.
        #[arg(long, value_name = "DB.COLL")]
        ns: Option<String>,
        /// Only commits that did this: drop, truncate, delete, update, insert, ddl.
        #[arg(long)]
        op: Option<String>,
        /// Only commits at or after this time.
        #[arg(long)]
        since: Option<String>,
        /// Only commits at or before this time.
        #[arg(long)]
        until: Option<String>,
        /// Show at most N commits (newest first).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// What transaction N did, and when.
        #[arg(long, conflicts_with_all = ["table", "ns"])]
        xid: Option<u32>,
        /// What the transaction whose commit record is at X/Y (or the first commit after) did.
        #[arg(long, conflicts_with_all = ["table", "ns"])]
        lsn: Option<String>,
        /// Every destructive commit (DROP, TRUNCATE, DELETE/UPDATE of many rows), any table.
        #[arg(long)]
        destructive: bool,
        #[arg(long, value_enum, default_value = "postgres")]
        source: Source,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeysAction {
    /// Every master key (its source, creation, whether active or retired, the repository keys it
    /// wraps) and repository key, with how many objects need each.
    List {
        #[arg(long)]
        json: bool,
        /// Skip counting objects (which reads the first bytes of every object).
        #[arg(long)]
        no_count: bool,
    },
    /// A new active key: a new master key appended to the key file (when the active master key
    /// lives there), then a new repository key wrapped by it. Old keys stay readable.
    Rotate {
        #[arg(long)]
        json: bool,
    },
    /// Wrap every repository key wrapped by an old master key with the active master key instead,
    /// and delete the old wraps. Resumable and idempotent; objects are not rewritten.
    Rewrap {
        /// Only the repository keys wrapped by this master key (default: every master key but
        /// the active one).
        #[arg(long, value_name = "KEYID")]
        from: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Retire master key KEYID: refused while it is active or anything still needs it; then it is
    /// recorded retired and removed from the key file.
    Retire {
        #[arg(value_name = "KEYID")]
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Create the journal's signing key (`[journal] signing_key_file`) if missing and print its
    /// public key, for `[journal] public_key` on the hosts that verify.
    JournalInit {
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = cli.log_level.clone().or_else(|| std::env::var("PITR_LOG").ok()).unwrap_or_else(|| "info".to_string());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

fn parse_lsn_arg(s: &str) -> Result<u64, String> {
    pitr_pgformat::lsn::parse_lsn(s).ok_or_else(|| format!("{s:?} is not an LSN (X/Y in hex)"))
}

/// What PostgreSQL's restore_command contract needs from every way out of `pitr wal-fetch`
/// other than "fetched" (0) and "not in the archive" (1): an exit status above 125, which makes
/// PostgreSQL stop recovery with an error. Exit 1 (clap's and anyhow's default failure) or 101
/// (a Rust panic) would read as "not in the archive" and end recovery early, as if the archive
/// ended there.
const RESTORE_COMMAND_ERROR: u8 = 126;

/// Keeps freed block and frame buffers for reuse instead of returning them to the kernel.
///
/// Restores, backups and catch-up sealing allocate a fresh megabyte-sized buffer per block or
/// frame on every core. glibc serves those from `mmap` (or trims its per-thread heaps after each
/// free), so every buffer page was faulted in again: about a third of a restore's CPU time
/// (measured with `perf` on a 1 GiB restore). Fixed thresholds keep such buffers in the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_buffers() {
    // SAFETY: mallopt only changes allocator tuning; it is called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_buffers() {}

fn main() -> ExitCode {
    keep_freed_buffers();
    let as_restore_command = std::env::args_os().skip(1).any(|a| a == "wal-fetch");
    if as_restore_command {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("pitr wal-fetch: internal error: {info}");
            std::process::exit(i32::from(RESTORE_COMMAND_ERROR));
        }));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if as_restore_command && e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(RESTORE_COMMAND_ERROR);
        }
        Err(e) => e.exit(),
    };
    let failure = if as_restore_command { ExitCode::from(RESTORE_COMMAND_ERROR) } else { ExitCode::FAILURE };
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pitr: cannot start the async runtime: {e}");
            return failure;
        }
    };
    let config_path = config::Config::path(cli.config.as_deref());
    let result = runtime.block_on(async {
        let result = run(cli.command, &config_path).await;
        // The journal batch of what this command stored, before its copies are waited for (so
        // the batch is copied too); a failure to journal fails a command that succeeded.
        let journaled = open::flush_journals().await;
        // Copies to secondaries this command queued (backup blocks, a drill's result…).
        open::finish_copies(std::time::Duration::from_secs(30)).await;
        match (result, journaled) {
            (Ok(_), Err(e)) => Err(e),
            (Err(e), Err(j)) => {
                eprintln!("pitr: error: {j:#}");
                Err(e)
            }
            (result, Ok(())) => result,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pitr: error: {e:#}");
            failure
        }
    }
}

async fn run(command: Command, config_path: &std::path::Path) -> anyhow::Result<ExitCode> {
    match command {
        Command::Init => cmd::init::run(config_path).await,
        Command::Stream => cmd::stream::run(config_path).await,
        Command::Status { json } => cmd::status::run(config_path, json).await,
        Command::Check { json } => return cmd::check::run(config_path, json).await,
        Command::WalFetch { segment, dest, from, until_lsn, whole_segments } => {
            let serve = match until_lsn {
                _ if whole_segments => cmd::wal_fetch::Serve::WholeSegments,
                Some(lsn) => cmd::wal_fetch::Serve::Until(lsn),
                None => cmd::wal_fetch::Serve::All,
            };
            return cmd::wal_fetch::run(config_path, from.as_deref(), &segment, &dest, serve).await
        }
        Command::WalPrefetch { segment, spool, count, from, until_lsn } => {
            cmd::wal_fetch::prefetch(config_path, from.as_deref(), &segment, &spool, count, until_lsn).await
        }
        Command::Copy { to, json } => cmd::copy::run(config_path, &to, json).await,
        Command::Backup { set: Some(_), source: Source::Postgres | Source::Mongo, .. } => {
            anyhow::bail!("--set names a file set: use it with --source files (dumps: `pitr dump --set NAME`)")
        }
        Command::Backup { source: Source::Dump, .. } => anyhow::bail!("dumps are taken with `pitr dump --set NAME`"),
        Command::Backup { keep_forever, note, source: Source::Files | Source::Mongo, .. }
            if keep_forever || note.is_some() =>
        {
            anyhow::bail!(
                "--keep-forever and --note apply to PostgreSQL backups (MongoDB snapshots and file sets have no pins)"
            )
        }
        Command::Backup { from_standby: Some(_), source: Source::Files | Source::Mongo, .. } => {
            anyhow::bail!("--from-standby takes a PostgreSQL base backup from a standby: use it with --source postgres")
        }
        Command::Backup { incremental, json, source: Source::Files, set, .. } => {
            let set = set.ok_or_else(|| anyhow::anyhow!("--source files needs --set NAME (a [[files]] set)"))?;
            cmd::files::backup(config_path, &set, incremental, json).await
        }
        Command::Backup { incremental: _, json, source: Source::Mongo, .. } => cmd::mongo::backup(config_path, json).await,
        Command::Backup { incremental, json, source: Source::Postgres, from_standby, keep_forever, note, .. } => {
            let pin = cmd::pin::backup_change(keep_forever, note)?;
            cmd::backup::run(config_path, incremental, from_standby.as_deref(), pin, json).await
        }
        Command::Dump { set, json } => cmd::dump::dump(config_path, &set, json).await,
        Command::Verify { rebuild_index: true, json, from, index_since, force_index, source: Source::Postgres, .. } => {
            return cmd::verify::rebuild_index(config_path, from.as_deref(), index_since.as_deref(), force_index, json).await
        }
        Command::Verify { rebuild_index: true, .. } => {
            anyhow::bail!("--rebuild-index rebuilds the PostgreSQL change index (--source postgres)")
        }
        Command::Verify { json, source: Source::Files, set, live, deep, .. } => {
            return cmd::files::verify(config_path, set.as_deref(), live, deep, json).await
        }
        Command::Verify { set: Some(_), .. } | Command::Verify { live: true, .. } => {
            anyhow::bail!("--set and --live verify file sets: use them with --source files")
        }
        Command::Verify { source: Source::Dump, json, .. } => return cmd::dump::verify(config_path, json).await,
        Command::Verify { deep, json, from, source: Source::Mongo, .. } => {
            return cmd::mongo::verify(config_path, from.as_deref(), deep, json).await
        }
        Command::Verify { deep, json, from, source: Source::Postgres, .. } => {
            return cmd::verify::run(config_path, from.as_deref(), deep, json).await
        }
        Command::Drill { partial: true, source: Source::Postgres, key_rotation: false, from: None, keep: false, checks: None, to, report, json, db_user, test_type } => {
            let target = if to.eq_ignore_ascii_case("random") {
                pitr_restore::drill::DrillTarget::Random
            } else {
                pitr_restore::drill::DrillTarget::At(pitr_restore::parse_target(&to)?)
            };
            // The report says "Weekly" unless the operator named the test.
            let test_type = if test_type == "On demand" { "Weekly (on demand)".to_string() } else { test_type };
            let opts = partial::PartialOptions { target, test_type, db_user };
            return partial::run(config_path, opts, report.as_deref(), json).await;
        }
        Command::Drill { partial: true, .. } => {
            anyhow::bail!(
                "--partial restores a random table and random files of a file set; it cannot be combined with --source, --key-rotation, --from, --keep or --checks"
            )
        }
        Command::Drill { source: Source::Files | Source::Dump, .. } => {
            anyhow::bail!(
                "drills restore PostgreSQL or MongoDB (--source postgres|mongo); file sets are checked by `pitr verify --source files --live`"
            )
        }
        Command::Drill { source: Source::Mongo, key_rotation: true, .. } => {
            anyhow::bail!("--key-rotation drills restore PostgreSQL; it cannot be combined with --source mongo")
        }
        Command::Drill { to, source: Source::Mongo, checks, report, json, test_type, from, .. } => {
            let args = cmd::mongo::DrillArgs { to, checks, report, json, test_type, from };
            return cmd::mongo::drill(config_path, args).await;
        }
        Command::Drill {
            to,
            checks,
            report,
            json,
            keep,
            db_user,
            test_type,
            from,
            key_rotation,
            source: Source::Postgres,
            partial: false,
        } => {
            let args = cmd::drill::DrillArgs { to, checks, report, json, keep, db_user, test_type, from, key_rotation };
            return cmd::drill::run(config_path, args).await;
        }
        Command::List { json, from } => cmd::list::run(config_path, from.as_deref(), json).await,
        Command::Mark { name, json, timeout, allow_duplicate } => {
            cmd::mark::run(config_path, &name, json, timeout, allow_duplicate).await
        }
        Command::Expire { dry_run, json } => cmd::expire::run(config_path, dry_run, json).await,
        Command::Pin { id, until, note, json } => cmd::pin::pin(config_path, &id, until.as_deref(), note, json).await,
        Command::Unpin { id, json } => cmd::pin::unpin(config_path, &id, json).await,
        Command::Keys { action: KeysAction::List { json, no_count } } => {
            cmd::keys::list(config_path, json, no_count).await
        }
        Command::Keys { action: KeysAction::Rotate { json } } => cmd::keys::rotate(config_path, json).await,
        Command::Keys { action: KeysAction::Rewrap { from, json } } => {
            cmd::keys::rewrap(config_path, from.as_deref(), json).await
        }
        Command::Keys { action: KeysAction::Retire { id, json } } => cmd::keys::retire(config_path, &id, json).await,
        Command::Keys { action: KeysAction::JournalInit { json } } => cmd::keys::journal_init(config_path, json),
        Command::Restore { exclusive: true, ref table, source, standby, .. }
            if table.is_some() || source != Source::Postgres || standby =>
        {
            anyhow::bail!("--exclusive applies to a PostgreSQL restore to xid:, lsn: or a time (not --table, --standby or another --source)")
        }
        Command::Find { table, database, ns, op, since, until, limit, xid, lsn, destructive, source, json } => {
            let args = cmd::find::FindArgs { table, database, ns, op, since, until, limit, xid, lsn, destructive, json };
            match source {
                Source::Postgres => cmd::find::run(config_path, args).await,
                Source::Mongo => cmd::find::run_mongo(config_path, args).await,
                Source::Files | Source::Dump => anyhow::bail!("pitr find searches PostgreSQL (default) or --source mongo"),
            }
        }
        Command::Restore { standby: true, ref table, source, ref ns, ref set, ref into, ref output, .. }
            if table.is_some()
                || source != Source::Postgres
                || ns.is_some()
                || set.is_some()
                || into.is_some()
                || output.is_some() =>
        {
            anyhow::bail!(
                "--standby builds a whole PostgreSQL cluster that follows the archive: it cannot be combined with \
                 --table, --source other than postgres, --ns, --set, --into or --output; nothing was restored"
            )
        }
        Command::Restore { ref tablespace_map, ref table, source, .. }
            if !tablespace_map.is_empty() && (table.is_some() || source != Source::Postgres) =>
        {
            anyhow::bail!(
                "--tablespace-map places the tablespaces of a whole PostgreSQL cluster restore (--target-dir); it \
                 cannot be combined with --table or --source other than postgres; nothing was restored"
            )
        }
        Command::Restore { delta: true, ref table, source, .. } if table.is_some() || source != Source::Postgres => {
            anyhow::bail!(
                "--delta restores a whole PostgreSQL cluster into its existing data directory (--target-dir); it \
                 cannot be combined with --table or --source other than postgres; nothing was restored"
            )
        }
        Command::Restore { to, table: Some(table), into, as_name, json, source: Source::Postgres, from, db_user, .. } => {
            let into =
                into.ok_or_else(|| anyhow::anyhow!("--table needs --into CONNINFO (the database to create it in)"))?;
            let args = cmd::table::TableArgs { to, table, into, as_name, json, from, db_user };
            cmd::table::run(config_path, args).await
        }
        Command::Restore { table: Some(_), .. } => {
            anyhow::bail!("--table restores a PostgreSQL table (a MongoDB collection: --source mongo --ns DB.COLL)")
        }
        Command::Restore { source: Source::Files, into: Some(_), .. }
        | Command::Restore { source: Source::Files, output: Some(_), .. } => {
            anyhow::bail!("--into and --output restore dumps (--source dump); a file set restores into --target-dir")
        }
        Command::Restore { source: Source::Dump, target_dir: Some(_), .. } => {
            anyhow::bail!("a dump restores --into a database or to --output FILE, not into --target-dir")
        }
        Command::Restore { source: Source::Dump, ref paths, .. } if !paths.is_empty() => {
            anyhow::bail!("--path restores part of a file set (--source files)")
        }
        Command::Restore { source: Source::Files | Source::Dump, ns: Some(_), .. }
        | Command::Restore { source: Source::Files | Source::Dump, as_name: Some(_), .. } => {
            anyhow::bail!("--ns and --as restore one MongoDB collection (--source mongo) or table (--table)")
        }
        Command::Restore { to, source: Source::Files, set, target_dir, paths, json, from, .. } => {
            let set = set.ok_or_else(|| anyhow::anyhow!("--source files needs --set NAME (a [[files]] set)"))?;
            let target_dir = target_dir.ok_or_else(|| anyhow::anyhow!("--source files needs --target-dir DIR"))?;
            let args = cmd::files::RestoreArgs { set, to, target_dir, paths, json, from };
            cmd::files::restore(config_path, args).await
        }
        Command::Restore { to, source: Source::Dump, set, into, output, json, from, .. } => {
            let set = set.ok_or_else(|| anyhow::anyhow!("--source dump needs --set NAME (a [[dumps]] set)"))?;
            let args = cmd::dump::RestoreArgs { set, to, into, output, json, from };
            cmd::dump::restore(config_path, args).await
        }
        Command::Restore {
            to,
            source: Source::Mongo,
            ns: Some(ns),
            as_name,
            target_uri,
            target_uri_file,
            drop,
            json,
            from,
            ..
        } => {
            let target = cmd::mongo::TargetArg { uri: target_uri, file: target_uri_file };
            let args = cmd::mongo::CollectionArgs { to, ns, as_name, target, drop, json, from };
            cmd::mongo::restore_collection(config_path, args).await
        }
        Command::Restore { ns: Some(_), .. } => anyhow::bail!("--ns restores a MongoDB collection: use it with --source mongo"),
        Command::Restore { as_name: Some(_), .. } => {
            anyhow::bail!("--as names the copy a --table (PostgreSQL) or --ns (MongoDB) restore creates")
        }
        Command::Restore { set: Some(_), .. } | Command::Restore { output: Some(_), .. } => {
            anyhow::bail!("--set and --output restore file sets or dumps: use them with --source files or --source dump")
        }
        Command::Restore { into: Some(_), .. } => {
            anyhow::bail!("--into is where --table or --source dump restores to; a cluster restore takes --target-dir")
        }
        Command::Restore { ref paths, .. } if !paths.is_empty() => {
            anyhow::bail!("--path restores part of a file set: use it with --source files --set NAME")
        }
        Command::Restore { to, source: Source::Mongo, target_uri, target_uri_file, drop, json, from, .. } => {
            let target = cmd::mongo::TargetArg { uri: target_uri, file: target_uri_file };
            cmd::mongo::restore(config_path, from.as_deref(), &to, target, drop, json).await
        }
        Command::Restore {
            to,
            target_dir,
            start,
            port,
            force,
            json,
            db_user,
            timeout,
            backup,
            from,
            standby,
            primary_conninfo,
            tablespace_map,
            delta,
            exclusive,
            ..
        } => {
            let target_dir = target_dir.ok_or_else(|| anyhow::anyhow!("pitr restore needs --target-dir DIR"))?;
            let standby = standby.then_some(pitr_restore::StandbyOptions { primary_conninfo });
            let args = cmd::restore::RestoreArgs {
                to,
                target_dir,
                start,
                port,
                force,
                json,
                db_user,
                timeout,
                backup,
                from,
                standby,
                tablespace_map,
                delta,
                exclusive,
            };
            cmd::restore::run(config_path, args).await
        }
    }
    .map(|()| ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    #[test]
    fn verify_rebuild_index_refuses_options_it_would_ignore() {
        for extra in [&["--deep"][..], &["--set", "etc"], &["--live"]] {
            let mut args = vec!["pitr", "verify", "--rebuild-index"];
            args.extend_from_slice(extra);
            let err = Cli::try_parse_from(&args).expect_err("conflicting options accepted");
            assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict, "{args:?}");
        }
        assert!(Cli::try_parse_from(["pitr", "verify", "--rebuild-index", "--force", "--json"]).is_ok());
    }
}
