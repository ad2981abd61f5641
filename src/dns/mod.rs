//! DNS messages: parse queries, classify upstream answers, build replies in place.
//!
//! Runs on: any (pure).
//!
//! This is the only module that imports `domain`. Queries are read straight from the receive
//! buffer ([`Query`] borrows it); replies are written into a caller-provided scratch buffer. No
//! function here allocates except [`Answer::from_upstream`] and [`upstream_query`], which run on
//! the miss path.
#![forbid(unsafe_code)]

pub mod wire;

use domain::base::iana::{Opcode, Rcode};
use domain::base::{Header, HeaderCounts, Message, ParsedName};
use domain::rdata::AllRecordData;

use wire::{HEADER_LEN, NAME_MAX, TYPE_OPT, TYPE_SOA};

/// UDP payload a client without EDNS may receive (RFC 1035 §4.2.1).
pub const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// Bytes of an OPT record with no options: root name, type, class, TTL, RDLENGTH.
pub const OPT_LEN: usize = 11;

/// Extended rcode BADVERS (RFC 6891 §9): its upper 8 bits go in the OPT TTL.
const BADVERS_UPPER: u8 = 1;

/// Longest cache key: qname + qtype + qclass + flags byte.
pub const KEY_MAX: usize = NAME_MAX + 5;

/// Smallest SOA RDATA: two root names and five 32-bit fields (RFC 1035 §3.3.13).
const SOA_RDATA_MIN: usize = 22;

/// Bit in the key's flags byte: the client set DO (RFC 3225).
const KEY_FLAG_DO: u8 = 1;

/// Bit in the key's flags byte: the client set CD (RFC 4035 §3.2.2).
const KEY_FLAG_CD: u8 = 2;

/// The client's EDNS(0) parameters (RFC 6891 §6.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// Requestor's UDP payload size, already raised to at least 512 (RFC 6891 §6.2.5).
    pub payload: u16,
    /// EDNS version; anything but 0 gets BADVERS.
    pub version: u8,
    /// DNSSEC OK.
    pub dnssec_ok: bool,
}

/// A parsed query, borrowing the receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The whole datagram or TCP frame.
    pub bytes: &'a [u8],
    /// Message ID.
    pub id: u16,
    /// Recursion desired.
    pub rd: bool,
    /// Checking disabled.
    pub cd: bool,
    /// End of the question section (offset).
    pub question_end: usize,
    /// The question's wire-format name, in the client's letter case.
    pub qname: &'a [u8],
    /// QTYPE.
    pub qtype: u16,
    /// QCLASS.
    pub qclass: u16,
    /// OPT record parameters, if the query carried one.
    pub edns: Option<Edns>,
}

/// Why a query gets no normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Too short for a header: drop silently.
    TooShort,
    /// QR=1: a response sent to us; drop (answering could loop).
    IsResponse,
    /// Answer FORMERR (RFC 1035 §4.1.1): malformed question, QDCOUNT != 1, bad OPT.
    FormErr,
    /// Answer NOTIMP: opcode other than QUERY.
    NotImp,
    /// Answer BADVERS (RFC 6891 §6.1.3): EDNS version other than 0.
    BadVers,
    /// A UDP query longer than the receive buffer, of which only the start was read: answer
    /// TC=1 with the question (no OPT, it was cut off), so the client asks again over TCP
    /// (RFC 7766 §5), where the query is read whole.
    TooLong,
}

impl Rejection {
    /// How to answer a UDP query of which only `prefix` was read: dropped when the prefix is
    /// shorter than a header or a response, else [`Rejection::TooLong`].
    pub fn of_cut_query(prefix: &[u8]) -> Rejection {
        match prefix.get(..HEADER_LEN) {
            None => Rejection::TooShort,
            Some(header) if Header::for_message_slice(header).qr() => Rejection::IsResponse,
            Some(_) => Rejection::TooLong,
        }
    }
}

