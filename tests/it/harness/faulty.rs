//! `FaultyUpstream`: an in-process UDP+TCP DNS upstream that counts queries and misbehaves on
//! demand (delay, drop, TC=1, wrong ID, garbage, TCP closed mid-answer).
//!
//! Runs on: its own threads, spawned from the test thread so they share the test's network
//! namespace (a thread created by `std::thread::spawn` inherits its creator's namespace).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::Context;
use domain::base::iana::{Class, Rcode, Rtype};
use domain::base::{Message, MessageBuilder, Ttl};
use domain::rdata::{Aaaa, A};

use super::client;

/// How often blocked reads and accepts wake up to check the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Bound on one forwarded exchange with the real upstream.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// TTL of answers from the built-in table.
pub const TABLE_TTL: u32 = 30;

/// How the upstream misbehaves; switchable at runtime with [`FaultyUpstream::set_mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer correctly at once.
    Normal,
    /// Answer correctly after this delay.
    Delay(Duration),
    /// Count the query, never answer (UDP and TCP).
    Drop,
    /// UDP: an empty answer with TC=1. TCP: the correct answer.
    Truncate,
    /// Answer with the ID off by one (and nothing else).
    WrongId,
    /// Answer with bytes that are not a DNS message (but start with the right ID).
    Garbage,
    /// A wrong-ID answer, then (50 ms later) the correct one.
    WrongIdThenAnswer,
    /// Garbage, then (50 ms later) the correct answer.
    GarbageThenAnswer,
    /// UDP: correct. TCP: the length prefix and half the message, then the connection closes.
    CloseTcpMidAnswer,
    /// UDP: the first query for each name is lost (never answered), later ones are answered
    /// correctly. TCP: correct.
    DropFirst,
}

/// Where correct answers come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A fixed table: name (lower case, trailing dot) → addresses; A/AAAA only, TTL
    /// [`TABLE_TTL`]. Other names are NXDOMAIN, other types NODATA.
    Table(HashMap<String, Vec<IpAddr>>),
    /// Forward the query unchanged to this server (UDP, TCP on TC) and relay its answer.
    Forward(SocketAddr),
}

/// Which transport a query came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

/// State shared by the fixture's threads.
///
/// # Threads
///
/// The test thread writes `mode` and reads `counts`; the server threads read `mode` and write
/// `counts`, all under their mutexes. `stop` is set by the test thread (Drop) and polled by
/// the server threads (`SeqCst`).
#[derive(Debug)]
struct Shared {
    /// Current behaviour.
    mode: Mutex<Mode>,
    /// Queries received, by (lower-case qname with trailing dot, transport).
    counts: Mutex<HashMap<(String, Proto), usize>>,
    /// Where answers come from.
    source: Source,
    /// Set on drop; threads exit within [`STOP_POLL`].
    stop: AtomicBool,
}

/// A running fault-injecting upstream; stops its threads on drop.
#[derive(Debug)]
pub struct FaultyUpstream {
    /// The UDP and TCP address it listens on.
    addr: SocketAddr,
    /// Shared with the threads.
    shared: Arc<Shared>,
    /// UDP receive loop and TCP accept loop.
    threads: Vec<JoinHandle<()>>,
}

