//! The falling-rate signal of adaptive concurrency against a real relayq:
//! a relay that delivers less in total at more connections gets fewer
//! ("rate"), and one that only takes long to let a connection in does not
//! (a connection's time counts from when it is ready: `Lease::set_up`).
//! The controller's arithmetic, step by step with an injected clock, is
//! unit-tested in `src/routing/concurrency.rs`; these check that the
//! daemon feeds it what happens on the wire.

use std::time::Duration;

use crate::concurrency::{config, cut_for, relay_state};
use crate::pipelining::{arrived_intact, body};
use crate::support::client::{dot_stuff, queue_id, send_mail};
use crate::support::daemon::Daemon;
use crate::support::upstream::{FakeUpstream, Script};

const WAIT: Duration = Duration::from_secs(60);

/// What a cut for a falling rate says in the log.
const RATE_CUT: &str = ": the delivery rate per connection fell from ";

/// Submits message `i` ([`body`]); its queue id.
pub(crate) async fn submit(d: &Daemon, i: usize) -> String {
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["bob@example.net"],
        &dot_stuff(&body(i)),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    queue_id(&r)
}

/// Submits messages `range` from sixteen clients at once, faster than
/// one connection upstream delivers them: a backlog. Their queue ids.
async fn burst(d: &Daemon, range: std::ops::Range<usize>) -> Vec<String> {
    let addr = d.addr;
    let clients: Vec<_> = (0..16)
        .map(|k| {
            let mine: Vec<usize> = range.clone().filter(|i| i % 16 == k).collect();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in mine {
                    let r = send_mail(
                        addr,
                        "app@example.com",
                        &["bob@example.net"],
                        &dot_stuff(&body(i)),
                    )
                    .await;
                    assert!(r.starts_with("250"), "{r}");
                    ids.push(queue_id(&r));
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for c in clients {
        ids.extend(c.await.expect("a client"));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_login_on_each_new_connection_is_not_a_falling_rate() {
    // A provider slow to let a connection in (750 ms before its greeting
    // and again before its EHLO reply: its DNS, reputation and login
    // checks) but quick with mail (20 ms a reply), and one message per
    // connection, so every message opens one. First one message at a time
    // with quick logins, so the rate of one connection is known; then the
    // logins turn slow and a burst goes out on four connections. Counted
    // from when each connection is ready, four deliver four times what
    // one did; counted from the connect, each took a second and a half
    // more per message and the total fell to a third: a cut ("rate").
    let quick = Script::default().reply_delay(Duration::from_millis(20));
    let up = FakeUpstream::start_with(quick.clone()).await;
    let d = Daemon::start(&config(
        up.port(),
        "max_connections = 4\nmax_messages_per_connection = 1",
    ));
    let mut ids = Vec::new();
    for i in 0..10 {
        let id = submit(&d, i).await;
        d.wait_log(&format!("{id}: removed"), WAIT);
        ids.push(id);
    }
    up.set_script(quick.setup_delay(Duration::from_millis(750)));
    let mark = d.log_mark();
    for i in 10..42 {
        ids.push(submit(&d, i).await);
    }
    arrived_intact(&d, &up, &ids);
    let after = d.log()[mark..].to_string();
    assert!(
        !after.contains(RATE_CUT),
        "a new connection's login was taken for a slow delivery:\n{after}"
    );
    assert_eq!(up.connections(), ids.len(), "one connection per message");
    assert_eq!(up.peak_sessions(), 4, "the burst went out on four");
    assert!(!after.contains("status=deferred"), "{after}");
    let v = relay_state(&d);
    assert_eq!(v["concurrency"], 4, "{v}");
    assert_ne!(v["concurrency_change"]["reason"], "rate", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_delivers_less_at_more_connections_gets_fewer() {
    // Each message's reply waits 20 ms times the square of the connections
    // open: one connection delivers about 40 a second, four about 12 in
    // total, two about 25. Mail trickles first, one message at a time, so
    // the rate of one connection is known; then a burst: relayq starts it
    // on four, the total falls to a third for as long as they stay, and
    // the concurrency is cut for the rate. Nothing is lost.
    let up = FakeUpstream::start_with(Script::default().crowding(Duration::from_millis(20))).await;
    let d = Daemon::start(&config(up.port(), "max_connections = 8"));
    let mut ids = Vec::new();
    for i in 0..10 {
        let id = submit(&d, i).await;
        d.wait_log(&format!("{id}: removed"), WAIT);
        ids.push(id);
    }
    let mark = d.log_mark();
    ids.extend(burst(&d, 10..90).await);
    let cut = rate_cut_losing_nothing(&d, &up, &ids, mark);
    // Measured against the one connection of the trickle.
    assert!(cut.contains(" at 1 connections to "), "{cut}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_a_relay_that_delivers_less_at_more_connections_gets_fewer() {
    // The same relay, with no light traffic before: the burst starts on
    // four connections, which slow start measures (8 rounds) before it
    // opens more, so the fall at the next level shows: a cut for the
    // rate, measured against the four, and nothing lost.
    let up = FakeUpstream::start_with(Script::default().crowding(Duration::from_millis(20))).await;
    let d = Daemon::start(&config(up.port(), "max_connections = 8"));
    let mark = d.log_mark();
    let ids = burst(&d, 0..120).await;
    let cut = rate_cut_losing_nothing(&d, &up, &ids, mark);
    assert!(cut.contains(" at 4 connections to "), "{cut}");
}

/// Waits for a cut for the rate after `mark`, checks that every message
/// in `ids` arrived intact and none was deferred or bounced, and that the
/// cut lowered the concurrency: its log line.
fn rate_cut_losing_nothing(d: &Daemon, up: &FakeUpstream, ids: &[String], mark: usize) -> String {
    d.wait_log_since(mark, RATE_CUT, WAIT);
    arrived_intact(d, up, ids);
    let after = d.log()[mark..].to_string();
    assert!(!after.contains("status=deferred"), "{after}");
    assert!(!after.contains("status=bounced"), "{after}");
    let (cut, from, to) = cut_for(&after, RATE_CUT);
    eprintln!("{cut}");
    assert!(to < from && to >= 1, "{cut}");
    cut
}
