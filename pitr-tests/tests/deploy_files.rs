//! The deployment files in `docker/`: the Grafana dashboard's queries parse (promtool) and name
//! only metrics a real sidecar exports; the systemd unit passes `systemd-analyze verify`; every
//! Kubernetes manifest passes `kubernetes-validate`, and the PrometheusRule carries alerts.yml's
//! rules exactly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pitr_tests::pitr::PitrEnv;
use pitr_tests::{wait_until, PgCluster, PgOptions};

const DASHBOARD: &str = "docker/grafana/pitr.json";
const UNIT: &str = "docker/systemd/pitr-stream.service";
const K8S_DIR: &str = "docker/k8s";
const ALERTS: &str = "docker/prometheus/alerts.yml";
const PROMETHEUS_RULE: &str = "docker/k8s/prometheusrule.yaml";

fn root_path(rel: &str) -> PathBuf {
    pitr_tests::workspace_root().join(rel)
}

fn lossy(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every panel's query expressions, with the panel's title (rows have none).
fn dashboard_exprs() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(root_path(DASHBOARD)).context("reading the dashboard")?;
    let dashboard: serde_json::Value = serde_json::from_str(&text).context("dashboard JSON")?;
    let mut exprs = Vec::new();
    let mut panels: Vec<&serde_json::Value> =
        dashboard["panels"].as_array().context("dashboard without panels")?.iter().collect();
    while let Some(panel) = panels.pop() {
        // Collapsed rows keep their panels inside.
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        let targets = panel["targets"].as_array().with_context(|| format!("panel {title:?} has no targets"))?;
        if targets.is_empty() {
            bail!("panel {title:?} has no targets");
        }
        for target in targets {
            let expr = target["expr"].as_str().with_context(|| format!("panel {title:?}: target without expr"))?;
            exprs.push((title.clone(), expr.to_string()));
        }
    }
    Ok(exprs)
}

/// Metric names a PromQL expression selects: identifiers outside strings, label matchers and
/// ranges that are neither functions, keywords nor the label lists of `by`/`without`/`on`/…
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        // Aggregations may put `by (…)` between their name and their parenthesis.
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let called = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) {
                    if called {
                        while next < chars.len() && chars[next] != ')' {
                            next += 1;
                        }
                        i = next + 1;
                    }
                } else if !called && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                    names.insert(word);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers, and durations such as 5m after `offset`.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_finds_selectors_only() {
    let names = metric_names(
        r#"sum by (source, set) (increase(pitr_upload_errors_total{instance=~"$instance",job="a{b}"}[5m])) / on (instance) group_left(set) backup_success offset 1d > bool 0.5e3 and time() - pitr_x"#,
    );
    let want: BTreeSet<String> =
        ["pitr_upload_errors_total", "backup_success", "pitr_x"].iter().map(|s| s.to_string()).collect();
    assert_eq!(names, want);
}

#[test]
fn dashboard_queries_parse_with_promtool() -> Result<()> {
    let exprs = dashboard_exprs()?;
    assert!(exprs.len() >= 15, "only {} queries in the dashboard", exprs.len());
    let dir = pitr_tests::scratch_dir("dashboard-rules");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (_, expr)) in exprs.iter().enumerate() {
        // Grafana substitutes the variable before the query leaves it; `.*` is what "All" sends.
        let expr = expr.replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(&expr)?
        ));
    }
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules)?;
    let out = Command::new(pitr_tests::promtool()?).args(["check", "rules"]).arg(&file).output()?;
    assert!(out.status.success(), "promtool check rules on the dashboard's queries:\n{}\n{rules}", lossy(&out));

    // The sidecar variable is in every query, so each panel follows the selection.
    let text = std::fs::read_to_string(root_path(DASHBOARD))?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    let vars = dashboard["templating"]["list"].as_array().context("no template variables")?;
    assert!(vars.iter().any(|v| v["name"] == "instance"), "no `instance` template variable");
    assert_eq!(dashboard["schemaVersion"], 39);
    for (title, expr) in &exprs {
        assert!(expr.contains(r#"instance=~"$instance""#), "panel {title:?} ignores the sidecar variable: {expr}");
    }
    Ok(())
}

/// Names the sidecar declares with `describe_*!` in cli/src/sidecar.rs: metrics that appear in
/// /metrics once their event (a drill, a file-set backup, a key rotation) has happened.
fn described_metric_names() -> Result<BTreeSet<String>> {
    let source = std::fs::read_to_string(root_path("cli/src/sidecar.rs")).context("reading cli/src/sidecar.rs")?;
    let mut names = BTreeSet::new();
    for kind in ["describe_gauge!(", "describe_counter!(", "describe_histogram!("] {
        for piece in source.split(kind).skip(1) {
            let name = piece.trim_start().strip_prefix('"').and_then(|s| s.split('"').next());
            if let Some(name) = name {
                names.insert(name.to_string());
            }
        }
    }
    Ok(names)
}

/// Metric families in a /metrics body: sample names (histogram suffixes folded) and HELP lines.
fn exposition_names(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            names.extend(rest.split_whitespace().next().map(str::to_string));
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or(line);
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            names.insert(name.to_string());
            names.insert(family.to_string());
        }
    }
    names
}

