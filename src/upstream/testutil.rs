//! A tiny loopback UDP+TCP DNS responder and query builder for the upstream tests.
//!
//! Runs on: test helper threads (std sockets); never part of the build outside tests.
//!
//! Answers are the query's header and question with QR and RA set and one A record appended.
//! Modes inject the faults the upstream side must survive. Every thread stops when the
//! [`Responder`] is dropped, and every loop also has a time bound.
#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The address in genuine answers.
pub(crate) const GOOD_IP: [u8; 4] = [192, 0, 2, 1];

/// The address in decoy answers.
pub(crate) const DECOY_IP: [u8; 4] = [198, 51, 100, 66];

/// Upper bound on any responder thread's life.
const LIFETIME: Duration = Duration::from_secs(60);

/// How often threads look at the stop flag.
const POLL: Duration = Duration::from_millis(10);

/// What the UDP side does with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UdpMode {
    /// Answer.
    Answer,
    /// Answer TC=1 with no records.
    Truncate,
    /// Send garbage, a wrong ID, a wrong qname, a wrong qtype and a reflected query, then the
    /// genuine answer (with a re-cased qname).
    DecoysFirst,
    /// Bind the port but never read it.
    Silent,
}

/// What the TCP side does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcpMode {
    /// Answer every query; queries that arrive together are answered in reverse order.
    Answer,
    /// Like [`UdpMode::DecoysFirst`], one frame each.
    DecoysFirst,
    /// Answer the first query on a connection, close it when the second arrives.
    CloseOnSecondQuery,
    /// Close every connection as soon as a query arrives.
    CloseAtOnce,
}

/// A running responder on 127.0.0.1, UDP and TCP on the same port.
pub(crate) struct Responder {
    /// The shared UDP/TCP address.
    addr: SocketAddr,
    /// Tells threads to exit.
    stop: Arc<AtomicBool>,
    /// TCP connections accepted.
    accepts: Arc<AtomicUsize>,
    /// UDP queries received.
    udp_queries: Arc<AtomicUsize>,
    /// Source addresses of UDP queries, in arrival order.
    udp_sources: Arc<Mutex<Vec<SocketAddr>>>,
    /// The threads, joined on drop.
    threads: Vec<JoinHandle<()>>,
    /// Kept open (never read) in [`UdpMode::Silent`].
    _silent: Option<UdpSocket>,
}

