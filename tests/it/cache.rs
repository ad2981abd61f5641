//! Caching: answers outlive the upstream, TTLs are capped and age, negative answers are
//! cached under the denial cap, and both caches full fit the memory bound.
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.
//!
//! Timing: the only waits are a ~2 s sleep for ageing; asserts allow a second of slack and
//! never depend on speed.

use std::fmt::Write as _;
use std::thread;
use std::time::Duration;

use domain::base::iana::OptRcode;

use crate::harness::auth::Authoritative;
use crate::harness::dig::{authoritative, dig, Dig};
use crate::harness::ringdns::{Io, Ringdns, TestConfig};
use crate::harness::{backend_tests, dnsperf, enter_netns, http, zones, Stack};

backend_tests!(
    style_example_cached_answer_survives_upstream_stop,
    cached_answer_survives_upstream_stop,
    ttl_is_capped_at_success_ttl,
    ttl_ages_and_never_grows,
    nxdomain_is_cached_under_the_denial_cap,
    nodata_is_cached_under_the_denial_cap,
    both_full_caches_fit_in_32_mb,
);

/// `cache.denial_ttl` the tests configure (and the documented default).
const DENIAL_TTL: u32 = 5;
/// `cache.success_ttl` the tests configure (and the documented default).
const SUCCESS_TTL: u32 = 30;

/// The default test config with the cache caps spelled out, so the asserts below do not
/// depend on defaults.
fn config(io: Io) -> TestConfig {
    TestConfig::for_tests(io)
        .cache_str("success_ttl", &format!("{SUCCESS_TTL}s"))
        .cache_str("denial_ttl", &format!("{DENIAL_TTL}s"))
        .cache_str("servfail_ttl", "0s")
}

/// The example of STYLE.md §9, with one zone and one worker (see below for why one).
fn style_example_cached_answer_survives_upstream_stop(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "style_example_cached_answer_survives_upstream_stop/{io}"
    ));
    let name = "kube-dns.kube-system.svc.cluster.local.";
    let mut auth = Authoritative::start(zones::cluster_local())?;
    let mut dns = Ringdns::start(&config(io).workers(1).forward(".", auth.addr()))?;
    let first = dig(dns.udp(), name, "A")?;
    auth.stop()?;
    let second = dig(dns.udp(), name, "A")?;
    assert_eq!(
        second.rcode,
        OptRcode::NOERROR,
        "must come from cache, not SERVFAIL"
    );
    assert_eq!(first.rdata(), second.rdata()); // TTLs may have aged; the data must not change
    dns.stop()
}

/// A, AAAA and SRV answers are served from cache after knotd stops.
fn cached_answer_survives_upstream_stop(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("cached_answer_survives_upstream_stop/{io}"));
    // One worker: each worker has its own shard, so with two a later query could land on the
    // shard that never saw the name (a miss, SERVFAIL once knotd is gone), which is by design.
    let mut stack = Stack::start(config(io).workers(1))?;
    let names = [
        (zones::KUBE_DNS.to_owned(), "A"),
        (zones::svc(4), "AAAA"),
        (format!("_http._tcp.{}", zones::svc(4)), "SRV"),
    ];
    let mut first = Vec::new();
    for (name, rtype) in &names {
        let answer = dig(stack.dns.udp(), name, rtype)?;
        assert_eq!(answer.rcode, OptRcode::NOERROR, "{}", answer.raw);
        assert!(!answer.answer.is_empty());
        first.push(answer);
    }
    stack.auth.stop()?;
    for ((name, rtype), first) in names.iter().zip(&first) {
        for _ in 0..4 {
            let second = dig(stack.dns.udp(), name, rtype)?;
            assert_eq!(
                second.rcode,
                OptRcode::NOERROR,
                "must come from cache\n{}",
                second.raw
            );
            assert_eq!(
                first.rdata(),
                second.rdata(),
                "{name} {rtype}: data must not change"
            );
        }
    }
    stack.dns.stop()
}

