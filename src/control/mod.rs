//! Control thread side: start-up order, worker placement, shutdown.
//!
//! Runs on: the main thread (which then waits for signals) and the control thread it starts.
//!
//! Start-up order: decide the workers (one per CPU of the affinity mask) and the I/O backend
//! (probing io_uring), bind every worker's sockets (so a bind error stops start-up with the
//! address named), bind the health and metrics listeners, start the upstream side on
//! `ringdns-ctl` and the HTTP side on `ringdns-http`, start the workers, log one `ready` line.
//! Then the main thread waits for signals: SIGHUP, or a change of the config file (polled every
//! [`WATCH_INTERVAL`] when started with `--config`), reloads ([`reload`]); SIGTERM/SIGINT stop.
//! Shutdown: `/health` turns 503 at once; on SIGTERM the workers keep answering for
//! `[health] lameduck` (lame duck); then tell every worker to stop, join them, stop the
//! upstream side, stop the HTTP side.
#![forbid(unsafe_code)]

pub mod iptables;
pub mod logger;
pub mod netlink;
pub mod nftables;
pub mod node;
pub mod reload;
pub mod rules;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};

use crate::cache::Limits;
use crate::config::{Config, IoBackend};
use crate::health::{Health, HttpServer, Routes};
use crate::metrics::{ControlMetrics, Sources};
use crate::upstream::{self, ControlLink, UpstreamSide, WorkerLink};
use crate::worker::handler::Settings;
use crate::worker::stats::{Layout, WorkerStats, Zones};
use crate::worker::upstream::ForwardSetup;
use crate::worker::{self, sockets, Backend, Command, WorkerSetup};

use self::node::{Node, NodeStats};
use self::reload::{FileStamp, Live, WorkerHandle};

/// Distinct misses one worker may have in flight before it answers SERVFAIL.
const MAX_MISSES_PER_WORKER: usize = 4096;

/// Clients that may wait on one miss.
const MAX_WAITERS_PER_MISS: usize = 1024;

/// Margin on top of the longest zone timeout after which a worker answers a parked client
/// itself (the control side always answers first unless it is broken).
const MISS_DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// How often the config file's mtime, length and inode are compared (with `--config`).
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// How long start-up waits for every worker to report that it serves.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How `run` learns that it should stop.
#[derive(Debug)]
pub struct Shutdown {
    /// The signals `run` waits for (blocked in every thread, received with `sigwait`).
    signals: SigSet,
}

impl Shutdown {
    /// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (and so in every thread it
    /// starts afterwards); `run` then waits for them. Call before any thread is spawned.
    pub fn from_signals() -> anyhow::Result<Shutdown> {
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGTERM);
        signals.add(Signal::SIGINT);
        signals.add(Signal::SIGHUP);
        signals
            .thread_block()
            .context("blocking SIGTERM/SIGINT/SIGHUP")?;
        Ok(Shutdown { signals })
    }

    /// Starts `ringdns-signals`, which waits for the blocked signals and passes each on.
    fn spawn(self) -> anyhow::Result<crossbeam_channel::Receiver<Signal>> {
        let (sender, signals) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("ringdns-signals".into())
            .spawn(move || loop {
                match self.signals.wait() {
                    Ok(signal) => {
                        if sender.send(signal).is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        log::error!("sigwait failed: {error}");
                        return;
                    }
                }
            })
            .context("starting ringdns-signals")?;
        Ok(signals)
    }
}

/// Waits for SIGTERM or SIGINT; meanwhile reloads on SIGHUP and on a change of the config file.
fn wait_for_stop(
    signals: &crossbeam_channel::Receiver<Signal>,
    live: &mut Live,
) -> anyhow::Result<Signal> {
    loop {
        match signals.recv_timeout(WATCH_INTERVAL) {
            Ok(Signal::SIGHUP) => live.reload("SIGHUP"),
            Ok(signal) => return Ok(signal),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => live.poll_file(),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the signal thread stopped")
            }
        }
    }
}

