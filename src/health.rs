//! `/health`, `/ready` and lame duck, and the `ringdns-http` thread serving them and `/metrics`.
//!
//! Runs on: `ringdns-http` (the HTTP server, the checks, scrapes); the control thread flips
//! [`Health`]'s flags.
//!
//! `GET /health` is 200 `OK` only if every worker's heartbeat is fresh and an `id.server.` CH
//! TXT query (RFC 4892) sent over UDP to the first listen address, the path pods use, is
//! answered within [`PROBE_TIMEOUT`]. The workers answer that query themselves, so the check
//! does not depend on any upstream. Otherwise, and from SIGTERM on (lame duck), it is 503 with
//! the reason in the body. `GET /ready` is 200 once every worker serves (and, if the node
//! integration is connected, its interface and rules are in place). `GET /metrics` is the
//! Prometheus text of [`crate::metrics`], on the metrics listener only (the health address is
//! the one pods can reach); when both keys name one address, one listener serves all three.
//!
//! The server is hyper's HTTP/1 server on a current-thread tokio runtime: nothing here is on
//! the query path, and a few connections at a time are all probes and scrapers need.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;

use crate::metrics::{self, ControlMetrics, Sources};
use crate::worker::stats::WorkerStats;

/// How long the synthetic query may take before `/health` fails: far above a local answer
/// (microseconds), well below kubelet's default 1 s probe timeout plus its retries.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A worker whose heartbeat (once a second) is older than this is stalled.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(3);

/// Open HTTP connections at most; further ones are closed at once (probes and scrapers need
/// a handful).
const MAX_CONNECTIONS: usize = 64;

/// A client that has not sent a complete request head within this is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Back-off after a failed `accept` (EMFILE and the like), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Which paths a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routes {
    /// `/health` and `/ready`.
    pub health: bool,
    /// `/metrics`.
    pub metrics: bool,
}

/// Why `/health` is 503.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    /// SIGTERM arrived: queries are still answered until the lame-duck period ends.
    #[error("lame duck: shutting down")]
    LameDuck,
    /// A worker's last heartbeat is older than [`HEARTBEAT_STALE`].
    #[error("worker {worker} stalled: last heartbeat {age:?} ago")]
    WorkerStalled {
        /// Worker index.
        worker: usize,
        /// Age of its last heartbeat.
        age: Duration,
    },
    /// The synthetic query got no answer in time.
    #[error("no answer to id.server CH TXT from {target} within {after:?}")]
    ProbeTimeout {
        /// Where it was sent.
        target: SocketAddr,
        /// How long we waited.
        after: Duration,
    },
    /// The synthetic query could not be sent or was refused (ICMP port unreachable).
    #[error("id.server CH TXT to {target} failed: {source}")]
    ProbeIo {
        /// Where it was sent.
        target: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}

/// Why `/ready` is 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// Workers are still starting.
    #[error("workers are starting")]
    Starting,
    /// Shutting down.
    #[error("lame duck: shutting down")]
    LameDuck,
    /// The node integration reports its interface or rules missing.
    #[error("node interface or rules not in place")]
    RulesMissing,
}

/// The health state the control thread flips and the HTTP thread checks.
///
/// # Threads
///
/// Built by the control thread, shared (`Arc`) with `ringdns-http`. The flags are written by
/// the control thread only and read by `ringdns-http`, both `Relaxed`: each is a lone flag that
/// orders nothing else. The probe target and the worker list sit behind `RwLock`s that only a
/// reload write-locks (control thread); `ringdns-http` read-locks them per check, never the
/// workers.
#[derive(Debug)]
pub struct Health {
    /// Where the synthetic query goes: the first listen address (loopback if unspecified).
    /// Swapped by a reload that changes the first listen address (control thread writes).
    target: RwLock<SocketAddr>,
    /// Every worker's counters (for the heartbeats); swapped by a reload that changes the
    /// metrics layout (write-locked by the control thread only then).
    workers: RwLock<Vec<Arc<WorkerStats>>>,
    /// For the node integration's readiness.
    control: Arc<ControlMetrics>,
    /// Every worker reported that it serves.
    serving: AtomicBool,
    /// SIGTERM arrived.
    lame_duck: AtomicBool,
}

