//! What the fuzz targets check, shared by `fuzz/fuzz_targets/*.rs` (cargo fuzz, libFuzzer) and
//! `tests/fuzz_corpus.rs` (the stable test suite: the seed corpus plus deterministic mutations
//! of it). Network bytes reach ringdns from two sides, and each has a target:
//!
//! - [`query`]: any bytes as a client's query, over UDP and over TCP, against a worker's
//!   handler whose cache holds an answer. No panic; a reply is a well-formed DNS response
//!   (every record parses) with QR=1, the client's ID and question (letter case included);
//!   over UDP no longer than the client may receive (512 bytes without EDNS), over TCP never
//!   truncated; a miss sends one well-formed query upstream, and the answer reaches the client.
//! - [`upstream_answer`]: any bytes as the upstream's answer to a client's miss (a lying or
//!   broken upstream). No panic; whatever the client gets (the answer, or SERVFAIL) passes the
//!   same checks, and so do the cache hit or miss that follow, at once and with the TTLs aged;
//!   a hit gives the records (TTLs aside) the last miss gave, unless either was truncated.
//!
//! Runs on: the fuzzer's or the test's thread; pure (no I/O, no clock: time is passed in).

// Each fuzz target uses one half of this file.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::base::{Message, ParsedName};
use domain::rdata::AllRecordData;

use ringdns::cache::Limits;
use ringdns::upstream::{Outcome, Reply};
use ringdns::worker::handler::{Action, Handler, Settings};
use ringdns::worker::pending::Origin;
use ringdns::worker::stats::WorkerStats;

/// Our EDNS payload size (the config default).
const UDP_PAYLOAD: u16 = 1232;

/// The questions [`upstream_answer`] asks (its input's first byte picks one, and whether the
/// client's query has an OPT record): name, type.
pub(crate) const QUESTIONS: [(&str, u16); 4] = [
    ("svc-1.default.svc.cluster.local", 1),
    ("svc-1.default.svc.cluster.local", 28),
    ("_http._tcp.svc-1.default.svc.cluster.local", 33),
    ("10.0.96.10.in-addr.arpa", 12),
];

/// The name [`query`]'s handler holds in its cache (type A).
pub(crate) const CACHED: &str = "svc-1.default.svc.cluster.local";

/// A small cache (the fuzzer builds one per input).
fn handler() -> Handler {
    let settings = Settings {
        udp_payload: UDP_PAYLOAD,
        limits: Limits {
            success_capacity: 16,
            success_ttl: Duration::from_secs(30),
            denial_capacity: 16,
            denial_ttl: Duration::from_secs(5),
            servfail_ttl: Duration::from_secs(1),
        },
        miss_deadline: Duration::from_secs(3),
        max_misses: 16,
        max_waiters: 4,
    };
    Handler::new(0, settings, Arc::new(WorkerStats::default()))
}

/// A UDP client.
fn udp() -> Origin {
    Origin::Udp {
        socket: 0,
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
    }
}

/// A TCP client.
fn tcp() -> Origin {
    Origin::Tcp { socket: 0, conn: 1 }
}

