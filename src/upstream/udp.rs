//! UDP to one upstream: a small rotating set of connected sockets, answers demultiplexed by ID.
//!
//! Runs on: control thread (`ringdns-ctl`), inside its `LocalSet`.
//!
//! Spoofing resistance follows RFC 5452 §4 and §9: every query gets a random ID on a socket bound
//! to a random ephemeral port, the socket is `connect()`ed so the kernel drops datagrams from any
//! other source, and an answer must carry an in-flight ID *and* the query's question. Anything
//! else is counted and ignored while the query keeps waiting. A socket is retired after
//! [`QUERIES_PER_SOCKET`] queries so source ports keep rotating.
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Notify;

use super::inflight::{AnswerReceiver, InFlight};
use super::route::{self, Question};
use super::{Error, UpstreamStats};

/// Sockets kept per upstream; each query picks one at random, so an off-path attacker must
/// guess the port as well as the ID (RFC 5452 §9.2).
pub(crate) const SOCKETS_PER_UPSTREAM: usize = 8;

/// Queries sent on one socket before it is replaced by one on a new random port.
pub(crate) const QUERIES_PER_SOCKET: u64 = 10_000;

/// An unanswered UDP query is sent again (same socket, same ID: whichever copy is answered
/// first counts) after [`Retransmit::timeout`], never sooner than this, then after twice as
/// long, and so on while its upstream's slice of the budget lasts. A datagram lost on the way,
/// say to an upstream's full receive buffer in a burst of misses, then costs this much instead
/// of the whole slice and a SERVFAIL. (Unbound starts an unknown server at 376 ms; a node's
/// upstreams are close by.)
pub(crate) const RETRANSMIT_AFTER: Duration = Duration::from_millis(250);

/// Longest the retransmission timeout grows by backing off (RFC 6298 §5.5); a query's budget
/// (the zone's timeout) ends sooner anyway.
const RETRANSMIT_MAX: Duration = Duration::from_secs(4);

/// How long the ID of a query that went out more than once is remembered on its socket after
/// the query ended, so that the answer to its other copy is recognised as an echo rather than
/// counted as a stray (possibly spoofed) datagram.
pub(crate) const ECHO_WINDOW: Duration = Duration::from_secs(2);

/// IDs remembered per socket as echoes at most (the oldest are forgotten first).
const ECHOES_MAX: usize = 1024;

/// When to send an unanswered query to one upstream again: RFC 6298's estimator over the
/// upstream's answer times (smoothed RTT plus four deviations, §2), never below
/// [`RETRANSMIT_AFTER`], with Karn's algorithm (§5.5–5.7): only queries sent once give samples
/// (an answer to a query sent twice could be to either copy), and a retransmission doubles the
/// timeout until the next sample. So an upstream slower than the current timeout is sent a
/// duplicate once, after which the timeout has grown past its answer time and samples resume:
/// an upstream that is slow by nature (a recursive resolver) is not sent duplicates of most
/// queries.
///
/// # Threads
///
/// Owned by whoever queries the upstream (`ringdns-ctl`, or one worker); not shared.
#[derive(Debug, Default)]
pub(crate) struct Retransmit {
    /// Smoothed answer time; `None` before the first sample.
    srtt: Cell<Option<Duration>>,
    /// Its mean deviation.
    rttvar: Cell<Duration>,
    /// The timeout as backed off by retransmissions since the last sample (`None`: none).
    backed_off: Cell<Option<Duration>>,
}

impl Retransmit {
    /// Records the answer time of a query that was sent once, and drops any back-off.
    pub(crate) fn observe(&self, rtt: Duration) {
        self.backed_off.set(None);
        match self.srtt.get() {
            None => {
                self.srtt.set(Some(rtt));
                self.rttvar.set(rtt / 2);
            }
            Some(srtt) => {
                let deviation = srtt.abs_diff(rtt);
                self.rttvar.set(self.rttvar.get() * 3 / 4 + deviation / 4);
                self.srtt.set(Some(srtt * 7 / 8 + rtt / 8));
            }
        }
    }

    /// How long to wait before the first retransmission of a query sent now.
    pub(crate) fn timeout(&self) -> Duration {
        if let Some(backed_off) = self.backed_off.get() {
            return backed_off;
        }
        self.srtt.get().map_or(RETRANSMIT_AFTER, |srtt| {
            (srtt + self.rttvar.get() * 4).max(RETRANSMIT_AFTER)
        })
    }

