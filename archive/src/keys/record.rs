//! The key records under `keys/`: plain JSON, since what matters in them is authenticated by the
//! wrap itself (AES-GCM associated data, or KMS's encryption context).
//!
//! ```text
//! keys/wraps/<repository key id>/<master key id>   a repository key wrapped by a master key
//! keys/retired/<master key id>                      a master key retired by `pitr keys retire`
//! ```

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::master::{valid_id, Wrapped};
use super::KeyError;

/// Prefix of every key record.
pub const KEYS: &str = "keys/";
/// Prefix of the wrap records.
pub const WRAPS: &str = "keys/wraps/";
/// Prefix of the retirement records.
pub const RETIRED: &str = "keys/retired/";
/// The most a key record may take: a KMS blob is under 1 KiB.
pub const RECORD_MAX: u64 = 64 << 10;

const WRAP_FORMAT: &str = "pitr-wrapped-key-v1";
const RETIRED_FORMAT: &str = "pitr-retired-key-v1";

/// The name of the wrap of `repository_key` under `master_key`.
pub fn wrap_name(repository_key: &str, master_key: &str) -> String {
    format!("{WRAPS}{repository_key}/{master_key}")
}

/// `(repository key, master key)` of a wrap record's name; `None` for any other name.
pub fn parse_wrap_name(name: &str) -> Option<(&str, &str)> {
    let (rk, mk) = name.strip_prefix(WRAPS)?.split_once('/')?;
    (valid_id(rk) && valid_id(mk)).then_some((rk, mk))
}

/// The name of the retirement record of `master_key`.
pub fn retired_name(master_key: &str) -> String {
    format!("{RETIRED}{master_key}")
}

/// The master key a retirement record's name names.
pub fn parse_retired_name(name: &str) -> Option<&str> {
    let id = name.strip_prefix(RETIRED)?;
    valid_id(id).then_some(id)
}

/// A repository key wrapped by a master key, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrapRecord {
    /// The repository key's id.
    pub repository_key: String,
    /// The master key that wrapped it.
    pub master_key: String,
    /// When the repository key was made (µs): bound into the wrap; the newest one wrapped by the
    /// active master key seals new objects.
    pub created_us: i64,
    /// The wrap.
    pub wrapped: Wrapped,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WrapJson {
    format: String,
    repository_key: String,
    master_key: String,
    created_us: i64,
    method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kms_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
    ciphertext: String,
}

impl WrapRecord {
    /// The record's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let (method, kms_key_id, nonce, ciphertext) = match &self.wrapped {
            Wrapped::Aes { nonce, ciphertext } => {
                ("aes-256-gcm", None, Some(hex::encode(nonce)), b64.encode(ciphertext))
            }
            Wrapped::Kms { kms_key_id, ciphertext } => {
                ("aws-kms", Some(kms_key_id.clone()), None, b64.encode(ciphertext))
            }
        };
        let json = WrapJson {
            format: WRAP_FORMAT.into(),
            repository_key: self.repository_key.clone(),
            master_key: self.master_key.clone(),
            created_us: self.created_us,
            method: method.into(),
            kms_key_id,
            nonce,
            ciphertext,
        };
        let mut out = serde_json::to_vec_pretty(&json).expect("a wrap record serialises");
        out.push(b'\n');
        out
    }

    /// Parses the record stored under `name`, which must be the name its ids give.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<WrapRecord, KeyError> {
        let bad = |what: String| KeyError::BadRecord { name: name.to_string(), what };
        let json: WrapJson = serde_json::from_slice(bytes).map_err(|e| bad(format!("not a wrap record: {e}")))?;
        if json.format != WRAP_FORMAT {
            return Err(bad(format!("format {:?}, expected {WRAP_FORMAT}", json.format)));
        }
        if wrap_name(&json.repository_key, &json.master_key) != name {
            return Err(bad(format!(
                "it says repository key {} under master key {}, which is not its name",
                json.repository_key, json.master_key
            )));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let ciphertext = b64.decode(&json.ciphertext).map_err(|e| bad(format!("ciphertext: {e}")))?;
        let wrapped = match (json.method.as_str(), json.nonce, json.kms_key_id) {
            ("aes-256-gcm", Some(nonce_hex), None) => {
                let mut nonce = [0u8; 12];
                hex::decode_to_slice(&nonce_hex, &mut nonce).map_err(|_| bad("nonce is not 24 hex digits".into()))?;
                if ciphertext.len() != 48 {
                    return Err(bad(format!("ciphertext of {} bytes, expected 48", ciphertext.len())));
                }
                Wrapped::Aes { nonce, ciphertext }
            }
            ("aws-kms", None, Some(kms_key_id)) => {
                // KMS takes blobs of 1–6144 bytes; anything else is not one of its blobs.
                if ciphertext.is_empty() || ciphertext.len() > 6144 {
                    return Err(bad(format!("KMS ciphertext of {} bytes", ciphertext.len())));
                }
                Wrapped::Kms { kms_key_id, ciphertext }
            }
            (method, _, _) => return Err(bad(format!("method {method:?} with the wrong fields"))),
        };
        Ok(WrapRecord {
            repository_key: json.repository_key,
            master_key: json.master_key,
            created_us: json.created_us,
            wrapped,
        })
    }
}

/// A retired master key, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredRecord {
    format: String,
    /// The retired master key.
    pub master_key: String,
    /// When it was retired (µs).
    pub retired_us: i64,
}

impl RetiredRecord {
    /// The record of `master_key` retired now.
    pub fn new(master_key: &str) -> RetiredRecord {
        RetiredRecord { format: RETIRED_FORMAT.into(), master_key: master_key.into(), retired_us: crate::now_us() }
    }

    /// The record's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a retirement record serialises");
        out.push(b'\n');
        out
    }

    /// Parses the record stored under `name`.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<RetiredRecord, KeyError> {
        let bad = |what: String| KeyError::BadRecord { name: name.to_string(), what };
        let r: RetiredRecord =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a retirement record: {e}")))?;
        if r.format != RETIRED_FORMAT || retired_name(&r.master_key) != name {
            return Err(bad("its format or key id does not match its name".into()));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_bound_to_their_names() {
        let rec = WrapRecord {
            repository_key: "r1".into(),
            master_key: "k1".into(),
            created_us: 5,
            wrapped: Wrapped::Aes { nonce: [1; 12], ciphertext: vec![2; 48] },
        };
        let name = wrap_name("r1", "k1");
        assert_eq!(parse_wrap_name(&name), Some(("r1", "k1")));
        assert_eq!(WrapRecord::parse(&name, &rec.to_bytes()).unwrap(), rec);
        assert!(WrapRecord::parse(&wrap_name("r2", "k1"), &rec.to_bytes()).is_err());
        let kms =
            WrapRecord { wrapped: Wrapped::Kms { kms_key_id: "alias/x".into(), ciphertext: vec![3; 100] }, ..rec };
        assert_eq!(WrapRecord::parse(&name, &kms.to_bytes()).unwrap(), kms);
        assert!(WrapRecord::parse(&name, b"{}").is_err());
        assert!(parse_wrap_name("keys/wraps/r1/../k").is_none());
        let retired = RetiredRecord::new("k1");
        assert_eq!(RetiredRecord::parse(&retired_name("k1"), &retired.to_bytes()).unwrap(), retired);
        assert!(RetiredRecord::parse(&retired_name("k2"), &retired.to_bytes()).is_err());
    }
}
