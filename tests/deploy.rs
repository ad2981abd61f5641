//! The deployment files agree with the binary and with each other: the configuration in
//! `deploy/ringdns.yaml`'s ConfigMap passes `ringdns check` once its placeholders are filled
//! (with test values, and with deploy/README.md's sed commands for both kube-proxy modes), a broken
//! copy fails naming the file and line, and the config path, health address, probe paths,
//! metrics port and stop timeouts agree across `systemd/ringdns.service`, `deploy/Dockerfile`
//! and `deploy/ringdns.yaml`. For zero-gap upgrades the DaemonSet surges one node at a time
//! with no unavailable pod, declares no container port (a hostPort would keep the surge pod off
//! the node), and mounts the directory of `node.handover` from the host at the same path; the
//! guide's sed command for the first rollout turns the surge off and changes nothing else.
//!
//! Runs on: the test thread. The YAML is read as text, without a YAML parser: the ConfigMap's
//! `config.toml: |` block is found and dedented, other values are read from the indented block
//! under their key. `ringdns check` prints the effective configuration, which is parsed as TOML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context};

/// node-cache's link-local address (`__PILLAR__LOCAL__DNS__`).
const LOCAL_DNS: &str = "169.254.20.10";

/// A kube-dns ClusterIP (`__PILLAR__DNS__SERVER__`).
const DNS_SERVER: &str = "10.96.0.10";

/// The cluster domain (`__PILLAR__DNS__DOMAIN__`).
const DNS_DOMAIN: &str = "cluster.local";

/// A kube-dns-upstream ClusterIP (`__PILLAR__CLUSTER__DNS__`, or the value of
/// `KUBE_DNS_UPSTREAM_SERVICE_HOST`).
const CLUSTER_DNS: &str = "10.96.0.11";

/// The nameserver of the stand-in for the node's resolv.conf.
const NODE_NAMESERVER: &str = "192.0.2.53";

/// The environment variable Kubernetes sets for the kube-dns-upstream Service.
const UPSTREAM_SERVICE_HOST: &str = "KUBE_DNS_UPSTREAM_SERVICE_HOST";

/// The sed command of deploy/README.md for one kube-proxy mode: the documented line that starts
/// like node-cache's and contains `marker` (so the test runs exactly what operators copy).
fn documented_sed(marker: &str) -> anyhow::Result<String> {
    let guide = repo_file("deploy/README.md")?;
    let mut found = guide.lines().filter(|line| {
        line.starts_with("sed -i \"s/__PILLAR__LOCAL__DNS__/") && line.contains(marker)
    });
    let command = found
        .next()
        .with_context(|| format!("no sed command containing {marker:?} in deploy/README.md"))?;
    anyhow::ensure!(
        found.next().is_none(),
        "more than one sed command containing {marker:?} in deploy/README.md"
    );
    Ok(command.to_string())
}

/// kube-proxy in iptables or nftables mode: node-cache's sed, plus the cluster DNS as the
/// Service's environment variable (node-cache fills that one itself).
const IPTABLES_MODE_MARKER: &str = "s/__PILLAR__DNS__SERVER__/$kubedns/g";

/// kube-proxy in IPVS mode: listen on the link-local address only and forward the cluster
/// zones to the kube-dns ClusterIP.
const IPVS_MODE_MARKER: &str = r#"s/, \"__PILLAR__DNS__SERVER__:53\"//g"#;

/// A file of the repository, as text.
fn repo_file(relative: &str) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Indentation of `line`, in spaces.
fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The YAML documents of `text` (split at `---` lines).
fn documents(text: &str) -> Vec<&str> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            documents.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    documents.push(&text[start..]);
    documents
}

/// The one document of `yaml` whose top-level `kind:` is `kind`.
fn document<'a>(yaml: &'a str, kind: &str) -> anyhow::Result<&'a str> {
    let found: Vec<&str> = documents(yaml)
        .into_iter()
        .filter(|document| document.lines().any(|line| line == format!("kind: {kind}")))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        other => bail!("expected one {kind}, found {}", other.len()),
    }
}

