//! Transports: how a worker hands a message on. `relay` speaks SMTP to a
//! relay over a connection kept open between messages, in the relay's
//! `pool`; the router (`crate::routing`) picks the relay. `capture` drops
//! mail into a local Maildir for development and tests.

pub mod capture;
pub mod oauth2;
pub mod openings;
pub mod pool;
pub mod relay;
pub mod smtp;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, TransportKind};
use crate::delivery::lookahead::Lookahead;
use crate::delivery::outcome::Delivery;
use crate::routing::Router;
use crate::routing::router::Follow;
use crate::spool::Meta;

/// A worker's way to hand mail on. Relaying goes through the shared
/// router (its pools own the connections); capture is per worker.
pub enum Sender {
    Routed(Arc<Router>),
    Capture(capture::CaptureSender),
}

impl Sender {
    /// The capture transport; relaying needs the daemon's router
    /// ([`Sender::Routed`]).
    pub fn new(config: &Arc<Config>) -> anyhow::Result<Sender> {
        match config.transport_kind() {
            TransportKind::Relay => Err(anyhow::anyhow!(
                "relaying goes through the router: use Sender::Routed"
            )),
            TransportKind::Capture => Ok(Sender::Capture(capture::CaptureSender::new(config)?)),
        }
    }

    /// Tries the recipients `rcpts` (indices into `meta.recipients`).
    pub async fn deliver(&mut self, meta: &Meta, body: &[u8], rcpts: &[usize]) -> Delivery {
        match self {
            Sender::Routed(r) => r.deliver(meta, body, rcpts).await,
            Sender::Capture(c) => Delivery::Attempted(c.deliver(meta, body, rcpts).await),
        }
    }

    /// [`Sender::deliver`]; when relaying to a relay that pipelines, the
    /// next ready message from `ahead` may go out behind this one on the
    /// same connection, returned as a [`Follow`] to resume.
    pub async fn deliver_ahead(
        &mut self,
        meta: &Meta,
        body: &[u8],
        rcpts: &[usize],
        ahead: &mut Lookahead,
    ) -> (Delivery, Option<Follow>) {
        match self {
            Sender::Routed(r) => r.deliver_ahead(meta, body, rcpts, ahead).await,
            Sender::Capture(c) => (
                Delivery::Attempted(c.deliver(meta, body, rcpts).await),
                None,
            ),
        }
    }

    /// Whether this worker holds a connection (pools hold relay ones).
    pub fn is_connected(&self) -> bool {
        false
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }

    pub async fn close(&mut self) {}
}
