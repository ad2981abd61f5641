//! Benchmark tools for ringdns: `loadgen`, a DNS load generator built like the C
//! sendmmsg/recvmmsg generator the peers were measured with (shared/ANCHORS.md), and `udp-echo`,
//! the kernel's-limit reference server.
//!
//! Runs on: the benchmark host, outside ringdns; nothing here is linked into the server.
//!
//! The generator keeps a per-socket in-flight table indexed by DNS ID, pre-builds every query
//! packet at start (the hot loop copies one and patches its ID), batches sends and receives with
//! `sendmmsg`/`recvmmsg`, and records every answer's latency in an exact histogram. All unsafe
//! code (the raw batch syscalls, `epoll_pwait2`, the signal handler) is in [`sys`].

pub mod generator;
pub mod histogram;
pub mod queries;
pub mod sys;
pub mod table;

/// Pins the calling thread to CPU `cpu`.
pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    if core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        Ok(())
    } else {
        anyhow::bail!("cannot pin to CPU {cpu} (not in this process's affinity mask?)")
    }
}

/// User plus system CPU time this process has used so far (all threads), from `getrusage(2)`.
pub fn process_cpu_time() -> anyhow::Result<std::time::Duration> {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let micros =
        |time: nix::sys::time::TimeVal| time.tv_sec() as u64 * 1_000_000 + time.tv_usec() as u64;
    Ok(std::time::Duration::from_micros(
        micros(usage.user_time()) + micros(usage.system_time()),
    ))
}
