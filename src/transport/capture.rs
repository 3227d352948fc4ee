//! The capture transport: every message lands as one file in a Maildir
//! (`new/`), with the envelope recorded in `Return-Path:` and
//! `Delivered-To:` headers, so a developer can open what their app sent.
//! The file is written in `tmp/`, fsynced, renamed into `new/`, and `new/`
//! is fsynced: a captured message survives a crash like a relayed one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::delivery::outcome::{AttemptReport, RcptOutcome};
use crate::spool::Meta;

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

pub struct CaptureSender {
    maildir: PathBuf,
    hostname: String,
}

impl CaptureSender {
    pub fn new(config: &Arc<Config>) -> anyhow::Result<CaptureSender> {
        let maildir = config
            .capture
            .as_ref()
            .map(|c| c.maildir.clone())
            .ok_or_else(|| {
                anyhow::anyhow!("the capture transport needs [capture] maildir = \"...\"")
            })?;
        for sub in ["tmp", "new", "cur"] {
            let dir = maildir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| {
                    anyhow::anyhow!("cannot create Maildir folder {}: {e}", dir.display())
                })?;
        }
        Ok(CaptureSender {
            maildir,
            hostname: config.hostname.replace(['/', ':'], "_"),
        })
    }

    pub async fn deliver(&mut self, meta: &Meta, body: &[u8], rcpts: &[usize]) -> AttemptReport {
        let started = Instant::now();
        let mut head = format!("Return-Path: <{}>\r\n", meta.sender);
        for &i in rcpts {
            if let Some(r) = meta.recipients.get(i) {
                head.push_str(&format!("Delivered-To: {}\r\n", r.address));
            }
        }
        let name = format!(
            "{}.{}_{}.{}",
            crate::clock::to_ms(std::time::SystemTime::now()) / 1000,
            meta.id,
            SEQUENCE.fetch_add(1, Ordering::Relaxed),
            self.hostname
        );
        let maildir = self.maildir.clone();
        let mut content = head.into_bytes();
        content.extend_from_slice(body);
        let written = tokio::task::spawn_blocking(move || write_maildir(&maildir, &name, &content))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        let outcome = match &written {
            Ok(path) => RcptOutcome::Delivered {
                reply: format!("250 2.0.0 Ok: captured as {}", path.display()),
            },
            Err(e) => RcptOutcome::Deferred {
                reason: format!("cannot write to Maildir {}: {e}", self.maildir.display()),
                status: if e.raw_os_error() == Some(libc::ENOSPC) {
                    "4.3.1".into()
                } else {
                    "4.3.0".into()
                },
            },
        };
        AttemptReport {
            relay: format!("maildir:{}", self.maildir.display()),
            results: rcpts.iter().map(|&i| (i, outcome.clone())).collect(),
            conn_time: Duration::ZERO,
            xfer_time: started.elapsed(),
            final_delivery: true,
            ..AttemptReport::default()
        }
    }
}

fn write_maildir(maildir: &Path, name: &str, content: &[u8]) -> std::io::Result<PathBuf> {
    let tmp = maildir.join("tmp").join(name);
    let new = maildir.join("new").join(name);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(content)?;
    f.sync_data()?;
    fs::rename(&tmp, &new)?;
    fs::File::open(maildir.join("new"))?.sync_all()?;
    Ok(new)
}
