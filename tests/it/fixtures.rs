//! Self-tests of the fixtures against knotd directly, without ringdns: they must pass even
//! while the binary is unfinished, and they show what "authoritative" looks like.
//!
//! Runs on: libtest threads, each in its own network namespace.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use domain::base::iana::{Opcode, OptRcode, Rtype};

use crate::harness::auth::Authoritative;
use crate::harness::client::{self, Edns, Query, Reply};
use crate::harness::dig::{authoritative, dig, Dig};
use crate::harness::faulty::{FaultyUpstream, Mode, Proto, Source};
use crate::harness::getent::{self, ResolvConf};
use crate::harness::ringdns::{Io, Ready, TestConfig};
use crate::harness::{enter_netns, testdns, zones};

/// Where the fixture tests put FaultyUpstream.
const FAULTY: &str = "127.0.0.20:53";

/// knotd loads the generated zones and serves every kind of record the tests use.
#[test]
fn knotd_serves_the_generated_zones() -> anyhow::Result<()> {
    let _ns = enter_netns!("knotd_serves_the_generated_zones");
    let auth = Authoritative::start(zones::all())?;
    let a = authoritative(auth.addr(), &zones::svc(1), "A")?;
    assert_eq!(a.rcode, OptRcode::NOERROR);
    assert!(a.aa() && !a.tc(), "{}", a.raw);
    assert_eq!(a.rdata_of("A"), vec![zones::svc_v4(1).to_string()]);
    assert_eq!(a.answer[0].ttl, zones::CLUSTER_TTL);

    let aaaa = authoritative(auth.addr(), &zones::svc(2), "AAAA")?;
    assert_eq!(aaaa.rdata_of("AAAA"), vec![zones::svc_v6(2).to_string()]);

    let nodata = authoritative(auth.addr(), &zones::svc(1), "AAAA")?;
    assert_eq!(nodata.rcode, OptRcode::NOERROR);
    assert!(nodata.answer.is_empty());
    assert_eq!(nodata.authority[0].rtype, "SOA", "{}", nodata.raw);

    let nx = authoritative(auth.addr(), zones::MISSING, "A")?;
    assert_eq!(nx.rcode, OptRcode::NXDOMAIN);
    assert_eq!(nx.authority[0].rtype, "SOA");

    let srv = authoritative(auth.addr(), &format!("_http._tcp.{}", zones::svc(3)), "SRV")?;
    assert_eq!(
        srv.rdata_of("SRV"),
        vec![format!("0 100 80 {}", zones::svc(3))]
    );

    let ptr = authoritative(auth.addr(), &zones::reverse_v4(zones::svc_v4(7)), "PTR")?;
    assert_eq!(ptr.rdata_of("PTR"), vec![zones::svc(7)]);

    let chain = authoritative(auth.addr(), zones::ALIAS, "A")?;
    assert_eq!(chain.rdata_of("CNAME").len(), 2, "{}", chain.raw);
    assert_eq!(chain.rdata_of("A"), vec![zones::svc_v4(1).to_string()]);

    let wild = authoritative(auth.addr(), zones::WILDCARD_NAME, "A")?;
    assert_eq!(wild.answer[0].name, zones::WILDCARD_NAME);
    assert_eq!(wild.rdata_of("A"), vec![zones::WILDCARD_V4.to_string()]);

    let long = authoritative(auth.addr(), zones::LONGTTL, "A")?;
    assert_eq!(long.answer[0].ttl, zones::LONG_TTL);

    let mixed = authoritative(auth.addr(), "mixed.default.svc.cluster.local.", "A")?;
    assert_eq!(mixed.rdata_of("A"), vec![zones::MIXED_CASE_V4.to_string()]);

    let kube = authoritative(auth.addr(), zones::KUBE_DNS, "A")?;
    assert_eq!(kube.rdata_of("A"), vec![zones::KUBE_DNS_V4.to_string()]);

    let example = authoritative(auth.addr(), "www.example.test.", "A")?;
    assert_eq!(example.answer[0].ttl, zones::EXAMPLE_TTL);
    Ok(())
}

