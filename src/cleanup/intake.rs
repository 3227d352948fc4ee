//! The intake: a message's lines as a way in reads them, turned into the
//! one form the spool keeps (CRLF line ends, a header section ended by an
//! empty line), with the size limits counted while it arrives.
//!
//! # Security
//! Every byte here comes from a client or a local user. The total is
//! bounded by `max_message_size` and each header field (with its
//! continuation lines) by `max_header_size`; past a limit nothing more is
//! kept, so memory stays bounded. A NUL byte is refused: it would be cut or
//! mangled somewhere downstream. No bare CR is kept: an upstream that
//! takes a lone CR for a line end would see the end of the data next to a
//! dot and a smuggled transaction after it (SMTP smuggling). In the body a
//! bare CR is a line end, exactly like a bare LF, stored as CRLF. CRs just
//! before a line end belong to it (`\r\r\n` is one line end, as written
//! by an app whose CRLF went through a LF-to-CRLF filter). Inside a header
//! line a CR becomes a space: as a line end it would turn the rest of the
//! line into a header field of its own, a `Bcc:` that `sendmail -t` obeys
//! or an `X-Relayq-Relay:` that picks the route, smuggled past an app that
//! strips LF from a subject but not CR.

use super::Refusal;

/// The limits the intake enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The whole message, CRLF line ends counted.
    pub max_message_size: usize,
    /// One header field with its continuation lines (Postfix's
    /// `header_size_limit`).
    pub max_header_size: usize,
}

