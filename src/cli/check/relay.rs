//! The checks on the relay: DNS, TCP, greeting, the OAuth2 token, EHLO,
//! TLS, AUTH, and the `--send-to` test message, with the client settings
//! delivery uses.
//!
//! # Security
//! The password, the OAuth2 client secret, refresh token and access token
//! are never printed (the token step shows only the token's lifetime);
//! probes made only to show what a server offers are sent without
//! credentials.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::local::read_reply;
use super::{Options, Report, STEP_TIMEOUT};
use crate::config::{Config, TlsModeConfig};
use crate::transport::oauth2::{TokenSource, advice};
use crate::transport::relay::RelaySender;
use crate::transport::smtp::{
    ClientConfig, Connection, Envelope, Secret, SmtpError, TlsFailure, TlsMode,
};

pub(super) async fn check_relay<W: Write>(config: &Config, opts: &Options, r: &mut Report<W>) {
    let Some(relay) = config.relay.as_ref() else {
        return;
    };
    let sender = match RelaySender::new(&Arc::new(config.clone())) {
        Ok(s) => s,
        Err(e) => {
            r.fail("relay", format!("{e:#}"), "fix the [relay] section");
            return;
        }
    };
    let target = format!("{}:{}", relay.host, relay.port);

    // DNS.
    let addrs: Vec<SocketAddr> = if let Ok(ip) = relay.host.parse::<IpAddr>() {
        r.ok(
            "dns",
            format!("{} is an IP address; no lookup needed", relay.host),
        );
        vec![SocketAddr::new(ip, relay.port)]
    } else {
        let lookup = tokio::time::timeout(
            STEP_TIMEOUT,
            tokio::net::lookup_host((relay.host.as_str(), relay.port)),
        )
        .await;
        match lookup {
            Ok(Ok(found)) => {
                let v: Vec<SocketAddr> = found.collect();
                if v.is_empty() {
                    r.fail(
                        "dns",
                        format!("{} has no address", relay.host),
                        "check the spelling of relay.host",
                    );
                    return;
                }
                let shown: Vec<String> = v.iter().map(|a| a.ip().to_string()).collect();
                r.ok(
                    "dns",
                    format!("{} resolves to {}", relay.host, shown.join(", ")),
                );
                v
            }
            Ok(Err(e)) => {
                r.fail(
                    "dns",
                    format!("cannot resolve {}: {e}", relay.host),
                    format!(
                        "check the spelling of relay.host and this machine's DNS (getent hosts {})",
                        relay.host
                    ),
                );
                return;
            }
            Err(_) => {
                r.fail(
                    "dns",
                    format!("looking up {} timed out", relay.host),
                    "check this machine's DNS resolver (/etc/resolv.conf)",
                );
                return;
            }
        }
    };

    if let Some(own) = addrs.iter().find(|a| config.listens_on(**a)) {
        r.fail(
            "loop",
            format!(
                "{} resolves to {own}, which is relayq's own listen address: every message would loop back to relayq",
                relay.host
            ),
            "point [relay] host and port at your provider, not at this relayq",
        );
        return;
    }

    // TCP, and the greeting in clear text (not for implicit TLS).
    let connect_limit = relay.connect_timeout.0.min(STEP_TIMEOUT);
    let mut reached = None;
    let mut last_err = String::new();
    for addr in &addrs {
        match tokio::time::timeout(connect_limit, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                reached = Some((*addr, s));
                break;
            }
            Ok(Err(e)) => last_err = format!("connect to {addr} failed: {e}"),
            Err(_) => last_err = format!("connect to {addr} timed out after {connect_limit:?}"),
        }
    }
    let Some((addr, stream)) = reached else {
        let fix = if last_err.contains("timed out") {
            format!(
                "outgoing connections to port {} seem blocked by a firewall or your hosting provider (many block port 25): try the provider's port 587 (tls = \"starttls\") or 465 (tls = \"implicit\")",
                relay.port
            )
        } else {
            "check relay.host and relay.port: providers accept mail on port 587 (tls = \"starttls\") or 465 (tls = \"implicit\"); is the relay running?".to_string()
        };
        r.fail("tcp", last_err, fix);
        return;
    };
    r.ok("tcp", format!("connected to {addr}"));
    let step_limit = relay.command_timeout.0.min(STEP_TIMEOUT);
    if relay.tls != TlsModeConfig::Implicit {
        let mut io = BufReader::new(stream);
        let greeting = tokio::time::timeout(step_limit, read_reply(&mut io))
            .await
            .unwrap_or_else(|_| Err(format!("no greeting within {step_limit:?}")));
        let _ = io.get_mut().write_all(b"QUIT\r\n").await;
        match greeting {
            Ok(g) if g.starts_with('2') => r.ok("greeting", g),
            Ok(g) => {
                r.fail(
                    "greeting",
                    format!("{target} refuses the connection: {g}"),
                    "the relay does not accept mail from this machine: check with your provider that this server's IP address is allowed, or that you use the right host and port",
                );
                return;
            }
            Err(e) => {
                let fix = if e.contains("no greeting") {
                    format!(
                        "a server that waits silently is usually speaking TLS: for port 465 set tls = \"implicit\"; otherwise check relay.port ({})",
                        relay.port
                    )
                } else {
                    "relay.port points at something that is not a mail server: use the provider's submission port, 587 (tls = \"starttls\") or 465 (tls = \"implicit\")".to_string()
                };
                r.fail("greeting", format!("{target}: {e}"), fix);
                return;
            }
        }
    }

    // The OAuth2 token, before the session that logs in with it.
    if let Some(tokens) = sender.tokens()
        && !check_token(&format!("relay {}", relay.host), tokens, r).await
    {
        return;
    }

    // The real session: TLS, EHLO, AUTH, exactly as delivery opens it.
    let mut cfg = match sender.client_config(addr) {
        Ok(cfg) => cfg,
        Err(e) => {
            r.fail(
                "auth",
                e,
                "make the secret readable by relayq: relay.password_file, relay.password_env or relay.oauth2_token_file",
            );
            return;
        }
    };
    cfg.command_timeout = cfg.command_timeout.min(STEP_TIMEOUT);
    cfg.connect_timeout = connect_limit;
    let conn = match Connection::open(&cfg).await {
        Ok(c) => c,
        Err(e) => {
            report_open_error(&cfg, &e, r).await;
            return;
        }
    };
    if relay.tls == TlsModeConfig::Implicit {
        r.ok("greeting", "accepted (after the TLS handshake)");
    }
    let caps = conn.capabilities();
    r.ok("ehlo", format!("capabilities: {}", caps_line(&caps.raw)));
    match (cfg.tls, conn.tls_version()) {
        (TlsMode::None, _) => r.ok(
            "tls",
            format!(
                "none: clear text to {} (allowed because it is {})",
                relay.host,
                if relay.insecure {
                    "insecure = true"
                } else {
                    "a loopback address"
                }
            ),
        ),
        (_, version) => r.ok(
            "tls",
            format!(
                "{}, certificate verified for {}{}",
                version.unwrap_or_else(|| "TLS".into()),
                server_name(&cfg),
                if cfg.tls_options.pin_sha256.is_some() {
                    ", pin matched"
                } else {
                    ""
                }
            ),
        ),
    }
    match (&cfg.auth, conn.auth_mechanism()) {
        (Some(creds), Some(mech)) => r.ok(
            "auth",
            format!("logged in as {} with {}", creds.username, mech.name()),
        ),
        _ => r.ok(
            "auth",
            "no credentials configured; none sent (most providers require them: see username and password in the README)",
        ),
    }
    match &opts.send_to {
        Some(to) => send_test(config, conn, to, opts.from.as_deref(), &target, r).await,
        None => conn.quit().await,
    }
}

