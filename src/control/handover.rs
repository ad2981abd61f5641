//! Zero-gap upgrades: a starting ringdns takes over the listen sockets of the ringdns serving
//! on the node, through the Unix socket `[node] handover`, so that node DNS never goes
//! unanswered while one instance replaces another (a DaemonSet update with `maxSurge`).
//!
//! Runs on: the main thread (the taking side, at start-up) and `ringdns-handover` (the
//! offering side, while serving).
//!
//! The sockets change owner, not address: the serving instance sends duplicates of its
//! workers' UDP sockets and TCP listeners and of its HTTP listeners with SCM_RIGHTS, one
//! SOCK_SEQPACKET record per descriptor. The new instance serves from them (binding fresh
//! sockets only for what it did not get), then confirms with `taken`. Until then both read the
//! same sockets, each datagram reaching one of them; after it the old instance stops
//! receiving ([`crate::worker::Command::Release`]), so datagrams still queued in a socket are
//! read by the new one, and nothing is lost in between. The old one answers its misses in
//! flight from its copies of the sockets, then stops without tearing down the interface or the
//! rules, which its successor uses (and adopts: see `netlink.rs`).
//!
//! Only a peer with the same effective UID may take the sockets (SO_PEERCRED). The offering
//! side gives them away once; a taker that disconnects before confirming leaves everything as
//! it was (its copies close with it).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::time::TimeVal;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// First record of a taker: the protocol and its version (its PID comes from SO_PEERCRED).
const HELLO: &str = "ringdns-handover 1";

/// Last record of the offering side, after the descriptors.
const END: &str = "end";

/// The taker's confirmation, once it serves from the sockets.
const TAKEN: &str = "taken";

/// How long either side waits for the other's next record during the exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the offering side waits for `taken` after sending the sockets: the taker starts
/// its workers and installs its rules meanwhile (the worker start timeout is 10 s).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the offering thread looks at its stop flag while no taker connects.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What [`receive`] says when the other side closed the connection.
const CLOSED: &str = "the other side closed the connection";

/// Most sockets a taker accepts (4 per worker per listen address would allow 1024 workers).
const MAX_RECORDS: usize = 4096;

/// Longest record (a kind and a socket address).
const RECORD_MAX: usize = 128;

/// What a listen socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A worker's UDP socket on a listen address.
    Udp,
    /// A worker's TCP listener on a listen address.
    Tcp,
    /// The health or metrics listener.
    Http,
}

impl Kind {
    /// The word on the wire.
    fn word(self) -> &'static str {
        match self {
            Kind::Udp => "udp",
            Kind::Tcp => "tcp",
            Kind::Http => "http",
        }
    }

    /// Parses the word on the wire.
    fn from_word(word: &str) -> Option<Kind> {
        match word {
            "udp" => Some(Kind::Udp),
            "tcp" => Some(Kind::Tcp),
            "http" => Some(Kind::Http),
            _ => None,
        }
    }
}

/// The sockets a serving instance can give away: its own duplicates of every worker's listen
/// sockets (by listen-socket index) and of its HTTP listeners. Kept in step with reloads: a
/// removed listen address must not stay bound through a duplicate held here.
#[derive(Debug, Default)]
pub struct Listening {
    /// The duplicates.
    entries: Vec<Held>,
}

/// One duplicate in [`Listening`].
#[derive(Debug)]
struct Held {
    /// What it is for.
    kind: Kind,
    /// The worker it belongs to (0 for HTTP).
    worker: usize,
    /// Its listen-socket index (0 for HTTP).
    index: u16,
    /// The descriptor.
    fd: OwnedFd,
}

impl Listening {
    /// Keeps a duplicate of `socket` as `kind` for listen-socket `index` (of worker 0).
    pub fn add(&mut self, kind: Kind, index: u16, socket: &impl AsFd) -> std::io::Result<()> {
        self.add_for(0, kind, index, socket)
    }

