//! The events an operator greps for, each in one function: it writes the
//! log line (one tracing call, with the values as fields, so the text and
//! JSON formats carry the same data), bumps the metrics, and updates the
//! status page's state.
//!
//! The text of each line follows Postfix, queue id first:
//!
//! ```text
//! ID: client=[127.0.0.1], from=<app@example.com>, size=403, nrcpt=1 (queue active)
//! ID: uid=0 (root), from=<root@app1.example.com>, size=512, nrcpt=1 (queue active)
//! NOQUEUE: reject: END-OF-MESSAGE from [127.0.0.1]: 552 5.3.4 Error: message size exceeds fixed limit; from=<app@example.com> to=<bob@example.net>
//! ID: to=<bob@example.net>, relay=smtp.example.com[192.0.2.1]:587, delay=0.21, delays=0.00/0.12/0.09, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4f1c)
//! ID: sender non-delivery notification: BOUNCEID
//! ID: removed
//! ```
//!
//! # Security
//! Upstream replies are logged verbatim (support desks ask for the
//! provider's message id in them); they come from the upstream and never
//! contain our credentials (the SMTP client scrubs them from errors). No
//! event takes a password or a message body. Addresses and replies from
//! clients are logged without control characters and cut to a bound.

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

/// Who handed us a message: a client on the network, or a local user
/// (the `sendmail` command, `sendmail -bs`, the maildrop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    Remote(IpAddr),
    Local { uid: u32, user: String },
}

impl Client {
    /// A local user by uid, named from the password database.
    pub fn local(uid: u32) -> Client {
        Client::Local {
            uid,
            user: crate::submit::Identity::of_uid(uid).name,
        }
    }

    /// `[192.0.2.1]` or `uid=33 (www-data)`, as the log lines name them.
    pub fn who(&self) -> String {
        match self {
            Client::Remote(ip) => format!("[{ip}]"),
            Client::Local { uid, user } => format!("uid={uid} ({user})"),
        }
    }
}

/// A message was accepted into the queue: one line and one count per
/// message, whichever way it came in.
pub fn accepted(queue_id: &str, client: &Client, from: &str, size: usize, nrcpt: usize) {
    match client {
        Client::Remote(ip) => tracing::info!(
            target: "relayq::queue",
            event = "accepted",
            queue_id,
            client = %ip,
            from,
            size,
            nrcpt,
            "{queue_id}: client=[{ip}], from=<{from}>, size={size}, nrcpt={nrcpt} (queue active)"
        ),
        Client::Local { uid, user } => tracing::info!(
            target: "relayq::queue",
            event = "accepted",
            queue_id,
            uid,
            user = user.as_str(),
            from,
            size,
            nrcpt,
            "{queue_id}: uid={uid} ({user}), from=<{from}>, size={size}, nrcpt={nrcpt} (queue active)"
        ),
    }
    counter!(m::ACCEPTED).increment(1);
}

/// Why a message or a recipient was refused: the `reason` label of
/// `relayq_rejected_total` and the `reason` field of the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not in `allow_networks` and not authenticated.
    RelayDenied,
    /// A sender or recipient that is not `user@domain`.
    BadAddress,
    /// An 8-bit address without SMTPUTF8.
    Smtputf8Required,
    /// A MAIL or RCPT parameter we do not offer.
    UnsupportedParameter,
    /// A MAIL or RCPT command that does not parse.
    Syntax,
    TooManyRecipients,
    MessageSize,
    HeaderSize,
    /// A header line too long with no place to fold it.
    LineLength,
    Nul,
    /// Too many `Received:` headers: a mail loop.
    TooManyHops,
    /// The client stalled inside DATA.
    Timeout,
    /// The spool's disk is (nearly) full.
    DiskFull,
    /// The queue file could not be written.
    QueueError,
    /// A maildrop file that breaks a rule (kept in corrupt/maildrop/).
    BadDropFile,
}

impl Reason {
    pub const ALL: [Reason; 15] = [
        Reason::RelayDenied,
        Reason::BadAddress,
        Reason::Smtputf8Required,
        Reason::UnsupportedParameter,
        Reason::Syntax,
        Reason::TooManyRecipients,
        Reason::MessageSize,
        Reason::HeaderSize,
        Reason::LineLength,
        Reason::Nul,
        Reason::TooManyHops,
        Reason::Timeout,
        Reason::DiskFull,
        Reason::QueueError,
        Reason::BadDropFile,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RelayDenied => "relay_denied",
            Reason::BadAddress => "bad_address",
            Reason::Smtputf8Required => "smtputf8_required",
            Reason::UnsupportedParameter => "unsupported_parameter",
            Reason::Syntax => "syntax",
            Reason::TooManyRecipients => "too_many_recipients",
            Reason::MessageSize => "message_size",
            Reason::HeaderSize => "header_size",
            Reason::LineLength => "line_length",
            Reason::Nul => "nul",
            Reason::TooManyHops => "too_many_hops",
            Reason::Timeout => "timeout",
            Reason::DiskFull => "disk_full",
            Reason::QueueError => "queue_error",
            Reason::BadDropFile => "bad_drop_file",
        }
    }
}

