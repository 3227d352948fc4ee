//! `relayq queue ...` and `mailq`: look at and manage the queue the way
//! `postqueue` and `postsuper` do.
//!
//! Reading (list, show) works on the spool directly: queue files are only
//! ever appended to or renamed, so a reader never sees a torn state. The
//! relays' states (up, down, paused, limits used) live in the daemon and
//! are asked for on its control socket.
//! Changes go through the daemon's control socket so they never race a
//! delivery in flight.

use std::io::Write;

use serde::Serialize;

use crate::config::Config;
use crate::control::{self, Op, Request};
use crate::routing::{RelayState, fmt_time};
use crate::spool::{Area, Meta, RcptState, Spool};

#[derive(Serialize)]
struct JsonRcpt<'a> {
    address: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_reason: Option<&'a str>,
}

/// One message as `postqueue -j` prints it.
#[derive(Serialize)]
struct JsonMessage<'a> {
    queue_name: &'a str,
    queue_id: &'a str,
    arrival_time: u64,
    message_size: u64,
    sender: &'a str,
    recipients: Vec<JsonRcpt<'a>>,
}

/// Every queued and held message, oldest first.
pub fn collect(spool: &Spool) -> anyhow::Result<Vec<(Area, Meta)>> {
    let mut all = Vec::new();
    for area in [Area::Queue, Area::Hold] {
        for id in spool.list(area)? {
            match spool.read_meta(area, &id) {
                Ok(m) => all.push((area, m)),
                // Delivered and removed while we listed: not in the queue.
                Err(crate::spool::SpoolError::NotFound(_)) => {}
                Err(e) => eprintln!("relayq: {id}: {e}"),
            }
        }
    }
    all.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    Ok(all)
}

pub fn list(config: &Config, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = Spool::open(&config.spool_dir)?;
    let all = collect(&spool)?;
    let relays = relay_states(config);
    if json {
        for (area, m) in &all {
            let msg = JsonMessage {
                queue_name: if *area == Area::Hold {
                    "hold"
                } else {
                    "deferred"
                },
                queue_id: &m.id,
                arrival_time: m.arrival_ms / 1000,
                message_size: m.size,
                sender: &m.sender,
                recipients: m
                    .pending()
                    .map(|(_, r)| JsonRcpt {
                        address: &r.address,
                        delay_reason: r.last_reply.as_deref(),
                    })
                    .collect(),
            };
            writeln!(out, "{}", serde_json::to_string(&msg)?)?;
        }
        for r in relays.iter().flatten() {
            writeln!(out, "{}", relay_json(r)?)?;
        }
        return Ok(());
    }
    if all.is_empty() {
        writeln!(out, "Mail queue is empty")?;
        return write_relays(&relays, out);
    }
    writeln!(
        out,
        "-Queue ID-                  --Size-- ----Arrival Time---- -Sender/Recipient-------"
    )?;
    let mut bytes = 0;
    for (area, m) in &all {
        bytes += m.size;
        let mark = if *area == Area::Hold { "!" } else { " " };
        let sender = if m.sender.is_empty() {
            "MAILER-DAEMON"
        } else {
            &m.sender
        };
        writeln!(
            out,
            "{}{mark} {:>8} {} {sender}",
            m.id,
            m.size,
            arrival(m.arrival_ms)
        )?;
        for (_, r) in m.pending() {
            if let Some(reason) = &r.last_reply {
                writeln!(out, "{:49}({reason})", "")?;
            }
            writeln!(out, "{:49}{}", "", r.address)?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "-- {} Kbytes in {} Request{}.",
        bytes.div_ceil(1024),
        all.len(),
        if all.len() == 1 { "" } else { "s" }
    )?;
    write_relays(&relays, out)
}

/// The daemon's relay states; `None` when it is not running.
fn relay_states(config: &Config) -> Option<Vec<RelayState>> {
    if config.relays.is_empty() {
        return Some(Vec::new());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        match control::request(&config.spool_dir, &Request::Relays).await {
            Ok(Some(r)) => r.relays,
            _ => None,
        }
    })
}

