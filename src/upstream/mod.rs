//! The control thread's forwarding side: zone routing, UDP sockets and pooled TCP connections.
//!
//! Runs on: control thread (`ringdns-ctl`).
//!
//! Workers send a [`Request`] per distinct miss they do not forward themselves (a worker on
//! io_uring forwards `udp` zones from its own ring, `crate::worker::upstream`) over one bounded
//! crossbeam channel and write the control eventfd once per batch; the control side answers every request exactly once with a
//! [`Reply`] on the worker's own channel and writes that worker's eventfd, within the zone's
//! timeout. A failure is a [`Outcome::Failed`], which the worker turns into SERVFAIL.
//!
//! Inside, [`UpstreamSide::spawn`] runs a current-thread tokio runtime on `ringdns-ctl`. The
//! workers' eventfd is watched with `AsyncFd`; each wake-up drains the channel with `try_recv`
//! (never blocking the runtime on crossbeam) and spawns one local task per request. Routing is
//! by longest zone suffix (`route`); UDP uses a rotating set of connected sockets per upstream
//! (`udp`); TCP uses a small pool of pipelined connections per upstream (`pool`, `tcp`); the
//! per-request budget and failover live in `forward`.
#![forbid(unsafe_code)]

mod forward;
mod inflight;
mod pool;
pub(crate) mod route;
mod tcp;
#[cfg(test)]
pub(crate) mod testutil;
mod udp;

pub(crate) use forward::{slice_for, Health, Order, Rotation};
pub(crate) use udp::{
    Echoes, Retransmit, MAX_CONSECUTIVE_ERRORS, QUERIES_PER_SOCKET, SOCKETS_PER_UPSTREAM,
};

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{error, info};
use nix::errno::Errno;
use nix::sys::eventfd::EventFd;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::config::ForwardZone;
use crate::worker::stats::{duration_bucket, HistogramCounts, DURATION_BUCKETS, RCODE_SLOTS};
use forward::Forwarder;

/// One upstream query from a worker.
///
/// # Threads
///
/// Built by a worker, moved through the crossbeam channel to the control thread.
#[derive(Debug)]
pub struct Request {
    /// Index of the sending worker, into the control side's `Vec<WorkerLink>`.
    pub worker: usize,
    /// The worker's pending-miss token, echoed in the [`Reply`].
    pub token: u64,
    /// The wire query to send: ID 0 (the control side sets a random one), RD=1, one question
    /// with a lower-case qname, an OPT record advertising `server.udp_payload` (DO as the client
    /// asked), CD as the client asked.
    pub query: Vec<u8>,
    /// How to resolve it.
    pub via: Via,
}

/// How the control side resolves a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Route the qname to its zone and use the zone's upstreams and transport.
    Zone,
    /// Over TCP to `addr` within `budget`: a worker that forwards over UDP itself got a
    /// truncated answer from `addr` (RFC 7766 §5: retry over TCP) and hands the query over to
    /// the pooled connections here.
    Tcp {
        /// The upstream that answered with TC=1.
        addr: SocketAddr,
        /// What is left of the zone's timeout.
        budget: Duration,
    },
}

/// The control side's answer to one [`Request`].
#[derive(Debug)]
pub struct Reply {
    /// The request's token.
    pub token: u64,
    /// What came back.
    pub outcome: Outcome,
}

/// What an upstream query produced.
#[derive(Debug)]
pub enum Outcome {
    /// A complete answer, accepted only from the address queried, with the query's ID (already
    /// set back to 0 by the control side) and question. Never TC=1 for transports that can retry
    /// over TCP.
    Answer(Vec<u8>),
    /// No usable answer within the zone's timeout.
    Failed(Failure),
}

/// Why an upstream query produced no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No upstream answered within the zone's timeout.
    Timeout,
    /// No zone matched the query name (only possible without a `.` zone).
    NoZone,
    /// The request could not be parsed (a worker bug; counted, never expected).
    BadRequest,
    /// The worker could not queue the request to the control side (its channel was full);
    /// set by the worker itself, never by the control side.
    Overloaded,
}

/// The control side's handle on one worker: where its replies go and how to wake it.
///
/// # Threads
///
/// Owned by the control thread; the worker holds the receiving end and the same eventfd.
#[derive(Debug, Clone)]
pub struct WorkerLink {
    /// The worker's reply channel (unbounded: the number of replies is bounded by the number of
    /// requests the worker sent, which its pending table bounds).
    pub replies: crossbeam_channel::Sender<Reply>,
    /// Written (add 1) after sending replies; the worker's ring or epoll loop reads it.
    pub wake: Arc<EventFd>,
}

