//! `pitr restore --to TIME --table SCHEMA.NAME --into CONNINFO [--as SCHEMA.NEW]` end to end on
//! PostgreSQL 15: a table changed after a moment comes back as it was then, under a new name, in
//! the same running server; the original is untouched and no scratch server or directory is
//! left. Bad input fails with one clear message and writes nothing to the target.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use pitr_tests::checks::failure_of;
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{PgCluster, PgOptions};

/// A role that logs in with a password (scram), so that the restore must hand it to pg_restore.
const ROLE: &str = "restorer";
const PASSWORD: &str = "s3cret-'pw";

/// `psql -c sql` as postgres in database `db` of `cluster`; the trimmed output.
fn psql_in(cluster: &PgCluster, db: &str, sql: &str) -> Result<String> {
    let out = std::process::Command::new(pitr_tests::client_bin("psql"))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &cluster.port.to_string()])
        .args(["-U", "postgres", "-d", db, "-c", sql])
        .output()?;
    anyhow::ensure!(out.status.success(), "psql in {db}: {sql}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Every row of `table`, in id order, as one hash.
fn fingerprint(cluster: &PgCluster, table: &str) -> Result<String> {
    cluster.psql(&format!("select count(*) || ':' || md5(string_agg(t::text, '|' order by t.id)) from {table} t"))
}

/// `name:type` of every column of `table`, in order.
fn columns(cluster: &PgCluster, table: &str) -> Result<String> {
    cluster.psql(&format!(
        "select string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' order by attnum) \
         from pg_attribute where attrelid = '{table}'::regclass and attnum > 0 and not attisdropped"
    ))
}

/// Every relation (tables, indexes, sequences) of every user schema of the target database.
fn relations(cluster: &PgCluster) -> Result<String> {
    cluster.psql(
        "select string_agg(n.nspname || '.' || c.relname, ',' order by 1) from pg_class c \
         join pg_namespace n on n.oid = c.relnamespace where n.nspname not in ('pg_catalog', 'information_schema') \
         and n.nspname not like 'pg_toast%'",
    )
}

/// Neither a scratch directory under `root` nor a server process running from one.
fn assert_no_scratch_left(root: &Path) -> Result<()> {
    let left: Vec<String> =
        std::fs::read_dir(root)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(left.is_empty(), "scratch left in {}: {left:?}", root.display());
    let needle = root.display().to_string();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(&needle), "a process still runs from the scratch root: {cmdline}");
    }
    Ok(())
}

