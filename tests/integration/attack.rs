//! Issue 16: relayq under attack and overload. Each file takes one kind of
//! attack, with real relayq processes and raw clients:
//!
//! - [`auth`]: floods of wrong passwords, budgets and lockouts.
//! - [`config_secrets`]: secrets never printed in config errors.
//! - [`flood`]: idle and slow connections, the session table, stress.
//! - [`maildrop`]: junk planted by local users, log budgets, corrupt/ bounds.
//! - [`open_relay`]: allow_networks judged by what it covers.
//! - [`seen`]: the smaller things (a duplicate warned of, short disk at start).
//! - [`smuggle`]: a refused DATA must never turn the message into commands.

mod auth;
mod config_secrets;
mod flood;
mod maildrop;
mod open_relay;
mod seen;
mod smuggle;
