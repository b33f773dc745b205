//! pitr against a hostile "PostgreSQL server": a plain TCP listener written here that speaks just
//! enough of the protocol to misbehave. `pitr backup` is pointed at it; each misbehaviour must end
//! in one clear error and a non-zero exit, with pitr's peak memory (its own `ru_maxrss`, from
//! `wait4`) far below what the server announced, and nothing sent that should not be.
//!
//! - a length field of nearly 4 GiB before authentication, and after it (in a DataRow);
//! - a DataRow above a configured `[postgres] max_message_size`;
//! - a request for the password in cleartext over plain TCP (refused unless `require_auth`
//!   names `password`);
//! - SCRAM that skips AuthenticationSASLFinal (the server's proof) and says AuthenticationOk;
//! - small ParameterStatus messages without end.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pitr_tests::checks::{expect_success, failure_of};
use pitr_tests::{pitr_bin, scratch_dir};

/// What the fake server does after the startup packet.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// An Authentication message announcing 4 GiB - 16 bytes, followed by as much as pitr reads.
    HugeBeforeAuth,
    /// Trust authentication, then a DataRow announcing `len` bytes in answer to the first query,
    /// followed by its bytes for as long as pitr reads them.
    HugeAfterAuth { len: u32 },
    /// AuthenticationCleartextPassword; a password that arrives is accepted, and the first query
    /// after it gets an ErrorResponse naming this server.
    Cleartext,
    /// SCRAM-SHA-256 up to the client's proof, then AuthenticationOk without SASLFinal.
    ScramWithoutFinal,
    /// Trust authentication, then ParameterStatus messages, each small, without end.
    EndlessParameters,
}

/// Announced length of the oversized messages: what `u32` allows, less a little.
const HUGE: u32 = 0xffff_fff0;

/// What the fake server saw, for the assertions.
#[derive(Default, Debug)]
struct Seen {
    /// Password messages (`p`) received, as text.
    passwords: Vec<String>,
    /// Queries received after the server said AuthenticationOk.
    queries: Vec<String>,
    /// Bytes of oversized message body the server managed to write.
    streamed: u64,
}

