//! Node integration: the link-local interface, the interception rules, their sync and teardown.
//!
//! Runs on: the main thread at start-up and shutdown, and the `ringdns-node` sync thread.
//!
//! Order (see `control::run`): [`Node::setup_interface`] before any socket is bound (binding
//! 169.254.20.10 needs the address to exist); [`Node::setup_rules`] once every worker serves
//! (the fail-open socket match needs the sockets); then [`Node::spawn_sync`] puts back missing
//! addresses and rules every `node.sync_interval`, never duplicating one, logging re-adds at
//! `info` and counting them and every error in [`NodeStats`]. On exit [`Node::teardown`]
//! removes the rules, then the interface: only what ringdns created, and only if
//! `node.teardown` is true.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use anyhow::Context;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::{Config, NodeConfig};

use super::netlink::{Ensured, LinkLocal, NetlinkError};
use super::rules::{rule_set, Rules, RulesError};

/// `errortype` label values of `coredns_nodecache_setup_errors_total`, as node-cache has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupError {
    /// An iptables/ip6tables/nft command failed (nftables errors count here too: node-cache's
    /// label set has no other name for them).
    Iptables,
    /// The xtables lock was held longer than `-w` waited.
    IptablesLock,
    /// Creating the interface, setting it up or adding an address failed.
    InterfaceAdd,
    /// Looking up the interface or its addresses failed.
    InterfaceCheck,
}

impl SetupError {
    /// Every label value, for exporting all series (also the zero ones).
    pub const ALL: [SetupError; 4] = [
        SetupError::Iptables,
        SetupError::IptablesLock,
        SetupError::InterfaceAdd,
        SetupError::InterfaceCheck,
    ];

    /// The `errortype` label value.
    pub fn label(self) -> &'static str {
        match self {
            SetupError::Iptables => "iptables",
            SetupError::IptablesLock => "iptables_lock",
            SetupError::InterfaceAdd => "interface_add",
            SetupError::InterfaceCheck => "interface_check",
        }
    }

    /// The label for a rules failure.
    fn of_rules(error: &RulesError) -> SetupError {
        if error.is_lock() {
            SetupError::IptablesLock
        } else {
            SetupError::Iptables
        }
    }

    /// The label for a netlink failure.
    fn of_netlink(error: &NetlinkError) -> SetupError {
        if error.operation().is_check() {
            SetupError::InterfaceCheck
        } else {
            SetupError::InterfaceAdd
        }
    }
}

/// Counters and gauges of the node integration, read by the metrics side.
///
/// # Threads
///
/// Written by the thread that runs [`Node`] (the main thread at start-up and shutdown, then
/// `ringdns-node`), one writer at a time; read by `ringdns-http` at scrape time and for
/// `/ready`. Every access is `Relaxed`: each value stands alone and no other memory is
/// published through them.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Rules found missing by a sync and added again (not counting the first set-up).
    pub rules_readded: AtomicU64,
    /// Extra copies of a rule found and deleted.
    pub rules_duplicates_removed: AtomicU64,
    /// Interface addresses (or the interface itself, or its up state) put back by a sync.
    pub interface_readded: AtomicU64,
    /// Rules ringdns wants installed (0 with `setup_iptables = false`).
    pub rules_expected: AtomicU64,
    /// Rules present after the last successful check (gauge).
    pub rules_present: AtomicU64,
    /// Completed sync rounds (start-up set-up excluded).
    pub syncs: AtomicU64,
    /// `errortype="iptables"`.
    errors_iptables: AtomicU64,
    /// `errortype="iptables_lock"`.
    errors_iptables_lock: AtomicU64,
    /// `errortype="interface_add"`.
    errors_interface_add: AtomicU64,
    /// `errortype="interface_check"`.
    errors_interface_check: AtomicU64,
}

impl NodeStats {
    /// `coredns_nodecache_setup_errors_total{errortype}` for `kind`.
    pub fn errors(&self, kind: SetupError) -> u64 {
        self.error_counter(kind).load(Ordering::Relaxed)
    }

    /// Whether every expected rule was present at the last check (true when ringdns installs
    /// none): what `/ready` waits for.
    pub fn rules_in_place(&self) -> bool {
        self.rules_present.load(Ordering::Relaxed) >= self.rules_expected.load(Ordering::Relaxed)
    }

    /// Counts one error of `kind`.
    fn count_error(&self, kind: SetupError) {
        self.error_counter(kind).fetch_add(1, Ordering::Relaxed);
    }

