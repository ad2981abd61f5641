//! Worker supervision (control/supervise.rs): a worker that panics is restarted in place on its
//! own sockets, so the share of the queries that SO_REUSEPORT hashes to them is not lost.
//!
//! The panic comes from the debug build's fault injection (src/worker/fault.rs): a query for
//! the name in `RINGDNS_FAULT_PANIC_QNAME` makes the worker that reads it panic, as a bug would.
//! On io_uring the panic happens inside the ring task, on epoll inside a socket's receive task:
//! both are tokio tasks, whose panics tokio would otherwise catch and outlive.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use domain::base::iana::{OptRcode, Rtype};

use crate::harness::client::{self, Query};
use crate::harness::dig::{dig, Dig};
use crate::harness::http::{http_get, scrape};
use crate::harness::ringdns::{Io, Ringdns, TestConfig};
use crate::harness::{backend_tests, enter_netns, wait_for, zones, Stack};

backend_tests!(
    a_panicked_worker_is_restarted_in_place,
    a_worker_is_restarted_during_the_lame_duck,
);

/// The query name that makes a worker panic.
const CRASH: &str = "crash.fault.test.";

/// Queries per round, each from its own socket: with two workers, a round without a serving
/// worker behind one of the sockets would lose about half of them (all but 2^-64 of the time).
const ROUND: u16 = 64;

/// How long a round waits for its answers (a worker restarted after its 1 s back-off answers
/// what waited in its socket).
const ROUND_WAIT: Duration = Duration::from_secs(4);

/// Sends one A query for each of services `first..first + ROUND`, each from a fresh socket, all
/// at once; returns the names that got no correct answer within [`ROUND_WAIT`].
fn unanswered(server: SocketAddr, first: u16) -> anyhow::Result<Vec<String>> {
    let mut sent = Vec::new();
    for n in first..first + ROUND {
        let name = zones::svc(n);
        let socket = client::udp_socket(server)?;
        socket
            .send_to(&Query::new(&name, Rtype::A).to_wire(), server)
            .context("sending a query")?;
        sent.push((n, name, socket));
    }
    let deadline = Instant::now() + ROUND_WAIT;
    let mut missing = Vec::new();
    for (n, name, socket) in sent {
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = client::udp_receive(&socket, server, left.max(Duration::from_millis(1)))?
            .map(|raw| client::Reply::parse(&raw))
            .transpose()?;
        let correct = answer.is_some_and(|reply| {
            reply.rcode == OptRcode::NOERROR
                && reply
                    .answer
                    .iter()
                    .any(|rr| rr.rdata == zones::svc_v4(n).to_string())
        });
        if !correct {
            missing.push(name);
        }
    }
    Ok(missing)
}

/// Sends the query that makes a worker panic; it gets no answer (its worker died reading it).
fn crash(server: SocketAddr) -> anyhow::Result<()> {
    let packet = Query::new(CRASH, Rtype::A).to_wire();
    let answer = client::udp_exchange(server, &packet, Duration::from_secs(1))?;
    assert!(answer.is_none(), "the crash query was answered: {answer:?}");
    Ok(())
}

/// Panics logged so far.
fn panics(dns: &Ringdns) -> usize {
    dns.stderr()
        .lines()
        .filter(|line| line.contains("ERROR") && line.contains("panicked: fault injection"))
        .count()
}

/// `coredns_cache_entries` summed over its types.
fn cache_entries(dns: &Ringdns) -> anyhow::Result<f64> {
    Ok(scrape(dns.metrics()?)?
        .iter()
        .filter(|(series, _)| series.starts_with("coredns_cache_entries{"))
        .map(|(_, value)| value)
        .sum())
}

