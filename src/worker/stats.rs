//! Per-worker counters, written by one worker and read by the control side.
//!
//! Runs on: worker threads (writes), control thread and `ringdns-http` (reads).
//!
//! Besides the flat [`Counter`]s, a worker keeps the CoreDNS-shaped series here: requests,
//! responses, durations and sizes, cache hits and misses, broken down by listen socket, zone,
//! protocol, qtype, rcode and answering plugin. Every dimension is a small bounded set fixed at
//! start-up ([`Layout`]), so each series is one slot of a flat array sized once: recording a
//! query is a handful of index computations and `Relaxed` load + store pairs, no allocation and
//! no read-modify-write. The control side sums the workers' slots at scrape time
//! (`crate::metrics`).
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// UDP queries longer than the receive buffer (only their start was read), answered
    /// TC=1 with the question so the client asks again over TCP.
    TooLong,
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
    /// `id.server.` CH TXT queries answered locally (the health probe, RFC 4892).
    IdServer,
    /// UDP receives that failed with an error (io_uring backend; the socket is re-armed on
    /// the next tick rather than at once).
    ReceiveErrors,
}

/// Number of counters.
const COUNTERS: usize = Counter::ReceiveErrors as usize + 1;

/// Qtypes with a label value of their own (CoreDNS's names); every other qtype is `other`.
pub const QTYPES: [(u16, &str); 14] = [
    (1, "A"),
    (2, "NS"),
    (5, "CNAME"),
    (6, "SOA"),
    (12, "PTR"),
    (15, "MX"),
    (16, "TXT"),
    (28, "AAAA"),
    (33, "SRV"),
    (43, "DS"),
    (48, "DNSKEY"),
    (64, "SVCB"),
    (65, "HTTPS"),
    (255, "ANY"),
];

/// Qtype slots: one per [`QTYPES`] entry plus `other`.
pub const QTYPE_SLOTS: usize = QTYPES.len() + 1;

/// Label of the last qtype slot.
pub const QTYPE_OTHER: &str = "other";

/// Rcode slots: the 4-bit header rcode (RFC 1035 §4.1.1, RFC 6895 §2.3).
pub const RCODE_SLOTS: usize = 16;

/// Upper bounds of the request-duration buckets in nanoseconds: 0.25 ms · 2^n, n = 0..15
/// (CoreDNS's `plugin.TimeBuckets`, 0.25 ms to 8.192 s).
pub const DURATION_BUCKETS: usize = 16;

/// The first duration bucket's upper bound.
const DURATION_BASE_NANOS: u64 = 250_000;

/// Upper bounds of the request- and response-size buckets in bytes (CoreDNS's
/// `plugin.SizeBuckets`).
pub const SIZE_BOUNDS: [u64; 14] = [
    0, 100, 200, 300, 400, 511, 1023, 2047, 4095, 8291, 16000, 32000, 48000, 64000,
];

/// Transport a query came in on (label `proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Proto {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

/// Protocol slots.
pub const PROTOS: [Proto; 2] = [Proto::Udp, Proto::Tcp];

impl Proto {
    /// The label value, as CoreDNS writes it.
    pub fn label(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// What produced a response (label `plugin` of `coredns_dns_responses_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Plugin {
    /// A cache hit.
    Cache,
    /// An upstream answer.
    Forward,
    /// `id.server.` CH TXT, answered locally as CoreDNS's `chaos` plugin does.
    Chaos,
    /// An error the worker wrote itself (SERVFAIL on failure or overload).
    None,
}

/// Plugin slots.
pub const PLUGINS: [Plugin; 4] = [Plugin::Cache, Plugin::Forward, Plugin::Chaos, Plugin::None];

impl Plugin {
    /// The label value, as CoreDNS writes it (`""` for errors written by the server).
    pub fn label(self) -> &'static str {
        match self {
            Plugin::Cache => "cache",
            Plugin::Forward => "forward",
            Plugin::Chaos => "chaos",
            Plugin::None => "",
        }
    }
}

/// Which cache an entry or hit belongs to (label `type` of the `coredns_cache_*` series).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum CacheType {
    /// Positive answers.
    Success,
    /// NXDOMAIN, NODATA (and cached SERVFAIL).
    Denial,
}

/// Cache type slots.
pub const CACHE_TYPES: [CacheType; 2] = [CacheType::Success, CacheType::Denial];

