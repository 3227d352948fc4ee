//! TLS and AUTH for the fake upstream: STARTTLS (advertised, then the
//! socket is upgraded and a fresh session starts), implicit TLS (the
//! handshake before the greeting), and AUTH PLAIN, LOGIN and XOAUTH2
//! against one user from the [`Script`], XOAUTH2 optionally against the
//! bearer tokens a fake token endpoint issued ([`TokenCheck`]).
//!
//! What a test needs to prove that nothing secret crossed the wire in clear
//! text is recorded here: each command line with whether TLS was up when it
//! arrived ([`Seen`]), each AUTH attempt with its TLS state and outcome
//! ([`AuthAttempt`]), and each handshake's result ([`Handshake`]). AUTH is
//! accepted in clear text too, on purpose: a client that wrongly logs in
//! before TLS must show up in the record, not be saved by the server.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{Closed, FakeUpstream, Script, Session, Shared, serve, trim_crlf};
use crate::support::pki::ServerCert;

/// A handshake that takes longer than this has failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the fake upstream offers TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Clear-text greeting, STARTTLS advertised in EHLO (port 587 style).
    StartTls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

#[derive(Clone, Debug)]
pub(super) struct ServerTls {
    mode: UpstreamTls,
    config: Arc<rustls::ServerConfig>,
}

/// One command line as received, with the connection's TLS state then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub conn: usize,
    pub tls: bool,
    pub line: String,
}

impl Seen {
    /// The command verb, upper case ("MAIL", "AUTH", ...).
    pub fn verb(&self) -> String {
        self.line
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase()
    }
}

/// One AUTH exchange, finished or abandoned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthAttempt {
    pub conn: usize,
    /// TLS was up when the AUTH command arrived.
    pub tls: bool,
    /// "PLAIN", "LOGIN", "XOAUTH2" (as the client named it, upper case).
    pub mechanism: String,
    /// The user name the client sent ("" if it could not be decoded).
    pub username: String,
    /// The credentials matched and 235 was sent.
    pub ok: bool,
}

/// The outcome of one TLS handshake (server side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handshake {
    pub conn: usize,
    /// `Err` with the error text when the client aborted (e.g. it did not
    /// trust the certificate) or the handshake timed out.
    pub result: Result<(), String>,
}

impl Script {
    /// Demand AUTH as `user` with `password` before MAIL.
    pub fn require_auth(mut self, user: &str, password: &str) -> Self {
        self.auth = Some((user.to_string(), password.to_string()));
        self
    }

    /// Demand AUTH XOAUTH2 as `user` with a bearer token from `tokens`
    /// before MAIL (passwords are refused).
    pub fn require_xoauth2(mut self, user: &str, tokens: TokenCheck) -> Self {
        self.auth = Some((user.to_string(), String::new()));
        self.auth_tokens = Some(tokens);
        self
    }

    /// Answer a failed AUTH with this reply.
    pub fn auth_failure(mut self, code: u16, text: &str) -> Self {
        self.auth_failure = Some((code, text.to_string()));
        self
    }

    /// Repeat the secret the client sent in the replies to a failed AUTH.
    pub fn echo_auth(mut self) -> Self {
        self.auth_echo = true;
        self
    }
}

/// The bearer tokens an upstream accepts: shared with the fake token
/// endpoint that issues them (and expires them).
#[derive(Clone, Default)]
pub struct TokenCheck(Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl TokenCheck {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn accept(&self, token: &str) {
        self.set().insert(token.to_string());
    }
    pub fn is_valid(&self, token: &str) -> bool {
        self.set().contains(token)
    }
    /// Every token accepted now.
    pub fn tokens(&self) -> Vec<String> {
        self.set().iter().cloned().collect()
    }
    /// Every token issued so far is expired (or revoked).
    pub fn expire_all(&self) {
        self.set().clear();
    }
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenCheck({} valid)", self.set().len())
    }
}

impl FakeUpstream {
    /// Starts with TLS offered as `mode` with certificate `cert`, and
    /// `script` in place before the first connection.
    pub async fn start_tls(mode: UpstreamTls, cert: &ServerCert, script: Script) -> FakeUpstream {
        let upstream = FakeUpstream::start_with(script).await;
        upstream.set_tls(mode, cert);
        upstream
    }

    /// Offers TLS (or switches the certificate) from the next connection on.
    pub fn set_tls(&self, mode: UpstreamTls, cert: &ServerCert) {
        self.shared.lock().tls = Some(ServerTls {
            mode,
            config: cert.config.clone(),
        });
    }

