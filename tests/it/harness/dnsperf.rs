//! dnsperf (Debian's) at a fixed, bounded rate: how many queries it sent and how many got no
//! answer within its timeout.
//!
//! Runs on: the calling test's thread (or one it spawned), in that thread's network namespace.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::run_bounded;

/// 127.0.0.1:53, where `TestConfig::for_tests` listens.
pub const LOCALHOST_53: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 53);

/// Seconds dnsperf waits for an answer before it counts the query lost.
const TIMEOUT_SECS: u32 = 5;

/// What one dnsperf run reported.
#[derive(Debug)]
pub struct Run {
    /// "Queries sent".
    pub sent: u64,
    /// "Queries lost": no answer within [`TIMEOUT_SECS`].
    pub lost: u64,
    /// Its whole output, for assertion messages.
    pub stdout: String,
}

impl Run {
    /// How many answers had `rcode` ("NOERROR", "SERVFAIL", ...), from its "Response codes:"
    /// line (`NOERROR 9990 (99.90%), SERVFAIL 10 (0.10%)`); 0 if it lists none.
    pub fn rcode(&self, rcode: &str) -> u64 {
        let Some(line) = self
            .stdout
            .lines()
            .find_map(|line| line.trim_start().strip_prefix("Response codes:"))
        else {
            return 0;
        };
        line.split(',')
            .filter_map(|part| {
                let mut words = part.split_whitespace();
                (words.next()? == rcode).then(|| words.next()?.parse::<u64>().ok())?
            })
            .sum()
    }

    /// Its "Average Latency (s):" figure (`Average Latency (s):  0.000565 (min 0.000021, max
    /// 0.004193)`), in seconds.
    pub fn average_latency(&self) -> anyhow::Result<f64> {
        let line = self
            .stdout
            .lines()
            .find_map(|line| line.trim_start().strip_prefix("Average Latency (s):"))
            .with_context(|| format!("no average latency in dnsperf output:\n{}", self.stdout))?;
        let seconds = line
            .split_whitespace()
            .next()
            .with_context(|| format!("average latency {line:?}"))?;
        Ok(seconds.parse()?)
    }
}

/// Whether dnsperf is installed.
pub fn installed() -> bool {
    Command::new("dnsperf").arg("-h").output().is_ok()
}

/// Sends the `name TYPE` lines of `query_file` to `server` at `qps` queries per second for
/// `secs` seconds over 4 client sockets; bounded by the run time plus 20 s.
pub fn fixed_rate(
    server: SocketAddr,
    query_file: &Path,
    qps: u32,
    secs: u32,
) -> anyhow::Result<Run> {
    run(
        server,
        query_file,
        &["-Q", &qps.to_string(), "-l", &secs.to_string()],
        Duration::from_secs(u64::from(secs) + 20),
    )
}

/// Sends each `name TYPE` line of `query_file` to `server` once, at most `qps` queries per
/// second over 4 client sockets; bounded by `limit`.
pub fn once(
    server: SocketAddr,
    query_file: &Path,
    qps: u32,
    limit: Duration,
) -> anyhow::Result<Run> {
    run(
        server,
        query_file,
        &["-Q", &qps.to_string(), "-n", "1"],
        limit,
    )
}

/// Sends each `name TYPE` line of `query_file` to `server` once, as fast as it can with up to
/// `outstanding` queries in flight over 4 client sockets; bounded by `limit`. The sockets get
/// 208 KiB buffers (`-b`, the kernel's default cap, which it doubles): with dnsperf's default of
/// 32 KiB, hundreds of answers arriving together overflowed dnsperf's own sockets (their
/// `drops` in /proc/net/udp), and it counted those answers lost.
pub fn burst(
    server: SocketAddr,
    query_file: &Path,
    outstanding: u32,
    limit: Duration,
) -> anyhow::Result<Run> {
    run(
        server,
        query_file,
        &["-q", &outstanding.to_string(), "-b", "208", "-n", "1"],
        limit,
    )
}

/// One dnsperf run with the common flags and `extra`, bounded by `limit`.
fn run(
    server: SocketAddr,
    query_file: &Path,
    extra: &[&str],
    limit: Duration,
) -> anyhow::Result<Run> {
    let output = run_bounded(
        Command::new("dnsperf")
            .arg("-s")
            .arg(server.ip().to_string())
            .arg("-p")
            .arg(server.port().to_string())
            .args(["-c", "4", "-t"])
            .arg(TIMEOUT_SECS.to_string())
            .args(extra)
            .arg("-d")
            .arg(query_file),
        limit,
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let count = |label: &str| -> anyhow::Result<u64> {
        let line = stdout
            .lines()
            .find(|line| line.trim_start().starts_with(label))
            .with_context(|| format!("no {label:?} in dnsperf output:\n{stdout}"))?;
        line.split_whitespace()
            .nth(2)
            .with_context(|| format!("{label} N"))?
            .parse()
            .with_context(|| format!("parsing {line:?}"))
    };
    Ok(Run {
        sent: count("Queries sent:")?,
        lost: count("Queries lost:")?,
        stdout: stdout.clone(),
    })
}