impl CacheType {
    /// The label value, as CoreDNS writes it.
    pub fn label(self) -> &'static str {
        match self {
            CacheType::Success => "success",
            CacheType::Denial => "denial",
        }
    }
}

/// The slot of `qtype` among [`QTYPE_SLOTS`].
pub fn qtype_slot(qtype: u16) -> usize {
    match qtype {
        1 => 0,
        2 => 1,
        5 => 2,
        6 => 3,
        12 => 4,
        15 => 5,
        16 => 6,
        28 => 7,
        33 => 8,
        43 => 9,
        48 => 10,
        64 => 11,
        65 => 12,
        255 => 13,
        _ => QTYPES.len(),
    }
}

/// The bucket of a duration: the first n with `nanos ≤ 0.25 ms · 2^n`, or
/// [`DURATION_BUCKETS`] (`+Inf`) past the last bound.
pub fn duration_bucket(nanos: u64) -> usize {
    // ceil(log2(nanos / base)) as an integer: q = ⌈nanos / base⌉ - 1 has exactly n bits.
    let q = nanos.saturating_sub(1) / DURATION_BASE_NANOS;
    let bits = (u64::BITS - q.leading_zeros()) as usize;
    bits.min(DURATION_BUCKETS)
}

/// Upper bound of duration bucket `bucket` in seconds.
pub fn duration_bound_secs(bucket: usize) -> f64 {
    DURATION_BASE_NANOS as f64 * 2f64.powi(bucket as i32) / 1e9
}

/// The bucket of a message size: the first bound `≥ bytes`, or `SIZE_BOUNDS.len()` (`+Inf`).
pub fn size_bucket(bytes: u64) -> usize {
    SIZE_BOUNDS
        .iter()
        .position(|&bound| bytes <= bound)
        .unwrap_or(SIZE_BOUNDS.len())
}

/// The zones queries are counted under: the `[[forward]]` zones, plus `.` if none is the root.
///
/// Matching is by longest label-wise suffix, like the control side's routing
/// (`upstream::route::Router`), but without allocating: each zone is kept as a lower-case
/// wire-format name, and the qname's label boundaries are walked from the longest suffix down,
/// so the first equal suffix is the longest matching zone.
#[derive(Debug, Clone)]
pub struct Zones {
    /// Zone names as CoreDNS labels them: lower case with a trailing dot (`cluster.local.`).
    names: Box<[String]>,
    /// The same names in lower-case wire format, root label included.
    wire: Box<[Box<[u8]>]>,
    /// Index of `.`.
    root: usize,
}

impl Zones {
    /// The zones for `names` (presentation form, as config validation leaves them: lower case,
    /// trailing dot), with `.` appended unless present. Duplicates are kept once.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Zones {
        let mut list: Vec<String> = Vec::new();
        for name in names {
            let name = normalize(name);
            if !list.contains(&name) {
                list.push(name);
            }
        }
        if !list.iter().any(|name| name == ".") {
            list.push(".".to_owned());
        }
        let root = list
            .iter()
            .position(|name| name == ".")
            .expect("`.` was added above if missing");
        let wire = list.iter().map(|name| to_wire(name)).collect();
        Zones {
            names: list.into_boxed_slice(),
            wire,
            root,
        }
    }

    /// Zone names, by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// How many zones.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Never true: `.` is always there.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Index of `.`.
    pub fn root(&self) -> usize {
        self.root
    }

    /// Index of the longest zone that `qname` (wire format, any case, root label included, as
    /// [`crate::dns::Query::qname`]) is in or under; `.` if nothing longer matches. Does not
    /// allocate.
    pub fn index_of(&self, qname: &[u8]) -> usize {
        let mut at = 0;
        // Each round moves `at` forward by at least one octet, so this ends within
        // `qname.len()` rounds.
        while let Some(rest) = qname.get(at..) {
            for (index, zone) in self.wire.iter().enumerate() {
                // Length octets are ≤ 63, below b'A', so case folding leaves them alone.
                if zone.len() == rest.len() && zone.eq_ignore_ascii_case(rest) {
                    return index;
                }
            }
            match rest.first() {
                Some(&len) if len != 0 => at += 1 + usize::from(len),
                _ => break,
            }
        }
        self.root
    }
}

