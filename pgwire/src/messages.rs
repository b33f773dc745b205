//! Sans-IO message handling: backend messages parsed from a byte buffer, frontend messages and
//! replication sub-messages built into one. No sockets here, so all of it is unit-tested.
//!
//! Ordinary backend messages are decoded by `postgres-protocol`; CopyBothResponse (`W`), which it
//! does not know, is recognised here from its tag byte.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use pitr_pgformat::lsn::parse_lsn;
use postgres_protocol::message::backend::Message;

use crate::PgError;

/// A server-side error or notice, as the server sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    /// Severity (`ERROR`, `FATAL`, `PANIC`, `WARNING`, `NOTICE`, …), the non-localized `V` field
    /// when the server sends it (9.6+), else the `S` field.
    pub severity: String,
    /// The SQLSTATE error code (`C` field), e.g. `42710` for a slot that already exists.
    pub code: String,
    /// The primary message (`M` field).
    pub message: String,
    /// The optional `D` (detail) field.
    pub detail: Option<String>,
    /// The optional `H` (hint) field: a suggestion what to do about it.
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// The backend messages pitr acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// AuthenticationOk: the server accepted the credentials (or needed none).
    AuthenticationOk,
    /// AuthenticationCleartextPassword: send the password as is.
    AuthenticationCleartextPassword,
    /// AuthenticationMD5Password: send the password MD5-hashed with the user name and this salt.
    AuthenticationMd5Password {
        /// The 4-byte salt to hash with.
        salt: [u8; 4],
    },
    /// AuthenticationSASL: SASL authentication starts.
    AuthenticationSasl {
        /// The mechanisms the server offers, in its order of preference (e.g. `SCRAM-SHA-256`).
        mechanisms: Vec<String>,
    },
    /// AuthenticationSASLContinue: the server's challenge (SCRAM server-first-message).
    AuthenticationSaslContinue(Bytes),
    /// AuthenticationSASLFinal: the server's outcome data (SCRAM server-final-message, whose
    /// signature proves the server knows the password too).
    AuthenticationSaslFinal(Bytes),
    /// Kerberos, GSS, SSPI: named in the error, not supported.
    AuthenticationUnsupported(&'static str),
    /// ParameterStatus: the current value of a run-time parameter the server reports
    /// (`server_version`, `in_hot_standby`, `default_transaction_read_only`, …).
    ParameterStatus {
        /// The parameter's name.
        name: String,
        /// Its value.
        value: String,
    },
    /// BackendKeyData (the cancel key): pitr never cancels, so its contents are dropped.
    BackendKeyData,
    /// ReadyForQuery: the previous command (or startup) is over and the server waits for the next.
    ReadyForQuery,
    /// RowDescription: a result set starts.
    RowDescription {
        /// The column names, in order.
        columns: Vec<String>,
    },
    /// DataRow: one row of the current result set, one value per column (`None` is NULL).
    DataRow(Vec<Option<Bytes>>),
    /// CommandComplete, with its command tag (`SELECT 1`, `BASE_BACKUP`, …).
    CommandComplete(String),
    /// EmptyQueryResponse: the query string was empty.
    EmptyQueryResponse,
    /// ErrorResponse: the command failed; ReadyForQuery follows.
    Error(ServerError),
    /// NoticeResponse: a warning or notice; the command goes on.
    Notice(ServerError),
    /// CopyBothResponse: START_REPLICATION succeeded and the stream runs in both directions.
    CopyBothResponse,
    /// CopyOutResponse: the server starts sending CopyData (BASE_BACKUP's archives).
    CopyOutResponse,
    /// CopyInResponse: the server waits for CopyData from us (UPLOAD_MANIFEST).
    CopyInResponse,
    /// CopyData: one chunk of a copy's payload.
    CopyData(Bytes),
    /// CopyDone: the sender finished its side of the copy.
    CopyDone,
    /// Anything else (notifications, parameter descriptions…): skipped.
    Other,
}

fn protocol(what: impl Into<String>) -> PgError {
    PgError::Protocol(what.into())
}

