//! Every way in (SMTP, `sendmail` as root, as another user through the
//! maildrop, `sendmail -bs`, the pickup) leaves the same trace in the
//! daemon's log and metrics: one accepted line and one
//! `relayq_accepted_messages_total` per message, and one
//! `NOQUEUE: reject:` line and one `relayq_rejected_total{reason}` per
//! refused message or recipient, so an operator finds either with one grep.

use std::time::Duration;

use crate::sendmail::{
    as_nobody, can_switch_user, drop_as_nobody, open_to_others, run, sendmail, stderr,
};
use crate::support::client::{Client, queue_id, send_mail};
use crate::support::daemon::{BIN, Daemon, relay_config};
use crate::support::http::{get, status_addr};
use crate::support::upstream::FakeUpstream;

const WAIT: Duration = Duration::from_secs(20);

/// The status endpoint of the daemon's latest start (its log is kept
/// across restarts).
fn status_now(d: &Daemon) -> std::net::SocketAddr {
    status_addr(d);
    let log = d.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("status endpoint on http://"))
        .expect("a status endpoint line");
    line.split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// A counter's value in the `/metrics` text (`name` with its labels).
async fn metric(d: &Daemon, name: &str) -> f64 {
    let body = get(status_now(d), "/metrics").await.body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
}

/// Waits until a counter reaches `want` (reports arrive asynchronously).
async fn wait_metric(d: &Daemon, name: &str, want: f64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = metric(d, name).await;
        if v == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} is {v}, not {want}; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rejected(reason: &str) -> String {
    format!("relayq_rejected_total{{reason=\"{reason}\"}}")
}