    /// Keeps a duplicate of `socket` as `kind` for listen-socket `index` of `worker`.
    fn add_for(
        &mut self,
        worker: usize,
        kind: Kind,
        index: u16,
        socket: &impl AsFd,
    ) -> std::io::Result<()> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        self.entries.push(Held {
            kind,
            worker,
            index,
            fd,
        });
        Ok(())
    }

    /// Keeps duplicates of `worker`'s UDP socket and TCP listener on listen-socket `index`.
    pub fn add_listen(
        &mut self,
        worker: usize,
        index: u16,
        udp: &impl AsFd,
        tcp: &impl AsFd,
    ) -> std::io::Result<()> {
        self.add_for(worker, Kind::Udp, index, udp)?;
        self.add_for(worker, Kind::Tcp, index, tcp)
    }

    /// New duplicates of `worker`'s listen sockets, by socket index (`None` where a reload
    /// removed the address): what a worker restarted in place serves from
    /// (control/supervise.rs). They are the same kernel sockets, so they keep their place in
    /// the SO_REUSEPORT groups and the datagrams queued in them.
    pub fn worker_sockets(&self, worker: usize) -> std::io::Result<WorkerSockets> {
        let mut sockets = WorkerSockets::default();
        for held in self.entries.iter().filter(|held| held.worker == worker) {
            let index = usize::from(held.index);
            let fd = held.fd.try_clone()?;
            match held.kind {
                Kind::Udp => put(&mut sockets.udp, index, UdpSocket::from(fd)),
                Kind::Tcp => put(&mut sockets.tcp, index, TcpListener::from(fd)),
                Kind::Http => {}
            }
        }
        Ok(sockets)
    }

    /// Drops the duplicates of listen-socket `index` (a listen address removed by a reload).
    pub fn remove(&mut self, index: u16) {
        self.entries
            .retain(|held| held.kind == Kind::Http || held.index != index);
    }

    /// How many sockets it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// One worker's listen sockets, by socket index.
#[derive(Debug, Default)]
pub struct WorkerSockets {
    /// UDP sockets.
    pub udp: Vec<Option<UdpSocket>>,
    /// TCP listeners.
    pub tcp: Vec<Option<TcpListener>>,
}

/// Puts `socket` at `index`, growing `slots` with `None` as needed.
fn put<T>(slots: &mut Vec<Option<T>>, index: usize, socket: T) {
    if slots.len() <= index {
        slots.resize_with(index + 1, || None);
    }
    slots[index] = Some(socket);
}

/// Whether this instance's sockets went to a successor, confirmed or not yet (it may serve
/// from them either way). Shared with the shutdown path, which then leaves the interface and
/// the rules alone.
#[derive(Debug, Default)]
pub struct Given(AtomicBool);

impl Given {
    /// Whether a successor holds (or may hold) the sockets, so the node setup is its now.
    pub fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Records that the sockets were sent (`true`) or that the taker went away with them.
    fn set(&self, given: bool) {
        self.0.store(given, Ordering::SeqCst);
    }
}

/// The offering side, on `ringdns-handover`.
#[derive(Debug)]
pub struct Offer {
    /// Tells the thread to stop offering.
    stop: Arc<AtomicBool>,
    /// The thread.
    thread: Option<JoinHandle<()>>,
    /// Whether the sockets were given.
    given: Arc<Given>,
    /// The socket path (removed on stop if it is still the file bound here).
    path: PathBuf,
    /// Device and inode of the socket file bound here.
    file: Option<(u64, u64)>,
    /// The confirmed successor's connection, for [`Offer::successor`].
    successor: Arc<Mutex<Option<OwnedFd>>>,
}

/// What the offering thread tells the main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A successor confirmed: stop receiving, finish, leave the node setup to it.
    Taken {
        /// The successor's PID.
        pid: i32,
    },
}

impl Offer {
    /// Binds `path` (replacing a stale socket file there: a new instance takes the path over
    /// from the one it replaced) and offers `listening` on it from `ringdns-handover`.
    pub fn start(
        path: &Path,
        listening: Arc<Mutex<Listening>>,
        events: crossbeam_channel::Sender<Event>,
    ) -> anyhow::Result<Offer> {
        let listener = bind(path).with_context(|| format!("node.handover {}", path.display()))?;
        let file = file_identity(path);
        let stop = Arc::new(AtomicBool::new(false));
        let given = Arc::new(Given::default());
        let successor = Arc::new(Mutex::new(None));
        let thread = {
            let offering = Offering {
                listener,
                path: path.to_owned(),
                listening,
                events,
                stop: stop.clone(),
                given: given.clone(),
                successor: successor.clone(),
            };
            std::thread::Builder::new()
                .name("ringdns-handover".into())
                .spawn(move || serve(&offering))
                .context("starting ringdns-handover")?
        };
        Ok(Offer {
            stop,
            thread: Some(thread),
            given,
            path: path.to_owned(),
            file,
            successor,
        })
    }

    /// The confirmed successor (once [`Event::Taken`] arrived): its connection stays open for
    /// as long as it runs.
    pub fn successor(&self) -> Option<Peer> {
        self.successor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .map(|conn| Peer { conn })
    }