/// The one document of `yaml` whose top-level `kind:` is `kind` and whose `metadata.name` is
/// `name` (the manifest has two Services).
fn named_document<'a>(yaml: &'a str, kind: &str, name: &str) -> anyhow::Result<&'a str> {
    let found: Vec<&str> = documents(yaml)
        .into_iter()
        .filter(|document| document.lines().any(|line| line == format!("kind: {kind}")))
        .filter(|document| {
            let lines: Vec<&str> = document.lines().collect();
            block(&lines, "metadata:")
                .and_then(|metadata| value(&metadata, "name").map(|found| found == name))
                .unwrap_or(false)
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        other => bail!("expected one {kind} {name}, found {}", other.len()),
    }
}

/// The lines under the first of `lines` that reads `key` (after indentation and an optional
/// list dash): every following line indented deeper, and for a key whose value is a list
/// written at its own indentation, that list; blank and comment lines do not end it.
fn block<'a>(lines: &[&'a str], key: &str) -> anyhow::Result<Vec<&'a str>> {
    let start = lines
        .iter()
        .position(|line| line.trim_start().trim_start_matches("- ") == key)
        .with_context(|| format!("no line `{key}`"))?;
    let depth = indent(lines[start]);
    Ok(lines[start + 1..]
        .iter()
        .copied()
        .take_while(|line| {
            line.trim().is_empty()
                || line.trim_start().starts_with('#')
                || indent(line) > depth
                || (indent(line) == depth && line.trim_start().starts_with("- "))
        })
        .collect())
}

/// The items of the YAML list `lines` (as [`block`] returns it), each its own lines.
fn items<'a>(lines: &[&'a str]) -> Vec<Vec<&'a str>> {
    let Some(depth) = lines
        .iter()
        .find(|line| !line.trim().is_empty())
        .map(|line| indent(line))
    else {
        return Vec::new();
    };
    let mut items: Vec<Vec<&str>> = Vec::new();
    for &line in lines {
        let starts_item = indent(line) == depth && line.trim_start().starts_with("- ");
        match items.last_mut() {
            Some(item) if !starts_item => item.push(line),
            _ => items.push(vec![line]),
        }
    }
    items
}

/// The item of the list under `key` in `lines` whose `name:` is `name`.
fn named_item<'a>(lines: &[&'a str], key: &str, name: &str) -> anyhow::Result<Vec<&'a str>> {
    let found: Vec<Vec<&str>> = items(&block(lines, key)?)
        .into_iter()
        .filter(|item| value(item, "name").is_ok_and(|value| value == name))
        .collect();
    match <[_; 1]>::try_from(found) {
        Ok([item]) => Ok(item),
        Err(found) => bail!("want one `{name}` under `{key}`, found {}", found.len()),
    }
}

/// The value of the first `key: value` line among `lines` (list dash and quotes removed).
fn value<'a>(lines: &[&'a str], key: &str) -> anyhow::Result<&'a str> {
    let prefix = format!("{key}:");
    lines
        .iter()
        .map(|line| line.trim().trim_start_matches("- "))
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map(|rest| rest.trim().trim_matches('"'))
        .with_context(|| format!("no `{key}:` in {lines:?}"))
}

/// The text of the block scalar `key: |` in `yaml`, dedented, as the file it stands for: the
/// lines after it that are blank or indented deeper than `key`.
fn literal_block(yaml: &str, key: &str) -> anyhow::Result<String> {
    let header = format!("{key}: |");
    let mut lines = yaml.lines();
    let depth = lines
        .by_ref()
        .find(|line| line.trim() == header)
        .map(indent)
        .with_context(|| format!("no `{header}`"))?;
    let body: Vec<&str> = lines
        .take_while(|line| line.trim().is_empty() || indent(line) > depth)
        .collect();
    let text_depth = body
        .iter()
        .find(|line| !line.trim().is_empty())
        .map(|line| indent(line))
        .with_context(|| format!("`{header}` is empty"))?;
    let mut text = String::new();
    for line in &body {
        if !line.trim().is_empty() {
            ensure!(
                indent(line) >= text_depth,
                "less indented than its block: {line:?}"
            );
            text.push_str(&line[text_depth..]);
        }
        text.push('\n');
    }
    Ok(text.trim_end().to_owned() + "\n")
}

