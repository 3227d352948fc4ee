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
//! connections at a time: a refusal report, parsed strictly and logged
//! as the user the kernel says connected (`SO_PEERCRED`), never as anyone
//! the report names, without control characters. A local user can thus
//! add refusals (and counts) only under their own uid, as they could by
//! running `sendmail -bs` with bad input.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, watch};

use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::SchedulerHandle;
use crate::delivery::scheduler::stopped;
use crate::observe::events::{self, Client, Reason, Rejection, Stage};
use crate::spool::maildrop::{self, Dropped, Rejected};
use crate::spool::{Area, Envelope, Record, Spool};
use crate::submit::{self, Identity};

/// How often the maildrop is scanned without being poked.
const RESCAN: Duration = Duration::from_secs(60);
/// The longest refusal report read from `pickup.sock`.
pub const MAX_REPORT: usize = 8 * 1024;
/// How long a connection to `pickup.sock` may take to send its report.
pub const REPORT_WAIT: Duration = Duration::from_secs(2);
/// Reports read at once; further connections only wake the pickup.
const REPORTS_AT_ONCE: usize = 8;
/// The line a report starts with, then the [`Rejection`] as JSON.
pub const REPORT_PREFIX: &[u8] = b"reject ";

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
    let readers = Arc::new(Semaphore::new(REPORTS_AT_ONCE));
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            wake.notify_one();
            if let Ok(permit) = readers.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    read_report(stream).await;
                    drop(permit);
                });
            }
        }
    }
}

/// Reads one refusal report, if the connection carries one, and logs it
/// as the connecting user.
async fn read_report(stream: UnixStream) {
    let Ok(cred) = stream.peer_cred() else {
        return;
    };
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
        Ok(r) => events::rejected(&Client::local(cred.uid()), &r),
        Err(e) => tracing::debug!(
            "pickup.sock: unreadable report from uid {}: {e}",
            cred.uid()
        ),
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
        tokio::task::spawn_blocking(move || maildrop::scan(&root)).await
    };
    let found = match listed {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::error!("pickup: cannot scan the maildrop: {e}");
            return 0;
        }
        Err(_) => return 0,
    };
    for (name, why) in &found.removed {
        tracing::warn!("pickup: removed maildrop/{name}: {why}");
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
            tracing::warn!("pickup: removed maildrop/{name}: {why}");
            let _ = std::fs::remove_file(maildrop::dir(root).join(&name));
            return false;
        }
        Ok(Err(Rejected::Bad { uid, why })) => {
            refuse(root, &name, uid, Reason::BadDropFile, &why, None, &[]);
            return false;
        }
        Ok(Err(Rejected::TooBig { uid, why })) => {
            refuse(root, &name, uid, Reason::MessageSize, &why, None, &[]);
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
            refuse(root, &name, uid, reason, &why, Some(sender), &recipients);
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

/// Refuses a drop file: it goes to `corrupt/` (for a human, never
/// deleted), and the refusal is logged and counted like every other.
fn refuse(
    root: &std::path::Path,
    name: &str,
    uid: u32,
    reason: Reason,
    why: &str,
    from: Option<String>,
    to: &[String],
) {
    let reply = match maildrop::to_corrupt(root, name) {
        Ok(id) => format!("maildrop file {name} refused ({why}); moved to corrupt/{id}"),
        Err(e) => format!("maildrop file {name} refused ({why}); cannot move it to corrupt/: {e}"),
    };
    let r = Rejection {
        stage: Stage::Pickup,
        reason,
        reply,
        from,
        to: to.to_vec(),
        detail: None,
    };
    events::rejected(&Client::local(uid), &r);
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
        tracing::warn!(
            "pickup: maildrop/{}: sender <{claimed}> replaced by <{sender}>: uid {} ({}) may not choose the sender (see [sendmail] trusted_users)",
            d.name,
            who.uid,
            who.name
        );
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
        recipients.push(r.address.clone());
    }
    if recipients.len() > ctx.config.smtp.max_recipients {
        return Err((
            Reason::TooManyRecipients,
            format!(
                "{} recipients, more than smtp.max_recipients",
                recipients.len()
            ),
        ));
    }
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
        smtputf8: false,
        eight_bit: false,
    };
    Ok((who, env, d.body, arrival))
}
