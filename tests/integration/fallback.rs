//! A route's fallback and the adaptive concurrency: a fallback that gets no
//! mail (its primary is healthy) costs nothing. It opens no connection and
//! takes no share of the delivery workers, so the primary streams message
//! after message on its connections exactly as it does with no fallback
//! configured. When the primary refuses connections, the fallback takes
//! the mail with its own concurrency, streams it the same way, and every
//! message arrives once. (Which relays count, as outages move mail, is
//! unit-tested with an injected clock in `src/routing/router.rs`.)
//!
//! Streaming is counted at the fake upstream, per message: did the next
//! message's commands arrive behind its end of data (`followed`)? Before
//! the fallback was counted only when it gets mail, the workers holding its
//! share took the primary's mail, found its connections busy and parked
//! it; the primary then looked contended and stopped sending messages
//! behind each other (6 of 80 followed, against 58 of 80 without the
//! fallback).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::pipelining::{arrived_once, body, queue_then_flow_with};
use crate::support::daemon::Daemon;
use crate::support::upstream::{FakeUpstream, Received, Script};

/// The primary (at `primary`) with `fallback` as its route's fallback;
/// both adaptive. The primary's outage while the test queues its mail
/// stays shorter than `failover_after`, unless `failover_after` is short.
fn config(primary: SocketAddr, fallback: SocketAddr, failover_after: &str) -> String {
    let relay = |name: &str, addr: SocketAddr, extra: &str| {
        format!(
            "[relay.{name}]\nhost = \"{}\"\nport = {}\ntls = \"none\"\nconnect_timeout = \"5s\"\nidle_timeout = \"60s\"\nmax_connections = 8\n{extra}\n",
            addr.ip(),
            addr.port()
        )
    };
    format!(
        "hostname = \"relayq.test\"\n{}{}[[route]]\nrelay = \"primary\"\nfallback = [\"second\"]\n",
        relay(
            "primary",
            primary,
            &format!("failover_after = \"{failover_after}\"")
        ),
        relay("second", fallback, ""),
    )
}

/// Messages carried per connection, and how many had the next message's
/// commands behind their end of data.
fn streaming(got: &[Received]) -> (BTreeMap<usize, usize>, usize) {
    let mut per_conn = BTreeMap::new();
    for m in got {
        *per_conn.entry(m.conn).or_default() += 1;
    }
    (per_conn, got.iter().filter(|m| m.followed).count())
}

/// Each message arrived once, byte for byte (what the client wrote, after
/// relayq's own headers).
fn byte_for_byte(d: &Daemon, up: &FakeUpstream, ids: &[String]) {
    let by_index = arrived_once(d, up, ids);
    for (i, m) in &by_index {
        assert!(
            m.data.ends_with(&body(*i)) && m.data.starts_with(b"Received: "),
            "message {i} changed in transit: {:?}",
            m.text()
        );
    }
    assert_eq!(d.queued(), 0, "nothing left queued");
}

/// A burst of `n` for a healthy primary speaking `script`, with an idle
/// fallback configured: everything goes to the primary, streamed as
/// without the fallback, and the fallback sees nothing, not even a
/// connection.
async fn idle_fallback_costs_nothing(n: usize, script: Script) {
    let second = FakeUpstream::start_with(script.clone()).await;
    let fallback = second.addr();
    let (d, primary, ids, mark) = queue_then_flow_with(
        |addr| config(addr, fallback, "10m"),
        n,
        script,
        |_| "app@example.com",
        |_| vec!["bob@example.net"],
    )
    .await;
    byte_for_byte(&d, &primary, &ids);
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=deferred"), "{after}");
    assert!(
        second.messages().is_empty() && second.connections() == 0,
        "the fallback of a healthy primary was used: {} messages on {} connections",
        second.messages().len(),
        second.connections()
    );
    let (per_conn, followed) = streaming(&primary.messages());
    eprintln!("primary: {followed} of {n} with the next one behind; per connection {per_conn:?}");
    // Without a fallback nearly every message but each connection's last
    // has the next one behind it; a connection that gave its mail up to
    // parked messages carries one at a time.
    assert!(
        followed * 2 >= n,
        "only {followed} of {n} messages had the next one behind them (per connection {per_conn:?})"
    );
    assert!(
        per_conn.len() <= 8 && per_conn.values().all(|&k| k >= 2),
        "connections carrying one message each: {per_conn:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fallback_takes_no_share_of_a_bdat_stream() {
    let script = Script::default()
        .chunking()
        .reply_delay(Duration::from_millis(10));
    idle_fallback_costs_nothing(80, script).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fallback_takes_no_share_of_data_pipelining() {
    let script = Script::default().reply_delay(Duration::from_millis(10));
    idle_fallback_costs_nothing(60, script).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_refusing_connections_drains_to_the_fallback_once_each() {
    // The primary's port is closed for good. Past failover_after its mail
    // goes to the fallback, which then gets its own concurrency (and the
    // primary's share no longer counts: its workers would only park the
    // fallback's mail), streams, and delivers every message once.
    let n = 120;
    let closed = FakeUpstream::start().await;
    let primary = closed.addr();
    closed.stop().await;
    let script = Script::default()
        .chunking()
        .reply_delay(Duration::from_millis(10));
    let (d, second, ids, mark) = queue_then_flow_with(
        |fallback| config(primary, fallback, "1s"),
        n,
        script,
        |_| "app@example.com",
        |_| vec!["bob@example.net"],
    )
    .await;
    byte_for_byte(&d, &second, &ids);
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=bounced"), "{after}");
    assert_eq!(
        after.matches("status=sent").count(),
        n,
        "each sent once: {after}"
    );
    assert!(
        after.contains(&format!("relay=second[127.0.0.1]:{}", second.port())),
        "{after}"
    );
    let (per_conn, followed) = streaming(&second.messages());
    eprintln!(
        "fallback: {followed} of {n} with the next one behind; per connection {per_conn:?}; at most {} at once",
        second.peak_sessions()
    );
    assert!(
        followed * 2 >= n,
        "only {followed} of {n} messages had the next one behind them (per connection {per_conn:?})"
    );
    assert!(
        second.peak_sessions() <= 8,
        "{} connections at once, max_connections is 8",
        second.peak_sessions()
    );
}
