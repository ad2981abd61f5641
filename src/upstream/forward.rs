//! Answers one [`Request`]: route it to a zone, try the zone's upstreams within its budget, and
//! deliver exactly one [`Reply`] to the worker.
//!
//! Runs on: control thread (`ringdns-ctl`), inside its `LocalSet`.
//!
//! The zone's timeout is the total budget. Upstreams are tried in turn starting at the last one
//! that answered; each attempt gets a slice of `timeout / upstreams` (at least [`MIN_SLICE`]). An
//! attempt that fails outright (ICMP port unreachable, connection refused) hands over to the next
//! upstream at once. An attempt whose slice runs out keeps listening while the next one starts,
//! so a late answer from an earlier upstream still counts. When the budget is spent the request
//! fails with [`Failure::Timeout`].
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use log::info;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::pool::TcpPool;
use super::route::{self, Question, Router};
use super::udp::{UdpSet, QUERIES_PER_SOCKET};
use super::{
    Error, Failure, Outcome, Reply, Request, UpstreamMetrics, UpstreamStats, Via, WorkerLink,
};
use crate::config::{ForwardZone, Transport};

/// Shortest slice of the budget an attempt gets before the next upstream is tried: a loaded
/// upstream or a cross-zone hop can take this long, and trying the next one sooner only doubles
/// the load.
pub(crate) const MIN_SLICE: Duration = Duration::from_millis(250);

/// Consecutive failed attempts after which an upstream is logged as down.
pub(crate) const DOWN_AFTER_FAILURES: u32 = 3;

/// Counters of the control side as a whole (per-upstream ones are in [`UpstreamStats`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ForwardStats {
    /// Requests received from workers.
    pub(crate) requests: u64,
    /// Requests answered with [`Failure::BadRequest`].
    pub(crate) bad_requests: u64,
    /// Requests answered with [`Failure::NoZone`].
    pub(crate) no_zone: u64,
    /// Requests answered with [`Failure::Timeout`].
    pub(crate) timeouts: u64,
    /// Replies that could not be delivered (unknown worker index or its channel closed).
    pub(crate) undeliverable: u64,
    /// Worker eventfd writes that failed (the reply is queued; the worker's next wake-up or
    /// poll picks it up).
    pub(crate) wake_failures: u64,
}

/// Where replies go and the control-side counters. Shared (`Rc`) by a forwarder and every
/// forwarder a reload replaces it with, so replies of requests still in flight on a replaced
/// forwarder still wake their workers.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// Where replies go.
    workers: Vec<WorkerLink>,
    /// Workers sent a reply since their eventfd was last written.
    needs_wake: RefCell<Vec<bool>>,
    /// Notified when `needs_wake` gains an entry.
    pub(crate) wake_pending: Notify,
    /// Control-side counters.
    stats: RefCell<ForwardStats>,
}

/// Everything the control thread's forwarding side owns for one configuration.
#[derive(Debug)]
pub(crate) struct Forwarder {
    /// Zone routing.
    router: Router,
    /// Zones, in the router's order.
    zones: Vec<Zone>,
    /// Upstreams by address, shared between zones that name the same server.
    upstreams: Vec<Rc<Upstream>>,
    /// Reply delivery, shared across reloads.
    pub(crate) delivery: Rc<Delivery>,
}

impl Forwarder {
    /// Sets up zones and upstreams; opens no sockets (they open on first use).
    pub(crate) fn new(zones: Vec<ForwardZone>, udp_payload: u16, workers: Vec<WorkerLink>) -> Self {
        let delivery = Rc::new(Delivery {
            needs_wake: RefCell::new(vec![false; workers.len()]),
            workers,
            wake_pending: Notify::new(),
            stats: RefCell::new(ForwardStats::default()),
        });
        Self::with_delivery(zones, udp_payload, delivery)
    }

    /// A forwarder for a reloaded configuration that replaces `self` for new requests; it
    /// delivers through the same channels and counts into the same counters.
    pub(crate) fn replacement(&self, zones: Vec<ForwardZone>, udp_payload: u16) -> Self {
        Self::with_delivery(zones, udp_payload, Rc::clone(&self.delivery))
    }