/// The ConfigMap's config file as written, placeholders included.
fn config_map_config(yaml: &str) -> anyhow::Result<String> {
    literal_block(document(yaml, "ConfigMap")?, "config.toml")
}

/// The placeholders and their test values; `cluster_dns` for the cluster zones' upstream.
fn test_values(cluster_dns: &str) -> [(&'static str, &str); 4] {
    [
        ("__PILLAR__LOCAL__DNS__", LOCAL_DNS),
        ("__PILLAR__DNS__SERVER__", DNS_SERVER),
        ("__PILLAR__DNS__DOMAIN__", DNS_DOMAIN),
        ("__PILLAR__CLUSTER__DNS__", cluster_dns),
    ]
}

/// `text` with every placeholder but `left` filled with the test values; `cluster_dns` for the
/// cluster zones' upstream.
fn fill_but(text: &str, cluster_dns: &str, left: Option<&str>) -> String {
    test_values(cluster_dns)
        .iter()
        .filter(|(placeholder, _)| Some(*placeholder) != left)
        .fold(text.to_owned(), |text, (placeholder, value)| {
            text.replace(placeholder, value)
        })
}

/// `text` with every placeholder filled with the test values; `cluster_dns` for the cluster
/// zones' upstream.
fn fill(text: &str, cluster_dns: &str) -> String {
    fill_but(text, cluster_dns, None)
}

/// The placeholders (`__PILLAR__NAME__`) left in `text`.
fn placeholders(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    for (start, _) in text.match_indices("__PILLAR__") {
        let rest = &text[start + "__PILLAR__".len()..];
        let name = rest
            .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .map_or(rest, |end| &rest[..end]);
        if name.len() > 2 && name.ends_with("__") {
            found.push(&text[start..start + "__PILLAR__".len() + name.len()]);
        }
    }
    found
}

/// A scratch directory with a stand-in for the node's resolv.conf.
struct Scratch {
    /// Removed on drop.
    dir: tempfile::TempDir,
}

impl Scratch {
    /// Creates the directory and `resolv.conf` (one nameserver, [`NODE_NAMESERVER`]).
    fn new() -> anyhow::Result<Scratch> {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        std::fs::write(
            dir.path().join("resolv.conf"),
            format!("nameserver {NODE_NAMESERVER}\n"),
        )?;
        Ok(Scratch { dir })
    }

    /// Writes `config` as `config.toml`, its `/etc/resolv.conf` pointing at the stand-in (so
    /// the result does not depend on this machine's resolvers), and returns its path.
    fn config(&self, config: &str) -> anyhow::Result<PathBuf> {
        ensure!(
            config.contains("\"/etc/resolv.conf\""),
            "the . zone no longer forwards to /etc/resolv.conf:\n{config}"
        );
        let resolv = self.dir.path().join("resolv.conf");
        let text = config.replace("\"/etc/resolv.conf\"", &format!("\"{}\"", resolv.display()));
        let path = self.dir.path().join("config.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// Runs `ringdns check --config path` with `upstream_host` as KUBE_DNS_UPSTREAM_SERVICE_HOST
/// (unset with `None`).
fn check(path: &Path, upstream_host: Option<&str>) -> anyhow::Result<Output> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringdns"));
    command.arg("check").arg("--config").arg(path);
    match upstream_host {
        Some(host) => command.env(UPSTREAM_SERVICE_HOST, host),
        None => command.env_remove(UPSTREAM_SERVICE_HOST),
    };
    command.output().context("running ringdns check")
}

/// The effective configuration `ringdns check` printed for the valid file at `path`.
fn effective(path: &Path, upstream_host: Option<&str>) -> anyhow::Result<toml::Table> {
    let output = check(path, upstream_host)?;
    ensure!(
        output.status.success(),
        "ringdns check {} failed: {}\n{}",
        path.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).context("check output is not UTF-8")?;
    toml::from_str(&text).with_context(|| format!("parsing the effective config:\n{text}"))
}

/// The error `ringdns check` printed for the invalid file at `path`.
fn rejection(path: &Path, upstream_host: Option<&str>) -> anyhow::Result<String> {
    let output = check(path, upstream_host)?;
    ensure!(
        !output.status.success(),
        "ringdns check accepted {}:\n{}",
        path.display(),
        std::fs::read_to_string(path)?
    );
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The value at the dotted `path` of `table` (`[[forward]]` entries by index: `forward.0`).
fn at<'a>(table: &'a toml::Table, path: &str) -> anyhow::Result<&'a toml::Value> {
    let mut parts = path.split('.');
    let first = parts.next().context("empty path")?;
    let mut current = table.get(first).with_context(|| format!("no {first}"))?;
    for part in parts {
        current = match part.parse::<usize>() {
            Ok(index) => current.get(index),
            Err(_) => current.get(part),
        }
        .with_context(|| format!("no {path} in {table}"))?;
    }
    Ok(current)
}

/// The strings of the array at `path`.
fn strings(table: &toml::Table, path: &str) -> anyhow::Result<Vec<String>> {
    at(table, path)?
        .as_array()
        .with_context(|| format!("{path} is not an array"))?
        .iter()
        .map(|item| item.as_str().map(str::to_owned).context("not a string"))
        .collect()
}

/// The string at `path`.
fn string<'a>(table: &'a toml::Table, path: &str) -> anyhow::Result<&'a str> {
    at(table, path)?
        .as_str()
        .with_context(|| format!("{path} is not a string"))
}

