//! The router: for one message, picks the relay that takes it now and
//! hands it over, or says how long it must wait.
//!
//! For each relay of the message's route, in order (primary, then
//! fallbacks): is it usable (its health, see `health`)? Is there room
//! under its limits (counted here, or in Redis for a fleet)? Is a
//! connection free (its pool)? The first relay that passes all three takes
//! the message. A relay that is paused while its outage is younger than
//! `failover_after` makes the message wait for it; one that is down or
//! paused for longer, or over a limit, is skipped (failover). When every
//! relay is skipped, a relay that is merely down (not paused) is tried
//! anyway as a last resort; otherwise the message waits until the earliest
//! time one of them reopens, or until one comes back up.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::concurrency::Pushback;
use super::fleet::Fleet;
use super::health::{Availability, Health, Policy, Signal, Status, Transition};
use super::quota::{Denied, Quota, WindowSpec};
use super::reserve::Ticket;
use super::route::{RelayId, RouteTable, Routed};
use super::{fmt_time, headers};
use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::SchedulerHandle;
use crate::delivery::gate::Gate;
use crate::delivery::lookahead::Lookahead;
use crate::delivery::outcome::{AttemptReport, Delivery, RcptOutcome};
use crate::spool::Meta;
use crate::transport::oauth2::TokenSource;
use crate::transport::pool::{Lease, PoolContext, RelayPool};
use crate::transport::relay::{NotReady, Outgoing};
use crate::transport::smtp::NextTxn;

use super::follow::{Ahead, Done, Flight};
pub use super::follow::{Follow, Resumed};

/// What an attempt leaves on its connection besides its own message.
pub(super) enum Carry {
    Nothing,
    /// DATA: the next message's envelope, sent behind this one's end of
    /// data, and what became of it.
    Data(Option<Box<(Ahead, NextTxn)>>),
    /// BDAT: whole messages written behind this one, unanswered.
    Stream(Flight),
}

pub(super) struct RelayEntry {
    pub(super) name: Arc<str>,
    /// `host:port`, for logs and listings.
    pub(super) endpoint: String,
    pub(super) pool: Arc<RelayPool>,
    pub(super) policy: Policy,
    pub(super) specs: Vec<WindowSpec>,
    pub(super) state: Mutex<RelayRuntime>,
}

pub(super) struct RelayRuntime {
    pub(super) health: Health,
    pub(super) quota: Quota,
    /// Redis said the relay is full until then (fleet mode).
    pub(super) fleet_full: Option<Denied>,
    /// The counts Redis last reported, per window.
    pub(super) fleet_used: Option<Vec<u32>>,
}

