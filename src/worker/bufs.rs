//! Memory the kernel reads or writes for the io_uring UDP path: the provided-buffer ring that
//! multishot RecvMsg fills, and the send slots that SendMsg reads.
//!
//! Runs on: worker threads (io_uring backend).
//!
//! Both live at fixed addresses for the ring's whole life (allocated once, never resized) and
//! are freed only after the ring has been drained (`ring.rs`, `RingUdp::drop`).

use std::alloc::{self, Layout};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// Bytes of one provided receive buffer: the `io_uring_recvmsg_out` header, the source
/// address, and the datagram. A query longer than what remains is reported truncated and
/// dropped; real queries are far smaller (a question plus an OPT record).
pub const RECV_BUF_LEN: usize = 2048;

/// Room reserved for a source address in every receive buffer and send slot.
pub const ADDR_LEN: usize = std::mem::size_of::<libc::sockaddr_storage>();

/// The provided-buffer ring (`IORING_REGISTER_PBUF_RING`): `entries` descriptors, page
/// aligned as the kernel requires, pointing into one contiguous buffer area.
#[derive(Debug)]
pub struct BufRing {
    /// Base of the descriptor ring (page aligned, `entries` × 16 bytes).
    ring: *mut BufRingEntry,
    /// Layout `ring` was allocated with.
    ring_layout: Layout,
    /// The buffers themselves, `entries` × [`RECV_BUF_LEN`].
    buffers: Box<[u8]>,
    /// Number of descriptors (a power of two).
    entries: u16,
    /// Our copy of the tail index (the kernel reads the shared one).
    tail: u16,
}

impl BufRing {
    /// Allocates a ring of `entries` (a power of two ≤ 32768) buffers, all handed to the
    /// kernel once it is registered.
    pub fn new(entries: u16) -> BufRing {
        assert!(
            entries.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let ring_layout = Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .expect("a page-aligned layout of at most 32768 × 16 bytes is valid");
        // SAFETY: the layout has a non-zero size (entries ≥ 1, 16-byte descriptors).
        let ring = unsafe { alloc::alloc_zeroed(ring_layout) }.cast::<BufRingEntry>();
        if ring.is_null() {
            alloc::handle_alloc_error(ring_layout);
        }
        let mut bufs = BufRing {
            ring,
            ring_layout,
            buffers: vec![0u8; usize::from(entries) * RECV_BUF_LEN].into_boxed_slice(),
            entries,
            tail: 0,
        };
        for bid in 0..entries {
            bufs.stage(bid);
        }
        bufs.publish();
        bufs
    }

    /// Address of the descriptor ring, for registration.
    pub fn ring_addr(&self) -> u64 {
        self.ring as u64
    }

    /// Number of descriptors.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// The bytes of buffer `bid`, of which the kernel filled the first `len`.
    pub fn filled(&self, bid: u16, len: usize) -> Option<&[u8]> {
        let start = usize::from(bid) * RECV_BUF_LEN;
        self.buffers.get(start..start + len.min(RECV_BUF_LEN))
    }

    /// Hands buffer `bid` back to the kernel (visible after [`BufRing::publish`]).
    pub fn recycle(&mut self, bid: u16) {
        self.stage(bid);
    }

    /// Writes the descriptor for buffer `bid` at our tail.
    fn stage(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        let addr = self.buffers.as_ptr() as u64 + (usize::from(bid) * RECV_BUF_LEN) as u64;
        // SAFETY: `index < entries`, so the offset stays inside the descriptor allocation.
        let slot = unsafe { self.ring.add(index) };
        // SAFETY: `slot` is in bounds and aligned. The kernel reads only descriptors between
        // its head and the published tail; this one is past the published tail, so nothing
        // else accesses it now.
        let entry = unsafe { &mut *slot };
        entry.set_addr(addr);
        entry.set_len(RECV_BUF_LEN as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes every staged descriptor to the kernel (release store of the shared tail).
    pub fn publish(&self) {
        // SAFETY: `self.ring` is the page-aligned base of a live descriptor ring, as
        // `BufRingEntry::tail` requires.
        let tail = unsafe { BufRingEntry::tail(self.ring) }.cast_mut();
        // SAFETY: the tail is a naturally aligned u16 inside the ring allocation, which the
        // kernel reads concurrently; an atomic store is the only correct way to write it.
        let shared = unsafe { AtomicU16::from_ptr(tail) };
        shared.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: `ring` was allocated in `new` with `ring_layout` and is freed once, here.
        // The owner unregisters or destroys the ring and drains it before dropping this.
        unsafe { alloc::dealloc(self.ring.cast(), self.ring_layout) };
    }
}

/// A send slot's fixed-address parts: the message header the kernel reads, its one iovec,
/// and the destination address.
#[repr(C)]
struct SlotHeader {
    /// `sendmsg` header pointing at `iov` and `addr`.
    msghdr: libc::msghdr,
    /// Points into the slot's buffer.
    iov: libc::iovec,
    /// Destination `sockaddr_in`/`sockaddr_in6`.
    addr: AddrBytes,
}

/// Raw socket address bytes, aligned like `sockaddr_storage`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct AddrBytes([u8; ADDR_LEN]);

/// Send slots: fixed buffers for replies, each `Free` or `InFlight` (its SendMsg not yet
/// completed). A slot in flight is not touched until its CQE is reaped.
pub struct SendSlots {
    /// Per-slot headers (never moved: boxed slice allocated once).
    headers: Box<[SlotHeader]>,
    /// Reply bytes, `slot_len` per slot.
    buffers: Box<[u8]>,
    /// Bytes per slot.
    slot_len: usize,
    /// Free slots, used as a stack so the same few stay hot in cache.
    free: Vec<u16>,
}

impl std::fmt::Debug for SendSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendSlots")
            .field("slots", &self.headers.len())
            .field("free", &self.free.len())
            .finish()
    }
}

impl SendSlots {
    /// `count` slots of `slot_len` bytes each.
    pub fn new(count: u16, slot_len: usize) -> SendSlots {
        let headers = (0..count)
            .map(|_| SlotHeader {
                // SAFETY: msghdr and iovec are plain C structs for which all-zero bytes
                // (null pointers, zero lengths) are a valid value.
                msghdr: unsafe { std::mem::zeroed() },
                // SAFETY: as above.
                iov: unsafe { std::mem::zeroed() },
                addr: AddrBytes([0; ADDR_LEN]),
            })
            .collect();
        SendSlots {
            headers,
            buffers: vec![0u8; usize::from(count) * slot_len].into_boxed_slice(),
            slot_len,
            free: (0..count).rev().collect(),
        }
    }

