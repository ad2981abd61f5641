//! ringdns' answers agree with the authoritative server's: every common type, CNAME chains,
//! wildcards, negative answers; over UDP and TCP, on IPv4 and IPv6; IDs and question case
//! echoed exactly.
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.

use domain::base::iana::{OptRcode, Rtype};

use crate::harness::client::{self, Edns, Query};
use crate::harness::dig::{authoritative, Dig, DigAnswer};
use crate::harness::ringdns::Io;
use crate::harness::{backend_tests, enter_netns, zones, Stack};

backend_tests!(
    positive_answers_match_authoritative,
    cname_chain_and_wildcard_match_authoritative,
    negative_answers_match_authoritative,
    tcp_and_ipv6_listeners_answer_like_udp,
    client_sees_id_flags_and_question_echoed,
    question_case_is_echoed_on_miss_and_hit,
    ready_line_reports_the_configured_backend,
);

/// Asserts ringdns' answer carries the same rcode and records as knotd's, and the header bits
/// a recursive cache sets (RA; AA never, since ringdns is not authoritative).
fn assert_same(ours: &DigAnswer, theirs: &DigAnswer, what: &str) {
    assert_eq!(ours.rcode, theirs.rcode, "{what}: rcode\n{}", ours.raw);
    assert_eq!(ours.rdata(), theirs.rdata(), "{what}: answer\n{}", ours.raw);
    assert!(
        ours.ra(),
        "{what}: RA must be set by a recursive cache\n{}",
        ours.raw
    );
    assert!(!ours.tc(), "{what}: unexpected TC\n{}", ours.raw);
}

/// The (name, type) pairs with positive answers checked against knotd.
fn positive_cases() -> Vec<(String, &'static str)> {
    vec![
        (zones::svc(1), "A"),
        (zones::svc(2), "AAAA"),
        (zones::svc(198), "A"),
        (format!("_http._tcp.{}", zones::svc(3)), "SRV"),
        (zones::reverse_v4(zones::svc_v4(7)), "PTR"),
        (zones::reverse_v4(zones::KUBE_DNS_V4), "PTR"),
        (zones::KUBE_DNS.to_owned(), "A"),
        (zones::NGINX.to_owned(), "A"),
        (zones::CLUSTER.to_owned(), "SOA"),
        (zones::CLUSTER.to_owned(), "NS"),
        ("www.example.test.".to_owned(), "A"),
        ("www.example.test.".to_owned(), "AAAA"),
        ("example.test.".to_owned(), "MX"),
        ("example.test.".to_owned(), "TXT"),
    ]
}

/// A, AAAA, SRV, PTR, SOA, NS, MX, TXT through ringdns equal knotd's answers.
fn positive_answers_match_authoritative(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("positive_answers_match_authoritative/{io}"));
    let mut stack = Stack::default_on(io)?;
    for (name, rtype) in positive_cases() {
        let theirs = authoritative(stack.auth.addr(), &name, rtype)?;
        assert!(
            !theirs.answer.is_empty(),
            "fixture: {name} {rtype} has data"
        );
        let ours = Dig::new(stack.dns.udp(), &name, rtype).run()?;
        assert_same(&ours, &theirs, &format!("{name} {rtype}"));
    }
    stack.dns.stop()
}