/// The worker's handle on the control side.
///
/// # Threads
///
/// One clone per worker; the control thread holds the receiver and reads the eventfd.
#[derive(Debug, Clone)]
pub struct ControlLink {
    /// Bounded: a full queue means the worker answers SERVFAIL and counts it (never waits).
    pub requests: crossbeam_channel::Sender<Request>,
    /// Written once per worker batch that sent requests.
    pub wake: Arc<EventFd>,
}

/// Each upstream address of `zones` once, in config order: the order of the control side's
/// [`UpstreamMetrics`] and of each worker's own series for the same addresses.
pub fn upstream_addrs(zones: &[ForwardZone]) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for addr in zones.iter().flat_map(|zone| zone.upstreams.iter()) {
        if !addrs.contains(addr) {
            addrs.push(*addr);
        }
    }
    addrs
}

/// Requests taken from the channel per loop iteration before the loop yields to running
/// requests (and comes straight back for the rest).
const DRAIN_BATCH: usize = 1024;

/// Poll interval if the control eventfd ever fails, so requests are still served.
const FALLBACK_POLL: Duration = Duration::from_millis(1);

/// Creates the bounded channel workers send [`Request`]s on.
pub fn request_channel(
    capacity: usize,
) -> (
    crossbeam_channel::Sender<Request>,
    crossbeam_channel::Receiver<Request>,
) {
    crossbeam_channel::bounded(capacity)
}

/// Why an upstream attempt failed. Internal to the control side: a request that fails becomes
/// [`Outcome::Failed`]; these are for failover decisions, counters and logs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No answer (or no connection) within the time allowed.
    #[error("{addr}: no answer within {after:?}")]
    Timeout {
        /// The upstream.
        addr: SocketAddr,
        /// The time allowed.
        after: Duration,
    },
    /// The TCP connection closed or reset before the answer came.
    #[error("{addr}: connection closed")]
    Closed {
        /// The upstream.
        addr: SocketAddr,
        /// The connection had carried earlier queries (a possibly stale keepalive).
        reused: bool,
    },
    /// A socket operation failed: refused, unreachable, reset.
    #[error("{addr}: {source}")]
    Io {
        /// The upstream.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Every random ID tried was in flight on the chosen socket or connection.
    #[error("{addr}: no free query ID")]
    IdsExhausted {
        /// The upstream.
        addr: SocketAddr,
    },
}

impl Error {
    /// Whether trying the same upstream again can help: a timeout may have been a lost packet,
    /// and a reused pooled connection that closes is usually a stale keepalive, so it is retried
    /// on a fresh one. Refusals and resets of fresh connections move on to the next upstream.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. } | Self::Closed { reused: true, .. }
        )
    }
}

/// Counters of one upstream address.
///
/// # Threads
///
/// Plain fields, written and read only on the control thread (the control side logs them at
/// teardown; an exporter on the same thread can read them directly).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamStats {
    /// Queries sent, UDP and TCP.
    pub queries: u64,
    /// Attempts that produced the accepted answer.
    pub answers: u64,
    /// Attempts whose slice of the budget passed without an answer.
    pub timeouts: u64,
    /// Attempts that failed outright (refused, reset, closed), plus socket errors seen.
    pub errors: u64,
    /// Datagrams and frames ignored: wrong ID, wrong question, not a response, garbage.
    pub ignored: u64,
    /// UDP answers with TC=1 (or longer than our payload) that were retried over TCP.
    pub truncated: u64,
    /// TCP connections opened.
    pub tcp_connections_opened: u64,
    /// Queries retried on a fresh connection after a reused one closed.
    pub stale_retries: u64,
}

/// Slots of one proxy-duration histogram: the buckets, `+Inf`, then the sum in nanoseconds.
const PROXY_DURATION_SLOTS: usize = DURATION_BUCKETS + 2;

/// How often the control side publishes gauges (pool connections, failures) into
/// [`UpstreamMetrics`].
const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// What the metrics endpoint shows of one upstream address (`coredns_proxy_*`,
/// `ringdns_upstream_pool_connections`).
///
/// # Threads
///
/// Each instance has one writer, with `Relaxed` load + store: the control thread
/// (`ringdns-ctl`) for its own, or the one worker that forwards to the upstream over UDP itself
/// (`crate::worker::upstream`) for that worker's. Shared (`Arc`) with `ringdns-http`, which
/// only reads (`Relaxed`) at scrape time and sums the instances of one address.
#[derive(Debug)]
pub struct UpstreamMetrics {
    /// The upstream.
    addr: SocketAddr,
    /// `[rcode][PROXY_DURATION_SLOTS]`: duration of exchanges that got an answer, by its rcode.
    durations: Box<[AtomicU64]>,
    /// Attempts that timed out or failed (CoreDNS's health-check failures have no equivalent:
    /// ringdns learns an upstream is down from failed queries, not from probes).
    failures: AtomicU64,
    /// Open pooled TCP connections, as last published.
    connections: AtomicU64,
    /// Datagrams and frames ignored: wrong ID or question, not a response, garbage.
    ignored: AtomicU64,
}

