//! The connections being opened to one relay and how far each got: what a
//! relay's refusal of one more connection counts.
//!
//! A relay that refuses one more connection ("421 4.7.0 Too many
//! concurrent SMTP connections" as its greeting, a `454` to AUTH) says it
//! serves what it had let in when it refused that one. Slow start opens
//! the connections a level earned together (`routing::concurrency`), so a
//! refusal usually comes while others are being opened with it: those the
//! relay refused too were never counted by it, and counting them (every
//! connection held) made a relay allowing 8 of a step to 12 seem to allow
//! 11, and relayq come down one refusal a round (10 refused instead of 4).
//!
//! So every attempt to open a connection begins an [`Opening`] here,
//! numbered in the order begun, and notes each step the relay lets it
//! past (TCP, TLS, greeting, EHLO, STARTTLS, AUTH: the same steps in the
//! same order for every connection to one relay). At a refusal,
//! [`Openings::served_with`] waits until every other connection being
//! opened has got further than the refused one or failed (about a round
//! trip: they were opened together), then counts every connection held
//! except the refused one and the others that failed without getting
//! further: the relay counted those that got as far, in whatever order
//! their answers reached us, and not those it refused. The step decides,
//! not the greeting: a relay that counts logins refuses at AUTH, when the
//! others refused with it have long been greeted. An attempt still short
//! of that step once the wait is over (a relay that holds a greeting back)
//! counts if it was begun before the refused one (it reached the relay
//! first), not if begun after it. Connections closed while the refused
//! one was being opened count too: our close reaches the relay after our
//! next connect may have, and a reload's old pools close theirs just as
//! the new pool opens its own (counted as none open, the refusal looked
//! like a relay refusing everything, and the circuit breaker paused it).
//!
//! An established connection is no longer here (it counts as held); an
//! attempt that failed stays until its slot is given back
//! ([`Opening::end_with`]), so that what is counted (held slots, under
//! this lock) and what is subtracted always agree.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

/// How far one attempt got.
#[derive(Debug, Clone, Copy, Default)]
struct Reached {
    /// Steps the relay let it past.
    steps: u32,
    /// It ended without a connection.
    failed: bool,
}

/// One relay's connections being opened (and failed ones whose slot is
/// still held), by the order they were begun in.
#[derive(Default)]
pub struct Openings {
    next: AtomicU64,
    /// Connections to the relay's host and port closed so far, by every
    /// pool (a reload's old ones too): a refusal counts those closed
    /// while it was being opened, which the relay may still have counted
    /// when it refused (our close reaches it later than our next
    /// connect, and the old pools of a reload close theirs then).
    closed: Arc<AtomicU64>,
    open: Mutex<BTreeMap<u64, Reached>>,
    /// Told of every step, failure and end, for a refusal waiting on them.
    moved: Notify,
}

/// One attempt to open a connection, from its beginning until it is
/// established or, if it failed, until its slot is given back.
pub struct Opening {
    openings: Arc<Openings>,
    seq: u64,
    /// [`Openings::closed`] when it began.
    closed: u64,
}

impl Openings {
    pub fn new() -> Arc<Openings> {
        Arc::new(Openings::default())
    }

    /// Counting in `closed` the connections to the relay closed (shared
    /// by every pool to the same host and port).
    pub fn closing_into(closed: Arc<AtomicU64>) -> Arc<Openings> {
        Arc::new(Openings {
            closed,
            ..Openings::default()
        })
    }