/// A two-link CNAME chain and wildcard expansion come back as knotd serves them.
fn cname_chain_and_wildcard_match_authoritative(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "cname_chain_and_wildcard_match_authoritative/{io}"
    ));
    let mut stack = Stack::default_on(io)?;
    let theirs = authoritative(stack.auth.addr(), zones::ALIAS, "A")?;
    let ours = Dig::new(stack.dns.udp(), zones::ALIAS, "A").run()?;
    assert_same(&ours, &theirs, "CNAME chain");
    assert_eq!(ours.rdata_of("CNAME").len(), 2, "both links:\n{}", ours.raw);
    assert_eq!(ours.rdata_of("A"), vec![zones::svc_v4(1).to_string()]);
    // The second link is now cached on its own too, and must not break the chain.
    let middle = Dig::new(stack.dns.udp(), "alias2.default.svc.cluster.local.", "A").run()?;
    assert_eq!(middle.rdata_of("A"), vec![zones::svc_v4(1).to_string()]);
    let again = Dig::new(stack.dns.udp(), zones::ALIAS, "A").run()?;
    assert_eq!(
        again.rdata(),
        theirs.rdata(),
        "cached chain:\n{}",
        again.raw
    );

    for name in [zones::WILDCARD_NAME, "other.wild.cluster.local."] {
        let theirs = authoritative(stack.auth.addr(), name, "A")?;
        let ours = Dig::new(stack.dns.udp(), name, "A").run()?;
        assert_same(&ours, &theirs, name);
        assert_eq!(
            ours.answer[0].name, name,
            "wildcard expanded to the query name"
        );
    }
    stack.dns.stop()
}

/// NXDOMAIN and NODATA keep their rcode, an empty answer and the SOA.
fn negative_answers_match_authoritative(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("negative_answers_match_authoritative/{io}"));
    let mut stack = Stack::default_on(io)?;
    let cases = [
        (zones::MISSING.to_owned(), "A", OptRcode::NXDOMAIN),
        ("nope.example.test.".to_owned(), "AAAA", OptRcode::NXDOMAIN),
        (zones::svc(1), "AAAA", OptRcode::NOERROR), // NODATA: odd services have no AAAA
        (zones::svc(2), "TXT", OptRcode::NOERROR),
    ];
    for (name, rtype, rcode) in cases {
        let theirs = authoritative(stack.auth.addr(), &name, rtype)?;
        assert_eq!(theirs.rcode, rcode, "fixture");
        let ours = Dig::new(stack.dns.udp(), &name, rtype).run()?;
        assert_same(&ours, &theirs, &format!("{name} {rtype}"));
        assert!(ours.answer.is_empty(), "{}", ours.raw);
        let soa: Vec<_> = ours.authority.iter().filter(|r| r.rtype == "SOA").collect();
        assert_eq!(
            soa.len(),
            1,
            "negative answer carries the SOA (RFC 2308 §3)\n{}",
            ours.raw
        );
    }
    stack.dns.stop()
}

/// The TCP and [::1] listeners give the same answers as UDP on 127.0.0.1.
fn tcp_and_ipv6_listeners_answer_like_udp(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("tcp_and_ipv6_listeners_answer_like_udp/{io}"));
    let mut stack = Stack::default_on(io)?;
    let ready = stack.dns.ready().clone();
    assert!(ready.udp.iter().any(|a| a.is_ipv6()), "{}", ready.line);
    assert!(ready.tcp.iter().any(|a| a.is_ipv6()), "{}", ready.line);
    for (name, rtype) in [
        (zones::svc(10), "A"),
        (zones::svc(10), "AAAA"),
        (zones::MISSING.to_owned(), "A"),
    ] {
        let theirs = authoritative(stack.auth.addr(), &name, rtype)?;
        let servers = [
            (stack.dns.tcp(), true),
            (stack.dns.udp6(), false),
            (stack.dns.tcp6(), true),
        ];
        for (server, tcp) in servers {
            let dig = Dig::new(server, &name, rtype);
            let ours = if tcp { dig.tcp() } else { dig }.run()?;
            assert_same(
                &ours,
                &theirs,
                &format!("{name} {rtype} via {server} tcp={tcp}"),
            );
            assert_eq!(ours.transport, if tcp { "TCP" } else { "UDP" });
        }
    }
    stack.dns.stop()
}

