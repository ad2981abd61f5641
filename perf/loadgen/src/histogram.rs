//! Exact latency histogram: 1 µs buckets up to 10 ms, 100 µs buckets up to 10 s, one overflow
//! bucket, plus the exact maximum.
//!
//! Runs on: any (pure).

#![forbid(unsafe_code)]

/// Latencies below this many µs get one bucket per µs.
const FINE_LIMIT_US: u64 = 10_000;
/// Width of the coarse buckets, in µs.
const COARSE_WIDTH_US: u64 = 100;
/// Latencies below this many µs (10 s) get a coarse bucket; longer ones share the overflow bucket.
const COARSE_LIMIT_US: u64 = 10_000_000;
/// Number of coarse buckets.
const COARSE_BUCKETS: usize = ((COARSE_LIMIT_US - FINE_LIMIT_US) / COARSE_WIDTH_US) as usize;
/// Total number of buckets: fine, coarse, overflow.
const BUCKETS: usize = FINE_LIMIT_US as usize + COARSE_BUCKETS + 1;

/// Counts of latencies by bucket. Recording is one division and one increment, with no
/// allocation; the bucket array (about 880 KB) is allocated once and mostly never touched.
#[derive(Clone)]
pub struct Histogram {
    /// Count per bucket, see [`bucket_of`].
    counts: Box<[u64]>,
    /// Number of recorded latencies.
    total: u64,
    /// Largest recorded latency in ns.
    max_ns: u64,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            max_ns: 0,
        }
    }

    /// Records one latency.
    pub fn record(&mut self, latency_ns: u64) {
        self.counts[bucket_of(latency_ns / 1000)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(latency_ns);
    }

    /// Adds every count of `other` to `self`.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Number of recorded latencies.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Largest recorded latency in µs (exact, rounded up).
    pub fn max_us(&self) -> u64 {
        self.max_ns.div_ceil(1000)
    }

    /// The latency in µs below or at which a fraction `quantile` (0..=1) of all recorded
    /// latencies lie: the upper edge of the bucket holding that rank, never more than the
    /// maximum. So with 1 µs buckets a p50 of 91 means "in [90, 91) µs". 0 when empty.
    pub fn quantile_us(&self, quantile: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((quantile * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return upper_edge_us(bucket).min(self.max_us());
            }
        }
        self.max_us()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket for a latency of `us` whole µs.
fn bucket_of(us: u64) -> usize {
    if us < FINE_LIMIT_US {
        us as usize
    } else if us < COARSE_LIMIT_US {
        FINE_LIMIT_US as usize + ((us - FINE_LIMIT_US) / COARSE_WIDTH_US) as usize
    } else {
        BUCKETS - 1
    }
}

/// Exclusive upper edge of `bucket` in µs; `u64::MAX` for the overflow bucket.
fn upper_edge_us(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < FINE_LIMIT_US {
        bucket + 1
    } else if bucket < FINE_LIMIT_US + COARSE_BUCKETS as u64 {
        FINE_LIMIT_US + (bucket - FINE_LIMIT_US + 1) * COARSE_WIDTH_US
    } else {
        u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_buckets_resolve_one_microsecond() {
        let mut histogram = Histogram::new();
        for us in 1..=100 {
            histogram.record(us * 1000 + 500);
        }
        assert_eq!(histogram.quantile_us(0.5), 51);
        assert_eq!(histogram.quantile_us(0.99), 100);
        assert_eq!(histogram.quantile_us(1.0), 101);
        assert_eq!(histogram.max_us(), 101);
    }

    #[test]
    fn coarse_buckets_are_100_microseconds_and_capped_by_max() {
        let mut histogram = Histogram::new();
        histogram.record(25_050_000); // 25.05 ms
        assert_eq!(bucket_of(25_050), FINE_LIMIT_US as usize + 150);
        assert_eq!(upper_edge_us(bucket_of(25_050)), 25_100);
        assert_eq!(histogram.quantile_us(0.5), 25_050);
    }

    #[test]
    fn overflow_reports_exact_max() {
        let mut histogram = Histogram::new();
        histogram.record(1_000);
        histogram.record(12_000_000_000); // 12 s
        assert_eq!(histogram.quantile_us(1.0), 12_000_000);
        assert_eq!(histogram.quantile_us(0.5), 2);
    }

    #[test]
    fn merge_adds_counts_and_keeps_max() {
        let mut left = Histogram::new();
        let mut right = Histogram::new();
        left.record(10_000);
        right.record(20_000);
        right.record(30_000);
        left.merge(&right);
        assert_eq!(left.total(), 3);
        assert_eq!(left.quantile_us(0.5), 21);
        assert_eq!(left.max_us(), 30);
    }

    #[test]
    fn empty_histogram_reports_zero() {
        assert_eq!(Histogram::new().quantile_us(0.99), 0);
    }
}
