//! Unit tests of the shard: key equality, TTL ageing and caps, eviction, the two caches.

use super::*;
use crate::dns::tests::{answer, query};
use crate::dns::{Query, KEY_MAX};

/// Default-like limits with small capacities.
fn limits(capacity: usize) -> Limits {
    Limits {
        success_capacity: capacity,
        success_ttl: Duration::from_secs(30),
        denial_capacity: capacity,
        denial_ttl: Duration::from_secs(5),
        servfail_ttl: Duration::ZERO,
    }
}

/// The key and a prepared upstream answer for `name` (rcode, A TTLs, SOA).
fn prepared(name: &str, rcode: u8, ttls: &[u32], soa: Option<(u32, u32)>) -> (Vec<u8>, Answer) {
    let bytes = query(name, 1, None);
    let mut key = [0u8; KEY_MAX];
    let len = Query::parse(&bytes).expect("parses").key_into(&mut key);
    let upstream = answer(&bytes, rcode, ttls, soa);
    let answer = Answer::from_upstream(&upstream, &key[..len]).expect("valid");
    (key[..len].to_vec(), answer)
}

/// The remaining TTL of a hit, or None on a miss.
fn ttl_of(shard: &mut Shard, key: &[u8], now: Instant) -> Option<u32> {
    match shard.lookup(key, now) {
        Lookup::Hit { ttl_secs, .. } => Some(ttl_secs),
        Lookup::Miss => None,
    }
}

#[test]
fn hit_ttl_is_lowered_by_age() {
    let mut shard = Shard::new(limits(10));
    let now = Instant::now();
    let (key, answer) = prepared("a.test", 0, &[20], None);
    assert!(shard.insert(&key, answer, now));
    assert_eq!(ttl_of(&mut shard, &key, now), Some(20));
    assert_eq!(
        ttl_of(&mut shard, &key, now + Duration::from_millis(7500)),
        Some(13)
    );
}

#[test]
fn expired_entry_is_a_miss() {
    let mut shard = Shard::new(limits(10));
    let now = Instant::now();
    let (key, answer) = prepared("a.test", 0, &[20], None);
    shard.insert(&key, answer, now);
    assert_eq!(
        ttl_of(&mut shard, &key, now + Duration::from_secs(20)),
        None
    );
    assert_eq!(shard.len(), (0, 0));
    assert_eq!(shard.counts().expired, 1);
}

#[test]
fn positive_ttl_is_capped() {
    let mut shard = Shard::new(limits(10));
    let now = Instant::now();
    let (key, answer) = prepared("a.test", 0, &[3600], None);
    shard.insert(&key, answer, now);
    assert_eq!(ttl_of(&mut shard, &key, now), Some(30));
}

#[test]
fn denial_goes_to_denial_cache_with_its_cap() {
    let mut shard = Shard::new(limits(10));
    let now = Instant::now();
    let (key, answer) = prepared("nx.test", 3, &[], Some((300, 300)));
    assert!(shard.insert(&key, answer, now));
    assert_eq!(shard.len(), (0, 1));
    assert_eq!(ttl_of(&mut shard, &key, now), Some(5));
}

#[test]
fn uncacheable_answers_are_not_stored() {
    let mut shard = Shard::new(limits(10));
    let now = Instant::now();
    let (key, zero) = prepared("a.test", 0, &[0], None);
    assert!(!shard.insert(&key, zero, now));
    let (key, no_soa) = prepared("nx.test", 3, &[], None);
    assert!(!shard.insert(&key, no_soa, now));
    let (key, servfail) = prepared("sf.test", 2, &[], None);
    assert!(
        !shard.insert(&key, servfail, now),
        "servfail_ttl 0 = not cached"
    );
    let (key, refused) = prepared("r.test", 5, &[], None);
    assert!(!shard.insert(&key, refused, now));
    assert!(shard.is_empty());
}

#[test]
fn servfail_cached_only_when_configured() {
    let mut config = limits(10);
    config.servfail_ttl = Duration::from_secs(2);
    let mut shard = Shard::new(config);
    let now = Instant::now();
    let (key, servfail) = prepared("sf.test", 2, &[], None);
    assert!(shard.insert(&key, servfail, now));
    assert_eq!(ttl_of(&mut shard, &key, now), Some(2));
}

#[test]
fn eviction_drops_least_recently_used() {
    let mut shard = Shard::new(limits(3));
    let now = Instant::now();
    let keys: Vec<Vec<u8>> = (0..3)
        .map(|n| {
            let (key, answer) = prepared(&format!("n{n}.test"), 0, &[30], None);
            shard.insert(&key, answer, now);
            key
        })
        .collect();
    // Touch n0 so n1 becomes the oldest.
    assert!(ttl_of(&mut shard, &keys[0], now).is_some());
    let (key, answer) = prepared("n3.test", 0, &[30], None);
    shard.insert(&key, answer, now);
    assert_eq!(shard.len(), (3, 0));
    assert!(ttl_of(&mut shard, &keys[1], now).is_none(), "n1 evicted");
    assert!(ttl_of(&mut shard, &keys[0], now).is_some());
    assert!(ttl_of(&mut shard, &key, now).is_some());
    assert_eq!(shard.counts().evictions, 1);
}

#[test]
fn memory_stays_bounded_under_unique_names() {
    let mut shard = Shard::new(limits(100));
    let now = Instant::now();
    for n in 0..5_000 {
        let (key, answer) = prepared(&format!("unique-{n}.test"), 0, &[30], None);
        shard.insert(&key, answer, now);
        let (key, answer) = prepared(&format!("nx-{n}.test"), 3, &[], Some((5, 5)));
        shard.insert(&key, answer, now);
    }
    assert_eq!(shard.len(), (100, 100));
    assert!(shard.success.slots.len() <= 100 && shard.denial.slots.len() <= 100);
}

#[test]
fn answer_replaces_old_denial() {
    let mut shard = Shard::new(limits(10));
    let now = Instant::now();
    let (key, denial) = prepared("flip.test", 3, &[], Some((5, 5)));
    shard.insert(&key, denial, now);
    let (_, success) = prepared("flip.test", 0, &[30], None);
    shard.insert(&key, success, now);
    assert_eq!(shard.len(), (1, 0));
}

#[test]
fn shrinking_limits_evicts() {
    let mut shard = Shard::new(limits(10));
    let now = Instant::now();
    for n in 0..10 {
        let (key, answer) = prepared(&format!("s{n}.test"), 0, &[30], None);
        shard.insert(&key, answer, now);
    }
    shard.set_limits(limits(4));
    assert_eq!(shard.len(), (4, 0));
}
