//! relayq's SMTP client to the upstream relay (the "relayhost").
//!
//! This module owns one outbound connection and everything said on it:
//! [`Connection::open`] connects, does implicit TLS or STARTTLS, reads the
//! greeting, says EHLO (HELO if EHLO is refused) and logs in once;
//! [`Connection::send`] runs one mail transaction and reports an outcome per
//! recipient; [`Connection::reset`] and [`Connection::quit`] end it. A delivery
//! worker keeps one connection for many messages, because relay providers
//! throttle clients that log in again for every message (nullmailer's flaw).
//!
//! Replies are read with our own buffered reader: pipelined replies often
//! arrive in one packet, and a reader that drops the bytes after one reply
//! desynchronises the session, which can duplicate or lose mail.
//!
//! Submodules: `wire` (the TCP-or-TLS stream, the reply reader, the DATA
//! encoder), `tls` (trust roots, server name, pinning, readable verification
//! errors), `auth` (SMTP AUTH mechanisms), `pipeline` (the next message's
//! envelope sent behind this one's end of data), `chunking` (whole
//! transactions streamed with BDAT, several in flight), `tests` (a scripted
//! server).
//!
//! # Security
//! The upstream is not trusted to be well behaved. A reply is capped at
//! [`MAX_REPLY_BYTES`] and every line must parse, or the session ends with a
//! protocol error. Certificates are always verified; STARTTLS that is not
//! offered is an error, never a fall-back to clear text, and bytes that arrive
//! before the TLS handshake are refused (STARTTLS command injection,
//! CVE-2011-0411). Credentials are only sent over TLS unless the caller
//! explicitly allows clear text (for a loopback upstream). Secrets print as
//! `<redacted>` and are scrubbed from upstream text quoted in errors. Envelope
//! addresses with control characters or angle brackets are never written (no
//! command injection from a crafted address), and the body is dot-stuffed after
//! every LF, bare or not, so no body content can end DATA early (SMTP
//! smuggling).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::Instrument;

mod auth;
mod chunking;
mod pipeline;
#[cfg(test)]
mod tests;
pub(crate) mod tls;
mod wire;

pub use chunking::{Chunked, Streamed};
pub use pipeline::{NextTxn, Opened, Pending, Sent, Written};

use super::oauth2::{TokenError, TokenSource};
use wire::{Stream, Wire};

/// Largest reply (all lines) accepted from the upstream.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Commands written per round trip when pipelining. Bounded so that a message
/// to thousands of recipients can't fill both sides' socket buffers and
/// deadlock (RFC 2920, section 3.1).
const PIPELINE_BATCH: usize = 100;
/// Size of the pieces the body is written in: the body is never copied whole.
const BODY_CHUNK: usize = 64 * 1024;
/// QUIT is a courtesy; never wait long for it.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Clear text (only sensible for a loopback upstream).
    None,
    /// Plain connect, then STARTTLS, required (port 587/25).
    StartTls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// Login details for the upstream.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub secret: Secret,
    /// `None`: pick the best mechanism the server offers.
    pub mechanism: Option<AuthMechanism>,
}

/// A password or an OAuth2 access token. Never printed.
#[derive(Clone)]
pub enum Secret {
    Password(String),
    OAuth2Token(String),
    /// Access tokens from relayq's own OAuth2 client, got before each
    /// login (and once more if the upstream refuses one; see `auth`).
    OAuth2(Arc<TokenSource>),
}

