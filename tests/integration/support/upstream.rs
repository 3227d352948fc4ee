//! A scriptable fake upstream SMTP server (the "smarthost") for integration
//! tests: relayq's relay is pointed at it, it records exactly what it
//! receives, and a [`Script`] tells it how to misbehave (reject a recipient,
//! answer 4xx, drop the line at a given stage, answer slowly).
//!
//! It listens on 127.0.0.1 only. Each connection runs on the test's tokio
//! runtime, so a test that talks to it must not block that runtime (use
//! `tokio::net::TcpStream`, or a child process, not `std::net` on a
//! current-thread runtime).
//!
//! Deliberately plain: lines are parsed by hand, each command is answered as
//! soon as it is read (so pipelined commands are answered in order, which is
//! all PIPELINING requires), and the body is read line by line up to a line
//! that is exactly ".\r\n" (a lone ".\n" does not end it, so a client that
//! gets CRLF wrong shows up as a timeout rather than as a passing test).
//!
//! The session ([`serve`]) is generic over `AsyncRead + AsyncWrite`, so the
//! same code speaks clear text and TLS. With [`FakeUpstream::start_tls`] the
//! server offers STARTTLS (the accepted command hands the socket back for the
//! handshake and a fresh session starts on the TLS stream, forgetting the
//! earlier EHLO as RFC 3207 says) or does implicit TLS from the first byte;
//! [`Script::require_auth`] makes it demand AUTH PLAIN, LOGIN or XOAUTH2
//! before MAIL. Both live in `upstream/secure.rs`. Every command is recorded
//! with whether TLS was up when it arrived ([`FakeUpstream::seen`]), and
//! every AUTH attempt with its outcome ([`FakeUpstream::auths`]), so a test
//! can prove nothing was said in clear text.
//!
//! With [`Script::chunking`] it offers CHUNKING and takes BDAT (RFC 3030) as
//! well as DATA (`upstream/chunking.rs`); [`Script::max_sessions`] makes it
//! refuse connections over a number open at once with "421 4.7.0 Too many
//! concurrent SMTP connections", as providers do. [`Script::accept_at_most`]
//! and [`Script::stall_accept_after`] make connections after a number be
//! refused or time out; [`Script::setup_delay`] makes it slow to let a
//! connection in, [`Script::crowding`] slower with every connection open;
//! [`Script::hold_body_replies`] shows what a client wrote behind a body
//! it had no reply to.
//!
//! [`Script::drop_kept`] drops the line in a kept connection's next
//! transaction after reading all of it or part of it, with no reply sent
//! (`upstream/kept.rs`); [`Script::refuse_first_mail_on`] answers the
//! first MAIL of a new connection 421.
//!
//! The script is read afresh for every decision, so `set_script` takes effect
//! on the next command, also on connections already open.

// Each integration test binary compiles this module; not all use every item.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

mod chunking;
mod kept;
mod secure;
pub use kept::KeptDrop;
pub use secure::{AuthAttempt, Handshake, Seen, TokenCheck, UpstreamTls};

/// The name the fake server gives itself in its greeting and EHLO reply.
pub const HOSTNAME: &str = "fake.upstream.test";

/// A point in the SMTP dialogue at which [`Script::drop_at`] closes the socket
/// without replying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Right after accepting, before any greeting.
    Greeting,
    /// On receiving EHLO or HELO.
    Ehlo,
    /// On receiving MAIL.
    Mail,
    /// On receiving the first RCPT of a transaction.
    Rcpt,
    /// On receiving DATA, before the 354.
    Data,
    /// After the 354 and the first line of the body (mid-body); with BDAT,
    /// after the first octet of the chunk.
    DataBody,
    /// After the whole body (the dot, or the last BDAT chunk), before the
    /// final reply.
    DataEnd,
}

/// Where in the Nth transaction [`Script::drop_in_txn`] drops the line.
/// Every drop is a hang-up (see `Session::hang_up`): the replies written
/// before it arrive, nothing after it is processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnDrop {
    /// MAIL answered, then the line drops.
    AfterMail,
    /// The first RCPT answered, then the line drops.
    AfterRcpt,
    /// One octet of the BDAT chunk (or of the DATA body) read.
    MidChunk,
    /// The whole message in (BDAT LAST or the dot), not taken, no reply.
    AfterLast,
    /// The whole message in and taken (recorded), but the line drops
    /// before the reply: the client can't know it was delivered.
    AfterLastTaken,
    /// The message taken and answered 250, then the line drops.
    AfterReply,
    /// The whole message in and taken, but none of its transaction's
    /// replies went out (the RSET's heading it included) before the line
    /// dropped: a server that, like Postfix with PIPELINING, flushes its
    /// replies only once it has read all the client sent.
    TakenUnflushed,
}

