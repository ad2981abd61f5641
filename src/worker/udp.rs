//! UDP on the epoll backend: non-blocking receive/send on the worker's tokio sockets.
//!
//! Runs on: worker threads (epoll backend). The io_uring backend's UDP loop is in `ring.rs`.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::eventfd::EventFd;
use nix::sys::time::TimeSpec;
use tokio::net::UdpSocket;

use super::handler::Action;
use super::pending::Origin;
use super::stats::Counter;
use super::Shared;

/// Datagrams handled per readiness event before yielding to the worker's other tasks.
const BATCH: usize = 64;

/// Largest UDP query read whole; a longer one is answered TC=1 (the client asks over TCP).
pub const QUERY_MAX: usize = 4096;

/// The epoll backend's UDP sockets, one per listen address.
#[derive(Debug)]
pub struct EpollUdp {
    /// Indexed by `Origin::Udp::socket`; stable and append-only across reloads (a removed
    /// address leaves a `None` tombstone so parked misses naming an index stay valid).
    sockets: Vec<Option<Rc<UdpSocket>>>,
}

impl EpollUdp {
    /// Wraps the worker's bound sockets; must run inside the worker's runtime.
    pub fn new(sockets: Vec<Option<std::net::UdpSocket>>) -> io::Result<EpollUdp> {
        let sockets = sockets
            .into_iter()
            .map(|socket| {
                socket
                    .map(|socket| UdpSocket::from_std(socket).map(Rc::new))
                    .transpose()
            })
            .collect::<io::Result<_>>()?;
        Ok(EpollUdp { sockets })
    }

    /// The sockets (tombstones included), for spawning one receive loop each.
    pub fn sockets(&self) -> &[Option<Rc<UdpSocket>>] {
        &self.sockets
    }

    /// Adds `socket` at `index` (reload); returns it for its receive loop.
    pub fn add(&mut self, index: u16, socket: std::net::UdpSocket) -> io::Result<Rc<UdpSocket>> {
        let socket = Rc::new(UdpSocket::from_std(socket)?);
        let index = usize::from(index);
        if self.sockets.len() <= index {
            self.sockets.resize_with(index + 1, || None);
        }
        self.sockets[index] = Some(socket.clone());
        Ok(socket)
    }

    /// Drops the socket at `index` (reload); it closes once its aborted receive loop is gone.
    pub fn remove(&mut self, index: u16) {
        if let Some(slot) = self.sockets.get_mut(usize::from(index)) {
            *slot = None;
        }
    }

    /// Sends `bytes` to `peer` from socket `socket` without waiting; `false` if it could not.
    pub fn send(&self, socket: u16, peer: SocketAddr, bytes: &[u8]) -> bool {
        self.sockets
            .get(usize::from(socket))
            .and_then(Option::as_ref)
            .is_some_and(|udp| udp.try_send_to(bytes, peer).is_ok())
    }
}

