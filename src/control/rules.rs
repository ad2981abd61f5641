//! The interception rules (node-cache's 12 per listen IP, fail-open) and the backend choice.
//!
//! Runs on: control side (the `ringdns-node` thread); [`rule_set`] and the rule texts are pure.
//!
//! For every listen IP L and port P, and the health port H, ringdns installs [`TEMPLATES`]:
//!
//! | table/chain        | match                    | action                                 |
//! |--------------------|--------------------------|----------------------------------------|
//! | raw PREROUTING     | tcp, udp `-d L --dport P`| NOTRACK **only while a ringdns socket exists** |
//! | filter INPUT       | tcp, udp `-d L --dport P`| ACCEPT                                 |
//! | raw OUTPUT         | tcp, udp `-s L --sport P`| NOTRACK                                |
//! | filter OUTPUT      | tcp, udp `-s L --sport P`| ACCEPT                                 |
//! | raw OUTPUT         | tcp, udp `-d L --dport P`| NOTRACK (host-network clients)         |
//! | raw OUTPUT         | tcp `-d L --dport H`, tcp `-s L --sport H` | NOTRACK (health)     |
//!
//! Fail-open: the PREROUTING NOTRACK is conditional on a socket bound to L:P (iptables
//! `-m socket --nowildcard`; nftables `socket wildcard 0` for UDP and `socket transparent 0` for
//! TCP, whose handshake's last packet `socket wildcard 0` does not match). After a `kill -9`
//! no socket exists, the packet is tracked again and kube-proxy's DNAT for the ClusterIP
//! applies. The optional fallback jump (`node.fallback_service_chain`) needs no condition of
//! its own for the same reason: while ringdns serves, the NOTRACKed packet never reaches the
//! nat table; once it is gone, the tracked packet to 169.254.20.10:53 jumps to the kube-dns
//! service chain.
//!
//! Every rule carries a comment naming ringdns and the rule itself, so a rule is found (and its
//! copies counted) by its comment alone.
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::config::RulesBackend;

use super::iptables::Iptables;
use super::nftables::Nftables;

/// Bound on one iptables/nft invocation. `-w` waits for the xtables lock up to
/// [`LOCK_WAIT_SECS`]; this leaves room for the work itself.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// `iptables -w N`: how long to wait for the xtables lock before failing (counted as
/// `iptables_lock`), so a stuck lock holder never stalls the sync forever.
pub const LOCK_WAIT_SECS: &str = "5";

/// Start of every rule comment; identifies ringdns' rules in `iptables-save`/`nft list`.
pub const COMMENT_PREFIX: &str = "ringdns";

/// nat/PREROUTING fallback jumps are added only for listen addresses in this range (the
/// link-local address, which kube-proxy has no rule for) on port 53.
const FALLBACK_PORT: u16 = 53;

/// A netfilter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// `raw`: before conntrack, where NOTRACK works.
    Raw,
    /// `filter`.
    Filter,
    /// `nat` (only the optional fallback jump).
    Nat,
}

/// A netfilter hook (iptables built-in chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `PREROUTING`.
    Prerouting,
    /// `INPUT`.
    Input,
    /// `OUTPUT`.
    Output,
}

/// Transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

/// Which side of the packet the listen address and port are matched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// `-d L --dport P`.
    Destination,
    /// `-s L --sport P`.
    Source,
}

/// Which port a template uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortOf {
    /// The listen address's own port.
    Dns,
    /// The health endpoint's port.
    Health,
}

/// What a matching packet gets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Skip connection tracking.
    Notrack,
    /// Skip connection tracking only while a ringdns socket is bound to the address: fail-open.
    NotrackWhileSocket,
    /// Accept (punches through a default-drop policy).
    Accept,
    /// Jump to this nat chain (the fallback to kube-proxy's kube-dns service chain).
    Jump(String),
}

/// One line of the const rule table, before a listen address is filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    /// Table.
    pub table: Table,
    /// Hook.
    pub hook: Hook,
    /// Protocol.
    pub protocol: Protocol,
    /// Matched side.
    pub side: Side,
    /// Port used.
    pub port: PortOf,
    /// Action; only the fixed ones (never [`Action::Jump`]).
    pub action: FixedAction,
}

/// The [`Action`]s a [`Template`] can name (a jump needs a chain name from the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixedAction {
    /// [`Action::Notrack`].
    Notrack,
    /// [`Action::NotrackWhileSocket`].
    NotrackWhileSocket,
    /// [`Action::Accept`].
    Accept,
}

/// Shorthand for the table below.
const fn template(
    table: Table,
    hook: Hook,
    protocol: Protocol,
    side: Side,
    port: PortOf,
    action: FixedAction,
) -> Template {
    Template {
        table,
        hook,
        protocol,
        side,
        port,
        action,
    }
}

