//! Reading routing headers from a queued message, and removing relayq's
//! own `X-Relayq-*` headers before the message leaves.
//!
//! Routing is decided when a message is tried, from its envelope and its
//! header section, so queued mail follows the routes of the running
//! config. The header is taken out at that point too, on the copy that is
//! sent; the queue file keeps the message as the client sent it.
//!
//! # Security
//! The header section comes from the client. Only the header section (up
//! to the first empty line) is looked at, lines are matched byte-wise,
//! values are bounded, and a message without an empty line is treated as
//! all header (nothing in a body is ever read as a header).

use std::borrow::Cow;

/// Headers with this prefix are instructions to relayq and never relayed.
pub const PRIVATE_PREFIX: &str = "x-relayq-";
/// Longest header value considered for matching.
const MAX_VALUE: usize = 998;

/// Byte ranges of the header fields: (start of field, end including the
/// line end of its last continuation line, name).
fn fields(message: &[u8]) -> Vec<(usize, usize, &[u8])> {
    let mut out: Vec<(usize, usize, &[u8])> = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| pos + p + 1)
            .unwrap_or(message.len());
        let line = &message[pos..end];
        let content = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        if content.is_empty() {
            break;
        }
        if content[0] == b' ' || content[0] == b'\t' {
            if let Some(last) = out.last_mut() {
                last.1 = end;
            }
        } else if let Some(colon) = content.iter().position(|&b| b == b':') {
            out.push((pos, end, content[..colon].trim_ascii()));
        } else {
            // Not a header line: keep it attached to nothing, so it is never
            // removed and never matched.
            out.push((pos, end, b""));
        }
        pos = end;
    }
    out
}

/// The unfolded, trimmed values of every `name:` header.
pub fn values(message: &[u8], name: &str) -> Vec<String> {
    fields(message)
        .into_iter()
        .filter(|(_, _, n)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(start, end, n)| {
            let raw = &message[start + n.len()..end];
            let raw = raw
                .iter()
                .position(|&b| b == b':')
                .map_or(raw, |c| &raw[c + 1..]);
            let text = String::from_utf8_lossy(raw);
            let unfolded: String = text
                .split(['\r', '\n'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            unfolded.chars().take(MAX_VALUE).collect()
        })
        .collect()
}

/// The message without its `X-Relayq-*` header fields (borrowed when it
/// has none, which is the common case).
pub fn strip_private(message: &[u8]) -> Cow<'_, [u8]> {
    let private: Vec<(usize, usize)> = fields(message)
        .into_iter()
        .filter(|(_, _, n)| {
            n.len() >= PRIVATE_PREFIX.len()
                && n[..PRIVATE_PREFIX.len()].eq_ignore_ascii_case(PRIVATE_PREFIX.as_bytes())
        })
        .map(|(s, e, _)| (s, e))
        .collect();
    if private.is_empty() {
        return Cow::Borrowed(message);
    }
    let mut out = Vec::with_capacity(message.len());
    let mut pos = 0;
    for (start, end) in private {
        out.extend_from_slice(&message[pos..start]);
        pos = end;
    }
    out.extend_from_slice(&message[pos..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"Subject: hi\r\nX-Relayq-Relay: ses\r\nTo: a@b\r\nX-RELAYQ-Note: one\r\n\ttwo\r\nFrom: c@d\r\n\r\nX-Relayq-Relay: body\r\n";

    #[test]
    fn values_are_found_only_in_the_header_section() {
        assert_eq!(values(MSG, "x-relayq-relay"), ["ses"]);
        assert_eq!(values(MSG, "X-Relayq-Note"), ["one two"]);
        assert!(values(MSG, "Cc").is_empty());
        assert_eq!(values(b"A: 1\nB:2\n\nA: 3\n", "a"), ["1"]);
    }

    #[test]
    fn private_headers_are_stripped_with_continuations() {
        let out = strip_private(MSG);
        assert_eq!(
            &*out,
            b"Subject: hi\r\nTo: a@b\r\nFrom: c@d\r\n\r\nX-Relayq-Relay: body\r\n"
        );
        let plain = b"Subject: x\r\n\r\nbody\r\n";
        assert!(matches!(strip_private(plain), Cow::Borrowed(_)));
    }
}
