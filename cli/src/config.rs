//! The TOML configuration, with `$PITR_<SECTION>_<KEY>` overrides. Every option has a default
//! (documented in docs/configuration.md) except the repository, the key file and the conninfo.
//!
//! Parsing and validation only: every bad key or value fails here, named, before a command
//! starts. Opening what the config names is [`crate::open`]'s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

/// Sections, in the order `$PITR_<SECTION>_<KEY>` is matched against.
const SECTIONS: &[&str] = &[
    "repository",
    "encryption",
    "postgres",
    "stream",
    "backup",
    "metrics",
    "targets",
    "schedule",
    "mongo",
    "retention",
    "drill",
    "journal",
    "find",
];

/// The whole config file, validated.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[repository]`: where the archive lives.
    pub repository: RepositoryConfig,
    /// `[encryption]`: the key file.
    pub encryption: EncryptionConfig,
    /// `[postgres]`: the cluster streamed and backed up.
    pub postgres: Option<PostgresConfig>,
    /// `[stream]`: the WAL receiver.
    #[serde(default)]
    pub stream: StreamSection,
    /// `[backup]`: base backups and restores.
    #[serde(default)]
    pub backup: BackupSection,
    /// `[metrics]`: the /metrics and /healthz server.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[targets]`: recovery objectives.
    #[serde(default)]
    pub targets: TargetsSection,
    /// `[schedule]`: the sidecar's jobs.
    #[serde(default)]
    pub schedule: ScheduleSection,
    /// `[retention]`: what `pitr expire` keeps.
    #[serde(default)]
    pub retention: RetentionSection,
    /// `[drill]`: what the scheduled drill does besides a restore.
    #[serde(default)]
    pub drill: DrillSection,
    /// `[find]`: catalog snapshots and what `pitr find` calls destructive.
    #[serde(default)]
    pub find: FindSection,
    /// A MongoDB replica set, backed up beside (or instead of) PostgreSQL.
    pub mongo: Option<MongoConfig>,
    /// `[[dumps]]`: logical dumps (`pg_dump`) of databases, each set on its own schedule.
    #[serde(default)]
    pub dumps: Vec<DumpConfig>,
    /// `[[files]]`: file trees (directories or single files), each set on its own schedules.
    #[serde(default)]
    pub files: Vec<FilesConfig>,
    /// `[journal]`: the signed history of the archive (off without the section).
    pub journal: Option<JournalSection>,
}

/// `[journal]`: every manifest, WAL segment and oplog slice stored or deleted is recorded in
/// signed batches under `journal/`, which `pitr verify` proves the repository against.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSection {
    /// The Ed25519 signing key of writers (`pitr init` or `pitr keys journal-init` creates it).
    /// Hosts that only verify can leave it out and set `public_key`.
    pub signing_key_file: Option<PathBuf>,
    /// The public key verify checks batches with (base64); derived from the key file if unset.
    pub public_key: Option<String>,
    /// How often the sidecar writes a batch (and at a clean stop).
    #[serde(default = "default_journal_interval", with = "humantime_serde")]
    pub interval: Duration,
}

fn default_journal_interval() -> Duration {
    Duration::from_secs(10)
}

impl JournalSection {
    /// The key batches are checked with: `public_key`, else the key file's.
    pub fn verifying_key(&self) -> Result<pitr_archive::journal::VerifyingKey> {
        if let Some(text) = &self.public_key {
            let key = pitr_archive::journal::parse_public_key(text)?;
            if let Some(signer) = self.signer()? {
                if signer.verifying_key() != key {
                    bail!("[journal] public_key is not the public key of signing_key_file");
                }
            }
            return Ok(key);
        }
        match self.signer()? {
            Some(signer) => Ok(signer.verifying_key()),
            None => bail!("[journal]: set public_key (or signing_key_file) to verify the journal"),
        }
    }

    /// The signing key, if this host has one.
    pub fn signer(&self) -> Result<Option<pitr_archive::journal::JournalSigner>> {
        let Some(path) = &self.signing_key_file else { return Ok(None) };
        Ok(Some(pitr_archive::journal::JournalSigner::load(path).context("[journal] signing_key_file")?))
    }
}

/// `[metrics]`.
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
    /// Data-loss window allowed (seconds); /healthz fails past it.
    #[serde(default = "default_rpo")]
    pub rpo_seconds: f64,
    /// Restore time allowed (seconds); drills are judged by it.
    #[serde(default = "default_rto")]
    pub rto_seconds: f64,
    /// With `[schedule] incremental = "auto"`: a backup is taken once the predicted RTO reaches
    /// this fraction of `rto_seconds` (0 < fraction <= 1).
    #[serde(default = "default_rto_auto_fraction")]
    pub rto_auto_fraction: f64,
}

fn default_rto_auto_fraction() -> f64 {
    0.8
}

fn default_rpo() -> f64 {
    300.0
}

fn default_rto() -> f64 {
    1800.0
}

impl Default for TargetsSection {
    fn default() -> Self {
        TargetsSection {
            rpo_seconds: default_rpo(),
            rto_seconds: default_rto(),
            rto_auto_fraction: default_rto_auto_fraction(),
        }
    }
}

/// Cron expressions (UTC; 5 fields, or 6 with seconds first) for the jobs `pitr stream` runs.
/// An empty string turns a job off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    /// Full base backups.
    #[serde(default = "default_full_backup")]
    pub full_backup: String,
    /// Incremental backups (PostgreSQL 17+); or `"auto"`: a backup whenever the predicted RTO
    /// nears `[targets] rto_seconds` (see [`ScheduleSection::incremental_auto`]).
    #[serde(default = "default_incremental")]
    pub incremental: String,
    /// With `incremental = "auto"`: the least time between the newest backup's start and an
    /// automatic one (humantime, default 10 minutes).
    #[serde(default = "default_auto_min_spacing", with = "humantime_serde")]
    pub auto_min_spacing: Duration,
    /// Archive verification.
    #[serde(default = "default_verify")]
    pub verify: String,
    /// Restore drills.
    #[serde(default = "default_drill")]
    pub drill: String,
    /// Retention (`pitr expire`).
    #[serde(default = "default_expire")]
    pub expire: String,
    /// The weekly partial-restore drill (`pitr drill --partial`): a random table, a random
    /// file set's files.
    #[serde(default = "default_partial_drill")]
    pub partial_drill: String,
    /// Not a cron expression: the age (`"90d"`, humantime) at which the sidecar replaces the
    /// active repository key with a new one; `"off"` (or empty) never does.
    #[serde(default = "default_key_rotation")]
    pub key_rotation: String,
}

fn default_auto_min_spacing() -> Duration {
    Duration::from_secs(600)
}

/// The shortest `[schedule] key_rotation` accepted (tests use seconds; production, days).
pub const MIN_KEY_ROTATION: Duration = Duration::from_secs(1);

impl ScheduleSection {
    /// Whether `incremental = "auto"`: backups by the predicted RTO instead of a cron schedule.
    pub fn incremental_auto(&self) -> bool {
        self.incremental.trim().eq_ignore_ascii_case("auto")
    }

    /// `key_rotation` as a duration; `None` when off.
    pub fn key_rotation(&self) -> Result<Option<Duration>> {
        let text = self.key_rotation.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let every = humantime::parse_duration(text).map_err(|e| {
            anyhow!(
                "[schedule] key_rotation = {:?}: not a duration such as \"90d\" or \"off\" ({e})",
                self.key_rotation
            )
        })?;
        if every < MIN_KEY_ROTATION {
            bail!(
                "[schedule] key_rotation = {:?}: must be at least {} (or \"off\")",
                self.key_rotation,
                humantime::format_duration(MIN_KEY_ROTATION)
            );
        }
        Ok(Some(every))
    }
}

/// `[drill]`: options of the scheduled drill (`pitr drill` takes them as flags).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSection {
    /// Make the scheduled drill a key rotation and re-encryption drill: a new repository key, the
    /// keys the restore needs wrapped under a drill-only master key, the restore done with that
    /// key alone (`pitr drill --key-rotation`).
    #[serde(default)]
    pub key_rotation: bool,
}

/// `[find]`: the sidecar's catalog snapshots (names for `pitr find`) and its destructive rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindSection {
    /// How often the sidecar looks at the catalogs (a snapshot is stored only when they
    /// changed); DDL the change index sees triggers a look within about a second as well.
    #[serde(default = "default_catalog_interval", with = "humantime_serde")]
    pub catalog_interval: Duration,
    /// A DELETE/UPDATE is destructive from this many rows (and `destructive_fraction`).
    #[serde(default = "default_find_min_rows")]
    pub min_rows: u64,
    /// … or from this fraction of the table's estimated rows, whichever is larger.
    #[serde(default = "default_destructive_fraction")]
    pub destructive_fraction: f64,
    /// How far back `pitr find` reads without `--since` (from the newest backup that ended
    /// before then): reading costs one GET per WAL segment.
    #[serde(default = "default_find_window", with = "humantime_serde")]
    pub window: Duration,
}

impl Default for FindSection {
    fn default() -> Self {
        FindSection {
            catalog_interval: default_catalog_interval(),
            min_rows: default_find_min_rows(),
            destructive_fraction: default_destructive_fraction(),
            window: default_find_window(),
        }
    }
}

fn default_find_window() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_catalog_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_find_min_rows() -> u64 {
    1000
}
fn default_destructive_fraction() -> f64 {
    0.1
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
fn default_expire() -> String {
    "0 5 * * *".into()
}
fn default_partial_drill() -> String {
    // Sundays, after the monthly drill's hour (when the 1st is a Sunday) and expire's.
    "0 6 * * 0".into()
}
fn default_key_rotation() -> String {
    "90d".into()
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection {
            full_backup: default_full_backup(),
            incremental: default_incremental(),
            auto_min_spacing: default_auto_min_spacing(),
            verify: default_verify(),
            drill: default_drill(),
            expire: default_expire(),
            partial_drill: default_partial_drill(),
            key_rotation: default_key_rotation(),
        }
    }
}

/// `pitr expire`: grandfather-father-son counts, the restore-to-any-second window, and how it
/// keeps clear of running backups. The defaults are the seed runbook's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// The newest backup of each of the last N UTC days that have one.
    #[serde(default = "default_daily")]
    pub daily: u32,
    /// … of each of the last N ISO weeks that have one.
    #[serde(default = "default_weekly")]
    pub weekly: u32,
    /// … of each of the last N months that have one.
    #[serde(default = "default_monthly")]
    pub monthly: u32,
    /// … of each of the last N years that have one.
    #[serde(default = "default_yearly")]
    pub yearly: u32,
    /// Every second of the last `window` stays restorable.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// A running marker (backup, restore, drill) not renewed for this long is a crashed run's: it
    /// no longer holds expire off. Markers are renewed every 15 s (`running::RENEW_EVERY`), so
    /// this need not exceed the longest backup; the 1-minute lower bound leaves room for slow
    /// puts and clock skew.
    #[serde(default = "default_stale_backup_after", with = "humantime_serde")]
    pub stale_backup_after: Duration,
    /// Lifetime of the expire lock; blocks are deleted only in its first half.
    #[serde(default = "default_lock_ttl", with = "humantime_serde")]
    pub lock_ttl: Duration,
}

fn default_daily() -> u32 {
    30
}
fn default_weekly() -> u32 {
    12
}
fn default_monthly() -> u32 {
    12
}
fn default_yearly() -> u32 {
    7
}
fn default_window() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_stale_backup_after() -> Duration {
    Duration::from_secs(86_400)
}
fn default_lock_ttl() -> Duration {
    Duration::from_secs(3600)
}

