//! The pickup: the daemon's side of local submission (Postfix's `pickup`).
//!
//! - It scans `maildrop/` at start (once recovery has settled what a
//!   crash left half picked up, [`settle`]), when poked through
//!   `pickup.sock`, and once a minute; each drop file is checked, given a
//!   queue id and the trace headers, moved out of the maildrop
//!   ([`maildrop::claim`]), committed with the one writer
//!   ([`Spool::commit`]), logged as accepted, removed ([`maildrop::release`])
//!   and only then handed to the scheduler: durability rule 6 of
//!   [`crate::spool`], so that no crash gets a drop file queued twice. A
//!   drop file that breaks a rule is refused (logged as a `NOQUEUE:
//!   reject:`) and moved to `corrupt/`.
//! - A message the `sendmail` command queued itself (run by root or the
//!   spool's owner, see [`crate::submit`]) gets its accepted line here too,
//!   once ([`announce`]): when the command wakes the daemon, or at start
//!   for what came in while it was down.
//! - A local `sendmail` that refused a message (`-bs` or stdin) reports it
//!   on `pickup.sock`, and the refusal is logged and counted here, in the
//!   daemon's log and metrics like every other way in.
//!
//! # Security
//! Drop files are written by local users and are untrusted: see
//! [`crate::spool::maildrop`] for what is checked on the file and
//! [`crate::submit`] for the sender rule applied here (an untrusted user's
//! envelope sender is replaced by `user@myorigin`). The wake-up socket is
//! open to every local user: a connection makes a scan due (a flood of them
//! collapses into one scan at a time), and at most one line of
//! [`MAX_REPORT`] bytes is read from it within [`REPORT_WAIT`], a few
//! connections at a time and at most [`REPORTS_PER_USER`] of one user (so
//! that nobody can keep the others' reports out; counted by
//! [`crate::anvil`]; a user's connections beyond that, up to
//! [`WAITING_PER_USER`], wait [`REPORT_WAIT`] for a slot rather than
//! lose their report): a refusal report, parsed strictly and logged as the
//! user the kernel says connected (`SO_PEERCRED`), never as anyone the
//! report names, without control characters. A local user can thus add
//! refusals (and counts) only under their own uid, as they could by
//! running `sendmail -bs` with bad input.
//!
//! Every line a local user can cause (refusals, reports, junk planted in
//! the maildrop, a sender replaced) goes through one log budget per uid,
//! [`LOCAL_LINES`] per [`LOCAL_PERIOD`]; beyond it lines are counted and
//! left out, and the next line says how many were. Counters (metrics) are
//! never left out. What the maildrop can leave on disk is bounded too (see
//! [`crate::spool::maildrop`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, watch};

use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::SchedulerHandle;
use crate::delivery::scheduler::stopped;
use crate::observe::events::{self, Client, Reason, Rejection, Stage};
use crate::observe::quiet::{LogBudget, Verdict};
use crate::spool::maildrop::{self, Dropped, Refused, Rejected};
use crate::spool::{Area, Envelope, Record, Spool, SpoolError};
use crate::submit::{self, Identity};

/// How often the maildrop is scanned without being poked.
const RESCAN: Duration = Duration::from_secs(60);
/// The longest refusal report read from `pickup.sock`: room for the
/// longest [`Rejection::bounded`].
pub const MAX_REPORT: usize = 128 * 1024;
/// How long a connection to `pickup.sock` may take to send its report.
pub const REPORT_WAIT: Duration = Duration::from_secs(2);
/// Reports read at once; further connections only wake the pickup.
const REPORTS_AT_ONCE: usize = 64;
/// Reports read at once from one user, so that one user holding
/// connections open cannot keep everyone else's refusals out of the log.
const REPORTS_PER_USER: usize = 2;
/// Connections of one user (and of all) that wait for a reading slot, at
/// most [`REPORT_WAIT`]; beyond them a connection only wakes the pickup.
const WAITING_PER_USER: usize = 16;
const WAITING_AT_ONCE: usize = 256;
/// The line a report starts with, then the [`Rejection`] as JSON.
pub const REPORT_PREFIX: &[u8] = b"reject ";
/// Lines one local user can make the daemon log per [`LOCAL_PERIOD`].
pub const LOCAL_LINES: u32 = 10;
pub const LOCAL_PERIOD: Duration = Duration::from_secs(600);

