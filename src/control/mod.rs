//! Control thread side: start-up order, worker placement, shutdown.
//!
//! Runs on: the main thread (which then waits for signals) and the control thread it starts.
//!
//! Start-up order: decide the workers (one per CPU of the affinity mask) and the I/O backend
//! (probing io_uring), take over the sockets of an instance offering them (`[node] handover`,
//! handover.rs), bind the health and metrics listeners, then every worker's sockets (so a bind
//! error stops start-up with the address named, and before any DNS socket exists when the
//! health port is taken), start the upstream side on
//! `ringdns-ctl` and the HTTP side on `ringdns-http`, start the workers, confirm a hand-over
//! and offer the sockets in turn (`[node] handover`), log one `ready` line.
//! Then the main thread waits for signals: SIGHUP, or a change of the config file (polled every
//! [`WATCH_INTERVAL`] when started with `--config`), reloads ([`reload`]); a worker thread that
//! ends unasked is restarted in place ([`supervise`]); SIGTERM/SIGINT stop.
//! Shutdown: `/health` turns 503 at once; on SIGTERM the workers keep answering for
//! `[health] lameduck` (lame duck); then tell every worker to stop, join them, stop the
//! upstream side, stop the HTTP side.
#![forbid(unsafe_code)]

pub mod handover;
pub mod iptables;
pub mod logger;
pub mod netlink;
pub mod nftables;
pub mod node;
pub mod reload;
pub mod rules;
pub mod supervise;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
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
use crate::worker::{self, sockets, Backend, Command, Serving, WorkerSetup};

use self::handover::{Event, Kind, Listening, Offer, Peer, Taken};
use self::node::{Node, NodeStats};
use self::reload::{FileStamp, Live};
use self::supervise::WorkerHandle;

/// Distinct misses one worker may have in flight before it answers SERVFAIL.
const MAX_MISSES_PER_WORKER: usize = 4096;

/// Clients that may wait on one miss.
const MAX_WAITERS_PER_MISS: usize = 1024;

/// Margin on top of the longest zone timeout after which a worker answers a parked client
/// itself (the control side always answers first unless it is broken).
const MISS_DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// How often the config file's mtime, length and inode are compared (with `--config`).
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// How often an instance that handed over checks that its successor still runs.
const SUCCESSOR_CHECK: Duration = Duration::from_millis(500);

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

/// Why serving ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM or SIGINT.
    Signal(Signal),
    /// A successor took the sockets and serves (handover.rs).
    HandedOver {
        /// Its PID.
        pid: i32,
    },
}

/// Waits for SIGTERM, SIGINT or a hand-over; meanwhile reloads on SIGHUP and on a change of
/// the config file, and restarts workers that end unasked (supervise.rs).
fn wait_for_stop(
    signals: &crossbeam_channel::Receiver<Signal>,
    handed_over: &mut crossbeam_channel::Receiver<Event>,
    exits: &crossbeam_channel::Receiver<worker::Exit>,
    live: &mut Live,
) -> anyhow::Result<Stop> {
    loop {
        let wait = live.next_restart().map_or(WATCH_INTERVAL, |due| {
            due.saturating_duration_since(Instant::now())
                .min(WATCH_INTERVAL)
        });
        crossbeam_channel::select! {
            recv(exits) -> exit => if let Ok(exit) = exit {
                live.worker_exited(exit);
            },
            recv(signals) -> signal => match signal {
                Ok(Signal::SIGHUP) => live.reload("SIGHUP"),
                Ok(signal) => return Ok(Stop::Signal(signal)),
                Err(_) => anyhow::bail!("the signal thread stopped"),
            },
            recv(handed_over) -> event => match event {
                Ok(Event::Taken { pid }) => return Ok(Stop::HandedOver { pid }),
                // Nothing offers (or the offer ended without a hand-over): wait for signals
                // and file changes only; a closed channel would be ready on every turn.
                Err(_) => *handed_over = crossbeam_channel::never(),
            },
            default(wait) => {
                live.restart_due(Instant::now());
                live.poll_file();
            }
        }
    }
}