/// `name` in lower case with exactly one trailing dot (`"."` for the root).
fn normalize(name: &str) -> String {
    let trimmed = name.trim_end_matches('.');
    if trimmed.is_empty() {
        ".".to_owned()
    } else {
        format!("{}.", trimmed.to_ascii_lowercase())
    }
}

/// The lower-case wire form of a presentation name (escapes are not interpreted, as in routing).
pub(crate) fn to_wire(name: &str) -> Box<[u8]> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.split('.').filter(|label| !label.is_empty()) {
        let bytes = label.as_bytes();
        // Config validation keeps labels within 63 octets; cut defensively rather than panic.
        let bytes = bytes.get(..bytes.len().min(63)).unwrap_or_default();
        out.push(bytes.len() as u8);
        out.extend(bytes.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out.into_boxed_slice()
}

/// The dimensions every worker's series are laid out by; the same for all workers.
///
/// # Threads
///
/// Built by the control thread before the workers start, shared read-only (`Arc`).
#[derive(Debug, Clone)]
pub struct Layout {
    /// Listen addresses, in `server.listen` order: the index is the worker's socket index
    /// (`Origin::*::socket`), the label `server="dns://ADDR"`.
    servers: Box<[SocketAddr]>,
    /// Zones.
    zones: Zones,
}

impl Layout {
    /// The layout for `servers` (listen addresses; at least one) and `zones`.
    pub fn new(servers: &[SocketAddr], zones: Zones) -> Layout {
        let servers = if servers.is_empty() {
            vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 53))].into_boxed_slice()
        } else {
            servers.into()
        };
        Layout { servers, zones }
    }

    /// Listen addresses, by socket index.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Zones.
    pub fn zones(&self) -> &Zones {
        &self.zones
    }

    /// The socket index of listen address `addr` (0 if it is not one).
    pub fn socket_of(&self, addr: SocketAddr) -> u16 {
        self.servers
            .iter()
            .position(|&server| server == addr)
            .and_then(|index| u16::try_from(index).ok())
            .unwrap_or(0)
    }

    /// Socket × zone pairs.
    fn pairs(&self) -> usize {
        self.servers.len() * self.zones.len()
    }
}

impl Default for Layout {
    /// One unnamed server on port 53 and only `.` (tests and benchmarks).
    fn default() -> Layout {
        Layout::new(&[], Zones::new(["."]))
    }
}

/// Where a query is counted: listen socket, zone and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Labels {
    /// Socket index (listen address).
    pub socket: u16,
    /// Zone index.
    pub zone: u16,
    /// Protocol.
    pub proto: Proto,
}

/// Atomics per cache line.
const LINE: usize = 16;

/// 128 bytes of counters on their own pair of cache lines (adjacent-line prefetch included), so
/// no two workers' arrays share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Line([AtomicU64; LINE]);

/// A flat array of single-writer counters.
#[derive(Debug)]
struct Cells {
    /// The storage, `len` counters rounded up to whole lines.
    lines: Box<[Line]>,
}

impl Cells {
    /// `len` zeroed counters.
    fn new(len: usize) -> Cells {
        let lines = (0..len.div_ceil(LINE)).map(|_| Line::default()).collect();
        Cells { lines }
    }

    /// The counter at `index`, if in range.
    fn cell(&self, index: usize) -> Option<&AtomicU64> {
        self.lines.get(index / LINE)?.0.get(index % LINE)
    }

    /// Adds `amount` with a `Relaxed` load + store (one writer). Out of range does nothing.
    #[inline]
    fn add(&self, index: usize, amount: u64) {
        if let Some(cell) = self.cell(index) {
            cell.store(cell.load(Ordering::Relaxed) + amount, Ordering::Relaxed);
        }
    }

    /// Sets the counter at `index` (gauges).
    fn set(&self, index: usize, value: u64) {
        if let Some(cell) = self.cell(index) {
            cell.store(value, Ordering::Relaxed);
        }
    }

    /// Reads the counter at `index` (0 out of range).
    fn read(&self, index: usize) -> u64 {
        self.cell(index)
            .map_or(0, |cell| cell.load(Ordering::Relaxed))
    }
}

/// Slots of one duration histogram: the buckets, `+Inf`, then the sum in nanoseconds.
const DURATION_SLOTS: usize = DURATION_BUCKETS + 2;

/// Slots of one size histogram: the buckets, `+Inf`, then the sum in bytes.
const SIZE_SLOTS: usize = SIZE_BOUNDS.len() + 2;

