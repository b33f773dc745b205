//! Password lookup in the libpq password file (`PGPASSFILE`, default `~/.pgpass`).
//!
//! Lines are `hostname:port:database:username:password`; `*` matches anything; `\:` and `\\`
//! escape. As libpq does, a file readable by group or others is ignored (with a warning).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::conninfo::Host;

fn pgpass_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGPASSFILE") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass"))
}

pub(crate) fn lookup(host: &Host, dbname: &str, user: &str) -> Option<String> {
    let path = pgpass_path()?;
    let meta = std::fs::metadata(&path).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "password file has group or world access; ignoring it (chmod 600)");
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let (hostname, port) = match host {
        Host::Tcp { host, port } => (host.clone(), *port),
        // libpq matches Unix-socket connections against "localhost".
        Host::Unix { port, .. } => ("localhost".to_string(), *port),
    };
    find(&text, &hostname, &port.to_string(), dbname, user)
}

fn find(text: &str, host: &str, port: &str, dbname: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_fields(line);
        if fields.len() != 5 {
            continue;
        }
        let matches = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        if matches(&fields[0], host)
            && matches(&fields[1], port)
            && matches(&fields[2], dbname)
            && matches(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    if let Some(f) = fields.last_mut() {
                        f.push(n);
                    }
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_wildcards_and_escapes() {
        let text = "# comment\nother:5432:*:rep:nope\n127.0.0.1:*:*:rep:pa\\:ss\\\\w:rd\n";
        assert_eq!(find(text, "127.0.0.1", "5433", "replication", "rep").as_deref(), Some("pa:ss\\w:rd"));
        assert_eq!(find(text, "127.0.0.1", "5433", "replication", "x"), None);
    }
}
