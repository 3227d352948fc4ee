//! Message fidelity (issue 12): what real senders hand relayq arrives as
//! they meant it, or is refused with the real reason, the same on every
//! way in. Content relayq re-encodes is decoded with Python's `email`
//! package (support/mime.rs) and compared with the bytes the sender meant.

use std::process::Command;
use std::time::Duration;

use base64::Engine;

use crate::sendmail::{as_nobody, can_switch_user, open_to_others, run, sendmail, stderr};
use crate::support::client::{Client, queue_id};
use crate::support::daemon::{BIN, Daemon, relay_config};
use crate::support::mime::{self, Decoded};
use crate::support::upstream::{FakeUpstream, Received, Script};

const WAIT: Duration = Duration::from_secs(20);

/// Sends `msg` with Python's smtplib (which dot-stuffs and makes line ends
/// CRLF itself); returns "ok" or the refusal Python saw.
pub fn smtplib(
    addr: std::net::SocketAddr,
    from: &str,
    rcpts: &[&str],
    msg: &[u8],
    mail_options: &[&str],
    rcpt_options: &[&str],
) -> String {
    let script = r#"
import json, smtplib, sys
a = json.loads(sys.argv[1])
msg = sys.stdin.buffer.read()
try:
    with smtplib.SMTP(a["host"], a["port"], timeout=30) as s:
        refused = s.sendmail(a["from"], a["rcpts"], msg, a["mail"], a["rcpt"])
    print("ok" if not refused else "refused %r" % refused)
except smtplib.SMTPResponseException as e:
    print("%d %s" % (e.smtp_code, e.smtp_error.decode(errors="replace")))
except smtplib.SMTPRecipientsRefused as e:
    print("rcpts %r" % e.recipients)
"#;
    let args = serde_json::json!({
        "host": addr.ip().to_string(), "port": addr.port(), "from": from,
        "rcpts": rcpts, "mail": mail_options, "rcpt": rcpt_options,
    });
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script, &args.to_string()]);
    let o = run(cmd, msg);
    assert!(o.status.success(), "python3: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        stderr(o)
    );
}

/// The leaf parts' decoded payloads.
fn payloads(d: &Decoded) -> Vec<Vec<u8>> {
    d.parts.iter().map(|p| p.payload.clone()).collect()
}

fn long_html() -> String {
    let mut s = String::from("<html><body><p>");
    while s.len() < 1657 {
        s.push_str(
            "Caf\u{e9} cr\u{e8}me <a href=\"https://shop.example/p?id=42&amp;ref=mail\">buy</a> ",
        );
    }
    s.push_str("</p></body></html>");
    s
}

/// Three messages PHP and WordPress-like apps send with lines over 998
/// octets, and what each leaf part must decode to.
fn long_line_messages() -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    let html = long_html();
    let html_msg = format!(
        "From: shop@example.com\r\nTo: bob@example.net\r\nSubject: order\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{html}\r\n"
    );
    let text = "Gr\u{fc}\u{df}e aus K\u{f6}ln, ".repeat(90);
    let plain_msg = format!("From: app@example.com\r\nSubject: no MIME\r\n\r\n{text}\r\nbye\r\n");
    let pdf: Vec<u8> = (0..2000u32).map(|i| (i * 31 % 251) as u8).collect();
    let pdf64 = base64::engine::general_purpose::STANDARD.encode(&pdf);
    let wrapped: Vec<&str> = pdf64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let csv = "id,name,price;".repeat(120);
    let multi_msg = format!(
        "From: app@example.com\r\nSubject: report\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=_b1\"\r\n\r\n--=_b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{csv}\r\n--=_b1\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\nContent-Disposition: attachment; filename=\"r.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--=_b1--\r\n",
        wrapped.join("\r\n")
    );
    vec![
        (
            html_msg.into_bytes(),
            vec![format!("{html}\r\n").into_bytes()],
        ),
        (
            plain_msg.into_bytes(),
            vec![format!("{text}\r\nbye\r\n").into_bytes()],
        ),
        (multi_msg.into_bytes(), vec![csv.into_bytes(), pdf]),
    ]
}