impl Secret {
    fn expose(&self) -> &str {
        match self {
            Secret::Password(s) | Secret::OAuth2Token(s) => s,
            Secret::OAuth2(_) => "",
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// SASL mechanisms relayq can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    Plain,
    Login,
    CramMd5,
    XOAuth2,
}

impl AuthMechanism {
    /// The name used in EHLO and in the AUTH command.
    pub fn name(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::Login => "LOGIN",
            AuthMechanism::CramMd5 => "CRAM-MD5",
            AuthMechanism::XOAuth2 => "XOAUTH2",
        }
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// A private CA (PEM). If set, used instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Hex SHA-256 of the leaf certificate (DER), colons and case ignored. If
    /// set, the leaf must match, in addition to normal verification.
    pub pin_sha256: Option<String>,
    /// The name verified against the certificate; empty means `ClientConfig::host`.
    pub server_name: String,
}

/// Everything needed to open a connection.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Already resolved by the caller.
    pub addr: SocketAddr,
    /// For logs and as the TLS server name when `tls_options.server_name` is empty.
    pub host: String,
    pub helo_name: String,
    pub tls: TlsMode,
    pub tls_options: TlsOptions,
    pub auth: Option<Credentials>,
    /// Send credentials over a clear-text connection. The caller sets this only
    /// for loopback upstreams.
    pub allow_plaintext_auth: bool,
    pub connect_timeout: Duration,
    /// Limit for each command's write and for each reply.
    pub command_timeout: Duration,
    /// Limit for each body chunk's write (a no-progress limit, not a limit on
    /// the whole body) and for the reply after the body.
    pub data_timeout: Duration,
}

impl ClientConfig {
    /// STARTTLS, no AUTH, and RFC 5321's suggested timeouts (as Postfix uses).
    pub fn new(addr: SocketAddr, host: impl Into<String>, helo_name: impl Into<String>) -> Self {
        let host = host.into();
        ClientConfig {
            addr,
            tls_options: TlsOptions {
                server_name: host.clone(),
                ..TlsOptions::default()
            },
            host,
            helo_name: helo_name.into(),
            tls: TlsMode::StartTls,
            auth: None,
            allow_plaintext_auth: false,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
        }
    }
}

/// One SMTP reply, possibly of several lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// RFC 3463 code from the first line, if the server sent one.
    pub enhanced: Option<(u8, u16, u16)>,
    /// Every line's text after "ddd-" or "ddd ", joined with "\n", as received
    /// (so it still starts with the enhanced code when there is one).
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        let text = text.into();
        let enhanced = parse_enhanced(code, &text);
        Reply {
            code,
            enhanced,
            text,
        }
    }

    /// 2xx: the command succeeded.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    /// 3xx: go on (354 to DATA, 334 during AUTH).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }
    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// "5.1.1": the enhanced code, or one derived from the basic code.
    pub fn status(&self) -> String {
        match self.enhanced {
            Some((class, subject, detail)) => format!("{class}.{subject}.{detail}"),
            None => format!("{}.0.0", self.code / 100),
        }
    }

    /// "550 5.1.1 user unknown": code and all lines joined by spaces, verbatim,
    /// for logs and DSNs.
    pub fn one_line(&self) -> String {
        let text = self.text.replace('\n', " ");
        if text.is_empty() {
            self.code.to_string()
        } else {
            format!("{} {text}", self.code)
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// Reads "d.ddd.ddd" at the start of the first line; its class must match the
/// basic code, as RFC 3463 requires, or it is someone's prose, not a code.
fn parse_enhanced(code: u16, text: &str) -> Option<(u8, u16, u16)> {
    let first = text.split('\n').next()?;
    let token = first.split(' ').next()?;
    let mut parts = token.split('.');
    let class: u8 = parse_digits(parts.next()?, 1)?.try_into().ok()?;
    let subject = parse_digits(parts.next()?, 3)?;
    let detail = parse_digits(parts.next()?, 3)?;
    if parts.next().is_some() || u16::from(class) != code / 100 {
        return None;
    }
    Some((class, subject, detail))
}

fn parse_digits(s: &str, max_len: usize) -> Option<u16> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// What the server said it supports in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// RFC 3030: the message may be sent with BDAT instead of DATA.
    pub chunking: bool,
    /// `Some(0)` when SIZE is offered without a fixed limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// RFC 3461 delivery status notifications.
    pub dsn: bool,
    pub starttls: bool,
    /// Mechanism names, upper case.
    pub auth: Vec<String>,
    pub enhanced_status_codes: bool,
    /// Every extension line as received (the greeting line excluded).
    pub raw: Vec<String>,
    /// The first line of the EHLO reply: the server's name, then prose.
    pub greeting: String,
}

impl Capabilities {
    /// The first line of the EHLO reply, as a reply (for the loop check).
    fn greeting_line(&self) -> Reply {
        Reply::new(250, self.greeting.clone())
    }

    /// Parses a positive EHLO reply; a HELO session has the default (nothing).
    pub fn from_ehlo(reply: &Reply) -> Self {
        let mut caps = Capabilities {
            greeting: reply.text.split('\n').next().unwrap_or("").to_string(),
            ..Capabilities::default()
        };
        for line in reply.text.split('\n').skip(1) {
            caps.raw.push(line.to_string());
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "CHUNKING" => caps.chunking = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "STARTTLS" => caps.starttls = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "AUTH" => caps.add_auth(words),
                // Pre-RFC 2554 servers (old Exchange) say "AUTH=LOGIN PLAIN".
                k if k.starts_with("AUTH=") => {
                    caps.add_auth(std::iter::once(&k["AUTH=".len()..]).chain(words));
                }
                _ => {}
            }
        }
        caps
    }

    fn add_auth<'a>(&mut self, names: impl Iterator<Item = &'a str>) {
        for name in names {
            let name = name.to_ascii_uppercase();
            if !name.is_empty() && !self.auth.contains(&name) {
                self.auth.push(name);
            }
        }
    }
}

/// The sender and recipients of one transaction.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// "" for the null sender (bounces).
    pub from: &'a str,
    pub rcpts: &'a [&'a str],
    /// The sender asked for SMTPUTF8: it is passed on when offered.
    pub smtputf8: bool,
    /// The message cannot be relayed without SMTPUTF8: UTF-8 in an address
    /// or header (a non-ASCII address implies it). Without SMTPUTF8
    /// offered, it is not sent ([`SmtpError::SmtpUtf8NotOffered`]).
    pub smtputf8_required: bool,
    /// The body has 8-bit content: sent as BODY=8BITMIME when offered.
    /// For an upstream without 8BITMIME the caller converts the body first
    /// (`cleanup::seven_bit`), as Postfix does unless
    /// `disable_mime_output_conversion` is set.
    pub eight_bit: bool,
    /// RET and ENVID (RFC 3461), passed on when the upstream offers DSN.
    pub dsn: Option<&'a crate::spool::Dsn>,
    /// NOTIFY and ORCPT per recipient, in the order of `rcpts` (or empty),
    /// passed on when the upstream offers DSN.
    pub rcpt_dsn: &'a [crate::spool::RcptDsn],
}

/// What the upstream said about one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnReport {
    /// One per recipient, in envelope order. A recipient whose address could
    /// not be written safely gets a local 501 5.1.3 reply ("relayq: ...") and
    /// is never sent.
    pub rcpts: Vec<Reply>,
    /// The reply after the body, or the 4xx/5xx refusal of DATA itself (which
    /// then applies to every accepted recipient). `None` if no recipient was
    /// accepted, so no body was sent.
    pub data: Option<Reply>,
}

