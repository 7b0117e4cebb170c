//! HTTP/1.1 over a bare `TcpStream`, for requests no well-behaved client sends: repeated
//! headers, raw bytes in paths and header values, bodies that keep coming after the
//! answer, connections that never finish their request.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One answer as read from the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Names lowercased, in wire order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How the body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` of the body (none for an empty body of a GET).
    Length,
    /// `Transfer-Encoding: chunked`, in 16 KiB chunks.
    Chunked,
    /// `Content-Length: n` whatever the body is.
    Declared(u64),
}

/// Encodes a request: request line, `Host`, `Connection: close`, `headers` as given (values
/// are raw bytes), the framing header, then the (framed) body. `target` goes on the
/// request line as is, so it may hold any percent-encoding.
pub fn request(
    method: &str,
    target: &str,
    headers: &[(String, Vec<u8>)],
    body: &[u8],
    framing: Framing,
) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n")
        .into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length if body.is_empty() && method == "GET" => {}
        Framing::Length => {
            out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes())
        }
        Framing::Declared(n) => {
            out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes())
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    match framing {
        Framing::Chunked => {
            for chunk in body.chunks(16 * 1024) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
        _ => out.extend_from_slice(body),
    }
    out
}

/// Writes `wire` to `address` from a second thread in 16 KiB pieces (write errors end the
/// writing quietly: the server may answer and stop reading before the end) while this
/// thread reads one answer, for at most `limit`. `Err` says what went wrong, e.g. a reset
/// before a complete answer.
pub fn exchange(
    address: SocketAddr,
    wire: Vec<u8>,
    limit: Duration,
) -> Result<RawResponse, String> {
    let mut stream =
        TcpStream::connect_timeout(&address, limit).map_err(|e| format!("connect: {e}"))?;
    let writer_stream = stream.try_clone().map_err(|e| format!("clone: {e}"))?;
    writer_stream
        .set_write_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || {
        let mut writer_stream = writer_stream;
        for piece in wire.chunks(16 * 1024) {
            if writer_stream.write_all(piece).is_err() {
                return;
            }
        }
        let _ = writer_stream.flush();
    });
    let result = read_response(&mut stream, limit);
    // The writer ends on its own: its stream errors once the peer is gone, or after the
    // write timeout; it is detached if still blocked.
    drop(stream);
    if writer.is_finished() {
        let _ = writer.join();
    }
    result
}

/// Reads one answer from `stream` within `limit`.
pub fn read_response(stream: &mut TcpStream, limit: Duration) -> Result<RawResponse, String> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(response) = parse(&buf, false)? {
            return Ok(response);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete answer within {limit:?}; got {} bytes: {:?}",
                buf.len(),
                String::from_utf8_lossy(&buf[..buf.len().min(300)])
            ));
        }
        stream
            .set_read_timeout(Some(left.min(Duration::from_millis(500))))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return parse(&buf, true)?.ok_or_else(|| {
                    format!(
                        "connection closed after {} bytes without a complete answer: {:?}",
                        buf.len(),
                        String::from_utf8_lossy(&buf[..buf.len().min(300)])
                    )
                });
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "{e} ({:?}) after {} bytes of the answer: {:?}",
                    e.kind(),
                    buf.len(),
                    String::from_utf8_lossy(&buf[..buf.len().min(300)])
                ));
            }
        }
    }
}

/// Parses `buf` as one answer; `None` while incomplete (`eof`: nothing more will come).
fn parse(buf: &[u8], eof: bool) -> Result<Option<RawResponse>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[end + 4..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(length) = find("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| format!("bad content-length {length:?}"))?;
        if rest.len() < length {
            return Ok(None);
        }
        rest[..length].to_vec()
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        match dechunk(rest) {
            Some(body) => body,
            None if eof => return Err("truncated chunked answer".into()),
            None => return Ok(None),
        }
    } else if eof || status == 204 || status == 304 || (100..200).contains(&status) {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(RawResponse {
        status,
        headers,
        body,
    }))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Waits (at most `limit`) until the server closes `stream` (EOF, reset, or an answer
/// followed by EOF); `Ok(elapsed)` when it did, `Err` with what was read otherwise.
pub fn wait_closed(stream: &mut TcpStream, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while started.elapsed() < limit {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(started.elapsed()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Ok(started.elapsed()),
        }
    }
    Err(format!(
        "still open after {limit:?}; read {:?}",
        String::from_utf8_lossy(&got)
    ))
}
