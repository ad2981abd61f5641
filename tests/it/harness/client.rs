//! A raw DNS client for exact assertions: hand-built queries (including malformed ones) sent
//! over UDP or TCP, answers parsed with `domain`.
//!
//! Runs on: the test thread (sockets are created in the test's network namespace).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use domain::base::iana::{Opcode, OptRcode, Rtype};
use domain::base::{Message, ParsedName, ParsedRecord};
use domain::rdata::AllRecordData;

/// How long [`udp_exchange`] and friends wait for an answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The EDNS part of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// Advertised UDP payload size.
    pub udp_payload: u16,
    /// EDNS version (0 is the only defined one; 1 must get BADVERS, RFC 6891 §6.1.3).
    pub version: u8,
    /// The DO bit.
    pub dnssec_ok: bool,
}

impl Default for Edns {
    fn default() -> Self {
        Self {
            udp_payload: 1232,
            version: 0,
            dnssec_ok: false,
        }
    }
}

/// A query to build by hand, so tests control every bit (case, ID, opcode, counts).
#[derive(Debug, Clone)]
pub struct Query {
    /// Message ID.
    pub id: u16,
    /// Query name exactly as it goes on the wire (case preserved); trailing dot optional.
    pub name: String,
    /// Query type.
    pub qtype: Rtype,
    /// Opcode.
    pub opcode: Opcode,
    /// RD bit.
    pub rd: bool,
    /// QR bit (a query has it clear; setting it makes the packet look like a response).
    pub qr: bool,
    /// The OPT record, if any.
    pub edns: Option<Edns>,
    /// Repeat the question this many times (QDCOUNT); 1 for a normal query.
    pub qdcount: u16,
}

impl Query {
    /// A normal recursive query without EDNS and with a fixed, recognisable ID.
    pub fn new(name: &str, qtype: Rtype) -> Self {
        Self {
            id: 0x5a3c,
            name: name.to_owned(),
            qtype,
            opcode: Opcode::QUERY,
            rd: true,
            qr: false,
            edns: None,
            qdcount: 1,
        }
    }

    /// Sets the ID.
    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    /// Adds an OPT record.
    pub fn edns(mut self, edns: Edns) -> Self {
        self.edns = Some(edns);
        self
    }

    /// Sets the opcode.
    pub fn opcode(mut self, opcode: Opcode) -> Self {
        self.opcode = opcode;
        self
    }

    /// The wire form.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut wire = Vec::with_capacity(64);
        wire.extend_from_slice(&self.id.to_be_bytes());
        let mut flags0 = (self.opcode.to_int() & 0x0f) << 3;
        if self.qr {
            flags0 |= 0x80;
        }
        if self.rd {
            flags0 |= 0x01;
        }
        wire.push(flags0);
        wire.push(0);
        wire.extend_from_slice(&self.qdcount.to_be_bytes());
        wire.extend_from_slice(&[0, 0, 0, 0]);
        wire.extend_from_slice(&u16::from(self.edns.is_some()).to_be_bytes());
        for _ in 0..self.qdcount {
            push_name(&mut wire, &self.name);
            wire.extend_from_slice(&self.qtype.to_int().to_be_bytes());
            wire.extend_from_slice(&1u16.to_be_bytes());
        }
        if let Some(edns) = self.edns {
            wire.push(0); // root owner
            wire.extend_from_slice(&Rtype::OPT.to_int().to_be_bytes());
            wire.extend_from_slice(&edns.udp_payload.to_be_bytes());
            wire.push(0); // extended rcode
            wire.push(edns.version);
            wire.push(if edns.dnssec_ok { 0x80 } else { 0 });
            wire.push(0);
            wire.extend_from_slice(&0u16.to_be_bytes()); // rdlen
        }
        wire
    }
}

/// Appends `name` as uncompressed labels (case preserved).
fn push_name(wire: &mut Vec<u8>, name: &str) {
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        let bytes = label.as_bytes();
        wire.push(u8::try_from(bytes.len()).unwrap_or(63).min(63));
        wire.extend_from_slice(&bytes[..bytes.len().min(63)]);
    }
    wire.push(0);
}

/// One parsed resource record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rr {
    /// Owner name with trailing dot, case as received.
    pub name: String,
    /// TTL in seconds.
    pub ttl: u32,
    /// Type.
    pub rtype: Rtype,
    /// Presentation-format rdata.
    pub rdata: String,
}