#[test]
fn pg15_dashboard_names_only_exported_metrics() -> Result<()> {
    let cluster = PgCluster::start(PgOptions::new(15))?;
    let mut env = PitrEnv::new("pg15-dashboard", &cluster, "")?;
    env.edit_config("full_backup = \"\"", "full_backup = \"*/20 * * * * *\"")?;
    env.edit_config("verify = \"\"", "verify = \"*/20 * * * * *\"")?;
    env.init()?;
    let _stream = env.spawn_stream()?;
    wait_until("a scheduled backup in /metrics", Duration::from_secs(120), || {
        // Connection refused until the server listens.
        let Ok((code, body)) = env.http_get("/metrics") else { return Ok(false) };
        Ok(code == 200
            && body.contains("backup_success{")
            && body.contains("pitr_recoverable_window_end")
            && body.lines().any(|l| l.starts_with("pitr_verify_findings")))
    })
    .with_context(|| env.stream_logs())?;
    let (_, body) = env.http_get("/metrics")?;
    let live = exposition_names(&body);
    let described = described_metric_names()?;
    // The scrape itself must show what the source declares, or the source scan is stale.
    for name in ["pitr_up", "pitr_archive_lag_bytes", "backup_success", "backup_size_bytes", "pitr_verify_findings"] {
        assert!(live.contains(name) && described.contains(name), "{name}: live {live:?} described {described:?}");
    }
    let mut unknown = Vec::new();
    let mut only_described = BTreeSet::new();
    for (title, expr) in dashboard_exprs()? {
        for name in metric_names(&expr) {
            if live.contains(&name) {
                continue;
            }
            if described.contains(&name) {
                only_described.insert(name);
            } else {
                unknown.push(format!("{title:?}: {name}"));
            }
        }
    }
    assert!(unknown.is_empty(), "dashboard queries name metrics pitr does not export: {unknown:?}\n/metrics:\n{body}");
    eprintln!("named by the dashboard, declared by the sidecar, not yet in this scrape: {only_described:?}");
    Ok(())
}

#[test]
fn systemd_unit_verifies() -> Result<()> {
    let unit = std::fs::read_to_string(root_path(UNIT)).context("reading the unit")?;
    for needed in [
        "ExecStart=/usr/local/bin/pitr stream",
        "User=pitr",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.contains(needed), "{UNIT} lacks {needed:?}");
    }
    // systemd-analyze checks that ExecStart's binary exists; the installed path does not here, so
    // a copy of the unit points at the built binary. Nothing else is changed or tolerated.
    let bin = pitr_tests::pitr_bin();
    let dir = pitr_tests::scratch_dir("systemd-unit");
    let copy = dir.path().join("pitr-stream.service");
    std::fs::write(&copy, unit.replace("ExecStart=/usr/local/bin/pitr ", &format!("ExecStart={} ", bin.display())))?;
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().context("running systemd-analyze")?;
    let said = lossy(&out);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {UNIT}:\n{said}");

    // And it does fail on a broken unit, so the check above means something.
    std::fs::write(&copy, unit.replace("Restart=on-failure", "Restart=sometimes"))?;
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output()?;
    assert!(!lossy(&out).trim().is_empty(), "systemd-analyze accepted Restart=sometimes");
    Ok(())
}

/// A Python tool on PATH, installed with pip when missing (as .ci/run does).
fn pip_tool(bin: &str, package: &str) -> Result<PathBuf> {
    let find = || pitr_tests::on_path(bin);
    if let Some(found) = find() {
        return Ok(found);
    }
    let out = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", package])
        .stdin(Stdio::null())
        .output()
        .context("running pip")?;
    if !out.status.success() {
        bail!("pip install {package} failed: {}", lossy(&out));
    }
    find().with_context(|| format!("{bin} not on PATH after pip install {package}"))
}

