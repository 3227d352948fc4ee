//! Command-line front ends: the daemon (`serve`), config checking, the
//! queue tools, and the `sendmail` command.

pub mod check;
pub mod queue;
pub mod sendmail;
pub mod serve;

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{Config, DEFAULT_CONFIG_PATH};

/// The development default's directory under `$XDG_STATE_HOME` (or
/// `~/.local/state`): its spool and Maildir.
pub const DEV_DATA_DIR: &str = "relayq";

/// Names a config file for every subcommand when `--config`/`-C` is not
/// given (the sendmail command cannot always pass flags).
pub const CONFIG_ENV: &str = "RELAYQ_CONFIG";

/// Resolves the configuration the way every subcommand does: `--config`
/// if given (it must exist), else `$RELAYQ_CONFIG`, else the default path
/// if it exists, else the development default in [`dev_data_dir`].
pub fn load_config(explicit: Option<&Path>) -> anyhow::Result<Config> {
    if let Some(path) = explicit {
        return Ok(Config::load(path)?);
    }
    if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return Ok(Config::load(Path::new(&path))?);
    }
    let default = Path::new(DEFAULT_CONFIG_PATH);
    if default.exists() {
        return Ok(Config::load(default)?);
    }
    Ok(Config::development(&dev_data_dir()?))
}

/// Where the development default keeps its spool and Maildir: one place
/// per user, `$XDG_STATE_HOME/relayq` or `~/.local/state/relayq`, so that
/// `serve`, `sendmail` and the queue tools find the same spool from any
/// directory (a spool under the current directory stranded mail).
pub fn dev_data_dir() -> anyhow::Result<PathBuf> {
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(state) = absolute("XDG_STATE_HOME") {
        return Ok(state.join(DEV_DATA_DIR));
    }
    match absolute("HOME") {
        Some(home) => Ok(home.join(".local/state").join(DEV_DATA_DIR)),
        None => Err(anyhow::anyhow!(
            "no config file ({} not found) and neither HOME nor XDG_STATE_HOME is set, so the development default has no place for its spool; set HOME, or write a config file",
            crate::config::DEFAULT_CONFIG_PATH
        )),
    }
}

/// The lock file the daemon holds while it runs.
pub fn lock_path(spool_dir: &Path) -> PathBuf {
    spool_dir.join("daemon.lock")
}

/// Why the spool lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "the spool {0} is locked by another relayq process (a running `relayq serve`, or a queue tool); stop it first"
    )]
    Held(PathBuf),
    #[error("{0}")]
    Other(String),
}

/// Takes the exclusive spool lock (`<spool>/daemon.lock`), waiting up to
/// `wait` for another holder; the lock lasts as long as the file is open.
pub fn lock_spool(spool_dir: &Path, wait: Duration) -> Result<File, LockError> {
    let path = lock_path(spool_dir);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| {
            LockError::Other(format!(
                "cannot open the spool lock {}: {e}",
                path.display()
            ))
        })?;
    let deadline = Instant::now() + wait;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(LockError::Held(spool_dir.to_path_buf()));
            }
            Err(e) => {
                return Err(LockError::Other(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )));
            }
        }
    }
}

/// Refuses unless this process runs as root or as the spool's owner: the
/// only users who may change other people's mail.
pub fn ensure_operator(spool_dir: &Path, what: &str) -> anyhow::Result<()> {
    let euid = rustix::process::geteuid().as_raw();
    let owner = match std::fs::metadata(spool_dir) {
        Ok(m) => m.uid(),
        Err(e) => {
            return Err(anyhow::anyhow!(
                "cannot look at the spool {}: {e}",
                spool_dir.display()
            ));
        }
    };
    if euid == 0 || euid == owner {
        return Ok(());
    }
    let name = crate::submit::Identity::of_uid(owner).name;
    Err(anyhow::anyhow!(
        "permission denied: only root or the owner of {} ({name}) may {what}; run this as one of them (e.g. with sudo)",
        spool_dir.display()
    ))
}
