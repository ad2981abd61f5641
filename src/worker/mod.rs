//! Data plane: one pinned worker per core, each with its own sockets, runtime and cache shard.
//!
//! Runs on: worker threads (`ringdns-w{core}`).
//!
//! A worker thread runs a current-thread tokio runtime. On it run: the TCP accept loops and
//! connections ([`tcp`]), the control loop (upstream replies arriving on this worker's
//! channel, signalled through its eventfd), a one-second tick that answers misses whose reply
//! never came, and the UDP path, which is either the io_uring ring (multishot `RecvMsg` with a
//! provided buffer ring, replies built in place in fixed send slots and sent with
//! `IORING_OP_SEND`, see [`ring`]) or,
//! where io_uring is unavailable, tokio's epoll sockets ([`udp`]). The DNS logic above both is
//! the same [`handler::Handler`]. On io_uring, misses in `udp` zones are forwarded from the same
//! ring ([`upstream`], with a timer task for their slices and budgets when traffic is idle);
//! the rest go to the control side.

pub mod bufs;
#[cfg(debug_assertions)]
pub mod fault;
pub mod handler;
pub mod pace;
pub mod pending;
pub mod ring;
pub mod sockets;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod upstream;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{TcpListener, UdpSocket};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;
use tokio::task::AbortHandle;

use crate::upstream::{ControlLink, Failure, Outcome, Reply, Request, Via};

use handler::{Handler, Settings, TCP_MESSAGE_MAX};
use pace::Pace;
use pending::Origin;
use stats::{Counter, WorkerStats};
use udp::EpollUdp;
use upstream::{Done, Exchanges, ForwardSetup};

/// Checks that io_uring can be set up here with what the UDP ring needs; the error says why not.
pub fn probe_uring() -> Result<(), String> {
    ring::probe()
}

/// Longest a worker stays in its io_uring loop before letting its other tasks (TCP, tick)
/// run; an upstream answer for a TCP client ends the turn early.
const TURN: Duration = Duration::from_millis(1);

/// Completions that end a linger early.
const LINGER_WANT: usize = 16;

/// How often a worker looks for misses whose reply never came.
pub const TICK: Duration = Duration::from_secs(1);

/// The I/O backend a worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// UDP on io_uring.
    Uring,
    /// UDP on epoll (tokio sockets).
    Epoll,
}

impl Backend {
    /// The name used in logs, the ready line and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// A message from the control side to one worker.
#[derive(Debug)]
pub enum Command {
    /// New settings (reload): swapped in between datagrams.
    Settings(Settings),
    /// A reload with more than handler settings in it: swapped in between datagrams.
    Reload(Box<Reload>),
    /// Hand-over: stop receiving queries (a successor reads the shared listen sockets now) but
    /// keep the sockets, so misses in flight are still answered.
    Release,
    /// Stop serving and exit the thread.
    Stop,
}

/// How a worker serves its sockets, apart from DNS (`[server]` keys; all reloadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    /// A TCP client connection idle this long is closed.
    pub tcp_idle_timeout: Duration,
    /// TCP connection cap for this worker.
    pub max_tcp_connections: usize,
    /// After a batch, how long to wait for more datagrams (`ZERO`: not at all): io_uring in
    /// the kernel (`ring.rs`), epoll in a sleep before reading again (`udp.rs`).
    pub batch_wait: Duration,
}

/// One worker's share of a reload, built by the control side.
#[derive(Debug)]
pub struct Reload {
    /// DNS settings (cache limits, payload size, miss deadline).
    pub settings: Settings,
    /// TCP limits and the batch wait.
    pub serving: Serving,
    /// New counters laid out for new listen addresses or zones (`None`: keep the current ones).
    pub stats: Option<Arc<WorkerStats>>,
    /// New `[[forward]]` zones for the worker's own UDP exchanges (`None`: unchanged).
    pub forward: Option<ForwardSetup>,
    /// Listen addresses added: their stable socket index, UDP socket and TCP listener.
    pub add: Vec<(u16, UdpSocket, TcpListener)>,
    /// Socket indices of listen addresses removed.
    pub remove: Vec<u16>,
}

