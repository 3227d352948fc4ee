//! Routing: several named relays, which mail goes to which, failover when
//! a relay is down, a relay-wide circuit breaker, and provider limits.
pub mod config;
pub mod headers;
pub mod health;
pub mod quota;
pub mod route;