/// The log budget of local users, by uid (see the module doc).
fn budget() -> &'static LogBudget<u32> {
    static BUDGET: std::sync::OnceLock<LogBudget<u32>> = std::sync::OnceLock::new();
    BUDGET.get_or_init(|| LogBudget::new(LOCAL_LINES, LOCAL_PERIOD))
}

/// Whether a line caused by `uid` may be logged now; when it may, and
/// lines were left out before, says so first.
fn may_log(uid: u32) -> bool {
    match budget().check(&uid) {
        Verdict::Quiet => false,
        Verdict::Log { suppressed } => {
            if suppressed > 0 {
                tracing::warn!(
                    "pickup: {suppressed} lines caused by uid {uid} ({}) were left out in the previous {} minutes (at most {LOCAL_LINES} per uid)",
                    submit::Identity::of_uid(uid).name,
                    LOCAL_PERIOD.as_secs() / 60
                );
            }
            true
        }
    }
}

/// Logs and counts a local user's refusal, or only counts it when the
/// user's log budget is spent.
fn report_rejected(uid: u32, r: &Rejection) {
    if may_log(uid) {
        events::rejected(&Client::local(uid), r);
    } else {
        events::rejected_silently(r);
    }
}

pub struct PickupContext {
    pub config: Arc<Config>,
    pub spool: Spool,
    pub clock: Clock,
    pub scheduler: SchedulerHandle,
    /// Messages queued whose drop file could not be removed from
    /// `pickup/`: handed to the scheduler only once it is (tried again at
    /// each scan), or else after recovery at the next start.
    unreleased: Mutex<Vec<String>>,
}

impl PickupContext {
    pub fn new(
        config: Arc<Config>,
        spool: Spool,
        clock: Clock,
        scheduler: SchedulerHandle,
    ) -> Self {
        PickupContext {
            config,
            spool,
            clock,
            scheduler,
            unreleased: Default::default(),
        }
    }

    /// Removes the drop file of message `id` from `pickup/`, then hands the
    /// message to the scheduler; if the removal fails, the message waits.
    async fn release(&self, id: &str) {
        let (root, owned) = (self.spool.root().to_path_buf(), id.to_string());
        match blocking(self.spool.root(), move || maildrop::release(&root, &owned)).await {
            Ok(()) => self.scheduler.queued(id),
            Err(e) => {
                tracing::error!(
                    "pickup: {id}: cannot remove {}/{id}: {e}; the message waits in the queue until it can be",
                    maildrop::PICKUP_DIR
                );
                if let Ok(mut ids) = self.unreleased.lock() {
                    ids.push(id.to_string());
                }
            }
        }
    }

    /// Tries again the removals that failed.
    async fn retry_releases(&self) {
        let ids = self
            .unreleased
            .lock()
            .map(|mut ids| std::mem::take(&mut *ids))
            .unwrap_or_default();
        for id in ids {
            self.release(&id).await;
        }
    }
}

/// Runs spool file work (renames, fsyncs) off the async threads.
async fn blocking<T: Send + 'static>(
    root: &std::path::Path,
    work: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(SpoolError::Io {
            path: root.to_path_buf(),
            source: std::io::Error::other(e),
        })
    })
}