    /// Whether the sockets were given to a successor.
    pub fn given(&self) -> Arc<Given> {
        self.given.clone()
    }

    /// Stops offering (within [`POLL_INTERVAL`]); removes the socket file unless a successor
    /// took the path over. Dropping the offer does the same.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Not if a successor bound the path since (it replaces the file): only our own file.
        if !self.given.any() && self.file.is_some() && file_identity(&self.path) == self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The device and inode of the file at `path`, if there is one.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

/// The other instance of a hand-over, while it runs: the connection of the exchange, kept open
/// by both sides for their whole lives, so each learns when the other exits (PIDs do not help:
/// the two pods of a DaemonSet update live in different PID namespaces).
#[derive(Debug)]
pub struct Peer {
    /// The exchange's connection.
    conn: OwnedFd,
}

impl Peer {
    /// Whether the other instance still runs (its end of the connection is open). Does not
    /// block.
    pub fn alive(&self) -> bool {
        let mut byte = [0u8; 1];
        match rustix::net::recv(&self.conn, &mut byte, RecvFlags::DONTWAIT | RecvFlags::PEEK) {
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => true,
            // A record (none is sent after the exchange) means it is there; 0 bytes or an
            // error means its end closed.
            Ok((n, _)) => n > 0,
            Err(_) => false,
        }
    }
}

/// A bound, listening SOCK_SEQPACKET socket at `path`, readable by its owner only.
fn bind(path: &Path) -> anyhow::Result<OwnedFd> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).context("removing the old socket file"),
    }
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a Unix socket")?;
    let addr = UnixAddr::new(path).context("socket path")?;
    socket::bind(fd.as_raw_fd(), &addr).context("binding")?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .context("setting the socket file's mode")?;
    socket::listen(&fd, Backlog::new(4).unwrap_or(Backlog::MAXCONN)).context("listening")?;
    Ok(fd)
}

/// What the offering thread works with.
struct Offering {
    /// The bound, listening socket.
    listener: OwnedFd,
    /// Its path (for log lines).
    path: PathBuf,
    /// The sockets to give.
    listening: Arc<Mutex<Listening>>,
    /// To the main thread.
    events: crossbeam_channel::Sender<Event>,
    /// Set when the offer stops.
    stop: Arc<AtomicBool>,
    /// Whether the sockets were given.
    given: Arc<Given>,
    /// The confirmed successor's connection.
    successor: Arc<Mutex<Option<OwnedFd>>>,
}

