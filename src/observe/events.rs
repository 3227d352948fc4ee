//! The events an operator greps for, each in one function: it writes the
//! log line (one tracing call, with the values as fields, so the text and
//! JSON formats carry the same data), bumps the metrics, and updates the
//! status page's state.
//!
//! The text of each line follows Postfix, queue id first:
//!
//! ```text
//! ID: client=[127.0.0.1], from=<app@example.com>, size=403, nrcpt=1 (queue active)
//! ID: to=<bob@example.net>, relay=smtp.example.com[192.0.2.1]:587, delay=0.21, delays=0.00/0.12/0.09, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4f1c)
//! ID: sender non-delivery notification: BOUNCEID
//! ID: removed
//! ```
//!
//! # Security
//! Upstream replies are logged verbatim (support desks ask for the
//! provider's message id in them); they come from the upstream and never
//! contain our credentials (the SMTP client scrubs them from errors). No
//! event takes a password or a message body.

use std::net::IpAddr;

use metrics::{counter, gauge, histogram};

use super::metrics as m;
use super::state::{self, RecentAttempt};

/// A recipient's fate in one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Sent,
    Deferred,
    Bounced,
    Expired,
}

impl Status {
    /// The `status` field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Deferred => "deferred",
            Status::Bounced => "bounced",
            Status::Expired => "expired",
        }
    }

    /// As Postfix words it in the text line.
    fn text(self) -> &'static str {
        match self {
            Status::Expired => "expired, returned to sender",
            other => other.as_str(),
        }
    }
}

/// One recipient in one delivery attempt.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub queue_id: &'a str,
    pub to: &'a str,
    /// `host[ip]:port` (or `host:port` when no connection was made, or
    /// `maildir:/path` for the capture transport).
    pub relay: &'a str,
    /// Seconds from acceptance to now.
    pub delay: f64,
    /// Seconds waiting in the queue, connecting (TLS and AUTH included),
    /// and transferring.
    pub delays: [f64; 3],
    pub dsn: &'a str,
    pub status: Status,
    /// The upstream's reply verbatim, or why no reply was had.
    pub reply: &'a str,
    /// Why this relay (route, failover), as ` (route: ...)`; may be empty.
    pub note: &'a str,
}

/// `host[ip]:port` without the address, for metric labels and the relay
/// state: the address changes with DNS, the relay does not.
pub fn relay_name(relay: &str) -> String {
    match (relay.find('['), relay.find(']')) {
        (Some(open), Some(close)) if open < close => {
            format!("{}{}", &relay[..open], &relay[close + 1..])
        }
        _ => relay.to_string(),
    }
}

fn round2(x: f64) -> f64 {
    (x.max(0.0) * 100.0).round() / 100.0
}

/// A message was accepted into the queue.
pub fn accepted(queue_id: &str, client: IpAddr, from: &str, size: usize, nrcpt: usize) {
    tracing::info!(
        target: "relayq::queue",
        event = "accepted",
        queue_id,
        client = %client,
        from,
        size,
        nrcpt,
        "{queue_id}: client=[{client}], from=<{from}>, size={size}, nrcpt={nrcpt} (queue active)"
    );
    counter!(m::ACCEPTED).increment(1);
}

/// A message a local user handed to `sendmail`, queued by the pickup: the
/// same event as [`accepted`], with the submitter instead of a client.
pub fn accepted_local(
    queue_id: &str,
    uid: u32,
    user: &str,
    from: &str,
    size: usize,
    nrcpt: usize,
    drop_file: &str,
) {
    tracing::info!(
        target: "relayq::queue",
        event = "accepted",
        queue_id,
        uid,
        user,
        from,
        size,
        nrcpt,
        "{queue_id}: uid={uid} ({user}), from=<{from}>, size={size}, nrcpt={nrcpt} (queue active, from maildrop {drop_file})"
    );
    counter!(m::ACCEPTED).increment(1);
}

