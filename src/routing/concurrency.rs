//! One relay's concurrency: how many connections relayq may have open to
//! it at once, adapted to how it answers, like Postfix's destination
//! concurrency feedback and TCP's congestion window (additive increase,
//! multiplicative decrease).
//!
//! A relay 2 ms away drains a backlog with two connections; one 80 ms away
//! needs thirty; some allow only a few. So the number is learned, within
//! `max_connections` (the hard cap):
//!
//! - **Start** at [`INITIAL`] connections.
//! - **Grow** while mail waits and the relay answers well: each round of a
//!   connection (a message delivered; with BDAT streams, as many as were
//!   in flight on it; or a new connection let in) while every allowed
//!   connection is busy (and no more: connections a cut has not closed
//!   yet don't count) and more mail is ready earns one connection, until
//!   the first sign of pushback; after that, one connection per round of
//!   all of them. Until then (slow start) the connections a level earned
//!   are opened together once its rate is measured (8 rounds, one of
//!   each connection at least): 4, 12, 24, about doubling per round
//!   trip, and each level passed is one the next can be compared with
//!   (a connection let in measures nothing, and in slow start earns
//!   nothing).
//! - **Back off** on pushback. A relay that refuses one more connection
//!   ("421 4.7.0 Too many connections", a `454` to AUTH) while others are
//!   open has said what it allows: concurrency drops to the connections it
//!   still serves (as it counted them: not those being opened and refused
//!   with it, `transport::openings`) and stays at most there for
//!   [`CEILING_HOLD_MS`] before trying one more. A connection that cannot
//!   be opened (refused, timed out), a `421` on a connection in use, or a
//!   delivery rate per connection that fell by more than concurrency rose
//!   (more connections, less mail delivered in total) halves it; for the
//!   rate, only once the fall has lasted [`RATE_HOLD_MS`] (growth waits
//!   meanwhile) and is
//!   bigger than the noise of the rounds measured (a level measured over
//!   a few rounds is a rough figure), and only
//!   down to the level that delivered the most, if that is higher (the
//!   rate swings on a busy machine, and a total that wobbles looks like a
//!   fall from the level just below). Only one halving per round:
//!   an attempt that started before the last cut does not cut again, nor
//!   does a delivery on a connection the cut has not closed yet (TCP
//!   reacts once per window of losses the same way). The rate is measured
//!   per round of a connection: a stream's replies come together, the
//!   first after a round trip, the others at once. A new connection's
//!   rounds count from when it is ready (`Lease::set_up`): its connect,
//!   TLS and login are not a slow delivery; nor is it one of the level
//!   (connections at work) whose rate the others measure until then.
//! - **Idle**: once a relay has had no connection open for a while (its
//!   connections close after `idle_timeout`), the next burst starts again
//!   from [`INITIAL`], down from growth or up from a cut, as Postfix
//!   forgets an idle destination (a limit the relay stated still holds
//!   while it lasts).
//!
//! With `concurrency = N` in the config the number is fixed at N instead.
//!
//! When no other connection to the relay works, pushback is the relay
//! being down or throttling us: the circuit breaker (`health`) handles it,
//! not this. Pure state: times are passed in (unix ms), so tests step
//! through it with an injected clock.

use serde::{Deserialize, Serialize};

/// Connections an adaptive relay starts with (Postfix's
/// `initial_destination_concurrency` is 5).
pub const INITIAL: usize = 4;
/// How long a relay's refusal of one more connection keeps concurrency
/// at most at the connections it served then.
pub const CEILING_HOLD_MS: u64 = 5 * 60_000;
/// The multiplicative decrease.
const BACKOFF: f64 = 0.5;
/// Delivery-rate samples older than this are not compared.
const RATE_MEMORY_MS: u64 = 30_000;
/// Samples at a level before its rate is trusted.
const RATE_SAMPLES: u32 = 8;
/// Total throughput at more connections must stay above this share of
/// the best seen at fewer, or concurrency backs off.
const RATE_MARGIN: f64 = 0.9;
/// A level's average spans about this many rounds of each of its
/// connections.
const RATE_ROUNDS: f64 = 5.0;
/// How long a fall must last, every round at the level showing it, before
/// it cuts.
pub const RATE_HOLD_MS: u64 = 1_000;
/// Standard errors by which a fall must exceed [`RATE_MARGIN`]: a level
/// measured over a few noisy rounds is compared only for a fall bigger
/// than its noise.
const RATE_CONFIDENCE: f64 = 2.0;

/// Why concurrency last changed, as a short word for metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Adaptive, at its starting point.
    Start,
    /// Set by `concurrency = N`.
    Fixed,
    /// Grew: mail waiting and the relay answering well.
    Backlog,
    /// The relay refused one more connection while others were open.
    Refused,
    /// A connection failed (refused, timed out) while others worked.
    Failed,
    /// A 421 on a connection in use while others worked.
    Throttled,
    /// The delivery rate per connection fell by more than concurrency rose.
    Rate,
    /// No connection for a while: back to the start.
    Idle,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::Fixed => "fixed",
            Reason::Backlog => "backlog",
            Reason::Refused => "refused",
            Reason::Failed => "failed",
            Reason::Throttled => "throttled",
            Reason::Rate => "rate",
            Reason::Idle => "idle",
        }
    }

    pub const ALL: [Reason; 8] = [
        Reason::Start,
        Reason::Fixed,
        Reason::Backlog,
        Reason::Refused,
        Reason::Failed,
        Reason::Throttled,
        Reason::Rate,
        Reason::Idle,
    ];
}

/// The last change of a relay's concurrency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// When (unix ms).
    pub at_ms: u64,
    pub from: usize,
    pub to: usize,
    pub reason: Reason,
    /// For people: "3 -> 4: mail waiting and the relay answering well".
    pub text: String,
}

/// A sign that the relay wants fewer connections from us, seen while
/// other connections to it work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushback {
    /// It refused one more connection (`421`, `454`, "too many ...") while
    /// `open` others were open (as it counted them: those let as far as
    /// the refused one got): what it allows.
    Refused { open: usize, error: String },
    /// A connection could not be opened (refused, timed out).
    Failed { error: String },
    /// A `421` on a connection in use.
    Throttled { error: String },
}

