//! EDNS (RFC 6891) and truncation: OPT echoed only when asked, BADVERS for version 1, the
//! client's payload size respected, TC=1 followed by a complete TCP answer.
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.

use domain::base::iana::{OptRcode, Rtype};

use crate::harness::client::{self, Edns, Query};
use crate::harness::dig::{authoritative, Dig};
use crate::harness::ringdns::Io;
use crate::harness::{backend_tests, enter_netns, zones, Stack};

backend_tests!(
    opt_is_answered_only_when_asked,
    edns_version_1_gets_badvers,
    big_answer_is_truncated_without_edns_and_complete_over_tcp,
    client_payload_size_is_respected,
);

/// An OPT in the query gets an OPT back; no OPT, none back (RFC 6891 §7).
fn opt_is_answered_only_when_asked(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("opt_is_answered_only_when_asked/{io}"));
    let mut stack = Stack::default_on(io)?;
    let name = zones::svc(40);
    // Miss and hit, both ways round, with dig and with the raw client.
    for _ in 0..2 {
        let with = Dig::new(stack.dns.udp(), &name, "A").bufsize(1232).run()?;
        let opt = with
            .opt
            .clone()
            .unwrap_or_else(|| panic!("OPT expected:\n{}", with.raw));
        assert_eq!(opt.version, 0);
        assert!(opt.udp_payload >= 512, "{}", with.raw);
        let without = Dig::new(stack.dns.udp(), &name, "A").noedns().run()?;
        assert!(
            without.opt.is_none(),
            "no OPT without one in the query:\n{}",
            without.raw
        );
        assert_eq!(with.rdata(), without.rdata());

        let query = Query::new(&name, Rtype::A).edns(Edns::default());
        let reply = client::udp(stack.dns.udp(), &query)?;
        assert!(reply.opt.is_some(), "{reply:?}");
        let reply = client::tcp(stack.dns.tcp(), &Query::new(&name, Rtype::A))?;
        assert!(reply.opt.is_none(), "{reply:?}");
        let reply = client::tcp(stack.dns.tcp(), &query)?;
        assert!(reply.opt.is_some(), "{reply:?}");
    }
    // A negative answer keeps the rule too.
    let nx = Dig::new(stack.dns.udp(), zones::MISSING, "A")
        .noedns()
        .run()?;
    assert!(nx.opt.is_none(), "{}", nx.raw);
    let nx = Dig::new(stack.dns.udp(), zones::MISSING, "A").run()?;
    assert!(nx.opt.is_some(), "{}", nx.raw);
    stack.dns.stop()
}

/// EDNS version 1 gets BADVERS with an OPT of version 0 (RFC 6891 §6.1.3).
fn edns_version_1_gets_badvers(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("edns_version_1_gets_badvers/{io}"));
    let mut stack = Stack::default_on(io)?;
    let name = zones::svc(41);
    // Before and after the name is cached: BADVERS regardless (RFC 6891 §6.1.3).
    for round in 0..2 {
        let query = Query::new(&name, Rtype::A).id(0x7001).edns(Edns {
            version: 1,
            ..Edns::default()
        });
        for tcp in [false, true] {
            let reply = if tcp {
                client::tcp(stack.dns.tcp(), &query)?
            } else {
                client::udp(stack.dns.udp(), &query)?
            };
            assert_eq!(reply.id, 0x7001);
            assert_eq!(
                reply.rcode,
                OptRcode::BADVERS,
                "round {round} tcp={tcp}: {reply:?}"
            );
            let opt = reply
                .opt
                .unwrap_or_else(|| panic!("BADVERS needs an OPT: {reply:?}"));
            assert_eq!(opt.version, 0, "the responder's highest version");
            assert!(reply.answer.is_empty(), "{reply:?}");
        }
        let dig = Dig::new(stack.dns.udp(), &name, "A")
            .option("+edns=1")
            .option("+noednsneg")
            .run()?;
        assert_eq!(dig.rcode, OptRcode::BADVERS, "{}", dig.raw);
        // Now cache it for the second round.
        let normal = Dig::new(stack.dns.udp(), &name, "A").run()?;
        assert_eq!(normal.rcode, OptRcode::NOERROR, "{}", normal.raw);
    }
    stack.dns.stop()
}