/// Where in the session something happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Tls,
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    /// The body, and a refusal in reply to it.
    Body,
    /// Waiting for the reply to the final dot (or to the last BDAT
    /// chunk): the whole message was sent, so if the connection fails now
    /// the upstream may have taken it.
    Dot,
    /// A BDAT command and its chunk.
    Bdat,
    Rset,
    Quit,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Tls => "tls",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "ehlo",
            Stage::Helo => "helo",
            Stage::StartTls => "starttls",
            Stage::Auth => "auth",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Body => "body",
            Stage::Dot => "dot",
            Stage::Bdat => "bdat",
            Stage::Rset => "rset",
            Stage::Quit => "quit",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Dot => f.write_str("end of data"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// "during body", or for a failure after the final dot what Postfix says
/// too: the message may have been accepted, and will be sent again.
fn during(stage: &Stage) -> String {
    match stage {
        Stage::Dot => "after the end of data -- message may be sent more than once".into(),
        other => format!("during {other}"),
    }
}

/// Why TLS failed, worded for an operator.
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    #[error("certificate verification failed for {server_name}: {reason}")]
    Verify { server_name: String, reason: String },
    #[error(
        "certificate pin mismatch for {server_name}: expected sha256 {expected}, server presented {actual}"
    )]
    PinMismatch {
        server_name: String,
        expected: String,
        actual: String,
    },
    #[error("TLS handshake with {server_name} failed: {reason}")]
    Handshake { server_name: String, reason: String },
}

/// Everything that can go wrong talking to the upstream. Only
/// [`SmtpError::is_permanent`] errors may bounce mail; all others keep it queued.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("invalid relay configuration: {0}")]
    Config(String),
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("I/O error {}: {source}", during(stage))]
    Io { stage: Stage, source: io::Error },
    #[error("connection closed by the server {}", during(stage))]
    Closed { stage: Stage },
    #[error("timed out after {after:?} {}", during(stage))]
    Timeout { stage: Stage, after: Duration },
    #[error("protocol error during {stage}: {detail}")]
    Protocol { stage: Stage, detail: String },
    #[error("{stage} rejected: {reply}")]
    Rejected { stage: Stage, reply: Reply },
    #[error("{0}")]
    Tls(TlsFailure),
    #[error("{host} does not offer STARTTLS; refusing to continue in clear text")]
    StartTlsNotOffered { host: String },
    #[error("authentication rejected: {reply}")]
    AuthRejected { reply: Reply },
    #[error("credentials are configured but the server does not offer AUTH")]
    AuthNotOffered,
    #[error("no usable AUTH mechanism; the server offers: {}", offered.join(" "))]
    NoCommonAuthMechanism { offered: Vec<String> },
    #[error("AUTH {mechanism} cannot be used with {secret_kind}")]
    AuthMechanismMismatch {
        mechanism: &'static str,
        secret_kind: &'static str,
    },
    #[error("refusing to send credentials over a connection without TLS")]
    CredentialsWithoutTls,
    /// No OAuth2 access token could be had (the token source logged why).
    #[error("no OAuth2 token: {0}")]
    OAuth2(TokenError),
    #[error(
        "relayq did not send the message: it needs SMTPUTF8 (UTF-8 in an address or header), but host {host} does not offer SMTPUTF8"
    )]
    SmtpUtf8NotOffered { host: String },
    #[error("invalid sender address {address:?}: {reason}")]
    InvalidSender {
        address: String,
        reason: &'static str,
    },
    #[error("connection is unusable after an earlier error")]
    Unusable,
    /// The upstream greeted us, or answered EHLO, with our own host name:
    /// the relay is relayq itself (Postfix: "mail for ... loops back to
    /// myself").
    #[error("mail for {host} loops back to myself: it {said} with my own hostname {name}")]
    Loop {
        host: String,
        said: &'static str,
        name: String,
    },
}

impl SmtpError {
    /// True when retrying can't help: a 5xx reply to MAIL, or an envelope the
    /// upstream can't take. 530 to MAIL ("authentication required") is the
    /// exception: it means our relay settings are wrong, not the message, so
    /// mail stays queued while an operator fixes them. Everything else
    /// (greeting 554, 535 to AUTH, TLS failures, timeouts) keeps mail queued.
    pub fn is_permanent(&self) -> bool {
        match self {
            SmtpError::Rejected {
                stage: Stage::Mail,
                reply,
            } => reply.is_permanent() && reply.code != 530,
            SmtpError::SmtpUtf8NotOffered { .. } | SmtpError::InvalidSender { .. } => true,
            _ => false,
        }
    }

    /// The enhanced status code (RFC 3463) for a recipient this error
    /// leaves undelivered, as Postfix logs them: `4.4.1` no answer from the
    /// host, `4.4.2` connection lost, `4.7.5` TLS failed, `4.7.8` login
    /// refused, the upstream's own code for its replies. The class is `5`
    /// only for an error that fails the message ([`SmtpError::is_permanent`]).
    pub fn dsn(&self) -> String {
        let code = match self {
            SmtpError::Rejected { reply, .. } | SmtpError::AuthRejected { reply } => reply.status(),
            SmtpError::Config(_) => "4.3.5".into(),
            SmtpError::Connect { .. } | SmtpError::ConnectTimeout { .. } => "4.4.1".into(),
            SmtpError::Io { .. }
            | SmtpError::Closed { .. }
            | SmtpError::Timeout { .. }
            | SmtpError::Unusable => "4.4.2".into(),
            SmtpError::Protocol { .. } => "4.5.0".into(),
            SmtpError::Tls(_) => "4.7.5".into(),
            SmtpError::StartTlsNotOffered { .. } => "4.7.4".into(),
            SmtpError::AuthNotOffered
            | SmtpError::NoCommonAuthMechanism { .. }
            | SmtpError::AuthMechanismMismatch { .. }
            | SmtpError::CredentialsWithoutTls
            | SmtpError::OAuth2(_) => "4.7.0".into(),
            SmtpError::SmtpUtf8NotOffered { .. } => "5.6.7".into(),
            SmtpError::InvalidSender { .. } => "5.1.7".into(),
            SmtpError::Loop { .. } => "4.4.6".into(),
        };
        let class = if self.is_permanent() { '5' } else { '4' };
        let mut code = code;
        code.replace_range(..1, &class.to_string());
        code
    }

