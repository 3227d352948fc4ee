//! relayq: a local relay mail transfer agent.
//!
//! A message flows through one pipeline:
//!
//! ```text
//!  app --SMTP--> smtp::server ─┐                      ┌─> transport::smtp ──> relayhost
//!                              ├─> spool (fsync) ─> delivery::scheduler ─┤
//!  app --stdin--> cli::sendmail┘    queue/  hold/       (retry, expiry)  └─> transport::capture (Maildir)
//!                                   corrupt/                 │
//!                                                            └─> bounce (RFC 3464 DSN, back into the spool)
//! ```
//!
//! `sendmail` run by root or the spool's owner commits like the SMTP server;
//! run by anyone else it leaves a file in `spool::maildrop`, which the
//! daemon's `pickup` checks and commits (see `submit`).
//!
//! The spool is the only writer of message files; everything after it reads
//! them and appends per-recipient outcomes. The client is answered `250` only
//! once the spool has fsynced the message and its directory entry.

pub mod anvil;
pub mod bounce;
pub mod cleanup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod delivery;
pub mod memory;
pub mod observe;
pub mod pickup;
pub mod routing;
pub mod smtp;
pub mod spool;
pub mod submit;
pub mod transport;
