//! Zone routing by longest label-wise suffix, and the few wire checks the upstream side needs.
//!
//! Runs on: any (pure).
//!
//! The upstream side only needs a message's ID, two header flags and its question, so it walks
//! the wire format itself instead of importing `domain` (the style guide keeps `domain` inside
//! `dns/`). Nothing here indexes into packet bytes; every read goes through `get()`.
#![forbid(unsafe_code)]

/// Length of the fixed DNS header (RFC 1035 §4.1.1).
pub(crate) const HEADER_LEN: usize = 12;

/// Longest wire-format name, length octets included (RFC 1035 §2.3.4).
const MAX_NAME_LEN: usize = 255;

/// Longest label (RFC 1035 §2.3.4); larger length octets are pointers or extended types.
const MAX_LABEL_LEN: usize = 63;

/// QR bit in the third header octet: set on responses (RFC 1035 §4.1.1).
const QR_BIT: u8 = 0x80;

/// TC bit in the third header octet: the answer was truncated (RFC 1035 §4.1.1).
const TC_BIT: u8 = 0x02;

/// The one question of a query, kept to validate answers against it (RFC 5452 §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Question {
    /// The qname in wire format with its terminating root label, lower-cased.
    name: Vec<u8>,
    /// The qtype.
    qtype: u16,
    /// The qclass.
    qclass: u16,
}

impl Question {
    /// The qname in wire format, lower-cased, including the root label.
    pub(crate) fn name(&self) -> &[u8] {
        &self.name
    }
}

/// Parses the single question of `msg`; `None` unless QDCOUNT is 1 and the question is
/// well-formed and uncompressed.
pub(crate) fn parse_question(msg: &[u8]) -> Option<Question> {
    let (name, qtype, qclass) = question_parts(msg)?;
    Some(Question {
        name: name.to_ascii_lowercase(),
        qtype,
        qclass,
    })
}

/// Whether `msg` carries exactly the question `question` (qname compared case-insensitively,
/// since upstreams may echo 0x20-randomised or otherwise re-cased names).
pub(crate) fn question_matches(msg: &[u8], question: &Question) -> bool {
    carries(msg, (&question.name, question.qtype, question.qclass))
}

/// Whether the question of `msg` is `(name, qtype, qclass)`, the name compared
/// case-insensitively.
fn carries(msg: &[u8], (name, qtype, qclass): (&[u8], u16, u16)) -> bool {
    question_parts(msg).is_some_and(|(carried, carried_type, carried_class)| {
        carried_type == qtype && carried_class == qclass && carried.eq_ignore_ascii_case(name)
    })
}

/// The message ID, if `msg` is long enough to have a header.
pub(crate) fn message_id(msg: &[u8]) -> Option<u16> {
    if msg.len() < HEADER_LEN {
        return None;
    }
    let id = msg.get(..2)?;
    Some(u16::from_be_bytes([*id.first()?, *id.get(1)?]))
}

/// Overwrites the message ID; does nothing to a message shorter than a header.
pub(crate) fn set_id(msg: &mut [u8], id: u16) {
    if msg.len() < HEADER_LEN {
        return;
    }
    if let Some(bytes) = msg.get_mut(..2) {
        bytes.copy_from_slice(&id.to_be_bytes());
    }
}

/// Whether QR=1, i.e. `msg` is a response rather than a reflected query.
pub(crate) fn is_response(msg: &[u8]) -> bool {
    msg.get(2).is_some_and(|flags| flags & QR_BIT != 0)
}

/// Whether TC=1: the answer did not fit and must be fetched over TCP (RFC 7766 §5).
pub(crate) fn is_truncated(msg: &[u8]) -> bool {
    msg.get(2).is_some_and(|flags| flags & TC_BIT != 0)
}

/// Sets TC=1, used when a datagram was cut off by our receive buffer.
pub(crate) fn mark_truncated(msg: &mut [u8]) {
    if let Some(flags) = msg.get_mut(2) {
        *flags |= TC_BIT;
    }
}

