//! Addresses in the header: the recipients `sendmail -t` takes from it,
//! the `From:` added to a local message that has none, and bare local
//! names (`To: root`, `From: root (Cron Daemon)`) qualified with
//! `@myorigin` (Postfix's `local_header_rewrite_clients`), which providers
//! otherwise refuse ("Missing final '@domain'").
//!
//! Recipients are read with mail-parser. Qualifying must change nothing
//! but the bare names, keeping display names, comments, groups and
//! folding, so it works on the field's bytes: a small scanner that knows
//! quoted strings, comments, angle brackets and groups finds where each
//! bare name ends and inserts `@domain` there.
//!
//! # Security
//! The header comes from the sender. The scanner only inserts text at
//! positions it found outside quotes and comments; an unbalanced quote,
//! comment or bracket simply leaves the rest of the field alone.

use mail_parser::{HeaderValue, MessageParser};

use super::header;

/// The address fields whose bare names are qualified.
const ADDRESS_FIELDS: &[&str] = &[
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "resent-from",
    "resent-sender",
    "resent-reply-to",
    "resent-to",
    "resent-cc",
    "resent-bcc",
];

/// An address as found in a header or argument: `Some` mailbox, or `None`
/// for an entry that has a name but no address (a syntax error).
pub type Found = Option<String>;