    /// Sets up zones and upstreams around `delivery`; opens no sockets.
    fn with_delivery(zones: Vec<ForwardZone>, udp_payload: u16, delivery: Rc<Delivery>) -> Self {
        let router = Router::new(zones.iter().map(|zone| zone.zone.as_str()));
        let mut by_addr: HashMap<SocketAddr, Rc<Upstream>> = HashMap::new();
        let mut upstreams = Vec::new();
        let zones = zones
            .into_iter()
            .map(|zone| {
                let members = zone
                    .upstreams
                    .iter()
                    .map(|addr| {
                        Rc::clone(by_addr.entry(*addr).or_insert_with(|| {
                            let upstream = Rc::new(Upstream::new(*addr, udp_payload));
                            upstreams.push(Rc::clone(&upstream));
                            upstream
                        }))
                    })
                    .collect();
                Zone {
                    name: zone.zone,
                    upstreams: members,
                    transport: zone.transport,
                    timeout: zone.timeout,
                    rotation: Rotation::default(),
                }
            })
            .collect();
        Self {
            router,
            zones,
            upstreams,
            delivery,
        }
    }

    /// Answers `request` and delivers the reply; the reply's eventfd write happens in
    /// [`Forwarder::wake_workers`], batched per loop iteration.
    pub(crate) async fn serve(self: Rc<Self>, request: Request) {
        self.delivery.stats.borrow_mut().requests += 1;
        let outcome = match request.via {
            Via::Zone => self.resolve(&request.query).await,
            // Boxed: inline, its TCP exchange would double the size of every request's task
            // (see `per_request_futures_stay_small`); this path is taken only after a TC=1.
            Via::Tcp { addr, budget } => {
                Box::pin(self.resolve_tcp(&request.query, addr, budget)).await
            }
        };
        if let Outcome::Failed(failure) = outcome {
            let mut stats = self.delivery.stats.borrow_mut();
            match failure {
                Failure::Timeout => stats.timeouts += 1,
                Failure::NoZone => stats.no_zone += 1,
                Failure::BadRequest => stats.bad_requests += 1,
                Failure::Overloaded => {}
            }
        }
        self.deliver(
            request.worker,
            Reply {
                token: request.token,
                outcome,
            },
        );
    }

    /// Writes 1 to the eventfd of every worker that got replies since the last call.
    pub(crate) fn wake_workers(&self) {
        let mut needs_wake = self.delivery.needs_wake.borrow_mut();
        for (link, pending) in self.delivery.workers.iter().zip(needs_wake.iter_mut()) {
            if std::mem::take(pending) {
                // EAGAIN only if the counter is near u64::MAX, i.e. the worker already has an
                // unread wake-up; any other error leaves nothing better to do than count it.
                if link.wake.write(1).is_err() {
                    self.delivery.stats.borrow_mut().wake_failures += 1;
                }
            }
        }
    }

    /// A snapshot of the control-side counters.
    pub(crate) fn stats(&self) -> ForwardStats {
        *self.delivery.stats.borrow()
    }

    /// Each upstream's metrics, in config order.
    pub(crate) fn metrics(&self) -> Vec<Arc<UpstreamMetrics>> {
        self.upstreams
            .iter()
            .map(|upstream| Arc::clone(&upstream.metrics))
            .collect()
    }

    /// Publishes what changes without a request: open pooled connections, and the datagrams
    /// and frames ignored (counted per packet in [`UpstreamStats`]).
    pub(crate) fn publish(&self) {
        for upstream in &self.upstreams {
            upstream
                .metrics
                .set_connections(upstream.tcp.open_connections());
            upstream
                .metrics
                .set_ignored(upstream.stats.borrow().ignored);
        }
    }

    /// Per-upstream counters, by address.
    pub(crate) fn upstream_stats(&self) -> Vec<(SocketAddr, UpstreamStats)> {
        self.upstreams
            .iter()
            .map(|upstream| (upstream.addr, *upstream.stats.borrow()))
            .collect()
    }

    /// Sends `reply` to its worker and marks that worker for a wake-up.
    fn deliver(&self, worker: usize, reply: Reply) {
        let Some(link) = self.delivery.workers.get(worker) else {
            self.delivery.stats.borrow_mut().undeliverable += 1;
            return;
        };
        if link.replies.send(reply).is_err() {
            self.delivery.stats.borrow_mut().undeliverable += 1;
            return;
        }
        if let Some(pending) = self.delivery.needs_wake.borrow_mut().get_mut(worker) {
            *pending = true;
        }
        self.delivery.wake_pending.notify_one();
    }

