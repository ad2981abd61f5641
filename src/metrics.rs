//! Per-worker counters → Prometheus text, with CoreDNS's metric names and labels.
//!
//! Runs on: `ringdns-http` (rendering at scrape time); [`ControlMetrics`] is also written by
//! the control thread.
//!
//! Nothing here is on the query path. Workers count into their own
//! [`WorkerStats`](crate::worker::stats::WorkerStats) and the upstream side into its
//! [`UpstreamMetrics`]; a scrape reads every worker's slots with `Relaxed` loads, sums them, and
//! builds `prometheus` metric families that its `TextEncoder` writes out. No Prometheus registry
//! exists: there is nothing to register, since every value already lives in the counters.
//!
//! Names and labels are CoreDNS 1.11's, so NodeLocal DNSCache dashboards keep working:
//! `server="dns://IP:PORT"` per listen address, `zone` with a trailing dot (the `[[forward]]`
//! zone the qname is in, `.` otherwise), `view=""`, rcode names as CoreDNS writes them. Series
//! with labels appear once they are non-zero, as in CoreDNS; unlabelled ones always.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::TextEncoder;

use crate::control::node::{NodeStats, SetupError};
use crate::upstream::UpstreamMetrics;
use crate::worker::stats::{
    duration_bound_secs, Counter, HistogramCounts, Labels, Layout, WorkerStats, CACHE_TYPES,
    DURATION_BUCKETS, PLUGINS, PROTOS, QTYPES, QTYPE_OTHER, QTYPE_SLOTS, RCODE_SLOTS, SIZE_BOUNDS,
};
use crate::worker::Backend;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of `coredns_health_request_duration_seconds` (CoreDNS's health plugin:
/// 0.25 ms · 10^n, n = 0..4).
pub const HEALTH_BOUNDS: [f64; 5] = [0.00025, 0.0025, 0.025, 0.25, 2.5];

/// Slots of the health histogram: buckets, `+Inf`, sum in nanoseconds.
const HEALTH_SLOTS: usize = HEALTH_BOUNDS.len() + 2;

/// Rcode names as CoreDNS writes them (miekg/dns `RcodeToString`; unnamed ones `RCODE<n>`).
const RCODE_NAMES: [&str; RCODE_SLOTS] = [
    "NOERROR",
    "FORMERR",
    "SERVFAIL",
    "NXDOMAIN",
    "NOTIMP",
    "REFUSED",
    "YXDOMAIN",
    "YXRRSET",
    "NXRRSET",
    "NOTAUTH",
    "NOTZONE",
    "DSOTYPENI",
    "RCODE12",
    "RCODE13",
    "RCODE14",
    "RCODE15",
];

/// `coredns_build_info`'s `revision`: set `RINGDNS_REVISION` at build time (e.g. the commit).
const REVISION: &str = match option_env!("RINGDNS_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

/// `coredns_build_info`'s `goversion`: ringdns is not a Go program.
const GOVERSION: &str = "none";

/// Node setup errors by CoreDNS's `errortype` (NodeLocal DNSCache's `setup_errors_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetupErrors {
    /// Failed iptables/nft commands.
    pub iptables: u64,
    /// iptables' xtables lock could not be taken.
    pub iptables_lock: u64,
    /// The interface could not be created or given its addresses.
    pub interface_add: u64,
    /// Checking the interface failed.
    pub interface_check: u64,
}

/// Rule and interface upkeep of the node integration (the `ringdns_node_*` series).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounts {
    /// Rules ringdns wants installed.
    pub rules_expected: u64,
    /// Rules present at the last check.
    pub rules_present: u64,
    /// Rules found missing by a sync and put back.
    pub rules_readded: u64,
    /// Extra copies of a rule found and deleted.
    pub rule_duplicates_removed: u64,
    /// Interface, its up state or addresses put back by a sync.
    pub interface_readded: u64,
    /// Completed sync rounds.
    pub syncs: u64,
}

/// What the node integration (interface and rules, `control/node.rs`) reports to metrics and
/// `/ready`. Connect it with [`ControlMetrics::connect_node`].
///
/// # Threads
///
/// Called from `ringdns-http` at scrape and probe time; implementations read atomics.
pub trait NodeReport: Send + Sync + std::fmt::Debug {
    /// Setup errors so far.
    fn setup_errors(&self) -> SetupErrors;
    /// Rule and interface upkeep so far.
    fn counts(&self) -> NodeCounts;
    /// Whether everything ringdns was asked to set up (interface, rules) is in place.
    fn rules_in_place(&self) -> bool;
}

impl NodeReport for NodeStats {
    fn setup_errors(&self) -> SetupErrors {
        SetupErrors {
            iptables: self.errors(SetupError::Iptables),
            iptables_lock: self.errors(SetupError::IptablesLock),
            interface_add: self.errors(SetupError::InterfaceAdd),
            interface_check: self.errors(SetupError::InterfaceCheck),
        }
    }

    fn counts(&self) -> NodeCounts {
        let read = |cell: &AtomicU64| cell.load(Ordering::Relaxed);
        NodeCounts {
            rules_expected: read(&self.rules_expected),
            rules_present: read(&self.rules_present),
            rules_readded: read(&self.rules_readded),
            rule_duplicates_removed: read(&self.rules_duplicates_removed),
            interface_readded: read(&self.interface_readded),
            syncs: read(&self.syncs),
        }
    }

    fn rules_in_place(&self) -> bool {
        NodeStats::rules_in_place(self)
    }
}

