//! The DSN parameters of a MAIL or RCPT command (RFC 3461: RET, ENVID,
//! NOTIFY, ORCPT), read from the command line as the client wrote it,
//! before smtp-proto parses the rest. smtp-proto is lenient where a
//! client's DSN must come back exactly as it was given: it drops a
//! malformed `+XY` escape (`ENVID=a+ZZb` became `aZb`), reads `+C3+A9` as
//! two Latin-1 characters, takes each parameter twice (RFC 3461 allows
//! each once; Postfix answers 501), and knows only the `rfc822` address
//! type, so `ORCPT=utf-8;...` (RFC 6533, which a server offering SMTPUTF8
//! and DSN must take) refused the recipient. Here xtext is decoded
//! strictly into bytes that must be UTF-8, `utf-8` ORCPTs are decoded too,
//! and the ORCPT is taken out of the line smtp-proto sees.
//!
//! # Security
//! The line is the client's. It is bounded by the session's command line
//! limit; decoded values are checked by `spool::Dsn::check` and
//! `spool::RcptDsn::check` (length, no control characters) before they
//! are kept, and written to the queue file as xtext, so a CR or LF in a
//! value never reaches the spool header or an upstream command.

/// What the DSN parameters of one command say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scanned {
    /// ENVID, decoded.
    pub envid: Option<String>,
    /// ORCPT's address, decoded (an address type other than `rfc822` or
    /// `utf-8` is dropped: it cannot be passed on as it was).
    pub orcpt: Option<String>,
    /// The line without its ORCPT parameter, for smtp-proto; `None` when
    /// there was none.
    pub line: Option<Vec<u8>>,
}

/// Reads the DSN parameters of a MAIL or RCPT command line; any other line
/// gives an empty [`Scanned`]. `Err` is the reply that refuses the command.
pub fn scan(line: &[u8]) -> Result<Scanned, &'static str> {
    let mut out = Scanned::default();
    let verb = line.get(..4).map(<[u8]>::to_ascii_uppercase);
    let (mail, rcpt) = (
        verb.as_deref() == Some(b"MAIL"),
        verb.as_deref() == Some(b"RCPT"),
    );
    if !mail && !rcpt {
        return Ok(out);
    }
    let Some(start) = params_start(line) else {
        return Ok(out);
    };
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut orcpt_given = false;
    for token in line[start..].split(|b| b.is_ascii_whitespace()) {
        if token.is_empty() {
            continue;
        }
        let (key, value) = match token.iter().position(|&b| b == b'=') {
            Some(eq) => (&token[..eq], Some(&token[eq + 1..])),
            None => (token, None),
        };
        let key_is = |k: &str| key.eq_ignore_ascii_case(k.as_bytes());
        let dsn = if mail {
            key_is("RET") || key_is("ENVID")
        } else {
            key_is("NOTIFY") || key_is("ORCPT")
        };
        if dsn {
            if seen.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                return Err(if mail {
                    "501 5.5.4 Error: RET and ENVID may be given once each"
                } else {
                    "501 5.5.4 Error: NOTIFY and ORCPT may be given once each"
                });
            }
            seen.push(key);
        }
        if mail && key_is("ENVID") {
            let v = value.ok_or("501 5.5.4 Error: invalid ENVID")?;
            out.envid = Some(xtext(v).ok_or("501 5.5.4 Error: invalid ENVID xtext")?);
        }
        if rcpt && key_is("ORCPT") {
            orcpt_given = true;
            out.orcpt = orcpt(value.unwrap_or_default())?;
            continue;
        }
        kept.push(token);
    }
    if orcpt_given {
        let mut l = line[..start].to_vec();
        for t in kept {
            l.push(b' ');
            l.extend_from_slice(t);
        }
        l.extend_from_slice(b"\r\n");
        out.line = Some(l);
    }
    Ok(out)
}

