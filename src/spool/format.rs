//! Encoding and decoding of one queue file (the format is specified in the
//! doc comment of the parent module).
//!
//! # Security
//! A queue file may have been damaged by a disk, an operator or a bug; the
//! decoder treats it as untrusted input: every length is checked, nothing is
//! indexed without a bound, and any surprise is a [`FormatError`], which
//! sends the file to `corrupt/` instead of crashing the daemon.

use std::fmt::Write as _;

pub const MAGIC: &str = "relayq-queue 1";
/// The end marker without a checksum (files written by older versions and
/// by the sendmail maildrop).
pub const END: &[u8] = b"end\n";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a relayq queue file (bad first line)")]
    BadMagic,
    #[error("header truncated or not terminated by an empty line")]
    TruncatedHeader,
    #[error("bad header line: {0}")]
    BadHeader(String),
    #[error("missing header field: {0}")]
    Missing(&'static str),
    #[error("message body truncated: header says {expected} bytes, file has {actual}")]
    TruncatedBody { expected: u64, actual: u64 },
    #[error("end marker missing after the message body")]
    NoEndMarker,
    #[error("checksum mismatch: the file was not written whole")]
    BadChecksum,
    /// The first byte is NUL: a finished message whose removal did not
    /// complete (see the durability rules), or a free slot.
    #[error("not a message: a removed message or a free slot")]
    Freed,
    #[error("bad status record: {0}")]
    BadRecord(String),
}

/// What the sender asked of the message in MAIL FROM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// Reverse path; empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<String>,
    /// The sender asked for SMTPUTF8 (or, for local mail, the envelope or
    /// headers hold UTF-8).
    pub smtputf8: bool,
    /// The body has 8-bit octets (BODY=8BITMIME).
    pub eight_bit: bool,
    /// RET and ENVID from MAIL FROM (RFC 3461).
    pub dsn: Dsn,
    /// NOTIFY and ORCPT of each recipient, in the same order; empty when
    /// none was given.
    pub rcpt_dsn: Vec<RcptDsn>,
}

/// RFC 3461 RET: what a delivery status notification returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

impl Ret {
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "FULL",
            Ret::Hdrs => "HDRS",
        }
    }
}

/// The message's DSN parameters (RFC 3461 MAIL FROM: RET and ENVID).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dsn {
    pub ret: Option<Ret>,
    /// ENVID, decoded (printable ASCII).
    pub envid: Option<String>,
}

impl Dsn {
    /// Whether an ENVID may be kept and passed on (RFC 3461 4.4: printable
    /// ASCII, at most 100 characters), whichever way it came in.
    pub fn check(&self) -> Result<(), &'static str> {
        match &self.envid {
            Some(e) if e.is_empty() || e.len() > 100 => Err("ENVID must be 1 to 100 characters"),
            Some(e) if !e.chars().all(|c| c.is_ascii_graphic() || c == ' ') => {
                Err("ENVID must be printable ASCII")
            }
            _ => Ok(()),
        }
    }
}

/// RFC 3461 NOTIFY: which notifications a recipient's sender wants. Not
/// given (the default) means failures only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notify(u8);

impl Notify {
    pub const NEVER: Notify = Notify(1);
    pub const SUCCESS: Notify = Notify(2);
    pub const FAILURE: Notify = Notify(4);
    pub const DELAY: Notify = Notify(8);

    pub fn with(self, other: Notify) -> Notify {
        Notify(self.0 | other.0)
    }
    pub fn given(self) -> bool {
        self.0 != 0
    }
    fn has(self, other: Notify) -> bool {
        self.0 & other.0 != 0
    }
    /// A bounce is wanted: NOTIFY not given, or it says FAILURE.
    pub fn failure(self) -> bool {
        !self.given() || self.has(Notify::FAILURE)
    }
    pub fn success(self) -> bool {
        self.has(Notify::SUCCESS)
    }
    /// Only on request: relayq sends no delay notice by default.
    pub fn delay(self) -> bool {
        self.has(Notify::DELAY)
    }

