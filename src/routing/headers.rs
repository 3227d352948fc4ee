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

use crate::cleanup::header;

/// Headers with this prefix are instructions to relayq and never relayed.
pub const PRIVATE_PREFIX: &str = "x-relayq-";
/// Longest header value considered for matching.
const MAX_VALUE: usize = 998;

/// The unfolded, trimmed values of every `name:` header.
pub fn values(message: &[u8], name: &str) -> Vec<String> {
    header::fields(message)
        .iter()
        .filter(|f| f.is(name))
        .map(|f| {
            let unfolded = header::unfold(header::value(message, f));
            let words: Vec<&str> = unfolded.split_whitespace().collect();
            words.join(" ").chars().take(MAX_VALUE).collect()
        })
        .collect()
}

/// The message without its `X-Relayq-*` header fields (borrowed when it
/// has none, which is the common case).
pub fn strip_private(message: &[u8]) -> Cow<'_, [u8]> {
    let private = |f: &header::Field<'_>| {
        f.name.len() >= PRIVATE_PREFIX.len()
            && f.name[..PRIVATE_PREFIX.len()].eq_ignore_ascii_case(PRIVATE_PREFIX.as_bytes())
    };
    match header::remove(message, private) {
        Some(m) => Cow::Owned(m),
        None => Cow::Borrowed(message),
    }
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
