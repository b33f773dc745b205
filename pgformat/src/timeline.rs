//! Timeline history files, `<timeline>.history` (eight hex digits, `TLHistoryFileName`): one line
//! per ancestor, `<parent timeline>\t<switch LSN>\t<reason>`, oldest first, as
//! `writeTimeLineHistory` writes them and `TIMELINE_HISTORY` sends them.

use crate::lsn::{format_lsn, parse_lsn};

/// Suffix of a history file name.
pub const HISTORY_SUFFIX: &str = ".history";

/// One line of a history file: `timeline` ended at `switch_lsn`, where its child began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub timeline: u32,
    /// The first LSN that is not on `timeline` any more (the child's WAL starts here).
    pub switch_lsn: u64,
}

impl HistoryEntry {
    /// The line PostgreSQL writes for this entry, newline included.
    pub fn line(&self, reason: &str) -> String {
        format!("{}\t{}\t{reason}\n", self.timeline, format_lsn(self.switch_lsn))
    }
}

/// A history file line that is neither blank, a comment, nor `<timeline> <X/Y> <reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: expected `<timeline> <X/Y> <reason>`")]
pub struct HistoryError {
    /// 1-based line number in the file.
    pub line: usize,
}

/// Parses a history file; comments and blank lines are skipped, malformed lines are an error.
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, HistoryError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let timeline = fields.next().and_then(|f| f.parse().ok());
        let switch_lsn = fields.next().and_then(parse_lsn);
        match (timeline, switch_lsn) {
            (Some(timeline), Some(switch_lsn)) => out.push(HistoryEntry { timeline, switch_lsn }),
            _ => return Err(HistoryError { line: i + 1 }),
        }
    }
    Ok(out)
}

/// Where `timeline` ends according to the history of a later timeline, and which timeline follows.
pub fn switch_point(history: &[HistoryEntry], timeline: u32, newest: u32) -> Option<(u64, u32)> {
    let idx = history.iter().position(|e| e.timeline == timeline)?;
    let next = history.get(idx + 1).map(|e| e.timeline).unwrap_or(newest);
    Some((history[idx].switch_lsn, next))
}

/// PostgreSQL's name for the history file of `timeline` (`00000002.history`).
pub fn history_file_name(timeline: u32) -> String {
    format!("{timeline:08X}{HISTORY_SUFFIX}")
}

/// The timeline whose history file `name` is; `None` for any other name.
pub fn parse_history_file_name(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(HISTORY_SUFFIX)?;
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_finds_switch_points() {
        let h = parse_history("1\t0/3000160\tno recovery target specified\n\n2\t0/5000000\tbefore 2026\n").unwrap();
        assert_eq!(
            h,
            vec![
                HistoryEntry { timeline: 1, switch_lsn: 0x3000160 },
                HistoryEntry { timeline: 2, switch_lsn: 0x5000000 }
            ]
        );
        assert_eq!(switch_point(&h, 1, 3), Some((0x3000160, 2)));
        assert_eq!(switch_point(&h, 2, 3), Some((0x5000000, 3)));
        assert_eq!(switch_point(&h, 3, 3), None);
        assert!(parse_history("x y\n").is_err());
        assert_eq!(parse_history("# comment\n1 0/5\n2\n"), Err(HistoryError { line: 3 }));
        assert_eq!(HistoryError { line: 3 }.to_string(), "line 3: expected `<timeline> <X/Y> <reason>`");
        assert_eq!(parse_history(""), Ok(vec![]));
    }

    #[test]
    fn lines_parse_back() {
        let entries = [
            HistoryEntry { timeline: 1, switch_lsn: 0x3000160 },
            HistoryEntry { timeline: 2, switch_lsn: 0x1_0000_0000 },
        ];
        assert_eq!(entries[0].line("no recovery target specified"), "1\t0/3000160\tno recovery target specified\n");
        let text: String = entries.iter().map(|e| e.line("failover")).collect();
        assert_eq!(parse_history(&text).unwrap(), entries);
    }

    #[test]
    fn file_names() {
        assert_eq!(history_file_name(2), "00000002.history");
        assert_eq!(history_file_name(0x1A), "0000001A.history");
        assert_eq!(parse_history_file_name("0000001A.history"), Some(0x1A));
        assert_eq!(parse_history_file_name("0000001a.history"), Some(0x1A));
        for bad in ["00000002", "2.history", "000000002.history", "+0000002.history", "000000010000000000000002"] {
            assert_eq!(parse_history_file_name(bad), None, "{bad}");
        }
    }
}
