//! The crash-state test: every on-disk state a power loss can leave the
//! spool in, recovered and checked. After ALICE (Pillai et al., "All File
//! Systems Are Not Created Equal", OSDI 2014): run a workload while
//! recording the spool's file-system operations (`fsop::record`), then,
//! for each point of the record, build the states a conservative file
//! system may persist, run recovery on each and check the durability
//! rules of the parent module. Two workloads: the queue's own writes
//! (accepts, deliveries, hold, release, delete, the `sendmail` command's
//! files, a restart), and the other writers through their own code (an
//! attempt's outcomes as the delivery worker records them, with bounces,
//! success and delay notices; DSN parameters; drop files and the pickup).
//! Checked:
//! - every acknowledged message not yet finished is queued (or held)
//!   exactly once, under its id, with its content (and DSN parameters)
//!   intact; so is every notice an attempt queued, once it returned;
//! - a finished message comes back only if its done mark was not yet
//!   durable at the loss (so only within the done-sync window), and a
//!   recipient recorded durably as delivered is never pending again;
//! - a failure is recorded (or its message removed) only with its bounce
//!   queued, and a delay notice is never sent twice (its `warned` record
//!   is durable once the attempt returns);
//! - a drop file written whole is in `maildrop/` or queued, and both only
//!   while the pickup is between its commit and the removal;
//! - nothing is stranded: no slot holds an unfinished message without a
//!   name, every name is its message's id, nothing acknowledged is in
//!   `corrupt/`;
//! - recovery is idempotent, and survives a second loss in the middle of
//!   itself.
//!
//! The file-system model (conservative, as ALICE's): an operation is
//! durable once a sync that started after it has returned: `fdatasync` of
//! its file for a write, `fsync` of its directory for a create, link,
//! unlink or rename (of both directories for a rename across two), or a
//! `syncfs` for anything. Any
//! subset of the other operations may survive: directory operations each
//! whole or not at all (a rename atomically), in any combination with one
//! another and with the data writes; a write whole, not at all, or torn
//! (each 512-byte sector kept or lost on its own).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fsop::{
    self,
    record::{self, Op},
};
use super::{Area, Dsn, Envelope, Notify, RcptDsn, Record, Ret, Spool, format, maildrop};
use crate::clock::Clock;
use crate::config::{Config, HumanDuration};
use crate::delivery::outcome::{AttemptReport, RcptOutcome};
use crate::delivery::scheduler::Scheduler;
use crate::delivery::worker::{self, WorkerContext};
use crate::pickup::{self, PickupContext};

/// The done-sync window of the workload's daemon.
const WINDOW: Duration = Duration::from_millis(40);
/// How late a committer batch may be on a loaded two-core machine before
/// the test calls the window broken (the bound is checked, not timed
/// precisely: see the report line).
const SLACK: Duration = Duration::from_secs(2);
const SECTOR: usize = 512;

fn body(i: usize, size: usize) -> Vec<u8> {
    let mut b = format!("Subject: crash test {i}\r\n\r\n").into_bytes();
    while b.len() < size {
        b.extend_from_slice(format!("line {i} {}\r\n", b.len()).as_bytes());
    }
    b
}

fn env(rcpts: usize) -> Envelope {
    Envelope {
        sender: "app@example.com".into(),
        recipients: (0..rcpts).map(|r| format!("r{r}@example.net")).collect(),
        ..Envelope::default()
    }
}

/// What a workload sent.
#[derive(Default)]
struct Sent {
    /// By message id: content and recipient count.
    msgs: BTreeMap<String, (Vec<u8>, usize)>,
    /// The envelopes of messages with DSN parameters, to check they
    /// survive as given.
    envs: BTreeMap<String, Envelope>,
    /// Drop files (`sendmail` by a local user), by name: a line of the
    /// message found in its queued copy once the pickup has taken it.
    drops: BTreeMap<String, Vec<u8>>,
}

impl Sent {
    fn insert(&mut self, id: String, msg: (Vec<u8>, usize)) {
        self.msgs.insert(id, msg);
    }
}