/// At start, once recovery knows what the spool holds and before it hands
/// the queue to the scheduler: settles the drop files a stop or crash left
/// in `pickup/` (durability rule 6 of [`crate::spool`]). A file whose
/// message the spool holds was queued and goes; any other goes back to
/// the maildrop, to be picked up again.
pub fn settle(spool: &Spool, rec: &crate::spool::Recovery) {
    if rec.incomplete {
        // A message recovery did not reach would pass for never queued.
        tracing::error!(
            "pickup: what is left in {}/ waits for a start whose recovery reads every slot",
            maildrop::PICKUP_DIR
        );
        return;
    }
    let mut held: std::collections::HashSet<&str> = rec
        .queued
        .iter()
        .chain(&rec.held)
        .map(|m| m.id.as_str())
        .chain(rec.corrupt.iter().map(|c| c.id.as_str()))
        .collect();
    let corrupt = spool.list(Area::Corrupt).unwrap_or_default();
    held.extend(corrupt.iter().map(String::as_str));
    match maildrop::settle(spool.root(), |id| held.contains(id)) {
        Ok(s) if s.queued + s.returned > 0 => tracing::warn!(
            "pickup: {} drop file(s) were being queued when relayq stopped: {} had been queued (removed from {}/), {} had not (back in the maildrop, to be picked up again)",
            s.queued + s.returned,
            s.queued,
            maildrop::PICKUP_DIR,
            s.returned
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(
            "pickup: cannot settle what is left in {}/: {e}; the next start tries again",
            maildrop::PICKUP_DIR
        ),
    }
}

/// Creates `pickup.sock` (mode 0666), before the daemon says it has
/// started (see `control::bind`).
pub fn bind_wake(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    crate::control::bind_in_spool(
        path,
        0o666,
        "pickup",
        "waking the pickup when a local user's sendmail leaves mail in the maildrop and for logging its refusals",
    )
}

/// Serves `pickup.sock`: every connection wakes the pickup, and may carry
/// one refusal report.
pub async fn serve_wake(listener: UnixListener, wake: Arc<Notify>) -> anyhow::Result<()> {
    let readers = Arc::new(crate::anvil::Anvil::default());
    let waiters = Arc::new(crate::anvil::Anvil::default());
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            wake.notify_one();
            let Ok(uid) = stream.peer_cred().map(|c| c.uid()) else {
                continue;
            };
            if let Some(reading) = readers.take(uid, REPORTS_PER_USER, REPORTS_AT_ONCE) {
                tokio::spawn(async move {
                    read_report(stream, uid).await;
                    drop(reading);
                });
            } else if let Some(waiting) = waiters.take(uid, WAITING_PER_USER, WAITING_AT_ONCE) {
                // The user's reading slots are taken, most often by their
                // own reports of a moment ago that the daemon has not got
                // to yet (a script running sendmail in a loop, a loaded
                // machine): dropping this one would lose a refusal from
                // the log. It waits for a slot instead, as long as a
                // report may take; a user holding connections open only
                // makes their own wait.
                let readers = readers.clone();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + REPORT_WAIT;
                    let reading = loop {
                        if let Some(r) = readers.take(uid, REPORTS_PER_USER, REPORTS_AT_ONCE) {
                            break r;
                        }
                        if tokio::time::Instant::now() >= deadline {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    };
                    drop(waiting);
                    read_report(stream, uid).await;
                    drop(reading);
                });
            }
        }
    }
}

/// Reads one refusal report, if the connection carries one, and logs it
/// as the connecting user.
async fn read_report(stream: UnixStream, uid: u32) {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream).take(MAX_REPORT as u64);
    if !matches!(
        tokio::time::timeout(REPORT_WAIT, reader.read_until(b'\n', &mut line)).await,
        Ok(Ok(_))
    ) {
        return;
    }
    let Some(json) = line.strip_prefix(REPORT_PREFIX) else {
        return;
    };
    match serde_json::from_slice::<Rejection>(json) {
        Ok(r) => report_rejected(uid, &r),
        Err(e) => tracing::debug!("pickup.sock: unreadable report from uid {uid}: {e}"),
    }
}

