//! Health, readiness, lame duck and Prometheus metrics, seen from outside: real knotd, the real
//! binary, dig over UDP and TCP, and plain HTTP/1.0 GETs over a std `TcpStream`.
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.
//!
//! Counters are asserted with `≥`, never `=`, where a client retry could add to them; timing is
//! never asserted, only behaviour (still answering during lame duck, exit 0 after it).

use std::collections::BTreeMap;
use std::time::Duration;

use domain::base::iana::OptRcode;

use crate::harness::auth::Authoritative;
use crate::harness::dig::{dig, Dig};
use crate::harness::http::{self, http_get};
use crate::harness::ringdns::{Io, Ringdns, TestConfig};
use crate::harness::{backend_tests, enter_netns, wait_for, zones};

backend_tests!(
    metrics_count_queries_by_server_zone_type_rcode_and_cache,
    health_and_ready_then_lame_duck_on_sigterm,
    metrics_endpoint_is_off_when_listen_is_empty,
);

/// A zone whose only upstream refuses (nothing listens there): its queries end in SERVFAIL.
const DEAD_ZONE: &str = "dead.test";

/// A closed port on the namespace's loopback.
const DEAD_UPSTREAM: &str = "127.0.0.99:53";

/// Scrapes `dns`'s `/metrics`.
fn scrape(dns: &Ringdns) -> anyhow::Result<BTreeMap<String, f64>> {
    http::scrape(dns.metrics()?)
}

/// Asserts `series` is in `metrics` with a value of at least `min`.
fn assert_at_least(metrics: &BTreeMap<String, f64>, series: &str, min: f64) {
    let dump = || {
        metrics
            .iter()
            .filter(|(name, _)| {
                name.starts_with("coredns_dns_") || name.starts_with("coredns_cache")
            })
            .map(|(name, value)| format!("{name} {value}\n"))
            .collect::<String>()
    };
    match metrics.get(series) {
        Some(&value) => assert!(value >= min, "{series} = {value}, want ≥ {min}\n{}", dump()),
        None => panic!(
            "{series} missing; coredns_dns_* and cache series:\n{}",
            dump()
        ),
    }
}