/// Everything one worker needs, built by the control side before the thread starts (and
/// again for a restart in place, control/supervise.rs).
#[derive(Debug)]
pub struct WorkerSetup {
    /// Worker index.
    pub index: usize,
    /// How many times this worker was started before (0: the first start).
    pub generation: u32,
    /// CPU to pin to (`None`: not pinned).
    pub core: Option<core_affinity::CoreId>,
    /// I/O backend.
    pub backend: Backend,
    /// One UDP socket per listen address (bound, SO_REUSEPORT), by socket index (`None`: an
    /// address a reload removed).
    pub udp: Vec<Option<UdpSocket>>,
    /// One TCP listener per listen address, by socket index.
    pub tcp: Vec<Option<TcpListener>>,
    /// DNS settings.
    pub settings: Settings,
    /// TCP limits and the batch wait.
    pub serving: Serving,
    /// To the control side.
    pub control: ControlLink,
    /// The zones this worker forwards over UDP itself (io_uring backend).
    pub forward: ForwardSetup,
    /// Upstream replies for this worker.
    pub replies: crossbeam_channel::Receiver<Reply>,
    /// Control commands for this worker.
    pub commands: crossbeam_channel::Receiver<Command>,
    /// Written by the control side after sending a reply or a command.
    pub wake: Arc<EventFd>,
    /// This worker's counters.
    pub stats: Arc<WorkerStats>,
    /// With `backend = Uring`: fall back to epoll if the ring cannot be set up (`io = auto`).
    pub fallback: bool,
    /// Told once: the backend in use once the worker serves, or why it could not start.
    pub ready: crossbeam_channel::Sender<Result<Backend, String>>,
    /// Told when the thread ends, however it ends (the supervisor restarts a worker that
    /// ended without being told to stop).
    pub exits: crossbeam_channel::Sender<Exit>,
}

/// How a worker thread ended.
#[derive(Debug)]
pub struct Exit {
    /// The worker's index.
    pub index: usize,
    /// How.
    pub cause: ExitCause,
}

/// Why a worker thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitCause {
    /// A [`Command::Stop`] arrived.
    Stopped,
    /// Its runtime or sockets failed (the error).
    Failed(String),
    /// A panic: a bug (the panic's message and location).
    Panicked(String),
}

impl std::fmt::Display for ExitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitCause::Stopped => f.write_str("stopped"),
            ExitCause::Failed(error) => write!(f, "failed: {error}"),
            ExitCause::Panicked(message) => write!(f, "panicked: {message}"),
        }
    }
}

/// Starts the worker thread `ringdns-w{core}`. When it ends, however it ends (a panic
/// included), it says how on `setup.exits`.
pub fn spawn(setup: WorkerSetup) -> io::Result<JoinHandle<()>> {
    let name = match setup.core {
        Some(core) => format!("ringdns-w{}", core.id),
        None => format!("ringdns-w{}", setup.index),
    };
    install_panic_alarm();
    std::thread::Builder::new().name(name).spawn(move || {
        let index = setup.index;
        let exits = setup.exits.clone();
        if let Some(core) = setup.core {
            if !core_affinity::set_for_current(core) {
                log::warn!("worker not pinned worker={index} core={}", core.id);
            }
        }
        // Unwinding drops the worker's state (the ring drains before its buffers go); the
        // listen sockets stay open through the control side's duplicates, so the datagrams
        // that arrive meanwhile wait in them for the restarted worker.
        let cause = match std::panic::catch_unwind(AssertUnwindSafe(|| run(setup))) {
            Ok(Ok(())) => ExitCause::Stopped,
            Ok(Err(error)) => ExitCause::Failed(error.to_string()),
            Err(payload) => ExitCause::Panicked(
                PANICKED
                    .with(RefCell::take)
                    .unwrap_or_else(|| panic_message(payload.as_ref())),
            ),
        };
        let _ = exits.send(Exit { index, cause });
    })
}

thread_local! {
    /// On a worker thread: woken by the panic hook when one of the worker's tasks panics.
    static ALARM: RefCell<Option<Rc<tokio::sync::Notify>>> = const { RefCell::new(None) };
    /// The message and location of this thread's last panic, as the panic hook saw it.
    static PANICKED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once per process) a panic hook that notes each panic on a worker thread and wakes
