//! The TOML configuration: schema, defaults, and validation.
//!
//! Every value that can be wrong is parsed into its real type during
//! deserialization (addresses, durations, sizes), so a bad value is reported
//! by the TOML parser with the file, line, column and key. Checks that need
//! several keys at once run afterwards in [`Config::validate`] and name the
//! keys involved. Parser errors quote the file: [`redact`] takes any
//! secret out of them first.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod networks;
mod redact;

pub use crate::routing::config::{NamedRelay, QuotaWindow, RelaySection, RouteConfig};

/// Where `relayq serve` looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/relayq/relayq.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The I/O error is part of the message, not a `source`: printing the
    // chain (`{:#}`) would otherwise repeat it.
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our name in EHLO, Received headers, Message-IDs and bounces.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// The queue; see the `spool` module for what lives inside.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// `relay` (the default when `[relay]` is set) or `capture`.
    #[serde(default)]
    pub transport: Option<TransportKind>,
    #[serde(default)]
    pub smtp: SmtpConfig,
    /// `[relay]` as written: one relay, or named relays `[relay.NAME]`.
    #[serde(default, rename = "relay")]
    pub relay_section: Option<RelaySection>,
    /// The single `[relay]` form, if that is what the file uses (it is
    /// also in `relays`, named "default").
    #[serde(skip)]
    pub relay: Option<RelayConfig>,
    /// Every relay, sorted by name (filled in by `parse`).
    #[serde(skip)]
    pub relays: Vec<NamedRelay>,
    /// `[[route]]`: which mail goes to which relay, in order.
    #[serde(default)]
    pub route: Vec<RouteConfig>,
    /// `redis://[:password@]host:port[/db]`: share relay limits with other
    /// relayq instances through Redis. May hold a password: never printed.
    #[serde(default)]
    pub limits_backend: Option<SecretString>,
    /// While Redis is unreachable, each instance may use this share of
    /// every limit on its own (e.g. 0.5 with two instances).
    #[serde(default = "default_redis_fallback_share")]
    pub redis_fallback_share: f64,
    #[serde(default)]
    pub capture: Option<CaptureConfig>,
    #[serde(default)]
    pub queue: QueueConfig,
    /// `text` (Postfix-style lines, the default) or `json` (one object per line).
    #[serde(default)]
    pub log_format: LogFormat,
    /// `stderr` (the default: the journal under systemd) or `syslog`.
    #[serde(default)]
    pub log_to: LogTo,
    /// The syslog socket for `log_to = "syslog"`.
    #[serde(default = "default_syslog_socket")]
    pub syslog_socket: PathBuf,
    /// The syslog facility for `log_to = "syslog"` (Postfix's
    /// `syslog_facility`).
    #[serde(default)]
    pub syslog_facility: crate::observe::syslog::Facility,
    /// The status and metrics HTTP endpoint (`/`, `/status`, `/metrics`,
    /// `/healthz`); off unless set, and only ever on a loopback address.
    #[serde(default)]
    pub status_listen: Option<SocketAddr>,
    /// The domain of locally submitted mail (`sendmail`): a user without
    /// `-f` sends as `user@myorigin`. Defaults to `hostname`.
    #[serde(default)]
    pub myorigin: Option<String>,
    #[serde(default)]
    pub sendmail: SendmailConfig,
    /// Set when the config came from no file at all (development default).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// How log lines are written (see `observe`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Postfix-style lines, queue id first.
    #[default]
    Text,
    /// One JSON object per line, the same fields as keys.
    Json,
}

/// Whether `host` is a name reserved for examples (RFC 2606, RFC 6761):
/// `example.com`, `example.net`, `example.org` and their subdomains, and
/// the `.example` and `.invalid` top-level domains. No relay can be there,
/// so a config that names only such hosts has not been edited yet.
pub fn is_example_host(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let under = |zone: &str| h == zone || h.ends_with(&format!(".{zone}"));
    [
        "example.com",
        "example.net",
        "example.org",
        "example",
        "invalid",
    ]
    .iter()
    .any(|z| under(z))
}

/// Where log lines go (see `observe::syslog`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogTo {
    /// Standard error: the journal under systemd.
    #[default]
    Stderr,
    /// The local syslog daemon's socket (`syslog_socket`), for hosts
    /// without systemd.
    Syslog,
}

fn default_syslog_socket() -> PathBuf {
    PathBuf::from("/dev/log")
}

/// The `sendmail` command and the maildrop pickup.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendmailConfig {
    /// Envelope sender for local submissions instead of `user@myorigin`
    /// (a provider may accept only a verified sender). `-f` from a trusted
    /// user still overrides it.
    pub rewrite_sender: Option<String>,
    /// Users besides root and the spool's owner who may set the envelope
    /// sender with `-f`/`-r`. `"*"` (the default) trusts every local user,
    /// as Postfix, sendmail, nullmailer, dma and msmtp do: PHP's `mail()`
    /// passes `-f` for a sender the provider has verified. A list of names
    /// restricts it.
    pub trusted_users: Vec<String>,
}