    /// The RCPT parameter value (`NEVER` or `SUCCESS,FAILURE,DELAY`);
    /// `None` when not given.
    pub fn param(self) -> Option<String> {
        if !self.given() {
            return None;
        }
        if self.has(Notify::NEVER) {
            return Some("NEVER".into());
        }
        let words: Vec<&str> = [
            (Notify::SUCCESS, "SUCCESS"),
            (Notify::FAILURE, "FAILURE"),
            (Notify::DELAY, "DELAY"),
        ]
        .iter()
        .filter(|(n, _)| self.has(*n))
        .map(|(_, w)| *w)
        .collect();
        Some(words.join(","))
    }

    /// Parses `NEVER` or a comma list of SUCCESS, FAILURE, DELAY (any
    /// case); NEVER with anything else is an error (RFC 3461 4.1).
    pub fn parse(s: &str) -> Option<Notify> {
        let mut n = Notify::default();
        for word in s.split(',') {
            n = n.with(match word.trim().to_ascii_uppercase().as_str() {
                "NEVER" => Notify::NEVER,
                "SUCCESS" => Notify::SUCCESS,
                "FAILURE" => Notify::FAILURE,
                "DELAY" => Notify::DELAY,
                _ => return None,
            });
        }
        (n.given() && (!n.has(Notify::NEVER) || n == Notify::NEVER)).then_some(n)
    }
}

/// A recipient's DSN parameters (RFC 3461 RCPT TO: NOTIFY and ORCPT).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptDsn {
    pub notify: Notify,
    /// ORCPT's address, decoded: passed on as type `rfc822` when it is
    /// ASCII, `utf-8` (RFC 6533) otherwise.
    pub orcpt: Option<String>,
}

impl RcptDsn {
    /// Whether an ORCPT may be kept and passed on (RFC 3461 4.2: at most
    /// 500 characters; no control characters), whichever way it came in.
    pub fn check(&self) -> Result<(), &'static str> {
        match &self.orcpt {
            Some(o) if o.is_empty() || o.len() > 500 => Err("ORCPT must be 1 to 500 characters"),
            Some(o) if o.chars().any(char::is_control) => {
                Err("ORCPT must not hold control characters")
            }
            _ => Ok(()),
        }
    }
}

/// RFC 3461 4 xtext: `+XX` for `+`, `=`, and anything outside `!`..`~`.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// An ORCPT address as its type and value, for a RCPT parameter
/// (`{type};{value}`) or a report's Original-Recipient: `rfc822` and xtext
/// for ASCII, else `utf-8` and RFC 6533's utf-8-addr-xtext (ASCII only,
/// `\x{HEX}` for what is not printable ASCII, `+`, `=` or `\`).
pub fn orcpt(addr: &str) -> (&'static str, String) {
    if addr.is_ascii() {
        return ("rfc822", xtext(addr));
    }
    let mut out = String::with_capacity(addr.len() + 8);
    for c in addr.chars() {
        if c.is_ascii_graphic() && !"+=\\".contains(c) {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
        }
    }
    ("utf-8", out)
}

/// Decodes xtext; `None` when malformed.
pub fn unxtext(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where one recipient stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptState {
    Pending,
    Delivered,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptStatus {
    pub address: String,
    pub state: RcptState,
    /// The last reply or error for this recipient, verbatim, one line.
    pub last_reply: Option<String>,
    /// NOTIFY and ORCPT as the sender gave them.
    pub dsn: RcptDsn,
}

/// A status record appended after the end marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The upstream accepted recipient `idx` (durable before it is trusted).
    Delivered {
        idx: usize,
        at_ms: u64,
        reply: String,
    },
    /// Recipient `idx` failed for good and a bounce has been queued.
    Failed {
        idx: usize,
        at_ms: u64,
        reply: String,
    },
    /// Recipient `idx` was deferred with this reason.
    Deferred {
        idx: usize,
        at_ms: u64,
        reason: String,
    },
    /// The message has been tried `attempts` times; next try not before.
    Attempt { attempts: u32, next_ms: u64 },
    /// A delay notice (NOTIFY=DELAY) has been queued: none again.
    Warned { at_ms: u64 },
    /// The daemon has logged the accepted line of a message the `sendmail`
    /// command queued itself (one with a `submitter`).
    Accepted { at_ms: u64 },
}

/// Everything about a queued message except its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub id: String,
    pub arrival_ms: u64,
    pub sender: String,
    pub smtputf8: bool,
    pub eight_bit: bool,
    pub recipients: Vec<RcptStatus>,
    /// Length of the message content in bytes.
    pub size: u64,
    /// Byte offset of the content in the file.
    pub body_offset: u64,
    pub attempts: u32,
    pub next_attempt_ms: Option<u64>,
    /// The file's permanent name in `slots/`, when it is a reused file.
    pub slot: Option<String>,
    pub dsn: Dsn,
    /// A delay notice was sent ([`Record::Warned`]).
    pub warned: bool,
    /// The uid of the local user whose `sendmail` wrote this file straight
    /// into `queue/` (root or the spool's owner); `None` for everything the
    /// daemon wrote.
    pub submitter: Option<u32>,
    /// The daemon has logged this message's accepted line (only tracked
    /// for files with a `submitter`: the daemon logs its own at once).
    pub accepted_logged: bool,
}

