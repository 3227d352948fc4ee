//! The relay transport: delivery to one relay over SMTP on one connection,
//! reused across messages (RSET between them). Connections live in the
//! relay's pool (`transport::pool`), which closes them after
//! `idle_timeout` without work.
//!
//! Besides each recipient's outcome, an attempt says what it learned about
//! the relay itself (a [`Signal`] for the circuit breaker): a connection,
//! TLS or greeting failure is the relay being down, a `421` or a `454` to
//! AUTH ("too many connections/logins") is it throttling us, a permanent
//! refusal of our login or no OAuth2 token is it refusing us (both pause
//! it at once), and anything
//! the relay said about the message, a permanent refusal included, means
//! it is up. (While other connections to the relay work, the router takes
//! a refused or unanswered connection as pushback on its concurrency
//! instead: see `routing::concurrency`; [`NotReady::no_answer`] and the
//! pool's count of established connections tell it, and
//! `transport::openings`, told how far each attempt to open a connection
//! got, how many the relay served when it refused one.)
//!
//! To a relay that offers CHUNKING with PIPELINING, [`RelaySender::push`]
//! writes whole messages one behind the other and
//! [`RelaySender::settle_pushed`] reads each one's replies in turn (the
//! window is the router's: `routing::follow`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::oauth2::TokenSource;
use super::openings::{Opening, Openings};
use super::smtp::{
    AuthMechanism, Chunked, ClientConfig, Connection, Credentials, Envelope, NextTxn, Opened,
    Pending, Reply, Secret, SmtpError, Streamed, TlsMode, TlsOptions, TxnReport, Written,
};
use crate::config::{AuthMechanismConfig, Config, RelayConfig, TlsModeConfig};
use crate::delivery::outcome::{AttemptReport, RcptOutcome};
use crate::routing::health::Signal;
use crate::spool::Meta;

pub struct RelaySender {
    relay: RelayConfig,
    helo_name: String,
    /// The relay's OAuth2 tokens, shared with its other connections.
    tokens: Option<Arc<TokenSource>>,
    conn: Option<Connection>,
    /// Messages sent on the current connection.
    sent: u32,
    /// The pool's count of established connections, kept while `conn` is
    /// open.
    established: Option<Arc<AtomicUsize>>,
    /// The address of the last connection, kept once it is dropped: the
    /// relay a message written on it is reported as having been tried at.
    last_peer: Option<SocketAddr>,
    /// The pool's connections being opened, told how far each attempt of
    /// this sender gets.
    openings: Option<Arc<Openings>>,
    /// The last attempt, when it failed: kept until the slot is given
    /// back or the next attempt, so that a refusal counts it as held and
    /// not served ([`RelaySender::failed_opening`]).
    failed: Option<Opening>,
}

impl Drop for RelaySender {
    fn drop(&mut self) {
        self.drop_conn();
    }
}

/// Why no connection could be had for a message.
pub struct NotReady {
    /// Every recipient deferred.
    pub report: AttemptReport,
    pub signal: Signal,
    /// The relay did not answer: the connection was refused or timed out.
    pub no_answer: bool,
}

/// What became of a message written into a stream ([`RelaySender::push`]).
pub enum Pushed {
    /// On the wire: settle it in turn.
    InFlight(Chunked),
    /// Nothing written: the kept connection was found dead at the RSET it
    /// owed (no reply, or a 421), and is dropped. Nothing of the message
    /// was taken; a new connection may carry it at once.
    Stale(SmtpError),
    /// The write failed part way (the relay hung up inside the body), on
    /// a connection that had answered: nothing taken (a chunk cut short
    /// is discarded), but this was the message's attempt, as a body
    /// DATA could not write is.
    Failed(SmtpError),
    /// Not written: send it the usual way (its envelope is too large for
    /// the stream, its report is known without the relay, or the stream
    /// broke before it).
    Back,
}

