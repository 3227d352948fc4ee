//! The bytes on the wire: the TCP-or-TLS stream, the buffered reply reader,
//! and the DATA encoder.
//!
//! # Security
//! Everything read here comes from the upstream and is not trusted: a reply
//! is capped at `MAX_REPLY_BYTES`, every line must be "ddd", "ddd " or
//! "ddd-" with one code throughout, and leftover bytes are kept, never
//! dropped, so a pipelined session can't drift out of step. The encoder
//! sends every line end (CRLF, bare LF, bare CR) as CRLF and stuffs a dot
//! at the start of every line, so a body can't end DATA early.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{MAX_REPLY_BYTES, Reply, SmtpError, Stage};

/// rustls reports a peer that hung up without close_notify as
/// UnexpectedEof; to the caller that is the same as a dropped line.
fn io_error(stage: Stage, source: io::Error) -> SmtpError {
    if source.kind() == io::ErrorKind::UnexpectedEof {
        SmtpError::Closed { stage }
    } else {
        SmtpError::Io { stage, source }
    }
}

/// The byte stream, upgradable from plain TCP to TLS by STARTTLS.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The stream plus our read buffer: bytes past the end of one reply stay here
/// for the next read (pipelined replies arrive together).
pub(super) struct Wire {
    pub(super) stream: Stream,
    inbuf: Vec<u8>,
    /// Start of the unread bytes in `inbuf`.
    pos: usize,
}

impl Wire {
    pub(super) fn new(stream: Stream) -> Self {
        Wire {
            stream,
            inbuf: Vec::with_capacity(4096),
            pos: 0,
        }
    }

    pub(super) fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// Gives back the TCP stream for the TLS handshake. Anything the server
    /// sent after its STARTTLS reply would be read as if it came over TLS
    /// (CVE-2011-0411), so leftover bytes are an error.
    pub(super) fn into_tcp_for_starttls(self) -> Result<TcpStream, SmtpError> {
        if self.pos < self.inbuf.len() {
            return Err(SmtpError::Protocol {
                stage: Stage::StartTls,
                detail: "server sent data after its STARTTLS reply (possible injection)".into(),
            });
        }
        match self.stream {
            Stream::Plain(tcp) => Ok(tcp),
            Stream::Tls(_) => Err(SmtpError::Protocol {
                stage: Stage::StartTls,
                detail: "STARTTLS on a connection that is already TLS".into(),
            }),
        }
    }