/// The longest message accepted before the server has authenticated us. Authentication
/// requests are tiny (libpq refuses those above 2000 bytes) and libpq caps errors at this stage
/// at 30000 bytes; 64 kB leaves room and keeps what an unauthenticated peer can make us
/// allocate small.
pub const STARTUP_MAX_MESSAGE_SIZE: usize = 64 << 10;

/// How long a backend message may be: the length field (which counts itself but not the type
/// byte) above `max` fails the connection before anything is allocated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimit {
    /// The largest length field accepted.
    pub max: usize,
    /// Whether the server has authenticated us yet (only for the error message).
    pub authenticated: bool,
}

impl MessageLimit {
    /// The bound until authentication completes: [`STARTUP_MAX_MESSAGE_SIZE`].
    pub const STARTUP: MessageLimit = MessageLimit { max: STARTUP_MAX_MESSAGE_SIZE, authenticated: false };
}

/// The protocol's name of a backend message type, for errors.
pub fn message_type_name(tag: u8) -> String {
    let name = match tag {
        b'R' => "Authentication",
        b'E' => "ErrorResponse",
        b'N' => "NoticeResponse",
        b'S' => "ParameterStatus",
        b'K' => "BackendKeyData",
        b'Z' => "ReadyForQuery",
        b'T' => "RowDescription",
        b'D' => "DataRow",
        b'C' => "CommandComplete",
        b'I' => "EmptyQueryResponse",
        b'd' => "CopyData",
        b'c' => "CopyDone",
        b'H' => "CopyOutResponse",
        b'G' => "CopyInResponse",
        b'W' => "CopyBothResponse",
        b'A' => "NotificationResponse",
        b'v' => "NegotiateProtocolVersion",
        b't' => "ParameterDescription",
        b'n' => "NoData",
        _ => return format!("unknown ({:?})", tag as char),
    };
    format!("{name} ({:?})", tag as char)
}

/// Takes one complete backend message off the front of `buf`, or `None` if more bytes are
/// needed. A length field above `limit` is an error at once ([`PgError::MessageTooLarge`], its
/// `host` left empty for the caller to fill in), so nothing is reserved for it.
pub fn parse_backend(buf: &mut BytesMut, limit: MessageLimit) -> Result<Option<BackendMessage>, PgError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if length as u64 > limit.max as u64 {
        return Err(PgError::MessageTooLarge {
            host: String::new(),
            message_type: message_type_name(buf[0]),
            length: u64::from(length),
            limit: limit.max,
            authenticated: limit.authenticated,
        });
    }
    if buf[0] == b'W' {
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if len < 4 {
            return Err(protocol(format!("CopyBothResponse with length {len}")));
        }
        let total = 1 + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(total);
        return Ok(Some(BackendMessage::CopyBothResponse));
    }
    let tag = buf[0];
    let msg = match Message::parse(buf) {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(None),
        Err(e) => return Err(protocol(format!("bad backend message (tag {:?}): {e}", tag as char))),
    };
    let bad = |e: std::io::Error| protocol(format!("bad backend message (tag {:?}): {e}", tag as char));
    Ok(Some(match msg {
        Message::AuthenticationOk => BackendMessage::AuthenticationOk,
        Message::AuthenticationCleartextPassword => BackendMessage::AuthenticationCleartextPassword,
        Message::AuthenticationMd5Password(b) => BackendMessage::AuthenticationMd5Password { salt: b.salt() },
        Message::AuthenticationSasl(b) => {
            let mechanisms = b.mechanisms().map(|m| Ok(m.to_string())).collect().map_err(bad)?;
            BackendMessage::AuthenticationSasl { mechanisms }
        }
        Message::AuthenticationSaslContinue(b) => {
            BackendMessage::AuthenticationSaslContinue(Bytes::copy_from_slice(b.data()))
        }
        Message::AuthenticationSaslFinal(b) => {
            BackendMessage::AuthenticationSaslFinal(Bytes::copy_from_slice(b.data()))
        }
        Message::AuthenticationKerberosV5 => BackendMessage::AuthenticationUnsupported("Kerberos V5"),
        Message::AuthenticationScmCredential => BackendMessage::AuthenticationUnsupported("SCM credentials"),
        Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
            BackendMessage::AuthenticationUnsupported("GSSAPI")
        }
        Message::AuthenticationSspi => BackendMessage::AuthenticationUnsupported("SSPI"),
        Message::ParameterStatus(b) => BackendMessage::ParameterStatus {
            name: b.name().map_err(bad)?.to_string(),
            value: b.value().map_err(bad)?.to_string(),
        },
        Message::BackendKeyData(_) => BackendMessage::BackendKeyData,
        Message::ReadyForQuery(_) => BackendMessage::ReadyForQuery,
        Message::RowDescription(b) => {
            let columns = b.fields().map(|f| Ok(f.name().to_string())).collect().map_err(bad)?;
            BackendMessage::RowDescription { columns }
        }
        Message::DataRow(b) => {
            let data = b.buffer_bytes().clone();
            let values = b.ranges().map(|r| Ok(r.map(|r| data.slice(r)))).collect().map_err(bad)?;
            BackendMessage::DataRow(values)
        }
        Message::CommandComplete(b) => BackendMessage::CommandComplete(b.tag().map_err(bad)?.to_string()),
        Message::EmptyQueryResponse => BackendMessage::EmptyQueryResponse,
        Message::ErrorResponse(b) => BackendMessage::Error(server_error(b.fields()).map_err(bad)?),
        Message::NoticeResponse(b) => BackendMessage::Notice(server_error(b.fields()).map_err(bad)?),
        Message::CopyOutResponse(_) => BackendMessage::CopyOutResponse,
        Message::CopyInResponse(_) => BackendMessage::CopyInResponse,
        Message::CopyData(b) => BackendMessage::CopyData(b.into_bytes()),
        Message::CopyDone => BackendMessage::CopyDone,
        _ => BackendMessage::Other,
    }))
}

