//! The control socket: how `relayq queue ...` and `sendmail` talk to the
//! running daemon, so queue changes go through the scheduler and never
//! race a delivery.
//!
//! Protocol: the client sends one JSON object on one line and reads one
//! JSON object back: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//!
//! # Security
//! The socket lives in the spool directory (mode 0700) with mode 0600, so
//! only the daemon's user (and root) can connect: no further
//! authentication is done. Requests are size-limited and parsed strictly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::clock::Clock;
use crate::delivery::scheduler::ControlError;
use crate::delivery::{QueueOp, SchedulerHandle};
use crate::spool::{Area, Spool};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Retry every deferred message now.
    Flush,
    /// A queue operation on one message.
    Op { id: String, op: Op },
    /// The same operation on many messages (`delete ALL`); the answer's
    /// `count` says how many were done and `missing` lists the ids that
    /// were no longer queued.
    Ops { ids: Vec<String>, op: Op },
    /// `sendmail` (run by root or the spool's owner) queued this message
    /// itself: log it as accepted and schedule it.
    Wake { id: String },
    /// Test hook: move the injected clock forward (needs RELAYQ_TEST_CLOCK=1).
    ClockAdvance { secs: u64 },
    /// Every relay's state and limits.
    Relays,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Hold,
    Release,
    Delete,
    Requeue,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub count: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub missing: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub relays: Option<Vec<crate::routing::RelayState>>,
}

impl Response {
    fn ok(count: Option<usize>) -> Response {
        Response {
            ok: true,
            error: None,
            count,
            missing: Vec::new(),
            relays: None,
        }
    }
}

impl From<Op> for QueueOp {
    fn from(op: Op) -> QueueOp {
        match op {
            Op::Hold => QueueOp::Hold,
            Op::Release => QueueOp::Release,
            Op::Delete => QueueOp::Delete,
            Op::Requeue => QueueOp::Requeue,
        }
    }
}

/// The longest request line the daemon reads; batches of ids must fit.
pub const MAX_REQUEST: usize = 64 * 1024;

pub fn socket_path(spool_dir: &Path) -> PathBuf {
    spool_dir.join("control.sock")
}

/// Creates a socket at `path` in the spool (what a previous run left
/// there is replaced) with `mode`. `what` and `needed_for` name it in the
/// error, which says why it failed and what to do: a daemon without its
/// sockets must not start (see [`bind`]).
pub fn bind_in_spool(
    path: &Path,
    mode: u32,
    what: &str,
    needed_for: &str,
) -> anyhow::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .and_then(|l| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            Ok(l)
        })
        .map_err(|e| {
            let fix = match e.raw_os_error() {
                Some(libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP) => {
                    "the file system spool_dir is on does not support Unix sockets (some FUSE file systems do not): put spool_dir on a local file system"
                }
                Some(libc::EADDRINUSE) => {
                    "something that is not a socket is in its place: remove it"
                }
                _ => "put it right and start again",
            };
            anyhow::anyhow!(
                "cannot create the {what} socket {}: {e}; relayq needs it for {needed_for}, so it does not start without it: {fix}",
                path.display()
            )
        })?;
    Ok(listener)
}

/// Creates the control socket, before the daemon says it has started:
/// without it the queue tools cannot reach the daemon (they found the
/// spool locked, and said so), and mail `sendmail` queues itself would
/// wait for the next restart.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    bind_in_spool(
        path,
        0o600,
        "control",
        "the queue tools and for mail that sendmail queues itself",
    )
}

/// Serves the control socket until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    spool: Spool,
    scheduler: SchedulerHandle,
    clock: Clock,
) -> anyhow::Result<()> {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (spool, scheduler, clock) = (spool.clone(), scheduler.clone(), clock.clone());
        tokio::spawn(async move {
            let work = handle(stream, spool, scheduler, clock);
            let _ = tokio::time::timeout(Duration::from_secs(30), work).await;
        });
    }
}

async fn handle(
    stream: UnixStream,
    spool: Spool,
    scheduler: SchedulerHandle,
    clock: Clock,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r).take(MAX_REQUEST as u64);
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => err(format!("bad request: {e}")),
        Ok(req) => execute(req, &spool, &scheduler, &clock).await,
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    w.write_all(&out).await
}