impl Default for SendmailConfig {
    fn default() -> Self {
        SendmailConfig {
            rewrite_sender: None,
            trusted_users: vec!["*".into()],
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Relay,
    Capture,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Addresses to accept mail on.
    pub listen: Vec<SocketAddr>,
    /// Largest message accepted, in bytes; advertised in EHLO SIZE.
    pub max_message_size: Size,
    pub max_recipients: usize,
    /// Concurrent inbound sessions; further clients get `421`.
    pub max_connections: usize,
    /// Longest line relayed as it is, excluding CRLF (RFC 5322: 998):
    /// longer body lines are re-encoded, longer header lines folded.
    pub max_line_length: usize,
    /// Protocol errors a client may make before it is disconnected.
    pub max_errors: usize,
    /// How long to wait for the next command.
    pub command_timeout: HumanDuration,
    /// How long to wait for the next chunk of a message body.
    pub data_timeout: HumanDuration,
    /// Refuse new mail with `452 4.3.1` when the spool's file system has
    /// less free space than this.
    pub min_free_space: Size,
    /// Largest header field accepted, continuation lines included
    /// (Postfix's header_size_limit), on every way in.
    pub max_header_size: Size,
    /// A message with this many `Received:` headers is refused as a mail
    /// loop (Postfix's hopcount_limit).
    pub max_hops: usize,
    /// Concurrent sessions from one non-loopback client address.
    pub max_connections_per_ip: usize,
    /// Client networks that may relay without AUTH. Loopback by default;
    /// setting it replaces the default (list 127.0.0.0/8 yourself to keep it).
    pub allow_networks: Vec<ipnet::IpNet>,
    /// Certificate chain (PEM) for inbound STARTTLS.
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for inbound STARTTLS.
    pub tls_key: Option<PathBuf>,
    /// Users allowed to relay after AUTH: lines of `user:hash` with argon2
    /// (`$argon2id$...`) or bcrypt (`$2b$...`) hashes; see `relayq hash-password`.
    pub auth_users_file: Option<PathBuf>,
    /// Failed AUTH attempts from one client address (IPv6: its /64) within
    /// `auth_failure_window` before AUTH from it is locked (0: no limit).
    pub auth_failure_limit: u32,
    /// Failed AUTH attempts for one user name, from any address, before
    /// that name is locked (0: no limit).
    pub auth_user_failure_limit: u32,
    pub auth_failure_window: HumanDuration,
    /// How long a lockout lasts.
    pub auth_lockout: HumanDuration,
    /// The reply to a failed AUTH waits this long, doubled for each further
    /// failure from the address (at most 16 times).
    pub auth_failure_delay: HumanDuration,
    /// The command and DATA timeout while the server is under stress
    /// (sessions three quarters full), instead of the normal ones.
    pub stress_timeout: HumanDuration,
    /// Under stress, a message must arrive at least this fast (bytes per
    /// second, after `stress_timeout`), or the session is closed.
    pub min_data_rate: u64,
    /// Lets `allow_networks` cover more public address space than a /8 of
    /// IPv4 or a /32 of IPv6 (never all of it).
    pub allow_public_networks: bool,
    /// Set when the file gave `allow_networks` explicitly.
    #[serde(skip)]
    pub allow_networks_explicit: bool,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 25)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 25)),
            ],
            max_message_size: Size(25 * 1024 * 1024),
            max_recipients: 1000,
            max_connections: 4096,
            max_line_length: 998,
            max_errors: 10,
            command_timeout: HumanDuration(Duration::from_secs(300)),
            data_timeout: HumanDuration(Duration::from_secs(300)),
            min_free_space: Size(64 * 1024 * 1024),
            // Postfix's null-client recipe for SendGrid sets
            // header_size_limit = 4096000 so that X-SMTPAPI fits.
            max_header_size: Size(4_096_000),
            max_hops: 50,
            max_connections_per_ip: 20,
            allow_networks: default_allow_networks(),
            tls_cert: None,
            tls_key: None,
            auth_users_file: None,
            auth_failure_limit: 5,
            auth_user_failure_limit: 20,
            auth_failure_window: HumanDuration(Duration::from_secs(600)),
            auth_lockout: HumanDuration(Duration::from_secs(900)),
            auth_failure_delay: HumanDuration(Duration::from_secs(1)),
            stress_timeout: HumanDuration(Duration::from_secs(10)),
            min_data_rate: 500,
            allow_public_networks: false,
            allow_networks_explicit: false,
        }
    }
}

