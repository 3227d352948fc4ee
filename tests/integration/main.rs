//! relayq's integration tests: real relayq processes, real sockets on
//! 127.0.0.1, a scriptable fake upstream, and peers nobody here wrote.

mod support;

mod attack;
mod bench;
mod bounce;
mod check;
mod chunking;
mod concurrency;
mod dev_mode;
mod durability;
mod fallback;
mod fidelity;
mod front_door;
mod hostile_content;
mod inbound;
mod install;
mod interop;
mod kept;
mod oauth2;
mod observe;
mod pipelining;
mod postfix_sink;
mod powerloss;
mod powerloss_ops;
mod queue;
mod rate;
mod readme;
mod relay;
mod reload;
mod routing;
mod sendmail;
mod smtp;
mod smuggling;
mod status_page;
mod syslog;
mod tls;
mod upgrade;
mod ways_in;
