//! Pipelining across messages: with mail queued while the upstream was
//! down, each message's envelope goes out behind the previous message's end
//! of data. Every message must still arrive exactly once, byte for byte, and
//! refusals of either message must be reported as they would be alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::client::{dot_stuff, queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::{FakeUpstream, Received, Script};

const WAIT: Duration = Duration::from_secs(30);

/// A message body with a unique subject and content that tests the DATA
/// encoding (leading dots, a line that is only a dot, 8-bit text).
pub(crate) fn body(i: usize) -> Vec<u8> {
    format!(
        "Subject: pipelined {i}\r\nFrom: app@example.com\r\n\r\nmessage {i}\r\n.\r\n..two\r\n.leading dot\r\nGr\u{fc}\u{df}e {i}\r\n{}\r\n",
        "x".repeat(i * 37 % 500)
    )
    .into_bytes()
}

/// The subject line, which identifies the message.
pub(crate) fn subject(m: &Received) -> String {
    m.text()
        .lines()
        .find(|l| l.starts_with("Subject: "))
        .unwrap_or("")
        .to_string()
}

/// The message number in a test message's subject.
pub(crate) fn index(m: &Received) -> usize {
    subject(m)["Subject: pipelined ".len()..]
        .parse()
        .unwrap_or_else(|_| panic!("not a test message: {}", m.text()))
}

/// Queues `n` messages (from `sender(i)` to `rcpts(i)`) while the upstream
/// is down, then brings it back with `script` and flushes the queue.
/// Returns the daemon, the upstream, the queue ids, and the daemon's log
/// mark from just before the flush.
pub(crate) async fn queue_then_flow(
    n: usize,
    relay_extra: &str,
    script: Script,
    sender: impl Fn(usize) -> &'static str,
    rcpts: impl Fn(usize) -> Vec<&'static str>,
) -> (Daemon, FakeUpstream, Vec<String>, usize) {
    // Appended to the [relay] section, which relay_config writes last.
    let config = |addr| format!("{}{relay_extra}\n", relay_config(addr, ""));
    queue_then_flow_with(config, n, script, sender, rcpts).await
}

/// [`queue_then_flow`] with the daemon's whole config, given the
/// upstream's address.
pub(crate) async fn queue_then_flow_with(
    config: impl Fn(SocketAddr) -> String,
    n: usize,
    script: Script,
    sender: impl Fn(usize) -> &'static str,
    rcpts: impl Fn(usize) -> Vec<&'static str>,
) -> (Daemon, FakeUpstream, Vec<String>, usize) {
    queue_then_flow_on(config, n, |up| up.set_script(script), sender, rcpts).await
}

/// [`queue_then_flow_with`] with the upstream set up by `back` when it
/// comes back (its script, TLS), before the flush.
pub(crate) async fn queue_then_flow_on(
    config: impl Fn(SocketAddr) -> String,
    n: usize,
    back: impl FnOnce(&FakeUpstream),
    sender: impl Fn(usize) -> &'static str,
    rcpts: impl Fn(usize) -> Vec<&'static str>,
) -> (Daemon, FakeUpstream, Vec<String>, usize) {
    queue_bodies_then_flow(config, n, back, sender, rcpts, body).await
}

/// [`queue_then_flow_on`] with message `i`'s body `body(i)` (whose
/// subject must name it as [`body`]'s does, for [`index`]).
pub(crate) async fn queue_bodies_then_flow(
    config: impl Fn(SocketAddr) -> String,
    n: usize,
    back: impl FnOnce(&FakeUpstream),
    sender: impl Fn(usize) -> &'static str,
    rcpts: impl Fn(usize) -> Vec<&'static str>,
    body: impl Fn(usize) -> Vec<u8>,
) -> (Daemon, FakeUpstream, Vec<String>, usize) {
    let (d, addr, ids) = queue_while_down(config, n, sender, rcpts, body).await;
    let up = FakeUpstream::start_on(addr).await.expect("upstream back");
    back(&up);
    let mark = d.log_mark();
    d.flush();
    (d, up, ids, mark)
}

