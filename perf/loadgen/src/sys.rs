//! Raw `recvmmsg`/`sendmmsg` batches, nanosecond `epoll_pwait2` and a signal stop flag: the
//! crate's only unsafe code.
//!
//! Runs on: any thread (a [`Batch`] is owned by the one thread that built it).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Linux `UDP_SEGMENT` (include/uapi/linux/udp.h): the cmsg type (level `SOL_UDP`) carrying the
/// segment size of a UDP GSO send. Not exported by the libc crate for glibc targets.
const UDP_SEGMENT: libc::c_int = 103;

/// Most datagrams put in one GSO send: the kernel's `UDP_MAX_SEGMENTS` was 64 when UDP GSO
/// appeared (Linux 4.18) and is 128 on newer kernels; 64 works on all.
const MAX_GSO_SEGMENTS: usize = 64;

/// Largest payload of one GSO send (a GSO skb must fit the 64 KiB IP datagram limit).
const MAX_GSO_BYTES: usize = 65_000;

/// One `UDP_SEGMENT` control message: the `CMSG_SPACE(sizeof(u16))` bytes that `sendmsg` reads.
#[repr(C)]
#[derive(Clone, Copy)]
struct SegmentControl {
    /// `cmsg_len = CMSG_LEN(2)`, level `SOL_UDP`, type `UDP_SEGMENT`.
    header: libc::cmsghdr,
    /// Payload bytes per datagram.
    segment_bytes: u16,
    /// Pads to `CMSG_SPACE(2)`, a multiple of the header's 8-byte alignment.
    padding: [u8; 6],
}

/// `capacity` datagram buffers plus the `mmsghdr`/`iovec`/address arrays the kernel fills or
/// reads in one `recvmmsg` or `sendmmsg` call.
///
/// The kernel-facing pointers inside `headers` and `iovecs` are re-derived from `&mut self` right
/// before every syscall ([`Batch::arm`]), so no Rust reference to the buffers is alive while the
/// kernel writes them and no pointer outlives a move of the boxed slices. Re-arming costs three
/// stores per message, which is noise next to the syscall.
pub struct Batch {
    /// `capacity * buffer_bytes` bytes: slot `i` is `buffers[i * buffer_bytes..][..buffer_bytes]`.
    buffers: Box<[u8]>,
    /// Size of one slot in `buffers`.
    buffer_bytes: usize,
    /// Datagram length of each slot: set by [`Batch::recv`] or by the caller before a send.
    lens: Box<[usize]>,
    /// One iovec per slot, pointing at that slot.
    iovecs: Box<[libc::iovec]>,
    /// Peer address per slot; empty for batches on connected sockets.
    addrs: Box<[libc::sockaddr_storage]>,
    /// The array handed to the kernel.
    headers: Box<[libc::mmsghdr]>,
    /// One `UDP_SEGMENT` cmsg per header, for [`Batch::send_segmented`].
    controls: Box<[SegmentControl]>,
    /// Datagrams in each message of the last [`Batch::send_segmented`].
    runs: Box<[usize]>,
}

impl Batch {
    /// Builds a batch of `capacity` slots of `buffer_bytes` each. With `with_addrs` every slot
    /// also records its peer address (unconnected server sockets); without it the batch is for a
    /// connected socket and carries no addresses.
    pub fn new(capacity: usize, buffer_bytes: usize, with_addrs: bool) -> Self {
        let empty_iovec = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        };
        let empty_header = libc::mmsghdr {
            msg_hdr: libc::msghdr {
                msg_name: ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: ptr::null_mut(),
                msg_iovlen: 1,
                msg_control: ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            },
            msg_len: 0,
        };
        let empty_control = SegmentControl {
            header: libc::cmsghdr {
                cmsg_len: size_of::<libc::cmsghdr>() + size_of::<u16>(),
                cmsg_level: libc::SOL_UDP,
                cmsg_type: UDP_SEGMENT,
            },
            segment_bytes: 0,
            padding: [0; 6],
        };
        let addrs = if with_addrs {
            // SAFETY: sockaddr_storage is a plain C struct of integers and byte arrays, for which
            // all-zero bytes are a valid value (family AF_UNSPEC).
            let zero: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            vec![zero; capacity].into_boxed_slice()
        } else {
            Box::default()
        };
        Self {
            buffers: vec![0; capacity * buffer_bytes].into_boxed_slice(),
            buffer_bytes,
            lens: vec![0; capacity].into_boxed_slice(),
            iovecs: vec![empty_iovec; capacity].into_boxed_slice(),
            addrs,
            headers: vec![empty_header; capacity].into_boxed_slice(),
            controls: vec![empty_control; capacity].into_boxed_slice(),
            runs: vec![0; capacity].into_boxed_slice(),
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.headers.len()
    }

