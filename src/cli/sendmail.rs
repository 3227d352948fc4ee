//! `sendmail` (a symlink to relayq, or `relayq sendmail`): the command
//! that PHP's `mail()`, cron, Rails, Django, `mail`/`mailx` and shell
//! scripts run to send mail, behaving like Postfix's and nullmailer's.
//!
//! It reads the message from stdin, fixes it up like Postfix's cleanup
//! (see `message`), stores it durably, wakes the daemon if it runs, and
//! exits with a sysexits code and a one-line message on stderr when
//! something is wrong. It works while the daemon is down: the message
//! waits on disk and the daemon picks it up when it starts.
//!
//! # Security: the privilege design
//! The spool holds everybody's mail, so `queue/` and friends stay 0700,
//! owned by the daemon's user; sendmail is not setuid. Like Postfix
//! (world-usable `postdrop` writing into `maildrop/`, read by `pickup`),
//! an ordinary user writes the message as a file of their own into
//! `<spool>/maildrop/`, a sticky write-only directory (1733) they can
//! neither list nor tamper with others' files in, reached through the
//! spool root (0711: traverse only), and pokes `pickup.sock`. The daemon
//! reads the file without following links, checks it like any untrusted
//! input, takes the submitter from the file's owner (the kernel's word),
//! applies the sender rule (every user may choose it with `-f` unless
//! `[sendmail] trusted_users` restricts it; the uid is always named in the
//! `Received:` header and the log), runs the same content rules as every
//! other way in (`cleanup`), and re-queues it through the one spool
//! writer. Root and the spool's owner write `queue/` directly when they
//! own it. Details: the `submit`, `spool::maildrop` and `pickup` modules.

mod args;
mod stdin;

use std::ffi::OsString;
use std::io::{BufReader, Write};
use std::process::ExitCode;
use std::sync::Arc;

use self::args::{Mode, Options};
use crate::cleanup::address;
use crate::config::Config;
use crate::observe::events::{Reason, Rejection, Stage};
use crate::spool::{Envelope, SpoolError};
use crate::submit::{self, SubmitError, Submitted, Submitter};

/// sysexits.h: what scripts and PHP test for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Usage = 64,
    DataErr = 65,
    NoUser = 67,
    Unavailable = 69,
    Software = 70,
    CantCreat = 73,
    IoErr = 74,
    TempFail = 75,
    Config = 78,
}

/// A failure: exit code and the one line for stderr.
#[derive(Debug)]
pub struct Fail(pub Exit, pub String);

fn fail<T>(code: Exit, msg: impl Into<String>) -> Result<T, Fail> {
    Err(Fail(code, msg.into()))
}

/// Entry point; `prog` names the command in messages.
pub fn main(prog: &str, args: Vec<OsString>) -> ExitCode {
    ExitCode::from(exit_code(prog, args))
}

/// Runs the command; returns the process exit status.
pub fn exit_code(prog: &str, args: Vec<OsString>) -> u8 {
    match run(prog, args) {
        Ok(()) => 0,
        Err(Fail(code, msg)) => {
            eprintln!("{prog}: {msg}");
            code as u8
        }
    }
}

fn run(prog: &str, args: Vec<OsString>) -> Result<(), Fail> {
    let opts = args::parse(args).map_err(|e| Fail(Exit::Usage, e.0))?;
    let config = super::load_config(opts.config.as_deref())
        .map_err(|e| Fail(Exit::Config, e.to_string()))?;
    match opts.mode {
        Mode::Newaliases => Ok(()),
        Mode::ListQueue => super::queue::list(&config, false, &mut std::io::stdout().lock())
            .map_err(|e| Fail(Exit::Unavailable, format!("{e:#}"))),
        Mode::Flush => flush(&config, opts.verbose),
        Mode::Smtp => {
            development_spool(&config)?;
            smtp(config)
        }
        Mode::Deliver => {
            development_spool(&config)?;
            deliver(prog, config, &opts)
        }
    }
}