impl Meta {
    /// The envelope as it was queued (pending and done recipients alike).
    pub fn envelope(&self) -> Envelope {
        Envelope {
            sender: self.sender.clone(),
            recipients: self.recipients.iter().map(|r| r.address.clone()).collect(),
            smtputf8: self.smtputf8,
            eight_bit: self.eight_bit,
            dsn: self.dsn.clone(),
            rcpt_dsn: self.recipients.iter().map(|r| r.dsn.clone()).collect(),
        }
    }
}

impl Meta {
    pub fn pending(&self) -> impl Iterator<Item = (usize, &RcptStatus)> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RcptState::Pending)
    }

    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }
}

/// Makes a value safe for a line-oriented record: no CR, LF or NUL.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if matches!(c, '\r' | '\n' | '\0') {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// A whole new queue file: header, content and an end marker that carries
/// the CRC-32 of everything before it, so a write torn by a crash is
/// recognised (a reused slot file may still hold an older message's bytes).
/// The spool writes the pieces ([`encode_around`]); tests want it whole.
#[cfg(test)]
pub fn encode_message(
    id: &str,
    arrival_ms: u64,
    env: &Envelope,
    message: &[u8],
    slot: Option<&str>,
) -> Vec<u8> {
    let (mut f, end) = encode_around(id, arrival_ms, env, message, Origin::slot(slot));
    f.extend_from_slice(message);
    f.extend_from_slice(&end);
    f
}

/// Who writes a new queue file: the header lines that say so.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin<'a> {
    /// The daemon's reusable file: its permanent name in `slots/`.
    pub slot: Option<&'a str>,
    /// The `sendmail` command writing `queue/` itself: the submitter's uid.
    pub submitter: Option<u32>,
}

impl<'a> Origin<'a> {
    pub fn slot(slot: Option<&'a str>) -> Self {
        Origin {
            slot,
            submitter: None,
        }
    }
}

/// [`encode_message`] without copying the content: the header and the end
/// marker, to be written before and after it.
pub fn encode_around(
    id: &str,
    arrival_ms: u64,
    env: &Envelope,
    message: &[u8],
    origin: Origin<'_>,
) -> (Vec<u8>, Vec<u8>) {
    let header = encode_header_with_origin(id, arrival_ms, env, message.len() as u64, origin);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    crc.update(message);
    let end = format!("end {:08x}\n", crc.finalize()).into_bytes();
    (header, end)
}

/// The header of a new queue file, up to and including the empty line.
pub fn encode_header(id: &str, arrival_ms: u64, env: &Envelope, size: u64) -> Vec<u8> {
    encode_header_with_origin(id, arrival_ms, env, size, Origin::default())
}

