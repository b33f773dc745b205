//! The sealed object format. Pure functions: plaintext + name + key ring in, bytes out, and back.
//!
//! Layout (all integers little-endian):
//! ```text
//! "PITR" | version u8 = 1 | header_len u32 | header (header_len bytes) | header_tag [16]
//! frame*: ciphertext_len u32 | AES-256-GCM(zstd(plaintext slice)) incl. 16-byte tag
//! ```
//! The header carries the key id, the wrapped data key, the plaintext length and crc32, and the
//! object's metadata (kind, timeline, LSN range, first/last commit time). The header tag is a GCM
//! tag over the header (empty message) so the header can be trusted without reading the body.
//! Each frame's nonce is its index; its associated data is the object name, the full header, the
//! frame index and a last-frame flag, so renaming, swapping, reordering or truncating objects or
//! frames fails authentication.

use crate::now_us;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

use crate::keys::{KeyError, KeySet, WRAPPED_KEY_LEN};

const MAGIC: &[u8; 4] = b"PITR";
const VERSION: u8 = 1;
const TAG_LEN: usize = 16;
/// Plaintext bytes per frame: big enough for zstd to do well, small enough to bound memory.
pub const FRAME_SIZE: usize = 1 << 20;
const MAX_HEADER_LEN: usize = 64 * 1024;
/// Bytes to fetch to be sure to hold the whole header of any object.
pub const HEADER_PREFIX_LEN: u64 = (9 + MAX_HEADER_LEN + TAG_LEN) as u64;
const HEADER_NONCE_INDEX: u64 = u64::MAX;

/// Why a sealed object did not open. Every variant names the object: a reader reports which
/// object is damaged, never just "authentication failed".
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The object does not start with `PITR`: not a sealed object at all.
    #[error("object {object}: not a pitr object (bad magic)")]
    BadMagic {
        /// The object's name.
        object: String,
    },
    /// A format version this build does not read (only 1 exists).
    #[error("object {object}: unsupported format version {version}")]
    Version {
        /// The object's name.
        object: String,
        /// The version byte found.
        version: u8,
    },
    /// The bytes end before the fixed prefix, the header or a frame does (a cut-off upload, a
    /// ranged read too short for the header, or a lost last frame).
    #[error("object {object}: truncated ({what})")]
    Truncated {
        /// The object's name.
        object: String,
        /// Which part is missing.
        what: String,
    },
    /// The header is structurally invalid: length over 64 KiB, unknown object kind, key id not
    /// UTF-8, fields cut short, or a frame size outside 1 B..64 MiB.
    #[error("object {object}: malformed header ({what})")]
    Header {
        /// The object's name.
        object: String,
        /// What is wrong with it.
        what: String,
    },
    /// An AES-GCM tag (the header tag or a frame's) did not verify: the object was modified,
    /// renamed, swapped, reordered, truncated at a frame boundary or extended.
    #[error("object {object}: authentication failed at {part}: the object was modified, renamed or corrupted")]
    Authentication {
        /// The object's name.
        object: String,
        /// Where it failed (`header`, `frame <i>`…).
        part: String,
    },
    /// Every frame authenticated but the plaintext's length or crc32 differs from the header's
    /// (a writer's bug rather than tampering, since the header is authenticated).
    #[error("object {object}: plaintext check failed ({what})")]
    Checksum {
        /// The object's name.
        object: String,
        /// Which check failed.
        what: String,
    },
    /// A frame's zstd data did not decompress, or decompressed to more than the frame size.
    #[error("object {object}: decompression failed: {what}")]
    Decompress {
        /// The object's name.
        object: String,
        /// zstd's error.
        what: String,
    },
    /// The data key could not be unwrapped: the key id is not in the key ring, or the wrap does
    /// not authenticate under that key and this name.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// What kind of object a sealed object is, recorded (authenticated) in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// Repository marker, cluster descriptions and other small records.
    Meta = 1,
    /// A piece of a WAL segment, put as soon as it is received (group commit).
    WalChunk = 2,
    /// A whole WAL segment, compacted from its chunks.
    WalSegment = 3,
    /// A timeline history file.
    TimelineHistory = 4,
    /// A block of base-backup file content.
    BackupBlock = 5,
}