/// Queries of several types and rcodes over UDP and TCP, on both listen addresses, move the
/// CoreDNS-named counters with the right labels.
fn metrics_count_queries_by_server_zone_type_rcode_and_cache(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "metrics_count_queries_by_server_zone_type_rcode_and_cache/{io}"
    ));
    let auth = Authoritative::start(zones::all())?;
    // One worker, so repeats are hits in the one shard whatever source port dig picks.
    let config = TestConfig::for_tests(io)
        .workers(1)
        .forward("cluster.local", auth.addr())
        .forward_with(DEAD_ZONE, &[DEAD_UPSTREAM.parse()?], "udp", "1s")
        .forward(".", auth.addr());
    let mut dns = Ringdns::start(&config)?;
    for _ in 0..3 {
        assert_eq!(
            dig(dns.udp(), zones::KUBE_DNS, "A")?.rcode,
            OptRcode::NOERROR
        );
    }
    for _ in 0..2 {
        assert_eq!(
            dig(dns.udp(), zones::MISSING, "A")?.rcode,
            OptRcode::NXDOMAIN
        );
    }
    let tcp = Dig::new(dns.tcp(), zones::KUBE_DNS, "A").tcp().run()?;
    assert_eq!(tcp.rcode, OptRcode::NOERROR);
    assert_eq!(
        dig(dns.udp(), &zones::svc(2), "AAAA")?.rcode,
        OptRcode::NOERROR
    );
    assert_eq!(
        dig(dns.udp(), "example.test.", "MX")?.rcode,
        OptRcode::NOERROR
    );
    assert_eq!(
        dig(dns.udp(), "example.test.", "NAPTR")?.rcode,
        OptRcode::NOERROR
    );
    assert_eq!(dig(dns.udp6(), zones::NGINX, "A")?.rcode, OptRcode::NOERROR);
    let dead = dig(dns.udp(), &format!("www.{DEAD_ZONE}."), "A")?;
    assert_eq!(dead.rcode, OptRcode::SERVFAIL);

    let metrics = scrape(&dns)?;
    let v4 = r#"server="dns://127.0.0.1:53""#;
    let v6 = r#"server="dns://[::1]:53""#;
    let cluster = r#"zone="cluster.local.",view="""#;
    let root = r#"zone=".",view="""#;
    for (series, min) in [
        // KUBE_DNS ×3 and MISSING ×2 over UDP, once over TCP.
        (format!(r#"coredns_dns_requests_total{{{v4},{cluster},proto="udp",family="1",type="A"}}"#), 5.0),
        (format!(r#"coredns_dns_requests_total{{{v4},{cluster},proto="tcp",family="1",type="A"}}"#), 1.0),
        (format!(r#"coredns_dns_requests_total{{{v4},{cluster},proto="udp",family="1",type="AAAA"}}"#), 1.0),
        (format!(r#"coredns_dns_requests_total{{{v4},{root},proto="udp",family="1",type="MX"}}"#), 1.0),
        (format!(r#"coredns_dns_requests_total{{{v4},{root},proto="udp",family="1",type="other"}}"#), 1.0),
        (format!(r#"coredns_dns_requests_total{{{v6},{cluster},proto="udp",family="2",type="A"}}"#), 1.0),
        (format!(r#"coredns_dns_requests_total{{{v4},zone="dead.test.",view="",proto="udp",family="1",type="A"}}"#), 1.0),
        // Two KUBE_DNS hits over UDP and one over TCP; the first lookup went upstream.
        (format!(r#"coredns_dns_responses_total{{{v4},{cluster},rcode="NOERROR",plugin="cache"}}"#), 3.0),
        (format!(r#"coredns_dns_responses_total{{{v4},{cluster},rcode="NOERROR",plugin="forward"}}"#), 1.0),
        (format!(r#"coredns_dns_responses_total{{{v4},{cluster},rcode="NXDOMAIN",plugin="forward"}}"#), 1.0),
        (format!(r#"coredns_dns_responses_total{{{v4},{cluster},rcode="NXDOMAIN",plugin="cache"}}"#), 1.0),
        (format!(r#"coredns_dns_responses_total{{{v4},zone="dead.test.",view="",rcode="SERVFAIL",plugin=""}}"#), 1.0),
        (format!(r#"coredns_dns_request_duration_seconds_count{{{v4},{cluster}}}"#), 7.0),
        (format!(r#"coredns_dns_request_duration_seconds_bucket{{{v4},{cluster},le="0.00025"}}"#), 3.0),
        (format!(r#"coredns_dns_request_size_bytes_count{{{v4},{cluster},proto="tcp"}}"#), 1.0),
        (format!(r#"coredns_dns_response_size_bytes_count{{{v4},{cluster},proto="udp"}}"#), 6.0),
        (format!(r#"coredns_cache_hits_total{{{v4},type="success",zones="cluster.local.",view=""}}"#), 3.0),
        (format!(r#"coredns_cache_hits_total{{{v4},type="denial",zones="cluster.local.",view=""}}"#), 1.0),
        (format!(r#"coredns_cache_misses_total{{{v4},zones="cluster.local.",view=""}}"#), 2.0),
        (format!(r#"coredns_cache_requests_total{{{v4},zones="cluster.local.",view=""}}"#), 6.0),
        (format!(r#"coredns_cache_entries{{{v4},type="success",zones=".",view=""}}"#), 2.0),
        (format!(r#"coredns_cache_entries{{{v4},type="denial",zones=".",view=""}}"#), 1.0),
        (r#"coredns_proxy_request_duration_seconds_count{proxy_name="forward",to="127.0.0.10:53",rcode="NOERROR"}"#.to_owned(), 1.0),
        (r#"coredns_proxy_request_duration_seconds_count{proxy_name="forward",to="127.0.0.10:53",rcode="NXDOMAIN"}"#.to_owned(), 1.0),
        (r#"coredns_proxy_healthcheck_failures_total{proxy_name="forward",to="127.0.0.99:53"}"#.to_owned(), 1.0),
        (format!(r#"ringdns_io_backend{{backend="{}"}}"#, dns.ready().io), 1.0),
        (r#"ringdns_worker_queries_total{worker="0"}"#.to_owned(), 11.0),
        ("ringdns_process_resident_memory_bytes".to_owned(), 1.0),
        ("coredns_reload_failed_total".to_owned(), 0.0),
        (r#"coredns_nodecache_setup_errors_total{errortype="iptables"}"#.to_owned(), 0.0),
    ] {
        assert_at_least(&metrics, &series, min);
    }
    assert!(
        metrics
            .keys()
            .any(|name| name.starts_with("coredns_build_info{version=")),
        "coredns_build_info missing"
    );
    dns.stop()
}

/// `/ready` and `/health` are 200 while serving; after SIGTERM `/health` turns 503 at once
/// while queries are still answered for the lame-duck period; then ringdns exits 0.
fn health_and_ready_then_lame_duck_on_sigterm(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("health_and_ready_then_lame_duck_on_sigterm/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let config = TestConfig::for_tests(io)
        .lameduck("4s")
        .forward(".", auth.addr());
    let mut dns = Ringdns::start(&config)?;
    let health = dns.health()?;
    assert_eq!(
        health,
        "127.0.0.1:8080".parse()?,
        "default: first listen IP, port 8080"
    );
    let ready = http_get(health, "/ready")?;
    assert_eq!(ready.status, 200, "/ready: {}", ready.body);
    let healthy = http_get(health, "/health")?;
    assert_eq!((healthy.status, healthy.body.as_str()), (200, "OK"));
    assert_eq!(http_get(health, "/nope")?.status, 404);
    assert_eq!(
        http_get(health, "/metrics")?.status,
        404,
        "metrics only on the metrics listener"
    );
    // The check's own id.server CH TXT query is counted like any other, under zone ".".
    let metrics = scrape(&dns)?;
    assert_at_least(
        &metrics,
        r#"coredns_dns_requests_total{server="dns://127.0.0.1:53",zone=".",view="",proto="udp",family="1",type="TXT"}"#,
        1.0,
    );
    assert_at_least(
        &metrics,
        r#"coredns_dns_responses_total{server="dns://127.0.0.1:53",zone=".",view="",rcode="NOERROR",plugin="chaos"}"#,
        1.0,
    );
    assert_at_least(
        &metrics,
        "coredns_health_request_duration_seconds_count",
        1.0,
    );
    // The probe's query, from a real client: answered locally (RFC 4892), AA set.
    let id = Dig::new(dns.udp(), "id.server.", "TXT")
        .option("CH")
        .run()?;
    assert_eq!(id.rcode, OptRcode::NOERROR);
    assert_eq!(id.rdata_of("TXT"), vec!["\"ringdns\"".to_owned()]);
    assert!(id.aa(), "authoritative for id.server.");

    dns.sigterm()?;
    let lame = wait_for(
        "/health turns 503 after SIGTERM",
        Duration::from_secs(2),
        Duration::from_millis(50),
        || {
            let response = http_get(health, "/health")?;
            Ok((response.status == 503).then_some(response))
        },
    )?;
    assert!(
        lame.body.contains("lame duck"),
        "reason in the body: {}",
        lame.body
    );
    let answer = dig(dns.udp(), zones::KUBE_DNS, "A")?;
    assert_eq!(
        answer.rcode,
        OptRcode::NOERROR,
        "still answering during lame duck"
    );
    assert_eq!(answer.rdata_of("A"), vec![zones::KUBE_DNS_V4.to_string()]);
    let tcp = Dig::new(dns.tcp(), zones::NGINX, "A").tcp().run()?;
    assert_eq!(tcp.rcode, OptRcode::NOERROR, "TCP too");
    assert_eq!(
        http_get(health, "/ready")?.status,
        503,
        "not ready while shutting down"
    );
    dns.stop() // waits for the exit after the lame-duck period; must be 0
}

/// `[metrics] listen = ""` turns the endpoint off; health stays.
fn metrics_endpoint_is_off_when_listen_is_empty(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "metrics_endpoint_is_off_when_listen_is_empty/{io}"
    ));
    let auth = Authoritative::start(zones::all())?;
    let mut config = TestConfig::for_tests(io).forward(".", auth.addr());
    config.metrics_listen = Some(String::new());
    let mut dns = Ringdns::start(&config)?;
    assert!(
        dns.ready().line.contains("metrics=off"),
        "{}",
        dns.ready().line
    );
    assert_eq!(dns.ready().metrics, None);
    assert!(
        std::net::TcpStream::connect_timeout(&"127.0.0.1:9253".parse()?, Duration::from_secs(5))
            .is_err(),
        "nothing listens on the default metrics port"
    );
    let health = http_get(dns.health()?, "/health")?;
    assert_eq!(health.status, 200, "{}", health.body);
    dns.stop()
}
