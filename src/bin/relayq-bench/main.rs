//! relayq-bench: measures relayq (and, with --compare-postfix, Postfix as a
//! loopback null client) under the loads of issue 6, in one run, and prints
//! the figures and the ratios.
//!
//! It starts an in-process SMTP sink as the upstream, starts relayq (the
//! `relayq` binary next to this one) relaying to it, and drives SMTP load
//! from its own client (the same client for both systems, one command at a
//! time like Postfix's smtp-source). Only 127.0.0.1 is used. `--far` (or
//! `--only far`) adds the far-upstream mode (`far`): a delay proxy in front
//! of the sink.

mod attack;
mod far;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Clone)]
#[command(about = "Benchmark relayq (and Postfix) on this machine")]
struct Args {
    /// Messages for the concurrent accept test.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Concurrent client sessions for the accept test.
    #[arg(long, default_value_t = 20)]
    sessions: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 1000)]
    size: usize,
    /// Messages for the single-session latency test.
    #[arg(long, default_value_t = 2000)]
    latency_messages: usize,
    /// Messages for the slow-upstream test.
    #[arg(long, default_value_t = 400)]
    slow_messages: usize,
    /// Delay the slow upstream adds to every reply, in ms.
    #[arg(long, default_value_t = 50)]
    slow_delay_ms: u64,
    /// Connections to the slow upstream (relayq's concurrency and the
    /// per-message-connection model's).
    #[arg(long, default_value_t = 4)]
    slow_concurrency: usize,
    /// Messages for the large-queue test (0 skips it).
    #[arg(long, default_value_t = 0)]
    scale: usize,
    /// Also install (apt) and measure Postfix as a loopback null client.
    #[arg(long)]
    compare_postfix: bool,
    /// Tiny loads, for CI: checks that everything runs and counts add up.
    #[arg(long)]
    smoke: bool,
    /// Rounds of the main loads, relayq and Postfix interleaved; figures
    /// are the medians (the disk here is noisy, see BENCHMARKING.md).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Run only this part: "slow" (the slow-upstream test), "scale" (the
    /// large-queue test, with --scale N; with --baseline, both binaries
    /// interleaved over --rounds), "auth-flood" or "idle-flood" (the
    /// attacks of issue 16).
    #[arg(long)]
    only: Option<String>,
    /// auth-flood: attacking connections, each from its own loopback
    /// address.
    #[arg(long, default_value_t = 200)]
    flood_connections: usize,
    /// auth-flood and idle-flood: how long the attack lasts.
    #[arg(long, default_value_t = 60)]
    flood_seconds: u64,
    /// auth-flood: keep relayq's AUTH failure budgets on (by default they
    /// are off, to measure the bound on password checks alone).
    #[arg(long)]
    with_budgets: bool,
    /// idle-flood: idle connections from 127.0.0.1.
    #[arg(long, default_value_t = 2000)]
    idle_connections: usize,
    /// relayq's delivery connections to the sink in the main loads
    /// (`concurrency` in [relay]; Postfix's default allows 20 parallel
    /// deliveries to one destination).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Also run the far-upstream mode (a delay proxy in front of the sink;
    /// both systems at their defaults).
    #[arg(long)]
    far: bool,
    /// Far mode: the round trip the proxy adds, in ms (a list runs each).
    #[arg(long, default_value = "50")]
    rtt_ms: String,
    /// Far mode: the burst, messages and sessions.
    #[arg(long, default_value_t = 2000)]
    far_messages: usize,
    #[arg(long, default_value_t = 20)]
    far_sessions: usize,
    /// Far mode: the sinks, any of smtp (the bench's sink), limit3 (the
    /// same, 421 to a 4th connection), chunking (Postfix's smtpd).
    #[arg(long, default_value = "smtp,limit3,chunking")]
    far_upstreams: String,
    /// Far mode: relayq with this fixed concurrency instead of its
    /// default (adaptive), to compare.
    #[arg(long)]
    far_concurrency: Option<usize>,
    /// Far mode: how long a system may take to drain the burst (Postfix
    /// defers what a relay refuses and retries it minutes later).
    #[arg(long, default_value_t = 900)]
    far_timeout_s: u64,
    /// Also run relayq with `queue.done_sync_window = "0s"` (each done
    /// mark synced before the worker moves on), interleaved, to show what
    /// the group commit of done marks saves.
    #[arg(long)]
    compare_done_sync: bool,
    /// Another relayq binary (e.g. built from an earlier commit) to run
    /// interleaved with this one under the same loads: the cost of a
    /// change, measured in one run.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

