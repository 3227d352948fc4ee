//! Far-upstream mode: the provider is 20 to 100 ms away, never on
//! loopback. A delay proxy in front of the sink delivers every chunk half a
//! round trip later in each direction (order kept), and a new connection
//! costs a round trip before the sink's greeting starts its way back.
//! relayq and Postfix, both at their default settings, relay the same
//! burst through the same proxy to the same sink; the figure is the drain
//! rate: messages the sink acknowledged (as the MTA saw the
//! acknowledgement) per second from the first message submitted to the
//! last acknowledged.
//!
//! Sinks: `smtp` (the bench's own sink: PIPELINING, no CHUNKING), `limit3`
//! (the same, refusing a fourth connection at once with "421 4.7.0 Too many
//! concurrent SMTP connections"), and `chunking` (Postfix's own smtpd, a
//! private instance discarding what it takes: CHUNKING and PIPELINING;
//! Postfix's smtp client does not use BDAT, relayq does). A last table
//! compares relayq's drain per connection (four fixed connections) to
//! Postfix's smtpd with CHUNKING offered and with it withheld
//! (`smtpd_discard_ehlo_keywords = chunking`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;

use super::{Args, accept_load, limited_sink, relayq_binary, setup_postfix, start_relayq};

/// What the sink says when it takes a message, in every sink's reply.
const TAKEN: &[u8] = b"queued as";

/// A TCP proxy that delays each direction by half a round trip and counts
/// the messages the sink acknowledged, as they reach the client.
struct Proxy {
    addr: SocketAddr,
    acked: Arc<AtomicU64>,
    /// When the last acknowledgement reached the client (ms since `born`).
    last_ack_ms: Arc<AtomicU64>,
    born: Instant,
    active: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

/// The proxy runs on threads of its own, with blocking sockets: a chunk is
/// held by a thread sleeping until it is due, which the kernel wakes within
/// tens of microseconds. An async timer has a millisecond's granularity and
/// rounds up: a 5 ms round trip became about 7 on the wire, a third more,
/// which costs most the MTA that waits on round trips rather than on CPU.
async fn proxy(upstream: SocketAddr, rtt: Duration) -> anyhow::Result<Proxy> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let p = Proxy {
        addr: listener.local_addr()?,
        acked: Arc::new(AtomicU64::new(0)),
        last_ack_ms: Arc::new(AtomicU64::new(0)),
        born: Instant::now(),
        active: Arc::new(AtomicUsize::new(0)),
        peak: Arc::new(AtomicUsize::new(0)),
    };
    let (acked, last, born) = (p.acked.clone(), p.last_ack_ms.clone(), p.born);
    let (active, peak) = (p.active.clone(), p.peak.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let (acked, last) = (acked.clone(), last.clone());
            let (active, peak) = (active.clone(), peak.clone());
            std::thread::spawn(move || {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // The handshake with a far host: one round trip.
                std::thread::sleep(rtt);
                if let Ok(server) = TcpStream::connect(upstream) {
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                        let up = std::thread::spawn(move || delayed(c2, s2, rtt / 2, None));
                        delayed(server, client, rtt / 2, Some((acked, last, born)));
                        let _ = up.join();
                    }
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok(p)
}

/// The round trip a proxy for `rtt` really gives: 50 one-byte pings
/// through it to an echo server, after the connection's handshake. Median
/// and slowest.
async fn measured_rtt(rtt: Duration) -> anyhow::Result<(Duration, Duration)> {
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let at = echo.local_addr()?;
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = echo.accept() {
            let _ = c.set_nodelay(true);
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
        }
    });
    let p = proxy(at, rtt).await?;
    let addr = p.addr;
    tokio::task::spawn_blocking(move || {
        let mut c = TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        let mut b = [0u8; 1];
        let mut times = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            c.write_all(b"x")?;
            c.read_exact(&mut b)?;
            times.push(t.elapsed());
        }
        times.sort();
        Ok((times[times.len() / 2], times[times.len() - 1]))
    })
    .await?
}

type AckCounter = (Arc<AtomicU64>, Arc<AtomicU64>, Instant);

