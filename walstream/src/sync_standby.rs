//! Whether the primary waits for this sidecar: `synchronous_standby_names` read as PostgreSQL
//! reads it (`syncrep_scanner.l`, `syncrep_gram.y`, and the matching in `syncrep.c`), and the
//! flush spacing that follows from it under `flush_interval = "auto"`.
//!
//! Spacing puts a few milliseconds apart cuts the sidecar's CPU by half beside a busy primary,
//! but a synchronous standby's every commit waits out the spacing. So the spacing is the
//! configured one only while the primary's setting does not name us; it is 0 while it does, and
//! while pitr cannot tell (not read yet, or unreadable).
//!
//! The parsing is pure; the watcher at the end is the I/O edge (an ordinary SQL connection that
//! reads the setting every [`WATCH_INTERVAL`], since a reload changes it without touching the
//! replication connection).

use std::sync::Arc;
use std::time::Duration;

use pitr_pgwire::connection::{ConnectOptions, Connection};
use pitr_pgwire::ConnInfo;
use tokio::sync::watch;

use crate::api::FlushInterval;
use crate::uploader::Shared;

/// How often the watcher reads `synchronous_standby_names`: how long a reload that makes the
/// sidecar a synchronous standby can leave commits waiting out the spacing.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Longest a connect or one query of the watcher may take before it counts as failed (and the
/// spacing falls to 0 until it answers again).
const WATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How the primary picks its synchronous standbys from the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMethod {
    /// `FIRST n (…)`, `n (…)` or a bare list: the first `n` connected, in list order.
    Priority,
    /// `ANY n (…)`: any `n` of them.
    Quorum,
}

/// A parsed, non-empty `synchronous_standby_names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncStandbys {
    /// How the standbys are picked.
    pub method: SyncMethod,
    /// How many must confirm a commit.
    pub num_sync: u32,
    /// The names, quotes removed (`*` stands for any standby).
    pub names: Vec<String>,
}

/// `synchronous_standby_names` that PostgreSQL would not have accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read synchronous_standby_names {value:?}: {why}")]
pub struct SyncNamesError {
    /// The setting as read.
    pub value: String,
    /// What is wrong with it.
    pub why: String,
}

impl SyncStandbys {
    /// Whether a standby connecting as `application_name` may be waited for: listed by name (the
    /// server compares case-insensitively) or by `*`. A standby listed but not (yet) picked under
    /// `FIRST` counts too: it becomes synchronous, without a reconnect, when one before it drops.
    pub fn lists(&self, application_name: &str) -> bool {
        self.names.iter().any(|n| n == "*" || n.eq_ignore_ascii_case(application_name))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Name(String),
    Num(String),
    Any,
    First,
    Comma,
    Open,
    Close,
}

fn tokens(value: &str) -> Result<Vec<Token>, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    // Non-ASCII bytes may start and continue an identifier, as in the server's scanner.
    let starts = |b: u8| b.is_ascii_alphabetic() || b == b'_' || b >= 0x80;
    let continues = |b: u8| starts(b) || b.is_ascii_digit() || b == b'$';
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b => i += 1,
            b',' | b'(' | b')' | b'*' => {
                out.push(match b {
                    b',' => Token::Comma,
                    b'(' => Token::Open,
                    b')' => Token::Close,
                    _ => Token::Name("*".into()),
                });
                i += 1;
            }
            b'"' => {
                let mut name = Vec::new();
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return Err("unterminated quoted identifier".into()),
                        Some(b'"') if bytes.get(i + 1) == Some(&b'"') => {
                            name.push(b'"');
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            name.push(c);
                            i += 1;
                        }
                    }
                }
                out.push(Token::Name(String::from_utf8_lossy(&name).into_owned()));
            }
            b if b.is_ascii_digit() => {
                let start = i;
                while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                out.push(Token::Num(value[start..i].to_string()));
            }
            b if starts(b) => {
                let start = i;
                while bytes.get(i).is_some_and(|&c| continues(c)) {
                    i += 1;
                }
                let word = String::from_utf8_lossy(&bytes[start..i]).into_owned();
                // The keywords only as whole words: `anyone` and `first_dc` are names.
                out.push(if word.eq_ignore_ascii_case("any") {
                    Token::Any
                } else if word.eq_ignore_ascii_case("first") {
                    Token::First
                } else {
                    Token::Name(word)
                });
            }
            _ => return Err(format!("syntax error at or near {:?}", (b as char))),
        }
    }
    Ok(out)
}

