//! The spool: relayq's durable queue on disk, and the only writer of
//! message files.
//!
//! # Layout
//! ```text
//! <spool_dir>/            mode 0700, owned by the daemon's user
//!   tmp/<ID>              being written; never trusted
//!   queue/<ID>            accepted, waiting for (re)delivery
//!   hold/<ID>             put on hold by an operator; not delivered
//!   corrupt/<ID>          could not be read; kept for a human, never deleted
//!   control.sock          the daemon's control socket (see `control`)
//!   daemon.lock           flock held by the running daemon, or by a queue
//!                         tool changing the spool while the daemon is down
//!   maildrop/             drop box for `sendmail` run by other users, and
//!   pickup.sock           its wake-up socket (see `maildrop`)
//!   limits.json           relay limit counts kept across restarts (see
//!                         `routing::status`); not a queue file
//! ```
//! A message's state is the directory it is in, and a change of state is a
//! `rename(2)`, so `ls` tells an operator the truth.
//!
//! # Queue file format (version 1)
//! ```text
//! relayq-queue 1\n
//! id <ID>\n                 ULID: time-ordered, 26 characters
//! arrival <unix ms>\n
//! sender <address>\n        empty for the null sender <>
//! flags <smtputf8,8bitmime | ->\n
//! rcpt <address>\n          one per recipient; its index is its order
//! size <n>\n
//! \n
//! <n bytes: the message, CRLF line ends, headers we added included>
//! end\n                     the end marker: the file was written whole
//! <status records, appended later, one per line:>
//! delivered <idx> <unix ms> <upstream reply>\n
//! failed <idx> <unix ms> <upstream reply or reason>\n
//! deferred <idx> <unix ms> <reason>\n
//! attempt <count> <next attempt unix ms>\n
//! ```
//! Addresses and replies never contain CR, LF or NUL (they are replaced by
//! spaces before they are written).
//!
//! # Durability rules (every write follows them)
//! 1. **Accept**: create `tmp/<ID>` with `O_EXCL` and mode 0600, hold an
//!    exclusive `flock` on it while writing, write header, content and end
//!    marker, `fdatasync` it, `rename` it to `queue/<ID>`, then `fsync` the
//!    `queue/` directory. Only after that may a client be told `250`.
//!    Directory fsyncs of concurrent accepts are batched (group commit): one
//!    fsync covers every rename that happened before it started.
//! 2. **Delivered / failed**: while other recipients of the message are
//!    still pending, append the record and `fdatasync` before the scheduler
//!    forgets the recipient. When the attempt leaves no recipient pending,
//!    the file is unlinked instead (rule 4): writing records only to delete
//!    them would cost an fsync per message. A bounce is committed (rule 1)
//!    before the `failed` records, or the unlink, that it reports. A crash
//!    between the upstream's `250` and our fsync can make us send once
//!    more: delivery is at least once, never at most once.
//! 3. **Deferred / attempt**: appended without fsync. Losing them only
//!    makes a retry come early after a crash.
//! 4. **Done**: when no recipient is pending the file is unlinked, without
//!    a directory fsync. A killed process cannot lose the unlink (it is in
//!    the kernel); a machine crash within the file system's commit interval
//!    can, and then the message is sent again, as Postfix would. A file
//!    whose records say every recipient is done is unlinked by recovery.
//! 5. **Hold / release / corrupt**: a `rename` between directories followed
//!    by an fsync of both.
//!
//! # Recovery (at start)
//! A file in `tmp/` is an accept that never finished, so its client never
//! got `250`: it is deleted, unless another process (the `sendmail`
//! command) still holds its lock. A file in `queue/` or `hold/` that does not
//! decode goes to `corrupt/` with an error in the log. A file whose
//! recipients are all done is deleted.
//!
//! # Security
//! Queue files hold other people's mail: the directories are 0700 and the
//! files 0600, and the daemon refuses a spool that others may write.
//! Once the daemon has prepared the maildrop the root is 0711, so other
//! users can reach `maildrop/` and `pickup.sock` but list nothing.
//! Queue file contents are parsed as untrusted input (see `format`).

pub mod format;
pub mod maildrop;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use tokio::sync::oneshot;

pub use format::{Envelope, Meta, RcptState, RcptStatus, Record};

/// The directories a message can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Queue,
    Hold,
    Corrupt,
}

