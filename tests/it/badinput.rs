//! Malformed and unusual queries: each gets the reply the RFCs ask for (or none), and the
//! server keeps answering normal queries afterwards.
//!
//! Runs on: libtest threads, each in its own network namespace, on both I/O backends.

use std::net::SocketAddr;
use std::time::Duration;

use domain::base::iana::{Opcode, OptRcode, Rtype};

use crate::harness::client::{self, Edns, Query, Reply};
use crate::harness::ringdns::Io;
use crate::harness::{backend_tests, enter_netns, zones, Stack};

backend_tests!(
    tiny_packet_is_dropped,
    response_packet_is_dropped,
    two_questions_get_formerr,
    label_past_the_end_gets_formerr,
    notify_and_update_get_notimp,
    tcp_garbage_frame_is_handled,
    an_over_long_udp_query_gets_tc_and_tcp_answers_it,
);

/// How long to listen for an answer that must not come.
const SILENCE: Duration = Duration::from_millis(1500);

/// After a bad packet, a normal query over UDP and over TCP still gets the right answer.
fn assert_still_serving(server_udp: SocketAddr, server_tcp: SocketAddr) -> anyhow::Result<()> {
    let query = Query::new(&zones::svc(70), Rtype::A).id(0x0707);
    for reply in [
        client::udp(server_udp, &query)?,
        client::tcp(server_tcp, &query)?,
    ] {
        client::assert_echoes(&query, &reply)?;
        assert_eq!(reply.rcode, OptRcode::NOERROR, "{reply:?}");
        assert_eq!(reply.rdata()[0].2, zones::svc_v4(70).to_string());
    }
    Ok(())
}

/// Sends `packet` over UDP and expects no answer.
fn assert_no_answer(server: SocketAddr, packet: &[u8], what: &str) -> anyhow::Result<()> {
    let answer = client::udp_exchange(server, packet, SILENCE)?;
    assert!(answer.is_none(), "{what}: must be dropped, got {answer:?}");
    Ok(())
}

/// Sends `packet` over UDP and TCP and expects `rcode` with the ID echoed.
fn assert_rcode(stack: &Stack, packet: &[u8], rcode: OptRcode, what: &str) -> anyhow::Result<()> {
    let raw = client::udp_exchange(stack.dns.udp(), packet, client::DEFAULT_TIMEOUT)?
        .ok_or_else(|| anyhow::anyhow!("{what}: no UDP answer"))?;
    let mut stream = client::tcp_connect(stack.dns.tcp())?;
    client::tcp_send(&mut stream, packet)?;
    let tcp = client::tcp_receive(&mut stream)?
        .ok_or_else(|| anyhow::anyhow!("{what}: TCP closed without an answer"))?;
    for (transport, raw) in [("udp", raw), ("tcp", tcp)] {
        assert_eq!(&raw[..2], &packet[..2], "{what}/{transport}: ID echoed");
        let reply = Reply::parse(&raw)
            .or_else(|_| header_only(&raw))
            .map_err(|e| e.context(format!("{what}/{transport}: parsing {raw:?}")))?;
        assert!(reply.qr, "{what}/{transport}: QR set");
        assert_eq!(reply.rcode, rcode, "{what}/{transport}: {reply:?}");
        assert!(reply.answer.is_empty(), "{what}/{transport}");
    }
    Ok(())
}

/// Parses just the header of an error reply that echoes an unparseable question back.
fn header_only(raw: &[u8]) -> anyhow::Result<Reply> {
    let mut header = raw
        .get(..12)
        .ok_or_else(|| anyhow::anyhow!("short"))?
        .to_vec();
    header[4..12].fill(0);
    Reply::parse(&header)
}

/// Packets shorter than a header get no answer; serving continues.
fn tiny_packet_is_dropped(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("tiny_packet_is_dropped/{io}"));
    let mut stack = Stack::default_on(io)?;
    for len in [0usize, 1, 5, 11] {
        let packet: Vec<u8> = (0..len)
            .map(|i| u8::try_from(i % 256).unwrap_or(0))
            .collect();
        assert_no_answer(stack.dns.udp(), &packet, &format!("{len}-byte packet"))?;
    }
    assert_still_serving(stack.dns.udp(), stack.dns.tcp())?;
    stack.dns.stop()
}