/// Serializes [`announce`]: recovery at start and a wake from `sendmail`
/// may meet the same file.
static ANNOUNCING: Mutex<()> = Mutex::new(());

/// Logs and counts the accepted line of a message the `sendmail` command
/// wrote into `queue/` itself, once: the file then carries an `accepted`
/// record. Files the daemon wrote (they name no submitter) are left alone.
pub fn announce(spool: &Spool, area: Area, id: &str) {
    let _one = ANNOUNCING.lock().unwrap_or_else(|p| p.into_inner());
    let Ok(meta) = spool.read_meta(area, id) else {
        // Delivered and removed meanwhile, or unreadable (recovery says).
        return;
    };
    let Some(uid) = meta.submitter.filter(|_| !meta.accepted_logged) else {
        return;
    };
    events::accepted(
        &meta.id,
        &Client::local(uid),
        &meta.sender,
        usize::try_from(meta.size).unwrap_or(usize::MAX),
        meta.recipients.len(),
    );
    let at_ms = crate::clock::to_ms(std::time::SystemTime::now());
    if let Err(e) = spool.append_in(area, id, &[Record::Accepted { at_ms }], false) {
        events::queue_warning(id, &format!("cannot note that it was logged: {e}"));
    }
}

/// Takes up messages in `queue/` the scheduler was never told about: the
/// `sendmail` command queues a message itself, then tells the daemon, and
/// one that stopped in between (killed, or unable to reach the daemon)
/// left it there, listed by `mailq` but never tried until a restart.
/// Files younger than `min_age` are left to the `sendmail` that may be
/// telling the daemon now. Returns how many were scheduled. (An operation
/// naming such a message takes it up too: see the scheduler.)
pub async fn adopt(spool: &Spool, scheduler: &SchedulerHandle, min_age: Duration) -> usize {
    adopt_counted(spool, scheduler, min_age).await.0
}

