//! Nothing answered `250` is lost, and nothing delivered is sent again:
//! restarts with a full queue, a crash between recipients of one message,
//! `kill -9` while many clients are sending, SIGTERM during a delivery, an
//! upstream that drops the line at every stage, and damaged files in the
//! spool at start.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::{FakeUpstream, Received, Script};

const WAIT: Duration = Duration::from_secs(30);

/// The Subject of a message as the upstream got it.
pub(crate) fn subject(m: &Received) -> String {
    m.text()
        .lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or("<none>")
        .to_string()
}

/// How many times each Subject arrived.
fn subject_counts(got: &[Received]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in got {
        *counts.entry(subject(m)).or_insert(0) += 1;
    }
    counts
}

/// Polls until every subject in `want` arrived at the upstream.
async fn wait_for_subjects(up: &FakeUpstream, want: &BTreeSet<String>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let counts = subject_counts(&up.messages());
        let missing: Vec<&String> = want.iter().filter(|s| !counts.contains_key(*s)).collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{} message(s) answered 250 never arrived, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Brings the upstream back on the address it had. The port was free when
/// the old one stopped, but another test's socket may hold it for a
/// moment, so a busy port is retried for a few seconds.
async fn upstream_back_on(addr: SocketAddr) -> FakeUpstream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match FakeUpstream::start_on(addr).await {
            Ok(up) => return up,
            Err(e) if Instant::now() < deadline => {
                eprintln!("upstream port {addr} busy ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot bring the upstream back on {addr}: {e}"),
        }
    }
}

/// Waits until the queue directory is empty.
async fn wait_queue_empty(d: &Daemon, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while d.queued() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} message(s) still queued; log:\n{}",
            d.queued(),
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_a_full_queue_delivers_everything_once() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let mut d = Daemon::start(&relay_config(addr, ""));
    const N: usize = 25;
    let mut ids = Vec::new();
    for i in 0..N {
        let body = format!("Subject: full-{i}\r\n\r\nmessage {i}\r\n");
        let r = send_mail(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            body.as_bytes(),
        )
        .await;
        assert!(r.starts_with("250 2.0.0"), "{r}");
        ids.push(queue_id(&r));
    }
    // Each was tried once and deferred, so each file carries a retry time.
    for id in &ids {
        d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
    }
    assert_eq!(d.count_log("status=deferred"), N, "{}", d.log());
    assert!(d.stop(), "SIGTERM: relayq must exit 0; log:\n{}", d.log());
    assert_eq!(d.queued(), N, "the queue survives a shutdown");

    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "recovered queue:", WAIT);
    assert!(line.contains(&format!("{N} queued")), "{line}");
    let up = upstream_back_on(addr).await;
    d.flush();
    let got = up.wait_for_messages(N, WAIT).await;
    for id in &ids {
        d.wait_log_since(mark, &format!("{id}: removed"), WAIT);
    }
    assert_eq!(d.queued(), 0);
    let counts = subject_counts(&up.messages());
    assert_eq!(counts.len(), N, "every message arrived: {counts:?}");
    assert!(
        counts.values().all(|&n| n == 1),
        "each message exactly once: {counts:?}"
    );
    assert_eq!(got.len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_recipients_are_not_sent_again_after_a_crash() {
    let up = FakeUpstream::start_with(Script::default().rcpt(
        "carol@example.net",
        451,
        "4.2.1 <carol@example.net>: mailbox busy, try later",
    ))
    .await;
    let mut d = Daemon::start(&relay_config(up.addr(), ""));
    let body = b"Subject: three recipients\r\n\r\nfor alice, bob and carol\r\n";
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["alice@example.net", "bob@example.net", "carol@example.net"],
        body,
    )
    .await;
    let id = queue_id(&r);
    d.wait_log(&format!("{id}: to=<carol@example.net>"), WAIT);
    for rcpt in ["alice", "bob"] {
        let line = d.wait_log(&format!("{id}: to=<{rcpt}@example.net>"), WAIT);
        assert!(line.contains("status=sent"), "{line}");
    }
    let line = d.wait_log(&format!("{id}: to=<carol@example.net>"), WAIT);
    assert!(
        line.contains("status=deferred") && line.contains("mailbox busy"),
        "{line}"
    );
    assert_eq!(
        up.messages()[0].rcpts,
        vec!["alice@example.net", "bob@example.net"]
    );

    // kill -9: the "delivered" records were fsynced before they counted.
    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "recovered queue:", WAIT);
    assert!(line.contains("1 queued"), "{line}");
    up.set_script(Script::default());
    d.flush();
    let got = up.wait_for_messages(2, WAIT).await;
    d.wait_log_since(mark, &format!("{id}: removed"), WAIT);
    assert_eq!(
        got[1].rcpts,
        vec!["carol@example.net"],
        "only carol is retried"
    );
    assert_eq!(got[0].data, got[1].data, "the same message both times");
    assert!(got[1].data.ends_with(body));

    let mut per_rcpt: BTreeMap<String, usize> = BTreeMap::new();
    for m in up.messages() {
        for r in m.rcpts {
            *per_rcpt.entry(r).or_default() += 1;
        }
    }
    let expected: BTreeMap<String, usize> = ["alice", "bob", "carol"]
        .iter()
        .map(|r| (format!("{r}@example.net"), 1))
        .collect();
    assert_eq!(per_rcpt, expected, "each recipient exactly once");
    // No RCPT for alice or bob after the restart, not even a rejected one.
    let rcpt_cmds = up
        .commands()
        .iter()
        .filter(|c| c.contains("RCPT TO:<alice") || c.contains("RCPT TO:<bob"))
        .count();
    assert_eq!(rcpt_cmds, 2, "{:#?}", up.commands());
    assert_eq!(d.queued(), 0);
}

