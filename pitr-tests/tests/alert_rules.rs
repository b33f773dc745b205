//! The shipped Prometheus alert rules (`docker/prometheus`): promtool accepts the rules and the
//! example config, the rules' unit tests pass (and cover every alert firing and staying silent),
//! and the seed runbook's two rules are still there verbatim.
//!
//! promtool comes from Debian's `prometheus` package, installed on first use when we are root
//! (see [`pitr_tests::promtool`]); only the binary is used, never the Prometheus service.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const ALERTS: &str = "docker/prometheus/alerts.yml";
const ALERTS_TEST: &str = "docker/prometheus/alerts_test.yml";
const CONFIG: &str = "docker/prometheus/prometheus.yml";

/// Every alert alerts.yml must define.
const ALERT_NAMES: &[&str] = &[
    "BackupFailed",
    "BackupSizeAnomaly",
    "WalArchiveLagHigh",
    "BackupTooOld",
    "RestoreDrillFailed",
    "PitrPredictedRtoAboveTarget",
    "PitrSidecarDown",
    "PitrStreamDisconnected",
    "PitrLeaseUnconfirmed",
    "EncryptionKeyTooOld",
    "EncryptionKeyAccessFailure",
    "FileChecksumMismatch",
    "BackupFilesMissing",
    "BackupOverdue",
];

/// The seed runbook's rules, which users already run: they must stay exactly as they are.
const SEED_RULES: &str = r#"groups:
  - name: backup.alerts
    rules:
      - alert: BackupFailed
        expr: backup_success{job="backup"} == 0
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: "Backup failed for {{ $labels.backup_type }}"
      - alert: BackupSizeAnomaly
        expr: backup_size_bytes < backup_size_bytes offset 7d * 0.8
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: "Backup size significantly smaller than expected"
"#;

fn read(rel: &str) -> String {
    let path = pitr_tests::workspace_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())).replace("\r\n", "\n")
}

fn promtool_bin() -> PathBuf {
    pitr_tests::promtool().unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs promtool with `args` in the workspace root; panics with its output unless it exits 0.
/// Returns stdout and stderr together.
fn promtool(args: &[&str]) -> String {
    let bin = promtool_bin();
    let out = Command::new(&bin)
        .args(args)
        .current_dir(pitr_tests::workspace_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    let text = format!(
        "$ {} {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        bin.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    assert!(out.status.success(), "promtool failed ({}):\n{text}", out.status);
    println!("{text}");
    text
}

#[test]
fn promtool_check_rules() {
    let out = promtool(&["check", "rules", ALERTS]);
    assert!(out.contains("SUCCESS"), "{out}");
    assert!(!out.to_lowercase().contains("duplicate"), "promtool found duplicate rules:\n{out}");
}

#[test]
fn promtool_check_config() {
    // rule_files are resolved relative to the config file, so this also checks alerts.yml is found.
    let out = promtool(&["check", "config", CONFIG]);
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
    assert!(out.contains("alerts.yml"), "{out}");
}

#[test]
fn promtool_test_rules() {
    let out = promtool(&["test", "rules", ALERTS_TEST]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn seed_rules_are_kept_verbatim_and_every_alert_is_defined() {
    let rules = read(ALERTS);
    assert!(
        rules.contains(SEED_RULES),
        "{ALERTS} must contain the seed runbook's rules exactly as users run them:\n{SEED_RULES}"
    );
    for name in ALERT_NAMES {
        assert!(rules.contains(&format!("- alert: {name}\n")), "{ALERTS} does not define {name}");
    }
    // The rules added beside the seed's: a `for`, a severity and full annotations each.
    for block in rules.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap_or_default().trim();
        if name == "BackupFailed" || name == "BackupSizeAnomaly" {
            continue;
        }
        assert!(ALERT_NAMES.contains(&name), "{ALERTS} defines an unexpected alert {name:?}");
        for key in ["expr:", "for:", "severity:", "summary:", "description:", "runbook_url:"] {
            assert!(block.contains(key), "alert {name} in {ALERTS} has no `{key}`");
        }
    }
}

#[test]
fn every_alert_has_firing_and_silent_test_cases() {
    let tests = read(ALERTS_TEST);
    let (mut firing, mut silent) = (BTreeSet::new(), BTreeSet::new());
    let mut current: Option<&str> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim());
        } else if let Some(exp) = line.strip_prefix("exp_alerts:") {
            let name = current.take().unwrap_or_else(|| panic!("{ALERTS_TEST}: exp_alerts without an alertname"));
            if exp.trim() == "[]" {
                silent.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    for name in ALERT_NAMES {
        assert!(firing.contains(name), "{ALERTS_TEST} has no case where {name} fires");
        assert!(silent.contains(name), "{ALERTS_TEST} has no case where {name} stays silent");
    }
}

/// GitHub's anchor of a Markdown heading: lower case, spaces become `-`, other punctuation goes.
fn heading_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_runbook_url_points_at_a_heading_of_operations_md() {
    const RUNBOOK: &str = "docs/operations.md";
    let rules = read(ALERTS);
    // Lines starting with `#` inside fenced code blocks (shell comments) are not headings.
    let mut in_code = false;
    let anchors: BTreeSet<String> = read(RUNBOOK)
        .lines()
        .filter(|line| {
            in_code ^= line.starts_with("```");
            !in_code
        })
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| heading_anchor(heading.trim_start_matches('#')))
        .collect();
    let mut links = 0;
    for line in rules.lines().map(str::trim) {
        let Some(url) = line.strip_prefix("runbook_url:") else { continue };
        let url = url.trim().trim_matches('"');
        let anchor = url
            .strip_prefix(RUNBOOK)
            .and_then(|rest| rest.strip_prefix('#'))
            .unwrap_or_else(|| panic!("{ALERTS}: runbook_url {url:?} does not point into {RUNBOOK}"));
        assert!(anchors.contains(anchor), "{ALERTS}: runbook_url {url:?} names no heading of {RUNBOOK}");
        links += 1;
    }
    // Every alert but the seed's two (which have no runbook_url) has one.
    assert!(links >= ALERT_NAMES.len() - 2, "{ALERTS}: only {links} runbook_url lines");
}

#[test]
fn example_config_scrapes_pitr_and_feeds_the_seed_rules_job() {
    let config = read(CONFIG);
    // PitrSidecarDown watches up{job="pitr"}; the seed's BackupFailed selects job="backup".
    assert!(config.contains("job_name: pitr"), "{CONFIG} has no `pitr` scrape job");
    assert!(config.contains(":9187"), "{CONFIG} does not scrape the sidecar's port 9187");
    assert!(
        config.contains("regex: backup_success|backup_size_bytes") && config.contains("replacement: backup"),
        "{CONFIG} does not move backup_success and backup_size_bytes into job=\"backup\""
    );
}
