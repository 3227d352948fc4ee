//! MIME re-encoding: making a message's content fit what the next hop
//! takes, without changing what it decodes to.
//!
//! - [`long_lines`] (at accept, for every way in): RFC 5322 allows 998
//!   octets per line. A part with longer lines is re-encoded: text as
//!   quoted-printable, anything else as base64; a base64 or
//!   quoted-printable part is only re-wrapped (its soft line breaks or
//!   whitespace are not content). A message that is not MIME becomes a
//!   one-part MIME message the same way. Header lines (of the message or
//!   of a part) are folded (see `header::fold`). What no MIME reader shows
//!   (a multipart preamble or epilogue, an unknown encoding) is broken
//!   with a plain CRLF as the last resort.
//! - [`to_seven_bit`] (in the transport, for an upstream without
//!   8BITMIME, RFC 6152): every part holding 8-bit octets becomes
//!   quoted-printable (text) or base64, as Postfix does unless
//!   `disable_mime_output_conversion` is set.
//!
//! A message of more than [`MAX_PARTS`] parts is not parsed (memory, see
//! there): its long lines are refused, and it goes to a 7-bit upstream as
//! it is, as Postfix stops MIME processing past its nesting limit.
//!
//! The structure comes from mail-parser: it gives each part's header and
//! body offsets in the message, so a part is replaced in place and every
//! other byte stays as it was. A part mail-parser could not make sense of
//! is left alone.
//!
//! # Security
//! The message is the sender's. mail-parser never panics on input; offsets
//! it returns are checked against the message before use. Nesting depth is
//! the sender's too (32 bytes a level of message/rfc822): nothing here
//! recurses per level, neither the walk over the parts nor the dropping of
//! mail-parser's tree of them (see `Parsed`).

use std::ops::Range;

use base64::Engine;
use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders, PartType};

use super::header;

/// What a part's body becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recode {
    QuotedPrintable,
    Base64,
    /// A base64 body with lines too long: wrapped again at 76.
    Rewrap64,
    /// A quoted-printable body with lines too long: soft line breaks added.
    SoftBreak,
}

/// One part without sub-parts, as found in the message.
struct Leaf {
    header: Range<usize>,
    body: Range<usize>,
    /// `text`, `application`, ... (lower case); `text` when absent.
    ctype: String,
    /// The transfer encoding, lower case; empty when absent (7bit).
    cte: String,
    /// The top level of a message with no Content-Type field.
    not_mime: bool,
}

/// A message as mail-parser parsed it, taken apart level by level when
/// dropped. mail-parser puts each unencoded message/rfc822 part inside its
/// parent, and dropping that tree recurses once per level: a crafted
/// message a few megabytes long nests deep enough to overflow the stack
/// and abort the process.
struct Parsed<'x>(Message<'x>);

impl Drop for Parsed<'_> {
    fn drop(&mut self) {
        let mut levels = vec![std::mem::take(&mut self.0.parts)];
        while let Some(parts) = levels.pop() {
            for mut part in parts {
                if let PartType::Message(m) = &mut part.body {
                    levels.push(std::mem::take(&mut m.parts));
                }
            }
        }
    }
}

/// The most MIME parts (nested messages included) whose structure relayq
/// parses. mail-parser keeps about a kilobyte for each part: a 25 MB
/// message of empty parts (36 bytes each) took half a gigabyte, per
/// message. No mail anybody writes comes near this.
pub const MAX_PARTS: usize = 10_000;

/// The message parsed, or `None` when it cannot be or has more than
/// [`MAX_PARTS`] parts.
fn parse(msg: &[u8]) -> Option<Parsed<'_>> {
    if too_many_parts(msg) {
        return None;
    }
    MessageParser::new().parse(msg).map(Parsed)
}

