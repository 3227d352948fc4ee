//! The route table: from a message's envelope sender and headers to an
//! ordered list of relays (the primary, then its fallbacks), with the
//! reason, for the log. Pure: no state, no I/O.

use super::config::{DEFAULT_RELAY, NamedRelay, RouteConfig, parse_header_match};
use super::headers;

/// Index of a relay in the router's list.
pub type RelayId = usize;

#[derive(Debug)]
struct Route {
    domains: Vec<String>,
    senders: Vec<String>,
    header: Option<(String, String)>,
    /// Primary first, then fallbacks.
    relays: Vec<RelayId>,
}

/// What the table says about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// Relays in order of preference.
    pub relays: Vec<RelayId>,
    /// "sender domain b.example", "header X-Relayq-Relay: ses", "default".
    pub reason: String,
}

#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Used when no route matches.
    default: Vec<RelayId>,
}

impl RouteTable {
    /// Compiles validated routes. Relay names that don't resolve (the config
    /// validation refuses them) are skipped rather than panicking.
    pub fn new(relays: &[NamedRelay], routes: &[RouteConfig]) -> RouteTable {
        let id = |name: &str| relays.iter().position(|r| r.name == name);
        let compiled = routes
            .iter()
            .map(|r| Route {
                domains: r
                    .sender_domain
                    .iter()
                    .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
                senders: r.sender.iter().map(|s| s.trim().to_lowercase()).collect(),
                header: r.header.as_deref().and_then(parse_header_match),
                relays: std::iter::once(r.relay.as_str())
                    .chain(r.fallback.iter().map(String::as_str))
                    .filter_map(id)
                    .collect(),
            })
            .filter(|r| !r.relays.is_empty())
            .collect();
        let default = id(DEFAULT_RELAY).unwrap_or(0);
        RouteTable {
            routes: compiled,
            default: if relays.is_empty() {
                Vec::new()
            } else {
                vec![default]
            },
        }
    }

    /// The relay lists mail can be routed to: each route's up to the first
    /// that matches every message (no match keys), and the default's when
    /// no such route hides it.
    pub fn reachable(&self) -> Vec<&[RelayId]> {
        let mut lists = Vec::new();
        for route in &self.routes {
            lists.push(route.relays.as_slice());
            if route.domains.is_empty() && route.senders.is_empty() && route.header.is_none() {
                return lists;
            }
        }
        lists.push(self.default.as_slice());
        lists
    }

    /// The first route whose every match key matches; else the default.
    pub fn route(&self, sender: &str, message: &[u8]) -> Routed {
        let sender_lc = sender.to_lowercase();
        let domain = sender_lc
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('.').to_string())
            .unwrap_or_default();
        for route in &self.routes {
            let mut why = Vec::new();
            if !route.domains.is_empty() {
                if sender.is_empty() || !route.domains.contains(&domain) {
                    continue;
                }
                why.push(format!("sender domain {domain}"));
            }
            if !route.senders.is_empty() {
                if !route.senders.contains(&sender_lc) {
                    continue;
                }
                why.push(format!("sender {sender}"));
            }
            if let Some((name, value)) = &route.header {
                let found = headers::values(message, name);
                if !found.iter().any(|v| v.eq_ignore_ascii_case(value)) {
                    continue;
                }
                why.push(format!("header {name}: {value}"));
            }
            return Routed {
                relays: route.relays.clone(),
                reason: if why.is_empty() {
                    "default".into()
                } else {
                    why.join(", ")
                },
            };
        }
        Routed {
            relays: self.default.clone(),
            reason: "default".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn table(text: &str) -> RouteTable {
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        RouteTable::new(&c.relays, &c.route)
    }

    const CONFIG: &str = r#"
[relay.a]
host = "127.0.0.1"
tls = "none"
[relay.b]
host = "127.0.0.1"
tls = "none"
[relay.c]
host = "127.0.0.1"
tls = "none"

[[route]]
header = "X-Relayq-Relay: c"
relay = "c"

[[route]]
sender_domain = "b.example"
relay = "b"
fallback = ["a"]

[[route]]
sender = "Boss@A.example"
relay = "c"
fallback = ["b", "a"]

[[route]]
relay = "a"
fallback = "b"
"#;

    #[test]
    fn routes_by_domain_address_header_and_default() {
        let t = table(CONFIG);
        let plain = b"Subject: x\r\n\r\nbody\r\n";
        let r = t.route("app@B.Example", plain);
        assert_eq!(r.relays, [1, 0]);
        assert_eq!(r.reason, "sender domain b.example");
        let r = t.route("boss@a.example", plain);
        assert_eq!(r.relays, [2, 1, 0]);
        assert_eq!(r.reason, "sender boss@a.example");
        let r = t.route("app@a.example", plain);
        assert_eq!(
            (r.relays.as_slice(), r.reason.as_str()),
            (&[0, 1][..], "default")
        );
        let r = t.route("", plain);
        assert_eq!(r.relays, [0, 1], "the null sender takes the default route");
        let tagged = b"Subject: x\r\nx-relayq-relay:  C \r\n\r\n";
        let r = t.route("app@b.example", tagged);
        assert_eq!(r.relays, [2]);
        assert_eq!(r.reason, "header X-Relayq-Relay: c");
        // A header in the body is not a header.
        let r = t.route("app@b.example", b"Subject: x\r\n\r\nX-Relayq-Relay: c\r\n");
        assert_eq!(r.relays, [1, 0]);
    }

    #[test]
    fn reachable_lists_stop_at_a_route_for_every_message() {
        let t = table(CONFIG);
        assert_eq!(
            t.reachable(),
            [&[2][..], &[1, 0], &[2, 1, 0], &[0, 1]],
            "the last route takes every message: the default is never used"
        );
        let single = table("[relay]\nhost = \"127.0.0.1\"\ntls = \"none\"\n");
        assert_eq!(
            single.reachable(),
            [&[0][..]],
            "the default takes everything"
        );
    }

    #[test]
    fn without_routes_the_default_relay_takes_everything() {
        let t = table("[relay]\nhost = \"127.0.0.1\"\ntls = \"none\"\n");
        let r = t.route("x@y.example", b"\r\n");
        assert_eq!((r.relays, r.reason), (vec![0], "default".to_string()));
        let text = "[relay.x]\nhost = \"127.0.0.1\"\ntls = \"none\"\n[relay.default]\nhost = \"127.0.0.1\"\ntls = \"none\"\n";
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        let default = c.relays.iter().position(|r| r.name == "default").unwrap();
        assert_eq!(table(text).route("x@y", b"").relays, [default]);
    }
}