impl<'a> Query<'a> {
    /// Parses a query. Never panics; does not allocate.
    pub fn parse(bytes: &'a [u8]) -> Result<Query<'a>, Rejection> {
        let message = Message::from_slice(bytes).map_err(|_| Rejection::TooShort)?;
        let header = message.header();
        if header.qr() {
            return Err(Rejection::IsResponse);
        }
        if header.opcode() != Opcode::QUERY {
            return Err(Rejection::NotImp);
        }
        let counts = message.header_counts();
        if counts.qdcount() != 1 {
            return Err(Rejection::FormErr);
        }
        let name_end = wire::uncompressed_name_end(bytes, HEADER_LEN).ok_or(Rejection::FormErr)?;
        let qtype = wire::u16_at(bytes, name_end).ok_or(Rejection::FormErr)?;
        let qclass = wire::u16_at(bytes, name_end + 2).ok_or(Rejection::FormErr)?;
        let question_end = name_end + 4;
        let edns = find_opt(bytes, question_end, counts)?;
        let query = Query {
            bytes,
            id: header.id(),
            rd: header.rd(),
            cd: header.cd(),
            question_end,
            qname: bytes.get(HEADER_LEN..name_end).ok_or(Rejection::FormErr)?,
            qtype,
            qclass,
            edns,
        };
        if edns.is_some_and(|edns| edns.version != 0) {
            return Err(Rejection::BadVers);
        }
        Ok(query)
    }

    /// Writes the cache key into `out` and returns its length: lower-cased qname, qtype,
    /// qclass, and a flags byte for DO and CD (answers differ with them, RFC 4035 §3.2).
    pub fn key_into(&self, out: &mut [u8; KEY_MAX]) -> usize {
        let name_len = wire::lowercase_into(self.qname, out)
            .expect("qname is at most NAME_MAX bytes, checked by parse; out holds KEY_MAX");
        let tail = &mut out[name_len..name_len + 5];
        tail[..2].copy_from_slice(&self.qtype.to_be_bytes());
        tail[2..4].copy_from_slice(&self.qclass.to_be_bytes());
        let mut flags = 0;
        if self.edns.is_some_and(|edns| edns.dnssec_ok) {
            flags |= KEY_FLAG_DO;
        }
        if self.cd {
            flags |= KEY_FLAG_CD;
        }
        tail[4] = flags;
        name_len + 5
    }

    /// Largest UDP reply this client accepts: 512 without EDNS, else its payload size capped
    /// at our own `limit` (RFC 6891 §6.2.5).
    pub fn udp_limit(&self, limit: u16) -> usize {
        match self.edns {
            None => usize::from(CLASSIC_UDP_PAYLOAD),
            Some(edns) => usize::from(edns.payload.min(limit).max(CLASSIC_UDP_PAYLOAD)),
        }
    }
}

/// Finds the OPT record in a query's additional section (answer and authority are skipped).
fn find_opt(bytes: &[u8], mut at: usize, counts: HeaderCounts) -> Result<Option<Edns>, Rejection> {
    let skipped = usize::from(counts.ancount()) + usize::from(counts.nscount());
    for _ in 0..skipped {
        at = wire::record_at(bytes, at).ok_or(Rejection::FormErr)?.end;
    }
    let mut edns = None;
    for _ in 0..counts.arcount() {
        let record = wire::record_at(bytes, at).ok_or(Rejection::FormErr)?;
        if record.rtype == TYPE_OPT {
            // RFC 6891 §6.1.1: more than one OPT, or one not owned by the root, is FORMERR.
            if edns.is_some() || bytes.get(record.start) != Some(&0) {
                return Err(Rejection::FormErr);
            }
            edns = Some(Edns {
                payload: record.class.max(CLASSIC_UDP_PAYLOAD),
                version: (record.ttl >> 16) as u8,
                dnssec_ok: record.ttl & 0x8000 != 0,
            });
        }
        at = record.end;
    }
    Ok(edns)
}

/// What kind of answer an upstream gave, for the cache (RFC 2308 §1, §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// NOERROR with answer records.
    Success,
    /// NXDOMAIN, or NOERROR with no answer records (NODATA).
    Denial,
    /// SERVFAIL (RFC 2308 §7.1).
    ServFail,
    /// Anything else (REFUSED, NOTIMP, TC=1 ...): passed to the client, never cached.
    Other,
}