#[test]
fn pg15_table_restored_to_a_moment_beside_the_original() -> Result<()> {
    let mut opts = PgOptions::new(15);
    opts.hba = vec![format!("host all {ROLE} 127.0.0.1/32 scram-sha-256")];
    let cluster = PgCluster::start(opts)?;
    let mut env = PitrEnv::new("table", &cluster, "")?;
    env.init()?;
    // The scratch root (pitr's $TMPDIR) is the test's own, so that what is left there shows.
    let scratch_root = env.dir.path().join("scratch");
    std::fs::create_dir(&scratch_root)?;
    env.set_child_env("TMPDIR", &scratch_root.display().to_string());
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    cluster.psql(&format!(
        "create role {ROLE} login password '{}'; grant create on schema public to {ROLE}",
        PASSWORD.replace('\'', "''")
    ))?;
    cluster.psql(
        "create table orders(id serial primary key, customer text not null, amount numeric(10,2) check (amount >= 0), \
         placed timestamptz not null default '2026-01-01 00:00:00+00')",
    )?;
    cluster.psql("create index orders_by_customer on orders(customer)")?;
    cluster.psql("create unlogged table scratchpad(id int); insert into scratchpad values (1)")?;
    cluster.psql("create view big_orders as select * from orders where amount > 100")?;
    // A type takes the name a table's row type would need.
    cluster.psql("create type orders_kind as enum ('web', 'shop')")?;
    cluster
        .psql("insert into orders(customer, amount) select 'c' || (g % 97), g * 1.5 from generate_series(1, 3000) g")?;
    env.run_ok(&["backup"])?;
    // Changes between the backup and the moment: the restore replays WAL to reach them.
    cluster.psql("update orders set amount = amount + 1 where id % 10 = 0")?;
    cluster.psql("delete from orders where id % 33 = 0")?;
    cluster.psql("insert into orders(customer, amount) select 'late' || g, g from generate_series(1, 200) g")?;
    let moment = cluster.psql("select now()")?;
    let at_moment = fingerprint(&cluster, "public.orders")?;
    let columns_at_moment = columns(&cluster, "public.orders")?;
    let sequence_at_moment = cluster.psql("select last_value from orders_id_seq")?;
    std::thread::sleep(Duration::from_millis(1100));
    // After the moment: updates, deletes, a column added, more rows, a new table.
    cluster.psql("update orders set customer = upper(customer) where id % 7 = 0")?;
    cluster.psql("delete from orders where id % 5 = 0")?;
    cluster.psql("alter table orders add column note text default 'added later'")?;
    cluster.psql("insert into orders(customer, amount) select 'new' || g, g from generate_series(1, 500) g")?;
    cluster.psql("create table born_after(id int primary key)")?;
    let now = fingerprint(&cluster, "public.orders")?;
    let sequence_now = cluster.psql("select last_value from orders_id_seq")?;
    assert_ne!(now, at_moment);
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "the changes after the moment archived")?;
    // What pitr stream and backup (run as root here) created since: the restores, run as the
    // server user, put their running markers there.
    env.share_with_pg_user()?;

    let into = format!(
        "host=127.0.0.1 port={} user={ROLE} password='{}' dbname=postgres",
        cluster.port,
        PASSWORD.replace('\'', "\\'")
    );
    let (ok, report) = env.run_json_as_pg_user(&[
        "restore",
        "--to",
        &moment,
        "--table",
        "public.orders",
        "--into",
        &into,
        "--as",
        "public.orders_at_t",
        "--json",
    ])?;
    assert!(ok, "{report:#}");
    assert_eq!(report["new_table"]["name"], "orders_at_t", "{report:#}");
    assert_eq!(report["database"], "postgres", "{report:#}");
    let rows_at_moment: u64 = at_moment.split(':').next().context("count")?.parse()?;
    assert_eq!(report["rows"].as_u64(), Some(rows_at_moment), "{report:#}");
    assert_eq!(report["columns"].as_array().map(Vec::len), Some(4), "{report:#}");
    assert!(!report["into"].to_string().contains("s3cret"), "the password is in the report: {report:#}");
    // Exactly the rows and columns of the moment; the original as it is now.
    assert_eq!(fingerprint(&cluster, "public.orders_at_t")?, at_moment);
    assert_eq!(columns(&cluster, "public.orders_at_t")?, columns_at_moment);
    assert_eq!(fingerprint(&cluster, "public.orders")?, now);
    assert_eq!(cluster.psql("select last_value from orders_id_seq")?, sequence_now);
    // Its own sequence (at the moment's value), index, key and check constraint.
    let default = cluster.psql(
        "select pg_get_expr(adbin, adrelid) from pg_attrdef where adrelid = 'public.orders_at_t'::regclass and adnum = 1",
    )?;
    assert_eq!(default, "nextval('orders_at_t_id_seq'::regclass)");
    // A sequence is WAL-logged up to 32 values ahead, so after recovery it may stand a little
    // past the moment's value (as after a crash), never behind it.
    let copied_sequence: i64 = cluster.psql("select last_value from orders_at_t_id_seq")?.parse()?;
    let moment_sequence: i64 = sequence_at_moment.parse()?;
    assert!(
        (moment_sequence..=moment_sequence + 32).contains(&copied_sequence),
        "{copied_sequence} vs {moment_sequence}"
    );
    assert_eq!(
        cluster.psql("select string_agg(indexrelid::regclass::text, ',' order by indexrelid::regclass::text) from pg_index where indrelid = 'public.orders_at_t'::regclass")?,
        "orders_at_t_by_customer,orders_at_t_pkey"
    );
    assert!(cluster.psql("insert into orders_at_t(customer, amount) values ('x', -1)").is_err());
    assert_eq!(cluster.psql("select tableowner from pg_tables where tablename = 'orders_at_t'")?, ROLE);
    assert_no_scratch_left(&scratch_root)?;

    // Without --as: `<name>_at_<YYYYMMDDHHMMSS>` in the same schema, found in the named database;
    // the report for people.
    let out =
        env.run_as_pg_user(&["restore", "--to", &moment, "--table", "postgres.public.orders", "--into", &into])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let default_name =
        cluster.psql("select relname from pg_class where relname like 'orders\\_at\\_2%' and relkind = 'r'")?;
    for line in [
        "restored table public.orders (database postgres, OID ".to_string(),
        format!("created:              public.{default_name} in host=127.0.0.1"),
        format!("rows:                 {rows_at_moment}"),
        "columns (4):          id, customer, amount, placed".to_string(),
        "left out:             nothing".to_string(),
    ] {
        assert!(text.contains(&line), "{line:?} not in:\n{text}");
    }
    assert!(!text.contains("s3cret"), "{text}");
    let utc =
        cluster.psql(&format!("select to_char('{moment}'::timestamptz at time zone 'UTC', 'YYYYMMDDHH24MISS')"))?;
    assert_eq!(default_name, format!("orders_at_{utc}"));
    assert_eq!(fingerprint(&cluster, &format!("public.{default_name}"))?, at_moment);
    assert_no_scratch_left(&scratch_root)?;

    // Bad input: one clear error each, the target's relations unchanged, no scratch left.
    let before = relations(&cluster)?;
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--to", &moment, "--table", "public.born_after", "--as", "public.b"],
            vec!["table public.born_after did not exist at", "nothing was restored"],
        ),
        (vec!["--to", &moment, "--table", "public.no_such_table"], vec!["table public.no_such_table did not exist at"]),
        (
            vec!["--to", &moment, "--table", "public.\"Orders\""],
            vec!["table public.\"Orders\" did not exist at", "tables of a similar name then: postgres.public.orders"],
        ),
        (
            vec!["--to", &moment, "--table", "public.orders", "--as", "public.orders"],
            vec!["target table public.orders already exists", "--as"],
        ),
        (vec!["--to", &moment, "--table", "public.scratchpad"], vec!["public.scratchpad was an unlogged table at"]),
        (
            vec!["--to", &moment, "--table", "public.big_orders"],
            vec!["public.big_orders was a view at", "not an ordinary table"],
        ),
        (vec!["--to", &moment, "--table", "orders"], vec!["invalid table name \"orders\"", "the schema is missing"]),
        (vec!["--to", &moment, "--table", "public.or ders"], vec!["invalid table name \"public.or ders\""]),
        (
            vec!["--to", &moment, "--table", "public.orders", "--as", "public.orders_kind"],
            vec!["a type named orders_kind exists in schema public", "--as"],
        ),
        (
            vec!["--to", &moment, "--table", "public.orders", "--as", "nowhere.orders"],
            vec!["schema nowhere does not exist"],
        ),
        (
            vec!["--to", "2000-01-01 00:00:00+00", "--table", "public.orders", "--as", "public.old"],
            vec!["cannot restore", "before the oldest backup"],
        ),
    ];
    for (args, phrases) in cases {
        let mut full = vec!["restore"];
        full.extend(args.iter().copied());
        full.extend(["--into", &into]);
        let out = env.run_as_pg_user(&full)?;
        let (_, message) = failure_of(&format!("pitr {}", args.join(" ")), &out, &phrases);
        eprintln!("{message}");
        assert!(!message.contains("s3cret"), "the password is in the message: {message}");
        assert_eq!(relations(&cluster)?, before, "pitr {args:?} changed the target");
        assert_no_scratch_left(&scratch_root)?;
    }
    Ok(())
}