/// Without a config file every user has a spool of their own, made by
/// `relayq serve` run as them. One that does not exist yet would be made
/// here and never delivered: a daemon runs for another user, or under
/// another home (`sudo` sets root's), and reads only its own spool.
fn development_spool(config: &Config) -> Result<(), Fail> {
    if config.source.is_some() || config.spool_dir.exists() {
        return Ok(());
    }
    let who = submit::Identity::current();
    fail(
        Exit::Config,
        format!(
            "no config file ({} not found) and no development spool {} for uid {} ({}): without a config file each user has their own, made by `relayq serve` run as them, and a daemon of another user (or home) would never deliver mail left here; run sendmail as the user who runs `relayq serve` (with the same HOME), or send by SMTP to 127.0.0.1:2525, or write a config file so that every user shares one spool",
            crate::config::DEFAULT_CONFIG_PATH,
            config.spool_dir.display(),
            who.uid,
            who.name
        ),
    )
}

fn flush(config: &Config, verbose: bool) -> Result<(), Fail> {
    let req = crate::control::Request::Flush;
    match crate::control::request_blocking(&config.spool_dir, &req) {
        Ok(Some(r)) if r.ok => {
            if verbose {
                println!(
                    "flushed: {} deferred message(s) scheduled now",
                    r.count.unwrap_or(0)
                );
            }
            Ok(())
        }
        Ok(Some(r)) => fail(Exit::Unavailable, r.error.unwrap_or_default()),
        Ok(None) => fail(
            Exit::Unavailable,
            "relayq is not running; start it with `relayq serve` (it delivers the queue at start)",
        ),
        Err(e) => fail(
            Exit::Unavailable,
            format!("{e:#} (only root and the relayq user may flush the queue)"),
        ),
    }
}

/// Maps a spool error to its exit code and a message naming the fix.
fn spool_fail(e: SpoolError) -> Fail {
    match e {
        SpoolError::Full => Fail(
            Exit::TempFail,
            "the spool is out of disk space; try again later".into(),
        ),
        SpoolError::Io { ref source, .. } => {
            use std::io::ErrorKind::*;
            let code = match source.kind() {
                PermissionDenied | ReadOnlyFilesystem | NotFound | NotADirectory | InvalidData => {
                    Exit::CantCreat
                }
                _ => Exit::TempFail,
            };
            Fail(code, format!("cannot store the message: {e}"))
        }
        other => Fail(Exit::Software, format!("cannot store the message: {other}")),
    }
}

/// Qualifies (`root` -> `root@myorigin`) and checks one address.
fn qualify(config: &Config, found: address::Found, what: &str) -> Result<String, Fail> {
    let Some(addr) = found else {
        return fail(
            Exit::NoUser,
            format!("bad {what}: a name without an address"),
        );
    };
    let addr = addr
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    let addr = if !addr.is_empty() && !addr.contains('@') {
        format!("{addr}@{}", config.myorigin())
    } else {
        addr
    };
    submit::check_address(&addr)
        .map_err(|why| Fail(Exit::NoUser, format!("bad {what} <{addr}>: {why}")))?;
    Ok(addr)
}

/// The envelope sender: `-f` when this user may choose it, else the
/// default (with a warning, so a silently changed sender is not a mystery).
fn sender(prog: &str, s: &Submitter, requested: Option<&str>) -> Result<String, Fail> {
    let Some(req) = requested else {
        return Ok(s.default_sender());
    };
    let req = req.trim();
    let wanted = if req.is_empty() || req == "<>" {
        String::new()
    } else {
        qualify(s.config(), Some(req.to_string()), "sender address")?
    };
    if s.trusted() {
        return Ok(wanted);
    }
    let forced = s.default_sender();
    if wanted != forced {
        eprintln!(
            "{prog}: warning: -f <{wanted}> ignored: user {} may not choose the envelope sender (see [sendmail] trusted_users); sending as <{forced}>",
            s.identity.name
        );
    }
    Ok(forced)
}

