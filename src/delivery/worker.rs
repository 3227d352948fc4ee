//! A delivery worker: takes a message from the scheduler, tries its pending
//! recipients through its own transport connection (kept open between
//! messages), and records each recipient's outcome in the spool following
//! the durability rules. On a relay that pipelines, the next ready message
//! may go out behind the current one (see `lookahead`); the worker then
//! records the current one and finishes the next on the same connection.
//! A worker takes work only with a pass from the relays' gate (see `gate`),
//! so no more workers are busy than the relays allow connections.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, mpsc, watch};

use super::gate::{Gate, Pass};
use super::lookahead::Lookahead;
use super::outcome::{AttemptReport, Delivery, RcptOutcome, backoff};
use super::scheduler::{Job, Next, SchedulerHandle, stopped};
use crate::bounce::{self, Action, BounceInput, BouncedRecipient};
use crate::clock::{Clock, from_ms};
use crate::config::Config;
use crate::observe::events::{self, Status};
use crate::routing::router::{Follow, Resumed};
use crate::spool::{Area, Envelope, Meta, Record, Spool, SpoolError};
use crate::transport::Sender;

/// What every worker shares.
pub struct WorkerContext {
    pub config: Arc<Config>,
    pub spool: Spool,
    pub clock: Clock,
    pub scheduler: SchedulerHandle,
    /// The relays, routes and limits, when relaying (not capturing).
    pub router: Option<Arc<crate::routing::Router>>,
}

impl WorkerContext {
    /// A transport instance for one worker under this context.
    pub fn sender(&self) -> anyhow::Result<Sender> {
        Ok(match &self.router {
            Some(r) => Sender::Routed(r.clone()),
            None => Sender::new(&self.config)?,
        })
    }

    /// The gate workers pass to take work, when relaying.
    fn gate(&self) -> Option<Arc<Gate>> {
        self.router.as_ref().map(|r| r.gate())
    }
}

/// Runs one worker until shutdown. The connection it holds is closed after
/// the transport's idle timeout without work. When the context is replaced
/// (a config reload), the worker finishes the message in hand and takes
/// up the new context for the next one.
pub async fn run(
    mut contexts: watch::Receiver<Arc<WorkerContext>>,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ctx = contexts.borrow_and_update().clone();
    let mut sender = match ctx.sender() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("delivery worker cannot start: {e:#}");
            return;
        }
    };
    // False once the daemon dropped the sending side (shutting down).
    let mut live = true;
    // `changed()` below marks the new context as seen: remember it.
    let mut switch = false;
    // Taken ahead and not sent behind the previous message: this worker's
    // next ones (`true`: to try alone).
    let mut held: VecDeque<(Box<str>, bool)> = VecDeque::new();
    // Kept while this worker works (held jobs included), then given back,
    // so a gate that shrank can retire it.
    let mut pass: Option<Pass> = None;
    loop {
        if std::mem::take(&mut switch) || (live && contexts.has_changed().unwrap_or(false)) {
            let next = contexts.borrow_and_update().clone();
            match next.sender() {
                Ok(fresh) => {
                    sender.close().await;
                    sender = fresh;
                    ctx = next;
                    if held.is_empty() {
                        pass = None;
                    }
                }
                Err(e) => {
                    tracing::error!("reloaded transport cannot start, keeping the old one: {e:#}")
                }
            }
        }
        let idle = sender.idle_timeout();
        if held.is_empty() {
            pass = None;
        }
        let (id, alone) = match held.pop_front() {
            Some(job) if !*shutdown.borrow() => job,
            Some(_) => break,
            None => {
                if pass.is_none()
                    && let Some(gate) = ctx.gate()
                {
                    tokio::select! {
                        p = gate.enter() => pass = Some(p),
                        _ = stopped(&mut shutdown) => break,
                        r = contexts.changed(), if live => {
                            live = r.is_ok();
                            switch = live;
                            continue;
                        }
                    }
                }
                let job = tokio::select! {
                    job = async { jobs.lock().await.recv().await } => job,
                    _ = stopped(&mut shutdown) => break,
                    r = contexts.changed(), if live => {
                        live = r.is_ok();
                        switch = live;
                        continue;
                    }
                    _ = tokio::time::sleep(idle), if sender.is_connected() => {
                        sender.close().await;
                        continue;
                    }
                };
                let Some(job) = job else { break };
                (job.id, false)
            }
        };
        let more = chain(&ctx, &mut sender, id, alone, &jobs, &shutdown, &contexts).await;
        held.extend(more);
    }
    drop(pass);
    sender.close().await;
}

