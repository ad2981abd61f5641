//! The query set: parsed from `name TYPE` lines and pre-built into wire-format packets once, so
//! the hot loop only copies a packet and patches its 16-bit ID.
//!
//! Runs on: any (pure).

#![forbid(unsafe_code)]

use std::str::FromStr;

use anyhow::{bail, Context};
use domain::base::iana::Rtype;
use domain::base::{MessageBuilder, Name};

/// Length of the DNS header (RFC 1035 §4.1.1); the question section starts right after it.
pub const HEADER_BYTES: usize = 12;

/// One query to build: owner name and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuerySpec {
    /// Absolute domain name in presentation format (a trailing dot is optional).
    pub name: String,
    /// Record type mnemonic such as `A` or `AAAA`, or `TYPE65`.
    pub rtype: String,
}

/// Pre-built query packets stored back to back in one allocation.
pub struct QuerySet {
    /// All packets, concatenated.
    bytes: Vec<u8>,
    /// Per query: start in `bytes`, packet length, question section length.
    entries: Vec<Entry>,
}

/// Where one packet lives in [`QuerySet::bytes`].
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Offset of the packet.
    start: usize,
    /// Length of the whole packet.
    len: usize,
    /// Length of the question section (name + type + class), which an answer must repeat.
    question_len: usize,
}

impl QuerySet {
    /// Builds one packet per spec: ID 0, RD=1 (a stub resolver's query, RFC 1035 §4.1.1), one
    /// question of class IN, and with `edns_payload` an OPT record advertising that UDP payload
    /// size (RFC 6891 §6.2.3).
    pub fn build(specs: &[QuerySpec], edns_payload: Option<u16>) -> anyhow::Result<Self> {
        if specs.is_empty() {
            bail!("no queries to send");
        }
        let mut set = Self {
            bytes: Vec::new(),
            entries: Vec::with_capacity(specs.len()),
        };
        for spec in specs {
            let name = Name::<Vec<u8>>::from_str(&spec.name)
                .map_err(|error| anyhow::anyhow!("bad name {:?}: {error}", spec.name))?;
            let rtype = Rtype::from_str(&spec.rtype)
                .map_err(|_| anyhow::anyhow!("bad record type {:?}", spec.rtype))?;
            let question_len = name.as_slice().len() + 4;
            let mut builder = MessageBuilder::new_vec();
            builder.header_mut().set_rd(true);
            let mut question = builder.question();
            question
                .push((&name, rtype))
                .with_context(|| format!("building a query for {}", spec.name))?;
            let packet = match edns_payload {
                Some(payload) => {
                    let mut additional = question.additional();
                    additional
                        .opt(|opt| {
                            opt.set_udp_payload_size(payload);
                            Ok(())
                        })
                        .context("adding the EDNS OPT record")?;
                    additional.finish()
                }
                None => question.finish(),
            };
            set.entries.push(Entry {
                start: set.bytes.len(),
                len: packet.len(),
                question_len,
            });
            set.bytes.extend_from_slice(&packet);
        }
        Ok(set)
    }

    /// Number of queries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set is empty (never true for a built set).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Length of the longest packet, for sizing send buffers.
    pub fn max_packet_len(&self) -> usize {
        self.entries
            .iter()
            .map(|entry| entry.len)
            .max()
            .unwrap_or(0)
    }

    /// Packet `index`, with ID 0.
    pub fn packet(&self, index: usize) -> &[u8] {
        let entry = self.entries[index];
        &self.bytes[entry.start..entry.start + entry.len]
    }

    /// The question section of packet `index`: what a matching answer carries right after its
    /// header (RFC 1035 §7.3: the question identifies which query an answer belongs to).
    pub fn question(&self, index: usize) -> &[u8] {
        let entry = self.entries[index];
        let start = entry.start + HEADER_BYTES;
        &self.bytes[start..start + entry.question_len]
    }
}

/// Parses a query file: one `name TYPE` per line; blank lines and `#` comments are skipped.
pub fn parse_query_file(text: &str) -> anyhow::Result<Vec<QuerySpec>> {
    let mut specs = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(name), Some(rtype), None) = (fields.next(), fields.next(), fields.next()) else {
            bail!("line {}: expected `name TYPE`, got {line:?}", number + 1);
        };
        specs.push(QuerySpec {
            name: name.to_owned(),
            rtype: rtype.to_owned(),
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, rtype: &str) -> QuerySpec {
        QuerySpec {
            name: name.to_owned(),
            rtype: rtype.to_owned(),
        }
    }

    #[test]
    fn query_file_skips_comments_and_blank_lines() {
        let text =
            "# hot set\nsvc-1.default.svc.cluster.local A\n\n  kubernetes.default AAAA # x\n";
        let specs = parse_query_file(text).unwrap();
        assert_eq!(
            specs,
            vec![
                spec("svc-1.default.svc.cluster.local", "A"),
                spec("kubernetes.default", "AAAA")
            ]
        );
    }

    #[test]
    fn query_file_rejects_lines_without_a_type() {
        assert!(parse_query_file("example.test\n").is_err());
        assert!(parse_query_file("example.test A extra\n").is_err());
    }

    #[test]
    fn built_query_has_rd_one_question_and_zero_id() {
        let set = QuerySet::build(&[spec("example.test", "AAAA")], None).unwrap();
        let packet = set.packet(0);
        assert_eq!(&packet[..4], &[0, 0, 0x01, 0x00], "ID 0, RD=1");
        assert_eq!(&packet[4..12], &[0, 1, 0, 0, 0, 0, 0, 0], "one question");
        let mut question = b"\x07example\x04test\x00".to_vec();
        question.extend_from_slice(&[0, 28, 0, 1]); // AAAA, IN
        assert_eq!(set.question(0), question.as_slice());
        assert_eq!(packet.len(), 12 + question.len());
    }

    #[test]
    fn edns_adds_one_opt_record_with_payload_size() {
        let set = QuerySet::build(&[spec("example.test.", "A")], Some(1232)).unwrap();
        let packet = set.packet(0);
        assert_eq!(&packet[10..12], &[0, 1], "ARCOUNT 1");
        let opt = &packet[12 + set.question(0).len()..];
        assert_eq!(
            &opt[..5],
            &[0, 0, 41, 0x04, 0xd0],
            "root, OPT, payload 1232"
        );
        assert_eq!(set.max_packet_len(), packet.len());
    }

    #[test]
    fn bad_type_is_an_error() {
        assert!(QuerySet::build(&[spec("example.test", "NOPE")], None).is_err());
    }
}
