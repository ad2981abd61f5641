//! Unit tests of query parsing, answer preparation and reply building.

use super::*;

/// Encodes a dotted name (no trailing dot needed) in wire format.
pub(crate) fn name(dotted: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in dotted
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A query for `qname`/`qtype` with ID 0x1234, RD, and optionally an OPT (payload, version, DO).
pub(crate) fn query(qname: &str, qtype: u16, edns: Option<(u16, u8, bool)>) -> Vec<u8> {
    let mut out = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    out.extend(name(qname));
    out.extend(qtype.to_be_bytes());
    out.extend(1u16.to_be_bytes());
    if let Some((payload, version, dnssec_ok)) = edns {
        out[11] = 1;
        out.push(0);
        out.extend(TYPE_OPT.to_be_bytes());
        out.extend(payload.to_be_bytes());
        let ttl = (u32::from(version) << 16) | if dnssec_ok { 0x8000 } else { 0 };
        out.extend(ttl.to_be_bytes());
        out.extend(0u16.to_be_bytes());
    }
    out
}

/// An upstream answer to `query_bytes` (its question copied) with `rcode`, A records of the
/// given TTLs pointing at the qname, optionally an SOA (ttl, minimum) in authority, and an
/// OPT at the end.
pub(crate) fn answer(
    query_bytes: &[u8],
    rcode: u8,
    a_ttls: &[u32],
    soa: Option<(u32, u32)>,
) -> Vec<u8> {
    let parsed = Query::parse(query_bytes).expect("test query parses");
    let mut out = query_bytes[..parsed.question_end].to_vec();
    out[2] = 0x85; // QR, AA, RD
    out[3] = 0x80 | rcode;
    out[6..12].fill(0);
    out[7] = a_ttls.len() as u8;
    for (index, ttl) in a_ttls.iter().enumerate() {
        out.extend([0xc0, 0x0c]);
        out.extend(1u16.to_be_bytes());
        out.extend(1u16.to_be_bytes());
        out.extend(ttl.to_be_bytes());
        out.extend(4u16.to_be_bytes());
        out.extend([10, 0, 0, index as u8]);
    }
    if let Some((ttl, minimum)) = soa {
        out[9] = 1;
        out.extend([0xc0, 0x0c]);
        out.extend(TYPE_SOA.to_be_bytes());
        out.extend(1u16.to_be_bytes());
        out.extend(ttl.to_be_bytes());
        let mut rdata = name("ns.test");
        rdata.extend(name("admin.test"));
        for value in [1u32, 7200, 3600, 86400, minimum] {
            rdata.extend(value.to_be_bytes());
        }
        out.extend((rdata.len() as u16).to_be_bytes());
        out.extend(rdata);
    }
    out[11] = 1;
    out.extend([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    out
}

/// The cache key of a query.
fn key_of(bytes: &[u8]) -> Vec<u8> {
    let mut key = [0u8; KEY_MAX];
    let len = Query::parse(bytes).expect("parses").key_into(&mut key);
    key[..len].to_vec()
}

#[test]
fn parses_plain_query() {
    let bytes = query("Svc-1.Default.svc.cluster.local", 1, None);
    let parsed = Query::parse(&bytes).expect("valid");
    assert_eq!(parsed.id, 0x1234);
    assert!(parsed.rd);
    assert_eq!(parsed.qtype, 1);
    assert_eq!(parsed.edns, None);
    assert_eq!(parsed.udp_limit(1232), 512);
}

#[test]
fn key_is_lower_case_and_carries_do_and_cd() {
    let upper = key_of(&query("SVC.Cluster.Local", 1, None));
    let lower = key_of(&query("svc.cluster.local", 1, None));
    assert_eq!(upper, lower);
    let with_do = key_of(&query("svc.cluster.local", 1, Some((1232, 0, true))));
    assert_ne!(with_do, lower);
    let mut cd = query("svc.cluster.local", 1, None);
    cd[3] |= 0x10;
    assert_ne!(key_of(&cd), lower);
    let aaaa = key_of(&query("svc.cluster.local", 28, None));
    assert_ne!(aaaa, lower);
}

#[test]
fn rejections_follow_rfc() {
    assert_eq!(Query::parse(&[0; 5]).err(), Some(Rejection::TooShort));
    let mut response = query("a.test", 1, None);
    response[2] |= 0x80;
    assert_eq!(Query::parse(&response).err(), Some(Rejection::IsResponse));
    let mut notify = query("a.test", 1, None);
    notify[2] = 4 << 3;
    assert_eq!(Query::parse(&notify).err(), Some(Rejection::NotImp));
    let mut two = query("a.test", 1, None);
    two[5] = 2;
    assert_eq!(Query::parse(&two).err(), Some(Rejection::FormErr));
    let mut overrun = query("a.test", 1, None);
    overrun[12] = 40;
    assert_eq!(Query::parse(&overrun).err(), Some(Rejection::FormErr));
    let truncated = &query("a.test", 1, None)[..15];
    assert_eq!(Query::parse(truncated).err(), Some(Rejection::FormErr));
    let badvers = query("a.test", 1, Some((1232, 1, false)));
    assert_eq!(Query::parse(&badvers).err(), Some(Rejection::BadVers));
}

#[test]
fn small_edns_payload_is_raised_to_512() {
    let bytes = query("a.test", 1, Some((100, 0, false)));
    assert_eq!(Query::parse(&bytes).expect("valid").udp_limit(1232), 512);
    let bytes = query("a.test", 1, Some((4096, 0, false)));
    assert_eq!(Query::parse(&bytes).expect("valid").udp_limit(1232), 1232);
}

#[test]
fn answer_strips_opt_and_takes_min_ttl() {
    let q = query("svc.cluster.local", 1, Some((1232, 0, false)));
    let upstream = answer(&q, 0, &[30, 10, 300], None);
    let prepared = Answer::from_upstream(&upstream, &key_of(&q)).expect("valid");
    assert_eq!(prepared.kind(), Kind::Success);
    assert_eq!(prepared.ttl_secs(), 10);
    assert_eq!(prepared.ttl_offsets.len(), 3);
    assert_eq!(prepared.message.len(), upstream.len() - OPT_LEN);
    assert_eq!(&prepared.message[10..12], &[0, 0], "ARCOUNT lost the OPT");
}

#[test]
fn denial_ttl_comes_from_soa_minimum() {
    let q = query("nope.cluster.local", 1, None);
    let nxdomain = answer(&q, 3, &[], Some((300, 5)));
    let prepared = Answer::from_upstream(&nxdomain, &key_of(&q)).expect("valid");
    assert_eq!(prepared.kind(), Kind::Denial);
    assert_eq!(prepared.ttl_secs(), 5);
    let nodata = answer(&q, 0, &[], Some((4, 60)));
    let prepared = Answer::from_upstream(&nodata, &key_of(&q)).expect("valid");
    assert_eq!(prepared.kind(), Kind::Denial);
    assert_eq!(prepared.ttl_secs(), 4);
    let no_soa = answer(&q, 3, &[], None);
    let prepared = Answer::from_upstream(&no_soa, &key_of(&q)).expect("valid");
    assert_eq!(
        prepared.ttl_secs(),
        0,
        "RFC 2308 §5: no SOA, no negative caching"
    );
}

#[test]
fn truncated_and_mismatched_answers() {
    let q = query("svc.cluster.local", 1, None);
    let mut tc = answer(&q, 0, &[30], None);
    tc[2] |= 0x02;
    let prepared = Answer::from_upstream(&tc, &key_of(&q)).expect("parses");
    assert_eq!(prepared.kind(), Kind::Other, "TC answers are never cached");
    let other = query("other.cluster.local", 1, None);
    let wrong = answer(&other, 0, &[30], None);
    assert_eq!(
        Answer::from_upstream(&wrong, &key_of(&q)),
        Err(BadAnswer::WrongQuestion)
    );
    assert_eq!(
        Answer::from_upstream(&q, &key_of(&q)),
        Err(BadAnswer::Malformed)
    );
    let garbage = answer(&q, 0, &[30], None);
    assert!(Answer::from_upstream(&garbage[..garbage.len() - 15], &key_of(&q)).is_err());
}

#[test]
fn reply_restores_id_case_and_ages_ttl() {
    let lower = query("svc.cluster.local", 1, None);
    let prepared =
        Answer::from_upstream(&answer(&lower, 0, &[30, 30], None), &key_of(&lower)).expect("valid");
    let mut client = query("SvC.ClUsTeR.local", 1, None);
    client[0] = 0xab;
    client[1] = 0xcd;
    client[2] = 0x00; // RD off
    let parsed = Query::parse(&client).expect("valid");
    let mut out = [0u8; 512];
    let len = prepared.write_reply(&parsed, 17, 1232, 512, &mut out);
    let reply = &out[..len];
    assert_eq!(&reply[..2], &[0xab, 0xcd]);
    assert_eq!(reply[2] & 0x80, 0x80, "QR");
    assert_eq!(reply[2] & 0x01, 0, "RD copied from the client");
    assert_eq!(reply[3] & 0x80, 0x80, "RA");
    assert_eq!(&reply[12..12 + parsed.qname.len()], parsed.qname);
    let first = wire::record_at(reply, parsed.question_end).expect("record");
    assert_eq!(first.ttl, 17);
    let second = wire::record_at(reply, first.end).expect("record");
    assert_eq!(second.ttl, 17);
    assert_eq!(reply[11], 0, "no OPT without one in the query");
}

#[test]
fn reply_carries_opt_iff_query_did() {
    let q = query("svc.cluster.local", 1, Some((1232, 0, true)));
    let prepared = Answer::from_upstream(&answer(&q, 0, &[30], None), &key_of(&q)).expect("valid");
    let parsed = Query::parse(&q).expect("valid");
    let mut out = [0u8; 1232];
    let len = prepared.write_reply(&parsed, 30, 1232, 1232, &mut out);
    let message = Message::from_slice(&out[..len]).expect("parses");
    let opt = message.opt().expect("OPT present");
    assert_eq!(opt.udp_payload_size(), 1232);
    assert!(opt.dnssec_ok());
}

#[test]
fn oversized_reply_is_truncated() {
    let q = query("big.cluster.local", 1, None);
    let ttls = vec![30; 60];
    let prepared = Answer::from_upstream(&answer(&q, 0, &ttls, None), &key_of(&q)).expect("valid");
    let parsed = Query::parse(&q).expect("valid");
    let mut out = [0u8; 4096];
    let len = prepared.write_reply(&parsed, 30, 1232, parsed.udp_limit(1232), &mut out);
    assert_eq!(len, parsed.question_end);
    assert_eq!(out[2] & 0x02, 0x02, "TC");
    assert_eq!(&out[6..12], &[0; 6]);
    let len = prepared.write_reply(&parsed, 30, 1232, 65535, &mut out);
    assert!(len > 512, "TCP gets it whole");
    assert_eq!(out[2] & 0x02, 0);
}

#[test]
fn error_replies() {
    let mut out = [0u8; 512];
    let mut two = query("a.test", 1, None);
    two[5] = 2;
    let len = write_error(&two, Rejection::FormErr, 1232, &mut out).expect("answered");
    assert_eq!(len, HEADER_LEN);
    assert_eq!(out[3] & 0x0f, 1, "FORMERR");
    assert_eq!(&out[..2], &[0x12, 0x34]);
    let mut notify = query("a.test", 1, None);
    notify[2] = 4 << 3;
    let len = write_error(&notify, Rejection::NotImp, 1232, &mut out).expect("answered");
    assert_eq!(out[3] & 0x0f, 4, "NOTIMP");
    assert_eq!(len, notify.len(), "question echoed");
    let badvers = query("a.test", 1, Some((1232, 1, false)));
    let len = write_error(&badvers, Rejection::BadVers, 1232, &mut out).expect("answered");
    let message = Message::from_slice(&out[..len]).expect("parses");
    assert_eq!(message.opt_rcode().to_int(), 16, "BADVERS");
    assert_eq!(
        write_error(&[0; 4], Rejection::TooShort, 1232, &mut out),
        None
    );
}

#[test]
fn over_long_query_gets_tc_with_the_question() {
    let mut out = [0u8; 512];
    let whole = query("Svc.Test", 1, Some((1232, 0, false)));
    // Only the start was read: cut inside the OPT record.
    let prefix = &whole[..whole.len() - 5];
    let too_long = |bytes: &[u8], out: &mut [u8]| {
        write_error(bytes, Rejection::of_cut_query(bytes), 1232, out)
    };
    let len = too_long(prefix, &mut out).expect("answered");
    let question_end = HEADER_LEN + name("Svc.Test").len() + 4;
    assert_eq!(len, question_end, "header and question, no OPT");
    assert_eq!(&out[..2], &whole[..2], "ID");
    assert_eq!(
        &out[HEADER_LEN..len],
        &whole[HEADER_LEN..question_end],
        "question as asked"
    );
    let header = Header::for_message_slice(&out[..len]);
    assert!(header.qr() && header.tc() && header.rd() && header.ra() && !header.aa());
    assert_eq!(header.rcode(), Rcode::NOERROR);
    let counts = HeaderCounts::for_message_slice(&out[..len]);
    assert_eq!(
        (
            counts.qdcount(),
            counts.ancount(),
            counts.nscount(),
            counts.arcount()
        ),
        (1, 0, 0, 0)
    );
    // Cut inside the question: the header alone, still TC=1.
    let len = too_long(&whole[..HEADER_LEN + 3], &mut out).expect("answered");
    assert_eq!(len, HEADER_LEN);
    assert!(Header::for_message_slice(&out[..len]).tc());
    assert_eq!(HeaderCounts::for_message_slice(&out[..len]).qdcount(), 0);
    // A response or less than a header: nothing.
    let mut response = whole.clone();
    response[2] |= 0x80;
    assert_eq!(too_long(&response, &mut out), None);
    assert_eq!(too_long(&whole[..5], &mut out), None);
}

#[test]
fn upstream_query_is_lower_case_with_opt() {
    let q = query("SvC.Test", 28, Some((4096, 0, true)));
    let parsed = Query::parse(&q).expect("valid");
    let upstream = upstream_query(&parsed, 1232);
    let again = Query::parse(&upstream).expect("valid");
    assert_eq!(again.qname, &name("svc.test")[..]);
    assert_eq!(again.qtype, 28);
    assert!(again.rd);
    let edns = again.edns.expect("OPT");
    assert_eq!(edns.payload, 1232);
    assert!(edns.dnssec_ok);
    assert_eq!(again.id, 0);
}

#[test]
fn servfail_echoes_question() {
    let q = query("a.test", 1, Some((1232, 0, false)));
    let parsed = Query::parse(&q).expect("valid");
    let mut out = [0u8; 512];
    let len = write_servfail(&parsed, 1232, &mut out);
    let message = Message::from_slice(&out[..len]).expect("parses");
    assert_eq!(message.header().rcode(), Rcode::SERVFAIL);
    assert!(message.opt().is_some());
    assert_eq!(message.header().id(), 0x1234);
}

#[test]
fn notimp_to_an_edns_query_carries_opt() {
    let mut notify = query("a.test", 1, Some((1232, 0, true)));
    notify[2] = 4 << 3;
    let mut out = [0u8; 512];
    let len = write_error(&notify, Rejection::NotImp, 1232, &mut out).expect("answered");
    let message = Message::from_slice(&out[..len]).expect("parses");
    assert_eq!(message.header().rcode(), Rcode::NOTIMP);
    let opt = message.opt().expect("OPT echoed");
    assert!(opt.dnssec_ok());
}

#[test]
fn opt_outside_additional_is_malformed() {
    let q = query("a.test", 1, None);
    let parsed = Query::parse(&q).expect("valid");
    let mut upstream = q[..parsed.question_end].to_vec();
    upstream[2] = 0x81;
    upstream[3] = 0x80;
    upstream[6..12].copy_from_slice(&[0, 2, 0, 0, 0, 0]);
    upstream.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4, 1, 2, 3, 4]);
    upstream.extend([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        Answer::from_upstream(&upstream, &key_of(&q)),
        Err(BadAnswer::Malformed)
    );
}

#[test]
fn soa_without_room_for_minimum_is_malformed() {
    let q = query("nx.test", 1, None);
    let parsed = Query::parse(&q).expect("valid");
    let mut upstream = q[..parsed.question_end].to_vec();
    upstream[2] = 0x81;
    upstream[3] = 0x83;
    upstream[6..12].copy_from_slice(&[0, 0, 0, 1, 0, 0]);
    upstream.extend([0xc0, 0x0c, 0, 6, 0, 1, 0, 0, 0x0e, 0x10, 0, 0]);
    assert_eq!(
        Answer::from_upstream(&upstream, &key_of(&q)),
        Err(BadAnswer::Malformed)
    );
}

#[test]
fn qtype_compares_exactly_not_by_ascii_case() {
    // 0x0061 and 0x0041 differ only by the ASCII case bit.
    let asked = query("a.test", 0x61, None);
    let other = query("a.test", 0x41, None);
    let upstream = answer(&other, 0, &[30], None);
    assert_eq!(
        Answer::from_upstream(&upstream, &key_of(&asked)),
        Err(BadAnswer::WrongQuestion)
    );
}

#[test]
fn extended_rcode_answers_are_not_cached() {
    let q = query("a.test", 1, None);
    let mut upstream = answer(&q, 0, &[30], None);
    let opt_ttl = upstream.len() - 6;
    upstream[opt_ttl] = 1; // extended rcode upper bits: BADVERS
    let prepared = Answer::from_upstream(&upstream, &key_of(&q)).expect("parses");
    assert_eq!(prepared.kind(), Kind::Other);
}

#[test]
fn compression_pointer_past_the_end_in_rdata_is_malformed() {
    let q = query("a.test", 5, None);
    let parsed = Query::parse(&q).expect("valid");
    let mut upstream = q[..parsed.question_end].to_vec();
    upstream[2] = 0x81;
    upstream[3] = 0x80;
    upstream[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    // CNAME whose target is a pointer to offset 0x3fff, past the message.
    upstream.extend([0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 30, 0, 2, 0xff, 0xff]);
    assert_eq!(
        Answer::from_upstream(&upstream, &key_of(&q)),
        Err(BadAnswer::Malformed)
    );
}

/// A small deterministic PRNG (xorshift64*) for the mutation test below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound.max(1) as u64) as usize
    }
}

/// Mutates `bytes`: flips, overwrites, truncates or extends at random positions.
fn mutate(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            // Rewrite one section count (bytes 4..12) to a small value.
            5 if out.len() >= 12 => {
                let count = 4 + 2 * rng.below(4);
                out[count] = 0;
                out[count + 1] = rng.below(4) as u8;
            }
            0 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] = rng.next() as u8;
            }
            2 => out.truncate(rng.below(out.len() + 1)),
            3 => {
                for _ in 0..rng.below(16) {
                    out.push(rng.next() as u8);
                }
            }
            _ if out.len() > 12 => {
                // Point a byte after the header at a compression pointer.
                let at = 12 + rng.below(out.len() - 12);
                out[at] = 0xc0;
            }
            _ => {}
        }
    }
    out
}

