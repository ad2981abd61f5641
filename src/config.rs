//! TOML → validated [`Config`]: knob defaults and ranges, `${VAR}` expansion, resolv.conf paths.
//!
//! Runs on: control thread (and `main` for `ringdns check`).
//!
//! Loading is two steps. The text is deserialized into `Raw*` structs marked
//! `#[serde(deny_unknown_fields)]`, whose values keep their byte spans ([`toml::Spanned`]); then
//! `Document::config` expands `${VAR}`, checks every value against its [`Knob`] and builds the
//! [`Config`], whose types rule out bad states. Every [`ConfigError`] names the file, the line and
//! the dotted key (`forward[1].timeout`, array indices 0-based).
#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{Deserializer, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One tunable: its dotted key, its default and its inclusive range `min..=max`.
///
/// A value outside the range is a [`Problem::OutOfRange`] (or [`Problem::DurationOutOfRange`]),
/// never clamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Knob<T> {
    /// Dotted key in the config file, e.g. `"cache.success_capacity"`.
    pub key: &'static str,
    /// Value used when the key is absent.
    pub default: T,
    /// Smallest accepted value.
    pub min: T,
    /// Largest accepted value.
    pub max: T,
}

impl<T> Knob<T> {
    /// A knob named `key` defaulting to `default`, accepting `min..=max`.
    pub const fn new(key: &'static str, default: T, min: T, max: T) -> Self {
        Self {
            key,
            default,
            min,
            max,
        }
    }
}

impl<T: PartialOrd> Knob<T> {
    /// Whether `value` lies in `min..=max`.
    pub fn contains(&self, value: &T) -> bool {
        *value >= self.min && *value <= self.max
    }
}

/// Worker threads; 0 = one per CPU of the process's affinity mask (a container's cpuset, not every
/// online CPU). 1024 bounds a typo; no node has that many cores in one cpuset that we serve.
pub const WORKERS: Knob<usize> = Knob::new("server.workers", 0, 0, 1024);

/// EDNS UDP payload size, bytes: advertised upstream and the ceiling for UDP answers to clients.
/// 1232 is the DNS flag day 2020 value: it fits a 1280-byte IPv6 minimum MTU without
/// fragmentation (RFC 6891 §6.2.5 asks for a size that avoids fragmentation). 512 is the
/// pre-EDNS limit (RFC 1035 §2.3.4); 4096 is the largest size RFC 6891 §6.2.5 suggests.
pub const UDP_PAYLOAD: Knob<u16> = Knob::new("server.udp_payload", 1232, 512, 4096);

/// A client TCP connection idle this long is closed. RFC 7766 §6.2.3 recommends a server idle
/// timeout "of the order of seconds"; 10 s lets a stub pipeline a retry burst on one connection
/// without letting idle clients pin connection slots.
pub const TCP_IDLE_TIMEOUT: Knob<Duration> = Knob::new(
    "server.tcp_idle_timeout",
    Duration::from_secs(10),
    Duration::from_secs(1),
    Duration::from_secs(3600),
);

/// Client TCP connections per worker; further accepts are closed at once (RFC 7766 §6.2.2 lets a
/// server limit them). Stubs use TCP only after truncation, so 1024 is ample and bounds the
/// file descriptors and buffers each worker can be made to hold.
pub const MAX_TCP_CONNECTIONS: Knob<usize> =
    Knob::new("server.max_tcp_connections", 1024, 1, 65536);

/// Requested `SO_RCVBUF` per UDP listen socket, bytes (`SO_RCVBUFFORCE` when root). 4 MiB holds
/// a burst of well over 1000 queued datagrams (each costs a few KiB of skb truesize); the usual
/// `net.core.rmem_default` of 208 KiB drops such bursts while a worker is busy.
pub const UDP_RECEIVE_BUFFER: Knob<usize> =
    Knob::new("server.udp_receive_buffer", 4 << 20, 65536, 1 << 30);

/// After a batch of datagrams, how long an io_uring worker waits in the kernel for more before it
/// goes back to sleep. Each wake-up costs more CPU than a cache hit, so at moderate rates one
/// wait that gathers several queries cuts CPU per query; every query that arrives during it
/// waits up to this long. 200 µs halved CPU per query at a paced 20k qps with p99 under 500 µs
/// (perf/RESULTS.md, 2026-12-02); 0 answers every query at once (lowest latency, most
/// wake-ups). 1 ms is the worker's turn, after which it returns to its other tasks anyway.
/// The worker waits only while its rate makes a wait pay (worker/pace.rs): below about
/// 2,500 qps per worker with the default it does not wait at all.
pub const BATCH_WAIT: Knob<Duration> = Knob::new(
    "server.batch_wait",
    Duration::from_micros(200),
    Duration::ZERO,
    Duration::from_millis(1),
);

/// Positive answers kept per worker, entries. 9984 is the CoreDNS cache plugin default that
/// NodeLocal DNSCache uses; the total is this times the worker count.
pub const SUCCESS_CAPACITY: Knob<usize> = Knob::new("cache.success_capacity", 9984, 1, 1 << 24);

/// Cap on positive TTLs (RFC 2181 §8 TTLs are otherwise honoured). 30 s is NodeLocal DNSCache's
/// `success 9984 30`: Service IPs change, and a short cap bounds how long a stale one is served.
/// 7 d is the usual resolver ceiling (BIND's `max-cache-ttl`; RFC 8767 §4).
pub const SUCCESS_TTL: Knob<Duration> = Knob::new(
    "cache.success_ttl",
    Duration::from_secs(30),
    Duration::from_secs(1),
    Duration::from_secs(7 * 86400),
);

/// Negative answers (NXDOMAIN, NODATA) kept per worker, entries. Same default as
/// [`SUCCESS_CAPACITY`], as in NodeLocal DNSCache.
pub const DENIAL_CAPACITY: Knob<usize> = Knob::new("cache.denial_capacity", 9984, 1, 1 << 24);

/// Cap on negative TTLs, which RFC 2308 §5 takes from the SOA. 5 s is NodeLocal DNSCache's
/// `denial 9984 5`: a name queried just before its Service or Pod exists must start resolving
/// quickly.
pub const DENIAL_TTL: Knob<Duration> = Knob::new(
    "cache.denial_ttl",
    Duration::from_secs(5),
    Duration::from_secs(1),
    Duration::from_secs(7 * 86400),
);

/// How long SERVFAIL answers are cached; 0 = never. RFC 2308 §7.1 allows up to 5 minutes; we
/// cap at 30 s and default to 0 so a short upstream outage is not prolonged by the cache.
pub const SERVFAIL_TTL: Knob<Duration> = Knob::new(
    "cache.servfail_ttl",
    Duration::ZERO,
    Duration::ZERO,
    Duration::from_secs(30),
);

/// Total time to answer a forwarded query, across all upstreams of the zone, before SERVFAIL.
/// 2 s is below glibc's 5 s per-try stub timeout (`RES_TIMEOUT`), so a client gets our SERVFAIL
/// before it gives up and retries on its own.
pub const FORWARD_TIMEOUT: Knob<Duration> = Knob::new(
    "forward.timeout",
    Duration::from_secs(2),
    Duration::from_millis(100),
    Duration::from_secs(60),
);

/// How often the node sync puts back missing interface addresses and interception rules.
/// 60 s is NodeLocal DNSCache's `-syncinterval` default (there effectively fixed); 1 s is the
/// floor because every check runs iptables/nft processes, and 1 h bounds how long a rule deleted
/// by another agent may stay missing.
pub const SYNC_INTERVAL: Knob<Duration> = Knob::new(
    "node.sync_interval",
    Duration::from_secs(60),
    Duration::from_secs(1),
    Duration::from_secs(3600),
);

/// After SIGTERM, `/health` answers 503 this long while queries are still answered, so a load
/// balancer or kubelet probe stops sending before the sockets close. 5 s is CoreDNS's usual
/// `health { lameduck 5s }`; 60 s stays under Kubernetes' default 30 s + grace headroom.
pub const LAMEDUCK: Knob<Duration> = Knob::new(
    "health.lameduck",
    Duration::from_secs(5),
    Duration::ZERO,
    Duration::from_secs(60),
);

/// `server.listen` when absent: unprivileged loopback ports, so `ringdns run` needs no root.
pub const DEFAULT_LISTEN: [SocketAddr; 2] = [
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5353)),
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 5353, 0, 0)),
];

/// `server.io` when absent: io_uring where it works, else epoll with one warning.
pub const DEFAULT_IO: IoBackend = IoBackend::Auto;

/// `forward.transport` when absent: UDP, retrying over TCP on TC=1, like a stub resolver.
pub const DEFAULT_TRANSPORT: Transport = Transport::Udp;

/// `node.setup_interface` when absent: off, so ringdns never changes a host's links unasked.
pub const DEFAULT_SETUP_INTERFACE: bool = false;

/// `node.interface` when absent: the name NodeLocal DNSCache's `-interfacename` defaults to.
pub const DEFAULT_INTERFACE: &str = "nodelocaldns";

/// Longest interface name Linux accepts: `IFNAMSIZ` (16) minus the terminating NUL.
pub const MAX_INTERFACE_NAME: usize = 15;

/// `node.setup_iptables` when absent: off, so ringdns never changes a host's rules unasked.
pub const DEFAULT_SETUP_IPTABLES: bool = false;

/// `node.rules` when absent: whatever the node's kube-proxy uses.
pub const DEFAULT_RULES: RulesBackend = RulesBackend::Auto;

/// `node.teardown` when absent: remove what ringdns set up on exit, as node-cache does.
pub const DEFAULT_TEARDOWN: bool = true;

/// Longest iptables chain name: `XT_EXTENSION_MAXNAMELEN` (29) minus the terminating NUL.
pub const MAX_CHAIN_NAME: usize = 28;

/// Port of `health.listen` when it is `""` (on the first listen IP): NodeLocal DNSCache's
/// `health 169.254.20.10:8080`.
pub const DEFAULT_HEALTH_PORT: u16 = 8080;

/// `metrics.listen` when absent: NodeLocal DNSCache's `prometheus :9253`, every address, so the
/// cluster's Prometheus can scrape the node. The embedded default overrides it with loopback.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9253));

/// `log.level` when absent: lifecycle events and above (STYLE.md §5).
pub const DEFAULT_LOG_LEVEL: log::LevelFilter = log::LevelFilter::Info;

/// Zone of the single `[[forward]]` used when the file has none: everything.
pub const DEFAULT_FORWARD_ZONE: &str = ".";

/// Upstream of the default `[[forward]]`: the host's resolvers.
pub const DEFAULT_FORWARD_UPSTREAM: &str = "/etc/resolv.conf";

/// Port used for an upstream given without one, and for every resolv.conf nameserver.
pub const DNS_PORT: u16 = 53;

/// The configuration `ringdns run` uses without `--config`: loopback on port 5353 (no root
/// needed), everything forwarded to the host's resolv.conf nameservers, health and metrics on
/// loopback (not the file default 0.0.0.0:9253), no interface or rules; all else default.
pub const EMBEDDED_DEFAULT: &str = r#"# ringdns built-in configuration, used without --config.
# Unprivileged loopback ports, so it runs without root; every other key takes its default.
[server]
listen = ["127.0.0.1:5353", "[::1]:5353"]

[[forward]]
zone = "."
upstreams = ["/etc/resolv.conf"]

# Health and metrics on loopback only: without a config file nothing is reachable from outside.
[health]
listen = "127.0.0.1:8080"

[metrics]
listen = "127.0.0.1:9253"
"#;

/// How `<embedded default>` errors name their source when [`Config::parse`] gets no path.
const EMBEDDED_NAME: &str = "<embedded default>";

/// The validated configuration. Every field is already checked; nothing downstream re-validates.
///
/// # Threads
///
/// Built by the control thread (at start-up and on reload) and never mutated afterwards; workers
/// only ever see immutable copies of the parts they need, so no memory ordering is involved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it came from: a file path, or `None` for the embedded default.
    pub source: Option<PathBuf>,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[cache]`.
    pub cache: CacheConfig,
    /// `[[forward]]`, in file order (routing picks the longest matching zone, not the first).
    pub forward: Vec<ForwardZone>,
    /// `[log]`.
    pub log: LogConfig,
    /// `[node]`.
    pub node: NodeConfig,
    /// `[health]`.
    pub health: HealthConfig,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
}

/// `[server]`: sockets and workers.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// UDP and TCP listen addresses (IPv4 and IPv6 mixed); non-empty, no duplicates.
    pub listen: Vec<SocketAddr>,
    /// Worker count; 0 = one per CPU of the affinity mask.
    pub workers: usize,
    /// I/O backend choice.
    pub io: IoBackend,
    /// EDNS UDP payload size advertised upstream and the ceiling for UDP answers to clients.
    pub udp_payload: u16,
    /// A TCP client connection idle this long is closed (RFC 7766 §6.2.3).
    pub tcp_idle_timeout: Duration,
    /// TCP client connections per worker; further accepts are closed at once.
    pub max_tcp_connections: usize,
    /// Requested SO_RCVBUF for each UDP listen socket, bytes (RCVBUFFORCE when root).
    pub udp_receive_buffer: usize,
    /// io_uring: how long a worker waits for more datagrams after a batch (0: not at all).
    pub batch_wait: Duration,
}

/// `server.io`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring if it can be set up, else epoll with one warning.
    Auto,
    /// io_uring or a start-up error.
    Uring,
    /// epoll (a current-thread tokio runtime per worker).
    Epoll,
}

/// `[cache]`: the two caches, like NodeLocal DNSCache's.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Positive answers kept per worker.
    pub success_capacity: usize,
    /// Cap on positive TTLs.
    pub success_ttl: Duration,
    /// Negative answers (NXDOMAIN, NODATA) kept per worker.
    pub denial_capacity: usize,
    /// Cap on negative TTLs (RFC 2308 §5).
    pub denial_ttl: Duration,
    /// How long SERVFAIL answers are cached; zero = never.
    pub servfail_ttl: Duration,
}

/// One `[[forward]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardZone {
    /// Lower-case zone name with a trailing dot: `"cluster.local."`, or `"."` for the root.
    pub zone: String,
    /// Upstream servers, resolv.conf paths already expanded to their nameservers; non-empty.
    pub upstreams: Vec<SocketAddr>,
    /// How queries reach these upstreams.
    pub transport: Transport,
    /// Total time to get an answer, across all upstreams of the zone, before SERVFAIL.
    pub timeout: Duration,
}

/// `forward.transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP; an answer with TC=1 is retried over TCP.
    Udp,
    /// TCP only (CoreDNS `force_tcp`), over pooled pipelined connections.
    Tcp,
    /// UDP first; on TC or UDP failure, TCP.
    PreferUdp,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Maximum level written to stderr.
    pub level: log::LevelFilter,
}