    /// A connection to the relay was closed.
    pub fn closed(&self) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }

    fn open(&self) -> MutexGuard<'_, BTreeMap<u64, Reached>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An attempt to open a connection begins (just before it connects).
    pub fn begin(self: &Arc<Self>) -> Opening {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        self.open().insert(seq, Reached::default());
        Opening {
            openings: self.clone(),
            seq,
            closed: self.closed.load(Ordering::SeqCst),
        }
    }

    fn update(&self, seq: u64, f: impl FnOnce(&mut Reached)) {
        if let Some(r) = self.open().get_mut(&seq) {
            f(r);
        }
        self.moved.notify_waiters();
    }

    /// The connections the relay served when it refused `refused` (which
    /// failed): every connection held (`held`, the relay's slots in use,
    /// this one's included) but this one and those that failed or were
    /// begun after it without getting further than it did, and those
    /// closed since it began (gone from `held`, maybe not yet from the
    /// relay's count: too many is a refusal more later, too few pauses
    /// the relay as if it refused everything). Waits up to `within` for
    /// the others being opened to get further or fail.
    pub async fn served_with(
        &self,
        refused: &Opening,
        held: impl Fn() -> usize,
        within: Duration,
    ) -> usize {
        // Attempts begun from now on began after the refusal came: not
        // waited for (nor counted unless they get further meanwhile).
        let seen = self.next.load(Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            {
                let open = self.open();
                let mine = open.get(&refused.seq).copied().unwrap_or_default();
                let short = |r: &Reached| r.steps <= mine.steps;
                let others = open.iter().filter(|(s, _)| **s != refused.seq);
                let waiting = others
                    .clone()
                    .any(|(s, r)| *s < seen && !r.failed && short(r));
                if !waiting || tokio::time::Instant::now() >= deadline {
                    let uncounted = others
                        .filter(|(s, r)| short(r) && (r.failed || **s > refused.seq))
                        .count();
                    let closed = self.closed.load(Ordering::SeqCst) - refused.closed;
                    return held().saturating_sub(1 + uncounted) + closed as usize;
                }
            }
            // Past the deadline, the loop counts what it has.
            let _ = tokio::time::timeout_at(deadline, moved).await;
        }
    }
}

impl Opening {
    /// The relay let it past one more step.
    pub fn step(&self) {
        self.openings.update(self.seq, |r| r.steps += 1);
    }

    /// It ended without a connection; it stays until its slot is given
    /// back ([`Opening::end_with`]) or it is dropped.
    pub fn fail(&self) {
        self.openings.update(self.seq, |r| r.failed = true);
    }