struct FakeServer {
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

fn read_exact(s: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// One frontend message: (type, body).
fn read_message(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let head = read_exact(s, 5)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=1 << 20).contains(&len) {
        return Err(std::io::Error::other(format!("client message length {len}")));
    }
    Ok((head[0], read_exact(s, len - 4)?))
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn auth(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(rest);
    message(b'R', &body)
}

fn ready() -> Vec<u8> {
    let mut m = auth(0, b"");
    m.extend(message(b'S', b"server_version\x0015.0\0"));
    m.extend(message(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
    m.extend(message(b'Z', b"I"));
    m
}

/// Writes a message header announcing `len` bytes, then zeros until the peer stops reading or
/// 1 GiB went out; returns the body bytes written.
fn stream_huge(s: &mut TcpStream, tag: u8, len: u32) -> u64 {
    let mut head = vec![tag];
    head.extend_from_slice(&len.to_be_bytes());
    if s.write_all(&head).is_err() {
        return 0;
    }
    let chunk = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < u64::from(len - 4).min(1 << 30) {
        match s.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n as u64,
        }
    }
    sent
}

fn serve(mut s: TcpStream, how: Misbehaviour, seen: &Mutex<Seen>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    // The startup packet, after refusing TLS (sslmode=prefer asks first).
    loop {
        let len = u32::from_be_bytes(read_exact(&mut s, 4)?.try_into().unwrap_or_default()) as usize;
        if !(8..=10_000).contains(&len) {
            return Err(std::io::Error::other(format!("startup packet length {len}")));
        }
        let body = read_exact(&mut s, len - 4)?;
        match u32::from_be_bytes([body[0], body[1], body[2], body[3]]) {
            80877103 | 80877104 => s.write_all(b"N")?,
            _ => break,
        }
    }
    let lock = || seen.lock().unwrap_or_else(|e| e.into_inner());
    match how {
        Misbehaviour::HugeBeforeAuth => {
            let n = stream_huge(&mut s, b'R', HUGE);
            lock().streamed = n;
        }
        Misbehaviour::HugeAfterAuth { len } => {
            s.write_all(&ready())?;
            let (tag, body) = read_message(&mut s)?;
            if tag == b'Q' {
                lock().queries.push(String::from_utf8_lossy(&body).into_owned());
            }
            let n = stream_huge(&mut s, b'D', len);
            lock().streamed = n;
        }
        Misbehaviour::Cleartext => {
            s.write_all(&auth(3, b""))?;
            let (tag, body) = read_message(&mut s)?;
            if tag != b'p' {
                return Ok(());
            }
            lock().passwords.push(String::from_utf8_lossy(&body).trim_end_matches('\0').to_string());
            s.write_all(&ready())?;
            let (tag, body) = read_message(&mut s)?;
            if tag == b'Q' {
                lock().queries.push(String::from_utf8_lossy(&body).into_owned());
                let error = b"SFATAL\0VFATAL\0C0A000\0Mthis fake server ends here\0\0";
                s.write_all(&message(b'E', error))?;
                s.write_all(&message(b'Z', b"I"))?;
            }
        }
        Misbehaviour::EndlessParameters => {
            s.write_all(&auth(0, b""))?;
            let mut sent = 0u64;
            for i in 0u64..50_000_000 {
                let m = message(b'S', format!("p{i}\0{}\0", "v".repeat(1000)).as_bytes());
                if s.write_all(&m).is_err() {
                    break;
                }
                sent += m.len() as u64;
            }
            lock().streamed = sent;
        }
        Misbehaviour::ScramWithoutFinal => {
            s.write_all(&auth(10, b"SCRAM-SHA-256\0\0"))?;
            let (_, first) = read_message(&mut s)?;
            let text = String::from_utf8_lossy(&first).into_owned();
            let nonce: String = text
                .split("r=")
                .nth(1)
                .map(|r| r.chars().take_while(|c| *c != ',' && *c != '\0').collect())
                .unwrap_or_default();
            s.write_all(&auth(11, format!("r={nonce}fakeserver,s=c2FsdHNhbHQ=,i=4096").as_bytes()))?;
            let (tag, body) = read_message(&mut s)?;
            if tag == b'p' {
                lock().passwords.push(String::from_utf8_lossy(&body).into_owned());
            }
            // No AuthenticationSASLFinal: straight to "you are in".
            s.write_all(&ready())?;
            if let Ok((b'Q', body)) = read_message(&mut s) {
                lock().queries.push(String::from_utf8_lossy(&body).into_owned());
            }
        }
    }
    Ok(())
}

impl FakeServer {
    fn start(how: Misbehaviour) -> Result<FakeServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        // The listener lives as long as the test process; each connection gets a thread.
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let seen = shared.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(conn, how, &seen) {
                        eprintln!("fake server ({how:?}): {e}");
                    }
                });
            }
        });
        Ok(FakeServer { port, seen })
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A repository, key and config whose `[postgres]` points at `port` with `conninfo_extra`.
struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
}

fn setup(name: &str, port: u16, conninfo_extra: &str, postgres_extra: &str) -> Result<Setup> {
    let dir = scratch_dir(name);
    let config = dir.path().join("pitr.toml");
    let text = format!(
        "[repository]\npath = {:?}\n[encryption]\nkey_file = {:?}\n[postgres]\n\
         conninfo = \"host=127.0.0.1 port={port} user=rep connect_timeout=30 {conninfo_extra}\"\n{postgres_extra}\n\
         [backup]\nwal_timeout = \"1s\"\n",
        dir.path().join("repo").display().to_string(),
        dir.path().join("key").display().to_string(),
    );
    std::fs::write(&config, text)?;
    expect_success(&config, &["init"]);
    Ok(Setup { _dir: dir, config })
}