/// How the fake server behaves. `Script::default()` is a well-behaved server
/// advertising PIPELINING, 8BITMIME, SMTPUTF8 and ENHANCEDSTATUSCODES.
#[derive(Clone, Debug)]
pub struct Script {
    /// Replaces the 220 greeting. A 4xx greeting is followed by closing the
    /// connection; after a 5xx greeting every command but QUIT gets 503.
    pub greeting: Option<(u16, String)>,
    pub pipelining: bool,
    pub smtputf8: bool,
    pub eightbitmime: bool,
    /// Advertise DSN (RFC 3461); off by default.
    pub dsn: bool,
    pub enhancedstatuscodes: bool,
    /// Advertise `SIZE n` and enforce it on MAIL's SIZE= and on the body.
    pub size: Option<usize>,
    /// Replaces the EHLO reply (e.g. 502 so the client falls back to HELO).
    pub ehlo_reply: Option<(u16, String)>,
    /// Replaces the reply to MAIL; a non-2xx one starts no transaction.
    pub mail_reply: Option<(u16, String)>,
    /// Per-address replies to RCPT (address compared without case);
    /// everything else gets "250 2.1.5 Ok". Only 2xx recipients are kept.
    pub rcpt_replies: Vec<(String, u16, String)>,
    /// Replaces the final reply after the body; default
    /// "250 2.0.0 Ok: queued as FAKE<n>". A non-2xx one records nothing.
    pub data_reply: Option<(u16, String)>,
    /// Replies to the body by reverse-path (compared without case; "" is
    /// `<>`), checked before `data_reply`: lets a test refuse a message but
    /// accept the bounce relayq sends about it.
    pub data_replies_by_sender: Vec<(String, u16, String)>,
    /// Close the socket without replying when this stage is reached.
    pub drop_at: Option<Stage>,
    /// Waited before every reply, greeting included (a far-away provider).
    pub reply_delay: Duration,
    /// Answer 451 to the first N bodies (counted across connections since the
    /// server started or `set_script` was last called), then behave normally.
    pub fail_first_n_transactions: usize,
    /// Close the connection right after answering the Nth body (counted
    /// like `fail_first_n_transactions`), processing nothing that follows
    /// it (see `hang_up`).
    pub close_after_body: Option<usize>,
    /// Like `close_after_body`, counting only bodies that arrived with the
    /// client's next commands already behind them: the line drops with
    /// messages in flight.
    pub close_in_window: Option<usize>,
    /// `(user, password)`: advertise AUTH PLAIN LOGIN XOAUTH2 and answer
    /// MAIL with 530 until the client logged in (XOAUTH2 takes the password
    /// as its bearer token).
    pub auth: Option<(String, String)>,
    /// XOAUTH2 accepts a bearer token in this set (the tokens a fake token
    /// endpoint issued and has not expired) instead of the password.
    pub auth_tokens: Option<TokenCheck>,
    /// Replaces the reply to a failed AUTH ("535 5.7.3 ..." as Microsoft
    /// says it); XOAUTH2 then gets no JSON challenge first.
    pub auth_failure: Option<(u16, String)>,
    /// A refused AUTH's replies repeat the secret the client sent (a
    /// careless server): in XOAUTH2's JSON challenge and in the final reply.
    pub auth_echo: bool,
    /// Recipients taken per transaction; more get "452 4.5.3 Too many
    /// recipients" (RFC 5321 4.5.3.1.10).
    pub max_rcpts: Option<usize>,
    /// Advertise CHUNKING and take BDAT.
    pub chunking: bool,
    /// Connections served at once; one more gets "421 4.7.0 Too many
    /// concurrent SMTP connections" as its greeting and is closed.
    pub max_sessions: Option<usize>,
    /// With `max_sessions`: one more connection is greeted and refused at
    /// AUTH instead, with this reply (a provider counting logins).
    pub over_limit_at_auth: Option<(u16, String)>,
    /// With `max_sessions`: one more connection is greeted and its EHLO
    /// answered with this reply instead (closed after a 421).
    pub over_limit_at_ehlo: Option<(u16, String)>,
    /// Answer the Nth body (counted like `fail_first_n_transactions`)
    /// with "421 4.7.0 Too many messages, slow down" and close: a
    /// provider throttling a connection in use.
    pub throttle_body: Option<usize>,
    /// Answer the Nth body (counted like `fail_first_n_transactions`)
    /// normally, then the next RSET (`true`) or MAIL (`false`) that comes
    /// on a connection after a body (on any such connection, should the
    /// Nth's not carry another message) with "421 4.7.0 Too many
    /// messages, closing", and close: pushback on a message *behind*
    /// another, whose transaction never began.
    pub throttle_after_body: Option<(usize, bool)>,
    /// Drop the line at this point of the Nth transaction (the Nth MAIL
    /// received, counted like `fail_first_n_transactions`).
    pub drop_in_txn: Option<(usize, TxnDrop)>,
    /// Stop listening once this many connections were accepted (those go
    /// on): a connection after them is refused by the kernel.
    pub accept_at_most: Option<usize>,
    /// Stop accepting once this many connections were accepted (those go
    /// on), with the listen queue full: a connection after them gets no
    /// answer at all (the kernel drops its SYNs), so it times out, as
    /// behind an overwhelmed listener or a firewall that drops. The first
    /// ones are greeted only once the queue is full, so that none of the
    /// client's can slip into it.
    pub stall_accept_after: Option<usize>,
    /// Waited before the greeting and before the EHLO reply, besides
    /// `reply_delay`: a provider slow to let a connection in (its DNS and
    /// reputation checks, TLS, AUTH) but quick with mail.
    pub setup_delay: Duration,
    /// The reply to each body is held back while the client sends more,
    /// and flushed with whatever followed it once nothing came for this
    /// long (Postfix with PIPELINING flushes its replies only once it has
    /// read all the client sent). What a client writes behind a body it
    /// has no reply to is then seen as such: each message records the
    /// bodies still unanswered when its MAIL came
    /// ([`Received::unanswered_before`]).
    pub hold_body_replies: Option<Duration>,
    /// Each body's reply waits this times the square of the connections
    /// open at the time: a provider that slows down steeply as more
    /// connections come, so that more of them deliver less in total.
    pub crowding: Duration,
    /// Drop the line in the first transaction on a kept connection (one
    /// that carried a body before) after `set_script`, with its replies
    /// held (see [`KeptDrop`]).
    pub drop_kept: Option<KeptDrop>,
    /// Answer the first MAIL on the Nth connection with "421 4.3.2
    /// Service not available, closing" and close.
    pub refuse_first_mail_on: Option<usize>,
    /// Messages taken per connection: the MAIL after that many bodies on a
    /// connection gets "421 4.7.0 Too many messages in this session,
    /// closing" and the connection closes (a provider's limit per
    /// connection, as Exchange's `MaxMessagesPerConnection`).
    pub messages_per_connection: Option<usize>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: None,
            pipelining: true,
            smtputf8: true,
            eightbitmime: true,
            dsn: false,
            enhancedstatuscodes: true,
            size: None,
            ehlo_reply: None,
            mail_reply: None,
            rcpt_replies: Vec::new(),
            data_reply: None,
            data_replies_by_sender: Vec::new(),
            drop_at: None,
            reply_delay: Duration::ZERO,
            fail_first_n_transactions: 0,
            close_after_body: None,
            close_in_window: None,
            auth: None,
            auth_tokens: None,
            auth_failure: None,
            auth_echo: false,
            max_rcpts: None,
            chunking: false,
            max_sessions: None,
            over_limit_at_auth: None,
            over_limit_at_ehlo: None,
            throttle_body: None,
            throttle_after_body: None,
            drop_in_txn: None,
            accept_at_most: None,
            stall_accept_after: None,
            setup_delay: Duration::ZERO,
            hold_body_replies: None,
            crowding: Duration::ZERO,
            drop_kept: None,
            refuse_first_mail_on: None,
            messages_per_connection: None,
        }
    }
}

