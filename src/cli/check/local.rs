//! The checks on this machine: the spool (permissions, free space) and the
//! listen addresses (loopback, free or held by relayq, not by another MTA).

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::Report;
use crate::config::Config;

pub(super) fn check_spool<W: Write>(config: &Config, r: &mut Report<W>) {
    let dir = &config.spool_dir;
    let name = "spool";
    let min_free = config.smtp.min_free_space.0;
    let (probe, exists) = match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            r.fail(
                name,
                format!("{} exists but is not a directory", dir.display()),
                "set spool_dir to a directory, or remove the file",
            );
            return;
        }
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if mode & 0o022 != 0 {
                r.fail(
                    name,
                    format!(
                        "{} is writable by other users (mode {mode:04o}); relayq refuses to use it",
                        dir.display()
                    ),
                    format!("chmod 700 {}", dir.display()),
                );
                return;
            }
            if rustix::fs::access(
                dir,
                rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
            )
            .is_err()
            {
                r.fail(
                    name,
                    format!(
                        "{} is not writable by this user (owner uid {}, mode {mode:04o})",
                        dir.display(),
                        m.uid()
                    ),
                    format!(
                        "run the check as the user relayq runs as (sudo -u relayq relayq check), or give it the spool: {}",
                        chown_spool("relayq", dir)
                    ),
                );
                return;
            }
            if let Some((path, uid)) = foreign_entry(dir) {
                let me = crate::submit::Identity::of_uid(rustix::process::geteuid().as_raw());
                r.fail(
                    name,
                    format!(
                        "{} belongs to uid {uid} ({}), not to uid {} ({}) that this check runs as: relayq serve run like this cannot use it (Permission denied)",
                        path.display(),
                        crate::submit::Identity::of_uid(uid).name,
                        me.uid,
                        me.name
                    ),
                    format!(
                        "while relayq is stopped, {}; or run the check as the user relayq runs as",
                        chown_spool(&me.name, dir)
                    ),
                );
                return;
            }
            (dir.clone(), true)
        }
        Err(_) => {
            // Not there yet: `relayq serve` creates it, if it can.
            let Some(parent) = dir.ancestors().skip(1).find(|p| p.exists()) else {
                r.fail(
                    name,
                    format!("{} does not exist", dir.display()),
                    "set spool_dir to an absolute path",
                );
                return;
            };
            if rustix::fs::access(parent, rustix::fs::Access::WRITE_OK).is_err() {
                r.fail(
                    name,
                    format!(
                        "{} does not exist and {} is not writable by this user",
                        dir.display(),
                        parent.display()
                    ),
                    format!(
                        "create it for the daemon's user: install -d -m 700 -o relayq {}",
                        dir.display()
                    ),
                );
                return;
            }
            (parent.to_path_buf(), false)
        }
    };
    let free = match rustix::fs::statvfs(&probe) {
        Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
        Err(e) => {
            r.fail(
                name,
                format!("cannot read free space of {}: {e}", probe.display()),
                "check that the file system is mounted",
            );
            return;
        }
    };
    if free < min_free {
        r.fail(
            name,
            format!(
                "only {} free on the spool's file system, below smtp.min_free_space ({}): new mail would be refused with 452",
                human_bytes(free),
                human_bytes(min_free)
            ),
            "free disk space, move spool_dir to a larger file system, or lower smtp.min_free_space",
        );
        return;
    }
    let state = if exists {
        "mode 0700 or stricter, writable".to_string()
    } else {
        "does not exist yet; relayq serve creates it with mode 0700".to_string()
    };
    r.ok(
        name,
        format!("{}: {state}, {} free", dir.display(), human_bytes(free)),
    );
}

/// The command that gives the spool to `user`. Not `chown -R`: the files
/// in `maildrop/` must keep their owners, whom the pickup takes for their
/// submitters (in `Received:`, the log, and the `trusted_users` rule), and
/// so must the refused ones kept in `corrupt/maildrop/` (only that
/// directory is the daemon's, to add and prune them).
fn chown_spool(user: &str, dir: &std::path::Path) -> String {
    let d = dir.display();
    // Named unless it is known not to be there: hidden behind another
    // user's corrupt/ (mode 0700), it is the daemon's, made at its start.
    let kept = match std::fs::symlink_metadata(dir.join(crate::spool::maildrop::CORRUPT_DIR)) {
        Ok(m) => m.is_dir(),
        Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
    };
    let kept = if kept {
        format!(" {d}/{}", crate::spool::maildrop::CORRUPT_DIR)
    } else {
        String::new()
    };
    format!(
        "chown {user}: {d} {d}/*{kept} && chown -R {user}: {d}/queue {d}/hold {d}/slots {d}/tmp"
    )
}