/// One recipient's outcome in one attempt.
pub fn attempt(a: &Attempt<'_>) {
    let delay = round2(a.delay);
    let delays = format!(
        "{:.2}/{:.2}/{:.2}",
        a.delays[0].max(0.0),
        a.delays[1].max(0.0),
        a.delays[2].max(0.0)
    );
    let status = a.status.as_str();
    tracing::info!(
        target: "relayq::delivery",
        event = "delivery",
        queue_id = a.queue_id,
        to = a.to,
        relay = a.relay,
        delay,
        delays = delays.as_str(),
        dsn = a.dsn,
        status,
        reply = a.reply,
        route = a.note.trim().trim_start_matches('(').trim_end_matches(')'),
        "{}: to=<{}>, relay={}, delay={delay:.2}, delays={delays}, dsn={}, status={} ({}){}",
        a.queue_id,
        a.to,
        a.relay,
        a.dsn,
        a.status.text(),
        a.reply,
        a.note,
    );
    let relay = relay_name(a.relay);
    match a.status {
        Status::Sent => {
            counter!(m::DELIVERED, "relay" => relay.clone()).increment(1);
            histogram!(m::DELAY).record(a.delay.max(0.0));
        }
        Status::Deferred => counter!(m::DEFERRED, "relay" => relay.clone()).increment(1),
        Status::Bounced => counter!(m::BOUNCED, "relay" => relay.clone()).increment(1),
        Status::Expired => {
            counter!(m::BOUNCED, "relay" => relay.clone()).increment(1);
            counter!(m::EXPIRED, "relay" => relay.clone()).increment(1);
        }
    }
    if a.status == Status::Sent {
        relay_connected(&relay);
    }
    state::record_attempt(RecentAttempt {
        at_ms: state::now_ms(),
        queue_id: a.queue_id.to_string(),
        to: a.to.to_string(),
        relay: a.relay.to_string(),
        status,
        dsn: a.dsn.to_string(),
        reply: a.reply.to_string(),
        delay,
    });
}

/// A connection to the relay (`host:port`) was opened and is ready for mail.
pub fn relay_connected(relay: &str) {
    gauge!(m::RELAY_UP, "relay" => relay.to_string()).set(1.0);
    state::relay_result(relay, None);
}

/// A connection to the relay failed; `kind` is where (dns, connect, tls,
/// auth, ...), `error` the exact failure.
pub fn relay_failed(relay: &str, kind: &str, error: &str) {
    counter!(m::UPSTREAM_ERRORS, "relay" => relay.to_string(), "kind" => kind.to_string())
        .increment(1);
    gauge!(m::RELAY_UP, "relay" => relay.to_string()).set(0.0);
    state::relay_result(relay, Some(error));
}

/// The queue file is gone: every recipient is done, or an operator deleted it.
pub fn removed(queue_id: &str) {
    tracing::info!(target: "relayq::queue", event = "removed", queue_id, "{queue_id}: removed");
}

pub fn held(queue_id: &str) {
    tracing::info!(target: "relayq::queue", event = "hold", queue_id, "{queue_id}: placed on hold");
}

pub fn released(queue_id: &str) {
    tracing::info!(target: "relayq::queue", event = "release", queue_id, "{queue_id}: released from hold");
}

/// A bounce (DSN) to the sender was queued as `bounce_id`.
pub fn bounce_queued(queue_id: &str, bounce_id: &str) {
    tracing::info!(
        target: "relayq::queue",
        event = "bounce",
        queue_id,
        bounce_id,
        "{queue_id}: sender non-delivery notification: {bounce_id}"
    );
}

/// A delay or success notice the sender asked for (NOTIFY=DELAY or
/// SUCCESS), in Postfix's words.
pub fn notice_queued(queue_id: &str, kind: &str, notice_id: &str) {
    tracing::info!(
        target: "relayq::queue",
        event = "bounce",
        queue_id,
        bounce_id = notice_id,
        "{queue_id}: sender {kind} notification: {notice_id}"
    );
}

/// Failures whose recipients said NOTIFY without FAILURE: no bounce.
pub fn bounce_not_wanted<'a>(queue_id: &str, rcpts: impl Iterator<Item = &'a str>) {
    let list: Vec<String> = rcpts.map(|r| format!("<{r}>")).collect();
    tracing::info!(
        target: "relayq::queue",
        event = "bounce",
        queue_id,
        "{queue_id}: no non-delivery notification for {}: the sender asked for none (NOTIFY)",
        list.join(", ")
    );
}

/// A failure of mail from `<>` is not bounced (no bounce loops).
pub fn bounce_suppressed(queue_id: &str) {
    tracing::info!(
        target: "relayq::queue",
        event = "bounce",
        queue_id,
        "{queue_id}: sender is <>, no bounce is sent"
    );
}

/// Trouble on our side with one message (spool I/O, a corrupt file).
pub fn queue_error(queue_id: &str, what: &str) {
    tracing::error!(target: "relayq::queue", event = "error", queue_id, "{queue_id}: {what}");
}

pub fn queue_warning(queue_id: &str, what: &str) {
    tracing::warn!(target: "relayq::queue", event = "warning", queue_id, "{queue_id}: {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_names_drop_the_address() {
        assert_eq!(
            relay_name("smtp.example.com[192.0.2.1]:587"),
            "smtp.example.com:587"
        );
        assert_eq!(relay_name("127.0.0.1[127.0.0.1]:2526"), "127.0.0.1:2526");
        assert_eq!(relay_name("::1[::1]:25"), "::1:25");
        assert_eq!(relay_name("smtp.example.com:587"), "smtp.example.com:587");
        assert_eq!(relay_name("maildir:/tmp/m"), "maildir:/tmp/m");
    }
}
