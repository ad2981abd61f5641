//! The rules of [`super::rules`] in ringdns' own nftables table, `table inet ringdns`.
//!
//! Runs on: control side (the `ringdns-node` thread; every call runs `nft`).
//!
//! The whole table is loaded with one `nft -f -` transaction (create, delete, recreate: atomic,
//! so packets never see a half-built table), and reloaded whenever a rule is missing or
//! doubled; so rules are never duplicated. Teardown deletes the table. Chains sit at the hooks
//! and priorities of the iptables tables they stand for (`raw` = -300, before conntrack;
//! `filter` = 0). Two differences from iptables, both inherent to nftables:
//! - an `accept` ends evaluation only in this table's chain; a `drop` in another table at the
//!   same hook still drops. The ACCEPT rules are kept for parity.
//! - a chain cannot jump into another table, so `node.fallback_service_chain` (a chain in
//!   kube-proxy's table) is not installed here; [`Nftables::new`] warns once.
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use super::rules::{run, Action, Hook, Outcome, Protocol, Rule, RulesError, Side, Table};

/// `table inet ringdns`: one table for IPv4 and IPv6.
pub const TABLE: &str = "ringdns";

/// The base chains: name, hook, priority, and which rules belong to it.
const CHAINS: [(&str, &str, &str, Table, Hook); 4] = [
    (
        "prerouting",
        "prerouting",
        "raw",
        Table::Raw,
        Hook::Prerouting,
    ),
    ("input", "input", "filter", Table::Filter, Hook::Input),
    ("output-raw", "output", "raw", Table::Raw, Hook::Output),
    ("output", "output", "filter", Table::Filter, Hook::Output),
];

/// The rules in ringdns' nftables table.
///
/// # Threads
///
/// Owned by the one thread that runs the node sync; not shared.
#[derive(Debug)]
pub struct Nftables {
    /// Every rule ringdns installs (jumps already left out).
    rules: Vec<Rule>,
}

impl Nftables {
    /// Prepares `rules`; changes nothing yet. Jump rules cannot be expressed (see the module
    /// docs) and are dropped with one warning.
    pub fn new(rules: Vec<Rule>) -> Self {
        let (jumps, rules): (Vec<Rule>, Vec<Rule>) = rules
            .into_iter()
            .partition(|rule| matches!(rule.action, Action::Jump(_)));
        if !jumps.is_empty() {
            log::warn!(
                "node.fallback_service_chain ignored with the nftables backend: nftables cannot jump into kube-proxy's table"
            );
        }
        Self { rules }
    }

    /// How many rules it manages.
    pub fn rule_count(&self) -> u64 {
        self.rules.len() as u64
    }

    /// Reloads the table atomically if any rule is missing or doubled.
    pub fn ensure(&mut self) -> Result<Outcome, RulesError> {
        let listing = match run("nft", &["list", "table", "inet", TABLE], None) {
            Ok(output) => output.stdout,
            Err(RulesError::Failed { .. }) => String::new(),
            Err(error) => return Err(error),
        };
        let mut missing = 0;
        let mut extra = 0;
        for rule in &self.rules {
            let needle = format!("comment \"{}\"", rule.comment());
            match listing.matches(&needle).count() {
                0 => missing += 1,
                1 => {}
                copies => extra += copies as u64 - 1,
            }
        }
        let present = self.rules.len() as u64;
        if missing == 0 && extra == 0 {
            return Ok(Outcome {
                present,
                ..Outcome::default()
            });
        }
        run("nft", &["-f", "-"], Some(&self.script()))?;
        Ok(Outcome {
            added: missing,
            duplicates_removed: extra,
            present,
        })
    }

    /// Deletes the table; a table already gone is fine.
    pub fn teardown(&mut self) -> Result<(), RulesError> {
        match run("nft", &["delete", "table", "inet", TABLE], None) {
            Ok(_) => Ok(()),
            Err(RulesError::Failed { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// The `nft -f` script that replaces the table in one transaction.
    fn script(&self) -> String {
        let mut out = String::new();
        // Creating first makes the delete valid whether or not the table exists.
        let _ = writeln!(out, "table inet {TABLE} {{}}");
        let _ = writeln!(out, "delete table inet {TABLE}");
        let _ = writeln!(out, "table inet {TABLE} {{");
        for (name, hook, priority, table, chain_hook) in CHAINS {
            let _ = writeln!(out, "  chain {name} {{");
            let _ = writeln!(
                out,
                "    type filter hook {hook} priority {priority}; policy accept;"
            );
            for rule in self
                .rules
                .iter()
                .filter(|rule| rule.table == table && rule.hook == chain_hook)
            {
                let _ = writeln!(out, "    {}", rule_text(rule));
            }
            let _ = writeln!(out, "  }}");
        }
        let _ = writeln!(out, "}}");
        out
    }
}

/// One rule in nft syntax, e.g.
/// `ip daddr 169.254.20.10 udp dport 53 socket wildcard 0 notrack comment "…"`.
fn rule_text(rule: &Rule) -> String {
    let family = if rule.ip.is_ipv4() { "ip" } else { "ip6" };
    let (address, port) = match rule.side {
        Side::Destination => ("daddr", "dport"),
        Side::Source => ("saddr", "sport"),
    };
    let protocol = rule.protocol.name();
    let verdict = match (&rule.action, rule.protocol) {
        // `socket wildcard 0` does not match the TCP handshake's last ACK (the connection is
        // then reset); `socket transparent 0` matches every packet of a socket's connection.
        (Action::NotrackWhileSocket, Protocol::Udp) => "socket wildcard 0 notrack",
        (Action::NotrackWhileSocket, Protocol::Tcp) => "socket transparent 0 notrack",
        (Action::Notrack, _) => "notrack",
        (Action::Accept, _) => "accept",
        (Action::Jump(_), _) => "continue",
    };
    format!(
        "{family} {address} {} {protocol} {port} {} {verdict} comment \"{}\"",
        rule.ip,
        rule.port,
        rule.comment()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::rules::rule_set;

    #[test]
    fn fail_open_rules_use_socket_wildcard_for_udp_and_transparent_for_tcp() {
        let rules = rule_set(&["[fd00::a]:53".parse().expect("addr")], 8080, None);
        assert_eq!(
            rule_text(&rules[0]),
            "ip6 daddr fd00::a tcp dport 53 socket transparent 0 notrack \
             comment \"ringdns raw/PREROUTING tcp -d [fd00::a]:53\""
        );
        assert!(rule_text(&rules[1]).contains("udp dport 53 socket wildcard 0 notrack"));
        assert!(rule_text(&rules[4]).starts_with("ip6 saddr fd00::a tcp sport 53 notrack"));
    }

    #[test]
    fn script_replaces_the_table_in_one_transaction_without_jumps() {
        let rules = rule_set(
            &["169.254.20.10:53".parse().expect("addr")],
            8080,
            Some("KUBE-SVC-X"),
        );
        let script = Nftables::new(rules).script();
        assert!(script.starts_with(
            "table inet ringdns {}\ndelete table inet ringdns\ntable inet ringdns {\n"
        ));
        assert_eq!(script.matches("comment \"ringdns ").count(), 12, "{script}");
        assert!(!script.contains("KUBE-SVC-X"), "{script}");
        assert!(script.contains("type filter hook prerouting priority raw; policy accept;"));
    }
}