/// A 3600 s TTL comes back as at most `success_ttl` (30 s).
fn ttl_is_capped_at_success_ttl(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("ttl_is_capped_at_success_ttl/{io}"));
    let mut stack = Stack::start(config(io))?;
    let theirs = authoritative(stack.auth.addr(), zones::LONGTTL, "A")?;
    assert_eq!(theirs.answer[0].ttl, zones::LONG_TTL, "fixture");
    for _ in 0..3 {
        let ours = dig(stack.dns.udp(), zones::LONGTTL, "A")?;
        assert_eq!(ours.rdata(), theirs.rdata());
        assert!(
            ours.max_answer_ttl() <= SUCCESS_TTL,
            "TTL capped at 30 s:\n{}",
            ours.raw
        );
    }
    let example = dig(stack.dns.udp(), "www.example.test.", "A")?;
    assert!(example.max_answer_ttl() <= SUCCESS_TTL, "{}", example.raw);
    stack.dns.stop()
}

/// A cached TTL drops as the entry ages and never rises.
fn ttl_ages_and_never_grows(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("ttl_ages_and_never_grows/{io}"));
    // One worker, so both queries hit the same shard.
    let mut stack = Stack::start(config(io).workers(1))?;
    let name = zones::svc(33);
    let first = dig(stack.dns.udp(), &name, "A")?;
    let t1 = first.max_answer_ttl();
    assert!(t1 > 2 && t1 <= SUCCESS_TTL, "{}", first.raw);
    thread::sleep(Duration::from_millis(2200));
    let second = dig(stack.dns.udp(), &name, "A")?;
    let t2 = second.max_answer_ttl();
    assert!(
        t2 < t1,
        "aged by ≥1 s after ~2 s: first {t1}, then {t2}\n{}",
        second.raw
    );
    assert!(
        t2 + 4 >= t1,
        "aged by about 2 s, not more: first {t1}, then {t2}"
    );
    for _ in 0..3 {
        let later = dig(stack.dns.udp(), &name, "A")?;
        assert!(
            later.max_answer_ttl() <= t2,
            "TTL never grows:\n{}",
            later.raw
        );
        assert_eq!(later.rdata(), first.rdata());
    }
    stack.dns.stop()
}

/// Shared body of the two negative-caching tests.
fn negative_is_cached(
    io: Io,
    test: &str,
    name: &str,
    rtype: &str,
    rcode: OptRcode,
) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("{test}/{io}"));
    let mut stack = Stack::start(config(io).workers(1))?;
    let theirs = authoritative(stack.auth.addr(), name, rtype)?;
    assert_eq!(theirs.rcode, rcode, "fixture");
    assert_eq!(
        theirs.authority[0].ttl,
        zones::CLUSTER_TTL,
        "fixture: SOA TTL 30"
    );
    let first = Dig::new(stack.dns.udp(), name, rtype).run()?;
    stack.auth.stop()?;
    let second = Dig::new(stack.dns.udp(), name, rtype).run()?;
    for answer in [&first, &second] {
        assert_eq!(answer.rcode, rcode, "{}", answer.raw);
        assert!(answer.answer.is_empty(), "{}", answer.raw);
        let soa: Vec<_> = answer
            .authority
            .iter()
            .filter(|r| r.rtype == "SOA")
            .collect();
        assert_eq!(
            soa.len(),
            1,
            "SOA in authority (RFC 2308 §3):\n{}",
            answer.raw
        );
        assert!(
            soa[0].ttl <= DENIAL_TTL,
            "negative TTL capped at {DENIAL_TTL} s:\n{}",
            answer.raw
        );
    }
    stack.dns.stop()
}

/// NXDOMAIN is cached (survives knotd stopping) with its SOA TTL capped at 5 s.
fn nxdomain_is_cached_under_the_denial_cap(io: Io) -> anyhow::Result<()> {
    negative_is_cached(
        io,
        "nxdomain_is_cached_under_the_denial_cap",
        zones::MISSING,
        "A",
        OptRcode::NXDOMAIN,
    )
}

