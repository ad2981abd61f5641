//! The batch wait (`server.batch_wait`): at a steady paced rate, a worker serves several
//! queries per wake-up, on both I/O backends.
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.
//!
//! Timing: dnsperf paces the load (bounded in time and count); the asserts compare counts of
//! the worker's sleeps within one test, never speed.

use std::fmt::Write as _;

use domain::base::iana::OptRcode;

use crate::harness::dig::dig;
use crate::harness::ringdns::{Io, TestConfig};
use crate::harness::{backend_tests, dnsperf, enter_netns, zones, Stack};

backend_tests!(a_batch_wait_serves_paced_queries_with_fewer_wake_ups);

/// Paced rate: 5 queries per millisecond, so a 1 ms wait gathers a few (pace.rs waits at
/// this rate: at least half a query is expected within one wait).
const RATE: u32 = 5_000;
/// Seconds of load per server.
const SECONDS: u32 = 2;

/// The worker's sleeps while dnsperf sends [`RATE`] cached queries a second for [`SECONDS`],
/// with `batch_wait`, and the queries answered.
fn sleeps_under_paced_load(io: Io, batch_wait: &str) -> anyhow::Result<(u64, u64)> {
    let stack = Stack::start(
        TestConfig::for_tests(io)
            .workers(1)
            .server_key("batch_wait", &format!("\"{batch_wait}\"")),
    )?;
    let mut queries = String::new();
    for name in [zones::KUBE_DNS, zones::NGINX] {
        assert_eq!(dig(stack.dns.udp(), name, "A")?.rcode, OptRcode::NOERROR);
        let _ = writeln!(queries, "{name} A");
    }
    let query_file = stack.dns.dir().join("hits.txt");
    std::fs::write(&query_file, queries)?;
    let before = stack.dns.worker_voluntary_switches()?;
    let run = dnsperf::fixed_rate(dnsperf::LOCALHOST_53, &query_file, RATE, SECONDS)?;
    let sleeps = stack.dns.worker_voluntary_switches()? - before;
    assert_eq!(run.lost, 0, "batch_wait={batch_wait}:\n{}", run.stdout);
    assert!(
        run.sent >= u64::from(RATE),
        "dnsperf sent too few:\n{}",
        run.stdout
    );
    println!(
        "batch_wait={batch_wait}: {sleeps} worker sleeps for {} queries",
        run.sent
    );
    Ok((sleeps, run.sent))
}

/// Without a wait a paced worker sleeps about once per query; with `batch_wait = "1ms"` it
/// sleeps once per wait and answers what arrived meanwhile, so at least half the sleeps go.
fn a_batch_wait_serves_paced_queries_with_fewer_wake_ups(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "a_batch_wait_serves_paced_queries_with_fewer_wake_ups/{io}"
    ));
    if !dnsperf::installed() {
        println!("SKIP a_batch_wait_serves_paced_queries: dnsperf not installed");
        return Ok(());
    }
    let (without, sent_without) = sleeps_under_paced_load(io, "0s")?;
    let (with, sent_with) = sleeps_under_paced_load(io, "1ms")?;
    // Per query, so that a dnsperf run that sent a little more or less does not decide it.
    let per_query = |sleeps: u64, sent: u64| sleeps as f64 / sent.max(1) as f64;
    let (without, with) = (per_query(without, sent_without), per_query(with, sent_with));
    assert!(
        with * 2.0 <= without,
        "worker sleeps per query: {with:.3} with a 1 ms batch wait, {without:.3} without"
    );
    Ok(())
}