fn default_allow_networks() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsModeConfig {
    /// Upgrade with STARTTLS (port 587); refuse to continue without it.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
    /// Clear text: only for loopback upstreams or with `insecure = true`.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Host name or IP literal of the relayhost.
    pub host: String,
    #[serde(default = "default_relay_port")]
    pub port: u16,
    #[serde(default)]
    pub tls: TlsModeConfig,
    /// Allows `tls = "none"` to a non-loopback upstream.
    #[serde(default)]
    pub insecure: bool,
    /// Connections to this relay: learned ("adaptive", the default, up to
    /// `max_connections`) or fixed.
    #[serde(default)]
    pub concurrency: ConcurrencyConfig,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    #[serde(default = "default_command_timeout")]
    pub command_timeout: HumanDuration,
    /// How long an unused connection is kept open for the next message.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// AUTH user name (an API key name like `apikey` for SendGrid).
    #[serde(default)]
    pub username: Option<String>,
    /// The password itself. Prefer `password_file` or `password_env`.
    #[serde(default)]
    pub password: Option<SecretString>,
    /// A file holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A file holding an OAuth2 access token for XOAUTH2 (Gmail, Office
    /// 365); re-read for every new connection so a refresher can rotate it.
    #[serde(default)]
    pub oauth2_token_file: Option<PathBuf>,
    /// relayq gets the XOAUTH2 access tokens itself: "microsoft" or
    /// "google". Which grant is used follows from the other `oauth2_*`
    /// keys (see `transport::oauth2`).
    #[serde(default)]
    pub oauth2_provider: Option<crate::transport::oauth2::Provider>,
    /// Microsoft Entra tenant (directory id or domain).
    #[serde(default)]
    pub oauth2_tenant: Option<String>,
    #[serde(default)]
    pub oauth2_client_id: Option<String>,
    /// A file holding the OAuth2 client secret (trailing newline ignored).
    #[serde(default)]
    pub oauth2_client_secret_file: Option<PathBuf>,
    /// An environment variable holding the OAuth2 client secret.
    #[serde(default)]
    pub oauth2_client_secret_env: Option<String>,
    /// A file holding a refresh token (delegated access); replaced
    /// atomically when the provider hands out a new one.
    #[serde(default)]
    pub oauth2_refresh_token_file: Option<PathBuf>,
    /// A Google service account's JSON key (domain-wide delegation).
    #[serde(default)]
    pub oauth2_service_account_file: Option<PathBuf>,
    /// Replaces the provider's default scope.
    #[serde(default)]
    pub oauth2_scope: Option<String>,
    /// Replaces the provider's token endpoint (sovereign clouds, tests).
    #[serde(default)]
    pub oauth2_token_url: Option<String>,
    /// A private CA (PEM) for the token endpoint instead of the system
    /// trust store.
    #[serde(default)]
    pub oauth2_ca_file: Option<PathBuf>,
    /// Force one mechanism: "plain", "login", "cram-md5" or "xoauth2".
    #[serde(default)]
    pub auth_mechanism: Option<AuthMechanismConfig>,
    /// A private CA (PEM) to verify the relay's certificate, instead of the
    /// system trust store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the relay's certificate (hex, colons allowed);
    /// the connection is refused if the certificate does not match.
    #[serde(default)]
    pub pin_sha256: Option<String>,
    /// Name to verify the certificate against (default: `host`).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// The most connections open at once (a hard cap: the provider's
    /// limit). Default: [`DEFAULT_MAX_CONNECTIONS`] when adaptive, else
    /// `concurrency`.
    #[serde(default, deserialize_with = "connections")]
    pub max_connections: Option<usize>,
    /// Close a connection after this many messages (providers cap it).
    #[serde(default)]
    pub max_messages_per_connection: Option<u32>,
    /// Provider limits: over one, mail waits in the queue.
    #[serde(default)]
    pub messages_per_second: Option<u32>,
    #[serde(default)]
    pub messages_per_hour: Option<u32>,
    #[serde(default)]
    pub messages_per_day: Option<u32>,
    /// How the hour and day limits count: `rolling` or `calendar`.
    #[serde(default)]
    pub window: QuotaWindow,
    /// Time zone of calendar windows (IANA name; default UTC).
    #[serde(default)]
    pub timezone: Option<String>,
    /// How long this relay may be down before routes with a fallback
    /// send its mail elsewhere.
    #[serde(default = "default_failover_after")]
    pub failover_after: HumanDuration,
    /// Consecutive connection failures that pause the relay (circuit
    /// breaker); a 421 or 454 "too many connections/logins" pauses at once.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// The first pause; it doubles while probes keep failing.
    #[serde(default = "default_breaker_pause")]
    pub breaker_pause: HumanDuration,
    #[serde(default = "default_breaker_pause_max")]
    pub breaker_pause_max: HumanDuration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMechanismConfig {
    Plain,
    Login,
    CramMd5,
    Xoauth2,
}

/// A secret from the config file: never printed, not even in Debug.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where the relay's AUTH secret comes from, resolved at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline,
    File(PathBuf),
    Env(String),
    OAuth2File(PathBuf),
}

/// `max_connections` of an adaptive relay: a little above Postfix's
/// `default_destination_concurrency_limit` (20), since each of relayq's
/// connections carries a message per round trip (see the README).
pub const DEFAULT_MAX_CONNECTIONS: usize = 25;

/// The most connections to one relay `max_connections` or `concurrency`
/// may ask for: each is a delivery worker and an open file, and no
/// provider takes more than a few dozen from one client.
pub const MAX_RELAY_CONNECTIONS: usize = 1000;

/// `max_connections`: a whole number of connections, at least 1 (serde's
/// own error, "expected usize", names neither the range nor the fix).
fn connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let n = i64::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "max_connections must be a whole number of connections, at least 1 (leave it out for the default)",
        )
    })?;
    match usize::try_from(n) {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(serde::de::Error::custom(format!(
            "max_connections must be at least 1, not {n} (leave it out for the default, {DEFAULT_MAX_CONNECTIONS} when adaptive)"
        ))),
    }
}

/// `concurrency`: "adaptive" or a fixed number of connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConcurrencyConfig {
    #[default]
    Adaptive,
    Fixed(usize),
}

impl<'de> Deserialize<'de> for ConcurrencyConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        let wrong = || {
            serde::de::Error::custom(
                "concurrency must be \"adaptive\" or a number of connections (at least 1)",
            )
        };
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 1 => Ok(ConcurrencyConfig::Fixed(
                usize::try_from(n).map_err(|_| wrong())?,
            )),
            Raw::Text(t) if t.eq_ignore_ascii_case("adaptive") => Ok(ConcurrencyConfig::Adaptive),
            _ => Err(wrong()),
        }
    }
}

impl RelayConfig {
    /// Connections this relay may have open at once (the hard cap).
    pub fn connections(&self) -> usize {
        match self.concurrency {
            ConcurrencyConfig::Adaptive => self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            ConcurrencyConfig::Fixed(n) => self.max_connections.map_or(n, |max| n.min(max)),
        }
        .max(1)
    }

    /// Whether the number of connections is learned rather than fixed.
    pub fn adaptive(&self) -> bool {
        self.concurrency == ConcurrencyConfig::Adaptive
    }