fn deliver(prog: &str, config: Config, opts: &Options) -> Result<(), Fail> {
    let limits = crate::cleanup::Limits::from_config(&config.smtp);
    let s = Submitter::new(config).map_err(spool_fail)?;
    let sender = sender(prog, &s, opts.sender.as_deref())
        .map_err(|f| refuse(&s, f, Reason::BadAddress, opts.sender.as_deref(), &[]))?;
    let mut recipients = Vec::new();
    for arg in &opts.recipients {
        for found in address::argument_recipients(arg) {
            let addr = qualify(s.config(), found, "recipient address")
                .map_err(|f| refuse(&s, f, Reason::BadAddress, Some(&sender), &recipients))?;
            recipients.push(addr);
        }
    }
    let stdin = std::io::stdin().lock();
    let content = stdin::read(BufReader::new(stdin), opts.ignore_dots, limits).map_err(|e| {
        let reason = match &e {
            stdin::InputError::Io(_) => return Fail(Exit::IoErr, e.to_string()),
            stdin::InputError::Refused(r) => r.reason(),
        };
        let f = Fail(Exit::DataErr, e.to_string());
        refuse(&s, f, reason, Some(&sender), &recipients)
    })?;
    if opts.extract {
        for found in address::header_recipients(&content) {
            let addr = qualify(s.config(), found, "recipient address in the header")
                .map_err(|f| refuse(&s, f, Reason::BadAddress, Some(&sender), &recipients))?;
            recipients.push(addr);
        }
    }
    let mut seen = std::collections::HashSet::new();
    recipients.retain(|r| seen.insert(r.clone()));
    if recipients.is_empty() {
        return fail(
            Exit::Usage,
            if opts.extract {
                "no recipients: the message has no To:, Cc: or Bcc: address (nor Resent-To:, Resent-Cc:, Resent-Bcc:) and none was given on the command line"
            } else {
                "no recipients: name them on the command line, or use -t to take them from To:, Cc: and Bcc:"
            },
        );
    }
    submit::check_recipients(s.config(), recipients.len()).map_err(|(reason, why)| {
        let f = Fail(Exit::DataErr, why);
        refuse(&s, f, reason, Some(&sender), &recipients)
    })?;
    // What SMTP answers 452 4.3.1: the queue needs the disk that is left.
    let min = s.config().smtp.min_free_space.0;
    if let Ok(free) = s.free_space()
        && free < min.saturating_add(content.len() as u64)
    {
        let f = Fail(
            Exit::TempFail,
            format!(
                "the spool is short of disk space: spool file system has only {free} bytes free, below smtp.min_free_space ({min}); try again later"
            ),
        );
        return Err(refuse(&s, f, Reason::DiskFull, Some(&sender), &recipients));
    }
    let full_name = opts
        .full_name
        .clone()
        .or_else(|| std::env::var("NAME").ok())
        .or_else(|| s.identity.full_name.clone());
    let rcpt_dsn = match opts.notify {
        Some(notify) => vec![
            crate::spool::RcptDsn {
                notify,
                orcpt: None,
            };
            recipients.len()
        ],
        None => Vec::new(),
    };
    let env = Envelope {
        sender: sender.clone(),
        recipients: recipients.clone(),
        dsn: crate::spool::Dsn {
            ret: opts.ret,
            envid: opts.envid.clone(),
        },
        rcpt_dsn,
        ..Envelope::default()
    };
    let stored = s.submit(env, content, full_name).map_err(|e| match e {
        SubmitError::Refused(r) => {
            let f = Fail(Exit::DataErr, r.to_string());
            refuse(&s, f, r.reason(), Some(&sender), &recipients)
        }
        SubmitError::Spool(e) => {
            let reason = match e {
                SpoolError::Full => Reason::DiskFull,
                _ => Reason::QueueError,
            };
            refuse(&s, spool_fail(e), reason, Some(&sender), &recipients)
        }
    })?;
    let woke = s.wake(&stored);
    if opts.verbose {
        let mut err = std::io::stderr().lock();
        let _ = match &stored {
            Submitted::Queued(id) => writeln!(err, "{prog}: queued as {id}"),
            Submitted::Dropped(name) => writeln!(
                err,
                "{prog}: left in the maildrop as {name}; the daemon assigns the queue id"
            ),
        };
        if !woke {
            let _ = writeln!(
                err,
                "{prog}: relayq is not running: the message will be delivered when it starts"
            );
        }
    }
    Ok(())
}

