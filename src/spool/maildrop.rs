//! The maildrop: where `sendmail` run by an ordinary user leaves a message
//! for the daemon, which checks it and queues it through the one writer
//! ([`Spool::commit`](super::Spool::commit)). Postfix's `maildrop/` +
//! `postdrop` + `pickup` is the model.
//!
//! # Layout and permissions
//! ```text
//! <spool_dir>/            0711: others may pass through, not list or write
//!   maildrop/             1733 (sticky, write-only for others), daemon's user
//!     .tmp.<ULID>         being written by a sendmail process
//!     <ULID>              complete: owned by the submitting user, mode 0444
//!   pickup.sock           0666: a connection (no data) wakes the pickup
//! ```
//! A drop file uses the queue file format (see the parent module) with no
//! status records. It is written by the same rules as a queue file, with
//! one change: an unprivileged process cannot open the write-only
//! directory to fsync it, so after the rename it calls `syncfs(2)` on the
//! file, which also makes the directory entry durable.
//!
//! # Security
//! Everything in `maildrop/` was written by a possibly hostile local user.
//! The daemon opens a drop file with `O_NOFOLLOW | O_NONBLOCK` and checks on
//! the open descriptor that it is a regular file with one link (no symlink
//! to, or hard link of, a file the user could not read) and not larger than
//! the message size limit; the content is parsed by the queue file decoder,
//! which treats it as untrusted. The file's owner (set by the kernel, not
//! the user) is the submitter's identity: the caller decides from it
//! whether the envelope sender in the file may stand (see `submit`). The
//! queue id is chosen by the daemon, never taken from the file name. Other
//! users cannot list the directory, and the sticky bit stops them renaming
//! or deleting files they do not own; the drop file names carry 80 random
//! bits, so a file readable by all (the daemon may run as a user other
//! than the submitter's) is still not found by others.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::format::{self, Envelope, Meta, RcptState};
use super::{SpoolError, check_id};

pub const DIR: &str = "maildrop";
pub const PICKUP_SOCKET: &str = "pickup.sock";
const TMP_PREFIX: &str = ".tmp.";
/// A `.tmp.` file older than this belongs to a sendmail that died.
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

pub fn dir(spool_root: &Path) -> PathBuf {
    spool_root.join(DIR)
}

pub fn pickup_socket(spool_root: &Path) -> PathBuf {
    spool_root.join(PICKUP_SOCKET)
}

/// Creates `maildrop/` (mode 1733) and lets others traverse the spool root
/// (0711), so users can reach the maildrop and the pickup socket but
/// nothing else. Run by the daemon at start.
pub fn prepare(spool_root: &Path) -> Result<(), SpoolError> {
    let io = |p: &Path, e| SpoolError::io(p, e);
    let root_mode = fs::metadata(spool_root)
        .map_err(|e| io(spool_root, e))?
        .permissions()
        .mode();
    if root_mode & 0o011 != 0o011 {
        fs::set_permissions(
            spool_root,
            fs::Permissions::from_mode((root_mode & 0o7777) | 0o011),
        )
        .map_err(|e| io(spool_root, e))?;
    }
    let dir = dir(spool_root);
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(&dir, e)),
    }
    let meta = fs::symlink_metadata(&dir).map_err(|e| io(&dir, e))?;
    if !meta.is_dir() {
        return Err(io(
            &dir,
            io::Error::other("is not a directory; remove it and restart"),
        ));
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o1733)).map_err(|e| io(&dir, e))
}

/// Writes a drop file (client side). Returns its name.
pub fn write(
    spool_root: &Path,
    env: &Envelope,
    message: &[u8],
    arrival_ms: u64,
) -> Result<String, SpoolError> {
    let dir = dir(spool_root);
    let id = super::Spool::new_id();
    let tmp = dir.join(format!("{TMP_PREFIX}{id}"));
    let done = dir.join(&id);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        // Readable by the daemon whatever user it runs as; explicit because
        // the umask may have removed bits.
        rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(0o444))?;
        file.write_all(&format::encode_header(
            &id,
            arrival_ms,
            env,
            message.len() as u64,
        ))?;
        file.write_all(message)?;
        file.write_all(format::END)?;
        file.sync_data()?;
        fs::rename(&tmp, &done)?;
        rustix::fs::syncfs(&file)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(SpoolError::io(&dir, e));
    }
    Ok(id)
}

/// A drop file the daemon has read and checked.
#[derive(Debug)]
pub struct Dropped {
    /// The file's name in `maildrop/`.
    pub name: String,
    /// Who wrote it (the file's owner).
    pub uid: u32,
    pub meta: Meta,
    pub body: Vec<u8>,
}