/// Tries a message, then each message that went out behind it on the same
/// connection (see `lookahead`), recording each outcome as soon as it is
/// known; `alone`: nothing goes out behind it. Returns the jobs taken ahead
/// but not sent, to try next.
async fn chain(
    ctx: &WorkerContext,
    sender: &mut Sender,
    id: Box<str>,
    alone: bool,
    jobs: &Arc<Mutex<mpsc::Receiver<Job>>>,
    shutdown: &watch::Receiver<bool>,
    contexts: &watch::Receiver<Arc<WorkerContext>>,
) -> VecDeque<(Box<str>, bool)> {
    let mut ahead = Lookahead::new(jobs.clone(), ctx.spool.clone());
    // What is open is finished, but no more work is taken ahead once the
    // worker should stop or take up a new configuration.
    let must_stop = || *shutdown.borrow() || contexts.has_changed().unwrap_or(true);
    if alone || must_stop() {
        ahead.stop();
    }
    let (next, mut follow) = attempt_ahead(ctx, sender, &id, &mut ahead).await;
    // None: handed over to the relay's busy connections, whose worker
    // reports it.
    if let Some(next) = next {
        ctx.scheduler.finished(&id, next);
    }
    while let Some(f) = follow {
        if must_stop() {
            ahead.stop();
        }
        let Some(Resumed {
            job,
            report,
            follow: after,
        }) = f.resume(&mut ahead).await
        else {
            // Handed back: `ahead` holds it, for the usual way.
            break;
        };
        let next = record(ctx, &job.meta, &job.body, report, job.started).await;
        ctx.scheduler.finished(&job.id, next);
        follow = after;
    }
    ahead.take_held()
}

/// One attempt at one message, with the next ready message from `ahead`
/// possibly sent behind this one: returned open, to resume. Never loses
/// it: on any doubt the message stays queued with a retry time. `None`:
/// not tried, handed over to the relay's busy connections (see
/// `transport::pool`), which carry it next; it is no longer this worker's.
async fn attempt_ahead(
    ctx: &WorkerContext,
    sender: &mut Sender,
    id: &str,
    ahead: &mut Lookahead,
) -> (Option<Next>, Option<Follow>) {
    let spool = ctx.spool.clone();
    let owned = id.to_string();
    let loaded = tokio::task::spawn_blocking(move || spool.load(&owned)).await;
    let (meta, body) = match loaded {
        Ok(Ok(x)) => x,
        Ok(Err(SpoolError::NotFound(_))) => {
            // Nothing takes a queued file away behind the scheduler's back
            // (operations wait for the attempt): say so if it happened.
            events::queue_warning(id, "queue file not found; nothing to deliver");
            return (Some(Next::Gone), None);
        }
        Ok(Err(SpoolError::Corrupt { reason, .. })) => {
            events::queue_error(
                id,
                &format!("queue file is corrupt ({reason}); moved to corrupt/"),
            );
            let _ = ctx.spool.move_to(id, Area::Queue, Area::Corrupt);
            return (Some(Next::Gone), None);
        }
        Ok(Err(e)) => {
            events::queue_error(id, &format!("cannot read queue file: {e}"));
            return (Some(retry_later(ctx)), None);
        }
        Err(e) => {
            events::queue_error(id, &format!("cannot read queue file: {e}"));
            return (Some(retry_later(ctx)), None);
        }
    };
    let pending: Vec<usize> = meta.pending().map(|(i, _)| i).collect();
    if pending.is_empty() {
        return (Some(finish(ctx, id, Vec::new()).await), None);
    }
    let started = Instant::now();
    let (delivery, follow) = sender.deliver_ahead(&meta, &body, &pending, ahead).await;
    let next = match delivery {
        Delivery::HandedOver => return (None, follow),
        Delivery::Attempted(report) => record(ctx, &meta, &body, report, started).await,
        Delivery::Wait {
            until,
            reason,
            relays,
        } if !expired(ctx, &meta) => wait(ctx, &meta, &pending, until, &reason, relays),
        // Waiting for a relay does not stop the clock on max_lifetime.
        Delivery::Wait { reason, .. } => {
            let report = AttemptReport {
                relay: "none".into(),
                results: pending
                    .iter()
                    .map(|&i| {
                        let reason = reason.clone();
                        let status = WAIT_STATUS.to_string();
                        (i, RcptOutcome::Deferred { reason, status })
                    })
                    .collect(),
                ..AttemptReport::default()
            };
            record(ctx, &meta, &body, report, started).await
        }
        Delivery::Parked { relay, seen } => Next::Parked { relay, seen },
    };
    (Some(next), follow)
}