/// Copies `from` to `to`, each chunk `delay` after it was read, in order;
/// counts acknowledgements on the way to the client. Ends both sockets
/// when `from` closes, once what it sent is delivered.
fn delayed(mut from: TcpStream, mut to: TcpStream, delay: Duration, acks: Option<AckCounter>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let ends = (from.try_clone(), to.try_clone());
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let mut tail: Vec<u8> = Vec::new();
    while let Ok((due, bytes)) = rx.recv() {
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if to.write_all(&bytes).is_err() {
            break;
        }
        if let Some((acked, last, born)) = &acks {
            // Count the pattern where it ends in this chunk (it may start
            // in the previous one).
            let keep = tail.len();
            tail.extend_from_slice(&bytes);
            let n = tail
                .windows(TAKEN.len())
                .enumerate()
                .filter(|(i, w)| *w == TAKEN && i + TAKEN.len() > keep)
                .count();
            if n > 0 {
                acked.fetch_add(n as u64, Ordering::SeqCst);
                last.store(born.elapsed().as_millis() as u64, Ordering::SeqCst);
            }
            let cut = tail.len().saturating_sub(TAKEN.len() - 1);
            tail.drain(..cut);
        }
    }
    // The other direction's threads block on these sockets: end them too.
    if let (Ok(a), Ok(b)) = ends {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    }
    let _ = reader.join();
}
/// The upstream behind the proxy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Smtp,
    Limit3,
    Chunking,
    /// Postfix's smtpd with CHUNKING withheld (for the per-connection
    /// comparison).
    NoChunking,
}

impl Upstream {
    fn parse(s: &str) -> anyhow::Result<Upstream> {
        Ok(match s {
            "smtp" => Upstream::Smtp,
            "limit3" => Upstream::Limit3,
            "chunking" => Upstream::Chunking,
            other => bail!("--far-upstreams: unknown {other:?} (smtp, limit3, chunking)"),
        })
    }

    fn label(self) -> &'static str {
        match self {
            Upstream::Smtp => "bench sink (PIPELINING)",
            Upstream::Limit3 => "bench sink, 421 to a 4th connection",
            Upstream::Chunking => "Postfix smtpd (CHUNKING, PIPELINING)",
            Upstream::NoChunking => "Postfix smtpd, CHUNKING withheld",
        }
    }
}

/// A running sink of either kind.
struct Sink {
    addr: SocketAddr,
    _postfix: Option<PostfixSink>,
}

async fn sink(kind: Upstream) -> anyhow::Result<Sink> {
    Ok(match kind {
        Upstream::Smtp | Upstream::Limit3 => {
            let limit = (kind == Upstream::Limit3).then_some(3);
            let s = limited_sink(Duration::ZERO, true, limit).await?;
            Sink {
                addr: s.addr,
                _postfix: None,
            }
        }
        Upstream::Chunking | Upstream::NoChunking => {
            let p = PostfixSink::start(kind == Upstream::Chunking)?;
            Sink {
                addr: p.addr,
                _postfix: Some(p),
            }
        }
    })
}

/// One system's run against one sink.
#[derive(Clone, Copy, Default)]
struct Run {
    rate: f64,
    acked: u64,
    secs: f64,
    peak: usize,
}

/// Sends the burst to `mta`, waits until the sink acknowledged all of it
/// (or `timeout`), and measures.
async fn burst(
    mta: SocketAddr,
    proxy: &Proxy,
    args: &Args,
    messages: usize,
    timeout: Duration,
) -> anyhow::Result<Run> {
    let start = proxy.born.elapsed();
    accept_load(mta, args.far_sessions.min(messages), messages, args.size).await?;
    let deadline = Instant::now() + timeout;
    while proxy.acked.load(Ordering::SeqCst) < messages as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let acked = proxy.acked.load(Ordering::SeqCst);
    let end = if acked >= messages as u64 {
        Duration::from_millis(proxy.last_ack_ms.load(Ordering::SeqCst))
    } else {
        proxy.born.elapsed()
    };
    let secs = end.saturating_sub(start).as_secs_f64().max(0.001);
    Ok(Run {
        rate: acked as f64 / secs,
        acked,
        secs,
        peak: proxy.peak.load(Ordering::SeqCst),
    })
}

/// relayq's concurrency and the reason of its last change, from `queue
/// list --json`.
fn relayq_concurrency(config: &Path) -> String {
    let out = Command::new(relayq_binary().unwrap_or_default())
        .args(["queue", "list", "--json", "--config"])
        .arg(config)
        .output();
    let Ok(out) = out else {
        return "?".into();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("\"relay\":"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            format!(
                "{} ({})",
                v["concurrency"],
                v["concurrency_change"]["reason"].as_str().unwrap_or("?")
            )
        })
        .unwrap_or_else(|| "?".into())
}

