//! A worker's look at the next message while it sends one: to a relay that
//! pipelines, the next message's envelope can go out behind this one's end
//! of data (see `transport::smtp::pipeline`), saving a round trip each.
//!
//! The worker takes the next ready job only if one is waiting (never
//! waiting for one, and never when another worker is idle: that one is
//! already waiting for the work queue and holds it); first one another
//! worker handed over to the relay's busy connections, if any
//! (`transport::pool`). The job is the
//! worker's from then on, exactly as if it had been handed over next:
//! the scheduler has it in flight, so no queue operation moves its file
//! meanwhile. A job the transport can't send on the same connection is
//! handed back here, and the worker tries it the usual way next; one that
//! was on a connection that broke before the relay answered it is handed
//! back to be tried alone (nothing sent behind it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Mutex, mpsc};

use super::scheduler::Job;
use crate::spool::{Meta, Spool};

/// A message taken ahead, loaded, with recipients to try.
pub struct Candidate {
    pub id: Box<str>,
    pub meta: Meta,
    pub body: Vec<u8>,
    /// Pending recipients (indices into `meta.recipients`).
    pub rcpts: Vec<usize>,
    /// When the worker took it (the start of its attempt, for `delays=`).
    pub started: Instant,
}

pub struct Lookahead {
    /// Where jobs come from; `None`: don't look ahead.
    source: Option<(Arc<Mutex<mpsc::Receiver<Job>>>, Spool)>,
    /// Jobs taken ahead but not sent: the worker's next ones, in order;
    /// `true` to try that one alone.
    held: VecDeque<(Box<str>, bool)>,
}

impl Lookahead {
    pub fn new(jobs: Arc<Mutex<mpsc::Receiver<Job>>>, spool: Spool) -> Lookahead {
        Lookahead {
            source: Some((jobs, spool)),
            held: VecDeque::new(),
        }
    }

    /// One that never finds a next message.
    pub fn off() -> Lookahead {
        Lookahead {
            source: None,
            held: VecDeque::new(),
        }
    }

    /// Whether it takes jobs ahead: its worker can take one over that
    /// another worker hands to the relay's connections.
    pub fn is_on(&self) -> bool {
        self.source.is_some()
    }

    /// Takes no more jobs ahead (shutdown, or a new configuration to take
    /// up); one already held stays held.
    pub fn stop(&mut self) {
        self.source = None;
    }

    /// The next ready message, if one is waiting and none is held already.
    /// One that can't be loaded or has nothing pending is held for the
    /// usual path, which knows how to report it.
    pub async fn candidate(&mut self) -> Option<Candidate> {
        self.candidate_after(|| None).await
    }

    /// [`Lookahead::candidate`], taking first the message `handed` gives
    /// (one handed over to this relay's busy connections, see
    /// `transport::pool`), which is then this worker's like any job.
    pub async fn candidate_after(
        &mut self,
        handed: impl FnOnce() -> Option<Box<str>>,
    ) -> Option<Candidate> {
        if !self.held.is_empty() {
            return None;
        }
        let (jobs, spool) = self.source.as_ref()?;
        let id = match handed() {
            Some(id) => id,
            None => {
                let mut rx = jobs.try_lock().ok()?;
                rx.try_recv().ok()?.id
            }
        };
        let started = Instant::now();
        let spool = spool.clone();
        let owned = id.to_string();
        let loaded = tokio::task::spawn_blocking(move || spool.load(&owned)).await;
        let Ok(Ok((meta, body))) = loaded else {
            self.held.push_back((id, false));
            return None;
        };
        let rcpts: Vec<usize> = meta.pending().map(|(i, _)| i).collect();
        if rcpts.is_empty() {
            self.held.push_back((id, false));
            return None;
        }
        Some(Candidate {
            id,
            meta,
            body,
            rcpts,
            started,
        })
    }

    /// A candidate that did not go out behind the previous message: the
    /// worker tries it next, the usual way.
    pub fn hand_back(&mut self, c: Candidate) {
        self.held.push_back((c.id, false));
    }

    /// A candidate whose connection broke before the relay answered it:
    /// the worker tries it next, alone.
    pub fn hand_back_alone(&mut self, c: Candidate) {
        self.held.push_back((c.id, true));
    }

    /// The jobs to try next (`true`: alone), taken ahead and not sent.
    pub fn take_held(&mut self) -> VecDeque<(Box<str>, bool)> {
        std::mem::take(&mut self.held)
    }

    /// Whether more jobs are ready than workers are waiting for (mail
    /// waits): a worker idle for work holds the queue, so then nothing is.
    pub fn waiting(&self) -> bool {
        let Some((jobs, _)) = &self.source else {
            return false;
        };
        jobs.try_lock().is_ok_and(|rx| !rx.is_empty())
    }
}
