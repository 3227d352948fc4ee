//! Test peers nobody here wrote (swaks, PHP, bsd-mailx, Python's
//! aiosmtpd, ...), installed by `.ci/run`. A test whose peer is missing
//! fails and says how to install it: it never passes without its peer,
//! and never panics with a bare "NotFound".

use std::path::Path;
use std::process::{Command, Stdio};

/// Panics, saying how to install it, unless `program args` runs and
/// exits 0 (for peers whose presence takes more than a file on the PATH,
/// like a Python module).
pub fn require(what: &str, program: &str, args: &[&str], install: &str) {
    let ok = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        missing(what, install);
    }
}

/// Panics, saying how to install it, unless `program` is an executable on
/// the PATH (for peers without a harmless way to run them, like mailx).
pub fn require_program(what: &str, program: &str, install: &str) {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
    });
    if !found {
        missing(what, install);
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn missing(what: &str, install: &str) -> ! {
    panic!(
        "{what} is needed for this test but is not installed. Install it with `{install}` \
         (.ci/run installs every test peer)."
    );
}

#[test]
fn a_missing_peer_names_its_install_command() {
    for check in [
        (|| {
            require_program(
                "bsd-mailx",
                "relayq-no-such-peer",
                "apt-get install -y bsd-mailx",
            )
        }) as fn(),
        || {
            require(
                "bsd-mailx",
                "relayq-no-such-peer",
                &[],
                "apt-get install -y bsd-mailx",
            )
        },
    ] {
        let e = std::panic::catch_unwind(check).expect_err("a missing peer fails the test");
        let text = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            text.contains("`apt-get install -y bsd-mailx`") && text.contains(".ci/run"),
            "{text}"
        );
    }
    require_program("sh", "sh", "");
}
