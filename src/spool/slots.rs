//! The daemon's pool of reusable queue files ("Slots" in the parent
//! module's documentation): the free list, its bounds, and the hand-over
//! between start-up recovery and live deliveries, so that no slot is ever
//! handed out twice.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{DirSync, SpoolError, check_id};

/// Free slots kept at most; more are deleted when they come back.
pub const MAX_FREE: usize = 1024;
/// Larger files are not reused: a small message would have to zero them.
pub const MAX_SLOT_BYTES: u64 = 64 * 1024;
/// A new slot is at least this long, so that the next, slightly longer
/// message still fits in blocks that already exist.
pub const BLOCK: usize = 4096;

pub struct Slots {
    dir: PathBuf,
    state: Mutex<State>,
    /// Group commit of `slots/` fsyncs for new slots (durability rule 1).
    pub dir_sync: DirSync,
}

pub struct State {
    free: Vec<String>,
    /// Slots that existed at start and recovery has not looked at yet:
    /// only recovery may decide about them, unless a delivery frees one
    /// first (then recovery skips it).
    unrecovered: HashSet<String>,
}

impl Slots {
    /// Takes note of the slots present now (under the daemon lock) for
    /// recovery to look at.
    pub fn open(dir: &Path) -> Result<Slots, SpoolError> {
        let unrecovered = fs::read_dir(dir)
            .map_err(|e| SpoolError::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_id(n).is_ok())
            .collect();
        Ok(Slots {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                free: Vec::new(),
                unrecovered,
            }),
            dir_sync: DirSync::start(dir)?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state, held while a message's last name goes away or while
    /// recovery looks at one slot.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot, most recently used first (its pages are likely cached).
    pub fn take(&self) -> Option<String> {
        self.lock().free.pop()
    }

    /// Names recovery has still to look at.
    pub fn unrecovered(&self) -> Vec<String> {
        self.lock().unrecovered.iter().cloned().collect()
    }
}

impl State {
    /// Claims an unrecovered slot for recovery; false if a delivery has
    /// freed it already.
    pub fn claim(&mut self, name: &str) -> bool {
        self.unrecovered.remove(name)
    }

    /// Puts a slot whose message is gone back on the free list, or
    /// deletes it when the list is full or the file is large. `name` comes
    /// from the file's header: used only if it is well formed and names
    /// the file whose message was removed (`dev`, `ino`).
    pub fn give_back(&mut self, dir: &Path, name: &str, dev: u64, ino: u64) {
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
        self.unrecovered.remove(name);
        self.free_or_delete(&path, name, st.len());
    }

    /// A slot known to hold no message: reuse it or delete it.
    pub fn free_or_delete(&mut self, path: &Path, name: &str, len: u64) {
        if self.free.len() < MAX_FREE && len <= MAX_SLOT_BYTES {
            self.free.push(name.to_string());
        } else {
            let _ = fs::remove_file(path);
        }
    }
}
