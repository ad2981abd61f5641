//! Process lifecycle and TCP connection handling: SIGTERM exits 0, a killed server's ports can
//! be bound again, pipelined TCP queries are all answered, idle TCP connections are closed.
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use domain::base::iana::{OptRcode, Rtype};

use crate::harness::auth::Authoritative;
use crate::harness::client::{self, Query, Reply};
use crate::harness::dig::dig;
use crate::harness::faulty::{FaultyUpstream, Mode, Source};
use crate::harness::ringdns::{Io, Ringdns, TestConfig};
use crate::harness::{backend_tests, enter_netns, zones};

backend_tests!(
    restart_after_sigterm_and_after_kill9_serves_again,
    pipelined_tcp_queries_are_all_answered,
    idle_tcp_connection_is_closed,
    idle_timeout_waits_for_a_parked_answer,
    half_sent_tcp_message_is_closed,
);

/// SIGTERM exits 0; after SIGTERM or SIGKILL a new ringdns binds and serves.
fn restart_after_sigterm_and_after_kill9_serves_again(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "restart_after_sigterm_and_after_kill9_serves_again/{io}"
    ));
    let auth = Authoritative::start(zones::all())?;
    let config = TestConfig::for_tests(io).forward(".", auth.addr());
    let mut first = Ringdns::start(&config)?;
    assert_eq!(
        dig(first.udp(), zones::KUBE_DNS, "A")?.rcode,
        OptRcode::NOERROR
    );
    first.stop()?; // exit 0 on SIGTERM, checked inside
    let mut second = Ringdns::start(&config)?;
    assert_eq!(
        dig(second.udp(), zones::KUBE_DNS, "A")?.rcode,
        OptRcode::NOERROR
    );
    let status = second.kill9()?;
    assert!(!status.success(), "SIGKILL: {status}");
    let mut third = Ringdns::start(&config)?;
    let answer = dig(third.tcp(), zones::KUBE_DNS, "A")?;
    assert_eq!(answer.rdata_of("A"), vec![zones::KUBE_DNS_V4.to_string()]);
    third.stop()
}

/// 30 pipelined queries on one TCP connection are each answered once.
fn pipelined_tcp_queries_are_all_answered(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("pipelined_tcp_queries_are_all_answered/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let mut dns = Ringdns::start(&TestConfig::for_tests(io).forward(".", auth.addr()))?;
    let mut stream = client::tcp_connect(dns.tcp())?;
    // 30 queries written back to back before reading anything (RFC 7766 §6.2.1.1); some are
    // misses, some (repeats) hits, so answers may come back in any order.
    const QUERIES: u16 = 30;
    let mut want = BTreeSet::new();
    for i in 0..QUERIES {
        let n = 80 + i % 20;
        let query = Query::new(&zones::svc(n), Rtype::A).id(0x3000 + i);
        client::tcp_send(&mut stream, &query.to_wire())?;
        want.insert((0x3000 + i, zones::svc_v4(n).to_string()));
    }
    let mut got = BTreeSet::new();
    for _ in 0..QUERIES {
        let raw = client::tcp_receive(&mut stream)?
            .ok_or_else(|| anyhow::anyhow!("closed after {} answers", got.len()))?;
        let reply = Reply::parse(&raw)?;
        assert_eq!(reply.rcode, OptRcode::NOERROR, "{reply:?}");
        got.insert((reply.id, reply.rdata()[0].2.clone()));
    }
    assert_eq!(
        got, want,
        "every ID answered once, with its own name's data"
    );
    dns.stop()
}

/// An idle client TCP connection is closed after `tcp_idle_timeout`.
fn idle_tcp_connection_is_closed(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("idle_tcp_connection_is_closed/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let mut config = TestConfig::for_tests(io).forward(".", auth.addr());
    config.tcp_idle_timeout = Some("1s".into());
    let mut dns = Ringdns::start(&config)?;
    let mut stream = client::tcp_connect(dns.tcp())?;
    let query = Query::new(zones::KUBE_DNS, Rtype::A);
    client::tcp_send(&mut stream, &query.to_wire())?;
    assert!(client::tcp_receive(&mut stream)?.is_some());
    // Then stay idle: the server must close within a few idle periods (RFC 7766 §6.2.3).
    let started = Instant::now();
    let closed = closed_by_server(&mut stream)?;
    assert!(
        closed,
        "idle connection still open after {:?}",
        started.elapsed()
    );
    // And new connections still work.
    let reply = client::tcp(dns.tcp(), &query)?;
    assert_eq!(reply.rcode, OptRcode::NOERROR);
    dns.stop()
}

/// A TCP query parked on a slow upstream is answered even when the upstream takes longer than
/// the idle timeout: idle means nothing outstanding (RFC 7766 §6.2.3).
fn idle_timeout_waits_for_a_parked_answer(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("idle_timeout_waits_for_a_parked_answer/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let upstream_addr = "127.0.0.11:53".parse()?;
    let upstream = FaultyUpstream::start(upstream_addr, Source::Forward(auth.addr()))?;
    upstream.set_mode(Mode::Delay(Duration::from_millis(1800)));
    let mut config = TestConfig::for_tests(io).forward_with(".", &[upstream_addr], "udp", "4s");
    config.tcp_idle_timeout = Some("1s".into());
    let mut dns = Ringdns::start(&config)?;
    let mut stream = client::tcp_connect(dns.tcp())?;
    stream.set_read_timeout(Some(Duration::from_secs(6)))?;
    let query = Query::new(&zones::svc(42), Rtype::A);
    client::tcp_send(&mut stream, &query.to_wire())?;
    let answer = client::tcp_receive(&mut stream)?
        .expect("the parked answer arrives although it took longer than the idle timeout");
    assert!(answer.len() > 12);
    dns.stop()
}

/// A client that sends a length prefix and then stops is disconnected after the idle timeout
/// instead of holding a connection slot forever; the server keeps serving.
fn half_sent_tcp_message_is_closed(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("half_sent_tcp_message_is_closed/{io}"));
    let auth = Authoritative::start(zones::all())?;
    let mut config = TestConfig::for_tests(io).forward(".", auth.addr());
    config.tcp_idle_timeout = Some("1s".into());
    let mut dns = Ringdns::start(&config)?;
    let mut stream = client::tcp_connect(dns.tcp())?;
    std::io::Write::write_all(&mut stream, &[0xff, 0xff, 0x12])?;
    assert!(
        closed_by_server(&mut stream)?,
        "a half-sent message must not hold the connection open"
    );
    let reply = client::tcp(dns.tcp(), &Query::new(zones::KUBE_DNS, Rtype::A))?;
    assert_eq!(reply.rcode, OptRcode::NOERROR);
    dns.stop()
}

/// Waits up to 6 s (a few idle periods) for the server to close `stream`: end of stream or a
/// reset; `false` if it sent data or stayed open.
fn closed_by_server(stream: &mut std::net::TcpStream) -> anyhow::Result<bool> {
    stream.set_read_timeout(Some(Duration::from_secs(6)))?;
    let mut byte = [0u8; 1];
    Ok(match std::io::Read::read(stream, &mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => error.kind() == ErrorKind::ConnectionReset,
    })
}
