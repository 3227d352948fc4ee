//! Content crafted to break the one content path (issue 12's cleanup) on
//! every way in: MIME nested deeper than recursion survives, bare CRs in
//! the header, odd DSN parameters, more recipients than allowed. A message
//! must be handled or refused with a reason; it must never take the
//! daemon down, least of all from the queue, where it would do it again
//! at every start.

use std::process::Command;
use std::time::Duration;

use crate::sendmail::{
    can_switch_user, drop_message_as_nobody, open_to_others, poke_pickup_as_nobody, run, sendmail,
    stderr,
};
use crate::support::client::{Client, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::{FakeUpstream, Received, Script};

const WAIT: Duration = Duration::from_secs(60);

/// `depth` message/rfc822 parts, each inside the one before, around a text
/// part holding `body`. Each level costs 32 bytes, so this is far under
/// the size limit. 5,000 levels overflowed the stack of a debug build;
/// past 10,000 parts relayq does not parse the structure at all.
fn nested(depth: usize, body: &str) -> Vec<u8> {
    let mut msg = b"From: app@example.com\r\nSubject: nested\r\nMIME-Version: 1.0\r\n".to_vec();
    for _ in 0..depth {
        msg.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
    }
    msg.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\n\r\n");
    msg.extend_from_slice(body.as_bytes());
    msg.extend_from_slice(b"\r\n");
    msg
}

/// The innermost part as Python's `quopri` decodes it (Python's `email`
/// package itself gives up on this depth: RecursionError).
fn innermost(m: &Received) -> Vec<u8> {
    let text = m.text();
    let body = text
        .rsplit("Content-Transfer-Encoding: quoted-printable\r\n\r\n")
        .next()
        .unwrap();
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import quopri,sys; sys.stdout.buffer.write(quopri.decodestring(sys.stdin.buffer.read()))",
    ]);
    let o = run(cmd, body.as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    o.stdout
}

fn conformant_lines(m: &Received) {
    assert!(
        m.data.split(|&b| b == b'\n').all(|l| l.len() <= 1000),
        "a line over 998 octets went upstream"
    );
}

/// The daemon still answers (it aborted on a stack overflow before).
async fn still_up(d: &Daemon, rcpt: &str) {
    let r = send_mail(
        d.addr,
        "app@example.com",
        &[rcpt],
        b"Subject: alive\r\n\r\nx\r\n",
    )
    .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_mime_nesting_is_re_encoded_on_every_way_in() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let long = "y".repeat(1500);
    let msg = nested(9_000, &long);
    let (mut c, _) = Client::connect(d.addr).await;
    c.cmd("EHLO client.test").await;
    let r = c.mail("app@example.com", &["smtp@example.net"], &msg).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    // Deeper than relayq parses: its long lines cannot be re-encoded.
    let deeper = nested(100_000, &long);
    let r = c
        .mail("app@example.com", &["deeper@example.net"], &deeper)
        .await;
    assert!(r.starts_with("554 5.6.0"), "{r}");
    let o = sendmail(&d.config, &["-i", "sendmail@example.net"], &msg);
    assert!(o.status.success(), "{}", stderr(&o));
    still_up(&d, "alive@example.net").await;
    let got = up.wait_for_messages(3, WAIT).await;
    for rcpt in ["smtp@example.net", "sendmail@example.net"] {
        let m = got.iter().find(|m| m.rcpts[0] == rcpt).unwrap();
        conformant_lines(m);
        assert_eq!(innermost(m), format!("{long}\r\n").as_bytes(), "{rcpt}");
    }
}

/// 8-bit content nested deep, accepted as it is, then converted in the
/// transport for an upstream without 8BITMIME: a queued message that
/// crashed the daemon would crash it again after every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_mime_nesting_goes_seven_bit_without_taking_the_daemon_down() {
    let up = FakeUpstream::start_with(Script::default().no_8bitmime()).await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let text = "Gr\u{fc}\u{df}e aus K\u{f6}ln";
    let msg = nested(9_000, text);
    let r = send_mail(d.addr, "app@example.com", &["deep@example.net"], &msg).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(got[0].data.is_ascii(), "8-bit octets to a 7-bit upstream");
    assert_eq!(innermost(&got[0]), format!("{text}\r\n").as_bytes());
    // Deeper than relayq parses: sent as it is (as Postfix does past its
    // nesting limit), and the daemon stays up.
    let msg = nested(100_000, text);
    let r = send_mail(d.addr, "app@example.com", &["deeper@example.net"], &msg).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    up.wait_for_messages(2, WAIT).await;
    still_up(&d, "alive@example.net").await;
    up.wait_for_messages(3, WAIT).await;
}

