//! The inbound SMTP server, byte by byte: raw dialogues against a running
//! relayq that relays to the fake upstream. Every refusal is checked with
//! its reply code and enhanced status code, and with what it left behind:
//! nothing in the queue, nothing at the upstream, and a session that still
//! works (a good message sent afterwards arrives, and is the only one).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::client::{Client, queue_id};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::mime;
use crate::support::upstream::FakeUpstream;

const WAIT: Duration = Duration::from_secs(20);

/// A relayq relaying to a fresh fake upstream; `smtp` is the body of the
/// `[smtp]` section (listen is filled in).
async fn setup(smtp: &str) -> (FakeUpstream, Daemon) {
    let up = FakeUpstream::start().await;
    let extra = format!("[smtp]\nlisten = [\"127.0.0.1:0\"]\n{smtp}\n");
    let d = Daemon::start(&relay_config(up.addr(), &extra));
    (up, d)
}

/// Connects and says EHLO; panics unless both succeed.
async fn ehlo(d: &Daemon) -> Client {
    let (mut c, greeting) = Client::connect(d.addr).await;
    assert!(greeting.starts_with("220 relayq.test "), "{greeting}");
    let r = c.cmd("EHLO client.test").await;
    assert!(r.starts_with("250-relayq.test"), "{r}");
    c
}

fn assert_reply(reply: &str, prefix: &str, what: &str) {
    assert!(
        reply.starts_with(prefix),
        "{what}: expected a reply starting {prefix:?}, got {reply:?}"
    );
}

