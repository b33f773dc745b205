//! `pitr check`: the preflight an SRE runs after editing the config (as `pgbackrest check` and
//! `barman check`). Every check that applies to the config runs and prints one line, `OK` or
//! `FAIL` with the fix; exit 1 on any FAIL. A check that needs a connection an earlier check could
//! not open is a FAIL "not checked: …", never a silent skip: an SRE reading only the FAIL lines
//! must not take an unchecked setting for a good one.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use hyper::body::Bytes;
use pitr_archive::PutOutcome;
use pitr_pgwire::{ConnectOptions, Connection};

use crate::config::{Config, PostgresConfig};
use crate::open;
use crate::output::print_json;

/// Clock skew against the server above which `check` fails: recovery targets are read in the
/// operator's clock and matched against commit times written by the server's, so a larger skew
/// restores to a moment other than the one asked for.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5);

/// How long one connection attempt may take before its check fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// One check's outcome.
#[derive(Debug, serde::Serialize)]
struct Check {
    name: String,
    ok: bool,
    /// What was found (OK) or why it failed.
    detail: String,
    /// How to fix a failure; empty for OK.
    fix: String,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn ok(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.0.push(Check { name: name.into(), ok: true, detail: detail.into(), fix: String::new() });
    }
    fn fail(&mut self, name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) {
        self.0.push(Check { name: name.into(), ok: false, detail: detail.into(), fix: fix.into() });
    }
    fn not_checked(&mut self, name: &str, why: &str) {
        self.fail(name, format!("not checked: {why}"), "fix the failure above, then run `pitr check` again");
    }
}

