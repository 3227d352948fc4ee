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
    // The metric is counted after the line is written, but the line still
    // has to come through the test's log reader.
    let deadline = std::time::Instant::now() + WAIT;
    while d.count_log("(queue active)") < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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
    // Every local user may choose the sender (the -bs MAIL FROM stands);
    // the real user is on the line all the same.
    assert_eq!(
        accepted
            .iter()
            .filter(
                |l| l.contains(": uid=65534 (nobody), from=<nobody@relayq.test>, size=")
                    || l.contains(": uid=65534 (nobody), from=<bs@example.com>, size=")
            )
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
    // Long lines are re-encoded, not refused; a header line with no place
    // to fold (here a MIME part's) is.
    let long = format!(
        "Subject: long\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; name=\"{}\"\r\n\r\nhi\r\n--b--\r\n",
        "x".repeat(1200)
    );
    let hops: String = (0..50)
        .map(|i| {
            format!(
                "Received: from h{i} by h{}; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
                i + 1
            )
        })
        .collect();
    let hops = format!("{hops}Subject: loop\r\n\r\nx\r\n");
    let big_header = format!("Subject: h\r\nX-Big: {}\r\n\r\nbody\r\n", "y".repeat(700));
    let big_body = format!(
        "Subject: b\r\n\r\n{}",
        format!("{}\r\n", "z".repeat(900)).repeat(4)
    );
    let nul = "Subject: nul\r\n\r\nbefore\0after\r\n".to_string();
    for (reason, data, code) in [
        ("line_length", long, "554 5.6.0"),
        ("too_many_hops", hops, "554 5.4.6"),
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
        "too_many_hops",
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

    // -bs as nobody: a header line too long, with no place to fold it.
    let dialogue = format!(
        "HELO x\r\nMAIL FROM:<n@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\nSubject: long\r\nX-Token: {}\r\n\r\nx\r\n.\r\nQUIT\r\n",
        "x".repeat(1200)
    );
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-bs", "-C"]).arg(&d.config);
    let o = run(cmd, dialogue.as_bytes());
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let reply = out
        .lines()
        .find(|l| l.starts_with("554 5.6.0"))
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
        line.contains("kept as corrupt/maildrop/") && line.contains("to=<not-an-address>"),
        "{line}"
    );

    wait_metric(&d, &rejected("line_length"), 1.0).await;
    wait_metric(&d, &rejected("nul"), 2.0).await;
    wait_metric(&d, &rejected("bad_address"), 2.0).await;
    assert_eq!(d.count_log("NOQUEUE: reject:"), 5, "{}", d.log());
}