/// A histogram as read at scrape time: per-bucket (not cumulative) counts, `+Inf` last.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramCounts {
    /// One count per bucket, the `+Inf` bucket last.
    pub buckets: Vec<u64>,
    /// Sum of the observed values, in the histogram's unit (nanoseconds or bytes).
    pub sum: u64,
}

impl HistogramCounts {
    /// An empty histogram with `buckets` buckets (`+Inf` included).
    pub fn zeroed(buckets: usize) -> HistogramCounts {
        HistogramCounts {
            buckets: vec![0; buckets],
            sum: 0,
        }
    }

    /// Observations in total.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds `other` into `self` (summing workers).
    pub fn merge(&mut self, other: &HistogramCounts) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self.sum += other.sum;
    }
}

/// One worker's counters, on their own cache lines.
///
/// # Threads
///
/// Exactly one writer: the worker that owns it, with `Relaxed` load + store (no read-modify-
/// write, so no locked instruction on the hit path). Readers (the control thread, the HTTP
/// thread, tests) load with `Relaxed`; a value may be a moment stale, never torn. Histogram
/// buckets and sums are separate loads, so a scrape may see a bucket one observation ahead of
/// its sum; Prometheus tolerates that.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerStats {
    /// Indexed by [`Counter`].
    counters: [AtomicU64; COUNTERS],
    /// The last heartbeat, in milliseconds after `epoch` (creation counts as the first, so a
    /// worker that never starts goes stale like one that stops).
    heartbeat: AtomicU64,
    /// What the heartbeat is measured from.
    epoch: Instant,
    /// The dimensions of the series below.
    layout: Arc<Layout>,
    /// `[socket][zone][proto][qtype]`.
    requests: Cells,
    /// `[socket][zone]`: requests with DO=1.
    do_requests: Cells,
    /// `[socket][zone][rcode][plugin]`.
    responses: Cells,
    /// `[socket][zone][DURATION_SLOTS]`.
    durations: Cells,
    /// `[socket][zone][proto][SIZE_SLOTS]`.
    request_sizes: Cells,
    /// `[socket][zone][proto][SIZE_SLOTS]`.
    response_sizes: Cells,
    /// `[socket][zone][cache type]`.
    cache_hits: Cells,
    /// `[socket][zone]`.
    cache_misses: Cells,
    /// `[cache type]`: entries evicted by capacity.
    cache_evictions: Cells,
    /// `[cache type]`: entries held (a gauge).
    cache_entries: Cells,
}

impl Default for WorkerStats {
    /// Counters for [`Layout::default`].
    fn default() -> WorkerStats {
        WorkerStats::new(Arc::new(Layout::default()), Instant::now())
    }
}

impl WorkerStats {
    /// Zeroed counters laid out by `layout`; heartbeats count from `epoch`, the first at
    /// `epoch`.
    pub fn new(layout: Arc<Layout>, epoch: Instant) -> WorkerStats {
        let pairs = layout.pairs();
        let protos = PROTOS.len();
        WorkerStats {
            counters: Default::default(),
            heartbeat: AtomicU64::new(0),
            epoch,
            requests: Cells::new(pairs * protos * QTYPE_SLOTS),
            do_requests: Cells::new(pairs),
            responses: Cells::new(pairs * RCODE_SLOTS * PLUGINS.len()),
            durations: Cells::new(pairs * DURATION_SLOTS),
            request_sizes: Cells::new(pairs * protos * SIZE_SLOTS),
            response_sizes: Cells::new(pairs * protos * SIZE_SLOTS),
            cache_hits: Cells::new(pairs * CACHE_TYPES.len()),
            cache_misses: Cells::new(pairs),
            cache_evictions: Cells::new(CACHE_TYPES.len()),
            cache_entries: Cells::new(CACHE_TYPES.len()),
            layout,
        }
    }

    /// The dimensions.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

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

    /// Records that the worker is alive at `now`. Only the owning worker may call this, from
    /// its once-a-second tick.
    pub fn beat(&self, now: Instant) {
        let millis = now.saturating_duration_since(self.epoch).as_millis();
        let millis = u64::try_from(millis).unwrap_or(u64::MAX);
        self.heartbeat.store(millis, Ordering::Relaxed);
    }

