//! Live reload: on SIGHUP or a change of the config file, validate the new configuration and
//! apply what changed without dropping a query.
//!
//! Runs on: the main thread (the control side's signal loop).
//!
//! An invalid file is logged (`error`, naming file, line and key), counted in
//! `coredns_reload_failed_total` and ignored: the old configuration stays in force. A valid one
//! is applied part by part: handler settings (cache limits, payload size, miss deadline) and
//! serving limits (TCP limits, `batch_wait`) go to every worker in one [`Command::Reload`];
//! `[[forward]]` changes swap in a new forwarder on `ringdns-ctl`
//! ([`UpstreamSide::reconfigure`]); new listen addresses are put on
//! the node interface (if managed), bound per worker and handed over with their stable socket
//! index, removed ones stop receiving and close; zone or listen changes bring a new metrics
//! [`Layout`] (append-only server list) with fresh counters. `workers`, `io`,
//! `udp_receive_buffer` and the `[node]`, `[health]` and `[metrics]` sections other than the
//! listen addresses need a restart: a reload logs a warning and applies the rest.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Instant, SystemTime};

use crate::config::Config;
use crate::health::Health;
use crate::metrics::{ControlMetrics, Sources};
use crate::upstream::{ControlLink, UpstreamMetrics, UpstreamSide};
use crate::worker::stats::{Layout, WorkerStats, Zones};
use crate::worker::upstream::ForwardSetup;
use crate::worker::{sockets, Backend, Command, Exit, Reload};

use super::handover::Listening;
use super::node::NodeSync;
use super::supervise::WorkerHandle;

/// How the config file looked when last read: a change of any part triggers a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    /// Modification time.
    modified: Option<SystemTime>,
    /// Length in bytes.
    len: u64,
    /// Inode (an editor or `mv` replacing the file changes it).
    inode: u64,
}

impl FileStamp {
    /// The stamp of `path` now; `None` if it cannot be read (a reload then reports why).
    pub(crate) fn of(path: &Path) -> Option<FileStamp> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            inode: metadata.ino(),
        })
    }
}

/// Everything a reload changes, owned by the control side's signal loop.
#[derive(Debug)]
pub(crate) struct Live {
    /// The configuration in force.
    pub(crate) config: Config,
    /// The config file's stamp when it was last read.
    pub(crate) stamp: Option<FileStamp>,
    /// The workers, by index.
    pub(crate) workers: Vec<WorkerHandle>,
    /// The I/O backend chosen at start-up (a restarted worker is set up for it).
    pub(crate) backend: Backend,
    /// The upstream side's request channel, for restarted workers.
    pub(crate) control_link: ControlLink,
    /// Where worker threads say that they ended (supervise.rs).
    pub(crate) exits: crossbeam_channel::Sender<Exit>,
    /// The metrics layout the workers count by now.
    pub(crate) layout: Arc<Layout>,
    /// Start of the process (heartbeats are measured from it).
    pub(crate) epoch: Instant,
    /// The forwarding side.
    pub(crate) upstream: UpstreamSide,
    /// What `/metrics` reads.
    pub(crate) sources: Arc<RwLock<Sources>>,
    /// Heartbeats `/health` reads.
    pub(crate) health: Arc<Health>,
    /// Reload failures are counted here.
    pub(crate) control: Arc<ControlMetrics>,
    /// The node sync thread, when node integration runs.
    pub(crate) node: Option<NodeSync>,
    /// `server.udp_payload` at start-up: io_uring send slots are sized by it.
    pub(crate) startup_udp_payload: u16,
    /// The listen sockets a successor may take over (`[node] handover`), kept in step with
    /// the listen addresses.
    pub(crate) listening: Arc<Mutex<Listening>>,
}

/// Why a valid configuration could not be applied (the old one stays).
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    /// A socket for a new listen address could not be bound.
    #[error("binding {proto} {addr}: {source}")]
    Bind {
        /// `UDP` or `TCP`.
        proto: &'static str,
        /// The new listen address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: sockets::SocketError,
    },
    /// The node interface could not be given a new listen IP.
    #[error("the node interface lacks a new listen address")]
    Interface,
}

/// Sockets bound for one new listen address: (socket index, UDP socket, TCP listener) per
/// worker.
type NewSockets = Vec<Vec<(u16, UdpSocket, TcpListener)>>;