/// Gets a token from the relay's endpoint as delivery would: `ok` with
/// its lifetime, or FAIL with the provider's error and the fix. Never the
/// token itself.
pub(super) async fn check_token<W: Write>(
    relay: &str,
    tokens: &TokenSource,
    r: &mut Report<W>,
) -> bool {
    let name = format!("oauth2 token for {relay}");
    let s = tokens.settings();
    let got = tokio::time::timeout(STEP_TIMEOUT, tokens.token()).await;
    // After the request: the URL it went to.
    let how = format!(
        "{} {} grant from {}",
        s.provider.name(),
        s.grant.name(),
        tokens.token_url()
    );
    match got {
        Ok(Ok(token)) => {
            let left = token.expires_ms.saturating_sub(token.obtained_ms) / 1000;
            r.ok(
                &name,
                format!("expires in {}m{:02}s ({how})", left / 60, left % 60),
            );
            true
        }
        Ok(Err(e)) => {
            r.fail(&name, format!("{e} ({how})"), e.fix());
            false
        }
        Err(_) => {
            r.fail(
                &name,
                format!("no answer within {STEP_TIMEOUT:?} ({how})"),
                crate::transport::oauth2::advice::unreachable(&tokens.token_url()),
            );
            false
        }
    }
}

fn server_name(cfg: &ClientConfig) -> &str {
    if cfg.tls_options.server_name.is_empty() {
        &cfg.host
    } else {
        &cfg.tls_options.server_name
    }
}

