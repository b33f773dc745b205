//! Key-encryption keys (KEKs) and the wrapping of per-object data keys.
//!
//! A key file holds one or more KEKs, one per line: `pitr-key-v1 <id> <64 hex digits>`. The last
//! line is the active key (used for new objects); earlier lines stay so that old objects remain
//! readable after a rotation. The file must not be readable by group or others.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

const LINE_TAG: &str = "pitr-key-v1";
/// Length of a wrapped data key: 32 key bytes + 16 tag bytes.
pub const WRAPPED_KEY_LEN: usize = 48;

/// An object's data key in the clear: wiped from memory when dropped, so a core dump or a later
/// reuse of the heap does not hand it out.
pub type DataKey = Zeroizing<[u8; 32]>;

/// A fresh random data key.
pub(crate) fn fresh_data_key() -> DataKey {
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut *key);
    key
}

/// Why the key file could not be read or created, or an object's data key could not be
/// unwrapped with the key ring.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, creating or writing the key file failed (also: the path is a directory).
    #[error("key file {path}: {cause}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying I/O error.
        cause: std::io::Error,
    },
    /// The key file's mode gives group or others some access: it is refused rather than used,
    /// since whoever reads it can open every object of the repository.
    #[error("key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits (`& 0o777`).
        mode: u32,
    },
    /// A line that is neither blank, a `#` comment nor a valid `pitr-key-v1 <id> <64 hex digits>`
    /// line, or a key id used twice.
    #[error("key file {path}, line {line}: {what}")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// The offending line, counted from 1.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
    /// The key file holds no key line at all (only blanks and comments).
    #[error("key file {path} holds no key")]
    Empty {
        /// The key file.
        path: PathBuf,
    },
    /// [`KeyRing::create`] found a file at the path; an existing key file is never overwritten.
    #[error("key file {path} already exists")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The object's header names a key id that is not in the key ring: typically another
    /// repository's object, or a key file missing an older (rotated-out) key.
    #[error("object {object} is sealed with key id {key_id:?}, which is not in the key file {path}: wrong key file for this repository?")]
    UnknownKey {
        /// The object being opened.
        object: String,
        /// The key id its header names.
        key_id: String,
        /// The key file searched.
        path: PathBuf,
    },
    /// The data-key wrap failed to authenticate: the key under that id is a different key, or the
    /// object was modified or renamed (its name is bound into the wrap).
    #[error("data key of object {object} does not unwrap with key {key_id:?} from {path}: wrong key, or the object was tampered with")]
    Unwrap {
        /// The object being opened.
        object: String,
        /// The key id its header names.
        key_id: String,
        /// The key file the key came from.
        path: PathBuf,
    },
}

/// One key-encryption key. Debug never prints the key material, and the key is wiped from memory
/// when the last copy is dropped.
#[derive(Clone)]
pub struct Kek {
    /// The key's id from the key file (1–64 of `[A-Za-z0-9_-]`), recorded in the header of every
    /// object it wraps a data key for, so a reader knows which key to unwrap with.
    pub id: String,
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish_non_exhaustive()
    }
}

/// The key ring: every KEK of the key file, in file order. The last one is active (wraps the data
/// keys of new objects); the earlier ones keep objects sealed before a rotation readable. Always
/// holds at least one key.
#[derive(Clone, Debug)]
pub struct KeyRing {
    path: PathBuf,
    keys: Vec<Kek>,
}

