//! The status endpoint (`status_listen`, off by default): `/metrics`
//! (Prometheus text), `/healthz`, `/status` (JSON) and `/` (an HTML page).
//!
//! # Security
//! There is no login: the listener is refused unless it is a loopback
//! address (here and in config validation), and requests must name a
//! loopback host (`127.0.0.1`, `[::1]` or `localhost`) in `Host:`, so a web
//! page in the operator's browser cannot read queued addresses through DNS
//! rebinding. The endpoint only reads: nothing here changes the queue. Every
//! value shown on the page is HTML-escaped (addresses and upstream replies
//! come from outside), and the page forbids scripts by CSP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::sync::watch;

use super::state::{self, QueueSnapshot, QueuedMessage, RecentAttempt};
use crate::clock::Clock;
use crate::config::Config;
use crate::spool::Spool;

/// Messages listed on the page and in `/status`, oldest first.
const LISTED: usize = 50;

/// What the handlers read.
pub struct StatusContext {
    pub config: Arc<Config>,
    pub spool: Spool,
    pub clock: Clock,
}

/// `/status` as JSON; the page renders the same data.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub hostname: String,
    pub version: &'static str,
    #[serde(serialize_with = "ser_time")]
    pub now: u64,
    pub queue: QueueSummary,
    pub relays: Vec<RelayReport>,
    /// Each configured relay as the router sees it: up, down since, paused
    /// by the circuit breaker until, connections, and each limit's use.
    pub routing: Vec<crate::routing::RelayState>,
    /// The oldest queued messages with their pending recipients and the
    /// reason of each one's last deferral.
    pub messages: Vec<QueuedMessage>,
    pub recent_deliveries: Vec<RecentAttempt>,
    pub recent_failures: Vec<RecentAttempt>,
    /// Queue-size samples of the last hour: (unix ms, messages).
    pub history: Vec<(u64, usize)>,
}

#[derive(Debug, Serialize)]
pub struct QueueSummary {
    pub messages: usize,
    pub held: usize,
    pub bytes: u64,
    pub oldest_age_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct RelayReport {
    pub relay: String,
    pub state: &'static str,
    #[serde(serialize_with = "ser_time")]
    pub since: u64,
    pub last_error: Option<String>,
    #[serde(serialize_with = "ser_opt_time")]
    pub last_error_at: Option<u64>,
}

/// Unix milliseconds as RFC 3339 text.
pub fn rfc3339(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_default()
}

pub fn ser_time<S: serde::Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*ms))
}

pub fn ser_opt_time<S: serde::Serializer>(ms: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&rfc3339(*ms)),
        None => s.serialize_none(),
    }
}

/// Binds `addr` (loopback only) and serves until shutdown. Also samples
/// the queue size every 30 seconds for the page's chart.
pub async fn serve(
    addr: SocketAddr,
    ctx: Arc<StatusContext>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    if !addr.ip().is_loopback() {
        anyhow::bail!("status_listen = {addr} is not a loopback address; use 127.0.0.1 or [::1]");
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on status_listen = {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(page))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(middleware::from_fn(loopback_host_only))
        .with_state(ctx.clone());
    let sampler = tokio::spawn(sample_queue(ctx));
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!("status endpoint stopped: {e}");
        }
        sampler.abort();
    });
    Ok((local, task))
}

async fn sample_queue(ctx: Arc<StatusContext>) {
    let mut tick = tokio::time::interval(Duration::from_secs(state::SAMPLE_EVERY_SECS));
    loop {
        tick.tick().await;
        if let Ok(snap) = snapshot(&ctx, 0).await {
            state::sample_queue(state::now_ms(), snap.queued + snap.held);
        }
    }
}

async fn snapshot(ctx: &Arc<StatusContext>, detail: usize) -> anyhow::Result<QueueSnapshot> {
    let spool = ctx.spool.clone();
    let now = ctx.clock.now_ms();
    Ok(tokio::task::spawn_blocking(move || state::snapshot(&spool, now, detail)).await??)
}

/// Gathers everything `/status` and `/` show.
pub async fn report(ctx: &Arc<StatusContext>) -> anyhow::Result<StatusReport> {
    let snap = snapshot(ctx, LISTED).await?;
    let now = state::now_ms();
    let (recent_deliveries, recent_failures) = state::recent();
    let routing = match crate::routing::current() {
        Some(router) => {
            // Fleet-wide counts come from Redis: fetch fresh ones.
            router.refresh().await;
            router.relay_states()
        }
        None => Vec::new(),
    };
    let mut history = state::history(now);
    history.push((now, snap.queued + snap.held));
    Ok(StatusReport {
        hostname: ctx.config.hostname.clone(),
        version: env!("CARGO_PKG_VERSION"),
        now,
        queue: QueueSummary {
            messages: snap.queued,
            held: snap.held,
            bytes: snap.bytes,
            oldest_age_seconds: snap.oldest_age_seconds,
        },
        relays: state::relays()
            .into_iter()
            .map(|(relay, s)| RelayReport {
                relay,
                state: s.state,
                since: s.since_ms,
                last_error: s.last_error,
                last_error_at: s.last_error_ms,
            })
            .collect(),
        routing,
        messages: snap.messages,
        recent_deliveries,
        recent_failures,
        history,
    })
}

fn unavailable(e: anyhow::Error) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cannot read the spool: {e:#}\n"),
    )
        .into_response()
}

async fn page(State(ctx): State<Arc<StatusContext>>) -> Response {
    match report(&ctx).await {
        Ok(r) => (
            [
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            Html(super::page::render(&r)),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn status(State(ctx): State<Arc<StatusContext>>) -> Response {
    match report(&ctx).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn metrics(State(ctx): State<Arc<StatusContext>>) -> Response {
    match snapshot(&ctx, 0).await {
        Ok(snap) => super::metrics::set_queue(&snap),
        Err(e) => return unavailable(e),
    }
    super::metrics::set_relays(&crate::routing::relay_states());
    match super::metrics::render() {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response(),
    }
}

/// 200 while the spool can be read: the daemon is up and its disk is there.
async fn healthz(State(ctx): State<Arc<StatusContext>>) -> Response {
    match snapshot(&ctx, 0).await {
        Ok(_) => "ok\n".into_response(),
        Err(e) => unavailable(e),
    }
}

/// Refuses requests whose `Host:` is not a loopback name (DNS rebinding).
async fn loopback_host_only(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if is_loopback_host(host) {
        next.run(req).await
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "relayq's status endpoint answers only requests for 127.0.0.1, [::1] or localhost\n",
        )
            .into_response()
    }
}

fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in [
            "127.0.0.1:9325",
            "127.0.0.1",
            "[::1]:9325",
            "localhost:9325",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example:9325",
            "192.0.2.1:9325",
            "127.0.0.1.evil.example",
            "[::2]:80",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_400), "2023-11-14T22:13:20Z");
    }
}