impl ObjectKind {
    fn from_u8(v: u8) -> Option<ObjectKind> {
        Some(match v {
            1 => ObjectKind::Meta,
            2 => ObjectKind::WalChunk,
            3 => ObjectKind::WalSegment,
            4 => ObjectKind::TimelineHistory,
            5 => ObjectKind::BackupBlock,
            _ => return None,
        })
    }
}

/// What an object says about itself, readable from its header alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's kind.
    pub kind: ObjectKind,
    /// The PostgreSQL timeline of the WAL it holds (a history file: its own timeline; a backup
    /// manifest: the backup's); 0 where it does not apply.
    pub timeline: u32,
    /// Start of the object's range: for WAL the LSN of its first byte (a segment's start, or the
    /// segment start plus a chunk's `from`); a backup manifest's start LSN; a MongoDB oplog
    /// slice's first `ts` packed as `seconds << 32 | increment`. 0 where it does not apply.
    pub start_lsn: u64,
    /// End of the range, exclusive for WAL (`[start_lsn, end_lsn)`); a backup manifest's stop
    /// LSN; an oplog slice's last `ts`, packed. 0 where it does not apply.
    pub end_lsn: u64,
    /// Commit times, µs since the Unix epoch, of the first and last commit/abort in the object.
    pub first_commit_us: Option<i64>,
    /// See `first_commit_us`; `None` (stored as `i64::MIN`) when the object holds no commit or
    /// abort record.
    pub last_commit_us: Option<i64>,
}

impl ObjectMeta {
    /// Metadata of `kind` with no timeline, range or commit times (small records, blocks); callers
    /// override the fields that apply with struct-update syntax.
    pub fn plain(kind: ObjectKind) -> ObjectMeta {
        ObjectMeta { kind, timeline: 0, start_lsn: 0, end_lsn: 0, first_commit_us: None, last_commit_us: None }
    }
}

/// A sealed object's header, as [`open_header`] and [`open`] return it once its tag verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHeader {
    /// Id of the key-encryption key that wrapped the object's data key.
    pub key_id: String,
    /// Length of the whole plaintext, checked after the last frame.
    pub plaintext_len: u64,
    /// CRC-32 (IEEE) of the whole plaintext, checked after the last frame.
    pub plaintext_crc32: u32,
    /// When it was sealed, µs since the Unix epoch by the writer's clock; informational only.
    pub created_us: i64,
    /// What the object says about itself (kind, timeline, range, commit times).
    pub meta: ObjectMeta,
    wrap_nonce: [u8; 12],
    wrapped_key: [u8; WRAPPED_KEY_LEN],
    frame_size: u32,
    /// Bytes from the start of the object to the first frame.
    body_offset: usize,
}

/// Seals `plaintext` as the object `name`.
pub fn seal(name: &str, plaintext: &[u8], meta: &ObjectMeta, keys: &KeySet, zstd_level: i32) -> Vec<u8> {
    let data_key = crate::keys::set::fresh_data_key();
    let (key_id, wrap_nonce, wrapped_key) = keys.wrap(name, &data_key);
    let created_us = now_us();

    let mut header = Vec::with_capacity(160);
    header.push(meta.kind as u8);
    header.extend_from_slice(&(key_id.len() as u16).to_le_bytes());
    header.extend_from_slice(key_id.as_bytes());
    header.extend_from_slice(&wrap_nonce);
    header.extend_from_slice(&wrapped_key);
    header.extend_from_slice(&(plaintext.len() as u64).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(plaintext).to_le_bytes());
    header.extend_from_slice(&(FRAME_SIZE as u32).to_le_bytes());
    header.extend_from_slice(&created_us.to_le_bytes());
    header.extend_from_slice(&meta.timeline.to_le_bytes());
    header.extend_from_slice(&meta.start_lsn.to_le_bytes());
    header.extend_from_slice(&meta.end_lsn.to_le_bytes());
    header.extend_from_slice(&meta.first_commit_us.unwrap_or(i64::MIN).to_le_bytes());
    header.extend_from_slice(&meta.last_commit_us.unwrap_or(i64::MIN).to_le_bytes());

    let mut out = Vec::with_capacity(plaintext.len() / 2 + 256);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    let prefix = out.clone();

    let cipher = Aes256Gcm::new((&*data_key).into());
    let tag = cipher
        .encrypt(
            &nonce(HEADER_NONCE_INDEX),
            Payload { msg: &[], aad: &frame_aad(name, &prefix, HEADER_NONCE_INDEX, false) },
        )
        .expect("AES-GCM encryption cannot fail");
    out.extend_from_slice(&tag);

    let frames: Vec<&[u8]> = if plaintext.is_empty() { vec![&[][..]] } else { plaintext.chunks(FRAME_SIZE).collect() };
    for sealed in seal_frames(&cipher, name, &prefix, &frames, zstd_level) {
        out.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        out.extend_from_slice(&sealed);
    }
    out
}

