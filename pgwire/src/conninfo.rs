//! Parser for libpq-style connection strings, in both the `keyword=value` form and the
//! `postgresql://` / `postgres://` URI form (PostgreSQL docs, "Connection Strings").
//!
//! The parser is pure: it never reads `PG*` environment variables, service files or password
//! files, so the same string always yields the same [`ConnInfo`]. Where pitr deliberately
//! differs from libpq:
//!
//! * With no host given, the default is TCP to `localhost`, not libpq's compiled-in Unix
//!   socket directory, because that directory differs between distributions.
//! * `hostaddr` is accepted as another name for `host`; libpq's split (connect to `hostaddr`,
//!   authenticate and verify TLS against `host`) is not modelled, so giving both is an error.
//! * libpq options that change security or connection behaviour but are not modelled here
//!   (`service`, `passfile`, `sslcrl`, ...) are rejected rather than silently ignored, as are
//!   `gssencmode=require` and the special `sslrootcert=system`. `replication` is rejected
//!   because pitr sets it itself.
//! * `require_auth` and `channel_binding` are modelled with libpq 16's meaning, and
//!   contradictions libpq would only find while connecting are refused here:
//!   `channel_binding=require` with an `sslmode` that never uses TLS, or with a `require_auth`
//!   that does not allow `scram-sha-256`.
//! * Other values are checked more strictly than libpq does: `connect_timeout` and the
//!   keepalive settings must be non-negative whole numbers, and `connect_timeout=1` is not
//!   raised to 2 seconds.
//! * Inside a single-quoted value, `''` is accepted as an escaped quote besides `\'`. libpq
//!   rejects such strings, so this changes the meaning of no string libpq accepts.
//! * A URI's scheme is matched case-insensitively and surrounding whitespace is ignored (a
//!   trailing newline from a file is common). In the authority, the *last* `@` separates the
//!   user information, so an unencoded `@` in a password still parses.
//! * An empty value (`dbname=''`, `postgresql://host/`) means "not set", as it does for
//!   libpq's string options.
//!
//! As in libpq, a keyword given twice keeps its last value, and URI query parameters override
//! the parts of the URI before them. Error positions are 0-based byte offsets into the input.
//! No error message contains the password's value. (An unquoted password with a space in it
//! is split by the syntax itself; a later piece that happens to contain `=` is then reported
//! as an unknown keyword, which cannot be told apart from a typo.)

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Port used for every host when `port` is absent, and for empty entries of a port list.
pub const DEFAULT_PORT: u16 = 5432;

/// Host used when none is given (see the module documentation for why it is not a socket).
pub const DEFAULT_HOST: &str = "localhost";

/// Parsed connection parameters. Build one with [`parse`] or [`str::parse`].
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Servers to try in order; never empty.
    pub hosts: Vec<Host>,
    /// `user`, the PostgreSQL role to log in as. When unset, the connection uses `PGUSER`, then
    /// the operating-system user (`USER`), as libpq does.
    pub user: Option<String>,
    /// `password`. When unset and the server asks for one, the connection falls back to
    /// `PGPASSWORD`, then `~/.pgpass`. Never printed: see [`ConnInfo::redacted`].
    pub password: Option<String>,
    /// `dbname`. Replication connections (physical streaming, BASE_BACKUP) connect to no
    /// database and ignore it, except to look up `~/.pgpass`.
    pub dbname: Option<String>,
    /// `application_name`, or `fallback_application_name` when only that was given.
    pub application_name: Option<String>,
    /// `sslmode`: whether TLS is used and how much of the server's certificate is checked.
    pub sslmode: SslMode,
    /// `sslrootcert`: PEM file of the certificate authorities trusted for `verify-ca` and
    /// `verify-full`; `~/.postgresql/root.crt` when unset.
    pub sslrootcert: Option<PathBuf>,
    /// `sslcert`: PEM client certificate presented to the server (for `cert` authentication);
    /// needs `sslkey`.
    pub sslcert: Option<PathBuf>,
    /// `sslkey`: PEM private key of `sslcert`.
    pub sslkey: Option<PathBuf>,
    /// Whole seconds, as libpq; `connect_timeout=0` means no timeout and gives `None`.
    pub connect_timeout: Option<Duration>,
    /// `target_session_attrs`: which kind of server (primary, standby, …) a host must be for the
    /// connection to be kept; hosts that do not match are passed over.
    pub target_session_attrs: TargetSessionAttrs,
    /// Command-line options sent to the server at startup (`-c name=value ...`).
    pub options: Option<String>,
    /// Whole seconds; `keepalives_idle=0` means the system default and gives `None`.
    pub keepalives_idle: Option<Duration>,
    /// `require_auth`: which authentication requests of the server are acceptable; `None`
    /// accepts any pitr speaks. Listing `password` or `md5` is also how a user allows that
    /// password to go over a connection that is not encrypted (see the connection module).
    pub require_auth: Option<RequireAuth>,
    /// `channel_binding`: whether SCRAM authentication is bound to the TLS channel
    /// (SCRAM-SHA-256-PLUS with `tls-server-end-point`).
    pub channel_binding: ChannelBinding,
    /// The longest message accepted from the server once it has authenticated us, and the most
    /// a result set may hold in all. Not a connection-string keyword (libpq has none): pitr's
    /// `[postgres] max_message_size` sets it. Before authentication the bound is the fixed,
    /// smaller [`crate::messages::STARTUP_MAX_MESSAGE_SIZE`].
    pub max_message_size: usize,
}

/// What [`ConnInfo::max_message_size`] is unless configured. What pitr receives is far
/// smaller: WAL comes in CopyData of at most 16 WAL pages (128 kB, 512 kB with 32 kB pages),
/// BASE_BACKUP in CopyData of 32 kB (or one block when BLCKSZ is larger), and the only result
/// sets of any size are timeline history files, a line per timeline switch.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;

/// libpq's `channel_binding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    /// `disable`: SCRAM without channel binding, even where the server offers it.
    Disable,
    /// `prefer` (the default): SCRAM-SHA-256-PLUS when the connection is TLS and the server
    /// offers it; plain SCRAM-SHA-256 (or any other method) otherwise.
    #[default]
    Prefer,
    /// `require`: the server must authenticate with SCRAM-SHA-256-PLUS over TLS; any other
    /// authentication request, and a server that lets us in without it, fails the connection.
    Require,
}

/// An authentication method `require_auth` names (libpq's spelling in [`AuthMethod::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AuthMethod {
    /// `password`: the password in cleartext (AuthenticationCleartextPassword).
    Password,
    /// `md5`: the MD5-hashed password (AuthenticationMD5Password).
    Md5,
    /// `gss`: GSSAPI (pitr does not speak it).
    Gss,
    /// `sspi`: SSPI (pitr does not speak it).
    Sspi,
    /// `scram-sha-256`: SASL with SCRAM-SHA-256 or SCRAM-SHA-256-PLUS.
    ScramSha256,
    /// `oauth`: SASL with OAUTHBEARER (pitr does not speak it).
    Oauth,
    /// `none`: the server lets us in without asking for any authentication (trust).
    None,
}

impl AuthMethod {
    const ALL: [AuthMethod; 7] = [
        AuthMethod::Password,
        AuthMethod::Md5,
        AuthMethod::Gss,
        AuthMethod::Sspi,
        AuthMethod::ScramSha256,
        AuthMethod::Oauth,
        AuthMethod::None,
    ];

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::Gss => "gss",
            AuthMethod::Sspi => "sspi",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Oauth => "oauth",
            AuthMethod::None => "none",
        }
    }
}

/// libpq's `require_auth` (PostgreSQL 16): a comma list of methods the server may use, or,
/// every entry prefixed with `!`, a list of methods it may not use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequireAuth {
    negated: bool,
    methods: Vec<AuthMethod>,
}

impl RequireAuth {
    /// Whether the server may authenticate us with `method`.
    pub fn allows(&self, method: AuthMethod) -> bool {
        self.negated != self.methods.contains(&method)
    }

    /// Whether `method` is listed as allowed by name (not merely left out of a `!` list).
    pub fn names(&self, method: AuthMethod) -> bool {
        !self.negated && self.methods.contains(&method)
    }
}

impl fmt::Display for RequireAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.methods.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let bang = if self.negated { "!" } else { "" };
            write!(f, "{sep}{bang}{}", m.as_str())?;
        }
        Ok(())
    }
}

impl FromStr for RequireAuth {
    type Err = ConnInfoError;

    /// As libpq: every entry known, none twice, and either all negated or none.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut negated = None;
        let mut methods = Vec::new();
        for item in s.split(',') {
            let (neg, name) = match item.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, item),
            };
            if *negated.get_or_insert(neg) != neg {
                return Err(invalid("require_auth", s, "negated (!) and plain methods cannot be mixed"));
            }
            let Some(method) = AuthMethod::ALL.into_iter().find(|m| m.as_str() == name) else {
                return Err(invalid(
                    "require_auth",
                    s,
                    "expected a comma list of password, md5, gss, sspi, scram-sha-256, oauth and none, optionally all prefixed with !",
                ));
            };
            if methods.contains(&method) {
                return Err(invalid("require_auth", s, "a method is listed more than once"));
            }
            methods.push(method);
        }
        Ok(RequireAuth { negated: negated.unwrap_or(false), methods })
    }
}

impl ChannelBinding {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelBinding::Disable => "disable",
            ChannelBinding::Prefer => "prefer",
            ChannelBinding::Require => "require",
        }
    }
}

impl FromStr for ChannelBinding {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(ChannelBinding::Disable),
            "prefer" => Ok(ChannelBinding::Prefer),
            "require" => Ok(ChannelBinding::Require),
            _ => Err(invalid("channel_binding", s, "expected disable, prefer or require")),
        }
    }
}

