//! Node integration end to end on a simulated Kubernetes node: interface, NOTRACK rules that
//! fail open, sync, teardown; once with the iptables backend, once with nftables.
//!
//! Runs on: the test thread, which `enter_netns!` moves into a fresh namespace that plays the
//! node. Named namespaces (`ip netns add`, deleted in `Drop`) play the cluster DNS pod
//! ("coredns", knotd on 10.244.0.10:53) and three client pods joined to the node by veth:
//! pod1 resolves through 169.254.20.10, pod2 through the kube-dns ClusterIP 10.96.0.10, pod6
//! through fd00:10:96::a. kube-proxy is simulated by DNAT 10.96.0.10:53 → 10.244.0.10:53 in
//! the node (iptables nat chains, or an nft `table ip kube-proxy` so `rules = "auto"` picks
//! nftables). Answers are told apart by their flags: knotd answers AA=1 RA=0, ringdns clears
//! AA and sets RA.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sched::{setns, CloneFlags};

use crate::harness::auth::Authoritative;
use crate::harness::dig::{Dig, DigAnswer};
use crate::harness::ringdns::{Io, Ringdns, TestConfig};
use crate::harness::zones::{self, KUBE_DNS};
use crate::harness::{enter_netns, run_bounded, wait_for};

/// Bound on one `ip`/`iptables`/`nft`/`conntrack` invocation.
const TOOL_TIMEOUT: Duration = Duration::from_secs(15);
/// `node.sync_interval` in these tests.
const SYNC: Duration = Duration::from_secs(1);
/// The cluster DNS pod's address.
const COREDNS: &str = "10.244.0.10:53";
/// What ringdns listens on: the link-local IP, the kube-dns ClusterIP, an IPv6 listen IP.
const LISTEN: [&str; 3] = ["169.254.20.10:53", "10.96.0.10:53", "[fd00:10:96::a]:53"];
/// The simulated kube-proxy's kube-dns service chain (iptables), used as the fallback chain.
const SERVICE_CHAIN: &str = "KUBE-SVC-TESTKUBEDNS";
/// One rule deleted by hand in the sync check.
const DELETED_RULE: &str = "ringdns raw/PREROUTING udp -d 10.96.0.10:53";

/// Which rule backend a run exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// `rules = "auto"` on a node whose kube-proxy uses iptables.
    Iptables,
    /// `rules = "auto"` on a node whose kube-proxy uses nftables.
    Nftables,
}

#[test]
fn simulated_node_iptables() -> anyhow::Result<()> {
    simulated_node(Backend::Iptables, Io::Uring)
}

#[test]
fn simulated_node_nftables() -> anyhow::Result<()> {
    simulated_node(Backend::Nftables, Io::Epoll)
}