/// The offering thread: accepts takers until one confirms or it is told to stop.
fn serve(offering: &Offering) {
    let Offering {
        listener,
        path,
        listening,
        events,
        stop,
        given,
        successor,
    } = offering;
    // accept() gives up after SO_RCVTIMEO, so the stop flag is looked at that often.
    if let Err(error) = set_timeout(listener, POLL_INTERVAL) {
        log::error!("handover: {} not offered: {error:#}", path.display());
        return;
    }
    while !stop.load(Ordering::SeqCst) {
        let conn = match socket::accept4(listener.as_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(conn) => conn,
            Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(error) => {
                log::error!("handover: accepting on {} failed: {error}", path.display());
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        match give(&conn, listening, given, stop) {
            Ok(pid) => {
                *successor.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
                let _ = events.send(Event::Taken { pid });
                return;
            }
            Err(Abandoned::Stopping) => {
                // Shutting down mid-exchange: the taker may serve from the sockets already,
                // so they count as given (the shutdown leaves the node setup alone).
                log::warn!("handover: stopping before the taker confirmed");
                return;
            }
            Err(Abandoned::Failed(error)) => {
                // The taker's copies closed with it (or it never got any): nothing changed.
                given.set(false);
                log::warn!("handover: not taken: {error:#}");
            }
            Err(Abandoned::Unsure(error)) => {
                // The taker is alive and may serve from the sockets: both instances read them
                // now, and the node setup counts as given (no teardown on exit). No further
                // offers: the sockets are out.
                log::error!(
                    "handover: the taker holds the sockets but did not confirm; still serving \
                     beside it, and leaving the interface and rules in place on exit: {error:#}"
                );
                return;
            }
        }
    }
}

/// Why an exchange with a taker ended without a confirmation.
#[derive(Debug)]
enum Abandoned {
    /// This instance is shutting down.
    Stopping,
    /// The taker went away (its copies of the sockets, if any, closed with it) or never got
    /// a socket.
    Failed(anyhow::Error),
    /// The taker got the sockets and is still connected, but did not confirm in time or
    /// answered something else: it may be serving from them.
    Unsure(anyhow::Error),
}

impl From<anyhow::Error> for Abandoned {
    fn from(error: anyhow::Error) -> Abandoned {
        Abandoned::Failed(error)
    }
}

/// One exchange with a taker: checks it, sends every socket, waits for `taken`. Returns the
/// taker's PID.
fn give(
    conn: &OwnedFd,
    listening: &Mutex<Listening>,
    given: &Given,
    stop: &AtomicBool,
) -> Result<i32, Abandoned> {
    let credentials = socket::getsockopt(conn, sockopt::PeerCredentials)
        .context("reading the taker's credentials")?;
    let euid = rustix::process::geteuid().as_raw();
    if credentials.uid() != euid {
        return Err(anyhow::anyhow!(
            "refused a taker with uid {} (ours is {euid})",
            credentials.uid()
        )
        .into());
    }
    let pid = credentials.pid();
    // Records are awaited in short steps so that a shutdown meanwhile is not held up.
    set_timeout(conn, POLL_INTERVAL)?;
    let hello = next_record(conn, EXCHANGE_TIMEOUT, stop)?;
    if hello != HELLO {
        return Err(anyhow::anyhow!("taker pid={pid} speaks {hello:?}, not {HELLO:?}").into());
    }
    // Duplicated under the lock, sent after it: a slow taker never holds up a reload.
    let sockets = {
        let listening = listening.lock().unwrap_or_else(PoisonError::into_inner);
        listening
            .entries
            .iter()
            .map(|held| Ok((held.kind, held.fd.try_clone()?)))
            .collect::<std::io::Result<Vec<_>>>()
            .context("duplicating the sockets")?
    };
    let count = sockets.len();
    set_send_timeout(conn, EXCHANGE_TIMEOUT)?;
    given.set(true);
    for (kind, fd) in &sockets {
        send(conn, kind.word(), Some(fd.as_fd()))
            .with_context(|| format!("sending a {} socket", kind.word()))?;
    }
    send(conn, END, None).context("sending the end record")?;
    log::info!("handover: sent {count} sockets to pid={pid}, waiting for it to serve");
    let confirm = match next_record(conn, CONFIRM_TIMEOUT, stop) {
        Ok(record) => record,
        Err(Abandoned::Failed(error)) if !is_closed(&error) => {
            return Err(Abandoned::Unsure(
                error.context(format!("waiting for pid={pid} to confirm")),
            ))
        }
        Err(other) => return Err(other),
    };
    if confirm != TAKEN {
        return Err(Abandoned::Unsure(anyhow::anyhow!(
            "taker pid={pid} answered {confirm:?}, not {TAKEN:?}"
        )));
    }
    Ok(pid)
}

/// The next record on `conn` (whose SO_RCVTIMEO is [`POLL_INTERVAL`]), waiting up to `within`
/// unless `stop` is set meanwhile.
fn next_record(conn: &OwnedFd, within: Duration, stop: &AtomicBool) -> Result<String, Abandoned> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some((record, _)) = receive_or_timeout(conn)? {
            return Ok(record);
        }
        if stop.load(Ordering::SeqCst) {
            return Err(Abandoned::Stopping);
        }
        if std::time::Instant::now() >= deadline {
            return Err(anyhow::anyhow!("nothing within {within:?}").into());
        }
    }
}

/// Whether `error` says the other side closed the connection.
fn is_closed(error: &anyhow::Error) -> bool {
    error.to_string() == CLOSED
}

/// The listen sockets taken from the instance serving before this one.
#[derive(Debug)]
pub struct Taken {
    /// The connection to the old instance (for `taken`).
    conn: OwnedFd,
    /// The old instance's PID.
    pid: i32,
    /// UDP sockets by local address, one per old worker.
    udp: HashMap<SocketAddr, Vec<UdpSocket>>,
    /// TCP listeners by local address, one per old worker.
    tcp: HashMap<SocketAddr, Vec<TcpListener>>,
    /// HTTP listeners by local address.
    http: HashMap<SocketAddr, TcpListener>,
    /// Sockets received.
    received: usize,
    /// Sockets used so far.
    used: usize,
}

