//! The generator loop: per-socket in-flight tables keyed by DNS ID, closed-loop or paced
//! sending, `sendmmsg`/`recvmmsg` batches, and the counters and histogram of one run.
//!
//! Runs on: generator threads; each owns one run's sockets, tables and counts and shares nothing.

#![forbid(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::socket::{setsockopt, sockopt};

use crate::histogram::Histogram;
use crate::queries::QuerySet;
use crate::sys::{epoll_wait_precise, Batch};
use crate::table::{Answer, InFlight};

/// Most queries in flight per socket: one per DNS ID.
const IDS_PER_SOCKET: usize = 1 << 16;
/// Receive slot size. Only the header and question of an answer are read, so a longer answer
/// being cut short (`MSG_TRUNC`) does not matter.
const ANSWER_BUFFER_BYTES: usize = 2048;
/// Receive buffer asked for on each client socket, so answers queue at the client rather than
/// being dropped there when it falls behind (capped by `net.core.rmem_max` unless root).
const CLIENT_RCVBUF_BYTES: usize = 4 << 20;

/// How the loop waits when a pass found nothing to receive and nothing to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Poll every socket again at once: burns the client core but puts no wake-up cost on the
    /// server (no sleeper on the client sockets' wait queues). The saturating default.
    Busy,
    /// Sleep in `epoll_pwait2` until a socket is readable or the next deadline (paced send,
    /// timeout sweep, end). The paced default: leaves the core to others (e.g. an upstream
    /// pinned with the client), at the price of an epoll callback per answer on the server side.
    Epoll,
}

/// What one generator thread does.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Server to query; the client sockets are connected to it.
    pub server: SocketAddr,
    /// Number of client sockets (source ports).
    pub sockets: usize,
    /// Queries outstanding across all sockets: the target in closed loop, a safety cap when paced.
    pub inflight: usize,
    /// Stop sending after this long.
    pub duration: Duration,
    /// Stop sending after this many queries (sent plus skipped).
    pub max_queries: u64,
    /// An answer later than this is late; unanswered queries are given up after it.
    pub timeout: Duration,
    /// `Some(qps)`: paced; `None`: closed loop.
    pub rate: Option<f64>,
    /// How to wait when idle.
    pub wait: Wait,
    /// Largest number of datagrams per `sendmmsg`/`recvmmsg`.
    pub batch: usize,
    /// Index of the first query to send, so that threads start at different queries.
    pub first_query: usize,
    /// Send runs of equal-length queries as UDP GSO messages ([`Batch::send_segmented`]).
    pub gso: bool,
}

/// Counts and latencies of one run (or the merge of several threads' runs).
#[derive(Clone, Default)]
pub struct Counts {
    /// Queries handed to the kernel.
    pub sent: u64,
    /// Answers matched to an outstanding or timed-out query (late ones included).
    pub answered: u64,
    /// Answers that came after the timeout.
    pub late: u64,
    /// Answers whose ID is not in flight on their socket (duplicates, strays).
    pub unknown: u64,
    /// Answers whose ID is in flight but that are too short, lack QR, or repeat another question.
    pub mismatched: u64,
    /// Queries that reached the timeout unanswered (some may still be answered late).
    pub timed_out: u64,
    /// Paced sends skipped: the in-flight cap was reached or the kernel refused them.
    pub skipped: u64,
    /// Failed `sendmmsg` calls (e.g. `ECONNREFUSED` when nothing listens).
    pub send_errors: u64,
    /// Failed `recvmmsg` calls other than "would block".
    pub recv_errors: u64,
    /// Answers with RCODE NOERROR.
    pub noerror: u64,
    /// Answers with RCODE NXDOMAIN.
    pub nxdomain: u64,
    /// Answers with RCODE SERVFAIL.
    pub servfail: u64,
    /// Answers with any other RCODE.
    pub other_rcode: u64,
    /// Answers with TC=1.
    pub tc: u64,
    /// `sendmmsg` calls made.
    pub send_calls: u64,
    /// `recvmmsg` calls made (including those that found nothing).
    pub recv_calls: u64,
    /// `epoll_pwait2` calls made.
    pub epoll_waits: u64,
    /// Time spent in `recvmmsg` calls that found nothing: CPU a busy-polling client spent
    /// waiting rather than working.
    pub idle_poll: Duration,
    /// From the start to the end of sending or the last answer, whichever is later.
    pub elapsed: Duration,
    /// Answer latencies, from just before the `sendmmsg` to just after the `recvmmsg`.
    pub histogram: Histogram,
}

