//! Plain HTTP/1.0 GETs over a std `TcpStream`, for /health, /ready and /metrics.
//!
//! Runs on: the calling test's thread, in its network namespace.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};

/// Bound on one HTTP exchange.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body as text.
    pub body: String,
}

/// `GET path` over HTTP/1.0 (the server closes after the response), bounded by
/// [`HTTP_TIMEOUT`].
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading GET {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok(HttpResponse {
        status,
        body: body.to_owned(),
    })
}

/// Scrapes `/metrics` at `addr` into series (name and labels exactly as written) → value.
pub fn scrape(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let response = http_get(addr, "/metrics")?;
    if response.status != 200 {
        bail!("/metrics answered {}: {}", response.status, response.body);
    }
    let mut series = BTreeMap::new();
    for line in response.body.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("bad sample line {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        series.insert(name.to_owned(), value);
    }
    Ok(series)
}
