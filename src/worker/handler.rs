//! Sans-IO query handling: (query bytes, now, shard) → what to send.
//!
//! Runs on: worker threads. Does no I/O and reads no clock; `now` comes from the receive loop.
//! A miss leaves as a [`Request`] in the handler's outbox; the caller takes the outbox once per
//! batch ([`Handler::take_requests`]) and sends each request on its way: over UDP from the
//! worker's own ring, or to the control side.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::{Limits, Lookup, Shard};
use crate::dns::{self, Answer, Kind, Query, Rejection, KEY_MAX};
use crate::upstream::{Failure, Outcome, Reply, Request, Via};

use super::pending::{Joined, Origin, Pending, Waiter};
use super::stats::{CacheType, Counter, Labels, Plugin, Proto, WorkerStats};

/// Largest DNS message over TCP (RFC 1035 §4.2.2: 16-bit length prefix).
pub const TCP_MESSAGE_MAX: usize = 65535;

/// Miss tokens of one start of a worker: 2^40 of them (a restart begins the next range).
const GENERATION_SHIFT: u32 = 40;

/// What the worker does with one received query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the first `len` bytes of the scratch buffer back to the client.
    Reply {
        /// Reply length.
        len: usize,
    },
    /// Cache miss: the client is parked until the upstream answer arrives.
    Parked,
    /// Send nothing; the reason is already counted.
    Drop(DropReason),
}

/// Why a packet got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a DNS header.
    TooShort,
    /// A response (QR=1), not a query.
    IsResponse,
    /// A reply did not fit the scratch buffer (cannot happen with correctly sized buffers).
    NoRoom,
}

/// Settings the handler needs from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Our EDNS payload size (advertised upstream and in replies; cap on UDP replies).
    pub udp_payload: u16,
    /// Cache limits.
    pub limits: Limits,
    /// After this long a parked client is answered SERVFAIL by the worker itself, even if the
    /// control side never replied (the longest zone timeout plus a margin).
    pub miss_deadline: Duration,
    /// Most distinct misses in flight per worker.
    pub max_misses: usize,
    /// Most clients parked on one miss.
    pub max_waiters: usize,
}

/// One worker's DNS state: its cache shard, its in-flight misses, its counters.
#[derive(Debug)]
pub struct Handler {
    /// This worker's index (identifies it to the control side).
    worker: usize,
    /// Settings.
    settings: Settings,
    /// The cache shard.
    shard: Shard,
    /// Misses in flight.
    pending: Pending,
    /// Upstream requests of new misses, until the caller takes them.
    outbox: Vec<Request>,
    /// Counters.
    stats: Arc<WorkerStats>,
    /// Scratch for the cache key (kept here so a hit does not allocate or use much stack).
    key: [u8; KEY_MAX],
}

impl Handler {
    /// A handler for worker `worker`.
    pub fn new(worker: usize, settings: Settings, stats: Arc<WorkerStats>) -> Handler {
        // A worker restarted in place counts on in its predecessor's series: its cache is empty.
        stats.set_cache_entries((0, 0));
        Handler {
            worker,
            settings,
            shard: Shard::new(settings.limits),
            pending: Pending::new(settings.max_misses, settings.max_waiters),
            outbox: Vec::new(),
            stats,
            key: [0; KEY_MAX],
        }
    }

