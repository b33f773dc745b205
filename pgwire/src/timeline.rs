//! Timeline history files: `<parent timeline>\t<switch LSN>\t<reason>` per line.

use crate::messages::parse_lsn;

/// One line of a history file: `timeline` ended at `switch_lsn`, where its child began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    pub timeline: u32,
    pub switch_lsn: u64,
}

/// Parses a history file; comments and blank lines are skipped, malformed lines are an error.
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, String> {
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
            _ => return Err(format!("line {}: expected `<timeline> <X/Y> <reason>`", i + 1)),
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
    }
}