/// The workload: accepts (new and reused slots, and the `sendmail`
/// path), deliveries concurrent with accepts, a partial delivery,
/// hold/release/delete, a large message, and a restart with recovery.
fn workload(root: &Path) -> Sent {
    runtime(3).block_on(async {
        let mut sent = Sent::default();
        let spool = Spool::open(root).unwrap();
        spool.enable_slots(WINDOW).unwrap();
        let accept = |spool: Spool, i: usize, size: usize, rcpts: usize| async move {
            let (id, b) = accept_env(&spool, env(rcpts), i, size, 1).await;
            (id, b, rcpts)
        };
        // Accepts into new slots, four at a time.
        let mut first = Vec::new();
        for round in 0..3 {
            let tasks: Vec<_> = (0..4)
                .map(|k| tokio::spawn(accept(spool.clone(), round * 4 + k, 300 + k * 900, 1)))
                .collect();
            for t in tasks {
                first.push(t.await.unwrap());
            }
        }
        // Deliveries while new messages take the freed slots.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let acc = {
            let spool = spool.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..12 {
                    let m = accept(spool.clone(), 100 + i, 200 + (i % 5) * 1500, 1).await;
                    let _ = tx.send(m.0.clone());
                    out.push(m);
                    if i % 4 == 3 {
                        tokio::time::sleep(WINDOW / 2).await;
                    }
                }
                out
            })
        };
        for (n, (id, _, _)) in first.iter().enumerate() {
            deliver(&spool, id);
            if n % 3 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let second = acc.await.unwrap();
        // Half of the second lot delivered, some only after a window.
        let mut delivered_later = Vec::new();
        for (n, _) in second.iter().enumerate() {
            if let Ok(id) = rx.try_recv()
                && n % 2 == 0
            {
                delivered_later.push(id);
            }
        }
        for (n, id) in delivered_later.iter().enumerate() {
            deliver(&spool, id);
            if n == 2 {
                tokio::time::sleep(WINDOW * 2).await;
            }
        }
        // A message delivered to one recipient of three, durably.
        let (multi, b, r) = accept(spool.clone(), 200, 700, 3).await;
        spool
            .append(
                &multi,
                &[Record::Delivered {
                    idx: 0,
                    at_ms: 2,
                    reply: "250 ok".into(),
                }],
                true,
            )
            .unwrap();
        record::mark(format!("partial {multi} 0"));
        spool
            .append(
                &multi,
                &[
                    Record::Deferred {
                        idx: 1,
                        at_ms: 2,
                        reason: "451 later".into(),
                    },
                    Record::Attempt {
                        attempts: 1,
                        next_ms: 3,
                    },
                ],
                false,
            )
            .unwrap();
        sent.insert(multi.clone(), (b, r));
        // Hold, release, and a delete from hold.
        let (h1, b1, _) = accept(spool.clone(), 300, 400, 1).await;
        let (h2, b2, _) = accept(spool.clone(), 301, 400, 1).await;
        for (id, from, to) in [
            (&h1, Area::Queue, Area::Hold),
            (&h2, Area::Queue, Area::Hold),
            (&h1, Area::Hold, Area::Queue),
        ] {
            record::mark(format!("moving {id}"));
            spool.move_to(id, from, to).unwrap();
            if to == Area::Hold {
                record::mark(format!("held {id}"));
            }
        }
        record::mark(format!("finished {h2}"));
        spool.remove(Area::Hold, &h2).unwrap();
        sent.insert(h1, (b1, 1));
        sent.insert(h2, (b2, 1));
        // The sendmail command's path: new files, renamed into queue/.
        let mut dropped = Vec::new();
        for i in 0..3 {
            let id = Spool::new_id();
            let b = body(400 + i, 600);
            record::mark(format!("begin {id}"));
            spool
                .commit_blocking(id.clone(), &env(1), &b, 1, 0)
                .unwrap();
            record::mark(format!("ack {id}"));
            sent.insert(id.clone(), (b, 1));
            dropped.push(id);
        }
        deliver(&spool, &dropped[0]);
        deliver(&spool, &dropped[1]);
        // A large message: its slot is deleted, not kept, once delivered.
        let (big, bb, _) = accept(spool.clone(), 500, 100_000, 1).await;
        deliver(&spool, &big);
        sent.insert(big, (bb, 1));
        tokio::time::sleep(WINDOW * 2).await;
        // A restart: recovery, then more mail and deliveries.
        spool.flush_done_marks();
        let again = Spool::open(root).unwrap();
        again.enable_slots(WINDOW).unwrap();
        let rec = again.recover().unwrap();
        record::mark("recovered".into());
        for (n, m) in rec.queued.iter().enumerate() {
            if n % 2 == 0 && m.id != multi {
                deliver(&again, &m.id);
            }
        }
        for i in 0..6 {
            let (id, b, r) = accept(again.clone(), 600 + i, 250 + i * 300, 1).await;
            if i % 3 == 0 {
                deliver(&again, &id);
            }
            sent.insert(id, (b, r));
        }
        deliver(&again, &multi);
        again.flush_done_marks();
        for (id, b, r) in first.into_iter().chain(second) {
            sent.insert(id, (b, r));
        }
        sent
    })
}

