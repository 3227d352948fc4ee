//! Power loss during what an operator or a local program does, with the
//! spool on LazyFS (see `powerloss`): `queue delete ALL`, hold and release,
//! bounces, `sendmail` with the daemon down, the pickup of drop files, and
//! the relay limit counts. Each scenario loses every unsynced write right
//! after (or while) the operation runs, restarts, and counts what the
//! operator was told against what went out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::durability::{Tally, subject};
use crate::powerloss::{
    Count, LazyFs, arrivals, count, daemon_on, drained, lazyfs_from_env, load, out as ok, queued,
};
use crate::sendmail::{as_nobody, can_switch_user};
use crate::support::daemon::{BIN, Daemon};
use crate::support::upstream::{FakeUpstream, Script};

const WAIT: Duration = Duration::from_secs(30);

fn down() -> Script {
    Script::default().mail_reply(451, "4.3.0 upstream down for the test")
}

fn cli(d: &Daemon, args: &[&str]) -> Output {
    tokio::task::block_in_place(|| d.cli(args))
}

fn spool_of(d: &Daemon) -> PathBuf {
    let text = std::fs::read_to_string(&d.config).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("spool_dir = \""))
        .unwrap();
    PathBuf::from(line.trim_end_matches('"'))
}

/// Restarts after the loss with the upstream taking everything, flushes,
/// and waits until `want` arrived and the queue is empty (or a minute).
async fn recover_and_drain(d: &mut Daemon, up: &FakeUpstream, want: &BTreeSet<String>) {
    up.set_script(Script::default());
    let mark = d.log_mark();
    tokio::task::block_in_place(|| d.restart());
    d.wait_log_since(mark, "recovered queue:", WAIT);
    drain(d, up, want).await;
}

/// Flushes and waits until `want` arrived and the queue is empty (or a
/// minute).
async fn drain(d: &Daemon, up: &FakeUpstream, want: &BTreeSet<String>) {
    ok(&cli(d, &["queue", "flush"]));
    drained(up, &spool_of(d), want).await;
}

/// Queue ids `queue list --json` shows, with how many times each.
fn listed(d: &Daemon) -> BTreeMap<String, (String, usize)> {
    let out = ok(&cli(d, &["queue", "list", "--json"]));
    let mut seen: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(id) = v["queue_id"].as_str() {
            let e = seen
                .entry(id.to_string())
                .or_insert((v["queue_name"].as_str().unwrap_or("").to_string(), 0));
            e.1 += 1;
        }
    }
    seen
}

fn accepted(tally: &Tally) -> BTreeMap<String, String> {
    tally.accepted.lock().unwrap().clone()
}

/// A daemon for round `n` holding 300 messages the down upstream
/// deferred; the subjects' prefix, and what the clients were told.
async fn deferred_mail(fs: &LazyFs, up: &FakeUpstream, n: usize) -> (Daemon, String, Arc<Tally>) {
    up.set_script(down());
    let d = daemon_on(fs, up, n, "");
    let prefix = format!("o{n}");
    let tally = Arc::new(Tally::default());
    for t in load(&d, &prefix, |c| c >= 300, &tally).await {
        let _ = t.await;
    }
    (d, prefix, tally)
}

/// `queue delete ALL` answers, then the power goes: nothing it deleted is
/// sent after the restart, and the queue is empty.
async fn delete_all(fs: &mut LazyFs, up: &FakeUpstream, n: usize) -> Count {
    let (mut d, prefix, tally) = deferred_mail(fs, up, n).await;
    let out = ok(&cli(&d, &["queue", "delete", "ALL"]));
    assert!(out.starts_with("deleted: "), "{out}");
    d.kill9();
    let lost_at = Instant::now();
    fs.clear_cache();
    recover_and_drain(&mut d, up, &BTreeSet::new()).await;
    let mut c = count(up, &prefix, &BTreeSet::new(), lost_at);
    c.acked = accepted(&tally).len();
    c.deleted = c.acked;
    c.wrongly_sent = arrivals(up, &prefix).into_keys().collect();
    c.listed_twice = listed(&d).into_keys().collect();
    assert!(d.stop());
    c
}