/// `[node]`: what ringdns sets up on the node besides its sockets (NodeLocal DNSCache's
/// `-setupinterface`, `-setupiptables`, `-interfacename`, `-syncinterval`, `-skipteardown`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Create [`NodeConfig::interface`] and add every listen IP to it.
    pub setup_interface: bool,
    /// Name of the link-local interface; 1..=15 characters, a valid Linux interface name.
    pub interface: String,
    /// Install the NOTRACK/ACCEPT interception rules (iptables or nftables, see `rules`).
    pub setup_iptables: bool,
    /// Which rule backend programs them.
    pub rules: RulesBackend,
    /// How often missing addresses and rules are put back.
    pub sync_interval: Duration,
    /// On exit remove the rules, then the interface (only what ringdns created). `false` hands
    /// them over to a new instance.
    pub teardown: bool,
    /// A nat chain (kube-proxy's kube-dns service chain, e.g. `KUBE-SVC-TCOQ7…`) that traffic to
    /// the link-local IP jumps to while no ringdns socket exists; `None` = no such fallback.
    pub fallback_service_chain: Option<String>,
    /// Unix socket path for zero-gap upgrades (`None` = off): a starting ringdns takes the
    /// listen sockets of the one serving there, which then stops receiving, finishes its
    /// misses in flight and leaves the interface and rules to its successor.
    pub handover: Option<PathBuf>,
}

/// `node.rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesBackend {
    /// nftables if the node's kube-proxy runs in nftables mode, else iptables.
    Auto,
    /// The iptables/ip6tables binaries (legacy or nft flavour, as the node uses).
    Iptables,
    /// An own nftables table, loaded atomically with `nft -f`.
    Nftables,
}

/// `[health]`: the `/health` and `/ready` endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// HTTP listen address; from `""`: the first listen IP, port 8080.
    pub listen: SocketAddr,
    /// After SIGTERM, `/health` is 503 this long while queries are still answered.
    pub lameduck: Duration,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// HTTP listen address; `None` (from `""`) = no metrics endpoint.
    pub listen: Option<SocketAddr>,
}

impl Config {
    /// Reads and validates the file at `path`, expanding `${VAR}` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, Some(path))
    }

    /// The configuration `ringdns run` uses without `--config`: [`EMBEDDED_DEFAULT`].
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED_DEFAULT, None)
    }

    /// Validates `text`; `source` is the file it came from (`None` = the embedded default) and
    /// only names it in errors and in [`Config::source`]. `${VAR}` comes from the process
    /// environment and resolv.conf paths are read from the file system.
    pub fn parse(text: &str, source: Option<&Path>) -> Result<Config, ConfigError> {
        let host = Host {
            var: &|name| std::env::var(name).ok(),
            read: &|path| std::fs::read_to_string(path),
        };
        Config::parse_with(text, source, &host)
    }

    /// [`Config::parse`] in a fixed world instead of the process's: `vars` are the only
    /// environment variables (name, value) and `files` the only readable files (path,
    /// contents; any other is not found). For tests and the fuzz target, which must neither
    /// mutate the process environment nor read the files their input names.
    pub fn parse_isolated(
        text: &str,
        source: Option<&Path>,
        vars: &[(&str, &str)],
        files: &[(&str, &str)],
    ) -> Result<Config, ConfigError> {
        let var = |name: &str| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        };
        let read = |path: &Path| {
            files
                .iter()
                .find(|(name, _)| Path::new(name) == path)
                .map(|(_, text)| (*text).to_owned())
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        };
        let host = Host {
            var: &var,
            read: &read,
        };
        Config::parse_with(text, source, &host)
    }

    /// [`Config::parse`] against `host`.
    fn parse_with(
        text: &str,
        source: Option<&Path>,
        host: &Host<'_>,
    ) -> Result<Config, ConfigError> {
        let document = Document { text, source, host };
        let tree = DeTable::parse(text).map_err(|error| document.toml_error(&error, None))?;
        let raw = RawConfig::deserialize(toml::de::Deserializer::from(tree.clone()))
            .map_err(|error| document.toml_error(&error, Some(tree.get_ref())))?;
        document.config(raw)
    }

    /// The effective configuration as TOML that [`Config::parse`] accepts: every key, resolv.conf
    /// paths already expanded to addresses, durations as strings (`"30s"`, `"500ms"`).
    pub fn to_toml(&self) -> String {
        use std::fmt::Write as _;

        let mut out = String::new();
        // Writing into a String cannot fail; `let _` keeps the formatting code readable.
        match &self.source {
            Some(path) => {
                let _ = writeln!(out, "# Effective ringdns configuration, from {path:?}.");
            }
            None => {
                let _ = writeln!(
                    out,
                    "# Effective ringdns configuration, from {EMBEDDED_NAME}."
                );
            }
        }
        let server = &self.server;
        let _ = writeln!(out, "\n[server]");
        let _ = writeln!(out, "listen = {}", quoted_list(&server.listen));
        let _ = writeln!(out, "workers = {}", server.workers);
        let _ = writeln!(out, "io = {}", quote(server.io.as_str()));
        let _ = writeln!(out, "udp_payload = {}", server.udp_payload);
        let _ = writeln!(
            out,
            "tcp_idle_timeout = {}",
            quote(&format_duration(server.tcp_idle_timeout))
        );
        let _ = writeln!(out, "max_tcp_connections = {}", server.max_tcp_connections);
        let _ = writeln!(out, "udp_receive_buffer = {}", server.udp_receive_buffer);
        let _ = writeln!(
            out,
            "batch_wait = {}",
            quote(&format_duration(server.batch_wait))
        );

        let cache = &self.cache;
        let _ = writeln!(out, "\n[cache]");
        let _ = writeln!(out, "success_capacity = {}", cache.success_capacity);
        let _ = writeln!(
            out,
            "success_ttl = {}",
            quote(&format_duration(cache.success_ttl))
        );
        let _ = writeln!(out, "denial_capacity = {}", cache.denial_capacity);
        let _ = writeln!(
            out,
            "denial_ttl = {}",
            quote(&format_duration(cache.denial_ttl))
        );
        let _ = writeln!(
            out,
            "servfail_ttl = {}",
            quote(&format_duration(cache.servfail_ttl))
        );

        for zone in &self.forward {
            let _ = writeln!(out, "\n[[forward]]");
            let _ = writeln!(out, "zone = {}", quote(&zone.zone));
            let _ = writeln!(out, "upstreams = {}", quoted_list(&zone.upstreams));
            let _ = writeln!(out, "transport = {}", quote(zone.transport.as_str()));
            let _ = writeln!(out, "timeout = {}", quote(&format_duration(zone.timeout)));
        }

        let _ = writeln!(out, "\n[log]");
        let _ = writeln!(out, "level = {}", quote(level_name(self.log.level)));

        let node = &self.node;
        let _ = writeln!(out, "\n[node]");
        let _ = writeln!(out, "setup_interface = {}", node.setup_interface);
        let _ = writeln!(out, "interface = {}", quote(&node.interface));
        let _ = writeln!(out, "setup_iptables = {}", node.setup_iptables);
        let _ = writeln!(out, "rules = {}", quote(node.rules.as_str()));
        let _ = writeln!(
            out,
            "sync_interval = {}",
            quote(&format_duration(node.sync_interval))
        );
        let _ = writeln!(out, "teardown = {}", node.teardown);
        let _ = writeln!(
            out,
            "fallback_service_chain = {}",
            quote(node.fallback_service_chain.as_deref().unwrap_or(""))
        );
        let _ = writeln!(
            out,
            "handover = {}",
            quote(
                &node
                    .handover
                    .as_deref()
                    .map(|path| path.display().to_string())
                    .unwrap_or_default()
            )
        );

        let _ = writeln!(out, "\n[health]");
        let _ = writeln!(out, "listen = {}", quote(&self.health.listen.to_string()));
        let _ = writeln!(
            out,
            "lameduck = {}",
            quote(&format_duration(self.health.lameduck))
        );

        let _ = writeln!(out, "\n[metrics]");
        let metrics = self.metrics.listen.map(|addr| addr.to_string());
        let _ = writeln!(out, "listen = {}", quote(metrics.as_deref().unwrap_or("")));
        out
    }
}

impl ServerConfig {
    /// Workers to start when `available` CPUs are in the affinity mask: `workers`, or one per
    /// available CPU when it is 0; always at least 1.
    pub fn worker_count(&self, available: usize) -> usize {
        match self.workers {
            0 => available.max(1),
            n => n,
        }
    }
}

impl IoBackend {
    /// The config file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IoBackend::Auto => "auto",
            IoBackend::Uring => "uring",
            IoBackend::Epoll => "epoll",
        }
    }
}

impl RulesBackend {
    /// The config file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RulesBackend::Auto => "auto",
            RulesBackend::Iptables => "iptables",
            RulesBackend::Nftables => "nftables",
        }
    }
}

impl Transport {
    /// The config file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::PreferUdp => "prefer_udp",
        }
    }
}

/// Parses a duration with a unit: `"500ms"`, `"10s"`, `"2m"`, `"1h"`, `"7d"`, `"0s"` (also `us`
/// and `ns`). One integer and one unit; no sign, fraction, spaces or compound forms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_duration_value(s).map_err(|problem| problem.to_string())
}

/// Formats `d` as [`parse_duration`] reads it, in the largest unit that is exact (`"90s"`,
/// `"2m"`, `"500ms"`); `"0s"` for zero.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    let nanos = d.as_nanos();
    for (unit, size) in UNITS_LARGEST_FIRST {
        if nanos % size == 0 {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

/// Duration units and their size in nanoseconds, largest first (for [`format_duration`]).
const UNITS_LARGEST_FIRST: [(&str, u128); 7] = [
    ("d", 86_400_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// A config file problem the operator must fix; nothing is retried until the file changes.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file itself could not be read.
    #[error("{}: {source}", file.display())]
    Read {
        /// The file that was asked for.
        file: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// A key or value in the file is wrong.
    #[error("{at}: {problem}")]
    Invalid {
        /// Where: file, line, key.
        at: Location,
        /// What is wrong (boxed to keep `Result<_, ConfigError>` small).
        problem: Box<Problem>,
    },
}

impl ConfigError {
    /// Where in the file the problem is, unless the file could not be read at all.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { at, .. } => Some(at),
        }
    }

    /// What is wrong with the file, unless it could not be read at all.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { problem, .. } => Some(problem.as_ref()),
        }
    }
}

/// A place in a config file. Displays as `file:line: key`, the file being `<embedded default>`
/// when [`Config::parse`] got no path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The config file, `None` for the embedded default.
    pub file: Option<PathBuf>,
    /// 1-based line; `None` only when the TOML parser gave no position.
    pub line: Option<usize>,
    /// Dotted key with 0-based array indices (`forward[1].timeout`); `None` for syntax errors.
    pub key: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(path) => write!(f, "{}", path.display())?,
            None => f.write_str(EMBEDDED_NAME)?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        Ok(())
    }
}

/// What is wrong at a [`Location`].
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// TOML syntax or a value of the wrong type, as the `toml` crate words it.
    #[error("{message}")]
    Toml {
        /// The parser's message.
        message: String,
    },
    /// A key the schema does not have (a typo, or a key of a newer version).
    #[error("unknown key")]
    UnknownKey,
    /// A key that has no default is absent.
    #[error("missing (required in every [[forward]])")]
    Missing,
    /// A list that must have entries is empty.
    #[error("must not be empty")]
    Empty,
    /// A duration given as a bare number.
    #[error("\"{value}\" has no unit (use e.g. \"{value}s\")")]
    NoUnit {
        /// The number as written.
        value: String,
    },
    /// A string that is not a duration.
    #[error("{value:?} is not a duration (use an integer and a unit: ms, s, m, h, d)")]
    BadDuration {
        /// The text as written, after `${VAR}` expansion.
        value: String,
    },
    /// An integer outside its knob's range.
    #[error("{value} is out of range {min}..={max}")]
    OutOfRange {
        /// The value given.
        value: i64,
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
    /// A duration outside its knob's range.
    #[error(
        "\"{}\" is out of range \"{}\"..=\"{}\"",
        format_duration(*value),
        format_duration(*min),
        format_duration(*max)
    )]
    DurationOutOfRange {
        /// The value given.
        value: Duration,
        /// Smallest accepted value.
        min: Duration,
        /// Largest accepted value.
        max: Duration,
    },
    /// A string that is not one of a fixed set of words.
    #[error("{value:?} is not one of {expected}")]
    UnknownChoice {
        /// The text as written, after `${VAR}` expansion.
        value: String,
        /// The accepted words, e.g. `auto | uring | epoll`.
        expected: &'static str,
    },
    /// `${NAME}` where `NAME` is not set in the environment (or is not UTF-8).
    #[error("environment variable {name} is not set")]
    UndefinedVariable {
        /// The variable's name.
        name: String,
    },
    /// `${` without a closing `}`, or with a name that is not `[A-Za-z_][A-Za-z0-9_]*`.
    #[error("{value:?} has a malformed ${{NAME}} reference")]
    BadVariableReference {
        /// The string as written.
        value: String,
    },
    /// A listen entry that is not a socket address.
    #[error("{value:?} is not a listen address: {reason}")]
    BadListen {
        /// The text, after `${VAR}` expansion.
        value: String,
        /// Why.
        reason: AddressProblem,
    },
    /// The same listen address twice.
    #[error("{addr} is listed twice (first on line {first_line})")]
    DuplicateListen {
        /// The repeated address.
        addr: SocketAddr,
        /// Line of its first occurrence.
        first_line: usize,
    },
    /// An upstream that is neither an address nor an absolute resolv.conf path.
    #[error(
        "{value:?} is not an upstream (IP, IP:PORT, [IPv6]:PORT or /path/to/resolv.conf): \
         {reason}"
    )]
    BadUpstream {
        /// The text, after `${VAR}` expansion.
        value: String,
        /// Why.
        reason: AddressProblem,
    },
    /// A zone that is not a domain name.
    #[error("{value:?} is not a zone name: {reason}")]
    BadZone {
        /// The text, after `${VAR}` expansion.
        value: String,
        /// Why.
        reason: ZoneProblem,
    },
    /// Two `[[forward]]` entries for the same zone (compared after normalization).
    #[error("zone {zone} is configured twice (first on line {first_line})")]
    DuplicateZone {
        /// The normalized zone.
        zone: String,
        /// Line of the first entry's `zone`.
        first_line: usize,
    },
    /// A name that is not a valid Linux interface name (`node.interface`).
    #[error("{value:?} is not an interface name: {reason}")]
    BadInterface {
        /// The text, after `${VAR}` expansion.
        value: String,
        /// Why.
        reason: NameProblem,
    },
    /// A name that is not a valid iptables chain name (`node.fallback_service_chain`).
    #[error("{value:?} is not a chain name: {reason}")]
    BadChain {
        /// The text, after `${VAR}` expansion.
        value: String,
        /// Why.
        reason: NameProblem,
    },
    /// A Unix socket path that cannot be bound (`node.handover`).
    #[error("{value:?} is not a Unix socket path: {reason}")]
    BadSocketPath {
        /// The text, after `${VAR}` expansion.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// An HTTP endpoint address that is not a socket address.
    #[error("{value:?} is not a listen address: {reason}")]
    BadEndpoint {
        /// The text, after `${VAR}` expansion.
        value: String,
        /// Why.
        reason: AddressProblem,
    },
    /// Two endpoints on the same address: the second bind would fail at start-up.
    #[error("{addr} is already used by {other}")]
    AddressTaken {
        /// The shared address.
        addr: SocketAddr,
        /// The key already using it (`health.listen`, `server.listen[0]`, or an endpoint absent
        /// from the file with its default: `metrics.listen (default: 0.0.0.0:9253)`).
        other: String,
    },
    /// Two endpoints on one port where one's wildcard IP takes the other's: the second bind
    /// would fail at start-up.
    #[error(
        "{addr} overlaps {other_addr} of {other} (the same port, and a wildcard IP takes both)"
    )]
    AddressOverlaps {
        /// The address at the reported key.
        addr: SocketAddr,
        /// The key of the other (as for [`Problem::AddressTaken`]).
        other: String,
        /// Its address.
        other_addr: SocketAddr,
    },
    /// A resolv.conf upstream could not be read.
    #[error("{}: {source}", path.display())]
    ResolvConfRead {
        /// The resolv.conf file.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// A resolv.conf upstream lists no nameserver.
    #[error("{}: no nameserver line", path.display())]
    ResolvConfEmpty {
        /// The resolv.conf file.
        path: PathBuf,
    },
    /// A resolv.conf `nameserver` line whose address does not parse.
    #[error("{}:{line}: nameserver {value:?}: {reason}", path.display())]
    ResolvConfNameserver {
        /// The resolv.conf file.
        path: PathBuf,
        /// 1-based line in that file.
        line: usize,
        /// The address as written.
        value: String,
        /// Why.
        reason: AddressProblem,
    },
}