    /// Writes and flushes. `shown` is what the log says was sent (AUTH hides
    /// its payload).
    pub(super) async fn write(
        &mut self,
        bytes: &[u8],
        shown: &str,
        stage: Stage,
        limit: Duration,
    ) -> Result<(), SmtpError> {
        tracing::trace!("> {}", shown.trim_end());
        let stream = &mut self.stream;
        let written = timeout(limit, async move {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await;
        match written {
            Ok(result) => result.map_err(|e| io_error(stage, e)),
            Err(_) => Err(SmtpError::Timeout {
                stage,
                after: limit,
            }),
        }
    }

    pub(super) async fn command(
        &mut self,
        line: &str,
        stage: Stage,
        limit: Duration,
    ) -> Result<Reply, SmtpError> {
        self.write(line.as_bytes(), line, stage, limit).await?;
        self.read_reply(stage, limit).await
    }

    /// Reads one complete reply, all its lines, within `limit`.
    pub(super) async fn read_reply(
        &mut self,
        stage: Stage,
        limit: Duration,
    ) -> Result<Reply, SmtpError> {
        let reply = self.read_reply_unlogged(stage, limit).await?;
        tracing::trace!("< {}", reply.one_line());
        Ok(reply)
    }

    /// [`Wire::read_reply`] for a caller that logs the reply itself (AUTH,
    /// whose replies may repeat a secret).
    pub(super) async fn read_reply_unlogged(
        &mut self,
        stage: Stage,
        limit: Duration,
    ) -> Result<Reply, SmtpError> {
        match timeout(limit, self.read_reply_untimed(stage)).await {
            Ok(result) => result,
            Err(_) => Err(SmtpError::Timeout {
                stage,
                after: limit,
            }),
        }
    }

    /// Whether `n` complete replies are here already, after taking in what
    /// the stream has without waiting. A read that would wait is dropped
    /// before it takes anything, so nothing is lost.
    pub(super) async fn replies_buffered(&mut self, n: usize) -> bool {
        loop {
            if complete_replies(&self.inbuf[self.pos..]) >= n {
                return true;
            }
            match timeout(Duration::ZERO, self.fill(Stage::Body)).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }

    async fn read_reply_untimed(&mut self, stage: Stage) -> Result<Reply, SmtpError> {
        let mut parser = ReplyParser::default();
        loop {
            let budget = MAX_REPLY_BYTES.saturating_sub(parser.size);
            let line = self.read_line(stage, budget).await?;
            let parsed = parser
                .push(&line)
                .map_err(|detail| SmtpError::Protocol { stage, detail })?;
            if let Some(reply) = parsed {
                return Ok(reply);
            }
        }
    }

    /// One line without its line ending. A line longer than `budget` is a
    /// protocol error, so a hostile server can't make us buffer without end.
    async fn read_line(&mut self, stage: Stage, budget: usize) -> Result<Vec<u8>, SmtpError> {
        loop {
            let unread = &self.inbuf[self.pos..];
            if let Some(i) = unread.iter().position(|&b| b == b'\n') {
                if i > budget {
                    return Err(reply_too_long(stage));
                }
                let line = unread[..i]
                    .strip_suffix(b"\r")
                    .unwrap_or(&unread[..i])
                    .to_vec();
                self.pos += i + 1;
                return Ok(line);
            }
            if unread.len() > budget {
                return Err(reply_too_long(stage));
            }
            self.fill(stage).await?;
        }
    }

    async fn fill(&mut self, stage: Stage) -> Result<(), SmtpError> {
        if self.pos > 0 {
            self.inbuf.drain(..self.pos);
            self.pos = 0;
        }
        let mut chunk = [0u8; 4096];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| io_error(stage, e))?;
        if n == 0 {
            return Err(SmtpError::Closed { stage });
        }
        self.inbuf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Complete replies at the start of `bytes`: lines whose code is followed
/// by a space or the line end (the last line of a reply).
fn complete_replies(bytes: &[u8]) -> usize {
    bytes
        .split_inclusive(|&b| b == b'\n')
        .filter(|line| line.ends_with(b"\n"))
        .filter(|line| !matches!(line.get(3), Some(b'-')))
        .count()
}

fn reply_too_long(stage: Stage) -> SmtpError {
    SmtpError::Protocol {
        stage,
        detail: format!("reply longer than {MAX_REPLY_BYTES} bytes"),
    }
}

/// Collects the lines of one reply.
#[derive(Default)]
pub(super) struct ReplyParser {
    code: Option<u16>,
    lines: Vec<String>,
    size: usize,
}

impl ReplyParser {
    /// Adds a line; returns the reply once its last line ("ddd " or "ddd") is in.
    pub(super) fn push(&mut self, line: &[u8]) -> Result<Option<Reply>, String> {
        self.size += line.len() + 2;
        let (code, last, text) = parse_reply_line(line)?;
        if let Some(first) = self.code
            && first != code
        {
            return Err(format!("reply line code {code} does not continue {first}"));
        }
        self.code = Some(code);
        self.lines.push(text);
        if !last {
            return Ok(None);
        }
        Ok(Some(Reply::new(
            code,
            std::mem::take(&mut self.lines).join("\n"),
        )))
    }
}

fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, String), String> {
    let malformed = || format!("malformed reply line {:?}", snippet(line));
    let digits = line.get(..3).ok_or_else(malformed)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return Err(malformed());
    }
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let last = match line.get(3) {
        None | Some(b' ') => true,
        Some(b'-') => false,
        Some(_) => return Err(malformed()),
    };
    let text = String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned();
    Ok((code, last, text))
}

/// A short, printable excerpt of hostile input for an error message.
fn snippet(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(80)];
    String::from_utf8_lossy(cut).escape_debug().to_string()
}

/// The DATA payload: the body dot-stuffed, ending in CRLF, then ".\r\n",
/// produced in bounded pieces without copying the whole body. Every line
/// end goes out as CRLF: a bare LF or a bare CR (a queue file written
/// before cleanup normalised them) is sent as CRLF too, so no upstream
/// that takes either for a line end can see a dot line we did not stuff.
///
/// [`DataEncoder::chunk`] makes the same octets for BDAT, which counts
/// them instead: no dot-stuffing and no terminator.
pub(super) struct DataEncoder<'a> {
    rest: &'a [u8],
    /// The body ends with a line end; otherwise CRLF is added before the dot.
    ends_line: bool,
    at_line_start: bool,
    finished: bool,
    /// DATA (dot-stuffed, ".\r\n" after the body) or a BDAT chunk.
    data: bool,
}