impl Taken {
    /// Connects to the instance offering at `path` and takes its sockets. `None` when nothing
    /// offers there (no socket file, or a stale one from an instance that is gone); a failure
    /// after connecting is an error (a half-done exchange leaves the old instance serving).
    pub fn take(path: &Path) -> anyhow::Result<Option<Taken>> {
        let conn = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("creating a Unix socket")?;
        let addr = UnixAddr::new(path).context("socket path")?;
        match socket::connect(conn.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => return Ok(None),
            Err(error) => {
                return Err(error).with_context(|| format!("connecting to {}", path.display()))
            }
        }
        let credentials = socket::getsockopt(&conn, sockopt::PeerCredentials)
            .context("reading the serving instance's credentials")?;
        let euid = rustix::process::geteuid().as_raw();
        if credentials.uid() != euid {
            anyhow::bail!(
                "{} is offered by uid {}, not ours ({euid})",
                path.display(),
                credentials.uid()
            );
        }
        let pid = credentials.pid();
        set_timeout(&conn, EXCHANGE_TIMEOUT)?;
        send(&conn, HELLO, None).context("sending hello")?;
        let mut taken = Taken {
            conn,
            pid,
            udp: HashMap::new(),
            tcp: HashMap::new(),
            http: HashMap::new(),
            received: 0,
            used: 0,
        };
        loop {
            let (record, fd) = receive(&taken.conn).context("receiving a socket")?;
            if record == END {
                break;
            }
            let kind =
                Kind::from_word(&record).with_context(|| format!("unknown record {record:?}"))?;
            let fd = fd.with_context(|| format!("a {record} record without a descriptor"))?;
            taken.received += 1;
            if taken.received > MAX_RECORDS {
                anyhow::bail!("more than {MAX_RECORDS} sockets offered");
            }
            taken.file(kind, fd)?;
        }
        Ok(Some(taken))
    }

    /// Files one received descriptor under its kind and local address, after checking that it
    /// is what the record says.
    fn file(&mut self, kind: Kind, fd: OwnedFd) -> anyhow::Result<()> {
        let ty = socket::getsockopt(&fd, sockopt::SockType).context("SO_TYPE")?;
        let listening = ty == SockType::Stream
            && socket::getsockopt(&fd, sockopt::AcceptConn).context("SO_ACCEPTCONN")?;
        match kind {
            Kind::Udp if ty == SockType::Datagram => {
                let socket = UdpSocket::from(fd);
                let addr = socket.local_addr().context("a UDP socket's address")?;
                self.udp.entry(addr).or_default().push(socket);
            }
            Kind::Tcp | Kind::Http if listening => {
                let listener = TcpListener::from(fd);
                let addr = listener.local_addr().context("a TCP listener's address")?;
                if kind == Kind::Tcp {
                    self.tcp.entry(addr).or_default().push(listener);
                } else {
                    self.http.insert(addr, listener);
                }
            }
            _ => anyhow::bail!("a {} record carries a socket of type {ty:?}", kind.word()),
        }
        Ok(())
    }

    /// One of the old instance's UDP sockets on `addr`, if any is left.
    pub fn udp(&mut self, addr: SocketAddr) -> Option<UdpSocket> {
        let socket = self.udp.get_mut(&addr)?.pop()?;
        self.used += 1;
        Some(socket)
    }

    /// One of the old instance's TCP listeners on `addr`, if any is left.
    pub fn tcp(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        let listener = self.tcp.get_mut(&addr)?.pop()?;
        self.used += 1;
        Some(listener)
    }

    /// The old instance's HTTP listener on `addr`, if it had one.
    pub fn http(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        let listener = self.http.remove(&addr)?;
        self.used += 1;
        Some(listener)
    }

    /// The old instance's PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sockets received, and how many of them this instance serves from.
    pub fn counts(&self) -> (usize, usize) {
        (self.received, self.used)
    }

    /// Tells the old instance that this one serves: it stops receiving. Sockets not used
    /// (fewer workers or listen addresses here) are closed; the old instance keeps its copies
    /// of them until it stops.
    /// Returns the predecessor (which idles until it is stopped, then exits) in any case, with
    /// the confirmation's outcome: if it could not be told, [`Peer::alive`] says whether it
    /// still runs (then beside this instance) or is gone.
    pub fn confirm(self) -> (Peer, anyhow::Result<()>) {
        let sent = send(&self.conn, TAKEN, None).context("confirming the hand-over");
        (Peer { conn: self.conn }, sent)
    }
}

