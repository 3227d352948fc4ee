//! The message as `sendmail` reads it from stdin, and the header work
//! Postfix's cleanup does for local submissions: line ends made CRLF, a
//! blank line inserted when the text starts without headers, recipients
//! taken from To/Cc/Bcc (`-t`), Bcc removed, a From: header added.
//!
//! # Security
//! Stdin is untrusted input of any size: it is read line by line with a cap
//! on line length and on the total, and NUL bytes are refused (they would
//! be cut or mangled somewhere downstream). 8-bit bytes pass unchanged.

use std::io::{self, BufRead, Read};

use mail_parser::{HeaderValue, MessageParser};

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("message too big: more than {limit} bytes (smtp.max_message_size)")]
    TooBig { limit: u64 },
    #[error("line {line} contains a NUL character")]
    Nul { line: usize },
    #[error("cannot read the message from standard input: {0}")]
    Io(#[from] io::Error),
}

/// Reads the message: bare LF (and CRLF) line ends become CRLF, a last
/// line without an end gets one, and unless `ignore_dots` a line holding
/// only "." ends the message. A leading mbox "From " line is dropped.
/// Lines longer than `max_line` are broken by inserting CRLF SPACE, as
/// Postfix's `smtp_line_length_limit` does: the upstream would refuse
/// them, and refusing here would lose mail from programs (PHP with long
/// HTML lines) that never check.
pub fn read(
    mut input: impl BufRead,
    ignore_dots: bool,
    max_size: u64,
    max_line: usize,
) -> Result<Vec<u8>, InputError> {
    let mut out = Vec::with_capacity(8192);
    let mut line = Vec::with_capacity(1024);
    let mut n = 0;
    loop {
        line.clear();
        // Bounded by what is left of the size limit (and a line end).
        let budget = max_size.saturating_sub(out.len() as u64) + 3;
        input.by_ref().take(budget).read_until(b'\n', &mut line)?;
        if line.is_empty() {
            break;
        }
        n += 1;
        let ended = line.last() == Some(&b'\n');
        if !ended && line.len() as u64 >= budget {
            return Err(InputError::TooBig { limit: max_size });
        }
        let mut text = &line[..];
        if ended {
            text = &text[..text.len() - 1];
            text = text.strip_suffix(b"\r").unwrap_or(text);
        }
        if n == 1 && text.starts_with(b"From ") {
            continue;
        }
        if !ignore_dots && text == b"." {
            break;
        }
        if text.contains(&0) {
            return Err(InputError::Nul { line: n });
        }
        fold(text, max_line.max(2), &mut out);
        if out.len() as u64 > max_size {
            return Err(InputError::TooBig { limit: max_size });
        }
    }
    Ok(separate(out))
}

/// Appends `text` and CRLF, breaking it into pieces of at most `max`
/// bytes joined by CRLF SPACE, never inside a UTF-8 character.
fn fold(mut text: &[u8], max: usize, out: &mut Vec<u8>) {
    let mut room = max;
    while text.len() > room {
        let mut cut = room;
        // Back off continuation bytes (10xxxxxx) to a character start.
        while cut > room.saturating_sub(3) && cut > 1 && text[cut] & 0xC0 == 0x80 {
            cut -= 1;
        }
        out.extend_from_slice(&text[..cut]);
        out.extend_from_slice(b"\r\n ");
        text = &text[cut..];
        room = max - 1;
    }
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

/// Whether a line is a header field ("Name: value").
fn is_field(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let name = &line[..colon];
    // RFC 5322 field names; "Name :" with spaces is obsolete but common.
    let name = name.trim_ascii_end();
    !name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b) && b != b':')
}

/// Byte offset where the header section ends: just past the empty line,
/// or at the end when there is no body.
pub fn header_end(msg: &[u8]) -> usize {
    let mut pos = 0;
    while pos < msg.len() {
        let end = msg[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| pos + p + 2)
            .unwrap_or(msg.len());
        if end - pos == 2 {
            return end;
        }
        pos = end;
    }
    msg.len()
}

/// Inserts the empty line between headers and body when the text starts
/// with something that is not a header (`echo hi | sendmail`), as
/// Postfix's cleanup does, so the first body line is not taken for a
/// malformed header.
fn separate(msg: Vec<u8>) -> Vec<u8> {
    let mut pos = 0;
    let mut in_field = false;
    while pos < msg.len() {
        let end = msg[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| pos + p + 2)
            .unwrap_or(msg.len());
        let line = &msg[pos..end - 2];
        if line.is_empty() {
            return msg;
        }
        let continuation = in_field && (line[0] == b' ' || line[0] == b'\t');
        if !continuation && !is_field(line) {
            let mut out = Vec::with_capacity(msg.len() + 2);
            out.extend_from_slice(&msg[..pos]);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&msg[pos..]);
            return out;
        }
        in_field = true;
        pos = end;
    }
    msg
}