/// Why a string is not an interface or chain name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    /// Longer than the kernel accepts.
    #[error("{len} characters (at most {max})")]
    TooLong {
        /// The name's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A character the kernel or the rule tools reject (`/`, `:`, whitespace, quotes, …).
    #[error("character {0:?} is not allowed")]
    BadCharacter(char),
    /// `""` where a name is required, or `"."`/`".."`.
    #[error("not a usable name")]
    Reserved,
}

/// Why a string is not a socket address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressProblem {
    /// Not any accepted address form.
    #[error("expected IP:PORT or [IPv6]:PORT")]
    Syntax,
    /// No port where one is required (listen addresses).
    #[error("a port is required, e.g. \"127.0.0.1:53\" or \"[::1]:53\"")]
    MissingPort,
    /// Port 0 for an upstream.
    #[error("port 0 cannot be an upstream")]
    ZeroPort,
    /// An IPv6 `%scope` that is neither a number nor an existing interface.
    #[error("unknown interface or scope id %{scope}")]
    UnknownScope {
        /// The text after `%`.
        scope: String,
    },
    /// An IPv4-mapped IPv6 listen address: the DNS sockets are IPv6-only (IPV6_V6ONLY, so
    /// IPv4 and IPv6 entries never clash), and such a socket cannot bind it (EINVAL).
    #[error("an IPv4-mapped IPv6 address cannot be a listen address: write {ipv4}")]
    MappedListen {
        /// The address as IPv4.
        ipv4: SocketAddr,
    },
}

/// Why a string is not a zone name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneProblem {
    /// Two dots in a row, a leading dot, or an empty string.
    #[error("empty label")]
    EmptyLabel,
    /// A label over 63 bytes (RFC 1035 §2.3.4).
    #[error("label of {len} bytes (at most 63)")]
    LabelTooLong {
        /// The label's length.
        len: usize,
    },
    /// A name over 253 characters without its trailing dot (RFC 1035 §2.3.4, 255 on the wire).
    #[error("name of {len} characters (at most 253)")]
    NameTooLong {
        /// The name's length without the trailing dot.
        len: usize,
    },
    /// A character other than a letter, digit, `-` or `_`.
    #[error("character {0:?} is not allowed (letters, digits, '-', '_')")]
    BadCharacter(char),
    /// A deployment placeholder such as `__PILLAR__DNS__DOMAIN__` that nobody filled in: a valid
    /// label, but no query would ever match it, so the zone's queries would go elsewhere.
    #[error("{0} is an unfilled placeholder (fill it in first, deploy/README.md)")]
    Placeholder(String),
}

/// Why [`parse_duration`] rejected a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum DurationProblem {
    /// Digits only.
    #[error("no unit")]
    NoUnit,
    /// Anything else that is not `<integer><unit>`, or too large.
    #[error("not a duration (use an integer and a unit: ms, s, m, h, d)")]
    Syntax,
}

/// Parses `<integer><unit>` for [`parse_duration`].
fn parse_duration_value(s: &str) -> Result<Duration, DurationProblem> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(DurationProblem::Syntax);
    }
    if unit.is_empty() {
        return Err(DurationProblem::NoUnit);
    }
    let number: u64 = number.parse().map_err(|_| DurationProblem::Syntax)?;
    let seconds = |factor: u64| {
        number
            .checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or(DurationProblem::Syntax)
    };
    match unit {
        "ns" => Ok(Duration::from_nanos(number)),
        "us" => Ok(Duration::from_micros(number)),
        "ms" => Ok(Duration::from_millis(number)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86400),
        _ => Err(DurationProblem::Syntax),
    }
}

/// The outside world parsing reads: environment variables (`${VAR}`) and files (resolv.conf
/// upstreams, and `/etc/resolv.conf` when the file has no `[[forward]]`). [`Config::parse`]
/// uses the process's; [`Config::parse_isolated`] a fixed one.
struct Host<'a> {
    /// Value of an environment variable, `None` if unset (or not UTF-8).
    var: &'a dyn Fn(&str) -> Option<String>,
    /// Contents of a file (a resolv.conf upstream).
    read: &'a dyn Fn(&Path) -> io::Result<String>,
}

/// What binds a TCP port at start-up (`Document::endpoints` checks they can all bind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindKind {
    /// A DNS listen address: its IPv6 sockets are IPV6_V6ONLY (worker/sockets.rs).
    Dns,
    /// The health or metrics listener: a plain listener, so `[::]` takes IPv4 too.
    Http,
}

/// One address a TCP listener binds, and where the file sets it.
#[derive(Debug)]
struct Bind {
    addr: SocketAddr,
    kind: BindKind,
    /// Its key (`server.listen[1]`, `health.listen`).
    key: String,
    /// The line that sets it; `None` when its default applies.
    line: Option<usize>,
    /// How its default is worded in errors.
    default: String,
}

impl Bind {
    /// Whether the kernel would refuse one of the two listeners (neither reuses the other's
    /// port): the same port (not 0, which binds a fresh one each time) on the same IP (and
    /// interface, for a scoped IPv6 address), or on a wildcard IP that covers the other's.
    fn clashes_with(&self, other: &Bind) -> bool {
        let (mine, theirs) = (self.bound_ip(), other.bound_ip());
        let same_ip = mine == theirs
            && match (self.addr, other.addr) {
                (SocketAddr::V6(a), SocketAddr::V6(b)) => {
                    a.scope_id() == b.scope_id() || a.scope_id() == 0 || b.scope_id() == 0
                }
                _ => true,
            };
        self.addr.port() != 0
            && self.addr.port() == other.addr.port()
            && (same_ip || self.covers(other) || other.covers(self))
    }

    /// The IP the socket ends up bound to: an HTTP listener (a dual-stack socket) given an
    /// IPv4-mapped IPv6 address binds that IPv4 address.
    fn bound_ip(&self) -> IpAddr {
        match self.kind {
            BindKind::Http => self.addr.ip().to_canonical(),
            BindKind::Dns => self.addr.ip(),
        }
    }

    /// Whether this is a wildcard address that takes `other`'s IP: `0.0.0.0` every IPv4
    /// address, `[::]` every IPv6 one, and every IPv4 one too unless IPV6_V6ONLY.
    fn covers(&self, other: &Bind) -> bool {
        match self.bound_ip() {
            IpAddr::V4(ip) => ip.is_unspecified() && other.bound_ip().is_ipv4(),
            IpAddr::V6(ip) => {
                ip.is_unspecified() && (other.bound_ip().is_ipv6() || self.kind == BindKind::Http)
            }
        }
    }
}

/// The raw file: every section optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `[server]`.
    server: Option<RawServer>,
    /// `[cache]`.
    cache: Option<RawCache>,
    /// `[[forward]]` entries.
    forward: Option<Spanned<Vec<Spanned<RawForward>>>>,
    /// `[log]`.
    log: Option<RawLog>,
    /// `[node]`.
    node: Option<RawNode>,
    /// `[health]`.
    health: Option<RawHealth>,
    /// `[metrics]`.
    metrics: Option<RawMetrics>,
}

/// Raw `[node]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    /// See [`NodeConfig::setup_interface`].
    setup_interface: Option<Spanned<bool>>,
    /// See [`NodeConfig::interface`].
    interface: Option<Spanned<String>>,
    /// See [`NodeConfig::setup_iptables`].
    setup_iptables: Option<Spanned<bool>>,
    /// See [`NodeConfig::rules`].
    rules: Option<Spanned<String>>,
    /// See [`SYNC_INTERVAL`].
    sync_interval: Option<Spanned<RawDuration>>,
    /// See [`NodeConfig::teardown`].
    teardown: Option<Spanned<bool>>,
    /// See [`NodeConfig::fallback_service_chain`].
    fallback_service_chain: Option<Spanned<String>>,
    /// See [`NodeConfig::handover`].
    handover: Option<Spanned<String>>,
}

/// Raw `[health]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    /// See [`HealthConfig::listen`].
    listen: Option<Spanned<String>>,
    /// See [`LAMEDUCK`].
    lameduck: Option<Spanned<RawDuration>>,
}

/// Raw `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// See [`MetricsConfig::listen`].
    listen: Option<Spanned<String>>,
}

/// Raw `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    /// See [`ServerConfig::listen`].
    listen: Option<Spanned<Vec<Spanned<String>>>>,
    /// See [`WORKERS`].
    workers: Option<Spanned<i64>>,
    /// See [`ServerConfig::io`].
    io: Option<Spanned<String>>,
    /// See [`UDP_PAYLOAD`].
    udp_payload: Option<Spanned<i64>>,
    /// See [`TCP_IDLE_TIMEOUT`].
    tcp_idle_timeout: Option<Spanned<RawDuration>>,
    /// See [`MAX_TCP_CONNECTIONS`].
    max_tcp_connections: Option<Spanned<i64>>,
    /// See [`UDP_RECEIVE_BUFFER`].
    udp_receive_buffer: Option<Spanned<i64>>,
    /// See [`BATCH_WAIT`].
    batch_wait: Option<Spanned<RawDuration>>,
}

/// Raw `[cache]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    /// See [`SUCCESS_CAPACITY`].
    success_capacity: Option<Spanned<i64>>,
    /// See [`SUCCESS_TTL`].
    success_ttl: Option<Spanned<RawDuration>>,
    /// See [`DENIAL_CAPACITY`].
    denial_capacity: Option<Spanned<i64>>,
    /// See [`DENIAL_TTL`].
    denial_ttl: Option<Spanned<RawDuration>>,
    /// See [`SERVFAIL_TTL`].
    servfail_ttl: Option<Spanned<RawDuration>>,
}

/// Raw `[[forward]]` entry; `zone` and `upstreams` are required, checked in conversion so the
/// error can name the entry's line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    /// See [`ForwardZone::zone`].
    zone: Option<Spanned<String>>,
    /// See [`ForwardZone::upstreams`].
    upstreams: Option<Spanned<Vec<Spanned<String>>>>,
    /// See [`ForwardZone::transport`].
    transport: Option<Spanned<String>>,
    /// See [`FORWARD_TIMEOUT`].
    timeout: Option<Spanned<RawDuration>>,
}

/// Raw `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    /// See [`LogConfig::level`].
    level: Option<Spanned<String>>,
}

/// A duration as written: a string to parse, or a bare number (always an error, but one that
/// says to add a unit rather than a type mismatch).
#[derive(Debug)]
enum RawDuration {
    /// `"10s"`.
    Text(String),
    /// `10` or `1.5`, as TOML printed it.
    Number(String),
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawDurationVisitor)
    }
}

/// Serde visitor for [`RawDuration`]: accepts strings and numbers.
struct RawDurationVisitor;

