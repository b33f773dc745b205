//! The socket edge: one connection to a PostgreSQL server, TCP or Unix socket, optionally TLS,
//! authenticated, with the replication commands pitr uses on top of it.
//!
//! All reads go through `rbuf` and all writes through `wbuf`, so `recv_replication` and
//! `send_status` can sit in a `tokio::select!` without losing bytes when a branch is cancelled.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pitr_pgformat::lsn::{format_lsn, parse_lsn};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::auth::{Authenticator, Step, Transport};
use crate::conninfo::{ConnInfo, Host, SslMode, TargetSessionAttrs};
use crate::messages::{self, parse_backend, BackendMessage, MessageLimit, ReplicationMessage, ServerError};
use crate::{tls, PgError};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What IDENTIFY_SYSTEM says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// `systemid`: the database system identifier from `pg_control`, fixed at initdb and shared
    /// by a primary and all its physical standbys; it tells whether WAL belongs to this cluster.
    pub system_id: u64,
    /// `timeline`: the server's current timeline ID.
    pub timeline: u32,
    /// `xlogpos`: the current WAL flush location as an LSN (on a standby, the furthest WAL it
    /// has received or replayed); WAL up to here can be streamed now.
    pub xlog_pos: u64,
}

/// Server settings that shape the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    /// `wal_segment_size` in bytes (16 MiB unless initdb was given `--wal-segsize`).
    pub wal_segment_size: u64,
    /// `wal_block_size` in bytes: the size of a WAL page (XLOG_BLCKSZ, normally 8 kB).
    pub wal_page_size: u64,
    /// `server_version_num`, e.g. `170002` for 17.2; gates commands that need a newer server.
    pub server_version_num: u32,
}

/// Rows of one result set, as raw values (text format).
#[derive(Debug, Clone, Default)]
pub struct QueryResult {
    /// Column names from the RowDescription, in order.
    pub columns: Vec<String>,
    /// One entry per DataRow, one value per column; `None` is SQL NULL.
    pub rows: Vec<Vec<Option<Bytes>>>,
}

impl QueryResult {
    /// Column `col` of row `row` as UTF-8 text.
    pub fn text(&self, row: usize, col: usize) -> Option<&str> {
        self.rows.get(row)?.get(col)?.as_ref().and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// Events of a running START_REPLICATION stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// One CopyData message of the stream: WAL data (XLogData) or a primary keepalive.
    Message(ReplicationMessage),
    /// The server finished streaming the requested timeline; the next one begins at `next_start`.
    EndOfTimeline {
        /// The timeline that follows the one just streamed.
        next_timeline: u32,
        /// The LSN where `next_timeline` branched off, where streaming it must start.
        next_start: u64,
    },
    /// The server ended streaming without naming a next timeline (it is shutting down).
    Ended,
}

#[derive(Debug, Default)]
struct EndOfStreaming {
    next: Option<(u32, u64)>,
}

/// One authenticated connection to a PostgreSQL server, regular or replication (walsender),
/// over TCP (optionally TLS) or a Unix socket. Open it with [`Connection::connect`] and end it
/// with [`Connection::close`].
pub struct Connection {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    params: HashMap<String, String>,
    host: String,
    ending: Option<EndOfStreaming>,
    /// The small startup bound until the server has authenticated us, then
    /// `max_message_size`.
    limit: MessageLimit,
    /// `max_message_size`: also the most one result set may hold.
    max_message_size: usize,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("host", &self.host).finish_non_exhaustive()
    }
}

/// Options that are not part of the connection string.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Open a physical replication connection (`replication=true` in the startup packet), which
    /// speaks the replication commands (IDENTIFY_SYSTEM, START_REPLICATION, BASE_BACKUP, …)
    /// instead of SQL and connects to no database.
    pub replication: bool,
    /// Used when the connection string sets none.
    pub application_name: String,
}

