//! The README read as a newcomer reads it, top to bottom: no command of
//! ours before the step that installs it, the other MTA's sendmail dealt
//! with where the link is first made, the test peers it names are the ones
//! `.ci/run` installs, and its "From Postfix" table agrees with its own
//! configuration reference.

use std::collections::BTreeMap;

use crate::support::readme::{self, blocks, command_of, sections};

/// The programs the Install step puts on the PATH.
const OURS: [&str; 3] = ["relayq", "sendmail", "mailq"];

/// The program a shell line runs: past `sudo`, `$ ` and `VAR=value`, and
/// past `echo ... |` (the program is what reads the pipe).
fn programs(line: &str) -> Vec<String> {
    let line = command_of(line.trim_start_matches("$ "));
    line.split(['|', ';', '&'])
        .filter_map(|part| {
            part.split_whitespace()
                .find(|w| *w != "sudo" && !w.contains('=') && !w.starts_with('-'))
                .map(|w| w.trim_matches(['(', ')', '`']).to_string())
        })
        .collect()
}

/// Inline code spans of a line of prose.
fn spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

#[test]
fn no_command_of_ours_before_the_install_step() {
    let md = readme::text();
    let all = sections(&md);
    let install = all
        .iter()
        .position(|s| s.heading == "Install")
        .expect("an \"## Install\" section");
    let try_it = all
        .iter()
        .position(|s| s.heading.starts_with("Try it"))
        .expect("\"## Try it\"");
    assert_eq!(install, try_it + 1, "Install comes right after Try it");
    let mut used = Vec::new();
    for s in &all[..install] {
        for b in blocks(&s.body)
            .iter()
            .filter(|b| matches!(b.lang.as_str(), "sh" | "console" | ""))
        {
            for line in &b.lines {
                for p in programs(line) {
                    if OURS.contains(&p.as_str()) || p.ends_with("/relayq") {
                        used.push(format!("{}: `{line}`", s.heading));
                    }
                }
            }
        }
        let prose: String = s
            .body
            .lines()
            .filter(|l| !l.starts_with("```"))
            .collect::<Vec<_>>()
            .join("\n");
        for line in prose.lines() {
            for span in spans(line) {
                let first = span.split_whitespace().next().unwrap_or("");
                if span.contains(' ') && OURS.contains(&first) {
                    used.push(format!("{}: `{span}`", s.heading));
                }
            }
        }
    }
    assert!(
        used.is_empty(),
        "used before \"## Install\" puts them on the PATH: {used:#?}"
    );
    let steps = &all[install].body;
    for p in [
        "/usr/local/bin/relayq",
        "/usr/sbin/sendmail",
        "/usr/bin/mailq",
    ] {
        assert!(steps.contains(p), "Install puts {p} in place");
    }
}

#[test]
fn where_the_sendmail_link_is_first_made_another_mta_is_dealt_with() {
    let md = readme::text();
    let first = sections(&md)
        .into_iter()
        .find(|s| {
            blocks(&s.body).iter().any(|b| {
                b.lines
                    .iter()
                    .any(|l| l.contains("ln -s") && l.contains("/usr/sbin/sendmail"))
            })
        })
        .expect("a section that links /usr/sbin/sendmail");
    for what in ["exim4", "Postfix", "dpkg-divert"] {
        assert!(
            first.body.contains(what),
            "\"## {}\" makes the sendmail link; it must say what to do when {what}... owns it",
            first.heading
        );
    }
}

/// The packages an install line of `.ci/run` names.
fn installed_by(line: &str) -> Vec<String> {
    let Some(rest) = line.split(" install ").nth(1) else {
        return Vec::new();
    };
    rest.split_whitespace()
        .take_while(|w| !w.starts_with('>') && !w.starts_with('|'))
        .filter(|w| !w.starts_with('-'))
        .map(|w| w.trim_matches(['\'', '"']).to_string())
        .collect()
}

#[test]
fn the_test_peers_named_are_the_ones_ci_installs() {
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run"))
        .expect("read .ci/run");
    let packages: Vec<String> = ci
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter(|l| l.contains("apt-get install") || l.contains("pip install"))
        .flat_map(installed_by)
        .collect();
    assert!(packages.iter().any(|p| p == "redis-server"), "{packages:?}");
    let md = readme::text();
    let try_it = readme::section(&md, "Try it").body;
    let missing: Vec<&String> = packages
        .iter()
        .filter(|p| !try_it.contains(&format!("`{p}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "\"Try it\" must name every test peer .ci/run installs; missing: {missing:?}"
    );
    assert!(try_it.contains("`.ci/run`") || try_it.contains("(.ci/run)"));
}

/// A reference row that names the Postfix parameter it replaces:
/// `| \`key\` | default | ... (Postfix's \`param\`) |`.
fn postfix_names_in_reference(md: &str) -> BTreeMap<String, String> {
    let reference = readme::section(md, "Configuration reference").body;
    let mut map = BTreeMap::new();
    for row in reference.lines().filter(|l| l.starts_with("| `")) {
        let key = spans(row)
            .first()
            .map(|s| s.to_string())
            .unwrap_or_default();
        for part in row.split("Postfix's `").skip(1) {
            if let Some(param) = part.split('`').next() {
                map.insert(param.to_string(), key.clone());
            }
        }
    }
    map
}

#[test]
fn the_postfix_table_agrees_with_the_reference() {
    let md = readme::text();
    let map = postfix_names_in_reference(&md);
    assert!(
        map.contains_key("header_size_limit"),
        "the reference names Postfix equivalents: {map:?}"
    );
    let table = readme::section(&md, "From Postfix").body;
    for (param, key) in &map {
        let row = table
            .lines()
            .find(|l| {
                l.starts_with("| `")
                    && l.split('|')
                        .nth(1)
                        .is_some_and(|c| c.contains(param.as_str()))
            })
            .unwrap_or_else(|| panic!("\"From Postfix\" has no row for {param}"));
        let relayq = row.split('|').nth(2).unwrap_or_default();
        assert!(
            relayq.contains(&format!("`{key}")),
            "the reference says {param} is `{key}`, the From Postfix table says: {relayq}"
        );
        assert!(
            !relayq.contains("no separate key") && !relayq.contains("no equivalent"),
            "{row}"
        );
    }
}
