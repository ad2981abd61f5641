//! The `exchanges` fuzz target: a worker's UDP exchanges with its upstreams
//! (`ringdns::worker::upstream::Exchanges`, sans-IO) driven by a script that the input spells
//! out, one operation per byte: misses start; genuine, late, duplicated, truncated, cut,
//! re-cased, misdirected or mangled answers and raw garbage arrive on the upstream sockets;
//! sockets report errors (ICMP refusals and others); opening sockets and queuing sends fail
//! for a while; the configuration is reloaded; time passes. Each step is followed by what the
//! worker's loop does (`run` when work or a timer is due, then `take_done`), and checked:
//!
//! - **No miss is left waiting**: every exchange started ends exactly once, no later than its
//!   zone's timeout after it started; while any is in flight a timer is armed (the worker would
//!   otherwise sleep with clients parked); a miss outside the worker's UDP zones is handed back
//!   at once, unchanged.
//! - **Only a genuine answer is accepted**: an answer comes out only in the step that delivered
//!   it, byte for byte (the ID set to 0); the datagram was a response (QR=1) with the question
//!   asked (letter case aside), carrying an ID sent for that question on that very socket (not
//!   an earlier socket that had the same index). A truncated, cut or over-long one goes to the
//!   control side instead, over TCP to the upstream that sent it, within what is left of the
//!   budget.
//! - **Sockets are handled cleanly**: nothing is sent on or closed twice from a socket that is
//!   not open; the open sockets are exactly the ones the exchanges track; once everything is
//!   answered and time has passed, only sockets to UDP upstreams of the configuration in force
//!   are left, at most 8 each (`SOCKETS_PER_UPSTREAM`; those of older configurations closed).
//!
//! Runs on: the fuzzer's or the test's thread; pure (the clock is simulated).

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use ringdns::config::{ForwardZone, Transport};
use ringdns::upstream::{Failure, Outcome, Request, Via};
use ringdns::worker::upstream::{Done, Exchanges, ForwardSetup, UpstreamIo};

use crate::checks::{stub_query, valid_answer, wire_name};

/// The upstreams the configurations below forward to.
const UPSTREAMS: [SocketAddr; 3] = [
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 53)),
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 12), 53)),
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 5353, 0, 0)),
];

/// Upstream sockets a worker keeps per upstream (`upstream::SOCKETS_PER_UPSTREAM`).
const SOCKETS_PER_UPSTREAM: usize = 8;

/// `server.udp_payload`: answers longer than this go to the control side over TCP.
const UDP_PAYLOAD: u16 = 1232;

/// The questions misses ask: name (lower case, as the handler sends it upstream) and type.
const QUESTIONS: [(&str, u16); 6] = [
    ("svc-1.default.svc.cluster.local", 1),
    ("svc-1.default.svc.cluster.local", 28),
    ("www.example.com", 1),
    ("www.example.com", 1),
    ("host.example", 1),
    ("10.0.96.10.in-addr.arpa", 12),
];

/// Errors the kernel reports on a connected UDP socket (Linux errno values; the fuzz crate
/// does not depend on libc): ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, EMSGSIZE, ENOBUFS, EPERM.
const ERRNOS: [i32; 6] = [111, 113, 101, 90, 105, 1];

/// One of four configurations (`pick`), every UDP zone with `timeout`: zone name, transport,
/// upstreams.
fn zones(pick: u8, timeout: Duration) -> Vec<ForwardZone> {
    let zone = |zone: &str, transport, upstreams: &[usize]| ForwardZone {
        zone: zone.to_owned(),
        upstreams: upstreams.iter().map(|&n| UPSTREAMS[n]).collect(),
        transport,
        timeout,
    };
    match pick % 4 {
        0 => vec![zone(".", Transport::Udp, &[0, 1])],
        1 => vec![
            zone(".", Transport::Udp, &[0]),
            zone("cluster.local.", Transport::Udp, &[1, 2]),
            zone("example.", Transport::Tcp, &[2]),
        ],
        2 => vec![zone(".", Transport::Udp, &[2, 0, 1])],
        _ => vec![
            zone("cluster.local.", Transport::Udp, &[1]),
            zone("in-addr.arpa.", Transport::PreferUdp, &[0]),
        ],
    }
}

