//! The next messages on a kept connection (one relayq took back from its
//! idle pool, owing the RSET that ends the previous transaction), against a
//! relay that drops the line on them the way Postfix's smtpd with
//! PIPELINING does: it sends its replies only once it has read all that
//! came, so a line dropped after it read a whole message (and took it)
//! shows the client no reply at all, not even the RSET's. With BDAT and
//! with DATA, per message: it arrives, at most once unless relayq logged
//! exactly that message as possibly sent twice, is recorded sent once,
//! and nothing is lost; a kept connection the relay closed before the next
//! message (nothing of it read) costs no attempt and no such line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::pipelining::{body, index};
use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::{FakeUpstream, KeptDrop, Script};

const WAIT: Duration = Duration::from_secs(30);
/// Messages sent once the connection is kept.
const N: usize = 5;

/// One connection, kept for a minute between messages.
fn config(addr: SocketAddr) -> String {
    relay_config(addr, "")
        .replace("concurrency = 2", "concurrency = 1")
        .replace("idle_timeout = \"2s\"", "idle_timeout = \"60s\"")
}

fn script(chunking: bool) -> Script {
    let script = Script::default().reply_delay(Duration::from_millis(5));
    if chunking { script.chunking() } else { script }
}

/// A message is done: removed, or deferred (waiting for its retry).
fn outcome_logged(d: &Daemon, mark: usize, id: &str) -> bool {
    d.log()[mark..]
        .lines()
        .any(|l| l.contains(&format!("{id}: removed")) || l.contains(&format!("{id}: to=<")))
}

