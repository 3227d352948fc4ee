//! `relayq serve`: wires spool, scheduler, workers, SMTP server and control
//! socket together and runs until SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::{Config, TransportKind};
use crate::delivery::scheduler::Scheduler;
use crate::delivery::worker::{self, WorkerContext};
use crate::routing::Router;
use crate::smtp::{Server, ServerContext};
use crate::spool::{Area, Spool};

/// How long shutdown waits for SMTP sessions and deliveries in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// File descriptors kept for everything but inbound sessions: relay
/// connections, spool files, the control, pickup and status sockets.
const FD_RESERVE: u64 = 256;

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM or Ctrl-C from the first log line on (a
    // script stopping relayq once it speaks, systemd right after READY=1)
    // must drain, not kill (nor be ignored, when inherited as ignored).
    let signals = Signals::new()?;
    crate::memory::return_large_blocks();
    let config = Arc::new(config);
    warn_if_secrets_are_public(&config);
    if let Some(why) = config.example_mail_name() {
        tracing::warn!(
            "config: {why}: set hostname to this machine's fully qualified name (or remove it: the default is the system's host name) and myorigin, if set, to your mail domain"
        );
    }
    for relay in config.relays.iter().map(|r| &r.relay) {
        for file in relay.exposed_secret_files() {
            tracing::warn!(
                "{} holds a relay secret and is readable by other users; run `chmod 600 {}`",
                file.display(),
                file.display()
            );
        }
        if let Err(e) = relay.read_secret() {
            tracing::warn!("{e}; deliveries will be deferred until it is fixed");
        }
    }
    let spool = Spool::open(&config.spool_dir)
        .map_err(|e| anyhow::anyhow!("cannot open spool {}: {e}", config.spool_dir.display()))?;
    // Held until we exit: queue tools change the spool only without us.
    let _daemon_lock = super::lock_spool(&config.spool_dir, Duration::from_secs(60))?;
    // Under the lock: the slots present now are recovery's to look at.
    spool
        .enable_slots(config.queue.done_sync_window.0)
        .map_err(|e| anyhow::anyhow!("cannot open spool {}: {e}", config.spool_dir.display()))?;
    crate::spool::maildrop::prepare(&config.spool_dir)
        .map_err(|e| anyhow::anyhow!("cannot prepare the maildrop: {e}"))?;
    let clock = Clock::new();
    // One worker per relay connection: a worker never waits for a busy
    // relay (see transport::pool), so each can use its full concurrency.
    let workers = match config.transport_kind() {
        TransportKind::Relay => config
            .relays
            .iter()
            .map(|r| r.relay.connections())
            .sum::<usize>()
            .clamp(1, 512),
        TransportKind::Capture => 2,
    };
    let (scheduler, handle, jobs) = Scheduler::new(spool.clone(), clock.clone(), workers);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let limits_file = config.spool_dir.join("limits.json");
    let router = match config.transport_kind() {
        TransportKind::Relay => {
            let router = Router::new(&config, clock.clone(), Some(handle.clone()))
                .map_err(|e| anyhow::anyhow!(e))?;
            router.load_limits(&limits_file);
            let router = Arc::new(router);
            crate::routing::install(&router);
            Some(router)
        }
        TransportKind::Capture => None,
    };

    let ctx = Arc::new(ServerContext::new(
        config.clone(),
        spool.clone(),
        clock.clone(),
        handle.clone(),
    )?);
    let (server_ctx_tx, server_ctx) = watch::channel(ctx);
    let mut server = Server::bind(server_ctx).await?;
    server.limit_sessions(session_ceiling(&config, workers as u64));
    let addrs = server.local_addrs();
    warn_if_short_of_space(&config, &spool);

    let relay_names: Vec<String> = config
        .relay
        .iter()
        .filter(|_| config.transport_kind() == TransportKind::Relay)
        .map(|r| format!("{}:{}", r.host, r.port))
        .collect();
    for name in &relay_names {
        crate::observe::state::relay_known(name);
    }
    crate::observe::metrics::install(&relay_names)?;
    let status_task = match config.status_listen {
        Some(addr) => {
            let sctx = Arc::new(crate::observe::http::StatusContext {
                config: config.clone(),
                spool: spool.clone(),
                clock: clock.clone(),
            });
            let (local, task) = crate::observe::http::serve(addr, sctx, shutdown.clone()).await?;
            tracing::info!("status endpoint on http://{local}/ (also /status, /metrics, /healthz)");
            Some(task)
        }
        None => None,
    };

    let sched_task = tokio::spawn(scheduler.run(shutdown.clone()));
    let wctx = Arc::new(WorkerContext {
        config: config.clone(),
        spool: spool.clone(),
        clock: clock.clone(),
        scheduler: handle.clone(),
        router: router.clone(),
    });
    // Fail at start, not in a worker, if the transport cannot be set up.
    drop(wctx.sender()?);
    let (worker_ctx_tx, worker_ctx) = watch::channel(wctx);
    let mut worker_tasks = tokio::task::JoinSet::new();
    let (upkeep_stop, upkeep_stopped) = watch::channel(false);
    let mut upkeep = router.as_ref().map(|r| {
        tokio::spawn(crate::routing::maintain(
            r.clone(),
            Some(limits_file.clone()),
            upkeep_stopped,
        ))
    });
    for _ in 0..workers {
        worker_tasks.spawn(worker::run(
            worker_ctx.clone(),
            jobs.clone(),
            shutdown.clone(),
        ));
    }
    let control = tokio::spawn(crate::control::serve(
        crate::control::bind(&crate::control::socket_path(&config.spool_dir))?,
        spool.clone(),
        handle.clone(),
        clock.clone(),
    ));

    let wake = Arc::new(tokio::sync::Notify::new());
    let pickup_socket = crate::spool::maildrop::pickup_socket(&config.spool_dir);
    let pickup_wake = tokio::spawn(crate::pickup::serve_wake(
        crate::pickup::bind_wake(&pickup_socket)?,
        wake.clone(),
    ));
    // The pickup starts once recovery has settled what a crash left half
    // picked up (durability rule 6 of the spool).
    let (settled, pickup_may_start) = tokio::sync::oneshot::channel();
    let pickup_task = tokio::spawn(crate::pickup::run(
        Arc::new(crate::pickup::PickupContext::new(
            config.clone(),
            spool.clone(),
            clock.clone(),
            handle.clone(),
        )),
        wake,
        pickup_may_start,
        shutdown.clone(),
    ));

    // Listen first, recover second: a big queue must not delay accepting.
    let rspool = spool.clone();
    let rhandle = handle.clone();
    tokio::task::spawn_blocking(move || match rspool.recover() {
        Ok(rec) => {
            // Before the scheduler may deliver what the pickup queued.
            crate::pickup::settle(&rspool, &rec);
            let _ = settled.send(());
            for c in &rec.corrupt {
                tracing::error!(target: "relayq::queue", "{}: queue file is corrupt ({}); moved to corrupt/", c.id, c.reason);
            }
            tracing::info!(
                "recovered queue: {} queued, {} on hold, {} corrupt, {} unfinished writes discarded",
                rec.queued.len(),
                rec.held.len(),
                rec.corrupt.len(),
                rec.discarded_tmp
            );
            if rec.stale_names > 0 {
                tracing::warn!(
                    "{} stale queue file names (left by a power loss) put right: each message is queued under its own id",
                    rec.stale_names
                );
            }
            if rec.relinked > 0 {
                tracing::warn!(
                    "{} accepted messages restored to queue/ from their slots (links lost in a crash)",
                    rec.relinked
                );
            }
            // What `sendmail` queued while we were down: accepted now.
            for (area, metas) in [(Area::Queue, &rec.queued), (Area::Hold, &rec.held)] {
                for m in metas
                    .iter()
                    .filter(|m| m.submitter.is_some() && !m.accepted_logged)
                {
                    crate::pickup::announce(&rspool, area, &m.id);
                }
            }
            rhandle.recovered(rec.queued, rec.held);
        }
        Err(e) => {
            tracing::error!("queue recovery failed: {e}");
            // What is left in pickup/ waits for a start that recovers.
            let _ = settled.send(());
        }
    });

    let listen: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let delivery = match config.transport_kind() {
        TransportKind::Relay => {
            let r: Vec<String> = config
                .relays
                .iter()
                .map(|r| match &config.relay {
                    Some(_) => format!("{}:{}", r.relay.host, r.relay.port),
                    None => format!("{} ({}:{})", r.name, r.relay.host, r.relay.port),
                })
                .collect();
            format!("relaying to {}", r.join(", "))
        }
        TransportKind::Capture => {
            let maildir = config
                .capture
                .as_ref()
                .map(|c| c.maildir.display().to_string())
                .unwrap_or_default();
            format!(
                "capturing mail into the Maildir {maildir} (one file per message in {maildir}/new)"
            )
        }
    };
    let source = match &config.source {
        Some(p) => format!("config {}", p.display()),
        None => format!(
            "no config file ({} not found): development mode",
            crate::config::DEFAULT_CONFIG_PATH
        ),
    };
    tracing::info!(
        "relayq {} started: {source}, listening on {}, {delivery}, spool {}",
        env!("CARGO_PKG_VERSION"),
        listen.join(" "),
        config.spool_dir.display()
    );

    let server_task = tokio::spawn(server.run(shutdown.clone(), SHUTDOWN_GRACE));
    // systemd (Type=notify): we are listening; a no-op outside systemd.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot notify systemd of readiness: {e}");
    }
    let mut live = Live {
        config: config.clone(),
        spool: spool.clone(),
        clock: clock.clone(),
        scheduler: handle.clone(),
        server: server_ctx_tx,
        workers: worker_ctx_tx,
        router: router.clone(),
        upkeep_stop,
        limits_file: limits_file.clone(),
        worker_count: workers,
    };
    let mut signals = signals;
    while signals.wait().await == Wake::Reload {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        if let Some(task) = live.reload().await
            && let Some(old) = upkeep.replace(task)
        {
            let _ = old.await;
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
    let router = live.router.clone();
    let _ = live.upkeep_stop.send(true);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        "shutting down: no new mail accepted, deliveries in flight finish, the queue stays on disk"
    );
    let _ = shutdown_tx.send(true);
    let _ = server_task.await;
    let drained = async { while worker_tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        tracing::warn!("deliveries still in flight after {SHUTDOWN_GRACE:?}; they stay queued");
    }
    if let Some(router) = &router {
        if let Some(task) = upkeep {
            let _ = task.await;
        }
        crate::routing::shutdown(router, Some(limits_file.clone())).await;
    }
    control.abort();
    if let Some(task) = status_task {
        // A browser may hold a keep-alive connection open; don't wait on it.
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    pickup_wake.abort();
    let _ = pickup_task.await;
    let _ = std::fs::remove_file(&pickup_socket);
    let _ = sched_task.await;
    // What was delivered must not be sent again after a power cut now.
    let _ = tokio::task::spawn_blocking(move || spool.flush_done_marks()).await;
    let _ = std::fs::remove_file(crate::control::socket_path(&config.spool_dir));
    tracing::info!("stopped");
    Ok(())
}

/// How many SMTP sessions the file descriptor limit allows: raises the soft
/// limit to the hard one when `max_connections` needs it (systemd's
/// default soft limit is 1024), and says so when even that is too low.
fn session_ceiling(config: &Config, workers: u64) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let want = config.smtp.max_connections as u64;
    let need = want + FD_RESERVE + workers;
    let lim = getrlimit(Resource::Nofile);
    let mut soft = lim.current.unwrap_or(u64::MAX);
    if soft < need {
        let raised = lim.maximum.map_or(need, |hard| hard.max(soft));
        if setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(raised),
                maximum: lim.maximum,
            },
        )
        .is_ok()
        {
            tracing::info!(
                "raised the open file limit from {soft} to {raised} for smtp.max_connections = {want}"
            );
            soft = raised;
        }
    }
    let fit = soft.saturating_sub(FD_RESERVE + workers).max(1);
    if fit < want {
        tracing::warn!(
            "smtp.max_connections = {want} needs about {need} open files but the limit is {soft} (hard limit {}); at most {fit} SMTP sessions will be served: raise LimitNOFILE= in the unit (or ulimit -n)",
            lim.maximum
                .map_or("unlimited".to_string(), |h| h.to_string())
        );
    }
    usize::try_from(fit.min(want)).unwrap_or(usize::MAX)
}