impl Args {
    fn far_timeout(&self) -> Duration {
        Duration::from_secs(self.far_timeout_s)
    }
}

#[derive(Default, Clone)]
struct Figures {
    accept_rate: f64,
    accept_p50_ms: f64,
    accept_p99_ms: f64,
    single_p50_ms: f64,
    single_p99_ms: f64,
    drain_rate: f64,
    drain_lag_s: f64,
    mem_mb: f64,
    idle_mb: f64,
    cpu_ms_per_msg: f64,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.messages = 200;
        args.sessions = 5;
        args.latency_messages = 50;
        args.slow_messages = 20;
        args.slow_delay_ms = 5;
        args.scale = args.scale.min(300);
        args.far = true;
        args.far_messages = 60;
        args.far_sessions = 5;
        args.rtt_ms = "5".into();
        args.far_timeout_s = 120;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(only) = args.only.as_deref() {
        match only {
            "slow" => slow_upstream(&args).await?,
            "scale" if args.scale > 0 => scale_rounds(&args).await?,
            "auth-flood" => attack::auth_flood(&args).await?,
            "idle-flood" => attack::idle_flood(&args).await?,
            "far" => far::far(&args).await?,
            other => bail!(
                "--only {other:?}: the parts that run alone are \"slow\", \"far\", \"scale\" (with --scale N), \"auth-flood\" and \"idle-flood\""
            ),
        }
        println!("\nbench: ok");
        return Ok(());
    }
    println!(
        "relayq-bench: {} messages of {} bytes over {} sessions; {} back to back on one session; relayq delivers over {} connections",
        args.messages, args.size, args.sessions, args.latency_messages, args.concurrency
    );
    println!(
        "machine: {} cores; other load at start: {:.0}% CPU",
        cores(),
        other_cpu_percent()
    );
    let mut relayq_rounds = Vec::new();
    let mut postfix_rounds = Vec::new();
    let mut variants: Vec<(String, PathBuf, &str, Vec<Figures>)> = Vec::new();
    if args.compare_done_sync {
        let zero = "[queue]\ndone_sync_window = \"0s\"";
        variants.push((
            "relayq, done marks synced one by one".into(),
            relayq_binary()?,
            zero,
            Vec::new(),
        ));
    }
    if let Some(b) = &args.baseline {
        variants.push((
            format!("baseline {}", b.display()),
            b.clone(),
            "",
            Vec::new(),
        ));
    }
    for round in 1..=args.rounds.max(1) {
        if args.rounds > 1 {
            println!("\n-- round {round} of {}", args.rounds);
        }
        let r = bench_relayq(&args, &relayq_binary()?, "").await?;
        print_figures("relayq", &r);
        relayq_rounds.push(r);
        for (name, bin, extra, rounds) in &mut variants {
            println!("other CPU load now: {:.0}%", other_cpu_percent());
            let v = bench_relayq(&args, bin, extra).await?;
            print_figures(name, &v);
            rounds.push(v);
        }
        if args.compare_postfix {
            let p = bench_postfix(&args).await?;
            print_figures("postfix", &p);
            postfix_rounds.push(p);
        }
    }
    let relayq = median(&relayq_rounds);
    let postfix = (!postfix_rounds.is_empty()).then(|| median(&postfix_rounds));
    if args.rounds > 1 {
        println!("\nmedians of {} rounds:", args.rounds);
        print_figures("relayq", &relayq);
    }
    if !variants.is_empty() {
        println!();
        println!("| relayq against | accept msgs/s | drain msgs/s | accept ratio | drain ratio |");
        println!("|---|---|---|---|---|");
        for (name, _, _, rounds) in &variants {
            let v = median(rounds);
            println!(
                "| {name} | {:.0} vs {:.0} | {:.0} vs {:.0} | {:.3}x | {:.3}x |",
                relayq.accept_rate,
                v.accept_rate,
                relayq.drain_rate,
                v.drain_rate,
                relayq.accept_rate / v.accept_rate,
                relayq.drain_rate / v.drain_rate
            );
        }
    }
    if let Some(p) = &postfix {
        if args.rounds > 1 {
            print_figures("postfix", p);
        }
        println!();
        println!("| figure | relayq | postfix | ratio | target |");
        println!("|---|---|---|---|---|");
        row(
            "accept, msgs/s (20 sessions)",
            relayq.accept_rate,
            p.accept_rate,
            relayq.accept_rate / p.accept_rate,
            ">= 3x",
        );
        row(
            "single session p50, ms",
            relayq.single_p50_ms,
            p.single_p50_ms,
            relayq.single_p50_ms / p.single_p50_ms,
            "<= 0.5x",
        );
        row(
            "single session p99, ms",
            relayq.single_p99_ms,
            p.single_p99_ms,
            relayq.single_p99_ms / p.single_p99_ms,
            "<= 0.5x",
        );
        row(
            "drain, msgs/s",
            relayq.drain_rate,
            p.drain_rate,
            relayq.drain_rate / p.drain_rate,
            "as fast as it fills",
        );
        row(
            "memory under load, MB (relayq RSS, postfix PSS)",
            relayq.mem_mb,
            p.mem_mb,
            relayq.mem_mb / p.mem_mb,
            "<= 0.25x",
        );
        row(
            "CPU per message, ms",
            relayq.cpu_ms_per_msg,
            p.cpu_ms_per_msg,
            relayq.cpu_ms_per_msg / p.cpu_ms_per_msg,
            "",
        );
    }
    slow_upstream(&args).await?;
    if args.far {
        far::far(&args).await?;
    }
    if args.scale > 0 {
        scale(&args, &relayq_binary()?).await?;
    }
    println!("\nbench: ok");
    Ok(())
}

