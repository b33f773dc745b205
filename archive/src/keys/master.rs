//! Master keys (key-encryption keys) and the sources they come from: a 0600 key file, an
//! environment variable, a command (a secret manager's CLI) and AWS KMS. Master keys wrap
//! repository keys ([`super::record`]) and, in repositories written before repository keys
//! existed, objects' data keys directly. None of them is ever stored in the repository.
//!
//! Key file, variable and command all hold the same text: one key per line,
//! `pitr-key-v1 <id> <64 hex digits> [created=<RFC 3339>]`, blank lines and `#` comments allowed.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::Digest;
use zeroize::Zeroizing;

use super::kms::{KmsClient, KmsOptions};
use super::KeyError;

const LINE_TAG: &str = "pitr-key-v1";
/// How long `key_command` may take before it is killed.
pub const KEY_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The most `key_command` may print: a key line is under 200 bytes.
const KEY_COMMAND_OUTPUT_MAX: usize = 64 << 10;

/// Where a master key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasterSource {
    /// `[encryption] key_file`.
    KeyFile(PathBuf),
    /// `[encryption] key_env`: the variable's name.
    Env(String),
    /// `[encryption] key_command`: the program (its arguments are not shown: they may hold tokens).
    Command(String),
    /// `[encryption] kms_key_id`.
    Kms {
        /// The key id, alias or ARN as configured.
        key_id: String,
        /// The KMS endpoint.
        endpoint: String,
    },
    /// Held only in memory (tests, benchmarks).
    Memory,
}

impl fmt::Display for MasterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterSource::KeyFile(p) => write!(f, "key file {}", p.display()),
            MasterSource::Env(v) => write!(f, "key_env {v}"),
            MasterSource::Command(c) => write!(f, "key_command {c}"),
            MasterSource::Kms { key_id, endpoint } => write!(f, "KMS key {key_id} at {endpoint}"),
            MasterSource::Memory => f.write_str("<memory>"),
        }
    }
}

impl MasterSource {
    /// A short name of the kind of source, for `keys list`.
    pub fn kind(&self) -> &'static str {
        match self {
            MasterSource::KeyFile(_) => "key_file",
            MasterSource::Env(_) => "key_env",
            MasterSource::Command(_) => "key_command",
            MasterSource::Kms { .. } => "kms",
            MasterSource::Memory => "memory",
        }
    }
}

#[derive(Clone)]
enum Material {
    Local(Zeroizing<[u8; 32]>),
    Kms(KmsClient),
}

/// One master key. Debug never prints key material; local material is wiped when dropped.
#[derive(Clone)]
pub struct MasterKey {
    /// The key's id (1–64 of `[A-Za-z0-9_-]`): recorded in the names of the wraps it makes.
    pub id: String,
    /// Where it comes from.
    pub source: MasterSource,
    /// When it was made, if its source says (`created=` on its line).
    pub created_us: Option<i64>,
    material: Material,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").field("id", &self.id).field("source", &self.source).finish_non_exhaustive()
    }
}

/// How a repository key is wrapped under a master key, as the wrap record stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wrapped {
    /// AES-256-GCM under a local master key.
    Aes {
        /// The 12-byte nonce.
        nonce: [u8; 12],
        /// Key and tag, 48 bytes.
        ciphertext: Vec<u8>,
    },
    /// A KMS ciphertext blob.
    Kms {
        /// The KMS key as configured when it was wrapped.
        kms_key_id: String,
        /// The blob.
        ciphertext: Vec<u8>,
    },
}

fn wrap_aad(repository_key: &str, master_key: &str, created_us: i64) -> Vec<u8> {
    format!("pitr-repository-key\0{repository_key}\0{master_key}\0{created_us}").into_bytes()
}

