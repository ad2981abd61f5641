//! The rules of [`super::rules`] through the iptables/ip6tables binaries.
//!
//! Runs on: control side (the `ringdns-node` thread; every call runs a process).
//!
//! Every invocation passes `-w 5`, so a held xtables lock makes it fail (counted as
//! `iptables_lock`) instead of hanging. IPv4 rules go to `iptables`, IPv6 rules to `ip6tables`,
//! of the flavour [`detect_flavour`] picks the way kubernetes-sigs/iptables-wrappers does. Rules
//! are inserted at the top of their chain (as node-cache does) so an ACCEPT precedes any DROP.
//! A missing rule is found with `-C`; after adding, the chain is listed again and any extra
//! copy of the rule (found by its unique comment) is deleted, so a flaky `-C` can never leave
//! duplicates behind.
//!
//! The nft flavour creates a table's base chains the first time a rule goes into it and keeps
//! them, empty, after the rule is deleted. So teardown deletes the base chains ringdns wrote to
//! once they are empty accept-policy chains again: the node's ruleset ends as it was.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::Path;

use super::rules::{run, Action, Flavour, Outcome, Rule, RulesError, Side, Table, LOCK_WAIT_SECS};

/// Where iptables binaries are looked for besides `$PATH` (a DaemonSet's `$PATH` may lack the
/// sbin directories).
const SBIN_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"];

/// Chains kubelet (1.24+) creates in the mangle table of the flavour the node uses; their
/// presence decides the flavour before rule counts do (iptables-wrappers).
const HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// The nftables tables iptables-nft uses for the tables ringdns writes to.
const XTABLES_NFT_TABLES: [&str; 6] = [
    "ip raw",
    "ip filter",
    "ip nat",
    "ip6 raw",
    "ip6 filter",
    "ip6 nat",
];

/// The rules on iptables, and which of them ringdns has seen itself add.
///
/// # Threads
///
/// Owned by the one thread that runs the node sync; not shared.
#[derive(Debug)]
pub struct Iptables {
    /// Which binaries to run.
    flavour: Flavour,
    /// Every rule ringdns wants, in table order.
    rules: Vec<Rule>,
}

impl Iptables {
    /// Prepares `rules` on `flavour`; changes nothing yet.
    pub fn new(flavour: Flavour, rules: Vec<Rule>) -> Self {
        Self { flavour, rules }
    }

    /// The flavour in use.
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// How many rules it manages.
    pub fn rule_count(&self) -> u64 {
        self.rules.len() as u64
    }

