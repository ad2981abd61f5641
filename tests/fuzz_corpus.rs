//! The fuzz targets' checks (fuzz/checks.rs, fuzz/config_checks.rs) on the stable toolchain, in
//! the test suite: every seed of `fuzz/corpus/<target>/`, then a fixed number of deterministic
//! mutations of them (bit flips, byte changes, cuts, insertions, splices of two seeds; config
//! files get line insertions, repeats, deletions and value swaps first), the same each run. The
//! long coverage-guided runs are `cargo fuzz run <target>` (README.md, "Tests").
//!
//! Runs on: the test thread; pure, no I/O beyond reading the corpus.

#[path = "../fuzz/checks.rs"]
mod checks;
#[path = "../fuzz/config_checks.rs"]
mod config_checks;
#[path = "../fuzz/exchanges.rs"]
mod exchanges;

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Mutated inputs per target per run (a few seconds in a debug build).
const MUTATIONS: usize = 20_000;

/// The seed files of `target`, sorted by name.
fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("reading {}: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    paths.sort();
    let seeds: Vec<_> = paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).expect("a seed file");
            (path, bytes)
        })
        .collect();
    assert!(seeds.len() >= 8, "{} holds too few seeds", dir.display());
    seeds
}

/// One mutation of `input` (another seed `other` for splices).
fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.random_range(0..4);
    for _ in 0..rounds {
        match rng.random_range(0..7) {
            0 if !out.is_empty() => {
                let at = rng.random_range(0..out.len());
                out[at] ^= 1 << rng.random_range(0..8);
            }
            1 if !out.is_empty() => {
                let at = rng.random_range(0..out.len());
                // Values DNS parsers trip on: 0, 0xff, compression pointer bits, lengths.
                out[at] = [0, 0xff, 0xc0, 0x3f, 0x40, 0x80, 1, 12][rng.random_range(0..8)];
            }
            2 if !out.is_empty() => {
                let at = rng.random_range(0..out.len());
                out.truncate(at);
            }
            3 => {
                let at = rng.random_range(0..out.len() + 1);
                let byte: u8 = rng.random();
                out.insert(at, byte);
            }
            4 if !other.is_empty() => {
                let cut = rng.random_range(0..out.len() + 1);
                let from = rng.random_range(0..other.len());
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            5 if out.len() >= 2 => {
                // A 16-bit field (counts, types, lengths) set to a boundary value.
                let at = rng.random_range(0..out.len() - 1);
                let value: u16 = [0, 1, 2, 0xffff, 0x8000, 0x00c0][rng.random_range(0..6)];
                out[at..at + 2].copy_from_slice(&value.to_be_bytes());
            }
            _ => {
                let at = rng.random_range(0..out.len() + 1);
                let len = rng.random_range(0..8);
                out.splice(at..at, std::iter::repeat_n(0xc0, len));
            }
        }
    }
    out
}

/// One mutation of a text `input` by lines (another seed `other` gives lines and values): a
/// line of `other` inserted, a line repeated elsewhere, a line deleted, or the value after a
/// line's `=` replaced by the value of a line of `other`; then, half the time, [`mutate`].
/// Byte changes alone mostly break TOML's syntax; these keep it and recombine sections, keys
/// and values, which is what reaches the validation and the round trip.
fn mutate_lines(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = input.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let donor: Vec<&[u8]> = other.split(|&b| b == b'\n').collect();
    let value_at = |line: &[u8]| line.iter().position(|&b| b == b'=').map(|at| at + 1);
    for _ in 0..1 + rng.random_range(0..3) {
        let at = rng.random_range(0..lines.len());
        let from = donor[rng.random_range(0..donor.len())];
        match rng.random_range(0..4) {
            0 => lines.insert(at, from.to_vec()),
            1 => {
                let line = lines[at].clone();
                lines.insert(rng.random_range(0..lines.len() + 1), line);
            }
            2 if lines.len() > 1 => {
                lines.remove(at);
            }
            _ => {
                if let (Some(keep), Some(take)) = (value_at(&lines[at]), value_at(from)) {
                    lines[at].truncate(keep);
                    lines[at].extend_from_slice(&from[take..]);
                }
            }
        }
    }
    let out = lines.join(&b'\n');
    if rng.random() {
        mutate(rng, &out, other)
    } else {
        out
    }
}

/// Runs `check` on every seed of `target`, then on [`MUTATIONS`] mutations of them made by
/// `mutate`.
fn run(target: &str, check: fn(&[u8]), mutate: fn(&mut StdRng, &[u8], &[u8]) -> Vec<u8>) {
    let seeds = seeds(target);
    for (path, bytes) in &seeds {
        let outcome = std::panic::catch_unwind(|| check(bytes));
        assert!(outcome.is_ok(), "seed {} failed", path.display());
    }
    // A fixed seed: the same mutations each run, so a failure reproduces.
    let mut rng = StdRng::seed_from_u64(0x5eed_0000_0000_0001 ^ target.len() as u64);
    for round in 0..MUTATIONS {
        let (_, input) = &seeds[rng.random_range(0..seeds.len())];
        let (_, other) = &seeds[rng.random_range(0..seeds.len())];
        let input = mutate(&mut rng, input, other);
        let outcome = std::panic::catch_unwind(|| check(&input));
        assert!(
            outcome.is_ok(),
            "{target}: mutation {round} failed on input {input:02x?}"
        );
    }
}

#[test]
fn queries_from_clients() {
    run("query", checks::query, mutate);
}

#[test]
fn answers_from_upstream() {
    run("upstream_answer", checks::upstream_answer, mutate);
}

#[test]
fn configs_from_operators() {
    run("config", config_checks::config, mutate_lines);
}

#[test]
fn exchanges_with_upstreams() {
    run("exchanges", exchanges::exchanges, mutate);
}