fn kms_context(repository_key: &str, created_us: i64) -> [(&'static str, String); 2] {
    [("pitr-repository-key", repository_key.to_string()), ("pitr-created-us", created_us.to_string())]
}

impl MasterKey {
    /// A master key held only in memory (tests, benchmarks).
    pub fn in_memory(id: &str, key: [u8; 32]) -> MasterKey {
        MasterKey {
            id: id.into(),
            source: MasterSource::Memory,
            created_us: None,
            material: Material::Local(Zeroizing::new(key)),
        }
    }

    /// The KMS key `opts` names, under the id `kms-<12 hex of sha256(key id as configured)>`.
    pub fn kms(client: KmsClient) -> MasterKey {
        let id = kms_master_id(client.key_id());
        let source = MasterSource::Kms { key_id: client.key_id().to_string(), endpoint: client.endpoint() };
        MasterKey { id, source, created_us: None, material: Material::Kms(client) }
    }

    /// This key as a wrapping key of data keys, for objects written before repository keys
    /// existed (whose headers name the master key). `None` for a KMS key, whose material never
    /// leaves KMS.
    pub fn as_wrapping_key(&self) -> Option<super::WrappingKey> {
        match &self.material {
            Material::Local(k) => Some(super::WrappingKey::new(&self.id, self.source.to_string(), k.clone())),
            Material::Kms(_) => None,
        }
    }

    /// A new repository key wrapped under this master key: its material and its wrap. A KMS key
    /// has KMS make the material (`GenerateDataKey`).
    pub async fn generate(
        &self,
        repository_key: &str,
        created_us: i64,
    ) -> Result<(Zeroizing<[u8; 32]>, Wrapped), KeyError> {
        match &self.material {
            Material::Local(_) => {
                let mut material = Zeroizing::new([0u8; 32]);
                rand::rngs::OsRng.fill_bytes(&mut *material);
                let wrapped = self.wrap(repository_key, created_us, &material).await?;
                Ok((material, wrapped))
            }
            Material::Kms(client) => {
                let context = kms_context(repository_key, created_us);
                let context: Vec<(&str, &str)> = context.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let (material, blob) = client
                    .generate_data_key(&context)
                    .await
                    .map_err(|e| KeyError::access("generate", self.source.to_string(), "generate", e))?;
                Ok((material, Wrapped::Kms { kms_key_id: client.key_id().to_string(), ciphertext: blob }))
            }
        }
    }

    /// Wraps the repository key `material` (id `repository_key`, made at `created_us`).
    pub async fn wrap(&self, repository_key: &str, created_us: i64, material: &[u8; 32]) -> Result<Wrapped, KeyError> {
        match &self.material {
            Material::Local(kek) => {
                let mut nonce = [0u8; 12];
                rand::rngs::OsRng.fill_bytes(&mut nonce);
                let cipher = Aes256Gcm::new((&**kek).into());
                let aad = wrap_aad(repository_key, &self.id, created_us);
                let ciphertext = cipher
                    .encrypt(Nonce::from_slice(&nonce), Payload { msg: material, aad: &aad })
                    .expect("AES-GCM encryption of 32 bytes cannot fail");
                Ok(Wrapped::Aes { nonce, ciphertext })
            }
            Material::Kms(client) => {
                let context = kms_context(repository_key, created_us);
                let context: Vec<(&str, &str)> = context.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let blob = client
                    .encrypt(material, &context)
                    .await
                    .map_err(|e| KeyError::access("encrypt", self.source.to_string(), "encrypt", e))?;
                Ok(Wrapped::Kms { kms_key_id: client.key_id().to_string(), ciphertext: blob })
            }
        }
    }

    /// Unwraps a repository key's wrap made by this master key. `record` names the wrap record for
    /// messages. A wrap that does not authenticate is [`KeyError::Unwrap`]; KMS unreachable or
    /// refusing is [`KeyError::Access`] (KMS says InvalidCiphertext for a tampered blob: that is
    /// an Unwrap too).
    pub async fn unwrap(
        &self,
        record: &str,
        repository_key: &str,
        created_us: i64,
        wrapped: &Wrapped,
    ) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let unwrap_error = || KeyError::Unwrap {
            what: format!("repository key {repository_key} in {record}"),
            key_id: self.id.clone(),
            origin: self.source.to_string(),
        };
        match (&self.material, wrapped) {
            (Material::Local(kek), Wrapped::Aes { nonce, ciphertext }) => {
                let cipher = Aes256Gcm::new((&**kek).into());
                let aad = wrap_aad(repository_key, &self.id, created_us);
                let plain = Zeroizing::new(
                    cipher
                        .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
                        .map_err(|_| unwrap_error())?,
                );
                if plain.len() != 32 {
                    return Err(unwrap_error());
                }
                let mut out = Zeroizing::new([0u8; 32]);
                out.copy_from_slice(&plain);
                Ok(out)
            }
            (Material::Kms(client), Wrapped::Kms { ciphertext, .. }) => {
                let context = kms_context(repository_key, created_us);
                let context: Vec<(&str, &str)> = context.iter().map(|(k, v)| (*k, v.as_str())).collect();
                match client.decrypt(ciphertext, &context).await {
                    Ok(material) => Ok(material),
                    // The blob itself is wrong (tampered, another key's, malformed): a bad record,
                    // not KMS failing.
                    Err(super::kms::KmsError::Refused { code, .. })
                        if code == "InvalidCiphertextException"
                            || code == "IncorrectKeyException"
                            || code == "ValidationException" =>
                    {
                        Err(unwrap_error())
                    }
                    Err(super::kms::KmsError::Invalid { .. }) => Err(unwrap_error()),
                    Err(e) => Err(KeyError::access("decrypt", self.source.to_string(), "decrypt", e)),
                }
            }
            _ => Err(KeyError::BadRecord {
                name: record.to_string(),
                what: format!("its method does not match master key {} ({})", self.id, self.source),
            }),
        }
    }
}