/// What to do with a maildrop entry that is not a valid drop file.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    /// Not a regular file (symlink, FIFO, ...) or hard-linked: removed.
    #[error("{0}")]
    NotAFile(String),
    /// A file that does not decode or breaks a rule: moved to corrupt/.
    /// `uid` is the file's owner, who wrote it.
    #[error("{why}")]
    Bad { uid: u32, why: String },
    /// A file over the message size limit: moved to corrupt/.
    #[error("{why}")]
    TooBig { uid: u32, why: String },
    /// Could not be read now; left for the next scan.
    #[error("{0}")]
    Io(String),
}

/// What [`scan`] finds in the maildrop.
#[derive(Debug, Default)]
pub struct Scan {
    /// Names of complete drop files, oldest first.
    pub ready: Vec<String>,
    /// Entries that can never become drop files (junk, stale tmp files):
    /// removed by [`scan`] itself.
    pub removed: Vec<(String, &'static str)>,
}

/// Lists the maildrop and removes junk.
pub fn scan(spool_root: &Path) -> Result<Scan, SpoolError> {
    let dir = dir(spool_root);
    let mut scan = Scan::default();
    let now = SystemTime::now();
    for entry in fs::read_dir(&dir)
        .map_err(|e| SpoolError::io(&dir, e))?
        .flatten()
    {
        let Ok(name) = entry.file_name().into_string() else {
            let _ = fs::remove_file(entry.path());
            scan.removed.push(("(non-UTF-8 name)".into(), "junk name"));
            continue;
        };
        if check_id(&name).is_ok() {
            scan.ready.push(name);
        } else if let Some(id) = name.strip_prefix(TMP_PREFIX)
            && check_id(id).is_ok()
        {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > STALE_TMP);
            if old {
                let _ = fs::remove_file(entry.path());
                scan.removed
                    .push((name, "unfinished write older than a day"));
            }
        } else {
            let _ = fs::remove_dir_all(entry.path()).or_else(|_| fs::remove_file(entry.path()));
            scan.removed.push((name, "not a drop file name"));
        }
    }
    scan.ready.sort_unstable();
    Ok(scan)
}

/// Opens, checks and decodes one drop file. `max_size` bounds the message.
pub fn read(spool_root: &Path, name: &str, max_size: u64) -> Result<Dropped, Rejected> {
    check_id(name).map_err(|e| Rejected::NotAFile(e.to_string()))?;
    let path = dir(spool_root).join(name);
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Rejected::NotAFile("a symbolic link".into()),
            _ => Rejected::Io(format!("cannot open: {e}")),
        })?;
    let st = file
        .metadata()
        .map_err(|e| Rejected::Io(format!("cannot stat: {e}")))?;
    if !st.is_file() {
        return Err(Rejected::NotAFile("not a regular file".into()));
    }
    if st.nlink() != 1 {
        return Err(Rejected::NotAFile(format!(
            "has {} hard links (a drop file has one)",
            st.nlink()
        )));
    }
    // Room for the envelope of max_recipients long addresses.
    let limit = max_size.saturating_add(1 << 20);
    let uid = st.uid();
    let bad = |why: String| Rejected::Bad { uid, why };
    if st.len() > limit {
        return Err(Rejected::TooBig {
            uid,
            why: format!("{} bytes, more than the message size limit", st.len()),
        });
    }
    let mut buf = Vec::with_capacity(st.len() as usize);
    Read::by_ref(&mut file)
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Rejected::Io(format!("cannot read: {e}")))?;
    let (meta, body) = format::decode(&buf).map_err(|e| bad(e.to_string()))?;
    if meta.size > max_size {
        return Err(Rejected::TooBig {
            uid,
            why: format!(
                "message of {} bytes is over the limit of {max_size}",
                meta.size
            ),
        });
    }
    if meta.attempts != 0
        || meta.next_attempt_ms.is_some()
        || meta.accepted_logged
        || meta
            .recipients
            .iter()
            .any(|r| r.state != RcptState::Pending || r.last_reply.is_some())
    {
        return Err(bad("status records in a drop file".into()));
    }
    if meta.recipients.is_empty() {
        return Err(bad("no recipients".into()));
    }
    // Who wrote a drop file is the kernel's word (its owner), never a line
    // the user wrote.
    if meta.submitter.is_some() {
        return Err(bad("a submitter line in a drop file".into()));
    }
    let body = body.to_vec();
    Ok(Dropped {
        name: name.to_string(),
        uid,
        meta,
        body,
    })
}

/// A complete drop file as the queue listing shows it.
#[derive(Debug)]
pub struct Waiting {
    /// The file's owner: who ran `sendmail`.
    pub uid: u32,
    /// The header only (the name is `meta.id`; the daemon assigns the
    /// queue id when it picks the file up).
    pub meta: Meta,
}

