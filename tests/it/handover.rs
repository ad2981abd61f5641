//! Zero-gap upgrades (`[node] handover`), seen from outside: a second ringdns started with the
//! same configuration takes the first one's listen sockets while a fixed-rate dnsperf load
//! runs, the first stops receiving, answers what it has in flight and idles until SIGTERM;
//! no query goes unanswered, and the second serves UDP, TCP and /health afterwards.
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.
//!
//! Every wait is bounded (`wait_for`); no speed is asserted, only what is answered.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use domain::base::iana::OptRcode;

use crate::harness::auth::Authoritative;
use crate::harness::dig::{dig, Dig};
use crate::harness::faulty::{FaultyUpstream, Mode, Source};
use crate::harness::http::http_get;
use crate::harness::ringdns::{Io, Ringdns, TestConfig};
use crate::harness::{backend_tests, dnsperf, enter_netns, wait_for, zones};

backend_tests!(
    a_successor_takes_the_sockets_under_load_and_no_query_is_lost,
    a_stale_handover_socket_is_ignored,
    when_the_successor_stops_first_the_predecessor_exits_to_be_restarted,
);

/// Queries per second dnsperf sends (fixed rate), and for how long: the hand-over and the old
/// instance's drain (the forward timeout, 2 s, plus 1 s) fall inside it.
const LOAD_QPS: u32 = 2000;
/// Seconds of load.
const LOAD_SECS: u32 = 8;

/// How long the upstream takes to answer under load: with caches of one entry nearly every
/// query is a miss, so hundreds are in flight at the old instance when it hands over.
const UPSTREAM_DELAY: Duration = Duration::from_millis(300);

/// Where the delaying relay listens.
const RELAY: &str = "127.0.0.53:53";

/// Bound on the old instance's hand-over and drain.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(20);

/// The test configuration with `[node] handover` at `socket`.
fn config_with_handover(io: Io, upstream: std::net::SocketAddr, socket: &Path) -> TestConfig {
    TestConfig::for_tests(io)
        .forward(".", upstream)
        .node_key("handover", &format!("\"{}\"", socket.display()))
}

/// Waits until `dns` has logged a line containing `text`.
fn wait_for_log(dns: &Ringdns, text: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("log line {text:?}"),
        HANDOVER_TIMEOUT,
        Duration::from_millis(100),
        || Ok(dns.stderr().contains(text).then_some(())),
    )
    .with_context(|| format!("log so far:\n{}", dns.stderr()))
}

/// The `received=N used=M` counts of the successor's hand-over line.
fn taken_counts(log: &str) -> anyhow::Result<(u32, u32)> {
    let line = log
        .lines()
        .find(|line| line.contains("handover: serving on sockets taken from pid="))
        .with_context(|| format!("no hand-over line in:\n{log}"))?;
    let field = |key: &str| -> anyhow::Result<u32> {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(key))
            .with_context(|| format!("no {key} in {line:?}"))?
            .parse()
            .with_context(|| format!("{key} in {line:?}"))
    };
    Ok((field("received=")?, field("used=")?))
}

/// dnsperf at a fixed rate against 127.0.0.1:53, nearly every query a miss that a delaying
/// upstream answers after [`UPSTREAM_DELAY`], while a second instance takes over from the
/// first: "Queries lost: 0" (the old instance answers its misses in flight); the first idles after its drain and exits 0 at once on SIGTERM,
/// without tearing anything down; the second serves every listen socket it took.
fn a_successor_takes_the_sockets_under_load_and_no_query_is_lost(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "a_successor_takes_the_sockets_under_load_and_no_query_is_lost/{io}"
    ));
    if !dnsperf::installed() {
        println!("SKIP handover under load: dnsperf not installed");
        return Ok(());
    }
    let auth = Authoritative::start(zones::all())?;
    let relay = FaultyUpstream::start(RELAY.parse()?, Source::Forward(auth.addr()))?;
    let run = tempfile::Builder::new().prefix("ringdns-run").tempdir()?;
    let socket = run.path().join("handover.sock");
    let config = config_with_handover(io, relay.addr(), &socket)
        .cache_int("success_capacity", 1)
        .cache_int("denial_capacity", 1);
    let mut old = Ringdns::start(&config)?;
    assert!(
        old.stderr().contains("handover: no instance offers"),
        "{}",
        old.stderr()
    );
    // Cached names (asked once now) and uncached ones (first asked under load, some of them
    // in flight at the old instance when it hands over).
    let mut queries = String::new();
    for name in [zones::KUBE_DNS, zones::NGINX] {
        assert_eq!(dig(old.udp(), name, "A")?.rcode, OptRcode::NOERROR);
        queries.push_str(&format!("{name} A\n"));
    }
    for n in 0..zones::SERVICES {
        queries.push_str(&format!("{} A\n", zones::svc(n)));
    }
    let query_file: PathBuf = run.path().join("queries.txt");
    std::fs::write(&query_file, queries)?;
    relay.set_mode(Mode::Delay(UPSTREAM_DELAY));
    let load = {
        let query_file = query_file.clone();
        // The thread shares this test's network namespace.
        thread::spawn(move || {
            dnsperf::fixed_rate(dnsperf::LOCALHOST_53, &query_file, LOAD_QPS, LOAD_SECS)
        })
    };
    thread::sleep(Duration::from_millis(1500));
    let mut new = Ringdns::start(&config)?;
    wait_for_log(&new, "handover: serving on sockets taken from pid=")?;
    let (received, used) = taken_counts(&new.stderr())?;
    // 2 workers × 2 listen addresses × (UDP + TCP), plus the health and metrics listeners.
    assert_eq!((received, used), (10, 10), "{}", new.stderr());
    wait_for_log(&old, "serves now; stopped receiving")?;
    assert!(
        !load.is_finished(),
        "the hand-over must happen under load; new:\n{}",
        new.stderr()
    );
    wait_for_log(&old, "handover: done; idle until stopped")?;
    let dnsperf::Run { sent, lost, stdout } = load
        .join()
        .map_err(|_| anyhow::anyhow!("dnsperf thread panicked"))??;
    assert!(sent > 0, "dnsperf sent nothing:\n{stdout}");
    relay.set_mode(Mode::Normal);
    assert_eq!(
        lost,
        0,
        "queries lost across the hand-over:\n{stdout}\nold:\n{}\nnew:\n{}",
        old.stderr(),
        new.stderr()
    );
    old.stop()?;
    let old_log = old.stderr();
    assert!(
        old_log.contains("stopped signal=SIGTERM (handed over to pid="),
        "{old_log}"
    );
    // The successor serves every listen socket, UDP and TCP, and the health listener.
    for server in [new.udp(), new.udp6()] {
        assert_eq!(dig(server, zones::NGINX, "A")?.rcode, OptRcode::NOERROR);
    }
    for server in [new.tcp(), new.tcp6()] {
        let answer = Dig::new(server, zones::KUBE_DNS, "A").tcp().run()?;
        assert_eq!(answer.rcode, OptRcode::NOERROR);
    }
    let health = http_get(new.health()?, "/health")?;
    assert_eq!(health.status, 200, "{}", health.body);
    // It offers the sockets in turn, and removes the socket file when it stops unasked.
    assert!(socket.exists());
    new.stop()?;
    assert!(!socket.exists(), "{}", new.stderr());
    Ok(())
}