/// Compresses and encrypts every frame. Frames are independent, so an object of several frames
/// (a WAL segment is 16) is sealed on every core: compression is nearly all of the cost of a
/// put, and a WAL catch-up would otherwise leave all but one core idle.
/// The cores to seal on, asked once: `available_parallelism` reads cgroup files on every call,
/// which would cost several system calls per WAL chunk.
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

thread_local! {
    /// This thread's compression context and its level: creating one costs more than
    /// compressing a small WAL chunk (3 % of the sidecar's CPU under synchronous commits). A
    /// thread may seal objects of more than one level (WAL at the WAL level, everything else at
    /// the repository's): the context's level is changed, not the context.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(frame: &[u8], zstd_level: i32) -> Vec<u8> {
    let reused = COMPRESSOR.with(|cell| {
        let mut cell = cell.try_borrow_mut().ok()?;
        match cell.as_mut() {
            Some((level, _)) if *level == zstd_level => {}
            Some((level, compressor)) => {
                if compressor.set_compression_level(zstd_level).is_err() {
                    // Its level is unknown now: never reuse it under the old one.
                    *cell = None;
                    return None;
                }
                *level = zstd_level;
            }
            None => *cell = Some((zstd_level, zstd::bulk::Compressor::new(zstd_level).ok()?)),
        }
        cell.as_mut()?.1.compress(frame).ok()
    });
    reused.unwrap_or_else(|| {
        zstd::bulk::compress(frame, zstd_level).expect("zstd compression of a memory buffer cannot fail")
    })
}