/// What the sending clients saw.
#[derive(Default)]
pub(crate) struct Tally {
    /// Subject -> queue id, for every message answered 250.
    pub accepted: Mutex<BTreeMap<String, String>>,
    /// Subjects whose end of data was sent but got no reply (in flight
    /// when relayq died): they may or may not arrive.
    pub unanswered: Mutex<BTreeSet<String>>,
    pub count: AtomicUsize,
}

/// One SMTP client that keeps sending until `stop` or until relayq goes
/// away; errors end it quietly (relayq is about to be killed). Subjects
/// are `<prefix>-c<client>-m<n>`.
pub(crate) async fn sender(
    addr: SocketAddr,
    prefix: String,
    client: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut n = 0;
    'conn: while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = TcpStream::connect(addr).await else {
            return;
        };
        let mut io = BufReader::new(stream);
        if !expect(&mut io, None, "220").await
            || !expect(&mut io, Some("EHLO load.test"), "250").await
        {
            return;
        }
        // A few messages per connection, then a fresh one.
        for _ in 0..5 {
            if stop.load(Ordering::Relaxed) {
                break 'conn;
            }
            n += 1;
            let subject = format!("{prefix}-c{client}-m{n}");
            let ok = expect(&mut io, Some("MAIL FROM:<app@example.com>"), "250").await
                && expect(
                    &mut io,
                    Some(&format!("RCPT TO:<c{client}@example.net>")),
                    "250",
                )
                .await
                && expect(&mut io, Some("DATA"), "354").await;
            if !ok {
                return;
            }
            let body = format!(
                "Subject: {subject}\r\n\r\nmessage {n} from client {client}\r\n{}\r\n.\r\n",
                "x".repeat(200)
            );
            if io.get_mut().write_all(body.as_bytes()).await.is_err() {
                return;
            }
            match read_reply(&mut io).await {
                Some(r) if r.starts_with("250 ") => {
                    tally.accepted.lock().unwrap().insert(subject, queue_id(&r));
                    tally.count.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    tally.unanswered.lock().unwrap().insert(subject);
                    return;
                }
            }
        }
        let _ = expect(&mut io, Some("QUIT"), "221").await;
    }
}

