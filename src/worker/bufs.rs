//! Memory the kernel reads or writes for the io_uring UDP path: the provided-buffer ring that
//! multishot RecvMsg fills, and the send slots that Send reads.
//!
//! Runs on: worker threads (io_uring backend).
//!
//! Both live at fixed addresses for the ring's whole life (mapped once, never resized) and
//! are unmapped only after the ring has been drained (`ring.rs`, `RingUdp::drop`). They are
//! anonymous mappings, not heap allocations: page aligned as the kernel wants the descriptor
//! ring, zero without a memset, and resident only as far as datagrams have touched them
//! (transparent huge pages are off for the process, main.rs), whatever the global allocator
//! does with large zeroed blocks.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};

/// Bytes of one provided receive buffer: the `io_uring_recvmsg_out` header, the source
/// address, and the datagram. A query longer than what remains is reported truncated and
/// dropped; real queries are far smaller (a question plus an OPT record).
pub const RECV_BUF_LEN: usize = 2048;

/// Room reserved for a source address in every receive buffer and send slot.
pub const ADDR_LEN: usize = std::mem::size_of::<libc::sockaddr_storage>();

/// Byte offsets of the fields of one descriptor (`struct io_uring_buf`: `addr` u64, `len` u32,
/// `bid` u16, `resv` u16; descriptor 0's `resv` is the ring's shared tail). Written through raw
/// pointers: the io-uring crate's setters need a `&mut` over the whole descriptor, tail included.
const DESC_ADDR_AT: usize = 0;
/// See [`DESC_ADDR_AT`].
const DESC_LEN_AT: usize = 8;
/// See [`DESC_ADDR_AT`].
const DESC_BID_AT: usize = 12;
const _: () = assert!(std::mem::size_of::<BufRingEntry>() == 16);

/// The provided-buffer ring (`IORING_REGISTER_PBUF_RING`): `entries` descriptors, page
/// aligned as the kernel requires, pointing into one contiguous buffer area.
#[derive(Debug)]
pub struct BufRing {
    /// The descriptor ring (page aligned, `entries` × 16 bytes).
    ring: Area,
    /// The buffers themselves, `entries` × [`RECV_BUF_LEN`]. Raw memory, never borrowed as a
    /// whole: the kernel writes some buffers while we read others.
    buffers: Area,
    /// Number of descriptors (a power of two).
    entries: u16,
    /// Our copy of the tail index (the kernel reads the shared one).
    tail: u16,
}