impl Default for RetentionSection {
    fn default() -> Self {
        RetentionSection {
            daily: default_daily(),
            weekly: default_weekly(),
            monthly: default_monthly(),
            yearly: default_yearly(),
            window: default_window(),
            stale_backup_after: default_stale_backup_after(),
            lock_ttl: default_lock_ttl(),
        }
    }
}

impl RetentionSection {
    /// The retention policy these settings describe.
    pub fn policy(&self) -> pitr_archive::retention::Policy {
        pitr_archive::retention::Policy {
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
            yearly: self.yearly,
            window_us: i64::try_from(self.window.as_micros()).unwrap_or(i64::MAX),
        }
    }

    fn validate(&self) -> Result<()> {
        const YEAR: u64 = 366 * 86_400;
        if self.window.as_secs() > 1000 * YEAR {
            bail!("[retention] window = {}: more than 1000 years", humantime::format_duration(self.window));
        }
        for (key, d) in [("stale_backup_after", self.stale_backup_after), ("lock_ttl", self.lock_ttl)] {
            if d < Duration::from_secs(60) || d.as_secs() > 1000 * YEAR {
                bail!("[retention] {key} = {}: must be between 1 minute and 1000 years", humantime::format_duration(d));
            }
        }
        // Backups and restores do not obey an expire lock naming a longer lifetime: a planted one
        // could otherwise hold them off for years.
        let max_lock_ttl = pitr_archive::running::MAX_LOCK_TTL;
        if self.lock_ttl > max_lock_ttl {
            bail!(
                "[retention] lock_ttl = {}: must be at most {}",
                humantime::format_duration(self.lock_ttl),
                humantime::format_duration(max_lock_ttl)
            );
        }
        Ok(())
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

/// `[backup]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BackupSection {
    /// libpq-style connection string of a streaming standby to take base backups from (replication
    /// user); WAL still streams from `[postgres] conninfo`. Default: back up the primary.
    pub conninfo: Option<String>,
    /// Files are cut into blocks of this many bytes, the unit of deduplication (default 1 MiB).
    pub block_size: Option<usize>,
    /// Concurrent block uploads during a backup and block fetches during a restore (default: cores × 2).
    pub parallel: Option<usize>,
    /// How long `pitr backup` waits for the sidecar to archive the WAL that completes the backup.
    #[serde(default, with = "humantime_serde")]
    pub wal_timeout: Option<Duration>,
    /// Segments `wal-fetch` prefetches ahead of recovery into pg_wal/pitr-prefetch (0 = off; default 8).
    pub prefetch_segments: Option<usize>,
    /// How fast the server sends a base backup (BASE_BACKUP's `MAX_RATE`; default unlimited).
    pub max_rate: Option<Rate>,
}

/// By hand: the standby's conninfo may carry a password, which must not reach a log.
impl std::fmt::Debug for BackupSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSection")
            .field("conninfo", &self.conninfo.as_deref().map(pitr_pgwire::conninfo::redact_in_text))
            .field("block_size", &self.block_size)
            .field("parallel", &self.parallel)
            .field("wal_timeout", &self.wal_timeout)
            .field("prefetch_segments", &self.prefetch_segments)
            .field("max_rate", &self.max_rate)
            .finish()
    }
}

impl BackupSection {
    /// `conninfo` parsed, with `[postgres] max_message_size` applied as to the primary's: the
    /// standby base backups are taken from, if one is configured.
    pub fn standby_connection_info(&self, pg: &PostgresConfig) -> Result<Option<pitr_pgwire::ConnInfo>> {
        let Some(text) = &self.conninfo else { return Ok(None) };
        let mut info: pitr_pgwire::ConnInfo = text.parse().map_err(|e| anyhow!("[backup] conninfo: {e}"))?;
        if let Some(max) = pg.max_message_size {
            info.max_message_size = max;
        }
        Ok(Some(info))
    }

    /// `max_rate` as BASE_BACKUP's `MAX_RATE` takes it: KiB (PostgreSQL's kB) per second.
    pub fn max_rate_kib(&self) -> Result<Option<u32>> {
        let Some(rate) = &self.max_rate else { return Ok(None) };
        if let Rate::BytesPerSecond(n) = rate {
            // PostgreSQL's MAX_RATE and pg_basebackup --max-rate read a bare number as kB/s: a
            // guess either way would be off by a factor of 1024 for someone.
            bail!(
                "[backup] max_rate = {n}: give a unit, such as \"{n}kB/s\" or \"{n}B/s\" (PostgreSQL's MAX_RATE \
                 and pg_basebackup --max-rate read a bare number as kB per second; pitr takes none)"
            );
        }
        let bytes = rate.bytes_per_second("[backup] max_rate")?;
        if !(MIN_MAX_RATE..=MAX_MAX_RATE).contains(&bytes) {
            bail!(
                "[backup] max_rate = {rate}: {bytes} bytes per second is outside what PostgreSQL's MAX_RATE \
                 accepts, 32KiB/s to 1GiB/s ({MIN_MAX_RATE} to {MAX_MAX_RATE} bytes per second)"
            );
        }
        // Nearest whole KiB: within the range this stays within 32..=1048576.
        Ok(Some(((bytes + 512) / 1024) as u32))
    }

    /// Concurrent block transfers: `parallel`, else twice the cores.
    pub fn parallel(&self) -> usize {
        self.parallel.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() * 2).unwrap_or(4))
    }
}

/// `[repository]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// A local directory (the default backend).
    pub path: Option<PathBuf>,
    /// An object-storage URL (`s3://bucket/prefix`, `gs://bucket/prefix` or
    /// `az://container/prefix`).
    pub url: Option<String>,
    /// S3 endpoint for S3-compatible servers (default: AWS, or `$AWS_ENDPOINT_URL`); Azure: the
    /// blob service URL (default `$AZURE_STORAGE_ENDPOINT`, else the account's).
    pub endpoint: Option<String>,
    /// S3 region (default `$AWS_REGION`).
    pub region: Option<String>,
    /// Allow plain-HTTP endpoints (loopback test servers).
    #[serde(default)]
    pub allow_http: bool,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted style.
    #[serde(default)]
    pub force_path_style: bool,
    /// zstd compression level of new objects (1-22, default 3).
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// zstd compression level of new WAL chunks and segments (1-22, default 1): WAL is sealed as
    /// fast as it streams in, so this is the stream's CPU cost per byte.
    #[serde(default = "default_wal_zstd_level")]
    pub wal_zstd_level: i32,
    /// GCS: a service-account JSON key file (default: `$GOOGLE_APPLICATION_CREDENTIALS` and the
    /// standard environment, then the metadata server).
    pub service_account_key: Option<PathBuf>,
    /// Azure: the storage account name (default `$AZURE_STORAGE_ACCOUNT_NAME`). Its key or a SAS
    /// token come from the environment only, as S3's keys do.
    pub storage_account: Option<String>,
    /// Object storage: requests in flight at once, across the process (default 16).
    pub max_concurrency: Option<usize>,
    /// S3: objects above this many bytes go up as multipart uploads (default 32 MiB).
    pub multipart_threshold: Option<usize>,
    /// S3: part size of multipart uploads, at least 5 MiB (default 16 MiB).
    pub multipart_part_size: Option<usize>,
    /// Object storage: TCP/TLS connect timeout (default 5 s).
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Object storage: limit on one whole request, body included (default 60 s).
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Object storage: retries of one request (default 10).
    pub max_retries: Option<usize>,
    /// Object storage: no retry starts later than this after the first attempt (default 3 min).
    #[serde(default, with = "humantime_serde")]
    pub retry_timeout: Option<Duration>,
    /// Object storage: first backoff between retries (default 100 ms); grows ×2 with jitter.
    #[serde(default, with = "humantime_serde")]
    pub retry_initial_backoff: Option<Duration>,
    /// Object storage: longest backoff between retries (default 15 s).
    #[serde(default, with = "humantime_serde")]
    pub retry_max_backoff: Option<Duration>,
    /// S3 Object Lock: write every object with a retention of this many days (default: off).
    pub object_lock_days: Option<u32>,
    /// S3 Object Lock mode, `GOVERNANCE` (default) or `COMPLIANCE`.
    pub object_lock_mode: Option<String>,
    /// `[[repository.secondary]]`: repositories that receive a copy of every object.
    #[serde(default)]
    pub secondary: Vec<SecondaryConfig>,
    /// Bytes per second of backup uploads to all repositories together: blocks wait; manifests,
    /// WAL and oplog uploads are never slowed (default unlimited).
    pub max_upload_rate: Option<Rate>,
    /// Bytes per second of restore downloads: blocks wait; manifests, WAL and oplog downloads
    /// are never slowed (default unlimited).
    pub max_download_rate: Option<Rate>,
}

/// The lowest `[repository] max_upload_rate` / `max_download_rate`, in bytes per second. Below
/// it one default 1 MiB block waits more than half a minute, while the backup's running marker
/// keeps `expire` from sweeping blocks: a typo such as "1B/s" would stall a backup for days.
const MIN_REPOSITORY_RATE: u64 = 32 << 10;

/// PostgreSQL's MAX_RATE bounds (32 kB/s to 1 GB/s, its kB being 1024 bytes), in bytes per second.
const MIN_MAX_RATE: u64 = 32 << 10;
const MAX_MAX_RATE: u64 = 1 << 30;

/// A transfer rate as the config writes it: a string such as `"50MB/s"` — units `B`, `kB`,
/// `MB`, `GB` (powers of 1000) and `KiB`, `MiB`, `GiB` (powers of 1024), always bytes, never
/// bits — or, for the repository limits only, an integer of bytes per second.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Rate {
    /// An integer: bytes per second.
    BytesPerSecond(i64),
    /// A bare fractional number: refused (no unit), kept to say so.
    Fraction(f64),
    /// A number with a unit and `/s`.
    Text(String),
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::BytesPerSecond(n) => write!(f, "{n}"),
            Rate::Fraction(x) => write!(f, "{x}"),
            Rate::Text(t) => write!(f, "{t:?}"),
        }
    }
}

impl Rate {
    /// Bytes per second, at least 1; errors name `key`.
    pub fn bytes_per_second(&self, key: &str) -> Result<u64> {
        let syntax = "expected a rate such as \"50MB/s\" in bytes per second (units B, kB, MB, GB: \
                      powers of 1000; KiB, MiB, GiB: powers of 1024)";
        let bytes = match self {
            Rate::BytesPerSecond(n) => u64::try_from(*n).map_err(|_| anyhow!("{key} = {self}: {syntax}"))?,
            Rate::Fraction(x) => bail!("{key} = {x}: a fraction needs a unit, such as \"{x}MB/s\"; {syntax}"),
            Rate::Text(text) => {
                let per_unit = text.trim().strip_suffix("/s").ok_or_else(|| anyhow!("{key} = {self}: {syntax}"))?;
                let split = per_unit.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(per_unit.len());
                let (number, unit) = (per_unit[..split].trim(), per_unit[split..].trim());
                let multiplier: u64 = match unit {
                    "" => bail!("{key} = {self}: no unit before \"/s\"; {syntax}"),
                    "B" => 1,
                    "kB" => 1000,
                    "MB" => 1000 * 1000,
                    "GB" => 1000 * 1000 * 1000,
                    "KiB" => 1 << 10,
                    "MiB" => 1 << 20,
                    "GiB" => 1 << 30,
                    _ => bail!("{key} = {self}: unknown unit {unit:?}; {syntax}"),
                };
                let value: f64 = number
                    .parse()
                    .ok()
                    .filter(|v: &f64| {
                        v.is_finite() && *v >= 0.0 && number.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                    })
                    .ok_or_else(|| anyhow!("{key} = {self}: {syntax}"))?;
                let bytes = (value * multiplier as f64).round();
                if bytes >= u64::MAX as f64 {
                    bail!("{key} = {self}: too large");
                }
                bytes as u64
            }
        };
        if bytes == 0 {
            bail!("{key} = {self}: must be at least 1 byte per second (leave the key out for no limit)");
        }
        Ok(bytes)
    }
}