impl UpstreamMetrics {
    /// Zeroed series for `addr`.
    pub(crate) fn new(addr: SocketAddr) -> UpstreamMetrics {
        UpstreamMetrics {
            addr,
            durations: (0..RCODE_SLOTS * PROXY_DURATION_SLOTS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            failures: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
        }
    }

    /// The upstream address (label `to`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The duration histogram of answers with `rcode` (0..16; sum in nanoseconds).
    pub fn durations(&self, rcode: usize) -> HistogramCounts {
        let base = rcode * PROXY_DURATION_SLOTS;
        let read = |slot: usize| {
            self.durations
                .get(base + slot)
                .map_or(0, |cell| cell.load(Ordering::Relaxed))
        };
        HistogramCounts {
            buckets: (0..PROXY_DURATION_SLOTS - 1).map(read).collect(),
            sum: read(PROXY_DURATION_SLOTS - 1),
        }
    }

    /// Failed or timed-out attempts so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Open pooled TCP connections (published once a second).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Datagrams and frames ignored so far (wrong ID or question, not a response, garbage).
    pub fn ignored(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }

    /// Records an exchange answered with `rcode` after `elapsed`. Its writer only.
    pub(crate) fn observe(&self, rcode: u8, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let base = usize::from(rcode) % RCODE_SLOTS * PROXY_DURATION_SLOTS;
        add(self.durations.get(base + duration_bucket(nanos)), 1);
        add(self.durations.get(base + PROXY_DURATION_SLOTS - 1), nanos);
    }

    /// Counts one failed attempt. Its writer only.
    pub(crate) fn record_failure(&self) {
        add(Some(&self.failures), 1);
    }

    /// Publishes the number of open pooled connections. Control thread only.
    pub(crate) fn set_connections(&self, open: usize) {
        self.connections.store(open as u64, Ordering::Relaxed);
    }

    /// Counts one ignored datagram. The owning worker only.
    pub(crate) fn record_ignored(&self) {
        add(Some(&self.ignored), 1);
    }

    /// Publishes the ignored datagrams and frames counted so far. Control thread only.
    pub(crate) fn set_ignored(&self, ignored: u64) {
        self.ignored.store(ignored, Ordering::Relaxed);
    }
}

/// Adds `amount` to a single-writer counter with a `Relaxed` load + store.
fn add(cell: Option<&AtomicU64>, amount: u64) {
    if let Some(cell) = cell {
        cell.store(
            cell.load(Ordering::Relaxed).saturating_add(amount),
            Ordering::Relaxed,
        );
    }
}

/// The running control thread's forwarding side.
///
/// # Threads
///
/// Owned by whoever spawned it (the control start-up code); the forwarding state itself lives
/// only on `ringdns-ctl`. Dropping it without [`UpstreamSide::stop`] also stops the thread,
/// without waiting for it.
#[derive(Debug)]
pub struct UpstreamSide {
    /// The `ringdns-ctl` thread.
    thread: JoinHandle<()>,
    /// Fires (or drops) to stop the loop.
    stop: oneshot::Sender<()>,
    /// Each upstream address's series, in config order.
    metrics: Vec<Arc<UpstreamMetrics>>,
    /// Reloaded forward configurations, to `ringdns-ctl` (tokio's channel wakes its runtime).
    reconfigure: tokio::sync::mpsc::UnboundedSender<Reconfigure>,
}

/// A reloaded forward configuration on its way to `ringdns-ctl`.
#[derive(Debug)]
struct Reconfigure {
    /// The new `[[forward]]` zones.
    zones: Vec<ForwardZone>,
    /// `server.udp_payload`.
    udp_payload: u16,
    /// Told the new forwarder's upstream series once it is in place.
    done: std::sync::mpsc::SyncSender<Vec<Arc<UpstreamMetrics>>>,
}

/// Bound on `ringdns-ctl` swapping in a reloaded forwarder (it only builds a value).
const RECONFIGURE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why [`UpstreamSide::reconfigure`] did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ReconfigureError {
    /// `ringdns-ctl` is gone or did not answer in time; the old forwarder (if any) stays.
    #[error("the upstream side did not take the new configuration within {after:?}")]
    NotTaken {
        /// The time allowed.
        after: Duration,
    },
}

impl UpstreamSide {
    /// Spawns the `ringdns-ctl` thread running a current-thread tokio runtime; returns once the
    /// runtime and the eventfd watch are set up.
    pub fn spawn(
        zones: Vec<ForwardZone>,
        udp_payload: u16,
        workers: Vec<WorkerLink>,
        requests: crossbeam_channel::Receiver<Request>,
        wake: Arc<EventFd>,
    ) -> io::Result<UpstreamSide> {
        let (stop, stopped) = oneshot::channel();
        let (reconfigure, reconfigured) = tokio::sync::mpsc::unbounded_channel();
        let (ready, started) =
            std::sync::mpsc::sync_channel::<io::Result<Vec<Arc<UpstreamMetrics>>>>(1);
        let thread = std::thread::Builder::new()
            .name("ringdns-ctl".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    // The one registration helper (its unsafe contract is argued in ring.rs).
                    let registered = crate::worker::ring::async_eventfd(wake);
                    let wake = match registered {
                        Ok(wake) => wake,
                        Err(error) => {
                            let _ = ready.send(Err(error));
                            return;
                        }
                    };
                    let forwarder = Rc::new(Forwarder::new(zones, udp_payload, workers));
                    let _ = ready.send(Ok(forwarder.metrics()));
                    let forwarder = run(forwarder, &requests, &wake, stopped, reconfigured).await;
                    forwarder.wake_workers();
                    report(&forwarder);
                });
            })?;
        match started.recv() {
            Ok(Ok(metrics)) => Ok(UpstreamSide {
                thread,
                stop,
                metrics,
                reconfigure,
            }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("ringdns-ctl exited during start-up"))
            }
        }
    }

    /// Each upstream address's series (for the metrics endpoint), in config order.
    pub fn metrics(&self) -> Vec<Arc<UpstreamMetrics>> {
        self.metrics.clone()
    }

    /// Swaps in a forwarder for `zones` (reload): new requests use it, requests in flight finish
    /// on the old one (their tasks hold it). Waits until it is in place; [`UpstreamSide::metrics`]
    /// then lists the new upstreams.
    pub fn reconfigure(
        &mut self,
        zones: Vec<ForwardZone>,
        udp_payload: u16,
    ) -> Result<(), ReconfigureError> {
        let (done, taken) = std::sync::mpsc::sync_channel(1);
        let not_taken = ReconfigureError::NotTaken {
            after: RECONFIGURE_TIMEOUT,
        };
        let message = Reconfigure {
            zones,
            udp_payload,
            done,
        };
        if self.reconfigure.send(message).is_err() {
            return Err(not_taken);
        }
        match taken.recv_timeout(RECONFIGURE_TIMEOUT) {
            Ok(metrics) => {
                self.metrics = metrics;
                Ok(())
            }
            Err(_) => Err(not_taken),
        }
    }

    /// Stops accepting work, answers nothing more, joins the thread. Requests in flight get no
    /// reply; replies already sent have had their eventfd written.
    pub fn stop(self) {
        // An error means the loop already ended; joining is all that is left.
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            error!("ringdns-ctl panicked; upstream side stopped");
        }
    }
}

