//! The in-flight table of one client socket: which DNS IDs are waiting for an answer, since when,
//! for which query; and the matching of an answer to its query.
//!
//! Runs on: any (pure; time comes in as `now`, in ns since the run's start).

#![forbid(unsafe_code)]

use crate::queries::{QuerySet, HEADER_BYTES};

/// DNS IDs per socket: the table has one slot per possible ID.
const IDS: usize = 1 << 16;

/// State of one DNS ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Not in use.
    #[default]
    Free,
    /// Sent (or about to be), waiting for its answer; counts against the in-flight limit.
    Outstanding,
    /// Past the timeout: no longer in flight, but an answer is still matched (as late) until
    /// the ID is reused, which happens only after the other 65,535 IDs of the socket.
    TimedOut,
}

/// One entry of the table.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Send time in ns since the run's start.
    sent_ns: u64,
    /// Index of the query in the [`QuerySet`].
    query: u32,
    /// Position of this ID in [`InFlight::live`] while Outstanding.
    live_pos: u32,
    /// Where this ID is in its life.
    state: State,
}

/// What an answer turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// It answers an outstanding or timed-out query.
    Matched {
        /// From the send stamp to `now`.
        latency_ns: u64,
        /// Later than the timeout.
        late: bool,
        /// RCODE, the low 4 bits of header byte 3 (RFC 1035 §4.1.1).
        rcode: u8,
        /// The TC bit.
        truncated: bool,
    },
    /// Its ID is not in flight (a duplicate, a stray, or an answer to a reused ID).
    Unknown,
    /// Its ID is in flight but it is shorter than a header, lacks QR, or repeats another
    /// question; the query stays in flight.
    Mismatched,
}

/// In-flight table of one socket, indexed by DNS ID.
///
/// IDs are handed out in sequence so that an ID is reused as late as possible; a late answer to a
/// reused ID is caught by the question check unless both queries asked the same question.
pub struct InFlight {
    /// One slot per ID.
    slots: Box<[Slot]>,
    /// IDs in state Outstanding, for the timeout sweep (swap-removed on answer).
    live: Vec<u16>,
    /// Next ID to try.
    next_id: u16,
    /// Number of IDs in state TimedOut.
    timed_out: usize,
}

impl InFlight {
    /// An empty table (about 1.5 MB; slots are touched in ID order).
    pub fn new() -> Self {
        Self {
            slots: vec![Slot::default(); IDS].into_boxed_slice(),
            live: Vec::new(),
            next_id: 0,
            timed_out: 0,
        }
    }

    /// Queries waiting for an answer and not yet timed out.
    pub fn outstanding(&self) -> usize {
        self.live.len()
    }

    /// Queries past the timeout whose ID has not been reused yet.
    pub fn timed_out(&self) -> usize {
        self.timed_out
    }

    /// Takes the next ID that is not Outstanding for query `query` and marks it Outstanding.
    /// A TimedOut ID is given up (its query stays unanswered). `None` when all 65,536 IDs are
    /// Outstanding. Stamp the send time with [`InFlight::stamp`].
    pub fn start(&mut self, query: usize) -> Option<u16> {
        for _ in 0..IDS {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            let slot = &mut self.slots[usize::from(id)];
            match slot.state {
                State::Outstanding => continue,
                State::TimedOut => self.timed_out -= 1,
                State::Free => {}
            }
            slot.state = State::Outstanding;
            slot.query = u32::try_from(query).expect("query sets are far smaller than 2^32");
            slot.live_pos = u32::try_from(self.live.len()).expect("live holds at most 2^16 IDs");
            self.live.push(id);
            return Some(id);
        }
        None
    }

    /// Records the send time of `id`, just before the send call.
    pub fn stamp(&mut self, id: u16, now: u64) {
        self.slots[usize::from(id)].sent_ns = now;
    }

    /// Frees the Outstanding `id` of a query the kernel did not take.
    pub fn cancel(&mut self, id: u16) {
        debug_assert_eq!(self.slots[usize::from(id)].state, State::Outstanding);
        self.release(id);
    }

    /// Matches `packet` to its query by ID (RFC 1035 §7.3) and by the question it repeats, and
    /// frees the ID if it matched.
    pub fn answer(
        &mut self,
        packet: &[u8],
        now: u64,
        queries: &QuerySet,
        timeout_ns: u64,
    ) -> Answer {
        let Some(&[id_high, id_low, flags, rcode_byte]) = packet.get(..4) else {
            return Answer::Mismatched;
        };
        let id = u16::from_be_bytes([id_high, id_low]);
        let slot = self.slots[usize::from(id)];
        if slot.state == State::Free {
            return Answer::Unknown;
        }
        let question = queries.question(slot.query as usize);
        let echoed = packet.get(HEADER_BYTES..HEADER_BYTES + question.len());
        if flags & 0x80 == 0 || echoed != Some(question) {
            return Answer::Mismatched;
        }
        let latency_ns = now.saturating_sub(slot.sent_ns);
        if slot.state == State::TimedOut {
            self.timed_out -= 1;
            self.slots[usize::from(id)].state = State::Free;
        } else {
            self.release(id);
        }
        Answer::Matched {
            latency_ns,
            late: slot.state == State::TimedOut || latency_ns > timeout_ns,
            rcode: rcode_byte & 0x0f,
            truncated: flags & 0x02 != 0,
        }
    }

