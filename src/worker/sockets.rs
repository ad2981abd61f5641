//! Listen sockets: one SO_REUSEPORT UDP socket and TCP listener per worker per address.
//!
//! Runs on: control thread (sockets are bound before workers start, so a bind error is a
//! start-up error naming the address; each worker then owns its sockets).
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrStorage,
};

/// Pending-connection queue of each TCP listener.
const TCP_BACKLOG: i32 = 1024;

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A system call failed.
    #[error("{addr}: {what}: {source}")]
    Sys {
        /// The listen address.
        addr: SocketAddr,
        /// Which step failed.
        what: &'static str,
        /// The OS error.
        source: nix::Error,
    },
}

/// A socket call's result, with the step named for the error.
fn step<T>(addr: SocketAddr, what: &'static str, result: nix::Result<T>) -> Result<T, SocketError> {
    result.map_err(|source| SocketError::Sys { addr, what, source })
}

/// The address family of `addr`.
fn family(addr: SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// A non-blocking socket of `kind` for `addr`'s family with SO_REUSEPORT (one per worker on
/// the same address) and, for IPv6, IPV6_V6ONLY (so IPv4 and IPv6 listen entries never clash).
fn reuseport_socket(addr: SocketAddr, kind: SockType) -> Result<OwnedFd, SocketError> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd = step(addr, "socket", socket(family(addr), kind, flags, None))?;
    step(
        addr,
        "SO_REUSEPORT",
        setsockopt(&fd, sockopt::ReusePort, &true),
    )?;
    if addr.is_ipv6() {
        step(
            addr,
            "IPV6_V6ONLY",
            setsockopt(&fd, sockopt::Ipv6V6Only, &true),
        )?;
    }
    Ok(fd)
}

/// Binds `fd` to `addr`.
fn bind_to(fd: &OwnedFd, addr: SocketAddr) -> Result<(), SocketError> {
    step(
        addr,
        "bind",
        bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)),
    )
}

/// A non-blocking UDP socket bound to `addr` with SO_REUSEPORT, its receive buffer raised to
/// `receive_buffer` bytes (SO_RCVBUFFORCE when permitted, else SO_RCVBUF, which the kernel caps
/// at `net.core.rmem_max`). Returns the socket and the buffer size the kernel reports.
pub fn bind_udp(
    addr: SocketAddr,
    receive_buffer: usize,
) -> Result<(UdpSocket, usize), SocketError> {
    let fd = reuseport_socket(addr, SockType::Datagram)?;
    let actual = set_receive_buffer(&fd, addr, receive_buffer)?;
    bind_to(&fd, addr)?;
    Ok((UdpSocket::from(fd), actual))
}

/// Raises the receive buffer of UDP socket `socket` (on `addr`, for errors) to
/// `receive_buffer` bytes (SO_RCVBUFFORCE when permitted, else SO_RCVBUF, which the kernel caps
/// at `net.core.rmem_max`); returns the size the kernel reports. Also used for a socket taken
/// over from a predecessor, which may have been started with another size.
pub fn set_receive_buffer(
    socket: &impl AsFd,
    addr: SocketAddr,
    receive_buffer: usize,
) -> Result<usize, SocketError> {
    if setsockopt(socket, sockopt::RcvBufForce, &receive_buffer).is_err() {
        step(
            addr,
            "SO_RCVBUF",
            setsockopt(socket, sockopt::RcvBuf, &receive_buffer),
        )?;
    }
    step(
        addr,
        "SO_RCVBUF",
        nix::sys::socket::getsockopt(socket, sockopt::RcvBuf),
    )
}

/// A non-blocking TCP listener on `addr` with SO_REUSEPORT (and SO_REUSEADDR, so a restart
/// does not wait for TIME_WAIT).
pub fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, SocketError> {
    let fd = reuseport_socket(addr, SockType::Stream)?;
    step(
        addr,
        "SO_REUSEADDR",
        setsockopt(&fd, sockopt::ReuseAddr, &true),
    )?;
    bind_to(&fd, addr)?;
    let backlog = Backlog::new(TCP_BACKLOG).expect("TCP_BACKLOG is within Backlog's range");
    step(addr, "listen", listen(&fd, backlog))?;
    Ok(TcpListener::from(fd))
}
