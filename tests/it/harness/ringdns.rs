//! The real binary under test: `ringdns run --config PATH`, started and stopped by PID.
//!
//! Runs on: the test thread (ringdns is a child in the test's network namespace).

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tempfile::TempDir;

use super::capture::Lines;
use super::stop_child;

/// The binary Cargo built for this test run.
pub const BINARY: &str = env!("CARGO_BIN_EXE_ringdns");
/// Bound on ringdns printing its `ready` line.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on ringdns exiting after SIGTERM before it is killed (and the test fails).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `server.io`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// io_uring.
    Uring,
    /// epoll.
    Epoll,
}

impl fmt::Display for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uring => "uring",
            Self::Epoll => "epoll",
        })
    }
}

/// One `[[forward]]` entry.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Zone, e.g. `cluster.local` or `.`.
    pub zone: String,
    /// Upstream addresses.
    pub upstreams: Vec<SocketAddr>,
    /// `udp`, `tcp` or `prefer_udp`.
    pub transport: String,
    /// e.g. `2s`.
    pub timeout: String,
}

/// A ringdns config for a test; [`TestConfig::to_toml`] writes it out.
#[derive(Debug, Clone)]
pub struct TestConfig {
    /// `server.listen`.
    pub listen: Vec<SocketAddr>,
    /// `server.io`.
    pub io: Io,
    /// `server.workers`.
    pub workers: usize,
    /// `server.udp_payload`, if set.
    pub udp_payload: Option<u16>,
    /// `server.tcp_idle_timeout`, if set.
    pub tcp_idle_timeout: Option<String>,
    /// More `[server]` keys to set (key, TOML value text), e.g. `("batch_wait", "\"0s\"")`.
    pub server: Vec<(String, String)>,
    /// `[cache]` keys to set (key, TOML value text), e.g. `("success_ttl", "\"30s\"")`.
    pub cache: Vec<(String, String)>,
    /// `[[forward]]` entries.
    pub forward: Vec<Forward>,
    /// `log.level`.
    pub log_level: String,
    /// `health.lameduck`, if set (`for_tests`: `"0s"`, so stopping a test's ringdns is quick).
    pub lameduck: Option<String>,
    /// `health.listen`, if set (default: the first listen IP, port 8080).
    pub health_listen: Option<String>,
    /// `metrics.listen`, if set (default `0.0.0.0:9253`; `""` = off).
    pub metrics_listen: Option<String>,
    /// `[node]` keys to set (key, TOML value text), e.g. `("setup_interface", "true")`.
    pub node: Vec<(String, String)>,
    /// Environment variables for the process (not part of the config file).
    pub env: Vec<(String, String)>,
}

