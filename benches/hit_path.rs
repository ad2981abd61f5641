//! Criterion micro-benchmarks of the pure cache-hit path: parse, key, lookup, reply, and the
//! whole `Handler::handle_query` on a hit; of preparing an upstream answer; and of the whole
//! user-space round trip of a UDP miss on a worker (`miss_path`).
//!
//! Runs on: the bench thread; no I/O, no kernel. `cargo bench --bench hit_path` (add
//! `-- --quick` for a fast pass). Compare with perf/run.sh: the kernel's UDP path costs ~1.8 µs
//! per query (shared/ANCHORS.md), so everything measured here is what ringdns adds on top.
//!
//! The cache is warmed the way tests/hit_alloc.rs does it: a miss, the request taken from the
//! upstream channel, an upstream answer fed back through `handle_reply`, then hits.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

use ringdns::cache::{Lookup, Shard};
use ringdns::dns::{self, Answer, Query, KEY_MAX};
use ringdns::upstream::{Outcome, Reply};
use ringdns::worker::handler::{Action, Handler, Settings};
use ringdns::worker::pending::Origin;
use ringdns::worker::stats::WorkerStats;

#[path = "../tests/support/worker_miss.rs"]
mod worker_miss;
use worker_miss::WorkerMiss;

/// The qname of every benchmark: a typical Service name (33 bytes on the wire).
const QNAME: &str = "svc-1.default.svc.cluster.local";
/// The same name in the mixed case a 0x20-randomizing client might send.
const QNAME_MIXED: &str = "SVC-1.Default.svc.CLUSTER.local";
/// Our EDNS payload size (the config default).
const UDP_PAYLOAD: u16 = 1232;

