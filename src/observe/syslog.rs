//! Where log lines go: standard error (the default), the systemd journal
//! through standard error, or syslog's socket (`log_to = "syslog"`).
//!
//! - **stderr**: each line starts with our timestamp and level.
//! - **journal**: under systemd, when standard error *is* the journal (the
//!   unit's default; `JOURNAL_STREAM` names the stream, see
//!   systemd.exec(5)), each line starts with its priority as `<N>`
//!   (sd-daemon(3)) and has no timestamp: journald stamps it, and with the
//!   unit's `SyslogFacility=mail` rsyslog files it under mail.log, and
//!   warnings under mail.warn, as Postfix's lines are.
//! - **syslog**: for hosts without systemd (containers, sysvinit). Each
//!   line is one RFC 3164 message to the syslog socket (`/dev/log` unless
//!   `syslog_socket` says otherwise), facility `mail` unless
//!   `syslog_facility` says otherwise, tagged `relayq[PID]`, as Postfix
//!   logs. The `syslog` crate opens the socket (datagram, or stream with NUL
//!   framing where the daemon listens that way) and writes the frames; the
//!   message is formatted here, with the local time, because the crate
//!   stamps UTC without saying so.
//!
//! A syslog daemon may be missing at start or restart later: a line that
//! cannot be sent reconnects (at most once a second) and, failing that,
//! goes to standard error, so no line is dropped without trace. Without a
//! timestamp of ours, the journal and syslog lines start with `warning: `
//! or `error: ` where the level is not info, like Postfix's.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};
use syslog::{Facility as SyslogFacility, LogFormat, Logger, LoggerBackend, Severity};
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// How often a lost syslog connection is tried again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// A syslog facility by its name (`mail`, `daemon`, `local0`..`local7`, ...).
#[derive(Debug, Clone, Copy)]
pub struct Facility(pub SyslogFacility);

impl Default for Facility {
    fn default() -> Self {
        Facility(SyslogFacility::LOG_MAIL)
    }
}

impl PartialEq for Facility {
    fn eq(&self, other: &Self) -> bool {
        self.code() == other.code()
    }
}

impl Eq for Facility {}

impl Facility {
    /// The facility's number (mail is 2), as in the `<PRI>` of a message.
    pub fn code(self) -> u8 {
        self.0 as u8 >> 3
    }
}

impl FromStr for Facility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SyslogFacility::from_str(s).map(Facility).map_err(|()| {
            format!("unknown syslog facility {s:?}; use \"mail\" (the default), \"daemon\", \"user\" or \"local0\" to \"local7\"")
        })
    }
}

impl<'de> Deserialize<'de> for Facility {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the daemon's log lines go (see the module comment).
pub enum Destination {
    Stderr,
    Journal,
    Syslog(Syslog),
}

impl Destination {
    /// Standard error, as the journal when systemd says it is.
    pub fn stderr() -> Destination {
        if stderr_is_journal() {
            Destination::Journal
        } else {
            Destination::Stderr
        }
    }

    /// Whether lines carry our timestamp and level word (the journal and
    /// syslog stamp lines themselves).
    pub fn stamps(&self) -> bool {
        matches!(self, Destination::Stderr)
    }

    fn emit(&self, level: Level, line: &[u8]) {
        match self {
            Destination::Stderr => {
                let _ = io::stderr().lock().write_all(line);
            }
            Destination::Journal => {
                let mut out = Vec::with_capacity(line.len() + 4);
                for l in line.split_inclusive(|&b| b == b'\n') {
                    let _ = write!(out, "<{}>", severity(level) as u8);
                    out.extend_from_slice(l);
                }
                let _ = io::stderr().lock().write_all(&out);
            }
            Destination::Syslog(s) => s.send(level, line),
        }
    }
}

/// `JOURNAL_STREAM` is `device:inode` of the stream systemd connected to
/// the journal; it is inherited, so it counts only if standard error is
/// still that stream.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(io::stderr()) else {
        return false;
    };
    dev.parse::<u64>() == Ok(stat.st_dev) && ino.parse::<u64>() == Ok(stat.st_ino)
}

fn severity(level: Level) -> Severity {
    match level {
        Level::ERROR => Severity::LOG_ERR,
        Level::WARN => Severity::LOG_WARNING,
        Level::INFO => Severity::LOG_INFO,
        Level::DEBUG | Level::TRACE => Severity::LOG_DEBUG,
    }
}

/// The word a line without our level column starts with (Postfix's
/// `warning: `); info lines have none.
pub fn level_prefix(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error: ",
        Level::WARN => "warning: ",
        Level::INFO => "",
        Level::DEBUG => "debug: ",
        Level::TRACE => "trace: ",
    }
}

/// An RFC 3164 message as local syslog daemons expect it on their socket:
/// `<PRI>Mmm dd hh:mm:ss TAG[PID]: text`, local time, no host name (the
/// daemon adds its own; a name here would be taken for the tag).
#[derive(Clone)]
struct Rfc3164 {
    facility: Facility,
    tag: String,
    pid: u32,
}

impl LogFormat<&str> for Rfc3164 {
    fn format<W: Write>(&self, w: &mut W, severity: Severity, message: &str) -> syslog::Result<()> {
        let now = jiff::ZonedDateTime::now();
        write!(
            w,
            "<{}>{} {}[{}]: {}",
            (self.facility.0 as u8) | (severity as u8),
            now.strftime("%b %e %H:%M:%S"),
            self.tag,
            self.pid,
            message
        )
        .map_err(syslog::Error::Write)
    }
}

