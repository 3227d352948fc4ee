//! Inbound AUTH: the users allowed to relay from outside `allow_networks`,
//! and checking their passwords.
//!
//! The users file holds one `user:hash` per line (`#` comments allowed),
//! the hash an argon2 PHC string (`$argon2id$...`, what `relayq
//! hash-password` prints) or bcrypt (`$2b$...`, what `htpasswd -B` makes).
//!
//! # Security
//! Only hashes are stored. A check is deliberately costly (argon2id with
//! its default parameters: ~19 MiB of memory and tens of milliseconds of
//! CPU), so a flood of wrong passwords must not run them without bound:
//! the [`Verifier`] runs at most [`MAX_CHECKS`] at once, on threads of its
//! own at a low CPU priority (nice 10, so mail from the app is not slowed by
//! a flood of logins), lets at most [`MAX_WAITING`] wait up to [`MAX_WAIT`]
//! for a turn, and answers the rest with a temporary failure (`454 4.7.0`).
//! Memory is therefore bounded by `MAX_CHECKS` times the hash's memory cost,
//! and is returned when the check ends (see `cli::serve` for the allocator
//! setting that makes sure of it). An unknown user is checked against a
//! dummy hash so that the answer takes as long as for a known one (no user
//! enumeration by timing). AUTH is only offered on a TLS session; see
//! [`super::auth_budget`] for the failure budgets.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read users file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("users file {path}, line {line}: {reason}")]
    Bad {
        path: String,
        line: usize,
        reason: String,
    },
}

/// The users file, loaded once at start.
#[derive(Clone, Default)]
pub struct Users {
    hashes: Arc<HashMap<String, String>>,
}

impl Users {
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|error| UsersError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Users::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, path: &str) -> Result<Users, UsersError> {
        let mut hashes = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| UsersError::Bad {
                path: path.to_string(),
                line: n + 1,
                reason: reason.to_string(),
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("expected user:hash"))?;
            if user.is_empty() {
                return Err(bad("empty user name"));
            }
            if !(hash.starts_with("$argon2") || hash.starts_with("$2")) {
                return Err(bad(
                    "the hash must be argon2 ($argon2id$...) or bcrypt ($2b$...); make one with `relayq hash-password`",
                ));
            }
            if hash.starts_with("$argon2") && PasswordHash::new(hash).is_err() {
                return Err(bad("malformed argon2 hash"));
            }
            hashes.insert(user.to_string(), hash.to_string());
        }
        Ok(Users {
            hashes: Arc::new(hashes),
        })
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Checks a user's password; slow on purpose, call from a blocking task.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.hashes.get(user) {
            Some(hash) => verify_hash(hash, password),
            None => {
                // Same work for an unknown user as for a wrong password.
                let _ = verify_hash(dummy_hash(), password);
                false
            }
        }
    }
}

/// Password checks running at once. Two keep argon2's memory (~19 MiB
/// each) well under relayq's budget and leave CPU for mail on a two-core
/// machine, while serving tens of logins a second.
pub const MAX_CHECKS: usize = 2;
/// Checks that may queue for a turn; further AUTH gets `454 4.7.0` at once.
pub const MAX_WAITING: usize = 32;
/// How long a queued check waits for its turn before `454 4.7.0`.
pub const MAX_WAIT: Duration = Duration::from_secs(5);

/// The check could not run now: answer `454 4.7.0`, the client may retry.
#[derive(Debug, PartialEq, Eq)]
pub struct Busy;

/// A password check for a checker thread, and where its answer goes.
type Job = Box<dyn FnOnce() + Send>;

/// Runs password checks, a bounded number at once (see the module doc).
/// One per daemon, kept across config reloads.
pub struct Verifier {
    /// One per checker thread: a check holds one from start to end.
    turns: Arc<Semaphore>,
    /// The checker threads' queue, started on the first check.
    checkers: std::sync::OnceLock<std::sync::mpsc::Sender<Job>>,
    waiting: AtomicUsize,
    max_wait: Duration,
    /// One line a minute about logins turned away, however many.
    busy_log: crate::observe::quiet::LogBudget<()>,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier::new(MAX_CHECKS, MAX_WAIT)
    }
}

impl Verifier {
    pub fn new(checks: usize, max_wait: Duration) -> Verifier {
        Verifier {
            turns: Arc::new(Semaphore::new(checks.max(1))),
            checkers: std::sync::OnceLock::new(),
            waiting: AtomicUsize::new(0),
            max_wait,
            busy_log: crate::observe::quiet::LogBudget::new(1, Duration::from_secs(60)),
        }
    }

    /// Logs (at most once a minute) that a login was turned away busy.
    pub fn note_busy(&self, ip: std::net::IpAddr) {
        if let crate::observe::quiet::Verdict::Log { suppressed } = self.busy_log.check(&()) {
            tracing::warn!(
                target: "relayq::smtp",
                "AUTH from [{ip}] answered 454 4.7.0: {MAX_CHECKS} password checks running and {MAX_WAITING} waiting (a flood of logins?){}",
                crate::observe::quiet::note(suppressed, "minute")
            );
        }
    }