impl Visitor<'_> for RawDurationVisitor {
    type Value = RawDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string such as \"10s\"")
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<RawDuration, E> {
        Ok(RawDuration::Text(value.to_owned()))
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<RawDuration, E> {
        Ok(RawDuration::Number(value.to_string()))
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<RawDuration, E> {
        Ok(RawDuration::Number(value.to_string()))
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<RawDuration, E> {
        Ok(RawDuration::Number(value.to_string()))
    }
}

/// An integer type a [`Knob`] can hold.
trait KnobInteger: Copy + PartialOrd + TryFrom<i64> {
    /// The value as `u64`, for comparing with and reporting an `i64` from TOML.
    fn widen(self) -> u64;
}

impl KnobInteger for usize {
    fn widen(self) -> u64 {
        u64::try_from(self).unwrap_or(u64::MAX)
    }
}

impl KnobInteger for u16 {
    fn widen(self) -> u64 {
        u64::from(self)
    }
}

/// The text being parsed, with what errors need to name its place and what expansion needs.
struct Document<'a> {
    /// The whole file.
    text: &'a str,
    /// Its path, `None` for the embedded default.
    source: Option<&'a Path>,
    /// Environment and file system.
    host: &'a Host<'a>,
}

impl Document<'_> {
    /// 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> usize {
        let before = self
            .text
            .as_bytes()
            .get(..offset)
            .unwrap_or(self.text.as_bytes());
        before.iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// A [`Problem`] at the value spanning `span` under `key`.
    fn invalid(&self, span: Range<usize>, key: impl Into<String>, problem: Problem) -> ConfigError {
        ConfigError::Invalid {
            at: Location {
                file: self.source.map(Path::to_path_buf),
                line: Some(self.line(span.start)),
                key: Some(key.into()),
            },
            problem: Box::new(problem),
        }
    }

    /// Turns a `toml` error into a [`ConfigError`], finding the key at its span in `tree`.
    fn toml_error(&self, error: &toml::de::Error, tree: Option<&DeTable<'_>>) -> ConfigError {
        let offset = error.span().map(|span| span.start);
        let key = offset.zip(tree).and_then(|(at, tree)| key_at(tree, at));
        // serde words an unknown field (from deny_unknown_fields) as "unknown field `x`, …".
        let problem = if error.message().starts_with("unknown field") {
            Problem::UnknownKey
        } else {
            Problem::Toml {
                message: error.message().trim_end().to_owned(),
            }
        };
        ConfigError::Invalid {
            at: Location {
                file: self.source.map(Path::to_path_buf),
                line: offset.map(|at| self.line(at)),
                key,
            },
            problem: Box::new(problem),
        }
    }

    /// Converts and validates the raw file.
    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let (server, listen_lines) = self.server(raw.server.unwrap_or_else(RawServer::absent))?;
        let cache = self.cache(raw.cache.unwrap_or_else(RawCache::absent))?;
        let forward = match raw.forward {
            Some(entries) => self.forward_zones(entries)?,
            None => vec![ForwardZone {
                zone: DEFAULT_FORWARD_ZONE.to_owned(),
                upstreams: self
                    .resolv_conf(Path::new(DEFAULT_FORWARD_UPSTREAM))
                    .map_err(|problem| ConfigError::Invalid {
                        // No line: the zone is implied by the absence of any [[forward]].
                        at: Location {
                            file: self.source.map(Path::to_path_buf),
                            line: None,
                            key: Some("forward (default: \".\" to /etc/resolv.conf)".to_owned()),
                        },
                        problem: Box::new(problem),
                    })?,
                transport: DEFAULT_TRANSPORT,
                timeout: FORWARD_TIMEOUT.default,
            }],
        };
        let log = self.log(raw.log.unwrap_or(RawLog { level: None }))?;
        let node = self.node(raw.node.unwrap_or_default())?;
        let (health, metrics) = self.endpoints(
            raw.health.unwrap_or_default(),
            raw.metrics.unwrap_or_default(),
            &server.listen,
            &listen_lines,
        )?;
        Ok(Config {
            source: self.source.map(Path::to_path_buf),
            server,
            cache,
            forward,
            log,
            node,
            health,
            metrics,
        })
    }

    /// Validates `[node]`.
    fn node(&self, raw: RawNode) -> Result<NodeConfig, ConfigError> {
        let flag = |value: Option<Spanned<bool>>, default: bool| {
            value.map_or(default, Spanned::into_inner)
        };
        let interface = match raw.interface {
            None => DEFAULT_INTERFACE.to_owned(),
            Some(value) => {
                let text = self.expand(&value, "node.interface", false)?;
                check_interface_name(&text).map_err(|reason| {
                    self.invalid(
                        value.span(),
                        "node.interface",
                        Problem::BadInterface {
                            value: text.clone(),
                            reason,
                        },
                    )
                })?;
                text
            }
        };
        let rules = match raw.rules {
            None => DEFAULT_RULES,
            Some(value) => match self.expand(&value, "node.rules", false)?.as_str() {
                "auto" => RulesBackend::Auto,
                "iptables" => RulesBackend::Iptables,
                "nftables" => RulesBackend::Nftables,
                other => {
                    return Err(self.invalid(
                        value.span(),
                        "node.rules",
                        Problem::UnknownChoice {
                            value: other.to_owned(),
                            expected: "auto | iptables | nftables",
                        },
                    ))
                }
            },
        };
        let fallback_service_chain = match raw.fallback_service_chain {
            None => None,
            Some(value) => {
                let key = "node.fallback_service_chain";
                let text = self.expand(&value, key, false)?;
                if text.is_empty() {
                    None
                } else {
                    check_chain_name(&text).map_err(|reason| {
                        self.invalid(
                            value.span(),
                            key,
                            Problem::BadChain {
                                value: text.clone(),
                                reason,
                            },
                        )
                    })?;
                    Some(text)
                }
            }
        };
        let handover = match raw.handover {
            None => None,
            Some(value) => {
                let key = "node.handover";
                let text = self.expand(&value, key, false)?;
                if text.is_empty() {
                    None
                } else {
                    check_socket_path(&text).map_err(|reason| {
                        self.invalid(
                            value.span(),
                            key,
                            Problem::BadSocketPath {
                                value: text.clone(),
                                reason,
                            },
                        )
                    })?;
                    Some(PathBuf::from(text))
                }
            }
        };
        Ok(NodeConfig {
            setup_interface: flag(raw.setup_interface, DEFAULT_SETUP_INTERFACE),
            interface,
            setup_iptables: flag(raw.setup_iptables, DEFAULT_SETUP_IPTABLES),
            rules,
            sync_interval: self.duration(&SYNC_INTERVAL, raw.sync_interval, SYNC_INTERVAL.key)?,
            teardown: flag(raw.teardown, DEFAULT_TEARDOWN),
            fallback_service_chain,
            handover,
        })
    }

    /// Validates `[health]` and `[metrics]`: addresses (`""` = the first listen IP on port
    /// 8080 for health, off for metrics) that do not clash with `server.listen` (whose TCP
    /// listeners share the port space), whose entries are on `listen_lines`. Health and metrics
    /// may share one address.
    fn endpoints(
        &self,
        health: RawHealth,
        metrics: RawMetrics,
        listen: &[SocketAddr],
        listen_lines: &[usize],
    ) -> Result<(HealthConfig, MetricsConfig), ConfigError> {
        // The first listen address with port 8080, scope ID kept (a link-local IPv6 address
        // is unusable without it).
        let mut default_health = listen.first().copied().unwrap_or(DEFAULT_LISTEN[0]);
        default_health.set_port(DEFAULT_HEALTH_PORT);
        let health_listen = match &health.listen {
            None => default_health,
            Some(value) => self
                .endpoint(value, "health.listen")?
                .unwrap_or(default_health),
        };
        let metrics_listen = match &metrics.listen {
            None => Some(DEFAULT_METRICS_LISTEN),
            Some(value) => self.endpoint(value, "metrics.listen")?,
        };
        let line_of = |value: &Option<Spanned<String>>| {
            value.as_ref().map(|value| self.line(value.span().start))
        };
        let health_bind = Bind {
            addr: health_listen,
            kind: BindKind::Http,
            key: "health.listen".to_owned(),
            line: line_of(&health.listen),
            default: format!("the first listen IP, port {DEFAULT_HEALTH_PORT}"),
        };
        let metrics_bind = metrics_listen.map(|addr| Bind {
            addr,
            kind: BindKind::Http,
            key: "metrics.listen".to_owned(),
            line: line_of(&metrics.listen),
            default: DEFAULT_METRICS_LISTEN.to_string(),
        });
        let listen_binds = listen.iter().enumerate().map(|(index, &addr)| Bind {
            addr,
            kind: BindKind::Dns,
            key: format!("server.listen[{index}]"),
            line: listen_lines.get(index).copied(),
            default: addr.to_string(),
        });
        for listen in listen_binds {
            for endpoint in std::iter::once(&health_bind).chain(&metrics_bind) {
                if listen.clashes_with(endpoint) {
                    return Err(self.clash(&listen, endpoint));
                }
            }
        }
        // metrics.listen may equal health.listen: one HTTP listener then serves both.
        if let Some(metrics_bind) = &metrics_bind {
            if metrics_bind.addr != health_bind.addr && metrics_bind.clashes_with(&health_bind) {
                return Err(self.clash(&health_bind, metrics_bind));
            }
        }
        Ok((
            HealthConfig {
                listen: health_listen,
                lameduck: self.duration(&LAMEDUCK, health.lameduck, LAMEDUCK.key)?,
            },
            MetricsConfig {
                listen: metrics_listen,
            },
        ))
    }

    /// The error for two binds that cannot both succeed: at `second` if the file sets it (so
    /// the line the operator wrote is named), else at `first`, naming the other with its
    /// default if the file does not set it.
    fn clash(&self, first: &Bind, second: &Bind) -> ConfigError {
        let (at, other) = if second.line.is_some() {
            (second, first)
        } else {
            (first, second)
        };
        let other_key = match other.line {
            Some(_) => other.key.clone(),
            None => format!("{} (default: {})", other.key, other.default),
        };
        let problem = if at.addr == other.addr {
            Problem::AddressTaken {
                addr: at.addr,
                other: other_key,
            }
        } else {
            Problem::AddressOverlaps {
                addr: at.addr,
                other: other_key,
                other_addr: other.addr,
            }
        };
        ConfigError::Invalid {
            at: Location {
                file: self.source.map(Path::to_path_buf),
                line: at.line,
                key: Some(at.key.clone()),
            },
            problem: Box::new(problem),
        }
    }

    /// Parses an HTTP endpoint address (port required); `Ok(None)` for `""`.
    fn endpoint(
        &self,
        value: &Spanned<String>,
        key: &str,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        let text = self.expand(value, key, true)?;
        if text.is_empty() {
            return Ok(None);
        }
        parse_socket_addr(&text, None).map(Some).map_err(|reason| {
            self.invalid(
                value.span(),
                key,
                Problem::BadEndpoint {
                    value: text.clone(),
                    reason,
                },
            )
        })
    }

    /// Validates `[server]`; also returns the line of each `server.listen` entry (none for the
    /// default), where a clash with an implied `[health]` or `[metrics]` address is reported.
    fn server(&self, raw: RawServer) -> Result<(ServerConfig, Vec<usize>), ConfigError> {
        let (listen, lines) = match raw.listen {
            Some(list) => self.listen(list)?.into_iter().unzip(),
            None => (DEFAULT_LISTEN.to_vec(), Vec::new()),
        };
        let io = match raw.io {
            None => DEFAULT_IO,
            Some(value) => match self.expand(&value, "server.io", false)?.as_str() {
                "auto" => IoBackend::Auto,
                "uring" => IoBackend::Uring,
                "epoll" => IoBackend::Epoll,
                other => {
                    return Err(self.invalid(
                        value.span(),
                        "server.io",
                        Problem::UnknownChoice {
                            value: other.to_owned(),
                            expected: "auto | uring | epoll",
                        },
                    ))
                }
            },
        };
        let server = ServerConfig {
            listen,
            workers: self.integer(&WORKERS, raw.workers, WORKERS.key)?,
            io,
            udp_payload: self.integer(&UDP_PAYLOAD, raw.udp_payload, UDP_PAYLOAD.key)?,
            tcp_idle_timeout: self.duration(
                &TCP_IDLE_TIMEOUT,
                raw.tcp_idle_timeout,
                TCP_IDLE_TIMEOUT.key,
            )?,
            max_tcp_connections: self.integer(
                &MAX_TCP_CONNECTIONS,
                raw.max_tcp_connections,
                MAX_TCP_CONNECTIONS.key,
            )?,
            udp_receive_buffer: self.integer(
                &UDP_RECEIVE_BUFFER,
                raw.udp_receive_buffer,
                UDP_RECEIVE_BUFFER.key,
            )?,
            batch_wait: self.duration(&BATCH_WAIT, raw.batch_wait, BATCH_WAIT.key)?,
        };
        Ok((server, lines))
    }

    /// Validates `server.listen`: non-empty socket addresses, no duplicates; each with its line.
    fn listen(
        &self,
        list: Spanned<Vec<Spanned<String>>>,
    ) -> Result<Vec<(SocketAddr, usize)>, ConfigError> {
        let span = list.span();
        let entries = list.into_inner();
        if entries.is_empty() {
            return Err(self.invalid(span, "server.listen", Problem::Empty));
        }
        let mut seen: Vec<(SocketAddr, usize)> = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let key = format!("server.listen[{index}]");
            let text = self.expand(entry, &key, true)?;
            let bad = |reason| {
                self.invalid(
                    entry.span(),
                    key.as_str(),
                    Problem::BadListen {
                        value: text.clone(),
                        reason,
                    },
                )
            };
            let addr = parse_socket_addr(&text, None).map_err(bad)?;
            if let (SocketAddr::V6(v6), IpAddr::V4(ipv4)) = (addr, addr.ip().to_canonical()) {
                let ipv4 = SocketAddr::new(IpAddr::V4(ipv4), v6.port());
                return Err(bad(AddressProblem::MappedListen { ipv4 }));
            }
            if let Some(&(_, first_line)) = seen.iter().find(|(seen, _)| *seen == addr) {
                return Err(self.invalid(
                    entry.span(),
                    key,
                    Problem::DuplicateListen { addr, first_line },
                ));
            }
            seen.push((addr, self.line(entry.span().start)));
        }
        Ok(seen)
    }

    /// Validates `[cache]`.
    fn cache(&self, raw: RawCache) -> Result<CacheConfig, ConfigError> {
        Ok(CacheConfig {
            success_capacity: self.integer(
                &SUCCESS_CAPACITY,
                raw.success_capacity,
                SUCCESS_CAPACITY.key,
            )?,
            success_ttl: self.duration(&SUCCESS_TTL, raw.success_ttl, SUCCESS_TTL.key)?,
            denial_capacity: self.integer(
                &DENIAL_CAPACITY,
                raw.denial_capacity,
                DENIAL_CAPACITY.key,
            )?,
            denial_ttl: self.duration(&DENIAL_TTL, raw.denial_ttl, DENIAL_TTL.key)?,
            servfail_ttl: self.duration(&SERVFAIL_TTL, raw.servfail_ttl, SERVFAIL_TTL.key)?,
        })
    }

    /// Validates the `[[forward]]` entries: non-empty, zones unique after normalization.
    fn forward_zones(
        &self,
        entries: Spanned<Vec<Spanned<RawForward>>>,
    ) -> Result<Vec<ForwardZone>, ConfigError> {
        let span = entries.span();
        let entries = entries.into_inner();
        if entries.is_empty() {
            return Err(self.invalid(span, "forward", Problem::Empty));
        }
        let mut zones: Vec<ForwardZone> = Vec::with_capacity(entries.len());
        let mut zone_lines: Vec<usize> = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            let header = entry.span();
            let (zone, line) = self.forward_zone(index, header, entry.into_inner())?;
            if let Some(first) = zones.iter().position(|seen| seen.zone == zone.zone) {
                return Err(ConfigError::Invalid {
                    at: Location {
                        file: self.source.map(Path::to_path_buf),
                        line: Some(line),
                        key: Some(format!("forward[{index}].zone")),
                    },
                    problem: Box::new(Problem::DuplicateZone {
                        zone: zone.zone,
                        first_line: zone_lines.get(first).copied().unwrap_or(line),
                    }),
                });
            }
            zones.push(zone);
            zone_lines.push(line);
        }
        Ok(zones)
    }

    /// Validates `forward[index]`, whose `[[forward]]` header spans `header`. Also returns the
    /// line of its `zone`, for duplicate-zone errors.
    fn forward_zone(
        &self,
        index: usize,
        header: Range<usize>,
        raw: RawForward,
    ) -> Result<(ForwardZone, usize), ConfigError> {
        let zone_key = format!("forward[{index}].zone");
        let Some(zone) = raw.zone else {
            return Err(self.invalid(header, zone_key, Problem::Missing));
        };
        let zone_line = self.line(zone.span().start);
        let zone_text = self.expand(&zone, &zone_key, false)?;
        let name = normalize_zone(&zone_text).map_err(|reason| {
            self.invalid(
                zone.span(),
                zone_key.as_str(),
                Problem::BadZone {
                    value: zone_text.clone(),
                    reason,
                },
            )
        })?;

        let upstreams_key = format!("forward[{index}].upstreams");
        let Some(list) = raw.upstreams else {
            return Err(self.invalid(header, upstreams_key, Problem::Missing));
        };
        if list.get_ref().is_empty() {
            return Err(self.invalid(list.span(), upstreams_key, Problem::Empty));
        }
        let mut upstreams: Vec<SocketAddr> = Vec::new();
        for (position, entry) in list.get_ref().iter().enumerate() {
            let key = format!("{upstreams_key}[{position}]");
            let text = self.expand(entry, &key, true)?;
            let found = if text.starts_with('/') {
                self.resolv_conf(Path::new(&text))
                    .map_err(|problem| self.invalid(entry.span(), key.as_str(), problem))?
            } else {
                let addr = parse_socket_addr(&text, Some(DNS_PORT)).map_err(|reason| {
                    self.invalid(
                        entry.span(),
                        key.as_str(),
                        Problem::BadUpstream {
                            value: text.clone(),
                            reason,
                        },
                    )
                })?;
                vec![addr]
            };
            for addr in found {
                if !upstreams.contains(&addr) {
                    upstreams.push(addr);
                }
            }
        }

        let transport = match raw.transport {
            None => DEFAULT_TRANSPORT,
            Some(value) => {
                let key = format!("forward[{index}].transport");
                match self.expand(&value, &key, false)?.as_str() {
                    "udp" => Transport::Udp,
                    "tcp" => Transport::Tcp,
                    "prefer_udp" => Transport::PreferUdp,
                    other => {
                        return Err(self.invalid(
                            value.span(),
                            key,
                            Problem::UnknownChoice {
                                value: other.to_owned(),
                                expected: "udp | tcp | prefer_udp",
                            },
                        ))
                    }
                }
            }
        };
        let timeout = self.duration(
            &FORWARD_TIMEOUT,
            raw.timeout,
            &format!("forward[{index}].timeout"),
        )?;
        let zone = ForwardZone {
            zone: name,
            upstreams,
            transport,
            timeout,
        };
        Ok((zone, zone_line))
    }

    /// Validates `[log]`.
    fn log(&self, raw: RawLog) -> Result<LogConfig, ConfigError> {
        let Some(value) = raw.level else {
            return Ok(LogConfig {
                level: DEFAULT_LOG_LEVEL,
            });
        };
        let level = match self.expand(&value, "log.level", false)?.as_str() {
            "off" => log::LevelFilter::Off,
            "error" => log::LevelFilter::Error,
            "warn" => log::LevelFilter::Warn,
            "info" => log::LevelFilter::Info,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            other => {
                return Err(self.invalid(
                    value.span(),
                    "log.level",
                    Problem::UnknownChoice {
                        value: other.to_owned(),
                        expected: "error | warn | info | debug | trace | off",
                    },
                ))
            }
        };
        Ok(LogConfig { level })
    }

    /// The nameservers of the resolv.conf at `path`, port 53, duplicates removed, in order.
    /// The caller places the error: it belongs to the upstream entry that named the file.
    fn resolv_conf(&self, path: &Path) -> Result<Vec<SocketAddr>, Problem> {
        let text = (self.host.read)(path).map_err(|source| Problem::ResolvConfRead {
            path: path.to_path_buf(),
            source,
        })?;
        parse_resolv_conf(&text, path)
    }

    /// Validates an integer knob; absent = its default.
    fn integer<T: KnobInteger>(
        &self,
        knob: &Knob<T>,
        raw: Option<Spanned<i64>>,
        key: &str,
    ) -> Result<T, ConfigError> {
        let Some(raw) = raw else {
            return Ok(knob.default);
        };
        let value = *raw.get_ref();
        let in_range = u64::try_from(value)
            .is_ok_and(|wide| wide >= knob.min.widen() && wide <= knob.max.widen());
        match T::try_from(value) {
            Ok(converted) if in_range => Ok(converted),
            _ => Err(self.invalid(
                raw.span(),
                key,
                Problem::OutOfRange {
                    value,
                    min: knob.min.widen(),
                    max: knob.max.widen(),
                },
            )),
        }
    }

    /// Validates a duration knob; absent = its default.
    fn duration(
        &self,
        knob: &Knob<Duration>,
        raw: Option<Spanned<RawDuration>>,
        key: &str,
    ) -> Result<Duration, ConfigError> {
        let Some(raw) = raw else {
            return Ok(knob.default);
        };
        let span = raw.span();
        let text = match raw.into_inner() {
            RawDuration::Number(value) => {
                // Quoted as written (TOML would print `1e3` as 1000, `nan` as NaN); only a
                // whole number is told to add a unit: `1.5s`, `-1s` or `nans` are no duration.
                let value = self.text.get(span.clone()).map_or(value, str::to_owned);
                let problem = if value.bytes().all(|b| b.is_ascii_digit()) {
                    Problem::NoUnit { value }
                } else {
                    Problem::BadDuration { value }
                };
                return Err(self.invalid(span, key, problem));
            }
            RawDuration::Text(text) => {
                self.expand(&Spanned::new(span.clone(), text), key, false)?
            }
        };
        let value = match parse_duration_value(&text) {
            Ok(value) => value,
            Err(DurationProblem::NoUnit) => {
                return Err(self.invalid(span, key, Problem::NoUnit { value: text }))
            }
            Err(DurationProblem::Syntax) => {
                return Err(self.invalid(span, key, Problem::BadDuration { value: text }))
            }
        };
        if !knob.contains(&value) {
            return Err(self.invalid(
                span,
                key,
                Problem::DurationOutOfRange {
                    value,
                    min: knob.min,
                    max: knob.max,
                },
            ));
        }
        Ok(value)
    }

    /// Replaces each `${NAME}` in `value` from the environment. With `address`, an IPv6 value
    /// followed by `:` (as in `"${HOST}:53"`) is bracketed so the port stays a port.
    fn expand(
        &self,
        value: &Spanned<String>,
        key: &str,
        address: bool,
    ) -> Result<String, ConfigError> {
        let template = value.get_ref();
        let mut out = String::with_capacity(template.len());
        let mut rest = template.as_str();
        while let Some((before, after)) = rest.split_once("${") {
            out.push_str(before);
            let bad_reference = || {
                self.invalid(
                    value.span(),
                    key,
                    Problem::BadVariableReference {
                        value: template.clone(),
                    },
                )
            };
            let Some((name, tail)) = after.split_once('}') else {
                return Err(bad_reference());
            };
            if !is_variable_name(name) {
                return Err(bad_reference());
            }
            let Some(substitute) = (self.host.var)(name) else {
                return Err(self.invalid(
                    value.span(),
                    key,
                    Problem::UndefinedVariable {
                        name: name.to_owned(),
                    },
                ));
            };
            if address && tail.starts_with(':') && substitute.parse::<Ipv6Addr>().is_ok() {
                out.push('[');
                out.push_str(&substitute);
                out.push(']');
            } else {
                out.push_str(&substitute);
            }
            rest = tail;
        }
        out.push_str(rest);
        Ok(out)
    }
}

