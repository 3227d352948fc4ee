//! Prometheus metrics, declared in one place.
//!
//! Counters and the latency histogram are updated by [`super::events`] as
//! things happen; the queue gauges are read from the spool when `/metrics`
//! is scraped (a directory listing, cheap next to a scrape interval), so
//! they are never stale. Without [`install`] (tests, the CLI) every update
//! is a no-op.

use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::state::QueueSnapshot;

pub const ACCEPTED: &str = "relayq_accepted_messages_total";
pub const REJECTED: &str = "relayq_rejected_total";
pub const DELIVERED: &str = "relayq_delivered_recipients_total";
pub const DEFERRED: &str = "relayq_deferred_recipients_total";
pub const BOUNCED: &str = "relayq_bounced_recipients_total";
pub const EXPIRED: &str = "relayq_expired_recipients_total";
pub const DELAY: &str = "relayq_delivery_delay_seconds";
pub const UPSTREAM_ERRORS: &str = "relayq_upstream_errors_total";
pub const RELAY_UP: &str = "relayq_relay_up";
pub const QUEUE_MESSAGES: &str = "relayq_queue_messages";
pub const QUEUE_OLDEST: &str = "relayq_queue_oldest_message_age_seconds";
pub const SPOOL_BYTES: &str = "relayq_spool_bytes";
pub const RELAY_CONNECTIONS: &str = "relayq_relay_connections";
pub const RELAY_CONCURRENCY: &str = "relayq_relay_concurrency";
pub const RELAY_MAX_CONNECTIONS: &str = "relayq_relay_max_connections";
pub const RELAY_CONCURRENCY_REASON: &str = "relayq_relay_concurrency_reason";

/// From a fast local relay to a five-day expiry.
const DELAY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
    432000.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder (once per process) and describes every
/// metric. `relays` are registered at zero so that a scrape shows them
/// before the first delivery.
pub fn install(relays: &[String]) -> anyhow::Result<()> {
    if HANDLE.get().is_none() {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(DELAY.to_string()), DELAY_BUCKETS)?
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder)
            .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
        let _ = HANDLE.set(handle);
    }
    describe_counter!(ACCEPTED, "Messages accepted into the queue");
    describe_counter!(
        REJECTED,
        "Messages and recipients refused, by reason (each also logs a NOQUEUE: reject: line)"
    );
    describe_counter!(
        DELIVERED,
        "Recipients the upstream accepted (2xx), by relay"
    );
    describe_counter!(
        DEFERRED,
        "Delivery attempts deferred (4xx or connection trouble), per recipient, by relay"
    );
    describe_counter!(
        BOUNCED,
        "Recipients failed for good and bounced (5xx or expired), by relay"
    );
    describe_counter!(
        EXPIRED,
        "Recipients bounced because they stayed undelivered past max_lifetime, by relay"
    );
    describe_histogram!(
        DELAY,
        metrics::Unit::Seconds,
        "Time from acceptance to delivery, per delivered recipient"
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Failed upstream connection attempts, by relay and kind (dns, connect, greeting, ehlo, starttls, tls, auth, ...)"
    );
    describe_gauge!(
        RELAY_UP,
        "1 when the last connection to the relay succeeded, 0 when it failed"
    );
    describe_gauge!(
        QUEUE_MESSAGES,
        "Messages in the queue, by area (queue = waiting for delivery, hold = held by an operator)"
    );
    describe_gauge!(
        QUEUE_OLDEST,
        metrics::Unit::Seconds,
        "Age of the oldest message waiting for delivery (0 when the queue is empty)"
    );
    describe_gauge!(
        SPOOL_BYTES,
        metrics::Unit::Bytes,
        "Bytes of queue files in the spool"
    );
    describe_gauge!(
        RELAY_CONNECTIONS,
        "Connections open to the relay now (busy or idle), by relay (host:port) and name"
    );
    describe_gauge!(
        RELAY_CONCURRENCY,
        "Connections the relay's concurrency allows now (adaptive, or fixed by concurrency = N)"
    );
    describe_gauge!(
        RELAY_MAX_CONNECTIONS,
        "The relay's max_connections: the most ever open at once"
    );
    describe_gauge!(
        RELAY_CONCURRENCY_REASON,
        "1 for the reason of the relay's last concurrency change (start, fixed, backlog, refused, failed, throttled, rate, idle), 0 for the others"
    );
    counter!(ACCEPTED).increment(0);
    for reason in super::events::Reason::ALL {
        counter!(REJECTED, "reason" => reason.as_str()).increment(0);
    }
    for relay in relays {
        for name in [DELIVERED, DEFERRED, BOUNCED, EXPIRED] {
            counter!(name, "relay" => relay.clone()).increment(0);
        }
    }
    Ok(())
}

/// Sets the queue gauges from a snapshot.
pub fn set_queue(snap: &QueueSnapshot) {
    gauge!(QUEUE_MESSAGES, "area" => "queue").set(snap.queued as f64);
    gauge!(QUEUE_MESSAGES, "area" => "hold").set(snap.held as f64);
    gauge!(QUEUE_OLDEST).set(snap.oldest_age_seconds.unwrap_or(0.0));
    gauge!(SPOOL_BYTES).set(snap.bytes as f64);
}

/// Sets the relay gauges from the router's snapshot.
pub fn set_relays(relays: &[crate::routing::RelayState]) {
    use crate::routing::concurrency::Reason;
    for r in relays {
        let labels = [("relay", r.endpoint.clone()), ("name", r.name.clone())];
        gauge!(RELAY_CONNECTIONS, &labels).set(r.connections as f64);
        gauge!(RELAY_CONCURRENCY, &labels).set(r.concurrency as f64);
        gauge!(RELAY_MAX_CONNECTIONS, &labels).set(r.max_connections as f64);
        let current = r.concurrency_change.as_ref().map(|c| c.reason);
        for reason in Reason::ALL {
            let mut with_reason = labels.to_vec();
            with_reason.push(("reason", reason.as_str().to_string()));
            let on = current == Some(reason);
            gauge!(RELAY_CONCURRENCY_REASON, &with_reason).set(if on { 1.0 } else { 0.0 });
        }
    }
}

/// The Prometheus text exposition, or `None` if [`install`] was not called.
pub fn render() -> Option<String> {
    let handle = HANDLE.get()?;
    handle.run_upkeep();
    Some(handle.render())
}