/// A table with what reaches beyond it (a foreign key, a trigger, row level security with a
/// policy, a default from a sequence it does not own) and an identity column, in a schema and
/// under a name that need quoting, copied into another database and schema: what would reach
/// beyond the copy is left out and reported, the rest comes along.
#[test]
fn pg15_table_with_links_copied_into_another_database_and_schema() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("table-links", &cluster, "")?;
    env.init()?;
    let scratch_root = env.dir.path().join("scratch");
    std::fs::create_dir(&scratch_root)?;
    env.set_child_env("TMPDIR", &scratch_root.display().to_string());
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    cluster.psql("create schema \"Shop\"")?;
    cluster.psql("create table \"Shop\".customers(id int primary key)")?;
    cluster.psql("insert into \"Shop\".customers select generate_series(1, 10)")?;
    cluster.psql("create sequence \"Shop\".shared_numbers")?;
    cluster.psql(
        "create table \"Shop\".\"Line Items\"(id int generated always as identity primary key, \
         customer int references \"Shop\".customers(id), qty int check (qty > 0), \
         ticket bigint default nextval('\"Shop\".shared_numbers'))",
    )?;
    cluster.psql(
        "create function \"Shop\".touch() returns trigger language plpgsql as $$begin return new; end$$; \
         create trigger touch before insert on \"Shop\".\"Line Items\" for each row execute function \"Shop\".touch(); \
         alter table \"Shop\".\"Line Items\" enable row level security; \
         create policy mine on \"Shop\".\"Line Items\" using (customer = 1)",
    )?;
    cluster.psql(
        "insert into \"Shop\".\"Line Items\"(customer, qty) select 1 + g % 10, g from generate_series(1, 1000) g",
    )?;
    cluster.psql("create database twin")?;
    cluster.psql("create table public.t(id int)")?;
    psql_in(&cluster, "twin", "create table public.t(id int)")?;
    env.run_ok(&["backup"])?;
    let moment = cluster.psql("select now()")?;
    let at_moment = fingerprint(&cluster, "\"Shop\".\"Line Items\"")?;
    std::thread::sleep(Duration::from_millis(1100));
    cluster.psql("delete from \"Shop\".\"Line Items\" where id > 500")?;
    cluster.psql("create database other")?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "the changes after the moment archived")?;
    // What pitr stream and backup (run as root here) created since: the restores, run as the
    // server user, put their running markers there.
    env.share_with_pg_user()?;
    let other = psql_in(&cluster, "other", "create schema archive")?;
    assert_eq!(other, "");

    let into = format!("host=127.0.0.1 port={} user=postgres dbname=other", cluster.port);
    let (ok, report) = env.run_json_as_pg_user(&[
        "restore",
        "--to",
        &moment,
        "--table",
        "\"Shop\".\"Line Items\"",
        "--into",
        &into,
        "--as",
        "archive.items",
        "--json",
    ])?;
    assert!(ok, "{report:#}");
    let left: Vec<String> = report["left_out"]
        .as_array()
        .context("left_out")?
        .iter()
        .map(|l| format!("{} {}", l["kind"].as_str().unwrap_or(""), l["name"].as_str().unwrap_or("")))
        .collect();
    for expected in
        ["foreign key Line Items_customer_fkey", "trigger touch", "policy mine", "row level security", "default ticket"]
    {
        assert!(left.iter().any(|l| l.starts_with(expected)), "{expected:?} not reported as left out: {left:?}");
    }
    assert_eq!(report["rows"].as_u64(), Some(1000), "{report:#}");
    let in_other = |sql: &str| psql_in(&cluster, "other", sql);
    assert_eq!(
        in_other("select count(*) || ':' || md5(string_agg(t::text, '|' order by t.id)) from archive.items t")?,
        at_moment
    );
    assert_eq!(
        in_other("select count(*) from pg_constraint where conrelid = 'archive.items'::regclass and contype = 'f'")?,
        "0"
    );
    assert_eq!(in_other("select count(*) from pg_trigger where tgrelid = 'archive.items'::regclass")?, "0");
    // Row level security stays on without its policies: the owner (the restoring user) reads
    // every row, a role granted SELECT none.
    assert_eq!(
        in_other("select relrowsecurity::text || ',' || relforcerowsecurity::text from pg_class where oid = 'archive.items'::regclass")?,
        "true,false"
    );
    in_other("create role reader; grant usage on schema archive to reader; grant select on archive.items to reader")?;
    assert_eq!(in_other("set role reader; select count(*) from archive.items")?, "0");
    assert_eq!(
        in_other("select pg_get_serial_sequence('archive.items', 'id')")?,
        "archive.items_id_seq",
        "the identity's sequence moved and was renamed with the table"
    );
    assert_eq!(in_other("select count(*) from pg_attrdef where adrelid = 'archive.items'::regclass")?, "0");
    // The source database is untouched.
    assert_eq!(cluster.psql("select count(*) from \"Shop\".\"Line Items\"")?, "500");
    assert_no_scratch_left(&scratch_root)?;

    // The same name in two databases: the error names both and how to choose.
    let out =
        env.run_as_pg_user(&["restore", "--to", &moment, "--table", "public.t", "--into", &into, "--as", "archive.t"])?;
    failure_of(
        "a table in two databases",
        &out,
        &["public.t existed in several databases at", "(postgres, twin)", "DATABASE.public.t"],
    );
    assert_no_scratch_left(&scratch_root)?;

    // SIGTERM while the scratch server runs: it is stopped, its directory removed, nothing created.
    let before =
        psql_in(&cluster, "other", "select count(*) from pg_class where relnamespace = 'archive'::regnamespace")?;
    let mut cmd = env.command(&[
        "restore",
        "--to",
        &moment,
        "--table",
        "\"Shop\".\"Line Items\"",
        "--into",
        &into,
        "--as",
        "archive.again",
    ]);
    pitr_tests::as_pg_user(&mut cmd);
    if let Some(u) = pitr_tests::pg_user() {
        cmd.env("USER", &u.name).env("HOME", env.dir.path());
    }
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = pitr_tests::Child(cmd.spawn()?);
    pitr_tests::wait_until("a scratch server running", Duration::from_secs(60), || {
        Ok(std::fs::read_dir(&scratch_root)?.flatten().any(|e| e.path().join("data/postmaster.pid").exists()))
    })?;
    child.signal(libc::SIGTERM)?;
    let status = child.wait_timeout(Duration::from_secs(60))?.context("pitr did not stop on SIGTERM")?;
    let mut stderr = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    assert!(!status.success() && stderr.contains("stopped by SIGTERM"), "{status}: {stderr}");
    assert_no_scratch_left(&scratch_root)?;
    assert_eq!(
        psql_in(&cluster, "other", "select count(*) from pg_class where relnamespace = 'archive'::regnamespace")?,
        before
    );
    Ok(())
}

