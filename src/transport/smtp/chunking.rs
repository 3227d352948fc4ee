//! CHUNKING (RFC 3030) with PIPELINING: whole transactions streamed one
//! behind the other.
//!
//! With DATA every message waits for a 354 before its body can go, so even
//! pipelined (see `pipeline`) a connection carries one message per round
//! trip. BDAT needs no go-ahead: `BDAT <size> LAST` is followed at once by
//! the message's exact bytes, so a message's MAIL, RCPTs, BDAT and body go
//! out in one write, and the next message's right behind it, before any
//! reply came back. [`Connection::send_chunked`] writes one such
//! transaction; [`Connection::settle_chunked`] reads the replies to the
//! oldest one still unanswered. The caller bounds how many are in flight.
//!
//! Each transaction is judged from its own replies, exactly as
//! [`Connection::send`] would judge it: a refused sender, refused
//! recipients, a refused message. A server must read and discard a BDAT
//! chunk it refuses (RFC 3030 section 3; Postfix does, and also accepts
//! whole pipelined transactions, see its `bdat_cmd`), so a refusal of one
//! message never desynchronises the ones behind it. After a refused BDAT
//! "the resulting state is indeterminate" (RFC 3030): since the next
//! transaction goes out before that is known, every transaction written
//! while another is unanswered starts with RSET.
//!
//! A transaction that owes a RSET with nothing in flight (the first on a
//! connection kept from the idle pool, or the next after a refused one
//! on a connection whose replies are all read) sends that RSET alone and
//! waits for its reply before writing anything of the message, as
//! Postfix's RSET probe does before it reuses a cached connection
//! (`smtp_reuse_common` in `smtp_reuse.c`: `smtp_rset`, one round trip,
//! and the session is dropped if the RSET fails). Pipelined with the
//! message instead, a lost RSET reply would not tell a connection that
//! went stale while idle (nothing taken, retry at once) from one the
//! relay read to the end, took the message on and then dropped without
//! flushing its replies, as Postfix's smtpd with PIPELINING does (it
//! flushes only once it has read all that came): the message would
//! arrive twice with nobody told. Proven alive first, a connection that
//! then loses a reply leaves the message in doubt, said so; one found
//! dead at the RSET took nothing, and costs a new connection only. The
//! round trip is paid once per reuse (DATA pays it for every message,
//! waiting for 354); messages written behind one in flight go out
//! without waiting, as before.
//!
//! A reply that can't be read (the line dropped, a timeout, garbage) or a
//! 421 ends the stream: the transactions behind it are unanswered, and
//! [`Connection::settle_chunked`] says so ([`SmtpError::Unusable`]) without
//! reading. What was answered before stays answered: the caller records
//! each outcome as it reads it.
//!
//! The body goes as stored: no dot-stuffing (BDAT counts octets), and
//! with every line end CRLF and a CRLF at the end, exactly the octets DATA
//! sends before its dot (`wire::DataEncoder::chunk`).

use super::wire::DataEncoder;
use super::{
    BODY_CHUNK, Connection, Envelope, EnvelopeReplies, PIPELINE_BATCH, Planned, Reply, SmtpError,
    Stage, Step, TxnReport,
};
use tracing::Instrument;

/// A transaction written with BDAT whose replies are not read yet.
#[must_use = "the replies to this transaction must be read: Connection::settle_chunked"]
#[derive(Debug)]
pub struct Chunked {
    steps: Vec<Step>,
    replies: EnvelopeReplies,
}

/// What [`Connection::send_chunked`] did with a message.
#[derive(Debug)]
pub enum Streamed {
    /// Written: read its replies with [`Connection::settle_chunked`], in
    /// the order the transactions were written.
    InFlight(Chunked),
    /// Nothing was written and this is its report, as [`Connection::send`]
    /// would give it: no recipient can be written, or the sender can't.
    Known(Result<TxnReport, SmtpError>),
    /// It can't go in the stream (the server does not offer CHUNKING and
    /// PIPELINING, or its envelope is more than one group of commands):
    /// send it with [`Connection::send`] once nothing is in flight.
    NotStreamable,
    /// Nothing of it was taken, and the session is over: the RSET owed
    /// before it got no reply, or a 421 or a refusal, before anything of
    /// the message was written (a kept connection that went stale while
    /// idle, [`SmtpError::connection_was_stale`]), or the write failed
    /// part way (the server discards a chunk cut short). The replies to
    /// the transactions written before it may still be read.
    Lost(SmtpError),
}

impl Connection {
    /// Whether whole transactions can be streamed with BDAT.
    pub fn streams(&self) -> bool {
        self.caps.chunking && self.caps.pipelining && !self.broken
    }

    /// Transactions written and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Nothing more can come of this connection: it can't take a new
    /// transaction, and no reply to one in flight can still be read (a
    /// failed write leaves those written before it readable).
    pub fn is_spent(&self) -> bool {
        self.broken && (self.in_flight == 0 || self.replies_lost)
    }

