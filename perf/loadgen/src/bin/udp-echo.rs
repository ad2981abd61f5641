//! `udp-echo`: answers every datagram with the same bytes and the DNS QR bit set, the cheapest
//! possible "DNS server" and so the kernel's-limit reference in perf comparisons.
//!
//! Runs on: one thread per `--cpu` (one unpinned thread without), each a plain blocking loop
//! on its own socket; with several, the sockets form one SO_REUSEPORT group, as ringdns'
//! workers do, so the kernel spreads clients over them the same way.

#![forbid(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use nix::time::{clock_gettime, ClockId};

use anyhow::{bail, Context};
use argh::FromArgs;
use ringdns_loadgen::sys::{install_stop_flag, Batch};
use ringdns_loadgen::{pin_current_thread, process_cpu_time};

/// Largest datagram echoed in mmsg mode; longer ones are dropped and counted. DNS queries over
/// UDP are far below this, and a small slot keeps a 64-slot batch within a few pages.
const SLOT_BYTES: usize = 2048;
/// How often a blocked receive wakes to check `--max-seconds` and a stop signal that raced with
/// entering the receive: rare enough to cost nothing measurable.
const RECEIVE_TIMEOUT: Duration = Duration::from_millis(200);

/// UDP echo server that sets the DNS QR bit: the kernel's-limit reference for ringdns benchmarks.
#[derive(FromArgs)]
struct Args {
    /// address to listen on (default 127.0.0.1:5300)
    #[argh(
        option,
        default = "\"127.0.0.1:5300\".parse().expect(\"a valid literal\")"
    )]
    listen: SocketAddr,
    /// mmsg (recvmmsg/sendmmsg batches) or single (recvfrom/sendto per datagram); default mmsg
    #[argh(option, default = "Mode::Mmsg", from_str_fn(parse_mode))]
    mode: Mode,
    /// datagrams per recvmmsg/sendmmsg in mmsg mode (default 64)
    #[argh(option, default = "64")]
    batch: usize,
    /// pin a thread to this CPU; repeat it for one thread per CPU, each on its own socket of one
    /// SO_REUSEPORT group (default: one unpinned thread)
    #[argh(option)]
    cpu: Vec<usize>,
    /// stop after this many seconds (SIGTERM/SIGINT also stop it)
    #[argh(option)]
    max_seconds: Option<f64>,
}

/// Which receive/send syscalls the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `recvmmsg(MSG_WAITFORONE)` then `sendmmsg` of the whole batch.
    Mmsg,
    /// `recvfrom` then `sendto`, one datagram at a time.
    Single,
}

/// What the server (or one of its threads) did, printed when it stops.
#[derive(Debug, Default)]
struct Totals {
    /// Datagrams received.
    received: u64,
    /// Datagrams echoed.
    echoed: u64,
    /// Receive calls that returned data.
    batches: u64,
    /// Datagrams dropped for being longer than a slot.
    oversized: u64,
    /// Failed sends.
    send_errors: u64,
}

impl Totals {
    /// Adds a thread's counts.
    fn add(&mut self, other: &Totals) {
        self.received += other.received;
        self.echoed += other.echoed;
        self.batches += other.batches;
        self.oversized += other.oversized;
        self.send_errors += other.send_errors;
    }
}

fn main() -> anyhow::Result<()> {
    let args: Args = argh::from_env();
    if args.batch == 0 || args.batch > 1024 {
        bail!("--batch must be 1..=1024");
    }
    let cpus: Vec<Option<usize>> = match args.cpu.as_slice() {
        [] => vec![None],
        cpus => cpus.iter().copied().map(Some).collect(),
    };
    let stop = install_stop_flag().context("installing SIGTERM/SIGINT handlers")?;
    // Every socket is bound before any thread serves, so the group is whole from the start.
    let sockets = cpus
        .iter()
        .map(|_| bind(args.listen, cpus.len() > 1))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = match args.max_seconds {
        Some(seconds) => Some(
            Instant::now()
                + Duration::try_from_secs_f64(seconds).context("--max-seconds out of range")?,
        ),
        None => None,
    };
    let should_stop = || {
        stop.load(Ordering::Relaxed) || deadline.is_some_and(|deadline| Instant::now() >= deadline)
    };
    eprintln!(
        "udp-echo ready listen={} mode={:?} threads={} pid={}",
        sockets[0].local_addr().context("local address")?,
        args.mode,
        sockets.len(),
        std::process::id()
    );
    let started = Instant::now();
    let cpu_before = process_cpu_time()?;
    let threads: Vec<anyhow::Result<(Totals, Duration)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .iter()
            .zip(&cpus)
            .map(|(socket, &cpu)| {
                let should_stop = &should_stop;
                scope.spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_current_thread(cpu)?;
                    }
                    let thread_cpu = || -> anyhow::Result<Duration> {
                        let time = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
                            .context("CLOCK_THREAD_CPUTIME_ID")?;
                        Ok(Duration::from(time))
                    };
                    let before = thread_cpu()?;
                    let totals = match args.mode {
                        Mode::Mmsg => echo_batches(socket, args.batch, should_stop)?,
                        Mode::Single => echo_single(socket, should_stop)?,
                    };
                    Ok((totals, thread_cpu()?.saturating_sub(before)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| match handle.join() {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("an echo thread panicked")),
            })
            .collect()
    });
    let cpu = process_cpu_time()?.saturating_sub(cpu_before);
    let mut totals = Totals::default();
    for (index, (thread, cpu_pin)) in threads.into_iter().zip(&cpus).enumerate() {
        let (thread, thread_cpu) = thread?;
        // One line per thread when there are several (perf/run.sh reads them).
        if cpus.len() > 1 {
            eprintln!(
                "udp-echo thread={index} cpu={} received={} echoed={} batches={} cpu_s={:.6}",
                cpu_pin.map_or_else(|| "-".to_owned(), |cpu| cpu.to_string()),
                thread.received,
                thread.echoed,
                thread.batches,
                thread_cpu.as_secs_f64()
            );
        }
        totals.add(&thread);
    }
    let per_batch = totals.received as f64 / totals.batches.max(1) as f64;
    eprintln!(
        "udp-echo stopped received={} echoed={} batches={} avg_batch={per_batch:.1} oversized={} \
         send_errors={} elapsed_s={:.3} cpu_s={:.3}",
        totals.received,
        totals.echoed,
        totals.batches,
        totals.oversized,
        totals.send_errors,
        started.elapsed().as_secs_f64(),
        cpu.as_secs_f64()
    );
    Ok(())
}