/// [`adopt`], also saying whether it left unknown messages behind (too
/// young, or not to be taken up), which a later pass must look at again.
async fn adopt_counted(
    spool: &Spool,
    scheduler: &SchedulerHandle,
    min_age: Duration,
) -> (usize, bool) {
    let s = spool.clone();
    let names = match tokio::task::spawn_blocking(move || s.list(Area::Queue)).await {
        Ok(Ok(ids)) => ids,
        _ => return (0, true),
    };
    let unknown = scheduler.unknown(names).await;
    if unknown.is_empty() {
        return (0, false);
    }
    let total = unknown.len();
    let s = spool.clone();
    let adopted = tokio::task::spawn_blocking(move || {
        unknown
            .into_iter()
            .filter(|id| take_up(&s, id, min_age))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for id in &adopted {
        scheduler.queued(id);
    }
    (adopted.len(), adopted.len() < total)
}

/// Whether `queue/<id>`, which the scheduler does not know, is a message
/// to take up (at least `min_age` old, complete, not done, under its own
/// id: anything else is recovery's); if so logs it, and its accepted line
/// once ([`announce`]), for the caller to schedule.
pub fn take_up(spool: &Spool, id: &str, min_age: Duration) -> bool {
    let Ok(meta) = spool.read_meta(Area::Queue, id) else {
        return false;
    };
    let now = crate::clock::to_ms(std::time::SystemTime::now());
    let min_age = u64::try_from(min_age.as_millis()).unwrap_or(u64::MAX);
    if meta.id != id || meta.is_done() || now.saturating_sub(meta.arrival_ms) < min_age {
        return false;
    }
    events::queue_warning(
        id,
        "in queue/ but never scheduled (the sendmail command that queued it stopped before it told the daemon); scheduled now",
    );
    announce(spool, Area::Queue, id);
    true
}

/// How long a message `sendmail` queued itself may wait for that command
/// to tell the daemon before the minutely pass takes it up.
const UNTOLD_AFTER: Duration = Duration::from_secs(30);

/// Runs the pickup until shutdown, from when `settled` fires (or is
/// dropped): after [`settle`], so that no drop file it claims is settled
/// by mistake. Once a minute it also takes up what the `sendmail` command
/// queued without telling the daemon ([`adopt`]).
pub async fn run(
    ctx: Arc<PickupContext>,
    wake: Arc<Notify>,
    settled: tokio::sync::oneshot::Receiver<()>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = settled => {}
        _ = stopped(&mut shutdown) => return,
    }
    // queue/'s mtime when a pass last left nothing behind: a message
    // queued since changes it, so an unchanged directory (a big deferred
    // queue, the upstream down) is not listed again every minute.
    let mut settled_at = None;
    let queue_dir = ctx.spool.root().join("queue");
    loop {
        scan(&ctx).await;
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RESCAN) => {
                // Read before the listing: a link made during it changes
                // the mtime again, and the next pass looks.
                let mtime = std::fs::metadata(&queue_dir).and_then(|m| m.modified()).ok();
                if mtime.is_none() || mtime != settled_at {
                    let (_, left) = adopt_counted(&ctx.spool, &ctx.scheduler, UNTOLD_AFTER).await;
                    settled_at = if left { None } else { mtime };
                }
            }
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// One pass over the maildrop; returns how many messages were queued.
pub async fn scan(ctx: &PickupContext) -> usize {
    ctx.retry_releases().await;
    let root = ctx.spool.root().to_path_buf();
    let listed = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || {
            let pruned = maildrop::prune(&root, std::time::SystemTime::now());
            (maildrop::scan(&root), pruned)
        })
        .await
        .map(|(found, pruned)| {
            log_pruned(&pruned);
            found
        })
    };
    let found = match listed {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::error!("pickup: cannot scan the maildrop: {e}");
            return 0;
        }
        Err(_) => return 0,
    };
    for junk in &found.junk {
        if junk.owner.is_none_or(may_log) {
            let owner = junk.owner.map_or("an unknown user".to_string(), |uid| {
                format!("uid {uid} ({})", submit::Identity::of_uid(uid).name)
            });
            tracing::warn!(
                "pickup: maildrop/{} ({}, by {owner}) is no drop file: {}",
                junk.name,
                junk.why,
                junk.outcome
            );
        }
    }
    let mut queued = 0;
    for name in found.ready {
        if pick(ctx, &root, name).await {
            queued += 1;
        }
    }
    queued
}