impl RawServer {
    /// `[server]` when the section is absent: every key default.
    fn absent() -> Self {
        Self {
            listen: None,
            workers: None,
            io: None,
            udp_payload: None,
            tcp_idle_timeout: None,
            max_tcp_connections: None,
            udp_receive_buffer: None,
            batch_wait: None,
        }
    }
}

impl RawCache {
    /// `[cache]` when the section is absent: every key default.
    fn absent() -> Self {
        Self {
            success_capacity: None,
            success_ttl: None,
            denial_capacity: None,
            denial_ttl: None,
            servfail_ttl: None,
        }
    }
}

/// The dotted key (`forward[1].timeout`) of the key or value at byte `offset` of `table`.
fn key_at(table: &DeTable<'_>, offset: usize) -> Option<String> {
    table.iter().find_map(|(key, value)| {
        if key.span().contains(&offset) {
            return Some(key.get_ref().to_string());
        }
        path_in_value(value, offset).map(|rest| format!("{}{rest}", key.get_ref()))
    })
}

/// The key path below `value` (`""`, `".x"`, `"[1].y"`) of the key or value at `offset`.
fn path_in_value(value: &Spanned<DeValue<'_>>, offset: usize) -> Option<String> {
    let inner = match value.get_ref() {
        DeValue::Table(table) => key_at(table, offset).map(|key| format!(".{key}")),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(index, item)| {
            path_in_value(item, offset).map(|rest| format!("[{index}]{rest}"))
        }),
        _ => None,
    };
    inner.or_else(|| value.span().contains(&offset).then(String::new))
}

/// Whether `name` is `[A-Za-z_][A-Za-z0-9_]*`.
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `IP:PORT`, `[IPv6]:PORT`, `[IPv6%scope]:PORT`, and with a `default_port` also a bare
/// `IP`, `IPv6%scope` or `[IPv6]`. A scope is a number or an interface name. Upstreams (those
/// with a default port) may not use port 0; listen addresses may (an ephemeral port, for tests).
fn parse_socket_addr(text: &str, default_port: Option<u16>) -> Result<SocketAddr, AddressProblem> {
    let (ip, port) = if let Some(inside) = text.strip_prefix('[') {
        let (host, after) = inside.split_once(']').ok_or(AddressProblem::Syntax)?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port.parse::<u16>().map_err(|_| AddressProblem::Syntax)?),
            None if after.is_empty() => None,
            None => return Err(AddressProblem::Syntax),
        };
        let (ip, scope) = parse_ipv6_scoped(host)?;
        (SocketAddr::V6(SocketAddrV6::new(ip, 0, 0, scope)), port)
    } else if let Ok(addr) = text.parse::<SocketAddrV4>() {
        (SocketAddr::V4(addr), Some(addr.port()))
    } else if let Ok(ip) = text.parse::<Ipv4Addr>() {
        (SocketAddr::V4(SocketAddrV4::new(ip, 0)), None)
    } else {
        let (ip, scope) = parse_ipv6_scoped(text)?;
        (SocketAddr::V6(SocketAddrV6::new(ip, 0, 0, scope)), None)
    };
    let mut addr = ip;
    match (port, default_port) {
        (Some(0), Some(_)) => return Err(AddressProblem::ZeroPort),
        (Some(port), _) | (None, Some(port)) => addr.set_port(port),
        (None, None) => return Err(AddressProblem::MissingPort),
    }
    Ok(addr)
}

/// Parses `IPv6` or `IPv6%scope`, the scope a number or an interface name (`if_nametoindex`).
fn parse_ipv6_scoped(text: &str) -> Result<(Ipv6Addr, u32), AddressProblem> {
    let (ip, scope) = match text.split_once('%') {
        Some((ip, scope)) => (ip, Some(scope)),
        None => (text, None),
    };
    let ip: Ipv6Addr = ip.parse().map_err(|_| AddressProblem::Syntax)?;
    let scope_id = match scope {
        None => 0,
        Some(scope) => scope
            .parse::<u32>()
            .ok()
            .or_else(|| nix::net::if_::if_nametoindex(scope).ok())
            .ok_or_else(|| AddressProblem::UnknownScope {
                scope: scope.to_owned(),
            })?,
    };
    Ok((ip, scope_id))
}

/// The `nameserver` addresses of resolv.conf `text` (from `path`), port 53, duplicates removed,
/// in file order. Other directives and `#`/`;` comments are ignored, as glibc does.
fn parse_resolv_conf(text: &str, path: &Path) -> Result<Vec<SocketAddr>, Problem> {
    let mut servers: Vec<SocketAddr> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let value = words.next().unwrap_or("");
        let bad = |reason| Problem::ResolvConfNameserver {
            path: path.to_path_buf(),
            line: index + 1,
            value: value.to_owned(),
            reason,
        };
        let addr = match value.parse::<Ipv4Addr>() {
            Ok(ip) => SocketAddr::V4(SocketAddrV4::new(ip, DNS_PORT)),
            Err(_) => {
                let (ip, scope) = parse_ipv6_scoped(value).map_err(bad)?;
                SocketAddr::V6(SocketAddrV6::new(ip, DNS_PORT, 0, scope))
            }
        };
        if !servers.contains(&addr) {
            servers.push(addr);
        }
    }
    if servers.is_empty() {
        return Err(Problem::ResolvConfEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(servers)
}

/// Checks a Linux interface name as the kernel's `dev_valid_name` does: 1..=15 bytes, not `.`
/// or `..`, no `/`, `:` or whitespace. Quotes and other punctuation that would need escaping
/// in log lines are refused too; real interface names never use them.
fn check_interface_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(NameProblem::Reserved);
    }
    if name.len() > MAX_INTERFACE_NAME {
        return Err(NameProblem::TooLong {
            len: name.len(),
            max: MAX_INTERFACE_NAME,
        });
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@')))
    {
        Some(bad) => Err(NameProblem::BadCharacter(bad)),
        None => Ok(()),
    }
}

/// Checks a Unix socket path: absolute, fits `sun_path` (107 bytes and the NUL), not a
/// directory name.
fn check_socket_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("must be an absolute path");
    }
    if path.len() > 107 {
        return Err("longer than 107 bytes (the limit of a Unix socket address)");
    }
    if path.ends_with('/') {
        return Err("names a directory; give the socket file's path");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    // Only from a variable's value (a written `${` is a reference): kept, the path would be
    // expanded again where `ringdns check`'s output is used as a config file.
    if path.contains("${") {
        return Err(
            "contains \"${\" (from a variable's value), which would read as a variable reference",
        );
    }
    Ok(())
}

/// Checks an iptables chain name: 1..=28 bytes of letters, digits, `-`, `_` and `.`, not
/// starting with `-` (it would read as an option). kube-proxy's chains (`KUBE-SVC-…`) fit.
fn check_chain_name(name: &str) -> Result<(), NameProblem> {
    if name.len() > MAX_CHAIN_NAME {
        return Err(NameProblem::TooLong {
            len: name.len(),
            max: MAX_CHAIN_NAME,
        });
    }
    if name.starts_with('-') || name == "." || name == ".." {
        return Err(NameProblem::Reserved);
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        Some(bad) => Err(NameProblem::BadCharacter(bad)),
        None => Ok(()),
    }
}