/// Runs ringdns with `config` until `shutdown` fires.
pub fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let workers = config.server.worker_count(cores.len().max(1));
    let backend = choose_backend(config.server.io)?;
    let settings = settings(&config);
    let stamp = config.source.as_deref().and_then(FileStamp::of);
    let signals = shutdown.spawn()?;
    // Node integration (node.rs): the interface and its addresses come before any bind, since
    // binding 169.254.20.10 needs the address. `node_stats` is for the metrics side.
    let node_stats = Arc::new(NodeStats::default());
    let mut node = Node::new(&config, node_stats.clone())?;
    node.setup_interface()?;
    let control_wake = Arc::new(new_eventfd()?);
    let (requests, requests_rx) = upstream::request_channel(MAX_MISSES_PER_WORKER * workers);
    let control_link = ControlLink {
        requests,
        wake: control_wake.clone(),
    };
    let mut setups = Vec::with_capacity(workers);
    let mut links = Vec::with_capacity(workers);
    let mut command_senders = Vec::with_capacity(workers);
    let mut all_stats = Vec::with_capacity(workers);
    // Each worker's own series of the upstreams it queries over UDP itself.
    let mut worker_upstreams = Vec::new();
    let mut small_buffers = Vec::new();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(workers);
    // Observability: every worker's series share one layout (listen addresses × zones).
    let layout = Arc::new(Layout::new(
        &config.server.listen,
        Zones::new(config.forward.iter().map(|zone| zone.zone.as_str())),
    ));
    let epoch = Instant::now();
    for index in 0..workers {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for &addr in &config.server.listen {
            let (socket, actual) = sockets::bind_udp(addr, config.server.udp_receive_buffer)
                .with_context(|| format!("binding UDP {addr}"))?;
            if actual < config.server.udp_receive_buffer && index == 0 {
                small_buffers.push((addr, actual));
            }
            udp.push(socket);
            tcp.push(sockets::bind_tcp(addr).with_context(|| format!("binding TCP {addr}"))?);
        }
        let wake = Arc::new(new_eventfd()?);
        let (reply_tx, replies) = crossbeam_channel::unbounded();
        let (command_tx, commands) = crossbeam_channel::unbounded();
        let stats = Arc::new(WorkerStats::new(layout.clone(), epoch));
        links.push(WorkerLink {
            replies: reply_tx,
            wake: wake.clone(),
        });
        command_senders.push((command_tx, wake.clone()));
        all_stats.push(stats.clone());
        let forward = ForwardSetup::new(config.forward.clone(), config.server.udp_payload);
        worker_upstreams.extend(forward.metrics.iter().cloned());
        setups.push(WorkerSetup {
            index,
            core: (!cores.is_empty()).then(|| cores[index % cores.len()]),
            backend,
            udp,
            tcp,
            settings,
            tcp_idle_timeout: config.server.tcp_idle_timeout,
            max_tcp_connections: config.server.max_tcp_connections,
            control: control_link.clone(),
            forward,
            replies,
            commands,
            wake,
            stats,
            fallback: config.server.io == IoBackend::Auto,
            ready: ready_tx.clone(),
        });
    }
    for (addr, actual) in small_buffers {
        log::warn!(
            "UDP receive buffer smaller than configured listen={addr} requested={} actual={actual} (raise net.core.rmem_max or run with CAP_NET_ADMIN)",
            config.server.udp_receive_buffer
        );
    }
    drop(control_link);
    let http_listeners = HttpListeners::bind(&config)?;
    let upstream_side = UpstreamSide::spawn(
        config.forward.clone(),
        config.server.udp_payload,
        links,
        requests_rx,
        control_wake,
    )
    .context("starting the upstream side")?;
    // Observability: /health, /ready and /metrics on `ringdns-http`, up before the workers so
    // /ready says 503 until they serve.
    let control_metrics = Arc::new(ControlMetrics::default());
    control_metrics.connect_node(node_stats.clone());
    let health = Arc::new(Health::new(
        config.server.listen[0],
        all_stats.clone(),
        control_metrics.clone(),
    ));
    let mut upstreams = upstream_side.metrics();
    upstreams.extend(worker_upstreams.iter().cloned());
    let sources = Arc::new(RwLock::new(Sources {
        workers: all_stats.clone(),
        upstreams,
        control: control_metrics.clone(),
    }));
    let http = HttpServer::spawn(http_listeners.listeners, health.clone(), sources.clone())
        .context("starting ringdns-http")?;
    let mut handles = Vec::with_capacity(workers);
    for setup in setups {
        handles.push(worker::spawn(setup).context("starting a worker thread")?);
    }
    drop(ready_tx);
    let in_use = wait_ready(&ready_rx, workers)?;
    // Node integration: the fail-open rules match live sockets, so they go in once the
    // workers serve (before the ready line); then `ringdns-node` keeps them in place.
    node.setup_rules();
    let node_sync = node.spawn_sync()?;
    control_metrics.set_backend(in_use);
    health.set_serving();
    log::info!(
        "{}",
        ready_line(
            &config.server.listen,
            workers,
            in_use,
            http_listeners.metrics,
            http_listeners.health
        )
    );
    let lameduck = config.health.lameduck;
    let startup_udp_payload = config.server.udp_payload;
    let mut live = Live {
        config,
        stamp,
        workers: command_senders
            .into_iter()
            .map(|(commands, wake)| WorkerHandle { commands, wake })
            .collect(),
        layout,
        epoch,
        upstream: upstream_side,
        worker_upstreams,
        sources,
        health: health.clone(),
        control: control_metrics.clone(),
        node: Some(node_sync),
        startup_udp_payload,
    };
    let waited = wait_for_stop(&signals, &mut live);
    let Live {
        workers: command_senders,
        upstream: upstream_side,
        node: node_sync,
        ..
    } = live;
    let signal = waited?;
    // Lame duck: /health turns 503 at once so probes and load balancers move away, while the
    // workers keep answering for `[health] lameduck`; then they drain and stop.
    health.enter_lame_duck();
    if signal == Signal::SIGTERM && !lameduck.is_zero() {
        log::info!(
            "lame duck signal={signal:?} lameduck={lameduck:?}: /health is 503, still serving"
        );
        std::thread::sleep(lameduck);
    }
    log::info!("stopping signal={signal:?}");
    for worker in &command_senders {
        let _ = worker.commands.send(Command::Stop);
        let _ = worker.wake.write(1);
    }
    for handle in handles {
        if handle.join().is_err() {
            log::error!("a worker thread panicked");
        }
    }
    upstream_side.stop();
    // Node integration: rules first, then the interface; only what ringdns created.
    if let Some(node) = node_sync.and_then(node::NodeSync::stop) {
        node.teardown();
    }
    http.stop();
    log::info!("stopped");
    Ok(())
}