/// A message delivered, as the concurrency sees it.
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    /// Connections in use, this one included, and those being opened.
    pub busy: usize,
    /// Connections at work on mail, this one included: in use and ready
    /// (logged in), not being opened. The level whose rate this measures.
    pub working: usize,
    /// The time its connection spent on it, if the connection worked on
    /// nothing else meanwhile (with several in flight, the time since the
    /// connection's previous message was answered).
    pub spent: Option<std::time::Duration>,
    /// Messages in flight on its connection when it was answered, itself
    /// included (BDAT streams carry several): that many deliveries are one
    /// round of the connection.
    pub in_flight: usize,
    /// More mail is ready for the relay than its connections carry.
    pub backlog: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Rate {
    /// Average time a connection spent per message, ms.
    ms: f64,
    /// Variance of a round's time about `ms`, weighted as `ms` is, ms².
    var: f64,
    /// Rounds averaged into `ms`.
    samples: u32,
    /// The last message's time (unix ms; 0: none yet).
    at_ms: u64,
    /// Messages of the round being gathered, and their time.
    pending: u32,
    pending_ms: f64,
}

#[derive(Debug, Clone)]
pub struct Concurrency {
    adaptive: bool,
    max: usize,
    window: f64,
    /// Below it, growth is one connection per delivery (slow start).
    threshold: f64,
    /// A limit the relay stated by refusing one more connection, and
    /// until when it holds.
    ceiling: Option<(usize, u64)>,
    /// Counts cuts; an attempt remembers the value it started under.
    generation: u64,
    last: Change,
    /// Per number of busy connections.
    rates: Vec<Rate>,
    /// Since when (unix ms) the rate has shown a fall, round after round,
    /// and when it last did.
    falling: Option<(u64, u64)>,
    /// The level being measured in slow start, and the rounds of its
    /// connections measured at it so far.
    measuring: (usize, f64),
    /// Growth earned in slow start at that level, applied once it is
    /// measured.
    credit: f64,
}

impl Concurrency {
    /// Adaptive, from [`INITIAL`] up to `max`.
    pub fn adaptive(max: usize, now: u64) -> Concurrency {
        let max = max.max(1);
        let start = INITIAL.min(max);
        Concurrency::with(
            true,
            max,
            start,
            now,
            Reason::Start,
            format!(
                "{start}: starting point; grows up to {max} while mail waits and the relay answers well"
            ),
        )
    }

    /// Fixed at `n` (`concurrency = n`).
    pub fn fixed(n: usize, now: u64) -> Concurrency {
        let n = n.max(1);
        Concurrency::with(
            false,
            n,
            n,
            now,
            Reason::Fixed,
            format!("{n}: fixed by concurrency = {n}"),
        )
    }

    fn with(
        adaptive: bool,
        max: usize,
        start: usize,
        now: u64,
        reason: Reason,
        text: String,
    ) -> Concurrency {
        Concurrency {
            adaptive,
            max,
            window: start as f64,
            threshold: max as f64,
            ceiling: None,
            generation: 0,
            last: Change {
                at_ms: now,
                from: start,
                to: start,
                reason,
                text,
            },
            rates: vec![Rate::default(); max + 1],
            falling: None,
            measuring: (start, 0.0),
            credit: 0.0,
        }
    }