fn k8s_manifests() -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(root_path(K8S_DIR))?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    Ok(files)
}

/// A YAML file as JSON, through PyYAML (which kubernetes-validate brings).
fn yaml_documents(path: &Path) -> Result<Vec<serde_json::Value>> {
    let out = Command::new("python3")
        .args(["-c", "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"])
        .arg(path)
        .output()
        .context("running python3 with PyYAML")?;
    if !out.status.success() {
        bail!("{} does not parse as YAML: {}", path.display(), lossy(&out));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("YAML of {} as JSON", path.display()))
}

#[test]
fn k8s_manifests_validate() -> Result<()> {
    let validate = pip_tool("kubernetes-validate", "kubernetes-validate")?;
    let files = k8s_manifests()?;
    assert!(files.len() >= 5, "manifests: {files:?}");
    let mut kinds = BTreeSet::new();
    for file in &files {
        let out = Command::new(&validate).arg("--strict").arg(file).output()?;
        let said = lossy(&out);
        assert!(out.status.success(), "kubernetes-validate {}:\n{said}", file.display());
        for doc in yaml_documents(file)? {
            let kind = doc["kind"].as_str().with_context(|| format!("{}: a document without kind", file.display()))?;
            kinds.insert(kind.to_string());
            let custom = doc["apiVersion"] == "monitoring.coreos.com/v1";
            // kubernetes-validate has no schema for the Prometheus Operator's kinds and only warns;
            // every other kind must have been checked against its schema.
            if !custom {
                let passed = format!("passed for resource {}/", kind.to_ascii_lowercase());
                assert!(said.contains(&passed), "{}: {kind} not validated:\n{said}", file.display());
            }
        }
    }
    for kind in ["StatefulSet", "ConfigMap", "Secret", "CronJob", "PrometheusRule", "ServiceMonitor"] {
        assert!(kinds.contains(kind), "no {kind} among {kinds:?}");
    }

    // The sidecar: key from a Secret, config from a ConfigMap, liveness on /healthz, metrics port.
    let set = yaml_documents(&root_path("docker/k8s/postgres-statefulset.yaml"))?
        .into_iter()
        .find(|d| d["kind"] == "StatefulSet")
        .context("no StatefulSet")?;
    let pod = &set["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().context("no containers")?;
    let pitr = containers.iter().find(|c| c["name"] == "pitr").context("no pitr container")?;
    assert!(containers.iter().any(|c| c["name"] == "postgres"), "no postgres container in the pod");
    assert_eq!(pitr["image"], "pitr:latest");
    assert_eq!(pitr["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(pitr["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["containerPort"] == 9187)));
    let volumes = pod["volumes"].as_array().context("no volumes")?;
    assert!(volumes.iter().any(|v| v["secret"]["secretName"] == "pitr-key"), "key not from a Secret");
    assert!(volumes.iter().any(|v| v["configMap"]["name"] == "pitr-config"), "config not from a ConfigMap");

    // ServiceMonitor and PrometheusRule: structure as the Prometheus Operator's CRDs define it.
    let monitor = yaml_documents(&root_path("docker/k8s/servicemonitor.yaml"))?.remove(0);
    assert_eq!(monitor["kind"], "ServiceMonitor");
    assert!(monitor["metadata"]["name"].is_string());
    assert!(monitor["spec"]["selector"]["matchLabels"].is_object());
    let endpoints = monitor["spec"]["endpoints"].as_array().context("ServiceMonitor without endpoints")?;
    let ports: Vec<&str> = pitr["ports"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str()).collect();
    assert!(endpoints.iter().all(|e| e["path"] == "/metrics" && ports.contains(&e["port"].as_str().unwrap_or(""))));
    Ok(())
}

#[test]
fn prometheus_rule_equals_alerts_yml() -> Result<()> {
    pip_tool("kubernetes-validate", "kubernetes-validate")?; // brings PyYAML
    let alerts = yaml_documents(&root_path(ALERTS))?.remove(0);
    let rule = yaml_documents(&root_path(PROMETHEUS_RULE))?.remove(0);
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert!(rule["metadata"]["name"].is_string());
    let groups = alerts["groups"].as_array().context("alerts.yml without groups")?;
    assert!(!groups.is_empty());
    assert_eq!(rule["spec"]["groups"], alerts["groups"], "PrometheusRule spec.groups differ from {ALERTS}");
    assert_eq!(rule["spec"].as_object().map(|o| o.len()), Some(1), "spec holds more than groups");
    Ok(())
}