/// Normalizes a zone name: lower case, one trailing dot, `"."` for the root. Labels are 1..=63
/// bytes of letters, digits, `-` and `_`; the name is at most 253 characters (RFC 1035 §2.3.4).
fn normalize_zone(text: &str) -> Result<String, ZoneProblem> {
    if text == "." {
        return Ok(".".to_owned());
    }
    let name = text.strip_suffix('.').unwrap_or(text);
    if let Some(label) = name
        .split('.')
        .find(|label| label.starts_with("__PILLAR__"))
    {
        return Err(ZoneProblem::Placeholder(label.to_owned()));
    }
    if name.len() > 253 {
        return Err(ZoneProblem::NameTooLong { len: name.len() });
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(ZoneProblem::EmptyLabel);
        }
        if label.len() > 63 {
            return Err(ZoneProblem::LabelTooLong { len: label.len() });
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(ZoneProblem::BadCharacter(bad));
        }
    }
    let mut normalized = name.to_ascii_lowercase();
    normalized.push('.');
    Ok(normalized)
}

/// The config file spelling of a log level.
fn level_name(level: log::LevelFilter) -> &'static str {
    match level {
        log::LevelFilter::Off => "off",
        log::LevelFilter::Error => "error",
        log::LevelFilter::Warn => "warn",
        log::LevelFilter::Info => "info",
        log::LevelFilter::Debug => "debug",
        log::LevelFilter::Trace => "trace",
    }
}