    /// Forwards one wire query over TCP to `addr` within `budget` (a worker's UDP exchange got
    /// a truncated answer from it). An address this configuration no longer has (a reload
    /// removed it meanwhile) is resolved through its zone instead.
    async fn resolve_tcp(&self, query: &[u8], addr: SocketAddr, budget: Duration) -> Outcome {
        let Some(upstream) = self.upstreams.iter().find(|upstream| upstream.addr == addr) else {
            return self.resolve(query).await;
        };
        let Some(question) = route::parse_question(query) else {
            return Outcome::Failed(Failure::BadRequest);
        };
        upstream.stats.borrow_mut().truncated += 1;
        let started = Instant::now();
        let exchange = attempt(upstream, Transport::Tcp, query, &question, budget);
        let result = match tokio::time::timeout(budget, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                addr,
                after: budget,
            }),
        };
        match result {
            Ok(mut answer) => {
                upstream.succeeded();
                route::set_id(&mut answer, 0);
                Outcome::Answer(answer)
            }
            Err(error) => {
                upstream.failed("(tcp after truncation)", &error);
                // The rest of the budget goes to the zone's usual path (its rotation, UDP then
                // TCP on truncation), as a TCP failure inside an attempt moves on there too.
                let left = budget.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, self.resolve(query)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::Failed(Failure::Timeout),
                }
            }
        }
    }

    /// Routes and forwards one wire query.
    async fn resolve(&self, query: &[u8]) -> Outcome {
        if query.len() > usize::from(u16::MAX) {
            return Outcome::Failed(Failure::BadRequest);
        }
        let Some(question) = route::parse_question(query) else {
            return Outcome::Failed(Failure::BadRequest);
        };
        let Some(zone) = self
            .router
            .route(question.name())
            .and_then(|index| self.zones.get(index))
        else {
            return Outcome::Failed(Failure::NoZone);
        };
        match zone.forward(query, &question).await {
            Some(mut answer) => {
                route::set_id(&mut answer, 0);
                Outcome::Answer(answer)
            }
            None => Outcome::Failed(Failure::Timeout),
        }
    }
}

/// One forward zone at run time.
#[derive(Debug)]
struct Zone {
    /// The zone name, for logs.
    name: String,
    /// Its upstreams, in config order.
    upstreams: Vec<Rc<Upstream>>,
    /// How to reach them.
    transport: Transport,
    /// Total budget per request.
    timeout: Duration,
    /// Which upstream to try first.
    rotation: Rotation,
}

/// An attempt on one upstream, polled alongside the others still listening.
type Attempt<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, Error>> + 'a>>;

/// What woke the driver of one request.
enum Event {
    /// Attempt number `.0` (index into the live attempts) finished.
    Finished(usize, Result<Vec<u8>, Error>),
    /// The current slice (or the whole budget) ran out.
    SliceOver,
}