/// The pitr id of a KMS master key: a hash of the key id as configured, since an alias or ARN does
/// not fit the id alphabet.
pub fn kms_master_id(kms_key_id: &str) -> String {
    let digest = sha2::Sha256::digest(kms_key_id.as_bytes());
    format!("kms-{}", &hex::encode(digest)[..12])
}

/// Every configured master key, and which one wraps new repository keys.
#[derive(Clone, Debug)]
pub struct MasterKeys {
    keys: Vec<MasterKey>,
    active: usize,
}

impl MasterKeys {
    /// Only `key`, active (tests, benchmarks).
    pub fn single(key: MasterKey) -> MasterKeys {
        MasterKeys { keys: vec![key], active: 0 }
    }

    /// These keys and `key`, which becomes the active one (tests).
    pub fn with(mut self, key: MasterKey) -> MasterKeys {
        self.keys.push(key);
        self.active = self.keys.len() - 1;
        self
    }

    /// The key that wraps new repository keys.
    pub fn active(&self) -> &MasterKey {
        &self.keys[self.active]
    }

    /// Every master key, in source order (key file, key_env, key_command, KMS).
    pub fn all(&self) -> &[MasterKey] {
        &self.keys
    }

    /// The master key `id`, if configured.
    pub fn get(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// The configured key sources (`[encryption]`).
#[derive(Clone, Debug, Default)]
pub struct KeySources {
    /// `key_file`.
    pub key_file: Option<PathBuf>,
    /// `key_env`: the name of the variable.
    pub key_env: Option<String>,
    /// `key_command`: program and arguments (no shell).
    pub key_command: Option<Vec<String>>,
    /// `kms_key_id` and its endpoint/region.
    pub kms: Option<KmsOptions>,
    /// `active_key`: the master key id that wraps new repository keys.
    pub active_key: Option<String>,
    /// `key_cache_ttl`: how long unwrapped repository keys are kept.
    pub cache_ttl: Duration,
}

impl KeySources {
    /// Sources of only a key file (tests, `init` on a default config).
    pub fn key_file(path: &Path) -> KeySources {
        KeySources { key_file: Some(path.to_path_buf()), cache_ttl: DEFAULT_CACHE_TTL, ..Default::default() }
    }

    /// Reads every source (running `key_command`; no network: a KMS key is only a client here).
    /// The active key is `active_key`, else the KMS key, else the last key of `key_command`,
    /// `key_env`, `key_file` (the first of those that is configured).
    pub fn load(&self) -> Result<MasterKeys, KeyError> {
        let mut keys: Vec<MasterKey> = Vec::new();
        let mut default_active = None;
        let add = |new: Vec<MasterKey>, keys: &mut Vec<MasterKey>| -> Result<(), KeyError> {
            for k in new {
                if let Some(other) = keys.iter().find(|o| o.id == k.id) {
                    return Err(KeyError::Refused(format!(
                        "master key id {} is in both {} and {}: ids must be unique across sources",
                        k.id, other.source, k.source
                    )));
                }
                keys.push(k);
            }
            Ok(())
        };
        if let Some(path) = &self.key_file {
            add(load_key_file(path)?, &mut keys)?;
            default_active = Some(keys.len() - 1);
        }
        if let Some(var) = &self.key_env {
            let source = MasterSource::Env(var.clone());
            // Not `VarError`'s text: for a value that is not UTF-8 it quotes the value, keys and all.
            let text = Zeroizing::new(std::env::var(var).map_err(|e| {
                let why = match e {
                    std::env::VarError::NotPresent => "is not set",
                    std::env::VarError::NotUnicode(_) => "is not valid UTF-8",
                };
                KeyError::access("key-env", source.to_string(), "read", format!("environment variable {var} {why}"))
            })?);
            add(parse_keys(&source, &text)?, &mut keys)?;
            default_active = Some(keys.len() - 1);
        }
        if let Some(argv) = &self.key_command {
            let source = MasterSource::Command(argv.first().cloned().unwrap_or_default());
            let text = run_key_command(&source, argv)?;
            add(parse_keys(&source, &text)?, &mut keys)?;
            default_active = Some(keys.len() - 1);
        }
        if let Some(opts) = &self.kms {
            let client =
                KmsClient::new(opts).map_err(|e| KeyError::Refused(format!("[encryption] kms_key_id: {e}")))?;
            add(vec![MasterKey::kms(client)], &mut keys)?;
            default_active = Some(keys.len() - 1);
        }
        let active = match &self.active_key {
            Some(id) => keys.iter().position(|k| &k.id == id).ok_or_else(|| {
                KeyError::Refused(format!(
                    "[encryption] active_key {id:?} is not among the configured master keys ({})",
                    keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?,
            None => default_active.ok_or_else(|| {
                KeyError::Refused(
                    "[encryption] configures no key source: set key_file, key_env, key_command or kms_key_id".into(),
                )
            })?,
        };
        Ok(MasterKeys { keys, active })
    }
}

/// How long unwrapped repository keys stay in memory unless configured.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);

/// Reads a key file, refusing one that group or others can read.
pub fn load_key_file(path: &Path) -> Result<Vec<MasterKey>, KeyError> {
    let io = |cause| KeyError::Io { path: path.to_path_buf(), cause };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return Err(io(std::io::Error::other("is a directory, not a key file")));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen { path: path.to_path_buf(), mode });
    }
    // The file's text holds every key in hex: wiped once parsed.
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
    parse_keys(&MasterSource::KeyFile(path.to_path_buf()), &text)
}

/// Parses key lines from `source`.
pub fn parse_keys(source: &MasterSource, text: &str) -> Result<Vec<MasterKey>, KeyError> {
    let mut keys: Vec<MasterKey> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| KeyError::Malformed { origin: source.to_string(), line: i + 1, what: what.to_string() };
        let mut parts = line.split_whitespace();
        if parts.next() != Some(LINE_TAG) {
            return Err(bad("expected `pitr-key-v1 <id> <64 hex digits> [created=<time>]`"));
        }
        let id = parts.next().ok_or_else(|| bad("missing key id"))?;
        if !valid_id(id) {
            return Err(bad("key id must be 1-64 characters of [A-Za-z0-9_-]"));
        }
        let hex_key = parts.next().ok_or_else(|| bad("missing key material"))?;
        let mut created_us = None;
        if let Some(extra) = parts.next() {
            let time = extra.strip_prefix("created=").ok_or_else(|| bad("trailing text after the key"))?;
            created_us = Some(
                crate::time::parse_time(time).ok_or_else(|| bad(&format!("created={time}: not an RFC 3339 time")))?,
            );
        }
        if parts.next().is_some() {
            return Err(bad("trailing text after the key"));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_key, &mut *key).map_err(|_| bad("key must be 64 hex digits (32 bytes)"))?;
        if keys.iter().any(|k| k.id == id) {
            return Err(bad("duplicate key id"));
        }
        keys.push(MasterKey { id: id.to_string(), source: source.clone(), created_us, material: Material::Local(key) });
    }
    if keys.is_empty() {
        return Err(KeyError::Empty { origin: source.to_string() });
    }
    Ok(keys)
}

/// Whether `id` is a valid key id: 1–64 of `[A-Za-z0-9_-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Runs `key_command` (no shell) and returns what it printed. A non-zero exit, a timeout or too
/// much output is an access error naming the program and what it printed on stderr. The command
/// runs in a process group of its own, killed whole on timeout, so that a helper it leaves behind
/// holding the pipes cannot hang pitr either.
fn run_key_command(source: &MasterSource, argv: &[String]) -> Result<Zeroizing<String>, KeyError> {
    run_key_command_within(source, argv, KEY_COMMAND_TIMEOUT)
}

fn run_key_command_within(
    source: &MasterSource,
    argv: &[String],
    timeout: Duration,
) -> Result<Zeroizing<String>, KeyError> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;

    let fail = |cause: String| KeyError::access("key-command", source.to_string(), "run", cause);
    let (program, args) =
        argv.split_first().ok_or_else(|| KeyError::Refused("[encryption] key_command is empty".into()))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("could not start it: {e}")))?;
    let group = child.id() as i32;
    let kill_group = || {
        // SAFETY: kill(2) with a negative pid signals the process group we made; no memory is involved.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    };
    let mut stdout = child.stdout.take().ok_or_else(|| fail("no stdout".into()))?;
    let mut stderr = child.stderr.take().ok_or_else(|| fail("no stderr".into()))?;
    // Both pipes are read to their end on threads (past the caps too, discarding), so that a
    // chatty command never blocks on a full pipe; the results come back on channels that are
    // waited on with the deadline.
    let (out_tx, out_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Zeroizing::new(Vec::new());
        let mut buf = Zeroizing::new([0u8; 8192]);
        let mut too_much = false;
        loop {
            match stdout.read(&mut buf[..]) {
                Ok(0) | Err(_) => break,
                Ok(n) if kept.len() + n <= KEY_COMMAND_OUTPUT_MAX => kept.extend_from_slice(&buf[..n]),
                Ok(_) => too_much = true,
            }
        }
        let _ = out_tx.send((kept, too_much));
    });
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) if kept.len() < 4096 => kept.extend_from_slice(&buf[..n.min(4096 - kept.len())]),
                Ok(_) => {}
            }
        }
        let _ = err_tx.send(kept);
    });
    let deadline = Instant::now() + timeout;
    let timed_out = |child: &mut std::process::Child| {
        kill_group();
        let _ = child.wait();
        fail(format!("did not finish within {} s; killed", timeout.as_secs_f64()))
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => return Err(timed_out(&mut child)),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                kill_group();
                let _ = child.wait();
                return Err(fail(format!("waiting for it: {e}")));
            }
        }
    };
    let left = |d: Instant| d.saturating_duration_since(Instant::now());
    let Ok((out, too_much)) = out_rx.recv_timeout(left(deadline)) else {
        kill_group();
        return Err(fail("exited, but something it started keeps its output open; killed its process group".into()));
    };
    let err = err_rx.recv_timeout(left(deadline).max(Duration::from_millis(100))).unwrap_or_default();
    if !status.success() {
        return Err(fail(format!("exited with {status}: {}", String::from_utf8_lossy(&err).trim())));
    }
    if too_much {
        return Err(fail(format!("printed more than {KEY_COMMAND_OUTPUT_MAX} bytes")));
    }
    let text = String::from_utf8(out.to_vec()).map_err(|_| fail("printed something that is not UTF-8".into()))?;
    Ok(Zeroizing::new(text))
}

