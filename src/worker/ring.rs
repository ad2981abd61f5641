//! The io_uring UDP fast path: multishot RecvMsg with a provided buffer ring, replies built in
//! place into send slots, SINGLE_ISSUER + DEFER_TASKRUN. The same ring carries the worker's
//! UDP exchanges with its upstreams ([`super::upstream`]): their connected sockets receive into
//! the same buffer ring and their queries go out from the same send slots.
//!
//! Runs on: worker threads (io_uring backend).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::bufs::{decode_addr, BufRing, SendSlots, ADDR_LEN};
use super::handler::{Action, Handler};
use super::pending::Origin;
use super::stats::{Counter, WorkerStats};
use super::upstream::{Exchanges, UpstreamIo};
use crate::upstream::route;

/// Submission queue entries (completion queue: 4× as many, so bursts do not overflow it).
const RING_ENTRIES: u32 = 1024;

/// Provided receive buffers (a power of two).
const RECV_BUFFERS: u16 = 1024;

/// Send slots: replies in flight at once.
const SEND_SLOTS: u16 = 1024;

/// Completions one [`RingUdp::drain`] handles at most (a few batches' worth), so that under
/// sustained load the worker refreshes its clock and lets its other tasks run.
pub const POLL_BUDGET: usize = 512;

/// The provided-buffer group id used by every UDP socket of the worker.
const BUF_GROUP: u16 = 0;

/// `user_data` bit marking a Send completion (else: a receive on socket `user_data`).
const SEND_TAG: u64 = 1 << 63;

/// `user_data` bit of a cancel request (the cancel-all sent on drop, or a removed socket's).
const CANCEL_TAG: u64 = 1 << 62;

/// `user_data` bit of a receive on an upstream socket (else: on a listen socket).
const UPSTREAM_TAG: u64 = 1 << 61;

/// Most upstream sockets open at once (their index must fit the receive tag's 16 bits).
const MAX_UPSTREAM_SOCKETS: usize = 1 << 16;

/// A receive's `user_data`: the socket index in the low 16 bits, its generation above, so a
/// late completion of a removed socket's receive is never taken for its successor's.
const GENERATION_SHIFT: u32 = 16;

/// How long `Drop` waits for cancelled operations to complete, in total.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// The worker's UDP sockets on one io_uring.
///
/// # Ownership of memory shared with the kernel
///
/// `recv_msghdr` (read by every armed multishot RecvMsg), the buffer ring `bufs` (written by
/// the kernel) and the send slots in flight (read by their Send) stay valid and unmoved
/// until every operation that references them has completed: `Drop` cancels everything and
/// reaps CQEs until `in_flight` is zero before any of them is freed (fields drop in
/// declaration order, the ring first).
pub struct RingUdp {
    /// The ring (single issuer: only this worker thread submits).
    ring: IoUring,
    /// One socket per listen address; index = `Origin::Udp::socket`. Indices are stable and
    /// append-only across reloads: a removed address leaves a `None` tombstone, so parked
    /// misses naming a socket index stay valid.
    sockets: Vec<Option<UdpSocket>>,
    /// Per socket index: bumped when a socket is removed, carried in receive `user_data`.
    generations: Vec<u32>,
    /// Template for multishot RecvMsg: only name and control lengths matter.
    recv_msghdr: Box<libc::msghdr>,
    /// Provided receive buffers.
    bufs: BufRing,
    /// Reply buffers.
    slots: SendSlots,
    /// Operations submitted whose final CQE has not been reaped.
    in_flight: usize,
    /// Whether each socket's multishot receive is armed.
    armed: Vec<bool>,
    /// Sockets whose receive failed with an error other than ENOBUFS: not re-armed until
    /// [`RingUdp::release_held`].
    held: Vec<bool>,
    /// Sockets connected to upstreams, by the index [`super::upstream::Exchanges`] knows them
    /// by; a closed one leaves `None` and its index on `upstream_free`.
    upstream: Vec<Option<UpstreamSocket>>,
    /// Per upstream index: bumped when its socket closes, carried in receive `user_data`, so a
    /// late completion of a closed socket is never taken for its successor's.
    upstream_generations: Vec<u32>,
    /// Indices of closed upstream sockets, for reuse.
    upstream_free: Vec<u32>,
    /// Some upstream socket may need its receive armed or its cancel pushed: set when a
    /// receive ends or a cancel could not be pushed, so that a drain scans them only then.
    upstream_unarmed: bool,
    /// Per send slot: the upstream socket index and generation a query in it went to
    /// (`None`: a client reply), so that a failed send reaches the exchanges.
    slot_owners: Vec<Option<(u32, u32)>>,
    /// Registered with the ring: written by the kernel when completions (or deferred task
    /// work) are ready, so the worker's tokio loop can wait on it.
    events: Arc<EventFd>,
    /// SQEs pushed since the last submit.
    unsubmitted: bool,
    /// Whether the kernel supports `min_wait` (IORING_FEAT_MIN_TIMEOUT, Linux 6.12).
    min_wait: bool,
    /// Set by [`RingUdp::stop_receiving`] (hand-over): listen sockets are never re-armed.
    quiet: bool,
    /// Client datagrams received so far (the batch wait follows their rate: pace.rs).
    datagrams: u64,
}

