//! The message as `sendmail` reads it from stdin: a line with a lone dot
//! ends it (unless `-i`), a leading mbox `From ` line is dropped, and
//! every line goes through cleanup's intake, so line ends, bare CRs, NUL
//! and the size limits are judged exactly as for a message over SMTP.
//!
//! # Security
//! Stdin is untrusted input of any size: each read is bounded by what is
//! left of the size limit, so a line without an end cannot exhaust memory.

use std::io::{self, BufRead, Read};

use crate::cleanup::{Intake, Limits, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("cannot read the message from standard input: {0}")]
    Io(#[from] io::Error),
}

/// Reads the message (see the module doc).
pub fn read(
    mut input: impl BufRead,
    ignore_dots: bool,
    limits: Limits,
) -> Result<Vec<u8>, InputError> {
    let mut intake = Intake::new(limits);
    let mut line = Vec::with_capacity(1024);
    let mut read = 0u64;
    let max = u64::try_from(limits.max_message_size).unwrap_or(u64::MAX);
    let mut first = true;
    loop {
        line.clear();
        // Bounded by what is left of the size limit (and a line end).
        let budget = max.saturating_sub(read) + 3;
        input.by_ref().take(budget).read_until(b'\n', &mut line)?;
        if line.is_empty() {
            break;
        }
        read += line.len() as u64;
        let ended = line.last() == Some(&b'\n');
        if !ended && line.len() as u64 >= budget {
            return Err(Refusal::TooBig {
                limit: limits.max_message_size,
            }
            .into());
        }
        let mut text = &line[..];
        if ended {
            text = &text[..text.len() - 1];
            text = text.strip_suffix(b"\r").unwrap_or(text);
        }
        if std::mem::take(&mut first) && text.starts_with(b"From ") {
            continue;
        }
        if !ignore_dots && text == b"." {
            break;
        }
        intake.line(text);
        if intake.refused() {
            break;
        }
    }
    Ok(intake.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_message_size: 1 << 20,
        max_header_size: 1 << 16,
    };

    fn rd(input: &[u8], ignore_dots: bool) -> Vec<u8> {
        read(input, ignore_dots, LIMITS).unwrap()
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
        // A bare CR is a line end, never a dot's neighbour.
        assert_eq!(
            rd(b"S: x\n\nx\r.\rMAIL FROM:<e@x>\r\n", true),
            b"S: x\r\n\r\nx\r\n.\r\nMAIL FROM:<e@x>\r\n"
        );
    }

    #[test]
    fn long_lines_are_kept() {
        let long = [&b"S: x\n\n"[..], &vec![b'a'; 2000], b"\n"].concat();
        let got = rd(&long, false);
        assert!(got.windows(2000).any(|w| w.iter().all(|&b| b == b'a')));
    }

    #[test]
    fn limits() {
        let small = Limits {
            max_message_size: 12,
            ..LIMITS
        };
        assert!(matches!(
            read(&b"S: x\n\n0123456789\n"[..], false, small),
            Err(InputError::Refused(Refusal::TooBig { .. }))
        ));
        let endless = vec![b'a'; 5000];
        assert!(matches!(
            read(
                &endless[..],
                false,
                Limits {
                    max_message_size: 1000,
                    ..LIMITS
                }
            ),
            Err(InputError::Refused(Refusal::TooBig { .. }))
        ));
        assert!(matches!(
            read(&b"S: x\n\na\0b\n"[..], false, LIMITS),
            Err(InputError::Refused(Refusal::Nul { line: 3 }))
        ));
    }
}