/// The OPT record of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyOpt {
    /// Advertised UDP payload size.
    pub udp_payload: u16,
    /// EDNS version.
    pub version: u8,
    /// DO bit.
    pub dnssec_ok: bool,
}

/// A parsed answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The bytes as received.
    pub raw: Vec<u8>,
    /// Message ID.
    pub id: u16,
    /// Full response code (header + OPT extended bits).
    pub rcode: OptRcode,
    /// Opcode.
    pub opcode: Opcode,
    /// QR bit.
    pub qr: bool,
    /// AA bit.
    pub aa: bool,
    /// TC bit.
    pub tc: bool,
    /// RD bit.
    pub rd: bool,
    /// RA bit.
    pub ra: bool,
    /// Question names (trailing dot, exact case) and types.
    pub question: Vec<(String, Rtype)>,
    /// Answer section.
    pub answer: Vec<Rr>,
    /// Authority section.
    pub authority: Vec<Rr>,
    /// Additional section, without OPT.
    pub additional: Vec<Rr>,
    /// The OPT record, if present.
    pub opt: Option<ReplyOpt>,
}

impl Reply {
    /// Parses a whole message.
    pub fn parse(raw: &[u8]) -> anyhow::Result<Self> {
        let message = Message::from_octets(raw.to_vec()).context("message shorter than header")?;
        let header = message.header();
        let mut question = Vec::new();
        for item in message.question() {
            let item = item.context("parsing question")?;
            question.push((name_string(item.qname()), item.qtype()));
        }
        let mut sections = message.answer().context("parsing question section")?;
        let answer = records(&mut sections.by_ref().map(|r| r.map_err(Into::into)))?;
        let mut sections = sections
            .next_section()
            .context("authority")?
            .context("authority section")?;
        let authority = records(&mut sections.by_ref().map(|r| r.map_err(Into::into)))?;
        let additional_section = sections
            .next_section()
            .context("additional")?
            .context("additional section")?;
        let additional: Vec<Rr> = records(&mut additional_section.map(|r| r.map_err(Into::into)))?
            .into_iter()
            .filter(|rr| rr.rtype != Rtype::OPT)
            .collect();
        let opt = message.opt().map(|opt| ReplyOpt {
            udp_payload: opt.udp_payload_size(),
            version: opt.version(),
            dnssec_ok: opt.dnssec_ok(),
        });
        Ok(Self {
            raw: raw.to_vec(),
            id: header.id(),
            rcode: message.opt_rcode(),
            opcode: header.opcode(),
            qr: header.qr(),
            aa: header.aa(),
            tc: header.tc(),
            rd: header.rd(),
            ra: header.ra(),
            question,
            answer,
            authority,
            additional,
            opt,
        })
    }

    /// Sorted `(lower-case name, type, rdata)` of the answer section, TTLs left out.
    pub fn rdata(&self) -> Vec<(String, Rtype, String)> {
        let mut set: Vec<_> = self
            .answer
            .iter()
            .map(|rr| (rr.name.to_ascii_lowercase(), rr.rtype, rr.rdata.clone()))
            .collect();
        set.sort();
        set
    }

    /// The largest answer TTL (0 if the answer section is empty).
    pub fn max_answer_ttl(&self) -> u32 {
        self.answer.iter().map(|rr| rr.ttl).max().unwrap_or(0)
    }
}

/// Parses every record of one section.
fn records(
    section: &mut dyn Iterator<Item = anyhow::Result<ParsedRecord<'_, Vec<u8>>>>,
) -> anyhow::Result<Vec<Rr>> {
    let mut out = Vec::new();
    for record in section {
        let record = record.context("parsing record header")?;
        let rtype = record.rtype();
        let parsed = record
            .into_any_record::<AllRecordData<_, ParsedName<_>>>()
            .context("parsing record data")?;
        out.push(Rr {
            name: name_string(parsed.owner()),
            ttl: parsed.ttl().as_secs(),
            rtype,
            rdata: parsed.data().to_string(),
        });
    }
    Ok(out)
}

/// A parsed name as text with a trailing dot, case preserved.
fn name_string<N: std::fmt::Display>(name: &N) -> String {
    let text = name.to_string();
    if text.ends_with('.') {
        text
    } else {
        format!("{text}.")
    }
}