fn encode_header_with_origin(
    id: &str,
    arrival_ms: u64,
    env: &Envelope,
    size: u64,
    origin: Origin<'_>,
) -> Vec<u8> {
    let mut h = String::with_capacity(128 + 64 * env.recipients.len());
    let _ = writeln!(h, "{MAGIC}");
    let _ = writeln!(h, "id {id}");
    if let Some(slot) = origin.slot {
        let _ = writeln!(h, "slot {slot}");
    }
    if let Some(uid) = origin.submitter {
        let _ = writeln!(h, "submitter {uid}");
    }
    let _ = writeln!(h, "arrival {arrival_ms}");
    let _ = writeln!(h, "sender {}", one_line(&env.sender));
    let mut flags = Vec::new();
    if env.smtputf8 {
        flags.push("smtputf8");
    }
    if env.eight_bit {
        flags.push("8bitmime");
    }
    let _ = writeln!(
        h,
        "flags {}",
        if flags.is_empty() {
            "-".to_string()
        } else {
            flags.join(",")
        }
    );
    for r in &env.recipients {
        let _ = writeln!(h, "rcpt {}", one_line(r));
    }
    // Written only when the sender gave DSN parameters, so a file without
    // them reads the same to versions that do not know these lines.
    if let Some(ret) = env.dsn.ret {
        let _ = writeln!(h, "dsn-ret {}", ret.as_str());
    }
    if let Some(envid) = &env.dsn.envid {
        let _ = writeln!(h, "dsn-envid {}", xtext(envid));
    }
    for (i, d) in env.rcpt_dsn.iter().enumerate() {
        if d.notify.given() || d.orcpt.is_some() {
            let notify = d.notify.param().unwrap_or_else(|| "-".into());
            let orcpt = d.orcpt.as_deref().map(xtext).unwrap_or_else(|| "-".into());
            let _ = writeln!(h, "dsn-rcpt {i} {notify} {orcpt}");
        }
    }
    let _ = writeln!(h, "size {size}");
    h.push('\n');
    h.into_bytes()
}

pub fn encode_record(rec: &Record) -> Vec<u8> {
    let line = match rec {
        Record::Delivered { idx, at_ms, reply } => {
            format!("delivered {idx} {at_ms} {}\n", one_line(reply))
        }
        Record::Failed { idx, at_ms, reply } => {
            format!("failed {idx} {at_ms} {}\n", one_line(reply))
        }
        Record::Deferred { idx, at_ms, reason } => {
            format!("deferred {idx} {at_ms} {}\n", one_line(reason))
        }
        Record::Attempt { attempts, next_ms } => format!("attempt {attempts} {next_ms}\n"),
        Record::Warned { at_ms } => format!("warned {at_ms}\n"),
        Record::Accepted { at_ms } => format!("accepted {at_ms}\n"),
    };
    line.into_bytes()
}

/// Parses the header at the start of `buf`. Returns the partial [`Meta`]
/// (recipients all pending) and the header's length, or `Ok(None)` when
/// `buf` ends before the header does.
pub fn decode_header(buf: &[u8]) -> Result<Option<Meta>, FormatError> {
    if buf.first() == Some(&0) {
        return Err(FormatError::Freed);
    }
    let Some(end) = find_blank_line(buf) else {
        return Ok(None);
    };
    let text =
        std::str::from_utf8(&buf[..end]).map_err(|_| FormatError::BadHeader("not UTF-8".into()))?;
    let mut lines = text.split('\n');
    if lines.next() != Some(MAGIC) {
        return Err(FormatError::BadMagic);
    }
    let mut id = None;
    let mut slot = None;
    let mut submitter = None;
    let mut arrival = None;
    let mut sender = None;
    let mut size = None;
    let (mut smtputf8, mut eight_bit) = (false, false);
    let mut recipients = Vec::new();
    let mut dsn = Dsn::default();
    let mut rcpt_dsn: Vec<(usize, RcptDsn)> = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (key, value) = line
            .split_once(' ')
            .ok_or_else(|| FormatError::BadHeader(line.into()))?;
        match key {
            "id" => id = Some(value.to_string()),
            "slot" => slot = Some(value.to_string()),
            "submitter" => {
                let uid = parse_num(value, line)?;
                submitter =
                    Some(u32::try_from(uid).map_err(|_| FormatError::BadHeader(line.into()))?);
            }
            "arrival" => arrival = Some(parse_num(value, line)?),
            "sender" => sender = Some(value.to_string()),
            "flags" => {
                for f in value.split(',') {
                    match f {
                        "smtputf8" => smtputf8 = true,
                        "8bitmime" => eight_bit = true,
                        "-" => {}
                        _ => return Err(FormatError::BadHeader(line.into())),
                    }
                }
            }
            "rcpt" => recipients.push(RcptStatus {
                address: value.to_string(),
                state: RcptState::Pending,
                last_reply: None,
                dsn: RcptDsn::default(),
            }),
            "dsn-ret" => {
                dsn.ret = Some(match value {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err(FormatError::BadHeader(line.into())),
                })
            }
            "dsn-envid" => {
                dsn.envid = Some(unxtext(value).ok_or_else(|| FormatError::BadHeader(line.into()))?)
            }
            "dsn-rcpt" => rcpt_dsn
                .push(decode_rcpt_dsn(value).ok_or_else(|| FormatError::BadHeader(line.into()))?),
            "size" => size = Some(parse_num(value, line)?),
            _ => return Err(FormatError::BadHeader(line.into())),
        }
    }
    if recipients.is_empty() {
        return Err(FormatError::Missing("rcpt"));
    }
    for (i, d) in rcpt_dsn {
        recipients
            .get_mut(i)
            .ok_or_else(|| FormatError::BadHeader(format!("dsn-rcpt {i}: no such recipient")))?
            .dsn = d;
    }
    Ok(Some(Meta {
        id: id.ok_or(FormatError::Missing("id"))?,
        arrival_ms: arrival.ok_or(FormatError::Missing("arrival"))?,
        sender: sender.ok_or(FormatError::Missing("sender"))?,
        smtputf8,
        eight_bit,
        recipients,
        size: size.ok_or(FormatError::Missing("size"))?,
        body_offset: (end + 2) as u64,
        attempts: 0,
        next_attempt_ms: None,
        slot,
        dsn,
        warned: false,
        submitter,
        accepted_logged: false,
    }))
}

