//! A private Postfix instance as an upstream nobody here wrote: its own
//! `smtpd` (which offers CHUNKING and PIPELINING since Postfix 3.4) on a
//! loopback port, taking mail for any recipient and handing each message
//! to a `pipe` transport that writes it, as Postfix delivers it, into a
//! file named by Postfix's queue id. Its log goes to a file of its own.
//!
//! The instance has its own configuration, queue and data directories
//! under a temporary directory and never touches the system's Postfix
//! (`postfix -c DIR`); every service runs outside a chroot. Starting it
//! needs root (CI runs as root) and Debian's `postfix` package, which
//! `.ci/run` installs; without either the test fails saying so. Dropping
//! it stops the instance.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct PostfixSink {
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

/// The services this instance needs, none chrooted (Postfix's own
/// `master.cf` defaults, trimmed), and the transport that keeps messages.
fn master_cf(port: u16, capture: &Path) -> String {
    format!(
        "127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
capture unix - n n - - pipe flags= user=nobody argv={} ${{queue_id}}
",
        capture.display()
    )
}

impl PostfixSink {
    /// Starts Postfix listening on 127.0.0.1:`port`. `restrictions` are
    /// `smtpd_recipient_restrictions` (after `permit_mynetworks` would be
    /// too late: they come first), e.g. to refuse a recipient.
    pub fn start(port: u16, restrictions: &str) -> PostfixSink {
        require_root_and_postfix();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        // Postfix's processes run as user postfix and must reach the queue.
        chmod(root, 0o755);
        for sub in ["etc", "spool", "data", "out"] {
            std::fs::create_dir(root.join(sub)).expect("mkdir");
        }
        chmod(&root.join("out"), 0o777);
        run("chown", &["postfix", &root.join("data").to_string_lossy()]);
        let capture = root.join("capture.sh");
        std::fs::write(
            &capture,
            format!(
                "#!/bin/sh\nexec cat > {}/\"$1\"\n",
                root.join("out").display()
            ),
        )
        .expect("write capture.sh");
        chmod(&capture, 0o755);
        let main_cf = format!(
            "compatibility_level = 3.6
myhostname = postfix-sink.test
mydomain = postfix-sink.test
myorigin = postfix-sink.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
queue_directory = {root}/spool
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
mydestination =
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = {restrictions} permit_mynetworks, reject
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = capture
relay_transport = capture
capture_destination_recipient_limit = 1
local_header_rewrite_clients =
alias_maps =
alias_database =
smtp_dns_support_level = disabled
smtpd_client_connection_count_limit = 0
",
            root = root.display()
        );
        std::fs::write(root.join("etc/main.cf"), main_cf).expect("main.cf");
        std::fs::write(root.join("etc/master.cf"), master_cf(port, &capture)).expect("master.cf");
        let sink = PostfixSink {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let started = Command::new("postfix")
            .arg("-c")
            .arg(sink.etc())
            .arg("start")
            .output()
            .expect("run postfix");
        assert!(
            started.status.success(),
            "postfix start failed: {}{}\n{}",
            String::from_utf8_lossy(&started.stdout),
            String::from_utf8_lossy(&started.stderr),
            sink.log()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(sink.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "postfix does not listen on {}:\n{}",
                sink.addr,
                sink.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sink
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// Postfix's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// The messages delivered so far, as Postfix handed them to the pipe
    /// (LF line ends, its own Received: header first).
    pub fn delivered(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("out"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
    }

    /// Waits until `n` messages are delivered (and the pipe finished each).
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let sent = self
                .log()
                .matches("status=sent (delivered via capture")
                .count();
            if sent >= n {
                return self.delivered();
            }
            assert!(
                Instant::now() < deadline,
                "postfix delivered {sent} of {n} messages within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.etc())
            .arg("stop")
            .output();
    }
}

fn require_root_and_postfix() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test starts a private Postfix instance, which needs root (CI runs as root)"
    );
    assert!(
        Path::new("/usr/sbin/postfix").exists()
            && Path::new("/usr/lib/postfix/sbin/smtpd").exists(),
        "Postfix is needed for this test but is not installed. Install it with \
         `echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections; \
         apt-get install -y postfix` (.ci/run installs every test peer)."
    );
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn run(program: &str, args: &[&str]) {
    let ok = Command::new(program)
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{program} {args:?} failed");
}