/// The wire qname of the single question of `msg`; `None` unless QDCOUNT is 1 and the
/// question is well-formed and uncompressed. Allocates nothing (unlike [`parse_question`]).
pub(crate) fn question_name(msg: &[u8]) -> Option<&[u8]> {
    question_parts(msg).map(|(name, _, _)| name)
}

/// Whether `msg` carries exactly the question of `query` (as [`question_matches`] with
/// `parse_question(query)`, without building it).
pub(crate) fn same_question(msg: &[u8], query: &[u8]) -> bool {
    question_parts(query).is_some_and(|asked| carries(msg, asked))
}

/// Splits the question of `msg` into (wire qname, qtype, qclass).
fn question_parts(msg: &[u8]) -> Option<(&[u8], u16, u16)> {
    let qdcount = u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]);
    if qdcount != 1 {
        return None;
    }
    let end = name_end(msg, HEADER_LEN)?;
    let name = msg.get(HEADER_LEN..end)?;
    let fixed = msg.get(end..end + 4)?;
    let qtype = u16::from_be_bytes([*fixed.first()?, *fixed.get(1)?]);
    let qclass = u16::from_be_bytes([*fixed.get(2)?, *fixed.get(3)?]);
    Some((name, qtype, qclass))
}

/// Offset just past the uncompressed name starting at `start`; `None` for pointers, extended
/// label types, over-long names or names running past the end of `msg`.
fn name_end(msg: &[u8], start: usize) -> Option<usize> {
    let mut pos = start;
    // A 255-octet name has at most 128 labels, root included, so this loop is bounded.
    for _ in 0..=MAX_NAME_LEN / 2 {
        let len = usize::from(*msg.get(pos)?);
        if len == 0 {
            let end = pos + 1;
            return (end - start <= MAX_NAME_LEN).then_some(end);
        }
        if len > MAX_LABEL_LEN {
            return None;
        }
        pos += 1 + len;
        if pos - start > MAX_NAME_LEN {
            return None;
        }
    }
    None
}

/// Picks the forward zone for a qname: the one with the longest label-wise matching suffix.
/// Allocates nothing per query (it runs on the worker for every UDP miss).
#[derive(Debug, Clone)]
pub(crate) struct Router {
    /// Each zone's name in wire format, lower-case, root label included (`.` is `[0]`), in
    /// config order.
    zones: Vec<Vec<u8>>,
}

