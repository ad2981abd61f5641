//! Whether a worker's batch wait (`server.batch_wait`) pays at the current rate.
//!
//! Runs on: worker threads (the io_uring loop, the epoll receive loops). Sans-IO: the caller
//! passes the clock.
//!
//! After a batch the worker may wait in the kernel for more datagrams, so that one wake-up
//! serves several queries. That only pays when more are likely to come within the wait: at a
//! few hundred queries a second the wait ends empty nearly every time, and its timer and the
//! extra sleep cost more than they save (perf/RESULTS.md, 2026-12-02 13:50: at 1,000 qps a
//! 200 µs wait cost 117–119 µs of CPU per query against 74–87 without; at 2,500 qps both cost
//! 70–72; at 5,000 qps and above the wait saves 25–45 %). So the worker measures the rate of
//! client datagrams over a short window and waits only when at least half a datagram is
//! expected within one wait. Either way the first datagram after a quiet spell is answered at
//! once: the wait only delays the ones that arrive during it.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// How long the rate is measured before the decision is revisited: short enough to follow a
/// burst within milliseconds, long enough to hold several datagrams at a few thousand qps.
pub const WINDOW: Duration = Duration::from_millis(10);

/// The batch-wait decision of one worker.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Start of the current measuring window.
    window_start: Instant,
    /// The datagram count at `window_start`.
    at_start: u64,
    /// Whether the last full window's rate makes a wait worth it.
    waiting: bool,
}

impl Pace {
    /// Starts measuring at `now` with `datagrams` received so far, not waiting until a window
    /// shows a rate that pays.
    pub fn new(now: Instant, datagrams: u64) -> Self {
        Self {
            window_start: now,
            at_start: datagrams,
            waiting: false,
        }
    }

    /// How long to wait for more datagrams after a batch, given the worker's total of client
    /// datagrams received (`datagrams`, monotonic) at `now`: `batch_wait` while the last
    /// window's rate expects at least half a datagram within it, else zero.
    pub fn wait(&mut self, datagrams: u64, now: Instant, batch_wait: Duration) -> Duration {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WINDOW {
            let arrived = u128::from(datagrams.saturating_sub(self.at_start));
            // arrived / elapsed × batch_wait ≥ 1/2, in integers.
            self.waiting = 2 * arrived * batch_wait.as_nanos() >= elapsed.as_nanos();
            self.window_start = now;
            self.at_start = datagrams;
        }
        if self.waiting {
            batch_wait
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_micros(200);

    /// Feeds `rate` datagrams a second for `span`, one batch per datagram, and returns the
    /// wait decided after the last.
    fn run(
        pace: &mut Pace,
        start: Instant,
        total: &mut u64,
        rate: u64,
        span: Duration,
    ) -> Duration {
        let gap = Duration::from_nanos(1_000_000_000 / rate);
        let mut now = start;
        let mut wait = Duration::ZERO;
        while now < start + span {
            *total += 1;
            wait = pace.wait(*total, now, WAIT);
            now += gap;
        }
        wait
    }

    #[test]
    fn waits_only_when_the_rate_expects_half_a_datagram_per_wait() {
        let start = Instant::now();
        let mut total = 0;
        // Datagrams expected per 200 µs wait: 0.2, 1, 0.4, 0.6.
        for (rate, expected) in [
            (1_000, Duration::ZERO),
            (5_000, WAIT),
            (2_000, Duration::ZERO),
            (3_000, WAIT),
        ] {
            let mut pace = Pace::new(start, total);
            let wait = run(&mut pace, start, &mut total, rate, WINDOW * 3);
            assert_eq!(wait, expected, "{rate} qps");
        }
    }

    #[test]
    fn follows_the_rate_up_and_down_within_a_window_or_two() {
        let start = Instant::now();
        let mut total = 0;
        let mut pace = Pace::new(start, total);
        assert_eq!(
            pace.wait(total, start, WAIT),
            Duration::ZERO,
            "starts not waiting"
        );
        let busy = run(&mut pace, start, &mut total, 20_000, WINDOW * 2);
        assert_eq!(busy, WAIT);
        let quiet_start = start + WINDOW * 2;
        let quiet = run(&mut pace, quiet_start, &mut total, 500, WINDOW * 3);
        assert_eq!(quiet, Duration::ZERO);
        // After a silent second, one datagram does not make a rate.
        total += 1;
        let later = quiet_start + Duration::from_secs(1);
        assert_eq!(pace.wait(total, later, WAIT), Duration::ZERO);
    }

    #[test]
    fn zero_batch_wait_never_waits() {
        let start = Instant::now();
        let mut pace = Pace::new(start, 0);
        for n in 1..=1000u64 {
            let now = start + Duration::from_micros(n * 50);
            assert_eq!(pace.wait(n * 100, now, Duration::ZERO), Duration::ZERO);
        }
    }
}