async fn pick(ctx: &PickupContext, root: &std::path::Path, name: String) -> bool {
    let max = ctx.config.smtp.max_message_size.0;
    let read = {
        let root = root.to_path_buf();
        let name = name.clone();
        tokio::task::spawn_blocking(move || maildrop::read(&root, &name, max)).await
    };
    let dropped = match read {
        Ok(Ok(d)) => d,
        Ok(Err(Rejected::NotAFile(why))) => {
            let path = maildrop::dir(root).join(&name);
            let owner = std::fs::symlink_metadata(&path)
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .unwrap_or(0);
            let outcome = maildrop::clear(root, std::ffi::OsStr::new(&name));
            if may_log(owner) {
                tracing::warn!(
                    "pickup: maildrop/{name} (by uid {owner} ({})) is no drop file, {why}: {outcome}",
                    submit::Identity::of_uid(owner).name
                );
            }
            return false;
        }
        Ok(Err(Rejected::Bad { uid, why })) => {
            refuse(root, &name, uid, Reason::BadDropFile, &why, None, &[], max);
            return false;
        }
        Ok(Err(Rejected::TooBig { uid, why })) => {
            refuse(root, &name, uid, Reason::MessageSize, &why, None, &[], max);
            return false;
        }
        Ok(Err(Rejected::Io(why))) => {
            tracing::warn!("pickup: maildrop/{name}: {why}; will retry");
            return false;
        }
        Err(_) => return false,
    };
    let (uid, sender, file) = (dropped.uid, dropped.meta.sender.clone(), dropped.file);
    let recipients: Vec<String> = dropped
        .meta
        .recipients
        .iter()
        .map(|r| r.address.clone())
        .collect();
    match accept(ctx, dropped) {
        Err((reason, why)) => {
            refuse(
                root,
                &name,
                uid,
                reason,
                &why,
                Some(sender),
                &recipients,
                max,
            );
            false
        }
        Ok((who, env, msg, arrival)) => {
            let id = Spool::new_id();
            let claimed = {
                let (dir, name, id) = (root.to_path_buf(), name.clone(), id.clone());
                blocking(root, move || maildrop::claim(&dir, &name, &id, file)).await
            };
            match claimed {
                Ok(true) => {}
                Ok(false) => {
                    if may_log(uid) {
                        tracing::warn!(
                            "pickup: maildrop/{name} (by uid {uid} ({})) was replaced while it was read; the next scan reads it again",
                            submit::Identity::of_uid(uid).name
                        );
                    }
                    return false;
                }
                Err(e) => {
                    tracing::error!(
                        "pickup: cannot move maildrop/{name} to {}/ to queue it: {e}; will retry",
                        maildrop::PICKUP_DIR
                    );
                    return false;
                }
            }
            let mut full = submit::trace_prefix(
                &ctx.config.hostname,
                who.uid,
                &id,
                &env,
                &msg,
                ctx.clock.now(),
            );
            full.extend_from_slice(&msg);
            drop(msg);
            let mut env = env;
            submit::set_flags(&mut env, &full);
            let (size, nrcpt, sender) = (full.len(), env.recipients.len(), env.sender.clone());
            match ctx.spool.commit(id.clone(), env, full, arrival).await {
                Ok(id) => {
                    let client = Client::Local {
                        uid: who.uid,
                        user: who.name,
                    };
                    events::accepted(&id, &client, &sender, size, nrcpt);
                    ctx.release(&id).await;
                    true
                }
                Err(e) => {
                    // A commit that failed after it named the message
                    // (its directory sync failed) may still come back at
                    // the next start: the drop file then waits in
                    // pickup/ for `settle` to judge, or it could be sent
                    // twice.
                    let named = ctx.spool.path(Area::Queue, &id).is_ok_and(|p| p.exists());
                    if named {
                        tracing::error!(
                            "pickup: cannot queue maildrop/{name} as {id}: {e}; it waits in {}/{id} until the next start, which queues it once",
                            maildrop::PICKUP_DIR
                        );
                        return false;
                    }
                    tracing::error!("pickup: cannot queue maildrop/{name}: {e}; will retry");
                    if let Err(e) = maildrop::unclaim(root, &id) {
                        tracing::error!(
                            "pickup: cannot put {}/{id} back: {e}; the next start does",
                            maildrop::PICKUP_DIR
                        );
                    }
                    false
                }
            }
        }
    }
}

/// Refuses a drop file: it is kept in `corrupt/maildrop/` for a human
/// (within bounds, see `spool::maildrop`), and the refusal is logged and
/// counted like every other.
#[allow(clippy::too_many_arguments)]
fn refuse(
    root: &std::path::Path,
    name: &str,
    uid: u32,
    reason: Reason,
    why: &str,
    from: Option<String>,
    to: &[String],
    max_size: u64,
) {
    let reply = match maildrop::to_corrupt(root, name, max_size.saturating_add(1 << 20)) {
        Ok((kept, pruned)) => {
            // Room made for this user's file: their budget pays the line.
            if !pruned.is_empty() && may_log(uid) {
                log_pruned(&pruned);
            }
            match kept {
                Refused::Kept(id) => format!(
                    "maildrop file {name} refused ({why}); kept as {}/{id}",
                    maildrop::CORRUPT_DIR
                ),
                Refused::Removed(size) => {
                    format!("maildrop file {name} refused ({why}); removed: {size}")
                }
            }
        }
        Err(e) => format!(
            "maildrop file {name} refused ({why}); cannot move it to {}: {e}",
            maildrop::CORRUPT_DIR
        ),
    };
    let r = Rejection {
        stage: Stage::Pickup,
        reason,
        reply,
        from,
        to: to.to_vec(),
        detail: None,
        to_omitted: 0,
    };
    report_rejected(uid, &r);
}

