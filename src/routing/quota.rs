//! Provider limits counted on this machine: messages per second, per hour
//! and per day, each in a rolling window (the last 60 minutes / 24 hours)
//! or a calendar one (this clock hour / this day in a time zone).
//!
//! A rolling window keeps the send times it counts (at most `limit` of
//! them: beyond that nothing more is allowed, so older ones are never
//! needed); a calendar window keeps a count and the period it belongs to.
//! A message counts when it is handed to the relay and is given back if the
//! relay never took it. These local windows are the limit when there is no
//! `limits_backend`, and a fleet's fallback (at `redis_fallback_share` of
//! each limit) while Redis is unreachable. Pure state: times are unix ms.

use std::collections::VecDeque;

use jiff::tz::TimeZone;
use jiff::{RoundMode, Timestamp, Unit, ZonedDateTimeRound};
use serde::{Deserialize, Serialize};

use super::config::QuotaWindow;
use crate::config::RelayConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Second,
    Hour,
    Day,
}

impl Period {
    pub fn label(self) -> &'static str {
        match self {
            Period::Second => "second",
            Period::Hour => "hour",
            Period::Day => "day",
        }
    }

    pub fn span_ms(self) -> u64 {
        match self {
            Period::Second => 1_000,
            Period::Hour => 3_600_000,
            Period::Day => 86_400_000,
        }
    }
}

/// One limit as configured.
#[derive(Debug, Clone)]
pub struct WindowSpec {
    pub period: Period,
    pub limit: u32,
    /// `Some` for a calendar window (its time zone); `None` for rolling.
    pub calendar: Option<TimeZone>,
}

impl WindowSpec {
    /// The limits of a relay. Per-second limits always roll.
    pub fn of(relay: &RelayConfig) -> Vec<WindowSpec> {
        let tz = match relay.window {
            QuotaWindow::Rolling => None,
            QuotaWindow::Calendar => Some(
                relay
                    .timezone
                    .as_deref()
                    .and_then(|name| TimeZone::get(name).ok())
                    .unwrap_or(TimeZone::UTC),
            ),
        };
        [
            (Period::Second, relay.messages_per_second, None),
            (Period::Hour, relay.messages_per_hour, tz.clone()),
            (Period::Day, relay.messages_per_day, tz),
        ]
        .into_iter()
        .filter_map(|(period, limit, calendar)| {
            limit.map(|limit| WindowSpec {
                period,
                limit,
                calendar,
            })
        })
        .collect()
    }

    /// The calendar period containing `now`: (start, end) in unix ms.
    pub fn bounds(&self, now: u64) -> Option<(u64, u64)> {
        let tz = self.calendar.clone()?;
        let ts = Timestamp::from_millisecond(i64::try_from(now).ok()?).ok()?;
        let z = ts.to_zoned_datetime(tz);
        let (start, end) = match self.period {
            Period::Day => (
                z.start_of_day().ok()?.timestamp(),
                z.tomorrow().ok()?.start_of_day().ok()?.timestamp(),
            ),
            Period::Hour | Period::Second => {
                let unit = if self.period == Period::Hour {
                    Unit::Hour
                } else {
                    Unit::Second
                };
                let start = z
                    .round(
                        ZonedDateTimeRound::new()
                            .smallest(unit)
                            .mode(RoundMode::Trunc),
                    )
                    .ok()?
                    .timestamp();
                let span = i64::try_from(self.period.span_ms()).ok()?;
                (
                    start,
                    Timestamp::from_millisecond(start.as_millisecond() + span).ok()?,
                )
            }
        };
        let ms = |t: Timestamp| u64::try_from(t.as_millisecond()).ok();
        Some((ms(start)?, ms(end)?))
    }

    /// "rolling" or "calendar Europe/Berlin", for listings.
    pub fn kind(&self) -> String {
        match &self.calendar {
            None => "rolling".into(),
            Some(tz) => format!("calendar {}", tz.iana_name().unwrap_or("UTC")),
        }
    }
}

/// The limit a share of `limit` allows: at least one message.
pub fn share_of(limit: u32, share: f64) -> u32 {
    if share >= 1.0 {
        return limit;
    }
    ((f64::from(limit) * share).floor() as u32).max(1)
}

/// One window's count.
#[derive(Debug, Clone)]
pub struct Window {
    pub spec: WindowSpec,
    /// Rolling: the send times counted, oldest first.
    log: VecDeque<u64>,
    /// Calendar: the period counted, and how many in it.
    period: (u64, u64),
    count: u32,
}

/// Why a message can't go now, and when it can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub period: Period,
    /// The limit that applied (a share of the configured one in fallback).
    pub limit: u32,
    pub resumes_at: u64,
}

