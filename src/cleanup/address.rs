//! Addresses in the header: the recipients `sendmail -t` takes from it,
//! the `From:` added to a local message that has none, and bare local
//! names (`To: root`, `From: root (Cron Daemon)`) qualified with
//! `@myorigin` (Postfix's `local_header_rewrite_clients`), which providers
//! otherwise refuse ("Missing final '@domain'").
//!
//! Recipients are read with mail-parser, but for a field it misreads (a
//! quoted local part outside angle brackets, `"john doe"@x`, comes back as
//! a display name and `@x`), which the module's own scanner reads
//! (`addr_specs`). Qualifying must change nothing
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
            // mail-parser reads a quoted local part outside angle brackets
            // (`"john doe"@x`, `john."doe"@x`) as a display name followed
            // by `@x`; such a field is read by `addr_specs` instead.
            let misread = a.iter().any(|addr| {
                addr.name().is_some()
                    && addr
                        .address()
                        .is_some_and(|r| r.starts_with('@') || r.starts_with('.'))
            });
            let raw = head.get(h.offset_start as usize..h.offset_end as usize);
            if let (true, Some(raw)) = (misread, raw) {
                out.extend(addr_specs(raw));
                continue;
            }
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

/// `local@domain` with the local part in quotes when it is not a dot-atom
/// (`john doe@x` becomes `"john doe"@x`), `"` and `\\` escaped: the one
/// form in which an address with a quoted local part is queued and
/// relayed, whichever way it came in. A dot-atom is returned unchanged.
pub fn quote_local_part(addr: &str) -> String {
    let Some(at) = addr.rfind('@') else {
        return addr.to_string();
    };
    let (local, domain) = addr.split_at(at);
    let atext =
        |c: char| c.is_ascii_alphanumeric() || !c.is_ascii() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let dot_atom = !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext));
    if dot_atom {
        return addr.to_string();
    }
    let mut out = String::with_capacity(addr.len() + 4);
    out.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out.push_str(domain);
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

/// The addresses of an address-list field value, read by this module's
/// own scanner (see `header_recipients` for when): quoted strings,
/// comments, angle brackets, groups and obsolete spaces around dots
/// understood; a quoted local part comes back in the one quoted form
/// ([`quote_local_part`]). Entries as in [`Found`].
pub fn addr_specs(v: &[u8]) -> Vec<Found> {
    let mut out = Vec::new();
    let mut mb = Spec::default();
    let mut gap = false;
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'"' => {
                let mut text = Vec::new();
                i += 1;
                while i < v.len() && v[i] != b'"' {
                    if v[i] == b'\\' && i + 1 < v.len() {
                        i += 1;
                    }
                    if !matches!(v[i], b'\r' | b'\n') {
                        text.push(v[i]);
                    }
                    i += 1;
                }
                i += 1;
                mb.word(&text, gap);
                mb.quoted = true;
                gap = false;
            }
            b'(' => {
                i = comment_end(v, i);
                gap = true;
            }
            b'<' => {
                let mut quoted = false;
                let mut j = i + 1;
                while j < v.len() && (quoted || v[j] != b'>') {
                    match v[j] {
                        b'\\' => j += 1,
                        b'"' => quoted = !quoted,
                        _ => {}
                    }
                    j += 1;
                }
                let inside = &v[i + 1..j.min(v.len())];
                // A source route (`<@a,@b:x@y>`) is not part of the address.
                let inside = match inside.trim_ascii_start().first() {
                    Some(b'@') => inside
                        .iter()
                        .position(|&b| b == b':')
                        .map_or(&inside[..0], |c| &inside[c + 1..]),
                    _ => inside,
                };
                mb.angle = Some(addr_specs(inside).into_iter().next().flatten());
                i = j + 1;
            }
            b',' | b';' => {
                out.extend(std::mem::take(&mut mb).finish());
                i += 1;
            }
            // A group's display name ends here (an address has no colon
            // outside quotes and brackets).
            b':' => {
                mb = Spec::default();
                i += 1;
            }
            b'.' | b'@' => {
                mb.special(v[i]);
                gap = false;
                i += 1;
            }
            // Whitespace, and a stray `)` or `>` (no match above).
            b' ' | b'\t' | b'\r' | b'\n' | b')' | b'>' => {
                gap = true;
                i += 1;
            }
            _ => {
                let end = v[i..]
                    .iter()
                    .position(|b| b" \t\r\n\"(),;:<>.@".contains(b))
                    .map_or(v.len(), |p| i + p);
                mb.word(&v[i..end], gap);
                gap = false;
                i = end;
            }
        }
    }
    out.extend(mb.finish());
    out
}