/// Network bytes never cause a panic (STYLE §2), with overflow checks on as in every test
/// build: 200,000 mutated queries and upstream answers through parsing, answer preparation,
/// reply and error writing. Deterministic (fixed seed), bounded in count.
#[test]
fn mutated_packets_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let queries = [
        query("svc-1.default.svc.cluster.local", 1, None),
        query("a.test", 28, Some((1232, 0, true))),
        query("x.y.z.example", 33, Some((4096, 1, false))),
    ];
    // A positive and a negative upstream answer for every query that parses.
    let answers: Vec<Vec<u8>> = queries
        .iter()
        .filter(|q| Query::parse(q).is_ok())
        .flat_map(|q| {
            [
                answer(q, 0, &[30, 60], None),
                answer(q, 3, &[], Some((300, 5))),
            ]
        })
        .collect();
    let mut out = vec![0u8; 4096];
    for round in 0..200_000 {
        let base = &queries[round % queries.len()];
        let mutated = mutate(&mut rng, base);
        match Query::parse(&mutated) {
            Ok(parsed) => {
                let mut key = [0u8; KEY_MAX];
                let key_len = parsed.key_into(&mut key);
                let upstream = mutate(&mut rng, &answers[round % answers.len()]);
                if let Ok(prepared) = Answer::from_upstream(&upstream, &key[..key_len]) {
                    let limit = rng.below(out.len() + 1);
                    let len = prepared.write_reply(&parsed, 7, 1232, limit, &mut out);
                    assert!(len <= out.len());
                }
                let _ = write_servfail(&parsed, 1232, &mut out);
                let _ = upstream_query(&parsed, 1232);
            }
            Err(rejection) => {
                let _ = write_error(&mutated, rejection, 1232, &mut out);
            }
        }
        // Upstream answers are also validated against the unmutated query's key.
        let valid = Query::parse(base).ok();
        if let Some(parsed) = valid {
            let mut key = [0u8; KEY_MAX];
            let key_len = parsed.key_into(&mut key);
            let upstream = mutate(&mut rng, &answers[round % answers.len()]);
            if let Ok(prepared) = Answer::from_upstream(&upstream, &key[..key_len]) {
                let len = prepared.write_reply(&parsed, 7, 1232, 512, &mut out);
                assert!(len <= 512);
            }
        }
    }
}

