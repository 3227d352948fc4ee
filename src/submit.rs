//! Local submission: how a message from `sendmail` (or `sendmail -bs`)
//! gets into the spool, who it is from, and what trace it carries.
//!
//! There are two routes, chosen by who runs the command:
//! - **queue**: the process runs as the spool's owner (the daemon's user,
//!   or root when root owns the spool): it commits straight into `queue/`
//!   with [`Spool::commit_blocking`], the one writer, then wakes the daemon
//!   over the control socket.
//! - **maildrop**: anybody else (root included when the daemon runs as its
//!   own user, so that queue files stay readable by it) writes a drop file
//!   into `maildrop/` (see [`crate::spool::maildrop`]) and pokes
//!   `pickup.sock`; the daemon's pickup ([`crate::pickup`]) checks it and
//!   commits it with [`Spool::commit`].
//!
//! Either way the message is on disk, fsynced, before the command exits 0,
//! whether or not the daemon runs; a stopped daemon finds it at start.
//!
//! # Security
//! Who a local user is comes from the kernel (the real uid here, the drop
//! file's owner in the pickup), never from the message. Every local user
//! may choose the envelope sender (`-f`) by default, as with Postfix,
//! sendmail and nullmailer (PHP's `mail()` passes `-f` for the sender the
//! provider has verified); `[sendmail] trusted_users` set to a list of
//! names restricts it to them, root and the spool's owner, and everybody
//! else then sends as `user@myorigin` (or `rewrite_sender`). The pickup
//! applies the same rule again, since a drop file's contents are the
//! user's to write. Whatever the sender, the real user stays visible: the
//! `Received:` header names the uid, and the pickup's accepted log line
//! the uid and name (`uid=33 (www-data)`), so a forged sender or `From:`
//! can be traced to its author.

use std::ffi::CStr;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::cleanup::{self, LocalFrom, Refusal, Rules, trace};
use crate::config::Config;
use crate::control::{self, Request};
use crate::observe::events::{Reason, Rejection};
use crate::spool::{Envelope, Spool, SpoolError, maildrop};

/// A local user, as the password database knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    /// Login name; `uid<N>` for a uid without a passwd entry.
    pub name: String,
    /// The first field of the GECOS entry, if any.
    pub full_name: Option<String>,
}

impl Identity {
    /// The real uid of this process: whoever ran the command.
    pub fn current() -> Identity {
        Identity::of_uid(rustix::process::getuid().as_raw())
    }

    pub fn of_uid(uid: u32) -> Identity {
        match lookup_passwd(uid) {
            Some((name, gecos)) => Identity {
                uid,
                name,
                full_name: gecos
                    .split(',')
                    .next()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            },
            None => Identity {
                uid,
                name: format!("uid{uid}"),
                full_name: None,
            },
        }
    }
}

/// `getpwuid_r(3)`: name and GECOS of a uid (NSS-aware, unlike reading
/// /etc/passwd).
fn lookup_passwd(uid: u32) -> Option<(String, String)> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is the
        // true size of `buf`; on success the strings point into `buf`.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: getpwuid_r succeeded, so the fields are NUL-terminated
        // strings inside `buf`, which is still alive here.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned();
        let gecos = if pwd.pw_gecos.is_null() {
            String::new()
        } else {
            // SAFETY: as above.
            unsafe { CStr::from_ptr(pwd.pw_gecos) }
                .to_string_lossy()
                .into_owned()
        };
        return Some((name, gecos));
    }
}

/// May this user choose the envelope sender? `owner` is the spool's
/// owner (the daemon's user).
pub fn is_trusted(config: &Config, who: &Identity, owner: u32) -> bool {
    who.uid == 0
        || who.uid == owner
        || config
            .sendmail
            .trusted_users
            .iter()
            .any(|u| u == "*" || *u == who.name)
}

/// The envelope sender of a user who did not (or may not) choose one.
pub fn default_sender(config: &Config, who: &Identity) -> String {
    config
        .sendmail
        .rewrite_sender
        .clone()
        .unwrap_or_else(|| format!("{}@{}", who.name, config.myorigin()))
}

