//! A relay's connection pool: at most `max_connections` connections open
//! at once (busy or idle), each reused until `max_messages_per_connection`
//! or `idle_timeout`, and within that at most as many as the relay's
//! concurrency allows now (`routing::concurrency`, which the pool keeps
//! and feeds: deliveries, pushback, idleness).
//!
//! Workers never wait on a pool. A worker that finds every connection busy
//! hands its message over to the pool ([`RelayPool::hand_over`]): a
//! connection sending message after message takes it next, as it would
//! the next message in the queue, so a message that came to a worker
//! without a connection costs the relay's streams nothing. Whatever is
//! still handed over when a connection comes back goes back to the
//! scheduler, to be tried at once. A worker that cannot hand its message
//! over gives it back to the scheduler as parked on this relay; the
//! relay's connections then take no more messages behind the ones they
//! carry ([`RelayPool::is_wanted`]) until one comes back. The pool tells
//! the scheduler each time a connection comes back (`relay_free`), with a
//! release count that only grows: a worker reads the count *before* it
//! looks for a connection, so a connection returned in between is never
//! missed. Release counts come from one count for the whole process
//! ([`RELEASED`]), so a relay's new pool after a reload starts above
//! anything its old pool told the scheduler, and a refused checkout
//! returns that count, not the pool's own, so what the old pool releases
//! after the reload (mail in flight then) wakes mail parked on the new one
//! once, not over and over. That way a slow relay occupies only its own connections, never
//! the workers other relays need (Postfix's qmgr keeps per-destination
//! concurrency for the same reason). When the
//! concurrency grows, that counts as a connection coming back; when it
//! shrinks, connections over it are closed as they come back (one carrying
//! message after message comes back once what it carries is answered:
//! [`RelayPool::over_limit`]), and the workers' gate (`delivery::gate`)
//! follows it. The gate also hears of every connection lent for mail and
//! returned: a relay's concurrency counts there only while it carries
//! mail (a probe's connection carries none). The connections being opened
//! and how far each got are kept in `transport::openings`, so that a
//! relay's refusal of one more counts what the relay served
//! ([`RelayPool::served_with`]); a failed attempt leaves that count with
//! its slot, and the concurrency does not grow while a refusal is
//! counted. A pool a reload replaced is retired ([`RelayPool::retire`]):
//! its connections close once their mail is done, and until then the new
//! pool counts them as the relay does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::oauth2::TokenSource;
use super::openings::Openings;
use super::relay::RelaySender;
use crate::clock::Clock;
use crate::config::RelayConfig;
use crate::delivery::SchedulerHandle;
use crate::delivery::gate::Gate;
use crate::delivery::scheduler::Next;
use crate::routing::concurrency::{Change, Concurrency, Delivered, Pushback};
use crate::routing::health::Signal;

struct Idle {
    sender: RelaySender,
    permit: OwnedSemaphorePermit,
    since: Instant,
}

/// A connection slot (and maybe an open connection) lent to one worker.
pub struct Lease {
    pub sender: RelaySender,
    permit: OwnedSemaphorePermit,
    /// The concurrency's generation when lent (see `Concurrency::pushback`).
    generation: u64,
    /// Since when the connection works on its current message.
    busy_since: Instant,
    /// Tells the workers' gate when the connection comes back (none for
    /// a probe: it carries no mail).
    _lent: Option<Lent>,
}

/// A connection lent for mail, as the workers' gate counts it.
struct Lent(Arc<Gate>, usize);

impl Lent {
    fn new(gate: &Option<(Arc<Gate>, usize)>) -> Option<Lent> {
        let (gate, relay) = gate.as_ref()?;
        gate.lent(*relay, true);
        Some(Lent(gate.clone(), *relay))
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.0.lent(self.1, false);
    }
}

impl Lease {
    /// The connection is ready for mail (connected, greeted, logged in):
    /// the time a message takes on it counts from now, so that opening a
    /// connection (a round trip or more, TLS, AUTH) is not taken for a
    /// slow delivery, which would make new connections look slow and cut
    /// the concurrency ("rate").
    pub fn set_up(&mut self) {
        self.busy_since = Instant::now();
    }
}