impl TestConfig {
    /// Listens on 127.0.0.1:53 and [::1]:53 with 2 workers on `io`; no forward zones yet.
    pub fn for_tests(io: Io) -> Self {
        Self {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 53)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 53)),
            ],
            io,
            workers: 2,
            udp_payload: None,
            tcp_idle_timeout: None,
            server: Vec::new(),
            cache: Vec::new(),
            forward: Vec::new(),
            log_level: "info".into(),
            lameduck: Some("0s".into()),
            health_listen: None,
            metrics_listen: None,
            node: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets a `[node]` key to a TOML value text (`"true"`, `"\"1s\""`).
    pub fn node_key(mut self, key: &str, value: &str) -> Self {
        self.node.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets `health.lameduck`, e.g. `"3s"`.
    pub fn lameduck(mut self, lameduck: &str) -> Self {
        self.lameduck = Some(lameduck.to_owned());
        self
    }

    /// Forwards `zone` to `upstream` over UDP with a 2 s timeout.
    pub fn forward(self, zone: &str, upstream: SocketAddr) -> Self {
        self.forward_with(zone, &[upstream], "udp", "2s")
    }

    /// Adds a `[[forward]]` entry.
    pub fn forward_with(
        mut self,
        zone: &str,
        upstreams: &[SocketAddr],
        transport: &str,
        timeout: &str,
    ) -> Self {
        self.forward.push(Forward {
            zone: zone.to_owned(),
            upstreams: upstreams.to_vec(),
            transport: transport.to_owned(),
            timeout: timeout.to_owned(),
        });
        self
    }

    /// Sets `server.listen`.
    pub fn listen(mut self, listen: &[SocketAddr]) -> Self {
        self.listen = listen.to_vec();
        self
    }

    /// Sets `server.workers`.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Sets `server.udp_payload`.
    pub fn udp_payload(mut self, bytes: u16) -> Self {
        self.udp_payload = Some(bytes);
        self
    }

    /// Sets a `[server]` key to a TOML value text (`"1024"`, `"\"0s\""`).
    pub fn server_key(mut self, key: &str, value: &str) -> Self {
        self.server.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets a `[cache]` key to a string value such as `"5s"`.
    pub fn cache_str(mut self, key: &str, value: &str) -> Self {
        self.cache.push((key.to_owned(), format!("{value:?}")));
        self
    }

    /// Sets a `[cache]` key to an integer value.
    pub fn cache_int(mut self, key: &str, value: u64) -> Self {
        self.cache.push((key.to_owned(), value.to_string()));
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let listen: Vec<String> = self.listen.iter().map(|a| format!("\"{a}\"")).collect();
        let mut text = format!(
            "[server]\nlisten = [{}]\nworkers = {}\nio = \"{}\"\n",
            listen.join(", "),
            self.workers,
            self.io
        );
        if let Some(bytes) = self.udp_payload {
            let _ = writeln!(text, "udp_payload = {bytes}");
        }
        if let Some(timeout) = &self.tcp_idle_timeout {
            let _ = writeln!(text, "tcp_idle_timeout = \"{timeout}\"");
        }
        for (key, value) in &self.server {
            let _ = writeln!(text, "{key} = {value}");
        }
        if !self.cache.is_empty() {
            text.push_str("\n[cache]\n");
            for (key, value) in &self.cache {
                let _ = writeln!(text, "{key} = {value}");
            }
        }
        for forward in &self.forward {
            let upstreams: Vec<String> = forward
                .upstreams
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect();
            let _ = write!(
                text,
                "\n[[forward]]\nzone = \"{}\"\nupstreams = [{}]\ntransport = \"{}\"\ntimeout = \"{}\"\n",
                forward.zone,
                upstreams.join(", "),
                forward.transport,
                forward.timeout
            );
        }
        let _ = write!(text, "\n[log]\nlevel = \"{}\"\n", self.log_level);
        if self.lameduck.is_some() || self.health_listen.is_some() {
            text.push_str("\n[health]\n");
            if let Some(listen) = &self.health_listen {
                let _ = writeln!(text, "listen = {listen:?}");
            }
            if let Some(lameduck) = &self.lameduck {
                let _ = writeln!(text, "lameduck = {lameduck:?}");
            }
        }
        if let Some(listen) = &self.metrics_listen {
            let _ = write!(text, "\n[metrics]\nlisten = {listen:?}\n");
        }
        if !self.node.is_empty() {
            text.push_str("\n[node]\n");
            for (key, value) in &self.node {
                let _ = writeln!(text, "{key} = {value}");
            }
        }
        text
    }
}

/// What the `ready` line said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The whole line.
    pub line: String,
    /// `udp=` addresses.
    pub udp: Vec<SocketAddr>,
    /// `tcp=` addresses.
    pub tcp: Vec<SocketAddr>,
    /// `workers=`.
    pub workers: usize,
    /// `io=`: the backend actually in use.
    pub io: String,
    /// `metrics=`: the metrics endpoint (`None` for `off` or when absent).
    pub metrics: Option<SocketAddr>,
    /// `health=`: the health endpoint, if the line has one.
    pub health: Option<SocketAddr>,
}