/// A packet with QR=1 gets no answer; serving continues.
fn response_packet_is_dropped(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("response_packet_is_dropped/{io}"));
    let mut stack = Stack::default_on(io)?;
    let mut query = Query::new(&zones::svc(71), Rtype::A);
    query.qr = true;
    // Answering responses invites reflection loops (RFC 1035 §4.1.1: QR=1 is a response).
    assert_no_answer(stack.dns.udp(), &query.to_wire(), "QR=1")?;
    assert_still_serving(stack.dns.udp(), stack.dns.tcp())?;
    stack.dns.stop()
}

/// QDCOUNT=2 gets FORMERR over UDP and TCP.
fn two_questions_get_formerr(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("two_questions_get_formerr/{io}"));
    let mut stack = Stack::default_on(io)?;
    let mut query = Query::new(&zones::svc(72), Rtype::A).id(0x0202);
    query.qdcount = 2;
    assert_rcode(&stack, &query.to_wire(), OptRcode::FORMERR, "QDCOUNT=2")?;
    assert_still_serving(stack.dns.udp(), stack.dns.tcp())?;
    stack.dns.stop()
}

/// A question whose label or type runs past the packet gets FORMERR.
fn label_past_the_end_gets_formerr(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("label_past_the_end_gets_formerr/{io}"));
    let mut stack = Stack::default_on(io)?;
    // Header: ID 0x0303, RD, QDCOUNT=1; then a label claiming 63 bytes with only 3 present.
    let mut packet = vec![0x03, 0x03, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    packet.extend_from_slice(&[63, b'a', b'b', b'c']);
    assert_rcode(&stack, &packet, OptRcode::FORMERR, "label past the end")?;
    // A question without its type and class.
    let mut packet = vec![0x03, 0x04, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    packet.extend_from_slice(&[3, b's', b'v', b'c', 0, 0]);
    assert_rcode(&stack, &packet, OptRcode::FORMERR, "question cut short")?;
    assert_still_serving(stack.dns.udp(), stack.dns.tcp())?;
    stack.dns.stop()
}

/// NOTIFY, UPDATE, IQUERY and STATUS get NOTIMP with the opcode echoed.
fn notify_and_update_get_notimp(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("notify_and_update_get_notimp/{io}"));
    let mut stack = Stack::default_on(io)?;
    for opcode in [
        Opcode::NOTIFY,
        Opcode::UPDATE,
        Opcode::IQUERY,
        Opcode::STATUS,
    ] {
        let query = Query::new(zones::CLUSTER, Rtype::SOA)
            .id(0x0400 + u16::from(opcode.to_int()))
            .opcode(opcode);
        let what = format!("opcode {opcode}");
        assert_rcode(&stack, &query.to_wire(), OptRcode::NOTIMP, &what)?;
        let reply = client::udp(stack.dns.udp(), &query)?;
        assert_eq!(reply.opcode, opcode, "{what}: opcode echoed");
    }
    assert_still_serving(stack.dns.udp(), stack.dns.tcp())?;
    stack.dns.stop()
}