impl Health {
    /// Health for workers listening first on `first_listen`.
    pub fn new(
        first_listen: SocketAddr,
        workers: Vec<Arc<WorkerStats>>,
        control: Arc<ControlMetrics>,
    ) -> Health {
        Health {
            target: RwLock::new(probe_target(first_listen)),
            workers: RwLock::new(workers),
            control,
            serving: AtomicBool::new(false),
            lame_duck: AtomicBool::new(false),
        }
    }

    /// Swaps in the workers' new counters (control thread, on reload).
    pub fn set_workers(&self, workers: Vec<Arc<WorkerStats>>) {
        *self
            .workers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = workers;
    }

    /// Every worker serves (control thread).
    pub fn set_serving(&self) {
        self.serving.store(true, Ordering::Relaxed);
    }

    /// Turns `/health` and `/ready` to 503 for good (control thread, on SIGTERM).
    pub fn enter_lame_duck(&self) {
        self.lame_duck.store(true, Ordering::Relaxed);
    }

    /// Where the synthetic query goes.
    pub fn target(&self) -> SocketAddr {
        *self
            .target
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Points the synthetic query at a new first listen address (control thread, on reload).
    pub fn set_first_listen(&self, first_listen: SocketAddr) {
        *self
            .target
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = probe_target(first_listen);
    }

    /// The `/health` check: lame duck, heartbeats, then the synthetic query.
    pub async fn check(&self) -> Result<(), Unhealthy> {
        if self.lame_duck.load(Ordering::Relaxed) {
            return Err(Unhealthy::LameDuck);
        }
        let now = Instant::now();
        let workers = self
            .workers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (worker, stats) in workers.iter().enumerate() {
            let age = stats.heartbeat_age(now);
            if age > HEARTBEAT_STALE {
                return Err(Unhealthy::WorkerStalled { worker, age });
            }
        }
        probe(self.target(), PROBE_TIMEOUT).await
    }

    /// The `/ready` check.
    pub fn ready(&self) -> Result<(), NotReady> {
        if self.lame_duck.load(Ordering::Relaxed) {
            return Err(NotReady::LameDuck);
        }
        if !self.serving.load(Ordering::Relaxed) {
            return Err(NotReady::Starting);
        }
        match self.control.node() {
            Some(node) if !node.rules_in_place() => Err(NotReady::RulesMissing),
            _ => Ok(()),
        }
    }
}

/// A snapshot of what `/metrics` reads (a poisoned lock still holds valid sources).
fn read_sources(sources: &RwLock<Sources>) -> Sources {
    sources
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// The address to probe for listen address `listen`: itself, or loopback of its family if it
/// is the unspecified address.
fn probe_target(listen: SocketAddr) -> SocketAddr {
    let mut target = listen;
    if listen.ip().is_unspecified() {
        target.set_ip(if listen.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        });
    }
    target
}

/// `id.server.` CH TXT with ID `id`, no RD, no EDNS (RFC 4892 §2).
fn id_server_query(id: u16) -> Vec<u8> {
    let mut query = Vec::with_capacity(31);
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    query.extend_from_slice(b"\x02id\x06server\x00");
    query.extend_from_slice(&16u16.to_be_bytes());
    query.extend_from_slice(&3u16.to_be_bytes());
    query
}

/// Whether `reply` answers [`id_server_query`]`(id)`: same ID, QR=1, NOERROR, an answer
/// record carrying [`crate::dns::SERVER_ID`].
fn is_id_server_answer(reply: &[u8], id: u16) -> bool {
    let header_ok = reply.get(..2) == Some(&id.to_be_bytes()[..])
        && reply.get(2).is_some_and(|flags| flags & 0x80 != 0)
        && reply.get(3).is_some_and(|flags| flags & 0x0f == 0)
        && reply.get(6..8).is_some_and(|ancount| ancount != [0, 0]);
    let id_text = crate::dns::SERVER_ID;
    header_ok && reply.windows(id_text.len()).any(|window| window == id_text)
}

/// Sends `id.server.` CH TXT to `target` over UDP and waits up to `timeout` for its answer.
pub async fn probe(target: SocketAddr, timeout: Duration) -> Result<(), Unhealthy> {
    let io_error = |source| Unhealthy::ProbeIo { target, source };
    let local: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local).await.map_err(io_error)?;
    socket.connect(target).await.map_err(io_error)?;
    let id: u16 = rand::random();
    socket.send(&id_server_query(id)).await.map_err(io_error)?;
    let mut reply = [0u8; 512];
    let answered = tokio::time::timeout(timeout, async {
        // Each round consumes one datagram; the timeout bounds the loop.
        loop {
            let len = socket.recv(&mut reply).await?;
            if is_id_server_answer(reply.get(..len).unwrap_or_default(), id) {
                return Ok(());
            }
        }
    })
    .await;
    match answered {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(io_error(source)),
        Err(_) => Err(Unhealthy::ProbeTimeout {
            target,
            after: timeout,
        }),
    }
}