/// Builder-style helpers, so a test reads
/// `Script::default().rcpt("bob@x", 550, "5.1.1 no such user").drop_at(Stage::DataEnd)`.
impl Script {
    pub fn greeting(mut self, code: u16, text: &str) -> Self {
        self.greeting = Some((code, text.to_string()));
        self
    }
    pub fn ehlo_reply(mut self, code: u16, text: &str) -> Self {
        self.ehlo_reply = Some((code, text.to_string()));
        self
    }
    pub fn mail_reply(mut self, code: u16, text: &str) -> Self {
        self.mail_reply = Some((code, text.to_string()));
        self
    }
    pub fn rcpt(mut self, address: &str, code: u16, text: &str) -> Self {
        self.rcpt_replies
            .push((address.to_string(), code, text.to_string()));
        self
    }
    pub fn data_reply(mut self, code: u16, text: &str) -> Self {
        self.data_reply = Some((code, text.to_string()));
        self
    }
    pub fn data_reply_from(mut self, sender: &str, code: u16, text: &str) -> Self {
        self.data_replies_by_sender
            .push((sender.to_string(), code, text.to_string()));
        self
    }
    pub fn drop_at(mut self, stage: Stage) -> Self {
        self.drop_at = Some(stage);
        self
    }
    pub fn reply_delay(mut self, delay: Duration) -> Self {
        self.reply_delay = delay;
        self
    }
    pub fn close_after_body(mut self, n: usize) -> Self {
        self.close_after_body = Some(n);
        self
    }
    pub fn close_in_window(mut self, n: usize) -> Self {
        self.close_in_window = Some(n);
        self
    }
    pub fn fail_first(mut self, n: usize) -> Self {
        self.fail_first_n_transactions = n;
        self
    }
    pub fn size(mut self, limit: usize) -> Self {
        self.size = Some(limit);
        self
    }
    pub fn max_rcpts(mut self, n: usize) -> Self {
        self.max_rcpts = Some(n);
        self
    }

    pub fn no_smtputf8(mut self) -> Self {
        self.smtputf8 = false;
        self
    }
    pub fn no_8bitmime(mut self) -> Self {
        self.eightbitmime = false;
        self
    }
    pub fn with_dsn(mut self) -> Self {
        self.dsn = true;
        self
    }

    pub fn no_pipelining(mut self) -> Self {
        self.pipelining = false;
        self
    }
    pub fn chunking(mut self) -> Self {
        self.chunking = true;
        self
    }
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.max_sessions = Some(n);
        self
    }
    pub fn throttle_body(mut self, n: usize) -> Self {
        self.throttle_body = Some(n);
        self
    }
    /// See [`Script::throttle_after_body`] (the field).
    pub fn throttle_after_body(mut self, n: usize, at_rset: bool) -> Self {
        self.throttle_after_body = Some((n, at_rset));
        self
    }

    pub fn accept_at_most(mut self, n: usize) -> Self {
        self.accept_at_most = Some(n);
        self
    }

    /// See [`Script::stall_accept_after`] (the field).
    pub fn stall_accept_after(mut self, n: usize) -> Self {
        self.stall_accept_after = Some(n);
        self
    }

    pub fn setup_delay(mut self, delay: Duration) -> Self {
        self.setup_delay = delay;
        self
    }

    /// See [`Script::crowding`] (the field).
    pub fn crowding(mut self, base: Duration) -> Self {
        self.crowding = base;
        self
    }

    /// See [`Script::hold_body_replies`] (the field).
    pub fn hold_body_replies(mut self, quiet: Duration) -> Self {
        self.hold_body_replies = Some(quiet);
        self
    }

    pub fn drop_in_txn(mut self, n: usize, at: TxnDrop) -> Self {
        self.drop_in_txn = Some((n, at));
        self
    }

    pub fn drop_kept(mut self, at: KeptDrop) -> Self {
        self.drop_kept = Some(at);
        self
    }

    /// See [`Script::messages_per_connection`] (the field).
    pub fn messages_per_connection(mut self, n: usize) -> Self {
        self.messages_per_connection = Some(n);
        self
    }

    pub fn refuse_first_mail_on(mut self, conn: usize) -> Self {
        self.refuse_first_mail_on = Some(conn);
        self
    }

    /// `n` logins at once; one more is refused at AUTH with `code` and
    /// `text`.
    pub fn max_logins(mut self, n: usize, code: u16, text: &str) -> Self {
        self.max_sessions = Some(n);
        self.over_limit_at_auth = Some((code, text.to_string()));
        self
    }

    /// `n` sessions at once; one more is greeted and refused at EHLO with
    /// `code` and `text`.
    pub fn max_sessions_at_ehlo(mut self, n: usize, code: u16, text: &str) -> Self {
        self.max_sessions = Some(n);
        self.over_limit_at_ehlo = Some((code, text.to_string()));
        self
    }
}

/// One completed transaction: the server answered 2xx to its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Connection number, from 1, in order of acceptance.
    pub conn: usize,
    /// The argument of the last EHLO/HELO on that connection.
    pub helo: String,
    /// Reverse-path without angle brackets; "" for `<>`.
    pub mail_from: String,
    /// Everything after the reverse-path, e.g. "BODY=8BITMIME SMTPUTF8".
    pub mail_params: String,
    /// Accepted recipients only, in order, without angle brackets.
    pub rcpts: Vec<String>,
    /// Everything after each accepted recipient's path ("NOTIFY=..."), in
    /// the order of `rcpts`.
    pub rcpt_params: Vec<String>,
    /// The body as sent, dot-stuffing undone, CRLF kept, without ".\r\n".
    pub data: Vec<u8>,
    /// The id given in the final reply ("FAKE<n>"), or "" if scripted.
    pub queue_id: String,
    /// "BDAT" or "DATA": how the body came.
    pub via: &'static str,
    /// Commands were already behind the body's end when it arrived (the
    /// client sent more before this message's reply).
    pub followed: bool,
    /// When it was recorded, just before the final reply.
    pub at: std::time::Instant,
    /// With [`Script::hold_body_replies`]: the sizes (octets received) of
    /// the bodies on its connection whose replies were still held back
    /// when its MAIL came, oldest first: messages the client had no reply
    /// to when it wrote this one.
    pub unanswered_before: Vec<usize>,
}

impl Received {
    /// The body as text (lossy), for assertions.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A running fake server; dropping it shuts it down like [`FakeUpstream::stop`]
/// but without waiting.
pub struct FakeUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept_task: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Woken on every new connection and every recorded message.
    changed: Notify,
}