/// A repository limit in bytes per second, if set; at least [`MIN_REPOSITORY_RATE`].
fn repository_rate(rate: &Option<Rate>, key: &str) -> Result<Option<u64>> {
    let Some(rate) = rate else { return Ok(None) };
    let bytes = rate.bytes_per_second(key)?;
    if bytes < MIN_REPOSITORY_RATE {
        bail!(
            "{key} = {rate}: {bytes} bytes per second is below the lowest limit, 32KiB/s ({MIN_REPOSITORY_RATE} bytes \
             per second; leave the key out for no limit)"
        );
    }
    Ok(Some(bytes))
}

/// One `[[repository.secondary]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondaryConfig {
    /// Names it in `--from`, `copy --to`, status and metrics.
    pub name: String,
    /// A local directory (absolute).
    pub path: Option<PathBuf>,
    /// An object-storage URL (`s3://…`, `gs://…` or `az://…`).
    pub url: Option<String>,
    /// S3 endpoint of this secondary.
    pub endpoint: Option<String>,
    /// S3 region of this secondary.
    pub region: Option<String>,
    /// Allow a plain-HTTP endpoint.
    #[serde(default)]
    pub allow_http: bool,
    /// Path-style requests.
    #[serde(default)]
    pub force_path_style: bool,
    /// Puts (and so the WAL acknowledgement) wait until this secondary holds the object too.
    #[serde(default)]
    pub required: bool,
    /// Bytes of copies queued in memory before new ones are dropped (and back-filled later) or,
    /// if `required`, wait (default 256 MiB).
    pub queue_bytes: Option<u64>,
}

/// The URL schemes of the object-storage backends (`azure://` is object_store's other name for
/// `az://`).
fn is_object_storage_url(url: &str) -> bool {
    ["s3://", "gs://", "az://", "azure://"].iter().any(|scheme| url.starts_with(scheme))
}

fn is_azure_url(url: &str) -> bool {
    url.starts_with("az://") || url.starts_with("azure://")
}

/// An object-storage URL as a location to compare: `azure://` spelt `az://`, without trailing
/// `/` (both name the same container and prefix).
fn same_place(url: &str) -> String {
    let url = url.trim_end_matches('/');
    match url.strip_prefix("azure://") {
        Some(rest) => format!("az://{rest}"),
        None => url.to_string(),
    }
}

/// What `--from` calls the `[repository]` itself.
pub const PRIMARY_NAME: &str = "primary";

impl SecondaryConfig {
    /// Bytes of copies queued in memory (default 256 MiB).
    pub fn queue_bytes(&self) -> u64 {
        self.queue_bytes.unwrap_or(256 << 20)
    }

    fn validate(&self, primary: &RepositoryConfig) -> Result<()> {
        let entry = format!("[[repository.secondary]] {:?}", self.name);
        match (&self.path, &self.url) {
            (None, None) => bail!("{entry}: set `path` (a local directory) or `url`"),
            (Some(_), Some(_)) => bail!("{entry}: set either `path` or `url`, not both"),
            (None, Some(url)) if !is_object_storage_url(url) => {
                bail!("{entry}: url = {url:?}: only s3://, gs:// and az:// URLs are supported; or use `path`")
            }
            (Some(p), None) if !p.is_absolute() => {
                bail!("{entry}: path = {:?}: must be an absolute path", p.display())
            }
            (Some(p), None) if primary.path.as_ref() == Some(p) => {
                bail!("{entry}: path = {:?} is the primary repository itself", p.display())
            }
            (None, Some(u)) if primary.url.as_deref().map(same_place) == Some(same_place(u)) => {
                bail!("{entry}: url = {u:?} is the primary repository itself")
            }
            _ => {}
        }
        if self.path.is_some()
            && (self.endpoint.is_some() || self.region.is_some() || self.allow_http || self.force_path_style)
        {
            bail!("{entry}: endpoint, region, allow_http and force_path_style apply to a `url`, not a `path`");
        }
        if self.url.as_deref().is_some_and(is_azure_url) && (self.region.is_some() || self.force_path_style) {
            bail!("{entry}: region and force_path_style apply to an s3:// url, not to az://");
        }
        if self.queue_bytes == Some(0) {
            bail!("{entry}: queue_bytes must be greater than 0");
        }
        Ok(())
    }
}

impl RepositoryConfig {
    /// `max_upload_rate` in bytes per second, if set.
    pub fn max_upload_rate(&self) -> Result<Option<u64>> {
        repository_rate(&self.max_upload_rate, "[repository] max_upload_rate")
    }

    /// `max_download_rate` in bytes per second, if set.
    pub fn max_download_rate(&self) -> Result<Option<u64>> {
        repository_rate(&self.max_download_rate, "[repository] max_download_rate")
    }

    /// The object-storage client settings, checked (`validate` calls this, so later calls on a
    /// loaded config do not fail). The rules are pitr-archive's; this says where they came from.
    pub fn cloud_options(&self) -> Result<pitr_archive::cloud::CloudOptions> {
        let settings = pitr_archive::cloud::options::CloudSettings {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            allow_http: self.allow_http,
            force_path_style: self.force_path_style,
            service_account_key: self.service_account_key.clone(),
            storage_account: self.storage_account.clone(),
            max_concurrency: self.max_concurrency,
            multipart_threshold: self.multipart_threshold,
            multipart_part_size: self.multipart_part_size,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
            retry_initial_backoff: self.retry_initial_backoff,
            retry_max_backoff: self.retry_max_backoff,
            object_lock_days: self.object_lock_days,
            object_lock_mode: self.object_lock_mode.clone(),
        };
        settings.options(self.url.as_deref()).map_err(|e| anyhow!("[repository] {e}"))
    }
}

fn default_zstd_level() -> i32 {
    3
}

fn default_wal_zstd_level() -> i32 {
    pitr_archive::repository::DEFAULT_WAL_ZSTD_LEVEL
}

/// `[encryption]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// A key file of master keys (created by `pitr init` when no other source is set, mode 0600).
    pub key_file: Option<PathBuf>,
    /// An environment variable holding master keys in the key file's format.
    pub key_env: Option<String>,
    /// A program (and its arguments; no shell) that prints master keys in the key file's format:
    /// a secret manager's CLI.
    pub key_command: Option<Vec<String>>,
    /// An AWS KMS key (id, ARN, `alias/NAME`) as the master key: repository keys come from its
    /// `GenerateDataKey` and are unwrapped with `Decrypt`.
    pub kms_key_id: Option<String>,
    /// KMS endpoint URL (a VPC endpoint or a KMS-compatible server); default AWS's for the region.
    pub kms_endpoint: Option<String>,
    /// KMS region; default `AWS_REGION`, the profile's, or us-east-1.
    pub kms_region: Option<String>,
    /// How long one KMS operation may take, retries included (default 10 s).
    #[serde(default, with = "humantime_serde")]
    pub kms_timeout: Option<Duration>,
    /// The master key that wraps new repository keys; default the KMS key, else the last key of
    /// key_command, key_env, key_file.
    pub active_key: Option<String>,
    /// How long unwrapped repository keys are kept in memory before the records are read and
    /// unwrapped again (default 5 min).
    #[serde(default, with = "humantime_serde")]
    pub key_cache_ttl: Option<Duration>,
}

impl EncryptionConfig {
    /// The configured key sources.
    pub fn key_sources(&self) -> pitr_archive::KeySources {
        pitr_archive::KeySources {
            key_file: self.key_file.clone(),
            key_env: self.key_env.clone(),
            key_command: self.key_command.clone(),
            kms: self.kms_key_id.as_ref().map(|id| {
                let mut opts = pitr_archive::keys::kms::KmsOptions::new(id.clone());
                opts.endpoint = self.kms_endpoint.clone();
                opts.region = self.kms_region.clone();
                if let Some(t) = self.kms_timeout {
                    opts.timeout = t;
                }
                opts
            }),
            active_key: self.active_key.clone(),
            cache_ttl: self.key_cache_ttl.unwrap_or(pitr_archive::keys::master::DEFAULT_CACHE_TTL),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.key_file.is_none() && self.key_env.is_none() && self.key_command.is_none() && self.kms_key_id.is_none()
        {
            bail!("[encryption]: set a key source: key_file, key_env, key_command or kms_key_id");
        }
        if let Some(argv) = &self.key_command {
            match argv.first() {
                None => bail!("[encryption] key_command: empty; give the program and its arguments as a list"),
                Some(p) if !std::path::Path::new(p).is_absolute() => {
                    bail!("[encryption] key_command: the program {p:?} must be an absolute path (no $PATH search, no shell)")
                }
                _ => {}
            }
        }
        if let Some(id) = &self.kms_key_id {
            if id.trim().is_empty() {
                bail!("[encryption] kms_key_id: empty");
            }
        } else if self.kms_endpoint.is_some() || self.kms_region.is_some() || self.kms_timeout.is_some() {
            bail!("[encryption] kms_endpoint, kms_region and kms_timeout need kms_key_id");
        }
        if let Some(t) = self.kms_timeout {
            if t < Duration::from_secs(1) || t > Duration::from_secs(600) {
                bail!("[encryption] kms_timeout = {}: must be between 1 s and 10 min", humantime::format_duration(t));
            }
        }
        if let Some(t) = self.key_cache_ttl {
            if t < Duration::from_secs(1) || t > Duration::from_secs(24 * 3600) {
                bail!("[encryption] key_cache_ttl = {}: must be between 1 s and 24 h", humantime::format_duration(t));
            }
        }
        Ok(())
    }
}

/// `[postgres]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style connection string of the primary (replication user).
    pub conninfo: String,
    /// Names the cluster in slot and application names.
    #[serde(default = "default_name")]
    pub name: String,
    /// Physical replication slot; default `pitr_<name>`.
    pub slot: Option<String>,
    /// Create the slot if it does not exist (default true).
    #[serde(default = "default_true")]
    pub create_slot: bool,
    /// Default `pitr_<name>`; put it in `synchronous_standby_names` for RPO 0.
    pub application_name: Option<String>,
    /// Refuse a server whose system identifier differs; also picks the cluster in a shared repository.
    pub system_id: Option<u64>,
    /// PostgreSQL's binaries (pg_ctl) for `restore --start`; default /usr/lib/postgresql/<major>/bin.
    pub bin_dir: Option<PathBuf>,
    /// Completeness marks are written at most this often while the archive is caught up
    /// (default 10 s; 0 turns them off).
    #[serde(default, with = "humantime_serde")]
    pub complete_interval: Option<Duration>,
    /// The longest message accepted from the server once it has authenticated pitr, and the
    /// most one result set may hold (bytes; default 16 MiB). What pitr receives is at most about
    /// 512 kB; a longer length drops the connection instead of being allocated. Before
    /// authentication a fixed 64 kB applies.
    pub max_message_size: Option<usize>,
}

fn default_name() -> String {
    "main".into()
}

fn default_true() -> bool {
    true
}

/// `[stream] flush_interval` as written: `"auto"` or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushIntervalSetting {
    /// [`AUTO_SPACING_LOCAL`] (local) or [`AUTO_SPACING_OBJECT_STORE`] while the primary does not
    /// wait for the sidecar, 0 while it does.
    Auto,
    /// Always this.
    Fixed(Duration),
}

