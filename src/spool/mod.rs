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
//!   slots/<NAME>          the daemon's reusable queue files (see below)
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
//! # Slots: reused queue files
//! Creating a file per message costs the file system an inode allocation
//! and two directory updates that must reach the disk before `250`; that
//! was most of the time an accept took. So the daemon keeps its queue files
//! and reuses them: each has a permanent name `slots/<NAME>`, and while it
//! holds a message it has a second name (a hard link) `queue/<ID>`,
//! `hold/<ID>` or `corrupt/<ID>`. Overwriting a file whose blocks already
//! exist and `fdatasync`ing it writes only the data: one disk write per
//! accept, and no directory fsync. The slot name is durable before the
//! file is first used, so the message is safe once its data is; the
//! `queue/<ID>` link is made at once but needs no fsync, because recovery
//! re-links a message found in a slot without one (and renames a stale
//! name that a power loss left on it). A free slot starts with
//! a NUL byte. At most 1024 free slots are kept (others are deleted), and
//! only files up to 64 KiB are reused. The `sendmail` command and queue
//! tools never take slots; they write new files (rule 1b).
//!
//! # Queue file format (version 1)
//! ```text
//! relayq-queue 1\n
//! id <ID>\n                 ULID: time-ordered, 26 characters
//! slot <NAME>\n             only in slot files: the permanent name
//! submitter <uid>\n         only in files the `sendmail` command wrote into
//!                           queue/ itself (rule 1b): who ran it
//! arrival <unix ms>\n
//! sender <address>\n        empty for the null sender <>
//! flags <smtputf8,8bitmime | ->\n
//! rcpt <address>\n          one per recipient; its index is its order
//! dsn-ret <FULL|HDRS>\n     optional: RFC 3461 RET
//! dsn-envid <xtext>\n       optional: RFC 3461 ENVID, xtext-encoded
//! dsn-rcpt <idx> <notify> <orcpt>\n
//!                           optional, per recipient: NOTIFY (`NEVER` or a
//!                           list of SUCCESS,FAILURE,DELAY; `-` if not
//!                           given) and ORCPT's address as xtext (`-`)
//! size <n>\n
//! \n
//! <n bytes: the message, CRLF line ends, headers we added included>
//! end <crc>\n               the end marker; <crc> is the CRC-32 (8 hex
//!                           digits) of every byte before this line. Files
//!                           from the maildrop or older versions have
//!                           `end\n` without it.
//! <status records, appended later, one per line:>
//! delivered <idx> <unix ms> <upstream reply>\n
//! failed <idx> <unix ms> <upstream reply or reason>\n
//! deferred <idx> <unix ms> <reason>\n
//! attempt <count> <next attempt unix ms>\n
//! warned <unix ms>\n        a delay notice (NOTIFY=DELAY) was queued
//!                           (synced: rule 2)
//! accepted <unix ms>\n      the daemon logged the accepted line of a file
//!                           with `submitter` (written without fsync, like
//!                           rule 3: losing it logs the line once more)
//! <NUL bytes up to the end of the file: a reused file is zero-filled>
//! ```
//! The `dsn-*` lines (added for RFC 3461 DSN) are written only for a
//! message whose sender gave DSN parameters, so every other file is
//! byte for byte what older versions wrote, and a file without them (any
//! older file) reads as "no DSN parameters": a newer binary reads every
//! older queue file. An older binary refuses a file with `dsn-*` lines or
//! a `warned` record (to `corrupt/`), so downgrade only with an empty
//! queue, or after such messages are delivered.
//! `flags smtputf8` means the sender asked for SMTPUTF8 (or, for local
//! mail, that its envelope or header holds UTF-8): the transport requires
//! it of the upstream only when an address or header really is UTF-8.
//!
//! Addresses and replies never contain CR, LF or NUL (they are replaced by
//! spaces before they are written). A record is written where the records
//! end (the first NUL, or the end of the file).
//!
//! # Durability rules (every write follows them)
//! Two kinds of loss are planned for. A killed process (`kill -9`, a
//! panic) loses nothing the kernel was given: every write and directory
//! change it made stays. A power loss (or a kernel crash) loses every write
//! not yet synced, and any subset of the directory changes (link, unlink,
//! rename, create) not yet synced: the file system may have committed some
//! of them and not others, in any combination. So what recovery trusts is
//! the content of durable files (the id and end checksum inside them),
//! never a name alone. All writes go through `fsop`, where the crash-state
//! test (`crash`) records them.
//! 1. **Accept** (the daemon): take a free slot, or create a new one with
//!    `O_EXCL` and mode 0600 in `slots/`. Write the whole file (header,
//!    content, end marker, zeros up to the old length) at offset 0 and
//!    `fdatasync` it, and hard-link it as `queue/<ID>` (no fsync: see
//!    recovery). A new slot's directory entry is then made durable by an
//!    fsync of `slots/` (group commit: one fsync covers every new slot
//!    created before it started). Only after that may a client be told
//!    `250`. (Should we crash before the `250`, the message may still be
//!    delivered: at least once, as with every MTA.) After a power loss the
//!    message is in its slot, whole; its `queue/<ID>` name may be missing,
//!    and an older name of the slot (`queue/<OLD>` of the message it held
//!    before, whose unlink was lost) may still be there: recovery puts
//!    both right.
//!    1b. **Accept** (the `sendmail` command, or without slots): create
//!    `tmp/<ID>` with `O_EXCL` and mode 0600, hold an exclusive `flock` on
//!    it while writing, write it whole, `fdatasync` it, `rename` it to
//!    `queue/<ID>`, then `fsync` the `queue/` directory (group commit in
//!    the daemon).
//! 2. **Delivered / failed**: while other recipients of the message are
//!    still pending, write the record and `fdatasync` before the scheduler
//!    forgets the recipient. When the attempt leaves no recipient pending,
//!    the message is removed instead (rule 4): writing records only to
//!    delete them would cost an fsync per message. A bounce is committed
//!    (rule 1) before the `failed` records, or the removal, that it
//!    reports; a delay notice before its `warned` record, which is synced
//!    too (lost, the next attempt would send the sender a second notice).
//!    A crash between the upstream's `250` and our fsync can make us send
//!    once more: delivery is at least once, never at most once.
//! 3. **Deferred / attempt / accepted**: written without fsync. Losing
//!    them only makes a retry come early, or an accepted line be logged
//!    twice, after a crash.
//! 4. **Done** (or deleted): overwrite the first byte of the file with NUL
//!    (the done mark), then unlink its `queue/` (or `hold/`) name, without
//!    fsync; a slot then goes back to the free list. The NUL comes first so
//!    that a deleted message cannot come back from its slot, whichever of
//!    its names survive a power loss. The mark is made durable by a group
//!    commit (`done`): one thread `fdatasync`s the marks written in the
//!    last `queue.done_sync_window` (default 100 ms) together, or sooner
//!    when 256 are waiting; a slot taken for a new message before that
//!    needs no sync of its own (the accept's `fdatasync` wrote over the
//!    mark). So a `kill -9` sends nothing again, and a power loss sends
//!    again at most the messages finished in the last window before it
//!    (plus those whose batch sync was running). A window of `0s` syncs
//!    each mark before the worker moves on. A delete is not answered
//!    before its marks are durable (the queue tool said "deleted": the
//!    message must not come back and be sent). A file whose records say
//!    every recipient is done is removed by recovery.
//! 5. **Hold / release / corrupt**: a `rename` between directories followed
//!    by an fsync of both. The slot name stays. A power loss between the
//!    two fsyncs can leave both names; recovery keeps the one in `hold/`.
//! 6. **`limits.json`** (not a queue file): replaced whole, by a temp file
//!    `fdatasync`ed, renamed over it, then the root fsynced
//!    ([`replace_file`]): whole, and at most a save old, after any loss.
//!
//! # Recovery (at start)
//! A file in `tmp/` is an accept that never finished, so its client never
//! got `250`: it is deleted, unless another process (the `sendmail`
//! command) still holds its lock. Then every name in `queue/` and `hold/`
//! is judged by its file's content (a slot's file is read whole and its
//! checksum checked):
//! - the file starts with NUL (a removal, or a free slot): the name goes;
//! - it holds the message the name says, complete: queued (or held), or
//!   removed if its records say every recipient is done;
//! - it holds another message, complete (a stale name: the slot was reused
//!   and the power loss kept the old name): the name is renamed to
//!   `queue/<that id>`, or dropped if that name exists; the message is
//!   queued once, under its own id;
//! - it fails its checksum and the header does not name this message: a
//!   torn write of an accept never acknowledged, over a finished message
//!   whose name survived; the name goes and the slot is freed below;
//! - anything else that does not decode goes to `corrupt/` with an error
//!   in the log (a file acknowledged is never torn: it was synced whole).
//!
//! Then each slot with no other name is read whole: if it holds a complete
//! message (its checksum matches) that is not done, its `queue/<ID>` link
//! was lost and is made again (and fsynced); otherwise it is free (a torn
//! write of an accept that was never acknowledged, or a finished message).
//! Each step is safe to repeat, so a second loss during recovery is
//! recovered from the same way. The queue tools, which change the spool
//! only while the daemon is down, put the names right first
//! ([`Spool::reconcile_names`]), and `queue show` finds a message by the id
//! inside its file ([`Spool::find`]).
//! Recovery runs while the daemon already accepts mail. It skips the slots
//! this run made (their names start with a prefix chosen at start), and a
//! delivery that frees an older slot before recovery reaches it leaves a
//! note so that recovery skips it: no slot is handed out twice.
//!
//! # Security
//! Queue files hold other people's mail: the directories are 0700 and the
//! files 0600, and the daemon refuses a spool that others may write.
//! Once the daemon has prepared the maildrop the root is 0711, so other
//! users can reach `maildrop/` and `pickup.sock` but list nothing.
//! Queue file contents are parsed as untrusted input (see `format`); a slot
//! name read from a file is used only if it is well formed and names the
//! same inode.

