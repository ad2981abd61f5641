//! Real stub resolvers through ringdns: glibc (`getent ahosts`, with and without a pod search
//! path) and Go's pure resolver (`perf/testdns`).
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.
//! ringdns listens on 127.0.0.1:53 because glibc only talks to port 53.

use std::net::IpAddr;

use crate::harness::dig::authoritative;
use crate::harness::getent::{self, ResolvConf};
use crate::harness::ringdns::Io;
use crate::harness::{backend_tests, enter_netns, testdns, zones, Stack};

backend_tests!(
    glibc_resolves_a_and_aaaa,
    glibc_expands_the_search_path,
    go_resolver_sees_no_errors,
);

/// The addresses knotd has for `name` (A and AAAA), sorted.
fn authoritative_addrs(stack: &Stack, name: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut addrs = Vec::new();
    for rtype in ["A", "AAAA"] {
        for rdata in authoritative(stack.auth.addr(), name, rtype)?.rdata_of(rtype) {
            addrs.push(rdata.parse()?);
        }
    }
    addrs.sort();
    Ok(addrs)
}

/// glibc's `getent ahosts` gets knotd's A and AAAA addresses through ringdns.
fn glibc_resolves_a_and_aaaa(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("glibc_resolves_a_and_aaaa/{io}"));
    let mut stack = Stack::default_on(io)?;
    assert_eq!(stack.dns.udp(), "127.0.0.1:53".parse()?);
    for name in [zones::svc(2), zones::svc(3), zones::KUBE_DNS.to_owned()] {
        let want = authoritative_addrs(&stack, &name)?;
        for _ in 0..2 {
            let got = getent::ahosts(&name, &ResolvConf::loopback())?;
            assert_eq!(got.code, Some(0), "{name}: {}", got.raw);
            assert_eq!(got.addrs, want, "{name}: {}", got.raw);
        }
    }
    let missing = getent::ahosts(zones::MISSING, &ResolvConf::loopback())?;
    assert_eq!(missing.code, Some(2), "not found: {}", missing.raw);
    stack.dns.stop()
}

/// Short names resolve through a kubelet-style search list and ndots:5.
fn glibc_expands_the_search_path(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("glibc_expands_the_search_path/{io}"));
    let mut stack = Stack::default_on(io)?;
    let resolv = ResolvConf::loopback().pod_search();
    // "svc-4" → svc-4.default.svc.cluster.local (first search entry);
    // "kube-dns.kube-system" → via svc.cluster.local, after NXDOMAIN for the first entry.
    for (short, full) in [
        ("svc-4", zones::svc(4)),
        ("kube-dns.kube-system", zones::KUBE_DNS.to_owned()),
        ("nginx-service", zones::NGINX.to_owned()),
    ] {
        let want = authoritative_addrs(&stack, &full)?;
        let got = getent::ahosts(short, &resolv)?;
        assert_eq!(got.code, Some(0), "{short}: {}", got.raw);
        assert_eq!(got.addrs, want, "{short}: {}", got.raw);
    }
    stack.dns.stop()
}

/// Go's resolver (perf/testdns, 10 goroutines for 2 s) sees no errors.
fn go_resolver_sees_no_errors(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("go_resolver_sees_no_errors/{io}"));
    let mut stack = Stack::default_on(io)?;
    let (summary, output) = testdns::run(stack.dns.udp(), zones::NGINX, 10, 2)?;
    assert!(summary.requests > 0, "{output}");
    assert_eq!(summary.errors, 0, "{output}");
    stack.dns.stop()
}