/// Counters kept outside the workers: the backend in use, reload failures, health-check
/// durations, and the node integration's hook.
///
/// # Threads
///
/// `backend`, `reload_failures` and `worker_restarts` are written by the control thread, the health histogram only
/// by `ringdns-http` (one writer each, `Relaxed` load + store); every field is read by
/// `ringdns-http` at scrape time.
#[derive(Debug)]
pub struct ControlMetrics {
    /// 0 until the workers serve, then 1 + the [`Backend`] in use.
    backend: AtomicU8,
    /// Reloads rejected (the old configuration stayed in force).
    reload_failures: AtomicU64,
    /// Per worker: restarts in place after the worker ended unasked (control/supervise.rs).
    worker_restarts: OnceLock<Box<[AtomicU64]>>,
    /// `[HEALTH_SLOTS]`: `/health` check durations.
    health_durations: [AtomicU64; HEALTH_SLOTS],
    /// The node integration, once connected.
    node: OnceLock<Arc<dyn NodeReport>>,
}

impl Default for ControlMetrics {
    fn default() -> ControlMetrics {
        ControlMetrics {
            backend: AtomicU8::new(0),
            reload_failures: AtomicU64::new(0),
            worker_restarts: OnceLock::new(),
            health_durations: Default::default(),
            node: OnceLock::new(),
        }
    }
}

impl ControlMetrics {
    /// Records the backend the workers run on (control thread, once they serve).
    pub fn set_backend(&self, backend: Backend) {
        let value = match backend {
            Backend::Uring => 1,
            Backend::Epoll => 2,
        };
        self.backend.store(value, Ordering::Relaxed);
    }

    /// The backend in use, once known.
    pub fn backend(&self) -> Option<Backend> {
        match self.backend.load(Ordering::Relaxed) {
            1 => Some(Backend::Uring),
            2 => Some(Backend::Epoll),
            _ => None,
        }
    }

    /// Counts a rejected reload (control thread only).
    pub fn record_reload_failure(&self) {
        let cell = &self.reload_failures;
        cell.store(cell.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Lays out the restart counters of `workers` workers (control thread, at start-up).
    pub fn set_workers(&self, workers: usize) {
        let _ = self
            .worker_restarts
            .set((0..workers).map(|_| AtomicU64::new(0)).collect());
    }

    /// Counts a restart of worker `index` (control thread only).
    pub fn record_worker_restart(&self, index: usize) {
        if let Some(cell) = self.worker_restarts.get().and_then(|all| all.get(index)) {
            cell.store(cell.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }

    /// Restarts per worker so far.
    pub fn worker_restarts(&self) -> Vec<u64> {
        self.worker_restarts
            .get()
            .map(|all| {
                all.iter()
                    .map(|cell| cell.load(Ordering::Relaxed))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records one `/health` check that took `elapsed` (`ringdns-http` only).
    pub fn observe_health(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let bucket = HEALTH_BOUNDS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(HEALTH_BOUNDS.len());
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        for (slot, amount) in [(bucket, 1), (HEALTH_SLOTS - 1, nanos)] {
            let cell = &self.health_durations[slot];
            cell.store(
                cell.load(Ordering::Relaxed).saturating_add(amount),
                Ordering::Relaxed,
            );
        }
    }

    /// Connects the node integration; a second call is ignored (returns `false`).
    pub fn connect_node(&self, node: Arc<dyn NodeReport>) -> bool {
        self.node.set(node).is_ok()
    }

    /// The node integration, if connected.
    pub fn node(&self) -> Option<&Arc<dyn NodeReport>> {
        self.node.get()
    }

    /// The health histogram as read now.
    fn health_durations(&self) -> HistogramCounts {
        let read = |slot: usize| self.health_durations[slot].load(Ordering::Relaxed);
        HistogramCounts {
            buckets: (0..HEALTH_SLOTS - 1).map(read).collect(),
            sum: read(HEALTH_SLOTS - 1),
        }
    }
}

/// Everything a scrape reads.
///
/// # Threads
///
/// Built by the control thread at start-up and again by a reload that changes the metrics
/// layout or the upstreams, shared with `ringdns-http` behind an `RwLock`; every member is an `Arc`
/// of atomics with its own single writer.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Every worker's counters, by worker index (all laid out by the same [`Layout`]).
    pub workers: Vec<Arc<WorkerStats>>,
    /// Every upstream address's series.
    pub upstreams: Vec<Arc<UpstreamMetrics>>,
    /// Control-side counters.
    pub control: Arc<ControlMetrics>,
}

/// Renders every series at `now` in the Prometheus text format.
pub fn render(sources: &Sources, now: Instant) -> String {
    let mut out = Families::default();
    build_info(&mut out);
    if let Some(first) = sources.workers.first() {
        dns_series(&mut out, &sources.workers, first.layout());
        cache_series(&mut out, &sources.workers, first.layout());
    }
    proxy_series(&mut out, sources);
    control_series(&mut out, sources);
    ringdns_series(&mut out, sources, now);
    node_series(&mut out, sources);
    let mut text = String::new();
    if let Err(error) = TextEncoder::new().encode_utf8(&out.families, &mut text) {
        // Only possible for an empty family, which `Families` never keeps.
        log::warn!("rendering metrics failed error=\"{error}\"");
    }
    text
}

/// A label set: (name, value) pairs in order.
type LabelSet = Vec<(&'static str, String)>;

/// The families of one scrape, in order; empty families are left out (the encoder rejects
/// them).
#[derive(Debug, Default)]
struct Families {
    /// What will be encoded.
    families: Vec<MetricFamily>,
}

impl Families {
    /// Adds a counter family.
    fn counter(&mut self, name: &str, help: &str, series: Vec<(LabelSet, u64)>) {
        let metrics = series
            .into_iter()
            .map(|(labels, value)| {
                let mut counter = proto::Counter::default();
                counter.set_value(value as f64);
                let mut metric = Metric::from_label(label_pairs(labels));
                metric.set_counter(counter);
                metric
            })
            .collect();
        self.push(name, help, MetricType::COUNTER, metrics);
    }

    /// Adds a gauge family.
    fn gauge(&mut self, name: &str, help: &str, series: Vec<(LabelSet, f64)>) {
        let metrics = series
            .into_iter()
            .map(|(labels, value)| {
                let mut gauge = proto::Gauge::default();
                gauge.set_value(value);
                let mut metric = Metric::from_label(label_pairs(labels));
                metric.set_gauge(gauge);
                metric
            })
            .collect();
        self.push(name, help, MetricType::GAUGE, metrics);
    }

    /// Adds a histogram family; each series' buckets are per-bucket counts matching `bounds`
    /// plus `+Inf`, its sum is scaled by `sum_scale` (e.g. 1e-9 for nanoseconds → seconds).
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        bounds: &[f64],
        sum_scale: f64,
        series: Vec<(LabelSet, HistogramCounts)>,
    ) {
        let metrics = series
            .into_iter()
            .map(|(labels, counts)| {
                let mut cumulative = 0;
                let buckets = bounds
                    .iter()
                    .zip(&counts.buckets)
                    .map(|(&bound, &count)| {
                        cumulative += count;
                        let mut bucket = proto::Bucket::default();
                        bucket.set_upper_bound(bound);
                        bucket.set_cumulative_count(cumulative);
                        bucket
                    })
                    .collect();
                let mut histogram = proto::Histogram::default();
                histogram.set_bucket(buckets);
                histogram.set_sample_count(counts.count());
                histogram.set_sample_sum(counts.sum as f64 * sum_scale);
                let mut metric = Metric::from_label(label_pairs(labels));
                metric.set_histogram(histogram);
                metric
            })
            .collect();
        self.push(name, help, MetricType::HISTOGRAM, metrics);
    }

    /// Adds a family unless it has no series.
    fn push(&mut self, name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) {
        if metrics.is_empty() {
            return;
        }
        let mut family = MetricFamily::default();
        family.set_name(name.to_owned());
        family.set_help(help.to_owned());
        family.set_field_type(kind);
        family.set_metric(metrics);
        self.families.push(family);
    }
}

/// `prometheus` label pairs from a label set.
fn label_pairs(labels: LabelSet) -> Vec<LabelPair> {
    labels
        .into_iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_owned());
            pair.set_value(value);
            pair
        })
        .collect()
}

/// The `server` label of a listen address, as CoreDNS writes it.
fn server_label(addr: SocketAddr) -> String {
    format!("dns://{addr}")
}

/// The `family` label of a listen address: "1" IPv4, "2" IPv6 (IANA address family numbers,
/// as CoreDNS writes them).
fn family_label(addr: SocketAddr) -> &'static str {
    if addr.is_ipv4() {
        "1"
    } else {
        "2"
    }
}

/// The `type` label of qtype slot `slot`.
fn qtype_label(slot: usize) -> &'static str {
    QTYPES.get(slot).map_or(QTYPE_OTHER, |(_, name)| name)
}

/// Sums `read` over every worker.
fn sum(workers: &[Arc<WorkerStats>], read: impl Fn(&WorkerStats) -> u64) -> u64 {
    workers.iter().map(|worker| read(worker)).sum()
}

/// Merges `read` over every worker.
fn merge(
    workers: &[Arc<WorkerStats>],
    read: impl Fn(&WorkerStats) -> HistogramCounts,
) -> HistogramCounts {
    let mut total = HistogramCounts::default();
    for worker in workers {
        total.merge(&read(worker));
    }
    total
}

/// Every (socket index, listen address, zone index, zone name) combination.
fn pairs(layout: &Layout) -> Vec<(u16, SocketAddr, u16, &str)> {
    let mut out = Vec::new();
    for (socket, &addr) in layout.servers().iter().enumerate() {
        for (zone, name) in layout.zones().names().iter().enumerate() {
            if let (Ok(socket), Ok(zone)) = (u16::try_from(socket), u16::try_from(zone)) {
                out.push((socket, addr, zone, name.as_str()));
            }
        }
    }
    out
}

/// `coredns_build_info`.
fn build_info(out: &mut Families) {
    out.gauge(
        "coredns_build_info",
        "A metric with a constant '1' value labeled by version, revision, and goversion from which CoreDNS was built.",
        vec![(
            vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("revision", REVISION.to_owned()),
                ("goversion", GOVERSION.to_owned()),
            ],
            1.0,
        )],
    );
}