/// One server to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A TCP server.
    Tcp {
        /// A host name or IP address (IPv6 without brackets).
        host: String,
        /// The TCP port.
        port: u16,
    },
    /// A server on a Unix-domain socket (a `host` starting with `/`).
    Unix {
        /// The directory holding the server's socket `.s.PGSQL.<port>`.
        dir: PathBuf,
        /// The port, which here only names the socket file.
        port: u16,
    },
}

/// libpq's `sslmode`: whether the connection is encrypted with TLS and what is verified.
/// Verification uses rustls, with the roots from `sslrootcert`. Unix-socket connections never
/// use TLS, whatever the mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    /// `disable`: never TLS.
    Disable,
    /// `allow`: pitr connects without TLS (libpq would retry with TLS if the server refused a
    /// plain connection; pitr does not).
    Allow,
    /// `prefer` (the default): TLS if the server supports it, plain otherwise; the certificate
    /// is checked as for `require`. Where libpq would retry without TLS after a failed TLS
    /// handshake, pitr fails.
    #[default]
    Prefer,
    /// `require`: TLS or no connection. As in libpq, the certificate is checked as for
    /// `verify-ca` when a root certificate is available (`sslrootcert`, or
    /// `~/.postgresql/root.crt` if it exists), and not checked otherwise. (`prefer` checks it
    /// the same way whenever TLS is used.)
    Require,
    /// `verify-ca`: TLS, and the server's certificate must chain to a trusted root.
    VerifyCa,
    /// `verify-full`: as `verify-ca`, and the certificate must also name the host connected to.
    VerifyFull,
}

/// libpq's `target_session_attrs`: what a server must be for a connection to it to be kept.
/// Read-only means in hot standby or `default_transaction_read_only = on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// `any` (the default): any server.
    #[default]
    Any,
    /// `read-write`: a server whose sessions accept writes by default.
    ReadWrite,
    /// `read-only`: a server whose sessions are read-only by default (a hot standby, or
    /// `default_transaction_read_only = on`).
    ReadOnly,
    /// `primary`: a server not in hot standby (not in recovery).
    Primary,
    /// `standby`: a server in hot standby.
    Standby,
    /// `prefer-standby`: accepted, but pitr does not make libpq's second pass: the first host
    /// that connects is kept, standby or not.
    PreferStandby,
}

/// Why a connection string was rejected. Positions are 0-based byte offsets into the input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnInfoError {
    // Only the position is reported: the stray word may be the tail of an unquoted password
    // that contained a space.
    /// A word in the `keyword=value` form is not followed by `=`.
    #[error("connection string: expected \"=\" after the keyword at byte {position} (values containing spaces must be single-quoted)")]
    MissingEquals {
        /// Where the word starts.
        position: usize,
    },
    /// An `=` with no keyword before it.
    #[error("connection string: missing keyword before \"=\" at byte {position}")]
    EmptyKeyword {
        /// Where the `=` is.
        position: usize,
    },
    /// A single-quoted value runs to the end of the string.
    #[error("connection string: unterminated quoted value starting at byte {position}")]
    UnterminatedQuote {
        /// Where the opening quote is.
        position: usize,
    },
    /// A `%` in a URI not followed by two hex digits.
    #[error("connection URI: invalid percent-encoding at byte {position} (expected \"%\" followed by two hex digits)")]
    InvalidPercentEncoding {
        /// Where the `%` is.
        position: usize,
    },
    /// `%00` in a URI, refused as libpq does.
    #[error("connection URI: %00 is not allowed (byte {position})")]
    PercentEncodedNul {
        /// Where the `%` is.
        position: usize,
    },
    /// A percent-decoded part of a URI is not UTF-8.
    #[error("connection URI: the {part} starting at byte {position} is not valid UTF-8 once percent-decoded")]
    InvalidUtf8 {
        /// Which part: `user name`, `password`, `host`, `database name`, ….
        part: &'static str,
        /// Where the part starts.
        position: usize,
    },
    /// A `[` opening an IPv6 address in a URI has no `]`.
    #[error("connection URI: missing \"]\" for the IPv6 address starting at byte {position}")]
    UnterminatedIpv6 {
        /// Where the `[` is.
        position: usize,
    },
    /// `[]` in a URI.
    #[error("connection URI: empty IPv6 address at byte {position}")]
    EmptyIpv6 {
        /// Where the `[` is.
        position: usize,
    },
    /// Something other than `:`, `,`, `/` or `?` right after a bracketed IPv6 address.
    #[error("connection URI: unexpected character {found:?} at byte {position} (expected \":\", \",\", \"/\" or \"?\" after an IPv6 address)")]
    UnexpectedCharacter {
        /// Where the character is.
        position: usize,
        /// The character.
        found: char,
    },
    /// A URI query parameter without `=`.
    #[error("connection URI: query parameter at byte {position} has no \"=\"")]
    QueryMissingEquals {
        /// Where the parameter starts.
        position: usize,
    },
    /// A URI query parameter with a second, unencoded `=`.
    #[error("connection URI: query parameter {keyword:?} at byte {position} has more than one \"=\" (percent-encode \"=\" in values as %3D)")]
    QueryExtraEquals {
        /// The parameter's keyword.
        keyword: String,
        /// Where the parameter starts.
        position: usize,
    },
    /// A keyword pitr does not recognise (usually a typo).
    #[error("connection string: unknown keyword {keyword:?}")]
    UnknownKeyword {
        /// The keyword as given.
        keyword: String,
    },
    /// A libpq keyword whose effect pitr does not implement, refused rather than ignored.
    #[error("connection string: libpq keyword {keyword:?} is not supported by pitr")]
    UnsupportedKeyword {
        /// The keyword.
        keyword: &'static str,
    },
    /// `replication` was given; pitr decides itself which connections are replication ones.
    #[error("connection string: \"replication\" must not be given; pitr sets it itself")]
    ReplicationKeyword,
    /// Both `host` and `hostaddr`, which pitr treats as one keyword.
    #[error("connection string: both \"host\" and \"hostaddr\" given; pitr treats hostaddr as another name for host, so give only one")]
    HostAndHostaddr,
    /// The port list is neither one port nor one per host.
    #[error("connection string: {ports} ports given for {hosts} hosts (give one port for all hosts, or one per host)")]
    PortCountMismatch {
        /// How many hosts were given.
        hosts: usize,
        /// How many ports were given.
        ports: usize,
    },
    /// A known keyword with a value it does not take.
    #[error("connection string: invalid value {value:?} for {keyword:?}: {reason}")]
    InvalidValue {
        /// The keyword.
        keyword: &'static str,
        /// The value as given.
        value: String,
        /// What was expected instead.
        reason: &'static str,
    },
}

/// Keywords pitr understands, modelled or validated-and-ignored.
const ACCEPTED: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "fallback_application_name",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "connect_timeout",
    "target_session_attrs",
    "options",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "gssencmode",
    "channel_binding",
    "require_auth",
    "sslcompression",
    "sslsni",
    "client_encoding",
];

/// libpq keywords whose effect pitr cannot honour; ignoring them could quietly weaken
/// security (`sslcrl`) or connect somewhere unexpected (`service`).
const UNSUPPORTED: &[&str] = &[
    "passfile",
    "sslnegotiation",
    "sslpassword",
    "sslcertmode",
    "sslcrl",
    "sslcrldir",
    "sslkeylogfile",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "min_protocol_version",
    "max_protocol_version",
    "requirepeer",
    "requiressl",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "load_balance_hosts",
    "scram_client_key",
    "scram_server_key",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
];

/// Parses a connection string in either form; a string starting with `postgresql://` or
/// `postgres://` is a URI, anything else is `keyword=value` pairs.
pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
    let mut params = Params::default();
    let trimmed = s.trim_start_matches(is_space);
    let lead = s.len() - trimmed.len();
    let uri = trimmed.trim_end_matches(is_space);
    match uri_prefix_len(uri) {
        Some(prefix) => parse_uri(uri, lead, prefix, &mut params)?,
        None => parse_keyword_value(s, &mut params)?,
    }
    params.build()
}

impl FromStr for ConnInfo {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

impl Default for ConnInfo {
    /// What an empty connection string gives.
    fn default() -> Self {
        ConnInfo {
            hosts: vec![Host::Tcp { host: DEFAULT_HOST.to_owned(), port: DEFAULT_PORT }],
            user: None,
            password: None,
            dbname: None,
            application_name: None,
            sslmode: SslMode::default(),
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            connect_timeout: None,
            target_session_attrs: TargetSessionAttrs::default(),
            options: None,
            keepalives_idle: None,
            require_auth: None,
            channel_binding: ChannelBinding::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

impl ConnInfo {
    /// The `application_name` the server sees for a connection opened with `fallback` as the
    /// caller's name: the connection string's own wins (what `synchronous_standby_names` and
    /// `pg_stat_replication` match against).
    pub fn application_name_or(&self, fallback: &str) -> String {
        self.application_name.clone().unwrap_or_else(|| fallback.to_string())
    }

    /// A `keyword=value` form of everything modelled except the password, for logs and error
    /// messages. Parsing it gives back this `ConnInfo` with `password: None` (and the default
    /// `max_message_size`, which is not a keyword).
    pub fn redacted(&self) -> String {
        let mut out = String::new();
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|h| match h {
                Host::Tcp { host, .. } => host.clone(),
                Host::Unix { dir, .. } => dir.to_string_lossy().into_owned(),
            })
            .collect();
        let ports: Vec<String> = self.hosts.iter().map(|h| h.port().to_string()).collect();
        push_pair(&mut out, "host", &hosts.join(","));
        push_pair(&mut out, "port", &ports.join(","));
        let strings = [
            ("user", &self.user),
            ("dbname", &self.dbname),
            ("application_name", &self.application_name),
            ("options", &self.options),
        ];
        for (keyword, value) in strings {
            if let Some(value) = value {
                push_pair(&mut out, keyword, value);
            }
        }
        push_pair(&mut out, "sslmode", self.sslmode.as_str());
        let paths = [("sslrootcert", &self.sslrootcert), ("sslcert", &self.sslcert), ("sslkey", &self.sslkey)];
        for (keyword, value) in paths {
            if let Some(value) = value {
                push_pair(&mut out, keyword, &value.to_string_lossy());
            }
        }
        if let Some(t) = self.connect_timeout {
            push_pair(&mut out, "connect_timeout", &t.as_secs().to_string());
        }
        if let Some(t) = self.keepalives_idle {
            push_pair(&mut out, "keepalives_idle", &t.as_secs().to_string());
        }
        if self.target_session_attrs != TargetSessionAttrs::Any {
            push_pair(&mut out, "target_session_attrs", self.target_session_attrs.as_str());
        }
        if let Some(r) = &self.require_auth {
            push_pair(&mut out, "require_auth", &r.to_string());
        }
        if self.channel_binding != ChannelBinding::Prefer {
            push_pair(&mut out, "channel_binding", self.channel_binding.as_str());
        }
        out
    }
}

impl fmt::Display for ConnInfo {
    /// Same as [`ConnInfo::redacted`], so that `{}` in a log line is always safe.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Hidden;
        impl fmt::Debug for Hidden {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("***")
            }
        }
        f.debug_struct("ConnInfo")
            .field("hosts", &self.hosts)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| Hidden))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("connect_timeout", &self.connect_timeout)
            .field("target_session_attrs", &self.target_session_attrs)
            .field("options", &self.options)
            .field("keepalives_idle", &self.keepalives_idle)
            .field("require_auth", &self.require_auth)
            .field("channel_binding", &self.channel_binding)
            .field("max_message_size", &self.max_message_size)
            .finish()
    }
}

