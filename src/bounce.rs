//! Delivery status notifications (RFC 3464): the message relayq sends back
//! to the original sender when a message failed for good, is still being
//! retried after a long time, or (NOTIFY=SUCCESS, RFC 3461) was delivered
//! or relayed to an upstream that reports no status itself. The sender's
//! ENVID and ORCPT are echoed as `Original-Envelope-Id` and
//! `Original-Recipient`. This module only *builds* the notification;
//! the caller queues it with the null reverse-path (`MAIL FROM:<>`), and
//! must not build one for a message whose own sender was `<>` (RFC 5321
//! section 4.5.5: never bounce a bounce).
//!
//! The shape follows Postfix's bounce daemon: a `multipart/report` with a
//! human explanation, a machine-readable `message/delivery-status`, and the
//! original as `message/rfc822` (or only its header as `text/rfc822-headers`
//! when it is too large or not fit to be returned whole).
//!
//! mail-builder writes the MIME tree, the boundary and the text part (it picks
//! 7bit or quoted-printable). It cannot write the `message/*` parts correctly:
//! a body given to it as binary is always base64-encoded, which RFC 2046
//! section 5.2.1 forbids for `message/rfc822` and which makes a
//! `message/delivery-status` unreadable to the many tools that grep it. Those
//! parts are therefore handed to it as raw parts whose headers we write
//! ourselves, and the top-level header is written here too, so that every
//! field holding outside data goes through one sanitiser and one folder.
//!
//! Choices worth knowing:
//! - The `message/delivery-status` part is always 7-bit. A recipient address
//!   that is not ASCII is written as `utf-8;` with the RFC 6533
//!   `utf-8-addr-xtext` form (`\x{FC}` escapes), which RFC 6533 allows in a
//!   plain `message/delivery-status`; the same escape is used for non-ASCII
//!   bytes of a diagnostic. We do not emit `message/global-delivery-status`:
//!   fewer parsers know it, and nothing is lost by escaping.
//! - The returned original keeps its bytes exactly. If it holds 8-bit data,
//!   that part and the top-level multipart carry
//!   `Content-Transfer-Encoding: 8bit` (the only honest label: 7bit is the
//!   default when the field is absent, and base64 is forbidden). The caller
//!   should then send the notification with `BODY=8BITMIME`; `dsn.is_ascii()`
//!   tells it. A `To:` address that is not ASCII likewise needs SMTPUTF8.
//! - A message whose lines exceed 998 octets or that contains NUL cannot be
//!   returned unchanged as `message/rfc822`, so only its header is returned.
//!
//! # Security
//! Everything from the upstream server (diagnostics, host names) and from the
//! client (addresses, the original message) is untrusted. Values put into a
//! header field or a delivery-status field lose CR, LF and every other control
//! character, so they cannot start a field or part of their own, and are
//! folded so that no line exceeds 998 octets. The original message is only
//! ever placed inside a part whose boundary is checked not to occur in it.

use std::time::{SystemTime, UNIX_EPOCH};

use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{MimePart, make_boundary};

/// RFC 5322 section 2.1.1: the hard limit on a line, CRLF excluded.
const MAX_LINE: usize = 998;
/// Where we prefer to fold a header field, as RFC 5322 recommends.
const FOLD_AT: usize = 78;
/// Width of the human-readable text part, so it stays 7bit when it can.
const TEXT_WIDTH: usize = 72;

/// What happened to a recipient, as the `Action` field says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Delivery failed for good; the message will not be retried.
    Failed,
    /// Delivery has not succeeded yet and is still being retried.
    Delayed,
    /// Handed to an upstream that does not offer DSN: no further notice
    /// will come (RFC 3464 2.3.3), sent on NOTIFY=SUCCESS.
    Relayed,
    /// Delivered (the capture transport's Maildir), on NOTIFY=SUCCESS.
    Delivered,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Relayed => "relayed",
            Action::Delivered => "delivered",
        }
    }
}

/// One recipient the notification reports on.
#[derive(Clone, Debug)]
pub struct BouncedRecipient {
    /// The envelope recipient address, without angle brackets.
    pub address: String,
    pub action: Action,
    /// Enhanced status code such as "5.1.1". Anything not of that form is
    /// replaced by "5.0.0" (failed) or "4.0.0" (delayed).
    pub status: String,
    /// The upstream reply verbatim, e.g. "550 5.1.1 <bob@x>: user unknown";
    /// written as `Diagnostic-Code: smtp; ...`. Lines of a multi-line reply
    /// are joined with spaces.
    pub diagnostic: Option<String>,
    /// The upstream host, either bare ("smtp.sendgrid.net") or already typed
    /// ("dns; smtp.sendgrid.net"); a bare one gets the "dns" type.
    pub remote_mta: Option<String>,
    pub last_attempt: Option<SystemTime>,
    /// ORCPT as the sender gave it (RFC 3461): `Original-Recipient`.
    pub original_recipient: Option<String>,
}