/// `coredns_dns_*`: requests, responses, durations, sizes.
fn dns_series(out: &mut Families, workers: &[Arc<WorkerStats>], layout: &Layout) {
    let mut requests = Vec::new();
    let mut do_requests = Vec::new();
    let mut responses = Vec::new();
    let mut durations = Vec::new();
    let mut request_sizes = Vec::new();
    let mut response_sizes = Vec::new();
    for (socket, addr, zone, zone_name) in pairs(layout) {
        let base = || -> LabelSet {
            vec![
                ("server", server_label(addr)),
                ("zone", zone_name.to_owned()),
                ("view", String::new()),
            ]
        };
        for proto in PROTOS {
            let labels = Labels {
                socket,
                zone,
                proto,
            };
            for slot in 0..QTYPE_SLOTS {
                let count = sum(workers, |w| w.requests(labels, slot));
                if count > 0 {
                    let mut set = base();
                    set.push(("proto", proto.label().to_owned()));
                    set.push(("family", family_label(addr).to_owned()));
                    set.push(("type", qtype_label(slot).to_owned()));
                    requests.push((set, count));
                }
            }
            for (target, read) in [
                (
                    &mut request_sizes,
                    WorkerStats::request_sizes as fn(&WorkerStats, Labels) -> HistogramCounts,
                ),
                (&mut response_sizes, WorkerStats::response_sizes),
            ] {
                let counts = merge(workers, |w| read(w, labels));
                if counts.count() > 0 {
                    let mut set = base();
                    set.push(("proto", proto.label().to_owned()));
                    target.push((set, counts));
                }
            }
        }
        let count = sum(workers, |w| w.do_requests(socket, zone));
        if count > 0 {
            do_requests.push((base(), count));
        }
        for (rcode, rcode_name) in RCODE_NAMES.iter().enumerate() {
            for plugin in PLUGINS {
                let count = sum(workers, |w| w.responses(socket, zone, rcode, plugin));
                if count > 0 {
                    let mut set = base();
                    set.push(("rcode", (*rcode_name).to_owned()));
                    set.push(("plugin", plugin.label().to_owned()));
                    responses.push((set, count));
                }
            }
        }
        let counts = merge(workers, |w| w.durations(socket, zone));
        if counts.count() > 0 {
            durations.push((base(), counts));
        }
    }
    let duration_bounds: Vec<f64> = (0..DURATION_BUCKETS).map(duration_bound_secs).collect();
    let size_bounds: Vec<f64> = SIZE_BOUNDS.iter().map(|&bound| bound as f64).collect();
    out.counter(
        "coredns_dns_requests_total",
        "Counter of DNS requests made per zone, protocol and family.",
        requests,
    );
    out.counter(
        "coredns_dns_do_requests_total",
        "Counter of DNS requests with DO bit set per zone.",
        do_requests,
    );
    out.counter(
        "coredns_dns_responses_total",
        "Counter of response status codes.",
        responses,
    );
    out.histogram(
        "coredns_dns_request_duration_seconds",
        "Histogram of the time (in seconds) each request took per zone.",
        &duration_bounds,
        1e-9,
        durations,
    );
    out.histogram(
        "coredns_dns_request_size_bytes",
        "Size of the EDNS0 UDP buffer in bytes (64K for TCP) per zone and protocol.",
        &size_bounds,
        1.0,
        request_sizes,
    );
    out.histogram(
        "coredns_dns_response_size_bytes",
        "Size of the returned response in bytes.",
        &size_bounds,
        1.0,
        response_sizes,
    );
}

