//! Integration-test harness: per-test network namespaces, real servers, real clients, faults.
//!
//! Runs on: the test thread (and helper threads it spawns, which share its namespace).
//!
//! Every test starts with [`enter_netns!`], which moves the test's thread into a fresh network
//! namespace (see [`netns`]). Everything the test starts afterwards — knotd ([`auth`]), ringdns
//! ([`ringdns`]), dig/kdig ([`dig`]), getent ([`getent`]), the in-process [`faulty`] upstream and
//! the `domain` [`client`] — lives in that namespace and talks only over its loopback.
//!
//! This module also holds the small process helpers the fixtures share: [`run_bounded`] (run a
//! command to completion under a deadline) and [`stop_child`] (SIGTERM, bounded wait, SIGKILL).

pub mod auth;
pub mod capture;
pub mod client;
pub mod dig;
pub mod dnsperf;
pub mod faulty;
pub mod getent;
pub mod http;
pub mod netns;
pub mod ringdns;
pub mod testdns;
pub mod zones;

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Enters a fresh network namespace for the current test, or returns `Ok(())` early on SKIP.
///
/// Expands to the [`netns::NetnsGuard`]; bind it to a named local (`let _ns = …`, not `let _ =`)
/// declared before anything else so it is dropped last. Only usable in a function returning
/// `anyhow::Result<()>`.
macro_rules! enter_netns {
    ($name:expr) => {
        match $crate::harness::netns::enter_fresh($name)? {
            Some(guard) => guard,
            None => return Ok(()),
        }
    };
}
pub(crate) use enter_netns;

/// Generates, for each named test body `fn NAME(io: Io) -> anyhow::Result<()>` in the calling
/// module, a module `NAME` with the two tests `NAME::uring` and `NAME::epoll`, so every
/// behaviour is checked on both I/O backends.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn uring() -> anyhow::Result<()> {
                super::$name($crate::harness::ringdns::Io::Uring)
            }

            #[test]
            fn epoll() -> anyhow::Result<()> {
                super::$name($crate::harness::ringdns::Io::Epoll)
            }
        }
    )*};
}
pub(crate) use backend_tests;

/// knotd with [`zones::all`] plus ringdns forwarding `.` to it: what most tests need.
#[derive(Debug)]
pub struct Stack {
    /// ringdns (declared first, so it is dropped, i.e. stopped, before knotd).
    pub dns: ringdns::Ringdns,
    /// The authoritative server.
    pub auth: auth::Authoritative,
}

impl Stack {
    /// Starts knotd on 127.0.0.10:53 and ringdns (`config` plus a forward of `.` to knotd).
    pub fn start(config: ringdns::TestConfig) -> anyhow::Result<Self> {
        let auth = auth::Authoritative::start(zones::all())?;
        let dns = ringdns::Ringdns::start(&config.forward(".", auth.addr()))?;
        Ok(Self { dns, auth })
    }

    /// [`Stack::start`] with the default test config on `io`.
    pub fn default_on(io: ringdns::Io) -> anyhow::Result<Self> {
        Self::start(ringdns::TestConfig::for_tests(io))
    }
}

/// How often bounded wait loops poll a child process or a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Runs `command` to completion with stdin closed, collecting stdout and stderr.
///
/// If it has not exited after `timeout`, it is killed by PID and an error carrying whatever it
/// printed so far is returned. A non-zero exit status is *not* an error here: callers decide.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {description}"))?;
    let stdout = child.stdout.take().context("child stdout was piped")?;
    let stderr = child.stderr.take().context("child stderr was piped")?;
    let stdout_reader = spawn_reader(stdout);
    let stderr_reader = spawn_reader(stderr);
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // The child is ours and has not been reaped, so its PID cannot have been reused.
            let _ = child.kill();
            break child.wait().context("reaping killed child")?;
        }
        thread::sleep(POLL_INTERVAL);
    };
    let stdout = stdout_reader.join().unwrap_or_default();
    let stderr = stderr_reader.join().unwrap_or_default();
    if timed_out {
        bail!(
            "{description} did not finish within {timeout:?}; stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Reads a pipe to its end on a helper thread; the pipe ends when the child (and any grandchild
/// holding it) exits, so the thread is bounded by the child's lifetime.
fn spawn_reader(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Stops a child we started: SIGTERM, wait up to `grace`, then SIGKILL and reap.
///
/// Returns the exit status. Signals go to the child's PID only (never a name or a group). Safe
/// to call on an already exited child: `try_wait` reaps it first, so a recycled PID is never
/// signalled.
pub fn stop_child(child: &mut Child, grace: Duration) -> anyhow::Result<ExitStatus> {
    if let Some(status) = child.try_wait().context("polling child")? {
        return Ok(status);
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).context("PID fits in i32")?);
    // ESRCH cannot happen (not reaped yet); any other error falls through to SIGKILL below.
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("polling child")? {
            return Ok(status);
        }
        thread::sleep(POLL_INTERVAL);
    }
    let _ = child.kill();
    child.wait().context("reaping child after SIGKILL")
}

/// Polls `condition` every `interval` until it returns `Ok(Some(_))`, at most `timeout` long.
///
/// Bounded in time by `timeout` and in count by `timeout / interval + 1` attempts. Returns the
/// last error (or "timed out") if the condition never held.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut condition: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let max_attempts = timeout.as_millis() / interval.as_millis().max(1) + 1;
    let mut last_error = None;
    for _ in 0..max_attempts {
        match condition() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(interval);
    }
    match last_error {
        Some(error) => Err(error.context(format!("{what}: not true within {timeout:?}"))),
        None => bail!("{what}: not true within {timeout:?}"),
    }
}
