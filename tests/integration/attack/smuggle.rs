//! The body of a refused DATA is never executed as commands (issue 16,
//! item 4). A client that pipelines its message behind a DATA that is then
//! refused (no valid recipient) would otherwise have every line of the
//! body read as a command: a body holding `MAIL FROM / RCPT TO / DATA`
//! would queue a message to whatever recipient the body's author chose.
//! relayq answers DATA, then `221 2.7.0 Error: I can break rules, too.`
//! and hangs up, as Postfix does; a header line where a command belongs
//! ends the session the same way.

use std::time::Duration;

use crate::support::client::Client;
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::FakeUpstream;

const WAIT: Duration = Duration::from_secs(20);

/// The body an attacker controls (say, through a web form) in a message a
/// legitimate client pipelines: it smuggles a second transaction.
const SMUGGLED: &str = "MAIL FROM:<attacker@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n.\r\nQUIT\r\n";

const BREAK: &str = "221 2.7.0 Error: I can break rules, too. Goodbye.";

/// relayq relaying to a fake upstream; only 127.0.0.2 may relay without
/// AUTH, so a client on 127.0.0.1 has every recipient refused.
async fn setup() -> (FakeUpstream, Daemon) {
    let up = FakeUpstream::start().await;
    let smtp = "[smtp]\nlisten = [\"127.0.0.1:0\"]\nallow_networks = [\"127.0.0.2/32\"]\n";
    let d = Daemon::start(&relay_config(up.addr(), smtp));
    (up, d)
}

async fn connect(d: &Daemon, source: &str) -> Client {
    let (c, greeting) = Client::connect_from(source, d.addr).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    c
}

/// A client on 127.0.0.1 (not allowed to relay) that waited for each reply
/// and had DATA refused: after a refused RCPT, or with no RCPT at all.
async fn refused_data(d: &Daemon, rcpt: Option<&str>) -> Client {
    let mut c = connect(d, "127.0.0.1").await;
    c.cmd("EHLO x").await;
    let r = c.cmd("MAIL FROM:<app@example.com>").await;
    assert!(r.starts_with("250"), "{r}");
    if let Some(rcpt) = rcpt {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert!(r.starts_with("554"), "{r}");
    }
    let r = c.cmd("DATA").await;
    assert!(r.starts_with("503"), "{r}");
    c
}

/// Every reply until the server closes the connection.
async fn replies_until_eof(c: &mut Client) -> Vec<String> {
    let mut all = Vec::new();
    loop {
        let r = c.reply().await;
        if r == "<EOF>" {
            return all;
        }
        all.push(r);
        assert!(all.len() < 100, "no end: {all:?}");
    }
}

