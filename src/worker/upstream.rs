//! Misses forwarded over UDP by the worker itself, from its own ring: zone routing, upstream
//! sockets, query IDs, failover within the zone's budget and answer checks. A UDP miss then
//! never leaves the worker's core: no hand-off to `ringdns-ctl` and back.
//!
//! Runs on: worker threads (io_uring backend). Does no I/O and reads no clock: sockets are
//! opened, written and closed through [`UpstreamIo`] (the ring implements it), datagrams and
//! receive errors come in from the ring's completions, and `now` comes from the ring loop.
//!
//! Zones with `transport = "udp"` are forwarded here. `tcp` and `prefer_udp` zones go to the
//! control side as before, and so does a UDP answer with TC=1 or longer than our payload
//! (RFC 7766 §5): it is retried over the control side's pooled TCP connections to the same
//! upstream ([`Via::Tcp`]) with what is left of the budget.
//!
//! The policy is the control side's (`upstream::forward`): the zone's timeout is the total
//! budget; upstreams are tried in turn starting at the last one that answered, each with a slice
//! of the budget; one that refuses (ICMP port unreachable) hands over at once; an earlier
//! attempt keeps listening after its slice, so a late answer still counts. Spoofing resistance
//! as there (RFC 5452 §4, §9.2): a random ID per query, sockets connected to the upstream on
//! kernel-chosen random ports, picked at random among `SOCKETS_PER_UPSTREAM` (8) and replaced
//! after `QUERIES_PER_SOCKET` (10,000) queries, and an answer must carry an in-flight ID *and* the
//! query's question.
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{ForwardZone, Transport};
use crate::upstream::route::{self, Router};
use crate::upstream::{
    slice_for, upstream_addrs, Echoes, Error, Failure, Health, Order, Outcome, Reply, Request,
    Retransmit, Rotation, UpstreamMetrics, Via, MAX_CONSECUTIVE_ERRORS, QUERIES_PER_SOCKET,
    SOCKETS_PER_UPSTREAM,
};

/// Random IDs tried on a socket before the attempt fails (as the control side's tables).
const ID_TRIES: usize = 64;

/// A worker logs an upstream going down at most this often per upstream (STYLE §5: a worker
/// never floods the log; it logs it up again only after a logged down); the metrics count every
/// failure.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// After a query could not be sent for want of a send slot while an earlier attempt still
/// listens, the next upstream is tried again this much later.
const LOCAL_RETRY: Duration = Duration::from_millis(1);

/// One worker's forwarding configuration, built by the control side.
///
/// # Threads
///
/// Built on the control thread (start-up or reload) and moved to the worker. Its metrics are
/// written only by that worker (`Relaxed`) and read by `ringdns-http` at scrape time.
#[derive(Debug)]
pub struct ForwardSetup {
    /// The `[[forward]]` zones.
    pub zones: Vec<ForwardZone>,
    /// `server.udp_payload`: advertised upstream; a longer answer is retried over TCP.
    pub udp_payload: u16,
    /// This worker's series for each upstream address, in [`upstream_addrs`] order.
    pub metrics: Vec<Arc<UpstreamMetrics>>,
}

impl ForwardSetup {
    /// A setup for `zones` with fresh (zeroed) series.
    pub fn new(zones: Vec<ForwardZone>, udp_payload: u16) -> ForwardSetup {
        let metrics = upstream_addrs(&zones)
            .into_iter()
            .map(|addr| Arc::new(UpstreamMetrics::new(addr)))
            .collect();
        ForwardSetup {
            zones,
            udp_payload,
            metrics,
        }
    }

    /// A setup for `zones` that counts on in `metrics` (a worker restarted in place, so its
    /// series go on rather than restart); fresh series if they do not match the zones'
    /// upstreams.
    pub fn continuing(
        zones: Vec<ForwardZone>,
        udp_payload: u16,
        metrics: Vec<Arc<UpstreamMetrics>>,
    ) -> ForwardSetup {
        let addrs = upstream_addrs(&zones);
        let matches = addrs.len() == metrics.len()
            && addrs
                .iter()
                .zip(&metrics)
                .all(|(addr, series)| *addr == series.addr());
        if !matches {
            return ForwardSetup::new(zones, udp_payload);
        }
        ForwardSetup {
            zones,
            udp_payload,
            metrics,
        }
    }
}

/// The socket operations the exchanges need; the ring implements them on io_uring.
pub trait UpstreamIo {
    /// Opens a UDP socket connected to `addr` from a random local port and starts receiving
    /// on it; returns its index (datagrams and errors are reported under it).
    fn open(&mut self, addr: SocketAddr) -> io::Result<u32>;
    /// Queues `query` with its ID replaced by `id` on socket `socket`; `false` if it could not
    /// be queued.
    fn send(&mut self, socket: u32, query: &[u8], id: u16) -> bool;
    /// Stops receiving on socket `socket` and closes it.
    fn close(&mut self, socket: u32);
}

/// A finished exchange.
#[derive(Debug)]
pub enum Done {
    /// Answer (or fail) the parked clients.
    Reply(Reply),
    /// Hand over to the control side (TCP after a truncated answer).
    Control(Request),
}

/// The worker's UDP exchanges with its upstreams.
#[derive(Debug)]
pub struct Exchanges {
    /// This worker's index (for requests handed to the control side and for log lines).
    worker: usize,
    /// `" worker=N"`, appended to log lines.
    by: String,
    /// The configuration new requests use.
    plan: Rc<Plan>,
    /// Exchanges in flight, by the worker's pending-miss token.
    exchanges: HashMap<u64, Exchange, ahash::RandomState>,
    /// Open upstream sockets, by the ring's index.
    sockets: HashMap<u32, Socket, ahash::RandomState>,
    /// When an exchange's slice or budget ends (stale entries are skipped when popped).
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Sockets whose receive or send reported an error (errno) since the last
    /// [`Exchanges::run`].
    errored: Vec<(u32, i32)>,
    /// Retired sockets that may have become idle (closed by [`Exchanges::run`]).
    closing: Vec<u32>,
    /// Finished exchanges, until the caller takes them.
    done: Vec<Done>,
    /// Queries a socket carries before it is replaced ([`QUERIES_PER_SOCKET`]).
    rotate_after: u64,
}

/// One configuration's zones and upstreams. Exchanges hold the plan they started with, so a
/// reload does not disturb them.
#[derive(Debug)]
struct Plan {
    /// Distinguishes a plan's sockets from a later plan's.
    generation: u64,
    /// Zone routing.
    router: Router,
    /// Zones, in the router's order.
    zones: Vec<ZonePlan>,
    /// Upstream addresses, in [`upstream_addrs`] order.
    upstreams: Vec<UpstreamPlan>,
    /// Answers longer than this are treated as truncated (our advertised payload, at least
    /// the classic 512 octets of RFC 1035 §4.2.1).
    payload_limit: usize,
}

