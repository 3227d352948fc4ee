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

/// `depth` message/rfc822 parts, each inside the one before, around a
/// text part with `body`; every level is a few bytes, so a crafted message
/// far under the size limit nests a hundred thousand levels deep.
fn nested_messages(depth: usize, body: &str) -> Vec<u8> {
    let mut msg = b"Subject: x\r\nMIME-Version: 1.0\r\n".to_vec();
    for _ in 0..depth {
        msg.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
    }
    msg.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\n\r\n");
    msg.extend_from_slice(body.as_bytes());
    msg.extend_from_slice(b"\r\n");
    msg
}

/// The body of the innermost part as quoted-printable decodes it.
fn innermost_qp(msg: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(msg);
    let body = text
        .rsplit("Content-Transfer-Encoding: quoted-printable\r\n\r\n")
        .next()
        .unwrap();
    quoted_printable::decode(body, quoted_printable::ParseMode::Strict).unwrap()
}

/// A message nested as deep as relayq parses is re-encoded like any other
/// (5,000 levels once overflowed the stack and aborted the daemon: the
/// part walk recursed, and so does dropping mail-parser's tree); deeper
/// is past MAX_PARTS and not parsed at all.
#[test]
fn deeply_nested_messages_are_re_encoded_without_recursion() {
    let depth = mime::MAX_PARTS - 1;
    for body in ["y".repeat(1500), "Gr\u{fc}\u{df}e ".repeat(200)] {
        let msg = nested_messages(depth, &body);
        let out = rewrite(msg, &rules()).unwrap();
        assert!(lines_fit(&out));
        assert_eq!(innermost_qp(&out), format!("{body}\r\n").as_bytes());
    }
    let deeper = nested_messages(100_000, &"y".repeat(1500));
    assert!(matches!(
        rewrite(deeper, &rules()),
        Err(Refusal::TooManyParts { .. })
    ));
}

#[test]
fn deeply_nested_8bit_messages_go_seven_bit_without_recursion() {
    let msg = nested_messages(mime::MAX_PARTS - 1, "K\u{f6}ln");
    let out = seven_bit(&msg).into_owned();
    assert!(out.is_ascii());
    assert_eq!(innermost_qp(&out), "K\u{f6}ln\r\n".as_bytes());
}

/// `n` small text parts and one with a 1,500-octet line.
fn many_parts(n: usize) -> Vec<u8> {
    let mut msg =
        b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b b\"\r\n\r\n"
            .to_vec();
    for _ in 0..n {
        msg.extend_from_slice(b"--b b\r\nContent-Type: text/plain\r\n\r\nx\r\n");
    }
    msg.extend_from_slice(b"--b b\r\n\r\n");
    msg.extend_from_slice("y".repeat(1500).as_bytes());
    msg.extend_from_slice(b"\r\n--b b--\r\n");
    msg
}

/// Past MAX_PARTS a message is not parsed (mail-parser would keep a
/// kilobyte a part: 500 MB for one 18 MB message): long lines in it are
/// refused with the reason, not broken (which would change the content).
#[test]
fn a_message_of_too_many_parts_is_not_parsed() {
    let out = rewrite(many_parts(mime::MAX_PARTS - 10), &rules()).unwrap();
    assert!(lines_fit(&out));
    assert_eq!(decoded(&out).last().unwrap(), "y".repeat(1500).as_bytes());
    assert_eq!(
        rewrite(many_parts(mime::MAX_PARTS + 1), &rules()),
        Err(Refusal::TooManyParts {
            limit: mime::MAX_PARTS
        })
    );
    // Nested messages count too.
    let deep = [
        &b"Subject: x\r\nMIME-Version: 1.0\r\n"[..],
        &b"Content-Type: Message/RFC822\r\n\r\n".repeat(mime::MAX_PARTS + 1),
        &[b'z'; 1200],
        b"\r\n",
    ]
    .concat();
    assert!(matches!(
        rewrite(deep, &rules()),
        Err(Refusal::TooManyParts { .. })
    ));
    // Only a long header line: folded, no structure needed.
    let mut msg = many_parts(mime::MAX_PARTS + 1);
    let tail = msg.len() - 1500 - 2 - 11;
    msg.truncate(tail);
    msg.extend_from_slice(b"--b b--\r\n");
    let msg = [format!("X-Long: {}\r\n", "w ".repeat(700)).as_bytes(), &msg].concat();
    assert!(lines_fit(&rewrite(msg, &rules()).unwrap()));
    // Lines that look like delimiters of a boundary nobody declared are
    // text, however many.
    let text = [
        &b"Subject: x\r\n\r\n"[..],
        &b"--b b\r\n".repeat(mime::MAX_PARTS * 2),
        &[b'q'; 1200],
        b"\r\n",
    ]
    .concat();
    assert!(lines_fit(&rewrite(text, &rules()).unwrap()));
    // And the 7-bit conversion leaves such a message alone.
    let eight = [
        &many_parts(mime::MAX_PARTS + 1)[..],
        "K\u{f6}ln\r\n".as_bytes(),
    ]
    .concat();
    assert!(matches!(seven_bit(&eight), std::borrow::Cow::Borrowed(_)));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// Messages made of MIME's building blocks in any order, some lines
    /// long: the rules end without panicking, what they return fits and
    /// applying them again changes nothing.
    #[test]
    fn the_rules_hold_on_any_mix_of_mime_pieces(
        pieces in proptest::collection::vec(proptest::sample::select(vec![
            "Content-Type: multipart/mixed; boundary=b\r\n",
            "Content-Type: message/rfc822\r\n",
            "Content-Type: text/plain; charset=utf-8\r\n",
            "Content-Transfer-Encoding: base64\r\n",
            "Content-Transfer-Encoding: quoted-printable\r\n",
            "Content-Transfer-Encoding: 8bit\r\n",
            "MIME-Version: 1.0\r\n",
            "To: root, \"a b\"@x (c)\r\n",
            "\r\n", "--b\r\n", "--b--\r\n", "=C3=A9=\r\n", "K\u{f6}ln\r\n", " folded\r\n",
            "LONG", "LONGB64", "x\r\n",
        ]), 0..40)
    ) {
        let mut msg = Vec::new();
        for p in pieces {
            match p {
                "LONG" => msg.extend_from_slice(format!("{}\r\n", "w ".repeat(600)).as_bytes()),
                "LONGB64" => msg.extend_from_slice(format!("{}\r\n", "QUJD".repeat(300)).as_bytes()),
                p => msg.extend_from_slice(p.as_bytes()),
            }
        }
        let local = Rules { qualify: Some("example.org".into()), ..rules() };
        let _ = seven_bit(&msg);
        if let Ok(out) = rewrite(msg, &local) {
            proptest::prop_assert!(lines_fit(&out));
            proptest::prop_assert_eq!(rewrite(out.clone(), &local).unwrap(), out.clone());
            let _ = seven_bit(&out);
        }
    }
}
