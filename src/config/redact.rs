//! Keeps secrets out of configuration error messages.
//!
//! The TOML parser's errors quote the offending line (`4 | password =
//! "hunter2`) and sometimes the value (`invalid type: integer `12345678``).
//! Every command that reads the config prints them (`check-config`,
//! `check`, `serve`, a failed SIGHUP reload, `sendmail`, the queue tools),
//! so the message is cleaned where it is made, in [`scrub`]:
//!
//! - a quoted source line shows its value only when its key is a known key
//!   that holds no secret; any other key, a misspelt one included
//!   (`pasword`, `oauth2_client_secret`), has its value replaced by
//!   `<redacted>`, and a line without `=` keeps at most its first word;
//! - every value the file gives to such a key, and every line of a
//!   multi-line string, is removed from the rest of the message too;
//! - the password of a URL (`redis://:pw@host`) is removed wherever it is.
//!
//! Known keys come from the config structs themselves, so a key added later
//! is judged by its name: `password`, `secret`, `token`, `credential` or
//! `api_key` in it (other than a `_file` or `_env` naming where the secret
//! lives) make it secret, and `limits_backend` carries a URL password.
//!
//! # Security
//! This judges text that failed to parse, so it works line by line on the
//! raw file and the message and never trusts the TOML structure.

use std::collections::HashSet;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::routing::config::struct_fields;

const REDACTED: &str = "<redacted>";

/// Words that make a key's value a secret.
const SECRET_WORDS: [&str; 7] = [
    "password",
    "passwd",
    "secret",
    "token",
    "credential",
    "api_key",
    "apikey",
];

/// Keys whose whole value may be shown: known to relayq and secret-free.
fn public_keys() -> &'static HashSet<&'static str> {
    static KEYS: OnceLock<HashSet<&'static str>> = OnceLock::new();
    KEYS.get_or_init(|| {
        fn of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
            struct_fields::<T>()
        }
        let all = [
            of::<super::Config>(),
            of::<super::SmtpConfig>(),
            of::<super::RelayConfig>(),
            of::<super::RouteConfig>(),
            of::<super::CaptureConfig>(),
            of::<super::QueueConfig>(),
            of::<super::SendmailConfig>(),
        ];
        all.into_iter()
            .flatten()
            .copied()
            .filter(|k| !secret_name(k) && *k != "limits_backend")
            .collect()
    })
}

fn secret_name(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    let names_a_place = k.ends_with("_file") || k.ends_with("_env");
    !names_a_place && SECRET_WORDS.iter().any(|w| k.contains(w))
}

/// The key of a `key = value` text, as the last part of a dotted key
/// without quotes (`relay.password`, `"password"`).
fn key_name(key: &str) -> String {
    key.rsplit('.')
        .next()
        .unwrap_or(key)
        .trim()
        .trim_matches(['"', '\''])
        .trim()
        .to_string()
}

fn is_public(key: &str) -> bool {
    public_keys().contains(key_name(key).as_str())
}

/// Splits `key = value` at the first `=` outside quotes.
fn split_assignment(line: &str) -> Option<(&str, &str)> {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '=') => return Some((&line[..i], &line[i + 1..])),
            (None, '#') => return None,
            _ => {}
        }
    }
    None
}

/// A table header (`[relay]`, `[[route]]`) or a comment: nothing secret.
fn is_structure(line: &str) -> bool {
    let t = line.trim();
    t.is_empty()
        || t.starts_with('#')
        || (t.starts_with('[') && t.trim_end_matches(']').find(['=', '"', '\'']).is_none())
}