impl Area {
    fn dir(self) -> &'static str {
        match self {
            Area::Queue => "queue",
            Area::Hold => "hold",
            Area::Corrupt => "corrupt",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Out of disk space or quota: the client should try again later (452).
    #[error("spool is out of disk space")]
    Full,
    #[error("no such message in the queue: {0}")]
    NotFound(String),
    #[error("queue file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("spool I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("invalid queue id {0:?}")]
    BadId(String),
}

impl SpoolError {
    fn io(path: &Path, source: io::Error) -> SpoolError {
        if matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ) {
            return SpoolError::Full;
        }
        SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A queue file that failed to decode, found by [`Spool::recover`].
#[derive(Debug)]
pub struct CorruptFile {
    pub id: String,
    pub reason: String,
}

/// What [`Spool::recover`] found.
#[derive(Debug, Default)]
pub struct Recovery {
    pub queued: Vec<Meta>,
    pub held: Vec<Meta>,
    pub corrupt: Vec<CorruptFile>,
    pub discarded_tmp: usize,
    pub removed_done: usize,
}

/// Handle to the spool directory; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Group commit of `queue/` directory fsyncs (durability rule 1).
    dir_sync: mpsc::Sender<oneshot::Sender<Result<(), String>>>,
}

impl Spool {
    /// Opens (creating if needed) the spool at `root`. Refuses a spool that
    /// other users may write to.
    pub fn open(root: &Path) -> Result<Spool, SpoolError> {
        create_private_dir(root)?;
        let meta = fs::metadata(root).map_err(|e| SpoolError::io(root, e))?;
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(SpoolError::Io {
                path: root.to_path_buf(),
                source: io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "spool directory is writable by other users; run `chmod 700` on it",
                ),
            });
        }
        for sub in ["tmp", "queue", "hold", "corrupt"] {
            create_private_dir(&root.join(sub))?;
        }
        let queue_dir = root.join("queue");
        let dir = File::open(&queue_dir).map_err(|e| SpoolError::io(&queue_dir, e))?;
        let (tx, rx) = mpsc::channel::<oneshot::Sender<Result<(), String>>>();
        std::thread::Builder::new()
            .name("spool-dirsync".into())
            .spawn(move || dir_sync_loop(dir, rx))
            .map_err(|e| SpoolError::io(&queue_dir, e))?;
        Ok(Spool {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                dir_sync: tx,
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn path(&self, area: Area, id: &str) -> Result<PathBuf, SpoolError> {
        check_id(id)?;
        Ok(self.inner.root.join(area.dir()).join(id))
    }

    /// Free bytes available to us on the spool's file system.
    pub fn free_space(&self) -> io::Result<u64> {
        let st = rustix::fs::statvfs(&self.inner.root)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Durably queues a message (durability rule 1) and returns its id.
    /// When this returns `Ok`, the message survives a crash.
    pub async fn commit(
        &self,
        id: String,
        env: Envelope,
        message: Vec<u8>,
        arrival_ms: u64,
    ) -> Result<String, SpoolError> {
        check_id(&id)?;
        let this = self.clone();
        let id = tokio::task::spawn_blocking(move || {
            this.write_and_rename(id, &env, &message, arrival_ms)
        })
        .await
        .map_err(|e| SpoolError::io(self.root(), io::Error::other(e)))??;
        self.sync_queue_dir().await?;
        Ok(id)
    }

    /// A fresh queue id: a ULID, so ids sort by arrival time.
    pub fn new_id() -> String {
        ulid::Ulid::generate().to_string()
    }

    /// [`Spool::commit`] for callers without a runtime (the sendmail
    /// command): same rules, the directory is fsynced directly.
    pub fn commit_blocking(
        &self,
        id: String,
        env: &Envelope,
        message: &[u8],
        arrival_ms: u64,
    ) -> Result<String, SpoolError> {
        check_id(&id)?;
        let id = self.write_and_rename(id, env, message, arrival_ms)?;
        let dir = self.inner.root.join("queue");
        fsync_dir(&dir)?;
        Ok(id)
    }

    fn write_and_rename(
        &self,
        id: String,
        env: &Envelope,
        message: &[u8],
        arrival_ms: u64,
    ) -> Result<String, SpoolError> {
        let tmp = self.inner.root.join("tmp").join(&id);
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // Recovery in a starting daemon must not delete a file that a
            // live sendmail process is still writing.
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
            let header = format::encode_header(&id, arrival_ms, env, message.len() as u64);
            file.write_all(&header)?;
            file.write_all(message)?;
            file.write_all(format::END)?;
            file.sync_data()?;
            fs::rename(&tmp, self.inner.root.join("queue").join(&id))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(SpoolError::io(&tmp, e));
        }
        Ok(id)
    }

    async fn sync_queue_dir(&self) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        let dir = self.inner.root.join("queue");
        let gone = || SpoolError::io(&dir, io::Error::other("directory sync thread stopped"));
        self.inner.dir_sync.send(tx).map_err(|_| gone())?;
        rx.await
            .map_err(|_| gone())?
            .map_err(|e| SpoolError::io(&dir, io::Error::other(e)))
    }

    /// Reads a queued message's metadata and status records, not its
    /// content (two reads: the header, then the tail after the body).
    pub fn read_meta(&self, area: Area, id: &str) -> Result<Meta, SpoolError> {
        let path = self.path(area, id)?;
        let mut file = open_existing(&path, id)?;
        read_meta_from(&mut file, &path)
    }

    /// Reads a message for delivery: metadata and content.
    pub fn load(&self, id: &str) -> Result<(Meta, Vec<u8>), SpoolError> {
        let path = self.path(Area::Queue, id)?;
        let mut file = open_existing(&path, id)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(|e| SpoolError::io(&path, e))?;
        let (meta, body) = format::decode(&buf).map_err(|e| SpoolError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let body = body.to_vec();
        Ok((meta, body))
    }

    /// Appends status records; with `durable` they are fsynced before this
    /// returns (durability rules 2 and 3).
    pub fn append(&self, id: &str, records: &[Record], durable: bool) -> Result<(), SpoolError> {
        let path = self.path(Area::Queue, id)?;
        let mut buf = Vec::new();
        for r in records {
            buf.extend_from_slice(&format::encode_record(r));
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| not_found_or(e, &path, id))?;
        file.write_all(&buf).map_err(|e| SpoolError::io(&path, e))?;
        if durable {
            file.sync_data().map_err(|e| SpoolError::io(&path, e))?;
        }
        Ok(())
    }

    /// Removes a finished or deleted message (durability rule 4).
    pub fn remove(&self, area: Area, id: &str) -> Result<(), SpoolError> {
        let path = self.path(area, id)?;
        fs::remove_file(&path).map_err(|e| not_found_or(e, &path, id))
    }

    /// Moves a message between areas (durability rule 5).
    pub fn move_to(&self, id: &str, from: Area, to: Area) -> Result<(), SpoolError> {
        let src = self.path(from, id)?;
        let dst = self.path(to, id)?;
        fs::rename(&src, &dst).map_err(|e| not_found_or(e, &src, id))?;
        fsync_dir(&self.inner.root.join(to.dir()))?;
        fsync_dir(&self.inner.root.join(from.dir()))
    }

    /// Ids of the messages in an area, oldest first (ULIDs sort by time).
    pub fn list(&self, area: Area) -> Result<Vec<String>, SpoolError> {
        let dir = self.inner.root.join(area.dir());
        let mut ids: Vec<String> = fs::read_dir(&dir)
            .map_err(|e| SpoolError::io(&dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_id(n).is_ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Start-up recovery; see the module documentation.
    pub fn recover(&self) -> Result<Recovery, SpoolError> {
        let mut rec = Recovery::default();
        let tmp = self.inner.root.join("tmp");
        for entry in fs::read_dir(&tmp)
            .map_err(|e| SpoolError::io(&tmp, e))?
            .flatten()
        {
            let path = entry.path();
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .is_ok()
            {
                let _ = fs::remove_file(&path);
                rec.discarded_tmp += 1;
            }
        }
        for area in [Area::Queue, Area::Hold] {
            for id in self.list(area)? {
                match self.read_meta(area, &id) {
                    Ok(meta) if meta.is_done() => {
                        self.remove(area, &id)?;
                        rec.removed_done += 1;
                    }
                    Ok(meta) if area == Area::Queue => rec.queued.push(meta),
                    Ok(meta) => rec.held.push(meta),
                    Err(SpoolError::Corrupt { reason, .. }) => {
                        self.move_to(&id, area, Area::Corrupt)?;
                        rec.corrupt.push(CorruptFile { id, reason });
                    }
                    Err(SpoolError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(rec)
    }
}

fn check_id(id: &str) -> Result<(), SpoolError> {
    if id.len() == 26 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(SpoolError::BadId(id.chars().take(64).collect()))
    }
}

fn not_found_or(e: io::Error, path: &Path, id: &str) -> SpoolError {
    if e.kind() == io::ErrorKind::NotFound {
        SpoolError::NotFound(id.to_string())
    } else {
        SpoolError::io(path, e)
    }
}

fn open_existing(path: &Path, id: &str) -> Result<File, SpoolError> {
    File::open(path).map_err(|e| not_found_or(e, path, id))
}

fn read_meta_from(file: &mut File, path: &Path) -> Result<Meta, SpoolError> {
    let corrupt = |reason: String| SpoolError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let io_err = |e| SpoolError::io(path, e);
    let len = file.metadata().map_err(io_err)?.len();
    let mut head = vec![0u8; 4096];
    let mut filled = 0;
    let mut meta = loop {
        let n = file.read(&mut head[filled..]).map_err(io_err)?;
        filled += n;
        if let Some(meta) =
            format::decode_header(&head[..filled]).map_err(|e| corrupt(e.to_string()))?
        {
            break meta;
        }
        if n == 0 {
            return Err(corrupt(format::FormatError::TruncatedHeader.to_string()));
        }
        if filled == head.len() {
            if head.len() >= 16 << 20 {
                return Err(corrupt("header larger than 16 MiB".into()));
            }
            head.resize(head.len() * 2, 0);
        }
    };
    let body_end = meta.body_offset.saturating_add(meta.size);
    if body_end > len {
        return Err(corrupt(
            format::FormatError::TruncatedBody {
                expected: meta.size,
                actual: len.saturating_sub(meta.body_offset),
            }
            .to_string(),
        ));
    }
    file.seek(SeekFrom::Start(body_end)).map_err(io_err)?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(io_err)?;
    format::apply_tail(&mut meta, &tail).map_err(|e| corrupt(e.to_string()))?;
    Ok(meta)
}

fn create_private_dir(path: &Path) -> Result<(), SpoolError> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(SpoolError::io(path, e)),
    }
}

fn fsync_dir(path: &Path) -> Result<(), SpoolError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| SpoolError::io(path, e))
}

/// One thread fsyncs the queue directory for everyone who asked before it
/// started: renames that happened before the fsync are covered by it.
fn dir_sync_loop(dir: File, rx: mpsc::Receiver<oneshot::Sender<Result<(), String>>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let result = dir.sync_all().map_err(|e| e.to_string());
        for w in waiting {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Envelope {
        Envelope {
            sender: "a@example.com".into(),
            recipients: vec!["b@example.net".into(), "c@example.net".into()],
            ..Envelope::default()
        }
    }

    #[tokio::test]
    async fn commit_read_append_recover() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = spool
            .commit(
                Spool::new_id(),
                env(),
                b"Subject: x\r\n\r\nhi\r\n".to_vec(),
                42,
            )
            .await
            .unwrap();
        let meta = spool.read_meta(Area::Queue, &id).unwrap();
        assert_eq!(meta.arrival_ms, 42);
        assert_eq!(
            fs::metadata(spool.path(Area::Queue, &id).unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );

        spool
            .append(
                &id,
                &[Record::Delivered {
                    idx: 0,
                    at_ms: 1,
                    reply: "250 ok".into(),
                }],
                true,
            )
            .unwrap();
        let (meta, body) = spool.load(&id).unwrap();
        assert_eq!(body, b"Subject: x\r\n\r\nhi\r\n");
        assert_eq!(meta.pending().count(), 1);

        fs::write(
            dir.path().join("tmp").join("01AAAAAAAAAAAAAAAAAAAAAAAA"),
            b"half",
        )
        .unwrap();
        fs::write(
            dir.path().join("queue").join("01BBBBBBBBBBBBBBBBBBBBBBBB"),
            b"garbage",
        )
        .unwrap();
        let rec = spool.recover().unwrap();
        assert_eq!(rec.queued.len(), 1);
        assert_eq!(rec.discarded_tmp, 1);
        assert_eq!(rec.corrupt.len(), 1);
        assert!(
            dir.path()
                .join("corrupt")
                .join("01BBBBBBBBBBBBBBBBBBBBBBBB")
                .exists()
        );

        spool
            .append(
                &id,
                &[Record::Failed {
                    idx: 1,
                    at_ms: 1,
                    reply: "550 no".into(),
                }],
                true,
            )
            .unwrap();
        let rec = spool.recover().unwrap();
        assert_eq!((rec.queued.len(), rec.removed_done), (0, 1));
    }

    #[test]
    fn world_writable_spool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(Spool::open(dir.path()).is_err());
    }
}