/// NODATA is cached (survives knotd stopping) with its SOA TTL capped at 5 s.
fn nodata_is_cached_under_the_denial_cap(io: Io) -> anyhow::Result<()> {
    negative_is_cached(
        io,
        "nodata_is_cached_under_the_denial_cap",
        &zones::svc(5),
        "AAAA",
        OptRcode::NOERROR,
    )
}

/// The default capacity of each cache (success and denial), as NodeLocal DNSCache's.
const DEFAULT_CAPACITY: f64 = 9984.0;

/// The memory bound of the performance work (README, Performance): one worker with both caches
/// full stays within 32 MB (10^6 bytes) of resident memory. dnsperf asks 10,500 distinct names under the
/// zone's wildcard (NOERROR) and 10,500 that do not exist (NXDOMAIN), each once, which fills
/// both caches to their default 9984 entries (some spare for a query dnsperf may lose). Checked
/// to fail with mimalloc's arena on transparent huge pages (34 MB on epoll, 44.7 MB on io_uring;
/// 19.5 and 22.1 MB without), and, for the THP checks, without main.rs's `PR_SET_THP_DISABLE`;
/// on a host whose THP mode is `always`, also without mimalloc's THP default off (4 MiB of
/// huge pages faulted before `main`).
fn both_full_caches_fit_in_32_mb(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("both_full_caches_fit_in_32_mb/{io}"));
    if !dnsperf::installed() {
        println!("SKIP both_full_caches_fit_in_32_mb: dnsperf not installed");
        return Ok(());
    }
    let stack = Stack::start(TestConfig::for_tests(io).workers(1))?;
    let mut queries = String::new();
    for n in 0..10_500 {
        let _ = writeln!(queries, "fill-{n}.wild.cluster.local A");
        let _ = writeln!(queries, "missing-{n}.default.svc.cluster.local A");
    }
    let query_file = stack.dns.dir().join("fill.txt");
    std::fs::write(&query_file, queries)?;
    let run = dnsperf::once(
        dnsperf::LOCALHOST_53,
        &query_file,
        20_000,
        Duration::from_secs(120),
    )?;
    assert!(run.sent >= 21_000, "dnsperf sent too few:\n{}", run.stdout);
    // The denial entries are still counted: they expire after 5 s (`denial_ttl`), but an
    // expired entry stays in place until evicted or asked for. The gauges move with each
    // insert, before its answer is sent.
    let metrics = http::scrape(stack.dns.metrics()?)?;
    let entries = |kind: &str| {
        metrics
            .iter()
            .filter(|(series, _)| {
                series.starts_with("coredns_cache_entries{")
                    && series.contains(&format!("type=\"{kind}\""))
            })
            .map(|(_, value)| *value)
            .fold(0.0, f64::max)
    };
    assert_eq!(
        (entries("success"), entries("denial")),
        (DEFAULT_CAPACITY, DEFAULT_CAPACITY),
        "(success, denial) entries after the fill:\n{}",
        run.stdout
    );
    // Transparent huge pages are off for the process (main.rs, and mimalloc's own start-up:
    // .cargo/config.toml), whatever the host's THP mode: none back any of its memory. With
    // them, this bound held on a `madvise` host only by luck of layout.
    if let Some(thp) = stack.dns.status_field("THP_enabled")? {
        assert_eq!(thp, "0", "THP_enabled in /proc/PID/status");
    }
    assert_eq!(
        stack.dns.anon_huge_pages()?,
        0,
        "AnonHugePages in /proc/PID/smaps_rollup"
    );
    let rss = stack.dns.rss()?;
    let mb = rss as f64 / 1e6;
    assert!(
        rss <= 32_000_000,
        "VmRSS {mb:.1} MB with both caches full, over the 32 MB bound"
    );
    println!("both caches full: VmRSS {mb:.1} MB");
    Ok(())
}