/// Everything put on hold, half released, then the power goes (right
/// after the release answers, or, with `during`, while `hold ALL` runs):
/// the held half stays held (listed once each, never sent), the rest goes
/// out; then `release ALL` sends the held ones, once.
async fn hold_release(fs: &mut LazyFs, up: &FakeUpstream, n: usize, during: bool) -> Count {
    let (mut d, prefix, tally) = deferred_mail(fs, up, n).await;
    let ids = accepted(&tally);
    let mut by_id: Vec<(String, String)> =
        ids.iter().map(|(s, i)| (i.clone(), s.clone())).collect();
    by_id.sort();
    let (released, held): (Vec<_>, Vec<_>) =
        by_id.iter().enumerate().partition(|(k, _)| k % 2 == 0);
    let lost_at;
    if during {
        let config = d.config.clone();
        let hold = std::thread::spawn(move || {
            Command::new(BIN)
                .args(["queue", "hold", "ALL", "--config"])
                .arg(&config)
                .output()
                .unwrap()
        });
        // The loss once a few dozen are held.
        d.wait_lines(&["placed on hold"], 40, WAIT).await;
        d.kill9();
        lost_at = Instant::now();
        fs.clear_cache();
        let _ = hold.join();
    } else {
        let out = ok(&cli(&d, &["queue", "hold", "ALL"]));
        assert!(out.starts_with("put on hold: "), "{out}");
        let mut args = vec!["queue", "release"];
        args.extend(released.iter().map(|(_, (id, _))| id.as_str()));
        let out = ok(&cli(&d, &args));
        assert!(out.starts_with("released: "), "{out}");
        d.kill9();
        lost_at = Instant::now();
        fs.clear_cache();
    }
    let want: BTreeSet<String> = if during {
        BTreeSet::new()
    } else {
        released.iter().map(|(_, (_, s))| s.clone()).collect()
    };
    recover_and_drain(&mut d, up, &want).await;
    let mut c = Count::default();
    // Each message is listed once; those released are gone, the others
    // wait (held, or, for a loss during `hold ALL`, held or queued).
    let list = listed(&d);
    c.listed_twice = list
        .iter()
        .filter(|(_, (_, k))| *k > 1)
        .map(|(id, _)| id.clone())
        .collect();
    if !during {
        let sent = arrivals(up, &prefix);
        for (_, (id, s)) in &held {
            if sent.contains_key(s) {
                c.wrongly_sent.push(s.clone());
            }
            assert_eq!(
                list.get(id).map(|(q, _)| q.as_str()),
                Some("hold"),
                "{id} ({s}) is not held after the loss"
            );
        }
    }
    ok(&cli(&d, &["queue", "release", "ALL"]));
    let all: BTreeSet<String> = ids.keys().cloned().collect();
    drain(&d, up, &all).await;
    let c2 = count(up, &prefix, &all, lost_at);
    assert!(d.stop());
    Count {
        wrongly_sent: c.wrongly_sent,
        listed_twice: c.listed_twice,
        ..c2
    }
}

/// The upstream refuses the recipients of one client for good (550) and
/// takes the others; the power goes while mail comes in and goes out.
/// Every refused message gets its bounce (a message from `<>` quoting its
/// Subject), sent again only if it went out just before the loss.
async fn bounces(fs: &mut LazyFs, up: &FakeUpstream, n: usize) -> Count {
    up.set_script(Script::default().rcpt("c0@example.net", 550, "5.1.1 no such user"));
    let mut d = daemon_on(fs, up, n, "");
    let prefix = format!("o{n}");
    let tally = Arc::new(Tally::default());
    let tasks = load(&d, &prefix, |c| c >= 400, &tally).await;
    d.kill9();
    let lost_at = Instant::now();
    fs.clear_cache();
    for t in tasks {
        let _ = t.await;
    }
    let subjects: BTreeSet<String> = accepted(&tally).into_keys().collect();
    let (refused, taken): (BTreeSet<String>, BTreeSet<String>) = subjects
        .iter()
        .cloned()
        .partition(|s| s.starts_with(&format!("{prefix}-c0-")));
    up.set_script(Script::default().rcpt("c0@example.net", 550, "5.1.1 no such user"));
    let mark = d.log_mark();
    tokio::task::block_in_place(|| d.restart());
    d.wait_log_since(mark, "recovered queue:", WAIT);
    let bounces_of = |up: &FakeUpstream| -> BTreeMap<String, Vec<Instant>> {
        let mut by: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
        for m in up.messages().iter().filter(|m| m.mail_from.is_empty()) {
            let text = m.text();
            if let Some(s) = refused
                .iter()
                .find(|s| text.contains(&format!("Subject: {s}\r\n")))
            {
                by.entry(s.clone()).or_default().push(m.at);
            }
        }
        by
    };
    let spool = spool_of(&d);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: BTreeSet<String> = up.messages().iter().map(subject).collect();
        let bounced = bounces_of(up);
        if (taken.is_subset(&got)
            && refused.iter().all(|s| bounced.contains_key(s))
            && queued(&spool) == 0)
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c = count(up, &prefix, &taken, lost_at);
    c.acked = subjects.len();
    let bounced = bounces_of(up);
    for s in &refused {
        match bounced.get(s).map(Vec::as_slice) {
            None | Some([]) => c.lost.push(format!("bounce of {s}")),
            Some([_]) => c.delivered += 1,
            Some(times) => {
                c.delivered += 1;
                c.duplicated += 1;
                let first = times.iter().min().copied().unwrap_or(lost_at);
                c.oldest_duplicate = c
                    .oldest_duplicate
                    .max(lost_at.saturating_duration_since(first));
            }
        }
    }
    for s in arrivals(up, &prefix).into_keys() {
        if refused.contains(&s) {
            c.wrongly_sent.push(s);
        }
    }
    assert!(d.stop());
    c
}