/// The zone timeout a byte picks: 100 ms (the smallest allowed) to 3 s.
fn timeout_of(byte: u8) -> Duration {
    Duration::from_millis(100 + 250 * u64::from(byte % 12))
}

/// The timeout of the UDP zone `name` is forwarded in under `zones` (longest suffix), or `None`
/// if the worker must hand it back (no zone, or a zone not over plain UDP).
fn udp_zone_timeout(zones: &[ForwardZone], name: &str) -> Option<Duration> {
    let name = format!("{}.", name.to_ascii_lowercase());
    let within = |zone: &str| zone == "." || name == zone || name.ends_with(&format!(".{zone}"));
    let best = zones
        .iter()
        .filter(|zone| within(&zone.zone))
        .max_by_key(|zone| if zone.zone == "." { 0 } else { zone.zone.len() })?;
    (best.transport == Transport::Udp).then_some(best.timeout)
}

/// A socket the exchanges opened: its upstream and which opening it is (indexes are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Opened {
    addr: SocketAddr,
    incarnation: u64,
}

/// One datagram sent upstream.
#[derive(Debug)]
struct Sent {
    socket: u32,
    incarnation: u64,
    /// The query as sent, with its ID.
    packet: Vec<u8>,
}

/// The sockets, as the ring would hold them, with faults to inject.
#[derive(Debug, Default)]
struct Sockets {
    /// Index → the open socket; `None` once closed (and reused first, as the ring does).
    open: Vec<Option<Opened>>,
    openings: u64,
    sent: Vec<Sent>,
    /// Opening a socket to these fails.
    unreachable: Vec<SocketAddr>,
    /// No send slot is free.
    full: bool,
}

impl UpstreamIo for Sockets {
    fn open(&mut self, addr: SocketAddr) -> io::Result<u32> {
        if self.unreachable.contains(&addr) {
            return Err(io::ErrorKind::NetworkUnreachable.into());
        }
        self.openings += 1;
        let opened = Some(Opened {
            addr,
            incarnation: self.openings,
        });
        let index = match self.open.iter().position(Option::is_none) {
            Some(index) => {
                self.open[index] = opened;
                index
            }
            None => {
                self.open.push(opened);
                self.open.len() - 1
            }
        };
        Ok(u32::try_from(index).expect("few sockets"))
    }

    fn send(&mut self, socket: u32, query: &[u8], id: u16) -> bool {
        let opened = self
            .opened(socket)
            .expect("a send on a socket that is not open");
        if self.full {
            return false;
        }
        let mut packet = query.to_vec();
        packet[..2].copy_from_slice(&id.to_be_bytes());
        self.sent.push(Sent {
            socket,
            incarnation: opened.incarnation,
            packet,
        });
        true
    }

    fn close(&mut self, socket: u32) {
        let slot = self
            .open
            .get_mut(socket as usize)
            .expect("a close of a socket never opened");
        assert!(slot.take().is_some(), "socket {socket} closed twice");
    }
}

impl Sockets {
    fn opened(&self, socket: u32) -> Option<Opened> {
        self.open.get(socket as usize).copied().flatten()
    }

    fn open_count(&self) -> usize {
        self.open.iter().flatten().count()
    }
}

/// A miss in flight: its query, and when its zone's budget ends.
#[derive(Debug)]
struct Miss {
    query: Vec<u8>,
    deadline: Instant,
}

/// The datagram the current step delivered.
#[derive(Debug)]
struct Delivered {
    socket: u32,
    opened: Opened,
    datagram: Vec<u8>,
    cut: bool,
}