impl Live {
    /// Every worker's own series of the upstreams it queries over UDP itself.
    pub(crate) fn worker_upstreams(&self) -> impl Iterator<Item = Arc<UpstreamMetrics>> + '_ {
        self.workers
            .iter()
            .flat_map(|worker| worker.upstreams.iter().cloned())
    }

    /// Reloads if the config file changed since it was last read (polled by the signal loop).
    pub(crate) fn poll_file(&mut self) {
        let Some(path) = self.config.source.clone() else {
            return;
        };
        let stamp = FileStamp::of(&path);
        if stamp != self.stamp {
            self.reload("file change");
        }
    }

    /// Loads the config file and applies it; `trigger` names what asked (for the log).
    pub(crate) fn reload(&mut self, trigger: &str) {
        let Some(path) = self.config.source.clone() else {
            log::warn!("reload ignored trigger={trigger}: started without --config");
            return;
        };
        self.stamp = FileStamp::of(&path);
        let new = match Config::load(&path) {
            Ok(new) => new,
            Err(error) => {
                log::error!("reload rejected trigger={trigger}, old configuration stays: {error}");
                self.control.record_reload_failure();
                return;
            }
        };
        if let Err(error) = self.apply(new, trigger, &path) {
            log::error!("reload failed trigger={trigger}, old configuration stays: {error}");
            self.control.record_reload_failure();
        }
    }

    /// Applies the valid configuration `new` (see the module docs).
    fn apply(&mut self, mut new: Config, trigger: &str, path: &Path) -> Result<(), ApplyError> {
        let old = &self.config;
        warn_restart_only(old, &mut new);
        let mut changes = Vec::new();
        let added: Vec<SocketAddr> = new
            .server
            .listen
            .iter()
            .copied()
            .filter(|addr| !old.server.listen.contains(addr))
            .collect();
        let removed: Vec<SocketAddr> = old
            .server
            .listen
            .iter()
            .copied()
            .filter(|addr| !new.server.listen.contains(addr))
            .collect();
        let zones_changed = zone_names(old) != zone_names(&new);
        let forward_changed =
            old.forward != new.forward || old.server.udp_payload != new.server.udp_payload;
        // The server list is append-only: old addresses keep their index (parked misses and
        // live sockets name it), new ones are appended, removed ones stay as unused labels.
        let mut servers = self.layout.servers().to_vec();
        for addr in &added {
            if !servers.contains(addr) {
                servers.push(*addr);
            }
        }
        let layout = (zones_changed || servers.len() != self.layout.servers().len()).then(|| {
            Arc::new(Layout::new(
                &servers,
                Zones::new(new.forward.iter().map(|zone| zone.zone.as_str())),
            ))
        });
        let index_of = |addr: SocketAddr| -> u16 {
            let position = servers
                .iter()
                .position(|&server| server == addr)
                .expect("every listen address is in the server list");
            u16::try_from(position).expect("listen addresses are far fewer than 65536")
        };
        let listen_changed = !added.is_empty() || !removed.is_empty();
        if listen_changed {
            if let Some(node) = &self.node {
                if !node.set_listen(&new) && !added.is_empty() && new.node.setup_interface {
                    node.set_listen(old);
                    return Err(ApplyError::Interface);
                }
            }
        }
        let mut bound: NewSockets = (0..self.workers.len()).map(|_| Vec::new()).collect();
        for &addr in &added {
            for sockets_of in &mut bound {
                match bind(addr, new.server.udp_receive_buffer) {
                    Ok((udp, tcp)) => sockets_of.push((index_of(addr), udp, tcp)),
                    Err(error) => {
                        if let Some(node) = &self.node {
                            node.set_listen(old);
                        }
                        return Err(error);
                    }
                }
            }
        }
        if !added.is_empty() {
            changes.push(format!("listen_added={}", join(&added)));
        }
        if !removed.is_empty() {
            changes.push(format!("listen_removed={}", join(&removed)));
        }
        let remove: Vec<u16> = removed.iter().map(|&addr| index_of(addr)).collect();
        {
            // A removed address must not stay bound through the hand-over's duplicate.
            let mut listening = self
                .listening
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for &index in &remove {
                listening.remove(index);
            }
            for (worker, sockets_of) in bound.iter().enumerate() {
                for (index, udp, tcp) in sockets_of {
                    if let Err(error) = listening.add_listen(worker, *index, udp, tcp) {
                        log::warn!(
                            "reload: a new socket cannot be offered for hand-over or kept for a restart: {error}"
                        );
                    }
                }
            }
        }
        // The workers take the new zones only if the control side did, so both forward by
        // the same configuration.
        let mut forward_changed = forward_changed;
        if forward_changed {
            match self
                .upstream
                .reconfigure(new.forward.clone(), new.server.udp_payload)
            {
                Ok(()) => changes.push(format!("forward_zones={}", new.forward.len())),
                Err(error) => {
                    log::error!("reload: forward zones not applied: {error}");
                    forward_changed = false;
                    // The configuration kept says what runs (a worker restarted in place is
                    // set up from it), and the next reload tries the new zones again.
                    new.forward = old.forward.clone();
                }
            }
        }
        let stats: Option<Vec<Arc<WorkerStats>>> = layout.as_ref().map(|layout| {
            let now = Instant::now();
            self.workers
                .iter()
                .map(|_| {
                    let stats = Arc::new(WorkerStats::new(layout.clone(), self.epoch));
                    // Its worker has not seen it yet: this is still its only writer.
                    stats.beat(now);
                    stats
                })
                .collect()
        });
        if new.server.udp_payload > self.startup_udp_payload {
            log::warn!(
                "reload: server.udp_payload raised to {} above its start-up value {}; io_uring \
                 workers' send slots keep the start-up size (UDP replies are truncated to it) \
                 until a restart",
                new.server.udp_payload,
                self.startup_udp_payload
            );
        }
        let settings = super::settings(&new);
        if settings != super::settings(old) {
            changes.push("settings".to_owned());
        }
        let serving = super::serving(&new);
        if serving != super::serving(old) {
            changes.push("serving".to_owned());
        }
        for (index, (worker, add)) in self.workers.iter_mut().zip(bound).enumerate() {
            let forward = forward_changed.then(|| {
                let setup = ForwardSetup::new(new.forward.clone(), new.server.udp_payload);
                worker.upstreams.clone_from(&setup.metrics);
                setup
            });
            let reload = Reload {
                settings,
                serving,
                stats: stats.as_ref().and_then(|all| all.get(index).cloned()),
                forward,
                add,
                remove: remove.clone(),
            };
            worker.send(Command::Reload(Box::new(reload)));
        }
        {
            let mut sources = self.sources.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(stats) = &stats {
                sources.workers = stats.clone();
            }
            sources.upstreams = self.upstream.metrics();
            sources.upstreams.extend(self.worker_upstreams());
        }
        if let Some(stats) = stats {
            self.health.set_workers(stats);
            changes.push("metrics_layout (counters restart from zero)".to_owned());
        }
        if let Some(layout) = layout {
            self.layout = layout;
        }
        if new.server.listen.first() != old.server.listen.first() {
            if let Some(&first) = new.server.listen.first() {
                self.health.set_first_listen(first);
            }
        }
        if new.log.level != old.log.level {
            log::set_max_level(new.log.level);
            changes.push(format!("log_level={}", new.log.level));
        }
        if changes.is_empty() {
            changes.push("nothing".to_owned());
        }
        log::info!(
            "reload applied trigger={trigger} config={} changed={}",
            path.display(),
            changes.join(",")
        );
        self.config = new;
        Ok(())
    }
}