impl Host {
    /// The server's port (for a Unix host, the number in the socket file name).
    pub fn port(&self) -> u16 {
        match self {
            Host::Tcp { port, .. } | Host::Unix { port, .. } => *port,
        }
    }

    /// The socket file itself for a Unix host (`<dir>/.s.PGSQL.<port>`), `None` for TCP.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match self {
            Host::Tcp { .. } => None,
            Host::Unix { dir, port } => Some(dir.join(format!(".s.PGSQL.{port}"))),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Host::Tcp { host, port } => write!(f, "{host}:{port}"),
            Host::Unix { dir, port } => write!(f, "{}/.s.PGSQL.{port}", dir.display()),
        }
    }
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(invalid("sslmode", s, "expected disable, allow, prefer, require, verify-ca or verify-full"))
            }
        })
    }
}

impl TargetSessionAttrs {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetSessionAttrs {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" => TargetSessionAttrs::Primary,
            "standby" => TargetSessionAttrs::Standby,
            "prefer-standby" => TargetSessionAttrs::PreferStandby,
            _ => {
                return Err(invalid(
                    "target_session_attrs",
                    s,
                    "expected any, read-write, read-only, primary, standby or prefer-standby",
                ))
            }
        })
    }
}

fn invalid(keyword: &'static str, value: &str, reason: &'static str) -> ConnInfoError {
    ConnInfoError::InvalidValue { keyword, value: value.to_owned(), reason }
}

/// libpq uses C `isspace`, which unlike `char::is_ascii_whitespace` includes vertical tab.
fn is_space(c: char) -> bool {
    c.is_ascii_whitespace() || c == '\x0b'
}

fn is_space_byte(b: u8) -> bool {
    is_space(char::from(b))
}

fn push_pair(out: &mut String, keyword: &str, value: &str) {
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(keyword);
    out.push('=');
    let needs_quotes = value.is_empty() || value.contains(|c: char| is_space(c) || c == '\'' || c == '\\');
    if needs_quotes {
        out.push('\'');
        for c in value.chars() {
            if c == '\'' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('\'');
    } else {
        out.push_str(value);
    }
}

/// Raw values by keyword, last one winning, before interpretation.
#[derive(Default)]
struct Params {
    values: BTreeMap<&'static str, String>,
}

impl Params {
    fn set(&mut self, keyword: &str, value: String) -> Result<(), ConnInfoError> {
        if keyword == "replication" {
            return Err(ConnInfoError::ReplicationKeyword);
        }
        if let Some(&known) = ACCEPTED.iter().find(|k| **k == keyword) {
            self.values.insert(known, value);
            return Ok(());
        }
        match UNSUPPORTED.iter().find(|k| **k == keyword) {
            Some(&keyword) => Err(ConnInfoError::UnsupportedKeyword { keyword }),
            None => Err(ConnInfoError::UnknownKeyword { keyword: keyword.to_owned() }),
        }
    }

    /// The value, with empty meaning "not set" as for libpq's string options.
    fn string(&mut self, keyword: &str) -> Option<String> {
        self.values.remove(keyword).filter(|v| !v.is_empty())
    }

    fn build(mut self) -> Result<ConnInfo, ConnInfoError> {
        let hosts = self.hosts()?;
        let user = self.string("user");
        let password = self.string("password");
        let dbname = self.string("dbname");
        let fallback = self.string("fallback_application_name");
        let application_name = self.string("application_name").or(fallback);
        let options = self.string("options");

        let sslmode = match self.values.remove("sslmode") {
            Some(v) => v.parse()?,
            None => SslMode::default(),
        };
        let target_session_attrs = match self.values.remove("target_session_attrs") {
            Some(v) => v.parse()?,
            None => TargetSessionAttrs::default(),
        };
        let sslrootcert = self.string("sslrootcert");
        if sslrootcert.as_deref() == Some("system") {
            // libpq gives "system" a special meaning (use the OS trust store and default to
            // verify-full); treating it as a file name would fail confusingly later.
            return Err(invalid(
                "sslrootcert",
                "system",
                "the libpq special value \"system\" is not supported; give a CA certificate file",
            ));
        }
        let sslcert = self.string("sslcert");
        let sslkey = self.string("sslkey");
        let connect_timeout = self.seconds("connect_timeout")?;
        let keepalives_idle = self.seconds("keepalives_idle")?;

        for keyword in ["keepalives", "keepalives_interval", "keepalives_count", "tcp_user_timeout"] {
            self.whole_number(keyword)?;
        }
        for keyword in ["sslcompression", "sslsni"] {
            if let Some(v) = self.values.remove(keyword) {
                if v != "0" && v != "1" {
                    return Err(invalid(keyword, &v, "expected 0 or 1"));
                }
            }
        }
        self.mode_without_require("gssencmode", "pitr does not support GSSAPI encryption")?;
        let channel_binding = match self.values.remove("channel_binding") {
            Some(v) => v.parse()?,
            None => ChannelBinding::default(),
        };
        let require_auth = match self.string("require_auth") {
            Some(v) => Some(v.parse::<RequireAuth>()?),
            None => None,
        };
        if channel_binding == ChannelBinding::Require {
            if matches!(sslmode, SslMode::Disable | SslMode::Allow) {
                return Err(invalid(
                    "channel_binding",
                    "require",
                    "channel binding needs TLS, and this sslmode never uses it (use sslmode=verify-full)",
                ));
            }
            if require_auth.as_ref().is_some_and(|r| !r.allows(AuthMethod::ScramSha256)) {
                return Err(invalid(
                    "channel_binding",
                    "require",
                    "channel binding needs SCRAM, and require_auth does not allow scram-sha-256",
                ));
            }
        }
        // client_encoding is left to the connection code, which fixes its own encoding.

        Ok(ConnInfo {
            hosts,
            user,
            password,
            dbname,
            application_name,
            sslmode,
            sslrootcert: sslrootcert.map(PathBuf::from),
            sslcert: sslcert.map(PathBuf::from),
            sslkey: sslkey.map(PathBuf::from),
            connect_timeout,
            target_session_attrs,
            options,
            keepalives_idle,
            require_auth,
            channel_binding,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        })
    }

    fn hosts(&mut self) -> Result<Vec<Host>, ConnInfoError> {
        let host = self.values.remove("host");
        let hostaddr = self.values.remove("hostaddr");
        let (keyword, list) = match (host, hostaddr) {
            (Some(_), Some(_)) => return Err(ConnInfoError::HostAndHostaddr),
            (Some(h), None) => ("host", h),
            (None, Some(h)) => ("hostaddr", h),
            (None, None) => ("host", String::new()),
        };
        let names: Vec<&str> = list.split(',').collect();
        let ports = match self.values.remove("port") {
            None => vec![DEFAULT_PORT],
            Some(p) => p.split(',').map(parse_port).collect::<Result<_, _>>()?,
        };
        let ports = if ports.len() == names.len() {
            ports
        } else if ports.len() == 1 {
            vec![ports[0]; names.len()]
        } else {
            return Err(ConnInfoError::PortCountMismatch { hosts: names.len(), ports: ports.len() });
        };
        names
            .into_iter()
            .zip(ports)
            .map(|(name, port)| {
                if name.is_empty() {
                    Ok(Host::Tcp { host: DEFAULT_HOST.to_owned(), port })
                } else if name.starts_with('/') {
                    Ok(Host::Unix { dir: PathBuf::from(name), port })
                } else if name.starts_with('@') {
                    // libpq reads this as a Linux abstract-namespace socket, which has no
                    // directory to put in Host::Unix.
                    Err(invalid(keyword, name, "abstract-namespace Unix sockets are not supported"))
                } else {
                    Ok(Host::Tcp { host: name.to_owned(), port })
                }
            })
            .collect()
    }

    fn seconds(&mut self, keyword: &'static str) -> Result<Option<Duration>, ConnInfoError> {
        let Some(v) = self.values.remove(keyword) else {
            return Ok(None);
        };
        match v.parse::<u64>() {
            Ok(0) => Ok(None),
            Ok(secs) => Ok(Some(Duration::from_secs(secs))),
            Err(_) => Err(invalid(keyword, &v, "expected a whole, non-negative number of seconds")),
        }
    }

    fn whole_number(&mut self, keyword: &'static str) -> Result<(), ConnInfoError> {
        if let Some(v) = self.values.remove(keyword) {
            if v.parse::<u32>().is_err() {
                return Err(invalid(keyword, &v, "expected a whole, non-negative number"));
            }
        }
        Ok(())
    }

    /// `require` is refused because nothing downstream would enforce it.
    fn mode_without_require(
        &mut self,
        keyword: &'static str,
        why_not_require: &'static str,
    ) -> Result<(), ConnInfoError> {
        match self.values.remove(keyword).as_deref() {
            None | Some("disable") | Some("prefer") => Ok(()),
            Some("require") => Err(invalid(keyword, "require", why_not_require)),
            Some(other) => Err(invalid(keyword, other, "expected disable, prefer or require")),
        }
    }
}

fn parse_port(item: &str) -> Result<u16, ConnInfoError> {
    if item.is_empty() {
        return Ok(DEFAULT_PORT);
    }
    match item.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid("port", item, "expected a port number from 1 to 65535")),
        Ok(port) => Ok(port),
    }
}