/// Garbage TCP frames get FORMERR or a close, never a hang; new connections work.
fn tcp_garbage_frame_is_handled(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("tcp_garbage_frame_is_handled/{io}"));
    let mut stack = Stack::default_on(io)?;
    let frames: [&[u8]; 3] = [
        // Shorter than a header.
        &[0xde, 0xad, 0xbe],
        // A label running past the end.
        &[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'x'],
        // A reserved label type (0b10, RFC 6891 §5) where the question name starts.
        &[
            0x56, 0x78, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0x80, 1, 2, 3, 0, 0, 1, 0, 1,
        ],
    ];
    for frame in frames {
        let mut stream = client::tcp_connect(stack.dns.tcp())?;
        client::tcp_send(&mut stream, frame)?;
        // Either a FORMERR (with the ID) or a closed connection; never a hang or a crash.
        match client::tcp_receive(&mut stream) {
            Ok(None) => {}
            Ok(Some(raw)) => {
                assert_eq!(raw.get(..2), frame.get(..2), "ID echoed: {raw:?}");
                let rcode = raw.get(3).map(|b| b & 0x0f);
                assert_eq!(rcode, Some(1), "FORMERR if anything: {raw:?}");
            }
            Err(error) => panic!("{frame:?}: neither an answer nor a close: {error:#}"),
        }
        assert!(stack.dns.is_running());
        assert_still_serving(stack.dns.udp(), stack.dns.tcp())?;
    }
    // A frame whose length prefix promises more than is sent, then the client closes.
    let mut stream = client::tcp_connect(stack.dns.tcp())?;
    std::io::Write::write_all(&mut stream, &[0x01, 0x00, 0x12])?;
    drop(stream);
    assert_still_serving(stack.dns.udp(), stack.dns.tcp())?;
    stack.dns.stop()
}

/// `query` (ending in an OPT record without options) padded to `total` bytes with an EDNS
/// Padding option (RFC 7830).
fn padded(query: &Query, total: usize) -> Vec<u8> {
    let mut wire = query.to_wire();
    let pad = total - wire.len() - 4;
    let rdlength = wire.len() - 2;
    wire.truncate(rdlength);
    wire.extend(((pad + 4) as u16).to_be_bytes());
    wire.extend(12u16.to_be_bytes());
    wire.extend((pad as u16).to_be_bytes());
    wire.resize(total, 0);
    wire
}

/// A UDP query longer than a worker reads whole (about 2 KB on io_uring, 4 KB on epoll) is
/// never met with silence, which would cost the client its 5 s timeout: it gets TC=1 with the
/// question, and the same query over TCP is answered.
fn an_over_long_udp_query_gets_tc_and_tcp_answers_it(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "an_over_long_udp_query_gets_tc_and_tcp_answers_it/{io}"
    ));
    let mut stack = Stack::default_on(io)?;
    let edns = Edns {
        udp_payload: 1232,
        version: 0,
        dnssec_ok: false,
    };
    let query = Query::new(&zones::svc(71), Rtype::A).id(0x4242).edns(edns);
    for total in [3000, 6000] {
        let packet = padded(&query, total);
        assert_eq!(packet.len(), total);
        let raw = client::udp_exchange(stack.dns.udp(), &packet, client::DEFAULT_TIMEOUT)?
            .ok_or_else(|| anyhow::anyhow!("{total}-byte query: no UDP answer"))?;
        let reply = Reply::parse(&raw)?;
        assert_eq!(reply.id, 0x4242, "{total}: {reply:?}");
        assert_eq!(reply.question, vec![(zones::svc(71), Rtype::A)], "{total}");
        assert_eq!(reply.rcode, OptRcode::NOERROR, "{total}: {reply:?}");
        if reply.tc {
            assert!(reply.answer.is_empty(), "{total}: TC=1 carries no records");
        } else {
            // Read whole (epoll reads 4 KB): answered like any query.
            assert!(
                total <= 4096,
                "{total}-byte query cannot have been read whole"
            );
            assert_eq!(reply.rdata()[0].2, zones::svc_v4(71).to_string());
        }
        let mut stream = client::tcp_connect(stack.dns.tcp())?;
        client::tcp_send(&mut stream, &packet)?;
        let raw = client::tcp_receive(&mut stream)?
            .ok_or_else(|| anyhow::anyhow!("{total}: TCP closed without an answer"))?;
        let reply = Reply::parse(&raw)?;
        assert_eq!(reply.rcode, OptRcode::NOERROR, "{total}/tcp: {reply:?}");
        assert_eq!(reply.rdata()[0].2, zones::svc_v4(71).to_string());
    }
    assert_still_serving(stack.dns.udp(), stack.dns.tcp())?;
    stack.dns.stop()
}