/// The whole scenario on `backend`.
fn simulated_node(backend: Backend, io: Io) -> anyhow::Result<()> {
    let name = format!("node::simulated_node_{backend:?}").to_lowercase();
    let _ns = enter_netns!(&name);
    for tool in ["conntrack", "iptables", "ip6tables", "nft", "dig", "knotd"] {
        if !installed(tool) {
            println!("SKIP {name}: {tool} is not installed");
            return Ok(());
        }
    }
    let tag = match backend {
        Backend::Iptables => "i",
        Backend::Nftables => "n",
    };
    let cluster = Cluster::build(tag)?;
    cluster.kube_proxy(backend)?;
    let coredns: SocketAddr = COREDNS.parse()?;
    let _knotd = cluster.inside("coredns", || {
        Authoritative::start_on(vec![zones::cluster_local()], coredns)
    })?;
    let before = snapshot()?;

    let listen: Vec<SocketAddr> = LISTEN.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    let base = TestConfig::for_tests(io)
        .listen(&listen)
        .forward("cluster.local", coredns)
        .node_key("setup_interface", "true")
        .node_key("sync_interval", "\"1s\"");

    // 1. Interface only, no rules: pod DNS is tracked (and pod2's ClusterIP query is DNATed
    //    to the coredns pod, as on a node without node-local DNS).
    let mut dns = Ringdns::start(&base.clone().node_key("setup_iptables", "false"))?;
    tool("conntrack", &["-F"]).ok();
    let answers = cluster.query_every_pod(false)?;
    ensure!(
        answers[0].ra() && !answers[0].aa(),
        "pod1 answered by ringdns"
    );
    ensure!(
        answers[1].aa(),
        "pod2 without rules goes through kube-proxy's DNAT"
    );
    let tracked = pod_conntrack()?;
    for pod in [POD1, POD2, POD6] {
        ensure!(
            tracked
                .iter()
                .any(|line| line.contains(&format!("src={pod} "))),
            "without ringdns' rules {pod}'s DNS must be tracked; conntrack:\n{}",
            tracked.join("\n")
        );
    }
    dns.stop()?;

    // 2. Interface and rules: every pod is answered by ringdns and nothing is tracked.
    let mut full = base.clone().node_key("setup_iptables", "true");
    if backend == Backend::Iptables {
        full = full.node_key("fallback_service_chain", &format!("{SERVICE_CHAIN:?}"));
    }
    let mut dns = Ringdns::start(&full)?;
    let expected = match backend {
        Backend::Iptables => 3 * 12 + 2,
        Backend::Nftables => 3 * 12,
    };
    ensure!(
        ringdns_rules(backend)? == expected,
        "want {expected} ringdns rules:\n{}",
        rule_listing(backend)?
    );
    tool("conntrack", &["-F"]).ok();
    for answer in cluster.query_every_pod(true)? {
        ensure!(
            answer.ra() && !answer.aa(),
            "answered by ringdns: {answer:?}"
        );
    }
    let tracked = pod_conntrack()?;
    ensure!(
        tracked.is_empty(),
        "pod DNS must not be tracked with ringdns' rules:\n{}",
        tracked.join("\n")
    );

    // 3. A rule and an address deleted by hand are back within a sync, never duplicated.
    delete_rule(backend, DELETED_RULE)?;
    tool(
        "ip",
        &["addr", "del", "10.96.0.10/32", "dev", "nodelocaldns"],
    )?;
    wait_for("deleted rule re-added", 3 * SYNC, SYNC / 10, || {
        Ok((copies(backend, DELETED_RULE)? == 1).then_some(()))
    })?;
    wait_for("deleted address re-added", 3 * SYNC, SYNC / 10, || {
        let addrs = tool("ip", &["-br", "addr", "show", "dev", "nodelocaldns"])?;
        Ok(addrs.contains("10.96.0.10/32").then_some(()))
    })?;
    std::thread::sleep(2 * SYNC + SYNC / 5);
    ensure!(
        copies(backend, DELETED_RULE)? == 1,
        "re-added rule duplicated"
    );
    ensure!(
        ringdns_rules(backend)? == expected,
        "rules duplicated by the sync:\n{}",
        rule_listing(backend)?
    );

    // 4. kill -9: the ClusterIP pod falls back to kube-proxy's DNAT (to knotd) at once. "At
    // once" counts from the kernel's release of the killed process's sockets: io_uring drops
    // its own references to them in a kernel worker a few ms after the process is reaped, and
    // until then the fail-open rules still see a listener (a query then is lost, and its 1 s
    // retry would make this flaky, not wrong).
    dns.kill9()?;
    let killed = Instant::now();
    wait_for(
        "the killed ringdns' sockets released",
        SYNC,
        SYNC / 100,
        || {
            let listeners = tool("ss", &["-Hlun", "sport = :53"])?;
            Ok((!listeners.contains("10.96.0.10:53")).then_some(()))
        },
    )?;
    let fallback = wait_for("ClusterIP resolves after kill -9", SYNC, SYNC / 20, || {
        let answer = cluster.dig("pod2", "10.96.0.10:53", false, "+time=1")?;
        Ok(answer.aa().then_some(answer))
    })?;
    println!(
        "{name}: ClusterIP answered by the coredns pod {:?} after kill -9",
        killed.elapsed()
    );
    ensure!(
        !fallback.rdata_of("A").is_empty(),
        "fallback answer has data"
    );
    if backend == Backend::Iptables {
        let answer = wait_for("link-local IP falls back too", SYNC, SYNC / 20, || {
            let answer = cluster.dig("pod1", "169.254.20.10:53", false, "+time=1")?;
            Ok(answer.aa().then_some(answer))
        })?;
        ensure!(
            !answer.rdata_of("A").is_empty(),
            "fallback_service_chain answer"
        );
    }

    // 5. Restarted, ringdns answers the ClusterIP again (it adopts the interface it left).
    //    This time it offers its sockets for hand-over.
    let run = tempfile::Builder::new().prefix("ringdns-run").tempdir()?;
    let handover = run.path().join("handover.sock");
    let full = full.node_key("handover", &format!("\"{}\"", handover.display()));
    let mut dns = Ringdns::start(&full)?;
    let answer = cluster.dig("pod2", "10.96.0.10:53", false, "+time=1")?;
    ensure!(
        answer.ra() && !answer.aa(),
        "answered by ringdns after restart"
    );
    ensure!(
        ringdns_rules(backend)? == expected,
        "no duplicates after restart"
    );

    // 5b. A successor takes the sockets over; the old instance stops without teardown, and
    //     the successor keeps answering every pod through the same interface and rules.
    let successor = Ringdns::start(&full)?;
    wait_for("the old instance handed over", 10 * SYNC, SYNC / 10, || {
        Ok(dns
            .stderr()
            .contains("handover: done; idle until stopped")
            .then_some(()))
    })?;
    dns.stop()?;
    ensure!(
        !dns.stderr().contains("teardown:"),
        "the old instance tore down after handing over:\n{}",
        dns.stderr()
    );
    ensure!(
        ringdns_rules(backend)? == expected,
        "rules kept and not duplicated across the hand-over:\n{}",
        rule_listing(backend)?
    );
    for answer in cluster.query_every_pod(true)? {
        ensure!(
            answer.ra() && !answer.aa(),
            "answered by the successor: {answer:?}"
        );
    }
    let mut dns = successor;

    // 6. Teardown restores the node exactly.
    dns.stop()?;
    let after = snapshot()?;
    if before != after {
        bail!(
            "teardown did not restore the node:\n{}",
            diff(&before, &after)
        );
    }
    Ok(())
}

