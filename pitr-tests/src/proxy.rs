//! Two proxies on loopback that tests put between pitr and a real server.
//!
//! [`HeaderStrippingProxy`] reads each HTTP/1.1 request and drops one header from it (an
//! S3-compatible endpoint that ignores `If-None-Match`, as some do, made from one that honours it).
//!
//! [`FaultyProxy`]: a TCP proxy on loopback that a test controls, between pitr and a real server: it passes bytes
//! through, and while faults are on it breaks the connection of every k-th request — either
//! mid-request (after some bytes from the client: an upload cut half-way) or by swallowing the
//! server's reply (the request landed, the client never hears so). It also counts requests in
//! flight at once: one is in flight from the client's first bytes to the server's first reply bytes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    /// Connections cut while the client was still sending.
    pub cut_requests: AtomicU64,
    /// Connections whose reply from the server was dropped.
    pub swallowed_replies: AtomicU64,
    /// Requests answered by the proxy in the server's place ([`FaultyProxy::answer_next`]).
    pub answered: AtomicU64,
    in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

#[derive(Debug, Default)]
struct Faults {
    on: AtomicBool,
    every: AtomicU64,
    /// One request to lose the reply of: its request line contains all of these.
    swallow_next: std::sync::Mutex<Option<Vec<String>>>,
    /// One request to answer in the server's place (it never reaches the server), and the reply.
    answer_next: std::sync::Mutex<Option<(Vec<String>, Vec<u8>)>>,
}

/// Whether the first line of `first` (a request's first bytes) contains all of `parts`.
fn line_has(first: &[u8], parts: &[String]) -> bool {
    let head = String::from_utf8_lossy(first);
    let line = head.split("\r\n").next().unwrap_or("");
    parts.iter().all(|p| line.contains(p.as_str()))
}

/// Whether `request` holds a whole request: its head and `Content-Length` bytes of body.
fn whole_request(request: &[u8]) -> bool {
    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&request[..end]);
    let length = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    request.len() >= end + 4 + length
}

pub struct FaultyProxy {
    pub port: u16,
    pub stats: Arc<ProxyStats>,
    faults: Arc<Faults>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// A proxy's own runtime (`workers` threads) and a loopback listener on a free port, bound here
/// with std so that a test may start a proxy from inside its own runtime.
fn proxy_runtime(workers: usize) -> Result<(tokio::runtime::Runtime, std::net::TcpListener, u16)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("proxy runtime")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    Ok((runtime, listener, port))
}

