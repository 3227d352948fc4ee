//! Pipelining across messages, at the router: when a relay's connection
//! pipelines, the worker's next ready message (see `delivery::lookahead`)
//! can go out behind this one's end of data, if the router would send it to
//! the same relay anyway: its route starts with this relay, the relay is
//! usable, and its limits admit one more message now (counted before its
//! MAIL is sent, given back if the relay takes nothing). Anything else and
//! the message is handed back to the worker, to be tried the usual way.
//!
//! A message whose envelope got 354 keeps the connection (its lease) in a
//! [`Follow`] while the worker records the previous one; resuming sends its
//! body (and maybe the next envelope). One whose envelope was refused gets
//! its report from the same [`Follow`], as it would have on its own.

use std::sync::Arc;
use std::time::Instant;

use super::headers;
use super::health::{Availability, Signal};
use super::reserve::Ticket;
use super::route::{RelayId, Routed};
use super::router::Router;
use crate::delivery::lookahead::{Candidate, Lookahead};
use crate::delivery::outcome::AttemptReport;
use crate::transport::pool::Lease;
use crate::transport::relay::Outgoing;
use crate::transport::smtp::{NextTxn, Opened, Pending, SmtpError, TxnReport};

/// The next message, admitted to go out behind the current one.
pub(super) struct Ahead {
    cand: Candidate,
    /// The body as sent (relayq's private headers removed).
    body: Vec<u8>,
    ticket: Ticket,
    routed: Routed,
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
}

enum State {
    /// Its envelope went out behind the previous dot; replies unread.
    Pending(Pending),
    /// 354: the relay waits for its body.
    Open(Opened),
    /// Its envelope was answered without a go-ahead: this is its outcome.
    Over(Result<TxnReport, SmtpError>),
}

/// A message whose envelope went out behind the previous message's end of
/// data, with the connection it is on. The worker owns the message (the
/// scheduler has it in flight) and must [`Follow::resume`] it.
#[must_use = "the message and its connection are held until resumed"]
pub struct Follow {
    router: Arc<Router>,
    relay: RelayId,
    lease: Lease,
    ahead: Ahead,
    state: State,
    since: Instant,
}

/// A resumed message's attempt.
pub struct Resumed {
    pub job: Candidate,
    pub report: AttemptReport,
    /// The message after it, if that went out behind it.
    pub follow: Option<Follow>,
}

impl Follow {
    /// The queue id of the message.
    pub fn id(&self) -> &str {
        &self.ahead.cand.id
    }

    /// Finishes the message: sends its body (with the next envelope from
    /// `ahead` behind it, again, if it qualifies), or reports the refusal.
    /// `None` when its envelope was never answered (the connection broke):
    /// nothing of it was taken, and it is handed back to `ahead`, to be
    /// tried the usual way.
    pub async fn resume(self, ahead: &mut Lookahead) -> Option<Resumed> {
        let Follow {
            router,
            relay: id,
            mut lease,
            ahead: this,
            state,
            since,
        } = self;
        let ready = match state {
            State::Pending(pending) => match lease.sender.settle_next(pending).await {
                NextTxn::Open(opened) => Ready::Open(opened),
                NextTxn::Done(result) => Ready::Over(result),
                txn @ (NextTxn::NotSent | NextTxn::Lost(_) | NextTxn::Pending(_)) => {
                    log_unanswered(&this.cand.id, &txn);
                    router.relays[id].pool.checkin(lease);
                    router.give_back(id, this.ticket).await;
                    ahead.hand_back(this.cand);
                    return None;
                }
            },
            State::Open(opened) => Ready::Open(opened),
            State::Over(result) => Ready::Over(result),
        };
        let mut next_since = since;
        let (report, signal, next) = match ready {
            Ready::Over(result) => {
                let (report, signal) = lease.sender.report_done(result, &this.cand.rcpts, since);
                (report, signal, None)
            }
            Ready::Open(opened) => {
                let next = if lease.sender.can_pipeline() {
                    router.look_ahead(id, ahead).await
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
        let Ahead {
            cand,
            ticket,
            routed,
            ..
        } = this;
        let done = Done {
            id,
            lease,
            ticket,
            report,
            signal,
            since: next_since,
        };
        let (report, follow) = router.conclude(done, &routed, &[], next, ahead).await;
        Some(Resumed {
            job: cand,
            report,
            follow,
        })
    }
}

impl Router {
    /// The worker's next ready message, if the router would send it to
    /// relay `id` now anyway; it is then counted against the relay's limits.
    /// Not while a message is parked waiting for one of the relay's
    /// connections: this one then goes back to the pool after the current
    /// message, so a worker can't keep it from others for long.
    pub(super) async fn look_ahead(&self, id: RelayId, ahead: &mut Lookahead) -> Option<Ahead> {
        if self.relays[id].pool.is_wanted() {
            return None;
        }
        let cand = ahead.candidate().await?;
        let routed = self.table.route(&cand.meta.sender, &cand.body);
        let relay = &self.relays[id];
        let now = self.clock.now_ms();
        let usable = routed.relays.first() == Some(&id)
            && relay.state().health.availability(now, &relay.policy) == Availability::Use;
        if !usable {
            ahead.hand_back(cand);
            return None;
        }
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
        })
    }

    /// What becomes of the message sent behind the one just done: held
    /// open with the connection, or handed back to the worker (its quota
    /// given back) when its envelope was never answered. Returns the lease
    /// when the connection goes back to the pool.
    pub(super) async fn follow_on(
        self: &Arc<Self>,
        id: RelayId,
        lease: Lease,
        next: Option<(Ahead, NextTxn)>,
        ahead: &mut Lookahead,
        since: Instant,
    ) -> (Option<Lease>, Option<Follow>) {
        let Some((this, txn)) = next else {
            return (Some(lease), None);
        };
        let state = match txn {
            NextTxn::Pending(pending) => State::Pending(pending),
            NextTxn::Open(opened) => State::Open(opened),
            NextTxn::Done(result) => State::Over(result),
            NextTxn::NotSent | NextTxn::Lost(_) => {
                log_unanswered(&this.cand.id, &txn);
                self.give_back(id, this.ticket).await;
                ahead.hand_back(this.cand);
                return (Some(lease), None);
            }
        };
        let follow = Follow {
            router: self.clone(),
            relay: id,
            lease,
            ahead: this,
            state,
            since,
        };
        (None, Some(follow))
    }
}

fn log_unanswered(id: &str, txn: &NextTxn) {
    if let NextTxn::Lost(reason) = txn {
        tracing::debug!(
            target: "relayq::delivery",
            "{id}: envelope sent behind the previous message was not answered ({reason}); trying it again"
        );
    }
}