/// Asserts the four zones of node-cache's Corefile, the cluster ones to `cluster_upstream`.
fn assert_node_cache_zones(config: &toml::Table, cluster_upstream: &str) -> anyhow::Result<()> {
    let zones = at(config, "forward")?
        .as_array()
        .context("forward is not an array")?
        .len();
    assert_eq!(zones, 4, "cluster domain, in-addr.arpa, ip6.arpa and .");
    for (index, zone) in ["cluster.local.", "in-addr.arpa.", "ip6.arpa."]
        .into_iter()
        .enumerate()
    {
        assert_eq!(string(config, &format!("forward.{index}.zone"))?, zone);
        assert_eq!(
            strings(config, &format!("forward.{index}.upstreams"))?,
            [cluster_upstream],
            "{zone}"
        );
        assert_eq!(
            string(config, &format!("forward.{index}.transport"))?,
            "tcp",
            "{zone}: node-cache's force_tcp"
        );
    }
    assert_eq!(string(config, "forward.3.zone")?, ".");
    assert_eq!(
        strings(config, "forward.3.upstreams")?,
        [format!("{NODE_NAMESERVER}:53")],
        "the node's resolv.conf"
    );
    assert_eq!(string(config, "forward.3.transport")?, "udp");
    Ok(())
}

/// Runs deploy/README.md's sed `command` on a copy of `deploy/ringdns.yaml` and returns the result.
fn sed_filled_manifest(scratch: &Scratch, command: &str) -> anyhow::Result<String> {
    let manifest = scratch.dir.path().join("ringdns.yaml");
    std::fs::write(&manifest, repo_file("deploy/ringdns.yaml")?)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(scratch.dir.path())
        .env("localdns", LOCAL_DNS)
        .env("domain", DNS_DOMAIN)
        .env("kubedns", DNS_SERVER)
        .status()
        .context("running sh")?;
    ensure!(status.success(), "{command}: {status}");
    let filled = std::fs::read_to_string(&manifest)?;
    let left = placeholders(&filled);
    ensure!(left.is_empty(), "{left:?} left after {command}");
    Ok(filled)
}

/// The argument after `--config` in `words`.
fn config_argument<'a>(words: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut words = words.into_iter();
    words.by_ref().find(|word| *word == "--config")?;
    words.next()
}

/// A duration of the form `30`, `30s` or `2m`, in seconds.
fn seconds(text: &str) -> anyhow::Result<u64> {
    let (number, unit) = match text.strip_suffix('m') {
        Some(number) => (number, 60),
        None => (text.strip_suffix('s').unwrap_or(text), 1),
    };
    Ok(number
        .parse::<u64>()
        .with_context(|| format!("duration {text:?}"))?
        * unit)
}