impl FaultyUpstream {
    /// Binds UDP and TCP on `addr` (loopback in the test's namespace) and starts serving.
    pub fn start(addr: SocketAddr, source: Source) -> anyhow::Result<Self> {
        let udp = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
        udp.set_read_timeout(Some(STOP_POLL))?;
        let tcp = TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?;
        tcp.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Normal),
            counts: Mutex::new(HashMap::new()),
            source,
            stop: AtomicBool::new(false),
        });
        let udp_shared = Arc::clone(&shared);
        let tcp_shared = Arc::clone(&shared);
        let threads = vec![
            thread::Builder::new()
                .name("faulty-udp".into())
                .spawn(move || udp_loop(&udp, &udp_shared))?,
            thread::Builder::new()
                .name("faulty-tcp".into())
                .spawn(move || accept_loop(&tcp, &tcp_shared))?,
        ];
        Ok(Self {
            addr,
            shared,
            threads,
        })
    }

    /// A table source answering `name` (any case) with `addrs`.
    pub fn table(entries: &[(&str, &[IpAddr])]) -> Source {
        Source::Table(
            entries
                .iter()
                .map(|(name, addrs)| (normalize(name), addrs.to_vec()))
                .collect(),
        )
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches behaviour for queries received from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self
            .shared
            .mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = mode;
    }

    /// Queries received for `name` (any case) over either transport.
    pub fn queries(&self, name: &str) -> usize {
        self.count(name, Proto::Udp) + self.count(name, Proto::Tcp)
    }

    /// Queries received for `name` (any case) over `proto`.
    pub fn count(&self, name: &str, proto: Proto) -> usize {
        let counts = self
            .shared
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.get(&(normalize(name), proto)).copied().unwrap_or(0)
    }

    /// All queries received, for any name.
    pub fn total(&self) -> usize {
        let counts = self
            .shared
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.values().sum()
    }
}

impl Drop for FaultyUpstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Lower case with a trailing dot.
fn normalize(name: &str) -> String {
    let mut name = name.to_ascii_lowercase();
    if !name.ends_with('.') {
        name.push('.');
    }
    name
}

/// The current mode.
fn mode(shared: &Shared) -> Mode {
    *shared.mode.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts a query and returns its normalized qname, or `None` if it does not parse.
fn count_query(shared: &Shared, query: &[u8], proto: Proto) -> Option<String> {
    let message = Message::from_octets(query).ok()?;
    let question = message.sole_question().ok()?;
    let name = normalize(&question.qname().to_string());
    let mut counts = shared.counts.lock().unwrap_or_else(PoisonError::into_inner);
    *counts.entry((name.clone(), proto)).or_insert(0) += 1;
    Some(name)
}

/// Receives UDP queries until stopped; each is answered on its own short-lived thread so that
/// a delayed answer does not hold up the others.
fn udp_loop(socket: &UdpSocket, shared: &Arc<Shared>) {
    let mut buf = vec![0u8; 65535];
    while !shared.stop.load(Ordering::SeqCst) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(_) => continue, // timeout: check the stop flag
        };
        let query = buf[..len].to_vec();
        let Some(name) = count_query(shared, &query, Proto::Udp) else {
            continue;
        };
        let first = {
            let counts = shared.counts.lock().unwrap_or_else(PoisonError::into_inner);
            counts.get(&(name, Proto::Udp)).copied() == Some(1)
        };
        if first && mode(shared) == Mode::DropFirst {
            continue;
        }
        let (Ok(reply_socket), shared) = (socket.try_clone(), Arc::clone(shared)) else {
            continue;
        };
        thread::spawn(move || {
            for (delay, packet) in udp_replies(&shared, &query) {
                thread::sleep(delay);
                let _ = reply_socket.send_to(&packet, from);
            }
        });
    }
}

/// What to send back over UDP for `query` in the current mode: (delay before, bytes) pairs.
fn udp_replies(shared: &Shared, query: &[u8]) -> Vec<(Duration, Vec<u8>)> {
    let now = Duration::ZERO;
    let later = Duration::from_millis(50);
    match mode(shared) {
        Mode::Drop => Vec::new(),
        Mode::Truncate => vec![(now, truncated(query))],
        Mode::Delay(delay) => answer(shared, query)
            .map(|a| vec![(delay, a)])
            .unwrap_or_default(),
        Mode::WrongId => answer(shared, query)
            .map(|a| vec![(now, wrong_id(a))])
            .unwrap_or_default(),
        Mode::Garbage => vec![(now, garbage(query))],
        Mode::WrongIdThenAnswer => answer(shared, query)
            .map(|a| vec![(now, wrong_id(a.clone())), (later, a)])
            .unwrap_or_default(),
        Mode::GarbageThenAnswer => answer(shared, query)
            .map(|a| vec![(now, garbage(query)), (later, a)])
            .unwrap_or_default(),
        Mode::Normal | Mode::CloseTcpMidAnswer | Mode::DropFirst => answer(shared, query)
            .map(|a| vec![(now, a)])
            .unwrap_or_default(),
    }
}

