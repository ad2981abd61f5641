//! Live reload, seen from outside: SIGHUP and file changes apply new zones, upstreams, cache
//! limits and listen addresses (with the node interface and rules following them); an invalid file is rejected while the old config answers; a
//! reload under a fixed-rate dnsperf load loses no query.
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.
//!
//! Every wait is bounded (`wait_for`); no speed is asserted, only what is answered.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use domain::base::iana::OptRcode;

use crate::harness::auth::Authoritative;
use crate::harness::dig::{dig, Dig};
use crate::harness::faulty::{FaultyUpstream, Source};
use crate::harness::ringdns::{Io, Ringdns, TestConfig};
use crate::harness::{backend_tests, dnsperf, enter_netns, http, run_bounded, wait_for, zones};

backend_tests!(
    sighup_applies_a_new_zone_and_upstream,
    file_change_applies_without_sighup,
    invalid_file_is_rejected_and_counted,
    cache_is_kept_across_a_reload,
    listen_addresses_are_added_and_removed,
    listen_change_updates_node_interface_and_rules,
    reload_under_load_loses_no_query,
);

/// The zone only the second upstream answers.
const SECOND_ZONE: &str = "second.test";

/// The address every name of [`SECOND_ZONE`] has on the second upstream.
const SECOND_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);

/// Where the second upstream (a [`FaultyUpstream`] table) listens.
const SECOND_UPSTREAM: &str = "127.0.0.11:53";

/// Names of [`SECOND_ZONE`] the second upstream knows; each attempt asks a fresh one, so a
/// negative answer cached before the reload never hides the new zone.
const SECOND_NAMES: usize = 40;

/// Bound on a reload taking effect (the file watch polls every 2 s).
const APPLY_TIMEOUT: Duration = Duration::from_secs(6);

/// Poll interval of the bounded waits.
const POLL: Duration = Duration::from_millis(250);

/// `n{index}.second.test.`
fn second_name(index: usize) -> String {
    format!("n{index}.{SECOND_ZONE}.")
}

/// Starts the second upstream: a table answering every [`second_name`] with [`SECOND_V4`].
fn second_upstream() -> anyhow::Result<FaultyUpstream> {
    let names: Vec<String> = (0..SECOND_NAMES).map(second_name).collect();
    let addrs = [IpAddr::V4(SECOND_V4)];
    let entries: Vec<(&str, &[IpAddr])> = names
        .iter()
        .map(|name| (name.as_str(), &addrs[..]))
        .collect();
    FaultyUpstream::start(SECOND_UPSTREAM.parse()?, FaultyUpstream::table(&entries))
}

/// Whether `name` resolves through `dns` to [`SECOND_V4`].
fn answers_second(dns: &Ringdns, name: &str) -> anyhow::Result<bool> {
    let answer = dig(dns.udp(), name, "A")?;
    Ok(answer.rcode == OptRcode::NOERROR && answer.rdata_of("A") == [SECOND_V4.to_string()])
}

/// Waits until fresh names of the second zone resolve (one new name per attempt).
fn wait_for_second_zone(dns: &Ringdns, first: usize) -> anyhow::Result<()> {
    let mut next = first;
    wait_for("the second zone resolves", APPLY_TIMEOUT, POLL, || {
        let name = second_name(next % SECOND_NAMES);
        next += 1;
        Ok(answers_second(dns, &name)?.then_some(()))
    })
}

/// Scrapes `dns`'s `/metrics`.
fn scrape(dns: &Ringdns) -> anyhow::Result<BTreeMap<String, f64>> {
    http::scrape(dns.metrics()?)
}

/// `coredns_reload_failed_total` now.
fn reload_failures(dns: &Ringdns) -> anyhow::Result<f64> {
    scrape(dns)?
        .get("coredns_reload_failed_total")
        .copied()
        .context("no coredns_reload_failed_total series")
}