/// Sends one record, with `fd` attached if given.
fn send(conn: &OwnedFd, record: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let iov = [IoSlice::new(record.as_bytes())];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = fd.map(|fd| [fd]);
    if let Some(fds) = &fds {
        if !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(std::io::Error::other("no room for the descriptor"));
        }
    }
    rustix::net::sendmsg(conn, &iov, &mut control, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// Receives one record and the descriptor attached to it, if any, waiting up to the
/// connection's SO_RCVTIMEO. A closed connection or a timeout is an error.
fn receive(conn: &OwnedFd) -> anyhow::Result<(String, Option<OwnedFd>)> {
    receive_or_timeout(conn)?.context("timed out")
}

/// As [`receive`], but a timeout is `None`.
fn receive_or_timeout(conn: &OwnedFd) -> anyhow::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; RECORD_MAX];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let message = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match rustix::net::recvmsg(conn, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(message) => message,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return Ok(None),
            // Closed with records unread (it gave up mid-exchange): closed all the same.
            Err(rustix::io::Errno::CONNRESET) => anyhow::bail!(CLOSED),
            Err(error) => return Err(error.into()),
        }
    };
    let mut fd = None;
    for control in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = control {
            // Extra descriptors (none are sent) are closed as they drop.
            for owned in fds {
                fd.get_or_insert(owned);
            }
        }
    }
    if message.bytes == 0 && fd.is_none() {
        anyhow::bail!(CLOSED);
    }
    if message
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        anyhow::bail!("a truncated record");
    }
    let text = std::str::from_utf8(buf.get(..message.bytes).unwrap_or_default())
        .context("a record that is not UTF-8")?;
    Ok(Some((text.to_owned(), fd)))
}

/// Bounds every send on `conn` by `timeout`.
fn set_send_timeout(conn: &OwnedFd, timeout: Duration) -> anyhow::Result<()> {
    socket::setsockopt(conn, sockopt::SendTimeout, &timeval(timeout)).context("SO_SNDTIMEO")
}

/// Bounds every receive on `conn` by `timeout`.
fn set_timeout(conn: &OwnedFd, timeout: Duration) -> anyhow::Result<()> {
    socket::setsockopt(conn, sockopt::ReceiveTimeout, &timeval(timeout)).context("SO_RCVTIMEO")
}

