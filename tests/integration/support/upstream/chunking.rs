//! BDAT (RFC 3030) for the fake upstream: "BDAT <size> [LAST]" followed by
//! exactly `size` octets, taken as they are (no dot-stuffing). A chunk is
//! always read whole, even when refused (no transaction, no recipient), so
//! the session stays in step with a client that pipelined what follows, as
//! RFC 3030 requires and Postfix does; the refusal ends the transaction.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::{Closed, Script, Session, Stage};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn bdat(&mut self, script: &Script, arg: &str) -> Result<(), Closed> {
        let mut words = arg.split_whitespace();
        let size = words.next().and_then(|n| n.parse::<usize>().ok());
        let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
        let Some(size) = size else {
            // What follows can't be told from commands: hang up, as Postfix
            // does ("521 5.5.4 Syntax: BDAT count [LAST]").
            self.std_reply(script, 521, "5.5.4", "Syntax: BDAT count [LAST]")
                .await?;
            return Err(Closed::ByUs);
        };
        self.kept_drop_if(super::KeptDrop::BeforeBody).await?;
        let mut chunk = vec![0u8; size];
        if script.drop_at == Some(Stage::DataBody) && size > 0 {
            let _ = self.io.read_exact(&mut chunk[..1]).await;
            return Err(Closed::ByUs);
        }
        if size > 0 && self.dropping == Some(super::TxnDrop::MidChunk) {
            let _ = self.io.read_exact(&mut chunk[..1]).await;
            self.drop_if(super::TxnDrop::MidChunk).await?;
        }
        self.flush_if_dry().await?;
        self.io
            .read_exact(&mut chunk)
            .await
            .map_err(|_| Closed::Peer)?;
        // Nothing is answered until the chunk is in: bytes already here
        // were sent behind it without waiting.
        let followed = !self.io.buffer().is_empty();
        let refusal = match &self.tx {
            None => Some((503, "5.5.1", "Error: need MAIL command")),
            Some(tx) if tx.rcpts.is_empty() => Some((554, "5.5.1", "Error: no valid recipients")),
            Some(_) => None,
        };
        if let Some((code, enh, text)) = refusal {
            self.tx = None;
            self.chunks.clear();
            return self.std_reply(script, code, enh, text).await;
        }
        self.chunks.extend_from_slice(&chunk);
        if !last {
            let text = format!("{size} octets received");
            return self.std_reply(script, 250, "2.0.0", &text).await;
        }
        let data = std::mem::take(&mut self.chunks);
        self.end_of_message(data, "BDAT", followed).await
    }
}