fn server_error(mut fields: postgres_protocol::message::backend::ErrorFields<'_>) -> std::io::Result<ServerError> {
    let mut e = ServerError::default();
    while let Some(f) = fields.next()? {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => e.severity = v,
            b'S' if e.severity.is_empty() => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    Ok(e)
}

/// Messages inside the CopyBoth stream of START_REPLICATION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// XLogData (`w`): WAL bytes starting at `wal_start`; `wal_end` is the server's current end of WAL.
    XLogData {
        /// The LSN of the first byte of `data`.
        wal_start: u64,
        /// The server's current end of WAL (how far it could send).
        wal_end: u64,
        /// The server's clock at sending, in microseconds since 2000-01-01 (PostgreSQL's epoch).
        send_time: i64,
        /// The WAL bytes themselves, a contiguous piece of the WAL at `wal_start`.
        data: Bytes,
    },
    /// Primary keepalive message (`k`); `reply_requested` asks for a status update at once.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: u64,
        /// The server's clock at sending, in microseconds since 2000-01-01 (PostgreSQL's epoch).
        send_time: i64,
        /// The server wants a Standby Status Update right away, or it may drop the connection
        /// at `wal_sender_timeout`.
        reply_requested: bool,
    },
}

/// Decodes the payload of one CopyData of the START_REPLICATION stream: XLogData (`w`) or a
/// primary keepalive (`k`).
pub fn parse_replication_message(mut data: Bytes) -> Result<ReplicationMessage, PgError> {
    if data.is_empty() {
        return Err(protocol("empty CopyData in the replication stream"));
    }
    let kind = data.get_u8();
    match kind {
        b'w' => {
            if data.len() < 24 {
                return Err(protocol("XLogData shorter than its header"));
            }
            let wal_start = data.get_u64();
            let wal_end = data.get_u64();
            let send_time = data.get_i64();
            Ok(ReplicationMessage::XLogData { wal_start, wal_end, send_time, data })
        }
        b'k' => {
            if data.len() < 17 {
                return Err(protocol("keepalive shorter than 17 bytes"));
            }
            let wal_end = data.get_u64();
            let send_time = data.get_i64();
            let reply_requested = data.get_u8() != 0;
            Ok(ReplicationMessage::Keepalive { wal_end, send_time, reply_requested })
        }
        other => Err(protocol(format!("unknown replication message {:?}", other as char))),
    }
}

