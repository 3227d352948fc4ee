//! The `relayq` binary: subcommands, plus argv[0] dispatch so that a
//! `mailq` symlink behaves like Postfix's.

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
    /// default (127.0.0.1:2525, capture into ./relayq-data/Maildir) when
    /// that does not exist]
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
    /// Put a message on hold (like postsuper -h).
    Hold { id: String },
    /// Release a held message (like postsuper -H).
    Release { id: String },
    /// Delete a message (like postsuper -d).
    Delete { id: String },
    /// Retry a message now (like postsuper -r).
    Requeue { id: String },
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let result = if argv0 == "mailq" {
        run_queue(None, QueueAction::List { json: false })
    } else {
        run(Cli::parse())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
                None => println!("no config file: the development default is valid"),
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
        QueueAction::Flush => {
            let r = rt.block_on(cli::queue::to_daemon(&c, Request::Flush))?;
            println!(
                "flushed: {} deferred message(s) scheduled now",
                r.count.unwrap_or(0)
            );
            Ok(())
        }
        QueueAction::Hold { id } => rt.block_on(cli::queue::op(&c, &id, Op::Hold)),
        QueueAction::Release { id } => rt.block_on(cli::queue::op(&c, &id, Op::Release)),
        QueueAction::Delete { id } => rt.block_on(cli::queue::op(&c, &id, Op::Delete)),
        QueueAction::Requeue { id } => rt.block_on(cli::queue::op(&c, &id, Op::Requeue)),
    }
}