/// Delivers `id` as a worker does once every recipient is done.
fn deliver(spool: &Spool, id: &str) {
    spool.load(id).unwrap();
    record::mark(format!("finished {id}"));
    spool.remove(Area::Queue, id).unwrap();
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

/// Accepts message `i` of `size` bytes with `env`, arrived at
/// `arrival_ms`.
async fn accept_env(
    spool: &Spool,
    env: Envelope,
    i: usize,
    size: usize,
    arrival_ms: u64,
) -> (String, Vec<u8>) {
    let id = Spool::new_id();
    let b = body(i, size);
    record::mark(format!("begin {id}"));
    spool
        .commit(id.clone(), env, b.clone(), arrival_ms)
        .await
        .unwrap();
    record::mark(format!("ack {id}"));
    (id, b)
}

/// Records an attempt at `id` with these outcomes as the delivery worker
/// does (`worker::record`), in a window: what it queues (notices) is the
/// daemon's promise once it returns.
async fn attempt(ctx: &WorkerContext, id: &str, results: Vec<(usize, RcptOutcome)>) {
    let (meta, content) = ctx.spool.load(id).unwrap();
    let report = AttemptReport {
        relay: "mx.example.net[192.0.2.25]:25".into(),
        results,
        ..AttemptReport::default()
    };
    record::mark(format!("open {id}"));
    worker::record(ctx, &meta, &content, report, Instant::now()).await;
    record::mark(format!("close {id}"));
}

fn delivered() -> RcptOutcome {
    RcptOutcome::Delivered {
        reply: "250 2.0.0 ok".into(),
    }
}

fn deferred() -> RcptOutcome {
    RcptOutcome::Deferred {
        reason: "451 4.2.1 mailbox busy".into(),
        status: "4.2.1".into(),
    }
}

fn failed() -> RcptOutcome {
    RcptOutcome::Failed {
        reply: "550 5.1.1 no such user".into(),
        status: "5.1.1".into(),
        local: false,
    }
}

/// The daemon's other writers, through their own code: attempts recorded
/// as the delivery worker records them (a bounce and the `failed`
/// records it reports, a success and a delay notice and the `warned`
/// record, partial deliveries; the notices taking slots freed just
/// before), DSN parameters, a message held after a partial delivery,
/// local submission (drop files written as `sendmail` writes them while
/// the daemon is down, taken by the pickup; a bad one refused to
/// corrupt/), then a restart and more of the same.
fn notices_workload(root: &Path) -> Sent {
    runtime(2).block_on(async {
        let mut sent = Sent::default();
        let spool = Spool::open(root).unwrap();
        spool.enable_slots(WINDOW).unwrap();
        let mut config = Config::development(root.parent().unwrap());
        config.spool_dir = root.to_path_buf();
        config.queue.delay_warning_time = HumanDuration(Duration::from_secs(3600));
        let config = Arc::new(config);
        let clock = Clock::new();
        let (_scheduler, handle, _jobs) = Scheduler::new(spool.clone(), clock.clone(), 1);
        let ctx = WorkerContext {
            config: config.clone(),
            spool: spool.clone(),
            clock: clock.clone(),
            scheduler: handle.clone(),
            router: None,
        };
        let now = clock.now_ms();
        // Queued two hours ago: past the delay warning time.
        let old = now - 2 * 3600 * 1000;

        // Free slots whose done marks are not yet synced.
        for i in 0..4 {
            let (id, _) = accept_env(&spool, env(1), i, 300 + i * 900, now).await;
            deliver(&spool, &id);
        }
        // DSN parameters; a success notice for one recipient, a delay
        // notice for the other.
        let dsn_env = Envelope {
            dsn: Dsn {
                ret: Some(Ret::Hdrs),
                envid: Some("crash-envid-1".into()),
            },
            rcpt_dsn: vec![
                RcptDsn {
                    notify: Notify::DELAY.with(Notify::FAILURE),
                    orcpt: Some("Original@example.net".into()),
                },
                RcptDsn {
                    notify: Notify::SUCCESS,
                    orcpt: None,
                },
            ],
            ..env(2)
        };
        let (d, b) = accept_env(&spool, dsn_env.clone(), 10, 700, old).await;
        sent.insert(d.clone(), (b, 2));
        sent.envs.insert(d.clone(), dsn_env);
        attempt(&ctx, &d, vec![(0, deferred()), (1, delivered())]).await;
        record::mark(format!("warned {d}"));
        record::mark(format!("partial {d} 1"));
        // A bounce for one recipient of three, one delivered, one left.
        let (f1, b) = accept_env(&spool, env(3), 11, 700, now).await;
        sent.insert(f1.clone(), (b, 3));
        record::mark(format!("bounces {f1}"));
        attempt(
            &ctx,
            &f1,
            vec![(0, delivered()), (1, failed()), (2, deferred())],
        )
        .await;
        record::mark(format!("partial {f1} 0"));
        record::mark(format!("partial {f1} 1"));
        // A bounce for the only recipient: the message goes.
        let (f2, b) = accept_env(&spool, env(1), 12, 700, now).await;
        sent.insert(f2.clone(), (b, 1));
        record::mark(format!("finished {f2}"));
        record::mark(format!("bounces {f2}"));
        attempt(&ctx, &f2, vec![(0, failed())]).await;
        // Held after a partial delivery.
        let (h, b) = accept_env(&spool, env(2), 13, 700, now).await;
        sent.insert(h.clone(), (b, 2));
        attempt(&ctx, &h, vec![(0, delivered()), (1, deferred())]).await;
        record::mark(format!("partial {h} 0"));
        record::mark(format!("moving {h}"));
        spool.move_to(&h, Area::Queue, Area::Hold).unwrap();
        record::mark(format!("held {h}"));

        // `sendmail` by local users while the daemon is down: drop files,
        // and one that is not a queue file.
        let drop = |sent: &mut Sent, i: usize| {
            let line = format!("crash test drop {i}");
            let msg = format!("Subject: drop {i}\r\n\r\n{line}\r\n").into_bytes();
            let name = maildrop::write(root, &env(1), &msg, now).unwrap();
            record::mark(format!("dropped {name}"));
            sent.drops.insert(name.clone(), line.into_bytes());
            name
        };
        let mut names: Vec<String> = (0..3).map(|i| drop(&mut sent, i)).collect();
        let bad = maildrop::dir(root).join(Spool::new_id());
        let f = fsop::create_new(&bad).unwrap();
        fsop::write_at(&f, b"relayq-queue 1\nnot a queue file\n", 0).unwrap();
        fsop::sync_data(&f).unwrap();
        let pickup =
            PickupContext::new(config.clone(), spool.clone(), clock.clone(), handle.clone());
        for round in 0..2 {
            record::mark("open pick".into());
            pickup::scan(&pickup).await;
            record::mark("close pick".into());
            for name in names.drain(..) {
                record::mark(format!("picked {name}"));
            }
            if round == 0 {
                names.push(drop(&mut sent, 3));
            }
        }

        // A restart; more attempts on the recovered queue.
        spool.flush_done_marks();
        let again = Spool::open(root).unwrap();
        again.enable_slots(WINDOW).unwrap();
        again.recover().unwrap();
        record::mark("recovered".into());
        let ctx = WorkerContext {
            spool: again.clone(),
            ..ctx
        };
        deliver(&again, &f1);
        let (f3, b) = accept_env(&again, env(2), 14, 700, now).await;
        sent.insert(f3.clone(), (b, 2));
        record::mark(format!("finished {f3}"));
        record::mark(format!("bounces {f3}"));
        attempt(&ctx, &f3, vec![(0, failed()), (1, failed())]).await;
        record::mark(format!("finished {d}"));
        attempt(&ctx, &d, vec![(0, delivered())]).await;
        again.flush_done_marks();
        sent
    })
}

/// A file of the model: its identity is its index in `Model::files`.
#[derive(Clone, Default)]
struct MFile {
    data: Vec<u8>,
}

/// One recorded operation, resolved to model files.
#[derive(Clone, Debug)]
enum MOp {
    Write {
        file: usize,
        offset: u64,
        data: Vec<u8>,
    },
    /// Create, link, unlink, rename: a change to the names of `dir`
    /// (for a rename, the directory it goes to).
    Dir {
        change: Change,
        dir: String,
    },
    SyncFile {
        file: usize,
        token: u64,
    },
    SyncDir {
        dir: String,
        token: u64,
    },
    /// `syncfs`: everything before it is durable once it ends.
    SyncFs {
        token: u64,
    },
    SyncEnd {
        token: u64,
    },
    Mark(String),
}

#[derive(Clone, Debug)]
enum Change {
    Add {
        path: String,
        file: usize,
    },
    Remove {
        path: String,
        file: usize,
    },
    Rename {
        from: String,
        to: String,
        file: usize,
    },
}

fn dir_of(path: &str) -> String {
    path.rsplit_once('/')
        .map(|(d, _)| d.to_string())
        .unwrap_or_default()
}

/// A spool state: names to files, and the files' contents.
#[derive(Clone, Default)]
struct State {
    names: BTreeMap<String, usize>,
    files: Vec<MFile>,
}

/// A recorded run from an initial state: operations, their times (µs),
/// and for each operation the index of the op after which it is durable.
struct Trace {
    init: State,
    ops: Vec<MOp>,
    at: Vec<u128>,
    durable_after: Vec<Option<usize>>,
    /// For a rename: when the name it leaves is durably gone (the
    /// rename as a whole is durable when its target directory is synced,
    /// and until then is kept or lost whole; after that, the old name
    /// may survive until its own directory is synced).
    source_durable_after: Vec<Option<usize>>,
}

impl Trace {
    /// Resolves a recording against `init`, whose files are known by the
    /// inode numbers in `inos`.
    fn new(init: State, mut inos: HashMap<u64, usize>, rec: Vec<(u128, Op)>) -> Trace {
        let mut files = init.files.len();
        let mut ops = Vec::new();
        let mut at = Vec::new();
        for (t, op) in rec {
            let m = match op {
                Op::Create { path, ino } => {
                    inos.insert(ino, files);
                    files += 1;
                    Some(MOp::Dir {
                        dir: dir_of(&path),
                        change: Change::Add {
                            path,
                            file: files - 1,
                        },
                    })
                }
                Op::Write { ino, offset, data } => {
                    inos.get(&ino)
                        .map(|&file| MOp::Write { file, offset, data })
                }
                Op::SyncFileBegin { ino, token } => {
                    inos.get(&ino).map(|&file| MOp::SyncFile { file, token })
                }
                Op::SyncDirBegin { dir, token } => Some(MOp::SyncDir { dir, token }),
                Op::SyncFsBegin { token } => Some(MOp::SyncFs { token }),
                Op::SyncEnd { token } => Some(MOp::SyncEnd { token }),
                Op::Link { path, ino } => inos.get(&ino).map(|&file| MOp::Dir {
                    dir: dir_of(&path),
                    change: Change::Add { path, file },
                }),
                Op::Unlink { path, ino } => inos.get(&ino).map(|&file| MOp::Dir {
                    dir: dir_of(&path),
                    change: Change::Remove { path, file },
                }),
                Op::Rename { from, to, ino } => inos.get(&ino).map(|&file| MOp::Dir {
                    dir: dir_of(&to),
                    change: Change::Rename { from, to, file },
                }),
                Op::Mark(m) => Some(MOp::Mark(m)),
            };
            if let Some(m) = m {
                ops.push(m);
                at.push(t);
            }
        }
        // Where each sync ends.
        let mut ends = HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            if let MOp::SyncEnd { token } = op {
                ends.insert(*token, i);
            }
        }
        let dir_synced = |i: usize, d: &str| {
            ops[i + 1..]
                .iter()
                .filter_map(|o| match o {
                    MOp::SyncDir { dir, token } if dir == d => ends.get(token).copied(),
                    _ => None,
                })
                .min()
        };
        let fs_synced = |i: usize| {
            ops[i + 1..]
                .iter()
                .filter_map(|o| match o {
                    MOp::SyncFs { token } => ends.get(token).copied(),
                    _ => None,
                })
                .min()
        };
        let earliest = |a: Option<usize>, b: Option<usize>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut durable_after = vec![None; ops.len()];
        let mut source_durable_after = vec![None; ops.len()];
        for (i, op) in ops.iter().enumerate() {
            durable_after[i] = match op {
                MOp::Write { file, .. } => ops[i + 1..]
                    .iter()
                    .filter_map(|o| match o {
                        MOp::SyncFile { file: f, token } if f == file => ends.get(token).copied(),
                        _ => None,
                    })
                    .min(),
                MOp::Dir { dir, .. } => dir_synced(i, dir),
                _ => Some(i),
            };
            source_durable_after[i] = match op {
                MOp::Dir {
                    change: Change::Rename { from, .. },
                    ..
                } => dir_synced(i, &dir_of(from)),
                _ => durable_after[i],
            };
            if matches!(op, MOp::Write { .. } | MOp::Dir { .. }) {
                durable_after[i] = earliest(durable_after[i], fs_synced(i));
                source_durable_after[i] = earliest(source_durable_after[i], fs_synced(i));
            }
        }
        Trace {
            init,
            ops,
            at,
            durable_after,
            source_durable_after,
        }
    }

    /// Whether op `i` is durable in a loss after the first `k` ops.
    fn durable(&self, i: usize, k: usize) -> bool {
        self.durable_after[i].is_some_and(|e| e < k)
    }

    /// The state after a loss following the first `k` ops, keeping the
    /// unsynced operations `keep` chooses (`Keep::Torn` for a write: the
    /// sectors to keep).
    fn state(&self, k: usize, mut keep: impl FnMut(usize, &MOp) -> Keep) -> State {
        let mut s = self.init.clone();
        for (i, op) in self.ops[..k].iter().enumerate() {
            let choice = if self.durable(i, k) {
                Keep::All
            } else {
                keep(i, op)
            };
            // A rename whose target is durable: its old name may stay.
            let old_name_goes = !self.durable(i, k)
                || self.source_durable_after[i].is_some_and(|e| e < k)
                || !matches!(keep(i, op), Keep::None);
            if matches!(choice, Keep::None) {
                continue;
            }
            match op {
                MOp::Write { file, offset, data } => {
                    while s.files.len() <= *file {
                        s.files.push(MFile::default());
                    }
                    let f = &mut s.files[*file].data;
                    let off = *offset as usize;
                    if f.len() < off + data.len() {
                        f.resize(off + data.len(), 0);
                    }
                    for (n, chunk) in data.chunks(SECTOR).enumerate() {
                        if let Keep::Torn(mask) = &choice
                            && !mask(n)
                        {
                            continue;
                        }
                        let at = off + n * SECTOR;
                        f[at..at + chunk.len()].copy_from_slice(chunk);
                    }
                }
                MOp::Dir { change, .. } => match change {
                    Change::Add { path, file } => {
                        while s.files.len() <= *file {
                            s.files.push(MFile::default());
                        }
                        s.names.insert(path.clone(), *file);
                    }
                    Change::Remove { path, file } => {
                        if s.names.get(path) == Some(file) {
                            s.names.remove(path);
                        }
                    }
                    Change::Rename { from, to, file } => {
                        if old_name_goes && s.names.get(from) == Some(file) {
                            s.names.remove(from);
                        }
                        s.names.insert(to.clone(), *file);
                    }
                },
                _ => {}
            }
        }
        s
    }
}