/// the worker's [`serve`], then runs the previous hook (which prints the panic). tokio catches
/// a panic inside a spawned task and lets the runtime go on; without this, a panicked receive
/// loop would leave its socket in the SO_REUSEPORT group unread, a share of the queries lost
/// while `/health` stays green. With it, the whole worker ends and is restarted in place.
fn install_panic_alarm() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = ALARM.try_with(|alarm| {
                if let Some(alarm) = alarm.try_borrow().ok().as_deref().and_then(Option::as_ref) {
                    let message = panic_message(info.payload());
                    let noted = match info.location() {
                        Some(at) => format!("{message} at {}:{}", at.file(), at.line()),
                        None => message,
                    };
                    let _ = PANICKED.try_with(|last| last.replace(Some(noted)));
                    alarm.notify_one();
                }
            });
            previous(info);
        }));
    });
}

/// The text of a panic's payload (`panic!` with a message gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|message| (*message).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// The worker's state shared by its tasks (all on this one thread: `Rc<RefCell<_>>`, never
/// borrowed across an `.await`).
#[derive(Debug)]
pub(crate) struct Shared {
    /// DNS logic, cache shard, pending misses.
    handler: Handler,
    /// The UDP backend, for answering parked UDP clients.
    udp: Udp,
    /// Open TCP connections: where to queue their answers.
    tcp: HashMap<u64, tcp::TcpConn>,
    /// Last connection number handed out.
    next_conn: u64,
    /// TCP limits and the batch wait.
    serving: Serving,
    /// Whether the batch wait pays at the current rate.
    pace: Pace,
    /// Scratch for replies (TCP-sized).
    out: Box<[u8]>,
    /// Counters.
    stats: Arc<WorkerStats>,
    /// Per socket index: the epoll backend's UDP receive loop (aborted when the address is
    /// removed by a reload).
    udp_tasks: Vec<Option<AbortHandle>>,
    /// Per socket index: the TCP accept loop (aborted when the address is removed).
    tcp_tasks: Vec<Option<AbortHandle>>,
    /// Where misses go upstream.
    upstream: Forwarding,
    /// A clone of this worker's reply channel, so the ring loop can take upstream replies itself.
    replies: crossbeam_channel::Receiver<Reply>,
    /// The eventfd the control side writes when it queued replies or commands: the epoll
    /// backend's batch wait ends early on it (`udp.rs`).
    wake: Arc<EventFd>,
    /// An answer was queued for a TCP connection since the epoll receive loops last looked:
    /// its writer task runs only once they give tokio the thread back.
    tcp_waiting: bool,
}

/// Where a worker's misses go: its own UDP exchanges on the ring, or the control side.
#[derive(Debug)]
struct Forwarding {
    /// The worker's own UDP exchanges (used on the io_uring backend only).
    exchanges: Exchanges,
    /// The control side's request channel and eventfd.
    control: ControlLink,
    /// Scratch: the handler's requests of one batch.
    outbox: Vec<Request>,
    /// Scratch: requests for the control side.
    to_control: Vec<Request>,
    /// Scratch: finished exchanges.
    done: Vec<Done>,
    /// Tells the upstream timer task that an earlier deadline exists.
    timer: Rc<tokio::sync::Notify>,
    /// The deadline the timer task sleeps until (`None`: it waits for a notification).
    armed: Option<Instant>,
}

/// The UDP side of a worker.
#[derive(Debug)]
enum Udp {
    /// tokio sockets.
    Epoll(EpollUdp),
    /// The io_uring fast path.
    Uring(Box<ring::RingUdp>),
}

impl Shared {
    /// Sends this batch's misses on their way and answers what finished (see [`forward`]),
    /// then submits the ring's queued sends: for callers outside the ring loop.
    fn forward_now(&mut self, now: Instant) {
        let Shared {
            handler,
            udp,
            tcp,
            out,
            stats,
            upstream,
            ..
        } = self;
        self.tcp_waiting |= forward(handler, udp, tcp, out, stats, upstream, now);
        udp.flush();
    }

