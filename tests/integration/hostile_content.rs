//! Content crafted to break the one content path (issue 12's cleanup) on
//! every way in: MIME nested deeper than any recursion survives. A message
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
/// the size limit.
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
    let msg = nested(100_000, &long);
    let (mut c, _) = Client::connect(d.addr).await;
    c.cmd("EHLO client.test").await;
    let r = c.mail("app@example.com", &["smtp@example.net"], &msg).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
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
    let msg = nested(100_000, text);
    let r = send_mail(d.addr, "app@example.com", &["deep@example.net"], &msg).await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(got[0].data.is_ascii(), "8-bit octets to a 7-bit upstream");
    assert_eq!(innermost(&got[0]), format!("{text}\r\n").as_bytes());
    still_up(&d, "alive@example.net").await;
    up.wait_for_messages(2, WAIT).await;
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
    let body = nested(100_000, &long);
    drop_message_as_nobody(&d, "01B00000000000000000000000", "drop@example.net", &body);
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
            drop_message_as_nobody(&d, &file, &rcpt, &make(&rcpt));
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
