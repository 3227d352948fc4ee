//! The pickup: the daemon's side of local submission (Postfix's `pickup`).
//!
//! - It scans `maildrop/` at start, when poked through `pickup.sock`, and
//!   once a minute; each drop file is checked, given a queue id and the
//!   trace headers, committed with the one writer ([`Spool::commit`]),
//!   logged as accepted, handed to the scheduler, and only then removed
//!   from the maildrop. A drop file that breaks a rule is refused (logged
//!   as a `NOQUEUE: reject:`) and moved to `corrupt/`.
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
//! [`crate::anvil`]): a refusal report, parsed strictly and logged as the
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

use std::path::PathBuf;
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
use crate::spool::{Area, Envelope, Record, Spool};
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
    /// Drop files already queued whose removal failed: never queued twice.
    queued_not_removed: std::sync::Mutex<std::collections::HashSet<String>>,
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
            queued_not_removed: Default::default(),
        }
    }

    fn already_queued(&self, name: &str) -> bool {
        self.queued_not_removed
            .lock()
            .map(|s| s.contains(name))
            .unwrap_or(false)
    }
}

/// Serves `pickup.sock` (mode 0666): every connection wakes the pickup,
/// and may carry one refusal report.
pub async fn serve_wake(path: PathBuf, wake: Arc<Notify>) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("cannot create pickup socket {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let readers = Arc::new(crate::anvil::Anvil::default());
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

/// Runs the pickup until shutdown.
pub async fn run(ctx: Arc<PickupContext>, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    loop {
        scan(&ctx).await;
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RESCAN) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// One pass over the maildrop; returns how many messages were queued.
pub async fn scan(ctx: &PickupContext) -> usize {
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
    if ctx.already_queued(&name) {
        if maildrop::remove(root, &name).is_ok()
            && let Ok(mut s) = ctx.queued_not_removed.lock()
        {
            s.remove(&name);
        }
        return false;
    }
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
    let (uid, sender) = (dropped.uid, dropped.meta.sender.clone());
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
            match ctx.spool.commit(id, env, full, arrival).await {
                Ok(id) => {
                    let client = Client::Local {
                        uid: who.uid,
                        user: who.name,
                    };
                    events::accepted(&id, &client, &sender, size, nrcpt);
                    ctx.scheduler.queued(&id);
                    // Queued first, removed second: a crash in between
                    // delivers twice rather than never.
                    if let Err(e) = maildrop::remove(root, &name) {
                        tracing::error!("pickup: {id}: cannot remove maildrop/{name}: {e}");
                        if let Ok(mut s) = ctx.queued_not_removed.lock() {
                            s.insert(name);
                        }
                    }
                    true
                }
                Err(e) => {
                    tracing::error!("pickup: cannot queue maildrop/{name}: {e}; will retry");
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