    /// Answers every parked client of `reply`. The UDP answers are queued, not submitted: the
    /// caller delivers a whole batch of replies, then calls [`Udp::flush`] once (one system
    /// call for the batch instead of one per reply).
    fn deliver(&mut self, reply: Reply, now: Instant) {
        let Shared {
            handler,
            udp,
            tcp,
            out,
            stats,
            tcp_waiting,
            ..
        } = self;
        *tcp_waiting |= deliver(handler, udp, tcp, out, stats, reply, now);
    }

    /// Answers SERVFAIL to clients whose miss has outlived its deadline.
    fn expire(&mut self, now: Instant) {
        let Shared {
            handler,
            udp,
            tcp,
            out,
            stats,
            ..
        } = self;
        handler.expire(now, &mut out[..], &mut |origin, bytes| {
            send_parked(udp, tcp, stats, origin, bytes);
        });
        udp.flush();
    }

    /// Whether an epoll receive loop may sleep for its batch wait now: not while an answer
    /// waits for a TCP writer task (the loop yields once more instead, so that it runs).
    fn may_nap(&mut self) -> bool {
        !std::mem::take(&mut self.tcp_waiting)
    }

    /// The epoll socket at `index` if its receive loop runs (not removed by a reload, not
    /// stopped for a hand-over).
    fn live_epoll_socket(&self, index: u16) -> Option<Rc<tokio::net::UdpSocket>> {
        let Udp::Epoll(epoll) = &self.udp else {
            return None;
        };
        let index = usize::from(index);
        if !self.udp_tasks.get(index).is_some_and(Option::is_some) {
            return None;
        }
        epoll.sockets().get(index).cloned().flatten()
    }
}

impl Udp {
    /// Submits sends queued by `send_parked` (io_uring); nothing to do on epoll.
    fn flush(&mut self) {
        if let Udp::Uring(ring) = self {
            ring.flush();
        }
    }
}

/// [`Shared::deliver`] on the fields it needs (the ring loop holds the others borrowed).
/// Returns whether an answer was queued for a TCP client: its connection's writer task runs
/// only once the caller gives tokio the thread back.
fn deliver(
    handler: &mut Handler,
    udp: &mut Udp,
    tcp: &HashMap<u64, tcp::TcpConn>,
    out: &mut [u8],
    stats: &WorkerStats,
    reply: Reply,
    now: Instant,
) -> bool {
    let mut to_tcp = false;
    handler.handle_reply(reply, now, out, &mut |origin, bytes| {
        to_tcp |= matches!(origin, Origin::Tcp { .. });
        send_parked(udp, tcp, stats, origin, bytes);
    });
    to_tcp
}

/// Sends the requests of the misses started in this batch on their way: on the io_uring
/// backend a zone forwarded over UDP goes out from the worker's own ring ([`upstream`]), the
/// rest to the control side (one eventfd write for the batch; a full channel is answered
/// SERVFAIL at once). Then runs the exchanges' timers and errors and answers every exchange
/// that finished. The ring's sends are queued, not submitted. Returns whether an answer was
/// queued for a TCP client.
fn forward(
    handler: &mut Handler,
    udp: &mut Udp,
    tcp: &HashMap<u64, tcp::TcpConn>,
    out: &mut [u8],
    stats: &WorkerStats,
    upstream: &mut Forwarding,
    now: Instant,
) -> bool {
    let Forwarding {
        exchanges,
        control,
        outbox,
        to_control,
        done,
        timer,
        armed,
    } = upstream;
    handler.take_requests(outbox);
    if let Udp::Uring(ring) = udp {
        for request in outbox.drain(..) {
            match exchanges.start(request, now, &mut **ring) {
                Some(request) => to_control.push(request),
                None => stats.bump(Counter::UpstreamRequests),
            }
        }
        if exchanges.has_work() || exchanges.next_timer().is_some_and(|at| at <= now) {
            exchanges.run(now, &mut **ring);
        }
        exchanges.take_done(done);
        if let Some(next) = exchanges.next_timer() {
            if armed.is_none_or(|armed| next < armed) {
                *armed = Some(next);
                timer.notify_one();
            }
        }
    } else {
        to_control.append(outbox);
    }
    let mut to_tcp = false;
    for finished in done.drain(..) {
        match finished {
            Done::Reply(reply) => to_tcp |= deliver(handler, udp, tcp, out, stats, reply, now),
            Done::Control(request) => to_control.push(request),
        }
    }
    let mut wake = false;
    for request in to_control.drain(..) {
        let token = request.token;
        // A TCP retry after a truncated answer (`Via::Tcp`) is not another miss.
        let miss = request.via == Via::Zone;
        if control.requests.try_send(request).is_ok() {
            if miss {
                stats.bump(Counter::UpstreamRequests);
            }
            wake = true;
        } else {
            let reply = Reply {
                token,
                outcome: Outcome::Failed(Failure::Overloaded),
            };
            to_tcp |= deliver(handler, udp, tcp, out, stats, reply, now);
        }
    }
    if wake {
        let _ = control.wake.write(1);
    }
    to_tcp
}