    /// Handles one query from `origin`, writing any reply into `out`.
    ///
    /// A cache hit does not allocate. Every parsed query is counted under its listen socket,
    /// zone, protocol and qtype; its response (now, or when the miss is answered) under its
    /// rcode and plugin, with the time since `now` as its duration.
    pub fn handle_query(
        &mut self,
        bytes: &[u8],
        now: Instant,
        origin: Origin,
        out: &mut [u8],
    ) -> Action {
        let udp_payload = self.settings.udp_payload;
        let limit = match origin {
            Origin::Udp { .. } => {
                self.stats.bump(Counter::UdpQueries);
                None
            }
            Origin::Tcp { .. } => {
                self.stats.bump(Counter::TcpQueries);
                Some(TCP_MESSAGE_MAX)
            }
        };
        let query = match Query::parse(bytes) {
            Ok(query) => query,
            Err(rejection) => return self.reject(bytes, rejection, out),
        };
        #[cfg(debug_assertions)]
        super::fault::check(query.qname);
        let limit = limit.unwrap_or_else(|| query.udp_limit(udp_payload));
        let id_server = query.is_id_server();
        let zones = self.stats.layout().zones();
        let zone = if id_server {
            zones.root()
        } else {
            zones.index_of(query.qname)
        };
        let labels = labels(origin, zone);
        let dnssec_ok = query.edns.is_some_and(|edns| edns.dnssec_ok);
        self.stats
            .record_query(labels, query.qtype, bytes.len(), dnssec_ok);
        if id_server {
            self.stats.bump(Counter::IdServer);
            let len = dns::write_id_server(&query, udp_payload, out);
            return self.answered(labels, len, out, Plugin::Chaos, Duration::ZERO);
        }
        let key_len = query.key_into(&mut self.key);
        let key = &self.key[..key_len];
        if let Lookup::Hit { answer, ttl_secs } = self.shard.lookup(key, now) {
            self.stats.bump(Counter::CacheHits);
            let kind = match answer.kind() {
                Kind::Success | Kind::Other => CacheType::Success,
                Kind::Denial | Kind::ServFail => CacheType::Denial,
            };
            self.stats
                .record_cache(labels.socket, labels.zone, Some(kind));
            let len = answer.write_reply(&query, ttl_secs, udp_payload, limit, out);
            // Served with the clock read once per batch: a hit's duration is ~0 by design.
            return self.answered(labels, len, out, Plugin::Cache, Duration::ZERO);
        }
        self.stats.bump(Counter::CacheMisses);
        self.stats.record_cache(labels.socket, labels.zone, None);
        // The lookup may have dropped an expired entry.
        self.stats.set_cache_entries(self.shard.len());
        let waiter = Waiter {
            origin,
            query: bytes.into(),
            parked: now,
            zone: labels.zone,
        };
        let deadline = now + self.settings.miss_deadline;
        match self.pending.join(key, waiter, deadline) {
            Joined::Coalesced => {
                self.stats.bump(Counter::Coalesced);
                Action::Parked
            }
            Joined::New(token) => {
                self.outbox.push(Request {
                    worker: self.worker,
                    token,
                    query: dns::upstream_query(&query, udp_payload),
                    via: Via::Zone,
                });
                Action::Parked
            }
            Joined::Full => self.overloaded(&query, labels, out),
        }
    }

    /// Answers every client parked on `reply`'s miss through `send`, caching the answer if
    /// it may be cached. `out` is scratch for building each reply.
    pub fn handle_reply(
        &mut self,
        reply: Reply,
        now: Instant,
        out: &mut [u8],
        send: &mut dyn FnMut(Origin, &[u8]),
    ) {
        let Some(miss) = self.pending.take(reply.token) else {
            return;
        };
        let answer = match reply.outcome {
            Outcome::Answer(bytes) => match Answer::from_upstream_vec(bytes, &miss.key) {
                Ok(answer) => {
                    self.stats.bump(Counter::UpstreamAnswers);
                    Some(answer)
                }
                Err(_) => {
                    self.stats.bump(Counter::UpstreamBadAnswers);
                    None
                }
            },
            Outcome::Failed(Failure::Overloaded) => {
                // The control queue was full: answered now rather than waited for (STYLE §2).
                self.stats.bump(Counter::Overloaded);
                None
            }
            Outcome::Failed(_) => {
                self.stats.bump(Counter::UpstreamFailures);
                None
            }
        };
        let ttl_secs = answer
            .as_ref()
            .map_or(0, |answer| self.shard.reply_ttl(answer));
        let plugin = match answer {
            Some(_) => Plugin::Forward,
            None => Plugin::None,
        };
        for waiter in &miss.waiters {
            let Ok(query) = Query::parse(&waiter.query) else {
                continue;
            };
            let len = match &answer {
                Some(answer) => {
                    let limit = match waiter.origin {
                        Origin::Udp { .. } => query.udp_limit(self.settings.udp_payload),
                        Origin::Tcp { .. } => TCP_MESSAGE_MAX,
                    };
                    answer.write_reply(&query, ttl_secs, self.settings.udp_payload, limit, out)
                }
                None => dns::write_servfail(&query, self.settings.udp_payload, out),
            };
            let labels = labels(waiter.origin, usize::from(waiter.zone));
            let elapsed = now.saturating_duration_since(waiter.parked);
            if let Action::Reply { len } = self.answered(labels, len, out, plugin, elapsed) {
                send(waiter.origin, &out[..len]);
            }
        }
        if let Some(answer) = answer {
            let kind = match answer.kind() {
                Kind::Denial | Kind::ServFail => CacheType::Denial,
                Kind::Success | Kind::Other => CacheType::Success,
            };
            let before = self.shard.counts().evictions;
            self.shard.insert_owned(miss.key, answer, now);
            let evictions = self.shard.counts().evictions;
            // An insert evicts from the cache it goes into.
            self.stats
                .record_evictions(kind, evictions.saturating_sub(before));
            self.stats.set(Counter::Evictions, evictions);
            self.stats.set_cache_entries(self.shard.len());
        }
    }

