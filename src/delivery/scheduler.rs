//! The scheduler: one task that owns the in-memory queue and hands ready
//! messages to the delivery workers.
//!
//! Besides timers, two things wake a message early: a message *parked* on
//! a relay (every connection busy; one handed over to the relay's pool
//! instead is the pool's until a connection takes it or comes back, see
//! `transport::pool`) goes out when the relay's pool returns a connection, and a message *waiting for* a relay (down, paused) goes
//! out when the relay comes back up. Parked messages have no timer: the
//! pool's release count tells whether a connection came back between the
//! worker finding none and the scheduler parking the message.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::spool::{Area, Meta, Spool, SpoolError};

/// Operations an operator can ask for through the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOp {
    Hold,
    Release,
    Delete,
    /// Try now (`postqueue -i` / `postsuper -r`).
    Requeue,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no such message: {0}")]
    NotFound(String),
    #[error("{0}")]
    Spool(#[from] SpoolError),
    #[error("the scheduler is shutting down")]
    Stopped,
}

/// What a worker learned about a message it tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Every recipient is done; the file is gone.
    Done,
    /// Some recipients are deferred; try again at this time (unix ms).
    RetryAt(u64),
    /// Try again at `at`, or as soon as one of these relays is up again.
    WaitFor { at: u64, relays: Vec<Arc<str>> },
    /// Every connection to `relay` was busy; try again when one comes
    /// back (`seen` is the pool's release count at the time).
    Parked { relay: Arc<str>, seen: u64 },
    /// The file vanished or was moved to corrupt/.
    Gone,
}

pub(crate) enum Event {
    Queued(Box<str>),
    Recovered {
        queued: Vec<Meta>,
        held: Vec<Meta>,
    },
    Finished {
        id: Box<str>,
        next: Next,
    },
    Flush(oneshot::Sender<usize>),
    Op {
        id: String,
        op: QueueOp,
        done: oneshot::Sender<Result<(), ControlError>>,
    },
    /// The injected clock moved; re-evaluate timers.
    Tick,
    /// A relay's pool returned a connection (its release count).
    RelayFree {
        relay: Arc<str>,
        releases: u64,
    },
    /// A relay is up again after an outage.
    RelayUp(Arc<str>),
    /// Which of these ids it does not know.
    Unknown {
        ids: Vec<String>,
        done: oneshot::Sender<Vec<String>>,
    },
}

/// A cheap, cloneable way to talk to the scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Event>,
}

impl SchedulerHandle {
    pub fn queued(&self, id: &str) {
        let _ = self.tx.send(Event::Queued(id.into()));
    }

    pub fn recovered(&self, queued: Vec<Meta>, held: Vec<Meta>) {
        let _ = self.tx.send(Event::Recovered { queued, held });
    }

    pub(crate) fn finished(&self, id: &str, next: Next) {
        let _ = self.tx.send(Event::Finished {
            id: id.into(),
            next,
        });
    }

    /// Makes every deferred message due now; returns how many.
    pub async fn flush(&self) -> Result<usize, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Event::Flush(tx))
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)
    }

    pub async fn op(&self, id: &str, op: QueueOp) -> Result<(), ControlError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Event::Op {
                id: id.to_string(),
                op,
                done: tx,
            })
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// The ids in `ids` the scheduler has never been told about (none
    /// until start-up recovery has handed it the queue: it would find them).
    pub async fn unknown(&self, ids: Vec<String>) -> Vec<String> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Event::Unknown { ids, done: tx }).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub fn tick(&self) {
        let _ = self.tx.send(Event::Tick);
    }

    /// A connection to `relay` came back to its pool.
    pub fn relay_free(&self, relay: &Arc<str>, releases: u64) {
        let _ = self.tx.send(Event::RelayFree {
            relay: relay.clone(),
            releases,
        });
    }

    /// `relay` is up again: messages waiting for it go now.
    pub fn relay_up(&self, relay: &Arc<str>) {
        let _ = self.tx.send(Event::RelayUp(relay.clone()));
    }
}

