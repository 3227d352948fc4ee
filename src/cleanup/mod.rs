//! Cleanup: the one place where a message's content is judged and fixed,
//! whatever way it came in (the SMTP server, `sendmail`, `sendmail -bs`,
//! the maildrop pickup), as Postfix's `cleanup` does for smtpd, sendmail
//! and pickup. Two ways in that treat the same message differently is a
//! bug, so nothing here knows which way a message came except through the
//! [`Rules`] it is given.
//!
//! ```text
//!  lines ─> intake ────────> rewrite ─────────────────> trace ─> spool
//!           CRLF, bare CR,   hop limit, Bcc, From:,       Received:,
//!           NUL, size and    bare names @myorigin,        Message-ID:,
//!           header limits    header folding,              Date:
//!                            long lines re-encoded
//!  spool ─> transport ─> seven_bit (no 8BITMIME upstream), needs_smtputf8
//! ```
//!
//! - `intake`: line ends, bare CR, NUL, `max_message_size`,
//!   `max_header_size` (per field, Postfix's `header_size_limit`).
//! - `header`: fields, removal, folding (at whitespace, or after a comma or
//!   semicolon; never inside a word).
//! - `address`: `sendmail -t` recipients (Resent- aware), the `From:` added
//!   to local mail, bare names qualified.
//! - `mime`: quoted-printable/base64 re-encoding that decodes to the same
//!   bytes, for long lines (at accept) and for 8-bit content (for an
//!   upstream without 8BITMIME, called by the transport).
//! - `trace`: the headers relayq adds in front.
//!
//! # Security
//! Everything here is outside input: see each submodule's note. The rules
//! only ever add to or re-encode a message; what cannot be made
//! conformant without changing what it says is refused with the reason.

pub mod address;
pub mod header;
pub mod intake;
pub mod mime;
pub mod trace;

pub use intake::{Intake, Limits};

/// Why a message is refused. Each way in words it for its caller: an SMTP
/// reply ([`Refusal::smtp_reply`]), a sendmail exit status and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("message too big: more than {limit} bytes (smtp.max_message_size)")]
    TooBig { limit: usize },
    #[error("a header field is larger than {limit} bytes (smtp.max_header_size)")]
    HeaderTooBig { limit: usize },
    #[error("line {line} contains a NUL character")]
    Nul { line: usize },
    #[error(
        "too many hops: the message already has {count} Received: headers (smtp.max_hops = {limit}); is mail looping?"
    )]
    TooManyHops { count: usize, limit: usize },
    #[error(
        "header field {field:?} is longer than RFC 5322 allows (998 characters a line) and has a run of that many characters without a space, comma or semicolon to fold it at"
    )]
    Unfoldable { field: String },
    #[error(
        "lines longer than RFC 5322 allows (998 characters) in a message of more than {limit} MIME parts, too many to re-encode"
    )]
    TooManyParts { limit: usize },
}

impl Refusal {
    /// The reason as the reject log line and metric name it.
    pub fn reason(&self) -> crate::observe::events::Reason {
        use crate::observe::events::Reason;
        match self {
            Refusal::TooBig { .. } => Reason::MessageSize,
            Refusal::HeaderTooBig { .. } => Reason::HeaderSize,
            Refusal::Nul { .. } => Reason::Nul,
            Refusal::TooManyHops { .. } => Reason::TooManyHops,
            Refusal::Unfoldable { .. } | Refusal::TooManyParts { .. } => Reason::LineLength,
        }
    }

    /// The reply to the client's end of data.
    pub fn smtp_reply(&self) -> String {
        match self {
            Refusal::TooBig { .. } => "552 5.3.4 Error: message size exceeds fixed limit".into(),
            Refusal::HeaderTooBig { .. } => {
                "552 5.3.4 Error: message header size exceeds limit".into()
            }
            Refusal::Nul { .. } => "554 5.6.0 Error: message contains NUL characters".into(),
            Refusal::TooManyHops { count, .. } => {
                format!("554 5.4.6 Error: too many hops ({count} Received: headers; mail loop?)")
            }
            Refusal::TooManyParts { limit } => format!(
                "554 5.6.0 Error: long lines in a message of more than {limit} MIME parts cannot be re-encoded"
            ),
            Refusal::Unfoldable { field } => format!(
                "554 5.6.0 Error: header field {} is too long and cannot be folded",
                field
                    .chars()
                    .filter(char::is_ascii_graphic)
                    .collect::<String>()
            ),
        }
    }
}

