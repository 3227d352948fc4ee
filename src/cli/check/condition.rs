//! `relayq check-config --require-relay`: the unit's start condition
//! (`ExecCondition=`). The package enables the service at install, before
//! anyone has named a relay; started then, relayq would accept mail it can
//! only send to `smtp.example.com`. So the service starts only once the
//! config names a real relay, and says so in the journal and in
//! `systemctl status` until then. Mail handed to `sendmail` meanwhile waits
//! in the maildrop and goes out once relayq starts.
//!
//! Exit codes, as systemd.service(5) reads an `ExecCondition=`: 0 start;
//! 1 (not configured yet) skip the start without failing the unit; 255
//! (the file is invalid) fail the unit, with the file, line and key.

use std::io::ErrorKind;
use std::path::Path;

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};

/// What to do next, for an operator reading the journal.
const NEXT: &str =
    "edit it (README \"Install\"), run `relayq check`, then `systemctl restart relayq`";

/// Prints what it found and returns the exit code.
pub fn relay_configured(explicit: Option<&Path>) -> i32 {
    let path = explicit.unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
    match Config::load(path) {
        Ok(c) => match c.no_relay_yet() {
            None => {
                println!("{}: ok, relaying", path.display());
                0
            }
            Some(why) => {
                eprintln!(
                    "relayq is not started: in {}, {why}; {NEXT}. Mail from sendmail waits in the maildrop until then.",
                    path.display()
                );
                1
            }
        },
        Err(ConfigError::Read { error, .. }) if error.kind() == ErrorKind::NotFound => {
            eprintln!(
                "relayq is not started: there is no config file {}; write one (dist/relayq.toml is an example), {NEXT}.",
                path.display()
            );
            1
        }
        Err(e) => {
            eprintln!("relayq: {e}");
            255
        }
    }
}
