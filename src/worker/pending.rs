//! In-flight misses on this worker; identical ones are coalesced onto one upstream query.
//!
//! Runs on: worker threads.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use hashbrown::HashTable;

/// Where a query came from, so its answer can go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A UDP client: which of this worker's UDP sockets it reached, and its address.
    Udp {
        /// Index of the worker's UDP socket (one per listen address).
        socket: u16,
        /// The client's address.
        peer: SocketAddr,
    },
    /// A TCP client connection of this worker.
    Tcp {
        /// Index of the listen address the connection was accepted on (as for UDP).
        socket: u16,
        /// The worker's connection number.
        conn: u64,
    },
}

/// One client waiting for an upstream answer.
#[derive(Debug)]
pub struct Waiter {
    /// Where to send the answer.
    pub origin: Origin,
    /// The client's query as received (re-parsed to answer it: ID, case, EDNS, RD, CD).
    pub query: Box<[u8]>,
    /// When the query arrived (the receive loop's clock), for the request-duration metric.
    pub parked: Instant,
    /// Index of the metrics zone the qname is in (`stats::Zones`).
    pub zone: u16,
}

/// The clients waiting on one miss: the first inline, so a miss nobody else asks for costs no
/// list allocation.
#[derive(Debug)]
pub struct Waiters {
    /// The client whose query started the miss.
    first: Waiter,
    /// Clients coalesced onto it later.
    rest: Vec<Waiter>,
}

impl Waiters {
    /// A list holding `first`.
    fn new(first: Waiter) -> Waiters {
        Waiters {
            first,
            rest: Vec::new(),
        }
    }

    /// How many clients wait.
    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    /// Never empty: a miss exists because a client asked.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The clients, first one first.
    pub fn iter(&self) -> WaitersIter<'_> {
        std::iter::once(&self.first).chain(self.rest.iter())
    }

    /// Adds a coalesced client.
    fn push(&mut self, waiter: Waiter) {
        self.rest.push(waiter);
    }
}

/// What [`Waiters::iter`] returns.
pub type WaitersIter<'a> =
    std::iter::Chain<std::iter::Once<&'a Waiter>, std::slice::Iter<'a, Waiter>>;

impl<'a> IntoIterator for &'a Waiters {
    type Item = &'a Waiter;
    type IntoIter = WaitersIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// One distinct miss in flight.
#[derive(Debug)]
pub struct Miss {
    /// Its cache key.
    pub key: Box<[u8]>,
    /// Every client asking for it.
    pub waiters: Waiters,
    /// After this the worker gives up and answers SERVFAIL itself (the control side normally
    /// answers well before: this is a guard against a lost reply).
    pub deadline: Instant,
}

/// The outcome of [`Pending::join`].
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// First client for this key: send `token` upstream.
    New(u64),
    /// Added to an in-flight miss: nothing to send.
    Coalesced,
    /// Table or waiter list full: answer SERVFAIL now.
    Full,
}

/// The worker's in-flight misses.
#[derive(Debug)]
pub struct Pending {
    /// Tokens of the in-flight misses, found by their key's hash (the key itself is stored once,
    /// in the [`Miss`]).
    by_key: HashTable<u64>,
    /// Hashes keys for `by_key`.
    hasher: ahash::RandomState,
    /// Token → miss.
    by_token: HashMap<u64, Miss, ahash::RandomState>,
    /// Next token to hand out.
    next_token: u64,
    /// Most distinct misses in flight.
    max_misses: usize,
    /// Most clients waiting on one miss.
    max_waiters: usize,
}

impl Pending {
    /// An empty table with the given bounds.
    pub fn new(max_misses: usize, max_waiters: usize) -> Pending {
        Pending {
            by_key: HashTable::with_capacity(max_misses),
            hasher: ahash::RandomState::new(),
            by_token: HashMap::with_capacity_and_hasher(max_misses, ahash::RandomState::new()),
            next_token: 1,
            max_misses,
            max_waiters,
        }
    }

    /// Hands out tokens from `first` on (a worker restarted in place starts past its
    /// predecessor's, so a late reply to a dead worker's miss never matches a new one).
    pub fn start_tokens_at(&mut self, first: u64) {
        self.next_token = first.max(1);
    }