/// A Standby Status Update wrapped in CopyData, ready to send.
pub fn standby_status_update(
    write: u64,
    flush: u64,
    apply: u64,
    client_time: i64,
    reply_requested: bool,
    out: &mut BytesMut,
) {
    out.put_u8(b'd');
    out.put_i32(4 + 1 + 8 * 4 + 1);
    out.put_u8(b'r');
    out.put_u64(write);
    out.put_u64(flush);
    out.put_u64(apply);
    out.put_i64(client_time);
    out.put_u8(reply_requested as u8);
}

/// Parses a size GUC as SHOW prints it (`16MB`, `8192`, `1GB`) into bytes.
pub fn parse_size_setting(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits_end].parse().ok()?;
    let mult = match s[digits_end..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    const BIG: MessageLimit = MessageLimit { max: 1 << 20, authenticated: true };

    #[test]
    fn lengths_above_the_bound_fail_before_anything_is_reserved() {
        // A CopyData announcing 4 GiB - 1, with 3 bytes of it here.
        let mut buf = BytesMut::from(&[b'd', 0xff, 0xff, 0xff, 0xff, 1, 2, 3][..]);
        let cap = buf.capacity();
        let err = parse_backend(&mut buf, BIG).unwrap_err();
        assert!(buf.capacity() <= cap.max(64), "reserved {} bytes", buf.capacity());
        let text = err.to_string();
        for part in ["CopyData ('d')", "4294967295 bytes", "1048576", "max_message_size"] {
            assert!(text.contains(part), "{text:?} lacks {part:?}");
        }
        // Before authentication the small bound applies, and says so.
        let mut buf = BytesMut::from(&[b'R', 0, 1, 0, 1][..]);
        let text = parse_backend(&mut buf, MessageLimit::STARTUP).unwrap_err().to_string();
        assert!(text.contains("Authentication ('R')") && text.contains("65537 bytes"), "{text}");
        assert!(text.contains("65536") && text.contains("before"), "{text}");
        // A CopyBothResponse length is checked the same way, negative as i32 or not.
        let mut buf = BytesMut::from(&[b'W', 0x80, 0, 0, 0][..]);
        assert!(matches!(parse_backend(&mut buf, BIG), Err(PgError::MessageTooLarge { .. })));
        // Exactly at the bound is fine (and waits for the rest).
        let mut buf = BytesMut::from(&[b'd', 0, 0x10, 0, 0][..]);
        assert_eq!(parse_backend(&mut buf, BIG).unwrap(), None);
        let mut buf = BytesMut::from(&[b'd', 0, 0x10, 0, 1][..]);
        assert!(parse_backend(&mut buf, BIG).is_err());
    }

    #[test]
    fn a_backup_result_set_cannot_grow_without_bound() {
        let mut d = BaseBackupDecoder::new(170000);
        d.on_message(BackendMessage::RowDescription { columns: vec!["spcoid".into()] }).unwrap();
        let row = BackendMessage::DataRow(vec![Some(Bytes::from(vec![b'1'; 1 << 20]))]);
        let mut failed = None;
        for i in 0..(DEFAULT_MAX_RESULT_SIZE >> 20) + 2 {
            if let Err(e) = d.on_message(row.clone()) {
                failed = Some((i, e.to_string()));
                break;
            }
        }
        let (i, text) = failed.expect("rows were accepted without bound");
        assert!(i >= (DEFAULT_MAX_RESULT_SIZE >> 20) - 1, "failed early, at row {i}");
        assert!(text.contains("BASE_BACKUP") && text.contains("bytes"), "{text}");
    }

    #[test]
    fn copy_both_and_partial_messages() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[b'W', 0, 0, 0, 7, 0, 0]);
        assert_eq!(parse_backend(&mut buf, BIG).unwrap(), None, "incomplete W must wait");
        buf.extend_from_slice(&[0]);
        assert_eq!(parse_backend(&mut buf, BIG).unwrap(), Some(BackendMessage::CopyBothResponse));
        assert!(buf.is_empty());
        // A CopyData carrying XLogData, split in two reads.
        let mut payload = BytesMut::new();
        payload.put_u8(b'w');
        payload.put_u64(0x1_0000_0000);
        payload.put_u64(0x1_0000_0010);
        payload.put_i64(-5);
        payload.extend_from_slice(b"walbytes");
        let mut wire = BytesMut::new();
        frontend::CopyData::new(&payload[..]).unwrap().write(&mut wire);
        let mut buf = BytesMut::from(&wire[..10]);
        assert_eq!(parse_backend(&mut buf, BIG).unwrap(), None);
        buf.extend_from_slice(&wire[10..]);
        let Some(BackendMessage::CopyData(d)) = parse_backend(&mut buf, BIG).unwrap() else { panic!() };
        assert_eq!(
            parse_replication_message(d).unwrap(),
            ReplicationMessage::XLogData {
                wal_start: 0x1_0000_0000,
                wal_end: 0x1_0000_0010,
                send_time: -5,
                data: Bytes::from_static(b"walbytes")
            }
        );
    }

    #[test]
    fn keepalive_and_status_update() {
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(77);
        k.put_i64(3);
        k.put_u8(1);
        assert_eq!(
            parse_replication_message(k.freeze()).unwrap(),
            ReplicationMessage::Keepalive { wal_end: 77, send_time: 3, reply_requested: true }
        );
        assert!(parse_replication_message(Bytes::from_static(b"k\0")).is_err());
        assert!(parse_replication_message(Bytes::from_static(b"x")).is_err());
        let mut out = BytesMut::new();
        standby_status_update(1, 2, 0, 9, false, &mut out);
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&out[6..14], &1u64.to_be_bytes());
        assert_eq!(&out[14..22], &2u64.to_be_bytes());
    }

    #[test]
    fn error_response_fields() {
        let mut buf = BytesMut::new();
        let body = b"SERROR\0VERROR\0C42710\0Mreplication slot \"x\" already exists\0Dsome detail\0\0";
        buf.put_u8(b'E');
        buf.put_i32(4 + body.len() as i32);
        buf.extend_from_slice(body);
        let Some(BackendMessage::Error(e)) = parse_backend(&mut buf, BIG).unwrap() else { panic!() };
        assert_eq!(e.code, "42710");
        assert_eq!(e.detail.as_deref(), Some("some detail"));
        assert!(e.to_string().contains("already exists"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_setting("16MB"), Some(16 << 20));
        assert_eq!(parse_size_setting("8192"), Some(8192));
        assert_eq!(parse_size_setting("1GB"), Some(1 << 30));
        assert_eq!(parse_size_setting("12 parsecs"), None);
    }
}

