//! Per-worker counters, written by one worker and read by the control side.
//!
//! Runs on: worker threads (writes), control thread (reads).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

/// Names one counter in [`WorkerStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// Queries received over UDP (parsed or not).
    UdpQueries,
    /// Queries received over TCP.
    TcpQueries,
    /// Answered from the cache.
    CacheHits,
    /// Not in the cache (or expired).
    CacheMisses,
    /// Misses sent upstream.
    UpstreamRequests,
    /// Misses that joined an identical in-flight miss instead.
    Coalesced,
    /// Upstream answers received back.
    UpstreamAnswers,
    /// Upstream failures (timeout, no zone) turned into SERVFAIL.
    UpstreamFailures,
    /// Upstream answers that did not validate (turned into SERVFAIL).
    UpstreamBadAnswers,
    /// SERVFAIL because the upstream queue or pending table was full.
    Overloaded,
    /// Dropped: shorter than a header.
    DropTooShort,
    /// Dropped: QR=1.
    DropResponse,
    /// FORMERR sent.
    FormErr,
    /// NOTIMP sent.
    NotImp,
    /// BADVERS sent.
    BadVers,
    /// UDP replies sent with TC=1.
    Truncated,
    /// Replies that could not be sent (socket full, send slots exhausted).
    SendErrors,
    /// TCP connections accepted.
    TcpAccepted,
    /// TCP connections refused by the per-worker cap.
    TcpRefused,
    /// TCP connections closed for idleness.
    TcpIdleClosed,
    /// Entries evicted by capacity.
    Evictions,
}

/// Number of counters.
const COUNTERS: usize = Counter::Evictions as usize + 1;

/// One worker's counters, on their own cache lines.
///
/// # Threads
///
/// Exactly one writer: the worker that owns it, with `Relaxed` load + store (no read-modify-
/// write, so no locked instruction on the hit path). Readers (the control thread, tests) load
/// with `Relaxed`; a value may be a moment stale, never torn.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerStats {
    /// Indexed by [`Counter`].
    counters: [AtomicU64; COUNTERS],
}

impl WorkerStats {
    /// Adds one. Only the owning worker may call this.
    #[inline]
    pub fn bump(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Adds `amount`. Only the owning worker may call this.
    #[inline]
    pub fn add(&self, counter: Counter, amount: u64) {
        let cell = &self.counters[counter as usize];
        cell.store(cell.load(Ordering::Relaxed) + amount, Ordering::Relaxed);
    }

    /// Sets a gauge-like value. Only the owning worker may call this.
    pub fn set(&self, counter: Counter, value: u64) {
        self.counters[counter as usize].store(value, Ordering::Relaxed);
    }

    /// Reads a counter (any thread).
    pub fn read(&self, counter: Counter) -> u64 {
        self.counters[counter as usize].load(Ordering::Relaxed)
    }
}
