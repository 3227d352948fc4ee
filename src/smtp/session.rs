//! One inbound SMTP session: the RFC 5321 state machine.
//!
//! The session is generic over the byte stream, so tests can drive it
//! without sockets. Replies are buffered and flushed only when the client
//! has no more pipelined input waiting, which is what makes PIPELINING
//! cheap. A transaction exists from MAIL to the end of DATA; the message is
//! queued (and fsynced, see `spool`) before `250` is sent.
//!
//! # Security
//! Everything read here comes from the network. Lines are read with a hard
//! length cap (a longer line is consumed and refused, never buffered whole),
//! the message size is counted while it arrives and the body of an
//! oversized message is discarded, every read has a timeout, and a client
//! that keeps making errors is disconnected. Nothing is queued unless the
//! end-of-data sequence `<CRLF>.<CRLF>` arrived; a bare `<LF>.<LF>` never
//! ends a message (SMTP smuggling).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::server::ServerContext;
use super::{auth, message};
use crate::observe::events::{self, Client, Reason, Rejection, Stage};
use crate::spool::{Envelope, SpoolError};

/// RFC 5321 4.5.3.1.4 says 512 octets for a command line; extensions
/// (SIZE, SMTPUTF8 addresses) need more, and Postfix allows 2048.
const MAX_COMMAND_LINE: usize = 2048;

/// How a read of one line ended.
enum Line {
    Ok(Vec<u8>),
    /// Longer than allowed; the whole line was consumed and dropped.
    /// `crlf` tells whether it ended in CRLF (for the end-of-data rule).
    TooLong {
        crlf: bool,
    },
    Eof,
}

#[derive(Debug)]
struct Transaction {
    sender: String,
    recipients: Vec<String>,
    smtputf8: bool,
    eight_bit: bool,
}

/// Where a session run by `sendmail -bs` (SMTP on stdin/stdout) hands its
/// messages, instead of committing them itself: the local submission
/// route (`crate::submit`), which adds its own trace headers and applies
/// the local sender rules.
pub trait LocalSink: Send + Sync + 'static {
    fn free_space(&self) -> std::io::Result<u64>;
    /// Stores the message durably; returns the name it was stored under.
    fn submit(&self, env: Envelope, body: Vec<u8>) -> Result<String, SpoolError>;
    /// A message or recipient the session refused: for the daemon's log
    /// and metrics, which the local user's process cannot write itself.
    fn rejected(&self, r: &Rejection);
}

/// Any byte stream a session can run on (TCP, TLS over TCP, a pipe).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Type-erased so STARTTLS can swap a plain stream for a TLS one in place.
type Stream = Box<dyn Io>;

const READ_BUFFER: usize = 16 * 1024;

pub struct Session {
    io: BufReader<Stream>,
    out: Vec<u8>,
    ctx: Arc<ServerContext>,
    peer: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    txn: Option<Transaction>,
    errors: usize,
    shutdown: watch::Receiver<bool>,
    tls: bool,
    /// The AUTH user, once authenticated.
    auth_user: Option<String>,
    /// The client may relay without AUTH (its address is in allow_networks).
    trusted: bool,
    local: Option<Arc<dyn LocalSink>>,
}

/// Why a session ended early; used for the log line.
#[derive(Debug)]
enum Close {
    Quit,
    Eof,
    Timeout,
    TooManyErrors,
    Shutdown,
    Io(std::io::Error),
}

