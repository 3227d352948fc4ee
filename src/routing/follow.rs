//! Several messages on one connection at once, at the router: when a
//! relay's connection pipelines, the worker's next ready messages (see
//! `delivery::lookahead`) go out behind the current one, if the router
//! would send them to the same relay anyway: it is the first usable relay
//! of their route (its primary, or a fallback while the relays before it
//! are down or paused past `failover_after`: failover mail streams too),
//! and its limits admit one more message now (counted before it is
//! written, given back if the relay takes nothing).
//! Anything else and the message is handed back to the worker, to be tried
//! the usual way.
//!
//! Two ways, by what the relay offers:
//!
//! - **PIPELINING** alone (DATA): the next message's envelope goes out
//!   behind this one's end of data (`transport::smtp::pipeline`). The
//!   message keeps the connection (its lease) in a [`Follow`] while the
//!   worker records the previous one. When its envelope's replies came
//!   with the reply to that end of data (they usually do), its body (and
//!   the next envelope) is written before the worker records anything, so
//!   the round trip and the disk overlap; resuming reads the reply. One
//!   whose envelope was refused gets its report from the same [`Follow`],
//!   as it would have on its own.
//! - **CHUNKING** with PIPELINING (BDAT): whole messages go out one behind
//!   the other, up to [`STREAM_WINDOW`] unanswered (and [`STREAM_BYTES`]),
//!   before any reply (`transport::smtp::chunking`). Each resume reads the
//!   oldest one's replies and writes the next ready message before the
//!   worker records it, so the connection never waits for the disk.
//!
//! Every message is recorded from its own replies. When the line drops
//! the messages not yet answered are handed back to the worker to be
//! retried alone, on a new connection with nothing behind them, so a
//! message that breaks the connection can only break its own attempts;
//! what was answered before stays recorded and is never sent again. A
//! streamed message whose reply is lost was written whole, so the relay
//! may have taken it: it is sent again all the same (never lost) and
//! logged as possibly sent twice; [`STREAM_WINDOW`] bounds how many can be
//! in that doubt at once. Only a 421 before its transaction began proves
//! the relay took nothing of a message written. A kept connection is
//! proven alive (its RSET answered) before the first message goes on it
//! (`transport::smtp::chunking`): one found dead then had nothing written
//! on it, and the message goes on a new connection at once, nothing
//! logged, no attempt counted.
//!
//! A `421` to the first MAIL on a connection opened for the message is
//! the relay refusing it service: a deferral, its attempt counted, as on
//! the DATA path; the messages written behind it go back untouched.
//!
//! A `421` to the RSET or MAIL of a message that went out behind another
//! ends the session before that message's transaction began: it is handed
//! back untouched (no attempt counted, no deferral logged), with those
//! behind it, to go again at once on another connection. The relay had
//! just served that connection: the 421 is its limit of messages per
//! connection, no pushback (the next connection hears it if the relay
//! throttles).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::headers;
use super::health::{Availability, Signal};
use super::reserve::Ticket;
use super::route::{RelayId, Routed};
use super::router::{Carry, Router, Skipped};
use crate::delivery::lookahead::{Candidate, Lookahead};
use crate::delivery::outcome::{AttemptReport, Delivery};
use crate::transport::pool::Lease;
use crate::transport::relay::{Answered, Outgoing, Pushed, Wrote};
use crate::transport::smtp::{Chunked, NextTxn, Opened, Pending, SmtpError, TxnReport, Written};

/// Messages written whole on one connection and not yet answered, at
/// most. Each one's `BDAT ... LAST` is written, so if the line drops
/// before its reply the relay may have taken it: it is sent again (never
/// lost), and may arrive twice, as after any end of data whose reply is
/// lost (Postfix: "message may be sent more than once"). The window is
/// therefore the most messages a dropped line can leave in that doubt.
/// It is also how many messages a connection carries per round trip,
/// against one with DATA; 3 keeps CHUNKING above twice the drain of
/// DATA per connection (the target) while bounding the doubt to 3. One
/// would bound it to 1 but carry no more than DATA does.
pub const STREAM_WINDOW: usize = 3;
/// Bytes of message written on one connection and not yet answered, at
/// most, counting every message in flight (one larger message still goes,
/// alone).
pub const STREAM_BYTES: usize = 1024 * 1024;