/// `timeout` as a `timeval`.
fn timeval(timeout: Duration) -> TimeVal {
    let micros = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
    TimeVal::new(micros / 1_000_000, micros % 1_000_000)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    use super::*;

    /// Longest a test waits for the other side (the offering thread, the kernel).
    const WAIT: Duration = Duration::from_secs(5);

    /// A running offer of `listening` at `dir/handover.sock`, and the receiving end of its events.
    struct Offering {
        /// The offer under test.
        offer: Offer,
        /// Its socket path.
        path: PathBuf,
        /// What it offers (shared with the offering thread).
        listening: Arc<Mutex<Listening>>,
        /// Its events.
        events: crossbeam_channel::Receiver<Event>,
    }

    /// Starts offering `listening` at `dir/handover.sock`.
    /// Offers one socket as `kind` from `dir`.
    fn offer_one(dir: &Path, kind: Kind, socket: &impl AsFd) -> anyhow::Result<Offering> {
        let mut listening = Listening::default();
        listening.add(kind, 0, socket)?;
        offer(dir, listening)
    }

    fn offer(dir: &Path, listening: Listening) -> anyhow::Result<Offering> {
        let path = dir.join("handover.sock");
        let listening = Arc::new(Mutex::new(listening));
        let (sender, events) = crossbeam_channel::bounded(1);
        let offer = Offer::start(&path, listening.clone(), sender)?;
        Ok(Offering {
            offer,
            path,
            listening,
            events,
        })
    }

    /// This process's PID, as SO_PEERCRED reports it.
    fn our_pid() -> i32 {
        i32::try_from(std::process::id()).expect("Linux PIDs fit in pid_t")
    }

    /// The event an offer sends when this process took from it.
    fn taken_by_us() -> Event {
        Event::Taken { pid: our_pid() }
    }

    /// Polls `condition` until it holds or [`WAIT`] has passed; whether it held.
    fn eventually(condition: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + WAIT;
        while !condition() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Accepts one connection on `listener` from another thread, waiting at most [`WAIT`], so
    /// that a listener nobody connects to fails the test instead of hanging it.
    fn accept_within_wait(listener: TcpListener) -> anyhow::Result<(TcpStream, SocketAddr)> {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(listener.accept());
        });
        Ok(receiver
            .recv_timeout(WAIT)
            .context("no connection accepted")??)
    }

    #[test]
    fn take_from_an_offer_gets_the_same_sockets() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let http = TcpListener::bind("127.0.0.1:0")?;
        let (udp_addr, tcp_addr, http_addr) =
            (udp.local_addr()?, tcp.local_addr()?, http.local_addr()?);
        let mut listening = Listening::default();
        listening.add(Kind::Udp, 0, &udp)?;
        listening.add(Kind::Tcp, 0, &tcp)?;
        listening.add(Kind::Http, 0, &http)?;
        let offering = offer(dir.path(), listening)?;

        let mut taken = Taken::take(&offering.path)?.context("the offer was not found")?;
        assert_eq!(taken.counts(), (3, 0));
        assert_eq!(taken.pid(), our_pid());

        // Same address, and a datagram sent to it is read here: the kernel socket itself (std
        // binds without SO_REUSEPORT, so no second socket can share the address).
        let taken_udp = taken.udp(udp_addr).context("no UDP socket taken")?;
        assert_eq!(taken_udp.local_addr()?, udp_addr);
        assert!(
            taken.udp(udp_addr).is_none(),
            "only one UDP socket was offered"
        );
        taken_udp.set_read_timeout(Some(WAIT))?;
        let client = UdpSocket::bind("127.0.0.1:0")?;
        client.send_to(b"ping", udp_addr)?;
        let mut buf = [0u8; 16];
        let (len, from) = taken_udp.recv_from(&mut buf)?;
        assert_eq!(buf.get(..len), Some(&b"ping"[..]));
        assert_eq!(from, client.local_addr()?);

        let taken_tcp = taken.tcp(tcp_addr).context("no TCP listener taken")?;
        assert_eq!(taken_tcp.local_addr()?, tcp_addr);
        let mut client = TcpStream::connect(tcp_addr)?;
        let (mut accepted, peer) = accept_within_wait(taken_tcp)?;
        assert_eq!(peer, client.local_addr()?);
        client.write_all(b"pong")?;
        accepted.set_read_timeout(Some(WAIT))?;
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf)?;
        assert_eq!(&buf, b"pong");

        let taken_http = taken.http(http_addr).context("no HTTP listener taken")?;
        assert_eq!(taken_http.local_addr()?, http_addr);
        assert!(
            taken.tcp(http_addr).is_none(),
            "an HTTP listener is not a worker's"
        );
        assert_eq!(taken.counts(), (3, 3));

        taken.confirm().1?;
        assert_eq!(offering.events.recv_timeout(WAIT)?, taken_by_us());
        assert!(offering.offer.given().any());
        offering.offer.stop();
        Ok(())
    }

    #[test]
    fn nothing_offers() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("handover.sock");
        assert!(Taken::take(&path)?.is_none(), "no socket file");

        // What an offering instance that was killed leaves behind.
        drop(bind(&path)?);
        assert!(path.exists());
        assert!(Taken::take(&path)?.is_none(), "a stale SOCK_SEQPACKET file");

        let stream_path = dir.path().join("stream.sock");
        drop(std::os::unix::net::UnixListener::bind(&stream_path)?);
        assert!(stream_path.exists());
        assert!(
            Taken::take(&stream_path)?.is_none(),
            "a stale SOCK_STREAM file"
        );
        Ok(())
    }

    #[test]
    fn a_taker_that_leaves_before_confirming_changes_nothing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let mut listening = Listening::default();
        listening.add(Kind::Udp, 0, &udp)?;
        listening.add(Kind::Tcp, 0, &tcp)?;
        let offering = offer(dir.path(), listening)?;
        let given = offering.offer.given();

        let first = Taken::take(&offering.path)?.context("the offer was not found")?;
        assert_eq!(first.counts().0, 2);
        assert!(
            given.any(),
            "sent, so the taker may serve from them already"
        );
        drop(first);
        assert!(
            eventually(|| !given.any()),
            "still given after the taker left"
        );
        assert_eq!(
            offering.events.try_recv(),
            Err(crossbeam_channel::TryRecvError::Empty)
        );
        assert_eq!(
            offering
                .listening
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            2
        );

        // Still offering: the next taker gets everything.
        let second = Taken::take(&offering.path)?.context("no longer offered")?;
        assert_eq!(second.counts().0, 2);
        second.confirm().1?;
        assert_eq!(offering.events.recv_timeout(WAIT)?, taken_by_us());
        assert!(given.any());
        offering.offer.stop();
        Ok(())
    }

    #[test]
    fn a_confirmed_offer_is_not_offered_again() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let offering = offer_one(dir.path(), Kind::Udp, &udp)?;

        Taken::take(&offering.path)?
            .context("the offer was not found")?
            .confirm()
            .1?;
        assert_eq!(offering.events.recv_timeout(WAIT)?, taken_by_us());
        offering.offer.stop();
        // The path is the successor's now: left in place, but nothing answers on it here.
        assert!(offering.path.exists());
        assert!(Taken::take(&offering.path)?.is_none());
        Ok(())
    }

    #[test]
    fn a_taker_that_holds_the_sockets_but_answers_otherwise_keeps_them_given() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let offering = offer_one(dir.path(), Kind::Udp, &udp)?;
        let given = offering.offer.given();

        let taken = Taken::take(&offering.path)?.context("the offer was not found")?;
        send(&taken.conn, "not-taken", None)?;
        // The offering side gives up on it (its thread ends, dropping the event sender) but
        // must not count the sockets as its own again: the taker may serve from them, so the
        // node setup is not torn down.
        assert_eq!(
            offering.events.recv_timeout(WAIT),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected),
            "no confirmation, and the offering thread ended"
        );
        assert!(given.any(), "a live taker's sockets counted as not given");
        drop(taken);
        offering.offer.stop();
        Ok(())
    }

    #[test]
    fn a_record_of_the_wrong_kind_is_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let offering = offer_one(dir.path(), Kind::Udp, &tcp)?;
        let given = offering.offer.given();

        let error = Taken::take(&offering.path).expect_err("a TCP listener filed as UDP");
        assert!(format!("{error:#}").contains("udp record"), "{error:#}");
        assert!(
            eventually(|| !given.any()),
            "a failed take left the sockets given"
        );
        offering.offer.stop();
        Ok(())
    }

    #[test]
    fn remove_drops_the_listen_sockets_of_an_index_but_not_http() -> anyhow::Result<()> {
        let udp = [
            UdpSocket::bind("127.0.0.1:0")?,
            UdpSocket::bind("127.0.0.1:0")?,
        ];
        let tcp = [
            TcpListener::bind("127.0.0.1:0")?,
            TcpListener::bind("127.0.0.1:0")?,
        ];
        let health = TcpListener::bind("127.0.0.1:0")?;
        let metrics = TcpListener::bind("127.0.0.1:0")?;
        let mut listening = Listening::default();
        assert!(listening.is_empty());
        for (index, (udp, tcp)) in (0u16..).zip(udp.iter().zip(&tcp)) {
            listening.add(Kind::Udp, index, udp)?;
            listening.add(Kind::Tcp, index, tcp)?;
        }
        listening.add(Kind::Http, 0, &health)?;
        listening.add(Kind::Http, 0, &metrics)?;
        assert_eq!(listening.len(), 6);

        listening.remove(0);
        assert_eq!(listening.len(), 4);
        let left: Vec<(Kind, u16)> = listening
            .entries
            .iter()
            .map(|held| (held.kind, held.index))
            .collect();
        assert_eq!(
            left,
            [
                (Kind::Udp, 1),
                (Kind::Tcp, 1),
                (Kind::Http, 0),
                (Kind::Http, 0)
            ]
        );

        listening.remove(1);
        assert_eq!(listening.len(), 2);
        assert!(listening.entries.iter().all(|held| held.kind == Kind::Http));
        assert!(!listening.is_empty());
        Ok(())
    }

    #[test]
    fn a_removed_index_does_not_stay_bound() -> anyhow::Result<()> {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let addr = udp.local_addr()?;
        let mut listening = Listening::default();
        listening.add(Kind::Udp, 0, &udp)?;
        drop(udp);
        let error = UdpSocket::bind(addr).expect_err("the duplicate keeps the address bound");
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);

        listening.remove(0);
        UdpSocket::bind(addr).context("the address stayed bound after remove")?;
        Ok(())
    }

    #[test]
    fn stop_removes_the_socket_file_when_nothing_was_given() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let offering = offer(&dir.path().join("run"), Listening::default())?;
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&offering.path)?.permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
        offering.offer.stop();
        assert!(!offering.path.exists());
        assert_eq!(
            offering.events.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        );
        Ok(())
    }

    #[test]
    fn an_offer_replaces_a_stale_socket_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        drop(bind(&dir.path().join("handover.sock"))?);
        let offering = offer(dir.path(), Listening::default())?;
        let taken = Taken::take(&offering.path)?.context("the new offer was not found")?;
        assert_eq!(taken.counts(), (0, 0));
        drop(taken);
        offering.offer.stop();
        Ok(())
    }

    #[test]
    fn kinds_round_trip_through_their_words() {
        for kind in [Kind::Udp, Kind::Tcp, Kind::Http] {
            assert_eq!(Kind::from_word(kind.word()), Some(kind));
        }
        assert_eq!(Kind::from_word("end"), None);
    }
}
