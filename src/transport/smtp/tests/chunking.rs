//! Whole transactions streamed with BDAT: the exact bytes, several in
//! flight before any reply, each judged from its own replies, and what a
//! dropped line or a 421 in the middle leaves answered.

use super::*;

const STREAMING: &[&str] = &["PIPELINING", "CHUNKING"];

/// The first transaction: nothing is owed, so no RSET.
fn first(body: &str) -> String {
    format!(
        "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT {} LAST\r\n{body}",
        body.len()
    )
}

/// A transaction written while another is unanswered: RSET first.
fn behind(from: &str, rcpts: &[&str], body: &str) -> String {
    let mut s = format!("RSET\r\nMAIL FROM:<{from}>\r\n");
    for r in rcpts {
        s.push_str(&format!("RCPT TO:<{r}>\r\n"));
    }
    s.push_str(&format!("BDAT {} LAST\r\n{body}", body.len()));
    s
}

fn in_flight(s: Streamed) -> Chunked {
    match s {
        Streamed::InFlight(c) => c,
        other => panic!("expected a transaction in flight, got {other:?}"),
    }
}

async fn push(conn: &mut Connection, from: &str, rcpts: &[&str], body: &[u8]) -> Chunked {
    in_flight(conn.send_chunked(&envelope(from, rcpts), body).await)
}

#[tokio::test]
async fn three_messages_go_out_before_any_reply_each_answered_on_its_own() {
    // Bodies as stored: dots not stuffed, 8-bit octets, a "." line.
    let one = "Subject: one\r\n\r\n.\r\n..two dots\r\n";
    let two = "Subject: two\r\n\r\nGr\u{fc}\u{df}e\r\n";
    let three = "Subject: three\r\n\r\nx\r\n";
    let script = Script::default()
        .hello(STREAMING)
        .rx(&first(one))
        .rx(&behind("c@x.test", &["d@y.test", "e@y.test"], two))
        .rx(&behind("f@x.test", &["g@y.test"], three))
        // Nothing was answered until all three were on the wire.
        .tx("250 ok\r\n250 ok\r\n250 2.0.0 one queued\r\n")
        .tx("250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 two queued\r\n")
        .tx("250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 three queued\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    assert!(conn.streams());
    let a = push(&mut conn, "a@x.test", &["b@y.test"], one.as_bytes()).await;
    let b = push(
        &mut conn,
        "c@x.test",
        &["d@y.test", "e@y.test"],
        two.as_bytes(),
    )
    .await;
    let c = push(&mut conn, "f@x.test", &["g@y.test"], three.as_bytes()).await;
    assert_eq!(conn.in_flight(), 3);
    let a = conn.settle_chunked(a).await.unwrap();
    let b = conn.settle_chunked(b).await.unwrap();
    let c = conn.settle_chunked(c).await.unwrap();
    assert_eq!(conn.in_flight(), 0);
    assert!(conn.is_usable());
    conn.quit().await;
    let t = server.finish().await;
    assert_eq!(a.data.unwrap().text, "2.0.0 one queued");
    assert_eq!(codes(&b), [250, 250]);
    assert_eq!(b.data.unwrap().text, "2.0.0 two queued");
    assert_eq!(c.data.unwrap().text, "2.0.0 three queued");
    // A transaction, commands and chunk, is written at once (the server
    // may read several together).
    assert!(
        t.chunks
            .iter()
            .any(|c| c.starts_with(first(one).as_bytes())),
        "split: {:?}",
        t.chunks
    );
    assert!(!t.text().contains("DATA"), "{}", t.text());
}

#[tokio::test]
async fn line_ends_go_out_as_data_would_send_them() {
    for (body, sent) in [
        ("no end", "no end\r\n"),
        ("bare lf\n", "bare lf\r\n"),
        ("lone cr\r", "lone cr\r\n"),
        ("mid\nline\r\n", "mid\r\nline\r\n"),
        ("a\rb\r\n\r\n", "a\r\nb\r\n\r\n"),
    ] {
        let script = Script::default()
            .hello(STREAMING)
            .rx(&first(sent))
            .tx("250 ok\r\n250 ok\r\n250 done\r\n")
            .quit();
        let server = TestServer::start(script).await;
        let mut conn = Connection::open(&client(server.addr)).await.unwrap();
        let a = push(&mut conn, "a@x.test", &["b@y.test"], body.as_bytes()).await;
        assert_eq!(
            conn.settle_chunked(a).await.unwrap().data.unwrap().code,
            250
        );
        conn.quit().await;
        server.finish().await;
    }
}

#[test]
fn a_chunk_is_the_data_payload_unstuffed_and_counted_exactly() {
    use super::super::wire::DataEncoder;
    // In small pieces, as a long body is written.
    let encode = |mut e: DataEncoder<'_>| {
        let mut out = Vec::new();
        loop {
            let mut piece = Vec::new();
            let more = e.fill(&mut piece, 7);
            out.extend_from_slice(&piece);
            if !more {
                return out;
            }
        }
    };
    for body in [
        &b""[..],
        b"x",
        b"one\r\ntwo",
        b"a\nb\rc\r\n",
        b"\r\n\r\n",
        b"\n\n\r\r",
        b".dot\r\n..two\r\n.",
        b"long line without end that crosses several pieces",
    ] {
        let chunk = encode(DataEncoder::chunk(body));
        assert_eq!(chunk.len(), DataEncoder::chunk_len(body), "{body:?}");
        // DATA's payload is the same octets, dot-stuffed, then ".\r\n".
        let data = encode(DataEncoder::new(body));
        let unstuffed: Vec<u8> = String::from_utf8_lossy(&data[..data.len() - 3])
            .split_inclusive("\r\n")
            .map(|l| l.strip_prefix('.').unwrap_or(l))
            .collect::<String>()
            .into_bytes();
        assert_eq!(chunk, unstuffed, "{body:?}");
    }
}