/// One line for refused drop files removed from `corrupt/maildrop/` to
/// keep it within its bounds.
fn log_pruned(pruned: &[String]) {
    if !pruned.is_empty() {
        tracing::info!(
            "pickup: {} kept within its bounds (at most {} files, {} MB, {} days): removed {} older refused drop file(s)",
            maildrop::CORRUPT_DIR,
            maildrop::KEEP_FILES,
            maildrop::KEEP_BYTES >> 20,
            maildrop::KEEP_AGE.as_secs() / 86_400,
            pruned.len()
        );
    }
}

/// What a drop file's owner may send, and the reason a file is refused.
type Accepted = (Identity, Envelope, Vec<u8>, u64);

/// Applies the local submission rules to a drop file: who wrote it, which
/// sender stands, which recipients are valid, when it arrived.
fn accept(ctx: &PickupContext, d: Dropped) -> Result<Accepted, (Reason, String)> {
    let who = Identity::of_uid(d.uid);
    let owner = rustix::process::geteuid().as_raw();
    let claimed = &d.meta.sender;
    let sender = submit::sender_for(&ctx.config, &who, owner, claimed);
    if sender != *claimed {
        if may_log(who.uid) {
            tracing::warn!(
                "pickup: maildrop/{}: sender <{claimed}> replaced by <{sender}>: uid {} ({}) may not choose the sender (see [sendmail] trusted_users)",
                d.name,
                who.uid,
                who.name
            );
        }
    } else if !sender.is_empty() {
        submit::check_address(&sender)
            .map_err(|e| (Reason::BadAddress, format!("sender <{sender}>: {e}")))?;
    }
    let mut recipients = Vec::with_capacity(d.meta.recipients.len());
    for r in &d.meta.recipients {
        submit::check_address(&r.address).map_err(|e| {
            (
                Reason::BadAddress,
                format!("recipient <{}>: {e}", r.address),
            )
        })?;
        // The DSN parameters are the user's to write too: the limits an
        // SMTP client's are held to.
        r.dsn
            .check()
            .map_err(|e| (Reason::Syntax, format!("recipient <{}>: {e}", r.address)))?;
        recipients.push(r.address.clone());
    }
    d.meta
        .dsn
        .check()
        .map_err(|e| (Reason::Syntax, e.to_string()))?;
    submit::check_recipients(&ctx.config, recipients.len())?;
    // The claimed arrival time is the user's to write: believe it only
    // within the queue's lifetime, so it can neither expire the message at
    // once nor keep it forever.
    let now = ctx.clock.now_ms();
    let lifetime = u64::try_from(ctx.config.queue.max_lifetime.0.as_millis()).unwrap_or(u64::MAX);
    let arrival = if d.meta.arrival_ms <= now && now - d.meta.arrival_ms < lifetime / 2 {
        d.meta.arrival_ms
    } else {
        now
    };
    let env = Envelope {
        sender,
        recipients,
        dsn: d.meta.dsn.clone(),
        rcpt_dsn: d.meta.recipients.iter().map(|r| r.dsn.clone()).collect(),
        ..Envelope::default()
    };
    // The same content rules as every other way in: the drop file's
    // content is the user's to write, whatever the sendmail command did.
    let limits = crate::cleanup::Limits::from_config(&ctx.config.smtp);
    let rules = submit::local_rules(&ctx.config, &who, &env, who.full_name.clone());
    let body = crate::cleanup::Intake::whole(&d.body, limits)
        .and_then(|m| crate::cleanup::rewrite(m, &rules))
        .map_err(|e| (e.reason(), e.to_string()))?;
    Ok((who, env, body, arrival))
}