    /// A query sent with timeout `used` went again: the timeout doubles (once for all queries
    /// sent with the same timeout, so that many queries in flight do not compound it).
    pub(crate) fn backed_off(&self, used: Duration) {
        if self.timeout() <= used {
            self.backed_off
                .set(Some(used.saturating_mul(2).min(RETRANSMIT_MAX)));
        }
    }
}

/// IDs of ended queries that went out more than once, remembered for [`ECHO_WINDOW`]: the
/// answer to the other copy is an echo, not a stray datagram.
#[derive(Debug, Default)]
pub(crate) struct Echoes {
    /// (ID, forgotten after), oldest first.
    ids: std::collections::VecDeque<(u16, std::time::Instant)>,
}

impl Echoes {
    /// Remembers `id` from `now` on.
    pub(crate) fn remember(&mut self, id: u16, now: std::time::Instant) {
        if self.ids.len() >= ECHOES_MAX {
            self.ids.pop_front();
        }
        self.ids.push_back((id, now + ECHO_WINDOW));
    }

    /// Whether `id` is a remembered echo at `now` (forgetting the expired ones).
    pub(crate) fn is_echo(&mut self, id: u16, now: std::time::Instant) -> bool {
        while self.ids.front().is_some_and(|&(_, until)| until <= now) {
            self.ids.pop_front();
        }
        self.ids.iter().any(|&(echo, _)| echo == id)
    }
}

/// Consecutive receive errors (ICMP reports) after which a socket is retired, so a persistently
/// failing socket cannot spin its reader.
pub(crate) const MAX_CONSECUTIVE_ERRORS: u32 = 64;

/// The UDP sockets of one upstream address.
#[derive(Debug)]
pub(crate) struct UdpSet {
    /// The upstream every socket is connected to.
    addr: SocketAddr,
    /// Answers longer than this are treated as truncated (our advertised EDNS payload, at least
    /// the classic 512 octets of RFC 1035 §4.2.1).
    payload_limit: usize,
    /// Queries per socket before rotation.
    rotate_after: u64,
    /// Socket slots, filled lazily; `None` or a retired socket is replaced when picked.
    slots: RefCell<Vec<Option<Rc<Slot>>>>,
    /// The upstream's counters.
    stats: Rc<RefCell<UpstreamStats>>,
    /// When to send an unanswered query again.
    retransmit: Retransmit,
}

impl UdpSet {
    /// An empty set for `addr`; sockets are opened on first use.
    pub(crate) fn new(
        addr: SocketAddr,
        udp_payload: u16,
        rotate_after: u64,
        stats: Rc<RefCell<UpstreamStats>>,
    ) -> Self {
        Self {
            addr,
            payload_limit: usize::from(udp_payload).max(512),
            rotate_after: rotate_after.max(1),
            slots: RefCell::new(vec![None; SOCKETS_PER_UPSTREAM]),
            stats,
            retransmit: Retransmit::default(),
        }
    }