#[test]
fn config_map_config_passes_check_once_filled() -> anyhow::Result<()> {
    let config = config_map_config(&repo_file("deploy/ringdns.yaml")?)?;
    let filled = fill(&config, CLUSTER_DNS);
    assert_eq!(placeholders(&filled), [""; 0], "unknown placeholders");
    let mut names = placeholders(&config);
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names,
        [
            "__PILLAR__CLUSTER__DNS__",
            "__PILLAR__DNS__DOMAIN__",
            "__PILLAR__DNS__SERVER__",
            "__PILLAR__LOCAL__DNS__"
        ],
        "node-cache's four, each filled by deploy/README.md's sed"
    );
    let scratch = Scratch::new()?;
    let effective = effective(&scratch.config(&filled)?, None)?;
    assert_eq!(
        strings(&effective, "server.listen")?,
        [format!("{LOCAL_DNS}:53"), format!("{DNS_SERVER}:53")]
    );
    assert_node_cache_zones(&effective, &format!("{CLUSTER_DNS}:53"))?;
    assert_eq!(
        string(&effective, "health.listen")?,
        format!("{LOCAL_DNS}:8080")
    );
    assert_eq!(string(&effective, "metrics.listen")?, "0.0.0.0:9253");
    for key in ["setup_interface", "setup_iptables", "teardown"] {
        assert_eq!(
            at(&effective, &format!("node.{key}"))?.as_bool(),
            Some(true),
            "node.{key}"
        );
    }
    Ok(())
}

#[test]
fn unknown_key_in_config_map_config_fails_naming_file_and_line() -> anyhow::Result<()> {
    let config = fill(
        &config_map_config(&repo_file("deploy/ringdns.yaml")?)?,
        CLUSTER_DNS,
    );
    let after = config
        .lines()
        .position(|line| line == "[server]")
        .context("no [server] in the ConfigMap config")?;
    let mut lines: Vec<&str> = config.lines().collect();
    lines.insert(after + 1, "bogus_knob = 1");
    let scratch = Scratch::new()?;
    let path = scratch.config(&(lines.join("\n") + "\n"))?;
    let error = rejection(&path, None)?;
    let expected = format!("{}:{}: server.bogus_knob", path.display(), after + 2);
    assert!(error.contains(&expected), "want {expected:?} in {error:?}");
    Ok(())
}

/// Fills every placeholder of the ConfigMap config but `left`, runs `ringdns check` on it and
/// returns the error and the `file:line` where `left` stands.
fn rejection_with_placeholder_left(left: &str) -> anyhow::Result<(String, String)> {
    let config = config_map_config(&repo_file("deploy/ringdns.yaml")?)?;
    let line = config
        .lines()
        .position(|line| line.contains(left))
        .with_context(|| format!("no {left} in the ConfigMap config"))?
        + 1;
    let partly = fill_but(&config, CLUSTER_DNS, Some(left));
    let scratch = Scratch::new()?;
    let path = scratch.config(&partly)?;
    let error = rejection(&path, None)?;
    Ok((error, format!("{}:{line}", path.display())))
}

#[test]
fn placeholder_left_in_config_map_config_fails_naming_its_line() -> anyhow::Result<()> {
    let (error, at) = rejection_with_placeholder_left("__PILLAR__DNS__SERVER__")?;
    let expected = format!("{at}: server.listen");
    assert!(error.contains(&expected), "want {expected:?} in {error:?}");
    Ok(())
}

#[test]
fn domain_placeholder_left_in_config_map_config_fails_naming_its_line() -> anyhow::Result<()> {
    let (error, at) = rejection_with_placeholder_left("__PILLAR__DNS__DOMAIN__")?;
    let expected = format!("{at}: forward[0].zone");
    assert!(
        error.contains(&expected) && error.contains("unfilled placeholder"),
        "want {expected:?} and the reason in {error:?}"
    );
    Ok(())
}