/// Sends `packet` over UDP from a fresh socket; `Ok(None)` if nothing arrives within `timeout`.
///
/// Datagrams from other addresses are ignored; the first one from `server` is returned as is
/// (even if its ID does not match: tests check that themselves).
pub fn udp_exchange(
    server: SocketAddr,
    packet: &[u8],
    timeout: Duration,
) -> anyhow::Result<Option<Vec<u8>>> {
    let socket = udp_socket(server)?;
    socket
        .send_to(packet, server)
        .context("sending UDP query")?;
    udp_receive(&socket, server, timeout)
}

/// A fresh UDP socket on an ephemeral port of the loopback family matching `server`.
pub fn udp_socket(server: SocketAddr) -> anyhow::Result<UdpSocket> {
    let local = if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    UdpSocket::bind(local).with_context(|| format!("binding UDP {local}"))
}

/// Waits at most `timeout` for a datagram from `server` on `socket`.
pub fn udp_receive(
    socket: &UdpSocket,
    server: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65535];
    // Bounded: each iteration either returns or waits until the deadline shrinks to zero.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((len, from)) if from == server => return Ok(Some(buf[..len].to_vec())),
            Ok(_) => {}
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(error) => return Err(error).context("receiving UDP answer"),
        }
    }
}

/// Sends `query` over UDP and parses the answer; an error if none arrives within
/// [`DEFAULT_TIMEOUT`].
pub fn udp(server: SocketAddr, query: &Query) -> anyhow::Result<Reply> {
    let raw = udp_exchange(server, &query.to_wire(), DEFAULT_TIMEOUT)?
        .with_context(|| format!("no UDP answer from {server} within {DEFAULT_TIMEOUT:?}"))?;
    Reply::parse(&raw)
}

/// Sends `query` over a fresh TCP connection and parses the answer.
pub fn tcp(server: SocketAddr, query: &Query) -> anyhow::Result<Reply> {
    let mut stream = tcp_connect(server)?;
    tcp_send(&mut stream, &query.to_wire())?;
    let raw = tcp_receive(&mut stream)?
        .with_context(|| format!("TCP connection to {server} closed without an answer"))?;
    Reply::parse(&raw)
}

/// Connects to `server` with [`DEFAULT_TIMEOUT`] for connect, reads and writes.
pub fn tcp_connect(server: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&server, DEFAULT_TIMEOUT)
        .with_context(|| format!("connecting to {server}"))?;
    stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
    stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
    Ok(stream)
}

/// Writes one length-prefixed message (RFC 1035 §4.2.2).
pub fn tcp_send(stream: &mut TcpStream, message: &[u8]) -> anyhow::Result<()> {
    let len = u16::try_from(message.len()).context("message fits a TCP frame")?;
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(message);
    stream.write_all(&frame).context("writing TCP frame")
}

/// Reads one length-prefixed message; `Ok(None)` if the peer closed before a whole frame.
///
/// A read timeout (the stream's, [`DEFAULT_TIMEOUT`] from [`tcp_connect`]) is an error.
pub fn tcp_receive(stream: &mut TcpStream) -> anyhow::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(None)
        }
        Err(error) => return Err(error).context("reading TCP length"),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    match stream.read_exact(&mut message) {
        Ok(()) => Ok(Some(message)),
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            Ok(None)
        }
        Err(error) => Err(error).context("reading TCP message"),
    }
}

/// Checks the basics every answer to `query` must satisfy: QR set, ID and question echoed
/// exactly (case included, RFC 1035 §7.3 and draft-vixie-dnsext-dns0x20).
pub fn assert_echoes(query: &Query, reply: &Reply) -> anyhow::Result<()> {
    if !reply.qr {
        bail!("answer has QR=0: {reply:?}");
    }
    if reply.id != query.id {
        bail!("ID {:#06x} sent, {:#06x} received", query.id, reply.id);
    }
    let mut sent = query.name.clone();
    if !sent.ends_with('.') {
        sent.push('.');
    }
    if reply.question != vec![(sent.clone(), query.qtype)] {
        bail!(
            "question {:?} sent, {:?} received",
            (sent, query.qtype),
            reply.question
        );
    }
    Ok(())
}