    /// The counter behind `kind`.
    fn error_counter(&self, kind: SetupError) -> &AtomicU64 {
        match kind {
            SetupError::Iptables => &self.errors_iptables,
            SetupError::IptablesLock => &self.errors_iptables_lock,
            SetupError::InterfaceAdd => &self.errors_interface_add,
            SetupError::InterfaceCheck => &self.errors_interface_check,
        }
    }
}

/// The interface and rules ringdns manages on this node, and what it did to them.
#[derive(Debug)]
pub struct Node {
    /// `[node]`.
    config: NodeConfig,
    /// The interface, when `setup_interface`.
    link: Option<LinkLocal>,
    /// The rules, when `setup_iptables`.
    rules: Option<Rules>,
    /// Shared with the metrics side.
    stats: Arc<NodeStats>,
}

impl Node {
    /// Prepares the node integration for `config` (opens netlink, picks the rules backend);
    /// changes nothing yet.
    pub fn new(config: &Config, stats: Arc<NodeStats>) -> anyhow::Result<Node> {
        let node = config.node.clone();
        let link = if node.setup_interface {
            let link = LinkLocal::open(&node.interface, interface_addresses(&config.server.listen))
                .inspect_err(|error| stats.count_error(SetupError::of_netlink(error)))
                .context("opening netlink")?;
            Some(link)
        } else {
            None
        };
        let rules = if node.setup_iptables {
            let set = rule_set(
                &rule_addresses(&config.server.listen),
                config.health.listen.port(),
                node.fallback_service_chain.as_deref(),
            );
            let rules = Rules::new(node.rules, set);
            stats
                .rules_expected
                .store(rules.expected(), Ordering::Relaxed);
            Some(rules)
        } else {
            None
        };
        Ok(Node {
            config: node,
            link,
            rules,
            stats,
        })
    }

