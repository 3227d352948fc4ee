//! Inbound SMTP: the listener ([`server`]) and the per-connection state
//! machine ([`session`]) that turns a client's dialogue into a queued
//! message.

pub mod auth;
pub mod auth_budget;
pub mod dsn;
#[cfg(test)]
mod fuzz;
pub mod server;
pub mod session;
pub mod sessions;
pub mod tls;

pub use server::{Server, ServerContext};
