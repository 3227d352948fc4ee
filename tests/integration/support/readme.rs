//! The README as tests read it: its sections, code blocks, and the "Try
//! it" commands, so that the tests follow the README when it changes.

use std::path::PathBuf;

pub fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md")
}

pub fn text() -> String {
    std::fs::read_to_string(path()).expect("read README.md")
}

/// A `## ` section: its heading and its lines (the heading excluded), in
/// the order of the README.
#[derive(Debug, Clone)]
pub struct Section {
    pub heading: String,
    pub body: String,
}

pub fn sections(md: &str) -> Vec<Section> {
    let mut out = Vec::new();
    let mut current: Option<Section> = None;
    let mut in_code = false;
    for line in md.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && let Some(h) = line.strip_prefix("## ") {
            out.extend(current.take());
            current = Some(Section {
                heading: h.trim().to_string(),
                body: String::new(),
            });
            continue;
        }
        if let Some(s) = current.as_mut() {
            s.body.push_str(line);
            s.body.push('\n');
        }
    }
    out.extend(current);
    out
}

/// The section whose heading starts with `prefix`.
pub fn section(md: &str, prefix: &str) -> Section {
    sections(md)
        .into_iter()
        .find(|s| s.heading.starts_with(prefix))
        .unwrap_or_else(|| panic!("README has no section \"## {prefix}...\""))
}

/// A fenced code block: its language tag and its lines.
#[derive(Debug, Clone)]
pub struct Block {
    pub lang: String,
    pub lines: Vec<String>,
}

pub fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for line in text.lines() {
        if let Some(tag) = line.strip_prefix("```") {
            match current.take() {
                Some(b) => out.push(b),
                None => {
                    current = Some(Block {
                        lang: tag.trim().to_string(),
                        lines: Vec::new(),
                    })
                }
            }
            continue;
        }
        if let Some(b) = current.as_mut() {
            b.lines.push(line.to_string());
        }
    }
    out
}

/// A shell line without its trailing `# comment` (a `#` after blanks).
pub fn command_of(line: &str) -> String {
    let mut cut = line.len();
    let bytes = line.as_bytes();
    let mut quote: Option<u8> = None;
    for (i, &b) in bytes.iter().enumerate() {
        match (quote, b) {
            (None, b'\'' | b'"') => quote = Some(b),
            (Some(q), c) if c == q => quote = None,
            (None, b'#') if i > 0 && bytes[i - 1].is_ascii_whitespace() => {
                cut = i;
                break;
            }
            _ => {}
        }
    }
    line[..cut].trim().to_string()
}

/// The trailing comment of a shell line, if any.
pub fn comment_of(line: &str) -> String {
    let command = command_of(line);
    line[line.find(&command).map_or(0, |i| i + command.len())..]
        .trim()
        .trim_start_matches('#')
        .trim()
        .to_string()
}

/// What the README's "Try it" section tells a newcomer to do.
#[derive(Debug, Clone)]
pub struct TryIt {
    /// The first command: starts relayq.
    pub run: String,
    /// What the run command's comment says about it.
    pub run_comment: String,
    /// The second command: runs the test suite.
    pub test: String,
    /// The commands that send a message and look at it, in order.
    pub send: Vec<String>,
    /// The directory the `ls` among them lists (`~` not expanded).
    pub listed: String,
}

impl TryIt {
    pub fn parse(md: &str) -> TryIt {
        let s = section(md, "Try it");
        let sh: Vec<Block> = blocks(&s.body)
            .into_iter()
            .filter(|b| b.lang == "sh")
            .collect();
        assert!(
            sh.len() >= 2,
            "\"Try it\" needs the two commands and the commands that send mail: {s:?}"
        );
        let two: Vec<&String> = sh[0]
            .lines
            .iter()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(two.len(), 2, "the two commands: {:?}", sh[0].lines);
        let send: Vec<String> = sh[1]
            .lines
            .iter()
            .map(|l| command_of(l))
            .filter(|c| !c.is_empty())
            .collect();
        let listed = send
            .iter()
            .find_map(|c| c.strip_prefix("ls "))
            .expect("an `ls` of the Maildir in \"Try it\"")
            .trim()
            .to_string();
        TryIt {
            run: command_of(two[0]),
            run_comment: comment_of(two[0]),
            test: command_of(two[1]),
            send,
            listed,
        }
    }
}