/// A relay as one JSON line: `{"relay":"ses","state":"up",...}` (message
/// lines have a `queue_id` instead).
fn relay_json(r: &RelayState) -> anyhow::Result<String> {
    let mut v = serde_json::to_value(r)?;
    if let Some(obj) = v.as_object_mut() {
        obj.remove("name");
        let mut out = serde_json::Map::new();
        out.insert("relay".into(), serde_json::Value::from(r.name.clone()));
        out.extend(std::mem::take(obj));
        return Ok(serde_json::Value::Object(out).to_string());
    }
    Ok(v.to_string())
}

/// The per-relay summary after the message list.
fn write_relays(relays: &Option<Vec<RelayState>>, out: &mut impl Write) -> anyhow::Result<()> {
    let Some(relays) = relays else {
        writeln!(out, "\nRelays: state unknown (relayq is not running)")?;
        return Ok(());
    };
    if relays.is_empty() {
        return Ok(());
    }
    writeln!(out, "\nRelays:")?;
    let width = relays.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in relays {
        let state = match (r.state.as_str(), r.paused_until_ms, r.down_since_ms) {
            ("paused", Some(until), since) => format!(
                "paused until {}{}",
                fmt_time(until, None),
                since
                    .map(|s| format!(" (down since {})", fmt_time(s, None)))
                    .unwrap_or_default()
            ),
            ("down", _, Some(since)) => format!("down since {}", fmt_time(since, None)),
            (s, _, _) => s.to_string(),
        };
        let error = r
            .last_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        writeln!(
            out,
            "  {:width$}  {}  {state}{error}, connections {}/{}",
            r.name, r.endpoint, r.connections, r.max_connections
        )?;
        for l in &r.limits {
            let tz = l
                .window
                .strip_prefix("calendar ")
                .and_then(|name| jiff::tz::TimeZone::get(name).ok());
            let resets = l
                .resets_at_ms
                .map(|t| format!(", resets at {}", fmt_time(t, tz.as_ref())))
                .unwrap_or_default();
            let scope = match (l.shared, l.fallback) {
                (_, true) => ", local share: Redis unreachable",
                (true, false) => ", fleet-wide",
                _ => "",
            };
            writeln!(
                out,
                "  {:width$}    {} {}/{} used, {} left ({}{scope}){resets}",
                "",
                l.period.label(),
                l.used,
                l.limit,
                l.left,
                l.window
            )?;
        }
    }
    Ok(())
}

fn arrival(ms: u64) -> String {
    let ts = jiff::Timestamp::from_millisecond(ms as i64).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    ts.to_zoned_datetime(jiff::tz::TimeZone::system())
        .strftime("%a %b %e %H:%M:%S")
        .to_string()
}

/// Number of recipients still pending, for tests and scripts.
pub fn pending_count(meta: &Meta) -> usize {
    meta.recipients
        .iter()
        .filter(|r| r.state == RcptState::Pending)
        .count()
}

/// Sends a request to the running daemon; errors if none is running.
pub async fn to_daemon(config: &Config, req: Request) -> anyhow::Result<control::Response> {
    match control::request(&config.spool_dir, &req).await? {
        Some(r) if r.ok => Ok(r),
        Some(r) => Err(anyhow::anyhow!(
            r.error.unwrap_or_else(|| "request failed".into())
        )),
        None => Err(anyhow::anyhow!(
            "relayq is not running (no control socket in {}); start it with `relayq serve`",
            config.spool_dir.display()
        )),
    }
}

pub async fn op(config: &Config, id: &str, op: Op) -> anyhow::Result<()> {
    to_daemon(
        config,
        Request::Op {
            id: id.to_string(),
            op,
        },
    )
    .await
    .map(|_| ())
}