/// Unused bytes an [`Answer`]'s buffer may keep rather than be shrunk (an upstream's OPT record
/// with a cookie is 39 bytes).
const SLACK_MAX: usize = 64;

/// An answer ready to be replayed to many clients: the upstream message minus its OPT record,
/// with the offsets of every TTL field so a hit can age them in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Header (ID 0), question (lower case) and records, no OPT (whose bytes may still be
    /// allocated behind them, up to [`SLACK_MAX`]).
    message: Vec<u8>,
    /// Offsets of the TTL field of every record in `message`.
    ttl_offsets: Vec<u16>,
    /// Seconds this answer may be served: min over its records (for denials, over the SOA
    /// TTL and SOA MINIMUM too, RFC 2308 §5), before any cap.
    ttl_secs: u32,
    /// Classification for the cache.
    kind: Kind,
    /// Upper 8 bits of a 12-bit extended rcode from the upstream's OPT (RFC 6891 §6.1.3).
    rcode_upper: u8,
}

/// Why an upstream answer cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadAnswer {
    /// Not a parseable response.
    Malformed,
    /// The question differs from the one asked.
    WrongQuestion,
    /// The OPT record is not the last record (we strip it and cannot shift compression
    /// pointers safely); no real server does this.
    OptNotLast,
    /// Longer than 65535 bytes.
    TooLong,
    /// A compression pointer reaches into bytes a hit rewrites (the header, a TTL, the OPT
    /// record) or past the end, so the records would read differently when replayed; no real
    /// server writes such pointers, a lying one might.
    Unfaithful,
}

impl Answer {
    /// Validates an upstream answer for the question of `key` (as built by
    /// [`Query::key_into`]) and prepares it for replay. Runs on the miss path; allocates.
    pub fn from_upstream(bytes: &[u8], key: &[u8]) -> Result<Answer, BadAnswer> {
        Answer::from_upstream_vec(bytes.to_vec(), key)
    }

