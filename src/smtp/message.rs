//! What the server adds to a received message before it is queued: a
//! `Received:` trace header, and `Message-ID:`/`Date:` when the client left
//! them out (RFC 5322 requires Date; providers score mail without a
//! Message-ID as spam).

use std::net::IpAddr;

/// Which of the headers we may have to add are already present.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Present {
    pub date: bool,
    pub message_id: bool,
}

/// Scans the header section (up to the first empty line) for Date and
/// Message-ID. Continuation lines and the body are never looked at.
pub fn scan_headers(message: &[u8]) -> Present {
    let mut present = Present::default();
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        if name.eq_ignore_ascii_case(b"date") {
            present.date = true;
        } else if name.eq_ignore_ascii_case(b"message-id") {
            present.message_id = true;
        }
    }
    present
}

/// The size of the header section, up to the empty line, counted as the
/// SMTP server counts it against `smtp.max_header_size`: each line with a
/// CRLF end.
pub fn header_size(message: &[u8]) -> usize {
    let mut size = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        size += line.len() + 2;
    }
    size
}

/// Trace information for the Received header.
pub struct Trace<'a> {
    pub helo: &'a str,
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    pub protocol: &'a str,
    pub id: &'a str,
    /// Named in the header only for a single-recipient message, as Postfix
    /// does: listing many would leak Bcc recipients to each other.
    pub single_rcpt: Option<&'a str>,
    pub date: &'a str,
}

/// The headers to put in front of the client's message.
pub fn prefix(trace: &Trace<'_>, present: &Present) -> Vec<u8> {
    let helo = sanitize(trace.helo);
    let mut out = format!(
        "Received: from {helo} ([{}])\r\n\tby {} (relayq) with {} id {}",
        trace.client_ip, trace.hostname, trace.protocol, trace.id
    );
    if let Some(rcpt) = trace.single_rcpt {
        out.push_str(&format!("\r\n\tfor <{}>", sanitize(rcpt)));
    }
    out.push_str(&format!("; {}\r\n", trace.date));
    if !present.message_id {
        out.push_str(&format!(
            "Message-ID: <{}@{}>\r\n",
            trace.id, trace.hostname
        ));
    }
    if !present.date {
        out.push_str(&format!("Date: {}\r\n", trace.date));
    }
    out.into_bytes()
}

/// The current time as an RFC 5322 date, in the local time zone.
pub fn rfc5322_now(now: std::time::SystemTime) -> String {
    let ts = jiff::Timestamp::try_from(now).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let zoned = ts.to_zoned_datetime(jiff::tz::TimeZone::system());
    jiff::fmt::rfc2822::to_string(&zoned)
        .unwrap_or_else(|_| "Thu, 1 Jan 1970 00:00:00 +0000".into())
}

/// A client-chosen string in a header: printable ASCII only, bounded.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || !c.is_ascii())
        .filter(|c| !c.is_control())
        .take(255)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_headers_only_in_the_header_section() {
        let m = b"Subject: x\r\nmessage-id : <a@b>\r\n\r\nDate: in the body\r\n";
        assert_eq!(
            scan_headers(m),
            Present {
                date: false,
                message_id: true
            }
        );
        let m = b"DATE: Mon, 1 Jan 2024 00:00:00 +0000\nX: y\n folded Message-ID: no\n";
        assert_eq!(
            scan_headers(m),
            Present {
                date: true,
                message_id: false
            }
        );
    }

    #[test]
    fn prefix_is_crlf_and_adds_only_what_is_missing() {
        let trace = Trace {
            helo: "app\r\nX-Evil: 1",
            client_ip: "127.0.0.1".parse().unwrap(),
            hostname: "relay.test",
            protocol: "ESMTP",
            id: "01ABC",
            single_rcpt: Some("b@example.net"),
            date: "Mon, 1 Jan 2024 00:00:00 +0000",
        };
        let p = String::from_utf8(prefix(
            &trace,
            &Present {
                date: true,
                message_id: false,
            },
        ))
        .unwrap();
        assert!(p.starts_with("Received: from appX-Evil:1 ([127.0.0.1])\r\n\tby relay.test (relayq) with ESMTP id 01ABC\r\n\tfor <b@example.net>; Mon"));
        assert!(p.contains("Message-ID: <01ABC@relay.test>\r\n"));
        assert!(!p.contains("\r\nDate:"));
        assert!(p.ends_with("\r\n"));
    }
}