impl Counts {
    /// Queries never answered (within the end of sending plus the timeout).
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.answered)
    }

    /// Adds `other` (another thread's run) to `self`; elapsed is the longer of the two.
    pub fn merge(&mut self, other: &Counts) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.late += other.late;
        self.unknown += other.unknown;
        self.mismatched += other.mismatched;
        self.timed_out += other.timed_out;
        self.skipped += other.skipped;
        self.send_errors += other.send_errors;
        self.recv_errors += other.recv_errors;
        self.noerror += other.noerror;
        self.nxdomain += other.nxdomain;
        self.servfail += other.servfail;
        self.other_rcode += other.other_rcode;
        self.tc += other.tc;
        self.send_calls += other.send_calls;
        self.recv_calls += other.recv_calls;
        self.epoll_waits += other.epoll_waits;
        self.idle_poll += other.idle_poll;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.histogram.merge(&other.histogram);
    }
}

/// One connected client socket with its in-flight table and batches.
struct Lane {
    /// Connected, nonblocking UDP socket.
    socket: UdpSocket,
    /// Which IDs wait for an answer.
    table: InFlight,
    /// This socket's share of the in-flight limit.
    cap: usize,
    /// Queries filled into `send` and not yet sent.
    queued: usize,
    /// Receive batch.
    recv: Batch,
    /// Send batch.
    send: Batch,
    /// Whether sends use UDP GSO.
    gso: bool,
}

impl Lane {
    /// Opens a socket connected to `server` with a share `cap` of the in-flight limit.
    fn open(
        server: SocketAddr,
        cap: usize,
        batch: usize,
        query_bytes: usize,
        gso: bool,
    ) -> anyhow::Result<Self> {
        let local: SocketAddr = if server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).with_context(|| format!("binding {local}"))?;
        socket
            .connect(server)
            .with_context(|| format!("connecting to {server}"))?;
        socket.set_nonblocking(true).context("O_NONBLOCK")?;
        if setsockopt(&socket, sockopt::RcvBufForce, &CLIENT_RCVBUF_BYTES).is_err() {
            // Not root: the kernel caps this at net.core.rmem_max, which is still fine for the
            // default in-flight counts.
            setsockopt(&socket, sockopt::RcvBuf, &CLIENT_RCVBUF_BYTES).context("SO_RCVBUF")?;
        }
        Ok(Self {
            socket,
            table: InFlight::new(),
            cap,
            queued: 0,
            recv: Batch::new(batch, ANSWER_BUFFER_BYTES, false),
            send: Batch::new(batch, query_bytes, false),
            gso,
        })
    }

    /// Queries outstanding or timed out but still matchable: what the final drain waits for.
    fn pending(&self) -> usize {
        self.table.outstanding() + self.table.timed_out()
    }

    /// Room left under the cap and in the send batch.
    fn room(&self) -> usize {
        self.cap
            .saturating_sub(self.table.outstanding())
            .min(self.send.capacity() - self.queued)
    }

    /// Queues query `query` for the next [`Lane::flush`]. Returns false if no ID is free.
    fn queue(&mut self, queries: &QuerySet, query: usize) -> bool {
        let Some(id) = self.table.start(query) else {
            return false;
        };
        let packet = self.send.fill(self.queued, queries.packet(query));
        packet[..2].copy_from_slice(&id.to_be_bytes());
        self.queued += 1;
        true
    }

    /// Sends everything queued in one `sendmmsg`, stamping the send time just before the call.
    /// Queries the kernel did not take are released again, as if never queued; returns how many.
    fn flush(&mut self, origin: Instant, counts: &mut Counts) -> usize {
        if self.queued == 0 {
            return 0;
        }
        let now = elapsed_ns(origin);
        for i in 0..self.queued {
            self.table.stamp(packet_id(self.send.packet(i)), now);
        }
        counts.send_calls += 1;
        let result = if self.gso {
            self.send.send_segmented(self.socket.as_fd(), self.queued)
        } else {
            self.send.send(self.socket.as_fd(), 0, self.queued)
        };
        let sent = match result {
            Ok(sent) => sent,
            Err(error) => {
                if !is_transient(&error) {
                    counts.send_errors += 1;
                }
                0
            }
        };
        counts.sent += sent as u64;
        let unsent = self.queued - sent;
        for i in sent..self.queued {
            self.table.cancel(packet_id(self.send.packet(i)));
        }
        self.queued = 0;
        unsent
    }

    /// Receives one batch of answers without blocking and accounts for each. `before` is a clock
    /// reading taken just before the call; returns how many datagrams arrived and the reading
    /// just after the call, which timestamps the answers. The duration of a call that found
    /// nothing is added to [`Counts::idle_poll`].
    fn receive(
        &mut self,
        before: u64,
        origin: Instant,
        queries: &QuerySet,
        timeout_ns: u64,
        counts: &mut Counts,
    ) -> (usize, u64) {
        counts.recv_calls += 1;
        let result = self.recv.recv(self.socket.as_fd(), libc::MSG_DONTWAIT);
        let after = elapsed_ns(origin);
        let received = match result {
            Ok(received) => received,
            Err(error) => {
                if !is_transient(&error) {
                    counts.recv_errors += 1;
                }
                0
            }
        };
        if received == 0 {
            counts.idle_poll += Duration::from_nanos(after.saturating_sub(before));
        }
        for i in 0..received {
            match self
                .table
                .answer(self.recv.packet(i), after, queries, timeout_ns)
            {
                Answer::Matched {
                    latency_ns,
                    late,
                    rcode,
                    truncated,
                } => {
                    counts.answered += 1;
                    counts.histogram.record(latency_ns);
                    counts.late += u64::from(late);
                    counts.tc += u64::from(truncated);
                    match rcode {
                        0 => counts.noerror += 1,
                        2 => counts.servfail += 1,
                        3 => counts.nxdomain += 1,
                        _ => counts.other_rcode += 1,
                    }
                }
                Answer::Unknown => counts.unknown += 1,
                Answer::Mismatched => counts.mismatched += 1,
            }
        }
        (received, after)
    }
}

