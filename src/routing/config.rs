//! The routing part of the configuration: the `[relay]` table in its two
//! forms, `[[route]]` entries, and the checks that need all of them.
//!
//! `[relay]` is either one relay (`host = ...` directly inside it, the
//! original form, which becomes the relay named `default`) or a table of
//! named relays (`[relay.sendgrid]`, `[relay.ses]`). Which form it is, is
//! decided by the first key: a key of [`RelayConfig`] means the single
//! form. The values are deserialized straight from the TOML parser (not
//! through an intermediate value), so errors keep their file, line and key.

use std::fmt;
use std::sync::OnceLock;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::config::{ConcurrencyConfig, MAX_RELAY_CONNECTIONS, RelayConfig};

/// The name the single `[relay]` form gets.
pub const DEFAULT_RELAY: &str = "default";

/// Every key of [`RelayConfig`], read from its own `Deserialize` impl (which
/// hands its field names to `deserialize_struct`), so the list can never
/// fall behind the struct. The first key of `[relay]` being one of these
/// means the single form.
pub fn relay_keys() -> &'static [&'static str] {
    static KEYS: OnceLock<&'static [&'static str]> = OnceLock::new();
    KEYS.get_or_init(struct_fields::<RelayConfig>)
}

/// The field names of a config struct, from its own `Deserialize` impl.
pub fn struct_fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields = None;
    let _ = T::deserialize(FieldNames(&mut fields));
    fields.unwrap_or(&[])
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(de::Error::custom("field names only"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("field names only"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// How hourly and daily limits count.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuotaWindow {
    /// The last 60 minutes / 24 hours, sliding (Gmail's daily limit works so).
    #[default]
    Rolling,
    /// The current clock hour / calendar day in `timezone` (SendGrid-style
    /// plans that reset at midnight).
    Calendar,
}

/// One relay with its name.
#[derive(Debug, Clone)]
pub struct NamedRelay {
    pub name: String,
    pub relay: RelayConfig,
}

/// The `[relay]` table as written.
#[derive(Debug, Clone)]
pub enum RelaySection {
    Single(Box<RelayConfig>),
    Named(Vec<NamedRelay>),
}

impl RelaySection {
    /// Every relay with its name, sorted by name.
    pub fn relays(&self) -> Vec<NamedRelay> {
        match self {
            RelaySection::Single(r) => vec![NamedRelay {
                name: DEFAULT_RELAY.to_string(),
                relay: (**r).clone(),
            }],
            RelaySection::Named(v) => v.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for RelaySection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(SectionVisitor)
    }
}

struct SectionVisitor;

impl<'de> Visitor<'de> for SectionVisitor {
    type Value = RelaySection;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a [relay] table with host = \"...\", or named relays like [relay.sendgrid]")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RelaySection, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            return Err(de::Error::custom(
                "[relay] is empty: set host = \"...\", or add named relays like [relay.sendgrid]",
            ));
        };
        if relay_keys().contains(&first.as_str()) {
            let replay = Replay {
                first: Some(first),
                inner: map,
            };
            let relay = RelayConfig::deserialize(de::value::MapAccessDeserializer::new(replay))?;
            return Ok(RelaySection::Single(Box::new(relay)));
        }
        let mut relays = Vec::new();
        let mut name = first;
        loop {
            let relay = map.next_value_seed(NamedSeed { name: &name })?;
            relays.push(NamedRelay { name, relay });
            match map.next_key::<String>()? {
                Some(next) if relay_keys().contains(&next.as_str()) => {
                    return Err(de::Error::custom(format!(
                        "`{next}` directly in [relay] cannot be mixed with named relays: move it into each [relay.NAME] table"
                    )));
                }
                Some(next) => name = next,
                None => break,
            }
        }
        Ok(RelaySection::Named(relays))
    }
}

/// Hands the already-read first key back to the struct deserializer, then
/// passes everything else through untouched (spans included).
struct Replay<A> {
    first: Option<String>,
    inner: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Replay<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        match self.first.take() {
            Some(key) => {
                let key: de::value::StringDeserializer<A::Error> = key.into_deserializer();
                seed.deserialize(key).map(Some)
            }
            None => self.inner.next_key_seed(seed),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(seed)
    }
}

/// A named relay's table; a non-table value means the user mistyped a key
/// of the single form, which deserves a better message than "expected
/// struct RelayConfig".
struct NamedSeed<'a> {
    name: &'a str,
}