impl FaultyProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Result<FaultyProxy> {
        let (runtime, listener, port) = proxy_runtime(2)?;
        let stats = Arc::new(ProxyStats::default());
        let faults = Arc::new(Faults::default());
        let (s, f) = (stats.clone(), faults.clone());
        runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else { return };
            let upstream: SocketAddr = ([127, 0, 0, 1], upstream).into();
            while let Ok((client, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(client, upstream, f.clone(), s.clone()));
            }
        });
        Ok(FaultyProxy { port, stats, faults, runtime: Some(runtime) })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on break every `every`-th request (0 or `off()` for none).
    pub fn break_every(&self, every: u64) {
        self.faults.every.store(every, Ordering::SeqCst);
        self.faults.on.store(every > 0, Ordering::SeqCst);
    }

    pub fn off(&self) {
        self.faults.on.store(false, Ordering::SeqCst);
    }

    /// Lose the reply of the next request whose request line (`PUT /a/c/k?comp=blocklist
    /// HTTP/1.1`) contains every one of `line_has` (once; the request itself is delivered whole).
    pub fn swallow_reply_of_next(&self, line_has: &[&str]) {
        let mut next = self.faults.swallow_next.lock().unwrap_or_else(|e| e.into_inner());
        *next = Some(line_has.iter().map(|p| p.to_string()).collect());
    }

    /// Answer the next request whose request line contains every one of `line_has` (and that
    /// is not the one [`FaultyProxy::swallow_reply_of_next`] picks) with `status` (`404 Not
    /// Found`) and the XML `body`, in the server's place; the connection is closed after it.
    pub fn answer_next(&self, line_has: &[&str], status: &str, body: &str) {
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut next = self.faults.answer_next.lock().unwrap_or_else(|e| e.into_inner());
        *next = Some((line_has.iter().map(|p| p.to_string()).collect(), reply.into_bytes()));
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

/// One connection's request state: busy while a request is on its way and no reply has started
/// (HTTP/1.1 clients do not pipeline, so client bytes after a reply start the next request).
struct Exchange<'a> {
    stats: &'a ProxyStats,
    faults: &'a Faults,
    busy: AtomicBool,
    /// Bytes of the current request forwarded so far, and where to cut it.
    sent: AtomicU64,
    cut_at: AtomicU64,
    swallow_reply: AtomicBool,
    /// The reply to give instead of the server's (set for the request [`FaultyProxy::answer_next`] picked).
    answer: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Exchange<'_> {
    fn request_bytes(&self, first: &[u8]) {
        if self.busy.swap(true, Ordering::SeqCst) {
            return;
        }
        let swallowed = {
            let mut next = self.faults.swallow_next.lock().unwrap_or_else(|e| e.into_inner());
            let hit = next.as_ref().is_some_and(|parts| line_has(first, parts));
            if hit {
                *next = None;
                self.swallow_reply.store(true, Ordering::SeqCst);
            }
            hit
        };
        if !swallowed {
            let mut next = self.faults.answer_next.lock().unwrap_or_else(|e| e.into_inner());
            if next.as_ref().is_some_and(|(parts, _)| line_has(first, parts)) {
                *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = next.take().map(|(_, reply)| reply);
            }
        }
        let now = self.stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let r = self.stats.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let every = self.faults.every.load(Ordering::SeqCst);
        self.sent.store(0, Ordering::SeqCst);
        self.cut_at.store(u64::MAX, Ordering::SeqCst);
        if self.faults.on.load(Ordering::SeqCst) && r.checked_rem(every) == Some(0) {
            // Doomed requests take turns: one is cut part-way (within its first few kB: headers
            // or body), the next is delivered whole and loses its reply.
            let turn = r / every;
            if turn % 2 == 1 {
                self.cut_at.store(100 + (turn * 7919) % 4000, Ordering::SeqCst);
            } else {
                self.swallow_reply.store(true, Ordering::SeqCst);
            }
        }
    }

    /// How many of `got` new request bytes to forward (fewer: cut here).
    fn forward(&self, got: usize) -> usize {
        let sent = self.sent.load(Ordering::SeqCst);
        let take = (self.cut_at.load(Ordering::SeqCst).saturating_sub(sent)).min(got as u64) as usize;
        self.sent.store(sent + take as u64, Ordering::SeqCst);
        take
    }

    fn reply_bytes(&self) {
        if self.busy.swap(false, Ordering::SeqCst) {
            self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        self.reply_bytes();
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, faults: Arc<Faults>, stats: Arc<ProxyStats>) {
    let exchange = Exchange {
        stats: &stats,
        faults: &faults,
        busy: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        cut_at: AtomicU64::new(u64::MAX),
        swallow_reply: AtomicBool::new(false),
        answer: std::sync::Mutex::new(None),
    };
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut client_rd, client_wr) = client.into_split();
    // Written by the reply half, and by the request half when it answers in the server's place.
    let client_wr = tokio::sync::Mutex::new(client_wr);
    let (mut server_rd, mut server_wr) = server.into_split();
    let upload = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let got = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(got) => got,
            };
            exchange.request_bytes(&buf[..got]);
            let answer = exchange.answer.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(reply) = answer {
                // Read the whole request first: a socket closed with unread bytes is reset, and
                // the client might never read the reply.
                let mut request = buf[..got].to_vec();
                while !whole_request(&request) {
                    match client_rd.read(&mut buf).await {
                        Ok(0) | Err(_) => return true,
                        Ok(more) => request.extend_from_slice(&buf[..more]),
                    }
                }
                // Counted before the reply goes out: the client may act on it (and the test
                // read the count) before this task runs again.
                stats.answered.fetch_add(1, Ordering::SeqCst);
                let mut client = client_wr.lock().await;
                let _ = client.write_all(&reply).await;
                let _ = client.shutdown().await;
                return true;
            }
            let take = exchange.forward(got);
            if server_wr.write_all(&buf[..take]).await.is_err() {
                break;
            }
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
            exchange.reply_bytes();
            if exchange.swallow_reply.load(Ordering::SeqCst) {
                stats.swallowed_replies.fetch_add(1, Ordering::SeqCst);
                return true;
            }
            if client_wr.lock().await.write_all(&buf[..got]).await.is_err() {
                break;
            }
        }
        let _ = client_wr.lock().await.shutdown().await;
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