/// Whether the message has more than [`MAX_PARTS`] parts, counted without
/// parsing it: delimiter lines of the boundaries it declares, and
/// message/* parts. Two passes over the bytes, bounded memory.
fn too_many_parts(msg: &[u8]) -> bool {
    let lines = || msg.split(|&b| b == b'\n');
    let mut boundaries: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    let mut parts = 0usize;
    for line in lines() {
        if let Some(b) = boundary_parameter(line) {
            boundaries.insert(b);
        }
        if line.len() > 13
            && line[..13].eq_ignore_ascii_case(b"content-type:")
            && line[13..].trim_ascii_start().len() >= 8
            && line[13..].trim_ascii_start()[..8].eq_ignore_ascii_case(b"message/")
        {
            parts += 1;
        }
        if boundaries.len() + parts > MAX_PARTS {
            return true;
        }
    }
    if boundaries.is_empty() {
        return false;
    }
    for line in lines() {
        let Some(key) = line.strip_prefix(b"--") else {
            continue;
        };
        let key = key.trim_ascii_end();
        if boundaries.contains(key)
            || key
                .strip_suffix(b"--")
                .is_some_and(|k| boundaries.contains(k))
        {
            parts += 1;
            if parts > MAX_PARTS {
                return true;
            }
        }
    }
    false
}

/// The value of a `boundary=` parameter on a header line, if any.
fn boundary_parameter(line: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"boundary=";
    let at = line
        .windows(KEY.len())
        .position(|w| w.eq_ignore_ascii_case(KEY))?;
    let v = &line[at + KEY.len()..];
    let v = match v.strip_prefix(b"\"") {
        Some(q) => &q[..q.iter().position(|&b| b == b'"')?],
        None => {
            &v[..v
                .iter()
                .position(|&b| b == b';' || b.is_ascii_whitespace())
                .unwrap_or(v.len())]
        }
    };
    (!v.is_empty()).then_some(v)
}

/// The parts of the message and of every unencoded message/rfc822 part in
/// it, in the order they appear, with whether each is first in its
/// message. Walked with a stack of its own, not by recursion, for the
/// reason [`Parsed`] gives.
fn walk<'a>(parsed: &'a Parsed<'_>, mut visit: impl FnMut(&'a MessagePart<'a>, bool)) {
    let mut levels = vec![parsed.0.parts.iter()];
    let mut first = true;
    while let Some(level) = levels.last_mut() {
        let Some(part) = level.next() else {
            levels.pop();
            continue;
        };
        visit(part, std::mem::take(&mut first));
        // An encoded message/rfc822 is already 7-bit; only an unencoded
        // one has its parts in this message, at offsets into it.
        if let PartType::Message(m) = &part.body
            && part.encoding == mail_parser::Encoding::None
        {
            levels.push(m.parts.iter());
            first = true;
        }
    }
}

/// Every part with a body that can be replaced, in order.
fn leaves(msg: &[u8]) -> Vec<Leaf> {
    let Some(parsed) = parse(msg) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(&parsed, |part, first| {
        let (h, b, e) = (
            part.offset_header as usize,
            part.offset_body as usize,
            part.offset_end as usize,
        );
        let sane = h <= b && b <= e && e <= msg.len() && msg[h..b].ends_with(b"\n");
        if matches!(part.body, PartType::Multipart(_) | PartType::Message(_))
            || part.is_encoding_problem
            || !sane
        {
            return;
        }
        out.push(Leaf {
            header: h..b,
            body: b..e,
            ctype: part
                .content_type()
                .map_or("text".into(), |c| c.ctype().to_ascii_lowercase()),
            cte: part
                .content_transfer_encoding()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase(),
            not_mime: first && part.content_type().is_none(),
        });
    });
    out
}

fn longest_line(bytes: &[u8]) -> usize {
    bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
        .max()
        .unwrap_or(0)
}

