//! One worker's cache shard: a success cache and a denial cache with O(1) LRU eviction.
//!
//! Runs on: worker threads (each owns one [`Shard`]; no other thread touches it).
//!
//! Like NodeLocal DNSCache (CoreDNS `cache`), positive and negative answers live in separate
//! caches with their own capacity and TTL cap, so a flood of NXDOMAIN names (search-path
//! expansions) cannot push out the positive answers. Each cache is a slab of entries threaded
//! on an intrusive doubly-linked LRU list plus a `hashbrown::HashTable` of slab indices, so
//! lookup, insert and eviction are O(1) and memory is bounded by the capacity whatever names
//! clients send. Lookups hash the borrowed key: a hit allocates nothing.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use hashbrown::HashTable;

use crate::dns::{Answer, Kind};

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// A live entry and the TTL it has left, in whole seconds (≥ 1).
    Hit {
        /// The cached answer.
        answer: &'a Answer,
        /// Remaining TTL to write into every record.
        ttl_secs: u32,
    },
    /// Nothing cached (an expired entry is removed and reported as a miss).
    Miss,
}

/// Capacities and TTL caps of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Success cache entries.
    pub success_capacity: usize,
    /// Cap on positive TTLs.
    pub success_ttl: Duration,
    /// Denial cache entries.
    pub denial_capacity: usize,
    /// Cap on negative TTLs.
    pub denial_ttl: Duration,
    /// How long SERVFAIL is cached (in the denial cache); zero = never.
    pub servfail_ttl: Duration,
}

/// Counters a shard keeps about itself (read through the worker's stats).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardCounts {
    /// Entries evicted by capacity, both caches.
    pub evictions: u64,
    /// Entries dropped because they expired.
    pub expired: u64,
}

/// A worker's cache: success + denial.
#[derive(Debug)]
pub struct Shard {
    /// Positive answers.
    success: Lru,
    /// NXDOMAIN, NODATA and (if configured) SERVFAIL.
    denial: Lru,
    /// TTL caps.
    limits: Limits,
    /// Hasher shared by both tables (per shard, random seed).
    hasher: ahash::RandomState,
    /// Eviction and expiry counts.
    counts: ShardCounts,
}

impl Shard {
    /// An empty shard. Allocates both slabs up front so inserts below capacity do not grow
    /// them.
    pub fn new(limits: Limits) -> Shard {
        Shard {
            success: Lru::with_capacity(limits.success_capacity),
            denial: Lru::with_capacity(limits.denial_capacity),
            limits,
            hasher: ahash::RandomState::new(),
            counts: ShardCounts::default(),
        }
    }

    /// Changes limits (on reload); entries beyond a smaller capacity are evicted oldest first.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.counts.evictions += self.success.shrink_to(limits.success_capacity);
        self.counts.evictions += self.denial.shrink_to(limits.denial_capacity);
    }

    /// Looks `key` up at time `now`. Does not allocate.
    pub fn lookup(&mut self, key: &[u8], now: Instant) -> Lookup<'_> {
        let hash = self.hasher.hash_one(key);
        let found = match self.success.find(hash, key) {
            Some(index) => Some((true, index)),
            None => self.denial.find(hash, key).map(|index| (false, index)),
        };
        let Some((in_success, index)) = found else {
            return Lookup::Miss;
        };
        let lru = if in_success {
            &mut self.success
        } else {
            &mut self.denial
        };
        let entry = &lru.slots[index];
        let age = now.saturating_duration_since(entry.inserted).as_secs();
        if age >= u64::from(entry.ttl_secs) {
            lru.remove(hash, index);
            self.counts.expired += 1;
            return Lookup::Miss;
        }
        let ttl_secs = entry.ttl_secs - age as u32;
        lru.touch(index);
        Lookup::Hit {
            answer: &lru.slots[index].answer,
            ttl_secs,
        }
    }

    /// Stores `answer` under `key` if its kind and TTL allow; returns whether it was stored.
    ///
    /// The entry's lifetime is the answer's TTL capped by the kind's limit; a zero lifetime
    /// (TTL 0, a denial without SOA, SERVFAIL with `servfail_ttl = 0`, TC answers, other
    /// rcodes) is not stored (RFC 1035 §3.2.1: TTL 0 must not be cached).
    pub fn insert(&mut self, key: &[u8], answer: Answer, now: Instant) -> bool {
        self.store(key, answer, now)
    }

    /// [`Shard::insert`] with a key the caller owns, stored as it is (the miss path hands over
    /// its pending miss's key rather than have it copied).
    pub fn insert_owned(&mut self, key: Box<[u8]>, answer: Answer, now: Instant) -> bool {
        self.store(key, answer, now)
    }

    /// [`Shard::insert`]: `key` becomes the entry's own only if it is stored.
    fn store(
        &mut self,
        key: impl AsRef<[u8]> + Into<Box<[u8]>>,
        answer: Answer,
        now: Instant,
    ) -> bool {
        let to_success = match answer.kind() {
            Kind::Success => true,
            Kind::Denial | Kind::ServFail => false,
            Kind::Other => return false,
        };
        let ttl_secs = match answer.kind() {
            Kind::ServFail => secs(self.limits.servfail_ttl),
            _ => self.reply_ttl(&answer),
        };
        if ttl_secs == 0 {
            return false;
        }
        let hash = self.hasher.hash_one(key.as_ref());
        // A key lives in one cache at a time: a name that changed from NXDOMAIN to an answer
        // must not be shadowed by its old denial.
        let (target, other) = if to_success {
            (&mut self.success, &mut self.denial)
        } else {
            (&mut self.denial, &mut self.success)
        };
        if let Some(index) = other.find(hash, key.as_ref()) {
            other.remove(hash, index);
        }
        let entry = Entry {
            key: key.into(),
            hash,
            answer,
            inserted: now,
            ttl_secs,
            prev: NIL,
            next: NIL,
        };
        if target.insert(entry) {
            self.counts.evictions += 1;
        }
        true
    }

    /// The TTL to write into a fresh upstream answer: its own, capped as its cache entry
    /// will be (so the first client sees what later hits will).
    pub fn reply_ttl(&self, answer: &Answer) -> u32 {
        let cap = match answer.kind() {
            Kind::Denial | Kind::ServFail => self.limits.denial_ttl,
            Kind::Success | Kind::Other => self.limits.success_ttl,
        };
        answer.ttl_secs().min(secs(cap))
    }

    /// Entries held: (success, denial).
    pub fn len(&self) -> (usize, usize) {
        (self.success.len(), self.denial.len())
    }

    /// Whether both caches are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    /// Eviction and expiry counts so far.
    pub fn counts(&self) -> ShardCounts {
        self.counts
    }
}

