//! Network namespaces a test makes for itself (root only). A process in a
//! fresh one has nothing but its own loopback: it can listen on a fixed
//! port (the README's 127.0.0.1:2525, a privileged port) without meeting
//! other tests running at the same time, and it cannot reach any other
//! host. Its `net.ipv4.ip_unprivileged_port_start` is the kernel default
//! (1024), whatever the machine's is.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Whether this process may make namespaces; says so when not (the test
/// then skips, like the other root-only tests; CI runs as root).
pub fn available() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: not root, cannot make a network namespace");
    }
    root
}

/// Makes `cmd` start in a new network namespace with `lo` up.
pub fn isolate(cmd: &mut Command) -> &mut Command {
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (unshare, socket, ioctl, close), on memory of this closure.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            loopback_up()
        })
    }
}

/// The network namespace of a running process, for [`Netns::enter`].
pub struct Netns {
    file: File,
}

impl Netns {
    /// The namespace process `pid` is in.
    pub fn of(pid: u32) -> Netns {
        Netns {
            file: File::open(format!("/proc/{pid}/ns/net")).expect("open the process's netns"),
        }
    }

    /// Makes `cmd` start inside this namespace. `self` must outlive the
    /// spawn (the descriptor is used in the child).
    pub fn enter<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; fd stays open until spawn
        // returns (self is borrowed by the caller meanwhile).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

/// `ip link set lo up`, without needing iproute2.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain syscalls on a zeroed ifreq naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let mut rc = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr);
        if rc == 0 {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = io::Error::last_os_error();
        libc::close(sock);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}