/// The next message, admitted to go out behind the current one.
pub(super) struct Ahead {
    cand: Candidate,
    /// The body as sent (relayq's private headers removed).
    body: Vec<u8>,
    ticket: Ticket,
    routed: Routed,
    /// The relays of its route passed over for their health (for its log
    /// line's failover note).
    skipped: Vec<Skipped>,
}

impl Ahead {
    pub(super) fn outgoing(&self) -> Outgoing<'_> {
        Outgoing {
            meta: &self.cand.meta,
            body: &self.body,
            rcpts: &self.cand.rcpts,
        }
    }
}

/// A message written whole into a stream, its replies unread.
pub(super) struct InFlight {
    ahead: Ahead,
    chunked: Chunked,
    /// When it was written.
    since: Instant,
}

/// Messages in flight on a streaming connection, oldest first.
pub(super) type Flight = VecDeque<InFlight>;

/// An attempt on a relay, as it ended.
pub(super) struct Done {
    pub(super) id: RelayId,
    pub(super) lease: Lease,
    pub(super) ticket: Ticket,
    pub(super) report: AttemptReport,
    pub(super) signal: Signal,
    /// When the next message's envelope went out, if one did.
    pub(super) since: Instant,
}

/// Where a held message stands, once its envelope's replies are read.
enum Ready {
    Open(Opened),
    Over(Result<TxnReport, SmtpError>),
    Written(Written, Instant),
    Reported(AttemptReport, Signal),
}

enum State {
    /// Its envelope went out behind the previous dot; replies unread.
    Pending(Pending),
    /// Its envelope was answered without a go-ahead: this is its outcome.
    Over(Result<TxnReport, SmtpError>),
    /// Its body went out (at that time), with the next message's envelope
    /// behind its dot if `Held::Data::next` is set; the reply is unread.
    Written(Written, Instant),
    /// Its body could not be written: this is its outcome.
    Reported(Box<(AttemptReport, Signal)>),
}

/// What a [`Follow`] holds.
enum Held {
    /// DATA: one message whose envelope went out behind the previous one.
    Data {
        ahead: Box<Ahead>,
        state: State,
        since: Instant,
        /// The message whose envelope went behind this one's written body.
        next: Option<Box<Ahead>>,
    },
    /// BDAT: whole messages in flight, oldest first.
    Stream(Flight),
}

/// Messages that went out behind the previous one on its connection, with
/// the connection. The worker owns the messages (the scheduler has them in
/// flight) and must [`Follow::resume`] them.
#[must_use = "the messages and their connection are held until resumed"]
pub struct Follow {
    router: Arc<Router>,
    relay: RelayId,
    lease: Lease,
    held: Held,
}

/// A resumed message's attempt.
pub struct Resumed {
    pub job: Candidate,
    pub report: AttemptReport,
    /// The messages after it, if any went out behind it.
    pub follow: Option<Follow>,
}

impl Follow {
    /// The queue id of the next message to finish.
    pub fn id(&self) -> &str {
        match &self.held {
            Held::Data { ahead, .. } => &ahead.cand.id,
            Held::Stream(flight) => flight.front().map_or("", |m| &m.ahead.cand.id),
        }
    }

    /// Finishes the next message: sends its body (with the next envelope
    /// behind it, again, if one qualifies), reads a streamed one's replies
    /// (writing the next ready message behind the stream), or reports the
    /// refusal. `None` when it was never answered (the connection broke):
    /// it and any behind it are handed back to `ahead`, to be tried again.
    pub async fn resume(self, ahead: &mut Lookahead) -> Option<Resumed> {
        let Follow {
            router,
            relay,
            lease,
            held,
        } = self;
        match held {
            Held::Data {
                ahead: this,
                state,
                since,
                next,
            } => {
                let this = (*this, state, since, next);
                router.resume_data(relay, lease, this, ahead).await
            }
            Held::Stream(flight) => router.resume_stream(relay, lease, flight, ahead).await,
        }
    }
}

