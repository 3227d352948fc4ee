//! The relay transport: delivery to the configured relayhost over SMTP,
//! one connection per worker, reused across messages (RSET between them)
//! and closed after `idle_timeout` without work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::smtp::{
    AuthMechanism, ClientConfig, Connection, Credentials, Envelope, Reply, Secret, SmtpError,
    TlsMode, TlsOptions,
};
use crate::config::{AuthMechanismConfig, Config, RelayConfig, TlsModeConfig};
use crate::delivery::outcome::{AttemptReport, RcptOutcome};
use crate::spool::Meta;

pub struct RelaySender {
    relay: RelayConfig,
    helo_name: String,
    conn: Option<Connection>,
}

impl RelaySender {
    pub fn new(config: &Arc<Config>) -> anyhow::Result<RelaySender> {
        let relay = config
            .relay
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the relay transport needs a [relay] section"))?;
        Ok(RelaySender {
            relay,
            helo_name: config.hostname.clone(),
            conn: None,
        })
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    pub fn idle_timeout(&self) -> Duration {
        self.relay.idle_timeout.0
    }

    pub async fn close(&mut self) {
        if let Some(c) = self.conn.take() {
            c.quit().await;
        }
    }

    fn describe(&self, addr: Option<SocketAddr>) -> String {
        match addr {
            Some(a) => format!("{}[{}]:{}", self.relay.host, a.ip(), a.port()),
            None => format!("{}:{}", self.relay.host, self.relay.port),
        }
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        let target = (self.relay.host.as_str(), self.relay.port);
        match tokio::net::lookup_host(target).await {
            Ok(addrs) => {
                let v: Vec<SocketAddr> = addrs.collect();
                if v.is_empty() {
                    Err(format!(
                        "Host or domain name not found: {}",
                        self.relay.host
                    ))
                } else {
                    Ok(v)
                }
            }
            Err(e) => Err(format!(
                "Host or domain name not found: {} ({e})",
                self.relay.host
            )),
        }
    }

    /// The client settings for one resolved address of the relay (also
    /// used by `relayq check`, so it tests exactly what delivery uses).
    pub fn client_config(&self, addr: SocketAddr) -> Result<ClientConfig, String> {
        client_config(&self.relay, &self.helo_name, addr)
    }

    /// Opens a connection, trying each address of the relay in turn.
    async fn connect(&mut self) -> Result<(), (String, String)> {
        let addrs = self.resolve().await.map_err(|e| {
            crate::observe::events::relay_failed(&self.describe(None), "dns", &e);
            (self.describe(None), e)
        })?;
        let mut last = (self.describe(None), String::from("no address"));
        for addr in addrs {
            let cfg = match self.client_config(addr) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(target: "relayq::delivery", "relay {}: {e}", self.describe(None));
                    return Err((self.describe(None), e));
                }
            };
            match Connection::open(&cfg).await {
                Ok(c) => {
                    crate::observe::events::relay_connected(&self.describe(None));
                    self.conn = Some(c);
                    return Ok(());
                }
                Err(
                    e @ (SmtpError::AuthRejected { .. }
                    | SmtpError::AuthNotOffered
                    | SmtpError::NoCommonAuthMechanism { .. }),
                ) => {
                    // Always a configuration problem an operator must fix,
                    // and the same on every address: stop here.
                    let relay = self.describe(Some(addr));
                    crate::observe::events::relay_failed(
                        &self.describe(None),
                        "auth",
                        &e.to_string(),
                    );
                    tracing::error!(
                        target: "relayq::delivery",
                        "relay {relay}: {e}; check [relay] username and password (mail stays queued)"
                    );
                    return Err((relay, e.to_string()));
                }
                Err(e) => {
                    tracing::warn!(target: "relayq::delivery", "connect to {}: {e}", self.describe(Some(addr)));
                    crate::observe::events::relay_failed(
                        &self.describe(None),
                        e.stage(),
                        &e.to_string(),
                    );
                    last = (self.describe(Some(addr)), e.to_string());
                }
            }
        }
        Err(last)
    }

    pub async fn deliver(&mut self, meta: &Meta, body: &[u8], rcpts: &[usize]) -> AttemptReport {
        let started = Instant::now();
        // A kept connection is reset first; if that fails it went stale
        // (the upstream timed us out) and a fresh one is opened.
        if let Some(conn) = self.conn.as_mut()
            && (!conn.is_usable() || conn.reset().await.is_err())
        {
            self.conn = None;
        }
        if self.conn.is_none()
            && let Err((relay, reason)) = self.connect().await
        {
            return AttemptReport {
                relay,
                results: rcpts
                    .iter()
                    .map(|&i| {
                        (
                            i,
                            RcptOutcome::Deferred {
                                reason: reason.clone(),
                            },
                        )
                    })
                    .collect(),
                conn_time: started.elapsed(),
                xfer_time: Duration::ZERO,
            };
        }
        let conn_time = started.elapsed();
        let relay = self.describe(self.conn.as_ref().map(|c| c.peer()));
        let Some(conn) = self.conn.as_mut() else {
            return AttemptReport {
                relay,
                results: rcpts
                    .iter()
                    .map(|&i| {
                        (
                            i,
                            RcptOutcome::Deferred {
                                reason: "no connection".into(),
                            },
                        )
                    })
                    .collect(),
                conn_time,
                xfer_time: Duration::ZERO,
            };
        };
        let addrs: Vec<&str> = rcpts
            .iter()
            .filter_map(|&i| meta.recipients.get(i).map(|r| r.address.as_str()))
            .collect();
        let env = Envelope {
            from: &meta.sender,
            rcpts: &addrs,
            smtputf8: meta.smtputf8,
            eight_bit: meta.eight_bit,
        };
        let xfer_start = Instant::now();
        let results = match conn.send(&env, body).await {
            Ok(report) => rcpts
                .iter()
                .zip(report.rcpts.iter())
                .map(|(&i, rcpt_reply)| (i, outcome(rcpt_reply, report.data.as_ref())))
                .collect(),
            Err(e) => {
                let permanent = e.is_permanent();
                if matches!(
                    e,
                    SmtpError::Connect { .. }
                        | SmtpError::ConnectTimeout { .. }
                        | SmtpError::Tls(_)
                ) {
                    // A stale kept connection was replaced inside send()
                    // and the new one could not be opened.
                    let name = format!("{}:{}", self.relay.host, self.relay.port);
                    crate::observe::events::relay_failed(&name, e.stage(), &e.to_string());
                }
                if !conn.is_usable() {
                    self.conn = None;
                }
                let text = e.to_string();
                rcpts
                    .iter()
                    .map(|&i| {
                        let o = if permanent {
                            let status = match &e {
                                SmtpError::Rejected { reply, .. } => reply.status(),
                                _ => "5.0.0".to_string(),
                            };
                            RcptOutcome::Failed {
                                reply: text.clone(),
                                status,
                            }
                        } else {
                            RcptOutcome::Deferred {
                                reason: text.clone(),
                            }
                        };
                        (i, o)
                    })
                    .collect()
            }
        };
        AttemptReport {
            relay,
            results,
            conn_time,
            xfer_time: xfer_start.elapsed(),
        }
    }
}

