//! The TOML configuration, with `$PITR_<SECTION>_<KEY>` overrides. Every option has a default
//! (documented in docs/configuration.md) except the repository, the key file and the conninfo.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

/// Sections, in the order `$PITR_<SECTION>_<KEY>` is matched against.
const SECTIONS: &[&str] =
    &["repository", "encryption", "postgres", "stream", "backup", "metrics", "targets", "schedule"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub repository: RepositoryConfig,
    pub encryption: EncryptionConfig,
    pub postgres: Option<PostgresConfig>,
    #[serde(default)]
    pub stream: StreamSection,
    #[serde(default)]
    pub backup: BackupSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub targets: TargetsSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of /metrics and /healthz; empty turns the server off.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9187".into()
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection { listen: default_metrics_listen() }
    }
}

/// Recovery objectives (the seed runbook's: database RTO 30 min, transactions RPO 5 min).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsSection {
    #[serde(default = "default_rpo")]
    pub rpo_seconds: f64,
    #[serde(default = "default_rto")]
    pub rto_seconds: f64,
}

fn default_rpo() -> f64 {
    300.0
}

fn default_rto() -> f64 {
    1800.0
}

impl Default for TargetsSection {
    fn default() -> Self {
        TargetsSection { rpo_seconds: default_rpo(), rto_seconds: default_rto() }
    }
}

/// Cron expressions (UTC; 5 fields, or 6 with seconds first) for the jobs `pitr stream` runs.
/// An empty string turns a job off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    #[serde(default = "default_full_backup")]
    pub full_backup: String,
    #[serde(default = "default_incremental")]
    pub incremental: String,
    #[serde(default = "default_verify")]
    pub verify: String,
    #[serde(default = "default_drill")]
    pub drill: String,
}

fn default_full_backup() -> String {
    "0 2 * * *".into()
}
fn default_incremental() -> String {
    "*/15 * * * *".into()
}
fn default_verify() -> String {
    "0 3 * * *".into()
}
fn default_drill() -> String {
    "0 4 1 * *".into()
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection {
            full_backup: default_full_backup(),
            incremental: default_incremental(),
            verify: default_verify(),
            drill: default_drill(),
        }
    }
}

/// Parses a cron expression as the scheduler does; `None` for an empty (disabled) one.
pub fn parse_cron(field: &str, expr: &str) -> Result<Option<croner::Cron>> {
    if expr.trim().is_empty() {
        return Ok(None);
    }
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map(Some)
        .map_err(|e| anyhow!("[schedule] {field} = {expr:?}: not a cron expression ({e})"))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BackupSection {
    /// Files are cut into blocks of this many bytes, the unit of deduplication (default 1 MiB).
    pub block_size: Option<usize>,
    /// Concurrent block uploads during a backup and block fetches during a restore (default: cores × 2).
    pub parallel: Option<usize>,
    /// How long `pitr backup` waits for the sidecar to archive the WAL that completes the backup.
    #[serde(default, with = "humantime_serde")]
    pub wal_timeout: Option<Duration>,
    /// Segments `wal-fetch` prefetches ahead of recovery into pg_wal/pitr-prefetch (0 = off; default 8).
    pub prefetch_segments: Option<usize>,
}

impl BackupSection {
    pub fn parallel(&self) -> usize {
        self.parallel.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() * 2).unwrap_or(4))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// A local directory (the default backend).
    pub path: Option<PathBuf>,
    /// An object-storage URL (`s3://bucket/prefix`).
    pub url: Option<String>,
    /// S3 endpoint for S3-compatible servers (default: AWS, or `$AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// S3 region (default `$AWS_REGION`).
    pub region: Option<String>,
    /// Allow plain-HTTP endpoints (loopback test servers).
    #[serde(default)]
    pub allow_http: bool,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted style.
    #[serde(default)]
    pub force_path_style: bool,
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
}

fn default_zstd_level() -> i32 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    pub key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub conninfo: String,
    /// Names the cluster in slot and application names.
    #[serde(default = "default_name")]
    pub name: String,
    /// Physical replication slot; default `pitr_<name>`.
    pub slot: Option<String>,
    #[serde(default = "default_true")]
    pub create_slot: bool,
    /// Default `pitr_<name>`; put it in `synchronous_standby_names` for RPO 0.
    pub application_name: Option<String>,
    /// Refuse a server whose system identifier differs; also picks the cluster in a shared repository.
    pub system_id: Option<u64>,
    /// PostgreSQL's binaries (pg_ctl) for `restore --start`; default /usr/lib/postgresql/<major>/bin.
    pub bin_dir: Option<PathBuf>,
}