/// The most the rows of one BASE_BACKUP result set may hold (start and end positions, the
/// tablespace list): far above what a server sends, small enough for any host.
pub const DEFAULT_MAX_RESULT_SIZE: usize = crate::conninfo::DEFAULT_MAX_MESSAGE_SIZE;

/// Bytes a DataRow holds, counting each value's length field (so that many NULLs count too).
pub fn row_size(values: &[Option<Bytes>]) -> usize {
    values.iter().map(|v| 4 + v.as_ref().map_or(0, Bytes::len)).sum()
}

/// What a running BASE_BACKUP yields, in order: `Start`, then per archive `Archive` followed by
/// its tar bytes as `Data`, then `Manifest` followed by the backup manifest as `Data`, then `End`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// The backup started: the WAL position it starts from (the redo point of its checkpoint)
    /// and the timeline, from BASE_BACKUP's first result set.
    Start {
        /// The start LSN: WAL from here on is needed to restore the backup.
        lsn: u64,
        /// The timeline the backup started on.
        timeline: u32,
    },
    /// The server's estimate of the bytes to send (PROGRESS).
    Estimate(u64),
    /// A new tar archive: the main data directory (`tablespace` None) or a tablespace
    /// (`tablespace` = its OID and location).
    Archive {
        /// The tablespace's OID and location, or `None` for the main data directory.
        tablespace: Option<(u32, String)>,
    },
    /// The next bytes of the current tar archive or of the manifest.
    Data(Bytes),
    /// The server's backup manifest follows as `Data`.
    Manifest,
    /// Bytes sent so far (PROGRESS).
    Progress(u64),
    /// The backup ended, from BASE_BACKUP's last result set.
    End {
        /// The end LSN: a restore must replay WAL at least up to here to be consistent.
        lsn: u64,
        /// The timeline the backup ended on.
        timeline: u32,
    },
}