/// `next_ms` of a parked message: it has no timer.
const PARKED: u64 = u64::MAX;

/// Resolves once shutdown has been requested.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for its timer (or in the ready queue).
    Waiting,
    /// A worker has it.
    InFlight,
    Held,
}

#[derive(Debug)]
struct Entry {
    state: State,
    next_ms: u64,
    /// An operation that arrived while a worker had the message.
    deferred_op: Option<(QueueOp, oneshot::Sender<Result<(), ControlError>>)>,
}

/// A message handed to a worker.
pub struct Job {
    pub id: Box<str>,
}

pub struct Scheduler {
    rx: mpsc::UnboundedReceiver<Event>,
    work: mpsc::Sender<Job>,
    spool: Spool,
    clock: Clock,
    entries: HashMap<Box<str>, Entry>,
    timers: BTreeSet<(u64, Box<str>)>,
    ready: VecDeque<Box<str>>,
    /// Messages parked per relay, in the order they were parked.
    parked: HashMap<Arc<str>, Vec<Box<str>>>,
    /// The latest release count each relay's pool reported.
    releases: HashMap<Arc<str>, u64>,
    /// Messages to wake when a relay comes back up.
    waiting_on: HashMap<Arc<str>, HashSet<Box<str>>>,
    /// A flush was asked for: mail recovered from the spool after it (a
    /// big queue is read after the daemon already listens) is due at once
    /// too, so `relayq queue flush` right after a restart means all of it.
    flushed: bool,
    /// Start-up recovery has handed over the queue.
    recovered: bool,
}