impl Zone {
    /// Tries the zone's upstreams within its budget; the answer still has the upstream's ID.
    async fn forward(&self, query: &[u8], question: &Question) -> Option<Vec<u8>> {
        let count = self.upstreams.len();
        if count == 0 {
            return None;
        }
        let start = Instant::now();
        let deadline = start + self.timeout;
        let slice = slice_for(self.timeout, count);
        let mut order = self.rotation.order(count);
        // Live attempts, each with its upstream's index.
        let mut attempts: Vec<(usize, Attempt<'_>)> = Vec::with_capacity(count);
        // The upstream whose slice is running.
        let mut current = order.first;
        let mut slice_end = deadline;
        if let Some(index) = order.next() {
            attempts.push((index, self.attempt(index, query, question, slice)));
            current = index;
            slice_end = (Instant::now() + slice).min(deadline);
        }
        // Every round either finishes an attempt, launches one or ends a slice; there are at
        // most `count` of each and the last slice ends at the deadline, so the loop ends.
        loop {
            let event = tokio::select! {
                biased;
                (position, result) = next_finished(&mut attempts) => Event::Finished(position, result),
                () = tokio::time::sleep_until(slice_end) => Event::SliceOver,
            };
            match event {
                Event::Finished(position, result) => {
                    let (index, _) = attempts.swap_remove(position);
                    match result {
                        Ok(answer) => {
                            self.succeeded(index);
                            return Some(answer);
                        }
                        Err(error) => {
                            self.failed(index, &error);
                            if let Some(index) = order.next() {
                                attempts.push((index, self.attempt(index, query, question, slice)));
                                current = index;
                                slice_end = (Instant::now() + slice).min(deadline);
                            }
                            if attempts.is_empty() {
                                return None;
                            }
                        }
                    }
                }
                Event::SliceOver => {
                    if attempts.iter().any(|(index, _)| *index == current) {
                        let error = Error::Timeout {
                            addr: self.address(current),
                            after: slice,
                        };
                        self.failed(current, &error);
                        // Counted once; later slice ends only wait for earlier attempts.
                        current = usize::MAX;
                    }
                    if Instant::now() >= deadline {
                        return None;
                    }
                    slice_end = deadline;
                    if let Some(index) = order.next() {
                        attempts.push((index, self.attempt(index, query, question, slice)));
                        current = index;
                        slice_end = (Instant::now() + slice).min(deadline);
                    }
                }
            }
        }
    }

    /// Starts an attempt on upstream `index` (an index into `self.upstreams`).
    fn attempt<'a>(
        &'a self,
        index: usize,
        query: &'a [u8],
        question: &'a Question,
        slice: Duration,
    ) -> Attempt<'a> {
        match self.upstreams.get(index) {
            Some(upstream) => Box::pin(attempt(upstream, self.transport, query, question, slice)),
            None => Box::pin(std::future::pending()),
        }
    }

    /// The address of upstream `index`, for errors and logs.
    fn address(&self, index: usize) -> SocketAddr {
        self.upstreams
            .get(index)
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |u| u.addr)
    }

    /// Records an answer from upstream `index` and makes it the first to try next time.
    fn succeeded(&self, index: usize) {
        self.rotation.succeeded(index);
        if let Some(upstream) = self.upstreams.get(index) {
            upstream.succeeded();
        }
    }

    /// Records a failed or timed-out attempt on upstream `index`; the next request starts at
    /// the following upstream if this one was first in line.
    fn failed(&self, index: usize, error: &Error) {
        self.rotation.failed(index, self.upstreams.len());
        if let Some(upstream) = self.upstreams.get(index) {
            upstream.failed(&self.name, error);
        }
    }
}

/// The order in which one request tries a zone's upstreams: each once, starting at `first`.
#[derive(Debug)]
pub(crate) struct Order {
    /// The first upstream to try.
    first: usize,
    /// How many upstreams the zone has.
    count: usize,
    /// How many have been handed out.
    launched: usize,
}

impl Order {
    /// An order over `count` upstreams starting at `first`.
    fn new(first: usize, count: usize) -> Self {
        Self {
            first,
            count,
            launched: 0,
        }
    }
}

impl Order {
    /// Puts the upstream last handed out back, to be handed out again next (its attempt could
    /// not be made for a reason of ours, not the upstream's).
    pub(crate) fn give_back(&mut self) {
        self.launched = self.launched.saturating_sub(1);
    }
}

impl Iterator for Order {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.launched >= self.count {
            return None;
        }
        let index = (self.first + self.launched) % self.count;
        self.launched += 1;
        Some(index)
    }
}

/// The slice of `timeout` each of `count` upstreams gets before the next is tried.
pub(crate) fn slice_for(timeout: Duration, count: usize) -> Duration {
    let even = timeout / u32::try_from(count.max(1)).unwrap_or(u32::MAX);
    even.max(MIN_SLICE).min(timeout)
}

