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
//! file, which also makes the directory entry durable. The daemon removes
//! a drop file once it is queued and fsyncs `maildrop/` at once, so a power
//! loss cannot bring back (and queue again) a file already queued.
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
//!
//! What a user can leave behind is bounded. Anything in the maildrop that
//! cannot become a message (a directory, a FIFO, a file relayq may not
//! read, a stray name) is removed ([`clear`]); what the daemon cannot
//! remove (a full directory another user owns, when relayq does not run as
//! root) is renamed `.junk.<ULID>` and left for root, and the report says
//! which happened. Refused drop files are kept for a human in
//! `corrupt/maildrop/`, at most [`KEEP_FILES`] files, [`KEEP_BYTES`]
//! bytes (apparent size: a sparse file counts whole) and [`KEEP_AGE`]
//! old; one larger than the message size limit is not kept at all.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::format::{self, Envelope, Meta, RcptState};
use super::{SpoolError, check_id, fsop};

pub const DIR: &str = "maildrop";
pub const PICKUP_SOCKET: &str = "pickup.sock";
const TMP_PREFIX: &str = ".tmp.";
/// An entry the daemon could not remove, renamed out of the way.
const JUNK_PREFIX: &str = ".junk.";
/// A `.tmp.` file older than this belongs to a sendmail that died.
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);
/// Refused drop files kept in `corrupt/maildrop/`: at most this many ...
pub const KEEP_FILES: usize = 100;
/// ... this many bytes together ...
pub const KEEP_BYTES: u64 = 100 * 1024 * 1024;
/// ... and none older than this.
pub const KEEP_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Where refused drop files are kept, under the spool root.
pub const CORRUPT_DIR: &str = "corrupt/maildrop";

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
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o1733)).map_err(|e| io(&dir, e))?;
    let kept = spool_root.join(CORRUPT_DIR);
    fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&kept)
        .map_err(|e| io(&kept, e))
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
        let file = fsop::create_new_with(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .custom_flags(libc::O_NOFOLLOW),
            &tmp,
        )?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        // Readable by the daemon whatever user it runs as; explicit because
        // the umask may have removed bits.
        rustix::fs::fchmod(&file, rustix::fs::Mode::from_raw_mode(0o444))?;
        let header = format::encode_header(&id, arrival_ms, env, message.len() as u64);
        let body_at = header.len() as u64;
        fsop::write_at(&file, &header, 0)?;
        fsop::write_at(&file, message, body_at)?;
        fsop::write_at(&file, format::END, body_at + message.len() as u64)?;
        fsop::sync_data(&file)?;
        fsop::rename(&tmp, &done)?;
        fsop::sync_fs(&file)
    })();
    if let Err(e) = result {
        let _ = fsop::remove_file(&tmp);
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
    /// Not a regular file (symlink, FIFO, directory, ...), hard-linked, or
    /// not readable by relayq: to be cleared ([`clear`]).
    #[error("{0}")]
    NotAFile(String),
    /// A file that does not decode or breaks a rule: kept in
    /// `corrupt/maildrop/` (see [`to_corrupt`]). `uid` is the file's
    /// owner, who wrote it.
    #[error("{why}")]
    Bad { uid: u32, why: String },
    /// A file over the message size limit: removed, or kept when small
    /// enough (see [`to_corrupt`]).
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
    /// Entries that can never become drop files (junk, stale tmp files),
    /// and what [`scan`] did with them.
    pub junk: Vec<Junk>,
}

/// An entry of the maildrop that is no drop file.
#[derive(Debug)]
pub struct Junk {
    /// Its name, printable (control characters escaped).
    pub name: String,
    /// Its owner, who planted it (unknown if it vanished meanwhile).
    pub owner: Option<u32>,
    /// Why it is junk.
    pub why: String,
    pub outcome: Cleared,
}

/// What [`clear`] did with a junk entry: said as it is.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleared {
    Removed,
    /// Could not be removed; renamed to this name in the maildrop, where
    /// scans leave it alone, for root to remove.
    Renamed {
        to: String,
        error: String,
    },
    /// Could be neither removed nor renamed (or it vanished).
    Left {
        error: String,
    },
}

