//! The final summary: one row per comparison of issue 15, with the peer's value, pitr's, the
//! ratio, the goal and whether it is met.

use std::fmt::Write as _;

/// What a row's goal is.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// ratio >= x
    RatioAtLeast(f64),
    /// ratio > x
    RatioAbove(f64),
    /// ratio <= x
    RatioAtMost(f64),
    /// pitr's value <= x (in the row's unit)
    PitrAtMost(f64),
    /// Information only.
    None,
}

#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub peer: Option<f64>,
    pub pitr: Option<f64>,
    pub ratio: Option<f64>,
    pub goal: Goal,
    /// Shown after the goal (e.g. "at the default size only").
    pub note: String,
}

impl Row {
    pub fn new(name: impl Into<String>, unit: &'static str) -> Row {
        Row { name: name.into(), unit, peer: None, pitr: None, ratio: None, goal: Goal::None, note: String::new() }
    }
    pub fn peer(mut self, v: f64) -> Row {
        self.peer = Some(v);
        self
    }
    pub fn pitr(mut self, v: f64) -> Row {
        self.pitr = Some(v);
        self
    }
    pub fn ratio(mut self, v: f64) -> Row {
        self.ratio = Some(v);
        self
    }
    pub fn goal(mut self, g: Goal) -> Row {
        self.goal = g;
        self
    }
    pub fn note(mut self, n: impl Into<String>) -> Row {
        self.note = n.into();
        self
    }

    /// Some(met) for rows with a goal and the values it needs.
    pub fn met(&self) -> Option<bool> {
        let ok = |v: Option<f64>| v.filter(|x| !x.is_nan());
        match self.goal {
            Goal::RatioAtLeast(x) => ok(self.ratio).map(|r| r >= x),
            Goal::RatioAbove(x) => ok(self.ratio).map(|r| r > x),
            Goal::RatioAtMost(x) => ok(self.ratio).map(|r| r <= x),
            Goal::PitrAtMost(x) => ok(self.pitr).map(|p| p <= x),
            Goal::None => None,
        }
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::RatioAtLeast(x) => format!(">= {x}x"),
            Goal::RatioAbove(x) => format!("> {x}x"),
            Goal::RatioAtMost(x) => format!("<= {x}x"),
            Goal::PitrAtMost(x) => format!("<= {} {}", fmt_num(x), self.unit),
            Goal::None => "-".into(),
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.is_infinite() {
        "inf".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt_val(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if unit.is_empty() => fmt_num(v),
        Some(v) => format!("{} {unit}", fmt_num(v)),
        None => "-".into(),
    }
}

/// The summary table as text.
pub fn table(rows: &[Row]) -> String {
    let headers = ["row", "peer", "pitr", "ratio", "goal", "met"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let goal = if r.note.is_empty() { r.goal_text() } else { format!("{} ({})", r.goal_text(), r.note) };
            [
                r.name.clone(),
                fmt_val(r.peer, r.unit),
                fmt_val(r.pitr, r.unit),
                r.ratio.map_or("-".into(), |x| format!("{}x", fmt_num(x))),
                goal,
                match r.met() {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let mut width = headers.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: &[String]| {
        let _ = writeln!(
            out,
            "{:<w0$} | {:>w1$} | {:>w2$} | {:>w3$} | {:<w4$} | {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4]
        );
    };
    line(&mut out, &headers.map(String::from));
    let _ = writeln!(out, "{}", "-".repeat(width.iter().sum::<usize>() + 3 * 5 + 3));
    for c in &cells {
        line(&mut out, c);
    }
    out
}