/// One socket connected to an upstream.
#[derive(Debug)]
struct UpstreamSocket {
    /// Bound to a random port, connected to the upstream.
    socket: UdpSocket,
    /// Whether its multishot receive is armed (its final CQE not yet reaped).
    armed: bool,
    /// Closed by the exchanges: its receive is being cancelled; the socket is dropped and its
    /// index freed only when the receive's final CQE arrives, so the kernel never acts on a
    /// descriptor number that a later socket may reuse.
    closing: bool,
    /// Whether the cancel of its receive has been pushed.
    cancelled: bool,
}

impl std::fmt::Debug for RingUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingUdp")
            .field("sockets", &self.sockets.len())
            .field("in_flight", &self.in_flight)
            .field("slots", &self.slots)
            .finish()
    }
}

impl RingUdp {
    /// Sets up the ring for `sockets`, registers the buffer ring and the eventfd, and arms a
    /// multishot receive on every socket. Replies are at most `slot_len` bytes.
    pub fn new(sockets: Vec<Option<UdpSocket>>, slot_len: usize) -> io::Result<RingUdp> {
        let ring: IoUring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(RING_ENTRIES * 4)
            .build(RING_ENTRIES)?;
        let events = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(io::Error::from)?,
        );
        ring.submitter().register_eventfd(events.as_raw_fd())?;
        let bufs = BufRing::new(RECV_BUFFERS)?;
        // SAFETY: `bufs` owns the descriptor ring at `ring_addr()` with `entries()`
        // descriptors; it is dropped only after the ring (field order, and `Drop` drains the
        // ring first), so it outlives the registration.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring_addr(),
                bufs.entries(),
                BUF_GROUP,
                0,
            )
        }?;
        // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero lengths).
        let mut recv_msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_msghdr.msg_namelen = ADDR_LEN as libc::socklen_t;
        let armed = vec![false; sockets.len()];
        let generations = vec![0; sockets.len()];
        let min_wait = ring.params().is_feature_min_timeout();
        let mut udp = RingUdp {
            ring,
            sockets,
            generations,
            recv_msghdr,
            bufs,
            slots: SendSlots::new(SEND_SLOTS, slot_len)?,
            in_flight: 0,
            held: vec![false; armed.len()],
            armed,
            upstream: Vec::new(),
            upstream_generations: Vec::new(),
            upstream_free: Vec::new(),
            upstream_unarmed: false,
            slot_owners: vec![None; usize::from(SEND_SLOTS)],
            events,
            unsubmitted: false,
            min_wait,
            quiet: false,
            datagrams: 0,
        };
        udp.arm_receives()?;
        udp.ring.submit()?;
        udp.unsubmitted = false;
        Ok(udp)
    }

    /// The eventfd the kernel writes when there is work; wait on it, then call
    /// [`RingUdp::start_turn`] and [`RingUdp::drain`].
    pub fn events(&self) -> Arc<EventFd> {
        self.events.clone()
    }

    /// Pushes one SQE, submitting first if the submission queue is full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: every SQE built here references only memory owned by `self` that stays
            // valid until its CQE is reaped (see the type's docs): the recv msghdr and buffer
            // ring for receives, an in-flight send slot for sends; a cancel references none.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.unsubmitted = true;
                return Ok(());
            }
            self.ring.submit()?;
        }
        Err(io::Error::other("io_uring submission queue stays full"))
    }

    /// Submits queued sends and waits in the kernel up to `wait` for `want` more completions
    /// (returning early once `wait` has passed with at least one: min_wait), running deferred
    /// task work meanwhile; so at moderate rates one system call serves several datagrams.
    /// A zero `wait` only submits and runs task work, if there is any: a wait with a zero
    /// timeout would arm a timer that fires at once, which cost half the worker's CPU at a
    /// paced 20k qps (perf/RESULTS.md, batch_wait sweep).
    pub fn linger(&mut self, want: usize, wait: Duration) {
        if wait.is_zero() {
            // Nothing to submit and no task work flagged (the kernel sets IORING_SQ_TASKRUN
            // whenever it queues task work to an empty list or leaves some unrun): the
            // completions already posted (a reply's send completes inline) need no system call.
            if self.unsubmitted || self.ring.submission().taskrun() {
                self.run_task_work();
            }
            return;
        }
        let timeout = Timespec::from(wait);
        let micros = u32::try_from(wait.as_micros()).unwrap_or(u32::MAX);
        let args = SubmitArgs::new().timespec(&timeout);
        let args = if self.min_wait {
            args.min_wait_usec(micros)
        } else {
            args
        };
        // ETIME (nothing arrived) and EINTR are normal outcomes of a bounded wait.
        let _ = self.ring.submitter().submit_with_args(want, &args);
        self.unsubmitted = false;
    }

    /// Client datagrams received so far on the listen sockets.
    pub fn datagrams(&self) -> u64 {
        self.datagrams
    }

    /// Adds `socket` at index `index` (reload: a new listen address); its receive is armed on
    /// the next poll (or now, by the caller's `poll`).
    pub fn add_socket(&mut self, index: u16, socket: UdpSocket) -> io::Result<()> {
        let index = usize::from(index);
        if self.sockets.len() <= index {
            self.sockets.resize_with(index + 1, || None);
            self.armed.resize(index + 1, false);
            self.held.resize(index + 1, false);
            self.generations.resize(index + 1, 0);
        }
        self.sockets[index] = Some(socket);
        self.armed[index] = false;
        self.arm_receives()?;
        self.flush();
        Ok(())
    }

    /// Stops receiving on every listen socket (hand-over: a successor reads the same sockets
    /// now): cancels each multishot receive, by its `user_data` so that replies queued on the
    /// socket still go out, and never re-arms one. The sockets stay open for the replies of
    /// misses in flight; datagrams not yet received stay queued in the socket for the
    /// successor, and those already received (completions posted before the cancel) are
    /// answered here.
    pub fn stop_receiving(&mut self) {
        self.quiet = true;
        for index in 0..self.sockets.len() {
            if !self.armed[index] || self.sockets[index].is_none() {
                continue;
            }
            let cancel =
                opcode::AsyncCancel2::new(CancelBuilder::user_data(self.receive_tag(index)))
                    .build()
                    .user_data(CANCEL_TAG | index as u64);
            if self.push(&cancel).is_ok() {
                self.in_flight += 1;
            }
        }
        self.flush();
    }

    /// Removes the socket at `index` (reload: a listen address went away): cancels its
    /// multishot receive, then closes it. io_uring holds its own file reference for operations
    /// in flight, so closing after submitting the cancel is safe; the receive's final CQE
    /// arrives with -ECANCELED and is told apart by its generation.
    pub fn remove_socket(&mut self, index: u16) {
        let index = usize::from(index);
        let Some(socket) = self.sockets.get_mut(index).and_then(Option::take) else {
            return;
        };
        if self.armed[index] {
            let cancel = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(socket.as_raw_fd())).all())
                .build()
                .user_data(CANCEL_TAG | index as u64);
            if self.push(&cancel).is_ok() {
                self.in_flight += 1;
            }
            self.flush();
        }
        self.armed[index] = false;
        self.generations[index] = self.generations[index].wrapping_add(1);
        drop(socket);
    }

    /// The receive `user_data` of socket `index` in its current generation.
    fn receive_tag(&self, index: usize) -> u64 {
        let generation = u64::from(self.generations[index]) & 0xffff_ffff;
        (generation << GENERATION_SHIFT) | index as u64
    }

    /// The receive `user_data` of upstream socket `index` in its current generation.
    fn upstream_tag(&self, index: usize) -> u64 {
        let generation = u64::from(self.upstream_generations[index]) & 0xffff_ffff;
        UPSTREAM_TAG | (generation << GENERATION_SHIFT) | index as u64
    }

    /// Arms a multishot RecvMsg on every open upstream socket that has none, and pushes the
    /// cancel of every closing one whose cancel could not be pushed yet (only when one may
    /// need it: `upstream_unarmed`).
    fn arm_upstream_receives(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.upstream_unarmed) {
            return Ok(());
        }
        for index in 0..self.upstream.len() {
            if let Err(error) = self.arm_upstream(index) {
                self.upstream_unarmed = true;
                return Err(error);
            }
        }
        Ok(())
    }

    /// Arms upstream socket `index`'s receive if it has none, or pushes its cancel if it is
    /// closing and the cancel is not pushed yet.
    fn arm_upstream(&mut self, index: usize) -> io::Result<()> {
        let entry = match self.upstream.get(index) {
            Some(Some(upstream)) if upstream.closing && upstream.armed && !upstream.cancelled => {
                opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(upstream.socket.as_raw_fd())).all())
                    .build()
                    .user_data(CANCEL_TAG | index as u64)
            }
            Some(Some(upstream)) if !upstream.closing && !upstream.armed => {
                let fd = Fd(upstream.socket.as_raw_fd());
                opcode::RecvMsgMulti::new(fd, &*self.recv_msghdr, BUF_GROUP)
                    .build()
                    .user_data(self.upstream_tag(index))
            }
            _ => return Ok(()),
        };
        self.push(&entry)?;
        self.in_flight += 1;
        if let Some(Some(upstream)) = self.upstream.get_mut(index) {
            if upstream.closing {
                upstream.cancelled = true;
            } else {
                upstream.armed = true;
            }
        }
        Ok(())
    }

    /// Drops closing upstream socket `index` (its receive is over) and frees its index. Queued
    /// SQEs are submitted first: a Send for it still in the submission queue must reach the
    /// kernel while its descriptor number still names this socket.
    fn free_upstream(&mut self, index: usize) {
        self.flush();
        if let Some(entry) = self.upstream.get_mut(index) {
            *entry = None;
            self.upstream_generations[index] = self.upstream_generations[index].wrapping_add(1);
            self.upstream_free.push(index as u32);
        }
    }

    /// Arms a multishot RecvMsg on every socket that has none (tombstones skipped).
    fn arm_receives(&mut self) -> io::Result<()> {
        if self.quiet {
            return Ok(());
        }
        for index in 0..self.sockets.len() {
            if self.armed[index] || self.held.get(index).is_some_and(|&held| held) {
                continue;
            }
            let Some(socket) = &self.sockets[index] else {
                continue;
            };
            let fd = Fd(socket.as_raw_fd());
            let entry = opcode::RecvMsgMulti::new(fd, &*self.recv_msghdr, BUF_GROUP)
                .build()
                .user_data(self.receive_tag(index));
            self.push(&entry)?;
            self.armed[index] = true;
            self.in_flight += 1;
        }
        Ok(())
    }

    /// Re-arms receives held back after an error (called once a second by the worker's tick).
    pub fn release_held(&mut self) {
        if self.held.iter().any(|&held| held) {
            self.held.iter_mut().for_each(|held| *held = false);
            let _ = self.arm_receives();
            self.flush();
        }
    }

    /// Queues `bytes` to `peer` from socket `socket`; `false` if no send slot is free.
    pub fn send(&mut self, socket: u16, peer: SocketAddr, bytes: &[u8]) -> bool {
        let Some(slot) = self.slots.acquire() else {
            return false;
        };
        let buffer = self.slots.buffer(slot);
        let open = self
            .sockets
            .get(usize::from(socket))
            .is_some_and(Option::is_some);
        if bytes.len() > buffer.len() || !open {
            self.slots.release(slot);
            return false;
        }
        buffer[..bytes.len()].copy_from_slice(bytes);
        self.submit_slot(socket, slot, bytes.len(), peer)
    }

    /// Sends the first `len` bytes of `slot` to `peer`; the slot is released on failure
    /// (also when socket `socket` was removed).
    fn submit_slot(&mut self, socket: u16, slot: u16, len: usize, peer: SocketAddr) -> bool {
        let Some(Some(udp)) = self.sockets.get(usize::from(socket)) else {
            self.slots.release(slot);
            return false;
        };
        let fd = Fd(udp.as_raw_fd());
        let outgoing = self.slots.prepare(slot, len, peer);
        let entry = opcode::Send::new(fd, outgoing.buf, outgoing.len)
            .dest_addr(outgoing.addr)
            .dest_addr_len(outgoing.addr_len)
            .build();
        self.push_send(entry, slot)
    }

    /// Pushes the Send SQE `entry` of `slot` (tagged with it); the slot is released if the
    /// SQE cannot be pushed.
    fn push_send(&mut self, entry: squeue::Entry, slot: u16) -> bool {
        let entry = entry.user_data(SEND_TAG | u64::from(slot));
        if self.push(&entry).is_err() {
            self.slots.release(slot);
            return false;
        }
        self.in_flight += 1;
        true
    }

    /// Submits queued SQEs (if any).
    pub fn flush(&mut self) {
        if self.unsubmitted && self.ring.submit().is_ok() {
            self.unsubmitted = false;
        }
    }

    /// Submits queued SQEs and runs deferred task work (DEFER_TASKRUN posts completions only
    /// from an enter carrying GETEVENTS). GETEVENTS is passed every time, not only when the
    /// kernel's TASKRUN flag says work is pending: the kernel runs at most a bounded batch of
    /// task work per enter and may leave the rest queued without raising the flag again.
    fn run_task_work(&mut self) {
        let to_submit = self.ring.submission().len() as u32;
        // SAFETY: a plain io_uring_enter on our own ring: `to_submit` counts SQEs already
        // pushed (each valid, see `push`), min_complete 0 never blocks, no extended argument.
        let _ = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                to_submit,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        self.unsubmitted = false;
    }

    /// Stops the kernel writing the eventfd while the worker is awake: it reaps completions
    /// itself until [`RingUdp::unmute`]. Without this every completion posted during a turn
    /// (the send of each reply is posted inline as it is submitted) wrote the eventfd and woke
    /// the worker once more after the turn to find nothing: ~4.5 `io_uring_enter` and 2.6
    /// eventfd reads per query at 1,000 qps (perf trace), instead of 2 and 1.
    pub fn mute(&mut self) {
        self.ring.completion().disable_eventfd();
    }

    /// Before the worker sleeps on the eventfd: lets the kernel write it again and says whether
    /// work arrived while it was muted, in which case the caller must run another turn instead
    /// of sleeping (nothing would wake it). Deferred task work queued meanwhile is flagged in
    /// the SQ ring (IORING_SQ_TASKRUN, set when work is queued to an empty list or left unrun);
    /// the flag can also be left set with nothing to run, so it is only a reason to run the
    /// task work here, with the eventfd live again, and the answer is whether that (or
    /// anything before it) posted completions. Treating the flag itself as work spun the
    /// worker through empty turns under a miss load (perf/RESULTS.md, 14:25).
    pub fn unmute(&mut self) -> bool {
        self.ring.completion().enable_eventfd();
        // The kernel publishes work, then reads the disabled flag; we clear the flag, then
        // read for work: a full fence on our side makes one of the two see the other.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if self.ring.submission().taskrun() {
            self.run_task_work();
        }
        !self.ring.completion().is_empty()
    }

    /// Makes pending completions visible: submits queued SQEs and runs deferred task work.
    /// Call once when woken, before the first [`RingUdp::drain`].
    pub fn start_turn(&mut self) {
        self.run_task_work();
    }

    /// Handles the completions already in the completion queue, at most [`POLL_BUDGET`]:
    /// answers queries (hits in place into a send slot), frees send slots, re-arms receives.
    /// Makes no system call: the sends it queues go out with the next [`RingUdp::linger`] or
    /// [`RingUdp::flush`]. Returns how many completions it handled.
    pub fn drain(
        &mut self,
        handler: &mut Handler,
        exchanges: &mut Exchanges,
        stats: &WorkerStats,
        now: Instant,
    ) -> usize {
        let mut handled = 0usize;
        while handled < POLL_BUDGET {
            let Some(cqe) = self.ring.completion().next() else {
                break;
            };
            handled += 1;
            self.complete(&cqe, handler, exchanges, stats, now);
        }
        self.bufs.publish();
        if self.arm_receives().is_err() || self.arm_upstream_receives().is_err() {
            stats.bump(Counter::SendErrors);
        }
        handled
    }

    /// Handles one completion.
    fn complete(
        &mut self,
        cqe: &cqueue::Entry,
        handler: &mut Handler,
        exchanges: &mut Exchanges,
        stats: &WorkerStats,
        now: Instant,
    ) {
        let user_data = cqe.user_data();
        if user_data & SEND_TAG != 0 {
            self.in_flight -= 1;
            let slot = (user_data & !SEND_TAG) as u16;
            let owner = self
                .slot_owners
                .get_mut(usize::from(slot))
                .and_then(Option::take);
            // -ECANCELED: cancelled with its socket's close; nothing to report.
            if cqe.result() < 0 && cqe.result() != -libc::ECANCELED {
                match owner {
                    // An upstream query: the exchanges fail over (an ICMP error pending on a
                    // connected socket is reported to the next send as often as to the receive).
                    Some((index, generation))
                        if self.upstream_generations.get(index as usize) == Some(&generation) =>
                    {
                        exchanges.socket_error(index, -cqe.result());
                    }
                    Some(_) => {}
                    None => stats.bump(Counter::SendErrors),
                }
            }
            self.slots.release(slot);
            return;
        }
        if user_data & CANCEL_TAG != 0 {
            self.in_flight -= 1;
            return;
        }
        if user_data & UPSTREAM_TAG != 0 {
            self.complete_upstream(cqe, exchanges, stats, now);
            return;
        }
        let socket = (user_data & 0xffff) as usize;
        let current = self.generations.get(socket).is_some_and(|&generation| {
            u64::from(generation) == (user_data >> GENERATION_SHIFT) & 0xffff_ffff
        });
        if !cqueue::more(cqe.flags()) {
            self.in_flight -= 1;
            if current {
                if let Some(armed) = self.armed.get_mut(socket) {
                    *armed = false;
                }
                // Out of buffers (ENOBUFS) is re-armed at once; any other error could repeat
                // on every re-arm and spin the worker, so that socket waits for the next tick.
                let result = cqe.result();
                let released = self.quiet && result == -libc::ECANCELED;
                if result < 0 && result != -libc::ENOBUFS && !released {
                    stats.bump(Counter::ReceiveErrors);
                    if let Some(held) = self.held.get_mut(socket) {
                        *held = true;
                    }
                }
            }
        }
        let Some(bid) = cqueue::buffer_select(cqe.flags()) else {
            return;
        };
        // A datagram that raced a removed socket's cancel has nowhere to be answered from.
        if !current {
            self.bufs.recycle(bid);
            return;
        }
        if let Ok(len) = usize::try_from(cqe.result()) {
            self.datagrams += 1;
            self.answer(socket, bid, len, handler, stats, now);
        }
        self.bufs.recycle(bid);
    }

    /// Handles a completion of an upstream socket's receive: an answer for the exchanges, or
    /// the end of the multishot receive (re-armed by the next drain unless the socket closed;
    /// an error other than running out of buffers is reported, e.g. ICMP port unreachable).
    fn complete_upstream(
        &mut self,
        cqe: &cqueue::Entry,
        exchanges: &mut Exchanges,
        stats: &WorkerStats,
        now: Instant,
    ) {
        let user_data = cqe.user_data();
        let index = (user_data & 0xffff) as usize;
        let current = self
            .upstream_generations
            .get(index)
            .is_some_and(|&generation| {
                u64::from(generation) == (user_data >> GENERATION_SHIFT) & 0xffff_ffff
            });
        let result = cqe.result();
        if !cqueue::more(cqe.flags()) {
            self.in_flight -= 1;
            if current {
                let closing = match self.upstream.get_mut(index) {
                    Some(Some(upstream)) => {
                        upstream.armed = false;
                        upstream.closing
                    }
                    _ => false,
                };
                if closing {
                    self.free_upstream(index);
                } else {
                    self.upstream_unarmed = true;
                }
                if !closing && result < 0 && result != -libc::ENOBUFS && result != -libc::ECANCELED
                {
                    stats.bump(Counter::ReceiveErrors);
                    exchanges.socket_error(index as u32, -result);
                }
            }
        }
        let Some(bid) = cqueue::buffer_select(cqe.flags()) else {
            return;
        };
        if let (true, Ok(len)) = (current, usize::try_from(result)) {
            if let Some(filled) = self.bufs.filled(bid, len) {
                if let Ok(message) = RecvMsgOut::parse(filled, &self.recv_msghdr) {
                    let cut = message.is_payload_truncated();
                    exchanges.receive(index as u32, message.payload_data(), cut, now);
                }
            }
        }
        self.bufs.recycle(bid);
    }

    /// Handles the datagram in buffer `bid` (first `len` bytes) received on `socket`.
    fn answer(
        &mut self,
        socket: usize,
        bid: u16,
        len: usize,
        handler: &mut Handler,
        stats: &WorkerStats,
        now: Instant,
    ) {
        let Some(filled) = self.bufs.filled(bid, len) else {
            return;
        };
        let Ok(message) = RecvMsgOut::parse(filled, &self.recv_msghdr) else {
            return;
        };
        if message.is_name_data_truncated() {
            stats.bump(Counter::DropTooShort);
            return;
        }
        let Some(peer) = decode_addr(message.name_data()) else {
            return;
        };
        let Some(slot) = self.slots.acquire() else {
            stats.bump(Counter::SendErrors);
            return;
        };
        let socket = socket as u16;
        let origin = Origin::Udp { socket, peer };
        let query = message.payload_data();
        let action = if message.is_payload_truncated() {
            // Longer than a receive buffer: TC=1, the client asks again over TCP.
            handler.handle_too_long(query, self.slots.buffer(slot))
        } else {
            handler.handle_query(query, now, origin, self.slots.buffer(slot))
        };
        match action {
            Action::Reply { len } => {
                if !self.submit_slot(socket, slot, len, peer) {
                    stats.bump(Counter::SendErrors);
                }
            }
            Action::Parked | Action::Drop(_) => self.slots.release(slot),
        }
    }
}

