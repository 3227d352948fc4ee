//! Logging: one line per event, Postfix style, queue id first, on stderr
//! (which systemd sends to the journal).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RELAYQ_LOG` (or `RUST_LOG`) overrides
/// the level, e.g. `RELAYQ_LOG=debug`.
pub fn init() {
    let filter = std::env::var("RELAYQ_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