impl KeyRing {
    /// Reads a key file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<KeyRing, KeyError> {
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
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<KeyRing, KeyError> {
        let mut keys = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad =
                |what: &str| KeyError::Malformed { path: path.to_path_buf(), line: i + 1, what: what.to_string() };
            let mut parts = line.split_whitespace();
            if parts.next() != Some(LINE_TAG) {
                return Err(bad("expected `pitr-key-v1 <id> <64 hex digits>`"));
            }
            let id = parts.next().ok_or_else(|| bad("missing key id"))?;
            if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') || id.len() > 64 {
                return Err(bad("key id must be 1-64 characters of [A-Za-z0-9_-]"));
            }
            let hex_key = parts.next().ok_or_else(|| bad("missing key material"))?;
            if parts.next().is_some() {
                return Err(bad("trailing text after the key"));
            }
            let mut key = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(hex_key, &mut *key).map_err(|_| bad("key must be 64 hex digits (32 bytes)"))?;
            if keys.iter().any(|k: &Kek| k.id == id) {
                return Err(bad("duplicate key id"));
            }
            keys.push(Kek { id: id.to_string(), key });
        }
        if keys.is_empty() {
            return Err(KeyError::Empty { path: path.to_path_buf() });
        }
        Ok(KeyRing { path: path.to_path_buf(), keys })
    }

    /// Creates a new key file with one fresh random key, mode 0600, never overwriting. The file
    /// and its directory are fsynced before this returns: a key that objects get sealed with must
    /// survive a power loss, or the archive written with it is lost with it.
    pub fn create(path: &Path) -> Result<KeyRing, KeyError> {
        let io = |cause| KeyError::Io { path: path.to_path_buf(), cause };
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut *key);
        let mut id_bytes = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut id_bytes);
        let id = format!("k{}", hex::encode(id_bytes));
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists { path: path.to_path_buf() }
                } else {
                    io(e)
                }
            })?;
        let key_hex = Zeroizing::new(hex::encode(*key));
        let text = Zeroizing::new(format!(
            "# pitr key file: the last line is the active key. Losing it loses the archive.\n{LINE_TAG} {id} {}\n",
            key_hex.as_str()
        ));
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        sync_parent_dir(path).map_err(io)?;
        Ok(KeyRing { path: path.to_path_buf(), keys: vec![Kek { id, key }] })
    }

    /// A key ring held only in memory (tests, benchmarks).
    pub fn from_key(id: &str, key: [u8; 32]) -> KeyRing {
        KeyRing { path: PathBuf::from("<memory>"), keys: vec![Kek { id: id.to_string(), key: Zeroizing::new(key) }] }
    }

    /// The key file this ring was read from (`<memory>` for [`KeyRing::from_key`]), for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The active key: the key file's last key, which wraps the data keys of new objects.
    pub fn active(&self) -> &Kek {
        // `parse` and the constructors guarantee at least one key.
        &self.keys[self.keys.len() - 1]
    }

    fn find(&self, object: &str, key_id: &str) -> Result<&Kek, KeyError> {
        self.keys.iter().find(|k| k.id == key_id).ok_or_else(|| KeyError::UnknownKey {
            object: object.to_string(),
            key_id: key_id.to_string(),
            path: self.path.clone(),
        })
    }

    /// Wraps a data key with the active KEK, bound to the object name.
    pub(crate) fn wrap(&self, object: &str, data_key: &[u8; 32]) -> (String, [u8; 12], [u8; WRAPPED_KEY_LEN]) {
        let kek = self.active();
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher = Aes256Gcm::new((&*kek.key).into());
        let aad = wrap_aad(object);
        let wrapped = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: data_key, aad: &aad })
            .expect("AES-GCM encryption of 32 bytes cannot fail");
        let mut out = [0u8; WRAPPED_KEY_LEN];
        out.copy_from_slice(&wrapped);
        (kek.id.clone(), nonce, out)
    }

    pub(crate) fn unwrap(
        &self,
        object: &str,
        key_id: &str,
        nonce: &[u8; 12],
        wrapped: &[u8; WRAPPED_KEY_LEN],
    ) -> Result<DataKey, KeyError> {
        let kek = self.find(object, key_id)?;
        let cipher = Aes256Gcm::new((&*kek.key).into());
        let aad = wrap_aad(object);
        let plain = Zeroizing::new(
            cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: wrapped, aad: &aad }).map_err(|_| {
                KeyError::Unwrap { object: object.to_string(), key_id: key_id.to_string(), path: self.path.clone() }
            })?,
        );
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&plain);
        Ok(key)
    }
}

/// fsyncs the directory holding `path`, so that the new entry itself is durable.
fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

fn wrap_aad(object: &str) -> Vec<u8> {
    let mut aad = b"pitr-data-key\0".to_vec();
    aad.extend_from_slice(object.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let created = KeyRing::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = KeyRing::load(&path).unwrap();
        assert_eq!(created.active().id, loaded.active().id);
        assert!(matches!(KeyRing::create(&path), Err(KeyError::Exists { .. })));
    }

    #[test]
    fn refuses_group_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        KeyRing::create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = KeyRing::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn malformed_lines_are_named() {
        let p = Path::new("/k");
        let e = KeyRing::parse(p, "pitr-key-v1 a zz\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = KeyRing::parse(p, "# only a comment\n").unwrap_err();
        assert!(matches!(e, KeyError::Empty { .. }));
        let good = format!("{LINE_TAG} a {}\n{LINE_TAG} b {}\n", "00".repeat(32), "11".repeat(32));
        let ring = KeyRing::parse(p, &good).unwrap();
        assert_eq!(ring.active().id, "b");
        assert!(!format!("{ring:?}").contains("1111"));
    }

    #[test]
    fn wrap_binds_object_name_and_key() {
        let ring = KeyRing::from_key("a", [7; 32]);
        let dk = [9u8; 32];
        let (id, nonce, wrapped) = ring.wrap("obj", &dk);
        assert_eq!(*ring.unwrap("obj", &id, &nonce, &wrapped).unwrap(), dk);
        assert!(ring.unwrap("other", &id, &nonce, &wrapped).is_err());
        let other = KeyRing::from_key("a", [8; 32]);
        assert!(matches!(other.unwrap("obj", &id, &nonce, &wrapped), Err(KeyError::Unwrap { .. })));
    }
}