    /// [`Answer::from_upstream`] on an answer the caller owns, whose buffer becomes the stored
    /// answer: the miss path's copy and allocation saved (the TTL offsets are the one
    /// allocation left).
    pub fn from_upstream_vec(mut out: Vec<u8>, key: &[u8]) -> Result<Answer, BadAnswer> {
        let bytes = out.as_slice();
        if bytes.len() > usize::from(u16::MAX) {
            return Err(BadAnswer::TooLong);
        }
        let message = Message::from_slice(bytes).map_err(|_| BadAnswer::Malformed)?;
        let header = message.header();
        if !header.qr() {
            return Err(BadAnswer::Malformed);
        }
        // Full structural validation by `domain`: every record, data included (names inside
        // CNAME, NS, SOA, MX ... with their compression pointers), must parse; otherwise a
        // broken answer would be cached and replayed.
        for section in [message.answer(), message.authority(), message.additional()] {
            let section = section.map_err(|_| BadAnswer::Malformed)?;
            for record in section {
                let record = record.map_err(|_| BadAnswer::Malformed)?;
                record
                    .to_any_record::<AllRecordData<&[u8], ParsedName<&[u8]>>>()
                    .map_err(|_| BadAnswer::Malformed)?;
            }
        }
        let counts = message.header_counts();
        if counts.qdcount() != 1 {
            return Err(BadAnswer::WrongQuestion);
        }
        let name_end =
            wire::uncompressed_name_end(bytes, HEADER_LEN).ok_or(BadAnswer::WrongQuestion)?;
        let question_end = name_end + 4;
        let question = bytes
            .get(HEADER_LEN..question_end)
            .ok_or(BadAnswer::Malformed)?;
        // The key is qname + qtype + qclass + a flags byte: the name compares without case
        // (RFC 4343), qtype and qclass exactly.
        let name_len = name_end - HEADER_LEN;
        let (Some(expected_name), Some(expected_fixed)) =
            (key.get(..name_len), key.get(name_len..name_len + 4))
        else {
            return Err(BadAnswer::WrongQuestion);
        };
        if key.len() != name_len + 5
            || !question[..name_len].eq_ignore_ascii_case(expected_name)
            || question[name_len..] != *expected_fixed
        {
            return Err(BadAnswer::WrongQuestion);
        }
        let mut ttl_offsets = Vec::new();
        let mut min_ttl = u32::MAX;
        let mut soa_ttl = None;
        let mut rcode_upper = 0;
        let mut at = question_end;
        let mut opt_range = None;
        let total = usize::from(counts.ancount())
            + usize::from(counts.nscount())
            + usize::from(counts.arcount());
        ttl_offsets.reserve_exact(total);
        let authority = usize::from(counts.ancount())
            ..usize::from(counts.ancount()) + usize::from(counts.nscount());
        let additional_from = authority.end;
        for index in 0..total {
            let record = wire::record_at(bytes, at).ok_or(BadAnswer::Malformed)?;
            if record.rtype == TYPE_OPT {
                // RFC 6891 §6.1.1: one OPT at most, in the additional section only.
                if opt_range.is_some() || index < additional_from {
                    return Err(BadAnswer::Malformed);
                }
                rcode_upper = (record.ttl >> 24) as u8;
                opt_range = Some(record.start..record.end);
            } else {
                if opt_range.is_some() {
                    return Err(BadAnswer::OptNotLast);
                }
                // RFC 2181 §8: a TTL with the top bit set is treated as zero.
                let ttl = if record.ttl > i32::MAX as u32 {
                    0
                } else {
                    record.ttl
                };
                min_ttl = min_ttl.min(ttl);
                if authority.contains(&index) && record.rtype == TYPE_SOA {
                    // Two names (at least one byte each) and five 32-bit fields, MINIMUM last
                    // (RFC 1035 §3.3.13).
                    if record.end - record.rdata_at < SOA_RDATA_MIN {
                        return Err(BadAnswer::Malformed);
                    }
                    let minimum =
                        wire::u32_at(bytes, record.end - 4).ok_or(BadAnswer::Malformed)?;
                    soa_ttl = Some(ttl.min(minimum));
                }
                ttl_offsets.push(u16::try_from(record.ttl_at).map_err(|_| BadAnswer::TooLong)?);
            }
            at = record.end;
        }
        // The buffer is ours from here on (nothing above reads `bytes` again).
        out.get_mut(HEADER_LEN..name_end)
            .ok_or(BadAnswer::Malformed)?
            .make_ascii_lowercase();
        if let Some(range) = opt_range {
            out.truncate(range.start);
            let arcount = counts
                .arcount()
                .checked_sub(1)
                .ok_or(BadAnswer::Malformed)?;
            HeaderCounts::for_message_slice_mut(&mut out).set_arcount(arcount);
        } else {
            out.truncate(at);
        }
        Header::for_message_slice_mut(&mut out).set_id(0);
        if !replays_faithfully(&out, question_end, &ttl_offsets) {
            return Err(BadAnswer::Unfaithful);
        }
        // TC answers and extended rcodes (BADVERS, BADCOOKIE ...) are passed on, never cached.
        let kind = if header.tc() || rcode_upper != 0 {
            Kind::Other
        } else {
            match header.rcode() {
                Rcode::NOERROR if counts.ancount() > 0 => Kind::Success,
                Rcode::NOERROR | Rcode::NXDOMAIN => Kind::Denial,
                Rcode::SERVFAIL => Kind::ServFail,
                _ => Kind::Other,
            }
        };
        let ttl_secs = match kind {
            // RFC 2308 §5: a negative answer without SOA must not be cached.
            Kind::Denial => soa_ttl.map_or(0, |soa| soa.min(min_ttl)),
            _ if min_ttl == u32::MAX => 0,
            _ => min_ttl,
        };
        // The stripped OPT record's bytes stay allocated unless they are many (an upstream's
        // padding, say): a shrink would be one more allocation per miss.
        if out.capacity() - out.len() > SLACK_MAX {
            out.shrink_to_fit();
        }
        Ok(Answer {
            message: out,
            ttl_offsets,
            ttl_secs,
            kind,
            rcode_upper,
        })
    }

    /// A placeholder holding nothing (a vacated cache slot).
    pub fn empty() -> Answer {
        Answer {
            message: Vec::new(),
            ttl_offsets: Vec::new(),
            ttl_secs: 0,
            kind: Kind::Other,
            rcode_upper: 0,
        }
    }