impl RelayEntry {
    pub(super) fn state(&self) -> MutexGuard<'_, RelayRuntime> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
pub(super) struct FleetState {
    pub(super) down_since: Option<u64>,
    pub(super) retry_at: u64,
}

/// A relay passed over for a message, and why.
pub(super) struct Skipped {
    relay: RelayId,
    text: String,
    /// When it may be usable again (a pause or a quota window ending).
    until: Option<u64>,
    /// Skipped for its health (so its recovery should wake the message).
    health: bool,
}

pub struct Router {
    pub(super) relays: Vec<RelayEntry>,
    pub(super) table: RouteTable,
    pub(super) clock: Clock,
    /// Show relay names in logs (not for the single `[relay]` form).
    pub(super) named: bool,
    /// Several relays or routes: log why a relay was chosen.
    routed: bool,
    pub(super) fleet: Option<Fleet>,
    pub(super) share: f64,
    pub(super) fleet_state: Mutex<FleetState>,
    scheduler: Option<SchedulerHandle>,
    /// Local counts changed since they were last saved.
    pub(super) dirty: AtomicBool,
    pub(super) seq: AtomicU64,
    /// The workers' gate: as many passes as the relays allow connections.
    gate: Arc<Gate>,
}

impl Router {
    /// Builds the router for `config`'s relays; `scheduler` is told when
    /// connections come back and relays recover.
    pub fn new(
        config: &Config,
        clock: Clock,
        scheduler: Option<SchedulerHandle>,
    ) -> Result<Router, String> {
        let named_form = config.relay.is_none();
        let gate = Gate::new(config.relays.len());
        let relays: Vec<RelayEntry> = config
            .relays
            .iter()
            .enumerate()
            .map(|(index, named)| {
                let name: Arc<str> = named.name.as_str().into();
                let specs = WindowSpec::of(&named.relay);
                let endpoint = format!("{}:{}", named.relay.host, named.relay.port);
                let label = if named_form {
                    format!("relay {name} ({endpoint})")
                } else {
                    format!("relay {endpoint}")
                };
                let tokens = TokenSource::for_relay(&named.relay, label, clock.clone());
                let ctx = PoolContext {
                    helo: config.hostname.clone(),
                    tokens,
                    scheduler: scheduler.clone(),
                    gate: Some((gate.clone(), index)),
                    clock: clock.clone(),
                };
                RelayEntry {
                    pool: RelayPool::new(name.clone(), named.relay.clone(), ctx),
                    endpoint,
                    policy: Policy::of(&named.relay),
                    state: Mutex::new(RelayRuntime {
                        health: Health::default(),
                        quota: Quota::new(specs.clone()),
                        fleet_full: None,
                        fleet_used: None,
                    }),
                    specs,
                    name,
                }
            })
            .collect();
        let fleet = config
            .limits_backend
            .as_ref()
            .map(|url| Fleet::new(&url.0))
            .transpose()?;
        let router = Router {
            relays,
            table: RouteTable::new(&config.relays, &config.route),
            clock,
            named: config.relay.is_none(),
            routed: config.relays.len() > 1 || !config.route.is_empty(),
            fleet,
            share: config.redis_fallback_share,
            fleet_state: Mutex::new(FleetState::default()),
            scheduler,
            dirty: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            gate,
        };
        router.steer();
        Ok(router)
    }

    /// The workers' gate (see `delivery::gate`).
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// Tells the workers' gate which relays the routes would send mail to
    /// now, by health, as [`Router::deliver_ahead`] picks them: for each
    /// route mail can take, its first usable relay or the one its mail
    /// waits for, else its first down one (tried as a last resort), else
    /// (all paused) its primary. A fallback of a healthy primary is not
    /// one of them.
    pub fn steer(&self) {
        let now = self.clock.now_ms();
        let mut routed = vec![false; self.relays.len()];
        // Called for every message: health only, no skip texts formatted.
        for list in self.table.reachable() {
            let (mut to, mut last_resort) = (None, None);
            for (id, _, availability) in self.availabilities(list, now) {
                match availability {
                    Availability::Skip { until: None } => {
                        last_resort.get_or_insert(id);
                    }
                    Availability::Skip { .. } => {}
                    _ => {
                        to = Some(id);
                        break;
                    }
                }
            }
            let to = to.or(last_resort).or(list.first().copied());
            if let Some(r) = to.and_then(|id| routed.get_mut(id)) {
                *r = true;
            }
        }
        self.gate.steer(&routed);
    }

    /// Connections all relays may have open together: the number of
    /// delivery workers worth running.
    pub fn total_connections(&self) -> usize {
        self.relays.iter().map(|r| r.pool.max_connections()).sum()
    }

    pub(super) fn fleet_state(&self) -> MutexGuard<'_, FleetState> {
        self.fleet_state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes one message and delivers it through the first relay that can
    /// take it now.
    pub async fn deliver(self: &Arc<Self>, meta: &Meta, body: &[u8], rcpts: &[usize]) -> Delivery {
        let (delivery, follow) = self
            .deliver_ahead(meta, body, rcpts, &mut Lookahead::off())
            .await;
        debug_assert!(follow.is_none(), "nothing follows without a lookahead");
        delivery
    }

