//! Power loss: what a machine crash can leave on disk, beyond `kill -9`
//! (see `durability`). Here: the states a lost directory operation leaves
//! (built by hand, exactly as a power cut can leave them), and, with the
//! spool on LazyFS, real losses of every unsynced write in every phase of
//! the daemon's work (`lazyfs_power_loss_rounds`, run by CI).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::durability::{Tally, sender, subject};
use crate::support::client::{queue_id, send_mail};
use crate::support::daemon::{Daemon, relay_config};
use crate::support::upstream::{FakeUpstream, Script};

const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn out(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// How a power loss left the names of a reused slot `S` that held OLD
/// (delivered: NUL written, `queue/OLD` unlinked, neither synced) and now
/// holds X (written and fdatasynced, `queue/X` linked, not synced, `250`).
#[derive(Debug, Clone, Copy)]
enum Names {
    /// The case: `queue/OLD` survived, `queue/X` did not.
    StaleInQueue,
    /// OLD had been deleted from hold: `hold/OLD` survived.
    StaleInHold,
    /// Both names survived.
    Both,
    /// Only `queue/X` was lost (no name at all).
    NoName,
}

fn sorted(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_name_left_by_a_power_loss_delivers_its_message_once() {
    for names in [
        Names::StaleInQueue,
        Names::StaleInHold,
        Names::Both,
        Names::NoName,
    ] {
        stale_name(names).await;
    }
}

async fn stale_name(names: Names) {
    let busy = Script::default().rcpt("bob@example.net", 451, "4.2.1 mailbox busy, try later");
    let up = FakeUpstream::start().await;
    let mut d = Daemon::start(&relay_config(up.addr(), ""));
    let spool = d.spool();
    let old = queue_id(
        &send_mail(
            d.addr,
            "app@example.com",
            &["carol@example.net"],
            b"Subject: old\r\n\r\ndelivered before the loss\r\n",
        )
        .await,
    );
    d.wait_log(&format!("{old}: removed"), WAIT);
    up.set_script(busy);
    let x = queue_id(
        &send_mail(
            d.addr,
            "app@example.com",
            &["bob@example.net"],
            b"Subject: X\r\n\r\nacknowledged, then the power went\r\n",
        )
        .await,
    );
    let line = d.wait_log(&format!("{x}: to=<bob@example.net>"), WAIT);
    assert!(line.contains("status=deferred"), "{line}");
    assert!(d.stop());
    // X went into OLD's file: one slot, holding X.
    let slots = sorted(&spool.join("slots"));
    assert_eq!(slots.len(), 1, "{names:?}: {slots:?}");
    let q = spool.join("queue");
    match names {
        Names::StaleInQueue => std::fs::rename(q.join(&x), q.join(&old)).unwrap(),
        Names::StaleInHold => std::fs::rename(q.join(&x), spool.join("hold").join(&old)).unwrap(),
        Names::Both => std::fs::hard_link(q.join(&x), q.join(&old)).unwrap(),
        Names::NoName => std::fs::remove_file(q.join(&x)).unwrap(),
    }

    // With the daemon down, the tools find X by its id.
    let list = out(&d.cli(&["queue", "list"]));
    if !matches!(names, Names::NoName) {
        assert_eq!(list.matches(&x).count(), 1, "{names:?}: {list}");
        assert!(!list.contains(&old), "{names:?}: {list}");
        let show = out(&d.cli(&["queue", "show", &x]));
        assert!(show.contains(&format!("queue id:    {x}")), "{show}");
        assert!(show.contains("mailbox busy"), "{show}");
        assert!(show.contains("Subject: X"), "{show}");
    }
    if matches!(names, Names::StaleInHold) {
        // Changing it while the daemon is down puts the names right first.
        let r = out(&d.cli(&["queue", "requeue", &x]));
        assert!(r.starts_with("requeued: 1 message"), "{r}");
        assert_eq!(sorted(&q), vec![x.clone()]);
        assert!(sorted(&spool.join("hold")).is_empty());
    }

    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "recovered queue:", WAIT);
    assert!(line.contains("1 queued, 0 on hold"), "{names:?}: {line}");
    assert_eq!(sorted(&q), vec![x.clone()], "{names:?}");
    let show = out(&d.cli(&["queue", "show", &x]));
    assert!(
        show.contains(&format!("queue id:    {x} (queue)")),
        "{show}"
    );
    up.set_script(Script::default());
    let flushed = out(&d.cli(&["queue", "flush"]));
    assert!(
        flushed.contains("flushed: 1 deferred"),
        "{names:?}: {flushed}"
    );
    d.wait_log_since(mark, &format!("{x}: removed"), WAIT);
    let subjects = |up: &FakeUpstream| -> Vec<String> {
        let mut v: Vec<String> = up
            .messages()
            .iter()
            .map(|m| {
                m.text()
                    .lines()
                    .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                    .unwrap_or_default()
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(subjects(&up), vec!["X", "old"], "{names:?}");
    assert!(!d.log().contains("nothing to deliver"), "{}", d.log());

    // And once only: a restart finds nothing left to send.
    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "recovered queue:", WAIT);
    assert!(line.contains("0 queued"), "{names:?}: {line}");
    let c = queue_id(
        &send_mail(
            d.addr,
            "app@example.com",
            &["dave@example.net"],
            b"Subject: control\r\n\r\nafter\r\n",
        )
        .await,
    );
    d.wait_log_since(mark, &format!("{c}: removed"), WAIT);
    assert_eq!(subjects(&up), vec!["X", "control", "old"], "{names:?}");
}

/// A move to hold/ (or back) renames, then syncs hold/ and queue/: a power
/// loss between the two syncs can leave the message under both names, and
/// recovery keeps it on hold. Until the daemon has recovered, the tools
/// must see it as held too, and releasing it must release it: a rename
/// of one name of a file onto another name of the same file does nothing,
/// so `queue release` said "released" and the message stayed on hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_left_under_both_names_is_held_until_released() {
    let up = FakeUpstream::start_with(Script::default().mail_reply(451, "4.3.0 down")).await;
    let mut d = Daemon::start(&relay_config(up.addr(), ""));
    let spool = d.spool();
    let mut ids = Vec::new();
    for subject in ["held", "released"] {
        let id = queue_id(
            &send_mail(
                d.addr,
                "app@example.com",
                &["bob@example.net"],
                format!("Subject: {subject}\r\n\r\nput on hold\r\n").as_bytes(),
            )
            .await,
        );
        d.wait_log(&format!("{id}: to=<bob@example.net>"), WAIT);
        let o = d.cli(&["queue", "hold", &id]);
        assert!(out(&o).starts_with("put on hold: 1"), "{}", out(&o));
        ids.push(id);
    }
    assert!(d.stop());
    // The power loss kept the queue/ names the renames had removed.
    for id in &ids {
        std::fs::hard_link(spool.join("hold").join(id), spool.join("queue").join(id)).unwrap();
    }

    let list = out(&d.cli(&["queue", "list"]));
    for id in &ids {
        assert_eq!(list.matches(id.as_str()).count(), 1, "{list}");
        assert!(list.contains(&format!("{id}!")), "not shown held: {list}");
    }
    let show = out(&d.cli(&["queue", "show", &ids[0]]));
    assert!(show.contains(&format!("{} (hold)", ids[0])), "{show}");
    let r = out(&d.cli(&["queue", "release", &ids[1]]));
    assert!(r.starts_with("released: 1 message"), "{r}");
    assert_eq!(sorted(&spool.join("hold")), vec![ids[0].clone()]);
    assert!(sorted(&spool.join("queue")).contains(&ids[1]));

    up.set_script(Script::default());
    let mark = d.log_mark();
    d.restart();
    let line = d.wait_log_since(mark, "recovered queue:", WAIT);
    assert!(line.contains("1 queued, 1 on hold"), "{line}");
    d.flush();
    d.wait_log_since(mark, &format!("{}: removed", ids[1]), WAIT);
    let list = out(&d.cli(&["queue", "list"]));
    assert!(list.contains(&format!("{}!", ids[0])), "{list}");
    assert!(!list.contains(&ids[1]), "{list}");
    let subjects: Vec<String> = up
        .messages()
        .iter()
        .map(crate::durability::subject)
        .collect();
    assert_eq!(subjects, vec!["released"]);
}

/// A LazyFS mount: a FUSE file system that keeps every write in its own
/// cache until it is fsynced, and drops what is unsynced on command (a
/// power loss for data; directory operations pass straight through).
pub(crate) struct LazyFs {
    bin: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) mnt: PathBuf,
    fifo: PathBuf,
    done: PathBuf,
    child: Option<Child>,
    /// Our end of LazyFS's completion FIFO, open for as long as it runs:
    /// its command reader waits until someone opens it.
    done_reader: Option<std::fs::File>,
}

impl LazyFs {
    pub(crate) fn start(bin: &Path, dir: &Path) -> LazyFs {
        let (root, mnt) = (dir.join("root"), dir.join("mnt"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let (fifo, done) = (dir.join("faults.fifo"), dir.join("done.fifo"));
        std::fs::write(
            dir.join("lazyfs.toml"),
            format!(
                "[faults]\nfifo_path=\"{}\"\nfifo_path_completed=\"{}\"\n[cache]\napply_eviction=false\n\
                 [cache.simple]\ncustom_size=\"256mb\"\nblocks_per_page=1\n[filesystem]\n\
                 log_all_operations=false\nlogfile=\"{}\"\n",
                fifo.display(),
                done.display(),
                dir.join("lazyfs.log").display()
            ),
        )
        .unwrap();
        let mut fs = LazyFs {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            mnt,
            fifo,
            done,
            child: None,
            done_reader: None,
        };
        fs.mount();
        fs
    }

    fn mount(&mut self) {
        let root = self.dir.join("root");
        let child = Command::new(&self.bin)
            .arg(&self.mnt)
            .arg("--config-path")
            .arg(self.dir.join("lazyfs.toml"))
            .args(["-o", "allow_other", "-o", "modules=subdir"])
            .arg("-o")
            .arg(format!("subdir={}", root.display()))
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start lazyfs");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while !self.mounted() {
            assert!(Instant::now() < deadline, "LazyFS did not mount");
            std::thread::sleep(Duration::from_millis(50));
        }
        use std::os::unix::fs::OpenOptionsExt;
        self.done_reader = Some(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.done)
                .expect("completion FIFO"),
        );
    }

    fn mounted(&self) -> bool {
        std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.contains(&format!(" {} ", self.mnt.display())))
    }

    /// Sends a command to LazyFS's fault FIFO (never waiting for a reader
    /// that is gone: LazyFS must be running).
    fn command(&self, cmd: &str) {
        use std::os::unix::fs::OpenOptionsExt;
        // LazyFS opens the FIFO from a thread of its own, which may come
        // after the mount (ENXIO until then), or between two commands.
        let deadline = Instant::now() + WAIT;
        let mut f = loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.fifo)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!(
                    "LazyFS is not reading its fault FIFO ({e}); its log:\n{}",
                    std::fs::read_to_string(self.dir.join("lazyfs.log")).unwrap_or_default()
                ),
            }
        };
        f.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    }

    /// Drops every write not yet fsynced: the power loss.
    pub(crate) fn clear_cache(&self) {
        self.command("lazyfs::clear-cache");
        let mut reader = self.done_reader.as_ref().expect("mounted");
        let mut got = Vec::new();
        let deadline = Instant::now() + WAIT;
        while !String::from_utf8_lossy(&got).contains("finished::clear-cache") {
            let mut buf = [0u8; 256];
            match reader.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("completion FIFO: {e}"),
            }
            assert!(Instant::now() < deadline, "LazyFS did not clear its cache");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// LazyFS kills itself (losing its cache) at the next operation `op`
    /// on a path matching `rgx` (before or after it).
    fn crash_at(&self, timing: &str, op: &str, rgx: &str) {
        self.command(&format!(
            "lazyfs::crash::timing={timing}::op={op}::from_rgx={rgx}"
        ));
    }

    /// Waits until LazyFS has crashed itself: when it was seen gone.
    fn wait_crash(&mut self) -> Option<Instant> {
        let deadline = Instant::now() + WAIT;
        let mut child = self.child.take().expect("running");
        loop {
            if child.try_wait().unwrap().is_some() {
                return Some(Instant::now());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub(crate) fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    fn unmount(&mut self) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mnt)
            .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// The power-loss phases the issue lists.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    AcceptingUpstreamDown,
    AcceptingWhileDelivering,
    Draining,
    SecondLossDuringRecovery,
    /// LazyFS crashes after a write to a new slot, before its fsync.
    TornNewSlot,
    /// LazyFS crashes at a step of an accept or a delivery.
    CrashAt(&'static str, &'static str, &'static str),
}

/// How long the daemon drains before the loss in the draining phases.
const DRAIN_BEFORE_LOSS: Duration = Duration::from_millis(2500);

/// What one round saw. `acked`: messages relayq (or `sendmail`) said it
/// had; `wrongly_sent`: deleted or held messages that went out.
#[derive(Default, Debug)]
pub(crate) struct Count {
    pub acked: usize,
    pub delivered: usize,
    pub lost: Vec<String>,
    pub duplicated: usize,
    /// The longest time between a duplicate's first delivery and the loss.
    pub oldest_duplicate: Duration,
    pub wrongly_sent: Vec<String>,
    /// Messages deleted as the operator asked.
    pub deleted: usize,
    /// Messages `queue list` showed more than once.
    pub listed_twice: Vec<String>,
}

/// How many times each subject `<prefix>-...` arrived, and when first.
pub(crate) fn arrivals(up: &FakeUpstream, prefix: &str) -> BTreeMap<String, (Instant, usize)> {
    let mut first: BTreeMap<String, (Instant, usize)> = BTreeMap::new();
    let prefix = format!("{prefix}-");
    for m in up
        .messages()
        .iter()
        .filter(|m| subject(m).starts_with(&prefix))
    {
        let e = first.entry(subject(m)).or_insert((m.at, 0));
        e.0 = e.0.min(m.at);
        e.1 += 1;
    }
    first
}

/// Counts what arrived of `acked` (subjects), duplicates measured from
/// `lost_at`.
pub(crate) fn count(
    up: &FakeUpstream,
    prefix: &str,
    acked: &BTreeSet<String>,
    lost_at: Instant,
) -> Count {
    let first = arrivals(up, prefix);
    let mut c = Count {
        acked: acked.len(),
        ..Count::default()
    };
    for s in acked {
        if first.contains_key(s) {
            c.delivered += 1;
        } else {
            c.lost.push(s.clone());
        }
    }
    for (at, times) in first.values() {
        if *times > 1 {
            c.duplicated += 1;
            c.oldest_duplicate = c
                .oldest_duplicate
                .max(lost_at.saturating_duration_since(*at));
        }
    }
    c
}

/// Waits until every subject in `want` arrived and `spool`'s queue is
/// empty (or a minute), then a while for anything sent again.
pub(crate) async fn drained(up: &FakeUpstream, spool: &Path, want: &BTreeSet<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: BTreeSet<String> = up.messages().iter().map(subject).collect();
        if (want.is_subset(&got) && queued(spool) == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Queue files in the spool's `queue/`.
pub(crate) fn queued(spool: &Path) -> usize {
    std::fs::read_dir(spool.join("queue"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().len() == 26)
                .count()
        })
        .unwrap_or(0)
}

pub(crate) async fn load(
    d: &Daemon,
    prefix: &str,
    until: impl Fn(usize) -> bool,
    tally: &Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..6)
        .map(|c| {
            tokio::spawn(sender(
                d.addr,
                prefix.to_string(),
                c,
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while !until(tally.count.load(Ordering::Relaxed)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    tasks
}

/// A daemon for round `n` with its spool on the mount (`spool-<n>`),
/// relaying to `up` (`relay_extra`: more of its `[relay]` section).
/// Retries come quickly: what the upstream deferred before a loss drains
/// on its own after the restart.
pub(crate) fn daemon_on(fs: &LazyFs, up: &FakeUpstream, n: usize, relay_extra: &str) -> Daemon {
    let spool = fs.mnt.join(format!("spool-{n}"));
    let work = fs.dir.join(format!("round-{n}"));
    std::fs::create_dir_all(&work).unwrap();
    let config = relay_config(
        up.addr(),
        &format!(
            "spool_dir = \"{}\"\n[queue]\nretry_min = \"1s\"\nretry_max = \"1s\"\n",
            spool.display()
        ),
    ) + relay_extra;
    Daemon::start_in(&work, &config)
}

/// One round: load in `phase`, a power loss, a restart; counts.
async fn round(fs: &mut LazyFs, up: &FakeUpstream, phase: Phase, n: usize) -> Count {
    let down = Script::default().mail_reply(451, "4.3.0 upstream down for the test");
    let spool = fs.mnt.join(format!("spool-{n}"));
    let prefix = format!("r{n}");
    let tally = Arc::new(Tally::default());
    let upstream_down = matches!(
        phase,
        Phase::AcceptingUpstreamDown
            | Phase::Draining
            | Phase::SecondLossDuringRecovery
            | Phase::TornNewSlot
    );
    up.set_script(if upstream_down {
        down.clone()
    } else {
        Script::default()
    });
    let mut d = daemon_on(fs, up, n, "");
    let before = up.messages().len();
    let lost_at;
    match phase {
        Phase::AcceptingUpstreamDown | Phase::AcceptingWhileDelivering => {
            let tasks = load(&d, &prefix, |c| c >= 400, &tally).await;
            d.kill9();
            lost_at = Instant::now();
            fs.clear_cache();
            for t in tasks {
                let _ = t.await;
            }
        }
        Phase::Draining | Phase::SecondLossDuringRecovery => {
            for t in load(&d, &prefix, |c| c >= 500, &tally).await {
                let _ = t.await;
            }
            // A slowish upstream, so that the loss comes well after the
            // first deliveries (a done mark left unsynced for seconds
            // would show as a duplicate that old).
            up.set_script(Script::default().reply_delay(Duration::from_millis(5)));
            let draining = Instant::now();
            while (up.messages().len() < before + 20 || draining.elapsed() < DRAIN_BEFORE_LOSS)
                && draining.elapsed() < WAIT
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            d.kill9();
            lost_at = Instant::now();
            fs.clear_cache();
            if phase == Phase::SecondLossDuringRecovery {
                // Again while it recovers and drains what is left.
                let mark = d.log_mark();
                d.restart();
                d.wait_log_since(mark, "recovered queue:", WAIT);
                tokio::time::sleep(Duration::from_millis(300)).await;
                d.kill9();
                fs.clear_cache();
            }
        }
        Phase::TornNewSlot | Phase::CrashAt(..) => {
            let (timing, op, rgx) = match phase {
                Phase::CrashAt(t, o, r) => (t, o, r),
                _ => ("after", "write", "slots/"),
            };
            let stop = Arc::new(AtomicBool::new(false));
            let tasks: Vec<_> = (0..6)
                .map(|c| {
                    tokio::spawn(sender(
                        d.addr,
                        prefix.clone(),
                        c,
                        stop.clone(),
                        tally.clone(),
                    ))
                })
                .collect();
            let deadline = Instant::now() + WAIT;
            while tally.count.load(Ordering::Relaxed) < 200 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            fs.crash_at(timing, op, rgx);
            let crashed = tokio::task::block_in_place(|| fs.wait_crash());
            lost_at = crashed.unwrap_or_else(Instant::now);
            stop.store(true, Ordering::Relaxed);
            d.kill9();
            tokio::task::block_in_place(|| fs.remount());
            for t in tasks {
                let _ = t.await;
            }
            assert!(
                crashed.is_some(),
                "{phase:?}: LazyFS never reached the fault; its log:\n{}",
                std::fs::read_to_string(fs.dir.join("lazyfs.log")).unwrap_or_default()
            );
        }
    }
    // Recover with the upstream up and let everything drain.
    up.set_script(Script::default());
    let mark = d.log_mark();
    d.restart();
    d.wait_log_since(mark, "recovered queue:", WAIT);
    let accepted: BTreeSet<String> = tally.accepted.lock().unwrap().keys().cloned().collect();
    drained(up, &spool, &accepted).await;
    assert!(d.stop(), "relayq exits cleanly; log:\n{}", d.log());
    count(up, &prefix, &accepted, lost_at)
}

/// The LazyFS that `RELAYQ_LAZYFS` names, mounted in a fresh temp dir
/// (kept as long as the mount), and `RELAYQ_LAZYFS_ROUNDS` (default 1).
pub(crate) fn lazyfs_from_env() -> (tempfile::TempDir, LazyFs, usize) {
    let bin = PathBuf::from(
        std::env::var_os("RELAYQ_LAZYFS").expect("RELAYQ_LAZYFS: path to the lazyfs binary"),
    );
    let rounds: usize = std::env::var("RELAYQ_LAZYFS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let fs = LazyFs::start(&bin, dir.path());
    (dir, fs, rounds)
}

/// Power losses with the spool on LazyFS, in every phase of the daemon's
/// work; run by CI (`.ci/run` builds LazyFS and points RELAYQ_LAZYFS at
/// it). Needs root and /dev/fuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs LazyFS (RELAYQ_LAZYFS), root and /dev/fuse; run by .ci/run"]
async fn lazyfs_power_loss_rounds() {
    let (_dir, mut fs, rounds) = lazyfs_from_env();
    let up = FakeUpstream::start().await;
    let phases = [
        Phase::AcceptingUpstreamDown,
        Phase::AcceptingWhileDelivering,
        Phase::Draining,
        Phase::SecondLossDuringRecovery,
        Phase::TornNewSlot,
        // An accept: its slot synced, not yet linked.
        Phase::CrashAt("before", "link", "slots/"),
        // A delivery: done mark written, name unlinked, neither synced.
        Phase::CrashAt("after", "unlink", "queue/"),
        // An accept: its slot written, the fsync not yet done.
        Phase::CrashAt("before", "fsync", "slots/"),
    ];
    let window = Duration::from_millis(100);
    let slack = Duration::from_secs(1);
    let (mut acked, mut delivered, mut lost, mut duplicated) = (0, 0, 0, 0);
    let mut oldest = Duration::ZERO;
    let mut n = 0;
    for _ in 0..rounds {
        for phase in phases {
            n += 1;
            // A fresh LazyFS each round: its cache starts empty.
            tokio::task::block_in_place(|| fs.remount());
            let c = round(&mut fs, &up, phase, n).await;
            eprintln!(
                "lazyfs round {n} ({phase:?}): acknowledged {}, delivered {}, lost {}, duplicated {} \
                 (first copies at most {} ms before the loss)",
                c.acked,
                c.delivered,
                c.lost.len(),
                c.duplicated,
                c.oldest_duplicate.as_millis()
            );
            assert!(c.lost.is_empty(), "{phase:?}: lost {:?}", c.lost);
            assert!(
                c.oldest_duplicate <= window + slack,
                "{phase:?}: a message delivered {:?} before the loss was sent again",
                c.oldest_duplicate
            );
            acked += c.acked;
            delivered += c.delivered;
            lost += c.lost.len();
            duplicated += c.duplicated;
            oldest = oldest.max(c.oldest_duplicate);
        }
    }
    eprintln!(
        "lazyfs power loss: {n} rounds, acknowledged {acked}, delivered {delivered}, lost {lost}, \
         duplicated {duplicated} (each delivered at most {} ms before its loss; window {} ms)",
        oldest.as_millis(),
        window.as_millis()
    );
}
