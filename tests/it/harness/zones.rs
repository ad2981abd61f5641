//! Generated zone files for the authoritative server, plus the facts tests assert against.
//!
//! Runs on: any (pure).
//!
//! The data mimics what a cluster's DNS serves: `cluster.local.` (services, SRV, a CNAME chain,
//! a wildcard, a mixed-case owner, a name whose answer is bigger than 512 bytes, one with a long
//! TTL), the reverse zone `10.in-addr.arpa.` and an unrelated `example.test.`. Tests should
//! compare ringdns' answers with the authoritative answer (`dig::authoritative`) rather than
//! with these constants where they can; the constants exist for readable expectations.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Number of `svc-N.default.svc.cluster.local` services (N in `0..SERVICES`).
pub const SERVICES: u16 = 200;
/// TTL of every ordinary `cluster.local.` record, and the SOA minimum (negative TTL).
pub const CLUSTER_TTL: u32 = 30;
/// TTL of `longttl.default.svc.cluster.local` (above the 30 s success cap).
pub const LONG_TTL: u32 = 3600;
/// TTL of everything in `example.test.`.
pub const EXAMPLE_TTL: u32 = 300;
/// A records of [`BIG`]: 60 × 16 bytes of answer does not fit 512 bytes but fits 1232.
pub const BIG_RECORDS: u8 = 60;
/// AAAA records of [`HUGE`]: 90 × 28 bytes does not fit 1232 bytes either.
pub const HUGE_RECORDS: u8 = 90;

/// Owner of [`BIG_RECORDS`] A records.
pub const BIG: &str = "big.default.svc.cluster.local.";
/// Owner of [`HUGE_RECORDS`] AAAA records.
pub const HUGE: &str = "huge.default.svc.cluster.local.";
/// The cluster DNS service.
pub const KUBE_DNS: &str = "kube-dns.kube-system.svc.cluster.local.";
/// The service the Go load client resolves in operators' write-ups.
pub const NGINX: &str = "nginx-service.default.svc.cluster.local.";
/// Head of the chain `alias1 → alias2 → svc-1`.
pub const ALIAS: &str = "alias1.default.svc.cluster.local.";
/// A name under the wildcard `*.wild.cluster.local.`.
pub const WILDCARD_NAME: &str = "anything.wild.cluster.local.";
/// An A record with TTL [`LONG_TTL`].
pub const LONGTTL: &str = "longttl.default.svc.cluster.local.";
/// Owner spelled in mixed case in the zone file.
pub const MIXED_CASE: &str = "MiXeD.Default.svc.cluster.local.";
/// A name that does not exist (NXDOMAIN).
pub const MISSING: &str = "no-such-service.default.svc.cluster.local.";
/// The zone apex of the cluster zone.
pub const CLUSTER: &str = "cluster.local.";

/// One zone: its origin and the zone-file text.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Origin with a trailing dot, e.g. `cluster.local.`.
    pub origin: String,
    /// The complete zone file.
    pub text: String,
}

impl From<Zone> for Vec<Zone> {
    /// One zone is a zone list, so `Authoritative::start(zones::cluster_local())` works.
    fn from(zone: Zone) -> Self {
        vec![zone]
    }
}

/// `svc-N.default.svc.cluster.local.`.
pub fn svc(n: u16) -> String {
    format!("svc-{n}.default.svc.cluster.local.")
}

/// The A address of service `n`: 10.100.N/256.N%256.
pub fn svc_v4(n: u16) -> Ipv4Addr {
    let [high, low] = n.to_be_bytes();
    Ipv4Addr::new(10, 100, high, low)
}

/// The AAAA address of service `n` (only even `n` have one).
pub fn svc_v6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x100, n)
}

/// The reverse (PTR) owner of an IPv4 address.
pub fn reverse_v4(addr: Ipv4Addr) -> String {
    let [a, b, c, d] = addr.octets();
    format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
}

/// The A addresses of [`BIG`], in zone-file order.
pub fn big_v4() -> Vec<Ipv4Addr> {
    (1..=BIG_RECORDS)
        .map(|i| Ipv4Addr::new(10, 200, 0, i))
        .collect()
}