    /// Adds `waiter` for `key`, coalescing with an identical miss in flight.
    pub fn join(&mut self, key: &[u8], waiter: Waiter, deadline: Instant) -> Joined {
        let hash = self.hasher.hash_one(key);
        let by_token = &self.by_token;
        let found = self
            .by_key
            .find(hash, |token| {
                by_token.get(token).is_some_and(|miss| &*miss.key == key)
            })
            .copied();
        if let Some(token) = found {
            let miss = self
                .by_token
                .get_mut(&token)
                .expect("by_key and by_token hold the same tokens");
            if miss.waiters.len() >= self.max_waiters {
                return Joined::Full;
            }
            miss.waiters.push(waiter);
            return Joined::Coalesced;
        }
        if self.by_token.len() >= self.max_misses {
            return Joined::Full;
        }
        let token = self.next_token;
        self.next_token += 1;
        let hasher = &self.hasher;
        let by_token = &self.by_token;
        self.by_key.insert_unique(hash, token, |token| {
            by_token
                .get(token)
                .map_or(0, |miss| hasher.hash_one(&*miss.key))
        });
        self.by_token.insert(
            token,
            Miss {
                key: key.into(),
                waiters: Waiters::new(waiter),
                deadline,
            },
        );
        Joined::New(token)
    }

    /// Removes and returns the miss for `token` (its answer arrived or it failed).
    pub fn take(&mut self, token: u64) -> Option<Miss> {
        let miss = self.by_token.remove(&token)?;
        let hash = self.hasher.hash_one(&*miss.key);
        if let Ok(entry) = self
            .by_key
            .find_entry(hash, |&candidate| candidate == token)
        {
            entry.remove();
        }
        Some(miss)
    }

    /// Removes and returns every miss whose deadline is before `now`.
    pub fn take_expired(&mut self, now: Instant) -> Vec<Miss> {
        let expired: Vec<u64> = self
            .by_token
            .iter()
            .filter(|(_, miss)| miss.deadline <= now)
            .map(|(&token, _)| token)
            .collect();
        expired
            .into_iter()
            .filter_map(|token| self.take(token))
            .collect()
    }

    /// Distinct misses in flight.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn waiter(conn: u64) -> Waiter {
        Waiter {
            origin: Origin::Tcp { socket: 0, conn },
            query: Box::default(),
            parked: Instant::now(),
            zone: 0,
        }
    }

    #[test]
    fn identical_misses_coalesce() {
        let mut pending = Pending::new(10, 10);
        let deadline = Instant::now() + Duration::from_secs(3);
        let Joined::New(token) = pending.join(b"key", waiter(1), deadline) else {
            panic!("first miss is new");
        };
        assert_eq!(pending.join(b"key", waiter(2), deadline), Joined::Coalesced);
        assert!(matches!(
            pending.join(b"other", waiter(3), deadline),
            Joined::New(_)
        ));
        let miss = pending.take(token).expect("in flight");
        assert_eq!(miss.waiters.len(), 2);
        assert!(matches!(
            pending.join(b"key", waiter(4), deadline),
            Joined::New(_)
        ));
    }

    #[test]
    fn bounds_are_enforced() {
        let mut pending = Pending::new(1, 2);
        let deadline = Instant::now();
        assert!(matches!(
            pending.join(b"a", waiter(1), deadline),
            Joined::New(_)
        ));
        assert_eq!(pending.join(b"b", waiter(1), deadline), Joined::Full);
        assert_eq!(pending.join(b"a", waiter(2), deadline), Joined::Coalesced);
        assert_eq!(pending.join(b"a", waiter(3), deadline), Joined::Full);
    }

    #[test]
    fn expired_misses_are_taken() {
        let mut pending = Pending::new(10, 10);
        let now = Instant::now();
        pending.join(b"old", waiter(1), now);
        pending.join(b"new", waiter(2), now + Duration::from_secs(5));
        let expired = pending.take_expired(now + Duration::from_secs(1));
        assert_eq!(expired.len(), 1);
        assert_eq!(&*expired[0].key, b"old");
        assert_eq!(pending.len(), 1);
    }
}