    /// Where it happened, for logs and metrics labels.
    pub fn stage(&self) -> &'static str {
        match self {
            SmtpError::Config(_) => "config",
            SmtpError::Connect { .. } | SmtpError::ConnectTimeout { .. } => "connect",
            SmtpError::Io { stage, .. }
            | SmtpError::Closed { stage }
            | SmtpError::Timeout { stage, .. }
            | SmtpError::Protocol { stage, .. }
            | SmtpError::Rejected { stage, .. } => stage.as_str(),
            SmtpError::Tls(_) => "tls",
            SmtpError::StartTlsNotOffered { .. } => "starttls",
            SmtpError::AuthRejected { .. }
            | SmtpError::AuthNotOffered
            | SmtpError::NoCommonAuthMechanism { .. }
            | SmtpError::AuthMechanismMismatch { .. }
            | SmtpError::CredentialsWithoutTls => "auth",
            SmtpError::OAuth2(_) => "oauth2",
            SmtpError::SmtpUtf8NotOffered { .. } | SmtpError::InvalidSender { .. } => "mail",
            SmtpError::Unusable => "session",
            SmtpError::Loop { .. } => "loop",
        }
    }

    /// Decided by relayq, not said by the upstream: a bounce must not
    /// name the upstream as the one who refused.
    pub fn is_local(&self) -> bool {
        matches!(
            self,
            SmtpError::SmtpUtf8NotOffered { .. } | SmtpError::InvalidSender { .. }
        )
    }

    /// A `421` to the RSET or MAIL that opens a transaction: the relay
    /// ended the session before the transaction began, so nothing of the
    /// message was taken and the message is not to blame (the `421` is
    /// the relay pushing back on the connection). Said to a message that
    /// went out behind another, it is that message's no more than the
    /// connection's.
    pub fn closed_before_transaction(&self) -> bool {
        matches!(
            self,
            SmtpError::Rejected {
                stage: Stage::Rset | Stage::Mail,
                reply,
            } if reply.code == 421
        )
    }

    /// No reply came, not even to the RSET heading the transaction (or a
    /// 421 came in its place): the connection was dead (closed, reset or
    /// timed out by the relay while idle) before anything was read from
    /// it, so nothing of the transaction was taken. Only where no body
    /// could go before that reply: DATA waits for 354, and a BDAT stream
    /// sends that RSET alone first (`chunking`).
    pub fn connection_was_stale(&self) -> bool {
        is_stale(self)
    }

    /// Errors after which the server and we still agree where we are.
    fn leaves_session_in_sync(&self) -> bool {
        match self {
            // A refused RSET leaves the replies to what followed it in the
            // same group unread.
            SmtpError::Rejected {
                stage: Stage::Rset, ..
            } => false,
            SmtpError::Rejected { reply, .. } => reply.code != 421,
            SmtpError::SmtpUtf8NotOffered { .. } | SmtpError::InvalidSender { .. } => true,
            _ => false,
        }
    }
}

/// Why an address can't be written into a command, if it can't.
fn address_problem(addr: &str) -> Option<&'static str> {
    if addr.chars().any(char::is_control) {
        Some("contains control characters")
    } else if addr.contains(['<', '>']) {
        Some("contains angle brackets")
    } else {
        None
    }
}

/// A command of the envelope phase.
#[derive(Debug)]
enum Step {
    /// Ends the previous transaction; sent in the same write as the next
    /// MAIL when the upstream pipelines (saves a round trip per message).
    Rset,
    Mail(String),
    /// Index into the envelope's recipients.
    Rcpt(usize, String),
    Data,
    /// "BDAT <size> LAST": with CHUNKING, in place of DATA; the chunk
    /// follows the command line (see `chunking`).
    Bdat(String),
}

impl Step {
    fn line(&self) -> &str {
        match self {
            Step::Rset => "RSET\r\n",
            Step::Mail(line) | Step::Rcpt(_, line) | Step::Bdat(line) => line,
            Step::Data => "DATA\r\n",
        }
    }

    fn stage(&self) -> Stage {
        match self {
            Step::Rset => Stage::Rset,
            Step::Mail(_) => Stage::Mail,
            Step::Rcpt(..) => Stage::Rcpt,
            Step::Data => Stage::Data,
            Step::Bdat(_) => Stage::Bdat,
        }
    }
}

/// An error reading the reply to a pipelined RSET: the connection was dead
/// before this transaction began. A 421 in its place is the same: on a
/// kept connection it is nearly always the relay's idle timeout ("421
/// 4.4.2 Timeout exceeded"), said while the connection sat idle and read
/// only now, not an answer to this message.
fn is_stale(e: &SmtpError) -> bool {
    match e {
        SmtpError::Closed { stage: Stage::Rset }
        | SmtpError::Io {
            stage: Stage::Rset, ..
        } => true,
        SmtpError::Rejected {
            stage: Stage::Rset,
            reply,
        } => reply.code == 421,
        _ => false,
    }
}

/// An envelope ready to go out.
enum Planned {
    /// The commands, and the replies known without asking.
    Steps(Vec<Step>, EnvelopeReplies),
    /// No recipient can be written: this is the report, nothing is sent.
    Nothing(TxnReport),
}

/// Where a transaction stands once its envelope is answered.
enum Settled {
    /// 354: the server waits for the body. The recipients' replies.
    GoAhead(Vec<Reply>),
    /// No body goes out: the transaction's report.
    Over(TxnReport),
}

/// Replies collected during the envelope phase.
#[derive(Debug)]
struct EnvelopeReplies {
    mail: Option<Reply>,
    rcpts: Vec<Option<Reply>>,
    data: Option<Reply>,
}

