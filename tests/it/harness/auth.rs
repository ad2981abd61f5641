//! The real authoritative server: knotd on loopback, serving generated zones.
//!
//! Runs on: the test thread (knotd is a child process in the test's network namespace).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use super::capture::Lines;
use super::zones::Zone;
use super::{run_bounded, stop_child, wait_for};

/// The knotd binary (Debian package `knot`).
const KNOTD: &str = "/usr/sbin/knotd";
/// Where knotd listens unless told otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.10:53";
/// Bound on knotd loading its zones and answering the first SOA query.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on knotd exiting after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running knotd; stopped (by PID) on [`Authoritative::stop`] or drop.
#[derive(Debug)]
pub struct Authoritative {
    /// The knotd process; `None` once stopped.
    child: Option<Child>,
    /// Where it listens (UDP and TCP).
    addr: SocketAddr,
    /// knotd's stderr (its log), for failure reports.
    stderr: Lines,
    /// Config, zone files, rundir and databases; removed on drop.
    _dir: TempDir,
}

impl Authoritative {
    /// Starts knotd on [`DEFAULT_ADDR`] serving `zones` (a [`Zone`] or a `Vec` of them).
    pub fn start(zones: impl Into<Vec<Zone>>) -> anyhow::Result<Self> {
        Self::start_on(zones, DEFAULT_ADDR.parse().context("default address")?)
    }

    /// Starts knotd on `addr` serving `zones`, and waits until it answers the first zone's SOA.
    pub fn start_on(zones: impl Into<Vec<Zone>>, addr: SocketAddr) -> anyhow::Result<Self> {
        let zones = zones.into();
        let first = zones.first().context("at least one zone")?.origin.clone();
        let dir = tempfile::Builder::new().prefix("ringdns-knot").tempdir()?;
        for sub in ["run", "db", "zones"] {
            std::fs::create_dir(dir.path().join(sub))?;
        }
        for zone in &zones {
            let path = dir
                .path()
                .join("zones")
                .join(format!("{}zone", zone.origin));
            std::fs::write(&path, &zone.text).with_context(|| format!("writing {path:?}"))?;
        }
        let config = dir.path().join("knot.conf");
        std::fs::write(&config, knot_config(dir.path(), addr, &zones))?;
        let mut child = Command::new(KNOTD)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {KNOTD}"))?;
        let stderr = Lines::capture(child.stderr.take().context("stderr was piped")?);
        let mut auth = Self {
            child: Some(child),
            addr,
            stderr,
            _dir: dir,
        };
        if let Err(error) = auth.wait_ready(&first) {
            let _ = auth.stop();
            return Err(error.context(format!("knotd stderr:\n{}", auth.stderr.text())));
        }
        Ok(auth)
    }

    /// Polls with kdig until knotd answers `origin SOA` authoritatively (or exits, or times out).
    fn wait_ready(&mut self, origin: &str) -> anyhow::Result<()> {
        let server = format!("@{}", self.addr.ip());
        let port = self.addr.port().to_string();
        wait_for(
            "knotd answers SOA",
            START_TIMEOUT,
            Duration::from_millis(50),
            || {
                if let Some(child) = self.child.as_mut() {
                    if let Some(status) = child.try_wait()? {
                        bail!("knotd exited early: {status}");
                    }
                }
                let output = run_bounded(
                    Command::new("kdig").args([
                        server.as_str(),
                        "-p",
                        &port,
                        "SOA",
                        origin,
                        "+retry=0",
                        "+timeout=1",
                        "+short",
                    ]),
                    Duration::from_secs(5),
                )?;
                let text = String::from_utf8_lossy(&output.stdout);
                Ok((output.status.success() && text.contains("hostmaster")).then_some(()))
            },
        )
    }

    /// Where knotd listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// knotd's log so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Stops knotd (SIGTERM by PID, then SIGKILL after a grace period). Idempotent.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = stop_child(&mut child, STOP_GRACE)?;
            if !status.success() {
                bail!(
                    "knotd exited with {status}; stderr:\n{}",
                    self.stderr.text()
                );
            }
            // knotd closes its sockets on exit; the port is free again for a restart.
        }
        Ok(())
    }
}

impl Drop for Authoritative {
    /// Stops knotd and prints its log.
    fn drop(&mut self) {
        let stopped = self.stop();
        // libtest shows this only for failing tests.
        eprintln!(
            "--- knotd stderr ---\n{}\n--- end knotd ---",
            self.stderr.text()
        );
        if let Err(error) = stopped {
            eprintln!("stopping knotd: {error:#}");
        }
    }
}

/// The knotd configuration: everything under `dir`, logging to stderr, zones read-only.
fn knot_config(dir: &Path, addr: SocketAddr, zones: &[Zone]) -> String {
    let dir = dir.display();
    let mut config = format!(
        "server:\n    rundir: \"{dir}/run\"\n    user: root:root\n    \
         listen: {ip}@{port}\n    udp-workers: 2\n    tcp-workers: 2\n    \
         background-workers: 1\n\
         log:\n  - target: stderr\n    any: info\n\
         database:\n    storage: \"{dir}/db\"\n\
         template:\n  - id: default\n    storage: \"{dir}/zones\"\n    \
         file: \"%s.zone\"\n    zonefile-sync: -1\n    journal-content: none\n    \
         semantic-checks: off\n\
         zone:\n",
        ip = addr.ip(),
        port = addr.port(),
    );
    for zone in zones {
        let _ = writeln!(config, "  - domain: {}", zone.origin);
    }
    config
}