#[test]
fn iptables_mode_sed_forwards_to_the_upstream_service_from_the_environment() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let manifest = sed_filled_manifest(&scratch, &documented_sed(IPTABLES_MODE_MARKER)?)?;
    let path = scratch.config(&config_map_config(&manifest)?)?;
    let effective = effective(&path, Some(CLUSTER_DNS))?;
    assert_eq!(
        strings(&effective, "server.listen")?,
        [format!("{LOCAL_DNS}:53"), format!("{DNS_SERVER}:53")]
    );
    assert_node_cache_zones(&effective, &format!("{CLUSTER_DNS}:53"))?;
    let error = rejection(&path, None)?;
    assert!(
        error.contains(UPSTREAM_SERVICE_HOST) && error.contains(&format!("{}:", path.display())),
        "want the variable and file named in {error:?}"
    );
    Ok(())
}

#[test]
fn ipvs_mode_sed_listens_on_the_link_local_address_only() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let manifest = sed_filled_manifest(&scratch, &documented_sed(IPVS_MODE_MARKER)?)?;
    let effective = effective(&scratch.config(&config_map_config(&manifest)?)?, None)?;
    assert_eq!(
        strings(&effective, "server.listen")?,
        [format!("{LOCAL_DNS}:53")]
    );
    assert_node_cache_zones(&effective, &format!("{DNS_SERVER}:53"))?;
    Ok(())
}

#[test]
fn config_path_is_the_config_map_mount_everywhere() -> anyhow::Result<()> {
    let yaml = repo_file("deploy/ringdns.yaml")?;
    let daemon_set = document(&yaml, "DaemonSet")?;
    for line in daemon_set.lines() {
        let key = line.trim().trim_start_matches("- ");
        assert!(
            !key.starts_with("command:") && !key.starts_with("args:"),
            "the DaemonSet must run the image's ENTRYPOINT as it is: {line}"
        );
    }
    let lines: Vec<&str> = daemon_set.lines().collect();
    let mount = named_item(&lines, "volumeMounts:", "config-volume")?;
    let volume = named_item(&lines, "volumes:", "config-volume")?;
    let config_map: Vec<&str> = document(&yaml, "ConfigMap")?.lines().collect();
    assert_eq!(
        value(&block(&volume, "configMap:")?, "name")?,
        value(&block(&config_map, "metadata:")?, "name")?,
        "the volume is the ConfigMap"
    );
    let files = items(&block(&volume, "items:")?);
    let [file] = files.as_slice() else {
        bail!(
            "want the one config file in the volume's items, found {}",
            files.len()
        );
    };
    assert_eq!(value(file, "key")?, "config.toml", "the ConfigMap key");
    let mounted = format!("{}/{}", value(&mount, "mountPath")?, value(file, "path")?);

    let unit = repo_file("systemd/ringdns.service")?;
    let mut unit_paths = Vec::new();
    for line in unit.lines().filter(|line| line.starts_with("Exec")) {
        if let Some(path) = config_argument(line.split_whitespace()) {
            unit_paths.push((line, path));
        }
    }
    assert!(
        unit_paths
            .iter()
            .any(|(line, _)| line.starts_with("ExecStart=")),
        "no ExecStart= with --config"
    );
    for (line, path) in unit_paths {
        assert_eq!(path, mounted, "{line}");
    }

    let dockerfile = repo_file("deploy/Dockerfile")?;
    let entrypoint = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("ENTRYPOINT "))
        .context("no ENTRYPOINT")?;
    let words = entrypoint
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|word| word.trim().trim_matches('"'));
    assert_eq!(
        config_argument(words),
        Some(mounted.as_str()),
        "{entrypoint}"
    );
    Ok(())
}

