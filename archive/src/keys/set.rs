//! Wrapping the per-object data keys: the sync, in-memory half of the key ring that
//! [`crate::seal`] uses. A [`KeySet`] holds the wrapping keys at hand (repository keys, or for
//! objects written before repository keys existed, master keys) and which one wraps new data keys.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

use super::KeyError;

/// Length of a wrapped data key: 32 key bytes + 16 tag bytes.
pub const WRAPPED_KEY_LEN: usize = 48;

/// An object's data key in the clear: wiped from memory when dropped, so a core dump or a later
/// reuse of the heap does not hand it out.
pub type DataKey = Zeroizing<[u8; 32]>;

/// A fresh random data key, from this thread's CSPRNG (ChaCha12, seeded from the operating
/// system's generator, reseeded after every 64 KiB it gives and after a fork): asking the kernel
/// directly costs a system call per key, and every WAL chunk (each synchronous commit's put) is
/// sealed under a key of its own.
pub(crate) fn fresh_data_key() -> DataKey {
    let mut key = Zeroizing::new([0u8; 32]);
    rand::thread_rng().fill_bytes(&mut *key);
    key
}

/// A key that wraps data keys, under the id object headers name it by. Debug never prints the key
/// material, and the key is wiped from memory when the last copy is dropped.
#[derive(Clone)]
pub struct WrappingKey {
    /// The id recorded in the header of every object whose data key it wraps (1–64 of
    /// `[A-Za-z0-9_-]`).
    pub id: String,
    /// Where it came from, for messages (`repository key r… (keys/wraps/r…/k…)`, `key file …`).
    pub origin: String,
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for WrappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappingKey").field("id", &self.id).field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl WrappingKey {
    /// The key `material` under `id`.
    pub fn new(id: impl Into<String>, origin: impl Into<String>, material: Zeroizing<[u8; 32]>) -> WrappingKey {
        WrappingKey { id: id.into(), origin: origin.into(), key: material }
    }

    /// The key bytes, for wrapping this key itself under a master key.
    pub(crate) fn material(&self) -> &Zeroizing<[u8; 32]> {
        &self.key
    }
}

/// Wrapping keys at hand: the last one wraps new data keys, every one unwraps. Always holds at
/// least one key.
#[derive(Clone, Debug)]
pub struct KeySet {
    keys: Vec<WrappingKey>,
}

impl KeySet {
    /// A set of one key, which also wraps new data keys.
    pub fn single(key: WrappingKey) -> KeySet {
        KeySet { keys: vec![key] }
    }

    /// A set of one key held only in memory (tests, benchmarks).
    pub fn from_key(id: &str, key: [u8; 32]) -> KeySet {
        KeySet::single(WrappingKey::new(id, "<memory>", Zeroizing::new(key)))
    }

    /// The key that wraps new data keys.
    pub fn active(&self) -> &WrappingKey {
        // Every constructor puts one key in.
        &self.keys[self.keys.len() - 1]
    }

    fn find(&self, object: &str, key_id: &str) -> Result<&WrappingKey, KeyError> {
        self.keys.iter().find(|k| k.id == key_id).ok_or_else(|| KeyError::UnknownKey {
            object: object.to_string(),
            key_id: key_id.to_string(),
            searched: format!(
                "is not among the keys at hand ({})",
                self.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// Wraps a data key with the active key, bound to the object name.
    pub(crate) fn wrap(&self, object: &str, data_key: &[u8; 32]) -> (String, [u8; 12], [u8; WRAPPED_KEY_LEN]) {
        let key = self.active();
        let mut nonce = [0u8; 12];
        // From the thread's CSPRNG, as the data key (see `fresh_data_key`).
        rand::thread_rng().fill_bytes(&mut nonce);
        let cipher = Aes256Gcm::new((&*key.key).into());
        let aad = wrap_aad(object);
        let wrapped = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: data_key, aad: &aad })
            .expect("AES-GCM encryption of 32 bytes cannot fail");
        let mut out = [0u8; WRAPPED_KEY_LEN];
        out.copy_from_slice(&wrapped);
        (key.id.clone(), nonce, out)
    }

    pub(crate) fn unwrap(
        &self,
        object: &str,
        key_id: &str,
        nonce: &[u8; 12],
        wrapped: &[u8; WRAPPED_KEY_LEN],
    ) -> Result<DataKey, KeyError> {
        let key = self.find(object, key_id)?;
        let cipher = Aes256Gcm::new((&*key.key).into());
        let aad = wrap_aad(object);
        let plain =
            Zeroizing::new(cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: wrapped, aad: &aad }).map_err(
                |_| KeyError::Unwrap {
                    what: format!("data key of object {object}"),
                    key_id: key_id.to_string(),
                    origin: key.origin.clone(),
                },
            )?);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&plain);
        Ok(out)
    }
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
    fn wrap_binds_object_name_and_key() {
        let set = KeySet::from_key("a", [7; 32]);
        let dk = [9u8; 32];
        let (id, nonce, wrapped) = set.wrap("obj", &dk);
        assert_eq!(*set.unwrap("obj", &id, &nonce, &wrapped).unwrap(), dk);
        assert!(set.unwrap("other", &id, &nonce, &wrapped).is_err());
        let other = KeySet::from_key("a", [8; 32]);
        assert!(matches!(other.unwrap("obj", &id, &nonce, &wrapped), Err(KeyError::Unwrap { .. })));
        assert!(!format!("{other:?}").contains("8, 8"));
    }
}