impl Limits {
    pub fn from_config(smtp: &crate::config::SmtpConfig) -> Limits {
        Limits {
            max_message_size: usize::try_from(smtp.max_message_size.0).unwrap_or(usize::MAX),
            max_header_size: usize::try_from(smtp.max_header_size.0).unwrap_or(usize::MAX),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// In the header section; the length of the field being read so far
    /// (0 before the first field).
    Header {
        field: usize,
    },
    Body,
}

/// Collects a message line by line.
#[derive(Debug)]
pub struct Intake {
    out: Vec<u8>,
    limits: Limits,
    section: Section,
    refusal: Option<Refusal>,
    /// Lines read so far, to name the one that is refused.
    lines: usize,
}

impl Intake {
    pub fn new(limits: Limits) -> Intake {
        Intake {
            out: Vec::with_capacity(4096),
            limits,
            section: Section::Header { field: 0 },
            refusal: None,
            lines: 0,
        }
    }

    /// A whole message already in memory (a maildrop file): lines split at
    /// LF, a CR before it dropped, a bare CR a line end of its own.
    pub fn whole(content: &[u8], limits: Limits) -> Result<Vec<u8>, Refusal> {
        let mut intake = Intake::new(limits);
        let content = content.strip_suffix(b"\n").unwrap_or(content);
        if !content.is_empty() {
            for line in content.split(|&b| b == b'\n') {
                intake.line(line.strip_suffix(b"\r").unwrap_or(line));
            }
        }
        intake.finish()
    }

    /// Bytes kept so far.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Whether a limit has already been broken (the rest is only read to
    /// stay in step with the client).
    pub fn refused(&self) -> bool {
        self.refusal.is_some()
    }

    /// One line as read, without its CRLF or LF. What a CR inside it is
    /// depends on where it is (see the module's security note).
    pub fn line(&mut self, text: &[u8]) {
        self.lines += 1;
        let text = &text[..text.len() - text.iter().rev().take_while(|&&b| b == b'\r').count()];
        if !text.contains(&b'\r') || !self.stays_in_header(text) {
            for piece in text.split(|&b| b == b'\r') {
                if self.refusal.is_some() {
                    return;
                }
                self.one(piece);
            }
            return;
        }
        let spaced: Vec<u8> = text
            .iter()
            .map(|&b| if b == b'\r' { b' ' } else { b })
            .collect();
        self.one(&spaced);
    }

    /// Whether the line (its text up to a first CR) is a header field or a
    /// continuation of one in the header section.
    fn stays_in_header(&self, text: &[u8]) -> bool {
        let Section::Header { field } = self.section else {
            return false;
        };
        let first = text.split(|&b| b == b'\r').next().unwrap_or_default();
        is_field(first) || (field > 0 && matches!(first.first(), Some(b' ' | b'\t')))
    }

    fn refuse(&mut self, why: Refusal) {
        self.refusal = Some(why);
        // Nothing more is kept once the message is refused.
        self.out = Vec::new();
    }

    fn one(&mut self, text: &[u8]) {
        if text.contains(&0) {
            let line = self.lines;
            return self.refuse(Refusal::Nul { line });
        }
        if let Section::Header { field } = self.section {
            let continuation = field > 0 && matches!(text.first(), Some(b' ' | b'\t'));
            if text.is_empty() {
                self.section = Section::Body;
            } else if continuation {
                self.section = Section::Header {
                    field: field + text.len() + 2,
                };
            } else if is_field(text) {
                self.section = Section::Header {
                    field: text.len() + 2,
                };
            } else {
                // Text that is not a header where headers belong (`echo hi
                // | sendmail`, a client that sends no header): the body
                // starts here, after the empty line that says so, as
                // Postfix's cleanup does.
                self.section = Section::Body;
                self.out.extend_from_slice(b"\r\n");
            }
            if let Section::Header { field } = self.section
                && field > self.limits.max_header_size
            {
                let limit = self.limits.max_header_size;
                return self.refuse(Refusal::HeaderTooBig { limit });
            }
        }
        if self.out.len() + text.len() + 2 > self.limits.max_message_size {
            let limit = self.limits.max_message_size;
            return self.refuse(Refusal::TooBig { limit });
        }
        self.out.extend_from_slice(text);
        self.out.extend_from_slice(b"\r\n");
    }

    /// The message, or why it is refused.
    pub fn finish(self) -> Result<Vec<u8>, Refusal> {
        match self.refusal {
            Some(r) => Err(r),
            None => Ok(self.out),
        }
    }
}

/// Whether a line starts a header field ("Name: value").
pub fn is_field(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    // RFC 5322 field names; "Name :" with spaces is obsolete but common.
    let name = line[..colon].trim_ascii_end();
    !name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: Limits = Limits {
        max_message_size: 1 << 20,
        max_header_size: 1 << 16,
    };

    fn take(lines: &[&[u8]], limits: Limits) -> Result<Vec<u8>, Refusal> {
        let mut i = Intake::new(limits);
        for l in lines {
            i.line(l);
        }
        i.finish()
    }

    #[test]
    fn lines_become_crlf_and_bare_cr_is_a_line_end() {
        assert_eq!(
            take(&[b"Subject: x", b"", b"a\rb", b"c\r"], BIG).unwrap(),
            b"Subject: x\r\n\r\na\r\nb\r\nc\r\n"
        );
        // The smuggling shapes: a dot between bare CRs is a line of its own,
        // which the transport will stuff.
        assert_eq!(
            take(&[b"S: x", b"", b"x\r.\rMAIL FROM:<a@b>\r"], BIG).unwrap(),
            b"S: x\r\n\r\nx\r\n.\r\nMAIL FROM:<a@b>\r\n"
        );
        assert_eq!(
            Intake::whole(b"S: x\n\nx\r.\r\ny\r\r\nz\r\r\r\n\r.\r\r\n", BIG).unwrap(),
            b"S: x\r\n\r\nx\r\n.\r\ny\r\nz\r\n\r\n.\r\n"
        );
    }

    #[test]
    fn crs_before_a_line_end_belong_to_it() {
        // "\r\r\n" everywhere: the header stays a header.
        assert_eq!(
            take(
                &[
                    b"From: a@b\r",
                    b"To: c@d\r\r",
                    b"Subject: x\r",
                    b"\r",
                    b"body\r"
                ],
                BIG
            )
            .unwrap(),
            b"From: a@b\r\nTo: c@d\r\nSubject: x\r\n\r\nbody\r\n"
        );
        assert_eq!(
            Intake::whole(b"A: 1\r\r\nB: 2\r\r\n\r\r\nbody\r\r\n", BIG).unwrap(),
            b"A: 1\r\nB: 2\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn a_cr_inside_a_header_line_is_a_space() {
        assert_eq!(
            take(
                &[b"To: a@b", b"Subject: hi\rBcc: v@x\r\rX-Relayq-Relay: evil", b"\tmore\rX: y", b"X-B: 1", b"", b"a\rB: 2"],
                BIG
            )
            .unwrap(),
            b"To: a@b\r\nSubject: hi Bcc: v@x  X-Relayq-Relay: evil\r\n\tmore X: y\r\nX-B: 1\r\n\r\na\r\nB: 2\r\n"
        );
        // Where the text is no header field, it is the body's and breaks
        // at a CR as there.
        assert_eq!(
            take(&[b"S: x", b"not a field\rB: 2"], BIG).unwrap(),
            b"S: x\r\n\r\nnot a field\r\nB: 2\r\n"
        );
        assert_eq!(take(&[b"\rB: 2"], BIG).unwrap(), b"\r\nB: 2\r\n");
    }

    #[test]
    fn text_without_headers_gets_a_blank_line() {
        assert_eq!(
            take(&[b"Oh hi there"], BIG).unwrap(),
            b"\r\nOh hi there\r\n"
        );
        assert_eq!(
            take(&[b"Subject: x", b"not a header"], BIG).unwrap(),
            b"Subject: x\r\n\r\nnot a header\r\n"
        );
        assert_eq!(
            take(&[b"Subject: x", b" folded", b"", b"body"], BIG).unwrap(),
            b"Subject: x\r\n folded\r\n\r\nbody\r\n"
        );
        assert_eq!(take(&[b" lead"], BIG).unwrap(), b"\r\n lead\r\n");
    }

    #[test]
    fn long_lines_are_kept_whole() {
        let long = vec![b'a'; 5000];
        let got = take(&[b"S: x", b"", &long], BIG).unwrap();
        assert!(got.ends_with(&[&long[..], b"\r\n"].concat()));
    }

    #[test]
    fn limits_and_nul() {
        let small = Limits {
            max_message_size: 20,
            max_header_size: 12,
        };
        assert!(matches!(
            take(&[b"S: x", b"", b"0123456789abcdef"], small),
            Err(Refusal::TooBig { limit: 20 })
        ));
        // One field with its continuation lines is what is limited.
        assert!(matches!(
            take(&[b"S: 12345", b" 6"], small),
            Err(Refusal::HeaderTooBig { limit: 12 })
        ));
        assert!(take(&[b"S: 1234", b"T: 1234"], small).is_ok());
        assert!(matches!(
            take(&[b"S: x", b"", b"a\0b"], BIG),
            Err(Refusal::Nul { line: 3 })
        ));
    }
}