/// One forward zone.
#[derive(Debug)]
struct ZonePlan {
    /// The zone name, for logs.
    name: String,
    /// Its upstreams, as indices into [`Plan::upstreams`], in config order.
    members: Vec<usize>,
    /// Forwarded here (`transport = "udp"`); else by the control side.
    local: bool,
    /// Total budget per request.
    timeout: Duration,
    /// Each upstream's slice of the budget.
    slice: Duration,
    /// Which member to try first.
    rotation: Rotation,
}

/// One upstream address.
#[derive(Debug)]
struct UpstreamPlan {
    /// Its index in [`Plan::upstreams`].
    index: usize,
    /// The server.
    addr: SocketAddr,
    /// This worker's series for it.
    metrics: Arc<UpstreamMetrics>,
    /// Its live sockets (by the ring's index); an empty or retired slot is refilled when picked.
    sockets: RefCell<[Option<u32>; SOCKETS_PER_UPSTREAM]>,
    /// Up or down.
    health: Health,
    /// When this worker last logged it going down.
    logged: Cell<Option<Instant>>,
    /// Whether its last logged change was down (so its recovery is logged).
    logged_down: Cell<bool>,
    /// When to send an unanswered query to it again.
    retransmit: Retransmit,
}

/// One open upstream socket.
#[derive(Debug)]
struct Socket {
    /// The plan whose upstream it belongs to.
    generation: u64,
    /// That upstream (index into [`Plan::upstreams`]): a slot names a socket by the ring's
    /// index, which the ring reuses once a socket closes, so the owner is checked.
    upstream: usize,
    /// That upstream's series (ignored datagrams are counted there).
    metrics: Arc<UpstreamMetrics>,
    /// IDs of ended queries that went out more than once (answers to them are echoes).
    echoes: Echoes,
    /// Queries in flight on it: DNS ID → exchange token.
    inflight: HashMap<u16, u64, ahash::RandomState>,
    /// Queries sent on it.
    sent: u64,
    /// No longer picked; closed once nothing is in flight.
    retired: bool,
    /// Receive errors since the last accepted answer.
    errors: u32,
}

/// One request being forwarded.
#[derive(Debug)]
struct Exchange {
    /// The plan it started with.
    plan: Rc<Plan>,
    /// Its zone.
    zone: usize,
    /// The query (ID 0; each attempt sends it with its own ID).
    query: Vec<u8>,
    /// The zone members not tried yet, in order.
    order: Order,
    /// The member whose slice is running (none after the last slice ran out).
    current: Option<usize>,
    /// Attempts still listening.
    attempts: Attempts,
    /// When the current slice ends.
    slice_end: Instant,
    /// When the budget is spent.
    deadline: Instant,
}

/// One query sent to one upstream.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    /// The zone member (index into [`ZonePlan::members`]).
    member: usize,
    /// The socket it went out on.
    socket: u32,
    /// Its DNS ID.
    id: u16,
    /// When it was sent.
    started: Instant,
    /// When it is sent again if still unanswered (while its slice runs).
    retransmit_at: Instant,
    /// How long after that the next copy goes (doubling).
    backoff: Duration,
    /// Whether a copy went again (its answer time then says nothing: Karn's rule).
    resent: bool,
    /// The retransmission timeout it was sent with.
    timeout: Duration,
}

/// An exchange's attempts, in no particular order: the first inline, as most exchanges need
/// only one, so starting an exchange allocates no list.
#[derive(Debug, Default)]
struct Attempts {
    /// Some whenever `rest` is not empty.
    first: Option<Attempt>,
    rest: Vec<Attempt>,
}

