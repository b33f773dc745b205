//! Azurite, Microsoft's Azure Storage emulator (npm `azurite`), as a blob server on loopback for
//! the Azure backend's tests: installed with npm on first use (into `PITR_AZURITE_DIR`, default
//! `/opt/pitr-azurite`, unless `azurite-blob` is on PATH), started on a free port with a data
//! directory of its own, so that it can be stopped and started again with the same blobs. It
//! checks Shared Key signatures of the well-known development account.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use hmac::{Hmac, Mac};

use crate::{env_nonempty, flock_exclusive, free_port, http_request, scratch_dir, spawn_logged, wait_until, Child};
use crate::{lossy, HttpReply};

/// The npm package version the harness installs (`.ci/run` installs the same).
pub const AZURITE_VERSION: &str = "3.37.0";

/// Azurite's development storage account and its published key (the same in every Azurite).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The REST API version of the requests made here.
const API_VERSION: &str = "2023-11-03";

fn install_root() -> PathBuf {
    env_nonempty("PITR_AZURITE_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/pitr-azurite"))
}

/// `azurite-blob`: on PATH, else installed under [`install_root`] (once, under a lock shared by
/// test processes).
fn azurite_blob() -> Result<PathBuf> {
    let root = install_root();
    let installed = root.join("node_modules").join(".bin").join("azurite-blob");
    let find = || crate::on_path("azurite-blob");
    if let Some(bin) = find() {
        return Ok(bin);
    }
    fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let _lock = flock_exclusive(&root.join(".install.lock"))?;
    if installed.is_file() {
        return Ok(installed);
    }
    let npm = env_nonempty("PITR_NPM").unwrap_or_else(|| "npm".into());
    let spec = format!("azurite@{AZURITE_VERSION}");
    let out = Command::new(&npm)
        .args(["install", "--no-save", "--no-package-lock", "--no-audit", "--no-fund", "--prefix"])
        .arg(&root)
        .arg(&spec)
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{npm} install {spec}`"))?;
    if !out.status.success() {
        bail!("`{npm} install {spec}` into {} failed: {}", root.display(), lossy(&out.stderr));
    }
    if !installed.is_file() {
        bail!("`{npm} install {spec}` succeeded but {} does not exist", installed.display());
    }
    Ok(installed)
}

/// An Azurite blob service. Stopped when dropped.
pub struct Azurite {
    pub port: u16,
    process: Option<Child>,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Azurite {
    /// Starts it with `containers` created.
    pub fn start(containers: &[&str]) -> Result<Azurite> {
        let mut server =
            Azurite { port: free_port()?, process: None, bin: azurite_blob()?, dir: scratch_dir("azurite") };
        server.start_again()?;
        for c in containers {
            server.create_container(c)?;
        }
        Ok(server)
    }

    /// The blob service URL of the development account (path style: the account is the first
    /// path segment), for `[repository] endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// Where it keeps its blobs and their metadata.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops it (SIGTERM, waited for): connections are refused until [`Azurite::start_again`].
    /// Not SIGKILL: Azurite saves its metadata database only every 5 s and on shutdown, so a
    /// killed Azurite forgets blobs it acknowledged (real Azure does not), which would show up as
    /// a gap that is the emulator's and not pitr's.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.signal(libc::SIGTERM)?;
            if p.wait_timeout(Duration::from_secs(30))?.is_none() {
                bail!("azurite-blob did not stop within 30 s of SIGTERM");
            }
        }
        Ok(())
    }

    /// Starts it (again) on the same port, with the same data.
    pub fn start_again(&mut self) -> Result<()> {
        let data = self.data_dir();
        fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &self.port.to_string(), "--location"])
            .arg(&data)
            // No telemetry from tests; the client's API version may be newer than this Azurite's.
            .args(["--disableTelemetry", "--skipApiVersionCheck", "--silent"]);
        let mut process = spawn_logged(cmd, &self.dir.path().join("azurite.log"))?;
        let port = self.port;
        wait_until("azurite-blob to listen", Duration::from_secs(60), || {
            if let Some(status) = process.try_wait()? {
                bail!("azurite-blob exited ({status}) before listening: {}", self.log());
            }
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        })?;
        self.process = Some(process);
        Ok(())
    }

    /// Its log (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("azurite.log")).unwrap_or_default()
    }

    /// Creates a container.
    pub fn create_container(&self, name: &str) -> Result<()> {
        let reply = self.request("PUT", &format!("/{name}"), &[("restype", "container")], &[], b"")?;
        if reply.status != 201 {
            bail!("creating container {name}: HTTP {} {}", reply.status, reply.text());
        }
        Ok(())
    }

    /// The names of the committed blobs in `container` (test checks that go around pitr).
    pub fn list_blobs(&self, container: &str) -> Result<Vec<String>> {
        let query = [("restype", "container"), ("comp", "list")];
        let reply = self.request("GET", &format!("/{container}"), &query, &[], b"")?;
        if reply.status != 200 {
            bail!("listing container {container}: HTTP {} {}", reply.status, reply.text());
        }
        let text = reply.text();
        Ok(text.split("<Name>").skip(1).filter_map(|n| n.split("</Name>").next()).map(str::to_string).collect())
    }

    /// One request to the blob service at `path` (`/container[/blob]`, without the account) with
    /// `query` and `headers` (`x-ms-*` ones only, which are signed), signed with the development
    /// account's key (Shared Key).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpReply> {
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        let mut ms_headers = vec![("x-ms-date", date.as_str()), ("x-ms-version", API_VERSION)];
        for (name, value) in headers {
            if !name.starts_with("x-ms-") {
                bail!("header {name}: only x-ms- headers are signed here");
            }
            ms_headers.push((name, value));
        }
        ms_headers.sort();
        let full_path = format!("/{ACCOUNT}{path}");
        let signature = shared_key_signature(method, &full_path, query, &ms_headers, body.len())?;
        let authorization = format!("SharedKey {ACCOUNT}:{signature}");
        let mut all = ms_headers;
        all.push(("Authorization", authorization.as_str()));
        let query_string: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let target = if query.is_empty() { full_path } else { format!("{full_path}?{}", query_string.join("&")) };
        http_request(self.port, method, &target, &all, body)
    }
}