/// The envelope sender of a message `who` submitted asking for `asked`:
/// theirs if they may choose it, else their default.
pub fn sender_for(config: &Config, who: &Identity, owner: u32, asked: &str) -> String {
    if is_trusted(config, who, owner) {
        asked.to_string()
    } else {
        default_sender(config, who)
    }
}

/// The limit the SMTP server applies at RCPT, for a local submission
/// (`sendmail`, a maildrop file): the reason and what to tell the user.
pub fn check_recipients(config: &Config, recipients: usize) -> Result<(), (Reason, String)> {
    let max = config.smtp.max_recipients;
    if recipients > max {
        return Err((
            Reason::TooManyRecipients,
            format!("too many recipients: {recipients}, more than smtp.max_recipients ({max})"),
        ));
    }
    Ok(())
}

/// Sets the SMTPUTF8 and 8BITMIME flags from what the message holds: a
/// local submission asks for SMTPUTF8 when its envelope or header holds
/// UTF-8 (Postfix's `smtputf8_autodetect_classes = sendmail`).
pub fn set_flags(env: &mut Envelope, content: &[u8]) {
    let addresses =
        std::iter::once(env.sender.as_str()).chain(env.recipients.iter().map(String::as_str));
    env.smtputf8 = cleanup::needs_smtputf8(addresses, content);
    env.eight_bit = !content.is_ascii();
}

/// Why a local submission was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Cleanup refused the content.
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Cleanup's rules for a local user's message.
pub fn local_rules(
    config: &Config,
    who: &Identity,
    env: &Envelope,
    full_name: Option<String>,
) -> Rules {
    let address = if env.sender.is_empty() {
        default_sender(config, who)
    } else {
        env.sender.clone()
    };
    Rules::local(config, LocalFrom { address, full_name })
}

/// Why an address cannot be used, or `Ok` for a fully qualified mailbox
/// (`local@domain`).
pub fn check_address(addr: &str) -> Result<(), &'static str> {
    if addr.len() > 320 {
        return Err("address too long");
    }
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return Err("address has no @domain");
    };
    // A quoted local part ("john doe"@example.com, as an SMTP client may
    // give it) may hold spaces and specials, escaped quotes and
    // backslashes; nothing else may.
    let plain = match local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        Some(inner) if quoted_text(inner) => domain,
        _ => addr,
    };
    if plain
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "<>,;()\\\"".contains(c))
    {
        return Err(
            "address contains spaces or characters like < > , ; ( ) \" outside a quoted local part",
        );
    }
    if local.is_empty() || domain.is_empty() {
        return Err("address must look like user@domain");
    }
    let literal = domain.starts_with('[') && domain.ends_with(']');
    if !literal
        && (domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains("..")
            || !domain
                .chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '.'))
    {
        return Err("bad domain in address");
    }
    if local.contains('@') && !(local.starts_with('"') && local.ends_with('"')) {
        return Err("address has more than one @");
    }
    Ok(())
}

/// The inside of a quoted string: no control character, and `"` and `\\`
/// only escaped by a `\\`.
fn quoted_text(inner: &str) -> bool {
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.next().is_some_and(|e| !e.is_control()) => {}
            '"' | '\\' => return false,
            c if c.is_control() => return false,
            _ => {}
        }
    }
    true
}

/// The headers put in front of a locally submitted message: a
/// `Received:` naming the submitting uid, and `Message-ID:`/`Date:` when
/// the message has none.
pub fn trace_prefix(
    hostname: &str,
    uid: u32,
    id: &str,
    env: &Envelope,
    content: &[u8],
    now: SystemTime,
) -> Vec<u8> {
    let date = trace::rfc5322_now(now);
    let t = trace::Trace {
        origin: trace::Origin::Local { uid },
        hostname,
        id,
        // One recipient only, as in the SMTP path: more would leak Bcc.
        single_rcpt: match env.recipients.as_slice() {
            [rcpt] => Some(rcpt),
            _ => None,
        },
        date: &date,
    };
    trace::prefix(&t, content)
}

enum Route {
    Queue(Spool),
    Maildrop,
}