/// Each figure's median over the rounds.
fn median(rounds: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Figures {
        accept_rate: m(|f| f.accept_rate),
        accept_p50_ms: m(|f| f.accept_p50_ms),
        accept_p99_ms: m(|f| f.accept_p99_ms),
        single_p50_ms: m(|f| f.single_p50_ms),
        single_p99_ms: m(|f| f.single_p99_ms),
        drain_rate: m(|f| f.drain_rate),
        drain_lag_s: m(|f| f.drain_lag_s),
        mem_mb: m(|f| f.mem_mb),
        idle_mb: m(|f| f.idle_mb),
        cpu_ms_per_msg: m(|f| f.cpu_ms_per_msg),
    }
}

fn row(name: &str, a: f64, b: f64, ratio: f64, target: &str) {
    println!("| {name} | {a:.2} | {b:.2} | {ratio:.2}x | {target} |");
}

fn print_figures(name: &str, f: &Figures) {
    println!("\n== {name}");
    println!(
        "accept:  {:.0} msgs/s with fsync before 250; per-message p50 {:.2} ms, p99 {:.2} ms",
        f.accept_rate, f.accept_p50_ms, f.accept_p99_ms
    );
    println!(
        "single:  p50 {:.2} ms, p99 {:.2} ms per message (one session, back to back)",
        f.single_p50_ms, f.single_p99_ms
    );
    println!(
        "drain:   {:.0} msgs/s to the sink; last delivery {:.2} s after the last accept",
        f.drain_rate, f.drain_lag_s
    );
    println!(
        "memory:  {:.1} MB under load, {:.1} MB idle; CPU {:.3} ms per message",
        f.mem_mb, f.idle_mb, f.cpu_ms_per_msg
    );
}

