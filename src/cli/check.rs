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
//! ([`RelaySender::client_config`]), so a passing check means delivery can
//! connect and log in the same way.
//!
//! # Security
//! Nothing secret is printed: the AUTH line names the user name and the
//! mechanism, never the password, and upstream errors are already scrubbed
//! of credentials by the SMTP client. Credentials are only sent when the
//! config would send them in delivery too (same TLS rules).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::{Config, TlsModeConfig, TransportKind};
use crate::transport::relay::RelaySender;
use crate::transport::smtp::{ClientConfig, Connection, Envelope, SmtpError, TlsFailure, TlsMode};

/// No single network step of the check waits longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

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

    fn ok(&mut self, name: &str, detail: impl AsRef<str>) {
        let _ = writeln!(self.out, "ok   {name}: {}", one_line(detail.as_ref()));
    }

    fn fail(&mut self, name: &str, detail: impl AsRef<str>, fix: impl AsRef<str>) {
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
            r.fail(
                "config",
                format!("{e:#}"),
                "correct the key named above (every key is listed in the README's Configuration reference), then run relayq check again",
            );
            return false;
        }
    };
    match &config.source {
        Some(p) => r.ok("config", format!("{} parses", p.display())),
        None => r.ok(
            "config",
            format!(
                "no config file ({} not found): development default, mail is captured into a local Maildir",
                crate::config::DEFAULT_CONFIG_PATH
            ),
        ),
    }
    check_spool(&config, &mut r);
    for addr in &config.smtp.listen {
        check_listen(*addr, &mut r).await;
    }
    if let Some(addr) = config.status_listen {
        check_status_listen(addr, &mut r).await;
    }
    match config.transport_kind() {
        TransportKind::Relay => check_relay(&config, opts, &mut r).await,
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

fn check_spool<W: Write>(config: &Config, r: &mut Report<W>) {
    let dir = &config.spool_dir;
    let name = "spool";
    let min_free = config.smtp.min_free_space.0;
    let (probe, exists) = match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            r.fail(
                name,
                format!("{} exists but is not a directory", dir.display()),
                "set spool_dir to a directory, or remove the file",
            );
            return;
        }
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if mode & 0o022 != 0 {
                r.fail(
                    name,
                    format!(
                        "{} is writable by other users (mode {mode:04o}); relayq refuses to use it",
                        dir.display()
                    ),
                    format!("chmod 700 {}", dir.display()),
                );
                return;
            }
            if rustix::fs::access(
                dir,
                rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
            )
            .is_err()
            {
                r.fail(
                    name,
                    format!(
                        "{} is not writable by this user (owner uid {}, mode {mode:04o})",
                        dir.display(),
                        m.uid()
                    ),
                    format!(
                        "run the check as the user relayq runs as (sudo -u relayq relayq check), or chown -R relayq: {}",
                        dir.display()
                    ),
                );
                return;
            }
            (dir.clone(), true)
        }
        Err(_) => {
            // Not there yet: `relayq serve` creates it, if it can.
            let Some(parent) = dir.ancestors().skip(1).find(|p| p.exists()) else {
                r.fail(
                    name,
                    format!("{} does not exist", dir.display()),
                    "set spool_dir to an absolute path",
                );
                return;
            };
            if rustix::fs::access(parent, rustix::fs::Access::WRITE_OK).is_err() {
                r.fail(
                    name,
                    format!(
                        "{} does not exist and {} is not writable by this user",
                        dir.display(),
                        parent.display()
                    ),
                    format!(
                        "create it for the daemon's user: install -d -m 700 -o relayq {}",
                        dir.display()
                    ),
                );
                return;
            }
            (parent.to_path_buf(), false)
        }
    };
    let free = match rustix::fs::statvfs(&probe) {
        Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
        Err(e) => {
            r.fail(
                name,
                format!("cannot read free space of {}: {e}", probe.display()),
                "check that the file system is mounted",
            );
            return;
        }
    };
    if free < min_free {
        r.fail(
            name,
            format!(
                "only {} free on the spool's file system, below smtp.min_free_space ({}): new mail would be refused with 452",
                human_bytes(free),
                human_bytes(min_free)
            ),
            "free disk space, move spool_dir to a larger file system, or lower smtp.min_free_space",
        );
        return;
    }
    let state = if exists {
        "mode 0700 or stricter, writable".to_string()
    } else {
        "does not exist yet; relayq serve creates it with mode 0700".to_string()
    };
    r.ok(
        name,
        format!("{}: {state}, {} free", dir.display(), human_bytes(free)),
    );
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

