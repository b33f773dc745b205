//! One table as it was at a moment, copied into a running database under a new name
//! (`pitr restore --to TIME --table SCHEMA.NAME --into CONNINFO [--as SCHEMA.NEW]`), in two
//! reusable steps (a drill's partial restore uses them too):
//!
//! 1. [`ScratchCluster::restore_at`]: the whole cluster restored to the moment into a scratch
//!    data directory, and a server started there that listens on a Unix socket in that
//!    directory alone (no TCP address), trusts only that socket (its own `pg_hba.conf` in the
//!    scratch directory: the socket directory is the user's own, mode 0700), archives nothing,
//!    and is promoted at the target so that the copy can be prepared in it. The running marker is
//!    held while the archive is read. Dropping the [`ScratchCluster`] (on success, on every error,
//!    and when the future is dropped, as on Ctrl-C) stops the server (`-m immediate`) and removes
//!    the directory.
//! 2. [`copy_table`]: in the scratch server only, the table is renamed (and moved to the target
//!    schema), its indexes (and so the constraints they back) and the sequences it owns are given
//!    names free in the target schema, and what would reach beyond the copy is removed and
//!    reported ([`LeftOut`]): foreign keys to other tables, triggers, rules, row level security
//!    and its policies, inheritance and partition links, defaults drawing from sequences the table
//!    does not own, extended statistics. Then `pg_dump --format=custom` of that one table from the
//!    scratch server is piped straight into `pg_restore --single-transaction --exit-on-error
//!    --no-owner --no-privileges` on the target: no table data touches the disk outside the
//!    scratch server, and the target gets the whole table or nothing. The password of the target's
//!    connection string reaches `pg_restore` through its environment, never its arguments.
//!
//! Checks come first: names (`[DATABASE.]SCHEMA.NAME`, SQL identifier rules), then the target (the
//! schema exists, the new name is free, the user may create there) before anything is restored.

use std::collections::BTreeSet;
use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pitr_archive::running::RunKind;
use pitr_archive::Repository;
use pitr_pgwire::conninfo::{ConnInfo, ConnInfoError};
use pitr_pgwire::{ConnectOptions, Connection};

use crate::plan::Catalog;
use crate::recover::{
    announce, current_catalog, restore_marked_as, server_message, RestoreOptions, RestoreReport, ServerLaunch,
    StartOptions, WalFetchCommand,
};
use crate::target::RecoveryTarget;
use crate::RestoreError;

/// PostgreSQL's longest identifier (NAMEDATALEN - 1): a longer one is silently cut, naming
/// another object, so it is refused instead.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// The port of a scratch server: it listens on no TCP address, so the number only names the
/// socket file in its own directory.
const SCRATCH_PORT: u16 = 5432;

/// Why a table restore failed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A table name that is not `[DATABASE.]SCHEMA.NAME` of SQL identifiers.
    #[error("invalid table name {input:?}: {why} (expected SCHEMA.NAME or DATABASE.SCHEMA.NAME; unquoted parts are folded to lower case, \"Quoted\" parts kept as written)")]
    Name {
        /// The name as given.
        input: String,
        /// What is wrong with it.
        why: String,
    },
    /// The target's connection string does not parse.
    #[error("--into: {0}")]
    ConnInfo(#[from] ConnInfoError),
    /// Talking to the target database failed.
    #[error("target database {target}: {what}")]
    Target {
        /// The target, without its password.
        target: String,
        /// What failed.
        what: String,
    },
    /// The new table's name is taken in the target: nothing is ever overwritten.
    #[error("target table {table} already exists in {target}; choose another name with --as SCHEMA.NEW (nothing was restored)")]
    TargetExists {
        /// The new table.
        table: TableName,
        /// The target, without its password.
        target: String,
    },
    /// A publication in the target would publish the new table to its subscribers.
    #[error("publication {publication} in {target} {what}: {table} would be published to its subscribers, which lack it; restore into another schema or database (nothing was restored)")]
    Published {
        /// The publication.
        publication: String,
        /// What it publishes.
        what: String,
        /// The new table.
        table: TableName,
        /// The target, without its password.
        target: String,
    },
    /// The new table's schema does not exist in the target.
    #[error("schema {schema} does not exist in {target}; create it first or choose another with --as SCHEMA.NEW (nothing was restored)")]
    NoSchema {
        /// The schema, as SQL names it.
        schema: String,
        /// The target, without its password.
        target: String,
    },
    /// The table was not there at the moment restored to.
    #[error("table {table} did not exist at {at} ({searched}); nothing was restored")]
    NotFound {
        /// The table asked for.
        table: String,
        /// The moment restored to.
        at: String,
        /// Where it was looked for.
        searched: String,
    },
    /// Several databases held a table of that name at the moment.
    #[error("table {table} existed in several databases at {at} ({databases}): name one, as DATABASE.{table}; nothing was restored")]
    Ambiguous {
        /// The table asked for.
        table: String,
        /// The moment restored to.
        at: String,
        /// The databases holding it.
        databases: String,
    },
    /// The relation is not an ordinary table.
    #[error("{table} was a {kind} at {at}, not an ordinary table; only ordinary tables are restored this way (nothing was restored)")]
    NotATable {
        /// The relation.
        table: String,
        /// What it is.
        kind: &'static str,
        /// The moment restored to.
        at: String,
    },
    /// An unlogged table: its rows are not in WAL, so recovery leaves it empty.
    #[error("{table} was an unlogged table at {at}: its rows are not written to WAL, so no restore brings them back (nothing was restored)")]
    Unlogged {
        /// The table.
        table: String,
        /// The moment restored to.
        at: String,
    },
    /// Restoring the cluster into the scratch directory failed.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// A query on the scratch server failed.
    #[error("scratch server ({dir}): {what}")]
    Scratch {
        /// The scratch data directory.
        dir: PathBuf,
        /// What failed.
        what: String,
    },
    /// Something failed after `pg_restore` had committed: the new table exists in the target.
    #[error("{table} WAS created in {target}, but then {what}; check it, or drop it before trying again")]
    AfterCopy {
        /// The new table.
        table: TableName,
        /// The target, without its password.
        target: String,
        /// What failed.
        what: String,
    },
    /// `pg_dump` or `pg_restore` failed; `pg_restore` ran in one transaction, so the target
    /// holds nothing of it.
    #[error("copying {table} into {target} failed (the target was left as it was): {what}")]
    Copy {
        /// The new table.
        table: TableName,
        /// The target, without its password.
        target: String,
        /// What failed, with the tool's messages.
        what: String,
    },
}

/// A table's schema and name, as stored in the catalog (case and all).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The table within it.
    pub name: String,
}

