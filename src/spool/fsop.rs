//! The file-system operations the spool makes on queue files and their
//! directories, in one place: every write, fsync, link, unlink and rename
//! of the spool goes through here, so that the durability rules in the
//! parent module can be checked against what the code really does. In
//! tests each operation is also recorded (see `crash`): the crash-state
//! test replays the record to build every on-disk state a power loss can
//! leave. Reads are not recorded: they change nothing on disk.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Creates a new file (`O_EXCL`, mode 0600) for reading and writing.
pub fn create_new(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    #[cfg(test)]
    record::created(path, &file);
    Ok(file)
}

/// Creates a new file with `opts` (which must say `create_new`): for a
/// file whose mode or flags differ from [`create_new`]'s (a drop file).
pub fn create_new_with(opts: &OpenOptions, path: &Path) -> io::Result<File> {
    let file = opts.open(path)?;
    #[cfg(test)]
    record::created(path, &file);
    Ok(file)
}

/// `pwrite` of all of `buf` at `offset`.
pub fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)?;
    #[cfg(test)]
    record::wrote(file, buf, offset);
    Ok(())
}

/// `fdatasync`: the file's data written so far is durable when this
/// returns.
pub fn sync_data(file: &File) -> io::Result<()> {
    #[cfg(test)]
    let token = record::sync_file_begin(file);
    file.sync_data()?;
    #[cfg(test)]
    record::sync_end(token);
    Ok(())
}

/// `fsync` of a directory open as `dir` (its path is `path`): the entries
/// made and removed in it so far are durable when this returns.
pub fn sync_dir(dir: &File, path: &Path) -> io::Result<()> {
    #[cfg(test)]
    let token = record::sync_dir_begin(path);
    #[cfg(not(test))]
    let _ = path;
    dir.sync_all()?;
    #[cfg(test)]
    record::sync_end(token);
    Ok(())
}

/// `syncfs(2)` of the file system `file` is on: everything written and
/// every directory change made on it so far is durable when this returns
/// (for a process that may not open the directory to fsync it).
pub fn sync_fs(file: &File) -> io::Result<()> {
    #[cfg(test)]
    let token = record::sync_fs_begin(file);
    rustix::fs::syncfs(file)?;
    #[cfg(test)]
    record::sync_end(token);
    Ok(())
}

pub fn hard_link(from: &Path, to: &Path) -> io::Result<()> {
    fs::hard_link(from, to)?;
    #[cfg(test)]
    record::linked(to);
    Ok(())
}

pub fn remove_file(path: &Path) -> io::Result<()> {
    #[cfg(test)]
    let ino = record::ino_of(path);
    fs::remove_file(path)?;
    #[cfg(test)]
    record::unlinked(path, ino);
    Ok(())
}

pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(test)]
    let ino = record::ino_of(from);
    fs::rename(from, to)?;
    #[cfg(test)]
    record::renamed(from, to, ino);
    Ok(())
}

/// What a test records (see `crash`). Recording is off unless a test
/// turns it on for one spool directory; operations elsewhere (another
/// test's spool) are ignored.
#[cfg(test)]
pub mod record {
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::time::Instant;

    /// One recorded operation. Paths are relative to the spool root.
    /// `ino` identifies the file: the crash model gives each created file
    /// a fresh identity, so a reused inode number is not confused with
    /// the deleted file that had it.
    #[derive(Debug, Clone)]
    pub enum Op {
        Create {
            path: String,
            ino: u64,
        },
        Write {
            ino: u64,
            offset: u64,
            data: Vec<u8>,
        },
        /// An fsync/fdatasync started: what was recorded before it is
        /// durable once the matching `SyncEnd` is recorded.
        SyncFileBegin {
            ino: u64,
            token: u64,
        },
        SyncDirBegin {
            dir: String,
            token: u64,
        },
        /// A `syncfs` started: everything recorded before it is durable
        /// once the matching `SyncEnd` is recorded.
        SyncFsBegin {
            token: u64,
        },
        SyncEnd {
            token: u64,
        },
        Link {
            path: String,
            ino: u64,
        },
        Unlink {
            path: String,
            ino: u64,
        },
        Rename {
            from: String,
            to: String,
            ino: u64,
        },
        /// Not a file-system operation: an event of the workload (a
        /// message acknowledged, delivered), for the checker.
        Mark(String),
    }

