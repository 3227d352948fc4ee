//! Inbound SMTP: the listener ([`server`]) and the per-connection state
//! machine ([`session`]) that turns a client's dialogue into a queued
//! message.

pub mod message;
pub mod server;
pub mod session;

pub use server::{Server, ServerContext};
