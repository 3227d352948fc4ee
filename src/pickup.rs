//! The pickup: the daemon's side of the maildrop (Postfix's `pickup`).
//! It scans `maildrop/` at start, when poked through `pickup.sock`, and
//! once a minute; each drop file is checked, given a queue id and the
//! trace headers, committed with the one writer ([`Spool::commit`]), handed
//! to the scheduler, and only then removed from the maildrop.
//!
//! # Security
//! Drop files are written by local users and are untrusted: see
//! [`crate::spool::maildrop`] for what is checked on the file and
//! [`crate::submit`] for the sender rule applied here (an untrusted user's
//! envelope sender is replaced by `user@myorigin`). The wake-up socket is
//! open to every local user, so it reads nothing: a connection only makes
//! a scan due, and a flood of them collapses into one scan at a time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{Notify, watch};

use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::SchedulerHandle;
use crate::delivery::scheduler::stopped;
use crate::spool::maildrop::{self, Dropped, Rejected};
use crate::spool::{Envelope, Spool};
use crate::submit::{self, Identity};

/// How often the maildrop is scanned without being poked.
const RESCAN: Duration = Duration::from_secs(60);

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

/// Serves `pickup.sock` (mode 0666): every connection wakes the pickup.
pub async fn serve_wake(path: PathBuf, wake: Arc<Notify>) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| anyhow::anyhow!("cannot create pickup socket {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            drop(stream);
            wake.notify_one();
        }
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
        Ok(Err(Rejected::Bad(why))) => {
            match maildrop::to_corrupt(root, &name) {
                Ok(id) => tracing::error!(
                    target: "relayq::queue",
                    "{id}: maildrop file {name} refused ({why}); moved to corrupt/"
                ),
                Err(e) => tracing::error!("pickup: maildrop/{name} refused ({why}): {e}"),
            }
            return false;
        }
        Ok(Err(Rejected::Io(why))) => {
            tracing::warn!("pickup: maildrop/{name}: {why}; will retry");
            return false;
        }
        Err(_) => return false,
    };
    match accept(ctx, dropped) {
        Err(why) => {
            match maildrop::to_corrupt(root, &name) {
                Ok(id) => tracing::error!(
                    target: "relayq::queue",
                    "{id}: maildrop file {name} refused ({why}); moved to corrupt/"
                ),
                Err(e) => tracing::error!("pickup: maildrop/{name} refused ({why}): {e}"),
            }
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
                    crate::observe::events::accepted_local(
                        &id, who.uid, &who.name, &sender, size, nrcpt, &name,
                    );
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

/// Applies the local submission rules to a drop file: who wrote it, which
/// sender stands, which recipients are valid, when it arrived.
fn accept(ctx: &PickupContext, d: Dropped) -> Result<(Identity, Envelope, Vec<u8>, u64), String> {
    let who = Identity::of_uid(d.uid);
    let owner = rustix::process::geteuid().as_raw();
    let mut sender = d.meta.sender.clone();
    if !submit::is_trusted(&ctx.config, &who, owner) {
        let forced = submit::default_sender(&ctx.config, &who);
        if sender != forced {
            tracing::warn!(
                "pickup: maildrop/{}: sender <{sender}> replaced by <{forced}>: uid {} ({}) may not choose the sender (see [sendmail] trusted_users)",
                d.name,
                who.uid,
                who.name
            );
            sender = forced;
        }
    } else if !sender.is_empty() {
        submit::check_address(&sender).map_err(|e| format!("sender <{sender}>: {e}"))?;
    }
    let mut recipients = Vec::with_capacity(d.meta.recipients.len());
    for r in &d.meta.recipients {
        submit::check_address(&r.address).map_err(|e| format!("recipient <{}>: {e}", r.address))?;
        recipients.push(r.address.clone());
    }
    if recipients.len() > ctx.config.smtp.max_recipients {
        return Err(format!(
            "{} recipients, more than smtp.max_recipients",
            recipients.len()
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
        .map_err(|e| e.to_string())?;
    Ok((who, env, body, arrival))
}
