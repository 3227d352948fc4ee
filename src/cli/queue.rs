//! `relayq queue ...` and `mailq`: look at and manage the queue the way
//! `postqueue` and `postsuper` do.
//!
//! Reading (list, show) works on the spool directly: queue files are only
//! ever appended to or renamed, so a reader never sees a torn state. The
//! relays' states (up, down, paused, limits used) live in the daemon and
//! are asked for on its control socket.
//! Changes (hold, release, delete, requeue, flush) go through the daemon's
//! control socket so they never race a delivery in flight. With the daemon
//! down they act on the spool directly while holding `<spool>/daemon.lock`,
//! the lock a running daemon holds, so a daemon starting meanwhile waits.
//!
//! # Security
//! Only root and the spool's owner may change the queue: checked up front
//! for a clear message, and enforced anyway by the spool's permissions
//! (0700) and the control socket's (0600).

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::control::{self, Op, Request};
use crate::routing::{RelayState, fmt_time};
use crate::spool::{Area, Meta, RcptState, Record, Spool, SpoolError, maildrop};

/// `relayq queue init`: creates the spool's directories and the maildrop
/// with their modes, as the daemon does at start, so that `sendmail` run
/// by any user works before the daemon first started (the package's
/// postinst runs it as the relayq user). Changes nothing already there.
pub fn init(config: &Config, out: &mut impl Write) -> anyhow::Result<()> {
    let root = &config.spool_dir;
    Spool::open(root)
        .map_err(|e| anyhow::anyhow!("cannot prepare the spool {}: {e}", root.display()))?;
    crate::spool::maildrop::prepare(root)
        .map_err(|e| anyhow::anyhow!("cannot prepare the maildrop: {e}"))?;
    writeln!(out, "spool {} ready (queue and maildrop)", root.display())?;
    Ok(())
}

/// Ids per control request; a request line must stay under 64 KiB.
const BATCH: usize = 1000;
/// Batches this big or bigger get a progress bar (on a terminal).
const PROGRESS_FROM: usize = 200;

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

/// Opens the spool for reading, with a hint when we may not.
fn open_spool(config: &Config) -> anyhow::Result<Spool> {
    Spool::open(&config.spool_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the queue: {e} (only root and the owner of {} may read it)",
            config.spool_dir.display()
        )
    })
}

/// Where a listed message waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Spool(Area),
    /// In `maildrop/`, not yet picked up: no queue id yet.
    Maildrop,
}

impl Place {
    /// `postqueue -j`'s `queue_name`.
    fn queue_name(self) -> &'static str {
        match self {
            Place::Spool(Area::Hold) => "hold",
            Place::Spool(_) => "deferred",
            Place::Maildrop => "maildrop",
        }
    }
}

/// Why a maildrop message is listed without a queue id.
const IN_MAILDROP: &str =
    "waiting in the maildrop: relayq serve picks it up and gives it a queue id";

/// Every message relayq holds, oldest first: queued, held, and waiting in
/// the maildrop. A maildrop entry shows the sender it will be sent with.
fn collect_all(config: &Config, spool: &Spool) -> anyhow::Result<Vec<(Place, Meta)>> {
    let mut all: Vec<(Place, Meta)> = collect(spool)?
        .into_iter()
        .map(|(a, m)| (Place::Spool(a), m))
        .collect();
    let owner = std::fs::metadata(spool.root())
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0);
    for w in crate::spool::maildrop::waiting(spool.root())? {
        let who = crate::submit::Identity::of_uid(w.uid);
        let mut meta = w.meta;
        meta.sender = crate::submit::sender_for(config, &who, owner, &meta.sender);
        all.push((Place::Maildrop, meta));
    }
    all.sort_by(|a, b| {
        a.1.arrival_ms
            .cmp(&b.1.arrival_ms)
            .then(a.1.id.cmp(&b.1.id))
    });
    Ok(all)
}

