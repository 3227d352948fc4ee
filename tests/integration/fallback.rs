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
//! behind each other (with a BDAT window of 8: 6 of 80 followed, against
//! 58 of 80 without the fallback). The same for another route's primary
//! that gets none of a burst: the one worker looking for its mail took the
//! busy relay's and parked it (with the window of 3: 15 of 80 followed,
//! against 34 for a lone relay); handed to the busy relay's connections
//! instead, it rides their streams (34 of 80).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

use crate::pipelining::{arrived_once, body, index, queue_then_flow_with};
use crate::support::client::{dot_stuff, queue_id, send_mail};
use crate::support::daemon::Daemon;
use crate::support::upstream::{FakeUpstream, Script};

/// A named relay, adaptive, up to 8 connections.
fn relay(name: &str, addr: SocketAddr, extra: &str) -> String {
    format!(
        "[relay.{name}]\nhost = \"{}\"\nport = {}\ntls = \"none\"\nconnect_timeout = \"5s\"\nidle_timeout = \"60s\"\nmax_connections = 8\n{extra}\n",
        addr.ip(),
        addr.port()
    )
}

/// The primary (at `primary`) with `fallback` as its route's fallback.
/// The primary's outage while the test queues its mail stays shorter than
/// `failover_after`, unless `failover_after` is short.
fn config(primary: SocketAddr, fallback: SocketAddr, failover_after: &str) -> String {
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

/// The fake upstream's `n` messages were sent as message after message
/// on each connection: at least one in `part` had the next message's
/// commands behind its end of data. Returns the messages carried per
/// connection.
fn streamed(who: &str, up: &FakeUpstream, n: usize, part: usize) -> BTreeMap<usize, usize> {
    let got = up.messages();
    let mut per_conn = BTreeMap::new();
    for m in &got {
        *per_conn.entry(m.conn).or_default() += 1;
    }
    let followed = got.iter().filter(|m| m.followed).count();
    eprintln!("{who}: {followed} of {n} with the next one behind; per connection {per_conn:?}");
    assert!(
        followed * part >= n,
        "{who}: only {followed} of {n} messages had the next one behind them (per connection {per_conn:?})"
    );
    per_conn
}

/// An upstream to stream to, each reply 10 ms late (so connections are
/// busy while the queue is full), and the part of the messages that at
/// least must have the next one behind them.
struct Upstream {
    script: Script,
    part: usize,
}

/// CHUNKING: a lone relay (nothing else configured) has about 34 of 80
/// messages with the next one behind (the window of 3 is full for the
/// rest); a connection that gave its mail up to parked messages carries
/// one at a time (15 of 80).
fn bdat() -> Upstream {
    Upstream {
        script: Script::default()
            .chunking()
            .reply_delay(Duration::from_millis(10)),
        part: 3,
    }
}

/// PIPELINING only: about 50 of 60 alone, 27 of 60 cut by parking.
fn data() -> Upstream {
    Upstream {
        script: Script::default().reply_delay(Duration::from_millis(10)),
        part: 2,
    }
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

/// A burst of `n` for a healthy relay like `up`, with other relays
/// configured that get none of it: everything goes to that relay, streamed
/// as with no others, and the others see nothing, not even a connection.
/// `config` gets the busy relay's address and the idle ones'.
async fn idle_relays_cost_nothing(
    n: usize,
    up: Upstream,
    idle: usize,
    config: impl Fn(SocketAddr, &[SocketAddr]) -> String,
    sender: impl Fn(usize) -> &'static str,
) {
    let mut others = Vec::new();
    for _ in 0..idle {
        others.push(FakeUpstream::start_with(up.script.clone()).await);
    }
    let addrs: Vec<SocketAddr> = others.iter().map(FakeUpstream::addr).collect();
    let (d, primary, ids, mark) = queue_then_flow_with(
        |addr| config(addr, &addrs),
        n,
        up.script,
        sender,
        |_| vec!["bob@example.net"],
    )
    .await;
    byte_for_byte(&d, &primary, &ids);
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=deferred"), "{after}");
    for (i, other) in others.iter().enumerate() {
        assert!(
            other.messages().is_empty() && other.connections() == 0,
            "idle relay {i} was used: {} messages on {} connections",
            other.messages().len(),
            other.connections()
        );
    }
    let per_conn = streamed("busy relay", &primary, n, up.part);
    assert!(
        per_conn.len() <= 8 && per_conn.values().all(|&k| k >= 2),
        "connections carrying one message each: {per_conn:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fallback_takes_no_share_of_a_bdat_stream() {
    idle_relays_cost_nothing(
        80,
        bdat(),
        1,
        |p, f| config(p, f[0], "10m"),
        |_| "app@example.com",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fallback_takes_no_share_of_data_pipelining() {
    idle_relays_cost_nothing(
        60,
        data(),
        1,
        |p, f| config(p, f[0], "10m"),
        |_| "app@example.com",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_fallbacks_shared_by_routes_take_no_share() {
    // Two routes share the primary and both fallbacks, in different
    // orders: mail from x.example goes to main, then a, then b; all other
    // mail to main, then b, then a. The burst is of both kinds; a and b
    // get none of it.
    idle_relays_cost_nothing(80, bdat(), 2, |main, idle| {
        format!(
            "hostname = \"relayq.test\"\n{}{}{}[[route]]\nsender_domain = \"x.example\"\nrelay = \"main\"\nfallback = [\"a\", \"b\"]\n[[route]]\nrelay = \"main\"\nfallback = [\"b\", \"a\"]\n",
            relay("main", main, "failover_after = \"10m\""),
            relay("a", idle[0], ""),
            relay("b", idle[1], ""),
        )
    }, |i| if i % 2 == 0 { "app@x.example" } else { "app@example.com" })
    .await;
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
    let up = bdat();
    let (d, second, ids, mark) = queue_then_flow_with(
        |fallback| config(primary, fallback, "1s"),
        n,
        up.script.clone(),
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
    streamed("fallback", &second, n, up.part);
    assert!(
        second.peak_sessions() <= 8,
        "{} connections at once, max_connections is 8",
        second.peak_sessions()
    );
}

/// Two routes by sender domain: a.example's mail to relay a, every other
/// message to relay b (each route's primary).
fn two_routes(a: SocketAddr, b: SocketAddr) -> String {
    format!(
        "hostname = \"relayq.test\"\n{}{}[[route]]\nsender_domain = \"a.example\"\nrelay = \"a\"\n[[route]]\nrelay = \"b\"\n",
        relay("a", a, ""),
        relay("b", b, ""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_routes_idle_primary_takes_no_share_of_a_bdat_stream() {
    // b is a primary too, but its route gets none of the burst: the one
    // worker that looks for b's mail meanwhile takes a's, finds a's
    // connections busy, and must not cut a's streams (see `bdat`).
    idle_relays_cost_nothing(
        80,
        bdat(),
        1,
        |a, b| two_routes(a, b[0]),
        |_| "app@a.example",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_routes_idle_primary_takes_no_share_of_data_pipelining() {
    idle_relays_cost_nothing(
        60,
        data(),
        1,
        |a, b| two_routes(a, b[0]),
        |_| "app@a.example",
    )
    .await;
}

/// A burst of `n` for relay a (like `up`), queued and flowing, with b
/// (like `up` too) the primary of the other route, idle.
async fn burst_for_a(
    n: usize,
    up: &Upstream,
) -> (Daemon, FakeUpstream, FakeUpstream, Vec<String>, usize) {
    let b = FakeUpstream::start_with(up.script.clone()).await;
    let (d, a, ids, mark) = queue_then_flow_with(
        |a| two_routes(a, b.addr()),
        n,
        up.script.clone(),
        |_| "app@a.example",
        |_| vec!["bob@example.net"],
    )
    .await;
    (d, a, b, ids, mark)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_for_the_idle_route_in_the_middle_of_a_burst_goes_out_once() {
    // A burst for a; once a has some of it, mail for b comes in. Both
    // drain, each message once, byte for byte, each at its own relay.
    let (n, up) = (120, bdat());
    let (d, a, b, ids, mark) = burst_for_a(n, &up).await;
    a.wait_for_messages(10, WAIT).await;
    let mut for_b = Vec::new();
    for i in 0..5 {
        let r = send_mail(
            d.addr,
            "app@b.example",
            &["carol@example.org"],
            &dot_stuff(&body(n + i)),
        )
        .await;
        assert!(r.starts_with("250"), "{r}");
        for_b.push(queue_id(&r));
    }
    b.wait_for_messages(5, WAIT).await;
    eprintln!("b's 5 arrived when a had {} of {n}", a.messages().len());
    byte_for_byte(&d, &a, &ids);
    for id in &for_b {
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    let got_b = b.messages();
    let mut seen: Vec<usize> = got_b.iter().map(index).collect();
    seen.sort();
    assert_eq!(seen, (n..n + 5).collect::<Vec<_>>(), "b's mail once each");
    for m in &got_b {
        let i = index(m);
        assert!(
            m.data.ends_with(&body(i)) && m.data.starts_with(b"Received: "),
            "message {i} changed in transit: {:?}",
            m.text()
        );
    }
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=deferred"), "{after}");
    assert!(!after.contains("status=bounced"), "{after}");
    assert_eq!(
        after.matches("status=sent").count(),
        n + 5,
        "each sent once: {after}"
    );
    streamed("a", &a, n, up.part);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_handed_over_to_a_relay_that_goes_down_is_neither_stranded_nor_lost() {
    // A burst for a, streamed, with b's route idle: its one worker hands
    // a's mail over to a's busy connections. Then every connection of a,
    // open or new, dies at its next MAIL (a goes down with mail handed
    // over to it); later a comes back and the queue is
    // flushed. Nothing is stranded (the queue drains), each message is
    // recorded sent once, arrives at least once, and twice only if relayq
    // logged that doubt.
    use crate::support::upstream::Stage;
    let (n, up) = (120, bdat());
    let (d, a, b, ids, mark) = burst_for_a(n, &up).await;
    a.wait_for_messages(15, WAIT).await;
    a.set_script(up.script.clone().drop_at(Stage::Mail));
    d.wait_log("status=deferred", WAIT);
    a.set_script(up.script.clone());
    d.flush();
    drained_once(&d, &a, &ids, mark);
    assert!(b.messages().is_empty());
}

/// Every message of the burst left the queue (none stranded), was
/// recorded sent once and bounced never, and arrived at `a` once, or
/// twice only if relayq logged that doubt.
fn drained_once(d: &Daemon, a: &FakeUpstream, ids: &[String], mark: usize) {
    let n = ids.len();
    for id in ids {
        d.wait_log(&format!("{id}: removed"), Duration::from_secs(90));
    }
    assert_eq!(d.queued(), 0, "nothing stranded");
    let after = d.log()[mark..].to_string();
    let mut arrived = vec![0usize; n];
    for m in a.messages() {
        arrived[index(&m)] += 1;
    }
    for (i, id) in ids.iter().enumerate() {
        let sent = after
            .lines()
            .filter(|l| l.contains(&format!("{id}: to=<")) && l.contains("status=sent"))
            .count();
        assert_eq!(sent, 1, "message {i} recorded sent {sent} times:\n{after}");
        let doubted = after
            .lines()
            .any(|l| l.contains(&format!("{id}: relay=")) && l.contains("may arrive twice"));
        match arrived[i] {
            1 => {}
            2 if doubted => {}
            got => panic!("message {i} arrived {got} times (in doubt: {doubted}):\n{after}"),
        }
    }
    assert!(!after.contains("status=bounced"), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_handed_over_across_reloads_is_neither_stranded_nor_lost() {
    // Reloads (SIGHUP) in the middle of a burst for a while b's route is
    // idle: each one leaves the old relays' pools, with any mail handed
    // over to them, behind. All of it still goes, once.
    let (n, up) = (120, bdat());
    let (d, a, b, ids, mark) = burst_for_a(n, &up).await;
    let pid = d.pid().expect("daemon running") as i32;
    for (i, at) in [10, 40, 70].into_iter().enumerate() {
        a.wait_for_messages(at, WAIT).await;
        let text = std::fs::read_to_string(&d.config).unwrap();
        std::fs::write(&d.config, format!("{text}\n# reload {i}\n")).unwrap();
        let since = d.log().len();
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        d.wait_log_since(since, "reloaded ", WAIT);
    }
    drained_once(&d, &a, &ids, mark);
    assert!(b.messages().is_empty());
}