impl Ready {
    /// Parses `… ready udp=A,B tcp=A,B workers=N io=uring metrics=ADDR|off health=ADDR …`
    /// (other `key=value`s ignored).
    pub fn parse(line: &str) -> anyhow::Result<Self> {
        let rest = &line[line.find("ready udp=").context("no `ready udp=`")? + "ready ".len()..];
        let mut ready = Self {
            line: line.to_owned(),
            udp: Vec::new(),
            tcp: Vec::new(),
            workers: 0,
            io: String::new(),
            metrics: None,
            health: None,
        };
        let addrs = |value: &str| -> anyhow::Result<Vec<SocketAddr>> {
            value
                .split(',')
                .map(|a| a.parse().with_context(|| format!("address {a:?}")))
                .collect()
        };
        for part in rest.split_whitespace() {
            let Some((key, value)) = part.split_once('=') else {
                continue;
            };
            match key {
                "udp" => ready.udp = addrs(value)?,
                "tcp" => ready.tcp = addrs(value)?,
                "workers" => ready.workers = value.parse().context("workers=")?,
                "io" => ready.io = value.to_owned(),
                "metrics" if value == "off" => ready.metrics = None,
                "metrics" => ready.metrics = Some(value.parse().context("metrics=")?),
                "health" => ready.health = Some(value.parse().context("health=")?),
                _ => {}
            }
        }
        if ready.udp.is_empty() || ready.tcp.is_empty() || ready.io.is_empty() {
            bail!("incomplete ready line: {line}");
        }
        Ok(ready)
    }
}

/// A running ringdns; SIGTERM by PID on [`Ringdns::stop`] or drop.
#[derive(Debug)]
pub struct Ringdns {
    /// The process; `None` once stopped or killed.
    child: Option<Child>,
    /// The parsed ready line.
    ready: Ready,
    /// stderr lines (the log).
    stderr: Lines,
    /// The config file's directory; removed on drop.
    dir: TempDir,
}

impl Ringdns {
    /// Writes `config`, starts ringdns and waits for its ready line.
    pub fn start(config: &TestConfig) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ringdns-test").tempdir()?;
        let path = dir.path().join("ringdns.toml");
        std::fs::write(&path, config.to_toml())?;
        let mut child = Command::new(BINARY)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .envs(config.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {BINARY}"))?;
        let stderr = Lines::capture(child.stderr.take().context("stderr was piped")?);
        let line = stderr.wait_for_line(READY_TIMEOUT, |line| line.contains("ready udp="));
        let ready = match line.map(|line| Ready::parse(&line)) {
            Some(Ok(ready)) => ready,
            other => {
                let status = stop_child(&mut child, Duration::from_secs(2))?;
                let why = match other {
                    Some(Err(error)) => format!("{error:#}"),
                    _ => format!("no ready line within {READY_TIMEOUT:?}"),
                };
                bail!(
                    "ringdns did not become ready ({why}); exit {status}\nconfig:\n{}\nstderr:\n{}",
                    config.to_toml(),
                    stderr.text()
                );
            }
        };
        Ok(Self {
            child: Some(child),
            ready,
            stderr,
            dir,
        })
    }

    /// The ready line.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// The first IPv4 UDP listen address.
    pub fn udp(&self) -> SocketAddr {
        pick(&self.ready.udp, true)
    }

    /// The first IPv6 UDP listen address (or the first one if there is none).
    pub fn udp6(&self) -> SocketAddr {
        pick(&self.ready.udp, false)
    }

    /// The first IPv4 TCP listen address.
    pub fn tcp(&self) -> SocketAddr {
        pick(&self.ready.tcp, true)
    }

    /// The first IPv6 TCP listen address (or the first one if there is none).
    pub fn tcp6(&self) -> SocketAddr {
        pick(&self.ready.tcp, false)
    }

    /// The metrics endpoint from the ready line.
    pub fn metrics(&self) -> anyhow::Result<SocketAddr> {
        self.ready
            .metrics
            .context("ready line has no metrics= address")
    }