#[test]
fn probes_and_timeouts_match_the_config_map_config() -> anyhow::Result<()> {
    let yaml = fill(&repo_file("deploy/ringdns.yaml")?, CLUSTER_DNS);
    let scratch = Scratch::new()?;
    let effective = effective(&scratch.config(&config_map_config(&yaml)?)?, None)?;
    let health: SocketAddr = string(&effective, "health.listen")?.parse()?;
    let daemon_set: Vec<&str> = document(&yaml, "DaemonSet")?.lines().collect();
    for (probe, path) in [("livenessProbe:", "/health"), ("readinessProbe:", "/ready")] {
        let get = block(&block(&daemon_set, probe)?, "httpGet:")?;
        assert_eq!(value(&get, "path")?, path, "{probe}");
        assert_eq!(value(&get, "host")?, health.ip().to_string(), "{probe}");
        assert_eq!(value(&get, "port")?, health.port().to_string(), "{probe}");
        assert!(
            value(&get, "scheme").map_or(true, |scheme| scheme == "HTTP"),
            "{probe}: ringdns serves plain HTTP"
        );
    }

    let metrics: SocketAddr = string(&effective, "metrics.listen")?.parse()?;
    let metrics_port = metrics.port().to_string();
    let annotations = block(&daemon_set, "annotations:")?;
    assert_eq!(value(&annotations, "prometheus.io/port")?, metrics_port);
    // The container declares no port (update_strategy_surges_one_node_at_a_time_with_no_pod_
    // missing): Prometheus finds the metrics port through the annotations and the headless
    // Service.
    let service: Vec<&str> = named_document(&yaml, "Service", "ringdns")?
        .lines()
        .collect();
    assert_eq!(value(&block(&service, "spec:")?, "clusterIP")?, "None");
    let service_annotations = block(&block(&service, "metadata:")?, "annotations:")?;
    assert_eq!(
        value(&service_annotations, "prometheus.io/port")?,
        metrics_port
    );
    let port = named_item(&service, "ports:", "metrics")?;
    assert_eq!(value(&port, "port")?, metrics_port);
    assert_eq!(
        value(&port, "targetPort")?,
        metrics_port,
        "a number: the pods declare no named port"
    );

    let lameduck = seconds(string(&effective, "health.lameduck")?)?;
    let grace = seconds(value(&daemon_set, "terminationGracePeriodSeconds")?)?;
    assert!(
        grace > lameduck,
        "terminationGracePeriodSeconds {grace} ≤ lame duck {lameduck}"
    );
    let unit = repo_file("systemd/ringdns.service")?;
    let stop = unit
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .context("no TimeoutStopSec=")?;
    assert!(
        seconds(stop)? > lameduck,
        "TimeoutStopSec={stop} ≤ lame duck {lameduck}s"
    );
    Ok(())
}

/// The lines of `lines` that set `key` (after indentation and an optional list dash), comments
/// left out.
fn keys_set<'a>(lines: &[&'a str], key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}:");
    lines
        .iter()
        .copied()
        .filter(|line| {
            line.trim()
                .trim_start_matches("- ")
                .starts_with(prefix.as_str())
        })
        .collect()
}

#[test]
fn handover_socket_is_in_a_host_directory_mounted_at_its_path() -> anyhow::Result<()> {
    let yaml = fill(&repo_file("deploy/ringdns.yaml")?, CLUSTER_DNS);
    let scratch = Scratch::new()?;
    let effective = effective(&scratch.config(&config_map_config(&yaml)?)?, None)?;
    let socket = Path::new(string(&effective, "node.handover")?);
    assert!(
        socket.is_absolute(),
        "node.handover must be set (and absolute) for zero-gap upgrades: {socket:?}"
    );
    let directory = socket
        .parent()
        .and_then(Path::to_str)
        .context("node.handover has no directory")?;
    let daemon_set: Vec<&str> = document(&yaml, "DaemonSet")?.lines().collect();
    let mounts: Vec<Vec<&str>> = items(&block(&daemon_set, "volumeMounts:")?)
        .into_iter()
        .filter(|mount| value(mount, "mountPath").is_ok_and(|path| path == directory))
        .collect();
    let [mount] = mounts.as_slice() else {
        bail!(
            "want one volume mounted at {directory}, found {}",
            mounts.len()
        );
    };
    assert!(
        value(mount, "readOnly").map_or(true, |read_only| read_only == "false"),
        "ringdns creates the socket in {directory}: {mount:?}"
    );
    assert!(
        value(mount, "subPath").is_err(),
        "the whole directory, so that both pods see each other's socket: {mount:?}"
    );
    let volume = named_item(&daemon_set, "volumes:", value(mount, "name")?)?;
    let host_path = block(&volume, "hostPath:")
        .context("the old and the new pod share the directory only through the host")?;
    assert_eq!(
        value(&host_path, "path")?,
        directory,
        "the same path on the host"
    );
    assert_eq!(value(&host_path, "type")?, "DirectoryOrCreate");
    assert_eq!(
        value(&daemon_set, "readOnlyRootFilesystem")?,
        "true",
        "only the mount is writable"
    );
    Ok(())
}

