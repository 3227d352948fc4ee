//! relayq's integration tests: real relayq processes, real sockets on
//! 127.0.0.1, a scriptable fake upstream, and peers nobody here wrote.

mod support;

mod inbound;
mod relay;
mod routing;