/// `coredns_cache_*`. One cache serves every zone and listen address, so its size and evictions
/// are reported once, under the first listen address and `zones="."`; hits and misses are
/// counted per listen address and zone.
fn cache_series(out: &mut Families, workers: &[Arc<WorkerStats>], layout: &Layout) {
    let mut requests = Vec::new();
    let mut hits = Vec::new();
    let mut misses = Vec::new();
    let mut zeros = Vec::new();
    for (socket, addr, zone, zone_name) in pairs(layout) {
        let base = || -> LabelSet {
            vec![
                ("server", server_label(addr)),
                ("zones", zone_name.to_owned()),
                ("view", String::new()),
            ]
        };
        let missed = sum(workers, |w| w.cache_misses(socket, zone));
        let mut total = missed;
        for kind in CACHE_TYPES {
            let count = sum(workers, |w| w.cache_hits(socket, zone, kind));
            total += count;
            if count > 0 {
                let mut set = base();
                set.insert(1, ("type", kind.label().to_owned()));
                hits.push((set, count));
            }
        }
        if missed > 0 {
            misses.push((base(), missed));
        }
        if total > 0 {
            requests.push((base(), total));
            zeros.push((base(), 0));
        }
    }
    let whole = |kind: &str| -> LabelSet {
        let server = layout.servers().first().copied().map(server_label);
        vec![
            ("server", server.unwrap_or_default()),
            ("type", kind.to_owned()),
            ("zones", ".".to_owned()),
            ("view", String::new()),
        ]
    };
    out.gauge(
        "coredns_cache_entries",
        "The number of elements in the cache.",
        CACHE_TYPES
            .iter()
            .map(|&kind| {
                let count = sum(workers, |w| w.cache_entries(kind));
                (whole(kind.label()), count as f64)
            })
            .collect(),
    );
    out.counter(
        "coredns_cache_requests_total",
        "The count of cache requests.",
        requests,
    );
    out.counter("coredns_cache_hits_total", "The count of cache hits.", hits);
    out.counter(
        "coredns_cache_misses_total",
        "The count of cache misses. Deprecated, derive misses from cache hits/requests counters.",
        misses,
    );
    out.counter(
        "coredns_cache_prefetch_total",
        "The number of times the cache has prefetched a cached item.",
        zeros.clone(),
    );
    out.counter(
        "coredns_cache_served_stale_total",
        "The number of requests served from stale cache entries.",
        zeros,
    );
    out.counter(
        "coredns_cache_evictions_total",
        "The count of cache evictions.",
        CACHE_TYPES
            .iter()
            .map(|&kind| {
                let count = sum(workers, |w| w.cache_evictions(kind));
                (whole(kind.label()), count)
            })
            .collect(),
    );
}

/// `coredns_proxy_*` and `coredns_forward_max_concurrent_rejects_total`.
fn proxy_series(out: &mut Families, sources: &Sources) {
    let mut durations = Vec::new();
    let mut failures = Vec::new();
    for upstream in by_upstream(&sources.upstreams) {
        let to = upstream.addr.to_string();
        for (counts, rcode_name) in upstream.durations.into_iter().zip(RCODE_NAMES.iter()) {
            if counts.count() > 0 {
                durations.push((
                    vec![
                        ("proxy_name", "forward".to_owned()),
                        ("to", to.clone()),
                        ("rcode", (*rcode_name).to_owned()),
                    ],
                    counts,
                ));
            }
        }
        failures.push((
            vec![("proxy_name", "forward".to_owned()), ("to", to)],
            upstream.failures,
        ));
    }
    let bounds: Vec<f64> = (0..DURATION_BUCKETS).map(duration_bound_secs).collect();
    out.histogram(
        "coredns_proxy_request_duration_seconds",
        "Histogram of the time each request took.",
        &bounds,
        1e-9,
        durations,
    );
    out.counter(
        "coredns_proxy_healthcheck_failures_total",
        "Count of failed health checks per upstream (ringdns: failed or timed-out attempts).",
        failures,
    );
    out.counter(
        "coredns_forward_max_concurrent_rejects_total",
        "Counter of the number of queries rejected because the concurrent queries were at maximum.",
        vec![(
            Vec::new(),
            sum(&sources.workers, |w| w.read(Counter::Overloaded)),
        )],
    );
}