impl EnvelopeReplies {
    fn record(&mut self, step: &Step, reply: Reply) {
        match step {
            Step::Rset => {}
            Step::Mail(_) => self.mail = Some(reply),
            Step::Rcpt(i, _) => self.rcpts[*i] = Some(reply),
            Step::Data | Step::Bdat(_) => self.data = Some(reply),
        }
    }

    fn mail_refused(&self) -> bool {
        self.mail.as_ref().is_some_and(|r| !r.is_positive())
    }

    /// Each recipient's reply, once MAIL was accepted; the refusal of
    /// MAIL (or its missing reply) as the transaction's error.
    fn rcpt_replies(&mut self) -> Result<Vec<Reply>, SmtpError> {
        match self.mail.take() {
            Some(mail) if mail.is_positive() => {}
            Some(mail) => {
                return Err(SmtpError::Rejected {
                    stage: Stage::Mail,
                    reply: mail,
                });
            }
            None => {
                return Err(SmtpError::Protocol {
                    stage: Stage::Mail,
                    detail: "no reply to MAIL".into(),
                });
            }
        }
        Ok(std::mem::take(&mut self.rcpts)
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Reply::new(451, "4.3.0 relayq: no reply to RCPT")))
            .collect())
    }

    fn any_rcpt_accepted(&self) -> bool {
        self.rcpts.iter().flatten().any(Reply::is_positive)
    }
}

/// One open session with the upstream.
pub struct Connection {
    wire: Wire,
    caps: Capabilities,
    peer: SocketAddr,
    tls_version: Option<String>,
    auth_mechanism: Option<AuthMechanism>,
    command_timeout: Duration,
    data_timeout: Duration,
    /// Set after an error that leaves the session out of step (421, I/O,
    /// timeout, garbage): the only safe thing left is to close.
    broken: bool,
    /// A RSET is owed before the next MAIL (see [`Connection::reset`]).
    pending_rset: bool,
    /// The server said 354 to a transaction pipelined behind the previous
    /// end of data and waits for its body ([`Connection::send_opened`]).
    awaiting_body: bool,
    /// Replies to an envelope pipelined behind the previous end of data
    /// are still to be read ([`Connection::settle_next`]).
    awaiting_replies: bool,
    /// A body was written and the reply to it is still to be read
    /// ([`Connection::read_written`]).
    awaiting_dot: bool,
    /// Transactions streamed with BDAT whose replies are still to be read
    /// ([`Connection::settle_chunked`]), oldest first.
    in_flight: usize,
    /// A reply to a streamed transaction could not be read (or was 421):
    /// the replies to the ones behind it never will be.
    replies_lost: bool,
    /// How this connection was opened, to open it again if it went stale
    /// while idle.
    cfg: ClientConfig,
    span: tracing::Span,
}

impl Connection {
    /// Connects and gets the session ready for mail: TLS, EHLO, AUTH.
    pub async fn open(cfg: &ClientConfig) -> Result<Connection, SmtpError> {
        Self::open_noting(cfg, &|| {}).await
    }

    /// [`Connection::open`], calling `step` each time the server lets the
    /// session past one more step (TCP, TLS, greeting, EHLO, STARTTLS,
    /// AUTH): how far an attempt got, which a refusal of one more
    /// connection is counted by (`transport::openings`).
    pub async fn open_noting(
        cfg: &ClientConfig,
        step: &(dyn Fn() + Sync),
    ) -> Result<Connection, SmtpError> {
        let span = tracing::debug_span!("smtp", host = %cfg.host, peer = %cfg.addr);
        Self::open_inner(cfg, span.clone(), step)
            .instrument(span)
            .await
    }