impl<'de> DeserializeSeed<'de> for NamedSeed<'_> {
    type Value = RelayConfig;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RelayConfig, D::Error> {
        RelayConfig::deserialize(d).map_err(|e| {
            let text = e.to_string();
            if text.contains("expected struct RelayConfig") {
                de::Error::custom(format!(
                    "unknown key `{}` in [relay]; expected one of {} (or named relays as tables like [relay.sendgrid])",
                    self.name,
                    relay_keys().join(", ")
                ))
            } else {
                e
            }
        })
    }
}

/// One `[[route]]`: which mail goes to which relay, and where it goes when
/// that relay is down or over its limits. Every match key given must match;
/// a route with none matches all mail (the default route).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Envelope sender domains (exact, case-insensitive).
    #[serde(default, deserialize_with = "one_or_many")]
    pub sender_domain: Vec<String>,
    /// Envelope sender addresses (case-insensitive).
    #[serde(default, deserialize_with = "one_or_many")]
    pub sender: Vec<String>,
    /// `"Name: value"`: a header of the message (case-insensitive name and
    /// value). Headers named `X-Relayq-*` are removed before relaying.
    #[serde(default)]
    pub header: Option<String>,
    /// The relay this mail goes to.
    pub relay: String,
    /// Relays tried in order when `relay` is down past its
    /// `failover_after`, paused, or over a limit.
    #[serde(default, deserialize_with = "one_or_many")]
    pub fallback: Vec<String>,
}