/// Warms a connection up with one message, lets `changed` change the
/// upstream (its script, or a restart), then sends `N` messages one after
/// the other, so that the first goes on the kept connection and the next
/// ones behind it or after it. Every message ends up removed (a deferred
/// one after its retry time, the clock moved on). Returns the daemon, the
/// upstream, the ids, and the log mark from before the `N`.
async fn after_a_kept_connection(
    chunking: bool,
    changed: impl AsyncFnOnce(FakeUpstream) -> FakeUpstream,
) -> (Daemon, FakeUpstream, Vec<String>, usize) {
    let up = FakeUpstream::start_with(script(chunking)).await;
    let d = Daemon::start(&config(up.addr()));
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["bob@example.net"],
        b"Subject: warm-up\r\n\r\nfirst\r\n",
    )
    .await;
    d.wait_log(&format!("{}: removed", queue_id(&r)), WAIT);
    let up = changed(up).await;
    let mark = d.log_mark();
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(crate::rate::submit(&d, i).await);
    }
    let deadline = Instant::now() + WAIT;
    while !ids.iter().all(|id| outcome_logged(&d, mark, id)) {
        assert!(Instant::now() < deadline, "no outcome:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if ids
        .iter()
        .any(|id| !d.log()[mark..].contains(&format!("{id}: removed")))
    {
        // A message deferred in doubt waits for its retry (retry_min).
        d.advance_clock(600);
    }
    for id in &ids {
        d.wait_log_since(mark, &format!("{id}: removed"), WAIT);
    }
    (d, up, ids, mark)
}

/// The checks every case shares; returns how many times each message
/// arrived, and which ones relayq logged as possibly sent twice.
fn each_once_unless_in_doubt(
    case: &str,
    d: &Daemon,
    up: &FakeUpstream,
    ids: &[String],
    mark: usize,
) -> (Vec<usize>, Vec<usize>) {
    let after = d.log()[mark..].to_string();
    let mut arrived = vec![0usize; N];
    for m in up
        .messages()
        .iter()
        .filter(|m| m.text().contains("pipelined"))
    {
        assert!(m.data.ends_with(&body(index(m))), "{case}: changed");
        arrived[index(m)] += 1;
    }
    let doubted: Vec<usize> = (0..N)
        .filter(|&i| {
            after.lines().any(|l| {
                l.contains(&format!("{}: ", ids[i]))
                    && (l.contains("may arrive twice") || l.contains("may be sent more than once"))
            })
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let mine = |needle: &str| {
            after
                .lines()
                .filter(|l| l.contains(&format!("{id}: to=<")) && l.contains(needle))
                .count()
        };
        assert_eq!(
            mine("status=sent"),
            1,
            "{case}: message {i} recorded sent once:\n{after}"
        );
        assert_eq!(
            mine("status=bounced"),
            0,
            "{case}: message {i} bounced:\n{after}"
        );
        // A deferral is an attempt: only for a message whose reply after
        // its end of data was lost (DATA logs it so, as Postfix does).
        if !doubted.contains(&i) {
            assert_eq!(
                mine("status=deferred"),
                0,
                "{case}: message {i} deferred:\n{after}"
            );
        }
        match arrived[i] {
            1 => {}
            2 if doubted.contains(&i) => {}
            got => panic!(
                "{case}: message {i} arrived {got} times (logged in doubt: {doubted:?}):\n{after}\n{:?}",
                up.commands()
            ),
        }
    }
    assert_eq!(d.queued(), 0, "{case}");
    (arrived, doubted)
}

/// The relay drops the kept connection at `at` in the first transaction
/// on it, its replies unsent.
async fn a_kept_connection_dropped(at: KeptDrop) {
    for chunking in [true, false] {
        let case = format!("{at:?}, chunking {chunking}");
        let (d, up, ids, mark) = after_a_kept_connection(chunking, async |up: FakeUpstream| {
            up.set_script(script(chunking).drop_kept(at));
            up
        })
        .await;
        let (arrived, doubted) = each_once_unless_in_doubt(&case, &d, &up, &ids, mark);
        eprintln!(
            "{case}: arrived {arrived:?}, in doubt {doubted:?}, {} connections",
            up.connections()
        );
        assert!(up.connections() >= 2, "{case}: the line never dropped");
        let after = d.log()[mark..].to_string();
        let via = if chunking { "BDAT" } else { "DATA" };
        assert!(
            up.messages().iter().all(|m| m.via == via),
            "{case}: not all with {via}"
        );
        match at {
            // Nothing of the message was read: a connection the relay
            // closed, found so before anything of it was written.
            KeptDrop::AtRset => {
                assert!(doubted.is_empty(), "{case}: in doubt:\n{after}");
            }
            // The relay took it: it arrived twice, and relayq said so.
            KeptDrop::AfterLastTaken => {
                assert_eq!(
                    arrived.iter().filter(|&&a| a == 2).count(),
                    1,
                    "{case}: the message taken without a reply goes again:\n{after}"
                );
            }
            KeptDrop::BeforeBody => {}
        }
        assert!(
            doubted.len() <= crate::chunking::relayq_window(),
            "{case}: more than a window in doubt"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_dropped_after_the_whole_message_was_taken_says_it_may_arrive_twice() {
    a_kept_connection_dropped(KeptDrop::AfterLastTaken).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_dropped_after_the_envelope_before_the_body_loses_nothing() {
    a_kept_connection_dropped(KeptDrop::BeforeBody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_dropped_after_only_its_rset_costs_nothing() {
    a_kept_connection_dropped(KeptDrop::AtRset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_relay_closed_while_idle_costs_no_attempt_and_no_doubt() {
    // The relay restarts between messages: the kept connection is closed
    // before the next message. It is replaced at once: nothing deferred,
    // nothing in doubt, each message once.
    for chunking in [true, false] {
        let case = format!("closed while idle, chunking {chunking}");
        let (d, up, ids, mark) = after_a_kept_connection(chunking, async |up: FakeUpstream| {
            let addr = up.addr();
            up.stop().await;
            let up = FakeUpstream::start_on(addr).await.expect("upstream back");
            up.set_script(script(chunking));
            up
        })
        .await;
        let (arrived, doubted) = each_once_unless_in_doubt(&case, &d, &up, &ids, mark);
        let after = d.log()[mark..].to_string();
        assert!(doubted.is_empty(), "{case}: in doubt:\n{after}");
        assert!(arrived.iter().all(|&a| a == 1), "{case}: {arrived:?}");
        assert!(!after.contains("status=deferred"), "{case}:\n{after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_taken_then_its_reply_lost_on_a_kept_connection_is_recorded_alike_with_data_and_bdat()
 {
    // The same relay behaviour (it reads the whole message on a kept
    // connection, its RSET answered, takes it, and drops the line with its
    // replies unsent) gives the same log lines and attempts with DATA and
    // with BDAT: deferred in doubt, its attempt counted, then sent. BDAT
    // retried it at once, no attempt counted, as if the kept connection
    // had been stale.
    let mut seen = Vec::new();
    for chunking in [true, false] {
        let case = format!("taken then dropped, chunking {chunking}");
        let (d, up, ids, mark) = after_a_kept_connection(chunking, async |up: FakeUpstream| {
            up.set_script(script(chunking).drop_kept(KeptDrop::AfterLastTaken));
            up
        })
        .await;
        let (_, doubted) = each_once_unless_in_doubt(&case, &d, &up, &ids, mark);
        assert_eq!(doubted.len(), 1, "{case}: one message in doubt");
        let id = &ids[doubted[0]];
        let after = d.log()[mark..].to_string();
        // Per line of the message: what it says.
        let said: Vec<String> = after
            .lines()
            .filter_map(|l| l.find(&format!("{id}: ")).map(|at| &l[at..]))
            .map(|l| {
                let mut what = Vec::new();
                for (needle, word) in [
                    ("status=sent", "sent"),
                    ("status=deferred", "deferred"),
                    ("trying it again", "again at once"),
                ] {
                    if l.contains(needle) {
                        what.push(word);
                    }
                }
                if l.contains("may arrive twice") || l.contains("may be sent more than once") {
                    what.push("in doubt");
                }
                what.join(",")
            })
            .filter(|s| !s.is_empty())
            .collect();
        seen.push(said);
    }
    assert_eq!(seen[0], seen[1], "BDAT (left) and DATA (right) disagree");
    assert_eq!(seen[1], ["deferred,in doubt", "sent"]);
}
