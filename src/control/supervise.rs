//! Worker supervision: a worker that ends without being told to is restarted in place.
//!
//! Runs on: the main thread (the control side's signal loop, beside reloads).
//!
//! A worker ends unasked only through a bug (a panic, in the worker's own code or in one of
//! its tasks: worker/mod.rs turns both into the end of the thread) or a failure of its
//! runtime. Its damage stays on its core: the listen sockets it served stay open through the
//! duplicates in [`Listening`](super::handover::Listening), so they keep their place in the SO_REUSEPORT groups and the
//! datagrams and connections that arrive meanwhile wait in them. The supervisor logs an
//! `error`, counts `ringdns_worker_restarts_total{worker}`, and starts a new thread on the
//! same core with the same sockets, channels, eventfd and counters, an empty cache shard and
//! the configuration in force. Parked clients of the dead worker get no answer (their
//! resolvers retry); TCP connections it held are closed.
//!
//! A worker is started at most once per [`RESTART_BACKOFF`]: one that dies again sooner (a
//! query that makes it panic every time, sent again by its client) waits for the rest of the
//! second, so a crash loop costs one core's cache each second and never spins. While a worker
//! is down its heartbeat ages; a worker that cannot be started again for 3 s turns `/health`
//! 503 (health.rs), so the process supervisor restarts the whole instance.
#![forbid(unsafe_code)]

use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;

use crate::config::IoBackend;
use crate::upstream::{Reply, UpstreamMetrics};
use crate::worker::upstream::ForwardSetup;
use crate::worker::{self, Command, Exit, ExitCause, WorkerSetup};

use super::reload::Live;
use super::WORKER_START_TIMEOUT;

/// Shortest time between two starts of one worker.
pub(crate) const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// One worker as the control side sees it: how to reach it, and what restarting it needs
/// besides the configuration in force.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    /// Its command channel.
    pub(crate) commands: crossbeam_channel::Sender<Command>,
    /// Its eventfd, written after a command (and by `ringdns-ctl` after a reply).
    pub(crate) wake: Arc<EventFd>,
    /// The receiving end of `commands`, kept for a restarted thread (the senders stay valid).
    pub(crate) inbox: crossbeam_channel::Receiver<Command>,
    /// The receiving end of its reply channel, kept for a restarted thread (`ringdns-ctl`
    /// holds the sender).
    pub(crate) replies: crossbeam_channel::Receiver<Reply>,
    /// The CPU it is pinned to.
    pub(crate) core: Option<core_affinity::CoreId>,
    /// Its own series of the upstreams it queries over UDP itself (a restart counts on in
    /// them).
    pub(crate) upstreams: Vec<Arc<UpstreamMetrics>>,
    /// Its thread while it runs.
    pub(crate) thread: Option<JoinHandle<()>>,
    /// Starts so far (1 once start-up is done).
    pub(crate) starts: u32,
    /// When it was last started.
    pub(crate) started: Instant,
    /// While it is down: when it is started again.
    pub(crate) due: Option<Instant>,
}

impl WorkerHandle {
    /// Sends `command` and wakes the worker (a worker that is down finds nothing stale: a
    /// restart drops what waited).
    pub(crate) fn send(&self, command: Command) {
        let _ = self.commands.send(command);
        let _ = self.wake.write(1);
    }

    /// Joins the thread, if any; `false` if it panicked.
    pub(crate) fn join(&mut self) -> bool {
        self.thread
            .take()
            .is_none_or(|thread| thread.join().is_ok())
    }
}

impl Live {
    /// A worker thread ended. Unless it was told to stop, it is restarted (now, or once
    /// [`RESTART_BACKOFF`] has passed since its last start).
    pub(crate) fn worker_exited(&mut self, exit: Exit) {
        let Exit { index, cause } = exit;
        let Some(worker) = self.workers.get_mut(index) else {
            return;
        };
        // It has returned (it sends its exit last); this only reaps the thread.
        worker.join();
        if cause == ExitCause::Stopped {
            return;
        }
        let now = Instant::now();
        let due = (worker.started + RESTART_BACKOFF).max(now);
        let after = if due > now {
            format!(" in {:?}", due - now)
        } else {
            String::new()
        };
        log::error!(
            "worker={index} {cause}; restarting it in place{after} (its sockets stay open and keep their queries meanwhile)"
        );
        worker.due = Some(due);
        self.restart_due(now);
    }

