//! Printing shared by the commands: JSON on stdout, progress bars on a terminal, drill reports.

use std::path::Path;

use anyhow::{Context, Result};

/// `value` as pretty JSON on stdout (what every `--json` prints).
pub fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A progress bar counting objects, on a terminal only.
pub fn progress_count_bar(enabled: bool, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    let style =
        indicatif::ProgressStyle::with_template(&format!("{what} [{{bar:40}}] {{pos}}/{{len}} objects eta {{eta}}"))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

/// A progress bar counting bytes, on a terminal only.
pub fn progress_bar(enabled: bool, what: &'static str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} [{{bar:40}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

/// Prints a drill's report (markdown, or JSON) and writes it to `path` (and `path.json`).
pub fn drill_report(report: &pitr_drill::DrillReport, path: Option<&Path>, json: bool) -> Result<()> {
    let markdown = pitr_drill::render_markdown(report);
    if let Some(path) = path {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        let json_path = path.with_extension("json");
        std::fs::write(&json_path, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
    }
    if json {
        print_json(report)?;
    } else {
        print!("{markdown}");
    }
    Ok(())
}
