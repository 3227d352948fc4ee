//! The inbound listener: accepts connections on every configured address,
//! admits them through the session table ([`super::sessions`]: limits per
//! address, stress, the idlest session making room), and drains on
//! shutdown. What a remote client can make relayq log about itself is
//! budgeted ([`client_line`]).
//!
//! Shutdown (SIGTERM/SIGINT) flips a watch channel: idle sessions answer
//! `421` and close, sessions inside DATA finish their message, and
//! connections that arrive while draining get `421` instead of a refusal,
//! so a client retries rather than reporting an error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::auth::Verifier;
use super::auth_budget::AuthFailures;
use super::session::Session;
use super::sessions::{Refusal, Sessions};
use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::SchedulerHandle;
use crate::spool::Spool;

/// What every session shares.
pub struct ServerContext {
    pub config: Arc<Config>,
    pub spool: Spool,
    pub clock: Clock,
    pub scheduler: SchedulerHandle,
    /// Inbound STARTTLS, when a certificate is configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Inbound AUTH users, when a users file is configured.
    pub users: Option<super::auth::Users>,
    /// The AUTH failure tables and the password checker: kept across
    /// reloads ([`ServerContext::reload`]).
    pub defenses: Arc<Defenses>,
}

/// Lines one remote client (an address; IPv6: its /64) can make relayq log
/// per minute about itself: refused connections, protocol abuse, failed
/// logins. A flood of connections must not become a flood of log lines.
pub const CLIENT_LINES: u32 = 20;

/// Whether a line about `ip` may be logged now; `Some(note)` says so, the
/// note telling how many were left out before (append it to the line).
pub fn client_line(ip: std::net::IpAddr) -> Option<String> {
    use crate::observe::quiet::{LogBudget, Verdict, note};
    static BUDGET: std::sync::OnceLock<LogBudget<std::net::IpAddr>> = std::sync::OnceLock::new();
    let budget = BUDGET.get_or_init(|| LogBudget::new(CLIENT_LINES, Duration::from_secs(60)));
    match budget.check(&super::auth_budget::client_key(ip)) {
        Verdict::Log { suppressed } => Some(note(suppressed, "minute")),
        Verdict::Quiet => None,
    }
}

/// What outlives a config reload: counts of failed logins, and the bound
/// on password checks running at once.
#[derive(Default)]
pub struct Defenses {
    pub auth_failures: AuthFailures,
    pub verifier: Verifier,
}

impl ServerContext {
    /// Tells the scheduler about a freshly queued message, so it is tried
    /// at once rather than on the next scan.
    pub fn queued(&self, id: &str) {
        self.scheduler.queued(id);
    }

    /// Builds the context, loading the TLS certificate and users file the
    /// config names (errors name the file).
    pub fn new(
        config: Arc<Config>,
        spool: Spool,
        clock: Clock,
        scheduler: SchedulerHandle,
    ) -> anyhow::Result<Self> {
        let tls = match (&config.smtp.tls_cert, &config.smtp.tls_key) {
            (Some(cert), Some(key)) => Some(super::tls::acceptor(cert, key)?),
            _ => None,
        };
        let users = match &config.smtp.auth_users_file {
            Some(path) => Some(super::auth::Users::load(path)?),
            None => None,
        };
        Ok(ServerContext {
            config,
            spool,
            clock,
            scheduler,
            tls,
            users,
            defenses: Arc::default(),
        })
    }

    /// The context for a reloaded config: new settings, certificate and
    /// users, the same failure counts and password checker.
    pub fn reload(&self, config: Arc<Config>) -> anyhow::Result<Self> {
        let mut ctx = ServerContext::new(
            config,
            self.spool.clone(),
            self.clock.clone(),
            self.scheduler.clone(),
        )?;
        ctx.defenses = self.defenses.clone();
        Ok(ctx)
    }

    /// Whether a client address may relay without AUTH. An IPv4 client on a
    /// dual-stack listener (`::ffff:a.b.c.d`) is judged as its IPv4 address.
    pub fn trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config
            .smtp
            .allow_networks
            .iter()
            .any(|n| n.contains(&ip))
    }
}

pub struct Server {
    listeners: Vec<TcpListener>,
    /// Sessions at once: `max_connections`, or fewer if open files are
    /// short (see `cli::serve`).
    max_sessions: Option<usize>,
    /// The context for new sessions; replaced on a config reload (SIGHUP),
    /// while running sessions keep the one they started with.
    ctx: watch::Receiver<Arc<ServerContext>>,
}

