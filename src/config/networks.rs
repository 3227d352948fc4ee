//! How much of the public Internet a list of networks covers, whatever its
//! spelling: `0.0.0.0/0`, `["0.0.0.0/1", "128.0.0.0/1"]`, four /2s and
//! `::ffff:0:0/96` all let the whole IPv4 Internet relay.
//!
//! The networks are merged (overlaps counted once), IPv4 written inside
//! IPv6 (`::ffff:a.b.c.d/n` mapped, `::a.b.c.d/n` compatible, `64:ff9b::/96`
//! NAT64: a client can arrive under any of these on a dual-stack listener
//! or through a translator) is counted as IPv4, and what remains after
//! taking out the special-purpose ranges (private, loopback, link-local,
//! documentation, multicast, reserved: IANA's registries) is public.
//! Everything else counts as public, unallocated IPv6 included: the list
//! is judged by what it could let in, not by today's routing table.
//!
//! # Security
//! This is the open-relay guard for `smtp.allow_networks`: clients in these
//! networks relay without AUTH.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};

/// More public IPv4 addresses than this (a /8) need `allow_public_networks`.
pub const MAX_PUBLIC_V4: u128 = 1 << 24;
/// More public IPv6 addresses than this (a /32, an ISP's allocation) need
/// `allow_public_networks`.
pub const MAX_PUBLIC_V6: u128 = 1 << 96;

const SPECIAL_V4: [&str; 15] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// IPv6 special-purpose ranges, IPv4-embedding ones aside (see above).
const SPECIAL_V6: [&str; 8] = [
    "::/128",
    "::1/128",
    "64:ff9b:1::/48",
    "100::/64",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Prefixes under which an IPv6 address holds an IPv4 one in its last 32
/// bits.
const IPV4_INSIDE_V6: [&str; 3] = ["::ffff:0:0/96", "::/96", "64:ff9b::/96"];

/// What a list of networks covers of the public address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// Public IPv4 addresses covered, and how many there are in all.
    pub v4: u128,
    pub v4_all: u128,
    /// Public IPv6 addresses covered (saturating), and in all.
    pub v6: u128,
    pub v6_all: u128,
}

fn parse4(s: &str) -> Ipv4Net {
    s.parse()
        .unwrap_or_else(|_| Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 32).unwrap_or_default())
}

fn parse6(s: &str) -> Ipv6Net {
    s.parse()
        .unwrap_or_else(|_| Ipv6Net::new(Ipv6Addr::UNSPECIFIED, 128).unwrap_or_default())
}

fn size4(n: &Ipv4Net) -> u128 {
    1u128 << (32 - n.prefix_len())
}

/// 2^(128 - prefix), saturating at u128::MAX for the whole space.
fn size6(n: &Ipv6Net) -> u128 {
    match n.prefix_len() {
        0 => u128::MAX,
        p => 1u128 << (128 - p),
    }
}

/// Addresses of `nets` (disjoint) outside `special` (disjoint CIDRs).
fn public_part<N: Copy>(
    nets: &[N],
    special: &[N],
    size: impl Fn(&N) -> u128,
    contains: impl Fn(&N, &N) -> bool,
) -> u128 {
    nets.iter()
        .map(|n| {
            if special.iter().any(|s| contains(s, n)) {
                return 0;
            }
            let inside: u128 = special
                .iter()
                .filter(|s| contains(n, s))
                .map(&size)
                .fold(0, u128::saturating_add);
            size(n).saturating_sub(inside)
        })
        .fold(0, u128::saturating_add)
}

/// Judges `nets` (see the module doc).
pub fn coverage(nets: &[IpNet]) -> Coverage {
    let embed: Vec<Ipv6Net> = IPV4_INSIDE_V6.iter().map(|s| parse6(s)).collect();
    let mut v4: Vec<Ipv4Net> = Vec::new();
    let mut v6: Vec<Ipv6Net> = Vec::new();
    for net in nets {
        match net {
            IpNet::V4(n) => v4.push(n.trunc()),
            IpNet::V6(n) => {
                let n = n.trunc();
                for e in &embed {
                    if e.contains(&n) {
                        // IPv4 written as IPv6: the last 32 bits.
                        let bits = u128::from(n.network()) as u32;
                        let prefix = n.prefix_len().saturating_sub(96);
                        if let Ok(n4) = Ipv4Net::new(Ipv4Addr::from(bits), prefix) {
                            v4.push(n4.trunc());
                        }
                    } else if n.contains(e) {
                        // A wider IPv6 network that takes in all of IPv4.
                        v4.push(parse4("0.0.0.0/0"));
                    }
                }
                v6.push(n);
            }
        }
    }
    let v4 = Ipv4Net::aggregate(&v4);
    let v6 = Ipv6Net::aggregate(&v6);
    let special4: Vec<Ipv4Net> = SPECIAL_V4.iter().map(|s| parse4(s)).collect();
    let mut special6: Vec<Ipv6Net> = SPECIAL_V6.iter().map(|s| parse6(s)).collect();
    special6.extend(embed);
    let c4 = |a: &Ipv4Net, b: &Ipv4Net| a.contains(b);
    let c6 = |a: &Ipv6Net, b: &Ipv6Net| a.contains(b);
    Coverage {
        v4: public_part(&v4, &special4, size4, c4),
        v4_all: public_part(&[parse4("0.0.0.0/0")], &special4, size4, c4),
        v6: public_part(&v6, &special6, size6, c6),
        v6_all: public_part(&[parse6("::/0")], &special6, size6, c6),
    }
}