    /// Adds every missing rule; afterwards deletes extra copies of the rules it added.
    pub fn ensure(&mut self) -> Result<Outcome, RulesError> {
        let mut outcome = Outcome::default();
        let mut first_error = None;
        let mut added: Vec<usize> = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            match self.check(rule) {
                Ok(true) => outcome.present += 1,
                Ok(false) => match self.change(rule, &["-I", rule.hook.iptables_name(), "1"]) {
                    Ok(()) => {
                        outcome.added += 1;
                        outcome.present += 1;
                        added.push(index);
                    }
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                },
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        for index in added {
            let Some(rule) = self.rules.get(index) else {
                continue;
            };
            match self.copies(rule) {
                Ok(copies) => {
                    for _ in 1..copies {
                        match self.change(rule, &["-D", rule.hook.iptables_name()]) {
                            Ok(()) => outcome.duplicates_removed += 1,
                            Err(error) => {
                                first_error.get_or_insert(error);
                                break;
                            }
                        }
                    }
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(outcome),
        }
    }

    /// Deletes every copy of every rule of ringdns' set (all carry its comment); rules already
    /// gone are fine. Stops at the first failure other than "no such rule".
    pub fn teardown(&mut self) -> Result<(), RulesError> {
        let mut first_error = None;
        for rule in self.rules.iter().rev() {
            // Bounded: one delete per copy found, plus one that finds nothing.
            let copies = match self.copies(rule) {
                Ok(copies) => copies,
                Err(error) => {
                    first_error.get_or_insert(error);
                    continue;
                }
            };
            for _ in 0..copies {
                if let Err(error) = self.change(rule, &["-D", rule.hook.iptables_name()]) {
                    if !is_missing_rule(&error) {
                        first_error.get_or_insert(error);
                    }
                    break;
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => {
                self.remove_chains_it_caused();
                Ok(())
            }
        }
    }

    /// nft flavour: deletes the base chains iptables-nft created for ringdns' rules once they
    /// are empty again (then their table, if nothing is left in it). Only a chain that holds
    /// no rule and has policy accept is deleted: iptables-nft creates exactly such chains on
    /// first use and recreates them on demand, so deleting one changes no packet's fate and no
    /// other tool's view, whether it existed before ringdns started or not (which a restarted
    /// instance cannot know after a `kill -9`). Best effort: a failure is logged at debug.
    fn remove_chains_it_caused(&self) {
        if self.flavour != Flavour::Nft {
            return;
        }
        let Some(now) = xtables_nft_chains() else {
            return;
        };
        let touched: Vec<String> = self
            .rules
            .iter()
            .map(|rule| {
                let family = if rule.ip.is_ipv4() { "ip" } else { "ip6" };
                format!(
                    "{family} {} {}",
                    rule.table.iptables_name(),
                    rule.hook.iptables_name()
                )
            })
            .collect();
        for chain in now.iter().filter(|chain| touched.contains(chain)) {
            let words: Vec<&str> = chain.split(' ').collect();
            let [family, table, name] = words.as_slice() else {
                continue;
            };
            let listing = run("nft", &["list", "chain", family, table, name], None)
                .map(|output| output.stdout)
                .unwrap_or_default();
            if chain_is_empty(&listing) {
                if let Err(error) = run("nft", &["delete", "chain", family, table, name], None) {
                    log::debug!("teardown: deleting empty chain {chain}: {error}");
                }
            }
        }
        let remaining = xtables_nft_chains().unwrap_or_default();
        for table in XTABLES_NFT_TABLES {
            let prefix = format!("{table} ");
            let touched_table = touched.iter().any(|chain| chain.starts_with(&prefix));
            let remains = remaining.iter().any(|chain| chain.starts_with(&prefix));
            let (family, name) = table.split_once(' ').unwrap_or((table, ""));
            if !touched_table || remains {
                continue;
            }
            if run("nft", &["list", "table", family, name], None).is_ok() {
                if let Err(error) = run("nft", &["delete", "table", family, name], None) {
                    log::debug!("teardown: deleting empty table {table}: {error}");
                }
            }
        }
    }

    /// `-C`: whether `rule` is present (exit 1 means absent).
    fn check(&self, rule: &Rule) -> Result<bool, RulesError> {
        match self.change(rule, &["-C", rule.hook.iptables_name()]) {
            Ok(()) => Ok(true),
            Err(error) if is_missing_rule(&error) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Runs `<binary> -w 5 -t TABLE <command…> <rule spec>`.
    fn change(&self, rule: &Rule, command: &[&str]) -> Result<(), RulesError> {
        let comment = rule.comment();
        let spec = rule_spec(rule, &comment);
        let mut args: Vec<&str> = vec!["-w", LOCK_WAIT_SECS, "-t", rule.table.iptables_name()];
        args.extend_from_slice(command);
        args.extend(spec.iter().map(String::as_str));
        run(self.binary(rule.ip), &args, None).map(drop)
    }

    /// How many copies of `rule` its chain holds (lines of `-S CHAIN` with its comment).
    fn copies(&self, rule: &Rule) -> Result<usize, RulesError> {
        let output = run(
            self.binary(rule.ip),
            &[
                "-w",
                LOCK_WAIT_SECS,
                "-t",
                rule.table.iptables_name(),
                "-S",
                rule.hook.iptables_name(),
            ],
            None,
        )?;
        let needle = format!("--comment \"{}\"", rule.comment());
        Ok(output
            .stdout
            .lines()
            .filter(|line| line.contains(&needle))
            .count())
    }

    /// The binary for `ip`'s family in this flavour.
    fn binary(&self, ip: IpAddr) -> &'static str {
        match (self.flavour, ip.is_ipv4()) {
            (Flavour::Nft, true) => "iptables-nft",
            (Flavour::Nft, false) => "ip6tables-nft",
            (Flavour::Legacy, true) => "iptables-legacy",
            (Flavour::Legacy, false) => "ip6tables-legacy",
            (Flavour::Plain, true) => "iptables",
            (Flavour::Plain, false) => "ip6tables",
        }
    }
}

/// The match and target arguments of `rule`, tagged with `comment`.
fn rule_spec(rule: &Rule, comment: &str) -> Vec<String> {
    let protocol = rule.protocol.name();
    let (address, port) = match rule.side {
        Side::Destination => ("-d", "--dport"),
        Side::Source => ("-s", "--sport"),
    };
    let mut spec: Vec<String> = [
        "-p",
        protocol,
        address,
        &rule.ip.to_string(),
        port,
        &rule.port.to_string(),
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    if rule.action == Action::NotrackWhileSocket {
        spec.extend(["-m", "socket", "--nowildcard"].map(str::to_owned));
    }
    spec.extend(["-m", "comment", "--comment", comment].map(str::to_owned));
    let target = match &rule.action {
        Action::Notrack | Action::NotrackWhileSocket => "NOTRACK",
        Action::Accept => "ACCEPT",
        Action::Jump(chain) => chain.as_str(),
    };
    spec.extend(["-j", target].map(str::to_owned));
    debug_assert!(rule.table != Table::Nat || matches!(rule.action, Action::Jump(_)));
    spec
}

/// Whether iptables said the rule is not there (`-C`/`-D` exit status 1, "Bad rule").
fn is_missing_rule(error: &RulesError) -> bool {
    matches!(error, RulesError::Failed { status, .. } if status.code() == Some(1))
}

/// The iptables flavour the node uses, as kubernetes-sigs/iptables-wrappers decides it: only
/// one installed → that one; kubelet's hint chains in one flavour's mangle table → that one;
/// else the flavour holding more rules (`iptables-{legacy,nft}-save` plus the ip6tables ones),
/// nft on a tie; neither flavoured binary → plain `iptables`.
pub fn detect_flavour() -> Flavour {
    let nft = installed("iptables-nft");
    let legacy = installed("iptables-legacy");
    match (nft, legacy) {
        (false, false) => return Flavour::Plain,
        (true, false) => return Flavour::Nft,
        (false, true) => return Flavour::Legacy,
        (true, true) => {}
    }
    for (flavour, save) in [
        (Flavour::Nft, "iptables-nft-save"),
        (Flavour::Legacy, "iptables-legacy-save"),
    ] {
        let mangle = run(save, &["-t", "mangle"], None)
            .map(|output| output.stdout)
            .unwrap_or_default();
        if HINT_CHAINS.iter().any(|chain| mangle.contains(chain)) {
            return flavour;
        }
    }
    let count = |saves: [&str; 2]| -> usize {
        saves
            .iter()
            .map(|save| {
                run(save, &[], None)
                    .map(|output| output.stdout.lines().filter(|l| l.starts_with('-')).count())
                    .unwrap_or(0)
            })
            .sum()
    };
    let legacy_rules = count(["iptables-legacy-save", "ip6tables-legacy-save"]);
    let nft_rules = count(["iptables-nft-save", "ip6tables-nft-save"]);
    if legacy_rules > nft_rules {
        Flavour::Legacy
    } else {
        Flavour::Nft
    }
}

/// The base chains of iptables-nft's tables, as `"ip raw OUTPUT"`, from `nft list ruleset`;
/// `None` if `nft` cannot list it.
fn xtables_nft_chains() -> Option<Vec<String>> {
    let ruleset = run("nft", &["list", "ruleset"], None).ok()?.stdout;
    Some(parse_chains(&ruleset))
}

/// The chains of [`XTABLES_NFT_TABLES`] in `nft list ruleset` output.
fn parse_chains(ruleset: &str) -> Vec<String> {
    let mut chains = Vec::new();
    let mut table: Option<&str> = None;
    for line in ruleset.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("table ") {
            let name = rest.trim_end_matches('{').trim();
            table = XTABLES_NFT_TABLES
                .iter()
                .copied()
                .find(|known| *known == name);
        } else if let (Some(table), Some(rest)) = (table, line.strip_prefix("chain ")) {
            chains.push(format!("{table} {}", rest.trim_end_matches('{').trim()));
        }
    }
    chains
}

/// Whether an `nft list chain` listing is an empty accept-policy chain (only its header and
/// its base-chain line, `policy accept`).
fn chain_is_empty(listing: &str) -> bool {
    listing.contains("policy accept;")
        && listing.lines().map(str::trim).all(|line| {
            // nft prefixes iptables-nft's tables with a `# Warning: … managed by iptables-nft`.
            line.is_empty()
                || line.starts_with('#')
                || line == "}"
                || line.starts_with("table ")
                || line.starts_with("chain ")
                || line.starts_with("type ")
        })
}

/// Whether `program` is an executable in `$PATH` or the sbin directories.
fn installed(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(|dir| Path::new(dir).to_path_buf()))
        .any(|dir| dir.join(program).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::rules::rule_set;

    #[test]
    fn prerouting_spec_is_fail_open_and_tagged() {
        let rules = rule_set(&["169.254.20.10:53".parse().expect("addr")], 8080, None);
        let rule = &rules[1];
        let spec = rule_spec(rule, &rule.comment()).join(" ");
        assert_eq!(
            spec,
            "-p udp -d 169.254.20.10 --dport 53 -m socket --nowildcard -m comment --comment \
             ringdns raw/PREROUTING udp -d 169.254.20.10:53 -j NOTRACK"
        );
        let accept = rule_spec(&rules[3], &rules[3].comment()).join(" ");
        assert!(accept.ends_with("-j ACCEPT"), "{accept}");
        assert!(!accept.contains("socket"), "{accept}");
    }

    #[test]
    fn xtables_chains_are_parsed_from_the_ruleset() {
        let ruleset =
            "table ip raw {\n\tchain OUTPUT {\n\t\ttype filter hook output priority raw; \
                       policy accept;\n\t}\n}\ntable ip kube-proxy {\n\tchain services {\n\t}\n}\n\
                       table ip6 filter {\n\tchain INPUT {\n\t\tudp dport 53 accept\n\t}\n}\n";
        assert_eq!(parse_chains(ruleset), ["ip raw OUTPUT", "ip6 filter INPUT"]);
        assert!(chain_is_empty(
            "table ip raw {\n\tchain OUTPUT {\n\t\ttype filter hook output priority raw; \
             policy accept;\n\t}\n}\n"
        ));
        assert!(!chain_is_empty(
            "table ip6 filter {\n\tchain INPUT {\n\t\tudp dport 53 accept\n\t}\n}\n"
        ));
        assert!(!chain_is_empty(
            "table ip filter {\n\tchain INPUT {\n\t\ttype filter hook input priority filter; \
             policy drop;\n\t}\n}\n"
        ));
        assert!(!chain_is_empty(""));
    }

    #[test]
    fn fallback_spec_jumps_to_the_chain() {
        let rules = rule_set(
            &["169.254.20.10:53".parse().expect("addr")],
            8080,
            Some("KUBE-SVC-X"),
        );
        let jump = rules.last().expect("fallback rule");
        let spec = rule_spec(jump, &jump.comment()).join(" ");
        assert!(
            spec.starts_with("-p tcp -d 169.254.20.10 --dport 53 -m comment"),
            "{spec}"
        );
        assert!(spec.ends_with("-j KUBE-SVC-X"), "{spec}");
    }
}