/// The drop files waiting for the pickup, oldest first, read-only (unlike
/// [`scan`], nothing is removed). Entries that are not plain drop files,
/// or vanish meanwhile (picked up), are left out.
pub fn waiting(spool_root: &Path) -> Result<Vec<Waiting>, SpoolError> {
    let dir = dir(spool_root);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        // No maildrop yet: the daemon never ran, nothing can wait there.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SpoolError::io(&dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if check_id(&name).is_err() {
            continue;
        }
        if let Some(w) = read_waiting(&dir.join(&name)) {
            found.push(w);
        }
    }
    found.sort_by(|a, b| a.meta.id.cmp(&b.meta.id));
    Ok(found)
}

/// The header of one drop file, opened as the pickup opens it.
fn read_waiting(path: &Path) -> Option<Waiting> {
    // The header of max_recipients long addresses fits in this.
    const HEADER_MAX: u64 = 1 << 20;
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let st = file.metadata().ok()?;
    if !st.is_file() || st.nlink() != 1 {
        return None;
    }
    let mut buf = Vec::new();
    file.take(HEADER_MAX).read_to_end(&mut buf).ok()?;
    let mut meta = format::decode_header(&buf).ok()??;
    // The file name, not the id line the user wrote, names it.
    meta.id = path.file_name()?.to_str()?.to_string();
    Some(Waiting {
        uid: st.uid(),
        meta,
    })
}

/// Removes a drop file once it is queued (or was not a file at all).
pub fn remove(spool_root: &Path, name: &str) -> Result<(), SpoolError> {
    check_id(name)?;
    let path = dir(spool_root).join(name);
    fs::remove_file(&path).map_err(|e| SpoolError::io(&path, e))
}

/// Moves a bad drop file to `corrupt/` under a fresh id, for a human.
pub fn to_corrupt(spool_root: &Path, name: &str) -> Result<String, SpoolError> {
    check_id(name)?;
    let id = super::Spool::new_id();
    let src = dir(spool_root).join(name);
    let dst = spool_root.join("corrupt").join(&id);
    fs::rename(&src, &dst).map_err(|e| SpoolError::io(&src, e))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope {
            sender: "a@example.com".into(),
            recipients: vec!["b@example.net".into()],
            ..Envelope::default()
        }
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).unwrap();
        prepare(root).unwrap();
        assert_eq!(
            fs::metadata(root.join(DIR)).unwrap().permissions().mode() & 0o7777,
            0o1733
        );
        assert_eq!(
            fs::metadata(root).unwrap().permissions().mode() & 0o777,
            0o711
        );
        let name = write(root, &env(), b"Subject: x\r\n\r\nhi\r\n", 7).unwrap();
        let p = dir_path(root, &name);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o444
        );
        let scan = scan(root).unwrap();
        assert_eq!(scan.ready, vec![name.clone()]);
        let d = read(root, &name, 1000).unwrap();
        assert_eq!(d.meta.sender, "a@example.com");
        assert_eq!(d.body, b"Subject: x\r\n\r\nhi\r\n");
        assert!(matches!(read(root, &name, 5), Err(Rejected::TooBig { .. })));
        remove(root, &name).unwrap();
        assert!(!p.exists());
    }

    fn dir_path(root: &Path, name: &str) -> PathBuf {
        dir(root).join(name)
    }

    #[test]
    fn hostile_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        prepare(root).unwrap();
        fs::write(root.join("secret"), b"relayq-queue 1\n").unwrap();
        let link = "01AAAAAAAAAAAAAAAAAAAAAAAA";
        std::os::unix::fs::symlink(root.join("secret"), dir_path(root, link)).unwrap();
        assert!(matches!(read(root, link, 1000), Err(Rejected::NotAFile(_))));
        let hard = "01BBBBBBBBBBBBBBBBBBBBBBBB";
        fs::hard_link(root.join("secret"), dir_path(root, hard)).unwrap();
        let e = read(root, hard, 1000).unwrap_err();
        assert!(e.to_string().contains("hard links"), "{e}");
        let garbage = "01CCCCCCCCCCCCCCCCCCCCCCCC";
        fs::write(dir_path(root, garbage), b"MAIL FROM:<x>\n").unwrap();
        assert!(matches!(
            read(root, garbage, 1000),
            Err(Rejected::Bad { .. })
        ));
        fs::create_dir(root.join("corrupt")).unwrap();
        let id = to_corrupt(root, garbage).unwrap();
        assert!(root.join("corrupt").join(id).exists());
        fs::write(dir_path(root, "not-an-id"), b"x").unwrap();
        let s = scan(root).unwrap();
        assert!(s.removed.iter().any(|(n, _)| n == "not-an-id"));
        assert!(!dir_path(root, "not-an-id").exists());
    }
}