    async fn open_inner(
        cfg: &ClientConfig,
        span: tracing::Span,
        step: &(dyn Fn() + Sync),
    ) -> Result<Connection, SmtpError> {
        if cfg.auth.is_some() && cfg.tls == TlsMode::None && !cfg.allow_plaintext_auth {
            return Err(SmtpError::CredentialsWithoutTls);
        }
        check_helo_name(&cfg.helo_name)?;
        // The token first: no connection is opened (and left waiting) while
        // the token endpoint is slow or down.
        let token = match &cfg.auth {
            Some(Credentials {
                secret: Secret::OAuth2(source),
                ..
            }) => Some(source.token().await.map_err(SmtpError::OAuth2)?),
            _ => None,
        };
        // Built before connecting, so a bad CA file or pin fails without
        // bothering the upstream.
        let tls = match cfg.tls {
            TlsMode::None => None,
            TlsMode::StartTls | TlsMode::Implicit => {
                Some(tls::TlsSetup::new(&cfg.tls_options, &cfg.host).await?)
            }
        };
        let limit = cfg.command_timeout;
        let tcp = connect(cfg.addr, cfg.connect_timeout).await?;
        step();
        let (mut wire, mut tls_version) = match (&tls, cfg.tls) {
            (Some(setup), TlsMode::Implicit) => {
                let stream = setup.handshake(tcp, limit).await?;
                step();
                let version = tls::version_name(&stream);
                (Wire::new(Stream::Tls(Box::new(stream))), version)
            }
            _ => (Wire::new(Stream::Plain(tcp)), None),
        };
        let greeting = wire.read_reply(Stage::Greeting, limit).await?;
        if !greeting.is_positive() {
            return Err(SmtpError::Rejected {
                stage: Stage::Greeting,
                reply: greeting,
            });
        }
        step();
        check_loop(&greeting, cfg, "greeted me")?;
        let mut caps = hello(&mut wire, &cfg.helo_name, limit).await?;
        step();
        check_loop(&caps.greeting_line(), cfg, "answered EHLO")?;
        if let (Some(setup), TlsMode::StartTls) = (&tls, cfg.tls) {
            if !caps.starttls {
                return Err(SmtpError::StartTlsNotOffered {
                    host: cfg.host.clone(),
                });
            }
            let reply = wire.command("STARTTLS\r\n", Stage::StartTls, limit).await?;
            if reply.code != 220 {
                return Err(SmtpError::Rejected {
                    stage: Stage::StartTls,
                    reply,
                });
            }
            step();
            let stream = setup
                .handshake(wire.into_tcp_for_starttls()?, limit)
                .await?;
            step();
            tls_version = tls::version_name(&stream);
            wire = Wire::new(Stream::Tls(Box::new(stream)));
            // RFC 3207: forget what was said in clear text and ask again.
            caps = hello(&mut wire, &cfg.helo_name, limit).await?;
            step();
        }
        let auth_mechanism = match &cfg.auth {
            Some(creds) => {
                if !wire.is_tls() && !cfg.allow_plaintext_auth {
                    return Err(SmtpError::CredentialsWithoutTls);
                }
                let mechanism = auth::login(&mut wire, creds, token, &caps.auth, limit).await?;
                step();
                Some(mechanism)
            }
            None => None,
        };
        tracing::debug!(tls = ?tls_version, auth = ?auth_mechanism.map(AuthMechanism::name), "session ready");
        Ok(Connection {
            wire,
            caps,
            peer: cfg.addr,
            tls_version,
            auth_mechanism,
            command_timeout: cfg.command_timeout,
            data_timeout: cfg.data_timeout,
            broken: false,
            pending_rset: false,
            awaiting_body: false,
            awaiting_replies: false,
            awaiting_dot: false,
            in_flight: 0,
            replies_lost: false,
            cfg: cfg.clone(),
            span,
        })
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// "TLSv1.3", "TLSv1.2", or `None` in clear text.
    pub fn tls_version(&self) -> Option<String> {
        self.tls_version.clone()
    }

    /// The mechanism used to log in, if we did.
    pub fn auth_mechanism(&self) -> Option<AuthMechanism> {
        self.auth_mechanism
    }

    /// A RSET is owed before the next transaction: the connection was
    /// kept from before (see [`Connection::reset`]).
    pub fn owes_rset(&self) -> bool {
        self.pending_rset
    }

    /// False after an error that left the session out of step; the worker
    /// should drop this connection and open a new one.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Runs one transaction. `body` has CRLF line endings and is not yet
    /// dot-stuffed. `Err` means the upstream did not take the message for
    /// anyone (if the line drops after the body, before the reply, it may
    /// have: retrying then risks a duplicate, as with any SMTP client). After
    /// an error, RSET if [`Connection::is_usable`], else reconnect.
    pub async fn send(&mut self, env: &Envelope<'_>, body: &[u8]) -> Result<TxnReport, SmtpError> {
        self.send_then(env, body, None).await.this
    }

    /// Like [`Connection::send`]; in addition, when the server pipelines,
    /// `next` (an envelope and its body's size) goes out right behind this
    /// body's end of data, in the same write (see `pipeline`).
    pub async fn send_then(
        &mut self,
        env: &Envelope<'_>,
        body: &[u8],
        next: Option<(&Envelope<'_>, usize)>,
    ) -> Sent {
        self.abandon_open();
        if self.broken {
            return Sent::alone(Err(SmtpError::Unusable));
        }
        let owed_rset = self.pending_rset;
        let span = self.span.clone();
        let mut sent = self.transaction(env, body, next).instrument(span).await;
        if owed_rset
            && let Err(e) = &sent.this
            && (is_stale(e) || e.closed_before_transaction())
        {
            // The connection died while idle (the upstream timed it out or
            // restarted); nothing of this transaction was accepted, since
            // not even the RSET was answered, or it was answered 421 (and
            // `next` was not written, as it only follows a body). Or the
            // relay answered the MAIL of a kept connection 421: it ended the
            // session before this message's transaction began (as Postfix,
            // a cached connection's failure is not the message's; a fresh
            // connection's 421 is). Open a fresh one and retry.
            tracing::debug!(parent: &self.span, "connection went stale ({e}); reconnecting");
            // Closed before the new one opens: a relay may count this one
            // until we close it, and then refuse the new one as one too
            // many (it must never see more than `max_connections`).
            let _ = timeout(QUIT_TIMEOUT, self.wire.stream.shutdown()).await;
            let cfg = self.cfg.clone();
            *self = match Connection::open(&cfg).await {
                Ok(c) => c,
                Err(e) => return Sent::alone(Err(e)),
            };
            let span = self.span.clone();
            sent = self.transaction(env, body, next).instrument(span).await;
        }
        self.note_result(&sent.this);
        sent
    }

    /// After an error that leaves the session out of step, the only safe
    /// thing left is to close.
    fn note_result(&mut self, result: &Result<TxnReport, SmtpError>) {
        if let Err(e) = result
            && !e.leaves_session_in_sync()
        {
            self.broken = true;
        }
    }

    /// A body the server waits for will never come (the caller moved on):
    /// after 354 everything up to the dot is message text, so no command
    /// can withdraw it; closing can, as the server must not deliver a
    /// message whose data was cut off (RFC 5321, section 4.1.1.4).
    fn abandon_open(&mut self) {
        let replies = std::mem::take(&mut self.awaiting_replies)
            | std::mem::take(&mut self.awaiting_dot)
            | (std::mem::take(&mut self.in_flight) > 0);
        if std::mem::take(&mut self.awaiting_body) || replies {
            tracing::debug!(parent: &self.span, "pipelined transaction not completed; closing");
            self.broken = true;
        }
    }

    /// Ends the current transaction. With PIPELINING the RSET is not sent
    /// on its own but at the head of the next transaction's first write,
    /// which saves a round trip per message to a far-away upstream.
    pub async fn reset(&mut self) -> Result<(), SmtpError> {
        self.abandon_open();
        if self.broken {
            return Err(SmtpError::Unusable);
        }
        if self.caps.pipelining {
            self.pending_rset = true;
            return Ok(());
        }
        self.rset_now().await
    }

    /// Checks that the upstream still answers: a RSET round trip now (it
    /// also settles an owed RSET). For probes, where a deferred RSET would
    /// prove nothing.
    pub async fn ping(&mut self) -> Result<(), SmtpError> {
        self.abandon_open();
        if self.broken {
            return Err(SmtpError::Unusable);
        }
        self.pending_rset = false;
        self.rset_now().await
    }

    async fn rset_now(&mut self) -> Result<(), SmtpError> {
        let reply = self
            .wire
            .command("RSET\r\n", Stage::Rset, self.command_timeout)
            .await;
        match reply {
            Ok(reply) if reply.is_positive() => Ok(()),
            Ok(reply) => {
                self.broken = true;
                Err(SmtpError::Rejected {
                    stage: Stage::Rset,
                    reply,
                })
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Best-effort QUIT, then close (with a TLS close_notify).
    pub async fn quit(mut self) {
        self.abandon_open();
        let limit = self.command_timeout.min(QUIT_TIMEOUT);
        // On a broken session the server may be reading a body: "QUIT" would
        // become part of it, so just close.
        if !self.broken
            && self
                .wire
                .command("QUIT\r\n", Stage::Quit, limit)
                .await
                .is_err()
        {
            tracing::debug!(parent: &self.span, "no reply to QUIT");
        }
        let _ = timeout(QUIT_TIMEOUT, self.wire.stream.shutdown()).await;
    }

    async fn transaction(
        &mut self,
        env: &Envelope<'_>,
        body: &[u8],
        next: Option<(&Envelope<'_>, usize)>,
    ) -> Sent {
        let planned = match self.plan(env, body.len(), self.pending_rset) {
            Ok(p) => p,
            Err(e) => return Sent::alone(Err(e)),
        };
        let (steps, mut replies) = match planned {
            Planned::Nothing(report) => return Sent::alone(Ok(report)),
            Planned::Steps(steps, replies) => (steps, replies),
        };
        // The RSET owed goes out at the head of these steps.
        self.pending_rset = false;
        if let Err(e) = self.exchange_envelope(&steps, &mut replies).await {
            return Sent::alone(Err(e));
        }
        match self.settle(replies) {
            Ok(Settled::GoAhead(rcpts)) => self.body_then(rcpts, body, next).await,
            Ok(Settled::Over(report)) => Sent::alone(Ok(report)),
            Err(e) => Sent::alone(Err(e)),
        }
    }

    /// The envelope's commands, with the replies already known (recipients
    /// whose address can't be written), a RSET first if `rset`.
    fn plan(&mut self, env: &Envelope<'_>, size: usize, rset: bool) -> Result<Planned, SmtpError> {
        let mut replies = EnvelopeReplies {
            mail: None,
            rcpts: vec![None; env.rcpts.len()],
            data: None,
        };
        let mail = self.mail_command(env, size)?;
        let mut steps = Vec::with_capacity(env.rcpts.len() + 3);
        if rset {
            steps.push(Step::Rset);
        }
        steps.push(Step::Mail(mail));
        for (i, rcpt) in env.rcpts.iter().enumerate() {
            match address_problem(rcpt) {
                None => {
                    let params = env
                        .rcpt_dsn
                        .get(i)
                        .filter(|_| self.caps.dsn)
                        .map(rcpt_dsn_params)
                        .unwrap_or_default();
                    steps.push(Step::Rcpt(i, format!("RCPT TO:<{rcpt}>{params}\r\n")));
                }
                Some(reason) => replies.rcpts[i] = Some(invalid_rcpt_reply(reason)),
            }
        }
        if !steps.iter().any(|s| matches!(s, Step::Rcpt(..))) {
            // Nothing to send to: don't open a transaction at all (a RSET
            // owed stays owed).
            return Ok(Planned::Nothing(TxnReport {
                rcpts: replies.rcpts.into_iter().flatten().collect(),
                data: None,
            }));
        }
        steps.push(Step::Data);
        Ok(Planned::Steps(steps, replies))
    }

    fn mail_command(&self, env: &Envelope<'_>, size: usize) -> Result<String, SmtpError> {
        if let Some(reason) = address_problem(env.from) {
            return Err(SmtpError::InvalidSender {
                address: env.from.to_string(),
                reason,
            });
        }
        let required = env.smtputf8_required
            || !env.from.is_ascii()
            || env.rcpts.iter().any(|r| !r.is_ascii());
        if required && !self.caps.smtputf8 {
            return Err(SmtpError::SmtpUtf8NotOffered {
                host: self.cfg.host.clone(),
            });
        }
        let mut line = format!("MAIL FROM:<{}>", env.from);
        if (required || env.smtputf8) && self.caps.smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        if env.eight_bit && self.caps.eight_bit_mime {
            line.push_str(" BODY=8BITMIME");
        }
        if self.caps.size.is_some() {
            line.push_str(&format!(" SIZE={size}"));
        }
        if let Some(dsn) = env.dsn.filter(|_| self.caps.dsn) {
            if let Some(ret) = dsn.ret {
                line.push_str(&format!(" RET={}", ret.as_str()));
            }
            if let Some(envid) = &dsn.envid {
                line.push_str(&format!(" ENVID={}", crate::spool::format::xtext(envid)));
            }
        }
        line.push_str("\r\n");
        Ok(line)
    }

    /// Sends MAIL, RCPTs and DATA, in batches when pipelining and one by one
    /// otherwise, and reads every reply to what was sent, in order, so the
    /// session stays in step whatever the answers were.
    async fn exchange_envelope(
        &mut self,
        steps: &[Step],
        replies: &mut EnvelopeReplies,
    ) -> Result<(), SmtpError> {
        let batch = if self.caps.pipelining {
            PIPELINE_BATCH
        } else {
            1
        };
        let mut next = 0;
        while next < steps.len() {
            let starts_with_data = matches!(steps[next], Step::Data);
            if replies.mail_refused() || (starts_with_data && !replies.any_rcpt_accepted()) {
                break;
            }
            let group = &steps[next..(next + batch).min(steps.len())];
            let bytes: String = group.iter().map(Step::line).collect();
            self.wire
                .write(
                    bytes.as_bytes(),
                    &bytes,
                    group[0].stage(),
                    self.command_timeout,
                )
                .await?;
            self.read_group(group, replies).await?;
            next += group.len();
        }
        Ok(())
    }

    /// Reads the reply to each command of a group written together.
    async fn read_group(
        &mut self,
        group: &[Step],
        replies: &mut EnvelopeReplies,
    ) -> Result<(), SmtpError> {
        for step in group {
            // The reply to BDAT LAST comes once the message is processed,
            // like the reply after DATA's dot, and failing to read it leaves
            // the same doubt.
            let (stage, limit) = match step {
                Step::Bdat(_) => (Stage::Dot, self.data_timeout),
                _ => (step.stage(), self.command_timeout),
            };
            let reply = self.wire.read_reply(stage, limit).await?;
            if reply.code == 421 || (matches!(step, Step::Rset) && !reply.is_positive()) {
                return Err(SmtpError::Rejected {
                    stage: step.stage(),
                    reply,
                });
            }
            replies.record(step, reply);
        }
        Ok(())
    }

    /// What the envelope's replies leave: a body to send, or a report.
    fn settle(&mut self, mut replies: EnvelopeReplies) -> Result<Settled, SmtpError> {
        let go_ahead = replies.data.as_ref().is_some_and(|r| r.code == 354);
        let accepted = replies.any_rcpt_accepted();
        if go_ahead && (replies.mail_refused() || !accepted) {
            // A pipelined DATA got 354 though there is no one to deliver to.
            // Sending "." could deliver an empty message; closing is safe.
            self.broken = true;
        }
        let rcpts = replies.rcpt_replies()?;
        let data = match replies.data {
            _ if !accepted => None,
            Some(reply) if reply.code == 354 => return Ok(Settled::GoAhead(rcpts)),
            Some(reply) if reply.is_positive() || reply.is_intermediate() => {
                return Err(SmtpError::Protocol {
                    stage: Stage::Data,
                    detail: format!("unexpected reply to DATA: {}", reply.one_line()),
                });
            }
            refusal => refusal,
        };
        Ok(Settled::Over(TxnReport { rcpts, data }))
    }
}

/// ` NOTIFY=... ORCPT=rfc822;...` (or `utf-8;...`) for a recipient that
/// has them.
fn rcpt_dsn_params(d: &crate::spool::RcptDsn) -> String {
    let mut out = String::new();
    if let Some(n) = d.notify.param() {
        out.push_str(&format!(" NOTIFY={n}"));
    }
    if let Some(o) = &d.orcpt {
        let (kind, value) = crate::spool::format::orcpt(o);
        out.push_str(&format!(" ORCPT={kind};{value}"));
    }
    out
}

fn invalid_rcpt_reply(reason: &str) -> Reply {
    Reply::new(501, format!("5.1.3 relayq: recipient address {reason}"))
}

/// A greeting or EHLO reply whose first word is our own host name: the
/// upstream is relayq itself, and sending would loop.
fn check_loop(reply: &Reply, cfg: &ClientConfig, said: &'static str) -> Result<(), SmtpError> {
    let name = reply.text.split_ascii_whitespace().next().unwrap_or("");
    if name.eq_ignore_ascii_case(&cfg.helo_name) {
        return Err(SmtpError::Loop {
            host: cfg.host.clone(),
            said,
            name: cfg.helo_name.clone(),
        });
    }
    Ok(())
}

/// The HELO name goes into a command line: it must be one word.
fn check_helo_name(name: &str) -> Result<(), SmtpError> {
    if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(SmtpError::Config(format!("invalid helo_name {name:?}")));
    }
    Ok(())
}

async fn connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, SmtpError> {
    let tcp = match timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(source)) => return Err(SmtpError::Connect { addr, source }),
        Err(_) => return Err(SmtpError::ConnectTimeout { addr, after: limit }),
    };
    // Commands are small and each waits for its reply: Nagle would add a
    // delayed-ACK stall to every round trip.
    tcp.set_nodelay(true)
        .map_err(|source| SmtpError::Connect { addr, source })?;
    Ok(tcp)
}

/// EHLO, or HELO when EHLO is refused with 5xx (a 4xx is the server's
/// problem, not a lack of ESMTP).
async fn hello(
    wire: &mut Wire,
    helo_name: &str,
    limit: Duration,
) -> Result<Capabilities, SmtpError> {
    let reply = wire
        .command(&format!("EHLO {helo_name}\r\n"), Stage::Ehlo, limit)
        .await?;
    if reply.is_positive() {
        return Ok(Capabilities::from_ehlo(&reply));
    }
    if !reply.is_permanent() {
        return Err(SmtpError::Rejected {
            stage: Stage::Ehlo,
            reply,
        });
    }
    let reply = wire
        .command(&format!("HELO {helo_name}\r\n"), Stage::Helo, limit)
        .await?;
    if !reply.is_positive() {
        return Err(SmtpError::Rejected {
            stage: Stage::Helo,
            reply,
        });
    }
    Ok(Capabilities::default())
}