/// `sendmail` processes writing while the power goes: `nobody`'s (through
/// the maildrop, the daemon picking up) or root's with the daemon down
/// (straight into queue/). A power loss kills every process, so those
/// still running are killed with the daemon. Every one that exited 0 is
/// delivered, and once (a picked-up file only if it went out just before).
async fn local_submission(
    fs: &mut LazyFs,
    up: &FakeUpstream,
    n: usize,
    pickup: bool,
) -> Option<Count> {
    if pickup && !can_switch_user() {
        return None;
    }
    up.set_script(Script::default());
    let mut d = daemon_on(fs, up, n, "");
    use std::os::unix::fs::PermissionsExt;
    for p in [&fs.dir, &d.dir] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    if !pickup {
        assert!(tokio::task::block_in_place(|| d.stop()));
    }
    let prefix = format!("o{n}");
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let running: Arc<Mutex<BTreeMap<u32, ()>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (config, acked, running, stop, prefix) = (
                d.config.clone(),
                acked.clone(),
                running.clone(),
                stop.clone(),
                prefix.clone(),
            );
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let s = format!("{prefix}-w{w}-m{i}");
                    let mut cmd = if pickup {
                        as_nobody(BIN)
                    } else {
                        Command::new(BIN)
                    };
                    cmd.args(["sendmail", "-C"])
                        .arg(&config)
                        .arg("-i")
                        .arg(format!("w{w}@example.net"));
                    let Ok(mut child) =
                        spawn_with_input(cmd, &format!("Subject: {s}\n\nfrom writer {w}\n"))
                    else {
                        return;
                    };
                    running.lock().unwrap().insert(child.id(), ());
                    let status = child.wait();
                    running.lock().unwrap().remove(&child.id());
                    if status.is_ok_and(|s| s.success()) && !stop.load(Ordering::Relaxed) {
                        acked.lock().unwrap().insert(s);
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while acked.lock().unwrap().len() < 60 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The loss: every process dies, then the unsynced writes go.
    stop.store(true, Ordering::Relaxed);
    let acked_now: BTreeSet<String> = acked.lock().unwrap().clone();
    for pid in running.lock().unwrap().keys() {
        unsafe {
            libc::kill(*pid as i32, libc::SIGKILL);
        }
    }
    d.kill9();
    let lost_at = Instant::now();
    fs.clear_cache();
    for w in writers {
        let _ = w.join();
    }
    recover_and_drain(&mut d, up, &acked_now).await;
    let mut c = count(up, &prefix, &acked_now, lost_at);
    c.listed_twice = listed(&d)
        .into_iter()
        .filter(|(_, (_, k))| *k > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(d.stop());
    Some(c)
}

fn spawn_with_input(mut cmd: Command, input: &str) -> std::io::Result<Child> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _ = child
        .stdin
        .take()
        .map(|mut s| s.write_all(input.as_bytes()));
    Ok(child)
}

/// A daily limit's count survives the loss: what went out before the last
/// save (once a second) is still counted after the restart.
async fn limit_counts(fs: &mut LazyFs, up: &FakeUpstream, n: usize) -> (usize, u64) {
    up.set_script(Script::default());
    let mut d = daemon_on(fs, up, n, "messages_per_day = 100000\n");
    let prefix = format!("o{n}");
    let tally = Arc::new(Tally::default());
    for t in load(&d, &prefix, |c| c >= 100, &tally).await {
        let _ = t.await;
    }
    let want: BTreeSet<String> = accepted(&tally).into_keys().collect();
    let deadline = Instant::now() + WAIT;
    while arrivals(up, &prefix).len() < want.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = arrivals(up, &prefix).len();
    // Saved within a second.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    d.kill9();
    fs.clear_cache();
    let mark = d.log_mark();
    tokio::task::block_in_place(|| d.restart());
    d.wait_log_since(mark, "recovered queue:", WAIT);
    let out = ok(&cli(&d, &["queue", "list", "--json"]));
    let used = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["relay"].is_string())
        .and_then(|v| v["limits"][0]["used"].as_u64())
        .unwrap_or_else(|| panic!("no relay limit in the listing: {out}\n{}", d.log()));
    assert!(d.stop());
    (sent, used)
}