    /// The health endpoint from the ready line.
    pub fn health(&self) -> anyhow::Result<SocketAddr> {
        self.ready
            .health
            .context("ready line has no health= address")
    }

    /// Sends SIGTERM by PID and returns at once (for lame-duck tests; [`Ringdns::stop`] then
    /// waits for the exit and checks it is 0).
    pub fn sigterm(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_mut().context("ringdns already stopped")?;
        if child.try_wait()?.is_some() {
            bail!("ringdns already exited; stderr:\n{}", self.stderr.text());
        }
        // Not reaped (checked just above), so the PID is still ours.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).context("PID fits i32")?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("SIGTERM")?;
        Ok(())
    }

    /// Sends SIGHUP by PID (reload) and returns at once.
    pub fn sighup(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_mut().context("ringdns already stopped")?;
        if child.try_wait()?.is_some() {
            bail!("ringdns already exited; stderr:\n{}", self.stderr.text());
        }
        // Not reaped (checked just above), so the PID is still ours.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).context("PID fits i32")?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).context("SIGHUP")?;
        Ok(())
    }

    /// The config file ringdns was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ringdns.toml")
    }

    /// Replaces the config file with `text` in one step (write a sibling, rename over it), so
    /// ringdns' file watch never reads a half-written file.
    pub fn rewrite_config_text(&self, text: &str) -> anyhow::Result<()> {
        let staged = self.dir.path().join("ringdns.toml.new");
        std::fs::write(&staged, text).with_context(|| format!("writing {}", staged.display()))?;
        std::fs::rename(&staged, self.config_path()).context("renaming the new config")?;
        Ok(())
    }

    /// Replaces the config file with `config` (see [`Ringdns::rewrite_config_text`]).
    pub fn rewrite_config(&self, config: &TestConfig) -> anyhow::Result<()> {
        self.rewrite_config_text(&config.to_toml())
    }

    /// Everything ringdns logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// The directory holding the config file.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// SIGTERM by PID; it must exit 0 within the grace period.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = stop_child(&mut child, STOP_GRACE)?;
        // The reader thread may still be copying the last lines (the exit log) out of the
        // pipe: callers read the log right after this (a race seen once in CI).
        self.stderr.wait_closed(STOP_GRACE);
        check_exit(status, &self.stderr)
    }

    /// SIGKILL by PID (no cleanup), and reap it.
    pub fn kill9(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("ringdns already stopped")?;
        // Not reaped yet, so the PID is still ours.
        child.kill().context("SIGKILL")?;
        child.wait().context("reaping ringdns")
    }

    /// CPU time (user + system, all threads) the process has used so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let child = self.child.as_ref().context("ringdns already stopped")?;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))?;
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(") ").context("/proc/PID/stat format")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields
            .get(11..13)
            .context("utime and stime present")?
            .iter()
            .map(|field| field.parse::<u64>())
            .sum::<Result<u64, _>>()?;
        let hz =
            nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("CLK_TCK known")?;
        let hz = u64::try_from(hz)?.max(1);
        Ok(Duration::from_millis(ticks * 1000 / hz))
    }

    /// The value of `field` in /proc/PID/`file` (`status`, `smaps_rollup`, `task/TID/status`:
    /// `Name: value` lines), `None` if it has no such line.
    fn proc_field(&self, file: &str, field: &str) -> anyhow::Result<Option<String>> {
        let child = self.child.as_ref().context("ringdns already stopped")?;
        let text = std::fs::read_to_string(format!("/proc/{}/{file}", child.id()))?;
        Ok(text.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name == field).then(|| value.trim().to_owned())
        }))
    }

    /// `field` of /proc/PID/`file`, which gives it in kB, in bytes.
    fn proc_bytes(&self, file: &str, field: &str) -> anyhow::Result<u64> {
        let value = self
            .proc_field(file, field)?
            .with_context(|| format!("{field} in /proc/PID/{file}"))?;
        let kib = value
            .strip_suffix("kB")
            .with_context(|| format!("{field} {value:?}"))?
            .trim()
            .parse::<u64>()?;
        Ok(kib * 1024)
    }

    /// The value of `field` in /proc/PID/status (`None` if this kernel has no such line).
    pub fn status_field(&self, field: &str) -> anyhow::Result<Option<String>> {
        self.proc_field("status", field)
    }

    /// Voluntary context switches of the worker threads (`ringdns-w*`) so far, summed: each is
    /// a sleep, so one per wake-up.
    pub fn worker_voluntary_switches(&self) -> anyhow::Result<u64> {
        let child = self.child.as_ref().context("ringdns already stopped")?;
        let mut total = 0;
        let mut workers = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", child.id()))? {
            let tid = task?.file_name();
            let status = format!("task/{}/status", tid.to_string_lossy());
            // Other threads (io_uring's `iou-wrk-*`) come and go meanwhile.
            let name = match self.proc_field(&status, "Name") {
                Ok(name) => name,
                Err(error) if is_not_found(&error) => continue,
                Err(error) => return Err(error),
            };
            if !name.is_some_and(|name| name.starts_with("ringdns-w")) {
                continue;
            }
            let switches = self
                .proc_field(&status, "voluntary_ctxt_switches")?
                .context("voluntary_ctxt_switches in /proc/PID/task/TID/status")?;
            total += switches.parse::<u64>()?;
            workers += 1;
        }
        anyhow::ensure!(workers > 0, "no ringdns-w* thread in /proc/PID/task");
        Ok(total)
    }

    /// Anonymous memory backed by transparent huge pages now (`AnonHugePages` of
    /// /proc/PID/smaps_rollup), in bytes.
    pub fn anon_huge_pages(&self) -> anyhow::Result<u64> {
        self.proc_bytes("smaps_rollup", "AnonHugePages")
    }

    /// The process's resident set size now (`VmRSS` of /proc/PID/status), in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        self.proc_bytes("status", "VmRSS")
    }

    /// Whether the process is still running. Once it has exited, its last lines are in
    /// [`Ringdns::stderr`] before this says so.
    pub fn is_running(&mut self) -> bool {
        let running = match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        };
        if !running {
            self.stderr.wait_closed(STOP_GRACE);
        }
        running
    }
}

