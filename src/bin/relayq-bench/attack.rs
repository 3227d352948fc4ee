//! The attack loads of issue 16, each measured by relayq's memory (RSS,
//! sampled every 100 ms) and by the latency of a normal client on loopback
//! sending mail meanwhile:
//!
//! - `--only auth-flood`: connections from many loopback addresses
//!   (127.0.1.x, ...) that STARTTLS and send wrong passwords with AUTH
//!   PLAIN, again and again, for `--flood-seconds`. By default the failure
//!   budgets are off (`--with-budgets` keeps them), so what is measured is
//!   the bound on password checks alone: the distributed attack budgets
//!   per address cannot stop. Targets: RSS under 64 MB during and after,
//!   normal client p99 under 50 ms.
//! - `--only idle-flood`: `--idle-connections` idle connections from
//!   127.0.0.1 (the app's own address) and one message trickled at a byte
//!   a second, while the normal client sends; memory per idle session.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use super::{Args, cpu_ms, message, percentile, relayq_binary, rss_kb, sink, start_relayq};

/// Prints the machine's load, for figures taken on a shared machine.
fn print_load(when: &str) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "load {when}: {:.0}% CPU busy over 0.5 s on {} cores; load average {}",
        super::other_cpu_percent(),
        super::cores(),
        load.join(" ")
    );
}

/// Samples a process's RSS until stopped; returns the peak, in KB.
fn sample_rss(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_kb(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    })
}

/// A normal client: one session on 127.0.0.1 sending messages back to
/// back (reconnecting if the server closes it) until `stop`; returns each
/// message's latency, MAIL to the 250 after the dot.
async fn normal_client(addr: SocketAddr, stop: Arc<AtomicBool>) -> anyhow::Result<Vec<Duration>> {
    let body = Arc::new(message(1000));
    let mut lat = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let s = TcpStream::connect(addr)
            .await
            .context("normal client connect")?;
        s.set_nodelay(true)?;
        let mut c = Line::new(s);
        c.expect("220").await?;
        c.send(b"EHLO normal.test\r\n").await?;
        c.expect("250").await?;
        for _ in 0..100 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let t = Instant::now();
            c.send(b"MAIL FROM:<app@example.com>\r\n").await?;
            c.expect("250").await?;
            c.send(b"RCPT TO:<bob@example.net>\r\n").await?;
            c.expect("250").await?;
            c.send(b"DATA\r\n").await?;
            c.expect("354").await?;
            c.send(&body).await?;
            c.expect("250").await?;
            lat.push(t.elapsed());
        }
        let _ = c.send(b"QUIT\r\n").await;
    }
    Ok(lat)
}

/// A line-at-a-time SMTP client over any stream.
struct Line<S> {
    io: BufReader<S>,
    line: String,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Line<S> {
    fn new(s: S) -> Self {
        Line {
            io: BufReader::new(s),
            line: String::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.io.get_mut().write_all(bytes).await?;
        Ok(())
    }

    /// Reads one reply; returns its code.
    async fn reply(&mut self) -> anyhow::Result<u16> {
        loop {
            self.line.clear();
            if self.io.read_line(&mut self.line).await? == 0 {
                bail!("connection closed");
            }
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return Ok(self.line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0));
            }
        }
    }

    async fn expect(&mut self, code: &str) -> anyhow::Result<()> {
        let got = self.reply().await?;
        if got.to_string() != code {
            bail!("expected {code}, got {}", self.line.trim_end());
        }
        Ok(())
    }
}

/// Replies seen by the attackers.
#[derive(Default)]
struct Tally {
    attempts: AtomicU64,
    refused_535: AtomicU64,
    busy_454: AtomicU64,
    closed_421: AtomicU64,
    connections: AtomicU64,
}

/// A certificate for 127.0.0.1 made with openssl, that the attackers
/// trust (the bench's own; nothing leaves loopback).
fn certificate(dir: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "2", "-subj", "/CN=bench.test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("run openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
    }
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cert)? {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The `i`-th attacker's source address: 127.0.1.1, 127.0.1.2, ...
fn attacker_address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (i / 250) as u8,
        1 + (i % 250) as u8,
        1,
    ))
}