#[derive(Default)]
struct State {
    script: Script,
    messages: Vec<Received>,
    /// (connection, command line) in order of arrival.
    commands: Vec<(usize, String)>,
    connections: usize,
    /// Bodies received since start or the last `set_script`, for fail_first.
    bodies_seen: usize,
    /// Of those, the ones with commands already behind them.
    followed_seen: usize,
    /// MAIL commands received, counted like `bodies_seen`.
    mails_seen: usize,
    /// For the "queued as FAKE<n>" ids.
    queued: usize,
    /// Set by `start_tls`/`set_tls`: read at each new connection.
    tls: Option<secure::ServerTls>,
    /// Every command line with its TLS state, in order of arrival.
    seen: Vec<Seen>,
    auths: Vec<AuthAttempt>,
    handshakes: Vec<Handshake>,
    /// Bodies whose final dot arrived with more commands already behind it
    /// (sent before the reply to the dot: pipelined after the data).
    sent_behind_dot: usize,
    /// Sessions open now, and the most open at once.
    active: usize,
    peak_active: usize,
    /// Sessions the server ended ([`Session::hang_up`]) whose client has
    /// not closed them yet: still open, and counted in `active`.
    hanging_up: usize,
    /// Sessions no longer counted in `active` since their client closed
    /// them after the server hung up (their task may still be ending).
    closed_by_client: std::collections::HashSet<usize>,
    /// Connections refused for `max_sessions` (at the greeting or AUTH).
    pub(super) refused_sessions: usize,
    /// The connections that arrived over `max_sessions`.
    pub(super) over_limit: std::collections::HashSet<usize>,
    /// When the [`Script::throttle_body`] 421 went out, and how many
    /// connections had been accepted by then.
    throttled: Option<(std::time::Instant, usize)>,
    /// [`Script::drop_kept`] dropped a line since the last `set_script`.
    kept_dropped: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide the
        // server's record from the test's own failure message.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn script(&self) -> Script {
        self.lock().script.clone()
    }
    /// Whether connection `conn` came over `max_sessions`, counted as
    /// refused if so (the caller refuses it now).
    fn refuse_over_limit(&self, conn: usize) -> bool {
        let mut state = self.lock();
        let over = state.over_limit.contains(&conn);
        state.refused_sessions += usize::from(over);
        over
    }
}

impl FakeUpstream {
    /// Starts on 127.0.0.1 on a free port below the kernel's ephemeral
    /// range. Tests stop the upstream and start it again on its port
    /// ([`Self::start_on`]); a port from the ephemeral range can meanwhile
    /// become the local port of any client connection on the machine, and
    /// the restart fails with "address in use" (seen as a flake under
    /// load). Below the range only an explicit bind can take it.
    pub async fn start() -> FakeUpstream {
        for _ in 0..1000 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, below_ephemeral_port()));
            match Self::start_on(addr).await {
                Ok(up) => return up,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("bind the fake upstream on {addr}: {e}"),
            }
        }
        panic!("no free port below the ephemeral range for the fake upstream")
    }

    /// Starts with `script` already in place, so even the first connection
    /// sees it.
    pub async fn start_with(script: Script) -> FakeUpstream {
        let upstream = Self::start().await;
        upstream.set_script(script);
        upstream
    }

    /// Starts on a given address, e.g. the one a stopped server had, to
    /// simulate the upstream coming back. SO_REUSEADDR lets it rebind while
    /// the old connections are in TIME_WAIT.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<FakeUpstream> {
        assert!(
            addr.ip().is_loopback(),
            "the fake upstream only listens on loopback"
        );
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(128)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        Ok(FakeUpstream {
            shared,
            addr,
            shutdown,
            accept_task: Some(accept_task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Replaces the script; applies from the next command on every
    /// connection, and restarts the `fail_first_n_transactions` count.
    pub fn set_script(&self, script: Script) {
        let mut state = self.shared.lock();
        state.script = script;
        state.bodies_seen = 0;
        state.followed_seen = 0;
        state.mails_seen = 0;
        state.kept_dropped = false;
    }

    /// Completed transactions so far.
    pub fn messages(&self) -> Vec<Received> {
        self.shared.lock().messages.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().connections
    }

    /// Every command line received, in order, tagged with its connection
    /// number: "#1 EHLO relay.example". Body lines are not included.
    pub fn commands(&self) -> Vec<String> {
        self.shared
            .lock()
            .commands
            .iter()
            .map(|(conn, line)| format!("#{conn} {line}"))
            .collect()
    }

    /// The command lines of one connection, untagged.
    pub fn commands_on(&self, conn: usize) -> Vec<String> {
        self.shared
            .lock()
            .commands
            .iter()
            .filter(|(c, _)| *c == conn)
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// How many times the client sent commands behind a body's final dot
    /// without waiting for the reply to it: the next message's envelope
    /// pipelined after the end of data (RFC 2920).
    pub fn sent_behind_dot(&self) -> usize {
        self.shared.lock().sent_behind_dot
    }

    /// The most connections open at once so far.
    pub fn peak_sessions(&self) -> usize {
        self.shared.lock().peak_active
    }

    /// When the [`Script::throttle_body`] 421 went out, and how many
    /// connections had been accepted by then.
    pub fn throttled(&self) -> Option<(std::time::Instant, usize)> {
        self.shared.lock().throttled
    }

    /// Connections refused for [`Script::max_sessions`] so far.
    pub fn refused_sessions(&self) -> usize {
        self.shared.lock().refused_sessions
    }

    /// Waits until at least `n` transactions completed and returns them all.
    /// Panics on timeout, listing what did arrive and the command log.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(timeout, |s| s.messages.len() >= n)
            .await
            .unwrap_or_else(|report| {
                panic!("fake upstream: expected {n} message(s) within {timeout:?}; {report}")
            });
        self.messages()
    }

    /// Waits until at least `n` connections were accepted. Panics on timeout.
    pub async fn wait_for_connections(&self, n: usize, timeout: Duration) {
        self.wait_until(timeout, |s| s.connections >= n)
            .await
            .unwrap_or_else(|report| {
                panic!("fake upstream: expected {n} connection(s) within {timeout:?}; {report}")
            });
    }

    async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&State) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Register for the wake-up before looking, so a change between
            // the look and the wait is not missed.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.shared.lock()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.report());
            }
        }
    }

    /// What arrived so far, for failure messages.
    fn report(&self) -> String {
        let state = self.shared.lock();
        let mut out = format!(
            "{} connection(s), {} message(s) arrived",
            state.connections,
            state.messages.len()
        );
        for m in &state.messages {
            let _ = write!(
                out,
                "\n  conn #{}: MAIL FROM:<{}> RCPT {:?}, {} body octets",
                m.conn,
                m.mail_from,
                m.rcpts,
                m.data.len()
            );
        }
        out.push_str("\ncommands received:");
        if state.commands.is_empty() {
            out.push_str(" none");
        }
        for (conn, line) in &state.commands {
            let _ = write!(out, "\n  #{conn} {line}");
        }
        out
    }

    /// Stops listening and drops every open connection, as if the upstream
    /// went down. When this returns the port is free and every client socket
    /// has been closed by this side.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // connection task in turn.
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
    }
}