/// The size fixtures (`big`, `huge`) truncate where intended and dig parses TC and the TCP retry.
#[test]
fn dig_sees_truncation_and_retries_over_tcp() -> anyhow::Result<()> {
    let _ns = enter_netns!("dig_sees_truncation_and_retries_over_tcp");
    let auth = Authoritative::start(zones::all())?;
    let truncated = Dig::new(auth.addr(), zones::BIG, "A")
        .noedns()
        .ignore_tc()
        .run()?;
    assert!(truncated.tc(), "{}", truncated.raw);
    assert!(truncated.answer.len() < usize::from(zones::BIG_RECORDS));
    assert_eq!(truncated.transport, "UDP");

    let full = Dig::new(auth.addr(), zones::BIG, "A").noedns().run()?;
    assert!(full.retried_over_tcp, "{}", full.raw);
    assert_eq!(full.transport, "TCP");
    assert!(!full.tc());
    assert_eq!(full.answer.len(), usize::from(zones::BIG_RECORDS));

    let fits = Dig::new(auth.addr(), zones::BIG, "A")
        .bufsize(1232)
        .ignore_tc()
        .run()?;
    assert!(!fits.tc(), "1007 bytes fit 1232: {}", fits.raw);
    let huge = Dig::new(auth.addr(), zones::HUGE, "AAAA")
        .bufsize(1232)
        .ignore_tc()
        .run()?;
    assert!(huge.tc(), "2.5 kB do not fit 1232: {}", huge.raw);
    let huge_tcp = Dig::new(auth.addr(), zones::HUGE, "AAAA").tcp().run()?;
    assert_eq!(huge_tcp.answer.len(), usize::from(zones::HUGE_RECORDS));
    Ok(())
}

/// dig's OPT pseudo-section and BADVERS are parsed.
#[test]
fn dig_parses_edns() -> anyhow::Result<()> {
    let _ns = enter_netns!("dig_parses_edns");
    let auth = Authoritative::start(zones::all())?;
    let with = Dig::new(auth.addr(), zones::KUBE_DNS, "A")
        .bufsize(1232)
        .run()?;
    let opt = with.opt.clone().expect("knotd echoes EDNS");
    assert_eq!(opt.version, 0);
    assert!(opt.udp_payload >= 512);
    let without = Dig::new(auth.addr(), zones::KUBE_DNS, "A").noedns().run()?;
    assert!(without.opt.is_none(), "{}", without.raw);
    let badvers = Dig::new(auth.addr(), zones::KUBE_DNS, "A")
        .option("+edns=1")
        .option("+noednsneg")
        .run()?;
    assert_eq!(badvers.rcode, OptRcode::BADVERS, "{}", badvers.raw);
    assert!(badvers.opt.is_some());
    Ok(())
}

/// The `domain` client sees what dig sees, builds exact odd queries and echo checks work.
#[test]
fn client_agrees_with_dig() -> anyhow::Result<()> {
    let _ns = enter_netns!("client_agrees_with_dig");
    let auth = Authoritative::start(zones::all())?;
    let by_dig = authoritative(auth.addr(), zones::ALIAS, "A")?;
    for reply in [
        client::udp(auth.addr(), &Query::new(zones::ALIAS, Rtype::A))?,
        client::tcp(auth.addr(), &Query::new(zones::ALIAS, Rtype::A))?,
    ] {
        assert_eq!(reply.rcode, OptRcode::NOERROR);
        assert_eq!(reply.answer.len(), by_dig.answer.len());
        let mut dig_rdata: Vec<_> = by_dig.rdata().into_iter().map(|(_, _, r)| r).collect();
        let mut rdata: Vec<_> = reply.rdata().into_iter().map(|(_, _, r)| r).collect();
        dig_rdata.sort();
        rdata.sort();
        assert_eq!(rdata, dig_rdata);
    }
    let query = Query::new("SvC-1.DeFaulT.svc.CLUSTER.local.", Rtype::A)
        .id(0xbeef)
        .edns(Edns::default());
    let reply = client::udp(auth.addr(), &query)?;
    client::assert_echoes(&query, &reply)?;
    assert!(reply.opt.is_some());
    assert_eq!(reply.rdata()[0].2, zones::svc_v4(1).to_string());

    // knotd's reactions to odd queries (ringdns' are specified in badinput.rs): it drops
    // QDCOUNT=2 and answers NOTIFY for a zone it is primary for with NOTAUTH.
    let mut two = Query::new(&zones::svc(1), Rtype::A);
    two.qdcount = 2;
    let wire = two.to_wire();
    assert_eq!(&wire[4..6], &[0, 2]);
    assert_eq!(wire.len(), 12 + 2 * (zones::svc(1).len() + 1 + 4));
    let notify = Query::new(zones::CLUSTER, Rtype::SOA).opcode(Opcode::NOTIFY);
    let reply = client::udp(auth.addr(), &notify)?;
    assert_eq!(reply.opcode, Opcode::NOTIFY);
    assert_eq!(reply.rcode, OptRcode::NOTAUTH);

    let answer = client::udp_exchange(auth.addr(), &[0, 1, 2, 3, 4], Duration::from_millis(300))?;
    assert!(answer.is_none(), "knotd drops a 5-byte packet");
    Ok(())
}

