//! The sendmail command line, parsed the way Postfix's `sendmail` reads
//! it: single-letter flags, values attached (`-fuser@x`, `-oi`) or
//! separate (`-f user@x`), recipients anywhere, and the options other
//! mailers pass out of habit accepted and ignored.

use std::ffi::OsString;
use std::path::PathBuf;

/// What the command was asked to do (`-b` mode, or `-q`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `-bm` (the default): read a message from stdin and queue it.
    #[default]
    Deliver,
    /// `-bp`: list the queue, like `mailq`.
    ListQueue,
    /// `-bs`: SMTP on stdin/stdout.
    Smtp,
    /// `-q`: retry the deferred queue now.
    Flush,
    /// `-bi` (`newaliases`): nothing to do for a relay; succeeds.
    Newaliases,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// `-t`: recipients also from To/Cc/Bcc.
    pub extract: bool,
    /// `-f`/`-r`: the envelope sender as given.
    pub sender: Option<String>,
    /// `-F`: full name for a From: header we add.
    pub full_name: Option<String>,
    /// `-i`/`-oi`: a line with a lone dot does not end the message.
    pub ignore_dots: bool,
    pub verbose: bool,
    /// `-C`: config file.
    pub config: Option<PathBuf>,
    /// Recipients from the command line, as written.
    pub recipients: Vec<String>,
    /// `-N`: DSN NOTIFY for every recipient (`never`, or a list of
    /// `success`, `delay`, `failure`).
    pub notify: Option<crate::spool::Notify>,
    /// `-R`: DSN RET (`hdrs` or `full`).
    pub ret: Option<crate::spool::Ret>,
    /// `-V`: DSN ENVID.
    pub envid: Option<String>,
}