/// Proves nothing was queued: a good message from an allowed client goes
/// through afterwards and is the only one the upstream ever sees.
async fn only_the_control_message_arrives(d: &Daemon, up: &FakeUpstream) {
    let mut c = connect(d, "127.0.0.2").await;
    c.cmd("EHLO good.test").await;
    let r = c
        .mail(
            "app@example.com",
            &["bob@example.net"],
            b"Subject: control\r\n\r\nok\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let got = up.wait_for_messages(1, WAIT).await;
    d.wait_log("status=sent", WAIT);
    assert_eq!(
        got.len(),
        1,
        "{:?}",
        got.iter().map(|m| m.rcpts.clone()).collect::<Vec<_>>()
    );
    assert_eq!(got[0].rcpts, vec!["bob@example.net"]);
    assert_eq!(d.count_log("(queue active)"), 1, "{}", d.log());
    assert!(
        !d.log().contains("victim@example.net>, relay"),
        "{}",
        d.log()
    );
}

fn assert_hung_up(replies: &[String], expected_before: &[&str]) {
    assert!(
        !replies.iter().any(|r| r.contains("queued as")),
        "a smuggled message was queued: {replies:?}"
    );
    assert_eq!(
        replies.last().map(String::as_str),
        Some(BREAK),
        "{replies:?}"
    );
    let codes: Vec<&str> = replies.iter().map(|r| &r[..3]).collect();
    assert_eq!(&codes[..codes.len() - 1], expected_before, "{replies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_data_with_a_pipelined_body_hangs_up() {
    let (up, d) = setup().await;

    // Several shapes of the same attack, each sent in one write as a
    // pipelining client does: (client address, batch, the replies before
    // 221). 127.0.0.2 may relay: the smuggled RCPT would be accepted into
    // the open transaction and its message queued.
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        // The app's own recipient is not an address; the body names one.
        (
            "127.0.0.2",
            format!(
                "EHLO x\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<user at example.com>\r\nDATA\r\n{SMUGGLED}"
            ),
            vec!["250", "250", "501", "503"],
        ),
        // The recipient is refused (relay denied): no valid recipient.
        (
            "127.0.0.1",
            format!(
                "EHLO x\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n{SMUGGLED}"
            ),
            vec!["250", "250", "554", "503"],
        ),
        // Every one of several recipients refused.
        (
            "127.0.0.1",
            format!(
                "EHLO x\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nFrom: app@example.com\r\nSubject: hi\r\n\r\n{SMUGGLED}"
            ),
            vec!["250", "250", "554", "554", "503"],
        ),
        // A recipient that is not an address at all.
        (
            "127.0.0.1",
            format!(
                "EHLO x\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<not-an-address>\r\nDATA\r\n{SMUGGLED}"
            ),
            vec!["250", "250", "501", "503"],
        ),
        // No RCPT at all.
        (
            "127.0.0.1",
            format!("EHLO x\r\nMAIL FROM:<app@example.com>\r\nDATA\r\n{SMUGGLED}"),
            vec!["250", "250", "503"],
        ),
        // No MAIL either.
        (
            "127.0.0.1",
            format!("EHLO x\r\nDATA\r\n{SMUGGLED}"),
            vec!["250", "503"],
        ),
        // BDAT (not offered) with its chunk behind it.
        (
            "127.0.0.1",
            format!(
                "EHLO x\r\nMAIL FROM:<app@example.com>\r\nBDAT {} LAST\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            vec!["250", "250", "502"],
        ),
    ];
    for (source, batch, before) in cases {
        let mut c = connect(&d, source).await;
        c.send(batch.as_bytes()).await;
        let replies = replies_until_eof(&mut c).await;
        assert_hung_up(&replies, &before);
    }
    let line = d.wait_log(
        "improper command pipelining after DATA from [127.0.0.1]",
        WAIT,
    );
    assert!(line.contains("MAIL FROM:<attacker@example.org>"), "{line}");
    only_the_control_message_arrives(&d, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_after_the_refusal_is_not_executed() {
    let (up, d) = setup().await;

    // A client that waits for every reply but ignores them and sends its
    // message anyway: the first header line where a command belongs ends
    // the session.
    let mut c = refused_data(&d, Some("user@example.com")).await;
    c.send(format!("From: app@example.com\r\nSubject: hi\r\n\r\n{SMUGGLED}").as_bytes())
        .await;
    let replies = replies_until_eof(&mut c).await;
    assert_eq!(replies, vec![BREAK.to_string()]);
    d.wait_log(
        "non-SMTP command from [127.0.0.1]: From: app@example.com",
        WAIT,
    );

    // A body without headers: its first line is no command, which after a
    // refused DATA is the message arriving, not the client's next command.
    let mut c = refused_data(&d, None).await;
    c.send(format!("Hello Bob,\r\n{SMUGGLED}").as_bytes()).await;
    assert_eq!(replies_until_eof(&mut c).await, vec![BREAK.to_string()]);

    // A header line as a command is never legitimate, refused DATA or not.
    let mut c = connect(&d, "127.0.0.2").await;
    c.cmd("EHLO x").await;
    c.send(b"Subject: hello\r\nMAIL FROM:<app@example.com>\r\n")
        .await;
    assert_eq!(replies_until_eof(&mut c).await, vec![BREAK.to_string()]);

    // Done again and again, it is not logged again and again: a client's
    // lines are budgeted (20 a minute), the count of the rest comes later.
    for _ in 0..60 {
        let mut c = connect(&d, "127.0.0.3").await;
        c.send(b"Subject: again\r\n").await;
        assert_eq!(replies_until_eof(&mut c).await, vec![BREAK.to_string()]);
    }
    let mut c = connect(&d, "127.0.0.4").await;
    c.send(b"Subject: last\r\n").await;
    assert_eq!(replies_until_eof(&mut c).await, vec![BREAK.to_string()]);
    d.wait_log("non-SMTP command from [127.0.0.4]", WAIT);
    assert_eq!(d.count_log("non-SMTP command from [127.0.0.3]"), 20);

    only_the_control_message_arrives(&d, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_after_a_refused_data_goes_on() {
    let (up, d) = setup().await;
    // A well-behaved client: DATA refused, it reads the reply, resets and
    // tries again with a recipient that works. Nothing is lost.
    let mut c = connect(&d, "127.0.0.2").await;
    c.cmd("EHLO x").await;
    // Pipelined envelope with DATA last in the batch (RFC 2920), no body.
    c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<bad>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250"));
    assert!(c.reply().await.starts_with("501"));
    assert!(c.reply().await.starts_with("503"));
    assert!(c.cmd("RSET").await.starts_with("250"));
    let r = c
        .mail(
            "app@example.com",
            &["bob@example.net"],
            b"Subject: retry\r\n\r\nok\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let got = up.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["bob@example.net"]);
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
}