/// The header fields as (name, whole field including continuation lines
/// and CRLF) slices, in order.
fn fields(msg: &[u8]) -> Vec<(&[u8], std::ops::Range<usize>)> {
    let end = header_end(msg);
    let mut out: Vec<(&[u8], std::ops::Range<usize>)> = Vec::new();
    let mut pos = 0;
    while pos < end {
        let line_end = msg[pos..end]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| pos + p + 2)
            .unwrap_or(end);
        let line = &msg[pos..line_end];
        if line == b"\r\n" {
            break;
        }
        if (line[0] == b' ' || line[0] == b'\t')
            && let Some(last) = out.last_mut()
        {
            last.1.end = line_end;
        } else {
            let colon = line.iter().position(|&b| b == b':').unwrap_or(0);
            out.push((line[..colon].trim_ascii(), pos..line_end));
        }
        pos = line_end;
    }
    out
}

pub fn has_header(msg: &[u8], name: &str) -> bool {
    fields(msg)
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
}

/// Removes every Bcc: (and Resent-Bcc:) field, continuation lines too.
pub fn remove_bcc(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len());
    let mut pos = 0;
    for (name, range) in fields(msg) {
        if name.eq_ignore_ascii_case(b"bcc") || name.eq_ignore_ascii_case(b"resent-bcc") {
            out.extend_from_slice(&msg[pos..range.start]);
            pos = range.end;
        }
    }
    out.extend_from_slice(&msg[pos..]);
    out
}

/// An address as found in a header or argument: `Some` mailbox, or `None`
/// for an entry that has a name but no address (a syntax error).
pub type Found = Option<String>;

/// Addresses in the To, Cc and Bcc fields (`-t`), in order. Groups
/// count by their members ("undisclosed-recipients:;" has none).
pub fn header_recipients(msg: &[u8]) -> Vec<Found> {
    let head = &msg[..header_end(msg)];
    let Some(parsed) = MessageParser::new()
        .with_address_headers()
        .parse_headers(head)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for h in parsed.headers() {
        let name = h.name();
        if !["to", "cc", "bcc"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            continue;
        }
        if let HeaderValue::Address(a) = h.value() {
            for addr in a.iter() {
                // A lone word ("root") is a local user to qualify; the
                // parser reads it as a display name.
                let bare = addr
                    .name()
                    .map(str::trim)
                    .filter(|n| !n.is_empty() && !n.contains(char::is_whitespace));
                out.push(addr.address().or(bare).map(|s| s.trim().to_string()));
            }
        }
    }
    out
}

/// Addresses in one command-line argument, which may be a list
/// ("a@x, Bob <b@y>") like a header value.
pub fn argument_recipients(arg: &str) -> Vec<Found> {
    if arg.contains(['\r', '\n']) {
        return vec![None];
    }
    let field = format!("To: {arg}\r\n\r\n");
    header_recipients(field.as_bytes())
}