/// The bound HTTP listeners of `ringdns-http` and what the ready line says about them.
#[derive(Debug)]
struct HttpListeners {
    /// Health, then metrics unless it shares the health address; with the paths each serves.
    listeners: Vec<(TcpListener, Routes)>,
    /// Bound health address.
    health: SocketAddr,
    /// Bound metrics address; `None` = off.
    metrics: Option<SocketAddr>,
}

impl HttpListeners {
    /// Binds `[health] listen` and `[metrics] listen` (one socket serving both if they are the
    /// same address).
    fn bind(config: &Config) -> anyhow::Result<HttpListeners> {
        let bind = |addr: SocketAddr, what: &str| -> anyhow::Result<(TcpListener, SocketAddr)> {
            let listener =
                TcpListener::bind(addr).with_context(|| format!("binding {what} {addr}"))?;
            let bound = listener
                .local_addr()
                .with_context(|| format!("{what} {addr}"))?;
            Ok((listener, bound))
        };
        let (health_listener, health) = bind(config.health.listen, "health")?;
        let shared = config.metrics.listen == Some(config.health.listen);
        let mut listeners = vec![(
            health_listener,
            Routes {
                health: true,
                metrics: shared,
            },
        )];
        let metrics = match config.metrics.listen {
            None => None,
            Some(_) if shared => Some(health),
            Some(addr) => {
                let (listener, bound) = bind(addr, "metrics")?;
                let routes = Routes {
                    health: false,
                    metrics: true,
                };
                listeners.push((listener, routes));
                Some(bound)
            }
        };
        Ok(HttpListeners {
            listeners,
            health,
            metrics,
        })
    }
}