fn key_line(id: &str, key: &[u8; 32], created_us: i64) -> Zeroizing<String> {
    let key_hex = Zeroizing::new(hex::encode(key));
    Zeroizing::new(format!(
        "{LINE_TAG} {id} {} created={}\n",
        key_hex.as_str(),
        crate::time::format_rfc3339_seconds(created_us)
    ))
}

fn fresh_master_id() -> String {
    let mut id_bytes = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut id_bytes);
    format!("k{}", hex::encode(id_bytes))
}

/// Creates a new key file with one fresh random key, mode 0600, never overwriting. The file and
/// its directory are fsynced before this returns: a key that objects get sealed with must survive
/// a power loss, or the archive written with it is lost with it.
pub fn create_key_file(path: &Path) -> Result<MasterKey, KeyError> {
    let io = |cause| KeyError::Io { path: path.to_path_buf(), cause };
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut *key);
    let id = fresh_master_id();
    let created_us = crate::now_us();
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists { path: path.to_path_buf() }
        } else {
            io(e)
        }
    })?;
    let mut text = Zeroizing::new(String::from(
        "# pitr key file: master keys; the last line is the active one. Losing it loses the archive.\n",
    ));
    text.push_str(&key_line(&id, &key, created_us));
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    sync_parent_dir(path).map_err(io)?;
    Ok(MasterKey {
        id,
        source: MasterSource::KeyFile(path.to_path_buf()),
        created_us: Some(created_us),
        material: Material::Local(key),
    })
}