    /// Takes a free slot (now owned by the caller until [`SendSlots::prepare`] or
    /// [`SendSlots::release`]).
    pub fn acquire(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// The writable buffer of an acquired slot.
    pub fn buffer(&mut self, slot: u16) -> &mut [u8] {
        let start = usize::from(slot) * self.slot_len;
        &mut self.buffers[start..start + self.slot_len]
    }

    /// Fills the slot's header for sending its first `len` bytes to `peer`; returns the
    /// `msghdr` pointer for a SendMsg SQE. The slot is in flight from here until its CQE.
    pub fn prepare(&mut self, slot: u16, len: usize, peer: SocketAddr) -> *const libc::msghdr {
        let start = usize::from(slot) * self.slot_len;
        let base = self.buffers[start..].as_mut_ptr();
        let header = &mut self.headers[usize::from(slot)];
        let addr_len = encode_addr(peer, &mut header.addr.0);
        header.iov.iov_base = base.cast();
        header.iov.iov_len = len.min(self.slot_len);
        header.msghdr.msg_name = header.addr.0.as_mut_ptr().cast();
        header.msghdr.msg_namelen = addr_len as libc::socklen_t;
        header.msghdr.msg_iov = &mut header.iov;
        header.msghdr.msg_iovlen = 1;
        &header.msghdr
    }

    /// Returns a slot to the free list (its CQE was reaped, or it was never submitted).
    pub fn release(&mut self, slot: u16) {
        self.free.push(slot);
    }

    /// Slots currently in flight or held.
    pub fn busy(&self) -> usize {
        self.headers.len() - self.free.len()
    }
}

/// Writes `addr` as a `sockaddr_in`/`sockaddr_in6` into `out`; returns its length.
fn encode_addr(addr: SocketAddr, out: &mut [u8; ADDR_LEN]) -> usize {
    out.fill(0);
    match addr {
        SocketAddr::V4(v4) => {
            out[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&v4.port().to_be_bytes());
            out[4..8].copy_from_slice(&v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            out[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&v6.port().to_be_bytes());
            out[4..8].copy_from_slice(&v6.flowinfo().to_be_bytes());
            out[8..24].copy_from_slice(&v6.ip().octets());
            out[24..28].copy_from_slice(&v6.scope_id().to_ne_bytes());
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    }
}

/// Reads a `sockaddr_in`/`sockaddr_in6` from raw bytes (as the kernel wrote it).
pub fn decode_addr(raw: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(raw.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(raw.get(2..4)?.try_into().ok()?);
    if family == libc::AF_INET as u16 {
        let ip: [u8; 4] = raw.get(4..8)?.try_into().ok()?;
        Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
    } else if family == libc::AF_INET6 as u16 {
        let flowinfo = u32::from_be_bytes(raw.get(4..8)?.try_into().ok()?);
        let ip: [u8; 16] = raw.get(8..24)?.try_into().ok()?;
        let scope = u32::from_ne_bytes(raw.get(24..28)?.try_into().ok()?);
        Some(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            flowinfo,
            scope,
        )))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        let mut raw = [0u8; ADDR_LEN];
        for addr in ["127.0.0.1:53", "[::1]:5353", "[fe80::1%2]:53"] {
            let addr: SocketAddr = addr.parse().expect("valid");
            encode_addr(addr, &mut raw);
            assert_eq!(decode_addr(&raw), Some(addr));
        }
        assert_eq!(decode_addr(&[0; 4]), None);
    }

    #[test]
    fn slots_are_reused_lifo() {
        let mut slots = SendSlots::new(4, 512);
        let first = slots.acquire().expect("free");
        slots.release(first);
        assert_eq!(slots.acquire(), Some(first));
        assert_eq!(slots.busy(), 1);
    }
}
