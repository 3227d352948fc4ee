//! The next message's envelope pipelined behind the end of data: the exact
//! bytes and grouping, and every way the second transaction can end.

use super::*;

const FIRST: &str = "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n";
/// The first body's end, then the second envelope: one write.
const ONE_THEN_SECOND: &str =
    "one\r\n.\r\nMAIL FROM:<c@x.test>\r\nRCPT TO:<d@y.test>\r\nRCPT TO:<e@y.test>\r\nDATA\r\n";
const RSET_THEN_THIRD: &str = "RSET\r\nMAIL FROM:<f@x.test>\r\nRCPT TO:<g@y.test>\r\nDATA\r\n";

/// Opens a pipelining session and sends the first message with the second
/// envelope behind it.
fn opening() -> Script {
    Script::default()
        .hello(&["PIPELINING"])
        .rx(FIRST)
        .tx("250 ok\r\n250 ok\r\n354 go\r\n")
        .rx(ONE_THEN_SECOND)
}

async fn send_first(conn: &mut Connection) -> Sent {
    let second = ["d@y.test", "e@y.test"];
    let next = envelope("c@x.test", &second);
    let sent = conn
        .send_then(
            &envelope("a@x.test", &["b@y.test"]),
            b"one\r\n",
            Some((&next, 5)),
        )
        .await;
    settled(conn, sent).await
}

/// Reads the replies to a pending next envelope, as the caller does once it
/// has recorded this message's outcome.
async fn settled(conn: &mut Connection, sent: Sent) -> Sent {
    match sent.next {
        NextTxn::Pending(p) => Sent {
            this: sent.this,
            next: conn.settle_next(p).await,
        },
        next => Sent {
            this: sent.this,
            next,
        },
    }
}

/// The third message, sent the usual way after the second ended without
/// a body: the RSET owed goes first.
async fn send_third(conn: &mut Connection) -> TxnReport {
    conn.reset().await.unwrap();
    conn.send(&envelope("f@x.test", &["g@y.test"]), b"three\r\n")
        .await
        .unwrap()
}