fn parse_keyword_value(s: &str, params: &mut Params) -> Result<(), ConnInfoError> {
    // Every delimiter is ASCII, so byte indices always fall on char boundaries.
    let b = s.as_bytes();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < b.len() && is_space_byte(b[*i]) {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i == b.len() {
            return Ok(());
        }
        let keyword_start = i;
        while i < b.len() && b[i] != b'=' && !is_space_byte(b[i]) {
            i += 1;
        }
        let keyword = &s[keyword_start..i];
        skip_space(&mut i);
        if i == b.len() || b[i] != b'=' {
            return Err(ConnInfoError::MissingEquals { position: keyword_start });
        }
        if keyword.is_empty() {
            return Err(ConnInfoError::EmptyKeyword { position: i });
        }
        i += 1;
        // As in libpq, whitespace after "=" is skipped, so "host= port=1" sets host to
        // "port=1"; an empty value must be written ''.
        skip_space(&mut i);
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            let quote_start = i;
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(ConnInfoError::UnterminatedQuote { position: quote_start }),
                    Some(b'\\') => {
                        i += 1;
                        if let Some(&c) = b.get(i) {
                            value.push(c);
                            i += 1;
                        }
                    }
                    Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                        value.push(b'\'');
                        i += 2;
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !is_space_byte(b[i]) {
                if b[i] == b'\\' {
                    i += 1;
                    if let Some(&c) = b.get(i) {
                        value.push(c);
                        i += 1;
                    }
                } else {
                    value.push(b[i]);
                    i += 1;
                }
            }
        }
        // Only whole UTF-8 sequences are ever copied (escapes take one byte and the
        // continuation bytes follow unchanged), so this never actually replaces anything.
        let value = String::from_utf8_lossy(&value).into_owned();
        params.set(keyword, value)?;
    }
}

/// `text`, any message or file excerpt that may quote a connection string (a config parser's
/// error showing the offending line, say), with every password in it replaced by `***`: the
/// password of each embedded `postgres://` or `postgresql://` URL, and the value after every
/// `password=` (spaces around `=` allowed, the value quoted or not).
pub fn redact_in_text(text: &str) -> String {
    // URLs first, each up to the next space or quote.
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let lower = rest.to_ascii_lowercase();
        let Some(at) = ["postgresql://", "postgres://"].iter().filter_map(|p| lower.find(p)).min() else {
            out.push_str(rest);
            break;
        };
        out.push_str(&rest[..at]);
        let url = &rest[at..];
        let end = url.find(|c: char| is_space(c) || matches!(c, '"' | '\'' | '`')).unwrap_or(url.len());
        let prefix = uri_prefix_len(&url[..end]).unwrap_or(0);
        out.push_str(&redact_uri(&url[..end], prefix));
        rest = &url[end..];
    }
    // Then every `password=` value.
    let b = out.as_bytes();
    let mut result = String::with_capacity(out.len());
    let mut copied = 0;
    let mut i = 0;
    while let Some(found) = out[i..].find("password") {
        let start = i + found;
        let mut j = start + "password".len();
        i = j;
        while j < b.len() && is_space_byte(b[j]) {
            j += 1;
        }
        if j == b.len() || b[j] != b'=' {
            continue;
        }
        j += 1;
        while j < b.len() && is_space_byte(b[j]) {
            j += 1;
        }
        let value_start = j;
        if j < b.len() && b[j] == b'\'' {
            j += 1;
            while j < b.len() {
                match b[j] {
                    b'\\' => j += 2,
                    b'\'' if b.get(j + 1) == Some(&b'\'') => j += 2,
                    b'\'' => {
                        j += 1;
                        break;
                    }
                    _ => j += 1,
                }
            }
        } else {
            while j < b.len() && !is_space_byte(b[j]) && !matches!(b[j], b'"' | b'&' | b'`') {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
        }
        j = j.min(b.len());
        while !out.is_char_boundary(j) {
            j += 1;
        }
        result.push_str(&out[copied..value_start]);
        result.push_str("***");
        copied = j;
        i = j;
    }
    result.push_str(&out[copied..]);
    result
}

fn redact_uri(uri: &str, prefix: usize) -> String {
    let mut out = String::with_capacity(uri.len());
    let rest = &uri[prefix..];
    out.push_str(&uri[..prefix]);
    let authority_len = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_len..];
    let Some(q) = tail.find('?') else {
        out.push_str(tail);
        return out;
    };
    out.push_str(&tail[..=q]);
    for (i, segment) in tail[q + 1..].split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        let key = segment.split_once('=').map_or(segment, |(k, _)| k);
        // Compared decoded, so that `pass%77ord=` is caught too.
        let decoded = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
        if decoded == "password" {
            out.push_str(key);
            out.push_str("=***");
        } else {
            out.push_str(segment);
        }
    }
    out
}

fn uri_prefix_len(s: &str) -> Option<usize> {
    ["postgresql://", "postgres://"]
        .into_iter()
        .find_map(|p| s.get(..p.len()).filter(|head| head.eq_ignore_ascii_case(p)).map(|_| p.len()))
}

/// Checks percent-encoding strictly (libpq rejects malformed escapes and `%00`, where the
/// percent-encoding crate would pass them through) and decodes.
fn decode(raw: &str, position: usize, part: &'static str) -> Result<String, ConnInfoError> {
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            i += 1;
            continue;
        }
        match b.get(i + 1..i + 3) {
            Some(&[b'0', b'0']) => return Err(ConnInfoError::PercentEncodedNul { position: position + i }),
            Some(&[h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => i += 3,
            _ => return Err(ConnInfoError::InvalidPercentEncoding { position: position + i }),
        }
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| ConnInfoError::InvalidUtf8 { part, position })
}

/// `uri` is trimmed and starts at byte `base` of the caller's input; `prefix` is the length
/// of its scheme and `//`.
fn parse_uri(uri: &str, base: usize, prefix: usize, params: &mut Params) -> Result<(), ConnInfoError> {
    let rest = &uri[prefix..];
    let rest_pos = base + prefix;
    let authority_len = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];

    let (netloc, netloc_pos) = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let (user, password) = match userinfo.find(':') {
                Some(colon) => (&userinfo[..colon], Some((&userinfo[colon + 1..], colon + 1))),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                params.set("user", decode(user, rest_pos, "user name")?)?;
            }
            if let Some((password, offset)) = password {
                if !password.is_empty() {
                    let password = decode(password, rest_pos + offset, "password")?;
                    params.set("password", password)?;
                }
            }
            (&authority[at + 1..], rest_pos + at + 1)
        }
        None => (authority, rest_pos),
    };

    // Hosts and ports are collected as comma lists, exactly as the keyword form writes them,
    // so that both forms share one interpretation (and query parameters can override them).
    let mut hosts = String::new();
    let mut ports = String::new();
    let b = netloc.as_bytes();
    let mut i = 0;
    loop {
        if b.get(i) == Some(&b'[') {
            let open = i;
            let Some(len) = netloc[open + 1..].find(']') else {
                return Err(ConnInfoError::UnterminatedIpv6 { position: netloc_pos + open });
            };
            if len == 0 {
                return Err(ConnInfoError::EmptyIpv6 { position: netloc_pos + open });
            }
            let inner = &netloc[open + 1..open + 1 + len];
            hosts.push_str(&decode(inner, netloc_pos + open + 1, "host")?);
            i = open + 1 + len + 1;
            if let Some(c) = netloc[i..].chars().next() {
                if c != ':' && c != ',' {
                    return Err(ConnInfoError::UnexpectedCharacter { position: netloc_pos + i, found: c });
                }
            }
        } else {
            let start = i;
            while i < b.len() && b[i] != b':' && b[i] != b',' {
                i += 1;
            }
            hosts.push_str(&decode(&netloc[start..i], netloc_pos + start, "host")?);
        }
        if b.get(i) == Some(&b':') {
            i += 1;
            let start = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            ports.push_str(&decode(&netloc[start..i], netloc_pos + start, "port")?);
        }
        if b.get(i) == Some(&b',') {
            i += 1;
            hosts.push(',');
            ports.push(',');
        } else {
            break;
        }
    }
    if !hosts.is_empty() {
        params.set("host", hosts)?;
    }
    if !ports.is_empty() {
        params.set("port", ports)?;
    }

    let tail = &rest[authority_len..];
    let tail_pos = rest_pos + authority_len;
    let (path, query) = match tail.find('?') {
        Some(q) => (&tail[..q], Some((&tail[q + 1..], tail_pos + q + 1))),
        None => (tail, None),
    };
    if let Some(dbname) = path.strip_prefix('/') {
        if !dbname.is_empty() {
            params.set("dbname", decode(dbname, tail_pos + 1, "database name")?)?;
        }
    }
    if let Some((query, query_pos)) = query {
        parse_query(query, query_pos, params)?;
    }
    Ok(())
}