/// Sum of `ringdns_worker_restarts_total` over the workers.
fn restarts(dns: &Ringdns) -> anyhow::Result<f64> {
    let series = scrape(dns.metrics()?)?;
    let per_worker: Vec<f64> = (0..2)
        .map(|worker| {
            series
                .get(&format!(
                    "ringdns_worker_restarts_total{{worker=\"{worker}\"}}"
                ))
                .copied()
                .with_context(|| format!("no restart series for worker {worker}"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(per_worker.iter().sum())
}

/// Asserts that every query of [`unanswered`]'s round from service `first` is answered.
fn assert_all_answered(server: SocketAddr, first: u16, when: &str) -> anyhow::Result<()> {
    let missing = unanswered(server, first)?;
    assert!(missing.is_empty(), "{when}: unanswered {missing:?}");
    Ok(())
}

/// Waits until `count` restarts are counted.
fn wait_for_restarts(dns: &Ringdns, count: f64) -> anyhow::Result<()> {
    wait_for(
        &format!("{count} restarts"),
        Duration::from_secs(15),
        Duration::from_millis(50),
        || Ok((restarts(dns)? >= count).then_some(())),
    )
}

/// Asserts that `/health` is 200.
fn assert_healthy(dns: &Ringdns, when: &str) -> anyhow::Result<()> {
    let health = http_get(dns.health()?, "/health")?;
    assert_eq!(health.status, 200, "/health {when}: {}", health.body);
    Ok(())
}

/// Two workers; one panics on a query and is restarted in place: afterwards every query is
/// answered, over UDP (both workers' sockets) and TCP, `/health` stays 200, the restart is
/// counted and logged. Then the same query three more times (a crash loop, held to one start
/// a second per worker): still every query answered.
fn a_panicked_worker_is_restarted_in_place(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("a_panicked_worker_is_restarted_in_place/{io}"));
    let config = TestConfig::for_tests(io).env("RINGDNS_FAULT_PANIC_QNAME", CRASH);
    let stack = Stack::start(config)?;
    let dns = &stack.dns;
    let server = dns.udp();
    assert_all_answered(server, 0, "before any panic")?;
    assert_eq!(restarts(dns)?, 0.0);

    crash(server)?;
    wait_for_restarts(dns, 1.0)?;
    let log = dns.stderr();
    assert!(
        log.lines().any(|line| line.contains("ERROR")
            && line.contains("panicked: fault injection")
            && line.contains("restarting it in place")),
        "no error line for the panic:\n{log}"
    );
    assert!(log.contains("restarted in place"), "{log}");
    // Misses (new names) and, for the first round's names, hits: every one answered.
    assert_all_answered(server, ROUND, "after one restart")?;
    assert_all_answered(server, 0, "hits after one restart")?;
    // Over TCP, each from a new connection (so from both workers' listeners), with dig.
    for _ in 0..8 {
        let answer = Dig::new(dns.tcp(), zones::KUBE_DNS, "A").tcp().run()?;
        assert_eq!(answer.rdata_of("A"), vec![zones::KUBE_DNS_V4.to_string()]);
    }
    let answer = dig(server, zones::NGINX, "A")?;
    assert_eq!(answer.rdata_of("A"), vec![zones::NGINX_V4.to_string()]);
    assert_healthy(dns, "after a restart")?;

    // A crash loop: one client sending the same query again and again reaches one worker
    // (same address and port, same SO_REUSEPORT member), which is started at most once a
    // second. Each copy is sent once the previous one has killed the worker: the first copy
    // brings a restart at once, the second one, right after it, waits out the back-off.
    let entries = cache_entries(dns)?;
    let socket = client::udp_socket(server)?;
    for (copy, restarted) in [(0u16, 2.0), (1, 2.0), (2, 3.0)] {
        let deaths = panics(dns);
        socket
            .send_to(&Query::new(CRASH, Rtype::A).id(copy).to_wire(), server)
            .context("sending the crash query")?;
        wait_for(
            "the crash query killed its worker",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || Ok((panics(dns) > deaths).then_some(())),
        )?;
        if copy == 1 {
            // Died less than a second after its start: no restart for a while.
            std::thread::sleep(Duration::from_millis(300));
            let early = restarts(dns)?;
            assert_eq!(
                early, 2.0,
                "restarted within 300 ms of dying again: no back-off"
            );
        }
        wait_for_restarts(dns, restarted)?;
    }
    // The dead worker's cache went with it (about half of the entries).
    let left = cache_entries(dns)?;
    assert!(
        left < entries,
        "cache entries {entries} before, {left} after a restart"
    );
    wait_for_restarts(dns, 4.0)?;
    assert_eq!(restarts(dns)?, 4.0);
    assert_all_answered(server, 2 * ROUND, "after a crash loop")?;
    assert_healthy(dns, "after a crash loop")?;
    Ok(())
}

/// A worker that panics during the lame duck after SIGTERM (when ringdns still answers) is
/// restarted too, so every query is still answered until the workers stop.
fn a_worker_is_restarted_during_the_lame_duck(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("a_worker_is_restarted_during_the_lame_duck/{io}"));
    let config = TestConfig::for_tests(io)
        .env("RINGDNS_FAULT_PANIC_QNAME", CRASH)
        .lameduck("8s");
    let mut stack = Stack::start(config)?;
    let server = stack.dns.udp();
    assert_all_answered(server, 0, "before SIGTERM")?;
    stack.dns.sigterm()?;
    wait_for(
        "/health 503 (lame duck)",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || Ok((http_get(stack.dns.health()?, "/health")?.status == 503).then_some(())),
    )?;
    crash(server)?;
    wait_for_restarts(&stack.dns, 1.0)?;
    assert_all_answered(server, ROUND, "in the lame duck after a restart")?;
    stack.dns.stop()
}
