//! UDP on the epoll backend: non-blocking receive/send on the worker's tokio sockets.
//!
//! Runs on: worker threads (epoll backend). The io_uring backend's UDP loop is in `ring.rs`.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

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
pub(super) async fn receive_loop(shared: Rc<RefCell<Shared>>, socket: Rc<UdpSocket>, index: u16) {
    // One byte more than QUERY_MAX: a datagram that fills it was longer (the kernel cut it).
    let mut query = vec![0u8; QUERY_MAX + 1];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        receive_batch(&shared, &socket, index, &mut query);
        tokio::task::yield_now().await;
    }
}

/// Handles up to [`BATCH`] datagrams waiting on `socket`.
fn receive_batch(shared: &RefCell<Shared>, socket: &UdpSocket, index: u16, query: &mut [u8]) {
    let mut state = shared.borrow_mut();
    let now = Instant::now();
    {
        for _ in 0..BATCH {
            let (len, peer) = match socket.try_recv_from(query) {
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
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
    }
    state.forward_now(now);
}