async fn check_listen<W: Write>(addr: SocketAddr, r: &mut Report<W>) {
    let name = format!("listen {addr}");
    if !addr.ip().is_loopback() {
        r.fail(
            &name,
            "not a loopback address: anyone who can reach it could relay mail through your account",
            "listen on 127.0.0.1 or [::1] only",
        );
        return;
    }
    let what = "loopback only, so not an open relay";
    if addr.port() == 0 {
        r.ok(&name, format!("{what}; the port is chosen at start"));
        return;
    }
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            r.ok(&name, format!("{what}; the port is free"));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let greeting = smtp_greeting(addr, Duration::from_secs(5)).await;
            match greeting {
                Ok(g) if g.contains("relayq") => {
                    r.ok(&name, format!("{what}; a running relayq answers: {g}"))
                }
                Ok(g) => r.fail(
                    &name,
                    format!("the port is in use by another program, which answers: {g}"),
                    "stop that program (for Postfix: systemctl disable --now postfix) or choose another port in smtp.listen",
                ),
                Err(e) => r.fail(
                    &name,
                    format!("the port is in use by another program ({e})"),
                    "find it with `ss -ltnp` and stop it, or choose another port in smtp.listen",
                ),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => r.ok(
            &name,
            format!(
                "{what}; port {} is privileged: relayq needs CAP_NET_BIND_SERVICE (dist/relayq.service grants it) or root",
                addr.port()
            ),
        ),
        Err(e) => r.fail(
            &name,
            format!("cannot listen here: {e}"),
            "remove this address from smtp.listen (is IPv6 disabled for [::1]?)",
        ),
    }
}

async fn check_status_listen<W: Write>(addr: SocketAddr, r: &mut Report<W>) {
    let name = format!("status_listen {addr}");
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            r.ok(&name, "loopback only; the port is free");
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            match http_get(addr, "/healthz").await {
                Ok(body) if body.starts_with("ok") => {
                    r.ok(&name, "loopback only; a running relayq answers /healthz")
                }
                Ok(_) | Err(_) => r.fail(
                    &name,
                    "the port is in use by another program",
                    "choose another port for status_listen (find the program with `ss -ltnp`)",
                ),
            }
        }
        Err(e) => r.fail(
            &name,
            format!("cannot listen here: {e}"),
            "choose another loopback address or port for status_listen",
        ),
    }
}

/// The body of `GET path` on a local HTTP server, for the status check.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let work = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.take(64 * 1024).read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Connects and reads the SMTP greeting as one line of text.
async fn smtp_greeting(addr: SocketAddr, limit: Duration) -> Result<String, String> {
    let work = async {
        let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut io = BufReader::new(s);
        let g = read_reply(&mut io).await?;
        let _ = io.get_mut().write_all(b"QUIT\r\n").await;
        Ok(g)
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("no greeting within {limit:?}")))
}

/// Reads one SMTP reply (all its lines); refuses what is not SMTP.
async fn read_reply(io: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = io
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(if lines.is_empty() {
                "the server closed the connection without a greeting".into()
            } else {
                "the server closed the connection in the middle of its reply".into()
            });
        }
        total += n;
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let b = text.as_bytes();
        let code_ok = b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit);
        if !code_ok || (b.len() > 3 && b[3] != b' ' && b[3] != b'-') {
            let shown: String = text.chars().take(80).collect();
            return Err(format!("this is not an SMTP server: it said {shown:?}"));
        }
        let last = b.len() == 3 || b[3] == b' ';
        lines.push(text);
        if last || total > 64 * 1024 {
            break;
        }
    }
    Ok(lines.join(" / "))
}

async fn check_relay<W: Write>(config: &Config, opts: &Options, r: &mut Report<W>) {
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

    // The real session: TLS, EHLO, AUTH, exactly as delivery opens it.
    let mut cfg = sender.client_config(addr);
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
        SmtpError::AuthRejected { .. } => {
            ehlo_ok_without_auth(cfg, r).await;
            r.fail(
                "auth",
                e.to_string(),
                "check relay.username and the password (password, password_file or password_env): many providers want an API key or an app password here, not the account password",
            )
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
        date = crate::smtp::message::rfc5322_now(std::time::SystemTime::now()),
    );
    let rcpts = [to];
    let env = Envelope {
        from: &from,
        rcpts: &rcpts,
        smtputf8: !from.is_ascii() || !to.is_ascii(),
        eight_bit: false,
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

/// Prints the check to stdout; the process exit code follows the result.
pub async fn main(opts: &Options) -> bool {
    run(opts, std::io::stdout().lock()).await
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(64 * 1024 * 1024), "64.0 MB");
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
        check_spool(&config, &mut r);
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
        check_spool(&config, &mut r);
        assert_eq!(r.failures, 0, "{}", String::from_utf8_lossy(&buf));
    }
}