/// The next candidate port in `10000..low`, where `low` starts the
/// kernel's ephemeral range; each call gives another, from a base set by
/// the process id so that test processes running at once rarely try the
/// same ones.
fn below_ephemeral_port() -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    static LOW: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = *LOW.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .filter(|&low: &u32| low > FIRST + 1000)
            .unwrap_or(32_768)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let base = std::process::id().wrapping_mul(7_919);
    (FIRST + base.wrapping_add(n) % (low - FIRST)) as u16
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sessions = JoinSet::new();
    // `None` once `accept_at_most` connections came: the port refuses more.
    let mut listener = Some(listener);
    // `stall_accept_after`: the connections held ungreeted until the queue
    // is full, then the listener no longer accepted from, and what fills
    // its queue.
    let mut waiting = Vec::new();
    let mut stalled = None;
    let mut _fillers = Vec::new();
    loop {
        let accepting = listener.is_some();
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            // Reap finished sessions so the set does not grow without bound.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = async { listener.as_ref().expect("accepting").accept().await }, if accepting => {
                let Ok((stream, _peer)) = accepted else { continue };
                // Replies are written one by one as commands arrive; with
                // Nagle on, a pipelined batch stalls for the peer's delayed
                // ACK (40 ms on Linux) on every message.
                let _ = stream.set_nodelay(true);
                let conn = {
                    let mut state = shared.lock();
                    state.connections += 1;
                    state.active += 1;
                    if state.script.accept_at_most.is_some_and(|max| state.connections >= max) {
                        listener = None;
                    }
                    state.connections
                };
                // Decided in order of arrival, as a server counts.
                let over = over_max_sessions(&shared).await;
                {
                    let mut state = shared.lock();
                    if over {
                        state.over_limit.insert(conn);
                    }
                    state.peak_active = state.peak_active.max(state.active);
                }
                shared.changed.notify_waiters();
                let stall = shared.script().stall_accept_after;
                waiting.push((stream, conn));
                if stall.is_some_and(|n| conn < n) {
                    continue;
                }
                if stall.is_some() {
                    let full = listener.take().expect("accepting");
                    _fillers = fill_listen_queue(&full).await;
                    stalled = Some(full);
                }
                for (stream, conn) in waiting.drain(..) {
                    let shared = shared.clone();
                    sessions.spawn(async move {
                        secure::serve_connection(stream, conn, shared.clone()).await;
                        {
                            let mut state = shared.lock();
                            if !state.closed_by_client.remove(&conn) {
                                state.active -= 1;
                            }
                        }
                        shared.changed.notify_waiters();
                    });
                }
            }
        }
    }
    drop(listener);
    drop(stalled);
    // Abort every session and wait until each has dropped its socket.
    sessions.shutdown().await;
}

/// How long a connection over `max_sessions` waits, at most, for the
/// sessions the server hung up on to be closed by their client.
const HANG_UP_GRACE: Duration = Duration::from_secs(5);

/// Whether the connection just accepted (counted in `active`) is over
/// [`Script::max_sessions`]. A session the server ended (421 and close)
/// counts until its client closes it, as at a relay that counts its
/// connections: a client that closes it before it connects again is not
/// refused for it, one that keeps it open while it connects again is.
/// The client's close arrives before its next connect, but each is read
/// by its own task here, so the count waits for those sessions to be
/// closed (or [`HANG_UP_GRACE`]), as a server reading its events in the
/// order they came would have.
async fn over_max_sessions(shared: &Shared) -> bool {
    let deadline = Instant::now() + HANG_UP_GRACE;
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let state = shared.lock();
            let Some(max) = state.script.max_sessions else {
                return false;
            };
            if state.active <= max {
                return false;
            }
            if state.hanging_up == 0 || Instant::now() >= deadline {
                return true;
            }
        }
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

/// Makes `listener`'s queue of connections waiting for accept() full, so
/// that the kernel drops further SYNs (Linux drops a SYN while the accept
/// queue is full): its backlog set to 0 (listen() again on a listening
/// socket only changes that) and one connection of our own queued. With
/// SYN cookies off, a backlog of 0 drops SYNs at once, ours included: a
/// connect that gets no answer within a second is taken as that. Returns
/// the connections that fill it, to be kept open.
async fn fill_listen_queue(listener: &TcpListener) -> Vec<tokio::net::TcpStream> {
    use std::os::fd::AsRawFd;
    // SAFETY: listen() on a socket this listener owns.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 0) };
    assert_eq!(rc, 0, "listen(0): {}", std::io::Error::last_os_error());
    let addr = listener.local_addr().expect("listener address");
    let mut fillers = Vec::new();
    // One fills a queue of backlog 0; a kernel that keeps one more needs two.
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    fillers
}

/// The envelope of the transaction in progress, from MAIL to the end of DATA.
struct Transaction {
    mail_from: String,
    mail_params: String,
    rcpts: Vec<String>,
    rcpt_params: Vec<String>,
    /// See [`Received::unanswered_before`].
    unanswered_before: Vec<usize>,
}

/// Why a session ended early; all of them just close the socket.
enum Closed {
    /// The peer went away or an I/O error occurred.
    Peer,
    /// The script said to drop the connection, or QUIT/421 ended it.
    ByUs,
    /// STARTTLS was answered 220: the stream goes to the TLS handshake.
    StartTls,
}

/// One SMTP session over any byte stream. `tls` says whether the stream is
/// already TLS; `greet` is false for the session after STARTTLS (RFC 3207:
/// the client speaks first). After a 220 to STARTTLS the stream is handed
/// back for the handshake.
async fn serve<S>(stream: S, conn: usize, shared: Arc<Shared>, tls: bool, greet: bool) -> Option<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session {
        io: BufReader::new(stream),
        conn,
        shared,
        helo: None,
        tx: None,
        greeting_refused: false,
        tls,
        authenticated: None,
        chunks: Vec::new(),
        had_body: false,
        bodies_here: 0,
        throttle_due: None,
        dropping: None,
        unflushed: None,
        held: None,
        kept_drop: None,
    };
    let ended = session.run(greet).await;
    // Replies held back still go out before the session ends (a 221 to
    // QUIT among them).
    let _ = session.flush_held().await;
    match ended {
        Err(Closed::StartTls) => Some(session.into_stream()),
        _ => None,
    }
}