fn err(e: String) -> Response {
    Response {
        ok: false,
        error: Some(e),
        count: None,
        missing: Vec::new(),
        relays: None,
    }
}

/// Before a delete is answered, the done marks of the messages it removed
/// are made durable (one sync for the batch): the operator was told they
/// are deleted, so a power loss must not bring them back and send them,
/// as the done-sync window allows for delivered mail (durability rule 4).
async fn deleted_for_good(spool: &Spool, op: Op) {
    if op == Op::Delete {
        let spool = spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.flush_done_marks()).await;
    }
}

/// Applies one operation to many messages at once; a message that is
/// already gone is reported, not an error.
async fn ops(scheduler: &SchedulerHandle, ids: Vec<String>, op: QueueOp) -> Response {
    let mut set = tokio::task::JoinSet::new();
    for id in ids {
        let s = scheduler.clone();
        set.spawn(async move {
            let r = s.op(&id, op).await;
            (id, r)
        });
    }
    let mut done = 0;
    let mut missing = Vec::new();
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((_, Ok(()))) => done += 1,
            Ok((id, Err(ControlError::NotFound(_)))) => missing.push(id),
            Ok((id, Err(e))) => {
                first_error.get_or_insert_with(|| format!("{id}: {e}"));
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    missing.sort();
    match first_error {
        Some(e) => err(e),
        None => Response {
            ok: true,
            error: None,
            count: Some(done),
            missing,
            relays: None,
        },
    }
}

async fn execute(
    req: Request,
    spool: &Spool,
    scheduler: &SchedulerHandle,
    clock: &Clock,
) -> Response {
    match req {
        Request::Flush => {
            // "Try now" includes relays that are down or paused.
            if let Some(router) = crate::routing::current() {
                router.reset_health();
            }
            // "Every queued message", including any a `sendmail` queued
            // without telling us.
            let adopted = crate::pickup::adopt(spool, scheduler, Duration::ZERO).await;
            match scheduler.flush().await {
                Ok(n) => Response::ok(Some(n + adopted)),
                Err(e) => err(e.to_string()),
            }
        }
        Request::Relays => {
            let relays = match crate::routing::current() {
                Some(router) => {
                    router.refresh().await;
                    router.relay_states()
                }
                None => Vec::new(),
            };
            Response {
                relays: Some(relays),
                ..Response::ok(None)
            }
        }
        Request::Op { id, op } => {
            let r = scheduler.op(&id, op.into()).await;
            deleted_for_good(spool, op).await;
            match r {
                Ok(()) => Response::ok(Some(1)),
                Err(e) => err(e.to_string()),
            }
        }
        Request::Ops { ids, op } => {
            let r = ops(scheduler, ids, op.into()).await;
            deleted_for_good(spool, op).await;
            r
        }
        Request::Wake { id } => {
            // Logged before it is scheduled, so the accepted line comes
            // before any delivery line.
            let (s, i) = (spool.clone(), id.clone());
            let _ =
                tokio::task::spawn_blocking(move || crate::pickup::announce(&s, Area::Queue, &i))
                    .await;
            scheduler.queued(&id);
            Response::ok(None)
        }
        Request::ClockAdvance { secs } => {
            if !Clock::skew_allowed() {
                return err(
                    "clock skew is only allowed when the daemon runs with RELAYQ_TEST_CLOCK=1"
                        .into(),
                );
            }
            clock.advance(Duration::from_secs(secs));
            scheduler.tick();
            Response::ok(None)
        }
    }
}

/// Sends one request to the daemon. `Ok(None)` when no daemon listens.
pub async fn request(spool_dir: &Path, req: &Request) -> anyhow::Result<Option<Response>> {
    let path = socket_path(spool_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(anyhow::anyhow!("cannot connect to {}: {e}", path.display())),
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut reply = String::new();
    BufReader::new(r).read_line(&mut reply).await?;
    Ok(Some(serde_json::from_str(&reply)?))
}

/// [`request`] for callers without a runtime (`sendmail`). `Ok(None)`
/// when no daemon listens.
pub fn request_blocking(spool_dir: &Path, req: &Request) -> anyhow::Result<Option<Response>> {
    use std::io::{BufRead, Write};
    let path = socket_path(spool_dir);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(anyhow::anyhow!("cannot connect to {}: {e}", path.display())),
    };
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply)?;
    Ok(Some(serde_json::from_str(&reply)?))
}