/// One upstream address's series summed over their writers.
struct UpstreamTotals {
    /// The upstream.
    addr: SocketAddr,
    /// Per rcode (`RCODE_NAMES` order): exchange durations.
    durations: Vec<HistogramCounts>,
    /// Failed or timed-out attempts.
    failures: u64,
    /// Open pooled TCP connections.
    connections: u64,
    /// Datagrams and frames ignored.
    ignored: u64,
}

/// Sums the series of each upstream address over its writers (the control side and every
/// worker that queries it over UDP itself), in order of first appearance.
fn by_upstream(upstreams: &[Arc<UpstreamMetrics>]) -> Vec<UpstreamTotals> {
    let mut totals: Vec<UpstreamTotals> = Vec::new();
    for upstream in upstreams {
        let position = match totals
            .iter()
            .position(|total| total.addr == upstream.addr())
        {
            Some(position) => position,
            None => {
                totals.push(UpstreamTotals {
                    addr: upstream.addr(),
                    durations: (0..RCODE_NAMES.len())
                        .map(|_| HistogramCounts::zeroed(DURATION_BUCKETS + 1))
                        .collect(),
                    failures: 0,
                    connections: 0,
                    ignored: 0,
                });
                totals.len() - 1
            }
        };
        let total = &mut totals[position];
        for (rcode, counts) in total.durations.iter_mut().enumerate() {
            counts.merge(&upstream.durations(rcode));
        }
        total.failures += upstream.failures();
        total.connections += upstream.connections();
        total.ignored += upstream.ignored();
    }
    totals
}

/// `coredns_health_*`, `coredns_reload_failed_total`, `coredns_nodecache_setup_errors_total`.
fn control_series(out: &mut Families, sources: &Sources) {
    let control = &sources.control;
    out.histogram(
        "coredns_health_request_duration_seconds",
        "Histogram of the time (in seconds) each request took.",
        &HEALTH_BOUNDS,
        1e-9,
        vec![(Vec::new(), control.health_durations())],
    );
    out.counter(
        "coredns_reload_failed_total",
        "Counter of the number of failed reload attempts.",
        vec![(Vec::new(), control.reload_failures.load(Ordering::Relaxed))],
    );
    let errors = control
        .node()
        .map(|node| node.setup_errors())
        .unwrap_or_default();
    out.counter(
        "coredns_nodecache_setup_errors_total",
        "The number of errors during periodic network setup for node-cache",
        [
            ("iptables", errors.iptables),
            ("iptables_lock", errors.iptables_lock),
            ("interface_add", errors.interface_add),
            ("interface_check", errors.interface_check),
        ]
        .into_iter()
        .map(|(kind, count)| (vec![("errortype", kind.to_owned())], count))
        .collect(),
    );
}