/// Every queued and held message, oldest first, each once: by the id in
/// its file, which after a power loss the daemon has not yet recovered
/// from may differ from its name (see the spool's recovery).
pub fn collect(spool: &Spool) -> anyhow::Result<Vec<(Area, Meta)>> {
    let mut all = Vec::new();
    for area in [Area::Queue, Area::Hold] {
        for id in spool.list(area)? {
            match spool.read_meta(area, &id) {
                Ok(m) if m.is_done() => {}
                Ok(m) => all.push((area, m)),
                // Delivered and removed while we listed: not in the queue.
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => eprintln!("relayq: {id}: {e}"),
            }
        }
    }
    // A message under both names (a power loss between the two syncs of a
    // move) is on hold: recovery keeps that one. Listed once, held.
    all.sort_by(|a, b| {
        a.1.id
            .cmp(&b.1.id)
            .then((a.0 != Area::Hold).cmp(&(b.0 != Area::Hold)))
    });
    all.dedup_by(|a, b| a.1.id == b.1.id);
    Ok(all)
}

/// The ids of the messages in `areas`, as `collect` finds them.
fn ids_in(spool: &Spool, areas: &[Area]) -> anyhow::Result<Vec<String>> {
    Ok(collect(spool)?
        .into_iter()
        .filter(|(a, _)| areas.contains(a))
        .map(|(_, m)| m.id)
        .collect())
}