// ---------------------------------------------------------------- sink

/// A minimal SMTP server that accepts everything and counts messages.
struct Sink {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
}

async fn sink(delay: Duration, pipelining: bool) -> anyhow::Result<Sink> {
    limited_sink(delay, pipelining, None).await
}

/// [`sink`], serving at most `max_sessions` connections at once: one more
/// gets "421 4.7.0 Too many concurrent SMTP connections", as providers
/// answer.
async fn limited_sink(
    delay: Duration,
    pipelining: bool,
    max_sessions: Option<usize>,
) -> anyhow::Result<Sink> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let c = c.clone();
            let active = active.clone();
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                if max_sessions.is_some_and(|max| now > max) {
                    let _ = s
                        .write_all(b"421 4.7.0 Too many concurrent SMTP connections\r\n")
                        .await;
                } else {
                    let _ = sink_session(s, c, delay, pipelining).await;
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok(Sink { addr, count })
}

async fn sink_session(
    s: TcpStream,
    count: Arc<AtomicU64>,
    delay: Duration,
    pipelining: bool,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut out = Vec::new();
    let reply = |out: &mut Vec<u8>, text: &str| {
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    reply(&mut out, "220 sink ESMTP");
    let mut line = Vec::new();
    let mut n = 0u64;
    loop {
        if r.buffer().is_empty() && !out.is_empty() {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            w.write_all(&out).await?;
            out.clear();
        }
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let cmd = String::from_utf8_lossy(&line).to_ascii_uppercase();
        if cmd.starts_with("EHLO") {
            reply(
                &mut out,
                if pipelining {
                    "250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8"
                } else {
                    "250-sink\r\n250-8BITMIME\r\n250 SMTPUTF8"
                },
            );
        } else if cmd.starts_with("DATA") {
            reply(&mut out, "354 go ahead");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            w.write_all(&out).await?;
            out.clear();
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(());
                }
                if line == b".\r\n" {
                    break;
                }
            }
            n += 1;
            count.fetch_add(1, Ordering::Relaxed);
            reply(&mut out, &format!("250 2.0.0 Ok: queued as S{n}"));
        } else if cmd.starts_with("QUIT") {
            reply(&mut out, "221 bye");
            w.write_all(&out).await?;
            return Ok(());
        } else {
            reply(&mut out, "250 2.0.0 Ok");
        }
    }
}

// ---------------------------------------------------------------- load

/// One client session sending `n` messages back to back, one command at a
/// time; returns each message's latency (MAIL to the 250 after the dot).
async fn client_session(
    addr: SocketAddr,
    n: usize,
    body: Arc<Vec<u8>>,
) -> anyhow::Result<Vec<Duration>> {
    let s = TcpStream::connect(addr).await.context("connect")?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    async fn expect(
        r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
        line: &mut String,
        code: &str,
    ) -> anyhow::Result<()> {
        loop {
            line.clear();
            if r.read_line(line).await? == 0 {
                bail!("server closed the connection");
            }
            if line.len() >= 4 && line.as_bytes()[3] == b'-' {
                continue;
            }
            if !line.starts_with(code) {
                bail!("expected {code}, got {}", line.trim_end());
            }
            return Ok(());
        }
    }
    expect(&mut r, &mut line, "220").await?;
    w.write_all(b"EHLO bench.test\r\n").await?;
    expect(&mut r, &mut line, "250").await?;
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(b"MAIL FROM:<bench@example.com>\r\n").await?;
        expect(&mut r, &mut line, "250").await?;
        w.write_all(b"RCPT TO:<sink@example.net>\r\n").await?;
        expect(&mut r, &mut line, "250").await?;
        w.write_all(b"DATA\r\n").await?;
        expect(&mut r, &mut line, "354").await?;
        w.write_all(&body).await?;
        expect(&mut r, &mut line, "250").await?;
        lat.push(t.elapsed());
    }
    w.write_all(b"QUIT\r\n").await?;
    Ok(lat)
}