/// Wire-format name.
fn name(dotted: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in dotted.split('.').filter(|label| !label.is_empty()) {
        out.push(u8::try_from(label.len()).expect("bench labels are short"));
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A stub's query with ID `id` for `qname` type A, RD=1, with an OPT record (DO off) if `edns`.
fn query(id: u16, qname: &str, edns: bool) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    out.extend(name(qname));
    out.extend([0, 1, 0, 1]);
    if edns {
        out.extend([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    out
}

/// The upstream's answer to `upstream_query` (which ends in our OPT record): two A records,
/// TTL 30, plus an OPT record.
fn upstream_answer(upstream_query: &[u8]) -> Vec<u8> {
    let question_end = upstream_query.len() - dns::OPT_LEN;
    let mut out = upstream_query[..question_end].to_vec();
    out[2] = 0x81;
    out[3] = 0x80;
    out[7] = 2;
    out[11] = 1;
    for last in [1u8, 2] {
        out.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, last]);
    }
    out.extend([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    out
}

/// A handler whose cache holds `QNAME` A, warmed through the miss → reply path at `now`.
fn warmed_handler(now: Instant) -> Handler {
    let settings = Settings {
        udp_payload: UDP_PAYLOAD,
        limits: worker_miss::default_limits(),
        miss_deadline: Duration::from_secs(3),
        max_misses: 64,
        max_waiters: 8,
    };
    let mut handler = Handler::new(0, settings, Arc::new(WorkerStats::default()));
    let origin = Origin::Udp {
        socket: 0,
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
    };
    let mut out = vec![0u8; 65535];
    let action = handler.handle_query(&query(1, QNAME, true), now, origin, &mut out);
    assert_eq!(action, Action::Parked, "the first query is a miss");
    let mut requests = Vec::new();
    handler.take_requests(&mut requests);
    let request = requests.pop().expect("the miss went upstream");
    let reply = Reply {
        token: request.token,
        outcome: Outcome::Answer(upstream_answer(&request.query)),
    };
    let mut answered = 0;
    handler.handle_reply(reply, now, &mut out, &mut |_, _| answered += 1);
    assert_eq!(answered, 1, "the parked client got the answer");
    handler
}

/// The cache key of `bytes`.
fn key_of(bytes: &[u8]) -> Vec<u8> {
    let parsed = Query::parse(bytes).expect("bench queries parse");
    let mut key = [0u8; KEY_MAX];
    let len = parsed.key_into(&mut key);
    key[..len].to_vec()
}

/// A shard holding `QNAME` A (two records) inserted at `now`, and the cached answer itself.
fn warmed_shard(now: Instant) -> (Shard, Answer) {
    let miss = query(1, QNAME, true);
    let parsed = Query::parse(&miss).expect("bench queries parse");
    let key = key_of(&miss);
    let upstream = upstream_answer(&dns::upstream_query(&parsed, UDP_PAYLOAD));
    let answer = Answer::from_upstream(&upstream, &key).expect("the upstream answer is valid");
    let mut shard = Shard::new(worker_miss::default_limits());
    assert!(
        shard.insert(&key, answer.clone(), now),
        "a 30 s answer is cached"
    );
    (shard, answer)
}

fn hit_path(c: &mut Criterion) {
    let now = Instant::now();
    // Hits are 3 s after the insert, so the TTL rewrite has real work to do.
    let later = now + Duration::from_secs(3);
    let hit = query(0xbeef, QNAME_MIXED, true);
    let hit_plain = query(0xbeef, QNAME_MIXED, false);

    c.bench_function("Query::parse", |b| {
        b.iter(|| Query::parse(black_box(&hit)).is_ok())
    });

    let parsed = Query::parse(&hit).expect("bench queries parse");
    let mut key = [0u8; KEY_MAX];
    c.bench_function("Query::key_into", |b| {
        b.iter(|| black_box(&parsed).key_into(black_box(&mut key)))
    });

    let (mut shard, answer) = warmed_shard(now);
    let hit_key = key_of(&hit);
    c.bench_function("Shard::lookup hit", |b| {
        b.iter(
            || match shard.lookup(black_box(&hit_key), black_box(later)) {
                Lookup::Hit { ttl_secs, .. } => ttl_secs,
                Lookup::Miss => panic!("the warmed key must hit"),
            },
        )
    });
    let miss_key = key_of(&query(1, "svc-2.default.svc.cluster.local", true));
    c.bench_function("Shard::lookup miss", |b| {
        b.iter(|| matches!(shard.lookup(black_box(&miss_key), later), Lookup::Miss))
    });

    // The miss path's share: validating and preparing the upstream answer for the cache.
    let miss = query(1, QNAME, true);
    let upstream = upstream_answer(&dns::upstream_query(
        &Query::parse(&miss).expect("bench queries parse"),
        UDP_PAYLOAD,
    ));
    let miss_key = key_of(&miss);
    c.bench_function("Answer::from_upstream", |b| {
        b.iter(|| Answer::from_upstream(black_box(&upstream), black_box(&miss_key)).is_ok())
    });

    let mut out = vec![0u8; 65535];
    let limit = parsed.udp_limit(UDP_PAYLOAD);
    c.bench_function("Answer::write_reply", |b| {
        b.iter(|| {
            answer.write_reply(
                black_box(&parsed),
                black_box(27),
                UDP_PAYLOAD,
                limit,
                black_box(&mut out),
            )
        })
    });

    let mut handler = warmed_handler(now);
    let origin = Origin::Udp {
        socket: 0,
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
    };
    for (label, bytes) in [("edns", &hit), ("no edns", &hit_plain)] {
        let action = handler.handle_query(bytes, later, origin, &mut out);
        assert!(
            matches!(action, Action::Reply { .. }),
            "expected a hit ({label}), got {action:?}"
        );
        c.bench_function(&format!("Handler::handle_query hit ({label})"), |b| {
            b.iter(|| handler.handle_query(black_box(bytes), later, origin, black_box(&mut out)))
        });
    }
}

/// A worker's user-space round trip for one UDP miss (tests/support/worker_miss.rs).
fn miss_path(c: &mut Criterion) {
    let now = Instant::now();
    let mut worker = WorkerMiss::new(|name| query(0x4242, name, true));
    c.bench_function("UDP miss, worker round trip", |b| {
        b.iter(|| worker.miss(now))
    });
    assert_eq!(worker.answered, worker.misses(), "every miss was answered");
    let (accepted, evicted) = worker.accepted_and_evicted();
    assert_eq!(accepted, worker.misses(), "every answer was accepted");
    assert!(evicted > 0, "the cache filled and evicted");
}

criterion_group!(benches, hit_path, miss_path);
criterion_main!(benches);