/// A `From:` field for a message that has none: the display name (RFC
/// 2047-encoded when not ASCII, quoted when it has specials) and address.
pub fn from_field(full_name: Option<&str>, address: &str) -> Vec<u8> {
    let name = full_name
        .map(|n| n.chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|n| !n.trim().is_empty());
    let field = match name {
        None => format!("From: <{address}>\r\n"),
        Some(n) if !n.is_ascii() => {
            use base64::Engine;
            let b = base64::engine::general_purpose::STANDARD.encode(n.as_bytes());
            format!("From: =?UTF-8?B?{b}?= <{address}>\r\n")
        }
        Some(n) if n.chars().any(|c| "()<>[]:;@\\,.\"".contains(c)) => {
            let q = n.replace('\\', "\\\\").replace('"', "\\\"");
            format!("From: \"{q}\" <{address}>\r\n")
        }
        Some(n) => format!("From: {n} <{address}>\r\n"),
    };
    field.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(input: &[u8], ignore_dots: bool) -> Vec<u8> {
        read(input, ignore_dots, 1 << 20, 998).unwrap()
    }

    #[test]
    fn line_ends_dots_and_8bit() {
        assert_eq!(
            rd(b"Subject: x\n\nhi\r\nthere\n", false),
            b"Subject: x\r\n\r\nhi\r\nthere\r\n"
        );
        assert_eq!(
            rd(b"Subject: x\n\nno end", false),
            b"Subject: x\r\n\r\nno end\r\n"
        );
        assert_eq!(rd(b"S: x\n\na\n.\nb\n", false), b"S: x\r\n\r\na\r\n");
        assert_eq!(
            rd(b"S: x\n\na\n.\nb\n", true),
            b"S: x\r\n\r\na\r\n.\r\nb\r\n"
        );
        assert_eq!(rd(b"S: x\n\n..\n", false), b"S: x\r\n\r\n..\r\n");
        let eight = "Subject: caf\u{e9}\n\nGr\u{fc}\u{df}e\n".as_bytes();
        assert_eq!(
            rd(eight, false),
            "Subject: caf\u{e9}\r\n\r\nGr\u{fc}\u{df}e\r\n".as_bytes()
        );
        assert_eq!(
            rd(b"From me Mon Jan 1\nS: x\n\nb\n", false),
            b"S: x\r\n\r\nb\r\n"
        );
    }

    #[test]
    fn text_without_headers_gets_a_blank_line() {
        assert_eq!(rd(b"Oh hi there\n", false), b"\r\nOh hi there\r\n");
        assert_eq!(
            rd(b"Subject: x\nnot a header\n", false),
            b"Subject: x\r\n\r\nnot a header\r\n"
        );
        assert_eq!(
            rd(b"Subject: x\n folded\n\nbody\n", false),
            b"Subject: x\r\n folded\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn long_lines_are_folded() {
        let got = read(&b"S: x\n\n0123456789abc\nok\n"[..], false, 1000, 5).unwrap();
        assert_eq!(got, b"S: x\r\n\r\n01234\r\n 5678\r\n 9abc\r\nok\r\n");
        // Never inside a UTF-8 character (\u{e9} is two bytes).
        let got = read("S: x\n\nabc\u{e9}\u{e9}\n".as_bytes(), false, 1000, 4).unwrap();
        assert_eq!(got, "S: x\r\n\r\nabc\r\n \u{e9}\r\n \u{e9}\r\n".as_bytes());
        let long = vec![b'a'; 2000];
        let got = read(&long[..], false, 1 << 20, 998).unwrap();
        assert!(got.split(|&b| b == b'\n').all(|l| l.len() <= 999));
    }

    #[test]
    fn limits() {
        assert!(matches!(
            read(&b"S: x\n\n0123456789\n"[..], false, 12, 998),
            Err(InputError::TooBig { .. })
        ));
        let endless = vec![b'a'; 5000];
        assert!(matches!(
            read(&endless[..], false, 1000, 998),
            Err(InputError::TooBig { .. })
        ));
        assert!(matches!(
            read(&b"S: x\n\na\0b\n"[..], false, 1 << 20, 998),
            Err(InputError::Nul { line: 3 })
        ));
    }

    #[test]
    fn recipients_and_bcc() {
        let m = b"To: A <a@example.com>, b@example.com\r\nCc: undisclosed-recipients:;\r\nBcc: secret@example.net,\r\n  other@example.net\r\nSubject: Bcc: not me\r\n\r\nTo: body@example.com\r\n";
        let r: Vec<String> = header_recipients(m).into_iter().flatten().collect();
        assert_eq!(
            r,
            vec![
                "a@example.com",
                "b@example.com",
                "secret@example.net",
                "other@example.net"
            ]
        );
        let stripped = remove_bcc(m);
        assert_eq!(
            stripped,
            b"To: A <a@example.com>, b@example.com\r\nCc: undisclosed-recipients:;\r\nSubject: Bcc: not me\r\n\r\nTo: body@example.com\r\n"
        );
        assert!(has_header(m, "subject") && !has_header(m, "from"));
        assert_eq!(
            argument_recipients("x@example.com, Bob <y@example.org>"),
            vec![Some("x@example.com".into()), Some("y@example.org".into())]
        );
        assert_eq!(argument_recipients("root"), vec![Some("root".into())]);
    }

    #[test]
    fn from_fields() {
        assert_eq!(from_field(None, "a@b"), b"From: <a@b>\r\n");
        assert_eq!(
            from_field(Some("Web Shop"), "a@b"),
            b"From: Web Shop <a@b>\r\n"
        );
        assert_eq!(
            from_field(Some("Shop, Inc."), "a@b"),
            b"From: \"Shop, Inc.\" <a@b>\r\n"
        );
        assert_eq!(
            from_field(Some("J\u{f6}rg"), "a@b"),
            b"From: =?UTF-8?B?SsO2cmc=?= <a@b>\r\n"
        );
    }
}