#[test]
fn update_strategy_surges_one_node_at_a_time_with_no_pod_missing() -> anyhow::Result<()> {
    let yaml = repo_file("deploy/ringdns.yaml")?;
    let daemon_set: Vec<&str> = document(&yaml, "DaemonSet")?.lines().collect();
    let strategy = block(&daemon_set, "updateStrategy:")?;
    assert_eq!(value(&strategy, "type")?, "RollingUpdate");
    let rolling = block(&strategy, "rollingUpdate:")?;
    assert_eq!(value(&rolling, "maxSurge")?, "1");
    assert_eq!(value(&rolling, "maxUnavailable")?, "0");
    let min_ready: u64 = value(&daemon_set, "minReadySeconds")?.parse()?;
    assert!(
        min_ready > 0,
        "until the hand-over is confirmed the old instance may answer the new pod's probe"
    );
    for key in ["ports", "containerPort", "hostPort"] {
        let set = keys_set(&daemon_set, key);
        assert!(
            set.is_empty(),
            "with hostNetwork a declared port becomes a hostPort, and the scheduler keeps the \
             surge pod off the node: {set:?}"
        );
    }
    Ok(())
}

/// The first-rollout command of deploy/README.md, up to the pipe into kubectl.
fn documented_first_rollout_sed() -> anyhow::Result<String> {
    let guide = repo_file("deploy/README.md")?;
    let mut found = guide
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with("sed '") && line.contains("maxSurge"));
    let command = found
        .next()
        .context("no sed command for maxSurge in deploy/README.md")?;
    ensure!(
        found.next().is_none(),
        "more than one sed command for maxSurge in deploy/README.md"
    );
    let (sed, apply) = command
        .split_once(" | ")
        .with_context(|| format!("{command:?} is not piped into kubectl"))?;
    ensure!(apply.trim() == "kubectl apply -f -", "{command:?}");
    Ok(sed.to_owned())
}

#[test]
fn first_rollout_sed_turns_off_the_surge_and_nothing_else() -> anyhow::Result<()> {
    let sed = documented_first_rollout_sed()?;
    let scratch = Scratch::new()?;
    let manifest = repo_file("deploy/ringdns.yaml")?;
    std::fs::write(scratch.dir.path().join("ringdns.yaml"), &manifest)?;
    let output = Command::new("sh")
        .arg("-c")
        .arg(&sed)
        .current_dir(scratch.dir.path())
        .output()
        .context("running sh")?;
    ensure!(
        output.status.success(),
        "{sed}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let edited = String::from_utf8(output.stdout).context("sed output is not UTF-8")?;
    let daemon_set: Vec<&str> = document(&edited, "DaemonSet")?.lines().collect();
    let rolling = block(&block(&daemon_set, "updateStrategy:")?, "rollingUpdate:")?;
    assert_eq!(value(&rolling, "maxSurge")?, "0", "{sed}");
    assert_eq!(value(&rolling, "maxUnavailable")?, "10%", "{sed}");
    let before: Vec<&str> = manifest.lines().collect();
    let after: Vec<&str> = edited.lines().collect();
    assert_eq!(before.len(), after.len(), "{sed}");
    let changed: Vec<(&str, &str)> = before
        .iter()
        .zip(&after)
        .filter(|(old, new)| old != new)
        .map(|(old, new)| (*old, *new))
        .collect();
    assert_eq!(
        changed.len(),
        2,
        "only the two strategy lines change (the template does not, so the second apply \
         replaces no pod): {changed:?}"
    );
    Ok(())
}