    /// Answers SERVFAIL to clients whose miss passed its deadline without a reply.
    pub fn expire(&mut self, now: Instant, out: &mut [u8], send: &mut dyn FnMut(Origin, &[u8])) {
        for miss in self.pending.take_expired(now) {
            self.stats.add(Counter::UpstreamFailures, 1);
            for waiter in &miss.waiters {
                if let Ok(query) = Query::parse(&waiter.query) {
                    let len = dns::write_servfail(&query, self.settings.udp_payload, out);
                    let labels = labels(waiter.origin, usize::from(waiter.zone));
                    let elapsed = now.saturating_duration_since(waiter.parked);
                    if let Action::Reply { len } =
                        self.answered(labels, len, out, Plugin::None, elapsed)
                    {
                        send(waiter.origin, &out[..len]);
                    }
                }
            }
        }
    }

    /// Moves the requests of the misses started since the last call into `into` (which keeps
    /// its capacity across batches, as the outbox keeps its own).
    pub fn take_requests(&mut self, into: &mut Vec<Request>) {
        into.append(&mut self.outbox);
    }

    /// Whether misses started since the last [`Handler::take_requests`] wait in the outbox.
    pub fn has_requests(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Misses in flight.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Cached entries (success, denial).
    pub fn cache_len(&self) -> (usize, usize) {
        self.shard.len()
    }

    /// Starts the miss tokens of the `generation`-th start of this worker (0: the first)
    /// apart from every earlier start's, so a reply meant for a worker that died is ignored.
    pub fn set_generation(&mut self, generation: u32) {
        self.pending
            .start_tokens_at((u64::from(generation) << GENERATION_SHIFT) | 1);
    }

    /// Applies new settings (reload): cache limits change in place, entries are kept.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
        self.shard.set_limits(settings.limits);
    }

    /// Swaps in new counters (reload with a new metrics layout); zones are matched through
    /// their layout from now on. Misses already parked keep their old label indices.
    pub fn set_stats(&mut self, stats: Arc<WorkerStats>) {
        self.stats = stats;
        self.stats.set_cache_entries(self.shard.len());
    }

    /// Handles a UDP query longer than the receive buffer, of which only `prefix` was read:
    /// TC=1 with the question (the client asks again over TCP), or a drop when even the
    /// prefix is not a query. Counted as a UDP query and in [`Counter::TooLong`].
    pub fn handle_too_long(&mut self, prefix: &[u8], out: &mut [u8]) -> Action {
        self.stats.bump(Counter::UdpQueries);
        self.reject(prefix, Rejection::of_cut_query(prefix), out)
    }

    /// Turns a rejected query into an error reply or a drop.
    fn reject(&mut self, bytes: &[u8], rejection: Rejection, out: &mut [u8]) -> Action {
        let counter = match rejection {
            Rejection::TooShort => Counter::DropTooShort,
            Rejection::IsResponse => Counter::DropResponse,
            Rejection::FormErr => Counter::FormErr,
            Rejection::NotImp => Counter::NotImp,
            Rejection::BadVers => Counter::BadVers,
            Rejection::TooLong => Counter::TooLong,
        };
        self.stats.bump(counter);
        match dns::write_error(bytes, rejection, self.settings.udp_payload, out) {
            Some(len) => Action::Reply { len },
            None if rejection == Rejection::IsResponse => Action::Drop(DropReason::IsResponse),
            None => Action::Drop(DropReason::TooShort),
        }
    }

    /// SERVFAIL for a query we cannot forward right now.
    fn overloaded(&mut self, query: &Query<'_>, labels: Labels, out: &mut [u8]) -> Action {
        self.stats.bump(Counter::Overloaded);
        let len = dns::write_servfail(query, self.settings.udp_payload, out);
        self.answered(labels, len, out, Plugin::None, Duration::ZERO)
    }