/// Whole seconds of `duration`, saturating at `u32::MAX`.
fn secs(duration: Duration) -> u32 {
    u32::try_from(duration.as_secs()).unwrap_or(u32::MAX)
}

/// Sentinel for "no neighbour" in the intrusive list.
const NIL: u32 = u32::MAX;

/// One cached answer.
#[derive(Debug)]
struct Entry {
    /// The cache key (see `Query::key_into`).
    key: Box<[u8]>,
    /// `hash(key)`, kept so eviction can find the table slot without rehashing.
    hash: u64,
    /// What to replay.
    answer: Answer,
    /// When it was stored.
    inserted: Instant,
    /// Lifetime from `inserted`, already capped.
    ttl_secs: u32,
    /// Towards the most recently used end.
    prev: u32,
    /// Towards the least recently used end.
    next: u32,
}

/// A bounded LRU map from key bytes to [`Entry`].
#[derive(Debug)]
struct Lru {
    /// Slot indices, hashed by key.
    table: HashTable<u32>,
    /// Entries; `free` lists the vacant ones.
    slots: Vec<Entry>,
    /// Vacant slot indices (after removals), reused before growing.
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next victim.
    tail: u32,
    /// Maximum live entries.
    capacity: usize,
}

impl Lru {
    /// An empty LRU holding at most `capacity` entries.
    fn with_capacity(capacity: usize) -> Lru {
        Lru {
            table: HashTable::with_capacity(capacity),
            slots: Vec::with_capacity(capacity),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
        }
    }

    /// Live entries.
    fn len(&self) -> usize {
        self.table.len()
    }

    /// The slot index holding `key`, if any.
    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let slots = &self.slots;
        self.table
            .find(hash, |&index| *slots[index as usize].key == *key)
            .map(|&index| index as usize)
    }

    /// Unlinks slot `index` from the list.
    fn unlink(&mut self, index: usize) {
        let (prev, next) = (self.slots[index].prev, self.slots[index].next);
        match prev {
            NIL => self.head = next,
            prev => self.slots[prev as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.slots[next as usize].prev = prev,
        }
    }

    /// Links slot `index` at the head (most recently used).
    fn push_front(&mut self, index: usize) {
        let old_head = self.head;
        self.slots[index].prev = NIL;
        self.slots[index].next = old_head;
        if old_head != NIL {
            self.slots[old_head as usize].prev = index as u32;
        }
        self.head = index as u32;
        if self.tail == NIL {
            self.tail = index as u32;
        }
    }

    /// Marks slot `index` most recently used.
    fn touch(&mut self, index: usize) {
        if self.head != index as u32 {
            self.unlink(index);
            self.push_front(index);
        }
    }

    /// Removes the entry in slot `index` (hash `hash`).
    fn remove(&mut self, hash: u64, index: usize) {
        if let Ok(found) = self.table.find_entry(hash, |&slot| slot as usize == index) {
            found.remove();
        }
        self.unlink(index);
        // Release the answer's memory now; the slot itself is reused by the next insert.
        self.slots[index].answer = Answer::empty();
        self.slots[index].key = Box::default();
        self.free.push(index as u32);
    }

    /// Inserts or replaces `entry`; returns whether an entry was evicted to make room.
    fn insert(&mut self, entry: Entry) -> bool {
        if let Some(index) = self.find(entry.hash, &entry.key) {
            self.unlink(index);
            self.slots[index] = entry;
            self.push_front(index);
            return false;
        }
        let mut evicted = false;
        if self.len() >= self.capacity {
            let victim = self.tail as usize;
            let hash = self.slots[victim].hash;
            self.remove(hash, victim);
            evicted = true;
        }
        let hash = entry.hash;
        let index = match self.free.pop() {
            Some(index) => {
                self.slots[index as usize] = entry;
                index as usize
            }
            None => {
                self.slots.push(entry);
                self.slots.len() - 1
            }
        };
        self.push_front(index);
        let slots = &self.slots;
        self.table
            .insert_unique(hash, index as u32, |&slot| slots[slot as usize].hash);
        evicted
    }

    /// Evicts least recently used entries until at most `capacity` remain; returns how many.
    fn shrink_to(&mut self, capacity: usize) -> u64 {
        self.capacity = capacity;
        let mut evicted = 0;
        while self.len() > capacity {
            let victim = self.tail as usize;
            let hash = self.slots[victim].hash;
            self.remove(hash, victim);
            evicted += 1;
        }
        evicted
    }
}

#[cfg(test)]
mod tests;