pub struct RelayPool {
    name: Arc<str>,
    relay: RelayConfig,
    helo: String,
    /// The relay's OAuth2 tokens, one source for all its connections.
    tokens: Option<Arc<TokenSource>>,
    max: usize,
    /// One permit per connection, held while it is open, busy or idle,
    /// or closing.
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    /// Connections being closed (their permit is still held).
    closing: AtomicUsize,
    /// Connections open and logged in, busy or idle (kept by the senders).
    established: Arc<AtomicUsize>,
    /// Connections being opened, and how far each got (told by the
    /// senders): what a refusal of one more counts.
    openings: Arc<Openings>,
    concurrency: Mutex<Concurrency>,
    clock: Clock,
    /// When a connection was last lent or returned (unix ms).
    last_used_ms: AtomicU64,
    /// Grows every time a slot or an idle connection comes back (the
    /// number that release drew from [`RELEASED`]).
    releases: AtomicU64,
    /// One more than the release count a parked message's refused checkout
    /// saw (the highest such): while `releases` is below it, a message
    /// waits for a connection to this relay.
    wanted_until: AtomicU64,
    /// Messages handed over to ride the relay's busy connections, oldest
    /// first (the scheduler has them in flight).
    handed: Mutex<VecDeque<Box<str>>>,
    /// Told about releases, so parked messages go out.
    scheduler: Option<SchedulerHandle>,
    /// The workers' gate and this relay's place in it, told of the
    /// relay's concurrency and of connections lent.
    gate: Option<(Arc<Gate>, usize)>,
    /// A reload replaced it: its connections finish the mail they carry
    /// (see [`RelayPool::retire`]).
    retired: AtomicBool,
    /// Refusals of one more connection being counted now
    /// ([`RelayPool::served_with`]): the concurrency does not grow
    /// meanwhile.
    counting: AtomicUsize,
    /// The relay's host and port, shared with the other pools to it.
    endpoint: Arc<Endpoint>,
}

/// One refusal being counted, for as long as it is.
struct Counting<'a>(&'a AtomicUsize);

impl<'a> Counting<'a> {
    fn new(n: &'a AtomicUsize) -> Counting<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        Counting(n)
    }
}

