//! An upstream nobody here wrote: Python's aiosmtpd with STARTTLS and AUTH
//! required, started from `support/aiosmtpd_upstream.py`.

use super::*;
use crate::support::aiosmtpd::Aiosmtpd;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiosmtpd_with_starttls_and_auth_gets_the_message_byte_for_byte() {
    let f = Fixture::new();
    let cert = f.ca.server_cert(CertKind::Good);
    let outdir = f.path().join("aiosmtpd");
    std::fs::create_dir_all(&outdir).unwrap();
    let server = Aiosmtpd::start(
        &cert.cert_file,
        &cert.key_file,
        USER,
        PASSWORD,
        &outdir,
        None,
    )
    .await;
    let lines = format!(
        "{}{}auth_mechanism = \"plain\"\n",
        ca_line(&f),
        password_file_lines(&f)
    );
    let d = f.start(&config_for("127.0.0.1", server.port, "starttls", &lines));

    // Dots, 8-bit text and a long line: what a real server may trip over.
    let body = format!(
        "From: {FROM}\r\nTo: {TO}\r\nSubject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <aiosmtpd-1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e aus Z\u{fc}rich.\r\n.\r\n..two\r\n.leading dot\r\n{}\r\nend.\r\n",
        "x".repeat(900)
    )
    .into_bytes();
    let mut wire = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    let reply = send_mail(d.addr, FROM, &[TO], &wire).await;
    assert!(reply.starts_with("250"), "{reply}");
    let id = queue_id(&reply);
    let line = status_line(&d, &id, "sent", 1).await;
    assert!(line.contains("queued by aiosmtpd"), "{line}");
    assert!(
        line.contains(&format!("relay=127.0.0.1[127.0.0.1]:{}", server.port)),
        "{line}"
    );

    // The .eml is renamed into place after the .json, before the 250.
    let got = std::fs::read(outdir.join("1.eml")).expect("aiosmtpd wrote the message");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(outdir.join("1.json")).unwrap()).unwrap();
    assert_eq!(meta["mail_from"], FROM);
    assert_eq!(meta["rcpt_tos"], serde_json::json!([TO]));
    assert_eq!(meta["tls"], true, "{meta}");
    assert_eq!(meta["authenticated"], true, "{meta}");
    assert_eq!(meta["login"], USER, "{meta}");
    assert_eq!(meta["mechanism"], "PLAIN", "{meta}");

    // relayq prepends exactly one Received: header (folded once) and
    // changes nothing else.
    let received_end = (0..got.len())
        .find(|&i| got[i..].starts_with(b"\r\n") && !matches!(got.get(i + 2), Some(b'\t' | b' ')))
        .map(|i| i + 2)
        .expect("a header line");
    let (received, rest) = got.split_at(received_end);
    let received = String::from_utf8_lossy(received);
    assert!(
        received.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby relayq.test (relayq) with ESMTP id "
        ),
        "{received}"
    );
    assert_eq!(
        String::from_utf8_lossy(rest),
        String::from_utf8_lossy(&body),
        "body changed between relayq and aiosmtpd"
    );
    assert_eq!(rest, &body[..]);
    drop(server);
}