    /// The relay's addresses that need no DNS lookup: an IP literal, or
    /// `localhost`.
    pub fn known_addrs(&self) -> Vec<SocketAddr> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return vec![SocketAddr::new(ip, self.port)];
        }
        if self.host.eq_ignore_ascii_case("localhost") {
            return vec![
                SocketAddr::from(([127, 0, 0, 1], self.port)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, self.port)),
            ];
        }
        Vec::new()
    }

    /// Whether the relay's address is loopback (clear text is then allowed).
    pub fn is_loopback(&self) -> bool {
        self.host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(self.host == "localhost")
    }

    pub fn secret_source(&self) -> Option<SecretSource> {
        if self.password.is_some() {
            Some(SecretSource::Inline)
        } else if let Some(p) = &self.password_file {
            Some(SecretSource::File(p.clone()))
        } else if let Some(v) = &self.password_env {
            Some(SecretSource::Env(v.clone()))
        } else {
            self.oauth2_token_file.clone().map(SecretSource::OAuth2File)
        }
    }

    /// Reads the secret now. The error names where it looked, never the
    /// secret.
    pub fn read_secret(&self) -> Result<Option<(String, bool)>, String> {
        let Some(source) = self.secret_source() else {
            return Ok(None);
        };
        let trim = |s: String| s.trim_end_matches(['\r', '\n']).to_string();
        match source {
            SecretSource::Inline => Ok(self.password.as_ref().map(|p| (p.0.clone(), false))),
            SecretSource::File(p) => std::fs::read_to_string(&p)
                .map(|s| Some((trim(s), false)))
                .map_err(|e| format!("cannot read relay.password_file {}: {e}", p.display())),
            SecretSource::Env(v) => std::env::var(&v)
                .map(|s| Some((s, false)))
                .map_err(|_| format!("relay.password_env: environment variable {v} is not set")),
            SecretSource::OAuth2File(p) => std::fs::read_to_string(&p)
                .map(|s| Some((trim(s), true)))
                .map_err(|e| format!("cannot read relay.oauth2_token_file {}: {e}", p.display())),
        }
    }

    /// Files holding a secret that users other than the owner can read.
    pub fn exposed_secret_files(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        [
            &self.password_file,
            &self.oauth2_token_file,
            &self.oauth2_client_secret_file,
            &self.oauth2_refresh_token_file,
            &self.oauth2_service_account_file,
        ]
        .into_iter()
        .flatten()
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o044 != 0)
                .unwrap_or(false)
        })
        .cloned()
        .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// A Maildir (created if missing); each message lands in `new/`.
    pub maildir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// First retry delay after a temporary failure.
    pub retry_min: HumanDuration,
    /// Retry delays double up to this.
    pub retry_max: HumanDuration,
    /// A message still undelivered after this long is bounced.
    pub max_lifetime: HumanDuration,
    /// Bounces quote the whole original message below this size, only its
    /// headers above it.
    pub bounce_full_message_limit: Size,
    /// A recipient that asked for NOTIFY=DELAY gets a delay notice once
    /// its message has waited this long (sendmail's `Timeout.queuewarn`).
    pub delay_warning_time: HumanDuration,
    /// How long a delivered message's "done" mark may stay unsynced: after
    /// a power loss, at most the deliveries of this window are sent again
    /// (see the spool's durability rules). `0s` syncs each one at once.
    pub done_sync_window: HumanDuration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            retry_min: HumanDuration(Duration::from_secs(300)),
            retry_max: HumanDuration(Duration::from_secs(4000)),
            max_lifetime: HumanDuration(Duration::from_secs(5 * 86_400)),
            bounce_full_message_limit: Size(64 * 1024),
            delay_warning_time: HumanDuration(Duration::from_secs(4 * 3600)),
            done_sync_window: HumanDuration(Duration::from_millis(100)),
        }
    }
}

/// The longest path a Unix socket may have (`sun_path` holds 108 bytes
/// with the final NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The longest `queue.done_sync_window` allowed.
pub const MAX_DONE_SYNC_WINDOW: Duration = Duration::from_secs(1);

fn default_hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_str()
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or("localhost")
        .to_string()
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("/var/spool/relayq")
}
fn default_relay_port() -> u16 {
    587
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_command_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_failover_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_pause() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_breaker_pause_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}
fn default_redis_fallback_share() -> f64 {
    0.5
}

/// What a `*_env` key holds that is not a variable name; the value is not
/// shown, as it may be the secret itself.
pub const NOT_AN_ENV_NAME: &str = "must be the name of an environment variable (letters, digits and _, e.g. RELAY_SECRET) that holds the secret, not the secret itself; the value is not shown here in case it is";