/// Parses `synchronous_standby_names`; `None` for an empty setting (no synchronous standbys).
pub fn parse(value: &str) -> Result<Option<SyncStandbys>, SyncNamesError> {
    let err = |why: String| SyncNamesError { value: value.to_string(), why };
    let tokens = tokens(value).map_err(err)?;
    if tokens.is_empty() {
        return Ok(None);
    }
    let (method, num, list) = match tokens.as_slice() {
        [Token::Any, Token::Num(n), Token::Open, list @ .., Token::Close] => (SyncMethod::Quorum, n.as_str(), list),
        [Token::First, Token::Num(n), Token::Open, list @ .., Token::Close] => (SyncMethod::Priority, n.as_str(), list),
        [Token::Num(n), Token::Open, list @ .., Token::Close] => (SyncMethod::Priority, n.as_str(), list),
        list => (SyncMethod::Priority, "1", list),
    };
    let mut names = Vec::new();
    for (i, t) in list.iter().enumerate() {
        match (i % 2, t) {
            (0, Token::Name(n) | Token::Num(n)) => names.push(n.clone()),
            (1, Token::Comma) => {}
            _ => return Err(err(format!("syntax error at or near {t:?}"))),
        }
    }
    if names.is_empty() || list.len() % 2 == 0 {
        return Err(err("syntax error: a standby name is missing".into()));
    }
    let num_sync = num.parse::<u32>().map_err(|_| err(format!("{num} is not a number of standbys")))?;
    if num_sync == 0 {
        return Err(err("the number of synchronous standbys must be greater than zero".into()));
    }
    Ok(Some(SyncStandbys { method, num_sync, names }))
}

/// Whether the primary with this `synchronous_standby_names` may wait for `application_name`.
pub fn names_standby(value: &str, application_name: &str) -> Result<bool, SyncNamesError> {
    Ok(parse(value)?.is_some_and(|s| s.lists(application_name)))
}

/// The spacing between chunk puts: `flush_interval` as configured, or under `auto` its spacing
/// while the primary is known not to wait for us (`synchronous`: `Some(false)`), else 0.
pub fn spacing(flush_interval: FlushInterval, synchronous: Option<bool>) -> Duration {
    match flush_interval {
        FlushInterval::Fixed(d) => d,
        FlushInterval::Auto { when_async } if synchronous == Some(false) => when_async,
        FlushInterval::Auto { .. } => Duration::ZERO,
    }
}

/// What the watcher needs.
pub(crate) struct Watcher {
    /// `[postgres] conninfo`: an ordinary (SQL) connection is opened with it.
    pub conninfo: ConnInfo,
    /// The replication connection's application name, as the primary sees it.
    pub application_name: String,
    pub flush_interval: FlushInterval,
    pub pipeline: Arc<Shared>,
    /// What the watcher last learnt: `Some(true)` named, `Some(false)` not, `None` unknown.
    pub synchronous: watch::Sender<Option<bool>>,
}