impl UpstreamIo for RingUdp {
    fn open(&mut self, addr: SocketAddr) -> io::Result<u32> {
        let local: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        // Port 0: the kernel picks a random ephemeral port (RFC 5452 §9.2 wants it random).
        let socket = UdpSocket::bind(local)?;
        socket.connect(addr)?;
        socket.set_nonblocking(true)?;
        let index = match self.upstream_free.pop() {
            Some(index) => usize::try_from(index).unwrap_or(usize::MAX),
            None if self.upstream.len() < MAX_UPSTREAM_SOCKETS => {
                self.upstream.push(None);
                self.upstream_generations.push(0);
                self.upstream.len() - 1
            }
            None => return Err(io::Error::other("too many upstream sockets")),
        };
        let Some(entry) = self.upstream.get_mut(index) else {
            return Err(io::Error::other("upstream socket index out of range"));
        };
        *entry = Some(UpstreamSocket {
            socket,
            armed: false,
            closing: false,
            cancelled: false,
        });
        if let Err(error) = self.arm_upstream(index) {
            // Not armed (the submission queue stayed full): nothing references it yet.
            self.upstream[index] = None;
            self.upstream_free.push(index as u32);
            return Err(error);
        }
        Ok(index as u32)
    }

    fn send(&mut self, socket: u32, query: &[u8], id: u16) -> bool {
        let index = socket as usize;
        let Some(Some(upstream)) = self.upstream.get(index) else {
            return false;
        };
        let fd = Fd(upstream.socket.as_raw_fd());
        let Some(slot) = self.slots.acquire() else {
            return false;
        };
        let buffer = self.slots.buffer(slot);
        let Some(packet) = buffer.get_mut(..query.len()) else {
            self.slots.release(slot);
            return false;
        };
        packet.copy_from_slice(query);
        route::set_id(packet, id);
        let (buf, len) = self.slots.connected(slot, query.len());
        if !self.push_send(opcode::Send::new(fd, buf, len).build(), slot) {
            return false;
        }
        if let Some(owner) = self.slot_owners.get_mut(usize::from(slot)) {
            *owner = Some((socket, self.upstream_generations[index]));
        }
        true
    }

