//! Counting a message against a relay's limits before it is handed over:
//! locally, or fleet-wide in Redis with the local share as the fallback
//! while Redis is unreachable (and the log lines saying so).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::fleet::Answer;
use super::fmt_time;
use super::quota::{Denied, Period, share_of};
use super::route::RelayId;
use super::router::{RelayEntry, Router};

/// How long the router leaves Redis alone after it failed.
const FLEET_RETRY_MS: u64 = 5_000;

/// A message counted against a relay's limits, to give back if the relay
/// does not take it.
pub(super) struct Ticket {
    pub(super) at: u64,
    /// Counted in Redis under this member too.
    pub(super) member: Option<String>,
}

impl Router {
    /// Counts the message against the relay's limits, or says why not and
    /// until when. Per-second limits are waited out here (at most a second
    /// at a time) rather than sending the message back to the queue.
    pub(super) async fn reserve(&self, id: RelayId) -> Result<Ticket, (String, u64)> {
        for _ in 0..5 {
            let now = self.clock.now_ms();
            match self.reserve_once(id, now).await {
                Err((d, _)) if d.period == Period::Second && d.resumes_at <= now + 1_000 => {
                    tokio::time::sleep(Duration::from_millis(d.resumes_at - now)).await;
                }
                Err((d, text)) => return Err((text, d.resumes_at)),
                Ok(t) => return Ok(t),
            }
        }
        let now = self.clock.now_ms();
        self.reserve_once(id, now)
            .await
            .map_err(|(d, text)| (text, d.resumes_at))
    }

    pub(super) async fn reserve_once(
        &self,
        id: RelayId,
        now: u64,
    ) -> Result<Ticket, (Denied, String)> {
        let relay = &self.relays[id];
        if relay.specs.is_empty() {
            return Ok(Ticket {
                at: now,
                member: None,
            });
        }
        if let Some(fleet) = &self.fleet
            && self.fleet_usable(now)
        {
            let cached = relay.state().fleet_full.clone();
            if let Some(d) = cached.filter(|d| d.resumes_at > now) {
                let text = self.quota_text(relay, &d, false);
                return Err((d, text));
            }
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            let member = format!(
                "{now}-{}-{seq}-{:08x}",
                std::process::id(),
                fastrand::u32(..)
            );
            match fleet.acquire(&relay.name, &relay.specs, now, &member).await {
                Ok(Answer::Granted { used }) => {
                    self.fleet_ok(now);
                    let mut st = relay.state();
                    st.quota.add(now);
                    st.fleet_used = Some(used);
                    st.fleet_full = None;
                    self.dirty.store(true, Ordering::Relaxed);
                    return Ok(Ticket {
                        at: now,
                        member: Some(member),
                    });
                }
                Ok(Answer::Denied {
                    index,
                    resumes_at,
                    used,
                }) => {
                    self.fleet_ok(now);
                    let spec = &relay.specs[index.min(relay.specs.len() - 1)];
                    let d = Denied {
                        period: spec.period,
                        limit: spec.limit,
                        resumes_at,
                    };
                    let mut st = relay.state();
                    st.fleet_used = Some(used);
                    st.fleet_full = Some(d.clone());
                    drop(st);
                    let text = self.quota_text(relay, &d, false);
                    return Err((d, text));
                }
                Err(e) => self.fleet_failed(now, &e, fleet.display()),
            }
        }
        let share = if self.fleet.is_some() {
            self.share
        } else {
            1.0
        };
        let taken = relay.state().quota.take(now, share);
        match taken {
            Ok(()) => {
                self.dirty.store(true, Ordering::Relaxed);
                Ok(Ticket {
                    at: now,
                    member: None,
                })
            }
            Err(d) => {
                let text = self.quota_text(relay, &d, self.fleet.is_some());
                Err((d, text))
            }
        }
    }

    pub(super) async fn give_back(&self, id: RelayId, ticket: Ticket) {
        let relay = &self.relays[id];
        if relay.specs.is_empty() {
            return;
        }
        relay.state().quota.give_back(ticket.at);
        self.dirty.store(true, Ordering::Relaxed);
        if let (Some(fleet), Some(member)) = (&self.fleet, ticket.member) {
            // If Redis is gone now, the slot stays used until it expires:
            // erring on the side of sending less.
            let _ = fleet
                .release(&relay.name, &relay.specs, ticket.at, &member)
                .await;
        }
    }

    /// "quota: 500/day reached, resumes at ..." (the brief, greppable form).
    fn quota_text(&self, relay: &RelayEntry, d: &Denied, fallback: bool) -> String {
        let tz = relay
            .specs
            .iter()
            .find(|s| s.period == d.period)
            .and_then(|s| s.calendar.clone());
        let limit = if fallback {
            let full = relay
                .specs
                .iter()
                .find(|s| s.period == d.period)
                .map_or(d.limit, |s| s.limit);
            format!(
                "{}/{} (local share {:.0}% of {full}/{}: Redis unreachable)",
                d.limit,
                d.period.label(),
                self.share * 100.0,
                d.period.label()
            )
        } else {
            format!("{}/{}", d.limit, d.period.label())
        };
        format!(
            "quota: {limit} reached, resumes at {}",
            fmt_time(d.resumes_at, tz.as_ref())
        )
    }

    fn fleet_usable(&self, now: u64) -> bool {
        let st = self.fleet_state();
        st.down_since.is_none() || now >= st.retry_at
    }

    fn fleet_ok(&self, now: u64) {
        let mut st = self.fleet_state();
        if let Some(since) = st.down_since.take() {
            let backend = self.fleet.as_ref().map_or("", |f| f.display());
            tracing::info!(
                target: "relayq::routing",
                "limits backend {backend} is reachable again after {}s; limits are shared by the fleet again",
                now.saturating_sub(since) / 1000
            );
        }
    }

    fn fleet_failed(&self, now: u64, error: &str, backend: &str) {
        let mut st = self.fleet_state();
        st.retry_at = now + FLEET_RETRY_MS;
        if st.down_since.is_some() {
            return;
        }
        st.down_since = Some(now);
        drop(st);
        let shares: Vec<String> = self
            .relays
            .iter()
            .flat_map(|r| {
                r.specs.iter().map(move |s| {
                    format!(
                        "{} {}/{}",
                        r.name,
                        share_of(s.limit, self.share),
                        s.period.label()
                    )
                })
            })
            .collect();
        tracing::warn!(
            target: "relayq::routing",
            "limits backend {backend} is unreachable ({error}); falling back to local limits at {:.0}% of each limit ({}) until it is back",
            self.share * 100.0,
            shares.join(", ")
        );
    }
}