fn caps_line(raw: &[String]) -> String {
    if raw.is_empty() {
        "none (the server answered HELO only)".to_string()
    } else {
        raw.join(", ")
    }
}

/// One FAIL line for the step `Connection::open` stopped at, after the ok
/// lines of the steps it passed.
async fn report_open_error<W: Write>(cfg: &ClientConfig, e: &SmtpError, r: &mut Report<W>) {
    let target = format!("{}:{}", cfg.host, cfg.addr.port());
    let tls_fix = "port 465 needs tls = \"implicit\"; ports 587 and 25 need tls = \"starttls\"";
    match e {
        SmtpError::Connect { .. } | SmtpError::ConnectTimeout { .. } => r.fail(
            "tcp",
            e.to_string(),
            "the relay stopped answering during the check; run it again",
        ),
        SmtpError::StartTlsNotOffered { .. } => {
            // Show what the server does offer: EHLO again, in clear text and
            // without credentials, so nothing secret is sent.
            let mut probe = cfg.clone();
            probe.tls = TlsMode::None;
            probe.auth = None;
            if let Ok(c) = Connection::open(&probe).await {
                r.ok("ehlo", format!("capabilities: {}", caps_line(&c.capabilities().raw)));
                c.quit().await;
            }
            r.fail(
                "tls",
                format!("{e} (tls = \"starttls\" is configured)"),
                format!(
                    "use your provider's STARTTLS port (usually 587) or tls = \"implicit\" with port 465; tls = \"none\" is only allowed for a relay on loopback. ({target} answered EHLO without STARTTLS)"
                ),
            );
        }
        SmtpError::Tls(TlsFailure::Verify { .. }) => r.fail(
            "tls",
            e.to_string(),
            "relay.host must be a name on the server's certificate (not an IP address); for a private CA set relay.ca_file to its PEM file",
        ),
        SmtpError::Tls(TlsFailure::PinMismatch { .. }) => r.fail(
            "tls",
            e.to_string(),
            "the server's certificate changed: verify the new one with your provider, then update relay.pin_sha256 (or remove the pin)",
        ),
        SmtpError::Tls(TlsFailure::Handshake { .. }) => r.fail("tls", e.to_string(), tls_fix),
        SmtpError::AuthRejected { reply } => {
            ehlo_ok_without_auth(cfg, r).await;
            let oauth2 = match cfg.auth.as_ref().map(|c| &c.secret) {
                Some(Secret::OAuth2(tokens)) => Some(tokens.settings()),
                _ => None,
            };
            let fix = advice::auth_refused(&reply.one_line(), &cfg.host, oauth2).unwrap_or_else(|| {
                "check relay.username and the password (password, password_file or password_env): many providers want an API key or an app password here, not the account password".into()
            });
            r.fail("auth", e.to_string(), fix)
        }
        SmtpError::OAuth2(token) => {
            ehlo_ok_without_auth(cfg, r).await;
            r.fail("auth", e.to_string(), token.fix())
        }
        SmtpError::AuthNotOffered
        | SmtpError::NoCommonAuthMechanism { .. }
        | SmtpError::AuthMechanismMismatch { .. } => {
            ehlo_ok_without_auth(cfg, r).await;
            r.fail(
                "auth",
                e.to_string(),
                "the relay offers no AUTH we can use on this connection: use the provider's submission port (587, AUTH is offered after STARTTLS), or remove the credentials if it allows this machine by IP address",
            )
        }
        SmtpError::CredentialsWithoutTls => r.fail(
            "auth",
            e.to_string(),
            "set tls = \"starttls\" or \"implicit\" so the password is never sent in clear text",
        ),
        SmtpError::Config(_) => r.fail(
            "tls",
            e.to_string(),
            "check relay.ca_file (a readable PEM file) and relay.pin_sha256 (64 hex digits)",
        ),
        other => {
            let stage = other.stage();
            let (name, fix) = match stage {
                "greeting" => (
                    "greeting",
                    "the relay does not accept mail from this machine: check with your provider that this server's IP address is allowed",
                ),
                "ehlo" | "helo" => (
                    "ehlo",
                    "the relay refused our EHLO name: set hostname to this machine's real, fully qualified name",
                ),
                "tls" | "starttls" => ("tls", tls_fix),
                "auth" => (
                    "auth",
                    "check relay.username and the password (password, password_file or password_env)",
                ),
                _ => (
                    "session",
                    "the relay broke off the session: check relay.host, relay.port and relay.tls",
                ),
            };
            r.fail(name, other.to_string(), fix);
        }
    }
}