/// The same from a drop file a local user wrote by hand: the pickup runs
/// in the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_mime_nesting_in_a_maildrop_file_does_not_take_the_daemon_down() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    open_to_others(&d);
    let long = "z".repeat(2000);
    let body = nested(9_000, &long);
    drop_message_as_nobody(
        &d,
        "01B00000000000000000000000",
        "drop@example.net",
        "",
        &body,
    );
    poke_pickup_as_nobody(&d);
    let got = up.wait_for_messages(2, WAIT).await;
    let m = got
        .iter()
        .find(|m| m.rcpts[0] == "drop@example.net")
        .unwrap();
    conformant_lines(m);
    assert_eq!(innermost(m), format!("{long}\r\n").as_bytes());
    still_up(&d, "alive@example.net").await;
}

/// What arrived for `rcpt`, its header section and its body.
fn for_rcpt<'a>(got: &'a [Received], rcpt: &str) -> (&'a Received, String, String) {
    let m = got
        .iter()
        .find(|m| m.rcpts.iter().any(|r| r == rcpt))
        .unwrap_or_else(|| panic!("nothing for {rcpt}"));
    let text = m.text();
    let (head, body) = text.split_once("\r\n\r\n").expect("a header section");
    (m, head.to_string(), body.to_string())
}

/// "\r\r\n" line ends (a CRLF that went through a LF-to-CRLF conversion
/// once more: PHP apps that end their headers in "\r\n" behind such a
/// filter): the CR belongs to the line end. Counted as a line end of its
/// own, it made the first header line end the header section, so every
/// other field went into the body and `-t` found no recipient.
fn double_cr(rcpt: &str) -> Vec<u8> {
    format!(
        "From: app@example.com\r\r\nTo: {rcpt}\r\r\nSubject: double CR\r\r\nX-Tag: kept\r\r\n\r\r\nline one\r\r\nline two\r\r\n"
    )
    .into_bytes()
}

/// A CR inside a header line (an app that strips LF from a subject but
/// not CR): read as a line end, it made the rest a header field of its
/// own, a Bcc that `-t` obeyed or an X-Relayq-Relay that picks the route.
/// Postfix keeps the CR inside the field; relayq makes it a space, so no
/// bare CR reaches the upstream either.
fn cr_in_field(rcpt: &str) -> Vec<u8> {
    format!(
        "From: app@example.com\r\nTo: {rcpt}\r\nSubject: hi\rBcc: victim@evil.example\r\rX-Relayq-Relay: evil\r\nX-Tag: kept\r\n\r\nbody\r\n"
    )
    .into_bytes()
}

/// Builds a test message for a recipient.
type Make = fn(&str) -> Vec<u8>;

fn check_double_cr(got: &[Received], rcpt: &str) {
    let (_, head, body) = for_rcpt(got, rcpt);
    assert!(
        head.ends_with(&format!(
            "From: app@example.com\r\nTo: {rcpt}\r\nSubject: double CR\r\nX-Tag: kept"
        )),
        "{rcpt}: {head}"
    );
    assert_eq!(body, "line one\r\nline two\r\n", "{rcpt}");
}