/// Accepts TCP connections until stopped, one thread each.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = Arc::clone(shared);
                thread::spawn(move || connection(stream, &shared));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Serves one TCP connection: frames are answered on their own threads (so delays overlap,
/// like a pipelining server), writes are serialized by a mutex.
fn connection(stream: TcpStream, shared: &Arc<Shared>) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(STOP_POLL)).is_err() {
        return;
    }
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let writer = Arc::new(Mutex::new(writer));
    let mut reader = stream;
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::SeqCst) {
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(len) => pending.extend_from_slice(&buf[..len]),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue
            }
            Err(_) => return,
        }
        while let Some(frame) = take_frame(&mut pending) {
            if count_query(shared, &frame, Proto::Tcp).is_none() {
                continue;
            }
            let shared = Arc::clone(shared);
            let writer = Arc::clone(&writer);
            thread::spawn(move || tcp_reply(&shared, &frame, &writer));
        }
    }
}

/// Removes one complete length-prefixed frame from the front of `pending`.
fn take_frame(pending: &mut Vec<u8>) -> Option<Vec<u8>> {
    let len = usize::from(u16::from_be_bytes([*pending.first()?, *pending.get(1)?]));
    if pending.len() < 2 + len {
        return None;
    }
    let frame = pending[2..2 + len].to_vec();
    pending.drain(..2 + len);
    Some(frame)
}