    /// Checks `user`'s password when a turn is free.
    pub async fn verify(&self, users: &Users, user: &str, password: String) -> Result<bool, Busy> {
        let turn = match self.turns.clone().try_acquire_owned() {
            Ok(turn) => turn,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(Busy);
                }
                let turn =
                    tokio::time::timeout(self.max_wait, self.turns.clone().acquire_owned()).await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                match turn {
                    Ok(Ok(turn)) => turn,
                    _ => return Err(Busy),
                }
            }
        };
        let (users, user) = (users.clone(), user.to_string());
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The turn goes with the check: if the session is dropped meanwhile,
        // the check still counts until it has finished.
        let job: Job = Box::new(move || {
            let ok = users.verify(&user, &password);
            drop(turn);
            let _ = tx.send(ok);
        });
        self.checkers().send(job).map_err(|_| Busy)?;
        rx.await.map_err(|_| Busy)
    }

    /// The checker threads: as many as turns, so a job never waits in the
    /// queue. They lower their own CPU priority (always allowed).
    fn checkers(&self) -> &std::sync::mpsc::Sender<Job> {
        self.checkers.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let rx = Arc::new(std::sync::Mutex::new(rx));
            for n in 0..self.turns.available_permits().max(1) {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("relayq-auth-{n}"))
                    .spawn(move || {
                        // Per thread on Linux: the rest of relayq keeps
                        // its priority.
                        let _ = rustix::process::setpriority_process(None, 10);
                        loop {
                            let job = match rx.lock() {
                                Ok(rx) => rx.recv(),
                                Err(_) => return,
                            };
                            match job {
                                Ok(job) => job(),
                                Err(_) => return,
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!("cannot start a password checker thread: {e}");
                }
            }
            tx
        })
    }
}

fn verify_hash(hash: &str, password: &str) -> bool {
    if hash.starts_with("$argon2") {
        PasswordHash::new(hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    } else {
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("relayq-dummy-password").unwrap_or_default())
}

/// An argon2id hash for the users file, with a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Decodes AUTH PLAIN's initial response: authzid NUL authcid NUL password.
pub fn decode_plain(b64: &str) -> Option<(String, String)> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let mut parts = raw.split(|&b| b == 0);
    let authzid = parts.next()?;
    let user = parts.next()?;
    let pass = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let user = std::str::from_utf8(user).ok()?.to_string();
    let authzid = std::str::from_utf8(authzid).ok()?;
    // Acting for someone else is not supported.
    if !authzid.is_empty() && authzid != user {
        return None;
    }
    Some((user, std::str::from_utf8(pass).ok()?.to_string()))
}

pub fn decode_b64_text(b64: &str) -> Option<String> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    String::from_utf8(raw).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_and_bcrypt_users() {
        let a = hash_password("s3cret").unwrap();
        let b = bcrypt::hash("b-pass", 4).unwrap();
        let users = Users::parse(&format!("# comment\nalice:{a}\nbob:{b}\n"), "users").unwrap();
        assert_eq!(users.len(), 2);
        assert!(users.verify("alice", "s3cret"));
        assert!(!users.verify("alice", "wrong"));
        assert!(users.verify("bob", "b-pass"));
        assert!(!users.verify("carol", "s3cret"));
    }

    #[test]
    fn bad_lines_are_named() {
        let err = Users::parse("alice:plaintext\n", "/etc/relayq/users")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("/etc/relayq/users, line 1") && err.contains("hash-password"),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_verifier_bounds_checks_and_refuses_beyond_the_queue() {
        let b = bcrypt::hash("pw", 8).unwrap();
        let users = Users::parse(&format!("alice:{b}\n"), "users").unwrap();
        let v = Arc::new(Verifier::new(1, Duration::from_millis(200)));
        let mut tasks = Vec::new();
        for _ in 0..(MAX_WAITING + 8) {
            let (v, users) = (v.clone(), users.clone());
            tasks.push(tokio::spawn(async move {
                v.verify(&users, "alice", "pw".into()).await
            }));
        }
        let mut ok = 0;
        let mut busy = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(true) => ok += 1,
                Ok(false) => panic!("right password refused"),
                Err(Busy) => busy += 1,
            }
        }
        assert!(ok >= 1, "some checks ran");
        assert!(
            busy >= 8,
            "beyond the queue, refused at once ({ok} ok, {busy} busy)"
        );
        assert_eq!(v.turns.available_permits(), 1, "every turn came back");
    }

    #[test]
    fn plain_decoding() {
        use base64::Engine;
        let enc = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            decode_plain(&enc(b"\0alice\0pw")),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(
            decode_plain(&enc(b"alice\0alice\0pw")),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(decode_plain(&enc(b"root\0alice\0pw")), None);
        assert_eq!(decode_plain("not base64!"), None);
    }
}
