//! Pipelining the next message behind the end of data (RFC 2920).
//!
//! On a kept connection each message would cost two round trips: the
//! envelope (RSET, MAIL, RCPT, DATA) waits for 354, then the body waits
//! for its 250. RFC 2920 lets message content start a group, and DATA end
//! one, so the next message's MAIL, RCPTs and DATA can follow this body's
//! final dot in the same write: one round trip per message, answered by
//! [250 for this one, 250, 250..., 354 for the next]. No RSET is needed
//! between them: the reply to the dot ends the transaction either way.
//!
//! This message's outcome is returned as soon as the reply to its dot is
//! read (so the caller can record it at once); the replies to the next
//! envelope are read by [`Connection::settle_next`]. If it got 354 the next
//! transaction is *open*: the server waits for its body, which
//! [`Connection::send_opened`] sends (with the one after it, again). After
//! 354 everything up to a dot is message text, so an open transaction can't
//! be withdrawn by any command; anything else done with the connection
//! (or with replies still unread) closes it, and the server must then
//! discard the unfinished message. When the next transaction ends without a
//! body (MAIL or every RCPT refused, DATA refused), a RSET is owed as after
//! any such transaction.

use tracing::Instrument;

use super::wire::DataEncoder;
use super::{
    BODY_CHUNK, Connection, Envelope, EnvelopeReplies, PIPELINE_BATCH, Planned, Reply, Settled,
    SmtpError, Stage, Step, TxnReport,
};

/// What [`Connection::send_then`] and [`Connection::send_opened`] did.
#[derive(Debug)]
pub struct Sent {
    /// This transaction's outcome, as [`Connection::send`] reports it.
    pub this: Result<TxnReport, SmtpError>,
    /// What became of the next one.
    pub next: NextTxn,
}

impl Sent {
    pub(super) fn alone(this: Result<TxnReport, SmtpError>) -> Sent {
        Sent {
            this,
            next: NextTxn::NotSent,
        }
    }
}

/// The fate of a transaction pipelined behind another one's end of data.
#[derive(Debug)]
pub enum NextTxn {
    /// Nothing of it was written: none was given, the server does not
    /// pipeline, its envelope can't go in one group (too many recipients,
    /// none that can be written, or a sender that can't), or this body
    /// never got that far. Send it the usual way.
    NotSent,
    /// Its envelope was written behind a dot that got a reply: pass this
    /// to [`Connection::settle_next`] to read the replies to it.
    Pending(Pending),
    /// Its envelope was written, but the session broke before it was
    /// answered (or the dot before it failed): the upstream took nothing
    /// of it, as no body was sent. Send it the usual way, on a new
    /// connection.
    Lost(String),
    /// Answered, and no body goes out: its report, exactly as
    /// [`Connection::send`] would have given it (MAIL refused, every
    /// recipient refused, DATA refused, 421 once MAIL was accepted). A
    /// RSET is owed.
    Done(Result<TxnReport, SmtpError>),
    /// The relay answered its MAIL with 421 and ended the session: the
    /// transaction never began, so nothing of it was taken and it is not
    /// to blame. Send it again at once, the usual way, on another
    /// connection; the 421 is the connection's pushback, counted once.
    Closed(SmtpError),
    /// 354: the server waits for its body. Hand this to
    /// [`Connection::send_opened`].
    Open(Opened),
}

/// A transaction whose envelope went out behind the previous end of data,
/// its replies not read yet.
#[must_use = "the replies to this envelope must be read: Connection::settle_next"]
#[derive(Debug)]
pub struct Pending {
    steps: Vec<Step>,
    replies: EnvelopeReplies,
}

/// A body written with [`Connection::write_opened`] (and the next
/// envelope behind its dot, if one was given), its reply not read yet.
#[must_use = "the reply to this body must be read: Connection::read_written"]
#[derive(Debug)]
pub struct Written {
    rcpts: Vec<Reply>,
    planned: Option<(Vec<Step>, EnvelopeReplies)>,
}

/// A transaction whose envelope was accepted and whose DATA got 354.
#[must_use = "the server waits for this body: send it with Connection::send_opened"]
#[derive(Debug)]
pub struct Opened {
    /// The replies to its recipients, in envelope order.
    rcpts: Vec<Reply>,
}

impl Connection {
    /// Reads the replies to an envelope sent behind the previous end of
    /// data: the transaction is then open, done, or lost.
    pub async fn settle_next(&mut self, pending: Pending) -> NextTxn {
        if self.broken || !std::mem::take(&mut self.awaiting_replies) {
            return NextTxn::Lost("connection unusable".into());
        }
        let span = self.span.clone();
        self.read_next(pending).instrument(span).await
    }

    async fn read_next(&mut self, pending: Pending) -> NextTxn {
        let Pending { steps, mut replies } = pending;
        match self.read_group(&steps, &mut replies).await {
            Err(e) if e.closed_before_transaction() => {
                self.broken = true;
                NextTxn::Closed(e)
            }
            Err(e @ SmtpError::Rejected { .. }) => {
                // 421: an answer about this transaction, as send() gives it.
                self.broken = true;
                NextTxn::Done(Err(e))
            }
            Err(e) => {
                self.broken = true;
                NextTxn::Lost(e.to_string())
            }
            Ok(()) => match self.settle(replies) {
                Ok(Settled::GoAhead(rcpts)) => {
                    self.awaiting_body = true;
                    NextTxn::Open(Opened { rcpts })
                }
                Ok(Settled::Over(report)) => {
                    self.pending_rset = true;
                    NextTxn::Done(Ok(report))
                }
                Err(e) => {
                    self.pending_rset = true;
                    if !e.leaves_session_in_sync() {
                        self.broken = true;
                    }
                    NextTxn::Done(Err(e))
                }
            },
        }
    }

