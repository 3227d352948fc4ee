//! Fleet-wide limits: relay counters shared by every relayq instance that
//! points `limits_backend` at the same Redis.
//!
//! One Lua script checks and counts every window of a relay atomically, so
//! twenty instances racing for the last slot of a daily cap get exactly one
//! winner. A rolling window is a sorted set of send times (a sliding log:
//! exact, and `limit` entries at most); a calendar window is a counter per
//! period that expires after it. Times come from relayq's clock, so the
//! instances' clocks must agree (NTP), as a provider's own counting assumes.
//!
//! Every call has a short timeout. When Redis cannot be reached the router
//! falls back to local counting at `redis_fallback_share` of each limit and
//! tries Redis again a few seconds later.
//!
//! # Security
//! Redis replies are untrusted: they are decoded as integers with lengths
//! checked. The URL may hold a password; only [`Fleet::display`] (without
//! it) is ever logged.

use std::time::Duration;

use super::quota::WindowSpec;

/// What Redis said to a request for one more message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Counted; `used` per window after counting.
    Granted { used: Vec<u32> },
    /// Full: the window at `index` reopens at `resumes_at`.
    Denied {
        index: usize,
        resumes_at: u64,
        used: Vec<u32>,
    },
}

/// How long one Redis round trip may take before Redis counts as down.
pub const TIMEOUT: Duration = Duration::from_millis(1500);

/// Keys and arguments of one script call: per window, a key and
/// (kind, span, limit, period end).
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
fn layout(relay: &str, specs: &[WindowSpec], now: u64) -> (Vec<String>, Vec<String>) {
    let mut keys = Vec::new();
    let mut args = Vec::new();
    for spec in specs {
        let label = spec.period.label();
        match spec.bounds(now) {
            Some((start, end)) => {
                keys.push(format!("relayq:limit:{relay}:{label}:{start}"));
                args.extend(["c".to_string(), spec.period.span_ms().to_string()]);
                args.extend([spec.limit.to_string(), end.to_string()]);
            }
            None => {
                keys.push(format!("relayq:limit:{relay}:{label}"));
                args.extend(["r".to_string(), spec.period.span_ms().to_string()]);
                args.extend([spec.limit.to_string(), "0".to_string()]);
            }
        }
    }
    (keys, args)
}

/// Decodes the script's reply: `{granted, index, used_at_index, resumes_at,
/// used_1 .. used_n}`.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
fn decode(reply: &[i64], windows: usize) -> Result<Answer, String> {
    if reply.len() != 4 + windows {
        return Err(format!(
            "unexpected reply from the limits script ({} values for {windows} windows)",
            reply.len()
        ));
    }
    let used = reply[4..]
        .iter()
        .map(|&n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
        .collect();
    if reply[0] == 1 {
        return Ok(Answer::Granted { used });
    }
    let index = usize::try_from(reply[1] - 1).map_err(|_| "bad window index".to_string())?;
    if index >= windows {
        return Err("bad window index in the limits script's reply".into());
    }
    Ok(Answer::Denied {
        index,
        resumes_at: u64::try_from(reply[3].max(0)).unwrap_or(0),
        used,
    })
}

/// The URL without any password, for logs.
pub fn display_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(feature = "redis")]
mod imp {
    use super::*;
    use redis::aio::{ConnectionManager, ConnectionManagerConfig};

    /// Checks every window, and with mode "acquire" counts the message in
    /// all of them only if none is full; "release" gives one back; "peek"
    /// only reads. Returns {granted, index, used_at_index, resumes_at,
    /// used_1 .. used_n}.
    const SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local member = ARGV[2]
local mode = ARGV[3]
local n = #KEYS
local used = {}
for i = 1, n do
  local b = 3 + (i - 1) * 4
  if ARGV[b + 1] == 'r' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - tonumber(ARGV[b + 2]))
    used[i] = redis.call('ZCARD', KEYS[i])
  else
    used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
end
if mode == 'release' then
  for i = 1, n do
    local b = 3 + (i - 1) * 4
    if ARGV[b + 1] == 'r' then
      used[i] = used[i] - redis.call('ZREM', KEYS[i], member)
    elseif used[i] > 0 then
      used[i] = redis.call('DECR', KEYS[i])
    end
  end
elseif mode == 'acquire' then
  local worst, worst_at = 0, 0
  for i = 1, n do
    local b = 3 + (i - 1) * 4
    local limit = tonumber(ARGV[b + 3])
    if used[i] >= limit then
      local at
      if ARGV[b + 1] == 'r' then
        local r = redis.call('ZRANGE', KEYS[i], used[i] - limit, used[i] - limit, 'WITHSCORES')
        at = tonumber(r[2]) + tonumber(ARGV[b + 2])
      else
        at = tonumber(ARGV[b + 4])
      end
      if at > worst_at then
        worst, worst_at = i, at
      end
    end
  end
  if worst > 0 then
    local out = {0, worst, used[worst], worst_at}
    for i = 1, n do out[#out + 1] = used[i] end
    return out
  end
  for i = 1, n do
    local b = 3 + (i - 1) * 4
    if ARGV[b + 1] == 'r' then
      redis.call('ZADD', KEYS[i], now, member)
      redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[b + 2]))
    else
      redis.call('INCR', KEYS[i])
      redis.call('PEXPIREAT', KEYS[i], tonumber(ARGV[b + 4]) + 60000)
    end
    used[i] = used[i] + 1
  end