/// The running `ringdns-http` thread.
///
/// # Threads
///
/// Owned by the control start-up code. Dropping it without [`HttpServer::stop`] also ends the
/// thread, without waiting for it.
#[derive(Debug)]
pub struct HttpServer {
    /// The thread.
    thread: JoinHandle<()>,
    /// Fires (or drops) to stop it.
    stop: oneshot::Sender<()>,
}

/// What every connection of the HTTP thread shares.
#[derive(Debug)]
struct State {
    /// Health flags and checks.
    health: Arc<Health>,
    /// What `/metrics` reads; swapped by a reload that changes the metrics layout or the
    /// upstreams (write-locked by the control thread only then; read per scrape).
    sources: Arc<RwLock<Sources>>,
    /// Open connections.
    connections: Cell<usize>,
}

impl HttpServer {
    /// Starts `ringdns-http` serving each listener's [`Routes`]. Returns once its runtime is
    /// up.
    pub fn spawn(
        listeners: Vec<(std::net::TcpListener, Routes)>,
        health: Arc<Health>,
        sources: Arc<RwLock<Sources>>,
    ) -> io::Result<HttpServer> {
        for (listener, _) in &listeners {
            listener.set_nonblocking(true)?;
        }
        let (stop, stopped) = oneshot::channel();
        let (ready, started) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        let thread = std::thread::Builder::new()
            .name("ringdns-http".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let listeners = match listeners
                        .into_iter()
                        .map(|(listener, routes)| {
                            tokio::net::TcpListener::from_std(listener).map(|l| (l, routes))
                        })
                        .collect::<io::Result<Vec<_>>>()
                    {
                        Ok(listeners) => listeners,
                        Err(error) => {
                            let _ = ready.send(Err(error));
                            return;
                        }
                    };
                    let state = Rc::new(State {
                        health,
                        sources,
                        connections: Cell::new(0),
                    });
                    for (listener, routes) in listeners {
                        tokio::task::spawn_local(accept_loop(listener, routes, Rc::clone(&state)));
                    }
                    let _ = ready.send(Ok(()));
                    // An error means the handle was dropped: stop as well.
                    let _ = stopped.await;
                });
            })?;
        match started.recv() {
            Ok(Ok(())) => Ok(HttpServer { thread, stop }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("ringdns-http exited during start-up"))
            }
        }
    }

    /// Closes the listeners and connections and joins the thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            log::error!("ringdns-http panicked");
        }
    }
}

/// Releases a connection slot when the connection ends.
struct Slot(Rc<State>);

impl Drop for Slot {
    fn drop(&mut self) {
        let open = &self.0.connections;
        open.set(open.get().saturating_sub(1));
    }
}