impl<'a> DataEncoder<'a> {
    pub(super) fn new(body: &'a [u8]) -> Self {
        DataEncoder {
            rest: body,
            ends_line: body.is_empty() || matches!(body.last(), Some(b'\r' | b'\n')),
            at_line_start: true,
            finished: false,
            data: true,
        }
    }

    /// The body as a BDAT chunk: the same line ends as DATA sends, nothing
    /// stuffed, no terminator.
    pub(super) fn chunk(body: &'a [u8]) -> Self {
        DataEncoder {
            data: false,
            ..DataEncoder::new(body)
        }
    }

    /// The octets a BDAT chunk of `body` has (see [`DataEncoder::chunk`]).
    pub(super) fn chunk_len(body: &[u8]) -> usize {
        let mut extra = 0;
        for (i, &b) in body.iter().enumerate() {
            // A bare LF or a bare CR becomes CRLF: one octet more.
            let bare_lf = b == b'\n' && (i == 0 || body[i - 1] != b'\r');
            let bare_cr = b == b'\r' && body.get(i + 1) != Some(&b'\n');
            extra += usize::from(bare_lf || bare_cr);
        }
        let ends_line = body.is_empty() || matches!(body.last(), Some(b'\r' | b'\n'));
        body.len() + extra + if ends_line { 0 } else { 2 }
    }

    /// Appends up to about `limit` bytes to `out`; false once the terminator
    /// has been appended.
    pub(super) fn fill(&mut self, out: &mut Vec<u8>, limit: usize) -> bool {
        while out.len() < limit && !self.rest.is_empty() {
            if self.data && self.at_line_start && self.rest[0] == b'.' {
                out.push(b'.');
            }
            let room = limit.saturating_sub(out.len()).max(1);
            match self.rest.iter().position(|&b| b == b'\r' || b == b'\n') {
                Some(p) if p < room => {
                    out.extend_from_slice(&self.rest[..p]);
                    out.extend_from_slice(b"\r\n");
                    let crlf = self.rest[p] == b'\r' && self.rest.get(p + 1) == Some(&b'\n');
                    self.rest = &self.rest[p + if crlf { 2 } else { 1 }..];
                    self.at_line_start = true;
                }
                found => {
                    let n = found.unwrap_or(self.rest.len()).min(room);
                    out.extend_from_slice(&self.rest[..n]);
                    self.rest = &self.rest[n..];
                    self.at_line_start = false;
                }
            }
        }
        if self.rest.is_empty() && !self.finished {
            if !self.ends_line {
                out.extend_from_slice(b"\r\n");
            }
            if self.data {
                out.extend_from_slice(b".\r\n");
            }
            self.finished = true;
        }
        !self.finished
    }
}