/// Sends one good message on `c`, waits until the upstream has it, and
/// checks that it is the only message the upstream ever got: proof that
/// whatever was refused before it was neither queued nor relayed.
async fn only_this_arrives(c: &mut Client, d: &Daemon, up: &FakeUpstream) {
    let body = b"Subject: control\r\n\r\nthe one good message\r\n";
    let r = c.mail("app@example.com", &["bob@example.net"], body).await;
    assert_reply(&r, "250 2.0.0 Ok: queued as ", "control message");
    let id = queue_id(&r);
    let got = up.wait_for_messages(1, WAIT).await;
    d.wait_log(&format!("{id}: removed"), WAIT);
    assert_eq!(
        got.len(),
        1,
        "only the control message may arrive; got {:?}",
        got.iter().map(|m| m.text()).collect::<Vec<_>>()
    );
    assert!(got[0].data.ends_with(body), "{}", got[0].text());
    assert_eq!(
        d.count_log("(queue active)"),
        1,
        "exactly one message was queued; log:\n{}",
        d.log()
    );
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ehlo_helo_and_the_simple_commands() {
    let (up, d) = setup("max_message_size = 123456").await;
    let (mut c, greeting) = Client::connect(d.addr).await;
    assert_eq!(greeting, "220 relayq.test ESMTP relayq");
    let r = c.cmd("EHLO client.test").await;
    let lines: Vec<&str> = r.lines().collect();
    assert_eq!(lines[0], "250-relayq.test", "{r}");
    for ext in [
        "PIPELINING",
        "SIZE 123456",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(
            lines[1..].iter().any(|l| &l[4..] == ext),
            "EHLO does not advertise {ext}: {r}"
        );
    }
    assert!(lines.last().unwrap().starts_with("250 "), "{r}");
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| l.starts_with("250-"))
    );

    // HELO is a plain one-line greeting without extensions.
    assert_eq!(c.cmd("HELO client.test").await, "250 relayq.test");
    assert_reply(&c.cmd("VRFY bob").await, "252 2.0.0 ", "VRFY");
    let help = c.cmd("HELP").await;
    assert_reply(&help, "214", "HELP");
    assert!(
        help.lines().last().unwrap().starts_with("214 2.0.0 "),
        "{help}"
    );
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok");

    // RSET throws the transaction away: DATA has nothing to send, and a
    // new MAIL is not "nested".
    c.cmd("EHLO client.test").await;
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com>").await,
        "250 2.1.0",
        "MAIL",
    );
    assert_reply(
        &c.cmd("RCPT TO:<lost@example.net>").await,
        "250 2.1.5",
        "RCPT",
    );
    assert_eq!(c.cmd("RSET").await, "250 2.0.0 Ok");
    assert_reply(&c.cmd("DATA").await, "503 5.5.1", "DATA after RSET");
    assert_reply(
        &c.cmd("RCPT TO:<x@example.net>").await,
        "503 5.5.1",
        "RCPT after RSET",
    );
    // The recipient given before RSET must not come back with this message.
    only_this_arrives(&mut c, &d, &up).await;
    assert_eq!(up.messages()[0].rcpts, vec!["bob@example.net".to_string()]);

    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    assert!(c.closed().await, "the connection stays open after QUIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_pipelined_dialogue_in_one_write() {
    let (up, d) = setup("").await;
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    let script = concat!(
        "EHLO pipe.test\r\n",
        "MAIL FROM:<app@example.com>\r\n",
        "RCPT TO:<one@example.net>\r\n",
        "RCPT TO:<no-domain>\r\n",
        "RCPT TO:<two@example.net>\r\n",
        "DATA\r\n",
        "Subject: first\r\n\r\nfirst body\r\n..stuffed\r\n.\r\n",
        "RSET\r\n",
        "MAIL FROM:<app@example.com>\r\n",
        "RCPT TO:<three@example.net>\r\n",
        "DATA\r\n",
        "Subject: second\r\n\r\nsecond body\r\n.\r\n",
        "NOOP\r\n",
        "QUIT\r\n",
    );
    // One write: every command is in the server's buffer before it answers.
    s.write_all(script.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("relayq answers and closes after QUIT")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let replies: Vec<&str> = text
        .split("\r\n")
        .filter(|l| !l.is_empty() && l.as_bytes().get(3) != Some(&b'-'))
        .collect();
    let expected = [
        "220 ",
        "250 SMTPUTF8",
        "250 2.1.0",
        "250 2.1.5",
        "501 5.1.3",
        "250 2.1.5",
        "354 ",
        "250 2.0.0 Ok: queued as ",
        "250 2.0.0",
        "250 2.1.0",
        "250 2.1.5",
        "354 ",
        "250 2.0.0 Ok: queued as ",
        "250 2.0.0",
        "221 2.0.0",
    ];
    assert_eq!(
        replies.len(),
        expected.len(),
        "one final reply per command, in order; got:\n{text}"
    );
    for (got, want) in replies.iter().zip(expected) {
        assert!(
            got.starts_with(want),
            "expected {want:?}, got {got:?}; all:\n{text}"
        );
    }

    let got = up.wait_for_messages(2, WAIT).await;
    let first = got
        .iter()
        .find(|m| m.text().contains("Subject: first"))
        .unwrap();
    assert_eq!(first.rcpts, vec!["one@example.net", "two@example.net"]);
    assert!(
        first
            .data
            .ends_with(b"Subject: first\r\n\r\nfirst body\r\n.stuffed\r\n")
    );
    let second = got
        .iter()
        .find(|m| m.text().contains("Subject: second"))
        .unwrap();
    assert_eq!(second.rcpts, vec!["three@example.net"]);
    assert!(
        second
            .data
            .ends_with(b"Subject: second\r\n\r\nsecond body\r\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_out_of_order_get_503() {
    let (up, d) = setup("").await;
    let (mut c, _) = Client::connect(d.addr).await;
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com>").await,
        "503 5.5.1",
        "MAIL before EHLO",
    );
    assert_reply(
        &c.cmd("RCPT TO:<b@example.net>").await,
        "503 5.5.1",
        "RCPT before MAIL",
    );
    assert_reply(&c.cmd("DATA").await, "503 5.5.1", "DATA before MAIL");
    c.cmd("EHLO client.test").await;
    assert_reply(
        &c.cmd("RCPT TO:<b@example.net>").await,
        "503 5.5.1",
        "RCPT before MAIL",
    );
    assert_reply(&c.cmd("DATA").await, "503 5.5.1", "DATA before MAIL");
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com>").await,
        "250 2.1.0",
        "MAIL",
    );
    assert_reply(&c.cmd("DATA").await, "503 5.5.1", "DATA before RCPT");
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com>").await,
        "503 5.5.1",
        "nested MAIL",
    );
    assert_eq!(c.cmd("RSET").await, "250 2.0.0 Ok");
    // Seven errors are below the default limit of ten: still talking.
    only_this_arrives(&mut c, &d, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_and_parameters() {
    let (up, d) = setup("").await;
    let mut c = ehlo(&d).await;
    assert_reply(
        &c.cmd("FROBNICATE now").await,
        "500 5.5.2",
        "unknown command",
    );
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com> FROB=1").await,
        "555 5.5.4",
        "unknown MAIL parameter",
    );
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com> X-NOVALUE").await,
        "555 5.5.4",
        "unknown flag",
    );
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com>").await,
        "250 2.1.0",
        "MAIL",
    );
    assert_reply(
        &c.cmd("RCPT TO:<b@example.net> FROB=1").await,
        "555 5.5.4",
        "unknown RCPT parameter",
    );
    c.cmd("RSET").await;
    only_this_arrives(&mut c, &d, &up).await;
    // A run-together command reads as a header line ("MAILFROM:<...>"),
    // which is a message arriving where commands belong: the session hangs
    // up, as Postfix's does (see attack::smuggle).
    assert_eq!(
        c.cmd("MAILFROM:<a@example.com>").await,
        "221 2.7.0 Error: I can break rules, too. Goodbye."
    );
    assert!(c.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_command_lines_are_refused_long_body_lines_re_encoded() {
    let (up, d) = setup("").await;
    let mut c = ehlo(&d).await;
    // A command line over 2048 octets is consumed and refused whole: the
    // tail of it is not taken for a second command.
    let long = format!("NOOP {}", "x".repeat(2100));
    assert_reply(&c.cmd(&long).await, "500 5.5.2", "long command");
    let long_mail = format!("MAIL FROM:<{}@example.com>", "a".repeat(3000));
    assert_reply(&c.cmd(&long_mail).await, "500 5.5.2", "long MAIL");
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok");

    // Body lines over 998 octets are accepted (Postfix does) and relayed
    // re-encoded, so what arrives conforms and decodes to what was sent:
    // 999 octets, 5000 after a bare-LF line (whose CRLF still makes the
    // next dot line the end of data), and exactly 998, which is relayed
    // as it is.
    let bodies = [
        format!("{}\r\nafter\r\n", "y".repeat(999)),
        format!("{}\r\n", "w".repeat(5000)),
    ];
    let messages = [
        format!("Subject: long\r\n\r\n{}", bodies[0]),
        format!("Subject: long\n\n{}", bodies[1]),
    ];
    for m in &messages {
        let r = c
            .mail("app@example.com", &["bob@example.net"], m.as_bytes())
            .await;
        assert_reply(&r, "250 2.0.0", "long body line");
    }
    let ok = format!("Subject: limit\r\n\r\n{}\r\n", "z".repeat(998));
    let r = c
        .mail("app@example.com", &["bob@example.net"], ok.as_bytes())
        .await;
    assert_reply(&r, "250 2.0.0", "998-octet body line");
    let got = up.wait_for_messages(3, WAIT).await;
    for (m, body) in got.iter().zip(&bodies) {
        mime::assert_conformant(&m.data);
        let decoded = mime::decode(&m.data);
        assert_eq!(decoded.parts[0].cte, "quoted-printable");
        assert_eq!(decoded.parts[0].payload, body.as_bytes());
    }
    assert!(
        got[2].data.ends_with(ok.as_bytes()),
        "998-octet line changed"
    );
    assert_eq!(d.count_log("(queue active)"), 3, "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_in_commands_and_body() {
    let (up, d) = setup("").await;
    let mut c = ehlo(&d).await;
    assert_reply(&c.cmd("NOOP\0").await, "500 5.5.2", "NUL in command");
    assert_reply(
        &c.cmd("MAIL FROM:<a\0b@example.com>").await,
        "500 5.5.2",
        "NUL in MAIL",
    );
    let r = c
        .mail(
            "app@example.com",
            &["bob@example.net"],
            b"Subject: nul\r\n\r\na\0b\r\n",
        )
        .await;
    assert_reply(&r, "554 5.6.0", "NUL in body");
    only_this_arrives(&mut c, &d, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_is_normalised_and_never_ends_data() {
    let (up, d) = setup("").await;
    let mut c = ehlo(&d).await;
    for cmd in ["MAIL FROM:<app@example.com>", "RCPT TO:<bob@example.net>"] {
        assert_reply(&c.cmd(cmd).await, "250", cmd);
    }
    assert_reply(&c.cmd("DATA").await, "354", "DATA");
    // Every smuggling variant of a false end of data: <LF>.<LF>,
    // <LF>.<CRLF> and <CRLF>.<LF>, each followed by a would-be second
    // transaction. Only the final <CRLF>.<CRLF> ends the message.
    c.send(
        concat!(
            "Subject: smuggling\n",
            "\n",
            "bare lf line\n",
            ".\n",
            "MAIL FROM:<evil1@example.com>\n",
            "RCPT TO:<victim@example.net>\n",
            "DATA\n",
            "smuggled one\n",
            ".\r\n",
            "MAIL FROM:<evil2@example.com>\r\n",
            "smuggled two\r\n",
            ".\n",
            "MAIL FROM:<evil3@example.com>\r\n",
            "last line\r\n",
            ".\r\n",
        )
        .as_bytes(),
    )
    .await;
    let r = c.reply().await;
    assert_reply(&r, "250 2.0.0 Ok: queued as ", "end of data");
    // Nothing after the smuggled dots was taken for a command.
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok");

    let got = up.wait_for_messages(1, WAIT).await;
    let expected = concat!(
        "Subject: smuggling\r\n",
        "\r\n",
        "bare lf line\r\n",
        "\r\n",
        "MAIL FROM:<evil1@example.com>\r\n",
        "RCPT TO:<victim@example.net>\r\n",
        "DATA\r\n",
        "smuggled one\r\n",
        "\r\n",
        "MAIL FROM:<evil2@example.com>\r\n",
        "smuggled two\r\n",
        "\r\n",
        "MAIL FROM:<evil3@example.com>\r\n",
        "last line\r\n",
    );
    assert!(
        got[0].data.ends_with(expected.as_bytes()),
        "bare LFs become CRLF and the dots are content; got:\n{:?}",
        got[0].text()
    );
    assert_eq!(got[0].rcpts, vec!["bob@example.net"]);
    assert_eq!(got[0].mail_from, "app@example.com");
    d.wait_log(&format!("{}: removed", queue_id(&r)), WAIT);
    assert_eq!(d.count_log("(queue active)"), 1, "{}", d.log());
    assert!(up.commands().iter().all(|l| !l.contains("evil")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_size_limits() {
    let (up, d) = setup("max_message_size = 10000").await;
    let mut c = ehlo(&d).await;
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com> SIZE=10001").await,
        "552 5.3.4",
        "declared SIZE over the limit",
    );
    // The declared size may lie: the body is counted as it arrives.
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com> SIZE=500").await,
        "250 2.1.0",
        "MAIL",
    );
    assert_reply(&c.cmd("RCPT TO:<b@example.net>").await, "250 2.1.5", "RCPT");
    assert_reply(&c.cmd("DATA").await, "354", "DATA");
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..200 {
        big.extend_from_slice(&[b'x'; 98]);
        big.extend_from_slice(b"\r\n");
    }
    c.send(&big).await;
    c.send(b".\r\n").await;
    assert_reply(&c.reply().await, "552 5.3.4", "body over max_message_size");
    only_this_arrives(&mut c, &d, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_recipients() {
    let (up, d) = setup("max_recipients = 3").await;
    let mut c = ehlo(&d).await;
    assert_reply(&c.cmd("MAIL FROM:<a@example.com>").await, "250", "MAIL");
    for i in 1..=3 {
        assert_reply(
            &c.cmd(&format!("RCPT TO:<r{i}@example.net>")).await,
            "250 2.1.5",
            "RCPT",
        );
    }
    assert_reply(
        &c.cmd("RCPT TO:<r4@example.net>").await,
        "452 4.5.3",
        "fourth RCPT",
    );
    assert_reply(&c.cmd("DATA").await, "354", "DATA");
    c.send(b"Subject: three\r\n\r\nhi\r\n.\r\n").await;
    assert_reply(&c.reply().await, "250 2.0.0", "end of data");
    let got = up.wait_for_messages(1, WAIT).await;
    assert_eq!(
        got[0].rcpts,
        vec!["r1@example.net", "r2@example.net", "r3@example.net"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_time_out() {
    let (up, d) = setup("command_timeout = \"1s\"\ndata_timeout = \"1s\"").await;
    // Says nothing at all after the greeting.
    let started = Instant::now();
    let (mut c, _) = Client::connect(d.addr).await;
    let r = c.reply().await;
    assert_reply(&r, "421 4.4.2 relayq.test", "idle client");
    assert!(c.closed().await, "closed after the timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "timed out after {waited:?} with command_timeout = 1s"
    );

    // Stalls in the middle of a message: the message is not queued.
    let mut c = ehlo(&d).await;
    c.cmd("MAIL FROM:<a@example.com>").await;
    c.cmd("RCPT TO:<b@example.net>").await;
    assert_reply(&c.cmd("DATA").await, "354", "DATA");
    c.send(b"Subject: stalled\r\n\r\nhalf a mess").await;
    assert_reply(&c.reply().await, "421 4.4.2", "stalled DATA");
    assert!(c.closed().await);

    let mut c = ehlo(&d).await;
    only_this_arrives(&mut c, &d, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_in_the_middle_of_data_queues_nothing() {
    let (up, d) = setup("").await;
    for partial in [
        &b"Subject: cut\r\n\r\nhalf a line"[..],
        b"Subject: cut\r\n\r\nwhole lines\r\n",
        // Even a dot line that is not preceded by CRLF is not an end.
        b"Subject: cut\r\n\r\nlast\n.\r\n",
    ] {
        let mut c = ehlo(&d).await;
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@example.net>").await;
        assert_reply(&c.cmd("DATA").await, "354", "DATA");
        c.send(partial).await;
        drop(c);
    }
    // Give the sessions time to see EOF; then a control message proves
    // that the server is fine and nothing else was queued.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = ehlo(&d).await;
    only_this_arrives(&mut c, &d, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_errors_disconnect() {
    let (up, d) = setup("max_errors = 3").await;
    let mut c = ehlo(&d).await;
    assert_reply(&c.cmd("BOGUS 1").await, "500 5.5.2", "first error");
    assert_reply(
        &c.cmd("RCPT TO:<b@example.net>").await,
        "503 5.5.1",
        "second error",
    );
    assert_reply(
        &c.cmd("BOGUS 3").await,
        "421 4.7.0 relayq.test",
        "third error",
    );
    assert!(c.closed().await, "closed after too many errors");
    // Errors are counted per session.
    let mut c = ehlo(&d).await;
    only_this_arrives(&mut c, &d, &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit() {
    let (_up, d) = setup("max_connections = 2").await;
    // Two sessions busy inside DATA fill the table: nobody can be closed
    // to make room, so a third client is refused.
    let mut a = ehlo(&d).await;
    let mut b = ehlo(&d).await;
    for c in [&mut a, &mut b] {
        assert_reply(&c.cmd("MAIL FROM:<a@example.com>").await, "250", "MAIL");
        assert_reply(&c.cmd("RCPT TO:<b@example.net>").await, "250", "RCPT");
        assert_reply(&c.cmd("DATA").await, "354", "DATA");
    }
    let (mut c, greeting) = Client::connect(d.addr).await;
    assert_reply(&greeting, "421 4.7.0", "third connection");
    assert!(c.closed().await);
    d.wait_log("too many connections", WAIT);
    // a finishes its message and is idle again: a newcomer now gets its
    // place, and a is told why it is closed.
    a.send(b"Subject: a\r\n\r\nbody\r\n.\r\n").await;
    assert_reply(&a.reply().await, "250 2.0.0", "a's message");
    let deadline = Instant::now() + WAIT;
    loop {
        let (mut c, greeting) = Client::connect(d.addr).await;
        if greeting.starts_with("220") {
            assert_eq!(c.cmd("NOOP").await, "250 2.0.0 Ok");
            break;
        }
        assert!(Instant::now() < deadline, "no place was made: {greeting}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        a.reply().await,
        "421 4.7.0 relayq.test Error: server busy, closing idle connection"
    );
    assert!(a.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_452() {
    let (up, d) = setup("min_free_space = \"1000000GB\"").await;
    let mut c = ehlo(&d).await;
    assert_reply(
        &c.cmd("MAIL FROM:<a@example.com>").await,
        "452 4.3.1",
        "MAIL with a full spool",
    );
    assert_reply(
        &c.cmd("RCPT TO:<b@example.net>").await,
        "503 5.5.1",
        "RCPT after 452",
    );
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    d.wait_log("spool file system has only", WAIT);
    assert_eq!(d.queued(), 0);
    assert!(up.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_addresses_need_smtputf8() {
    let (up, d) = setup("").await;
    let mut c = ehlo(&d).await;
    assert_reply(
        &c.cmd("MAIL FROM:<j\u{f6}rg@example.com>").await,
        "553 5.6.7",
        "UTF-8 sender without SMTPUTF8",
    );
    assert_reply(&c.cmd("MAIL FROM:<app@example.com>").await, "250", "MAIL");
    assert_reply(
        &c.cmd("RCPT TO:<gr\u{fc}n@example.net>").await,
        "553 5.6.7",
        "UTF-8 recipient without SMTPUTF8",
    );
    c.cmd("RSET").await;
    // After HELO there is no SMTPUTF8 at all.
    c.cmd("HELO client.test").await;
    assert_reply(
        &c.cmd("MAIL FROM:<j\u{f6}rg@example.com> SMTPUTF8").await,
        "555 5.5.4",
        "SMTPUTF8 after HELO",
    );
    c.cmd("EHLO client.test").await;
    only_this_arrives(&mut c, &d, &up).await;
}

/// Reads whatever the server sends until it closes; an error if the
/// connection was refused, or reset before any byte arrived.
async fn connect_and_read(addr: SocketAddr) -> Result<String, std::io::Error> {
    let mut s = TcpStream::connect(addr).await?;
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => Ok(String::from_utf8_lossy(&buf).into_owned()),
        Ok(Err(e)) if buf.is_empty() => Err(e),
        Ok(Err(_)) => Ok(String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => Ok(format!("<no close> {}", String::from_utf8_lossy(&buf))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_keeps_the_queue() {
    // The upstream is down, so everything accepted stays queued.
    let up = FakeUpstream::start().await;
    let upstream = up.addr();
    up.stop().await;
    let mut d = Daemon::start(&relay_config(upstream, ""));
    let mut c = ehlo(&d).await;
    let r = c
        .mail(
            "app@example.com",
            &["bob@example.net"],
            b"Subject: before\r\n\r\nqueued before SIGTERM\r\n",
        )
        .await;
    assert_reply(&r, "250 2.0.0", "before shutdown");
    let before = queue_id(&r);

    // A client in the middle of DATA keeps the daemon draining.
    let mut busy = ehlo(&d).await;
    busy.cmd("MAIL FROM:<app@example.com>").await;
    busy.cmd("RCPT TO:<carol@example.net>").await;
    assert_reply(&busy.cmd("DATA").await, "354", "DATA");
    busy.send(b"Subject: during\r\n\r\nfirst half\r\n").await;
    // An idle client is told to go away.
    let mut idle = ehlo(&d).await;

    let mark = d.log_mark();
    d.terminate();
    d.wait_log_since(mark, "shutting down", WAIT);
    assert_reply(&idle.reply().await, "421 4.3.2", "idle session at shutdown");
    assert!(idle.closed().await);

    // New connections while draining: 421, or refused outright.
    match connect_and_read(d.addr).await {
        Ok(text) => assert!(
            text.starts_with("421 "),
            "connection during shutdown got {text:?}"
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
    }

    // The message in progress is finished and accepted.
    busy.send(b"second half\r\n.\r\n").await;
    let r = busy.reply().await;
    assert_reply(
        &r,
        "250 2.0.0 Ok: queued as ",
        "message in flight at shutdown",
    );
    let during = queue_id(&r);

    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("relayq exits after SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        d.log()
    );
    d.wait_log_since(mark, "stopped", WAIT);
    for id in [&before, &during] {
        assert!(
            d.spool().join("queue").join(id).exists(),
            "{id} must stay queued; log:\n{}",
            d.log()
        );
    }
    assert_eq!(d.queued(), 2);
    assert!(
        TcpStream::connect(d.addr).await.is_err(),
        "still listening after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_local_parts_stay_quoted() {
    let (up, d) = setup("").await;
    let mut c = ehlo(&d).await;
    let r = c
        .mail(
            "\"odd \\\"sender\\\"\"@example.com",
            &[
                "\"john smith\"@example.net",
                "\"a..b\"@example.net",
                "plain@example.net",
            ],
            b"Subject: quoted\r\n\r\nhi\r\n",
        )
        .await;
    assert_reply(&r, "250 2.0.0", "end of data");
    let got = up.wait_for_messages(1, WAIT).await;
    // Relayed as the client wrote them: each address still one token.
    assert_eq!(got[0].mail_from, "\"odd \\\"sender\\\"\"@example.com");
    assert_eq!(
        got[0].rcpts,
        vec![
            "\"john smith\"@example.net",
            "\"a..b\"@example.net",
            "plain@example.net"
        ]
    );
    let cmds = up.commands();
    assert!(
        cmds.iter()
            .any(|l| l.ends_with("RCPT TO:<\"john smith\"@example.net>")),
        "{cmds:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_given_twice_gets_one_copy() {
    let (up, d) = setup("").await;
    let mut c = ehlo(&d).await;
    // As smtplib's send_message does when an address is in both To and Cc.
    let r = c
        .mail(
            "app@example.com",
            &["bob@example.net", "carol@example.net", "bob@example.net"],
            b"Subject: twice\r\n\r\nhi\r\n",
        )
        .await;
    assert_reply(&r, "250 2.0.0", "end of data");
    let got = up.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["bob@example.net", "carol@example.net"]);
    d.wait_log("nrcpt=2", WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unqualified_addresses_are_refused() {
    let (up, d) = setup("").await;
    let mut c = ehlo(&d).await;
    // "<postmaster>" is not a reverse-path; it must not turn into "<>"
    // (which would silently switch off bounces for the message).
    assert_reply(
        &c.cmd("MAIL FROM:<postmaster>").await,
        "501 5.1.7",
        "MAIL FROM:<postmaster>",
    );
    assert_reply(
        &c.cmd("MAIL FROM:<app>").await,
        "501 5.1.7",
        "MAIL FROM:<app>",
    );
    assert_reply(&c.cmd("MAIL FROM:<>").await, "250 2.1.0", "MAIL FROM:<>");
    assert_reply(&c.cmd("RCPT TO:<bob>").await, "501 5.1.3", "RCPT TO:<bob>");
    // RFC 5321 4.5.1: the bare postmaster is always accepted, as ours.
    assert_reply(
        &c.cmd("RCPT TO:<Postmaster>").await,
        "250 2.1.5",
        "RCPT TO:<Postmaster>",
    );
    c.cmd("RSET").await;
    only_this_arrives(&mut c, &d, &up).await;
}