/// Why a list may not stand, if it may not: the whole public IPv4 or IPv6
/// Internet is never allowed; more than [`MAX_PUBLIC_V4`] /
/// [`MAX_PUBLIC_V6`] only with `allow_public_networks`.
pub fn judge(nets: &[IpNet], allow_public: bool) -> Result<(), String> {
    let c = coverage(nets);
    let listed = nets
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let all = |covered: u128, total: u128| covered >= total;
    if all(c.v4, c.v4_all) || all(c.v6, c.v6_all) {
        let family = if all(c.v4, c.v4_all) { "IPv4" } else { "IPv6" };
        return Err(format!(
            "{listed} together cover every public {family} address: the whole Internet could relay through relayq without AUTH (an open relay); list your own networks"
        ));
    }
    if allow_public {
        return Ok(());
    }
    let too_wide = if c.v4 > MAX_PUBLIC_V4 {
        Some(format!(
            "{} public IPv4 addresses, more than a /8 ({})",
            group(c.v4),
            group(MAX_PUBLIC_V4)
        ))
    } else if c.v6 > MAX_PUBLIC_V6 {
        Some(format!(
            "{} of public IPv6 space, more than a /32",
            v6_size(c.v6)
        ))
    } else {
        None
    };
    match too_wide {
        None => Ok(()),
        Some(what) => Err(format!(
            "{listed} together cover {what}: every client there could relay through relayq without AUTH. List only your own networks; if you really mean to let that much of the Internet relay, set smtp.allow_public_networks = true"
        )),
    }
}

/// 16777216 as "16,777,216".
fn group(n: u128) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// An IPv6 amount as the prefix length it equals (or exceeds).
fn v6_size(n: u128) -> String {
    let bits = 128 - n.leading_zeros();
    format!(
        "about {} /32s (2^{} addresses)",
        group(n >> 96),
        bits.saturating_sub(1)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_whole_internet_in_any_spelling_is_refused() {
        for list in [
            &["0.0.0.0/0"][..],
            &["0.0.0.0/1", "128.0.0.0/1"],
            &["0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/2", "192.0.0.0/2"],
            &["::ffff:0.0.0.0/96"],
            &["64:ff9b::/96"],
            &["::/1", "8000::/1"],
            &["::/0"],
            &["::/1"],
            &["0.0.0.0/1", "128.0.0.0/2", "192.0.0.0/3", "224.0.0.0/3"],
        ] {
            let err = judge(&nets(list), true).unwrap_err();
            assert!(err.contains("open relay"), "{list:?}: {err}");
        }
    }

    #[test]
    fn more_than_a_slash_8_needs_the_override() {
        for list in [
            &["2.0.0.0/7"][..],
            &["8.0.0.0/8", "9.0.0.0/24"],
            &["0.0.0.0/1"],
            &["2000::/3"],
            &["2a00::/16"],
            &["::ffff:2.0.0.0/103"],
            &["8000::/1"],
        ] {
            let err = judge(&nets(list), false).unwrap_err();
            assert!(
                err.contains("smtp.allow_public_networks = true"),
                "{list:?}: {err}"
            );
            assert!(judge(&nets(list), true).is_ok(), "{list:?}");
        }
    }

    #[test]
    fn own_networks_pass() {
        for list in [
            &["127.0.0.0/8", "::1/128"][..],
            &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
            &["8.0.0.0/8"],
            &["203.0.113.0/24", "198.51.100.0/24"],
            &["2001:db8::/32", "2a01:4f8::/32"],
            &["100.64.0.0/10", "::ffff:10.0.0.0/104"],
        ] {
            assert!(judge(&nets(list), false).is_ok(), "{list:?}");
        }
    }

    #[test]
    fn overlaps_count_once_and_private_space_not_at_all() {
        let c = coverage(&nets(&["8.0.0.0/8", "8.1.0.0/16", "::ffff:8.0.0.0/104"]));
        assert_eq!(c.v4, 1 << 24);
        let c = coverage(&nets(&["10.0.0.0/7"]));
        assert_eq!(c.v4, 1 << 24, "11/8 is public, 10/8 is not");
        // 2^32 less IANA's special-purpose blocks.
        assert_eq!(c.v4_all, 3_702_258_432);
    }
}
