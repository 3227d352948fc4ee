//! Shared test support: the daemon launcher, a raw SMTP client, and a
//! scriptable fake upstream.
#![allow(dead_code)]

pub mod aiosmtpd;
pub mod client;
pub mod daemon;
pub mod http;
pub mod mime;
pub mod netns;
pub mod peers;
pub mod pki;
pub mod postfix;
pub mod readme;
pub mod redis_server;
pub mod token_endpoint;
pub mod upstream;