/// `ringdns_*`: what CoreDNS has no series for.
fn ringdns_series(out: &mut Families, sources: &Sources, now: Instant) {
    let workers = &sources.workers;
    if let Some(in_use) = sources.control.backend() {
        out.gauge(
            "ringdns_io_backend",
            "I/O backend the workers run on (1 = in use).",
            [Backend::Uring, Backend::Epoll]
                .into_iter()
                .map(|backend| {
                    let value = if backend == in_use { 1.0 } else { 0.0 };
                    (vec![("backend", backend.name().to_owned())], value)
                })
                .collect(),
        );
    }
    out.counter(
        "ringdns_worker_queries_total",
        "Queries received per worker, UDP and TCP, parsed or not.",
        workers
            .iter()
            .enumerate()
            .map(|(index, w)| {
                let count = w.read(Counter::UdpQueries) + w.read(Counter::TcpQueries);
                (vec![("worker", index.to_string())], count)
            })
            .collect(),
    );
    out.counter(
        "ringdns_worker_restarts_total",
        "Restarts in place of a worker that ended without being told to (a panic: a bug).",
        sources
            .control
            .worker_restarts()
            .into_iter()
            .enumerate()
            .map(|(index, count)| (vec![("worker", index.to_string())], count))
            .collect(),
    );
    out.gauge(
        "ringdns_worker_heartbeat_age_seconds",
        "Seconds since each worker's last once-a-second heartbeat.",
        workers
            .iter()
            .enumerate()
            .map(|(index, w)| {
                let age = w.heartbeat_age(now).as_secs_f64();
                (vec![("worker", index.to_string())], age)
            })
            .collect(),
    );
    let total = |counter: Counter| vec![(Vec::new(), sum(workers, |w| w.read(counter)))];
    let by = |label: &'static str, values: &[(&str, Counter)]| -> Vec<(LabelSet, u64)> {
        values
            .iter()
            .map(|&(value, counter)| {
                (
                    vec![(label, value.to_owned())],
                    sum(workers, |w| w.read(counter)),
                )
            })
            .collect()
    };
    out.counter(
        "ringdns_coalesced_misses_total",
        "Misses that joined an identical miss already in flight instead of going upstream.",
        total(Counter::Coalesced),
    );
    out.counter(
        "ringdns_upstream_requests_total",
        "Distinct misses sent to the upstream side.",
        total(Counter::UpstreamRequests),
    );
    out.counter(
        "ringdns_upstream_failures_total",
        "Misses answered SERVFAIL because no upstream answered in time (or no zone matched).",
        total(Counter::UpstreamFailures),
    );
    out.counter(
        "ringdns_upstream_bad_answers_total",
        "Upstream answers that did not validate, answered SERVFAIL.",
        total(Counter::UpstreamBadAnswers),
    );
    out.counter(
        "ringdns_worker_overloaded_total",
        "Queries answered SERVFAIL at once because the upstream queue or miss table was full.",
        total(Counter::Overloaded),
    );
    out.counter(
        "ringdns_worker_udp_queries_too_long_total",
        "UDP queries longer than the receive buffer, answered TC=1 so the client asks over TCP.",
        total(Counter::TooLong),
    );
    out.counter(
        "ringdns_worker_dropped_queries_total",
        "Packets dropped without a reply, by reason.",
        by(
            "reason",
            &[
                ("too_short", Counter::DropTooShort),
                ("response", Counter::DropResponse),
            ],
        ),
    );
    out.counter(
        "ringdns_worker_error_replies_total",
        "Malformed or unsupported queries answered with an error (not in coredns_dns_*).",
        by(
            "rcode",
            &[
                ("FORMERR", Counter::FormErr),
                ("NOTIMP", Counter::NotImp),
                ("BADVERS", Counter::BadVers),
            ],
        ),
    );
    out.counter(
        "ringdns_worker_truncated_replies_total",
        "UDP replies sent with TC=1.",
        total(Counter::Truncated),
    );
    out.counter(
        "ringdns_worker_send_errors_total",
        "Replies that could not be sent.",
        total(Counter::SendErrors),
    );
    out.counter(
        "ringdns_worker_receive_errors_total",
        "UDP receives that failed with an error (io_uring backend).",
        total(Counter::ReceiveErrors),
    );
    out.counter(
        "ringdns_worker_tcp_connections_total",
        "Client TCP connections, by outcome.",
        by(
            "outcome",
            &[
                ("accepted", Counter::TcpAccepted),
                ("refused", Counter::TcpRefused),
            ],
        ),
    );
    out.counter(
        "ringdns_worker_tcp_idle_closed_total",
        "Client TCP connections closed for idleness.",
        total(Counter::TcpIdleClosed),
    );
    let upstreams = by_upstream(&sources.upstreams);
    out.gauge(
        "ringdns_upstream_pool_connections",
        "Open pooled TCP connections per upstream.",
        upstreams
            .iter()
            .map(|upstream| {
                (
                    vec![("upstream", upstream.addr.to_string())],
                    upstream.connections as f64,
                )
            })
            .collect(),
    );
    out.counter(
        "ringdns_upstream_ignored_answers_total",
        "Datagrams and frames from an upstream that answered nothing in flight (wrong ID or question, not a response, garbage): possible spoofing.",
        upstreams
            .iter()
            .map(|upstream| {
                (
                    vec![("upstream", upstream.addr.to_string())],
                    upstream.ignored,
                )
            })
            .collect(),
    );
    if let Some(bytes) = resident_memory_bytes() {
        out.gauge(
            "ringdns_process_resident_memory_bytes",
            "Resident set size of the process, from /proc/self/statm.",
            vec![(Vec::new(), bytes as f64)],
        );
    }
}

/// `ringdns_node_*`, once the node integration is connected.
fn node_series(out: &mut Families, sources: &Sources) {
    let Some(node) = sources.control.node() else {
        return;
    };
    let counts = node.counts();
    let one = |value: u64| vec![(LabelSet::new(), value)];
    out.gauge(
        "ringdns_node_rules_expected",
        "Interception rules ringdns installs (0 without node.setup_iptables).",
        vec![(Vec::new(), counts.rules_expected as f64)],
    );
    out.gauge(
        "ringdns_node_rules_present",
        "Interception rules present at the last check.",
        vec![(Vec::new(), counts.rules_present as f64)],
    );
    out.counter(
        "ringdns_node_rules_readded_total",
        "Rules found missing by a sync and put back.",
        one(counts.rules_readded),
    );
    out.counter(
        "ringdns_node_rule_duplicates_removed_total",
        "Extra copies of a rule found and deleted.",
        one(counts.rule_duplicates_removed),
    );
    out.counter(
        "ringdns_node_interface_readded_total",
        "Interface, its up state or its addresses put back by a sync.",
        one(counts.interface_readded),
    );
    out.counter(
        "ringdns_node_syncs_total",
        "Completed sync rounds of the interface and rules.",
        one(counts.syncs),
    );
}