impl Router {
    async fn resume_data(
        self: &Arc<Self>,
        id: RelayId,
        mut lease: Lease,
        (this, state, since, next): (Ahead, State, Instant, Option<Box<Ahead>>),
        ahead: &mut Lookahead,
    ) -> Option<Resumed> {
        let ready = match state {
            State::Pending(pending) => match lease.sender.settle_next(pending).await {
                NextTxn::Open(opened) => Ready::Open(opened),
                NextTxn::Done(result) => Ready::Over(result),
                txn @ (NextTxn::NotSent
                | NextTxn::Lost(_)
                | NextTxn::Pending(_)
                | NextTxn::Closed(_)) => {
                    self.log_unanswered(id, &this.cand.id, &txn);
                    self.relays[id].pool.checkin(lease);
                    self.give_back(id, this.ticket).await;
                    ahead.hand_back(this.cand);
                    return None;
                }
            },
            State::Over(result) => Ready::Over(result),
            State::Written(written, at) => Ready::Written(written, at),
            State::Reported(ended) => {
                let (report, signal) = *ended;
                Ready::Reported(report, signal)
            }
        };
        let mut next_since = since;
        let (report, signal, next) = match ready {
            Ready::Over(result) => {
                let (report, signal) = lease.sender.report_done(result, &this.cand.rcpts, since);
                (report, signal, None)
            }
            Ready::Reported(report, signal) => (report, signal, None),
            Ready::Written(written, at) => {
                next_since = at;
                let (report, signal, txn) = lease
                    .sender
                    .read_written(written, &this.cand.rcpts, since)
                    .await;
                (report, signal, next.map(|n| (*n, txn)))
            }
            Ready::Open(opened) => {
                let next = if lease.sender.can_pipeline() {
                    self.look_ahead(id, ahead).await
                } else {
                    None
                };
                next_since = Instant::now();
                let (report, signal, txn) = lease
                    .sender
                    .transmit_opened(
                        opened,
                        this.outgoing(),
                        next.as_ref().map(Ahead::outgoing),
                        since,
                    )
                    .await;
                (report, signal, next.map(|n| (n, txn)))
            }
        };
        let carry = Carry::Data(next.map(Box::new));
        let ended = (report, signal, next_since);
        Some(self.finish(id, lease, this, ended, carry, ahead).await)
    }

    /// A resumed message's end: recorded like any attempt (`conclude`).
    async fn finish(
        self: &Arc<Self>,
        id: RelayId,
        lease: Lease,
        this: Ahead,
        (report, signal, since): (AttemptReport, Signal, Instant),
        carry: Carry,
        ahead: &mut Lookahead,
    ) -> Resumed {
        let Ahead {
            cand,
            ticket,
            routed,
            skipped,
            ..
        } = this;
        let done = Done {
            id,
            lease,
            ticket,
            report,
            signal,
            since,
        };
        let (report, follow) = self.conclude(done, &routed, &skipped, carry, ahead).await;
        Resumed {
            job: cand,
            report,
            follow,
        }
    }