/// Applies the tail of a file (from the end of the body on): the end
/// marker, then status records, up to the first NUL (a reused file is
/// zero-filled past its content). A last record without its newline is a
/// write torn by a crash and is ignored; it was never relied upon.
/// Returns the checksum the end marker carries, if any.
pub fn apply_tail(meta: &mut Meta, tail: &[u8]) -> Result<Option<u32>, FormatError> {
    let (crc, rest) = split_end(tail)?;
    let rest = &rest[..records_len(rest)];
    let text = String::from_utf8_lossy(rest);
    for line in text.lines() {
        apply_record(meta, line)?;
    }
    Ok(crc)
}

/// Length of the whole records in `rest` (after the end marker): up to the
/// last newline before the first NUL. New records are written there.
pub fn records_len(rest: &[u8]) -> usize {
    let used = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    rest[..used]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1)
}

/// Splits the end marker (`end\n` or `end <crc32 hex>\n`) off the tail.
pub fn split_end(tail: &[u8]) -> Result<(Option<u32>, &[u8]), FormatError> {
    if let Some(rest) = tail.strip_prefix(END) {
        return Ok((None, rest));
    }
    let rest = tail.strip_prefix(b"end ").ok_or(FormatError::NoEndMarker)?;
    let hex = rest.get(..8).ok_or(FormatError::NoEndMarker)?;
    if rest.get(8) != Some(&b'\n') {
        return Err(FormatError::NoEndMarker);
    }
    let crc = std::str::from_utf8(hex)
        .ok()
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or(FormatError::NoEndMarker)?;
    Ok((Some(crc), &rest[9..]))
}

fn apply_record(meta: &mut Meta, line: &str) -> Result<(), FormatError> {
    let bad = || FormatError::BadRecord(line.chars().take(200).collect());
    let mut parts = line.splitn(4, ' ');
    let kind = parts.next().ok_or_else(bad)?;
    if kind == "warned" {
        meta.warned = true;
        return Ok(());
    }
    if kind == "attempt" {
        meta.attempts = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        meta.next_attempt_ms = Some(parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?);
        return Ok(());
    }
    if kind == "accepted" {
        let _at: u64 = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        meta.accepted_logged = true;
        return Ok(());
    }
    let idx: usize = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let _at: u64 = parts.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let text = parts.next().unwrap_or("").to_string();
    let rcpt = meta.recipients.get_mut(idx).ok_or_else(bad)?;
    match kind {
        "delivered" => rcpt.state = RcptState::Delivered,
        "failed" => rcpt.state = RcptState::Failed,
        // A deferral never undoes a final state: records are appended in
        // order, but be strict about it anyway.
        "deferred" => {}
        _ => return Err(bad()),
    }
    rcpt.last_reply = Some(text);
    Ok(())
}