/// A name a shell can export.
pub fn is_env_name(v: &str) -> bool {
    let mut bytes = v.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        // The parser quotes the offending line: never with a secret in it.
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: redact::scrub(e.to_string().trim_end(), text),
        })?;
        config.source = Some(path.to_path_buf());
        if let Some(section) = &config.relay_section {
            config.relays = section.relays();
            if let RelaySection::Single(r) = section {
                config.relay = Some((**r).clone());
            }
        }
        config.smtp.allow_networks_explicit = toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|t| {
                t.get("smtp")
                    .and_then(|s| s.get("allow_networks"))
                    .map(|_| ())
            })
            .is_some();
        config.validate()?;
        Ok(config)
    }

    /// The development default used when no config file exists: listen on
    /// 127.0.0.1:2525 and capture mail into a Maildir under `base`.
    pub fn development(base: &Path) -> Config {
        Config {
            hostname: default_hostname(),
            spool_dir: base.join("spool"),
            transport: Some(TransportKind::Capture),
            smtp: SmtpConfig {
                listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
                ..SmtpConfig::default()
            },
            relay_section: None,
            relay: None,
            relays: Vec::new(),
            route: Vec::new(),
            limits_backend: None,
            redis_fallback_share: default_redis_fallback_share(),
            capture: Some(CaptureConfig {
                maildir: base.join("Maildir"),
            }),
            queue: QueueConfig::default(),
            log_format: LogFormat::default(),
            log_to: LogTo::default(),
            syslog_socket: default_syslog_socket(),
            syslog_facility: Default::default(),
            status_listen: None,
            myorigin: None,
            sendmail: SendmailConfig::default(),
            source: None,
        }
    }

    /// Why this config has no relay to send to yet: every relay's host is
    /// an example name (the shipped config, not edited yet). `None` when
    /// a relay is set up, or when the config captures mail on purpose.
    pub fn no_relay_yet(&self) -> Option<String> {
        if self.transport_kind() != TransportKind::Relay
            || self.relays.iter().any(|r| !is_example_host(&r.relay.host))
        {
            return None;
        }
        let hosts: Vec<&str> = self.relays.iter().map(|r| r.relay.host.as_str()).collect();
        Some(match hosts.as_slice() {
            [one] => {
                format!("the relay host {one} is an example name, not your provider's relayhost")
            }
            _ => format!(
                "the relay hosts {} are example names, not your providers' relayhosts",
                hosts.join(", ")
            ),
        })
    }

    /// An example name (`app1.example.com`, as the shipped config once
    /// had) left as `hostname` or `myorigin` while relaying: relayq would
    /// greet the relay with it, and send local users' mail (cron's, root's)
    /// as `user@` a domain nobody here owns, which providers refuse and
    /// whose bounces go nowhere. Said by `relayq check` and at start.
    pub fn example_mail_name(&self) -> Option<String> {
        if self.transport_kind() != TransportKind::Relay {
            return None;
        }
        let mut why = Vec::new();
        if is_example_host(&self.hostname) {
            why.push(format!(
                "hostname {} is an example name, which relayq greets the relay with",
                self.hostname
            ));
        }
        let origin = self.myorigin();
        if is_example_host(origin) {
            let key = if self.myorigin.is_some() {
                " (myorigin)"
            } else {
                ""
            };
            why.push(format!(
                "local users' mail (cron's, root's) would go out as user@{origin}{key}"
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Keys that hold a secret in the config file itself (a relay's
    /// `password`, a password in `limits_backend`): the file is read by
    /// every user who runs `sendmail`, so these belong in `password_file`.
    pub fn inline_secrets(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .relays
            .iter()
            .filter(|r| r.relay.password.is_some())
            .map(|r| match &self.relay {
                Some(_) => "relay.password".to_string(),
                None => format!("relay.{}.password", r.name),
            })
            .collect();
        if let Some(SecretString(url)) = &self.limits_backend
            && crate::routing::fleet::display_url(url) != *url
        {
            keys.push("limits_backend".into());
        }
        keys
    }

    /// The domain for `user@domain` senders of local submissions.
    pub fn myorigin(&self) -> &str {
        self.myorigin.as_deref().unwrap_or(&self.hostname)
    }

    pub fn transport_kind(&self) -> TransportKind {
        self.transport.unwrap_or(if !self.relays.is_empty() {
            TransportKind::Relay
        } else {
            TransportKind::Capture
        })
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone().unwrap_or_default(),
            key: key.into(),
            message: message.into(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.transport_kind() {
            TransportKind::Relay if self.relays.is_empty() => {
                return Err(self.invalid(
                    "transport",
                    "transport = \"relay\" needs a [relay] section with host and port",
                ));
            }
            TransportKind::Capture if self.capture.is_none() => {
                return Err(self.invalid(
                    "transport",
                    "transport = \"capture\" needs a [capture] section with maildir = \"...\"",
                ));
            }
            _ => {}
        }
        if self.smtp.listen.is_empty() {
            return Err(self.invalid("smtp.listen", "at least one listen address is needed"));
        }
        let socket = crate::control::socket_path(&self.spool_dir);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(self.invalid(
                "spool_dir",
                format!(
                    "is too long: the daemon's sockets live in it, and a socket's path ({}, {} bytes) may be at most {MAX_SOCKET_PATH} bytes; choose a shorter spool_dir",
                    socket.display(),
                    socket.as_os_str().len()
                ),
            ));
        }
        self.validate_inbound()?;
        if let Some(addr) = self.status_listen
            && !addr.ip().is_loopback()
        {
            return Err(self.invalid(
                "status_listen",
                format!(
                    "{addr} is not a loopback address; the status page and metrics show queued addresses and have no login, so they are only served on loopback (e.g. \"127.0.0.1:9325\"); reach them from elsewhere through an SSH tunnel or a reverse proxy with authentication"
                ),
            ));
        }
        if self.smtp.max_recipients == 0 || self.smtp.max_connections == 0 {
            return Err(self.invalid(
                "smtp.max_recipients / smtp.max_connections",
                "must be at least 1",
            ));
        }
        if !(78..=998).contains(&self.smtp.max_line_length) {
            return Err(self.invalid(
                "smtp.max_line_length",
                "must be between 78 and 998 (RFC 5322's limit)",
            ));
        }
        if self.smtp.max_hops == 0 {
            return Err(self.invalid("smtp.max_hops", "must be at least 1"));
        }
        if self.queue.retry_min.0.is_zero() || self.queue.retry_max.0 < self.queue.retry_min.0 {
            return Err(self.invalid(
                "queue.retry_max",
                "retry_min must be above zero and retry_max at least retry_min",
            ));
        }
        if self.queue.done_sync_window.0 > MAX_DONE_SYNC_WINDOW {
            return Err(self.invalid(
                "queue.done_sync_window",
                "must be at most 1s: every delivery in the window may be sent again after a power loss",
            ));
        }
        if self.myorigin.as_deref().is_some_and(|m| {
            m.is_empty()
                || !m
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        }) {
            return Err(self.invalid("myorigin", "must be a domain name like \"example.com\""));
        }
        if let Some(s) = &self.sendmail.rewrite_sender
            && (s.is_empty()
                || !s.contains('@')
                || s.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "<>".contains(c)))
        {
            return Err(self.invalid(
                "sendmail.rewrite_sender",
                "must be an address like \"noreply@example.com\"",
            ));
        }
        for named in &self.relays {
            self.validate_relay(named)?;
        }
        self.validate_routing()?;
        Ok(())
    }

    /// The checks of one relay; keys are `relay.KEY` for the single form
    /// and `relay.NAME.KEY` for named relays.
    /// Whether `addr` is one of relayq's own listen addresses: a relay
    /// there would send every message back to relayq (a mail loop).
    pub fn listens_on(&self, addr: SocketAddr) -> bool {
        self.smtp.listen.iter().any(|l| {
            l.port() != 0
                && l.port() == addr.port()
                && (l.ip() == addr.ip()
                    || (l.ip().is_unspecified()
                        && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
        })
    }

    fn validate_relay(&self, named: &NamedRelay) -> Result<(), ConfigError> {
        let relay = &named.relay;
        let key = |k: &str| match &self.relay {
            Some(_) => format!("relay.{k}"),
            None => format!("relay.{}.{k}", named.name),
        };
        {
            if relay.max_connections == Some(0) {
                return Err(self.invalid(key("max_connections"), "must be at least 1"));
            }
            if relay.host.trim().is_empty() {
                return Err(self.invalid(key("host"), "must not be empty"));
            }
            if relay.known_addrs().into_iter().any(|a| self.listens_on(a)) {
                return Err(self.invalid(
                    key("port"),
                    format!(
                        "{}:{} is relayq's own listen address (smtp.listen): every message would loop back to relayq; point the relay at your provider",
                        relay.host, relay.port
                    ),
                ));
            }
            if relay.tls == TlsModeConfig::None && !relay.is_loopback() && !relay.insecure {
                return Err(self.invalid(
                    key("tls"),
                    "tls = \"none\" sends mail in clear text; it is allowed only for a loopback relay or with insecure = true",
                ));
            }
            let sources = [
                relay.password.is_some(),
                relay.password_file.is_some(),
                relay.password_env.is_some(),
                relay.oauth2_token_file.is_some(),
                relay.oauth2_provider.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if sources > 1 {
                return Err(self.invalid(
                    key("password"),
                    "set only one of password, password_file, password_env, oauth2_token_file and oauth2_provider",
                ));
            }
            if let Some(v) = &relay.password_env
                && !is_env_name(v)
            {
                return Err(self.invalid(key("password_env"), NOT_AN_ENV_NAME));
            }
            if let Err((k, message)) = crate::transport::oauth2::check_config(relay) {
                return Err(self.invalid(key(k), message));
            }
            if sources == 1 && relay.username.is_none() {
                return Err(self.invalid(
                    key("username"),
                    "a password or token is set but no username",
                ));
            }
            if relay.username.is_some() && sources == 0 {
                return Err(self.invalid(
                    key("username"),
                    "username is set but no secret: add password_file, password_env, password, oauth2_token_file or oauth2_provider",
                ));
            }
            if relay.username.is_some() && relay.tls == TlsModeConfig::None && !relay.is_loopback()
            {
                return Err(self.invalid(key("tls"), "AUTH credentials are never sent in clear text: use tls = \"starttls\" or \"implicit\""));
            }
            if let Some(pin) = &relay.pin_sha256 {
                let hex: String = pin.chars().filter(|c| *c != ':').collect();
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(self.invalid(
                        key("pin_sha256"),
                        "must be a SHA-256 fingerprint: 64 hex digits, colons allowed",
                    ));
                }
            }
            if let Err((k, message)) = crate::routing::config::check_relay_limits(relay) {
                return Err(self.invalid(key(k), message));
            }
        }
        Ok(())
    }

    /// Routes, failover and the fleet-wide limits backend.
    fn validate_routing(&self) -> Result<(), ConfigError> {
        if !self.route.is_empty() && self.relays.is_empty() {
            return Err(self.invalid("route", "routes need relays: add [relay.NAME] tables"));
        }
        if !self.relays.is_empty()
            && let Err((key, message)) =
                crate::routing::config::check_routes(&self.relays, &self.route)
        {
            return Err(self.invalid(key, message));
        }
        if !(self.redis_fallback_share > 0.0 && self.redis_fallback_share <= 1.0) {
            return Err(self.invalid(
                "redis_fallback_share",
                "must be above 0 and at most 1 (e.g. 0.5 for two instances)",
            ));
        }
        if let Some(SecretString(url)) = &self.limits_backend {
            if !url.starts_with("redis://") {
                let shown = crate::routing::fleet::display_url(url);
                return Err(self.invalid(
                    "limits_backend",
                    format!("{shown:?}: only redis://host:port[/db] is supported (rediss:// is not built in; reach Redis over a private network or a local TLS tunnel)"),
                ));
            }
            if !cfg!(feature = "redis") {
                return Err(self.invalid(
                    "limits_backend",
                    "this relayq was built without the \"redis\" cargo feature",
                ));
            }
        }
        Ok(())
    }

    /// The open-relay rules: loopback listeners only, unless the config
    /// says who may relay (explicit networks, or AUTH behind STARTTLS).
    fn validate_inbound(&self) -> Result<(), ConfigError> {
        let smtp = &self.smtp;
        if smtp.tls_cert.is_some() != smtp.tls_key.is_some() {
            return Err(self.invalid("smtp.tls_cert", "tls_cert and tls_key go together"));
        }
        if smtp.auth_users_file.is_some() && smtp.tls_cert.is_none() {
            return Err(self.invalid(
                "smtp.auth_users_file",
                "inbound AUTH is only offered after STARTTLS: set smtp.tls_cert and smtp.tls_key too",
            ));
        }
        if let Err(why) = networks::judge(&smtp.allow_networks, smtp.allow_public_networks) {
            return Err(self.invalid("smtp.allow_networks", why));
        }
        let auth = smtp.auth_users_file.is_some();
        if let Some(open) = smtp
            .listen
            .iter()
            .find(|a| !a.ip().to_canonical().is_loopback())
            && !smtp.allow_networks_explicit
            && !auth
        {
            return Err(self.invalid(
                "smtp.listen",
                format!(
                    "{open} is not a loopback address; to accept mail from other hosts say who may relay: smtp.allow_networks = [\"10.0.0.0/8\"], or inbound AUTH (smtp.auth_users_file with smtp.tls_cert and smtp.tls_key)"
                ),
            ));
        }
        Ok(())
    }
}

/// A duration written like Postfix and systemd do: `300s`, `5m`, `1h30m`, `5d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("invalid duration {s:?}: write it like \"30s\", \"5m\", \"1h30m\" or \"5d\"")
        };
        let mut total = Duration::ZERO;
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(n),
                "s" | "" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.saturating_mul(60)),
                "h" => Duration::from_secs(n.saturating_mul(3600)),
                "d" => Duration::from_secs(n.saturating_mul(86_400)),
                "w" => Duration::from_secs(n.saturating_mul(7 * 86_400)),
                _ => return Err(bad()),
            };
            total = total.saturating_add(unit);
            rest = &rest[unit_len..];
        }
        Ok(HumanDuration(total))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

/// A byte count: an integer, or a string like `"25MB"`, `"512k"`, `"1G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let n: u64 = t[..digits].parse().map_err(|_| {
            format!("invalid size {s:?}: write it like 10485760, \"10MB\" or \"512KB\"")
        })?;
        let mult = match t[digits..].trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1024,
            "m" | "mb" | "mib" => 1024 * 1024,
            "g" | "gb" | "gib" => 1024 * 1024 * 1024,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit (use KB, MB or GB)"
                ));
            }
        };
        Ok(Size(n.saturating_mul(mult)))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/relayq/relayq.toml"))
    }

    #[test]
    fn example_hosts_are_no_relay_yet() {
        for h in [
            "smtp.example.com",
            "example.net",
            "MAIL.Example.ORG.",
            "relay.example",
            "x.invalid",
        ] {
            assert!(is_example_host(h), "{h}");
        }
        for h in [
            "smtp.sendgrid.net",
            "example.company.com",
            "notexample.com",
            "127.0.0.1",
            "smtp.examples.org",
        ] {
            assert!(!is_example_host(h), "{h}");
        }
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/relayq.toml"))
                .unwrap();
        let c = parse(&shipped).unwrap();
        let why = c
            .no_relay_yet()
            .expect("the shipped config has no relay yet");
        assert!(why.contains("smtp.example.com"), "{why}");
        let route = "[[route]]\nrelay = \"a\"\n";
        let named = format!(
            "[relay.a]\nhost = \"a.example.com\"\n[relay.b]\nhost = \"smtp.sendgrid.net\"\n{route}"
        );
        assert!(parse(&named).unwrap().no_relay_yet().is_none());
        let both = format!(
            "[relay.a]\nhost = \"a.example.com\"\n[relay.b]\nhost = \"b.invalid\"\n{route}"
        );
        let why = parse(&both).unwrap().no_relay_yet().unwrap();
        assert!(why.contains("a.example.com, b.invalid"), "{why}");
        let capture = "[capture]\nmaildir = \"/tmp/m\"\n";
        assert!(parse(capture).unwrap().no_relay_yet().is_none());
    }

    #[test]
    fn log_destination_keys() {
        let c = parse("[relay]\nhost = \"127.0.0.1\"\n").unwrap();
        assert_eq!(c.log_to, LogTo::Stderr);
        assert_eq!(c.syslog_socket, Path::new("/dev/log"));
        assert_eq!(c.syslog_facility.code(), 2);
        let c = parse(
            "log_to = \"syslog\"\nsyslog_socket = \"/run/log\"\nsyslog_facility = \"local2\"\n[relay]\nhost = \"127.0.0.1\"\n",
        )
        .unwrap();
        assert_eq!(c.log_to, LogTo::Syslog);
        assert_eq!(c.syslog_socket, Path::new("/run/log"));
        assert_eq!(c.syslog_facility.code(), 18);
        let e = parse("syslog_facility = \"mial\"\n[relay]\nhost = \"127.0.0.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 1") && e.contains("mial") && e.contains("local7"),
            "{e}"
        );
        let e = parse("log_to = \"file\"\n[relay]\nhost = \"127.0.0.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("syslog"), "{e}");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(
            "5m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(300)
        );
        assert_eq!(
            "1h30m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(5400)
        );
        assert_eq!(
            "5d".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(432_000)
        );
        assert!("5 parsecs".parse::<HumanDuration>().is_err());
        assert_eq!("10MB".parse::<Size>().unwrap().0, 10 * 1024 * 1024);
        assert!("10 furlongs".parse::<Size>().is_err());
    }

    #[test]
    fn minimal_relay_config() {
        let c = parse("[relay]\nhost = \"127.0.0.1\"\nport = 2526\ntls = \"none\"\n").unwrap();
        assert_eq!(c.transport_kind(), TransportKind::Relay);
        assert_eq!(c.smtp.listen.len(), 2);
        let relay = c.relay.unwrap();
        assert_eq!(relay.concurrency, ConcurrencyConfig::Adaptive);
        assert!(relay.adaptive());
        assert_eq!(relay.connections(), DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn concurrency_is_adaptive_or_a_number() {
        let relay = |extra: &str| {
            parse(&format!(
                "[relay]\nhost = \"127.0.0.1\"\ntls = \"none\"\n{extra}"
            ))
            .map(|c| c.relay.unwrap())
        };
        let r = relay("concurrency = \"adaptive\"\nmax_connections = 3\n").unwrap();
        assert!(r.adaptive());
        assert_eq!(r.connections(), 3);
        let r = relay("concurrency = 8\n").unwrap();
        assert!(!r.adaptive());
        assert_eq!(r.connections(), 8);
        // Both numbers, at odds: said, with the fix.
        let e = relay("concurrency = 8\nmax_connections = 4\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("relay.concurrency: 8 is more than max_connections = 4: lower concurrency, or raise or remove max_connections"),
            "{e}"
        );
        assert_eq!(
            relay("concurrency = 4\nmax_connections = 8\n")
                .unwrap()
                .connections(),
            4
        );
        for bad in [
            "concurrency = 0",
            "concurrency = \"lots\"",
            "concurrency = -2",
        ] {
            let e = relay(bad).unwrap_err().to_string();
            assert!(
                e.contains("concurrency must be \"adaptive\" or a number"),
                "{bad}: {e}"
            );
            assert!(e.contains("line 4"), "{bad}: {e}");
        }
        for (bad, says) in [
            (
                "max_connections = 0",
                "max_connections must be at least 1, not 0",
            ),
            (
                "max_connections = -1",
                "max_connections must be at least 1, not -1",
            ),
            (
                "max_connections = \"many\"",
                "max_connections must be a whole number of connections, at least 1",
            ),
            (
                "max_connections = 2.5",
                "max_connections must be a whole number of connections, at least 1",
            ),
        ] {
            let e = relay(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains("line 4"), "{bad}: {e}");
        }
        // A worker and an open file per connection: a number no provider
        // allows is a mistake, said at load, not a daemon that starts a
        // billion workers (or can't allocate them).
        for (bad, key) in [
            ("max_connections = 1000000000", "relay.max_connections"),
            ("max_connections = 1001", "relay.max_connections"),
            ("concurrency = 5000", "relay.concurrency"),
        ] {
            let e = relay(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{key}: must be at most 1000")),
                "{bad}: {e}"
            );
        }
        assert_eq!(relay("max_connections = 1000").unwrap().connections(), 1000);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err = parse("[relay]\nhost = \"127.0.0.1\"\nport = \"twenty\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/relayq/relayq.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("port"), "{err}");

        let err = parse("[queue]\nretry_min = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("retry_min"), "{err}");

        let err = parse("[smtp]\nlisten_on = []\n").unwrap_err().to_string();
        assert!(
            err.contains("unknown field") && err.contains("listen_on"),
            "{err}"
        );
    }

    #[test]
    fn clear_text_to_a_remote_relay_is_refused() {
        let err = parse("[relay]\nhost = \"smtp.example.com\"\ntls = \"none\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("relay.tls"), "{err}");
    }

    #[test]
    fn log_format_and_status_listen() {
        let c = parse("log_format = \"json\"\nstatus_listen = \"127.0.0.1:9325\"\n[capture]\nmaildir = \"/tmp/m\"\n").unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.status_listen, Some("127.0.0.1:9325".parse().unwrap()));
        let c = parse("[capture]\nmaildir = \"/tmp/m\"\n").unwrap();
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.status_listen, None);
        let err = parse("log_format = \"xml\"\n").unwrap_err().to_string();
        assert!(
            err.contains("log_format") && err.contains("line 1"),
            "{err}"
        );
    }

    #[test]
    fn non_loopback_status_listen_is_refused() {
        for addr in ["0.0.0.0:9325", "[::]:9325", "192.0.2.1:9325"] {
            let err = parse(&format!(
                "status_listen = \"{addr}\"\n[capture]\nmaildir = \"/tmp/m\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("status_listen") && err.contains("not a loopback address"),
                "{err}"
            );
        }
    }

    #[test]
    fn non_loopback_listen_is_refused() {
        let err = parse("[smtp]\nlisten = [\"0.0.0.0:25\"]\n[capture]\nmaildir = \"/tmp/m\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("smtp.listen") && err.contains("allow_networks"),
            "{err}"
        );
        let ok = "[smtp]\nlisten = [\"0.0.0.0:25\"]\nallow_networks = [\"10.1.0.0/16\"]\n[capture]\nmaildir = \"/tmp/m\"\n";
        assert!(parse(ok).is_ok());
        let err =
            parse("[smtp]\nallow_networks = [\"0.0.0.0/0\"]\n[capture]\nmaildir = \"/tmp/m\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("open relay"), "{err}");
        let err = parse(
            "[smtp]\nauth_users_file = \"/etc/relayq/users\"\n[capture]\nmaildir = \"/tmp/m\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("STARTTLS"), "{err}");
    }

    #[test]
    fn secrets_are_validated_and_never_printed() {
        let c = parse(
            "[relay]\nhost = \"smtp.example.com\"\nusername = \"apikey\"\npassword = \"hunter2\"\n",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let err = parse("[relay]\nhost = \"smtp.example.com\"\nusername = \"u\"\npassword = \"hunter2\"\npassword_env = \"X\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only one") && !err.contains("hunter2"),
            "{err}"
        );
        let err = parse("[relay]\nhost = \"smtp.example.com\"\ntls = \"none\"\ninsecure = true\nusername = \"u\"\npassword = \"p\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("clear text"), "{err}");
        let err = parse("[relay]\nhost = \"smtp.example.com\"\npin_sha256 = \"abc\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pin_sha256"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/relayq.toml");
        Config::load(&path).unwrap();
    }
}