impl Window {
    pub fn new(spec: WindowSpec) -> Window {
        Window {
            spec,
            log: VecDeque::new(),
            period: (0, 0),
            count: 0,
        }
    }

    fn roll(&mut self, now: u64) {
        match self.spec.bounds(now) {
            Some(bounds) => {
                if bounds != self.period {
                    self.period = bounds;
                    self.count = 0;
                }
            }
            None => {
                let horizon = now.saturating_sub(self.spec.period.span_ms());
                while self.log.front().is_some_and(|&t| t <= horizon) {
                    self.log.pop_front();
                }
            }
        }
    }

    pub fn used(&mut self, now: u64) -> u32 {
        self.roll(now);
        if self.spec.calendar.is_some() {
            self.count
        } else {
            u32::try_from(self.log.len()).unwrap_or(u32::MAX)
        }
    }

    /// When the count next goes down: the end of the calendar period, or
    /// when the oldest counted send leaves the rolling window.
    pub fn resets_at(&mut self, now: u64) -> Option<u64> {
        if self.used(now) == 0 {
            return None;
        }
        match self.spec.calendar {
            Some(_) => Some(self.period.1),
            None => self.log.front().map(|t| t + self.spec.period.span_ms()),
        }
    }

    /// Whether one more message fits under `limit`.
    pub fn check(&mut self, now: u64, limit: u32) -> Result<(), Denied> {
        let used = self.used(now);
        if used < limit {
            return Ok(());
        }
        let resumes_at = match self.spec.calendar {
            Some(_) => self.period.1,
            None => {
                // The send whose expiry brings the count under the limit.
                let idx = self.log.len().saturating_sub(limit as usize);
                self.log.get(idx).copied().unwrap_or(now) + self.spec.period.span_ms()
            }
        };
        Err(Denied {
            period: self.spec.period,
            limit,
            resumes_at: resumes_at.max(now + 1),
        })
    }

    pub fn add(&mut self, now: u64) {
        self.roll(now);
        if self.spec.calendar.is_some() {
            self.count = self.count.saturating_add(1);
            return;
        }
        // Kept sorted even if the wall clock stepped back.
        let at = self.log.partition_point(|&t| t <= now);
        self.log.insert(at, now);
        while self.log.len() > self.spec.limit as usize {
            self.log.pop_front();
        }
    }

    /// Gives back a message counted at `at` that the relay never took.
    pub fn remove(&mut self, at: u64) {
        if self.spec.calendar.is_some() {
            if self.period.0 <= at && at < self.period.1 {
                self.count = self.count.saturating_sub(1);
            }
        } else if let Some(pos) = self.log.iter().rposition(|&t| t == at) {
            self.log.remove(pos);
        }
    }

    /// The rolling log or the calendar count, for saving across restarts.
    pub fn saved(&self) -> SavedWindow {
        SavedWindow {
            period: self.spec.period,
            times: self.log.iter().copied().collect(),
            period_start: self.period.0,
            count: self.count,
        }
    }

    /// Restores what [`Window::saved`] wrote; entries that no longer count
    /// fall out on the next look.
    pub fn restore(&mut self, saved: &SavedWindow) {
        if self.spec.calendar.is_some() {
            if let Some(bounds) = self.spec.bounds(saved.period_start)
                && bounds.0 == saved.period_start
            {
                self.period = bounds;
                self.count = saved.count;
            }
        } else {
            for &t in &saved.times {
                self.add(t);
            }
        }
    }
}

/// A window as saved in `limits.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedWindow {
    pub period: Period,
    #[serde(default)]
    pub times: Vec<u64>,
    #[serde(default)]
    pub period_start: u64,
    #[serde(default)]
    pub count: u32,
}

/// All limits of one relay.
#[derive(Debug, Clone)]
pub struct Quota {
    pub windows: Vec<Window>,
}

impl Quota {
    pub fn new(specs: Vec<WindowSpec>) -> Quota {
        Quota {
            windows: specs.into_iter().map(Window::new).collect(),
        }
    }

    pub fn is_limited(&self) -> bool {
        !self.windows.is_empty()
    }

    /// Whether a message fits every window at `share` of its limit. When
    /// several windows are full, the latest reopening is the one to wait for.
    pub fn check(&mut self, now: u64, share: f64) -> Result<(), Denied> {
        let mut worst: Option<Denied> = None;
        for w in &mut self.windows {
            let limit = share_of(w.spec.limit, share);
            if let Err(d) = w.check(now, limit)
                && worst.as_ref().is_none_or(|x| d.resumes_at > x.resumes_at)
            {
                worst = Some(d);
            }
        }
        worst.map_or(Ok(()), Err)
    }