fn check_cr_in_field(got: &[Received], rcpt: &str) {
    let (m, head, _) = for_rcpt(got, rcpt);
    assert_eq!(m.rcpts, [rcpt], "a header field was injected");
    assert!(
        head.ends_with(&format!(
            "From: app@example.com\r\nTo: {rcpt}\r\nSubject: hi Bcc: victim@evil.example  X-Relayq-Relay: evil\r\nX-Tag: kept"
        )),
        "{rcpt}: {head}"
    );
    assert!(
        !m.text().replace("\r\n", "").contains('\r'),
        "a bare CR went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_cr_in_the_header_neither_ends_it_nor_starts_a_field() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let cases: [(&str, Make); 2] = [("crcr", double_cr), ("crin", cr_in_field)];
    let mut sent = Vec::new();
    for (name, make) in cases {
        let rcpt = format!("{name}-smtp@example.net");
        let r = send_mail(d.addr, "app@example.com", &[&rcpt], &make(&rcpt)).await;
        assert!(r.starts_with("250 2.0.0"), "{r}");
        sent.push(rcpt);
        let rcpt = format!("{name}-t@example.net");
        let o = sendmail(&d.config, &["-t", "-i"], &make(&rcpt));
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        sent.push(rcpt);
        let rcpt = format!("{name}-bs@example.net");
        let session = [
            format!("EHLO local\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
                .as_bytes(),
            &make(&rcpt),
            b".\r\nQUIT\r\n",
        ]
        .concat();
        let mut cmd = Command::new(crate::support::daemon::BIN);
        cmd.args(["sendmail", "-bs", "-C"]).arg(&d.config);
        let o = run(cmd, &session);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
        sent.push(rcpt);
    }
    if can_switch_user() {
        open_to_others(&d);
        for (i, (name, make)) in cases.iter().enumerate() {
            let rcpt = format!("{name}-drop@example.net");
            let file = format!("01C{i:023}");
            drop_message_as_nobody(&d, &file, &rcpt, "", &make(&rcpt));
            sent.push(rcpt);
        }
        poke_pickup_as_nobody(&d);
        sent.push("poke@example.net".into());
    }
    let got = up.wait_for_messages(sent.len(), WAIT).await;
    for rcpt in &sent {
        if rcpt.starts_with("crcr") {
            check_double_cr(&got, rcpt);
        } else if rcpt.starts_with("crin") {
            check_cr_in_field(&got, rcpt);
        }
    }
    assert!(
        !got.iter()
            .any(|m| m.rcpts.iter().any(|r| r.contains("victim"))),
        "a Bcc injected with a bare CR was obeyed"
    );
}

/// RFC 3461 parameters come back exactly as the client gave them, or the
/// command is refused: no malformed xtext silently changed (`ENVID=a+ZZb`
/// was kept as `aZb`), no parameter twice, a UTF-8 ORCPT (RFC 6533) taken
/// and passed on without mojibake, and nothing in a value that could end
/// a command or a queue file line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_are_taken_as_written_or_refused() {
    let up = FakeUpstream::start_with(Script::default().with_dsn().rcpt(
        "gone@example.net",
        550,
        "5.1.1 no such user",
    ))
    .await;
    // Every refusal counts as a client error: allow them all.
    let d = Daemon::start(&relay_config(
        up.addr(),
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_errors = 50\n",
    ));
    let (mut c, _) = Client::connect(d.addr).await;
    c.cmd("EHLO client.test").await;
    for bad in [
        "MAIL FROM:<app@example.com> ENVID=a+ZZb",
        "MAIL FROM:<app@example.com> ENVID=a+2",
        "MAIL FROM:<app@example.com> ENVID=a=b",
        "MAIL FROM:<app@example.com> RET=FULL RET=FULL",
        "MAIL FROM:<app@example.com> RET=HDRS ENVID=x ENVID=y",
    ] {
        let r = c.cmd(bad).await;
        assert!(r.starts_with("501 5.5.4"), "{bad}: {r}");
    }
    let r = c
        .cmd("MAIL FROM:<app@example.com> ENVID=QQ+2B314159 SMTPUTF8")
        .await;
    assert!(r.starts_with("250"), "{r}");
    for bad in [
        "RCPT TO:<b@example.net> NOTIFY=SUCCESS NOTIFY=DELAY",
        "RCPT TO:<b@example.net> NOTIFY=NEVER,SUCCESS",
        "RCPT TO:<b@example.net> ORCPT=rfc822;a@example.net ORCPT=rfc822;b@example.net",
        "RCPT TO:<b@example.net> ORCPT=rfc822;b+ZZ@example.net",
        "RCPT TO:<b@example.net> ORCPT=rfc822;b+0D+0Adsn-rcpt+200+20NEVER@example.net",
        "RCPT TO:<b@example.net> ORCPT=utf-8;b\\x{A}@example.net",
    ] {
        let r = c.cmd(bad).await;
        assert!(r.starts_with("501 5.5.4"), "{bad}: {r}");
    }
    for good in [
        "RCPT TO:<j\u{f6}rg@example.net> ORCPT=utf-8;j\\x{F6}rg@example.net",
        "RCPT TO:<b@example.net> NOTIFY=SUCCESS ORCPT=rfc822;b+C3+A9+2Bx@example.net",
        "RCPT TO:<c@example.net> ORCPT=x400;c+3DUS+3Ba+3Dx",
        "RCPT TO:<gone@example.net> NOTIFY=FAILURE ORCPT=utf-8;g\u{f6}ne@example.net",
    ] {
        let r = c.cmd(good).await;
        assert!(r.starts_with("250"), "{good}: {r}");
    }
    c.cmd("DATA").await;
    c.send(b"From: app@example.com\r\nSubject: dsn\r\n\r\nbody\r\n.\r\n")
        .await;
    let r = c.reply().await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let got = up.wait_for_messages(2, WAIT).await;
    let m = got.iter().find(|m| !m.mail_from.is_empty()).unwrap();
    assert!(
        m.mail_params.contains("ENVID=QQ+2B314159"),
        "{}",
        m.mail_params
    );
    let params = |rcpt: &str| {
        let i = m.rcpts.iter().position(|r| r == rcpt).unwrap();
        m.rcpt_params[i].clone()
    };
    assert_eq!(
        params("j\u{f6}rg@example.net"),
        "ORCPT=utf-8;j\\x{F6}rg@example.net"
    );
    assert_eq!(
        params("b@example.net"),
        "NOTIFY=SUCCESS ORCPT=utf-8;b\\x{E9}\\x{2B}x@example.net"
    );
    assert_eq!(params("c@example.net"), "");
    let bounce = got.iter().find(|m| m.mail_from.is_empty()).unwrap().text();
    assert!(
        bounce.contains("Original-Recipient: utf-8; g\\x{F6}ne@example.net"),
        "{bounce}"
    );
    assert!(
        bounce.contains("Original-Envelope-Id: QQ+2B314159"),
        "{bounce}"
    );
}

/// A drop file's DSN parameters are held to the limits an SMTP client's
/// are (RFC 3461: ENVID printable ASCII up to 100, ORCPT up to 500 without
/// control characters): the drop file is refused, the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_in_a_maildrop_file_are_checked_like_smtp() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start_with(Script::default().with_dsn()).await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    open_to_others(&d);
    let body = b"Subject: dsn\r\n\r\nx\r\n";
    let long = "e".repeat(150);
    let bad = [
        ("01D00000000000000000000001", format!("dsn-envid {long}\n")),
        (
            "01D00000000000000000000002",
            "dsn-envid a+0D+0Ab\n".to_string(),
        ),
        (
            "01D00000000000000000000003",
            "dsn-rcpt 0 - a+0Ab@example.net\n".to_string(),
        ),
    ];
    for (name, extra) in &bad {
        drop_message_as_nobody(&d, name, "bad@example.net", extra, body);
    }
    drop_message_as_nobody(
        &d,
        "01D00000000000000000000004",
        "good@example.net",
        "dsn-envid QQ+2B1\ndsn-rcpt 0 SUCCESS rfc+2Bx@example.net\n",
        body,
    );
    poke_pickup_as_nobody(&d);
    let got = up.wait_for_messages(2, WAIT).await;
    let (m, _, _) = for_rcpt(&got, "good@example.net");
    assert!(m.mail_params.contains("ENVID=QQ+2B1"), "{}", m.mail_params);
    assert_eq!(
        m.rcpt_params[0],
        "NOTIFY=SUCCESS ORCPT=rfc822;rfc+2Bx@example.net"
    );
    for (name, _) in &bad {
        d.wait_log(&format!("maildrop file {name} refused"), WAIT);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !up.messages()
            .iter()
            .any(|m| m.rcpts[0] == "bad@example.net")
    );
}

