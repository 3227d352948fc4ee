//! Decoding what arrived with Python's `email` package, a MIME parser
//! nobody here wrote, so re-encoded content is checked against the bytes
//! the sender meant (`support/mime_parts.py`).

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine;

/// One leaf part as Python decoded it.
#[derive(Debug, Clone)]
pub struct Part {
    pub content_type: String,
    pub cte: String,
    pub charset: Option<String>,
    pub payload: Vec<u8>,
    pub defects: Vec<String>,
}

/// The decoded message: its leaf parts, and its top-level header fields
/// (unfolded by Python) in order.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub parts: Vec<Part>,
    pub defects: Vec<String>,
    pub headers: Vec<(String, String)>,
}

impl Decoded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn decode(raw: &[u8]) -> Decoded {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/integration/support/mime_parts.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3 (apt-get install python3)");
    child.stdin.take().unwrap().write_all(raw).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python's email package failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let parts = v["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Part {
            content_type: p["type"].as_str().unwrap().to_string(),
            cte: p["cte"].as_str().unwrap().to_string(),
            charset: p["charset"].as_str().map(str::to_string),
            payload: base64::engine::general_purpose::STANDARD
                .decode(p["payload"].as_str().unwrap())
                .unwrap(),
            defects: strings(&p["defects"]),
        })
        .collect();
    let headers = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_string(),
                h[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    Decoded {
        parts,
        defects: strings(&v["defects"]),
        headers,
    }
}

/// Every line of `raw` fits RFC 5322 (998 octets before CRLF), and every
/// line end is CRLF (no bare CR or LF anywhere).
pub fn assert_conformant(raw: &[u8]) {
    for line in raw.split(|&b| b == b'\n') {
        assert!(line.len() <= 999, "a line of {} octets", line.len());
    }
    for (i, w) in raw.windows(2).enumerate() {
        assert!(!(w[0] == b'\r' && w[1] != b'\n'), "bare CR at {i}");
        assert!(!(w[1] == b'\n' && w[0] != b'\r'), "bare LF at {}", i + 1);
    }
}