/// `text` as a TOML basic string, escaped by the `toml` crate.
fn quote(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// `items` as a TOML array of strings: `["a", "b"]`.
fn quoted_list<T: fmt::Display>(items: &[T]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| quote(&item.to_string())).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// resolv.conf contents the fake host serves for `/etc/resolv.conf`.
    const HOST_RESOLV_CONF: &str = "search example.com\nnameserver 192.0.2.53\n";

    /// Parses `text` as if from `source`, with environment `vars` and files `files`.
    fn parse_fake(
        text: &str,
        source: Option<&str>,
        vars: &[(&str, &str)],
        files: &[(&str, &str)],
    ) -> Result<Config, ConfigError> {
        Config::parse_isolated(text, source.map(Path::new), vars, files)
    }

    /// Parses `text` from `/etc/ringdns.toml` with only the fake `/etc/resolv.conf`.
    fn parse_text(text: &str) -> Result<Config, ConfigError> {
        parse_fake(
            text,
            Some("/etc/ringdns.toml"),
            &[],
            &[("/etc/resolv.conf", HOST_RESOLV_CONF)],
        )
    }

    /// The error `text` gives, displayed.
    fn error_of(text: &str) -> String {
        match parse_text(text) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    /// A socket address literal.
    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address literal")
    }

    #[test]
    fn embedded_default_parses_to_loopback_and_host_resolvers() {
        let config = parse_fake(
            EMBEDDED_DEFAULT,
            None,
            &[],
            &[("/etc/resolv.conf", HOST_RESOLV_CONF)],
        )
        .expect("embedded default");
        assert_eq!(config.source, None);
        assert_eq!(config.server.listen, DEFAULT_LISTEN.to_vec());
        assert_eq!(
            config.server.listen,
            vec![addr("127.0.0.1:5353"), addr("[::1]:5353")]
        );
        assert_eq!(config.forward.len(), 1);
        assert_eq!(config.forward[0].zone, ".");
        assert_eq!(config.forward[0].upstreams, vec![addr("192.0.2.53:53")]);
        assert_eq!(config.forward[0].transport, Transport::Udp);
        assert_eq!(config.forward[0].timeout, Duration::from_secs(2));
    }

    #[test]
    fn empty_file_equals_embedded_default() {
        let empty = parse_fake("", None, &[], &[("/etc/resolv.conf", HOST_RESOLV_CONF)]);
        let embedded = parse_fake(
            EMBEDDED_DEFAULT,
            None,
            &[],
            &[("/etc/resolv.conf", HOST_RESOLV_CONF)],
        );
        let empty = empty.expect("empty file");
        let embedded = embedded.expect("embedded default");
        // The one difference: the embedded default keeps metrics on loopback.
        assert_eq!(empty.metrics.listen, Some(DEFAULT_METRICS_LISTEN));
        assert_eq!(
            Config {
                metrics: embedded.metrics.clone(),
                ..empty
            },
            embedded
        );
    }

    #[test]
    fn embedded_default_exposes_nothing_beyond_loopback() {
        let config = parse_fake(
            EMBEDDED_DEFAULT,
            None,
            &[],
            &[("/etc/resolv.conf", HOST_RESOLV_CONF)],
        )
        .expect("embedded default");
        assert_eq!(config.health.listen, addr("127.0.0.1:8080"));
        assert_eq!(config.metrics.listen, Some(addr("127.0.0.1:9253")));
        assert!(config.server.listen.iter().all(|a| a.ip().is_loopback()));
        assert!(!config.node.setup_interface);
        assert!(!config.node.setup_iptables);
    }

    #[test]
    fn absent_keys_take_knob_defaults() {
        let config = parse_text("").expect("empty file");
        assert_eq!(config.server.workers, WORKERS.default);
        assert_eq!(config.server.io, IoBackend::Auto);
        assert_eq!(config.server.udp_payload, 1232);
        assert_eq!(config.server.tcp_idle_timeout, Duration::from_secs(10));
        assert_eq!(config.server.max_tcp_connections, 1024);
        assert_eq!(config.server.udp_receive_buffer, 4 << 20);
        assert_eq!(config.server.batch_wait, Duration::from_micros(200));
        assert_eq!(config.cache.success_capacity, 9984);
        assert_eq!(config.cache.success_ttl, Duration::from_secs(30));
        assert_eq!(config.cache.denial_capacity, 9984);
        assert_eq!(config.cache.denial_ttl, Duration::from_secs(5));
        assert_eq!(config.cache.servfail_ttl, Duration::ZERO);
        assert_eq!(config.log.level, log::LevelFilter::Info);
        assert_eq!(
            config.node,
            NodeConfig {
                setup_interface: false,
                interface: "nodelocaldns".to_owned(),
                setup_iptables: false,
                rules: RulesBackend::Auto,
                sync_interval: Duration::from_secs(60),
                teardown: true,
                fallback_service_chain: None,
                handover: None,
            }
        );
        assert_eq!(config.health.listen, addr("127.0.0.1:8080"));
        assert_eq!(config.health.lameduck, Duration::from_secs(5));
        assert_eq!(config.metrics.listen, Some(addr("0.0.0.0:9253")));
    }

    #[test]
    fn health_listen_defaults_to_the_first_listen_ip_on_port_8080() {
        let config = parse_text("[server]\nlisten = [\"[fd00::a]:53\", \"169.254.20.10:53\"]\n")
            .expect("config");
        assert_eq!(config.health.listen, addr("[fd00::a]:8080"));
        let config =
            parse_text("[server]\nlisten = [\"169.254.20.10:53\"]\n[health]\nlisten = \"\"\n")
                .expect("config");
        assert_eq!(config.health.listen, addr("169.254.20.10:8080"));
    }

    #[test]
    fn node_health_and_metrics_keys_parse() {
        let text = "[node]\nsetup_interface = true\ninterface = \"${IF}\"\n\
                    setup_iptables = true\nrules = \"nftables\"\nsync_interval = \"1s\"\n\
                    teardown = false\nfallback_service_chain = \"KUBE-SVC-TCOQ7XJHQPQMWC2M\"\n\
                    handover = \"/run/ringdns/handover.sock\"\n\
                    [health]\nlisten = \"[::1]:8081\"\nlameduck = \"0s\"\n\
                    [metrics]\nlisten = \"\"\n";
        let config = parse_fake(
            text,
            None,
            &[("IF", "dns0")],
            &[("/etc/resolv.conf", HOST_RESOLV_CONF)],
        )
        .expect("config");
        assert!(config.node.setup_interface);
        assert_eq!(config.node.interface, "dns0");
        assert!(config.node.setup_iptables);
        assert_eq!(config.node.rules, RulesBackend::Nftables);
        assert_eq!(config.node.sync_interval, Duration::from_secs(1));
        assert!(!config.node.teardown);
        assert_eq!(
            config.node.fallback_service_chain.as_deref(),
            Some("KUBE-SVC-TCOQ7XJHQPQMWC2M")
        );
        assert_eq!(config.health.listen, addr("[::1]:8081"));
        assert_eq!(config.health.lameduck, Duration::ZERO);
        assert_eq!(config.metrics.listen, None);
        assert_eq!(
            config.node.handover.as_deref(),
            Some(Path::new("/run/ringdns/handover.sock"))
        );
        let config = parse_text("[node]\nfallback_service_chain = \"\"\nhandover = \"\"\n")
            .expect("empty chain and handover");
        assert_eq!(config.node.fallback_service_chain, None);
        assert_eq!(config.node.handover, None);
        assert_eq!(parse_text("").expect("defaults").node.handover, None);
    }

    #[test]
    fn bad_node_values_name_file_line_and_key() {
        assert_eq!(
            error_of("[node]\n\ninterface = \"a-very-long-name0\"\n"),
            "/etc/ringdns.toml:3: node.interface: \"a-very-long-name0\" is not an interface \
             name: 17 characters (at most 15)"
        );
        assert!(error_of("[node]\ninterface = \"\"\n")
            .starts_with("/etc/ringdns.toml:2: node.interface: \"\" is not an interface name"));
        assert!(error_of("[node]\ninterface = \"eth/0\"\n").contains("character '/'"));
        assert!(error_of("[node]\ninterface = \"a b\"\n").contains("character ' '"));
        assert!(error_of("[node]\nrules = \"ebtables\"\n")
            .ends_with("node.rules: \"ebtables\" is not one of auto | iptables | nftables"));
        assert_eq!(
            error_of("[node]\nsync_interval = \"500ms\"\n"),
            "/etc/ringdns.toml:2: node.sync_interval: \"500ms\" is out of range \"1s\"..=\"1h\""
        );
        assert!(error_of("[node]\nsync_interval = \"61m\"\n").contains("out of range"));
        assert!(error_of("[node]\nteardown = \"yes\"\n")
            .starts_with("/etc/ringdns.toml:2: node.teardown: invalid type"));
        assert!(error_of("[node]\nfallback_service_chain = \"-j ACCEPT\"\n")
            .contains("node.fallback_service_chain: \"-j ACCEPT\" is not a chain name"));
        assert!(error_of(&format!(
            "[node]\nfallback_service_chain = \"{}\"\n",
            "K".repeat(29)
        ))
        .contains("29 characters (at most 28)"));
        assert_eq!(
            error_of("[node]\n\nhandover = \"run/handover.sock\"\n"),
            "/etc/ringdns.toml:3: node.handover: \"run/handover.sock\" is not a Unix socket \
             path: must be an absolute path"
        );
        assert!(error_of("[node]\nhandover = \"/run/ringdns/\"\n").contains("names a directory"));
        // A `${` that comes from a variable's value is refused: `ringdns check` prints the
        // expanded path, which would be expanded again if used as a config file.
        let from_variable = parse_fake(
            "[node]\nhandover = \"/run/${DIR}/handover.sock\"\n",
            Some("/etc/ringdns.toml"),
            &[("DIR", "a${B}")],
            &[("/etc/resolv.conf", HOST_RESOLV_CONF)],
        )
        .map(|_| ())
        .map_err(|error| error.to_string());
        assert_eq!(
            from_variable,
            Err(
                "/etc/ringdns.toml:2: node.handover: \"/run/a${B}/handover.sock\" is not a \
                 Unix socket path: contains \"${\" (from a variable's value), which would read \
                 as a variable reference"
                    .to_owned()
            )
        );
        let plain = parse_fake(
            "[node]\nhandover = \"/run/${DIR}/handover.sock\"\n",
            Some("/etc/ringdns.toml"),
            &[("DIR", "a$b")],
            &[("/etc/resolv.conf", HOST_RESOLV_CONF)],
        )
        .expect("a `$` alone is an ordinary byte");
        assert_eq!(
            plain.node.handover.as_deref(),
            Some(Path::new("/run/a$b/handover.sock"))
        );
        assert!(
            error_of(&format!("[node]\nhandover = \"/{}\"\n", "x".repeat(107)))
                .contains("longer than 107 bytes")
        );
        assert_eq!(
            error_of("[node]\nbogus = 1\n"),
            "/etc/ringdns.toml:2: node.bogus: unknown key"
        );
    }

    #[test]
    fn bad_health_and_metrics_values_name_file_line_and_key() {
        assert_eq!(
            error_of("[health]\nlameduck = \"61s\"\n"),
            "/etc/ringdns.toml:2: health.lameduck: \"61s\" is out of range \"0s\"..=\"1m\""
        );
        assert!(error_of("[health]\nlisten = \"127.0.0.1\"\n")
            .starts_with("/etc/ringdns.toml:2: health.listen: \"127.0.0.1\" is not a listen"));
        assert!(error_of("[metrics]\nlisten = \":9253\"\n")
            .starts_with("/etc/ringdns.toml:2: metrics.listen: \":9253\" is not a listen"));
        let shared =
            parse_text("[health]\nlisten = \"127.0.0.1:9\"\n[metrics]\nlisten = \"127.0.0.1:9\"\n")
                .expect("health and metrics may share an address");
        assert_eq!(shared.metrics.listen, Some(shared.health.listen));
        assert_eq!(
            error_of(
                "[server]\nlisten = [\"127.0.0.1:53\"]\n[health]\nlisten = \"127.0.0.1:53\"\n"
            ),
            "/etc/ringdns.toml:4: health.listen: 127.0.0.1:53 is already used by server.listen[0]"
        );
        assert_eq!(
            error_of("[metrics]\nlisten = \"[::1]:5353\"\n"),
            "/etc/ringdns.toml:2: metrics.listen: [::1]:5353 is already used by server.listen[1] \
             (default: [::1]:5353)"
        );
    }

    #[test]
    fn clash_with_an_implied_endpoint_names_the_listen_line_and_key() {
        assert_eq!(
            error_of("[server]\nlisten = [\n  \"127.0.0.1:53\",\n  \"127.0.0.1:8080\",\n]\n"),
            "/etc/ringdns.toml:4: server.listen[1]: 127.0.0.1:8080 is already used by \
             health.listen (default: the first listen IP, port 8080)"
        );
        assert_eq!(
            error_of("[server]\nlisten = [\"0.0.0.0:9253\"]\n[health]\nlisten = \"[::1]:8080\"\n"),
            "/etc/ringdns.toml:2: server.listen[0]: 0.0.0.0:9253 is already used by \
             metrics.listen (default: 0.0.0.0:9253)"
        );
        // health.listen = "" is in the file: the error stays there.
        assert_eq!(
            error_of("[server]\nlisten = [\"127.0.0.1:8080\"]\n[health]\nlisten = \"\"\n"),
            "/etc/ringdns.toml:4: health.listen: 127.0.0.1:8080 is already used by \
             server.listen[0]"
        );
    }

    #[test]
    fn a_wildcard_endpoint_clashes_with_a_listen_address_on_its_port() {
        assert_eq!(
            error_of("[server]\nlisten = [\"10.0.0.1:53\", \"10.0.0.1:9253\"]\n"),
            "/etc/ringdns.toml:2: server.listen[1]: 10.0.0.1:9253 overlaps 0.0.0.0:9253 of \
             metrics.listen (default: 0.0.0.0:9253) (the same port, and a wildcard IP takes both)"
        );
        // A plain HTTP listener on [::] takes IPv4 too.
        assert_eq!(
            error_of("[server]\nlisten = [\"10.0.0.1:53\"]\n[health]\nlisten = \"[::]:53\"\n"),
            "/etc/ringdns.toml:4: health.listen: [::]:53 overlaps 10.0.0.1:53 of server.listen[0] \
             (the same port, and a wildcard IP takes both)"
        );
        assert_eq!(
            error_of("[health]\nlisten = \"127.0.0.1:9\"\n[metrics]\nlisten = \"0.0.0.0:9\"\n"),
            "/etc/ringdns.toml:4: metrics.listen: 0.0.0.0:9 overlaps 127.0.0.1:9 of health.listen \
             (the same port, and a wildcard IP takes both)"
        );
        // DNS sockets on [::] are IPV6_V6ONLY: an IPv4 endpoint on that port binds; other
        // ports and families never clash.
        for fine in [
            "[server]\nlisten = [\"[::]:9253\"]\n[metrics]\nlisten = \"0.0.0.0:9253\"\n",
            "[server]\nlisten = [\"0.0.0.0:53\"]\n[health]\nlisten = \"[::1]:53\"\n",
            "[server]\nlisten = [\"0.0.0.0:53\"]\n",
        ] {
            assert!(parse_text(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn endpoints_that_bind_side_by_side_do_not_clash() {
        for fine in [
            // Port 0 binds a fresh port each time.
            "[health]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"0.0.0.0:0\"\n",
            // Scoped link-local addresses on different interfaces.
            "[server]\nlisten = [\"[fe80::1%1]:53\"]\n[health]\nlisten = \"[fe80::1%2]:53\"\n",
            // An IPv4-mapped HTTP address is IPv4, which the IPv6-only DNS socket leaves free.
            "[server]\nlisten = [\"[::]:9253\"]\n[metrics]\nlisten = \"[::ffff:127.0.0.1]:9253\"\n",
        ] {
            assert!(
                parse_text(fine).is_ok(),
                "{fine}: {:?}",
                parse_text(fine).err()
            );
        }
        // ... and binds that IPv4 address, which 0.0.0.0 or the same IPv4 listen address takes.
        assert!(error_of("[health]\nlisten = \"[::ffff:127.0.0.1]:9253\"\n")
            .contains("overlaps 0.0.0.0:9253 of metrics.listen (default: 0.0.0.0:9253)"));
        assert!(error_of(
            "[server]\nlisten = [\"127.0.0.1:53\"]\n[health]\nlisten = \"[::ffff:127.0.0.1]:53\"\n"
        )
        .contains(
            "health.listen: [::ffff:127.0.0.1]:53 overlaps 127.0.0.1:53 of server.listen[0]"
        ));
    }

    #[test]
    fn an_ipv4_mapped_listen_address_is_rejected_with_its_ipv4_form() {
        assert_eq!(
            error_of("[server]\nlisten = [\"[::ffff:127.0.0.1]:53\"]\n"),
            "/etc/ringdns.toml:2: server.listen[0]: \"[::ffff:127.0.0.1]:53\" is not a listen \
             address: an IPv4-mapped IPv6 address cannot be a listen address: write 127.0.0.1:53"
        );
    }

    #[test]
    fn the_default_health_address_keeps_the_listen_scope_id() {
        let config =
            parse_text("[server]\nlisten = [\"[fe80::1%1]:53\"]\n[metrics]\nlisten = \"\"\n")
                .expect("a scoped link-local listen address");
        let SocketAddr::V6(health) = config.health.listen else {
            panic!("{:?}", config.health.listen);
        };
        assert_eq!((health.port(), health.scope_id()), (8080, 1));
    }

    #[test]
    fn knob_defaults_lie_within_their_ranges() {
        for knob in [WORKERS, MAX_TCP_CONNECTIONS, UDP_RECEIVE_BUFFER] {
            assert!(knob.contains(&knob.default), "{}", knob.key);
        }
        for knob in [SUCCESS_CAPACITY, DENIAL_CAPACITY] {
            assert!(knob.contains(&knob.default), "{}", knob.key);
        }
        assert!(UDP_PAYLOAD.contains(&UDP_PAYLOAD.default));
        for knob in [
            TCP_IDLE_TIMEOUT,
            SUCCESS_TTL,
            DENIAL_TTL,
            SERVFAIL_TTL,
            FORWARD_TIMEOUT,
            SYNC_INTERVAL,
            LAMEDUCK,
        ] {
            assert!(knob.contains(&knob.default), "{}", knob.key);
        }
    }

    #[test]
    fn example_file_parses_as_node_local_dns_cache() {
        let config = parse_fake(
            include_str!("../config.toml.example"),
            Some("config.toml.example"),
            &[("KUBE_DNS_UPSTREAM_SERVICE_HOST", "10.96.0.11")],
            &[("/etc/resolv.conf", HOST_RESOLV_CONF)],
        )
        .expect("config.toml.example");
        assert_eq!(
            config.server.listen,
            vec![addr("169.254.20.10:53"), addr("10.96.0.10:53")]
        );
        let zones: Vec<&str> = config.forward.iter().map(|f| f.zone.as_str()).collect();
        assert_eq!(zones, ["cluster.local.", "in-addr.arpa.", "ip6.arpa.", "."]);
        for zone in &config.forward[..3] {
            assert_eq!(zone.upstreams, vec![addr("10.96.0.11:53")]);
            assert_eq!(zone.transport, Transport::Tcp);
        }
        assert_eq!(config.forward[3].upstreams, vec![addr("192.0.2.53:53")]);
        assert_eq!(config.forward[3].transport, Transport::Udp);
        assert!(config.node.setup_interface);
        assert!(config.node.setup_iptables);
        assert_eq!(config.node.interface, "nodelocaldns");
        assert_eq!(config.node.rules, RulesBackend::Auto);
        assert_eq!(config.health.listen, addr("169.254.20.10:8080"));
        assert_eq!(config.metrics.listen, Some(addr("0.0.0.0:9253")));
    }

    #[test]
    fn unknown_key_error_names_file_line_and_key() {
        let error = error_of("[server]\nworkers = 2\nbogus = 1\n");
        assert_eq!(error, "/etc/ringdns.toml:3: server.bogus: unknown key");
    }

    #[test]
    fn unknown_key_in_second_forward_names_its_index() {
        let text = "[[forward]]\nzone = \"a\"\nupstreams = [\"192.0.2.1\"]\n\
                    [[forward]]\nzone = \"b\"\nupstreams = [\"192.0.2.1\"]\ntimeot = \"1s\"\n";
        assert_eq!(
            error_of(text),
            "/etc/ringdns.toml:7: forward[1].timeot: unknown key"
        );
    }

    #[test]
    fn unknown_section_is_an_unknown_key() {
        assert_eq!(
            error_of("[log]\nlevel = \"info\"\n\n[serverr]\nworkers = 1\n"),
            "/etc/ringdns.toml:4: serverr: unknown key"
        );
    }

    #[test]
    fn errors_without_a_path_name_the_embedded_default() {
        let error = parse_fake("[cache]\nbogus = 1\n", None, &[], &[])
            .expect_err("unknown key")
            .to_string();
        assert_eq!(error, "<embedded default>:2: cache.bogus: unknown key");
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let error = error_of("[server]\n\nudp_payload = \"big\"\n");
        assert!(
            error.starts_with("/etc/ringdns.toml:3: server.udp_payload: invalid type"),
            "{error}"
        );
    }

    #[test]
    fn syntax_error_names_line() {
        let error = error_of("[server]\nworkers = = 2\n");
        assert!(error.starts_with("/etc/ringdns.toml:2: "), "{error}");
    }

    #[test]
    fn duration_without_unit_says_to_add_one() {
        let text = "[[forward]]\nzone = \"a\"\nupstreams = [\"192.0.2.1\"]\n\
                    [[forward]]\nzone = \"b\"\nupstreams = [\"192.0.2.1\"]\ntimeout = 2\n";
        assert_eq!(
            error_of(text),
            "/etc/ringdns.toml:7: forward[1].timeout: \"2\" has no unit (use e.g. \"2s\")"
        );
        assert_eq!(
            error_of("[cache]\nsuccess_ttl = \"30\"\n"),
            "/etc/ringdns.toml:2: cache.success_ttl: \"30\" has no unit (use e.g. \"30s\")"
        );
    }

    #[test]
    fn a_bare_number_that_is_no_integer_is_not_told_to_add_a_unit() {
        for bare in ["1.5", "-2", "nan", "inf", "1e3"] {
            assert_eq!(
                error_of(&format!("[health]\nlameduck = {bare}\n")),
                format!(
                    "/etc/ringdns.toml:2: health.lameduck: \"{bare}\" is not a duration (use an \
                     integer and a unit: ms, s, m, h, d)"
                ),
            );
        }
    }

    #[test]
    fn malformed_duration_is_an_error() {
        for bad in ["10 s", "10sec", "1.5s", "-1s", "s", "", "1h30m"] {
            let error = error_of(&format!("[server]\ntcp_idle_timeout = \"{bad}\"\n"));
            assert!(
                error.starts_with("/etc/ringdns.toml:2: server.tcp_idle_timeout: "),
                "{bad}: {error}"
            );
            assert!(error.contains("is not a duration"), "{bad}: {error}");
        }
    }

    #[test]
    fn values_in_errors_are_quoted_with_control_characters_escaped() {
        // A value from the file reaches the journal escaped, not as raw bytes.
        assert_eq!(
            error_of("[node]\nrules = \"ipt\\u001b[2Jables\\n\"\n"),
            "/etc/ringdns.toml:2: node.rules: \"ipt\\u{1b}[2Jables\\n\" is not one of \
             auto | iptables | nftables"
        );
    }

    #[test]
    fn parse_duration_reads_every_unit() {
        let cases = [
            ("0s", Duration::ZERO),
            ("500ms", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("7d", Duration::from_secs(7 * 86400)),
            ("250us", Duration::from_micros(250)),
            ("5ns", Duration::from_nanos(5)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
            assert_eq!(parse_duration(&format_duration(expected)), Ok(expected));
        }
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration("2").is_err());
    }

    #[test]
    fn format_duration_uses_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn out_of_range_integers_are_errors_not_clamped() {
        assert_eq!(
            error_of("[server]\nudp_payload = 4097\n"),
            "/etc/ringdns.toml:2: server.udp_payload: 4097 is out of range 512..=4096"
        );
        assert_eq!(
            error_of("[server]\nudp_payload = 511\n"),
            "/etc/ringdns.toml:2: server.udp_payload: 511 is out of range 512..=4096"
        );
        assert_eq!(
            error_of("[server]\nworkers = -1\n"),
            "/etc/ringdns.toml:2: server.workers: -1 is out of range 0..=1024"
        );
        assert_eq!(
            error_of("[server]\nworkers = 1025\n"),
            "/etc/ringdns.toml:2: server.workers: 1025 is out of range 0..=1024"
        );
        assert_eq!(
            error_of("[cache]\nsuccess_capacity = 0\n"),
            "/etc/ringdns.toml:2: cache.success_capacity: 0 is out of range 1..=16777216"
        );
        assert_eq!(
            error_of("[server]\nudp_receive_buffer = 65535\n"),
            "/etc/ringdns.toml:2: server.udp_receive_buffer: 65535 is out of range \
             65536..=1073741824"
        );
        assert_eq!(
            error_of("[server]\nbatch_wait = \"1001us\"\n"),
            "/etc/ringdns.toml:2: server.batch_wait: \"1001us\" is out of range \"0s\"..=\"1ms\""
        );
    }

    #[test]
    fn boundary_values_are_accepted() {
        let config = parse_text(
            "[server]\nworkers = 1024\nudp_payload = 512\nmax_tcp_connections = 65536\n\
             tcp_idle_timeout = \"1h\"\nbatch_wait = \"1ms\"\n[cache]\nservfail_ttl = \"30s\"\ndenial_ttl = \"7d\"\n",
        )
        .expect("boundaries are inclusive");
        assert_eq!(config.server.workers, 1024);
        assert_eq!(config.server.udp_payload, 512);
        assert_eq!(config.server.max_tcp_connections, 65536);
        assert_eq!(config.server.tcp_idle_timeout, Duration::from_secs(3600));
        assert_eq!(config.server.batch_wait, Duration::from_millis(1));
        assert_eq!(config.cache.servfail_ttl, Duration::from_secs(30));
    }

    #[test]
    fn out_of_range_durations_are_errors_not_clamped() {
        assert_eq!(
            error_of("[cache]\nservfail_ttl = \"31s\"\n"),
            "/etc/ringdns.toml:2: cache.servfail_ttl: \"31s\" is out of range \"0s\"..=\"30s\""
        );
        assert_eq!(
            error_of(
                "[[forward]]\nzone = \".\"\nupstreams = [\"192.0.2.1\"]\ntimeout = \"50ms\"\n"
            ),
            "/etc/ringdns.toml:4: forward[0].timeout: \"50ms\" is out of range \"100ms\"..=\"1m\""
        );
        assert_eq!(
            error_of("[server]\ntcp_idle_timeout = \"0s\"\n"),
            "/etc/ringdns.toml:2: server.tcp_idle_timeout: \"0s\" is out of range \"1s\"..=\"1h\""
        );
    }

    #[test]
    fn unknown_choices_are_errors() {
        assert!(error_of("[server]\nio = \"kqueue\"\n")
            .ends_with("server.io: \"kqueue\" is not one of auto | uring | epoll"));
        assert!(error_of("[log]\nlevel = \"verbose\"\n").contains("log.level: \"verbose\""));
        assert!(error_of(
            "[[forward]]\nzone = \".\"\nupstreams = [\"192.0.2.1\"]\ntransport = \"quic\"\n"
        )
        .contains("/etc/ringdns.toml:4: forward[0].transport: \"quic\""));
    }

    #[test]
    fn missing_env_var_names_variable_file_line_and_key() {
        let text = "[[forward]]\nzone = \"cluster.local\"\n\
                    upstreams = [\"192.0.2.1\", \"${KUBE_DNS_UPSTREAM_SERVICE_HOST}:53\"]\n";
        assert_eq!(
            error_of(text),
            "/etc/ringdns.toml:3: forward[0].upstreams[1]: \
             environment variable KUBE_DNS_UPSTREAM_SERVICE_HOST is not set"
        );
    }

    #[test]
    fn env_vars_are_expanded_in_every_string_value() {
        let text = "[server]\nlisten = [\"${ADDR}:${PORT}\"]\nio = \"${IO}\"\n\
                    tcp_idle_timeout = \"${IDLE}\"\n\
                    [[forward]]\nzone = \"${ZONE}\"\nupstreams = [\"${UP}\"]\n\
                    transport = \"${TRANSPORT}\"\n[log]\nlevel = \"${LEVEL}\"\n";
        let vars = [
            ("ADDR", "10.0.0.1"),
            ("PORT", "5300"),
            ("IO", "epoll"),
            ("IDLE", "20s"),
            ("ZONE", "Example.ORG"),
            ("UP", "192.0.2.7"),
            ("TRANSPORT", "prefer_udp"),
            ("LEVEL", "debug"),
        ];
        let config = parse_fake(text, None, &vars, &[]).expect("expanded config");
        assert_eq!(config.server.listen, vec![addr("10.0.0.1:5300")]);
        assert_eq!(config.server.io, IoBackend::Epoll);
        assert_eq!(config.server.tcp_idle_timeout, Duration::from_secs(20));
        assert_eq!(config.forward[0].zone, "example.org.");
        assert_eq!(config.forward[0].upstreams, vec![addr("192.0.2.7:53")]);
        assert_eq!(config.forward[0].transport, Transport::PreferUdp);
        assert_eq!(config.log.level, log::LevelFilter::Debug);
    }

    #[test]
    fn ipv6_env_var_before_a_port_is_bracketed() {
        let text = "[[forward]]\nzone = \".\"\nupstreams = [\"${HOST}:53\"]\n";
        let config = parse_fake(text, None, &[("HOST", "fd00::10")], &[]).expect("config");
        assert_eq!(config.forward[0].upstreams, vec![addr("[fd00::10]:53")]);
    }

    #[test]
    fn malformed_variable_reference_is_an_error() {
        assert!(error_of("[server]\nio = \"${IO\"\n")
            .contains("server.io: \"${IO\" has a malformed ${NAME} reference"));
        assert!(error_of("[server]\nio = \"${}\"\n").contains("malformed"));
    }

    #[test]
    fn resolv_conf_upstream_expands_to_its_nameservers() -> anyhow::Result<()> {
        use std::io::Write as _;

        let mut file = tempfile::NamedTempFile::new()?;
        write!(
            file,
            "# generated\nsearch svc.cluster.local\n; comment\nnameserver 192.0.2.1\n\
             options ndots:5\nnameserver   2001:db8::1  \nnameserver fe80::1%7\n\
             nameserver 192.0.2.1\nnameserver 192.0.2.2\n"
        )?;
        let path = file.path().display().to_string();
        let text = format!(
            "[[forward]]\nzone = \".\"\n\
             upstreams = [\"192.0.2.2:5353\", \"{path}\", \"192.0.2.2\"]\n"
        );
        let config = Config::parse(&text, None)?;
        assert_eq!(
            config.forward[0].upstreams,
            vec![
                addr("192.0.2.2:5353"),
                addr("192.0.2.1:53"),
                addr("[2001:db8::1]:53"),
                addr("[fe80::1%7]:53"),
                addr("192.0.2.2:53"),
            ]
        );
        Ok(())
    }

    #[test]
    fn resolv_conf_without_nameserver_is_an_error_naming_it() -> anyhow::Result<()> {
        use std::io::Write as _;

        let mut file = tempfile::NamedTempFile::new()?;
        write!(file, "search example.com\n# nameserver 192.0.2.1\n")?;
        let path = file.path().display().to_string();
        let text = format!("[[forward]]\nzone = \".\"\nupstreams = [\"{path}\"]\n");
        let error = Config::parse(&text, None).expect_err("no nameserver");
        assert_eq!(
            error.to_string(),
            format!("<embedded default>:3: forward[0].upstreams[0]: {path}: no nameserver line")
        );
        Ok(())
    }

    #[test]
    fn unreadable_resolv_conf_is_an_error_naming_it() {
        let error =
            error_of("[[forward]]\nzone = \".\"\nupstreams = [\"/nonexistent/resolv.conf\"]\n");
        assert!(
            error.starts_with(
                "/etc/ringdns.toml:3: forward[0].upstreams[0]: /nonexistent/resolv.conf: "
            ),
            "{error}"
        );
    }

    #[test]
    fn resolv_conf_bad_nameserver_names_its_line() {
        let files = [(
            "/r.conf",
            "nameserver 192.0.2.1\nnameserver fe80::1%no-such-if0\n",
        )];
        let text = "[[forward]]\nzone = \".\"\nupstreams = [\"/r.conf\"]\n";
        let error = parse_fake(text, None, &[], &files).expect_err("bad scope");
        assert_eq!(
            error.to_string(),
            "<embedded default>:3: forward[0].upstreams[0]: /r.conf:2: nameserver \
             \"fe80::1%no-such-if0\": unknown interface or scope id %no-such-if0"
        );
    }

    #[test]
    fn missing_default_resolv_conf_names_it() {
        let error = parse_fake("", None, &[], &[]).expect_err("no /etc/resolv.conf");
        assert!(error.to_string().contains("/etc/resolv.conf"), "{error}");
    }

    #[test]
    fn upstream_forms_parse_with_port_53_default() {
        let text = "[[forward]]\nzone = \".\"\nupstreams = [\"192.0.2.1\", \"192.0.2.2:5300\", \
                    \"[2001:db8::1]:5300\", \"2001:db8::2\", \"[2001:db8::3]\", \"fe80::1%3\"]\n";
        let config = parse_text(text).expect("upstream forms");
        assert_eq!(
            config.forward[0].upstreams,
            vec![
                addr("192.0.2.1:53"),
                addr("192.0.2.2:5300"),
                addr("[2001:db8::1]:5300"),
                addr("[2001:db8::2]:53"),
                addr("[2001:db8::3]:53"),
                addr("[fe80::1%3]:53"),
            ]
        );
    }

    #[test]
    fn bad_upstreams_are_errors() {
        for bad in [
            "dns.example",
            "192.0.2.1:0",
            "192.0.2.1:99999",
            "[::1",
            "relative/path",
        ] {
            let error = error_of(&format!(
                "[[forward]]\nzone = \".\"\nupstreams = [\"{bad}\"]\n"
            ));
            assert!(
                error.starts_with("/etc/ringdns.toml:3: forward[0].upstreams[0]: "),
                "{bad}: {error}"
            );
        }
        assert!(error_of("[[forward]]\nzone = \".\"\nupstreams = []\n")
            .ends_with("forward[0].upstreams: must not be empty"));
    }

    #[test]
    fn zones_are_normalized_to_lower_case_with_trailing_dot() {
        assert_eq!(
            normalize_zone("Cluster.Local"),
            Ok("cluster.local.".to_owned())
        );
        assert_eq!(
            normalize_zone("in-addr.arpa."),
            Ok("in-addr.arpa.".to_owned())
        );
        assert_eq!(normalize_zone("."), Ok(".".to_owned()));
        assert_eq!(
            normalize_zone("_tcp.example"),
            Ok("_tcp.example.".to_owned())
        );
        let config =
            parse_text("[[forward]]\nzone = \"SVC.Cluster.LOCAL\"\nupstreams = [\"192.0.2.1\"]\n")
                .expect("config");
        assert_eq!(config.forward[0].zone, "svc.cluster.local.");
    }

    #[test]
    fn invalid_zone_names_are_rejected() {
        assert_eq!(normalize_zone(""), Err(ZoneProblem::EmptyLabel));
        assert_eq!(normalize_zone("a..b"), Err(ZoneProblem::EmptyLabel));
        assert_eq!(normalize_zone(".a"), Err(ZoneProblem::EmptyLabel));
        assert_eq!(normalize_zone("a b"), Err(ZoneProblem::BadCharacter(' ')));
        let long_label = "a".repeat(64);
        assert_eq!(
            normalize_zone(&long_label),
            Err(ZoneProblem::LabelTooLong { len: 64 })
        );
        assert!(normalize_zone(&"a".repeat(63)).is_ok());
        let long_name = vec!["abc"; 64].join(".");
        assert_eq!(
            normalize_zone(&long_name),
            Err(ZoneProblem::NameTooLong { len: 255 })
        );
        assert!(
            error_of("[[forward]]\nzone = \"bad!\"\nupstreams = [\"192.0.2.1\"]\n")
                .starts_with("/etc/ringdns.toml:2: forward[0].zone: \"bad!\" is not a zone name")
        );
        assert_eq!(
            normalize_zone("__PILLAR__DNS__DOMAIN__"),
            Err(ZoneProblem::Placeholder(
                "__PILLAR__DNS__DOMAIN__".to_owned()
            ))
        );
        assert!(error_of(
            "[[forward]]\nzone = \"svc.__PILLAR__DNS__DOMAIN__\"\nupstreams = [\"192.0.2.1\"]\n"
        )
        .starts_with("/etc/ringdns.toml:2: forward[0].zone: \"svc.__PILLAR__DNS__DOMAIN__\" is not a zone name: __PILLAR__DNS__DOMAIN__ is an unfilled placeholder"));
        assert!(normalize_zone("_pillar_.example").is_ok());
    }

    #[test]
    fn duplicate_zone_after_normalization_is_an_error() {
        let text = "[[forward]]\nzone = \"cluster.local\"\nupstreams = [\"192.0.2.1\"]\n\
                    [[forward]]\nzone = \"Cluster.Local.\"\nupstreams = [\"192.0.2.2\"]\n";
        assert_eq!(
            error_of(text),
            "/etc/ringdns.toml:5: forward[1].zone: zone cluster.local. is configured twice \
             (first on line 2)"
        );
    }

    #[test]
    fn forward_without_zone_or_upstreams_is_an_error() {
        assert_eq!(
            error_of("[[forward]]\nupstreams = [\"192.0.2.1\"]\n"),
            "/etc/ringdns.toml:1: forward[0].zone: missing (required in every [[forward]])"
        );
        assert_eq!(
            error_of("[log]\n[[forward]]\nzone = \".\"\n"),
            "/etc/ringdns.toml:2: forward[0].upstreams: missing (required in every [[forward]])"
        );
    }

    #[test]
    fn duplicate_listen_is_an_error_naming_both_lines() {
        let text =
            "[server]\nlisten = [\n  \"127.0.0.1:53\",\n  \"[::1]:53\",\n  \"127.0.0.1:53\",\n]\n";
        assert_eq!(
            error_of(text),
            "/etc/ringdns.toml:5: server.listen[2]: 127.0.0.1:53 is listed twice (first on line 3)"
        );
    }

    #[test]
    fn empty_listen_is_an_error() {
        assert_eq!(
            error_of("[server]\nlisten = []\n"),
            "/etc/ringdns.toml:2: server.listen: must not be empty"
        );
    }

    #[test]
    fn listen_requires_a_port_and_allows_port_zero() {
        assert!(error_of("[server]\nlisten = [\"127.0.0.1\"]\n").contains("a port is required"));
        let config = parse_text("[server]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\n")
            .expect("ephemeral ports");
        assert_eq!(
            config.server.listen,
            vec![addr("127.0.0.1:0"), addr("[::1]:0")]
        );
    }

    #[test]
    fn to_toml_round_trips_to_an_equal_config() {
        let text = "[server]\nlisten = [\"169.254.20.10:53\", \"[fd00::a]:53\"]\nworkers = 3\n\
                    io = \"uring\"\nudp_payload = 1400\ntcp_idle_timeout = \"90s\"\n\
                    max_tcp_connections = 7\nudp_receive_buffer = 65536\n\
                    batch_wait = \"50us\"\n\
                    [cache]\nsuccess_capacity = 5\nsuccess_ttl = \"1h\"\ndenial_capacity = 6\n\
                    denial_ttl = \"1500ms\"\nservfail_ttl = \"3s\"\n\
                    [[forward]]\nzone = \"Cluster.Local\"\n\
                    upstreams = [\"${UP}:53\", \"/etc/resolv.conf\"]\n\
                    transport = \"tcp\"\ntimeout = \"250ms\"\n\
                    [[forward]]\nzone = \".\"\nupstreams = [\"fe80::1%2\"]\n\
                    transport = \"prefer_udp\"\n\
                    [log]\nlevel = \"off\"\n\
                    [node]\nsetup_interface = true\ninterface = \"dns0\"\n\
                    setup_iptables = true\nrules = \"iptables\"\nsync_interval = \"90s\"\n\
                    teardown = false\nfallback_service_chain = \"KUBE-SVC-X\"\n\
                    handover = \"/run/ringdns/handover.sock\"\n\
                    [health]\nlisten = \"[fd00::a]:8080\"\nlameduck = \"1500ms\"\n\
                    [metrics]\nlisten = \"\"\n";
        let files = [(
            "/etc/resolv.conf",
            "nameserver 192.0.2.53\nnameserver 2001:db8::53\n",
        )];
        let config = parse_fake(
            text,
            Some("/etc/ringdns.toml"),
            &[("UP", "fd00::10")],
            &files,
        )
        .expect("config");
        let printed = config.to_toml();
        let reparsed = parse_fake(&printed, None, &[], &[]).expect("to_toml output parses");
        assert_eq!(reparsed.source, None);
        assert_eq!(
            Config {
                source: None,
                ..config.clone()
            },
            reparsed,
            "{printed}"
        );
        assert!(!printed.contains("resolv.conf\""), "{printed}");
        assert!(printed.contains("denial_ttl = \"1500ms\""), "{printed}");

        let default = parse_text("").expect("defaults");
        let reparsed = parse_fake(&default.to_toml(), None, &[], &[]).expect("defaults print");
        assert_eq!(
            Config {
                source: None,
                ..default
            },
            reparsed
        );
    }

    #[test]
    fn load_reads_the_file_and_records_its_path() -> anyhow::Result<()> {
        use std::io::Write as _;

        let mut file = tempfile::NamedTempFile::new()?;
        write!(
            file,
            "[[forward]]\nzone = \".\"\nupstreams = [\"192.0.2.1\"]\n[log]\nlevel = \"warn\"\n"
        )?;
        let config = Config::load(file.path())?;
        assert_eq!(config.source.as_deref(), Some(file.path()));
        assert_eq!(config.log.level, log::LevelFilter::Warn);
        Ok(())
    }

    #[test]
    fn load_of_a_missing_file_names_it() {
        let error = Config::load(Path::new("/nonexistent/ringdns.toml")).expect_err("missing");
        assert!(matches!(error, ConfigError::Read { .. }));
        assert!(
            error.to_string().starts_with("/nonexistent/ringdns.toml: "),
            "{error}"
        );
    }

    #[test]
    fn worker_count_zero_means_one_per_available_cpu() {
        let mut server = parse_text("").expect("defaults").server;
        assert_eq!(server.worker_count(8), 8);
        assert_eq!(server.worker_count(0), 1);
        server.workers = 3;
        assert_eq!(server.worker_count(8), 3);
    }
}
