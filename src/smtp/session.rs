//! One inbound SMTP session: the RFC 5321 state machine.
//!
//! The session is generic over the byte stream, so tests can drive it
//! without sockets. Replies are buffered and flushed only when the client
//! has no more pipelined input waiting, which is what makes PIPELINING
//! cheap. A transaction exists from MAIL to the end of DATA; the message is
//! queued (and fsynced, see `spool`) before `250` is sent.
//!
//! # Security
//! Everything read here comes from the network. Command lines are read
//! with a hard length cap (a longer line is consumed and refused, never
//! buffered whole), body lines within what is left of the size limit,
//! the message size is counted while it arrives and the body of an
//! oversized message is discarded, every read has a timeout, and a client
//! that keeps making errors is disconnected. Nothing is queued unless the
//! end-of-data sequence `<CRLF>.<CRLF>` arrived; a bare `<LF>.<LF>` or
//! `<CR>.<CR>` never ends a message (SMTP smuggling). The body goes
//! through `cleanup` like every other way in: its intake makes a bare CR
//! or LF a CRLF, so none reaches an upstream next to a dot, and its rules
//! decide what is refused (size, header field size, NUL, hops).
//!
//! A message body must never be read as commands. When DATA is refused
//! (no transaction, no accepted recipient) and the client has already sent
//! more (it pipelined its message behind DATA instead of waiting for the
//! reply, RFC 2920 3.1), nothing of that is executed: the session answers
//! DATA, then `221 2.7.0 Error: I can break rules, too. Goodbye.` and hangs
//! up, as Postfix does. So does a line that looks like a header where a
//! command belongs, or an unknown command right after a refused DATA.
//!
//! Under stress (see [`super::sessions`]) every wait drops to
//! `stress_timeout`, a message must arrive at `min_data_rate`, and an idle
//! session may be closed to make room for a new client.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::server::ServerContext;
use super::sessions::Presence;
use super::{auth, auth_budget, dsn};
use crate::cleanup::{self, Refusal, trace};
use crate::observe::events::{self, Client, Reason, Rejection, Stage};
use crate::spool::{Envelope, SpoolError};

/// How long a login turned away because the checks are busy waits for its
/// `454`, and how long each error beyond half of `max_errors` waits for its
/// reply (Postfix's `smtpd_error_sleep_time`).
const BUSY_DELAY: Duration = Duration::from_secs(1);
const ERROR_DELAY: Duration = Duration::from_secs(1);

/// How long a reply may wait for the client to make room for it (to read),
/// outside stress.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the last reply and the close of a session may take.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// AUTH while the client's address or the user name is locked out (see
/// `auth_budget`): no password is checked.
const LOCKED: &str = "454 4.7.0 Error: too many failed authentications; try again later";

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
    dsn: crate::spool::Dsn,
    /// NOTIFY and ORCPT per recipient, in the order of `recipients`.
    rcpt_dsn: Vec<crate::spool::RcptDsn>,
}

impl Transaction {
    fn into_envelope(self) -> Envelope {
        let any_dsn = self.rcpt_dsn.iter().any(|d| *d != Default::default());
        Envelope {
            sender: self.sender,
            recipients: self.recipients,
            smtputf8: self.smtputf8,
            eight_bit: self.eight_bit,
            dsn: self.dsn,
            rcpt_dsn: if any_dsn { self.rcpt_dsn } else { Vec::new() },
        }
    }
}

/// Where a session run by `sendmail -bs` (SMTP on stdin/stdout) hands its
/// messages, instead of committing them itself: the local submission
/// route (`crate::submit`), which adds its own trace headers and applies
/// the local sender rules.
pub trait LocalSink: Send + Sync + 'static {
    fn free_space(&self) -> std::io::Result<u64>;
    /// Applies the local rules and stores the message durably; returns
    /// the name it was stored under.
    fn submit(&self, env: Envelope, body: Vec<u8>) -> Result<String, crate::submit::SubmitError>;
    /// A message or recipient the session refused: for the daemon's log
    /// and metrics, which the local user's process cannot write itself.
    fn rejected(&self, r: &Rejection);
}

/// Any byte stream a session can run on (TCP, TLS over TCP, a pipe).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Type-erased so STARTTLS can swap a plain stream for a TLS one in place.
type Stream = Box<dyn Io>;