    /// Sends `query` (its ID is replaced) and waits for the matching answer, which still has the
    /// upstream's ID. Waits until an answer or a socket error arrives; the caller bounds the wait.
    ///
    /// An unanswered query is sent again ([`Retransmit`]) until `resend_until` (the end of the
    /// attempt's slice, or of the time UDP has alone): after that only the copies already sent
    /// may still be answered.
    pub(crate) async fn exchange(
        &self,
        query: &[u8],
        question: &Question,
        resend_until: tokio::time::Instant,
    ) -> Result<Vec<u8>, Error> {
        let slot = self.pick()?;
        let (id, seq, answer) = slot.register(question)?;
        let mut registration = Registration {
            slot: &slot,
            id,
            seq,
            resent: false,
        };
        let sent = match try_send_with_id(&slot.socket, query, id) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                let mut packet = query.to_vec();
                route::set_id(&mut packet, id);
                slot.socket.send(&packet).await.map(drop)
            }
            other => other,
        };
        if let Err(error) = &sent {
            // An error pending on the connected socket (an ICMP report such as port
            // unreachable) goes to whichever call comes first: a send that takes it speaks for
            // every query on the socket, which would otherwise wait out their slices.
            slot.fail_all(error.kind());
        }
        sent.map_err(|source| Error::Io {
            addr: self.addr,
            source,
        })?;
        self.stats.borrow_mut().queries += 1;
        slot.sent.set(slot.sent.get() + 1);
        if slot.sent.get() >= self.rotate_after {
            self.retire(&slot);
        }
        tokio::pin!(answer);
        let sent_at = tokio::time::Instant::now();
        let timeout = self.retransmit.timeout();
        let mut next_copy = sent_at + timeout;
        let mut backoff = timeout.saturating_mul(2);
        loop {
            tokio::select! {
                result = &mut answer => return match result {
                    Ok(result) => {
                        if !registration.resent && result.is_ok() {
                            self.retransmit.observe(sent_at.elapsed());
                        }
                        result
                    }
                    // The reader only drops a waiter by answering or failing it; this is
                    // unreachable in practice, but a closed socket is the honest description.
                    Err(_) => Err(Error::Closed {
                        addr: self.addr,
                        reused: false,
                    }),
                },
                () = tokio::time::sleep_until(next_copy), if next_copy < resend_until => {
                    match try_send_with_id(&slot.socket, query, id) {
                        Ok(()) => {
                            self.stats.borrow_mut().queries += 1;
                            if !registration.resent {
                                self.retransmit.backed_off(timeout);
                            }
                            registration.resent = true;
                        }
                        // A full socket buffer skips this copy; the next one may go.
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                        // As for the first copy: a pending ICMP error speaks for the socket.
                        Err(error) => slot.fail_all(error.kind()),
                    }
                    next_copy += backoff;
                    backoff = backoff.saturating_mul(2);
                }
            }
        }
    }

    /// The local ports of the live sockets (for tests of port rotation).
    #[cfg(test)]
    pub(crate) fn local_ports(&self) -> Vec<u16> {
        self.slots
            .borrow()
            .iter()
            .flatten()
            .filter_map(|slot| slot.socket.local_addr().ok())
            .map(|addr| addr.port())
            .collect()
    }

    /// A random live socket, opening one in the chosen slot if it is empty.
    fn pick(&self) -> Result<Rc<Slot>, Error> {
        let index = rand::random_range(0..SOCKETS_PER_UPSTREAM);
        if let Some(Some(slot)) = self.slots.borrow().get(index) {
            if !slot.retired.get() {
                return Ok(Rc::clone(slot));
            }
        }
        let slot = self.open().map_err(|source| Error::Io {
            addr: self.addr,
            source,
        })?;
        if let Some(entry) = self.slots.borrow_mut().get_mut(index) {
            *entry = Some(Rc::clone(&slot));
        }
        tokio::task::spawn_local(read_answers(Rc::clone(&slot)));
        Ok(slot)
    }

    /// Binds a socket to a random ephemeral port of the upstream's family and connects it.
    fn open(&self) -> io::Result<Rc<Slot>> {
        let local: SocketAddr = if self.addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(local)?;
        socket.connect(self.addr)?;
        socket.set_nonblocking(true)?;
        Ok(Rc::new(Slot {
            socket: UdpSocket::from_std(socket)?,
            addr: self.addr,
            payload_limit: self.payload_limit,
            inflight: InFlight::new(),
            sent: Cell::new(0),
            retired: Cell::new(false),
            done: Notify::new(),
            echoes: RefCell::new(Echoes::default()),
            stats: Rc::clone(&self.stats),
        }))
    }

    /// Takes `slot` out of rotation; its reader stays until its last in-flight query ends.
    fn retire(&self, slot: &Rc<Slot>) {
        slot.retired.set(true);
        for entry in self.slots.borrow_mut().iter_mut() {
            if entry.as_ref().is_some_and(|live| Rc::ptr_eq(live, slot)) {
                *entry = None;
            }
        }
    }
}

/// Queries up to this long are sent from a stack copy (a worker's query is at most a header,
/// a 255-octet name, type, class and an OPT record); longer ones take the allocating path.
const STACK_QUERY: usize = 512;