/// Finds the message that arrived for `rcpt`.
fn for_rcpt<'a>(got: &'a [Received], rcpt: &str) -> &'a Received {
    got.iter()
        .find(|m| m.rcpts.iter().any(|r| r == rcpt))
        .unwrap_or_else(|| panic!("nothing for {rcpt}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lines_arrive_re_encoded_and_decode_to_what_was_sent() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let cases = long_line_messages();
    for (i, (msg, _)) in cases.iter().enumerate() {
        let r = smtplib(
            d.addr,
            "app@example.com",
            &[&format!("smtp{i}@example.net")],
            msg,
            &[],
            &[],
        );
        assert_eq!(r, "ok", "case {i} over SMTP");
        ok(&sendmail(&d.config, &[&format!("sm{i}@example.net")], msg));
    }
    // PHP's mail() with one long HTML line, as WordPress sends it.
    let html = long_html();
    let path = format!("{BIN} sendmail -t -i -C {}", d.config.display());
    let script = format!(
        r#"$ok = mail("php@example.net", "order", "{}", "MIME-Version: 1.0\r\nContent-Type: text/html; charset=UTF-8"); exit($ok ? 0 : 1);"#,
        html.replace('"', "\\\"")
    );
    let o = Command::new("php")
        .args(["-n", "-d", &format!("sendmail_path={path}"), "-r", &script])
        .output()
        .expect("php-cli is installed by .ci/run");
    ok(&o);
    let got = up.wait_for_messages(2 * cases.len() + 1, WAIT).await;
    for (i, (_, want)) in cases.iter().enumerate() {
        let smtp = for_rcpt(&got, &format!("smtp{i}@example.net"));
        let local = for_rcpt(&got, &format!("sm{i}@example.net"));
        for m in [smtp, local] {
            mime::assert_conformant(&m.data);
            let decoded = mime::decode(&m.data);
            assert_eq!(payloads(&decoded), *want, "case {i}: {}", m.text());
            assert!(
                decoded.defects.is_empty(),
                "case {i}: {:?}",
                decoded.defects
            );
        }
        // Both ways in apply one rule: the same content arrives.
        let body = |m: &Received| m.text().split_once("\r\n\r\n").unwrap().1.to_string();
        assert_eq!(body(smtp), body(local), "case {i}: the ways in disagree");
    }
    // The long text was quoted-printable; the attachment is untouched.
    let multi = for_rcpt(&got, "smtp2@example.net").text();
    let pdf_part = &long_line_messages()[2].0;
    let attachment = String::from_utf8_lossy(pdf_part);
    let attachment = attachment.split("--=_b1\r\n").nth(2).unwrap();
    assert!(multi.contains(attachment), "attachment changed");
    let php = for_rcpt(&got, "php@example.net");
    mime::assert_conformant(&php.data);
    let decoded = mime::decode(&php.data);
    assert_eq!(decoded.parts[0].content_type, "text/html");
    assert_eq!(decoded.parts[0].cte, "quoted-printable");
    assert_eq!(decoded.parts[0].payload, format!("{html}\r\n").into_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_header_lines_fold_between_words_never_inside() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let spaced: Vec<String> = (0..300)
        .map(|i| format!("\"user{i:03}@example.com\""))
        .collect();
    let spaced = format!(
        "{{\"to\": [{}], \"category\": \"newsletter\"}}",
        spaced.join(", ")
    );
    let tight: Vec<String> = (0..300)
        .map(|i| format!("\"user{i:03}@example.com\""))
        .collect();
    let tight = format!("{{\"to\":[{}]}}", tight.join(","));
    let words = (0..400)
        .map(|i| format!("word{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let cases = [
        ("X-SMTPAPI", spaced.clone(), spaced.clone()),
        // Folded after commas: unfolding adds a space there, which JSON
        // (and every structured field) ignores; nothing is cut.
        ("X-SMTPAPI", tight.clone(), tight.clone()),
        ("Subject", words.clone(), words.clone()),
    ];
    for (i, (name, value, _)) in cases.iter().enumerate() {
        let msg = format!("{name}: {value}\nTo: t{i}@example.net\n\nbody\n");
        ok(&sendmail(&d.config, &["-t"], msg.as_bytes()));
        let r = smtplib(
            d.addr,
            "app@example.com",
            &[&format!("s{i}@example.net")],
            msg.as_bytes(),
            &[],
            &[],
        );
        assert_eq!(r, "ok");
    }
    let got = up.wait_for_messages(6, WAIT).await;
    for (i, (name, _, unfolded)) in cases.iter().enumerate() {
        for rcpt in [format!("t{i}@example.net"), format!("s{i}@example.net")] {
            let m = for_rcpt(&got, &rcpt);
            mime::assert_conformant(&m.data);
            let decoded = mime::decode(&m.data);
            let value = decoded.header(name).unwrap();
            // Python keeps the folds; unfolding is removing the line ends.
            let value = value.replace("\r\n", "").replace('\n', "");
            if i == 1 {
                assert_eq!(value.replace(", ", ","), *unfolded, "case {i} for {rcpt}");
                let json: serde_json::Value = serde_json::from_str(&value).unwrap();
                assert_eq!(
                    json,
                    serde_json::from_str::<serde_json::Value>(unfolded).unwrap()
                );
            } else {
                assert_eq!(&value, unfolded, "case {i} for {rcpt}");
            }
        }
    }
    // No place to fold: refused with the reason on both ways in.
    let token = format!("X-Token: {}\n\nbody\n", "A".repeat(1500));
    let o = sendmail(&d.config, &["x@example.net"], token.as_bytes());
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("X-Token") && stderr(&o).contains("fold"),
        "{}",
        stderr(&o)
    );
    let r = smtplib(
        d.addr,
        "app@example.com",
        &["x@example.net"],
        token.as_bytes(),
        &[],
        &[],
    );
    assert!(r.starts_with("554 5.6.0"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_header_limit_on_both_ways_in() {
    let up = FakeUpstream::start().await;
    // The default admits the SendGrid recipe's header_size_limit = 4096000.
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let json = |n: usize| {
        let v: Vec<String> = (0..n)
            .map(|i| format!("\"user{i:05}@example.com\""))
            .collect();
        format!("X-SMTPAPI: {{\"to\": [{}]}}\n", v.join(", "))
    };
    let big = format!("{}To: a@example.net\n\nbody\n", json(9000)); // ~ 220 KB
    assert!(big.len() > 200_000);
    ok(&sendmail(&d.config, &["-t"], big.as_bytes()));
    assert_eq!(
        smtplib(
            d.addr,
            "app@example.com",
            &["b@example.net"],
            big.as_bytes(),
            &[],
            &[]
        ),
        "ok"
    );
    let got = up.wait_for_messages(2, WAIT).await;
    assert!(got.iter().all(|m| m.data.len() > 200_000));
    drop(d);

    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(
        up.addr(),
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_header_size = \"20KB\"\n",
    ));
    for n in [500, 2000, 9000] {
        let msg = format!("{}To: a@example.net\n\nbody\n", json(n));
        let fits = msg.len() < 20 * 1024;
        let o = sendmail(&d.config, &["-t"], msg.as_bytes());
        let r = smtplib(
            d.addr,
            "app@example.com",
            &["b@example.net"],
            msg.as_bytes(),
            &[],
            &[],
        );
        if fits {
            ok(&o);
            assert_eq!(r, "ok");
        } else {
            assert_eq!(o.status.code(), Some(65), "{n}: {}", stderr(&o));
            assert!(
                stderr(&o).contains("smtp.max_header_size"),
                "{}",
                stderr(&o)
            );
            assert!(r.starts_with("552 5.3.4"), "{n}: {r}");
        }
    }
}

/// A bounce that arrived at the upstream for `sender`.
fn bounce_for<'a>(got: &'a [Received], sender: &str) -> &'a Received {
    got.iter()
        .find(|m| m.mail_from.is_empty() && m.rcpts == vec![sender.to_string()])
        .unwrap_or_else(|| panic!("no bounce to {sender}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_is_asked_of_the_upstream_only_for_utf8() {
    let up = FakeUpstream::start_with(Script::default().no_smtputf8()).await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let ascii = b"From: app@example.com\r\nSubject: plain\r\n\r\nhello\r\n";
    let utf8_subject = "From: app@example.com\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nhello\r\n";
    // SMTPUTF8 asked, nothing but ASCII: sent without it.
    assert_eq!(
        smtplib(
            d.addr,
            "a1@example.com",
            &["r1@example.net"],
            ascii,
            &["SMTPUTF8"],
            &[]
        ),
        "ok"
    );
    // A local submission (autodetected) with ASCII only: sent.
    ok(&sendmail(
        &d.config,
        &["-f", "a2@example.com", "r2@example.net"],
        ascii,
    ));
    // UTF-8 in a header, SMTPUTF8 asked: relayq refuses to send it.
    assert_eq!(
        smtplib(
            d.addr,
            "a3@example.com",
            &["r3@example.net"],
            utf8_subject.as_bytes(),
            &["SMTPUTF8"],
            &[]
        ),
        "ok"
    );
    // A UTF-8 recipient address: the same.
    assert_eq!(
        smtplib(
            d.addr,
            "a4@example.com",
            &["j\u{f6}rg@example.net"],
            ascii,
            &["SMTPUTF8"],
            &[]
        ),
        "ok"
    );
    // sendmail with a UTF-8 subject: the same.
    ok(&sendmail(
        &d.config,
        &["-f", "a5@example.com", "r5@example.net"],
        utf8_subject.as_bytes(),
    ));
    let got = up.wait_for_messages(5, WAIT).await;
    for r in ["r1@example.net", "r2@example.net"] {
        let m = for_rcpt(&got, r);
        assert!(!m.mail_params.contains("SMTPUTF8"), "{}", m.mail_params);
    }
    for sender in ["a3@example.com", "a4@example.com", "a5@example.com"] {
        let b = bounce_for(&got, sender).text();
        assert!(
            b.contains("relayq did not send the message: it needs SMTPUTF8"),
            "{b}"
        );
        assert!(b.contains("Status: 5.6.7"), "{b}");
        assert!(
            !b.contains("Remote-MTA"),
            "a Remote-MTA that never spoke: {b}"
        );
        assert!(!b.contains(" said:"), "{b}");
    }
    assert!(!got.iter().any(|m| {
        m.rcpts
            .iter()
            .any(|r| r == "r3@example.net" || r == "r5@example.net")
    }));
    drop(d);

    // An upstream that offers SMTPUTF8 gets it when the message needs it.
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    assert_eq!(
        smtplib(
            d.addr,
            "a6@example.com",
            &["r6@example.net"],
            utf8_subject.as_bytes(),
            &["SMTPUTF8"],
            &[]
        ),
        "ok"
    );
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(
        got[0].mail_params.contains("SMTPUTF8"),
        "{}",
        got[0].mail_params
    );
    assert!(got[0].text().contains("Subject: Gr\u{fc}\u{df}e\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_is_converted_for_an_upstream_without_8bitmime() {
    let text = "Gr\u{fc}\u{df}e aus K\u{f6}ln \u{2014} \u{20ac}5\r\n";
    let cases: Vec<(Vec<u8>, Vec<Vec<u8>>)> = vec![
        (
            format!("Subject: a\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{text}").into_bytes(),
            vec![text.as_bytes().to_vec()],
        ),
        (format!("Subject: b\r\n\r\n{text}").into_bytes(), vec![text.as_bytes().to_vec()]),
        (
            [
                format!("Subject: c\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n<p>{}</p>\r\n--zz\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n", text.trim_end()).into_bytes(),
                vec![0xff, 0xfe, 0x80, b'a'],
                b"\r\n--zz--\r\n".to_vec(),
            ]
            .concat(),
            vec![format!("<p>{}</p>", text.trim_end()).into_bytes(), vec![0xff, 0xfe, 0x80, b'a']],
        ),
    ];
    // Over DATA, and over BDAT (CHUNKING with PIPELINING) too: the chunk
    // is the converted message, counted exactly.
    for chunking in [false, true] {
        let script = Script::default().no_8bitmime();
        let up = FakeUpstream::start_with(if chunking { script.chunking() } else { script }).await;
        let d = Daemon::start(&relay_config(up.addr(), ""));
        for (i, (msg, _)) in cases.iter().enumerate() {
            let r = smtplib(
                d.addr,
                "app@example.com",
                &[&format!("r{i}@example.net")],
                msg,
                &["BODY=8BITMIME"],
                &[],
            );
            assert_eq!(r, "ok");
            ok(&sendmail(&d.config, &[&format!("s{i}@example.net")], msg));
        }
        let got = up.wait_for_messages(2 * cases.len(), WAIT).await;
        for (i, (_, want)) in cases.iter().enumerate() {
            for rcpt in [format!("r{i}@example.net"), format!("s{i}@example.net")] {
                let m = for_rcpt(&got, &rcpt);
                assert!(
                    m.data.is_ascii(),
                    "8-bit octets to a 7-bit upstream: {}",
                    m.text()
                );
                assert!(!m.mail_params.contains("8BITMIME"), "{}", m.mail_params);
                assert_eq!(m.via, if chunking { "BDAT" } else { "DATA" });
                mime::assert_conformant(&m.data);
                assert_eq!(
                    payloads(&mime::decode(&m.data)),
                    *want,
                    "case {i} for {rcpt}, chunking {chunking}"
                );
            }
        }
        drop(d);
    }
    // An upstream that offers 8BITMIME gets the octets as they are.
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let r = smtplib(
        d.addr,
        "app@example.com",
        &["x@example.net"],
        &cases[0].0,
        &["BODY=8BITMIME"],
        &[],
    );
    assert_eq!(r, "ok");
    let got = up.wait_for_messages(1, WAIT).await;
    assert!(got[0].mail_params.contains("BODY=8BITMIME"));
    assert!(
        got[0]
            .data
            .ends_with(&cases[0].0[cases[0].0.len() - text.len()..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_local_names_in_headers_get_myorigin() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), "myorigin = \"example.org\"\n"));
    // Cron: `sendmail -t` with bare names, a comment and a display name.
    let cron = b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> backup\nX-Cron-Env: <SHELL=/bin/sh>\n\nbackup done\n";
    ok(&sendmail(&d.config, &["-t", "-i"], cron));
    // bsd-mailx, as a script on the host runs it: `mail -s ... ops`.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("sendmail");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let rc = dir.path().join("mailrc");
    std::fs::write(&rc, format!("set sendmail={}\n", link.display())).unwrap();
    let mut cmd = Command::new("bsd-mailx");
    cmd.args(["-s", "disk full", "ops"])
        .env("MAILRC", &rc)
        .env("HOME", dir.path())
        .env("RELAYQ_CONFIG", &d.config);
    ok(&run(cmd, b"/var is 98% full\n"));
    // An SMTP client on this host (in allow_networks), as Postfix's
    // local_header_rewrite_clients.
    let msg = b"From: Web App <www-data>\r\nTo: alice@example.net, \"Ops, Team\" <ops>\r\nCc: backup\r\nReply-To: noreply\r\nSubject: root is a word here\r\n\r\nTo: root (in the body, untouched)\r\n";
    assert_eq!(
        smtplib(
            d.addr,
            "www-data@example.org",
            &["alice@example.net"],
            msg,
            &[],
            &[]
        ),
        "ok"
    );
    let got = up.wait_for_messages(3, WAIT).await;
    let h = |m: &Received| m.text().split_once("\r\n\r\n").unwrap().0.to_string();
    let cron = h(for_rcpt(&got, "root@example.org"));
    assert!(
        cron.contains("\r\nFrom: root@example.org (Cron Daemon)\r\n"),
        "{cron}"
    );
    assert!(cron.contains("\r\nTo: root@example.org\r\n"), "{cron}");
    assert!(
        cron.contains("Subject: Cron <root@host> backup\r\n"),
        "{cron}"
    );
    let mailx = h(for_rcpt(&got, "ops@example.org"));
    assert!(mailx.contains("To: ops@example.org\r\n"), "{mailx}");
    let smtp = for_rcpt(&got, "alice@example.net");
    let head = h(smtp);
    assert!(
        head.contains("From: Web App <www-data@example.org>\r\n"),
        "{head}"
    );
    assert!(
        head.contains("To: alice@example.net, \"Ops, Team\" <ops@example.org>\r\n"),
        "{head}"
    );
    assert!(
        head.contains("Cc: backup@example.org\r\nReply-To: noreply@example.org\r\n"),
        "{head}"
    );
    assert!(head.ends_with("Subject: root is a word here"), "{head}");
    assert!(
        smtp.text()
            .ends_with("\r\n\r\nTo: root (in the body, untouched)\r\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendmail_t_takes_resent_recipients_when_there_are_any() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let cases: [(&[u8], &[&str]); 3] = [
        (
            b"To: old@example.com\nCc: old2@example.com\nResent-To: new@example.net\nResent-From: me@example.com\nSubject: fwd 1\n\nx\n",
            &["new@example.net"],
        ),
        (
            b"To: old@example.com\nResent-Cc: c@example.net\nResent-Bcc: hidden@example.net\nSubject: fwd 2\n\nx\n",
            &["c@example.net", "hidden@example.net"],
        ),
        (
            b"To: a@example.net\nCc: b@example.net\nBcc: secret@example.net\nSubject: plain 3\n\nx\n",
            &["a@example.net", "b@example.net", "secret@example.net"],
        ),
    ];
    for (msg, _) in &cases {
        ok(&sendmail(&d.config, &["-t", "-i"], msg));
    }
    let got = up.wait_for_messages(cases.len(), WAIT).await;
    for (i, (_, want)) in cases.iter().enumerate() {
        let subject = [
            "Subject: fwd 1\r\n",
            "Subject: fwd 2\r\n",
            "Subject: plain 3\r\n",
        ][i];
        let m = got.iter().find(|m| m.text().contains(subject)).unwrap();
        assert_eq!(m.rcpts, *want, "case {i}");
        let head = m.text().split_once("\r\n\r\n").unwrap().0.to_string();
        assert!(!head.contains("Bcc:"), "Bcc kept: {head}");
        assert!(
            !head.contains("hidden@") && !head.contains("secret@"),
            "{head}"
        );
    }
}

fn received_headers(n: usize) -> String {
    (0..n)
        .map(|i| format!("Received: from hop{i}.example by hop{}.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n", i + 1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hop_limit_stops_a_loop_on_every_way_in() {
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    for (n, fine) in [(49, true), (50, false), (120, false)] {
        let msg = format!("{}Subject: hops {n}\r\n\r\nloop?\r\n", received_headers(n));
        let r = smtplib(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            msg.as_bytes(),
            &[],
            &[],
        );
        let o = sendmail(&d.config, &["bob@example.net"], msg.as_bytes());
        if fine {
            assert_eq!(r, "ok");
            ok(&o);
        } else {
            assert!(r.starts_with("554 5.4.6"), "{n}: {r}");
            assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
            assert!(stderr(&o).contains("too many hops"), "{}", stderr(&o));
        }
    }
    up.wait_for_messages(2, WAIT).await;
    assert_eq!(up.messages().len(), 2);
}

/// Two relayq's relaying to each other (a typo in a port): the loop ends
/// at the hop limit, the sender gets one bounce, and the bounce's own
/// loop ends there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relayqs_pointing_at_each_other_stop_at_the_hop_limit() {
    let port = |()| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (pa, pb) = (port(()), port(()));
    let cfg = |name: &str, me: u16, other: u16| {
        format!(
            "hostname = \"{name}\"\n[smtp]\nlisten = [\"127.0.0.1:{me}\"]\n[relay]\nhost = \"127.0.0.1\"\nport = {other}\ntls = \"none\"\nconnect_timeout = \"2s\"\n"
        )
    };
    let a = Daemon::start(&cfg("a.relayq.test", pa, pb));
    let b = Daemon::start(&cfg("b.relayq.test", pb, pa));
    let mut c = Client::connect(a.addr).await.0;
    c.cmd("EHLO app.test").await;
    let r = c
        .mail(
            "app@example.com",
            &["bob@example.net"],
            b"Subject: looping\r\n\r\nx\r\n",
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let id = queue_id(&r);
    // The original bounces with the hop limit's reason...
    let line = |d: &Daemon| d.log().lines().any(|l| l.contains("5.4.6"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(line(&a) || line(&b)) {
        assert!(
            std::time::Instant::now() < deadline,
            "no hop limit hit:\n{}\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and then both queues drain: nothing loops forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while a.queued() + b.queued() > 0 {
        assert!(std::time::Instant::now() < deadline, "still looping");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepted = a.count_log("(queue active)") + b.count_log("(queue active)");
    assert!(accepted <= 110, "accepted {accepted} times");
    assert!(a.log().contains(&format!("{id}: to=<bob@example.net>")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_relayq_itself_is_a_loop() {
    // Greeted, or answered EHLO, with our own hostname: mail stays queued
    // and the log says why.
    for script in [
        Script::default().greeting(220, "relayq.test ESMTP relayq"),
        Script::default().ehlo_reply(250, "relayq.test"),
    ] {
        let up = FakeUpstream::start_with(script).await;
        let d = Daemon::start(&relay_config(up.addr(), ""));
        let r = crate::support::client::send_mail(
            d.addr,
            "a@example.com",
            &["b@example.net"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
        let id = queue_id(&r);
        let line = d.wait_log(&format!("{id}: to=<b@example.net>"), WAIT);
        assert!(line.contains("dsn=4.4.6, status=deferred"), "{line}");
        assert!(line.contains("loops back to myself"), "{line}");
        assert!(up.messages().is_empty());
        assert_eq!(d.queued(), 1);
    }
    // check-config and check refuse a relay at our own listen address.
    let tmp = tempfile::tempdir().unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let cfg = tmp.path().join("loop.toml");
        std::fs::write(
            &cfg,
            format!(
                "spool_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:2599\"]\n[relay]\nhost = \"{host}\"\nport = 2599\ntls = \"none\"\n",
                tmp.path().join("spool").display()
            ),
        )
        .unwrap();
        for verb in ["check-config", "check"] {
            let o = Command::new(BIN)
                .args([verb, "--config"])
                .arg(&cfg)
                .output()
                .unwrap();
            let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
            assert!(!o.status.success(), "{verb} {host}: {all}");
            assert!(all.contains("own listen address"), "{verb} {host}: {all}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_is_honoured_from_every_local_user_by_default() {
    if !can_switch_user() {
        return;
    }
    let up = FakeUpstream::start().await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    open_to_others(&d);
    // sendmail -f as an ordinary user (nobody, like www-data).
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-f", "bounces@example.com", "-C"])
        .arg(&d.config)
        .arg("r1@example.net");
    ok(&run(cmd, b"Subject: one\n\nx\n"));
    // PHP's mail() with the fifth argument, run as that user.
    let path = format!(
        "{} sendmail -t -i -C {}",
        crate::sendmail::nobody_bin(),
        d.config.display()
    );
    let mut cmd = as_nobody("php");
    cmd.args(["-n", "-d", &format!("sendmail_path={path}"), "-r",
        r#"exit(mail("r2@example.net", "two", "x", "From: shop@example.com", "-fverified@example.com") ? 0 : 1);"#]);
    ok(&run(cmd, b""));
    // Python, as Django's sendmail backend runs it: `-r`.
    let mut cmd = as_nobody(BIN);
    cmd.args(["sendmail", "-i", "-r", "django@example.com", "-C"])
        .arg(&d.config)
        .args(["--", "r3@example.net"]);
    ok(&run(cmd, b"Subject: three\n\nx\n"));
    let got = up.wait_for_messages(3, WAIT).await;
    for (rcpt, sender) in [
        ("r1@example.net", "bounces@example.com"),
        ("r2@example.net", "verified@example.com"),
        ("r3@example.net", "django@example.com"),
    ] {
        let m = for_rcpt(&got, rcpt);
        assert_eq!(m.mail_from, sender);
        // The real user stays visible.
        assert!(
            m.text()
                .starts_with("Received: by relayq.test (relayq, from userid 65534)"),
            "{}",
            m.text()
        );
        d.wait_log(&format!("uid=65534 (nobody), from=<{sender}>"), WAIT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_are_honoured_kept_and_passed_on() {
    let up = FakeUpstream::start_with(
        Script::default()
            .rcpt("gone@example.net", 550, "5.1.1 no such user")
            .rcpt("gone2@example.net", 550, "5.1.1 no such user")
            .rcpt("later@example.net", 451, "4.3.0 try later"),
    )
    .await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    let msg = b"From: app@example.com\r\nSubject: dsn\r\n\r\nthe secret body\r\n";
    // NOTIFY=NEVER: a failure is not bounced.
    assert_eq!(
        smtplib(
            d.addr,
            "never@example.com",
            &["gone@example.net"],
            msg,
            &[],
            &["NOTIFY=NEVER"]
        ),
        "ok"
    );
    // sendmail -N never: the same.
    ok(&sendmail(
        &d.config,
        &[
            "-N",
            "never",
            "-f",
            "never2@example.com",
            "gone2@example.net",
        ],
        msg,
    ));
    // NOTIFY=SUCCESS to an upstream without DSN: a "relayed" notice with
    // ORCPT and ENVID.
    assert_eq!(
        smtplib(
            d.addr,
            "ok@example.com",
            &["bob@example.net"],
            msg,
            &["ENVID=QQ314159", "RET=HDRS"],
            &["NOTIFY=SUCCESS", "ORCPT=rfc822;Bob@Example.NET"]
        ),
        "ok"
    );
    // RET=HDRS on a failure: the bounce returns the header only.
    assert_eq!(
        smtplib(
            d.addr,
            "hdrs@example.com",
            &["gone@example.net"],
            msg,
            &["RET=HDRS"],
            &[]
        ),
        "ok"
    );
    // NOTIFY=DELAY and a deferral past delay_warning_time: a delay notice.
    assert_eq!(
        smtplib(
            d.addr,
            "wait@example.com",
            &["later@example.net"],
            msg,
            &[],
            &["NOTIFY=DELAY,FAILURE"]
        ),
        "ok"
    );
    let got = up.wait_for_messages(3, WAIT).await;
    let relayed = bounce_for(&got, "ok@example.com").text();
    assert!(relayed.contains("Action: relayed"), "{relayed}");
    assert!(
        relayed.contains("Original-Envelope-Id: QQ314159"),
        "{relayed}"
    );
    assert!(
        relayed.contains("Original-Recipient: rfc822; Bob@Example.NET"),
        "{relayed}"
    );
    assert!(!relayed.contains("the secret body"), "RET=HDRS: {relayed}");
    let hdrs = bounce_for(&got, "hdrs@example.com").text();
    assert!(
        hdrs.contains("text/rfc822-headers") && !hdrs.contains("the secret body"),
        "{hdrs}"
    );
    d.wait_log("no non-delivery notification for <gone@example.net>", WAIT);
    d.wait_log("no non-delivery notification for <gone2@example.net>", WAIT);
    d.advance_clock(5 * 3600);
    let got = up.wait_for_messages(4, WAIT).await;
    let delayed = bounce_for(&got, "wait@example.com").text();
    assert!(
        delayed.contains("Action: delayed") && delayed.contains("Delayed Mail"),
        "{delayed}"
    );
    assert!(
        !got.iter()
            .any(|m| m.mail_from.is_empty() && m.rcpts.iter().any(|r| r.starts_with("never")))
    );
    drop(d);

    // An upstream that offers DSN gets the parameters and does the notices.
    let up = FakeUpstream::start_with(Script::default().with_dsn()).await;
    let d = Daemon::start(&relay_config(up.addr(), ""));
    assert_eq!(
        smtplib(
            d.addr,
            "ok@example.com",
            &["bob@example.net", "carol@example.net"],
            msg,
            &["ENVID=QQ+2B1", "RET=FULL"],
            &["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Bob@Example.NET"]
        ),
        "ok"
    );
    ok(&sendmail(
        &d.config,
        &[
            "-N",
            "failure",
            "-R",
            "hdrs",
            "-V",
            "env42",
            "dave@example.net",
        ],
        msg,
    ));
    let got = up.wait_for_messages(2, WAIT).await;
    let m = for_rcpt(&got, "bob@example.net");
    assert!(
        m.mail_params.contains("RET=FULL") && m.mail_params.contains("ENVID=QQ+2B1"),
        "{}",
        m.mail_params
    );
    assert_eq!(
        m.rcpt_params[0],
        "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob@Example.NET"
    );
    let m = for_rcpt(&got, "dave@example.net");
    assert!(
        m.mail_params.contains("RET=HDRS ENVID=env42"),
        "{}",
        m.mail_params
    );
    assert_eq!(m.rcpt_params[0], "NOTIFY=FAILURE");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        up.messages().len(),
        2,
        "no notice of our own: the upstream reports"
    );
}