    /// Creates the interface and adds the listen IPs (no-op without `setup_interface`). A
    /// failure stops start-up: the listen sockets could not bind without the addresses.
    pub fn setup_interface(&mut self) -> anyhow::Result<()> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        match link.ensure() {
            Ok(Ensured::Created { kind }) => {
                log::info!(
                    "interface ready name={} kind={kind:?} created=true",
                    link.name()
                );
                Ok(())
            }
            Ok(Ensured::AlreadyThere {
                addresses_added, ..
            }) => {
                log::info!(
                    "interface ready name={} created=false addresses_added={addresses_added} (existing interface: only addresses are managed)",
                    link.name()
                );
                Ok(())
            }
            Err(error) => {
                self.stats.count_error(SetupError::of_netlink(&error));
                Err(error).context("setting up the link-local interface")
            }
        }
    }

    /// Installs the rules (no-op without `setup_iptables`). A failure is logged and counted
    /// but does not stop start-up: without the rules traffic still reaches ringdns (tracked),
    /// and the sync retries.
    pub fn setup_rules(&mut self) {
        let Some(rules) = self.rules.as_mut() else {
            return;
        };
        match rules.ensure() {
            Ok(outcome) => {
                self.stats
                    .rules_present
                    .store(outcome.present, Ordering::Relaxed);
                log::info!(
                    "rules ready backend={} added={} present={}",
                    rules.backend(),
                    outcome.added,
                    outcome.present
                );
            }
            Err(error) => {
                self.stats.count_error(SetupError::of_rules(&error));
                log::error!("rules set-up failed, retrying every sync: {error}");
            }
        }
    }

    /// One sync round: puts back missing addresses and rules, logs and counts what it did.
    pub fn sync(&mut self) {
        if let Some(link) = self.link.as_mut() {
            match link.ensure() {
                Ok(ensured) if ensured.changed() => {
                    let count = match ensured {
                        Ensured::Created { .. } => 1,
                        Ensured::AlreadyThere {
                            addresses_added,
                            set_up,
                        } => addresses_added as u64 + u64::from(set_up),
                    };
                    self.stats
                        .interface_readded
                        .fetch_add(count, Ordering::Relaxed);
                    log::info!("interface re-added name={} {ensured:?}", link.name());
                }
                Ok(_) => {}
                Err(error) => {
                    self.stats.count_error(SetupError::of_netlink(&error));
                    log::warn!("interface sync failed: {error}");
                }
            }
        }
        if let Some(rules) = self.rules.as_mut() {
            match rules.ensure() {
                Ok(outcome) => {
                    self.stats
                        .rules_present
                        .store(outcome.present, Ordering::Relaxed);
                    if outcome.added > 0 {
                        self.stats
                            .rules_readded
                            .fetch_add(outcome.added, Ordering::Relaxed);
                        log::info!(
                            "rules re-added count={} backend={}",
                            outcome.added,
                            rules.backend()
                        );
                    }
                    if outcome.duplicates_removed > 0 {
                        self.stats
                            .rules_duplicates_removed
                            .fetch_add(outcome.duplicates_removed, Ordering::Relaxed);
                        log::info!(
                            "rules duplicates removed count={} backend={}",
                            outcome.duplicates_removed,
                            rules.backend()
                        );
                    }
                }
                Err(error) => {
                    self.stats.count_error(SetupError::of_rules(&error));
                    log::warn!("rules sync failed: {error}");
                }
            }
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies new listen addresses (reload): the interface gets any new listen IP now, and
    /// the rules are replaced by the set for the new addresses: the new set is ensured, then
    /// the old one torn down (removing rules for IPs no longer listened on), then the new one
    /// ensured again (a rule both sets share was deleted by the teardown). No-op for the parts
    /// not set up. Returns whether the interface has every listen IP.
    pub fn set_listen(&mut self, config: &Config) -> bool {
        let mut complete = true;
        if let Some(link) = self.link.as_mut() {
            link.set_addresses(interface_addresses(&config.server.listen));
            if let Err(error) = link.ensure() {
                self.stats.count_error(SetupError::of_netlink(&error));
                log::error!("reload: adding listen addresses to the interface failed: {error}");
                complete = false;
            }
        }
        if let Some(old) = self.rules.as_mut() {
            let set = rule_set(
                &rule_addresses(&config.server.listen),
                config.health.listen.port(),
                self.config.fallback_service_chain.as_deref(),
            );
            let mut new = Rules::new(self.config.rules, set);
            self.stats
                .rules_expected
                .store(new.expected(), Ordering::Relaxed);
            let mut replaced = new.ensure().and_then(|_| old.teardown());
            if replaced.is_ok() {
                replaced = new.ensure().map(|outcome| {
                    self.stats
                        .rules_present
                        .store(outcome.present, Ordering::Relaxed);
                });
            }
            if let Err(error) = replaced {
                self.stats.count_error(SetupError::of_rules(&error));
                log::error!("reload: replacing the rules failed, retrying every sync: {error}");
            }
            *old = new;
        }
        complete
    }

    /// Starts `ringdns-node`, which calls [`Node::sync`] every `sync_interval` until stopped,
    /// and applies listen changes sent by [`NodeSync::set_listen`].
    pub fn spawn_sync(self) -> anyhow::Result<NodeSync> {
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let interval = self.config.sync_interval;
        let handle = thread::Builder::new()
            .name("ringdns-node".to_owned())
            .spawn(move || sync_loop(self, &stopped, interval))
            .context("starting ringdns-node")?;
        Ok(NodeSync { stop, handle })
    }

    /// Removes the rules, then the interface: only what ringdns created or added. With
    /// `node.teardown = false` leaves everything for the next instance.
    pub fn teardown(mut self) {
        if !self.config.teardown {
            if self.rules.is_some() || self.link.is_some() {
                log::info!("teardown skipped (node.teardown = false): rules and interface left for the next instance");
            }
            return;
        }
        if let Some(rules) = self.rules.as_mut() {
            match rules.teardown() {
                Ok(()) => {
                    self.stats.rules_present.store(0, Ordering::Relaxed);
                    log::info!("teardown: rules removed backend={}", rules.backend());
                }
                Err(error) => {
                    self.stats.count_error(SetupError::of_rules(&error));
                    log::error!("teardown: removing rules failed: {error}");
                }
            }
        }
        if let Some(link) = self.link.as_mut() {
            let created = link.created();
            match link.teardown() {
                Ok(()) => log::info!(
                    "teardown: interface name={} {}",
                    link.name(),
                    if created.is_some() {
                        "deleted"
                    } else {
                        "kept (not created by ringdns), added addresses removed"
                    }
                ),
                Err(error) => {
                    self.stats.count_error(SetupError::of_netlink(&error));
                    log::error!("teardown: interface failed: {error}");
                }
            }
        }
    }
}

/// The running `ringdns-node` thread.
#[derive(Debug)]
pub struct NodeSync {
    /// Dropping or sending [`NodeMessage::Stop`] stops the loop.
    stop: Sender<NodeMessage>,
    /// Gives the [`Node`] back for teardown.
    handle: thread::JoinHandle<Node>,
}

/// A message to `ringdns-node`.
#[derive(Debug)]
enum NodeMessage {
    /// Stop the loop and give the [`Node`] back.
    Stop,
    /// Apply new listen addresses ([`Node::set_listen`]); reply whether the interface has them.
    Listen(Box<Config>, Sender<bool>),
}

/// Bound on `ringdns-node` applying listen changes (a sync round in progress comes first).
const LISTEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl NodeSync {
    /// Has `ringdns-node` apply the listen addresses of `config` ([`Node::set_listen`]) and
    /// waits for it; `false` if the interface lacks an address or the thread did not answer.
    pub fn set_listen(&self, config: &Config) -> bool {
        let (done, applied) = crossbeam_channel::bounded(1);
        if self
            .stop
            .send(NodeMessage::Listen(Box::new(config.clone()), done))
            .is_err()
        {
            return false;
        }
        applied.recv_timeout(LISTEN_TIMEOUT).unwrap_or(false)
    }

    /// Stops the sync loop (waiting for a round in progress) and returns the [`Node`];
    /// `None` if the thread panicked (then nothing is torn down, which fails safe: the rules
    /// are fail-open).
    pub fn stop(self) -> Option<Node> {
        let _ = self.stop.send(NodeMessage::Stop);
        match self.handle.join() {
            Ok(node) => Some(node),
            Err(_) => {
                log::error!("ringdns-node panicked; rules and interface left in place");
                None
            }
        }
    }
}

/// The `ringdns-node` loop: sleep `interval` (woken early by a stop), sync, repeat.
fn sync_loop(
    mut node: Node,
    messages: &Receiver<NodeMessage>,
    interval: std::time::Duration,
) -> Node {
    let mut next = std::time::Instant::now() + interval;
    loop {
        let wait = next.saturating_duration_since(std::time::Instant::now());
        match messages.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {
                node.sync();
                next = std::time::Instant::now() + interval;
            }
            Ok(NodeMessage::Listen(config, done)) => {
                let _ = done.send(node.set_listen(&config));
            }
            Ok(NodeMessage::Stop) | Err(RecvTimeoutError::Disconnected) => return node,
        }
    }
}