/// The read buffer between messages: commands are short, and thousands of
/// idle sessions must stay cheap (see the README's figures).
const READ_BUFFER: usize = 1024;
/// The read buffer while a message arrives: fewer, larger reads.
const DATA_BUFFER: usize = 64 * 1024;

pub struct Session {
    io: BufReader<Stream>,
    /// The capacity of `io`'s buffer (see [`READ_BUFFER`]).
    capacity: usize,
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
    /// This session's place in the server's session table.
    presence: Presence,
    /// The last command was a DATA (or BDAT) that was refused: what comes
    /// next may be the message the client sent anyway.
    data_refused: bool,
}

/// Why a session ended early; used for the log line.
#[derive(Debug)]
enum Close {
    Quit,
    Eof,
    Timeout,
    TooManyErrors,
    Shutdown,
    /// Closed to make room for a new client (the server was full).
    Evicted,
    /// AUTH locked for this client (too many failures).
    Lockout,
    /// The client broke the protocol in a way that can smuggle commands.
    BrokeRules,
    Io(std::io::Error),
}

/// What a read waits for, which decides its timeout.
#[derive(Clone, Copy)]
enum Wait {
    /// The next command: idle, so the session may be closed to make room.
    Command,
    /// An answer to an AUTH challenge.
    Challenge,
    /// A line of a message; under stress the whole message must arrive by
    /// `deadline` (see `min_data_rate`).
    Data {
        deadline: Option<tokio::time::Instant>,
    },
}

/// How long a wait on the client may last: a read, a TLS handshake, a
/// write the client must make room for. Every wait the client controls
/// goes through [`patiently`], so none of them escapes stress.
struct Patience {
    normal: Duration,
    /// The limit while the server is under stress (at most `normal`).
    stress: Duration,
    /// Under stress, the wait ends by this instant at the latest.
    whole: Option<tokio::time::Instant>,
    /// The session waits for the client to act (a command, a handshake):
    /// it may be asked to make room meanwhile.
    idle: bool,
    /// Shutdown ends the wait (between commands).
    command: bool,
}

/// Runs `op` (which waits on the client) within `p`: the limit is
/// re-judged when stress begins or ends mid-wait, so a wait begun before
/// stress cannot keep its long timeout; an idle wait ends when the
/// session table asks the session to make room.
async fn patiently<T>(
    op: impl std::future::Future<Output = std::io::Result<T>>,
    presence: &Presence,
    shutdown: &watch::Receiver<bool>,
    p: Patience,
) -> Result<T, Close> {
    let started = tokio::time::Instant::now();
    let stress_limit = p.stress.min(p.normal);
    let deadline = |stress: bool| {
        let per_wait = started + if stress { stress_limit } else { p.normal };
        match p.whole {
            Some(whole) if stress => per_wait.min(whole),
            _ => per_wait,
        }
    };
    if p.idle {
        presence.idle();
    }
    let mut stress = presence.stress_watch();
    let mut stress_live = true;
    let mut shutdown = shutdown.clone();
    tokio::pin!(op);
    let sleep = tokio::time::sleep_until(deadline(*stress.borrow()));
    tokio::pin!(sleep);
    let outcome = loop {
        tokio::select! {
            r = &mut op => break r.map_err(Close::Io),
            _ = &mut sleep => break Err(Close::Timeout),
            changed = stress.changed(), if stress_live => match changed {
                Ok(()) => {
                    let now_stressed = *stress.borrow_and_update();
                    sleep.as_mut().reset(deadline(now_stressed));
                }
                Err(_) => stress_live = false,
            },
            _ = presence.evicted(), if p.idle => break Err(Close::Evicted),
            _ = crate::delivery::scheduler::stopped(&mut shutdown), if p.command => {
                break Err(Close::Shutdown)
            }
        }
    };
    presence.busy();
    outcome
}