    /// The datagram in slot `i` (as received, or as filled for sending).
    pub fn packet(&self, i: usize) -> &[u8] {
        let start = i * self.buffer_bytes;
        &self.buffers[start..start + self.lens[i]]
    }

    /// Whether the datagram received into slot `i` was longer than the slot and got cut short.
    pub fn truncated(&self, i: usize) -> bool {
        self.headers[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }

    /// Mutable access to the datagram in slot `i`, at its current length.
    pub fn packet_mut(&mut self, i: usize) -> &mut [u8] {
        let start = i * self.buffer_bytes;
        &mut self.buffers[start..start + self.lens[i]]
    }

    /// Copies `bytes` into slot `i` for sending and returns the copy for patching.
    ///
    /// Panics if `bytes` is longer than a slot; callers size slots for their longest datagram.
    pub fn fill(&mut self, i: usize, bytes: &[u8]) -> &mut [u8] {
        assert!(
            bytes.len() <= self.buffer_bytes,
            "datagram larger than a batch slot"
        );
        self.lens[i] = bytes.len();
        let slot = self.packet_mut(i);
        slot.copy_from_slice(bytes);
        slot
    }

    /// Points headers `range` at their slots. For a receive every iovec spans the whole slot and
    /// the address length is reset (the kernel overwrites it); for a send the iovec spans
    /// `lens[i]` and the address length from the receive is kept, so replies go back to sender.
    fn arm(&mut self, start: usize, end: usize, for_receive: bool) {
        let with_addrs = !self.addrs.is_empty();
        for i in start..end {
            let slot = &mut self.buffers[i * self.buffer_bytes..][..self.buffer_bytes];
            self.iovecs[i].iov_base = slot.as_mut_ptr().cast();
            self.iovecs[i].iov_len = if for_receive {
                self.buffer_bytes
            } else {
                self.lens[i]
            };
            let header = &mut self.headers[i].msg_hdr;
            header.msg_iov = &mut self.iovecs[i];
            header.msg_iovlen = 1;
            header.msg_control = ptr::null_mut();
            header.msg_controllen = 0;
            if with_addrs {
                header.msg_name = ptr::from_mut(&mut self.addrs[i]).cast();
                if for_receive {
                    header.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                }
            }
        }
    }

    /// Receives up to [`Batch::capacity`] datagrams with one `recvmmsg(2)`; `flags` is e.g.
    /// `MSG_DONTWAIT` or `MSG_WAITFORONE`. Returns how many slots were filled; their lengths
    /// are then readable through [`Batch::packet`].
    pub fn recv(&mut self, fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<usize> {
        let capacity = self.capacity();
        self.arm(0, capacity, true);
        // SAFETY: `arm` just pointed headers[..capacity] at iovecs, slots and addresses owned by
        // `self`, which the `&mut self` borrow keeps alive and unaliased for the whole call. The
        // kernel writes at most `iov_len` (= slot size) bytes per slot and `msg_namelen` bytes
        // per address, and a null timeout is allowed.
        let received = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.headers.as_mut_ptr(),
                capacity as libc::c_uint,
                flags,
                ptr::null_mut(),
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let received = received as usize;
        for i in 0..received {
            self.lens[i] = (self.headers[i].msg_len as usize).min(self.buffer_bytes);
        }
        Ok(received)
    }

    /// Sends slots `start..end` with one `sendmmsg(2)` (to the recorded peer addresses, if the
    /// batch has them). Returns how many were sent: fewer than asked means the first unsent one
    /// failed or would block.
    pub fn send(&mut self, fd: BorrowedFd<'_>, start: usize, end: usize) -> io::Result<usize> {
        assert!(
            start <= end && end <= self.capacity(),
            "send range outside the batch"
        );
        if start == end {
            return Ok(0);
        }
        self.arm(start, end, false);
        let headers = &mut self.headers[start..end];
        // SAFETY: `arm` just pointed these headers at iovecs, slots and addresses owned by
        // `self`, which the `&mut self` borrow keeps alive for the call; the kernel only reads
        // them (and writes `msg_len`, inside `headers`).
        let sent = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                headers.as_mut_ptr(),
                headers.len() as libc::c_uint,
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }
}

impl Batch {
    /// Sends slots `0..count` (on a connected socket) as UDP GSO sends: each run of equal-length
    /// datagrams (at most 64) becomes one message whose iovecs are the run's slots and whose
    /// `UDP_SEGMENT` cmsg makes the kernel split it back into those datagrams, so the send path
    /// (skb, IP output, loopback) runs once per run instead of once per datagram. The receiver
    /// still sees one datagram per query. Returns how many datagrams were sent; fewer than
    /// `count` means the message holding the first unsent one failed or would block.
    pub fn send_segmented(&mut self, fd: BorrowedFd<'_>, count: usize) -> io::Result<usize> {
        assert!(count <= self.capacity(), "send range outside the batch");
        assert!(
            self.addrs.is_empty(),
            "GSO batches are for connected sockets"
        );
        self.arm(0, count, false);
        let mut messages = 0;
        let mut start = 0;
        while start < count {
            let segment_bytes = self.lens[start];
            let mut end = start + 1;
            while end < count
                && self.lens[end] == segment_bytes
                && end - start < MAX_GSO_SEGMENTS
                && (end - start + 1) * segment_bytes <= MAX_GSO_BYTES
            {
                end += 1;
            }
            let header = &mut self.headers[messages].msg_hdr;
            header.msg_iov = &mut self.iovecs[start];
            header.msg_iovlen = end - start;
            if end - start > 1 {
                let control = &mut self.controls[messages];
                control.segment_bytes =
                    u16::try_from(segment_bytes).expect("a GSO run is at most 65,000 bytes");
                header.msg_control = ptr::from_mut(control).cast();
                header.msg_controllen = size_of::<SegmentControl>();
            }
            self.runs[messages] = end - start;
            messages += 1;
            start = end;
        }
        let headers = &mut self.headers[..messages];
        // SAFETY: the loop above pointed each of these headers at a run of iovecs (armed by
        // `arm` to slots owned by `self`) and, for runs longer than one, at a control message
        // owned by `self`; the `&mut self` borrow keeps all of it alive for the call, and the
        // kernel only reads them (and writes `msg_len`, inside `headers`).
        let sent = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                headers.as_mut_ptr(),
                messages as libc::c_uint,
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.runs[..sent as usize].iter().sum())
    }
}

/// Waits on `epoll` for up to `events.len()` events or until `timeout` passes, with nanosecond
/// precision (`epoll_pwait2(2)`, Linux ≥ 5.11; plain `epoll_wait` rounds to milliseconds, too
/// coarse to pace 20k queries per second). Returns the number of events; an interrupted wait
/// returns 0.
pub fn epoll_wait_precise(
    epoll: BorrowedFd<'_>,
    events: &mut [libc::epoll_event],
    timeout: Duration,
) -> io::Result<usize> {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    let capacity = events.len().min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: `events` is a live, exclusively borrowed buffer of `capacity` entries, `timeout`
    // lives on this stack frame for the call, and a null signal mask is allowed.
    let ready = unsafe {
        libc::epoll_pwait2(
            epoll.as_raw_fd(),
            events.as_mut_ptr(),
            capacity,
            &timeout,
            ptr::null(),
        )
    };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(error);
    }
    Ok(ready as usize)
}

/// Set by the SIGTERM/SIGINT handler that [`install_stop_flag`] installs.
static STOP: AtomicBool = AtomicBool::new(false);

/// Signal handler: only stores to an atomic, which is async-signal-safe.
extern "C" fn on_stop_signal(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGTERM and SIGINT set the returned flag instead of killing the process. The handler is
/// installed without `SA_RESTART`, so a blocking receive returns `EINTR` and the caller can check
/// the flag and report before it exits.
///
/// # Threads
/// Written by the signal handler, read by the thread that polls it; `Relaxed` is enough because
/// the flag guards no other data.
pub fn install_stop_flag() -> nix::Result<&'static AtomicBool> {
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only performs an atomic store, which is async-signal-safe, and it
        // replaces no handler that other code relies on (the binaries install none).
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(&STOP)
}