    /// How long ago the last heartbeat was, seen at `now`.
    pub fn heartbeat_age(&self, now: Instant) -> Duration {
        let beat = Duration::from_millis(self.heartbeat.load(Ordering::Relaxed));
        now.saturating_duration_since(self.epoch + beat)
    }

    /// Index of a socket × zone pair.
    fn pair(&self, socket: u16, zone: u16) -> usize {
        usize::from(socket) * self.layout.zones.len() + usize::from(zone)
    }

    /// Index of a socket × zone × proto triple.
    fn triple(&self, labels: Labels) -> usize {
        self.pair(labels.socket, labels.zone) * PROTOS.len() + labels.proto as usize
    }

    /// Counts a parsed query of `qtype`, `bytes` long, with DO set or not. Worker only.
    #[inline]
    pub fn record_query(&self, labels: Labels, qtype: u16, bytes: usize, dnssec_ok: bool) {
        self.requests
            .add(self.triple(labels) * QTYPE_SLOTS + qtype_slot(qtype), 1);
        if dnssec_ok {
            self.do_requests
                .add(self.pair(labels.socket, labels.zone), 1);
        }
        observe_size(&self.request_sizes, self.triple(labels), bytes);
    }

    /// Counts a response with `rcode` from `plugin`, `bytes` long, `elapsed` after its query
    /// arrived. Worker only.
    #[inline]
    pub fn record_response(
        &self,
        labels: Labels,
        rcode: u8,
        plugin: Plugin,
        bytes: usize,
        elapsed: Duration,
    ) {
        let pair = self.pair(labels.socket, labels.zone);
        let rcode = usize::from(rcode) % RCODE_SLOTS;
        self.responses.add(
            (pair * RCODE_SLOTS + rcode) * PLUGINS.len() + plugin as usize,
            1,
        );
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let base = pair * DURATION_SLOTS;
        self.durations.add(base + duration_bucket(nanos), 1);
        if nanos > 0 {
            self.durations.add(base + DURATION_SLOTS - 1, nanos);
        }
        observe_size(&self.response_sizes, self.triple(labels), bytes);
    }

    /// Counts a cache lookup: a hit in `hit`'s cache, or a miss (`None`). Worker only.
    #[inline]
    pub fn record_cache(&self, socket: u16, zone: u16, hit: Option<CacheType>) {
        let pair = self.pair(socket, zone);
        match hit {
            Some(kind) => self
                .cache_hits
                .add(pair * CACHE_TYPES.len() + kind as usize, 1),
            None => self.cache_misses.add(pair, 1),
        }
    }

    /// Counts `count` entries of `kind` evicted by capacity. Worker only.
    pub fn record_evictions(&self, kind: CacheType, count: u64) {
        self.cache_evictions.add(kind as usize, count);
    }

    /// Sets the number of cached entries (success, denial). Worker only.
    pub fn set_cache_entries(&self, (success, denial): (usize, usize)) {
        self.cache_entries
            .set(CacheType::Success as usize, success as u64);
        self.cache_entries
            .set(CacheType::Denial as usize, denial as u64);
    }

    /// Requests received on `labels` with qtype slot `qtype_slot`.
    pub fn requests(&self, labels: Labels, qtype_slot: usize) -> u64 {
        self.requests
            .read(self.triple(labels) * QTYPE_SLOTS + qtype_slot)
    }

    /// Requests with DO=1 on `socket` for `zone`.
    pub fn do_requests(&self, socket: u16, zone: u16) -> u64 {
        self.do_requests.read(self.pair(socket, zone))
    }

    /// Responses on `socket` for `zone` with `rcode` (0..16) from `plugin`.
    pub fn responses(&self, socket: u16, zone: u16, rcode: usize, plugin: Plugin) -> u64 {
        let pair = self.pair(socket, zone);
        self.responses
            .read((pair * RCODE_SLOTS + rcode) * PLUGINS.len() + plugin as usize)
    }

    /// The request-duration histogram on `socket` for `zone` (sum in nanoseconds).
    pub fn durations(&self, socket: u16, zone: u16) -> HistogramCounts {
        read_histogram(
            &self.durations,
            self.pair(socket, zone) * DURATION_SLOTS,
            DURATION_SLOTS,
        )
    }

    /// The request-size histogram on `labels` (sum in bytes).
    pub fn request_sizes(&self, labels: Labels) -> HistogramCounts {
        read_histogram(
            &self.request_sizes,
            self.triple(labels) * SIZE_SLOTS,
            SIZE_SLOTS,
        )
    }

