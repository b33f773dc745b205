//! A streaming (sans-IO) reader of the ustar archives BASE_BACKUP sends: bytes in, entries and
//! their content out, in any chunking, with header checksums verified.
//!
//! The server is not trusted with paths: a member name that is empty, absolute or has a `..`
//! component, and any member type but a file, a directory or a symbolic link (hard links,
//! devices, FIFOs, extension headers: PostgreSQL sends none of them) fails the backup here, so
//! it never reaches a manifest. Which symbolic links are acceptable is the receiver's call.
//!
//! What a server can make the reader hold is fixed: one 512-byte header block (pax and GNU
//! long-name headers, the only variable-length ones, are refused rather than read), and content
//! is passed on as it arrives, whatever size its header declares.

/// What a member is: the only three member types accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarKind {
    /// A regular file (type `0`, or NUL in old archives); its content follows the header.
    File,
    /// A directory (type `5`).
    Directory,
    /// A symbolic link (type `2`).
    Symlink {
        /// Where the link points, as the server sent it (not checked here).
        target: String,
    },
}

/// A member's header, decoded from its 512-byte ustar header block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarHeader {
    /// The member name, the ustar prefix joined on and any trailing `/` removed; never absolute,
    /// empty or with a `..` component (see [`unsafe_member_path`]).
    pub path: String,
    /// Permission bits, from the octal mode field.
    pub mode: u32,
    /// Content length in bytes; only files have content, and it is ignored for other types.
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: u64,
    /// The member type.
    pub kind: TarKind,
}

/// What [`TarReader::feed`] reports, in archive order.
#[derive(Debug, PartialEq, Eq)]
pub enum TarEvent<'a> {
    /// A member's header. For a file with content, [`TarEvent::Data`] follows, then
    /// [`TarEvent::EntryEnd`]; for anything else, `EntryEnd` follows at once.
    Entry(TarHeader),
    /// Content of the current file entry.
    Data(&'a [u8]),
    /// The current file entry is complete.
    EntryEnd,
}

/// Why a tar archive from the server cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    /// A header block is broken or refused: checksum mismatch, unreadable number, unsafe member
    /// name or unsupported member type.
    #[error("tar header at byte {offset}: {what}")]
    Header {
        /// Where the header block starts, in bytes from the start of the archive.
        offset: u64,
        /// What is wrong with it.
        what: String,
    },
    /// The archive ended inside a header block, a file's content or its padding.
    #[error("tar stream ended inside an entry")]
    Truncated,
}

#[derive(Debug)]
enum State {
    Header,
    Data { remaining: u64, padding: u64 },
    Padding { remaining: u64 },
    End,
}

/// Reads one tar archive as it streams in: [`feed`](TarReader::feed) it the archive's bytes in
/// any chunks, then [`finish`](TarReader::finish) it once the server says the archive is over.
#[derive(Debug)]
pub struct TarReader {
    state: State,
    header: Vec<u8>,
    offset: u64,
}

impl Default for TarReader {
    fn default() -> Self {
        TarReader { state: State::Header, header: Vec::with_capacity(512), offset: 0 }
    }
}

fn octal(field: &[u8]) -> Option<u64> {
    // Sizes too big for 11 octal digits use the GNU base-256 form (high bit set).
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7F);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let text: String = field.iter().take_while(|&&b| b != 0).map(|&b| b as char).collect();
    let text = text.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// Why a member path may not go into a backup: `None` if it stays below the directory it is
/// restored into. Component-wise, so `a/../b` is caught as well as a leading `/` or `..`. `.`
/// and empty components name the same place and are let through: PostgreSQL itself sends
/// `./pg_wal/archive_status` (and `./pg_wal/summaries`); the restore drops them.
pub fn unsafe_member_path(path: &str) -> Option<&'static str> {
    if path.starts_with('/') {
        return Some("an absolute name");
    }
    let mut components = path.split('/').filter(|c| !c.is_empty() && *c != ".").peekable();
    if components.peek().is_none() {
        return Some("an empty name");
    }
    components.any(|c| c == "..").then_some("a `..` component")
}