/// FaultyUpstream's table answers dig over UDP and TCP and counts per name and transport.
#[test]
fn faulty_upstream_table_answers_dig() -> anyhow::Result<()> {
    let _ns = enter_netns!("faulty_upstream_table_answers_dig");
    let addr: SocketAddr = FAULTY.parse()?;
    let v4: IpAddr = "10.1.2.3".parse()?;
    let v6: IpAddr = "fd00::1:2:3".parse()?;
    let upstream =
        FaultyUpstream::start(addr, FaultyUpstream::table(&[("Host.Example.", &[v4, v6])]))?;
    let a = dig(addr, "host.example.", "A")?;
    assert_eq!(a.rdata_of("A"), vec![v4.to_string()]);
    let aaaa = Dig::new(addr, "HOST.example.", "AAAA").tcp().run()?;
    assert_eq!(aaaa.rdata_of("AAAA"), vec![v6.to_string()]);
    let nx = dig(addr, "other.example.", "A")?;
    assert_eq!(nx.rcode, OptRcode::NXDOMAIN);
    assert_eq!(upstream.count("host.example", Proto::Udp), 1);
    assert_eq!(upstream.count("host.example", Proto::Tcp), 1);
    assert_eq!(upstream.total(), 3);
    Ok(())
}

/// Each FaultyUpstream mode does what its doc says, forwarding to knotd.
#[test]
fn faulty_upstream_modes_misbehave_as_described() -> anyhow::Result<()> {
    let _ns = enter_netns!("faulty_upstream_modes_misbehave_as_described");
    let auth = Authoritative::start(zones::all())?;
    let addr: SocketAddr = FAULTY.parse()?;
    let upstream = FaultyUpstream::start(addr, Source::Forward(auth.addr()))?;
    let name = zones::svc(5);
    let query = Query::new(&name, Rtype::A).id(0x1234);
    let short = Duration::from_millis(500);

    let normal = client::udp(addr, &query)?;
    client::assert_echoes(&query, &normal)?;
    assert_eq!(normal.rdata()[0].2, zones::svc_v4(5).to_string());

    upstream.set_mode(Mode::Delay(Duration::from_millis(300)));
    let started = Instant::now();
    client::udp(addr, &query)?;
    assert!(started.elapsed() >= Duration::from_millis(300));

    upstream.set_mode(Mode::Drop);
    assert!(client::udp_exchange(addr, &query.to_wire(), short)?.is_none());
    let mut stream = client::tcp_connect(addr)?;
    stream.set_read_timeout(Some(short))?;
    client::tcp_send(&mut stream, &query.to_wire())?;
    assert!(
        client::tcp_receive(&mut stream).is_err(),
        "TCP read times out"
    );

    upstream.set_mode(Mode::Truncate);
    let tc = Dig::new(addr, &name, "A").ignore_tc().run()?;
    assert!(tc.tc() && tc.answer.is_empty(), "{}", tc.raw);
    let retried = dig(addr, &name, "A")?;
    assert!(retried.retried_over_tcp && !retried.tc(), "{}", retried.raw);
    assert_eq!(retried.rdata_of("A"), vec![zones::svc_v4(5).to_string()]);

    upstream.set_mode(Mode::WrongId);
    let wrong = client::udp_exchange(addr, &query.to_wire(), short)?.expect("an answer");
    assert_eq!(Reply::parse(&wrong)?.id, 0x1235);

    upstream.set_mode(Mode::Garbage);
    let garbage = client::udp_exchange(addr, &query.to_wire(), short)?.expect("an answer");
    assert_eq!(&garbage[..2], &[0x12, 0x34]);
    assert!(Reply::parse(&garbage).is_err(), "garbage must not parse");

    upstream.set_mode(Mode::GarbageThenAnswer);
    let socket = client::udp_socket(addr)?;
    socket.send_to(&query.to_wire(), addr)?;
    let first = client::udp_receive(&socket, addr, short)?.expect("garbage");
    assert!(Reply::parse(&first).is_err());
    let second = client::udp_receive(&socket, addr, short)?.expect("answer");
    assert_eq!(Reply::parse(&second)?.rcode, OptRcode::NOERROR);

    upstream.set_mode(Mode::CloseTcpMidAnswer);
    let mut stream = client::tcp_connect(addr)?;
    client::tcp_send(&mut stream, &query.to_wire())?;
    assert!(
        client::tcp_receive(&mut stream)?.is_none(),
        "closed mid-answer"
    );
    assert!(client::udp(addr, &query).is_ok(), "UDP still answers");

    assert!(upstream.queries(&name) >= 12);
    Ok(())
}

