//! ringdns: a node-local DNS cache with one pinned io_uring worker per core.
//!
//! Runs on: any (module tree and the top-level [`run`]).
//!
//! # Architecture
//!
//! ```text
//! client ─UDP/TCP─▶ worker N [recv ▸ handler ▸ shard N] ─hit─▶ reply
//!                     │ │ miss, UDP zone (io_uring): the worker's own ring ⇄ upstream;
//!                     │ │ the worker caches the answer, answers all coalesced waiters
//!                     │ miss, TCP zone, TC=1 retry, epoll:   ▲ answer: per-worker channel +
//!                     ▼ bounded crossbeam                    │ ring wake-up
//!                   control [route zone ▸ pooled TCP/UDP conns ▸ upstream]
//! ```
//!
//! - [`worker`]: the data plane. One thread per CPU of the affinity mask, pinned, each with its
//!   own `SO_REUSEPORT` UDP socket and TCP listener per listen address, its own io_uring (or, where
//!   io_uring is unavailable, a current-thread epoll runtime) and its own [`cache::Shard`].
//!   Workers share nothing: no locks and no atomics written by another thread on the hit path.
//! - [`worker::upstream`]: a worker's own UDP exchanges with the upstreams of `udp` zones, on its
//!   ring (io_uring backend): a UDP miss never leaves the worker's core.
//! - [`upstream`]: the control thread's forwarding side, for everything else (`tcp` and
//!   `prefer_udp` zones, TCP retries of truncated answers, the epoll backend). Misses arrive over
//!   a bounded crossbeam channel; answers go back over each worker's own channel plus an eventfd
//!   wake-up. TCP connections to an upstream are pooled and pipelined across workers.
//! - [`control`]: start-up order, signals, live reload (SIGHUP or a config file change),
//!   worker supervision (a worker that panics is restarted in place on its own sockets),
//!   shutdown.
//! - [`dns`] (the only module that imports `domain`), [`cache`] and [`worker::handler`] are
//!   pure: no I/O, no clock; time comes in as `now`.

pub mod cache;
pub mod config;
pub mod control;
pub mod dns;
pub mod health;
pub mod metrics;
pub mod upstream;
pub mod worker;

pub use control::{run, Shutdown};