/// Accepts connections on `listener` and serves each on its own task, up to
/// [`MAX_CONNECTIONS`] at once.
async fn accept_loop(listener: tokio::net::TcpListener, routes: Routes, state: Rc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(_) => {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if state.connections.get() >= MAX_CONNECTIONS {
            continue;
        }
        state.connections.set(state.connections.get() + 1);
        let slot = Slot(Rc::clone(&state));
        tokio::task::spawn_local(async move {
            let state = Rc::clone(&slot.0);
            let service = service_fn(move |request| {
                let state = Rc::clone(&state);
                async move { Ok::<_, Infallible>(respond(&state, routes, &request).await) }
            });
            // A failed connection (reset, timeout, garbage) only ends that connection.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// Answers one request.
async fn respond(
    state: &State,
    routes: Routes,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match request.uri().path() {
        "/health" if routes.health => {
            let started = Instant::now();
            let checked = state.health.check().await;
            let control = read_sources(&state.sources).control.clone();
            control.observe_health(started.elapsed());
            match checked {
                Ok(()) => text(StatusCode::OK, "OK".into()),
                Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
            }
        }
        "/ready" if routes.health => match state.health.ready() {
            Ok(()) => text(StatusCode::OK, "OK".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        "/metrics" if routes.metrics => {
            let mut response = text(
                StatusCode::OK,
                metrics::render(&read_sources(&state.sources), Instant::now()),
            );
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// A `text/plain` response.
fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_targets_loopback_for_unspecified_listen_addresses() {
        let v4: SocketAddr = "0.0.0.0:53".parse().expect("literal");
        assert_eq!(probe_target(v4), "127.0.0.1:53".parse().expect("literal"));
        let v6: SocketAddr = "[::]:5353".parse().expect("literal");
        assert_eq!(probe_target(v6), "[::1]:5353".parse().expect("literal"));
        let link: SocketAddr = "169.254.20.10:53".parse().expect("literal");
        assert_eq!(probe_target(link), link);
    }

    #[test]
    fn probe_query_is_answered_by_the_worker_and_recognised() {
        use crate::dns::{write_id_server, Query};
        let query = id_server_query(0x4242);
        let parsed = Query::parse(&query).expect("a valid query");
        assert!(parsed.is_id_server());
        let mut out = [0u8; 512];
        let len = write_id_server(&parsed, 1232, &mut out);
        assert!(is_id_server_answer(&out[..len], 0x4242));
        assert!(!is_id_server_answer(&out[..len], 0x4243), "wrong ID");
        assert!(!is_id_server_answer(&query, 0x4242), "a query is no answer");
        assert!(!is_id_server_answer(&[], 0x4242));
    }

    #[test]
    fn readiness_follows_serving_lame_duck_and_node_rules() {
        let control = Arc::new(ControlMetrics::default());
        let listen: SocketAddr = "127.0.0.1:53".parse().expect("literal");
        let health = Health::new(listen, Vec::new(), control);
        assert_eq!(health.ready(), Err(NotReady::Starting));
        health.set_serving();
        assert_eq!(health.ready(), Ok(()));
        let node = Arc::new(crate::control::node::NodeStats::default());
        node.rules_expected.store(12, Ordering::Relaxed);
        health.control.connect_node(node.clone());
        assert_eq!(health.ready(), Err(NotReady::RulesMissing));
        node.rules_present.store(12, Ordering::Relaxed);
        assert_eq!(health.ready(), Ok(()));
        health.enter_lame_duck();
        assert_eq!(health.ready(), Err(NotReady::LameDuck));
    }

    /// Runs `future` on a current-thread runtime.
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test runtime")
            .block_on(future)
    }

    #[test]
    fn stalled_worker_fails_health_before_any_probe() {
        // Stats created (the first beat) a minute ago and never beaten since.
        let epoch = Instant::now()
            .checked_sub(Duration::from_secs(60))
            .expect("the monotonic clock is past a minute");
        let stats = Arc::new(WorkerStats::new(Default::default(), epoch));
        let listen: SocketAddr = "127.0.0.1:9".parse().expect("literal");
        let health = Health::new(listen, vec![stats], Arc::new(ControlMetrics::default()));
        let checked = block_on(health.check());
        assert!(
            matches!(checked, Err(Unhealthy::WorkerStalled { worker: 0, age }) if age > HEARTBEAT_STALE),
            "{checked:?}"
        );
        health.enter_lame_duck();
        let checked = block_on(health.check());
        assert!(matches!(checked, Err(Unhealthy::LameDuck)), "{checked:?}");
    }

    #[test]
    fn probe_without_a_server_fails_with_a_reason() {
        // Port 9 (discard) on loopback: nothing listens, so port unreachable or silence.
        let target: SocketAddr = "127.0.0.1:9".parse().expect("literal");
        let probed = block_on(probe(target, Duration::from_millis(200)));
        assert!(
            matches!(
                probed,
                Err(Unhealthy::ProbeIo { .. } | Unhealthy::ProbeTimeout { .. })
            ),
            "{probed:?}"
        );
    }
}