struct Session<S> {
    io: BufReader<S>,
    conn: usize,
    shared: Arc<Shared>,
    helo: Option<String>,
    tx: Option<Transaction>,
    /// After a 5xx greeting the only useful command is QUIT.
    greeting_refused: bool,
    /// TLS was up when this session started (implicit, or after STARTTLS).
    tls: bool,
    /// The user name after a successful AUTH.
    authenticated: Option<String>,
    /// BDAT chunks of the transaction so far.
    chunks: Vec<u8>,
    /// A body was answered on this session (a message can come behind it).
    had_body: bool,
    /// Bodies answered on this session.
    bodies_here: usize,
    /// `throttle_after_body` is due on this session (the Nth body came on
    /// it): at the next RSET (`true`) or MAIL. Per session, so that the
    /// 421 answers the command behind that body, never another
    /// connection's first command.
    throttle_due: Option<bool>,
    /// `drop_in_txn`: this session's transaction is the one to drop in.
    dropping: Option<TxnDrop>,
    /// `TxnDrop::TakenUnflushed`: the replies held back, never sent; with
    /// `kept_drop`, sent when the client has sent all it had.
    unflushed: Option<String>,
    /// `drop_kept`: this session's transaction is the one to drop in.
    kept_drop: Option<KeptDrop>,
    /// `Script::hold_body_replies`: replies held back since a body's.
    held: Option<Held>,
}

/// Replies held back by [`Script::hold_body_replies`], to be flushed
/// together once the client sends nothing more for a while.
#[derive(Default)]
struct Held {
    out: String,
    /// The sizes of the bodies whose replies are in `out`.
    bodies: Vec<usize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn run(&mut self, greet: bool) -> Result<(), Closed> {
        if greet {
            self.greet().await?;
        }
        loop {
            let line = self.read_line().await?;
            let line = String::from_utf8_lossy(trim_crlf(&line)).into_owned();
            self.record(&line);
            self.command(&line).await?;
        }
    }

    async fn greet(&mut self) -> Result<(), Closed> {
        let script = self.shared.script();
        if script.drop_at == Some(Stage::Greeting) {
            return Err(Closed::ByUs);
        }
        let later = script.over_limit_at_auth.is_some() || script.over_limit_at_ehlo.is_some();
        if !later && self.shared.refuse_over_limit(self.conn) {
            self.reply(421, "4.7.0 Too many concurrent SMTP connections")
                .await?;
            return Err(Closed::ByUs);
        }
        tokio::time::sleep(script.setup_delay).await;
        match script.greeting {
            Some((code, text)) => {
                self.reply(code, &text).await?;
                if (400..500).contains(&code) {
                    return Err(Closed::ByUs);
                }
                self.greeting_refused = code >= 500;
            }
            None => {
                self.reply(220, &format!("{HOSTNAME} ESMTP fake upstream"))
                    .await?
            }
        }
        Ok(())
    }

    async fn command(&mut self, line: &str) -> Result<(), Closed> {
        let script = self.shared.script();
        let (verb, arg) = match line.split_once(' ') {
            Some((verb, arg)) => (verb.to_ascii_uppercase(), arg.trim()),
            None => (line.trim().to_ascii_uppercase(), ""),
        };
        if verb == "QUIT" {
            self.std_reply(&script, 221, "2.0.0", "Bye").await?;
            return Err(Closed::ByUs);
        }
        if self.greeting_refused {
            return self
                .std_reply(&script, 503, "5.5.1", "Error: service refused at greeting")
                .await;
        }
        match verb.as_str() {
            "RSET" | "MAIL" if self.throttle_due(&verb) => self.throttle_now().await,
            "MAIL"
                if script
                    .messages_per_connection
                    .is_some_and(|n| self.bodies_here >= n) =>
            {
                self.reply(421, "4.7.0 Too many messages in this session, closing")
                    .await?;
                self.hang_up().await;
                Err(Closed::ByUs)
            }
            "EHLO" | "HELO" => {
                if script.drop_at == Some(Stage::Ehlo) {
                    return Err(Closed::ByUs);
                }
                if arg.is_empty() {
                    return self
                        .std_reply(&script, 501, "5.5.4", "Syntax: EHLO hostname")
                        .await;
                }
                tokio::time::sleep(script.setup_delay).await;
                if let Some((code, text)) = &script.over_limit_at_ehlo
                    && self.shared.refuse_over_limit(self.conn)
                {
                    self.reply(*code, text).await?;
                    if *code == 421 {
                        self.hang_up().await;
                        return Err(Closed::ByUs);
                    }
                    return Ok(());
                }
                if verb == "EHLO"
                    && let Some((code, text)) = &script.ehlo_reply
                {
                    return self.reply(*code, text).await;
                }
                self.helo = Some(arg.to_string());
                self.tx = None;
                if verb == "HELO" {
                    return self.reply(250, HOSTNAME).await;
                }
                let mut lines = vec![HOSTNAME.to_string()];
                if script.pipelining {
                    lines.push("PIPELINING".into());
                }
                if let Some(limit) = script.size {
                    lines.push(format!("SIZE {limit}"));
                }
                if script.eightbitmime {
                    lines.push("8BITMIME".into());
                }
                if script.smtputf8 {
                    lines.push("SMTPUTF8".into());
                }
                if script.chunking {
                    lines.push("CHUNKING".into());
                }
                if script.dsn {
                    lines.push("DSN".into());
                }
                if script.enhancedstatuscodes {
                    lines.push("ENHANCEDSTATUSCODES".into());
                }
                lines.extend(self.secure_capabilities(&script));
                self.reply(250, &lines.join("\n")).await
            }
            "MAIL" => self.mail(&script, arg).await,
            "RCPT" => self.rcpt(&script, arg).await,
            "DATA" => self.data(&script).await,
            "BDAT" if script.chunking => self.bdat(&script, arg).await,
            "RSET" if self.kept_drop_starts(&script) => self.kept_rset(&script).await,
            "RSET" => {
                self.tx = None;
                self.chunks.clear();
                let next = self.shared.lock().mails_seen + 1;
                if script.drop_in_txn == Some((next, TxnDrop::TakenUnflushed)) {
                    self.unflushed = Some(String::new());
                }
                self.std_reply(&script, 250, "2.0.0", "Ok").await
            }
            "NOOP" => self.std_reply(&script, 250, "2.0.0", "Ok").await,
            "STARTTLS" => self.starttls(&script).await,
            "AUTH" => self.auth(&script, arg).await,
            _ => {
                self.std_reply(&script, 502, "5.5.2", "Error: command not recognized")
                    .await
            }
        }
    }