/// Where a message went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Committed to `queue/` under this id.
    Queued(String),
    /// Left in `maildrop/` under this name; the daemon assigns the id.
    Dropped(String),
}

impl Submitted {
    pub fn name(&self) -> &str {
        match self {
            Submitted::Queued(s) | Submitted::Dropped(s) => s,
        }
    }
}

/// The submitting side, for one process.
pub struct Submitter {
    config: Config,
    pub identity: Identity,
    /// The uid that owns the spool (the daemon's user).
    pub owner: u32,
    route: Route,
}

impl Submitter {
    /// Picks the route for this process. Fails (naming the fix) when the
    /// spool cannot be written by either route.
    pub fn new(config: Config) -> Result<Submitter, SpoolError> {
        let identity = Identity::current();
        let euid = rustix::process::geteuid().as_raw();
        let root = config.spool_dir.clone();
        let owner = match std::fs::metadata(&root) {
            Ok(m) => m.uid(),
            // Nobody made the spool yet: whoever may create it owns it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => euid,
            Err(e) => return Err(spool_err(&root, e, "")),
        };
        let route = if euid == owner {
            Route::Queue(Spool::open(&root)?)
        } else {
            let drop = maildrop::dir(&root);
            match std::fs::symlink_metadata(&drop) {
                Ok(m) if m.is_dir() => Route::Maildrop,
                Ok(_) => return Err(spool_err(&drop, io::ErrorKind::InvalidData.into(), "")),
                Err(e) => {
                    return Err(spool_err(
                        &drop,
                        e,
                        "; start `relayq serve` once so it creates the maildrop",
                    ));
                }
            }
        };
        Ok(Submitter {
            config,
            identity,
            owner,
            route,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn trusted(&self) -> bool {
        is_trusted(&self.config, &self.identity, self.owner)
    }

    pub fn default_sender(&self) -> String {
        default_sender(&self.config, &self.identity)
    }

    /// Whether this process commits into `queue/` itself.
    pub fn direct(&self) -> bool {
        matches!(self.route, Route::Queue(_))
    }

    /// Free space on the spool's file system (for `-bs`'s 452).
    pub fn free_space(&self) -> io::Result<u64> {
        let st = rustix::fs::statvfs(&self.config.spool_dir)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Applies cleanup's local rules to the message (`full_name` names the
    /// `From:` added when it has none) and stores it durably by this
    /// process's route. Trace headers are added by whoever assigns the
    /// queue id.
    pub fn submit(
        &self,
        mut env: Envelope,
        content: Vec<u8>,
        full_name: Option<String>,
    ) -> Result<Submitted, SubmitError> {
        let rules = local_rules(&self.config, &self.identity, &env, full_name);
        let content = cleanup::rewrite(content, &rules)?;
        set_flags(&mut env, &content);
        let now = SystemTime::now();
        let now_ms = crate::clock::to_ms(now);
        Ok(match &self.route {
            Route::Queue(spool) => {
                let id = Spool::new_id();
                let mut msg = trace_prefix(
                    &self.config.hostname,
                    self.identity.uid,
                    &id,
                    &env,
                    &content,
                    now,
                );
                msg.extend_from_slice(&content);
                spool
                    .commit_blocking(id, &env, &msg, now_ms, self.identity.uid)
                    .map(Submitted::Queued)?
            }
            Route::Maildrop => maildrop::write(&self.config.spool_dir, &env, &content, now_ms)
                .map(Submitted::Dropped)?,
        })
    }

    /// Tells a running daemon that this command refused a message, so that
    /// its log and metrics have it like every other refusal (see
    /// `pickup`); false when none runs.
    pub fn report(&self, r: &Rejection) -> bool {
        let Ok(json) = serde_json::to_vec(&r.bounded()) else {
            return false;
        };
        let mut line = crate::pickup::REPORT_PREFIX.to_vec();
        line.extend_from_slice(&json);
        line.push(b'\n');
        if line.len() > crate::pickup::MAX_REPORT {
            return false;
        }
        let path = maildrop::pickup_socket(&self.config.spool_dir);
        std::os::unix::net::UnixStream::connect(path)
            .and_then(|mut s| {
                s.set_write_timeout(Some(crate::pickup::REPORT_WAIT))?;
                s.write_all(&line)
            })
            .is_ok()
    }

    /// Tells a running daemon about the message; false when none runs (it
    /// will find the message when it starts).
    pub fn wake(&self, s: &Submitted) -> bool {
        let root = &self.config.spool_dir;
        match s {
            Submitted::Queued(id) => matches!(
                control::request_blocking(root, &Request::Wake { id: id.clone() }),
                Ok(Some(r)) if r.ok
            ),
            Submitted::Dropped(_) => {
                let path = maildrop::pickup_socket(root);
                std::os::unix::net::UnixStream::connect(path)
                    .and_then(|mut s| {
                        s.set_write_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(b"\n")
                    })
                    .is_ok()
            }
        }
    }
}

/// An I/O error on the spool with a hint appended for the user.
fn spool_err(path: &Path, e: io::Error, hint: &str) -> SpoolError {
    SpoolError::Io {
        path: PathBuf::from(path),
        source: io::Error::new(e.kind(), format!("{e}{hint}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in [
            "a@example.com",
            "first.last+tag@sub.example.co.uk",
            "x@[192.0.2.1]",
            "j\u{f6}rg@b\u{fc}cher.example",
            "\"odd@local\"@example.com",
            "\"john doe\"@example.com",
            "\"a, <b> (c); \\\\ \\\"d\\\"\"@example.com",
        ] {
            assert_eq!(check_address(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "root",
            "@example.com",
            "a@",
            "a b@example.com",
            "a@exa mple.com",
            "<a@example.com>",
            "a@b@c",
            "a@example..com",
            "a@exa_mple.com",
            "\"a\"b\"@example.com",
            "\"a\\\"@example.com",
            "\"a\rb\"@example.com",
            "x\"a b\"@example.com",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trust_and_default_sender() {
        let mut c = Config::development(Path::new("/nonexistent"));
        c.hostname = "host.test".into();
        let alice = Identity {
            uid: 1000,
            name: "alice".into(),
            full_name: None,
        };
        // Every local user may choose the sender unless restricted.
        assert!(is_trusted(&c, &alice, 999));
        c.sendmail.trusted_users = vec![];
        assert!(!is_trusted(&c, &alice, 999));
        assert!(is_trusted(&c, &alice, 1000));
        assert!(is_trusted(&c, &Identity::of_uid(0), 999));
        assert_eq!(default_sender(&c, &alice), "alice@host.test");
        c.myorigin = Some("example.com".into());
        assert_eq!(default_sender(&c, &alice), "alice@example.com");
        c.sendmail.trusted_users = vec!["alice".into()];
        assert!(is_trusted(&c, &alice, 999));
        c.sendmail.rewrite_sender = Some("noreply@example.com".into());
        assert_eq!(default_sender(&c, &alice), "noreply@example.com");
        assert_eq!(Identity::of_uid(0).name, "root");
    }

    #[test]
    fn config_keys_are_checked() {
        let parse = |t: &str| Config::parse(t, Path::new("/etc/relayq/relayq.toml"));
        let base = "[capture]\nmaildir = \"/tmp/m\"\n";
        let c = parse(&format!(
            "myorigin = \"example.com\"\n{base}[sendmail]\nrewrite_sender = \"noreply@example.com\"\ntrusted_users = [\"www-data\"]\n"
        ))
        .unwrap();
        assert_eq!(c.myorigin(), "example.com");
        assert_eq!(c.sendmail.trusted_users, vec!["www-data"]);
        let e = parse(&format!("myorigin = \"bad domain\"\n{base}")).unwrap_err();
        assert!(e.to_string().contains("myorigin"), "{e}");
        let e = parse(&format!("{base}[sendmail]\nrewrite_sender = \"nobody\"\n")).unwrap_err();
        assert!(e.to_string().contains("sendmail.rewrite_sender"), "{e}");
        let e = parse(&format!("{base}[sendmail]\nrewite_sender = \"a@b\"\n")).unwrap_err();
        assert!(e.to_string().contains("rewite_sender"), "{e}");
    }
}