impl Session {
    pub fn new<S: Io + 'static>(
        stream: S,
        peer: SocketAddr,
        ctx: Arc<ServerContext>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let trusted = ctx
            .config
            .smtp
            .allow_networks
            .iter()
            .any(|n| n.contains(&peer.ip()));
        Session {
            io: BufReader::with_capacity(READ_BUFFER, Box::new(stream) as Stream),
            out: Vec::with_capacity(512),
            ctx,
            peer,
            helo: None,
            esmtp: false,
            txn: None,
            errors: 0,
            shutdown,
            tls: false,
            auth_user: None,
            trusted,
            local: None,
        }
    }

    /// A session with a local user on a pipe (`sendmail -bs`): messages go
    /// to `sink` rather than straight into the spool.
    pub fn new_local<S: Io + 'static>(
        stream: S,
        ctx: Arc<ServerContext>,
        shutdown: watch::Receiver<bool>,
        sink: Arc<dyn LocalSink>,
    ) -> Self {
        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut s = Session::new(stream, peer, ctx, shutdown);
        s.local = Some(sink);
        // A local user on a pipe is not a network client: the local
        // submission rules (crate::submit) decide what it may send.
        s.trusted = true;
        s
    }

    fn free_space(&self) -> std::io::Result<u64> {
        match &self.local {
            Some(sink) => sink.free_space(),
            None => self.ctx.spool.free_space(),
        }
    }

    /// Marks the session as coming from a local, trusted submitter (the
    /// `sendmail -bs` path), which may relay whatever allow_networks says.
    pub fn trusted(mut self) -> Self {
        self.trusted = true;
        self
    }

    /// Runs the session to its end. Never panics on client input.
    pub async fn run(mut self) {
        let hostname = self.ctx.config.hostname.clone();
        self.reply(&format!("220 {hostname} ESMTP relayq"));
        let result = self.serve().await;
        match &result {
            Close::Quit | Close::Eof => {}
            Close::Io(e) => tracing::debug!(peer = %self.peer, "session ended by I/O error: {e}"),
            other => tracing::debug!(peer = %self.peer, "session closed: {other:?}"),
        }
        let _ = self.flush().await;
        let _ = self.io.get_mut().shutdown().await;
        tracing::debug!(peer = %self.peer, "disconnect");
    }

    async fn serve(&mut self) -> Close {
        loop {
            if let Err(e) = self.flush_if_idle().await {
                return Close::Io(e);
            }
            let timeout = self.ctx.config.smtp.command_timeout.0;
            let mut shutdown = self.shutdown.clone();
            let line = tokio::select! {
                r = tokio::time::timeout(timeout, read_line(&mut self.io, MAX_COMMAND_LINE)) => r,
                _ = crate::delivery::scheduler::stopped(&mut shutdown) => {
                    self.reply("421 4.3.2 Service shutting down, closing transmission channel");
                    return Close::Shutdown;
                }
            };
            let line = match line {
                Err(_) => {
                    let host = self.ctx.config.hostname.clone();
                    self.reply(&format!("421 4.4.2 {host} Error: timeout exceeded"));
                    return Close::Timeout;
                }
                Ok(Err(e)) => return Close::Io(e),
                Ok(Ok(Line::Eof)) => return Close::Eof,
                Ok(Ok(Line::TooLong { .. })) => {
                    if self.error("500 5.5.2 Error: command line too long") {
                        return Close::TooManyErrors;
                    }
                    continue;
                }
                Ok(Ok(Line::Ok(line))) => line,
            };
            match self.command(&line).await {
                Ok(true) => {}
                Ok(false) => return Close::Quit,
                Err(close) => return close,
            }
        }
    }

    /// Handles one command line. `Ok(false)` ends the session.
    async fn command(&mut self, line: &[u8]) -> Result<bool, Close> {
        if line.contains(&0) {
            return self.fail("500 5.5.2 Error: NUL character in command");
        }
        let request = Request::parse(&mut line.iter());
        let request = match request {
            Ok(r) => r,
            Err(e) => return self.parse_error(e, line),
        };
        match request {
            Request::Ehlo { host } => self.hello(&host, true),
            Request::Helo { host } => self.hello(&host, false),
            // smtp-proto reads "<postmaster>" as the null path "<>": that
            // would silently switch bounces off for the message.
            Request::Mail { from } if from.address.is_empty() && !is_null_path(line) => {
                let reply =
                    "501 5.1.7 Error: sender address must be fully qualified (user@domain) or <>";
                let shown = command_text(line);
                self.rejected(
                    Stage::Mail,
                    Reason::BadAddress,
                    reply,
                    None,
                    &[],
                    Some(&shown),
                );
                self.fail(reply)
            }
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { mut to } => {
                // RFC 5321 4.5.1: "RCPT TO:<Postmaster>" without a domain
                // must be accepted; it means this host's postmaster.
                if is_bare_postmaster(line) {
                    to.address = format!("postmaster@{}", self.ctx.config.hostname).into();
                }
                self.rcpt(to)
            }
            Request::Data => return self.data().await,
            Request::Rset => {
                self.txn = None;
                self.reply("250 2.0.0 Ok");
                Ok(true)
            }
            Request::Noop { .. } => {
                self.reply("250 2.0.0 Ok");
                Ok(true)
            }
            Request::Quit => {
                self.reply("221 2.0.0 Bye");
                Ok(false)
            }
            Request::Vrfy { .. } => {
                self.reply(
                    "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
                );
                Ok(true)
            }
            Request::Help { .. } => {
                self.reply("214-2.0.0 relayq: a relay for this host's applications\r\n214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP");
                Ok(true)
            }
            Request::Lhlo { .. } => self.fail("500 5.5.1 Error: LHLO is for LMTP, this is SMTP"),
            Request::StartTls => self.starttls().await,
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                let initial = initial_response.into_owned();
                self.auth(mechanism, initial).await
            }
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Bdat { .. } => self.fail("502 5.5.1 Error: command not implemented"),
        }
    }

    fn hello(&mut self, host: &str, esmtp: bool) -> Result<bool, Close> {
        self.helo = Some(host.to_string());
        self.esmtp = esmtp;
        self.txn = None;
        let name = &self.ctx.config.hostname;
        if esmtp {
            let size = self.ctx.config.smtp.max_message_size.0;
            let mut text =
                format!("250-{name}\r\n250-PIPELINING\r\n250-SIZE {size}\r\n250-VRFY\r\n");
            if self.ctx.tls.is_some() && !self.tls {
                text.push_str("250-STARTTLS\r\n");
            }
            if self.ctx.users.is_some() && self.tls {
                text.push_str("250-AUTH PLAIN LOGIN\r\n");
            }
            text.push_str("250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SMTPUTF8");
            self.reply(&text);
        } else {
            let text = format!("250 {name}");
            self.reply(&text);
        }
        Ok(true)
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<Cow<'_, str>>) -> Result<bool, Close> {
        if self.helo.is_none() {
            return self.fail("503 5.5.1 Error: send HELO/EHLO first");
        }
        if self.txn.is_some() {
            return self.fail("503 5.5.1 Error: nested MAIL command");
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        let sender = requote(&from.address);
        let refuse = |s: &mut Self, reason, reply: &str| {
            s.rejected(Stage::Mail, reason, reply, Some(&sender), &[], None);
            s.fail(reply)
        };
        if (smtputf8 || from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0) && !self.esmtp {
            return refuse(
                self,
                Reason::UnsupportedParameter,
                "555 5.5.4 Error: MAIL parameters need EHLO",
            );
        }
        if from.flags & (smtp_proto::MAIL_REQUIRETLS | smtp_proto::MAIL_BODY_BINARYMIME) != 0
            || from.env_id.is_some()
            || from.flags & (smtp_proto::MAIL_RET_FULL | smtp_proto::MAIL_RET_HDRS) != 0
        {
            return refuse(
                self,
                Reason::UnsupportedParameter,
                "555 5.5.4 Error: unsupported MAIL parameter",
            );
        }
        let max = self.ctx.config.smtp.max_message_size.0;
        if from.size as u64 > max {
            let reply = "552 5.3.4 Error: message size exceeds fixed limit";
            let detail = format!("SIZE={} is over smtp.max_message_size {max}", from.size);
            self.rejected(
                Stage::Mail,
                Reason::MessageSize,
                reply,
                Some(&sender),
                &[],
                Some(&detail),
            );
            self.reply(reply);
            return Ok(true);
        }
        if !from.address.is_ascii() && !smtputf8 {
            return refuse(
                self,
                Reason::Smtputf8Required,
                "553 5.6.7 Error: non-ASCII sender address needs the SMTPUTF8 parameter",
            );
        }
        match self.free_space() {
            Ok(free)
                if free
                    < self
                        .ctx
                        .config
                        .smtp
                        .min_free_space
                        .0
                        .saturating_add(from.size as u64) =>
            {
                let reply = "452 4.3.1 Insufficient system storage";
                let detail = format!("spool file system has only {free} bytes free");
                self.rejected(
                    Stage::Mail,
                    Reason::DiskFull,
                    reply,
                    Some(&sender),
                    &[],
                    Some(&detail),
                );
                self.reply(reply);
                return Ok(true);
            }
            _ => {}
        }
        self.txn = Some(Transaction {
            sender,
            recipients: Vec::new(),
            smtputf8,
            eight_bit: from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0,
        });
        self.reply("250 2.1.0 Ok");
        Ok(true)
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<Cow<'_, str>>) -> Result<bool, Close> {
        let max = self.ctx.config.smtp.max_recipients;
        let Some(txn) = self.txn.as_ref() else {
            return self.fail("503 5.5.1 Error: need MAIL command");
        };
        let (count, smtputf8) = (txn.recipients.len(), txn.smtputf8);
        let addr = to.address;
        let refused = [requote(&addr)];
        let refuse = |s: &mut Self, reason, reply: &str, detail: Option<&str>| {
            s.rejected(Stage::Rcpt, reason, reply, None, &refused, detail);
            s.fail(reply)
        };
        if count >= max {
            let reply = "452 4.5.3 Error: too many recipients";
            let detail = format!("smtp.max_recipients is {max}");
            self.rejected(
                Stage::Rcpt,
                Reason::TooManyRecipients,
                reply,
                None,
                &refused,
                Some(&detail),
            );
            self.reply(reply);
            return Ok(true);
        }
        if addr.is_empty() || !addr.contains('@') || addr.starts_with('@') || addr.ends_with('@') {
            return refuse(
                self,
                Reason::BadAddress,
                "501 5.1.3 Error: recipient address must be fully qualified (user@domain)",
                None,
            );
        }
        if !addr.is_ascii() && !smtputf8 {
            return refuse(
                self,
                Reason::Smtputf8Required,
                "553 5.6.7 Error: non-ASCII recipient address needs SMTPUTF8 in MAIL FROM",
                None,
            );
        }
        if to.orcpt.is_some() || to.flags != 0 {
            return refuse(
                self,
                Reason::UnsupportedParameter,
                "555 5.5.4 Error: unsupported RCPT parameter",
                None,
            );
        }
        if !self.trusted && self.auth_user.is_none() {
            let shown: String = addr.chars().filter(|c| !c.is_control()).take(256).collect();
            let text = format!("554 5.7.1 <{shown}>: Relay access denied");
            return refuse(
                self,
                Reason::RelayDenied,
                &text,
                Some("client is not in smtp.allow_networks and did not authenticate"),
            );
        }
        let [addr] = refused;
        let Some(txn) = self.txn.as_mut() else {
            return Ok(true);
        };
        // Listed once, as Postfix's cleanup does: a client that names an
        // address in both To and Cc must not make the upstream send twice.
        if !txn.recipients.contains(&addr) {
            txn.recipients.push(addr);
        }
        self.reply("250 2.1.5 Ok");
        Ok(true)
    }

    async fn data(&mut self) -> Result<bool, Close> {
        match &self.txn {
            None => return self.fail("503 5.5.1 Error: need MAIL command"),
            Some(t) if t.recipients.is_empty() => {
                return self.fail("503 5.5.1 Error: need RCPT command");
            }
            Some(_) => {}
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        self.flush().await.map_err(Close::Io)?;

        let body = match self.read_body().await {
            Ok(Ok(body)) => body,
            Ok(Err((reason, refusal))) => {
                self.rejected_txn(Stage::EndOfMessage, reason, refusal, None);
                self.txn = None;
                self.reply(refusal);
                return Ok(true);
            }
            Err(close) => {
                self.txn = None;
                return Err(close);
            }
        };
        let Some(txn) = self.txn.take() else {
            return Ok(true);
        };
        self.queue(txn, body).await;
        Ok(true)
    }

    /// Reads the message up to `<CRLF>.<CRLF>`, undoing dot-stuffing and
    /// turning bare LF line ends into CRLF. `Ok(Err(reply))` means the whole
    /// body was read but must be refused with that reply.
    async fn read_body(&mut self) -> Result<Result<Vec<u8>, (Reason, &'static str)>, Close> {
        let limits = &self.ctx.config.smtp;
        let max_size = usize::try_from(limits.max_message_size.0).unwrap_or(usize::MAX);
        // Two bytes for the line end, one for a stuffed dot.
        let max_line = limits.max_line_length + 3;
        let timeout = limits.data_timeout.0;
        let max_header = usize::try_from(limits.max_header_size.0).unwrap_or(usize::MAX);
        let mut in_header = true;
        let mut body = Vec::with_capacity(4096);
        let mut refusal: Option<(Reason, &'static str)> = None;
        // The end of data is `<CRLF>.<CRLF>`: a dot line ends the message
        // only when the line before it ended in CRLF (or there was none).
        // After a bare LF it is content, so `<LF>.<CRLF>` cannot smuggle a
        // second transaction past an upstream that reads it differently.
        let mut after_crlf = true;
        loop {
            let line = match tokio::time::timeout(timeout, read_line(&mut self.io, max_line)).await
            {
                Err(_) => {
                    let host = self.ctx.config.hostname.clone();
                    let reply = format!("421 4.4.2 {host} Error: timeout exceeded");
                    let detail = format!("no data for {timeout:?} (smtp.data_timeout)");
                    self.rejected_txn(Stage::Data, Reason::Timeout, &reply, Some(&detail));
                    self.reply(&reply);
                    return Err(Close::Timeout);
                }
                Ok(Err(e)) => return Err(Close::Io(e)),
                Ok(Ok(Line::Eof)) => return Err(Close::Eof),
                Ok(Ok(Line::TooLong { crlf })) => {
                    after_crlf = crlf;
                    refusal.get_or_insert((Reason::LineLength, LINE_TOO_LONG));
                    continue;
                }
                Ok(Ok(Line::Ok(line))) => line,
            };
            if line == b".\r\n" && after_crlf {
                break;
            }
            after_crlf = line.ends_with(b"\r\n");
            let content = line.strip_prefix(b".").unwrap_or(&line);
            let text = content
                .strip_suffix(b"\r\n")
                .or_else(|| content.strip_suffix(b"\n"))
                .unwrap_or(content);
            if refusal.is_some() {
                continue;
            }
            if text.len() > limits.max_line_length {
                refusal = Some((Reason::LineLength, LINE_TOO_LONG));
                continue;
            }
            if text.contains(&0) {
                refusal = Some((
                    Reason::Nul,
                    "554 5.6.0 Error: message contains NUL characters",
                ));
                continue;
            }
            if in_header {
                if text.is_empty() {
                    in_header = false;
                } else if body.len() + text.len() + 2 > max_header {
                    refusal = Some((
                        Reason::HeaderSize,
                        "552 5.3.4 Error: message header size exceeds limit",
                    ));
                    continue;
                }
            }
            if body.len() + text.len() + 2 > max_size {
                refusal = Some((
                    Reason::MessageSize,
                    "552 5.3.4 Error: message size exceeds fixed limit",
                ));
                body = Vec::new();
                continue;
            }
            body.extend_from_slice(text);
            // A last line without any line end is only possible at EOF,
            // which aborts the transaction above; every stored line ends in
            // CRLF.
            body.extend_from_slice(b"\r\n");
        }
        Ok(match refusal {
            Some(r) => Err(r),
            None => Ok(body),
        })
    }

    async fn queue(&mut self, txn: Transaction, body: Vec<u8>) {
        if let Some(sink) = self.local.clone() {
            return self.queue_local(sink, txn, body).await;
        }
        let ctx = self.ctx.clone();
        let id = crate::spool::Spool::new_id();
        let now = ctx.clock.now();
        let date = message::rfc5322_now(now);
        let protocol = match (self.esmtp, txn.smtputf8) {
            (_, true) => "UTF8SMTP",
            (true, false) => "ESMTP",
            (false, false) => "SMTP",
        };
        let helo = self.helo.clone().unwrap_or_default();
        let trace = message::Trace {
            helo: &helo,
            client_ip: self.peer.ip(),
            hostname: &ctx.config.hostname,
            protocol,
            id: &id,
            single_rcpt: (txn.recipients.len() == 1).then(|| txn.recipients[0].as_str()),
            date: &date,
        };
        let mut msg = message::prefix(&trace, &message::scan_headers(&body));
        msg.extend_from_slice(&body);
        drop(body);
        let eight_bit = txn.eight_bit || msg.iter().any(|&b| b >= 0x80);
        let env = Envelope {
            sender: txn.sender,
            recipients: txn.recipients,
            smtputf8: txn.smtputf8,
            eight_bit,
        };
        let size = msg.len();
        let nrcpt = env.recipients.len();
        let sender = env.sender.clone();
        let recipients = env.recipients.clone();
        match ctx
            .spool
            .commit(id, env, msg, crate::clock::to_ms(now))
            .await
        {
            Ok(id) => {
                events::accepted(&id, &Client::Remote(self.peer.ip()), &sender, size, nrcpt);
                ctx.queued(&id);
                self.reply(&format!("250 2.0.0 Ok: queued as {id}"));
            }
            Err(e) => self.queue_failed(e, &sender, &recipients),
        }
    }

    /// Answers a message the spool could not take: 452 when its disk is
    /// full, else 451 (the client tries again either way).
    fn queue_failed(&mut self, e: SpoolError, sender: &str, recipients: &[String]) {
        let (reason, reply) = match e {
            SpoolError::Full => (Reason::DiskFull, "452 4.3.1 Insufficient system storage"),
            _ => {
                tracing::error!("cannot queue mail from <{sender}>: {e}");
                (
                    Reason::QueueError,
                    "451 4.3.0 Error: queue file write error",
                )
            }
        };
        let detail = e.to_string();
        self.rejected(
            Stage::EndOfMessage,
            reason,
            reply,
            Some(sender),
            recipients,
            Some(&detail),
        );
        self.reply(reply);
    }

    /// RFC 3207. Anything the client pipelined after STARTTLS is thrown
    /// away unread: it was sent in clear text and must not be executed as
    /// if it came over TLS (CVE-2011-0411).
    async fn starttls(&mut self) -> Result<bool, Close> {
        let Some(acceptor) = self.ctx.tls.clone() else {
            return self.fail("502 5.5.1 Error: command not implemented");
        };
        if self.tls {
            return self.fail("503 5.5.1 Error: TLS already active");
        }
        self.reply("220 2.0.0 Ready to start TLS");
        self.flush().await.map_err(Close::Io)?;
        let placeholder: Stream = Box::new(tokio::io::duplex(1).0);
        let plain = std::mem::replace(&mut self.io, BufReader::new(placeholder)).into_inner();
        let timeout = self.ctx.config.smtp.command_timeout.0;
        match tokio::time::timeout(timeout, acceptor.accept(plain)).await {
            Ok(Ok(tls)) => {
                self.io = BufReader::with_capacity(READ_BUFFER, Box::new(tls) as Stream);
                self.tls = true;
                // The client must start over with EHLO (RFC 3207 4.2).
                self.helo = None;
                self.esmtp = false;
                self.txn = None;
                Ok(true)
            }
            Ok(Err(e)) => {
                tracing::info!(target: "relayq::smtp", "TLS handshake with [{}] failed: {e}", self.peer.ip());
                Err(Close::Io(e))
            }
            Err(_) => Err(Close::Timeout),
        }
    }

    async fn auth(&mut self, mechanism: u64, initial: String) -> Result<bool, Close> {
        let Some(users) = self.ctx.users.clone() else {
            return self.fail("502 5.5.1 Error: authentication not enabled");
        };
        if !self.tls {
            return self
                .fail("538 5.7.11 Encryption required for requested authentication mechanism");
        }
        if !self.esmtp {
            return self.fail("503 5.5.1 Error: send EHLO first");
        }
        if self.auth_user.is_some() {
            return self.fail("503 5.5.1 Error: already authenticated");
        }
        if self.txn.is_some() {
            return self.fail("503 5.5.1 Error: MAIL transaction in progress");
        }
        let (method, creds) = match mechanism {
            smtp_proto::AUTH_PLAIN => {
                let response = match initial.as_str() {
                    "" => self.challenge("334 ").await?,
                    "=" => String::new(),
                    _ => initial,
                };
                if response == "*" {
                    return self.fail("501 5.7.0 Error: authentication aborted");
                }
                ("PLAIN", auth::decode_plain(&response))
            }
            smtp_proto::AUTH_LOGIN => {
                let user = match initial.as_str() {
                    "" => self.challenge("334 VXNlcm5hbWU6").await?,
                    _ => initial,
                };
                if user == "*" {
                    return self.fail("501 5.7.0 Error: authentication aborted");
                }
                let pass = self.challenge("334 UGFzc3dvcmQ6").await?;
                if pass == "*" {
                    return self.fail("501 5.7.0 Error: authentication aborted");
                }
                let creds = auth::decode_b64_text(&user).zip(auth::decode_b64_text(&pass));
                ("LOGIN", creds)
            }
            _ => return self.fail("504 5.5.4 Error: authentication mechanism not supported"),
        };
        let Some((user, password)) = creds else {
            return self.fail("501 5.5.2 Error: malformed authentication response");
        };
        let check_user = user.clone();
        let ok = tokio::task::spawn_blocking(move || users.verify(&check_user, &password))
            .await
            .unwrap_or(false);
        let shown: String = user.chars().filter(|c| !c.is_control()).take(64).collect();
        if ok {
            tracing::info!(target: "relayq::smtp", "client=[{}], sasl_method={method}, sasl_username={shown}", self.peer.ip());
            self.auth_user = Some(user);
            self.reply("235 2.7.0 Authentication successful");
            Ok(true)
        } else {
            tracing::warn!(target: "relayq::smtp", "[{}]: SASL {method} authentication failed for user {shown}", self.peer.ip());
            self.fail("535 5.7.8 Error: authentication failed")
        }
    }

    /// Sends an AUTH challenge and reads the client's one-line answer.
    async fn challenge(&mut self, prompt: &str) -> Result<String, Close> {
        self.reply(prompt);
        self.flush().await.map_err(Close::Io)?;
        let timeout = self.ctx.config.smtp.command_timeout.0;
        match tokio::time::timeout(timeout, read_line(&mut self.io, 12 * 1024)).await {
            Err(_) => Err(Close::Timeout),
            Ok(Err(e)) => Err(Close::Io(e)),
            Ok(Ok(Line::Eof)) => Err(Close::Eof),
            Ok(Ok(Line::TooLong { .. })) => Ok(String::new()),
            Ok(Ok(Line::Ok(line))) => Ok(String::from_utf8_lossy(&line).trim_end().to_string()),
        }
    }

    async fn queue_local(&mut self, sink: Arc<dyn LocalSink>, txn: Transaction, body: Vec<u8>) {
        let (sender, recipients) = (txn.sender.clone(), txn.recipients.clone());
        let env = Envelope {
            sender: txn.sender,
            recipients: txn.recipients,
            smtputf8: txn.smtputf8,
            eight_bit: txn.eight_bit,
        };
        match tokio::task::spawn_blocking(move || sink.submit(env, body)).await {
            Ok(Ok(id)) => self.reply(&format!("250 2.0.0 Ok: queued as {id}")),
            Ok(Err(e)) => self.queue_failed(e, &sender, &recipients),
            Err(e) => self.queue_failed(
                SpoolError::Io {
                    path: self.ctx.config.spool_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                },
                &sender,
                &recipients,
            ),
        }
    }

    /// Reports a refused message or recipient (the `NOQUEUE: reject:` line
    /// and the metric, see `observe::events`): itself for a network client,
    /// through the sink for a local user's `-bs` session. `from` defaults
    /// to the open transaction's sender.
    fn rejected(
        &self,
        stage: Stage,
        reason: Reason,
        reply: &str,
        from: Option<&str>,
        to: &[String],
        detail: Option<&str>,
    ) {
        let r = Rejection {
            stage,
            reason,
            reply: reply.to_string(),
            from: from
                .map(str::to_string)
                .or_else(|| self.txn.as_ref().map(|t| t.sender.clone())),
            to: to.to_vec(),
            detail: detail.map(str::to_string),
        };
        match &self.local {
            Some(sink) => sink.rejected(&r),
            None => events::rejected(&Client::Remote(self.peer.ip()), &r),
        }
    }

    /// [`Session::rejected`] for the whole open transaction.
    fn rejected_txn(&self, stage: Stage, reason: Reason, reply: &str, detail: Option<&str>) {
        let to = self
            .txn
            .as_ref()
            .map(|t| t.recipients.clone())
            .unwrap_or_default();
        self.rejected(stage, reason, reply, None, &to, detail);
    }

    fn parse_error(&mut self, e: ParseError, line: &[u8]) -> Result<bool, Close> {
        // A MAIL or RCPT that does not parse refuses a sender or recipient.
        let verb = line.get(..4).map(|v| v.to_ascii_uppercase());
        let stage = match verb.as_deref() {
            Some(b"MAIL") => Some(Stage::Mail),
            Some(b"RCPT") => Some(Stage::Rcpt),
            _ => None,
        };
        if let Some(stage) = stage {
            let reason = match e {
                ParseError::InvalidSenderAddress | ParseError::InvalidRecipientAddress => {
                    Some(Reason::BadAddress)
                }
                ParseError::UnsupportedParameter { .. } | ParseError::InvalidParameter { .. } => {
                    Some(Reason::UnsupportedParameter)
                }
                ParseError::SyntaxError { .. } => Some(Reason::Syntax),
                _ => None,
            };
            if let Some(reason) = reason {
                let reply = parse_error_reply(&e);
                let shown = command_text(line);
                self.rejected(stage, reason, &reply, None, &[], Some(&shown));
                return self.fail(&reply);
            }
        }
        let reply = parse_error_reply(&e);
        self.fail(&reply)
    }

    /// Replies with an error and counts it; too many end the session.
    fn fail(&mut self, reply: &str) -> Result<bool, Close> {
        if self.error(reply) {
            return Err(Close::TooManyErrors);
        }
        Ok(true)
    }

    /// Returns true when the client has now made too many errors.
    fn error(&mut self, reply: &str) -> bool {
        self.errors += 1;
        if self.errors >= self.ctx.config.smtp.max_errors {
            let host = self.ctx.config.hostname.clone();
            self.reply(&format!("421 4.7.0 {host} Error: too many errors"));
            tracing::info!(peer = %self.peer, "too many errors; disconnecting");
            return true;
        }
        self.reply(reply);
        false
    }

    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Flushes replies unless more pipelined commands are already waiting.
    async fn flush_if_idle(&mut self) -> std::io::Result<()> {
        if self.io.buffer().is_empty() {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let stream = self.io.get_mut();
        // Writes are bounded like reads: a client that stops reading must
        // not hold the session forever.
        let write = async {
            stream.write_all(&self.out).await?;
            stream.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(60), write).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "write timeout",
                ));
            }
        }
        self.out.clear();
        Ok(())
    }
}