/// Turns the backend messages of BASE_BACKUP into [`BackupEvent`]s, for both streaming formats:
/// PostgreSQL 15+ (one CopyOut whose CopyData carry a type byte: `n` new archive, `d` data,
/// `p` progress, `m` manifest) and up to 14 (a tablespace result set, then one CopyOut per
/// tablespace and one for the manifest).
#[derive(Debug)]
pub struct BaseBackupDecoder {
    new_format: bool,
    result_sets: usize,
    columns: Vec<String>,
    rows: Vec<Vec<Option<Bytes>>>,
    /// Bytes held in `rows`, bounded by [`DEFAULT_MAX_RESULT_SIZE`].
    rows_size: usize,
    /// Old format: tablespaces announced in the second result set, in CopyOut order.
    tablespaces: Vec<Option<(u32, String)>>,
    copies: usize,
    in_copy: bool,
    done: bool,
}

impl BaseBackupDecoder {
    /// A decoder for a server of `server_version_num` (which picks the streaming format).
    pub fn new(server_version_num: u32) -> BaseBackupDecoder {
        BaseBackupDecoder {
            new_format: server_version_num >= 150000,
            result_sets: 0,
            columns: Vec::new(),
            rows: Vec::new(),
            rows_size: 0,
            tablespaces: Vec::new(),
            copies: 0,
            in_copy: false,
            done: false,
        }
    }

