//! Per-recipient outcomes, bounces (RFC 3464 DSNs) and expiry, end to end:
//! the DSN relayq sends goes through the same fake upstream, where it is
//! parsed with mail-parser.

use std::time::Duration;

use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders};

use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::{FakeUpstream, Received, Script};

const WAIT: Duration = Duration::from_secs(20);

/// What a test needs from a delivery status notification.
struct Dsn {
    to: String,
    from: String,
    subject: String,
    /// The human-readable first part.
    human: String,
    /// The `message/delivery-status` part, as text.
    status: String,
    /// The third part's content type and raw content.
    returned_type: String,
    returned: Vec<u8>,
}

fn ctype(part: &MessagePart<'_>) -> String {
    let ct = part.content_type().expect("content type");
    format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
}

/// Parses a DSN as it arrived, checking its RFC 3464 shape on the way.
fn parse_dsn(m: &Received) -> Dsn {
    assert_eq!(m.mail_from, "", "a bounce is sent with MAIL FROM:<>");
    let msg: Message<'_> = MessageParser::default()
        .parse(&m.data)
        .expect("mail-parser reads the DSN");
    let ct = msg.content_type().expect("DSN content type");
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("multipart", Some("report")),
        "{}",
        m.text()
    );
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let ids = msg.root_part().sub_parts().expect("multipart");
    let parts: Vec<&MessagePart<'_>> = ids.iter().map(|id| msg.part(*id).unwrap()).collect();
    assert_eq!(parts.len(), 3, "text, delivery-status, original");
    assert_eq!(ctype(parts[0]), "text/plain");
    assert_eq!(ctype(parts[1]), "message/delivery-status");
    Dsn {
        to: msg
            .to()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .unwrap_or_default()
            .to_string(),
        from: msg
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .unwrap_or_default()
            .to_string(),
        subject: msg.subject().unwrap_or_default().to_string(),
        human: parts[0].text_contents().unwrap_or_default().to_string(),
        status: String::from_utf8_lossy(parts[1].contents()).into_owned(),
        returned_type: ctype(parts[2]),
        returned: parts[2].contents().to_vec(),
    }
}

/// The per-recipient groups of a delivery-status part (after the
/// per-message group), each as its "Field: value" lines.
fn recipient_groups(status: &str) -> Vec<String> {
    let normal = status.replace("\r\n", "\n");
    normal
        .split("\n\n")
        .filter(|g| g.contains("Final-Recipient:"))
        .map(|g| g.replace("\n ", " ").replace("\n\t", " "))
        .collect()
}

fn field<'a>(group: &'a str, name: &str) -> &'a str {
    group
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in group:\n{group}"))
}