/// Sends an answer to a client that was parked on a miss.
fn send_parked(
    udp: &mut Udp,
    tcp: &HashMap<u64, tcp::TcpConn>,
    stats: &WorkerStats,
    origin: Origin,
    bytes: &[u8],
) {
    let sent = match origin {
        Origin::Udp { socket, peer } => match udp {
            Udp::Epoll(epoll) => epoll.send(socket, peer, bytes),
            Udp::Uring(ring) => ring.send(socket, peer, bytes),
        },
        Origin::Tcp { conn, .. } => tcp.get(&conn).is_some_and(|conn| conn.send_parked(bytes)),
    };
    if !sent {
        stats.bump(Counter::SendErrors);
    }
}

/// Runs the worker until it is told to stop.
fn run(setup: WorkerSetup) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(setup))
}

/// The worker's tasks; returns when a [`Command::Stop`] arrives.
async fn serve(setup: WorkerSetup) -> io::Result<()> {
    let WorkerSetup {
        index,
        generation,
        backend,
        udp,
        tcp,
        settings,
        serving,
        control,
        forward: forward_setup,
        replies,
        commands,
        wake,
        stats,
        fallback,
        ready,
        ..
    } = setup;
    let udp = match open_udp(
        index,
        backend,
        fallback,
        udp,
        usize::from(settings.udp_payload),
    ) {
        Ok(udp) => udp,
        Err(error) => {
            let _ = ready.send(Err(format!("worker={index}: UDP setup failed: {error}")));
            return Err(error);
        }
    };
    let in_use = match udp {
        Udp::Epoll(_) => Backend::Epoll,
        Udp::Uring(_) => Backend::Uring,
    };
    let listeners = match tcp
        .into_iter()
        .map(|listener| listener.map(tokio::net::TcpListener::from_std).transpose())
        .collect::<io::Result<Vec<_>>>()
    {
        Ok(listeners) => listeners,
        Err(error) => {
            let _ = ready.send(Err(format!("worker={index}: TCP setup failed: {error}")));
            return Err(error);
        }
    };
    let timer = Rc::new(tokio::sync::Notify::new());
    let mut handler = Handler::new(index, settings, stats.clone());
    handler.set_generation(generation);
    let shared = Rc::new(RefCell::new(Shared {
        handler,
        udp,
        tcp: HashMap::new(),
        next_conn: 0,
        serving,
        pace: Pace::new(Instant::now(), 0),
        out: vec![0u8; TCP_MESSAGE_MAX].into_boxed_slice(),
        stats,
        udp_tasks: Vec::new(),
        tcp_tasks: Vec::new(),
        upstream: Forwarding {
            exchanges: Exchanges::new(index, forward_setup),
            control,
            outbox: Vec::new(),
            to_control: Vec::new(),
            done: Vec::new(),
            timer: timer.clone(),
            armed: None,
        },
        replies: replies.clone(),
        wake: wake.clone(),
        tcp_waiting: false,
    }));
    let (ring_events, epoll_sockets) = match &shared.borrow().udp {
        Udp::Epoll(epoll) => (None, epoll.sockets().to_vec()),
        Udp::Uring(ring) => (Some(ring.events()), Vec::new()),
    };
    for (socket_index, socket) in epoll_sockets.into_iter().enumerate() {
        let socket_index =
            u16::try_from(socket_index).expect("listen addresses are far fewer than 65536");
        if let Some(socket) = socket {
            spawn_receive_loop(&shared, socket, socket_index);
        }
    }
    if let Some(events) = ring_events {
        tokio::task::spawn_local(ring_loop(shared.clone(), ring::async_eventfd(events)?));
        tokio::task::spawn_local(upstream_timer(shared.clone(), timer));
    }
    for (socket_index, listener) in listeners.into_iter().enumerate() {
        let socket_index =
            u16::try_from(socket_index).expect("listen addresses are far fewer than 65536");
        if let Some(listener) = listener {
            spawn_accept_loop(&shared, listener, socket_index);
        }
    }
    tokio::task::spawn_local(tick(shared.clone()));
    let alarm = Rc::new(tokio::sync::Notify::new());
    ALARM.with(|slot| slot.replace(Some(alarm.clone())));
    let control = control_loop(shared, wake, replies, commands, index);
    let _ = ready.send(Ok(in_use));
    tokio::select! {
        stopped = control => stopped,
        () = alarm.notified() => {
            // A task panicked (tokio caught it): end the whole worker, so that it is restarted
            // with fresh state instead of running on without that task.
            let message = PANICKED.with(RefCell::take).unwrap_or_default();
            std::panic::resume_unwind(Box::new(message))
        }
    }
}