/// Address of [`KUBE_DNS`].
pub const KUBE_DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Address of [`NGINX`].
pub const NGINX_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 1, 80);
/// Address of every name under the wildcard.
pub const WILDCARD_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 3, 3);
/// Address of [`LONGTTL`].
pub const LONGTTL_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 4, 4);
/// Address of [`MIXED_CASE`].
pub const MIXED_CASE_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 5, 5);

/// All three zones the tests serve.
pub fn all() -> Vec<Zone> {
    vec![cluster_local(), reverse_10(), example_test()]
}

/// The SOA + NS lines every zone starts with.
fn apex(origin: &str, ttl: u32, minimum: u32) -> String {
    format!(
        "$ORIGIN {origin}\n$TTL {ttl}\n\
         @ IN SOA ns.dns.{origin} hostmaster.{origin} 1 7200 1800 86400 {minimum}\n\
         @ IN NS ns.dns.{origin}\n\
         ns.dns IN A 127.0.0.10\n"
    )
}

/// `cluster.local.`: TTL 30, SOA minimum 30.
pub fn cluster_local() -> Zone {
    let mut text = apex(CLUSTER, CLUSTER_TTL, CLUSTER_TTL);
    for n in 0..SERVICES {
        let name = svc(n);
        let _ = writeln!(text, "{name} IN A {}", svc_v4(n));
        if n % 2 == 0 {
            let _ = writeln!(text, "{name} IN AAAA {}", svc_v6(n));
        }
        let _ = writeln!(text, "_http._tcp.{name} IN SRV 0 100 80 {name}");
    }
    let _ = writeln!(text, "{KUBE_DNS} IN A {KUBE_DNS_V4}");
    let _ = writeln!(text, "{NGINX} IN A {NGINX_V4}");
    let _ = writeln!(text, "{ALIAS} IN CNAME alias2.default.svc.cluster.local.");
    let _ = writeln!(
        text,
        "alias2.default.svc.cluster.local. IN CNAME {}",
        svc(1)
    );
    let _ = writeln!(text, "*.wild IN A {WILDCARD_V4}");
    let _ = writeln!(text, "{LONGTTL} {LONG_TTL} IN A {LONGTTL_V4}");
    let _ = writeln!(text, "{MIXED_CASE} IN A {MIXED_CASE_V4}");
    for addr in big_v4() {
        let _ = writeln!(text, "{BIG} IN A {addr}");
    }
    for i in 1..=u16::from(HUGE_RECORDS) {
        let _ = writeln!(text, "{HUGE} IN AAAA fd00::200:{i:x}");
    }
    Zone {
        origin: CLUSTER.to_owned(),
        text,
    }
}

/// `10.in-addr.arpa.`: PTRs for the services and kube-dns.
pub fn reverse_10() -> Zone {
    let origin = "10.in-addr.arpa.";
    let mut text = apex(origin, CLUSTER_TTL, CLUSTER_TTL);
    for n in 0..SERVICES {
        let _ = writeln!(text, "{} IN PTR {}", reverse_v4(svc_v4(n)), svc(n));
    }
    let _ = writeln!(text, "{} IN PTR {KUBE_DNS}", reverse_v4(KUBE_DNS_V4));
    let _ = writeln!(text, "{} IN PTR {NGINX}", reverse_v4(NGINX_V4));
    Zone {
        origin: origin.to_owned(),
        text,
    }
}

/// `example.test.`: an unrelated zone with TTL 300.
pub fn example_test() -> Zone {
    let origin = "example.test.";
    let mut text = apex(origin, EXAMPLE_TTL, EXAMPLE_TTL);
    text.push_str("www IN A 192.0.2.1\nwww IN AAAA 2001:db8::1\n");
    text.push_str("@ IN MX 10 mail.example.test.\nmail IN A 192.0.2.25\n");
    text.push_str("@ IN TXT \"v=spf1 -all\"\n");
    Zone {
        origin: origin.to_owned(),
        text,
    }
}
