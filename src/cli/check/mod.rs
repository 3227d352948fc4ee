//! `relayq check`: a doctor for the config an operator just wrote.
//!
//! It parses the config, then walks the path a message takes: the spool
//! (permissions, free space), the listen addresses (loopback only, free or
//! held by relayq), and the relay (DNS, TCP, greeting, EHLO capabilities,
//! TLS version and certificate verification, AUTH), and with `--send-to`
//! sends a real test message and prints the upstream's reply. Every check
//! prints one line: `ok` or `FAIL`, what was found, and on failure what to
//! change. The exit code is 0 only when every check passed.
//!
//! The relay is reached with the same client settings delivery uses
//! ([`crate::transport::relay::RelaySender::client_config`]), so a passing
//! check means delivery can connect and log in the same way. Submodules:
//! `local` (spool, listen addresses) and `relay` (the relay and the test
//! message).
//!
//! # Security
//! Nothing secret is printed: the AUTH line names the user name and the
//! mechanism, never the password, and upstream errors are already scrubbed
//! of credentials by the SMTP client. Credentials are only sent when the
//! config would send them in delivery too (same TLS rules).

mod condition;
mod local;
pub use local::human_bytes;
mod relay;

pub use condition::relay_configured;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::TransportKind;

/// No single network step of the check waits longer than this.
pub(super) const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config: Option<PathBuf>,
    /// Send a real test message to this address through the relay.
    pub send_to: Option<String>,
    /// Envelope sender and From: of the test message.
    pub from: Option<String>,
}

/// Collects check lines and counts failures.
pub struct Report<W: Write> {
    out: W,
    pub failures: usize,
}

impl<W: Write> Report<W> {
    pub fn new(out: W) -> Self {
        Report { out, failures: 0 }
    }

    pub(super) fn ok(&mut self, name: &str, detail: impl AsRef<str>) {
        let _ = writeln!(self.out, "ok   {name}: {}", one_line(detail.as_ref()));
    }

    pub(super) fn fail(&mut self, name: &str, detail: impl AsRef<str>, fix: impl AsRef<str>) {
        self.failures += 1;
        let _ = writeln!(
            self.out,
            "FAIL {name}: {} -> fix: {}",
            one_line(detail.as_ref()),
            fix.as_ref()
        );
    }
}

fn one_line(s: &str) -> String {
    s.split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Runs every check; returns true when all passed.
pub async fn run(opts: &Options, out: impl Write) -> bool {
    let mut r = Report::new(out);
    let config = match super::load_config(opts.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            use crate::config::ConfigError;
            let fix = match e.downcast_ref::<ConfigError>() {
                Some(ConfigError::Read { error, .. })
                    if error.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    "chmod 644 it (every user's sendmail reads it too; keep the relay password in relay.password_file, not inline), then run relayq check again"
                }
                Some(ConfigError::Read { .. }) => {
                    "give the path of an existing config file (--config FILE or $RELAYQ_CONFIG), or write /etc/relayq/relayq.toml"
                }
                Some(_) => {
                    "correct the key named above (every key is listed in the README's Configuration reference), then run relayq check again"
                }
                // No file and no place for the development default.
                None => "set HOME (or XDG_STATE_HOME), or write a config file",
            };
            r.fail("config", format!("{e:#}"), fix);
            return false;
        }
    };
    match &config.source {
        Some(p) => r.ok("config", format!("{} parses", p.display())),
        None => r.ok(
            "config",
            format!(
                "no config file ({} not found): development default, spool {}",
                crate::config::DEFAULT_CONFIG_PATH,
                config.spool_dir.display()
            ),
        ),
    }
    if let Some(why) = config.no_relay_yet() {
        r.fail(
            "relay",
            why,
            "set [relay] host (and port, tls, username, password_file) to your provider's settings",
        );
    }
    if let Some(why) = config.example_mail_name() {
        r.fail(
            "hostname",
            why,
            "remove the hostname line (the default is this machine's host name) or set it to this machine's fully qualified name, and myorigin, if set, to your mail domain",
        );
    }
    local::check_spool(&config, &mut r);
    for addr in &config.smtp.listen {
        local::check_listen(*addr, &mut r).await;
    }
    if let Some(addr) = config.status_listen {
        local::check_status_listen(addr, &mut r).await;
    }
    match config.transport_kind() {
        TransportKind::Relay if config.relay.is_none() => {
            // Named relays: their tokens (the sessions are checked for the
            // single [relay] form).
            for named in &config.relays {
                let label = format!("relay {}", named.name);
                let clock = crate::clock::Clock::new();
                if let Some(tokens) = crate::transport::oauth2::TokenSource::for_relay(
                    &named.relay,
                    label.clone(),
                    clock,
                ) {
                    relay::check_token(&label, &tokens, &mut r).await;
                }
            }
        }
        // An example host: nothing to look up or connect to.
        TransportKind::Relay if config.no_relay_yet().is_some() => {}
        TransportKind::Relay => relay::check_relay(&config, opts, &mut r).await,
        TransportKind::Capture => {
            let maildir = config
                .capture
                .as_ref()
                .map(|c| c.maildir.display().to_string())
                .unwrap_or_default();
            r.ok(
                "transport",
                format!("capture into the Maildir {maildir}; no relay to check"),
            );
            if opts.send_to.is_some() {
                r.fail(
                    "send",
                    "--send-to needs a relay, but this config captures mail locally",
                    "add a [relay] section (host, port, tls) to the config",
                );
            }
        }
    }
    r.failures == 0
}

/// Prints the check to stdout; the process exit code follows the result.
pub async fn main(opts: &Options) -> bool {
    run(opts, std::io::stdout().lock()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    #[test]
    fn lines_are_single_lines() {
        let mut buf = Vec::new();
        let mut r = Report::new(&mut buf);
        r.ok("ehlo", "a\r\nb");
        r.fail("tcp", "refused\n", "change the port");
        assert_eq!(r.failures, 1);
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(
            text,
            "ok   ehlo: a / b\nFAIL tcp: refused -> fix: change the port\n"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(local::human_bytes(512), "512 B");
        assert_eq!(local::human_bytes(64 * 1024 * 1024), "64.0 MB");
    }

    #[test]
    fn spool_open_to_others_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o777)).unwrap();
        let text = format!(
            "spool_dir = \"{}\"\n[capture]\nmaildir = \"/tmp/m\"\n",
            spool.display()
        );
        let config = Config::parse(&text, Path::new("t.toml")).unwrap();
        let mut buf = Vec::new();
        let mut r = Report::new(&mut buf);
        local::check_spool(&config, &mut r);
        assert_eq!(r.failures, 1);
        let out = String::from_utf8(buf).unwrap();
        assert!(out.starts_with("FAIL spool:"), "{out}");
        assert!(
            out.contains("mode 0777") && out.contains("chmod 700"),
            "{out}"
        );

        std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut buf = Vec::new();
        let mut r = Report::new(&mut buf);
        local::check_spool(&config, &mut r);
        assert_eq!(r.failures, 0, "{}", String::from_utf8_lossy(&buf));
    }
}
