//! Asking a server where its WAL ends, on a short-lived replication connection of its own: what
//! `pitr status` compares the archive's end with. IDENTIFY_SYSTEM answers on any replication
//! connection without a slot or a stream, so the probe holds nothing on the server.

use std::time::Duration;

use crate::{ConnInfo, ConnectOptions, Connection, PgError};

/// Why the server's WAL end is unknown.
#[derive(Debug, thiserror::Error)]
pub enum PositionError {
    /// No connection within the time allowed (a server that accepts nothing must not hang the
    /// caller).
    #[error("timed out connecting")]
    Timeout,
    /// The connection or IDENTIFY_SYSTEM failed.
    #[error(transparent)]
    Postgres(#[from] PgError),
}

/// The server's current WAL end (IDENTIFY_SYSTEM's `xlogpos`), connecting as `application_name`
/// (unless `info` sets one) within `connect_timeout`.
pub async fn server_wal_end(
    info: &ConnInfo,
    application_name: &str,
    connect_timeout: Duration,
) -> Result<u64, PositionError> {
    let opts = ConnectOptions { replication: true, application_name: application_name.to_string() };
    let mut conn = tokio::time::timeout(connect_timeout, Connection::connect(info, &opts))
        .await
        .map_err(|_| PositionError::Timeout)??;
    let ident = conn.identify_system().await?;
    conn.close().await;
    Ok(ident.xlog_pos)
}
