//! The daemon's pool of reusable queue files ("Slots" in the parent
//! module's documentation): the free list, its bounds, and the hand-over
//! between start-up recovery and live deliveries, so that no slot is ever
//! handed out twice.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::done::Cover;
use super::{DirSync, SpoolError, check_id, fsop};

/// Free slots kept at most; more are deleted when they come back.
pub const MAX_FREE: usize = 1024;
/// Larger files are not reused: a small message would have to zero them.
pub const MAX_SLOT_BYTES: u64 = 64 * 1024;
/// A new slot is at least this long, so that the next, slightly longer
/// message still fits in blocks that already exist.
pub const BLOCK: usize = 4096;

pub struct Slots {
    dir: PathBuf,
    /// Names of slots made by this run start with it (16 characters, then
    /// a 10-digit counter): recovery leaves them alone.
    run: String,
    made: AtomicU64,
    state: Mutex<State>,
    /// Group commit of `slots/` fsyncs for new slots (durability rule 1).
    pub dir_sync: DirSync,
}

pub struct State {
    /// Each with the cover its done mark waits for (see `done`).
    free: Vec<(String, Cover)>,
    /// Until recovery is done: older slots that deliveries gave back
    /// meanwhile, which recovery must skip (they may be in use again).
    recovering: Option<HashSet<String>>,
}

impl Slots {
    pub fn open(dir: &Path) -> Result<Slots, SpoolError> {
        let run = super::Spool::new_id()[10..].to_string();
        Ok(Slots {
            dir: dir.to_path_buf(),
            run,
            made: AtomicU64::new(0),
            state: Mutex::new(State {
                free: Vec::new(),
                recovering: Some(HashSet::new()),
            }),
            dir_sync: DirSync::start(dir)?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A name for a new slot, unique in this spool.
    pub fn new_name(&self) -> String {
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        format!("{}{:010}", self.run, n % 10_000_000_000)
    }

    /// Made by this run (and so not recovery's to judge).
    pub fn is_ours(&self, name: &str) -> bool {
        name.starts_with(&self.run)
    }

    /// The state, held while a message's last name goes away or while
    /// recovery looks at one slot.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot, most recently used first (its pages are likely
    /// cached), and the cover to set once it is overwritten durably.
    pub fn take(&self) -> Option<(String, Cover)> {
        self.lock().free.pop()
    }
}

impl State {
    /// Whether recovery may judge this older slot: false if a delivery
    /// has given it back already.
    pub fn claim(&mut self, name: &str) -> bool {
        self.recovering
            .as_mut()
            .is_none_or(|given| !given.remove(name))
    }

    /// Recovery is over: deliveries need not leave notes any more.
    pub fn recovered(&mut self) {
        self.recovering = None;
    }

    /// Puts a slot whose message is gone back on the free list, or
    /// deletes it when the list is full or the file is large. `name` comes
    /// from the file's header: used only if it is well formed and names
    /// the file whose message was removed (`dev`, `ino`).
    pub fn give_back(&mut self, dir: &Path, name: &str, dev: u64, ino: u64, cover: Cover) {
        if check_id(name).is_err() {
            return;
        }
        let path = dir.join(name);
        let Ok(st) = fs::symlink_metadata(&path) else {
            return;
        };
        if !st.is_file() || st.dev() != dev || st.ino() != ino {
            return;
        }
        if let Some(given) = self.recovering.as_mut() {
            given.insert(name.to_string());
        }
        self.free_or_delete(&path, name, st.len(), cover);
    }

    /// A slot known to hold no message: reuse it or delete it.
    pub fn free_or_delete(&mut self, path: &Path, name: &str, len: u64, cover: Cover) {
        if self.free.len() < MAX_FREE && len <= MAX_SLOT_BYTES {
            self.free.push((name.to_string(), cover));
        } else {
            let _ = fsop::remove_file(path);
        }
    }
}