    fn close(&mut self, socket: u32) {
        let index = socket as usize;
        let armed = match self.upstream.get_mut(index) {
            Some(Some(upstream)) if !upstream.closing => {
                upstream.closing = true;
                upstream.armed
            }
            _ => return,
        };
        if !armed {
            self.free_upstream(index);
            return;
        }
        // The receive's final CQE (-ECANCELED) frees the socket; if the cancel cannot be pushed
        // now, the next drain pushes it.
        if self.arm_upstream(index).is_err() {
            self.upstream_unarmed = true;
        }
    }
}

impl Drop for RingUdp {
    /// Cancels every operation and reaps CQEs until none is in flight, so that the kernel no
    /// longer references the buffers, msghdr or slots when they are freed.
    fn drop(&mut self) {
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(CANCEL_TAG);
        if self.push(&cancel).is_ok() {
            self.in_flight += 1;
        }
        let deadline = Instant::now() + DRAIN_LIMIT;
        let timeout = Timespec::new().nsec(50_000_000);
        while self.in_flight > 0 && Instant::now() < deadline {
            let args = SubmitArgs::new().timespec(&timeout);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            while let Some(cqe) = self.ring.completion().next() {
                let user_data = cqe.user_data();
                let last = user_data & (SEND_TAG | CANCEL_TAG) != 0 || !cqueue::more(cqe.flags());
                if last {
                    self.in_flight -= 1;
                }
            }
        }
        if self.in_flight > 0 {
            // The kernel may still own buffers: leaking them is the only sound choice.
            log::error!(
                "io_uring did not drain in_flight={}; leaking its buffers",
                self.in_flight
            );
            self.bufs.leak();
            self.slots.leak();
            // SAFETY: all-zero bytes are a valid msghdr.
            let msghdr = std::mem::replace(
                &mut self.recv_msghdr,
                Box::new(unsafe { std::mem::zeroed() }),
            );
            std::mem::forget(msghdr);
        } else {
            let _ = self.ring.submitter().unregister_buf_ring(BUF_GROUP);
        }
    }
}