/// What [`RelaySender::write_opened`] did.
pub enum Wrote {
    /// The body is on its way; read its reply with
    /// [`RelaySender::read_written`].
    Yes(Written),
    /// The write failed: the message's report, and what became of the
    /// envelope that was to go behind it.
    No(AttemptReport, Signal, NextTxn),
}

/// A streamed message once its turn came ([`RelaySender::settle_pushed`]).
pub enum Answered {
    /// The relay answered it: its report.
    Yes(AttemptReport, Signal),
    /// The relay answered its RSET or MAIL with 421 and ended the
    /// session: nothing of it was taken, and none of those behind it
    /// either (a server processes nothing after a 421). The 421, to be
    /// counted once, as the connection's pushback.
    Closed(SmtpError),
    /// Its replies were never read (the line dropped, a timeout, or an
    /// earlier one's were lost): why. Written whole on a connection that
    /// had answered, it may have been taken (a kept connection found dead
    /// is found so before anything is written: [`Pushed::Back`]).
    No(SmtpError),
}

/// Why a connection could not be opened: where, what, and what it says
/// about the relay.
struct ConnectFailure {
    relay: String,
    reason: String,
    /// Enhanced status code for the deferral (see `SmtpError::dsn`).
    status: String,
    signal: Signal,
}

impl RelaySender {
    pub fn new(config: &Arc<Config>) -> anyhow::Result<RelaySender> {
        let relay = config
            .relay
            .clone()
            .ok_or_else(|| anyhow::anyhow!("the relay transport needs a [relay] section"))?;
        let label = format!("relay {}:{}", relay.host, relay.port);
        let tokens = TokenSource::for_relay(&relay, label, crate::clock::Clock::new());
        Ok(RelaySender::for_relay(
            relay,
            config.hostname.clone(),
            tokens,
        ))
    }

    /// A sender for one relay, not yet connected; `tokens` is the relay's
    /// OAuth2 token source, if relayq gets its tokens.
    pub fn for_relay(
        relay: RelayConfig,
        helo_name: String,
        tokens: Option<Arc<TokenSource>>,
    ) -> RelaySender {
        RelaySender {
            relay,
            helo_name,
            tokens,
            conn: None,
            sent: 0,
            established: None,
            last_peer: None,
            openings: None,
            failed: None,
        }
    }

    /// Keeps `established` counting this sender's open connection, and
    /// `openings` told how far each attempt to open one gets.
    pub fn counted(
        mut self,
        established: Arc<AtomicUsize>,
        openings: Arc<Openings>,
    ) -> RelaySender {
        self.established = Some(established);
        self.openings = Some(openings);
        self
    }

    /// The last attempt to open a connection, if it failed (the relay
    /// refused it, say): for [`Openings::served_with`].
    pub fn failed_opening(&self) -> Option<&Opening> {
        self.failed.as_ref()
    }

    /// [`RelaySender::failed_opening`], taken to end it with the slot.
    pub fn take_failed_opening(&mut self) -> Option<Opening> {
        self.failed.take()
    }

    fn put_conn(&mut self, conn: Connection) {
        if self.conn.is_none()
            && let Some(n) = &self.established
        {
            n.fetch_add(1, Ordering::SeqCst);
        }
        self.last_peer = Some(conn.peer());
        self.conn = Some(conn);
    }

    fn take_conn(&mut self) -> Option<Connection> {
        let conn = self.conn.take();
        if conn.is_some()
            && let Some(n) = &self.established
        {
            n.fetch_sub(1, Ordering::SeqCst);
        }
        conn
    }

    fn drop_conn(&mut self) {
        drop(self.take_conn());
    }

    /// The relay's OAuth2 token source, if relayq gets its tokens.
    pub fn tokens(&self) -> Option<&Arc<TokenSource>> {
        self.tokens.as_ref()
    }