    /// Sends the body of the transaction opened behind the previous one
    /// (see [`NextTxn::Open`]), followed, when `next` is given, by the next
    /// envelope, as [`Connection::send_then`] does.
    pub async fn send_opened(
        &mut self,
        opened: Opened,
        body: &[u8],
        next: Option<(&Envelope<'_>, usize)>,
    ) -> Sent {
        match self.write_opened(opened, body, next).await {
            Ok(written) => self.read_written(written).await,
            Err(sent) => sent,
        }
    }

    /// The first half of [`Connection::send_opened`]: writes the body (and
    /// `next`'s envelope behind its dot) without waiting for the reply, so
    /// the caller can do other work meanwhile. `Err` is the outcome when
    /// the write failed.
    pub async fn write_opened(
        &mut self,
        opened: Opened,
        body: &[u8],
        next: Option<(&Envelope<'_>, usize)>,
    ) -> Result<Written, Sent> {
        if self.broken || !std::mem::take(&mut self.awaiting_body) {
            return Err(Sent::alone(Err(SmtpError::Unusable)));
        }
        let span = self.span.clone();
        match self
            .write_body(opened.rcpts, body, next)
            .instrument(span)
            .await
        {
            Ok(written) => {
                self.awaiting_dot = true;
                Ok(written)
            }
            Err(sent) => {
                self.note_result(&sent.this);
                Err(sent)
            }
        }
    }

    /// The second half: reads the reply to a body [`Connection::write_opened`]
    /// wrote.
    pub async fn read_written(&mut self, written: Written) -> Sent {
        if self.broken || !std::mem::take(&mut self.awaiting_dot) {
            let next = match written.planned {
                Some(_) => NextTxn::Lost("connection unusable".into()),
                None => NextTxn::NotSent,
            };
            return Sent {
                this: Err(SmtpError::Unusable),
                next,
            };
        }
        let span = self.span.clone();
        let sent = self.read_body(written).instrument(span).await;
        self.note_result(&sent.this);
        sent
    }

    /// Whether the replies to a pending envelope are already here (read
    /// without waiting for more): then settling it costs no wait.
    pub async fn replies_arrived(&mut self, pending: &Pending) -> bool {
        self.wire.replies_buffered(pending.steps.len()).await
    }

    /// Writes the body and reads the reply to it (see `write_body`).
    pub(super) async fn body_then(
        &mut self,
        rcpts: Vec<Reply>,
        body: &[u8],
        next: Option<(&Envelope<'_>, usize)>,
    ) -> Sent {
        match self.write_body(rcpts, body, next).await {
            Ok(written) => self.read_body(written).await,
            Err(sent) => sent,
        }
    }

    /// Writes the body in chunks, each under `data_timeout`, and the next
    /// envelope (if it can go in one group) in the same write as the final
    /// dot. `Err` is the outcome when a write failed.
    async fn write_body(
        &mut self,
        rcpts: Vec<Reply>,
        body: &[u8],
        next: Option<(&Envelope<'_>, usize)>,
    ) -> Result<Written, Sent> {
        let planned = match next {
            Some((env, size)) if self.caps.pipelining => match self.plan(env, size, false) {
                Ok(Planned::Steps(steps, replies)) if steps.len() <= PIPELINE_BATCH => {
                    Some((steps, replies))
                }
                _ => None,
            },
            _ => None,
        };
        let tail: String = planned
            .as_ref()
            .map(|(steps, _)| steps.iter().map(Step::line).collect())
            .unwrap_or_default();
        let mut encoder = DataEncoder::new(body);
        let mut chunk = Vec::with_capacity(BODY_CHUNK + 3 + tail.len());
        loop {
            chunk.clear();
            let more = encoder.fill(&mut chunk, BODY_CHUNK);
            let shown = if more || tail.is_empty() {
                "<message body chunk>".to_string()
            } else {
                chunk.extend_from_slice(tail.as_bytes());
                format!("<message body end>\n{tail}")
            };
            let written = self
                .wire
                .write(&chunk, &shown, Stage::Body, self.data_timeout)
                .await;
            if let Err(e) = written {
                let next = if !more && planned.is_some() {
                    NextTxn::Lost(format!("the previous message's body failed: {e}"))
                } else {
                    NextTxn::NotSent
                };
                return Err(Sent { this: Err(e), next });
            }
            if !more {
                return Ok(Written { rcpts, planned });
            }
        }
    }

    /// Reads the reply to a body [`Connection::write_body`] wrote.
    async fn read_body(&mut self, written: Written) -> Sent {
        let Written { rcpts, planned } = written;
        // Everything is sent: a connection lost now may have delivered it.
        let this = match self.wire.read_reply(Stage::Dot, self.data_timeout).await {
            Ok(reply) if reply.code == 421 => Err(SmtpError::Rejected {
                stage: Stage::Body,
                reply,
            }),
            Ok(reply) => Ok(TxnReport {
                rcpts,
                data: Some(reply),
            }),
            Err(e) => Err(e),
        };
        let Some((steps, replies)) = planned else {
            return Sent::alone(this);
        };
        if let Err(e) = &this {
            // 421, a dropped line, a timeout or garbage: the session is out
            // of step, so what follows the dot will not be answered.
            let reason = format!("the previous message's end of data failed: {e}");
            return Sent {
                this,
                next: NextTxn::Lost(reason),
            };
        }
        self.awaiting_replies = true;
        let next = NextTxn::Pending(Pending { steps, replies });
        Sent { this, next }
    }
}