/// Checks that io_uring can be set up here exactly as a worker sets it up (ring flags,
/// eventfd and buffer-ring registration) and that the kernel has the opcodes the UDP path
/// uses. The error says what failed.
pub fn probe() -> Result<(), String> {
    let ring = RingUdp::new(Vec::new(), 512).map_err(|error| {
        format!(
            "io_uring setup (SINGLE_ISSUER|DEFER_TASKRUN, eventfd, provided buffer ring) failed: {error}; \
             kernel 6.1+ is needed, and seccomp profiles or kernel.io_uring_disabled may forbid io_uring"
        )
    })?;
    let mut probe = Probe::new();
    ring.ring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|error| format!("io_uring opcode probe failed: {error}"))?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "RECVMSG"),
        (opcode::Send::CODE, "SEND"),
        (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!(
                "io_uring opcode {name} is not supported by this kernel"
            ));
        }
    }
    Ok(())
}

/// An eventfd shared between threads, as a file descriptor tokio can poll.
///
/// It holds its own `Arc`, so the descriptor stays open for as long as the `AsyncFd` that owns
/// this value exists.
#[derive(Debug)]
pub struct WakeFd(pub Arc<EventFd>);

impl AsRawFd for WakeFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Registers `wake` with the current tokio reactor for readability.
pub fn async_eventfd(wake: Arc<EventFd>) -> io::Result<AsyncFd<WakeFd>> {
    // SAFETY: `WakeFd` owns an `Arc<EventFd>`; the EventFd (and so its descriptor) is closed
    // only when the last Arc drops, which cannot happen while the AsyncFd owns this clone, and
    // `as_raw_fd` always returns that same descriptor.
    unsafe { AsyncFd::register_with_interest(WakeFd(wake), Interest::READABLE) }
        .map_err(|error| error.into_parts().1)
}
