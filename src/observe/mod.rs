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
//! Logs go to stderr (the journal under systemd). In `text` format an
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

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the global subscriber. `RELAYQ_LOG` (or `RUST_LOG`) overrides
/// the level, e.g. `RELAYQ_LOG=debug`.
pub fn init(format: LogFormat) {
    let filter = std::env::var("RELAYQ_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .event_format(TextFormat {
                inner: Format::default().with_target(false),
            })
            .try_init(),
    };
}

/// The text format: the events of `events` (they carry `event`) print
/// their Postfix-style message only, because their fields are already in
/// it; everything else prints like tracing's default format.
struct TextFormat {
    inner: Format,
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
        if event.metadata().fields().field("event").is_none() {
            return self.inner.format_event(ctx, writer, event);
        }
        let mut message = MessageOnly(String::new());
        event.record(&mut message);
        SystemTime.format_time(&mut writer)?;
        writeln!(writer, " {:>5} {}", event.metadata().level(), message.0)
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