/// pod1's address.
const POD1: &str = "10.0.1.2";
/// pod2's address.
const POD2: &str = "10.0.2.2";
/// pod6's address.
const POD6: &str = "fd00:1::2";

/// The named namespaces of one test; deleted (with their veth ends) on drop.
#[derive(Debug)]
struct Cluster {
    /// Prefix making the names unique per process and backend.
    prefix: String,
    /// Namespaces created so far (suffixes).
    created: Vec<&'static str>,
}

impl Cluster {
    /// Creates coredns, pod1, pod2 and pod6, each joined to the node by a veth pair.
    fn build(tag: &str) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster {
            prefix: format!("rdns{}{tag}", std::process::id()),
            created: Vec::new(),
        };
        tool("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        tool("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
        tool("sysctl", &["-qw", "net.ipv6.conf.default.accept_dad=0"])?;
        // (namespace, node-side veth, node address, pod address, gateway)
        let links: [(&'static str, &str, &str, &str, &str); 4] = [
            (
                "coredns",
                "rd-c",
                "10.244.0.1/24",
                "10.244.0.10/24",
                "10.244.0.1",
            ),
            ("pod1", "rd-p1", "10.0.1.1/24", "10.0.1.2/24", "10.0.1.1"),
            ("pod2", "rd-p2", "10.0.2.1/24", "10.0.2.2/24", "10.0.2.1"),
            ("pod6", "rd-p6", "fd00:1::1/64", "fd00:1::2/64", "fd00:1::1"),
        ];
        for (suffix, veth, node_addr, pod_addr, gateway) in links {
            let ns = cluster.name(suffix);
            tool("ip", &["netns", "add", &ns])?;
            cluster.created.push(suffix);
            tool(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            )?;
            tool(
                "ip",
                &[
                    "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            tool("ip", &["addr", "add", node_addr, "dev", veth, "nodad"])?;
            tool("ip", &["link", "set", veth, "up"])?;
            tool(
                "ip",
                &["-n", &ns, "addr", "add", pod_addr, "dev", "eth0", "nodad"],
            )?;
            tool("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            tool("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            tool(
                "ip",
                &["-n", &ns, "route", "add", "default", "via", gateway],
            )?;
        }
        Ok(cluster)
    }

    /// The full namespace name for `suffix`.
    fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    /// Installs the simulated kube-proxy DNAT for the ClusterIP in the node.
    fn kube_proxy(&self, backend: Backend) -> anyhow::Result<()> {
        match backend {
            Backend::Iptables => {
                let nat = |args: &[&str]| -> anyhow::Result<()> {
                    let mut all = vec!["-w", "5", "-t", "nat"];
                    all.extend_from_slice(args);
                    tool("iptables", &all).map(drop)
                };
                nat(&["-N", "KUBE-SERVICES"])?;
                nat(&["-N", SERVICE_CHAIN])?;
                for protocol in ["udp", "tcp"] {
                    nat(&[
                        "-A",
                        SERVICE_CHAIN,
                        "-p",
                        protocol,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        COREDNS,
                    ])?;
                    nat(&[
                        "-A",
                        "KUBE-SERVICES",
                        "-d",
                        "10.96.0.10/32",
                        "-p",
                        protocol,
                        "--dport",
                        "53",
                        "-j",
                        SERVICE_CHAIN,
                    ])?;
                }
                nat(&["-A", "PREROUTING", "-j", "KUBE-SERVICES"])?;
                nat(&["-A", "OUTPUT", "-j", "KUBE-SERVICES"])?;
                // Dual-stack kube-proxy drops invalid forwarded IPv6 packets; the conntrack
                // match makes the kernel track IPv6 connections in this namespace.
                let forward = |args: &[&str]| -> anyhow::Result<()> {
                    let mut all = vec!["-w", "5", "-t", "filter"];
                    all.extend_from_slice(args);
                    tool("ip6tables", &all).map(drop)
                };
                forward(&["-N", "KUBE-FORWARD"])?;
                forward(&[
                    "-A",
                    "KUBE-FORWARD",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "INVALID",
                    "-j",
                    "DROP",
                ])?;
                forward(&["-A", "FORWARD", "-j", "KUBE-FORWARD"])?;
            }
            Backend::Nftables => {
                let dir = tempfile::tempdir()?;
                let path = dir.path().join("kube-proxy.nft");
                std::fs::write(
                    &path,
                    format!(
                        "table ip kube-proxy {{\n\
                         chain services {{\n\
                         ip daddr 10.96.0.10 udp dport 53 dnat to {COREDNS}\n\
                         ip daddr 10.96.0.10 tcp dport 53 dnat to {COREDNS}\n}}\n\
                         chain nat-prerouting {{ type nat hook prerouting priority dstnat; \
                         policy accept; jump services; }}\n\
                         chain nat-output {{ type nat hook output priority -100; \
                         policy accept; jump services; }}\n}}\n\
                         table ip6 kube-proxy {{\n\
                         chain filter-forward {{ type filter hook forward priority -110; \
                         policy accept; ct state invalid drop; }}\n}}\n"
                    ),
                )?;
                tool("nft", &["-f", &path.display().to_string()])?;
            }
        }
        Ok(())
    }

    /// Runs `body` with the thread inside namespace `suffix` (children it starts stay there),
    /// then moves the thread back to the node.
    fn inside<T>(
        &self,
        suffix: &str,
        body: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let node = File::open("/proc/thread-self/ns/net").context("opening the node netns")?;
        let target = Path::new("/run/netns").join(self.name(suffix));
        let target = File::open(&target).with_context(|| format!("opening {target:?}"))?;
        setns(&target, CloneFlags::CLONE_NEWNET).context("entering the pod namespace")?;
        let result = body();
        setns(&node, CloneFlags::CLONE_NEWNET).context("back to the node namespace")?;
        result
    }

    /// `dig` from pod `suffix` to `server` for kube-dns's A record.
    fn dig(
        &self,
        suffix: &str,
        server: &str,
        tcp: bool,
        option: &str,
    ) -> anyhow::Result<DigAnswer> {
        let server: SocketAddr = server.parse()?;
        self.inside(suffix, || {
            let mut dig = Dig::new(server, KUBE_DNS, "A").option(option);
            if tcp {
                dig = dig.tcp();
            }
            dig.run()
        })
    }

    /// pod1 → 169.254.20.10, pod2 → 10.96.0.10, pod6 → fd00:10:96::a, over UDP (and, with
    /// `tcp`, also over TCP from pod2 and pod6: the fail-open socket match must let the whole
    /// handshake through). Returns the UDP answers in that order.
    fn query_every_pod(&self, tcp: bool) -> anyhow::Result<Vec<DigAnswer>> {
        let targets = [
            ("pod1", LISTEN[0]),
            ("pod2", LISTEN[1]),
            ("pod6", LISTEN[2]),
        ];
        let mut answers = Vec::new();
        for (pod, server) in targets {
            let answer = self.dig(pod, server, false, "+time=2")?;
            ensure!(
                !answer.rdata_of("A").is_empty(),
                "{pod} → {server}: {answer:?}"
            );
            answers.push(answer);
        }
        if tcp {
            for (pod, server) in &targets[1..] {
                let answer = self.dig(pod, server, true, "+time=2")?;
                ensure!(
                    answer.ra() && !answer.aa() && !answer.rdata_of("A").is_empty(),
                    "{pod} → {server} over TCP answered by ringdns: {answer:?}"
                );
            }
        }
        Ok(answers)
    }
}

impl Drop for Cluster {
    /// Deletes the namespaces (their veth ends go with them, and so do the node's).
    fn drop(&mut self) {
        for suffix in self.created.iter().rev() {
            let name = self.name(suffix);
            if let Err(error) = tool("ip", &["netns", "del", &name]) {
                eprintln!("deleting netns {name}: {error:#}");
            }
        }
    }
}

/// Runs `program args` in the node namespace; its stdout, or an error with its stderr.
fn tool(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = run_bounded(Command::new(program).args(args), TOOL_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether `program` is in `$PATH` or an sbin directory.
fn installed(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .any(|dir| dir.join(program).is_file())
}

/// The node's conntrack entries for DNS from the pods (IPv4 and IPv6).
fn pod_conntrack() -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for family in ["ipv4", "ipv6"] {
        let listing = tool("conntrack", &["-L", "-f", family])?;
        lines.extend(
            listing
                .lines()
                .filter(|line| line.contains("dport=53"))
                .filter(|line| {
                    [POD1, POD2, POD6]
                        .iter()
                        .any(|pod| line.contains(&format!("src={pod} ")))
                })
                .map(str::to_owned),
        );
    }
    Ok(lines)
}

/// Every rule line of the backend's rule set.
fn rule_listing(backend: Backend) -> anyhow::Result<String> {
    Ok(match backend {
        Backend::Iptables => tool("iptables-save", &[])? + &tool("ip6tables-save", &[])?,
        Backend::Nftables => tool("nft", &["list", "ruleset"])?,
    })
}

/// How many rules carry a ringdns comment.
fn ringdns_rules(backend: Backend) -> anyhow::Result<usize> {
    let needle = match backend {
        Backend::Iptables => "--comment \"ringdns ",
        Backend::Nftables => "comment \"ringdns ",
    };
    Ok(rule_listing(backend)?.matches(needle).count())
}

/// How many copies of the rule with `comment` exist.
fn copies(backend: Backend, comment: &str) -> anyhow::Result<usize> {
    let needle = format!("comment \"{comment}\"");
    Ok(rule_listing(backend)?.matches(&needle).count())
}

/// Deletes the rule with `comment` by hand (raw PREROUTING / nft chain prerouting).
fn delete_rule(backend: Backend, comment: &str) -> anyhow::Result<()> {
    let needle = format!("comment \"{comment}\"");
    match backend {
        Backend::Iptables => {
            let listing = tool("iptables", &["-w", "5", "-t", "raw", "-S", "PREROUTING"])?;
            let number = listing
                .lines()
                .filter(|line| line.starts_with("-A "))
                .position(|line| line.contains(&needle))
                .context("rule to delete not found")?
                + 1;
            let number = number.to_string();
            tool(
                "iptables",
                &["-w", "5", "-t", "raw", "-D", "PREROUTING", &number],
            )?;
        }
        Backend::Nftables => {
            let listing = tool(
                "nft",
                &["-a", "list", "chain", "inet", "ringdns", "prerouting"],
            )?;
            let handle = listing
                .lines()
                .find(|line| line.contains(&needle))
                .and_then(|line| line.rsplit("# handle ").next())
                .context("rule to delete not found")?
                .trim()
                .to_owned();
            tool(
                "nft",
                &[
                    "delete",
                    "rule",
                    "inet",
                    "ringdns",
                    "prerouting",
                    "handle",
                    &handle,
                ],
            )?;
        }
    }
    ensure!(copies(backend, comment)? == 0, "rule deleted by hand");
    Ok(())
}

/// The node's interfaces, addresses and rule sets, normalized (no counters, timestamps or
/// address lifetimes), for comparing before and after.
fn snapshot() -> anyhow::Result<String> {
    let mut out = String::new();
    out += &tool("ip", &["-d", "link"])?;
    for line in tool("ip", &["addr"])?.lines() {
        if !line.contains("valid_lft") {
            out += &line.replace(" tentative", "");
            out.push('\n');
        }
    }
    for save in ["iptables-save", "ip6tables-save"] {
        for line in tool(save, &[])?.lines() {
            if line.starts_with('#') {
                continue;
            }
            // Chain counters `[packets:bytes]`.
            let line = match line.find(" [") {
                Some(at) if line.starts_with(':') => &line[..at],
                _ => line,
            };
            out += line;
            out.push('\n');
        }
    }
    for line in tool("nft", &["list", "ruleset"])?.lines() {
        // Rule counters `counter packets N bytes M`.
        match line.find("counter packets ") {
            Some(at) => {
                out += &line[..at];
                out += "counter";
                let rest = &line[at..];
                if let Some(end) = rest.find(" bytes ") {
                    let after = &rest[end + " bytes ".len()..];
                    out += after.trim_start_matches(|c: char| c.is_ascii_digit());
                }
            }
            None => out += line,
        }
        out.push('\n');
    }
    Ok(out)
}

/// Lines only in `before` (`-`) or only in `after` (`+`).
fn diff(before: &str, after: &str) -> String {
    let mut out = String::new();
    for line in before
        .lines()
        .filter(|line| !after.lines().any(|l| l == *line))
    {
        out += &format!("- {line}\n");
    }
    for line in after
        .lines()
        .filter(|line| !before.lines().any(|l| l == *line))
    {
        out += &format!("+ {line}\n");
    }
    out
}