    async fn mail(&mut self, script: &Script, arg: &str) -> Result<(), Closed> {
        if script.drop_at == Some(Stage::Mail) {
            return Err(Closed::ByUs);
        }
        if self.refuses_first_mail(script) {
            return self.refuse_mail().await;
        }
        if self.helo.is_none() {
            return self
                .std_reply(script, 503, "5.5.1", "Error: send HELO/EHLO first")
                .await;
        }
        if self.tx.is_some() {
            return self
                .std_reply(script, 503, "5.5.1", "Error: nested MAIL command")
                .await;
        }
        if script.auth.is_some() && self.authenticated.is_none() {
            return self
                .std_reply(script, 530, "5.7.0", "Authentication required")
                .await;
        }
        let Some((mail_from, mail_params)) = strip_prefix_ci(arg, "FROM:").and_then(parse_path)
        else {
            return self
                .std_reply(script, 501, "5.5.4", "Syntax: MAIL FROM:<address>")
                .await;
        };
        if let Some(limit) = script.size {
            let declared = mail_params
                .split_whitespace()
                .find_map(|p| strip_prefix_ci(p, "SIZE="))
                .and_then(|n| n.parse::<usize>().ok());
            if declared.is_some_and(|n| n > limit) {
                return self
                    .std_reply(script, 552, "5.3.4", "Message size exceeds fixed limit")
                    .await;
            }
        }
        let (code, text) = script
            .mail_reply
            .clone()
            .unwrap_or_else(|| (250, enhanced(script, "2.1.0", "Ok")));
        if is_positive(code) {
            self.tx = Some(Transaction {
                mail_from,
                mail_params,
                rcpts: Vec::new(),
                rcpt_params: Vec::new(),
                unanswered_before: self
                    .held
                    .as_ref()
                    .map(|h| h.bodies.clone())
                    .unwrap_or_default(),
            });
            let mut state = self.shared.lock();
            state.mails_seen += 1;
            if let Some((n, at)) = script.drop_in_txn
                && n == state.mails_seen
            {
                self.dropping = Some(at);
                if at == TxnDrop::TakenUnflushed && self.unflushed.is_none() {
                    self.unflushed = Some(String::new());
                }
            }
        }
        self.reply(code, &text).await?;
        self.drop_if(TxnDrop::AfterMail).await
    }

    /// Hangs up if the transaction is the one to drop in, at `at`.
    async fn drop_if(&mut self, at: TxnDrop) -> Result<(), Closed> {
        if self.dropping != Some(at) {
            return Ok(());
        }
        self.hang_up().await;
        Err(Closed::ByUs)
    }

    async fn rcpt(&mut self, script: &Script, arg: &str) -> Result<(), Closed> {
        let Some(tx) = &self.tx else {
            return self
                .std_reply(script, 503, "5.5.1", "Error: need MAIL command")
                .await;
        };
        if script.drop_at == Some(Stage::Rcpt) && tx.rcpts.is_empty() {
            return Err(Closed::ByUs);
        }
        let Some((address, params)) = strip_prefix_ci(arg, "TO:").and_then(parse_path) else {
            return self
                .std_reply(script, 501, "5.5.4", "Syntax: RCPT TO:<address>")
                .await;
        };
        let full = script.max_rcpts.is_some_and(|max| tx.rcpts.len() >= max);
        let (code, text) = script
            .rcpt_replies
            .iter()
            .find(|(a, _, _)| a.eq_ignore_ascii_case(&address))
            .map(|(_, code, text)| (*code, text.clone()))
            .filter(|_| !full)
            .unwrap_or_else(|| {
                if full {
                    (452, enhanced(script, "4.5.3", "Too many recipients"))
                } else {
                    (250, enhanced(script, "2.1.5", "Ok"))
                }
            });
        if is_positive(code)
            && let Some(tx) = &mut self.tx
        {
            tx.rcpts.push(address);
            tx.rcpt_params.push(params);
        }
        self.reply(code, &text).await?;
        self.drop_if(TxnDrop::AfterRcpt).await
    }

    async fn data(&mut self, script: &Script) -> Result<(), Closed> {
        if script.drop_at == Some(Stage::Data) {
            return Err(Closed::ByUs);
        }
        self.kept_drop_if(KeptDrop::BeforeBody).await?;
        match &self.tx {
            None => {
                return self
                    .std_reply(script, 503, "5.5.1", "Error: need RCPT command")
                    .await;
            }
            Some(tx) if tx.rcpts.is_empty() => {
                return self
                    .std_reply(script, 554, "5.5.1", "Error: no valid recipients")
                    .await;
            }
            Some(_) => {}
        }
        self.reply(354, "End data with <CR><LF>.<CR><LF>").await?;

        let mut data = Vec::new();
        let followed = loop {
            let line = self.read_line().await?;
            if line == b".\r\n" {
                // Nothing has been answered since the dot arrived, so bytes
                // already here were sent without waiting for the reply.
                break !self.io.buffer().is_empty();
            }
            // RFC 5321 4.5.2: a leading dot was added by the client; drop it.
            data.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
            if script.drop_at == Some(Stage::DataBody) {
                return Err(Closed::ByUs);
            }
            self.drop_if(TxnDrop::MidChunk).await?;
        };
        self.end_of_message(data, "DATA", followed).await
    }

    /// The whole body is in (after the dot, or the last BDAT chunk): the
    /// scripted fate of the message, recorded, and the reply.
    async fn end_of_message(
        &mut self,
        data: Vec<u8>,
        via: &'static str,
        followed: bool,
    ) -> Result<(), Closed> {
        if followed {
            self.shared.lock().sent_behind_dot += 1;
        }
        let size = data.len();
        // The script may have changed while the body was arriving.
        let script = self.shared.script();
        if script.drop_at == Some(Stage::DataEnd) {
            return Err(Closed::ByUs);
        }
        self.drop_if(TxnDrop::AfterLast).await?;
        let Some(tx) = self.tx.take() else {
            return Err(Closed::ByUs);
        };

        let (failing, throttled, close) = {
            let mut state = self.shared.lock();
            state.bodies_seen += 1;
            if let Some((n, at_rset)) = script.throttle_after_body
                && n == state.bodies_seen
            {
                self.throttle_due = Some(at_rset);
            }
            state.followed_seen += usize::from(followed);
            let throttled = script.throttle_body == Some(state.bodies_seen);
            (
                state.bodies_seen <= script.fail_first_n_transactions,
                throttled,
                throttled
                    || script.close_after_body == Some(state.bodies_seen)
                    || (followed && script.close_in_window == Some(state.followed_seen)),
            )
        };
        let (code, text, queue_id) = if throttled {
            (
                421,
                "4.7.0 Too many messages, slow down".into(),
                String::new(),
            )
        } else if failing {
            let text = enhanced(&script, "4.3.0", "Error: temporary failure (scripted)");
            (451, text, String::new())
        } else if script.size.is_some_and(|limit| data.len() > limit) {
            let text = enhanced(&script, "5.3.4", "Message size exceeds fixed limit");
            (552, text, String::new())
        } else if let Some((_, code, text)) = script
            .data_replies_by_sender
            .iter()
            .find(|(s, _, _)| s.eq_ignore_ascii_case(&tx.mail_from))
        {
            (*code, text.clone(), String::new())
        } else if let Some((code, text)) = &script.data_reply {
            (*code, text.clone(), String::new())
        } else {
            let n = {
                let mut state = self.shared.lock();
                state.queued += 1;
                state.queued
            };
            let id = format!("FAKE{n}");
            let text = enhanced(&script, "2.0.0", &format!("Ok: queued as {id}"));
            (250, text, id)
        };

        if !script.reply_delay.is_zero() {
            tokio::time::sleep(script.reply_delay).await;
        }
        if !script.crowding.is_zero() {
            let open = self.shared.lock().active as u32;
            tokio::time::sleep(script.crowding * open * open).await;
        }
        if is_positive(code) {
            // Recorded just before the reply: whoever has seen the 250 can
            // also see the message.
            let received = Received {
                conn: self.conn,
                helo: self.helo.clone().unwrap_or_default(),
                mail_from: tx.mail_from,
                mail_params: tx.mail_params,
                rcpts: tx.rcpts,
                rcpt_params: tx.rcpt_params,
                data,
                queue_id,
                via,
                followed,
                at: std::time::Instant::now(),
                unanswered_before: tx.unanswered_before,
            };
            self.shared.lock().messages.push(received);
            self.shared.changed.notify_waiters();
        }
        self.drop_if(TxnDrop::AfterLastTaken).await?;
        self.drop_if(TxnDrop::TakenUnflushed).await?;
        self.kept_drop_if(KeptDrop::AfterLastTaken).await?;
        if throttled {
            let mut state = self.shared.lock();
            let opened = state.connections;
            state.throttled = Some((std::time::Instant::now(), opened));
        }
        if script.hold_body_replies.is_some() {
            self.held
                .get_or_insert_with(Held::default)
                .bodies
                .push(size);
        }
        self.write_reply(code, &text).await?;
        self.had_body = true;
        self.bodies_here += 1;
        self.drop_if(TxnDrop::AfterReply).await?;
        if close {
            self.hang_up().await;
            return Err(Closed::ByUs);
        }
        Ok(())
    }