impl Watcher {
    /// Reads the setting every [`WATCH_INTERVAL`] until aborted, and sets the pipeline's spacing
    /// from it. Any failure sets the spacing to 0 (as for a synchronous standby) until a read
    /// succeeds again: unsure, pitr never makes commits wait.
    pub async fn run(self) {
        let opts =
            ConnectOptions { replication: false, application_name: format!("{} sync watch", self.application_name) };
        let mut conn: Option<Connection> = None;
        let mut failing = false;
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let read = tokio::time::timeout(WATCH_TIMEOUT, async {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => conn.insert(Connection::connect(&self.conninfo, &opts).await?),
                };
                c.show("synchronous_standby_names").await
            })
            .await;
            let observed = match read {
                Ok(Ok(value)) => names_standby(&value, &self.application_name).map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(format!("reading synchronous_standby_names on {}: {e}", self.conninfo.redacted())),
                Err(_) => Err(format!(
                    "reading synchronous_standby_names on {}: no answer within {} s",
                    self.conninfo.redacted(),
                    WATCH_TIMEOUT.as_secs()
                )),
            };
            let synchronous = match observed {
                Ok(named) => {
                    if failing {
                        tracing::info!(synchronous = named, "synchronous_standby_names readable again");
                        failing = false;
                    }
                    Some(named)
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            error = %e,
                            "flush_interval = \"auto\": cannot tell whether the primary waits for this sidecar; \
                             putting WAL without spacing until it can (retrying every second)"
                        );
                        failing = true;
                    }
                    conn = None;
                    None
                }
            };
            self.apply(synchronous);
        }
    }

    fn apply(&self, synchronous: Option<bool>) {
        let d = spacing(self.flush_interval, synchronous);
        let before = *self.synchronous.borrow();
        if before != synchronous && synchronous.is_some() {
            tracing::info!(
                synchronous = synchronous == Some(true),
                spacing_ms = d.as_secs_f64() * 1000.0,
                "synchronous_standby_names {} this sidecar: WAL put spacing set",
                if synchronous == Some(true) { "names" } else { "does not name" }
            );
        }
        self.synchronous.send_replace(synchronous);
        if self.pipeline.with(|p| p.set_flush_interval(d)) {
            self.pipeline.wake_uploader();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &str) -> Vec<String> {
        parse(v).unwrap().unwrap().names
    }

    #[test]
    fn every_form_the_server_accepts() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("  \t").unwrap(), None);
        let s = parse("pitr_main").unwrap().unwrap();
        assert_eq!((s.method, s.num_sync, s.names.clone()), (SyncMethod::Priority, 1, vec!["pitr_main".to_string()]));
        let s = parse("FIRST 2 (a, b, c)").unwrap().unwrap();
        assert_eq!((s.method, s.num_sync), (SyncMethod::Priority, 2));
        assert_eq!(s.names, ["a", "b", "c"]);
        let s = parse("any 1 (s1,\"Pitr Main\")").unwrap().unwrap();
        assert_eq!((s.method, s.num_sync), (SyncMethod::Quorum, 1));
        assert_eq!(s.names, ["s1", "Pitr Main"]);
        let s = parse("2(a,b)").unwrap().unwrap();
        assert_eq!((s.method, s.num_sync), (SyncMethod::Priority, 2));
        assert_eq!(names("a, b ,c"), ["a", "b", "c"]);
        assert_eq!(names("*"), ["*"]);
        // Numbers are names in a list; quotes keep keywords, case and doubled quotes.
        assert_eq!(names("1, 2"), ["1", "2"]);
        assert_eq!(names("\"any\", \"a\"\"b\""), ["any", "a\"b"]);
        // Only whole words are keywords.
        assert_eq!(names("anyone, first_dc, s$1"), ["anyone", "first_dc", "s$1"]);
    }

    #[test]
    fn what_the_server_would_refuse_is_an_error() {
        for bad in ["a,", ",a", "a b", "ANY (a)", "FIRST 0 (a)", "ANY 1 ()", "\"a", "a-b", "1 (a", "any", "(a)"] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(e.value, bad);
        }
    }

    #[test]
    fn names_match_as_the_server_matches_them() {
        assert!(names_standby("pitr_main", "PITR_main").unwrap());
        assert!(names_standby("FIRST 1 (replica1, pitr_main)", "pitr_main").unwrap());
        assert!(names_standby("ANY 2 (\"*\", x)", "anything").unwrap());
        assert!(names_standby("*", "pitr_main").unwrap());
        assert!(!names_standby("replica1, replica2", "pitr_main").unwrap());
        assert!(!names_standby("", "pitr_main").unwrap());
        assert!(!names_standby("pitr", "pitr_main").unwrap());
    }

    #[test]
    fn auto_spaces_puts_only_where_the_primary_is_known_not_to_wait() {
        let auto = FlushInterval::Auto { when_async: Duration::from_millis(2) };
        assert_eq!(spacing(auto, Some(false)), Duration::from_millis(2));
        assert_eq!(spacing(auto, Some(true)), Duration::ZERO);
        assert_eq!(spacing(auto, None), Duration::ZERO);
        let fixed = FlushInterval::Fixed(Duration::from_secs(1));
        for s in [None, Some(true), Some(false)] {
            assert_eq!(spacing(fixed, s), Duration::from_secs(1));
        }
    }
}