/// The limits SMTP applies at RCPT and at the end of DATA (header size,
/// number of recipients) hold for every local way in too: `sendmail` as
/// root or as another user refuses at once (exit 65, one reject line),
/// rather than queueing what SMTP refuses, or exiting 0 and leaving the
/// pickup to refuse the message later, out of the user's sight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_submissions_keep_the_smtp_limits() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(
        up.addr(),
        "status_listen = \"127.0.0.1:0\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_header_size = 600\nmax_recipients = 2\n",
    ));
    open_to_others(&d);
    // One field over the limit (Postfix's header_size_limit is per field).
    let big_header = format!("Subject: big\nX-Filler: {}\n\nbody\n", "h ".repeat(400));
    let three = ["a@example.net", "b@example.net", "c@example.net"];

    let root = |args: &[&str], input: &str| sendmail(&d.config, args, input.as_bytes());
    let nobody = |args: &[&str], input: &str| {
        let mut cmd = as_nobody(BIN);
        cmd.args(["sendmail", "-C"]).arg(&d.config).args(args);
        run(cmd, input.as_bytes())
    };
    let cases: Vec<(&str, std::process::Output, &str)> = vec![
        ("root", root(&["a@example.net"], &big_header), "header"),
        ("nobody", nobody(&["a@example.net"], &big_header), "header"),
        ("root", root(&three, "Subject: many\n\nx\n"), "recipients"),
        (
            "nobody",
            nobody(&three, "Subject: many\n\nx\n"),
            "recipients",
        ),
        (
            "nobody",
            nobody(
                &["-t", "a@example.net"],
                "To: b@example.net, c@example.net\nSubject: many\n\nx\n",
            ),
            "recipients",
        ),
    ];
    for (who, o, what) in &cases {
        assert_eq!(
            o.status.code(),
            Some(65),
            "{who}'s sendmail refuses too many {what}: {}",
            stderr(o)
        );
        assert!(stderr(o).contains(what), "{who}: {}", stderr(o));
    }
    wait_metric(&d, &rejected("header_size"), 2.0).await;
    wait_metric(&d, &rejected("too_many_recipients"), 3.0).await;
    assert_eq!(
        d.count_log("NOQUEUE: reject: sendmail from uid=0 (root): "),
        2,
        "{}",
        d.log()
    );
    assert_eq!(
        d.count_log("NOQUEUE: reject: sendmail from uid=65534 (nobody): "),
        3,
        "{}",
        d.log()
    );

    // A drop file written by hand with a header over the limit is refused
    // by the pickup, as SMTP would refuse it.
    let body = big_header.replace('\n', "\r\n");
    let file = format!(
        "relayq-queue 1\nid 01AAAAAAAAAAAAAAAAAAAAAAAA\narrival 1\nsender nobody@relayq.test\nflags -\nrcpt a@example.net\nsize {}\n\n{body}end\n",
        body.len()
    );
    drop_as_nobody(&d, "01CCCCCCCCCCCCCCCCCCCCCCCC", &file);
    let o = nobody(&["z@example.net"], "Subject: pokes the pickup\n\nx\n");
    assert!(o.status.success(), "{}", stderr(&o));
    d.wait_log(
        "NOQUEUE: reject: pickup from uid=65534 (nobody): maildrop file 01CCCCCCCCCCCCCCCCCCCCCCCC refused",
        WAIT,
    );
    wait_metric(&d, &rejected("header_size"), 3.0).await;

    // Only the message that keeps the limits was sent.
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(got[0].text().contains("Subject: pokes the pickup\r\n"));
    assert_eq!(d.count_log("(queue active)"), 1, "{}", d.log());
    assert_eq!(up.messages().len(), 1, "nothing refused was relayed");
}

/// A refusal with a long envelope (hundreds of recipients, an address of
/// thousands of characters) is logged like any other: one bounded reject
/// line that ends in "and N more", never dropped for its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_refusals_with_long_envelopes_are_logged() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), "status_listen = \"127.0.0.1:0\""));
    open_to_others(&d);
    let many: Vec<String> = (0..300)
        .map(|i| format!("recipient-number-{i:03}@example.net"))
        .collect();
    let args: Vec<&str> = many.iter().map(String::as_str).collect();
    let o = sendmail(&d.config, &args, b"Subject: x\n\na\0b\n");
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    let line = d.wait_log("NOQUEUE: reject: sendmail from uid=0 (root): line 3", WAIT);
    assert!(
        line.contains("to=<recipient-number-049@example.net> and 250 more"),
        "{line}"
    );
    assert!(!line.contains("recipient-number-050@"), "{line}");

    let long = format!("{}@example@net", "l".repeat(9000));
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-C"]).arg(&d.config).arg(&long);
    let o = run(cmd, b"Subject: x\n\nx\n");
    assert_eq!(o.status.code(), Some(67), "{}", stderr(&o));
    let line = d.wait_log(
        "NOQUEUE: reject: sendmail from uid=65534 (nobody): bad recipient address <llll",
        WAIT,
    );
    assert!(line.len() < 2000, "bounded: {} bytes", line.len());

    // A -bs session as root refusing a message with 300 recipients.
    let mut dialogue = String::from("HELO x\r\nMAIL FROM:<r@example.com>\r\n");
    for r in &many {
        dialogue.push_str(&format!("RCPT TO:<{r}>\r\n"));
    }
    dialogue.push_str("DATA\r\nSubject: nul\r\n\r\na\0b\r\n.\r\nQUIT\r\n");
    let o = sendmail(&d.config, &["-bs"], dialogue.as_bytes());
    assert!(String::from_utf8_lossy(&o.stdout).contains("554 5.6.0"));
    let line = d.wait_log("NOQUEUE: reject: END-OF-MESSAGE from uid=0 (root)", WAIT);
    assert!(line.contains(" and 250 more"), "{line}");

    wait_metric(&d, &rejected("nul"), 2.0).await;
    wait_metric(&d, &rejected("bad_address"), 1.0).await;
}

/// Holds `conns` connections to `pickup.sock` open as `nobody` without
/// sending anything, reconnecting whenever the daemon closes one: a
/// local user trying to keep everyone else's refusal reports out.
const HOG: &str = r#"
import socket, sys, threading, time
path, conns = sys.argv[1], int(sys.argv[2])
up = threading.Semaphore(0)
def hog():
    first = True
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            if first:
                up.release()
                first = False
            s.recv(1)
        except OSError:
            time.sleep(0.01)
        s.close()