/// A readable name for a tar member type byte.
fn type_name(t: u8) -> String {
    let what = match t {
        b'1' => "hard link",
        b'3' => "character device",
        b'4' => "block device",
        b'6' => "FIFO",
        b'7' => "contiguous file",
        b'x' | b'g' => "pax extended header",
        b'L' | b'K' => "GNU long name",
        _ => "unknown",
    };
    format!("{:?} ({what})", t as char)
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl TarReader {
    /// A reader at the start of an archive.
    pub fn new() -> TarReader {
        TarReader::default()
    }

    /// True after the end-of-archive marker.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::End)
    }

    /// Fails if the archive stopped inside a header or an entry. Ending between members without
    /// the end-of-archive blocks is accepted: servers before PostgreSQL 15 do not send them.
    pub fn finish(&self) -> Result<(), TarError> {
        match self.state {
            State::Header if self.header.is_empty() => Ok(()),
            State::End => Ok(()),
            _ => Err(TarError::Truncated),
        }
    }

    /// Reads `data`, the archive's next bytes, calling `on_event` for each header, piece of file
    /// content and entry end it completes; a header split across calls is kept until whole, and
    /// a file's content may come in several [`TarEvent::Data`]. Everything after the first
    /// all-zero header block (the end of the archive) is ignored. Stops at the first error, the
    /// archive's or `on_event`'s.
    pub fn feed<E>(&mut self, mut data: &[u8], mut on_event: impl FnMut(TarEvent<'_>) -> Result<(), E>) -> Result<(), E>
    where
        E: From<TarError>,
    {
        while !data.is_empty() {
            match self.state {
                State::End => return Ok(()),
                State::Header => {
                    let n = (512 - self.header.len()).min(data.len());
                    self.header.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    self.offset += n as u64;
                    if self.header.len() < 512 {
                        continue;
                    }
                    let block = std::mem::take(&mut self.header);
                    if block.iter().all(|&b| b == 0) {
                        self.state = State::End;
                        continue;
                    }
                    let header = self.parse_header(&block)?;
                    let size = if header.kind == TarKind::File { header.size } else { 0 };
                    let padding = (512 - size % 512) % 512;
                    on_event(TarEvent::Entry(header))?;
                    self.state = if size > 0 {
                        State::Data { remaining: size, padding }
                    } else {
                        on_event(TarEvent::EntryEnd)?;
                        State::Header
                    };
                }
                State::Data { remaining, padding } => {
                    let n = (remaining.min(data.len() as u64)) as usize;
                    on_event(TarEvent::Data(&data[..n]))?;
                    data = &data[n..];
                    self.offset += n as u64;
                    let remaining = remaining - n as u64;
                    if remaining == 0 {
                        on_event(TarEvent::EntryEnd)?;
                        self.state = if padding > 0 { State::Padding { remaining: padding } } else { State::Header };
                    } else {
                        self.state = State::Data { remaining, padding };
                    }
                }
                State::Padding { remaining } => {
                    let n = remaining.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.offset += n;
                    self.state =
                        if remaining == n { State::Header } else { State::Padding { remaining: remaining - n } };
                }
            }
        }
        Ok(())
    }

    fn parse_header(&self, b: &[u8]) -> Result<TarHeader, TarError> {
        let offset = self.offset - 512;
        let bad = |what: &str| TarError::Header { offset, what: what.to_string() };
        let stored = octal(&b[148..156]).ok_or_else(|| bad("unreadable checksum"))?;
        let computed: u64 =
            b.iter().enumerate().map(|(i, &x)| if (148..156).contains(&i) { 32 } else { u64::from(x) }).sum();
        if stored != computed {
            return Err(bad("checksum mismatch"));
        }
        let name = cstr(&b[0..100]);
        let prefix = if &b[257..262] == b"ustar" { cstr(&b[345..500]) } else { String::new() };
        let path = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let path = path.trim_end_matches('/').to_string();
        if let Some(why) = unsafe_member_path(&path) {
            return Err(bad(&format!("unsafe member name {path:?}: {why}")));
        }
        let mode = octal(&b[100..108]).ok_or_else(|| bad("mode"))? as u32;
        let size = octal(&b[124..136]).ok_or_else(|| bad("size"))?;
        let mtime = octal(&b[136..148]).ok_or_else(|| bad("mtime"))?;
        let kind = match b[156] {
            b'0' | 0 => TarKind::File,
            b'5' => TarKind::Directory,
            b'2' => TarKind::Symlink { target: cstr(&b[157..257]) },
            other => return Err(bad(&format!("unsupported member type {} for {path:?}", type_name(other)))),
        };
        Ok(TarHeader { path, mode, size, mtime, kind })
    }
}

/// A ustar header as a server would send it, for tests here and in the receiver's.
#[cfg(test)]
pub(crate) fn ustar_header(path: &str, kind: u8, size: u64, link: &str, mode: u32) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..path.len()].copy_from_slice(path.as_bytes());
    h[100..107].copy_from_slice(format!("{mode:07o}").as_bytes());
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000001");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, kind: u8, size: u64, link: &str) -> Vec<u8> {
        ustar_header(path, kind, size, link, 0o600)
    }

    fn archive() -> Vec<u8> {
        let mut t = header("base", b'5', 0, "");
        t.extend(header("base/1/1259", b'0', 700, ""));
        t.extend((0..700).map(|i| i as u8));
        t.extend(vec![0; 512 - 700 % 512]);
        t.extend(header("pg_tblspc/16390", b'2', 0, "/srv/ts"));
        t.extend(header("empty", b'0', 0, ""));
        t.extend(vec![0; 1024]);
        t
    }

    fn collect(chunks: usize) -> Vec<String> {
        let data = archive();
        let mut r = TarReader::new();
        let mut out = Vec::new();
        let mut content = Vec::new();
        for piece in data.chunks(chunks) {
            r.feed::<TarError>(piece, |e| {
                match e {
                    TarEvent::Entry(h) => out.push(format!("{} {:?} {}", h.path, h.kind, h.size)),
                    TarEvent::Data(d) => content.extend_from_slice(d),
                    TarEvent::EntryEnd => out.push("end".into()),
                }
                Ok(())
            })
            .unwrap();
        }
        assert!(r.is_finished());
        assert_eq!(content, (0..700).map(|i| i as u8).collect::<Vec<_>>());
        out
    }

    #[test]
    fn entries_in_any_chunking() {
        let whole = collect(usize::MAX);
        assert_eq!(
            whole,
            vec![
                "base Directory 0",
                "end",
                "base/1/1259 File 700",
                "end",
                "pg_tblspc/16390 Symlink { target: \"/srv/ts\" } 0",
                "end",
                "empty File 0",
                "end"
            ]
        );
        assert_eq!(collect(1), whole);
        assert_eq!(collect(511), whole);
    }

    #[test]
    fn bad_checksum_unsafe_paths_and_truncation() {
        let mut t = archive();
        t[600] ^= 1;
        let mut r = TarReader::new();
        assert!(r.feed::<TarError>(&t, |_| Ok(())).is_err());
        let t = header("../etc/passwd", b'0', 0, "");
        assert!(TarReader::new().feed::<TarError>(&t, |_| Ok(())).is_err());
        let t = archive();
        let mut r = TarReader::new();
        r.feed::<TarError>(&t[..1000], |_| Ok(())).unwrap();
        assert_eq!(r.finish(), Err(TarError::Truncated));
        assert_eq!(octal(&[0x80, 0, 0, 1, 0]), Some(256));
    }

    #[test]
    fn declared_sizes_are_streamed_not_reserved() {
        // A file claiming 2^62 bytes (GNU base-256 size): its content is handed on piece by
        // piece, never buffered, and the archive is simply unfinished when the data stops.
        let mut h = header("base/1/1", b'0', 0, "");
        h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]);
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut r = TarReader::new();
        let mut size = 0;
        let mut largest = 0;
        r.feed::<TarError>(&h, |e| {
            if let TarEvent::Entry(h) = e {
                size = h.size;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(size, 1 << 62);
        let chunk = vec![7u8; 1 << 16];
        for _ in 0..64 {
            r.feed::<TarError>(&chunk, |e| {
                if let TarEvent::Data(d) = e {
                    largest = largest.max(d.len());
                }
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(largest, chunk.len(), "content is passed on as it comes");
        assert!(r.header.capacity() <= 512);
        assert_eq!(r.finish(), Err(TarError::Truncated));
    }

    fn first_error(t: &[u8]) -> String {
        match TarReader::new().feed::<TarError>(t, |_| Ok(())) {
            Err(e) => e.to_string(),
            Ok(()) => panic!("accepted"),
        }
    }

    #[test]
    fn hostile_member_names_and_types_are_refused() {
        for (name, why) in [
            ("../etc/passwd", "`..` component"),
            ("base/../../etc/passwd", "`..` component"),
            ("base/1/..", "`..` component"),
            ("./../etc", "`..` component"),
            ("/etc/passwd", "absolute name"),
            ("//etc/cron.d/x", "absolute name"),
            ("/", "empty name"),
            ("./", "empty name"),
        ] {
            for kind in [b'0', b'5', b'2'] {
                let err = first_error(&header(name, kind, 0, "x"));
                assert!(err.contains("unsafe member name") && err.contains(why), "{name} {}: {err}", kind as char);
            }
        }
        // A ustar prefix counts too: `..` there escapes as well as in the name.
        let mut h = header("passwd", b'0', 0, "");
        h[345..351].copy_from_slice(b"../etc");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let err = first_error(&h);
        assert!(err.contains("\"../etc/passwd\"") && err.contains("`..`"), "{err}");
        // Link types PostgreSQL never sends, after a good entry: the reader stops at them.
        for (kind, what) in [(b'1', "hard link"), (b'3', "character device"), (b'6', "FIFO"), (b'x', "pax")] {
            let mut t = header("base", b'5', 0, "");
            t.extend(header("base/1", kind, 0, "/etc/shadow"));
            let err = first_error(&t);
            assert!(err.contains("unsupported member type") && err.contains(what) && err.contains("base/1"), "{err}");
        }
        // Names that only look odd are plain names; PostgreSQL sends the first two.
        assert_eq!(unsafe_member_path("./pg_wal/archive_status"), None);
        assert_eq!(unsafe_member_path("./pg_wal/summaries"), None);
        assert_eq!(unsafe_member_path("base//1"), None);
        assert_eq!(unsafe_member_path("base/1/..."), None);
        assert_eq!(unsafe_member_path("pg_tblspc/16384"), None);
        assert_eq!(unsafe_member_path(".hidden/a..b"), None);
    }
}