/// Whether the message has been queued for `max_lifetime` or longer.
fn expired(ctx: &WorkerContext, meta: &Meta) -> bool {
    let lifetime_ms =
        u64::try_from(ctx.config.queue.max_lifetime.0.as_millis()).unwrap_or(u64::MAX);
    ctx.clock.now_ms().saturating_sub(meta.arrival_ms) >= lifetime_ms
}

/// The status of mail waiting for a relay (paused, down or over a limit):
/// "mail system congestion" (RFC 3463 X.4.5).
const WAIT_STATUS: &str = "4.4.5";

/// Not tried: every relay it may use is paused, down or over a limit.
/// Each recipient's deferral is logged and recorded (so `relayq queue
/// list` shows why), and the attempt count is left alone: nothing was tried.
fn wait(
    ctx: &WorkerContext,
    meta: &Meta,
    pending: &[usize],
    until: u64,
    reason: &str,
    relays: Vec<std::sync::Arc<str>>,
) -> Next {
    let id = meta.id.as_str();
    let now_ms = ctx.clock.now_ms();
    let delay = now_ms.saturating_sub(meta.arrival_ms) as f64 / 1000.0;
    let mut records = Vec::new();
    for &idx in pending {
        let Some(rcpt) = meta.recipients.get(idx) else {
            continue;
        };
        tracing::info!(
            target: "relayq::delivery",
            "{id}: to=<{}>, relay=none, delay={delay:.2}, delays={delay:.2}/0.00/0.00, dsn={WAIT_STATUS}, status=deferred ({reason})",
            rcpt.address,
        );
        records.push(Record::Deferred {
            idx,
            at_ms: now_ms,
            reason: reason.to_string(),
        });
    }
    records.push(Record::Attempt {
        attempts: meta.attempts,
        next_ms: until,
    });
    if let Err(e) = ctx.spool.append(id, &records, false) {
        tracing::warn!(target: "relayq::queue", "{id}: cannot record deferral: {e}");
    }
    Next::WaitFor { at: until, relays }
}