    /// Messages sent on the current connection.
    pub fn sent_on_connection(&self) -> u32 {
        self.sent
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    pub fn idle_timeout(&self) -> Duration {
        self.relay.idle_timeout.0
    }

    pub async fn close(&mut self) {
        self.sent = 0;
        if let Some(c) = self.take_conn() {
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
        client_config(&self.relay, &self.helo_name, addr, self.tokens.as_ref())
    }

    /// Opens a connection, trying each address of the relay in turn.
    async fn connect(&mut self) -> Result<(), ConnectFailure> {
        // No address (4.4.3, as Postfix says for a name service error), or
        // a relay setting that can't be used (4.3.5).
        let down = |relay: String, reason: String, status: &str| ConnectFailure {
            signal: Signal::Down(reason.clone()),
            status: status.into(),
            relay,
            reason,
        };
        self.sent = 0;
        let addrs = self.resolve().await.map_err(|e| {
            crate::observe::events::relay_failed(&self.describe(None), "dns", &e);
            down(self.describe(None), e, "4.4.3")
        })?;
        let mut last = down(self.describe(None), String::from("no address"), "4.4.3");
        for addr in addrs {
            let cfg = match self.client_config(addr) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(target: "relayq::delivery", "relay {}: {e}", self.describe(None));
                    return Err(down(self.describe(None), e, "4.3.5"));
                }
            };
            // The last attempt's failure is over: this one is counted now.
            self.failed = None;
            let opening = self.openings.as_ref().map(|o| o.begin());
            let step = || {
                if let Some(o) = &opening {
                    o.step();
                }
            };
            let opened = Connection::open_noting(&cfg, &step).await;
            if opened.is_err()
                && let Some(o) = opening
            {
                o.fail();
                self.failed = Some(o);
            }
            match opened {
                Ok(c) => {
                    crate::observe::events::relay_connected(&self.describe(None));
                    self.put_conn(c);
                    return Ok(());
                }
                Err(e @ SmtpError::OAuth2(_)) => {
                    // The token source logged the provider's error and the
                    // fix once for every connection waiting on it.
                    crate::observe::events::relay_failed(
                        &self.describe(None),
                        e.stage(),
                        &e.to_string(),
                    );
                    return Err(ConnectFailure {
                        signal: Signal::Refused(e.to_string()),
                        reason: e.to_string(),
                        status: e.dsn(),
                        relay: self.describe(None),
                    });
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
                        "relay {relay}: {e}; fix: {} (mail stays queued)",
                        self.auth_fix(&e)
                    );
                    return Err(ConnectFailure {
                        signal: connect_signal(&e),
                        reason: e.to_string(),
                        status: e.dsn(),
                        relay,
                    });
                }
                Err(e) => {
                    tracing::warn!(target: "relayq::delivery", "connect to {}: {e}", self.describe(Some(addr)));
                    crate::observe::events::relay_failed(
                        &self.describe(None),
                        e.stage(),
                        &e.to_string(),
                    );
                    last = ConnectFailure {
                        signal: connect_signal(&e),
                        relay: self.describe(Some(addr)),
                        reason: e.to_string(),
                        status: e.dsn(),
                    };
                }
            }
        }
        Err(last)
    }

    /// What to change when the relay refuses our login.
    pub fn auth_fix(&self, e: &SmtpError) -> String {
        let settings = self.tokens.as_ref().map(|t| t.settings());
        let generic = || match settings {
            Some(_) => "check username (the mailbox) and the oauth2_* keys".to_string(),
            None => "check [relay] username and password".to_string(),
        };
        match e {
            SmtpError::AuthRejected { reply } => crate::transport::oauth2::advice::auth_refused(
                &reply.one_line(),
                &self.relay.host,
                settings,
            )
            .unwrap_or_else(generic),
            _ => generic(),
        }
    }

    /// Makes sure a usable connection is open (RSET on a kept one, else a
    /// new one): what the prober does to see whether a relay is back.
    pub async fn probe(&mut self) -> Signal {
        if let Some(conn) = self.conn.as_mut()
            && (!conn.is_usable() || conn.ping().await.is_err())
        {
            self.drop_conn();
        }
        if self.conn.is_some() {
            return Signal::Ok;
        }
        match self.connect().await {
            Ok(()) => Signal::Ok,
            Err(f) => f.signal,
        }
    }

    pub async fn deliver(&mut self, meta: &Meta, body: &[u8], rcpts: &[usize]) -> AttemptReport {
        self.deliver_checked(meta, body, rcpts).await.0
    }

    /// Delivers, and says what the attempt showed about the relay.
    pub async fn deliver_checked(
        &mut self,
        meta: &Meta,
        body: &[u8],
        rcpts: &[usize],
    ) -> (AttemptReport, Signal) {
        let started = Instant::now();
        if let Err(failed) = self.ready(rcpts, started).await {
            return (failed.report, failed.signal);
        }
        let (report, signal, _) = self
            .transmit(Outgoing { meta, body, rcpts }, None, started)
            .await;
        (report, signal)
    }

    /// Makes sure a connection is open for the next message: the kept one
    /// (owing a RSET) or a new one. `Err` is the attempt's report when none
    /// could be opened.
    pub async fn ready(&mut self, rcpts: &[usize], started: Instant) -> Result<(), NotReady> {
        // A kept connection owes a RSET, which goes out pipelined with the
        // next MAIL; if the connection went stale meanwhile, send() opens a
        // fresh one. Without pipelining the RSET is a round trip here.
        if let Some(conn) = self.conn.as_mut()
            && (!conn.is_usable() || conn.reset().await.is_err())
        {
            self.drop_conn();
        }
        if self.conn.is_none()
            && let Err(ConnectFailure {
                relay,
                reason,
                status,
                signal,
            }) = self.connect().await
        {
            let report = deferred(relay, rcpts, &reason, &status, started.elapsed());
            return Err(NotReady {
                report,
                signal,
                // "4.4.1": refused or timed out (SmtpError::dsn).
                no_answer: status == "4.4.1",
            });
        }
        Ok(())
    }

    /// Whether the connection streams whole transactions (CHUNKING with
    /// PIPELINING) and `max_messages_per_connection` leaves room for one
    /// more.
    pub fn can_stream(&self) -> bool {
        self.conn.as_ref().is_some_and(Connection::streams)
            && self
                .relay
                .max_messages_per_connection
                .is_none_or(|max| self.sent < max)
    }

    /// Whether the connection was kept from before this attempt (it owes
    /// the RSET that ends the previous transaction, or a probe's): a 421
    /// before its first transaction began is then the relay's idle
    /// timeout or limit, not the message's, as on the DATA path
    /// (`Connection::send_then`). A connection opened for this attempt
    /// is not kept.
    pub fn is_kept(&self) -> bool {
        self.conn.as_ref().is_some_and(Connection::owes_rset)
    }

    /// Writes `msg` as a whole transaction behind those in flight.
    pub async fn push(&mut self, msg: Outgoing<'_>) -> Pushed {
        let Some(conn) = self.conn.as_mut() else {
            return Pushed::Back;
        };
        let addrs = msg.addresses();
        let body = for_upstream(conn, msg);
        match conn.send_chunked(&msg.envelope(&addrs), &body).await {
            Streamed::InFlight(chunked) => {
                self.sent += 1;
                Pushed::InFlight(chunked)
            }
            Streamed::Lost(e) => {
                // Nothing of it was taken (a kept connection found dead at
                // its RSET, or a write cut short); the replies to those
                // written before it can still be read.
                if conn.is_spent() {
                    self.drop_conn();
                }
                match e {
                    e if e.connection_was_stale() => Pushed::Stale(e),
                    SmtpError::Unusable => Pushed::Back,
                    e => Pushed::Failed(e),
                }
            }
            Streamed::Known(_) | Streamed::NotStreamable => Pushed::Back,
        }
    }

    /// Reads the replies to the oldest message in flight. `since` is when
    /// it was written.
    pub async fn settle_pushed(
        &mut self,
        chunked: Chunked,
        rcpts: &[usize],
        since: Instant,
    ) -> Answered {
        let relay = self.describe(self.conn.as_ref().map(|c| c.peer()));
        let Some(conn) = self.conn.as_mut() else {
            return Answered::No(SmtpError::Unusable);
        };
        let result = conn.settle_chunked(chunked).await;
        if let Err(e) = &result
            && e.closed_before_transaction()
        {
            self.drop_conn();
            return Answered::Closed(result.err().unwrap_or(SmtpError::Unusable));
        }
        // No reply, or one out of step: the relay said nothing about this
        // message that can be trusted (a 421 is an answer).
        if matches!(
            &result,
            Err(SmtpError::Unusable
                | SmtpError::Closed { .. }
                | SmtpError::Io { .. }
                | SmtpError::Timeout { .. }
                | SmtpError::Protocol { .. })
        ) {
            self.drop_conn();
            return Answered::No(result.err().unwrap_or(SmtpError::Unusable));
        }
        let (report, signal) = self.report(relay, result, rcpts, since);
        Answered::Yes(report, signal)
    }

    /// Whether another message may ride behind the next one sent: the
    /// connection pipelines and `max_messages_per_connection` leaves room
    /// for both.
    pub fn can_pipeline(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.is_usable() && c.capabilities().pipelining)
            && self
                .relay
                .max_messages_per_connection
                .is_none_or(|max| self.sent.saturating_add(1) < max)
    }

    /// Sends `msg` on the connection [`RelaySender::ready`] opened and,
    /// when the relay pipelines, `next`'s envelope behind its end of data.
    pub async fn transmit(
        &mut self,
        msg: Outgoing<'_>,
        next: Option<Outgoing<'_>>,
        started: Instant,
    ) -> (AttemptReport, Signal, NextTxn) {
        let conn_time = started.elapsed();
        let relay = self.describe(self.conn.as_ref().map(|c| c.peer()));
        let Some(conn) = self.conn.as_mut() else {
            let report = deferred(relay, msg.rcpts, "no connection", "4.4.1", conn_time);
            return (
                report,
                Signal::Down("no connection".into()),
                NextTxn::NotSent,
            );
        };
        let addrs = msg.addresses();
        let env = msg.envelope(&addrs);
        let body = for_upstream(conn, msg);
        let upstream_dsn = conn.capabilities().dsn;
        let next_addrs = next.map(|n| n.addresses()).unwrap_or_default();
        let next_env = next.map(|n| (n.envelope(&next_addrs), n.body.len()));
        let xfer_start = Instant::now();
        self.sent += 1;
        let sent = conn
            .send_then(&env, &body, next_env.as_ref().map(|(e, n)| (e, *n)))
            .await;
        let (results, signal) = self.outcomes(sent.this, msg.rcpts);
        let report = AttemptReport {
            relay,
            results,
            conn_time,
            xfer_time: xfer_start.elapsed(),
            upstream_dsn,
            ..AttemptReport::default()
        };
        (report, signal, sent.next)
    }

    /// Sends the body of the transaction opened behind the previous
    /// message (and `next`'s envelope behind it). `since` is when its
    /// envelope went out.
    pub async fn transmit_opened(
        &mut self,
        opened: Opened,
        msg: Outgoing<'_>,
        next: Option<Outgoing<'_>>,
        since: Instant,
    ) -> (AttemptReport, Signal, NextTxn) {
        match self.write_opened(opened, msg, next, since).await {
            Wrote::Yes(written) => self.read_written(written, msg.rcpts, since).await,
            Wrote::No(report, signal, next) => (report, signal, next),
        }
    }

    /// The first half of [`RelaySender::transmit_opened`]: the body (and
    /// `next`'s envelope) written, the reply not awaited.
    pub async fn write_opened(
        &mut self,
        opened: Opened,
        msg: Outgoing<'_>,
        next: Option<Outgoing<'_>>,
        since: Instant,
    ) -> Wrote {
        let relay = self.describe(self.conn.as_ref().map(|c| c.peer()));
        let Some(conn) = self.conn.as_mut() else {
            let reason = "connection lost before the body was sent";
            let report = deferred(relay, msg.rcpts, reason, "4.4.2", Duration::ZERO);
            return Wrote::No(report, Signal::Down(reason.into()), NextTxn::NotSent);
        };
        let next_addrs = next.map(|n| n.addresses()).unwrap_or_default();
        let next_env = next.map(|n| (n.envelope(&next_addrs), n.body.len()));
        self.sent += 1;
        let body = for_upstream(conn, msg);
        let written = conn
            .write_opened(opened, &body, next_env.as_ref().map(|(e, n)| (e, *n)))
            .await;
        match written {
            Ok(written) => Wrote::Yes(written),
            Err(sent) => {
                let (report, signal) = self.report(relay, sent.this, msg.rcpts, since);
                Wrote::No(report, signal, sent.next)
            }
        }
    }

    /// The second half: the reply to a body [`RelaySender::write_opened`]
    /// wrote, and what became of the envelope behind it.
    pub async fn read_written(
        &mut self,
        written: Written,
        rcpts: &[usize],
        since: Instant,
    ) -> (AttemptReport, Signal, NextTxn) {
        let relay = self.describe(self.conn.as_ref().map(|c| c.peer()));
        let Some(conn) = self.conn.as_mut() else {
            let reason = "connection lost before the reply to the body";
            let report = deferred(relay, rcpts, reason, "4.4.2", Duration::ZERO);
            return (report, Signal::Down(reason.into()), NextTxn::NotSent);
        };
        let sent = conn.read_written(written).await;
        let (report, signal) = self.report(relay, sent.this, rcpts, since);
        (report, signal, sent.next)
    }

    /// Whether the replies to an envelope sent behind the previous end of
    /// data are here already (settling it then costs no wait).
    pub async fn replies_arrived(&mut self, pending: &Pending) -> bool {
        match self.conn.as_mut() {
            Some(conn) => conn.replies_arrived(pending).await,
            None => false,
        }
    }

    /// Reads the replies to the envelope sent behind the previous message's
    /// end of data ([`NextTxn::Pending`]).
    pub async fn settle_next(&mut self, pending: Pending) -> NextTxn {
        let Some(conn) = self.conn.as_mut() else {
            return NextTxn::Lost("connection closed".into());
        };
        let next = conn.settle_next(pending).await;
        if !conn.is_usable() && !matches!(next, NextTxn::Done(_)) {
            self.drop_conn();
        }
        next
    }

    /// The report of a transaction pipelined behind the previous message
    /// that ended without a body ([`NextTxn::Done`]), or of a streamed one
    /// whose connection ended (logged with the relay's address, as the
    /// same outcome on a connection still open is).
    pub fn report_done(
        &mut self,
        result: Result<TxnReport, SmtpError>,
        rcpts: &[usize],
        since: Instant,
    ) -> (AttemptReport, Signal) {
        let peer = self.conn.as_ref().map(|c| c.peer()).or(self.last_peer);
        let relay = self.describe(peer);
        self.sent += 1;
        self.report(relay, result, rcpts, since)
    }

    fn report(
        &mut self,
        relay: String,
        result: Result<TxnReport, SmtpError>,
        rcpts: &[usize],
        since: Instant,
    ) -> (AttemptReport, Signal) {
        let upstream_dsn = self.conn.as_ref().is_some_and(|c| c.capabilities().dsn);
        let (results, signal) = self.outcomes(result, rcpts);
        let report = AttemptReport {
            relay,
            results,
            xfer_time: since.elapsed(),
            upstream_dsn,
            ..AttemptReport::default()
        };
        (report, signal)
    }

    /// Each recipient's outcome, and what the transaction showed about the
    /// relay. Drops the connection if it can't be used again.
    fn outcomes(
        &mut self,
        result: Result<TxnReport, SmtpError>,
        rcpts: &[usize],
    ) -> (Vec<(usize, RcptOutcome)>, Signal) {
        if self.conn.as_ref().is_some_and(Connection::is_spent) {
            self.drop_conn();
        }
        let e = match result {
            Ok(report) => {
                let results = rcpts
                    .iter()
                    .zip(report.rcpts.iter())
                    .map(|(&i, rcpt_reply)| (i, outcome(rcpt_reply, report.data.as_ref())))
                    .collect();
                return (results, Signal::Ok);
            }
            Err(e) => e,
        };
        let permanent = e.is_permanent();
        if matches!(
            e,
            SmtpError::Connect { .. } | SmtpError::ConnectTimeout { .. } | SmtpError::Tls(_)
        ) {
            // A stale kept connection was replaced inside send() and the
            // new one could not be opened.
            let name = format!("{}:{}", self.relay.host, self.relay.port);
            crate::observe::events::relay_failed(&name, e.stage(), &e.to_string());
        }
        let signal = transaction_signal(&e);
        let text = e.to_string();
        let results = rcpts
            .iter()
            .map(|&i| {
                let o = if permanent {
                    RcptOutcome::Failed {
                        reply: text.clone(),
                        status: e.dsn(),
                        local: e.is_local(),
                    }
                } else {
                    RcptOutcome::Deferred {
                        reason: text.clone(),
                        status: e.dsn(),
                    }
                };
                (i, o)
            })
            .collect();
        (results, signal)
    }
}

