//! `dig` as a real client: run it bounded, parse its output into a [`DigAnswer`].
//!
//! Runs on: the test thread (dig is a child process in the test's network namespace).

use std::net::SocketAddr;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use domain::base::iana::OptRcode;

use super::run_bounded;

/// Bound on one dig run (it has `+tries=1 +time=2`, and a TC retry over TCP at most doubles it).
const DIG_TIMEOUT: Duration = Duration::from_secs(15);

/// One resource record as dig prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigRecord {
    /// Owner name as printed (with trailing dot, case as received).
    pub name: String,
    /// TTL in seconds.
    pub ttl: u32,
    /// Class mnemonic, e.g. `IN`.
    pub class: String,
    /// Type mnemonic, e.g. `A`.
    pub rtype: String,
    /// Presentation-format rdata, whitespace collapsed to single spaces.
    pub rdata: String,
}

/// The EDNS pseudo-section dig printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigOpt {
    /// EDNS version.
    pub version: u8,
    /// Advertised UDP payload size.
    pub udp_payload: u16,
    /// EDNS flags (e.g. `do`).
    pub flags: Vec<String>,
}

/// The parsed last answer dig printed (after a TC retry over TCP, the TCP one).
#[derive(Debug, Clone)]
pub struct DigAnswer {
    /// Response code including the extended bits (`BADVERS`).
    pub rcode: OptRcode,
    /// Message ID.
    pub id: u16,
    /// Header flags as printed: `qr`, `aa`, `tc`, `rd`, `ra`, `ad`, `cd`.
    pub flags: Vec<String>,
    /// Question lines as printed, e.g. `svc-1.default.svc.cluster.local. IN A`.
    pub question: Vec<String>,
    /// Answer section.
    pub answer: Vec<DigRecord>,
    /// Authority section.
    pub authority: Vec<DigRecord>,
    /// Additional section (without the OPT pseudo-record).
    pub additional: Vec<DigRecord>,
    /// The OPT pseudo-record, if the answer had one.
    pub opt: Option<DigOpt>,
    /// `UDP` or `TCP`, from the `;; SERVER:` line.
    pub transport: String,
    /// dig printed `;; Truncated, retrying in TCP mode.` before this answer.
    pub retried_over_tcp: bool,
    /// The whole output, for failure messages.
    pub raw: String,
}

impl DigAnswer {
    /// Whether a header flag is set.
    pub fn flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// TC bit.
    pub fn tc(&self) -> bool {
        self.flag("tc")
    }

    /// AA bit.
    pub fn aa(&self) -> bool {
        self.flag("aa")
    }

    /// RA bit.
    pub fn ra(&self) -> bool {
        self.flag("ra")
    }

    /// The answer section as sorted `(lower-case name, type, rdata)` triples, without TTLs,
    /// so answers can be compared across servers and over time.
    pub fn rdata(&self) -> Vec<(String, String, String)> {
        let mut set: Vec<_> = self
            .answer
            .iter()
            .map(|r| {
                (
                    r.name.to_ascii_lowercase(),
                    r.rtype.clone(),
                    r.rdata.clone(),
                )
            })
            .collect();
        set.sort();
        set
    }

    /// The rdata of answer records of type `rtype`, sorted.
    pub fn rdata_of(&self, rtype: &str) -> Vec<String> {
        let mut set: Vec<_> = self
            .answer
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.rdata.clone())
            .collect();
        set.sort();
        set
    }

    /// The largest TTL in the answer section (0 when it is empty).
    pub fn max_answer_ttl(&self) -> u32 {
        self.answer.iter().map(|r| r.ttl).max().unwrap_or(0)
    }

    /// Parses dig's default output. The last `;; Got answer:` block wins.
    pub fn parse(raw: &str) -> anyhow::Result<Self> {
        let retried_over_tcp = raw.contains("Truncated, retrying in TCP mode");
        let block = raw
            .rsplit_once(";; Got answer:")
            .map(|(_, block)| block)
            .with_context(|| format!("no answer in dig output:\n{raw}"))?;
        let mut answer = Self {
            rcode: OptRcode::NOERROR,
            id: 0,
            flags: Vec::new(),
            question: Vec::new(),
            answer: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
            opt: None,
            transport: String::new(),
            retried_over_tcp,
            raw: raw.to_owned(),
        };
        let mut section = "";
        let mut status = None;
        for line in block.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix(";; ->>HEADER<<-") {
                for part in rest.split(',') {
                    let (key, value) = part.split_once(':').unwrap_or((part, ""));
                    match key.trim() {
                        "status" => status = Some(value.trim().to_owned()),
                        "id" => answer.id = value.trim().parse().context("header id")?,
                        _ => {}
                    }
                }
            } else if let Some(rest) = line.strip_prefix(";; flags:") {
                let flags = rest.split(';').next().unwrap_or("");
                answer.flags = flags.split_whitespace().map(str::to_owned).collect();
            } else if let Some(rest) = line.strip_prefix("; EDNS:") {
                answer.opt = Some(parse_edns(rest)?);
            } else if let Some(rest) = line.strip_prefix(";; SERVER:") {
                if let Some(open) = rest.rfind('(') {
                    answer.transport = rest[open + 1..].trim_end_matches(')').to_owned();
                }
            } else if line.starts_with(";; ") && line.ends_with("SECTION:") {
                section = line;
            } else if line.is_empty() || line.starts_with(';') {
                if section.contains("QUESTION") {
                    if let Some(question) = line.strip_prefix(';') {
                        answer.question.push(collapse(question));
                    }
                }
            } else {
                let record = parse_record(line)?;
                match section {
                    ";; ANSWER SECTION:" => answer.answer.push(record),
                    ";; AUTHORITY SECTION:" => answer.authority.push(record),
                    ";; ADDITIONAL SECTION:" => answer.additional.push(record),
                    other => bail!("record outside a section ({other}): {line}"),
                }
            }
        }
        let status = status.with_context(|| format!("no status in dig output:\n{raw}"))?;
        answer.rcode = OptRcode::from_str(&status)
            .ok()
            .with_context(|| format!("unknown status {status}"))?;
        Ok(answer)
    }
}