#[tokio::test]
async fn a_large_body_goes_in_pieces_with_the_exact_count() {
    let body: String = (0..5000)
        .map(|i| format!("line {i:05} of a large message\r\n"))
        .collect();
    assert!(body.len() > 2 * BODY_CHUNK);
    let script = Script::default()
        .hello(STREAMING)
        .rx(&first(&body))
        .tx("250 ok\r\n250 ok\r\n250 big\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let a = push(&mut conn, "a@x.test", &["b@y.test"], body.as_bytes()).await;
    assert_eq!(
        conn.settle_chunked(a).await.unwrap().data.unwrap().text,
        "big"
    );
    conn.quit().await;
    server.finish().await;
}

#[tokio::test]
async fn refusals_inside_the_window_belong_to_their_own_message() {
    // 1: one recipient refused, the other delivered. 2: sender refused (the
    // server still reads and refuses the chunk). 3: every recipient
    // refused. 4: the message refused after its chunk. 5: delivered.
    let script = Script::default()
        .hello(STREAMING)
        .rx(&format!(
            "MAIL FROM:<a@x.test>\r\nRCPT TO:<gone@y.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 5 LAST\r\none\r\n{}{}{}{}",
            behind("spam@x.test", &["b@y.test"], "two\r\n"),
            behind("a@x.test", &["gone@y.test"], "three\r\n"),
            behind("a@x.test", &["b@y.test"], "four\r\n"),
            behind("a@x.test", &["b@y.test"], "five\r\n"),
        ))
        .tx("250 ok\r\n550 5.1.1 gone\r\n250 ok\r\n250 2.0.0 one\r\n")
        .tx("250 ok\r\n553 5.7.1 sender refused\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need RCPT\r\n")
        .tx("250 ok\r\n250 ok\r\n550 5.1.1 gone\r\n554 5.5.1 no valid recipients\r\n")
        .tx("250 ok\r\n250 ok\r\n250 ok\r\n554 5.7.1 content refused\r\n")
        .tx("250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 five\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let mut flight = Vec::new();
    flight.push(
        push(
            &mut conn,
            "a@x.test",
            &["gone@y.test", "b@y.test"],
            b"one\r\n",
        )
        .await,
    );
    flight.push(push(&mut conn, "spam@x.test", &["b@y.test"], b"two\r\n").await);
    flight.push(push(&mut conn, "a@x.test", &["gone@y.test"], b"three\r\n").await);
    flight.push(push(&mut conn, "a@x.test", &["b@y.test"], b"four\r\n").await);
    flight.push(push(&mut conn, "a@x.test", &["b@y.test"], b"five\r\n").await);
    let mut results = Vec::new();
    for c in flight {
        results.push(conn.settle_chunked(c).await);
    }
    assert!(conn.is_usable());
    conn.quit().await;
    server.finish().await;
    let mut results = results.into_iter();
    let one = results.next().unwrap().unwrap();
    assert_eq!(codes(&one), [550, 250]);
    assert_eq!(one.data.unwrap().text, "2.0.0 one");
    let two = results.next().unwrap().unwrap_err();
    assert!(
        matches!(&two, SmtpError::Rejected { stage: Stage::Mail, reply } if reply.code == 553),
        "{two:?}"
    );
    let three = results.next().unwrap().unwrap();
    assert_eq!(codes(&three), [550]);
    assert_eq!(three.data, None, "nothing delivered without a recipient");
    let four = results.next().unwrap().unwrap();
    assert_eq!(four.data.unwrap().code, 554);
    let five = results.next().unwrap().unwrap();
    assert_eq!(five.data.unwrap().text, "2.0.0 five");
}

/// Three messages written before any reply; the server sends `replies`
/// and hangs up.
async fn three_then(replies: &str) -> (Connection, [Chunked; 3]) {
    let script = Script::default()
        .hello(STREAMING)
        .rx(&first("one\r\n"))
        .rx(&behind("a@x.test", &["b@y.test"], "two\r\n"))
        .rx(&behind("a@x.test", &["b@y.test"], "three\r\n"))
        .tx(replies)
        .close();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let a = push(&mut conn, "a@x.test", &["b@y.test"], b"one\r\n").await;
    let b = push(&mut conn, "a@x.test", &["b@y.test"], b"two\r\n").await;
    let c = push(&mut conn, "a@x.test", &["b@y.test"], b"three\r\n").await;
    server.finish().await;
    (conn, [a, b, c])
}

#[tokio::test]
async fn a_dropped_line_leaves_what_was_answered_answered() {
    // The first is answered; the line drops in the second's replies.
    let (mut conn, [a, b, c]) =
        three_then("250 ok\r\n250 ok\r\n250 2.0.0 one\r\n250 ok\r\n250 ok\r\n").await;
    assert_eq!(
        conn.settle_chunked(a).await.unwrap().data.unwrap().text,
        "2.0.0 one"
    );
    let b = conn.settle_chunked(b).await.unwrap_err();
    assert!(
        matches!(b, SmtpError::Closed { .. } | SmtpError::Io { .. }),
        "{b:?}"
    );
    assert!(matches!(
        conn.settle_chunked(c).await,
        Err(SmtpError::Unusable)
    ));
    assert!(!conn.is_usable());
    assert!(matches!(
        conn.send_chunked(&envelope("a@x.test", &["b@y.test"]), b"four\r\n")
            .await,
        Streamed::Lost(SmtpError::Unusable)
    ));
}

#[tokio::test]
async fn a_421_in_the_window_answers_that_message_and_ends_the_stream() {
    let (mut conn, [a, b, c]) = three_then(
        "250 ok\r\n250 ok\r\n250 2.0.0 one\r\n250 ok\r\n421 4.7.0 too many messages, closing\r\n",
    )
    .await;
    assert!(conn.settle_chunked(a).await.is_ok());
    let b = conn.settle_chunked(b).await.unwrap_err();
    assert!(
        matches!(&b, SmtpError::Rejected { reply, .. } if reply.code == 421),
        "{b:?}"
    );
    assert!(!b.is_permanent());
    assert!(matches!(
        conn.settle_chunked(c).await,
        Err(SmtpError::Unusable)
    ));
}

#[tokio::test]
async fn a_421_before_the_next_transaction_began_is_the_sessions_end_not_its_report() {
    // The second message's RSET or MAIL answered 421: its transaction
    // never began. Once its MAIL was accepted, a 421 is its own outcome.
    let one = "250 ok\r\n250 ok\r\n250 2.0.0 one\r\n";
    for (second, began) in [
        ("421 4.7.0 too many\r\n", false),
        ("250 ok\r\n421 4.3.2 shutting down\r\n", false),
        ("250 ok\r\n250 ok\r\n421 4.7.0 too many\r\n", true),
        (
            "250 ok\r\n250 ok\r\n250 ok\r\n421 4.7.0 slow down\r\n",
            true,
        ),
    ] {
        let (mut conn, [a, b, c]) = three_then(&format!("{one}{second}")).await;
        assert!(conn.settle_chunked(a).await.is_ok());
        let b = conn.settle_chunked(b).await.unwrap_err();
        assert!(
            matches!(&b, SmtpError::Rejected { reply, .. } if reply.code == 421),
            "{b:?}"
        );
        assert_eq!(b.closed_before_transaction(), !began, "{second:?}: {b:?}");
        assert!(matches!(
            conn.settle_chunked(c).await,
            Err(SmtpError::Unusable)
        ));
    }
}

#[tokio::test]
async fn a_reply_lost_behind_another_leaves_the_message_in_doubt() {
    // Everything of the second message was written before its first
    // reply, on a line that was alive (the first was being answered): the
    // relay may have taken it, whichever reply was lost, even the RSET's
    // (a server that flushes its replies only once it has read all that
    // came, as Postfix does with PIPELINING, sends none before the end).
    let one = "250 ok\r\n250 ok\r\n250 2.0.0 one\r\n";
    for second in [
        "",
        "250 ok\r\n",
        "250 ok\r\n250 ok\r\n",
        "250 ok\r\n250 ok\r\n250 ok\r\n",
    ] {
        let (mut conn, [a, b, c]) = three_then(&format!("{one}{second}")).await;
        assert!(conn.settle_chunked(a).await.is_ok());
        let b = conn.settle_chunked(b).await.unwrap_err();
        assert!(!b.connection_was_stale(), "{second:?}: {b:?}");
        assert!(
            b.to_string().contains("may be sent more than once"),
            "{second:?}: {b}"
        );
        assert!(matches!(
            conn.settle_chunked(c).await,
            Err(SmtpError::Unusable)
        ));
    }
}

#[tokio::test]
async fn a_kept_connection_found_closed_at_its_rset_took_nothing() {
    // The first message was answered; the next one on the kept connection
    // owes the RSET that ends the first (or, on a connection just emptied,
    // the RSET a refused message leaves owed). That RSET goes alone and
    // waits: the line is found closed (or the relay says 421) before any
    // reply, so the connection went stale, and nothing of the message was
    // written.
    let cases = [
        ("250 2.0.0 one\r\n", ""),
        ("250 2.0.0 one\r\n", "421 4.4.2 Timeout exceeded\r\n"),
        ("554 5.7.1 refused\r\n", ""),
    ];
    for (one, end) in cases {
        let refused = one.starts_with('5');
        let mut script = Script::default()
            .hello(STREAMING)
            .rx(&first("one\r\n"))
            .tx(&format!("250 ok\r\n250 ok\r\n{one}"))
            .rx("RSET\r\n");
        if !end.is_empty() {
            script = script.tx(end);
        }
        let server = TestServer::start(script.close()).await;
        let mut conn = Connection::open(&client(server.addr)).await.unwrap();
        let a = push(&mut conn, "a@x.test", &["b@y.test"], b"one\r\n").await;
        let a = conn.settle_chunked(a).await.unwrap();
        assert_eq!(a.data.unwrap().is_positive(), !refused);
        if !refused {
            conn.reset().await.unwrap();
        }
        let b = conn
            .send_chunked(&envelope("a@x.test", &["b@y.test"]), b"two\r\n")
            .await;
        let t = server.finish().await;
        match b {
            Streamed::Lost(e) => assert!(e.connection_was_stale(), "{end:?}: {e:?}"),
            other => panic!("{end:?}: expected Lost, got {other:?}"),
        }
        assert!(conn.is_spent());
        assert!(
            !t.text().contains("two") && t.after_script().is_empty(),
            "{end:?}: something of the message was written: {:?} then {:?}",
            t.text(),
            t.after_script()
        );
    }
}

#[tokio::test]
async fn a_kept_connection_is_proven_before_the_body_and_a_loss_after_is_in_doubt() {
    // The RSET owed by a kept connection is answered before anything of
    // the message goes out; the transaction then needs no RSET. If the
    // relay then reads it all (it may take the message) and the line drops
    // before any reply, the message is in doubt, not a stale connection's.
    let script = Script::default()
        .hello(STREAMING)
        .rx(&first("one\r\n"))
        .tx("250 ok\r\n250 ok\r\n250 2.0.0 one\r\n")
        .rx("RSET\r\n")
        .quiet()
        .tx("250 2.0.0 ok\r\n")
        .rx(&first("two\r\n"))
        .close();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let a = push(&mut conn, "a@x.test", &["b@y.test"], b"one\r\n").await;
    assert!(conn.settle_chunked(a).await.is_ok());
    conn.reset().await.unwrap();
    let b = push(&mut conn, "a@x.test", &["b@y.test"], b"two\r\n").await;
    server.finish().await;
    let b = conn.settle_chunked(b).await.unwrap_err();
    assert!(!b.connection_was_stale(), "{b:?}");
    assert!(b.to_string().contains("may be sent more than once"), "{b}");
}

#[tokio::test]
async fn a_rset_owed_goes_first_and_only_streaming_servers_stream() {
    // After a transaction ended without a body, the kept connection owes a
    // RSET: it goes first, alone, answered before the streamed transaction.
    let script = Script::default()
        .hello(STREAMING)
        .rx("MAIL FROM:<a@x.test>\r\nRCPT TO:<gone@y.test>\r\nDATA\r\n")
        .tx("250 ok\r\n550 5.1.1 gone\r\n554 5.5.1 no valid recipients\r\n")
        .rx("RSET\r\n")
        .tx("250 ok\r\n")
        .rx(&first("two\r\n"))
        .tx("250 ok\r\n250 ok\r\n250 2.0.0 two\r\n")
        .quit();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let refused = conn
        .send(&envelope("a@x.test", &["gone@y.test"]), b"one\r\n")
        .await
        .unwrap();
    assert_eq!(codes(&refused), [550]);
    conn.reset().await.unwrap();
    let b = push(&mut conn, "a@x.test", &["b@y.test"], b"two\r\n").await;
    assert!(conn.settle_chunked(b).await.is_ok());
    conn.quit().await;
    server.finish().await;

    for exts in [&["PIPELINING"][..], &["CHUNKING"][..]] {
        let server = TestServer::start(Script::default().hello(exts).quit()).await;
        let mut conn = Connection::open(&client(server.addr)).await.unwrap();
        assert!(!conn.streams(), "{exts:?}");
        assert!(matches!(
            conn.send_chunked(&envelope("a@x.test", &["b@y.test"]), b"x\r\n")
                .await,
            Streamed::NotStreamable
        ));
        conn.quit().await;
        server.finish().await;
    }
}

#[tokio::test]
async fn quitting_with_replies_unread_closes_without_quit() {
    let script = Script::default().hello(STREAMING).rx(&first("one\r\n"));
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let _unread = push(&mut conn, "a@x.test", &["b@y.test"], b"one\r\n").await;
    conn.quit().await;
    let t = server.finish().await;
    assert_eq!(t.after_script(), "", "no QUIT with replies unread");
}

#[tokio::test]
async fn a_failed_write_leaves_the_replies_before_it_readable() {
    // The server answers the first message and goes away; writing the
    // second fails. The first one's replies arrived before: they must still
    // be read (dropping the connection now would lose an answered message
    // and send it again).
    let script = Script::default()
        .hello(STREAMING)
        .rx(&first("one\r\n"))
        .tx("250 ok\r\n250 ok\r\n250 2.0.0 one\r\n")
        .close();
    let server = TestServer::start(script).await;
    let mut conn = Connection::open(&client(server.addr)).await.unwrap();
    let a = push(&mut conn, "a@x.test", &["b@y.test"], b"one\r\n").await;
    server.finish().await;
    let big = vec![b'x'; 4 * 1024 * 1024];
    let mut lost = false;
    for _ in 0..20 {
        match conn
            .send_chunked(&envelope("a@x.test", &["b@y.test"]), &big)
            .await
        {
            Streamed::Lost(_) => {
                lost = true;
                break;
            }
            Streamed::InFlight(_unanswered) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(lost, "writing to a closed connection never failed");
    assert!(!conn.is_usable());
    assert!(
        !conn.is_spent(),
        "the first message's replies are still due"
    );
    assert_eq!(
        conn.settle_chunked(a).await.unwrap().data.unwrap().text,
        "2.0.0 one"
    );
}
