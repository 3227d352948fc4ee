//! Getting queued mail out: the scheduler decides when each message is
//! tried, workers try it through the transport and record the outcome.
//!
//! The scheduler keeps a few dozen bytes per queued message in memory (id,
//! next attempt time, state) and never the content; a worker reads the
//! queue file only when it tries the message. Exactly one worker owns a
//! message while it is being tried, so the spool's append-only status
//! records never race. A worker may hold one more message it took ahead,
//! to send behind the current one on a pipelining connection (`lookahead`).
//! That one is the worker's like any job: the scheduler has it in flight.

pub mod gate;
pub mod lookahead;
pub mod outcome;
pub mod scheduler;
pub mod worker;

pub use scheduler::{ControlError, QueueOp, SchedulerHandle};