/// Applies an attempt's outcomes to the spool and decides what comes next.
pub(crate) async fn record(
    ctx: &WorkerContext,
    meta: &Meta,
    body: &[u8],
    report: AttemptReport,
    started: Instant,
) -> Next {
    let id = meta.id.as_str();
    let now = ctx.clock.now();
    let now_ms = crate::clock::to_ms(now);
    let delay = now_ms.saturating_sub(meta.arrival_ms) as f64 / 1000.0;
    let queue_wait = delay - started.elapsed().as_secs_f64();
    let lifetime_ms =
        u64::try_from(ctx.config.queue.max_lifetime.0.as_millis()).unwrap_or(u64::MAX);
    let expired = now_ms.saturating_sub(meta.arrival_ms) >= lifetime_ms;

    let mut durable = Vec::new();
    let mut bounced: Vec<BouncedRecipient> = Vec::new();
    let mut deferred = Vec::new();
    // DSN notices asked for with NOTIFY=SUCCESS or DELAY (RFC 3461).
    let mut succeeded: Vec<BouncedRecipient> = Vec::new();
    let mut delayed: Vec<BouncedRecipient> = Vec::new();
    let warn_after_ms =
        u64::try_from(ctx.config.queue.delay_warning_time.0.as_millis()).unwrap_or(u64::MAX);
    let warn = !meta.warned && now_ms.saturating_sub(meta.arrival_ms) >= warn_after_ms;
    let log_relay = report.log_relay();
    let note = report
        .note
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    for (idx, outcome) in &report.results {
        let Some(rcpt) = meta.recipients.get(*idx) else {
            continue;
        };
        let dsn = outcome.dsn();
        let line = |status: Status, reply: &str| {
            events::attempt(&events::Attempt {
                queue_id: id,
                to: &rcpt.address,
                relay: &log_relay,
                note: &note,
                delay,
                delays: [
                    queue_wait,
                    report.conn_time.as_secs_f64(),
                    report.xfer_time.as_secs_f64(),
                ],
                dsn: &dsn,
                status,
                reply,
            })
        };
        match outcome {
            RcptOutcome::Delivered { reply } => {
                line(Status::Sent, reply);
                // An upstream that offers DSN got NOTIFY and reports
                // itself; otherwise relayq says what became of it.
                if rcpt.dsn.notify.success() && !report.upstream_dsn {
                    let action = if report.final_delivery {
                        Action::Delivered
                    } else {
                        Action::Relayed
                    };
                    let mut n = bounced_rcpt(rcpt, "2.0.0", reply, &report.relay, now);
                    n.action = action;
                    succeeded.push(n);
                }
                durable.push(Record::Delivered {
                    idx: *idx,
                    at_ms: now_ms,
                    reply: reply.clone(),
                });
            }
            RcptOutcome::Failed {
                reply,
                status,
                local,
            } => {
                line(Status::Bounced, reply);
                // A refusal relayq decided names no remote MTA: none said it.
                let relay = if *local { "" } else { report.relay.as_str() };
                bounced.push(bounced_rcpt(rcpt, status, reply, relay, now));
                durable.push(Record::Failed {
                    idx: *idx,
                    at_ms: now_ms,
                    reply: reply.clone(),
                });
            }
            RcptOutcome::Deferred { reason, .. } if expired => {
                line(Status::Expired, reason);
                bounced.push(bounced_rcpt(rcpt, "4.4.7", reason, &report.relay, now));
                durable.push(Record::Failed {
                    idx: *idx,
                    at_ms: now_ms,
                    reply: format!(
                        "message expired after {}: {reason}",
                        ctx.config.queue.max_lifetime
                    ),
                });
            }
            RcptOutcome::Deferred { reason, status } => {
                line(Status::Deferred, reason);
                if warn && rcpt.dsn.notify.delay() {
                    let mut n = bounced_rcpt(rcpt, status, reason, &report.relay, now);
                    n.action = Action::Delayed;
                    delayed.push(n);
                }
                deferred.push(Record::Deferred {
                    idx: *idx,
                    at_ms: now_ms,
                    reason: reason.clone(),
                });
            }
        }
    }

    // NOTIFY without FAILURE (NEVER, or only SUCCESS/DELAY): no bounce.
    let (bounced, unwanted): (Vec<_>, Vec<_>) = bounced.into_iter().partition(|b| {
        meta.recipients
            .iter()
            .find(|r| r.address == b.address)
            .is_none_or(|r| r.dsn.notify.failure())
    });
    if !unwanted.is_empty() {
        events::bounce_not_wanted(id, unwanted.iter().map(|b| b.address.as_str()));
    }
    // Success and delay notices are courtesy: one that cannot be queued
    // is logged, and delivery goes on.
    if !succeeded.is_empty() {
        send_bounce(ctx, meta, body, &succeeded, Notice::Success).await;
    }
    // Rule 2 for a delay notice: its `warned` record is synced once the
    // notice is queued; lost to a power cut, the next attempt would send
    // the sender a second notice.
    if !delayed.is_empty() && send_bounce(ctx, meta, body, &delayed, Notice::Delay).await {
        append_durably(ctx, id, vec![Record::Warned { at_ms: now_ms }]).await;
    }
    // Rule 2: a bounce is queued before the failures it reports are recorded.
    let notice = if expired {
        Notice::Expired
    } else {
        Notice::Failure
    };
    if !bounced.is_empty() && !send_bounce(ctx, meta, body, &bounced, notice).await {
        // The failures wait for the retry, but what the upstream accepted
        // in this attempt must be recorded now, or it is sent again.
        let delivered: Vec<Record> = durable
            .into_iter()
            .filter(|r| matches!(r, Record::Delivered { .. }))
            .collect();
        append_durably(ctx, id, delivered).await;
        return retry_later(ctx);
    }
    // Every pending recipient is done: the message leaves the spool, and
    // its records would be written only to be deleted (durability rule 4).
    if meta.pending().count() == durable.len() {
        return finish(ctx, id, durable).await;
    }
    // RFC 5321 4.5.3.1.10: a 452 to RCPT after other recipients were
    // taken means "too many recipients for one transaction"; the rest go
    // in the next transaction, now. Each such retry finishes at least one
    // recipient, so this ends.
    let too_many = !durable.is_empty()
        && report.results.iter().any(
            |(_, o)| matches!(o, RcptOutcome::Deferred { reason, .. } if reason.starts_with("452")),
        );
    if !append_durably(ctx, id, durable).await {
        return retry_later(ctx);
    }
    if too_many {
        deferred.push(Record::Attempt {
            attempts: meta.attempts,
            next_ms: now_ms,
        });
        if let Err(e) = ctx.spool.append(id, &deferred, false) {
            events::queue_warning(id, &format!("cannot record deferral: {e}"));
        }
        return Next::RetryAt(now_ms);
    }
    let attempts = meta.attempts + 1;
    let q = &ctx.config.queue;
    let wait = backoff(attempts, q.retry_min.0, q.retry_max.0, fastrand::f64());
    let mut next_ms = now_ms + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX / 2);
    // The relay failed: look again when failover becomes possible or its
    // pause ends, if that is sooner than the backoff.
    if let Some(hint) = report.retry_at_ms {
        next_ms = next_ms.min(hint.max(now_ms));
    }
    deferred.push(Record::Attempt { attempts, next_ms });
    if let Err(e) = ctx.spool.append(id, &deferred, false) {
        events::queue_warning(id, &format!("cannot record deferral: {e}"));
    }
    if report.wake_on.is_empty() {
        Next::RetryAt(next_ms)
    } else {
        Next::WaitFor {
            at: next_ms,
            relays: report.wake_on,
        }
    }
}