/// Sends `query` with its ID set to `id` without waiting and without allocating; `WouldBlock`
/// when the socket buffer is full (or the query is longer than [`STACK_QUERY`]): then the
/// caller sends an owned copy and waits for the socket.
fn try_send_with_id(socket: &UdpSocket, query: &[u8], id: u16) -> io::Result<()> {
    let mut buf = [0u8; STACK_QUERY];
    let Some(packet) = buf.get_mut(..query.len()) else {
        return Err(io::ErrorKind::WouldBlock.into());
    };
    packet.copy_from_slice(query);
    route::set_id(packet, id);
    socket.try_send(packet).map(drop)
}

/// One connected socket and the queries in flight on it.
#[derive(Debug)]
struct Slot {
    /// Bound to a random port, connected to `addr`.
    socket: UdpSocket,
    /// The upstream.
    addr: SocketAddr,
    /// Longer datagrams are cut by our buffer and handed on marked TC=1.
    payload_limit: usize,
    /// In-flight queries by ID.
    inflight: InFlight<()>,
    /// Queries sent so far.
    sent: Cell<u64>,
    /// No longer picked for new queries.
    retired: Cell<bool>,
    /// Tells the reader to exit (retired and idle).
    done: Notify,
    /// IDs of ended queries that went out more than once.
    echoes: RefCell<Echoes>,
    /// The upstream's counters.
    stats: Rc<RefCell<UpstreamStats>>,
}

impl Slot {
    /// Registers a waiter for `question` under a random ID not in flight on this socket.
    fn register(&self, question: &Question) -> Result<(u16, u64, AnswerReceiver), Error> {
        self.inflight
            .register(question, ())
            .ok_or(Error::IdsExhausted { addr: self.addr })
    }

    /// Hands a received datagram to its waiter if ID and question match; otherwise counts it.
    fn dispatch(&self, datagram: &[u8]) {
        let Some(waiter) = self.inflight.take_answered(datagram) else {
            let echo = route::message_id(datagram).is_some_and(|id| {
                self.echoes
                    .borrow_mut()
                    .is_echo(id, std::time::Instant::now())
            });
            if !echo {
                self.stats.borrow_mut().ignored += 1;
            }
            return;
        };
        let mut answer = datagram.to_vec();
        if datagram.len() > self.payload_limit {
            // The upstream sent more than we advertised and our buffer cut it: only TCP can
            // fetch the whole answer.
            route::mark_truncated(&mut answer);
        }
        // A dropped receiver means the query was abandoned; nothing to do.
        let _ = waiter.answer.send(Ok(answer));
    }

    /// Fails every in-flight query with a receive error (an ICMP report such as port
    /// unreachable: it concerns the one upstream all of them were sent to).
    fn fail_all(&self, kind: io::ErrorKind) {
        for waiter in self.inflight.drain() {
            let _ = waiter.answer.send(Err(Error::Io {
                addr: self.addr,
                source: io::Error::from(kind),
            }));
        }
    }
}

/// Removes a query's waiter when the query ends for any reason, and lets a retired socket's
/// reader exit once nothing is in flight.
struct Registration<'a> {
    /// The socket.
    slot: &'a Rc<Slot>,
    /// The query's ID.
    id: u16,
    /// The registration's sequence number.
    seq: u64,
    /// The query went out more than once (its ID is then remembered as an echo).
    resent: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.slot.inflight.release(self.id, self.seq);
        if self.resent {
            self.slot
                .echoes
                .borrow_mut()
                .remember(self.id, std::time::Instant::now());
        }
        if self.slot.retired.get() && self.slot.inflight.is_empty() {
            self.slot.done.notify_one();
        }
    }
}