/// One attacker until `stop`: connect, STARTTLS, wrong passwords until
/// the server closes, again.
async fn attacker(
    addr: SocketAddr,
    source: IpAddr,
    tls: tokio_rustls::TlsConnector,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let run = async {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            let s = socket.connect(addr).await?;
            tally.connections.fetch_add(1, Ordering::Relaxed);
            let mut c = Line::new(s);
            if c.reply().await? != 220 {
                tally.closed_421.fetch_add(1, Ordering::Relaxed);
                bail!("refused");
            }
            c.send(b"EHLO attacker.test\r\nSTARTTLS\r\n").await?;
            c.expect("250").await?;
            c.expect("220").await?;
            let name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
            let s = tls.connect(name, c.io.into_inner()).await?;
            let mut c = Line::new(s);
            c.send(b"EHLO attacker.test\r\n").await?;
            c.expect("250").await?;
            loop {
                if stop.load(Ordering::Relaxed) {
                    return anyhow::Ok(());
                }
                n += 1;
                use base64::Engine;
                let creds = format!("\0user{n}\0wrong-{n}");
                let b64 = base64::engine::general_purpose::STANDARD.encode(creds);
                c.send(format!("AUTH PLAIN {b64}\r\n").as_bytes()).await?;
                tally.attempts.fetch_add(1, Ordering::Relaxed);
                match c.reply().await? {
                    535 => tally.refused_535.fetch_add(1, Ordering::Relaxed),
                    454 => tally.busy_454.fetch_add(1, Ordering::Relaxed),
                    421 => {
                        tally.closed_421.fetch_add(1, Ordering::Relaxed);
                        bail!("closed");
                    }
                    other => bail!("unexpected reply {other}"),
                };
            }
        };
        if run.await.is_err() {
            // The server closed on us (too many errors, a lockout): again,
            // after a breath so a refusing server is not spun on.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

pub async fn auth_flood(args: &Args) -> anyhow::Result<()> {
    let (conns, secs) = if args.smoke {
        (10, 3)
    } else {
        (args.flood_connections, args.flood_seconds)
    };
    println!(
        "== auth flood: {conns} connections from {conns} loopback addresses sending wrong passwords (AUTH PLAIN after STARTTLS) for {secs} s; failure budgets {}",
        if args.with_budgets {
            "on (defaults)"
        } else {
            "off"
        }
    );
    print_load("at start");
    let dir = tempfile::tempdir()?;
    let tls = tokio_rustls::TlsConnector::from(certificate(dir.path())?);
    let hash = std::process::Command::new(relayq_binary()?)
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .map(|mut i| i.write_all(b"the right password"));
            c.wait_with_output()
        })?;
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!("alice:{}", String::from_utf8_lossy(&hash.stdout)),
    )?;
    let budgets = if args.with_budgets {
        ""
    } else {
        "auth_failure_limit = 0\nauth_user_failure_limit = 0\nauth_failure_delay = \"0s\"\n"
    };
    let extra = format!(
        "allow_networks = [\"127.0.0.1/32\"]\ntls_cert = \"{0}/cert.pem\"\ntls_key = \"{0}/key.pem\"\nauth_users_file = \"{1}\"\n{budgets}",
        dir.path().display(),
        users.display()
    );
    let upstream = sink(Duration::ZERO, true).await?;
    let r = start_relayq(upstream.addr, Some(4), &extra, None)?;
    let pid = r.child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kb(pid).unwrap_or(0);
    let cpu0 = cpu_ms(pid).unwrap_or(0.0);

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, stop.clone());
    let normal = tokio::spawn(normal_client(r.addr, stop.clone()));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for i in 0..conns {
        tasks.push(tokio::spawn(attacker(
            r.addr,
            attacker_address(i),
            tls.clone(),
            tally.clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    print_load("during the flood");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    let mut lat = normal.await??;
    let peak = sampler.join().unwrap_or(0);
    let cpu = cpu_ms(pid).unwrap_or(0.0) - cpu0;
    // Sessions wind down; what is left is what the flood kept.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kb(pid).unwrap_or(0);
    let t = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "attackers: {} connections, {} AUTH attempts: {} answered 535 (checked), {} answered 454 4.7.0 (checks busy), {} sessions closed with 421",
        t(&tally.connections),
        t(&tally.attempts),
        t(&tally.refused_535),
        t(&tally.busy_454),
        t(&tally.closed_421)
    );
    let p99 = percentile(&mut lat, 0.99);
    println!(
        "normal client on 127.0.0.1: {} messages during the flood, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        percentile(&mut lat, 0.5),
        p99,
        percentile(&mut lat, 1.0)
    );
    println!(
        "relayq RSS: {:.1} MB before, {:.1} MB peak during the flood, {:.1} MB 5 s after; CPU {:.1} s",
        mb(before),
        mb(peak),
        mb(after),
        cpu / 1000.0
    );
    println!(
        "targets: RSS < 64 MB during and after: {}; normal client p99 < 50 ms: {}",
        verdict(peak < 64 * 1024 && after < 64 * 1024),
        verdict(p99 < 50.0)
    );
    if lat.is_empty() || t(&tally.attempts) == 0 {
        bail!("the flood or the normal client did not run");
    }
    Ok(())
}

/// Lets this process hold many sockets.
fn raise_own_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if let Some(hard) = lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        );
    }
}