    /// The response-size histogram on `labels` (sum in bytes).
    pub fn response_sizes(&self, labels: Labels) -> HistogramCounts {
        read_histogram(
            &self.response_sizes,
            self.triple(labels) * SIZE_SLOTS,
            SIZE_SLOTS,
        )
    }

    /// Cache hits of `kind` on `socket` for `zone`.
    pub fn cache_hits(&self, socket: u16, zone: u16, kind: CacheType) -> u64 {
        self.cache_hits
            .read(self.pair(socket, zone) * CACHE_TYPES.len() + kind as usize)
    }

    /// Cache misses on `socket` for `zone`.
    pub fn cache_misses(&self, socket: u16, zone: u16) -> u64 {
        self.cache_misses.read(self.pair(socket, zone))
    }

    /// Entries of `kind` evicted so far.
    pub fn cache_evictions(&self, kind: CacheType) -> u64 {
        self.cache_evictions.read(kind as usize)
    }

    /// Entries of `kind` held now.
    pub fn cache_entries(&self, kind: CacheType) -> u64 {
        self.cache_entries.read(kind as usize)
    }
}

/// Observes a message of `bytes` into the size histogram starting at `triple * SIZE_SLOTS`.
#[inline]
fn observe_size(cells: &Cells, triple: usize, bytes: usize) {
    let base = triple * SIZE_SLOTS;
    let bytes = bytes as u64;
    cells.add(base + size_bucket(bytes), 1);
    cells.add(base + SIZE_SLOTS - 1, bytes);
}

