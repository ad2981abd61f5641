//! glibc as a real client: `getent ahosts NAME` with a test resolv.conf bind-mounted over
//! /etc/resolv.conf in a private mount namespace (`unshare -m`).
//!
//! Runs on: the test thread (unshare/getent are children in the test's network namespace).
//!
//! glibc always talks to port 53, so ringdns must listen on 127.0.0.1:53 in the test's
//! namespace (each test has its own, so that is free).

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::run_bounded;

/// Bound on one getent run (`attempts:1 timeout:2`, A and AAAA in parallel).
const GETENT_TIMEOUT: Duration = Duration::from_secs(15);

/// A resolv.conf for the test.
#[derive(Debug, Clone)]
pub struct ResolvConf {
    /// `nameserver` lines.
    pub nameservers: Vec<IpAddr>,
    /// The `search` list (empty: none).
    pub search: Vec<String>,
    /// `options` (default `attempts:1 timeout:2`).
    pub options: Vec<String>,
}

impl ResolvConf {
    /// `nameserver 127.0.0.1`, no search list, `options attempts:1 timeout:2`.
    pub fn loopback() -> Self {
        Self {
            nameservers: vec![IpAddr::from([127, 0, 0, 1])],
            search: Vec::new(),
            options: vec!["attempts:1".into(), "timeout:2".into()],
        }
    }

    /// Adds the pod search list `default.svc.cluster.local svc.cluster.local cluster.local`
    /// and `ndots:5`, as kubelet writes it.
    pub fn pod_search(mut self) -> Self {
        self.search = [
            "default.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ]
        .map(str::to_owned)
        .to_vec();
        self.options.push("ndots:5".into());
        self
    }

    /// The file text.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for server in &self.nameservers {
            text.push_str(&format!("nameserver {server}\n"));
        }
        if !self.search.is_empty() {
            text.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        if !self.options.is_empty() {
            text.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        text
    }
}

/// What `getent ahosts` printed.
#[derive(Debug, Clone)]
pub struct Ahosts {
    /// Exit code (0 found, 2 not found).
    pub code: Option<i32>,
    /// Distinct addresses, sorted.
    pub addrs: Vec<IpAddr>,
    /// The canonical name glibc printed on the first line, if any.
    pub canonical: Option<String>,
    /// stdout, for messages.
    pub raw: String,
}

/// Runs `program args…` with `resolv` bind-mounted over /etc/resolv.conf in a private mount
/// namespace, bounded by `timeout`.
pub fn with_resolv_conf(
    resolv: &ResolvConf,
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> anyhow::Result<std::process::Output> {
    let dir = tempfile::Builder::new()
        .prefix("ringdns-resolv")
        .tempdir()?;
    let path = dir.path().join("resolv.conf");
    std::fs::write(&path, resolv.text())?;
    let mut command = Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#)
        .arg("sh")
        .arg(&path)
        .arg(program)
        .args(args);
    run_bounded(&mut command, timeout)
}

/// `getent ahosts name` through the servers in `resolv`.
pub fn ahosts(name: &str, resolv: &ResolvConf) -> anyhow::Result<Ahosts> {
    let output = with_resolv_conf(resolv, "getent", &["ahosts", name], GETENT_TIMEOUT)
        .with_context(|| format!("getent ahosts {name}"))?;
    let raw = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut addrs: Vec<IpAddr> = Vec::new();
    let mut canonical = None;
    for line in raw.lines() {
        let mut parts = line.split_whitespace();
        if let Some(addr) = parts.next().and_then(|a| a.parse().ok()) {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if canonical.is_none() {
            canonical = parts.nth(1).map(str::to_owned);
        }
    }
    addrs.sort();
    if output.status.code() != Some(0) && output.status.code() != Some(2) {
        anyhow::bail!(
            "getent ahosts {name}: {}; stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(Ahosts {
        code: output.status.code(),
        addrs,
        canonical,
        raw,
    })
}
