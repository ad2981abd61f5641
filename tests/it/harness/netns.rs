//! Per-test network namespaces: every server a test starts lives in a namespace it created.
//!
//! Runs on: the test thread.
//!
//! # How the isolation works (checked empirically on Linux 6.x, see `selftest.rs`)
//!
//! - `unshare(CLONE_NEWNET)` is allowed in a multi-threaded process and moves **only the calling
//!   thread** into a new namespace; the other libtest threads (and the main thread, which
//!   `/proc/self/ns/net` names) stay where they were.
//! - libtest runs every test on its own thread (also with `--test-threads=1`), so one test's
//!   namespace never leaks into another test.
//! - A child process spawned from that thread (`Command::spawn`: clone/vfork from the calling
//!   thread) inherits the **thread's** namespace, not the process leader's. So do threads the
//!   test thread spawns (`std::thread::spawn`), which is what `FaultyUpstream` relies on.
//! - The new namespace has only `lo`, and it starts DOWN. Binding 127.0.0.10:53 works even
//!   while it is down, but no packet flows until `ip link set lo up` (run as a child, so it acts
//!   on the inherited namespace). With `lo` up, all of 127.0.0.0/8 and `::1` are local.
//! - The namespace lives as long as something references it: the thread, a child, a socket.
//!   [`NetnsGuard`] moves the thread back to its original namespace on drop, so the fresh one
//!   disappears once the test's children and sockets are gone.

use std::fs::File;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::geteuid;

use super::run_bounded;

/// Where the calling thread's network namespace is visible (`/proc/self` would name the
/// process leader's, which is not ours after `unshare`).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Bound on `ip link set lo up`.
const IP_TIMEOUT: Duration = Duration::from_secs(5);

/// Proof that the current thread is in a fresh network namespace; restores the old one on drop.
///
/// # Threads
///
/// Not `Send` in spirit: it must be dropped on the thread that created it, because namespace
/// membership is per thread. Tests hold it in a local for their whole body.
#[derive(Debug)]
pub struct NetnsGuard {
    /// The test name, for messages.
    name: String,
    /// The namespace the thread was in before; `setns` target on drop.
    original: File,
    /// The inode identity of the fresh namespace, e.g. `net:[4026532177]`.
    id: String,
}

impl NetnsGuard {
    /// The test name this namespace was created for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fresh namespace's identity as shown by `readlink /proc/thread-self/ns/net`.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for NetnsGuard {
    /// Moves the thread back to its original namespace so nothing later on this thread (libtest
    /// reuses no test threads today, but may) runs inside the test's namespace.
    fn drop(&mut self) {
        if let Err(error) = setns(&self.original, CloneFlags::CLONE_NEWNET) {
            eprintln!(
                "netns {}: restoring the original namespace failed: {error}",
                self.name
            );
        }
    }
}

/// Moves the current thread into a fresh network namespace with `lo` up.
///
/// Returns `Ok(None)` after printing `SKIP <name>: <reason>` if the test cannot get one (not
/// root, or `unshare` refused, e.g. in an unprivileged container); the caller returns early.
/// Any failure after the namespace exists is an error: the machine is broken, not unsuitable.
pub fn enter_fresh(name: &str) -> anyhow::Result<Option<NetnsGuard>> {
    if !geteuid().is_root() {
        println!(
            "SKIP {name}: needs root for a network namespace (euid {})",
            geteuid()
        );
        return Ok(None);
    }
    let original = File::open(THREAD_NETNS).with_context(|| format!("opening {THREAD_NETNS}"))?;
    let before = current_id()?;
    if let Err(errno) = unshare(CloneFlags::CLONE_NEWNET) {
        println!("SKIP {name}: unshare(CLONE_NEWNET) failed: {errno}");
        return Ok(None);
    }
    // From here on the guard exists, so an early return restores the original namespace.
    let guard = NetnsGuard {
        name: name.to_owned(),
        original,
        id: current_id()?,
    };
    if guard.id == before {
        bail!("{name}: unshare(CLONE_NEWNET) succeeded but the namespace is unchanged ({before})");
    }
    let output = run_bounded(
        Command::new("ip").args(["link", "set", "lo", "up"]),
        IP_TIMEOUT,
    )
    .with_context(|| format!("{name}: bringing lo up"))?;
    if !output.status.success() {
        bail!(
            "{name}: `ip link set lo up` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(Some(guard))
}

/// The calling thread's network namespace identity, e.g. `net:[4026532177]`.
pub fn current_id() -> anyhow::Result<String> {
    let target =
        std::fs::read_link(THREAD_NETNS).with_context(|| format!("reading {THREAD_NETNS}"))?;
    Ok(target.display().to_string())
}

/// The network namespace identity of the process leader (`/proc/self/ns/net`), which `unshare`
/// on a test thread does not change.
pub fn process_id() -> anyhow::Result<String> {
    let target = std::fs::read_link("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    Ok(target.display().to_string())
}
