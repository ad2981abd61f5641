//! One pipelined TCP connection to an upstream (RFC 7766 §6.2.1.1): many queries in flight,
//! answers matched by ID and question, in any order.
//!
//! Runs on: control thread (`ringdns-ctl`), inside its `LocalSet`.
//!
//! A connection is an `Rc<Connection>` shared by the pool and one task that owns the socket: its
//! reader half parses length-prefixed frames (RFC 1035 §4.2.2) and hands each to its waiter; its
//! writer half drains a queue of frames and closes the connection after [`IDLE_TIMEOUT`] with
//! nothing in flight (RFC 7766 §6.2.3). When the connection ends, every waiter gets
//! [`Error::Closed`], flagged `reused` if the connection had carried earlier queries.
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::inflight::{AnswerReceiver, InFlight};
use super::route::{self, Question};
use super::{Error, UpstreamStats};

/// A connection with nothing in flight for this long is closed (RFC 7766 §6.2.3 asks clients to
/// close idle connections; 10 s is below common server idle timeouts, so we usually close first).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames coalesced into one write when several queries are queued at once.
const WRITE_BATCH_BYTES: usize = 16 * 1024;

/// Read buffer growth step.
const READ_CHUNK_BYTES: usize = 4096;

/// One open (or just closed) connection.
#[derive(Debug)]
pub(crate) struct Connection {
    /// The upstream.
    addr: SocketAddr,
    /// Frames (length prefix included) for the writer.
    outgoing: mpsc::UnboundedSender<Vec<u8>>,
    /// In-flight queries by ID.
    inflight: InFlight<bool>,
    /// Queries sent so far; a connection with earlier queries counts as reused.
    sent: Cell<u64>,
    /// Set once the connection has ended or decided to end; no new queries then.
    closed: Cell<bool>,
    /// The upstream's counters.
    stats: Rc<RefCell<UpstreamStats>>,
}

impl Connection {
    /// Connects to `addr` within `connect_timeout` and starts the connection's task.
    pub(crate) async fn open(
        addr: SocketAddr,
        connect_timeout: Duration,
        idle_timeout: Duration,
        stats: Rc<RefCell<UpstreamStats>>,
    ) -> Result<Rc<Self>, Error> {
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => return Err(Error::Io { addr, source }),
            Err(_) => {
                return Err(Error::Timeout {
                    addr,
                    after: connect_timeout,
                })
            }
        };
        // Queries are small and latency-bound; Nagle would only delay them.
        stream
            .set_nodelay(true)
            .map_err(|source| Error::Io { addr, source })?;
        stats.borrow_mut().tcp_connections_opened += 1;
        let (outgoing, queue) = mpsc::unbounded_channel();
        let connection = Rc::new(Self {
            addr,
            outgoing,
            inflight: InFlight::new(),
            sent: Cell::new(0),
            closed: Cell::new(false),
            stats,
        });
        tokio::task::spawn_local(run(Rc::clone(&connection), stream, queue, idle_timeout));
        Ok(connection)
    }

    /// Whether the connection still takes queries.
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.get()
    }

    /// Queries in flight on this connection.
    pub(crate) fn load(&self) -> usize {
        self.inflight.len()
    }

    /// Sends `query` (its ID replaced by a random one unique on this connection) and waits for
    /// the matching answer, which still carries the upstream's ID. The caller bounds the wait.
    pub(crate) async fn exchange(
        &self,
        query: &[u8],
        question: &Question,
    ) -> Result<Vec<u8>, Error> {
        let reused = self.sent.get() > 0;
        if self.closed.get() {
            return Err(Error::Closed {
                addr: self.addr,
                reused,
            });
        }
        let length = u16::try_from(query.len()).map_err(|_| Error::Io {
            addr: self.addr,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        let (id, seq, answer) = self.register(question, reused)?;
        let _registration = Registration {
            connection: self,
            id,
            seq,
        };
        let mut frame = Vec::with_capacity(query.len() + 2);
        frame.extend_from_slice(&length.to_be_bytes());
        frame.extend_from_slice(query);
        if let Some(message) = frame.get_mut(2..) {
            route::set_id(message, id);
        }
        if self.outgoing.send(frame).is_err() {
            return Err(Error::Closed {
                addr: self.addr,
                reused,
            });
        }
        self.sent.set(self.sent.get() + 1);
        self.stats.borrow_mut().queries += 1;
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(Error::Closed {
                addr: self.addr,
                reused,
            }),
        }
    }

    /// Registers a waiter for `question` under a random ID not in flight on this connection.
    fn register(
        &self,
        question: &Question,
        reused: bool,
    ) -> Result<(u16, u64, AnswerReceiver), Error> {
        self.inflight
            .register(question, reused)
            .ok_or(Error::IdsExhausted { addr: self.addr })
    }

    /// Hands one received message to its waiter if ID and question match; otherwise counts it.
    fn dispatch(&self, message: &[u8]) {
        match self.inflight.take_answered(message) {
            Some(waiter) => {
                let _ = waiter.answer.send(Ok(message.to_vec()));
            }
            None => self.stats.borrow_mut().ignored += 1,
        }
    }

    /// Marks the connection closed and fails every in-flight query.
    fn shut(&self) {
        self.closed.set(true);
        for waiter in self.inflight.drain() {
            let _ = waiter.answer.send(Err(Error::Closed {
                addr: self.addr,
                reused: waiter.tag,
            }));
        }
    }
}