/// node-cache's rules per listen IP, in its order, with the PREROUTING NOTRACK made fail-open.
pub const TEMPLATES: [Template; 12] = {
    use FixedAction::{Accept, Notrack, NotrackWhileSocket};
    use Hook::{Input, Output, Prerouting};
    use PortOf::{Dns, Health};
    use Protocol::{Tcp, Udp};
    use Side::{Destination, Source};
    use Table::{Filter, Raw};
    [
        template(Raw, Prerouting, Tcp, Destination, Dns, NotrackWhileSocket),
        template(Raw, Prerouting, Udp, Destination, Dns, NotrackWhileSocket),
        template(Filter, Input, Tcp, Destination, Dns, Accept),
        template(Filter, Input, Udp, Destination, Dns, Accept),
        template(Raw, Output, Tcp, Source, Dns, Notrack),
        template(Raw, Output, Udp, Source, Dns, Notrack),
        template(Filter, Output, Tcp, Source, Dns, Accept),
        template(Filter, Output, Udp, Source, Dns, Accept),
        template(Raw, Output, Tcp, Destination, Dns, Notrack),
        template(Raw, Output, Udp, Destination, Dns, Notrack),
        template(Raw, Output, Tcp, Destination, Health, Notrack),
        template(Raw, Output, Tcp, Source, Health, Notrack),
    ]
};

/// One concrete rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Table.
    pub table: Table,
    /// Hook.
    pub hook: Hook,
    /// Protocol.
    pub protocol: Protocol,
    /// Matched side.
    pub side: Side,
    /// The listen IP.
    pub ip: IpAddr,
    /// The port.
    pub port: u16,
    /// Action.
    pub action: Action,
}

impl Rule {
    /// The rule's comment: unique per rule, e.g.
    /// `ringdns raw/PREROUTING udp -d 169.254.20.10:53`.
    pub fn comment(&self) -> String {
        let side = match self.side {
            Side::Destination => "-d",
            Side::Source => "-s",
        };
        let addr = SocketAddr::new(self.ip, self.port);
        let jump = match &self.action {
            Action::Jump(chain) => format!(" -> {chain}"),
            _ => String::new(),
        };
        format!(
            "{COMMENT_PREFIX} {}/{} {} {side} {addr}{jump}",
            self.table.iptables_name(),
            self.hook.iptables_name(),
            self.protocol.name()
        )
    }
}

impl Table {
    /// iptables `-t` name.
    pub fn iptables_name(self) -> &'static str {
        match self {
            Table::Raw => "raw",
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

impl Hook {
    /// iptables built-in chain name.
    pub fn iptables_name(self) -> &'static str {
        match self {
            Hook::Prerouting => "PREROUTING",
            Hook::Input => "INPUT",
            Hook::Output => "OUTPUT",
        }
    }
}

impl Protocol {
    /// `udp` / `tcp`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        }
    }
}

/// Every rule for `listen` and health port `health_port`, deduplicated, in table order per
/// address; plus, with `fallback`, udp and tcp nat/PREROUTING jumps from each IPv4 link-local
/// listen address on port 53 to that chain.
pub fn rule_set(listen: &[SocketAddr], health_port: u16, fallback: Option<&str>) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    for addr in listen {
        for template in &TEMPLATES {
            let rule = Rule {
                table: template.table,
                hook: template.hook,
                protocol: template.protocol,
                side: template.side,
                ip: addr.ip(),
                port: match template.port {
                    PortOf::Dns => addr.port(),
                    PortOf::Health => health_port,
                },
                action: match template.action {
                    FixedAction::Notrack => Action::Notrack,
                    FixedAction::NotrackWhileSocket => Action::NotrackWhileSocket,
                    FixedAction::Accept => Action::Accept,
                },
            };
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
    }
    if let Some(chain) = fallback {
        for addr in listen {
            let link_local = matches!(addr.ip(), IpAddr::V4(ip) if ip.is_link_local());
            if !link_local || addr.port() != FALLBACK_PORT {
                continue;
            }
            for protocol in [Protocol::Udp, Protocol::Tcp] {
                let rule = Rule {
                    table: Table::Nat,
                    hook: Hook::Prerouting,
                    protocol,
                    side: Side::Destination,
                    ip: addr.ip(),
                    port: addr.port(),
                    action: Action::Jump(chain.to_owned()),
                };
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
        }
    }
    rules
}

/// The resolved backend, as chosen for `node.rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// iptables/ip6tables binaries of the given flavour.
    Iptables(Flavour),
    /// An own nftables table.
    Nftables,
}