/// Warns about each setting of `new` that only a restart applies, and keeps the value in force
/// (so the configuration kept describes what runs, and the next reload warns again).
fn warn_restart_only(old: &Config, new: &mut Config) {
    let warn = |key: &str| log::warn!("reload: {key} changed; it needs a restart to apply");
    if new.server.workers != old.server.workers {
        warn("server.workers");
        new.server.workers = old.server.workers;
    }
    if new.server.io != old.server.io {
        warn("server.io");
        new.server.io = old.server.io;
    }
    if new.server.udp_receive_buffer != old.server.udp_receive_buffer {
        warn("server.udp_receive_buffer");
        new.server.udp_receive_buffer = old.server.udp_receive_buffer;
    }
    if new.node != old.node {
        warn("[node]");
        new.node = old.node.clone();
    }
    if new.health != old.health {
        warn("[health]");
        new.health = old.health.clone();
    }
    if new.metrics != old.metrics {
        warn("[metrics]");
        new.metrics = old.metrics.clone();
    }
}

/// The forward zone names of `config`, in order (the metrics layout's zones).
fn zone_names(config: &Config) -> Vec<&str> {
    config
        .forward
        .iter()
        .map(|zone| zone.zone.as_str())
        .collect()
}

/// Binds one worker's UDP socket and TCP listener on new listen address `addr`.
fn bind(addr: SocketAddr, receive_buffer: usize) -> Result<(UdpSocket, TcpListener), ApplyError> {
    let (udp, _actual) =
        sockets::bind_udp(addr, receive_buffer).map_err(|source| ApplyError::Bind {
            proto: "UDP",
            addr,
            source,
        })?;
    let tcp = sockets::bind_tcp(addr).map_err(|source| ApplyError::Bind {
        proto: "TCP",
        addr,
        source,
    })?;
    Ok((udp, tcp))
}

/// `a,b,c`.
fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stamp_changes_with_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "a").expect("write");
        let first = FileStamp::of(&path);
        std::fs::write(&path, "ab").expect("write");
        assert_ne!(first, FileStamp::of(&path));
        assert_eq!(FileStamp::of(&dir.path().join("missing")), None);
    }
}
