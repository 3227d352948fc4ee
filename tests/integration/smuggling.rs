//! SMTP smuggling (issue 16 item 5): every combination of CR, LF and dot
//! that the SMTP smuggling research lists as an end of data some server
//! accepts, on every way in (SMTP, `sendmail` on stdin, `sendmail -bs`,
//! a maildrop file). relayq must treat a bare CR like a bare LF: nothing
//! after such a sequence may become a transaction of its own, and what
//! reaches the upstream has no bare CR or LF at all, so an upstream that
//! reads either as a line end cannot see a dot line relayq did not stuff.

use std::time::Duration;

use crate::sendmail::{
    can_switch_user, drop_message_as_nobody, open_to_others, poke_pickup_as_nobody, run, sendmail,
    stderr,
};
use crate::support::client::Client;
use crate::support::daemon::{BIN, Daemon, relay_config};
use crate::support::mime;
use crate::support::upstream::{FakeUpstream, Received};

const WAIT: Duration = Duration::from_secs(20);

/// The smuggled transaction that follows the fake end of data.
const SMUGGLED: &[u8] =
    b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nsend money\r\n";

/// Every "<line end>.<line end>" but the real `<CRLF>.<CRLF>`: bare LF,
/// bare CR and CRLF on either side of the dot, and the NUL variant.
fn fake_ends() -> Vec<(String, Vec<u8>)> {
    let ends: [(&str, &[u8]); 3] = [("CRLF", b"\r\n"), ("LF", b"\n"), ("CR", b"\r")];
    let mut out = Vec::new();
    for (bn, before) in ends {
        for (an, after) in ends {
            if bn == "CRLF" && an == "CRLF" {
                continue;
            }
            out.push((format!("<{bn}>.<{an}>"), [before, b".", after].concat()));
        }
    }
    // A dot line with a bare CR or LF inside, and a CR before the CRLF.
    out.push(("<CRLF>.<CR><CRLF>".into(), b"\r\n.\r\r\n".to_vec()));
    out.push(("<LF>..<LF>".into(), b"\n..\n".to_vec()));
    out
}

/// A message whose body holds `end` and the smuggled transaction.
fn message(tag: usize, end: &[u8]) -> Vec<u8> {
    [
        format!("Subject: case {tag}\r\n\r\nbefore").as_bytes(),
        end,
        SMUGGLED,
        b"after\r\n",
    ]
    .concat()
}

/// What the upstream got holds nothing smuggled and no bare line end.
fn check(got: &[Received], cases: usize) {
    assert_eq!(got.len(), cases, "one message per case, nothing more");
    for m in got {
        assert!(
            !m.rcpts.iter().any(|r| r.contains("victim")),
            "smuggled: {:?}",
            m.rcpts
        );
        assert_ne!(m.mail_from, "ceo@bank.example");
        mime::assert_conformant(&m.data);
        // The smuggled text is still there, as content.
        assert!(m.text().contains("send money"), "{}", m.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_and_lf_smuggle_nothing_over_smtp() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let (mut c, _) = Client::connect(d.addr).await;
    c.cmd("EHLO client.test").await;
    let cases = fake_ends();
    for (i, (name, end)) in cases.iter().enumerate() {
        let r = c
            .mail(
                "app@example.com",
                &[&format!("r{i}@example.net")],
                &message(i, end),
            )
            .await;
        assert!(r.starts_with("250 2.0.0"), "{name}: {r}");
    }
    // A NUL next to the dot is refused, not passed on.
    let r = c
        .mail(
            "app@example.com",
            &["nul@example.net"],
            &message(99, b"\r\n\0.\r\n"),
        )
        .await;
    assert!(r.starts_with("554 5.6.0"), "{r}");
    check(&up.wait_for_messages(cases.len(), WAIT).await, cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_and_lf_smuggle_nothing_through_sendmail() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let cases = fake_ends();
    for (i, (name, end)) in cases.iter().enumerate() {
        // -i, as PHP and Rails run it: a dot line is content.
        let o = sendmail(
            &d.config,
            &["-i", &format!("r{i}@example.net")],
            &message(i, end),
        );
        assert!(o.status.success(), "{name}: {}", stderr(&o));
    }
    check(&up.wait_for_messages(cases.len(), WAIT).await, cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_and_lf_smuggle_nothing_through_sendmail_bs() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let cases = fake_ends();
    let mut session = b"EHLO local\r\n".to_vec();
    for (i, (_, end)) in cases.iter().enumerate() {
        session.extend_from_slice(
            format!("MAIL FROM:<app@example.com>\r\nRCPT TO:<r{i}@example.net>\r\nDATA\r\n")
                .as_bytes(),
        );
        session.extend_from_slice(&message(i, end));
        session.extend_from_slice(b".\r\n");
    }
    session.extend_from_slice(b"QUIT\r\n");
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["sendmail", "-bs", "-C"]).arg(&d.config);
    let o = run(cmd, &session);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.matches("250 2.0.0 Ok: queued as").count(),
        cases.len(),
        "{out}"
    );
    check(&up.wait_for_messages(cases.len(), WAIT).await, cases.len());
}

/// A drop file written by hand (not by the sendmail command) with bare CRs
/// next to dots: the pickup applies the same intake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_cr_and_lf_smuggle_nothing_through_the_maildrop() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    open_to_others(&d);
    let cases = fake_ends();
    for (i, (_, end)) in cases.iter().enumerate() {
        let name = format!("01B{:023}", i);
        drop_message_as_nobody(
            &d,
            &name,
            &format!("r{i}@example.net"),
            "",
            &message(i, end),
        );
    }
    poke_pickup_as_nobody(&d);
    let got = up.wait_for_messages(cases.len() + 1, WAIT).await;
    let cased: Vec<Received> = got
        .into_iter()
        .filter(|m| !m.rcpts.iter().any(|r| r == "poke@example.net"))
        .collect();
    check(&cased, cases.len());
}