/// Answers one TCP query in the current mode.
fn tcp_reply(shared: &Shared, query: &[u8], writer: &Mutex<TcpStream>) {
    let send = |message: &[u8]| {
        let mut stream = writer.lock().unwrap_or_else(PoisonError::into_inner);
        let len = u16::try_from(message.len()).unwrap_or(u16::MAX);
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend_from_slice(message);
        let _ = stream.write_all(&frame);
    };
    let later = Duration::from_millis(50);
    match mode(shared) {
        Mode::Drop => {}
        Mode::Delay(delay) => {
            thread::sleep(delay);
            if let Some(a) = answer(shared, query) {
                send(&a);
            }
        }
        Mode::WrongId => {
            if let Some(a) = answer(shared, query) {
                send(&wrong_id(a));
            }
        }
        Mode::Garbage => send(&garbage(query)),
        Mode::WrongIdThenAnswer => {
            if let Some(a) = answer(shared, query) {
                send(&wrong_id(a.clone()));
                thread::sleep(later);
                send(&a);
            }
        }
        Mode::GarbageThenAnswer => {
            if let Some(a) = answer(shared, query) {
                send(&garbage(query));
                thread::sleep(later);
                send(&a);
            }
        }
        Mode::CloseTcpMidAnswer => {
            if let Some(a) = answer(shared, query) {
                let mut stream = writer.lock().unwrap_or_else(PoisonError::into_inner);
                let len = u16::try_from(a.len()).unwrap_or(u16::MAX);
                let mut frame = len.to_be_bytes().to_vec();
                frame.extend_from_slice(&a[..a.len() / 2]);
                let _ = stream.write_all(&frame);
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        Mode::Normal | Mode::Truncate | Mode::DropFirst => {
            if let Some(a) = answer(shared, query) {
                send(&a);
            }
        }
    }
}

/// The correct answer to `query` from the source, or `None` if there is none (forwarding
/// failed or the query is not understood).
fn answer(shared: &Shared, query: &[u8]) -> Option<Vec<u8>> {
    match &shared.source {
        Source::Forward(server) => forward(*server, query),
        Source::Table(table) => table_answer(table, query),
    }
}

/// Relays `query` to `server` over UDP, and over TCP if the UDP answer is truncated.
fn forward(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let raw = client::udp_exchange(server, query, FORWARD_TIMEOUT).ok()??;
    let truncated = raw.get(2).is_some_and(|flags| flags & 0x02 != 0);
    if !truncated {
        return Some(raw);
    }
    let mut stream = client::tcp_connect(server).ok()?;
    client::tcp_send(&mut stream, query).ok()?;
    client::tcp_receive(&mut stream).ok()?
}

/// Answers A/AAAA from the table; unknown names NXDOMAIN, other types NODATA.
fn table_answer(table: &HashMap<String, Vec<IpAddr>>, query: &[u8]) -> Option<Vec<u8>> {
    let message = Message::from_octets(query).ok()?;
    let question = message.sole_question().ok()?;
    let name = normalize(&question.qname().to_string());
    let Some(addrs) = table.get(&name) else {
        let mut builder = MessageBuilder::new_vec()
            .start_answer(&message, Rcode::NXDOMAIN)
            .ok()?;
        builder.header_mut().set_ra(true);
        return Some(builder.finish());
    };
    let mut builder = MessageBuilder::new_vec()
        .start_answer(&message, Rcode::NOERROR)
        .ok()?;
    builder.header_mut().set_ra(true);
    let mut section = builder.answer();
    let ttl = Ttl::from_secs(TABLE_TTL);
    for addr in addrs {
        let pushed = match (addr, question.qtype()) {
            (IpAddr::V4(v4), Rtype::A) => {
                section.push((question.qname(), Class::IN, ttl, A::new(*v4)))
            }
            (IpAddr::V6(v6), Rtype::AAAA) => {
                section.push((question.qname(), Class::IN, ttl, Aaaa::new(*v6)))
            }
            _ => Ok(()),
        };
        pushed.ok()?;
    }
    Some(section.finish())
}

/// The header and question of `query` as an answer with TC=1 and no records.
fn truncated(query: &[u8]) -> Vec<u8> {
    let end = question_end(query).unwrap_or(query.len().min(12));
    let mut reply = query[..end].to_vec();
    if let Some(flags) = reply.get_mut(2) {
        *flags |= 0x80 | 0x02; // QR, TC
    }
    if let Some(flags) = reply.get_mut(3) {
        *flags = 0x80; // RA, NOERROR
    }
    for count in reply.iter_mut().take(12).skip(6) {
        *count = 0; // ANCOUNT, NSCOUNT, ARCOUNT
    }
    reply
}

/// Offset just past the (first) question of a query.
fn question_end(query: &[u8]) -> Option<usize> {
    let mut pos = 12;
    loop {
        let len = usize::from(*query.get(pos)?);
        pos += 1 + len;
        if len == 0 {
            break;
        }
    }
    let end = pos + 4;
    (end <= query.len()).then_some(end)
}

/// `answer` with the ID off by one.
fn wrong_id(mut answer: Vec<u8>) -> Vec<u8> {
    if answer.len() >= 2 {
        let id = u16::from_be_bytes([answer[0], answer[1]]).wrapping_add(1);
        answer[..2].copy_from_slice(&id.to_be_bytes());
    }
    answer
}

/// The query's ID, a response header claiming one question and five answers, then junk that
/// parses as neither.
fn garbage(query: &[u8]) -> Vec<u8> {
    let mut packet = query.get(..2).unwrap_or(&[0, 0]).to_vec();
    packet.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 5, 0, 0, 0, 0]);
    packet.extend_from_slice(&[0xc0, 0xff, 0x3f, 0xde, 0xad, 0xbe, 0xef, 0x00]);
    packet
}