fn message(size: usize) -> Vec<u8> {
    let mut m =
        b"From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n".to_vec();
    while m.len() + 5 < size {
        let take = (size - m.len() - 5).min(76);
        m.extend(std::iter::repeat_n(b'x', take));
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b".\r\n");
    m
}

/// Runs the concurrent accept load; returns (rate, latencies).
async fn accept_load(
    addr: SocketAddr,
    sessions: usize,
    messages: usize,
    size: usize,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let body = Arc::new(message(size));
    let per = messages / sessions;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..sessions {
        let n = per + usize::from(i < messages % sessions);
        tasks.push(tokio::spawn(client_session(addr, n, body.clone())));
    }
    let mut all = Vec::with_capacity(messages);
    for t in tasks {
        all.extend(t.await??);
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    Ok((rate, all))
}

fn percentile(lat: &mut [Duration], p: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    lat.sort_unstable();
    let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
    lat[i].as_secs_f64() * 1000.0
}

async fn wait_count(count: &AtomicU64, n: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while count.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} messages reached the sink within {timeout:?}",
                count.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------- relayq

struct Relayq {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    /// Its log lines about its concurrency (decreases are logged).
    concurrency_log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Relayq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn relayq_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("relayq");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// relayq relaying to `upstream`; `concurrency`: a fixed number of
/// connections, or `None` for relayq's default (adaptive).
fn start_relayq(
    upstream: SocketAddr,
    concurrency: Option<usize>,
    extra: &str,
    dir: Option<tempfile::TempDir>,
) -> anyhow::Result<Relayq> {
    start_relayq_binary(&relayq_binary()?, upstream, concurrency, extra, dir)
}

fn start_relayq_binary(
    binary: &Path,
    upstream: SocketAddr,
    concurrency: Option<usize>,
    extra: &str,
    dir: Option<tempfile::TempDir>,
) -> anyhow::Result<Relayq> {
    let dir = match dir {
        Some(d) => d,
        None => tempfile::tempdir()?,
    };
    let max = if extra.contains("max_connections") {
        ""
    } else {
        "max_connections = 1000\n"
    };
    let config = format!(
        "hostname = \"bench.test\"\nspool_dir = \"{}\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n{max}{extra}\n[relay]\nhost = \"{}\"\nport = {}\ntls = \"none\"\n{}",
        dir.path().join("spool").display(),
        upstream.ip(),
        upstream.port(),
        concurrency
            .map(|n| format!("concurrency = {n}\n"))
            .unwrap_or_default()
    );
    let path = dir.path().join("relayq.toml");
    std::fs::write(&path, config)?;
    let mut child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&path)
        // Logs stay on, as Postfix's do (it writes maillog_file): the cost
        // of a log line per event is part of the measurement.
        .env("RELAYQ_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start relayq")?;
    let stderr = child.stderr.take().context("stderr")?;
    // The start line names the listen address; logging is quiet otherwise.
    let (tx, rx) = std::sync::mpsc::channel();
    let concurrency_log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = concurrency_log.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.split([' ', ',']).next().unwrap_or("").to_string());
            }
            if line.contains("): concurrency ")
                && let Ok(mut log) = log.lock()
            {
                log.push(line);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .context("relayq did not start")?
        .parse()?;
    Ok(Relayq {
        child,
        addr,
        _dir: dir,
        concurrency_log,
    })
}

/// How to read a system's memory (in KB) and CPU (in ms) during a run.
struct Probe {
    /// Memory under load: relayq's peak RSS, Postfix's PSS summed.
    loaded_kb: Box<dyn Fn() -> u64>,
    idle_kb: Box<dyn Fn() -> u64>,
    cpu_ms: Box<dyn Fn() -> f64>,
}