/// What woke the control loop.
enum Wake {
    /// Stop was asked for (or the handle dropped).
    Stop,
    /// Replies were sent; write worker eventfds.
    Replies,
    /// Requests may be waiting in the channel.
    Requests,
    /// The eventfd failed; fall back to polling.
    Broken(io::Error),
    /// Time to publish gauges into [`UpstreamMetrics`].
    Publish,
    /// A reloaded configuration to swap in.
    Reconfigure(Reconfigure),
}

/// The control loop: wait for the eventfd, drain requests, flush worker wake-ups, swap in
/// reloaded forwarders, until stop; returns the forwarder in use at the end.
async fn run(
    mut forwarder: Rc<Forwarder>,
    requests: &crossbeam_channel::Receiver<Request>,
    wake: &AsyncFd<crate::worker::ring::WakeFd>,
    mut stopped: oneshot::Receiver<()>,
    mut reconfigured: tokio::sync::mpsc::UnboundedReceiver<Reconfigure>,
) -> Rc<Forwarder> {
    // Drain once at start: requests may predate the eventfd registration.
    let mut backlog = true;
    let mut broken = false;
    let mut publish = tokio::time::interval(PUBLISH_INTERVAL);
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        "upstream side up upstreams={}",
        forwarder.upstream_stats().len()
    );
    loop {
        let wake_up = tokio::select! {
            biased;
            _ = &mut stopped => Wake::Stop,
            () = forwarder.delivery.wake_pending.notified() => Wake::Replies,
            Some(reconfigure) = reconfigured.recv() => Wake::Reconfigure(reconfigure),
            // Before the backlog branch, which is always ready under load and would starve it.
            _ = publish.tick() => Wake::Publish,
            () = tokio::task::yield_now(), if backlog => Wake::Requests,
            () = tokio::time::sleep(FALLBACK_POLL), if broken => Wake::Requests,
            ready = wake.readable(), if !broken => match ready {
                Ok(mut guard) => match guard.get_inner().0.read() {
                    // The counter is now 0: clearing readiness cannot lose a later write, whose
                    // edge the reactor sees on its next poll.
                    Ok(_) | Err(Errno::EAGAIN) => {
                        guard.clear_ready();
                        Wake::Requests
                    }
                    Err(errno) => Wake::Broken(errno.into()),
                },
                Err(error) => Wake::Broken(error),
            },
        };
        match wake_up {
            Wake::Stop => break,
            Wake::Replies => forwarder.wake_workers(),
            Wake::Requests => backlog = drain(&forwarder, requests),
            Wake::Publish => forwarder.publish(),
            Wake::Reconfigure(Reconfigure {
                zones,
                udp_payload,
                done,
            }) => {
                forwarder = Rc::new(forwarder.replacement(zones, udp_payload));
                log::debug!(
                    "upstream side reconfigured upstreams={}",
                    forwarder.upstream_stats().len()
                );
                let _ = done.send(forwarder.metrics());
            }
            Wake::Broken(cause) => {
                error!("control eventfd failed, polling every {FALLBACK_POLL:?} error=\"{cause}\"");
                broken = true;
                backlog = drain(&forwarder, requests);
            }
        }
    }
    forwarder
}