/// Receives and answers queries on socket `index` until the worker stops.
///
/// `server.batch_wait`, as on io_uring (pace.rs decides when it pays): once a batch has
/// drained the socket, the loop sleeps that long and then reads whatever arrived meanwhile,
/// so that one wake-up serves several queries, instead of going back to epoll and being woken
/// by every datagram. The sleep blocks the worker's thread, as the io_uring wait does its ring:
/// the worker's other tasks (TCP, the control loop) run before each sleep. It ends early when
/// the control side writes the worker's eventfd: answers of misses should not wait for the
/// rest of it, and closed-loop clients send nothing new until answered. It is skipped once
/// when an answer waits for a TCP connection's writer task. After a sleep the loop reads every
/// listen socket, not only its own: another socket's loop may not get its turn from tokio
/// before this one sleeps again (measured: a second listen address waited two sleeps). Reads
/// after a sleep go to the sockets directly: tokio's own receive trusts its readiness flag,
/// which it cleared when a socket ran dry and sets again only once the worker is back in epoll.
pub(super) async fn receive_loop(shared: Rc<RefCell<Shared>>, socket: Rc<UdpSocket>, index: u16) {
    // One byte more than QUERY_MAX: a datagram that fills it was longer (the kernel cut it).
    let mut query = vec![0u8; QUERY_MAX + 1];
    let wake = shared.borrow().wake.clone();
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let mut batch = receive_batch(&shared, &socket, index, &mut query, |buf| {
            socket.try_recv_from(buf)
        });
        loop {
            tokio::task::yield_now().await;
            match batch {
                // More may be queued: read on at once.
                Batch::Full => {}
                Batch::Drained { received: 0 } => break,
                Batch::Drained { .. } => {
                    let wait = {
                        let mut state = shared.borrow_mut();
                        // The epoll loops' client datagrams (io_uring counts its own).
                        let received = state.stats.read(Counter::UdpQueries);
                        let batch_wait = state.serving.batch_wait;
                        let wait = state.pace.wait(received, Instant::now(), batch_wait);
                        if wait.is_zero() {
                            break;
                        }
                        state.may_nap().then_some(wait)
                    };
                    if let Some(wait) = wait {
                        nap(&wake, wait);
                        read_others(&shared, index, &mut query);
                    }
                }
            }
            batch = receive_batch(&shared, &socket, index, &mut query, |buf| {
                recv_direct(&socket, buf)
            });
        }
    }
}

/// After a sleep, one batch from every other listen socket whose loop runs.
fn read_others(shared: &RefCell<Shared>, index: u16, query: &mut [u8]) {
    // A socket with a running loop has a task slot; removed ones stay as `None` slots.
    let count = shared.borrow().udp_tasks.len();
    for other in (0..count).filter_map(|other| u16::try_from(other).ok()) {
        if other == index {
            continue;
        }
        let Some(socket) = shared.borrow().live_epoll_socket(other) else {
            continue;
        };
        receive_batch(shared, &socket, other, query, |buf| {
            recv_direct(&socket, buf)
        });
    }
}

/// One datagram from `socket` by `recvfrom(2)` itself, whatever tokio's readiness flag says.
fn recv_direct(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    let (len, _, from) = rustix::net::recvfrom(socket, buf, rustix::net::RecvFlags::empty())?;
    let peer = from
        .and_then(|from| SocketAddr::try_from(from).ok())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
    Ok((len, peer))
}

/// Sleeps up to `wait`, or until `wake` is written (or already was, and not yet read).
fn nap(wake: &EventFd, wait: Duration) {
    let mut fds = [PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
    // Whatever ends it (the time, the eventfd, a signal), the caller reads what arrived.
    let _ = ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None);
}

/// How one call of [`receive_batch`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// [`BATCH`] datagrams read; more may be waiting.
    Full,
    /// The socket ran dry after `received` datagrams.
    Drained {
        /// Datagrams read.
        received: usize,
    },
}

/// Handles up to [`BATCH`] datagrams waiting on `socket`, read by `recv`.
fn receive_batch(
    shared: &RefCell<Shared>,
    socket: &UdpSocket,
    index: u16,
    query: &mut [u8],
    mut recv: impl FnMut(&mut [u8]) -> io::Result<(usize, SocketAddr)>,
) -> Batch {
    let mut state = shared.borrow_mut();
    let now = Instant::now();
    let mut batch = Batch::Full;
    for received in 0..BATCH {
        let (len, peer) = match recv(query) {
            Ok(received) => received,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                batch = Batch::Drained { received };
                break;
            }
            Err(_) => continue,
        };
        let origin = Origin::Udp {
            socket: index,
            peer,
        };
        let Shared {
            handler,
            out,
            stats,
            ..
        } = &mut *state;
        let read = query.get(..len.min(QUERY_MAX)).unwrap_or_default();
        let action = if len > QUERY_MAX {
            handler.handle_too_long(read, &mut out[..])
        } else {
            handler.handle_query(read, now, origin, &mut out[..])
        };
        if let Action::Reply { len } = action {
            if socket.try_send_to(&out[..len], peer).is_err() {
                stats.bump(Counter::SendErrors);
            }
        }
    }
    state.forward_now(now);
    batch
}