/// `<idx> <notify or -> <orcpt xtext or ->`.
fn decode_rcpt_dsn(value: &str) -> Option<(usize, RcptDsn)> {
    let mut parts = value.split(' ');
    let idx = parts.next()?.parse().ok()?;
    let notify = match parts.next()? {
        "-" => Notify::default(),
        n => Notify::parse(n)?,
    };
    let orcpt = match parts.next()? {
        "-" => None,
        o => Some(unxtext(o)?),
    };
    parts
        .next()
        .is_none()
        .then_some((idx, RcptDsn { notify, orcpt }))
}

fn parse_num(value: &str, line: &str) -> Result<u64, FormatError> {
    value
        .parse()
        .map_err(|_| FormatError::BadHeader(line.into()))
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

/// Decodes a whole file held in memory, checking its checksum when it has
/// one.
pub fn decode(file: &[u8]) -> Result<(Meta, &[u8]), FormatError> {
    let mut meta = decode_header(file)?.ok_or(FormatError::TruncatedHeader)?;
    let start = usize::try_from(meta.body_offset).map_err(|_| FormatError::TruncatedHeader)?;
    let end = start
        .checked_add(usize::try_from(meta.size).unwrap_or(usize::MAX))
        .filter(|&e| e <= file.len())
        .ok_or(FormatError::TruncatedBody {
            expected: meta.size,
            actual: file.len().saturating_sub(start) as u64,
        })?;
    if let Some(crc) = apply_tail(&mut meta, &file[end..])?
        && crc32fast::hash(&file[..end]) != crc
    {
        return Err(FormatError::BadChecksum);
    }
    Ok((meta, &file[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Envelope, Vec<u8>) {
        let env = Envelope {
            sender: "app@example.com".into(),
            recipients: vec!["a@example.net".into(), "ü@例え.jp".into()],
            smtputf8: true,
            eight_bit: false,
            ..Envelope::default()
        };
        (
            env,
            b"Subject: hi\r\n\r\nbody\n\nwith blank lines\r\n".to_vec(),
        )
    }

    fn file(env: &Envelope, body: &[u8], records: &[Record]) -> Vec<u8> {
        let mut f = encode_header("01ID", 1234, env, body.len() as u64);
        f.extend_from_slice(body);
        f.extend_from_slice(END);
        for r in records {
            f.extend_from_slice(&encode_record(r));
        }
        f
    }

    #[test]
    fn submitter_and_accepted_record_round_trip() {
        let (env, body) = sample();
        let origin = Origin {
            slot: None,
            submitter: Some(33),
        };
        let (mut f, end) = encode_around("01ID", 7, &env, &body, origin);
        f.extend_from_slice(&body);
        f.extend_from_slice(&end);
        let (meta, _) = decode(&f).unwrap();
        assert_eq!((meta.submitter, meta.accepted_logged), (Some(33), false));
        f.extend_from_slice(&encode_record(&Record::Accepted { at_ms: 9 }));
        let (meta, got) = decode(&f).unwrap();
        assert_eq!(got, &body[..]);
        assert_eq!((meta.submitter, meta.accepted_logged), (Some(33), true));
        // Files the daemon writes name no submitter.
        let (meta, _) = decode(&encode_message("01ID", 7, &env, &body, None)).unwrap();
        assert_eq!(meta.submitter, None);
        let bad = String::from_utf8(f.clone())
            .unwrap()
            .replace("submitter 33", "submitter -1");
        assert!(decode(bad.as_bytes()).is_err());
    }

    #[test]
    fn round_trip_with_records() {
        let (env, body) = sample();
        let f = file(
            &env,
            &body,
            &[
                Record::Deferred {
                    idx: 0,
                    at_ms: 5,
                    reason: "451 4.3.0 try\r\nlater".into(),
                },
                Record::Delivered {
                    idx: 1,
                    at_ms: 6,
                    reply: "250 ok".into(),
                },
                Record::Attempt {
                    attempts: 2,
                    next_ms: 99,
                },
            ],
        );
        let (meta, got) = decode(&f).unwrap();
        assert_eq!(got, &body[..]);
        assert_eq!(meta.sender, env.sender);
        assert!(meta.smtputf8 && !meta.eight_bit);
        assert_eq!(meta.recipients[0].state, RcptState::Pending);
        assert_eq!(
            meta.recipients[0].last_reply.as_deref(),
            Some("451 4.3.0 try  later")
        );
        assert_eq!(meta.recipients[1].state, RcptState::Delivered);
        assert_eq!((meta.attempts, meta.next_attempt_ms), (2, Some(99)));
        assert!(!meta.is_done());
    }

    /// DSN parameters survive the spool; a file without them (every file
    /// an older version wrote) reads with none.
    #[test]
    fn dsn_parameters_round_trip() {
        let (mut env, body) = sample();
        env.dsn = Dsn {
            ret: Some(Ret::Hdrs),
            envid: Some("QQ314159 x+y=z".into()),
        };
        env.rcpt_dsn = vec![
            RcptDsn {
                notify: Notify::SUCCESS.with(Notify::DELAY),
                orcpt: Some("Bob@Example.COM".into()),
            },
            RcptDsn {
                notify: Notify::NEVER,
                orcpt: None,
            },
        ];
        let mut f = file(&env, &body, &[]);
        f.extend_from_slice(&encode_record(&Record::Warned { at_ms: 9 }));
        let text = String::from_utf8_lossy(&f);
        assert!(text.contains("dsn-envid QQ314159+20x+2By+3Dz\n"), "{text}");
        let (meta, got) = decode(&f).unwrap();
        assert_eq!(got, &body[..]);
        assert_eq!(meta.dsn, env.dsn);
        assert_eq!(meta.envelope(), env);
        assert!(meta.warned);
        assert!(!meta.recipients[1].dsn.notify.failure());
        assert!(meta.recipients[0].dsn.notify.success());

        let (plain, body) = sample();
        let f = file(&plain, &body, &[]);
        assert!(!String::from_utf8_lossy(&f).contains("dsn-"));
        let (meta, _) = decode(&f).unwrap();
        assert_eq!(meta.dsn, Dsn::default());
        assert!(meta.recipients.iter().all(|r| r.dsn.notify.failure()));
        assert!(!meta.warned);
        // A damaged DSN line is an error, not a guess.
        let bad = String::from_utf8_lossy(&file(&env, &body, &[]))
            .replace("dsn-rcpt 1 NEVER", "dsn-rcpt 7 NEVER");
        assert!(decode(bad.as_bytes()).is_err());
    }

    #[test]
    fn torn_last_record_is_ignored() {
        let (env, body) = sample();
        let mut f = file(
            &env,
            &body,
            &[Record::Delivered {
                idx: 0,
                at_ms: 1,
                reply: "250".into(),
            }],
        );
        f.extend_from_slice(b"delivered 1 2 25");
        let (meta, _) = decode(&f).unwrap();
        assert_eq!(meta.recipients[0].state, RcptState::Delivered);
        assert_eq!(meta.recipients[1].state, RcptState::Pending);
    }

    #[test]
    fn checksummed_file_with_padding() {
        let (env, body) = sample();
        let mut f = encode_message("01ID", 7, &env, &body, Some("SLOT"));
        assert!(f.ends_with(b"\n"));
        let end = f.len();
        f.extend_from_slice(&encode_record(&Record::Delivered {
            idx: 0,
            at_ms: 1,
            reply: "250".into(),
        }));
        f.resize(f.len() + 3000, 0);
        // Stale bytes after the zeros are not records.
        f.extend_from_slice(b"delivered 1 1 stale\n");
        let (meta, got) = decode(&f).unwrap();
        assert_eq!(got, &body[..]);
        assert_eq!(meta.slot.as_deref(), Some("SLOT"));
        assert_eq!(meta.recipients[0].state, RcptState::Delivered);
        assert_eq!(meta.recipients[1].state, RcptState::Pending);
        // Any flipped byte before the end marker is caught.
        for i in (0..end - 15).step_by(7) {
            let mut g = f.clone();
            g[i] ^= 0x20;
            assert!(decode(&g).is_err(), "flip at {i} accepted");
        }
        let mut g = f.clone();
        g[0] = 0;
        assert_eq!(decode(&g).unwrap_err(), FormatError::Freed);
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let (env, body) = sample();
        let f = file(&env, &body, &[]);
        assert!(matches!(decode(b"hello\n\n"), Err(FormatError::BadMagic)));
        for cut in 0..f.len() {
            assert!(decode(&f[..cut]).is_err(), "truncated at {cut} accepted");
        }
        let mut g = f.clone();
        g.extend_from_slice(b"delivered 7 1 out of range\n");
        assert!(matches!(decode(&g), Err(FormatError::BadRecord(_))));
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        fn address() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9._+\\-\u{e9}\u{4f8b}]{1,20}@[a-z0-9.\\-]{1,20}"
        }

        fn record() -> impl Strategy<Value = Record> {
            prop_oneof![
                (0usize..3, any::<u64>(), ".{0,40}")
                    .prop_map(|(idx, at_ms, reply)| Record::Delivered { idx, at_ms, reply }),
                (0usize..3, any::<u64>(), ".{0,40}")
                    .prop_map(|(idx, at_ms, reply)| Record::Failed { idx, at_ms, reply }),
                (0usize..3, any::<u64>(), ".{0,40}")
                    .prop_map(|(idx, at_ms, reason)| Record::Deferred { idx, at_ms, reason }),
                (any::<u32>(), any::<u64>())
                    .prop_map(|(attempts, next_ms)| Record::Attempt { attempts, next_ms }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

            #[test]
            fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
                let _ = decode(&bytes);
            }

            #[test]
            fn decoding_a_damaged_file_never_panics(cut in 0usize..400, flip in 0usize..400, byte in any::<u8>()) {
                let env = Envelope { sender: "a@b.c".into(), recipients: vec!["d@e.f".into(), "g@h.i".into()], ..Envelope::default() };
                let mut f = encode_header("01ID", 7, &env, 5);
                f.extend_from_slice(b"hello");
                f.extend_from_slice(END);
                f.extend_from_slice(&encode_record(&Record::Delivered { idx: 1, at_ms: 9, reply: "250 ok".into() }));
                if flip < f.len() { f[flip] = byte; }
                f.truncate(cut.min(f.len()));
                let _ = decode(&f);
            }

            #[test]
            fn round_trip(sender in prop_oneof![Just(String::new()), address()],
                          recipients in proptest::collection::vec(address(), 3..6),
                          body in proptest::collection::vec(any::<u8>(), 0..512),
                          smtputf8 in any::<bool>(), eight_bit in any::<bool>(),
                          records in proptest::collection::vec(record(), 0..8)) {
                let env = Envelope { sender, recipients, smtputf8, eight_bit, ..Envelope::default() };
                let mut f = encode_header("01ID", 42, &env, body.len() as u64);
                f.extend_from_slice(&body);
                f.extend_from_slice(END);
                for r in &records { f.extend_from_slice(&encode_record(r)); }
                let (meta, got) = decode(&f).unwrap();
                prop_assert_eq!(got, &body[..]);
                prop_assert_eq!(&meta.sender, &env.sender);
                prop_assert_eq!(meta.recipients.iter().map(|r| r.address.clone()).collect::<Vec<_>>(), env.recipients.clone());
                prop_assert_eq!((meta.smtputf8, meta.eight_bit, meta.arrival_ms), (smtputf8, eight_bit, 42));
                // The last final record for a recipient decides its state.
                for (i, r) in meta.recipients.iter().enumerate() {
                    let last = records.iter().rev().find_map(|rec| match rec {
                        Record::Delivered { idx, .. } if *idx == i => Some(RcptState::Delivered),
                        Record::Failed { idx, .. } if *idx == i => Some(RcptState::Failed),
                        _ => None,
                    });
                    prop_assert_eq!(&r.state, &last.unwrap_or(RcptState::Pending));
                }
            }
        }
    }
}