/// The same loads and the same figures for whichever system listens on
/// `addr` and relays to `sink`.
async fn measure(
    addr: SocketAddr,
    sink: &Sink,
    args: &Args,
    probe: &Probe,
) -> anyhow::Result<Figures> {
    let idle = (probe.idle_kb)() as f64 / 1024.0;
    let cpu0 = (probe.cpu_ms)();
    let (rate, mut lat) = accept_load(addr, args.sessions, args.messages, args.size).await?;
    let accepted_at = Instant::now();
    let mut fig = Figures {
        accept_rate: rate,
        idle_mb: idle,
        ..Figures::default()
    };
    fig.mem_mb = (probe.loaded_kb)() as f64 / 1024.0;
    fig.accept_p50_ms = percentile(&mut lat, 0.5);
    fig.accept_p99_ms = percentile(&mut lat, 0.99);
    let drain_start = Instant::now();
    wait_count(&sink.count, args.messages as u64, Duration::from_secs(900)).await?;
    fig.drain_lag_s = accepted_at.elapsed().as_secs_f64();
    // From the first accept: the mean session's send time plus the wait.
    fig.drain_rate = args.messages as f64
        / (drain_start.elapsed().as_secs_f64()
            + lat.iter().map(|d| d.as_secs_f64()).sum::<f64>() / args.sessions as f64);
    fig.cpu_ms_per_msg = ((probe.cpu_ms)() - cpu0) / args.messages as f64;
    let before = sink.count.load(Ordering::Relaxed);
    let (_, mut single) = accept_load(addr, 1, args.latency_messages, args.size).await?;
    fig.single_p50_ms = percentile(&mut single, 0.5);
    fig.single_p99_ms = percentile(&mut single, 0.99);
    wait_count(
        &sink.count,
        before + args.latency_messages as u64,
        Duration::from_secs(300),
    )
    .await?;
    let total = sink.count.load(Ordering::Relaxed);
    let expected = (args.messages + args.latency_messages) as u64;
    if total != expected {
        bail!("the sink received {total} messages, expected {expected}");
    }
    Ok(fig)
}

/// The main loads against `binary` (relayq, or a baseline build), with
/// `extra` added to its config.
async fn bench_relayq(args: &Args, binary: &Path, extra: &str) -> anyhow::Result<Figures> {
    let sink = sink(Duration::ZERO, true).await?;
    let mut r = start_relayq_binary(binary, sink.addr, Some(args.concurrency), extra, None)?;
    let pid = r.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe = Probe {
        loaded_kb: Box::new(move || hwm_kb(pid).unwrap_or(0)),
        idle_kb: Box::new(move || rss_kb(pid).unwrap_or(0)),
        cpu_ms: Box::new(move || cpu_ms(pid).unwrap_or(0.0)),
    };
    let fig = measure(r.addr, &sink, args, &probe).await?;
    let _ = r.child.kill();
    println!(
        "relayq: {} messages accepted and relayed, count matches",
        args.messages + args.latency_messages
    );
    Ok(fig)
}

// ---------------------------------------------------------------- slow upstream