/// Appends final records and fsyncs them (durability rule 2); false, after
/// logging, if they could not be written.
async fn append_durably(ctx: &WorkerContext, id: &str, records: Vec<Record>) -> bool {
    if records.is_empty() {
        return true;
    }
    let spool = ctx.spool.clone();
    let owned = id.to_string();
    let written = tokio::task::spawn_blocking(move || spool.append(&owned, &records, true)).await;
    if !matches!(written, Ok(Ok(()))) {
        events::queue_error(id, &format!("cannot record delivery status: {written:?}"));
        return false;
    }
    true
}

fn bounced_rcpt(
    rcpt: &crate::spool::RcptStatus,
    status: &str,
    reply: &str,
    relay: &str,
    now: std::time::SystemTime,
) -> BouncedRecipient {
    BouncedRecipient {
        address: rcpt.address.clone(),
        action: Action::Failed,
        status: status.to_string(),
        diagnostic: Some(reply.to_string()),
        remote_mta: relay
            .split('[')
            .next()
            .filter(|h| !h.is_empty() && !h.starts_with("maildir") && *h != "none")
            .map(str::to_string),
        last_attempt: Some(now),
        original_recipient: rcpt.dsn.orcpt.clone(),
    }
}

/// What a notification to the sender reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notice {
    /// Failed for good: the bounce.
    Failure,
    /// Still undelivered after `max_lifetime`: the bounce.
    Expired,
    /// NOTIFY=DELAY: still trying after `delay_warning_time`.
    Delay,
    /// NOTIFY=SUCCESS: delivered, or relayed to an upstream without DSN.
    Success,
}