impl RouteConfig {
    pub fn is_catch_all(&self) -> bool {
        self.sender_domain.is_empty() && self.sender.is_empty() && self.header.is_none()
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    match Raw::deserialize(d) {
        Ok(Raw::One(s)) => Ok(vec![s]),
        Ok(Raw::Many(v)) => Ok(v),
        Err(_) => Err(de::Error::custom("expected a string or a list of strings")),
    }
}

/// Splits `"X-Relayq-Relay: ses"` into a header name and value.
pub fn parse_header_match(s: &str) -> Option<(String, String)> {
    let (name, value) = s.split_once(':')?;
    let name = name.trim();
    let value = value.trim();
    let token = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    (token && !value.is_empty()).then(|| (name.to_string(), value.to_string()))
}

/// A relay name usable in logs, Redis keys and the control protocol.
pub fn valid_relay_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Checks of one relay that go beyond what the single form had. Returns
/// the offending key (without the `relay.` prefix) and a message.
pub fn check_relay_limits(relay: &RelayConfig) -> Result<(), (&'static str, String)> {
    if relay.max_connections == Some(0) {
        return Err(("max_connections", "must be at least 1".into()));
    }
    let too_many = format!(
        "must be at most {MAX_RELAY_CONNECTIONS} (each connection is a delivery worker and an open file)"
    );
    if relay.max_connections > Some(MAX_RELAY_CONNECTIONS) {
        return Err(("max_connections", too_many));
    }
    if matches!(relay.concurrency, ConcurrencyConfig::Fixed(n) if n > MAX_RELAY_CONNECTIONS) {
        return Err(("concurrency", too_many));
    }
    // Both set and at odds: the status page would show a number nobody
    // wrote ("4: fixed by concurrency = 4" for concurrency = 8).
    if let (ConcurrencyConfig::Fixed(n), Some(max)) = (relay.concurrency, relay.max_connections)
        && n > max
    {
        return Err((
            "concurrency",
            format!(
                "{n} is more than max_connections = {max}: lower concurrency, or raise or remove max_connections"
            ),
        ));
    }
    if relay.max_messages_per_connection == Some(0) {
        return Err((
            "max_messages_per_connection",
            "must be at least 1 (leave it out for no limit)".into(),
        ));
    }
    for (key, v) in [
        ("messages_per_second", relay.messages_per_second),
        ("messages_per_hour", relay.messages_per_hour),
        ("messages_per_day", relay.messages_per_day),
    ] {
        if v == Some(0) {
            return Err((
                key,
                "must be at least 1 (to stop a relay, route mail elsewhere or hold it)".into(),
            ));
        }
    }
    if let Some(tz) = &relay.timezone {
        if let Err(e) = jiff::tz::TimeZone::get(tz) {
            return Err((
                "timezone",
                format!(
                    "unknown time zone {tz:?} ({e}); use an IANA name like \"Europe/Berlin\" or \"UTC\""
                ),
            ));
        }
        if relay.window != QuotaWindow::Calendar {
            return Err(("timezone", "only applies to window = \"calendar\"".into()));
        }
    }
    if relay.breaker_failures == 0 {
        return Err(("breaker_failures", "must be at least 1".into()));
    }
    if relay.breaker_pause.0.is_zero() || relay.breaker_pause_max.0 < relay.breaker_pause.0 {
        return Err((
            "breaker_pause_max",
            "breaker_pause must be above zero and breaker_pause_max at least breaker_pause".into(),
        ));
    }
    Ok(())
}

/// Checks routes against the relays. Returns the key and a message.
pub fn check_routes(relays: &[NamedRelay], routes: &[RouteConfig]) -> Result<(), (String, String)> {
    let known = |name: &str| relays.iter().any(|r| r.name == name);
    let names = || {
        relays
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in relays {
        if !valid_relay_name(&r.name) {
            return Err((
                format!("relay.{}", r.name),
                "relay names may use letters, digits, '-', '_' and '.' (at most 64)".into(),
            ));
        }
    }
    for (i, route) in routes.iter().enumerate() {
        let key = |k: &str| format!("route[{i}].{k}");
        if !known(&route.relay) {
            return Err((
                key("relay"),
                format!(
                    "no relay named {:?}; the relays are: {}",
                    route.relay,
                    names()
                ),
            ));
        }
        for f in &route.fallback {
            if !known(f) {
                return Err((
                    key("fallback"),
                    format!("no relay named {f:?}; the relays are: {}", names()),
                ));
            }
            if *f == route.relay {
                return Err((key("fallback"), format!("{f:?} is the route's own relay")));
            }
        }
        for d in &route.sender_domain {
            if d.trim().is_empty() || d.contains('@') {
                return Err((
                    key("sender_domain"),
                    format!("{d:?} is not a domain (write \"example.com\", no @)"),
                ));
            }
        }
        for s in &route.sender {
            if !s.contains('@') {
                return Err((
                    key("sender"),
                    format!("{s:?} is not an address (for a whole domain use sender_domain)"),
                ));
            }
        }
        if let Some(h) = &route.header
            && parse_header_match(h).is_none()
        {
            return Err((
                key("header"),
                format!("{h:?}: write it as \"Header-Name: value\", e.g. \"X-Relayq-Relay: ses\""),
            ));
        }
        if route.is_catch_all() && i + 1 != routes.len() {
            return Err((
                key("relay"),
                "a route without sender_domain, sender or header matches all mail, so it must be the last [[route]]".into(),
            ));
        }
    }
    let has_default =
        routes.iter().any(RouteConfig::is_catch_all) || relays.len() == 1 || known(DEFAULT_RELAY);
    if !has_default {
        return Err((
            "route".into(),
            format!(
                "with several relays ({}) mail that no route matches needs a default: add a last [[route]] with only relay = \"...\" (and fallback = [...])",
                names()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_keys_come_from_the_struct() {
        let keys = relay_keys();
        for key in [
            "host",
            "port",
            "tls",
            "password_file",
            "messages_per_day",
            "timezone",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        // Each is accepted by RelayConfig (a sample value per type).
        for key in keys {
            let value = match *key {
                "port"
                | "concurrency"
                | "max_connections"
                | "max_messages_per_connection"
                | "messages_per_second"
                | "messages_per_hour"
                | "messages_per_day"
                | "breaker_failures" => "1".to_string(),
                "insecure" => "true".into(),
                "tls" => "\"none\"".into(),
                "window" => "\"calendar\"".into(),
                "auth_mechanism" => "\"plain\"".into(),
                k if k.ends_with("timeout")
                    || k.starts_with("breaker")
                    || k == "failover_after" =>
                {
                    "\"1s\"".into()
                }
                _ => "\"x\"".into(),
            };
            let text = if *key == "host" {
                "host = \"h\"\n".to_string()
            } else {
                format!("host = \"h\"\n{key} = {value}\n")
            };
            // Keys added by later work may need other sample values; what
            // matters here is that the name itself is known.
            if let Err(e) = toml::from_str::<RelayConfig>(&text) {
                assert!(!e.to_string().contains("unknown field"), "{key}: {e}");
            }
        }
    }

    #[test]
    fn header_match_parsing() {
        assert_eq!(
            parse_header_match("X-Relayq-Relay: ses"),
            Some(("X-Relayq-Relay".into(), "ses".into()))
        );
        assert_eq!(parse_header_match("X-Relayq-Relay:"), None);
        assert_eq!(parse_header_match("no colon"), None);
        assert_eq!(parse_header_match("Bad Name: x"), None);
    }

    use crate::config::{Config, ConfigError, TransportKind};
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/relayq/relayq.toml"))
    }

    const TWO: &str = r#"
[relay.sendgrid]
host = "127.0.0.1"
port = 2601
tls = "none"
messages_per_day = 500
window = "calendar"
timezone = "Europe/Berlin"
max_connections = 3

[relay.ses]
host = "127.0.0.1"
port = 2602
tls = "none"
messages_per_second = 14

[[route]]
sender_domain = ["a.example", "A2.example"]
relay = "sendgrid"
fallback = "ses"

[[route]]
header = "X-Relayq-Relay: ses"
relay = "ses"

[[route]]
relay = "ses"
fallback = ["sendgrid"]
"#;

    #[test]
    fn named_relays_and_routes() {
        let c = parse(TWO).unwrap();
        assert_eq!(c.transport_kind(), TransportKind::Relay);
        assert!(c.relay.is_none());
        let names: Vec<&str> = c.relays.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["sendgrid", "ses"]);
        let sg = &c.relays[0].relay;
        assert_eq!(sg.connections(), 3);
        assert_eq!(sg.messages_per_day, Some(500));
        assert_eq!(sg.window, QuotaWindow::Calendar);
        assert_eq!(c.route.len(), 3);
        assert_eq!(c.route[0].fallback, ["ses"]);
        assert_eq!(c.route[0].sender_domain, ["a.example", "A2.example"]);
        assert!(c.route[2].is_catch_all());
    }

    /// A relay at one of our own listen addresses would send every
    /// message back to relayq: refused, however it is spelt.
    #[test]
    fn a_relay_at_our_own_listen_address_is_a_loop() {
        let loops = [
            "[relay]\nhost = \"127.0.0.1\"\nport = 25\ntls = \"none\"\n",
            "[relay]\nhost = \"localhost\"\nport = 25\ntls = \"none\"\n",
            "[relay]\nhost = \"::1\"\nport = 25\ntls = \"none\"\n",
            "[smtp]\nlisten = [\"0.0.0.0:2525\"]\nallow_networks = [\"127.0.0.0/8\"]\n[relay]\nhost = \"127.0.0.1\"\nport = 2525\ntls = \"none\"\n",
            "[relay.a]\nhost = \"127.0.0.1\"\nport = 587\ntls = \"none\"\n[relay.b]\nhost = \"127.0.0.1\"\nport = 25\ntls = \"none\"\n[[route]]\nrelay = \"a\"\n",
        ];
        for text in loops {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("own listen address"), "{text}: {e}");
        }
        for fine in [
            "[relay]\nhost = \"127.0.0.1\"\nport = 2525\ntls = \"none\"\n",
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n[relay]\nhost = \"127.0.0.1\"\nport = 25\ntls = \"none\"\n",
        ] {
            parse(fine).unwrap();
        }
    }

    #[test]
    fn the_single_form_is_the_default_relay() {
        let c = parse("[relay]\nhost = \"127.0.0.1\"\ntls = \"none\"\nconcurrency = 2\n").unwrap();
        assert_eq!(c.relays.len(), 1);
        assert_eq!(c.relays[0].name, DEFAULT_RELAY);
        assert_eq!(c.relay.as_ref().unwrap().connections(), 2);
        // Limits work in the single form too.
        let c = parse(
            "[relay]\nport = 2525\nhost = \"127.0.0.1\"\ntls = \"none\"\nmessages_per_day = 3\n",
        )
        .unwrap();
        assert_eq!(c.relays[0].relay.messages_per_day, Some(3));
    }

    #[test]
    fn errors_in_named_relays_name_the_line_and_key() {
        let err = parse("[relay.ses]\nhost = \"127.0.0.1\"\nport = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3") && err.contains("port"), "{err}");
        let err = parse("[relay.ses]\nhost = \"smtp.example.com\"\ntls = \"none\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("relay.ses.tls"), "{err}");
        let err = parse("[relay]\nhots = \"127.0.0.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown key `hots`") && err.contains("line 2"),
            "{err}"
        );
        let err = parse("[relay.ses]\nhost = \"127.0.0.1\"\n[relay]\nport = 1\n")
            .unwrap_err()
            .to_string();
        // Depending on which key comes first, one of two messages.
        assert!(
            err.contains("cannot be mixed") || err.contains("unknown field `ses`"),
            "{err}"
        );
    }

    #[test]
    fn bad_routes_are_refused() {
        let relays = "[relay.a]\nhost = \"127.0.0.1\"\ntls = \"none\"\n[relay.b]\nhost = \"127.0.0.1\"\ntls = \"none\"\n";
        let cases = [
            ("[[route]]\nrelay = \"c\"\n", "no relay named \"c\""),
            (
                "[[route]]\nrelay = \"a\"\nfallback = [\"a\"]\n",
                "own relay",
            ),
            (
                "[[route]]\nsender_domain = \"x@y\"\nrelay = \"a\"\n[[route]]\nrelay = \"b\"\n",
                "not a domain",
            ),
            (
                "[[route]]\nheader = \"X-Relayq-Relay\"\nrelay = \"a\"\n[[route]]\nrelay = \"b\"\n",
                "Header-Name: value",
            ),
            (
                "[[route]]\nrelay = \"a\"\n[[route]]\nsender = \"x@y\"\nrelay = \"b\"\n",
                "must be the last",
            ),
            (
                "[[route]]\nsender = \"x@y\"\nrelay = \"b\"\n",
                "needs a default",
            ),
            (
                "[[route]]\nrelay = \"a\"\nsender_domains = \"x\"\n",
                "unknown field",
            ),
        ];
        for (routes, want) in cases {
            let err = parse(&format!("{relays}{routes}")).unwrap_err().to_string();
            assert!(err.contains(want), "{routes}: {err}");
        }
        assert!(
            parse(&format!(
                "{relays}[[route]]\nrelay = \"b\"\nfallback = \"a\"\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn bad_limits_are_refused() {
        let base = "[relay.a]\nhost = \"127.0.0.1\"\ntls = \"none\"\n";
        let cases = [
            ("messages_per_day = 0\n", "relay.a.messages_per_day"),
            (
                "window = \"calendar\"\ntimezone = \"Mars/Olympus\"\n",
                "unknown time zone",
            ),
            ("timezone = \"UTC\"\n", "only applies to window"),
            ("window = \"weekly\"\n", "window"),
            (
                "breaker_pause = \"10s\"\nbreaker_pause_max = \"5s\"\n",
                "breaker_pause_max",
            ),
            (
                "max_messages_per_connection = 0\n",
                "max_messages_per_connection",
            ),
        ];
        for (extra, want) in cases {
            let err = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.contains(want), "{extra}: {err}");
        }
        let c = parse(&format!(
            "limits_backend = \"redis://:hunter2@127.0.0.1:6379\"\n{base}"
        ));
        if let Ok(c) = c {
            assert!(!format!("{c:?}").contains("hunter2"));
        }
        let err = parse(&format!(
            "limits_backend = \"rediss://:hunter2@x:6379\"\n{base}"
        ))
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse(&format!("limits_backend = \"http://x\"\n{base}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis://"), "{err}");
        let err = parse(&format!("redis_fallback_share = 1.5\n{base}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("redis_fallback_share"), "{err}");
        let fleet = parse(&format!(
            "limits_backend = \"redis://127.0.0.1:6379\"\nredis_fallback_share = 0.25\n{base}"
        ));
        if cfg!(feature = "redis") {
            assert!(fleet.is_ok(), "{fleet:?}");
        } else {
            let err = fleet.unwrap_err().to_string();
            assert!(err.contains("without the \"redis\" cargo feature"), "{err}");
        }
    }

    #[test]
    fn the_readme_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let section = readme
            .split("## Several relays, failover and quotas")
            .nth(1)
            .expect("README section");
        let example = section
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml example");
        // Without Redis support the example is refused for limits_backend
        // alone; check the rest.
        let example: String = example
            .lines()
            .filter(|l| cfg!(feature = "redis") || !l.starts_with("limits_backend"))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = parse(&example).unwrap_or_else(|e| panic!("README example: {e}"));
        assert_eq!(c.relays.len(), 2);
        assert_eq!(c.route.len(), 4);
        if cfg!(feature = "redis") {
            assert!(c.limits_backend.is_some());
        }
    }
}
