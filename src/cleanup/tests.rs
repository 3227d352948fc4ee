//! The rules together, on whole messages. Re-encoded content is checked by
//! decoding it with mail-parser and comparing with the original bytes
//! (the integration tests do the same with Python's `email` package).

use mail_parser::{MessageParser, MimeHeaders, PartType};

use super::*;

fn rules() -> Rules {
    Rules {
        max_line: 998,
        max_hops: 50,
        qualify: None,
        local: None,
    }
}

fn lines_fit(msg: &[u8]) -> bool {
    msg.split(|&b| b == b'\n').all(|l| l.len() <= 999)
}

/// The decoded bodies of the message's leaf parts, in order.
fn decoded(msg: &[u8]) -> Vec<Vec<u8>> {
    let parsed = MessageParser::new().parse(msg).unwrap();
    parsed
        .parts
        .iter()
        .filter_map(|p| match &p.body {
            PartType::Text(t) | PartType::Html(t) => Some(t.as_bytes().to_vec()),
            PartType::Binary(b) | PartType::InlineBinary(b) => Some(b.to_vec()),
            _ => None,
        })
        .collect()
}

fn html_line(n: usize) -> String {
    let mut s = String::from("<p>");
    while s.len() < n {
        s.push_str("caf\u{e9} <a href=\"https://example.com/x?a=1&b=2\">link</a> ");
    }
    s.push_str("</p>");
    s
}

#[test]
fn a_long_html_line_becomes_quoted_printable_and_decodes_the_same() {
    let html = html_line(1657);
    let msg = format!(
        "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{html}\r\nsecond line\r\n"
    );
    let out = rewrite(msg.clone().into_bytes(), &rules()).unwrap();
    assert!(lines_fit(&out));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("Content-Transfer-Encoding: quoted-printable\r\n"),
        "{text}"
    );
    assert!(!text.contains("8bit"));
    assert_eq!(
        decoded(&out),
        vec![format!("{html}\r\nsecond line\r\n").into_bytes()]
    );
    // Already fine: untouched.
    let short = b"Subject: x\r\n\r\nshort\r\n".to_vec();
    assert_eq!(rewrite(short.clone(), &rules()).unwrap(), short);
}

#[test]
fn a_message_that_is_not_mime_becomes_mime() {
    let long = "Gr\u{fc}\u{df}e ".repeat(300);
    let msg = format!("Subject: x\r\n\r\n{long}\r\n");
    let out = rewrite(msg.into_bytes(), &rules()).unwrap();
    assert!(lines_fit(&out));
    let parsed = MessageParser::new().parse(&out).unwrap();
    let part = &parsed.parts[0];
    assert_eq!(part.content_type().unwrap().ctype(), "text");
    assert_eq!(
        part.content_type().unwrap().attribute("charset"),
        Some("utf-8")
    );
    assert_eq!(decoded(&out), vec![format!("{long}\r\n").into_bytes()]);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"), "{text}");
}

#[test]
fn only_the_part_with_long_lines_changes_in_a_multipart() {
    let long = "x".repeat(3000);
    let attachment = "JVBERi0xLjQK\r\nAAAA\r\n";
    let msg = format!(
        "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nshort text\r\n--b1\r\nContent-Type: text/plain\r\n\r\n{long}\r\n--b1\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{attachment}--b1--\r\n"
    );
    let out = rewrite(msg.clone().into_bytes(), &rules()).unwrap();
    assert!(lines_fit(&out));
    let text = String::from_utf8(out.clone()).unwrap();
    // The untouched parts are byte for byte where they were.
    assert!(text.contains(
        "--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nshort text\r\n--b1\r\n"
    ));
    assert!(text.contains(&format!(
        "Content-Transfer-Encoding: base64\r\n\r\n{attachment}--b1--\r\n"
    )));
    let parts = decoded(&out);
    assert_eq!(parts[1], long.as_bytes());
    assert_eq!(parts[2], b"%PDF-1.4\n\0\0\0");
}

#[test]
fn base64_and_quoted_printable_on_one_long_line_are_rewrapped() {
    use base64::Engine;
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    let qp_text = "=C3=A9t=C3=A9 ".repeat(200);
    let msg = format!(
        "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{qp_text}\r\n--b--\r\n"
    );
    let out = rewrite(msg.into_bytes(), &rules()).unwrap();
    assert!(lines_fit(&out));
    let parts = decoded(&out);
    assert_eq!(parts[0], data);
    assert_eq!(
        String::from_utf8(parts[1].clone()).unwrap(),
        "\u{e9}t\u{e9} ".repeat(200).trim_end()
    );
}