/// Runs one generator to completion: sends until `duration` or `max_queries`, then waits up to
/// `timeout` for the answers still outstanding.
pub fn run(settings: &Settings, queries: &QuerySet) -> anyhow::Result<Counts> {
    let lane_count = settings.sockets.min(settings.inflight).max(1);
    let mut lanes = Vec::with_capacity(lane_count);
    for index in 0..lane_count {
        let cap =
            settings.inflight / lane_count + usize::from(index < settings.inflight % lane_count);
        let cap = cap.clamp(1, IDS_PER_SOCKET);
        lanes.push(Lane::open(
            settings.server,
            cap,
            settings.batch,
            queries.max_packet_len(),
            settings.gso,
        )?);
    }
    let epoll = match settings.wait {
        Wait::Busy => None,
        Wait::Epoll => {
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
            for (index, lane) in lanes.iter().enumerate() {
                epoll
                    .add(
                        &lane.socket,
                        EpollEvent::new(EpollFlags::EPOLLIN, index as u64),
                    )
                    .context("epoll_ctl")?;
            }
            Some(epoll)
        }
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; lane_count];
    let mut counts = Counts::default();

    let timeout_ns = duration_ns(settings.timeout);
    let end_ns = duration_ns(settings.duration);
    let sweep_every_ns = (timeout_ns / 10).clamp(1_000_000, 100_000_000);
    let interval_ns = settings.rate.map(|rate| 1e9 / rate);
    let mut cursor = settings.first_query % queries.len();
    let mut scheduled: u64 = 0; // paced: queries whose send time has come (sent or skipped)
    let mut next_sweep = sweep_every_ns;
    let mut send_end: Option<u64> = None;
    let mut last_answer = 0;
    let mut progressed = true;

    let origin = Instant::now();
    loop {
        let now = elapsed_ns(origin);
        let issued = counts.sent + counts.skipped;
        if send_end.is_none() && (now >= end_ns || issued >= settings.max_queries) {
            send_end = Some(now);
        }
        if let Some(stopped) = send_end {
            let pending: usize = lanes.iter().map(|lane| lane.pending()).sum();
            if pending == 0 || now >= stopped.saturating_add(timeout_ns) {
                break;
            }
        }

        // Receive.
        let mut received = 0;
        match &epoll {
            None => {
                let mut clock = now;
                for lane in &mut lanes {
                    let (count, after) =
                        lane.receive(clock, origin, queries, timeout_ns, &mut counts);
                    received += count;
                    clock = after;
                }
            }
            Some(epoll) => {
                let wait_ns = if progressed {
                    0
                } else {
                    let mut deadline = next_sweep;
                    match send_end {
                        None => {
                            deadline = deadline.min(end_ns);
                            if let Some(interval) = interval_ns {
                                deadline =
                                    deadline.min((scheduled as f64 * interval).ceil() as u64);
                            }
                        }
                        Some(stopped) => {
                            deadline = deadline.min(stopped.saturating_add(timeout_ns))
                        }
                    }
                    deadline.saturating_sub(now)
                };
                counts.epoll_waits += 1;
                let ready =
                    epoll_wait_precise(epoll.0.as_fd(), &mut events, Duration::from_nanos(wait_ns))
                        .context("epoll_pwait2")?;
                let mut clock = elapsed_ns(origin);
                for event in &events[..ready] {
                    let lane = &mut lanes[event.u64 as usize];
                    let (count, after) =
                        lane.receive(clock, origin, queries, timeout_ns, &mut counts);
                    received += count;
                    clock = after;
                }
            }
        }
        if received > 0 {
            last_answer = elapsed_ns(origin);
        }

        // Send.
        let sent_before = counts.sent + counts.skipped;
        if send_end.is_none() {
            let issued = counts.sent + counts.skipped;
            match interval_ns {
                None => {
                    let mut remaining = settings.max_queries - issued;
                    for lane in &mut lanes {
                        let want = (lane.room() as u64).min(remaining);
                        for _ in 0..want {
                            if !lane.queue(queries, cursor) {
                                break;
                            }
                            cursor = next_query(cursor, queries);
                        }
                        remaining -= lane.queued as u64;
                        lane.flush(origin, &mut counts);
                    }
                }
                Some(interval) => {
                    let now = elapsed_ns(origin);
                    let due = ((now as f64 / interval) as u64 + 1).min(settings.max_queries);
                    // A burst after a stall is capped at one batch per socket per pass, so
                    // answers keep being read between the catch-up sends.
                    let burst = (lane_count * settings.batch) as u64;
                    let mut to_issue = due.saturating_sub(scheduled).min(burst);
                    while to_issue > 0 {
                        let lane = &mut lanes[(scheduled % lane_count as u64) as usize];
                        if lane.queued == lane.send.capacity() {
                            let unsent = lane.flush(origin, &mut counts);
                            counts.skipped += unsent as u64;
                        }
                        if lane.room() > 0 && lane.queue(queries, cursor) {
                            cursor = next_query(cursor, queries);
                        } else {
                            counts.skipped += 1;
                        }
                        scheduled += 1;
                        to_issue -= 1;
                    }
                    for lane in &mut lanes {
                        let unsent = lane.flush(origin, &mut counts);
                        counts.skipped += unsent as u64;
                    }
                }
            }
        }
        let issued_now = counts.sent + counts.skipped;

        // Time out.
        let now = elapsed_ns(origin);
        if now >= next_sweep {
            for lane in &mut lanes {
                counts.timed_out += lane.table.sweep(now, timeout_ns) as u64;
            }
            next_sweep = now + sweep_every_ns;
        }

        progressed = received > 0 || issued_now > sent_before;
    }
    let stopped = send_end.expect("the loop only exits after sending stopped");
    counts.elapsed = Duration::from_nanos(stopped.max(last_answer));
    Ok(counts)
}

/// Index of the query after `cursor`, wrapping around the set.
fn next_query(cursor: usize, queries: &QuerySet) -> usize {
    let next = cursor + 1;
    if next == queries.len() {
        0
    } else {
        next
    }
}

/// The ID of a packet this generator built (always at least a header long).
fn packet_id(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[0], packet[1]])
}

/// Nanoseconds since `origin`.
fn elapsed_ns(origin: Instant) -> u64 {
    duration_ns(origin.elapsed())
}

/// A duration in whole nanoseconds, saturating at `u64::MAX` (584 years).
fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether a socket error just means "not now" (full buffer, nothing to read, interrupted).
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    ) || error.raw_os_error() == Some(libc::ENOBUFS)
}