/// A zone and upstream added by SIGHUP: names only the second upstream knows resolve after
/// the reload, not before; the upstream metrics then list it.
fn sighup_applies_a_new_zone_and_upstream(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("sighup_applies_a_new_zone_and_upstream/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let second = second_upstream()?;
    let config = TestConfig::for_tests(io).forward(".", auth.addr());
    let mut dns = Ringdns::start(&config)?;
    assert!(
        !answers_second(&dns, &second_name(0))?,
        "the second zone must not resolve before the reload"
    );
    dns.rewrite_config(&config.clone().forward(SECOND_ZONE, second.addr()))?;
    dns.sighup()?;
    wait_for_second_zone(&dns, 1)?;
    assert_eq!(
        dig(dns.udp(), zones::KUBE_DNS, "A")?.rcode,
        OptRcode::NOERROR
    );
    let series = scrape(&dns)?;
    assert!(
        series
            .keys()
            .any(|name| name.contains(&format!("to=\"{SECOND_UPSTREAM}\""))),
        "upstream metrics must list the new upstream: {series:?}"
    );
    dns.stop()
}

/// Editing the file without a signal applies it within the watch interval.
fn file_change_applies_without_sighup(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("file_change_applies_without_sighup/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let second = second_upstream()?;
    let config = TestConfig::for_tests(io).forward(".", auth.addr());
    let mut dns = Ringdns::start(&config)?;
    dns.rewrite_config(&config.clone().forward(SECOND_ZONE, second.addr()))?;
    wait_for_second_zone(&dns, 0)?;
    dns.stop()
}

/// An invalid file is rejected and counted once; the old configuration keeps answering.
fn invalid_file_is_rejected_and_counted(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("invalid_file_is_rejected_and_counted/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let config = TestConfig::for_tests(io).forward(".", auth.addr());
    let mut dns = Ringdns::start(&config)?;
    assert_eq!(reload_failures(&dns)?, 0.0);
    // Only the file watch triggers this reload, so it is attempted exactly once.
    let broken = config.to_toml().replace("workers = 2", "workers = \"two\"");
    dns.rewrite_config_text(&broken)?;
    wait_for("the reload failure is counted", APPLY_TIMEOUT, POLL, || {
        Ok((reload_failures(&dns)? >= 1.0).then_some(()))
    })?;
    assert_eq!(
        dig(dns.udp(), zones::KUBE_DNS, "A")?.rcode,
        OptRcode::NOERROR
    );
    assert_eq!(
        dig(dns.udp(), zones::NGINX, "A")?.rcode,
        OptRcode::NOERROR,
        "an uncached name must still be forwarded under the old configuration"
    );
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        reload_failures(&dns)?,
        1.0,
        "an unchanged file is not retried"
    );
    dns.stop()
}

/// A reload that raises the cache limits (and adds a zone) keeps what is cached: with the
/// upstream stopped, the cached name is still answered.
fn cache_is_kept_across_a_reload(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("cache_is_kept_across_a_reload/{io}"));
    let mut auth = Authoritative::start(zones::all())?;
    let second = second_upstream()?;
    // One worker: every query meets the one shard, whatever source port dig picks.
    let config = TestConfig::for_tests(io)
        .workers(1)
        .cache_int("success_capacity", 100)
        .forward(".", auth.addr());
    let mut dns = Ringdns::start(&config)?;
    let first = dig(dns.udp(), zones::KUBE_DNS, "A")?;
    assert_eq!(first.rcode, OptRcode::NOERROR);
    auth.stop()?;
    let bigger = TestConfig::for_tests(io)
        .workers(1)
        .cache_int("success_capacity", 20000)
        .forward(".", auth.addr())
        .forward(SECOND_ZONE, second.addr());
    dns.rewrite_config(&bigger)?;
    dns.sighup()?;
    // The new zone resolving shows the reload (cache limits included) is in force.
    wait_for_second_zone(&dns, 0)?;
    let second_answer = dig(dns.udp(), zones::KUBE_DNS, "A")?;
    assert_eq!(
        second_answer.rcode,
        OptRcode::NOERROR,
        "must come from the kept cache, not SERVFAIL"
    );
    assert_eq!(first.rdata(), second_answer.rdata());
    dns.stop()
}

/// Whether `server` answers a cached-or-forwarded name over UDP and TCP (one try, 1 s).
fn serves(server: SocketAddr) -> bool {
    let ask = |dig: Dig| {
        dig.option("+time=1")
            .run()
            .is_ok_and(|answer| answer.rcode == OptRcode::NOERROR)
    };
    ask(Dig::new(server, zones::KUBE_DNS, "A")) && ask(Dig::new(server, zones::KUBE_DNS, "A").tcp())
}

/// Adding 127.0.0.2:53 makes it answer (UDP and TCP); removing it again stops that while the
/// first address keeps answering.
fn listen_addresses_are_added_and_removed(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("listen_addresses_are_added_and_removed/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let first: SocketAddr = "127.0.0.1:53".parse()?;
    let added: SocketAddr = "127.0.0.2:53".parse()?;
    let config = TestConfig::for_tests(io)
        .listen(&[first])
        .forward(".", auth.addr());
    let mut dns = Ringdns::start(&config)?;
    assert!(!serves(added), "{added} must not answer before the reload");
    dns.rewrite_config(&config.clone().listen(&[first, added]))?;
    dns.sighup()?;
    wait_for("the added address answers", APPLY_TIMEOUT, POLL, || {
        Ok(serves(added).then_some(()))
    })?;
    assert!(serves(first));
    dns.rewrite_config(&config)?;
    dns.sighup()?;
    wait_for(
        "the removed address stops answering",
        APPLY_TIMEOUT,
        POLL,
        || Ok((!serves(added)).then_some(())),
    )?;
    assert!(serves(first), "{first} must keep answering");
    dns.stop()
}

/// Runs `program args` (bounded); its stdout, or an error with its stderr.
fn tool(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = run_bounded(Command::new(program).args(args), Duration::from_secs(10))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// With `[node]` interface and iptables set-up, a listen address added by reload is put on
/// the interface, gets its interception rules and answers; removed again, its rules go and it
/// no longer answers, while the first address keeps both.
fn listen_change_updates_node_interface_and_rules(io: Io) -> anyhow::Result<()> {
    let name = format!("listen_change_updates_node_interface_and_rules/{io}");
    let _ns = enter_netns!(&name);
    for program in ["iptables", "iptables-save", "ip"] {
        if tool("sh", &["-c", &format!("command -v {program}")]).is_err() {
            println!("SKIP {name}: {program} is not installed");
            return Ok(());
        }
    }
    let auth = Authoritative::start(zones::all())?;
    let first: SocketAddr = "169.254.20.10:53".parse()?;
    let added: SocketAddr = "169.254.20.11:53".parse()?;
    let config = TestConfig::for_tests(io)
        .listen(&[first])
        .forward(".", auth.addr())
        .node_key("setup_interface", "true")
        .node_key("setup_iptables", "true")
        .node_key("rules", "\"iptables\"");
    let mut dns = Ringdns::start(&config)?;
    let added_ip = added.ip().to_string();
    assert!(!tool("iptables-save", &[])?.contains(&added_ip));
    dns.rewrite_config(&config.clone().listen(&[first, added]))?;
    dns.sighup()?;
    wait_for("the added address answers", APPLY_TIMEOUT, POLL, || {
        Ok(serves(added).then_some(()))
    })?;
    let interface = tool("ip", &["addr", "show", "dev", "nodelocaldns"])?;
    assert!(
        interface.contains(&format!("{added_ip}/32")),
        "interface:\n{interface}"
    );
    let rules = tool("iptables-save", &[])?;
    assert!(
        rules.contains(&format!("{added_ip}/32")),
        "rules for the new IP:\n{rules}"
    );
    dns.rewrite_config(&config)?;
    dns.sighup()?;
    wait_for(
        "the removed address stops answering",
        APPLY_TIMEOUT,
        POLL,
        || Ok((!serves(added)).then_some(())),
    )?;
    wait_for(
        "the removed address's rules go",
        APPLY_TIMEOUT,
        POLL,
        || Ok((!tool("iptables-save", &[])?.contains(&added_ip)).then_some(())),
    )?;
    assert!(serves(first), "{first} must keep answering");
    assert!(tool("iptables-save", &[])?.contains(&first.ip().to_string()));
    dns.stop()
}

/// Queries per second dnsperf sends (fixed rate), and for how long.
const LOAD_QPS: u32 = 2000;
/// Seconds of load.
const LOAD_SECS: u32 = 6;

/// dnsperf at a fixed bounded rate against 127.0.0.1 while three SIGHUPs change the cache
/// limits, the batch wait (longest, then none) and the upstreams: "Queries lost: 0".
fn reload_under_load_loses_no_query(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("reload_under_load_loses_no_query/{io}"));
    if !dnsperf::installed() {
        println!("SKIP reload_under_load: dnsperf not installed");
        return Ok(());
    }
    let auth = Authoritative::start(zones::all())?;
    let relay = FaultyUpstream::start(SECOND_UPSTREAM.parse()?, Source::Forward(auth.addr()))?;
    let base = TestConfig::for_tests(io);
    let config = base.clone().forward(".", auth.addr());
    let mut dns = Ringdns::start(&config)?;
    // Cached names (asked once now) and uncached ones (first asked under load).
    let mut queries = String::new();
    for name in [zones::KUBE_DNS, zones::NGINX] {
        assert_eq!(dig(dns.udp(), name, "A")?.rcode, OptRcode::NOERROR);
        queries.push_str(&format!("{name} A\n"));
    }
    for n in 0..zones::SERVICES {
        queries.push_str(&format!("{} A\n", zones::svc(n)));
    }
    let query_file = dns.dir().join("queries.txt");
    std::fs::write(&query_file, queries)?;
    let reloads = [
        config
            .clone()
            .cache_int("success_capacity", 20000)
            .server_key("batch_wait", "\"1ms\""),
        base.clone()
            .cache_int("success_capacity", 20000)
            .server_key("batch_wait", "\"1ms\"")
            .forward_with(".", &[relay.addr(), auth.addr()], "udp", "3s"),
        config
            .clone()
            .cache_int("denial_capacity", 5000)
            .server_key("batch_wait", "\"0s\""),
    ];
    let load = {
        let query_file = query_file.clone();
        // The thread shares this test's network namespace.
        thread::spawn(move || {
            dnsperf::fixed_rate(dnsperf::LOCALHOST_53, &query_file, LOAD_QPS, LOAD_SECS)
        })
    };
    for config in &reloads {
        thread::sleep(Duration::from_millis(1500));
        dns.rewrite_config(config)?;
        dns.sighup()?;
    }
    let dnsperf::Run { sent, lost, stdout } = load
        .join()
        .map_err(|_| anyhow::anyhow!("dnsperf thread panicked"))??;
    assert!(sent > 0, "dnsperf sent nothing:\n{stdout}");
    assert_eq!(lost, 0, "queries lost during reloads:\n{stdout}");
    // Each reload was applied, none rejected; the batch wait went to the workers twice.
    assert_eq!(reload_failures(&dns)?, 0.0);
    let applied = dns.stderr();
    let serving = applied
        .lines()
        .filter(|line| line.contains("reload applied") && line.contains("serving"))
        .count();
    assert_eq!(serving, 2, "reload log:\n{applied}");
    dns.stop()
}