impl Responder {
    /// Starts a responder with the given behaviour.
    pub(crate) fn start(udp_mode: UdpMode, tcp_mode: TcpMode) -> Self {
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("udp local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let accepts = Arc::new(AtomicUsize::new(0));
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let udp_sources = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let mut silent = None;
        if udp_mode == UdpMode::Silent {
            silent = Some(udp);
        } else {
            let stop = Arc::clone(&stop);
            let queries = Arc::clone(&udp_queries);
            let sources = Arc::clone(&udp_sources);
            threads.push(std::thread::spawn(move || {
                serve_udp(&udp, udp_mode, &stop, &queries, &sources)
            }));
        }
        {
            let stop = Arc::clone(&stop);
            let accepts = Arc::clone(&accepts);
            threads.push(std::thread::spawn(move || {
                serve_tcp(&tcp, tcp_mode, &stop, &accepts)
            }));
        }
        Self {
            addr,
            stop,
            accepts,
            udp_queries,
            udp_sources,
            threads,
            _silent: silent,
        }
    }

    /// The UDP and TCP address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub(crate) fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// UDP queries received so far.
    pub(crate) fn udp_queries(&self) -> usize {
        self.udp_queries.load(Ordering::SeqCst)
    }

    /// Source addresses of the UDP queries so far.
    pub(crate) fn udp_sources(&self) -> Vec<SocketAddr> {
        self.udp_sources.lock().expect("not poisoned").clone()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Binds UDP and TCP on the same ephemeral loopback port (a few tries: the TCP port may be
/// taken).
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let addr = udp.local_addr().expect("udp local addr");
        if let Ok(tcp) = TcpListener::bind(addr) {
            return (udp, tcp);
        }
    }
    panic!("no free UDP+TCP port pair on 127.0.0.1");
}

/// Encodes a dotted name into wire format.
pub(crate) fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(u8::try_from(label.len()).expect("short label"));
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A query like a worker sends: ID 0, RD=1, one A/IN question, an OPT record for 1232 octets.
pub(crate) fn query(name: &str) -> Vec<u8> {
    let mut out = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    out.extend(wire_name(name));
    out.extend([0, 1, 0, 1]);
    // OPT: root name, type 41, class = payload size, TTL 0, no RDATA (RFC 6891 §6.1.2).
    out.extend([0, 0, 41]);
    out.extend(1232u16.to_be_bytes());
    out.extend([0, 0, 0, 0, 0, 0]);
    out
}

/// End of the question section of `msg` (12-octet header, one uncompressed question).
fn question_end(msg: &[u8]) -> Option<usize> {
    let mut pos = 12;
    for _ in 0..128 {
        let len = usize::from(*msg.get(pos)?);
        if len == 0 {
            return (pos + 5 <= msg.len()).then_some(pos + 5);
        }
        pos += 1 + len;
    }
    None
}

/// The answer to `query`: its header and question with QR, RA (and TC if asked), plus one A
/// record for `ip` unless truncated.
pub(crate) fn answer(query: &[u8], ip: [u8; 4], truncated: bool) -> Option<Vec<u8>> {
    let end = question_end(query)?;
    let mut out = query.get(..end)?.to_vec();
    out[2] |= 0x80;
    if truncated {
        out[2] |= 0x02;
    }
    out[3] |= 0x80;
    let records: u16 = if truncated { 0 } else { 1 };
    out[6..8].copy_from_slice(&records.to_be_bytes());
    out[8..12].copy_from_slice(&[0, 0, 0, 0]);
    if !truncated {
        out.extend([0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend(ip);
    }
    Some(out)
}

/// The messages [`UdpMode::DecoysFirst`] sends for `query`, decoys first.
fn decoys_then_answer(query: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![vec![0xDE, 0xAD, 0xBE]];
    if let Some(genuine) = answer(query, DECOY_IP, false) {
        let mut wrong_id = genuine.clone();
        wrong_id[0] ^= 0x5A;
        wrong_id[1] ^= 0xA5;
        out.push(wrong_id);
        let mut wrong_name = genuine.clone();
        wrong_name[13] ^= 0x01;
        out.push(wrong_name);
        let mut wrong_type = genuine.clone();
        if let Some(end) = question_end(&wrong_type) {
            wrong_type[end - 3] = 28;
        }
        out.push(wrong_type);
    }
    out.push(query.to_vec());
    if let Some(mut genuine) = answer(query, GOOD_IP, false) {
        // Re-case the qname: matching must ignore case.
        if let Some(end) = question_end(&genuine) {
            genuine[12..end - 4].make_ascii_uppercase();
        }
        out.push(genuine);
    }
    out
}

/// The UDP responder loop.
fn serve_udp(
    socket: &UdpSocket,
    mode: UdpMode,
    stop: &AtomicBool,
    queries: &AtomicUsize,
    sources: &Mutex<Vec<SocketAddr>>,
) {
    socket
        .set_read_timeout(Some(POLL))
        .expect("set read timeout");
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) && started.elapsed() < LIFETIME {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(_) => continue,
        };
        queries.fetch_add(1, Ordering::SeqCst);
        sources.lock().expect("not poisoned").push(from);
        let query = &buf[..len];
        let replies = match mode {
            UdpMode::Answer => answer(query, GOOD_IP, false).into_iter().collect(),
            UdpMode::Truncate => answer(query, GOOD_IP, true).into_iter().collect(),
            UdpMode::DecoysFirst => decoys_then_answer(query),
            UdpMode::Silent => Vec::new(),
        };
        for reply in replies {
            let _ = socket.send_to(&reply, from);
        }
    }
}

/// The TCP accept loop; one thread per connection.
fn serve_tcp(listener: &TcpListener, mode: TcpMode, stop: &Arc<AtomicBool>, accepts: &AtomicUsize) {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let started = Instant::now();
    let mut connections = Vec::new();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < LIFETIME {
        match listener.accept() {
            Ok((stream, _)) => {
                accepts.fetch_add(1, Ordering::SeqCst);
                let stop = Arc::clone(stop);
                connections.push(std::thread::spawn(move || {
                    serve_connection(stream, mode, &stop)
                }));
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

/// Serves one TCP connection until EOF, stop, or the mode says close.
fn serve_connection(mut stream: TcpStream, mode: TcpMode, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    let started = Instant::now();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut seen = 0usize;
    while !stop.load(Ordering::SeqCst) && started.elapsed() < LIFETIME {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(len) => buf.extend_from_slice(&chunk[..len]),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue
            }
            Err(_) => return,
        }
        let mut frames = Vec::new();
        while buf.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + len {
                break;
            }
            frames.push(buf[2..2 + len].to_vec());
            buf.drain(..2 + len);
        }
        // Answer the frames of one read in reverse: pipelined answers may come out of order.
        let mut out = Vec::new();
        for query in frames.iter().rev() {
            seen += 1;
            let replies = match mode {
                TcpMode::Answer => answer(query, GOOD_IP, false).into_iter().collect(),
                TcpMode::DecoysFirst => decoys_then_answer(query),
                TcpMode::CloseOnSecondQuery if seen >= 2 => return,
                TcpMode::CloseOnSecondQuery => answer(query, GOOD_IP, false).into_iter().collect(),
                TcpMode::CloseAtOnce => return,
            };
            for reply in replies {
                out.extend(u16::try_from(reply.len()).expect("short").to_be_bytes());
                out.extend(reply);
            }
        }
        if !out.is_empty() && stream.write_all(&out).is_err() {
            return;
        }
    }
}
