//! One UDP miss through a worker's user-space path, as its ring loop runs it, without the
//! kernel: shared by `benches/hit_path.rs` (its time) and `tests/hit_alloc.rs` (its
//! allocations).
//!
//! The client's query misses and is parked; the request goes to the worker's exchanges, which
//! send it upstream (to [`LastSent`], which keeps it in one reused buffer); the upstream's
//! answer (two A records and an OPT record, built in a reused buffer) is received, matched and
//! handed back; the handler validates and caches it and writes the client's reply. The names
//! are 20,000 distinct ones in turn, twice the cache's default capacity, so each is evicted
//! before it comes round again: every query is a miss and, once the cache is full, every insert
//! evicts, as in perf/run.sh's miss runs.
//!
//! Runs on: the bench's or test's thread; no I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringdns::cache::Limits;
use ringdns::config::{
    ForwardZone, Transport, DENIAL_CAPACITY, DENIAL_TTL, SERVFAIL_TTL, SUCCESS_CAPACITY,
    SUCCESS_TTL,
};
use ringdns::worker::handler::{Action, Handler, Settings};
use ringdns::worker::pending::Origin;
use ringdns::worker::stats::{Counter, WorkerStats};
use ringdns::worker::upstream::{Done, Exchanges, ForwardSetup, UpstreamIo};

/// Distinct names the misses cycle through.
const NAMES: usize = 20_000;
/// Our EDNS payload size (the config default).
const UDP_PAYLOAD: u16 = ringdns::config::UDP_PAYLOAD.default;
/// The length of the OPT record ringdns appends to its upstream queries (no options).
const OPT_LEN: usize = 11;

/// The cache limits of ringdns' default configuration (NodeLocal DNSCache's: 9984 + 9984
/// entries, 30 s / 5 s caps, SERVFAIL not cached).
pub(crate) fn default_limits() -> Limits {
    Limits {
        success_capacity: SUCCESS_CAPACITY.default,
        success_ttl: SUCCESS_TTL.default,
        denial_capacity: DENIAL_CAPACITY.default,
        denial_ttl: DENIAL_TTL.default,
        servfail_ttl: SERVFAIL_TTL.default,
    }
}

/// The upstream side: sockets are numbers, and the last query sent is kept in one reused
/// buffer, so that this harness allocates nothing per miss.
#[derive(Default)]
struct LastSent {
    sockets: u32,
    socket: u32,
    packet: Vec<u8>,
}

impl UpstreamIo for LastSent {
    fn open(&mut self, _addr: SocketAddr) -> std::io::Result<u32> {
        self.sockets += 1;
        Ok(self.sockets)
    }

    fn send(&mut self, socket: u32, query: &[u8], id: u16) -> bool {
        self.socket = socket;
        self.packet.clear();
        self.packet.extend_from_slice(query);
        self.packet[..2].copy_from_slice(&id.to_be_bytes());
        true
    }

    fn close(&mut self, _socket: u32) {}
}

/// A worker's handler (cache at NodeLocal DNSCache's defaults) and UDP exchanges, and the
/// clients' queries.
pub(crate) struct WorkerMiss {
    handler: Handler,
    exchanges: Exchanges,
    io: LastSent,
    names: Vec<Vec<u8>>,
    next: usize,
    out: Vec<u8>,
    requests: Vec<ringdns::upstream::Request>,
    done: Vec<Done>,
    answer: Vec<u8>,
    stats: Arc<WorkerStats>,
    /// Replies written to clients so far, each checked to be the answer (NOERROR, 2 records).
    pub(crate) answered: u64,
}

impl WorkerMiss {
    /// A fresh worker with an empty cache; `query(name)` builds a client's query.
    pub(crate) fn new(query: impl Fn(&str) -> Vec<u8>) -> WorkerMiss {
        let settings = Settings {
            udp_payload: UDP_PAYLOAD,
            limits: default_limits(),
            miss_deadline: Duration::from_secs(3),
            max_misses: 4096,
            max_waiters: 1024,
        };
        let zones = vec![ForwardZone {
            zone: ".".to_owned(),
            upstreams: vec![SocketAddr::from(([127, 0, 0, 11], 53))],
            transport: Transport::Udp,
            timeout: Duration::from_secs(2),
        }];
        let stats = Arc::new(WorkerStats::default());
        WorkerMiss {
            handler: Handler::new(0, settings, Arc::clone(&stats)),
            exchanges: Exchanges::new(0, ForwardSetup::new(zones, UDP_PAYLOAD)),
            io: LastSent::default(),
            names: (0..NAMES)
                .map(|n| query(&format!("svc-{n}.default.svc.cluster.local")))
                .collect(),
            next: 0,
            out: vec![0; 65535],
            requests: Vec::new(),
            done: Vec::new(),
            answer: Vec::new(),
            stats,
            answered: 0,
        }
    }

    /// Misses run so far.
    pub(crate) fn misses(&self) -> u64 {
        self.next as u64
    }

    /// Upstream answers the handler accepted, and cache evictions, so far.
    pub(crate) fn accepted_and_evicted(&self) -> (u64, u64) {
        (
            self.stats.read(Counter::UpstreamAnswers),
            self.stats.read(Counter::Evictions),
        )
    }

    /// One miss for the next name, answered at `now`.
    pub(crate) fn miss(&mut self, now: Instant) {
        let origin = Origin::Udp {
            socket: 0,
            peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        };
        let client = &self.names[self.next % self.names.len()];
        self.next += 1;
        let action = self
            .handler
            .handle_query(client, now, origin, &mut self.out);
        assert_eq!(action, Action::Parked, "every name is a miss");
        self.handler.take_requests(&mut self.requests);
        for request in self.requests.drain(..) {
            assert!(self.exchanges.start(request, now, &mut self.io).is_none());
        }
        // The answer: the query as sent (ID included) up to our OPT record, then two A records
        // (TTL 30) and an OPT record.
        let packet = &self.io.packet;
        self.answer.clear();
        self.answer
            .extend_from_slice(&packet[..packet.len() - OPT_LEN]);
        self.answer[2] = 0x81;
        self.answer[3] = 0x80;
        self.answer[7] = 2;
        self.answer[11] = 1;
        for last in [1u8, 2] {
            self.answer
                .extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, last]);
        }
        self.answer.extend([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        self.exchanges
            .receive(self.io.socket, &self.answer, false, now);
        if self.exchanges.has_work() {
            self.exchanges.run(now, &mut self.io);
        }
        self.exchanges.take_done(&mut self.done);
        let answered = &mut self.answered;
        for finished in self.done.drain(..) {
            let Done::Reply(reply) = finished else {
                panic!("a whole answer goes to the client, not to TCP");
            };
            self.handler
                .handle_reply(reply, now, &mut self.out, &mut |_, bytes| {
                    // The client gets the answer: NOERROR, its two records.
                    assert_eq!(bytes.get(3).map(|flags| flags & 0x0f), Some(0), "rcode");
                    assert_eq!(bytes.get(6..8), Some(&[0, 2][..]), "ANCOUNT");
                    *answered += 1;
                });
        }
    }
}