fn default_name() -> String {
    "main".into()
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    /// Minimum spacing between WAL puts; default 0 for a local repository, 1 s for object storage.
    #[serde(default, with = "humantime_serde")]
    pub flush_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub status_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub startup_timeout: Option<Duration>,
    /// Received-but-not-yet-durable WAL held in memory before reading pauses (bytes).
    pub max_pending_bytes: Option<usize>,
    /// Where `pitr stream` writes its live status for `pitr status`.
    pub status_file: Option<PathBuf>,
    /// Name in the writer lease; default `<hostname>/<slot>` (stable across restarts).
    pub lease_holder: Option<String>,
    /// How long the writer lease lasts without renewal (renewed every third of it).
    #[serde(default, with = "humantime_serde")]
    pub lease_ttl: Option<Duration>,
}

impl PostgresConfig {
    pub fn slot(&self) -> String {
        self.slot.clone().unwrap_or_else(|| format!("pitr_{}", self.name))
    }
    pub fn application_name(&self) -> String {
        self.application_name.clone().unwrap_or_else(|| format!("pitr_{}", self.name))
    }
}

impl Config {
    /// The path of the config file: `--config`, else `$PITR_CONFIG`, else `./pitr.toml`.
    pub fn path(flag: Option<&Path>) -> PathBuf {
        flag.map(Path::to_path_buf)
            .or_else(|| std::env::var_os("PITR_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("pitr.toml"))
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("config file {} not found (pass --config FILE or set PITR_CONFIG)", path.display())
            } else {
                anyhow!("cannot read config file {}: {e}", path.display())
            }
        })?;
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::parse(&text, &vars).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str, env: &[(String, String)]) -> Result<Config> {
        let mut table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| anyhow!("{}", e.to_string().trim_end()))?;
        apply_env_overrides(&mut table, env)?;
        let config: Config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| anyhow!("{}", e.to_string().trim_end()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        match (&self.repository.path, &self.repository.url) {
            (None, None) => bail!("[repository]: set `path` (a local directory) or `url`"),
            (Some(_), Some(_)) => bail!("[repository]: set either `path` or `url`, not both"),
            (None, Some(url)) if !url.starts_with("s3://") => {
                bail!("[repository] url = {url:?}: only s3:// URLs are supported (GCS is not built yet); or use `path`")
            }
            (Some(p), None) if !p.is_absolute() => {
                bail!("[repository] path = {:?}: must be an absolute path", p.display())
            }
            _ => {}
        }
        if !(1..=22).contains(&self.repository.zstd_level) {
            bail!("[repository] zstd_level = {}: must be between 1 and 22", self.repository.zstd_level);
        }
        if let Some(pg) = &self.postgres {
            pg.conninfo.parse::<pitr_pgwire::ConnInfo>().map_err(|e| anyhow!("[postgres] conninfo: {e}"))?;
            pitr_pgwire::connection::validate_slot_name(&pg.slot()).map_err(|e| anyhow!("[postgres] slot: {e}"))?;
        }
        if let Some(b) = self.backup.block_size {
            if !(8192..=64 << 20).contains(&b) {
                bail!("[backup] block_size = {b}: must be between 8192 and 67108864 bytes");
            }
        }
        for (field, expr) in [
            ("full_backup", &self.schedule.full_backup),
            ("incremental", &self.schedule.incremental),
            ("verify", &self.schedule.verify),
            ("drill", &self.schedule.drill),
        ] {
            parse_cron(field, expr)?;
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!(
                "[metrics] listen = {:?}: expected ADDRESS:PORT such as 127.0.0.1:9187, or \"\" for off",
                self.metrics.listen
            );
        }
        if !(self.targets.rpo_seconds > 0.0 && self.targets.rto_seconds > 0.0) {
            bail!("[targets] rpo_seconds and rto_seconds must be positive");
        }
        if self.backup.parallel == Some(0) {
            bail!("[backup] parallel must be at least 1");
        }
        if let Some(0) = self.stream.max_pending_bytes {
            bail!("[stream] max_pending_bytes must be greater than 0");
        }
        if self.stream.status_interval.is_some_and(|d| d.is_zero()) {
            bail!("[stream] status_interval must be greater than 0");
        }
        Ok(())
    }

    pub fn postgres(&self) -> Result<&PostgresConfig> {
        self.postgres.as_ref().ok_or_else(|| anyhow!("the config has no [postgres] section (conninfo = \"...\")"))
    }

    pub fn repository_path(&self) -> &Path {
        // `validate` guarantees a path.
        self.repository.path.as_deref().unwrap_or(Path::new("/"))
    }

    pub fn flush_interval(&self) -> Duration {
        self.stream.flush_interval.unwrap_or(if self.repository.url.is_some() {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        })
    }

    pub fn status_file(&self) -> PathBuf {
        self.stream.status_file.clone().unwrap_or_else(|| {
            let name = self.postgres.as_ref().map(|p| p.name.as_str()).unwrap_or("main");
            std::env::temp_dir().join(format!("pitr-{name}.status.json"))
        })
    }
}