/// After an AUTH failure: the EHLO (and TLS) steps passed; show them.
async fn ehlo_ok_without_auth<W: Write>(cfg: &ClientConfig, r: &mut Report<W>) {
    let mut probe = cfg.clone();
    probe.auth = None;
    if let Ok(c) = Connection::open(&probe).await {
        r.ok(
            "ehlo",
            format!("capabilities: {}", caps_line(&c.capabilities().raw)),
        );
        if let Some(v) = c.tls_version() {
            r.ok(
                "tls",
                format!("{v}, certificate verified for {}", server_name(cfg)),
            );
        }
        c.quit().await;
    }
}

/// Sends a real message through the open connection and prints the reply.
async fn send_test<W: Write>(
    config: &Config,
    mut conn: Connection,
    to: &str,
    from: Option<&str>,
    target: &str,
    r: &mut Report<W>,
) {
    let from = from
        .map(str::to_string)
        .unwrap_or_else(|| format!("postmaster@{}", config.hostname));
    let id = crate::spool::Spool::new_id();
    let body = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: relayq check: test message from {host}\r\nDate: {date}\r\nMessage-ID: <{id}.check@{host}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThis is a test message sent by `relayq check --send-to` on {host}\r\nthrough the relay {target}. No reply is needed.\r\n",
        host = config.hostname,
        date = crate::cleanup::trace::rfc5322_now(std::time::SystemTime::now()),
    );
    let rcpts = [to];
    let env = Envelope {
        from: &from,
        rcpts: &rcpts,
        smtputf8: !from.is_ascii() || !to.is_ascii(),
        smtputf8_required: false,
        eight_bit: false,
        dsn: None,
        rcpt_dsn: &[],
    };
    let sender_fix = format!(
        "the relay refuses the sender {from}: use an address or domain your provider has verified for this account (--from ADDR for the check, and your application's sender)"
    );
    match conn.send(&env, body.as_bytes()).await {
        Ok(report) => {
            let rcpt = report.rcpts.first();
            match (rcpt, &report.data) {
                (Some(rc), _) if !rc.is_positive() => r.fail(
                    "send",
                    format!("RCPT TO:<{to}> rejected: {}", rc.one_line()),
                    "the relay refused the recipient: check the address; some providers only relay from verified senders (--from ADDR)",
                ),
                (_, Some(d)) if d.is_positive() => r.ok(
                    "send",
                    format!("test message to <{to}> from <{from}> accepted: {}", d.one_line()),
                ),
                (_, Some(d)) => r.fail(
                    "send",
                    format!("the message to <{to}> was refused: {}", d.one_line()),
                    "read the relay's reply above: it usually names the policy (sender not verified, quota, content)",
                ),
                (_, None) => r.fail(
                    "send",
                    format!("the relay accepted no recipient for <{to}>"),
                    "check the address",
                ),
            }
        }
        Err(e @ SmtpError::Rejected { .. }) if e.stage() == "mail" => {
            r.fail("send", e.to_string(), sender_fix)
        }
        Err(e) => r.fail(
            "send",
            e.to_string(),
            "the relay broke off the transaction: run the check again; if it persists, ask your provider",
        ),
    }
    conn.quit().await;
}