    /// [`Router::deliver`], and when the relay pipelines, the next ready
    /// message from `ahead` may go out behind this one's end of data on the
    /// same connection: it is then returned open, to [`Follow::resume`].
    pub async fn deliver_ahead(
        self: &Arc<Self>,
        meta: &Meta,
        body: &[u8],
        rcpts: &[usize],
        ahead: &mut Lookahead,
    ) -> (Delivery, Option<Follow>) {
        self.steer();
        let routed = self.table.route(&meta.sender, body);
        let mut skipped: Vec<Skipped> = Vec::new();
        // (relay, tried as a last resort despite being down)
        let mut order: Vec<(RelayId, bool)> = routed.relays.iter().map(|&id| (id, false)).collect();
        let mut i = 0;
        while let Some(&(id, last_resort)) = order.get(i) {
            i += 1;
            let Some(relay) = self.relays.get(id) else {
                continue;
            };
            let now = self.clock.now_ms();
            if !last_resort {
                let availability = relay.state().health.availability(now, &relay.policy);
                match availability {
                    Availability::Use => {}
                    Availability::WaitFor { until } => {
                        skipped.push(Skipped {
                            relay: id,
                            text: self.health_text(relay, now),
                            until: Some(until),
                            health: true,
                        });
                        return (self.wait(&skipped, now), None);
                    }
                    Availability::Skip { until } => {
                        if until.is_none() {
                            order.push((id, true));
                        }
                        skipped.push(Skipped {
                            relay: id,
                            text: self.health_text(relay, now),
                            until,
                            health: true,
                        });
                        continue;
                    }
                }
            }
            let ticket = match self.reserve(id).await {
                Ok(t) => t,
                Err((text, until)) => {
                    skipped.push(Skipped {
                        relay: id,
                        text,
                        until: Some(until),
                        health: false,
                    });
                    continue;
                }
            };
            let lease = match relay.pool.try_checkout() {
                Ok(lease) => lease,
                Err(seen) => {
                    self.give_back(id, ticket).await;
                    // A busy connection takes it next, as it would take the
                    // next message from the queue: parked, it would make
                    // them all stop taking more (one worker looking for
                    // another relay's mail would cut this relay's streams).
                    if ahead.is_on() && relay.pool.hand_over(&meta.id, seen) {
                        return (Delivery::HandedOver, None);
                    }
                    relay.pool.want(seen);
                    let parked = Delivery::Parked {
                        relay: relay.name.clone(),
                        seen,
                    };
                    return (parked, None);
                }
            };
            return self
                .attempt(
                    id,
                    lease,
                    ticket,
                    (meta, body, rcpts),
                    &routed,
                    &skipped,
                    ahead,
                )
                .await;
        }
        (self.wait(&skipped, self.clock.now_ms()), None)
    }

    /// Where a route's mail goes now by the relays' health alone (not their
    /// limits), as [`Router::deliver_ahead`] decides it: the first relay
    /// that is usable or that the mail must wait for, and the relays
    /// skipped before it (none: every relay is skipped).
    pub(super) fn by_health(
        &self,
        list: &[RelayId],
        now: u64,
    ) -> (Option<(RelayId, Availability)>, Vec<Skipped>) {
        let mut skipped = Vec::new();
        for (id, relay, availability) in self.availabilities(list, now) {
            match availability {
                Availability::Skip { until } => skipped.push(Skipped {
                    relay: id,
                    text: self.health_text(relay, now),
                    until,
                    health: true,
                }),
                a => return (Some((id, a)), skipped),
            }
        }
        (None, skipped)
    }