/// Where the parameters start: just past the path (`<...>`, quotes and
/// backslashes honoured, or the first word when there are no brackets).
fn params_start(line: &[u8]) -> Option<usize> {
    let colon = line.iter().position(|&b| b == b':')?;
    let mut i = colon + 1;
    while line.get(i) == Some(&b' ') {
        i += 1;
    }
    if line.get(i) != Some(&b'<') {
        return Some(
            line[i..]
                .iter()
                .position(u8::is_ascii_whitespace)
                .map_or(line.len(), |p| i + p),
        );
    }
    let mut quoted = false;
    while i < line.len() {
        match line[i] {
            b'\\' => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i + 1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// RFC 3461 xtext: printable ASCII but `+` and `=`, and `+XY` with two
/// upper-case hex digits for any octet. The octets must be UTF-8.
pub fn xtext(v: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'+' => {
                let hex = v.get(i + 1..i + 3)?;
                if !hex
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b))
                {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'!'..=b'~' if v[i] != b'=' => {
                out.push(v[i]);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// An ORCPT value, `addr-type;address`.
fn orcpt(v: &[u8]) -> Result<Option<String>, &'static str> {
    const BAD: &str = "501 5.5.4 Error: invalid ORCPT";
    let semi = v.iter().position(|&b| b == b';').ok_or(BAD)?;
    let (kind, addr) = (&v[..semi], &v[semi + 1..]);
    if kind.is_empty() || addr.is_empty() {
        return Err(BAD);
    }
    if kind.eq_ignore_ascii_case(b"rfc822") {
        xtext(addr).map(Some).ok_or(BAD)
    } else if kind.eq_ignore_ascii_case(b"utf-8") {
        utf8_addr(addr).map(Some).ok_or(BAD)
    } else {
        // Checked as xtext, then dropped: relayq keeps rfc822 and utf-8
        // addresses only, and a wrong type is not worth a lost recipient.
        xtext(addr).map(|_| None).ok_or(BAD)
    }
}

/// RFC 6533 utf-8-addr-xtext and utf-8-addr-unitext: printable ASCII but
/// `+`, `=` and `\`, UTF-8 as it is, and `\x{HEX}` for any character.
fn utf8_addr(v: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(v).ok()?;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("\\x{") {
            let close = after.find('}')?;
            let hex = &after[..close];
            if hex.is_empty() || hex.len() > 6 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
            rest = &after[close + 1..];
            continue;
        }
        if c.is_control() || c == ' ' || "+=\\".contains(c) {
            return None;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Scanned {
        scan(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    #[test]
    fn envid_and_orcpt_are_decoded_strictly() {
        assert_eq!(
            ok("MAIL FROM:<a@b> RET=HDRS ENVID=QQ+2B314159")
                .envid
                .as_deref(),
            Some("QQ+314159")
        );
        assert_eq!(
            ok("RCPT TO:<b@c> ORCPT=rfc822;b+2Bx@c").orcpt.as_deref(),
            Some("b+x@c")
        );
        assert_eq!(
            ok("RCPT TO:<b@c> ORCPT=RFC822;B+C3+A9@c").orcpt.as_deref(),
            Some("B\u{e9}@c")
        );
        assert_eq!(
            ok("RCPT TO:<j\u{f6}rg@c> ORCPT=utf-8;j\\x{F6}rg@c")
                .orcpt
                .as_deref(),
            Some("j\u{f6}rg@c")
        );
        assert_eq!(
            ok("RCPT TO:<j\u{f6}rg@c> ORCPT=UTF-8;j\u{f6}rg@c")
                .orcpt
                .as_deref(),
            Some("j\u{f6}rg@c")
        );
        // Another address type: checked, then dropped.
        assert_eq!(
            ok("RCPT TO:<b@c> ORCPT=x400;c+3DUS+3Ba+3Dx"),
            Scanned {
                line: Some(b"RCPT TO:<b@c>\r\n".to_vec()),
                ..Scanned::default()
            }
        );
        for bad in [
            "MAIL FROM:<a@b> ENVID=a+ZZb",
            "MAIL FROM:<a@b> ENVID=a+2",
            "MAIL FROM:<a@b> ENVID=a+2b",
            "MAIL FROM:<a@b> ENVID=a=b",
            "MAIL FROM:<a@b> ENVID=+FF",
            "RCPT TO:<b@c> ORCPT=rfc822;b+ZZ@c",
            "RCPT TO:<b@c> ORCPT=rfc822;",
            "RCPT TO:<b@c> ORCPT=;b@c",
            "RCPT TO:<b@c> ORCPT=b@c",
            "RCPT TO:<b@c> ORCPT=utf-8;b\\x{}@c",
            "RCPT TO:<b@c> ORCPT=utf-8;b\\x{D800}@c",
            "RCPT TO:<b@c> ORCPT=utf-8;b+2B@c",
        ] {
            assert!(scan(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Any parameters: the scanner ends without panicking, and the
        /// line it hands smtp-proto is still one command line.
        #[test]
        fn any_parameters_scan_safely(v in proptest::collection::vec(
            proptest::sample::select(b"<>\" =;+0AD\\x{}:@rfc822utf-8ENVIDORCPTRET".to_vec()), 0..60)
        ) {
            for verb in [&b"MAIL FROM:"[..], b"RCPT TO:"] {
                let line = [verb, &v, b"\r\n"].concat();
                if let Ok(Scanned { line: Some(l), .. }) = scan(&line) {
                    proptest::prop_assert!(l.ends_with(b"\r\n"));
                    proptest::prop_assert!(!l[..l.len() - 2].contains(&b'\n'));
                }
            }
        }
    }

    #[test]
    fn each_parameter_only_once() {
        for bad in [
            "MAIL FROM:<a@b> RET=FULL RET=FULL",
            "MAIL FROM:<a@b> RET=HDRS ret=FULL",
            "MAIL FROM:<a@b> ENVID=x ENVID=y",
            "RCPT TO:<b@c> NOTIFY=SUCCESS NOTIFY=DELAY",
            "RCPT TO:<b@c> ORCPT=rfc822;a@x ORCPT=rfc822;b@y",
        ] {
            assert!(scan(bad.as_bytes()).is_err(), "{bad}");
        }
        ok("MAIL FROM:<a@b> RET=FULL ENVID=x SIZE=10 BODY=8BITMIME");
        ok("RCPT TO:<b@c> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b@c");
    }

    #[test]
    fn the_orcpt_is_taken_out_of_the_line_and_the_path_is_kept() {
        let s = ok("RCPT TO:<\"a> b\"@c> NOTIFY=NEVER ORCPT=utf-8;x@c\r\n");
        assert_eq!(
            s.line.as_deref(),
            Some(&b"RCPT TO:<\"a> b\"@c> NOTIFY=NEVER\r\n"[..])
        );
        assert_eq!(ok("RCPT TO:<b@c> NOTIFY=NEVER\r\n").line, None);
        assert_eq!(
            ok("RCPT TO:b@c ORCPT=rfc822;b@c\r\n").line.as_deref(),
            Some(&b"RCPT TO:b@c\r\n"[..])
        );
        assert_eq!(ok("EHLO ORCPT=x"), Scanned::default());
    }

    #[test]
    fn orcpt_parameters_round_trip() {
        for addr in ["b+x@c", "j\u{f6}rg@b\u{fc}cher.example", "a\\b@c"] {
            let (kind, value) = crate::spool::format::orcpt(addr);
            assert!(value.is_ascii());
            let line = format!("RCPT TO:<b@c> ORCPT={kind};{value}");
            assert_eq!(ok(&line).orcpt.as_deref(), Some(addr), "{line}");
        }
    }
}