    /// Goes on supervising for `period` (the lame duck, when the workers still serve): a
    /// worker that ends meanwhile is restarted as while serving.
    pub(crate) fn supervise_for(
        &mut self,
        exits: &crossbeam_channel::Receiver<Exit>,
        period: Duration,
    ) {
        let deadline = Instant::now() + period;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let until = self
                .next_restart()
                .map_or(deadline, |due| due.min(deadline));
            match exits.recv_timeout(until.saturating_duration_since(now)) {
                Ok(exit) => self.worker_exited(exit),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    self.restart_due(Instant::now());
                }
                // `self.exits` keeps the channel open; sleep out the period all the same.
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(deadline.saturating_duration_since(now));
                    return;
                }
            }
        }
    }

    /// When the next delayed restart is due, if one is.
    pub(crate) fn next_restart(&self) -> Option<Instant> {
        self.workers.iter().filter_map(|worker| worker.due).min()
    }

    /// Starts every worker whose restart is due by `now`.
    pub(crate) fn restart_due(&mut self, now: Instant) {
        for index in 0..self.workers.len() {
            if self.workers[index].due.is_some_and(|due| due <= now) {
                self.restart(index, now);
            }
        }
    }

    /// Starts worker `index` again on its sockets, channels and counters, with the
    /// configuration in force. A failure to start is retried after [`RESTART_BACKOFF`].
    fn restart(&mut self, index: usize, now: Instant) {
        let sockets = self
            .listening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .worker_sockets(index);
        let stats = self
            .sources
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .workers
            .get(index)
            .cloned()
            .expect("the metrics sources hold every worker's counters");
        let worker = &mut self.workers[index];
        let sockets = match sockets {
            Ok(sockets) => sockets,
            Err(error) => {
                log::error!("worker={index} not restarted: duplicating its sockets failed: {error}; retrying in {RESTART_BACKOFF:?}");
                worker.due = Some(now + RESTART_BACKOFF);
                return;
            }
        };
        // What was sent to the dead worker is stale: the new one starts from the
        // configuration in force, and the replies are for misses it does not have.
        let dropped = worker.inbox.try_iter().count() + worker.replies.try_iter().count();
        let (ready, started) = crossbeam_channel::bounded(1);
        let setup = WorkerSetup {
            index,
            generation: worker.starts,
            core: worker.core,
            backend: self.backend,
            udp: sockets.udp,
            tcp: sockets.tcp,
            settings: super::settings(&self.config),
            serving: super::serving(&self.config),
            control: self.control_link.clone(),
            forward: ForwardSetup::continuing(
                self.config.forward.clone(),
                self.config.server.udp_payload,
                worker.upstreams.clone(),
            ),
            replies: worker.replies.clone(),
            commands: worker.inbox.clone(),
            wake: worker.wake.clone(),
            stats,
            fallback: self.config.server.io == IoBackend::Auto,
            ready,
            exits: self.exits.clone(),
        };
        let thread = match worker::spawn(setup) {
            Ok(thread) => thread,
            Err(error) => {
                log::error!("worker={index} not restarted: starting its thread failed: {error}; retrying in {RESTART_BACKOFF:?}");
                worker.due = Some(now + RESTART_BACKOFF);
                return;
            }
        };
        worker.thread = Some(thread);
        worker.starts += 1;
        worker.started = now;
        worker.due = None;
        self.control.record_worker_restart(index);
        // If it fails to start, its exit follows and brings the next attempt.
        match started.recv_timeout(WORKER_START_TIMEOUT) {
            Ok(Ok(backend)) => log::warn!(
                "worker={index} restarted in place io={} starts={} dropped_messages={dropped}",
                backend.name(),
                worker.starts
            ),
            Ok(Err(reason)) => log::error!("worker={index} restart failed: {reason}"),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                log::error!("worker={index} ended again before it served");
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => log::error!(
                "worker={index} restarted but did not report serving within {WORKER_START_TIMEOUT:?}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};
    use std::os::fd::AsRawFd;

    use crate::control::handover::{Kind, Listening};

    /// Two workers on two listen addresses; the second address removed again.
    #[test]
    fn a_worker_gets_back_its_own_sockets_by_index() -> anyhow::Result<()> {
        let mut listening = Listening::default();
        let mut kept = Vec::new();
        for worker in 0..2 {
            for index in 0..2u16 {
                let udp = UdpSocket::bind("127.0.0.1:0")?;
                let tcp = TcpListener::bind("127.0.0.1:0")?;
                listening.add_listen(worker, index, &udp, &tcp)?;
                kept.push((worker, index, udp.local_addr()?, tcp.local_addr()?));
            }
        }
        listening.add(Kind::Http, 0, &TcpListener::bind("127.0.0.1:0")?)?;
        for (worker, index, udp, tcp) in &kept {
            let sockets = listening.worker_sockets(*worker)?;
            let at = usize::from(*index);
            let got_udp = sockets.udp[at].as_ref().expect("udp socket");
            let got_tcp = sockets.tcp[at].as_ref().expect("tcp listener");
            assert_eq!(got_udp.local_addr()?, *udp);
            assert_eq!(got_tcp.local_addr()?, *tcp);
            assert_eq!(sockets.udp.len(), 2);
            assert_eq!(sockets.tcp.len(), 2);
            // New descriptors for the same sockets.
            assert_ne!(got_udp.as_raw_fd(), -1);
        }
        listening.remove(0);
        let sockets = listening.worker_sockets(1)?;
        assert!(sockets.udp[0].is_none() && sockets.tcp[0].is_none());
        assert_eq!(
            sockets.udp[1]
                .as_ref()
                .map(UdpSocket::local_addr)
                .transpose()?,
            Some(kept[3].2)
        );
        Ok(())
    }
}