    /// The relays of `list` with their availability by health now, in
    /// order (each relay's state is unlocked again before it is yielded:
    /// `health_text` locks it).
    fn availabilities<'a>(
        &'a self,
        list: &'a [RelayId],
        now: u64,
    ) -> impl Iterator<Item = (RelayId, &'a RelayEntry, Availability)> + 'a {
        list.iter().filter_map(move |&id| {
            let relay = self.relays.get(id)?;
            let availability = relay.state().health.availability(now, &relay.policy);
            Some((id, relay, availability))
        })
    }

    /// Not now: until the earliest reopening, or a recovery.
    fn wait(&self, skipped: &[Skipped], now: u64) -> Delivery {
        let until = skipped
            .iter()
            .filter_map(|s| s.until)
            .min()
            .unwrap_or(now + 60_000)
            .max(now + 1);
        let mut relays: Vec<Arc<str>> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        for s in skipped {
            let name = &self.relays[s.relay].name;
            if s.health && !relays.contains(name) {
                relays.push(name.clone());
            }
            let text = if self.named {
                format!("{name}: {}", s.text)
            } else {
                s.text.clone()
            };
            if !texts.contains(&text) {
                texts.push(text);
            }
        }
        if texts.is_empty() {
            texts.push("no relay for this message".into());
        }
        Delivery::Wait {
            until,
            reason: texts.join("; "),
            relays,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        self: &Arc<Self>,
        id: RelayId,
        mut lease: Lease,
        ticket: Ticket,
        (meta, body, rcpts): (&Meta, &[u8], &[usize]),
        routed: &Routed,
        skipped: &[Skipped],
        ahead: &mut Lookahead,
    ) -> (Delivery, Option<Follow>) {
        let body = headers::strip_private(body);
        let started = Instant::now();
        let relay = &self.relays[id];
        let fresh = !lease.sender.is_connected();
        if let Err(not) = lease.sender.ready(rcpts, started).await {
            if let Some(pushback) = self.connect_pushback(id, &lease, &not).await {
                // Others work: this one waits for one of them to come back
                // (not for this slot: a new connection now would be counted
                // by the relay with the one it just refused).
                tracing::debug!(target: "relayq::delivery", "{}: relay {} pushed back on one more connection ({}); waiting for one of its connections", meta.id, relay.name, not.signal.error().unwrap_or_default());
                relay.pool.pushback(&lease, pushback);
                relay.pool.checkin(lease);
                // A connection idle already will not come back to wake it
                // (a timed-out connect can outlast the work the others had):
                // then it goes again at once, on that one (any release of
                // the relay is past 0). Else it waits for a release past
                // the process-wide count, as a refused checkout does: after
                // a reload the old pool's releases must not wake it over
                // and over.
                let seen = match relay.pool.has_idle() {
                    true => 0,
                    false => relay.pool.release_mark(),
                };
                self.give_back(id, ticket).await;
                let parked = Delivery::Parked {
                    relay: relay.name.clone(),
                    seen,
                };
                return (parked, None);
            }
            let done = Done {
                id,
                lease,
                ticket,
                report: not.report,
                signal: not.signal,
                since: started,
            };
            let (report, follow) = self
                .conclude(done, routed, skipped, Carry::Nothing, ahead)
                .await;
            return (Delivery::Attempted(report), follow);
        }
        if fresh {
            lease.set_up();
            let backlog = relay.pool.is_wanted() || relay.pool.has_handed() || ahead.waiting();
            relay.pool.connected(backlog);
        }
        let msg = Outgoing {
            meta,
            body: &body,
            rcpts,
        };
        if lease.sender.can_stream() {
            return self
                .stream(id, lease, ticket, msg, routed, skipped, ahead, started)
                .await;
        }
        let next = if lease.sender.can_pipeline() {
            self.look_ahead(id, ahead).await
        } else {
            None
        };
        // When the next message's envelope (if any) goes out.
        let since = Instant::now();
        let (report, signal, txn) = lease
            .sender
            .transmit(msg, next.as_ref().map(Ahead::outgoing), started)
            .await;
        let done = Done {
            id,
            lease,
            ticket,
            report,
            signal,
            since,
        };
        let carry = Carry::Data(next.map(|n| Box::new((n, txn))));
        let (report, follow) = self.conclude(done, routed, skipped, carry, ahead).await;
        (Delivery::Attempted(report), follow)
    }

    /// A reload replaced this router: its pools' connections finish the
    /// mail they carry, and the new pools count them
    /// ([`RelayPool::retire`]).
    pub fn retire(&self) {
        for relay in &self.relays {
            relay.pool.retire();
        }
    }

    /// Whether a connection that could not be opened is the relay pushing
    /// back on our concurrency rather than failing: it refused one more
    /// connection while it served others, or did not answer while others
    /// work. Then only the concurrency backs off; with no other connection
    /// (refused all together, say), it is the relay's health (down, or
    /// throttling us).
    async fn connect_pushback(
        &self,
        id: RelayId,
        lease: &Lease,
        not: &NotReady,
    ) -> Option<Pushback> {
        let pool = &self.relays[id].pool;
        match &not.signal {
            Signal::Throttled(error) => {
                // Ours count, even those closing, and those being opened
                // that get as far as this one did: the relay counted them
                // when it refused this one. Not those it refused with it
                // (slow start opens several at once).
                let open = pool.served_with(lease).await;
                (open > 0).then(|| Pushback::Refused {
                    open,
                    error: error.clone(),
                })
            }
            Signal::Down(error)
                if not.no_answer && pool.established() + pool.left_behind().1 > 0 =>
            {
                Some(Pushback::Failed {
                    error: error.clone(),
                })
            }
            _ => None,
        }
    }

    /// What every attempt ends with: the concurrency fed, the connection
    /// back to the pool (unless messages that went out behind this one hold
    /// it), the relay's health, the quota given back if the relay took
    /// nothing, and the log's relay name, route note and retry hints.
    pub(super) async fn conclude(
        self: &Arc<Self>,
        done: Done,
        routed: &Routed,
        skipped: &[Skipped],
        carry: Carry,
        ahead: &mut Lookahead,
    ) -> (AttemptReport, Option<Follow>) {
        let Done {
            id,
            mut lease,
            ticket,
            mut report,
            signal,
            since,
        } = done;
        let others = routed.relays.len() > 1;
        let relay = &self.relays[id];
        let took = report
            .results
            .iter()
            .any(|(_, o)| matches!(o, RcptOutcome::Delivered { .. }));
        if took && signal == Signal::Ok {
            // Mail waits beyond what the connections carry: a message
            // taken to go behind this one, or jobs still queued after the
            // stream took what it could, or a message parked.
            let (in_flight, taken) = match &carry {
                Carry::Data(next) => (1, next.is_some()),
                Carry::Stream(flight) => (flight.len() + 1, false),
                Carry::Nothing => (1, false),
            };
            let backlog =
                taken || relay.pool.is_wanted() || relay.pool.has_handed() || ahead.waiting();
            relay.pool.delivered(&mut lease, in_flight, backlog);
        }
        // A 421 on one connection while others work: fewer connections,
        // not a pause of the whole relay.
        let pushback = match &signal {
            Signal::Throttled(error) if relay.pool.established() > 0 => {
                relay.pool.pushback(
                    &lease,
                    Pushback::Throttled {
                        error: error.clone(),
                    },
                );
                true
            }
            _ => false,
        };
        let (lease, follow) = self.follow_on(id, lease, carry, ahead, since).await;
        if let Some(lease) = lease {
            relay.pool.checkin(lease);
        }
        let now = self.clock.now_ms();
        if !pushback {
            self.record_signal(id, &signal, now);
        }
        if !took {
            self.give_back(id, ticket).await;
        }
        if self.named {
            report.via = Some(relay.name.to_string());
        }
        if self.routed {
            let mut note = format!("route: {}", routed.reason);
            for s in skipped {
                note.push_str(&format!(
                    "; failover from {}: {}",
                    self.relays[s.relay].name, s.text
                ));
            }
            report.note = Some(note);
        }
        if pushback {
            // Its other connections work: try again soon, on one of them.
            report.retry_at_ms = Some(now + 1_000);
        } else if signal != Signal::Ok {
            report.wake_on = vec![relay.name.clone()];
            report.retry_at_ms = self.retry_hint(relay, now, others);
        }
        (report, follow)
    }

    /// After a relay failure: when to look again. With other relays to
    /// fail over to, as soon as the outage reaches `failover_after`; for
    /// a paused relay, when the pause ends.
    fn retry_hint(&self, relay: &RelayEntry, now: u64, others: bool) -> Option<u64> {
        let hint = match relay.state().health.status(now) {
            Status::Up => None,
            Status::Down { since } if others => {
                Some(since.saturating_add(relay.policy.failover_after))
            }
            Status::Down { .. } => None,
            Status::Paused { since, until } if others => {
                Some(until.min(since.saturating_add(relay.policy.failover_after)))
            }
            Status::Paused { until, .. } => Some(until),
        };
        hint.map(|t| t.max(now + 1_000))
    }

    fn health_text(&self, relay: &RelayEntry, now: u64) -> String {
        let st = relay.state();
        let error = st.health.last_error().unwrap_or("no answer");
        match st.health.status(now) {
            Status::Up => "up".into(),
            Status::Down { since } => {
                format!("relay down since {} ({error})", fmt_time(since, None))
            }
            Status::Paused { until, .. } if until > now => format!(
                "relay paused by the circuit breaker until {} ({error})",
                fmt_time(until, None)
            ),
            Status::Paused { .. } => {
                format!("relay paused by the circuit breaker, waiting for a probe ({error})")
            }
        }
    }

    /// Notes what an attempt or probe showed about a relay, and says so in
    /// the log when that changes its state.
    pub(super) fn record_signal(&self, id: RelayId, signal: &Signal, now: u64) {
        let relay = &self.relays[id];
        let transition = relay.state().health.record(signal, now, &relay.policy);
        if transition != Transition::None {
            self.steer();
        }
        let (name, endpoint) = (&relay.name, &relay.endpoint);
        let error = signal.error().unwrap_or_default();
        match transition {
            Transition::None => {}
            Transition::WentDown => {
                let failover = if self.relays.len() > 1 {
                    format!(
                        "; its mail moves to the route's fallback after {}s down",
                        relay.policy.failover_after / 1000
                    )
                } else {
                    String::new()
                };
                tracing::warn!(target: "relayq::routing", "relay {name} ({endpoint}) is down: {error}{failover}");
            }
            Transition::Paused { until } => tracing::warn!(
                target: "relayq::routing",
                "relay {name} ({endpoint}) paused by the circuit breaker until {}: {error}; no mail is sent to it until a probe succeeds",
                fmt_time(until, None)
            ),
            Transition::CameUp { down_for } => {
                tracing::info!(
                    target: "relayq::routing",
                    "relay {name} ({endpoint}) is up again after {}s",
                    down_for / 1000
                );
                if let Some(s) = &self.scheduler {
                    s.relay_up(name);
                }
            }
        }
    }

    /// An operator flushed the queue: forget outages and pauses so every
    /// relay is tried again now.
    pub fn reset_health(&self) {
        let now = self.clock.now_ms();
        for r in &self.relays {
            let mut st = r.state();
            if st.health.status(now) != Status::Up {
                tracing::info!(target: "relayq::routing", "relay {} ({}): outage forgotten by a queue flush; trying it again", r.name, r.endpoint);
            }
            st.health = Health::default();
            st.fleet_full = None;
            drop(st);
            if let Some(tokens) = r.pool.tokens() {
                tokens.retry_now();
            }
        }
        self.steer();
    }

    /// Probes every relay whose probe is due (see `health`).
    pub async fn probe_due(self: &Arc<Self>) {
        // Outages reach failover_after and pauses end as time passes.
        self.steer();
        let now = self.clock.now_ms();
        for id in 0..self.relays.len() {
            if !self.relays[id].state().health.take_probe(now) {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                let relay = &this.relays[id];
                match relay.pool.probe().await {
                    Some(signal) => {
                        if let Some(e) = signal.error() {
                            tracing::info!(target: "relayq::routing", "relay {} ({}): probe failed: {e}", relay.name, relay.endpoint);
                        }
                        let now = this.clock.now_ms();
                        this.record_signal(id, &signal, now);
                    }
                    None => {
                        let now = this.clock.now_ms();
                        relay.state().health.probe_later(now + 1_000);
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn relay(name: &str) -> String {
        format!("[relay.{name}]\nhost = \"127.0.0.1\"\nport = 2525\ntls = \"none\"\n")
    }

    /// Where `route`'s mail goes by health, and the relays skipped.
    fn goes(r: &Router, route: &[RelayId]) -> (Option<(RelayId, Availability)>, Vec<RelayId>) {
        let (to, skipped) = r.by_health(route, r.clock.now_ms());
        (to, skipped.iter().map(|s| s.relay).collect())
    }

    /// The relays the gate is told mail goes to now.
    fn routed(r: &Router) -> Vec<bool> {
        (0..r.relays.len()).map(|i| r.gate.is_routed(i)).collect()
    }

    #[test]
    fn the_gate_hears_where_each_route_sends_mail_as_outages_move_it() {
        // Route x: a, then b, then c. Every other message: b, then c (b is
        // x's first fallback and the other route's primary). d: no route.
        let text = [
            "hostname = \"relayq.test\"\n".to_string(),
            relay("a"),
            relay("b"),
            relay("c"),
            relay("d"),
            "[[route]]\nsender_domain = \"x.example\"\nrelay = \"a\"\nfallback = [\"b\", \"c\"]\n"
                .into(),
            "[[route]]\nrelay = \"b\"\nfallback = [\"c\"]\n".into(),
        ]
        .concat();
        let config = Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let clock = Clock::new();
        let r = Router::new(&config, clock.clone(), None).unwrap();
        let past_failover = || {
            clock.advance(Duration::from_secs(61));
            r.steer();
        };
        let down =
            |id: RelayId| r.record_signal(id, &Signal::Down("refused".into()), clock.now_ms());
        // Every relay up: the primaries only (c and d get no mail).
        assert_eq!(routed(&r), [true, true, false, false]);
        // a is down, but its mail keeps trying it until failover_after.
        down(0);
        assert_eq!(routed(&r), [true, true, false, false]);
        // Past it, x's mail goes to b.
        past_failover();
        assert_eq!(routed(&r), [false, true, false, false]);
        // b down too: both routes' mail goes to c.
        down(1);
        past_failover();
        assert_eq!(routed(&r), [false, false, true, false]);
        // All down: each route tries its first relay as a last resort.
        down(2);
        past_failover();
        assert_eq!(routed(&r), [true, true, false, false]);
        // Back up: c gets nothing again.
        for id in 0..3 {
            r.record_signal(id, &Signal::Ok, clock.now_ms());
        }
        assert_eq!(routed(&r), [true, true, false, false]);
        // Nothing carries mail: one worker looks for it.
        assert_eq!(r.gate.size(), 1);
    }

    #[test]
    fn failover_mail_goes_to_the_first_usable_relay_as_time_passes() {
        // a, then b, then c (the messages a fallback's connection may take
        // behind the one it carries are those this picks it for).
        let text = [
            "hostname = \"relayq.test\"\n".to_string(),
            relay("a"),
            relay("b"),
            relay("c"),
            "[[route]]\nrelay = \"a\"\nfallback = [\"b\", \"c\"]\n".into(),
        ]
        .concat();
        let config = Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        let clock = Clock::new();
        let r = Router::new(&config, clock.clone(), None).unwrap();
        let route = [0, 1, 2];
        let down =
            |id: RelayId| r.record_signal(id, &Signal::Down("refused".into()), clock.now_ms());
        assert_eq!(goes(&r, &route), (Some((0, Availability::Use)), vec![]));
        // a is down: its mail keeps trying it until failover_after.
        down(0);
        assert_eq!(goes(&r, &route), (Some((0, Availability::Use)), vec![]));
        clock.advance(Duration::from_secs(61));
        assert_eq!(goes(&r, &route), (Some((1, Availability::Use)), vec![0]));
        // b throttles us: paused, its mail waits for it until failover_after.
        r.record_signal(1, &Signal::Throttled("421 busy".into()), clock.now_ms());
        let (to, skipped) = goes(&r, &route);
        assert!(
            matches!(to, Some((1, Availability::WaitFor { .. }))) && skipped == [0],
            "{to:?} {skipped:?}"
        );
        clock.advance(Duration::from_secs(61));
        assert_eq!(goes(&r, &route), (Some((2, Availability::Use)), vec![0, 1]));
        // c down past failover_after too: nothing is usable (the router
        // then tries a down relay as a last resort, alone).
        down(2);
        clock.advance(Duration::from_secs(61));
        assert_eq!(goes(&r, &route), (None, vec![0, 1, 2]));
        // a is back: everything goes to it again.
        r.record_signal(0, &Signal::Ok, clock.now_ms());
        assert_eq!(goes(&r, &route), (Some((0, Availability::Use)), vec![]));
    }
}