/// The config file is meant to be readable by every user (their `sendmail`
/// reads it): a secret written in it is then theirs too.
fn warn_if_secrets_are_public(config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = &config.source else { return };
    let readable = std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0);
    let keys = config.inline_secrets();
    if readable && !keys.is_empty() {
        tracing::warn!(
            "{} is readable by every user and holds a secret ({}): put it in a file only relayq reads (password_file, chmod 600, owned by relayq)",
            path.display(),
            keys.join(", ")
        );
    }
}

/// New mail gets `452 4.3.1` below `min_free_space`: say so at start
/// rather than leave the first refusal to explain it.
fn warn_if_short_of_space(config: &Config, spool: &Spool) {
    let min = config.smtp.min_free_space.0;
    if let Ok(free) = spool.free_space()
        && free < min
    {
        tracing::warn!(
            "spool {} has only {} free, less than smtp.min_free_space ({}): new mail is refused with 452 4.3.1 until space is freed",
            config.spool_dir.display(),
            crate::cli::check::human_bytes(free),
            crate::cli::check::human_bytes(min)
        );
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from the moment this is created.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[derive(Debug, PartialEq, Eq)]
enum Wake {
    Stop,
    Reload,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn wait(&mut self) -> Wake {
        tokio::select! {
            _ = self.term.recv() => Wake::Stop,
            _ = self.int.recv() => Wake::Stop,
            _ = self.hup.recv() => Wake::Reload,
        }
    }
}

/// A multi-line parser message (TOML shows the offending line with a
/// caret under it) as one log line that still names the line and key.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.chars().all(|c| matches!(c, '|' | '^' | ' ')))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a config reload (SIGHUP) replaces: the context new SMTP sessions
/// get, and the context (transport, relays, routes, limits) delivery
/// workers take up for their next message. Sessions and deliveries in
/// flight finish with the old ones; queued mail stays where it is.
struct Live {
    config: Arc<Config>,
    spool: Spool,
    clock: Clock,
    scheduler: crate::delivery::SchedulerHandle,
    server: watch::Sender<Arc<ServerContext>>,
    workers: watch::Sender<Arc<WorkerContext>>,
    router: Option<Arc<Router>>,
    upkeep_stop: watch::Sender<bool>,
    limits_file: std::path::PathBuf,
    worker_count: usize,
}

impl Live {
    /// Re-reads the config file. An invalid file changes nothing. Returns
    /// the new router's upkeep task when the relays were rebuilt.
    async fn reload(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let Some(path) = self.config.source.clone() else {
            tracing::warn!(
                "SIGHUP: no config file to reload (development default); nothing changed"
            );
            return None;
        };
        let new = match Config::load(&path) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(
                    "reload failed, the running configuration stays: {}",
                    one_line(&e.to_string())
                );
                return None;
            }
        };
        for (key, changed) in [
            ("spool_dir", new.spool_dir != self.config.spool_dir),
            ("smtp.listen", new.smtp.listen != self.config.smtp.listen),
            (
                "smtp.max_connections",
                new.smtp.max_connections != self.config.smtp.max_connections,
            ),
            (
                "status_listen",
                new.status_listen != self.config.status_listen,
            ),
            ("log_format", new.log_format != self.config.log_format),
            ("log_to", new.log_to != self.config.log_to),
            (
                "syslog_socket",
                new.syslog_socket != self.config.syslog_socket,
            ),
            (
                "syslog_facility",
                new.syslog_facility != self.config.syslog_facility,
            ),
            (
                "transport",
                new.transport_kind() != self.config.transport_kind(),
            ),
        ] {
            if changed {
                tracing::warn!(
                    "reload: {key} changed in {}; it takes effect at the next restart",
                    path.display()
                );
            }
        }
        if new.transport_kind() != self.config.transport_kind() {
            tracing::error!(
                "reload failed, the running configuration stays: switching between relay and capture needs a restart"
            );
            return None;
        }
        let current = self.server.borrow().clone();
        let server = match current.reload(new.clone()) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!("reload failed, the running configuration stays: {e:#}");
                return None;
            }
        };
        if self.router.is_none()
            && let Err(e) = crate::transport::Sender::new(&new)
        {
            tracing::error!("reload failed, the running configuration stays: {e:#}");
            return None;
        }
        let mut upkeep = None;
        let router = match &self.router {
            None => None,
            Some(old) => {
                let router =
                    match Router::new(&new, self.clock.clone(), Some(self.scheduler.clone())) {
                        Ok(r) => Arc::new(r),
                        Err(e) => {
                            tracing::error!("reload failed, the running configuration stays: {e}");
                            return None;
                        }
                    };
                // Limit counts carry over through the limits file.
                let (old, path) = (old.clone(), self.limits_file.clone());
                let _ = tokio::task::spawn_blocking(move || old.save_limits(&path)).await;
                router.load_limits(&self.limits_file);
                crate::routing::install(&router);
                if let Some(old) = &self.router {
                    old.retire();
                }
                let _ = self.upkeep_stop.send(true);
                let (stop, stopped) = watch::channel(false);
                self.upkeep_stop = stop;
                upkeep = Some(tokio::spawn(crate::routing::maintain(
                    router.clone(),
                    Some(self.limits_file.clone()),
                    stopped,
                )));
                let wanted: usize = new.relays.iter().map(|r| r.relay.connections()).sum();
                if wanted > self.worker_count {
                    tracing::warn!(
                        "reload: the relays now allow {wanted} connections but {} delivery workers run; restart relayq to use them all",
                        self.worker_count
                    );
                }
                Some(router)
            }
        };
        let workers = Arc::new(WorkerContext {
            config: new.clone(),
            spool: self.spool.clone(),
            clock: self.clock.clone(),
            scheduler: self.scheduler.clone(),
            router: router.clone(),
        });
        let _ = self.server.send(server);
        let _ = self.workers.send(workers);
        self.router = router;
        self.config = new;
        tracing::info!("reloaded {}", path.display());
        upkeep
    }
}