impl Server {
    /// Binds every listen address; fails if any cannot be bound.
    pub async fn bind(ctx: watch::Receiver<Arc<ServerContext>>) -> anyhow::Result<Server> {
        let current = ctx.borrow().clone();
        let mut listeners = Vec::new();
        for addr in &current.config.smtp.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            listeners.push(l);
        }
        Ok(Server {
            listeners,
            max_sessions: None,
            ctx,
        })
    }

    /// Serves at most `max` sessions at once, below `max_connections`.
    pub fn limit_sessions(&mut self, max: usize) {
        self.max_sessions = Some(max);
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` becomes true, then waits up to `grace` for
    /// open sessions to finish.
    pub async fn run(self, shutdown: watch::Receiver<bool>, grace: Duration) {
        // The total limit is fixed at start (changing it needs a restart).
        let configured = self.ctx.borrow().config.smtp.max_connections;
        let max = self.max_sessions.unwrap_or(configured).min(configured);
        let table = Sessions::new(max);
        let mut sessions = JoinSet::new();
        let mut acceptors = JoinSet::new();
        for listener in self.listeners {
            let ctx = self.ctx.clone();
            let shutdown = shutdown.clone();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            acceptors.spawn(accept_loop(listener, ctx, table.clone(), shutdown, tx));
            sessions.spawn(async move {
                let mut inner = JoinSet::new();
                // Finished sessions are reaped as they end: each keeps its
                // task's memory (a few KB) until joined, and thousands may
                // end at once after a flood.
                loop {
                    tokio::select! {
                        fut = rx.recv() => match fut {
                            Some(fut) => {
                                inner.spawn(fut);
                            }
                            None => break,
                        },
                        Some(_) = inner.join_next(), if !inner.is_empty() => {}
                    }
                }
                while inner.join_next().await.is_some() {}
            });
        }
        let mut down = shutdown.clone();
        crate::delivery::scheduler::stopped(&mut down).await;
        // Draining: acceptors keep answering 421 until the sessions end.
        let drained = async { while sessions.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                "shutdown: some SMTP sessions did not finish within {grace:?}; closing them"
            );
        }
        acceptors.abort_all();
    }
}

type SessionFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

async fn accept_loop(
    listener: TcpListener,
    contexts: watch::Receiver<Arc<ServerContext>>,
    table: Arc<Sessions>,
    shutdown: watch::Receiver<bool>,
    spawn: tokio::sync::mpsc::UnboundedSender<SessionFuture>,
) {
    let mut spawn = Some(spawn);
    let mut down = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = crate::delivery::scheduler::stopped(&mut down), if spawn.is_some() => {
                // Dropping the sender lets the server's drain finish once
                // the running sessions have.
                spawn = None;
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = contexts.borrow().clone();
        let host = ctx.config.hostname.clone();
        let Some(tx) = spawn.as_ref() else {
            tokio::spawn(refuse(
                stream,
                format!("421 4.3.2 {host} Service shutting down"),
            ));
            continue;
        };
        let ip = peer.ip().to_canonical();
        let trusted = ctx.trusted(ip);
        let now = ctx.clock.now_ms();
        if !trusted && let Some(locked) = ctx.defenses.auth_failures.locked(ip, None, now) {
            tracing::debug!(%peer, "refused: AUTH locked ({locked:?})");
            tokio::spawn(refuse(
                stream,
                format!(
                    "421 4.7.0 {host} Error: too many failed authentications from {ip}; try again later"
                ),
            ));
            continue;
        }
        // Trusted networks (loopback by default, where the app connects
        // from) are never refused for their address alone: see sessions.
        let presence = match table.admit(ip, trusted, ctx.config.smtp.max_connections_per_ip) {
            Ok(p) => p,
            Err(refusal) => {
                let (why, reply) = match refusal {
                    Refusal::Full => (
                        "too many connections",
                        format!("421 4.7.0 {host} Error: too many connections"),
                    ),
                    Refusal::PerAddress => (
                        "too many connections from this address",
                        format!("421 4.7.0 {host} Error: too many connections from {ip}"),
                    ),
                };
                if let Some(note) = client_line(ip) {
                    tracing::warn!("refusing {peer}: {why}{note}");
                }
                tokio::spawn(refuse(stream, reply));
                continue;
            }
        };
        let session =
            Session::new(stream, peer, ctx.clone(), shutdown.clone()).with_presence(presence);
        tracing::debug!(%peer, "connect");
        let _ = tx.send(Box::pin(session.run()));
    }
}

async fn refuse(mut stream: TcpStream, reply: String) {
    let line = format!("{reply}\r\n");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(line.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