impl std::fmt::Display for Cleared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cleared::Removed => f.write_str("removed"),
            Cleared::Renamed { to, error } => write!(
                f,
                "cannot be removed ({error}); renamed to maildrop/{to}, which relayq leaves alone: remove it as root"
            ),
            Cleared::Left { error } => {
                write!(f, "cannot be removed or renamed ({error}); left in place")
            }
        }
    }
}

/// Removes a maildrop entry that is no drop file: a file or link is
/// unlinked, a directory removed with what is inside (without following
/// links). What cannot be removed (a directory of another user that relayq
/// may not empty) is renamed out of the scan's way, which needs no
/// permission on the entry itself.
pub fn clear(spool_root: &Path, name: &std::ffi::OsStr) -> Cleared {
    let dir = dir(spool_root);
    let path = dir.join(name);
    let removed = match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
        Ok(_) => fsop::remove_file(&path),
        Err(e) => {
            return Cleared::Left {
                error: e.to_string(),
            };
        }
    };
    let error = match removed {
        Ok(()) => return Cleared::Removed,
        Err(e) => e.to_string(),
    };
    let to = format!("{JUNK_PREFIX}{}", super::Spool::new_id());
    match fs::rename(&path, dir.join(&to)) {
        Ok(()) => Cleared::Renamed { to, error },
        Err(e) => Cleared::Left {
            error: format!("{error}; rename: {e}"),
        },
    }
}

/// Lists the maildrop and clears junk.
pub fn scan(spool_root: &Path) -> Result<Scan, SpoolError> {
    let dir = dir(spool_root);
    let mut scan = Scan::default();
    let now = SystemTime::now();
    for entry in fs::read_dir(&dir)
        .map_err(|e| SpoolError::io(&dir, e))?
        .flatten()
    {
        let raw = entry.file_name();
        let name = raw.to_string_lossy();
        let why = if check_id(&name).is_ok() {
            scan.ready.push(name.into_owned());
            continue;
        } else if let Some(id) = name.strip_prefix(TMP_PREFIX)
            && check_id(id).is_ok()
        {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > STALE_TMP);
            if !old {
                continue;
            }
            "an unfinished write older than a day"
        } else if name.starts_with(JUNK_PREFIX) {
            // Reported when it was renamed; removed quietly once it can be.
            let _ = clear(spool_root, &raw);
            continue;
        } else {
            "not a drop file name"
        };
        let owner = entry.metadata().ok().map(|m| m.uid());
        let kind = entry
            .file_type()
            .map(|t| {
                if t.is_dir() {
                    "a directory"
                } else if t.is_file() {
                    "a file"
                } else {
                    "an entry"
                }
            })
            .unwrap_or("an entry");
        scan.junk.push(Junk {
            name: name.escape_debug().to_string(),
            owner,
            why: format!("{kind}, {why}"),
            outcome: clear(spool_root, &raw),
        });
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
            // A drop file is made readable by sendmail: its owner took that
            // away (it would be retried, and reported, forever).
            Some(libc::EACCES | libc::EPERM) => {
                Rejected::NotAFile(format!("not readable by relayq ({e})"))
            }
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

/// Removes a drop file once it is queued (or was not a file at all), and
/// makes the removal durable: a power loss must not bring back a file
/// already queued, or it would be queued (and sent) a second time.
pub fn remove(spool_root: &Path, name: &str) -> Result<(), SpoolError> {
    check_id(name)?;
    let dir = dir(spool_root);
    let path = dir.join(name);
    fsop::remove_file(&path).map_err(|e| SpoolError::io(&path, e))?;
    super::fsync_dir(&dir)
}

/// What became of a refused drop file.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Kept for a human as `corrupt/maildrop/<name>`.
    Kept(String),
    /// Removed: too large to keep (the reason).
    Removed(String),
}