    /// Moves Outstanding queries sent more than `timeout_ns` before `now` to TimedOut. Returns
    /// how many moved.
    pub fn sweep(&mut self, now: u64, timeout_ns: u64) -> usize {
        let mut moved = 0;
        let mut position = 0;
        while position < self.live.len() {
            let id = self.live[position];
            if now.saturating_sub(self.slots[usize::from(id)].sent_ns) > timeout_ns {
                // `release` moves the last live ID into `position`: look at it next.
                self.release(id);
                self.slots[usize::from(id)].state = State::TimedOut;
                self.timed_out += 1;
                moved += 1;
            } else {
                position += 1;
            }
        }
        moved
    }

    /// Removes the Outstanding `id` from `live` and frees its slot.
    fn release(&mut self, id: u16) {
        let position = self.slots[usize::from(id)].live_pos as usize;
        let last = self.live.pop().expect("an Outstanding ID is in live");
        if last != id {
            self.live[position] = last;
            self.slots[usize::from(last)].live_pos = position as u32;
        }
        self.slots[usize::from(id)].state = State::Free;
    }
}

impl Default for InFlight {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queries::QuerySpec;

    const TIMEOUT_NS: u64 = 1_000_000_000;

    fn queries() -> QuerySet {
        let specs = [("a.example", "A"), ("b.example", "AAAA")].map(|(name, rtype)| QuerySpec {
            name: name.to_owned(),
            rtype: rtype.to_owned(),
        });
        QuerySet::build(&specs, None).unwrap()
    }

    /// The answer an echo server gives: the query with `id` and QR set, plus `rcode`.
    fn reply(queries: &QuerySet, query: usize, id: u16, rcode: u8) -> Vec<u8> {
        let mut packet = queries.packet(query).to_vec();
        packet[..2].copy_from_slice(&id.to_be_bytes());
        packet[2] |= 0x80;
        packet[3] |= rcode;
        packet
    }

    #[test]
    fn answer_matches_by_id_and_reports_latency_and_rcode() {
        let queries = queries();
        let mut table = InFlight::new();
        let id = table.start(1).unwrap();
        table.stamp(id, 1_000);
        let outcome = table.answer(&reply(&queries, 1, id, 3), 91_000, &queries, TIMEOUT_NS);
        assert_eq!(
            outcome,
            Answer::Matched {
                latency_ns: 90_000,
                late: false,
                rcode: 3,
                truncated: false
            }
        );
        assert_eq!(table.outstanding(), 0);
    }

    #[test]
    fn duplicate_answer_is_unknown() {
        let queries = queries();
        let mut table = InFlight::new();
        let id = table.start(0).unwrap();
        let packet = reply(&queries, 0, id, 0);
        assert!(matches!(
            table.answer(&packet, 5, &queries, TIMEOUT_NS),
            Answer::Matched { .. }
        ));
        assert_eq!(
            table.answer(&packet, 6, &queries, TIMEOUT_NS),
            Answer::Unknown
        );
    }

    #[test]
    fn answer_to_another_question_is_mismatched_and_keeps_the_query_in_flight() {
        let queries = queries();
        let mut table = InFlight::new();
        let id = table.start(0).unwrap();
        let wrong = reply(&queries, 1, id, 0);
        assert_eq!(
            table.answer(&wrong, 5, &queries, TIMEOUT_NS),
            Answer::Mismatched
        );
        assert_eq!(
            table.answer(&[0, 0, 0x80], 5, &queries, TIMEOUT_NS),
            Answer::Mismatched
        );
        let mut no_qr = reply(&queries, 0, id, 0);
        no_qr[2] &= !0x80;
        assert_eq!(
            table.answer(&no_qr, 5, &queries, TIMEOUT_NS),
            Answer::Mismatched
        );
        assert_eq!(table.outstanding(), 1);
    }

    #[test]
    fn timed_out_query_answered_later_is_late() {
        let queries = queries();
        let mut table = InFlight::new();
        let first = table.start(0).unwrap();
        table.stamp(first, 0);
        let second = table.start(0).unwrap();
        table.stamp(second, TIMEOUT_NS);
        assert_eq!(table.sweep(TIMEOUT_NS + 1, TIMEOUT_NS), 1);
        assert_eq!((table.outstanding(), table.timed_out()), (1, 1));
        let outcome = table.answer(
            &reply(&queries, 0, first, 0),
            1_500_000_000,
            &queries,
            TIMEOUT_NS,
        );
        assert!(matches!(outcome, Answer::Matched { late: true, .. }));
        assert_eq!((table.outstanding(), table.timed_out()), (1, 0));
    }

    #[test]
    fn ids_are_handed_out_in_sequence_skipping_outstanding_ones() {
        let mut table = InFlight::new();
        let first = table.start(0).unwrap();
        let second = table.start(0).unwrap();
        assert_eq!((first, second), (0, 1));
        table.cancel(second);
        for _ in 2..IDS {
            table.start(0).unwrap();
        }
        // Wrapped around: 0 is still Outstanding, 1 was cancelled.
        assert_eq!(table.start(0), Some(1));
        assert_eq!(table.start(0), None, "every ID is outstanding");
    }

    #[test]
    fn reusing_a_timed_out_id_gives_it_up() {
        let mut table = InFlight::new();
        for _ in 0..IDS {
            let id = table.start(0).unwrap();
            table.stamp(id, 0);
        }
        assert_eq!(table.sweep(TIMEOUT_NS + 1, TIMEOUT_NS), IDS);
        assert_eq!(table.start(0), Some(0));
        assert_eq!(table.timed_out(), IDS - 1);
    }
}