/// Which iptables binaries to run (kubernetes-sigs/iptables-wrappers' choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// `iptables-nft`/`ip6tables-nft`.
    Nft,
    /// `iptables-legacy`/`ip6tables-legacy`.
    Legacy,
    /// Plain `iptables`/`ip6tables` (no flavoured binaries installed).
    Plain,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Iptables(Flavour::Nft) => f.write_str("iptables (nft)"),
            Backend::Iptables(Flavour::Legacy) => f.write_str("iptables (legacy)"),
            Backend::Iptables(Flavour::Plain) => f.write_str("iptables"),
            Backend::Nftables => f.write_str("nftables"),
        }
    }
}

/// What one `ensure` found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Rules that were missing and have been added.
    pub added: u64,
    /// Extra copies of a rule that were found and deleted.
    pub duplicates_removed: u64,
    /// Rules present after the call (of those expected).
    pub present: u64,
}

/// A rule tool that failed. The next sync retries every kind: a held lock or a racing agent
/// clears by itself; a missing binary or capability is logged each time it fails.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The tool could not be started (not installed?).
    #[error("{program}: cannot run: {source}")]
    Spawn {
        /// The binary.
        program: String,
        /// Why.
        source: io::Error,
    },
    /// The tool did not finish in time.
    #[error("{program}: no result within {after:?}")]
    Timeout {
        /// The binary.
        program: String,
        /// The bound.
        after: Duration,
    },
    /// Another process held the xtables lock for longer than `-w` waited.
    #[error("{program}: the xtables lock is held by another process")]
    Lock {
        /// The binary.
        program: String,
    },
    /// The tool exited non-zero.
    #[error("{program} {args}: {status}: {stderr}")]
    Failed {
        /// The binary.
        program: String,
        /// Its arguments, space-separated (for the log line).
        args: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
}

impl RulesError {
    /// Whether this is the xtables lock (`errortype="iptables_lock"`), not another failure.
    pub fn is_lock(&self) -> bool {
        matches!(self, RulesError::Lock { .. })
    }
}

/// The rules ringdns manages on one backend.
///
/// # Threads
///
/// Owned by the one thread that runs the node sync; not shared.
#[derive(Debug)]
pub enum Rules {
    /// iptables/ip6tables.
    Iptables(Iptables),
    /// nftables.
    Nftables(Nftables),
}

impl Rules {
    /// Chooses the backend for `choice` (probing the node) and prepares `rules` on it.
    /// Changes nothing yet.
    pub fn new(choice: RulesBackend, rules: Vec<Rule>) -> Rules {
        let backend = choose_backend(choice);
        log::info!("rules backend={backend} choice={}", choice.as_str());
        match backend {
            Backend::Iptables(flavour) => Rules::Iptables(Iptables::new(flavour, rules)),
            Backend::Nftables => Rules::Nftables(Nftables::new(rules)),
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match self {
            Rules::Iptables(iptables) => Backend::Iptables(iptables.flavour()),
            Rules::Nftables(_) => Backend::Nftables,
        }
    }

    /// How many rules this backend installs (a gauge's target; nftables leaves out jumps).
    pub fn expected(&self) -> u64 {
        match self {
            Rules::Iptables(iptables) => iptables.rule_count(),
            Rules::Nftables(nftables) => nftables.rule_count(),
        }
    }

    /// Puts back every missing rule, never leaving a duplicate.
    pub fn ensure(&mut self) -> Result<Outcome, RulesError> {
        match self {
            Rules::Iptables(iptables) => iptables.ensure(),
            Rules::Nftables(nftables) => nftables.ensure(),
        }
    }

    /// Deletes exactly the rules ringdns added (for nftables: its own table).
    pub fn teardown(&mut self) -> Result<(), RulesError> {
        match self {
            Rules::Iptables(iptables) => iptables.teardown(),
            Rules::Nftables(nftables) => nftables.teardown(),
        }
    }
}

/// The backend for `choice`: `auto` is nftables when kube-proxy runs in nftables mode (a
/// `table ip kube-proxy` or `table ip6 kube-proxy` exists), else iptables.
pub fn choose_backend(choice: RulesBackend) -> Backend {
    match choice {
        RulesBackend::Nftables => Backend::Nftables,
        RulesBackend::Iptables => Backend::Iptables(super::iptables::detect_flavour()),
        RulesBackend::Auto => {
            let tables = run("nft", &["list", "tables"], None)
                .map(|output| output.stdout)
                .unwrap_or_default();
            if kube_proxy_uses_nftables(&tables) {
                Backend::Nftables
            } else {
                Backend::Iptables(super::iptables::detect_flavour())
            }
        }
    }
}

/// Whether `nft list tables` output shows kube-proxy's nftables-mode tables.
fn kube_proxy_uses_nftables(tables: &str) -> bool {
    tables.lines().any(|line| {
        let line = line.trim();
        line == "table ip kube-proxy" || line == "table ip6 kube-proxy"
    })
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `program args` with `stdin`, bounded by [`COMMAND_TIMEOUT`]; a non-zero exit is
/// [`RulesError::Failed`] (or [`RulesError::Lock`] when iptables names the xtables lock).
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, RulesError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RulesError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe; its exit status then says why.
        let _ = pipe.write_all(text.as_bytes());
    }
    let stdout_reader = read_to_end(child.stdout.take());
    let stderr_reader = read_to_end(child.stderr.take());
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            _ => {
                // Our own unreaped child: its PID cannot have been reused. Killing it closes
                // its pipes, which ends the reader threads.
                let _ = child.kill();
                let _ = child.wait();
                return Err(RulesError::Timeout {
                    program: program.to_owned(),
                    after: COMMAND_TIMEOUT,
                });
            }
        }
    };
    let stdout = stdout_reader.join().unwrap_or_default();
    let stderr = stderr_reader.join().unwrap_or_default();
    if status.success() {
        return Ok(Output { stdout, stderr });
    }
    if stderr.contains("xtables lock") {
        return Err(RulesError::Lock {
            program: program.to_owned(),
        });
    }
    Err(RulesError::Failed {
        program: program.to_owned(),
        args: args.join(" "),
        status,
        stderr: stderr.trim().to_owned(),
    })
}