fn parse_query(query: &str, query_pos: usize, params: &mut Params) -> Result<(), ConnInfoError> {
    let mut pos = query_pos;
    let mut segments = query.split('&').peekable();
    while let Some(segment) = segments.next() {
        let segment_pos = pos;
        pos += segment.len() + 1;
        // libpq stops at a trailing "&" (or a bare "?") but rejects an empty pair elsewhere.
        if segment.is_empty() && segments.peek().is_none() {
            break;
        }
        let Some((keyword, value)) = segment.split_once('=') else {
            return Err(ConnInfoError::QueryMissingEquals { position: segment_pos });
        };
        if value.contains('=') {
            return Err(ConnInfoError::QueryExtraEquals { keyword: keyword.to_owned(), position: segment_pos });
        }
        let value_pos = segment_pos + keyword.len() + 1;
        let keyword = decode(keyword, segment_pos, "query parameter name")?;
        let value = decode(value, value_pos, "query parameter value")?;
        // libpq maps the JDBC spelling ssl=true; any other ssl value is an unknown keyword.
        if keyword == "ssl" && value == "true" {
            params.set("sslmode", "require".to_owned())?;
        } else {
            params.set(&keyword, value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Host {
        Host::Tcp { host: host.to_owned(), port }
    }

    fn unix(dir: &str, port: u16) -> Host {
        Host::Unix { dir: PathBuf::from(dir), port }
    }

    fn ok(s: &str) -> ConnInfo {
        match parse(s) {
            Ok(c) => c,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn err(s: &str) -> ConnInfoError {
        match parse(s) {
            Ok(c) => panic!("{s:?} should fail, got {c:?}"),
            Err(e) => e,
        }
    }

    fn bad<'a>(keyword: &'static str, value: &'a str) -> impl Fn(&ConnInfoError) -> bool + 'a {
        move |e| {
            matches!(e, ConnInfoError::InvalidValue { keyword: k, value: v, .. }
                if *k == keyword && v == value)
        }
    }

    // ---- defaults ----

    #[test]
    fn empty_and_blank_strings_give_defaults() {
        for s in ["", "   ", " \t\n\r\x0b\x0c "] {
            assert_eq!(ok(s), ConnInfo::default());
        }
        let d = ConnInfo::default();
        assert_eq!(d.hosts, vec![tcp("localhost", 5432)]);
        assert_eq!(d.sslmode, SslMode::Prefer);
        assert_eq!(d.target_session_attrs, TargetSessionAttrs::Any);
        assert_eq!(d.user, None);
        assert_eq!(d.password, None);
        assert_eq!(d.connect_timeout, None);
    }

    // ---- keyword/value form ----

    #[test]
    fn keyword_value_full_example() {
        let c = ok("host=a,b port=5432,5433 user=rep password='it''s' dbname=x");
        assert_eq!(c.hosts, vec![tcp("a", 5432), tcp("b", 5433)]);
        assert_eq!(c.user.as_deref(), Some("rep"));
        assert_eq!(c.password.as_deref(), Some("it's"));
        assert_eq!(c.dbname.as_deref(), Some("x"));
    }

    #[test]
    fn keyword_value_every_modelled_field() {
        let c = ok("host=db port=6000 user=u password=p dbname=d application_name=app \
             sslmode=verify-full sslrootcert=/ca.pem sslcert=/c.pem sslkey=/k.pem \
             connect_timeout=10 target_session_attrs=read-write \
             options='-c wal_sender_timeout=0' keepalives_idle=30");
        assert_eq!(
            c,
            ConnInfo {
                hosts: vec![tcp("db", 6000)],
                user: Some("u".into()),
                password: Some("p".into()),
                dbname: Some("d".into()),
                application_name: Some("app".into()),
                sslmode: SslMode::VerifyFull,
                sslrootcert: Some("/ca.pem".into()),
                sslcert: Some("/c.pem".into()),
                sslkey: Some("/k.pem".into()),
                connect_timeout: Some(Duration::from_secs(10)),
                target_session_attrs: TargetSessionAttrs::ReadWrite,
                options: Some("-c wal_sender_timeout=0".into()),
                keepalives_idle: Some(Duration::from_secs(30)),
                require_auth: None,
                channel_binding: ChannelBinding::Prefer,
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            }
        );
    }

    #[test]
    fn quoting_and_escapes() {
        assert_eq!(ok(r"password='a b\'c\\d'").password.as_deref(), Some(r"a b'c\d"));
        assert_eq!(ok(r"password=a\ b\\c\'").password.as_deref(), Some(r"a b\c'"));
        assert_eq!(ok("password=''''").password.as_deref(), Some("'"));
        assert_eq!(ok("password='x''''y'").password.as_deref(), Some("x''y"));
        // A quote inside an unquoted value is literal, as in libpq.
        assert_eq!(ok("password=it's").password.as_deref(), Some("it's"));
        // Other characters after a backslash are just themselves.
        assert_eq!(ok(r"dbname='\a\='").dbname.as_deref(), Some("a="));
        // '=' inside a value needs no quoting.
        assert_eq!(ok("options=-cx=y").options.as_deref(), Some("-cx=y"));
        // Non-ASCII survives both forms, including right after an escape.
        assert_eq!(ok(r"user=J\ö\ rg").user.as_deref(), Some("Jö rg"));
        assert_eq!(ok("user='Jörg Ñ'").user.as_deref(), Some("Jörg Ñ"));
    }

    #[test]
    fn whitespace_around_equals_and_between_pairs() {
        let c = ok("  host = a\tport=\n5433 \r\n dbname\t=\tx  ");
        assert_eq!(c.hosts, vec![tcp("a", 5433)]);
        assert_eq!(c.dbname.as_deref(), Some("x"));
    }

    #[test]
    fn quoted_value_may_be_followed_directly_by_next_keyword() {
        let c = ok("user='a'dbname=b");
        assert_eq!(c.user.as_deref(), Some("a"));
        assert_eq!(c.dbname.as_deref(), Some("b"));
    }

    #[test]
    fn empty_values_mean_unset() {
        let c = ok("user='' password='' dbname= ");
        assert_eq!(c.user, None);
        assert_eq!(c.password, None);
        assert_eq!(c.dbname, None);
        let c = ok("host='' port='' application_name='' options=''");
        assert_eq!(c, ConnInfo::default());
        assert_eq!(ok("dbname=").dbname, None);
    }

    #[test]
    fn whitespace_after_equals_is_skipped_like_libpq() {
        assert_eq!(ok("dbname= user=x").dbname.as_deref(), Some("user=x"));
    }

    #[test]
    fn last_occurrence_wins() {
        let c = ok("user=a user=b port=1 port=2 sslmode=disable sslmode=require");
        assert_eq!(c.user.as_deref(), Some("b"));
        assert_eq!(c.hosts, vec![tcp("localhost", 2)]);
        assert_eq!(c.sslmode, SslMode::Require);
        // Only the final value is validated.
        assert_eq!(ok("port=x port=3").hosts, vec![tcp("localhost", 3)]);
    }

    #[test]
    fn keyword_value_syntax_errors() {
        assert_eq!(err("host"), ConnInfoError::MissingEquals { position: 0 });
        assert_eq!(err("host=a b"), ConnInfoError::MissingEquals { position: 7 });
        assert_eq!(err("user=x   dbname"), ConnInfoError::MissingEquals { position: 9 });
        assert_eq!(err("=x"), ConnInfoError::EmptyKeyword { position: 0 });
        assert_eq!(err("host=a  = b"), ConnInfoError::EmptyKeyword { position: 8 });
        assert_eq!(err("user=a password='abc"), ConnInfoError::UnterminatedQuote { position: 16 });
        assert_eq!(err(r"password='abc\'"), ConnInfoError::UnterminatedQuote { position: 9 });
        assert_eq!(err(r"password='abc\"), ConnInfoError::UnterminatedQuote { position: 9 });
        assert_eq!(err("password='"), ConnInfoError::UnterminatedQuote { position: 9 });
    }

    #[test]
    fn trailing_backslash_in_unquoted_value_is_dropped() {
        assert_eq!(ok(r"user=abc\").user.as_deref(), Some("abc"));
    }

    // ---- hosts and ports ----

    #[test]
    fn multiple_hosts_single_port_applies_to_all() {
        let c = ok("host=a,b,c port=6000");
        assert_eq!(c.hosts, vec![tcp("a", 6000), tcp("b", 6000), tcp("c", 6000)]);
    }

    #[test]
    fn multiple_hosts_no_port_defaults() {
        let c = ok("host=a,b");
        assert_eq!(c.hosts, vec![tcp("a", 5432), tcp("b", 5432)]);
    }

    #[test]
    fn multiple_hosts_one_port_each_and_empty_entries() {
        let c = ok("host=a,,/tmp port=1,,3");
        assert_eq!(c.hosts, vec![tcp("a", 1), tcp("localhost", 5432), unix("/tmp", 3)]);
        assert_eq!(ok("host=a,b port=,").hosts, vec![tcp("a", 5432), tcp("b", 5432)]);
    }

    #[test]
    fn port_count_mismatch() {
        assert_eq!(err("host=a,b,c port=1,2"), ConnInfoError::PortCountMismatch { hosts: 3, ports: 2 });
        assert_eq!(err("port=1,2"), ConnInfoError::PortCountMismatch { hosts: 1, ports: 2 });
    }

    #[test]
    fn bad_ports() {
        for (s, v) in [
            ("port=abc", "abc"),
            ("port=0", "0"),
            ("port=65536", "65536"),
            ("port=-1", "-1"),
            ("port=' 5432'", " 5432"),
            ("host=a,b port=1,x", "x"),
        ] {
            let e = err(s);
            assert!(bad("port", v)(&e), "{s}: {e:?}");
            assert!(e.to_string().contains("\"port\""), "{e}");
            assert!(e.to_string().contains(v), "{e}");
        }
        assert_eq!(ok("port=65535").hosts, vec![tcp("localhost", 65535)]);
        assert_eq!(ok("port=1").hosts, vec![tcp("localhost", 1)]);
    }

    #[test]
    fn ipv6_in_keyword_form_is_bare() {
        assert_eq!(ok("host=::1 port=5433").hosts, vec![tcp("::1", 5433)]);
        assert_eq!(ok("host=::1,fe80::2").hosts, vec![tcp("::1", 5432), tcp("fe80::2", 5432)]);
    }

    #[test]
    fn unix_socket_in_keyword_form() {
        let c = ok("host=/var/run/postgresql port=5433");
        assert_eq!(c.hosts, vec![unix("/var/run/postgresql", 5433)]);
        assert_eq!(c.hosts[0].socket_path(), Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5433")));
        assert_eq!(ok("host=/tmp").hosts, vec![unix("/tmp", 5432)]);
        assert_eq!(tcp("a", 1).socket_path(), None);
    }

    #[test]
    fn abstract_socket_is_rejected() {
        assert!(bad("host", "@pg")(&err("host=@pg")));
    }

    #[test]
    fn hostaddr_is_an_alias_for_host() {
        assert_eq!(ok("hostaddr=10.0.0.1,10.0.0.2 port=1,2").hosts, vec![tcp("10.0.0.1", 1), tcp("10.0.0.2", 2)]);
        assert!(bad("hostaddr", "@x")(&err("hostaddr=@x")));
        assert_eq!(err("host=db hostaddr=10.0.0.1"), ConnInfoError::HostAndHostaddr);
        assert_eq!(err("postgresql://db/?hostaddr=10.0.0.1"), ConnInfoError::HostAndHostaddr);
    }

    #[test]
    fn host_display() {
        assert_eq!(tcp("db", 5432).to_string(), "db:5432");
        assert_eq!(tcp("::1", 5433).to_string(), "[::1]:5433");
        assert_eq!(unix("/tmp", 5432).to_string(), "/tmp/.s.PGSQL.5432");
        assert_eq!(unix("/tmp", 7).port(), 7);
    }

    // ---- enums ----

    #[test]
    fn every_sslmode_in_both_forms() {
        for (name, mode) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Allow),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(ok(&format!("sslmode={name}")).sslmode, mode);
            assert_eq!(ok(&format!("postgresql://h/?sslmode={name}")).sslmode, mode);
            assert_eq!(mode.as_str(), name);
            assert_eq!(mode.to_string(), name);
            assert_eq!(name.parse::<SslMode>(), Ok(mode));
        }
    }

    #[test]
    fn bad_sslmode() {
        for v in ["verify_full", "REQUIRE", "", "true"] {
            let e = err(&format!("sslmode='{v}'"));
            assert!(bad("sslmode", v)(&e), "{v}: {e:?}");
        }
    }

    #[test]
    fn every_target_session_attrs() {
        for (name, attrs) in [
            ("any", TargetSessionAttrs::Any),
            ("read-write", TargetSessionAttrs::ReadWrite),
            ("read-only", TargetSessionAttrs::ReadOnly),
            ("primary", TargetSessionAttrs::Primary),
            ("standby", TargetSessionAttrs::Standby),
            ("prefer-standby", TargetSessionAttrs::PreferStandby),
        ] {
            assert_eq!(ok(&format!("target_session_attrs={name}")).target_session_attrs, attrs);
            assert_eq!(ok(&format!("postgres://h?target_session_attrs={name}")).target_session_attrs, attrs);
            assert_eq!(attrs.as_str(), name);
            assert_eq!(attrs.to_string(), name);
            assert_eq!(name.parse::<TargetSessionAttrs>(), Ok(attrs));
        }
        let e = err("target_session_attrs=master");
        assert!(bad("target_session_attrs", "master")(&e));
    }

    // ---- numbers ----

    #[test]
    fn connect_timeout_and_keepalives_idle() {
        let c = ok("connect_timeout=10 keepalives_idle=60");
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.keepalives_idle, Some(Duration::from_secs(60)));
        let c = ok("connect_timeout=0 keepalives_idle=0");
        assert_eq!(c.connect_timeout, None);
        assert_eq!(c.keepalives_idle, None);
        for keyword in ["connect_timeout", "keepalives_idle"] {
            for v in ["abc", "-1", "1.5", "10s", ""] {
                let e = err(&format!("{keyword}='{v}'"));
                assert!(
                    matches!(&e, ConnInfoError::InvalidValue { keyword: k, value, .. }
                        if *k == keyword && value == v),
                    "{keyword}={v}: {e:?}"
                );
                let msg = e.to_string();
                assert!(msg.contains(keyword), "{msg}");
            }
        }
    }

    // ---- accepted but not modelled ----

    #[test]
    fn harmless_libpq_keywords_are_accepted() {
        let c = ok("keepalives=1 keepalives_interval=10 keepalives_count=3 \
             tcp_user_timeout=0 gssencmode=disable channel_binding=prefer \
             sslcompression=0 sslsni=1 client_encoding=UTF8 user=u");
        assert_eq!(c.user.as_deref(), Some("u"));
        assert_eq!(c.hosts, ConnInfo::default().hosts);
        ok("gssencmode=prefer channel_binding=disable sslcompression=1 sslsni=0");
        ok("client_encoding=auto");
    }

    #[test]
    fn harmless_libpq_keywords_are_validated() {
        for (keyword, v) in [
            ("keepalives", "yes"),
            ("keepalives_interval", "-5"),
            ("keepalives_count", "x"),
            ("tcp_user_timeout", "1.0"),
            ("gssencmode", "allow"),
            ("channel_binding", "on"),
            ("sslcompression", "2"),
            ("sslsni", "true"),
        ] {
            let e = err(&format!("{keyword}={v}"));
            assert!(
                matches!(&e, ConnInfoError::InvalidValue { keyword: k, value, .. }
                    if *k == keyword && value == v),
                "{keyword}={v}: {e:?}"
            );
        }
    }

    #[test]
    fn require_modes_that_cannot_be_honoured_are_rejected() {
        assert!(bad("gssencmode", "require")(&err("gssencmode=require")));
        // Channel binding needs TLS and SCRAM: contradictions fail at once.
        for s in ["channel_binding=require sslmode=disable", "channel_binding=require sslmode=allow"] {
            let e = err(s);
            assert!(bad("channel_binding", "require")(&e) && e.to_string().contains("TLS"), "{e}");
        }
        let e = err("channel_binding=require require_auth=md5,password");
        assert!(e.to_string().contains("scram-sha-256"), "{e}");
        let e = err("channel_binding=require require_auth=!scram-sha-256");
        assert!(e.to_string().contains("scram-sha-256"), "{e}");
    }

    #[test]
    fn channel_binding_values() {
        assert_eq!(ok("").channel_binding, ChannelBinding::Prefer);
        assert_eq!(ok("channel_binding=disable").channel_binding, ChannelBinding::Disable);
        assert_eq!(ok("channel_binding=require").channel_binding, ChannelBinding::Require);
        let c = ok("postgresql://h/?channel_binding=require&sslmode=verify-ca&require_auth=scram-sha-256");
        assert_eq!(c.channel_binding, ChannelBinding::Require);
        assert_eq!(
            c.redacted(),
            "host=h port=5432 sslmode=verify-ca require_auth=scram-sha-256 channel_binding=require"
        );
    }

    #[test]
    fn require_auth_follows_libpq() {
        let r = ok("require_auth=scram-sha-256,none").require_auth.unwrap();
        assert!(r.allows(AuthMethod::ScramSha256) && r.allows(AuthMethod::None));
        assert!(!r.allows(AuthMethod::Password) && !r.allows(AuthMethod::Md5));
        assert!(r.names(AuthMethod::ScramSha256) && !r.names(AuthMethod::Password));
        let r = ok("require_auth=!password,!md5").require_auth.unwrap();
        assert!(!r.allows(AuthMethod::Password) && !r.allows(AuthMethod::Md5));
        assert!(r.allows(AuthMethod::ScramSha256) && r.allows(AuthMethod::None));
        assert!(!r.names(AuthMethod::ScramSha256), "a ! list names nothing as allowed");
        for m in AuthMethod::ALL {
            let r = ok(&format!("require_auth={}", m.as_str())).require_auth.unwrap();
            assert_eq!(r.to_string(), m.as_str());
        }
        assert_eq!(ok("require_auth=''").require_auth, None);
        for v in ["password,!md5", "!md5,password", "md5,md5", "!md5,!md5", "kerberos", "password,", "PASSWORD", " md5"]
        {
            let e = err(&format!("require_auth='{v}'"));
            assert!(bad("require_auth", v)(&e), "{v:?}: {e:?}");
        }
        let e = err("require_auth=md5,!password").to_string();
        assert!(e.contains("mixed"), "{e}");
        let e = err("require_auth=md5,md5").to_string();
        assert!(e.contains("more than once"), "{e}");
        // Round trip through redacted().
        let c = ok("require_auth=!password,!md5 channel_binding=disable");
        assert_eq!(ok(&c.redacted()), c);
    }

    #[test]
    fn connection_strings_inside_text_are_redacted() {
        let err =
            "TOML parse error at line 6, column 40\n  |\n6 | conninfo = \"host=h password=s3cr3t user=u\" x\n  |   ^\n";
        let got = redact_in_text(err);
        assert!(!got.contains("s3cr3t") && got.contains("password=*** user=u"), "{got}");
        for (text, want) in [
            ("conninfo=\"password=s3cr3t\"", "conninfo=\"password=***\""),
            ("a password = 's3 cr3t' b", "a password = *** b"),
            ("url: postgresql://u:s3cr3t@h/db, next", "url: postgresql://u:***@h/db, next"),
            ("'POSTGRES://u:s3cr3t@h?password=s3cr3t2&x=1'", "'POSTGRES://u:***@h?password=***&x=1'"),
            (
                "x = \"postgres://h/?sslmode=require&password=s3cr3t\"",
                "x = \"postgres://h/?sslmode=require&password=***\"",
            ),
            ("no password here, passwords are fine", "no password here, passwords are fine"),
            ("ends with password=", "ends with password=***"),
            ("ö password=s3cr3tö ö", "ö password=*** ö"),
        ] {
            let got = redact_in_text(text);
            assert_eq!(got, want, "{text:?}");
            assert!(!got.contains("s3cr3t"), "{got}");
        }
    }

    #[test]
    fn raw_strings_are_redacted_in_both_forms() {
        for (raw, want) in [
            ("host=h password=s3cr3t user=u", "host=h password=*** user=u"),
            ("password = 's3 cr\\'et' user=u", "password = *** user=u"),
            ("password='s3''cr3t'", "password=***"),
            ("password=s3\\ cr3t dbname=x", "password=*** dbname=x"),
            ("password='s3cr3t", "password=***"),
            ("host=h junk password=s3cr3t", "host=h junk password=***"),
            ("user=J\\ö password=s3cr3t", "user=J\\ö password=***"),
            ("postgresql://u:s3cr3t@h/db", "postgresql://u:***@h/db"),
            ("postgresql://u:s3:cr@3t@h:5/db?sslmode=require", "postgresql://u:***@h:5/db?sslmode=require"),
            (
                "postgres://h/db?user=u&password=s3cr3t&sslmode=require",
                "postgres://h/db?user=u&password=***&sslmode=require",
            ),
            ("postgres://h?pass%77ord=s3cr3t", "postgres://h?pass%77ord=***"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("  postgresql://u:s3cr3t@h  ", "  postgresql://u:***@h  "),
        ] {
            let got = redact_in_text(raw);
            assert_eq!(got, want, "{raw:?}");
            assert!(!got.contains("s3"), "{raw:?} -> {got:?}");
        }
    }

    #[test]
    fn fallback_application_name() {
        assert_eq!(ok("fallback_application_name=fb").application_name.as_deref(), Some("fb"));
        assert_eq!(ok("fallback_application_name=fb application_name=app").application_name.as_deref(), Some("app"));
        assert_eq!(ok("application_name='' fallback_application_name=fb").application_name.as_deref(), Some("fb"));
    }

    #[test]
    fn sslrootcert_system_is_rejected() {
        assert!(bad("sslrootcert", "system")(&err("sslrootcert=system")));
        assert_eq!(ok("sslrootcert=./system.pem").sslrootcert, Some(PathBuf::from("./system.pem")));
    }

    // ---- keyword errors ----

    #[test]
    fn unknown_keyword_is_named() {
        let e = err("host=a colour=blue");
        assert_eq!(e, ConnInfoError::UnknownKeyword { keyword: "colour".into() });
        assert!(e.to_string().contains("colour"));
        // Keywords are case-sensitive, as in libpq.
        assert_eq!(err("Host=a"), ConnInfoError::UnknownKeyword { keyword: "Host".into() });
        // ssl=true is a URI-only alias.
        assert_eq!(err("ssl=true"), ConnInfoError::UnknownKeyword { keyword: "ssl".into() });
    }

    #[test]
    fn unsupported_libpq_keywords_are_rejected() {
        for keyword in UNSUPPORTED {
            let e = err(&format!("{keyword}=x"));
            let keyword = *keyword;
            assert_eq!(e, ConnInfoError::UnsupportedKeyword { keyword });
            assert!(e.to_string().contains(keyword));
            assert_eq!(err(&format!("postgresql://h/?{keyword}=x")), ConnInfoError::UnsupportedKeyword { keyword });
        }
    }

    #[test]
    fn replication_is_rejected() {
        for s in ["replication=database", "replication=true", "postgresql://h/?replication=1"] {
            let e = err(s);
            assert_eq!(e, ConnInfoError::ReplicationKeyword);
            assert!(e.to_string().contains("pitr sets it"));
        }
    }

    // ---- URI form ----

    #[test]
    fn uri_full_example() {
        let c = ok("postgresql://user:pass@host1:5432,host2:5433/db?sslmode=require&application_name=x");
        assert_eq!(c.hosts, vec![tcp("host1", 5432), tcp("host2", 5433)]);
        assert_eq!(c.user.as_deref(), Some("user"));
        assert_eq!(c.password.as_deref(), Some("pass"));
        assert_eq!(c.dbname.as_deref(), Some("db"));
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name.as_deref(), Some("x"));
    }

    #[test]
    fn uri_short_scheme_and_minimal_forms() {
        assert_eq!(ok("postgres://"), ConnInfo::default());
        assert_eq!(ok("postgresql://"), ConnInfo::default());
        assert_eq!(ok("postgresql:///"), ConnInfo::default());
        assert_eq!(ok("postgresql://?"), ConnInfo::default());
        assert_eq!(ok("postgresql://localhost").hosts, vec![tcp("localhost", 5432)]);
        assert_eq!(ok("postgres://h:6000").hosts, vec![tcp("h", 6000)]);
        assert_eq!(ok("postgresql://h:/db").hosts, vec![tcp("h", 5432)]);
        assert_eq!(ok("postgresql://:6000/db").hosts, vec![tcp("localhost", 6000)]);
        let c = ok("postgresql://other@localhost/otherdb?connect_timeout=10&application_name=myapp");
        assert_eq!(c.user.as_deref(), Some("other"));
        assert_eq!(c.password, None);
        assert_eq!(c.dbname.as_deref(), Some("otherdb"));
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(10)));
    }

    #[test]
    fn uri_scheme_case_and_surrounding_whitespace() {
        let c = ok("  PostgreSQL://h/db\n");
        assert_eq!(c.hosts, vec![tcp("h", 5432)]);
        assert_eq!(c.dbname.as_deref(), Some("db"));
        // Anything else that is not a URI is read as keyword/value.
        assert_eq!(err("mysql://h/db"), ConnInfoError::MissingEquals { position: 0 });
    }

    #[test]
    fn uri_userinfo_forms_and_percent_decoding() {
        let c = ok("postgresql://us%40er:p%40ss%3Aw%2Fo%20rd@h/db");
        assert_eq!(c.user.as_deref(), Some("us@er"));
        assert_eq!(c.password.as_deref(), Some("p@ss:w/o rd"));
        let c = ok("postgresql://:secret@h");
        assert_eq!(c.user, None);
        assert_eq!(c.password.as_deref(), Some("secret"));
        let c = ok("postgresql://u:@h");
        assert_eq!(c.user.as_deref(), Some("u"));
        assert_eq!(c.password, None);
        // An unencoded ':' after the first belongs to the password.
        assert_eq!(ok("postgresql://u:a:b@h").password.as_deref(), Some("a:b"));
        // The last '@' ends the user information.
        let c = ok("postgresql://u:p@ss@h/db");
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!(c.hosts, vec![tcp("h", 5432)]);
        // ...but a later '@' in the path or query does not.
        let c = ok("postgresql://h/d@b?application_name=a@b");
        assert_eq!(c.user, None);
        assert_eq!(c.dbname.as_deref(), Some("d@b"));
        assert_eq!(c.application_name.as_deref(), Some("a@b"));
        // Empty user information.
        assert_eq!(ok("postgresql://@h").hosts, vec![tcp("h", 5432)]);
        // Non-ASCII.
        assert_eq!(ok("postgresql://J%C3%B6rg@h").user.as_deref(), Some("Jörg"));
    }

    #[test]
    fn uri_percent_decoding_in_path_and_query() {
        let c = ok("postgresql://h/my%20db?options=-c%20synchronous_commit%3Doff&application_name=a%26b+c");
        assert_eq!(c.dbname.as_deref(), Some("my db"));
        assert_eq!(c.options.as_deref(), Some("-c synchronous_commit=off"));
        // '+' is not a space in libpq URIs.
        assert_eq!(c.application_name.as_deref(), Some("a&b+c"));
        // Keywords are decoded too.
        assert_eq!(ok("postgresql://h?db%6Eame=x").dbname.as_deref(), Some("x"));
    }

    #[test]
    fn uri_ipv6() {
        assert_eq!(ok("postgresql://[::1]:5433/db").hosts, vec![tcp("::1", 5433)]);
        assert_eq!(ok("postgresql://[::1]/db").hosts, vec![tcp("::1", 5432)]);
        assert_eq!(ok("postgresql://[::1]").hosts, vec![tcp("::1", 5432)]);
        assert_eq!(ok("postgresql://[2001:db8::1]?port=7").hosts, vec![tcp("2001:db8::1", 7)]);
        assert_eq!(
            ok("postgresql://u@[fe80::1%25eth0]:1,[::2],h:3/db").hosts,
            vec![tcp("fe80::1%eth0", 1), tcp("::2", 5432), tcp("h", 3)]
        );
    }

    #[test]
    fn uri_multiple_hosts() {
        assert_eq!(ok("postgresql://host1:123,host2:456/somedb").hosts, vec![tcp("host1", 123), tcp("host2", 456)]);
        // Ports left out in some entries get the default, as libpq builds "123,".
        assert_eq!(ok("postgresql://a:123,b/db").hosts, vec![tcp("a", 123), tcp("b", 5432)]);
        // No ports at all.
        assert_eq!(ok("postgresql://a,b").hosts, vec![tcp("a", 5432), tcp("b", 5432)]);
        // Empty host entries become the default host.
        assert_eq!(ok("postgresql://,b:2").hosts, vec![tcp("localhost", 5432), tcp("b", 2)]);
    }

    #[test]
    fn uri_unix_sockets() {
        let c = ok("postgresql://%2Ftmp/db");
        assert_eq!(c.hosts, vec![unix("/tmp", 5432)]);
        assert_eq!(c.dbname.as_deref(), Some("db"));
        assert_eq!(ok("postgresql://%2fvar%2Frun%2Fpostgresql:5433/db").hosts, vec![unix("/var/run/postgresql", 5433)]);
        let c = ok("postgresql:///db?host=/tmp");
        assert_eq!(c.hosts, vec![unix("/tmp", 5432)]);
        assert_eq!(c.dbname.as_deref(), Some("db"));
        assert_eq!(ok("postgresql:///db?host=%2Ftmp&port=5433").hosts, vec![unix("/tmp", 5433)]);
        assert_eq!(ok("postgresql://user@/db?host=/var/lib/postgresql").hosts, vec![unix("/var/lib/postgresql", 5432)]);
    }

    #[test]
    fn uri_query_overrides_earlier_parts() {
        let c = ok("postgresql://u@h1:1,h2:2/db1?port=9&dbname=db2&user=v");
        assert_eq!(c.hosts, vec![tcp("h1", 9), tcp("h2", 9)]);
        assert_eq!(c.dbname.as_deref(), Some("db2"));
        assert_eq!(c.user.as_deref(), Some("v"));
        assert_eq!(ok("postgresql://h?sslmode=disable&sslmode=allow").sslmode, SslMode::Allow);
    }

    #[test]
    fn uri_ssl_true_means_require() {
        assert_eq!(ok("postgresql://h?ssl=true").sslmode, SslMode::Require);
        assert_eq!(err("postgresql://h?ssl=false"), ConnInfoError::UnknownKeyword { keyword: "ssl".into() });
    }

    #[test]
    fn uri_trailing_ampersand_is_fine() {
        assert_eq!(ok("postgresql://h/db?user=u&").user.as_deref(), Some("u"));
    }

    #[test]
    fn uri_query_errors() {
        assert_eq!(err("postgresql://h/db?user"), ConnInfoError::QueryMissingEquals { position: 18 });
        assert_eq!(err("postgresql://h/db?user=u&&dbname=d"), ConnInfoError::QueryMissingEquals { position: 25 });
        assert_eq!(err("postgresql://h/db?&user=u"), ConnInfoError::QueryMissingEquals { position: 18 });
        let e = err("postgresql://h/db?user=u&options=-c%20a=b");
        assert_eq!(e, ConnInfoError::QueryExtraEquals { keyword: "options".into(), position: 25 });
        assert!(e.to_string().contains("%3D"));
        assert_eq!(err("postgresql://h?colour=blue"), ConnInfoError::UnknownKeyword { keyword: "colour".into() });
        assert!(bad("port", "x")(&err("postgresql://h?port=x")));
        assert!(bad("connect_timeout", "soon")(&err("postgresql://h?connect_timeout=soon")));
    }

    #[test]
    fn uri_ipv6_errors() {
        assert_eq!(err("postgresql://[::1/db"), ConnInfoError::UnterminatedIpv6 { position: 13 });
        assert_eq!(err("postgresql://u@[]:5432"), ConnInfoError::EmptyIpv6 { position: 15 });
        assert_eq!(err("postgresql://[::1]x/db"), ConnInfoError::UnexpectedCharacter { position: 18, found: 'x' });
        // Without brackets the address's colons are read as a port.
        assert!(bad("port", ":1")(&err("postgresql://::1/db")));
    }

    #[test]
    fn uri_port_errors() {
        assert!(bad("port", "abc")(&err("postgresql://h:abc/db")));
        assert!(bad("port", "0")(&err("postgresql://h:0")));
        assert!(bad("port", "1:2")(&err("postgresql://h:1:2")));
        assert_eq!(err("postgresql://a,b,c/?port=1,2"), ConnInfoError::PortCountMismatch { hosts: 3, ports: 2 });
    }

    #[test]
    fn uri_percent_encoding_errors() {
        assert_eq!(err("postgresql://h/d%zzb"), ConnInfoError::InvalidPercentEncoding { position: 16 });
        assert_eq!(err("postgresql://h/db%4"), ConnInfoError::InvalidPercentEncoding { position: 17 });
        assert_eq!(err("postgresql://h/db%"), ConnInfoError::InvalidPercentEncoding { position: 17 });
        assert_eq!(err("postgresql://h/d%00b"), ConnInfoError::PercentEncodedNul { position: 16 });
        assert_eq!(err("postgresql://h?user=%00"), ConnInfoError::PercentEncodedNul { position: 20 });
        assert_eq!(err("postgresql://u%g1@h"), ConnInfoError::InvalidPercentEncoding { position: 14 });
        assert_eq!(err("postgresql://h%2/db"), ConnInfoError::InvalidPercentEncoding { position: 14 });
        assert_eq!(err("postgresql://h:5%3x2"), ConnInfoError::InvalidPercentEncoding { position: 16 });
        assert_eq!(err("postgresql://h/%FF"), ConnInfoError::InvalidUtf8 { part: "database name", position: 15 });
        assert_eq!(err("postgresql://u:%C3@h"), ConnInfoError::InvalidUtf8 { part: "password", position: 15 });
        // Positions count from the start of the caller's string, leading blanks included.
        assert_eq!(err("  postgresql://h/%FF"), ConnInfoError::InvalidUtf8 { part: "database name", position: 17 });
    }

    // ---- printing ----

    const SECRET: &str = "s3cr3t-Pa55";

    #[test]
    fn debug_hides_password() {
        for s in [format!("host=h user=u password={SECRET}"), format!("postgresql://u:{SECRET}@h/db")] {
            let c = ok(&s);
            assert_eq!(c.password.as_deref(), Some(SECRET));
            let dbg = format!("{c:?}");
            let pretty = format!("{c:#?}");
            assert!(!dbg.contains(SECRET), "{dbg}");
            assert!(!pretty.contains(SECRET), "{pretty}");
            assert!(dbg.contains("password: Some(***)"), "{dbg}");
            assert!(dbg.contains("user: Some(\"u\")"), "{dbg}");
        }
        assert!(format!("{:?}", ConnInfo::default()).contains("password: None"));
    }

    #[test]
    fn redacted_omits_password_and_round_trips() {
        let inputs = [
            format!(
                "host=a,/tmp port=1,2 user='u v' password={SECRET} dbname=\"d\" \
                 application_name='it''s' options='-c x=y' sslmode=verify-ca \
                 sslrootcert='/c a' sslcert=/c sslkey='/k\\\\' connect_timeout=7 \
                 keepalives_idle=9 target_session_attrs=standby"
            ),
            format!("postgresql://u:{SECRET}@[::1]:5433,h/db?sslmode=disable"),
            format!("password={SECRET}"),
        ];
        for s in inputs {
            let c = ok(&s);
            let r = c.redacted();
            assert!(!r.contains(SECRET), "{r}");
            assert!(!r.contains("password"), "{r}");
            assert_eq!(c.to_string(), r);
            let back = ok(&r);
            assert_eq!(back, ConnInfo { password: None, ..c.clone() }, "{r}");
        }
    }

    #[test]
    fn redacted_format() {
        assert_eq!(ConnInfo::default().redacted(), "host=localhost port=5432 sslmode=prefer");
        assert_eq!(
            ok("host=a,b port=1,2 user=rep password=x dbname=x application_name='my app' \
                target_session_attrs=read-write")
            .redacted(),
            "host=a,b port=1,2 user=rep dbname=x application_name='my app' sslmode=prefer \
             target_session_attrs=read-write"
        );
        assert_eq!(ok(r"user='a\'b\\'").redacted(), r"host=localhost port=5432 user='a\'b\\' sslmode=prefer");
    }

    #[test]
    fn errors_never_contain_the_password() {
        let cases = [
            format!("password={SECRET} port=x"),
            format!("password='{SECRET}"),
            format!("password='{SECRET}\\"),
            format!("password={SECRET} sslmode=bogus"),
            format!("password={SECRET} replication=1"),
            format!("password={SECRET} service=x"),
            format!("password={SECRET} nope=x"),
            format!("password={SECRET} host=a hostaddr=b"),
            format!("password={SECRET} host=a,b port=1,2,3"),
            format!("password={SECRET} connect_timeout=x"),
            format!("password={SECRET} 5"),
            format!("password={SECRET} =5"),
            format!("postgresql://u:{SECRET}@h:x/db"),
            format!("postgresql://u:{SECRET}%ZZ@h/db"),
            format!("postgresql://u:{SECRET}%00@h/db"),
            format!("postgresql://u:{SECRET}%FF@h/db"),
            format!("postgresql://u:{SECRET}@[::1/db"),
            format!("postgresql://u:{SECRET}@[]/db"),
            format!("postgresql://u:{SECRET}@[::1]x/db"),
            format!("postgresql://u:{SECRET}@h/db?x"),
            format!("postgresql://u:{SECRET}@h/db?a=b=c"),
            format!("postgresql://u@h/db?password={SECRET}&port=0"),
            format!("postgresql://u@h/db?password={SECRET}%FF"),
            format!("postgresql://u@h/db?password={SECRET}%00"),
            format!("postgresql://u@h/db?password={SECRET}=x"),
        ];
        for s in cases {
            let e = err(&s);
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(SECRET), "{s}: {shown}");
        }
    }

    #[test]
    fn error_messages_name_keyword_and_value() {
        let e = err("sslmode=bogus");
        let msg = e.to_string();
        assert!(msg.contains("sslmode") && msg.contains("bogus"), "{msg}");
        let msg = err("connect_timeout=abc").to_string();
        assert!(msg.contains("connect_timeout") && msg.contains("abc"), "{msg}");
        let msg = err("host=a  b").to_string();
        assert!(msg.contains("byte 8"), "{msg}");
    }

    #[test]
    fn from_str_matches_parse() {
        let s = "postgresql://u@h/db";
        assert_eq!(s.parse::<ConnInfo>(), parse(s));
        assert_eq!("port=0".parse::<ConnInfo>(), parse("port=0"));
    }
}