#[test]
fn a_long_line_in_an_attached_message_is_re_encoded_inside_it() {
    let long = "y".repeat(1500);
    let msg = format!(
        "Subject: fwd\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--o\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\n{long}\r\n--o--\r\n"
    );
    let out = rewrite(msg.into_bytes(), &rules()).unwrap();
    assert!(lines_fit(&out));
    let text = String::from_utf8(out.clone()).unwrap();
    assert!(
        text.contains(
            "Content-Type: message/rfc822\r\n\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
        ),
        "{text}"
    );
    let parsed = MessageParser::new().parse(&out).unwrap();
    let inner = parsed.parts.iter().find_map(|p| p.message()).unwrap();
    // The CRLF before the delimiter belongs to the delimiter.
    assert_eq!(inner.body_text(0).unwrap(), long);
}

#[test]
fn long_header_lines_are_folded_and_part_headers_too() {
    let names: Vec<String> = (0..200)
        .map(|i| format!("\"user{i:03}@example.com\""))
        .collect();
    let json = format!("{{\"to\": [{}]}}", names.join(", "));
    let filename = format!("{}.txt", "n".repeat(1200));
    let msg = format!(
        "X-SMTPAPI: {json}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain;\r\n name=\"a b\"; x=\"{filename}\"\r\n\r\nhi\r\n--b--\r\n"
    );
    let out = rewrite(msg.into_bytes(), &rules());
    // The part header's long value has no place to fold: refused, named.
    assert!(
        matches!(out, Err(Refusal::Unfoldable { ref field }) if field.is_empty() || field == "Content-Type"),
        "{out:?}"
    );
    let msg = format!("X-SMTPAPI: {json}\r\nSubject: hi\r\n\r\nbody\r\n");
    let out = rewrite(msg.into_bytes(), &rules()).unwrap();
    assert!(lines_fit(&out));
    let f = header::fields(&out);
    assert_eq!(header::unfold(header::value(&out, &f[0])), json);
}

#[test]
fn hops_and_local_rules() {
    let mut msg = String::new();
    for i in 0..50 {
        msg.push_str(&format!(
            "Received: from h{i} by h{i}; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        ));
    }
    msg.push_str("Subject: loop\r\n\r\nbody\r\n");
    assert_eq!(
        rewrite(msg.clone().into_bytes(), &rules()),
        Err(Refusal::TooManyHops {
            count: 50,
            limit: 50
        })
    );
    let fewer = msg.replacen(
        "Received: from h0 by h0; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
        "",
        1,
    );
    assert!(rewrite(fewer.into_bytes(), &rules()).is_ok());

    let local = Rules {
        qualify: Some("example.org".into()),
        local: Some(LocalFrom {
            address: "root@example.org".into(),
            full_name: Some("Cron Daemon".into()),
        }),
        ..rules()
    };
    let msg = b"To: root\r\nBcc: secret\r\nResent-Bcc: other\r\nSubject: cron\r\n\r\nBcc: body\r\n"
        .to_vec();
    let out = rewrite(msg, &local).unwrap();
    assert_eq!(
        String::from_utf8(out.clone()).unwrap(),
        "From: Cron Daemon <root@example.org>\r\nTo: root@example.org\r\nSubject: cron\r\n\r\nBcc: body\r\n"
    );
    // Twice is the same as once (sendmail, then the pickup).
    assert_eq!(rewrite(out.clone(), &local).unwrap(), out);
}

#[test]
fn seven_bit_conversion_for_an_upstream_without_8bitmime() {
    let text = "Gr\u{fc}\u{df}e aus K\u{f6}ln\r\n";
    let msg = format!(
        "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{text}--b\r\nContent-Type: application/octet-stream\r\n\r\n\u{ff}\u{fe}\r\n--b--\r\n"
    );
    let out = seven_bit(msg.as_bytes()).into_owned();
    assert!(out.is_ascii(), "{}", String::from_utf8_lossy(&out));
    let parts = decoded(&out);
    assert_eq!(parts[0], text.trim_end().as_bytes());
    assert_eq!(parts[1], "\u{ff}\u{fe}".as_bytes());
    // Plain 8-bit text without MIME becomes MIME.
    let out = seven_bit("Subject: x\r\n\r\nK\u{f6}ln\r\n".as_bytes()).into_owned();
    assert!(out.is_ascii());
    assert_eq!(decoded(&out), vec!["K\u{f6}ln\r\n".as_bytes().to_vec()]);
    // 7-bit already: borrowed as it is.
    let plain = b"Subject: x\r\n\r\nhello\r\n";
    assert!(matches!(seven_bit(plain), std::borrow::Cow::Borrowed(_)));
}

#[test]
fn smtputf8_is_needed_only_for_utf8_in_addresses_or_headers() {
    let ascii = b"Subject: hi\r\n\r\nK\xc3\xb6ln\r\n";
    assert!(!needs_smtputf8(["a@example.com"].into_iter(), ascii));
    assert!(needs_smtputf8(["j\u{f6}rg@example.com"].into_iter(), ascii));
    assert!(needs_smtputf8(
        ["a@example.com"].into_iter(),
        "Subject: K\u{f6}ln\r\n\r\n".as_bytes()
    ));
}