    /// Cache classification.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Minimum TTL over the records (negative TTL for denials), uncapped.
    pub fn ttl_secs(&self) -> u32 {
        self.ttl_secs
    }

    /// Writes this answer for `query` into `out`: the client's ID, qname case, RD and CD; RA
    /// set; every TTL set to `ttl_secs`; an OPT record iff the query had one. If it exceeds
    /// `limit` bytes (or `out`), writes header + question (+ OPT) with TC=1 instead (RFC 2181
    /// §9). Returns the length written. Does not allocate.
    pub fn write_reply(
        &self,
        query: &Query<'_>,
        ttl_secs: u32,
        udp_payload: u16,
        limit: usize,
        out: &mut [u8],
    ) -> usize {
        let opt_len = if query.edns.is_some() { OPT_LEN } else { 0 };
        let limit = limit.min(out.len());
        let question_end = HEADER_LEN + query.qname.len() + 4;
        let full = self.message.len() + opt_len;
        let len = if full <= limit {
            out[..self.message.len()].copy_from_slice(&self.message);
            for &offset in self.ttl_offsets.iter() {
                wire::put_u32(out, usize::from(offset), ttl_secs);
            }
            self.message.len()
        } else {
            if question_end + opt_len > limit {
                return 0;
            }
            out[..question_end].copy_from_slice(&self.message[..question_end]);
            let counts = HeaderCounts::for_message_slice_mut(out);
            counts.set_ancount(0);
            counts.set_nscount(0);
            counts.set_arcount(0);
            Header::for_message_slice_mut(out).set_tc(true);
            question_end
        };
        out[HEADER_LEN..HEADER_LEN + query.qname.len()].copy_from_slice(query.qname);
        let header = Header::for_message_slice_mut(out);
        header.set_id(query.id);
        header.set_qr(true);
        header.set_aa(false);
        header.set_rd(query.rd);
        header.set_ra(true);
        header.set_cd(query.cd);
        match query.edns {
            Some(edns) => len + write_opt(out, len, udp_payload, self.rcode_upper, edns.dnssec_ok),
            None => len,
        }
    }
}

/// Whether every record of `message` (an answer as stored: ID 0, no OPT, TTLs at
/// `ttl_offsets`) reads the same in every reply a hit writes from it, which rewrites the ID,
/// the flags, every TTL and ARCOUNT and appends an OPT record. A compression pointer may reach
/// anywhere before itself (domain refuses forward ones), so a lying upstream could make a name
/// start in, or run its labels across, those bytes: replayed, the name would change or break,
/// and ringdns would send malformed answers.
///
/// Each pointer-shaped byte pair (`0b11……`, after the question, whose name was checked to be
/// uncompressed) that points backwards has the name at its target walked, pointers followed:
/// only if a byte it reads is rewritten are the records compared with those of a copy
/// rewritten as a hit would, with every rewritten bit flipped. Real answers' names sit in the
/// question and in owner and data fields, so their walks never touch rewritten bytes; rdata
/// that merely looks like a pointer (192.168.1.1) costs a short walk at most.
fn replays_faithfully(message: &[u8], records: usize, ttl_offsets: &[u16]) -> bool {
    let body = message.get(records..).unwrap_or_default();
    let mut from = 0;
    while let Some(at) = body
        .get(from..)
        .and_then(|rest| rest.iter().position(|&byte| byte >= 0xc0))
    {
        let position = records + from + at;
        from += at + 1;
        let Some(&[high, low]) = message.get(position..position + 2) else {
            break;
        };
        let target = (usize::from(high & 0x3f) << 8) | usize::from(low);
        if target < position && name_reads_rewritten(message, target, ttl_offsets) {
            return reads_the_same_replayed(message, ttl_offsets);
        }
    }
    true
}