fn third() -> Script {
    Script::default()
        .rx(RSET_THEN_THIRD)
        .tx("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("three\r\n.\r\n")
        .tx("250 third\r\n")
}

fn opened(next: NextTxn) -> Opened {
    match next {
        NextTxn::Open(o) => o,
        other => panic!("expected an open transaction, got {other:?}"),
    }
}

#[tokio::test]
async fn next_envelope_follows_the_dot_in_the_same_write() {
    let script = opening()
        .tx("250 first\r\n250 ok\r\n550 5.1.1 no such user\r\n250 ok\r\n354 go\r\n")
        .rx("two\r\n.\r\nMAIL FROM:<f@x.test>\r\nRCPT TO:<g@y.test>\r\nDATA\r\n")
        .tx("250 second\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("three\r\n.\r\n")
        .tx("250 third\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    let first = sent.this.unwrap();
    let third_env = envelope("f@x.test", &["g@y.test"]);
    let sent = conn
        .send_opened(opened(sent.next), b"two\r\n", Some((&third_env, 7)))
        .await;
    let sent = settled(&mut conn, sent).await;
    let second = sent.this.unwrap();
    let sent = conn
        .send_opened(opened(sent.next), b"three\r\n", None)
        .await;
    let third = sent.this.unwrap();
    assert!(matches!(sent.next, NextTxn::NotSent));
    assert!(conn.is_usable());
    conn.quit().await;
    let t = server.finish().await;
    assert_eq!(first.data.unwrap().text, "first");
    // The refused recipient of the pipelined envelope is reported as such.
    assert_eq!(codes(&second), [550, 250]);
    assert_eq!(second.data.unwrap().text, "second");
    assert_eq!(third.data.unwrap().text, "third");
    for group in [
        ONE_THEN_SECOND,
        "two\r\n.\r\nMAIL FROM:<f@x.test>\r\nRCPT TO:<g@y.test>\r\nDATA\r\n",
    ] {
        assert!(t.has_chunk(group), "not one write: {:?}", t.chunks);
    }
    assert!(
        !t.text().contains("RSET"),
        "no RSET between pipelined messages"
    );
}

#[tokio::test]
async fn the_first_outcome_needs_only_the_reply_to_its_dot() {
    // The server answers the dot and nothing else: the first message's
    // outcome is known, the next envelope's replies are still to be read.
    let server = TestServer::start(opening().tx("250 first\r\n")).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let second = ["d@y.test", "e@y.test"];
    let next = envelope("c@x.test", &second);
    let sent = conn
        .send_then(
            &envelope("a@x.test", &["b@y.test"]),
            b"one\r\n",
            Some((&next, 5)),
        )
        .await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
    let NextTxn::Pending(_pending) = sent.next else {
        panic!("expected unread replies, got {:?}", sent.next)
    };
    // Giving up on them closes the connection rather than desynchronise.
    conn.quit().await;
    let t = server.finish().await;
    assert_eq!(t.after_script(), "", "no QUIT with replies unread");
}

#[tokio::test]
async fn next_with_every_recipient_refused_is_done_and_owes_a_rset() {
    let script = opening()
        .tx("250 first\r\n250 ok\r\n550 5.1.1 no\r\n450 4.2.1 busy\r\n503 5.5.1 no valid recipients\r\n")
        .append(third())
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
    let NextTxn::Done(Ok(second)) = sent.next else {
        panic!("expected a report, got {:?}", sent.next)
    };
    assert_eq!(codes(&second), [550, 450]);
    assert_eq!(second.data, None, "no body without a recipient");
    assert!(conn.is_usable());
    assert_eq!(send_third(&mut conn).await.data.unwrap().text, "third");
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn next_with_mail_refused_is_reported_as_send_would() {
    let script = opening()
        .tx("250 first\r\n550 5.7.1 sender refused\r\n503 5.5.1 MAIL first\r\n503 5.5.1 MAIL first\r\n503 5.5.1 MAIL first\r\n")
        .append(third())
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
    let NextTxn::Done(Err(err)) = sent.next else {
        panic!("expected a MAIL refusal, got {:?}", sent.next)
    };
    assert!(
        matches!(&err, SmtpError::Rejected { stage: Stage::Mail, reply } if reply.code == 550),
        "{err:?}"
    );
    assert!(err.is_permanent());
    assert!(conn.is_usable());
    assert_eq!(send_third(&mut conn).await.data.unwrap().text, "third");
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn next_without_354_is_done_with_the_data_refusal() {
    let script = opening()
        .tx("250 first\r\n250 ok\r\n250 ok\r\n250 ok\r\n451 4.3.0 try later\r\n")
        .append(third())
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
    let NextTxn::Done(Ok(second)) = sent.next else {
        panic!("expected a report, got {:?}", sent.next)
    };
    assert_eq!(codes(&second), [250, 250]);
    assert_eq!(second.data.map(|r| r.code), Some(451));
    assert_eq!(send_third(&mut conn).await.data.unwrap().text, "third");
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn refused_dot_leaves_the_next_transaction_open() {
    let script = opening()
        .tx("554 5.6.0 content refused\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("two\r\n.\r\n")
        .tx("250 second\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    assert_eq!(sent.this.unwrap().data.map(|r| r.code), Some(554));
    let sent = conn.send_opened(opened(sent.next), b"two\r\n", None).await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "second");
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn reply_421_to_the_dot_loses_the_next_transaction() {
    let script = opening().tx("421 4.3.2 shutting down\r\n");
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    let err = sent.this.unwrap_err();
    assert_eq!(err.stage(), "body");
    assert!(matches!(sent.next, NextTxn::Lost(_)), "{:?}", sent.next);
    assert!(!conn.is_usable());
    conn.quit().await;
    let t = server.finish().await;
    assert_eq!(t.after_script(), "", "nothing more on a broken session");
}

#[tokio::test]
async fn dropped_line_before_the_dot_reply_loses_both() {
    let server = TestServer::start(opening().close()).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    assert!(
        matches!(sent.this, Err(SmtpError::Closed { stage: Stage::Dot })),
        "{:?}",
        sent.this
    );
    let said = sent.this.as_ref().unwrap_err().to_string();
    assert_eq!(
        said,
        "connection closed by the server after the end of data -- message may be sent more than once"
    );
    assert!(matches!(sent.next, NextTxn::Lost(_)), "{:?}", sent.next);
    assert!(!conn.is_usable());
    server.finish().await;
}

#[tokio::test]
async fn dropped_line_after_the_dot_reply_keeps_the_first_delivered() {
    let server = TestServer::start(opening().tx("250 first\r\n").close()).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
    assert!(matches!(sent.next, NextTxn::Lost(_)), "{:?}", sent.next);
    assert!(!conn.is_usable());
    server.finish().await;
}

#[tokio::test]
async fn reply_421_to_the_next_mail_closes_before_its_transaction() {
    // The relay ends the session at the next message's MAIL: no
    // transaction of it began, so it is not its report but the
    // connection's end (whatever the 421 says, and whatever the replies
    // to the commands behind MAIL are, if any came).
    for replies in [
        "250 first\r\n421 4.7.0 too many\r\n",
        "250 first\r\n421 4.3.2 shutting down\r\n503 5.5.1 x\r\n503 5.5.1 x\r\n",
        "250 first\r\n421 closing\r\n",
    ] {
        let server = TestServer::start(opening().tx(replies)).await;
        let mut conn = Connection::open(&client(server.addr)).await.unwrap();
        let sent = send_first(&mut conn).await;
        assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
        let NextTxn::Closed(err) = sent.next else {
            panic!("expected the session closed, got {:?}", sent.next)
        };
        assert!(
            matches!(&err, SmtpError::Rejected { stage: Stage::Mail, reply } if reply.code == 421),
            "{err:?}"
        );
        assert!(err.closed_before_transaction());
        assert!(!conn.is_usable());
        server.finish().await;
    }
}

#[tokio::test]
async fn reply_421_once_the_next_mail_was_accepted_is_its_report() {
    // MAIL accepted: its transaction began, and a 421 to a recipient or
    // to DATA is its outcome, as send() reports it.
    for replies in [
        "250 first\r\n250 ok\r\n421 4.7.0 too many\r\n",
        "250 first\r\n250 ok\r\n250 ok\r\n250 ok\r\n421 4.7.0 too many\r\n",
    ] {
        let server = TestServer::start(opening().tx(replies)).await;
        let mut conn = Connection::open(&client(server.addr)).await.unwrap();
        let sent = send_first(&mut conn).await;
        assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
        let NextTxn::Done(Err(err)) = sent.next else {
            panic!("expected the 421 as its report, got {:?}", sent.next)
        };
        assert!(
            matches!(&err, SmtpError::Rejected { reply, .. } if reply.code == 421),
            "{err:?}"
        );
        assert!(!err.closed_before_transaction());
        assert!(!conn.is_usable());
        server.finish().await;
    }
}

#[tokio::test]
async fn an_open_transaction_left_unsent_closes_the_connection() {
    let script = opening().tx("250 first\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    assert!(matches!(sent.next, NextTxn::Open(_)));
    // Any other use of the connection withdraws the open transaction the
    // only safe way: by closing, never with a command the server would
    // take as message text.
    assert!(matches!(conn.reset().await, Err(SmtpError::Unusable)));
    assert!(!conn.is_usable());
    conn.quit().await;
    let t = server.finish().await;
    assert_eq!(t.after_script(), "");
}

#[tokio::test]
async fn without_pipelining_nothing_follows_the_dot() {
    let script = Script::default()
        .hello(&[])
        .rx("MAIL FROM:<a@x.test>\r\n")
        .tx("250 ok\r\n")
        .rx("RCPT TO:<b@y.test>\r\n")
        .tx("250 ok\r\n")
        .rx("DATA\r\n")
        .tx("354 go\r\n")
        .rx("one\r\n.\r\n")
        .quiet()
        .tx("250 first\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let sent = send_first(&mut conn).await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
    assert!(matches!(sent.next, NextTxn::NotSent), "{:?}", sent.next);
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn a_next_envelope_too_big_for_one_group_is_not_sent() {
    let names: Vec<String> = (0..PIPELINE_BATCH)
        .map(|i| format!("r{i}@y.test"))
        .collect();
    let rcpts: Vec<&str> = names.iter().map(String::as_str).collect();
    let script = Script::default()
        .hello(&["PIPELINING"])
        .rx(FIRST)
        .tx("250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("one\r\n.\r\n")
        .quiet()
        .tx("250 first\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let next = envelope("c@x.test", &rcpts);
    let sent = conn
        .send_then(
            &envelope("a@x.test", &["b@y.test"]),
            b"one\r\n",
            Some((&next, 1)),
        )
        .await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
    assert!(matches!(sent.next, NextTxn::NotSent), "{:?}", sent.next);
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn a_body_written_now_is_answered_later_and_replies_are_checked_without_waiting() {
    let script = opening()
        .tx("250 first\r\n")
        // The second envelope's replies come a little later.
        .pause(200)
        .tx("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("two\r\n.\r\nMAIL FROM:<f@x.test>\r\nRCPT TO:<g@y.test>\r\nDATA\r\n")
        .tx("250 second\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        .rx("three\r\n.\r\n")
        .tx("250 third\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let second = ["d@y.test", "e@y.test"];
    let next = envelope("c@x.test", &second);
    let sent = conn
        .send_then(
            &envelope("a@x.test", &["b@y.test"]),
            b"one\r\n",
            Some((&next, 5)),
        )
        .await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "first");
    let NextTxn::Pending(pending) = sent.next else {
        panic!("{:?}", sent.next)
    };
    // Not here yet: the check does not wait for them.
    let started = std::time::Instant::now();
    assert!(!conn.replies_arrived(&pending).await);
    assert!(started.elapsed() < Duration::from_millis(150));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(conn.replies_arrived(&pending).await);
    let second_open = opened(conn.settle_next(pending).await);
    let third = envelope("f@x.test", &["g@y.test"]);
    // The body and the next envelope go out before any reply is read.
    let written = conn
        .write_opened(second_open, b"two\r\n", Some((&third, 7)))
        .await
        .unwrap();
    let sent = conn.read_written(written).await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "second");
    let NextTxn::Pending(pending) = sent.next else {
        panic!("{:?}", sent.next)
    };
    let third_open = opened(conn.settle_next(pending).await);
    let sent = conn.send_opened(third_open, b"three\r\n", None).await;
    assert_eq!(sent.this.unwrap().data.unwrap().text, "third");
    conn.quit().await;
    server.finish().await;
}