/// Reads datagrams for one socket until it is retired and idle, or keeps failing.
async fn read_answers(slot: Rc<Slot>) {
    let mut buf = vec![0u8; slot.payload_limit + 1];
    let mut errors = 0u32;
    loop {
        tokio::select! {
            received = slot.socket.recv(&mut buf) => match received {
                Ok(len) => {
                    errors = 0;
                    slot.dispatch(buf.get(..len).unwrap_or_default());
                }
                Err(error) => {
                    slot.stats.borrow_mut().errors += 1;
                    slot.fail_all(error.kind());
                    errors += 1;
                    if errors >= MAX_CONSECUTIVE_ERRORS {
                        // `pick` replaces a retired slot; its waiters were just failed.
                        slot.retired.set(true);
                        break;
                    }
                }
            },
            () = slot.done.notified() => {
                if slot.inflight.is_empty() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// `set.exchange` (copies sent again for up to 5 s), given up after 5 s.
    async fn exchange_within_5s(
        set: &UdpSet,
        wire: &[u8],
        question: &Question,
    ) -> Result<Result<Vec<u8>, Error>, tokio::time::error::Elapsed> {
        let limit = Duration::from_secs(5);
        let resend_until = tokio::time::Instant::now() + limit;
        tokio::time::timeout(limit, set.exchange(wire, question, resend_until)).await
    }

    #[test]
    fn retransmission_waits_longer_for_a_slow_upstream_never_less_than_the_floor() {
        let timer = Retransmit::default();
        assert_eq!(timer.timeout(), RETRANSMIT_AFTER, "before any answer");
        for _ in 0..20 {
            timer.observe(Duration::from_millis(1));
        }
        assert_eq!(
            timer.timeout(),
            RETRANSMIT_AFTER,
            "a near upstream: the floor"
        );
        for _ in 0..50 {
            timer.observe(Duration::from_millis(400));
        }
        let slow = timer.timeout();
        assert!(
            slow >= Duration::from_millis(400) && slow < Duration::from_secs(1),
            "{slow:?}"
        );
    }
    use crate::upstream::testutil::{query, Responder, TcpMode, UdpMode};

    /// Runs `future` on a current-thread runtime inside a `LocalSet`.
    fn run_local<F: std::future::Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test runtime");
        tokio::task::LocalSet::new().block_on(&runtime, future)
    }

    #[test]
    fn sockets_rotate_after_their_query_budget() {
        let responder = Responder::start(UdpMode::Answer, TcpMode::Answer);
        let stats = Rc::new(RefCell::new(UpstreamStats::default()));
        let set = UdpSet::new(responder.addr(), 1232, 1, Rc::clone(&stats));
        let wire = query("rotate.example.");
        let question = route::parse_question(&wire).expect("valid query");
        run_local(async {
            for _ in 0..6 {
                let answer = exchange_within_5s(&set, &wire, &question)
                    .await
                    .expect("answer in time")
                    .expect("answer");
                assert!(route::question_matches(&answer, &question));
            }
            assert!(
                set.local_ports().is_empty(),
                "retired sockets leave the set"
            );
        });
        let mut ports: Vec<u16> = responder.udp_sources().iter().map(|a| a.port()).collect();
        assert_eq!(ports.len(), 6);
        ports.sort_unstable();
        ports.dedup();
        // Each query used a new socket; the kernel picks ports at random and may repeat one.
        assert!(
            ports.len() >= 5,
            "queries came from new source ports: {ports:?}"
        );
        assert_eq!(stats.borrow().queries, 6);
    }

    #[test]
    fn sockets_are_reused_within_their_budget() {
        let responder = Responder::start(UdpMode::Answer, TcpMode::Answer);
        let stats = Rc::new(RefCell::new(UpstreamStats::default()));
        let set = UdpSet::new(responder.addr(), 1232, QUERIES_PER_SOCKET, stats);
        let wire = query("reuse.example.");
        let question = route::parse_question(&wire).expect("valid query");
        run_local(async {
            for _ in 0..64 {
                let answer = exchange_within_5s(&set, &wire, &question)
                    .await
                    .expect("answer in time")
                    .expect("answer");
                assert!(route::question_matches(&answer, &question));
            }
            assert!(set.local_ports().len() <= SOCKETS_PER_UPSTREAM);
        });
        let mut ports: Vec<u16> = responder.udp_sources().iter().map(|a| a.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert!(ports.len() <= SOCKETS_PER_UPSTREAM, "{ports:?}");
        assert!(
            ports.len() > 1,
            "queries spread over several sockets: {ports:?}"
        );
    }

    #[test]
    fn refused_port_fails_the_query() {
        let closed = {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket.local_addr().expect("local addr")
        };
        let stats = Rc::new(RefCell::new(UpstreamStats::default()));
        let set = UdpSet::new(closed, 1232, QUERIES_PER_SOCKET, stats);
        let wire = query("refused.example.");
        let question = route::parse_question(&wire).expect("valid query");
        let result = run_local(async { exchange_within_5s(&set, &wire, &question).await });
        match result {
            Ok(Err(Error::Io { source, .. })) => {
                assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused)
            }
            other => panic!("expected a refused error, got {other:?}"),
        }
    }
}
