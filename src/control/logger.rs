//! The stderr logger (journald adds timestamps): `LEVEL target: key=value message`.
//!
//! Runs on: any thread that logs; installed once by `main`.
#![forbid(unsafe_code)]

use std::io::Write;

/// Writes every enabled record as one line on stderr.
#[derive(Debug)]
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // One write per line so lines from different threads do not interleave.
        let line = format!(
            "{:<5} {}: {}\n",
            record.level(),
            record.target(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the stderr logger at `level`. Later calls are ignored.
pub fn install(level: log::LevelFilter) {
    if log::set_logger(&StderrLogger).is_ok() {
        log::set_max_level(level);
    }
}
