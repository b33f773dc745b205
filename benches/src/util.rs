//! Small helpers shared by the phases: process CPU time, directory sizes, percentiles, pgbench
//! output, the machine description printed at start and end.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

pub const MIB: f64 = 1024.0 * 1024.0;
pub const GIB: f64 = 1024.0 * MIB;

pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: field 3 (state) is f[0]; utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Bytes of regular files under `p` (not following symlinks).
pub fn dir_bytes(p: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(p).map(|rd| rd.flatten().map(|e| dir_bytes(&e.path())).sum()).unwrap_or(0)
    } else {
        meta.len()
    }
}

/// Removes terminal colour sequences (`ESC [ ... m`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `n` lines of a log file, colours removed.
pub fn log_tail(p: &Path, n: usize) -> String {
    let text = strip_ansi(&std::fs::read_to_string(p).unwrap_or_default());
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of a sorted slice (NaN when empty).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

pub fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    s.sort_by(f64::total_cmp);
    s
}

/// p50 / p99 / max of a series, in the series' unit.
#[derive(Clone, Copy, Debug)]
pub struct Dist {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    pub fn of(v: &[f64]) -> Dist {
        let s = sorted(v);
        Dist {
            n: s.len(),
            p50: pct(&s, 50.0),
            p90: pct(&s, 90.0),
            p99: pct(&s, 99.0),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }
}

pub fn mibs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB / secs
}

/// A number from a pgbench summary line such as `tps = 3117.12 (without initial connection time)`
/// or `latency average = 1.283 ms`.
pub fn pgbench_value(out: &str, prefix: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.trim_start().starts_with(prefix))
        .and_then(|l| l.split_once('='))
        .and_then(|(_, v)| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn nproc() -> String {
    std::thread::available_parallelism().map(|n| n.get().to_string()).unwrap_or_else(|_| "?".into())
}

/// First line of `<bin> --version`, or a note saying why not.
pub fn version_of(bin: &Path) -> String {
    match Command::new(bin).arg("--version").stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Ok(o) => format!("({} --version failed: {})", bin.display(), o.status),
        Err(e) => format!("({} --version: {e})", bin.display()),
    }
}

pub fn machine_info() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("nproc={}, cpu={cpu}, mem={mem}, kernel={kernel}", nproc())
}

/// Runs `cmd` to completion; fails with its output unless it exits 0. Returns stdout.
pub fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` and returns its value with the wall-clock seconds it took.
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

/// `PITR_BIN`, or a release build made now (a debug binary would not be a fair comparison).
pub fn ensure_release_pitr() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PITR_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.components().any(|c| c.as_os_str() == "debug") {
            eprintln!("warning: PITR_BIN={} looks like a debug build; the comparison is not fair", p.display());
        }
        if !p.is_file() {
            bail!("PITR_BIN={} does not exist", p.display());
        }
        return Ok(p);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // This crate's workspace (the parent of benches/), wherever it was built.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(manifest).to_path_buf();
    eprintln!("building the release pitr binary: {cargo} build --release -p pitr --bin pitr");
    let out = Command::new(&cargo)
        .args(["build", "--release", "-p", "pitr", "--bin", "pitr", "--message-format=json-render-diagnostics"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo} build"))?;
    if !out.status.success() {
        bail!("`cargo build --release -p pitr` failed ({})", out.status);
    }
    let mut exe = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "pitr" {
            if let Some(e) = msg["executable"].as_str() {
                exe = Some(PathBuf::from(e));
            }
        }
    }
    let exe = match exe {
        Some(e) => e,
        None => {
            let target =
                std::env::var_os("CARGO_TARGET_DIR").map(|t| root.join(t)).unwrap_or_else(|| root.join("target"));
            target.join("release").join("pitr")
        }
    };
    if !exe.is_file() {
        bail!("release build reported no pitr executable ({})", exe.display());
    }
    // Set before any thread exists (the tokio runtime is created afterwards).
    std::env::set_var("PITR_BIN", &exe);
    Ok(exe)
}