/// The input, read a byte at a time (zero once it runs out).
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&byte, rest)) => {
                self.0 = rest;
                byte
            }
            None => 0,
        }
    }

    fn bytes(&mut self, len: usize) -> &[u8] {
        let (taken, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

/// The state of one run.
struct Run {
    exchanges: Exchanges,
    io: Sockets,
    zones: Vec<ForwardZone>,
    now: Instant,
    misses: BTreeMap<u64, Miss>,
    next_token: u64,
    done: Vec<Done>,
}

/// `data` as a script (see the module docs).
pub(crate) fn exchanges(data: &[u8]) {
    let mut script = Script(data);
    let zones = zones(script.byte(), timeout_of(script.byte()));
    let mut run = Run {
        exchanges: Exchanges::new(0, ForwardSetup::new(zones.clone(), UDP_PAYLOAD)),
        io: Sockets::default(),
        zones,
        now: Instant::now(),
        misses: BTreeMap::new(),
        next_token: 1,
        done: Vec::new(),
    };
    while !script.0.is_empty() {
        let delivered = run.step(&mut script);
        run.settle(delivered.as_ref());
    }
    // Everything must end within the longest budget (3 s); then idle sockets go.
    for _ in 0..2 {
        run.now += Duration::from_secs(4);
        run.settle(None);
    }
    assert!(
        run.misses.is_empty(),
        "misses never answered: {:?}",
        run.misses
    );
    assert!(run.exchanges.is_empty());
    assert_eq!(run.exchanges.next_timer(), None, "a timer left behind");
    // Idle: only sockets to the UDP upstreams of the configuration in force are left, at most
    // SOCKETS_PER_UPSTREAM each (those of older configurations were closed once idle).
    let mut per_upstream: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for opened in run.io.open.iter().flatten() {
        *per_upstream.entry(opened.addr).or_default() += 1;
    }
    for (addr, sockets) in per_upstream {
        let in_force = run
            .zones
            .iter()
            .any(|zone| zone.transport == Transport::Udp && zone.upstreams.contains(&addr));
        assert!(
            in_force,
            "{sockets} sockets left open to {addr}, no UDP upstream now"
        );
        assert!(
            sockets <= SOCKETS_PER_UPSTREAM,
            "{sockets} sockets left open to {addr}"
        );
    }
}

impl Run {
    /// Performs the next operation of `script`; returns the datagram it delivered, if any.
    fn step(&mut self, script: &mut Script<'_>) -> Option<Delivered> {
        match script.byte() % 10 {
            0 => self.start(script.byte()),
            1 => return self.answer(script.byte(), script.byte()),
            2 => {
                let socket = u32::from(script.byte() % 8);
                let len = usize::from(script.byte() % 64);
                let datagram = script.bytes(len).to_vec();
                return self.deliver(socket, datagram, false);
            }
            3 => {
                let (pick, at, value) = (script.byte(), script.byte(), script.byte());
                let (socket, mut datagram) = self.genuine(pick)?;
                let at = usize::from(at) % datagram.len();
                datagram[at] = value;
                return self.deliver(socket, datagram, false);
            }
            4 => {
                let socket = u32::from(script.byte() % 8);
                let errno = ERRNOS[usize::from(script.byte()) % ERRNOS.len()];
                self.exchanges.socket_error(socket, errno);
            }
            5 => {
                let steps = [
                    0, 1, 5, 50, 99, 100, 101, 249, 250, 251, 500, 1000, 2000, 3000,
                ];
                self.now += Duration::from_millis(steps[usize::from(script.byte()) % steps.len()]);
            }
            6 => self.io.full = !self.io.full,
            7 => {
                let addr = UPSTREAMS[usize::from(script.byte()) % UPSTREAMS.len()];
                match self.io.unreachable.iter().position(|&down| down == addr) {
                    Some(at) => {
                        self.io.unreachable.swap_remove(at);
                    }
                    None => self.io.unreachable.push(addr),
                }
            }
            8 => {
                self.zones = zones(script.byte(), timeout_of(script.byte()));
                let setup = ForwardSetup::new(self.zones.clone(), UDP_PAYLOAD);
                self.exchanges.reconfigure(setup);
            }
            _ => {}
        }
        None
    }

    /// Starts a miss for the question `pick` chooses.
    fn start(&mut self, pick: u8) {
        let (name, qtype) = QUESTIONS[usize::from(pick) % QUESTIONS.len()];
        let query = stub_query(0, name, qtype, pick & 0x80 != 0);
        let token = self.next_token;
        self.next_token += 1;
        let request = Request {
            worker: 0,
            token,
            query: query.clone(),
            via: Via::Zone,
        };
        let back = self.exchanges.start(request, self.now, &mut self.io);
        match (udp_zone_timeout(&self.zones, name), back) {
            (Some(timeout), None) => {
                let deadline = self.now + timeout;
                self.misses.insert(token, Miss { query, deadline });
            }
            (None, Some(request)) => {
                assert_eq!(request.token, token);
                assert_eq!(request.query, query, "a handed-back query was changed");
                assert_eq!(request.via, Via::Zone);
            }
            (Some(_), Some(_)) => panic!("{name} is in a UDP zone but was handed back"),
            (None, None) => panic!("{name} is in no UDP zone but was forwarded here"),
        }
    }

    /// The genuine answer to one of the last 16 queries sent (`pick` chooses), on the socket it
    /// went out on, if that socket is still the one open at its index.
    fn genuine(&self, pick: u8) -> Option<(u32, Vec<u8>)> {
        let recent = self.io.sent.len().min(16);
        let sent = self.io.sent.get(
            self.io
                .sent
                .len()
                .checked_sub(1 + usize::from(pick) % recent.max(1))?,
        )?;
        let opened = self.io.opened(sent.socket)?;
        (opened.incarnation == sent.incarnation).then(|| (sent.socket, valid_answer(&sent.packet)))
    }

    /// Delivers a genuine answer, or a variant of it that `how` picks.
    fn answer(&mut self, pick: u8, how: u8) -> Option<Delivered> {
        let (socket, mut datagram) = self.genuine(pick)?;
        let mut cut = false;
        match how % 9 {
            0 | 1 => {}
            2 => datagram[2] |= 0x02, // TC=1
            3 => cut = true,          // longer than our receive buffer
            4 => {
                // Longer than our payload: padding in an additional record's worth of bytes.
                datagram.resize(usize::from(UDP_PAYLOAD) + 1 + usize::from(how % 7), 0);
            }
            5 => {
                // The upstream echoes the qname in another case (0x20): still the question.
                for byte in &mut datagram[12..] {
                    if *byte == 0 {
                        break;
                    }
                    *byte = byte.to_ascii_uppercase();
                }
            }
            6 => datagram[2] &= 0x7f,          // QR=0: a reflected query
            7 => datagram[1] ^= (how / 9) | 1, // another ID (how % 9 is 7 here)
            _ => {
                // Another question with the same ID.
                datagram.splice(12..12, wire_name("other.example"));
            }
        }
        self.deliver(socket, datagram, cut)
    }

    /// Hands `datagram` to the exchanges as received on `socket`, if it is open.
    fn deliver(&mut self, socket: u32, datagram: Vec<u8>, cut: bool) -> Option<Delivered> {
        let opened = self.io.opened(socket)?;
        self.exchanges.receive(socket, &datagram, cut, self.now);
        Some(Delivered {
            socket,
            opened,
            datagram,
            cut,
        })
    }

    /// What the worker's loop does after an event, then the checks of the module docs.
    fn settle(&mut self, delivered: Option<&Delivered>) {
        let due = self.exchanges.next_timer().is_some_and(|at| at <= self.now);
        if self.exchanges.has_work() || due {
            self.exchanges.run(self.now, &mut self.io);
        }
        self.exchanges.take_done(&mut self.done);
        for done in std::mem::take(&mut self.done) {
            self.check_done(done, delivered);
        }
        for (token, miss) in &self.misses {
            assert!(
                miss.deadline > self.now,
                "miss {token} still in flight {:?} after its deadline",
                self.now - miss.deadline
            );
        }
        assert_eq!(
            self.exchanges.len(),
            self.misses.len(),
            "exchanges in flight"
        );
        if let Some(deadline) = self.misses.values().map(|miss| miss.deadline).min() {
            let timer = self.exchanges.next_timer();
            assert!(
                timer.is_some_and(|at| at <= deadline),
                "misses in flight but the next timer is {:?}, after the first deadline",
                timer.map(|at| at.saturating_duration_since(self.now))
            );
        }
        assert_eq!(
            self.io.open_count(),
            self.exchanges.sockets(),
            "open sockets the exchanges do not track (or the reverse)"
        );
    }

    /// Checks one finished exchange against what was delivered in this step.
    fn check_done(&mut self, done: Done, delivered: Option<&Delivered>) {
        let token = match &done {
            Done::Reply(reply) => reply.token,
            Done::Control(request) => request.token,
        };
        let miss = self
            .misses
            .remove(&token)
            .unwrap_or_else(|| panic!("exchange {token} ended twice, or was never started"));
        let outcome = match done {
            Done::Reply(reply) => reply.outcome,
            Done::Control(request) => {
                let delivered = delivered.expect("a hand-over to TCP with nothing delivered");
                self.check_genuine(&miss, delivered);
                let truncated = delivered.cut
                    || delivered.datagram[2] & 0x02 != 0
                    || delivered.datagram.len() > usize::from(UDP_PAYLOAD);
                assert!(truncated, "a whole answer handed over to TCP");
                assert_eq!(
                    request.query, miss.query,
                    "the TCP retry asks something else"
                );
                let Via::Tcp { addr, budget } = request.via else {
                    panic!("a hand-over not over TCP: {:?}", request.via);
                };
                assert_eq!(addr, delivered.opened.addr, "TCP retry to another upstream");
                assert!(
                    self.now + budget <= miss.deadline,
                    "the TCP retry gets more than the budget left"
                );
                return;
            }
        };
        match outcome {
            Outcome::Answer(bytes) => {
                let delivered = delivered.expect("an answer with nothing delivered");
                self.check_genuine(&miss, delivered);
                assert_eq!(&bytes[..2], &[0, 0], "an answer with its ID left in");
                assert_eq!(&bytes[2..], &delivered.datagram[2..], "an answer changed");
                let whole = !delivered.cut
                    && delivered.datagram[2] & 0x02 == 0
                    && delivered.datagram.len() <= usize::from(UDP_PAYLOAD);
                assert!(whole, "a truncated answer accepted over UDP");
            }
            Outcome::Failed(failure) => assert!(
                matches!(failure, Failure::Timeout | Failure::Overloaded),
                "exchange {token} failed with {failure:?}"
            ),
        }
    }

    /// Asserts that `delivered` answers `miss`: a response with its question (case aside), on
    /// the socket (this opening of it) that a query with that question and the answer's ID
    /// went out on.
    fn check_genuine(&self, miss: &Miss, delivered: &Delivered) {
        let datagram = &delivered.datagram;
        assert!(datagram.len() >= 12, "a short datagram accepted");
        assert!(datagram[2] & 0x80 != 0, "a datagram without QR accepted");
        let asked = question_of(&miss.query).expect("our query has a question");
        assert_eq!(
            question_of(datagram),
            Some(asked.clone()),
            "another question accepted"
        );
        let sent_here = self.io.sent.iter().any(|sent| {
            sent.socket == delivered.socket
                && sent.incarnation == delivered.opened.incarnation
                && sent.packet[..2] == datagram[..2]
                && question_of(&sent.packet).as_ref() == Some(&asked)
        });
        assert!(
            sent_here,
            "an answer with an ID never sent for it on that socket"
        );
    }
}

/// The question of `packet` (QDCOUNT 1, uncompressed): the qname in lower case, and the type
/// and class bytes.
fn question_of(packet: &[u8]) -> Option<(Vec<u8>, [u8; 4])> {
    if packet.get(4..6)? != [0, 1] {
        return None;
    }
    let mut end = 12;
    loop {
        let len = usize::from(*packet.get(end)?);
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        end += 1 + len;
    }
    let name = packet.get(12..=end)?.to_ascii_lowercase();
    let rest = packet.get(end + 1..end + 5)?;
    Some((name, [rest[0], rest[1], rest[2], rest[3]]))
}