impl<'de> Deserialize<'de> for FlushIntervalSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(FlushIntervalSetting::Auto);
        }
        humantime::parse_duration(text.trim()).map(FlushIntervalSetting::Fixed).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is neither \"auto\" nor a duration such as \"2ms\" ({e})"))
        })
    }
}

/// `flush_interval = "auto"` on a local repository while pitr is not a synchronous standby: a
/// quarter as many puts as without spacing beside pgbench -c 4, for ~1 ms more data at risk
/// (benches/, `--local-flush-ms 2`: tps beside 1.17x instead of 0.96x).
pub const AUTO_SPACING_LOCAL: Duration = Duration::from_millis(2);

/// The same on object storage: one put a second at most bounds the request bill.
pub const AUTO_SPACING_OBJECT_STORE: Duration = Duration::from_secs(1);

/// Bounds of `[stream] lease_ttl`.
const MIN_LEASE_TTL: Duration = Duration::from_secs(3);
const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);

/// `[stream]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    /// Minimum spacing between WAL puts: `"auto"` (the default) or a duration.
    #[serde(default)]
    pub flush_interval: Option<FlushIntervalSetting>,
    /// Longest time between standby status updates (default 10 s).
    #[serde(default, with = "humantime_serde")]
    pub status_interval: Option<Duration>,
    /// How long connecting and starting replication may take (default 15 s).
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
    /// How often the sidecar compares each secondary's listing with the primary's and copies
    /// what is missing (it also does at start; default 1 h).
    #[serde(default, with = "humantime_serde")]
    pub backfill_interval: Option<Duration>,
}

impl PostgresConfig {
    /// The replication slot: `slot`, else `pitr_<name>`.
    pub fn slot(&self) -> String {
        self.slot.clone().unwrap_or_else(|| format!("pitr_{}", self.name))
    }
    /// The application name: `application_name`, else `pitr_<name>`.
    pub fn application_name(&self) -> String {
        self.application_name.clone().unwrap_or_else(|| format!("pitr_{}", self.name))
    }
    /// Spacing of completeness marks (default 10 s; 0 is off).
    pub fn complete_interval(&self) -> Duration {
        self.complete_interval.unwrap_or(Duration::from_secs(10))
    }
    /// `conninfo` parsed, with `max_message_size` applied: what every connection to the
    /// server is opened with.
    pub fn connection_info(&self) -> Result<pitr_pgwire::ConnInfo> {
        let mut info: pitr_pgwire::ConnInfo = self.conninfo.parse().map_err(|e| anyhow!("[postgres] conninfo: {e}"))?;
        if let Some(max) = self.max_message_size {
            info.max_message_size = max;
        }
        Ok(info)
    }
}

/// `[mongo]`: a MongoDB replica set backed up beside (or instead of) PostgreSQL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoConfig {
    /// `mongodb://host:port/?replicaSet=NAME` (user and password in the URI if needed).
    pub uri: String,
    /// Objects go under `mongo/<name>/`; default the replica set's name.
    pub name: Option<String>,
    /// Longest time oplog entries wait before they are sealed into a slice (default 1 s).
    #[serde(default, with = "humantime_serde")]
    pub flush_interval: Option<Duration>,
    /// A slice is sealed sooner once this many bytes of entries are pending (default 16 MiB).
    pub max_slice_bytes: Option<usize>,
    /// How long to wait for the server when connecting (default 10 s).
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// A scratch server `pitr drill --source mongo` restores into. The drill drops every database
    /// on it first: never a server holding data you want.
    pub drill_target_uri: Option<String>,
    /// Cron for scheduled snapshots (default `[schedule] full_backup`; empty: off).
    pub snapshot_schedule: Option<String>,
    /// How often, while caught up, the tailer records that the archive holds every oplog entry
    /// the server has (a completeness mark; default 10 s).
    #[serde(default, with = "humantime_serde")]
    pub complete_interval: Option<Duration>,
    /// Oplog entries, documents, or collection and index descriptions per batch the server sends
    /// (default 1000); the server also caps each batch at 16 MiB.
    pub batch_size: Option<u32>,
    /// Longest wait for any answer of the server while tailing (default 30 s): a server or
    /// network that stops answering ends the cursor with an error and the tailer reconnects.
    #[serde(default, with = "humantime_serde")]
    pub read_timeout: Option<Duration>,
    /// The server `pitr restore --source mongo` restores into when no `--target-uri` is given;
    /// here (or in `$PITR_MONGO_TARGET_URI`) its password stays out of the process list.
    pub target_uri: Option<String>,
    /// A file whose first line is that URI (must not be readable by group or others).
    pub target_uri_file: Option<PathBuf>,
}

impl MongoConfig {
    fn validate(&self) -> Result<()> {
        if !(self.uri.starts_with("mongodb://") || self.uri.starts_with("mongodb+srv://")) {
            bail!("[mongo] uri: expected mongodb://host:port/?replicaSet=NAME");
        }
        if self.uri.starts_with("mongodb+srv://") {
            bail!("[mongo] uri: mongodb+srv:// needs DNS SRV lookups, which this build leaves out; list the hosts instead");
        }
        if let Some(n) = &self.name {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                bail!("[mongo] name = {n:?}: use letters, digits, `_` and `-`");
            }
        }
        if self.max_slice_bytes == Some(0) {
            bail!("[mongo] max_slice_bytes must be greater than 0");
        }
        if self.connect_timeout.is_some_and(|d| d.is_zero()) {
            bail!("[mongo] connect_timeout must be greater than 0");
        }
        if self.complete_interval.is_some_and(|d| d < Duration::from_millis(100)) {
            bail!("[mongo] complete_interval must be at least 100ms");
        }
        if let Some(u) = &self.drill_target_uri {
            if !u.starts_with("mongodb://") {
                bail!("[mongo] drill_target_uri: expected mongodb://host:port/");
            }
        }
        if let Some(u) = &self.target_uri {
            if !u.starts_with("mongodb://") {
                bail!("[mongo] target_uri: expected mongodb://host:port/");
            }
        }
        if self.target_uri.is_some() && self.target_uri_file.is_some() {
            bail!("[mongo] target_uri and target_uri_file: set one of them, not both");
        }
        if self.batch_size == Some(0) {
            bail!("[mongo] batch_size must be greater than 0");
        }
        if self.read_timeout.is_some_and(|d| d < Duration::from_secs(2)) {
            // The tailer's getMore waits up to 1 s for new entries before answering empty.
            bail!("[mongo] read_timeout must be at least 2s (an idle getMore waits 1 s for new entries)");
        }
        if let Some(cron) = &self.snapshot_schedule {
            parse_cron("[mongo] snapshot_schedule", cron)?;
        }
        Ok(())
    }

    /// How long to wait for the server when connecting.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.unwrap_or(Duration::from_secs(10))
    }

    /// Items per batch the server sends.
    pub fn batch_size(&self) -> u32 {
        self.batch_size.unwrap_or(1000)
    }

    /// Longest wait for an answer of the server while tailing.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout.unwrap_or(Duration::from_secs(30))
    }
}

/// `[[dumps]]`: a logical dump set (the seed runbook's development database: daily at 01:00
/// local time, kept 7 days).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpConfig {
    /// The set's name (1-64 of `a-z 0-9 _ -`), unique among `[[dumps]]`.
    pub name: String,
    /// libpq-style connection string of the database dumped (`dbname` required).
    #[serde(default)]
    pub conninfo: String,
    /// Cron expression (5 fields, or 6 with seconds first) in `time_zone`; `""` = never.
    #[serde(default = "default_dump_schedule")]
    pub schedule: String,
    /// The zone `schedule` is read in: `"local"` (the host's), `"UTC"`, or a fixed offset such
    /// as `"+02:00"`.
    #[serde(default = "default_dump_time_zone")]
    pub time_zone: String,
    /// `pitr expire` removes dumps that started longer ago than this; the newest always stays.
    #[serde(default = "default_dump_keep_days")]
    pub keep_days: u32,
}

/// By hand: the conninfo may carry the dumping role's password, which must not reach a log.
impl std::fmt::Debug for DumpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DumpConfig")
            .field("name", &self.name)
            .field("conninfo", &pitr_pgwire::conninfo::redact_in_text(&self.conninfo))
            .field("schedule", &self.schedule)
            .field("time_zone", &self.time_zone)
            .field("keep_days", &self.keep_days)
            .finish()
    }
}

fn default_dump_schedule() -> String {
    "0 0 1 * * *".into()
}
fn default_dump_time_zone() -> String {
    "local".into()
}
fn default_dump_keep_days() -> u32 {
    7
}

/// The zone of a `[[dumps]]` schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpZone {
    /// The host's zone (`chrono::Local`, from `TZ` or /etc/localtime), daylight saving included.
    Local,
    /// UTC.
    Utc,
    /// A fixed offset from UTC.
    Fixed(chrono::FixedOffset),
}

impl DumpZone {
    /// `"local"`, `"UTC"` or `±HH:MM` (also `±HH`, `±HHMM`).
    pub fn parse(text: &str) -> Option<DumpZone> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("local") {
            return Some(DumpZone::Local);
        }
        if t.eq_ignore_ascii_case("utc") || t == "Z" {
            return Some(DumpZone::Utc);
        }
        let (sign, rest) = match t.as_bytes().first()? {
            b'+' => (1, &t[1..]),
            b'-' => (-1, &t[1..]),
            _ => return None,
        };
        let digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
        let (h, m) = match rest.len() {
            2 => (rest, "00"),
            4 => (rest.get(..2)?, rest.get(2..)?),
            5 if rest.as_bytes()[2] == b':' => (rest.get(..2)?, rest.get(3..)?),
            _ => return None,
        };
        if !digits(h) || !digits(m) {
            return None;
        }
        let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
        if h > 15 || m > 59 {
            return None;
        }
        chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60)).map(DumpZone::Fixed)
    }
}

impl DumpConfig {
    /// The schedule's zone (validated at load).
    pub fn zone(&self) -> DumpZone {
        DumpZone::parse(&self.time_zone).unwrap_or(DumpZone::Local)
    }

    /// `conninfo` parsed (validated at load).
    pub fn connection_info(&self) -> Result<pitr_pgwire::ConnInfo> {
        self.conninfo.parse().map_err(|e| anyhow!("[[dumps]] {:?}: conninfo: {e}", self.name))
    }

    /// The first scheduled run strictly after `t`, the cron read in the set's zone; `None` when
    /// the schedule is off (`""`) or has no next run.
    pub fn next_run_after(&self, t: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
        let cron = parse_dump_cron(&self.name, &self.schedule).ok()??;
        let next_in = |t| match self.zone() {
            DumpZone::Local => {
                cron.find_next_occurrence(&chrono::DateTime::<chrono::Local>::from(t), false).map(|n| n.to_utc())
            }
            DumpZone::Utc => cron.find_next_occurrence(&t, false),
            DumpZone::Fixed(off) => cron.find_next_occurrence(&t.with_timezone(&off), false).map(|n| n.to_utc()),
        };
        next_in(t).ok()
    }
}

fn parse_dump_cron(set: &str, expr: &str) -> Result<Option<croner::Cron>> {
    if expr.trim().is_empty() {
        return Ok(None);
    }
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map(Some)
        .map_err(|e| anyhow!("[[dumps]] {set:?}: schedule = {expr:?}: not a cron expression ({e})"))
}