/// The Shared Key signature of a request whose only headers besides Content-Length are the
/// sorted, lowercase `x-ms-*` ones in `ms_headers` (query values must need no escaping).
fn shared_key_signature(
    method: &str,
    full_path: &str,
    query: &[(&str, &str)],
    ms_headers: &[(&str, &str)],
    content_length: usize,
) -> Result<String> {
    let length = if content_length == 0 { String::new() } else { content_length.to_string() };
    // Verb, then Content-Encoding, -Language, -Length, -MD5, -Type, Date, If-Modified-Since,
    // If-Match, If-None-Match, If-Unmodified-Since, Range; then the x-ms- headers; the resource.
    let mut to_sign = format!("{method}\n\n\n{length}\n\n\n\n\n\n\n\n\n");
    for (name, value) in ms_headers {
        to_sign += &format!("{name}:{value}\n");
    }
    to_sign += &format!("/{ACCOUNT}{full_path}");
    let mut sorted: Vec<&(&str, &str)> = query.iter().collect();
    sorted.sort();
    for (k, v) in sorted {
        to_sign += &format!("\n{}:{v}", k.to_ascii_lowercase());
    }
    let key = base64::engine::general_purpose::STANDARD.decode(ACCOUNT_KEY).context("the account key")?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).context("HMAC key")?;
    mac.update(to_sign.as_bytes());
    Ok(base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

impl Drop for Azurite {
    fn drop(&mut self) {
        // The guard kills it if a graceful stop fails.
        let _ = self.stop();
    }
}
