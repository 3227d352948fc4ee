//! The inbound listener: accepts connections on every configured address,
//! enforces the connection limit, and drains on shutdown.
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
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::session::Session;
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
        })
    }
}

/// Open sessions per client address, for `max_connections_per_ip`.
type PerIp = crate::anvil::Anvil<std::net::IpAddr>;

pub struct Server {
    listeners: Vec<TcpListener>,
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
        Ok(Server { listeners, ctx })
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
        let max = self.ctx.borrow().config.smtp.max_connections;
        let limit = Arc::new(Semaphore::new(max));
        let per_ip = Arc::new(PerIp::default());
        let mut sessions = JoinSet::new();
        let mut acceptors = JoinSet::new();
        for listener in self.listeners {
            let ctx = self.ctx.clone();
            let limit = limit.clone();
            let shutdown = shutdown.clone();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            acceptors.spawn(accept_loop(
                listener,
                ctx,
                limit,
                per_ip.clone(),
                shutdown,
                tx,
            ));
            sessions.spawn(async move {
                let mut inner = JoinSet::new();
                while let Some(fut) = rx.recv().await {
                    inner.spawn(fut);
                    while inner.try_join_next().is_some() {}
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
    limit: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!("refusing {peer}: too many connections");
            tokio::spawn(refuse(
                stream,
                format!("421 4.7.0 {host} Error: too many connections"),
            ));
            continue;
        };
        // Trusted networks are exempt (like Postfix's
        // smtpd_client_event_limit_exceptions = $mynetworks): by default
        // that is loopback, where the app itself connects from.
        let slot = if ctx
            .config
            .smtp
            .allow_networks
            .iter()
            .any(|n| n.contains(&peer.ip()))
        {
            None
        } else {
            match per_ip.take(
                peer.ip(),
                ctx.config.smtp.max_connections_per_ip,
                usize::MAX,
            ) {
                Some(slot) => Some(slot),
                None => {
                    tracing::warn!("refusing {peer}: too many connections from this address");
                    tokio::spawn(refuse(
                        stream,
                        format!(
                            "421 4.7.0 {host} Error: too many connections from {}",
                            peer.ip()
                        ),
                    ));
                    continue;
                }
            }
        };
        let session = Session::new(stream, peer, ctx.clone(), shutdown.clone());
        tracing::debug!(%peer, "connect");
        let _ = tx.send(Box::pin(async move {
            session.run().await;
            drop(permit);
            drop(slot);
        }));
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