async fn relayq_run(
    kind: Upstream,
    rtt: Duration,
    concurrency: Option<usize>,
    args: &Args,
) -> anyhow::Result<(Run, String)> {
    let s = sink(kind).await?;
    let p = proxy(s.addr, rtt).await?;
    let r = start_relayq(p.addr, concurrency, "", None)?;
    let run = burst(r.addr, &p, args, args.far_messages, args.far_timeout()).await?;
    let settled = relayq_concurrency(&r._dir.path().join("relayq.toml"));
    if let Ok(log) = r.concurrency_log.lock() {
        for line in log.iter() {
            let text = line.split("): concurrency ").nth(1).unwrap_or(line);
            println!("    relayq lowered its concurrency: {text}");
        }
    }
    if run.acked < args.far_messages as u64 {
        bail!(
            "relayq: the sink acknowledged {} of {} messages within {:?}",
            run.acked,
            args.far_messages,
            args.far_timeout()
        );
    }
    Ok((run, settled))
}

async fn postfix_run(kind: Upstream, rtt: Duration, args: &Args) -> anyhow::Result<Run> {
    let s = sink(kind).await?;
    let p = proxy(s.addr, rtt).await?;
    let port = setup_postfix(p.addr)?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let run = burst(addr, &p, args, args.far_messages, args.far_timeout()).await;
    // What it could not deliver in time must not reach the next run.
    let _ = Command::new("postsuper").args(["-d", "ALL"]).output();
    let _ = Command::new("postfix").arg("stop").output();
    run
}

fn median(runs: &[Run]) -> Run {
    let mut v = runs.to_vec();
    v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    v.get(v.len() / 2).copied().unwrap_or_default()
}

pub async fn far(args: &Args) -> anyhow::Result<()> {
    let rtts: Vec<u64> = args
        .rtt_ms
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .context("--rtt-ms: milliseconds, e.g. 5,50,200")
        })
        .collect::<anyhow::Result<_>>()?;
    let kinds: Vec<Upstream> = args
        .far_upstreams
        .split(',')
        .map(|k| Upstream::parse(k.trim()))
        .collect::<anyhow::Result<_>>()?;
    println!(
        "\n== far upstream: {} messages of {} bytes from {} sessions, through a delay proxy; relayq and Postfix at their defaults",
        args.far_messages, args.size, args.far_sessions
    );
    println!(
        "other load at start: {:.0}% CPU of {} cores",
        super::other_cpu_percent(),
        super::cores()
    );
    let mut rows = Vec::new();
    for &rtt_ms in &rtts {
        let rtt = Duration::from_millis(rtt_ms);
        let (typical, worst) = measured_rtt(rtt).await?;
        println!(
            "  {rtt_ms} ms: the proxy's round trip, measured: median {:.2} ms, slowest {:.2} ms of 50",
            typical.as_secs_f64() * 1000.0,
            worst.as_secs_f64() * 1000.0
        );
        for &kind in &kinds {
            let mut rq = Vec::new();
            let mut pf = Vec::new();
            let mut settled = String::new();
            for round in 1..=args.rounds.max(1) {
                let (run, s) = relayq_run(kind, rtt, args.far_concurrency, args).await?;
                println!(
                    "  {rtt_ms} ms, {}: round {round}: relayq {:.1} msgs/s ({} in {:.2} s, at most {} connections, concurrency now {s})",
                    kind.label(),
                    run.rate,
                    run.acked,
                    run.secs,
                    run.peak
                );
                settled = s;
                rq.push(run);
                if args.compare_postfix {
                    let run = postfix_run(kind, rtt, args).await?;
                    println!(
                        "  {rtt_ms} ms, {}: round {round}: Postfix {:.1} msgs/s ({} of {} in {:.2} s, at most {} connections)",
                        kind.label(),
                        run.rate,
                        run.acked,
                        args.far_messages,
                        run.secs,
                        run.peak
                    );
                    pf.push(run);
                }
            }
            rows.push((
                rtt_ms,
                kind,
                median(&rq),
                (!pf.is_empty()).then(|| median(&pf)),
                settled,
            ));
        }
    }
    println!();
    println!(
        "| upstream | round trip | relayq msgs/s | Postfix msgs/s | ratio | relayq connections (peak; concurrency at the end) |"
    );
    println!("|---|---|---|---|---|---|");
    for (rtt_ms, kind, rq, pf, settled) in &rows {
        let (pf_rate, ratio) = match pf {
            Some(p) if p.acked < args.far_messages as u64 => (
                format!(
                    "{:.1} ({} of {} in {:.0} s)",
                    p.rate, p.acked, args.far_messages, p.secs
                ),
                format!("{:.2}x", rq.rate / p.rate),
            ),
            Some(p) => (
                format!("{:.1}", p.rate),
                format!("{:.2}x", rq.rate / p.rate),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {rtt_ms} ms | {:.1} | {pf_rate} | {ratio} | {}; {settled} |",
            kind.label(),
            rq.rate,
            rq.peak
        );
    }
    if kinds.contains(&Upstream::Chunking) {
        // Per connection: four fixed connections each way, the same server,
        // at the round trip the target names (50 ms) when it is
        // in the list, else the first.
        let rtt_ms = rtts.iter().copied().find(|&r| r == 50).unwrap_or(rtts[0]);
        let rtt = Duration::from_millis(rtt_ms);
        let mut with = Vec::new();
        let mut without = Vec::new();
        for _ in 0..args.rounds.max(1) {
            with.push(relayq_run(Upstream::Chunking, rtt, Some(4), args).await?.0);
            without.push(
                relayq_run(Upstream::NoChunking, rtt, Some(4), args)
                    .await?
                    .0,
            );
        }
        let (with, without) = (median(&with), median(&without));
        println!();
        println!("| relayq, 4 connections, {rtt_ms} ms | msgs/s | per connection |");
        println!("|---|---|---|");
        println!(
            "| {} | {:.1} | {:.1} |",
            Upstream::NoChunking.label(),
            without.rate,
            without.rate / 4.0
        );
        println!(
            "| {} | {:.1} | {:.1} ({:.2}x) |",
            Upstream::Chunking.label(),
            with.rate,
            with.rate / 4.0,
            with.rate / without.rate
        );
    }
    Ok(())
}