/// Reads the histogram of `slots` cells at `base` (buckets, `+Inf`, sum).
fn read_histogram(cells: &Cells, base: usize, slots: usize) -> HistogramCounts {
    HistogramCounts {
        buckets: (0..slots - 1).map(|slot| cells.read(base + slot)).collect(),
        sum: cells.read(base + slots - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a dotted name into wire format, keeping its case.
    fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    #[test]
    fn zone_match_is_longest_label_wise_suffix() {
        let zones = Zones::new(["cluster.local.", "in-addr.arpa.", "svc.cluster.local.", "."]);
        assert_eq!(
            zones.names(),
            ["cluster.local.", "in-addr.arpa.", "svc.cluster.local.", "."]
        );
        assert_eq!(zones.index_of(&wire("a.svc.cluster.local")), 2);
        assert_eq!(zones.index_of(&wire("svc.cluster.local")), 2);
        assert_eq!(zones.index_of(&wire("a.pod.cluster.local")), 0);
        assert_eq!(zones.index_of(&wire("cluster.local")), 0);
        assert_eq!(zones.index_of(&wire("10.0.96.10.in-addr.arpa")), 1);
        assert_eq!(
            zones.index_of(&wire("xcluster.local")),
            3,
            "label-wise, not byte-wise"
        );
        assert_eq!(zones.index_of(&wire("www.example.com")), 3);
        assert_eq!(zones.index_of(&wire(".")), 3);
    }

    #[test]
    fn zone_match_ignores_case_and_adds_the_root() {
        let zones = Zones::new(["Cluster.Local"]);
        assert_eq!(zones.names(), ["cluster.local.", "."]);
        assert_eq!(zones.root(), 1);
        assert_eq!(
            zones.index_of(&wire("KUBE-DNS.kube-system.SVC.cluster.LOCAL")),
            0
        );
        assert_eq!(zones.index_of(&wire("example.org")), 1);
    }

    #[test]
    fn zone_match_survives_malformed_names() {
        let zones = Zones::new(["cluster.local."]);
        assert_eq!(zones.index_of(&[]), 1);
        assert_eq!(zones.index_of(&[5, b'a']), 1, "label runs past the end");
        assert_eq!(zones.index_of(&[63]), 1);
    }

    #[test]
    fn duration_buckets_follow_coredns_time_buckets() {
        assert_eq!(duration_bucket(0), 0);
        assert_eq!(duration_bucket(250_000), 0, "bounds are inclusive");
        assert_eq!(duration_bucket(250_001), 1);
        assert_eq!(duration_bucket(500_000), 1);
        assert_eq!(duration_bucket(500_001), 2);
        assert_eq!(duration_bucket(2_000_000), 3);
        assert_eq!(duration_bucket(8_192_000_000), 15);
        assert_eq!(duration_bucket(8_192_000_001), DURATION_BUCKETS, "+Inf");
        assert_eq!(duration_bucket(u64::MAX), DURATION_BUCKETS);
        for n in 0..DURATION_BUCKETS {
            let bound = (duration_bound_secs(n) * 1e9).round() as u64;
            assert_eq!(duration_bucket(bound), n, "bound of bucket {n}");
            assert_eq!(duration_bucket(bound + 1), n + 1, "just above bucket {n}");
        }
        assert_eq!(duration_bound_secs(0), 0.00025);
        assert_eq!(duration_bound_secs(15), 8.192);
    }

    #[test]
    fn size_buckets_follow_coredns_size_buckets() {
        assert_eq!(size_bucket(0), 0);
        assert_eq!(size_bucket(1), 1);
        assert_eq!(size_bucket(100), 1);
        assert_eq!(size_bucket(511), 5);
        assert_eq!(size_bucket(512), 6);
        assert_eq!(size_bucket(64000), 13);
        assert_eq!(size_bucket(65535), SIZE_BOUNDS.len(), "+Inf");
    }

    #[test]
    fn qtype_slots_match_the_label_table() {
        for (slot, (qtype, _)) in QTYPES.iter().enumerate() {
            assert_eq!(qtype_slot(*qtype), slot);
        }
        assert_eq!(qtype_slot(99), QTYPES.len());
    }

    #[test]
    fn series_land_in_their_own_slots() {
        let servers = [
            SocketAddr::from(([127, 0, 0, 1], 53)),
            SocketAddr::from(([0u16; 8], 53)),
        ];
        let layout = Arc::new(Layout::new(&servers, Zones::new(["cluster.local."])));
        let stats = WorkerStats::new(layout, Instant::now());
        let tcp6 = Labels {
            socket: 1,
            zone: 0,
            proto: Proto::Tcp,
        };
        stats.record_query(tcp6, 28, 40, true);
        stats.record_query(tcp6, 28, 40, false);
        stats.record_response(tcp6, 3, Plugin::Forward, 600, Duration::from_millis(3));
        stats.record_cache(1, 0, Some(CacheType::Denial));
        assert_eq!(stats.requests(tcp6, qtype_slot(28)), 2);
        assert_eq!(stats.requests(tcp6, qtype_slot(1)), 0);
        let udp6 = Labels {
            proto: Proto::Udp,
            ..tcp6
        };
        assert_eq!(stats.requests(udp6, qtype_slot(28)), 0);
        assert_eq!(stats.do_requests(1, 0), 1);
        assert_eq!(stats.do_requests(0, 0), 0);
        assert_eq!(stats.responses(1, 0, 3, Plugin::Forward), 1);
        assert_eq!(stats.responses(1, 0, 3, Plugin::Cache), 0);
        let durations = stats.durations(1, 0);
        assert_eq!(durations.count(), 1);
        assert_eq!(durations.buckets[duration_bucket(3_000_000)], 1);
        assert_eq!(durations.sum, 3_000_000);
        assert_eq!(stats.request_sizes(tcp6).sum, 80);
        assert_eq!(stats.response_sizes(tcp6).buckets[size_bucket(600)], 1);
        assert_eq!(stats.cache_hits(1, 0, CacheType::Denial), 1);
        assert_eq!(stats.cache_misses(1, 0), 0);
    }

    #[test]
    fn heartbeat_age_is_measured_from_the_last_beat() {
        let epoch = Instant::now();
        let stats = WorkerStats::new(Arc::new(Layout::default()), epoch);
        assert_eq!(
            stats.heartbeat_age(epoch + Duration::from_secs(1)),
            Duration::from_secs(1),
            "creation is the first beat"
        );
        stats.beat(epoch + Duration::from_secs(2));
        assert_eq!(
            stats.heartbeat_age(epoch + Duration::from_millis(3500)),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn out_of_range_labels_are_ignored_not_a_panic() {
        let stats = WorkerStats::default();
        let labels = Labels {
            socket: 9,
            zone: 9,
            proto: Proto::Udp,
        };
        stats.record_query(labels, 1, 10, true);
        stats.record_response(labels, 0, Plugin::Cache, 10, Duration::ZERO);
        assert_eq!(stats.requests(labels, 0), 0);
    }
}