    /// Connections allowed now.
    pub fn limit(&self) -> usize {
        (self.window.floor() as usize).clamp(1, self.max)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn is_adaptive(&self) -> bool {
        self.adaptive
    }

    pub fn last_change(&self) -> &Change {
        &self.last
    }

    /// What an attempt remembers when it starts, for [`Concurrency::pushback`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A message was delivered.
    pub fn delivered(&mut self, now: u64, d: Delivered) -> Option<Change> {
        let Delivered {
            busy,
            working,
            spent,
            in_flight,
            backlog,
        } = d;
        if !self.adaptive {
            return None;
        }
        let before = self.limit();
        // Whatever changed the level (growth, a cut, idleness), what was
        // measured and earned at the old one is not this one's.
        if self.measuring.0 != before {
            self.measuring = (before, 0.0);
            self.credit = 0.0;
        }
        // Connections over the limit are the ones a cut has not closed
        // yet: what they deliver measures a level given up on, and must
        // not cut again before the cut took effect (once per round).
        if let Some(spent) = spent.filter(|_| busy <= before) {
            // The level is the connections at work: ones being opened
            // carry nothing yet. Counted, the connections slow start opens
            // together made the ones at work look like a higher level,
            // delivering as fast as fewer do, and the level reached then
            // looked like a fall from it (Postfix's smtpd 5 ms away:
            // "1260/s at 16, 606/s at 25", a cut in two rounds of six).
            let level = working.clamp(1, busy);
            self.sample(now, level, spent.as_secs_f64() * 1000.0, in_flight);
            // Slow start's rounds at the level count whenever all it allows
            // are in use, as growth itself needs, some still being opened
            // or not: counting only those with every connection at work,
            // a burst that the connections drain about as fast as it comes
            // (5 ms away) seldom had them all at work at once, and sat
            // at 12 for part of it.
            if busy == before {
                self.measuring.1 += 1.0 / in_flight.max(1) as f64;
            }
            // Only the level allowed now is judged: a delivery while a
            // connection is between messages (one level below) says how
            // that level does, not whether this one fell. Judged, it
            // forgot a lasting fall at the top each time it held.
            let verdict = match level == before {
                true => self.rate_fell(now, level),
                false => Verdict::Unknown,
            };
            match verdict {
                Verdict::Unknown => {}
                Verdict::Holds => self.falling = None,
                Verdict::Fell { best, text } => {
                    // A fall must last: on a machine busy with other work
                    // the rate per connection swings from one round to the
                    // next, and the best level below is the luckiest of
                    // several measures. Cutting on a passing dip drifted
                    // a 20,000-message burst 5 ms away from 25 connections
                    // down to 7. Growth waits meanwhile: more connections
                    // would only deepen a real fall.
                    //
                    // A fall not seen for longer than a round of the level
                    // (a lull: deliveries only at levels not measured) starts
                    // its hold again: a dip long ago must not make the next
                    // one cut at once.
                    let gap = (RATE_HOLD_MS as f64).max(2.0 * self.rates[level].ms) as u64;
                    let since = match self.falling {
                        Some((since, seen)) if now.saturating_sub(seen) <= gap => since,
                        _ => now,
                    };
                    self.falling = Some((since, now));
                    if now.saturating_sub(since) < RATE_HOLD_MS {
                        return None;
                    }
                    // Back to the level that delivered the most, at most
                    // half: the rate says where the relay did best. A total
                    // that wobbles near the top looks like a fall from the
                    // level just below; halving for that gave away half the
                    // connections again and again, going back to that level
                    // costs one.
                    let to = (best as f64).max(self.window * BACKOFF).max(1.0);
                    return self.lower_to(now, before, to, Reason::Rate, text);
                }
            }
        }
        let cap = match self.ceiling {
            Some((limit, until)) if until > now => limit.min(self.max),
            _ => self.max,
        };
        // Growth only while exactly the allowed connections are busy:
        // fewer, and mail does not need more; more are the ones a cut has
        // not closed yet, delivering for a level given up on (growing on
        // their deliveries would undo the cut before it took effect).
        if !backlog || busy != before || before >= cap {
            return None;
        }
        // One step per round of each connection: a connection that
        // carries several messages at once takes that many deliveries.
        let step = 1.0 / in_flight.max(1) as f64;
        if self.window < self.threshold {
            // Slow start, in measured steps: the steps a level earns are
            // taken together once its rate is measured (as many rounds as
            // the rate needs to be trusted: a round of each connection, 8
            // at least), so each level it passes can be compared with the
            // next. Taken one per delivery, the levels of a first burst
            // passed in under a round each, and a relay that delivers less
            // in total at more connections went unnoticed. The count still
            // about doubles per round: 4, 12, 24. A connection let in
            // measures nothing and earns nothing here: the level's logins
            // counted too made the steps 4, 16, 44, opening three times
            // the connections a level had before its rate was known.
            spent?;
            self.credit += step;
            if self.measuring.1 < RATE_SAMPLES.max(before as u32) as f64 {
                return None;
            }
            self.window += std::mem::take(&mut self.credit);
        } else {
            self.window += step / self.window;
        }
        self.window = self.window.min(cap as f64);
        self.changed(
            now,
            before,
            Reason::Backlog,
            "mail waiting and the relay answering well".into(),
        )
    }

    /// The relay pushed back on an attempt that started under
    /// `generation` while other connections to it worked.
    pub fn pushback(&mut self, now: u64, signal: Pushback, generation: u64) -> Option<Change> {
        if !self.adaptive {
            return None;
        }
        let before = self.limit();
        match signal {
            Pushback::Refused { open, error } => {
                // The relay said how many it allows. An attempt that started
                // before the last cut may have been counted with connections
                // since closed: it can't lower the limit again.
                let allowed = open.clamp(1, self.max);
                if generation < self.generation && allowed < before {
                    return None;
                }
                self.ceiling = Some((allowed, now + CEILING_HOLD_MS));
                if (allowed as f64) < self.window {
                    self.window = allowed as f64;
                    self.generation += 1;
                }
                // Pushback ends slow start even when it cuts nothing (the
                // relay counted one closing, or another client's): past
                // the limit it stated, once that expires, one more per
                // round, not a step that opens as many again at once.
                self.threshold = self.threshold.min(allowed as f64);
                let text = format!(
                    "the relay refused one more connection ({error}) while {open} were open; at most {allowed} for {} min",
                    CEILING_HOLD_MS / 60_000
                );
                self.changed(now, before, Reason::Refused, text)
            }
            Pushback::Failed { error } if generation >= self.generation => self.cut(
                now,
                before,
                Reason::Failed,
                format!("a connection failed while others worked ({error})"),
            ),
            Pushback::Throttled { error } if generation >= self.generation => self.cut(
                now,
                before,
                Reason::Throttled,
                format!("the relay throttled a connection ({error})"),
            ),
            // Started before the last cut: that cut was the answer.
            Pushback::Failed { .. } | Pushback::Throttled { .. } => None,
        }
    }

    /// No connection has been open for a while: the next burst starts
    /// from the beginning, down from growth or up from a cut, and grows
    /// fast again (a limit the relay stated still holds while it lasts).
    pub fn idle(&mut self, now: u64) -> Option<Change> {
        if !self.adaptive {
            return None;
        }
        let stated = match self.ceiling {
            Some((limit, until)) if until > now => limit,
            _ => self.max,
        };
        let start = INITIAL.min(stated).min(self.max);
        let before = self.limit();
        if before == start && self.threshold >= self.max as f64 {
            return None;
        }
        self.window = start as f64;
        self.threshold = self.max as f64;
        self.rates.fill(Rate::default());
        self.falling = None;
        // The start's rate is forgotten with the others: what it counted
        // as measured (and earned) before is not the new burst's, even
        // at the same level.
        self.measuring = (start, 0.0);
        self.credit = 0.0;
        self.changed(
            now,
            before,
            Reason::Idle,
            "no connection open for a while: starting again".into(),
        )
    }

    fn cut(&mut self, now: u64, before: usize, reason: Reason, text: String) -> Option<Change> {
        let to = (self.window * BACKOFF).max(1.0);
        self.lower_to(now, before, to, reason, text)
    }

    /// Lowers the concurrency to `window` (below the current one) for
    /// `reason`: growth resumes one connection per round from there.
    fn lower_to(
        &mut self,
        now: u64,
        before: usize,
        window: f64,
        reason: Reason,
        text: String,
    ) -> Option<Change> {
        self.window = window.min(self.window);
        self.threshold = self.window;
        self.generation += 1;
        self.falling = None;
        // Rates at the levels given up on are measured afresh if they are
        // reached again.
        let keep = self.limit() + 1;
        for r in self.rates.iter_mut().skip(keep) {
            *r = Rate::default();
        }
        self.changed(now, before, reason, text)
    }

    fn changed(&mut self, now: u64, before: usize, reason: Reason, why: String) -> Option<Change> {
        let after = self.limit();
        if after == before && reason != Reason::Refused {
            return None;
        }
        if after == before && self.last.reason == Reason::Refused && self.last.to == after {
            // The same limit stated again.
            return None;
        }
        self.last = Change {
            at_ms: now,
            from: before,
            to: after,
            reason,
            text: format!("{before} -> {after}: {why}"),
        };
        Some(self.last.clone())
    }

    /// Adds a message's time to `level`'s average. A connection carrying
    /// `in_flight` messages gets their replies together: the first took
    /// the round trip, the others no time. An average that followed every
    /// message would swing with the position in the round and show rates
    /// no connection had, so the messages of a round (`in_flight` of them
    /// in a row) make one sample, and a level's first samples a plain
    /// mean.
    fn sample(&mut self, now: u64, level: usize, ms: f64, in_flight: usize) {
        let Some(r) = self.rates.get_mut(level) else {
            return;
        };
        if r.at_ms != 0 && now.saturating_sub(r.at_ms) > RATE_MEMORY_MS {
            *r = Rate::default();
        }
        r.at_ms = now.max(1);
        r.pending_ms += ms;
        r.pending += 1;
        if (r.pending as usize) < in_flight.max(1) {
            return;
        }
        let round = r.pending_ms / r.pending as f64;
        r.pending_ms = 0.0;
        r.pending = 0;
        r.samples += 1;
        // Over several rounds of every connection at the level: an
        // average over a few rounds of any of them swung by a tenth from
        // one moment to the next at 5 ms on a busy machine, as much as
        // the margin of a fall.
        let weight = (1.0 / r.samples as f64).max(1.0 / (RATE_ROUNDS * level as f64));
        // The variance about the same weighted mean (for the plain mean
        // of the first samples, exactly theirs).
        let d = round - r.ms;
        r.var = (1.0 - weight) * (r.var + weight * d * d);
        r.ms += weight * d;
    }

    /// The standard error of `level`'s average, relative to it: the
    /// noise of its rounds over the rounds averaged (at most the span
    /// of the running average, whose older rounds weigh less: an error
    /// a little too large, so a fall is judged with caution). Over the
    /// first rounds, a plain mean, their variance is the sample's
    /// (divided by n - 1): a few rounds' spread about their own mean
    /// understates the noise.
    fn noise(&self, level: usize) -> f64 {
        let Some(r) = self.rates.get(level).filter(|r| r.ms > 0.0) else {
            return 0.0;
        };
        let span = RATE_ROUNDS * level as f64;
        let samples = r.samples as f64;
        let var = match samples > 1.0 && samples <= span {
            true => r.var * samples / (samples - 1.0),
            false => r.var,
        };
        let n = samples.min(span).max(1.0);
        (var / n).sqrt() / r.ms
    }

    /// Whether the relay delivers less in total at `level` connections
    /// than it did at fewer: its rate per connection fell by more than
    /// the connections rose.
    fn rate_fell(&self, now: u64, level: usize) -> Verdict {
        let trusted = |l: usize| {
            let r = self.rates.get(l)?;
            (l > 0
                && r.samples >= RATE_SAMPLES.max(l as u32)
                && now.saturating_sub(r.at_ms) <= RATE_MEMORY_MS
                && r.ms > 0.0)
                .then_some(r.ms)
        };
        let Some(ms) = trusted(level) else {
            return Verdict::Unknown;
        };
        let total = level as f64 * 1000.0 / ms;
        // A fall counts only if it is bigger than the margin by more than
        // the noise of both measures: a level below measured over a few
        // rounds of a first burst (or the luckiest of several) is a rough
        // figure, and on a busy machine its luck looks like a fall.
        // The best total among the levels below that the fall is sure
        // against, at the fewest connections that reached it.
        let noise = self.noise(level);
        let mut measured_below = false;
        let best = (1..level)
            .filter_map(|l| trusted(l).map(|ms| (l, l as f64 * 1000.0 / ms)))
            .inspect(|_| measured_below = true)
            .filter(|&(l, t)| {
                let noise = noise.hypot(self.noise(l));
                total * (1.0 + RATE_CONFIDENCE * noise) < RATE_MARGIN * t
            })
            .fold(None, |best: Option<(usize, f64)>, (l, t)| match best {
                Some((_, b)) if b >= t => best,
                _ => Some((l, t)),
            });
        if !measured_below {
            return Verdict::Unknown;
        }
        let Some((best, best_total)) = best else {
            return Verdict::Holds;
        };
        let text = format!(
            "the delivery rate per connection fell from {:.1}/s at {best} connections to {:.1}/s at {level} ({:.0}/s in total, down from {:.0}/s)",
            best_total / best as f64,
            total / level as f64,
            total,
            best_total
        );
        Verdict::Fell { best, text }
    }
}

/// What the rate at a level says.
enum Verdict {
    /// Not measured well enough yet, here or below.
    Unknown,
    /// No fall.
    Holds,
    /// Less in total than at `best` connections.
    Fell { best: usize, text: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use std::time::Duration;

    const RTT: Duration = Duration::from_millis(50);

    /// A message delivered on a connection carrying only it.
    fn at(busy: usize, spent: Duration, backlog: bool) -> Delivered {
        Delivered {
            busy,
            working: busy,
            spent: Some(spent),
            in_flight: 1,
            backlog,
        }
    }

    /// `n` deliveries with every allowed connection busy and mail waiting,
    /// each connection spending `spent` per message.
    fn deliver(c: &mut Concurrency, clock: &Clock, n: usize, spent: Duration) -> Vec<Change> {
        let mut changes = Vec::new();
        for _ in 0..n {
            clock.advance(Duration::from_millis(1));
            let busy = c.limit();
            changes.extend(c.delivered(clock.now_ms(), at(busy, spent, true)));
        }
        changes
    }

    #[test]
    fn grows_under_backlog_fast_at_first_and_respects_the_cap() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(20, clock.now_ms());
        assert_eq!(c.limit(), INITIAL);
        assert_eq!(c.last_change().reason, Reason::Start);
        // Slow start: one more connection per delivery, taken together
        // once the level is measured (8 rounds, one of each connection at
        // least): 4 for two rounds, then 12, then 20.
        assert!(deliver(&mut c, &clock, 7, RTT).is_empty());
        let changes = deliver(&mut c, &clock, 1, RTT);
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes[0].text,
            "4 -> 12: mail waiting and the relay answering well"
        );
        assert_eq!(changes[0].reason, Reason::Backlog);
        assert!(deliver(&mut c, &clock, 11, RTT).is_empty());
        assert_eq!(
            deliver(&mut c, &clock, 1, RTT)[0].to,
            20,
            "capped at max_connections"
        );
        assert!(deliver(&mut c, &clock, 50, RTT).is_empty());
    }

