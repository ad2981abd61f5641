//! TCP clients (RFC 7766): framing, pipelining, out-of-order answers, idle timeout, cap.
//!
//! Runs on: worker threads (tasks on the worker's current-thread runtime, both backends).
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::handler::Action;
use super::pending::Origin;
use super::stats::Counter;
use super::Shared;

/// Accepts connections on `listener` until the worker stops; over the cap, a new connection
/// is closed at once (the client retries elsewhere or later).
///
/// `socket` is the listen address's index, as UDP sockets carry theirs (metrics label
/// `server`). A reload that removes the address aborts this task, closing the listener;
/// connections already open live on until idle.
pub(super) async fn accept_loop(shared: Rc<RefCell<Shared>>, listener: TcpListener, socket: u16) {
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            // EMFILE and friends: back off briefly instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let conn = {
            let mut state = shared.borrow_mut();
            if state.tcp.len() >= state.serving.max_tcp_connections {
                state.stats.bump(Counter::TcpRefused);
                continue;
            }
            state.stats.bump(Counter::TcpAccepted);
            state.next_conn += 1;
            state.next_conn
        };
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(serve(shared.clone(), stream, socket, conn));
    }
}

/// Serves one connection: reads length-prefixed queries and answers each as soon as it can
/// (hits at once, misses when upstream answers), so answers may leave out of order (RFC 7766
/// §6.2.1.1). Closes after `tcp_idle_timeout` with no query and nothing outstanding.
async fn serve(shared: Rc<RefCell<Shared>>, stream: TcpStream, socket: u16, conn: u64) {
    let (mut reader, mut writer) = stream.into_split();
    let (frames, mut outgoing) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    let parked = Rc::new(Cell::new(0u32));
    let spare = Rc::new(Spare::default());
    let idle = {
        let mut state = shared.borrow_mut();
        let entry = TcpConn {
            frames: frames.clone(),
            parked: parked.clone(),
            spare: spare.clone(),
        };
        state.tcp.insert(conn, entry);
        state.serving.tcp_idle_timeout
    };
    let writer_spare = spare.clone();
    let writer_task = tokio::task::spawn_local(async move {
        while let Some(frame) = outgoing.recv().await {
            let written = writer.write_all(&frame).await;
            writer_spare.give_back(frame);
            if written.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let mut message = Vec::new();
    loop {
        let mut prefix = [0u8; 2];
        match tokio::time::timeout(idle, reader.read_exact(&mut prefix)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            // RFC 7766 §6.2.3: idle means no query and no answer outstanding.
            Err(_) if parked.get() > 0 => continue,
            Err(_) => {
                shared.borrow().stats.bump(Counter::TcpIdleClosed);
                break;
            }
        }
        let len = usize::from(u16::from_be_bytes(prefix));
        message.resize(len, 0);
        // A client that stops half-way through a message holds a connection slot: bound it.
        match tokio::time::timeout(idle, reader.read_exact(&mut message)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
        let now = Instant::now();
        let outcome = {
            let mut state = shared.borrow_mut();
            let outcome = state.handle_query(&message, now, Origin::Tcp { socket, conn }, &spare);
            state.forward_now(now);
            outcome
        };
        let keep_open = match outcome {
            // Waits while the client does not read its answers (the queue is bounded), so a
            // client that only writes cannot make this connection hold unbounded memory.
            TcpOutcome::Reply(reply) => frames.send(reply).await.is_ok(),
            TcpOutcome::Parked => {
                parked.set(parked.get() + 1);
                true
            }
            // A frame too short for a header cannot be answered: close rather than guess.
            TcpOutcome::Nothing => len >= crate::dns::wire::HEADER_LEN,
        };
        if !keep_open {
            break;
        }
    }
    shared.borrow_mut().tcp.remove(&conn);
    drop(frames);
    // The writer ends once every outstanding answer for this connection was sent or dropped.
    let _ = writer_task.await;
}

/// Answers queued per TCP connection before its reader waits for the client to read.
const TCP_QUEUE: usize = 64;

/// A TCP connection as the rest of the worker sees it.
#[derive(Debug)]
pub(super) struct TcpConn {
    /// Its bounded answer queue (drained by its writer task).
    pub(super) frames: mpsc::Sender<Vec<u8>>,
    /// Queries of this connection parked on a miss (the idle timeout waits for them).
    pub(super) parked: Rc<Cell<u32>>,
    /// Its reply buffers, back from the writer once written.
    pub(super) spare: Rc<Spare>,
}

impl TcpConn {
    /// Queues the answer to a parked query; `false` if the connection is gone or its queue
    /// is full (the client is not reading).
    pub(super) fn send_parked(&self, message: &[u8]) -> bool {
        self.parked.set(self.parked.get().saturating_sub(1));
        self.frames.try_send(self.spare.frame(message)).is_ok()
    }
}

/// One connection's reply buffers, reused: the writer gives each back once written, so a
/// connection that keeps asking allocates a reply buffer only when more answers are queued at
/// once than ever before (STYLE §2: a cache hit allocates nothing, over TCP too). At most
/// [`SPARE_BUFFERS`] are kept, none larger than [`SPARE_BYTES`] (a 64 KiB answer's buffer is
/// freed after it is written), so an idle connection holds little.
#[derive(Debug, Default)]
pub struct Spare(RefCell<Vec<Vec<u8>>>);

/// Reply buffers a connection keeps for reuse.
pub const SPARE_BUFFERS: usize = 8;

/// Largest reply buffer a connection keeps for reuse: a UDP-sized answer and its prefix.
pub const SPARE_BYTES: usize = 4096 + 2;

impl Spare {
    /// `message` with its 2-byte TCP length prefix (RFC 1035 §4.2.2), in a spare buffer if
    /// there is one.
    pub fn frame(&self, message: &[u8]) -> Vec<u8> {
        let mut framed = self.0.borrow_mut().pop().unwrap_or_default();
        framed.clear();
        framed.reserve(message.len() + 2);
        framed.extend_from_slice(&(message.len() as u16).to_be_bytes());
        framed.extend_from_slice(message);
        framed
    }

    /// Takes back a written buffer for the next [`Spare::frame`].
    pub fn give_back(&self, framed: Vec<u8>) {
        let mut spare = self.0.borrow_mut();
        if spare.len() < SPARE_BUFFERS && framed.capacity() <= SPARE_BYTES {
            spare.push(framed);
        }
    }
}

/// What to do after handling one TCP query.
enum TcpOutcome {
    /// Send this framed reply.
    Reply(Vec<u8>),
    /// Parked on a miss: the answer comes through [`TcpConn::send_parked`].
    Parked,
    /// Nothing to send (dropped).
    Nothing,
}

impl Shared {
    /// Handles one query from a TCP connection; a reply is framed in one of `spare`'s buffers.
    fn handle_query(
        &mut self,
        message: &[u8],
        now: Instant,
        origin: Origin,
        spare: &Spare,
    ) -> TcpOutcome {
        let Shared { handler, out, .. } = self;
        match handler.handle_query(message, now, origin, &mut out[..]) {
            Action::Reply { len } => TcpOutcome::Reply(spare.frame(&out[..len])),
            Action::Parked => TcpOutcome::Parked,
            Action::Drop(_) => TcpOutcome::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_length_prefix() {
        let spare = Spare::default();
        assert_eq!(spare.frame(&[7, 8, 9]), vec![0, 3, 7, 8, 9]);
        let long = vec![1u8; 300];
        assert_eq!(&spare.frame(&long)[..2], &[1, 44]);
    }

    #[test]
    fn written_buffers_are_reused_and_big_or_surplus_ones_freed() {
        let spare = Spare::default();
        let first = spare.frame(&[1; 100]);
        let address = first.as_ptr();
        spare.give_back(first);
        let again = spare.frame(&[2; 90]);
        assert_eq!(again.as_ptr(), address, "the written buffer is reused");
        assert_eq!(again, [&[0u8, 90][..], &[2; 90][..]].concat());
        spare.give_back(spare.frame(&vec![3; SPARE_BYTES]));
        assert!(
            spare.0.borrow().is_empty(),
            "a buffer past SPARE_BYTES is freed"
        );
        for _ in 0..SPARE_BUFFERS + 3 {
            spare.give_back(Vec::with_capacity(64));
        }
        assert_eq!(spare.0.borrow().len(), SPARE_BUFFERS);
    }
}