/// The names of a `[[files]]` or `[[dumps]]` section's entries: each valid as an object-name
/// component ([`pitr_archive::names::files::valid_set_name`]) and none twice.
fn check_set_names<'a>(section: &str, names: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, name) in names.enumerate() {
        if !pitr_archive::names::files::valid_set_name(name) {
            bail!(
                "{section} entry {}: name = {name:?}: use 1 to 64 of a-z, 0-9, `_` and `-` (not starting with `-`)",
                i + 1
            );
        }
        if !seen.insert(name) {
            bail!("{section} {name:?}: two entries have this name");
        }
    }
    Ok(())
}

/// A set's `keep_days`: 1 to 36500.
fn check_keep_days(section: &str, name: &str, keep_days: u32) -> Result<()> {
    if !(1..=36_500).contains(&keep_days) {
        bail!("{section} {name:?}: keep_days = {keep_days}: must be between 1 and 36500");
    }
    Ok(())
}

/// The entry of `sets` named `set`; an unknown name is an error naming the configured ones.
fn named_set<'a, T>(
    sets: &'a [T],
    name: impl Fn(&T) -> &String,
    set: &str,
    what: &str,
    section: &str,
) -> Result<&'a T> {
    sets.iter().find(|s| name(s) == set).ok_or_else(|| {
        let names: Vec<&str> = sets.iter().map(|s| name(s).as_str()).collect();
        if names.is_empty() {
            anyhow!("no {what} {set:?}: the config has no {section} sets")
        } else {
            anyhow!("no {what} {set:?}: the configured {section} sets are {}", names.join(", "))
        }
    })
}

fn validate_dumps(dumps: &[DumpConfig]) -> Result<()> {
    check_set_names("[[dumps]]", dumps.iter().map(|d| d.name.as_str()))?;
    for d in dumps {
        if d.conninfo.trim().is_empty() {
            bail!(
                "[[dumps]] {:?}: conninfo is missing (the database to dump, e.g. \"host=... dbname=dev user=...\")",
                d.name
            );
        }
        let info = d.connection_info()?;
        if info.dbname.is_none() {
            bail!("[[dumps]] {:?}: conninfo names no database: add dbname=...", d.name);
        }
        parse_dump_cron(&d.name, &d.schedule)?;
        if DumpZone::parse(&d.time_zone).is_none() {
            bail!(
                "[[dumps]] {:?}: time_zone = {:?}: use \"local\", \"UTC\" or a fixed offset such as \"+02:00\"",
                d.name,
                d.time_zone
            );
        }
        check_keep_days("[[dumps]]", &d.name, d.keep_days)?;
    }
    Ok(())
}

impl Config {
    /// The `[[dumps]]` set named `set`; an unknown name is an error naming the configured ones.
    pub fn dump_set(&self, set: &str) -> Result<&DumpConfig> {
        named_set(&self.dumps, |d| &d.name, set, "dump set", "[[dumps]]")
    }
}

/// `[[files]]`: a file set (the seed runbook's uploads: hourly incremental, daily full, 90 days).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// The set's name (1-64 of `a-z 0-9 _ -`), unique among `[[files]]`.
    pub name: String,
    /// The directory (or single file) backed up; absolute.
    pub path: PathBuf,
    /// Glob patterns of paths left out, relative to `path`: one without `/` matches a name at any
    /// depth (`*.tmp`), one with `/` the whole relative path (`cache/**`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Cron expression (UTC, like `[schedule]`) of full backups; `""` = never.
    #[serde(default = "default_files_full")]
    pub full: String,
    /// Cron expression (UTC) of incremental backups; `""` = never.
    #[serde(default = "default_files_incremental")]
    pub incremental: String,
    /// `pitr expire` removes backups that finished longer ago than this; the newest always stays.
    #[serde(default = "default_files_keep_days")]
    pub keep_days: u32,
}

fn default_files_full() -> String {
    "0 0 2 * * *".into()
}
fn default_files_incremental() -> String {
    "0 0 * * * *".into()
}
fn default_files_keep_days() -> u32 {
    90
}

impl FilesConfig {
    /// `full` or `incremental` parsed; `None` when off (`""`).
    pub fn cron(&self, incremental: bool) -> Result<Option<croner::Cron>> {
        let (field, expr) = if incremental { ("incremental", &self.incremental) } else { ("full", &self.full) };
        if expr.trim().is_empty() {
            return Ok(None);
        }
        croner::Cron::new(expr)
            .with_seconds_optional()
            .parse()
            .map(Some)
            .map_err(|e| anyhow!("[[files]] {:?}: {field} = {expr:?}: not a cron expression ({e})", self.name))
    }
}

fn validate_files(sets: &[FilesConfig]) -> Result<()> {
    check_set_names("[[files]]", sets.iter().map(|f| f.name.as_str()))?;
    for f in sets {
        if !f.path.is_absolute() {
            bail!("[[files]] {:?}: path = {:?}: must be an absolute path", f.name, f.path.display());
        }
        if let Err(e) = pitr_files::tree::Excludes::new(&f.exclude) {
            bail!("[[files]] {:?}: {e}", f.name);
        }
        f.cron(false)?;
        f.cron(true)?;
        check_keep_days("[[files]]", &f.name, f.keep_days)?;
    }
    Ok(())
}

impl Config {
    /// The `[[files]]` set named `set`; an unknown name is an error naming the configured ones.
    pub fn files_set(&self, set: &str) -> Result<&FilesConfig> {
        named_set(&self.files, |f| &f.name, set, "file set", "[[files]]")
    }
}

impl Config {
    /// The path of the config file: `--config`, else `$PITR_CONFIG`, else `./pitr.toml`.
    pub fn path(flag: Option<&Path>) -> PathBuf {
        flag.map(Path::to_path_buf)
            .or_else(|| std::env::var_os("PITR_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("pitr.toml"))
    }

    /// Reads, overrides from the environment and validates the config file at `path`.
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

    /// Parses config text with `env`'s `$PITR_<SECTION>_<KEY>` overrides, and validates it.
    pub fn parse(text: &str, env: &[(String, String)]) -> Result<Config> {
        // A TOML error quotes the offending line, which may be the conninfo with its password.
        let shown = |e: String| anyhow!("{}", pitr_pgwire::conninfo::redact_in_text(e.trim_end()));
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| shown(e.to_string()))?;
        apply_env_overrides(&mut table, env)?;
        let config: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| shown(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        match (&self.repository.path, &self.repository.url) {
            (None, None) => bail!("[repository]: set `path` (a local directory) or `url`"),
            (Some(_), Some(_)) => bail!("[repository]: set either `path` or `url`, not both"),
            (None, Some(url)) if !is_object_storage_url(url) => {
                bail!("[repository] url = {url:?}: only s3://, gs:// and az:// URLs are supported; or use `path`")
            }
            (Some(p), None) if !p.is_absolute() => {
                bail!("[repository] path = {:?}: must be an absolute path", p.display())
            }
            _ => {}
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.repository.secondary.iter().enumerate() {
            if s.name.is_empty() || !s.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                bail!(
                    "[[repository.secondary]] entry {}: name = {:?}: use letters, digits, `_` and `-`",
                    i + 1,
                    s.name
                );
            }
            if s.name == PRIMARY_NAME {
                bail!("[[repository.secondary]] {:?}: that name means the [repository] itself; choose another", s.name);
            }
            if !names.insert(s.name.as_str()) {
                bail!("[[repository.secondary]] {:?}: two entries have this name", s.name);
            }
            s.validate(&self.repository)?;
            let same = self.repository.secondary[..i].iter().find(|o| {
                (o.path.is_some() && o.path == s.path)
                    || o.url.as_deref().zip(s.url.as_deref()).is_some_and(|(a, b)| same_place(a) == same_place(b))
            });
            if let Some(o) = same {
                bail!("[[repository.secondary]] {:?}: same location as {:?}", s.name, o.name);
            }
        }
        self.repository.cloud_options()?;
        self.encryption.validate()?;
        if !(1..=22).contains(&self.repository.zstd_level) {
            bail!("[repository] zstd_level = {}: must be between 1 and 22", self.repository.zstd_level);
        }
        if !(1..=22).contains(&self.repository.wal_zstd_level) {
            bail!("[repository] wal_zstd_level = {}: must be between 1 and 22", self.repository.wal_zstd_level);
        }
        if let Some(pg) = &self.postgres {
            pg.connection_info()?;
            if let Some(m) = pg.max_message_size {
                // Below 1 MiB a genuine server's WAL messages (up to 512 kB) could be refused;
                // PostgreSQL itself sends nothing above 1 GiB.
                if !(1 << 20..=1 << 30).contains(&m) {
                    bail!("[postgres] max_message_size = {m}: must be between 1048576 (1 MiB) and 1073741824 (1 GiB) bytes");
                }
            }
            pitr_pgwire::connection::validate_slot_name(&pg.slot()).map_err(|e| anyhow!("[postgres] slot: {e}"))?;
        }
        if let Some(text) = &self.backup.conninfo {
            let pg = self.postgres.as_ref().ok_or_else(|| {
                anyhow!("[backup] conninfo names a standby of the [postgres] primary, but the config has no [postgres] section")
            })?;
            if text.trim().is_empty() {
                bail!("[backup] conninfo is empty: name a standby (\"host=... user=...\"), or remove it to back up the primary");
            }
            self.backup.standby_connection_info(pg)?;
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
            ("expire", &self.schedule.expire),
            ("partial_drill", &self.schedule.partial_drill),
        ] {
            if field == "incremental" && self.schedule.incremental_auto() {
                continue;
            }
            parse_cron(field, expr)?;
        }
        if self.schedule.incremental_auto() {
            if self.schedule.auto_min_spacing < Duration::from_secs(1) {
                bail!("[schedule] auto_min_spacing: must be at least 1s");
            }
            let f = self.targets.rto_auto_fraction;
            if !(f > 0.0 && f <= 1.0) {
                bail!("[targets] rto_auto_fraction = {f}: must be above 0 and at most 1");
            }
        }
        self.schedule.key_rotation()?;
        self.retention.validate()?;
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!(
                "[metrics] listen = {:?}: expected ADDRESS:PORT such as 127.0.0.1:9187, or \"\" for off",
                self.metrics.listen
            );
        }
        if !(self.targets.rpo_seconds > 0.0 && self.targets.rto_seconds > 0.0) {
            bail!("[targets] rpo_seconds and rto_seconds must be positive");
        }
        self.backup.max_rate_kib()?;
        self.repository.max_upload_rate()?;
        self.repository.max_download_rate()?;
        if self.backup.parallel == Some(0) {
            bail!("[backup] parallel must be at least 1");
        }
        if let Some(0) = self.stream.max_pending_bytes {
            bail!("[stream] max_pending_bytes must be greater than 0");
        }
        if self.stream.status_interval.is_some_and(|d| d.is_zero()) {
            bail!("[stream] status_interval must be greater than 0");
        }
        if self.stream.backfill_interval.is_some_and(|d| d.is_zero()) {
            bail!("[stream] backfill_interval must be greater than 0");
        }
        if let Some(ttl) = self.stream.lease_ttl {
            // Renewed every third of it, with a quarter kept as a safety margin: below 3 s a
            // renewal has under a second to reach object storage. Above an hour, a crashed
            // sidecar on another host would hold the cluster's WAL up that long.
            if ttl < MIN_LEASE_TTL || ttl > MAX_LEASE_TTL {
                bail!(
                    "[stream] lease_ttl = \"{}\" is out of range: it must be between {} and {} \
                     (renewed every third of it; a takeover waits a whole one)",
                    humantime::format_duration(ttl),
                    humantime::format_duration(MIN_LEASE_TTL),
                    humantime::format_duration(MAX_LEASE_TTL)
                );
            }
        }
        if let Some(m) = &self.mongo {
            m.validate()?;
        }
        validate_dumps(&self.dumps)?;
        validate_files(&self.files)?;
        Ok(())
    }

    /// `[postgres]`, for the commands that need it.
    pub fn postgres(&self) -> Result<&PostgresConfig> {
        self.postgres.as_ref().ok_or_else(|| anyhow!("the config has no [postgres] section (conninfo = \"...\")"))
    }

    /// `[mongo]`, for the commands that need it.
    pub fn mongo(&self) -> Result<&MongoConfig> {
        self.mongo
            .as_ref()
            .ok_or_else(|| anyhow!("the config has no [mongo] section (uri = \"mongodb://…/?replicaSet=…\")"))
    }

    /// The cluster `[postgres] system_id` pins; `None` lets the repository's only cluster be it.
    pub fn system_id(&self) -> Option<u64> {
        self.postgres.as_ref().and_then(|p| p.system_id)
    }

    /// `[repository] path` (for a local repository).
    pub fn repository_path(&self) -> &Path {
        // `validate` guarantees a path.
        self.repository.path.as_deref().unwrap_or(Path::new("/"))
    }

    /// Minimum spacing between WAL puts: a fixed one as set, else `auto` with the repository's
    /// spacing for when the primary does not wait for the sidecar.
    pub fn flush_interval(&self) -> pitr_walstream::FlushInterval {
        match self.stream.flush_interval {
            Some(FlushIntervalSetting::Fixed(d)) => pitr_walstream::FlushInterval::Fixed(d),
            Some(FlushIntervalSetting::Auto) | None => pitr_walstream::FlushInterval::Auto {
                when_async: if self.repository.url.is_some() { AUTO_SPACING_OBJECT_STORE } else { AUTO_SPACING_LOCAL },
            },
        }
    }

    /// Where `pitr stream` writes its live status: set, else `$TMPDIR/pitr-<name>.status.json`.
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
    use pitr_walstream::FlushInterval;

    pub(super) const MINIMAL: &str = r#"
[repository]
path = "/var/lib/pitr/repo"        # or url = "s3://bucket/prefix"
[encryption]
key_file = "/etc/pitr/key"
[postgres]
conninfo = "host=127.0.0.1 port=5432 user=replicator"
"#;

    #[test]
    fn journal_section_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("journal.key");
        let signer = pitr_archive::journal::JournalSigner::create_file(&key_file).unwrap();
        let public = pitr_archive::journal::public_key_text(&signer.verifying_key());
        let c = Config::parse(MINIMAL, &[]).unwrap();
        assert!(c.journal.is_none());
        let text = format!("{MINIMAL}[journal]\nsigning_key_file = {:?}\n", key_file.display().to_string());
        let c = Config::parse(&text, &[]).unwrap();
        let j = c.journal.as_ref().unwrap();
        assert_eq!(j.interval, Duration::from_secs(10));
        assert_eq!(j.verifying_key().unwrap(), signer.verifying_key());
        let c =
            Config::parse(&format!("{MINIMAL}[journal]\npublic_key = \"{public}\"\ninterval = \"2s\"\n"), &[]).unwrap();
        let j = c.journal.as_ref().unwrap();
        assert!(j.signer().unwrap().is_none());
        assert_eq!((j.verifying_key().unwrap(), j.interval), (signer.verifying_key(), Duration::from_secs(2)));
        let other = pitr_archive::journal::public_key_text(
            &pitr_archive::journal::JournalSigner::from_seed([9; 32]).verifying_key(),
        );
        let text = format!("{text}public_key = \"{other}\"\n");
        let err = Config::parse(&text, &[]).unwrap().journal.unwrap().verifying_key().unwrap_err();
        assert!(err.to_string().contains("is not the public key of signing_key_file"), "{err}");
        assert!(Config::parse(&format!("{MINIMAL}[journal]\nbogus = 1\n"), &[]).is_err());
    }

