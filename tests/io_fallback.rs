//! `io = "auto"` falls back to epoll with one warning where io_uring is forbidden, and
//! `io = "uring"` then fails at start-up naming the reason, instead of crashing.
//!
//! Runs on: the test thread. Its own test binary on purpose: it forbids io_uring for the whole
//! machine for a moment (`kernel.io_uring_disabled = 2`, Linux 6.6+), and cargo runs test
//! binaries one after another, so no other ringdns test runs meanwhile. The previous value is
//! restored on drop, also when an assertion fails.
//!
//! ringdns runs in its own network namespace (`unshare -n`), queried through `nsenter`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};

/// The sysctl that forbids io_uring (0 allowed, 1 unprivileged forbidden, 2 forbidden).
const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";

/// Restores `kernel.io_uring_disabled` when dropped.
struct Forbidden {
    /// The value before the test.
    previous: String,
}

impl Forbidden {
    /// Forbids io_uring machine-wide; `None` (after printing SKIP) where the knob is missing
    /// or not writable.
    fn new() -> Option<Forbidden> {
        let Ok(previous) = std::fs::read_to_string(IO_URING_DISABLED) else {
            println!("SKIP io_fallback: {IO_URING_DISABLED} does not exist (Linux < 6.6)");
            return None;
        };
        if std::fs::write(IO_URING_DISABLED, "2").is_err() {
            println!("SKIP io_fallback: cannot write {IO_URING_DISABLED} (not root?)");
            return None;
        }
        Some(Forbidden { previous })
    }
}

impl Drop for Forbidden {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(IO_URING_DISABLED, self.previous.trim()) {
            eprintln!("could not restore {IO_URING_DISABLED}: {error}");
        }
    }
}

/// A ringdns started in a fresh network namespace, with its stderr lines.
struct Server {
    /// The `unshare` process (which execs ringdns).
    child: Child,
    /// Lines of ringdns' stderr, as they come.
    lines: mpsc::Receiver<String>,
    /// Everything read so far.
    seen: Vec<String>,
}

impl Server {
    /// Starts ringdns with `config` (a TOML file) in a new network namespace.
    fn start(config: &Path) -> anyhow::Result<Server> {
        let script = format!(
            "ip link set lo up && exec {} run --config {}",
            env!("CARGO_BIN_EXE_ringdns"),
            config.display()
        );
        let mut child = Command::new("unshare")
            .args(["-n", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning unshare -n ringdns")?;
        let stderr = child.stderr.take().context("stderr was piped")?;
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Server {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits (bounded) for a line containing `needle`, or for the process to end.
    fn wait_for(&mut self, needle: &str) -> anyhow::Result<Option<String>> {
        for _ in 0..100 {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(Some(line));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(None),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        bail!(
            "no line containing {needle:?} within 10 s; stderr so far:\n{}",
            self.seen.join("\n")
        )
    }

    /// Runs `dig` inside the server's network namespace.
    fn dig(&self, args: &[&str]) -> anyhow::Result<String> {
        let netns = format!("--net=/proc/{}/ns/net", self.child.id());
        let output = Command::new("nsenter")
            .arg(netns)
            .arg("dig")
            .args(args)
            .output()
            .context("running nsenter dig")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Our own child, not yet reaped: its PID cannot have been reused.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a ringdns config with `io` to a temp file.
fn config(dir: &Path, io: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(format!("ringdns-{io}.toml"));
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:5353\"]\nworkers = 1\nio = \"{io}\"\n\
         [[forward]]\nzone = \".\"\nupstreams = [\"127.0.0.10:53\"]\n\
         [health]\nlisten = \"127.0.0.1:8080\"\nlameduck = \"0s\"\n\
         [metrics]\nlisten = \"127.0.0.1:9253\"\n"
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

#[test]
fn forbidden_io_uring_falls_back_to_epoll_or_fails_clearly() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP io_fallback: needs root for a network namespace and the sysctl");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let auto = config(dir.path(), "auto")?;
    let uring = config(dir.path(), "uring")?;
    let Some(_forbidden) = Forbidden::new() else {
        return Ok(());
    };

    let mut server = Server::start(&auto)?;
    let ready = server
        .wait_for("ready udp=")?
        .context("io = auto must still start")?;
    assert!(ready.contains("io=epoll"), "{ready}");
    let warnings: Vec<_> = server
        .seen
        .iter()
        .filter(|line| line.contains("io_uring unavailable"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "exactly one warning saying why: {:?}",
        server.seen
    );
    // It serves: the locally answered id.server CH TXT needs no upstream.
    let answer = server.dig(&[
        "+tries=1",
        "+time=2",
        "-p",
        "5353",
        "@127.0.0.1",
        "id.server",
        "CH",
        "TXT",
    ])?;
    assert!(
        answer.contains("status: NOERROR") && answer.contains("\"ringdns\""),
        "{answer}"
    );
    drop(server);

    let mut strict = Server::start(&uring)?;
    assert!(
        strict.wait_for("ready udp=")?.is_none(),
        "io = uring must not start: {:?}",
        strict.seen
    );
    let status = strict.child.wait()?;
    assert!(!status.success(), "a clear start-up error exits non-zero");
    let reason = strict.seen.join("\n");
    assert!(
        reason.contains("io_uring"),
        "the error names io_uring: {reason}"
    );
    Ok(())
}