impl Session {
    pub fn new<S: Io + 'static>(
        stream: S,
        peer: SocketAddr,
        ctx: Arc<ServerContext>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let trusted = ctx.trusted(peer.ip());
        Session {
            io: BufReader::with_capacity(READ_BUFFER, Box::new(stream) as Stream),
            capacity: READ_BUFFER,
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
            presence: Presence::detached(),
            data_refused: false,
        }
    }

    /// Places the session in the server's session table.
    pub fn with_presence(mut self, presence: Presence) -> Self {
        self.presence = presence;
        self
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
        // The last reply and the close, briefly: a TLS close waits until
        // the client has taken what is pending, which a client that reads
        // nothing never does (the session would never end).
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            let _ = self.flush().await;
            let _ = self.io.get_mut().shutdown().await;
        })
        .await;
        tracing::debug!(peer = %self.peer, "disconnect");
    }

    async fn serve(&mut self) -> Close {
        loop {
            if let Err(e) = self.flush_if_idle().await {
                return Close::Io(e);
            }
            let line = match self.read(MAX_COMMAND_LINE, Wait::Command).await {
                Err(close) => return close,
                Ok(Line::Eof) => return Close::Eof,
                Ok(Line::TooLong { .. }) => {
                    self.data_refused = false;
                    if self.error("500 5.5.2 Error: command line too long") {
                        return Close::TooManyErrors;
                    }
                    continue;
                }
                Ok(Line::Ok(line)) => line,
            };
            let after_refused_data = std::mem::take(&mut self.data_refused);
            let errors = self.errors;
            match self.command(&line, after_refused_data).await {
                Ok(true) => {}
                Ok(false) => return Close::Quit,
                Err(close) => return close,
            }
            // A client that keeps making errors gets slower answers, as
            // Postfix's do after smtpd_soft_error_limit.
            if self.errors > errors && self.errors * 2 > self.ctx.config.smtp.max_errors {
                self.pause(ERROR_DELAY).await;
            }
        }
    }

    /// Reads one line, waiting as `wait` allows: the normal timeouts, or
    /// `stress_timeout` while the server is under stress (re-judged when
    /// stress begins or ends mid-wait). A session waiting for a command is
    /// idle: it may be asked to make room, and shutdown closes it. The
    /// reply that ends the session on a timeout is written here.
    async fn read(&mut self, max: usize, wait: Wait) -> Result<Line, Close> {
        let smtp = &self.ctx.config.smtp;
        let patience = Patience {
            normal: match wait {
                Wait::Command | Wait::Challenge => smtp.command_timeout.0,
                Wait::Data { .. } => smtp.data_timeout.0,
            },
            stress: smtp.stress_timeout.0,
            whole: match wait {
                Wait::Data { deadline } => deadline,
                _ => None,
            },
            idle: !matches!(wait, Wait::Data { .. }),
            command: matches!(wait, Wait::Command),
        };
        let read = read_line(&mut self.io, max);
        let outcome = patiently(read, &self.presence, &self.shutdown, patience).await;
        let host = self.ctx.config.hostname.clone();
        match &outcome {
            Err(Close::Timeout) => {
                self.reply(&format!("421 4.4.2 {host} Error: timeout exceeded"));
            }
            Err(Close::Evicted) => {
                self.reply(&format!(
                    "421 4.7.0 {host} Error: server busy, closing idle connection"
                ));
            }
            Err(Close::Shutdown) => {
                self.reply("421 4.3.2 Service shutting down, closing transmission channel");
            }
            _ => {}
        }
        outcome
    }

    /// Handles one command line. `Ok(false)` ends the session.
    async fn command(&mut self, line: &[u8], after_refused_data: bool) -> Result<bool, Close> {
        if line.contains(&0) {
            return self.fail("500 5.5.2 Error: NUL character in command");
        }
        let dsn = match dsn::scan(line) {
            Ok(d) => d,
            Err(reply) => return self.dsn_error(reply, line),
        };
        let request = Request::parse(&mut dsn.line.as_deref().unwrap_or(line).iter());
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                // A header where a command belongs is a message being read
                // as commands (Postfix: "non-SMTP command"); so is anything
                // unknown right after a refused DATA. Executing what follows
                // could run commands a message's author wrote.
                if matches!(e, ParseError::UnknownCommand)
                    && (after_refused_data || is_header_like(line))
                {
                    return Err(self.break_rules("non-SMTP command", line));
                }
                return self.parse_error(e, line);
            }
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
            Request::Mail { mut from } => {
                from.env_id = dsn.envid.map(Cow::Owned);
                self.mail(from)
            }
            Request::Rcpt { mut to } => {
                to.orcpt = dsn.orcpt.map(Cow::Owned);
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
            // BDAT's chunk follows it unasked: refused, it would be read
            // as commands.
            Request::Bdat { .. } => {
                self.refuse_data("502 5.5.1 Error: command not implemented", "BDAT")
            }
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.fail("502 5.5.1 Error: command not implemented"),
        }
    }

    /// Refuses DATA or BDAT. If the client already sent more, it did not
    /// wait for this answer (RFC 2920 3.1): that is the message, and it
    /// must not be executed: answer, then hang up.
    fn refuse_data(&mut self, reply: &str, command: &str) -> Result<bool, Close> {
        if self.input_waiting() {
            let waiting = self.io.buffer().to_vec();
            self.reply(reply);
            return Err(self.break_rules(
                &format!("improper command pipelining after {command}"),
                &waiting,
            ));
        }
        self.data_refused = true;
        self.fail(reply)
    }

    /// Gives the connection a read buffer of `capacity`, unless bytes are
    /// waiting in the current one (they would be lost).
    fn rebuffer(&mut self, capacity: usize) {
        if !self.io.buffer().is_empty() || self.capacity == capacity {
            return;
        }
        let placeholder: Stream = Box::new(tokio::io::duplex(1).0);
        let stream = std::mem::replace(&mut self.io, BufReader::new(placeholder)).into_inner();
        self.io = BufReader::with_capacity(capacity, stream);
        self.capacity = capacity;
    }

    /// Whether the client has sent bytes we have not read yet: in our
    /// buffer, or ready on the connection (a look that never waits).
    fn input_waiting(&mut self) -> bool {
        if !self.io.buffer().is_empty() {
            return true;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(
            std::pin::Pin::new(&mut self.io).poll_fill_buf(&mut cx),
            std::task::Poll::Ready(Ok(buf)) if !buf.is_empty()
        )
    }

    /// Ends the session like Postfix does when a client sends what can only
    /// be a message where commands belong; logs what it sent (escaped).
    fn break_rules(&mut self, what: &str, sample: &[u8]) -> Close {
        let shown: String = sample
            .iter()
            .take(100)
            .flat_map(|&b| std::ascii::escape_default(b))
            .map(char::from)
            .collect();
        if let Some(note) = super::server::client_line(self.peer.ip()) {
            tracing::warn!(target: "relayq::smtp", "{what} from [{}]: {shown}{note}", self.peer.ip());
        }
        self.reply("221 2.7.0 Error: I can break rules, too. Goodbye.");
        Close::BrokeRules
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
            text.push_str("250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8");
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
        if from.flags & (smtp_proto::MAIL_REQUIRETLS | smtp_proto::MAIL_BODY_BINARYMIME) != 0 {
            return refuse(
                self,
                Reason::UnsupportedParameter,
                "555 5.5.4 Error: unsupported MAIL parameter",
            );
        }
        let ret_flags = from.flags & (smtp_proto::MAIL_RET_FULL | smtp_proto::MAIL_RET_HDRS);
        if (ret_flags != 0 || from.env_id.is_some()) && !self.esmtp {
            return refuse(
                self,
                Reason::UnsupportedParameter,
                "555 5.5.4 Error: MAIL parameters need EHLO",
            );
        }
        // RFC 3461 4.3/4.4: RET once, ENVID printable and at most 100.
        let ret = match ret_flags {
            0 => None,
            smtp_proto::MAIL_RET_FULL => Some(crate::spool::Ret::Full),
            smtp_proto::MAIL_RET_HDRS => Some(crate::spool::Ret::Hdrs),
            _ => return refuse(self, Reason::Syntax, "501 5.5.4 Error: RET given twice"),
        };
        let dsn = crate::spool::Dsn {
            ret,
            envid: from.env_id.as_deref().map(str::to_string),
        };
        if dsn.check().is_err() {
            return refuse(self, Reason::Syntax, "501 5.5.4 Error: invalid ENVID");
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
            dsn,
            rcpt_dsn: Vec::new(),
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
        let dsn = match rcpt_dsn(to.flags, to.orcpt.as_deref()) {
            Ok(d) => d,
            Err((reason, reply)) => return refuse(self, reason, reply, None),
        };
        if (dsn.notify.given() || dsn.orcpt.is_some()) && !self.esmtp {
            return refuse(
                self,
                Reason::UnsupportedParameter,
                "555 5.5.4 Error: RCPT parameters need EHLO",
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
            txn.rcpt_dsn.push(dsn);
        }
        self.reply("250 2.1.5 Ok");
        Ok(true)
    }

    async fn data(&mut self) -> Result<bool, Close> {
        match &self.txn {
            None => return self.refuse_data("503 5.5.1 Error: need MAIL command", "DATA"),
            Some(t) if t.recipients.is_empty() => {
                return self.refuse_data("503 5.5.1 Error: need RCPT command", "DATA");
            }
            Some(_) => {}
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        self.flush().await.map_err(Close::Io)?;

        self.rebuffer(DATA_BUFFER);
        let body = self.read_body().await;
        self.rebuffer(READ_BUFFER);
        let body = match body {
            Ok(Ok(body)) => body,
            Ok(Err(refusal)) => {
                let reply = refusal.smtp_reply();
                let detail = refusal.to_string();
                self.rejected_txn(Stage::EndOfMessage, refusal.reason(), &reply, Some(&detail));
                self.txn = None;
                self.reply(&reply);
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

    /// Reads the message up to `<CRLF>.<CRLF>`, undoing dot-stuffing, into
    /// the cleanup intake (line ends, bare CR, limits). `Ok(Err(refusal))`
    /// means the whole body was read but must be refused.
    async fn read_body(&mut self) -> Result<Result<Vec<u8>, Refusal>, Close> {
        let ctx = self.ctx.clone();
        let smtp = &ctx.config.smtp;
        let limits = cleanup::Limits::from_config(smtp);
        let mut intake = cleanup::Intake::new(limits);
        let mut too_big = false;
        let started = tokio::time::Instant::now();
        let mut received: u64 = 0;
        let min_rate = smtp.min_data_rate.max(1);
        // The end of data is `<CRLF>.<CRLF>`: a dot line ends the message
        // only when the line before it ended in CRLF (or there was none).
        // After a bare LF it is content, so `<LF>.<CRLF>` cannot smuggle a
        // second transaction past an upstream that reads it differently.
        let mut after_crlf = true;
        loop {
            // Long lines are content (cleanup re-encodes them); only what
            // is left of the size limit bounds a line. Two bytes for the
            // line end, one for a stuffed dot.
            let max_line = limits
                .max_message_size
                .saturating_sub(intake.len())
                .saturating_add(3);
            // Under stress the message must keep up min_data_rate: a
            // client trickling a byte a second would hold its session
            // forever while each single read stays within the timeout.
            let deadline = started
                + smtp.stress_timeout.0
                + Duration::from_secs_f64(received as f64 / min_rate as f64);
            let read = self
                .read(
                    max_line,
                    Wait::Data {
                        deadline: Some(deadline),
                    },
                )
                .await;
            let line = match read {
                Err(Close::Timeout) => {
                    let host = &ctx.config.hostname;
                    let reply = format!("421 4.4.2 {host} Error: timeout exceeded");
                    let detail = if self.presence.under_stress() {
                        format!(
                            "under stress, the message arrived slower than {} bytes/s (smtp.min_data_rate) or stalled for {:?} (smtp.stress_timeout)",
                            smtp.min_data_rate, smtp.stress_timeout.0
                        )
                    } else {
                        format!("no data for {:?} (smtp.data_timeout)", smtp.data_timeout.0)
                    };
                    self.rejected_txn(Stage::Data, Reason::Timeout, &reply, Some(&detail));
                    return Err(Close::Timeout);
                }
                Err(close) => return Err(close),
                Ok(Line::Eof) => return Err(Close::Eof),
                Ok(Line::TooLong { crlf }) => {
                    after_crlf = crlf;
                    received = received.saturating_add(max_line as u64);
                    too_big = true;
                    continue;
                }
                Ok(Line::Ok(line)) => line,
            };
            received = received.saturating_add(line.len() as u64);
            if line == b".\r\n" && after_crlf {
                break;
            }
            after_crlf = line.ends_with(b"\r\n");
            if too_big || intake.refused() {
                continue;
            }
            let content = line.strip_prefix(b".").unwrap_or(&line);
            let text = content
                .strip_suffix(b"\r\n")
                .or_else(|| content.strip_suffix(b"\n"))
                .unwrap_or(content);
            intake.line(text);
        }
        if too_big {
            return Ok(Err(Refusal::TooBig {
                limit: limits.max_message_size,
            }));
        }
        Ok(intake.finish())
    }

    async fn queue(&mut self, txn: Transaction, body: Vec<u8>) {
        if let Some(sink) = self.local.clone() {
            return self.queue_local(sink, txn, body).await;
        }
        let ctx = self.ctx.clone();
        let rules = cleanup::Rules::smtp(&ctx.config, self.trusted);
        let body = match rewrite_off_thread(body, rules).await {
            Ok(body) => body,
            Err(refusal) => return self.refuse_content(&refusal, &txn.sender, &txn.recipients),
        };
        let id = crate::spool::Spool::new_id();
        let now = ctx.clock.now();
        let date = trace::rfc5322_now(now);
        let protocol = match (self.esmtp, txn.smtputf8) {
            (_, true) => "UTF8SMTP",
            (true, false) => "ESMTP",
            (false, false) => "SMTP",
        };
        let helo = self.helo.clone().unwrap_or_default();
        let trace = trace::Trace {
            origin: trace::Origin::Smtp {
                helo: &helo,
                client_ip: self.peer.ip(),
                protocol,
            },
            hostname: &ctx.config.hostname,
            id: &id,
            single_rcpt: (txn.recipients.len() == 1).then(|| txn.recipients[0].as_str()),
            date: &date,
        };
        let mut msg = trace::prefix(&trace, &body);
        msg.extend_from_slice(&body);
        drop(body);
        let eight_bit = txn.eight_bit || !msg.is_ascii();
        let mut env = txn.into_envelope();
        env.eight_bit = eight_bit;
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
        let smtp = &self.ctx.config.smtp;
        // The handshake is the client's to make, like its next command: the
        // session is idle meanwhile (it may make room for a newcomer), and
        // the limit drops to stress_timeout when stress begins mid-wait.
        let patience = Patience {
            normal: smtp.command_timeout.0,
            stress: smtp.stress_timeout.0,
            whole: None,
            idle: true,
            command: true,
        };
        match patiently(
            acceptor.accept(plain),
            &self.presence,
            &self.shutdown,
            patience,
        )
        .await
        {
            Ok(tls) => {
                self.io = BufReader::with_capacity(READ_BUFFER, Box::new(tls) as Stream);
                self.capacity = READ_BUFFER;
                self.tls = true;
                // The client must start over with EHLO (RFC 3207 4.2).
                self.helo = None;
                self.esmtp = false;
                self.txn = None;
                Ok(true)
            }
            Err(Close::Io(e)) => {
                tracing::info!(target: "relayq::smtp", "TLS handshake with [{}] failed: {e}", self.peer.ip());
                Err(Close::Io(e))
            }
            // No reply: the client expects TLS records, not a 421.
            Err(close) => Err(close),
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
        let ip = self.peer.ip();
        let defenses = self.ctx.defenses.clone();
        if defenses
            .auth_failures
            .locked(ip, None, self.ctx.clock.now_ms())
            .is_some()
        {
            return self.fail(LOCKED);
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
        let shown: String = user.chars().filter(|c| !c.is_control()).take(64).collect();
        if defenses
            .auth_failures
            .locked(ip, Some(&user), self.ctx.clock.now_ms())
            .is_some()
        {
            return self.fail(LOCKED);
        }
        let ok = match defenses.verifier.verify(&users, &user, password).await {
            Ok(ok) => ok,
            Err(auth::Busy) => {
                defenses.verifier.note_busy(ip);
                // Not at once: a flood answered instantly would come back
                // instantly, and its own traffic would eat the CPU.
                self.pause(BUSY_DELAY).await;
                return self.fail("454 4.7.0 Temporary authentication failure: too many logins at once, try again later");
            }
        };
        if ok {
            tracing::info!(target: "relayq::smtp", "client=[{ip}], sasl_method={method}, sasl_username={shown}");
            defenses.auth_failures.succeeded(&user);
            self.auth_user = Some(user);
            self.reply("235 2.7.0 Authentication successful");
            return Ok(true);
        }
        let smtp = &self.ctx.config.smtp;
        let budget = auth_budget::Budget::from(smtp);
        let failure =
            defenses
                .auth_failures
                .failed(ip, Some(&user), self.ctx.clock.now_ms(), &budget);
        if let Some(note) = super::server::client_line(ip) {
            tracing::warn!(target: "relayq::smtp", "[{ip}]: SASL {method} authentication failed for user {shown}{note}");
        }
        if let Some(locked) = failure.lockout {
            let minutes = |d: &crate::config::HumanDuration| d.0.as_secs().div_ceil(60);
            let (window, lockout) = (
                minutes(&smtp.auth_failure_window),
                minutes(&smtp.auth_lockout),
            );
            match locked {
                auth_budget::Locked::Address { .. } => tracing::warn!(
                    target: "relayq::smtp",
                    "AUTH lockout: [{}]: {} failed AUTH attempts within {window}m (smtp.auth_failure_limit); AUTH from it is refused for {lockout}m",
                    auth_budget::client_key(ip),
                    smtp.auth_failure_limit
                ),
                auth_budget::Locked::User { .. } => tracing::warn!(
                    target: "relayq::smtp",
                    "AUTH lockout: user {shown}: {} failed AUTH attempts within {window}m from any address (smtp.auth_user_failure_limit); AUTH for it is refused for {lockout}m",
                    smtp.auth_user_failure_limit
                ),
            }
            let host = self.ctx.config.hostname.clone();
            self.reply(&format!(
                "421 4.7.0 {host} Error: too many failed authentications; try again later"
            ));
            return Err(Close::Lockout);
        }
        self.pause(failure.delay).await;
        self.fail("535 5.7.8 Error: authentication failed")
    }

    /// Waits before a reply to a client that deserves to wait (tarpit).
    /// The session is idle meanwhile: it may be closed to make room. Only
    /// network clients wait: a local user on a pipe (`sendmail -bs`) gains
    /// nothing by flooding it and could simply stop reading.
    async fn pause(&mut self, delay: Duration) {
        if delay.is_zero() || !self.presence.attached() {
            return;
        }
        self.presence.idle();
        tokio::time::sleep(delay).await;
        self.presence.busy();
    }

    /// Sends an AUTH challenge and reads the client's one-line answer.
    async fn challenge(&mut self, prompt: &str) -> Result<String, Close> {
        self.reply(prompt);
        self.flush().await.map_err(Close::Io)?;
        match self.read(12 * 1024, Wait::Challenge).await? {
            Line::Eof => Err(Close::Eof),
            Line::TooLong { .. } => Ok(String::new()),
            Line::Ok(line) => Ok(String::from_utf8_lossy(&line).trim_end().to_string()),
        }
    }

    async fn queue_local(&mut self, sink: Arc<dyn LocalSink>, txn: Transaction, body: Vec<u8>) {
        let (sender, recipients) = (txn.sender.clone(), txn.recipients.clone());
        let env = txn.into_envelope();
        use crate::submit::SubmitError;
        match tokio::task::spawn_blocking(move || sink.submit(env, body)).await {
            Ok(Ok(id)) => self.reply(&format!("250 2.0.0 Ok: queued as {id}")),
            Ok(Err(SubmitError::Refused(r))) => self.refuse_content(&r, &sender, &recipients),
            Ok(Err(SubmitError::Spool(e))) => self.queue_failed(e, &sender, &recipients),
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

    /// Refuses the message at the end of data, with cleanup's reason.
    fn refuse_content(&mut self, refusal: &Refusal, sender: &str, recipients: &[String]) {
        let reply = refusal.smtp_reply();
        let detail = refusal.to_string();
        self.rejected(
            Stage::EndOfMessage,
            refusal.reason(),
            &reply,
            Some(sender),
            recipients,
            Some(&detail),
        );
        self.reply(&reply);
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
            to_omitted: 0,
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

    /// A MAIL or RCPT whose DSN parameters are wrong (see `dsn`).
    fn dsn_error(&mut self, reply: &str, line: &[u8]) -> Result<bool, Close> {
        let stage = match line.get(..4).map(|v| v.to_ascii_uppercase()).as_deref() {
            Some(b"MAIL") => Stage::Mail,
            _ => Stage::Rcpt,
        };
        let shown = command_text(line);
        self.rejected(stage, Reason::Syntax, reply, None, &[], Some(&shown));
        self.fail(reply)
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
        let patience = Patience {
            normal: WRITE_TIMEOUT,
            stress: self.ctx.config.smtp.stress_timeout.0,
            whole: None,
            idle: false,
            command: false,
        };
        match patiently(write, &self.presence, &self.shutdown, patience).await {
            Ok(()) => {}
            Err(Close::Io(e)) => return Err(e),
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

/// NOTIFY and ORCPT of a RCPT command (RFC 3461), checked.
fn rcpt_dsn(
    flags: u64,
    orcpt: Option<&str>,
) -> Result<crate::spool::RcptDsn, (Reason, &'static str)> {
    use crate::spool::Notify;
    if flags
        & !(smtp_proto::RCPT_NOTIFY_NEVER
            | smtp_proto::RCPT_NOTIFY_SUCCESS
            | smtp_proto::RCPT_NOTIFY_FAILURE
            | smtp_proto::RCPT_NOTIFY_DELAY)
        != 0
    {
        return Err((
            Reason::UnsupportedParameter,
            "555 5.5.4 Error: unsupported RCPT parameter",
        ));
    }
    let mut notify = Notify::default();
    for (flag, n) in [
        (smtp_proto::RCPT_NOTIFY_NEVER, Notify::NEVER),
        (smtp_proto::RCPT_NOTIFY_SUCCESS, Notify::SUCCESS),
        (smtp_proto::RCPT_NOTIFY_FAILURE, Notify::FAILURE),
        (smtp_proto::RCPT_NOTIFY_DELAY, Notify::DELAY),
    ] {
        if flags & flag != 0 {
            notify = notify.with(n);
        }
    }
    if notify.given() && notify.param().and_then(|p| Notify::parse(&p)) != Some(notify) {
        return Err((
            Reason::Syntax,
            "501 5.5.4 Error: NOTIFY=NEVER cannot be combined with other values",
        ));
    }
    let dsn = crate::spool::RcptDsn {
        notify,
        orcpt: orcpt.map(str::to_string),
    };
    if dsn.check().is_err() {
        return Err((Reason::Syntax, "501 5.5.4 Error: invalid ORCPT"));
    }
    Ok(dsn)
}

/// Runs cleanup's rewrite; a big message on a blocking thread, so a
/// 25 MB MIME re-encoding does not stall other sessions.
async fn rewrite_off_thread(body: Vec<u8>, rules: cleanup::Rules) -> Result<Vec<u8>, Refusal> {
    if body.len() < 256 * 1024 {
        return cleanup::rewrite(body, &rules);
    }
    tokio::task::spawn_blocking(move || cleanup::rewrite(body, &rules))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

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
/// line.
fn requote(addr: &str) -> String {
    crate::cleanup::address::quote_local_part(addr)
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

/// Whether a command line's first word is a header label (`Subject:`,
/// `From:x`, `X-Mailer :`): RFC 5322 field-name characters, optional blanks,
/// then a colon, as Postfix's `is_header()` judges it.
fn is_header_like(line: &[u8]) -> bool {
    let mut name = 0;
    let mut blanks = false;
    for &b in line {
        match b {
            b':' => return name > 0,
            b' ' | b'\t' if name > 0 => blanks = true,
            33..=126 if !blanks => name += 1,
            _ => return false,
        }
    }
    false
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
    use super::{is_header_like, requote};

    #[test]
    fn header_like_lines() {
        for yes in [
            &b"Subject: hi\r\n"[..],
            b"From:<a@b>\r\n",
            b"X-Mailer : x\r\n",
            b"To:\r\n",
            b"Received: from x\r\n",
        ] {
            assert!(is_header_like(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"MAIL FROM:<a@b>\r\n"[..],
            b"RCPT TO:<a@b>\r\n",
            b"DATA\r\n",
            b":x\r\n",
            b"Hello world\r\n",
            b"\r\n",
        ] {
            assert!(!is_header_like(no), "{}", String::from_utf8_lossy(no));
        }
    }

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