/// Polls every live attempt and yields the first that finishes (with its position).
async fn next_finished(attempts: &mut [(usize, Attempt<'_>)]) -> (usize, Result<Vec<u8>, Error>) {
    std::future::poll_fn(|cx| {
        for (position, (_, attempt)) in attempts.iter_mut().enumerate() {
            if let Poll::Ready(result) = attempt.as_mut().poll(cx) {
                return Poll::Ready((position, result));
            }
        }
        Poll::Pending
    })
    .await
}

/// One upstream's attempt at a query, by the zone's transport. `slice` bounds TCP connects and,
/// for [`Transport::PreferUdp`], how long UDP alone is given.
async fn attempt(
    upstream: &Upstream,
    transport: Transport,
    query: &[u8],
    question: &Question,
    slice: Duration,
) -> Result<Vec<u8>, Error> {
    let started = Instant::now();
    let result = exchange(upstream, transport, query, question, slice).await;
    if let Ok(answer) = &result {
        let rcode = answer.get(3).map_or(0, |flags| flags & 0x0f);
        upstream.metrics.observe(rcode, started.elapsed());
    }
    result
}

/// The exchange of one [`attempt`], by transport.
async fn exchange(
    upstream: &Upstream,
    transport: Transport,
    query: &[u8],
    question: &Question,
    slice: Duration,
) -> Result<Vec<u8>, Error> {
    // Every arm stays inline: no two of their sub-futures are alive at once, so the attempt is
    // only as large as the largest (the TCP exchange), within glibc's per-thread cache (tcache,
    // <= 1,032 bytes); `prefer_udp` boxes the TCP exchange it runs beside UDP. Before, a 2 KB
    // attempt made each miss pay malloc's slow path and fastbin consolidation (~10 % of miss CPU
    // in perf/RESULTS.md's profile). `per_request_futures_stay_small` keeps it so.
    match transport {
        Transport::Tcp => upstream.tcp.exchange(query, question, slice).await,
        Transport::Udp => {
            let resend_until = Instant::now() + slice;
            let answer = upstream.udp.exchange(query, question, resend_until).await?;
            if route::is_truncated(&answer) {
                upstream.stats.borrow_mut().truncated += 1;
                upstream.tcp.exchange(query, question, slice).await
            } else {
                Ok(answer)
            }
        }
        Transport::PreferUdp => prefer_udp(upstream, query, question, slice).await,
    }
}

/// UDP first; TCP to the same upstream on TC=1, on a UDP error, or when UDP stays silent for
/// half the slice (UDP keeps listening then, and whichever answers first wins).
async fn prefer_udp(
    upstream: &Upstream,
    query: &[u8],
    question: &Question,
    slice: Duration,
) -> Result<Vec<u8>, Error> {
    // UDP copies go again only while UDP has the upstream to itself.
    let udp = upstream
        .udp
        .exchange(query, question, Instant::now() + slice / 2);
    tokio::pin!(udp);
    let first = tokio::select! {
        result = &mut udp => Some(result),
        () = tokio::time::sleep(slice / 2) => None,
    };
    // The TCP exchanges are boxed: inline, each would sit beside the pinned UDP exchange and
    // make every prefer_udp attempt a 2 KB future (see `exchange`).
    match first {
        Some(Ok(answer)) if !route::is_truncated(&answer) => return Ok(answer),
        Some(Ok(_)) => {
            upstream.stats.borrow_mut().truncated += 1;
            return Box::pin(upstream.tcp.exchange(query, question, slice)).await;
        }
        Some(Err(_)) => return Box::pin(upstream.tcp.exchange(query, question, slice)).await,
        None => {}
    }
    let mut tcp = Box::pin(upstream.tcp.exchange(query, question, slice));
    let mut udp_done = false;
    // At most two rounds: each disables one branch, and the second round always returns.
    loop {
        tokio::select! {
            result = &mut udp, if !udp_done => match result {
                Ok(answer) if !route::is_truncated(&answer) => return Ok(answer),
                _ => udp_done = true,
            },
            result = &mut tcp => return match result {
                Ok(answer) => Ok(answer),
                Err(error) if udp_done => Err(error),
                // TCP failed; UDP may still answer late.
                Err(error) => match udp.await {
                    Ok(answer) if !route::is_truncated(&answer) => Ok(answer),
                    _ => Err(error),
                },
            },
        }
    }
}

/// Whether an upstream is up or down, and its failed attempts since the last answer. The
/// control side keeps one per upstream and logs every change; a worker that forwards over UDP
/// itself keeps its own and logs changes at most every 10 s per upstream.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Logged down and not yet up again.
    down: Cell<bool>,
    /// Failed attempts since the last answer.
    failures: Cell<u32>,
}

impl Health {
    /// An answer came: `true` if the upstream was down (the caller logs it up again).
    pub(crate) fn succeeded(&self) -> bool {
        self.failures.set(0);
        self.down.replace(false)
    }

    /// An attempt failed: the failures in a row if this one makes the upstream down (the
    /// [`DOWN_AFTER_FAILURES`]th; the caller logs it), else `None`.
    pub(crate) fn failed(&self) -> Option<u32> {
        let failures = self.failures.get().saturating_add(1);
        self.failures.set(failures);
        (failures >= DOWN_AFTER_FAILURES && !self.down.replace(true)).then_some(failures)
    }
}

/// Which of a zone's upstreams a request tries first: the last one that answered, moved on to
/// the next when it fails.
#[derive(Debug, Default)]
pub(crate) struct Rotation {
    /// Index of the upstream to try first.
    preferred: Cell<usize>,
}

impl Rotation {
    /// The order for one request over `count` upstreams.
    pub(crate) fn order(&self, count: usize) -> Order {
        Order::new(self.preferred.get() % count.max(1), count)
    }

    /// Upstream `index` answered: it goes first from now on.
    pub(crate) fn succeeded(&self, index: usize) {
        self.preferred.set(index);
    }

    /// Upstream `index` of `count` failed: if it was first in line, the next one is.
    pub(crate) fn failed(&self, index: usize, count: usize) {
        if self.preferred.get() == index {
            self.preferred.set((index + 1) % count.max(1));
        }
    }
}

/// One upstream address: its UDP sockets, TCP pool, counters and health.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// The server.
    addr: SocketAddr,
    /// Its UDP sockets.
    udp: UdpSet,
    /// Its TCP connections.
    tcp: TcpPool,
    /// Its counters, shared with `udp` and `tcp`.
    stats: Rc<RefCell<UpstreamStats>>,
    /// What the metrics endpoint reads.
    metrics: Arc<UpstreamMetrics>,
    /// Up or down, as last logged.
    health: Health,
}