    #[test]
    fn the_design_minimal_config_works() {
        let c = Config::parse(MINIMAL, &[]).unwrap();
        let pg = c.postgres().unwrap();
        assert_eq!(pg.slot(), "pitr_main");
        assert_eq!(c.flush_interval(), FlushInterval::Auto { when_async: AUTO_SPACING_LOCAL });
        assert_eq!(pg.complete_interval(), Duration::from_secs(10));
        let c = Config::parse(MINIMAL, &[("PITR_POSTGRES_COMPLETE_INTERVAL".into(), "0s".into())]).unwrap();
        assert_eq!(c.postgres().unwrap().complete_interval(), Duration::ZERO);
    }

    #[test]
    fn incremental_auto_is_no_cron_and_its_settings_are_checked() {
        let c = Config::parse(MINIMAL, &[]).unwrap();
        assert!(!c.schedule.incremental_auto());
        assert_eq!((c.targets.rto_auto_fraction, c.schedule.auto_min_spacing), (0.8, Duration::from_secs(600)));
        let auto = format!("{MINIMAL}[schedule]\nincremental = \"auto\"\nauto_min_spacing = \"30s\"\n");
        let c = Config::parse(&auto, &[]).unwrap();
        assert!(c.schedule.incremental_auto());
        assert_eq!(c.schedule.auto_min_spacing, Duration::from_secs(30));
        for bad in ["0", "1.5", "-1"] {
            let text = format!("{auto}[targets]\nrto_auto_fraction = {bad}\n");
            let err = format!("{:#}", Config::parse(&text, &[]).unwrap_err());
            assert!(err.contains("rto_auto_fraction"), "{err}");
        }
    }

