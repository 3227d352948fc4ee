//! The status page at `/`: plain server-rendered HTML with an inline SVG
//! chart, no scripts and no external resources, so it works with
//! JavaScript off, in a text browser, and offline. It refreshes itself
//! every 30 seconds with a `<meta>` tag.
//!
//! # Security
//! Addresses, upstream replies and error texts come from outside: every
//! dynamic value goes through [`esc`].

use std::fmt::Write as _;

use super::http::{StatusReport, rfc3339};
use super::state::RecentAttempt;

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "42s", "5m", "3h 20m", "2d 4h".
pub fn ago(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn since(now_ms: u64, then_ms: u64) -> String {
    format!(
        "<time datetime=\"{t}\" title=\"{t}\">{} ago</time>",
        ago(now_ms.saturating_sub(then_ms) as f64 / 1000.0),
        t = rfc3339(then_ms)
    )
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:80em}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #ddd;vertical-align:top}\
th{background:#f4f4f4}td.reason{font-family:monospace;font-size:12px;word-break:break-word}\
.up{color:#0a6b22;font-weight:bold}.down{color:#b00020;font-weight:bold}.unknown{color:#777;font-weight:bold}\
.big{font-size:1.6em;font-weight:bold}.muted{color:#777}svg{background:#fafafa;border:1px solid #ddd}";

/// The whole page.
pub fn render(r: &StatusReport) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"30\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>relayq on {host}</title><style>{STYLE}</style></head><body>\
         <h1>relayq on {host}</h1>\
         <p class=\"muted\">relayq {version} &middot; as of {now} &middot; refreshes every 30s</p>",
        host = esc(&r.hostname),
        version = esc(r.version),
        now = rfc3339(r.now),
    );

    let q = &r.queue;
    let _ = write!(
        h,
        "<section id=\"queue-summary\"><h2>Queue</h2><p><span class=\"big\" id=\"queue-size\">{}</span> \
         message{} waiting for delivery, {} on hold, {} KB in the spool{}.</p></section>",
        q.messages,
        if q.messages == 1 { "" } else { "s" },
        q.held,
        q.bytes.div_ceil(1024),
        match q.oldest_age_seconds {
            Some(age) => format!("; the oldest has waited {}", ago(age)),
            None => String::new(),
        }
    );

    h.push_str("<section id=\"relays\"><h2>Relay</h2>");
    if r.relays.is_empty() {
        h.push_str(
            "<p class=\"muted\">No relay configured (mail is captured into a local Maildir).</p>",
        );
    } else {
        h.push_str("<table><tr><th>relay</th><th>state</th><th>since</th><th>last error</th></tr>");
        for relay in &r.relays {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"{state}\">{state}</td><td>{}</td><td class=\"reason\">{}</td></tr>",
                esc(&relay.relay),
                since(r.now, relay.since),
                match (&relay.last_error, relay.last_error_at) {
                    (Some(e), Some(at)) => format!("{} ({})", esc(e), since(r.now, at)),
                    (Some(e), None) => esc(e),
                    _ => "none".to_string(),
                },
                state = relay.state,
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");

    if !r.routing.is_empty() {
        h.push_str("<section id=\"routing\"><h2>Relays and limits</h2>");
        h.push_str("<table><tr><th>name</th><th>endpoint</th><th>state</th><th>connections</th><th>limits (used/limit, resets)</th></tr>");
        for relay in &r.routing {
            // Markup: every outside value in it is escaped here.
            let state = match (relay.down_since_ms, relay.paused_until_ms) {
                (_, Some(until)) => format!(
                    "paused by the circuit breaker until {}",
                    esc(&crate::routing::fmt_time(until, None))
                ),
                (Some(since_ms), None) => format!("down since {}", since(r.now, since_ms)),
                _ => esc(&relay.state),
            };
            // A relay over a limit is up but takes no mail: say so where
            // its state is, not only in the numbers.
            let full: Vec<String> = relay
                .limits
                .iter()
                .filter(|l| l.left == 0)
                .map(|l| {
                    let until = l
                        .resets_at_ms
                        .map(|t| format!(" until {}", crate::routing::fmt_time(t, None)))
                        .unwrap_or_default();
                    esc(&format!("{} limit reached{until}", l.period.label()))
                })
                .collect();
            let state = if full.is_empty() {
                state
            } else {
                format!("{state}; {}", full.join("; "))
            };
            let limits: Vec<String> = relay
                .limits
                .iter()
                .map(|l| {
                    let resets = l
                        .resets_at_ms
                        .map(|t| format!(", resets {}", crate::routing::fmt_time(t, None)))
                        .unwrap_or_default();
                    format!(
                        "{}/{} per {} ({}{resets})",
                        l.used,
                        l.limit,
                        l.period.label(),
                        l.window
                    )
                })
                .collect();
            let concurrency = match &relay.concurrency_change {
                Some(change) if relay.adaptive => format!(
                    "{} open; concurrency {} of at most {} (adaptive): {}, {}",
                    relay.connections,
                    relay.concurrency,
                    relay.max_connections,
                    esc(&change.text),
                    since(r.now, change.at_ms)
                ),
                _ => format!(
                    "{} open; concurrency {} (fixed)",
                    relay.connections, relay.concurrency
                ),
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&relay.name),
                esc(&relay.endpoint),
                esc(&relay.state),
                state,
                concurrency,
                if limits.is_empty() {
                    "none".to_string()
                } else {
                    esc(&limits.join("; "))
                },
            );
        }
        h.push_str("</table></section>");
    }

    h.push_str("<section id=\"chart\"><h2>Queue size, last hour</h2>");
    h.push_str(&chart(&r.history, r.now));
    if let Some(&(first, _)) = r.history.first()
        && r.now.saturating_sub(first) < 3_500_000
    {
        let _ = write!(
            h,
            "<p class=\"muted\">Sampled every {}s since the status endpoint started {} ago.</p>",
            super::state::SAMPLE_EVERY_SECS,
            ago(r.now.saturating_sub(first) as f64 / 1000.0)
        );
    }
    h.push_str("</section>");

    h.push_str("<section id=\"queued\"><h2>Waiting messages (oldest first)</h2>");
    if r.messages.is_empty() {
        h.push_str("<p class=\"muted\">The queue is empty.</p>");
    } else {
        h.push_str(
            "<table><tr><th>queue id</th><th>arrived</th><th>from</th><th>to</th><th>attempts</th><th>next try</th><th>reason</th></tr>",
        );
        for m in &r.messages {
            let to: Vec<String> = m.recipients.iter().map(|p| esc(&p.address)).collect();
            let reasons: Vec<String> = m
                .recipients
                .iter()
                .filter_map(|p| p.reason.as_deref().map(esc))
                .collect();
            let _ = write!(
                h,
                "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"reason\">{}</td></tr>",
                esc(&m.queue_id),
                if m.held { " (on hold)" } else { "" },
                since(r.now, m.arrival_ms),
                if m.sender.is_empty() {
                    "&lt;&gt;".to_string()
                } else {
                    esc(&m.sender)
                },
                to.join("<br>"),
                m.attempts,
                match m.next_attempt_ms {
                    Some(t) if t > r.now => format!("in {}", ago((t - r.now) as f64 / 1000.0)),
                    Some(_) => "now".to_string(),
                    None => "-".to_string(),
                },
                reasons.join("<br>"),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");

    h.push_str("<section id=\"failures\"><h2>Last failures</h2>");
    attempts(
        &mut h,
        &r.recent_failures,
        r.now,
        "No failures since relayq started.",
    );
    h.push_str("</section><section id=\"deliveries\"><h2>Last deliveries</h2>");
    attempts(
        &mut h,
        &r.recent_deliveries,
        r.now,
        "No deliveries since relayq started.",
    );
    h.push_str(
        "</section><p class=\"muted\">Also: <a href=\"/status\">/status</a> (JSON), \
         <a href=\"/metrics\">/metrics</a> (Prometheus), <a href=\"/healthz\">/healthz</a>.</p></body></html>\n",
    );
    h
}

fn attempts(h: &mut String, list: &[RecentAttempt], now: u64, empty: &str) {
    if list.is_empty() {
        let _ = write!(h, "<p class=\"muted\">{empty}</p>");
        return;
    }
    h.push_str("<table><tr><th>when</th><th>queue id</th><th>to</th><th>relay</th><th>status</th><th>delay</th><th>reply</th></tr>");
    for a in list {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ({})</td><td>{:.2}s</td><td class=\"reason\">{}</td></tr>",
            since(now, a.at_ms),
            esc(&a.queue_id),
            esc(&a.to),
            esc(&a.relay),
            a.status,
            esc(&a.dsn),
            a.delay,
            esc(&a.reply),
        );
    }
    h.push_str("</table>");
}

/// Queue size over the last hour as an SVG step line. Samples are
/// (unix ms, messages); the last one is "now".
pub fn chart(samples: &[(u64, usize)], now_ms: u64) -> String {
    const W: f64 = 600.0;
    const H: f64 = 120.0;
    const LEFT: f64 = 40.0;
    const BOTTOM: f64 = 20.0;
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0).max(1);
    let start = now_ms.saturating_sub(3_600_000);
    let x = |t: u64| LEFT + (t.saturating_sub(start) as f64 / 3_600_000.0) * (W - LEFT - 5.0);
    let y = |n: usize| 5.0 + (1.0 - n as f64 / max as f64) * (H - BOTTOM - 5.0);
    let mut points = String::new();
    let mut prev: Option<usize> = None;
    for &(t, n) in samples {
        if let Some(p) = prev {
            let _ = write!(points, "{:.1},{:.1} ", x(t), y(p));
        }
        let _ = write!(points, "{:.1},{:.1} ", x(t), y(n));
        prev = Some(n);
    }
    let current = samples.last().map_or(0, |s| s.1);
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg role=\"img\" aria-labelledby=\"chart-title\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <title id=\"chart-title\">Queue size over the last hour: {current} now, at most {max_seen}</title>\
         <line x1=\"{LEFT}\" y1=\"{base:.1}\" x2=\"{right:.1}\" y2=\"{base:.1}\" stroke=\"#999\"/>\
         <line x1=\"{LEFT}\" y1=\"5\" x2=\"{LEFT}\" y2=\"{base:.1}\" stroke=\"#999\"/>\
         <text x=\"{lx:.1}\" y=\"12\" font-size=\"11\" text-anchor=\"end\">{max}</text>\
         <text x=\"{lx:.1}\" y=\"{base:.1}\" font-size=\"11\" text-anchor=\"end\">0</text>\
         <text x=\"{LEFT}\" y=\"{H}\" font-size=\"11\" dy=\"-4\">1 hour ago</text>\
         <text x=\"{right:.1}\" y=\"{H}\" font-size=\"11\" dy=\"-4\" text-anchor=\"end\">now</text>\
         <polyline fill=\"none\" stroke=\"#1f5fbf\" stroke-width=\"2\" points=\"{points}\"/></svg>",
        max_seen = samples.iter().map(|s| s.1).max().unwrap_or(0),
        base = H - BOTTOM,
        right = W - 5.0,
        lx = LEFT - 4.0,
        points = points.trim_end(),
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    /// The "Relays and limits" cell of every relay state is markup with
    /// its outside values escaped, never escaped markup.
    #[test]
    fn relay_states_render_as_markup_with_values_escaped() {
        use crate::routing::quota::Period;
        use crate::routing::{LimitState, RelayState};
        let now = 1_800_000_000_000;
        let relay = |name: &str, state: &str| RelayState {
            name: name.into(),
            endpoint: "smtp.example.com:587".into(),
            state: state.into(),
            down_since_ms: None,
            paused_until_ms: None,
            last_error: None,
            connections: 0,
            max_connections: 4,
            concurrency: 3,
            adaptive: true,
            concurrency_change: Some(crate::routing::concurrency::Change {
                at_ms: now - 9_000,
                from: 4,
                to: 3,
                reason: crate::routing::concurrency::Reason::Refused,
                text: "4 -> 3: the relay refused one more connection (421 <too many>)".into(),
            }),
            limits: Vec::new(),
        };
        let mut down = relay("down<b>", "down");
        down.down_since_ms = Some(now - 4_000);
        let mut paused = relay("paused", "paused");
        paused.paused_until_ms = Some(now + 60_000);
        paused.down_since_ms = Some(now - 4_000);
        let mut capped = relay("capped", "up");
        capped.limits.push(LimitState {
            period: Period::Day,
            window: "rolling".into(),
            limit: 1,
            used: 1,
            left: 0,
            resets_at_ms: Some(now + 3_600_000),
            shared: false,
            fallback: false,
        });
        let report = StatusReport {
            hostname: "h".into(),
            version: "0",
            now,
            queue: super::super::http::QueueSummary {
                messages: 0,
                held: 0,
                bytes: 0,
                oldest_age_seconds: None,
            },
            relays: Vec::new(),
            routing: vec![relay("up", "up"), down, paused, capped],
            messages: Vec::new(),
            recent_deliveries: Vec::new(),
            recent_failures: Vec::new(),
            history: Vec::new(),
        };
        let html = render(&report);
        let routing = html.split("id=\"routing\"").nth(1).unwrap();
        let routing = routing.split("</section>").next().unwrap();
        assert!(!routing.contains("&lt;time"), "{routing}");
        assert!(
            routing.contains("down since <time datetime=\""),
            "{routing}"
        );
        assert!(routing.contains("4s ago</time>"), "{routing}");
        assert!(routing.contains("<td>down&lt;b&gt;</td>"), "{routing}");
        assert!(
            routing.contains("paused by the circuit breaker until 20"),
            "{routing}"
        );
        assert!(
            routing.contains(">up; day limit reached until 20"),
            "{routing}"
        );
        assert!(routing.contains(">up</td>"), "{routing}");
        assert!(
            routing.contains("0 open; concurrency 3 of at most 4 (adaptive): 4 -&gt; 3: the relay refused one more connection (421 &lt;too many&gt;), <time datetime=\""),
            "{routing}"
        );
        assert!(routing.contains("9s ago</time>"), "{routing}");
    }

    #[test]
    fn durations() {
        assert_eq!(ago(5.0), "5s");
        assert_eq!(ago(300.0), "5m");
        assert_eq!(ago(3_600.0 * 3.0 + 1_200.0), "3h 20m");
        assert_eq!(ago(86_400.0 * 2.0 + 3_600.0 * 4.0), "2d 4h");
    }

    #[test]
    fn chart_plots_samples_as_steps() {
        let now = 10_000_000;
        let svg = chart(&[(now - 3_600_000, 0), (now - 1_800_000, 4), (now, 2)], now);
        // Three samples: a start, then a vertical and a horizontal segment each.
        let points = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(points.split(' ').count(), 5, "{points}");
        assert!(svg.contains("2 now, at most 4"), "{svg}");
        // The first point is at the left edge and at the bottom (0).
        assert!(points.starts_with("40.0,100.0"), "{points}");
        // The last point is at the right edge, half way up (2 of 4).
        assert!(points.ends_with("595.0,52.5"), "{points}");
    }
}