    struct Recorder {
        root: PathBuf,
        /// The root's device: a file elsewhere (another test's spool) is
        /// not recorded, even if its inode number matches one of ours.
        dev: u64,
        start: Instant,
        ops: Vec<(u128, Op)>,
        next_token: u64,
    }

    static RECORDER: Mutex<Option<Recorder>> = Mutex::new(None);

    /// Starts recording the operations under `root`.
    pub fn start(root: &Path) {
        let dev = std::fs::metadata(root).map(|m| m.dev()).unwrap_or(0);
        *lock() = Some(Recorder {
            root: root.to_path_buf(),
            dev,
            start: Instant::now(),
            ops: Vec::new(),
            next_token: 0,
        });
    }

    /// Stops recording and returns what was recorded, each operation with
    /// the microseconds since `start`.
    pub fn stop() -> Vec<(u128, Op)> {
        lock().take().map(|r| r.ops).unwrap_or_default()
    }

    /// Records a workload event.
    pub fn mark(what: String) {
        push_with(|_| Some(Op::Mark(what)));
    }

    fn lock() -> std::sync::MutexGuard<'static, Option<Recorder>> {
        RECORDER.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rel(r: &Recorder, path: &Path) -> Option<String> {
        path.strip_prefix(&r.root)
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// Records the operation `make` builds, if a recording is on and the
    /// operation is under its root (`make` returns None otherwise).
    fn push_with(make: impl FnOnce(&Recorder) -> Option<Op>) -> Option<u64> {
        let mut guard = lock();
        let r = guard.as_mut()?;
        let op = make(r)?;
        let token = r.next_token;
        let op = match op {
            Op::SyncFileBegin { ino, .. } => Op::SyncFileBegin { ino, token },
            Op::SyncDirBegin { dir, .. } => Op::SyncDirBegin { dir, token },
            Op::SyncFsBegin { .. } => Op::SyncFsBegin { token },
            op => op,
        };
        r.next_token += 1;
        let at = r.start.elapsed().as_micros();
        r.ops.push((at, op));
        Some(token)
    }

    /// The inode of a file on the recorded root's device.
    fn file_ino(file: &File) -> Option<u64> {
        let m = file.metadata().ok()?;
        let dev = lock().as_ref()?.dev;
        (m.dev() == dev).then_some(m.ino())
    }

    pub fn ino_of(path: &Path) -> Option<u64> {
        std::fs::symlink_metadata(path).ok().map(|m| m.ino())
    }

    pub fn created(path: &Path, file: &File) {
        let ino = file_ino(file);
        push_with(|r| {
            Some(Op::Create {
                path: rel(r, path)?,
                ino: ino?,
            })
        });
    }

    pub fn wrote(file: &File, buf: &[u8], offset: u64) {
        if lock().is_none() {
            return;
        }
        let ino = file_ino(file);
        push_with(|_| {
            Some(Op::Write {
                ino: ino?,
                offset,
                data: buf.to_vec(),
            })
        });
    }

    pub fn sync_file_begin(file: &File) -> Option<u64> {
        if lock().is_none() {
            return None;
        }
        let ino = file_ino(file);
        push_with(|_| {
            Some(Op::SyncFileBegin {
                ino: ino?,
                token: 0,
            })
        })
    }

    pub fn sync_dir_begin(path: &Path) -> Option<u64> {
        push_with(|r| {
            Some(Op::SyncDirBegin {
                dir: rel(r, path)?,
                token: 0,
            })
        })
    }

    /// Only a `syncfs` of the recorded root's file system counts.
    pub fn sync_fs_begin(file: &File) -> Option<u64> {
        if lock().is_none() {
            return None;
        }
        file_ino(file)?;
        push_with(|_| Some(Op::SyncFsBegin { token: 0 }))
    }

    pub fn sync_end(token: Option<u64>) {
        if let Some(token) = token {
            push_with(|_| Some(Op::SyncEnd { token }));
        }
    }

    pub fn linked(to: &Path) {
        let ino = ino_of(to);
        push_with(|r| {
            Some(Op::Link {
                path: rel(r, to)?,
                ino: ino?,
            })
        });
    }

    pub fn unlinked(path: &Path, ino: Option<u64>) {
        push_with(|r| {
            Some(Op::Unlink {
                path: rel(r, path)?,
                ino: ino?,
            })
        });
    }

    pub fn renamed(from: &Path, to: &Path, ino: Option<u64>) {
        push_with(|r| {
            Some(Op::Rename {
                from: rel(r, from)?,
                to: rel(r, to)?,
                ino: ino?,
            })
        });
    }
}