/// Power losses during operations, with the spool on LazyFS; run by CI
/// with `lazyfs_power_loss_rounds`. Needs root and /dev/fuse, and a LazyFS
/// that makes sockets (`.ci/lazyfs-sockets.sh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs LazyFS (RELAYQ_LAZYFS), root and /dev/fuse; run by .ci/run"]
async fn lazyfs_power_loss_during_operations() {
    let (_dir, mut fs, rounds) = lazyfs_from_env();
    let up = FakeUpstream::start().await;
    let window = Duration::from_millis(100);
    let slack = Duration::from_secs(1);
    let mut n = 0;
    let mut totals = Count::default();
    for _ in 0..rounds {
        for what in [
            "delete ALL",
            "hold, release",
            "during hold ALL",
            "bounces",
            "sendmail, daemon down",
            "pickup",
            "limit counts",
        ] {
            if std::env::var("RELAYQ_LAZYFS_ONLY").is_ok_and(|o| !what.contains(o.as_str())) {
                continue;
            }
            n += 1;
            tokio::task::block_in_place(|| fs.remount());
            let c = match what {
                "delete ALL" => delete_all(&mut fs, &up, n).await,
                "hold, release" => hold_release(&mut fs, &up, n, false).await,
                "during hold ALL" => hold_release(&mut fs, &up, n, true).await,
                "bounces" => bounces(&mut fs, &up, n).await,
                "sendmail, daemon down" => local_submission(&mut fs, &up, n, false).await.unwrap(),
                "pickup" => match local_submission(&mut fs, &up, n, true).await {
                    Some(c) => c,
                    None => continue,
                },
                _ => {
                    let (sent, used) = limit_counts(&mut fs, &up, n).await;
                    eprintln!(
                        "lazyfs operation {n} ({what}): {sent} sent before the loss, {used} counted after it"
                    );
                    assert!(
                        used as usize >= sent,
                        "{what}: the count went from {sent} to {used}"
                    );
                    continue;
                }
            };
            eprintln!(
                "lazyfs operation {n} ({what}): acknowledged {}, delivered {}, deleted {}, lost {}, \
                 duplicated {} (first copies at most {} ms before the loss), wrongly sent {}, listed \
                 twice {}",
                c.acked,
                c.delivered,
                c.deleted,
                c.lost.len(),
                c.duplicated,
                c.oldest_duplicate.as_millis(),
                c.wrongly_sent.len(),
                c.listed_twice.len()
            );
            assert!(c.lost.is_empty(), "{what}: lost {:?}", c.lost);
            assert!(
                c.wrongly_sent.is_empty(),
                "{what}: deleted or held mail went out: {:?}",
                c.wrongly_sent
            );
            assert!(c.listed_twice.is_empty(), "{what}: {:?}", c.listed_twice);
            assert!(
                c.oldest_duplicate <= window + slack,
                "{what}: a message that went out {:?} before the loss was sent again",
                c.oldest_duplicate
            );
            totals.acked += c.acked;
            totals.delivered += c.delivered;
            totals.deleted += c.deleted;
            totals.duplicated += c.duplicated;
            totals.oldest_duplicate = totals.oldest_duplicate.max(c.oldest_duplicate);
        }
    }
    eprintln!(
        "lazyfs power loss during operations: {n} rounds, acknowledged {}, delivered {}, deleted {} \
         (as told), lost 0, duplicated {} (each sent at most {} ms before its loss), wrongly sent 0",
        totals.acked,
        totals.delivered,
        totals.deleted,
        totals.duplicated,
        totals.oldest_duplicate.as_millis()
    );
}
