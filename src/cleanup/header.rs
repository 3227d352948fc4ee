//! The header section of a message as the intake stored it (CRLF line
//! ends, ended by an empty line): finding fields, removing them, and
//! folding lines that are too long.
//!
//! # Security
//! The header comes from the client. Only the header section (up to the
//! first empty line) is looked at; a message without an empty line is all
//! header, and nothing in a body is ever read as a header.

use std::ops::Range;

use super::Refusal;

/// One header field: its name and the bytes of the whole field,
/// continuation lines and the final CRLF included.
#[derive(Debug, Clone)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub range: Range<usize>,
}

impl Field<'_> {
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name.as_bytes())
    }
}

/// Byte offset just past the header section's empty line, or the end of
/// the message when there is none.
pub fn end(msg: &[u8]) -> usize {
    let mut pos = 0;
    while pos < msg.len() {
        let line_end = next_line(msg, pos);
        if msg[pos..line_end].starts_with(b"\r\n") || msg[pos..line_end] == *b"\n" {
            return line_end;
        }
        pos = line_end;
    }
    msg.len()
}

/// Where the line starting at `pos` ends (just past its LF).
fn next_line(msg: &[u8], pos: usize) -> usize {
    msg[pos..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(msg.len(), |p| pos + p + 1)
}

/// The header fields in order. A line in the header section that is
/// neither a field nor a continuation gets an empty name (never matched).
pub fn fields(msg: &[u8]) -> Vec<Field<'_>> {
    let end = end(msg);
    let mut out: Vec<Field<'_>> = Vec::new();
    let mut pos = 0;
    while pos < end {
        let line_end = next_line(&msg[..end], pos);
        let line = &msg[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if matches!(line[0], b' ' | b'\t')
            && let Some(last) = out.last_mut()
        {
            last.range.end = line_end;
        } else {
            let name = line
                .iter()
                .position(|&b| b == b':')
                .map_or(&b""[..], |c| line[..c].trim_ascii());
            out.push(Field {
                name,
                range: pos..line_end,
            });
        }
        pos = line_end;
    }
    out
}

pub fn has(msg: &[u8], name: &str) -> bool {
    fields(msg).iter().any(|f| f.is(name))
}

pub fn count(msg: &[u8], name: &str) -> usize {
    fields(msg).iter().filter(|f| f.is(name)).count()
}

/// The field's value: what follows the colon, continuation lines and line
/// ends included.
pub fn value<'a>(msg: &'a [u8], field: &Field<'_>) -> &'a [u8] {
    let raw = &msg[field.range.clone()];
    raw.iter()
        .position(|&b| b == b':')
        .map_or(&raw[raw.len()..], |c| &raw[c + 1..])
}

/// The message without the fields `drop` says to drop (continuation lines
/// too); `None` when nothing was dropped.
pub fn remove(msg: &[u8], drop: impl Fn(&Field<'_>) -> bool) -> Option<Vec<u8>> {
    let gone: Vec<Range<usize>> = fields(msg)
        .into_iter()
        .filter(|f| drop(f))
        .map(|f| f.range)
        .collect();
    if gone.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(msg.len());
    let mut pos = 0;
    for r in gone {
        out.extend_from_slice(&msg[pos..r.start]);
        pos = r.end;
    }
    out.extend_from_slice(&msg[pos..]);
    Some(out)
}

/// Folds every header line longer than `max` octets (CRLF excluded) in
/// the header block `head` (a message's or a MIME part's, up to its empty
/// line). A line is broken before a space or tab (unfolding then gives the
/// value back exactly), or, where a stretch of `max` octets has none,
/// after a comma or semicolon (CRLF SPACE, which only adds a space where a
/// structured field allows one). Never inside a word. `None` when no line
/// was too long; a refusal naming the field when one cannot be folded.
pub fn fold(head: &[u8], max: usize) -> Result<Option<Vec<u8>>, Refusal> {
    let max = max.max(2);
    if !head
        .split(|&b| b == b'\n')
        .any(|l| l.strip_suffix(b"\r").unwrap_or(l).len() > max)
    {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(head.len() + head.len() / max * 3 + 16);
    let mut field_name: &[u8] = b"";
    let mut rest = head;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |p| p + 1);
        let (line, after) = rest.split_at(end);
        rest = after;
        let text = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        if !matches!(text.first(), Some(b' ' | b'\t')) {
            field_name = text
                .iter()
                .position(|&b| b == b':')
                .map_or(&b""[..], |c| &text[..c]);
        }
        if text.len() <= max {
            out.extend_from_slice(line);
            continue;
        }
        // On a field's first line, never fold before its value starts: a
        // value moved whole to the next line would unfold with a space
        // in front.
        let value_start = if matches!(text.first(), Some(b' ' | b'\t')) {
            0
        } else {
            text.iter().position(|&b| b == b':').map_or(0, |c| {
                c + 1
                    + text[c + 1..]
                        .iter()
                        .take_while(|b| matches!(b, b' ' | b'\t'))
                        .count()
            })
        };
        fold_line(text, max, value_start, &mut out).map_err(|()| Refusal::Unfoldable {
            field: String::from_utf8_lossy(field_name)
                .chars()
                .take(64)
                .collect(),
        })?;
    }
    Ok(Some(out))
}

/// Appends one over-long line, folded, with its CRLF. No fold goes at or
/// before `value_start` (the field name, its colon and the whitespace
/// after it).
fn fold_line(mut text: &[u8], max: usize, value_start: usize, out: &mut Vec<u8>) -> Result<(), ()> {
    let mut min = value_start;
    while text.len() > max {
        let window = &text[..=max];
        let at_space = window
            .iter()
            .enumerate()
            .skip(min.max(1))
            .rev()
            .find(|&(i, &b)| {
                matches!(b, b' ' | b'\t')
                    && window[min..i].iter().any(|c| !matches!(c, b' ' | b'\t'))
            })
            .map(|(i, _)| i);
        match at_space {
            // CRLF goes before the whitespace, which starts the next line.
            Some(i) => {
                out.extend_from_slice(&text[..i]);
                out.extend_from_slice(b"\r\n");
                text = &text[i..];
            }
            None => {
                let comma = text[..max]
                    .iter()
                    .rposition(|&b| b == b',' || b == b';')
                    .filter(|&i| i > min)
                    .ok_or(())?;
                out.extend_from_slice(&text[..=comma]);
                out.extend_from_slice(b"\r\n ");
                text = &text[comma + 1..];
            }
        }
        min = 0;
    }
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Unfolds a value (RFC 5322 2.2.3: a CRLF followed by whitespace is
/// removed, the whitespace kept) and trims it.
pub fn unfold(value: &[u8]) -> String {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        match value[i] {
            b'\r' if value.get(i + 1) == Some(&b'\n') => i += 2,
            b'\n' => i += 1,
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(out.trim_ascii()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &[u8] = b"Subject: x\r\nmessage-id : <a@b>\r\nBcc: secret@example.net,\r\n  other@example.net\r\nX: y\r\n\r\nBcc: body@example.com\r\n";

    #[test]
    fn fields_only_in_the_header_section() {
        let names: Vec<&[u8]> = fields(M).iter().map(|f| f.name).collect();
        assert_eq!(names, [&b"Subject"[..], b"message-id", b"Bcc", b"X"]);
        assert!(has(M, "MESSAGE-ID") && !has(M, "date"));
        assert_eq!(count(M, "bcc"), 1);
        let bcc = &fields(M)[2];
        assert_eq!(
            unfold(value(M, bcc)),
            "secret@example.net,  other@example.net"
        );
        assert_eq!(end(M), M.len() - b"Bcc: body@example.com\r\n".len());
        assert_eq!(end(b"A: b\r\n"), 6);
    }

    #[test]
    fn removing_fields_takes_continuations() {
        let got = remove(M, |f| f.is("bcc")).unwrap();
        assert_eq!(
            got,
            b"Subject: x\r\nmessage-id : <a@b>\r\nX: y\r\n\r\nBcc: body@example.com\r\n"
        );
        assert!(remove(M, |f| f.is("cc")).is_none());
    }

    /// Unfolding the folded header must give back the value, whitespace
    /// for whitespace, when it was folded at whitespace.
    #[test]
    fn folding_at_whitespace_unfolds_to_the_original() {
        let words: Vec<String> = (0..400)
            .map(|i| format!("\"user{i:03}@example.com\""))
            .collect();
        let value = words.join(", ");
        let head = format!("X-SMTPAPI: {{\"to\": [{value}]}}\r\nSubject: hi\r\n\r\n");
        let folded = fold(head.as_bytes(), 998).unwrap().unwrap();
        for line in folded.split(|&b| b == b'\n') {
            assert!(line.len() <= 999, "{}", line.len());
        }
        let f = fields(&folded);
        assert_eq!(
            unfold(value_of(&folded, &f[0])),
            format!("{{\"to\": [{value}]}}")
        );
        assert_eq!(unfold(value_of(&folded, &f[1])), "hi");
        // Nothing long: nothing to do.
        assert!(fold(b"A: b\r\n\r\n", 998).unwrap().is_none());
    }

    fn value_of<'a>(msg: &'a [u8], f: &Field<'_>) -> &'a [u8] {
        value(msg, f)
    }

    #[test]
    fn folding_after_commas_when_there_is_no_whitespace() {
        let value: Vec<String> = (0..300).map(|i| format!("\"u{i}@example.com\"")).collect();
        let value = value.join(",");
        let head = format!("X-SMTPAPI: {{\"to\":[{value}]}}\r\n\r\n");
        let folded = fold(head.as_bytes(), 998).unwrap().unwrap();
        let text = String::from_utf8(folded.clone()).unwrap();
        assert!(text.lines().all(|l| l.len() <= 998));
        // Every break is after a comma; no address is cut.
        for l in text.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
            assert!(l.starts_with(" \"u") || l.starts_with(" {"), "{l}");
        }
        let unfolded = unfold(value_of(&folded, &fields(&folded)[0]));
        assert_eq!(unfolded.replace(", ", ","), format!("{{\"to\":[{value}]}}"));
    }

    #[test]
    fn a_line_without_a_place_to_fold_is_refused() {
        let head = format!("X-Token: {}\r\n\r\n", "a".repeat(2000));
        match fold(head.as_bytes(), 998) {
            Err(Refusal::Unfoldable { field }) => assert_eq!(field, "X-Token"),
            other => panic!("{other:?}"),
        }
        // Whitespace only at the start is not a place to fold either.
        let head = format!("X-Token:    {}\r\n\r\n", "b".repeat(1200));
        assert!(fold(head.as_bytes(), 998).is_err());
        // A DKIM signature with a 1,200-character b= tag: folded where it
        // can be, and the refusal does not claim there was no space.
        let head = format!(
            "DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s; b={}\r\n\r\n",
            "A".repeat(1200)
        );
        let err = fold(head.as_bytes(), 998).unwrap_err();
        assert!(
            err.to_string().contains("a run of that many characters"),
            "{err}"
        );
    }
}