/// The first half of [`queue_bodies_then_flow`]: `n` messages queued,
/// each tried once while the upstream is down. Returns the daemon, the
/// upstream's address and the queue ids.
pub(crate) async fn queue_while_down(
    config: impl Fn(SocketAddr) -> String,
    n: usize,
    sender: impl Fn(usize) -> &'static str,
    rcpts: impl Fn(usize) -> Vec<&'static str>,
    body: impl Fn(usize) -> Vec<u8>,
) -> (Daemon, SocketAddr, Vec<String>) {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let d = Daemon::start(&config(addr));
    let mut ids = Vec::new();
    for i in 0..n {
        // Dot-stuffed like any client must; relayq undoes it on receipt.
        let r = send_mail(d.addr, sender(i), &rcpts(i), &dot_stuff(&body(i))).await;
        assert!(r.starts_with("250"), "{r}");
        ids.push(queue_id(&r));
    }
    for id in &ids {
        d.wait_log(&format!("{id}: to=<"), WAIT);
    }
    (d, addr, ids)
}

/// Waits until every queued message is done, checks that each arrived
/// exactly once, and returns them by number.
pub(crate) fn arrived_once(
    d: &Daemon,
    up: &FakeUpstream,
    ids: &[String],
) -> HashMap<usize, Received> {
    for id in ids {
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    let got = up.messages();
    let n = ids.len();
    let by_index: HashMap<usize, Received> = got.iter().map(|m| (index(m), m.clone())).collect();
    assert_eq!(
        (got.len(), by_index.len()),
        (n, n),
        "each message exactly once"
    );
    by_index
}

/// [`arrived_once`], and each as it was written ([`body`]).
pub(crate) fn arrived_intact(
    d: &Daemon,
    up: &FakeUpstream,
    ids: &[String],
) -> HashMap<usize, Received> {
    let by_index = arrived_once(d, up, ids);
    for (i, m) in &by_index {
        assert!(
            m.data.ends_with(&body(*i)),
            "message {i} changed in transit: {:?}",
            m.text()
        );
    }
    by_index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_flows_pipelined_and_arrives_once_each() {
    let n = 40;
    let (d, up, ids, _) = queue_then_flow(
        n,
        "",
        Script::default(),
        |_| "app@example.com",
        |i| {
            if i % 3 == 0 {
                vec!["bob@example.net", "carol@example.org"]
            } else {
                vec!["bob@example.net"]
            }
        },
    )
    .await;
    for id in &ids {
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    let got = up.messages();
    assert_eq!(got.len(), n, "each message exactly once");
    let by_subject: HashMap<String, &Received> = got.iter().map(|m| (subject(m), m)).collect();
    assert_eq!(by_subject.len(), n, "no message twice");
    for i in 0..n {
        let m = by_subject
            .get(&format!("Subject: pipelined {i}"))
            .unwrap_or_else(|| panic!("message {i} missing"));
        let want = body(i);
        assert!(
            m.data.ends_with(&want),
            "message {i} changed in transit: {:?}",
            m.text()
        );
        assert_eq!(m.mail_from, "app@example.com");
        let rcpts = if i % 3 == 0 { 2 } else { 1 };
        assert_eq!(m.rcpts.len(), rcpts, "message {i}: {:?}", m.rcpts);
    }
    eprintln!(
        "envelopes pipelined behind a dot: {} of {n}",
        up.sent_behind_dot()
    );
    // Pipelining after the end of data did happen: the next envelope came
    // with the dot, before the reply to it.
    assert!(
        up.sent_behind_dot() > 0,
        "no envelope was pipelined behind a dot; commands:\n{}",
        up.commands().join("\n")
    );
    let log = d.log();
    assert_eq!(log.matches("status=sent").count(), n + n.div_ceil(3));
    assert!(!log.contains("status=bounced"), "{log}");
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_in_a_pipelined_stream_are_reported_per_message() {
    // Every fifth message goes to a recipient the upstream refuses (its RCPT
    // may be the one pipelined behind the previous dot); every seventh is
    // from a sender whose bodies are refused after the dot.
    let n = 30;
    let refused_rcpt = |i: usize| i % 5 == 1;
    let refused_body = |i: usize| i % 7 == 2;
    let script = Script::default()
        .rcpt("gone@example.net", 550, "5.1.1 no such user")
        .data_reply_from("spam@example.com", 554, "5.7.1 content refused");
    let (d, up, ids, _) = queue_then_flow(
        n,
        "",
        script,
        move |i| {
            if refused_body(i) {
                "spam@example.com"
            } else {
                "app@example.com"
            }
        },
        move |i| {
            if refused_rcpt(i) {
                vec!["gone@example.net"]
            } else {
                vec!["bob@example.net"]
            }
        },
    )
    .await;
    for id in &ids {
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    let log = d.log();
    let mut bounced = 0;
    for (i, id) in ids.iter().enumerate() {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("{id}: to=<")))
            .filter(|l| !l.contains("status=deferred"))
            .collect();
        assert_eq!(lines.len(), 1, "message {i}: one outcome: {lines:?}");
        if refused_rcpt(i) {
            assert!(
                lines[0].contains("status=bounced") && lines[0].contains("550 5.1.1"),
                "message {i}: {}",
                lines[0]
            );
            bounced += 1;
        } else if refused_body(i) {
            assert!(
                lines[0].contains("status=bounced") && lines[0].contains("554 5.7.1"),
                "message {i}: {}",
                lines[0]
            );
            bounced += 1;
        } else {
            assert!(
                lines[0].contains("status=sent"),
                "message {i}: {}",
                lines[0]
            );
        }
    }
    // Each bounce goes out once, to the original sender (which the upstream
    // takes: only bodies from spam@ itself are refused).
    // Wait until every bounce has gone too, so that a duplicate would show.
    for line in d.log().lines() {
        if let Some((_, bounce_id)) = line.split_once("sender non-delivery notification: ") {
            d.wait_log(&format!("{}: removed", bounce_id.trim()), WAIT);
        }
    }
    let got = up.wait_for_messages(n, WAIT).await;
    assert_eq!(got.len(), n, "nothing twice");
    let accepted: Vec<&Received> = got.iter().filter(|m| !m.mail_from.is_empty()).collect();
    let dsns = got.iter().filter(|m| m.mail_from.is_empty()).count();
    assert_eq!(accepted.len(), n - bounced, "each accepted message once");
    assert_eq!(dsns, bounced, "one bounce per refused message");
    let subjects: std::collections::HashSet<String> = accepted.iter().map(|m| subject(m)).collect();
    assert_eq!(subjects.len(), accepted.len(), "no message twice");
    for m in &accepted {
        let i = index(m);
        assert!(
            !refused_rcpt(i) && !refused_body(i),
            "message {i} went through"
        );
        assert!(m.data.ends_with(&body(i)), "message {i} changed in transit");
    }
    eprintln!("envelopes pipelined behind a dot: {}", up.sent_behind_dot());
    assert!(
        up.sent_behind_dot() > 0,
        "nothing was pipelined behind a dot"
    );
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_dropped_behind_a_dot_loses_nothing_and_sends_nothing_twice() {
    // The upstream hangs up right after answering the third body: the
    // envelope pipelined behind that dot is never answered. That message
    // must go out again on a new connection, without a deferral, and the
    // third must not be sent again.
    let n = 12;
    let (d, up, ids, mark) = queue_then_flow(
        n,
        "",
        Script::default().close_after_body(3),
        |_| "app@example.com",
        |_| vec!["bob@example.net"],
    )
    .await;
    for id in &ids {
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    let got = up.messages();
    let subjects: std::collections::HashSet<String> = got.iter().map(subject).collect();
    assert_eq!(got.len(), n, "each message exactly once: {subjects:?}");
    assert_eq!(subjects.len(), n, "no message twice");
    for m in &got {
        let i = index(m);
        assert!(m.data.ends_with(&body(i)), "message {i} changed in transit");
    }
    assert!(up.connections() >= 2, "the dropped connection was replaced");
    let after = &d.log()[mark..];
    assert!(
        !after.contains("status=deferred"),
        "an unanswered envelope must not defer its message:\n{after}"
    );
    assert_eq!(after.matches("status=sent").count(), n);
    eprintln!("envelopes pipelined behind a dot: {}", up.sent_behind_dot());
    assert!(
        up.sent_behind_dot() > 0,
        "nothing was pipelined behind a dot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_messages_per_connection_counts_pipelined_messages() {
    let up = max_messages_per_connection_holds(Script::default()).await;
    assert!(
        up.sent_behind_dot() > 0,
        "nothing was pipelined behind a dot"
    );
}

/// With `max_messages_per_connection = 3`, no connection carries more,
/// however many go out behind each other; every message arrives once.
pub(crate) async fn max_messages_per_connection_holds(script: Script) -> FakeUpstream {
    let (d, up, ids, _) = queue_then_flow(
        14,
        "max_messages_per_connection = 3",
        script,
        |_| "app@example.com",
        |_| vec!["bob@example.net"],
    )
    .await;
    arrived_once(&d, &up, &ids);
    let mut per_conn: HashMap<usize, usize> = HashMap::new();
    for m in &up.messages() {
        *per_conn.entry(m.conn).or_default() += 1;
    }
    assert!(
        per_conn.values().all(|&k| k <= 3),
        "a connection carried more than 3 messages: {per_conn:?}"
    );
    up
}