impl TableName {
    /// `"schema"."name"`: always quoted, for SQL and for `pg_dump --table`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    /// As SQL would read it, quoting only where needed (`public.orders`, `"Sales"."Q1"`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", display_ident(&self.schema), display_ident(&self.name))
    }
}

/// The table a restore asks for: with the database it lives in when named, else looked for in
/// every database of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    /// `DATABASE.` of a three-part name.
    pub database: Option<String>,
    /// Schema and name.
    pub table: TableName,
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(db) = &self.database {
            write!(f, "{}.", display_ident(db))?;
        }
        write!(f, "{}", self.table)
    }
}

/// `ident` double-quoted for SQL (`"` doubled).
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `ident` bare where SQL would read it back unchanged, else quoted.
fn display_ident(ident: &str) -> String {
    let mut chars = ident.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        ident.to_string()
    } else {
        quote_ident(ident)
    }
}

/// Splits `input` into SQL identifiers separated by dots: unquoted ones are folded to lower
/// case (ASCII, as PostgreSQL does in UTF-8 databases), `"quoted"` ones kept, `""` inside them
/// being one `"`. Every part must be 1..=63 bytes.
fn split_identifiers(input: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut chars = input.chars().peekable();
    loop {
        let mut part = String::new();
        match chars.peek() {
            Some('"') => {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err("a quoted part has no closing quote".into()),
                    }
                }
                if part.is_empty() {
                    return Err("an empty quoted part".into());
                }
            }
            Some(&c) if c.is_alphabetic() || c == '_' => {
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || c == '_' || c == '$' {
                        part.push(c.to_ascii_lowercase());
                        chars.next();
                    } else {
                        break;
                    }
                }
            }
            Some(c) => return Err(format!("unexpected {c:?} (quote a part holding it: \"...\")")),
            None => return Err("a part is empty".into()),
        }
        if part.len() > MAX_IDENTIFIER_BYTES {
            return Err(format!("{part:?} is longer than PostgreSQL's {MAX_IDENTIFIER_BYTES}-byte identifiers"));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(c) => {
                return Err(format!("unexpected {c:?} after {:?}", parts.last().map(String::as_str).unwrap_or("")))
            }
        }
    }
}

/// Parses `--table`: `SCHEMA.NAME` or `DATABASE.SCHEMA.NAME`.
pub fn parse_table(input: &str) -> Result<TableRef, TableError> {
    let err = |why: String| TableError::Name { input: input.to_string(), why };
    let mut parts = split_identifiers(input.trim()).map_err(err)?;
    match parts.len() {
        2 | 3 => {
            let name = parts.pop().unwrap_or_default();
            let schema = parts.pop().unwrap_or_default();
            Ok(TableRef { database: parts.pop(), table: TableName { schema, name } })
        }
        1 => Err(err("the schema is missing".into())),
        n => Err(err(format!("{n} dot-separated parts"))),
    }
}

/// Parses `--as`: `SCHEMA.NEW`, or `NEW` in `default_schema` (the restored table's).
pub fn parse_new_name(input: &str, default_schema: &str) -> Result<TableName, TableError> {
    let err = |why: String| TableError::Name { input: input.to_string(), why };
    let mut parts = split_identifiers(input.trim()).map_err(err)?;
    match parts.len() {
        1 => Ok(TableName { schema: default_schema.to_string(), name: parts.pop().unwrap_or_default() }),
        2 => {
            let name = parts.pop().unwrap_or_default();
            Ok(TableName { schema: parts.pop().unwrap_or_default(), name })
        }
        n => Err(err(format!("{n} dot-separated parts; the new table is SCHEMA.NEW in the --into database"))),
    }
}

/// The new name when `--as` is not given: `<name>_at_<YYYYMMDDHHMMSS>` (UTC) in the same
/// schema, the name cut so that the whole fits in 63 bytes.
pub fn default_new_name(table: &TableName, target: RecoveryTarget) -> TableName {
    let suffix = match target {
        RecoveryTarget::Time(_) => {
            let digits: String = target.to_string().chars().take(19).filter(char::is_ascii_digit).collect();
            format!("_at_{digits}")
        }
        RecoveryTarget::Lsn(_) => format!("_at_{}", target.to_string().replace([':', '/'], "_").to_ascii_lowercase()),
        RecoveryTarget::Xid(x) => format!("_at_xid_{x}"),
        RecoveryTarget::Latest => "_latest".to_string(),
        RecoveryTarget::Immediate => "_immediate".to_string(),
        RecoveryTarget::Name(n) => {
            let name: String = n
                .as_str()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
                .collect();
            format!("_at_{name}")
        }
    };
    TableName { schema: table.schema.clone(), name: fit(&table.name, &suffix) }
}

/// `base` followed by `suffix`, `base` cut (at a character boundary) so that the whole is at most
/// 63 bytes.
fn fit(base: &str, suffix: &str) -> String {
    let cut = |s: &str, room: usize| {
        let mut end = s.len().min(room);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_string()
    };
    if suffix.len() >= MAX_IDENTIFIER_BYTES {
        // `_` and a 63-byte name: the suffix alone is too long.
        return cut(suffix, MAX_IDENTIFIER_BYTES);
    }
    format!("{}{suffix}", cut(base, MAX_IDENTIFIER_BYTES - suffix.len()))
}

/// A name for `old` (an index or sequence of the table once called `old_table`) that belongs to
/// `new_table` and is not in `taken`: the table's name swapped at its start (`orders_pkey` →
/// `orders_at_t_pkey`), else the new name put in front; a number added while taken.
fn free_name(old: &str, old_table: &str, new_table: &str, taken: &BTreeSet<String>) -> String {
    let rest = match old.strip_prefix(old_table) {
        Some(rest) => rest.to_string(),
        None => format!("_{old}"),
    };
    let mut candidate = fit(new_table, &rest);
    let mut n = 1;
    while taken.contains(&candidate) {
        candidate = fit(&fit(new_table, &rest), &format!("{n}"));
        n += 1;
    }
    candidate
}

/// `s` as an SQL string literal (the `E''` form when it holds a backslash, so that it reads the
/// same whatever `standard_conforming_strings` is).
fn socket_conninfo(socket_dir: &Path, user: &str, database: &str) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    format!(
        "host={} port={SCRATCH_PORT} user={} dbname={} connect_timeout=10",
        quote(&socket_dir.display().to_string()),
        quote(user),
        quote(database)
    )
}

fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

// ---------------------------------------------------------------------------------------------
// The target database
// ---------------------------------------------------------------------------------------------