const COMPOSE_DIR: &str = "docker/compose";

/// The compose demo cannot be started here (its images come from registries this machine cannot
/// reach), so its parts are checked one by one: every service names an image, every bind-mounted
/// file exists, Prometheus' config and the rules it loads pass `promtool check config`, pitr's config
/// passes `pitr check`'s config line, the scrape target is the sidecar's service and metrics port,
/// Grafana's dashboard provider reads the directory the dashboard is mounted in, and, where podman
/// is installed, `podman-compose config` accepts the file.
#[test]
fn compose_demo_is_consistent() -> Result<()> {
    pip_tool("kubernetes-validate", "kubernetes-validate")?; // brings PyYAML
    let dir = root_path(COMPOSE_DIR);
    let compose = yaml_documents(&dir.join("compose.yaml"))?.remove(0);
    let services = compose["services"].as_object().context("compose.yaml: no services")?;
    for wanted in ["postgres", "s3", "pitr", "prometheus", "grafana"] {
        assert!(services.contains_key(wanted), "compose.yaml has no {wanted} service");
    }
    let mut mounts: Vec<(String, String)> = Vec::new();
    for (name, service) in services {
        assert!(service["image"].is_string(), "service {name} names no image");
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let spec = volume.as_str().with_context(|| format!("service {name}: a volume that is not a string"))?;
            let mut parts = spec.split(':');
            let (source, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if source.starts_with('.') {
                let path = dir.join(source);
                assert!(path.exists(), "service {name} mounts {source}, which does not exist ({})", path.display());
                mounts.push((source.to_string(), target.to_string()));
            }
        }
    }
    let mounted_at = |source: &str| {
        mounts
            .iter()
            .find(|(s, _)| s == source)
            .map(|(_, t)| t.clone())
            .with_context(|| format!("{source} is not mounted"))
    };

    // Prometheus loads the very rules in docker/prometheus/alerts.yml.
    let prom_config = dir.join("prometheus.yml");
    let out = Command::new(pitr_tests::promtool()?).args(["check", "config"]).arg(&prom_config).output()?;
    assert!(out.status.success(), "promtool check config {}:\n{}", prom_config.display(), lossy(&out));
    assert_eq!(mounted_at("../prometheus/alerts.yml")?, "/etc/prometheus/alerts.yml");
    assert_eq!(mounted_at("./prometheus.yml")?, "/etc/prometheus/prometheus.yml");
    let prom = yaml_documents(&prom_config)?.remove(0);
    let target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str().context("no scrape target")?;

    // pitr's config is valid, mounted where PITR_CONFIG points, and listens where Prometheus scrapes.
    let pitr_toml = dir.join("pitr.toml");
    let out = Command::new(pitr_tests::pitr_bin()).args(["check", "--json", "--config"]).arg(&pitr_toml).output()?;
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("pitr check --json:\n{}", lossy(&out)))?;
    let config_check = report["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "config"));
    assert_eq!(config_check.map(|c| c["ok"].clone()), Some(serde_json::Value::Bool(true)), "pitr check: {report:#}");
    assert_eq!(services["pitr"]["environment"]["PITR_CONFIG"], mounted_at("./pitr.toml")?.as_str());
    let toml_text = std::fs::read_to_string(&pitr_toml)?;
    let port = target.strip_prefix("pitr:").context("the scrape target is not the pitr service")?;
    assert!(toml_text.contains(&format!("listen = \"0.0.0.0:{port}\"")), "pitr.toml does not listen on :{port}");

    // Grafana: the provider's directory is where the dashboard is mounted.
    let provider = yaml_documents(&dir.join("grafana/dashboards/pitr.yaml"))?.remove(0);
    let provider_path = provider["providers"][0]["options"]["path"].as_str().context("no provider path")?;
    let dashboard_at = mounted_at("../grafana/pitr.json")?;
    assert_eq!(Path::new(&dashboard_at).parent(), Some(Path::new(provider_path)));

    let podman = Command::new("podman").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !podman.map(|s| s.success()).unwrap_or(false) {
        eprintln!("SKIPPED: `podman-compose config` needs podman, which is not installed here");
        return Ok(());
    }
    let out = Command::new(pip_tool("podman-compose", "podman-compose")?)
        .arg("-f")
        .arg(dir.join("compose.yaml"))
        .arg("config")
        .output()?;
    assert!(out.status.success(), "podman-compose config:\n{}", lossy(&out));
    Ok(())
}
