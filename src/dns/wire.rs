//! Bounds-checked walking of DNS wire format: names, record headers, offsets.
//!
//! Runs on: any (pure).
//!
//! Every read goes through `get()`; a short or malformed message is a `None`, never a panic.
#![forbid(unsafe_code)]

/// Size of the fixed DNS header (RFC 1035 §4.1.1).
pub const HEADER_LEN: usize = 12;

/// Longest wire-format domain name, length octets included (RFC 1035 §2.3.4).
pub const NAME_MAX: usize = 255;

/// RR type of the EDNS(0) pseudo-record (RFC 6891 §6.1.1).
pub const TYPE_OPT: u16 = 41;

/// RR type SOA (RFC 1035 §3.3.13).
pub const TYPE_SOA: u16 = 6;

/// Reads a big-endian u16 at `at`.
pub fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let pair = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([pair[0], pair[1]]))
}

/// Reads a big-endian u32 at `at`.
pub fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let quad = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([quad[0], quad[1], quad[2], quad[3]]))
}

/// Writes a big-endian u16 at `at`; `false` if it does not fit.
pub fn put_u16(bytes: &mut [u8], at: usize, value: u16) -> bool {
    match at.checked_add(2).and_then(|end| bytes.get_mut(at..end)) {
        Some(slot) => {
            slot.copy_from_slice(&value.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Writes a big-endian u32 at `at`; `false` if it does not fit.
pub fn put_u32(bytes: &mut [u8], at: usize, value: u32) -> bool {
    match at.checked_add(4).and_then(|end| bytes.get_mut(at..end)) {
        Some(slot) => {
            slot.copy_from_slice(&value.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Returns the end offset of an uncompressed name starting at `at`.
///
/// Rejects compression pointers, reserved label types, labels past the end and names longer
/// than [`NAME_MAX`]. Used for question names, which clients send uncompressed.
pub fn uncompressed_name_end(bytes: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    loop {
        let len = usize::from(*bytes.get(pos)?);
        if len == 0 {
            let end = pos + 1;
            return (end - at <= NAME_MAX).then_some(end);
        }
        if len > 63 {
            return None;
        }
        pos += 1 + len;
        if pos - at >= NAME_MAX || pos > bytes.len() {
            return None;
        }
    }
}

/// Returns the offset just past a possibly compressed name starting at `at`.
///
/// Does not follow pointers (only their two bytes are skipped): callers that need the target
/// name validate it separately (`domain` does, for upstream answers).
pub fn skip_name(bytes: &[u8], at: usize) -> Option<usize> {
    let mut pos = at;
    loop {
        let len = *bytes.get(pos)?;
        match len {
            0 => return Some(pos + 1),
            1..=63 => {
                pos += 1 + usize::from(len);
                if pos - at > NAME_MAX {
                    return None;
                }
            }
            0xC0..=0xFF => {
                bytes.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
}

/// The fixed part of a resource record after its owner name (RFC 1035 §4.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Offset of the owner name.
    pub start: usize,
    /// RR type.
    pub rtype: u16,
    /// RR class (for OPT: the UDP payload size).
    pub class: u16,
    /// Offset of the 32-bit TTL field.
    pub ttl_at: usize,
    /// TTL value (for OPT: extended rcode, version and flags).
    pub ttl: u32,
    /// Offset of RDATA.
    pub rdata_at: usize,
    /// Offset just past RDATA: the next record's start.
    pub end: usize,
}

/// Parses the record starting at `at`; `None` if it runs past the end of `bytes`.
pub fn record_at(bytes: &[u8], at: usize) -> Option<RecordHeader> {
    let fixed = skip_name(bytes, at)?;
    let rtype = u16_at(bytes, fixed)?;
    let class = u16_at(bytes, fixed + 2)?;
    let ttl = u32_at(bytes, fixed + 4)?;
    let rdlength = usize::from(u16_at(bytes, fixed + 8)?);
    let rdata_at = fixed + 10;
    let end = rdata_at + rdlength;
    if end > bytes.len() {
        return None;
    }
    Some(RecordHeader {
        start: at,
        rtype,
        class,
        ttl_at: fixed + 4,
        ttl,
        rdata_at,
        end,
    })
}

/// Writes `name` (wire format) lower-cased into `out`; returns the length written.
///
/// Only ASCII letters change (RFC 4343 §3); `out` must be at least `name.len()` long.
pub fn lowercase_into(name: &[u8], out: &mut [u8]) -> Option<usize> {
    let dest = out.get_mut(..name.len())?;
    for (to, from) in dest.iter_mut().zip(name) {
        *to = from.to_ascii_lowercase();
    }
    Some(name.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncompressed_name_end_finds_root() {
        let name = b"\x03www\x07example\x03com\x00rest";
        assert_eq!(uncompressed_name_end(name, 0), Some(17));
    }

    #[test]
    fn uncompressed_name_rejects_pointer_and_overrun() {
        assert_eq!(uncompressed_name_end(b"\x03www\xc0\x0c", 0), None);
        assert_eq!(uncompressed_name_end(b"\x05ab", 0), None);
        assert_eq!(uncompressed_name_end(b"", 0), None);
    }

    #[test]
    fn overlong_name_is_rejected() {
        let mut name = Vec::new();
        for _ in 0..5 {
            name.push(63);
            name.extend_from_slice(&[b'a'; 63]);
        }
        name.push(0);
        assert_eq!(uncompressed_name_end(&name, 0), None);
    }

    #[test]
    fn skip_name_stops_after_pointer() {
        assert_eq!(skip_name(b"\x03www\xc0\x0c", 0), Some(6));
        assert_eq!(skip_name(b"\x03www\xc0", 0), None);
        assert_eq!(skip_name(b"\x80", 0), None);
    }

    #[test]
    fn record_at_reads_fixed_fields() {
        let rr = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x1e\x00\x04\x0a\x00\x00\x01";
        let header = record_at(rr, 0).expect("valid record");
        assert_eq!(header.rtype, 1);
        assert_eq!(header.ttl, 30);
        assert_eq!(header.ttl_at, 6);
        assert_eq!(header.end, rr.len());
        assert_eq!(record_at(&rr[..rr.len() - 1], 0), None);
    }

    #[test]
    fn lowercase_changes_only_letters() {
        let mut out = [0u8; 16];
        let len = lowercase_into(b"\x03WwW\x02-Z\x00", &mut out).expect("fits");
        assert_eq!(&out[..len], b"\x03www\x02-z\x00");
    }
}