    /// Writes one whole transaction (MAIL, RCPTs, "BDAT n LAST" and the
    /// body) without waiting for any reply. `body` has CRLF line endings.
    pub async fn send_chunked(&mut self, env: &Envelope<'_>, body: &[u8]) -> Streamed {
        // A DATA transaction pipelined behind the previous message can't be
        // mixed with a stream.
        if self.awaiting_body || self.awaiting_replies || self.awaiting_dot {
            self.abandon_open();
        }
        if self.broken {
            return Streamed::Lost(SmtpError::Unusable);
        }
        if !self.streams() {
            return Streamed::NotStreamable;
        }
        let size = DataEncoder::chunk_len(body);
        if self.pending_rset && self.in_flight == 0 {
            // Prove the connection alive before a body goes on it (see the
            // module comment): the RSET alone, and its reply.
            self.pending_rset = false;
            let span = self.span.clone();
            if let Err(e) = self.rset_now().instrument(span).await {
                tracing::debug!(parent: &self.span, "no good reply to the RSET before a stream ({e}); nothing written");
                return Streamed::Lost(e);
            }
        }
        // What is unanswered may leave a transaction open (a refused BDAT).
        let rset = self.in_flight > 0;
        let (mut steps, replies) = match self.plan(env, size, rset) {
            Err(e) => return Streamed::Known(Err(e)),
            Ok(Planned::Nothing(report)) => return Streamed::Known(Ok(report)),
            Ok(Planned::Steps(steps, replies)) => (steps, replies),
        };
        if steps.len() > PIPELINE_BATCH {
            return Streamed::NotStreamable;
        }
        if let Some(last) = steps.last_mut() {
            *last = Step::Bdat(format!("BDAT {size} LAST\r\n"));
        }
        self.pending_rset = false;
        let span = self.span.clone();
        let written = self
            .write_chunked(&steps, body, size)
            .instrument(span)
            .await;
        if let Err(e) = written {
            self.broken = true;
            return Streamed::Lost(e);
        }
        self.in_flight += 1;
        Streamed::InFlight(Chunked { steps, replies })
    }

    /// The commands and the chunk (`size` octets), in pieces of about
    /// `BODY_CHUNK` (a small message in one write), each under
    /// `data_timeout`.
    async fn write_chunked(
        &mut self,
        steps: &[Step],
        body: &[u8],
        size: usize,
    ) -> Result<(), SmtpError> {
        let commands: String = steps.iter().map(Step::line).collect();
        let shown = format!("{commands}<{size} octets of message>");
        let mut buf = Vec::with_capacity(commands.len() + size.min(BODY_CHUNK) + 2);
        buf.extend_from_slice(commands.as_bytes());
        let mut encoder = DataEncoder::chunk(body);
        let mut first = true;
        loop {
            let more = encoder.fill(&mut buf, BODY_CHUNK);
            let label = if first {
                shown.as_str()
            } else {
                "<message chunk>"
            };
            self.wire
                .write(&buf, label, Stage::Bdat, self.data_timeout)
                .await?;
            buf.clear();
            first = false;
            if !more {
                return Ok(());
            }
        }
    }

    /// Reads the replies to the oldest transaction in flight and reports
    /// it as [`Connection::send`] would. [`SmtpError::Unusable`] means its
    /// replies will never be read (an earlier one's could not be, or the
    /// session was given up): the server may or may not have taken it.
    pub async fn settle_chunked(&mut self, chunked: Chunked) -> Result<TxnReport, SmtpError> {
        if self.replies_lost || self.in_flight == 0 {
            return Err(SmtpError::Unusable);
        }
        self.in_flight -= 1;
        let span = self.span.clone();
        let result = self
            .read_chunked(chunked)
            .instrument(span)
            .await
            .map_err(in_doubt);
        if let Err(e) = &result
            && !e.leaves_session_in_sync()
        {
            self.replies_lost = true;
            self.broken = true;
        }
        result
    }

    async fn read_chunked(&mut self, chunked: Chunked) -> Result<TxnReport, SmtpError> {
        let Chunked { steps, mut replies } = chunked;
        self.read_group(&steps, &mut replies).await?;
        let accepted = replies.any_rcpt_accepted();
        let data = replies.data.take();
        let clean =
            !replies.mail_refused() && accepted && data.as_ref().is_some_and(Reply::is_positive);
        if !clean {
            // RFC 3030: after a refused BDAT, RSET before anything else.
            self.pending_rset = true;
        }
        if let Some(reply) = data.as_ref().filter(|r| r.is_intermediate()) {
            return Err(SmtpError::Protocol {
                stage: Stage::Bdat,
                detail: format!("unexpected reply to BDAT: {}", reply.one_line()),
            });
        }
        let rcpts = replies.rcpt_replies()?;
        Ok(TxnReport {
            rcpts,
            // Refused or not, a chunk sent for no accepted recipient
            // delivered nothing.
            data: if accepted { data } else { None },
        })
    }
}

/// The whole transaction was written before any of its replies was read,
/// on a connection that had just answered (the RSET probe, the login, or
/// the transactions before it), so any reply lost, even a RSET's, leaves
/// the doubt of one lost after the end of data: the server may have taken
/// the message (a server that flushes its replies only once it has read
/// all that came, as Postfix does with PIPELINING, sends none of them
/// before the line drops), and it says so ("may be sent more than once").
/// No transaction written on its own starts with RSET (`send_chunked`
/// waits for that reply first), so none of these is a stale connection's.
fn in_doubt(e: SmtpError) -> SmtpError {
    match e {
        SmtpError::Closed { .. } => SmtpError::Closed { stage: Stage::Dot },
        SmtpError::Io { source, .. } => SmtpError::Io {
            stage: Stage::Dot,
            source,
        },
        SmtpError::Timeout { after, .. } => SmtpError::Timeout {
            stage: Stage::Dot,
            after,
        },
        e => e,
    }
}