/// Spawns the epoll receive loop of socket `index` and keeps its abort handle.
fn spawn_receive_loop(shared: &Rc<RefCell<Shared>>, socket: Rc<tokio::net::UdpSocket>, index: u16) {
    let task = tokio::task::spawn_local(udp::receive_loop(shared.clone(), socket, index));
    put_task(
        &mut shared.borrow_mut().udp_tasks,
        index,
        task.abort_handle(),
    );
}

/// Spawns the TCP accept loop of socket `index` and keeps its abort handle.
fn spawn_accept_loop(shared: &Rc<RefCell<Shared>>, listener: tokio::net::TcpListener, index: u16) {
    let task = tokio::task::spawn_local(tcp::accept_loop(shared.clone(), listener, index));
    put_task(
        &mut shared.borrow_mut().tcp_tasks,
        index,
        task.abort_handle(),
    );
}

/// Stores `task` at `index`, aborting any task that was there.
fn put_task(tasks: &mut Vec<Option<AbortHandle>>, index: u16, task: AbortHandle) {
    let index = usize::from(index);
    if tasks.len() <= index {
        tasks.resize_with(index + 1, || None);
    }
    if let Some(old) = tasks[index].replace(task) {
        old.abort();
    }
}

/// Aborts the task at `index`, if any.
fn abort_task(tasks: &mut [Option<AbortHandle>], index: u16) {
    if let Some(task) = tasks.get_mut(usize::from(index)).and_then(Option::take) {
        task.abort();
    }
}

/// Applies one worker's share of a reload: settings, TCP limits, counters, then listen
/// addresses removed (their receive stops, their sockets close) and added (receives start).
fn apply_reload(shared: &Rc<RefCell<Shared>>, reload: Reload, index: usize) {
    let Reload {
        settings,
        serving,
        stats,
        forward,
        add,
        remove,
    } = reload;
    let mut added_epoll = Vec::new();
    let mut added_tcp = Vec::new();
    {
        let mut state = shared.borrow_mut();
        state.handler.set_settings(settings);
        state.serving = serving;
        if let Some(forward) = forward {
            state.upstream.exchanges.reconfigure(forward);
        }
        if let Some(stats) = stats {
            stats.beat(Instant::now());
            state.handler.set_stats(stats.clone());
            state.stats = stats;
        }
        for socket in remove {
            abort_task(&mut state.udp_tasks, socket);
            abort_task(&mut state.tcp_tasks, socket);
            match &mut state.udp {
                Udp::Epoll(epoll) => epoll.remove(socket),
                Udp::Uring(ring) => ring.remove_socket(socket),
            }
        }
        for (socket, udp, tcp) in add {
            let added = match &mut state.udp {
                Udp::Epoll(epoll) => epoll
                    .add(socket, udp)
                    .map(|udp| added_epoll.push((socket, udp))),
                Udp::Uring(ring) => ring.add_socket(socket, udp),
            };
            if let Err(error) = added {
                log::error!(
                    "adding a listen socket failed worker={index} socket={socket} error={error}"
                );
                continue;
            }
            match tokio::net::TcpListener::from_std(tcp) {
                Ok(listener) => added_tcp.push((socket, listener)),
                Err(error) => log::error!(
                    "adding a TCP listener failed worker={index} socket={socket} error={error}"
                ),
            }
        }
    }
    // A new forward plan retires the old upstream sockets: close the idle ones now rather than
    // at the next miss.
    shared.borrow_mut().forward_now(Instant::now());
    for (socket, udp) in added_epoll {
        spawn_receive_loop(shared, udp, socket);
    }
    for (socket, listener) in added_tcp {
        spawn_accept_loop(shared, listener, socket);
    }
}

