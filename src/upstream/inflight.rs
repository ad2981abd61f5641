//! Queries in flight on one upstream socket or connection, by random DNS ID.
//!
//! Runs on: control thread.
//!
//! Shared by the UDP sockets (`udp.rs`) and the pipelined TCP connections (`tcp.rs`): both give
//! each query a random ID not in flight on that transport, accept an answer only if it is a
//! response with an in-flight ID and the same question, and remove a waiter when its query ends
//! (a later registration that reuses the ID is told apart by its sequence number).
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use tokio::sync::oneshot;

use super::route::{self, Question};
use super::Error;

/// Random IDs tried before giving up on finding a free one.
const ID_TRIES: usize = 64;

/// Where a waiting query's answer (or failure) arrives.
pub(super) type AnswerReceiver = oneshot::Receiver<Result<Vec<u8>, Error>>;

/// A query waiting for its answer; `T` is what the transport remembers about it.
#[derive(Debug)]
pub(super) struct Waiter<T> {
    /// What the answer must ask.
    question: Question,
    /// Distinguishes this registration from a later one that reuses the ID.
    seq: u64,
    /// Transport-specific detail (TCP: whether the connection had been used before).
    pub(super) tag: T,
    /// Where the answer goes.
    pub(super) answer: oneshot::Sender<Result<Vec<u8>, Error>>,
}

/// The waiters of one socket or connection.
#[derive(Debug)]
pub(super) struct InFlight<T> {
    /// By DNS ID.
    waiters: RefCell<HashMap<u16, Waiter<T>>>,
    /// Source of [`Waiter::seq`].
    next_seq: Cell<u64>,
}

impl<T> InFlight<T> {
    /// An empty table.
    pub(super) fn new() -> InFlight<T> {
        InFlight {
            waiters: RefCell::new(HashMap::new()),
            next_seq: Cell::new(0),
        }
    }

    /// Queries in flight.
    pub(super) fn len(&self) -> usize {
        self.waiters.borrow().len()
    }

    /// Whether nothing is in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.waiters.borrow().is_empty()
    }

    /// Registers a waiter for `question` under a random ID not in flight here; returns the ID,
    /// the registration's sequence number and where the answer arrives, or `None` when no
    /// free ID was found in [`ID_TRIES`] tries.
    pub(super) fn register(
        &self,
        question: &Question,
        tag: T,
    ) -> Option<(u16, u64, AnswerReceiver)> {
        let mut waiters = self.waiters.borrow_mut();
        for _ in 0..ID_TRIES {
            let id: u16 = rand::random();
            if waiters.contains_key(&id) {
                continue;
            }
            let (answer, receiver) = oneshot::channel();
            let seq = self.next_seq.get();
            self.next_seq.set(seq + 1);
            let waiter = Waiter {
                question: question.clone(),
                seq,
                tag,
                answer,
            };
            waiters.insert(id, waiter);
            return Some((id, seq, receiver));
        }
        None
    }

    /// Removes and returns the waiter `message` answers: a response whose ID is in flight and
    /// whose question matches. `None` for anything else (the caller counts it as ignored).
    pub(super) fn take_answered(&self, message: &[u8]) -> Option<Waiter<T>> {
        let id = route::message_id(message)?;
        let mut waiters = self.waiters.borrow_mut();
        let matches = waiters.get(&id).is_some_and(|waiter| {
            route::is_response(message) && route::question_matches(message, &waiter.question)
        });
        if matches {
            waiters.remove(&id)
        } else {
            None
        }
    }

    /// Removes registration (`id`, `seq`) if it is still waiting (its query ended otherwise).
    pub(super) fn release(&self, id: u16, seq: u64) {
        let mut waiters = self.waiters.borrow_mut();
        if waiters.get(&id).is_some_and(|waiter| waiter.seq == seq) {
            waiters.remove(&id);
        }
    }

    /// Removes and returns every waiter (the transport failed).
    pub(super) fn drain(&self) -> Vec<Waiter<T>> {
        self.waiters
            .borrow_mut()
            .drain()
            .map(|(_, waiter)| waiter)
            .collect()
    }
}