/// Everything needed to build one notification.
#[derive(Clone, Debug)]
pub struct BounceInput<'a> {
    /// Our host name, used in From, Message-ID and Reporting-MTA.
    pub reporting_mta: &'a str,
    pub queue_id: &'a str,
    /// When the original message entered the queue.
    pub arrival: SystemTime,
    /// The notification's Date; injected so tests need no clock.
    pub now: SystemTime,
    /// Envelope sender of the original: the notification goes to it.
    pub original_sender: &'a str,
    /// The original message, CRLF line endings.
    pub original_message: &'a [u8],
    pub recipients: &'a [BouncedRecipient],
    /// A human sentence or paragraph explaining what happened.
    pub reason: &'a str,
    /// Return the whole original when it is smaller than this many octets,
    /// otherwise only its header; 0 always returns only the header (RET=HDRS).
    pub return_full_message_limit: usize,
    /// ENVID as the sender gave it (RFC 3461): `Original-Envelope-Id`.
    pub envid: Option<&'a str>,
}

/// Builds a complete RFC 5322 message, CRLF line endings, that reports on
/// `input.recipients`.
pub fn build_dsn(input: &BounceInput<'_>) -> Vec<u8> {
    let host = token(input.reporting_mta);
    let original = ReturnedOriginal::new(input.original_message, input.return_full_message_limit);
    let status = delivery_status(input, &host);
    let text = human_text(input, &host);

    // A boundary must not occur inside any part; with a random one that only
    // happens on purpose, but the original message is written by someone else.
    let boundary = loop {
        let candidate = make_boundary("_");
        let needle = format!("--{candidate}");
        if ![original.part.as_slice(), status.as_slice(), text.as_bytes()]
            .iter()
            .any(|part| contains(part, needle.as_bytes()))
        {
            break candidate;
        }
    };

    let mut report = MimePart::new(
        ContentType::new("multipart/report")
            .attribute("report-type", "delivery-status")
            .attribute("boundary", boundary),
        vec![
            MimePart::new("text/plain", text)
                .header("Content-Description", Raw::new("Notification")),
            MimePart::raw(status),
            MimePart::raw(original.part),
        ],
    );
    if original.eight_bit {
        // A multipart may not claim 7bit (the default) around an 8bit part.
        report = report.header("Content-Transfer-Encoding", Raw::new("8bit"));
    }

    let has = |a: Action| input.recipients.iter().any(|r| r.action == a);
    let subject = if has(Action::Failed) || input.recipients.is_empty() {
        "Undelivered Mail Returned to Sender"
    } else if has(Action::Delayed) {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    };
    let sender = one_line(input.original_sender);
    let to = if sender.is_empty() {
        // Only reachable if the caller ignored the rule above; still a valid header.
        "undisclosed-recipients:;".to_string()
    } else {
        format!("<{}>", sender.trim_start_matches('<').trim_end_matches('>'))
    };
    let now_secs = input
        .now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let message_id = format!("<{}.{now_secs}.dsn@{host}>", token(input.queue_id));

    let mut out = Vec::with_capacity(input.original_message.len().min(1 << 20) + 4096);
    push_field(
        &mut out,
        "From",
        &format!("MAILER-DAEMON@{host} (Mail Delivery System)"),
    );
    push_field(&mut out, "To", &to);
    push_field(&mut out, "Subject", subject);
    push_field(&mut out, "Date", &rfc2822(input.now));
    push_field(&mut out, "Message-ID", &message_id);
    push_field(&mut out, "Auto-Submitted", "auto-replied");
    push_field(&mut out, "MIME-Version", "1.0");
    report.write_part(&mut out);
    out
}

/// The third part: the original, whole or header only, with its own headers.
struct ReturnedOriginal {
    part: Vec<u8>,
    eight_bit: bool,
}

impl ReturnedOriginal {
    fn new(message: &[u8], limit: usize) -> Self {
        let message = normalize_crlf(message);
        let whole = message.len() < limit
            && !message.contains(&0)
            && message
                .split(|&b| b == b'\n')
                .all(|l| l.len() <= MAX_LINE + 1);
        let (content_type, description, body) = if whole {
            ("message/rfc822", "Undelivered Message", message)
        } else {
            let header = header_section(&message);
            (
                "text/rfc822-headers",
                "Undelivered Message Headers",
                hard_wrap(header),
            )
        };
        let eight_bit = !body.is_ascii();
        let mut part = Vec::with_capacity(body.len() + 160);
        push_field(&mut part, "Content-Description", description);
        push_field(&mut part, "Content-Type", content_type);
        if eight_bit {
            push_field(&mut part, "Content-Transfer-Encoding", "8bit");
        }
        part.extend_from_slice(b"\r\n");
        part.extend_from_slice(&body);
        ReturnedOriginal { part, eight_bit }
    }
}