fn seal_frames(cipher: &Aes256Gcm, name: &str, prefix: &[u8], frames: &[&[u8]], zstd_level: i32) -> Vec<Vec<u8>> {
    let last_index = frames.len() - 1;
    let seal_run = |first: usize, run: &[&[u8]]| -> Vec<Vec<u8>> {
        run.iter()
            .enumerate()
            .map(|(j, frame)| {
                let i = first + j;
                let compressed = compress(frame, zstd_level);
                let index = i as u64;
                let aad = frame_aad(name, prefix, index, i == last_index);
                cipher
                    .encrypt(&nonce(index), Payload { msg: &compressed, aad: &aad })
                    .expect("AES-GCM encryption cannot fail")
            })
            .collect()
    };
    let workers = if frames.len() <= 1 { 1 } else { cores().min(frames.len()) };
    if workers <= 1 {
        return seal_run(0, frames);
    }
    let per_worker = frames.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = frames
            .chunks(per_worker)
            .enumerate()
            .map(|(w, run)| {
                let seal_run = &seal_run;
                scope.spawn(move || seal_run(w * per_worker, run))
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

/// Bytes of an object's start that always hold its key id ([`peek_key_id`]).
pub const KEY_ID_PREFIX_LEN: u64 = 9 + 1 + 2 + 64;

/// The key id an object's header names, read (not authenticated) from the first bytes of the
/// object (at least [`KEY_ID_PREFIX_LEN`] of them, or the whole object): which key to fetch
/// before [`open`] can authenticate anything.
pub fn peek_key_id(name: &str, bytes: &[u8]) -> Result<String, SealError> {
    let object = || name.to_string();
    check_prefix(name, bytes, 12)?;
    let id_len = u16::from_le_bytes([bytes[10], bytes[11]]) as usize;
    if id_len == 0 || id_len > 64 {
        return Err(SealError::Header { object: object(), what: format!("key id length {id_len}") });
    }
    let id = bytes
        .get(12..12 + id_len)
        .ok_or_else(|| SealError::Truncated { object: object(), what: "key id cut short".into() })?;
    let id = String::from_utf8(id.to_vec())
        .map_err(|_| SealError::Header { object: object(), what: "key id is not UTF-8".into() })?;
    // The id becomes part of a key record's name to look up: nothing but the id alphabet.
    if !crate::keys::master::valid_id(&id) {
        return Err(SealError::Header {
            object: object(),
            what: format!("key id {id:?} is not 1-64 of [A-Za-z0-9_-]"),
        });
    }
    Ok(id)
}

/// Parses and authenticates the header of object `name` from a prefix of its bytes (at least the
/// whole header; [`HEADER_PREFIX_LEN`] bytes always suffice).
pub fn open_header(name: &str, bytes: &[u8], keys: &KeySet) -> Result<SealedHeader, SealError> {
    let (header, _key) = open_header_and_key(name, bytes, keys)?;
    Ok(header)
}

fn open_header_and_key(
    name: &str,
    bytes: &[u8],
    keys: &KeySet,
) -> Result<(SealedHeader, crate::keys::DataKey), SealError> {
    let header = parse_header(name, bytes)?;
    let data_key = keys.unwrap(name, &header.key_id, &header.wrap_nonce, &header.wrapped_key)?;
    let cipher = Aes256Gcm::new((&*data_key).into());
    let prefix_end = header.body_offset - TAG_LEN;
    let aad = frame_aad(name, &bytes[..prefix_end], HEADER_NONCE_INDEX, false);
    cipher
        .decrypt(&nonce(HEADER_NONCE_INDEX), Payload { msg: &bytes[prefix_end..header.body_offset], aad: &aad })
        .map_err(|_| SealError::Authentication { object: name.to_string(), part: "header".into() })?;
    Ok((header, data_key))
}

/// Opens object `name`: authenticates every frame, decompresses, checks length and crc32.
pub fn open(name: &str, bytes: &[u8], keys: &KeySet) -> Result<(SealedHeader, Vec<u8>), SealError> {
    let (header, data_key) = open_header_and_key(name, bytes, keys)?;
    let cipher = Aes256Gcm::new((&*data_key).into());
    let prefix = &bytes[..header.body_offset - TAG_LEN];
    let truncated = |what: String| SealError::Truncated { object: name.to_string(), what };
    let mut plaintext = Vec::with_capacity(initial_capacity(header.plaintext_len));
    let mut pos = header.body_offset;
    let mut index: u64 = 0;
    loop {
        let len_bytes = bytes
            .get(pos..pos + 4)
            .ok_or_else(|| truncated(format!("frame {index} length missing: the last frame is gone")))?;
        let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        pos += 4;
        let frame = bytes.get(pos..pos + len).ok_or_else(|| truncated(format!("frame {index} cut short")))?;
        pos += len;
        let is_last = pos == bytes.len();
        let aad = frame_aad(name, prefix, index, is_last);
        let compressed = cipher.decrypt(&nonce(index), Payload { msg: frame, aad: &aad }).map_err(|_| {
            let part = if is_last {
                format!("frame {index} (the object may be truncated: its last frame is not marked last)")
            } else {
                format!("frame {index}")
            };
            SealError::Authentication { object: name.to_string(), part }
        })?;
        let plain = zstd::bulk::decompress(&compressed, header.frame_size as usize)
            .map_err(|e| SealError::Decompress { object: name.to_string(), what: e.to_string() })?;
        // Stop at the first frame past the header's length rather than collect them all.
        if (plaintext.len() + plain.len()) as u64 > header.plaintext_len {
            return Err(SealError::Checksum {
                object: name.to_string(),
                what: format!("frame {index} runs past the {} bytes the header says", header.plaintext_len),
            });
        }
        plaintext.extend_from_slice(&plain);
        if is_last {
            break;
        }
        index += 1;
    }
    if plaintext.len() as u64 != header.plaintext_len {
        return Err(SealError::Checksum {
            object: name.to_string(),
            what: format!("length {} but the header says {}", plaintext.len(), header.plaintext_len),
        });
    }
    if crc32fast::hash(&plaintext) != header.plaintext_crc32 {
        return Err(SealError::Checksum { object: name.to_string(), what: "crc32 mismatch".into() });
    }
    Ok((header, plaintext))
}

/// The most [`open`] reserves for the plaintext before any frame has authenticated: one WAL
/// segment of the default size. A larger object grows its buffer as its frames authenticate, so
/// a header's `plaintext_len` alone never makes pitr reserve more.
const PREALLOCATE_MAX: usize = 16 << 20;

fn initial_capacity(plaintext_len: u64) -> usize {
    usize::try_from(plaintext_len).unwrap_or(usize::MAX).min(PREALLOCATE_MAX)
}

/// Checks that `bytes` hold at least `min_len` bytes starting with the magic and this version.
fn check_prefix(name: &str, bytes: &[u8], min_len: usize) -> Result<(), SealError> {
    let object = || name.to_string();
    if bytes.len() < min_len {
        return Err(SealError::Truncated { object: object(), what: "shorter than the fixed prefix".into() });
    }
    if &bytes[..4] != MAGIC {
        return Err(SealError::BadMagic { object: object() });
    }
    if bytes[4] != VERSION {
        return Err(SealError::Version { object: object(), version: bytes[4] });
    }
    Ok(())
}

fn parse_header(name: &str, bytes: &[u8]) -> Result<SealedHeader, SealError> {
    let object = || name.to_string();
    check_prefix(name, bytes, 9)?;
    let header_len = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
    if header_len > MAX_HEADER_LEN {
        return Err(SealError::Header { object: object(), what: format!("header length {header_len} too large") });
    }
    let body_offset = 9 + header_len + TAG_LEN;
    if bytes.len() < body_offset {
        return Err(SealError::Truncated { object: object(), what: "header cut short".into() });
    }
    let mut r = Reader { buf: &bytes[9..9 + header_len], name };
    let kind_byte = r.u8()?;
    let kind = ObjectKind::from_u8(kind_byte)
        .ok_or_else(|| SealError::Header { object: object(), what: format!("unknown object kind {kind_byte}") })?;
    let id_len = r.u16()? as usize;
    let key_id = String::from_utf8(r.take(id_len)?.to_vec())
        .map_err(|_| SealError::Header { object: object(), what: "key id is not UTF-8".into() })?;
    let mut wrap_nonce = [0u8; 12];
    wrap_nonce.copy_from_slice(r.take(12)?);
    let mut wrapped_key = [0u8; WRAPPED_KEY_LEN];
    wrapped_key.copy_from_slice(r.take(WRAPPED_KEY_LEN)?);
    let plaintext_len = r.u64()?;
    let plaintext_crc32 = r.u32()?;
    let frame_size = r.u32()?;
    let created_us = r.u64()? as i64;
    let timeline = r.u32()?;
    let start_lsn = r.u64()?;
    let end_lsn = r.u64()?;
    let opt = |v: u64| if v as i64 == i64::MIN { None } else { Some(v as i64) };
    let first_commit_us = opt(r.u64()?);
    let last_commit_us = opt(r.u64()?);
    if frame_size == 0 || frame_size as usize > 64 * FRAME_SIZE {
        return Err(SealError::Header { object: object(), what: format!("frame size {frame_size}") });
    }
    Ok(SealedHeader {
        key_id,
        plaintext_len,
        plaintext_crc32,
        created_us,
        meta: ObjectMeta { kind, timeline, start_lsn, end_lsn, first_commit_us, last_commit_us },
        wrap_nonce,
        wrapped_key,
        frame_size,
        body_offset,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    name: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SealError> {
        if self.buf.len() < n {
            return Err(SealError::Header { object: self.name.to_string(), what: "header fields cut short".into() });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, SealError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SealError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, SealError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, SealError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

fn nonce(index: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_le_bytes());
    *Nonce::from_slice(&n)
}

fn frame_aad(name: &str, header_prefix: &[u8], index: u64, last: bool) -> Vec<u8> {
    let mut aad = Vec::with_capacity(name.len() + header_prefix.len() + 32);
    aad.extend_from_slice(&(name.len() as u32).to_le_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(header_prefix);
    aad.extend_from_slice(&index.to_le_bytes());
    aad.push(last as u8);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeySet {
        KeySet::from_key("test", [42; 32])
    }

    fn meta() -> ObjectMeta {
        ObjectMeta {
            kind: ObjectKind::WalChunk,
            timeline: 1,
            start_lsn: 0x1000000,
            end_lsn: 0x1002000,
            first_commit_us: Some(5),
            last_commit_us: Some(9),
        }
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trip_small_empty_and_multi_frame() {
        for len in [0, 1, 1000, FRAME_SIZE, FRAME_SIZE * 2 + 17] {
            let plain = sample(len);
            let sealed = seal("wal/x", &plain, &meta(), &ring(), 1);
            let (header, opened) = open("wal/x", &sealed, &ring()).unwrap();
            assert_eq!(opened, plain);
            assert_eq!(header.meta, meta());
            assert_eq!(open_header("wal/x", &sealed, &ring()).unwrap().plaintext_len, len as u64);
        }
    }

    #[test]
    fn one_thread_switches_levels_back_and_forth_and_each_seals_at_its_own() {
        // Compressible (a repeating pattern, as WAL pages of zeros and repeated tuples are).
        let plain = sample(8000);
        let fastest = *zstd::compression_level_range().start();
        let sizes: Vec<usize> = [1, fastest, 1, fastest, 19]
            .into_iter()
            .map(|level| {
                let sealed = seal("wal/x", &plain, &meta(), &ring(), level);
                assert_eq!(open("wal/x", &sealed, &ring()).unwrap().1, plain, "level {level}");
                sealed.len()
            })
            .collect();
        // zstd's fastest level stores: the plaintext and a little framing, on either turn.
        assert!(sizes[1] >= plain.len() && sizes[1] == sizes[3], "{sizes:?}");
        // Back at level 1 after it: compressed again, as the first time.
        assert!(sizes[0] < plain.len() / 4 && sizes[2] == sizes[0], "{sizes:?}");
        assert!(sizes[4] <= sizes[0], "{sizes:?}");
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let plain = sample(3000);
        let sealed = seal("a", &plain, &meta(), &ring(), 1);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(open("a", &bad, &ring()).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn rename_is_detected() {
        let sealed = seal("a", b"hello", &meta(), &ring(), 1);
        let err = open("b", &sealed, &ring()).unwrap_err();
        assert!(err.to_string().contains("object b"), "{err}");
    }

    #[test]
    fn truncation_at_a_frame_boundary_is_detected() {
        let plain = sample(FRAME_SIZE * 2 + 10);
        let sealed = seal("a", &plain, &meta(), &ring(), 1);
        let header = parse_header("a", &sealed).unwrap();
        // Cut just after the first frame: what remains is a well-formed but unfinished object.
        let first_len =
            u32::from_le_bytes(sealed[header.body_offset..header.body_offset + 4].try_into().unwrap()) as usize;
        let cut = &sealed[..header.body_offset + 4 + first_len];
        let err = open("a", cut, &ring()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        for cut_at in [0, 5, 20, sealed.len() - 1] {
            assert!(open("a", &sealed[..cut_at], &ring()).is_err());
        }
    }

    #[test]
    fn frame_reordering_is_detected() {
        let plain = sample(FRAME_SIZE * 3);
        let sealed = seal("a", &plain, &meta(), &ring(), 1);
        let header = parse_header("a", &sealed).unwrap();
        let mut frames = Vec::new();
        let mut pos = header.body_offset;
        while pos < sealed.len() {
            let len = u32::from_le_bytes(sealed[pos..pos + 4].try_into().unwrap()) as usize;
            frames.push(sealed[pos..pos + 4 + len].to_vec());
            pos += 4 + len;
        }
        assert_eq!(frames.len(), 3);
        let mut swapped = sealed[..header.body_offset].to_vec();
        for i in [1, 0, 2] {
            swapped.extend_from_slice(&frames[i]);
        }
        assert!(matches!(open("a", &swapped, &ring()), Err(SealError::Authentication { .. })));
    }

    #[test]
    fn peek_key_id_reads_the_id_and_refuses_one_outside_the_alphabet() {
        let sealed = seal("a", b"x", &meta(), &ring(), 1);
        assert_eq!(peek_key_id("a", &sealed[..KEY_ID_PREFIX_LEN as usize]).unwrap(), "test");
        let mut bad = sealed.clone();
        bad[12..16].copy_from_slice(b"../x");
        let e = peek_key_id("a", &bad).unwrap_err();
        assert!(
            matches!(&e, SealError::Header { what, .. } if what.contains("alphabet") || what.contains("A-Za-z")),
            "{e}"
        );
        assert!(matches!(peek_key_id("a", b"PITR"), Err(SealError::Truncated { .. })));
    }

    #[test]
    fn wrong_key_is_named() {
        let sealed = seal("a", b"x", &meta(), &ring(), 1);
        let other = KeySet::from_key("test", [1; 32]);
        assert!(matches!(open("a", &sealed, &other), Err(SealError::Key(KeyError::Unwrap { .. }))));
        let unknown = KeySet::from_key("other-id", [42; 32]);
        assert!(matches!(open("a", &sealed, &unknown), Err(SealError::Key(KeyError::UnknownKey { .. }))));
    }

    /// An object sealed as [`seal`] does, but whose authenticated header claims `plaintext_len`
    /// and `frame_size`: what a writer with the key (or a bug) could produce.
    fn crafted(name: &str, frames: &[&[u8]], plaintext_len: u64, frame_size: u32) -> Vec<u8> {
        let keys = ring();
        let data_key = [7u8; 32];
        let (key_id, wrap_nonce, wrapped_key) = keys.wrap(name, &data_key);
        let mut header = vec![ObjectKind::Meta as u8];
        header.extend_from_slice(&(key_id.len() as u16).to_le_bytes());
        header.extend_from_slice(key_id.as_bytes());
        header.extend_from_slice(&wrap_nonce);
        header.extend_from_slice(&wrapped_key);
        header.extend_from_slice(&plaintext_len.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&frame_size.to_le_bytes());
        header.extend_from_slice(&[0u8; 8 + 4 + 8 + 8 + 8 + 8]);
        let mut out = MAGIC.to_vec();
        out.push(VERSION);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        let prefix = out.clone();
        let cipher = Aes256Gcm::new((&data_key).into());
        let aad = frame_aad(name, &prefix, HEADER_NONCE_INDEX, false);
        out.extend_from_slice(&cipher.encrypt(&nonce(HEADER_NONCE_INDEX), Payload { msg: &[], aad: &aad }).unwrap());
        for sealed in seal_frames(&cipher, name, &prefix, frames, 1) {
            out.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
            out.extend_from_slice(&sealed);
        }
        out
    }

    #[test]
    fn a_header_length_over_the_bound_is_refused_from_the_prefix_alone() {
        for len in [MAX_HEADER_LEN as u32 + 1, u32::MAX] {
            let mut bytes = MAGIC.to_vec();
            bytes.push(VERSION);
            bytes.extend_from_slice(&len.to_le_bytes());
            let err = open_header("h", &bytes, &ring()).unwrap_err();
            assert!(matches!(&err, SealError::Header { what, .. } if what.contains("too large")), "{err}");
        }
    }

    #[test]
    fn a_huge_plaintext_length_reserves_a_bounded_buffer_and_fails_cleanly() {
        assert_eq!(initial_capacity(u64::MAX), PREALLOCATE_MAX);
        assert_eq!(initial_capacity(5), 5);
        let object = crafted("big", &[b"tiny"], u64::MAX, FRAME_SIZE as u32);
        // The header authenticates (the writer had the key): the length is only believed as far
        // as the frames bear it out.
        assert_eq!(open_header("big", &object, &ring()).unwrap().plaintext_len, u64::MAX);
        let err = open("big", &object, &ring()).unwrap_err();
        assert!(matches!(&err, SealError::Checksum { what, .. } if what.contains("header says")), "{err}");
    }

    #[test]
    fn frames_past_the_header_length_stop_at_the_first_one() {
        let frame = sample(FRAME_SIZE);
        let object = crafted("long", &[&frame, &frame, &frame], 10, FRAME_SIZE as u32);
        let err = open("long", &object, &ring()).unwrap_err();
        assert!(matches!(&err, SealError::Checksum { what, .. } if what.starts_with("frame 0 ")), "{err}");
        // A frame that decompresses to more than the header's frame size is refused, however
        // small its compressed form.
        let zeros = vec![0u8; 4096];
        let object = crafted("bomb", &[&zeros], 4096, 1024);
        assert!(matches!(open("bomb", &object, &ring()), Err(SealError::Decompress { .. })));
    }

    #[test]
    fn frame_sizes_outside_the_bound_are_refused_before_any_frame_is_read() {
        for frame_size in [0, 64 * FRAME_SIZE as u32 + 1, u32::MAX] {
            let object = crafted("f", &[b"x"], 1, frame_size);
            let err = open_header("f", &object, &ring()).unwrap_err();
            assert!(matches!(&err, SealError::Header { what, .. } if what.contains("frame size")), "{err}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for len in 0..300 {
            let mut buf = b"PITR\x01".to_vec();
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = open("g", &buf, &ring());
        }
    }
}
