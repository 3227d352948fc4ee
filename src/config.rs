//! The TOML configuration: schema, defaults, and validation.
//!
//! Every value that can be wrong is parsed into its real type during
//! deserialization (addresses, durations, sizes), so a bad value is reported
//! by the TOML parser with the file, line, column and key. Checks that need
//! several keys at once run afterwards in [`Config::validate`] and name the
//! keys involved.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Where `relayq serve` looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/relayq/relayq.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
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
    #[serde(default)]
    pub relay: Option<RelayConfig>,
    #[serde(default)]
    pub capture: Option<CaptureConfig>,
    #[serde(default)]
    pub queue: QueueConfig,
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

/// The `sendmail` command and the maildrop pickup.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SendmailConfig {
    /// Envelope sender for local submissions instead of `user@myorigin`
    /// (a provider may accept only a verified sender). `-f` from a trusted
    /// user still overrides it.
    pub rewrite_sender: Option<String>,
    /// Users besides root and the spool's owner who may set the envelope
    /// sender with `-f`/`-r`; `"*"` trusts every local user.
    pub trusted_users: Vec<String>,
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
    /// Longest line in a message body, excluding CRLF (RFC 5322: 998).
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
            max_connections: 256,
            max_line_length: 998,
            max_errors: 10,
            command_timeout: HumanDuration(Duration::from_secs(300)),
            data_timeout: HumanDuration(Duration::from_secs(300)),
            min_free_space: Size(64 * 1024 * 1024),
        }
    }
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
    /// Parallel connections to this relay.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    #[serde(default = "default_command_timeout")]
    pub command_timeout: HumanDuration,
    /// How long an unused connection is kept open for the next message.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
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
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            retry_min: HumanDuration(Duration::from_secs(300)),
            retry_max: HumanDuration(Duration::from_secs(4000)),
            max_lifetime: HumanDuration(Duration::from_secs(5 * 86_400)),
            bounce_full_message_limit: Size(64 * 1024),
        }
    }
}

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
fn default_concurrency() -> usize {
    4
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

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.source = Some(path.to_path_buf());
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
            relay: None,
            capture: Some(CaptureConfig {
                maildir: base.join("Maildir"),
            }),
            queue: QueueConfig::default(),
            myorigin: None,
            sendmail: SendmailConfig::default(),
            source: None,
        }
    }

    /// The domain for `user@domain` senders of local submissions.
    pub fn myorigin(&self) -> &str {
        self.myorigin.as_deref().unwrap_or(&self.hostname)
    }

    pub fn transport_kind(&self) -> TransportKind {
        self.transport.unwrap_or(if self.relay.is_some() {
            TransportKind::Relay
        } else {
            TransportKind::Capture
        })
    }

    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone().unwrap_or_default(),
            key,
            message: message.into(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.transport_kind() {
            TransportKind::Relay if self.relay.is_none() => {
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
        if let Some(open) = self.smtp.listen.iter().find(|a| !a.ip().is_loopback()) {
            return Err(self.invalid(
                "smtp.listen",
                format!(
                    "{open} is not a loopback address; relayq only listens on loopback so it can never be an open relay"
                ),
            ));
        }
        if self.smtp.max_recipients == 0 || self.smtp.max_connections == 0 {
            return Err(self.invalid(
                "smtp.max_recipients / smtp.max_connections",
                "must be at least 1",
            ));
        }
        if self.smtp.max_line_length < 78 {
            return Err(self.invalid("smtp.max_line_length", "must be at least 78"));
        }
        if self.queue.retry_min.0.is_zero() || self.queue.retry_max.0 < self.queue.retry_min.0 {
            return Err(self.invalid(
                "queue.retry_max",
                "retry_min must be above zero and retry_max at least retry_min",
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
        if let Some(relay) = &self.relay {
            if relay.concurrency == 0 {
                return Err(self.invalid("relay.concurrency", "must be at least 1"));
            }
            if relay.host.trim().is_empty() {
                return Err(self.invalid("relay.host", "must not be empty"));
            }
            let loopback = relay
                .host
                .parse::<std::net::IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(relay.host == "localhost");
            if relay.tls == TlsModeConfig::None && !loopback && !relay.insecure {
                return Err(self.invalid(
                    "relay.tls",
                    "tls = \"none\" sends mail in clear text; it is allowed only for a loopback relay or with insecure = true",
                ));
            }
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
        assert_eq!(c.relay.unwrap().concurrency, 4);
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
    fn non_loopback_listen_is_refused() {
        let err = parse("[smtp]\nlisten = [\"0.0.0.0:25\"]\n[capture]\nmaildir = \"/tmp/m\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("smtp.listen") && err.contains("open relay"),
            "{err}"
        );
    }
}