    /// Counts a message sent at `now`.
    pub fn add(&mut self, now: u64) {
        for w in &mut self.windows {
            w.add(now);
        }
    }

    /// [`Quota::check`] then [`Quota::add`].
    pub fn take(&mut self, now: u64, share: f64) -> Result<(), Denied> {
        self.check(now, share)?;
        self.add(now);
        Ok(())
    }

    pub fn give_back(&mut self, at: u64) {
        for w in &mut self.windows {
            w.remove(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    fn rolling(period: Period, limit: u32) -> Window {
        Window::new(WindowSpec {
            period,
            limit,
            calendar: None,
        })
    }

    #[test]
    fn rolling_day_window() {
        let mut w = rolling(Period::Day, 3);
        let t0 = 1_000_000_000_000;
        for i in 0..3 {
            assert!(w.check(t0 + i * H, 3).is_ok());
            w.add(t0 + i * H);
        }
        let d = w.check(t0 + 5 * H, 3).unwrap_err();
        // The first send leaves the window 24h after it was counted.
        assert_eq!(d.resumes_at, t0 + 24 * H);
        assert_eq!(w.resets_at(t0 + 5 * H), Some(t0 + 24 * H));
        assert!(w.check(t0 + 24 * H, 3).is_ok());
        assert_eq!(w.used(t0 + 24 * H), 2);
        // A share of the limit: with one allowed, the next slot is later.
        let d = w.check(t0 + 24 * H, 1).unwrap_err();
        assert_eq!(d.resumes_at, t0 + 26 * H);
        // Giving back makes room at once.
        w.remove(t0 + 2 * H);
        assert!(w.check(t0 + 24 * H, 2).is_ok());
    }

    #[test]
    fn calendar_day_in_a_time_zone() {
        let spec = WindowSpec {
            period: Period::Day,
            limit: 2,
            calendar: Some(TimeZone::get("Europe/Berlin").unwrap()),
        };
        // 2026-01-15 22:30 UTC is 23:30 in Berlin (UTC+1): the day ends
        // at 23:00 UTC.
        let now: u64 = "2026-01-15T22:30:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_millisecond() as u64;
        let end: u64 = "2026-01-15T23:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_millisecond() as u64;
        assert_eq!(spec.bounds(now).unwrap().1, end);
        let mut w = Window::new(spec);
        w.add(now);
        w.add(now + 1);
        let d = w.check(now + 2, 2).unwrap_err();
        assert_eq!(d.resumes_at, end);
        assert!(w.check(end, 2).is_ok(), "a new day starts from zero");
        assert_eq!(w.used(end), 0);
        // Summer time: midnight in Berlin is 22:00 UTC.
        let summer: u64 = "2026-07-01T12:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_millisecond() as u64;
        let (start, end) = w.spec.bounds(summer).unwrap();
        assert_eq!(end - start, 24 * H);
        assert_eq!(
            Timestamp::from_millisecond(start as i64)
                .unwrap()
                .to_string(),
            "2026-06-30T22:00:00Z"
        );
    }

    #[test]
    fn calendar_hour_and_per_second() {
        let spec = WindowSpec {
            period: Period::Hour,
            limit: 1,
            calendar: Some(TimeZone::get("Asia/Kolkata").unwrap()),
        };
        // Kolkata is UTC+5:30, so its hours begin at half past in UTC.
        let now: u64 = "2026-03-01T10:10:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_millisecond() as u64;
        let (start, end) = spec.bounds(now).unwrap();
        assert_eq!(
            Timestamp::from_millisecond(start as i64)
                .unwrap()
                .to_string(),
            "2026-03-01T09:30:00Z"
        );
        assert_eq!(end - start, H);
        let mut q = Quota::new(vec![
            WindowSpec {
                period: Period::Second,
                limit: 2,
                calendar: None,
            },
            spec,
        ]);
        assert!(q.take(now, 1.0).is_ok());
        let d = q.take(now + 10, 1.0).unwrap_err();
        assert_eq!((d.period, d.resumes_at), (Period::Hour, end));
        // Given back: the hour has room again.
        q.give_back(now);
        assert!(q.take(now + 20, 1.0).is_ok());
    }

    #[test]
    fn shares_and_saving() {
        assert_eq!(share_of(500, 0.5), 250);
        assert_eq!(share_of(3, 0.1), 1);
        assert_eq!(share_of(7, 1.0), 7);
        let mut w = rolling(Period::Hour, 5);
        w.add(10);
        w.add(20);
        let saved = w.saved();
        let mut again = rolling(Period::Hour, 5);
        again.restore(&saved);
        assert_eq!(again.used(30), 2);
        assert_eq!(again.used(10 + H), 1);
    }
}