/// A usage error, worded for the user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Usage(pub String);

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Options, Usage> {
    use lexopt::Arg::{Long, Short, Value};
    let mut o = Options::default();
    let mut p = lexopt::Parser::from_args(args);
    let text = |v: OsString, what: &str| {
        v.into_string()
            .map_err(|_| Usage(format!("{what} is not valid UTF-8")))
    };
    let usage = |e: lexopt::Error| Usage(e.to_string());
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('t') => o.extract = true,
            Short('i') => o.ignore_dots = true,
            Short('v') => o.verbose = true,
            Short('f' | 'r') => {
                o.sender = Some(text(p.value().map_err(usage)?, "the sender")?);
            }
            Short('F') => o.full_name = Some(text(p.value().map_err(usage)?, "the full name")?),
            Short('C') => o.config = Some(PathBuf::from(p.value().map_err(usage)?)),
            Short('o') => {
                // -oi is the one -o option with a meaning here; -odi -odb
                // -oem -oep and the rest are sendmail.cf settings.
                if p.value().map_err(usage)? == "i" {
                    o.ignore_dots = true;
                }
            }
            Short('b') => {
                o.mode = match text(p.value().map_err(usage)?, "-b")?.as_str() {
                    "m" => Mode::Deliver,
                    "p" => Mode::ListQueue,
                    "s" => Mode::Smtp,
                    "i" => Mode::Newaliases,
                    "d" => {
                        return Err(Usage(
                            "-bd (daemon mode) is not supported; run `relayq serve`".into(),
                        ));
                    }
                    other => {
                        return Err(Usage(format!(
                            "unsupported mode -b{other} (supported: -bm -bp -bs -bi)"
                        )));
                    }
                };
            }
            Short('q') => {
                // -q, -q1h, -qR...: all mean "run the queue now" here.
                let _ = p.optional_value();
                o.mode = Mode::Flush;
            }
            // DSN requests, as Postfix's sendmail takes them (RFC 3461).
            Short('N') => {
                let v = text(p.value().map_err(usage)?, "-N")?;
                o.notify = Some(crate::spool::Notify::parse(&v).ok_or_else(|| {
                    Usage(format!(
                        "-N {v}: use never, or a list of success, delay and failure"
                    ))
                })?);
            }
            Short('R') => {
                let v = text(p.value().map_err(usage)?, "-R")?;
                o.ret = Some(match v.to_ascii_lowercase().as_str() {
                    "hdrs" => crate::spool::Ret::Hdrs,
                    "full" => crate::spool::Ret::Full,
                    _ => return Err(Usage(format!("-R {v}: use hdrs or full"))),
                });
            }
            Short('V') => {
                let v = text(p.value().map_err(usage)?, "-V")?;
                if v.is_empty() || v.len() > 100 || !v.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(Usage(format!(
                        "-V {v}: an envelope id is 1 to 100 printable ASCII characters"
                    )));
                }
                o.envid = Some(v);
            }
            // Flags with a value that Postfix accepts and ignores (or that
            // have no meaning for a relay): body type, log file, queue
            // label, options, hop count, error mode, protocol.
            Short('B' | 'X' | 'L' | 'O' | 'h' | 'e' | 'p') => {
                let _ = p.value().map_err(usage)?;
            }
            Short('A' | 'd') => {
                let _ = p.optional_value();
            }
            // Flags without a value, ignored like Postfix does.
            Short('m' | 'n' | 'G' | 'I' | 'U' | 'c' | 'x') => {}
            Short(c) => {
                return Err(Usage(format!(
                    "unknown option -{c} (see `relayq sendmail` in the README)"
                )));
            }
            Long(name) => {
                return Err(Usage(format!(
                    "unknown option --{name} (sendmail options are single letters)"
                )));
            }
            Value(v) => o.recipients.push(text(v, "a recipient")?),
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Options, Usage> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn the_usual_invocations() {
        let o = p(&["-t", "-i"]).unwrap();
        assert!(o.extract && o.ignore_dots && o.recipients.is_empty());
        let o = p(&[
            "-oi",
            "-fbounce@example.com",
            "-F",
            "Web Shop",
            "a@b.example",
        ])
        .unwrap();
        assert!(o.ignore_dots);
        assert_eq!(o.sender.as_deref(), Some("bounce@example.com"));
        assert_eq!(o.full_name.as_deref(), Some("Web Shop"));
        assert_eq!(o.recipients, vec!["a@b.example"]);
        let o = p(&["-ti", "-r", "x@y.example", "--", "-odd@example.com"]).unwrap();
        assert!(o.extract && o.ignore_dots);
        assert_eq!(o.recipients, vec!["-odd@example.com"]);
        assert_eq!(p(&["-bp"]).unwrap().mode, Mode::ListQueue);
        assert_eq!(p(&["-bs"]).unwrap().mode, Mode::Smtp);
        assert_eq!(p(&["-q"]).unwrap().mode, Mode::Flush);
        assert_eq!(p(&["-q30m"]).unwrap().mode, Mode::Flush);
        assert_eq!(p(&["-bi"]).unwrap().mode, Mode::Newaliases);
        let o = p(&["-C", "/etc/x.toml", "-v", "u@example.com"]).unwrap();
        assert_eq!(o.config, Some(PathBuf::from("/etc/x.toml")));
        assert!(o.verbose);
    }

    #[test]
    fn ignored_options_are_accepted() {
        let o = p(&[
            "-odi",
            "-odb",
            "-oem",
            "-oep",
            "-oQ/var/spool",
            "-B",
            "8BITMIME",
            "-N",
            "never",
            "-R",
            "hdrs",
            "-V",
            "envid",
            "-X",
            "/tmp/log",
            "-n",
            "-m",
            "-U",
            "a@example.com",
        ])
        .unwrap();
        assert_eq!(o.recipients, vec!["a@example.com"]);
        assert_eq!(o.mode, Mode::Deliver);
        assert!(!o.ignore_dots);
        assert_eq!(o.notify, Some(crate::spool::Notify::NEVER));
        assert_eq!(o.ret, Some(crate::spool::Ret::Hdrs));
        assert_eq!(o.envid.as_deref(), Some("envid"));
    }

    #[test]
    fn dsn_flags() {
        use crate::spool::Notify;
        let o = p(&["-N", "success,delay", "-R", "full", "a@example.com"]).unwrap();
        assert_eq!(o.notify, Some(Notify::SUCCESS.with(Notify::DELAY)));
        assert!(p(&["-N", "never,success"]).is_err());
        assert!(p(&["-N", "sometimes"]).is_err());
        assert!(p(&["-R", "body"]).is_err());
        assert!(p(&["-V", "has space"]).is_err());
    }

    #[test]
    fn errors_name_the_option() {
        assert!(p(&["-Z"]).unwrap_err().0.contains("-Z"));
        assert!(p(&["--help"]).unwrap_err().0.contains("--help"));
        assert!(p(&["-bd"]).unwrap_err().0.contains("relayq serve"));
        assert!(p(&["-f"]).is_err());
    }
}