/// More recipients than `smtp.max_recipients` in one `sendmail -t`: the
/// command refuses (SMTP answers 452 past the limit). It used to exit 0
/// and write the drop file, which the pickup then moved to corrupt/: the
/// app believed the mail sent, and nobody got it. As root it went out to
/// any number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendmail_refuses_more_recipients_than_the_limit_instead_of_losing_the_mail() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(
        up.addr(),
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_recipients = 20\n",
    ));
    open_to_others(&d);
    let to: Vec<String> = (0..21).map(|i| format!("u{i}@example.net")).collect();
    let msg = format!("Subject: many\nTo: {}\n\nbody\n", to.join(", "));
    let mut runs = vec![("root", sendmail(&d.config, &["-t", "-i"], msg.as_bytes()))];
    let args: Vec<&str> = to.iter().map(String::as_str).collect();
    runs.push((
        "root, arguments",
        sendmail(&d.config, &args, b"Subject: x\n\ny\n"),
    ));
    if can_switch_user() {
        let mut cmd = crate::sendmail::as_nobody(crate::support::daemon::BIN);
        cmd.args(["sendmail", "-t", "-i", "-C"]).arg(&d.config);
        runs.push(("nobody", run(cmd, msg.as_bytes())));
    }
    for (who, o) in &runs {
        assert_eq!(o.status.code(), Some(65), "{who}: {}", stderr(o));
        assert!(
            stderr(o).contains("smtp.max_recipients"),
            "{who}: {}",
            stderr(o)
        );
    }
    // At the limit it goes, from everybody.
    let msg = format!("Subject: enough\nTo: {}\n\nbody\n", to[..20].join(", "));
    let o = sendmail(&d.config, &["-t", "-i"], msg.as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    let got = up.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].rcpts.len(), 20);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up.messages().len(), 1);
    assert!(
        d.log().matches("too many recipients").count() >= runs.len(),
        "{}",
        d.log()
    );
}