impl Scheduler {
    /// Creates the scheduler, its handle, and the receiving end of the work
    /// queue that workers share.
    pub fn new(
        spool: Spool,
        clock: Clock,
        workers: usize,
    ) -> (
        Scheduler,
        SchedulerHandle,
        Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (work, work_rx) = mpsc::channel(workers.max(1));
        let s = Scheduler {
            rx,
            work,
            spool,
            clock,
            entries: HashMap::new(),
            timers: BTreeSet::new(),
            ready: VecDeque::new(),
            parked: HashMap::new(),
            releases: HashMap::new(),
            flushed: false,
            recovered: false,
            waiting_on: HashMap::new(),
        };
        (
            s,
            SchedulerHandle { tx },
            Arc::new(tokio::sync::Mutex::new(work_rx)),
        )
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            self.promote_due();
            while let Some(id) = self.ready.front() {
                match self.work.try_reserve() {
                    Ok(permit) => {
                        let id = id.clone();
                        self.ready.pop_front();
                        if let Some(e) = self.entries.get_mut(&id)
                            && e.state == State::Waiting
                        {
                            e.state = State::InFlight;
                            permit.send(Job { id });
                        }
                    }
                    Err(_) => break,
                }
            }
            let sleep = self.next_timer_in();
            let has_ready = !self.ready.is_empty();
            let ev = tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some(ev) => Some(ev),
                    None => return,
                },
                // Capacity came back: loop to hand out work. The permit is
                // dropped unused; try_reserve above takes it again.
                _ = self.work.reserve(), if has_ready => None,
                _ = tokio::time::sleep(sleep) => None,
                _ = stopped(&mut shutdown) => return,
            };
            if let Some(ev) = ev {
                self.handle(ev);
            }
        }
    }

    fn next_timer_in(&self) -> Duration {
        let now = self.clock.now_ms();
        match self.timers.first() {
            Some((due, _)) => Duration::from_millis(due.saturating_sub(now)),
            // Nothing scheduled: wake up now and then anyway, cheaply.
            None => Duration::from_secs(3600),
        }
    }

    fn promote_due(&mut self) {
        let now = self.clock.now_ms();
        while let Some((due, _)) = self.timers.first() {
            if *due > now {
                break;
            }
            if let Some((_, id)) = self.timers.pop_first() {
                self.ready.push_back(id);
            }
        }
    }

    fn schedule(&mut self, id: Box<str>, at_ms: u64) {
        let now = self.clock.now_ms();
        if let Some(e) = self.entries.get_mut(&id) {
            e.state = State::Waiting;
            e.next_ms = at_ms;
        }
        if at_ms <= now {
            self.ready.push_back(id);
        } else {
            self.timers.insert((at_ms, id));
        }
    }

    fn unschedule(&mut self, id: &str, e_next: u64) {
        self.timers.remove(&(e_next, Box::from(id)));
        self.ready.retain(|r| &**r != id);
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Queued(id) => {
                if self.entries.contains_key(&id) {
                    return;
                }
                let now = self.clock.now_ms();
                self.entries.insert(
                    id.clone(),
                    Entry {
                        state: State::Waiting,
                        next_ms: now,
                        deferred_op: None,
                    },
                );
                self.ready.push_back(id);
            }
            Event::Recovered { queued, held } => {
                self.recovered = true;
                for meta in held {
                    let id: Box<str> = meta.id.into();
                    self.entries.insert(
                        id,
                        Entry {
                            state: State::Held,
                            next_ms: 0,
                            deferred_op: None,
                        },
                    );
                }
                for meta in queued {
                    let id: Box<str> = meta.id.into();
                    if self.entries.contains_key(&id) {
                        continue;
                    }
                    let at = if self.flushed {
                        0
                    } else {
                        meta.next_attempt_ms.unwrap_or(0)
                    };
                    self.entries.insert(
                        id.clone(),
                        Entry {
                            state: State::Waiting,
                            next_ms: at,
                            deferred_op: None,
                        },
                    );
                    self.schedule(id, at);
                }
            }
            Event::Finished { id, next } => self.finished(id, next),
            Event::Flush(done) => {
                self.flushed = true;
                let waiting: Vec<(u64, Box<str>)> =
                    std::mem::take(&mut self.timers).into_iter().collect();
                let mut n = waiting.len();
                for (_, id) in waiting {
                    self.ready.push_back(id);
                }
                let relays: Vec<Arc<str>> = self.parked.keys().cloned().collect();
                for relay in relays {
                    n += self.unpark(&relay);
                }
                let _ = done.send(n);
            }
            Event::Op { id, op, done } => self.op(id, op, done),
            Event::Unknown { ids, done } => {
                let unknown = if self.recovered {
                    ids.into_iter()
                        .filter(|id| !self.entries.contains_key(id.as_str()))
                        .collect()
                } else {
                    Vec::new()
                };
                let _ = done.send(unknown);
            }
            Event::Tick => {}
            Event::RelayFree { relay, releases } => {
                let known = self.releases.entry(relay.clone()).or_default();
                *known = (*known).max(releases);
                self.unpark(&relay);
            }
            Event::RelayUp(relay) => {
                let now = self.clock.now_ms();
                for id in self.waiting_on.remove(&relay).unwrap_or_default() {
                    if let Some(e) = self.entries.get_mut(&id)
                        && e.state == State::Waiting
                        && e.next_ms != PARKED
                        && e.next_ms > now
                    {
                        self.timers.remove(&(e.next_ms, id.clone()));
                        e.next_ms = now;
                        self.ready.push_back(id);
                    }
                }
                self.unpark(&relay);
            }
        }
    }

    /// Moves the messages parked on `relay` to the front of the ready
    /// queue, oldest first; returns how many.
    fn unpark(&mut self, relay: &Arc<str>) -> usize {
        let ids = self.parked.remove(relay).unwrap_or_default();
        let now = self.clock.now_ms();
        let mut n = 0;
        for id in ids.into_iter().rev() {
            if let Some(e) = self.entries.get_mut(&id)
                && e.state == State::Waiting
                && e.next_ms == PARKED
            {
                e.next_ms = now;
                self.ready.push_front(id);
                n += 1;
            }
        }
        n
    }

    /// Forgets a finished message in the wake-up indexes.
    fn forget_waits(&mut self, id: &str) {
        for set in self.waiting_on.values_mut() {
            set.remove(id);
        }
    }

    fn finished(&mut self, id: Box<str>, next: Next) {
        let deferred_op = self.entries.get_mut(&id).and_then(|e| e.deferred_op.take());
        match next {
            Next::Done | Next::Gone => {
                self.forget_waits(&id);
                self.entries.remove(&id);
                if let Some((_, done)) = deferred_op {
                    let _ = done.send(Err(ControlError::NotFound(id.to_string())));
                }
            }
            Next::RetryAt(at) => {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.state = State::Waiting;
                    e.next_ms = at;
                }
                match deferred_op {
                    Some((op, done)) => self.op(id.to_string(), op, done),
                    None => self.schedule(id, at),
                }
            }
            Next::WaitFor { at, relays } => {
                for relay in relays {
                    self.waiting_on.entry(relay).or_default().insert(id.clone());
                }
                // Put back an operation that arrived meanwhile, for the
                // RetryAt handling to apply.
                if let Some(op) = deferred_op
                    && let Some(e) = self.entries.get_mut(&id)
                {
                    e.deferred_op = Some(op);
                }
                self.finished(id, Next::RetryAt(at));
            }
            Next::Parked { relay, seen } => {
                let returned = self.releases.get(&relay).is_some_and(|&n| n > seen);
                if returned || deferred_op.is_some() {
                    if let Some(op) = deferred_op
                        && let Some(e) = self.entries.get_mut(&id)
                    {
                        e.deferred_op = Some(op);
                    }
                    let now = self.clock.now_ms();
                    self.finished(id, Next::RetryAt(now));
                    return;
                }
                if let Some(e) = self.entries.get_mut(&id) {
                    e.state = State::Waiting;
                    e.next_ms = PARKED;
                    self.parked.entry(relay).or_default().push(id);
                }
            }
        }
    }

    fn op(&mut self, id: String, op: QueueOp, done: oneshot::Sender<Result<(), ControlError>>) {
        // A message in queue/ it was never told about (its `sendmail`
        // stopped before telling it): taken up, not scheduled yet, so that
        // the operation applies before any delivery.
        let adopted = self.recovered
            && !self.entries.contains_key(id.as_str())
            && crate::pickup::take_up(&self.spool, &id, Duration::ZERO);
        if adopted {
            self.entries.insert(
                id.as_str().into(),
                Entry {
                    state: State::Waiting,
                    next_ms: PARKED,
                    deferred_op: None,
                },
            );
        }
        let Some(entry) = self.entries.get_mut(id.as_str()) else {
            let _ = done.send(Err(ControlError::NotFound(id)));
            return;
        };
        if entry.state == State::InFlight {
            // Applied when the worker is done, so no file moves under it.
            entry.deferred_op = Some((op, done));
            return;
        }
        let (state, next) = (entry.state, entry.next_ms);
        let key: Box<str> = id.as_str().into();
        let result = match (op, state) {
            (QueueOp::Hold, State::Held) | (QueueOp::Release, State::Waiting) => Ok(()),
            (QueueOp::Hold, _) => {
                self.unschedule(&id, next);
                let r = self.spool.move_to(&id, Area::Queue, Area::Hold);
                if r.is_ok() {
                    crate::observe::events::held(&id);
                }
                if let Some(e) = self.entries.get_mut(&key) {
                    e.state = State::Held;
                }
                r.map_err(ControlError::from)
            }
            (QueueOp::Release, State::Held) => {
                let r = self.spool.move_to(&id, Area::Hold, Area::Queue);
                if r.is_ok() {
                    crate::observe::events::released(&id);
                    let now = self.clock.now_ms();
                    self.schedule(key, now);
                }
                r.map_err(ControlError::from)
            }
            (QueueOp::Delete, _) => {
                self.unschedule(&id, next);
                self.forget_waits(&id);
                let area = if state == State::Held {
                    Area::Hold
                } else {
                    Area::Queue
                };
                let r = self.spool.remove(area, &id);
                self.entries.remove(&key);
                if r.is_ok() {
                    crate::observe::events::removed(&id);
                }
                r.map_err(ControlError::from)
            }
            (QueueOp::Requeue, State::Held) => Ok(()),
            (QueueOp::Requeue, _) => {
                self.unschedule(&id, next);
                let now = self.clock.now_ms();
                self.schedule(key, now);
                Ok(())
            }
            (QueueOp::Release, State::InFlight) => Ok(()),
        };
        // Taken up and left waiting by the operation (a release, or one
        // that failed): due now.
        if adopted
            && self
                .entries
                .get(id.as_str())
                .is_some_and(|e| e.state == State::Waiting && e.next_ms == PARKED)
        {
            let now = self.clock.now_ms();
            self.schedule(id.as_str().into(), now);
        }
        let _ = done.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Envelope;

    const LONG: Duration = Duration::from_secs(10);

    struct Setup {
        handle: SchedulerHandle,
        jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
        spool: Spool,
        _dir: tempfile::TempDir,
        _stop: watch::Sender<bool>,
    }

    async fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let (scheduler, handle, jobs) = Scheduler::new(spool.clone(), Clock::new(), 1);
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(scheduler.run(shutdown));
        Setup {
            handle,
            jobs,
            spool,
            _dir: dir,
            _stop: stop,
        }
    }

    async fn queue(s: &Setup) -> String {
        let env = Envelope {
            sender: "a@example.com".into(),
            recipients: vec!["b@example.net".into()],
            ..Envelope::default()
        };
        let id = s
            .spool
            .commit(Spool::new_id(), env, b"Subject: x\r\n\r\nx\r\n".to_vec(), 1)
            .await
            .unwrap();
        s.handle.queued(&id);
        id
    }

    /// The next job handed to a worker (waiting for it, not timing it).
    async fn next_job(s: &Setup) -> String {
        let job = tokio::time::timeout(LONG, async { s.jobs.lock().await.recv().await })
            .await
            .expect("a job")
            .expect("channel open");
        job.id.to_string()
    }

    #[tokio::test]
    async fn a_parked_message_goes_when_a_connection_comes_back() {
        let s = setup().await;
        let relay: Arc<str> = "a".into();
        let id = queue(&s).await;
        assert_eq!(next_job(&s).await, id);
        s.handle.finished(
            &id,
            Next::Parked {
                relay: relay.clone(),
                seen: 0,
            },
        );
        s.handle.relay_free(&relay, 1);
        assert_eq!(next_job(&s).await, id);
        // A connection that came back before the message was parked
        // (release 2 > seen 1) is not missed.
        s.handle.relay_free(&relay, 2);
        s.handle.finished(&id, Next::Parked { relay, seen: 1 });
        assert_eq!(next_job(&s).await, id);
    }

    #[tokio::test]
    async fn mail_waiting_for_a_relay_goes_when_it_is_up() {
        let s = setup().await;
        let relay: Arc<str> = "a".into();
        let id = queue(&s).await;
        assert_eq!(next_job(&s).await, id);
        let far = Clock::new().now_ms() + 3_600_000;
        s.handle.finished(
            &id,
            Next::WaitFor {
                at: far,
                relays: vec![relay.clone()],
            },
        );
        s.handle.relay_up(&relay);
        assert_eq!(next_job(&s).await, id);
    }

    #[tokio::test]
    async fn an_operation_during_an_attempt_survives_a_wait() {
        let s = setup().await;
        let id = queue(&s).await;
        assert_eq!(next_job(&s).await, id);
        // The hold request is queued before the worker's report, so it
        // arrives while the message is in flight.
        let (done, hold) = oneshot::channel();
        let _ = s.handle.tx.send(Event::Op {
            id: id.clone(),
            op: QueueOp::Hold,
            done,
        });
        s.handle.finished(
            &id,
            Next::WaitFor {
                at: Clock::new().now_ms() + 3_600_000,
                relays: vec!["a".into()],
            },
        );
        let result = tokio::time::timeout(LONG, hold).await.unwrap().unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert!(s.spool.path(Area::Hold, &id).unwrap().exists());
    }
}