    async fn resume_stream(
        self: &Arc<Self>,
        id: RelayId,
        mut lease: Lease,
        mut flight: Flight,
        ahead: &mut Lookahead,
    ) -> Option<Resumed> {
        let oldest = flight.pop_front()?;
        let InFlight {
            ahead: this,
            chunked,
            since,
        } = oldest;
        let answered = lease
            .sender
            .settle_pushed(chunked, &this.cand.rcpts, since)
            .await;
        let (report, signal) = match answered {
            Answered::Yes(report, signal) => (report, signal),
            Answered::Closed(e) | Answered::No(e) => {
                // A 421 before its transaction began ends a connection the
                // relay served: its limit per connection, not pushback
                // (`Router::log_unanswered`).
                self.relays[id].pool.checkin(lease);
                let doubt = in_doubt(&e);
                let all = std::iter::once(this).chain(flight.into_iter().map(|m| m.ahead));
                self.unanswered(id, all, &e.to_string(), doubt, ahead).await;
                return None;
            }
        };
        self.ended_with(id, &signal, &mut flight, ahead).await;
        // The next message goes on the wire before this one is recorded.
        if signal == Signal::Ok {
            self.top_up(id, &mut lease, &mut flight, (0, 0), ahead)
                .await;
        }
        let ended = (report, signal, since);
        let carry = Carry::Stream(flight);
        Some(self.finish(id, lease, this, ended, carry, ahead).await)
    }

    /// Writes the worker's next ready messages behind those in flight, while
    /// the window has room. `more`: messages (and their bytes) written and
    /// unanswered besides `flight` (the one being sent, in the first
    /// attempt).
    pub(super) async fn top_up(
        &self,
        id: RelayId,
        lease: &mut Lease,
        flight: &mut Flight,
        (more, more_bytes): (usize, usize),
        ahead: &mut Lookahead,
    ) {
        let mut bytes: usize =
            more_bytes + flight.iter().map(|m| m.ahead.body.len()).sum::<usize>();
        while flight.len() + more < STREAM_WINDOW
            && bytes < STREAM_BYTES
            && lease.sender.can_stream()
        {
            let Some(next) = self.look_ahead(id, ahead).await else {
                break;
            };
            if bytes + next.body.len() > STREAM_BYTES && flight.len() + more > 0 {
                self.give_back(id, next.ticket).await;
                ahead.hand_back(next.cand);
                break;
            }
            let since = Instant::now();
            match lease.sender.push(next.outgoing()).await {
                Pushed::InFlight(chunked) => {
                    bytes += next.body.len();
                    flight.push_back(InFlight {
                        ahead: next,
                        chunked,
                        since,
                    });
                }
                Pushed::Back | Pushed::Stale(_) | Pushed::Failed(_) => {
                    self.give_back(id, next.ticket).await;
                    ahead.hand_back(next.cand);
                    break;
                }
            }
        }
    }

    /// The worker's next ready message (one handed over to the relay's
    /// connections first), if the router would send it to relay `id` now
    /// anyway; it is then counted against the relay's limits.
    /// Not while a message is parked waiting for one of the relay's
    /// connections: this one then goes back to the pool after the current
    /// message, so a worker can't keep it from others for long. Nor while
    /// more of the relay's connections are at work than its concurrency
    /// allows (a cut): this one then goes back to the pool, which closes
    /// it while there are too many, so the cut takes effect within a round
    /// rather than when the backlog is gone.
    pub(super) async fn look_ahead(&self, id: RelayId, ahead: &mut Lookahead) -> Option<Ahead> {
        let pool = &self.relays[id].pool;
        if pool.is_wanted() || pool.over_limit() {
            return None;
        }
        let cand = ahead.candidate_after(|| pool.take_handed()).await?;
        let routed = self.table.route(&cand.meta.sender, &cand.body);
        let now = self.clock.now_ms();
        let skipped = match self.by_health(&routed.relays, now) {
            (Some((to, Availability::Use)), skipped) if to == id => skipped,
            _ => {
                ahead.hand_back(cand);
                return None;
            }
        };
        let Ok(ticket) = self.reserve_once(id, now).await else {
            ahead.hand_back(cand);
            return None;
        };
        let body = headers::strip_private(&cand.body).into_owned();
        Some(Ahead {
            cand,
            body,
            ticket,
            routed,
            skipped,
        })
    }