/// What the end of a hand-over needs.
struct HandOver<'a> {
    /// The successor's PID.
    pid: i32,
    /// The successor, watched while idle.
    successor: Option<Peer>,
    /// Signals (SIGTERM/SIGINT end the process afterwards).
    signals: &'a crossbeam_channel::Receiver<Signal>,
    /// Turned to lame duck.
    health: &'a Health,
    /// Stopped at once: the successor answers probes and scrapes on the shared listeners.
    http: HttpServer,
    /// The workers.
    workers: Vec<WorkerHandle>,
    /// The forwarding side.
    upstream: UpstreamSide,
    /// The node sync thread (stopped; no teardown).
    node: Option<node::NodeSync>,
    /// The hand-over's duplicates of the listen sockets: closed after the drain, so that a
    /// socket the successor did not use leaves the SO_REUSEPORT group then.
    listening: Arc<Mutex<Listening>>,
    /// How long misses in flight may take.
    drain: Duration,
}

/// A successor serves from the shared sockets: stop receiving, answer the misses in flight for
/// `drain`, stop everything but leave the interface and rules to the successor, then idle
/// until SIGTERM/SIGINT (exit 0). Exiting earlier would make a supervisor restart this
/// instance, which would then take the sockets back. If the successor exits first (a rolled
/// back update deleting the new pod), this one exits non-zero at once, so that its supervisor
/// restarts it and the node gets a serving instance again; the successor leaves the interface
/// and rules for it.
fn hand_over(end: HandOver<'_>) -> anyhow::Result<()> {
    let HandOver {
        pid,
        successor,
        signals,
        health,
        http,
        mut workers,
        upstream,
        node,
        listening,
        drain,
    } = end;
    log::info!("handover: pid={pid} serves now; stopped receiving, answering misses in flight for {drain:?}");
    health.enter_lame_duck();
    http.stop();
    release(&workers, drain);
    stop_workers(&mut workers);
    upstream.stop();
    *listening.lock().unwrap_or_else(PoisonError::into_inner) = Listening::default();
    if let Some(node) = node {
        // Dropped without teardown: the successor keeps the interface and rules in place.
        drop(node.stop());
    }
    log::info!("handover: done; idle until stopped (the interface and rules are pid={pid}'s)");
    loop {
        match signals.recv_timeout(SUCCESSOR_CHECK) {
            Ok(Signal::SIGHUP) => {}
            Ok(signal) => {
                log::info!("stopped signal={signal:?} (handed over to pid={pid})");
                return Ok(());
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if successor.as_ref().is_some_and(|peer| !peer.alive()) {
                    anyhow::bail!(
                        "handover: the successor pid={pid} exited; exiting so that this instance is restarted and serves again"
                    );
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the signal thread stopped")
            }
        }
    }
}

/// Takes the sockets of the instance offering them at `[node] handover`, if any. A failure is
/// logged and this instance binds its own sockets beside the other's (SO_REUSEPORT).
fn take_over(config: &Config) -> Option<Taken> {
    let path = config.node.handover.as_deref()?;
    match Taken::take(path) {
        Ok(Some(taken)) => {
            log::info!(
                "handover: took {} sockets from pid={}",
                taken.counts().0,
                taken.pid()
            );
            Some(taken)
        }
        Ok(None) => {
            log::info!(
                "handover: no instance offers at {}; binding fresh sockets",
                path.display()
            );
            None
        }
        Err(error) => {
            log::warn!("handover: taking over failed, binding fresh sockets beside the serving instance: {error:#}");
            None
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
    // Hand-over (handover.rs): serve from the sockets of the instance serving now, if one
    // offers them; what is not taken is bound fresh below.
    let mut taken = take_over(&config);
    let listening = Arc::new(Mutex::new(Listening::default()));
    let control_wake = Arc::new(new_eventfd()?);
    // Supervision (supervise.rs): every worker thread says here how it ended.
    let (exits_tx, exits) = crossbeam_channel::unbounded();
    let (requests, requests_rx) = upstream::request_channel(MAX_MISSES_PER_WORKER * workers);
    let control_link = ControlLink {
        requests,
        wake: control_wake.clone(),
    };
    let mut setups = Vec::with_capacity(workers);
    let mut links = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    let mut all_stats = Vec::with_capacity(workers);
    let mut small_buffers = Vec::new();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(workers);
    // Observability: every worker's series share one layout (listen addresses × zones).
    let layout = Arc::new(Layout::new(
        &config.server.listen,
        Zones::new(config.forward.iter().map(|zone| zone.zone.as_str())),
    ));
    // HTTP first: a second instance that cannot have the health port (one serving without
    // hand-over) fails here, before its DNS sockets join the SO_REUSEPORT groups and take a
    // share of the queries it would never answer.
    let http_listeners = HttpListeners::bind(&config, taken.as_mut())?;
    {
        let mut listening = listening.lock().unwrap_or_else(PoisonError::into_inner);
        for (listener, _) in &http_listeners.listeners {
            listening
                .add(Kind::Http, 0, listener)
                .context("keeping an HTTP listener for hand-over")?;
        }
    }
    let epoch = Instant::now();
    for index in 0..workers {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for (socket_index, &addr) in config.server.listen.iter().enumerate() {
            let socket_index =
                u16::try_from(socket_index).expect("listen addresses are far fewer than 65536");
            let given = taken.as_mut().and_then(|taken| taken.udp(addr));
            let (socket, actual) = match given {
                Some(socket) => {
                    let actual = sockets::set_receive_buffer(
                        &socket,
                        addr,
                        config.server.udp_receive_buffer,
                    )
                    .with_context(|| format!("taking over UDP {addr}"))?;
                    (socket, actual)
                }
                None => sockets::bind_udp(addr, config.server.udp_receive_buffer)
                    .with_context(|| format!("binding UDP {addr}"))?,
            };
            if actual < config.server.udp_receive_buffer && index == 0 {
                small_buffers.push((addr, actual));
            }
            let listener = match taken.as_mut().and_then(|taken| taken.tcp(addr)) {
                Some(listener) => listener,
                None => sockets::bind_tcp(addr).with_context(|| format!("binding TCP {addr}"))?,
            };
            {
                let mut listening = listening.lock().unwrap_or_else(PoisonError::into_inner);
                listening
                    .add_listen(index, socket_index, &socket, &listener)
                    .context("keeping a listen socket for hand-over and restarts")?;
            }
            udp.push(Some(socket));
            tcp.push(Some(listener));
        }
        let wake = Arc::new(new_eventfd()?);
        let (reply_tx, replies) = crossbeam_channel::unbounded();
        let (command_tx, commands) = crossbeam_channel::unbounded();
        let stats = Arc::new(WorkerStats::new(layout.clone(), epoch));
        links.push(WorkerLink {
            replies: reply_tx,
            wake: wake.clone(),
        });
        all_stats.push(stats.clone());
        let forward = ForwardSetup::new(config.forward.clone(), config.server.udp_payload);
        let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
        handles.push(WorkerHandle {
            commands: command_tx,
            wake: wake.clone(),
            inbox: commands.clone(),
            replies: replies.clone(),
            core,
            upstreams: forward.metrics.clone(),
            thread: None,
            starts: 1,
            started: epoch,
            due: None,
        });
        setups.push(WorkerSetup {
            index,
            generation: 0,
            core,
            backend,
            udp,
            tcp,
            settings,
            serving: serving(&config),
            control: control_link.clone(),
            forward,
            replies,
            commands,
            wake,
            stats,
            fallback: config.server.io == IoBackend::Auto,
            ready: ready_tx.clone(),
            exits: exits_tx.clone(),
        });
    }
    for (addr, actual) in small_buffers {
        log::warn!(
            "UDP receive buffer smaller than configured listen={addr} requested={} actual={actual} (raise net.core.rmem_max or run with CAP_NET_ADMIN)",
            config.server.udp_receive_buffer
        );
    }
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
    control_metrics.set_workers(workers);
    control_metrics.connect_node(node_stats.clone());
    let health = Arc::new(Health::new(
        config.server.listen[0],
        all_stats.clone(),
        control_metrics.clone(),
    ));
    let mut upstreams = upstream_side.metrics();
    upstreams.extend(
        handles
            .iter()
            .flat_map(|worker| worker.upstreams.iter().cloned()),
    );
    let sources = Arc::new(RwLock::new(Sources {
        workers: all_stats.clone(),
        upstreams,
        control: control_metrics.clone(),
    }));
    let http = HttpServer::spawn(http_listeners.listeners, health.clone(), sources.clone())
        .context("starting ringdns-http")?;
    for (setup, worker) in setups.into_iter().zip(&mut handles) {
        worker.thread = Some(worker::spawn(setup).context("starting a worker thread")?);
    }
    drop(ready_tx);
    let in_use = wait_ready(&ready_rx, workers)?;
    // Node integration: the fail-open rules match live sockets, so they go in once the
    // workers serve (before the ready line); then `ringdns-node` keeps them in place.
    node.setup_rules();
    let node_sync = node.spawn_sync()?;
    control_metrics.set_backend(in_use);
    // The predecessor stops receiving once told that this instance serves, unless this one
    // is being stopped already: then the predecessor goes on serving (and keeps the node
    // setup) as if nothing had happened.
    let (early_stop, reload_pending) = pending_signals(&signals);
    let mut predecessor = None;
    let mut predecessor_serves = false;
    if let Some(taken) = taken {
        let (received, used) = taken.counts();
        let pid = taken.pid();
        if let Some(signal) = early_stop {
            log::warn!("handover: {signal:?} before confirming; pid={pid} goes on serving");
            predecessor_serves = true;
        } else {
            let (peer, confirmed) = taken.confirm();
            match confirmed {
                Ok(()) => log::info!(
                    "handover: serving on sockets taken from pid={pid} received={received} used={used}"
                ),
                // Whether it still runs (beside this instance) is asked again at exit.
                Err(error) => log::error!("handover: pid={pid} was not told: {error:#}"),
            }
            predecessor = Some(peer);
        }
    }
    let (handover_events, mut handed_over) = crossbeam_channel::bounded(1);
    // Not when stopping already: binding the path would take it from the predecessor, which
    // goes on serving and offering there.
    let offer = config
        .node
        .handover
        .as_deref()
        .filter(|_| early_stop.is_none())
        .and_then(|path| {
            Offer::start(path, listening.clone(), handover_events)
                .inspect_err(|error| log::error!("handover: not offered: {error:#}"))
                .ok()
        });
    // Last, once the sockets are offered too: a successor started on `/ready` or on this line
    // finds them.
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
    // Misses are answered (or failed) by their deadline, checked on the workers' 1 s tick.
    let drain = settings.miss_deadline + worker::TICK;
    let startup_udp_payload = config.server.udp_payload;
    let mut live = Live {
        config,
        stamp,
        workers: handles,
        backend,
        control_link,
        exits: exits_tx,
        layout,
        epoch,
        upstream: upstream_side,
        sources,
        health: health.clone(),
        control: control_metrics.clone(),
        node: Some(node_sync),
        startup_udp_payload,
        listening,
    };
    if reload_pending {
        live.reload("SIGHUP");
    }
    let waited = match early_stop {
        Some(signal) => Ok(Stop::Signal(signal)),
        None => wait_for_stop(&signals, &mut handed_over, &exits, &mut live),
    };
    let stop = waited?;
    let given = offer.as_ref().map(Offer::given);
    let successor = offer.as_ref().and_then(Offer::successor);
    drop(offer);
    let handed_over = given.as_ref().is_some_and(|given| given.any());
    if let Stop::Signal(signal) = stop {
        if !handed_over {
            // Lame duck: /health turns 503 at once so probes and load balancers move away,
            // while the workers keep answering (and a worker that dies meanwhile is restarted)
            // for `[health] lameduck`; then they drain and stop.
            health.enter_lame_duck();
            if signal == Signal::SIGTERM && !lameduck.is_zero() {
                log::info!(
                    "lame duck signal={signal:?} lameduck={lameduck:?}: /health is 503, still serving"
                );
                live.supervise_for(&exits, lameduck);
            }
        }
    }
    let Live {
        workers: mut worker_handles,
        upstream: upstream_side,
        node: node_sync,
        listening,
        ..
    } = live;
    let signal = match stop {
        Stop::Signal(signal) => signal,
        Stop::HandedOver { pid } => {
            return hand_over(HandOver {
                pid,
                successor,
                signals: &signals,
                health: &health,
                http,
                workers: worker_handles,
                upstream: upstream_side,
                node: node_sync,
                listening,
                drain,
            })
        }
    };
    if handed_over {
        // Stopped while (or just after) giving the sockets away: the taker may serve from them,
        // so stop receiving and drain as in a hand-over, and leave the node setup alone. No
        // restarts now: a restarted worker would receive again.
        log::info!("stopping signal={signal:?} after giving the sockets away; draining {drain:?}");
        health.enter_lame_duck();
        release(&worker_handles, drain);
    } else {
        log::info!("stopping signal={signal:?}");
    }
    stop_workers(&mut worker_handles);
    upstream_side.stop();
    // Node integration: rules first, then the interface; only what ringdns created. Not when
    // another instance serves on them: a successor that took the sockets, or the predecessor
    // this instance took them from, which still runs (it restarts when this one exits).
    let predecessor_runs = predecessor_serves || predecessor.as_ref().is_some_and(Peer::alive);
    if let Some(node) = node_sync.and_then(node::NodeSync::stop) {
        if handed_over {
            log::info!("teardown skipped: a successor took the sockets, the interface and rules are its now");
        } else if predecessor_runs {
            log::info!("teardown skipped: the instance this one took over from still runs and keeps the interface and rules");
        } else {
            node.teardown();
        }
    }
    http.stop();
    log::info!("stopped");
    Ok(())
}

/// Signals that arrived before the hand-over's confirmation: a stop (SIGTERM/SIGINT) and
/// whether a SIGHUP asked for a reload.
fn pending_signals(signals: &crossbeam_channel::Receiver<Signal>) -> (Option<Signal>, bool) {
    let mut stop = None;
    let mut reload = false;
    for signal in signals.try_iter() {
        match signal {
            Signal::SIGHUP => reload = true,
            signal => {
                stop.get_or_insert(signal);
            }
        }
    }
    (stop, reload)
}

/// Tells every worker to stop receiving (hand-over), then waits `drain` for their misses in
/// flight.
fn release(workers: &[WorkerHandle], drain: Duration) {
    for worker in workers {
        worker.send(Command::Release);
    }
    std::thread::sleep(drain);
}

/// Tells every worker to stop and joins their threads.
fn stop_workers(workers: &mut [WorkerHandle]) {
    for worker in workers.iter() {
        worker.send(Command::Stop);
    }
    for worker in workers {
        if !worker.join() {
            log::error!("a worker thread panicked");
        }
    }
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
    fn bind(config: &Config, mut taken: Option<&mut Taken>) -> anyhow::Result<HttpListeners> {
        let mut bind =
            |addr: SocketAddr, what: &str| -> anyhow::Result<(TcpListener, SocketAddr)> {
                let listener = match taken.as_mut().and_then(|taken| taken.http(addr)) {
                    Some(listener) => listener,
                    None => {
                        TcpListener::bind(addr).with_context(|| format!("binding {what} {addr}"))?
                    }
                };
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

/// What workers take from `[server]` besides sockets and DNS settings.
fn serving(config: &Config) -> Serving {
    Serving {
        tcp_idle_timeout: config.server.tcp_idle_timeout,
        max_tcp_connections: config.server.max_tcp_connections,
        batch_wait: config.server.batch_wait,
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