/// Removes the password from `scheme://user:password@host` wherever it is.
fn strip_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '"' || c == '\'' || c == '`' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(atsign), Some(colon)) if colon < atsign => {
                out.push_str(&authority[..=colon]);
                out.push_str(REDACTED);
                out.push_str(&authority[atsign..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

/// One quoted line of the file, as it may be shown.
fn redact_source_line(line: &str) -> String {
    if is_structure(line) {
        return line.to_string();
    }
    match split_assignment(line) {
        Some((key, value)) if is_public(key) && !value.contains('{') => strip_url_passwords(line),
        Some((key, _)) => format!("{key}= {REDACTED}"),
        None => {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            match trimmed.split_once(char::is_whitespace) {
                Some((first, _)) if is_public(first) => format!("{indent}{first} {REDACTED}"),
                _ => format!("{indent}{REDACTED}"),
            }
        }
    }
}

/// The values the file gives to keys that are not public, as they may
/// appear in a message: raw, unquoted, and each line of a multi-line one.
fn secret_values(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_multiline: Option<&str> = None;
    let add = |v: &str, found: &mut Vec<String>| {
        let v = v.trim();
        for candidate in [v, v.trim_matches(['"', '\'']).trim()] {
            if !candidate.is_empty() && !found.iter().any(|f| f == candidate) {
                found.push(candidate.to_string());
            }
        }
    };
    for line in text.lines() {
        if let Some(delim) = in_multiline {
            add(line, &mut found);
            if line.contains(delim) {
                in_multiline = None;
            }
            continue;
        }
        if is_structure(line) {
            continue;
        }
        match split_assignment(line) {
            Some((key, value)) if is_public(key) && !value.contains('{') => {
                // A URL's password, even under a public key.
                if let Some(pw) = url_password(value) {
                    add(pw, &mut found);
                }
            }
            Some((_, value)) => {
                let value = value.split(" #").next().unwrap_or(value);
                add(value, &mut found);
                for word in value.split([' ', ',', '{', '}', '[', ']', '=']) {
                    add(word, &mut found);
                }
                if let Some(pw) = url_password(value) {
                    add(pw, &mut found);
                }
                for delim in ["\"\"\"", "'''"] {
                    if value.matches(delim).count() == 1 {
                        in_multiline = Some(delim);
                    }
                }
            }
            None => {
                add(line, &mut found);
                for word in line.split_whitespace().skip(1) {
                    add(word, &mut found);
                }
            }
        }
    }
    // Longest first, so a value is not half replaced by a piece of it.
    found.sort_by_key(|v| std::cmp::Reverse(v.len()));
    found
}

fn url_password(value: &str) -> Option<&str> {
    let rest = &value[value.find("://")? + 3..];
    let authority = &rest[..rest.rfind('@')?];
    authority.split_once(':').map(|(_, pw)| pw)
}

/// A message line with every secret value taken out. Short values (under
/// four characters) are only taken out where they stand quoted, so a
/// password like `12` does not eat the line numbers.
fn redact_values(line: &str, secrets: &[String]) -> String {
    let mut out = strip_url_passwords(line);
    for s in secrets {
        if s.chars().count() >= 4 {
            out = out.replace(s.as_str(), REDACTED);
        } else {
            for (open, close) in [("`", "`"), ("\"", "\""), ("'", "'")] {
                out = out.replace(
                    &format!("{open}{s}{close}"),
                    &format!("{open}{REDACTED}{close}"),
                );
            }
        }
    }
    out
}

/// A TOML parser message about `text`, fit to print: see the module doc.
pub fn scrub(message: &str, text: &str) -> String {
    let secrets = secret_values(text);
    message
        .lines()
        .map(|line| match quoted_source(line) {
            Some((gutter, source)) => format!("{gutter}{}", redact_source_line(source)),
            None => redact_values(line, &secrets),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A line of the parser's snippet that quotes the file: `4 | source`.
fn quoted_source(line: &str) -> Option<(&str, &str)> {
    let t = line.trim_start();
    let digits = t.find(|c: char| !c.is_ascii_digit())?;
    if digits == 0 {
        return None;
    }
    let after = &t[digits..];
    let bar = after.strip_prefix(" |")?;
    let source = bar.strip_prefix(' ').unwrap_or(bar);
    let gutter_len = line.len() - source.len();
    Some((&line[..gutter_len], source))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "Hunter2Secret";

    fn parse_error(text: &str) -> String {
        let e = toml::from_str::<super::super::Config>(text).expect_err("the text is invalid");
        scrub(&e.to_string(), text)
    }

    #[test]
    fn known_keys_and_secret_names() {
        assert!(is_public("port") && is_public("host") && is_public("password_file"));
        assert!(is_public("relay.sendgrid.host") && is_public("\"port\""));
        assert!(is_public("oauth2_client_secret_file") && is_public("auth_failure_limit"));
        assert!(!is_public("password") && !is_public("pasword") && !is_public("limits_backend"));
        assert!(!is_public("oauth2_client_secret") && !is_public("refresh_token"));
    }

    #[test]
    fn no_secret_survives_any_kind_of_mistake() {
        for text in [
            format!("[relay]\nhost = \"h\"\nusername = \"u\"\npasword = \"{SECRET}\"\n"),
            format!("[relay]\nhost = \"h\"\nusername = \"u\"\npassword = \"{SECRET}\n"),
            format!("[relay]\nhost = \"h\"\nusername = \"u\"\npassword = {SECRET}\n"),
            "[relay]\nhost = \"h\"\nusername = \"u\"\npassword = 31337313\n".to_string(),
            format!("[relay]\nhost = \"h\"\npassword = [\"{SECRET}\"]\n"),
            format!("[relay]\nhost = \"h\"\npassword \"{SECRET}\"\n"),
            format!(
                "[relay]\nhost = \"h\"\npassword = \"\"\"{SECRET}\nmore{SECRET}\"\"\"\nport = \"x\"\n"
            ),
            format!("limits_backend = redis://:{SECRET}@10.0.0.1:6379\n"),
            format!("limits_backend = \"redis://:{SECRET}@10.0.0.1:6379\"\nlimits_backend2 = 1\n"),
            format!("[relay.ses]\nhost = \"h\"\noauth2_client_secret = \"{SECRET}\"\n"),
            format!("relay = {{ host = \"h\", password = 5, pasword = \"{SECRET}\" }}\n"),
            format!("[relay]\nhost = \"h\"\n\"password\" = {{ x = \"{SECRET}\" }}\n"),
        ] {
            let msg = parse_error(&text);
            let secret = if text.contains("31337313") {
                "31337313"
            } else {
                SECRET
            };
            assert!(
                !msg.contains(secret),
                "{secret} leaked:\n{msg}\nfrom:\n{text}"
            );
            assert!(msg.contains("line "), "{msg}");
        }
    }

    #[test]
    fn what_is_not_secret_is_still_shown() {
        let msg = parse_error("[relay]\nhost = \"h\"\nport = \"twenty\"\n");
        assert!(msg.contains("3 | port = \"twenty\""), "{msg}");
        assert!(msg.contains("string \"twenty\""), "{msg}");
        let msg = parse_error("[relay]\nhost = \"h\"\npasword = \"x\"\n");
        assert!(msg.contains("unknown field `pasword`"), "{msg}");
        assert!(msg.contains("3 | pasword = <redacted>"), "{msg}");
    }

    #[test]
    fn url_passwords() {
        assert_eq!(
            strip_url_passwords("a redis://:pw@10.0.0.1:6379/0 b redis://u:p@h"),
            "a redis://:<redacted>@10.0.0.1:6379/0 b redis://u:<redacted>@h"
        );
        assert_eq!(strip_url_passwords("http://h/x:y@z"), "http://h/x:y@z");
    }
}