/// The `message/delivery-status` part, headers included. Always ASCII.
fn delivery_status(input: &BounceInput<'_>, host: &str) -> Vec<u8> {
    let mut part = Vec::with_capacity(512 + 384 * input.recipients.len());
    push_field(&mut part, "Content-Description", "Delivery report");
    push_field(&mut part, "Content-Type", "message/delivery-status");
    part.extend_from_slice(b"\r\n");

    push_field(&mut part, "Reporting-MTA", &format!("dns; {host}"));
    if let Some(envid) = input.envid {
        push_field(
            &mut part,
            "Original-Envelope-Id",
            &crate::spool::format::xtext(envid),
        );
    }
    push_field(&mut part, "X-Relayq-Queue-ID", &token(input.queue_id));
    if !input.original_sender.is_empty() {
        push_field(
            &mut part,
            "X-Relayq-Sender",
            &typed_address(input.original_sender),
        );
    }
    push_field(&mut part, "Arrival-Date", &rfc2822(input.arrival));

    for rcpt in input.recipients {
        part.extend_from_slice(b"\r\n");
        if let Some(orcpt) = &rcpt.original_recipient {
            let (kind, value) = crate::spool::format::orcpt(&one_line(orcpt));
            push_field(&mut part, "Original-Recipient", &format!("{kind}; {value}"));
        }
        push_field(&mut part, "Final-Recipient", &typed_address(&rcpt.address));
        push_field(&mut part, "Action", rcpt.action.as_str());
        push_field(&mut part, "Status", &status_code(rcpt));
        if let Some(mta) = &rcpt.remote_mta {
            let mta = escape_non_ascii(&one_line(mta));
            if !mta.is_empty() {
                let typed = if mta.contains(';') {
                    mta
                } else {
                    format!("dns; {mta}")
                };
                push_field(&mut part, "Remote-MTA", &typed);
            }
        }
        if let Some(diag) = &rcpt.diagnostic {
            let diag = escape_non_ascii(&one_line(diag));
            if !diag.is_empty() {
                // RFC 3464: "smtp" types an SMTP reply; anything else (a
                // refused connection, a TLS failure) gets a private type.
                let kind = if is_smtp_reply(&diag) {
                    "smtp"
                } else {
                    "x-relayq"
                };
                push_field(&mut part, "Diagnostic-Code", &format!("{kind}; {diag}"));
            }
        }
        if let Some(at) = rcpt.last_attempt {
            push_field(&mut part, "Last-Attempt-Date", &rfc2822(at));
        }
    }
    part
}

/// The human-readable explanation, wrapped so it can usually stay 7bit.
fn human_text(input: &BounceInput<'_>, host: &str) -> String {
    let mut text = String::new();
    wrap_into(
        &mut text,
        &format!("This is the mail system at host {host}."),
        "",
    );
    text.push_str("\r\n");
    // The reason is ours, but may still be multi-paragraph: keep its breaks.
    for line in input.reason.lines() {
        wrap_into(&mut text, &one_line(line), "");
    }
    text.push_str("\r\n                   The mail system\r\n\r\n");
    for (i, rcpt) in input.recipients.iter().enumerate() {
        if i > 0 {
            text.push_str("\r\n");
        }
        let address = one_line(&rcpt.address);
        let host = rcpt.remote_mta.as_deref().map(|m| {
            let m = one_line(m);
            match m.split_once(';') {
                Some((_, name)) => name.trim().to_string(),
                None => m,
            }
        });
        let line = match (&rcpt.diagnostic, host) {
            (Some(diag), Some(host)) if !host.is_empty() => {
                format!("<{address}>: host {host} said: {}", one_line(diag))
            }
            (Some(diag), _) => format!("<{address}>: {}", one_line(diag)),
            (None, _) => format!(
                "<{address}>: delivery {}, status {}",
                rcpt.action.as_str(),
                status_code(rcpt)
            ),
        };
        wrap_into(&mut text, &line, "    ");
    }
    text
}

/// Appends `line` word-wrapped at `TEXT_WIDTH`, continuation lines indented.
/// A single word longer than the width stays whole; mail-builder then picks
/// quoted-printable, which handles long lines.
fn wrap_into(out: &mut String, line: &str, indent: &str) {
    let mut column = 0;
    for word in line.split(' ').filter(|w| !w.is_empty()) {
        if column > indent.len() && column + 1 + word.len() > TEXT_WIDTH {
            out.push_str("\r\n");
            out.push_str(indent);
            column = indent.len();
        } else if column > 0 {
            out.push(' ');
            column += 1;
        }
        out.push_str(word);
        column += word.len();
    }
    out.push_str("\r\n");
}