    /// Whether `verb` (RSET or MAIL) is to get `throttle_after_body`'s
    /// 421; it is then no longer due.
    fn throttle_due(&mut self, verb: &str) -> bool {
        let due = self.had_body
            && match self.throttle_due {
                Some(true) => verb == "RSET",
                Some(false) => verb == "MAIL",
                None => false,
            };
        if due {
            self.throttle_due = None;
        }
        due
    }

    /// `throttle_after_body`: 421 to the command after a body, and close.
    async fn throttle_now(&mut self) -> Result<(), Closed> {
        {
            let mut state = self.shared.lock();
            let opened = state.connections;
            state.throttled = Some((std::time::Instant::now(), opened));
        }
        self.reply(421, "4.7.0 Too many messages, closing").await?;
        self.hang_up().await;
        Err(Closed::ByUs)
    }

    /// `Script::hold_body_replies`: replies held back go out once the
    /// client has sent nothing more for the scripted while (it waits for
    /// them); while it sends more, they stay held.
    async fn flush_when_quiet(&mut self) -> Result<(), Closed> {
        let Some(quiet) = self.shared.script().hold_body_replies else {
            return self.flush_held().await;
        };
        if self.held.is_none() || !self.io.buffer().is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(quiet, self.io.fill_buf()).await {
            Ok(Ok(more)) if !more.is_empty() => Ok(()),
            _ => self.flush_held().await,
        }
    }

    /// Writes the replies held back, if any.
    async fn flush_held(&mut self) -> Result<(), Closed> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let io = self.io.get_mut();
        io.write_all(held.out.as_bytes())
            .await
            .map_err(|_| Closed::Peer)?;
        io.flush().await.map_err(|_| Closed::Peer)
    }

    /// Ends the session after what was answered: closes our side (the
    /// replies already written arrive, then end of stream) and processes
    /// nothing more, discarding what the client still sends until it hangs
    /// up. Closing with unread input would make the kernel reset the
    /// connection, which may destroy replies in flight: that is not the
    /// line this models dropping.
    async fn hang_up(&mut self) {
        use tokio::io::AsyncReadExt;
        let _ = self.flush_held().await;
        let _ = self.io.get_mut().shutdown().await;
        self.shared.lock().hanging_up += 1;
        let mut sink = [0u8; 4096];
        let drain = async { while matches!(self.io.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
        // Closed (or given up on): no longer one of the relay's sessions.
        {
            let mut state = self.shared.lock();
            state.hanging_up -= 1;
            if state.closed_by_client.insert(self.conn) {
                state.active -= 1;
            }
        }
        self.shared.changed.notify_waiters();
    }

    /// A reply whose text gets the enhanced code when the script advertises it.
    async fn std_reply(
        &mut self,
        script: &Script,
        code: u16,
        enh: &str,
        text: &str,
    ) -> Result<(), Closed> {
        self.reply(code, &enhanced(script, enh, text)).await
    }

    /// Waits the scripted delay, then writes the reply.
    async fn reply(&mut self, code: u16, text: &str) -> Result<(), Closed> {
        let delay = self.shared.script().reply_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.write_reply(code, text).await
    }

    /// Writes `code text`; a text with '\n' in it becomes a multi-line reply.
    async fn write_reply(&mut self, code: u16, text: &str) -> Result<(), Closed> {
        let lines: Vec<&str> = text.split('\n').map(|l| l.trim_end_matches('\r')).collect();
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            let _ = write!(out, "{code}{sep}{line}\r\n");
        }
        if let Some(held) = &mut self.unflushed {
            held.push_str(&out);
            return Ok(());
        }
        if let Some(held) = &mut self.held {
            held.out.push_str(&out);
            return Ok(());
        }
        let io = self.io.get_mut();
        io.write_all(out.as_bytes())
            .await
            .map_err(|_| Closed::Peer)?;
        io.flush().await.map_err(|_| Closed::Peer)
    }

    /// One line including its line ending; end of stream ends the session.
    async fn read_line(&mut self) -> Result<Vec<u8>, Closed> {
        self.flush_if_dry().await?;
        self.flush_when_quiet().await?;
        let mut line = Vec::new();
        match self.io.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => Err(Closed::Peer),
            Ok(_) => Ok(line),
        }
    }
}

fn enhanced(script: &Script, enh: &str, text: &str) -> String {
    if script.enhancedstatuscodes {
        format!("{enh} {text}")
    } else {
        text.to_string()
    }
}

fn is_positive(code: u16) -> bool {
    (200..300).contains(&code)
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Splits "<addr> PARAMS" (a space after the colon tolerated) into the
/// address without brackets and the trimmed parameters.
fn parse_path(s: &str) -> Option<(String, String)> {
    let s = s.trim_start();
    let rest = s.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some((rest[..end].to_string(), rest[end + 1..].trim().to_string()))
}