/// A UDP socket bound to `listen` (in an SO_REUSEPORT group if `reuse_port`), whose blocking
/// receives wake every [`RECEIVE_TIMEOUT`].
fn bind(listen: SocketAddr, reuse_port: bool) -> anyhow::Result<UdpSocket> {
    let family = match listen {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .context("socket")?;
    if reuse_port {
        socket::setsockopt(&fd, sockopt::ReusePort, &true).context("SO_REUSEPORT")?;
    }
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(listen),
    )
    .with_context(|| format!("binding {listen}"))?;
    let socket = UdpSocket::from(fd);
    socket
        .set_read_timeout(Some(RECEIVE_TIMEOUT))
        .context("SO_RCVTIMEO")?;
    Ok(socket)
}

/// Parses `--mode`.
fn parse_mode(value: &str) -> Result<Mode, String> {
    match value {
        "mmsg" => Ok(Mode::Mmsg),
        "single" => Ok(Mode::Single),
        other => Err(format!("unknown mode {other:?}: use mmsg or single")),
    }
}

/// Whether a receive error only means "woke up without data" (timeout or signal).
fn is_wake_up(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Sets the QR bit (RFC 1035 §4.1.1: bit 7 of byte 2) of a datagram, if it is long enough.
fn set_qr(datagram: &mut [u8]) {
    if let Some(flags) = datagram.get_mut(2) {
        *flags |= 0x80;
    }
}

/// The mmsg loop: block for at least one datagram, take up to `batch`, echo them in one call.
fn echo_batches(
    socket: &UdpSocket,
    batch: usize,
    should_stop: impl Fn() -> bool,
) -> anyhow::Result<Totals> {
    let mut totals = Totals::default();
    let mut datagrams = Batch::new(batch, SLOT_BYTES, true);
    while !should_stop() {
        let received = match datagrams.recv(socket.as_fd(), libc::MSG_WAITFORONE) {
            Ok(received) => received,
            Err(error) if is_wake_up(&error) => continue,
            Err(error) => return Err(error).context("recvmmsg"),
        };
        totals.batches += 1;
        totals.received += received as u64;
        for i in 0..received {
            set_qr(datagrams.packet_mut(i));
        }
        // Send maximal runs of datagrams that fit; an oversized one splits the batch.
        let mut start = 0;
        while start < received {
            if datagrams.truncated(start) {
                totals.oversized += 1;
                start += 1;
                continue;
            }
            let mut end = start + 1;
            while end < received && !datagrams.truncated(end) {
                end += 1;
            }
            while start < end {
                match datagrams.send(socket.as_fd(), start, end) {
                    Ok(sent) if sent > 0 => {
                        totals.echoed += sent as u64;
                        start += sent;
                    }
                    // The datagram at `start` failed (e.g. its sender is gone): skip it.
                    Ok(_) | Err(_) => {
                        totals.send_errors += 1;
                        start += 1;
                    }
                }
            }
        }
    }
    Ok(totals)
}

/// The single loop: one `recvfrom` and one `sendto` per datagram.
fn echo_single(socket: &UdpSocket, should_stop: impl Fn() -> bool) -> anyhow::Result<Totals> {
    let mut totals = Totals::default();
    let mut buffer = vec![0; 65536];
    while !should_stop() {
        let (len, peer) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(error) if is_wake_up(&error) => continue,
            Err(error) => return Err(error).context("recvfrom"),
        };
        totals.batches += 1;
        totals.received += 1;
        let datagram = &mut buffer[..len];
        set_qr(datagram);
        match socket.send_to(datagram, peer) {
            Ok(_) => totals.echoed += 1,
            Err(_) => totals.send_errors += 1,
        }
    }
    Ok(totals)
}
