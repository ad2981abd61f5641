//! Line capture of a child's stderr, so a failing test can show what the server said.
//!
//! Runs on: a reader thread per child (writes), the test thread (reads).

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// All lines a child wrote to one pipe so far, shared with the thread reading them.
///
/// # Threads
///
/// The reader thread appends under the mutex and notifies the condvar; the test thread reads
/// under the mutex. The thread ends when the pipe closes (the child and its children exited).
#[derive(Debug, Clone, Default)]
pub struct Lines {
    /// The captured state and the condvar signalled on every change.
    inner: Arc<(Mutex<Captured>, Condvar)>,
}

/// What has been read so far.
#[derive(Debug, Default)]
struct Captured {
    /// Lines without their newline.
    lines: Vec<String>,
    /// The pipe has closed: no more lines will come.
    closed: bool,
}

impl Lines {
    /// Starts a thread copying `pipe` line by line into a new [`Lines`].
    pub fn capture(pipe: impl Read + Send + 'static) -> Self {
        let lines = Self::default();
        let writer = lines.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                        writer.push(line);
                    }
                }
            }
            let (lock, condvar) = &*writer.inner;
            lock.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
            condvar.notify_all();
        });
        lines
    }

    /// Appends one line and wakes waiters.
    fn push(&self, line: String) {
        let (lock, condvar) = &*self.inner;
        lock.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines
            .push(line);
        condvar.notify_all();
    }

    /// A copy of every line so far.
    pub fn snapshot(&self) -> Vec<String> {
        let (lock, _) = &*self.inner;
        lock.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines
            .clone()
    }

    /// Everything so far as one string, one line each.
    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }

    /// Waits at most `timeout` for the pipe to close (the process and every holder of its
    /// write end are gone), so that the last lines written are in; whether it closed.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, condvar) = &*self.inner;
        let mut guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            if guard.closed || now >= deadline {
                return guard.closed;
            }
            guard = condvar
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits at most `timeout` for a line satisfying `matches`, returning the first one.
    ///
    /// Returns `None` on timeout or when the pipe closed without such a line.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, condvar) = &*self.inner;
        let mut guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(line) = guard.lines.iter().find(|line| matches(line)) {
                return Some(line.clone());
            }
            let now = Instant::now();
            if guard.closed || now >= deadline {
                return None;
            }
            guard = condvar
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