    /// Ends it and drops `slot` (what holds its place among the relay's
    /// connections) at once, as a refusal counts them: neither counted
    /// without the other. `slot` must hold no other opening of this
    /// relay (its drop would wait on the lock held here).
    pub fn end_with<T>(self, slot: T) {
        {
            let mut open = self.openings.open();
            open.remove(&self.seq);
            drop(slot);
        }
        // Drop finds nothing left to remove, and tells the waiters.
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        self.openings.open().remove(&self.seq);
        self.openings.moved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough never to be reached by a count that should not wait.
    const WAIT: Duration = Duration::from_secs(30);
    /// Steps before the greeting (TCP), and before the login (TCP,
    /// greeting, EHLO, STARTTLS, TLS, EHLO).
    const GREETING: u32 = 1;
    const LOGIN: u32 = 6;

    /// A relay's slots as a refusal counts them: one per attempt here
    /// and per connection established.
    struct Relay {
        openings: Arc<Openings>,
        established: usize,
        attempts: Vec<Option<Arc<Opening>>>,
    }

    type Shared = Arc<Mutex<Relay>>;

    impl Relay {
        fn new(established: usize) -> Relay {
            Relay {
                openings: Openings::new(),
                established,
                attempts: Vec::new(),
            }
        }

        /// `n` attempts begun together, numbered on from the last.
        fn begin(&mut self, n: usize) {
            for _ in 0..n {
                self.attempts.push(Some(Arc::new(self.openings.begin())));
            }
        }

        fn at(&self, i: usize) -> Arc<Opening> {
            self.attempts[i].clone().expect("still being opened")
        }

        /// Attempt `i` passed `steps` steps and is established.
        fn established(&mut self, i: usize, steps: u32) {
            self.steps(i, steps);
            self.attempts[i] = None;
            self.established += 1;
        }

        fn steps(&self, i: usize, steps: u32) {
            for _ in 0..steps {
                self.at(i).step();
            }
        }

        /// Attempt `i` passed `steps` steps and failed at the next one.
        fn failed(&self, i: usize, steps: u32) {
            self.steps(i, steps);
            self.at(i).fail();
        }

        /// Attempt `i` gives its slot back.
        fn ended(&mut self, i: usize) {
            let opening = self.attempts[i].take().expect("held");
            Arc::try_unwrap(opening)
                .ok()
                .expect("one owner")
                .end_with(());
        }

        fn held(&self) -> usize {
            self.established + self.attempts.iter().flatten().count()
        }

        /// What a refusal of attempt `i` counts now (nothing else moves
        /// while it waits).
        async fn served_with(&self, i: usize) -> usize {
            self.openings
                .served_with(&self.at(i), || self.held(), WAIT)
                .await
        }
    }

    /// Counts the refusal of attempt `i` in a task, while the test moves
    /// the others.
    fn counting(relay: &Shared, i: usize, within: Duration) -> tokio::task::JoinHandle<usize> {
        let (openings, refused) = {
            let r = relay.lock().unwrap();
            (r.openings.clone(), r.at(i))
        };
        let relay = relay.clone();
        let held = move || relay.lock().unwrap().held();
        tokio::spawn(async move { openings.served_with(&refused, held, within).await })
    }

    /// Lets a count waiting in a task run, and says it still waits.
    async fn still_waits(count: &tokio::task::JoinHandle<usize>, why: &str) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!count.is_finished(), "counted before {why}");
    }

    #[tokio::test]
    async fn refusals_that_arrive_together_each_count_what_the_relay_served() {
        // Four connections at work, slow start opens eight more at once,
        // the relay serves four of them and refuses the other four at
        // the greeting: every refusal says 8, whichever comes first, and
        // still 8 after another gave its slot back.
        for order in [[4, 5, 6, 7], [7, 6, 5, 4], [5, 7, 4, 6]] {
            let mut relay = Relay::new(4);
            relay.begin(8);
            for i in 0..4 {
                relay.established(i, 4);
            }
            for i in order {
                relay.failed(i, GREETING);
            }
            for i in order {
                assert_eq!(relay.served_with(i).await, 8, "order {order:?}");
            }
            relay.ended(order[0]);
            for i in &order[1..] {
                assert_eq!(relay.served_with(*i).await, 8, "order {order:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_refusal_waits_for_the_greetings_of_the_others_opened_with_it() {
        // The first refusal is read before the other refusals and before
        // the greetings of connections begun after it (the relay took
        // their connects in another order): it counts them once they are
        // answered, not as they stand when it came.
        let mut relay = Relay::new(4);
        relay.begin(8);
        relay.established(0, 4);
        relay.established(1, 4);
        relay.failed(2, GREETING);
        let relay = Arc::new(Mutex::new(relay));
        let count = counting(&relay, 2, WAIT);
        for (i, served) in [(7, true), (3, false), (5, true), (4, false), (6, false)] {
            still_waits(&count, &format!("{i} was answered")).await;
            let mut relay = relay.lock().unwrap();
            match served {
                true => relay.established(i, 4),
                false => relay.failed(i, GREETING),
            }
        }
        // Served: the 4 at work, 0, 1, 5 and 7 (these two begun after the
        // refused one); refused: 2 (this one), 3, 4 and 6.
        assert_eq!(count.await.unwrap(), 8);
    }

    #[tokio::test]
    async fn a_connection_begun_before_the_refused_one_and_refused_too_is_not_counted() {
        // The relay took the connects in another order: the first one
        // begun is refused with the last, those begun between are served.
        let mut relay = Relay::new(4);
        relay.begin(8);
        for i in 1..7 {
            relay.established(i, 4);
        }
        relay.failed(0, GREETING);
        relay.failed(7, GREETING);
        assert_eq!(relay.served_with(0).await, 10);
        assert_eq!(relay.served_with(7).await, 10);
        // Refused at the TCP connect, not even that far: not counted
        // either.
        let mut relay = Relay::new(4);
        relay.begin(3);
        relay.failed(0, 0);
        relay.established(1, 4);
        relay.failed(2, GREETING);
        assert_eq!(relay.served_with(2).await, 5);
    }

    #[tokio::test]
    async fn a_relay_counting_logins_is_counted_at_the_login() {
        // Refused at AUTH: the others refused at AUTH with it were
        // greeted long before and don't count; those logged in do, and
        // the one still logging in once it is let in.
        let mut relay = Relay::new(4);
        relay.begin(8);
        for i in 0..3 {
            relay.established(i, LOGIN + 1);
        }
        for i in 4..8 {
            relay.failed(i, LOGIN);
        }
        relay.steps(3, LOGIN);
        let relay = Arc::new(Mutex::new(relay));
        let count = counting(&relay, 5, WAIT);
        still_waits(&count, "3 was let in").await;
        relay.lock().unwrap().established(3, 1);
        assert_eq!(count.await.unwrap(), 8);
        // INITIAL four opened at once, the relay lets three log in and
        // refuses the fourth, whichever logs in last (it counts logins
        // in the order they come, not the connects): three. One begun
        // later, greeted and still logging in, waits to be counted.
        for refused in 0..4 {
            let mut relay = Relay::new(0);
            relay.begin(4);
            for i in (0..4).filter(|i| *i != refused) {
                match i < 3 {
                    true => relay.established(i, LOGIN + 1),
                    false => relay.steps(i, GREETING + 1),
                }
            }
            relay.failed(refused, LOGIN);
            let relay = Arc::new(Mutex::new(relay));
            let count = counting(&relay, refused, WAIT);
            if refused != 3 {
                still_waits(&count, "3 was let in").await;
                relay.lock().unwrap().established(3, LOGIN - GREETING);
            }
            assert_eq!(count.await.unwrap(), 3, "{refused} refused");
        }
    }

    #[tokio::test]
    async fn an_attempt_held_back_counts_after_the_wait_if_begun_before_the_refused_one() {
        // A relay that holds a greeting back: once the wait is over, the
        // one begun before the refused one counts (it reached the relay
        // first), the one begun after does not.
        let mut relay = Relay::new(2);
        relay.begin(3);
        relay.steps(0, GREETING);
        relay.failed(1, GREETING);
        relay.steps(2, GREETING);
        let within = Duration::from_millis(100);
        let relay = Arc::new(Mutex::new(relay));
        let started = std::time::Instant::now();
        let count = counting(&relay, 1, within);
        assert_eq!(count.await.unwrap(), 3);
        assert!(started.elapsed() >= within, "waited for them");
    }

    #[tokio::test]
    async fn connections_closed_while_the_refused_one_was_opened_count() {
        // Three at work; one closes (a reload's old pool, an idle one
        // reaped) while a new one is opened: the relay, which had not
        // seen that close yet, refuses the new one as a fourth. It served
        // three, not two. A close before the attempt began is not counted.
        for closed_during in [1, 2] {
            let mut relay = Relay::new(3);
            relay.begin(1);
            for _ in 0..closed_during {
                relay.established -= 1;
                relay.openings.closed();
            }
            relay.failed(0, GREETING);
            assert_eq!(relay.served_with(0).await, 3, "{closed_during} closed");
        }
        let mut relay = Relay::new(3);
        relay.established -= 1;
        relay.openings.closed();
        relay.begin(1);
        relay.failed(0, GREETING);
        assert_eq!(relay.served_with(0).await, 2);
    }

    #[tokio::test]
    async fn attempts_begun_after_the_refusal_came_are_not_waited_for() {
        // The refusal waits for the one begun with it; one begun while it
        // waits (the relay had answered before it) is not waited for,
        // and not counted while it is being opened.
        let mut relay = Relay::new(3);
        relay.begin(2);
        relay.failed(0, GREETING);
        let relay = Arc::new(Mutex::new(relay));
        let count = counting(&relay, 0, WAIT);
        still_waits(&count, "1 was answered").await;
        relay.lock().unwrap().begin(1);
        relay.lock().unwrap().established(1, 4);
        let started = std::time::Instant::now();
        // The 3 at work and 1; not 2, begun after the refusal.
        assert_eq!(count.await.unwrap(), 4);
        assert!(started.elapsed() < WAIT, "2 was not waited for");
    }
}