/// Stops taking queries for the hand-over: UDP receives end (io_uring: their multishot
/// receives are cancelled; epoll: the receive loops stop between batches) and the accept loops
/// stop (this worker's listener descriptors close; the successor holds its own). Established
/// TCP connections and misses in flight carry on.
fn release(shared: &Rc<RefCell<Shared>>, index: usize) {
    let mut guard = shared.borrow_mut();
    let state = &mut *guard;
    for task in state.udp_tasks.iter_mut().chain(state.tcp_tasks.iter_mut()) {
        if let Some(task) = task.take() {
            task.abort();
        }
    }
    if let Udp::Uring(ring) = &mut state.udp {
        ring.stop_receiving();
    }
    log::debug!("worker={index} stopped receiving (hand-over)");
}

/// Sets up the UDP side on `backend`. If io_uring fails here although the start-up probe
/// passed (e.g. locked-memory limits), the worker runs on epoll when `fallback` allows, with
/// one warning; otherwise the error stops start-up.
fn open_udp(
    index: usize,
    backend: Backend,
    fallback: bool,
    sockets: Vec<Option<UdpSocket>>,
    slot_len: usize,
) -> io::Result<Udp> {
    if backend == Backend::Epoll {
        return EpollUdp::new(sockets).map(Udp::Epoll);
    }
    let spares = if fallback {
        sockets
            .iter()
            .map(|socket| socket.as_ref().map(UdpSocket::try_clone).transpose())
            .collect::<io::Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    match ring::RingUdp::new(sockets, slot_len) {
        Ok(ring) => Ok(Udp::Uring(Box::new(ring))),
        Err(error) if fallback => {
            log::warn!("io_uring setup failed, worker uses epoll worker={index} error={error}");
            EpollUdp::new(spares).map(Udp::Epoll)
        }
        Err(error) => Err(error),
    }
}

/// Delivers upstream replies and control commands whenever the eventfd is written.
async fn control_loop(
    shared: Rc<RefCell<Shared>>,
    wake: Arc<EventFd>,
    replies: crossbeam_channel::Receiver<Reply>,
    commands: crossbeam_channel::Receiver<Command>,
    index: usize,
) -> io::Result<()> {
    let wake = ring::async_eventfd(wake)?;
    loop {
        let mut guard = wake.readable().await?;
        // Reset the counter; readiness is cleared only when it reads as empty, so a write
        // that lands after the drain below wakes us again.
        if let Err(error) = guard.get_inner().0.read() {
            if error == nix::errno::Errno::EAGAIN {
                guard.clear_ready();
            }
        }
        let now = Instant::now();
        {
            let mut state = shared.borrow_mut();
            while let Ok(reply) = replies.try_recv() {
                state.deliver(reply, now);
            }
            state.forward_now(now);
        }
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::Settings(settings) => shared.borrow_mut().handler.set_settings(settings),
                Command::Reload(reload) => apply_reload(&shared, *reload, index),
                Command::Release => release(&shared, index),
                Command::Stop => return Ok(()),
            }
        }
    }
}

/// Drives the io_uring UDP path: whenever the kernel signals the ring's eventfd, handle every
/// completion.
async fn ring_loop(shared: Rc<RefCell<Shared>>, events: tokio::io::unix::AsyncFd<ring::WakeFd>) {
    // Whether the last turn ended with work left: the kernel signals the eventfd only when
    // its queue of completions goes from empty to non-empty, so a turn cut short must come
    // back by itself (after the worker's other tasks ran) instead of waiting for a signal.
    let mut busy = false;
    loop {
        if !busy {
            let Ok(mut guard) = events.readable().await else {
                return;
            };
            // The read empties the counter; clearing at once is safe (a write after the read is
            // a new edge, seen by tokio's next epoll_wait) and saves a read that would only
            // say EAGAIN.
            let _ = guard.get_inner().0.read();
            guard.clear_ready();
        }
        busy = ring_turn(&shared);
        if busy {
            tokio::task::yield_now().await;
        }
    }
}