/// The upstream adds a delay to every reply. relayq (connections reused,
/// pipelining) against the per-message-connection model of nullmailer at
/// the same concurrency, emulated by this bench against the same upstream.
async fn slow_upstream(args: &Args) -> anyhow::Result<()> {
    let delay = Duration::from_millis(args.slow_delay_ms);
    let n = args.slow_messages;
    let c = args.slow_concurrency;
    println!(
        "\n== slow upstream: {} ms per reply, {c} connections, {n} messages",
        args.slow_delay_ms
    );
    let s = sink(delay, true).await?;
    let r = start_relayq(s.addr, Some(c), "", None)?;
    let (_, _) = accept_load(r.addr, 4, n, args.size).await?;
    let t = Instant::now();
    wait_count(&s.count, n as u64, Duration::from_secs(600)).await?;
    let relayq_rate = n as f64 / t.elapsed().as_secs_f64();
    drop(r);

    let s2 = sink(delay, false).await?;
    let body = Arc::new(message(args.size));
    let t = Instant::now();
    let per = n / c;
    let mut tasks = Vec::new();
    for i in 0..c {
        let k = per + usize::from(i < n % c);
        let addr = s2.addr;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..k {
                client_session(addr, 1, body.clone()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let model_rate = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "relayq drained {relayq_rate:.1} msgs/s; per-message-connection model {model_rate:.1} msgs/s; ratio {:.1}x (target >= 4x)",
        relayq_rate / model_rate
    );
    Ok(())
}

// ---------------------------------------------------------------- scale

/// Queue `args.scale` messages while the upstream is down, measure memory
/// per queued message and restart time, then drain.
/// Queues `--scale` messages with the upstream down, restarts, drains:
/// returns the drain rate (msgs/s) of `binary`.
async fn scale(args: &Args, binary: &Path) -> anyhow::Result<f64> {
    let n = args.scale;
    println!(
        "\n== scale ({}): {n} messages queued with the upstream down",
        binary.display()
    );
    // A port with nothing listening: bind, note it, close.
    let down = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let dir = tempfile::tempdir()?;
    let r = start_relayq_binary(binary, down, Some(4), "", Some(dir))?;
    let pid = r.child.id();
    let base = rss_kb(pid).unwrap_or(0);
    let t = Instant::now();
    accept_load(r.addr, 20, n, args.size).await?;
    println!("queued {n} in {:.1} s", t.elapsed().as_secs_f64());
    let after = rss_kb(pid).unwrap_or(0);
    println!(
        "memory: {} KB before, {} KB after: {:.0} bytes per queued message",
        base,
        after,
        (after.saturating_sub(base) * 1024) as f64 / n as f64
    );
    let mut r = r;
    let dir = std::mem::replace(&mut r._dir, tempfile::tempdir()?);
    let _ = r.child.kill();
    let _ = r.child.wait();
    drop(r);
    let sink = sink(Duration::ZERO, true).await?;
    let t = Instant::now();
    let r2 = start_relayq_binary(binary, sink.addr, Some(4), "", Some(dir))?;
    println!(
        "restart with {n} queued: accepting after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // Deferred mail waits for its retry time; push it now, like
    // `postqueue -f` after an outage (retrying until the daemon's control
    // socket is up).
    let config = r2._dir.path().join("relayq.toml");
    for _ in 0..100 {
        let out = Command::new(binary)
            .args(["queue", "flush", "--config"])
            .arg(&config)
            .output()?;
        if out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old upstream address is in the config only; the restarted relayq
    // relays to the live sink, so the whole queue drains.
    wait_count(&sink.count, n as u64, Duration::from_secs(3600)).await?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "drained {n} in {:.1} s ({rate:.0} msgs/s)",
        t.elapsed().as_secs_f64()
    );
    drop(r2);
    Ok(rate)
}

/// `--only scale`: the large-queue drain alone, interleaved with the
/// `--baseline` binary when one is given (a drain from a full queue reuses
/// no queue file, so every done mark is synced by the group commit).
async fn scale_rounds(args: &Args) -> anyhow::Result<()> {
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for _ in 0..args.rounds.max(1) {
        println!("other CPU load now: {:.0}%", other_cpu_percent());
        ours.push(scale(args, &relayq_binary()?).await?);
        if let Some(b) = &args.baseline {
            println!("other CPU load now: {:.0}%", other_cpu_percent());
            base.push(scale(args, b).await?);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (o, b) = (med(&mut ours), med(&mut base));
    if b > 0.0 {
        println!(
            "\ndrain of a full queue, median: {o:.0} msgs/s against the baseline's {b:.0} ({:.3}x)",
            o / b
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- postfix

async fn bench_postfix(args: &Args) -> anyhow::Result<Figures> {
    let sink = sink(Duration::ZERO, true).await?;
    let port = setup_postfix(sink.addr)?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probe = Probe {
        loaded_kb: Box::new(postfix_pss_kb),
        idle_kb: Box::new(postfix_pss_kb),
        cpu_ms: Box::new(postfix_cpu_ms),
    };
    let fig = measure(addr, &sink, args, &probe).await;
    let _ = Command::new("postfix").arg("stop").status();
    fig
}

/// Installs Postfix if needed and configures it as a loopback null client
/// relaying to `sink`, listening on port 2625. Returns the port.
fn setup_postfix(sink: SocketAddr) -> anyhow::Result<u16> {
    install_postfix()?;
    let _ = Command::new("postfix").arg("stop").output();
    let port = 2625;
    let main_cf = format!(
        "compatibility_level = 3.6\nmyhostname = bench.test\ninet_interfaces = loopback-only\ninet_protocols = ipv4\nmydestination =\nlocal_transport = error:local delivery disabled\nrelayhost = [{}]:{}\nmaillog_file = /var/log/postfix-bench.log\nsmtp_tls_security_level = none\nsmtpd_tls_security_level = none\nmynetworks = 127.0.0.0/8\ndefault_process_limit = 100\nsmtpd_client_connection_count_limit = 0\nsmtpd_client_message_rate_limit = 0\n",
        sink.ip(),
        sink.port()
    );
    std::fs::create_dir_all("/etc/postfix")?;
    std::fs::write("/etc/postfix/main.cf", main_cf)?;
    let master = std::fs::read_to_string("/usr/share/postfix/master.cf.dist")
        .or_else(|_| std::fs::read_to_string("/etc/postfix/master.cf"))?;
    let master: String = master
        .lines()
        .map(|l| {
            if l.starts_with("smtp      inet") {
                format!("{port}      inet  n       -       y       -       -       smtpd")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write("/etc/postfix/master.cf", master + "\n")?;
    let _ = Command::new("/usr/lib/postfix/configure-instance.sh")
        .arg("-")
        .output();
    // Mail left by a run cut short (deferred by a refusing sink) would be
    // delivered into this run and counted as this burst's.
    let _ = Command::new("postsuper").args(["-d", "ALL"]).output();
    let _ = Command::new("newaliases").output();
    let st = Command::new("postfix").arg("start").output()?;
    if !st.status.success() {
        bail!(
            "postfix start failed: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    Ok(port)
}

/// Installs Debian's postfix (without a system configuration) unless it is.
fn install_postfix() -> anyhow::Result<()> {
    if !Path::new("/usr/sbin/postfix").exists() {
        println!("installing postfix (apt-get)...");
        let sel = Command::new("sh")
            .arg("-c")
            .arg("echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null")
            .status()?;
        if !sel.success() {
            bail!("apt-get install postfix failed");
        }
    }
    Ok(())
}

fn postfix_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            if exe.starts_with("/usr/lib/postfix") {
                pids.push(pid);
            }
        }
    }
    pids
}

fn postfix_pss_kb() -> u64 {
    postfix_pids()
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

fn postfix_cpu_ms() -> f64 {
    postfix_pids().iter().filter_map(|p| cpu_ms(*p)).sum()
}

// ---------------------------------------------------------------- /proc

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:")
}

fn hwm_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:")
}

/// User + system CPU of a process (and its finished children), in ms.
fn cpu_ms(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
        .sum();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1000.0 / hz)
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// CPU used by everything on the machine over half a second, in percent of
/// all cores: a busy box spoils a measurement (see BENCHMARKING.md).
fn other_cpu_percent() -> f64 {
    fn busy() -> Option<(f64, f64)> {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<f64> = s
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let idle = v.get(3)? + v.get(4).unwrap_or(&0.0);
        Some((v.iter().sum::<f64>() - idle, v.iter().sum()))
    }
    let Some((b0, t0)) = busy() else { return 0.0 };
    std::thread::sleep(Duration::from_millis(500));
    let Some((b1, t1)) = busy() else { return 0.0 };
    if t1 <= t0 {
        0.0
    } else {
        100.0 * (b1 - b0) / (t1 - t0)
    }
}
