//! A TCP proxy on loopback that a test controls, between pitr and a real server: it passes bytes
//! through, and while faults are on it breaks every k-th connection — either mid-request (after
//! some bytes from the client: an upload cut half-way) or by swallowing the server's reply (the
//! request landed, the client never hears so). It also counts requests in flight at once: a
//! connection is busy from the client's first bytes until the server's first reply bytes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    /// Connections cut while the client was still sending.
    pub cut_requests: AtomicU64,
    /// Connections whose reply from the server was dropped.
    pub swallowed_replies: AtomicU64,
    in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

#[derive(Debug, Default)]
struct Faults {
    on: AtomicBool,
    every: AtomicU64,
}

pub struct FaultyProxy {
    pub port: u16,
    pub stats: Arc<ProxyStats>,
    faults: Arc<Faults>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultyProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Result<FaultyProxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("proxy runtime")?;
        // Bound here with std, so that a test may start the proxy from inside its own runtime.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let stats = Arc::new(ProxyStats::default());
        let faults = Arc::new(Faults::default());
        let (s, f) = (stats.clone(), faults.clone());
        runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else { return };
            let upstream: SocketAddr = ([127, 0, 0, 1], upstream).into();
            while let Ok((client, _)) = listener.accept().await {
                let n = s.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let every = f.every.load(Ordering::SeqCst);
                let doomed = f.on.load(Ordering::SeqCst) && every > 0 && n % every == 0;
                tokio::spawn(serve(client, upstream, n, doomed, s.clone()));
            }
        });
        Ok(FaultyProxy { port, stats, faults, runtime: Some(runtime) })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on break every `every`-th new connection (0 or `off()` for none).
    pub fn break_every(&self, every: u64) {
        self.faults.every.store(every, Ordering::SeqCst);
        self.faults.on.store(every > 0, Ordering::SeqCst);
    }

    pub fn off(&self) {
        self.faults.on.store(false, Ordering::SeqCst);
    }

    pub fn broken(&self) -> u64 {
        self.stats.cut_requests.load(Ordering::SeqCst) + self.stats.swallowed_replies.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// One connection's request state: busy while a request is on its way and no reply has started.
struct Busy<'a> {
    stats: &'a ProxyStats,
    busy: AtomicBool,
}

impl Busy<'_> {
    fn request_bytes(&self) {
        if !self.busy.swap(true, Ordering::SeqCst) {
            let now = self.stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
        }
    }

    fn reply_bytes(&self) {
        if self.busy.swap(false, Ordering::SeqCst) {
            self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.reply_bytes();
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, n: u64, doomed: bool, stats: Arc<ProxyStats>) {
    let busy = Busy { stats: &stats, busy: AtomicBool::new(false) };
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    // Odd doomed connections lose the request part-way (somewhere in the first ~30 kB: headers
    // or body); even ones deliver the request and lose the reply.
    let cut_request_after = (doomed && n % 2 == 1).then(|| 200 + (n * 7919) % 30_000);
    let swallow_reply = doomed && n % 2 == 0;
    let upload = async {
        let mut sent = 0u64;
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let got = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(got) => got,
            };
            busy.request_bytes();
            let take = match cut_request_after {
                Some(limit) if sent + got as u64 >= limit => (limit - sent) as usize,
                _ => got,
            };
            if server_wr.write_all(&buf[..take]).await.is_err() {
                break;
            }
            sent += take as u64;
            if take < got {
                stats.cut_requests.fetch_add(1, Ordering::SeqCst);
                return true;
            }
        }
        let _ = server_wr.shutdown().await;
        false
    };
    let download = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let got = match server_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(got) => got,
            };
            busy.reply_bytes();
            if swallow_reply {
                stats.swallowed_replies.fetch_add(1, Ordering::SeqCst);
                return true;
            }
            if client_wr.write_all(&buf[..got]).await.is_err() {
                break;
            }
        }
        let _ = client_wr.shutdown().await;
        false
    };
    // Whichever direction breaks the connection ends both halves (dropping them closes both
    // sockets); otherwise wait until both directions are done.
    tokio::pin!(upload, download);
    tokio::select! {
        cut = &mut upload => if !cut { download.await; },
        cut = &mut download => if !cut { upload.await; },
    }
}