/// `rfc822; addr` for ASCII addresses, `utf-8; addr-xtext` (RFC 6533) otherwise.
fn typed_address(address: &str) -> String {
    let address = one_line(address);
    let address = address.trim_start_matches('<').trim_end_matches('>');
    if address.is_ascii() {
        format!("rfc822; {address}")
    } else {
        let mut xtext = String::with_capacity(address.len() + 16);
        for c in address.chars() {
            // QCHAR is printable ASCII except SP, '\', '+' and '='.
            if c.is_ascii_graphic() && !matches!(c, '\\' | '+' | '=') {
                xtext.push(c);
            } else {
                xtext.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
            }
        }
        format!("utf-8; {xtext}")
    }
}

fn status_code(rcpt: &BouncedRecipient) -> String {
    let s = rcpt.status.trim();
    let mut fields = s.split('.');
    let valid = matches!(fields.next(), Some("2" | "4" | "5"))
        && fields
            .by_ref()
            .take(2)
            .filter(|f| (1..=3).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()))
            .count()
            == 2
        && fields.next().is_none();
    match (valid, rcpt.action) {
        (true, _) => s.to_string(),
        (false, Action::Failed) => "5.0.0".to_string(),
        (false, Action::Delayed) => "4.0.0".to_string(),
        (false, Action::Relayed | Action::Delivered) => "2.0.0".to_string(),
    }
}

/// Formats a time as RFC 2822 in the system time zone; a time jiff cannot
/// represent (far outside any real clock) becomes the epoch rather than failing.
fn rfc2822(t: SystemTime) -> String {
    jiff::ZonedDateTime::try_from(t)
        .ok()
        .and_then(|z| jiff::fmt::rfc2822::to_string(&z).ok())
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".to_string())
}

/// Collapses CR, LF, tabs and other control characters (runs of them) into
/// one space and trims: the value can no longer end its header field.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending_space = false;
    for c in s.chars() {
        if c.is_control() || c.is_whitespace() {
            pending_space = true;
        } else {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        }
    }
    out
}

/// Something that must be a single atom (host name, queue id): no spaces,
/// nothing outside printable ASCII, no characters that end a msg-id.
fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>' | '@' | ';' | '(' | ')'))
        .collect();
    if t.is_empty() {
        "unknown".to_string()
    } else {
        t
    }
}

/// RFC 6533 EmbeddedUnicodeChar for everything that is not ASCII, so the
/// delivery-status part stays 7bit; backslash is escaped too, so the escape
/// stays unambiguous.
fn escape_non_ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() && c != '\\' {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
        }
    }
    out
}

/// Writes `Name: value` CRLF, folding at spaces near `FOLD_AT` and, for a word
/// that would not fit even on a line of its own, splitting it so no line
/// exceeds `MAX_LINE`. `value` must already be on one line.
fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    let mut column = name.len() + 1;
    let mut words_on_line = 0;
    for mut word in value.split(' ').filter(|w| !w.is_empty()) {
        if words_on_line > 0 && column + 1 + word.len() > FOLD_AT {
            out.extend_from_slice(b"\r\n");
            column = 0;
            words_on_line = 0;
        }
        while column + 1 + word.len() > MAX_LINE {
            let mut take = MAX_LINE - column - 1;
            while !word.is_char_boundary(take) {
                take -= 1;
            }
            out.push(b' ');
            out.extend_from_slice(&word.as_bytes()[..take]);
            out.extend_from_slice(b"\r\n");
            word = &word[take..];
            column = 0;
        }
        out.push(b' ');
        out.extend_from_slice(word.as_bytes());
        column += 1 + word.len();
        words_on_line += 1;
    }
    out.extend_from_slice(b"\r\n");
}

/// Turns bare LF and bare CR into CRLF, so the message cannot end a MIME
/// line where a reader would not expect it.
fn normalize_crlf(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + 16);
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'\r' if input.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The header section of a CRLF message, up to and including the CRLF that
/// ends its last field (the whole message if it has no body).
fn header_section(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &[];
    }
    match find(message, b"\r\n\r\n") {
        Some(at) => &message[..at + 2],
        None => message,
    }
}