/// Runs `pitr --config <config> <args>` and reaps it with `wait4`, which gives its own peak
/// resident set size (KiB on Linux); killed after two minutes.
fn run_measured(config: &Path, args: &[&str]) -> Result<(Output, u64)> {
    let mut child = Command::new(pitr_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning pitr")?;
    let pid = child.id() as libc::pid_t;
    // Drain the pipes beside the wait, so that a chatty child cannot block on them.
    let mut out_pipe = child.stdout.take().context("stdout")?;
    let mut err_pipe = child.stderr.take().context("stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our own child, not yet reaped; status and usage are valid pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r < 0 {
            bail!("wait4: {}", std::io::Error::last_os_error());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("pitr {args:?} did not finish within two minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let out = Output { status: std::process::ExitStatus::from_raw(status), stdout, stderr };
    Ok((out, usage.ru_maxrss as u64))
}

/// What pitr may use at most while refusing: far below the 4 GiB announced.
const MAX_RSS_KIB: u64 = 200 << 10;

fn refused(setup: &Setup, what: &str, phrases: &[&str]) -> Result<(String, u64)> {
    let (out, rss_kib) = run_measured(&setup.config, &["backup"])?;
    let (_, message) = failure_of(what, &out, phrases);
    println!("{what}: peak RSS {} MiB\n  -> {message}", rss_kib >> 10);
    assert!(rss_kib < MAX_RSS_KIB, "{what}: pitr's peak RSS was {} MiB", rss_kib >> 10);
    Ok((message, rss_kib))
}

#[test]
fn oversized_length_before_authentication() -> Result<()> {
    let server = FakeServer::start(Misbehaviour::HugeBeforeAuth)?;
    let s = setup("hostile-huge-startup", server.port, "", "")?;
    let port = server.port.to_string();
    refused(
        &s,
        "a 4 GiB Authentication message",
        &[&port, "Authentication ('R')", &format!("{HUGE} bytes"), "65536", "before authentication", "dropped"],
    )?;
    Ok(())
}

#[test]
fn oversized_length_after_authentication() -> Result<()> {
    let server = FakeServer::start(Misbehaviour::HugeAfterAuth { len: HUGE })?;
    let s = setup("hostile-huge-row", server.port, "", "")?;
    refused(
        &s,
        "a 4 GiB DataRow",
        &["DataRow ('D')", &format!("{HUGE} bytes"), "16777216", "max_message_size", "dropped"],
    )?;
    assert_eq!(server.seen().queries.len(), 1, "the oversized row answers pitr's first query");
    Ok(())
}

#[test]
fn configured_max_message_size_applies() -> Result<()> {
    // 2 MiB is harmless, but above a configured 1 MiB.
    let server = FakeServer::start(Misbehaviour::HugeAfterAuth { len: 2 << 20 })?;
    let s = setup("hostile-configured", server.port, "", "max_message_size = 1048576")?;
    refused(
        &s,
        "a 2 MiB DataRow over a 1 MiB bound",
        &["DataRow ('D')", "2097152 bytes", "1048576", "max_message_size"],
    )?;
    // Bounds that would refuse a genuine server, or that PostgreSQL never needs, are config errors.
    for bad in ["max_message_size = 4096", "max_message_size = 2147483648"] {
        let dir = scratch_dir("hostile-bad-bound");
        let config = dir.path().join("pitr.toml");
        let text = std::fs::read_to_string(&s.config)?.replace("max_message_size = 1048576", bad);
        std::fs::write(&config, text)?;
        let (out, _) = run_measured(&config, &["backup"])?;
        failure_of(bad, &out, &["max_message_size", "between 1048576"]);
    }
    Ok(())
}

#[test]
fn cleartext_password_over_plain_tcp() -> Result<()> {
    const SECRET: &str = "pw-that-must-not-travel";
    let server = FakeServer::start(Misbehaviour::Cleartext)?;
    let s = setup("hostile-cleartext", server.port, &format!("password={SECRET}"), "")?;
    let (message, _) = refused(
        &s,
        "a cleartext password request over plain TCP",
        &["cleartext", "without TLS", "require_auth=password", "sslmode=verify-full"],
    )?;
    assert!(!message.contains(SECRET), "{message}");
    assert!(server.seen().passwords.is_empty(), "the password was sent: {:?}", server.seen().passwords);

    // Named in require_auth, it is the user's choice: the password goes, and the server's answer
    // to the first query is what fails the backup.
    let s = setup("hostile-cleartext-allowed", server.port, &format!("password={SECRET} require_auth=password"), "")?;
    let (out, _) = run_measured(&s.config, &["backup"])?;
    failure_of("an allowed cleartext password", &out, &["this fake server ends here"]);
    assert_eq!(server.seen().passwords, vec![SECRET.to_string()]);
    Ok(())
}

#[test]
fn scram_without_the_server_signature() -> Result<()> {
    let server = FakeServer::start(Misbehaviour::ScramWithoutFinal)?;
    let s = setup("hostile-scram", server.port, "password=scrampw", "")?;
    refused(&s, "SCRAM without AuthenticationSASLFinal", &["SCRAM signature", "AuthenticationSASLFinal", "refused"])?;
    let seen = server.seen();
    assert_eq!(seen.passwords.len(), 1, "the client proof reached the server: {seen:?}");
    assert!(seen.queries.is_empty(), "pitr went on after an unproven AuthenticationOk: {seen:?}");
    Ok(())
}

#[test]
fn endless_parameter_status_messages() -> Result<()> {
    let server = FakeServer::start(Misbehaviour::EndlessParameters)?;
    let s = setup("hostile-parameters", server.port, "", "")?;
    refused(&s, "ParameterStatus without end", &["more than 65536 bytes of parameters"])?;
    Ok(())
}