pub async fn idle_flood(args: &Args) -> anyhow::Result<()> {
    let (n, secs) = if args.smoke {
        (100, 3)
    } else {
        (args.idle_connections, args.flood_seconds.min(60))
    };
    println!(
        "== idle flood: {n} idle connections from 127.0.0.1 and one message trickled at 1 byte/s, for {secs} s, while a normal client sends"
    );
    print_load("at start");
    raise_own_fd_limit();
    let upstream = sink(Duration::ZERO, true).await?;
    // relayq's default session settings (the bench's usual max_connections
    // override is replaced by the default).
    let r = start_relayq(upstream.addr, Some(4), "max_connections = 4096\n", None)?;
    let pid = r.child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kb(pid).unwrap_or(0);

    // The trickled message.
    let s = TcpStream::connect(r.addr).await?;
    let mut slow = Line::new(s);
    slow.expect("220").await?;
    slow.send(
        b"EHLO slow.test\r\nMAIL FROM:<slow@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n",
    )
    .await?;
    for code in ["250", "250", "250", "354"] {
        slow.expect(code).await?;
    }
    let slow_closed = Arc::new(AtomicBool::new(false));
    let trickle = {
        let closed = slow_closed.clone();
        tokio::spawn(async move {
            for b in b"Subject: slow\r\n\r\n".iter().cycle() {
                if slow.send(&[*b]).await.is_err() {
                    closed.store(true, Ordering::Relaxed);
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let t0 = Instant::now();
    let mut idle = Vec::with_capacity(n);
    let mut refused = 0;
    for _ in 0..n {
        let mut s = TcpStream::connect(r.addr).await?;
        let mut buf = [0u8; 256];
        let k = s.read(&mut buf).await?;
        if buf[..k].starts_with(b"220") {
            idle.push(s);
        } else {
            refused += 1;
        }
    }
    println!(
        "opened {} idle connections in {:.1} s ({refused} refused)",
        idle.len(),
        t0.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_idle = rss_kb(pid).unwrap_or(0);

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_rss(pid, stop.clone());
    let normal = tokio::spawn(normal_client(r.addr, stop.clone()));
    tokio::time::sleep(Duration::from_secs(secs)).await;
    print_load("during the load");
    stop.store(true, Ordering::Relaxed);
    let mut lat = normal.await??;
    let peak = sampler.join().unwrap_or(0);
    let mut still_open = 0;
    for s in &mut idle {
        // Closed: whatever the server said (a 421), then the end.
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => {
                    still_open += 1;
                    break;
                }
            }
        }
    }
    drop(idle);
    trickle.abort();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kb(pid).unwrap_or(0);
    let per = (with_idle.saturating_sub(before) * 1024) as f64 / n.max(1) as f64;
    let p99 = percentile(&mut lat, 0.99);
    println!(
        "normal client on 127.0.0.1: {} messages, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        percentile(&mut lat, 0.5),
        p99,
        percentile(&mut lat, 1.0)
    );
    println!(
        "idle connections still open after {secs} s: {still_open}; the trickled message {}",
        if slow_closed.load(Ordering::Relaxed) {
            "was cut off"
        } else {
            "is still being read"
        }
    );
    println!(
        "relayq RSS: {:.1} MB before, {:.1} MB with {n} idle connections ({:.1} KB per idle session), {:.1} MB peak, {:.1} MB after they closed",
        mb(before),
        mb(with_idle),
        per / 1024.0,
        mb(peak),
        mb(after)
    );
    println!(
        "targets: the normal client served: {}",
        verdict(!lat.is_empty() && refused == 0)
    );
    if lat.is_empty() {
        bail!("the normal client was not served");
    }
    Ok(())
}