/// The IPs to put on the interface: each listen IP once, without loopback and wildcard ones
/// (they need no interface and must not be added to one).
fn interface_addresses(listen: &[SocketAddr]) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = Vec::new();
    for addr in listen {
        let ip = addr.ip();
        if ip.is_loopback() || ip.is_unspecified() || addrs.contains(&ip) {
            continue;
        }
        addrs.push(ip);
    }
    addrs
}

/// The listen addresses rules are made for: all but wildcard ones (`-d 0.0.0.0` would match
/// nothing meant).
fn rule_addresses(listen: &[SocketAddr]) -> Vec<SocketAddr> {
    listen
        .iter()
        .copied()
        .filter(|addr| !addr.ip().is_unspecified())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_gets_each_routable_listen_ip_once() {
        let listen: Vec<SocketAddr> = [
            "169.254.20.10:53",
            "169.254.20.10:5353",
            "10.96.0.10:53",
            "127.0.0.1:53",
            "[::]:53",
            "[fd00::a]:53",
        ]
        .iter()
        .map(|text| text.parse().expect("addr"))
        .collect();
        let ips: Vec<String> = interface_addresses(&listen)
            .iter()
            .map(IpAddr::to_string)
            .collect();
        assert_eq!(ips, ["169.254.20.10", "10.96.0.10", "fd00::a"]);
        assert_eq!(rule_addresses(&listen).len(), 5);
    }

    #[test]
    fn setup_error_labels_match_node_cache() {
        let labels: Vec<&str> = SetupError::ALL.iter().map(|kind| kind.label()).collect();
        assert_eq!(
            labels,
            [
                "iptables",
                "iptables_lock",
                "interface_add",
                "interface_check"
            ]
        );
        let stats = NodeStats::default();
        stats.count_error(SetupError::IptablesLock);
        assert_eq!(stats.errors(SetupError::IptablesLock), 1);
        assert_eq!(stats.errors(SetupError::Iptables), 0);
    }

    #[test]
    fn rules_are_in_place_when_none_are_expected() {
        let stats = NodeStats::default();
        assert!(stats.rules_in_place());
        stats.rules_expected.store(24, Ordering::Relaxed);
        assert!(!stats.rules_in_place());
        stats.rules_present.store(24, Ordering::Relaxed);
        assert!(stats.rules_in_place());
    }
}