/// Whether the name at `at` in `message`, read as a DNS name (labels, pointers followed
/// backwards, at most 255 bytes), reads a byte a hit rewrites: the header, a TTL field, or
/// anything past the stored message (the OPT record it had). Stops where the bytes are no name.
fn name_reads_rewritten(message: &[u8], mut at: usize, ttl_offsets: &[u16]) -> bool {
    // `ttl_offsets` ascend (records are walked in order).
    let rewritten = |start: usize, end: usize| {
        let first = ttl_offsets.partition_point(|&ttl| usize::from(ttl) + 4 <= start);
        start < HEADER_LEN
            || end > message.len()
            || ttl_offsets
                .get(first)
                .is_some_and(|&ttl| usize::from(ttl) < end)
    };
    let mut read = 0;
    for _ in 0..NAME_MAX {
        let Some(&byte) = message.get(at) else {
            return true;
        };
        match byte {
            0 => return rewritten(at, at + 1),
            0xc0.. => {
                let target = message
                    .get(at + 1)
                    .map(|&low| (usize::from(byte & 0x3f) << 8) | usize::from(low));
                match target {
                    Some(target) if target < at => {
                        if rewritten(at, at + 2) {
                            return true;
                        }
                        at = target;
                    }
                    _ => return rewritten(at, at + 2),
                }
            }
            0x40.. => return false,
            len => {
                let end = at + 1 + usize::from(len);
                if rewritten(at, end) {
                    return true;
                }
                read += 1 + usize::from(len);
                if read > NAME_MAX {
                    return false;
                }
                at = end;
            }
        }
    }
    false
}

/// The slow half of [`replays_faithfully`] (kept out of line: it never runs for real answers).
#[cold]
#[inline(never)]
fn reads_the_same_replayed(message: &[u8], ttl_offsets: &[u16]) -> bool {
    let mut replay = message.to_vec();
    for byte in &mut replay[..4] {
        *byte ^= 0xff;
    }
    for &at in ttl_offsets {
        for byte in replay.iter_mut().skip(usize::from(at)).take(4) {
            *byte ^= 0xff;
        }
    }
    let len = replay.len();
    replay.resize(len + OPT_LEN, 0);
    if write_opt(&mut replay, len, 512, 0, false) == 0 {
        return false;
    }
    same_records(message, &replay)
}

/// Whether `replay` holds the records of `stored` (owner, class, type, data; not TTL) plus, at
/// most, one record more at the end (the OPT appended).
fn same_records(stored: &[u8], replay: &[u8]) -> bool {
    let (Ok(stored), Ok(replay)) = (Message::from_slice(stored), Message::from_slice(replay))
    else {
        return false;
    };
    match (all_records(stored), all_records(replay)) {
        (Some(stored), Some(replay)) => {
            replay.len() == stored.len() + 1 && stored.iter().zip(&replay).all(|(a, b)| a == b)
        }
        _ => false,
    }
}

/// A parsed record, data included.
type AnyRecord<'a> =
    domain::base::Record<ParsedName<&'a [u8]>, AllRecordData<&'a [u8], ParsedName<&'a [u8]>>>;

/// Every record of `message` after the question, data parsed; `None` if one does not parse.
fn all_records(message: &Message<[u8]>) -> Option<Vec<AnyRecord<'_>>> {
    let mut all = Vec::new();
    for section in [message.answer(), message.authority(), message.additional()] {
        for record in section.ok()? {
            all.push(record.ok()?.into_any_record().ok()?);
        }
    }
    Some(all)
}

/// Appends an OPT record at `at` and bumps ARCOUNT; returns its length (0 if it does not fit).
fn write_opt(
    out: &mut [u8],
    at: usize,
    udp_payload: u16,
    rcode_upper: u8,
    dnssec_ok: bool,
) -> usize {
    let Some(slot) = out.get_mut(at..at + OPT_LEN) else {
        return 0;
    };
    slot[0] = 0;
    slot[1..3].copy_from_slice(&TYPE_OPT.to_be_bytes());
    slot[3..5].copy_from_slice(&udp_payload.to_be_bytes());
    let flags: u32 = if dnssec_ok { 0x8000 } else { 0 };
    slot[5..9].copy_from_slice(&((u32::from(rcode_upper) << 24) | flags).to_be_bytes());
    slot[9..11].copy_from_slice(&0u16.to_be_bytes());
    let counts = HeaderCounts::for_message_slice_mut(out);
    counts.set_arcount(counts.arcount().saturating_add(1));
    OPT_LEN
}

