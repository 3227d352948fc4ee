//! The `relayq` binary: subcommands, plus argv[0] dispatch so that
//! `mailq` and `sendmail` symlinks behave like Postfix's.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use relayq::cli;
use relayq::control::{Op, Request};

#[derive(Parser)]
#[command(
    name = "relayq",
    version,
    about = "A local relay MTA: accept on loopback, queue durably, relay to your provider"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// Config file [default: /etc/relayq/relayq.toml, or the development
    /// default (127.0.0.1:2525, capture into ~/.local/state/relayq/Maildir)
    /// when that does not exist]
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: accept mail by SMTP and deliver the queue.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the config file and exit (0 when valid).
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check the config, the spool, the listen addresses and the relay
    /// (DNS, TCP, EHLO, TLS, AUTH); one line per check, exit 0 only if all
    /// pass.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Also send a real test message to ADDR through the relay and print
        /// the relay's reply.
        #[arg(long, value_name = "ADDR")]
        send_to: Option<String>,
        /// Envelope sender and From: of the test message
        /// [default: postmaster@<hostname>].
        #[arg(long, value_name = "ADDR", requires = "send_to")]
        from: Option<String>,
    },
    /// Look at and manage the queue (like postqueue and postsuper).
    Queue {
        #[command(flatten)]
        config: ConfigArg,
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Print an argon2 hash of a password read from stdin, for
    /// smtp.auth_users_file lines (`user:HASH`).
    HashPassword,
    /// The sendmail command (also as a `sendmail` symlink): reads a message
    /// on stdin and queues it. Flags as Postfix's: -t -i -f -F -bs -bp -q...
    Sendmail {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Test support: move the daemon's clock forward (needs the daemon to
    /// run with RELAYQ_TEST_CLOCK=1).
    #[command(hide = true)]
    ClockAdvance {
        #[command(flatten)]
        config: ConfigArg,
        secs: u64,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// List queued messages (like mailq / postqueue -p).
    List {
        /// One JSON object per message, like postqueue -j.
        #[arg(long)]
        json: bool,
    },
    /// Retry every deferred message now (like postqueue -f).
    Flush,
    /// Show a message's envelope, recipients and headers (like postcat -eh).
    Show { id: String },
    /// Put messages on hold (like postsuper -h); ALL for every one.
    Hold {
        #[arg(required = true, value_name = "ID|ALL")]
        ids: Vec<String>,
    },
    /// Release held messages (like postsuper -H); ALL for every one.
    Release {
        #[arg(required = true, value_name = "ID|ALL")]
        ids: Vec<String>,
    },
    /// Delete messages (like postsuper -d); ALL empties the queue.
    Delete {
        #[arg(required = true, value_name = "ID|ALL")]
        ids: Vec<String>,
    },
    /// Retry messages now (like postsuper -r); ALL for every one.
    Requeue {
        #[arg(required = true, value_name = "ID|ALL")]
        ids: Vec<String>,
    },
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // sendmail's flags (-oi, -F name, -bs) are not clap's: parse them
    // before clap sees them.
    if argv0 == "sendmail" {
        return cli::sendmail::main("sendmail", args.split_off(1.min(args.len())));
    }
    if args.get(1).is_some_and(|a| a == "sendmail") {
        return cli::sendmail::main("sendmail", args.split_off(2));
    }
    let result = if argv0 == "mailq" {
        run_queue(None, QueueAction::List { json: false })
    } else {
        run(Cli::parse())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `relayq queue list | head`: the reader went away, which is not
        // an error worth a message (Postfix's mailq is silent too).
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relayq: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = cli::load_config(config.config.as_deref())?;
            relayq::observe::init(config.log_format);
            runtime()?.block_on(cli::serve::run(config))
        }
        Command::CheckConfig { config } => {
            let c = cli::load_config(config.config.as_deref())?;
            match &c.source {
                Some(p) => println!("{}: ok", p.display()),
                None => println!(
                    "no config file ({} not found): the development default is valid; mail is captured into {}",
                    relayq::config::DEFAULT_CONFIG_PATH,
                    c.capture
                        .as_ref()
                        .map(|m| m.maildir.display().to_string())
                        .unwrap_or_default()
                ),
            }
            Ok(())
        }
        Command::Check {
            config,
            send_to,
            from,
        } => {
            let opts = cli::check::Options {
                config: config.config,
                send_to,
                from,
            };
            if runtime()?.block_on(cli::check::main(&opts)) {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "some checks failed; change what each FAIL line says, then run relayq check again"
                ))
            }
        }
        Command::Queue { config, action } => run_queue(config.config, action),
        Command::HashPassword => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                anyhow::bail!(
                    "no password on standard input; use: echo -n 'secret' | relayq hash-password"
                );
            }
            let hash =
                relayq::smtp::auth::hash_password(password).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{hash}");
            Ok(())
        }
        // Normally dispatched in main() before clap; kept for completeness.
        Command::Sendmail { args } => {
            std::process::exit(i32::from(cli::sendmail::exit_code("sendmail", args)))
        }
        Command::ClockAdvance { config, secs } => {
            let c = cli::load_config(config.config.as_deref())?;
            runtime()?.block_on(cli::queue::to_daemon(&c, Request::ClockAdvance { secs }))?;
            Ok(())
        }
    }
}

fn run_queue(config: Option<PathBuf>, action: QueueAction) -> anyhow::Result<()> {
    let c = cli::load_config(config.as_deref())?;
    let rt = runtime()?;
    match action {
        QueueAction::List { json } => cli::queue::list(&c, json, &mut std::io::stdout().lock()),
        QueueAction::Flush => rt.block_on(cli::queue::flush(&c, &mut std::io::stdout())),
        QueueAction::Show { id } => cli::queue::show(&c, &id, &mut std::io::stdout().lock()),
        QueueAction::Hold { ids } => {
            rt.block_on(cli::queue::op(&c, &ids, Op::Hold, &mut std::io::stdout()))
        }
        QueueAction::Release { ids } => rt.block_on(cli::queue::op(
            &c,
            &ids,
            Op::Release,
            &mut std::io::stdout(),
        )),
        QueueAction::Delete { ids } => {
            rt.block_on(cli::queue::op(&c, &ids, Op::Delete, &mut std::io::stdout()))
        }
        QueueAction::Requeue { ids } => rt.block_on(cli::queue::op(
            &c,
            &ids,
            Op::Requeue,
            &mut std::io::stdout(),
        )),
    }
}
