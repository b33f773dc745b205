//! What a drill checks on the restored server: the operator's checks file and the comparison of a
//! check's first value with its expectation. Running a check is the database's business.

use std::fmt;

/// A checks file: `[[check]]` tables.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksFile {
    /// Every check, in file order; each drill runs those of its own database.
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckSpec>,
}

/// One check: a SQL query (PostgreSQL drills), or a count of the documents of `collection`
/// matching `filter` (MongoDB drills; `database` is then the MongoDB database). `expect`: `rows`,
/// `no rows`, or a comparison of the first value of the first row (the count): `> N`, `>= N`,
/// `< N`, `<= N`, `= V`, `!= V`. `recorded`: values of the same check taken on the primary at
/// given moments; a drill to exactly such a moment expects that value. A drill skips the checks
/// of the other source.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Shown in the report.
    pub name: String,
    /// A query whose first value is compared (PostgreSQL).
    pub sql: Option<String>,
    /// A collection whose matching documents are counted (MongoDB).
    pub collection: Option<String>,
    /// MongoDB query filter, as a TOML table (default: every document).
    pub filter: Option<serde_json::Map<String, serde_json::Value>>,
    /// The database the check runs in (default `postgres`).
    #[serde(default = "default_database")]
    pub database: String,
    /// What the value must be, when no recorded value applies.
    pub expect: Option<String>,
    /// Values taken on the primary at given moments.
    #[serde(default)]
    pub recorded: Vec<Recorded>,
}

/// A check's value taken on the primary at a moment.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    /// The moment, as `--to` takes it.
    pub at: String,
    /// The value then.
    pub value: String,
}

fn default_database() -> String {
    "postgres".into()
}

impl ChecksFile {
    /// Every check is one of a SQL check or a MongoDB count, named.
    pub fn validate(&self) -> Result<(), String> {
        for c in &self.checks {
            match (&c.sql, &c.collection) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => return Err(format!("check {:?}: give either `sql` or `collection`", c.name)),
            }
            if c.sql.is_some() && c.filter.is_some() {
                return Err(format!("check {:?}: `filter` goes with `collection`, not `sql`", c.name));
            }
        }
        Ok(())
    }
}

impl CheckSpec {
    /// What this drill expects of the check: `= <value>` when a value was recorded at the drill's
    /// target (`recorded_at_target` says whether a `recorded.at` is that moment), else `expect`.
    /// `Err` is the check reported skipped: it has nothing to compare with.
    pub fn expectation(&self, recorded_at_target: impl Fn(&str) -> bool) -> Result<String, CheckResult> {
        match (self.recorded.iter().find(|r| recorded_at_target(&r.at)), &self.expect) {
            (Some(r), _) => Ok(format!("= {}", r.value)),
            (None, Some(e)) => Ok(e.clone()),
            (None, None) => Err(CheckResult {
                name: self.name.clone(),
                result: CheckStatus::Skipped,
                detail: "no expectation, and no value recorded on the primary for this target".into(),
            }),
        }
    }
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// The value met the expectation.
    Pass,
    /// It did not, or the check could not run.
    Fail,
    /// Nothing to run it with (no tool, no expectation).
    Skipped,
}

impl CheckStatus {
    /// `pass`, `fail` or `skipped`, as reports write it.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Pass => "pass",
            CheckStatus::Fail => "fail",
            CheckStatus::Skipped => "skipped",
        }
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One check's line in the report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckResult {
    /// The check's name; built-in checks start with `built-in:`.
    pub name: String,
    /// How it came out.
    pub result: CheckStatus,
    /// The value found, or what went wrong.
    pub detail: String,
}

impl CheckResult {
    /// A check that ran: passed if `ok`.
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> CheckResult {
        CheckResult {
            name: name.into(),
            result: if ok { CheckStatus::Pass } else { CheckStatus::Fail },
            detail: detail.into(),
        }
    }

    /// A check that could not run, and why.
    pub fn skipped(name: impl Into<String>, detail: impl Into<String>) -> CheckResult {
        CheckResult { name: name.into(), result: CheckStatus::Skipped, detail: detail.into() }
    }

    /// Whether this is one of pitr's own checks rather than the operator's.
    pub fn is_built_in(&self) -> bool {
        self.name.starts_with("built-in")
    }
}

