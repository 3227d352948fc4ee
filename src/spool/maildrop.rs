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
//!   pickup/               0700, daemon's user
//!     <ID>                a drop file being queued as message <ID>
//! ```
//! A drop file uses the queue file format (see the parent module) with no
//! status records. It is written by the same rules as a queue file, with
//! one change: an unprivileged process cannot open the write-only
//! directory to fsync it, so after the rename it calls `syncfs(2)` on the
//! file, which also makes the directory entry durable.
//!
//! The daemon queues a drop file exactly once, whatever a crash or power
//! loss interrupts (durability rule 6 of the parent module): it moves the
//! file out of the maildrop into `pickup/<ID>` ([`claim`]) before it
//! commits message `<ID>`, and removes it from there ([`release`]) before
//! the message can be delivered; at the next start, after recovery, what is
//! left in `pickup/` is removed if the spool holds its message and goes
//! back to the maildrop if not ([`settle`]).
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
//! than the submitter's) is still not found by others. A user may replace
//! their file under its name after the daemon read it: [`claim`] checks
//! that what it moved out of their reach is the file it read (device and
//! inode), and puts anything else back for the next scan.
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
/// Where drop files wait while they are queued, out of their owners' reach.
pub const PICKUP_DIR: &str = "pickup";
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

fn pickup_dir(spool_root: &Path) -> PathBuf {
    spool_root.join(PICKUP_DIR)
}

/// Creates `maildrop/` (mode 1733) and lets others traverse the spool root
/// (0711), so users can reach the maildrop and the pickup socket but
/// nothing else; and the daemon's own `pickup/` and `corrupt/maildrop/`
/// (0700). Run by the daemon at start.
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
    for private in [spool_root.join(CORRUPT_DIR), pickup_dir(spool_root)] {
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&private)
            .map_err(|e| io(&private, e))?;
    }
    Ok(())
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
    /// The file that was read, for [`claim`]: its owner may put another
    /// one under its name meanwhile.
    pub file: FileId,
    pub meta: Meta,
    pub body: Vec<u8>,
}

/// A file's identity (device and inode), whatever its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(m: &fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
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
        Ok(m) => remove_entry(&path, &m),
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

/// Removes a file or link, or a directory with what is inside (without
/// following links).
fn remove_entry(path: &Path, m: &fs::Metadata) -> io::Result<()> {
    if m.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fsop::remove_file(path)
    }
}