/// A local submitter's `From:` for a message without one.
#[derive(Debug, Clone)]
pub struct LocalFrom {
    pub address: String,
    pub full_name: Option<String>,
}

/// What the rewrite does to a message, decided by the way in.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Lines longer than this (CRLF excluded) are re-encoded or folded.
    pub max_line: usize,
    /// Refuse a message with this many `Received:` headers (a loop).
    pub max_hops: usize,
    /// Append `@domain` to bare names in address fields: local submissions
    /// and clients in `allow_networks`.
    pub qualify: Option<String>,
    /// A local submission: `Bcc:`/`Resent-Bcc:` removed, and `From:` added
    /// when missing.
    pub local: Option<LocalFrom>,
}

impl Rules {
    /// The rules for a message from an SMTP client; `local_client` is an
    /// address in `allow_networks` (Postfix's `local_header_rewrite_clients`).
    pub fn smtp(config: &crate::config::Config, local_client: bool) -> Rules {
        Rules {
            max_line: config.smtp.max_line_length,
            max_hops: config.smtp.max_hops,
            qualify: local_client.then(|| config.myorigin().to_string()),
            local: None,
        }
    }

    /// The rules for a local user's message (`sendmail`, `-bs`, pickup).
    pub fn local(config: &crate::config::Config, from: LocalFrom) -> Rules {
        Rules {
            max_line: config.smtp.max_line_length,
            max_hops: config.smtp.max_hops,
            qualify: Some(config.myorigin().to_string()),
            local: Some(from),
        }
    }
}

/// Applies `rules` to a message from the intake. Every step leaves a
/// message it already applied to unchanged, so applying the rules twice
/// (the `sendmail` command, then the pickup for a maildrop file) is the
/// same as once.
pub fn rewrite(mut msg: Vec<u8>, rules: &Rules) -> Result<Vec<u8>, Refusal> {
    let hops = header::count(&msg, "received");
    if hops >= rules.max_hops {
        return Err(Refusal::TooManyHops {
            count: hops,
            limit: rules.max_hops,
        });
    }
    if let Some(local) = &rules.local {
        if let Some(m) = header::remove(&msg, |f| f.is("bcc") || f.is("resent-bcc")) {
            msg = m;
        }
        if !header::has(&msg, "from") {
            let mut with = address::from_field(local.full_name.as_deref(), &local.address);
            with.extend_from_slice(&msg);
            msg = with;
        }
    }
    if let Some(domain) = &rules.qualify
        && let Some(m) = address::qualify(&msg, domain)
    {
        msg = m;
    }
    if let Some(m) = mime::long_lines(&msg, rules.max_line)? {
        msg = m;
    }
    Ok(msg)
}

/// Whether the message needs SMTPUTF8 to be relayed as it is: an address
/// in the envelope, or any byte of the header section, is not ASCII (RFC
/// 6531/6532). Postfix asks the upstream for SMTPUTF8 only then.
pub fn needs_smtputf8<'a>(mut addresses: impl Iterator<Item = &'a str>, message: &[u8]) -> bool {
    addresses.any(|a| !a.is_ascii()) || !message[..header::end(message)].is_ascii()
}

/// The message as an upstream without 8BITMIME may receive it (see
/// `mime::to_seven_bit`); borrowed when it is 7-bit already.
pub fn seven_bit(message: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    match mime::to_seven_bit(message) {
        Some(m) => std::borrow::Cow::Owned(m),
        None => std::borrow::Cow::Borrowed(message),
    }
}

#[cfg(test)]
mod tests;