/// A scratch server is cut off from the world: a subscription enabled at the moment starts no
/// apply worker (nobody connects to its publisher), a two-phase transaction prepared at the moment
/// is rolled back instead of holding its locks, and a partition comes out of its partitioned
/// table with what it inherited. Target publications that would publish the new table, a role
/// the restored cluster lacks or that is no superuser there, and a table dropped and created
/// again since are refused or pointed out.
#[test]
fn pg15_scratch_server_reaches_nowhere_and_target_guards() -> Result<()> {
    let mut opts = PgOptions::new(15);
    opts.extra_conf = vec!["max_prepared_transactions = 5".into()];
    let cluster = PgCluster::start(opts)?;
    let mut env = PitrEnv::new("table-guards", &cluster, "")?;
    env.init()?;
    let scratch_root = env.dir.path().join("scratch");
    std::fs::create_dir(&scratch_root)?;
    env.set_child_env("TMPDIR", &scratch_root.display().to_string());
    env.share_with_pg_user()?;
    let _stream = env.spawn_stream()?;
    // The "publisher": a port nobody listens on until the restore runs.
    let publisher_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    cluster.psql("create table items(id int primary key, what text)")?;
    cluster.psql("insert into items select g, 'item ' || g from generate_series(1, 100) g")?;
    cluster.psql(&format!(
        "create subscription feed connection 'host=127.0.0.1 port={publisher_port} dbname=postgres user=postgres connect_timeout=2' \
         publication anything with (connect = false)"
    ))?;
    cluster.psql("alter subscription feed enable")?;
    cluster.psql(
        "create table events(id int, region text, customer int, primary key (id, region)) partition by list (region); \
         create table events_eu partition of events for values in ('eu'); \
         create table events_us partition of events for values in ('us'); \
         alter table events add foreign key (customer) references items(id); \
         create function stamp() returns trigger language plpgsql as $$begin return new; end$$; \
         create trigger stamp before insert on events for each row execute function stamp(); \
         create table event_notes(event int, region text, foreign key (event, region) references events(id, region))",
    )?;
    cluster.psql("insert into events select g, case when g % 2 = 0 then 'eu' else 'us' end, 1 + g % 100 from generate_series(1, 300) g")?;
    cluster.psql("insert into event_notes select id, region from events where id % 10 = 0")?;
    cluster.psql("create table again(id int); insert into again values (1)")?;
    cluster.psql("create role plain login")?;
    env.run_ok(&["backup"])?;
    // Prepared, not committed, at the moment: its row is not part of the table then.
    cluster.psql("begin; insert into items values (1000, 'prepared'); prepare transaction 'half-done'")?;
    let moment = cluster.psql("select now()")?;
    std::thread::sleep(Duration::from_millis(1100));
    cluster.psql("commit prepared 'half-done'")?;
    cluster.psql("alter subscription feed disable")?;
    cluster.psql("drop table again; create table again(id int)")?;
    cluster.psql("select pg_switch_wal()")?;
    env.wait_archived(cluster.current_lsn()?, "the changes after the moment archived")?;
    env.share_with_pg_user()?;
    // The source's own apply worker has stopped retrying by now (disabled); from here on,
    // a connection to the publisher's port comes from a scratch server.
    std::thread::sleep(Duration::from_secs(6));
    let listener = std::net::TcpListener::bind(("127.0.0.1", publisher_port))?;
    listener.set_nonblocking(true)?;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (accepted, stop) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if listener.accept().is_ok() {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let into = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", cluster.port);
    let (ok, report) = env.run_json_as_pg_user(&[
        "restore",
        "--to",
        &moment,
        "--table",
        "public.items",
        "--into",
        &into,
        "--as",
        "items_then",
        "--json",
    ])?;
    assert!(ok, "{report:#}");
    assert_eq!(report["rows"].as_u64(), Some(100), "{report:#}");
    assert_eq!(cluster.psql("select count(*) from items_then where id = 1000")?, "0");
    assert!(
        report["left_out"]
            .as_array()
            .context("left_out")?
            .iter()
            .any(|l| l["kind"] == "prepared transaction" && l["name"] == "half-done"),
        "{report:#}"
    );
    // The partition, detached with what it inherited (a foreign key, a trigger) left out.
    let (ok, report) = env.run_json_as_pg_user(&[
        "restore",
        "--to",
        &moment,
        "--table",
        "public.events_eu",
        "--into",
        &into,
        "--as",
        "eu_then",
        "--json",
    ])?;
    assert!(ok, "{report:#}");
    assert_eq!(report["rows"].as_u64(), Some(150), "{report:#}");
    let left: Vec<String> = report["left_out"]
        .as_array()
        .context("left_out")?
        .iter()
        .map(|l| format!("{} {}", l["kind"].as_str().unwrap_or(""), l["name"].as_str().unwrap_or("")))
        .collect();
    for expected in ["partition of public.events", "foreign key", "trigger stamp"] {
        assert!(left.iter().any(|l| l.starts_with(expected)), "{expected:?} not reported as left out: {left:?}");
    }
    assert_eq!(cluster.psql("select relispartition::text from pg_class where oid = 'eu_then'::regclass")?, "false");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    watcher.join().map_err(|_| anyhow::anyhow!("the listener thread panicked"))?;
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a scratch server connected to the subscription's publisher"
    );
    assert_no_scratch_left(&scratch_root)?;

    // Restored into the database it came from, where the table of that name is another now.
    let out = env.run_as_pg_user(&["restore", "--to", &moment, "--table", "public.again", "--into", &into])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("WARNING:") && text.contains("public.again in") && text.contains("is a different table now"),
        "{text}"
    );

    // Publications that would publish the new table; roles the scratch cluster cannot use.
    cluster.psql("create database pubdb")?;
    psql_in(&cluster, "pubdb", "create publication everything for all tables")?;
    cluster.psql("create schema pubbed; create publication by_schema for tables in schema pubbed")?;
    let before = relations(&cluster)?;
    let pubdb = format!("host=127.0.0.1 port={} user=postgres dbname=pubdb", cluster.port);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--table", "public.items", "--into", &pubdb],
            vec!["publication everything", "FOR ALL TABLES", "restore into another schema or database"],
        ),
        (
            vec!["--table", "public.items", "--into", &into, "--as", "pubbed.items"],
            vec!["publication by_schema", "every table of schema pubbed", "restore into another schema or database"],
        ),
        (
            vec!["--table", "public.items", "--into", &into, "--as", "nobody", "--db-user", "no_such_role"],
            vec!["refused role \"no_such_role\"", "--db-user"],
        ),
        (
            vec!["--table", "public.items", "--into", &into, "--as", "plainly", "--db-user", "plain"],
            vec!["role plain was not a superuser", "--db-user"],
        ),
    ];
    for (args, phrases) in cases {
        let mut full = vec!["restore", "--to", &moment];
        full.extend(args.iter().copied());
        let started = std::time::Instant::now();
        let out = env.run_as_pg_user(&full)?;
        let (_, message) = failure_of(&format!("pitr {}", args.join(" ")), &out, &phrases);
        eprintln!("{message}");
        assert!(started.elapsed() < Duration::from_secs(120), "pitr {args:?} took {:?}", started.elapsed());
        assert_eq!(relations(&cluster)?, before, "pitr {args:?} changed the target");
        assert_no_scratch_left(&scratch_root)?;
    }
    Ok(())
}