const LINE_TOO_LONG: &str =
    "500 5.5.2 Error: message line too long (RFC 5322 allows 998 characters)";

/// The reply to a command smtp-proto could not parse.
fn parse_error_reply(e: &ParseError) -> String {
    match e {
        ParseError::UnknownCommand => "500 5.5.2 Error: command not recognized".into(),
        ParseError::InvalidSenderAddress => "501 5.1.7 Error: bad sender address syntax".into(),
        ParseError::InvalidRecipientAddress => {
            "501 5.1.3 Error: bad recipient address syntax".into()
        }
        ParseError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
        ParseError::InvalidParameter { param } => {
            format!("501 5.5.4 Error: invalid value for parameter {param}")
        }
        ParseError::UnsupportedParameter { param } => {
            let param: String = param
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect();
            format!("555 5.5.4 Error: unsupported parameter {param}")
        }
        ParseError::ResponseTooLong => "500 5.5.2 Error: command line too long".into(),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
            "501 5.5.2 Error: syntax error".into()
        }
    }
}

/// A refused command line as the log shows it: printable, bounded.
fn command_text(line: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(line)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    format!("command: {text}")
}

/// smtp-proto returns a quoted local part without its quotes (`"a b"@x`
/// comes back as `a b@x`): quote it again, so that what is queued and
/// relayed is the address the client gave, and one token on a command
/// line. A local part that is a dot-atom is returned unchanged.
fn requote(addr: &str) -> String {
    let Some(at) = addr.rfind('@') else {
        return addr.to_string();
    };
    let (local, domain) = addr.split_at(at);
    let atext =
        |c: char| c.is_ascii_alphanumeric() || !c.is_ascii() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let dot_atom = !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext));
    if dot_atom {
        return addr.to_string();
    }
    let mut out = String::with_capacity(addr.len() + 4);
    out.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out.push_str(domain);
    out
}