/// A message of more MIME parts than relayq parses (10,000) with a long
/// line: refused with the reason on every way in, where parsing it took
/// about a kilobyte a part (half a gigabyte for one 18 MB message). Under
/// the limit it is re-encoded as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_mime_parts_with_long_lines_are_refused_over_smtp_and_sendmail() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let parts = |n: usize| {
        let mut m = b"From: app@example.com\r\nSubject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n".to_vec();
        m.extend_from_slice(&b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n".repeat(n));
        m.extend_from_slice(format!("--B\r\n\r\n{}\r\n--B--\r\n", "l".repeat(1200)).as_bytes());
        m
    };
    let over = parts(10_001);
    let r = send_mail(d.addr, "app@example.com", &["over@example.net"], &over).await;
    assert!(r.starts_with("554 5.6.0"), "{r}");
    let o = sendmail(&d.config, &["-i", "over@example.net"], &over);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains("MIME parts"), "{}", stderr(&o));
    let under = parts(9_000);
    let r = send_mail(d.addr, "app@example.com", &["under@example.net"], &under).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let got = up.wait_for_messages(1, WAIT).await;
    conformant_lines(&got[0]);
    assert!(
        got[0]
            .text()
            .contains("Content-Transfer-Encoding: quoted-printable")
    );
}

/// Quoted local parts (RFC 5322 3.4.1) reach the same envelope however the
/// message comes in. `sendmail -t` took `"john doe"@example.com` for
/// `@example.com` (mail-parser reads the quoted string as a display name)
/// and refused the message; an SMTP client's was relayed quoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_local_parts_give_the_same_envelope_on_every_way_in() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let want = [
        "\"john doe\"@example.com",
        "john.doe@example.com",
        "\"a@b\"@example.com",
        "\"j\\\"d\"@example.com",
    ];
    let header = "To: \"john doe\"@example.com, john.\"doe\"@example.com (John)\nCc: \"a@b\"@example.com,\n \"j\\\"d\"@example.com\n";
    let o = sendmail(
        &d.config,
        &["-t", "-i"],
        format!("{header}Subject: t\n\nbody\n").as_bytes(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = sendmail(
        &d.config,
        &["-i", want[0], want[2]],
        b"Subject: args\n\nbody\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (mut c, _) = Client::connect(d.addr).await;
    c.cmd("EHLO client.test").await;
    let r = c
        .mail("app@example.com", &want, b"Subject: smtp\r\n\r\nbody\r\n")
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let got = up.wait_for_messages(3, WAIT).await;
    let by_subject = |s: &str| {
        got.iter()
            .find(|m| m.text().contains(&format!("Subject: {s}\r\n")))
            .unwrap_or_else(|| panic!("no {s}"))
    };
    assert_eq!(by_subject("t").rcpts, want);
    assert_eq!(by_subject("smtp").rcpts, want);
    assert_eq!(by_subject("args").rcpts, [want[0], want[2]]);
}