    /// What becomes of the messages sent behind the one just done: held
    /// with the connection, or handed back to the worker (their quota given
    /// back) when never answered. Returns the lease when the connection goes
    /// back to the pool.
    pub(super) async fn follow_on(
        self: &Arc<Self>,
        id: RelayId,
        mut lease: Lease,
        carry: Carry,
        ahead: &mut Lookahead,
        since: Instant,
    ) -> (Option<Lease>, Option<Follow>) {
        let held = match carry {
            Carry::Nothing | Carry::Data(None) => return (Some(lease), None),
            Carry::Stream(flight) if flight.is_empty() => return (Some(lease), None),
            Carry::Stream(flight) => Held::Stream(flight),
            Carry::Data(Some(next)) => {
                let (this, txn) = *next;
                let txn = match txn {
                    NextTxn::Pending(pending) if lease.sender.replies_arrived(&pending).await => {
                        lease.sender.settle_next(pending).await
                    }
                    txn => txn,
                };
                let (state, behind) = match txn {
                    NextTxn::Pending(pending) => (State::Pending(pending), None),
                    NextTxn::Open(opened) => {
                        // Its body goes now, before the worker records the
                        // message before it: the disk and the wire overlap.
                        self.write_now(id, &mut lease, &this, opened, since, ahead)
                            .await
                    }
                    NextTxn::Done(result) => (State::Over(result), None),
                    NextTxn::NotSent | NextTxn::Lost(_) | NextTxn::Closed(_) => {
                        self.log_unanswered(id, &this.cand.id, &txn);
                        self.give_back(id, this.ticket).await;
                        ahead.hand_back(this.cand);
                        return (Some(lease), None);
                    }
                };
                Held::Data {
                    ahead: Box::new(this),
                    state,
                    since,
                    next: behind,
                }
            }
        };
        let follow = Follow {
            router: self.clone(),
            relay: id,
            lease,
            held,
        };
        (None, Some(follow))
    }

    /// Writes the body of `this`, whose envelope got 354, with the worker's
    /// next ready message's envelope behind its dot: the message is then
    /// [`State::Written`] and the one behind it is returned.
    async fn write_now(
        &self,
        id: RelayId,
        lease: &mut Lease,
        this: &Ahead,
        opened: Opened,
        since: Instant,
        ahead: &mut Lookahead,
    ) -> (State, Option<Box<Ahead>>) {
        let next = if lease.sender.can_pipeline() {
            self.look_ahead(id, ahead).await
        } else {
            None
        };
        let at = Instant::now();
        let behind = next.as_ref().map(Ahead::outgoing);
        match lease
            .sender
            .write_opened(opened, this.outgoing(), behind, since)
            .await
        {
            Wrote::Yes(written) => (State::Written(written, at), next.map(Box::new)),
            Wrote::No(report, signal, txn) => {
                if let Some(next) = next {
                    // Its envelope never went out, or went out on a line
                    // that failed: nothing of it was taken.
                    self.log_unanswered(id, &next.cand.id, &txn);
                    self.give_back(id, next.ticket).await;
                    ahead.hand_back(next.cand);
                }
                (State::Reported(Box::new((report, signal))), None)
            }
        }
    }