    /// Every command line received, with its TLS state, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// The command lines that arrived without TLS.
    pub fn clear_text(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| !s.tls).collect()
    }

    /// Every AUTH attempt, in order.
    pub fn auths(&self) -> Vec<AuthAttempt> {
        self.shared.lock().auths.clone()
    }

    /// Every TLS handshake, in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.shared.lock().handshakes.clone()
    }

    /// Waits until at least `n` handshakes finished (either way). Panics on
    /// timeout.
    pub async fn wait_for_handshakes(&self, n: usize, timeout: Duration) {
        self.wait_until(timeout, |s| s.handshakes.len() >= n)
            .await
            .unwrap_or_else(|report| {
                panic!("fake upstream: expected {n} TLS handshake(s) within {timeout:?}; {report}")
            });
    }
}

/// One accepted connection: implicit TLS first, or a clear session that
/// may be upgraded by STARTTLS.
pub(super) async fn serve_connection(tcp: TcpStream, conn: usize, shared: Arc<Shared>) {
    let tls = shared.lock().tls.clone();
    if let Some(ServerTls {
        mode: UpstreamTls::Implicit,
        config,
    }) = tls
    {
        if let Some(stream) = handshake(tcp, conn, &shared, config).await {
            serve(stream, conn, shared, true, true).await;
        }
        return;
    }
    let Some(tcp) = serve(tcp, conn, shared.clone(), false, true).await else {
        return;
    };
    let Some(config) = shared.lock().tls.as_ref().map(|t| t.config.clone()) else {
        return;
    };
    if let Some(stream) = handshake(tcp, conn, &shared, config).await {
        serve(stream, conn, shared, true, false).await;
    }
}