/// One message to hand over: its envelope as queued, the body as sent
/// (relayq's private headers removed), and the recipients to try (indices
/// into `meta.recipients`).
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    pub meta: &'a Meta,
    pub body: &'a [u8],
    pub rcpts: &'a [usize],
}

/// The recipients of one transaction: addresses, and their DSN
/// parameters in the same order.
#[derive(Default)]
struct Rcpts<'a> {
    addrs: Vec<&'a str>,
    dsn: Vec<crate::spool::RcptDsn>,
}

impl<'a> Outgoing<'a> {
    fn addresses(&self) -> Rcpts<'a> {
        let chosen = self
            .rcpts
            .iter()
            .filter_map(|&i| self.meta.recipients.get(i));
        Rcpts {
            addrs: chosen.clone().map(|r| r.address.as_str()).collect(),
            dsn: chosen.map(|r| r.dsn.clone()).collect(),
        }
    }

    fn envelope<'b>(&self, rcpts: &'b Rcpts<'b>) -> Envelope<'b>
    where
        'a: 'b,
    {
        let addresses =
            std::iter::once(self.meta.sender.as_str()).chain(rcpts.addrs.iter().copied());
        Envelope {
            from: &self.meta.sender,
            rcpts: &rcpts.addrs,
            smtputf8: self.meta.smtputf8,
            // Postfix's rule: only a message that asked for SMTPUTF8 (or a
            // local one with UTF-8 in it) and really holds UTF-8 needs it.
            smtputf8_required: self.meta.smtputf8
                && crate::cleanup::needs_smtputf8(addresses, self.body),
            eight_bit: self.meta.eight_bit,
            dsn: Some(&self.meta.dsn),
            rcpt_dsn: &rcpts.dsn,
        }
    }
}

