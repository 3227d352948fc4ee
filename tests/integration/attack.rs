//! Issue 16: relayq under attack and overload. Each file takes one kind of
//! attack, with real relayq processes and raw clients:
//!
//! - [`auth`]: floods of wrong passwords, budgets and lockouts.
//! - [`flood`]: idle and slow connections, the session table, stress.
//! - [`smuggle`]: a refused DATA must never turn the message into commands.

mod auth;
mod flood;
mod smuggle;