impl Attempts {
    fn push(&mut self, attempt: Attempt) {
        match self.first {
            None => self.first = Some(attempt),
            Some(_) => self.rest.push(attempt),
        }
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn iter(&self) -> impl Iterator<Item = &Attempt> {
        self.first.iter().chain(&self.rest)
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Attempt> {
        self.first.iter_mut().chain(&mut self.rest)
    }

    /// Removes and returns an attempt matching `matches`.
    fn take(&mut self, matches: impl Fn(&Attempt) -> bool) -> Option<Attempt> {
        if self.first.as_ref().is_some_and(&matches) {
            let taken = self.first.take();
            self.first = self.rest.pop();
            return taken;
        }
        let position = self.rest.iter().position(matches)?;
        Some(self.rest.swap_remove(position))
    }
}

impl Exchanges {
    /// Exchanges for worker `worker` under `setup`.
    pub fn new(worker: usize, setup: ForwardSetup) -> Exchanges {
        Exchanges {
            worker,
            by: format!(" worker={worker}"),
            plan: Rc::new(Plan::new(setup, 0)),
            exchanges: HashMap::default(),
            sockets: HashMap::default(),
            timers: BinaryHeap::new(),
            errored: Vec::new(),
            closing: Vec::new(),
            done: Vec::new(),
            rotate_after: QUERIES_PER_SOCKET,
        }
    }

    /// Swaps in a reloaded configuration: new requests use it; exchanges in flight finish on
    /// the old one, whose sockets close once idle.
    pub fn reconfigure(&mut self, setup: ForwardSetup) {
        let generation = self.plan.generation + 1;
        self.plan = Rc::new(Plan::new(setup, generation));
        for (&index, socket) in &mut self.sockets {
            if socket.generation != generation {
                socket.retired = true;
                self.closing.push(index);
            }
        }
    }

    /// Starts forwarding `request` if its zone is forwarded over UDP here; otherwise gives it
    /// back for the control side. Sends go out through `io`.
    pub fn start(
        &mut self,
        request: Request,
        now: Instant,
        io: &mut dyn UpstreamIo,
    ) -> Option<Request> {
        if request.via != Via::Zone {
            return Some(request);
        }
        let Some(name) = route::question_name(&request.query) else {
            return Some(request);
        };
        let plan = Rc::clone(&self.plan);
        let Some(zone_index) = plan.router.route(name) else {
            return Some(request);
        };
        let Some(zone) = plan.zones.get(zone_index).filter(|zone| zone.local) else {
            return Some(request);
        };
        let deadline = now + zone.timeout;
        let exchange = Exchange {
            order: zone.rotation.order(zone.members.len()),
            plan: Rc::clone(&plan),
            zone: zone_index,
            query: request.query,
            current: None,
            attempts: Attempts::default(),
            slice_end: deadline,
            deadline,
        };
        self.exchanges.insert(request.token, exchange);
        self.launch_next(request.token, now, io);
        None
    }

    /// A datagram arrived on upstream socket `socket`; `cut` if our receive buffer cut it.
    /// An accepted answer finishes its exchange; anything else is counted and ignored while
    /// the exchange keeps waiting.
    pub fn receive(&mut self, socket: u32, datagram: &[u8], cut: bool, now: Instant) {
        let Some((token, id)) = self.accepts(socket, datagram) else {
            self.ignore(socket, datagram, now);
            return;
        };
        let Some(exchange) = self.exchanges.remove(&token) else {
            return;
        };
        if let Some(state) = self.sockets.get_mut(&socket) {
            state.errors = 0;
        }
        let attempt = exchange
            .attempts
            .iter()
            .find(|attempt| attempt.socket == socket && attempt.id == id)
            .copied();
        self.release(&exchange, now);
        let plan = Rc::clone(&exchange.plan);
        let member = attempt.and_then(|attempt| {
            let (zone, upstream) = plan.member(exchange.zone, attempt.member)?;
            Some((attempt, zone, upstream))
        });
        let Some((attempt, zone, upstream)) = member else {
            // Cannot happen (`accepts` found the attempt); never leave the clients waiting.
            self.finish(token, Failure::Timeout, now);
            return;
        };
        let truncated = cut || route::is_truncated(datagram) || datagram.len() > plan.payload_limit;
        if truncated {
            self.done.push(Done::Control(Request {
                worker: self.worker,
                token,
                query: exchange.query,
                via: Via::Tcp {
                    addr: upstream.addr,
                    budget: exchange.deadline.saturating_duration_since(now),
                },
            }));
            return;
        }
        let rcode = datagram.get(3).map_or(0, |flags| flags & 0x0f);
        let elapsed = now.saturating_duration_since(attempt.started);
        upstream.metrics.observe(rcode, elapsed);
        if !attempt.resent {
            upstream.retransmit.observe(elapsed);
        }
        zone.rotation.succeeded(attempt.member);
        if upstream.health.succeeded() && upstream.logged_down.replace(false) {
            log::info!("upstream up addr={}{}", upstream.addr, self.by);
        }
        let mut answer = datagram.to_vec();
        route::set_id(&mut answer, 0);
        self.done.push(Done::Reply(Reply {
            token,
            outcome: Outcome::Answer(answer),
        }));
    }

    /// The receive or a send on upstream socket `socket` failed with `errno` (typically an
    /// ICMP report such as port unreachable, which the kernel hands to whichever call comes
    /// first; it concerns the one upstream every query on the socket went to). Handled by the
    /// next [`Exchanges::run`].
    pub fn socket_error(&mut self, socket: u32, errno: i32) {
        // A report for a socket already closed here (a send cancelled with it, say) must not
        // reach a later socket that reuses the index.
        if self.sockets.contains_key(&socket) {
            self.errored.push((socket, errno));
        }
    }

    /// Fails over the exchanges hit by receive errors, ends slices and budgets that ran out
    /// by `now`, and closes idle retired sockets.
    pub fn run(&mut self, now: Instant, io: &mut dyn UpstreamIo) {
        for (socket, errno) in std::mem::take(&mut self.errored) {
            self.socket_failed(socket, errno, now, io);
        }
        while let Some(&Reverse((at, token))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            self.timer(token, now, io);
        }
        for index in std::mem::take(&mut self.closing) {
            let idle = self
                .sockets
                .get(&index)
                .is_some_and(|socket| socket.retired && socket.inflight.is_empty());
            if idle {
                self.sockets.remove(&index);
                io.close(index);
            }
        }
    }

    /// Moves the finished exchanges into `into`.
    pub fn take_done(&mut self, into: &mut Vec<Done>) {
        into.append(&mut self.done);
    }

    /// Whether finished exchanges wait to be taken, or errors or closes to be handled.
    pub fn has_work(&self) -> bool {
        !self.done.is_empty() || !self.errored.is_empty() || !self.closing.is_empty()
    }

    /// When [`Exchanges::run`] next has a slice or budget to end. Entries of exchanges that
    /// already finished are dropped here, so an idle worker's timer does not fire for them.
    pub fn next_timer(&mut self) -> Option<Instant> {
        if self.exchanges.is_empty() {
            self.timers.clear();
        }
        while let Some(&Reverse((at, token))) = self.timers.peek() {
            if self.exchanges.contains_key(&token) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    /// Exchanges in flight.
    pub fn len(&self) -> usize {
        self.exchanges.len()
    }

    /// Whether no exchange is in flight.
    pub fn is_empty(&self) -> bool {
        self.exchanges.is_empty()
    }

    /// Open upstream sockets.
    pub fn sockets(&self) -> usize {
        self.sockets.len()
    }

    /// Counts a datagram on `socket` that answers nothing in flight under its upstream,
    /// unless it is the answer to the other copy of a query that went out twice (an echo).
    fn ignore(&mut self, socket: u32, datagram: &[u8], now: Instant) {
        let Some(socket) = self.sockets.get_mut(&socket) else {
            return;
        };
        let echo = route::message_id(datagram).is_some_and(|id| socket.echoes.is_echo(id, now));
        if !echo {
            socket.metrics.record_ignored();
        }
    }

    /// The token of the exchange `datagram` answers on `socket`, and its ID: a response whose
    /// ID is in flight there and whose question matches.
    fn accepts(&self, socket: u32, datagram: &[u8]) -> Option<(u64, u16)> {
        let id = route::message_id(datagram)?;
        let token = *self.sockets.get(&socket)?.inflight.get(&id)?;
        let exchange = self.exchanges.get(&token)?;
        (route::is_response(datagram) && route::same_question(datagram, &exchange.query))
            .then_some((token, id))
    }

    /// Starts the next member's attempt of exchange `token`, skipping members whose attempt
    /// fails outright; fails the exchange when nothing is left listening and no member is left
    /// (or, when this worker has no send slot or queue space left, at once: `Overloaded`).
    fn launch_next(&mut self, token: u64, now: Instant, io: &mut dyn UpstreamIo) {
        let current = self.plan.generation;
        let Self {
            exchanges,
            sockets,
            closing,
            timers,
            by,
            rotate_after,
            ..
        } = self;
        let Some(exchange) = exchanges.get_mut(&token) else {
            return;
        };
        exchange.current = None;
        exchange.slice_end = exchange.deadline;
        let mut overloaded = false;
        for member in exchange.order.by_ref() {
            let plan = Rc::clone(&exchange.plan);
            let Some((zone, upstream)) = plan.member(exchange.zone, member) else {
                continue;
            };
            let target = Target {
                upstream,
                generation: plan.generation,
                current,
                rotate_after: *rotate_after,
            };
            match send_attempt(sockets, closing, &target, &exchange.query, token, io) {
                Ok((socket, id)) => {
                    let timeout = upstream.retransmit.timeout();
                    let retransmit_at = now + timeout;
                    exchange.attempts.push(Attempt {
                        member,
                        socket,
                        id,
                        started: now,
                        retransmit_at,
                        backoff: timeout.saturating_mul(2),
                        resent: false,
                        timeout,
                    });
                    exchange.current = Some(member);
                    exchange.slice_end = (now + zone.slice).min(exchange.deadline);
                    if retransmit_at < exchange.slice_end {
                        timers.push(Reverse((retransmit_at, token)));
                    }
                    break;
                }
                Err(AttemptError::Upstream(error)) => {
                    fail_member(zone, member, upstream, &error, by, now);
                }
                Err(AttemptError::Local) => {
                    // Not the upstream's fault: charge nothing to it. With an earlier attempt
                    // still listening, this member is tried again shortly.
                    exchange.order.give_back();
                    exchange.slice_end = (now + LOCAL_RETRY).min(exchange.deadline);
                    overloaded = true;
                    break;
                }
            }
        }
        let next = (!exchange.attempts.is_empty()).then_some(exchange.slice_end);
        match next {
            Some(at) => timers.push(Reverse((at, token))),
            None if overloaded => self.finish(token, Failure::Overloaded, now),
            None => self.finish(token, Failure::Timeout, now),
        }
    }

    /// A retransmission, slice or budget of exchange `token` may be due at `now`.
    fn timer(&mut self, token: u64, now: Instant, io: &mut dyn UpstreamIo) {
        let Some(exchange) = self.exchanges.get_mut(&token) else {
            return;
        };
        // The running attempt, unanswered, goes again (same socket and ID, so an answer to
        // either copy counts) until its slice ends; a lost datagram then costs the
        // retransmission timeout (250 ms for a fast upstream), not the slice.
        let plan = Rc::clone(&exchange.plan);
        for attempt in exchange.attempts.iter_mut() {
            let due = Some(attempt.member) == exchange.current
                && attempt.retransmit_at <= now
                && now < exchange.slice_end;
            if !due {
                continue;
            }
            // A copy that finds no send slot is skipped; the next may go.
            if io.send(attempt.socket, &exchange.query, attempt.id) && !attempt.resent {
                attempt.resent = true;
                if let Some((_, upstream)) = plan.member(exchange.zone, attempt.member) {
                    upstream.retransmit.backed_off(attempt.timeout);
                }
            }
            attempt.retransmit_at = now + attempt.backoff;
            attempt.backoff = attempt.backoff.saturating_mul(2);
            if attempt.retransmit_at < exchange.slice_end {
                self.timers.push(Reverse((attempt.retransmit_at, token)));
            }
        }
        if now < exchange.slice_end && now < exchange.deadline {
            return; // A retransmission, or a stale entry of a rescheduled exchange.
        }
        if let Some(member) = exchange.current.take() {
            if exchange
                .attempts
                .iter()
                .any(|attempt| attempt.member == member)
            {
                let plan = Rc::clone(&exchange.plan);
                if let Some((zone, upstream)) = plan.member(exchange.zone, member) {
                    let error = Error::Timeout {
                        addr: upstream.addr,
                        after: zone.slice,
                    };
                    fail_member(zone, member, upstream, &error, &self.by, now);
                }
            }
        }
        if now >= exchange.deadline {
            self.finish(token, Failure::Timeout, now);
            return;
        }
        self.launch_next(token, now, io);
    }

    /// Socket `index` reported `errno`: every attempt on it failed.
    fn socket_failed(&mut self, index: u32, errno: i32, now: Instant, io: &mut dyn UpstreamIo) {
        let Some(socket) = self.sockets.get_mut(&index) else {
            return;
        };
        socket.errors += 1;
        if socket.errors >= MAX_CONSECUTIVE_ERRORS {
            socket.retired = true;
        }
        let failed: Vec<(u16, u64)> = socket.inflight.drain().collect();
        if socket.retired {
            self.closing.push(index);
        }
        for (id, token) in failed {
            let Some(exchange) = self.exchanges.get_mut(&token) else {
                continue;
            };
            let Some(attempt) = exchange
                .attempts
                .take(|attempt| attempt.socket == index && attempt.id == id)
            else {
                continue;
            };
            let plan = Rc::clone(&exchange.plan);
            if let Some((zone, upstream)) = plan.member(exchange.zone, attempt.member) {
                let error = Error::Io {
                    addr: upstream.addr,
                    source: io::Error::from_raw_os_error(errno),
                };
                fail_member(zone, attempt.member, upstream, &error, &self.by, now);
            }
            if exchange.current == Some(attempt.member) {
                self.launch_next(token, now, io);
            } else if exchange.attempts.is_empty() && exchange.current.is_none() {
                self.finish(token, Failure::Timeout, now);
            }
        }
    }

    /// Ends exchange `token` without an answer.
    fn finish(&mut self, token: u64, failure: Failure, now: Instant) {
        if let Some(exchange) = self.exchanges.remove(&token) {
            self.release(&exchange, now);
        }
        self.done.push(Done::Reply(Reply {
            token,
            outcome: Outcome::Failed(failure),
        }));
    }

    /// Frees the IDs of `exchange`'s attempts (remembering those sent more than once as echoes);
    /// a retired socket left idle is queued to close.
    fn release(&mut self, exchange: &Exchange, now: Instant) {
        for attempt in exchange.attempts.iter() {
            let Some(socket) = self.sockets.get_mut(&attempt.socket) else {
                continue;
            };
            socket.inflight.remove(&attempt.id);
            if attempt.resent {
                socket.echoes.remember(attempt.id, now);
            }
            if socket.retired && socket.inflight.is_empty() {
                self.closing.push(attempt.socket);
            }
        }
    }
}

impl Plan {
    /// The plan for `setup`.
    fn new(setup: ForwardSetup, generation: u64) -> Plan {
        let ForwardSetup {
            zones,
            udp_payload,
            metrics,
        } = setup;
        let addrs = upstream_addrs(&zones);
        let upstreams = addrs
            .iter()
            .enumerate()
            .map(|(index, &addr)| UpstreamPlan {
                index,
                addr,
                metrics: metrics
                    .get(index)
                    .filter(|metrics| metrics.addr() == addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(UpstreamMetrics::new(addr))),
                sockets: RefCell::new([None; SOCKETS_PER_UPSTREAM]),
                health: Health::default(),
                logged: Cell::new(None),
                logged_down: Cell::new(false),
                retransmit: Retransmit::default(),
            })
            .collect();
        let router = Router::new(zones.iter().map(|zone| zone.zone.as_str()));
        let zones = zones
            .into_iter()
            .map(|zone| ZonePlan {
                members: zone
                    .upstreams
                    .iter()
                    .filter_map(|addr| addrs.iter().position(|known| known == addr))
                    .collect(),
                local: zone.transport == Transport::Udp,
                slice: slice_for(zone.timeout, zone.upstreams.len()),
                timeout: zone.timeout,
                rotation: Rotation::default(),
                name: zone.zone,
            })
            .collect();
        Plan {
            generation,
            router,
            zones,
            upstreams,
            payload_limit: usize::from(udp_payload).max(512),
        }
    }

    /// Zone `zone` and its member `member`'s upstream.
    fn member(&self, zone: usize, member: usize) -> Option<(&ZonePlan, &UpstreamPlan)> {
        let zone = self.zones.get(zone)?;
        let upstream = self.upstreams.get(*zone.members.get(member)?)?;
        Some((zone, upstream))
    }
}

impl UpstreamPlan {
    /// Whether this worker may log this upstream going down at `now` (at most once per
    /// [`LOG_INTERVAL`]); if so, the log is taken to happen now.
    fn may_log(&self, now: Instant) -> bool {
        let due = self
            .logged
            .get()
            .is_none_or(|last| now.saturating_duration_since(last) >= LOG_INTERVAL);
        if due {
            self.logged.set(Some(now));
        }
        due
    }
}

/// Member `member` of `zone` (upstream `upstream`) failed an attempt with `error`: the next
/// request starts at the following member, the failure is counted, and a change to down is
/// logged (rate-limited). `by` names the worker in the log line.
fn fail_member(
    zone: &ZonePlan,
    member: usize,
    upstream: &UpstreamPlan,
    error: &Error,
    by: &str,
    now: Instant,
) {
    zone.rotation.failed(member, zone.members.len());
    upstream.metrics.record_failure();
    if let Some(failures) = upstream.health.failed() {
        if upstream.may_log(now) {
            upstream.logged_down.set(true);
            log::info!(
                "upstream down addr={} zone={}{by} failures={failures} last_error=\"{error}\"",
                upstream.addr,
                zone.name
            );
        }
    }
}

/// Why an attempt could not be sent.
#[derive(Debug)]
enum AttemptError {
    /// Because of the upstream (no socket to it, no free ID on the socket): counted against
    /// it, and the next member is tried.
    Upstream(Error),
    /// Because this worker has no send slot or submission queue space left.
    Local,
}

/// Where one attempt goes: an upstream of a plan, and whether that plan is still current.
struct Target<'a> {
    /// The upstream.
    upstream: &'a UpstreamPlan,
    /// Its plan's generation.
    generation: u64,
    /// The current plan's generation.
    current: u64,
    /// Queries a socket carries before it is replaced.
    rotate_after: u64,
}

/// Sends `query` for exchange `token` to the target upstream on one of its sockets, picked at
/// random (opened if the slot is empty, or its socket is retired or, its index having been
/// reused, no longer this upstream's), under a random ID not in flight there. A socket opened
/// for a plan that a reload replaced starts retired (it closes once idle; if nothing could be
/// sent on it, it is queued on `closing` at once). Returns the socket and the ID.
fn send_attempt(
    sockets: &mut HashMap<u32, Socket, ahash::RandomState>,
    closing: &mut Vec<u32>,
    target: &Target<'_>,
    query: &[u8],
    token: u64,
    io: &mut dyn UpstreamIo,
) -> Result<(u32, u16), AttemptError> {
    let upstream = target.upstream;
    let addr = upstream.addr;
    let pick = rand::random_range(0..SOCKETS_PER_UPSTREAM);
    let live = upstream.sockets.borrow()[pick].filter(|index| {
        sockets.get(index).is_some_and(|socket| {
            !socket.retired
                && socket.generation == target.generation
                && socket.upstream == upstream.index
        })
    });
    let index = match live {
        Some(index) => index,
        None => {
            let index = io
                .open(addr)
                .map_err(|source| AttemptError::Upstream(Error::Io { addr, source }))?;
            sockets.insert(
                index,
                Socket {
                    generation: target.generation,
                    upstream: upstream.index,
                    metrics: Arc::clone(&upstream.metrics),
                    echoes: Echoes::default(),
                    inflight: HashMap::default(),
                    sent: 0,
                    retired: target.generation != target.current,
                    errors: 0,
                },
            );
            upstream.sockets.borrow_mut()[pick] = Some(index);
            index
        }
    };
    let socket = sockets
        .get_mut(&index)
        .expect("the socket was found or inserted just above");
    let id = (0..ID_TRIES)
        .map(|_| rand::random::<u16>())
        .find(|id| !socket.inflight.contains_key(id));
    let Some(id) = id.filter(|&id| io.send(index, query, id)) else {
        if socket.retired && socket.inflight.is_empty() {
            closing.push(index);
        }
        return Err(match id {
            None => AttemptError::Upstream(Error::IdsExhausted { addr }),
            Some(_) => AttemptError::Local,
        });
    };
    socket.inflight.insert(id, token);
    socket.sent += 1;
    if socket.sent >= target.rotate_after {
        socket.retired = true;
        upstream.sockets.borrow_mut()[pick] = None;
    }
    Ok((index, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::testutil::{answer, query};

    /// What the exchanges did to the sockets.
    #[derive(Debug, Default)]
    struct FakeIo {
        /// Index → the upstream it is connected to; `None` once closed.
        open: Vec<Option<SocketAddr>>,
        /// Every packet sent: socket index and bytes (with the attempt's ID).
        sent: Vec<(u32, Vec<u8>)>,
        /// Opening a socket to these fails.
        unreachable: Vec<SocketAddr>,
        /// No send slot is free.
        full: bool,
    }

    impl UpstreamIo for FakeIo {
        fn open(&mut self, addr: SocketAddr) -> io::Result<u32> {
            if self.unreachable.contains(&addr) {
                return Err(io::ErrorKind::NetworkUnreachable.into());
            }
            // Like the ring: a closed socket's index is reused first.
            if let Some(index) = self.open.iter().position(Option::is_none) {
                self.open[index] = Some(addr);
                return Ok(u32::try_from(index).expect("few sockets"));
            }
            self.open.push(Some(addr));
            Ok(u32::try_from(self.open.len() - 1).expect("few sockets"))
        }

        fn send(&mut self, socket: u32, query: &[u8], id: u16) -> bool {
            if self.full {
                return false;
            }
            let mut packet = query.to_vec();
            route::set_id(&mut packet, id);
            self.sent.push((socket, packet));
            true
        }

        fn close(&mut self, socket: u32) {
            let slot = self.open.get_mut(socket as usize).expect("known socket");
            assert!(slot.take().is_some(), "closed twice");
        }
    }

    impl FakeIo {
        /// The upstream the `n`th sent packet went to.
        fn sent_to(&self, n: usize) -> SocketAddr {
            let (socket, _) = &self.sent[n];
            self.open[*socket as usize].expect("sent on an open socket")
        }

        /// Open sockets.
        fn open_count(&self) -> usize {
            self.open.iter().flatten().count()
        }
    }

    const FIRST: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(127, 0, 0, 11),
        53,
    ));
    const SECOND: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(127, 0, 0, 12),
        53,
    ));

    /// One zone `zone` over `transport` to `upstreams` with a 2 s budget.
    fn setup(zone: &str, transport: Transport, upstreams: &[SocketAddr]) -> ForwardSetup {
        ForwardSetup::new(
            vec![ForwardZone {
                zone: zone.to_owned(),
                upstreams: upstreams.to_vec(),
                transport,
                timeout: Duration::from_secs(2),
            }],
            1232,
        )
    }

    /// A request for `name` with token `token`.
    fn request(token: u64, name: &str) -> Request {
        Request {
            worker: 0,
            token,
            query: query(name),
            via: Via::Zone,
        }
    }

    /// The finished exchanges.
    fn done(exchanges: &mut Exchanges) -> Vec<Done> {
        let mut taken = Vec::new();
        exchanges.take_done(&mut taken);
        taken
    }

    /// The one finished exchange, as a reply.
    fn one_reply(exchanges: &mut Exchanges) -> Reply {
        let mut taken = done(exchanges);
        assert_eq!(taken.len(), 1, "{taken:?}");
        match taken.pop() {
            Some(Done::Reply(reply)) => reply,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// The genuine answer to the `n`th packet sent, and the socket to deliver it on.
    fn answer_to(io: &FakeIo, n: usize) -> (u32, Vec<u8>) {
        let (socket, packet) = &io.sent[n];
        (
            *socket,
            answer(packet, [10, 0, 0, 1], false).expect("answerable"),
        )
    }

    #[test]
    fn udp_zone_is_forwarded_here_and_the_answer_comes_back_with_id_zero() {
        let setup = setup(".", Transport::Udp, &[FIRST]);
        let metrics = Arc::clone(&setup.metrics[0]);
        let mut exchanges = Exchanges::new(0, setup);
        let mut io = FakeIo::default();
        let now = Instant::now();
        assert!(exchanges
            .start(request(7, "www.example.com."), now, &mut io)
            .is_none());
        assert_eq!(io.sent.len(), 1);
        assert_eq!(io.sent_to(0), FIRST);
        let (socket, datagram) = answer_to(&io, 0);
        exchanges.receive(socket, &datagram, false, now + Duration::from_millis(3));
        let reply = one_reply(&mut exchanges);
        assert_eq!(reply.token, 7);
        let Outcome::Answer(bytes) = reply.outcome else {
            panic!("expected an answer");
        };
        assert_eq!(&bytes[..2], &[0, 0], "ID restored to 0");
        assert_eq!(&bytes[2..], &datagram[2..]);
        assert!(exchanges.is_empty());
        assert_eq!(metrics.durations(0).count(), 1);
        assert_eq!(metrics.failures(), 0);
    }

    #[test]
    fn tcp_and_prefer_udp_zones_and_unrouted_names_go_to_the_control_side() {
        let mut io = FakeIo::default();
        let now = Instant::now();
        for transport in [Transport::Tcp, Transport::PreferUdp] {
            let mut exchanges = Exchanges::new(0, setup(".", transport, &[FIRST]));
            let back = exchanges.start(request(1, "a.example."), now, &mut io);
            assert_eq!(back.map(|request| request.token), Some(1), "{transport:?}");
        }
        let mut exchanges = Exchanges::new(0, setup("cluster.local.", Transport::Udp, &[FIRST]));
        let back = exchanges.start(request(2, "www.example.com."), now, &mut io);
        assert!(back.is_some(), "no zone: the control side answers NoZone");
        assert!(io.sent.is_empty());
    }

    #[test]
    fn wrong_ids_questions_and_non_responses_are_ignored() {
        let setup = setup(".", Transport::Udp, &[FIRST]);
        let metrics = Arc::clone(&setup.metrics[0]);
        let mut exchanges = Exchanges::new(0, setup);
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "www.example.com."), now, &mut io);
        let (socket, genuine) = answer_to(&io, 0);
        let mut wrong_id = genuine.clone();
        wrong_id[0] ^= 0x5a;
        let mut wrong_name = genuine.clone();
        wrong_name[13] ^= 0x01;
        let (_, reflected) = io.sent[0].clone();
        for bogus in [wrong_id, wrong_name, reflected, vec![0xde, 0xad]] {
            exchanges.receive(socket, &bogus, false, now);
        }
        exchanges.receive(socket + 1, &genuine, false, now);
        assert!(done(&mut exchanges).is_empty());
        assert_eq!(metrics.ignored(), 4, "counted under the socket's upstream");
        assert_eq!(exchanges.len(), 1, "still waiting");
        exchanges.receive(socket, &genuine, false, now);
        assert!(matches!(
            one_reply(&mut exchanges).outcome,
            Outcome::Answer(_)
        ));
    }

    #[test]
    fn truncated_answers_go_to_the_control_side_over_tcp() {
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST]));
        let mut io = FakeIo::default();
        let now = Instant::now();
        for (token, cut) in [(1, false), (2, true)] {
            exchanges.start(request(token, "big.example."), now, &mut io);
            let (socket, packet) = io.sent.last().cloned().expect("sent");
            let datagram = answer(&packet, [10, 0, 0, 1], !cut).expect("answerable");
            let later = now + Duration::from_millis(500);
            exchanges.receive(socket, &datagram, cut, later);
            let mut taken = done(&mut exchanges);
            let Some(Done::Control(handed)) = taken.pop() else {
                panic!("expected a hand-over, got {taken:?}");
            };
            assert_eq!(handed.token, token);
            assert_eq!(
                handed.via,
                Via::Tcp {
                    addr: FIRST,
                    budget: Duration::from_millis(1500)
                }
            );
            assert_eq!(
                handed.query,
                query("big.example."),
                "ID 0 as the worker built it"
            );
        }
    }

    #[test]
    fn a_slice_that_runs_out_moves_on_and_a_late_answer_still_counts() {
        let setup = setup(".", Transport::Udp, &[FIRST, SECOND]);
        let first_metrics = Arc::clone(&setup.metrics[0]);
        let mut exchanges = Exchanges::new(0, setup);
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "slow.example."), now, &mut io);
        exchanges.run(now + Duration::from_millis(999), &mut io);
        assert!(
            (0..io.sent.len()).all(|n| io.sent_to(n) == FIRST),
            "the slice is still running"
        );
        exchanges.run(now + Duration::from_secs(1), &mut io);
        let last = io.sent.len() - 1;
        assert_eq!(io.sent_to(last), SECOND);
        assert_eq!(first_metrics.failures(), 1, "the slice ran out");
        let (socket, late) = answer_to(&io, 0);
        exchanges.receive(socket, &late, false, now + Duration::from_millis(1200));
        assert!(matches!(
            one_reply(&mut exchanges).outcome,
            Outcome::Answer(_)
        ));
        // The first upstream answered, so the next request starts there again.
        exchanges.start(request(2, "next.example."), now, &mut io);
        assert_eq!(io.sent_to(last + 1), FIRST);
    }

    #[test]
    fn an_unanswered_query_is_sent_again_while_its_slice_runs() {
        // 250 ms before any answer time is known.
        let first_timeout = Retransmit::default().timeout();
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST, SECOND]));
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "lost.example."), now, &mut io);
        exchanges.run(now + first_timeout - Duration::from_millis(1), &mut io);
        assert_eq!(io.sent.len(), 1, "not yet");
        exchanges.run(now + first_timeout, &mut io);
        assert_eq!(io.sent.len(), 2);
        assert_eq!(io.sent[1], io.sent[0], "the same socket, ID and bytes");
        exchanges.run(now + first_timeout * 2, &mut io);
        assert_eq!(io.sent.len(), 2, "backing off");
        exchanges.run(now + first_timeout * 3, &mut io);
        assert_eq!(io.sent.len(), 3);
        // Slice 1 s: the next copy would be due at 1.75 s, after it; the second upstream
        // takes over at 1 s and the first one is not sent to again.
        exchanges.run(now + Duration::from_secs(1), &mut io);
        exchanges.run(now + Duration::from_millis(1900), &mut io);
        let to_first = (0..io.sent.len())
            .filter(|&n| io.sent_to(n) == FIRST)
            .count();
        assert_eq!(to_first, 3);
        // An answer to the retransmitted copy is as good as one to the first.
        let (socket, genuine) = answer_to(&io, 2);
        exchanges.receive(socket, &genuine, false, now + Duration::from_millis(1950));
        assert!(matches!(
            one_reply(&mut exchanges).outcome,
            Outcome::Answer(_)
        ));
    }

    #[test]
    fn a_spent_budget_is_a_timeout() {
        let setup = setup(".", Transport::Udp, &[FIRST, SECOND]);
        let metrics: Vec<_> = setup.metrics.iter().map(Arc::clone).collect();
        let mut exchanges = Exchanges::new(0, setup);
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "dead.example."), now, &mut io);
        exchanges.run(now + Duration::from_secs(1), &mut io);
        assert!(done(&mut exchanges).is_empty());
        exchanges.run(now + Duration::from_secs(2), &mut io);
        let reply = one_reply(&mut exchanges);
        assert!(matches!(reply.outcome, Outcome::Failed(Failure::Timeout)));
        assert!(exchanges.is_empty());
        assert_eq!((metrics[0].failures(), metrics[1].failures()), (1, 1));
        // A late answer finds nothing waiting.
        let (socket, late) = answer_to(&io, io.sent.len() - 1);
        exchanges.receive(socket, &late, false, now + Duration::from_secs(3));
        assert!(done(&mut exchanges).is_empty());
        assert_eq!(metrics[1].ignored(), 1);
    }

    #[test]
    fn a_refusing_upstream_hands_over_at_once() {
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST, SECOND]));
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "www.example.com."), now, &mut io);
        let (refused, _) = io.sent[0];
        exchanges.socket_error(refused, libc::ECONNREFUSED);
        exchanges.run(now, &mut io);
        assert_eq!(io.sent.len(), 2);
        assert_eq!(io.sent_to(1), SECOND);
        let (socket, genuine) = answer_to(&io, 1);
        exchanges.receive(socket, &genuine, false, now);
        assert!(matches!(
            one_reply(&mut exchanges).outcome,
            Outcome::Answer(_)
        ));
        exchanges.start(request(2, "www.example.org."), now, &mut io);
        assert_eq!(
            io.sent_to(2),
            SECOND,
            "the answering upstream goes first now"
        );
    }

    #[test]
    fn a_refusal_of_the_last_upstream_fails_at_once() {
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST]));
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "www.example.com."), now, &mut io);
        exchanges.socket_error(io.sent[0].0, libc::ECONNREFUSED);
        exchanges.run(now, &mut io);
        let reply = one_reply(&mut exchanges);
        assert!(matches!(reply.outcome, Outcome::Failed(Failure::Timeout)));
    }

    #[test]
    fn an_upstream_without_a_socket_is_skipped() {
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST, SECOND]));
        let mut io = FakeIo {
            unreachable: vec![FIRST],
            ..FakeIo::default()
        };
        let now = Instant::now();
        exchanges.start(request(1, "www.example.com."), now, &mut io);
        assert_eq!(io.sent.len(), 1);
        assert_eq!(io.sent_to(0), SECOND);
        io.unreachable.push(SECOND);
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST, SECOND]));
        exchanges.start(request(2, "www.example.com."), now, &mut io);
        let reply = one_reply(&mut exchanges);
        assert!(matches!(reply.outcome, Outcome::Failed(Failure::Timeout)));
    }

    #[test]
    fn sockets_are_replaced_after_their_quota_and_closed_once_idle() {
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST]));
        exchanges.rotate_after = 2;
        let mut io = FakeIo::default();
        let now = Instant::now();
        let mut token = 0;
        // Until some socket has carried two queries: it is retired but has one in flight.
        let retired = loop {
            token += 1;
            exchanges.start(request(token, "www.example.com."), now, &mut io);
            let socket = io.sent.last().expect("sent").0;
            if io.sent.iter().filter(|(sent, _)| *sent == socket).count() == 2 {
                break socket;
            }
            let (socket, genuine) = answer_to(&io, io.sent.len() - 1);
            exchanges.receive(socket, &genuine, false, now);
        };
        exchanges.run(now, &mut io);
        assert!(
            io.open[retired as usize].is_some(),
            "a query is still in flight"
        );
        let (socket, genuine) = answer_to(&io, io.sent.len() - 1);
        exchanges.receive(socket, &genuine, false, now);
        exchanges.run(now, &mut io);
        assert!(io.open[retired as usize].is_none(), "closed once idle");
        assert_eq!(exchanges.sockets(), io.open_count());
    }

    #[test]
    fn a_slow_upstream_is_not_sent_duplicates_of_every_query() {
        let setup = setup(".", Transport::Udp, &[FIRST]);
        let metrics = Arc::clone(&setup.metrics[0]);
        let mut exchanges = Exchanges::new(0, setup);
        let mut io = FakeIo::default();
        let start = Instant::now();
        // Thirty queries one after another to an upstream that answers each in 400 ms; the
        // worker runs its timers every 10 ms meanwhile, as a busy ring does.
        for token in 0..30u64 {
            let now = start + Duration::from_secs(token);
            let first = io.sent.len();
            exchanges.start(request(token, "slow.example."), now, &mut io);
            for ms in (10..400).step_by(10) {
                exchanges.run(now + Duration::from_millis(ms), &mut io);
            }
            // The upstream answers the first copy, and any second copy just after.
            let answers: Vec<_> = (first..io.sent.len()).map(|n| answer_to(&io, n)).collect();
            for (socket, genuine) in answers {
                exchanges.receive(socket, &genuine, false, now + Duration::from_millis(400));
            }
            one_reply(&mut exchanges);
        }
        // Karn: the first query goes twice (250 ms < 400 ms) and the timeout backs off; from
        // then on answers give samples and no copy is needed.
        assert!(
            io.sent.len() <= 32,
            "{} datagrams for 30 queries",
            io.sent.len()
        );
        assert_eq!(
            metrics.ignored(),
            0,
            "the answer to a second copy is an echo"
        );
    }

    #[test]
    fn a_copy_never_goes_after_its_slice() {
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST, SECOND]));
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "late.example."), now, &mut io);
        exchanges.run(now + Duration::from_millis(250), &mut io);
        assert_eq!(io.sent.len(), 2);
        // The timer is late: the copy due at 750 ms and the slice end at 1 s are both past.
        exchanges.run(now + Duration::from_millis(1010), &mut io);
        let to_first = (0..io.sent.len())
            .filter(|&n| io.sent_to(n) == FIRST)
            .count();
        assert_eq!(to_first, 2, "no copy to the upstream whose slice is over");
        assert_eq!(io.sent_to(io.sent.len() - 1), SECOND);
    }

    #[test]
    fn no_send_slot_at_a_slice_end_retries_the_next_upstream_shortly() {
        const THIRD: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::new(127, 0, 0, 13),
            53,
        ));
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST, SECOND, THIRD]));
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "busy.example."), now, &mut io);
        let sent = io.sent.len();
        io.full = true;
        let slice_end = now + slice_for(Duration::from_secs(2), 3);
        exchanges.run(slice_end, &mut io);
        assert_eq!(io.sent.len(), sent, "nothing could be sent");
        assert!(
            done(&mut exchanges).is_empty(),
            "the first attempt still listens"
        );
        io.full = false;
        exchanges.run(slice_end + LOCAL_RETRY, &mut io);
        assert_eq!(
            io.sent_to(io.sent.len() - 1),
            SECOND,
            "tried again, not skipped"
        );
    }

    #[test]
    fn an_answered_exchange_leaves_no_timer_behind() {
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST]));
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "www.example.com."), now, &mut io);
        assert!(exchanges.next_timer().is_some());
        let (socket, genuine) = answer_to(&io, 0);
        exchanges.receive(socket, &genuine, false, now);
        assert!(matches!(
            one_reply(&mut exchanges).outcome,
            Outcome::Answer(_)
        ));
        assert_eq!(
            exchanges.next_timer(),
            None,
            "an idle worker's timer must not fire"
        );
    }

    #[test]
    fn a_socket_index_reused_by_another_upstream_is_not_taken_for_this_one() {
        let zones = vec![
            ForwardZone {
                zone: "cluster.local.".to_owned(),
                upstreams: vec![FIRST],
                transport: Transport::Udp,
                timeout: Duration::from_secs(2),
            },
            ForwardZone {
                zone: ".".to_owned(),
                upstreams: vec![SECOND],
                transport: Transport::Udp,
                timeout: Duration::from_secs(2),
            },
        ];
        let mut exchanges = Exchanges::new(0, ForwardSetup::new(zones, 1232));
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "www.example.com."), now, &mut io);
        let (second, _) = io.sent[0];
        assert_eq!(io.sent_to(0), SECOND);
        // Every slot of the cluster upstream names the index the other upstream's socket now
        // has (as after that upstream's own socket was retired, closed and its index reused).
        *exchanges.plan.upstreams[0].sockets.borrow_mut() = [Some(second); SOCKETS_PER_UPSTREAM];
        exchanges.start(
            request(2, "kube-dns.kube-system.svc.cluster.local."),
            now,
            &mut io,
        );
        assert_eq!(
            io.sent_to(1),
            FIRST,
            "a cluster name must never reach the other upstream"
        );
        assert_ne!(io.sent[1].0, second);
    }

    #[test]
    fn no_send_slot_is_overload_not_an_upstream_failure() {
        let setup = setup(".", Transport::Udp, &[FIRST, SECOND]);
        let metrics: Vec<_> = setup.metrics.iter().map(Arc::clone).collect();
        let mut exchanges = Exchanges::new(0, setup);
        let mut io = FakeIo {
            full: true,
            ..FakeIo::default()
        };
        let now = Instant::now();
        exchanges.start(request(1, "www.example.com."), now, &mut io);
        let reply = one_reply(&mut exchanges);
        assert!(matches!(
            reply.outcome,
            Outcome::Failed(Failure::Overloaded)
        ));
        assert_eq!((metrics[0].failures(), metrics[1].failures()), (0, 0));
        assert!(exchanges.is_empty());
    }

    #[test]
    fn a_reload_lets_exchanges_finish_on_the_old_upstreams() {
        let mut exchanges = Exchanges::new(0, setup(".", Transport::Udp, &[FIRST]));
        let mut io = FakeIo::default();
        let now = Instant::now();
        exchanges.start(request(1, "old.example."), now, &mut io);
        exchanges.reconfigure(setup(".", Transport::Udp, &[SECOND]));
        exchanges.run(now, &mut io);
        assert_eq!(io.open_count(), 1, "the old socket waits for its answer");
        exchanges.start(request(2, "new.example."), now, &mut io);
        assert_eq!(io.sent_to(1), SECOND);
        let (socket, genuine) = answer_to(&io, 0);
        exchanges.receive(socket, &genuine, false, now);
        assert_eq!(one_reply(&mut exchanges).token, 1);
        exchanges.run(now, &mut io);
        assert_eq!(
            io.open_count(),
            1,
            "the old socket closed, the new one stays"
        );
        assert_eq!(io.open[socket as usize], None);
    }
}
