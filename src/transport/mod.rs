//! Transports: how a worker hands a message on. `relay` speaks SMTP to the
//! configured upstream over a connection kept open between messages;
//! `capture` drops mail into a local Maildir for development and tests.

pub mod capture;
pub mod relay;
pub mod smtp;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, TransportKind};
use crate::delivery::outcome::AttemptReport;
use crate::spool::Meta;

/// A worker's own transport instance (it owns at most one connection).
pub enum Sender {
    Relay(Box<relay::RelaySender>),
    Capture(capture::CaptureSender),
}

impl Sender {
    pub fn new(config: &Arc<Config>) -> anyhow::Result<Sender> {
        Ok(match config.transport_kind() {
            TransportKind::Relay => Sender::Relay(Box::new(relay::RelaySender::new(config)?)),
            TransportKind::Capture => Sender::Capture(capture::CaptureSender::new(config)?),
        })
    }

    /// Tries the recipients `rcpts` (indices into `meta.recipients`).
    pub async fn deliver(&mut self, meta: &Meta, body: &[u8], rcpts: &[usize]) -> AttemptReport {
        match self {
            Sender::Relay(r) => r.deliver(meta, body, rcpts).await,
            Sender::Capture(c) => c.deliver(meta, body, rcpts).await,
        }
    }

    pub fn is_connected(&self) -> bool {
        match self {
            Sender::Relay(r) => r.is_connected(),
            Sender::Capture(_) => false,
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        match self {
            Sender::Relay(r) => r.idle_timeout(),
            Sender::Capture(_) => Duration::from_secs(3600),
        }
    }

    pub async fn close(&mut self) {
        if let Sender::Relay(r) = self {
            r.close().await;
        }
    }
}