/// Decides, for each unsynced operation, what of it a loss keeps.
type Chooser = Box<dyn FnMut(usize, &MOp) -> Keep>;

enum Keep {
    All,
    None,
    Torn(Box<dyn Fn(usize) -> bool>),
}

/// The directories of a spool that hold files.
const SPOOL_DIRS: [&str; 8] = [
    "tmp",
    "queue",
    "hold",
    "corrupt",
    "corrupt/maildrop",
    "slots",
    "maildrop",
    "pickup",
];

/// Writes `s` out as a spool directory at `dir`; returns each file's
/// inode number.
fn materialize(s: &State, dir: &Path) -> HashMap<u64, usize> {
    let _ = fs::remove_dir_all(dir);
    for sub in std::iter::once("").chain(SPOOL_DIRS) {
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir.join(sub))
            .unwrap();
    }
    let mut first: HashMap<usize, PathBuf> = HashMap::new();
    let mut inos = HashMap::new();
    for (name, &file) in &s.names {
        let path = dir.join(name);
        match first.get(&file) {
            Some(p) => fs::hard_link(p, &path).unwrap(),
            None => {
                fs::write(&path, &s.files[file].data).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
                inos.insert(fs::metadata(&path).unwrap().ino(), file);
                first.insert(file, path);
            }
        }
    }
    inos
}

