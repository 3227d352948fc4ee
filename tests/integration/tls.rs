//! TLS and AUTH to the upstream, end to end through the real relayq binary:
//! STARTTLS and implicit TLS with a test CA made at test time, AUTH PLAIN,
//! LOGIN and XOAUTH2, certificate pinning, and every way it must refuse to
//! go on: a certificate for another name, self-signed, expired, a wrong
//! pin, STARTTLS not offered, a wrong password. Each refusal is checked on
//! three sides: the mail is still queued, the log says why, and the fake
//! upstream's record shows that nothing (no AUTH, no MAIL) was said in
//! clear text. Python's aiosmtpd serves as an upstream nobody here wrote.
//!
//! This file has the shared helpers and the deliveries that must work;
//! `tls/refusals.rs` the sessions relayq must refuse, `tls/secrets.rs` the
//! handling of passwords, `tls/aiosmtpd.rs` the independent upstream.

mod aiosmtpd;
mod refusals;
mod secrets;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::Daemon;
use crate::support::pki::{CertKind, TestCa};
use crate::support::upstream::{FakeUpstream, Script, UpstreamTls};

const WAIT: Duration = Duration::from_secs(20);
const USER: &str = "apikey";
/// Distinctive, so a grep for it can't match anything else.
const PASSWORD: &str = "Zq8-relayq-s3cret-Kw47";
const FROM: &str = "app@example.com";
pub(crate) const TO: &str = "bob@example.net";

/// A test's directory (config, spool, PKI, secrets) and its CA.
struct Fixture {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new(&dir.path().join("pki"));
        Fixture { dir, ca }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a secret file with the given mode; returns its path.
    fn secret_file(&self, name: &str, secret: &str, mode: u32) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, format!("{secret}\n")).expect("write secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    fn start(&self, config: &str) -> Daemon {
        Daemon::start_in(self.path(), config)
    }
}

/// A relay config for the upstream at `up`, with `tls` and more `[relay]`
/// lines. Connections are kept for 30 s so that "one login per connection"
/// is measured, not the idle timer.
fn config(up: &FakeUpstream, tls: &str, relay_lines: &str) -> String {
    config_for(&up.addr().ip().to_string(), up.port(), tls, relay_lines)
}

fn config_for(host: &str, port: u16, tls: &str, relay_lines: &str) -> String {
    format!(
        "hostname = \"relayq.test\"\n\n[relay]\nhost = \"{host}\"\nport = {port}\ntls = \"{tls}\"\nconcurrency = 2\nconnect_timeout = \"2s\"\ncommand_timeout = \"10s\"\nidle_timeout = \"30s\"\n{relay_lines}\n"
    )
}

pub(crate) fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A message with its own Message-ID and Date, so relayq adds only
/// `Received:`.
pub(crate) fn message(n: usize) -> Vec<u8> {
    format!(
        "From: {FROM}\r\nTo: {TO}\r\nSubject: tls test {n}\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <tls-{n}@example.com>\r\n\r\nHello over TLS, message {n}.\r\n"
    )
    .into_bytes()
}

pub(crate) async fn send(d: &Daemon, n: usize) -> String {
    let reply = send_mail(d.addr, FROM, &[TO], &message(n)).await;
    assert!(reply.starts_with("250 2.0.0"), "relayq refused: {reply}");
    queue_id(&reply)
}

/// [`Daemon::wait_lines`] with this file's deadline.
pub(crate) async fn wait_lines(d: &Daemon, needles: &[&str], n: usize) -> Vec<String> {
    d.wait_lines(needles, n, WAIT).await
}

/// The delivery log line for `id`'s recipient with `status`.
pub(crate) async fn status_line(d: &Daemon, id: &str, status: &str, n: usize) -> String {
    let to = format!("{id}: to=<{TO}>");
    let status = format!("status={status}");
    wait_lines(d, &[&to, &status], n).await.remove(n - 1)
}

fn relay_name(up: &FakeUpstream) -> String {
    format!("127.0.0.1[127.0.0.1]:{}", up.port())
}