/// The body as this upstream may receive it: 8-bit content converted to
/// quoted-printable or base64 when it does not offer 8BITMIME (RFC 6152
/// forbids sending it 8-bit), losslessly (see `cleanup::mime`).
fn for_upstream<'b>(conn: &Connection, msg: Outgoing<'b>) -> std::borrow::Cow<'b, [u8]> {
    if !msg.meta.eight_bit || conn.capabilities().eight_bit_mime {
        return std::borrow::Cow::Borrowed(msg.body);
    }
    crate::cleanup::seven_bit(msg.body)
}

/// "Too many connections / logins / sessions": the relay throttles us.
fn says_too_many(reply: &Reply) -> bool {
    let text = reply.text.to_ascii_lowercase();
    text.contains("too many") || text.contains("rate limit")
}

/// What a failure to open a connection says about the relay.
fn connect_signal(e: &SmtpError) -> Signal {
    let text = e.to_string();
    match e {
        SmtpError::Rejected { reply, .. } if reply.code == 421 || says_too_many(reply) => {
            Signal::Throttled(text)
        }
        SmtpError::AuthRejected { reply } if reply.code == 454 || says_too_many(reply) => {
            Signal::Throttled(text)
        }
        // Our credentials are refused for good: trying again before an
        // operator fixes them only earns a lockout.
        SmtpError::AuthRejected { reply } if reply.is_permanent() => Signal::Refused(text),
        SmtpError::OAuth2(_) => Signal::Refused(text),
        _ => Signal::Down(text),
    }
}