/// A connection to the syslog socket that comes back after the daemon
/// restarts.
pub struct Syslog {
    path: PathBuf,
    format: Rfc3164,
    state: Mutex<State>,
}

struct State {
    logger: Option<Logger<LoggerBackend, Rfc3164>>,
    last_try: Instant,
}

impl Syslog {
    /// Connects to the socket at `path`. Also returns why it could not
    /// (the lines then go to standard error until it can).
    pub fn open(path: &Path, facility: Facility) -> (Syslog, Option<String>) {
        let format = Rfc3164 {
            facility,
            tag: "relayq".to_string(),
            pid: std::process::id(),
        };
        let (logger, error) = match syslog::unix_custom(format.clone(), path) {
            Ok(l) => (Some(l), None),
            Err(e) => (None, Some(cause(&e))),
        };
        let s = Syslog {
            path: path.to_path_buf(),
            format,
            state: Mutex::new(State {
                logger,
                last_try: Instant::now(),
            }),
        };
        (s, error)
    }

    fn send(&self, level: Level, text: &[u8]) {
        let text = String::from_utf8_lossy(text);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for line in text.lines().filter(|l| !l.is_empty()) {
            let sent = match st.logger.as_mut() {
                Some(logger) => send_one(logger, level, line).is_ok(),
                None => false,
            };
            if sent {
                continue;
            }
            // Gone (syslogd restarted) or never there: one new connection,
            // not more than once a second, then standard error.
            st.logger = None;
            if st.last_try.elapsed() >= RECONNECT_EVERY {
                st.last_try = Instant::now();
                if let Ok(mut logger) = syslog::unix_custom(self.format.clone(), &self.path)
                    && send_one(&mut logger, level, line).is_ok()
                {
                    st.logger = Some(logger);
                    continue;
                }
            }
            let _ = writeln!(io::stderr().lock(), "{line}");
        }
    }
}

fn send_one(
    logger: &mut Logger<LoggerBackend, Rfc3164>,
    level: Level,
    line: &str,
) -> syslog::Result<()> {
    match severity(level) {
        Severity::LOG_ERR => logger.err(line),
        Severity::LOG_WARNING => logger.warning(line),
        Severity::LOG_DEBUG => logger.debug(line),
        _ => logger.info(line),
    }
}

/// The innermost reason of a syslog error ("No such file or directory").
fn cause(e: &syslog::Error) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}

/// Hands tracing one writer per event; the writer sends the event's text
/// to the destination when tracing is done with it.
pub struct Writers(pub std::sync::Arc<Destination>);

pub struct EventWriter {
    dest: std::sync::Arc<Destination>,
    level: Level,
    buf: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.dest.emit(self.level, &self.buf);
        }
    }
}

impl<'a> MakeWriter<'a> for Writers {
    type Writer = EventWriter;
    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            dest: self.0.clone(),
            level: Level::INFO,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> EventWriter {
        EventWriter {
            dest: self.0.clone(),
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn facility_names() {
        assert_eq!("mail".parse::<Facility>().unwrap().code(), 2);
        assert_eq!("LOCAL3".parse::<Facility>().unwrap().code(), 19);
        assert_eq!("daemon".parse::<Facility>().unwrap().code(), 3);
        let e = "mial".parse::<Facility>().unwrap_err();
        assert!(e.contains("\"mial\"") && e.contains("local7"), "{e}");
        assert_eq!(Facility::default().code(), 2);
    }

    #[test]
    fn one_message_per_line_with_priority_tag_and_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).unwrap();
        let (s, err) = Syslog::open(&path, "local1".parse().unwrap());
        assert!(err.is_none(), "{err:?}");
        s.send(Level::WARN, b"warning: first\nsecond\n");
        let mut buf = [0u8; 512];
        let pid = std::process::id();
        for (pri, text) in [(17 * 8 + 4, "warning: first"), (17 * 8 + 4, "second")] {
            let n = server.recv(&mut buf).unwrap();
            let got = std::str::from_utf8(&buf[..n]).unwrap();
            let head = format!("<{pri}>");
            assert!(got.starts_with(&head), "{got}");
            assert!(got.ends_with(&format!(" relayq[{pid}]: {text}")), "{got}");
            // "Mmm dd hh:mm:ss" between the priority and the tag.
            let stamp = &got[head.len()..got.find(" relayq[").unwrap()];
            assert_eq!(stamp.len(), 15, "{got}");
        }
    }

    #[test]
    fn a_restarted_syslog_gets_the_next_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let first = UnixDatagram::bind(&path).unwrap();
        let (s, _) = Syslog::open(&path, Facility::default());
        s.send(Level::INFO, b"one\n");
        let mut buf = [0u8; 512];
        let n = first.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().ends_with(": one"));
        drop(first);
        std::fs::remove_file(&path).unwrap();
        let second = UnixDatagram::bind(&path).unwrap();
        // The reconnection is tried once a second: wait for it, not longer.
        std::thread::sleep(RECONNECT_EVERY);
        s.send(Level::INFO, b"two\n");
        let n = second.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().ends_with(": two"));
    }
}
