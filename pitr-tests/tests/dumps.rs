//! Logical dumps (`[[dumps]]` sets): a development database on PostgreSQL 15 dumped twice with
//! the server's own `pg_dump` (the second, after a small change, stores a fraction of the
//! first), restored with `--into` into new databases that equal the source at each dump, written
//! with `--output` to a file `pg_restore` reads, also when the primary refuses the restore's
//! running marker; the bad input of the dump commands, each one clear error that writes nothing;
//! and `pitr expire` running its file-set part when its dumps part fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};
use pitr_tests::checks::{assert_untouched, expect_failure, expect_success, run_pitr, snapshot};
use pitr_tests::{client_bin, free_port, http_request, scratch_dir, spawn_logged, wait_until, PgCluster, PgOptions};

/// The dumping role's password: `:` and `\` must be escaped in a password file.
const PASSWORD: &str = r"se:cr\et";

/// `psql` as `postgres` on database `db` of `cluster`; the trimmed output.
fn sql(cluster: &PgCluster, db: &str, sql: &str) -> Result<String> {
    let out = Command::new(client_bin("psql"))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &cluster.port.to_string(), "-U", "postgres", "-d", db, "-c", sql])
        .stdin(Stdio::null())
        .output()
        .context("running psql")?;
    if !out.status.success() {
        bail!("psql on {db}: {sql}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The development database: tables with a few thousand (and a hundred thousand) rows, a
/// sequence, an index, a view.
fn make_dev_database(cluster: &PgCluster) -> Result<()> {
    cluster.psql(&format!("CREATE ROLE dumper LOGIN PASSWORD '{}'", PASSWORD.replace('\'', "''")))?;
    cluster.psql("CREATE DATABASE dev OWNER dumper")?;
    sql(
        cluster,
        "dev",
        "SET ROLE dumper;
         CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE);
         INSERT INTO customers (name, email) SELECT 'customer ' || i, 'c' || i || '@example.com'
           FROM generate_series(1, 5000) i;
         CREATE TABLE events (id bigserial PRIMARY KEY, customer_id int REFERENCES customers,
           kind text, payload text, at timestamptz);
         INSERT INTO events (customer_id, kind, payload, at)
           SELECT 1 + i % 5000, (ARRAY['login','order','refund'])[1 + i % 3],
                  md5(i::text) || md5((i * 7)::text), '2026-01-01'::timestamptz + i * interval '1 minute'
           FROM generate_series(1, 100000) i;
         CREATE INDEX events_customer ON events (customer_id);
         CREATE SEQUENCE invoice_no START 1000;
         SELECT nextval('invoice_no') FROM generate_series(1, 42);
         CREATE VIEW big_spenders AS SELECT customer_id, count(*) FROM events WHERE kind = 'order' GROUP BY 1;",
    )?;
    Ok(())
}

/// What a database holds: each table's rows (md5 of all rows in order), the sequence's state, and
/// its schema as `pg_dump --schema-only` prints it (comments and `\restrict` keys left out).
fn fingerprint(cluster: &PgCluster, db: &str) -> Result<String> {
    let mut out = String::new();
    for table in ["customers", "events"] {
        let rows =
            sql(cluster, db, &format!("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t.id)) FROM {table} t"))?;
        out.push_str(&format!("{table}: {rows}\n"));
    }
    out.push_str(&format!("invoice_no: {}\n", sql(cluster, db, "SELECT last_value, is_called FROM invoice_no")?));
    let schema = Command::new(client_bin("pg_dump"))
        .args(["--schema-only", "--no-owner", "-h", "127.0.0.1", "-p", &cluster.port.to_string(), "-U", "postgres", db])
        .output()
        .context("pg_dump --schema-only")?;
    if !schema.status.success() {
        bail!("pg_dump --schema-only {db}: {}", String::from_utf8_lossy(&schema.stderr));
    }
    for line in String::from_utf8_lossy(&schema.stdout).lines() {
        let skip = line.starts_with("--") || line.starts_with("\\restrict") || line.starts_with("\\unrestrict");
        if !skip && !line.trim().is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// A scratch directory with a repository, key and a config of `[[dumps]]` sets only.
struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Env {
    fn new(name: &str, dumps: &str) -> Result<Env> {
        Env::with_metrics(name, dumps, "")
    }

    /// With the sidecar's /metrics on `listen` (`""`: off).
    fn with_metrics(name: &str, dumps: &str, listen: &str) -> Result<Env> {
        let dir = scratch_dir(name);
        let config = dir.path().join("pitr.toml");
        let text = format!(
            "[repository]\npath = {:?}\n[encryption]\nkey_file = {:?}\n[metrics]\nlisten = {listen:?}\n{dumps}\n",
            dir.path().join("repo").display().to_string(),
            dir.path().join("key").display().to_string(),
        );
        std::fs::write(&config, text)?;
        expect_success(&config, &["init"]);
        Ok(Env { dir, config })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = expect_success(&self.config, args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("pitr {args:?}: not JSON ({e}):\n{out}"))
    }
}

fn into(cluster: &PgCluster, db: &str) -> String {
    format!("host=127.0.0.1 port={} user=postgres dbname={db}", cluster.port)
}

fn sha256_of(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output().context("sha256sum")?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_development_database_is_dumped_twice_deduplicated_and_restored_as_it_was_at_each_dump() -> Result<()> {
    let mut opts = PgOptions::new(15);
    // The dumping role logs in with a password (SCRAM), given in the conninfo.
    opts.hba = vec!["host all dumper 127.0.0.1/32 scram-sha-256".into()];
    let cluster = PgCluster::start(opts)?;
    make_dev_database(&cluster)?;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=dumper dbname=dev password='{}'",
        cluster.port,
        PASSWORD.replace('\\', "\\\\")
    );
    let env = Env::new("dumps", &format!("[[dumps]]\nname = \"devdb\"\nconninfo = {conninfo:?}\nkeep_days = 7\n"))?;

    let before = fingerprint(&cluster, "dev")?;
    let first = env.json(&["dump", "--set", "devdb", "--json"]);
    let between = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    assert_eq!(first["database"], "dev");
    assert_eq!(first["server_version_num"].as_u64().map(|v| v / 10000), Some(15));
    let first_bytes = first["bytes"].as_u64().context("bytes")?;
    let first_stored = first["stored_bytes"].as_u64().context("stored_bytes")?;
    assert!(first_bytes > 8 << 20, "a dump of {first_bytes} bytes is too small to show deduplication");
    assert_eq!(first["reused_blocks"], 0, "{first}");

    // A small change: one row updated, ten added, the sequence moved on.
    sql(
        &cluster,
        "dev",
        "UPDATE customers SET name = 'renamed' WHERE id = 17;
         INSERT INTO events (customer_id, kind, payload, at) SELECT 1, 'order', 'new ' || i, now() FROM generate_series(1, 10) i;
         SELECT nextval('invoice_no');",
    )?;
    let after = fingerprint(&cluster, "dev")?;
    assert_ne!(before, after);
    let second = env.json(&["dump", "--set", "devdb", "--json"]);
    let second_stored = second["stored_bytes"].as_u64().context("stored_bytes")?;
    let (new, reused) = (second["new_blocks"].as_u64().unwrap_or(0), second["reused_blocks"].as_u64().unwrap_or(0));
    eprintln!(
        "first dump: {first_bytes} bytes, {first_stored} stored; second: {} bytes, {second_stored} stored ({new} new blocks, {reused} reused)",
        second["bytes"]
    );
    assert!(
        second_stored * 5 < first_stored,
        "the second dump stored {second_stored} bytes, the first {first_stored}: not deduplicated"
    );
    assert!(reused > 4 * new, "{new} new blocks, {reused} reused");
    assert_ne!(first["id"], second["id"]);

    // --into a new database: equal to the source at the newest dump.
    cluster.psql("CREATE DATABASE copy_latest")?;
    let restored = env.json(&[
        "restore",
        "--source",
        "dump",
        "--set",
        "devdb",
        "--to",
        "latest",
        "--into",
        &into(&cluster, "copy_latest"),
        "--json",
    ]);
    assert_eq!(restored["id"], second["id"]);
    assert_eq!(fingerprint(&cluster, "copy_latest")?, after);

    // A time between the dumps picks the first: the database as it was before the change.
    cluster.psql("CREATE DATABASE copy_first")?;
    let out = expect_success(
        &env.config,
        &["restore", "--source", "dump", "--set", "devdb", "--to", &between, "--into", &into(&cluster, "copy_first")],
    );
    assert!(out.contains(first["id"].as_str().unwrap_or("?")), "{out}");
    assert_eq!(fingerprint(&cluster, "copy_first")?, before);

    // Into a database that holds some of the tables already: pg_restore's error, and nothing
    // applied (events and its view come first in the dump and are created, then customers
    // fails: they are rolled back).
    sql(&cluster, "copy_first", "DROP TABLE events CASCADE")?;
    let held =
        || sql(&cluster, "copy_first", "SELECT to_regclass('public.events') IS NULL, (SELECT count(*) FROM customers)");
    let before_failure = held()?;
    assert_eq!(before_failure, "t|5000");
    let out = run_pitr(
        &env.config,
        &["restore", "--source", "dump", "--set", "devdb", "--to", "latest", "--into", &into(&cluster, "copy_first")],
    );
    let message = stderr(&out);
    assert!(!out.status.success());
    assert!(message.contains("pg_restore: failed") && message.contains("already exists"), "{message}");
    assert_eq!(held()?, before_failure, "a failed pg_restore left part of the dump behind");

    // The primary refuses the restore's running marker (here: `running` is a file, so no marker
    // can be put under it): the restore still goes on, with a warning, as PostgreSQL's do.
    let running = env.path("repo").join("running");
    if running.is_dir() {
        std::fs::remove_dir_all(&running)?;
    }
    std::fs::write(&running, b"not a directory")?;
    let unmarked = env.path("unmarked.dump");
    let out = run_pitr(
        &env.config,
        &[
            "restore",
            "--source",
            "dump",
            "--set",
            "devdb",
            "--to",
            "latest",
            "--output",
            &unmarked.display().to_string(),
        ],
    );
    assert!(out.status.success(), "a restore without its marker failed: {}", stderr(&out));
    assert!(stderr(&out).contains("without a running marker"), "{}", stderr(&out));
    assert_eq!(sha256_of(&unmarked)?, second["sha256"].as_str().unwrap_or("?"));
    std::fs::remove_file(&running)?;

    // --output: a file pg_restore reads, with the manifest's SHA-256.
    let file = env.path("dev.dump");
    let written = env.json(&[
        "restore",
        "--source",
        "dump",
        "--set",
        "devdb",
        "--to",
        "latest",
        "--output",
        &file.display().to_string(),
        "--json",
    ]);
    assert_eq!(sha256_of(&file)?, second["sha256"].as_str().unwrap_or("?"));
    assert_eq!(written["sha256"], second["sha256"]);
    let list = Command::new(client_bin("pg_restore")).arg("--list").arg(&file).output()?;
    assert!(list.status.success(), "pg_restore --list: {}", stderr(&list));
    let toc = String::from_utf8_lossy(&list.stdout);
    assert!(toc.contains("TABLE DATA public events") && toc.contains("SEQUENCE SET public invoice_no"), "{toc}");

    // list, verify.
    let listed = env.json(&["list", "--json"]);
    let sets = listed["dumps"]["sets"].as_array().context("dumps in list")?;
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["dumps"].as_array().map(Vec::len), Some(2));
    assert_eq!(sets[0]["dumps"][1]["sha256"], second["sha256"]);
    let text = expect_success(&env.config, &["list"]);
    assert!(text.contains("set devdb") && text.contains(second["id"].as_str().unwrap_or("?")), "{text}");
    let verified = env.json(&["verify", "--source", "dump", "--json"]);
    assert_eq!(verified["dumps"], 2);
    assert_eq!(verified["findings"].as_array().map(Vec::len), Some(0), "{verified}");
    Ok(())
}

#[test]
fn bad_input_to_the_dump_commands_is_one_clear_error_and_writes_nothing() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.psql("CREATE DATABASE dev")?;
    sql(&cluster, "dev", "CREATE TABLE t AS SELECT generate_series(1, 100) AS id")?;
    let port = cluster.port;
    let dumps = format!(
        "[[dumps]]\nname = \"devdb\"\nconninfo = \"host=127.0.0.1 port={port} user=postgres dbname=dev\"\n\
         [[dumps]]\nname = \"empty\"\nconninfo = \"host=127.0.0.1 port={port} user=postgres dbname=dev\"\n\
         [[dumps]]\nname = \"wrongdb\"\nconninfo = \"host=127.0.0.1 port={port} user=postgres dbname=nope\"\n\
         [[dumps]]\nname = \"down\"\nconninfo = \"host=127.0.0.1 port=1 user=postgres dbname=dev connect_timeout=5\"\n"
    );
    let env = Env::new("dumps-bad", &dumps)?;
    let c = &env.config;
    expect_success(c, &["dump", "--set", "devdb"]);
    let repo = env.path("repo");
    let untouched = snapshot(&repo);

    expect_failure(c, &["dump", "--set", "prod"], &["no dump set \"prod\"", "devdb, empty, wrongdb, down"]);
    expect_failure(
        c,
        &["restore", "--source", "dump", "--set", "prod", "--to", "latest", "--output", "/tmp/x"],
        &["no dump set \"prod\"", "devdb"],
    );
    expect_failure(
        c,
        &["dump", "--set", "wrongdb"],
        &["dump of set wrongdb failed", "database \"nope\" does not exist"],
    );
    expect_failure(c, &["dump", "--set", "down"], &["dump of set down failed", "127.0.0.1:1"]);
    assert_untouched(&repo, &untouched, "dumps that could not connect");

    let existing = env.path("existing.dump");
    std::fs::write(&existing, b"keep me")?;
    let existing_arg = existing.display().to_string();
    let target = into(&cluster, "postgres");
    for (args, phrases) in [
        (vec!["--to", "latest"], vec!["needs --into CONNINFO", "or --output FILE"]),
        (vec!["--to", "latest", "--output", &existing_arg], vec!["exists already"]),
        (
            vec!["--to", "2001-01-01 00:00:00+00", "--into", &target],
            vec!["no dump of set devdb started at or before 2001-01-01", "the oldest is"],
        ),
        (vec!["--to", "yesterday", "--into", &target], vec!["--to \"yesterday\""]),
    ] {
        let mut all = vec!["restore", "--source", "dump", "--set", "devdb"];
        all.extend(args);
        expect_failure(c, &all, &phrases);
    }
    expect_failure(
        c,
        &[
            "restore",
            "--source",
            "dump",
            "--set",
            "empty",
            "--to",
            "latest",
            "--output",
            &env.path("e.dump").display().to_string(),
        ],
        &["dump set empty has no dumps"],
    );
    let with_password = format!("{target} password=hunter2");
    let (_, message) = expect_failure(
        c,
        &["restore", "--source", "dump", "--set", "devdb", "--to", "latest", "--into", &with_password],
        &["carries a password"],
    );
    assert!(!message.contains("hunter2"), "{message}");
    // Both destinations: clap refuses the pair.
    let out = run_pitr(
        c,
        &["restore", "--source", "dump", "--set", "devdb", "--to", "latest", "--into", &target, "--output", "/tmp/y"],
    );
    assert!(!out.status.success() && stderr(&out).contains("cannot be used with"), "{}", stderr(&out));

    assert_eq!(std::fs::read(&existing)?, b"keep me");
    assert!(!env.path("e.dump").exists());
    assert_untouched(&repo, &untouched, "the refused restores");
    assert_eq!(sql(&cluster, "postgres", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")?, "0");
    Ok(())
}

#[test]
fn the_sidecar_dumps_a_set_on_its_schedule_and_exports_its_metrics() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    cluster.psql("CREATE DATABASE dev")?;
    sql(&cluster, "dev", "CREATE TABLE t AS SELECT generate_series(1, 1000) AS id")?;
    let port = free_port()?;
    // Every 3 s, read at +02:00 (any zone gives the same seconds; the zone is parsed and used).
    let dumps = format!(
        "[[dumps]]\nname = \"devdb\"\nconninfo = \"host=127.0.0.1 port={} user=postgres dbname=dev\"\n\
         schedule = \"*/3 * * * * *\"\ntime_zone = \"+02:00\"\n",
        cluster.port
    );
    let env = Env::with_metrics("dumps-sched", &dumps, &format!("127.0.0.1:{port}"))?;
    let log = env.path("stream.log");
    let mut cmd = Command::new(pitr_tests::pitr_bin());
    cmd.arg("--config").arg(&env.config).arg("stream");
    let mut stream = spawn_logged(cmd, &log)?;
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let count = || -> Result<usize> {
        let listed = env.json(&["list", "--json"]);
        Ok(listed["dumps"]["sets"][0]["dumps"].as_array().map_or(0, Vec::len))
    };
    wait_until("two scheduled dumps", std::time::Duration::from_secs(60), || Ok(count()? >= 2)).with_context(logs)?;
    let metrics = http_request(port, "GET", "/metrics", &[], b"")?.text();
    let success = metrics
        .lines()
        .find(|l| l.starts_with("backup_success{") && l.contains("source=\"dump\"") && l.contains("set=\"devdb\""));
    assert!(success.is_some_and(|l| l.ends_with(" 1")), "no backup_success of the dump set:\n{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("backup_size_bytes{") && l.contains("source=\"dump\"")), "{metrics}");
    stream.signal(libc::SIGTERM)?;
    let status = stream.wait_timeout(std::time::Duration::from_secs(60))?.context("pitr stream did not stop")?;
    assert!(status.success(), "pitr stream exited with {status}\n{}", logs());
    Ok(())
}

/// `pitr expire` runs every part whatever another's outcome: here the dumps' part fails (the
/// set's directory in the repository cannot be listed), the file sets' part still runs, and the
/// command fails naming the dumps.
#[test]
fn an_expire_whose_dumps_part_fails_still_expires_the_file_sets_and_says_which_part_failed() -> Result<()> {
    let docs = scratch_dir("dumps-expire-docs");
    std::fs::write(docs.path().join("a.txt"), b"a file of the set")?;
    let sets = format!(
        "[[dumps]]\nname = \"devdb\"\nconninfo = \"host=127.0.0.1 port=1 dbname=dev\"\n\
         [[files]]\nname = \"docs\"\npath = {:?}\n",
        docs.path().display().to_string()
    );
    let env = Env::new("dumps-expire", &sets)?;
    expect_success(&env.config, &["backup", "--source", "files", "--set", "docs"]);
    let dumps = env.path("repo").join("files").join("dumps");
    std::fs::create_dir_all(&dumps)?;
    std::fs::write(dumps.join("devdb"), b"not a directory")?;

    let out = run_pitr(&env.config, &["expire"]);
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!out.status.success(), "expire succeeded although its dumps part failed:\n{stdout}\n{err}");
    assert!(err.contains("failed in dumps") && err.contains("every other part was run"), "{err}");
    assert!(!err.contains("file sets:"), "{err}");
    assert!(stdout.contains("file set docs: keeping 1 backups"), "the file sets' part did not run:\n{stdout}\n{err}");
    Ok(())
}