/// The recipients of `sendmail -t`, in order: from `Resent-To`,
/// `Resent-Cc` and `Resent-Bcc` when the message has any of them (it is
/// being re-sent, RFC 5322 3.6.6, as sendmail and Postfix read it), else
/// from `To`, `Cc` and `Bcc`. Groups count by their members
/// ("undisclosed-recipients:;" has none).
pub fn header_recipients(msg: &[u8]) -> Vec<Found> {
    let head = &msg[..header::end(msg)];
    let Some(parsed) = MessageParser::new()
        .with_address_headers()
        .parse_headers(head)
    else {
        return Vec::new();
    };
    let resent = ["resent-to", "resent-cc", "resent-bcc"];
    let plain = ["to", "cc", "bcc"];
    let is = |names: &[&str], name: &str| names.iter().any(|n| name.eq_ignore_ascii_case(n));
    let names: &[&str] = if parsed.headers().iter().any(|h| is(&resent, h.name())) {
        &resent
    } else {
        &plain
    };
    let mut out = Vec::new();
    for h in parsed.headers() {
        if !is(names, h.name()) {
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

/// The message with `@domain` appended to every bare name in its address
/// fields; `None` when there was none.
pub fn qualify(msg: &[u8], domain: &str) -> Option<Vec<u8>> {
    let mut inserts: Vec<usize> = Vec::new();
    for f in header::fields(msg) {
        if !ADDRESS_FIELDS.iter().any(|n| f.is(n)) {
            continue;
        }
        let value = header::value(msg, &f);
        let start = f.range.end - value.len();
        inserts.extend(bare_name_ends(value).into_iter().map(|p| start + p));
    }
    if inserts.is_empty() {
        return None;
    }
    let suffix = format!("@{domain}");
    let mut out = Vec::with_capacity(msg.len() + inserts.len() * suffix.len());
    let mut pos = 0;
    for at in inserts {
        out.extend_from_slice(&msg[pos..at]);
        out.extend_from_slice(suffix.as_bytes());
        pos = at;
    }
    out.extend_from_slice(&msg[pos..]);
    Some(out)
}

/// Where each bare local name in an address-list value ends: the offsets
/// at which `@domain` belongs.
fn bare_name_ends(v: &[u8]) -> Vec<usize> {
    let mut found = Vec::new();
    let mut mailbox = Mailbox::default();
    let mut i = 0;
    while i < v.len() {
        let b = v[i];
        match b {
            b'"' => {
                mailbox.word(i);
                i += 1;
                while i < v.len() && v[i] != b'"' {
                    i += if v[i] == b'\\' { 2 } else { 1 };
                }
                mailbox.word_end(i + 1);
            }
            b'(' => {
                let mut depth = 0usize;
                while i < v.len() {
                    match v[i] {
                        b'\\' => i += 1,
                        b'(' => depth += 1,
                        b')' => depth -= 1,
                        _ => {}
                    }
                    i += 1;
                    if depth == 0 {
                        break;
                    }
                }
                mailbox.gap();
                continue;
            }
            b'<' => {
                let Some(close) = v[i..].iter().position(|&c| c == b'>').map(|p| i + p) else {
                    return found;
                };
                let inside = v[i + 1..close].trim_ascii();
                if !inside.is_empty()
                    && !inside.contains(&b'@')
                    && !inside.iter().any(|c| c.is_ascii_whitespace() || *c == b'"')
                {
                    found.push(close);
                }
                mailbox.angle = true;
                i = close;
            }
            // The end of a mailbox, or of a group's display name.
            b',' | b';' => {
                found.extend(mailbox.bare_end(v));
                mailbox = Mailbox::default();
            }
            b':' => mailbox = Mailbox::default(),
            b' ' | b'\t' | b'\r' | b'\n' => mailbox.gap(),
            _ => {
                mailbox.word(i);
                mailbox.word_end(i + 1);
            }
        }
        i += 1;
    }
    found.extend(mailbox.bare_end(v));
    found
}

/// What the scanner has seen of one mailbox.
#[derive(Default)]
struct Mailbox {
    /// First and past-the-last byte of its words (outside comments).
    span: Option<(usize, usize)>,
    /// Whitespace or a comment since the last word.
    gap: bool,
    /// More than one word: a display name, not a bare name.
    words: bool,
    /// It has an angle address (handled on its own).
    angle: bool,
}

impl Mailbox {
    fn word(&mut self, at: usize) {
        match self.span {
            None => self.span = Some((at, at + 1)),
            Some(_) if self.gap => self.words = true,
            Some(_) => {}
        }
        self.gap = false;
    }

    fn word_end(&mut self, end: usize) {
        if let Some(span) = self.span.as_mut() {
            span.1 = end;
        }
    }

    fn gap(&mut self) {
        if self.span.is_some() {
            self.gap = true;
        }
    }

    /// Where `@domain` goes if this mailbox is a bare name.
    fn bare_end(&self, v: &[u8]) -> Option<usize> {
        let (start, end) = self.span?;
        let end = end.min(v.len());
        let word = &v[start..end];
        (!self.angle && !self.words && !word.contains(&b'@') && word.first() != Some(&b'"'))
            .then_some(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: &str) -> String {
        let msg = format!("To: {v}\r\n\r\nTo: body\r\n");
        let out =
            qualify(msg.as_bytes(), "example.org").unwrap_or_else(|| msg.clone().into_bytes());
        let out = String::from_utf8(out).unwrap();
        out.strip_prefix("To: ")
            .unwrap()
            .strip_suffix("\r\n\r\nTo: body\r\n")
            .unwrap()
            .to_string()
    }

    #[test]
    fn bare_names_are_qualified_keeping_names_and_comments() {
        assert_eq!(q("root"), "root@example.org");
        assert_eq!(q("root (Cron Daemon)"), "root@example.org (Cron Daemon)");
        assert_eq!(q("Cron Daemon <root>"), "Cron Daemon <root@example.org>");
        assert_eq!(
            q("\"Daemon, Cron\" <root>"),
            "\"Daemon, Cron\" <root@example.org>"
        );
        assert_eq!(
            q("root, alice@example.net, Bob <bob>"),
            "root@example.org, alice@example.net, Bob <bob@example.org>"
        );
        assert_eq!(q("first.last"), "first.last@example.org");
        assert_eq!(
            q("root,\r\n\twww-data (the (web) server)"),
            "root@example.org,\r\n\twww-data@example.org (the (web) server)"
        );
        assert_eq!(
            q("team: root, a@b.example;"),
            "team: root@example.org, a@b.example;"
        );
    }

    #[test]
    fn qualified_and_odd_values_are_left_alone() {
        for v in [
            "a@b.example",
            "Alice <a@b.example>",
            "undisclosed-recipients:;",
            "Cron Daemon",
            "\"quoted name\"",
            "<>",
            "(only a comment)",
            "\"unbalanced <root>",
        ] {
            assert_eq!(q(v), v, "{v}");
        }
        let m = b"Subject: root\r\nX-To: root\r\n\r\n";
        assert!(qualify(m, "example.org").is_none());
    }

    #[test]
    fn every_address_field_is_qualified() {
        let m = b"From: root (Cron Daemon)\r\nSender: daemon\r\nReply-To: ops\r\nCc: a, b@x.example\r\nResent-To: r\r\nSubject: root\r\n\r\nTo: x\r\n";
        let out = String::from_utf8(qualify(m, "o.example").unwrap()).unwrap();
        assert_eq!(
            out,
            "From: root@o.example (Cron Daemon)\r\nSender: daemon@o.example\r\nReply-To: ops@o.example\r\nCc: a@o.example, b@x.example\r\nResent-To: r@o.example\r\nSubject: root\r\n\r\nTo: x\r\n"
        );
    }

    #[test]
    fn recipients_follow_resent_fields() {
        let m = b"To: A <a@example.com>, b@example.com\r\nCc: undisclosed-recipients:;\r\nBcc: secret@example.net,\r\n  other@example.net\r\nSubject: Bcc: not me\r\n\r\nTo: body@example.com\r\n";
        let r: Vec<String> = header_recipients(m).into_iter().flatten().collect();
        assert_eq!(
            r,
            [
                "a@example.com",
                "b@example.com",
                "secret@example.net",
                "other@example.net"
            ]
        );
        let m = b"To: old@example.com\r\nCc: old2@example.com\r\nResent-To: new@example.com\r\nResent-Bcc: hidden@example.com\r\n\r\n";
        let r: Vec<String> = header_recipients(m).into_iter().flatten().collect();
        assert_eq!(r, ["new@example.com", "hidden@example.com"]);
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