/// Compares a check's first value with an expectation: `first` is `None` for no rows,
/// `Some(None)` for a NULL.
pub fn evaluate(expect: &str, first: &Option<Option<String>>) -> Result<(), String> {
    let expect = expect.trim();
    match expect {
        "rows" => return first.as_ref().map(|_| ()).ok_or_else(|| "returned no rows".to_string()),
        "no rows" => return if first.is_none() { Ok(()) } else { Err("returned rows".into()) },
        _ => {}
    }
    let value = match first {
        None => return Err("returned no rows".into()),
        Some(None) => return Err("returned NULL".into()),
        Some(Some(v)) => v.clone(),
    };
    let (op, want) = ["!=", ">=", "<=", "=", ">", "<"]
        .iter()
        .find_map(|op| expect.strip_prefix(op).map(|rest| (*op, rest.trim())))
        .ok_or_else(|| {
            format!("unknown expectation {expect:?} (use rows, no rows, > N, >= N, < N, <= N, = V, != V)")
        })?;
    let ok = match op {
        "=" => value == want,
        "!=" => value != want,
        _ => {
            let (v, w): (f64, f64) = match (value.parse(), want.parse()) {
                (Ok(v), Ok(w)) => (v, w),
                _ => return Err(format!("{value:?} {op} {want:?}: not numbers")),
            };
            match op {
                ">" => v > w,
                ">=" => v >= w,
                "<" => v < w,
                _ => v <= w,
            }
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("got {value:?}, expected {op} {want}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations() {
        let v = |s: &str| Some(Some(s.to_string()));
        assert!(evaluate("> 0", &v("5")).is_ok());
        assert!(evaluate("> 10", &v("5")).is_err());
        assert!(evaluate(">= 5", &v("5")).is_ok());
        assert!(evaluate("= abc", &v("abc")).is_ok());
        assert!(evaluate("!= abc", &v("abc")).is_err());
        assert!(evaluate("rows", &v("x")).is_ok());
        assert!(evaluate("rows", &None).is_err());
        assert!(evaluate("no rows", &None).is_ok());
        assert!(evaluate("> 1", &Some(None)).unwrap_err().contains("NULL"));
        assert!(evaluate("~ 1", &v("1")).unwrap_err().contains("unknown"));
        assert!(evaluate("> x", &v("1")).unwrap_err().contains("not numbers"));
    }

    #[test]
    fn a_recorded_value_wins_over_the_expectation() {
        let file: ChecksFile = serde_json::from_value(serde_json::json!({ "check": [{
            "name": "orders", "sql": "select count(*) from orders", "expect": "> 0",
            "recorded": [{ "at": "2026-11-25 14:03:00+00", "value": "42" }],
        }]}))
        .unwrap();
        file.validate().unwrap();
        let spec = &file.checks[0];
        assert_eq!(spec.database, "postgres");
        assert_eq!(spec.expectation(|at| at.starts_with("2026-11-25")), Ok("= 42".to_string()));
        assert_eq!(spec.expectation(|_| false), Ok("> 0".to_string()));
        let bare = CheckSpec { expect: None, ..spec.clone() };
        assert_eq!(bare.expectation(|_| false).unwrap_err().result, CheckStatus::Skipped);
    }

    #[test]
    fn a_check_is_sql_or_a_count() {
        let both: ChecksFile =
            serde_json::from_value(serde_json::json!({ "check": [{ "name": "x", "sql": "s", "collection": "c" }] }))
                .unwrap();
        assert!(both.validate().unwrap_err().contains("either"));
        let filter: ChecksFile =
            serde_json::from_value(serde_json::json!({ "check": [{ "name": "x", "sql": "s", "filter": {} }] }))
                .unwrap();
        assert!(filter.validate().unwrap_err().contains("filter"));
    }

    #[test]
    fn statuses_read_and_write_as_before() {
        let c = CheckResult::new("built-in: x", false, "d");
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"name": "built-in: x", "result": "fail", "detail": "d"})
        );
        assert!(c.is_built_in());
        let back: CheckResult =
            serde_json::from_value(serde_json::json!({"name": "n", "result": "skipped", "detail": ""})).unwrap();
        assert_eq!(back.result, CheckStatus::Skipped);
        assert_eq!(format!("{:<8}|", CheckStatus::Pass), "pass    |");
    }
}