/// Spawns a task per waiting request, at most [`DRAIN_BATCH`]; returns whether more may wait.
fn drain(forwarder: &Rc<Forwarder>, requests: &crossbeam_channel::Receiver<Request>) -> bool {
    for _ in 0..DRAIN_BATCH {
        match requests.try_recv() {
            Ok(request) => {
                tokio::task::spawn_local(Rc::clone(forwarder).serve(request));
            }
            Err(_) => return false,
        }
    }
    true
}

/// Logs the counters at teardown, one line per upstream.
fn report(forwarder: &Forwarder) {
    let totals = forwarder.stats();
    info!(
        "upstream side stopped requests={} timeouts={} no_zone={} bad_requests={} \
         undeliverable={} wake_failures={}",
        totals.requests,
        totals.timeouts,
        totals.no_zone,
        totals.bad_requests,
        totals.undeliverable,
        totals.wake_failures
    );
    for (addr, stats) in forwarder.upstream_stats() {
        info!(
            "upstream stats addr={addr} queries={} answers={} timeouts={} errors={} ignored={} \
             truncated={} tcp_connections_opened={} stale_retries={}",
            stats.queries,
            stats.answers,
            stats.timeouts,
            stats.errors,
            stats.ignored,
            stats.truncated,
            stats.tcp_connections_opened,
            stats.stale_retries
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crossbeam_channel::{Receiver, Sender};
    use nix::sys::eventfd::EfdFlags;

    use super::testutil::{query, wire_name, Responder, TcpMode, UdpMode, GOOD_IP};
    use super::*;
    use crate::config::Transport;

    /// Generous bound on any wait for replies: far above every timeout used here.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A nonblocking eventfd as workers and the control side use.
    fn eventfd() -> Arc<EventFd> {
        Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .expect("eventfd"),
        )
    }

    /// A running upstream side with one fake worker.
    struct Harness {
        /// The side under test (taken by `Drop`).
        side: Option<UpstreamSide>,
        /// The worker's request sender.
        requests: Sender<Request>,
        /// The control eventfd.
        control_wake: Arc<EventFd>,
        /// The worker's reply receiver.
        replies: Receiver<Reply>,
        /// The worker's eventfd.
        worker_wake: Arc<EventFd>,
    }

    impl Harness {
        /// Starts the side with `zones`.
        fn start(zones: Vec<ForwardZone>) -> Self {
            let (requests, receiver) = request_channel(1024);
            let (reply_sender, replies) = crossbeam_channel::unbounded();
            let control_wake = eventfd();
            let worker_wake = eventfd();
            let workers = vec![WorkerLink {
                replies: reply_sender,
                wake: Arc::clone(&worker_wake),
            }];
            let side =
                UpstreamSide::spawn(zones, 1232, workers, receiver, Arc::clone(&control_wake))
                    .expect("spawn upstream side");
            Self {
                side: Some(side),
                requests,
                control_wake,
                replies,
                worker_wake,
            }
        }

        /// Sends one request like a worker batch of one: push, then wake.
        fn send(&self, token: u64, query: Vec<u8>) {
            self.requests
                .send(Request {
                    worker: 0,
                    token,
                    query,
                    via: Via::Zone,
                })
                .expect("channel open");
            self.control_wake.write(1).expect("wake control");
        }

        /// Collects `count` replies, waiting at most [`PATIENCE`] in all.
        fn collect(&self, count: usize) -> Vec<Reply> {
            let deadline = Instant::now() + PATIENCE;
            let mut out = Vec::new();
            while out.len() < count {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.replies.recv_timeout(left) {
                    Ok(reply) => out.push(reply),
                    Err(_) => break,
                }
            }
            out
        }

        /// Collects one reply.
        fn one(&self) -> Reply {
            self.collect(1)
                .pop()
                .expect("a reply within the patience bound")
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            if let Some(side) = self.side.take() {
                side.stop();
            }
        }
    }

    /// A zone forwarding to `upstreams`.
    fn zone(
        name: &str,
        upstreams: &[SocketAddr],
        transport: Transport,
        timeout: Duration,
    ) -> ForwardZone {
        ForwardZone {
            zone: name.to_owned(),
            upstreams: upstreams.to_vec(),
            transport,
            timeout,
        }
    }

    /// The answer bytes of `reply`, or a panic naming what came instead.
    fn answer_of(reply: &Reply) -> &[u8] {
        match &reply.outcome {
            Outcome::Answer(answer) => answer,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    /// Asserts `answer` is a complete genuine answer for `name`.
    fn assert_genuine(answer: &[u8], name: &str) {
        assert_eq!(&answer[..2], &[0, 0], "ID restored to 0");
        assert!(route::is_response(answer));
        assert!(!route::is_truncated(answer));
        assert_eq!(&answer[6..8], &[0, 1], "one answer record");
        assert!(answer.ends_with(&GOOD_IP), "genuine record, not a decoy");
        let question = route::parse_question(&query(name)).expect("valid query");
        assert!(route::question_matches(answer, &question));
    }

    /// An address on which a UDP socket is bound but never read (kept alive by the caller).
    fn black_hole() -> (std::net::UdpSocket, SocketAddr) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = socket.local_addr().expect("local addr");
        (socket, addr)
    }

    #[test]
    fn reconfigure_serves_new_requests_and_lets_old_ones_finish() {
        let (_hole, hole) = black_hole();
        let responder = Responder::start(UdpMode::Answer, TcpMode::Answer);
        let mut harness = Harness::start(vec![zone(
            ".",
            &[hole],
            Transport::Udp,
            Duration::from_millis(500),
        )]);
        // In flight on the old forwarder: its only upstream never answers.
        harness.send(1, query("old.example.com."));
        std::thread::sleep(Duration::from_millis(50));
        let side = harness.side.as_mut().expect("running");
        side.reconfigure(
            vec![zone(
                ".",
                &[responder.addr()],
                Transport::Udp,
                Duration::from_secs(2),
            )],
            1232,
        )
        .expect("reconfigured");
        let listed: Vec<SocketAddr> = side.metrics().iter().map(|m| m.addr()).collect();
        assert_eq!(listed, vec![responder.addr()]);
        harness.send(2, query("new.example.com."));
        let mut replies = harness.collect(2);
        replies.sort_by_key(|reply| reply.token);
        assert_eq!(replies.len(), 2, "both requests answered exactly once");
        assert!(matches!(
            replies[0].outcome,
            Outcome::Failed(Failure::Timeout)
        ));
        assert_genuine(answer_of(&replies[1]), "new.example.com.");
        assert_eq!(responder.udp_queries(), 1);
    }

    #[test]
    fn udp_answer_round_trip_restores_id_zero() {
        let responder = Responder::start(UdpMode::Answer, TcpMode::Answer);
        let harness = Harness::start(vec![zone(
            ".",
            &[responder.addr()],
            Transport::Udp,
            Duration::from_secs(2),
        )]);
        harness.send(7, query("www.example.com."));
        let reply = harness.one();
        assert_eq!(reply.token, 7);
        assert_genuine(answer_of(&reply), "www.example.com.");
        // The reply is queued before the wake-up is written (once per pass): wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let woken = loop {
            match harness.worker_wake.read() {
                Ok(count) => break count,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(error) => panic!("worker was not woken: {error}"),
            }
        };
        assert!(woken >= 1);
        assert_eq!(responder.udp_queries(), 1);
        assert_eq!(responder.accepts(), 0);
    }

    #[test]
    fn truncated_udp_answer_is_retried_over_tcp() {
        let responder = Responder::start(UdpMode::Truncate, TcpMode::Answer);
        let harness = Harness::start(vec![zone(
            ".",
            &[responder.addr()],
            Transport::Udp,
            Duration::from_secs(2),
        )]);
        harness.send(1, query("big.example."));
        let reply = harness.one();
        assert_genuine(answer_of(&reply), "big.example.");
        assert_eq!(responder.udp_queries(), 1);
        assert_eq!(responder.accepts(), 1);
    }

    #[test]
    fn tcp_transport_pipelines_many_requests_over_few_connections() {
        let responder = Responder::start(UdpMode::Answer, TcpMode::Answer);
        let harness = Harness::start(vec![zone(
            ".",
            &[responder.addr()],
            Transport::Tcp,
            Duration::from_secs(5),
        )]);
        let count = 200u64;
        for token in 0..count {
            harness
                .requests
                .send(Request {
                    worker: 0,
                    token,
                    query: query(&format!("q{token}.example.")),
                    via: Via::Zone,
                })
                .expect("channel open");
        }
        harness.control_wake.write(1).expect("wake control");
        let replies = harness.collect(200);
        assert_eq!(replies.len(), 200, "every request got a reply");
        let mut tokens: Vec<u64> = replies.iter().map(|r| r.token).collect();
        tokens.sort_unstable();
        tokens.dedup();
        assert_eq!(tokens.len(), 200, "exactly one reply per request");
        for reply in &replies {
            assert_genuine(answer_of(reply), &format!("q{}.example.", reply.token));
        }
        assert!(responder.accepts() >= 1);
        assert!(
            responder.accepts() <= pool::MAX_CONNECTIONS,
            "accepts={}",
            responder.accepts()
        );
        assert_eq!(responder.udp_queries(), 0);
    }

    #[test]
    fn decoy_udp_answers_are_ignored() {
        let responder = Responder::start(UdpMode::DecoysFirst, TcpMode::Answer);
        let harness = Harness::start(vec![zone(
            ".",
            &[responder.addr()],
            Transport::Udp,
            Duration::from_secs(2),
        )]);
        harness.send(3, query("www.example.com."));
        let reply = harness.one();
        assert_genuine(answer_of(&reply), "www.example.com.");
        // The qname came back upper-cased: bytes are the upstream's, only the ID is rewritten.
        let upper = wire_name("WWW.EXAMPLE.COM.");
        assert!(answer_of(&reply).windows(upper.len()).any(|w| w == upper));
    }

    #[test]
    fn decoy_tcp_answers_are_ignored() {
        let responder = Responder::start(UdpMode::Answer, TcpMode::DecoysFirst);
        let harness = Harness::start(vec![zone(
            ".",
            &[responder.addr()],
            Transport::Tcp,
            Duration::from_secs(2),
        )]);
        harness.send(3, query("www.example.com."));
        let reply = harness.one();
        assert_genuine(answer_of(&reply), "www.example.com.");
    }

    #[test]
    fn dead_upstream_times_out() {
        let (_socket, dead) = black_hole();
        let timeout = Duration::from_millis(500);
        let harness = Harness::start(vec![zone(".", &[dead], Transport::Udp, timeout)]);
        let started = Instant::now();
        harness.send(9, query("www.example.com."));
        let reply = harness.one();
        assert_eq!(reply.token, 9);
        assert!(
            matches!(reply.outcome, Outcome::Failed(Failure::Timeout)),
            "{:?}",
            reply.outcome
        );
        assert!(started.elapsed() < timeout + Duration::from_secs(3));
    }

    /// Datagrams waiting on `socket` (read without blocking).
    fn datagrams_waiting(socket: &std::net::UdpSocket) -> usize {
        socket.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 1500];
        std::iter::from_fn(|| socket.recv(&mut buf).ok()).count()
    }

    #[test]
    fn udp_copies_go_again_only_within_their_slice() {
        let (first_hole, first) = black_hole();
        let (second_hole, second) = black_hole();
        // 2 s over two upstreams: 1 s slices. The first upstream gets its query at 0 and
        // copies at 250 and 750 ms; the one due at 1.75 s would fall in the second's slice.
        let harness = Harness::start(vec![zone(
            ".",
            &[first, second],
            Transport::Udp,
            Duration::from_secs(2),
        )]);
        harness.send(1, query("lost.example."));
        let reply = harness.one();
        assert!(matches!(reply.outcome, Outcome::Failed(Failure::Timeout)));
        assert_eq!(
            datagrams_waiting(&first_hole),
            3,
            "query and two copies, in its slice"
        );
        assert_eq!(datagrams_waiting(&second_hole), 3, "1.0 s, 1.25 s, 1.75 s");
    }

    #[test]
    fn second_upstream_answers_when_first_is_dead() {
        let (_socket, dead) = black_hole();
        let responder = Responder::start(UdpMode::Answer, TcpMode::Answer);
        let harness = Harness::start(vec![zone(
            ".",
            &[dead, responder.addr()],
            Transport::Udp,
            Duration::from_secs(2),
        )]);
        harness.send(1, query("www.example.com."));
        assert_genuine(answer_of(&harness.one()), "www.example.com.");
        // The live upstream is now first in line.
        harness.send(2, query("www.example.org."));
        assert_genuine(answer_of(&harness.one()), "www.example.org.");
        assert_eq!(responder.udp_queries(), 2);
    }

    #[test]
    fn refused_upstream_hands_over_at_once() {
        let closed = black_hole().1;
        let responder = Responder::start(UdpMode::Answer, TcpMode::Answer);
        // A 20 s budget gives each upstream a 10 s slice: only an immediate hand-over on port
        // unreachable answers well before that.
        let harness = Harness::start(vec![zone(
            ".",
            &[closed, responder.addr()],
            Transport::Udp,
            Duration::from_secs(20),
        )]);
        let started = Instant::now();
        harness.send(1, query("www.example.com."));
        assert_genuine(answer_of(&harness.one()), "www.example.com.");
        assert!(started.elapsed() < Duration::from_secs(9));
    }

    #[test]
    fn prefer_udp_falls_back_to_tcp_when_udp_is_silent() {
        let responder = Responder::start(UdpMode::Silent, TcpMode::Answer);
        let harness = Harness::start(vec![zone(
            ".",
            &[responder.addr()],
            Transport::PreferUdp,
            Duration::from_secs(2),
        )]);
        harness.send(1, query("www.example.com."));
        assert_genuine(answer_of(&harness.one()), "www.example.com.");
        assert_eq!(responder.accepts(), 1);
    }

    #[test]
    fn prefer_udp_retries_truncated_answers_over_tcp() {
        let responder = Responder::start(UdpMode::Truncate, TcpMode::Answer);
        let harness = Harness::start(vec![zone(
            ".",
            &[responder.addr()],
            Transport::PreferUdp,
            Duration::from_secs(2),
        )]);
        harness.send(1, query("big.example."));
        assert_genuine(answer_of(&harness.one()), "big.example.");
        assert_eq!(responder.accepts(), 1);
    }

    #[test]
    fn routing_picks_the_longest_zone_and_reports_no_zone() {
        let cluster = Responder::start(UdpMode::Answer, TcpMode::Answer);
        let (_socket, dead) = black_hole();
        let harness = Harness::start(vec![
            zone(
                "local.",
                &[dead],
                Transport::Udp,
                Duration::from_millis(300),
            ),
            zone(
                "cluster.local.",
                &[cluster.addr()],
                Transport::Udp,
                Duration::from_secs(2),
            ),
        ]);
        harness.send(1, query("kube-dns.kube-system.svc.cluster.local."));
        assert_genuine(
            answer_of(&harness.one()),
            "kube-dns.kube-system.svc.cluster.local.",
        );
        harness.send(2, query("www.example.com."));
        let reply = harness.one();
        assert!(
            matches!(reply.outcome, Outcome::Failed(Failure::NoZone)),
            "{:?}",
            reply.outcome
        );
        harness.send(3, query("xcluster.local."));
        let reply = harness.one();
        assert!(
            matches!(reply.outcome, Outcome::Failed(Failure::Timeout)),
            "{:?}",
            reply.outcome
        );
        assert_eq!(cluster.udp_queries(), 1);
    }

    #[test]
    fn unparseable_request_is_a_bad_request() {
        let harness = Harness::start(vec![zone(
            ".",
            &[black_hole().1],
            Transport::Udp,
            Duration::from_secs(1),
        )]);
        harness.send(1, vec![0, 0, 1]);
        let mut compressed = vec![0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 0x0C];
        compressed.extend([0, 1, 0, 1]);
        harness.send(2, compressed);
        for reply in harness.collect(2) {
            assert!(
                matches!(reply.outcome, Outcome::Failed(Failure::BadRequest)),
                "{:?}",
                reply.outcome
            );
        }
    }

    #[test]
    fn stop_joins_promptly_with_requests_in_flight() {
        let (_socket, dead) = black_hole();
        let mut harness = Harness::start(vec![zone(
            ".",
            &[dead],
            Transport::Udp,
            Duration::from_secs(30),
        )]);
        harness.send(1, query("slow.example."));
        let side = harness.side.take().expect("running");
        let started = Instant::now();
        side.stop();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(harness.replies.try_recv().is_err(), "no reply after stop");
    }

    #[test]
    fn error_retryability() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 53));
        assert!(Error::Timeout {
            addr,
            after: Duration::from_secs(1)
        }
        .is_retryable());
        assert!(Error::Closed { addr, reused: true }.is_retryable());
        assert!(!Error::Closed {
            addr,
            reused: false
        }
        .is_retryable());
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(!Error::Io {
            addr,
            source: refused
        }
        .is_retryable());
    }
}
