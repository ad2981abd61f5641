//! The Go load client `perf/testdns` (Go standard library resolver), built once per test run.
//!
//! Runs on: the test thread (go build and testdns are children).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context};

use super::getent::{with_resolv_conf, ResolvConf};
use super::run_bounded;

/// Bound on `go build` (std lib only, no downloads).
const BUILD_TIMEOUT: Duration = Duration::from_secs(180);

/// The counters testdns prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// `request count：N`.
    pub requests: u64,
    /// `error count：N`.
    pub errors: u64,
}

/// Builds `perf/testdns` into Cargo's test scratch dir once; returns the binary's path.
pub fn binary() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|error| format!("{error:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `go build -o TMP/testdns .` in `perf/testdns`, offline.
fn build() -> anyhow::Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("perf/testdns");
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("testdns");
    std::fs::create_dir_all(&scratch)?;
    let out = scratch.join("testdns");
    let output = run_bounded(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&source)
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .env("GOCACHE", scratch.join("gocache"))
            .env("GOPATH", scratch.join("gopath")),
        BUILD_TIMEOUT,
    )?;
    if !output.status.success() {
        bail!(
            "go build in {source:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(out)
}

/// Runs testdns for `seconds` with `concurrency` goroutines resolving `host` via `server`
/// (with a loopback-only resolv.conf bind-mounted, so nothing reads the host's).
pub fn run(
    server: std::net::SocketAddr,
    host: &str,
    concurrency: u32,
    seconds: u32,
) -> anyhow::Result<(Summary, String)> {
    let binary = binary()?;
    let server = server.to_string();
    let concurrency = concurrency.to_string();
    let seconds_arg = seconds.to_string();
    let binary = binary.to_str().context("UTF-8 path")?;
    // Each lookup has a 30 s deadline; the run ends at most ~30 s after -d.
    let output = with_resolv_conf(
        &ResolvConf::loopback(),
        binary,
        &[
            "-server",
            &server,
            "-host",
            host,
            "-c",
            &concurrency,
            "-d",
            &seconds_arg,
            "-l",
            "0",
        ],
        Duration::from_secs(u64::from(seconds) + 45),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let field = |label: &str| -> anyhow::Result<u64> {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(label))
            .with_context(|| format!("no `{label}` line in testdns output:\n{stdout}{stderr}"))?;
        let value = line.rsplit('：').next().unwrap_or("").trim();
        value.parse().with_context(|| format!("parsing {line:?}"))
    };
    let summary = Summary {
        requests: field("request count")?,
        errors: field("error count")?,
    };
    Ok((summary, format!("{stdout}{stderr}")))
}