    #[test]
    fn postgres_max_message_size_reaches_the_connection_and_is_checked() {
        let c = Config::parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.postgres().unwrap().connection_info().unwrap().max_message_size, 16 << 20);
        let text = format!("{MINIMAL}max_message_size = 2097152\n");
        let c = Config::parse(&text, &[]).unwrap();
        assert_eq!(c.postgres().unwrap().connection_info().unwrap().max_message_size, 2 << 20);
        for bad in ["1000", "2147483648"] {
            let text = format!("{MINIMAL}max_message_size = {bad}\n");
            let err = format!("{:#}", Config::parse(&text, &[]).unwrap_err());
            assert!(err.contains("max_message_size") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn toml_errors_do_not_show_the_password() {
        for conninfo in [
            "conninfo = \"host=h password=s3cr3t\" oops",
            "conninfo = \"postgresql://u:s3cr3t@h/db\" oops",
            "conninfo = \"postgres://h/db?password=s3cr3t\" oops",
        ] {
            let text = MINIMAL.replace("conninfo = \"host=127.0.0.1 port=5432 user=replicator\"", conninfo);
            let err = format!("{:#}", Config::parse(&text, &[]).unwrap_err());
            assert!(err.contains("line 7") && err.contains("***"), "{err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
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
        assert_eq!(c.flush_interval(), FlushInterval::Fixed(Duration::from_millis(250)));
        assert_eq!(c.stream.max_pending_bytes, Some(1000));
        Config::parse(MINIMAL, &[("PITR_TEST_DIR".into(), "/x".into())]).unwrap();
        let err = Config::parse(MINIMAL, &[("PITR_STREAM_FLUSH_INTERVALL".into(), "1s".into())]).unwrap_err();
        assert!(err.to_string().contains("flush_intervall"), "{err}");
    }

    #[test]
    fn flush_interval_is_auto_unless_a_duration_is_given() {
        let with = |line: &str| Config::parse(&format!("{MINIMAL}[stream]\n{line}\n"), &[]).map(|c| c.flush_interval());
        assert_eq!(with("flush_interval = \"auto\"").unwrap(), FlushInterval::Auto { when_async: AUTO_SPACING_LOCAL });
        assert_eq!(
            with("flush_interval = \" AUTO \"").unwrap(),
            FlushInterval::Auto { when_async: AUTO_SPACING_LOCAL }
        );
        assert_eq!(with("flush_interval = \"0s\"").unwrap(), FlushInterval::Fixed(Duration::ZERO));
        assert_eq!(with("flush_interval = \"5ms\"").unwrap(), FlushInterval::Fixed(Duration::from_millis(5)));
        let err = with("flush_interval = \"sometimes\"").unwrap_err().to_string();
        assert!(err.contains("flush_interval") && err.contains("neither \"auto\""), "{err}");
        assert!(with("flush_interval = 5").is_err());
        let s3 = MINIMAL.replace("path = \"/var/lib/pitr/repo\"", "url = \"s3://bucket/prefix\"");
        let c = Config::parse(&s3, &[]).unwrap();
        assert_eq!(c.flush_interval(), FlushInterval::Auto { when_async: AUTO_SPACING_OBJECT_STORE });
        let env = [("PITR_STREAM_FLUSH_INTERVAL".to_string(), "auto".to_string())];
        let c = Config::parse(&s3, &env).unwrap();
        assert_eq!(c.flush_interval(), FlushInterval::Auto { when_async: AUTO_SPACING_OBJECT_STORE });
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

    #[test]
    fn key_rotation_and_the_drill_section() {
        let c = Config::parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.schedule.key_rotation().unwrap(), Some(Duration::from_secs(90 * 86400)));
        assert!(!c.drill.key_rotation);
        let c =
            Config::parse(&format!("{MINIMAL}[schedule]\nkey_rotation = \"off\"\n[drill]\nkey_rotation = true\n"), &[])
                .unwrap();
        assert_eq!(c.schedule.key_rotation().unwrap(), None);
        assert!(c.drill.key_rotation);
        let env = [("PITR_SCHEDULE_KEY_ROTATION".to_string(), "5s".to_string())];
        assert_eq!(
            Config::parse(MINIMAL, &env).unwrap().schedule.key_rotation().unwrap(),
            Some(Duration::from_secs(5))
        );
        for (bad, needle) in [("\"soon\"", "not a duration"), ("\"500ms\"", "at least 1s")] {
            let err = format!(
                "{:#}",
                Config::parse(&format!("{MINIMAL}[schedule]\nkey_rotation = {bad}\n"), &[]).unwrap_err()
            );
            assert!(err.contains("[schedule] key_rotation") && err.contains(needle), "{err}");
        }
        let err = format!("{:#}", Config::parse(&format!("{MINIMAL}[drill]\nkey_rotate = true\n"), &[]).unwrap_err());
        assert!(err.contains("key_rotate"), "{err}");
    }

    #[test]
    fn retention_defaults_overrides_and_bad_values_named() {
        let c = Config::parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.retention.policy(), pitr_archive::retention::Policy::default());
        assert_eq!(c.schedule.expire, "0 5 * * *");
        let env = vec![
            ("PITR_RETENTION_WINDOW".to_string(), "36h".to_string()),
            ("PITR_RETENTION_DAILY".to_string(), "3".to_string()),
        ];
        let c = Config::parse(MINIMAL, &env).unwrap();
        assert_eq!((c.retention.daily, c.retention.window), (3, Duration::from_secs(36 * 3600)));
        for (line, needle) in [
            ("daily = -1", "daily"),
            ("weekly = \"many\"", "weekly"),
            ("monthly = 1.5", "monthly"),
            ("window = \"a week\"", "window"),
            ("lock_ttl = \"1s\"", "lock_ttl"),
            ("lock_ttl = \"25h\"", "at most 1day"),
            ("stale_backup_after = \"0s\"", "stale_backup_after"),
            ("keep_last = 3", "keep_last"),
        ] {
            let err = format!("{:#}", Config::parse(&format!("{MINIMAL}[retention]\n{line}\n"), &[]).unwrap_err());
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
        let err = format!("{:#}", Config::parse(MINIMAL, &[("PITR_RETENTION_YEARLY".into(), "x".into())]).unwrap_err());
        assert!(err.contains("yearly"), "{err}");
        let err =
            format!("{:#}", Config::parse(&format!("{MINIMAL}[schedule]\nexpire = \"daily\"\n"), &[]).unwrap_err());
        assert!(err.contains("expire"), "{err}");
    }

    #[test]
    fn secondaries_are_validated_by_name() {
        let good = format!(
            "{MINIMAL}[[repository.secondary]]\nname = \"nas\"\npath = \"/mnt/nas/pitr\"\n\
             [[repository.secondary]]\nname = \"other-cloud\"\nurl = \"s3://b/p\"\nregion = \"eu-west-1\"\nrequired = true\n\
             [[repository.secondary]]\nname = \"azure\"\nurl = \"az://pitr/copy\"\n"
        );
        let c = Config::parse(&good, &[]).unwrap();
        let names: Vec<_> = c.repository.secondary.iter().map(|s| (s.name.as_str(), s.required)).collect();
        assert_eq!(names, vec![("nas", false), ("other-cloud", true), ("azure", false)]);
        assert_eq!(c.repository.secondary[0].queue_bytes(), 256 << 20);
        let entry = |body: &str| format!("{MINIMAL}[[repository.secondary]]\n{body}\n");
        let cases = [
            (entry("name = \"a\""), "\"a\": set `path`"),
            (entry("name = \"a\"\npath = \"rel\""), "\"a\": path = \"rel\": must be an absolute path"),
            (entry("name = \"a\"\nurl = \"ftp://x\""), "\"a\": url = \"ftp://x\""),
            (entry("name = \"a\"\npath = \"/var/lib/pitr/repo\""), "primary repository itself"),
            (entry("name = \"primary\"\npath = \"/x\""), "\"primary\""),
            (entry("name = \"a b\"\npath = \"/x\""), "entry 1: name = \"a b\""),
            (entry("name = \"a\"\npath = \"/x\"\nregion = \"r\""), "not a `path`"),
            (entry("name = \"a\"\npath = \"/x\"\nrequierd = true"), "requierd"),
            (
                format!(
                    "{}{}",
                    entry("name = \"a\"\npath = \"/x\""),
                    entry("name = \"a\"\npath = \"/y\"").replace(MINIMAL, "")
                ),
                "two entries",
            ),
            (
                format!(
                    "{}{}",
                    entry("name = \"a\"\npath = \"/x\""),
                    entry("name = \"b\"\npath = \"/x\"").replace(MINIMAL, "")
                ),
                "same location as \"a\"",
            ),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", Config::parse(&text, &[]).unwrap_err());
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
    }

    #[test]
    fn azure_secondaries_are_compared_by_place_and_refuse_s3_settings() {
        let primary = MINIMAL.replace("path = \"/var/lib/pitr/repo\"", "url = \"az://pitr/main\"");
        let entry = |body: &str| format!("{primary}[[repository.secondary]]\n{body}\n");
        let cases = [
            (entry("name = \"a\"\nurl = \"azure://pitr/main/\""), "is the primary repository itself"),
            (entry("name = \"a\"\nurl = \"az://pitr/copy\"\nregion = \"r\""), "not to az://"),
            (entry("name = \"a\"\nurl = \"azure://pitr/copy\"\nforce_path_style = true"), "not to az://"),
            (
                format!(
                    "{}{}",
                    entry("name = \"a\"\nurl = \"az://pitr/copy\""),
                    entry("name = \"b\"\nurl = \"azure://pitr/copy/\"").replace(&primary, "")
                ),
                "same location as \"a\"",
            ),
            (primary.replace("[encryption]", "region = \"eu-west-1\"\n[encryption]"), "region applies to an s3://"),
            (primary.replace("[encryption]", "storage_account = \"My_Acct\"\n[encryption]"), "3 to 24"),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", Config::parse(&text, &[]).unwrap_err());
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
        // Another prefix in the same container is another place.
        Config::parse(&entry("name = \"a\"\nurl = \"azure://pitr/copy\""), &[]).unwrap();
    }

    #[test]
    fn mongo_section_errors_are_named() {
        const BASE: &str = "[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\n";
        for (extra, needle) in [
            ("uri = \"http://h\"", "[mongo] uri"),
            ("uri = \"mongodb+srv://h\"", "mongodb+srv"),
            ("uri = \"mongodb://h\"\nname = \"a b\"", "[mongo] name"),
            ("uri = \"mongodb://h\"\nflush_intervall = \"1s\"", "flush_intervall"),
            ("uri = \"mongodb://h\"\ntarget_uri = \"h:1\"", "[mongo] target_uri"),
            ("uri = \"mongodb://h\"\ntarget_uri = \"mongodb://t\"\ntarget_uri_file = \"/f\"", "not both"),
            ("uri = \"mongodb://h\"\nbatch_size = 0", "[mongo] batch_size"),
            ("uri = \"mongodb://h\"\nread_timeout = \"1s\"", "[mongo] read_timeout"),
        ] {
            let err = format!("{:#}", Config::parse(&format!("{BASE}[mongo]\n{extra}\n"), &[]).unwrap_err());
            assert!(err.contains(needle), "expected {needle:?} in {err}");
        }
        // The restore target's URI, password and all, can come from the environment.
        let env = [("PITR_MONGO_TARGET_URI".to_string(), "mongodb://u:p%40ss@t:1/".to_string())];
        let c = Config::parse(&format!("{BASE}[mongo]\nuri = \"mongodb://h\"\n"), &env).unwrap();
        let m = c.mongo.unwrap();
        assert_eq!(m.target_uri.as_deref(), Some("mongodb://u:p%40ss@t:1/"));
        assert_eq!((m.batch_size(), m.read_timeout()), (1000, Duration::from_secs(30)));
    }

    #[test]
    fn object_storage_options_are_checked() {
        let s3 = MINIMAL.replace("path = \"/var/lib/pitr/repo\"", "url = \"s3://bucket/prefix\"");
        let gs = MINIMAL.replace("path = \"/var/lib/pitr/repo\"", "url = \"gs://bucket/prefix\"");
        let az = MINIMAL.replace("path = \"/var/lib/pitr/repo\"", "url = \"az://container/prefix\"");
        let c = Config::parse(&gs, &[]).unwrap();
        assert_eq!(c.repository.cloud_options().unwrap().max_concurrency, 16);
        let c = Config::parse(&az.replace("[encryption]", "storage_account = \"acct\"\n[encryption]"), &[]).unwrap();
        assert_eq!(c.repository.cloud_options().unwrap().storage_account.as_deref(), Some("acct"));
        let locked =
            s3.replace("[encryption]", "object_lock_days = 30\nobject_lock_mode = \"compliance\"\n[encryption]");
        let lock = Config::parse(&locked, &[]).unwrap().repository.cloud_options().unwrap().object_lock.unwrap();
        assert_eq!((lock.mode, lock.days), (pitr_archive::cloud::LockMode::Compliance, 30));
        let cases = [
            (MINIMAL.replace("/var/lib/pitr/repo\"", "/x\"\nurl = \"ftp://b\""), "either"),
            (MINIMAL.replace("path = \"/var/lib/pitr/repo\"", "url = \"ftp://b/p\""), "az://"),
            (az.replace("[encryption]", "object_lock_days = 3\n[encryption]"), "Azure immutability policies"),
            (s3.replace("[encryption]", "storage_account = \"acct\"\n[encryption]"), "az://"),
            (gs.replace("[encryption]", "object_lock_days = 3\n[encryption]"), "s3://"),
            (s3.replace("[encryption]", "object_lock_days = 0\n[encryption]"), "at least 1"),
            (
                s3.replace("[encryption]", "object_lock_days = 3\nobject_lock_mode = \"strict\"\n[encryption]"),
                "COMPLIANCE",
            ),
            (s3.replace("[encryption]", "object_lock_mode = \"COMPLIANCE\"\n[encryption]"), "object_lock_days"),
            (s3.replace("[encryption]", "service_account_key = \"/k.json\"\n[encryption]"), "gs://"),
            (s3.replace("[encryption]", "multipart_part_size = 1048576\n[encryption]"), "5 MiB"),
            (s3.replace("[encryption]", "max_concurrency = 0\n[encryption]"), "max_concurrency"),
            (s3.replace("[encryption]", "request_timeout = \"0s\"\n[encryption]"), "request_timeout"),
            (s3.replace("[encryption]", "retry_timeout = \"soon\"\n[encryption]"), "retry_timeout"),
        ];
        for (text, needle) in cases {
            let err = format!("{:#}", Config::parse(&text, &[]).unwrap_err());
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
    }

    #[test]
    fn lease_ttl_too_short_or_too_long_is_refused_naming_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pitr.toml");
        for (ttl, ok) in [("2s", false), ("2999ms", false), ("3s", true), ("60s", true), ("1h", true), ("61min", false)]
        {
            std::fs::write(&path, format!("{MINIMAL}[stream]\nlease_ttl = \"{ttl}\"\n")).unwrap();
            match Config::load(&path) {
                Ok(c) => {
                    assert!(ok, "lease_ttl = {ttl} was accepted");
                    assert_eq!(c.stream.lease_ttl, Some(humantime::parse_duration(ttl).unwrap()));
                }
                Err(e) => {
                    let err = format!("{e:#}");
                    assert!(!ok, "lease_ttl = {ttl} was refused: {err}");
                    for needle in ["[stream] lease_ttl", "between 3s and 1h", &path.display().to_string()] {
                        assert!(err.contains(needle), "expected {needle:?} in: {err}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod dump_tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn config(dumps: &str) -> Result<Config> {
        let text = format!("[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\n{dumps}");
        Config::parse(&text, &[])
    }

    #[test]
    fn a_dump_set_takes_the_runbook_defaults_and_bad_entries_are_named() {
        let c = config("[[dumps]]\nname = \"devdb\"\nconninfo = \"host=db dbname=dev user=u\"\n").unwrap();
        assert!(c.postgres.is_none());
        let d = c.dump_set("devdb").unwrap();
        assert_eq!((d.schedule.as_str(), d.time_zone.as_str(), d.keep_days), ("0 0 1 * * *", "local", 7));
        let err = c.dump_set("prod").unwrap_err().to_string();
        assert!(err.contains("no dump set \"prod\"") && err.contains("devdb"), "{err}");

        for (entry, phrase) in [
            ("name = \"Dev DB\"\nconninfo = \"dbname=d\"", "name = \"Dev DB\""),
            ("name = \"d\"", "conninfo is missing"),
            ("name = \"d\"\nconninfo = \"host=x\"", "names no database"),
            ("name = \"d\"\nconninfo = \"dbname=d passfile=/x\"", "conninfo"),
            ("name = \"d\"\nconninfo = \"dbname=d\"\nschedule = \"every day\"", "schedule = \"every day\""),
            ("name = \"d\"\nconninfo = \"dbname=d\"\ntime_zone = \"Europe/Paris\"", "time_zone = \"Europe/Paris\""),
            ("name = \"d\"\nconninfo = \"dbname=d\"\nkeep_days = 0", "keep_days = 0"),
        ] {
            let err = format!("{:#}", config(&format!("[[dumps]]\n{entry}\n")).unwrap_err());
            assert!(err.contains(phrase), "{entry}: {err}");
        }
        let two =
            "[[dumps]]\nname = \"d\"\nconninfo = \"dbname=a\"\n[[dumps]]\nname = \"d\"\nconninfo = \"dbname=b\"\n";
        assert!(config(two).unwrap_err().to_string().contains("two entries"));
        // A password in the conninfo never shows in an error.
        let err = format!(
            "{:#}",
            config("[[dumps]]\nname = \"d\"\nconninfo = \"password=hunter2 bogus=1 dbname=d\"\n").unwrap_err()
        );
        assert!(!err.contains("hunter2"), "{err}");
        // Nor in the set's Debug form (a `{:?}` in a log line).
        let c = config("[[dumps]]\nname = \"d\"\nconninfo = \"host=db password='hunter2' dbname=d\"\n").unwrap();
        let shown = format!("{:?}", c.dump_set("d").unwrap());
        assert!(!shown.contains("hunter2") && shown.contains("host=db"), "{shown}");
    }

    #[test]
    fn the_schedule_is_read_in_the_sets_zone() {
        let set = |zone: &str| DumpConfig {
            name: "devdb".into(),
            conninfo: "dbname=dev".into(),
            schedule: "0 0 1 * * *".into(),
            time_zone: zone.into(),
            keep_days: 7,
        };
        let t = Utc.with_ymd_and_hms(2026, 12, 6, 12, 0, 0).unwrap();
        // 01:00 at +02:00 is 23:00 UTC the day before.
        assert_eq!(set("+02:00").next_run_after(t), Some(Utc.with_ymd_and_hms(2026, 12, 6, 23, 0, 0).unwrap()));
        assert_eq!(set("UTC").next_run_after(t), Some(Utc.with_ymd_and_hms(2026, 12, 7, 1, 0, 0).unwrap()));
        assert_eq!(set("-0530").next_run_after(t), Some(Utc.with_ymd_and_hms(2026, 12, 7, 6, 30, 0).unwrap()));
        // Strictly after: a run due now is not due again.
        let due = Utc.with_ymd_and_hms(2026, 12, 7, 1, 0, 0).unwrap();
        assert_eq!(set("UTC").next_run_after(due), Some(Utc.with_ymd_and_hms(2026, 12, 8, 1, 0, 0).unwrap()));
        let local = set("local").next_run_after(t).unwrap();
        let expected = chrono::Local
            .from_local_datetime(&chrono::NaiveDate::from_ymd_opt(2026, 12, 7).unwrap().and_hms_opt(1, 0, 0).unwrap())
            .earliest()
            .unwrap();
        let earlier = expected - chrono::Duration::days(1);
        assert!(local == expected.to_utc() || local == earlier.to_utc(), "{local}");
        assert_eq!(DumpConfig { schedule: String::new(), ..set("UTC") }.next_run_after(t), None);
        assert_eq!(DumpZone::parse("+2:00"), None);
        assert_eq!(DumpZone::parse("+16:00"), None);
    }
}

#[cfg(test)]
mod files_tests {
    use super::*;

    const BASE: &str = "[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\n";

    #[test]
    fn file_sets_take_the_runbooks_defaults_and_need_no_postgres() {
        let c = Config::parse(&format!("{BASE}[[files]]\nname = \"uploads\"\npath = \"/app/storage/uploads\"\n"), &[])
            .unwrap();
        let f = c.files_set("uploads").unwrap();
        assert_eq!((f.full.as_str(), f.incremental.as_str(), f.keep_days), ("0 0 2 * * *", "0 0 * * * *", 90));
        assert!(f.exclude.is_empty());
        assert!(c.postgres.is_none());
        let err = c.files_set("nope").unwrap_err().to_string();
        assert!(err.contains("\"nope\"") && err.contains("uploads"), "{err}");
    }

    #[test]
    fn bad_file_sets_are_named() {
        for (set, phrase) in [
            ("name = \"Up\"\npath = \"/a\"", "[[files]] entry 1: name = \"Up\""),
            ("name = \"up\"\npath = \"rel/dir\"", "must be an absolute path"),
            ("name = \"up\"\npath = \"/a\"\nfull = \"not cron\"", "[[files]] \"up\": full = \"not cron\""),
            ("name = \"up\"\npath = \"/a\"\nincremental = \"61 * * * *\"", "incremental ="),
            ("name = \"up\"\npath = \"/a\"\nexclude = [\"[\"]", "exclude pattern \"[\""),
            ("name = \"up\"\npath = \"/a\"\nkeep_days = 0", "keep_days = 0"),
            ("name = \"up\"\npath = \"/a\"\n[[files]]\nname = \"up\"\npath = \"/b\"", "two entries have this name"),
            ("name = \"up\"\npath = \"/a\"\nkeep = 3", "unknown field `keep`"),
        ] {
            let err = format!("{:#}", Config::parse(&format!("{BASE}[[files]]\n{set}\n"), &[]).unwrap_err());
            assert!(err.contains(phrase), "{set}: {err}");
        }
    }
}

#[cfg(test)]
mod rate_tests {
    use super::tests::MINIMAL;
    use super::*;

    #[test]
    fn rates_take_bytes_per_second_or_a_unit_and_convert() {
        let parse = |extra: &str, env: &[(String, String)]| Config::parse(&format!("{MINIMAL}{extra}"), env);
        let c = parse("", &[]).unwrap();
        assert_eq!(c.backup.max_rate_kib().unwrap(), None);
        assert_eq!(c.repository.max_upload_rate().unwrap(), None);
        assert_eq!(c.repository.max_download_rate().unwrap(), None);

        let text = "[backup]\nmax_rate = \"50MB/s\"\n";
        // 50 000 000 bytes/s is 48828.125 KiB/s: PostgreSQL's kB is 1024 bytes.
        assert_eq!(parse(text, &[]).unwrap().backup.max_rate_kib().unwrap(), Some(48828));
        for (rate, kib) in [
            ("\"32KiB/s\"", 32),
            ("\"1GiB/s\"", 1 << 20),
            ("\"1048576B/s\"", 1024),
            ("\"1.5 MiB/s\"", 1536),
            ("\" 50MB /s \"", 48828),
        ] {
            let c = parse(&format!("[backup]\nmax_rate = {rate}\n"), &[]).unwrap();
            assert_eq!(c.backup.max_rate_kib().unwrap(), Some(kib), "{rate}");
        }

        let env = [
            ("PITR_REPOSITORY_MAX_UPLOAD_RATE".to_string(), "2MiB/s".to_string()),
            ("PITR_REPOSITORY_MAX_DOWNLOAD_RATE".to_string(), "32768".to_string()),
        ];
        let c = parse("", &env).unwrap();
        assert_eq!(c.repository.max_upload_rate().unwrap(), Some(2 << 20));
        // A repository limit may be a bare integer of bytes per second.
        assert_eq!(c.repository.max_download_rate().unwrap(), Some(32768));
    }

    #[test]
    fn bad_rates_are_refused_naming_the_key() {
        for (text, phrase) in [
            ("[backup]\nmax_rate = \"10kB/s\"\n", "[backup] max_rate = \"10kB/s\": 10000 bytes per second is outside"),
            (
                "[backup]\nmax_rate = \"2GiB/s\"\n",
                "[backup] max_rate = \"2GiB/s\": 2147483648 bytes per second is outside",
            ),
            (
                "[backup]\nmax_rate = 65536\n",
                "[backup] max_rate = 65536: give a unit, such as \"65536kB/s\" or \"65536B/s\" (PostgreSQL's \
                 MAX_RATE and pg_basebackup --max-rate read a bare number as kB per second",
            ),
            ("[backup]\nmax_rate = 1.5\n", "[backup] max_rate = 1.5: a fraction needs a unit, such as \"1.5MB/s\""),
            ("[backup]\nmax_rate = \"50/s\"\n", "[backup] max_rate = \"50/s\": no unit before \"/s\""),
            ("[backup]\nmax_rate = \"0MB/s\"\n", "[backup] max_rate = \"0MB/s\": must be at least 1 byte per second"),
            ("[backup]\nmax_rate = \"50MB\"\n", "[backup] max_rate = \"50MB\": expected a rate"),
            ("[backup]\nmax_rate = \"50 mb/s\"\n", "[backup] max_rate = \"50 mb/s\": unknown unit \"mb\""),
            ("[backup]\nmax_rate = -5\n", "[backup] max_rate = -5: give a unit"),
            ("[backup]\nmax_rate = \"1e6B/s\"\n", "[backup] max_rate = \"1e6B/s\": unknown unit \"e6B\""),
            ("[backup]\nmax_rate = \"MB/s\"\n", "[backup] max_rate = \"MB/s\": expected a rate"),
        ] {
            let err = format!("{:#}", Config::parse(&format!("{MINIMAL}{text}"), &[]).unwrap_err());
            assert!(err.contains(phrase), "{text}: {err}");
        }
        for (key, value, phrase) in [
            ("max_upload_rate", "0", "[repository] max_upload_rate = 0: must be at least 1 byte per second"),
            ("max_download_rate", "\"fast\"", "[repository] max_download_rate = \"fast\": expected a rate"),
            ("max_upload_rate", "\"-1MB/s\"", "[repository] max_upload_rate = \"-1MB/s\": expected a rate"),
            (
                "max_upload_rate",
                "\"1B/s\"",
                "[repository] max_upload_rate = \"1B/s\": 1 bytes per second is below the lowest limit, 32KiB/s",
            ),
            (
                "max_download_rate",
                "32767",
                "[repository] max_download_rate = 32767: 32767 bytes per second is below the lowest limit",
            ),
            ("max_download_rate", "2.5", "[repository] max_download_rate = 2.5: a fraction needs a unit"),
        ] {
            let text = MINIMAL.replace("[encryption]", &format!("{key} = {value}\n[encryption]"));
            let err = format!("{:#}", Config::parse(&text, &[]).unwrap_err());
            assert!(err.contains(phrase), "{key} = {value}: {err}");
        }
    }
}

#[cfg(test)]
mod standby_backup_tests {
    use super::tests::MINIMAL;
    use super::*;

    #[test]
    fn a_standby_conninfo_is_parsed_checked_and_never_shown_with_its_password() {
        let c = Config::parse(MINIMAL, &[]).unwrap();
        assert!(c.backup.standby_connection_info(c.postgres().unwrap()).unwrap().is_none());

        let text = format!("{MINIMAL}[backup]\nconninfo = \"host=db2 port=5433 user=replicator password=hunter2\"\n");
        let c = Config::parse(&text, &[]).unwrap();
        let info = c.backup.standby_connection_info(c.postgres().unwrap()).unwrap().unwrap();
        assert_eq!(info.hosts[0].port(), 5433);
        let shown = format!("{:?}", c.backup);
        assert!(shown.contains("db2") && !shown.contains("hunter2"), "{shown}");

        // The environment sets it as any other key.
        let env = [("PITR_BACKUP_CONNINFO".to_string(), "host=db3".to_string())];
        let c = Config::parse(MINIMAL, &env).unwrap();
        assert_eq!(c.backup.conninfo.as_deref(), Some("host=db3"));

        for (text, phrase) in [
            (format!("{MINIMAL}[backup]\nconninfo = \"port=x\"\n"), "[backup] conninfo"),
            (format!("{MINIMAL}[backup]\nconninfo = \" \"\n"), "[backup] conninfo is empty"),
        ] {
            let err = format!("{:#}", Config::parse(&text, &[]).unwrap_err());
            assert!(err.contains(phrase), "{text}: {err}");
        }
        let no_postgres =
            "[repository]\npath = \"/r\"\n[encryption]\nkey_file = \"/k\"\n[backup]\nconninfo = \"host=db2\"\n";
        let err = format!("{:#}", Config::parse(no_postgres, &[]).unwrap_err());
        assert!(err.contains("no [postgres] section"), "{err}");
    }
}
