//! CHUNKING (RFC 3030) with PIPELINING upstream: queued mail goes out with
//! BDAT, several whole messages in flight on a connection. Every message
//! must arrive exactly once, byte for byte, be recorded from its own
//! replies, and survive a line dropped in the middle of a window without
//! being sent twice. Postfix's own smtpd, which nobody here wrote, is the
//! independent peer in `postfix_sink.rs`.

use std::time::Duration;

use crate::pipelining::{
    arrived_intact, arrived_once, body, index, max_messages_per_connection_holds,
    queue_bodies_then_flow, queue_then_flow, queue_then_flow_with,
};
use crate::support::daemon::relay_config;
use crate::support::upstream::{Script, TxnDrop};

const WAIT: Duration = Duration::from_secs(30);

/// A deferral after an attempt (not the ones logged while the upstream
/// was down, before the test let mail flow).
fn deferred_by_the_relay(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains("status=deferred") && !l.contains("relay=none"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_streams_with_bdat_byte_for_byte_each_once() {
    let n = 40;
    let (d, up, ids, mark) = queue_then_flow(
        n,
        "",
        Script::default()
            .chunking()
            .reply_delay(Duration::from_millis(5)),
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
    let by_index = arrived_once(&d, &up, &ids);
    let got = up.messages();
    for i in 0..n {
        let m = &by_index[&i];
        assert_eq!(m.via, "BDAT", "message {i} went with {}", m.via);
        // The chunk is the message as relayq sends it: its own headers
        // first, then exactly what the client wrote (dot lines, 8-bit).
        assert!(
            m.data.ends_with(&body(i)),
            "message {i} changed in transit: {:?}",
            m.text()
        );
        assert!(m.data.starts_with(b"Received: "), "{:?}", m.text());
        assert_eq!(m.rcpts.len(), if i % 3 == 0 { 2 } else { 1 });
    }
    assert!(
        !up.commands().iter().any(|c| c.ends_with(" DATA")),
        "DATA to a server that streams: {:?}",
        up.commands()
    );
    // Several messages were in flight: a chunk arrived with the next
    // message's commands already behind it.
    let followed = got.iter().filter(|m| m.followed).count();
    eprintln!("messages with another one behind their chunk: {followed} of {n}");
    assert!(followed > 0, "nothing was streamed behind a chunk");
    let after = &d.log()[mark..];
    assert_eq!(after.matches("status=sent").count(), n + n.div_ceil(3));
    assert!(!deferred_by_the_relay(after), "{after}");
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_inside_a_bdat_window_belong_to_their_own_message() {
    // Every fifth message goes to a recipient the upstream refuses, every
    // seventh is from a sender whose messages it refuses after the chunk,
    // every eleventh from one it defers (451) after the chunk.
    let n = 33;
    let refused_rcpt = |i: usize| i % 5 == 1;
    let refused_body = |i: usize| i % 7 == 2;
    let deferred_body = |i: usize| i % 11 == 4;
    let script = Script::default()
        .chunking()
        .reply_delay(Duration::from_millis(5))
        .rcpt("gone@example.net", 550, "5.1.1 no such user")
        .data_reply_from("spam@example.com", 554, "5.7.1 content refused")
        .data_reply_from("later@example.com", 451, "4.3.0 try again later");
    let (d, up, ids, mark) = queue_then_flow(
        n,
        "",
        script,
        move |i| {
            if refused_body(i) {
                "spam@example.com"
            } else if deferred_body(i) {
                "later@example.com"
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
    for (i, id) in ids.iter().enumerate() {
        if deferred_body(i) && !refused_rcpt(i) {
            d.wait_log_since(mark, &format!("{id}: to=<bob@example.net>"), WAIT);
        } else {
            d.wait_log(&format!("{id}: removed"), WAIT);
        }
    }
    let log = d.log();
    let after = &log[mark..];
    for (i, id) in ids.iter().enumerate() {
        let lines: Vec<&str> = after
            .lines()
            .filter(|l| l.contains(&format!("{id}: to=<")))
            .collect();
        assert_eq!(lines.len(), 1, "message {i}: one outcome: {lines:?}");
        let line = lines[0];
        let (status, reply) = if refused_rcpt(i) {
            ("status=bounced", "550 5.1.1 no such user")
        } else if refused_body(i) {
            ("status=bounced", "554 5.7.1 content refused")
        } else if deferred_body(i) {
            ("status=deferred", "451 4.3.0 try again later")
        } else {
            ("status=sent", "250 2.0.0 Ok: queued as FAKE")
        };
        assert!(
            line.contains(status) && line.contains(reply),
            "message {i}: {line}"
        );
    }
    let taken: Vec<usize> = up
        .messages()
        .iter()
        .filter(|m| !m.mail_from.is_empty())
        .map(index)
        .collect();
    let mut expected: Vec<usize> = (0..n)
        .filter(|&i| !refused_rcpt(i) && !refused_body(i) && !deferred_body(i))
        .collect();
    let mut got = taken.clone();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected, "exactly the messages not refused, once each");
    // The refusals came inside BDAT windows, not DATA exchanges.
    assert!(
        up.messages().iter().all(|m| m.via == "BDAT"),
        "a message went without BDAT"
    );
    assert!(
        !up.commands().iter().any(|c| c.ends_with(" DATA")),
        "DATA to a server that streams: {:?}",
        up.commands()
    );
    assert!(
        up.messages().iter().filter(|m| m.followed).count() > 0,
        "nothing was streamed behind a chunk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_dropped_in_a_bdat_window_loses_nothing_and_sends_nothing_twice() {
    // The upstream hangs up right after answering the third message that
    // came with more written behind it: those were never answered. Each
    // must go again alone (nothing behind it), the answered ones never
    // again.
    let n = 24;
    let (d, up, ids, mark) = queue_then_flow(
        n,
        "",
        Script::default()
            .chunking()
            .close_in_window(3)
            // Replies come slower than messages are written, as from a
            // provider far away: several are in flight.
            .reply_delay(Duration::from_millis(10)),
        |_| "app@example.com",
        |_| vec!["bob@example.net"],
    )
    .await;
    let by_index = arrived_intact(&d, &up, &ids);
    let after = d.log()[mark..].to_string();
    let retried: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, id)| {
            after.lines().any(|l| {
                l.contains(&format!("{id}: relay=")) && l.contains("trying it again alone")
            })
        })
        .map(|(i, _)| i)
        .collect();
    eprintln!("retried alone after the drop: {retried:?}");
    assert!(
        !retried.is_empty(),
        "the drop left messages unanswered in the window:\n{after}"
    );
    for i in &retried {
        assert!(
            !by_index[i].followed,
            "message {i} was retried with another one behind it"
        );
    }
    assert!(
        !deferred_by_the_relay(&after),
        "an unanswered message must not be deferred:\n{after}"
    );
    assert_eq!(after.matches("status=sent").count(), n);
    assert!(up.connections() >= 2, "the dropped connection was replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_messages_per_connection_counts_streamed_messages() {
    let up = max_messages_per_connection_holds(Script::default().chunking()).await;
    assert!(up.messages().iter().all(|m| m.via == "BDAT"));
}

/// One connection at a time, so the transactions of a stream arrive in
/// the order written and the Nth is at a known place in its window.
fn one_connection(addr: std::net::SocketAddr) -> String {
    relay_config(addr, "").replace("concurrency = 2", "concurrency = 1")
}

/// The line drops at `at` in the Kth transaction of a stream of 8, for K
/// at the head, inside and past the first window. Per message: recorded
/// sent exactly once (never lost); arrived exactly once, except a message
/// the upstream took without its reply getting through, which may arrive
/// twice and only after relayq logged that doubt; at most a window of
/// messages in doubt; an acknowledged message is never sent again.
async fn a_drop_in_a_window_at(at: TxnDrop) {
    let n = 8;
    for k in [1, 2, 3, 5] {
        let script = Script::default()
            .chunking()
            .reply_delay(Duration::from_millis(10))
            .drop_in_txn(k, at);
        let (d, up, ids, mark) = queue_then_flow_with(
            one_connection,
            n,
            script,
            |_| "app@example.com",
            |_| vec!["bob@example.net"],
        )
        .await;
        for id in &ids {
            d.wait_log(&format!("{id}: removed"), WAIT);
        }
        let case = format!("drop {at:?} in transaction {k}");
        let after = d.log()[mark..].to_string();
        assert!(up.connections() >= 2, "{case}: the line never dropped");
        let mut arrived = vec![0usize; n];
        for m in up.messages() {
            assert!(m.data.ends_with(&body(index(&m))), "{case}: changed");
            arrived[index(&m)] += 1;
        }
        let doubted: Vec<usize> = (0..n)
            .filter(|&i| {
                after.lines().any(|l| {
                    l.contains(&format!("{}: relay=", ids[i])) && l.contains("may arrive twice")
                })
            })
            .collect();
        assert!(
            doubted.len() <= relayq_window(),
            "{case}: more messages in doubt than a window: {doubted:?}"
        );
        for (i, id) in ids.iter().enumerate() {
            let sent = after
                .lines()
                .filter(|l| l.contains(&format!("{id}: to=<")) && l.contains("status=sent"))
                .count();
            assert_eq!(sent, 1, "{case}: message {i} recorded sent once:\n{after}");
            let twice_ok = taken(at) && doubted.contains(&i);
            match arrived[i] {
                1 => {}
                2 if twice_ok => {}
                got => panic!(
                    "{case}: message {i} arrived {got} times (in doubt: {doubted:?}):\n{after}"
                ),
            }
        }
        if taken(at) {
            assert_eq!(
                arrived.iter().filter(|&&a| a == 2).count(),
                1,
                "{case}: the message taken without a reply is sent again"
            );
        }
        assert!(!deferred_by_the_relay(&after), "{case}:\n{after}");
        assert_eq!(d.queued(), 0);
    }
}

/// The upstream takes the message before the line drops.
fn taken(at: TxnDrop) -> bool {
    matches!(at, TxnDrop::AfterLastTaken | TxnDrop::TakenUnflushed)
}

/// relayq's BDAT window (`routing::follow::STREAM_WINDOW`).
pub(crate) fn relayq_window() -> usize {
    3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_after_mail_in_a_window() {
    a_drop_in_a_window_at(TxnDrop::AfterMail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_after_rcpt_in_a_window() {
    a_drop_in_a_window_at(TxnDrop::AfterRcpt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_mid_chunk_in_a_window() {
    a_drop_in_a_window_at(TxnDrop::MidChunk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_after_last_before_the_reply_in_a_window() {
    a_drop_in_a_window_at(TxnDrop::AfterLast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_after_a_message_was_taken_before_its_reply_in_a_window() {
    a_drop_in_a_window_at(TxnDrop::AfterLastTaken).await;
}

/// A relay that flushes its replies only once it has read all that came
/// (Postfix does with PIPELINING) takes a message written behind another
/// and the line drops before even the reply to its RSET goes out: the
/// connection was alive (the message before was being answered), so the
/// lost RSET reply proves nothing; it is sent again and logged in doubt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_after_a_message_was_taken_with_no_reply_flushed_in_a_window() {
    a_drop_in_a_window_at(TxnDrop::TakenUnflushed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_after_the_reply_in_a_window() {
    a_drop_in_a_window_at(TxnDrop::AfterReply).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunking_without_pipelining_is_not_streamed_and_arrives_byte_exact() {
    // BDAT without PIPELINING would cost a round trip per command: relayq
    // sends the usual way (one command, one reply), each message exactly.
    let n = 12;
    let (d, up, ids, mark) = queue_then_flow(
        n,
        "",
        Script::default().chunking().no_pipelining(),
        |_| "app@example.com",
        |i| {
            if i % 2 == 0 {
                vec!["bob@example.net", "carol@example.org"]
            } else {
                vec!["bob@example.net"]
            }
        },
    )
    .await;
    let by_index = arrived_once(&d, &up, &ids);
    for (i, m) in &by_index {
        assert!(
            m.data.ends_with(&body(*i)),
            "message {i} changed in transit"
        );
        assert!(!m.followed, "message {i} had commands written behind it");
        assert_eq!(m.rcpts.len(), if i % 2 == 0 { 2 } else { 1 });
    }
    assert!(
        !up.commands()
            .iter()
            .any(|c| c.to_ascii_uppercase().starts_with("BDAT")),
        "BDAT streamed to a server without PIPELINING: {:?}",
        up.commands()
    );
    let after = &d.log()[mark..];
    assert_eq!(after.matches("status=sent").count(), n + n.div_ceil(2));
    assert!(!deferred_by_the_relay(after), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_to_a_message_inside_a_bdat_window_is_its_own_and_loses_nothing() {
    // The relay answers one streamed message's BDAT with 421 and closes:
    // that message is deferred (its own outcome) and goes again; those
    // written behind it were never processed and go again untouched.
    // Two connections: with no other one working, a 421 pauses the relay.
    let n = 24;
    let (d, up, ids, mark) = queue_then_flow(
        n,
        "",
        Script::default()
            .chunking()
            .reply_delay(Duration::from_millis(10))
            .throttle_body(8),
        |_| "app@example.com",
        |_| vec!["bob@example.net"],
    )
    .await;
    let by_index = arrived_once(&d, &up, &ids);
    for (i, m) in &by_index {
        assert!(
            m.data.ends_with(&body(*i)),
            "message {i} changed in transit"
        );
    }
    let after = d.log()[mark..].to_string();
    let deferred: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("status=deferred"))
        .collect();
    assert_eq!(deferred.len(), 1, "only the message answered 421:\n{after}");
    assert!(
        deferred[0].contains("421 4.7.0 Too many messages, slow down"),
        "{}",
        deferred[0]
    );
    assert!(
        up.messages().iter().any(|m| m.followed),
        "nothing was in flight behind a chunk"
    );
    // The relay processes nothing after its 421: those behind it are not
    // in doubt.
    assert!(!after.contains("may arrive twice"), "{after}");
    assert_eq!(after.matches("status=sent").count(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_drops_the_line_inside_every_large_body_defers_it_alike_with_data_and_bdat() {
    // The relay reads one octet of the body and hangs up, on every
    // connection; the message is large enough that relayq's write fails.
    // The same relay behaviour gives the same deferral (why, and the
    // connections spent on the attempt) with DATA and with BDAT.
    use crate::support::client::{queue_id, send_mail};
    use crate::support::daemon::Daemon;
    use crate::support::upstream::{FakeUpstream, Stage};
    let mut seen = Vec::new();
    for chunking in [true, false] {
        let script = Script::default().drop_at(Stage::DataBody);
        let script = if chunking { script.chunking() } else { script };
        let up = FakeUpstream::start_with(script).await;
        let d = Daemon::start(&relay_config(up.addr(), ""));
        let mut big = b"Subject: large\r\n\r\n".to_vec();
        for i in 0..60_000 {
            big.extend_from_slice(
                format!("line {i:06} of a large message, filler filler\r\n").as_bytes(),
            );
        }
        let r = send_mail(d.addr, "app@example.com", &["bob@example.net"], &big).await;
        let id = queue_id(&r);
        d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
        let line = d
            .log()
            .lines()
            .find(|l| l.contains(&format!("{id}: to=<bob@example.net>")))
            .map(str::to_string)
            .unwrap_or_default();
        assert!(line.contains("status=deferred"), "{line}");
        let why = line[line.find("status=deferred").unwrap_or(0)..].to_string();
        eprintln!(
            "chunking {chunking}: {} connections; {why}",
            up.connections()
        );
        seen.push((up.connections(), why.replace("BDAT", "DATA")));
    }
    assert_eq!(
        seen[0].0, seen[1].0,
        "connections per attempt: BDAT {seen:?}"
    );
    assert!(
        !seen[0].1.contains("no connection"),
        "BDAT's deferral names no cause: {:?}",
        seen[0].1
    );
}

/// Message `i` of about `size` octets: [`body`]'s headers, then lines of
/// text.
fn sized_body(i: usize, size: usize) -> Vec<u8> {
    let mut b = format!("Subject: pipelined {i}\r\nFrom: app@example.com\r\n\r\n").into_bytes();
    let mut line = 0;
    while b.len() < size {
        b.extend_from_slice(format!("{i:04} {line:06} {}\r\n", "y".repeat(64)).as_bytes());
        line += 1;
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_has_at_most_a_megabyte_of_bodies_in_flight_the_first_included() {
    // The upstream holds each body's reply back while relayq writes more
    // (flushing once nothing came for a second), so every message shows
    // the bodies relayq had written and had no reply to when it wrote this
    // one. Bodies in flight on a connection, the one that opened the
    // stream included, stay within STREAM_BYTES (1 MiB): a message that
    // would take them over waits for replies, unless nothing is in flight.
    // 600 kB each: never two at once. 400 kB each: two, never three.
    // 5 kB each: the window of three.
    const STREAM_BYTES: usize = 1024 * 1024;
    for (size, most) in [(600_000, 1), (400_000, 2), (5_000, 3)] {
        let n = 6;
        let script = Script::default()
            .chunking()
            .hold_body_replies(Duration::from_secs(1));
        let (d, up, ids, mark) = queue_bodies_then_flow(
            one_connection,
            n,
            |up| up.set_script(script),
            |_| "app@example.com",
            |_| vec!["bob@example.net"],
            |i| sized_body(i, size),
        )
        .await;
        let by_index = arrived_once(&d, &up, &ids);
        let mut seen_most = 0;
        for (i, m) in &by_index {
            assert!(
                m.data.ends_with(&sized_body(*i, size)),
                "{size}: message {i} changed in transit"
            );
            assert_eq!(m.via, "BDAT");
            let before: usize = m.unanswered_before.iter().sum();
            assert!(
                m.unanswered_before.is_empty() || before + m.data.len() <= STREAM_BYTES,
                "{size}: message {i} ({} octets) went behind {:?} octets unanswered",
                m.data.len(),
                m.unanswered_before
            );
            seen_most = seen_most.max(m.unanswered_before.len() + 1);
        }
        // Not a window that never opens: as many as fit went at once.
        assert_eq!(seen_most, most, "{size}: most messages in flight at once");
        let after = &d.log()[mark..];
        assert_eq!(after.matches("status=sent").count(), n, "{after}");
        assert!(!deferred_by_the_relay(after), "{after}");
    }
}