/// The client settings for one address of a relay: TLS mode and
/// verification, and the AUTH secret read now (a token file may have been
/// rotated since the last connection).
pub fn client_config(
    relay: &RelayConfig,
    helo_name: &str,
    addr: SocketAddr,
) -> Result<ClientConfig, String> {
    let auth = match (&relay.username, relay.read_secret()?) {
        (Some(user), Some((secret, oauth))) => Some(Credentials {
            username: user.clone(),
            secret: if oauth {
                Secret::OAuth2Token(secret)
            } else {
                Secret::Password(secret)
            },
            mechanism: relay.auth_mechanism.map(|m| match m {
                AuthMechanismConfig::Plain => AuthMechanism::Plain,
                AuthMechanismConfig::Login => AuthMechanism::Login,
                AuthMechanismConfig::CramMd5 => AuthMechanism::CramMd5,
                AuthMechanismConfig::Xoauth2 => AuthMechanism::XOAuth2,
            }),
        }),
        _ => None,
    };
    Ok(ClientConfig {
        addr,
        host: relay.host.clone(),
        helo_name: helo_name.to_string(),
        tls: match relay.tls {
            TlsModeConfig::Starttls => TlsMode::StartTls,
            TlsModeConfig::Implicit => TlsMode::Implicit,
            TlsModeConfig::None => TlsMode::None,
        },
        tls_options: TlsOptions {
            ca_file: relay.ca_file.clone(),
            pin_sha256: relay.pin_sha256.clone(),
            server_name: relay
                .tls_server_name
                .clone()
                .unwrap_or_else(|| relay.host.clone()),
        },
        auth,
        // Clear-text AUTH only ever to this machine itself.
        allow_plaintext_auth: relay.is_loopback() && addr.ip().is_loopback(),
        connect_timeout: relay.connect_timeout.0,
        command_timeout: relay.command_timeout.0,
        data_timeout: relay.command_timeout.0,
    })
}

/// A recipient's fate from its RCPT reply and the reply to the message body.
fn outcome(rcpt: &Reply, data: Option<&Reply>) -> RcptOutcome {
    let reply = match (rcpt.is_positive(), data) {
        (false, _) => rcpt,
        (true, Some(d)) => d,
        (true, None) => {
            return RcptOutcome::Deferred {
                reason: "upstream accepted no recipient; body not sent".into(),
            };
        }
    };
    if reply.is_positive() {
        RcptOutcome::Delivered {
            reply: reply.one_line(),
        }
    } else if reply.is_permanent() {
        RcptOutcome::Failed {
            reply: reply.one_line(),
            status: reply.status(),
        }
    } else {
        RcptOutcome::Deferred {
            reason: reply.one_line(),
        }
    }
}
