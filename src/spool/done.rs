//! Group commit of done marks (durability rule 4 in the parent module).
//!
//! A finished message's file gets a NUL over its first byte. Until that
//! byte is on the disk, a power loss can bring the message back and it is
//! sent again; `fdatasync`ing each one before the worker moves on would
//! cost a disk flush per delivered message. So marks are collected and
//! synced together by one thread: each mark is durable at most `window`
//! after it was written (plus the time the syncs take), and one batch
//! serves every message finished meanwhile. A slot reused by a new message
//! before its batch runs needs no sync of its own: the accept's
//! `fdatasync` wrote over the mark with the new message (its `Cover`).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::time::{Duration, Instant};

use super::fsop;

/// Marks synced in one batch at most: each holds its file open, so this
/// and [`QUEUED`] bound the descriptors the committer keeps.
const MAX_BATCH: usize = 256;
/// Marks waiting for the committer at most; a worker finishing a message
/// beyond that waits (the disk is not keeping up).
const QUEUED: usize = 256;

/// Set once the file of a freed slot has been overwritten with a new
/// message and `fdatasync`ed: its done mark needs no sync any more.
#[derive(Clone, Default)]
pub struct Cover(Arc<AtomicBool>);

impl Cover {
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

struct Mark {
    file: File,
    at: Instant,
    cover: Cover,
}

enum Msg {
    Mark(Mark),
    /// Answered once every mark sent before it is durable.
    Barrier(mpsc::Sender<()>),
}

/// Where done marks go to be made durable.
pub struct DoneMarks {
    /// `None`: a window of zero, each mark is synced before `add` returns.
    tx: Option<SyncSender<Msg>>,
}

impl DoneMarks {
    /// Each mark synced at once (the queue tools, `sendmail`, and a
    /// daemon configured with a zero window).
    pub fn immediate() -> DoneMarks {
        DoneMarks { tx: None }
    }

    /// A committer thread that syncs marks at most `window` after they
    /// are written.
    pub fn start(window: Duration) -> std::io::Result<DoneMarks> {
        if window.is_zero() {
            return Ok(DoneMarks::immediate());
        }
        let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUED);
        std::thread::Builder::new()
            .name("spool-donesync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut marks = Vec::new();
                    let mut waiting = Vec::new();
                    let deadline = match &first {
                        Msg::Mark(m) => m.at + window,
                        Msg::Barrier(_) => Instant::now(),
                    };
                    let mut next = Some(first);
                    while let Some(msg) = next.take() {
                        match msg {
                            Msg::Mark(m) => marks.push(m),
                            Msg::Barrier(done) => waiting.push(done),
                        }
                        if marks.len() >= MAX_BATCH || !waiting.is_empty() {
                            break;
                        }
                        let left = deadline.saturating_duration_since(Instant::now());
                        next = rx.recv_timeout(left).ok();
                    }
                    sync_all(&marks);
                    for done in waiting {
                        let _ = done.send(());
                    }
                }
            })?;
        Ok(DoneMarks { tx: Some(tx) })
    }

    /// Makes the done mark just written to `file` durable: now, or within
    /// the window. `cover` is set if the file is overwritten durably first.
    pub fn add(&self, file: File, cover: Cover) {
        let mark = Mark {
            file,
            at: Instant::now(),
            cover,
        };
        match &self.tx {
            Some(tx) => {
                if let Err(mpsc::SendError(Msg::Mark(mark))) = tx.send(Msg::Mark(mark)) {
                    sync_all(&[mark]);
                }
            }
            None => sync_all(&[mark]),
        }
    }

    /// Waits until every mark added so far is durable.
    pub fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done, wait) = mpsc::channel();
            if tx.send(Msg::Barrier(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }
}

fn sync_all(marks: &[Mark]) {
    for m in marks.iter().filter(|m| !m.cover.is_set()) {
        if let Err(e) = fsop::sync_data(&m.file) {
            // The mark stays in the page cache: only a power loss before
            // the kernel writes it back can send the message again.
            tracing::error!("cannot sync the done mark of a finished queue file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn marks_are_synced_within_the_window_and_flush_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let marks = DoneMarks::start(Duration::from_millis(50)).unwrap();
        let mut files = Vec::new();
        for i in 0..600 {
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, b"relayq").unwrap();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            fsop::write_at(&f, &[0], 0).unwrap();
            marks.add(f, Cover::default());
            files.push(path);
        }
        marks.flush();
        for path in files {
            let mut b = [1u8];
            std::fs::File::open(path)
                .unwrap()
                .read_exact(&mut b)
                .unwrap();
            assert_eq!(b, [0]);
        }
        // An immediate committer and a flush with nothing queued return.
        DoneMarks::immediate().flush();
        marks.flush();
    }
}