    #[test]
    fn a_connection_carrying_several_messages_grows_once_per_round() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(20, clock.now_ms());
        // Eight messages in flight on each connection: eight deliveries are
        // one round of a connection, one step; the level is measured after
        // 8 rounds, 64 deliveries.
        let streamed = Delivered {
            busy: INITIAL,
            working: INITIAL,
            spent: Some(RTT / 8),
            in_flight: 8,
            backlog: true,
        };
        for _ in 0..63 {
            assert_eq!(c.delivered(clock.now_ms(), streamed), None);
        }
        assert_eq!(
            c.delivered(clock.now_ms(), streamed).map(|ch| ch.to),
            Some(INITIAL + 8)
        );
    }

    #[test]
    fn no_growth_without_waiting_mail_or_with_connections_to_spare() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(20, clock.now_ms());
        for _ in 0..50 {
            clock.advance(Duration::from_millis(10));
            // Nothing waiting.
            assert_eq!(c.delivered(clock.now_ms(), at(4, RTT, false)), None);
            // Mail waiting, but not every allowed connection is in use.
            assert_eq!(c.delivered(clock.now_ms(), at(3, RTT, true)), None);
        }
        assert_eq!(c.limit(), INITIAL);
    }

    #[test]
    fn a_refused_extra_connection_settles_at_what_the_relay_allows() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(20, clock.now_ms());
        // The fourth connection gets "421 too many connections" while three
        // are open: three it is, and growth stops there.
        let g = c.generation();
        let change = c
            .pushback(
                clock.now_ms(),
                Pushback::Refused {
                    open: 3,
                    error: "421 4.7.0 Too many concurrent SMTP connections".into(),
                },
                g,
            )
            .expect("a change");
        assert_eq!(
            (change.from, change.to, change.reason),
            (4, 3, Reason::Refused)
        );
        assert!(change.text.starts_with("4 -> 3: the relay refused one more connection (421 4.7.0 Too many concurrent SMTP connections) while 3 were open"), "{}", change.text);
        assert!(deliver(&mut c, &clock, 500, RTT).is_empty());
        assert_eq!(c.limit(), 3);
        // A refusal of an attempt that started before that cut (counted
        // with a connection since closed) does not lower it again.
        let stale = Pushback::Refused {
            open: 2,
            error: "421".into(),
        };
        assert_eq!(c.pushback(clock.now_ms(), stale, g), None);
        assert_eq!(c.limit(), 3);
        // Saying it again changes nothing.
        let refused = Pushback::Refused {
            open: 3,
            error: "421".into(),
        };
        assert_eq!(
            c.pushback(clock.now_ms(), refused.clone(), c.generation()),
            None
        );
        // After the hold, one more is tried (and refused again).
        clock.advance(Duration::from_millis(CEILING_HOLD_MS));
        let changes = deliver(&mut c, &clock, 10, RTT);
        assert_eq!(changes.first().map(|ch| ch.to), Some(4));
        assert_eq!(
            c.pushback(clock.now_ms(), refused, c.generation())
                .map(|ch| ch.to),
            Some(3)
        );
    }

    #[test]
    fn failures_and_421_halve_once_per_round() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(32, clock.now_ms());
        deliver(&mut c, &clock, 8 + 12, RTT);
        assert_eq!(c.limit(), 24);
        // Four connections opened in the same round time out: one halving.
        let g = c.generation();
        let failed = || Pushback::Failed {
            error: "connect to 127.0.0.1:25 timed out after 30s".into(),
        };
        let change = c.pushback(clock.now_ms(), failed(), g).expect("a cut");
        assert_eq!(
            (change.from, change.to, change.reason),
            (24, 12, Reason::Failed)
        );
        for _ in 0..3 {
            assert_eq!(c.pushback(clock.now_ms(), failed(), g), None, "same round");
        }
        assert_eq!(c.limit(), 12);
        // A 421 on a connection opened after the cut halves again.
        let throttled = Pushback::Throttled {
            error: "421 4.7.0 slow down".into(),
        };
        let change = c
            .pushback(clock.now_ms(), throttled, c.generation())
            .expect("a cut");
        assert_eq!((change.to, change.reason), (6, Reason::Throttled));
        // Never below one.
        for _ in 0..5 {
            c.pushback(clock.now_ms(), failed(), c.generation());
        }
        assert_eq!(c.limit(), 1);
        // After a cut, growth is about one connection per round (as many
        // deliveries as connections), not one per delivery.
        let mut deliveries = 0;
        while c.limit() < 4 {
            deliver(&mut c, &clock, 1, RTT);
            deliveries += 1;
        }
        assert_eq!(deliveries, 1 + 3 + 3, "1 -> 2 -> 3 -> 4");
    }

    /// Puts the concurrency at `n` connections, still in slow start, as
    /// growth would without measuring: no level's rate is set on the way.
    fn grow_to(c: &mut Concurrency, n: usize) {
        c.window = n as f64;
        assert_eq!(c.limit(), n);
    }

    /// Deliveries at `busy` connections, each connection taking `spent`
    /// per message (so one arrives every `spent / busy`), no mail waiting,
    /// for `within`: the first change and how long it took.
    fn until_change(
        c: &mut Concurrency,
        clock: &Clock,
        busy: usize,
        spent: Duration,
        within: Duration,
    ) -> Option<(Change, Duration)> {
        let start = clock.now_ms();
        let every = spent / busy as u32;
        while clock.now_ms() - start < within.as_millis() as u64 {
            clock.advance(every);
            if let Some(ch) = c.delivered(clock.now_ms(), at(busy, spent, false)) {
                return Some((ch, Duration::from_millis(clock.now_ms() - start)));
            }
        }
        None
    }

    const HOLD: Duration = Duration::from_millis(RATE_HOLD_MS);
    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_falling_rate_per_connection_backs_off_once_it_lasts_but_a_saturated_one_does_not() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(64, clock.now_ms());
        // 8 connections, 20/s each: 160/s in total.
        grow_to(&mut c, 8);
        assert_eq!(until_change(&mut c, &clock, 8, RTT, 5 * SEC), None);
        // Saturated: at 16 each connection takes twice as long, so the
        // total stays the same. No back-off for that, however long.
        grow_to(&mut c, 16);
        assert_eq!(until_change(&mut c, &clock, 16, RTT * 2, 10 * SEC), None);
        // At 24 each takes five times as long: less in total. Back off,
        // once the fall has lasted.
        grow_to(&mut c, 24);
        let (cut, after) = until_change(&mut c, &clock, 24, RTT * 5, 10 * SEC)
            .expect("a cut for the falling rate");
        assert_eq!(cut.reason, Reason::Rate);
        assert!(
            cut.text
                .contains(" at 8 connections to 4.0/s at 24 (96/s in total, down from 160/s)"),
            "{}",
            cut.text
        );
        assert_eq!(cut.to, 12);
        // The level is trusted after a round of its 24 connections (5 s),
        // then the fall must last.
        assert!(after >= HOLD && after < 5 * SEC + HOLD + SEC, "{after:?}");
        // The 24 connections still busy until the cut closes them go on
        // delivering as slowly: that is the level given up on, not a
        // reason to halve again.
        assert_eq!(until_change(&mut c, &clock, 24, RTT * 5, 10 * SEC), None);
        assert_eq!(c.limit(), 12);
    }

    #[test]
    fn a_fall_shorter_than_the_hold_costs_nothing_and_growth_waits_it_out() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(64, clock.now_ms());
        grow_to(&mut c, 8);
        assert_eq!(until_change(&mut c, &clock, 8, RTT, 5 * SEC), None);
        grow_to(&mut c, 12);
        assert_eq!(until_change(&mut c, &clock, 12, RTT, 5 * SEC), None);
        // Half a second of every connection at 12 three times as slow
        // (less in total than 8 delivered), then back to normal.
        assert_eq!(until_change(&mut c, &clock, 12, RTT * 3, HOLD / 2), None);
        // Mail waits meanwhile, but while the fall lasts no connection is
        // added.
        clock.advance(RTT);
        assert_eq!(c.delivered(clock.now_ms(), at(12, RTT, true)), None);
        assert_eq!(c.limit(), 12);
        assert_eq!(until_change(&mut c, &clock, 12, RTT, 10 * SEC), None);
        assert_eq!(c.limit(), 12);
        // Once the rate holds again, growth resumes.
        clock.advance(RTT);
        let grew = c.delivered(clock.now_ms(), at(12, RTT, true));
        assert_eq!(
            grew.map(|ch| (ch.to, ch.reason)),
            Some((13, Reason::Backlog))
        );
    }

    #[test]
    fn a_flat_total_that_swings_from_round_to_round_never_cuts() {
        // On a machine busy with other work, the rate per connection
        // falls as connections rise (the total is flat: the CPU is the
        // limit) and each round's time swings: here by up to a third
        // either way, and one round in fifty stalls five times as long.
        // Connections between messages make deliveries at levels just
        // below the limit too.
        // An average over a few rounds of any connection, compared with
        // the luckiest level below, cut again and again: a burst 5 ms
        // away drifted from 25 connections down to 7.
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(25, clock.now_ms());
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut noise = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 1000) as f64 / 1000.0
        };
        let base = Duration::from_millis(5);
        let mut cuts = Vec::new();
        let start = clock.now_ms();
        while clock.now_ms() - start < 120_000 {
            // Connections are not all busy at every moment: one or two
            // are between messages now and then.
            let busy = c
                .limit()
                .saturating_sub((noise() * noise() * 3.0) as usize)
                .max(1);
            let swing = if noise() < 0.02 {
                5.0
            } else {
                0.67 + 0.66 * noise()
            };
            let spent = (base * busy as u32).mul_f64(swing);
            clock.advance((base * busy as u32) / busy as u32);
            let d = Delivered {
                busy,
                working: busy,
                spent: Some(spent),
                in_flight: 1,
                backlog: true,
            };
            cuts.extend(
                c.delivered(clock.now_ms(), d)
                    .filter(|ch| ch.reason != Reason::Backlog)
                    .map(|ch| ch.text),
            );
        }
        assert!(
            cuts.is_empty(),
            "{} cuts, the first: {:?}",
            cuts.len(),
            &cuts[..cuts.len().min(3)]
        );
        assert_eq!(c.limit(), 25);
    }

    #[test]
    fn a_first_burst_to_a_relay_that_delivers_less_at_more_connections_is_cut() {
        // No lighter traffic before: the burst starts at 4 connections
        // with mail waiting. Each message takes 2 ms times the square of
        // the connections busy: the total falls as they rise (4 deliver
        // 125/s, 12 about 42/s). Slow start measures 4 before it goes
        // on, so the fall at 12 shows and cuts back to 4, long before
        // the burst could end.
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(25, clock.now_ms());
        let mut changes = Vec::new();
        let start = clock.now_ms();
        while clock.now_ms() - start < 30_000 {
            let busy = c.limit();
            let spent = Duration::from_millis(2 * (busy * busy) as u64);
            clock.advance(spent / busy as u32);
            changes.extend(c.delivered(clock.now_ms(), at(busy, spent, true)));
            if changes.last().is_some_and(|ch| ch.reason == Reason::Rate) {
                break;
            }
        }
        let seen: Vec<_> = changes
            .iter()
            .map(|ch| (ch.from, ch.to, ch.reason))
            .collect();
        assert_eq!(
            seen,
            vec![(4, 12, Reason::Backlog), (12, 6, Reason::Rate)],
            "{changes:?}"
        );
        let cut = changes.last().expect("a cut");
        assert!(cut.text.contains(" at 4 connections to "), "{}", cut.text);
        // Measured over 8 rounds of 4 connections, then a round of 12
        // (1.5 s), then the hold.
        assert!(clock.now_ms() - start < 5_000, "{cut:?}");
    }

    /// A connection let in (the pool's `connected`): an answer from the
    /// relay, no time measured.
    fn let_in(busy: usize) -> Delivered {
        Delivered {
            busy,
            working: busy,
            spent: None,
            in_flight: 1,
            backlog: true,
        }
    }

    #[test]
    fn slow_start_steps_are_the_rounds_measured_not_the_connections_let_in() {
        // As the pool feeds it in a burst: each connection a level opens
        // is let in with mail waiting, then the level delivers. The steps
        // are 4 -> 12 -> 24 as documented; counting the logins too made
        // them 4 -> 16 -> 25 (44), a bigger overshoot past a level that
        // delivers less, and more connections opened at once at a relay
        // that allows only a few.
        for max in [25, 64] {
            let clock = Clock::new();
            let mut c = Concurrency::adaptive(max, clock.now_ms());
            let mut seen = Vec::new();
            let mut opened = INITIAL;
            while c.limit() < 24 && seen.len() < 5 {
                for _ in 0..opened {
                    clock.advance(Duration::from_millis(1));
                    assert_eq!(c.delivered(clock.now_ms(), let_in(c.limit())), None);
                }
                let level = c.limit();
                let changes = deliver(&mut c, &clock, level.max(8), RTT);
                seen.extend(changes.iter().map(|ch| (ch.from, ch.to)));
                opened = c.limit() - level;
            }
            assert_eq!(seen, vec![(4, 12), (12, 24)], "max {max}");
        }
    }

    #[test]
    fn after_idleness_slow_start_measures_the_start_again() {
        // Idleness forgets every level's rate: what the start counted as
        // measured before (a burst cut short, or congestion avoidance at
        // 4 after a cut) is not the new burst's, whose first step must
        // wait for 4 to be measured again (8 rounds), so the next level
        // has it to compare with.
        for case in ["burst cut short", "congestion avoidance at 4"] {
            let clock = Clock::new();
            let mut c = Concurrency::adaptive(25, clock.now_ms());
            let failed = || Pushback::Failed {
                error: "connect to 127.0.0.1:25 timed out after 30s".into(),
            };
            if case == "burst cut short" {
                assert!(deliver(&mut c, &clock, 7, RTT).is_empty());
                c.pushback(clock.now_ms(), failed(), c.generation())
                    .expect("a cut");
            } else {
                grow_to(&mut c, 8);
                c.pushback(clock.now_ms(), failed(), c.generation())
                    .expect("a cut");
                assert_eq!(c.limit(), INITIAL);
                assert_eq!(until_change(&mut c, &clock, 4, RTT, 2 * SEC), None);
            }
            c.idle(clock.now_ms());
            assert_eq!(c.limit(), INITIAL, "{case}");
            assert_eq!(deliver(&mut c, &clock, 7, RTT), vec![], "{case}");
            let changes = deliver(&mut c, &clock, 1, RTT);
            assert_eq!(
                changes
                    .iter()
                    .map(|ch| (ch.from, ch.to))
                    .collect::<Vec<_>>(),
                vec![(4, 12)],
                "{case}"
            );
        }
    }

    #[test]
    fn a_limit_stated_at_the_level_allowed_ends_slow_start() {
        // The relay refuses one more while as many are open as allowed
        // now (it counted one closing, or one of another client's): a
        // ceiling and no cut. Once the ceiling expires, growth past it is
        // one connection per round, not a slow-start step that opens as
        // many again at a relay that said where its limit was.
        for level in [8, 16] {
            let clock = Clock::new();
            let mut c = Concurrency::adaptive(64, clock.now_ms());
            grow_to(&mut c, level);
            let refused = Pushback::Refused {
                open: level,
                error: "421 4.7.0 Too many connections".into(),
            };
            c.pushback(clock.now_ms(), refused, c.generation())
                .expect("a ceiling");
            assert_eq!(c.limit(), level);
            assert!(deliver(&mut c, &clock, 100, RTT).is_empty());
            clock.advance(Duration::from_millis(CEILING_HOLD_MS));
            deliver(&mut c, &clock, 3 * level, RTT);
            assert!(
                c.limit() <= level + 3,
                "{level} -> {}: {:?}",
                c.limit(),
                c.last_change()
            );
        }
    }

    #[test]
    fn slow_start_goes_on_while_some_allowed_connections_are_not_at_work() {
        // A burst drained about as fast as it comes: every allowed
        // connection is in use, but one or two of them are always still
        // being opened or between logins, so never all 12 at work at
        // once. Slow start must not wait for a moment that never comes.
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(25, clock.now_ms());
        deliver(&mut c, &clock, 8, RTT);
        assert_eq!(c.limit(), 12);
        let mut changes = Vec::new();
        for i in 0..12 {
            clock.advance(RTT / 12);
            let d = Delivered {
                busy: 12,
                working: 10 + i % 2,
                spent: Some(RTT),
                in_flight: 1,
                backlog: true,
            };
            changes.extend(c.delivered(clock.now_ms(), d));
        }
        let seen: Vec<_> = changes.iter().map(|ch| (ch.from, ch.to)).collect();
        assert_eq!(seen, vec![(12, 24)]);
    }

    #[test]
    fn connections_being_opened_do_not_make_the_ones_at_work_a_higher_level() {
        // 12 connections, 3 round trips a message each: 80/s in total, the
        // relay's limit. Slow start goes to 24; for two seconds 4 of the
        // new connections are being opened (busy 16) and the 12 at work go
        // on as before. Taken for 16 at work, that was 107/s at 16, and
        // 24 delivering the same 80/s then looked like a fall. The 24 at
        // work, 6 round trips each, deliver what 12 did: no cut. A real
        // fall at 24 (9 round trips each) still cuts.
        for (each, cuts) in [(6, false), (9, true)] {
            let clock = Clock::new();
            let mut c = Concurrency::adaptive(64, clock.now_ms());
            grow_to(&mut c, 12);
            assert_eq!(until_change(&mut c, &clock, 12, RTT * 3, 5 * SEC), None);
            grow_to(&mut c, 24);
            let start = clock.now_ms();
            while clock.now_ms() - start < 2_000 {
                clock.advance(RTT * 3 / 12);
                let d = Delivered {
                    busy: 16,
                    working: 12,
                    spent: Some(RTT * 3),
                    in_flight: 1,
                    backlog: false,
                };
                assert_eq!(c.delivered(clock.now_ms(), d), None);
            }
            let change = until_change(&mut c, &clock, 24, RTT * each, 10 * SEC);
            assert_eq!(change.is_some(), cuts, "{each} round trips: {change:?}");
        }
    }

    #[test]
    fn a_fall_within_the_noise_of_a_level_measured_over_few_rounds_does_not_cut() {
        // 8 connections measured over 8 rounds whose time swings from
        // 0.4 to 1.6 round trips (1 on average), then 12 connections
        // each taking 1.8 round trips: 17 % less in total, but the 8
        // rounds could as well have averaged 1.3 round trips, and then
        // 12 deliver more. No cut. The same fall after 8 steady rounds
        // at 8 cuts.
        for (swing, cuts) in [(0.6, false), (0.0, true)] {
            let clock = Clock::new();
            let mut c = Concurrency::adaptive(64, clock.now_ms());
            grow_to(&mut c, 8);
            for i in 0..8 {
                let spent = RTT.mul_f64(if i % 2 == 0 { 1.0 - swing } else { 1.0 + swing });
                clock.advance(spent / 8);
                assert_eq!(c.delivered(clock.now_ms(), at(8, spent, false)), None);
            }
            grow_to(&mut c, 12);
            let change = until_change(&mut c, &clock, 12, RTT.mul_f64(1.8), 10 * SEC);
            assert_eq!(change.is_some(), cuts, "swing {swing}: {change:?}");
        }
    }

    #[test]
    fn a_total_that_wobbles_at_the_top_costs_one_connection_not_half() {
        // A total at one more connection that stays a little lower than
        // at the level below it: going back to that level is the answer,
        // not halving (which at 5 ms gave away half the connections again
        // and again).
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(64, clock.now_ms());
        grow_to(&mut c, 20);
        assert_eq!(until_change(&mut c, &clock, 20, RTT, 5 * SEC), None);
        grow_to(&mut c, 21);
        // 21 connections, each 21% slower: 347/s in total against 400/s.
        let (cut, _) = until_change(&mut c, &clock, 21, RTT.mul_f64(1.21), 10 * SEC)
            .expect("a cut for the falling rate");
        assert_eq!((cut.reason, cut.from, cut.to), (Reason::Rate, 21, 20));
        assert!(cut.text.contains("at 20 connections"), "{}", cut.text);
        // Growth resumes from there, one connection per round.
        assert_eq!(c.limit(), 20);
    }

    #[test]
    fn replies_to_a_stream_arriving_together_measure_the_rate_of_the_round() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(64, clock.now_ms());
        grow_to(&mut c, 8);
        // Each connection carries 8 messages a round trip; their replies
        // come together: the first took the round trip, the others no
        // time. At 8 connections that is twice the total of 4: no cut,
        // wherever in a round the rate is looked at.
        let round = |c: &mut Concurrency, busy: usize, took: Duration| {
            let mut changes = Vec::new();
            for i in 0..8 {
                let spent = if i == 0 { took } else { Duration::ZERO };
                clock.advance(spent / busy as u32 + Duration::from_micros(10));
                let d = Delivered {
                    busy,
                    working: busy,
                    spent: Some(spent),
                    in_flight: 8,
                    backlog: false,
                };
                changes.extend(c.delivered(clock.now_ms(), d));
            }
            changes
        };
        for _ in 0..80 {
            assert_eq!(round(&mut c, 4, RTT), vec![]);
        }
        for _ in 0..160 {
            assert_eq!(
                round(&mut c, 8, RTT),
                vec![],
                "8 connections deliver twice what 4 do"
            );
        }
        assert_eq!(c.limit(), 8);
        // A real fall still shows: when a round at 8 takes four round
        // trips, 8 deliver less than 4 did. One cut, to 4.
        let mut cuts = Vec::new();
        for _ in 0..400 {
            cuts.extend(round(&mut c, 8, RTT * 4));
        }
        assert_eq!(cuts.len(), 1, "{cuts:?}");
        assert_eq!(cuts[0].reason, Reason::Rate);
        assert_eq!(cuts[0].to, 4);
    }

    #[test]
    fn an_idle_relay_starts_again_and_a_fixed_one_never_changes() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(20, clock.now_ms());
        deliver(&mut c, &clock, 100, RTT);
        assert_eq!(c.limit(), 20);
        let change = c.idle(clock.now_ms()).expect("a change");
        assert_eq!((change.to, change.reason), (INITIAL, Reason::Idle));
        assert_eq!(c.idle(clock.now_ms()), None);

        let mut f = Concurrency::fixed(8, clock.now_ms());
        assert_eq!(f.last_change().text, "8: fixed by concurrency = 8");
        assert!(deliver(&mut f, &clock, 100, RTT).is_empty());
        let refused = Pushback::Refused {
            open: 2,
            error: "421".into(),
        };
        assert_eq!(f.pushback(clock.now_ms(), refused, 0), None);
        assert_eq!(f.idle(clock.now_ms()), None);
        assert_eq!(f.limit(), 8);
        // A cap below the starting point.
        assert_eq!(Concurrency::adaptive(2, clock.now_ms()).limit(), 2);
    }

    #[test]
    fn an_idle_relay_cut_below_the_start_starts_again_from_it() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(20, clock.now_ms());
        let failed = || Pushback::Failed {
            error: "connect to 127.0.0.1:25 timed out after 30s".into(),
        };
        c.pushback(clock.now_ms(), failed(), c.generation())
            .expect("a cut");
        c.pushback(clock.now_ms(), failed(), c.generation())
            .expect("a cut");
        assert_eq!(c.limit(), 1);
        let change = c.idle(clock.now_ms()).expect("back to the start");
        assert_eq!(
            (change.from, change.to, change.reason),
            (1, INITIAL, Reason::Idle)
        );
        assert_eq!(c.idle(clock.now_ms()), None);
        // The next burst grows as the first did: one more per delivery,
        // taken once the level is measured.
        deliver(&mut c, &clock, 8, RTT);
        assert_eq!(c.limit(), INITIAL + 8);
        // A limit the relay stated holds through idleness while it lasts.
        let refused = Pushback::Refused {
            open: 2,
            error: "421 4.7.0 Too many connections".into(),
        };
        c.pushback(clock.now_ms(), refused, c.generation())
            .expect("a ceiling");
        assert_eq!(c.limit(), 2);
        assert_eq!(c.idle(clock.now_ms()), None);
        assert_eq!(c.limit(), 2);
        clock.advance(Duration::from_millis(CEILING_HOLD_MS));
        assert_eq!(c.idle(clock.now_ms()).map(|ch| ch.to), Some(INITIAL));
    }

    #[test]
    fn connections_a_cut_has_not_closed_yet_do_not_grow_it_back() {
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(32, clock.now_ms());
        grow_to(&mut c, 16);
        let throttled = Pushback::Throttled {
            error: "421 4.7.0 slow down".into(),
        };
        let cut = c
            .pushback(clock.now_ms(), throttled, c.generation())
            .expect("a cut");
        assert_eq!(cut.to, 8);
        // The sixteen connections busy when it came deliver what they
        // carry (streams of eight) while mail waits: that is the level
        // given up on, not a relay answering well at eight.
        for _ in 0..16 * 8 {
            clock.advance(Duration::from_millis(1));
            let d = Delivered {
                busy: 16,
                working: 16,
                spent: Some(RTT),
                in_flight: 8,
                backlog: true,
            };
            assert_eq!(c.delivered(clock.now_ms(), d), None);
        }
        assert_eq!(c.limit(), 8);
        // Once no more are busy than it allows, it grows again, one more
        // per round.
        deliver(&mut c, &clock, 9, RTT);
        assert_eq!(c.limit(), 9);
    }

    #[test]
    fn a_fall_seen_long_ago_does_not_skip_the_hold_of_a_new_one() {
        // A dip at 12 shorter than the hold, then a lull (few connections
        // busy, a level never measured) long enough that the dip is old
        // news: back at 12 the relay answers as fast as ever, and the level's
        // average, still lifted by the dip, must show a fall for a full hold
        // again before it cuts, not at once because the dip began long ago.
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(64, clock.now_ms());
        grow_to(&mut c, 8);
        assert_eq!(until_change(&mut c, &clock, 8, RTT, 5 * SEC), None);
        grow_to(&mut c, 12);
        assert_eq!(until_change(&mut c, &clock, 12, RTT, 5 * SEC), None);
        assert_eq!(until_change(&mut c, &clock, 12, RTT * 3, HOLD / 2), None);
        // The lull: five connections busy, nothing to compare with.
        assert_eq!(until_change(&mut c, &clock, 5, RTT, 3 * SEC), None);
        // Back at 12, as fast as before the dip.
        let change = until_change(&mut c, &clock, 12, RTT, 10 * SEC);
        assert_eq!(change, None, "cut at once for a dip 3 s old");
        assert_eq!(c.limit(), 12);
    }

    #[test]
    fn a_lasting_fall_at_the_top_cuts_though_the_level_below_holds() {
        // Connections between messages make deliveries one level below the
        // limit now and then. 11 delivers as much as 8 did; 12 delivers a
        // third less, for good. The fall at 12 lasts: it must cut, not be
        // forgotten every time 11 reports that it holds (which also kept
        // growth waiting for ever: stuck at a level that delivers less).
        let clock = Clock::new();
        let mut c = Concurrency::adaptive(64, clock.now_ms());
        grow_to(&mut c, 8);
        assert_eq!(until_change(&mut c, &clock, 8, RTT, 5 * SEC), None);
        grow_to(&mut c, 11);
        assert_eq!(
            until_change(&mut c, &clock, 11, RTT * 11 / 8, 5 * SEC),
            None
        );
        grow_to(&mut c, 12);
        let start = clock.now_ms();
        let mut cut = None;
        let mut i = 0u32;
        while clock.now_ms() - start < 30_000 && cut.is_none() {
            i += 1;
            clock.advance(Duration::from_millis(5));
            // Nine rounds in ten at 12, the tenth at 11 (holding).
            let d = if i.is_multiple_of(10) {
                at(11, RTT * 11 / 8, false)
            } else {
                at(12, RTT * 2, false)
            };
            cut = c.delivered(clock.now_ms(), d);
        }
        let cut = cut.expect("a cut for a fall at 12 lasting 30 s");
        let after = clock.now_ms() - start;
        // Trusted after a few rounds of its connections, then the hold.
        assert!(after < 5_000, "cut only after {after} ms: {cut:?}");
        assert_eq!(cut.reason, Reason::Rate, "{cut:?}");
        assert!(c.limit() < 12);
    }
}