/// Re-encodes what has lines longer than `max` octets (see the module
/// doc). `None` when every line already fits.
pub fn long_lines(msg: &[u8], max: usize) -> Result<Option<Vec<u8>>, super::Refusal> {
    if longest_line(msg) <= max {
        return Ok(None);
    }
    let head_end = header::end(msg);
    let mut out: Vec<u8> = match header::fold(&msg[..head_end], max)? {
        Some(head) => [&head[..], &msg[head_end..]].concat(),
        None => msg.to_vec(),
    };
    if longest_line(&out) <= max {
        return Ok(Some(out));
    }
    // What is left needs the structure; without it the last resort would
    // change content, which a message of that many parts is not worth.
    if too_many_parts(&out) {
        return Err(super::Refusal::TooManyParts { limit: MAX_PARTS });
    }
    let recoded = rewrite(&out, |leaf, body| {
        if longest_line(body) <= max {
            return None;
        }
        Some(match leaf.cte.as_str() {
            "base64" => Recode::Rewrap64,
            "quoted-printable" => Recode::SoftBreak,
            "" | "7bit" | "8bit" | "binary" => encoding_for(leaf),
            // An encoding we do not know: decoding would not give the
            // content back, so only the last resort applies.
            _ => return None,
        })
    });
    if let Some(r) = recoded {
        out = r;
    }
    if let Some(r) = fold_part_headers(&out, max)? {
        out = r;
    }
    if longest_line(&out) > max {
        out = break_lines(&out, max);
    }
    Ok(Some(out))
}

/// Converts every 8-bit part to quoted-printable or base64, for an
/// upstream that does not offer 8BITMIME. `None` when nothing needed it.
pub fn to_seven_bit(msg: &[u8]) -> Option<Vec<u8>> {
    let head_end = header::end(msg);
    if msg[head_end..].is_ascii() {
        return None;
    }
    rewrite(msg, |leaf, body| {
        if body.is_ascii() || matches!(leaf.cte.as_str(), "base64" | "quoted-printable") {
            return None;
        }
        Some(encoding_for(leaf))
    })
}

/// Text becomes quoted-printable (still readable, small for mostly ASCII
/// text); everything else base64.
fn encoding_for(leaf: &Leaf) -> Recode {
    if leaf.ctype == "text" {
        Recode::QuotedPrintable
    } else {
        Recode::Base64
    }
}

/// The message with each leaf that `decide` picks re-encoded in place.
fn rewrite(msg: &[u8], decide: impl Fn(&Leaf, &[u8]) -> Option<Recode>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 8);
    let mut pos = 0;
    let mut changed = false;
    for leaf in leaves(msg) {
        if leaf.header.start < pos {
            continue;
        }
        let body = &msg[leaf.body.clone()];
        let Some(how) = decide(&leaf, body) else {
            continue;
        };
        out.extend_from_slice(&msg[pos..leaf.header.start]);
        let head = &msg[leaf.header.clone()];
        let (encoded, cte) = match how {
            Recode::QuotedPrintable => (quoted_printable::encode(body), "quoted-printable"),
            Recode::Base64 => {
                let text = base64::engine::general_purpose::STANDARD.encode(body);
                (lines76(text.as_bytes(), body), "base64")
            }
            Recode::Rewrap64 => {
                let text: Vec<u8> = body
                    .iter()
                    .copied()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect();
                (lines76(&text, body), "")
            }
            Recode::SoftBreak => (soft_breaks(body), ""),
        };
        if cte.is_empty() {
            out.extend_from_slice(head);
        } else {
            out.extend_from_slice(&relabel(head, cte, &leaf, body));
        }
        out.extend_from_slice(&encoded);
        pos = leaf.body.end;
        changed = true;
    }
    if !changed {
        return None;
    }
    out.extend_from_slice(&msg[pos..]);
    Some(out)
}