/// Moves a refused drop file to `corrupt/maildrop/` under a fresh id, for
/// a human, unless it is larger than `max_size` or than all that is kept
/// (then it is removed); then keeps that directory within its bounds.
/// Returns what happened, and the names of kept files removed to make room.
pub fn to_corrupt(
    spool_root: &Path,
    name: &str,
    max_size: u64,
) -> Result<(Refused, Vec<String>), SpoolError> {
    check_id(name)?;
    let src = dir(spool_root).join(name);
    let size = fs::symlink_metadata(&src)
        .map_err(|e| SpoolError::io(&src, e))?
        .len();
    if size > max_size || size > KEEP_BYTES {
        fsop::remove_file(&src).map_err(|e| SpoolError::io(&src, e))?;
        super::fsync_dir(&dir(spool_root))?;
        let why = format!(
            "{size} bytes, too large to keep (corrupt/maildrop keeps files up to {} bytes)",
            max_size.min(KEEP_BYTES)
        );
        return Ok((Refused::Removed(why), Vec::new()));
    }
    let id = super::Spool::new_id();
    let kept = spool_root.join(CORRUPT_DIR);
    // Synced like a move between queue directories (durability rule 5):
    // a power loss must not bring it back to be refused (and logged)
    // again, or leave a second copy in corrupt/.
    fsop::rename(&src, &kept.join(&id)).map_err(|e| SpoolError::io(&src, e))?;
    super::fsync_dir(&kept)?;
    super::fsync_dir(&dir(spool_root))?;
    Ok((Refused::Kept(id), prune(spool_root, SystemTime::now())))
}

/// Keeps `corrupt/maildrop/` within [`KEEP_FILES`], [`KEEP_BYTES`] and
/// [`KEEP_AGE`], removing the oldest first; returns what it removed.
pub fn prune(spool_root: &Path, now: SystemTime) -> Vec<String> {
    let kept = spool_root.join(CORRUPT_DIR);
    let Ok(entries) = fs::read_dir(&kept) else {
        return Vec::new();
    };
    let mut files: Vec<(SystemTime, u64, PathBuf, String)> = entries
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            Some((m.modified().unwrap_or(now), m.len(), e.path(), name))
        })
        .collect();
    // Oldest first (ids are time-ordered, mtime breaks no ties).
    files.sort_by(|a, b| a.3.cmp(&b.3));
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    let mut count = files.len();
    let mut removed = Vec::new();
    for (mtime, size, path, name) in files {
        let too_old = now.duration_since(mtime).is_ok_and(|age| age > KEEP_AGE);
        if !(too_old || count > KEEP_FILES || total > KEEP_BYTES) {
            continue;
        }
        if fs::remove_file(&path).is_ok() {
            count -= 1;
            total = total.saturating_sub(size);
            removed.push(name);
        }
    }
    removed
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
        let (kept, pruned) = to_corrupt(root, garbage, 1000).unwrap();
        let Refused::Kept(id) = kept else {
            panic!("{kept:?}")
        };
        assert!(root.join(CORRUPT_DIR).join(id).exists() && pruned.is_empty());
        fs::write(dir_path(root, "not-an-id"), b"x").unwrap();
        fs::create_dir_all(dir_path(root, "planted/deeper")).unwrap();
        let s = scan(root).unwrap();
        for name in ["not-an-id", "planted"] {
            let j = s.junk.iter().find(|j| j.name == name).unwrap();
            assert_eq!(j.outcome, Cleared::Removed, "{j:?}");
            assert!(!dir_path(root, name).exists());
        }
    }

    #[test]
    fn corrupt_maildrop_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        prepare(root).unwrap();
        let bad = |name: &str, len: u64| {
            let f = File::create(dir_path(root, name)).unwrap();
            f.set_len(len).unwrap();
        };
        // A sparse file larger than the message limit is not kept.
        bad("01DDDDDDDDDDDDDDDDDDDDDDDD", 1 << 30);
        let (r, _) = to_corrupt(root, "01DDDDDDDDDDDDDDDDDDDDDDDD", 1 << 20).unwrap();
        assert!(matches!(r, Refused::Removed(_)), "{r:?}");
        assert!(!dir_path(root, "01DDDDDDDDDDDDDDDDDDDDDDDD").exists());
        // Beyond KEEP_FILES, the oldest go.
        let mut kept = Vec::new();
        for _ in 0..KEEP_FILES + 5 {
            let name = super::super::Spool::new_id();
            bad(&name, 10);
            if let (Refused::Kept(id), _) = to_corrupt(root, &name, 1 << 20).unwrap() {
                kept.push(id);
            }
        }
        let mut left: Vec<String> = fs::read_dir(root.join(CORRUPT_DIR))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        left.sort();
        kept.sort();
        assert_eq!(
            left,
            kept[kept.len() - KEEP_FILES..],
            "the oldest went first"
        );
        // Files older than KEEP_AGE go at the next prune.
        let later = SystemTime::now() + KEEP_AGE + Duration::from_secs(60);
        assert_eq!(prune(root, later).len(), KEEP_FILES);
    }
}