pub fn list(config: &Config, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = open_spool(config)?;
    let all = collect_all(config, &spool)?;
    let relays = relay_states(config);
    if json {
        for (place, m) in &all {
            let msg = JsonMessage {
                queue_name: place.queue_name(),
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
    // Columns as postqueue -p, widened for our 26-character ids: id and
    // status mark (! = held), size, arrival time, sender; then each
    // pending recipient under the sender, its last error above it.
    writeln!(
        out,
        "-Queue ID-                  --Size-- ----Arrival Time---- -Sender/Recipient-------"
    )?;
    let indent = 26 + 1 + 1 + 8 + 1 + 20 + 1;
    let mut bytes = 0;
    for (place, m) in &all {
        bytes += m.size;
        let mark = if *place == Place::Spool(Area::Hold) {
            "!"
        } else {
            " "
        };
        let sender = if m.sender.is_empty() {
            "MAILER-DAEMON".into()
        } else {
            printable(&m.sender)
        };
        writeln!(
            out,
            "{}{mark} {:>8} {:>20} {sender}",
            printable(&m.id),
            m.size,
            arrival(m.arrival_ms)
        )?;
        if *place == Place::Maildrop {
            writeln!(out, "{:indent$}({IN_MAILDROP})", "")?;
        }
        for (_, r) in m.pending() {
            if let Some(reason) = &r.last_reply {
                writeln!(out, "{:indent$}({})", "", printable(reason))?;
            }
            writeln!(out, "{:indent$}{}", "", printable(&r.address))?;
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

/// Outside text (a local user's drop file, an upstream's reply, a
/// client's headers) for an operator's terminal: control characters, which
/// could retitle, recolour or clear it, become `?` (as in Postfix's
/// showq); a tab stays.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(|c| c.is_control() && c != '\t') {
        s.chars()
            .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
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
            .map(|e| format!(": {}", printable(e)))
            .unwrap_or_default();
        writeln!(
            out,
            "  {:width$}  {}  {state}{error}, connections {} open, concurrency {}/{} ({})",
            r.name,
            r.endpoint,
            r.connections,
            r.concurrency,
            r.max_connections,
            if r.adaptive { "adaptive" } else { "fixed" }
        )?;
        if let Some(change) = r.concurrency_change.as_ref().filter(|_| r.adaptive) {
            writeln!(
                out,
                "  {:width$}    concurrency {} (since {})",
                "",
                printable(&change.text),
                fmt_time(change.at_ms, None)
            )?;
        }
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

fn full_date(ms: u64) -> String {
    let ts = jiff::Timestamp::from_millisecond(ms as i64).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    ts.to_zoned_datetime(jiff::tz::TimeZone::system())
        .strftime("%Y-%m-%d %H:%M:%S %z")
        .to_string()
}

/// `queue show ID`: the envelope, each recipient's state, and the
/// message's header section (like `postcat -eh`).
pub fn show(config: &Config, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let spool = open_spool(config)?;
    let found = match spool.find(id) {
        Ok(f) => f,
        Err(SpoolError::NotFound(_) | SpoolError::BadId(_)) => {
            return Err(anyhow::anyhow!("no such message in the queue: {id}"));
        }
        Err(e) => return Err(e.into()),
    };
    let (area, meta) = (found.area, &found.meta);
    let queue = if area == Area::Hold { "hold" } else { "queue" };
    writeln!(out, "queue id:    {} ({queue})", meta.id)?;
    writeln!(out, "arrival:     {}", full_date(meta.arrival_ms))?;
    writeln!(out, "size:        {} bytes", meta.size)?;
    let sender = if meta.sender.is_empty() {
        "<> (a bounce)".to_string()
    } else {
        format!("<{}>", printable(&meta.sender))
    };
    writeln!(out, "sender:      {sender}")?;
    let mut flags = Vec::new();
    if meta.smtputf8 {
        flags.push("SMTPUTF8");
    }
    if meta.eight_bit {
        flags.push("8BITMIME");
    }
    if !flags.is_empty() {
        writeln!(out, "flags:       {}", flags.join(" "))?;
    }
    let next = match meta.next_attempt_ms {
        Some(ms) if meta.attempts > 0 => format!(", next {}", full_date(ms)),
        _ => String::new(),
    };
    writeln!(out, "attempts:    {}{next}", meta.attempts)?;
    writeln!(out, "recipients:")?;
    for r in &meta.recipients {
        let state = match r.state {
            RcptState::Pending => "pending",
            RcptState::Delivered => "delivered",
            RcptState::Failed => "failed",
        };
        let address = printable(&r.address);
        match &r.last_reply {
            Some(reply) => writeln!(out, "  {state:<10}{address}  ({})", printable(reply))?,
            None => writeln!(out, "  {state:<10}{address}")?,
        }
    }
    writeln!(out, "headers:")?;
    let head = read_headers(&spool, area, &found.name, meta)?;
    for line in String::from_utf8_lossy(&head).split("\r\n") {
        if !line.is_empty() {
            writeln!(out, "  {}", printable(line))?;
        }
    }
    Ok(())
}

/// The header section of a queued message (at most 256 KiB of it).
fn read_headers(spool: &Spool, area: Area, name: &str, meta: &Meta) -> anyhow::Result<Vec<u8>> {
    let path = spool.path(area, name)?;
    let mut file = std::fs::File::open(&path)?;
    file.seek(SeekFrom::Start(meta.body_offset))?;
    let mut buf = Vec::new();
    file.take(meta.size.min(256 * 1024)).read_to_end(&mut buf)?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(buf.len());
    buf.truncate(end);
    Ok(buf)
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

/// What an operation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub count: usize,
    /// Ids that were not (or no longer) in the queue.
    pub missing: Vec<String>,
    /// Whether the daemon did it (false: done on the spool directly).
    pub online: bool,
}

fn verb(op: Op) -> &'static str {
    match op {
        Op::Hold => "put on hold",
        Op::Release => "released",
        Op::Delete => "deleted",
        Op::Requeue => "requeued",
    }
}

/// `hold|release|delete|requeue ID... | ALL`: through the daemon, or on
/// the spool under the lock when it is down. Prints a summary; fails if
/// an id named explicitly was not found.
pub async fn op(
    config: &Config,
    ids: &[String],
    op: Op,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let what = match op {
        Op::Hold => "put messages on hold",
        Op::Release => "release held messages",
        Op::Delete => "delete messages",
        Op::Requeue => "requeue messages",
    };
    super::ensure_operator(&config.spool_dir, what)?;
    let all = ids.iter().any(|i| i == "ALL");
    let targets = if all {
        let spool = open_spool(config)?;
        let areas: &[Area] = match op {
            Op::Delete => &[Area::Hold, Area::Queue],
            Op::Release => &[Area::Hold],
            Op::Hold | Op::Requeue => &[Area::Queue],
        };
        ids_in(&spool, areas)?
    } else {
        ids.to_vec()
    };
    let done = apply(config, targets, op).await?;
    writeln!(
        out,
        "{}: {} message{}{}",
        verb(op),
        done.count,
        if done.count == 1 { "" } else { "s" },
        if done.online {
            ""
        } else {
            " (relayq is not running: done on the spool)"
        }
    )?;
    if !all && !done.missing.is_empty() {
        return Err(anyhow::anyhow!(
            "no such message in the queue: {}",
            done.missing.join(" ")
        ));
    }
    Ok(())
}

/// `flush`: through the daemon, or, when it is down, every queued message
/// made due so the daemon tries it as soon as it starts.
pub async fn flush(config: &Config, out: &mut impl Write) -> anyhow::Result<()> {
    match control::request(&config.spool_dir, &Request::Flush).await {
        Ok(Some(r)) if r.ok => {
            writeln!(
                out,
                "flushed: {} deferred message(s) scheduled now",
                r.count.unwrap_or(0)
            )?;
            return Ok(());
        }
        Ok(Some(r)) => return Err(anyhow::anyhow!(r.error.unwrap_or_default())),
        Ok(None) => {}
        Err(e) => {
            super::ensure_operator(&config.spool_dir, "flush the queue")?;
            return Err(e);
        }
    }
    super::ensure_operator(&config.spool_dir, "flush the queue")?;
    let ids = ids_in(&open_spool(config)?, &[Area::Queue])?;
    let done = apply(config, ids, Op::Requeue).await?;
    writeln!(
        out,
        "relayq is not running: {} message(s) will be tried as soon as it starts",
        done.count
    )?;
    Ok(())
}

fn progress(total: usize, op: Op) -> indicatif::ProgressBar {
    if total < PROGRESS_FROM {
        return indicatif::ProgressBar::hidden();
    }
    // Drawn on stderr only when it is a terminal.
    let bar = indicatif::ProgressBar::new(total as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(verb(op));
    bar
}

/// Applies `op` to `ids`: through the daemon in batches if it runs, else
/// on the spool under the daemon lock.
pub async fn apply(config: &Config, ids: Vec<String>, op: Op) -> anyhow::Result<Done> {
    let mut done = Done {
        online: true,
        ..Done::default()
    };
    if ids.is_empty() {
        done.online = control::socket_path(&config.spool_dir).exists();
        return Ok(done);
    }
    let bar = progress(ids.len(), op);
    let mut rest = &ids[..];
    // A daemon that holds the lock but has no socket yet is starting.
    let mut starting = Duration::ZERO;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(BATCH)];
        let req = Request::Ops {
            ids: batch.to_vec(),
            op,
        };
        match control::request(&config.spool_dir, &req).await? {
            Some(r) if r.ok => {
                done.count += r.count.unwrap_or(0);
                done.missing.extend(r.missing);
                bar.inc(batch.len() as u64);
                rest = &rest[batch.len()..];
            }
            Some(r) => {
                bar.abandon();
                return Err(anyhow::anyhow!(
                    r.error.unwrap_or_else(|| "request failed".into())
                ));
            }
            None => match super::lock_spool(&config.spool_dir, Duration::ZERO) {
                Ok(lock) => {
                    let spool = open_spool(config)?;
                    let r = offline(&spool, rest, op, &bar);
                    drop(lock);
                    let (count, missing) = r?;
                    done.count += count;
                    done.missing.extend(missing);
                    done.online = false;
                    break;
                }
                Err(super::LockError::Held(_)) if starting < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    starting += Duration::from_millis(200);
                }
                Err(e @ super::LockError::Other(_)) => return Err(e.into()),
                Err(super::LockError::Held(_)) => {
                    bar.abandon();
                    return Err(anyhow::anyhow!(
                        "another relayq process holds the spool lock {}, but no daemon answers on {}: wait for the other queue tool to finish, or, if relayq serve runs, restart it (it makes its control socket at start)",
                        super::lock_path(&config.spool_dir).display(),
                        control::socket_path(&config.spool_dir).display()
                    ));
                }
            },
        }
    }
    bar.finish_and_clear();
    Ok(done)
}

/// The operations on the spool itself, for a stopped daemon (the caller
/// holds the daemon lock). Same state changes as the scheduler's.
fn offline(
    spool: &Spool,
    ids: &[String],
    op: Op,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(usize, Vec<String>)> {
    let now = crate::clock::to_ms(std::time::SystemTime::now());
    // Names first: after a power loss a message may sit under a stale
    // name until recovery, which the daemon (not running) would do. Only
    // when one is needed: the pass reads every queue file.
    if ids
        .iter()
        .any(|id| !matches!(spool.find(id), Ok(f) if f.name == *id))
    {
        spool.reconcile_names()?;
    }
    // A drop file a crash left in pickup/ for a message deleted here
    // would bring it back at the next start (rule 6 of the spool).
    let drop_claim = |id: &str| {
        if maildrop::claimed(spool.root(), id) {
            maildrop::release(spool.root(), id)
        } else {
            Ok(())
        }
    };
    let mut count = 0;
    let mut missing = Vec::new();
    for id in ids {
        let in_queue = spool.path(Area::Queue, id)?.exists();
        let in_hold = spool.path(Area::Hold, id)?.exists();
        let result = match (op, in_queue, in_hold) {
            (_, false, false) => Err(SpoolError::NotFound(id.clone())),
            (Op::Delete, true, _) => drop_claim(id).and_then(|()| spool.remove(Area::Queue, id)),
            (Op::Delete, false, true) => drop_claim(id).and_then(|()| spool.remove(Area::Hold, id)),
            (Op::Hold, true, _) => spool.move_to(id, Area::Queue, Area::Hold),
            (Op::Release, _, true) => spool.move_to(id, Area::Hold, Area::Queue),
            // Due now: recovery schedules by the last attempt record.
            (Op::Requeue, true, _) => spool.read_meta(Area::Queue, id).and_then(|m| {
                spool.append(
                    id,
                    &[Record::Attempt {
                        attempts: m.attempts,
                        next_ms: now,
                    }],
                    true,
                )
            }),
            // Already in the wanted state, as the daemon treats it.
            (Op::Hold, false, true) | (Op::Release, true, false) | (Op::Requeue, false, true) => {
                Ok(())
            }
        };
        match result {
            Ok(()) => count += 1,
            Err(SpoolError::NotFound(_)) => missing.push(id.clone()),
            Err(e) => return Err(e.into()),
        }
        bar.inc(1);
    }
    if op == Op::Delete {
        // The marks are synced (no committer here); the names follow.
        spool.sync_names()?;
    }
    Ok((count, missing))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::concurrency::{Change, Reason};

    #[test]
    fn relay_lines_show_no_control_characters_from_the_upstream() {
        // A hostile relay's refusal text (a terminal title and a screen
        // clear) ends up in the concurrency's last change.
        let said = "greeting rejected: 421 4.7.0 \u{1b}]0;owned\u{7}\u{1b}[2J too many";
        let change = Change {
            at_ms: 0,
            from: 4,
            to: 3,
            reason: Reason::Refused,
            text: format!(
                "4 -> 3: the relay refused one more connection ({said}) while 3 were open"
            ),
        };
        let relay = RelayState {
            name: "default".into(),
            endpoint: "127.0.0.1:25".into(),
            state: "up".into(),
            down_since_ms: None,
            paused_until_ms: None,
            last_error: Some(said.into()),
            connections: 3,
            max_connections: 25,
            concurrency: 3,
            adaptive: true,
            concurrency_change: Some(change),
            limits: Vec::new(),
        };
        let mut out = Vec::new();
        write_relays(&Some(vec![relay]), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(
            text.contains("concurrency 4 -> 3: the relay refused one more connection (greeting rejected: 421 4.7.0 ?]0;owned??[2J too many) while 3 were open"),
            "{text}"
        );
    }
}