/// Drops NUL and splits any line longer than `MAX_LINE` into continuation
/// lines: acceptable for a copy of the header kept for diagnosis.
fn hard_wrap(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 16);
    for line in text.split_inclusive(|&b| b == b'\n') {
        let line: Vec<u8> = line.iter().copied().filter(|&b| b != 0).collect();
        let content = line.strip_suffix(b"\r\n").unwrap_or(&line);
        let mut chunks = content.chunks(MAX_LINE - 1).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            if !first {
                out.push(b' ');
            }
            out.extend_from_slice(chunk);
            if chunks.peek().is_some() || line.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
            first = false;
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Whether a diagnostic is an SMTP reply ("550 5.1.1 ...").
fn is_smtp_reply(diag: &str) -> bool {
    let b = diag.as_bytes();
    b.len() >= 4
        && b[..3].iter().all(u8::is_ascii_digit)
        && matches!(b[0], b'2'..=b'5')
        && matches!(b[3], b' ' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::{HeaderName, Message, MessageParser, MessagePart, MimeHeaders};
    use std::time::Duration;

    const ORIGINAL: &[u8] = b"Return-Path: <alice@example.com>\r\n\
        From: Alice <alice@example.com>\r\n\
        To: bob@example.org, carol@example.net\r\n\
        Subject: quarterly report\r\n\
        Message-ID: <orig-1@example.com>\r\n\
        \r\n\
        Hello Bob,\r\n\
        ..a line that was dot-stuffed once\r\n\
        bye\r\n";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn failed(address: &str, status: &str, diagnostic: &str) -> BouncedRecipient {
        BouncedRecipient {
            address: address.to_string(),
            action: Action::Failed,
            status: status.to_string(),
            diagnostic: Some(diagnostic.to_string()),
            remote_mta: Some("smtp.sendgrid.net".to_string()),
            last_attempt: Some(at(1_800_000_100)),
            original_recipient: None,
        }
    }

    fn input<'a>(recipients: &'a [BouncedRecipient], original: &'a [u8]) -> BounceInput<'a> {
        BounceInput {
            reporting_mta: "relay.example.com",
            queue_id: "01JQ8Z6ZK3V9",
            arrival: at(1_800_000_000),
            now: at(1_800_000_200),
            original_sender: "alice@example.com",
            original_message: original,
            recipients,
            reason: "I'm sorry to have to inform you that your message could not be \
                     delivered to one or more recipients. It's attached below.",
            envid: None,
            return_full_message_limit: 1 << 20,
        }
    }

    fn parse(dsn: &[u8]) -> Message<'_> {
        MessageParser::default()
            .parse(dsn)
            .expect("mail-parser accepts the DSN")
    }

    /// The three children of the top-level multipart/report.
    fn children<'m>(msg: &'m Message<'m>) -> Vec<&'m MessagePart<'m>> {
        let ids = msg.root_part().sub_parts().expect("root is multipart");
        ids.iter().map(|id| msg.part(*id).expect("part")).collect()
    }

    fn ctype(part: &MessagePart<'_>) -> String {
        let ct = part.content_type().expect("content type");
        format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
    }

    fn status_text(dsn: &[u8]) -> String {
        let msg = parse(dsn);
        let parts = children(&msg);
        parts[1].text_contents().expect("utf-8").to_string()
    }

    /// Every line ends in CRLF, no bare CR or LF, none longer than 998 octets.
    fn assert_wire_clean(dsn: &[u8]) {
        assert!(dsn.ends_with(b"\r\n"));
        for (i, &b) in dsn.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && dsn[i - 1] == b'\r', "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(dsn.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        for line in dsn.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(line.len() <= MAX_LINE, "line of {} octets", line.len());
        }
    }

    #[test]
    fn is_a_multipart_report_with_three_parts() {
        let rcpts = [failed(
            "bob@example.org",
            "5.1.1",
            "550 5.1.1 <bob@example.org>: user unknown",
        )];
        let dsn = build_dsn(&input(&rcpts, ORIGINAL));
        assert_wire_clean(&dsn);
        let msg = parse(&dsn);

        let ct = msg.content_type().expect("content type");
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        assert_eq!(
            msg.from().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("MAILER-DAEMON@relay.example.com")
        );
        assert_eq!(
            msg.to().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("alice@example.com")
        );
        assert_eq!(
            msg.header_raw("Auto-Submitted").map(str::trim),
            Some("auto-replied")
        );
        assert_eq!(
            msg.message_id(),
            Some("01JQ8Z6ZK3V9.1800000200.dsn@relay.example.com")
        );
        assert_eq!(msg.header_raw("MIME-Version").map(str::trim), Some("1.0"));
        assert_eq!(msg.date().map(|d| d.to_timestamp()), Some(1_800_000_200));
        // An all-ASCII report needs neither 8BITMIME nor SMTPUTF8.
        assert!(dsn.is_ascii());
        assert!(msg.header("Content-Transfer-Encoding").is_none());

        let parts = children(&msg);
        assert_eq!(parts.len(), 3);
        assert_eq!(ctype(parts[0]), "text/plain");
        assert_eq!(ctype(parts[1]), "message/delivery-status");
        assert_eq!(ctype(parts[2]), "message/rfc822");
        // message/* parts must not be encoded (RFC 2046 5.2.1, RFC 3464 section 10).
        for part in &parts[1..] {
            assert!(part.content_transfer_encoding().is_none(), "{part:?}");
        }

        let human = parts[0].text_contents().expect("text");
        assert!(human.contains("This is the mail system at host relay.example.com."));
        assert!(human.contains("<bob@example.org>: host smtp.sendgrid.net said: 550 5.1.1"));
        assert!(human.contains("user unknown"));
    }

    #[test]
    fn per_message_and_per_recipient_fields() {
        let mut carol = failed("carol@example.net", "5.7.1", "554 5.7.1 relay denied");
        carol.remote_mta = Some("dns; mx.example.net".to_string());
        carol.last_attempt = None;
        let rcpts = [
            failed(
                "bob@example.org",
                "5.1.1",
                "550 5.1.1 <bob@example.org>: user unknown",
            ),
            carol,
        ];
        let dsn = build_dsn(&input(&rcpts, ORIGINAL));
        let status = status_text(&dsn);
        let groups: Vec<&str> = status.trim_end().split("\r\n\r\n").collect();
        assert_eq!(groups.len(), 3, "{status}");

        let arrival = rfc2822(at(1_800_000_000));
        assert_eq!(
            groups[0],
            format!(
                "Reporting-MTA: dns; relay.example.com\r\n\
                 X-Relayq-Queue-ID: 01JQ8Z6ZK3V9\r\n\
                 X-Relayq-Sender: rfc822; alice@example.com\r\n\
                 Arrival-Date: {arrival}"
            )
        );
        let last = rfc2822(at(1_800_000_100));
        assert_eq!(
            groups[1],
            format!(
                "Final-Recipient: rfc822; bob@example.org\r\n\
                 Action: failed\r\n\
                 Status: 5.1.1\r\n\
                 Remote-MTA: dns; smtp.sendgrid.net\r\n\
                 Diagnostic-Code: smtp; 550 5.1.1 <bob@example.org>: user unknown\r\n\
                 Last-Attempt-Date: {last}"
            )
        );
        assert_eq!(
            groups[2],
            "Final-Recipient: rfc822; carol@example.net\r\n\
             Action: failed\r\n\
             Status: 5.7.1\r\n\
             Remote-MTA: dns; mx.example.net\r\n\
             Diagnostic-Code: smtp; 554 5.7.1 relay denied"
        );
        assert!(jiff::fmt::rfc2822::parse(&arrival).is_ok());
    }

    #[test]
    fn delayed_notice_and_fallback_status() {
        let rcpts = [BouncedRecipient {
            address: "bob@example.org".to_string(),
            action: Action::Delayed,
            status: "4.4.1\r\nX: y".to_string(),
            diagnostic: None,
            remote_mta: None,
            last_attempt: None,
            original_recipient: None,
        }];
        let dsn = build_dsn(&input(&rcpts, ORIGINAL));
        assert_wire_clean(&dsn);
        let msg = parse(&dsn);
        assert_eq!(msg.subject(), Some("Delayed Mail (still being retried)"));
        let status = status_text(&dsn);
        assert!(
            status.contains("Action: delayed\r\nStatus: 4.0.0\r\n"),
            "{status}"
        );
        assert!(!status.contains("Remote-MTA") && !status.contains("Diagnostic-Code"));
        assert!(is_smtp_reply("550 5.1.1 no") && is_smtp_reply("421-busy"));
        assert!(!is_smtp_reply(
            "connect to 127.0.0.1:25 failed: Connection refused"
        ));
        let human = children(&msg)[0].text_contents().expect("text").to_string();
        assert!(
            human.contains("<bob@example.org>: delivery delayed, status 4.0.0"),
            "{human}"
        );

        // One failed recipient among delayed ones makes it a bounce.
        let mixed = [rcpts[0].clone(), failed("c@example.net", "5.1.1", "550 no")];
        let msg_bytes = build_dsn(&input(&mixed, ORIGINAL));
        assert_eq!(
            parse(&msg_bytes).subject(),
            Some("Undelivered Mail Returned to Sender")
        );
    }

    #[test]
    fn returns_the_whole_original_when_small() {
        let rcpts = [failed("bob@example.org", "5.1.1", "550 user unknown")];
        let dsn = build_dsn(&input(&rcpts, ORIGINAL));
        let msg = parse(&dsn);
        let parts = children(&msg);
        let original = parts[2].message().expect("nested message");
        assert_eq!(original.subject(), Some("quarterly report"));
        assert_eq!(original.message_id(), Some("orig-1@example.com"));
        // Byte for byte, including the body and its final CRLF.
        assert!(contains(&dsn, ORIGINAL));
        assert_eq!(parts[2].contents(), ORIGINAL);
    }

    #[test]
    fn returns_only_headers_when_over_the_limit() {
        let rcpts = [failed("bob@example.org", "5.1.1", "550 user unknown")];
        let mut inp = input(&rcpts, ORIGINAL);
        inp.return_full_message_limit = ORIGINAL.len();
        let dsn = build_dsn(&inp);
        assert_wire_clean(&dsn);
        let msg = parse(&dsn);
        let parts = children(&msg);
        assert_eq!(ctype(parts[2]), "text/rfc822-headers");
        let headers = parts[2].text_contents().expect("text");
        assert!(
            headers.starts_with("Return-Path: <alice@example.com>\r\n"),
            "{headers}"
        );
        assert!(headers.contains("Subject: quarterly report\r\n"));
        assert!(headers.contains("Message-ID: <orig-1@example.com>\r\n"));
        assert!(!headers.contains("Hello Bob"));
        assert!(!contains(&dsn, b"Hello Bob"));
    }

    #[test]
    fn long_lines_in_the_original_return_headers_only_and_wrapped() {
        let mut original = b"Subject: ".to_vec();
        original.extend(std::iter::repeat_n(b'x', 3000));
        original.extend_from_slice(b"\r\nFrom: a@b\r\n\r\n");
        original.extend(std::iter::repeat_n(b'y', 2000));
        original.extend_from_slice(b"\r\n");
        let rcpts = [failed("bob@example.org", "5.1.1", "550 user unknown")];
        let dsn = build_dsn(&input(&rcpts, &original));
        assert_wire_clean(&dsn);
        let msg = parse(&dsn);
        let parts = children(&msg);
        assert_eq!(ctype(parts[2]), "text/rfc822-headers");
        let headers = parts[2].text_contents().expect("text");
        assert!(headers.contains("From: a@b\r\n"));
        assert_eq!(headers.matches('x').count(), 3000);
    }

    #[test]
    fn header_injection_is_neutralised() {
        let evil = "bob@example.org\r\nBcc: victim@example.com\r\n\r\n--x";
        let rcpts = [BouncedRecipient {
            address: evil.to_string(),
            action: Action::Failed,
            status: "5.1.1".to_string(),
            diagnostic: Some(
                "550-5.1.1 first line\r\n550 5.1.1 second\r\nX-Injected: yes\nAlso: bare LF\rand CR"
                    .to_string(),
            ),
            remote_mta: Some("mx.example.org\r\nX-Injected: mta".to_string()),
            last_attempt: None,
            original_recipient: None,
        }];
        let mut inp = input(&rcpts, ORIGINAL);
        inp.original_sender = "alice@example.com>\r\nBcc: victim@example.com\r\nX-Injected: to";
        inp.queue_id = "ID\r\nX-Injected: id";
        inp.reporting_mta = "relay.example.com\r\nX-Injected: host";
        let dsn = build_dsn(&inp);
        assert_wire_clean(&dsn);

        let msg = parse(&dsn);
        assert!(msg.header(HeaderName::Bcc).is_none());
        for line in dsn.split(|&b| b == b'\n') {
            assert!(
                !line.starts_with(b"X-Injected"),
                "{}",
                String::from_utf8_lossy(line)
            );
            assert!(
                !line.starts_with(b"Bcc"),
                "{}",
                String::from_utf8_lossy(line)
            );
            assert!(
                !line.starts_with(b"Also"),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let parts = children(&msg);
        assert_eq!(parts.len(), 3);
        // Unfolded, each hostile value is one field value with spaces for line breaks.
        let status = status_text(&dsn).replace("\r\n ", " ");
        assert!(
            status.contains(
                "Diagnostic-Code: smtp; 550-5.1.1 first line 550 5.1.1 second X-Injected: \
                 yes Also: bare LF and CR\r\n"
            ),
            "{status}"
        );
        assert!(
            status.contains("Final-Recipient: rfc822; bob@example.org Bcc:"),
            "{status}"
        );
        assert!(
            status.contains("X-Relayq-Queue-ID: IDX-Injected:id\r\n"),
            "{status}"
        );
    }

    #[test]
    fn long_values_are_folded_below_998_octets() {
        let long_word = "z".repeat(5000);
        let long_text = "word ".repeat(600);
        let rcpts = [BouncedRecipient {
            address: format!("{}@example.org", "a".repeat(1500)),
            action: Action::Failed,
            status: "5.1.1".to_string(),
            diagnostic: Some(format!("550 {long_word} {long_text}")),
            remote_mta: Some("x".repeat(1200)),
            last_attempt: None,
            original_recipient: None,
        }];
        let mut inp = input(&rcpts, ORIGINAL);
        let sender = format!("{}@example.com", "s".repeat(2000));
        inp.original_sender = &sender;
        let dsn = build_dsn(&inp);
        assert_wire_clean(&dsn);
        let msg = parse(&dsn);
        assert_eq!(children(&msg).len(), 3);
        let status = status_text(&dsn);
        // Folded, not truncated: every byte of the long word is still there.
        assert_eq!(status.matches('z').count(), 5000);
        assert_eq!(status.matches("word").count(), 600);
        let human = children(&msg)[0].text_contents().expect("text").to_string();
        assert_eq!(human.matches('z').count(), 5000);
    }

    #[test]
    fn non_ascii_recipient_uses_utf8_xtext_and_report_stays_7bit() {
        let mut rcpt = failed(
            "bücher+tag@例え.jp",
            "5.1.1",
            "550 5.1.1 unknown user «bücher»",
        );
        rcpt.remote_mta = Some("mx.例え.jp".to_string());
        let rcpts = [rcpt];
        let dsn = build_dsn(&input(&rcpts, ORIGINAL));
        assert_wire_clean(&dsn);
        let status = status_text(&dsn);
        assert!(status.is_ascii(), "{status}");
        assert!(
            status.contains(
                "Final-Recipient: utf-8; b\\x{FC}cher\\x{2B}tag@\\x{4F8B}\\x{3048}.jp\r\n"
            ),
            "{status}"
        );
        assert!(
            status.contains("unknown user \\x{AB}b\\x{FC}cher\\x{BB}"),
            "{status}"
        );
        // The human part keeps the real characters (quoted-printable on the wire).
        let msg = parse(&dsn);
        let human = children(&msg)[0].text_contents().expect("text").to_string();
        assert!(
            human.contains("<bücher+tag@例え.jp>: host mx.例え.jp said:"),
            "{human}"
        );
    }

    #[test]
    fn eight_bit_original_is_labelled_8bit() {
        let original = "From: a@example.com\r\nSubject: Grüße\r\n\r\nÄpfel\r\n".as_bytes();
        let rcpts = [failed("bob@example.org", "5.1.1", "550 user unknown")];
        let dsn = build_dsn(&input(&rcpts, original));
        assert_wire_clean(&dsn);
        assert!(!dsn.is_ascii());
        let msg = parse(&dsn);
        let root_cte = msg.root_part().content_transfer_encoding();
        assert_eq!(root_cte, Some("8bit"));
        let parts = children(&msg);
        assert_eq!(parts[2].content_transfer_encoding(), Some("8bit"));
        assert_eq!(parts[2].message().and_then(|m| m.subject()), Some("Grüße"));
        assert!(contains(&dsn, original));
    }

    #[test]
    fn bare_line_feeds_in_the_original_become_crlf() {
        let original = b"Subject: lf\nFrom: a@b\n\nbody\n";
        let rcpts = [failed("bob@example.org", "5.1.1", "550 user unknown")];
        let dsn = build_dsn(&input(&rcpts, original));
        assert_wire_clean(&dsn);
        assert!(contains(&dsn, b"Subject: lf\r\nFrom: a@b\r\n\r\nbody\r\n"));
    }

    #[test]
    fn original_containing_boundary_like_lines_stays_inside_its_part() {
        // Whatever the original holds, the report keeps exactly three parts.
        let original = b"Subject: tricky\r\n\r\n--\r\n--_\r\n--0_0_0--\r\n";
        let rcpts = [failed("bob@example.org", "5.1.1", "550 user unknown")];
        let dsn = build_dsn(&input(&rcpts, original));
        let msg = parse(&dsn);
        let parts = children(&msg);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[2].contents(), original);
    }

    #[test]
    fn status_codes_are_validated() {
        let mut r = failed("a@b", "5.1.1", "x");
        for (given, want) in [
            ("5.1.1", "5.1.1"),
            ("4.7.100", "4.7.100"),
            (" 5.2.2 ", "5.2.2"),
            ("550", "5.0.0"),
            ("5.1", "5.0.0"),
            ("5.1.1.1", "5.0.0"),
            ("6.1.1", "5.0.0"),
            ("5.1.1234", "5.0.0"),
            ("", "5.0.0"),
        ] {
            r.status = given.to_string();
            assert_eq!(status_code(&r), want, "{given:?}");
        }
    }

    #[test]
    fn push_field_folds_at_spaces() {
        let mut out = Vec::new();
        push_field(&mut out, "Diagnostic-Code", &"abcd ".repeat(30));
        let text = String::from_utf8(out).unwrap();
        for line in text.split_terminator("\r\n") {
            assert!(line.len() <= FOLD_AT, "{line}");
        }
        let unfolded = text.replace("\r\n", "");
        assert_eq!(unfolded.matches("abcd").count(), 30);
        assert!(text.starts_with("Diagnostic-Code: abcd abcd"));
    }
}
