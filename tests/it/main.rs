//! Black-box integration tests: real knotd, the real ringdns binary, real clients (dig, glibc,
//! Go, a `domain` client), faults from an in-process upstream. See STYLE.md §9.
//!
//! Runs on: libtest threads; every test first moves its thread into a fresh network namespace
//! (`enter_netns!`) and sends traffic only over that namespace's loopback.
//!
//! Tests that exercise ringdns run on both I/O backends (`NAME::uring`, `NAME::epoll`).
//! `fixtures` and `selftest` check the harness itself and do not need the binary to work.

/// `pub` so its items count as this crate's API: fixtures keep helpers that only some tests
/// use, without dead-code or `unreachable_pub` noise.
pub mod harness;

mod answers;
mod badinput;
mod cache;
mod cli;
mod clients;
mod edns;
mod faults;
mod fixtures;
mod handover;
mod lifecycle;
mod node;
mod observability;
mod pacing;
mod reload;
mod selftest;
mod supervise;