fn clear_path(path: &Path) -> io::Result<()> {
    remove_entry(path, &fs::symlink_metadata(path)?)
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
        file: FileId::of(&st),
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
/// [`scan`], nothing is removed): in the maildrop, and in `pickup/` where
/// a stop or crash left one whose message is not queued. Entries that are
/// not plain drop files, or vanish meanwhile (picked up), are left out.
pub fn waiting(spool_root: &Path) -> Result<Vec<Waiting>, SpoolError> {
    let mut found = Vec::new();
    for dir in [dir(spool_root), pickup_dir(spool_root)] {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            // Not made yet: the daemon never ran, nothing can wait there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SpoolError::io(&dir, e)),
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let queued = || {
                ["queue", "hold"]
                    .iter()
                    .any(|area| spool_root.join(area).join(&name).exists())
            };
            if check_id(&name).is_err() || (dir.ends_with(PICKUP_DIR) && queued()) {
                continue;
            }
            if let Some(w) = read_waiting(&dir.join(&name)) {
                found.push(w);
            }
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

/// Takes drop file `name`, read and checked as `file`, out of the
/// maildrop to be queued as message `id`: renames it `pickup/<id>`, where
/// its owner can no longer replace or remove it, and makes the rename
/// durable (both directories), so that no crash can leave it in the
/// maildrop once message `id` exists. `Ok(false)`: the name no longer
/// held the file that was read (its owner replaced it meanwhile); what is
/// there now is put back for the next scan to judge. On an error the file
/// is left in the maildrop (or, if even putting it back fails, in
/// `pickup/`, for [`settle`]).
pub fn claim(spool_root: &Path, name: &str, id: &str, file: FileId) -> Result<bool, SpoolError> {
    check_id(name)?;
    check_id(id)?;
    let (maildrop, pickup) = (dir(spool_root), pickup_dir(spool_root));
    let (from, to) = (maildrop.join(name), pickup.join(id));
    super::fsop::rename(&from, &to).map_err(|e| SpoolError::io(&from, e))?;
    let same = fs::symlink_metadata(&to).is_ok_and(|m| FileId::of(&m) == file);
    if !same {
        if super::fsop::rename(&to, &from).is_err() {
            let _ = clear_path(&to);
        }
        return Ok(false);
    }
    if let Err(e) = super::fsync_dir(&maildrop).and_then(|()| super::fsync_dir(&pickup)) {
        let _ = super::fsop::rename(&to, &from);
        return Err(e);
    }
    Ok(true)
}

/// Removes the drop file of message `id` from `pickup/`, if it is there,
/// and makes that durable: once message `id` is committed, before it may
/// be delivered (a file left there after a delivery would be queued
/// again); and before a queue tool deletes message `id` with the daemon
/// stopped (the next start would put the file back into the maildrop and
/// send the deleted message after all). The message exists either way,
/// so removing the file first loses nothing. A file already gone counts
/// as removed, so that a release whose sync failed can be tried again.
pub fn release(spool_root: &Path, id: &str) -> Result<(), SpoolError> {
    check_id(id)?;
    let pickup = pickup_dir(spool_root);
    let path = pickup.join(id);
    match super::fsop::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(SpoolError::io(&path, e)),
    }
    super::fsync_dir(&pickup)
}

/// Whether a drop file waits in `pickup/` for message `id` (left by a
/// crash or stop; see [`release`]).
pub fn claimed(spool_root: &Path, id: &str) -> bool {
    check_id(id).is_ok() && fs::symlink_metadata(pickup_dir(spool_root).join(id)).is_ok()
}

/// Puts the drop file of message `id` back into the maildrop, as
/// `maildrop/<id>` (a fresh name nobody else knows), to be picked up
/// again: its message was not committed.
pub fn unclaim(spool_root: &Path, id: &str) -> Result<(), SpoolError> {
    check_id(id)?;
    let from = pickup_dir(spool_root).join(id);
    super::fsop::rename(&from, &dir(spool_root).join(id)).map_err(|e| SpoolError::io(&from, e))
}

/// What [`settle`] did with the files a stop or crash left in `pickup/`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Their message was committed: removed.
    pub queued: usize,
    /// Their message was not: back in the maildrop.
    pub returned: usize,
}

/// At start, after recovery and before the first scan: each file left in
/// `pickup/` is removed if the spool holds its message (`held(id)`: the
/// commit finished, and the message was not yet handed on to delivery),
/// else put back into the maildrop; both made durable before the pickup
/// or the scheduler go on.
pub fn settle(spool_root: &Path, held: impl Fn(&str) -> bool) -> Result<Settled, SpoolError> {
    let pickup = pickup_dir(spool_root);
    let mut settled = Settled::default();
    let entries = match fs::read_dir(&pickup) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(settled),
        Err(e) => return Err(SpoolError::io(&pickup, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| SpoolError::io(&pickup, e))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().filter(|n| check_id(n).is_ok()) else {
            // Only the daemon writes here; nothing else can be a message.
            let _ = clear_path(&entry.path());
            continue;
        };
        if held(id) {
            let path = entry.path();
            super::fsop::remove_file(&path).map_err(|e| SpoolError::io(&path, e))?;
            settled.queued += 1;
        } else {
            unclaim(spool_root, id)?;
            settled.returned += 1;
        }
    }
    if settled != Settled::default() {
        super::fsync_dir(&pickup)?;
        super::fsync_dir(&dir(spool_root))?;
    }
    Ok(settled)
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
        let id = super::super::Spool::new_id();
        assert!(claim(root, &name, &id, d.file).unwrap());
        assert!(!p.exists() && claimed(root, &id));
        release(root, &id).unwrap();
        assert!(!claimed(root, &id));
        // Again, as after a sync that failed: the file is gone, done.
        release(root, &id).unwrap();
    }

    /// The owner of a drop file replaces it after it was read: the claim
    /// puts back what it moved, and the next read sees the new file.
    #[test]
    fn a_drop_file_replaced_after_the_read_is_not_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        prepare(root).unwrap();
        let name = write(root, &env(), b"Subject: first\r\n\r\nx\r\n", 7).unwrap();
        let first = read(root, &name, 1000).unwrap();
        let p = dir_path(root, &name);
        // Held open, so that the new file cannot get the freed inode number
        // (ext4 reuses them at once; the claim would then see the same file).
        let _held = File::open(&p).unwrap();
        fs::remove_file(&p).unwrap();
        let other = write(root, &env(), b"Subject: second\r\n\r\ny\r\n", 7).unwrap();
        fs::rename(dir_path(root, &other), &p).unwrap();
        let id = super::super::Spool::new_id();
        assert!(!claim(root, &name, &id, first.file).unwrap());
        assert!(!pickup_dir(root).join(&id).exists());
        let again = read(root, &name, 1000).unwrap();
        assert_eq!(again.body, b"Subject: second\r\n\r\ny\r\n");
        assert!(claim(root, &name, &id, again.file).unwrap());
    }

    /// What a crash leaves in pickup/: removed where its message was
    /// committed, back in the maildrop (and read as before) where not.
    #[test]
    fn settle_removes_what_was_queued_and_returns_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        prepare(root).unwrap();
        let mut ids = Vec::new();
        for n in 0..3 {
            let name = write(root, &env(), format!("Subject: {n}\r\n\r\n").as_bytes(), 7).unwrap();
            let d = read(root, &name, 1000).unwrap();
            let id = super::super::Spool::new_id();
            assert!(claim(root, &name, &id, d.file).unwrap());
            ids.push(id);
        }
        fs::write(pickup_dir(root).join("stray"), b"x").unwrap();
        let settled = settle(root, |id| id == ids[1]).unwrap();
        assert_eq!(
            settled,
            Settled {
                queued: 1,
                returned: 2
            }
        );
        assert_eq!(fs::read_dir(pickup_dir(root)).unwrap().count(), 0);
        let back = scan(root).unwrap().ready;
        let mut want = vec![ids[0].clone(), ids[2].clone()];
        want.sort();
        assert_eq!(back, want);
        assert_eq!(
            read(root, &ids[2], 1000).unwrap().body,
            b"Subject: 2\r\n\r\n"
        );
        assert_eq!(settle(root, |_| false).unwrap(), Settled::default());
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
