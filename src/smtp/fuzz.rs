//! Property tests that fuzz the session state machine: arbitrary bytes and
//! arbitrary mixes of valid and broken commands must never panic the
//! session, never hang it, and never queue a message that did not end
//! with `<CRLF>.<CRLF>` after a complete transaction.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ServerContext;
use super::session::Session;
use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::scheduler::Scheduler;
use crate::spool::{Area, Spool};

fn context(dir: &std::path::Path) -> Arc<ServerContext> {
    let mut config = Config::development(dir);
    config.smtp.command_timeout = crate::config::HumanDuration(Duration::from_secs(2));
    config.smtp.data_timeout = crate::config::HumanDuration(Duration::from_secs(2));
    config.smtp.max_message_size = crate::config::Size(64 * 1024);
    config.smtp.min_free_space = crate::config::Size(0);
    let spool = Spool::open(&dir.join("spool")).unwrap();
    let clock = Clock::new();
    let (_s, handle, _jobs) = Scheduler::new(spool.clone(), clock.clone(), 1);
    Arc::new(ServerContext::new(Arc::new(config), spool, clock, handle).unwrap())
}

/// Runs one session over an in-memory pipe fed with `input`, then EOF.
fn run(rt: &tokio::runtime::Runtime, ctx: &Arc<ServerContext>, input: Vec<u8>) -> Vec<u8> {
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let session = Session::new(
            server,
            "127.0.0.1:1".parse().unwrap(),
            ctx.clone(),
            shutdown,
        );
        let task = tokio::spawn(session.run());
        let (mut r, mut w) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&input).await;
            let _ = w.shutdown().await;
        });
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "session hung");
        assert!(
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_ok_and(|r| r.is_ok()),
            "session panicked or hung"
        );
        let _ = writer.await;
        out
    })
}

fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"EHLO fuzz.test\r\n".to_vec()),
        Just(b"HELO fuzz.test\r\n".to_vec()),
        Just(b"MAIL FROM:<a@example.com>\r\n".to_vec()),
        Just(b"MAIL FROM:<> SIZE=99999999999\r\n".to_vec()),
        Just(b"MAIL FROM:<a@example.com> BODY=8BITMIME SMTPUTF8\r\n".to_vec()),
        Just(b"RCPT TO:<b@example.net>\r\n".to_vec()),
        Just(b"RCPT TO:<b@example.net> NOTIFY=NEVER\r\n".to_vec()),
        Just(b"DATA\r\n".to_vec()),
        Just(b"Subject: x\r\n\r\nbody\r\n".to_vec()),
        Just(b".\r\n".to_vec()),
        Just(b"\n.\n".to_vec()),
        Just(b"..\r\n".to_vec()),
        Just(b"RSET\r\n".to_vec()),
        Just(b"NOOP\r\n".to_vec()),
        Just(b"STARTTLS\r\n".to_vec()),
        Just(b"AUTH PLAIN\r\n".to_vec()),
        Just(b"AUTH LOGIN\r\n".to_vec()),
        Just(b"BDAT 10 LAST\r\n".to_vec()),
        Just(b"VRFY x\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(
            prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), Just(0u8), Just(b'A')],
            0..16
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let out = run(&rt, &ctx, input);
        prop_assert!(out.starts_with(b"220 "));
        prop_assert!(out.ends_with(b"\r\n"));
    }

    #[test]
    fn command_soup_never_panics_and_queues_only_complete_messages(pieces in proptest::collection::vec(piece(), 0..40)) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let out = run(&rt, &ctx, pieces.concat());
        let text = String::from_utf8_lossy(&out);
        // Every line is a well-formed reply.
        for line in text.split("\r\n").filter(|l| !l.is_empty()) {
            prop_assert!(line.len() >= 3 && line.as_bytes()[..3].iter().all(u8::is_ascii_digit), "bad reply line {line:?}");
        }
        // Exactly as many messages are queued as were acknowledged.
        let acked = text.matches("250 2.0.0 Ok: queued as").count();
        let queued = ctx.spool.list(Area::Queue).unwrap().len();
        prop_assert_eq!(acked, queued);
    }
}