/// Reads a spool directory back into a model state.
fn read_state(dir: &Path) -> (State, HashMap<u64, usize>) {
    let mut s = State::default();
    let mut inos = HashMap::new();
    for sub in SPOOL_DIRS {
        let entries = match fs::read_dir(dir.join(sub)) {
            Ok(entries) => entries,
            // Made when first needed (pickup/).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{sub}: {e}"),
        };
        for e in entries {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                continue;
            }
            let ino = e.metadata().unwrap().ino();
            let file = *inos.entry(ino).or_insert_with(|| {
                s.files.push(MFile {
                    data: fs::read(e.path()).unwrap(),
                });
                s.files.len() - 1
            });
            s.names
                .insert(format!("{sub}/{}", e.file_name().to_string_lossy()), file);
        }
    }
    (s, inos)
}

/// What the workload had done at the loss, from its marks.
#[derive(Default, Debug)]
struct Expect {
    begun: BTreeSet<String>,
    acked: BTreeSet<String>,
    /// Finished (delivered or deleted): mark index.
    finished: BTreeMap<String, usize>,
    /// Recipients durably delivered.
    partial: BTreeSet<(String, usize)>,
    /// Moved to hold/ (and not being moved back).
    held: BTreeSet<String>,
    /// Messages the daemon itself queued in a window of the workload
    /// (`open TAG` .. `close TAG`): notices an attempt at message TAG
    /// queued, or the messages the pickup queued (TAG `pick`). Begun when
    /// their header is written, acknowledged when the window closes.
    made: BTreeMap<String, Vec<String>>,
    /// Messages whose failure reports (bounces) were being queued: a
    /// failed recipient (or the message gone) needs a bounce.
    bounces: BTreeSet<String>,
    /// Messages whose delay notice was queued: sending another after a
    /// loss is a duplicate.
    warned: BTreeSet<String>,
    /// Drop files written whole (`sendmail` returned).
    dropped: BTreeSet<String>,
    /// Drop files the pickup has queued and removed.
    picked: BTreeSet<String>,
}

fn expect(t: &Trace, k: usize) -> Expect {
    let mut e = Expect::default();
    let mut window: Option<String> = None;
    for (i, op) in t.ops[..k].iter().enumerate() {
        let m = match op {
            MOp::Mark(m) => m.as_str(),
            // The first write of a queue file the daemon made in a window.
            MOp::Write {
                offset: 0, data, ..
            } => {
                if let (Some(tag), Ok(Some(meta))) = (&window, format::decode_header(data))
                    && e.begun.insert(meta.id.clone())
                {
                    e.made.entry(tag.clone()).or_default().push(meta.id);
                }
                continue;
            }
            _ => continue,
        };
        let mut w = m.split(' ');
        match (w.next(), w.next(), w.next()) {
            (Some("begin"), Some(id), _) => {
                e.begun.insert(id.into());
            }
            (Some("ack"), Some(id), _) => {
                e.acked.insert(id.into());
            }
            (Some("finished"), Some(id), _) => {
                e.finished.insert(id.into(), i);
            }
            (Some("partial"), Some(id), Some(idx)) => {
                e.partial.insert((id.into(), idx.parse().unwrap()));
            }
            (Some("held"), Some(id), _) => {
                e.held.insert(id.into());
            }
            // Until the move returns, either place is right.
            (Some("moving"), Some(id), _) => {
                e.held.remove(id);
            }
            (Some("open"), Some(tag), _) => window = Some(tag.into()),
            (Some("close"), Some(tag), _) => {
                window = None;
                e.acked
                    .extend(e.made.get(tag).into_iter().flatten().cloned());
            }
            (Some("bounces"), Some(id), _) => {
                e.bounces.insert(id.into());
            }
            (Some("warned"), Some(id), _) => {
                e.warned.insert(id.into());
            }
            (Some("dropped"), Some(name), _) => {
                e.dropped.insert(name.into());
            }
            (Some("picked"), Some(name), _) => {
                e.picked.insert(name.into());
            }
            _ => {}
        }
    }
    e
}

