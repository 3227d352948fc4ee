//! End to end: a client hands relayq a message, the fake upstream gets it.

use std::time::Duration;

use crate::support::client::{Client, dot_stuff, queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::FakeUpstream;

const WAIT: Duration = Duration::from_secs(20);

/// Splits what the upstream got into the headers relayq added and the rest.
fn strip_added(data: &[u8]) -> (String, Vec<u8>) {
    let text = data;
    let mut pos = 0;
    let mut added = String::new();
    loop {
        let rest = &text[pos..];
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| p + 2)
            .unwrap_or(rest.len());
        let line = String::from_utf8_lossy(&rest[..line_end]).to_string();
        let is_added = line.starts_with("Received: ")
            || line.starts_with("Message-ID: <")
            || line.starts_with("Date: ");
        let continuation = !added.is_empty() && (line.starts_with('\t') || line.starts_with(' '));
        if is_added || continuation {
            added.push_str(&line);
            pos += line_end;
        } else {
            break;
        }
    }
    (added, text[pos..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_arrives_byte_for_byte() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let cases: Vec<(&str, Vec<&str>, Vec<u8>)> = vec![
        (
            "app@example.com",
            vec!["bob@example.net"],
            b"From: app@example.com\r\nTo: bob@example.net\r\nSubject: plain\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nHello Bob.\r\n".to_vec(),
        ),
        (
            "app@example.com",
            vec!["carol@example.net", "dave@example.org"],
            "Subject: 8-bit body\r\nMessage-ID: <2@example.com>\r\n\r\nGr\u{fc}\u{df}e, na\u{ef}ve caf\u{e9}\r\n".as_bytes().to_vec(),
        ),
        (
            "app@example.com",
            vec!["bob@example.net"],
            b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n...three\r\nend.\r\n. space\r\n".to_vec(),
        ),
    ];
    let mut sent = Vec::new();
    for (from, rcpts, data) in &cases {
        let (mut c, _) = Client::connect(d.addr).await;
        c.cmd("EHLO app.test").await;
        let r = c.cmd(&format!("MAIL FROM:<{from}> BODY=8BITMIME")).await;
        assert!(r.starts_with("250 2.1.0"), "{r}");
        for rcpt in rcpts {
            assert!(
                c.cmd(&format!("RCPT TO:<{rcpt}>"))
                    .await
                    .starts_with("250 2.1.5")
            );
        }
        assert!(c.cmd("DATA").await.starts_with("354"));
        // Dot-stuff like any client must.
        let wire = dot_stuff(data);
        c.send(&wire).await;
        c.send(b".\r\n").await;
        let r = c.reply().await;
        assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
        sent.push(queue_id(&r));
    }
    let got = up.wait_for_messages(cases.len(), WAIT).await;
    for (from, rcpts, data) in &cases {
        let m = got
            .iter()
            .find(|m| m.data.ends_with(data))
            .unwrap_or_else(|| {
                panic!(
                    "message not received intact: {:?}",
                    String::from_utf8_lossy(data)
                )
            });
        assert_eq!(m.mail_from, *from);
        assert_eq!(m.rcpts, *rcpts);
        let (added, rest) = strip_added(&m.data);
        assert_eq!(&rest, data, "body changed in transit");
        assert!(
            added.starts_with(
                "Received: from app.test ([127.0.0.1])\r\n\tby relayq.test (relayq) with ESMTP id "
            ),
            "{added}"
        );
        let has_mid = String::from_utf8_lossy(data).contains("Message-ID");
        assert_eq!(
            added.contains("Message-ID: <"),
            !has_mid,
            "Message-ID added only when missing: {added}"
        );
        let has_date = String::from_utf8_lossy(data).contains("Date:");
        assert_eq!(
            added.contains("\r\nDate: "),
            !has_date,
            "Date added only when missing: {added}"
        );
    }
    // 8-bit content travels with BODY=8BITMIME.
    let eight = got.iter().find(|m| m.rcpts.len() == 2).unwrap();
    assert!(
        eight.mail_params.contains("BODY=8BITMIME"),
        "{}",
        eight.mail_params
    );
    for id in sent {
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utf8_addresses_use_smtputf8() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let (mut c, _) = Client::connect(d.addr).await;
    c.cmd("EHLO app.test").await;
    assert!(
        c.cmd("MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example> SMTPUTF8")
            .await
            .starts_with("250")
    );
    assert!(
        c.cmd("RCPT TO:<\u{7528}\u{6237}@\u{4f8b}\u{5b50}.\u{6d4b}\u{8bd5}>")
            .await
            .starts_with("250")
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send("Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n\r\nhi\r\n.\r\n".as_bytes())
        .await;
    assert!(c.reply().await.starts_with("250 2.0.0"));
    let got = up.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].mail_from, "j\u{f6}rg@b\u{fc}cher.example");
    assert_eq!(
        got[0].rcpts,
        vec!["\u{7528}\u{6237}@\u{4f8b}\u{5b50}.\u{6d4b}\u{8bd5}".to_string()]
    );
    assert!(
        got[0].mail_params.contains("SMTPUTF8"),
        "{}",
        got[0].mail_params
    );
    assert!(got[0].text().contains("with UTF8SMTP id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_then_up_delivers_everything() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let d = Daemon::start(&relay_config(addr, ""));
    let mut ids = Vec::new();
    for i in 0..10 {
        let started = std::time::Instant::now();
        let r = send_mail(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            format!("Subject: {i}\r\n\r\nmessage {i}\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("250"), "{r}");
        // Accepting never waits for the upstream.
        assert!(started.elapsed() < Duration::from_secs(2));
        ids.push(queue_id(&r));
    }
    for id in &ids {
        d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
    }
    let deferred = d.log();
    assert!(deferred.contains("status=deferred"), "{deferred}");
    assert_eq!(d.queued(), 10);
    let listing = d.cli(&["queue", "list"]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("in 10 Requests"), "{listing}");

    let up = FakeUpstream::start_on(addr)
        .await
        .expect("upstream back on its port");
    d.flush();
    let got = up.wait_for_messages(10, WAIT).await;
    let mut subjects: Vec<String> = got
        .iter()
        .map(|m| {
            m.text()
                .lines()
                .find(|l| l.starts_with("Subject:"))
                .unwrap()
                .to_string()
        })
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 10, "each message exactly once");
    for id in &ids {
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_went_stale_is_replaced_without_deferring() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    let d = Daemon::start(
        &relay_config(addr, "").replace("idle_timeout = \"2s\"", "idle_timeout = \"60s\""),
    );
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["bob@example.net"],
        b"Subject: one\r\n\r\n1\r\n",
    )
    .await;
    d.wait_log(&format!("{}: removed", queue_id(&r)), WAIT);
    // The upstream restarts: relayq's kept connections are now dead.
    up.stop().await;
    let up = FakeUpstream::start_on(addr).await.expect("upstream back");
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["bob@example.net"],
        b"Subject: two\r\n\r\n2\r\n",
    )
    .await;
    d.wait_log(&format!("{}: removed", queue_id(&r)), WAIT);
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(got[0].text().contains("Subject: two"));
    assert!(
        !d.log().contains("status=deferred"),
        "a stale connection must not defer mail:\n{}",
        d.log()
    );
}

/// An upstream that takes only so many recipients per transaction answers
/// the rest with 452 (RFC 5321 4.5.3.1.10): they go in the next
/// transactions at once, not after the retry backoff, each recipient
/// once, with the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_over_the_upstreams_limit_go_in_the_next_transaction_at_once() {
    let up =
        FakeUpstream::start_with(crate::support::upstream::Script::default().max_rcpts(2)).await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let rcpts = [
        "a@example.net",
        "b@example.net",
        "c@example.net",
        "d@example.net",
        "e@example.net",
    ];
    let body = b"Subject: many\r\n\r\nfive recipients\r\n";
    let r = send_mail(d.addr, "app@example.com", &rcpts, body).await;
    let id = queue_id(&r);
    // No clock advance: the backoff would hold them for five minutes.
    d.wait_log(&format!("{id}: removed"), WAIT);
    let got = up.messages();
    let batches: Vec<Vec<String>> = got.iter().map(|m| m.rcpts.clone()).collect();
    assert_eq!(
        batches,
        [
            vec!["a@example.net", "b@example.net"],
            vec!["c@example.net", "d@example.net"],
            vec!["e@example.net"]
        ],
        "{batches:?}"
    );
    assert!(
        got.iter()
            .all(|m| m.text().ends_with("\r\n\r\nfive recipients\r\n"))
    );
    let log = d.log();
    for rcpt in rcpts {
        let sent = log
            .lines()
            .filter(|l| l.contains(&format!("{id}: to=<{rcpt}>")) && l.contains("status=sent"))
            .count();
        assert_eq!(sent, 1, "{rcpt}: {log}");
    }
    // The 452s are logged as what they are.
    assert!(
        log.contains("dsn=4.5.3, status=deferred (452 4.5.3 Too many recipients)"),
        "{log}"
    );
    assert_eq!(d.count_log("status=sent"), 5, "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_to_the_rset_of_a_kept_connection_is_its_idle_timeout_not_the_messages() {
    // The relay ends a kept connection with 421 (as servers do when it
    // sat idle too long), read only when the next message's RSET goes
    // out: that message's transaction never began. It goes on a new
    // connection at once, not deferred, and the relay is not paused.
    // With DATA, and with BDAT streaming. Also a 421 to the MAIL behind
    // an accepted RSET (a relay that ends a connection after so many
    // messages): the transaction never began either, and a fresh
    // connection takes the message.
    for (chunking, at_rset) in [(false, true), (true, true), (false, false), (true, false)] {
        let case = format!("chunking {chunking}, 421 at RSET {at_rset}");
        let mut script =
            crate::support::upstream::Script::default().throttle_after_body(1, at_rset);
        if chunking {
            script = script.chunking();
        }
        let up = FakeUpstream::start_with(script).await;
        let d = Daemon::start(
            &relay_config(up.addr(), "")
                .replace("idle_timeout = \"2s\"", "idle_timeout = \"60s\"")
                .replace("concurrency = 2", "concurrency = 1"),
        );
        for (i, subject) in ["one", "two"].iter().enumerate() {
            let r = send_mail(
                d.addr,
                "app@example.com",
                &["bob@example.net"],
                format!("Subject: {subject}\r\n\r\n{i}\r\n").as_bytes(),
            )
            .await;
            d.wait_log(&format!("{}: removed", queue_id(&r)), WAIT);
        }
        assert!(up.throttled().is_some(), "{case}: the 421 went out");
        let got = up.wait_for_messages(2, WAIT).await;
        assert_eq!(got.len(), 2, "{case}: each once");
        assert!(got[1].text().contains("Subject: two"));
        assert_eq!(got[1].via, if chunking { "BDAT" } else { "DATA" });
        let log = d.log();
        assert!(
            !log.contains("status=deferred") && !log.contains("paused by the circuit breaker"),
            "{case}: the 421 to a kept connection was taken for the message's:\n{log}"
        );
    }
}