fn is_bounce(m: &Received) -> bool {
    m.mail_from.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_recipients_one_delivered_one_bounced_one_deferred() {
    let rejected = "550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown in virtual mailbox table";
    let busy = "4.2.0 <carol@example.net>: Recipient address rejected: Greylisted for 300 seconds";
    let up = FakeUpstream::start_with(
        Script::default()
            .rcpt("bob@example.net", 550, &rejected[4..])
            .rcpt("carol@example.net", 450, busy),
    )
    .await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let body =
        b"From: Alice <alice@example.com>\r\nSubject: mixed fortunes\r\n\r\nHello all three.\r\n";
    let r = send_mail(
        d.addr,
        "alice@example.com",
        &["ann@example.net", "bob@example.net", "carol@example.net"],
        body,
    )
    .await;
    let id = queue_id(&r);

    let got = up.wait_for_messages(2, WAIT).await;
    let original = got
        .iter()
        .find(|m| !is_bounce(m))
        .expect("original delivered");
    assert_eq!(original.rcpts, vec!["ann@example.net"]);
    assert_eq!(original.mail_from, "alice@example.com");
    assert!(original.data.ends_with(body));

    let bounce = got.iter().find(|m| is_bounce(m)).expect("a bounce arrived");
    assert_eq!(
        bounce.rcpts,
        vec!["alice@example.com"],
        "to the envelope sender"
    );
    let dsn = parse_dsn(bounce);
    assert_eq!(dsn.to, "alice@example.com");
    assert_eq!(dsn.from, "MAILER-DAEMON@relayq.test");
    assert_eq!(dsn.subject, "Undelivered Mail Returned to Sender");
    assert!(dsn.human.contains("bob@example.net"), "{}", dsn.human);
    let groups = recipient_groups(&dsn.status);
    assert_eq!(
        groups.len(),
        1,
        "only bob is reported (carol is still being tried): {}",
        dsn.status
    );
    let g = &groups[0];
    assert_eq!(field(g, "Final-Recipient"), "rfc822; bob@example.net");
    assert_eq!(field(g, "Action"), "failed");
    assert_eq!(field(g, "Status"), "5.1.1");
    let diag = field(g, "Diagnostic-Code");
    assert!(diag.starts_with("smtp;"), "{diag}");
    assert!(diag.contains(rejected), "the upstream's own words: {diag}");
    assert!(
        dsn.status.contains("Reporting-MTA: dns; relayq.test"),
        "{}",
        dsn.status
    );
    // The whole original comes back, exactly as relayq queued it.
    assert_eq!(dsn.returned_type, "message/rfc822");
    assert_eq!(dsn.returned, original.data);

    // The log tells each recipient's story.
    let line = d.wait_log(&format!("{id}: to=<ann@example.net>"), WAIT);
    assert!(
        line.contains("status=sent (250 2.0.0 Ok: queued as FAKE"),
        "{line}"
    );
    let line = d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
    assert!(
        line.contains("dsn=5.1.1, status=bounced (550 5.1.1 "),
        "{line}"
    );
    let line = d.wait_log(&format!("{id}: to=<carol@example.net>"), WAIT);
    assert!(
        line.contains("dsn=4.2.0, status=deferred (450 4.2.0 "),
        "{line}"
    );
    let line = d.wait_log(&format!("{id}: sender non-delivery notification: "), WAIT);
    let bounce_id = line.rsplit(' ').next().unwrap().to_string();
    d.wait_log(&format!("{bounce_id}: removed"), WAIT);
    assert_eq!(d.queued(), 1, "only the message waiting for carol");

    // The greylisting ends; after the retry delay carol gets it, and only
    // carol: ann's copy is not sent again, bob is not tried again.
    up.set_script(Script::default());
    d.advance_clock(3600);
    d.flush();
    let got = up.wait_for_messages(3, WAIT).await;
    d.wait_log(&format!("{id}: removed"), WAIT);
    let retry = &got[2];
    assert_eq!(retry.rcpts, vec!["carol@example.net"]);
    assert_eq!(retry.data, original.data);
    let carol = d
        .log()
        .lines()
        .rfind(|l| l.contains(&format!("{id}: to=<carol")))
        .unwrap()
        .to_string();
    assert!(carol.contains("status=sent"), "{carol}");
    assert_eq!(up.messages().len(), 3, "{:#?}", up.commands());
    assert_eq!(
        up.commands()
            .iter()
            .filter(|c| c.contains("RCPT TO:<bob@"))
            .count(),
        1,
        "bob is not retried"
    );
    assert_eq!(d.count_log("sender non-delivery notification"), 1);
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_refused_for_good_is_bounced() {
    let refusal = "5.7.1 Message rejected: content policy violation (scripted)";
    let up = FakeUpstream::start_with(Script::default().data_reply_from(
        "app@example.com",
        554,
        refusal,
    ))
    .await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["x@example.net", "y@example.org"],
        b"Subject: refused\r\n\r\nspammy words\r\n",
    )
    .await;
    let id = queue_id(&r);
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(is_bounce(&got[0]), "only the bounce arrives");
    assert_eq!(got[0].rcpts, vec!["app@example.com"]);
    let dsn = parse_dsn(&got[0]);
    let groups = recipient_groups(&dsn.status);
    assert_eq!(groups.len(), 2, "{}", dsn.status);
    for (g, rcpt) in groups.iter().zip(["x@example.net", "y@example.org"]) {
        assert_eq!(field(g, "Final-Recipient"), format!("rfc822; {rcpt}"));
        assert_eq!(field(g, "Action"), "failed");
        assert_eq!(field(g, "Status"), "5.7.1");
        assert!(
            field(g, "Diagnostic-Code").contains(&format!("554 {refusal}")),
            "{g}"
        );
    }
    let returned = String::from_utf8_lossy(&dsn.returned).into_owned();
    assert!(
        returned.ends_with("Subject: refused\r\n\r\nspammy words\r\n"),
        "{returned}"
    );
    for rcpt in ["x@example.net", "y@example.org"] {
        let line = d.wait_log(&format!("{id}: to=<{rcpt}>"), WAIT);
        assert!(
            line.contains("dsn=5.7.1, status=bounced (554 5.7.1 Message rejected"),
            "{line}"
        );
    }
    d.wait_log(&format!("{id}: removed"), WAIT);
    let bid = d
        .wait_log(&format!("{id}: sender non-delivery notification: "), WAIT)
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    d.wait_log(&format!("{bid}: removed"), WAIT);
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeliverable_for_max_lifetime_expires_with_4_4_7() {
    let up = FakeUpstream::start_with(Script::default().rcpt(
        "slow@example.net",
        451,
        "4.3.2 System not accepting network messages, try later",
    ))
    .await;
    let d = Daemon::start(&relay_config(up.addr(), "[queue]\nmax_lifetime = \"1h\"\n"));
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["slow@example.net"],
        b"Subject: doomed\r\n\r\nwill expire\r\n",
    )
    .await;
    let id = queue_id(&r);
    let line = d.wait_log(&format!("{id}: to=<slow@example.net>"), WAIT);
    assert!(line.contains("status=deferred (451 4.3.2"), "{line}");

    // Retried within the hour: still deferred, no bounce yet. Moving the
    // clock past the retry time is enough to wake the scheduler.
    d.advance_clock(1200);
    let deadline = std::time::Instant::now() + WAIT;
    while d.count_log(&format!("{id}: to=<slow@example.net>")) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no retry; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d.count_log("status=deferred"), 2, "{}", d.log());
    assert_eq!(d.count_log("sender non-delivery notification"), 0);
    assert!(up.messages().is_empty());

    // Past max_lifetime: the next failure returns it to the sender.
    d.advance_clock(3600);
    d.flush();
    let got = up.wait_for_messages(1, WAIT).await;
    let dsn = parse_dsn(&got[0]);
    assert_eq!(got[0].rcpts, vec!["app@example.com"]);
    let groups = recipient_groups(&dsn.status);
    assert_eq!(groups.len(), 1, "{}", dsn.status);
    assert_eq!(
        field(&groups[0], "Final-Recipient"),
        "rfc822; slow@example.net"
    );
    assert_eq!(field(&groups[0], "Action"), "failed");
    assert_eq!(field(&groups[0], "Status"), "4.4.7");
    assert!(
        field(&groups[0], "Diagnostic-Code").contains("System not accepting network messages"),
        "{}",
        groups[0]
    );
    let line = d
        .log()
        .lines()
        .rfind(|l| l.contains(&format!("{id}: to=<slow@example.net>")))
        .unwrap()
        .to_string();
    assert!(line.contains("status=expired"), "{line}");
    d.wait_log(&format!("{id}: removed"), WAIT);
    let bid = d
        .wait_log(&format!("{id}: sender non-delivery notification: "), WAIT)
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    d.wait_log(&format!("{bid}: removed"), WAIT);
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_sender_and_bounces_of_bounces_are_never_bounced() {
    let up = FakeUpstream::start_with(
        Script::default()
            .rcpt(
                "nobody@example.net",
                550,
                "5.1.1 <nobody@example.net>: no such user",
            )
            .rcpt(
                "gone@example.com",
                550,
                "5.1.1 <gone@example.com>: no such user",
            ),
    )
    .await;
    let d = Daemon::start(&relay_config(up.addr(), ""));

    // 1. A message from <> that fails: no bounce at all.
    let r = send_mail(
        d.addr,
        "",
        &["nobody@example.net"],
        b"Subject: from null\r\n\r\nx\r\n",
    )
    .await;
    let null_id = queue_id(&r);
    let line = d.wait_log(&format!("{null_id}: to=<nobody@example.net>"), WAIT);
    assert!(line.contains("status=bounced"), "{line}");
    d.wait_log(&format!("{null_id}: sender is <>, no bounce is sent"), WAIT);
    d.wait_log(&format!("{null_id}: removed"), WAIT);

    // 2. A failing message whose sender's own address also fails: one
    // bounce is tried, and its failure is not bounced again (no loop).
    let r = send_mail(
        d.addr,
        "gone@example.com",
        &["nobody@example.net"],
        b"Subject: from gone\r\n\r\ny\r\n",
    )
    .await;
    let gone_id = queue_id(&r);
    let bid = d
        .wait_log(
            &format!("{gone_id}: sender non-delivery notification: "),
            WAIT,
        )
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    let line = d.wait_log(&format!("{bid}: to=<gone@example.com>"), WAIT);
    assert!(line.contains("status=bounced"), "{line}");
    d.wait_log(&format!("{bid}: sender is <>, no bounce is sent"), WAIT);
    d.wait_log(&format!("{bid}: removed"), WAIT);

    // A control message: everything queued before it has been handled.
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["ok@example.net"],
        b"Subject: control\r\n\r\nz\r\n",
    )
    .await;
    let got = up.wait_for_messages(1, WAIT).await;
    d.wait_log(&format!("{}: removed", queue_id(&r)), WAIT);
    assert_eq!(got.len(), 1, "only the control message arrives: {got:#?}");
    assert_eq!(got[0].rcpts, vec!["ok@example.net"]);
    assert_eq!(
        d.count_log("sender non-delivery notification"),
        1,
        "{}",
        d.log()
    );
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounce_to_a_utf8_sender_of_an_8bit_message() {
    let sender = "j\u{f6}rg@b\u{fc}cher.example";
    let up = FakeUpstream::start_with(Script::default().rcpt(
        "nobody@example.net",
        550,
        "5.1.1 <nobody@example.net>: unknown",
    ))
    .await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let (mut c, _) = crate::support::client::Client::connect(d.addr).await;
    c.cmd("EHLO app.test").await;
    assert!(
        c.cmd(&format!("MAIL FROM:<{sender}> SMTPUTF8 BODY=8BITMIME"))
            .await
            .starts_with("250")
    );
    assert!(
        c.cmd("RCPT TO:<nobody@example.net>")
            .await
            .starts_with("250")
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    let body = "Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln\r\n";
    c.send(body.as_bytes()).await;
    c.send(b".\r\n").await;
    assert!(c.reply().await.starts_with("250"));

    let got = up.wait_for_messages(1, WAIT).await;
    let bounce = &got[0];
    assert_eq!(bounce.rcpts, vec![sender]);
    // A UTF-8 address needs SMTPUTF8; the returned 8-bit original needs
    // BODY=8BITMIME.
    assert!(
        bounce.mail_params.contains("SMTPUTF8"),
        "{}",
        bounce.mail_params
    );
    assert!(
        bounce.mail_params.contains("BODY=8BITMIME"),
        "{}",
        bounce.mail_params
    );
    let dsn = parse_dsn(bounce);
    assert_eq!(dsn.to, sender);
    let groups = recipient_groups(&dsn.status);
    assert_eq!(field(&groups[0], "Status"), "5.1.1");
    assert!(
        dsn.returned.ends_with(body.as_bytes()),
        "the 8-bit original comes back intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_that_cannot_be_queued_does_not_resend_delivered_recipients() {
    let up = FakeUpstream::start_with(
        Script::default()
            .rcpt("ann@example.net", 451, "4.3.0 later")
            .rcpt("bob@example.net", 451, "4.3.0 later"),
    )
    .await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["ann@example.net", "bob@example.net"],
        b"Subject: spool trouble\r\n\r\nhi\r\n",
    )
    .await;
    let id = queue_id(&r);
    d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);

    // The spool cannot take new files (its tmp/ and slots/ are gone, and
    // no slot is free), so the bounce for bob cannot be queued while ann
    // is delivered.
    let tmp = d.spool().join("tmp");
    let away = d.spool().join("tmp.away");
    std::fs::rename(&tmp, &away).unwrap();
    let slots = d.spool().join("slots");
    let slots_away = d.spool().join("slots.away");
    std::fs::rename(&slots, &slots_away).unwrap();
    up.set_script(Script::default().rcpt("bob@example.net", 550, "5.1.1 no such user"));
    d.advance_clock(3600);
    d.wait_log(&format!("{id}: cannot queue bounce"), WAIT);
    // (The outcome lines are logged before the bounce is tried.)
    let ann = d
        .log()
        .lines()
        .rfind(|l| l.contains(&format!("{id}: to=<ann@example.net>")))
        .unwrap()
        .to_string();
    assert!(ann.contains("status=sent"), "{ann}");
    assert_eq!(up.messages().len(), 1, "ann got her copy");

    // The spool recovers; the retry bounces bob and must not send ann's
    // copy again.
    std::fs::rename(&away, &tmp).unwrap();
    std::fs::rename(&slots_away, &slots).unwrap();
    d.advance_clock(3600);
    d.flush();
    let bid = d
        .wait_log(&format!("{id}: sender non-delivery notification: "), WAIT)
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    d.wait_log(&format!("{bid}: removed"), WAIT);
    d.wait_log(&format!("{id}: removed"), WAIT);
    let got = up.messages();
    let to_ann = got
        .iter()
        .filter(|m| m.rcpts.contains(&"ann@example.net".to_string()))
        .count();
    assert_eq!(to_ann, 1, "ann's copy was sent {to_ann} times: {got:#?}");
    assert_eq!(got.len(), 2, "ann's copy and the bounce");
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_while_the_upstream_is_unreachable() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let d = Daemon::start(&relay_config(addr, "[queue]\nmax_lifetime = \"1h\"\n"));
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["bob@example.net"],
        b"Subject: unreachable\r\n\r\nnobody home\r\n",
    )
    .await;
    let id = queue_id(&r);
    let line = d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
    // "No answer from host", as Postfix logs a refused connection.
    assert!(
        line.contains("dsn=4.4.1, status=deferred (connect to"),
        "{line}"
    );
    d.advance_clock(2 * 3600);
    let deadline = std::time::Instant::now() + WAIT;
    while !d.log().contains("status=expired") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.wait_log(&format!("{id}: removed"), WAIT);
    let bid = d
        .wait_log(&format!("{id}: sender non-delivery notification: "), WAIT)
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    // The bounce waits for the upstream like any message.
    d.wait_log(&format!("{bid}: to=<app@example.com>"), WAIT);
    assert_eq!(d.queued(), 1);
    // Back on its old port (retried: another test's socket may hold it
    // for a moment).
    let up = loop {
        match FakeUpstream::start_on(addr).await {
            Ok(up) => break up,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{addr}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    d.flush();
    let got = up.wait_for_messages(1, WAIT).await;
    let dsn = parse_dsn(&got[0]);
    let groups = recipient_groups(&dsn.status);
    assert_eq!(
        field(&groups[0], "Final-Recipient"),
        "rfc822; bob@example.net"
    );
    assert_eq!(field(&groups[0], "Status"), "4.4.7");
    assert!(
        field(&groups[0], "Diagnostic-Code").contains("Connection refused"),
        "the last reason is reported: {}",
        groups[0]
    );
    assert!(
        field(&groups[0], "Diagnostic-Code").starts_with("x-relayq;"),
        "not an SMTP reply, so not typed smtp: {}",
        groups[0]
    );
    assert_eq!(field(&groups[0], "Action"), "failed");
    d.wait_log(&format!("{bid}: removed"), WAIT);
    assert_eq!(d.queued(), 0);
}