/// Runs every check that applies to the config at `config_path` and prints them.
pub async fn run(config_path: &Path, json: bool) -> Result<ExitCode> {
    let mut checks = Checks::default();
    match Config::load(config_path) {
        Ok(config) => {
            checks.ok("config", format!("{} is valid", config_path.display()));
            repository(&config, &mut checks).await;
            if let Some(pg) = &config.postgres {
                postgres(&config, pg, &mut checks).await;
                if config.backup.conninfo.is_some() {
                    backup_standby(&config, pg, &mut checks).await;
                }
            }
            dumps(&config, &mut checks).await;
            files(&config, &mut checks);
            mongo(&config, &mut checks).await;
        }
        Err(e) => checks.fail(
            "config",
            format!("{e:#}"),
            format!("correct {} (docs/configuration.md lists every setting)", config_path.display()),
        ),
    }
    let all_ok = checks.0.iter().all(|c| c.ok);
    if json {
        print_json(&serde_json::json!({ "checks": checks.0, "ok": all_ok }))?;
    } else {
        for c in &checks.0 {
            if c.ok {
                println!("OK   {}: {}", c.name, c.detail);
            } else {
                println!("FAIL {}: {} — fix: {}", c.name, c.detail, c.fix);
            }
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The repository takes a new object and refuses a second create of the same name, the
/// configured object storage honours conditional creates (the start-up probe of `pitr stream`),
/// and the key opens the repository.
async fn repository(config: &Config, checks: &mut Checks) {
    const WRITABLE: &str = "repository writable";
    match open::store(config) {
        Err(e) => checks.fail(WRITABLE, format!("{e:#}"), "correct [repository] path or url"),
        Ok(store) => {
            let location = store.location();
            match write_probe(store.as_ref()).await {
                Ok(()) => checks.ok(WRITABLE, format!("{location} takes new objects and refuses to replace one")),
                Err(why) => checks.fail(
                    WRITABLE,
                    format!("{location}: {why}"),
                    if config.repository.url.is_some() {
                        "check [repository] url, endpoint and region, and that these credentials may write to the bucket, then `pitr init`"
                    } else {
                        "make [repository] path a directory the pitr user can write, then `pitr init`"
                    },
                ),
            }
        }
    }
    if config.repository.url.is_some() || !config.repository.secondary.is_empty() {
        const COND: &str = "conditional create";
        match open::check_conditional_create(config).await {
            Ok(()) => checks.ok(COND, "every object storage refuses to overwrite an existing name"),
            Err(e) => checks.fail(
                COND,
                format!("{e:#}"),
                "use storage that supports If-None-Match: * (AWS S3, GCS, MinIO; not every S3-compatible server does)",
            ),
        }
    }
    const KEY: &str = "key opens repository";
    match open::reader(config, None) {
        Err(e) => checks.fail(KEY, format!("{e:#}"), "correct [encryption] (key_file, or the key source named)"),
        Ok(repo) => match repo.check().await {
            Ok(()) => checks.ok(KEY, format!("{} opened", repo.location())),
            Err(e) => checks.fail(
                KEY,
                format!("{:#}", anyhow::Error::new(e)),
                "point [encryption] key_file at the key this repository was created with (or run `pitr init` for a new repository)",
            ),
        },
    }
}

/// Puts a probe object under `pitr-probe/`, checks that a second create of the name is refused
/// and deletes it: a repository that cannot take this cannot take WAL.
async fn write_probe(store: &dyn pitr_archive::Store) -> Result<(), String> {
    let name = format!("{}check.{:016x}", pitr_archive::cloud::PROBE_PREFIX, rand::random::<u64>());
    let first = store.put_if_absent(&name, Bytes::from_static(b"pitr check probe")).await;
    let second = match &first {
        Ok(_) => Some(store.put_if_absent(&name, Bytes::from_static(b"pitr check probe, again")).await),
        Err(_) => None,
    };
    let deleted = store.delete(&name).await;
    match (first, second) {
        (Err(e), _) => Err(format!("cannot create an object: {e}")),
        (Ok(PutOutcome::AlreadyExists), _) => Err(format!("a fresh probe name {name} already existed")),
        (Ok(PutOutcome::Created), Some(Ok(PutOutcome::AlreadyExists))) => {
            deleted.map_err(|e| format!("cannot delete the probe object {name}: {e}"))
        }
        (Ok(PutOutcome::Created), Some(Ok(PutOutcome::Created))) => {
            Err(format!("a second create of {name} replaced it instead of being refused"))
        }
        (Ok(PutOutcome::Created), Some(Err(e))) => Err(format!("a second create of {name} failed: {e}")),
        (Ok(PutOutcome::Created), None) => Err("probe not attempted twice".into()),
    }
}

async fn connect(info: &pitr_pgwire::ConnInfo, opts: &ConnectOptions) -> Result<Connection, String> {
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(info, opts)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// What `synchronous_standby_names` means for the sidecar named `app`, and how it will put WAL.
fn sync_standby_detail(value: &str, app: &str, named: bool, flush_interval: pitr_walstream::FlushInterval) -> String {
    use pitr_walstream::FlushInterval;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    match (named, flush_interval) {
        (true, FlushInterval::Auto { .. }) => format!(
            "{value:?} names {app}: the primary's commits wait for the archive (a sidecar that is down holds them \
             up); WAL is put back to back (flush_interval auto)"
        ),
        (true, FlushInterval::Fixed(d)) if !d.is_zero() => format!(
            "{value:?} names {app}: every commit waits out flush_interval = {} ms as well; set it to \"auto\" or \
             \"0s\" to put WAL back to back",
            ms(d)
        ),
        (true, FlushInterval::Fixed(_)) => {
            format!("{value:?} names {app}: the primary's commits wait for the archive; WAL is put back to back")
        }
        (false, FlushInterval::Auto { when_async }) => format!(
            "{:?} does not name {app}: asynchronous, WAL puts {} ms apart (flush_interval auto)",
            value,
            ms(when_async)
        ),
        (false, FlushInterval::Fixed(d)) => {
            format!("{value:?} does not name {app}: asynchronous, WAL puts {} ms apart (flush_interval)", ms(d))
        }
    }
}

/// The fix for a refused replication connection, by the SQLSTATE the server refused it with.
/// A multi-host connect folds every host's refusal into one message, so the code is read from
/// its text (`FATAL 28000: …`).
fn replication_fix(why: &str) -> &'static str {
    if why.contains(" 53300:") {
        "raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = 10; then restart PostgreSQL)"
    } else if why.contains(" 42501:") {
        "grant the role REPLICATION (ALTER ROLE <role> REPLICATION;)"
    } else {
        "allow it in pg_hba.conf (`host replication <role> <sidecar address>/32 scram-sha-256`), then `SELECT pg_reload_conf()`"
    }
}

async fn scalar(conn: &mut Connection, sql: &str) -> Result<String, String> {
    let rows = conn.simple_query(sql).await.map_err(|e| format!("{sql}: {e}"))?;
    rows.text(0, 0).map(str::to_string).ok_or_else(|| format!("{sql}: no value"))
}

/// The PostgreSQL side: the role, the replication connection, the slot, WAL settings, the
/// binaries a restore runs, and the clock.
async fn postgres(config: &Config, pg: &PostgresConfig, checks: &mut Checks) {
    const SQL: &str = "postgres connection";
    const ROLE: &str = "postgres role has REPLICATION";
    const REPL: &str = "replication connection (pg_hba)";
    const SLOT: &str = "replication slot";
    const WAL_LEVEL: &str = "wal_level";
    const SENDERS: &str = "max_wal_senders";
    const SUMMARIZE: &str = "summarize_wal";
    const BINS: &str = "postgres binaries for restores";
    const CLOCK: &str = "clock skew";
    const SYNC: &str = "synchronous_standby_names";
    let wants_summaries = !config.schedule.incremental.trim().is_empty();
    let info = match pg.connection_info() {
        Ok(info) => info,
        Err(e) => {
            checks.fail(SQL, format!("{e:#}"), "correct [postgres] conninfo");
            return;
        }
    };
    let shown = info.redacted();
    let slot = pg.slot();

    // Replication first: it is the connection the sidecar lives on.
    let repl_opts = ConnectOptions { replication: true, application_name: format!("{}_check", pg.application_name()) };
    match connect(&info, &repl_opts).await {
        Ok(mut conn) => {
            match conn.identify_system().await {
                Ok(id) => checks.ok(REPL, format!("{shown}: system {}, timeline {}", id.system_id, id.timeline)),
                Err(e) => checks.fail(
                    REPL,
                    format!("{shown}: IDENTIFY_SYSTEM: {e}"),
                    "grant the role REPLICATION (ALTER ROLE … REPLICATION)",
                ),
            }
            conn.close().await;
        }
        Err(why) => {
            let fix = replication_fix(&why);
            checks.fail(REPL, format!("{shown}: {why}"), fix)
        }
    }

    let sql_opts = ConnectOptions { replication: false, application_name: format!("{}_check", pg.application_name()) };
    let mut conn = match connect(&info, &sql_opts).await {
        Ok(conn) => {
            checks.ok(SQL, format!("{shown}: SQL connection opened"));
            conn
        }
        Err(why) => {
            checks.fail(
                SQL,
                format!("{shown}: {why}"),
                "allow the role a database connection in pg_hba.conf (the checks below read the server's settings)",
            );
            let why = "no SQL connection to PostgreSQL";
            for name in [ROLE, SLOT, WAL_LEVEL, SENDERS, SYNC, BINS, CLOCK] {
                checks.not_checked(name, why);
            }
            if wants_summaries {
                checks.not_checked(SUMMARIZE, why);
            }
            return;
        }
    };

    let can_replicate =
        scalar(&mut conn, "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").await;
    let user = scalar(&mut conn, "SELECT current_user").await.unwrap_or_default();
    match can_replicate.as_deref() {
        Ok("t") => checks.ok(ROLE, format!("role {user:?} may replicate")),
        Ok(_) => checks.fail(
            ROLE,
            format!("role {user:?} has neither REPLICATION nor SUPERUSER"),
            format!("ALTER ROLE {user} REPLICATION;"),
        ),
        Err(e) => checks.fail(ROLE, e.clone(), "grant the role read access to pg_roles"),
    }

    match pitr_pgwire::connection::validate_slot_name(&slot) {
        Err(e) => checks.fail(SLOT, e.to_string(), "correct [postgres] slot"),
        Ok(()) => {
            // The name is validated to [a-z0-9_], so it is safe inside the literal.
            let sql = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'");
            match scalar(&mut conn, &sql).await.as_deref() {
                Ok("0") if pg.create_slot => match can_replicate.as_deref() {
                    Ok("t") => checks.ok(SLOT, format!("{slot} does not exist yet; `pitr stream` creates it (create_slot = true)")),
                    _ => checks.fail(
                        SLOT,
                        format!("{slot} does not exist and the role may not create it"),
                        format!("ALTER ROLE {user} REPLICATION; or create it: SELECT pg_create_physical_replication_slot('{slot}', true);"),
                    ),
                },
                Ok("0") => checks.fail(
                    SLOT,
                    format!("{slot} does not exist and [postgres] create_slot = false"),
                    format!("SELECT pg_create_physical_replication_slot('{slot}', true); or set create_slot = true"),
                ),
                Ok(_) => checks.ok(SLOT, format!("{slot} exists")),
                Err(e) => checks.fail(SLOT, e.clone(), "grant the role read access to pg_replication_slots"),
            }
        }
    }

    match scalar(&mut conn, "SELECT current_setting('wal_level')").await {
        Ok(level) if level == "replica" || level == "logical" => checks.ok(WAL_LEVEL, level),
        Ok(level) => checks.fail(
            WAL_LEVEL,
            format!("{level}: the server writes too little WAL to restore from"),
            "ALTER SYSTEM SET wal_level = replica; then restart PostgreSQL",
        ),
        Err(e) => checks.fail(WAL_LEVEL, e, "check the role can read settings"),
    }

    let senders = "SELECT current_setting('max_wal_senders')::int || ' ' || (SELECT count(*) FROM pg_stat_replication)";
    match scalar(&mut conn, senders).await {
        Ok(pair) => {
            let mut it = pair.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
            let (max, used) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
            if max > used {
                checks.ok(SENDERS, format!("{max}, {used} in use"));
            } else {
                checks.fail(
                    SENDERS,
                    format!("{max}, {used} in use: no WAL sender left for pitr"),
                    format!("ALTER SYSTEM SET max_wal_senders = {}; then restart PostgreSQL", used + 2),
                );
            }
        }
        Err(e) => checks.fail(SENDERS, e, "check the role can read pg_stat_replication"),
    }

    match scalar(&mut conn, "SELECT current_setting('synchronous_standby_names')").await {
        Ok(value) => {
            let app = info.application_name_or(&pg.application_name());
            match pitr_walstream::names_standby(&value, &app) {
                Ok(named) => checks.ok(SYNC, sync_standby_detail(&value, &app, named, config.flush_interval())),
                Err(e) => checks.fail(
                    SYNC,
                    e.to_string(),
                    "pitr reads the setting otherwise than the server (please report it); meanwhile flush_interval \
                     = \"auto\" puts WAL back to back, as for a synchronous standby",
                ),
            }
        }
        Err(e) => checks.fail(SYNC, e, "check the role can read settings"),
    }

    let version = scalar(&mut conn, "SELECT current_setting('server_version_num')::int")
        .await
        .and_then(|v| v.parse::<u32>().map_err(|e| format!("server_version_num {v:?}: {e}")));
    if wants_summaries {
        match &version {
            Ok(v) if *v < 170000 => {
                checks.ok(SUMMARIZE, "not needed: incrementals need PostgreSQL 17+, older servers rely on WAL")
            }
            Ok(_) => match scalar(&mut conn, "SELECT current_setting('summarize_wal')").await.as_deref() {
                Ok("on") => checks.ok(SUMMARIZE, "on"),
                Ok(other) => checks.fail(
                    SUMMARIZE,
                    format!("{other}: [schedule] incremental is set but the server keeps no WAL summaries"),
                    "ALTER SYSTEM SET summarize_wal = on; SELECT pg_reload_conf();",
                ),
                Err(e) => checks.fail(SUMMARIZE, e.clone(), "check the role can read settings"),
            },
            Err(e) => checks.not_checked(SUMMARIZE, e),
        }
    }

    match &version {
        Ok(v) => match pitr_restore::pg_bin::bin_dir(pg.bin_dir.as_deref(), *v) {
            Ok(dir) if dir.join("postgres").is_file() => {
                checks.ok(BINS, format!("pg_ctl and postgres in {}", dir.display()))
            }
            Ok(dir) => checks.fail(
                BINS,
                format!("no postgres in {} for PostgreSQL {}", dir.display(), pitr_restore::pg_bin::major(*v)),
                "install the server package of that major version or set [postgres] bin_dir",
            ),
            Err(e) => checks.fail(
                BINS,
                e.to_string(),
                "install the server package of that major version or set [postgres] bin_dir",
            ),
        },
        Err(e) => checks.not_checked(BINS, e),
    }

    let before = SystemTime::now();
    match scalar(&mut conn, "SELECT extract(epoch FROM clock_timestamp())").await {
        Ok(text) => match text.parse::<f64>() {
            Ok(server) => {
                let after = SystemTime::now();
                let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
                // The server read its clock somewhere within the round trip: compare with its middle.
                let local = (secs(before) + secs(after)) / 2.0;
                let skew = server - local;
                let detail = format!("server clock {skew:+.3} s from this host's");
                if skew.abs() <= MAX_CLOCK_SKEW.as_secs_f64() {
                    checks.ok(CLOCK, detail);
                } else {
                    checks.fail(
                        CLOCK,
                        format!("{detail} (more than {} s)", MAX_CLOCK_SKEW.as_secs()),
                        "synchronise both clocks with NTP (chrony or systemd-timesyncd)",
                    );
                }
            }
            Err(e) => checks.fail(CLOCK, format!("server time {text:?}: {e}"), "report this as a bug"),
        },
        Err(e) => checks.fail(CLOCK, e, "check the role can run SELECT"),
    }
    conn.close().await;
}

/// `[backup] conninfo`: the standby takes replication connections, is in recovery, and is of the
/// primary's cluster and timeline, as every backup checks before it starts.
async fn backup_standby(config: &Config, pg: &PostgresConfig, checks: &mut Checks) {
    use pitr_basebackup::{BackupError, StandbyRefusal};
    const STANDBY: &str = "backup standby";
    let (standby, primary) = match (config.backup.standby_connection_info(pg), pg.connection_info()) {
        (Ok(Some(standby)), Ok(primary)) => (standby, primary),
        (Ok(None), _) => return,
        (Err(e), _) => return checks.fail(STANDBY, format!("{e:#}"), "correct [backup] conninfo"),
        (_, Err(_)) => return checks.not_checked(STANDBY, "[postgres] conninfo does not parse"),
    };
    let name = format!("{}_check", pg.application_name());
    let checked =
        tokio::time::timeout(CONNECT_TIMEOUT * 2, pitr_basebackup::check_standby(&standby, &primary, &name)).await;
    let e = match checked {
        Ok(Ok(found)) => {
            return checks.ok(
                STANDBY,
                format!(
                    "{}: a standby in recovery, system {}, timeline {} as the primary's; base backups are taken there",
                    found.host, found.system_id, found.timeline
                ),
            )
        }
        Ok(Err(e)) => e,
        Err(_) => {
            return checks.fail(
                STANDBY,
                format!("{}: no answer within {:?}", standby.redacted(), CONNECT_TIMEOUT * 2),
                "start the standby or correct [backup] conninfo",
            )
        }
    };
    let detail = e.to_string();
    let fix = match &e {
        BackupError::Standby { refusal: StandbyRefusal::Unreachable, .. } => {
            // A refusal by the server names its SQLSTATE as a refused primary's does.
            if detail.contains(" 53300:") || detail.contains(" 42501:") || detail.contains(" 28000:") {
                replication_fix(&detail)
            } else {
                "start the standby, or correct [backup] conninfo (host, port, user)"
            }
        }
        BackupError::Standby { refusal: StandbyRefusal::NotInRecovery, .. } => {
            "point [backup] conninfo at a streaming standby of the primary, or remove it to back up the primary"
        }
        BackupError::Standby { refusal: StandbyRefusal::OtherCluster, .. } => {
            "point [backup] conninfo at a standby of this primary (one built from it, e.g. pg_basebackup -R)"
        }
        BackupError::Standby { refusal: StandbyRefusal::OtherTimeline, .. } => {
            "let the standby follow the primary's timeline (recovery_target_timeline = 'latest', then restart it)"
        }
        BackupError::Standby { refusal: StandbyRefusal::PrimaryUnreachable, .. } => {
            "the primary must take a replication connection too (see the checks above)"
        }
        BackupError::Standby { .. } => "run `pitr check` again; the standby changed while it was checked",
        _ => "the primary must take a replication connection too (see the checks above)",
    };
    checks.fail(STANDBY, detail, fix);
}

/// `[[dumps]]`: pg_dump is found and the conninfo connects (no dump taken).
async fn dumps(config: &Config, checks: &mut Checks) {
    let tools = pitr_files::pgdump::PgTools::new(config.postgres.as_ref().and_then(|p| p.bin_dir.as_deref()));
    for set in &config.dumps {
        let name = format!("dump {}", set.name);
        match tools.program("pg_dump") {
            Ok(path) => checks.ok(format!("{name}: pg_dump"), path.display().to_string()),
            Err(e) => checks.fail(
                format!("{name}: pg_dump"),
                e.to_string(),
                "install the PostgreSQL client tools or set [postgres] bin_dir",
            ),
        }
        let info = match set.connection_info() {
            Ok(info) => info,
            Err(e) => {
                checks.fail(format!("{name}: connection"), format!("{e:#}"), "correct the set's conninfo");
                continue;
            }
        };
        let opts = ConnectOptions { replication: false, application_name: "pitr_check".into() };
        match connect(&info, &opts).await {
            Ok(conn) => {
                checks.ok(format!("{name}: connection"), info.redacted().to_string());
                conn.close().await;
            }
            Err(why) => checks.fail(
                format!("{name}: connection"),
                format!("{}: {why}", info.redacted()),
                "correct the set's conninfo or allow the role in pg_hba.conf",
            ),
        }
    }
}

/// `[[files]]`: each set's path exists and is readable by this user.
fn files(config: &Config, checks: &mut Checks) {
    for set in &config.files {
        let name = format!("files {}", set.name);
        let path = &set.path;
        let readable = match std::fs::metadata(path) {
            Err(e) => Err(e),
            Ok(m) if m.is_dir() => std::fs::read_dir(path).map(|_| ()),
            Ok(_) => std::fs::File::open(path).map(|_| ()),
        };
        match readable {
            Ok(()) => checks.ok(name, format!("{} is readable", path.display())),
            Err(e) => checks.fail(
                name,
                format!("{}: {e}", path.display()),
                "correct the set's path or give the pitr user read access",
            ),
        }
    }
}

/// `[mongo]`: the server answers `hello`.
async fn mongo(config: &Config, checks: &mut Checks) {
    let Some(m) = &config.mongo else { return };
    match pitr_mongo::connect(&m.uri, m.connect_timeout()).await {
        Ok(connected) => checks.ok(
            "mongo connection",
            format!("{} (replica set {})", connected.uri, connected.set_name.as_deref().unwrap_or("none: standalone")),
        ),
        Err(e) => checks.fail("mongo connection", e.to_string(), "correct [mongo] uri or start the server"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pitr_walstream::FlushInterval;
    use std::time::Duration;

    #[test]
    fn a_named_sidecar_with_a_fixed_spacing_is_told_what_its_commits_pay() {
        let fixed = FlushInterval::Fixed(Duration::from_secs(1));
        let text = sync_standby_detail("pitr_main", "pitr_main", true, fixed);
        assert!(
            text.contains("every commit waits out flush_interval = 1000 ms") && text.contains("\"auto\""),
            "{text}"
        );
        let auto = FlushInterval::Auto { when_async: Duration::from_millis(2) };
        assert!(sync_standby_detail("*", "pitr_main", true, auto).contains("put back to back (flush_interval auto)"));
        let text = sync_standby_detail("", "pitr_main", false, auto);
        assert!(text.contains("does not name pitr_main: asynchronous, WAL puts 2 ms apart"), "{text}");
        let zero = FlushInterval::Fixed(Duration::ZERO);
        assert!(sync_standby_detail("*", "pitr_main", true, zero).ends_with("WAL is put back to back"));
    }
}