impl Drop for Counting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One relay host and port, shared by every pool to it (a reload's new
/// pools and the old ones it replaced): the pools alive, so that a new
/// pool can count the connections an old one still holds, and the
/// connections closed to it by any of them (see `transport::openings`).
struct Endpoint {
    host: String,
    port: u16,
    pools: Mutex<Vec<Weak<RelayPool>>>,
    closed: Arc<AtomicU64>,
}

/// One entry per endpoint ever configured.
static ENDPOINTS: Mutex<Vec<Arc<Endpoint>>> = Mutex::new(Vec::new());

fn endpoint(host: &str, port: u16) -> Arc<Endpoint> {
    let mut all = ENDPOINTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = all.iter().find(|e| e.host == host && e.port == port) {
        return e.clone();
    }
    let e = Arc::new(Endpoint {
        host: host.to_string(),
        port,
        pools: Mutex::new(Vec::new()),
        closed: Arc::new(AtomicU64::new(0)),
    });
    all.push(e.clone());
    e
}

impl Endpoint {
    fn pools(&self) -> MutexGuard<'_, Vec<Weak<RelayPool>>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every release of every pool draws its number here. The scheduler keeps
/// the highest number it heard per relay name, and a pool built by a
/// reload has the old one's name: counting from zero, its parked messages
/// would look released at once, over and over, until it caught up.
static RELEASED: AtomicU64 = AtomicU64::new(0);

/// What a pool needs besides the relay's settings.
pub struct PoolContext {
    pub helo: String,
    pub tokens: Option<Arc<TokenSource>>,
    pub scheduler: Option<SchedulerHandle>,
    /// The workers' gate and the relay's index in it.
    pub gate: Option<(Arc<Gate>, usize)>,
    pub clock: Clock,
}

impl Drop for RelayPool {
    /// A pool left behind (a reload) strands nothing handed over to it.
    fn drop(&mut self) {
        self.give_back_handed();
    }
}

impl RelayPool {
    pub fn new(name: Arc<str>, relay: RelayConfig, ctx: PoolContext) -> Arc<RelayPool> {
        let max = relay.connections();
        let now = ctx.clock.now_ms();
        let concurrency = if relay.adaptive() {
            Concurrency::adaptive(max, now)
        } else {
            Concurrency::fixed(max, now)
        };
        if let Some((gate, id)) = &ctx.gate {
            gate.set_limit(*id, concurrency.limit());
        }
        let endpoint = endpoint(&relay.host, relay.port);
        let openings = Openings::closing_into(endpoint.closed.clone());
        let pool = Arc::new(RelayPool {
            name,
            relay,
            helo: ctx.helo,
            tokens: ctx.tokens,
            max,
            slots: Arc::new(Semaphore::new(max)),
            idle: Mutex::new(Vec::new()),
            closing: AtomicUsize::new(0),
            established: Arc::new(AtomicUsize::new(0)),
            openings,
            concurrency: Mutex::new(concurrency),
            clock: ctx.clock,
            last_used_ms: AtomicU64::new(now),
            releases: AtomicU64::new(RELEASED.load(Ordering::SeqCst)),
            wanted_until: AtomicU64::new(0),
            handed: Mutex::new(VecDeque::new()),
            scheduler: ctx.scheduler,
            gate: ctx.gate,
            retired: AtomicBool::new(false),
            counting: AtomicUsize::new(0),
            endpoint,
        });
        let mut all = pool.endpoint.pools();
        all.retain(|p| p.strong_count() > 0);
        all.push(Arc::downgrade(&pool));
        drop(all);
        pool
    }

    /// A reload replaced this pool: its idle connections close now, and
    /// those carrying mail once it is done (nobody reaps this pool any
    /// more, and the relay counts them against the new pool's). Until
    /// then the new pool counts them as the relay's other connections
    /// ([`RelayPool::left_behind`]) when the relay refuses one more of
    /// its own. Kept open and not counted, they made the new pool's first
    /// connections, all refused, look like a relay refusing every
    /// connection (its health: the circuit breaker paused it, and again
    /// at each probe, while they stayed open).
    pub fn retire(self: &Arc<Self>) {
        self.retired.store(true, Ordering::SeqCst);
        let idle = std::mem::take(&mut *self.idle());
        for i in idle {
            self.close_later(i.sender, i.permit);
        }
    }

    /// Connections held to this pool's relay (same host and port) by the
    /// pools a reload replaced: (held slots, established).
    pub fn left_behind(&self) -> (usize, usize) {
        let retired: Vec<Arc<RelayPool>> = self
            .endpoint
            .pools()
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|p| p.retired.load(Ordering::SeqCst) && !std::ptr::eq(Arc::as_ptr(p), self))
            .collect();
        // Summed (and dropped, maybe the last owner) outside the lock.
        retired.iter().fold((0, 0), |(held, up), p| {
            (held + p.held_slots(), up + p.established())
        })
    }

    /// Connections the relay's concurrency allows now.
    pub fn limit(&self) -> usize {
        self.concurrency().limit()
    }

    fn concurrency(&self) -> MutexGuard<'_, Concurrency> {
        self.concurrency.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The concurrency's last change (what, when and why).
    pub fn last_change(&self) -> Change {
        self.concurrency().last_change().clone()
    }

    pub fn is_adaptive(&self) -> bool {
        self.concurrency().is_adaptive()
    }

    /// The relay's OAuth2 token source, if relayq gets its tokens.
    pub fn tokens(&self) -> Option<&Arc<TokenSource>> {
        self.tokens.as_ref()
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn max_connections(&self) -> usize {
        self.max
    }

    /// Connections open now (busy or idle), counting ones being opened,
    /// not ones being closed.
    pub fn open_connections(&self) -> usize {
        (self.max - self.slots.available_permits())
            .saturating_sub(self.closing.load(Ordering::SeqCst))
    }

    /// Connections the relay may count now: open, being opened or being
    /// closed.
    pub fn held_slots(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Whether a connection waits idle in the pool now.
    pub fn has_idle(&self) -> bool {
        !self.idle().is_empty()
    }

    /// Connections open and logged in now, busy or idle.
    pub fn established(&self) -> usize {
        self.established.load(Ordering::SeqCst)
    }

    fn busy(&self) -> usize {
        self.open_connections().saturating_sub(self.idle().len())
    }

    /// Connections logged in and at work on mail (not idle, not being
    /// opened).
    fn working(&self) -> usize {
        self.established().saturating_sub(self.idle().len())
    }

    /// More connections at work (logged in, not idle) than the concurrency
    /// allows now: a cut has not taken effect yet. A connection carrying
    /// message after message then takes no more and comes back once what
    /// it carries is answered, to be closed while there are too many.
    /// (Connections still being opened don't count: one the relay refuses
    /// must not make the ones it serves close.)
    pub fn over_limit(&self) -> bool {
        self.established().saturating_sub(self.idle().len()) > self.limit()
    }

    /// An idle connection, or a free slot to open one; `Err` with the
    /// release count when the concurrency allows no more.
    pub fn try_checkout(self: &Arc<Self>) -> Result<Lease, u64> {
        let mut lease = self.try_lend()?;
        lease._lent = Lent::new(&self.gate);
        Ok(lease)
    }

    /// [`RelayPool::try_checkout`], not counted by the workers' gate.
    fn try_lend(self: &Arc<Self>) -> Result<Lease, u64> {
        // The process-wide count, not this pool's: the scheduler keeps the
        // highest count it heard per relay name, and after a reload the
        // old pool of that name goes on releasing (mail in flight then),
        // with numbers above this pool's own. A refused checkout that
        // returned this pool's count was released by those at once, over
        // and over, until this pool released something itself.
        let seen = RELEASED.load(Ordering::SeqCst);
        let (limit, generation) = {
            let c = self.concurrency();
            (c.limit(), c.generation())
        };
        self.touch();
        loop {
            let Some(idle) = self.idle().pop() else { break };
            if self.open_connections() > limit {
                // Over the concurrency after a cut: close it, try the next.
                self.close_later(idle.sender, idle.permit);
                continue;
            }
            return Ok(Lease {
                sender: idle.sender,
                permit: idle.permit,
                generation,
                busy_since: Instant::now(),
                _lent: None,
            });
        }
        let permit = match self.open_connections() < limit {
            true => self.slots.clone().try_acquire_owned().ok(),
            false => None,
        };
        match permit {
            Some(permit) => Ok(Lease {
                sender: RelaySender::for_relay(
                    self.relay.clone(),
                    self.helo.clone(),
                    self.tokens.clone(),
                )
                .counted(self.established.clone(), self.openings.clone()),
                permit,
                generation,
                busy_since: Instant::now(),
                _lent: None,
            }),
            None => Err(seen),
        }
    }

    /// Message `id` found every connection busy (at release count `seen`):
    /// kept for a connection sending message after message to take next
    /// ([`RelayPool::take_handed`]); what is still here when a connection
    /// comes back goes back to the scheduler, to be tried at once. Not
    /// kept (`false`) when a connection came back meanwhile, or with no
    /// scheduler to give it back to.
    pub fn hand_over(&self, id: &str, seen: u64) -> bool {
        if self.scheduler.is_none() {
            return false;
        }
        // `released` counts before it takes what is here: under this lock
        // either it has counted (and this is not kept) or it will take it.
        let mut handed = self.handed();
        if self.releases.load(Ordering::SeqCst) > seen {
            return false;
        }
        handed.push_back(id.into());
        true
    }

    /// The oldest message handed over, for a busy connection to take next;
    /// it is the taker's from then on.
    pub fn take_handed(&self) -> Option<Box<str>> {
        self.handed().pop_front()
    }

    /// Whether a message handed over waits for a connection.
    pub fn has_handed(&self) -> bool {
        !self.handed().is_empty()
    }

    fn handed(&self) -> MutexGuard<'_, VecDeque<Box<str>>> {
        self.handed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A message found every connection busy (at release count `seen`) and
    /// waits parked: the connections take no more messages behind the ones
    /// they carry until one comes back.
    pub fn want(&self, seen: u64) {
        self.wanted_until.fetch_max(seen + 1, Ordering::SeqCst);
    }

    fn touch(&self) {
        self.last_used_ms
            .store(self.clock.now_ms(), Ordering::SeqCst);
    }

    /// Whether a message is parked waiting for a connection to come back.
    /// A worker keeping its connection for message after message (sending
    /// each behind the previous one's end of data) gives it back then.
    pub fn is_wanted(&self) -> bool {
        self.wanted_until.load(Ordering::SeqCst) > self.releases.load(Ordering::SeqCst)
    }

    /// This pool's release count now.
    pub fn releases(&self) -> u64 {
        self.releases.load(Ordering::SeqCst)
    }

    /// What a message parked now waits to see exceeded: the process-wide
    /// count, as a refused checkout returns (see [`RelayPool::try_checkout`]).
    pub fn release_mark(&self) -> u64 {
        RELEASED.load(Ordering::SeqCst)
    }

    /// Takes a connection back: kept for the next message if it is open,
    /// under `max_messages_per_connection` and within the concurrency,
    /// else closed.
    pub fn checkin(self: &Arc<Self>, lease: Lease) {
        self.touch();
        let spent = self
            .relay
            .max_messages_per_connection
            .is_some_and(|max| lease.sender.sent_on_connection() >= max);
        let over = self.open_connections() > self.limit() || self.retired.load(Ordering::SeqCst);
        if lease.sender.is_connected() && !spent && !over {
            self.idle().push(Idle {
                sender: lease.sender,
                permit: lease.permit,
                since: Instant::now(),
            });
            self.released();
        } else if lease.sender.is_connected() {
            self.close_later(lease.sender, lease.permit);
        } else {
            // A failed attempt leaves the relay's count with its slot.
            let mut lease = lease;
            match lease.sender.take_failed_opening() {
                Some(failed) => failed.end_with(lease),
                None => drop(lease),
            }
            self.released();
        }
    }

    /// The connections the relay served when it refused `lease`'s attempt
    /// to open one more, which failed: held ones, but not those refused
    /// with it (see `transport::openings`). Waits for the others being
    /// opened to get as far, at most `connect_timeout`.
    ///
    /// The concurrency does not grow while it waits: slow start would
    /// open more connections on the deliveries of those at work while the
    /// relay, slow to greet the ones it serves, says how many it allows
    /// (seen: 4 -> 12 -> 24 against a relay allowing 8, 16 refused).
    pub async fn served_with(&self, lease: &Lease) -> usize {
        let _counting = Counting::new(&self.counting);
        let ours = match lease.sender.failed_opening() {
            Some(refused) => {
                let within = self.relay.connect_timeout.0;
                self.openings
                    .served_with(refused, || self.held_slots(), within)
                    .await
            }
            None => self.held_slots().saturating_sub(1),
        };
        ours + self.left_behind().0
    }

    /// A message went out on `lease` and the relay took it: feeds the
    /// concurrency. `in_flight`: messages on the connection when it was
    /// answered (itself included); `backlog`: more mail is ready for this
    /// relay than its connections carry.
    pub fn delivered(&self, lease: &mut Lease, in_flight: usize, backlog: bool) {
        let spent = lease.busy_since.elapsed();
        lease.busy_since = Instant::now();
        let d = Delivered {
            busy: self.busy().max(1),
            working: self.working().max(1),
            spent: Some(spent),
            in_flight,
            backlog: self.grows(backlog),
        };
        let now = self.clock.now_ms();
        self.adjust(|c| c.delivered(now, d));
    }

    /// `lease` opened a connection and the relay let it in (greeting,
    /// EHLO, TLS, login): an answer as good as a delivery for the
    /// concurrency once past slow start (in slow start a level grows by
    /// the rounds it measured, and a login measures nothing). `backlog`
    /// as for [`RelayPool::delivered`].
    pub fn connected(&self, backlog: bool) {
        let busy = self.busy().max(1);
        let d = Delivered {
            busy,
            working: busy,
            spent: None,
            in_flight: 1,
            backlog: self.grows(backlog),
        };
        let now = self.clock.now_ms();
        self.adjust(|c| c.delivered(now, d));
    }

    /// Whether mail waiting (`backlog`) may grow the concurrency now: not
    /// while a refusal of one more connection is being counted.
    fn grows(&self, backlog: bool) -> bool {
        backlog && self.counting.load(Ordering::SeqCst) == 0
    }

    /// The relay pushed back on `lease`'s attempt while other connections
    /// to it worked.
    pub fn pushback(&self, lease: &Lease, signal: Pushback) {
        let now = self.clock.now_ms();
        self.adjust(|c| c.pushback(now, signal, lease.generation));
    }

    /// Changes the concurrency with `f`; on a change, resizes the
    /// workers' gate (under the concurrency's lock, so the gate's last
    /// word is the concurrency's last), logs it, and lets parked mail go
    /// when it grew.
    fn adjust(&self, f: impl FnOnce(&mut Concurrency) -> Option<Change>) {
        let change = {
            let mut c = self.concurrency();
            let change = f(&mut c);
            if change.is_some()
                && let Some((gate, id)) = &self.gate
            {
                gate.set_limit(*id, c.limit());
            }
            change
        };
        let Some(change) = change else { return };
        let endpoint = format!("{}:{}", self.relay.host, self.relay.port);
        if change.to < change.from {
            tracing::info!(target: "relayq::routing", "relay {} ({endpoint}): concurrency {}", self.name, change.text);
        } else {
            tracing::debug!(target: "relayq::routing", "relay {} ({endpoint}): concurrency {}", self.name, change.text);
        }
        if change.to > change.from {
            self.released();
        }
    }

    /// QUITs in the background; the slot is free only once it is closed,
    /// so the relay never sees more than `max_connections`.
    fn close_later(self: &Arc<Self>, mut sender: RelaySender, permit: OwnedSemaphorePermit) {
        self.closing.fetch_add(1, Ordering::SeqCst);
        let pool = self.clone();
        tokio::spawn(async move {
            sender.close().await;
            pool.closing.fetch_sub(1, Ordering::SeqCst);
            pool.openings.closed();
            drop(permit);
            pool.released();
        });
    }

    fn released(&self) {
        let n = RELEASED.fetch_add(1, Ordering::SeqCst) + 1;
        // Two releases at once may store out of order: the count never
        // goes back.
        self.releases.fetch_max(n, Ordering::SeqCst);
        if let Some(s) = &self.scheduler {
            s.relay_free(&self.name, n);
        }
        self.give_back_handed();
    }

    /// Messages handed over and not taken go back to the scheduler, due now.
    fn give_back_handed(&self) {
        let back = std::mem::take(&mut *self.handed());
        if let Some(s) = &self.scheduler {
            let now = self.clock.now_ms();
            for id in back {
                s.finished(&id, Next::RetryAt(now));
            }
        }
    }

    /// Closes connections idle for longer than `idle_timeout`; once none
    /// has been open for that long, the concurrency starts afresh.
    pub fn reap(self: &Arc<Self>) {
        let limit = self.relay.idle_timeout.0;
        let now = self.clock.now_ms();
        let quiet = now.saturating_sub(self.last_used_ms.load(Ordering::SeqCst));
        if self.open_connections() == 0 && u128::from(quiet) >= limit.as_millis() {
            self.adjust(|c| c.idle(now));
        }
        let stale: Vec<Idle> = {
            let mut idle = self.idle();
            let (stale, keep) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|i| i.since.elapsed() >= limit);
            *idle = keep;
            stale
        };
        for i in stale {
            self.close_later(i.sender, i.permit);
        }
    }

    /// Opens (or checks) a connection to see whether the relay is back;
    /// `None` when no slot is free to do so. A good connection stays in
    /// the pool for the next message.
    pub async fn probe(self: &Arc<Self>) -> Option<Signal> {
        let mut lease = self.try_lend().ok()?;
        let signal = lease.sender.probe().await;
        self.checkin(lease);
        Some(signal)
    }

    /// QUITs every idle connection (at shutdown, after the workers stopped).
    pub async fn close_all(&self, limit: Duration) {
        let idle = std::mem::take(&mut *self.idle());
        let closing = idle.into_iter().map(|mut i| async move {
            i.sender.close().await;
        });
        let _ = tokio::time::timeout(limit, futures_join_all(closing)).await;
    }
}

/// Runs futures concurrently to completion (a tiny join_all).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(relay: &str, gate: Option<(Arc<Gate>, usize)>) -> Arc<RelayPool> {
        pool_with(relay, gate, None)
    }

    fn pool_with(
        relay: &str,
        gate: Option<(Arc<Gate>, usize)>,
        scheduler: Option<SchedulerHandle>,
    ) -> Arc<RelayPool> {
        let relay: RelayConfig = toml::from_str(relay).unwrap();
        let ctx = PoolContext {
            helo: "client.test".into(),
            tokens: None,
            scheduler,
            gate,
            clock: Clock::new(),
        };
        RelayPool::new("a".into(), relay, ctx)
    }

    #[tokio::test]
    async fn a_connections_setup_is_not_counted_as_its_first_delivery() {
        let pool = pool("host = \"127.0.0.1\"\nport = 2525\n", None);
        for setup in [0u64, 5, 50] {
            let mut lease = pool.try_checkout().ok().unwrap();
            let checked_out = lease.busy_since;
            std::thread::sleep(Duration::from_millis(setup));
            let ready = Instant::now();
            lease.set_up();
            assert!(lease.busy_since >= ready && lease.busy_since >= checked_out);
            pool.checkin(lease);
        }
    }

    #[tokio::test]
    async fn a_pool_built_by_a_reload_counts_releases_above_the_old_ones() {
        // The scheduler keeps the highest release count per relay name: a
        // message parked on the new pool must not look released already.
        let relay = "host = \"127.0.0.1\"\nport = 2525\nconcurrency = 1\n";
        let old = pool(relay, None);
        for _ in 0..5 {
            let lease = old.try_checkout().ok().unwrap();
            old.checkin(lease);
        }
        let told_the_scheduler = old.releases();
        let new = pool(relay, None);
        let lease = new.try_checkout().ok().unwrap();
        let seen = new.try_checkout().err().unwrap();
        assert!(seen >= told_the_scheduler, "{seen} < {told_the_scheduler}");
        new.want(seen);
        assert!(new.is_wanted());
        new.checkin(lease);
        assert!(new.releases() > seen && !new.is_wanted());
    }

    #[tokio::test]
    async fn a_release_of_the_old_pool_after_a_reload_does_not_wake_the_new_ones_parked_mail_for_ever()
     {
        // Mail in flight when the reload came goes back to the old pool,
        // which tells the scheduler (by relay name) a release count above
        // the new pool's. A message parked on the new pool with the new
        // pool's count looked released at once, over and over (a busy loop
        // until the new pool released something itself): what a refused
        // checkout saw must cover every count the scheduler heard before.
        let relay = "host = \"127.0.0.1\"\nport = 2525\nconcurrency = 1\n";
        let old = pool(relay, None);
        let in_flight = old.try_checkout().ok().unwrap();
        let new = pool(relay, None);
        let busy = new.try_checkout().ok().unwrap();
        old.checkin(in_flight);
        let told_the_scheduler = old.releases();
        let seen = new.try_checkout().err().unwrap();
        assert!(seen >= told_the_scheduler, "{seen} < {told_the_scheduler}");
        // Parked on the new pool, it is wanted until the new pool gives a
        // connection back, not before.
        new.want(seen);
        assert!(new.is_wanted());
        let again = old.try_checkout().ok().unwrap();
        old.checkin(again);
        assert!(
            new.is_wanted(),
            "the old pool's release frees none of the new's"
        );
        new.checkin(busy);
        assert!(new.releases() > seen && !new.is_wanted());
    }

    #[tokio::test]
    async fn a_refused_checkout_is_wanted_until_a_connection_comes_back() {
        let pool = pool("host = \"127.0.0.1\"\nport = 2525\nconcurrency = 1\n", None);
        let lease = pool.try_checkout().ok().unwrap();
        assert!(!pool.is_wanted(), "nobody waits yet");
        let seen = pool.try_checkout().err().unwrap();
        assert!(!pool.is_wanted(), "the message may yet be handed over");
        assert!(
            !pool.hand_over("x", seen),
            "no scheduler to give it back to: not kept"
        );
        pool.want(seen);
        assert!(pool.is_wanted(), "a message waits for the only connection");
        pool.checkin(lease);
        assert!(!pool.is_wanted(), "the connection came back");
    }

    #[tokio::test]
    async fn mail_handed_over_rides_a_busy_connection_or_goes_back_when_one_returns() {
        use crate::spool::{Envelope, Spool};
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let (scheduler, handle, jobs) =
            crate::delivery::scheduler::Scheduler::new(spool.clone(), Clock::new(), 1);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(scheduler.run(shutdown));
        let env = Envelope {
            sender: "a@example.com".into(),
            recipients: vec!["b@example.net".into()],
            ..Envelope::default()
        };
        let id = spool
            .commit(Spool::new_id(), env, b"Subject: x\r\n\r\nx\r\n".to_vec(), 1)
            .await
            .unwrap();
        handle.queued(&id);
        let next_job = || async {
            let job = tokio::time::timeout(Duration::from_secs(10), async {
                jobs.lock().await.recv().await
            });
            job.await.expect("a job").expect("queue open").id
        };
        assert_eq!(&*next_job().await, id, "a worker has it");
        let pool = pool_with(
            "host = \"127.0.0.1\"\nport = 2525\nconcurrency = 1\n",
            None,
            Some(handle),
        );
        let lease = pool.try_checkout().ok().unwrap();
        let seen = pool.try_checkout().err().unwrap();
        assert!(pool.hand_over("a", seen) && pool.hand_over(&id, seen));
        assert!(pool.has_handed() && !pool.is_wanted(), "streams go on");
        assert_eq!(pool.take_handed().as_deref(), Some("a"), "oldest first");
        // The connection comes back: what is left goes to the scheduler,
        // which hands it out again at once.
        pool.checkin(lease);
        assert!(!pool.has_handed());
        assert_eq!(&*next_job().await, id, "tried again");
        // A checkout that saw the count before that return keeps nothing:
        // the message is tried again instead.
        let lease = pool.try_checkout().ok().unwrap();
        assert!(!pool.hand_over("c", seen));
        pool.checkin(lease);
    }

    #[tokio::test]
    async fn checkouts_follow_the_concurrency_and_the_gate_follows_too() {
        let gate = Gate::new(1);
        let pool = pool(
            "host = \"127.0.0.1\"\nport = 2525\nmax_connections = 6\n",
            Some((gate.clone(), 0)),
        );
        assert_eq!(gate.free(), 1, "no mail on it yet: one worker looks");
        // A probe's connection carries no mail: the gate doesn't count it.
        let probe = pool.try_lend().ok().unwrap();
        assert_eq!(gate.free(), 1);
        pool.checkin(probe);
        assert!(pool.is_adaptive());
        let mut leases: Vec<Lease> = (0..4).map(|_| pool.try_checkout().ok().unwrap()).collect();
        assert!(pool.try_checkout().is_err(), "four to start with");
        assert_eq!(gate.free(), 4, "mail on it: its concurrency counts");
        // Delivered with every connection busy (logged in: no relay here,
        // so counted by hand) and mail waiting: more, once the four are
        // measured (8 rounds), up to the cap.
        pool.established.store(4, Ordering::SeqCst);
        for _ in 0..7 {
            pool.delivered(&mut leases[0], 1, true);
        }
        assert_eq!(pool.limit(), 4);
        pool.delivered(&mut leases[0], 1, true);
        assert_eq!(pool.limit(), 6);
        assert_eq!(gate.free(), 6);
        leases.push(pool.try_checkout().ok().unwrap());
        // The relay refuses a sixth with "421 too many" while five are open:
        // five it is, and the gate shrinks with it.
        let sixth = pool.try_checkout().ok().unwrap();
        pool.pushback(
            &sixth,
            Pushback::Refused {
                open: pool.open_connections() - 1,
                error: "421 4.7.0 too many connections".into(),
            },
        );
        pool.checkin(sixth);
        assert_eq!(pool.limit(), 5);
        assert_eq!(gate.free(), 5);
        assert!(pool.try_checkout().is_err(), "at the relay's limit");
        for lease in leases {
            pool.checkin(lease);
        }
        assert_eq!(gate.free(), 1, "every connection back: it carries no mail");
    }
}