    /// A message sent on a streaming connection ([`Router::attempt`]): it,
    /// and the worker's next ready messages behind it, are written whole;
    /// its outcome is read, the rest are held in the [`Follow`]. When the
    /// kept connection had gone stale (found at its RSET, or a 421 before
    /// the transaction), or its replies never come with messages written
    /// behind it (see [`free_retry`]), it is tried once more at once on a
    /// new connection (alone, after a lost line).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn stream(
        self: &Arc<Self>,
        id: RelayId,
        mut lease: Lease,
        ticket: Ticket,
        msg: Outgoing<'_>,
        routed: &Routed,
        skipped: &[Skipped],
        ahead: &mut Lookahead,
        started: Instant,
    ) -> (Delivery, Option<Follow>) {
        let mut alone = false;
        // A kept connection found dead was replaced once already.
        let mut replaced = false;
        let (report, signal, flight) = loop {
            let kept = lease.sender.is_kept();
            let since = Instant::now();
            let chunked = match lease.sender.push(msg).await {
                Pushed::InFlight(chunked) => chunked,
                Pushed::Stale(_) if !replaced && !alone => {
                    // A kept connection that died while idle (its RSET got
                    // no reply, or a 421, before anything of the message
                    // was written): nothing taken, nothing counted; a new
                    // one, which streams as any new one does.
                    replaced = true;
                    if let Err(not) = lease.sender.ready(msg.rcpts, started).await {
                        break (not.report, not.signal, Flight::new());
                    }
                    lease.set_up();
                    continue;
                }
                Pushed::Stale(e) | Pushed::Failed(e) => {
                    // The write failed part way (or a connection opened
                    // for it was found dead): its attempt, the cause
                    // said, as DATA's failed body is; no new connection
                    // for it now.
                    let (report, signal) = lease.sender.report_done(Err(e), msg.rcpts, since);
                    break (report, signal, Flight::new());
                }
                Pushed::Back => {
                    // Not streamable (a huge envelope, or nothing can be
                    // written): the usual way tells.
                    let (report, signal, _) = lease.sender.transmit(msg, None, started).await;
                    break (report, signal, Flight::new());
                }
            };
            let mut flight = Flight::new();
            if !alone {
                let first = (1, msg.body.len());
                self.top_up(id, &mut lease, &mut flight, first, ahead).await;
            }
            match lease.sender.settle_pushed(chunked, msg.rcpts, since).await {
                Answered::Yes(mut report, signal) => {
                    report.conn_time = since.saturating_duration_since(started);
                    self.ended_with(id, &signal, &mut flight, ahead).await;
                    break (report, signal, flight);
                }
                Answered::Closed(e) | Answered::No(e)
                    if !alone && free_retry(&e, kept, &flight) =>
                {
                    // Not its attempt: the relay ended a kept connection
                    // before its transaction began, or the line dropped
                    // (maybe because of a message behind it). Again, alone.
                    // A 421 to the MAIL of a kept connection is the relay's
                    // idle timeout or its limit of messages per connection,
                    // read only now: no pushback (as the DATA path, which
                    // opens a fresh connection for it).
                    let reason = e.to_string();
                    let doubt = in_doubt(&e);
                    if doubt {
                        tracing::info!(target: "relayq::delivery", "{}: relay={}, {}; trying it again alone", msg.meta.id, self.relays[id].endpoint, doubt_text(&reason));
                    } else {
                        tracing::debug!(target: "relayq::delivery", "{}: nothing taken on the stream ({reason}); trying it again alone", msg.meta.id);
                    }
                    let rest = flight.into_iter().map(|m| m.ahead);
                    self.unanswered(id, rest, &reason, doubt, ahead).await;
                    alone = true;
                    // The lease keeps its slot; a new connection on it.
                    if let Err(not) = lease.sender.ready(msg.rcpts, started).await {
                        break (not.report, not.signal, Flight::new());
                    }
                    lease.set_up();
                }
                Answered::Closed(e) | Answered::No(e) => {
                    let rest = flight.into_iter().map(|m| m.ahead);
                    let doubt = in_doubt(&e);
                    self.unanswered(id, rest, &e.to_string(), doubt, ahead)
                        .await;
                    let (report, signal) = lease.sender.report_done(Err(e), msg.rcpts, since);
                    break (report, signal, Flight::new());
                }
            }
        };
        let done = Done {
            id,
            lease,
            ticket,
            report,
            signal,
            since: started,
        };
        let (report, follow) = self
            .conclude(done, routed, skipped, Carry::Stream(flight), ahead)
            .await;
        (Delivery::Attempted(report), follow)
    }

    /// A message answered with 421 (to a recipient or its BDAT): the relay
    /// ends the session and processes nothing after it, so the messages
    /// behind it were taken by no one (no doubt): back, untouched.
    async fn ended_with(
        &self,
        id: RelayId,
        signal: &Signal,
        flight: &mut Flight,
        ahead: &mut Lookahead,
    ) {
        if !matches!(signal, Signal::Throttled(_)) || flight.is_empty() {
            return;
        }
        let reason = signal.error().unwrap_or_default().to_string();
        let rest = std::mem::take(flight).into_iter().map(|m| m.ahead);
        self.unanswered(id, rest, &reason, false, ahead).await;
    }

    /// The line dropped (or the connection was stale, or the relay said
    /// 421) before the relay answered these: each goes back to the worker,
    /// untouched, to be retried alone. `doubt`: they were written whole
    /// and the relay may have taken them (see [`STREAM_WINDOW`]).
    async fn unanswered(
        &self,
        id: RelayId,
        messages: impl IntoIterator<Item = Ahead>,
        reason: &str,
        doubt: bool,
        ahead: &mut Lookahead,
    ) {
        for m in messages {
            let what = if doubt {
                doubt_text(reason)
            } else {
                format!("the connection ended before the relay took anything of it ({reason})")
            };
            tracing::info!(
                target: "relayq::delivery",
                "{}: relay={}, {what}; trying it again alone",
                m.cand.id,
                self.relays[id].endpoint,
            );
            self.give_back(id, m.ticket).await;
            ahead.hand_back_alone(m.cand);
        }
    }
}