    /// True once ReadyForQuery ended the command.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn text(row: &[Option<Bytes>], i: usize) -> Option<String> {
        row.get(i).cloned().flatten().and_then(|b| String::from_utf8(b.to_vec()).ok())
    }

    fn position(&self, what: &str) -> Result<(u64, u32), PgError> {
        let row = self.rows.first().ok_or_else(|| protocol(format!("BASE_BACKUP: empty {what} result")))?;
        let lsn = Self::text(row, 0).as_deref().and_then(parse_lsn);
        let tli = Self::text(row, 1).and_then(|t| t.parse().ok());
        match (lsn, tli) {
            (Some(lsn), Some(tli)) => Ok((lsn, tli)),
            _ => Err(protocol(format!("BASE_BACKUP: malformed {what} position"))),
        }
    }

    /// Feeds one backend message of the running BASE_BACKUP; returns the events it completes
    /// (often none). ErrorResponse and NoticeResponse are the caller's to handle.
    pub fn on_message(&mut self, msg: BackendMessage) -> Result<Vec<BackupEvent>, PgError> {
        let mut out = Vec::new();
        match msg {
            BackendMessage::RowDescription { columns } => {
                self.columns = columns;
                self.rows.clear();
                self.rows_size = 0;
            }
            BackendMessage::DataRow(values) => {
                self.rows_size += row_size(&values);
                if self.rows_size > DEFAULT_MAX_RESULT_SIZE {
                    return Err(protocol(format!(
                        "BASE_BACKUP: a result set of more than {DEFAULT_MAX_RESULT_SIZE} bytes (its start/end \
                         position and tablespace list are a few hundred); refused"
                    )));
                }
                self.rows.push(values);
            }
            BackendMessage::CommandComplete(_) if !self.in_copy => {
                if self.columns.is_empty() {
                    return Ok(out);
                }
                self.result_sets += 1;
                let is_start = self.result_sets == 1;
                // Both formats send the tablespace list (with size estimates) second.
                let is_tablespaces = self.result_sets == 2;
                if is_start {
                    let (lsn, timeline) = self.position("start")?;
                    out.push(BackupEvent::Start { lsn, timeline });
                } else if is_tablespaces {
                    let mut estimate_kib = 0u64;
                    for row in &self.rows {
                        let oid = Self::text(row, 0).and_then(|o| o.parse().ok());
                        let location = Self::text(row, 1).unwrap_or_default();
                        self.tablespaces.push(oid.map(|o| (o, location)));
                        estimate_kib += Self::text(row, 2).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                    }
                    out.push(BackupEvent::Estimate(estimate_kib * 1024));
                } else {
                    let (lsn, timeline) = self.position("end")?;
                    out.push(BackupEvent::End { lsn, timeline });
                }
                self.columns.clear();
                self.rows.clear();
                self.rows_size = 0;
            }
            BackendMessage::CopyOutResponse => {
                self.in_copy = true;
                if !self.new_format {
                    let i = self.copies;
                    self.copies += 1;
                    match self.tablespaces.get(i) {
                        Some(ts) => out.push(BackupEvent::Archive { tablespace: ts.clone() }),
                        None => out.push(BackupEvent::Manifest),
                    }
                }
            }
            BackendMessage::CopyData(data) if self.in_copy => {
                if !self.new_format {
                    out.push(BackupEvent::Data(data));
                    return Ok(out);
                }
                let mut d = data;
                if d.is_empty() {
                    return Err(protocol("BASE_BACKUP: empty CopyData"));
                }
                let kind = d.get_u8();
                match kind {
                    b'n' => {
                        let mut parts = d.split(|b| *b == 0);
                        let _archive_name = parts.next();
                        let location =
                            parts.next().map(|l| String::from_utf8_lossy(l).into_owned()).unwrap_or_default();
                        if location.is_empty() {
                            out.push(BackupEvent::Archive { tablespace: None });
                        } else {
                            // The archive is named `<oid>.tar`; the OID is all we need from it.
                            let name = String::from_utf8_lossy(_archive_name.unwrap_or_default()).into_owned();
                            let oid = name.split('.').next().and_then(|o| o.parse().ok()).ok_or_else(|| {
                                protocol(format!("BASE_BACKUP: tablespace archive name {name:?} has no OID"))
                            })?;
                            out.push(BackupEvent::Archive { tablespace: Some((oid, location)) });
                        }
                    }
                    b'd' => out.push(BackupEvent::Data(d)),
                    b'p' => {
                        if d.len() < 8 {
                            return Err(protocol("BASE_BACKUP: short progress message"));
                        }
                        out.push(BackupEvent::Progress(d.get_u64()));
                    }
                    b'm' => out.push(BackupEvent::Manifest),
                    other => return Err(protocol(format!("BASE_BACKUP: unknown CopyData type {:?}", other as char))),
                }
            }
            BackendMessage::CopyDone => self.in_copy = false,
            BackendMessage::ReadyForQuery => self.done = true,
            _ => {}
        }
        Ok(out)
    }
}

#[cfg(test)]
mod backup_tests {
    use super::*;

    fn row(values: &[&str]) -> BackendMessage {
        BackendMessage::DataRow(values.iter().map(|v| Some(Bytes::copy_from_slice(v.as_bytes()))).collect())
    }

    fn copy(kind: u8, payload: &[u8]) -> BackendMessage {
        let mut b = vec![kind];
        b.extend_from_slice(payload);
        BackendMessage::CopyData(Bytes::from(b))
    }