/// The id in "queued as ID" of `sendmail -v` or of a `-bs` reply.
fn id_in(text: &str) -> String {
    text.split("queued as ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no queue id in {text:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_in_logs_one_accepted_line_and_counts_it() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), "status_listen = \"127.0.0.1:0\""));
    open_to_others(&d);

    let r = send_mail(
        d.addr,
        "app@example.com",
        &["a@example.net"],
        b"Subject: smtp\r\n\r\nx\r\n",
    )
    .await;
    let smtp = queue_id(&r);

    let o = sendmail(&d.config, &["-v", "b@example.net"], b"Subject: root\n\nx\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let root = id_in(&stderr(&o));

    let bs = |cmd: &mut std::process::Command| {
        cmd.args(["sendmail", "-bs", "-C"]).arg(&d.config);
    };
    let dialogue = b"HELO x\r\nMAIL FROM:<bs@example.com>\r\nRCPT TO:<c@example.net>\r\nDATA\r\nSubject: bs\r\n\r\nx\r\n.\r\nQUIT\r\n";
    let mut cmd = std::process::Command::new(BIN);
    bs(&mut cmd);
    let o = run(cmd, dialogue);
    let root_bs = id_in(&String::from_utf8_lossy(&o.stdout));

    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-C"])
        .arg(&d.config)
        .arg("d@example.net");
    let o = run(cmd, b"Subject: nobody\n\nx\n");
    assert!(o.status.success(), "{}", stderr(&o));
    let mut cmd = as_nobody(BIN);
    bs(&mut cmd);
    let o = run(cmd, dialogue);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("250 2.0.0 Ok: queued as"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    up.wait_for_messages(5, WAIT).await;
    for id in [&smtp, &root, &root_bs] {
        d.wait_log(&format!("{id}: to=<"), WAIT);
    }
    wait_metric(&d, "relayq_accepted_messages_total", 5.0).await;
    let log = d.log();
    let accepted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("(queue active)"))
        .collect();
    assert_eq!(accepted.len(), 5, "{accepted:#?}");
    let one = |needle: String| {
        let n = accepted.iter().filter(|l| l.contains(&needle)).count();
        assert_eq!(n, 1, "one accepted line with {needle:?}: {accepted:#?}");
    };
    one(format!(
        "{smtp}: client=[127.0.0.1], from=<app@example.com>, size="
    ));
    one(format!(
        "{root}: uid=0 (root), from=<root@relayq.test>, size="
    ));
    one(format!(
        "{root_bs}: uid=0 (root), from=<bs@example.com>, size="
    ));
    assert_eq!(
        accepted
            .iter()
            .filter(|l| l.contains(": uid=65534 (nobody), from=<nobody@relayq.test>, size="))
            .count(),
        2,
        "{accepted:#?}"
    );
    assert!(
        accepted
            .iter()
            .all(|l| l.contains(", nrcpt=1 (queue active)"))
    );
    // Accepted first, delivered second, as for SMTP.
    for id in [&root, &root_bs] {
        let a = log.find(&format!("{id}: uid=0")).unwrap();
        let sent = log.find(&format!("{id}: to=<")).unwrap();
        assert!(a < sent, "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_sendmail_while_the_daemon_is_down_is_logged_once_at_start() {
    let up = FakeUpstream::start().await;
    let dead = up.addr();
    up.stop().await;
    let mut d = Daemon::start(&relay_config(dead, "status_listen = \"127.0.0.1:0\""));
    assert!(d.stop());
    let o = sendmail(
        &d.config,
        &["-v", "cron@example.net"],
        b"Subject: cron\n\nx\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("not running"), "{}", stderr(&o));
    let id = id_in(&stderr(&o));

    d.restart();
    let line = d.wait_log(&format!("{id}: uid=0 (root)"), WAIT);
    assert!(
        line.contains("from=<root@relayq.test>, size=") && line.contains("nrcpt=1 (queue active)"),
        "{line}"
    );
    d.wait_log(&format!("{id}: to=<cron@example.net>"), WAIT);
    wait_metric(&d, "relayq_accepted_messages_total", 1.0).await;

    // Still queued (the upstream is down): a restart recovers it without
    // logging it again.
    let mark = d.log_mark();
    d.restart();
    d.wait_log_since(mark, "recovered queue: 1 queued", WAIT);
    // Retry now: its next attempt comes after recovery has looked at it.
    d.flush();
    d.wait_log_since(mark, &format!("{id}: to=<cron@example.net>"), WAIT);
    assert_eq!(
        d.count_log(&format!("{id}: uid=0 (root)")),
        1,
        "{}",
        d.log()
    );
    assert_eq!(metric(&d, "relayq_accepted_messages_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_smtp_refusal_logs_one_noqueue_line_and_counts_it() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(
        up.addr(),
        "status_listen = \"127.0.0.1:0\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = 3000\nmax_header_size = 600\nmax_recipients = 2\n",
    ));
    let (mut c, _) = Client::connect(d.addr).await;
    assert!(c.cmd("EHLO client.test").await.starts_with("250"));

    // (what the client sends, the reply, the reason, what the line says)
    let mut expected: Vec<(&str, String)> = Vec::new();

    let r = c.cmd("MAIL FROM:<big@example.com> SIZE=999999").await;
    assert!(r.starts_with("552 5.3.4"), "{r}");
    expected.push((
        "message_size",
        format!("NOQUEUE: reject: MAIL from [127.0.0.1]: {r}; from=<big@example.com> (SIZE=999999"),
    ));

    let r = c.cmd("MAIL FROM:<bin@example.com> BODY=BINARYMIME").await;
    assert!(r.starts_with("555"), "{r}");
    expected.push((
        "unsupported_parameter",
        format!("NOQUEUE: reject: MAIL from [127.0.0.1]: {r}; from=<bin@example.com>"),
    ));

    assert!(
        c.cmd("MAIL FROM:<app@example.com>")
            .await
            .starts_with("250")
    );
    assert!(c.cmd("RCPT TO:<one@example.net>").await.starts_with("250"));
    let r = c.cmd("RCPT TO:<j\u{f6}rg@example.net>").await;
    assert!(r.starts_with("553 5.6.7"), "{r}");
    expected.push(("smtputf8_required", format!("NOQUEUE: reject: RCPT from [127.0.0.1]: {r}; from=<app@example.com> to=<j\u{f6}rg@example.net>")));
    assert!(c.cmd("RCPT TO:<two@example.net>").await.starts_with("250"));
    let r = c.cmd("RCPT TO:<three@example.net>").await;
    assert!(r.starts_with("452 4.5.3"), "{r}");
    expected.push(("too_many_recipients", format!("NOQUEUE: reject: RCPT from [127.0.0.1]: {r}; from=<app@example.com> to=<three@example.net>")));

    // Refusals after DATA: the whole transaction is named.
    let long = format!("Subject: long\r\n\r\n{}\r\n", "x".repeat(1200));
    let big_header = format!("Subject: h\r\nX-Big: {}\r\n\r\nbody\r\n", "y".repeat(700));
    let big_body = format!(
        "Subject: b\r\n\r\n{}",
        format!("{}\r\n", "z".repeat(900)).repeat(4)
    );
    let nul = "Subject: nul\r\n\r\nbefore\0after\r\n".to_string();
    for (reason, data, code) in [
        ("line_length", long, "500 5.5.2"),
        ("header_size", big_header, "552 5.3.4"),
        ("message_size", big_body, "552 5.3.4"),
        ("nul", nul, "554 5.6.0"),
    ] {
        if reason != "line_length" {
            assert!(
                c.cmd("MAIL FROM:<app@example.com>")
                    .await
                    .starts_with("250")
            );
            for to in ["one@example.net", "two@example.net"] {
                assert!(c.cmd(&format!("RCPT TO:<{to}>")).await.starts_with("250"));
            }
        }
        assert!(c.cmd("DATA").await.starts_with("354"));
        c.send(data.as_bytes()).await;
        let r = c.cmd(".").await;
        assert!(r.starts_with(code), "{reason}: {r}");
        expected.push((reason, format!("NOQUEUE: reject: END-OF-MESSAGE from [127.0.0.1]: {r}; from=<app@example.com> to=<one@example.net> to=<two@example.net>")));
    }
    c.cmd("QUIT").await;

    for (_, line) in &expected {
        d.wait_log(line, WAIT);
    }
    assert_eq!(
        d.count_log("NOQUEUE: reject:"),
        expected.len(),
        "{}",
        d.log()
    );
    for reason in [
        "message_size",
        "unsupported_parameter",
        "too_many_recipients",
        "smtputf8_required",
        "line_length",
        "header_size",
        "nul",
    ] {
        let want = expected.iter().filter(|(r, _)| *r == reason).count() as f64;
        assert_eq!(metric(&d, &rejected(reason)).await, want, "{reason}");
    }
    assert_eq!(metric(&d, &rejected("relay_denied")).await, 0.0);
    assert_eq!(up.messages().len(), 0, "nothing refused was relayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_refusals_are_logged_by_the_daemon_as_the_local_user() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), "status_listen = \"127.0.0.1:0\""));
    open_to_others(&d);

    // -bs as nobody: a line too long.
    let dialogue = format!(
        "HELO x\r\nMAIL FROM:<n@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\nSubject: long\r\n\r\n{}\r\n.\r\nQUIT\r\n",
        "x".repeat(1200)
    );
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-bs", "-C"]).arg(&d.config);
    let o = run(cmd, dialogue.as_bytes());
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let reply = out
        .lines()
        .find(|l| l.starts_with("500 5.5.2"))
        .unwrap_or_else(|| panic!("{out}"));
    d.wait_log(&format!("NOQUEUE: reject: END-OF-MESSAGE from uid=65534 (nobody): {reply}; from=<n@example.com> to=<bob@example.net>"), WAIT);

    // -bs as root: NUL.
    let o = sendmail(
        &d.config,
        &["-bs"],
        b"HELO x\r\nMAIL FROM:<r@example.com>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\nSubject: nul\r\n\r\na\0b\r\n.\r\nQUIT\r\n",
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("554 5.6.0"), "{out}");
    d.wait_log("NOQUEUE: reject: END-OF-MESSAGE from uid=0 (root): 554 5.6.0 Error: message contains NUL characters; from=<r@example.com> to=<carol@example.net>", WAIT);

    // Plain sendmail as nobody: NUL on stdin (exit 65), and a bad address
    // (exit 67).
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-C"])
        .arg(&d.config)
        .arg("dave@example.net");
    let o = run(cmd, b"Subject: x\n\nbad\0byte\n");
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    d.wait_log("NOQUEUE: reject: sendmail from uid=65534 (nobody): line 3 contains a NUL character (exit 65); from=<nobody@relayq.test> to=<dave@example.net>", WAIT);
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-C"]).arg(&d.config).arg("eve@");
    let o = run(cmd, b"x\n");
    assert_eq!(o.status.code(), Some(67), "{}", stderr(&o));
    d.wait_log(
        "NOQUEUE: reject: sendmail from uid=65534 (nobody): bad recipient address",
        WAIT,
    );

    // A drop file the pickup refuses (a recipient that is no address).
    let file = "relayq-queue 1\nid 01AAAAAAAAAAAAAAAAAAAAAAAA\narrival 1\nsender nobody@relayq.test\nflags -\nrcpt not-an-address\nsize 12\n\nSubject: x\r\nend\n";
    drop_as_nobody(&d, "01BBBBBBBBBBBBBBBBBBBBBBBB", file);
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-C"])
        .arg(&d.config)
        .arg("frank@example.net");
    assert!(
        run(cmd, b"Subject: pokes the pickup\n\nx\n")
            .status
            .success()
    );
    let line = d.wait_log("NOQUEUE: reject: pickup from uid=65534 (nobody): maildrop file 01BBBBBBBBBBBBBBBBBBBBBBBB refused", WAIT);
    assert!(
        line.contains("moved to corrupt/") && line.contains("to=<not-an-address>"),
        "{line}"
    );

    wait_metric(&d, &rejected("line_length"), 1.0).await;
    wait_metric(&d, &rejected("nul"), 2.0).await;
    wait_metric(&d, &rejected("bad_address"), 2.0).await;
    assert_eq!(d.count_log("NOQUEUE: reject:"), 5, "{}", d.log());
}