/// Wire-format name of a dotted one.
pub(crate) fn wire_name(dotted: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in dotted.split('.').filter(|label| !label.is_empty()) {
        out.push(u8::try_from(label.len()).expect("fuzz names have short labels"));
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A stub's query: ID `id`, RD=1, one question, an OPT record (payload 1232) if `edns`.
pub(crate) fn stub_query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    out.extend(wire_name(name));
    out.extend(qtype.to_be_bytes());
    out.extend([0, 1]);
    if edns {
        out.extend([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    out
}

/// A valid answer to `upstream_query` (ringdns' own query upstream): NOERROR with one A record
/// (TTL 30) for an A question, NODATA otherwise; the question copied, OPT dropped.
pub(crate) fn valid_answer(upstream_query: &[u8]) -> Vec<u8> {
    // ringdns writes the qname uncompressed: labels up to the root label.
    let mut name_end = 12;
    while let Some(&len) = upstream_query.get(name_end).filter(|&&len| len != 0) {
        name_end += 1 + usize::from(len);
    }
    let question_end = name_end + 5;
    let qtype = upstream_query
        .get(name_end + 1..name_end + 3)
        .map_or(0, |bytes| u16::from_be_bytes([bytes[0], bytes[1]]));
    let mut out = upstream_query[..question_end].to_vec();
    out[2] = 0x81;
    out[3] = 0x80;
    out[10] = 0;
    out[11] = 0;
    if qtype == 1 {
        out[7] = 1;
        out.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
    }
    out
}

/// Asserts that `reply` is a well-formed response to a query whose first bytes are `query`:
/// it parses with every record, has QR=1 and the query's ID, and a question it carries is the
/// query's, letter case included. Returns its records (see [`records`]).
fn check_response(reply: &[u8], query: &[u8]) -> Vec<String> {
    let message = Message::from_slice(reply)
        .unwrap_or_else(|error| panic!("reply does not parse: {error}: {reply:02x?}"));
    assert!(message.header().qr(), "reply without QR: {reply:02x?}");
    if let Some(id) = query.get(..2) {
        assert_eq!(&reply[..2], id, "reply with another ID: {reply:02x?}");
    }
    let asked = Message::from_slice(query)
        .ok()
        .and_then(|query| query.first_question())
        .map(|question| question.to_string());
    if let (Some(asked), Some(echoed)) = (asked, message.first_question()) {
        assert_eq!(
            echoed.to_string(),
            asked,
            "reply with another question: {reply:02x?}"
        );
    }
    for section in [message.answer(), message.authority(), message.additional()] {
        let section = section.unwrap_or_else(|error| panic!("bad section: {error}: {reply:02x?}"));
        for record in section {
            let record = record.unwrap_or_else(|error| panic!("bad record: {error}: {reply:02x?}"));
            // OPT parses as a record too (its data as options).
            record
                .to_any_record::<AllRecordData<&[u8], ParsedName<&[u8]>>>()
                .unwrap_or_else(|error| panic!("bad record data: {error}: {reply:02x?}"));
        }
    }
    records(reply)
}

/// The answer and authority records of `reply` as text without TTLs, owner names in lower
/// case: what a cache hit must give again.
fn records(reply: &[u8]) -> Vec<String> {
    let Ok(message) = Message::from_slice(reply) else {
        return Vec::new();
    };
    let header = message.header();
    let mut all = vec![format!("rcode {} tc {}", header.rcode(), header.tc())];
    for section in [message.answer(), message.authority()] {
        for record in section.into_iter().flatten().flatten() {
            if let Ok(record) = record.to_any_record::<AllRecordData<&[u8], ParsedName<&[u8]>>>() {
                all.push(format!(
                    "{} {} {} {}",
                    record.owner().to_string().to_lowercase(),
                    record.class(),
                    record.rtype(),
                    record.data()
                ));
            }
        }
    }
    all
}

/// Asserts that a UDP reply fits what the client `query` may receive: 512 bytes without
/// EDNS, else its payload size capped at ours (never below 512). If domain cannot read the
/// query's OPT record, only our cap is checked.
fn check_udp_len(len: usize, query: &[u8]) {
    let limit = match Message::from_slice(query).map(|message| message.opt()) {
        Ok(Some(opt)) => opt.udp_payload_size().clamp(512, UDP_PAYLOAD),
        Ok(None) if query.get(10..12) == Some(&[0, 0]) => 512,
        _ => UDP_PAYLOAD,
    };
    assert!(
        len <= usize::from(limit),
        "UDP reply of {len} bytes exceeds the client's {limit}"
    );
}

/// Asserts that a TCP reply (its [`records`]) is not truncated: TCP carries 65535 bytes, more
/// than any answer ringdns accepts.
fn check_not_truncated(records: &[String]) {
    assert!(
        records
            .first()
            .is_none_or(|line| line.ends_with("tc false")),
        "a TCP reply with TC=1: {records:?}"
    );
}

/// Answers every miss `handler` sent upstream with [`valid_answer`] (or with `answer`, if
/// given), checking each upstream query and each reply its clients get; returns the records
/// of the last reply.
fn answer_misses(
    handler: &mut Handler,
    now: Instant,
    client: &[u8],
    answer: Option<&[u8]>,
) -> Vec<String> {
    let mut last = Vec::new();
    let mut requests = Vec::new();
    handler.take_requests(&mut requests);
    let mut out = vec![0u8; 65535];
    for request in requests {
        let message = Message::from_slice(&request.query)
            .unwrap_or_else(|error| panic!("upstream query does not parse: {error}"));
        assert!(!message.header().qr(), "upstream query with QR");
        assert_eq!(
            message.header_counts().qdcount(),
            1,
            "upstream query questions"
        );
        let bytes = answer.map_or_else(|| valid_answer(&request.query), <[u8]>::to_vec);
        let reply = Reply {
            token: request.token,
            outcome: Outcome::Answer(bytes),
        };
        let mut delivered = 0;
        handler.handle_reply(reply, now, &mut out, &mut |origin, bytes| {
            delivered += 1;
            last = check_response(bytes, client);
            match origin {
                Origin::Udp { .. } => check_udp_len(bytes.len(), client),
                Origin::Tcp { .. } => check_not_truncated(&last),
            }
        });
        assert!(delivered > 0, "the parked client got no answer");
    }
    last
}

/// What came of one query.
enum Handled {
    /// Answered at once (from the cache, or an error): the reply's records.
    Reply(Vec<String>),
    /// Parked and answered through the upstream: the reply's records.
    Forwarded(Vec<String>),
    /// Dropped.
    Dropped,
}

/// Handles `query` from `origin` and checks what comes of it (see the module docs).
fn handle_and_check(handler: &mut Handler, query: &[u8], now: Instant, origin: Origin) -> Handled {
    let mut out = vec![0u8; 65535];
    match handler.handle_query(query, now, origin, &mut out) {
        Action::Reply { len } => {
            assert!(len <= out.len());
            let records = check_response(&out[..len], query);
            match origin {
                Origin::Udp { .. } => check_udp_len(len, query),
                Origin::Tcp { .. } => check_not_truncated(&records),
            }
            Handled::Reply(records)
        }
        Action::Parked => Handled::Forwarded(answer_misses(handler, now, query, None)),
        Action::Drop(_) => Handled::Dropped,
    }
}

/// `data` as a client's query (see the module docs).
pub(crate) fn query(data: &[u8]) {
    let now = Instant::now();
    let mut handler = handler();
    // Warm the cache through the real miss path.
    let warm = handle_and_check(&mut handler, &stub_query(1, CACHED, 1, true), now, udp());
    assert!(
        matches!(warm, Handled::Forwarded(_)),
        "the first query is a miss"
    );
    for origin in [udp(), tcp()] {
        handle_and_check(&mut handler, data, now, origin);
    }
    // The same bytes once cached entries have aged (and the denial ones expired).
    handle_and_check(&mut handler, data, now + Duration::from_secs(10), udp());
    // The same bytes as the start of a UDP query too long to read whole: TC=1 and the
    // question at most, well-formed, within the 512 bytes every client takes.
    let mut out = vec![0u8; 65535];
    if let Action::Reply { len } = handler.handle_too_long(data, &mut out) {
        let reply = &out[..len];
        assert!(len <= 512, "a TC reply to a cut query of {len} bytes");
        check_response(reply, data);
        let message = Message::from_slice(reply).expect("check_response parsed it");
        let counts = message.header_counts();
        assert!(
            message.header().tc() && counts.ancount() + counts.nscount() + counts.arcount() == 0,
            "a cut query's reply without TC or with records: {reply:02x?}"
        );
    }
}

/// `data[0]` picks a question of [`QUESTIONS`] (and bit 7 an OPT record in the client's
/// query); `data[1..]` is the upstream's answer (see the module docs).
pub(crate) fn upstream_answer(data: &[u8]) {
    let Some((&pick, answer)) = data.split_first() else {
        return;
    };
    let (name, qtype) = QUESTIONS[usize::from(pick & 3)];
    let client = stub_query(0x4242, name, qtype, pick & 0x80 != 0);
    let now = Instant::now();
    let mut handler = handler();
    let mut out = vec![0u8; 65535];
    let action = handler.handle_query(&client, now, udp(), &mut out);
    assert_eq!(action, Action::Parked, "a first query is a miss");
    let mut expected = answer_misses(&mut handler, now, &client, Some(answer));
    // Then from the cache (or upstream again), at once and once the TTLs aged: a hit gives
    // the records the last miss gave (TTLs aside), unless either reply was truncated.
    let again = stub_query(0x1717, &name.to_uppercase(), qtype, pick & 0x80 != 0);
    let truncated = |records: &[String]| {
        records
            .first()
            .is_some_and(|line| line.ends_with("tc true"))
    };
    for later in [0, 7, 3600] {
        for origin in [udp(), tcp()] {
            let at = now + Duration::from_secs(later);
            match handle_and_check(&mut handler, &again, at, origin) {
                Handled::Reply(records) if !truncated(&expected) && !truncated(&records) => {
                    assert_eq!(
                        records, expected,
                        "a hit {later} s later differs from the miss"
                    );
                }
                // Expired: the cache now holds what the upstream answered this time.
                Handled::Forwarded(records) => expected = records,
                _ => {}
            }
        }
    }
}