/// A socket file left by an instance killed with SIGKILL offers nothing: the next instance
/// binds its own sockets, serves, and offers them at the same path.
fn a_stale_handover_socket_is_ignored(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("a_stale_handover_socket_is_ignored/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let run = tempfile::Builder::new().prefix("ringdns-run").tempdir()?;
    let socket = run.path().join("handover.sock");
    let config = config_with_handover(io, auth.addr(), &socket);
    let mut killed = Ringdns::start(&config)?;
    // The offer is up by the ready line (d74ad9f); the file is looked for all the same.
    wait_for(
        "the first instance offers",
        HANDOVER_TIMEOUT,
        Duration::from_millis(50),
        || Ok(socket.exists().then_some(())),
    )?;
    killed.kill9()?;
    assert!(socket.exists(), "the killed instance left its socket file");
    let mut next = wait_for(
        "an instance after the killed one",
        HANDOVER_TIMEOUT,
        Duration::from_millis(200),
        // The kernel may hold the killed instance's io_uring sockets for a moment.
        || Ok(Ringdns::start(&config).ok()),
    )?;
    assert!(
        next.stderr().contains("handover: no instance offers"),
        "{}",
        next.stderr()
    );
    assert_eq!(dig(next.udp(), zones::NGINX, "A")?.rcode, OptRcode::NOERROR);
    assert!(socket.exists());
    next.stop()
}

/// A rolled-back update: the successor is stopped while its predecessor idles. The successor
/// leaves the node setup to the predecessor, which exits at once (non-zero, so that its
/// supervisor restarts it); a restarted instance finds nothing to take and serves.
fn when_the_successor_stops_first_the_predecessor_exits_to_be_restarted(
    io: Io,
) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "when_the_successor_stops_first_the_predecessor_exits_to_be_restarted/{io}"
    ));
    let auth = Authoritative::start(zones::all())?;
    let run = tempfile::Builder::new().prefix("ringdns-run").tempdir()?;
    let socket = run.path().join("handover.sock");
    let config = config_with_handover(io, auth.addr(), &socket);
    let mut old = Ringdns::start(&config)?;
    let mut new = Ringdns::start(&config)?;
    wait_for_log(&old, "handover: done; idle until stopped")?;
    assert!(old.is_running());
    new.stop()?;
    assert!(
        new.stderr()
            .contains("teardown skipped: the instance this one took over from still runs"),
        "{}",
        new.stderr()
    );
    wait_for(
        "the predecessor exits",
        HANDOVER_TIMEOUT,
        Duration::from_millis(100),
        || Ok((!old.is_running()).then_some(())),
    )?;
    assert!(
        old.stderr()
            .contains("exited; exiting so that this instance is restarted"),
        "{}",
        old.stderr()
    );
    let mut restarted = wait_for(
        "the restarted predecessor",
        HANDOVER_TIMEOUT,
        Duration::from_millis(200),
        // The kernel may hold the exited instances' io_uring sockets for a moment.
        || Ok(Ringdns::start(&config).ok()),
    )?;
    assert!(
        restarted.stderr().contains("handover: no instance offers"),
        "{}",
        restarted.stderr()
    );
    assert_eq!(
        dig(restarted.udp(), zones::NGINX, "A")?.rcode,
        OptRcode::NOERROR
    );
    restarted.stop()
}