/// A compression pointer that reaches bytes a hit rewrites (ID, a TTL, ARCOUNT, the stripped
/// OPT) would make the replayed records differ from the validated ones: refused. Found by the
/// `upstream_answer` fuzz target (a pointer to the ID's low byte, 0 when cached, the client's
/// ID when replayed).
#[test]
fn pointers_into_rewritten_bytes_are_refused() {
    let q = query("svc.cluster.local", 1, None);
    let key = key_of(&q);
    // Two A records, the ID 0 as the control side passes answers on; record 2's owner at 51.
    let mut base = answer(&q, 0, &[30, 30], None);
    base[..2].fill(0);
    let second_owner = 51;
    assert_eq!(&base[second_owner..second_owner + 2], &[0xc0, 0x0c]);
    let first_ttl = 41;
    let opt_at = base.len() - OPT_LEN;
    let mut no_opt = base[..opt_at].to_vec();
    no_opt[11] = 0;
    // domain refuses the forward pointer (to the OPT record) itself.
    for (what, mut bytes, target, refusal) in [
        ("the ID", base.clone(), 0, BadAnswer::Unfaithful),
        ("a TTL", base.clone(), first_ttl, BadAnswer::Unfaithful),
        ("ARCOUNT", no_opt.clone(), 11, BadAnswer::Unfaithful),
        ("the OPT record", base.clone(), opt_at, BadAnswer::Malformed),
    ] {
        bytes[second_owner] = 0xc0 | (target >> 8) as u8;
        bytes[second_owner + 1] = target as u8;
        assert_eq!(
            Answer::from_upstream(&bytes, &key),
            Err(refusal),
            "a pointer into {what}"
        );
    }
    // A pointer to an earlier record's type field, read as a label running across its TTL
    // (type 0x0601: a 6-byte label, then the TTL's last byte as the root while it is 256).
    let mut across = answer(&q, 0, &[256, 30], None);
    across[..2].fill(0);
    across[37] = 0x06;
    across[38] = 0x01;
    across[second_owner] = 0xc0;
    across[second_owner + 1] = 37;
    assert!(
        Message::from_slice(&across).is_ok(),
        "the message itself parses"
    );
    assert_eq!(
        Answer::from_upstream(&across, &key),
        Err(BadAnswer::Unfaithful),
        "a label across a TTL"
    );
    // Pointer-shaped bytes in record data (192.0.0.5) are no pointers: the answer is kept.
    let mut legit = base.clone();
    legit[47..51].copy_from_slice(&[192, 0, 0, 5]);
    let prepared = Answer::from_upstream(&legit, &key).expect("a real answer");
    assert_eq!(prepared.kind(), Kind::Success);
    assert!(Answer::from_upstream(&no_opt, &key).is_ok());
}