/// The running database a table is restored into (`--into`).
#[derive(Debug, Clone)]
pub struct TargetDatabase {
    info: ConnInfo,
    /// Set once `pg_restore` has committed: from then on the new table exists in the target,
    /// whatever fails or stops the run afterwards.
    created: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TargetDatabase {
    /// Parses a libpq connection string (keyword=value or URI; see `pitr_pgwire::conninfo` for
    /// what is accepted).
    pub fn parse(conninfo: &str) -> Result<TargetDatabase, TableError> {
        Ok(TargetDatabase { info: pitr_pgwire::conninfo::parse(conninfo)?, created: Default::default() })
    }

    /// Whether a copy into this database has committed (the new table exists there), so that a
    /// failure or a signal afterwards can say so.
    pub fn table_created(&self) -> bool {
        self.created.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The connection string without its password (for messages and reports).
    pub fn redacted(&self) -> String {
        self.info.redacted()
    }

    fn error(&self, what: impl fmt::Display) -> TableError {
        TableError::Target { target: self.redacted(), what: pitr_pgwire::conninfo::redact_in_text(&what.to_string()) }
    }

    async fn connect(&self) -> Result<Connection, TableError> {
        let opts = ConnectOptions { replication: false, application_name: "pitr restore --table".into() };
        Connection::connect(&self.info, &opts).await.map_err(|e| self.error(e))
    }

    async fn query(&self, conn: &mut Connection, sql: &str) -> Result<pitr_pgwire::QueryResult, TableError> {
        conn.simple_query(sql).await.map_err(|e| self.error(e))
    }

    /// Checks that `table` can be created: the server accepts writes, its schema exists and this
    /// user may create in it, and no relation has its name. Returns the names of the relations in
    /// that schema (the copy's indexes and sequences must avoid them).
    pub async fn check_new_table(&self, table: &TableName) -> Result<BTreeSet<String>, TableError> {
        let mut conn = self.connect().await?;
        let result = self.check_on(&mut conn, table).await;
        conn.close().await;
        result
    }

    async fn check_on(&self, conn: &mut Connection, table: &TableName) -> Result<BTreeSet<String>, TableError> {
        let schema = quote_literal(&table.schema);
        let r = self
            .query(
                conn,
                &format!(
                    "select pg_is_in_recovery()::text, n.oid is not null, \
                     n.oid is not null and has_schema_privilege(n.oid, 'CREATE'), \
                     (select count(*) from pg_class c where c.relnamespace = n.oid and c.relname = {0})::text, \
                     current_database(), current_user, \
                     (select count(*) from pg_type t where t.typnamespace = n.oid and t.typname = {0})::text \
                     from (select 1) one left join pg_namespace n on n.nspname = {schema}",
                    quote_literal(&table.name)
                ),
            )
            .await?;
        let cell = |col| r.text(0, col).unwrap_or("");
        if cell(0) == "true" {
            return Err(self.error("the server is in recovery (a standby): restore into a primary"));
        }
        if cell(1) != "t" && cell(1) != "true" {
            return Err(TableError::NoSchema { schema: display_ident(&table.schema), target: self.redacted() });
        }
        if cell(3) != "0" {
            return Err(TableError::TargetExists { table: table.clone(), target: self.redacted() });
        }
        if cell(6) != "0" {
            // A table's row type takes the table's name: a type of that name is in the way.
            return Err(self.error(format!(
                "a type named {} exists in schema {}; choose another name with --as SCHEMA.NEW (nothing was restored)",
                display_ident(&table.name),
                display_ident(&table.schema)
            )));
        }
        if cell(2) != "t" && cell(2) != "true" {
            return Err(self.error(format!(
                "user {} may not create tables in schema {} of database {}",
                cell(5),
                display_ident(&table.schema),
                cell(4)
            )));
        }
        // A publication of every table, or of every table of the schema, would publish the new
        // table at once: its subscribers, lacking it, would stop applying.
        let mut publishing = self
            .query(
                conn,
                "select pubname::text, 'publishes every table (FOR ALL TABLES)' from pg_publication where puballtables",
            )
            .await?;
        let schema_publications =
            self.query(conn, "select (to_regclass('pg_catalog.pg_publication_namespace') is not null)::text").await?;
        if schema_publications.text(0, 0) == Some("true") {
            let by_schema = self
                .query(
                    conn,
                    &format!(
                        "select p.pubname::text, 'publishes every table of schema ' || n.nspname::text from pg_publication p \
                         join pg_publication_namespace pn on pn.pnpubid = p.oid join pg_namespace n on n.oid = pn.pnnspid \
                         where n.nspname = {schema}"
                    ),
                )
                .await?;
            publishing.rows.extend(by_schema.rows);
        }
        if !publishing.rows.is_empty() {
            return Err(TableError::Published {
                publication: display_ident(publishing.text(0, 0).unwrap_or("")),
                what: publishing.text(0, 1).unwrap_or("").to_string(),
                table: table.clone(),
                target: self.redacted(),
            });
        }
        let names = self
            .query(
                conn,
                &format!("select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = {schema}"),
            )
            .await?;
        Ok((0..names.rows.len()).filter_map(|i| names.text(i, 0).map(str::to_string)).collect())
    }

    /// The target's cluster (its system identifier), database and the OID of `table` there now
    /// (`None` when there is none): the target may be the database the table is restored from.
    /// `None` when the target does not tell (a role not allowed to read `pg_control_system()`).
    async fn identity(&self, table: &TableName) -> Option<(String, String, Option<u32>)> {
        let mut conn = self.connect().await.ok()?;
        let r = self
            .query(
                &mut conn,
                &format!(
                    "select (select system_identifier from pg_control_system())::text, current_database(), \
                     to_regclass({})::oid::text",
                    quote_literal(&table.quoted())
                ),
            )
            .await;
        conn.close().await;
        let r = r.ok()?;
        Some((r.text(0, 0)?.to_string(), r.text(0, 1)?.to_string(), r.text(0, 2).and_then(|o| o.parse().ok())))
    }

    /// Rows in `table` (after a copy, to confirm it arrived whole).
    async fn count_rows(&self, table: &TableName) -> Result<u64, TableError> {
        let mut conn = self.connect().await?;
        let r = self.query(&mut conn, &format!("select count(*) from {}", table.quoted())).await;
        conn.close().await;
        let r = r?;
        r.text(0, 0).and_then(|v| v.parse().ok()).ok_or_else(|| self.error(format!("counting the rows of {table}")))
    }
}

// ---------------------------------------------------------------------------------------------
// The scratch cluster
// ---------------------------------------------------------------------------------------------

/// Where and how a scratch cluster is restored and run.
#[derive(Debug, Clone)]
pub struct ScratchOptions {
    /// The directory the scratch directory is made in (and removed from).
    pub scratch_root: PathBuf,
    /// `pg_ctl`, `pg_dump` and `pg_restore` of the archived cluster's major version.
    pub bin_dir: PathBuf,
    /// The role the scratch server is used as (it must exist in the restored cluster).
    pub db_user: String,
    /// How the scratch server fetches WAL.
    pub restore_command: WalFetchCommand,
    /// Parallel block downloads.
    pub workers: usize,
    /// How long the scratch server may take to reach the target.
    pub timeout: Duration,
    /// Where the running marker goes, when not the repository read (see
    /// [`RestoreOptions::marker_repository`]).
    pub marker_repository: Option<Repository>,
    /// The running marker's kind: a restore, or a drill's partial restore.
    pub run_kind: RunKind,
}

/// The scratch directory and the server running in it; both go when this is dropped.
struct ScratchDir {
    dir: PathBuf,
    bin_dir: PathBuf,
}

impl ScratchDir {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stops the server (immediately: nothing in it is kept) and removes the directory.
    fn clean_up(&self) -> std::io::Result<()> {
        let data = self.data();
        if data.join("postmaster.pid").exists() {
            let _ = Command::new(self.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // A WAL prefetcher started during recovery may still be finishing a file in the scratch
        // directory: try again briefly rather than leave a half-removed tree.
        let mut attempt = 0;
        loop {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if attempt >= 20 => return Err(e),
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = self.clean_up() {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the scratch directory; remove it by hand");
        }
    }
}

/// A cluster restored to a moment in a scratch directory, its server running (promoted) on a
/// Unix socket there. Dropping it stops the server and removes the directory.
pub struct ScratchCluster {
    scratch: ScratchDir,
    db_user: String,
    report: RestoreReport,
}

/// A table in a scratch cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScratchTable {
    /// The database holding it.
    pub database: String,
    /// Its schema and name.
    pub table: TableName,
}

impl ScratchCluster {
    /// Restores the cluster of `catalog` to `target` into a new directory under
    /// `opts.scratch_root` and runs its server until it has replayed to the target and promoted.
    /// A target outside the archive's window fails before anything is written.
    pub async fn restore_at(
        repo: &Repository,
        catalog: &Catalog,
        target: RecoveryTarget,
        opts: &ScratchOptions,
    ) -> Result<ScratchCluster, TableError> {
        if unsafe { libc::geteuid() } == 0 {
            return Err(RestoreError::Other(
                "PostgreSQL refuses to run as root: run this as the database's OS user (it starts a scratch server)"
                    .into(),
            )
            .into());
        }
        catalog.choose_backup(target)?;
        let started = Instant::now();
        let dir = opts.scratch_root.join(format!(
            "pitr-table-{}-{}-{:08x}",
            pitr_archive::now_us() / 1_000_000,
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| RestoreError::Io { path: dir.clone(), cause: e })?;
        let scratch = ScratchDir { dir: dir.clone(), bin_dir: opts.bin_dir.clone() };
        // The restored cluster's own pg_hba.conf may not be in its data directory (Debian keeps it
        // in /etc) or may not admit a local user: the scratch server trusts its socket, which
        // lives in this 0700 directory.
        let hba = dir.join("pg_hba.conf");
        std::fs::write(&hba, "local all all trust\n").map_err(|e| RestoreError::Io { path: hba.clone(), cause: e })?;
        let restore_opts = RestoreOptions {
            target,
            target_dir: scratch.data(),
            force: false,
            restore_command: opts.restore_command.clone(),
            workers: opts.workers,
            backup_id: None,
            start: Some(StartOptions {
                bin_dir: opts.bin_dir.clone(),
                port: SCRATCH_PORT,
                db_user: opts.db_user.clone(),
                timeout: opts.timeout,
            }),
            marker_repository: None,
            standby: None,
            tablespace_map: Default::default(),
            delta: false,
            exclusive: false,
        };
        let launch = ServerLaunch::scratch("", vec![format!("hba_file='{}'", hba.display())]);
        let marker = announce(opts.marker_repository.as_ref().unwrap_or(repo), opts.run_kind).await;
        let restored = async {
            let catalog = match &marker {
                Some(_) => current_catalog(repo, catalog, target, None).await?,
                None => std::borrow::Cow::Borrowed(catalog),
            };
            restore_marked_as(repo, &catalog, &restore_opts, &|_, _| {}, marker.as_ref(), started, &launch).await
        }
        .await;
        if let Some(marker) = marker {
            marker.release().await;
        }
        Ok(ScratchCluster { scratch, db_user: opts.db_user.clone(), report: restored? })
    }

    /// How the restore went: the backup used, the last commit replayed, timings.
    pub fn restore_report(&self) -> &RestoreReport {
        &self.report
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        &self.scratch.dir
    }

    /// A connection string for `database` on the scratch server (its Unix socket), as libpq,
    /// `tokio_postgres` and [`TargetDatabase::parse`] read it: a drill may create a database
    /// there and copy a table into it.
    pub fn conninfo(&self, database: &str) -> String {
        socket_conninfo(&self.scratch.data(), &self.db_user, database)
    }

    fn error(&self, what: impl fmt::Display) -> TableError {
        TableError::Scratch { dir: self.scratch.data(), what: what.to_string() }
    }

    async fn client(&self, database: &str) -> Result<ScratchClient, TableError> {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(database), tokio_postgres::NoTls)
            .await
            .map_err(|e| self.error(format!("connecting to database {database}: {}", server_message(&e))))?;
        let task = tokio::spawn(conn);
        Ok(ScratchClient { client, task })
    }

    /// The databases that accept connections (templates left out).
    pub async fn databases(&self) -> Result<Vec<String>, TableError> {
        let c = self.client("postgres").await?;
        let rows = c
            .client
            .query("select datname from pg_database where datallowconn and not datistemplate order by datname", &[])
            .await
            .map_err(|e| self.error(server_message(&e)))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Every ordinary, logged table of every database (system schemas left out): those
    /// [`copy_table`] can copy.
    pub async fn list_tables(&self) -> Result<Vec<ScratchTable>, TableError> {
        let mut out = Vec::new();
        for database in self.databases().await? {
            let c = self.client(&database).await?;
            let rows = c
                .client
                .query(
                    "select n.nspname::text, c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                     where c.relkind = 'r' and c.relpersistence = 'p' and n.nspname not in ('pg_catalog', 'information_schema') \
                     and n.nspname not like 'pg\\_toast%' and n.nspname not like 'pg\\_temp\\_%' order by 1, 2",
                    &[],
                )
                .await
                .map_err(|e| self.error(server_message(&e)))?;
            out.extend(rows.iter().map(|r| ScratchTable {
                database: database.clone(),
                table: TableName { schema: r.get(0), name: r.get(1) },
            }));
        }
        Ok(out)
    }

    /// Stops the server and removes the scratch directory now, saying if that failed (dropping
    /// does the same and only logs).
    pub fn remove(self) -> Result<(), TableError> {
        let result = self.scratch.clean_up();
        let dir = self.scratch.dir.clone();
        result.map_err(|e| TableError::Restore(RestoreError::Io { path: dir, cause: e }))
    }

    /// The database holding `table` at the moment: the one named, or the only one that had it.
    async fn database_of(&self, table: &TableRef) -> Result<String, TableError> {
        let at = self.report.target.clone();
        let databases = self.databases().await?;
        let candidates = match &table.database {
            Some(db) if databases.contains(db) => vec![db.clone()],
            Some(db) => {
                return Err(TableError::NotFound {
                    table: table.to_string(),
                    at,
                    searched: format!("the cluster had no database {} then", display_ident(db)),
                })
            }
            None => databases.clone(),
        };
        let mut holding = Vec::new();
        for db in &candidates {
            let c = self.client(db).await?;
            let row = c
                .client
                .query_one("select to_regclass($1)::oid", &[&table.table.quoted()])
                .await
                .map_err(|e| self.error(server_message(&e)))?;
            if row.get::<_, Option<u32>>(0).is_some() {
                holding.push(db.clone());
            }
        }
        match holding.len() {
            1 => Ok(holding.remove(0)),
            0 => {
                // A wrong schema or letter case is the usual slip: name the tables that differ
                // only by those.
                let wanted = table.table.name.to_lowercase();
                let similar: Vec<String> = self
                    .list_tables()
                    .await?
                    .into_iter()
                    .filter(|t| t.table.name.to_lowercase() == wanted)
                    .map(|t| format!("{}.{}", display_ident(&t.database), t.table))
                    .collect();
                let mut searched = format!(
                    "looked in database(s) {} restored from backup {}",
                    candidates.join(", "),
                    self.report.backup_id
                );
                if !similar.is_empty() {
                    searched.push_str(&format!("; tables of a similar name then: {}", similar.join(", ")));
                }
                Err(TableError::NotFound { table: table.to_string(), at, searched })
            }
            _ => Err(TableError::Ambiguous { table: table.table.to_string(), at, databases: holding.join(", ") }),
        }
    }
}

struct ScratchClient {
    client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl Drop for ScratchClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The copy
// ---------------------------------------------------------------------------------------------

/// Something of the table that the copy does not carry, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeftOut {
    /// `foreign key`, `trigger`, `rule`, `policy`, `row level security`, `inheritance`,
    /// `partition of`, `inherited rows`, `default`, `statistics`, `publication`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What it was (the table a foreign key referenced, the sequence a default drew from…).
    pub detail: String,
}

/// What [`copy_table`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableCopyReport {
    /// The database the table was in at the moment.
    pub database: String,
    /// The table restored.
    pub table: TableName,
    /// The table created in the target.
    pub new_table: TableName,
    /// Rows copied (counted in the target after the copy).
    pub rows: u64,
    /// The table's columns at the moment, in order.
    pub columns: Vec<String>,
    /// Indexes of the copy (their new names).
    pub indexes: Vec<String>,
    /// Sequences the copy owns (their new names).
    pub sequences: Vec<String>,
    /// What the copy does not carry.
    pub left_out: Vec<LeftOut>,
    /// The table's OID at the moment (in the database it was in).
    pub oid: u32,
    /// What the user should know, such as that the table of that name in the target is not
    /// the one restored.
    pub warnings: Vec<String>,
    /// Preparing, dumping and restoring.
    pub seconds: f64,
}

/// Copies `table` from the scratch cluster into `into` as `new_table` (module documentation).
/// The scratch cluster is changed (the table renamed and trimmed there): it is disposable.
pub async fn copy_table(
    scratch: &ScratchCluster,
    table: &TableRef,
    new_table: &TableName,
    into: &TargetDatabase,
) -> Result<TableCopyReport, TableError> {
    let started = Instant::now();
    let target_names = into.check_new_table(new_table).await?;
    let database = scratch.database_of(table).await?;
    let c = scratch.client(&database).await?;
    let client = &c.client;
    let err = |e: tokio_postgres::Error| scratch.error(format!("database {database}: {}", server_message(&e)));
    let row = client
        .query_one(
            "select current_user::text, coalesce((select rolsuper from pg_roles where rolname = current_user), false)",
            &[],
        )
        .await
        .map_err(err)?;
    if !row.get::<_, bool>(1) {
        return Err(scratch.error(format!(
            "role {} was not a superuser in the cluster at the moment restored to; the copy is prepared \
             there as a superuser: choose one with --db-user",
            row.get::<_, String>(0)
        )));
    }
    // Event triggers of the restored cluster do not fire on the renames below; a lock the
    // preparation cannot have is an error, not a wait without end.
    client.batch_execute("set session_replication_role = replica; set lock_timeout = '60s'").await.map_err(err)?;
    // Transactions prepared (two-phase) at the moment keep their locks after promotion; they had
    // not committed then, so they are rolled back.
    let mut left_out = Vec::new();
    for r in
        client.query("select gid, database::text from pg_prepared_xacts order by prepared", &[]).await.map_err(err)?
    {
        let (gid, db): (String, String) = (r.get(0), r.get(1));
        let other;
        let on = if db == database {
            client
        } else {
            other = scratch.client(&db).await?;
            &other.client
        };
        on.batch_execute(&format!("rollback prepared {}", quote_literal(&gid))).await.map_err(|e| {
            scratch.error(format!("database {db}: rolling back prepared transaction {gid:?}: {}", server_message(&e)))
        })?;
        left_out.push(LeftOut {
            kind: "prepared transaction".into(),
            name: gid,
            detail: format!("prepared in database {db} but not committed at the moment: rolled back"),
        });
    }
    let row = client
        .query_one(
            "select c.oid, c.relkind::text, c.relispartition, c.relrowsecurity, c.relpersistence::text \
             from pg_class c where c.oid = to_regclass($1)",
            &[&table.table.quoted()],
        )
        .await
        .map_err(err)?;
    let (oid, relkind, is_partition, rls): (u32, String, bool, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    let kind = match relkind.as_str() {
        "r" => None,
        "p" => Some("partitioned table"),
        "v" => Some("view"),
        "m" => Some("materialized view"),
        "f" => Some("foreign table"),
        "S" => Some("sequence"),
        "i" | "I" => Some("index"),
        _ => Some("relation of another kind"),
    };
    if let Some(kind) = kind {
        return Err(TableError::NotATable { table: table.to_string(), kind, at: scratch.report.target.clone() });
    }
    if row.get::<_, String>(4) == "u" {
        return Err(TableError::Unlogged { table: table.to_string(), at: scratch.report.target.clone() });
    }
    let old = &table.table;
    let t = old.quoted();
    let mut statements = Vec::new();
    // Restoring into the database the table came from, where a table of that name now is
    // another one (dropped and created again after the moment): the user may be comparing the
    // wrong two tables.
    let mut warnings = Vec::new();
    let scratch_system: Option<String> =
        client.query_one("select system_identifier::text from pg_control_system()", &[]).await.ok().map(|r| r.get(0));
    if let (Some(system), Some((target_system, target_db, Some(now_oid)))) = (scratch_system, into.identity(old).await)
    {
        if system == target_system && target_db == database && now_oid != oid {
            warnings.push(format!(
                "{old} in {} is a different table now (OID {now_oid}; the one restored had OID {oid} at the moment): \
                 it was dropped and created again since",
                into.redacted()
            ));
        }
    }

    let query = |sql: &'static str| async move { client.query(sql, &[&oid]).await.map_err(err) };
    // Links to parents first, in a transaction of their own: the foreign keys and triggers a
    // partition inherits cannot be dropped while it is attached, and are its own once detached
    // (then read and dropped below like any other).
    let mut unlink = Vec::new();
    for r in query(
        "select p.oid, n.nspname::text, p.relname::text from pg_inherits i join pg_class p on p.oid = i.inhparent \
         join pg_namespace n on n.oid = p.relnamespace where i.inhrelid = $1 order by 2, 3",
    )
    .await?
    {
        let parent_oid: u32 = r.get(0);
        let parent = TableName { schema: r.get(1), name: r.get(2) };
        if is_partition {
            // Detaching checks the partition's rows against foreign keys referencing the parent;
            // in the scratch cluster those keys go first.
            for f in client
                .query(
                    "select conrelid::regclass::text, conname::text from pg_constraint \
                     where contype = 'f' and confrelid = $1 and conparentid = 0 order by 1, 2",
                    &[&parent_oid],
                )
                .await
                .map_err(err)?
            {
                let (referencing, name): (String, String) = (f.get(0), f.get(1));
                unlink.push(format!("alter table {referencing} drop constraint {}", quote_ident(&name)));
            }
            unlink.push(format!("alter table {} detach partition {t}", parent.quoted()));
            left_out.push(LeftOut { kind: "partition of".into(), name: parent.to_string(), detail: String::new() });
        } else {
            unlink.push(format!("alter table {t} no inherit {}", parent.quoted()));
            left_out.push(LeftOut { kind: "inheritance".into(), name: parent.to_string(), detail: String::new() });
        }
    }
    // Triggers a partition cloned from its parent go with the detach: reported from here.
    let triggers_before: Vec<String> = if is_partition {
        query("select tgname::text from pg_trigger where tgrelid = $1 and not tgisinternal order by 1")
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    if !unlink.is_empty() {
        let script = format!("begin;\n{};\ncommit;\n", unlink.join(";\n"));
        tracing::debug!(script = %script, "unlinking the table from its parents in the scratch server");
        client.batch_execute(&script).await.map_err(err)?;
    }
    for r in query(
        "select conname::text, confrelid::regclass::text from pg_constraint \
         where conrelid = $1 and contype = 'f' and confrelid <> $1 order by 1",
    )
    .await?
    {
        let (name, referenced): (String, String) = (r.get(0), r.get(1));
        statements.push(format!("alter table {t} drop constraint {}", quote_ident(&name)));
        left_out.push(LeftOut { kind: "foreign key".into(), name, detail: format!("references {referenced}") });
    }
    let triggers: Vec<String> =
        query("select tgname::text from pg_trigger where tgrelid = $1 and not tgisinternal order by 1")
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
    for name in triggers_before.into_iter().filter(|n| !triggers.contains(n)) {
        left_out.push(LeftOut { kind: "trigger".into(), name, detail: "inherited from the partitioned table".into() });
    }
    for name in triggers {
        statements.push(format!("drop trigger {} on {t}", quote_ident(&name)));
        left_out.push(LeftOut { kind: "trigger".into(), name, detail: String::new() });
    }
    for r in
        query("select rulename::text from pg_rewrite where ev_class = $1 and rulename <> '_RETURN' order by 1").await?
    {
        let name: String = r.get(0);
        statements.push(format!("drop rule {} on {t}", quote_ident(&name)));
        left_out.push(LeftOut { kind: "rule".into(), name, detail: String::new() });
    }
    for r in query("select polname::text from pg_policy where polrelid = $1 order by 1").await? {
        let name: String = r.get(0);
        statements.push(format!("drop policy {} on {t}", quote_ident(&name)));
        left_out.push(LeftOut { kind: "policy".into(), name, detail: String::new() });
    }
    if rls {
        // Kept on with no policy left: nobody but the owner (the restoring user), superusers
        // and BYPASSRLS roles reads a row, even where default privileges grant SELECT. Not
        // forced, else the owner could not read (nor the copy be counted) either.
        statements.push(format!("alter table {t} enable row level security, no force row level security"));
        left_out.push(LeftOut {
            kind: "row level security".into(),
            name: old.to_string(),
            detail: "kept on without its policies: only the copy's owner, superusers and BYPASSRLS roles read its rows; add policies to share them".into(),
        });
    }
    for r in query(
        "select c.oid::regclass::text from pg_inherits i join pg_class c on c.oid = i.inhrelid where i.inhparent = $1 order by 1",
    )
    .await?
    {
        let child: String = r.get(0);
        left_out.push(LeftOut {
            kind: "inherited rows".into(),
            name: child,
            detail: "rows of this child table are not part of the copy".into(),
        });
    }
    // A default drawing from a sequence the table does not own would advance that sequence in
    // the target (the original's, where it is the same database).
    for r in query(
        "select distinct a.attname::text, s.oid::regclass::text from pg_attrdef ad \
         join pg_attribute a on a.attrelid = ad.adrelid and a.attnum = ad.adnum \
         join pg_depend d on d.classid = 'pg_attrdef'::regclass and d.objid = ad.oid and d.refclassid = 'pg_class'::regclass \
         join pg_class s on s.oid = d.refobjid and s.relkind = 'S' \
         where ad.adrelid = $1 and not exists (select 1 from pg_depend o where o.classid = 'pg_class'::regclass \
           and o.objid = s.oid and o.refclassid = 'pg_class'::regclass and o.refobjid = $1 and o.deptype in ('a', 'i')) \
         order by 1",
    )
    .await?
    {
        let (column, sequence): (String, String) = (r.get(0), r.get(1));
        statements.push(format!("alter table {t} alter column {} drop default", quote_ident(&column)));
        left_out.push(LeftOut {
            kind: "default".into(),
            name: column,
            detail: format!("drew from sequence {sequence}, which the table does not own"),
        });
    }
    for r in query(
        "select n.nspname::text, s.stxname::text from pg_statistic_ext s join pg_namespace n on n.oid = s.stxnamespace \
         where s.stxrelid = $1 order by 2",
    )
    .await?
    {
        let (schema, name): (String, String) = (r.get(0), r.get(1));
        statements.push(format!("drop statistics {}.{}", quote_ident(&schema), quote_ident(&name)));
        left_out.push(LeftOut { kind: "statistics".into(), name, detail: String::new() });
    }
    for r in query("select p.pubname::text from pg_publication_rel r join pg_publication p on p.oid = r.prpubid where r.prrelid = $1 order by 1").await? {
        let name: String = r.get(0);
        left_out.push(LeftOut { kind: "publication".into(), name, detail: "the copy is in no publication".into() });
    }

    // New names: the table's own objects are renamed first, in its schema, to names free in the
    // scratch schemas involved and in the target schema; then the table moves to the target schema.
    let indexes: Vec<String> = query(
        "select c.relname::text from pg_index i join pg_class c on c.oid = i.indexrelid where i.indrelid = $1 order by 1",
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    // An owned sequence may live in another schema: it is renamed there, and moves with the
    // table to the target schema.
    let sequences: Vec<(String, String)> = query(
        "select n.nspname::text, s.relname::text from pg_depend d join pg_class s on s.oid = d.objid \
         join pg_namespace n on n.oid = s.relnamespace \
         where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass and d.refobjid = $1 \
         and s.relkind = 'S' and d.deptype in ('a', 'i') order by 2, 1",
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let mut own: BTreeSet<String> =
        indexes.iter().chain(sequences.iter().filter(|(s, _)| *s == old.schema).map(|(_, n)| n)).cloned().collect();
    own.insert(old.name.clone());
    let mut taken = target_names;
    let mut in_the_way = Vec::new();
    let mut schemas = BTreeSet::from([old.schema.clone(), new_table.schema.clone()]);
    schemas.extend(sequences.iter().map(|(s, _)| s.clone()));
    for schema in schemas {
        for r in client
            .query(
                "select c.relname::text, c.oid from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = $1",
                &[&schema],
            )
            .await
            .map_err(err)?
        {
            let (name, rel_oid): (String, u32) = (r.get(0), r.get(1));
            if name == new_table.name && !(schema == old.schema && own.contains(&name)) {
                in_the_way.push((TableName { schema: schema.clone(), name: name.clone() }, rel_oid));
            } else if !(schema == old.schema && own.contains(&name)) {
                taken.insert(name);
            }
        }
    }
    // A relation of the scratch cluster that has the new name (the target does not) steps aside.
    for (other, rel_oid) in &in_the_way {
        let aside = format!("pitr_aside_{rel_oid}");
        statements.push(format!("alter table {} rename to {}", other.quoted(), quote_ident(&aside)));
        taken.insert(aside);
    }
    taken.insert(new_table.name.clone());
    let mut renamed_indexes = Vec::new();
    for index in &indexes {
        let new = free_name(index, &old.name, &new_table.name, &taken);
        taken.insert(new.clone());
        if &new != index {
            statements.push(format!(
                "alter index {}.{} rename to {}",
                quote_ident(&old.schema),
                quote_ident(index),
                quote_ident(&new)
            ));
        }
        renamed_indexes.push(new);
    }
    let mut renamed_sequences = Vec::new();
    for (schema, sequence) in &sequences {
        let new = free_name(sequence, &old.name, &new_table.name, &taken);
        taken.insert(new.clone());
        if &new != sequence {
            statements.push(format!(
                "alter sequence {}.{} rename to {}",
                quote_ident(schema),
                quote_ident(sequence),
                quote_ident(&new)
            ));
        }
        renamed_sequences.push(new);
    }
    if old.name != new_table.name {
        statements.push(format!("alter table {t} rename to {}", quote_ident(&new_table.name)));
    }
    if old.schema != new_table.schema {
        statements.push(format!("create schema if not exists {}", quote_ident(&new_table.schema)));
        statements.push(format!(
            "alter table {}.{} set schema {}",
            quote_ident(&old.schema),
            quote_ident(&new_table.name),
            quote_ident(&new_table.schema)
        ));
    }
    let mut script = String::from("begin;\n");
    for s in &statements {
        script.push_str(s);
        script.push_str(";\n");
    }
    script.push_str("commit;\n");
    tracing::debug!(script = %script, "preparing the copy in the scratch server");
    client.batch_execute(&script).await.map_err(err)?;
    let columns: Vec<String> = client
        .query(
            "select attname::text from pg_attribute where attrelid = $1 and attnum > 0 and not attisdropped order by attnum",
            &[&oid],
        )
        .await
        .map_err(err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rows_at_moment: i64 =
        client.query_one(&format!("select count(*) from {}", new_table.quoted()), &[]).await.map_err(err)?.get(0);
    drop(c);

    dump_and_restore(scratch, &database, new_table, into).await?;
    let after_copy = |what: String| TableError::AfterCopy {
        table: new_table.clone(),
        target: into.redacted(),
        what: pitr_pgwire::conninfo::redact_in_text(&what),
    };
    let rows = into.count_rows(new_table).await.map_err(|e| after_copy(format!("counting its rows failed: {e}")))?;
    if rows != rows_at_moment as u64 {
        return Err(after_copy(format!("it holds {rows} rows, but the table had {rows_at_moment} at the moment")));
    }
    Ok(TableCopyReport {
        database,
        table: old.clone(),
        new_table: new_table.clone(),
        rows,
        columns,
        indexes: renamed_indexes,
        sequences: renamed_sequences,
        left_out,
        oid,
        warnings,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `pg_dump` of `table` from the scratch server piped into `pg_restore` on the target, in one
/// transaction there.
async fn dump_and_restore(
    scratch: &ScratchCluster,
    database: &str,
    table: &TableName,
    into: &TargetDatabase,
) -> Result<(), TableError> {
    let copy_error = |what: String| TableError::Copy {
        table: table.clone(),
        target: into.redacted(),
        what: pitr_pgwire::conninfo::redact_in_text(&what),
    };
    let bin = &scratch.scratch.bin_dir;
    let mut dump = tokio::process::Command::new(bin.join("pg_dump"));
    dump.arg(format!("--dbname={}", scratch.conninfo(database)))
        .args(["--format=custom", "--strict-names", "--no-publications", "--no-subscriptions"])
        .args(["--no-security-labels", "--no-tablespaces", "--no-owner", "--no-privileges"])
        .arg(format!("--table={}", table.quoted()))
        .env_remove("PGPASSWORD")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut dump = dump.spawn().map_err(|e| copy_error(format!("running {}: {e}", bin.join("pg_dump").display())))?;
    let dump_out: Stdio = dump
        .stdout
        .take()
        .ok_or_else(|| copy_error("pg_dump's output pipe".into()))?
        .try_into()
        .map_err(|e| copy_error(format!("pg_dump's output pipe: {e}")))?;
    let mut restore = tokio::process::Command::new(bin.join("pg_restore"));
    restore
        .args(["--no-owner", "--no-privileges", "--no-tablespaces", "--single-transaction", "--exit-on-error"])
        .arg(format!("--dbname={}", into.redacted()))
        .stdin(dump_out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // The password goes through the environment: the process list shows arguments. Without one
    // in --into, pg_restore looks where the check's connection looked (PGPASSWORD, ~/.pgpass).
    if let Some(p) = &into.info.password {
        restore.env("PGPASSWORD", p);
    }
    let restore =
        restore.spawn().map_err(|e| copy_error(format!("running {}: {e}", bin.join("pg_restore").display())))?;
    let (dumped, restored) = tokio::join!(dump.wait_with_output(), restore.wait_with_output());
    let dumped = dumped.map_err(|e| copy_error(format!("pg_dump: {e}")))?;
    let restored = restored.map_err(|e| copy_error(format!("pg_restore: {e}")))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    // pg_restore's error first: when pg_dump failed too, it is usually the consequence.
    if !restored.status.success() {
        return Err(copy_error(format!(
            "pg_restore failed ({}): {}{}",
            restored.status,
            text(&restored.stderr),
            if dumped.status.success() {
                String::new()
            } else {
                format!("; pg_dump from the scratch server: {}", text(&dumped.stderr))
            }
        )));
    }
    into.created.store(true, std::sync::atomic::Ordering::SeqCst);
    if !dumped.status.success() {
        return Err(TableError::AfterCopy {
            table: table.clone(),
            target: into.redacted(),
            what: pitr_pgwire::conninfo::redact_in_text(&format!(
                "pg_dump from the scratch server failed ({}): {}; the copy may be incomplete",
                dumped.status,
                text(&dumped.stderr)
            )),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(schema: &str, name: &str) -> TableName {
        TableName { schema: schema.into(), name: name.into() }
    }

    #[test]
    fn table_names_follow_sql_identifier_rules() {
        assert_eq!(parse_table("public.Orders").unwrap(), TableRef { database: None, table: name("public", "orders") });
        assert_eq!(
            parse_table("shop.\"Sales\".\"Q1 \"\"big\"\"\"").unwrap(),
            TableRef { database: Some("shop".into()), table: name("Sales", "Q1 \"big\"") }
        );
        assert_eq!(parse_table("a.b$1").unwrap().table, name("a", "b$1"));
        for bad in ["orders", "a.b.c.d", "a..b", "a.", "\"a.b", "a.b c", "1a.b", "a.\"\"", "a.b;drop"] {
            let e = parse_table(bad).unwrap_err();
            assert!(matches!(e, TableError::Name { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        let long = "x".repeat(64);
        assert!(parse_table(&format!("public.{long}")).unwrap_err().to_string().contains("63-byte"));
        assert!(parse_table(&format!("public.{}", "x".repeat(63))).is_ok());
    }

    #[test]
    fn new_names_default_to_the_tables_schema_and_fit_63_bytes() {
        assert_eq!(parse_new_name("Copy", "sales").unwrap(), name("sales", "copy"));
        assert_eq!(parse_new_name("archive.copy", "sales").unwrap(), name("archive", "copy"));
        assert!(parse_new_name("db.archive.copy", "sales").is_err());
        let t = crate::target::parse_target("2026-11-25T14:03:07.5Z").unwrap();
        assert_eq!(default_new_name(&name("public", "orders"), t), name("public", "orders_at_20261125140307"));
        let long = default_new_name(&name("public", &"é".repeat(31)), t);
        assert!(long.name.len() <= MAX_IDENTIFIER_BYTES && long.name.ends_with("_at_20261125140307"), "{long:?}");
        assert_eq!(default_new_name(&name("s", "t"), RecoveryTarget::Lsn(0x16_B374_D848)).name, "t_at_lsn_16_b374d848");
    }

    #[test]
    fn copies_objects_get_names_free_in_the_target() {
        let taken: BTreeSet<String> = ["orders_at_t_pkey", "orders_at_t_pkey1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(free_name("orders_pkey", "orders", "orders_at_t", &taken), "orders_at_t_pkey2");
        assert_eq!(free_name("orders_id_seq", "orders", "orders_at_t", &taken), "orders_at_t_id_seq");
        assert_eq!(free_name("by_customer", "orders", "copy", &taken), "copy_by_customer");
        let long = free_name(&format!("orders_{}", "i".repeat(60)), "orders", &"n".repeat(63), &taken);
        assert_eq!(long.len(), MAX_IDENTIFIER_BYTES);
        // An index whose name does not start with the table's and is 63 bytes already.
        let other = "i".repeat(63);
        let taken_too: BTreeSet<String> = [fit("", &format!("_{other}"))].into_iter().collect();
        for taken in [BTreeSet::new(), taken_too] {
            let n = free_name(&other, "orders", "copy", &taken);
            assert!(n.len() <= MAX_IDENTIFIER_BYTES && !taken.contains(&n), "{n}");
        }
        let wide = free_name(&"é".repeat(31), "orders", "copy", &BTreeSet::new());
        assert!(wide.len() <= MAX_IDENTIFIER_BYTES, "{wide}");
    }

    #[test]
    fn the_scratch_conninfo_reads_back_as_a_unix_socket_everywhere() {
        let text = socket_conninfo(Path::new("/tmp/it's a dir\\x/data"), "post'gres", "db one");
        let info = pitr_pgwire::conninfo::parse(&text).unwrap();
        assert_eq!(
            info.hosts,
            vec![pitr_pgwire::conninfo::Host::Unix { dir: "/tmp/it's a dir\\x/data".into(), port: SCRATCH_PORT }]
        );
        assert_eq!((info.user.as_deref(), info.dbname.as_deref()), (Some("post'gres"), Some("db one")));
        let config: tokio_postgres::Config = text.parse().unwrap();
        assert_eq!(config.get_user(), Some("post'gres"));
        assert_eq!(config.get_dbname(), Some("db one"));
        assert_eq!(config.get_hosts(), &[tokio_postgres::config::Host::Unix(PathBuf::from("/tmp/it's a dir\\x/data"))]);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
        assert_eq!(name("public", "orders").to_string(), "public.orders");
        assert_eq!(name("Sales", "q 1").to_string(), "\"Sales\".\"q 1\"");
        assert_eq!(name("public", "orders").quoted(), "\"public\".\"orders\"");
    }
}