/// The process's resident set size: `/proc/self/statm`'s second field (pages) times the page
/// size.
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| u64::try_from(size).ok())
        .unwrap_or(4096);
    Some(pages * page_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::stats::{CacheType, Plugin, Proto, Zones};

    /// Stats for two listen addresses and the zones `cluster.local.` and `.`.
    fn stats() -> Arc<WorkerStats> {
        let servers = [
            SocketAddr::from(([127, 0, 0, 1], 53)),
            SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 53)),
        ];
        let layout = Layout::new(&servers, Zones::new(["cluster.local."]));
        Arc::new(WorkerStats::new(Arc::new(layout), Instant::now()))
    }

    /// Sources over `workers` with no upstreams.
    fn sources(workers: Vec<Arc<WorkerStats>>) -> Sources {
        Sources {
            workers,
            upstreams: Vec::new(),
            control: Arc::new(ControlMetrics::default()),
        }
    }

    /// The sample line of `series` (name and labels exactly), parsed.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
    }

    #[test]
    fn requests_and_responses_carry_coredns_names_and_labels() {
        let first = stats();
        let second = stats();
        let udp4 = Labels {
            socket: 0,
            zone: 0,
            proto: Proto::Udp,
        };
        for worker in [&first, &second] {
            worker.record_query(udp4, 1, 40, false);
            worker.record_response(udp4, 0, Plugin::Cache, 120, Duration::ZERO);
        }
        let tcp6 = Labels {
            socket: 1,
            zone: 1,
            proto: Proto::Tcp,
        };
        first.record_query(tcp6, 99, 50, true);
        first.record_response(tcp6, 3, Plugin::Forward, 90, Duration::from_millis(1));
        first.record_response(tcp6, 2, Plugin::None, 50, Duration::from_millis(1));
        let text = render(&sources(vec![first, second]), Instant::now());
        let requests = r#"coredns_dns_requests_total{server="dns://127.0.0.1:53",zone="cluster.local.",view="",proto="udp",family="1",type="A"}"#;
        assert_eq!(
            value(&text, requests),
            Some(2.0),
            "summed over workers\n{text}"
        );
        let other = r#"coredns_dns_requests_total{server="dns://[::1]:53",zone=".",view="",proto="tcp",family="2",type="other"}"#;
        assert_eq!(value(&text, other), Some(1.0), "{text}");
        let hit = r#"coredns_dns_responses_total{server="dns://127.0.0.1:53",zone="cluster.local.",view="",rcode="NOERROR",plugin="cache"}"#;
        assert_eq!(value(&text, hit), Some(2.0), "{text}");
        let nxdomain = r#"coredns_dns_responses_total{server="dns://[::1]:53",zone=".",view="",rcode="NXDOMAIN",plugin="forward"}"#;
        assert_eq!(value(&text, nxdomain), Some(1.0), "{text}");
        let servfail = r#"coredns_dns_responses_total{server="dns://[::1]:53",zone=".",view="",rcode="SERVFAIL",plugin=""}"#;
        assert_eq!(value(&text, servfail), Some(1.0), "{text}");
        let dnssec = r#"coredns_dns_do_requests_total{server="dns://[::1]:53",zone=".",view=""}"#;
        assert_eq!(value(&text, dnssec), Some(1.0), "{text}");
        assert!(
            !text.contains(r#"zone="cluster.local.",view="",proto="tcp""#),
            "zero series are left out\n{text}"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_coredns_buckets() {
        let worker = stats();
        let labels = Labels {
            socket: 0,
            zone: 0,
            proto: Proto::Udp,
        };
        worker.record_response(labels, 0, Plugin::Cache, 120, Duration::ZERO);
        worker.record_response(labels, 0, Plugin::Forward, 600, Duration::from_millis(3));
        let text = render(&sources(vec![worker]), Instant::now());
        let base = r#"server="dns://127.0.0.1:53",zone="cluster.local.",view="""#;
        let bucket = |le: &str| {
            value(
                &text,
                &format!("coredns_dns_request_duration_seconds_bucket{{{base},le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.00025"), Some(1.0), "{text}");
        assert_eq!(bucket("0.002"), Some(1.0));
        assert_eq!(bucket("0.004"), Some(2.0));
        assert_eq!(bucket("8.192"), Some(2.0));
        assert_eq!(bucket("+Inf"), Some(2.0));
        let sum = value(
            &text,
            &format!("coredns_dns_request_duration_seconds_sum{{{base}}}"),
        );
        assert_eq!(sum, Some(0.003));
        let size = |le: &str| {
            value(
                &text,
                &format!(
                    "coredns_dns_response_size_bytes_bucket{{{base},proto=\"udp\",le=\"{le}\"}}"
                ),
            )
        };
        assert_eq!(size("0"), Some(0.0));
        assert_eq!(size("100"), Some(0.0));
        assert_eq!(size("200"), Some(1.0));
        assert_eq!(size("1023"), Some(2.0));
        assert_eq!(size("64000"), Some(2.0));
        assert_eq!(
            value(
                &text,
                &format!("coredns_dns_response_size_bytes_count{{{base},proto=\"udp\"}}")
            ),
            Some(2.0)
        );
    }

    #[test]
    fn cache_series_use_zones_and_type_labels() {
        let worker = stats();
        worker.record_cache(0, 0, Some(CacheType::Success));
        worker.record_cache(0, 0, Some(CacheType::Denial));
        worker.record_cache(0, 0, None);
        worker.record_evictions(CacheType::Denial, 2);
        worker.set_cache_entries((5, 1));
        let text = render(&sources(vec![worker]), Instant::now());
        let base = r#"server="dns://127.0.0.1:53",zones="cluster.local.",view="""#;
        assert_eq!(
            value(&text, &format!("coredns_cache_requests_total{{{base}}}")),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                r#"coredns_cache_hits_total{server="dns://127.0.0.1:53",type="denial",zones="cluster.local.",view=""}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, &format!("coredns_cache_misses_total{{{base}}}")),
            Some(1.0)
        );
        assert_eq!(
            value(&text, &format!("coredns_cache_prefetch_total{{{base}}}")),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                r#"coredns_cache_entries{server="dns://127.0.0.1:53",type="success",zones=".",view=""}"#
            ),
            Some(5.0)
        );
        assert_eq!(
            value(
                &text,
                r#"coredns_cache_evictions_total{server="dns://127.0.0.1:53",type="denial",zones=".",view=""}"#
            ),
            Some(2.0)
        );
    }

    #[test]
    fn unlabelled_and_ringdns_series_are_always_there() {
        let worker = stats();
        worker.bump(Counter::UdpQueries);
        worker.bump(Counter::Coalesced);
        let control = Arc::new(ControlMetrics::default());
        control.set_backend(Backend::Epoll);
        control.observe_health(Duration::from_millis(2));
        let text = render(
            &Sources {
                workers: vec![worker],
                upstreams: Vec::new(),
                control,
            },
            Instant::now(),
        );
        for (series, expected) in [
            ("coredns_reload_failed_total", 0.0),
            ("coredns_forward_max_concurrent_rejects_total", 0.0),
            (
                r#"coredns_nodecache_setup_errors_total{errortype="iptables_lock"}"#,
                0.0,
            ),
            (
                r#"coredns_health_request_duration_seconds_bucket{le="0.0025"}"#,
                1.0,
            ),
            (
                r#"coredns_health_request_duration_seconds_bucket{le="0.00025"}"#,
                0.0,
            ),
            ("coredns_health_request_duration_seconds_count", 1.0),
            (r#"ringdns_io_backend{backend="epoll"}"#, 1.0),
            (r#"ringdns_io_backend{backend="uring"}"#, 0.0),
            (r#"ringdns_worker_queries_total{worker="0"}"#, 1.0),
            ("ringdns_coalesced_misses_total", 1.0),
        ] {
            assert_eq!(value(&text, series), Some(expected), "{series}\n{text}");
        }
        assert!(text.contains("# TYPE coredns_build_info gauge\ncoredns_build_info{version=\""));
        assert!(value(&text, "ringdns_process_resident_memory_bytes").is_some_and(|b| b > 0.0));
        let age = value(&text, r#"ringdns_worker_heartbeat_age_seconds{worker="0"}"#);
        assert!(age.is_some_and(|age| age < 60.0), "{text}");
    }

    #[test]
    fn proxy_series_are_per_upstream_and_rcode() {
        let upstream = Arc::new(UpstreamMetrics::new(SocketAddr::from((
            [10, 96, 0, 10],
            53,
        ))));
        upstream.observe(0, Duration::from_micros(300));
        upstream.observe(3, Duration::from_millis(20));
        upstream.record_failure();
        upstream.set_connections(2);
        let text = render(
            &Sources {
                workers: vec![stats()],
                upstreams: vec![upstream],
                control: Arc::new(ControlMetrics::default()),
            },
            Instant::now(),
        );
        let to = r#"proxy_name="forward",to="10.96.0.10:53""#;
        for (series, expected) in [
            (
                format!(
                    r#"coredns_proxy_request_duration_seconds_bucket{{{to},rcode="NOERROR",le="0.0005"}}"#
                ),
                1.0,
            ),
            (
                format!(r#"coredns_proxy_request_duration_seconds_count{{{to},rcode="NXDOMAIN"}}"#),
                1.0,
            ),
            (
                format!("coredns_proxy_healthcheck_failures_total{{{to}}}"),
                1.0,
            ),
            (
                r#"ringdns_upstream_pool_connections{upstream="10.96.0.10:53"}"#.to_owned(),
                2.0,
            ),
        ] {
            assert_eq!(value(&text, &series), Some(expected), "{series}\n{text}");
        }
    }

    #[test]
    fn an_upstream_written_by_control_and_workers_is_one_series() {
        let addr = SocketAddr::from(([10, 96, 0, 10], 53));
        let control = Arc::new(UpstreamMetrics::new(addr));
        let worker = Arc::new(UpstreamMetrics::new(addr));
        let other = Arc::new(UpstreamMetrics::new(SocketAddr::from(([10, 0, 0, 2], 53))));
        control.observe(0, Duration::from_micros(300));
        worker.observe(0, Duration::from_micros(400));
        worker.record_failure();
        worker.record_ignored();
        control.set_connections(2);
        control.set_ignored(2);
        let text = render(
            &Sources {
                workers: vec![stats()],
                upstreams: vec![control, other, worker],
                control: Arc::new(ControlMetrics::default()),
            },
            Instant::now(),
        );
        let to = r#"proxy_name="forward",to="10.96.0.10:53""#;
        let count =
            format!(r#"coredns_proxy_request_duration_seconds_count{{{to},rcode="NOERROR"}}"#);
        assert_eq!(value(&text, &count), Some(2.0), "{text}");
        let failures = format!("coredns_proxy_healthcheck_failures_total{{{to}}}");
        assert_eq!(value(&text, &failures), Some(1.0), "{text}");
        let lines = text
            .lines()
            .filter(|line| line.starts_with(&failures))
            .count();
        assert_eq!(lines, 1, "one series per upstream address:\n{text}");
        assert_eq!(
            value(
                &text,
                r#"ringdns_upstream_pool_connections{upstream="10.96.0.10:53"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &text,
                r#"coredns_proxy_healthcheck_failures_total{proxy_name="forward",to="10.0.0.2:53"}"#
            ),
            Some(0.0)
        );
    }

    #[test]
    fn node_report_feeds_setup_errors() {
        #[derive(Debug)]
        struct Node;
        impl NodeReport for Node {
            fn setup_errors(&self) -> SetupErrors {
                SetupErrors {
                    interface_add: 3,
                    ..SetupErrors::default()
                }
            }
            fn counts(&self) -> NodeCounts {
                NodeCounts {
                    rules_expected: 12,
                    rules_present: 11,
                    rules_readded: 1,
                    ..NodeCounts::default()
                }
            }
            fn rules_in_place(&self) -> bool {
                false
            }
        }
        let control = Arc::new(ControlMetrics::default());
        assert!(control.connect_node(Arc::new(Node)));
        assert!(!control.connect_node(Arc::new(Node)), "connected once");
        let text = render(
            &Sources {
                workers: vec![stats()],
                upstreams: Vec::new(),
                control,
            },
            Instant::now(),
        );
        assert_eq!(
            value(
                &text,
                r#"coredns_nodecache_setup_errors_total{errortype="interface_add"}"#
            ),
            Some(3.0)
        );
        assert_eq!(value(&text, "ringdns_node_rules_expected"), Some(12.0));
        assert_eq!(value(&text, "ringdns_node_rules_present"), Some(11.0));
        assert_eq!(value(&text, "ringdns_node_rules_readded_total"), Some(1.0));
    }

    #[test]
    fn node_stats_are_a_node_report() {
        let stats = NodeStats::default();
        stats.rules_expected.store(4, Ordering::Relaxed);
        stats.rules_present.store(4, Ordering::Relaxed);
        let report: &dyn NodeReport = &stats;
        assert!(report.rules_in_place());
        assert_eq!(report.counts().rules_expected, 4);
        assert_eq!(report.setup_errors(), SetupErrors::default());
    }
}