    /// [`Handler::sent`], and a reply that will go out is counted as a response to `labels`.
    fn answered(
        &self,
        labels: Labels,
        len: usize,
        out: &[u8],
        plugin: Plugin,
        elapsed: Duration,
    ) -> Action {
        let action = self.sent(len, out);
        if let Action::Reply { len } = action {
            let rcode = out.get(3).map_or(0, |flags| flags & 0x0f);
            self.stats
                .record_response(labels, rcode, plugin, len, elapsed);
        }
        action
    }

    /// A reply of `len` bytes is ready in `out` (0 = it did not fit).
    fn sent(&self, len: usize, out: &[u8]) -> Action {
        if len == 0 {
            return Action::Drop(DropReason::NoRoom);
        }
        if out.get(2).is_some_and(|flags| flags & 0x02 != 0) {
            self.stats.bump(Counter::Truncated);
        }
        Action::Reply { len }
    }
}

/// Where a query from `origin` in zone `zone` is counted.
fn labels(origin: Origin, zone: usize) -> Labels {
    let (socket, proto) = match origin {
        Origin::Udp { socket, .. } => (socket, Proto::Udp),
        Origin::Tcp { socket, .. } => (socket, Proto::Tcp),
    };
    Labels {
        socket,
        zone: u16::try_from(zone).unwrap_or(u16::MAX),
        proto,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::tests::{answer, query};
    use std::net::SocketAddr;

    /// A handler for worker 0 with room for `misses` distinct misses in flight.
    fn handler(misses: usize) -> Handler {
        let settings = Settings {
            udp_payload: 1232,
            limits: Limits {
                success_capacity: 100,
                success_ttl: Duration::from_secs(30),
                denial_capacity: 100,
                denial_ttl: Duration::from_secs(5),
                servfail_ttl: Duration::ZERO,
            },
            miss_deadline: Duration::from_secs(3),
            max_misses: misses,
            max_waiters: 4,
        };
        let stats = Arc::new(WorkerStats::default());
        Handler::new(0, settings, stats)
    }

    /// The requests in the handler's outbox.
    fn requests(handler: &mut Handler) -> Vec<Request> {
        let mut taken = Vec::new();
        handler.take_requests(&mut taken);
        taken
    }

    /// The one request in the handler's outbox.
    fn one_request(handler: &mut Handler) -> Request {
        let mut taken = requests(handler);
        assert_eq!(taken.len(), 1, "exactly one request upstream");
        taken.pop().expect("one request")
    }

    /// A UDP origin with client port `port`.
    fn udp(port: u16) -> Origin {
        let peer: SocketAddr = ([127, 0, 0, 1], port).into();
        Origin::Udp { socket: 0, peer }
    }

    /// Delivers `reply` and collects what is sent to whom.
    fn deliver(handler: &mut Handler, reply: Reply, now: Instant) -> Vec<(Origin, Vec<u8>)> {
        let mut out = vec![0u8; TCP_MESSAGE_MAX];
        let mut sent = Vec::new();
        handler.handle_reply(reply, now, &mut out, &mut |origin, bytes| {
            sent.push((origin, bytes.to_vec()))
        });
        sent
    }

    #[test]
    fn miss_then_hit_from_cache() {
        let mut handler = handler(8);
        let now = Instant::now();
        let mut out = vec![0u8; 1232];
        let q = query("svc.cluster.local", 1, None);
        assert_eq!(
            handler.handle_query(&q, now, udp(1000), &mut out),
            Action::Parked
        );
        assert!(handler.has_requests());
        let request = one_request(&mut handler);
        assert_eq!(request.via, Via::Zone);
        let upstream = answer(&request.query, 0, &[30], None);
        let sent = deliver(
            &mut handler,
            Reply {
                token: request.token,
                outcome: Outcome::Answer(upstream),
            },
            now,
        );
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, udp(1000));
        assert_eq!(&sent[0].1[..2], &[0x12, 0x34], "client ID restored");
        let Action::Reply { len } = handler.handle_query(&q, now, udp(1001), &mut out) else {
            panic!("second query must be a cache hit");
        };
        assert_eq!(&out[..2], &[0x12, 0x34]);
        assert!(len > q.len());
        assert!(
            requests(&mut handler).is_empty(),
            "hit sends nothing upstream"
        );
    }

    #[test]
    fn identical_misses_send_one_request_and_answer_all() {
        let mut handler = handler(8);
        let now = Instant::now();
        let mut out = vec![0u8; 1232];
        let q = query("svc.cluster.local", 1, None);
        for port in 0..3 {
            assert_eq!(
                handler.handle_query(&q, now, udp(port), &mut out),
                Action::Parked
            );
        }
        let request = one_request(&mut handler);
        let sent = deliver(
            &mut handler,
            Reply {
                token: request.token,
                outcome: Outcome::Answer(answer(&request.query, 0, &[30], None)),
            },
            now,
        );
        assert_eq!(sent.len(), 3);
    }

    #[test]
    fn failure_answers_servfail_to_every_waiter() {
        let mut handler = handler(8);
        let now = Instant::now();
        let mut out = vec![0u8; 1232];
        let q = query("dead.test", 1, None);
        handler.handle_query(&q, now, udp(1), &mut out);
        handler.handle_query(&q, now, Origin::Tcp { socket: 0, conn: 7 }, &mut out);
        let request = one_request(&mut handler);
        let sent = deliver(
            &mut handler,
            Reply {
                token: request.token,
                outcome: Outcome::Failed(Failure::Timeout),
            },
            now,
        );
        assert_eq!(sent.len(), 2);
        for (_, bytes) in sent {
            assert_eq!(bytes[3] & 0x0f, 2, "SERVFAIL");
        }
        assert_eq!(handler.pending_len(), 0);
    }

    #[test]
    fn full_pending_table_answers_servfail_at_once() {
        let mut handler = handler(1);
        let now = Instant::now();
        let mut out = vec![0u8; 1232];
        let first = query("a.test", 1, None);
        assert_eq!(
            handler.handle_query(&first, now, udp(1), &mut out),
            Action::Parked
        );
        let second = query("b.test", 1, None);
        let Action::Reply { len } = handler.handle_query(&second, now, udp(2), &mut out) else {
            panic!("table full must answer SERVFAIL now");
        };
        assert!(len >= 12);
        assert_eq!(out[3] & 0x0f, 2);
        assert_eq!(handler.pending_len(), 1);
        assert_eq!(handler.stats.read(Counter::Overloaded), 1);
    }

    #[test]
    fn overloaded_request_answers_servfail_and_counts_it() {
        let mut handler = handler(8);
        let now = Instant::now();
        let mut out = vec![0u8; 1232];
        handler.handle_query(&query("a.test", 1, None), now, udp(1), &mut out);
        let request = one_request(&mut handler);
        let sent = deliver(
            &mut handler,
            Reply {
                token: request.token,
                outcome: Outcome::Failed(Failure::Overloaded),
            },
            now,
        );
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(handler.stats.read(Counter::Overloaded), 1);
        assert_eq!(handler.stats.read(Counter::UpstreamFailures), 0);
        assert_eq!(handler.pending_len(), 0);
    }

    #[test]
    fn expired_miss_is_answered_by_the_worker() {
        let mut handler = handler(8);
        let now = Instant::now();
        let mut out = vec![0u8; 1232];
        handler.handle_query(&query("slow.test", 1, None), now, udp(1), &mut out);
        let mut sent = Vec::new();
        handler.expire(
            now + Duration::from_secs(4),
            &mut out,
            &mut |origin, bytes| sent.push((origin, bytes[3] & 0x0f)),
        );
        assert_eq!(sent, vec![(udp(1), 2)]);
    }

    #[test]
    fn bad_input_is_dropped_or_answered() {
        let mut handler = handler(8);
        let now = Instant::now();
        let mut out = vec![0u8; 1232];
        assert_eq!(
            handler.handle_query(&[1, 2, 3], now, udp(1), &mut out),
            Action::Drop(DropReason::TooShort)
        );
        let mut response = query("a.test", 1, None);
        response[2] |= 0x80;
        assert_eq!(
            handler.handle_query(&response, now, udp(1), &mut out),
            Action::Drop(DropReason::IsResponse)
        );
        let mut two = query("a.test", 1, None);
        two[5] = 2;
        assert!(matches!(
            handler.handle_query(&two, now, udp(1), &mut out),
            Action::Reply { .. }
        ));
        assert_eq!(out[3] & 0x0f, 1, "FORMERR");
        assert!(requests(&mut handler).is_empty());
    }

    #[test]
    fn wrong_answer_is_servfail_and_not_cached() {
        let mut handler = handler(8);
        let now = Instant::now();
        let mut out = vec![0u8; 1232];
        let q = query("right.test", 1, None);
        handler.handle_query(&q, now, udp(1), &mut out);
        let request = one_request(&mut handler);
        let wrong = answer(&query("wrong.test", 1, None), 0, &[30], None);
        let sent = deliver(
            &mut handler,
            Reply {
                token: request.token,
                outcome: Outcome::Answer(wrong),
            },
            now,
        );
        assert_eq!(sent[0].1[3] & 0x0f, 2);
        assert_eq!(handler.cache_len(), (0, 0));
    }

    /// A handler whose stats know the zones `cluster.local.` and `.` on two listen addresses.
    fn zoned_handler() -> Handler {
        use super::super::stats::{Layout, Zones};
        let plain = handler(8);
        let servers: [SocketAddr; 2] = [([127, 0, 0, 1], 53).into(), ([0u16; 8], 53).into()];
        let layout = Layout::new(&servers, Zones::new(["cluster.local."]));
        let stats = Arc::new(WorkerStats::new(Arc::new(layout), Instant::now()));
        let Handler {
            worker, settings, ..
        } = plain;
        Handler::new(worker, settings, stats)
    }

    #[test]
    fn queries_and_responses_are_counted_by_zone_plugin_and_duration() {
        use super::super::stats::{duration_bucket, qtype_slot};
        let mut handler = zoned_handler();
        let now = Instant::now();
        let mut out = vec![0u8; 1232];
        let q = query("Svc.Cluster.Local", 1, Some((1232, 0, true)));
        let tcp = Origin::Tcp { socket: 1, conn: 3 };
        assert_eq!(handler.handle_query(&q, now, tcp, &mut out), Action::Parked);
        let request = one_request(&mut handler);
        let later = now + Duration::from_millis(3);
        deliver(
            &mut handler,
            Reply {
                token: request.token,
                outcome: Outcome::Answer(answer(&request.query, 0, &[30], None)),
            },
            later,
        );
        assert!(matches!(
            handler.handle_query(&q, later, udp(5), &mut out),
            Action::Reply { .. }
        ));
        let stats = Arc::clone(&handler.stats);
        let tcp_labels = Labels {
            socket: 1,
            zone: 0,
            proto: Proto::Tcp,
        };
        let udp_labels = Labels {
            socket: 0,
            zone: 0,
            proto: Proto::Udp,
        };
        assert_eq!(stats.requests(tcp_labels, qtype_slot(1)), 1);
        assert_eq!(stats.requests(udp_labels, qtype_slot(1)), 1);
        assert_eq!(stats.do_requests(1, 0), 1);
        assert_eq!(stats.responses(1, 0, 0, Plugin::Forward), 1);
        assert_eq!(stats.responses(0, 0, 0, Plugin::Cache), 1);
        assert_eq!(stats.cache_misses(1, 0), 1);
        assert_eq!(stats.cache_hits(0, 0, CacheType::Success), 1);
        let miss = stats.durations(1, 0);
        assert_eq!(miss.buckets[duration_bucket(3_000_000)], 1, "park to reply");
        assert_eq!(miss.sum, 3_000_000);
        let hit = stats.durations(0, 0);
        assert_eq!(
            (hit.buckets[0], hit.sum),
            (1, 0),
            "a hit takes the batch's clock"
        );
        assert_eq!(stats.cache_entries(CacheType::Success), 1);
    }

    #[test]
    fn id_server_is_answered_locally_and_counted_under_the_root() {
        let mut handler = zoned_handler();
        let mut out = vec![0u8; 1232];
        let mut q = query("ID.server", 16, None);
        let class = q.len() - 2;
        q[class..].copy_from_slice(&3u16.to_be_bytes());
        let Action::Reply { len } = handler.handle_query(&q, Instant::now(), udp(1), &mut out)
        else {
            panic!("id.server. CH TXT is answered at once");
        };
        assert!(requests(&mut handler).is_empty(), "nothing goes upstream");
        assert_eq!(out[3] & 0x0f, 0, "NOERROR");
        assert_eq!(&out[6..8], &[0, 1], "one answer");
        assert!(out[..len].ends_with(b"\x07ringdns"));
        assert_eq!(handler.cache_len(), (0, 0), "not cached");
        let root = Labels {
            socket: 0,
            zone: 1,
            proto: Proto::Udp,
        };
        assert_eq!(handler.stats.requests(root, 6), 1, "type TXT, zone .");
        assert_eq!(handler.stats.responses(0, 1, 0, Plugin::Chaos), 1);
        assert_eq!(handler.stats.read(Counter::IdServer), 1);
    }
}
