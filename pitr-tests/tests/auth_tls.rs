//! The replication client's connection handling against a real server: SCRAM-SHA-256 and md5
//! passwords, TLS by sslmode (including verify-full against our own CA), several hosts,
//! `channel_binding=require` (SCRAM-SHA-256-PLUS) and `require_auth`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use pitr_pgwire::{ConnInfo, ConnectOptions, Connection, PgError};
use pitr_tests::{chown_to_pg_user, scratch_dir, PgCluster, PgOptions};

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output()?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A self-signed CA certificate `<name>.crt` with subject `/CN=<cn>` and its key `<name>.key`.
fn self_signed_ca(dir: &Path, cn: &str, name: &str) -> Result<()> {
    let (subject, key, crt) = (format!("/CN={cn}"), format!("{name}.key"), format!("{name}.crt"));
    openssl(
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject, "-keyout", &key, "-out",
            &crt,
        ],
        dir,
    )
}

/// A CA and a server certificate for localhost / 127.0.0.1 signed by it, plus an unrelated CA.
fn make_certs(dir: &Path) -> Result<()> {
    self_signed_ca(dir, "pitr test CA", "ca")?;
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        dir,
    )?;
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n")?;
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
        dir,
    )?;
    self_signed_ca(dir, "other CA", "other")?;
    std::fs::set_permissions(dir.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    chown_to_pg_user(dir)?;
    Ok(())
}