/// Queues a DSN to the original sender. Mail from the null sender is never
/// bounced (that is how bounce loops are avoided). Returns false if the
/// notice could not be queued, in which case nothing is marked failed.
async fn send_bounce(
    ctx: &WorkerContext,
    meta: &Meta,
    body: &[u8],
    rcpts: &[BouncedRecipient],
    notice: Notice,
) -> bool {
    let id = meta.id.as_str();
    if meta.sender.is_empty() {
        if matches!(notice, Notice::Failure | Notice::Expired) {
            events::bounce_suppressed(id);
        }
        return true;
    }
    let reason = match notice {
        Notice::Expired => format!(
            "This message could not be delivered within {} and has been returned to you.",
            ctx.config.queue.max_lifetime
        ),
        Notice::Failure => {
            "The mail system could not deliver your message to one or more recipients.".into()
        }
        Notice::Delay => format!(
            "Your message has not been delivered yet after {}. The mail system will keep trying until {} after it was sent; you do not need to send it again.",
            ctx.config.queue.delay_warning_time, ctx.config.queue.max_lifetime
        ),
        Notice::Success => "Your message was delivered or relayed as described below. You asked for this notice (NOTIFY=SUCCESS); when a recipient says \"relayed\", the next mail system does not report delivery status, so no further notice will come for it.".into(),
    };
    // RET (RFC 3461 4.3): a bounce returns the message unless RET=HDRS; a
    // delay or success notice only its header unless RET=FULL.
    let policy =
        usize::try_from(ctx.config.queue.bounce_full_message_limit.0).unwrap_or(usize::MAX);
    let full = match (notice, meta.dsn.ret) {
        (_, Some(crate::spool::Ret::Hdrs)) => false,
        (Notice::Failure | Notice::Expired, _) => true,
        (_, ret) => ret == Some(crate::spool::Ret::Full),
    };
    let now = ctx.clock.now();
    let dsn = bounce::build_dsn(&BounceInput {
        reporting_mta: &ctx.config.hostname,
        queue_id: id,
        arrival: from_ms(meta.arrival_ms),
        now,
        original_sender: &meta.sender,
        original_message: body,
        recipients: rcpts,
        reason: &reason,
        return_full_message_limit: if full { policy } else { 0 },
        envid: meta.dsn.envid.as_deref(),
    });
    let env = Envelope {
        sender: String::new(),
        recipients: vec![meta.sender.clone()],
        smtputf8: !meta.sender.is_ascii(),
        eight_bit: dsn.iter().any(|&b| b >= 0x80),
        ..Envelope::default()
    };
    let bounce_id = Spool::new_id();
    match ctx
        .spool
        .commit(bounce_id, env, dsn, crate::clock::to_ms(now))
        .await
    {
        Ok(bid) => {
            match notice {
                Notice::Failure | Notice::Expired => events::bounce_queued(id, &bid),
                Notice::Delay => events::notice_queued(id, "delay", &bid),
                Notice::Success => events::notice_queued(id, "success", &bid),
            }
            ctx.scheduler.queued(&bid);
            true
        }
        Err(e) => {
            events::queue_error(id, &format!("cannot queue bounce: {e}"));
            false
        }
    }
}

/// Removes a message whose recipients are all done. Should the file stay
/// (an I/O error), `records` (this attempt's outcomes) are written so that
/// recovery removes it instead of sending it again.
async fn finish(ctx: &WorkerContext, id: &str, records: Vec<Record>) -> Next {
    // Blocking: with `done_sync_window = "0s"` (or a committer that is
    // behind) the removal waits for a disk sync.
    let spool = ctx.spool.clone();
    let owned = id.to_string();
    let removed = tokio::task::spawn_blocking(move || spool.remove(Area::Queue, &owned))
        .await
        .unwrap_or_else(|e| {
            Err(SpoolError::Io {
                path: ctx.spool.root().to_path_buf(),
                source: std::io::Error::other(e),
            })
        });
    match removed {
        Ok(()) | Err(SpoolError::NotFound(_)) => events::removed(id),
        Err(e) => {
            events::queue_warning(id, &format!("cannot remove finished queue file: {e}"));
            append_durably(ctx, id, records).await;
        }
    }
    Next::Done
}

/// A retry soon, for trouble on our side (spool I/O) rather than upstream.
fn retry_later(ctx: &WorkerContext) -> Next {
    let wait = ctx.config.queue.retry_min.0.min(Duration::from_secs(60));
    Next::RetryAt(ctx.clock.now_ms() + u64::try_from(wait.as_millis()).unwrap_or(60_000))
}
