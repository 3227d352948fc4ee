//! A kept connection's next transaction, for the fake upstream: the line
//! drops on it the way a relay that flushes replies only once it has read
//! all that came (Postfix's smtpd with PIPELINING) drops it, and a 421 to
//! the first MAIL of a new connection (a relay refusing service).
//!
//! With [`Script::drop_kept`], the first transaction after `set_script`
//! that comes on a connection which carried a body before (it starts with
//! the RSET that ends the previous one) has its replies held while more
//! input is already here and sent only when the server would wait for
//! more (as Postfix's smtpd does), and the line drops at the
//! [`KeptDrop`] point without sending what is held: after reading only
//! the RSET; at the BDAT or DATA command, the envelope read but no body;
//! or after the whole message was read and taken.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{Closed, Script, Session};

/// Where [`Script::drop_kept`] drops the line in a kept connection's next
/// transaction. Nothing of that transaction is answered before the drop
/// unless the client waited for a reply (then what was read is answered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeptDrop {
    /// As soon as the RSET is read: a connection the relay closed.
    AtRset,
    /// At the BDAT or DATA command: the envelope read, no body.
    BeforeBody,
    /// The whole message read and taken (recorded), then the line drops
    /// before its reply.
    AfterLastTaken,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Whether this RSET starts the kept connection's transaction that
    /// [`Script::drop_kept`] drops in; it then does, once per script.
    pub(super) fn kept_drop_starts(&mut self, script: &Script) -> bool {
        let Some(at) = script.drop_kept else {
            return false;
        };
        if !self.had_body {
            return false;
        }
        let mut state = self.shared.lock();
        if state.kept_dropped {
            return false;
        }
        state.kept_dropped = true;
        self.kept_drop = Some(at);
        true
    }

    /// The RSET of that transaction: the line drops now, or the reply is
    /// held.
    pub(super) async fn kept_rset(&mut self, script: &Script) -> Result<(), Closed> {
        if self.kept_drop == Some(KeptDrop::AtRset) {
            self.hang_up().await;
            return Err(Closed::ByUs);
        }
        self.tx = None;
        self.chunks.clear();
        self.unflushed = Some(String::new());
        self.std_reply(script, 250, "2.0.0", "Ok").await
    }

    /// Hangs up, the held replies unsent, if the kept connection's
    /// transaction drops at `at`.
    pub(super) async fn kept_drop_if(&mut self, at: KeptDrop) -> Result<(), Closed> {
        if self.kept_drop != Some(at) {
            return Ok(());
        }
        self.unflushed = None;
        self.hang_up().await;
        Err(Closed::ByUs)
    }

    /// Before a read that would wait for the client: the replies held for
    /// the kept connection's transaction go out (the client may be waiting
    /// for one).
    pub(super) async fn flush_if_dry(&mut self) -> Result<(), Closed> {
        if self.kept_drop.is_none() || !self.io.buffer().is_empty() {
            return Ok(());
        }
        let Some(held) = self.unflushed.as_mut().filter(|h| !h.is_empty()) else {
            return Ok(());
        };
        let out = std::mem::take(held);
        let io = self.io.get_mut();
        io.write_all(out.as_bytes())
            .await
            .map_err(|_| Closed::Peer)?;
        io.flush().await.map_err(|_| Closed::Peer)
    }

    /// [`Script::refuse_first_mail_on`]: this MAIL is the first on that
    /// connection (counted from the commands recorded, this one included).
    pub(super) fn refuses_first_mail(&self, script: &Script) -> bool {
        script.refuse_first_mail_on == Some(self.conn)
            && self
                .shared
                .lock()
                .commands
                .iter()
                .filter(|(c, l)| *c == self.conn && l.to_ascii_uppercase().starts_with("MAIL "))
                .count()
                == 1
    }

    /// 421 to that MAIL, and close: nothing that follows is processed.
    pub(super) async fn refuse_mail(&mut self) -> Result<(), Closed> {
        self.reply(421, "4.3.2 Service not available, closing")
            .await?;
        self.hang_up().await;
        Err(Closed::ByUs)
    }
}