/// Removes a query's waiter when the query ends for any reason.
struct Registration<'a> {
    /// The connection.
    connection: &'a Connection,
    /// The query's ID.
    id: u16,
    /// The registration's sequence number.
    seq: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.connection.inflight.release(self.id, self.seq);
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// Nothing in flight for the idle timeout.
    Idle,
    /// The upstream closed its side.
    Eof,
    /// A read or write failed (reset, broken pipe).
    Failed,
}

/// The connection's task: reads and writes until idle, closed or broken, then fails waiters.
async fn run(
    connection: Rc<Connection>,
    stream: TcpStream,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
    idle_timeout: Duration,
) {
    let (mut reader, mut writer) = stream.into_split();
    let end = tokio::select! {
        end = read_frames(&connection, &mut reader) => end,
        end = write_frames(&connection, &mut writer, &mut queue, idle_timeout) => end,
    };
    match end {
        End::Idle => {
            // Best effort FIN; the socket is dropped right after anyway.
            let _ = writer.shutdown().await;
        }
        End::Eof | End::Failed => {
            if connection.load() > 0 {
                connection.stats.borrow_mut().errors += 1;
            }
        }
    }
    connection.shut();
}

/// Reads length-prefixed messages and dispatches them until EOF or an error.
async fn read_frames(connection: &Connection, reader: &mut OwnedReadHalf) -> End {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    loop {
        let mut start = 0;
        // Each round consumes one whole frame, so this ends within `buf.len() / 2` rounds.
        while let Some(&[high, low]) = buf.get(start..start + 2) {
            let length = usize::from(u16::from_be_bytes([high, low]));
            let Some(message) = buf.get(start + 2..start + 2 + length) else {
                break;
            };
            connection.dispatch(message);
            start += 2 + length;
        }
        buf.drain(..start);
        buf.reserve(READ_CHUNK_BYTES);
        match reader.read_buf(&mut buf).await {
            Ok(0) => return End::Eof,
            Ok(_) => {}
            Err(_) => return End::Failed,
        }
    }
}

/// Writes queued frames, coalescing those queued together, until idle or an error.
async fn write_frames(
    connection: &Connection,
    writer: &mut OwnedWriteHalf,
    queue: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    idle_timeout: Duration,
) -> End {
    let mut batch: Vec<u8> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(idle_timeout, queue.recv()).await {
            Ok(Some(frame)) => frame,
            // The connection owns the sender, so this only happens while it is being dropped.
            Ok(None) => return End::Idle,
            Err(_) => {
                if connection.load() == 0 {
                    // Decide synchronously so no query can be queued behind the close.
                    connection.closed.set(true);
                    return End::Idle;
                }
                continue;
            }
        };
        batch.clear();
        batch.extend_from_slice(&frame);
        while batch.len() < WRITE_BATCH_BYTES {
            match queue.try_recv() {
                Ok(frame) => batch.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        if writer.write_all(&batch).await.is_err() {
            return End::Failed;
        }
    }
}