impl Upstream {
    /// A fresh upstream, assumed up.
    fn new(addr: SocketAddr, udp_payload: u16) -> Self {
        let stats = Rc::new(RefCell::new(UpstreamStats::default()));
        Self {
            addr,
            udp: UdpSet::new(addr, udp_payload, QUERIES_PER_SOCKET, Rc::clone(&stats)),
            tcp: TcpPool::new(addr, Rc::clone(&stats)),
            stats,
            metrics: Arc::new(UpstreamMetrics::new(addr)),
            health: Health::default(),
        }
    }

    /// Counts an answer; logs the upstream up again if it was down.
    fn succeeded(&self) {
        self.stats.borrow_mut().answers += 1;
        if self.health.succeeded() {
            info!("upstream up addr={}", self.addr);
        }
    }

    /// Counts a failed attempt; logs the upstream down on the [`DOWN_AFTER_FAILURES`]th in a row.
    fn failed(&self, zone: &str, error: &Error) {
        {
            let mut stats = self.stats.borrow_mut();
            match error {
                Error::Timeout { .. } => stats.timeouts += 1,
                _ => stats.errors += 1,
            }
        }
        self.metrics.record_failure();
        if let Some(failures) = self.health.failed() {
            info!(
                "upstream down addr={} zone={zone} failures={failures} last_error=\"{error}\"",
                self.addr
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_split_the_budget_but_not_below_the_minimum() {
        assert_eq!(slice_for(Duration::from_secs(2), 2), Duration::from_secs(1));
        assert_eq!(slice_for(Duration::from_secs(1), 8), MIN_SLICE);
        assert_eq!(
            slice_for(Duration::from_millis(100), 3),
            Duration::from_millis(100)
        );
        assert_eq!(slice_for(Duration::from_secs(5), 0), Duration::from_secs(5));
    }

    /// Every miss allocates its request task and its attempt; both must stay within glibc's
    /// per-thread cache (1032 bytes) or each miss takes malloc's slow path (see `exchange`). The
    /// attempts hold their exchanges inline, so this bounds the UDP and TCP exchanges and
    /// `prefer_udp` too.
    #[test]
    fn per_request_futures_stay_small() {
        const TCACHE_MAX: usize = 1032;
        let forwarder = Rc::new(Forwarder::new(Vec::new(), 1232, Vec::new()));
        let request = Request {
            worker: 0,
            token: 0,
            query: Vec::new(),
            via: Via::Zone,
        };
        let serve = Rc::clone(&forwarder).serve(request);
        assert!(
            std::mem::size_of_val(&serve) <= TCACHE_MAX,
            "serve: {}",
            std::mem::size_of_val(&serve)
        );
        let upstream = Upstream::new(SocketAddr::from(([127, 0, 0, 1], 53)), 1232);
        let wire = crate::upstream::testutil::query("small.example.");
        let question = route::parse_question(&wire).expect("valid query");
        for transport in [Transport::Udp, Transport::Tcp, Transport::PreferUdp] {
            let attempt = attempt(&upstream, transport, &wire, &question, MIN_SLICE);
            let size = std::mem::size_of_val(&attempt);
            assert!(size <= TCACHE_MAX, "{transport:?} attempt: {size} bytes");
        }
    }
}