/// A private Postfix instance as the sink: its own smtpd on a loopback
/// port, discarding what it takes (the configuration of
/// tests/integration/support/postfix.rs, with `discard` as the transport).
/// Needs root and Debian's postfix package (installed with apt on first
/// use, as `--compare-postfix` does).
struct PostfixSink {
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl PostfixSink {
    fn start(chunking: bool) -> anyhow::Result<PostfixSink> {
        if unsafe { libc::geteuid() } != 0 {
            bail!("the CHUNKING sink is a private Postfix instance, which needs root");
        }
        super::install_postfix()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
        for sub in ["etc", "spool", "data"] {
            std::fs::create_dir(root.join(sub))?;
        }
        let owned = Command::new("chown")
            .arg("postfix")
            .arg(root.join("data"))
            .status()?;
        if !owned.success() {
            bail!("chown postfix {}: failed", root.join("data").display());
        }
        let withheld = if chunking {
            ""
        } else {
            "smtpd_discard_ehlo_keywords = chunking\n"
        };
        let main_cf = format!(
            "compatibility_level = 3.6\nmyhostname = sink.bench.test\nmydomain = bench.test\nmyorigin = bench.test\ninet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nqueue_directory = {root}/spool\ndata_directory = {root}/data\nmaillog_file = {root}/maillog\nmaillog_file_prefixes = {root}\nmydestination =\nmynetworks = 127.0.0.0/8\nsmtpd_relay_restrictions = permit_mynetworks, reject\ndefault_transport = discard\nrelay_transport = discard\nlocal_header_rewrite_clients =\nalias_maps =\nalias_database =\nsmtp_dns_support_level = disabled\nsmtpd_client_connection_count_limit = 0\nsmtpd_client_message_rate_limit = 0\n{withheld}",
            root = root.display()
        );
        std::fs::write(root.join("etc/main.cf"), main_cf)?;
        let services = [
            format!("127.0.0.1:{port} inet n - n - - smtpd"),
            "pickup unix n - n 60 1 pickup".into(),
            "cleanup unix n - n - 0 cleanup".into(),
            "qmgr unix n - n 300 1 qmgr".into(),
            "rewrite unix - - n - - trivial-rewrite".into(),
            "bounce unix - - n - 0 bounce".into(),
            "defer unix - - n - 0 bounce".into(),
            "trace unix - - n - 0 bounce".into(),
            "verify unix - - n - 1 verify".into(),
            "flush unix n - n 1000? 0 flush".into(),
            "proxymap unix - - n - - proxymap".into(),
            "showq unix n - n - - showq".into(),
            "error unix - - n - - error".into(),
            "retry unix - - n - - error".into(),
            "discard unix - - n - - discard".into(),
            "anvil unix - - n - 1 anvil".into(),
            "scache unix - - n - 1 scache".into(),
            "postlog unix-dgram n - n - 1 postlogd".into(),
        ];
        std::fs::write(root.join("etc/master.cf"), services.join("\n") + "\n")?;
        let sink = PostfixSink {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let st = Command::new("postfix")
            .arg("-c")
            .arg(sink.dir.path().join("etc"))
            .arg("start")
            .output()?;
        if !st.status.success() {
            bail!(
                "the Postfix sink did not start: {}",
                std::fs::read_to_string(sink.dir.path().join("maillog")).unwrap_or_default()
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(sink.addr).is_err() {
            if Instant::now() > deadline {
                bail!("the Postfix sink does not listen on {}", sink.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(sink)
    }
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.path().join("etc"))
            .arg("stop")
            .output();
    }
}