impl Router {
    /// Builds a router over zone names in presentation form (`"cluster.local."`, `"."`), which
    /// config validation has already lower-cased and checked; escapes are not interpreted.
    pub(crate) fn new<'a>(zones: impl IntoIterator<Item = &'a str>) -> Self {
        let zones = zones
            .into_iter()
            .map(|zone| {
                let mut wire = Vec::with_capacity(zone.len() + 2);
                for label in zone.split('.').filter(|label| !label.is_empty()) {
                    // Validated zone labels are 1..=63 bytes.
                    wire.push(u8::try_from(label.len()).unwrap_or(u8::MAX));
                    wire.extend(label.bytes().map(|byte| byte.to_ascii_lowercase()));
                }
                wire.push(0);
                wire
            })
            .collect();
        Self { zones }
    }

    /// Index of the zone for `qname` (wire format, as from [`Question::name`]), or `None` if no
    /// zone matches. `"."` matches every well-formed name; on equal length the earlier zone wins.
    pub(crate) fn route(&self, qname: &[u8]) -> Option<usize> {
        // The name's suffixes at its label boundaries, longest first: the first one that is a
        // zone is the longest matching zone. Length octets (≤ 63) are no ASCII letters, so a
        // case-insensitive comparison of the wire forms compares the labels.
        let mut at = 0;
        loop {
            let suffix = qname.get(at..)?;
            if let Some(index) = self
                .zones
                .iter()
                .position(|zone| suffix.eq_ignore_ascii_case(zone))
            {
                return Some(index);
            }
            match suffix.first() {
                Some(&len) if len != 0 => at += 1 + usize::from(len),
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a dotted name into wire format.
    fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A query with one question and no other records.
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut out = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        out.extend(wire(name));
        out.extend(qtype.to_be_bytes());
        out.extend(1u16.to_be_bytes());
        out
    }

    #[test]
    fn longest_suffix_wins() {
        let router = Router::new([".", "cluster.local.", "svc.cluster.local.", "example."]);
        assert_eq!(router.route(&wire("a.svc.cluster.local.")), Some(2));
        assert_eq!(router.route(&wire("svc.cluster.local.")), Some(2));
        assert_eq!(router.route(&wire("a.pod.cluster.local.")), Some(1));
        assert_eq!(router.route(&wire("cluster.local.")), Some(1));
        assert_eq!(router.route(&wire("www.example.")), Some(3));
        assert_eq!(router.route(&wire("www.example.com.")), Some(0));
        assert_eq!(router.route(&wire(".")), Some(0));
    }

    #[test]
    fn suffix_match_is_label_wise() {
        let router = Router::new(["cluster.local."]);
        assert_eq!(router.route(&wire("xcluster.local.")), None);
        assert_eq!(router.route(&wire("a.xcluster.local.")), None);
        assert_eq!(router.route(&wire("local.")), None);
        assert_eq!(router.route(&wire("a.cluster.local.")), Some(0));
    }

    #[test]
    fn routing_ignores_case() {
        let router = Router::new(["cluster.local."]);
        assert_eq!(router.route(&wire("A.Cluster.LOCAL.")), Some(0));
    }

    #[test]
    fn no_root_zone_means_no_zone() {
        let router = Router::new(["cluster.local.", "example."]);
        assert_eq!(router.route(&wire("www.example.com.")), None);
        assert_eq!(Router::new([]).route(&wire("a.")), None);
    }

    #[test]
    fn question_parses_and_lower_cases() {
        let q = parse_question(&query("WWW.Example.com.", 1)).expect("valid query");
        assert_eq!(q.name(), wire("www.example.com.").as_slice());
        assert!(question_matches(&query("www.EXAMPLE.com.", 1), &q));
        assert!(!question_matches(&query("www.example.com.", 28), &q));
        assert!(!question_matches(&query("www.example.org.", 1), &q));
    }

    #[test]
    fn same_question_compares_as_question_matches_does() {
        let asked = query("www.example.com.", 1);
        assert_eq!(
            question_name(&asked),
            Some(wire("www.example.com.").as_slice())
        );
        assert!(same_question(&query("www.EXAMPLE.com.", 1), &asked));
        assert!(!same_question(&query("www.example.com.", 28), &asked));
        assert!(!same_question(&query("www.example.org.", 1), &asked));
        let mut other_class = query("www.example.com.", 1);
        let last = other_class.len() - 1;
        other_class[last] = 3;
        assert!(!same_question(&other_class, &asked));
        assert!(!same_question(&[0; 11], &asked));
        assert!(!same_question(&asked, &[0; 11]));
    }

    #[test]
    fn malformed_questions_are_rejected() {
        assert_eq!(parse_question(&[]), None);
        assert_eq!(parse_question(&[0; 11]), None);
        let mut no_question = query("a.", 1);
        no_question[5] = 0;
        assert_eq!(parse_question(&no_question), None);
        let mut truncated = query("www.example.com.", 1);
        truncated.truncate(truncated.len() - 1);
        assert_eq!(parse_question(&truncated), None);
        let mut pointer = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 0x0C];
        pointer.extend([0, 1, 0, 1]);
        assert_eq!(parse_question(&pointer), None);
        let mut long = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..5 {
            long.push(63);
            long.extend([b'a'; 63]);
        }
        long.extend([0, 0, 1, 0, 1]);
        assert_eq!(parse_question(&long), None);
    }

    #[test]
    fn header_helpers_never_panic_on_short_input() {
        let mut short = [0xFFu8; 3];
        assert_eq!(message_id(&short), None);
        set_id(&mut short, 0);
        assert_eq!(short, [0xFF; 3]);
        assert!(is_response(&short));
        assert!(is_truncated(&short));
        assert!(!is_response(&[]));
        let mut msg = query("a.", 1);
        set_id(&mut msg, 0xBEEF);
        assert_eq!(message_id(&msg), Some(0xBEEF));
        assert!(!is_truncated(&msg));
        mark_truncated(&mut msg);
        assert!(is_truncated(&msg));
    }
}