end
local out = {1, 0, 0, 0}
for i = 1, n do out[#out + 1] = used[i] end
return out
"#;

    pub struct Fleet {
        display: String,
        conn: ConnectionManager,
        script: redis::Script,
    }

    impl Fleet {
        /// Prepares the client; the connection is made on first use (and
        /// remade after failures), so a Redis that is down at start only
        /// means starting in fallback.
        pub fn new(url: &str) -> Result<Fleet, String> {
            let display = display_url(url);
            let client =
                redis::Client::open(url).map_err(|e| format!("limits_backend {display}: {e}"))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(TIMEOUT);
            let conn = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| format!("limits_backend {display}: {e}"))?;
            Ok(Fleet {
                display,
                conn,
                script: redis::Script::new(SCRIPT),
            })
        }

        pub fn display(&self) -> &str {
            &self.display
        }

        async fn call(
            &self,
            mode: &str,
            relay: &str,
            specs: &[WindowSpec],
            now: u64,
            member: &str,
        ) -> Result<Answer, String> {
            let (keys, args) = layout(relay, specs, now);
            let mut inv = self.script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            inv.arg(now).arg(member).arg(mode);
            for a in &args {
                inv.arg(a);
            }
            // After an outage the manager answers the first call with the
            // old connection's error and reconnects in the background; the
            // second call waits for that new connection.
            let mut last = String::new();
            for _ in 0..2 {
                let mut conn = self.conn.clone();
                match tokio::time::timeout(TIMEOUT, inv.invoke_async::<Vec<i64>>(&mut conn)).await {
                    Ok(Ok(reply)) => return decode(&reply, specs.len()),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => return Err(format!("no reply within {TIMEOUT:?}")),
                }
            }
            Err(last)
        }

        /// Counts one message for `relay` if every window has room.
        pub async fn acquire(
            &self,
            relay: &str,
            specs: &[WindowSpec],
            now: u64,
            member: &str,
        ) -> Result<Answer, String> {
            self.call("acquire", relay, specs, now, member).await
        }

        /// Gives back a message counted at `at` that the relay never took.
        pub async fn release(
            &self,
            relay: &str,
            specs: &[WindowSpec],
            at: u64,
            member: &str,
        ) -> Result<(), String> {
            self.call("release", relay, specs, at, member)
                .await
                .map(|_| ())
        }

        /// The counts now, for listings.
        pub async fn peek(
            &self,
            relay: &str,
            specs: &[WindowSpec],
            now: u64,
        ) -> Result<Vec<u32>, String> {
            match self.call("peek", relay, specs, now, "").await? {
                Answer::Granted { used } | Answer::Denied { used, .. } => Ok(used),
            }
        }
    }
}

#[cfg(not(feature = "redis"))]
mod imp {
    use super::*;

    /// Built without the `redis` feature: the config check refuses
    /// `limits_backend`, so this is never constructed.
    pub struct Fleet {
        display: String,
    }

    impl Fleet {
        pub fn new(url: &str) -> Result<Fleet, String> {
            Err(format!(
                "limits_backend {}: this relayq was built without the \"redis\" feature",
                display_url(url)
            ))
        }
        pub fn display(&self) -> &str {
            &self.display
        }
        pub async fn acquire(
            &self,
            _: &str,
            _: &[WindowSpec],
            _: u64,
            _: &str,
        ) -> Result<Answer, String> {
            Err("no redis support".into())
        }
        pub async fn release(
            &self,
            _: &str,
            _: &[WindowSpec],
            _: u64,
            _: &str,
        ) -> Result<(), String> {
            Err("no redis support".into())
        }
        pub async fn peek(&self, _: &str, _: &[WindowSpec], _: u64) -> Result<Vec<u32>, String> {
            Err("no redis support".into())
        }
    }
}

pub use imp::Fleet;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::quota::Period;

    #[test]
    fn keys_and_replies() {
        let specs = [
            WindowSpec {
                period: Period::Day,
                limit: 500,
                calendar: None,
            },
            WindowSpec {
                period: Period::Hour,
                limit: 50,
                calendar: Some(jiff::tz::TimeZone::UTC),
            },
        ];
        let (keys, args) = layout("ses", &specs, 7_200_000 + 5);
        assert_eq!(
            keys,
            ["relayq:limit:ses:day", "relayq:limit:ses:hour:7200000"]
        );
        assert_eq!(
            args,
            [
                "r", "86400000", "500", "0", "c", "3600000", "50", "10800000"
            ]
        );
        assert_eq!(
            decode(&[1, 0, 0, 0, 3, 4], 2),
            Ok(Answer::Granted { used: vec![3, 4] })
        );
        assert_eq!(
            decode(&[0, 2, 50, 10_800_000, 20, 50], 2),
            Ok(Answer::Denied {
                index: 1,
                resumes_at: 10_800_000,
                used: vec![20, 50]
            })
        );
        assert!(decode(&[0, 3, 0, 0, 1, 1], 2).is_err());
        assert!(decode(&[1], 2).is_err());
        assert_eq!(
            display_url("redis://:s3cret@10.0.0.5:6379/2"),
            "redis://10.0.0.5:6379/2"
        );
    }
}