/// Waits until every worker serves; returns the backend in use (epoll if any worker fell back).
fn wait_ready(
    ready: &crossbeam_channel::Receiver<Result<worker::Backend, String>>,
    workers: usize,
) -> anyhow::Result<Backend> {
    let mut in_use = Backend::Uring;
    let mut all_epoll = true;
    for _ in 0..workers {
        match ready.recv_timeout(WORKER_START_TIMEOUT) {
            Ok(Ok(backend)) => {
                all_epoll &= backend == Backend::Epoll;
                if backend == Backend::Epoll {
                    in_use = Backend::Epoll;
                }
            }
            Ok(Err(reason)) => anyhow::bail!("a worker could not start: {reason}"),
            Err(_) => anyhow::bail!("a worker did not start within {WORKER_START_TIMEOUT:?}"),
        }
    }
    if in_use == Backend::Epoll && !all_epoll {
        log::warn!("some workers run on epoll after io_uring setup failed in them");
    }
    Ok(in_use)
}

/// The one line tests and operators wait for.
fn ready_line(
    listen: &[SocketAddr],
    workers: usize,
    backend: Backend,
    metrics: Option<SocketAddr>,
    health: SocketAddr,
) -> String {
    let addrs = listen
        .iter()
        .map(|addr| addr.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let metrics = metrics.map_or_else(|| "off".to_owned(), |addr| addr.to_string());
    format!(
        "ready udp={addrs} tcp={addrs} workers={workers} io={} metrics={metrics} health={health}",
        backend.name()
    )
}

/// The handler settings derived from `config`.
fn settings(config: &Config) -> Settings {
    let longest_timeout = config
        .forward
        .iter()
        .map(|zone| zone.timeout)
        .max()
        .unwrap_or(Duration::from_secs(2));
    Settings {
        udp_payload: config.server.udp_payload,
        limits: Limits {
            success_capacity: config.cache.success_capacity,
            success_ttl: config.cache.success_ttl,
            denial_capacity: config.cache.denial_capacity,
            denial_ttl: config.cache.denial_ttl,
            servfail_ttl: config.cache.servfail_ttl,
        },
        miss_deadline: longest_timeout + MISS_DEADLINE_MARGIN,
        max_misses: MAX_MISSES_PER_WORKER,
        max_waiters: MAX_WAITERS_PER_MISS,
    }
}

/// Picks the I/O backend for `choice`, probing io_uring.
fn choose_backend(choice: IoBackend) -> anyhow::Result<Backend> {
    match choice {
        IoBackend::Epoll => Ok(Backend::Epoll),
        IoBackend::Uring | IoBackend::Auto => match worker::probe_uring() {
            Ok(()) => Ok(Backend::Uring),
            Err(reason) if choice == IoBackend::Auto => {
                log::warn!("io_uring unavailable, using epoll reason=\"{reason}\"");
                Ok(Backend::Epoll)
            }
            Err(reason) => {
                anyhow::bail!("server.io = \"uring\" but io_uring is unavailable: {reason}")
            }
        },
    }
}

/// A non-blocking eventfd.
fn new_eventfd() -> anyhow::Result<EventFd> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
        .context("creating an eventfd")
}