/// Reads a child's pipe to its end on a helper thread (ends when the child exits).
fn read_to_end(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket address literal.
    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address literal")
    }

    #[test]
    fn every_listen_ip_gets_twelve_rules() {
        let rules = rule_set(
            &[addr("169.254.20.10:53"), addr("[fd00::a]:53")],
            8080,
            None,
        );
        assert_eq!(rules.len(), 24);
        let fail_open = rules
            .iter()
            .filter(|rule| rule.action == Action::NotrackWhileSocket)
            .count();
        assert_eq!(fail_open, 4, "only raw PREROUTING tcp+udp per IP");
        assert!(rules
            .iter()
            .filter(|rule| rule.action == Action::NotrackWhileSocket)
            .all(|rule| rule.table == Table::Raw && rule.hook == Hook::Prerouting));
        let health: Vec<&Rule> = rules.iter().filter(|rule| rule.port == 8080).collect();
        assert_eq!(health.len(), 4);
        assert!(health.iter().all(|rule| rule.protocol == Protocol::Tcp));
    }

    #[test]
    fn comments_are_unique_and_name_ringdns() {
        let rules = rule_set(
            &[
                addr("169.254.20.10:53"),
                addr("10.96.0.10:53"),
                addr("10.96.0.10:5353"),
            ],
            8080,
            Some("KUBE-SVC-TCOQ7XJHQPQMWC2M"),
        );
        let mut comments: Vec<String> = rules.iter().map(Rule::comment).collect();
        assert!(comments.iter().all(|c| c.starts_with("ringdns ")));
        assert_eq!(
            comments[1],
            "ringdns raw/PREROUTING udp -d 169.254.20.10:53"
        );
        let total = comments.len();
        comments.sort();
        comments.dedup();
        assert_eq!(comments.len(), total);
    }

    #[test]
    fn same_ip_on_two_ports_shares_its_health_rules() {
        let rules = rule_set(
            &[addr("10.96.0.10:53"), addr("10.96.0.10:5353")],
            8080,
            None,
        );
        assert_eq!(rules.len(), 12 + 10);
    }

    #[test]
    fn fallback_jump_is_only_for_link_local_port_53() {
        let rules = rule_set(
            &[
                addr("169.254.20.10:53"),
                addr("10.96.0.10:53"),
                addr("[fd00::a]:53"),
            ],
            8080,
            Some("KUBE-SVC-X"),
        );
        let jumps: Vec<&Rule> = rules
            .iter()
            .filter(|rule| rule.table == Table::Nat)
            .collect();
        assert_eq!(jumps.len(), 2);
        assert!(jumps
            .iter()
            .all(|rule| rule.ip == addr("169.254.20.10:53").ip()
                && rule.action == Action::Jump("KUBE-SVC-X".to_owned())));
        assert!(rule_set(&[addr("169.254.20.10:53")], 8080, None)
            .iter()
            .all(|rule| rule.table != Table::Nat));
    }

    #[test]
    fn kube_proxy_nftables_mode_is_recognized() {
        assert!(kube_proxy_uses_nftables(
            "table ip filter\ntable ip kube-proxy\ntable ip6 kube-proxy\n"
        ));
        assert!(kube_proxy_uses_nftables("table ip6 kube-proxy\n"));
        assert!(!kube_proxy_uses_nftables("table ip nat\ntable ip filter\n"));
        assert!(!kube_proxy_uses_nftables("table inet kube-proxy-x\n"));
    }
}
