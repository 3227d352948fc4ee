//! Observability: what an operator sees of a running relayq.
//!
//! - [`events`]: the per-message log lines (Postfix style, queue id first)
//!   together with the metrics and status state each event updates, so a
//!   line, a counter and the status page can never disagree.
//! - [`metrics`]: the Prometheus recorder and the queue gauges.
//! - [`state`]: relay up/down state, recent deliveries and failures, queue
//!   size history, and queue snapshots read from the spool.
//! - [`http`] and [`page`]: the optional status endpoint (`status_listen`):
//!   `/metrics`, `/healthz`, `/status` (JSON) and `/` (an HTML page).
//! - [`quiet`]: a budget for the log lines that clients and local users
//!   can cause, so a flood of bad input is not a flood of log lines.
//!
//! Logs go to stderr (the journal under systemd), or to syslog with
//! `log_to = "syslog"` (see [`syslog`]). In `text` format an
//! event of [`events`] (it carries an `event` field) prints as its
//! Postfix-style message alone; in `json` format every event is one object per line whose keys
//! are the same tracing fields (`queue_id`, `to`, `relay`, `dsn`, `status`,
//! `reply`, ...) plus `message`. Both come from one tracing call per event.

pub mod events;
pub mod http;
pub mod metrics;
pub mod page;
pub mod quiet;
pub mod state;
pub mod syslog;

use std::fmt;
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use self::syslog::{Destination, Syslog, Writers};
use crate::config::{Config, LogFormat, LogTo};

/// Installs the global subscriber for the config's `log_format` and
/// `log_to`. `RELAYQ_LOG` (or `RUST_LOG`) overrides the level, e.g.
/// `RELAYQ_LOG=debug`.
pub fn init(config: &Config) {
    let dest = match config.log_to {
        LogTo::Stderr => Destination::stderr(),
        LogTo::Syslog => {
            let (s, error) = Syslog::open(&config.syslog_socket, config.syslog_facility);
            if let Some(e) = error {
                eprintln!(
                    "relayq: cannot log to syslog at {}: {e}; logging to standard error until it answers (is a syslog daemon running? or set syslog_socket)",
                    config.syslog_socket.display()
                );
            }
            Destination::Syslog(s)
        }
    };
    let stamped = dest.stamps();
    let filter = std::env::var("RELAYQ_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Writers(Arc::new(dest)));
    let _ = match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(stamped && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .event_format(TextFormat {
                inner: Format::default().with_target(false),
                bare: Format::default()
                    .with_target(false)
                    .with_level(false)
                    .without_time(),
                stamped,
            })
            .try_init(),
    };
}

/// The text format: the events of `events` (they carry `event`) print
/// their Postfix-style message only, because their fields are already in
/// it; everything else prints like tracing's default format. Where the
/// destination stamps lines itself (journal, syslog) there is no
/// timestamp or level column: a line that is not info starts with
/// `warning: ` or `error: `, as Postfix's do.
struct TextFormat {
    inner: Format,
    bare: Format<tracing_subscriber::fmt::format::Full, ()>,
    stamped: bool,
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level: Level = *event.metadata().level();
        let is_event = event.metadata().fields().field("event").is_some();
        if !self.stamped {
            writer.write_str(syslog::level_prefix(level))?;
        }
        if !is_event {
            return match self.stamped {
                true => self.inner.format_event(ctx, writer, event),
                false => self.bare.format_event(ctx, writer, event),
            };
        }
        let mut message = MessageOnly(String::new());
        event.record(&mut message);
        if !self.stamped {
            return writeln!(writer, "{}", message.0);
        }
        SystemTime.format_time(&mut writer)?;
        writeln!(writer, " {:>5} {}", level, message.0)
    }
}

struct MessageOnly(String);

impl Visit for MessageOnly {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        }
    }
}