/// `PITR_POSTGRES_CONNINFO=...` sets `[postgres] conninfo`. Values that parse as TOML scalars
/// (numbers, booleans, quoted strings) keep their type; anything else is a string.
fn apply_env_overrides(table: &mut toml::Table, env: &[(String, String)]) -> Result<()> {
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("PITR_") else { continue };
        let lower = rest.to_ascii_lowercase();
        // Variables that name no section belong to someone else (PITR_LOG, test harnesses…);
        // a known section with an unknown key is still an error, from deserialisation.
        let Some(section) = SECTIONS.iter().find(|s| lower.starts_with(&format!("{s}_"))) else {
            continue;
        };
        let key = &lower[section.len() + 1..];
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(|v| !v.is_table() && !v.is_array())
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let entry = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            bail!("environment variable {name}: [{section}] in the config file is not a table");
        };
        section_table.insert(key.to_string(), parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[repository]
path = "/var/lib/pitr/repo"        # or url = "s3://bucket/prefix"
[encryption]
key_file = "/etc/pitr/key"
[postgres]
conninfo = "host=127.0.0.1 port=5432 user=replicator"
"#;

    #[test]
    fn the_design_minimal_config_works() {
        let c = Config::parse(MINIMAL, &[]).unwrap();
        let pg = c.postgres().unwrap();
        assert_eq!(pg.slot(), "pitr_main");
        assert_eq!(c.flush_interval(), Duration::ZERO);
    }

    #[test]
    fn env_overrides_keep_types_and_name_unknown_sections() {
        let env = vec![
            ("PITR_POSTGRES_CONNINFO".to_string(), "host=db user=x".to_string()),
            ("PITR_STREAM_FLUSH_INTERVAL".to_string(), "250ms".to_string()),
            ("PITR_STREAM_MAX_PENDING_BYTES".to_string(), "1000".to_string()),
            ("PITR_CONFIG".to_string(), "/ignored".to_string()),
        ];
        let c = Config::parse(MINIMAL, &env).unwrap();
        assert_eq!(c.postgres().unwrap().conninfo, "host=db user=x");
        assert_eq!(c.flush_interval(), Duration::from_millis(250));
        assert_eq!(c.stream.max_pending_bytes, Some(1000));
        Config::parse(MINIMAL, &[("PITR_TEST_DIR".into(), "/x".into())]).unwrap();
        let err = Config::parse(MINIMAL, &[("PITR_STREAM_FLUSH_INTERVALL".into(), "1s".into())]).unwrap_err();
        assert!(err.to_string().contains("flush_intervall"), "{err}");
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let cases = [
            (format!("{MINIMAL}[stream]\nflush_intervall = \"1s\"\n"), "flush_intervall"),
            (format!("{MINIMAL}[stream]\nflush_interval = \"soon\"\n"), "flush_interval"),
            (MINIMAL.replace("port=5432", "port=x"), "conninfo"),
            (MINIMAL.replace("/var/lib/pitr/repo", "relative/repo"), "absolute"),
            (MINIMAL.replace("[encryption]\nkey_file = \"/etc/pitr/key\"\n", ""), "encryption"),
            ("[repository\n".to_string(), "line 1"),
            (format!("{MINIMAL}[postgres2]\n"), "postgres2"),
            (format!("{MINIMAL}\n[repository.x]\n"), "x"),
            (format!("{MINIMAL}[schedule]\nfull_backup = \"every day\"\n"), "full_backup"),
            (format!("{MINIMAL}[metrics]\nlisten = \"localhost\"\n"), "listen"),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", Config::parse(&text, &[]).unwrap_err());
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
    }
}
