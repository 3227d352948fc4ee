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

/// Where the development default keeps its spool and Maildir.
pub const DEV_DATA_DIR: &str = "relayq-data";

/// Names a config file for every subcommand when `--config`/`-C` is not
/// given (the sendmail command cannot always pass flags).
pub const CONFIG_ENV: &str = "RELAYQ_CONFIG";

/// Resolves the configuration the way every subcommand does: `--config`
/// if given (it must exist), else `$RELAYQ_CONFIG`, else the default path
/// if it exists, else the development default under `./relayq-data`.
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
    let base = std::env::current_dir()
        .map(|d| d.join(DEV_DATA_DIR))
        .unwrap_or_else(|_| PathBuf::from(DEV_DATA_DIR));
    Ok(Config::development(&base))
}

/// The lock file the daemon holds while it runs.
pub fn lock_path(spool_dir: &Path) -> PathBuf {
    spool_dir.join("daemon.lock")
}

/// Takes the exclusive spool lock (`<spool>/daemon.lock`), waiting up to
/// `wait` for another holder; the lock lasts as long as the file is open.
pub fn lock_spool(spool_dir: &Path, wait: Duration) -> anyhow::Result<File> {
    let path = lock_path(spool_dir);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open the spool lock {}: {e}", path.display()))?;
    let deadline = Instant::now() + wait;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(anyhow::anyhow!(
                    "the spool {} is locked by another relayq process (a running `relayq serve`, or a queue tool); stop it first",
                    spool_dir.display()
                ));
            }
            Err(e) => {
                return Err(anyhow::anyhow!("cannot lock {}: {e}", path.display()));
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