async fn handshake(
    tcp: TcpStream,
    conn: usize,
    shared: &Shared,
    config: Arc<rustls::ServerConfig>,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let accepting = TlsAcceptor::from(config).accept(tcp);
    let (stream, result) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accepting).await {
        Ok(Ok(stream)) => (Some(stream), Ok(())),
        Ok(Err(e)) => (None, Err(e.to_string())),
        Err(_) => (None, Err(format!("timed out after {HANDSHAKE_TIMEOUT:?}"))),
    };
    shared.lock().handshakes.push(Handshake { conn, result });
    shared.changed.notify_waiters();
    stream
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Notes a command line in both records.
    pub(super) fn record(&self, line: &str) {
        let mut state = self.shared.lock();
        state.commands.push((self.conn, line.to_string()));
        state.seen.push(Seen {
            conn: self.conn,
            tls: self.tls,
            line: line.to_string(),
        });
    }

    /// The stream for the STARTTLS handshake. Anything the client pipelined
    /// after STARTTLS was sent in clear text and is dropped with the buffer,
    /// as a server must (CVE-2011-0411).
    pub(super) fn into_stream(self) -> S {
        self.io.into_inner()
    }

    fn offers_starttls(&self) -> bool {
        !self.tls
            && self
                .shared
                .lock()
                .tls
                .as_ref()
                .is_some_and(|t| t.mode == UpstreamTls::StartTls)
    }

    /// The EHLO lines for STARTTLS and AUTH. AUTH is offered in clear text
    /// too (see the module comment).
    pub(super) fn secure_capabilities(&self, script: &Script) -> Vec<String> {
        let mut lines = Vec::new();
        if self.offers_starttls() {
            lines.push("STARTTLS".to_string());
        }
        if script.auth.is_some() {
            lines.push("AUTH PLAIN LOGIN XOAUTH2".to_string());
        }
        lines
    }

    pub(super) async fn starttls(&mut self, script: &Script) -> Result<(), Closed> {
        if self.tls {
            return self
                .std_reply(script, 503, "5.5.1", "Error: TLS already active")
                .await;
        }
        if !self.offers_starttls() {
            return self
                .std_reply(script, 502, "5.5.2", "Error: command not recognized")
                .await;
        }
        self.std_reply(script, 220, "2.0.0", "Ready to start TLS")
            .await?;
        Err(Closed::StartTls)
    }

    pub(super) async fn auth(&mut self, script: &Script, arg: &str) -> Result<(), Closed> {
        let Some((user, password)) = script.auth.clone() else {
            return self
                .std_reply(script, 502, "5.5.2", "Error: command not recognized")
                .await;
        };
        if self.helo.is_none() {
            return self
                .std_reply(script, 503, "5.5.1", "Error: send EHLO first")
                .await;
        }
        if self.authenticated.is_some() {
            return self
                .std_reply(script, 503, "5.5.1", "Error: already authenticated")
                .await;
        }
        if self.tx.is_some() {
            return self
                .std_reply(
                    script,
                    503,
                    "5.5.1",
                    "Error: AUTH not allowed in a transaction",
                )
                .await;
        }
        if let Some((code, text)) = &script.over_limit_at_auth
            && self.shared.refuse_over_limit(self.conn)
        {
            return self.reply(*code, text).await;
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim().to_string())),
            None => (arg.to_ascii_uppercase(), None),
        };
        let given = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(i) => Some(i),
                    None => self.challenge("").await?,
                };
                response.map(|r| decode_plain(&r))
            }
            "LOGIN" => {
                let name = match initial {
                    Some(i) => Some(i),
                    None => self.challenge("VXNlcm5hbWU6").await?,
                };
                match name {
                    Some(name) => self
                        .challenge("UGFzc3dvcmQ6")
                        .await?
                        .map(|pw| decode_login(&name, &pw)),
                    None => None,
                }
            }
            "XOAUTH2" => {
                let response = match initial {
                    Some(i) => Some(i),
                    None => self.challenge("").await?,
                };
                response.map(|r| decode_xoauth2(&r))
            }
            _ => {
                return self
                    .std_reply(script, 504, "5.5.4", "Unrecognized authentication type")
                    .await;
            }
        };
        let Some(decoded) = given else {
            self.note_auth(&mechanism, "", false);
            return self
                .std_reply(script, 501, "5.7.0", "Authentication cancelled")
                .await;
        };
        let (username, ok) = match (&decoded, &script.auth_tokens) {
            (Some((u, t)), Some(tokens)) => (
                u.clone(),
                mechanism == "XOAUTH2" && *u == user && tokens.is_valid(t),
            ),
            (Some((u, p)), None) => (u.clone(), *u == user && *p == password),
            (None, _) => (String::new(), false),
        };
        self.note_auth(&mechanism, &username, ok);
        if ok {
            self.authenticated = Some(username);
            return self
                .std_reply(script, 235, "2.7.0", "Authentication successful")
                .await;
        }
        if decoded.is_none() {
            return self
                .std_reply(script, 501, "5.5.2", "Cannot decode the response")
                .await;
        }
        let echo = match (&decoded, script.auth_echo) {
            (Some((_, secret)), true) => format!(" (you sent {secret})"),
            _ => String::new(),
        };
        if let Some((code, text)) = &script.auth_failure {
            return self.reply(*code, &format!("{text}{echo}")).await;
        }
        if mechanism == "XOAUTH2" {
            // Google's way: an error as a base64 JSON challenge; the client
            // answers with an empty line and then gets the final reply.
            let detail = if echo.is_empty() {
                String::new()
            } else {
                format!(r#","detail":"{echo}""#)
            };
            let error = BASE64.encode(format!(
                r#"{{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"{detail}}}"#
            ));
            self.challenge(&error).await?;
        }
        self.std_reply(
            script,
            535,
            "5.7.8",
            &format!("Authentication credentials invalid{echo}"),
        )
        .await
    }

    fn note_auth(&self, mechanism: &str, username: &str, ok: bool) {
        self.shared.lock().auths.push(AuthAttempt {
            conn: self.conn,
            tls: self.tls,
            mechanism: mechanism.to_string(),
            username: username.to_string(),
            ok,
        });
        self.shared.changed.notify_waiters();
    }

    /// Sends `334 text` and reads the client's line; `None` if it sent "*"
    /// to cancel.
    async fn challenge(&mut self, text: &str) -> Result<Option<String>, Closed> {
        self.reply(334, text).await?;
        let line = self.read_line().await?;
        let line = String::from_utf8_lossy(trim_crlf(&line)).into_owned();
        Ok((line != "*").then_some(line))
    }
}

fn decode(b64: &str) -> Option<String> {
    BASE64
        .decode(b64.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// RFC 4616: authzid NUL authcid NUL passwd.
fn decode_plain(response: &str) -> Option<(String, String)> {
    let text = decode(response)?;
    let mut parts = text.split('\0');
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let password = parts.next()?;
    parts
        .next()
        .is_none()
        .then(|| (user.to_string(), password.to_string()))
}

fn decode_login(user: &str, password: &str) -> Option<(String, String)> {
    Some((decode(user)?, decode(password)?))
}

/// "user=U\x01auth=Bearer TOKEN\x01\x01"
fn decode_xoauth2(response: &str) -> Option<(String, String)> {
    let text = decode(response)?;
    let mut user = None;
    let mut token = None;
    for field in text.split('\x01') {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u.to_string());
        } else if let Some(t) = field.strip_prefix("auth=Bearer ") {
            token = Some(t.to_string());
        }
    }
    Some((user?, token?))
}