/// Appends a fresh master key to the key file, which makes it the file's active key: the file is
/// rewritten whole to a temporary file (0600, fsynced) renamed over it, so a crash leaves the old
/// file or the new one, never half a line.
pub fn append_to_key_file(path: &Path) -> Result<MasterKey, KeyError> {
    let io = |cause| KeyError::Io { path: path.to_path_buf(), cause };
    let _lock = lock_key_file(path)?;
    let existing = load_key_file(path)?;
    let old = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut *key);
    let mut id = fresh_master_id();
    while existing.iter().any(|k| k.id == id) {
        id = fresh_master_id();
    }
    let created_us = crate::now_us();
    let mut text = Zeroizing::new(old.to_string());
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&key_line(&id, &key, created_us));
    replace_file(path, &text)?;
    Ok(MasterKey {
        id,
        source: MasterSource::KeyFile(path.to_path_buf()),
        created_us: Some(created_us),
        material: Material::Local(key),
    })
}

/// Removes the line of key `id` from the key file (as [`append_to_key_file`] rewrites it).
/// `Ok(false)`: no such line. Refuses to remove the file's last key.
pub fn remove_from_key_file(path: &Path, id: &str) -> Result<bool, KeyError> {
    let io = |cause| KeyError::Io { path: path.to_path_buf(), cause };
    let _lock = lock_key_file(path)?;
    let keys = load_key_file(path)?;
    if !keys.iter().any(|k| k.id == id) {
        return Ok(false);
    }
    if keys.len() == 1 {
        return Err(KeyError::Refused(format!("key {id} is the only key in key file {}", path.display())));
    }
    let old = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
    let mut text = Zeroizing::new(String::new());
    for line in old.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() == Some(LINE_TAG) && parts.next() == Some(id) {
            continue;
        }
        text.push_str(line);
        text.push('\n');
    }
    replace_file(path, &text)?;
    Ok(true)
}