/// getent under `unshare -m` uses the test resolv.conf (search list included).
#[test]
fn glibc_resolves_through_the_bind_mounted_resolv_conf() -> anyhow::Result<()> {
    let _ns = enter_netns!("glibc_resolves_through_the_bind_mounted_resolv_conf");
    let auth = Authoritative::start_on(zones::all(), "127.0.0.1:53".parse()?)?;
    assert_eq!(auth.addr().port(), 53);
    let full = getent::ahosts(&zones::svc(2), &ResolvConf::loopback())?;
    let want: Vec<IpAddr> = vec![zones::svc_v4(2).into(), zones::svc_v6(2).into()];
    assert_eq!(full.addrs, want, "{}", full.raw);
    let short = getent::ahosts("svc-4", &ResolvConf::loopback().pod_search())?;
    assert_eq!(
        short.addrs,
        vec![IpAddr::from(zones::svc_v4(4)), zones::svc_v6(4).into()]
    );
    let missing = getent::ahosts(zones::MISSING, &ResolvConf::loopback())?;
    assert_eq!(missing.code, Some(2));
    Ok(())
}

/// perf/testdns builds offline and its output parses.
#[test]
fn go_resolver_resolves_against_knotd() -> anyhow::Result<()> {
    let _ns = enter_netns!("go_resolver_resolves_against_knotd");
    let auth = Authoritative::start_on(zones::all(), "127.0.0.1:53".parse()?)?;
    let (summary, output) = testdns::run(auth.addr(), zones::NGINX, 2, 1)?;
    assert!(summary.requests > 0, "{output}");
    assert_eq!(summary.errors, 0, "{output}");
    Ok(())
}

/// The ready-line parser accepts the documented line and rejects an empty one.
#[test]
fn ready_line_parses() -> anyhow::Result<()> {
    let ready = Ready::parse(
        "2024-01-01T00:00:00Z INFO ready udp=127.0.0.1:53,[::1]:53 tcp=127.0.0.1:53,[::1]:53 \
         workers=2 io=uring metrics=127.0.0.1:9253 health=127.0.0.1:8080",
    )?;
    assert_eq!(ready.udp.len(), 2);
    assert_eq!(ready.tcp[1], "[::1]:53".parse()?);
    assert_eq!(ready.workers, 2);
    assert_eq!(ready.io, "uring");
    assert_eq!(ready.metrics, Some("127.0.0.1:9253".parse()?));
    assert_eq!(ready.health, Some("127.0.0.1:8080".parse()?));
    let off = Ready::parse("ready udp=127.0.0.1:53 tcp=127.0.0.1:53 io=epoll metrics=off")?;
    assert_eq!(off.metrics, None);
    assert!(Ready::parse("ready udp= tcp=").is_err());
    Ok(())
}

/// TestConfig writes valid TOML with the keys the binary expects.
#[test]
fn test_config_is_valid_toml() -> anyhow::Result<()> {
    let config = TestConfig::for_tests(Io::Epoll)
        .workers(1)
        .udp_payload(1232)
        .cache_str("denial_ttl", "5s")
        .cache_int("success_capacity", 100)
        .forward("cluster.local", "127.0.0.10:53".parse()?)
        .forward_with(".", &["127.0.0.20:53".parse()?], "tcp", "1s");
    let table: toml::Table = toml::from_str(&config.to_toml())?;
    assert_eq!(table["server"]["io"].as_str(), Some("epoll"));
    assert_eq!(table["server"]["listen"][1].as_str(), Some("[::1]:53"));
    assert_eq!(table["cache"]["denial_ttl"].as_str(), Some("5s"));
    assert_eq!(table["forward"][1]["transport"].as_str(), Some("tcp"));
    Ok(())
}