/// An HTTP/1.1 proxy on loopback that removes every header named `strip` (any case) from the
/// requests it forwards to `127.0.0.1:upstream`, and passes everything else through unchanged.
/// Requests are parsed one after the other on each connection (clients do not pipeline):
/// head up to the blank line, then `Content-Length` bytes of body (a chunked body is refused,
/// so a test never passes on a request it did not see). Replies are copied as they come.
pub struct HeaderStrippingProxy {
    pub port: u16,
    /// Requests forwarded, and how many of them had the header removed.
    pub requests: Arc<AtomicU64>,
    pub stripped: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HeaderStrippingProxy {
    pub fn start(upstream: u16, strip: &str) -> Result<HeaderStrippingProxy> {
        HeaderStrippingProxy::start_for(upstream, strip, &[])
    }

    /// Strips the header only from requests whose request line (`POST /b/k?uploadId=… HTTP/1.1`)
    /// contains every one of `line_has`: a server that honours it on some requests only.
    pub fn start_for(upstream: u16, strip: &str, line_has: &[&str]) -> Result<HeaderStrippingProxy> {
        let (runtime, listener, port) = proxy_runtime(1)?;
        let (requests, stripped) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (r, s, strip) = (requests.clone(), stripped.clone(), strip.to_ascii_lowercase());
        let line_has: Arc<Vec<String>> = Arc::new(line_has.iter().map(|p| p.to_string()).collect());
        runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else { return };
            let upstream: SocketAddr = ([127, 0, 0, 1], upstream).into();
            while let Ok((client, _)) = listener.accept().await {
                let only = line_has.clone();
                tokio::spawn(strip_requests(client, upstream, strip.clone(), only, r.clone(), s.clone()));
            }
        });
        Ok(HeaderStrippingProxy { port, requests, stripped, runtime: Some(runtime) })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for HeaderStrippingProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn strip_requests(
    client: TcpStream,
    upstream: SocketAddr,
    strip: String,
    line_has: Arc<Vec<String>>,
    requests: Arc<AtomicU64>,
    stripped: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let upload = async {
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            // One request head.
            let head_end = loop {
                if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match client_rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(got) => pending.extend_from_slice(&buf[..got]),
                }
            };
            let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
            pending.drain(..head_end);
            let mut body_len = 0usize;
            let mut kept = String::new();
            let mut removed = false;
            let request_line = head.split("\r\n").next().unwrap_or("");
            let applies = line_has.iter().all(|part| request_line.contains(part.as_str()));
            for line in head.split("\r\n").filter(|l| !l.is_empty()) {
                let name = line.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
                if name == strip && applies {
                    removed = true;
                    continue;
                }
                if name == "content-length" {
                    body_len = line.split_once(':').and_then(|(_, v)| v.trim().parse().ok()).unwrap_or(0);
                }
                if name == "transfer-encoding" {
                    // Not expected from pitr's client; refuse rather than forward half-understood.
                    return;
                }
                kept.push_str(line);
                kept.push_str("\r\n");
            }
            kept.push_str("\r\n");
            requests.fetch_add(1, Ordering::SeqCst);
            if removed {
                stripped.fetch_add(1, Ordering::SeqCst);
            }
            if server_wr.write_all(kept.as_bytes()).await.is_err() {
                return;
            }
            // Its body.
            let mut left = body_len;
            while left > 0 {
                if pending.is_empty() {
                    match client_rd.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(got) => pending.extend_from_slice(&buf[..got]),
                    }
                }
                let take = left.min(pending.len());
                if server_wr.write_all(&pending[..take]).await.is_err() {
                    return;
                }
                pending.drain(..take);
                left -= take;
            }
        }
    };
    let download = async {
        let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
    };
    tokio::pin!(upload, download);
    tokio::select! {
        _ = &mut upload => {}
        _ = &mut download => {}
    }
}