impl Router {
    /// A message that went out behind another comes back untried: says
    /// why. A 421 that ended the connection before its transaction began
    /// is no pushback: the relay had just served that connection, so it
    /// is its limit of messages per connection (or a session it ends for
    /// its own reasons), as a 421 to a kept connection's RSET is its idle
    /// timeout. Counted, a relay that allows five messages a connection
    /// halved the concurrency five to seven times in 120 messages. If the
    /// relay is throttling, the new connection the message goes on hears
    /// it (a 421 to its greeting, or to its first MAIL), and that counts.
    /// Nor does it pause the relay, even when no other connection is
    /// open: the relay is up and serving.
    fn log_unanswered(&self, id: RelayId, msg: &str, txn: &NextTxn) {
        match txn {
            NextTxn::Lost(reason) => tracing::debug!(
                target: "relayq::delivery",
                "{msg}: envelope sent behind the previous message was not answered ({reason}); trying it again"
            ),
            NextTxn::Closed(e) => {
                tracing::info!(
                    target: "relayq::delivery",
                    "{msg}: relay={}, the relay ended the session before this message's transaction began ({e}); trying it again",
                    self.relays[id].endpoint,
                );
            }
            _ => {}
        }
    }
}

/// Whether the first message of a stream whose replies ended with `e` goes
/// again at once, alone, without counting as its attempt: a 421 before its
/// transaction on a kept connection (the relay's idle timeout or limit per
/// connection, as `Connection::send_then` retries on the DATA path), or a
/// lost line with messages behind it (one of them may have broken it). A
/// 421 to the first MAIL on a new connection is the relay refusing service
/// to this message, a deferral with its attempt counted, exactly as on the
/// DATA path; the messages written behind it go back untouched. A lost
/// line with nothing behind is the message's attempt on a kept connection
/// too: its RSET was answered before it was written (the connection was
/// alive), so it is in doubt exactly as after DATA's end of data, which
/// defers it and counts the attempt.
fn free_retry(e: &SmtpError, kept: bool, flight: &Flight) -> bool {
    if e.closed_before_transaction() {
        kept
    } else {
        !flight.is_empty()
    }
}

/// Whether a streamed message whose replies ended with `e` (and those
/// behind it) may have been taken: it was written whole, on a connection
/// that had answered, and only a 421 before its transaction proves
/// otherwise (a kept connection found dead is found so before anything of
/// the message is written).
fn in_doubt(e: &SmtpError) -> bool {
    !e.closed_before_transaction()
}

/// A streamed message whose reply was lost: written whole, so the relay
/// may have taken it.
fn doubt_text(reason: &str) -> String {
    format!(
        "the connection ended after the message was sent, before the relay answered ({reason}): it may have been delivered, and may arrive twice"
    )
}