impl Connection {
    /// Connects to the first host that accepts us and matches `target_session_attrs`, trying each
    /// in order as libpq does. The error lists every host and why it was passed over.
    pub async fn connect(info: &ConnInfo, opts: &ConnectOptions) -> Result<Connection, PgError> {
        let mut attempts = Vec::new();
        for host in &info.hosts {
            let label = host_label(host);
            let attempt = async {
                let mut conn = Self::connect_one(info, host, &label, opts).await?;
                conn.check_session_attrs(info.target_session_attrs).await?;
                Ok::<_, PgError>(conn)
            };
            let result = match info.connect_timeout {
                Some(t) => tokio::time::timeout(t, attempt)
                    .await
                    .unwrap_or_else(|_| Err(PgError::Timeout { host: label.clone(), after: t })),
                None => attempt.await,
            };
            match result {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    tracing::debug!(host = %label, error = %e, "connection attempt failed");
                    attempts.push(e.to_string());
                }
            }
        }
        if attempts.len() == 1 {
            // One host: its own error is the clearest message.
            return Err(PgError::Connect { attempts: attempts.remove(0) });
        }
        Err(PgError::Connect { attempts: attempts.join("; ") })
    }

    async fn connect_one(
        info: &ConnInfo,
        host: &Host,
        label: &str,
        opts: &ConnectOptions,
    ) -> Result<Connection, PgError> {
        let io_err = |e: std::io::Error| PgError::Io { host: label.to_string(), cause: e };
        let (io, transport): (Box<dyn Io>, Transport) = match host {
            Host::Tcp { host: name, port } => {
                let tcp = TcpStream::connect((name.as_str(), *port)).await.map_err(io_err)?;
                tcp.set_nodelay(true).map_err(io_err)?;
                if let Some(idle) = info.keepalives_idle {
                    let sock = socket2_keepalive(&tcp, idle);
                    if let Err(e) = sock {
                        tracing::debug!(error = %e, "could not set TCP keepalive");
                    }
                }
                Self::maybe_tls(info, name, label, tcp).await?
            }
            Host::Unix { dir, port } => {
                let path: PathBuf = dir.join(format!(".s.PGSQL.{port}"));
                (Box::new(UnixStream::connect(&path).await.map_err(io_err)?), Transport::Unix)
            }
        };
        let mut conn = Connection {
            io,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            params: HashMap::new(),
            host: label.to_string(),
            ending: None,
            limit: MessageLimit::STARTUP,
            max_message_size: info.max_message_size,
        };
        conn.startup(info, host, opts, transport).await?;
        Ok(conn)
    }

    async fn maybe_tls(
        info: &ConnInfo,
        name: &str,
        label: &str,
        mut tcp: TcpStream,
    ) -> Result<(Box<dyn Io>, Transport), PgError> {
        if matches!(info.sslmode, SslMode::Disable | SslMode::Allow) {
            return Ok((Box::new(tcp), Transport::Plain));
        }
        let io_err = |e: std::io::Error| PgError::Io { host: label.to_string(), cause: e };
        let mut req = BytesMut::new();
        frontend::ssl_request(&mut req);
        tcp.write_all(&req).await.map_err(io_err)?;
        let answer = tcp.read_u8().await.map_err(io_err)?;
        match answer {
            b'S' => {
                let config = tls::client_config(info, label)?;
                let connector = tokio_rustls::TlsConnector::from(config);
                let stream = connector
                    .connect(tls::server_name(name)?, tcp)
                    .await
                    .map_err(|e| PgError::Tls { host: label.to_string(), message: e.to_string() })?;
                let server_certificate =
                    stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
                Ok((Box::new(stream), Transport::Tls { server_certificate }))
            }
            b'N' if info.sslmode == SslMode::Prefer => Ok((Box::new(tcp), Transport::Plain)),
            b'N' => Err(PgError::Tls {
                host: label.to_string(),
                message: "the server does not support TLS, but sslmode requires it".into(),
            }),
            other => Err(PgError::Protocol(format!("{label}: unexpected answer {other:#x} to the TLS request"))),
        }
    }

    async fn startup(
        &mut self,
        info: &ConnInfo,
        host: &Host,
        opts: &ConnectOptions,
        transport: Transport,
    ) -> Result<(), PgError> {
        let user = info
            .user
            .clone()
            .or_else(|| std::env::var("PGUSER").ok())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".to_string());
        let app = info.application_name_or(&opts.application_name);
        let mut params: Vec<(&str, &str)> = vec![("user", &user), ("application_name", &app)];
        if opts.replication {
            params.push(("replication", "true"));
        } else if let Some(db) = &info.dbname {
            params.push(("database", db));
        }
        if let Some(o) = &info.options {
            params.push(("options", o));
        }
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)
            .map_err(|e| PgError::Protocol(e.to_string()))?;
        self.flush().await?;

        let host_label = self.host.clone();
        let mut password = || -> Result<String, PgError> {
            info.password
                .clone()
                .or_else(|| std::env::var("PGPASSWORD").ok())
                .or_else(|| crate::pgpass::lookup(host, info.dbname.as_deref().unwrap_or("replication"), &user))
                .ok_or_else(|| PgError::Auth { host: host_label.clone(), message: format!("the server asks a password for user {user:?} and none is set (password=, PGPASSWORD or ~/.pgpass)") })
        };
        let mut auth =
            Authenticator::new(&self.host, &user, info.require_auth.clone(), info.channel_binding, transport);
        let mut authenticated = false;
        let mut params_size = 0usize;
        loop {
            match self.next_message().await? {
                msg @ (BackendMessage::AuthenticationOk
                | BackendMessage::AuthenticationCleartextPassword
                | BackendMessage::AuthenticationMd5Password { .. }
                | BackendMessage::AuthenticationSasl { .. }
                | BackendMessage::AuthenticationSaslContinue(_)
                | BackendMessage::AuthenticationSaslFinal(_)
                | BackendMessage::AuthenticationUnsupported(_)) => {
                    if auth.on_message(&msg, &mut self.wbuf, &mut password)? == Step::Authenticated {
                        authenticated = true;
                        self.limit = MessageLimit { max: self.max_message_size, authenticated: true };
                    }
                    if !self.wbuf.is_empty() {
                        self.flush().await?;
                    }
                }
                BackendMessage::ParameterStatus { name, value } => {
                    // Each message is bounded, their number is not: a server reports some 15
                    // parameters in well under a kilobyte.
                    params_size += name.len() + value.len();
                    if params_size > messages::STARTUP_MAX_MESSAGE_SIZE {
                        return Err(PgError::Protocol(format!(
                            "{}: the server reported more than {} bytes of parameters at startup",
                            self.host,
                            messages::STARTUP_MAX_MESSAGE_SIZE
                        )));
                    }
                    self.params.insert(name, value);
                }
                BackendMessage::BackendKeyData | BackendMessage::Notice(_) | BackendMessage::Other => {}
                BackendMessage::ReadyForQuery if authenticated => return Ok(()),
                BackendMessage::Error(e) => {
                    // 28P01 invalid_password, 28000 invalid_authorization_specification
                    if e.code.starts_with("28") {
                        return Err(PgError::Auth { host: self.host.clone(), message: e.to_string() });
                    }
                    return Err(PgError::Server { host: self.host.clone(), error: Box::new(e) });
                }
                other => return Err(PgError::Protocol(format!("{}: unexpected {other:?} during startup", self.host))),
            }
        }
    }

    async fn check_session_attrs(&mut self, want: TargetSessionAttrs) -> Result<(), PgError> {
        if want == TargetSessionAttrs::Any {
            return Ok(());
        }
        let in_hot_standby = match self.params.get("in_hot_standby") {
            Some(v) => v == "on",
            // Before PostgreSQL 14 the server does not report it; ask.
            None => self.show("transaction_read_only").await? == "on",
        };
        let read_only = in_hot_standby || self.params.get("default_transaction_read_only").is_some_and(|v| v == "on");
        let ok = match want {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !read_only,
            TargetSessionAttrs::ReadOnly => read_only,
            TargetSessionAttrs::Primary => !in_hot_standby,
            TargetSessionAttrs::Standby => in_hot_standby,
        };
        if ok {
            Ok(())
        } else {
            Err(PgError::SessionAttrs { host: self.host.clone(), wanted: format!("{want:?}"), read_only })
        }
    }

    /// A server parameter reported at startup (`server_version`, `in_hot_standby`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// The host we are connected to, as `host:port` (or the socket directory).
    pub fn host(&self) -> &str {
        &self.host
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        while !self.wbuf.is_empty() {
            let n = self
                .io
                .write_buf(&mut self.wbuf)
                .await
                .map_err(|e| PgError::Io { host: self.host.clone(), cause: e })?;
            if n == 0 {
                return Err(PgError::Io { host: self.host.clone(), cause: std::io::ErrorKind::WriteZero.into() });
            }
        }
        self.io.flush().await.map_err(|e| PgError::Io { host: self.host.clone(), cause: e })
    }

    async fn next_message(&mut self) -> Result<BackendMessage, PgError> {
        loop {
            let parsed = parse_backend(&mut self.rbuf, self.limit).map_err(|e| match e {
                PgError::MessageTooLarge { message_type, length, limit, authenticated, .. } => {
                    PgError::MessageTooLarge { host: self.host.clone(), message_type, length, limit, authenticated }
                }
                e => e,
            })?;
            if let Some(msg) = parsed {
                return Ok(msg);
            }
            let n = self
                .io
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| PgError::Io { host: self.host.clone(), cause: e })?;
            if n == 0 {
                return Err(PgError::Closed { host: self.host.clone() });
            }
        }
    }

    /// Runs one simple query (a replication command on a replication connection) and returns the
    /// last result set.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, PgError> {
        frontend::query(sql, &mut self.wbuf).map_err(|e| PgError::Protocol(e.to_string()))?;
        self.flush().await?;
        let mut result = QueryResult::default();
        let mut size = 0usize;
        let mut error: Option<ServerError> = None;
        loop {
            match self.next_message().await? {
                BackendMessage::RowDescription { columns } => {
                    result = QueryResult { columns, rows: Vec::new() };
                    size = 0;
                }
                BackendMessage::DataRow(values) => {
                    size += messages::row_size(&values);
                    if size > self.max_message_size {
                        return Err(PgError::ResultTooLarge {
                            host: self.host.clone(),
                            command: sql.to_string(),
                            limit: self.max_message_size,
                        });
                    }
                    result.rows.push(values);
                }
                BackendMessage::Error(e) => error = Some(e),
                BackendMessage::ReadyForQuery => break,
                BackendMessage::CopyOutResponse | BackendMessage::CopyInResponse | BackendMessage::CopyBothResponse => {
                    return Err(PgError::Protocol(format!("{}: {sql:?} started a COPY", self.host)));
                }
                _ => {}
            }
        }
        match error {
            Some(error) => Err(PgError::Server { host: self.host.clone(), error: Box::new(error) }),
            None => Ok(result),
        }
    }

    /// The current value of a server setting, as `SHOW setting` prints it (units included, e.g.
    /// `16MB`). Works on replication connections too.
    pub async fn show(&mut self, setting: &str) -> Result<String, PgError> {
        let r = self.simple_query(&format!("SHOW {setting}")).await?;
        r.text(0, 0)
            .map(str::to_string)
            .ok_or_else(|| PgError::Protocol(format!("{}: SHOW {setting} returned no value", self.host)))
    }

    /// WAL geometry and version, which everything that reads WAL needs.
    pub async fn server_settings(&mut self) -> Result<ServerSettings, PgError> {
        let size = |name: &'static str, v: String| {
            messages::parse_size_setting(&v).ok_or_else(|| PgError::Protocol(format!("cannot read {name} {v:?}")))
        };
        let wal_segment_size = size("wal_segment_size", self.show("wal_segment_size").await?)?;
        let wal_page_size = size("wal_block_size", self.show("wal_block_size").await?)?;
        let version = self.show("server_version_num").await?;
        let server_version_num =
            version.parse().map_err(|_| PgError::Protocol(format!("cannot read server_version_num {version:?}")))?;
        Ok(ServerSettings { wal_segment_size, wal_page_size, server_version_num })
    }

    /// Runs IDENTIFY_SYSTEM (replication connections only): the system identifier, current
    /// timeline and current WAL position.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, PgError> {
        let r = self.simple_query("IDENTIFY_SYSTEM").await?;
        let bad = |what: &str| PgError::Protocol(format!("IDENTIFY_SYSTEM: {what}"));
        let system_id = r.text(0, 0).and_then(|s| s.parse().ok()).ok_or_else(|| bad("bad systemid"))?;
        let timeline = r.text(0, 1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("bad timeline"))?;
        let xlog_pos = r.text(0, 2).and_then(parse_lsn).ok_or_else(|| bad("bad xlogpos"))?;
        Ok(SystemIdentity { system_id, timeline, xlog_pos })
    }

    /// Creates a physical slot that reserves WAL at once. `Ok(Some(lsn))` with the position from
    /// which it keeps WAL if it was created, `Ok(None)` if it already existed.
    pub async fn create_physical_slot(&mut self, slot: &str) -> Result<Option<u64>, PgError> {
        validate_slot_name(slot)?;
        match self.simple_query(&format!("CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL")).await {
            Ok(r) => Ok(Some(r.text(0, 1).and_then(parse_lsn).unwrap_or(0))),
            Err(PgError::Server { error, .. }) if error.code == "42710" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Slot type and restart LSN of `slot` (PostgreSQL 15+), `None` if there is no such slot.
    pub async fn read_replication_slot(&mut self, slot: &str) -> Result<Option<(String, Option<u64>)>, PgError> {
        validate_slot_name(slot)?;
        let r = self.simple_query(&format!("READ_REPLICATION_SLOT {slot}")).await?;
        match r.text(0, 0) {
            None => Ok(None),
            Some(kind) => Ok(Some((kind.to_string(), r.text(0, 1).and_then(parse_lsn)))),
        }
    }

    /// The history file of `timeline`: (file name, contents).
    pub async fn timeline_history(&mut self, timeline: u32) -> Result<(String, Bytes), PgError> {
        let r = self.simple_query(&format!("TIMELINE_HISTORY {timeline}")).await?;
        let name = r.text(0, 0).ok_or_else(|| PgError::Protocol("TIMELINE_HISTORY: no file name".into()))?.to_string();
        let content = r.rows.first().and_then(|row| row.get(1)).cloned().flatten().unwrap_or_default();
        Ok((name, content))
    }

    /// START_REPLICATION SLOT … PHYSICAL lsn TIMELINE tli; on success the connection is in CopyBoth.
    pub async fn start_replication(&mut self, slot: &str, start: u64, timeline: u32) -> Result<(), PgError> {
        validate_slot_name(slot)?;
        let sql = format!("START_REPLICATION SLOT {slot} PHYSICAL {} TIMELINE {timeline}", format_lsn(start));
        frontend::query(&sql, &mut self.wbuf).map_err(|e| PgError::Protocol(e.to_string()))?;
        self.flush().await?;
        loop {
            match self.next_message().await? {
                BackendMessage::CopyBothResponse => {
                    self.ending = None;
                    return Ok(());
                }
                BackendMessage::Error(error) => {
                    // Drain to ReadyForQuery so the connection stays usable.
                    while !matches!(self.next_message().await?, BackendMessage::ReadyForQuery) {}
                    return Err(PgError::Server { host: self.host.clone(), error: Box::new(error) });
                }
                BackendMessage::Notice(n) => tracing::info!(host = %self.host, "{n}"),
                _ => {}
            }
        }
    }

    /// UPLOAD_MANIFEST (PostgreSQL 17+): hands the server the manifest of the backup that the next
    /// `BASE_BACKUP ( INCREMENTAL )` on this connection is taken against. The server answers
    /// with CopyIn, takes the manifest as CopyData, and checks it when the copy ends.
    pub async fn upload_manifest(&mut self, manifest: &[u8]) -> Result<(), PgError> {
        frontend::query("UPLOAD_MANIFEST", &mut self.wbuf).map_err(|e| PgError::Protocol(e.to_string()))?;
        self.flush().await?;
        let mut error: Option<ServerError> = None;
        loop {
            match self.next_message().await? {
                BackendMessage::CopyInResponse => break,
                BackendMessage::Error(e) => error = Some(e),
                BackendMessage::ReadyForQuery => {
                    let error = error.take().map(Box::new).unwrap_or_default();
                    return Err(PgError::Server { host: self.host.clone(), error });
                }
                _ => {}
            }
        }
        // The server's CopyData limit is far above this; smaller messages keep memory flat.
        for chunk in manifest.chunks(64 * 1024) {
            frontend::CopyData::new(chunk).map_err(|e| PgError::Protocol(e.to_string()))?.write(&mut self.wbuf);
            self.flush().await?;
        }
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        loop {
            match self.next_message().await? {
                BackendMessage::Error(e) => error = Some(e),
                BackendMessage::ReadyForQuery => break,
                BackendMessage::Notice(n) => tracing::info!(host = %self.host, "{n}"),
                _ => {}
            }
        }
        match error {
            Some(error) => Err(PgError::Server { host: self.host.clone(), error: Box::new(error) }),
            None => Ok(()),
        }
    }

    /// Sends a BASE_BACKUP command; read its events with [`Connection::next_backup_event`].
    pub async fn start_base_backup(&mut self, command: &str) -> Result<(), PgError> {
        frontend::query(command, &mut self.wbuf).map_err(|e| PgError::Protocol(e.to_string()))?;
        self.flush().await
    }

    /// The next events of a running BASE_BACKUP (empty once it has ended).
    pub async fn next_backup_event(
        &mut self,
        decoder: &mut messages::BaseBackupDecoder,
    ) -> Result<Vec<messages::BackupEvent>, PgError> {
        let mut error = None;
        while !decoder.is_done() {
            match self.next_message().await? {
                BackendMessage::Error(e) => error = Some(e),
                BackendMessage::ReadyForQuery if error.is_some() => {
                    let error = error.take().map(Box::new).unwrap_or_default();
                    return Err(PgError::Server { host: self.host.clone(), error });
                }
                BackendMessage::Notice(n) => tracing::info!(host = %self.host, "{n}"),
                msg if error.is_none() => {
                    let events = decoder.on_message(msg)?;
                    if !events.is_empty() {
                        return Ok(events);
                    }
                }
                _ => {}
            }
        }
        Ok(Vec::new())
    }

    /// The next event of the replication stream. Cancel-safe.
    pub async fn recv_replication(&mut self) -> Result<StreamEvent, PgError> {
        loop {
            match self.next_message().await? {
                BackendMessage::CopyData(data) if self.ending.is_none() => {
                    return Ok(StreamEvent::Message(messages::parse_replication_message(data)?));
                }
                BackendMessage::CopyDone if self.ending.is_none() => {
                    self.ending = Some(EndOfStreaming::default());
                    frontend::copy_done(&mut self.wbuf);
                }
                BackendMessage::DataRow(values) if self.ending.is_some() => {
                    let text =
                        |i: usize| values.get(i).cloned().flatten().and_then(|b| String::from_utf8(b.to_vec()).ok());
                    let tli = text(0).and_then(|s| s.parse().ok());
                    let pos = text(1).as_deref().and_then(parse_lsn);
                    if let (Some(tli), Some(pos), Some(ending)) = (tli, pos, self.ending.as_mut()) {
                        ending.next = Some((tli, pos));
                    }
                }
                BackendMessage::ReadyForQuery if self.ending.is_some() => {
                    let ending = self.ending.take().unwrap_or_default();
                    return Ok(match ending.next {
                        Some((next_timeline, next_start)) => StreamEvent::EndOfTimeline { next_timeline, next_start },
                        None => StreamEvent::Ended,
                    });
                }
                BackendMessage::Error(error) => {
                    return Err(PgError::Server { host: self.host.clone(), error: Box::new(error) })
                }
                BackendMessage::Notice(n) => tracing::info!(host = %self.host, "{n}"),
                _ => {}
            }
            // Anything queued (the CopyDone answer) goes out before waiting for more.
            if !self.wbuf.is_empty() {
                self.flush().await?;
            }
        }
    }

    /// Sends a standby status update. `write`/`flush` must be durable positions.
    pub async fn send_status(&mut self, write: u64, flush: u64, reply_requested: bool) -> Result<(), PgError> {
        let now = now_pg_micros();
        messages::standby_status_update(write, flush, 0, now, reply_requested, &mut self.wbuf);
        self.flush().await
    }

    /// Tells the server we are done (Terminate) and closes the socket.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

fn host_label(host: &Host) -> String {
    match host {
        Host::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
        Host::Tcp { host, port } => format!("{host}:{port}"),
        Host::Unix { dir, port } => format!("{}/.s.PGSQL.{port}", dir.display()),
    }
}

/// Slot names are `[a-z0-9_]{1,63}` (PostgreSQL's own rule), so they never need quoting.
pub fn validate_slot_name(slot: &str) -> Result<(), PgError> {
    if !slot.is_empty()
        && slot.len() <= 63
        && slot.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(())
    } else {
        Err(PgError::InvalidSlotName(slot.to_string()))
    }
}

fn now_pg_micros() -> i64 {
    let unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    pitr_pgformat::walreader::unix_micros_to_pg_timestamp(unix)
}

fn socket2_keepalive(tcp: &TcpStream, idle: Duration) -> std::io::Result<()> {
    socket2::SockRef::from(tcp).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle))
}