/// What a failed transaction says about the relay: a reply about the
/// message (a permanent refusal included) means it is up; 421 means it
/// throttles us; a broken connection means it is down.
fn transaction_signal(e: &SmtpError) -> Signal {
    match e {
        SmtpError::Rejected { reply, .. } if reply.code == 421 => Signal::Throttled(e.to_string()),
        // A stale connection was replaced and the new one's login failed.
        SmtpError::AuthRejected { .. } | SmtpError::OAuth2(_) => connect_signal(e),
        SmtpError::Rejected { .. }
        | SmtpError::SmtpUtf8NotOffered { .. }
        | SmtpError::InvalidSender { .. } => Signal::Ok,
        _ => Signal::Down(e.to_string()),
    }
}

/// The client settings for one address of a relay: TLS mode and
/// verification, and the AUTH secret read now (a token file may have been
/// rotated since the last connection).
pub fn client_config(
    relay: &RelayConfig,
    helo_name: &str,
    addr: SocketAddr,
    tokens: Option<&Arc<TokenSource>>,
) -> Result<ClientConfig, String> {
    let secret = match tokens {
        Some(source) => Some(Secret::OAuth2(source.clone())),
        None => relay.read_secret()?.map(|(secret, oauth)| {
            if oauth {
                Secret::OAuth2Token(secret)
            } else {
                Secret::Password(secret)
            }
        }),
    };
    let auth = match (&relay.username, secret) {
        (Some(user), Some(secret)) => Some(Credentials {
            username: user.clone(),
            secret,
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

/// Every recipient deferred for one reason, no transaction made.
fn deferred(
    relay: String,
    rcpts: &[usize],
    reason: &str,
    status: &str,
    conn_time: Duration,
) -> AttemptReport {
    AttemptReport {
        relay,
        results: rcpts
            .iter()
            .map(|&i| {
                (
                    i,
                    RcptOutcome::Deferred {
                        reason: reason.to_string(),
                        status: status.to_string(),
                    },
                )
            })
            .collect(),
        conn_time,
        ..AttemptReport::default()
    }
}

/// A recipient's fate from its RCPT reply and the reply to the message body.
fn outcome(rcpt: &Reply, data: Option<&Reply>) -> RcptOutcome {
    let reply = match (rcpt.is_positive(), data) {
        (false, _) => rcpt,
        (true, Some(d)) => d,
        (true, None) => {
            return RcptOutcome::Deferred {
                reason: "upstream accepted no recipient; body not sent".into(),
                status: "4.0.0".into(),
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
            local: false,
        }
    } else {
        RcptOutcome::Deferred {
            reason: reply.one_line(),
            status: reply.status(),
        }
    }
}
