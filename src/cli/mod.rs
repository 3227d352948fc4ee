//! Command-line front ends: the daemon (`serve`), config checking, and the
//! queue tools.

pub mod check;
pub mod queue;
pub mod serve;

use std::path::{Path, PathBuf};

use crate::config::{Config, DEFAULT_CONFIG_PATH};

/// Where the development default keeps its spool and Maildir.
pub const DEV_DATA_DIR: &str = "relayq-data";

/// Resolves the configuration the way every subcommand does: `--config`
/// if given (it must exist), else the default path if it exists, else the
/// development default under `./relayq-data`.
pub fn load_config(explicit: Option<&Path>) -> anyhow::Result<Config> {
    if let Some(path) = explicit {
        return Ok(Config::load(path)?);
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
