//! What relayq puts in front of a message it queues: a `Received:` trace
//! header saying where it came from, and `Message-ID:`/`Date:` when the
//! sender left them out (RFC 5322 requires Date; providers score mail
//! without a Message-ID as spam).

use std::net::IpAddr;

use super::header;

/// Where a message came from, for its `Received:` header.
pub enum Origin<'a> {
    /// An SMTP client (or `sendmail -bs`).
    Smtp {
        helo: &'a str,
        client_ip: IpAddr,
        /// `SMTP`, `ESMTP` or `UTF8SMTP`.
        protocol: &'a str,
    },
    /// A local user's `sendmail`, named by uid (Postfix's form), so that a
    /// forged `From:` can be traced to its author.
    Local { uid: u32 },
}

/// Trace information for the Received header.
pub struct Trace<'a> {
    pub origin: Origin<'a>,
    pub hostname: &'a str,
    pub id: &'a str,
    /// Named in the header only for a single-recipient message, as Postfix
    /// does: listing many would leak Bcc recipients to each other.
    pub single_rcpt: Option<&'a str>,
    pub date: &'a str,
}

/// The headers to put in front of `message`.
pub fn prefix(trace: &Trace<'_>, message: &[u8]) -> Vec<u8> {
    let mut out = match &trace.origin {
        Origin::Smtp {
            helo,
            client_ip,
            protocol,
        } => format!(
            "Received: from {} ([{client_ip}])\r\n\tby {} (relayq) with {protocol} id {}",
            sanitize(helo),
            trace.hostname,
            trace.id
        ),
        Origin::Local { uid } => format!(
            "Received: by {} (relayq, from userid {uid})\r\n\tid {}",
            trace.hostname, trace.id
        ),
    };
    if let Some(rcpt) = trace.single_rcpt {
        out.push_str(&format!("\r\n\tfor <{}>", sanitize(rcpt)));
    }
    out.push_str(&format!("; {}\r\n", trace.date));
    let fields = header::fields(message);
    if !fields.iter().any(|f| f.is("message-id")) {
        out.push_str(&format!(
            "Message-ID: <{}@{}>\r\n",
            trace.id, trace.hostname
        ));
    }
    if !fields.iter().any(|f| f.is("date")) {
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

/// A client-chosen string in a header: printable, bounded.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| (c.is_ascii_graphic() || !c.is_ascii()) && !c.is_control())
        .take(255)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_prefix_is_crlf_and_adds_only_what_is_missing() {
        let trace = Trace {
            origin: Origin::Smtp {
                helo: "app\r\nX-Evil: 1",
                client_ip: "127.0.0.1".parse().unwrap(),
                protocol: "ESMTP",
            },
            hostname: "relay.test",
            id: "01ABC",
            single_rcpt: Some("b@example.net"),
            date: "Mon, 1 Jan 2024 00:00:00 +0000",
        };
        let p = String::from_utf8(prefix(&trace, b"DATE: x\r\n\r\nMessage-ID: body\r\n")).unwrap();
        assert!(p.starts_with("Received: from appX-Evil:1 ([127.0.0.1])\r\n\tby relay.test (relayq) with ESMTP id 01ABC\r\n\tfor <b@example.net>; Mon"));
        assert!(p.contains("Message-ID: <01ABC@relay.test>\r\n"));
        assert!(!p.contains("\r\nDate:"));
        assert!(p.ends_with("\r\n"));
    }

    #[test]
    fn local_prefix_names_the_uid() {
        let trace = Trace {
            origin: Origin::Local { uid: 1000 },
            hostname: "h.test",
            id: "01ID",
            single_rcpt: Some("b@example.net"),
            date: "Thu, 1 Jan 1970 00:00:00 +0000",
        };
        let p = String::from_utf8(prefix(&trace, b"Date: x\r\n\r\nbody\r\n")).unwrap();
        assert!(
            p.starts_with(
                "Received: by h.test (relayq, from userid 1000)\r\n\tid 01ID\r\n\tfor <b@example.net>; "
            ),
            "{p}"
        );
        assert!(p.contains("Message-ID: <01ID@h.test>\r\n"));
        assert!(!p.contains("\r\nDate:"));
    }
}