async fn identify(conninfo: &str) -> Result<u64, PgError> {
    let info: ConnInfo = conninfo.parse().map_err(|e| PgError::Protocol(format!("{e}")))?;
    let opts = ConnectOptions { replication: true, application_name: "pitr_auth_test".into() };
    let mut conn = Connection::connect(&info, &opts).await?;
    let ident = conn.identify_system().await?;
    conn.close().await;
    Ok(ident.system_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_tls_and_hosts() -> Result<()> {
    let certs = scratch_dir("certs");
    make_certs(certs.path())?;
    let c = |f: &str| certs.path().join(f).display().to_string();
    let mut opts = PgOptions::new(15);
    opts.extra_conf.extend([
        "ssl = on".to_string(),
        format!("ssl_cert_file = '{}'", c("server.crt")),
        format!("ssl_key_file = '{}'", c("server.key")),
    ]);
    opts.hba = vec![
        "hostssl replication tlsuser 127.0.0.1/32 scram-sha-256".into(),
        "host replication tlsuser 127.0.0.1/32 reject".into(),
        "host replication scramuser 127.0.0.1/32 scram-sha-256".into(),
        "host replication md5user 127.0.0.1/32 md5".into(),
    ];
    let cluster = PgCluster::start(opts)?;
    cluster.psql(
        "set password_encryption = 'scram-sha-256';
         create role scramuser login replication password 'sc''ram pw';
         create role tlsuser login replication password 'tlspw';
         set password_encryption = 'md5';
         create role md5user login replication password 'md5pw';",
    )?;
    assert!(cluster.psql("select rolpassword like 'md5%' from pg_authid where rolname = 'md5user'")? == "t");
    let port = cluster.port;
    let base = format!("host=127.0.0.1 port={port} sslmode=disable");

    // Passwords. MD5 over plain TCP only when require_auth names it.
    identify(&format!("{base} user=scramuser password='sc\\'ram pw'")).await?;
    let err = identify(&format!("{base} user=md5user password=md5pw")).await.unwrap_err().to_string();
    assert!(err.contains("MD5") && err.contains("without TLS") && err.contains("require_auth=md5"), "{err}");
    assert!(!err.contains("md5pw"), "password leaked into the error: {err}");
    identify(&format!("{base} user=md5user password=md5pw require_auth=md5")).await?;
    identify(&format!("host=127.0.0.1 port={port} sslmode=require user=md5user password=md5pw")).await?;
    let err = identify(&format!("{base} user=scramuser password=wrong")).await.unwrap_err();
    assert!(matches!(err, PgError::Connect { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("authentication failed") && text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("wrong"), "password leaked into the error: {text}");
    let err = identify(&format!("{base} user=md5user require_auth=md5")).await.unwrap_err().to_string();
    assert!(err.contains("none is set") || err.contains("password"), "{err}");

    // TLS: the server rejects tlsuser without TLS; require, verify-ca and verify-full work.
    let err = identify(&format!("{base} user=tlsuser password=tlspw")).await.unwrap_err().to_string();
    assert!(err.contains("pg_hba.conf rejects"), "{err}");
    let tls = format!("port={port} user=tlsuser password=tlspw");
    identify(&format!("host=127.0.0.1 {tls} sslmode=require")).await?;
    identify(&format!("host=127.0.0.1 {tls} sslmode=prefer")).await?;
    identify(&format!("host=127.0.0.1 {tls} sslmode=verify-ca sslrootcert={}", c("ca.crt"))).await?;
    identify(&format!("host=localhost {tls} sslmode=verify-full sslrootcert={}", c("ca.crt"))).await?;
    identify(&format!("host=127.0.0.1 {tls} sslmode=verify-full sslrootcert={}", c("ca.crt"))).await?;
    let err = identify(&format!("host=127.0.0.1 {tls} sslmode=verify-full sslrootcert={}", c("other.crt")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");
    let err = identify(&format!("host=127.0.0.1 {tls} sslmode=verify-full")).await.unwrap_err().to_string();
    assert!(err.contains("sslrootcert"), "{err}");
    // With a root certificate, require verifies the chain as verify-ca does (libpq's rule).
    identify(&format!("host=127.0.0.1 {tls} sslmode=require sslrootcert={}", c("ca.crt"))).await?;
    let err = identify(&format!("host=127.0.0.1 {tls} sslmode=require sslrootcert={}", c("other.crt")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");
    let err = identify(&format!("host=127.0.0.1 {tls} sslmode=require sslrootcert={}", c("missing.crt")))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.crt"), "{err}");

    // Channel binding: SCRAM-SHA-256-PLUS over TLS, bound to the server's certificate.
    let verified = format!("host=localhost {tls} sslmode=verify-full sslrootcert={}", c("ca.crt"));
    identify(&format!("{verified} channel_binding=require")).await?;
    identify(&format!("{verified} channel_binding=require require_auth=scram-sha-256")).await?;
    identify(&format!("host=127.0.0.1 {tls} sslmode=require channel_binding=require")).await?;
    identify(&format!("host=127.0.0.1 {tls} sslmode=require channel_binding=disable")).await?;
    let md5_tls = format!("host=127.0.0.1 port={port} sslmode=require user=md5user password=md5pw");
    let err = identify(&format!("{md5_tls} channel_binding=require")).await.unwrap_err().to_string();
    assert!(err.contains("channel_binding=require") && err.contains("MD5"), "{err}");
    // A server that lets us in without authentication has proven nothing.
    let trust = format!("host=127.0.0.1 port={port} sslmode=require user=postgres");
    identify(&trust).await?;
    let err = identify(&format!("{trust} channel_binding=require")).await.unwrap_err().to_string();
    assert!(err.contains("channel_binding=require") && err.contains("without authentication"), "{err}");
    // Over a Unix socket there is no TLS to bind to (and this socket trusts everyone).
    let socket = format!("host={} port={port} user=scramuser password=x", cluster.socket_dir.display());
    identify(&socket).await?;
    let err = identify(&format!("{socket} channel_binding=require")).await.unwrap_err().to_string();
    assert!(err.contains("channel_binding=require"), "{err}");

    // require_auth, libpq 16's meaning.
    let err = identify(&format!("{md5_tls} require_auth=scram-sha-256")).await.unwrap_err().to_string();
    assert!(err.contains("require_auth=scram-sha-256") && err.contains("MD5"), "{err}");
    let err = identify(&format!("{md5_tls} require_auth=!md5")).await.unwrap_err().to_string();
    assert!(err.contains("require_auth=!md5"), "{err}");
    identify(&format!("{md5_tls} require_auth=!password,!scram-sha-256")).await?;
    let err = identify(&format!("{trust} require_auth=!none")).await.unwrap_err().to_string();
    assert!(err.contains("require_auth=!none") && err.contains("without authentication"), "{err}");
    identify(&format!("{trust} require_auth=scram-sha-256,none")).await?;
    let err = identify(&format!("{base} user=scramuser password=x require_auth=md5")).await.unwrap_err().to_string();
    assert!(err.contains("require_auth=md5") && err.contains("SASL"), "{err}");

    // Several hosts: a dead one first, then the live one.
    let dead = pitr_tests::free_port()?;
    identify(&format!(
        "host=127.0.0.1,127.0.0.1 port={dead},{port} user=scramuser password='sc\\'ram pw' sslmode=disable"
    ))
    .await?;
    let err = identify(&format!("host=127.0.0.1 port={dead} user=x")).await.unwrap_err().to_string();
    assert!(err.contains(&format!("127.0.0.1:{dead}")) && err.contains("refused"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn prefer_falls_back_to_plain_and_slots_are_idempotent() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(17))?;
    let info: ConnInfo = format!("host=127.0.0.1 port={} user=postgres sslmode=prefer", cluster.port).parse()?;
    let opts = ConnectOptions { replication: true, application_name: "pitr_slot_test".into() };
    let mut conn = Connection::connect(&info, &opts).await?;
    assert!(conn.create_physical_slot("pitr_x").await?.is_some());
    assert!(conn.create_physical_slot("pitr_x").await?.is_none());
    let slot = conn.read_replication_slot("pitr_x").await?;
    assert!(matches!(slot, Some((ref kind, Some(_))) if kind == "physical"), "{slot:?}");
    assert_eq!(conn.read_replication_slot("nope").await?, None);
    assert!(matches!(conn.create_physical_slot("Bad-Name").await, Err(PgError::InvalidSlotName(_))));
    let err = conn.start_replication("missing_slot", 0, 1).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    conn.close().await;
    Ok(())
}