/// A ~1 kB answer is TC=1 in 512 bytes without EDNS, and complete over TCP.
fn big_answer_is_truncated_without_edns_and_complete_over_tcp(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "big_answer_is_truncated_without_edns_and_complete_over_tcp/{io}"
    ));
    let mut stack = Stack::default_on(io)?;
    let full = authoritative(stack.auth.addr(), zones::BIG, "A")?;
    assert_eq!(
        full.answer.len(),
        usize::from(zones::BIG_RECORDS),
        "fixture"
    );
    for round in 0..2 {
        let truncated = Dig::new(stack.dns.udp(), zones::BIG, "A")
            .noedns()
            .option("+notcp")
            .ignore_tc()
            .run()?;
        assert!(
            truncated.tc(),
            "round {round}: TC=1 over 512 bytes:\n{}",
            truncated.raw
        );
        assert_eq!(truncated.rcode, OptRcode::NOERROR);

        let retried = Dig::new(stack.dns.udp(), zones::BIG, "A").noedns().run()?;
        assert!(
            retried.retried_over_tcp,
            "dig saw TC and retried:\n{}",
            retried.raw
        );
        assert_eq!(retried.transport, "TCP");
        assert!(!retried.tc());
        assert_eq!(
            retried.rdata(),
            full.rdata(),
            "all {} records",
            zones::BIG_RECORDS
        );

        let query = Query::new(zones::BIG, Rtype::A);
        let raw = client::udp(stack.dns.udp(), &query)?;
        assert!(raw.tc && raw.raw.len() <= 512, "{} bytes", raw.raw.len());
        client::assert_echoes(&query, &raw)?;
        let tcp = client::tcp(stack.dns.tcp(), &query)?;
        assert!(!tcp.tc);
        assert_eq!(tcp.answer.len(), usize::from(zones::BIG_RECORDS));
    }
    stack.dns.stop()
}

/// UDP answers fit the client's EDNS payload size (and ringdns' own ceiling).
fn client_payload_size_is_respected(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("client_payload_size_is_respected/{io}"));
    let mut stack = Stack::default_on(io)?;
    let records = |name: &str| -> usize {
        if name == zones::BIG {
            usize::from(zones::BIG_RECORDS)
        } else {
            usize::from(zones::HUGE_RECORDS)
        }
    };
    // (name, type, payload, fits): BIG is ~1 kB, HUGE ~2.5 kB.
    let cases = [
        (zones::BIG, Rtype::A, 512, false),
        (zones::BIG, Rtype::A, 1232, true),
        (zones::BIG, Rtype::A, 4096, true),
        (zones::HUGE, Rtype::AAAA, 1232, false),
        (zones::HUGE, Rtype::AAAA, 512, false),
    ];
    for round in 0..2 {
        for (name, rtype, payload, fits) in cases {
            let query = Query::new(name, rtype).edns(Edns {
                udp_payload: payload,
                ..Edns::default()
            });
            let reply = client::udp(stack.dns.udp(), &query)?;
            let what = format!("round {round}: {name} payload {payload}");
            client::assert_echoes(&query, &reply)?;
            assert!(reply.opt.is_some(), "{what}");
            // ringdns' own ceiling is udp_payload (1232 by default), whatever the client says.
            let limit = usize::from(payload.min(1232));
            assert!(
                reply.raw.len() <= limit,
                "{what}: {} bytes",
                reply.raw.len()
            );
            assert_eq!(reply.tc, !fits, "{what}: {} bytes", reply.raw.len());
            if fits {
                assert_eq!(reply.answer.len(), records(name), "{what}");
            }
        }
    }
    let tcp = client::tcp(stack.dns.tcp(), &Query::new(zones::HUGE, Rtype::AAAA))?;
    assert_eq!(tcp.answer.len(), usize::from(zones::HUGE_RECORDS));
    stack.dns.stop()
}
