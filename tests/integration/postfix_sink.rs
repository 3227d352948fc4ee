//! Postfix's own smtpd, which nobody here wrote, as the CHUNKING peer: a
//! backlog goes to it with BDAT, several messages in flight; what Postfix
//! delivered is compared byte for byte (in its delivery's LF line ends)
//! with what the client sent, and a recipient Postfix refuses inside the
//! window is bounced for that message alone.

use std::time::Duration;

use crate::support::client::{dot_stuff, queue_id, send_mail};
use crate::support::daemon::Daemon;
use crate::support::postfix::PostfixSink;

const WAIT: Duration = Duration::from_secs(60);

fn body(i: usize) -> Vec<u8> {
    format!(
        "Subject: to postfix {i}\r\nFrom: app@example.com\r\n\r\nmessage {i}\r\n.\r\n..two\r\n.leading dot\r\nGr\u{fc}\u{df}e {i}\r\n{}\r\n",
        "y".repeat(i * 53 % 700)
    )
    .into_bytes()
}

fn refused(i: usize) -> bool {
    i % 5 == 1
}

/// A message as Postfix handed it to its pipe, without Postfix's own
/// Received: header (the first, with its continuation lines), in CRLF.
fn as_relayq_sent(delivered: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(delivered);
    let mut lines = text.split_inclusive('\n').peekable();
    assert!(
        lines
            .next()
            .is_some_and(|l| l.starts_with("Received: from ")),
        "Postfix's Received: header first: {text}"
    );
    while lines.peek().is_some_and(|l| l.starts_with([' ', '\t'])) {
        lines.next();
    }
    let rest: String = lines.collect();
    let rest = &delivered[delivered.len() - rest.len()..];
    let mut crlf = Vec::with_capacity(rest.len() + rest.len() / 20);
    for &b in rest {
        if b == b'\n' {
            crlf.push(b'\r');
        }
        crlf.push(b);
    }
    crlf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_takes_a_bdat_stream_byte_for_byte_with_refusals_per_message() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // Nothing listens there yet: the mail waits, then goes as a backlog.
    let mut d = Daemon::start(&format!(
        "hostname = \"relayq.test\"\n[relay]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nconnect_timeout = \"5s\"\nidle_timeout = \"30s\"\n"
    ));
    let n = 20;
    let mut ids = Vec::new();
    for i in 0..n {
        let to = if refused(i) {
            "gone@example.net"
        } else {
            "bob@example.net"
        };
        let r = send_mail(d.addr, "app@example.com", &[to], &dot_stuff(&body(i))).await;
        assert!(r.starts_with("250"), "{r}");
        ids.push(queue_id(&r));
    }
    for id in &ids {
        d.wait_log(&format!("{id}: to=<"), WAIT);
    }
    let pf = PostfixSink::start(
        port,
        "check_recipient_access inline:{ { gone@example.net = REJECT no such user } },",
    );
    let mark = d.log_mark();
    d.flush();
    let deadline = std::time::Instant::now() + WAIT;
    for id in &ids {
        while !d.log().contains(&format!("{id}: removed")) {
            assert!(
                std::time::Instant::now() < deadline,
                "{id} still queued; relayq:\n{}\nPostfix:\n{}",
                &d.log()[mark..],
                pf.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let after = d.log()[mark..].to_string();
    let refusals = (0..n).filter(|&i| refused(i)).count();
    for (i, id) in ids.iter().enumerate() {
        let line = after
            .lines()
            .find(|l| l.contains(&format!("{id}: to=<")) && !l.contains("relay=none"))
            .unwrap_or_else(|| panic!("no outcome for message {i}:\n{after}"));
        if refused(i) {
            assert!(
                line.contains("status=bounced")
                    && line.contains(
                        "554 5.7.1 <gone@example.net>: Recipient address rejected: no such user"
                    ),
                "message {i}: {line}"
            );
        } else {
            assert!(
                line.contains("status=sent (250 2.0.0 Ok: "),
                "message {i}: {line}"
            );
        }
    }
    // Each accepted message, and a bounce for each refused one (from <>
    // to the sender, through Postfix too).
    let got = pf.wait_delivered(n - refusals + refusals, WAIT);
    assert_eq!(got.len(), n, "{}", pf.log());
    for i in (0..n).filter(|&i| !refused(i)) {
        let subject = format!("Subject: to postfix {i}\n");
        let found: Vec<&Vec<u8>> = got
            .iter()
            .filter(|m| String::from_utf8_lossy(m).contains(&subject))
            .collect();
        assert_eq!(found.len(), 1, "message {i} once");
        let sent = as_relayq_sent(found[0]);
        assert!(
            sent.starts_with(b"Received: from "),
            "relayq's own header first: {}",
            String::from_utf8_lossy(&sent)
        );
        assert!(
            sent.ends_with(&body(i)),
            "message {i} changed on its way to Postfix:\n{}",
            String::from_utf8_lossy(&sent)
        );
    }
    // Postfix saw BDAT, no DATA, and more than one message per session
    // (it sums up a session when it ends: stop relayq, which QUITs).
    assert!(d.stop(), "relayq stops");
    let deadline = std::time::Instant::now() + WAIT;
    let log = loop {
        let log = pf.log();
        let opened = log.matches("]: connect from").count();
        if log.matches("]: disconnect from").count() >= opened {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sessions still open:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("smtpd[") && l.contains("disconnect from"))
        .collect();
    let count = |line: &str, cmd: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{cmd}=")))
            .and_then(|v| v.split('/').next()?.parse().ok())
            .unwrap_or(0)
    };
    let bdat: usize = sessions.iter().map(|l| count(l, "bdat")).sum();
    let data: usize = sessions.iter().map(|l| count(l, "data")).sum();
    assert!(
        bdat >= n,
        "Postfix saw {bdat} BDAT for {n} messages:\n{log}"
    );
    assert_eq!(data, 0, "{log}");
    assert!(
        sessions.iter().any(|l| count(l, "bdat") > 1),
        "one message per session:\n{log}"
    );
}