/// The first address of the wanted family, else the first address.
fn pick(addrs: &[SocketAddr], v4: bool) -> SocketAddr {
    addrs
        .iter()
        .copied()
        .find(|a| a.is_ipv4() == v4)
        .or_else(|| addrs.first().copied())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 53)))
}

/// A clean shutdown is exit status 0.
fn check_exit(status: ExitStatus, stderr: &Lines) -> anyhow::Result<()> {
    if !status.success() {
        bail!(
            "ringdns exited with {status} after SIGTERM (want 0); stderr:\n{}",
            stderr.text()
        );
    }
    Ok(())
}

impl Drop for Ringdns {
    /// Stops ringdns and prints its log (libtest shows it only for failing tests). A bad exit
    /// is printed, not raised: tests that care call [`Ringdns::stop`] themselves.
    fn drop(&mut self) {
        let stopped = self.stop();
        eprintln!(
            "--- ringdns stderr ---\n{}\n--- end ringdns ---",
            self.stderr.text()
        );
        if let Err(error) = stopped {
            eprintln!("{error:#}");
        }
    }
}

/// Runs `ringdns ARGS…` to completion (bounded), e.g. `check --config PATH` or `--version`.
pub fn run_cli(args: &[&str]) -> anyhow::Result<std::process::Output> {
    super::run_bounded(Command::new(BINARY).args(args), Duration::from_secs(10))
}

/// Whether `error` is a file that does not exist (any more).
fn is_not_found(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|error| error.kind() == std::io::ErrorKind::NotFound)
}