/// Sends `cmd` (if any) and checks the reply's code; false on any error.
async fn expect(io: &mut BufReader<TcpStream>, cmd: Option<&str>, code: &str) -> bool {
    if let Some(cmd) = cmd
        && io
            .get_mut()
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .is_err()
    {
        return false;
    }
    read_reply(io).await.is_some_and(|r| r.starts_with(code))
}

/// The last line of one reply; None on EOF, error or a 10 s silence.
async fn read_reply(io: &mut BufReader<TcpStream>) -> Option<String> {
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), io.read_line(&mut line))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Some(line.trim_end().to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_while_clients_send_loses_nothing_answered_250() {
    // A slightly slow upstream, so deliveries are in flight at the kill too.
    let up = FakeUpstream::start().await;
    let mut d = Daemon::start(&relay_config(up.addr(), ""));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    const CLIENTS: usize = 12;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        tasks.push(tokio::spawn(sender(
            d.addr,
            "load".into(),
            client,
            stop.clone(),
            tally.clone(),
        )));
    }
    // Let the load build up, then pull the plug in the middle of it.
    let deadline = Instant::now() + WAIT;
    while tally.count.load(Ordering::Relaxed) < 150 {
        assert!(Instant::now() < deadline, "clients are not getting through");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Anything the dead daemon had fully sent has reached the upstream now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before_kill = subject_counts(&up.messages());
    let accepted = tally.accepted.lock().unwrap().clone();
    let unanswered = tally.unanswered.lock().unwrap().clone();
    let in_queue = d.queued();

    let mark = d.log_mark();
    d.restart();
    d.wait_log_since(mark, "recovered queue:", WAIT);
    d.flush();
    let want: BTreeSet<String> = accepted.keys().cloned().collect();
    wait_for_subjects(&up, &want, WAIT).await;
    wait_queue_empty(&d, WAIT).await;

    let after = subject_counts(&up.messages());
    let duplicates: Vec<(&String, usize)> = after
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, n)| (s, *n))
        .collect();
    let missing: Vec<&String> = want.iter().filter(|s| !after.contains_key(*s)).collect();
    let report = format!(
        "{} clients; {} messages answered 250, {} unanswered at the kill, \
         {} at the upstream before the kill, {} left in queue/ at the kill; \
         after restart: {} distinct at the upstream, missing {:?}, duplicates {:?}",
        CLIENTS,
        accepted.len(),
        unanswered.len(),
        before_kill.len(),
        in_queue,
        after.len(),
        missing,
        duplicates
    );
    eprintln!("kill -9 test: {report}");
    assert!(missing.is_empty(), "{report}");
    assert!(accepted.len() >= 150, "{report}");
    // At least once: a duplicate is only allowed for a message whose first
    // copy reached the upstream before the kill (its "delivered" record may
    // not have been fsynced yet), and then only one more copy.
    for (s, n) in &duplicates {
        assert!(
            *n == 2 && before_kill.get(*s) == Some(&1),
            "{s} arrived {n} times, {} of them before the kill: not explained by the kill; {report}",
            before_kill.get(*s).copied().unwrap_or(0)
        );
    }
    // Nothing arrived that no client sent.
    for s in after.keys() {
        assert!(
            accepted.contains_key(s) || unanswered.contains(s),
            "{s} arrived but was never sent; {report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_half_written_files_at_start() {
    let up = FakeUpstream::start().await;
    let addr = up.addr();
    up.stop().await;
    let mut d = Daemon::start(&relay_config(addr, ""));
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["bob@example.net"],
        b"Subject: good\r\n\r\nstill here\r\n",
    )
    .await;
    let good = queue_id(&r);
    d.wait_log(&format!("{good}: to=<bob@example.net>"), WAIT);
    assert!(d.stop());

    let spool = d.spool();
    let garbage = "01JAAAAAAAAAAAAAAAAAAAAAAA";
    std::fs::write(
        spool.join("queue").join(garbage),
        b"this is not a queue file\n",
    )
    .unwrap();
    // A real queue file cut short in the middle of the message body.
    let truncated = "01JBBBBBBBBBBBBBBBBBBBBBBB";
    let whole = std::fs::read(spool.join("queue").join(&good)).unwrap();
    let body_start = whole.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    std::fs::write(
        spool.join("queue").join(truncated),
        &whole[..body_start + 10],
    )
    .unwrap();
    // An accept that never finished (its client never got 250).
    let half = "01JCCCCCCCCCCCCCCCCCCCCCCC";
    std::fs::write(spool.join("tmp").join(half), &whole[..40]).unwrap();

    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "recovered queue:", WAIT);
    assert!(
        line.contains("1 queued")
            && line.contains("2 corrupt")
            && line.contains("1 unfinished writes discarded"),
        "{line}"
    );
    for id in [garbage, truncated] {
        let line = d.wait_log_since(mark, &format!("{id}: queue file is corrupt"), WAIT);
        assert!(line.contains("ERROR"), "logged as an error: {line}");
        assert!(line.contains("moved to corrupt/"), "{line}");
        assert!(
            spool.join("corrupt").join(id).exists(),
            "{id} kept in corrupt/"
        );
        assert!(
            !spool.join("queue").join(id).exists(),
            "{id} left in queue/"
        );
    }
    assert_eq!(
        std::fs::read(spool.join("corrupt").join(garbage)).unwrap(),
        b"this is not a queue file\n",
        "a corrupt file is kept unchanged for a human"
    );
    assert!(
        !spool.join("tmp").join(half).exists(),
        "tmp/ file discarded"
    );

    // The good message is untouched by its broken neighbours.
    let up = upstream_back_on(addr).await;
    d.flush();
    let got = up.wait_for_messages(1, WAIT).await;
    d.wait_log_since(mark, &format!("{good}: removed"), WAIT);
    assert!(
        got[0]
            .data
            .ends_with(b"Subject: good\r\n\r\nstill here\r\n")
    );
    assert_eq!(got.len(), 1);
    assert_eq!(d.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_delivery_in_flight_finish() {
    // A slow upstream: each reply takes 300 ms.
    let up =
        FakeUpstream::start_with(Script::default().reply_delay(Duration::from_millis(300))).await;
    let mut d = Daemon::start(&relay_config(up.addr(), ""));
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["bob@example.net"],
        b"Subject: in flight\r\n\r\nbeing relayed at SIGTERM\r\n",
    )
    .await;
    let id = queue_id(&r);
    // SIGTERM once the transaction has started upstream.
    let deadline = Instant::now() + WAIT;
    while !up
        .commands()
        .iter()
        .any(|c| c.contains("MAIL FROM:<app@example.com>"))
    {
        assert!(Instant::now() < deadline, "no delivery started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        up.messages().is_empty(),
        "terminated too late to test anything"
    );
    d.terminate();
    let status = d.wait_exit(WAIT).expect("relayq exits");
    assert!(status.success(), "{status:?}; log:\n{}", d.log());
    let line = d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
    assert!(
        line.contains("status=sent"),
        "the delivery finished: {line}"
    );
    d.wait_log(&format!("{id}: removed"), WAIT);
    assert_eq!(up.messages().len(), 1);
    assert_eq!(d.queued(), 0);

    // Nothing is sent again after a restart.
    up.set_script(Script::default());
    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "recovered queue:", WAIT);
    assert!(line.contains("0 queued"), "{line}");
    let r = send_mail(
        d.addr,
        "app@example.com",
        &["carol@example.net"],
        b"Subject: control\r\n\r\nx\r\n",
    )
    .await;
    d.wait_log(&format!("{}: removed", queue_id(&r)), WAIT);
    let subjects = subject_counts(&up.messages());
    assert_eq!(
        subjects,
        BTreeMap::from([("control".to_string(), 1), ("in flight".to_string(), 1)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_line_at_any_stage_neither_loses_nor_duplicates() {
    use crate::support::upstream::Stage;
    for stage in [
        Stage::Greeting,
        Stage::Ehlo,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::DataBody,
        Stage::DataEnd,
    ] {
        // A fresh pair per stage: a connection relayq kept open from an
        // earlier message would skip the greeting and EHLO.
        let up = FakeUpstream::start_with(Script::default().drop_at(stage)).await;
        let d = Daemon::start(&relay_config(up.addr(), ""));
        let body = format!("Subject: drop at {stage:?}\r\n\r\nline one\r\nline two\r\n");
        let r = send_mail(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            body.as_bytes(),
        )
        .await;
        let id = queue_id(&r);
        let line = d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
        assert!(
            line.contains("status=deferred"),
            "drop at {stage:?}: {line}"
        );
        assert_eq!(d.queued(), 1, "drop at {stage:?}: still queued");
        assert!(
            up.messages().is_empty(),
            "drop at {stage:?}: nothing recorded"
        );

        up.set_script(Script::default());
        d.flush();
        let got = up.wait_for_messages(1, WAIT).await;
        d.wait_log(&format!("{id}: removed"), WAIT);
        assert_eq!(got.len(), 1, "drop at {stage:?}: delivered once");
        assert!(got[0].data.ends_with(body.as_bytes()), "drop at {stage:?}");
        let line = d
            .log()
            .lines()
            .rfind(|l| l.contains(&format!("{id}: to=<bob@example.net>")))
            .unwrap()
            .to_string();
        assert!(line.contains("status=sent"), "{line}");
        assert_eq!(d.queued(), 0);
    }
}

/// Queue files are reused: once the first messages are delivered, later
/// ones go into the same files (no new file per message), arrive intact,
/// and a restart in between neither loses nor duplicates anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_files_are_reused_across_messages_and_restarts() {
    let up = FakeUpstream::start().await;
    let mut d = Daemon::start(&relay_config(up.addr(), ""));
    let slots_dir = d.spool().join("slots");
    let slots = || std::fs::read_dir(&slots_dir).unwrap().count();
    let send = |i: usize, addr: SocketAddr| async move {
        let body = format!(
            "Subject: reuse {i}\r\n\r\n{}",
            "z".repeat(97).repeat_lines(i)
        );
        let r = send_mail(
            addr,
            "app@example.com",
            &["rcpt@example.net"],
            body.as_bytes(),
        )
        .await;
        queue_id(&r)
    };
    for i in 0..5 {
        let id = send(i, d.addr).await;
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    let after_first = slots();
    assert!((1..=5).contains(&after_first), "{after_first} slot files");
    d.restart();
    for i in 5..25 {
        let id = send(i, d.addr).await;
        d.wait_log(&format!("{id}: removed"), WAIT);
    }
    assert_eq!(slots(), after_first, "a delivered message's file is reused");
    let got = up.messages();
    assert_eq!(got.len(), 25);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(subject(m), format!("reuse {i}"));
        let want = format!("\r\n\r\n{}", "z".repeat(97).repeat_lines(i));
        assert!(m.text().ends_with(&want), "message {i} damaged");
    }
    assert_eq!(d.queued(), 0);
}

/// `n` lines of this text, CRLF-terminated (message sizes that vary).
trait RepeatLines {
    fn repeat_lines(&self, n: usize) -> String;
}

impl RepeatLines for String {
    fn repeat_lines(&self, n: usize) -> String {
        format!("{self}\r\n").repeat(n)
    }
}

/// A SIGTERM (or Ctrl-C) during start-up, from the daemon's first log
/// line on, is a graceful stop: the handlers are in place before anything
/// is said, so a supervisor or script that stops relayq as soon as it
/// speaks never kills it half-way (exit by signal), nor is ignored.
#[test]
fn a_stop_during_start_up_is_graceful() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    for signal in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relayq.toml");
        std::fs::write(
            &config,
            format!(
                "hostname = \"relayq.test\"\nspool_dir = \"{d}/spool\"\nstatus_listen = \"127.0.0.1:0\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[capture]\nmaildir = \"{d}/Maildir\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let mut child = Command::new(crate::support::daemon::BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        err.read_line(&mut first).unwrap();
        assert!(
            !first.contains("started:"),
            "an earlier line first: {first}"
        );
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "signal {signal} after {first:?}: {status:?}\n{rest}"
        );
        assert!(rest.contains("stopped"), "{rest}");
    }
}