/// Writes an error reply for a rejected or failed query into `out`; returns its length, or
/// `None` when the query gets no reply at all (too short, or a response).
///
/// The reply echoes the question when it parsed (RFC 1035 §4.1.1 leaves it optional; resolvers
/// match on it), and carries an OPT record when the query had a parseable one; TC=1 (and no
/// OPT) for [`Rejection::TooLong`].
pub fn write_error(
    bytes: &[u8],
    rejection: Rejection,
    udp_payload: u16,
    out: &mut [u8],
) -> Option<usize> {
    let rcode = match rejection {
        Rejection::TooShort | Rejection::IsResponse => return None,
        Rejection::FormErr => Rcode::FORMERR,
        Rejection::NotImp => Rcode::NOTIMP,
        Rejection::BadVers | Rejection::TooLong => Rcode::NOERROR,
    };
    let in_header = Header::for_message_slice(bytes.get(..HEADER_LEN)?);
    let question_end = match rejection {
        Rejection::FormErr => None,
        // Only the start of a too-long query was read: echo a question only if it has one.
        Rejection::TooLong if HeaderCounts::for_message_slice(bytes).qdcount() != 1 => None,
        _ => wire::uncompressed_name_end(bytes, HEADER_LEN).map(|end| end + 4),
    }
    .filter(|&end| end <= bytes.len() && end <= out.len());
    let len = question_end.unwrap_or(HEADER_LEN);
    out.get_mut(..len)?.copy_from_slice(bytes.get(..len)?);
    finish_header(
        out,
        false,
        rcode,
        [u16::from(question_end.is_some()), 0, 0, 0],
    );
    let header = Header::for_message_slice_mut(out);
    header.set_rd(in_header.rd());
    header.set_tc(rejection == Rejection::TooLong);
    // NOTIMP echoes the query's OPT (RFC 6891 §6.1.1: a responder that understands EDNS
    // answers with OPT); a FORMERR query's OPT may be the malformed part, so none is read.
    let edns = match rejection {
        Rejection::BadVers => Some(false),
        Rejection::NotImp => question_end
            .and_then(|end| {
                let counts = Message::from_slice(bytes).ok()?.header_counts();
                find_opt(bytes, end, counts).ok().flatten()
            })
            .map(|edns| edns.dnssec_ok),
        _ => None,
    };
    let opt = match (rejection, edns) {
        (Rejection::BadVers, _) => write_opt(out, len, udp_payload, BADVERS_UPPER, false),
        (_, Some(dnssec_ok)) => write_opt(out, len, udp_payload, 0, dnssec_ok),
        (_, None) => 0,
    };
    Some(len + opt)
}

/// Writes a SERVFAIL reply to `query` into `out` (question echoed, OPT iff the query had one).
pub fn write_servfail(query: &Query<'_>, udp_payload: u16, out: &mut [u8]) -> usize {
    let len = query.question_end.min(HEADER_LEN + query.qname.len() + 4);
    let Some(dest) = out.get_mut(..len) else {
        return 0;
    };
    dest.copy_from_slice(&query.bytes[..len]);
    finish_header(out, false, Rcode::SERVFAIL, [1, 0, 0, 0]);
    with_opt(out, len, udp_payload, query.edns)
}

/// QTYPE TXT (RFC 1035 §3.2.2).
const TYPE_TXT: u16 = 16;

/// QCLASS CH (RFC 1035 §3.2.4).
const CLASS_CH: u16 = 3;

/// `id.server.` in wire format (RFC 4892 §2).
const ID_SERVER: &[u8] = b"\x02id\x06server\x00";

/// The TXT string ringdns answers `id.server.` CH TXT with.
pub const SERVER_ID: &[u8] = b"ringdns";

impl Query<'_> {
    /// Whether this is `id.server.` CH TXT (RFC 4892 §2), which ringdns answers itself: the
    /// health check's probe, answered without cache or upstream.
    pub fn is_id_server(&self) -> bool {
        self.qclass == CLASS_CH
            && self.qtype == TYPE_TXT
            && self.qname.eq_ignore_ascii_case(ID_SERVER)
    }
}