    fn columns(n: &[&str]) -> BackendMessage {
        BackendMessage::RowDescription { columns: n.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn new_format_sequence() {
        let mut d = BaseBackupDecoder::new(170000);
        let mut events = Vec::new();
        for m in [
            columns(&["recptr", "tli"]),
            row(&["0/2000028", "1"]),
            BackendMessage::CommandComplete("SELECT".into()),
            columns(&["spcoid", "spclocation", "size"]),
            row(&["16390", "/srv/ts1", "1"]),
            BackendMessage::DataRow(vec![None, None, Some(Bytes::from_static(b"2"))]),
            BackendMessage::CommandComplete("SELECT".into()),
            BackendMessage::CopyOutResponse,
            copy(b'n', b"base.tar\0\0"),
            copy(b'd', b"tarbytes"),
            copy(b'p', &42u64.to_be_bytes()),
            copy(b'n', b"16390.tar\0/srv/ts1\0"),
            copy(b'd', b"more"),
            copy(b'm', b""),
            copy(b'd', b"{manifest}"),
            BackendMessage::CopyDone,
            columns(&["recptr", "tli"]),
            row(&["0/2000100", "1"]),
            BackendMessage::CommandComplete("SELECT".into()),
            BackendMessage::CommandComplete("BASE_BACKUP".into()),
            BackendMessage::ReadyForQuery,
        ] {
            events.extend(d.on_message(m).unwrap());
        }
        assert!(d.is_done());
        assert_eq!(
            events,
            vec![
                BackupEvent::Start { lsn: 0x2000028, timeline: 1 },
                BackupEvent::Estimate(3 * 1024),
                BackupEvent::Archive { tablespace: None },
                BackupEvent::Data(Bytes::from_static(b"tarbytes")),
                BackupEvent::Progress(42),
                BackupEvent::Archive { tablespace: Some((16390, "/srv/ts1".into())) },
                BackupEvent::Data(Bytes::from_static(b"more")),
                BackupEvent::Manifest,
                BackupEvent::Data(Bytes::from_static(b"{manifest}")),
                BackupEvent::End { lsn: 0x2000100, timeline: 1 },
            ]
        );
    }

    #[test]
    fn old_format_sequence() {
        let mut d = BaseBackupDecoder::new(140000);
        let mut events = Vec::new();
        let null_row = BackendMessage::DataRow(vec![None, None, Some(Bytes::from_static(b"100"))]);
        for m in [
            columns(&["recptr", "tli"]),
            row(&["0/3000028", "2"]),
            BackendMessage::CommandComplete("SELECT".into()),
            columns(&["spcoid", "spclocation", "size"]),
            row(&["16390", "/srv/ts1", "10"]),
            null_row,
            BackendMessage::CommandComplete("SELECT".into()),
            BackendMessage::CopyOutResponse,
            BackendMessage::CopyData(Bytes::from_static(b"ts")),
            BackendMessage::CopyDone,
            BackendMessage::CopyOutResponse,
            BackendMessage::CopyData(Bytes::from_static(b"base")),
            BackendMessage::CopyDone,
            BackendMessage::CopyOutResponse,
            BackendMessage::CopyData(Bytes::from_static(b"{m}")),
            BackendMessage::CopyDone,
            columns(&["recptr", "tli"]),
            row(&["0/3000100", "2"]),
            BackendMessage::CommandComplete("SELECT".into()),
            BackendMessage::ReadyForQuery,
        ] {
            events.extend(d.on_message(m).unwrap());
        }
        assert_eq!(
            events,
            vec![
                BackupEvent::Start { lsn: 0x3000028, timeline: 2 },
                BackupEvent::Estimate(110 * 1024),
                BackupEvent::Archive { tablespace: Some((16390, "/srv/ts1".into())) },
                BackupEvent::Data(Bytes::from_static(b"ts")),
                BackupEvent::Archive { tablespace: None },
                BackupEvent::Data(Bytes::from_static(b"base")),
                BackupEvent::Manifest,
                BackupEvent::Data(Bytes::from_static(b"{m}")),
                BackupEvent::End { lsn: 0x3000100, timeline: 2 },
            ]
        );
    }
}