for _ in range(conns):
    threading.Thread(target=hog, daemon=True).start()
for _ in range(conns):
    up.acquire()
print("ready", flush=True)
sys.stdin.read()
"#;

/// One local user holding `pickup.sock` open cannot keep the refusals of
/// others out of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_keep_other_refusals_out_of_the_log() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), "status_listen = \"127.0.0.1:0\""));
    open_to_others(&d);
    // The system's Python: one under root's home is out of nobody's reach.
    let mut hog = as_nobody("/usr/bin/python3")
        .args(["-c", HOG])
        .arg(d.spool().join("pickup.sock"))
        .arg("32")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hog.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    for i in 0..5 {
        let o = sendmail(
            &d.config,
            &[&format!("victim{i}@example.net")],
            b"Subject: x\n\na\0b\n",
        );
        assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    }
    for i in 0..5 {
        d.wait_log(
            &format!("NOQUEUE: reject: sendmail from uid=0 (root): line 3 contains a NUL character (exit 65); from=<root@relayq.test> to=<victim{i}@example.net>"),
            WAIT,
        );
    }
    let _ = hog.kill();
    let _ = hog.wait();
    wait_metric(&d, &rejected("nul"), 5.0).await;
}

/// Many `sendmail` runs refused at once (a script in a loop, cron jobs
/// firing together): each refusal report reaches the daemon's log, though
/// one user's reports are read two at a time; the others wait for a slot
/// instead of being dropped (lost from the log before, seen under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_many_sendmail_runs_at_once_are_each_logged() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), "status_listen = \"127.0.0.1:0\""));
    // Within the log budget of one user (10 lines per 10 minutes).
    let n = 9;
    std::thread::scope(|s| {
        for i in 0..n {
            let config = &d.config;
            s.spawn(move || {
                let o = sendmail(
                    config,
                    &[&format!("many{i}@example.net")],
                    b"Subject: x\n\na\0b\n",
                );
                assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
            });
        }
    });
    for i in 0..n {
        d.wait_log(&format!("to=<many{i}@example.net>"), WAIT);
    }
    assert_eq!(
        d.count_log("NOQUEUE: reject: sendmail from uid="),
        n,
        "{}",
        d.log()
    );
    wait_metric(&d, &rejected("nul"), n as f64).await;
}

/// Short of disk space (below `smtp.min_free_space`), every way in
/// refuses new mail the same way: SMTP and `-bs` with `452 4.3.1`, the
/// `sendmail` command with exit 75 (try again later) instead of filling
/// the disk the queue needs; each refusal is logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_of_disk_space_every_way_in_refuses_and_logs_it() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(
        up.addr(),
        "status_listen = \"127.0.0.1:0\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmin_free_space = 1000000000000000000\n",
    ));
    open_to_others(&d);
    let (mut c, _) = Client::connect(d.addr).await;
    assert!(c.cmd("EHLO client.test").await.starts_with("250"));
    let r = c.cmd("MAIL FROM:<app@example.com>").await;
    assert!(r.starts_with("452 4.3.1"), "{r}");

    let o = sendmail(&d.config, &["root-rcpt@example.net"], b"Subject: x\n\nx\n");
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(stderr(&o).contains("disk space"), "{}", stderr(&o));
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-C"])
        .arg(&d.config)
        .arg("nobody-rcpt@example.net");
    let o = run(cmd, b"Subject: x\n\nx\n");
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));

    d.wait_log("NOQUEUE: reject: MAIL from [127.0.0.1]: 452 4.3.1", WAIT);
    for (who, to) in [
        ("uid=0 (root)", "root-rcpt@example.net"),
        ("uid=65534 (nobody)", "nobody-rcpt@example.net"),
    ] {
        let line = d.wait_log(&format!("NOQUEUE: reject: sendmail from {who}: "), WAIT);
        assert!(
            line.contains("only") && line.contains(&format!("to=<{to}>")),
            "{line}"
        );
    }
    wait_metric(&d, &rejected("disk_full"), 3.0).await;
    assert!(
        d.spool()
            .join("maildrop")
            .read_dir()
            .unwrap()
            .next()
            .is_none()
    );
    assert!(d.spool().join("queue").read_dir().unwrap().next().is_none());
}
