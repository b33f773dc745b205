//! A streaming (sans-IO) reader of the ustar archives BASE_BACKUP sends: bytes in, entries and
//! their content out, in any chunking, with header checksums verified.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarKind {
    File,
    Directory,
    Symlink { target: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarHeader {
    pub path: String,
    pub mode: u32,
    pub size: u64,
    pub mtime: u64,
    pub kind: TarKind,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TarEvent<'a> {
    Entry(TarHeader),
    /// Content of the current file entry.
    Data(&'a [u8]),
    /// The current file entry is complete.
    EntryEnd,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    #[error("tar header at byte {offset}: {what}")]
    Header { offset: u64, what: String },
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

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl TarReader {
    pub fn new() -> TarReader {
        TarReader::default()
    }

    /// True after the end-of-archive marker.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::End)
    }

    /// Fails if the archive stopped inside an entry.
    pub fn finish(&self) -> Result<(), TarError> {
        match self.state {
            State::Header if self.header.is_empty() => Ok(()),
            State::End => Ok(()),
            _ => Err(TarError::Truncated),
        }
    }

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
        if path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(bad(&format!("unsafe path {path:?}")));
        }
        let mode = octal(&b[100..108]).ok_or_else(|| bad("mode"))? as u32;
        let size = octal(&b[124..136]).ok_or_else(|| bad("size"))?;
        let mtime = octal(&b[136..148]).ok_or_else(|| bad("mtime"))?;
        let kind = match b[156] {
            b'0' | 0 => TarKind::File,
            b'5' => TarKind::Directory,
            b'2' => TarKind::Symlink { target: cstr(&b[157..257]) },
            other => return Err(bad(&format!("unsupported entry type {:?} for {path}", other as char))),
        };
        Ok(TarHeader { path, mode, size, mtime, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &str, kind: u8, size: u64, link: &str) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        h[100..107].copy_from_slice(b"0000600");
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
}