/// `relayq queue list` names the message, and its file is in `queue/`.
fn assert_still_queued(d: &Daemon, id: &str) {
    let out = d.cli(&["queue", "list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "queue list failed: {out:?}");
    assert!(listing.contains(id), "{id} not in the queue:\n{listing}");
    assert_eq!(d.queued(), 1, "queue/ should hold exactly the one message");
}

/// Everything said in clear text was EHLO, STARTTLS or QUIT; AUTH, MAIL,
/// RCPT and DATA only ever came over TLS; every AUTH attempt was over TLS.
fn assert_secrets_only_over_tls(up: &FakeUpstream) {
    for seen in up.clear_text() {
        assert!(
            matches!(seen.verb().as_str(), "EHLO" | "STARTTLS" | "QUIT"),
            "said in clear text: #{} {:?}; everything seen: {:#?}",
            seen.conn,
            seen.line,
            up.seen()
        );
    }
    for auth in up.auths() {
        assert!(auth.tls, "AUTH without TLS: {auth:?}");
    }
}

/// After a refused TLS session: no AUTH and no transaction, in clear text
/// or otherwise, on any connection.
fn assert_nothing_sent(up: &FakeUpstream) {
    assert_secrets_only_over_tls(up);
    assert!(up.auths().is_empty(), "AUTH attempted: {:?}", up.auths());
    let sent: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|s| matches!(s.verb().as_str(), "AUTH" | "MAIL" | "RCPT" | "DATA"))
        .collect();
    assert!(
        sent.is_empty(),
        "sent after a refused TLS session: {sent:?}"
    );
    assert!(up.messages().is_empty());
}

fn auth_script() -> Script {
    Script::default().require_auth(USER, PASSWORD)
}

fn password_file_lines(f: &Fixture) -> String {
    let file = f.secret_file("relay-password", PASSWORD, 0o600);
    format!(
        "username = \"{USER}\"\npassword_file = {}\n",
        toml_path(&file)
    )
}

fn ca_line(f: &Fixture) -> String {
    format!("ca_file = {}\n", toml_path(&f.ca.ca_file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_auth_plain_deliver_with_one_login_per_connection() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, auth_script()).await;
    let lines = format!("{}{}", ca_line(&f), password_file_lines(&f));
    let d = f.start(&config(&up, "starttls", &lines));

    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(send(&d, n).await);
    }
    let got = up.wait_for_messages(5, WAIT).await;
    for id in &ids {
        let line = status_line(&d, id, "sent", 1).await;
        assert!(
            line.contains(&format!("relay={}", relay_name(&up))),
            "the log line names the relay: {line}"
        );
    }
    for n in 0..5 {
        let body = message(n);
        let m = got
            .iter()
            .find(|m| m.data.ends_with(&body))
            .unwrap_or_else(|| panic!("message {n} did not arrive intact"));
        assert_eq!(
            (m.mail_from.as_str(), m.rcpts.clone()),
            (FROM, vec![TO.to_string()])
        );
    }

    // TLS came before AUTH and MAIL on every connection.
    assert_secrets_only_over_tls(&up);
    for conn in 1..=up.connections() {
        let verbs: Vec<String> = up
            .seen()
            .into_iter()
            .filter(|s| s.conn == conn)
            .map(|s| s.verb())
            .collect();
        let starttls = verbs.iter().position(|v| v == "STARTTLS");
        let auth = verbs.iter().position(|v| v == "AUTH");
        assert!(
            starttls.is_some() && starttls < auth,
            "connection #{conn} did not upgrade before AUTH: {verbs:?}"
        );
    }

    // Logged in once per connection, not once per message.
    let auths = up.auths();
    let auth_commands = up.seen().iter().filter(|s| s.verb() == "AUTH").count();
    assert_eq!(auth_commands, up.connections(), "{auths:?}");
    assert_eq!(auths.len(), up.connections());
    assert!(
        up.connections() <= 2,
        "5 messages over {} connections (concurrency is 2)",
        up.connections()
    );
    for a in &auths {
        assert!(a.ok && a.tls, "{a:?}");
        assert_eq!((a.mechanism.as_str(), a.username.as_str()), ("PLAIN", USER));
    }
    assert_eq!(d.count_log("readable by other users"), 0, "{}", d.log());
    assert!(!d.log().contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_with_auth_login_forced_and_a_server_name() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, auth_script()).await;
    let lines = format!(
        "{}{}auth_mechanism = \"login\"\ntls_server_name = \"relay.test\"\n",
        ca_line(&f),
        password_file_lines(&f)
    );
    let d = f.start(&config(&up, "starttls", &lines));
    let id = send(&d, 1).await;
    up.wait_for_messages(1, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    assert_secrets_only_over_tls(&up);
    let auths = up.auths();
    assert_eq!(auths.len(), 1, "{auths:?}");
    assert_eq!(auths[0].mechanism, "LOGIN");
    assert!(auths[0].ok && auths[0].tls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_with_auth_delivers() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let up = FakeUpstream::start_tls(UpstreamTls::Implicit, &cert, auth_script()).await;
    let lines = format!("{}{}", ca_line(&f), password_file_lines(&f));
    let d = f.start(&config(&up, "implicit", &lines));
    let id = send(&d, 1).await;
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(got[0].data.ends_with(&message(1)));
    let line = status_line(&d, &id, "sent", 1).await;
    assert!(line.contains(&relay_name(&up)), "{line}");
    // Not one byte of SMTP in clear text: TLS from the first byte.
    assert!(up.clear_text().is_empty(), "{:?}", up.clear_text());
    assert!(up.handshakes().iter().all(|h| h.result.is_ok()));
    let auths = up.auths();
    assert_eq!(auths.len(), 1);
    assert!(auths[0].ok && auths[0].tls && auths[0].mechanism == "PLAIN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xoauth2_token_from_a_file_delivers() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let token = "ya29.relayq-test-token-Qm3";
    let up = FakeUpstream::start_tls(
        UpstreamTls::StartTls,
        &cert,
        Script::default().require_auth(USER, token),
    )
    .await;
    let token_file = f.secret_file("token", token, 0o600);
    let lines = format!(
        "{}username = \"{USER}\"\noauth2_token_file = {}\n",
        ca_line(&f),
        toml_path(&token_file)
    );
    let d = f.start(&config(&up, "starttls", &lines));
    let id = send(&d, 1).await;
    up.wait_for_messages(1, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    let auths = up.auths();
    assert_eq!(auths.len(), 1);
    assert!(auths[0].ok && auths[0].tls && auths[0].mechanism == "XOAUTH2");
    assert!(!d.log().contains(token));
}

/// "AB:CD:..." upper case: the form `openssl x509 -fingerprint` prints.
fn openssl_style(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_pin_delivers() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let up = FakeUpstream::start_tls(UpstreamTls::StartTls, &cert, auth_script()).await;
    let lines = format!(
        "{}{}pin_sha256 = \"{}\"\n",
        ca_line(&f),
        password_file_lines(&f),
        openssl_style(&cert.sha256)
    );
    let d = f.start(&config(&up, "starttls", &lines));
    let id = send(&d, 1).await;
    up.wait_for_messages(1, WAIT).await;
    status_line(&d, &id, "sent", 1).await;
    assert_secrets_only_over_tls(&up);
}