/// Where the workload's first done mark (a NUL at byte 0) after mark
/// `after` was written to a file holding `id`: the op index.
fn done_mark(t: &Trace, after: usize, id: &str) -> usize {
    let s = t.state(after, |_, _| Keep::All);
    let file = s
        .names
        .iter()
        .filter(|(n, _)| n.starts_with("queue/") || n.starts_with("hold/"))
        .find(|(n, _)| n.ends_with(id))
        .map(|(_, &f)| f)
        .unwrap_or_else(|| panic!("{id} not found at its finish"));
    t.ops[after..]
        .iter()
        .position(
            |o| matches!(o, MOp::Write { file: f, offset: 0, data } if *f == file && data == &[0]),
        )
        .map(|p| p + after)
        .unwrap_or_else(|| panic!("{id}: no done mark written"))
}

/// Recovers the spool at `dir` and checks it against what the workload
/// had done. Returns the finished messages that came back.
fn check(
    dir: &Path,
    sent: &Sent,
    e: &Expect,
    mark_durable: &dyn Fn(&str) -> bool,
    what: &str,
) -> Vec<String> {
    let spool = Spool::open(dir).unwrap();
    spool.enable_slots(Duration::ZERO).unwrap();
    let rec = spool
        .recover()
        .unwrap_or_else(|err| panic!("{what}: recovery failed: {err}"));
    // As the daemon does at start: a drop file a loss left in pickup/ is
    // removed if its message was queued, else back in the maildrop.
    crate::pickup::settle(&spool, &rec);
    let mut seen = BTreeSet::new();
    let mut back = Vec::new();
    // Messages the pickup queued, by content.
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for (meta, held) in rec
        .queued
        .iter()
        .map(|m| (m, false))
        .chain(rec.held.iter().map(|m| (m, true)))
    {
        let id = meta.id.as_str();
        assert!(seen.insert(id.to_string()), "{what}: {id} queued twice");
        assert!(e.begun.contains(id), "{what}: {id} was never sent");
        if e.finished.contains_key(id) {
            assert!(
                !mark_durable(id),
                "{what}: {id} came back although its done mark was durable"
            );
            back.push(id.to_string());
        }
        let area = if held { Area::Hold } else { Area::Queue };
        let m = spool
            .read_meta(area, id)
            .unwrap_or_else(|err| panic!("{what}: {id} not found by its id: {err}"));
        assert_eq!(m.id, id, "{what}");
        if !held {
            let (_, b) = spool
                .load(id)
                .unwrap_or_else(|err| panic!("{what}: {id} cannot be loaded: {err}"));
            match sent.msgs.get(id) {
                Some((want, _)) => assert_eq!(&b, want, "{what}: {id} damaged"),
                None => bodies.push(b),
            }
        }
        if let Some(env) = sent.envs.get(id) {
            let got = m.envelope();
            assert_eq!(
                (&got.dsn, &got.rcpt_dsn),
                (&env.dsn, &env.rcpt_dsn),
                "{what}: {id} lost its DSN parameters"
            );
        }
        if e.warned.contains(id) {
            assert!(
                m.warned,
                "{what}: {id} had its delay notice queued, but its `warned` record is lost: \
                 a second notice would be sent"
            );
        }
        for (pid, idx) in &e.partial {
            if pid == id {
                assert!(
                    meta.recipients[*idx].state != format::RcptState::Pending,
                    "{what}: {id} recipient {idx} delivered durably but pending again"
                );
            }
        }
        if e.held.contains(id) && !e.finished.contains_key(id) {
            assert!(held, "{what}: {id} was held, now queued");
        }
    }
    for id in &e.acked {
        if !e.finished.contains_key(id) {
            assert!(
                seen.contains(id),
                "{what}: acknowledged {id} lost (not recovered)"
            );
        }
    }
    // Rule 2: a failure is recorded (or its message removed) only once the
    // bounce reporting it is queued.
    for id in &e.bounces {
        let failed = if seen.contains(id) {
            let area = if e.held.contains(id) {
                Area::Hold
            } else {
                Area::Queue
            };
            spool.read_meta(area, id).is_ok_and(|m| {
                m.recipients
                    .iter()
                    .any(|r| r.state == format::RcptState::Failed)
            })
        } else {
            e.finished.contains_key(id)
        };
        let made = e.made.get(id).map(Vec::as_slice).unwrap_or_default();
        if failed {
            assert!(
                made.iter().any(|b| seen.contains(b)),
                "{what}: {id} has a failure recorded (or is gone) but no bounce for it"
            );
        }
    }
    // A drop file is queued once: it is in maildrop/ or queued, and both
    // only while the pickup is between the two.
    for name in &e.dropped {
        let line = &sent.drops[name];
        let copies = bodies
            .iter()
            .filter(|b| b.windows(line.len()).any(|w| w == &line[..]))
            .count();
        // Under its own name, or under a message id when settled back.
        let waiting = fs::read_dir(dir.join("maildrop"))
            .unwrap()
            .flatten()
            .filter_map(|f| fs::read(f.path()).ok())
            .any(|d| format::decode(&d).is_ok() && d.windows(line.len()).any(|w| w == &line[..]));
        assert!(
            copies + usize::from(waiting) >= 1,
            "{what}: drop file {name} lost (neither in maildrop/ nor queued)"
        );
        if e.picked.contains(name) {
            assert_eq!(
                (copies, waiting),
                (1, false),
                "{what}: drop file {name} queued, and (copies, still in maildrop/)"
            );
        }
    }
    // Nothing stranded: names are ids, slots without names hold nothing
    // unfinished, nothing acknowledged is in corrupt/.
    for area in ["queue", "hold"] {
        for e2 in fs::read_dir(dir.join(area)).unwrap() {
            let e2 = e2.unwrap();
            let name = e2.file_name().into_string().unwrap();
            let data = fs::read(e2.path()).unwrap();
            let (meta, _) = format::decode(&data)
                .unwrap_or_else(|err| panic!("{what}: {area}/{name} left undecodable: {err}"));
            assert_eq!(meta.id, name, "{what}: {area}/{name} holds {}", meta.id);
            assert!(seen.contains(&name), "{what}: {area}/{name} not queued");
        }
    }
    for e2 in fs::read_dir(dir.join("slots")).unwrap() {
        let e2 = e2.unwrap();
        if e2.metadata().unwrap().nlink() > 1 {
            continue;
        }
        if let Ok((meta, _)) = format::decode(&fs::read(e2.path()).unwrap()) {
            assert!(
                meta.is_done(),
                "{what}: slot {:?} strands {}",
                e2.file_name(),
                meta.id
            );
        }
    }
    for e2 in fs::read_dir(dir.join("corrupt")).unwrap() {
        let e2 = e2.unwrap();
        if e2.file_type().unwrap().is_dir() {
            // corrupt/maildrop: refused drop files, never acknowledged.
            continue;
        }
        let data = fs::read(e2.path()).unwrap();
        if let Ok(Some(m)) = format::decode_header(&data) {
            assert!(
                !e.acked.contains(&m.id) || e.finished.contains_key(&m.id),
                "{what}: acknowledged {} moved to corrupt/",
                m.id
            );
        }
    }
    // A second recovery finds the same and has nothing to put right.
    drop(spool);
    let spool = Spool::open(dir).unwrap();
    spool.enable_slots(Duration::ZERO).unwrap();
    let again = spool.recover().unwrap();
    let ids: BTreeSet<String> = again
        .queued
        .iter()
        .chain(again.held.iter())
        .map(|m| m.id.clone())
        .collect();
    assert_eq!(ids, seen, "{what}: a second recovery differs");
    assert_eq!(
        (again.relinked, again.stale_names),
        (0, 0),
        "{what}: a second recovery had work left"
    );
    back
}