/// Just past the comment that starts at `v[start]` (`(`), nested
/// comments and escapes honoured; the end of `v` when it is unbalanced.
fn comment_end(v: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i < v.len() {
        match v[i] {
            b'\\' => i += 1,
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
        if depth == 0 {
            break;
        }
    }
    i.min(v.len())
}

/// One mailbox as `addr_specs` reads it.
#[derive(Default)]
struct Spec {
    /// The address's text, quotes removed (its meaning, RFC 5322 3.4.1).
    text: Vec<u8>,
    /// Two words with only space between: a display name.
    phrase: bool,
    /// It has a quoted string: without an `@`, a display name.
    quoted: bool,
    last_word: bool,
    any: bool,
    /// What the angle brackets held, if there were any.
    angle: Option<Found>,
}

impl Spec {
    fn word(&mut self, w: &[u8], gap: bool) {
        if self.last_word && gap {
            self.phrase = true;
        }
        self.text.extend_from_slice(w);
        self.last_word = true;
        self.any = true;
    }

    fn special(&mut self, c: u8) {
        self.text.push(c);
        self.last_word = false;
        self.any = true;
    }

    /// The entry, or nothing for an empty one (a group's end, a
    /// trailing comma).
    fn finish(self) -> Option<Found> {
        if let Some(a) = self.angle {
            return Some(a);
        }
        if !self.any {
            return None;
        }
        if self.phrase || (self.quoted && !self.text.contains(&b'@')) {
            return Some(None);
        }
        Some(Some(quote_local_part(&String::from_utf8_lossy(&self.text))))
    }
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
                i = comment_end(v, i);
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

    /// mail-parser reads a quoted local part outside angle brackets as a
    /// display name (`"john doe"@example.com` gave `@example.com`).
    #[test]
    fn quoted_local_parts_are_recipients_as_written() {
        let m = b"To: \"john doe\"@example.com, john.\"doe\"@example.com,\r\n \"a@b\"@example.com, \"j\\\"d\"@example.com\r\nCc: \"x\".y@example.com (c), Bob <\"bob smith\"@example.com>\r\n\r\n";
        let r: Vec<Found> = header_recipients(m);
        assert_eq!(
            r,
            [
                "\"john doe\"@example.com",
                "john.doe@example.com",
                "\"a@b\"@example.com",
                "\"j\\\"d\"@example.com",
                "x.y@example.com",
                "\"bob smith\"@example.com",
            ]
            .map(|a| Some(a.to_string()))
        );
        assert_eq!(
            argument_recipients("\"john doe\"@example.com"),
            [Some("\"john doe\"@example.com".to_string())]
        );
    }

    proptest::proptest! {
        /// Any bytes, weighted to the scanner's specials: it ends, and
        /// `header_recipients` with it, whatever the sender wrote.
        #[test]
        fn the_scanners_end_on_any_input(v in proptest::collection::vec(
            proptest::sample::select(b"\"()<>,;:.@\\ \tab\r\n\xc3".to_vec()), 0..40)
        ) {
            let _ = addr_specs(&v);
            let _ = bare_name_ends(&v);
            let msg = [&b"To: \"q\"@x, "[..], &v, b"\r\n\r\n"].concat();
            let _ = header_recipients(&msg);
        }
    }

    #[test]
    fn the_own_scanner_reads_every_shape_of_address_list() {
        let specs = |v: &str| -> Vec<Found> { addr_specs(v.as_bytes()) };
        let some = |a: &str| Some(a.to_string());
        assert_eq!(
            specs("team: root, \"a b\"@x.example (c);, Bob <b@y.example>,"),
            [some("root"), some("\"a b\"@x.example"), some("b@y.example")]
        );
        assert_eq!(specs("undisclosed-recipients:;"), []);
        assert_eq!(
            specs("john . doe @ example.com, <@route.example,@r2:x@z.example>"),
            [some("john.doe@example.com"), some("x@z.example")]
        );
        assert_eq!(
            specs("Cron Daemon, \"Name, Only\", <>, \"q\" <\"a\\\\b\"@x>"),
            [None, None, None, some("\"a\\\\b\"@x")]
        );
        // Stray closing brackets are skipped, never looped on.
        assert_eq!(
            specs("\"a b\"@x.example, foo), >bar"),
            [some("\"a b\"@x.example"), some("foo"), some("bar")]
        );
        assert_eq!(
            specs("j\u{f6}rg@b\u{fc}cher.example, x@[192.0.2.1]"),
            [some("j\u{f6}rg@b\u{fc}cher.example"), some("x@[192.0.2.1]")]
        );
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