/// An exclusive lock on `<key file>.lock` for one read-modify-rename of the key file: two
/// `keys rotate`/`retire` at once would otherwise each drop the other's change (and with a new
/// master key, whatever it already wraps). Released when dropped (the file is closed).
fn lock_key_file(path: &Path) -> Result<std::fs::File, KeyError> {
    use std::os::fd::AsRawFd;
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let io = |cause| KeyError::Io { path: lock_path.clone(), cause };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io)?;
    // SAFETY: flock(2) on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    remove_stale_temporaries(path);
    Ok(file)
}

/// Removes `<key file>.tmp.*` left by a crash between writing and renaming: each holds every
/// key. Only called under the lock, so no live rewrite's temporary is taken.
fn remove_stale_temporaries(path: &Path) {
    let (Some(dir), Some(file_name)) = (path.parent(), path.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let mut prefix = file_name.to_owned();
    prefix.push(".tmp.");
    let prefix = prefix.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn replace_file(path: &Path, text: &str) -> Result<(), KeyError> {
    let io = |cause| KeyError::Io { path: path.to_path_buf(), cause };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        // The new file keeps the old one's owner: a key file of the server user's sidecar that
        // root rotates must stay readable by that user (it is 0600).
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path)?);
        let group = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(path)?);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        std::os::unix::fs::fchown(&file, Some(owner), Some(group))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_parent_dir(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// fsyncs the directory holding `path`, so that the new entry itself is durable.
fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_append_remove_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let first = create_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(create_key_file(&path), Err(KeyError::Exists { .. })));
        let second = append_to_key_file(&path).unwrap();
        let keys = KeySources::key_file(&path).load().unwrap();
        assert_eq!(keys.all().len(), 2);
        assert_eq!(keys.active().id, second.id);
        assert!(keys.active().created_us.is_some());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(remove_from_key_file(&path, &first.id).unwrap());
        assert!(!remove_from_key_file(&path, &first.id).unwrap());
        assert!(remove_from_key_file(&path, &second.id).is_err(), "the last key stays");
        let keys = KeySources::key_file(&path).load().unwrap();
        assert_eq!(keys.all().iter().map(|k| k.id.clone()).collect::<Vec<_>>(), vec![second.id]);
    }

    #[test]
    fn refuses_group_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        create_key_file(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = KeySources::key_file(&path).load().unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn malformed_lines_are_named() {
        let src = MasterSource::KeyFile("/k".into());
        let e = parse_keys(&src, "pitr-key-v1 a zz\n").err().unwrap();
        assert!(e.to_string().contains("key file /k, line 1"), "{e}");
        let e = parse_keys(&src, "# only a comment\n").err().unwrap();
        assert!(matches!(e, KeyError::Empty { .. }));
        let e = parse_keys(&src, &format!("{LINE_TAG} a {} made=yesterday\n", "00".repeat(32))).err().unwrap();
        assert!(e.to_string().contains("trailing text"), "{e}");
        let good = format!(
            "{LINE_TAG} a {}\n{LINE_TAG} b {} created=2026-01-02T03:04:05Z\n",
            "00".repeat(32),
            "11".repeat(32)
        );
        let keys = parse_keys(&src, &good).unwrap();
        assert_eq!(keys[1].id, "b");
        assert!(keys[1].created_us.is_some());
        assert!(!format!("{keys:?}").contains("1111"));
    }

    #[test]
    fn env_and_command_sources() {
        let line = format!("{LINE_TAG} e1 {}\n", "22".repeat(32));
        let var = "PITR_TEST_MASTER_KEY_ENV_SOURCE";
        std::env::set_var(var, &line);
        let keys = KeySources { key_env: Some(var.into()), ..Default::default() }.load().unwrap();
        assert_eq!(keys.active().id, "e1");
        assert_eq!(keys.active().source.kind(), "key_env");
        let cmd = KeySources { key_command: Some(vec!["/bin/echo".into(), line.trim().into()]), ..Default::default() };
        assert_eq!(cmd.load().unwrap().active().id, "e1");
        let failing = KeySources {
            key_command: Some(vec!["/bin/sh".into(), "-c".into(), "echo vault sealed >&2; exit 3".into()]),
            ..Default::default()
        };
        let e = failing.load().unwrap_err();
        assert!(e.is_access() && e.to_string().contains("vault sealed"), "{e}");
        let both = KeySources { key_env: Some(var.into()), key_command: cmd.key_command.clone(), ..Default::default() };
        assert!(both.load().unwrap_err().to_string().contains("unique"));
        let none = KeySources::default().load().unwrap_err();
        assert!(none.to_string().contains("no key source"), "{none}");
    }

    #[test]
    fn key_command_that_hangs_or_leaves_a_helper_holding_its_output_is_killed() {
        let src = MasterSource::Command("/bin/sh".into());
        let sh = |script: &str| vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
        let started = Instant::now();
        let e = run_key_command_within(&src, &sh("sleep 30"), Duration::from_millis(500)).unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
        let e = run_key_command_within(&src, &sh("echo x; sleep 30 &"), Duration::from_millis(500)).unwrap_err();
        assert!(e.to_string().contains("keeps its output open"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        // Noisy stderr past the cap does not block it.
        let out =
            run_key_command_within(&src, &sh("head -c 200000 /dev/zero >&2; echo ok"), Duration::from_secs(5)).unwrap();
        assert_eq!(out.trim(), "ok");
    }

    #[test]
    fn key_file_edits_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        create_key_file(&path).unwrap();
        std::fs::write(dir.path().join("key.tmp.999"), "stale").unwrap();
        append_to_key_file(&path).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains(".tmp.")), "{names:?}");
    }

    #[tokio::test]
    async fn local_wrap_binds_ids_and_time() {
        let kek = MasterKey::in_memory("k1", [5; 32]);
        let (material, wrapped) = kek.generate("r1", 10).await.unwrap();
        assert_eq!(*kek.unwrap("rec", "r1", 10, &wrapped).await.unwrap(), *material);
        assert!(matches!(kek.unwrap("rec", "r2", 10, &wrapped).await, Err(KeyError::Unwrap { .. })));
        assert!(matches!(kek.unwrap("rec", "r1", 11, &wrapped).await, Err(KeyError::Unwrap { .. })));
        let other = MasterKey::in_memory("k1", [6; 32]);
        assert!(matches!(other.unwrap("rec", "r1", 10, &wrapped).await, Err(KeyError::Unwrap { .. })));
    }
}