/// The part's header with its transfer encoding set to `cte` (and, for a
/// message that was not MIME, the fields that make it MIME).
fn relabel(head: &[u8], cte: &str, leaf: &Leaf, body: &[u8]) -> Vec<u8> {
    let mut head = header::remove(head, |f| f.is("content-transfer-encoding"))
        .unwrap_or_else(|| head.to_vec());
    // Just before the empty line that ends the header block.
    let at = head.len()
        - if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
            2
        } else {
            0
        };
    let mut fields = String::new();
    if leaf.not_mime {
        if !header::has(&head, "mime-version") {
            fields.push_str("MIME-Version: 1.0\r\n");
        }
        let charset = if body.is_ascii() {
            "us-ascii"
        } else if std::str::from_utf8(body).is_ok() {
            "utf-8"
        } else {
            // RFC 1428: 8-bit text in a charset nobody declared.
            "unknown-8bit"
        };
        fields.push_str(&format!("Content-Type: text/plain; charset={charset}\r\n"));
    }
    fields.push_str(&format!("Content-Transfer-Encoding: {cte}\r\n"));
    head.splice(at..at, fields.into_bytes());
    head
}

/// `text` (base64) 76 characters a line; the last line ends in CRLF only
/// when the original body did (the delimiter that follows a part brings
/// its own).
fn lines76(text: &[u8], original: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 38 + 2);
    for (i, chunk) in text.chunks(76).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(chunk);
    }
    if original.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Adds soft line breaks (`=` CRLF) to quoted-printable lines longer than
/// 76 octets, never inside an `=XX` escape.
fn soft_breaks(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 * 3);
    for line in body.split_inclusive(|&b| b == b'\n') {
        let (text, end) = match line.strip_suffix(b"\r\n") {
            Some(t) => (t, &b"\r\n"[..]),
            None => match line.strip_suffix(b"\n") {
                Some(t) => (t, &b"\n"[..]),
                None => (line, &b""[..]),
            },
        };
        let mut rest = text;
        while rest.len() > 76 {
            let mut cut = 75;
            // Back off so that no "=XX" is split: an '=' within the last
            // two positions before the cut starts an escape.
            if let Some(p) = rest[cut - 2..cut].iter().position(|&b| b == b'=') {
                cut = cut - 2 + p;
            }
            out.extend_from_slice(&rest[..cut]);
            out.extend_from_slice(b"=\r\n");
            rest = &rest[cut..];
        }
        out.extend_from_slice(rest);
        out.extend_from_slice(end);
    }
    out
}

/// Folds over-long header lines of every MIME part.
fn fold_part_headers(msg: &[u8], max: usize) -> Result<Option<Vec<u8>>, super::Refusal> {
    let Some(parsed) = parse(msg) else {
        return Ok(None);
    };
    let mut blocks = Vec::new();
    walk(&parsed, |part, _| {
        let (h, b) = (part.offset_header as usize, part.offset_body as usize);
        if h < b && b <= msg.len() {
            blocks.push(h..b);
        }
    });
    let mut out = Vec::with_capacity(msg.len());
    let mut pos = 0;
    let mut changed = false;
    for r in blocks {
        if r.start < pos || longest_line(&msg[r.clone()]) <= max {
            continue;
        }
        if let Some(folded) = header::fold(&msg[r.clone()], max)? {
            out.extend_from_slice(&msg[pos..r.start]);
            out.extend_from_slice(&folded);
            pos = r.end;
            changed = true;
        }
    }
    if !changed {
        return Ok(None);
    }
    out.extend_from_slice(&msg[pos..]);
    Ok(Some(out))
}

/// The last resort: lines still longer than `max` are broken with CRLF,
/// never inside a UTF-8 character.
fn break_lines(msg: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / max * 2 + 2);
    for line in msg.split_inclusive(|&b| b == b'\n') {
        let mut rest = line;
        while rest.strip_suffix(b"\r\n").unwrap_or(rest).len() > max {
            let mut cut = max;
            while cut > max.saturating_sub(3) && cut > 1 && rest[cut] & 0xC0 == 0x80 {
                cut -= 1;
            }
            out.extend_from_slice(&rest[..cut]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[cut..];
        }
        out.extend_from_slice(rest);
    }
    out
}