/// One turn of the io_uring loop: handle what completed, then, while traffic continues,
/// submit the replies and wait for more in one system call (a linger), up to [`TURN`].
/// Returns whether it stopped with traffic still flowing.
fn ring_turn(shared: &RefCell<Shared>) -> bool {
    let mut state = shared.borrow_mut();
    let turn = Instant::now();
    let mut now = turn;
    if let Udp::Uring(ring) = &mut state.udp {
        ring.mute();
        ring.start_turn();
    }
    loop {
        let Shared {
            handler,
            udp,
            tcp,
            out,
            stats,
            upstream,
            replies,
            serving,
            pace,
            ..
        } = &mut *state;
        let Udp::Uring(ring) = udp else {
            return false;
        };
        let handled = ring.drain(handler, &mut upstream.exchanges, stats, now);
        // New misses go upstream (from this ring or to the control side), finished exchanges
        // are answered, and upstream replies from the control side that came in meanwhile are
        // answered here too, their sends going out with this turn's next system call instead
        // of waiting for the control loop's eventfd wake-up (which then finds the channel
        // empty). `try_recv` only: replies never block the ring.
        let mut to_tcp = forward(handler, udp, tcp, out, stats, upstream, now);
        let mut delivered = 0usize;
        while let Ok(reply) = replies.try_recv() {
            to_tcp |= deliver(handler, udp, tcp, out, stats, reply, now);
            delivered += 1;
        }
        let Udp::Uring(ring) = udp else {
            return false;
        };
        if handled == 0 && delivered == 0 {
            ring.flush();
            if !ring.unmute() {
                return false;
            }
            // Work arrived while muted: it would not wake us. Its completions are in the
            // queue already (unmute ran the task work); handle them now, after the worker's
            // other tasks if this turn is already long.
            ring.mute();
            if now.duration_since(turn) >= TURN {
                return true;
            }
            now = Instant::now();
            continue;
        }
        // Leave for tokio after a turn (TCP and the tick run there), or at once when an answer
        // waits for a TCP connection's writer, which runs there.
        if to_tcp || now.duration_since(turn) >= TURN {
            ring.flush();
            return true;
        }
        // `server.batch_wait` (config.rs BATCH_WAIT): at moderate rates one wake-up then
        // serves several queries; at low rates (pace.rs) and when zero, the worker only
        // submits and reaps what already completed.
        let wait = pace.wait(ring.datagrams(), now, serving.batch_wait);
        ring.linger(LINGER_WANT, wait);
        now = Instant::now();
    }
}

/// Ends the slices and budgets of the worker's own UDP exchanges when no traffic runs the ring
/// loop (which otherwise checks them every turn): sleeps until the earliest, or until
/// [`forward`] announces an earlier one.
async fn upstream_timer(shared: Rc<RefCell<Shared>>, timer: Rc<tokio::sync::Notify>) {
    loop {
        let next = {
            let mut state = shared.borrow_mut();
            let next = state.upstream.exchanges.next_timer();
            state.upstream.armed = next;
            next
        };
        match next {
            None => timer.notified().await,
            Some(at) => {
                let at = tokio::time::Instant::from_std(at);
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = timer.notified() => continue,
                }
            }
        }
        shared.borrow_mut().forward_now(Instant::now());
    }
}

/// Once a second: beat the heartbeat `/health` watches, answer misses whose reply never came,
/// re-arm UDP receives held back after an error.
async fn tick(shared: Rc<RefCell<Shared>>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = Instant::now();
        let mut state = shared.borrow_mut();
        state.stats.beat(now);
        if state.handler.pending_len() > 0 {
            state.expire(now);
        }
        if let Udp::Uring(ring) = &mut state.udp {
            ring.release_held();
        }
    }
}