/// A refused message: the daemon logs and counts it like every refusal (a
/// stopped one cannot); the caller still gets the exit code and the line.
fn refuse(s: &Submitter, f: Fail, reason: Reason, from: Option<&str>, to: &[String]) -> Fail {
    s.report(&Rejection {
        stage: Stage::Sendmail,
        reason,
        reply: format!("{} (exit {})", f.1, f.0 as u8),
        from: from.map(str::to_string),
        to: to.to_vec(),
        detail: None,
        to_omitted: 0,
    });
    f
}

/// Local submission for `-bs`: the sender rule of the command line, then
/// the same route as a message on stdin.
struct BsSink {
    submitter: Submitter,
}

impl crate::smtp::session::LocalSink for BsSink {
    fn free_space(&self) -> std::io::Result<u64> {
        self.submitter.free_space()
    }

    fn submit(&self, mut env: Envelope, body: Vec<u8>) -> Result<String, SubmitError> {
        if !self.submitter.trusted() {
            env.sender = self.submitter.default_sender();
        }
        let name = self.submitter.identity.full_name.clone();
        let stored = self.submitter.submit(env, body, name)?;
        self.submitter.wake(&stored);
        Ok(stored.name().to_string())
    }

    fn rejected(&self, r: &Rejection) {
        self.submitter.report(r);
    }
}

/// `-bs`: an SMTP session on stdin/stdout, run by the inbound session code.
fn smtp(config: Config) -> Result<(), Fail> {
    let submitter = Submitter::new(config.clone()).map_err(spool_fail)?;
    // The session wants a spool handle for its context; a user without
    // access to the real one gets a private scratch spool that is never
    // written (messages go through the sink).
    let scratch = (!submitter.direct()).then(|| {
        std::env::temp_dir().join(format!(
            "relayq-bs.{}.{}",
            std::process::id(),
            crate::spool::Spool::new_id()
        ))
    });
    let spool_dir = scratch.clone().unwrap_or_else(|| config.spool_dir.clone());
    let result = (|| {
        let spool = crate::spool::Spool::open(&spool_dir).map_err(spool_fail)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Fail(Exit::Software, e.to_string()))?;
        rt.block_on(async {
            let clock = crate::clock::Clock::new();
            let (_scheduler, handle, _jobs) =
                crate::delivery::scheduler::Scheduler::new(spool.clone(), clock.clone(), 1);
            let ctx = Arc::new(crate::smtp::ServerContext {
                config: Arc::new(config),
                spool,
                clock,
                scheduler: handle,
                // -bs is a local pipe: no STARTTLS, no AUTH.
                tls: None,
                users: None,
                defenses: Default::default(),
            });
            let (_stop, shutdown) = tokio::sync::watch::channel(false);
            let io = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
            let sink = Arc::new(BsSink { submitter });
            crate::smtp::session::Session::new_local(io, ctx, shutdown, sink)
                .run()
                .await;
        });
        // Stdin is read on a blocking thread that may still wait for input
        // the client never sends after QUIT: do not wait for it.
        rt.shutdown_timeout(std::time::Duration::from_millis(100));
        Ok(())
    })();
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}