/// The first thing in the spool that the daemon, run as this user, needs
/// to write but another user owns (a spool made by `relayq serve` run as
/// root, then given to the service's user by its top directory only).
/// What local users own by design is skipped: their files in `maildrop/`,
/// and those the pickup refused into `corrupt/maildrop/` (not that
/// directory: the pickup writes there). Root may use anything.
fn foreign_entry(dir: &std::path::Path) -> Option<(std::path::PathBuf, u32)> {
    let me = rustix::process::geteuid().as_raw();
    if me == 0 {
        return None;
    }
    let foreign = |p: &std::path::Path| {
        std::fs::symlink_metadata(p)
            .ok()
            .filter(|m| m.uid() != me)
            .map(|m| (p.to_path_buf(), m.uid()))
    };
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if let Some(f) = foreign(&path) {
            return Some(f);
        }
        let name = entry.file_name();
        if ["queue", "hold", "slots", "tmp"].iter().any(|d| name == *d) {
            let inside = std::fs::read_dir(&path).ok()?;
            if let Some(f) = inside.flatten().find_map(|e| foreign(&e.path())) {
                return Some(f);
            }
        }
    }
    foreign(&dir.join(crate::spool::maildrop::CORRUPT_DIR))
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub(super) async fn check_listen<W: Write>(addr: SocketAddr, r: &mut Report<W>) {
    let name = format!("listen {addr}");
    if !addr.ip().is_loopback() {
        r.fail(
            &name,
            "not a loopback address: anyone who can reach it could relay mail through your account",
            "listen on 127.0.0.1 or [::1] only",
        );
        return;
    }
    let what = "loopback only, so not an open relay";
    if addr.port() == 0 {
        r.ok(&name, format!("{what}; the port is chosen at start"));
        return;
    }
    // `serve` binds the same way: what this process may not bind, a
    // daemon started like it may not either. A privileged port is refused
    // before a taken one is, so both may be held by a running relayq.
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            r.ok(&name, format!("{what}; the port is free"));
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            let in_use = e.kind() == std::io::ErrorKind::AddrInUse;
            match smtp_greeting(addr, Duration::from_secs(5)).await {
                Ok(g) if g.contains("relayq") => {
                    r.ok(&name, format!("{what}; a running relayq answers: {g}"))
                }
                Ok(g) => r.fail(
                    &name,
                    format!("the port is in use by another program, which answers: {g}"),
                    "stop that program (for Postfix: systemctl disable --now postfix) or choose another port in smtp.listen",
                ),
                Err(e) if in_use => r.fail(
                    &name,
                    format!("the port is in use by another program ({e})"),
                    "find it with `ss -ltnp` and stop it, or choose another port in smtp.listen",
                ),
                Err(_) => r.fail(
                    &name,
                    format!(
                        "port {} is privileged and this process may not listen on it ({}), so relayq serve started like this check fails with \"Permission denied\"",
                        addr.port(),
                        privilege()
                    ),
                    "run relayq with CAP_NET_BIND_SERVICE: dist/relayq.service grants it (check with the same right: sudo setpriv --reuid=relayq --regid=relayq --init-groups --inh-caps=+net_bind_service --ambient-caps=+net_bind_service relayq check); or run it as root, or listen on a port >= net.ipv4.ip_unprivileged_port_start",
                ),
            }
        }
        Err(e) => r.fail(
            &name,
            format!("cannot listen here: {e}"),
            "remove this address from smtp.listen (is IPv6 disabled for [::1]?)",
        ),
    }
}

/// Why a privileged port is out of reach: who we are, whether we hold
/// CAP_NET_BIND_SERVICE, and where unprivileged ports start.
fn privilege() -> String {
    let uid = rustix::process::geteuid().as_raw();
    // CapEff is a hex bit mask; CAP_NET_BIND_SERVICE is bit 10.
    let cap = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .map(|mask| mask & (1 << 10) != 0);
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cap = match cap {
        Some(true) => "with CAP_NET_BIND_SERVICE",
        Some(false) => "without CAP_NET_BIND_SERVICE",
        None => "capabilities unknown",
    };
    format!("uid {uid}, {cap}, net.ipv4.ip_unprivileged_port_start = {start}")
}

pub(super) async fn check_status_listen<W: Write>(addr: SocketAddr, r: &mut Report<W>) {
    let name = format!("status_listen {addr}");
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            r.ok(&name, "loopback only; the port is free");
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            match http_get(addr, "/healthz").await {
                Ok(body) if body.starts_with("ok") => {
                    r.ok(&name, "loopback only; a running relayq answers /healthz")
                }
                Ok(_) | Err(_) => r.fail(
                    &name,
                    "the port is in use by another program",
                    "choose another port for status_listen (find the program with `ss -ltnp`)",
                ),
            }
        }
        Err(e) => r.fail(
            &name,
            format!("cannot listen here: {e}"),
            "choose another loopback address or port for status_listen",
        ),
    }
}

/// The body of `GET path` on a local HTTP server, for the status check.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let work = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.take(64 * 1024).read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Connects and reads the SMTP greeting as one line of text.
async fn smtp_greeting(addr: SocketAddr, limit: Duration) -> Result<String, String> {
    let work = async {
        let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut io = BufReader::new(s);
        let g = read_reply(&mut io).await?;
        let _ = io.get_mut().write_all(b"QUIT\r\n").await;
        Ok(g)
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("no greeting within {limit:?}")))
}

/// Reads one SMTP reply (all its lines); refuses what is not SMTP.
pub(super) async fn read_reply(io: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = io
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(if lines.is_empty() {
                "the server closed the connection without a greeting".into()
            } else {
                "the server closed the connection in the middle of its reply".into()
            });
        }
        total += n;
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let b = text.as_bytes();
        let code_ok = b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit);
        if !code_ok || (b.len() > 3 && b[3] != b' ' && b[3] != b'-') {
            let shown: String = text.chars().take(80).collect();
            return Err(format!("this is not an SMTP server: it said {shown:?}"));
        }
        let last = b.len() == 3 || b[3] == b' ';
        lines.push(text);
        if last || total > 64 * 1024 {
            break;
        }
    }
    Ok(lines.join(" / "))
}