#[cfg(test)]
mod crash;
mod done;
pub mod format;
mod fsop;
pub mod maildrop;
mod slots;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;

use done::{Cover, DoneMarks};
pub use format::{
    Dsn, Envelope, Meta, Notify, Origin, RcptDsn, RcptState, RcptStatus, Record, Ret,
};
use slots::Slots;

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
    /// Messages found in a slot whose `queue/` link a crash had lost
    /// (also in `queued`).
    pub relinked: usize,
    /// Names a power loss left on a file that now holds another message
    /// (its slot was reused): renamed to that message's id, or dropped.
    pub stale_names: usize,
}

/// A message found by [`Spool::find`].
#[derive(Debug)]
pub struct Found {
    pub area: Area,
    /// The name its file has in `area`: its id, unless a power loss left
    /// a stale one that recovery has not yet put right.
    pub name: String,
    pub meta: Meta,
}

/// Handle to the spool directory; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Group commit of `queue/` directory fsyncs (durability rule 1b).
    queue_sync: DirSync,
    /// The daemon's reusable files; unset in the command-line tools.
    slots: OnceLock<Slots>,
    /// The daemon's group commit of done marks (durability rule 4);
    /// unset, each mark is synced at once.
    done: OnceLock<DoneMarks>,
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
        for sub in ["tmp", "queue", "hold", "corrupt", "slots"] {
            create_private_dir(&root.join(sub))?;
        }
        Ok(Spool {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                queue_sync: DirSync::start(&root.join("queue"))?,
                slots: OnceLock::new(),
                done: OnceLock::new(),
            }),
        })
    }

    /// Makes accepts reuse queue files (the daemon only, holding the spool
    /// lock, before it accepts mail and before [`Spool::recover`]), and
    /// done marks durable at most `done_window` after they are written
    /// (durability rule 4; zero: at once).
    pub fn enable_slots(&self, done_window: Duration) -> Result<(), SpoolError> {
        if self.inner.slots.get().is_none() {
            let slots = Slots::open(&self.inner.root.join("slots"))?;
            let _ = self.inner.slots.set(slots);
        }
        if self.inner.done.get().is_none() {
            let done = DoneMarks::start(done_window).map_err(|e| SpoolError::io(self.root(), e))?;
            let _ = self.inner.done.set(done);
        }
        Ok(())
    }

    /// Waits until the done mark of every message removed so far is
    /// durable (at shutdown, and for tests).
    pub fn flush_done_marks(&self) {
        if let Some(done) = self.inner.done.get() {
            done.flush();
        }
    }

    fn mark_done(&self, file: File, cover: Cover) {
        match self.inner.done.get() {
            Some(done) => done.add(file, cover),
            None => DoneMarks::immediate().add(file, cover),
        }
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
        let Some(slots) = self.inner.slots.get() else {
            let id = tokio::task::spawn_blocking(move || {
                this.write_and_rename(id, &env, &message, arrival_ms, None)
            })
            .await
            .map_err(|e| SpoolError::io(self.root(), io::Error::other(e)))??;
            self.inner.queue_sync.sync().await?;
            return Ok(id);
        };
        let free = slots.take();
        let owned = id.clone();
        let created = tokio::task::spawn_blocking(move || {
            this.write_slot(&owned, &env, &message, arrival_ms, free)
        })
        .await
        .map_err(|e| SpoolError::io(self.root(), io::Error::other(e)))??;
        if created {
            slots.dir_sync.sync().await?;
        }
        Ok(id)
    }

    /// A fresh queue id: a ULID, so ids sort by arrival time.
    pub fn new_id() -> String {
        ulid::Ulid::generate().to_string()
    }

    /// [`Spool::commit`] for the sendmail command run by root or the
    /// spool's owner (`submitter`, its uid): rule 1b, the directory is
    /// fsynced directly. The file names its submitter, so that the daemon
    /// logs its accepted line when it first sees it (see `pickup`).
    pub fn commit_blocking(
        &self,
        id: String,
        env: &Envelope,
        message: &[u8],
        arrival_ms: u64,
        submitter: u32,
    ) -> Result<String, SpoolError> {
        check_id(&id)?;
        let id = self.write_and_rename(id, env, message, arrival_ms, Some(submitter))?;
        let dir = self.inner.root.join("queue");
        fsync_dir(&dir)?;
        Ok(id)
    }

    /// Rule 1: writes the message into a free slot (or a new one) and links
    /// it into `queue/`. Returns whether the slot is new, in which case
    /// `slots/` must be fsynced before the message counts as accepted.
    fn write_slot(
        &self,
        id: &str,
        env: &Envelope,
        message: &[u8],
        arrival_ms: u64,
        free: Option<(String, Cover)>,
    ) -> Result<bool, SpoolError> {
        let gone = || SpoolError::io(self.root(), io::Error::other("slots are not enabled"));
        let slots = self.inner.slots.get().ok_or_else(gone)?;
        let dir = slots.dir();
        let reused = free.and_then(|(name, cover)| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(&name))
                .ok()?;
            Some((name, file, cover))
        });
        let (name, file, cover, created) = match reused {
            Some((name, file, cover)) => (name, file, Some(cover), false),
            None => {
                let name = slots.new_name();
                let path = dir.join(&name);
                let file = fsop::create_new(&path).map_err(|e| SpoolError::io(&path, e))?;
                (name, file, None, true)
            }
        };
        let path = dir.join(&name);
        let result = (|| {
            let old_len = file.metadata()?.len();
            let (header, mut end) =
                format::encode_around(id, arrival_ms, env, message, Origin::slot(Some(&name)));
            let body_at = header.len() as u64;
            let end_at = body_at + message.len() as u64;
            // Zeros over whatever an older message left, so that no stale
            // record can be read as this message's.
            let used = end_at + end.len() as u64;
            let len = used.div_ceil(slots::BLOCK as u64) * slots::BLOCK as u64;
            end.resize(end.len() + (len.max(old_len) - used) as usize, 0);
            if message.len() < 64 * 1024 {
                // One write for the common small message.
                let mut all = header;
                all.extend_from_slice(message);
                all.extend_from_slice(&end);
                fsop::write_at(&file, &all, 0)?;
            } else {
                fsop::write_at(&file, &header, 0)?;
                fsop::write_at(&file, message, body_at)?;
                fsop::write_at(&file, &end, end_at)?;
            }
            fsop::sync_data(&file)?;
            // The message is durably over the last one's done mark.
            if let Some(cover) = &cover {
                cover.set();
            }
            fsop::hard_link(&path, &self.inner.root.join("queue").join(id))
        })();
        if let Err(e) = result {
            // Never acknowledged: the slot must not pass for a message.
            let _ = fsop::write_at(&file, &[0], 0);
            let _ = fsop::remove_file(&path);
            return Err(SpoolError::io(&path, e));
        }
        Ok(created)
    }

    fn write_and_rename(
        &self,
        id: String,
        env: &Envelope,
        message: &[u8],
        arrival_ms: u64,
        submitter: Option<u32>,
    ) -> Result<String, SpoolError> {
        let tmp = self.inner.root.join("tmp").join(&id);
        let result = (|| {
            let file = fsop::create_new(&tmp)?;
            // Recovery in a starting daemon must not delete a file that a
            // live sendmail process is still writing.
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
            let origin = Origin {
                slot: None,
                submitter,
            };
            let (header, end) = format::encode_around(&id, arrival_ms, env, message, origin);
            let body_at = header.len() as u64;
            fsop::write_at(&file, &header, 0)?;
            fsop::write_at(&file, message, body_at)?;
            fsop::write_at(&file, &end, body_at + message.len() as u64)?;
            fsop::sync_data(&file)?;
            fsop::rename(&tmp, &self.inner.root.join("queue").join(&id))
        })();
        if let Err(e) = result {
            let _ = fsop::remove_file(&tmp);
            return Err(SpoolError::io(&tmp, e));
        }
        Ok(id)
    }

    /// Reads a queued message's metadata and status records, not its
    /// content (two reads: the header, then the tail after the body).
    pub fn read_meta(&self, area: Area, id: &str) -> Result<Meta, SpoolError> {
        let path = self.path(area, id)?;
        let mut file = open_existing(&path, id)?;
        Ok(read_meta_from(&mut file, &path)?.0)
    }

    /// Reads a message for delivery: metadata and content (checksum
    /// verified).
    pub fn load(&self, id: &str) -> Result<(Meta, Vec<u8>), SpoolError> {
        let path = self.path(Area::Queue, id)?;
        let mut file = open_existing(&path, id)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(|e| SpoolError::io(&path, e))?;
        let (meta, body) = format::decode(&buf).map_err(|e| format_err(&path, e))?;
        if meta.id != id {
            // Recovery renames such a name; one seen later is a bug, and
            // delivering the other message under this id would be worse.
            tracing::error!(
                target: "relayq::queue",
                "{id}: queue file {} holds message {} (a stale name); not delivered under this id",
                path.display(),
                meta.id
            );
            return Err(SpoolError::NotFound(id.to_string()));
        }
        let body = body.to_vec();
        Ok((meta, body))
    }

    /// Writes status records after the last one; with `durable` they are
    /// fsynced before this returns (durability rules 2 and 3).
    pub fn append(&self, id: &str, records: &[Record], durable: bool) -> Result<(), SpoolError> {
        self.append_in(Area::Queue, id, records, durable)
    }

    /// [`Spool::append`] to a message in `area`.
    pub fn append_in(
        &self,
        area: Area,
        id: &str,
        records: &[Record],
        durable: bool,
    ) -> Result<(), SpoolError> {
        let path = self.path(area, id)?;
        let mut buf = Vec::new();
        for r in records {
            buf.extend_from_slice(&format::encode_record(r));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| not_found_or(e, &path, id))?;
        let (_, ends) = read_meta_from(&mut file, &path)?;
        // Covers a record torn by a crash, which the reader ignores.
        let torn = usize::try_from(ends.used - ends.records).unwrap_or(0);
        if buf.len() < torn {
            buf.resize(torn, 0);
        }
        fsop::write_at(&file, &buf, ends.records).map_err(|e| SpoolError::io(&path, e))?;
        if durable {
            fsop::sync_data(&file).map_err(|e| SpoolError::io(&path, e))?;
        }
        Ok(())
    }

    /// Removes a finished or deleted message (durability rule 4).
    pub fn remove(&self, area: Area, id: &str) -> Result<(), SpoolError> {
        let path = self.path(area, id)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| not_found_or(e, &path, id))?;
        let st = file.metadata().map_err(|e| SpoolError::io(&path, e))?;
        let header = read_header(&mut file, &path).ok();
        if header.as_ref().is_some_and(|m| m.id != id) {
            // A stale name (see recovery): the file is another message's.
            return fsop::remove_file(&path).map_err(|e| not_found_or(e, &path, id));
        }
        // The NUL first: whichever name survives a power loss, the
        // message cannot come back from the file once the mark is durable.
        fsop::write_at(&file, &[0], 0).map_err(|e| SpoolError::io(&path, e))?;
        let slot = header.and_then(|m| m.slot).filter(|_| st.nlink() > 1);
        let cover = Cover::default();
        let mut state = self.inner.slots.get().map(|s| s.lock());
        match fsop::remove_file(&path) {
            // Recovery may have removed it first, having seen the NUL.
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(SpoolError::io(&path, e)),
        }
        if let (Some(state), Some(slots), Some(name)) =
            (state.as_mut(), self.inner.slots.get(), slot)
        {
            state.give_back(slots.dir(), &name, st.dev(), st.ino(), cover.clone());
        }
        drop(state);
        self.mark_done(file, cover);
        Ok(())
    }

    /// Moves a message between areas (durability rule 5).
    pub fn move_to(&self, id: &str, from: Area, to: Area) -> Result<(), SpoolError> {
        let src = self.path(from, id)?;
        let dst = self.path(to, id)?;
        let st = fs::symlink_metadata(&src).map_err(|e| not_found_or(e, &src, id))?;
        if self.same_file(&dst, &st) {
            // Under both names (a power loss between the two syncs of an
            // earlier move): rename(2) of a name onto another name of the
            // same file does nothing, so the old name goes instead.
            fsop::remove_file(&src).map_err(|e| not_found_or(e, &src, id))?;
        } else {
            fsop::rename(&src, &dst).map_err(|e| not_found_or(e, &src, id))?;
        }
        fsync_dir(&self.inner.root.join(to.dir()))?;
        fsync_dir(&self.inner.root.join(from.dir()))
    }

    /// Makes the names made and removed in `queue/` and `hold/` so far
    /// durable.
    pub fn sync_names(&self) -> Result<(), SpoolError> {
        fsync_dir(&self.inner.root.join(Area::Queue.dir()))?;
        fsync_dir(&self.inner.root.join(Area::Hold.dir()))
    }

    /// Finds message `id` in `queue/` or `hold/` by the id its file holds:
    /// under its own name, or (after a power loss the daemon has not yet
    /// recovered from) under a stale one. Returns where and its metadata.
    pub fn find(&self, id: &str) -> Result<Found, SpoolError> {
        check_id(id)?;
        // Hold first: a message under both names (a power loss between
        // the two syncs of a move) is on hold, as recovery keeps it.
        for area in [Area::Hold, Area::Queue] {
            match self.read_meta(area, id) {
                Ok(meta) if meta.id == id => {
                    return Ok(Found {
                        area,
                        name: id.to_string(),
                        meta,
                    });
                }
                Ok(_) | Err(SpoolError::NotFound(_) | SpoolError::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        for area in [Area::Queue, Area::Hold] {
            for name in self.list(area)? {
                if let Ok(meta) = self.read_meta(area, &name)
                    && meta.id == id
                {
                    return Ok(Found { area, name, meta });
                }
            }
        }
        Err(SpoolError::NotFound(id.to_string()))
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
        let rec = self.recover_all();
        if let Some(s) = self.inner.slots.get() {
            s.lock().recovered();
        }
        rec
    }

    /// Makes every name in `queue/` and `hold/` the id of the message its
    /// file holds (the first part of recovery), so that a message is found
    /// by its id. For the queue tools, which change the spool while the
    /// daemon is down (holding its lock), after a power loss the daemon
    /// has not recovered from yet.
    pub fn reconcile_names(&self) -> Result<Recovery, SpoolError> {
        let mut rec = Recovery::default();
        for area in [Area::Queue, Area::Hold] {
            for name in self.list(area)? {
                self.recover_name(area, &name, &mut rec)?;
            }
        }
        if rec.stale_names > 0 {
            self.sync_names()?;
        }
        Ok(rec)
    }

    fn recover_all(&self) -> Result<Recovery, SpoolError> {
        let tmp = self.inner.root.join("tmp");
        let mut discarded_tmp = 0;
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
                let _ = fsop::remove_file(&path);
                discarded_tmp += 1;
            }
        }
        let mut rec = self.reconcile_names()?;
        rec.discarded_tmp = discarded_tmp;
        // The messages found so far must reach the scheduler whatever
        // happens to one slot.
        if let Err(e) = self.recover_slots(&mut rec) {
            tracing::error!("recovery of queue file slots stopped early: {e}");
        }
        Ok(rec)
    }

    /// Judges one name in `queue/` or `hold/` by the content of its file,
    /// never by the name alone: a power loss can keep any subset of the
    /// unsynced links and unlinks, so a name may belong to a message long
    /// finished whose slot now holds another one.
    fn recover_name(&self, area: Area, name: &str, rec: &mut Recovery) -> Result<(), SpoolError> {
        let path = self.path(area, name)?;
        let mut file = match open_existing(&path, name) {
            Ok(f) => f,
            // Delivered or moved meanwhile (the daemon runs).
            Err(SpoolError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let st = file.metadata().map_err(|e| SpoolError::io(&path, e))?;
        // A slot's file can hold a write torn by a power loss (a new
        // message over a finished one): read it whole and check its sum.
        // Other files were synced whole before they got a name.
        let (verdict, header_id) = if st.nlink() > 1 {
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)
                .map_err(|e| SpoolError::io(&path, e))?;
            let header_id = format::decode_header(&buf).ok().flatten().map(|m| m.id);
            let verdict = format::decode(&buf)
                .map(|(meta, _)| meta)
                .map_err(|e| format_err(&path, e));
            (verdict, header_id)
        } else {
            let verdict = read_meta_from(&mut file, &path).map(|(meta, _)| meta);
            let header_id = verdict.as_ref().ok().map(|m| m.id.clone());
            (verdict, header_id)
        };
        match verdict {
            // A move to or from hold/ that a power loss caught between its
            // two directory syncs can leave both names: on hold it stays
            // (an operator can release it; mail meant to be held must not
            // go out).
            Ok(meta)
                if meta.id == name
                    && area == Area::Queue
                    && self.same_file(&self.path(Area::Hold, name)?, &st) =>
            {
                fsop::remove_file(&path).map_err(|e| SpoolError::io(&path, e))?;
                rec.stale_names += 1;
            }
            Ok(meta) if meta.id == name => {
                if meta.is_done() {
                    self.remove(area, name)?;
                    rec.removed_done += 1;
                } else if area == Area::Queue {
                    rec.queued.push(meta);
                } else {
                    rec.held.push(meta);
                }
            }
            Ok(meta) => self.recover_stale_name(area, name, &path, &st, meta, rec)?,
            // A removal a crash interrupted (rule 4), or a name left on a
            // free slot: the file holds no message.
            Err(SpoolError::NotFound(_)) => match fsop::remove_file(&path) {
                Ok(()) => rec.removed_done += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(SpoolError::io(&path, e)),
            },
            // A torn write over a finished message whose name survived:
            // an accept never acknowledged (what is acknowledged is
            // synced whole). The slot part of recovery frees the file.
            Err(SpoolError::Corrupt { .. })
                if st.nlink() > 1 && header_id.as_deref() != Some(name) =>
            {
                tracing::warn!(
                    target: "relayq::queue",
                    "{name}: stale name of a slot holding an unfinished write (never acknowledged); dropped"
                );
                match fsop::remove_file(&path) {
                    Ok(()) => rec.stale_names += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(SpoolError::io(&path, e)),
                }
            }
            Err(SpoolError::Corrupt { reason, .. }) => {
                self.move_to(name, area, Area::Corrupt)?;
                rec.corrupt.push(CorruptFile {
                    id: name.to_string(),
                    reason,
                });
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Whether `path` names the file `st` describes.
    fn same_file(&self, path: &Path, st: &fs::Metadata) -> bool {
        fs::symlink_metadata(path).is_ok_and(|m| m.dev() == st.dev() && m.ino() == st.ino())
    }

    /// `area/name` holds message `meta.id`, complete: the name is stale
    /// (its own message finished, and the slot was reused) or the file
    /// was named wrongly. The message gets its own name in `queue/`, the
    /// only place an accept puts it (a move to `hold/` is synced, so had
    /// it been held, `hold/<id>` would be there).
    fn recover_stale_name(
        &self,
        area: Area,
        name: &str,
        path: &Path,
        st: &fs::Metadata,
        meta: Meta,
        rec: &mut Recovery,
    ) -> Result<(), SpoolError> {
        let id = meta.id.clone();
        let own = [Area::Queue, Area::Hold, Area::Corrupt]
            .into_iter()
            .map(|a| self.path(a, &id))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .find_map(|p| fs::symlink_metadata(&p).ok().map(|m| (p, m)));
        match own {
            // Its own name is there too: this one is left over.
            Some((_, m)) if m.dev() == st.dev() && m.ino() == st.ino() => {
                fsop::remove_file(path).map_err(|e| SpoolError::io(path, e))?;
            }
            Some((other, _)) => {
                // Two files claim one id: not ours to choose.
                let reason = format!(
                    "named {name} but holds message {id}, which {} also holds",
                    other.display()
                );
                self.move_to(name, area, Area::Corrupt)?;
                rec.corrupt.push(CorruptFile {
                    id: name.to_string(),
                    reason,
                });
                return Ok(());
            }
            None if meta.is_done() => {
                fsop::remove_file(path).map_err(|e| SpoolError::io(path, e))?;
            }
            None => {
                let to = self.path(Area::Queue, &id)?;
                fsop::rename(path, &to).map_err(|e| SpoolError::io(path, e))?;
                rec.queued.push(meta);
            }
        }
        tracing::warn!(
            target: "relayq::queue",
            "{id}: found under the stale name {}/{name} (left by a power loss); renamed",
            area.dir()
        );
        rec.stale_names += 1;
        Ok(())
    }

    /// The slot part of recovery: re-links messages whose `queue/` link a
    /// crash lost, frees the rest of the slots with no other name.
    fn recover_slots(&self, rec: &mut Recovery) -> Result<(), SpoolError> {
        let dir = self.inner.root.join("slots");
        let slots = self.inner.slots.get();
        let queue = self.inner.root.join("queue");
        let before = rec.relinked;
        // Streamed, not collected: a big queue has a slot per message.
        let entries = fs::read_dir(&dir).map_err(|e| SpoolError::io(&dir, e))?;
        for name in entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
        {
            if check_id(&name).is_err() || slots.is_some_and(|s| s.is_ours(&name)) {
                continue;
            }
            let mut state = slots.map(|s| s.lock());
            if let Some(state) = state.as_mut()
                && !state.claim(&name)
            {
                continue;
            }
            let path = dir.join(&name);
            let Ok(st) = fs::symlink_metadata(&path) else {
                continue;
            };
            if !st.is_file() || st.nlink() > 1 {
                // In use: the message is in queue/, hold/ or corrupt/
                // under its id (names were reconciled first).
                continue;
            }
            let buf = fs::read(&path).map_err(|e| SpoolError::io(&path, e))?;
            match format::decode(&buf) {
                Ok((meta, _)) if meta.slot.as_deref() == Some(&name) && !meta.is_done() => {
                    let q = queue.join(&meta.id);
                    if check_id(&meta.id).is_err()
                        || q.exists()
                        || self.path(Area::Hold, &meta.id)?.exists()
                    {
                        // Not ours to decide: leave it for a human.
                        tracing::warn!(
                            "slot {} holds message {:?} that also exists elsewhere; left alone",
                            path.display(),
                            meta.id
                        );
                        continue;
                    }
                    fsop::hard_link(&path, &q).map_err(|e| SpoolError::io(&q, e))?;
                    rec.relinked += 1;
                    rec.queued.push(meta);
                }
                // A finished message, or a torn write never acknowledged.
                // Its NUL needs no sync: should it be lost, the next
                // recovery finds the same and frees the slot again.
                _ => {
                    if buf.first().is_some_and(|&b| b != 0) {
                        let file = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|e| SpoolError::io(&path, e))?;
                        fsop::write_at(&file, &[0], 0).map_err(|e| SpoolError::io(&path, e))?;
                    }
                    match state.as_mut() {
                        Some(state) => {
                            state.free_or_delete(&path, &name, st.len(), Cover::default())
                        }
                        None => {
                            let _ = fsop::remove_file(&path);
                        }
                    }
                }
            }
        }
        if rec.relinked > before {
            fsync_dir(&queue)?;
        }
        Ok(())
    }
}

#[cfg(test)]
impl Spool {
    fn free_slots(&self) -> usize {
        self.inner.slots.get().map_or(0, |s| {
            let mut n = 0;
            while s.take().is_some() {
                n += 1;
            }
            n
        })
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

/// Where a file's records end (new records go there) and where its used
/// part ends (the first NUL, or the end of the file).
struct Ends {
    records: u64,
    used: u64,
}

fn corrupt_err(path: &Path, reason: String) -> SpoolError {
    SpoolError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

/// A file starting with NUL is a message being (or not quite) removed:
/// for readers it is gone.
fn format_err(path: &Path, e: format::FormatError) -> SpoolError {
    match e {
        format::FormatError::Freed => SpoolError::NotFound(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        e => corrupt_err(path, e.to_string()),
    }
}

/// Reads and decodes the header at the start of `file`.
fn read_header(file: &mut File, path: &Path) -> Result<Meta, SpoolError> {
    let io_err = |e| SpoolError::io(path, e);
    let mut head = vec![0u8; 4096];
    let mut filled = 0;
    loop {
        let n = file.read(&mut head[filled..]).map_err(io_err)?;
        filled += n;
        if let Some(meta) =
            format::decode_header(&head[..filled]).map_err(|e| format_err(path, e))?
        {
            return Ok(meta);
        }
        if n == 0 {
            return Err(corrupt_err(
                path,
                format::FormatError::TruncatedHeader.to_string(),
            ));
        }
        if filled == head.len() {
            if head.len() >= 16 << 20 {
                return Err(corrupt_err(path, "header larger than 16 MiB".into()));
            }
            head.resize(head.len() * 2, 0);
        }
    }
}

fn read_meta_from(file: &mut File, path: &Path) -> Result<(Meta, Ends), SpoolError> {
    let corrupt = |reason: String| corrupt_err(path, reason);
    let io_err = |e| SpoolError::io(path, e);
    let len = file.metadata().map_err(io_err)?.len();
    let mut meta = read_header(file, path)?;
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
    let (_, rest) = format::split_end(&tail).map_err(|e| corrupt(e.to_string()))?;
    let start = body_end + (tail.len() - rest.len()) as u64;
    let used = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let ends = Ends {
        records: start + format::records_len(rest) as u64,
        used: start + used as u64,
    };
    Ok((meta, ends))
}

/// Replaces a small file of the spool that is not a queue file
/// (`limits.json`) with `content`, mode 0600: a temp file, `fdatasync`ed,
/// renamed over it, and the directory fsynced. A reader, or a restart
/// after a crash or a power loss, finds the old content or the new, whole
/// (unsynced, a power loss could keep the rename but not the data: an
/// empty file, and every count lost); the new one once this returns.
pub fn replace_file(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    match fsop::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file = fsop::create_new(&tmp)?;
    fsop::write_at(&file, content, 0)?;
    fsop::sync_data(&file)?;
    fsop::rename(&tmp, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| fsop::sync_dir(&d, dir))
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
        .and_then(|d| fsop::sync_dir(&d, path))
        .map_err(|e| SpoolError::io(path, e))
}

/// Group commit of one directory's fsyncs: one thread fsyncs it for
/// everyone who asked before the fsync started (entries made before the
/// fsync are covered by it).
struct DirSync {
    dir: PathBuf,
    requests: mpsc::Sender<oneshot::Sender<Result<(), String>>>,
}

impl DirSync {
    fn start(dir: &Path) -> Result<DirSync, SpoolError> {
        let handle = File::open(dir).map_err(|e| SpoolError::io(dir, e))?;
        let path = dir.to_path_buf();
        let (tx, rx) = mpsc::channel::<oneshot::Sender<Result<(), String>>>();
        std::thread::Builder::new()
            .name("spool-dirsync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let result = fsop::sync_dir(&handle, &path).map_err(|e| e.to_string());
                    for w in waiting {
                        let _ = w.send(result.clone());
                    }
                }
            })
            .map_err(|e| SpoolError::io(dir, e))?;
        Ok(DirSync {
            dir: dir.to_path_buf(),
            requests: tx,
        })
    }

    async fn sync(&self) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        let gone = || SpoolError::io(&self.dir, io::Error::other("directory sync thread stopped"));
        self.requests.send(tx).map_err(|_| gone())?;
        rx.await
            .map_err(|_| gone())?
            .map_err(|e| SpoolError::io(&self.dir, io::Error::other(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

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

    fn slot_files(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(root.join("slots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    async fn daemon_spool(root: &Path) -> Spool {
        let spool = Spool::open(root).unwrap();
        spool.enable_slots(Duration::from_millis(100)).unwrap();
        spool
    }

    #[tokio::test]
    async fn slots_are_reused_without_stale_records() {
        let dir = tempfile::tempdir().unwrap();
        let spool = daemon_spool(dir.path()).await;
        let long = vec![b'x'; 3000];
        let id = spool
            .commit(Spool::new_id(), env(), long.clone(), 1)
            .await
            .unwrap();
        let path = spool.path(Area::Queue, &id).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().nlink(), 2);
        let slots = slot_files(dir.path());
        assert_eq!(slots.len(), 1);
        assert_eq!(
            spool.read_meta(Area::Queue, &id).unwrap().slot.as_deref(),
            Some(slots[0].as_str())
        );
        let deferred = Record::Deferred {
            idx: 0,
            at_ms: 2,
            reason: "451 later".into(),
        };
        let delivered = Record::Delivered {
            idx: 1,
            at_ms: 3,
            reply: "250 ok".into(),
        };
        spool
            .append(&id, std::slice::from_ref(&deferred), false)
            .unwrap();
        spool.append(&id, &[delivered], true).unwrap();
        let (meta, body) = spool.load(&id).unwrap();
        assert_eq!(body, long);
        assert_eq!(meta.pending().count(), 1);
        spool.remove(Area::Queue, &id).unwrap();
        assert!(!path.exists());

        // The same file, a shorter message: nothing of the old one shows.
        let id2 = spool
            .commit(Spool::new_id(), env(), b"short\r\n".to_vec(), 4)
            .await
            .unwrap();
        assert_eq!(slot_files(dir.path()), slots);
        let (meta, body) = spool.load(&id2).unwrap();
        assert_eq!(body, b"short\r\n");
        assert_eq!(meta.pending().count(), 2);
        assert!(meta.recipients.iter().all(|r| r.last_reply.is_none()));
        spool.append(&id2, &[deferred], false).unwrap();
        let meta = spool.read_meta(Area::Queue, &id2).unwrap();
        assert_eq!(meta.recipients[0].last_reply.as_deref(), Some("451 later"));
        // A message that outgrows the file grows it.
        spool.remove(Area::Queue, &id2).unwrap();
        let big = vec![b'y'; 10_000];
        let id3 = spool
            .commit(Spool::new_id(), env(), big.clone(), 5)
            .await
            .unwrap();
        assert_eq!(slot_files(dir.path()), slots);
        assert_eq!(spool.load(&id3).unwrap().1, big);
        // A large message is written in pieces; its file is not kept.
        spool.remove(Area::Queue, &id3).unwrap();
        let huge: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let id4 = spool
            .commit(Spool::new_id(), env(), huge.clone(), 6)
            .await
            .unwrap();
        assert_eq!(spool.load(&id4).unwrap().1, huge);
        spool.remove(Area::Queue, &id4).unwrap();
        assert!(slot_files(dir.path()).is_empty());
        assert_eq!(spool.free_slots(), 0);
    }

    #[tokio::test]
    async fn a_record_torn_by_a_crash_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let spool = daemon_spool(dir.path()).await;
        let id = spool
            .commit(Spool::new_id(), env(), b"hi\r\n".to_vec(), 1)
            .await
            .unwrap();
        let path = spool.path(Area::Queue, &id).unwrap();
        let (_, ends) = read_meta_from(&mut File::open(&path).unwrap(), &path).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"delivered 0 1 250 torn, no newl", ends.records)
            .unwrap();
        assert_eq!(
            spool.read_meta(Area::Queue, &id).unwrap().pending().count(),
            2
        );
        spool
            .append(
                &id,
                &[Record::Failed {
                    idx: 1,
                    at_ms: 2,
                    reply: "550".into(),
                }],
                true,
            )
            .unwrap();
        let (meta, _) = spool.load(&id).unwrap();
        assert_eq!(meta.recipients[0].state, RcptState::Pending);
        assert_eq!(meta.recipients[1].state, RcptState::Failed);
    }

    #[tokio::test]
    async fn recovery_restores_lost_links_and_never_resurrects_removed_mail() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (lost, removed, done, kept) = {
            let spool = daemon_spool(root).await;
            let mut ids = Vec::new();
            for i in 0..4u8 {
                ids.push(
                    spool
                        .commit(Spool::new_id(), env(), vec![b'a' + i; 100], 1)
                        .await
                        .unwrap(),
                );
            }
            // A crash lost this message's queue/ link (never written back).
            fs::remove_file(spool.path(Area::Queue, &ids[0]).unwrap()).unwrap();
            // Deleted by an operator: must not come back from its slot.
            spool.remove(Area::Queue, &ids[1]).unwrap();
            // Removal interrupted after the NUL: a relic in queue/.
            let p = spool.path(Area::Queue, &ids[2]).unwrap();
            OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .write_all_at(&[0], 0)
                .unwrap();
            (
                ids[0].clone(),
                ids[1].clone(),
                ids[2].clone(),
                ids[3].clone(),
            )
        };
        // A torn accept: a slot whose message fails its checksum.
        let torn_name = Spool::new_id();
        let torn_slot = root.join("slots").join(&torn_name);
        let torn_id = Spool::new_id();
        let mut torn = format::encode_message(&torn_id, 1, &env(), b"whole", Some(&torn_name));
        let n = torn.len();
        // The last body byte, just before "end <crc>\n".
        torn[n - 14] ^= 0xff;
        fs::write(&torn_slot, &torn).unwrap();

        let spool = daemon_spool(root).await;
        let rec = spool.recover().unwrap();
        let mut queued: Vec<String> = rec.queued.iter().map(|m| m.id.clone()).collect();
        queued.sort();
        let mut want = vec![lost.clone(), kept.clone()];
        want.sort();
        assert_eq!(queued, want);
        assert_eq!(rec.relinked, 1);
        assert_eq!(rec.removed_done, 1);
        assert_eq!(spool.load(&lost).unwrap().1, vec![b'a'; 100]);
        assert_eq!(spool.list(Area::Queue).unwrap(), {
            let mut v = vec![lost, kept];
            v.sort();
            v
        });
        for id in [&removed, &done] {
            assert!(!spool.path(Area::Queue, id).unwrap().exists());
        }
        assert_eq!(rec.corrupt.len(), 0);
        // removed, done and the torn one are free: 3 slots to reuse.
        assert_eq!(spool.free_slots(), 3);
        assert_eq!(slot_files(root).len(), 5);
    }

    #[tokio::test]
    async fn a_slot_freed_during_recovery_is_handed_out_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let id = {
            let spool = daemon_spool(root).await;
            spool
                .commit(Spool::new_id(), env(), b"x".to_vec(), 1)
                .await
                .unwrap()
        };
        let spool = daemon_spool(root).await;
        // Delivered before recovery reached its slot.
        spool.remove(Area::Queue, &id).unwrap();
        let rec = spool.recover().unwrap();
        assert!(rec.queued.is_empty());
        assert_eq!(spool.free_slots(), 1);

        // Slots this run made (and freed) before recovery got to them are
        // not recovery's: none is listed twice.
        let fresh = daemon_spool(root).await;
        let id = fresh
            .commit(Spool::new_id(), env(), b"y".to_vec(), 1)
            .await
            .unwrap();
        fresh.remove(Area::Queue, &id).unwrap();
        fresh.recover().unwrap();
        assert_eq!(fresh.free_slots(), 2);
        assert_eq!(slot_files(root).len(), 2);
    }

    #[test]
    fn world_writable_spool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(Spool::open(dir.path()).is_err());
    }
}