fn scratch() -> tempfile::TempDir {
    // tmpfs when there is one: a few thousand small spools are written,
    // and the recording (which tells files apart by device and inode)
    // sees no other test's files there.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// One recording at a time: the recorder is global, and a workload's
/// operations must not mix with another's.
static RECORDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A spool whose directories exist (and are durable) before a workload.
fn spool_for_workload() -> (tempfile::TempDir, PathBuf) {
    let work = scratch();
    let root = work.path().join("spool");
    fs::create_dir_all(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
    drop(Spool::open(&root).unwrap());
    super::maildrop::prepare(&root).unwrap();
    (work, root)
}

#[test]
fn every_crash_state_recovers_without_loss_or_stale_duplicates() {
    let _one = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
    let (work, root) = spool_for_workload();
    record::start(&root);
    let sent = workload(&root);
    explore(work.path(), &sent, record::stop(), 300);
}

#[test]
fn every_crash_state_of_notices_and_local_submission_recovers() {
    let _one = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
    let (work, root) = spool_for_workload();
    record::start(&root);
    let sent = notices_workload(&root);
    explore(work.path(), &sent, record::stop(), 150);
}

/// Builds every state a loss at each point of the recording `rec` can
/// leave, recovers it and checks it (see the module documentation).
fn explore(work: &Path, sent: &Sent, rec: Vec<(u128, Op)>, min_ops: usize) {
    let trace = Trace::new(State::default(), HashMap::new(), rec);
    let n = trace.ops.len();
    assert!(n > min_ops, "the workload recorded only {n} operations");

    // When each finished message's done mark became durable, and how long
    // after it was written (the window, checked).
    let mut durable_at: BTreeMap<String, usize> = BTreeMap::new();
    let mut worst = Duration::ZERO;
    let all = expect(&trace, n);
    for (id, &at) in &all.finished {
        let w = done_mark(&trace, at, id);
        let d = trace.durable_after[w]
            .unwrap_or_else(|| panic!("{id}: its done mark was never synced"));
        let lag = Duration::from_micros((trace.at[d] - trace.at[w]) as u64);
        worst = worst.max(lag);
        durable_at.insert(id.clone(), d);
    }
    assert!(
        worst <= WINDOW + SLACK,
        "a done mark took {worst:?} to be durable (window {WINDOW:?})"
    );

    if std::env::var_os("RELAYQ_CRASH_DUMP").is_some() {
        for (i, op) in trace.ops.iter().enumerate() {
            let op = match op {
                MOp::Write { file, offset, data } => format!(
                    "write f{file} @{offset} {}B {:?}",
                    data.len(),
                    String::from_utf8_lossy(&data[..data.len().min(40)])
                ),
                o => format!("{o:?}"),
            };
            eprintln!("{i}: {op} durable_after={:?}", trace.durable_after[i]);
        }
    }
    let out = work.join("state");
    let mut rng = fastrand::Rng::with_seed(17);
    let started = Instant::now();
    let (mut states, mut dups, mut second) = (0usize, BTreeSet::new(), 0usize);
    for k in 0..=n {
        let e = expect(&trace, k);
        let durable = |id: &str| durable_at.get(id).is_some_and(|&d| d < k);
        let unsynced: Vec<usize> = (0..k)
            .filter(|&i| {
                !trace.durable(i, k) && matches!(trace.ops[i], MOp::Write { .. } | MOp::Dir { .. })
            })
            .collect();
        let mut choices: Vec<(String, Chooser)> = vec![
            ("all kept".into(), Box::new(|_, _| Keep::All)),
            ("all lost".into(), Box::new(|_, _| Keep::None)),
            (
                "data kept, directory operations lost".into(),
                Box::new(|_, o| match o {
                    MOp::Write { .. } => Keep::All,
                    _ => Keep::None,
                }),
            ),
            (
                "directory operations kept, data lost".into(),
                Box::new(|_, o| match o {
                    MOp::Dir { .. } => Keep::All,
                    _ => Keep::None,
                }),
            ),
        ];
        // ALICE's single omissions: each unsynced directory operation
        // lost alone (the last few, where the states differ).
        for &i in unsynced
            .iter()
            .filter(|&&i| matches!(trace.ops[i], MOp::Dir { .. }))
            .rev()
            .take(4)
        {
            choices.push((
                format!("only op {i} lost"),
                Box::new(move |j, _| if j == i { Keep::None } else { Keep::All }),
            ));
        }
        for r in 0..4 {
            let seed = rng.u64(..);
            let mut pick = fastrand::Rng::with_seed(seed);
            choices.push((
                format!("random subset {r} (seed {seed})"),
                Box::new(move |_, o| match (o, pick.u8(..4)) {
                    (_, 0) => Keep::None,
                    (MOp::Write { .. }, 1) => {
                        let s = pick.u64(..);
                        Keep::Torn(Box::new(move |sector| {
                            fastrand::Rng::with_seed(s ^ sector as u64).bool()
                        }))
                    }
                    _ => Keep::All,
                }),
            ));
        }
        if unsynced.is_empty() {
            // One state only: what was synced.
            choices.truncate(1);
        }
        for (name, keep) in choices {
            let s = trace.state(k, keep);
            materialize(&s, &out);
            let what = format!("loss after op {k} of {n} ({name})");
            for id in check(&out, sent, &e, &durable, &what) {
                dups.insert(id);
            }
            states += 1;
            // A second loss in the middle of recovering from this one.
            if k % 25 == 0 && name == "all lost" {
                second += second_loss(&s, &out, sent, &e, &durable, &what, &mut rng);
            }
        }
    }
    eprintln!(
        "crash states: {states} after {n} recorded operations, {second} more after a second \
         loss during recovery, in {:.1} s; {} acknowledged; {} finished messages came back \
         in some state, all within their window (longest done-mark delay {worst:?}, window {WINDOW:?})",
        started.elapsed().as_secs_f64(),
        all.acked.len(),
        dups.len()
    );
}

/// Recovers from state `s` while recording, then checks the states a loss
/// at each point of that recovery leaves. Returns how many.
fn second_loss(
    s: &State,
    dir: &Path,
    sent: &Sent,
    e: &Expect,
    durable: &dyn Fn(&str) -> bool,
    what: &str,
    rng: &mut fastrand::Rng,
) -> usize {
    materialize(s, dir);
    let (init, inos) = read_state(dir);
    record::start(dir);
    {
        let spool = Spool::open(dir).unwrap();
        spool.enable_slots(WINDOW).unwrap();
        spool.recover().unwrap();
        spool.flush_done_marks();
    }
    let t = Trace::new(init, inos, record::stop());
    let mut count = 0;
    for k in 0..=t.ops.len() {
        let seed = rng.u64(..);
        for (name, keep) in [
            (
                "all lost",
                Box::new(|_: usize, _: &MOp| Keep::None) as Chooser,
            ),
            ("all kept", Box::new(|_: usize, _: &MOp| Keep::All)),
            ("random", {
                let mut pick = fastrand::Rng::with_seed(seed);
                Box::new(move |_: usize, _: &MOp| if pick.bool() { Keep::All } else { Keep::None })
            }),
        ] {
            let s2 = t.state(k, keep);
            let sub = dir.with_extension("second");
            materialize(&s2, &sub);
            check(
                &sub,
                sent,
                e,
                durable,
                &format!("{what}, then a loss after op {k} of its recovery ({name})"),
            );
            count += 1;
        }
    }
    count
}

/// `limits.json` (see `replace_file`): after a loss at any point of a run
/// of saves it holds a whole save, and none older than the last one that
/// returned (so a loss costs at most the counts since, about a second).
#[test]
fn every_crash_state_of_a_replaced_file_holds_a_whole_recent_version() {
    let _one = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
    let (work, root) = spool_for_workload();
    let path = root.join("limits.json");
    let version = |v: usize| {
        format!(
            "{{\"version\":1,\"saved\":{v},\"pad\":\"{}\"}}",
            "x".repeat(v * 300)
        )
    };
    record::start(&root);
    for v in 0..4 {
        super::replace_file(&path, version(v).as_bytes()).unwrap();
        record::mark(format!("saved {v}"));
    }
    let trace = Trace::new(State::default(), HashMap::new(), record::stop());
    let n = trace.ops.len();
    let out = work.path().join("state");
    let mut states = 0;
    for k in 0..=n {
        // The saves made before the loss.
        let saved: Vec<usize> = trace.ops[..k]
            .iter()
            .filter_map(|o| match o {
                MOp::Mark(m) => m.strip_prefix("saved ").and_then(|v| v.parse().ok()),
                _ => None,
            })
            .collect();
        let choices: Vec<(&str, Chooser)> = vec![
            ("all kept", Box::new(|_, _| Keep::All)),
            ("all lost", Box::new(|_, _| Keep::None)),
            (
                "directory operations kept, data lost",
                Box::new(|_, o| match o {
                    MOp::Dir { .. } => Keep::All,
                    _ => Keep::None,
                }),
            ),
            (
                "data kept, directory operations lost",
                Box::new(|_, o| match o {
                    MOp::Write { .. } => Keep::All,
                    _ => Keep::None,
                }),
            ),
        ];
        for (name, keep) in choices {
            materialize(&trace.state(k, keep), &out);
            let what = format!("loss after op {k} of {n} ({name})");
            let got = fs::read_to_string(out.join("limits.json")).ok();
            let oldest = saved.last().copied();
            match (&got, oldest) {
                (None, None) => {}
                (None, Some(v)) => panic!("{what}: limits.json gone, though save {v} was made"),
                (Some(text), _) => {
                    let v = (0..4).find(|&v| *text == version(v)).unwrap_or_else(|| {
                        panic!("{what}: limits.json is not a whole save: {text:?}")
                    });
                    assert!(
                        oldest.is_none_or(|o| v >= o),
                        "{what}: limits.json holds save {v}, older than save {oldest:?}"
                    );
                }
            }
            states += 1;
        }
    }
    eprintln!("replaced file: {states} crash states after {n} operations");
}