/// Whether a MAIL command line's reverse-path is literally `<>`.
/// `RCPT TO:<postmaster>` with no domain, any case.
fn is_bare_postmaster(line: &[u8]) -> bool {
    let Some(open) = line.iter().position(|&b| b == b'<') else {
        return false;
    };
    line.get(open + 1..open + 12)
        .is_some_and(|s| s.eq_ignore_ascii_case(b"postmaster>"))
}

fn is_null_path(line: &[u8]) -> bool {
    let Some(open) = line.iter().position(|&b| b == b'<') else {
        return false;
    };
    line.get(open + 1) == Some(&b'>')
}

/// Reads one line including its LF, up to `max` bytes. A longer line is
/// consumed to its end and reported as [`Line::TooLong`].
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    // The byte before this chunk: a CR that arrived just before the LF.
    let mut prev = 0u8;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Eof);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(pos) => (&buf[..=pos], true),
            None => (buf, false),
        };
        let n = chunk.len();
        let crlf = if n >= 2 {
            chunk[n - 2] == b'\r'
        } else {
            prev == b'\r'
        };
        prev = chunk[n - 1];
        if !too_long {
            if line.len() + n > max {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        r.consume(n);
        if done {
            return Ok(if too_long {
                Line::TooLong { crlf }
            } else {
                Line::Ok(line)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::requote;

    #[test]
    fn requote_restores_quoted_local_parts_only() {
        assert_eq!(requote("bob@example.net"), "bob@example.net");
        assert_eq!(requote("a.b+tag@example.net"), "a.b+tag@example.net");
        assert_eq!(requote("jörg@bücher.example"), "jörg@bücher.example");
        assert_eq!(requote(""), "");
        assert_eq!(requote("john smith@x"), "\"john smith\"@x");
        assert_eq!(requote("a..b@x"), "\"a..b\"@x");
        assert_eq!(requote(".a@x"), "\".a\"@x");
        assert_eq!(requote("a@b@x"), "\"a@b\"@x");
        assert_eq!(requote("say \"hi\\\"@x"), "\"say \\\"hi\\\\\\\"\"@x");
    }
}