/// Where a refusal happened: the SMTP command (as Postfix names them), or
/// a local way in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Stage {
    #[serde(rename = "MAIL")]
    Mail,
    #[serde(rename = "RCPT")]
    Rcpt,
    #[serde(rename = "DATA")]
    Data,
    #[serde(rename = "END-OF-MESSAGE")]
    EndOfMessage,
    /// The `sendmail` command refused what it read on stdin.
    #[serde(rename = "sendmail")]
    Sendmail,
    /// The daemon's pickup refused a maildrop file.
    #[serde(rename = "pickup")]
    Pickup,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::EndOfMessage => "END-OF-MESSAGE",
            Stage::Sendmail => "sendmail",
            Stage::Pickup => "pickup",
        }
    }
}

/// A message or a recipient we refused, with the reply the sender got.
/// Serializable: `sendmail` reports its refusals to the daemon this way
/// (see `pickup`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    pub stage: Stage,
    pub reason: Reason,
    /// The reply sent (or, for `sendmail`, the error it printed).
    pub reply: String,
    /// The envelope sender, when one was given (`""` is `<>`).
    pub from: Option<String>,
    /// The recipients refused with the message (or the one refused).
    pub to: Vec<String>,
    /// More about why, for the operator (not sent to the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Recipients refused with the message but left out of `to`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub to_omitted: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Recipients named in one reject line; a longer list ends in "and N more".
const REJECT_MAX_TO: usize = 50;
/// The longest reply, and detail, in a reject line (characters).
const REJECT_MAX_REPLY: usize = 512;
/// The longest address in a reject line (characters).
const REJECT_MAX_ADDRESS: usize = 320;

/// Outside text for a log line: no control characters, bounded.
fn loggable(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

impl Rejection {
    /// No more than its reject line shows: bounded text, the first
    /// recipients and the count of the others. A report on `pickup.sock`
    /// is sent this way, so that no envelope is too long to be logged.
    pub fn bounded(&self) -> Rejection {
        Rejection {
            stage: self.stage,
            reason: self.reason,
            reply: loggable(&self.reply, REJECT_MAX_REPLY),
            from: self
                .from
                .as_deref()
                .map(|f| loggable(f, REJECT_MAX_ADDRESS)),
            to: self
                .to
                .iter()
                .take(REJECT_MAX_TO)
                .map(|t| loggable(t, REJECT_MAX_ADDRESS))
                .collect(),
            detail: self
                .detail
                .as_deref()
                .map(|d| loggable(d, REJECT_MAX_REPLY)),
            to_omitted: self
                .to_omitted
                .saturating_add(self.to.len().saturating_sub(REJECT_MAX_TO)),
        }
    }
}

/// A message or recipient was refused: one `NOQUEUE: reject:` line (as
/// Postfix's smtpd logs it) and one count, whichever way it came in.
pub fn rejected(client: &Client, r: &Rejection) {
    let who = client.who();
    let reply = loggable(&r.reply, REJECT_MAX_REPLY);
    let from = r.from.as_deref().map(|f| loggable(f, REJECT_MAX_ADDRESS));
    let to: Vec<String> =
        r.to.iter()
            .map(|t| loggable(t, REJECT_MAX_ADDRESS))
            .collect();
    let mut text = format!("NOQUEUE: reject: {} from {who}: {reply};", r.stage.as_str());
    if let Some(from) = &from {
        text.push_str(&format!(" from=<{from}>"));
    }
    for t in to.iter().take(REJECT_MAX_TO) {
        text.push_str(&format!(" to=<{t}>"));
    }
    let more = to
        .len()
        .saturating_sub(REJECT_MAX_TO)
        .saturating_add(r.to_omitted);
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    let detail = r.detail.as_deref().map(|d| loggable(d, REJECT_MAX_REPLY));
    if let Some(d) = &detail {
        text.push_str(&format!(" ({d})"));
    }
    tracing::warn!(
        target: "relayq::smtp",
        event = "reject",
        stage = r.stage.as_str(),
        client = who.as_str(),
        from = from.as_deref(),
        to = to.join(", ").as_str(),
        reply = reply.as_str(),
        reason = r.reason.as_str(),
        "{text}"
    );
    counter!(m::REJECTED, "reason" => r.reason.as_str()).increment(1);
}

/// Counts a refusal without logging it: a local user whose log budget is
/// spent (see `pickup`). The count is never left out.
pub fn rejected_silently(r: &Rejection) {
    counter!(m::REJECTED, "reason" => r.reason.as_str()).increment(1);
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

    /// However long the envelope, a bounded report fits in what the
    /// pickup reads from `pickup.sock`.
    #[test]
    fn a_bounded_rejection_fits_in_a_report() {
        let huge = "\u{1F600}\"".repeat(100_000);
        let r = Rejection {
            stage: Stage::Sendmail,
            reason: Reason::BadAddress,
            reply: huge.clone(),
            from: Some(huge.clone()),
            to: vec![huge.clone(); 2000],
            detail: Some(huge),
            to_omitted: 7,
        };
        let b = r.bounded();
        assert_eq!(b.to.len(), REJECT_MAX_TO);
        assert_eq!(b.to_omitted, 2000 - REJECT_MAX_TO + 7);
        let json = serde_json::to_vec(&b).unwrap();
        assert!(
            json.len() + crate::pickup::REPORT_PREFIX.len() < crate::pickup::MAX_REPORT,
            "{} bytes",
            json.len()
        );
    }

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
