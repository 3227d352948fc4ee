//! The intake: a message's lines as a way in reads them, turned into the
//! one form the spool keeps (CRLF line ends, a header section ended by an
//! empty line), with the size limits counted while it arrives.
//!
//! # Security
//! Every byte here comes from a client or a local user. The total is
//! bounded by `max_message_size` and each header field (with its
//! continuation lines) by `max_header_size`; past a limit nothing more is
//! kept, so memory stays bounded. A NUL byte is refused: it would be cut or
//! mangled somewhere downstream. A bare CR is a line end, exactly like a
//! bare LF: it is stored as CRLF, so no CR reaches an upstream next to a
//! dot, where a server that takes a lone CR for a line end would see the
//! end of the data and a smuggled transaction after it (SMTP smuggling).

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

    /// One line as read, without its CRLF or LF. A CR inside it ends a
    /// line too (see the module's security note).
    pub fn line(&mut self, text: &[u8]) {
        self.lines += 1;
        for piece in text.split(|&b| b == b'\r') {
            if self.refusal.is_some() {
                return;
            }
            self.one(piece);
        }
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
            b"Subject: x\r\n\r\na\r\nb\r\nc\r\n\r\n"
        );
        // The smuggling shapes: a dot between bare CRs is a line of its own,
        // which the transport will stuff.
        assert_eq!(
            take(&[b"S: x", b"", b"x\r.\rMAIL FROM:<a@b>\r"], BIG).unwrap(),
            b"S: x\r\n\r\nx\r\n.\r\nMAIL FROM:<a@b>\r\n\r\n"
        );
        assert_eq!(
            Intake::whole(b"S: x\n\nx\r.\r\ny\r\r\nz", BIG).unwrap(),
            b"S: x\r\n\r\nx\r\n.\r\ny\r\n\r\nz\r\n"
        );
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