/// Parses `version: 0, flags: do; udp: 1232`.
fn parse_edns(rest: &str) -> anyhow::Result<DigOpt> {
    let mut opt = DigOpt {
        version: 0,
        udp_payload: 0,
        flags: Vec::new(),
    };
    for part in rest.split([',', ';']) {
        let (key, value) = part.split_once(':').unwrap_or((part, ""));
        match key.trim() {
            "version" => opt.version = value.trim().parse().context("EDNS version")?,
            "udp" => opt.udp_payload = value.trim().parse().context("EDNS udp")?,
            "flags" => opt.flags = value.split_whitespace().map(str::to_owned).collect(),
            _ => {}
        }
    }
    Ok(opt)
}

/// Parses `name ttl class type rdata…`.
fn parse_record(line: &str) -> anyhow::Result<DigRecord> {
    let mut parts = line.split_whitespace();
    let mut next = |what: &str| {
        parts
            .next()
            .map(str::to_owned)
            .with_context(|| format!("record without {what}: {line}"))
    };
    let name = next("name")?;
    let ttl = next("ttl")?.parse().context("record TTL")?;
    let class = next("class")?;
    let rtype = next("type")?;
    let rdata = parts.collect::<Vec<_>>().join(" ");
    Ok(DigRecord {
        name,
        ttl,
        class,
        rtype,
        rdata,
    })
}

/// Collapses runs of whitespace to one space.
fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A dig invocation; defaults: UDP, EDNS as dig does it, `+tries=1 +time=2`.
#[derive(Debug, Clone)]
pub struct Dig {
    /// Server address.
    server: SocketAddr,
    /// Query name.
    name: String,
    /// Query type mnemonic.
    rtype: String,
    /// Extra `+options`.
    options: Vec<String>,
}

impl Dig {
    /// A query for `name`/`rtype` to `server`.
    pub fn new(server: SocketAddr, name: &str, rtype: &str) -> Self {
        Self {
            server,
            name: name.to_owned(),
            rtype: rtype.to_owned(),
            options: Vec::new(),
        }
    }

    /// Adds a dig `+option` (pass it with the `+`).
    pub fn option(mut self, option: &str) -> Self {
        self.options.push(option.to_owned());
        self
    }

    /// Query over TCP (`+tcp`).
    pub fn tcp(self) -> Self {
        self.option("+tcp")
    }

    /// No OPT record in the query (`+noedns`).
    pub fn noedns(self) -> Self {
        self.option("+noedns")
    }

    /// Do not retry over TCP on TC=1 (`+ignore`).
    pub fn ignore_tc(self) -> Self {
        self.option("+ignore")
    }

    /// Advertise `bytes` as the EDNS UDP payload size.
    pub fn bufsize(self, bytes: u16) -> Self {
        self.option(&format!("+bufsize={bytes}"))
    }

    /// Runs dig and parses its answer; an error if dig got no answer.
    pub fn run(&self) -> anyhow::Result<DigAnswer> {
        let mut command = Command::new("dig");
        command
            .arg(format!("@{}", self.server.ip()))
            .arg("-p")
            .arg(self.server.port().to_string())
            .arg(&self.name)
            .arg(&self.rtype)
            .args(["+tries=1", "+time=2", "+nocookie"])
            .args(&self.options);
        let output = run_bounded(&mut command, DIG_TIMEOUT)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "{command:?} exited with {}:\n{stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        DigAnswer::parse(&stdout).with_context(|| format!("{command:?}"))
    }
}

/// `dig @server name rtype` over UDP.
pub fn dig(server: SocketAddr, name: &str, rtype: &str) -> anyhow::Result<DigAnswer> {
    Dig::new(server, name, rtype).run()
}

/// The authoritative answer straight from knotd (`+norec`), to compare ringdns' answer with.
pub fn authoritative(auth: SocketAddr, name: &str, rtype: &str) -> anyhow::Result<DigAnswer> {
    Dig::new(auth, name, rtype).option("+norec").run()
}
