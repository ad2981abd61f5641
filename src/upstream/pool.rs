//! The TCP connection pool of one upstream address, shared by every worker's misses.
//!
//! Runs on: control thread (`ringdns-ctl`), inside its `LocalSet`.
//!
//! At most [`MAX_CONNECTIONS`] connections (open or connecting) exist per upstream, never one
//! per query. A query goes to the least-loaded open connection; another connection is opened only
//! while every open one already has [`GROW_AT_INFLIGHT`] queries pipelined on it (RFC 7766
//! §6.2.1.1) and the cap allows it. A query whose *reused* connection closes or resets under it
//! (usually a keepalive the server already dropped) is retried once on a fresh connection.
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::sync::Notify;

use super::route::Question;
use super::tcp::{Connection, IDLE_TIMEOUT};
use super::{Error, UpstreamStats};

/// Connections per upstream, open or connecting. Four pipelined connections carry far more
/// queries than one node's misses need, and stay well below servers' per-client limits.
pub(crate) const MAX_CONNECTIONS: usize = 4;

/// In-flight queries on every open connection before another connection is opened.
pub(crate) const GROW_AT_INFLIGHT: usize = 16;

/// The pool of one upstream.
#[derive(Debug)]
pub(crate) struct TcpPool {
    /// The upstream.
    addr: SocketAddr,
    /// Idle timeout handed to new connections.
    idle_timeout: Duration,
    /// Connections, pruned of closed ones whenever a query looks for one.
    connections: RefCell<Vec<Rc<Connection>>>,
    /// Connects in progress; they count against [`MAX_CONNECTIONS`].
    connecting: Cell<usize>,
    /// Notified when a connect finishes either way, for queries waiting on a full pool.
    changed: Notify,
    /// The upstream's counters.
    stats: Rc<RefCell<UpstreamStats>>,
}

impl TcpPool {
    /// An empty pool for `addr`; connections are opened on demand.
    pub(crate) fn new(addr: SocketAddr, stats: Rc<RefCell<UpstreamStats>>) -> Self {
        Self::with_idle_timeout(addr, IDLE_TIMEOUT, stats)
    }

    /// An empty pool whose connections close after `idle_timeout` without queries.
    pub(crate) fn with_idle_timeout(
        addr: SocketAddr,
        idle_timeout: Duration,
        stats: Rc<RefCell<UpstreamStats>>,
    ) -> Self {
        Self {
            addr,
            idle_timeout,
            connections: RefCell::new(Vec::new()),
            connecting: Cell::new(0),
            changed: Notify::new(),
            stats,
        }
    }

    /// Sends `query` over a pooled connection and waits for its answer (upstream ID kept). A
    /// connect gives up after `connect_timeout`; the caller bounds the whole wait.
    pub(crate) async fn exchange(
        &self,
        query: &[u8],
        question: &Question,
        connect_timeout: Duration,
    ) -> Result<Vec<u8>, Error> {
        let connection = self.acquire(false, connect_timeout).await?;
        match connection.exchange(query, question).await {
            Err(Error::Closed { reused: true, .. }) => {
                self.stats.borrow_mut().stale_retries += 1;
                let fresh = self.acquire(true, connect_timeout).await?;
                fresh.exchange(query, question).await
            }
            result => result,
        }
    }

    /// Open connections right now (metrics and tests).
    pub(crate) fn open_connections(&self) -> usize {
        self.connections
            .borrow()
            .iter()
            .filter(|c| c.is_open())
            .count()
    }

    /// A connection for one query: a lightly loaded open one, else a new one if the cap allows,
    /// else the least loaded. `fresh` skips reuse while a new connection can still be opened.
    async fn acquire(
        &self,
        fresh: bool,
        connect_timeout: Duration,
    ) -> Result<Rc<Connection>, Error> {
        // Each round either returns or waits for a connect to finish; connects are bounded by
        // `connect_timeout` and the caller's deadline drops this future, so the loop ends.
        loop {
            let least_loaded = {
                let mut connections = self.connections.borrow_mut();
                connections.retain(|c| c.is_open());
                connections.iter().min_by_key(|c| c.load()).cloned()
            };
            let open = self.connections.borrow().len();
            if let Some(connection) = &least_loaded {
                if !fresh && connection.load() < GROW_AT_INFLIGHT {
                    return Ok(Rc::clone(connection));
                }
            }
            if open + self.connecting.get() < MAX_CONNECTIONS {
                return self.connect(connect_timeout).await;
            }
            if let Some(connection) = least_loaded {
                return Ok(connection);
            }
            // Every slot is a connect in progress: wait for one to finish, then look again.
            self.changed.notified().await;
        }
    }