impl BufRing {
    /// Maps a ring of `entries` (a power of two ≤ 32768) buffers, all handed to the kernel
    /// once it is registered. Fails if the memory cannot be mapped (address-space or map-count
    /// limits).
    pub fn new(entries: u16) -> io::Result<BufRing> {
        assert!(
            entries.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let mut bufs = BufRing {
            ring: Area::new(usize::from(entries) * std::mem::size_of::<BufRingEntry>())?,
            buffers: Area::new(usize::from(entries) * RECV_BUF_LEN)?,
            entries,
            tail: 0,
        };
        for bid in 0..entries {
            bufs.stage(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Gives the descriptors and buffers up for good: they stay mapped for the process's life,
    /// for a kernel that may still write them (a ring that did not drain).
    pub fn leak(&mut self) {
        self.ring.leak();
        self.buffers.leak();
    }

    /// Address of the descriptor ring, for registration.
    pub fn ring_addr(&self) -> u64 {
        self.ring.addr(0) as u64
    }

    /// The descriptor ring's base, as the io-uring crate's helpers take it.
    fn descriptors(&self) -> *mut BufRingEntry {
        self.ring.addr(0).cast()
    }

    /// Number of descriptors.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// The bytes of buffer `bid`, of which the kernel filled the first `len`.
    pub fn filled(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.entries {
            return None;
        }
        let start = usize::from(bid) * RECV_BUF_LEN;
        // SAFETY: buffer `bid` lies inside the area (bid < entries); its CQE handed it to us
        // and the kernel does not write it again until `recycle(bid)` republishes it, which
        // needs `&mut self` and so cannot happen while this borrow lives.
        Some(unsafe { self.buffers.slice(start, len.min(RECV_BUF_LEN)) })
    }

    /// Hands buffer `bid` back to the kernel (visible after [`BufRing::publish`]).
    pub fn recycle(&mut self, bid: u16) {
        self.stage(bid);
    }

    /// Writes the descriptor for buffer `bid` at our tail.
    fn stage(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        let addr = self.buffers.addr(usize::from(bid) * RECV_BUF_LEN) as u64;
        // `index < entries`: in bounds of the descriptor mapping, whose page-aligned base suits
        // the 16-byte descriptors, so each field below is in bounds and naturally aligned.
        let slot = self.descriptors().wrapping_add(index).cast::<u8>();
        // SAFETY: in bounds and aligned, as above (for all three writes). The kernel reads only
        // descriptors between its head and the published tail; this one is past the published
        // tail, so nothing else reads these fields now. No reference to the descriptor is
        // formed: descriptor 0's last field is the shared tail, which the kernel reads at any
        // time (`publish`).
        unsafe { slot.wrapping_add(DESC_ADDR_AT).cast::<u64>().write(addr) };
        // SAFETY: as above.
        unsafe {
            slot.wrapping_add(DESC_LEN_AT)
                .cast::<u32>()
                .write(RECV_BUF_LEN as u32)
        };
        // SAFETY: as above.
        unsafe { slot.wrapping_add(DESC_BID_AT).cast::<u16>().write(bid) };
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes every staged descriptor to the kernel (release store of the shared tail).
    pub fn publish(&self) {
        // SAFETY: `descriptors()` is the page-aligned base of a live descriptor ring, as
        // `BufRingEntry::tail` requires.
        let tail = unsafe { BufRingEntry::tail(self.descriptors()) }.cast_mut();
        // SAFETY: the tail is a naturally aligned u16 inside the ring mapping, which the
        // kernel reads concurrently; an atomic store is the only correct way to write it.
        let shared = unsafe { AtomicU16::from_ptr(tail) };
        shared.store(self.tail, Ordering::Release);
    }
}

/// Raw socket address bytes, aligned like `sockaddr_storage`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct AddrBytes([u8; ADDR_LEN]);

/// One reply ready to send: where its bytes and its destination address are. Both point into
/// a [`SendSlots`] slot and stay valid while the slot is in flight.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing {
    /// First byte of the reply.
    pub buf: *const u8,
    /// Reply length.
    pub len: u32,
    /// Destination `sockaddr_in`/`sockaddr_in6`.
    pub addr: *const libc::sockaddr,
    /// Its length.
    pub addr_len: libc::socklen_t,
}

/// Send slots: fixed buffers for replies, each `Free` or `InFlight` (its Send not yet
/// completed). A slot in flight is not touched until its CQE is reaped.
pub struct SendSlots {
    /// Per-slot destination addresses (never moved: boxed slice allocated once).
    headers: Box<[AddrBytes]>,
    /// Reply bytes, `slot_len` per slot. Raw memory, never borrowed as a whole: the kernel
    /// reads slots in flight while we fill others.
    buffers: Area,
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
    /// `count` slots of `slot_len` bytes each. Fails if the buffers cannot be mapped.
    pub fn new(count: u16, slot_len: usize) -> io::Result<SendSlots> {
        let headers = (0..count).map(|_| AddrBytes([0; ADDR_LEN])).collect();
        Ok(SendSlots {
            headers,
            buffers: Area::new(usize::from(count) * slot_len)?,
            slot_len,
            free: (0..count).rev().collect(),
        })
    }

    /// Gives the buffers and destination addresses up for good: they stay allocated for the
    /// process's life, for a kernel that may still read them (sends that did not complete).
    /// No slot is free afterwards.
    pub fn leak(&mut self) {
        self.buffers.leak();
        std::mem::forget(std::mem::take(&mut self.headers));
        self.free.clear();
    }

    /// Takes a free slot (now owned by the caller until [`SendSlots::prepare`] or
    /// [`SendSlots::release`]).
    pub fn acquire(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// The writable buffer of an acquired slot.
    pub fn buffer(&mut self, slot: u16) -> &mut [u8] {
        assert!(
            usize::from(slot) < self.headers.len(),
            "slot numbers come from acquire()"
        );
        let start = usize::from(slot) * self.slot_len;
        // SAFETY: the slot lies inside the area (slot < count); it was acquired and is not in
        // flight, so the kernel does not read it, and the `&mut self` borrow keeps this the
        // only reference to it.
        unsafe { self.buffers.slice_mut(start, self.slot_len) }
    }

    /// Records `peer` as the slot's destination for sending its first `len` bytes; returns
    /// the pointers for a Send SQE (IORING_OP_SEND with a destination address, which spares
    /// the kernel copying and checking a msghdr and iovec per reply). The slot is in flight
    /// from here until its CQE.
    pub fn prepare(&mut self, slot: u16, len: usize, peer: SocketAddr) -> Outgoing {
        let start = usize::from(slot) * self.slot_len;
        let buf = self.buffers.addr(start).cast_const();
        let addr = &mut self.headers[usize::from(slot)];
        let addr_len = encode_addr(peer, &mut addr.0);
        Outgoing {
            buf,
            len: len.min(self.slot_len) as u32,
            addr: addr.0.as_ptr().cast(),
            addr_len: addr_len as libc::socklen_t,
        }
    }

    /// The first `len` bytes of `slot`, for a Send on a connected socket (no address); the slot
    /// is in flight from here until its CQE.
    pub fn connected(&mut self, slot: u16, len: usize) -> (*const u8, u32) {
        let start = usize::from(slot) * self.slot_len;
        let buf = self.buffers.addr(start).cast_const();
        (buf, len.min(self.slot_len) as u32)
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

/// A zeroed anonymous mapping at a fixed address, shared with the kernel by raw pointer only
/// (the owner unregisters it from the ring, or destroys the ring, and drains it before the drop).
#[derive(Debug)]
struct Area {
    /// Base address: page aligned when `len` > 0; when `len` is 0, dangling, never
    /// dereferenced and never unmapped.
    base: *mut u8,
    /// Bytes mapped.
    len: usize,
}

impl Area {
    /// A zeroed, page-aligned area of `len` bytes, or the mmap error.
    fn new(len: usize) -> io::Result<Area> {
        let Some(length) = NonZeroUsize::new(len) else {
            return Ok(Area {
                base: NonNull::dangling().as_ptr(),
                len,
            });
        };
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a private anonymous mapping where the kernel chooses aliases no other memory.
        let base = unsafe { mmap_anonymous(None, length, prot, MapFlags::MAP_PRIVATE) }?;
        Ok(Area {
            base: base.as_ptr().cast(),
            len,
        })
    }

    /// Keeps the mapping for the process's life: the drop will not unmap it.
    fn leak(&mut self) {
        self.len = 0;
    }

    /// The address `offset` bytes in (computed without creating a reference).
    fn addr(&self, offset: usize) -> *mut u8 {
        self.base.wrapping_add(offset)
    }

    /// Borrows `len` bytes at `offset`.
    ///
    /// # Safety
    ///
    /// `offset + len` must be within the area, and nobody (the kernel included) may write
    /// those bytes while the borrow lives.
    unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        debug_assert!(offset + len <= self.len);
        // SAFETY: in bounds and not written concurrently, as the caller guarantees.
        unsafe { std::slice::from_raw_parts(self.addr(offset), len) }
    }

    /// Mutably borrows `len` bytes at `offset`.
    ///
    /// # Safety
    ///
    /// `offset + len` must be within the area, and nobody (the kernel included) may read or
    /// write those bytes while the borrow lives.
    unsafe fn slice_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        debug_assert!(offset + len <= self.len);
        // SAFETY: in bounds and exclusively ours, as the caller guarantees.
        unsafe { std::slice::from_raw_parts_mut(self.addr(offset), len) }
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        if let Some(base) = NonNull::new(self.base.cast()).filter(|_| self.len > 0) {
            // SAFETY: mapped in `new` with this length; unmapped once. Owners drain the ring
            // before dropping (see `RingUdp::drop`), so the kernel no longer uses it, and no
            // borrow of it outlives `self`. An error here could only leak the mapping.
            let _ = unsafe { munmap(base, self.len) };
        }
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
    fn an_area_that_cannot_be_mapped_is_an_error() {
        // Past any x86-64 or arm64 user address space: mmap fails with ENOMEM, and the worker
        // gets an error to report (and `io = "auto"` falls back to epoll) instead of aborting.
        let error = Area::new(1 << 60).expect_err("2^60 bytes cannot be mapped");
        assert_eq!(error.raw_os_error(), Some(libc::ENOMEM));
        let mut empty = Area::new(0).expect("an empty area needs no mapping");
        empty.leak();
        let mut slots = SendSlots::new(2, 512).expect("2 slots");
        slots.leak();
        assert_eq!(slots.acquire(), None, "a leaked slot set lends nothing");
    }

    #[test]
    fn descriptors_point_at_their_buffers_and_leave_the_tail_alone() {
        let mut bufs = BufRing::new(4).expect("4 buffers");
        let shared_tail = |bufs: &BufRing| {
            // SAFETY: the base of a live descriptor ring.
            let tail = unsafe { BufRingEntry::tail(bufs.descriptors()) };
            // SAFETY: an aligned u16 in the mapping; no kernel shares it in this test.
            unsafe { *tail }
        };
        assert_eq!(shared_tail(&bufs), 4, "all four published");
        // Buffers come back in another order; the next free slot is descriptor 0 again,
        // whose last two bytes are the tail the kernel reads.
        for bid in [2, 0] {
            bufs.recycle(bid);
        }
        assert_eq!(
            shared_tail(&bufs),
            4,
            "staging does not publish nor touch the tail"
        );
        bufs.publish();
        assert_eq!(shared_tail(&bufs), 6);
        for (index, bid) in [(0, 2), (1, 0), (2, 2), (3, 3)] {
            let descriptor = bufs.descriptors().wrapping_add(index);
            // SAFETY: index < entries, inside the live mapping.
            let entry = unsafe { &*descriptor };
            let base = bufs.buffers.addr(0) as u64;
            assert_eq!(entry.addr(), base + u64::from(bid) * RECV_BUF_LEN as u64);
            assert_eq!(entry.len(), RECV_BUF_LEN as u32);
            assert_eq!(entry.bid(), bid);
        }
    }

    #[test]
    fn slots_are_reused_lifo() {
        let mut slots = SendSlots::new(4, 512).expect("4 slots of 512 bytes");
        let first = slots.acquire().expect("free");
        slots.release(first);
        assert_eq!(slots.acquire(), Some(first));
        assert_eq!(slots.busy(), 1);
    }
}