/// Writes the answer to an `id.server.` CH TXT query into `out`: AA=1, one TXT record
/// [`SERVER_ID`] with TTL 0 (RFC 4892 §2), an OPT iff the query had one. Returns its length (0
/// if it does not fit). Does not allocate.
pub fn write_id_server(query: &Query<'_>, udp_payload: u16, out: &mut [u8]) -> usize {
    let question_end = query.question_end.min(HEADER_LEN + query.qname.len() + 4);
    let Ok(text_len) = u8::try_from(SERVER_ID.len()) else {
        return 0;
    };
    // Pointer to the qname, TYPE, CLASS, TTL, RDLENGTH, then the one character-string.
    let record_len = 2 + 2 + 2 + 4 + 2 + 1 + SERVER_ID.len();
    let len = question_end + record_len;
    let (Some(dest), Some(question)) = (out.get_mut(..len), query.bytes.get(..question_end)) else {
        return 0;
    };
    dest[..question_end].copy_from_slice(question);
    let record = &mut dest[question_end..];
    record[..2].copy_from_slice(&[0xC0, HEADER_LEN as u8]);
    record[2..4].copy_from_slice(&TYPE_TXT.to_be_bytes());
    record[4..6].copy_from_slice(&CLASS_CH.to_be_bytes());
    record[6..10].copy_from_slice(&0u32.to_be_bytes());
    record[10..12].copy_from_slice(&(1 + u16::from(text_len)).to_be_bytes());
    record[12] = text_len;
    record[13..].copy_from_slice(SERVER_ID);
    finish_header(out, true, Rcode::NOERROR, [1, 1, 0, 0]);
    with_opt(out, len, udp_payload, query.edns)
}

/// Turns the query header copied to the start of `out` into a reply header for a reply the
/// worker writes itself: QR and RA set, TC and AD cleared, `aa` and `rcode` as given, and the
/// section counts `[qd, an, ns, ar]`. The ID, opcode, RD and CD stay as the client sent them.
fn finish_header(out: &mut [u8], aa: bool, rcode: Rcode, counts: [u16; 4]) {
    let header = Header::for_message_slice_mut(out);
    header.set_qr(true);
    header.set_aa(aa);
    header.set_tc(false);
    header.set_ra(true);
    header.set_ad(false);
    header.set_rcode(rcode);
    let [qd, an, ns, ar] = counts;
    let section_counts = HeaderCounts::for_message_slice_mut(out);
    section_counts.set_qdcount(qd);
    section_counts.set_ancount(an);
    section_counts.set_nscount(ns);
    section_counts.set_arcount(ar);
}

/// The length of a reply of `len` bytes once an OPT record is appended iff the query had one
/// (RFC 6891 §6.1.1), DO echoed.
fn with_opt(out: &mut [u8], len: usize, udp_payload: u16, edns: Option<Edns>) -> usize {
    match edns {
        Some(edns) => len + write_opt(out, len, udp_payload, 0, edns.dnssec_ok),
        None => len,
    }
}

/// Builds the upstream query for a miss: ID 0 (the control side randomizes it), RD=1, CD and
/// DO as the client asked, the lower-case question, an OPT advertising `udp_payload`. Miss
/// path; allocates.
pub fn upstream_query(query: &Query<'_>, udp_payload: u16) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN + query.qname.len() + 4 + OPT_LEN];
    let question_end = HEADER_LEN + query.qname.len() + 4;
    out[HEADER_LEN..question_end].copy_from_slice(&query.bytes[HEADER_LEN..question_end]);
    let name_end = HEADER_LEN + query.qname.len();
    wire::lowercase_into(query.qname, &mut out[HEADER_LEN..name_end]);
    let header = Header::for_message_slice_mut(&mut out);
    header.set_rd(true);
    header.set_cd(query.cd);
    HeaderCounts::for_message_slice_mut(&mut out).set_qdcount(1);
    let dnssec_ok = query.edns.is_some_and(|edns| edns.dnssec_ok);
    let opt = write_opt(&mut out, question_end, udp_payload, 0, dnssec_ok);
    out.truncate(question_end + opt);
    out
}

#[cfg(test)]
pub(crate) mod tests;