    /// Opens a connection and adds it to the pool.
    async fn connect(&self, connect_timeout: Duration) -> Result<Rc<Connection>, Error> {
        self.connecting.set(self.connecting.get() + 1);
        let _connecting = Connecting { pool: self };
        let connection = Connection::open(
            self.addr,
            connect_timeout,
            self.idle_timeout,
            Rc::clone(&self.stats),
        )
        .await?;
        self.connections.borrow_mut().push(Rc::clone(&connection));
        Ok(connection)
    }
}

/// Releases a connect's slot and wakes waiting queries when the connect ends, even if the query
/// that started it is dropped mid-connect.
struct Connecting<'a> {
    /// The pool.
    pool: &'a TcpPool,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.pool
            .connecting
            .set(self.pool.connecting.get().saturating_sub(1));
        self.pool.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::route;
    use crate::upstream::testutil::{query, Responder, TcpMode, UdpMode};

    /// Runs `future` on a current-thread runtime inside a `LocalSet`.
    fn run_local<F: std::future::Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test runtime");
        tokio::task::LocalSet::new().block_on(&runtime, future)
    }

    #[test]
    fn idle_connection_is_closed_and_replaced() {
        let responder = Responder::start(UdpMode::Answer, TcpMode::Answer);
        let stats = Rc::new(RefCell::new(UpstreamStats::default()));
        let pool = TcpPool::with_idle_timeout(
            responder.addr(),
            Duration::from_millis(100),
            Rc::clone(&stats),
        );
        let wire = query("idle.example.");
        let question = route::parse_question(&wire).expect("valid query");
        run_local(async {
            let timeout = Duration::from_secs(5);
            let first = tokio::time::timeout(timeout, pool.exchange(&wire, &question, timeout))
                .await
                .expect("in time");
            assert!(first.is_ok(), "{first:?}");
            assert_eq!(pool.open_connections(), 1);
            // Bounded wait for the idle close: 100 ms idle timeout, up to 5 s of polling.
            for _ in 0..100 {
                if pool.open_connections() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(pool.open_connections(), 0, "idle connection closed");
            let second = tokio::time::timeout(timeout, pool.exchange(&wire, &question, timeout))
                .await
                .expect("in time");
            assert!(second.is_ok(), "{second:?}");
        });
        assert_eq!(stats.borrow().tcp_connections_opened, 2);
        assert_eq!(responder.accepts(), 2);
    }

    #[test]
    fn stale_keepalive_is_retried_on_a_fresh_connection() {
        let responder = Responder::start(UdpMode::Answer, TcpMode::CloseOnSecondQuery);
        let stats = Rc::new(RefCell::new(UpstreamStats::default()));
        let pool = TcpPool::new(responder.addr(), Rc::clone(&stats));
        let wire = query("stale.example.");
        let question = route::parse_question(&wire).expect("valid query");
        run_local(async {
            let timeout = Duration::from_secs(5);
            for _ in 0..2 {
                let answer =
                    tokio::time::timeout(timeout, pool.exchange(&wire, &question, timeout))
                        .await
                        .expect("in time");
                assert!(answer.is_ok(), "{answer:?}");
            }
        });
        assert_eq!(stats.borrow().stale_retries, 1);
        assert_eq!(responder.accepts(), 2);
    }

    #[test]
    fn fresh_connection_that_closes_is_not_retried() {
        let responder = Responder::start(UdpMode::Answer, TcpMode::CloseAtOnce);
        let stats = Rc::new(RefCell::new(UpstreamStats::default()));
        let pool = TcpPool::new(responder.addr(), Rc::clone(&stats));
        let wire = query("close.example.");
        let question = route::parse_question(&wire).expect("valid query");
        let result = run_local(async {
            let timeout = Duration::from_secs(5);
            tokio::time::timeout(timeout, pool.exchange(&wire, &question, timeout)).await
        });
        assert!(
            matches!(result, Ok(Err(Error::Closed { reused: false, .. }))),
            "{result:?}"
        );
        assert_eq!(stats.borrow().stale_retries, 0);
    }
}