/// Exact header checks: ID, QR, RD echoed, RA set, AA/TC clear, no OPT unasked.
fn client_sees_id_flags_and_question_echoed(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("client_sees_id_flags_and_question_echoed/{io}"));
    let mut stack = Stack::default_on(io)?;
    let name = zones::svc(20);
    for (i, tcp) in [(0u16, false), (1, true), (2, false), (3, true)] {
        // Miss first (i = 0, 1 may race the cache fill), then hits; IDs differ each time.
        let query = Query::new(&name, Rtype::A).id(0x0101 + i * 0x1111);
        let reply = if tcp {
            client::tcp(stack.dns.tcp(), &query)?
        } else {
            client::udp(stack.dns.udp(), &query)?
        };
        client::assert_echoes(&query, &reply)?;
        assert_eq!(reply.rcode, OptRcode::NOERROR);
        assert!(reply.rd, "RD copied from the query (RFC 1035 §4.1.1)");
        assert!(reply.ra && !reply.aa && !reply.tc);
        assert!(
            reply.opt.is_none(),
            "no OPT in the query, none in the answer"
        );
        let want = vec![(name.clone(), Rtype::A, zones::svc_v4(20).to_string())];
        assert_eq!(reply.rdata(), want);
        assert!(reply.max_answer_ttl() <= zones::CLUSTER_TTL);
    }
    let query = Query::new(&name, Rtype::A).id(0).edns(Edns::default());
    let reply = client::udp(stack.dns.udp(), &query)?;
    client::assert_echoes(&query, &reply)?;
    stack.dns.stop()
}

/// 0x20: the question comes back in the case sent, on a miss and on a hit.
fn question_case_is_echoed_on_miss_and_hit(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("question_case_is_echoed_on_miss_and_hit/{io}"));
    let mut stack = Stack::default_on(io)?;
    let spellings = [
        // svc-1: mixed case first (a miss), then lower case and other mixes (hits).
        "SvC-1.DeFaulT.svc.CLUSTER.local.",
        "svc-1.default.svc.cluster.local.",
        "SVC-1.DEFAULT.SVC.CLUSTER.LOCAL.",
        "sVc-1.dEfAuLt.SvC.cLuStEr.LoCaL.",
        // svc-30: lower case first, then mixed (the case asked for in the brief).
        "svc-30.default.svc.cluster.local.",
        "SvC-30.DeFaulT.svc.CLUSTER.local.",
        // An owner stored in mixed case, asked in lower case.
        "mixed.default.svc.cluster.local.",
    ];
    for (i, name) in spellings.into_iter().enumerate() {
        for tcp in [false, true] {
            let id = 0x2000 + u16::try_from(i)? * 2 + u16::from(tcp);
            let query = Query::new(name, Rtype::A).id(id).edns(Edns::default());
            let reply = if tcp {
                client::tcp(stack.dns.tcp(), &query)?
            } else {
                client::udp(stack.dns.udp(), &query)?
            };
            client::assert_echoes(&query, &reply)?;
            assert_eq!(reply.rcode, OptRcode::NOERROR, "{name}");
            assert_eq!(reply.answer.len(), 1, "{name}: {reply:?}");
            assert!(
                reply.answer[0].name.eq_ignore_ascii_case(name),
                "{name}: owner {}",
                reply.answer[0].name
            );
        }
    }
    stack.dns.stop()
}

/// The ready line names the backend asked for, the workers and both listeners.
fn ready_line_reports_the_configured_backend(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("ready_line_reports_the_configured_backend/{io}"));
    let mut stack = Stack::default_on(io)?;
    let ready = stack.dns.ready().clone();
    assert_eq!(ready.io, io.to_string(), "{}", ready.line);
    assert_eq!(ready.workers, 2, "{}", ready.line);
    let listen = ["127.0.0.1:53".parse()?, "[::1]:53".parse()?];
    for addr in listen {
        assert!(ready.udp.contains(&addr), "{}", ready.line);
        assert!(ready.tcp.contains(&addr), "{}", ready.line);
    }
    stack.dns.stop()
}
