//! The on-disk format of WAL segments: segment headers, batch frames and records.
//!
//! This module is pure: it encodes into and decodes from byte slices and never touches a
//! file, so the writer, recovery and the reader share exactly one definition of the format.
//! All integers are little-endian.
//!
//! ```text
//! segment file  wal-<segment id, 20 digits>.log
//!   segment header (80 bytes)
//!     0..8    magic "CALMWALS"
//!     8..12   format version (u32, = 1)
//!     12..16  reserved, zero
//!     16..24  segment id (u64, = the id in the file name)
//!     24..32  first LSN (u64): the LSN of the first batch this segment holds or will hold
//!     32..64  chain start: the chain hash of the batch before this segment's first batch
//!     64..80  checksum: BLAKE3(bytes 0..64) truncated to 16 bytes
//!   batch frames, back to back, then zeros (preallocated) or end of file
//!
//! batch frame
//!   header (72 bytes)
//!     0..8    magic "CALMWALB"
//!     8..12   body bytes (u32)
//!     12..16  record count (u32, >= 1)
//!     16..24  LSN (u64): previous batch's LSN + 1, also across segments
//!     24..56  chain hash = BLAKE3(previous chain hash || bytes 0..24 || BLAKE3(body))
//!     56..72  checksum = BLAKE3(bytes 0..56 || BLAKE3(body)) truncated to 16 bytes
//!   body: `record count` records, each
//!     kind (u8) | group id (u64, 0 for facts) | payload bytes (u32) | payload
//! ```
//!
//! The checksum lets a frame be verified on its own (recovery uses that to look for valid
//! frames past a damaged one); the chain hash ties every frame to all frames before it, so a
//! reordered, missing or stale frame (bytes left from an older life of the file) is detected
//! even when its own checksum is fine.

use super::record::{WalRecord, WalRecordKind};

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CALMWALS";
/// Magic at the start of every batch frame.
pub const BATCH_MAGIC: [u8; 8] = *b"CALMWALB";
/// Version of this format, stored in every segment header.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 80;
/// Size of a batch frame header.
pub const BATCH_HEADER_BYTES: usize = 72;
/// Size of a record header inside a batch body.
pub const RECORD_HEADER_BYTES: usize = 13;
/// Bytes of the truncated BLAKE3 checksums (128 bits: accidental collisions are impossible
/// in practice, and the chain hash keeps all 256 bits).
pub const CHECKSUM_BYTES: usize = 16;
/// Chain hash of the batch "before" the first batch of a brand-new WAL.
pub const CHAIN_GENESIS: [u8; 32] = [0; 32];
/// Hard upper bound of a segment file, whatever the options say. Recovery reads one segment
/// into memory at a time, so this also bounds its memory use.
pub const SEGMENT_BYTES_LIMIT: u64 = 1 << 30;
/// Hard upper bound of a batch body; a length field above it is damage, not data.
pub const BATCH_BODY_BYTES_LIMIT: usize = (SEGMENT_BYTES_LIMIT as usize) - SEGMENT_HEADER_BYTES;
/// Hard upper bound of records in one batch.
pub const BATCH_RECORDS_LIMIT: u32 = 1 << 20;

/// A decoded and verified segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment_id: u64,
    pub first_lsn: u64,
    pub chain_start: [u8; 32],
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.segment_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.first_lsn.to_le_bytes());
        out[32..64].copy_from_slice(&self.chain_start);
        let checksum = checksum16(&[&out[0..64]]);
        out[64..80].copy_from_slice(&checksum);
        out
    }

    /// Decodes and verifies the header at the start of `bytes`; the error says what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, String> {
        if bytes.len() < SEGMENT_HEADER_BYTES {
            return Err(format!(
                "segment header needs {SEGMENT_HEADER_BYTES} bytes but the file has {}",
                bytes.len()
            ));
        }
        let header = &bytes[..SEGMENT_HEADER_BYTES];
        if header[0..8] != SEGMENT_MAGIC {
            return Err("segment header magic is wrong (not a calm WAL segment)".to_string());
        }
        let checksum = checksum16(&[&header[0..64]]);
        if header[64..80] != checksum {
            return Err("segment header checksum mismatch".to_string());
        }
        let version = read_u32(header, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "segment format version {version} is not supported (this build reads version {FORMAT_VERSION})"
            ));
        }
        let mut chain_start = [0u8; 32];
        chain_start.copy_from_slice(&header[32..64]);
        Ok(SegmentHeader {
            segment_id: read_u64(header, 16),
            first_lsn: read_u64(header, 24),
            chain_start,
        })
    }
}

/// A batch body encoded by the caller's thread, before the writer gives it an LSN.
///
/// Hashing the body is the expensive part of framing, so it happens here, in parallel across
/// callers; the writer thread only hashes two fixed-size headers per batch.
#[derive(Debug)]
pub struct EncodedBody {
    pub body: Vec<u8>,
    pub body_hash: [u8; 32],
    pub record_count: u32,
}

impl EncodedBody {
    /// Bytes of the whole frame (header + body) this body becomes.
    pub fn frame_bytes(&self) -> usize {
        BATCH_HEADER_BYTES + self.body.len()
    }
}

/// Bytes that `records` occupy in a batch body.
pub fn body_bytes(records: &[WalRecord]) -> usize {
    records
        .iter()
        .map(|r| RECORD_HEADER_BYTES + r.payload.len())
        .sum()
}

/// Encodes `records` into a batch body. The caller has checked the limits.
pub fn encode_body(records: &[WalRecord]) -> EncodedBody {
    let body_len = body_bytes(records);
    assert!(
        body_len <= BATCH_BODY_BYTES_LIMIT,
        "batch body of {body_len} bytes passed validation"
    );
    let record_count =
        u32::try_from(records.len()).expect("record count validated against batch_records_max");
    assert!((1..=BATCH_RECORDS_LIMIT).contains(&record_count));
    let mut body = Vec::with_capacity(body_len);
    for record in records {
        body.push(record.kind.tag());
        body.extend_from_slice(&record.kind.group().unwrap_or(0).to_le_bytes());
        let payload_bytes =
            u32::try_from(record.payload.len()).expect("payload fits the body limit");
        body.extend_from_slice(&payload_bytes.to_le_bytes());
        body.extend_from_slice(&record.payload);
    }
    assert_eq!(body.len(), body_len);
    let body_hash = *blake3::hash(&body).as_bytes();
    EncodedBody {
        body,
        body_hash,
        record_count,
    }
}

/// Appends the frame for `encoded` with `lsn` after `prev_chain` to `out`; returns the new
/// chain hash.
pub fn encode_frame(
    out: &mut Vec<u8>,
    encoded: &EncodedBody,
    lsn: u64,
    prev_chain: &[u8; 32],
) -> [u8; 32] {
    assert!(lsn >= 1, "LSNs start at 1");
    let start = out.len();
    let body_bytes =
        u32::try_from(encoded.body.len()).expect("body validated against batch_bytes_max");
    let mut header = [0u8; BATCH_HEADER_BYTES];
    header[0..8].copy_from_slice(&BATCH_MAGIC);
    header[8..12].copy_from_slice(&body_bytes.to_le_bytes());
    header[12..16].copy_from_slice(&encoded.record_count.to_le_bytes());
    header[16..24].copy_from_slice(&lsn.to_le_bytes());
    let chain = chain_hash(prev_chain, &header[0..24], &encoded.body_hash);
    header[24..56].copy_from_slice(&chain);
    let checksum = checksum16(&[&header[0..56], &encoded.body_hash]);
    header[56..72].copy_from_slice(&checksum);
    out.extend_from_slice(&header);
    out.extend_from_slice(&encoded.body);
    assert_eq!(out.len() - start, encoded.frame_bytes());
    chain
}

/// A frame whose checksum verified, borrowed from the segment bytes.
#[derive(Debug)]
pub struct FrameView<'a> {
    pub lsn: u64,
    pub record_count: u32,
    pub chain: [u8; 32],
    /// Bytes 0..24 of the header, the part the chain hash covers.
    pub chained_fields: &'a [u8],
    pub body: &'a [u8],
    pub body_hash: [u8; 32],
    pub frame_bytes: usize,
}

impl FrameView<'_> {
    /// Whether this frame's chain hash follows from `prev_chain`.
    pub fn follows(&self, prev_chain: &[u8; 32]) -> bool {
        chain_hash(prev_chain, self.chained_fields, &self.body_hash) == self.chain
    }
}

/// Decodes the frame that starts at `offset` of `bytes` and verifies its checksum.
/// Does not check the LSN or the chain: that needs the previous frame.
pub fn decode_frame(bytes: &[u8], offset: usize) -> Result<FrameView<'_>, String> {
    assert!(offset <= bytes.len());
    let remaining = bytes.len() - offset;
    if remaining < BATCH_HEADER_BYTES {
        return Err(format!(
            "batch header needs {BATCH_HEADER_BYTES} bytes but only {remaining} remain before the end of the file"
        ));
    }
    let header = &bytes[offset..offset + BATCH_HEADER_BYTES];
    if header[0..8] != BATCH_MAGIC {
        return Err("batch magic is wrong".to_string());
    }
    let body_bytes = read_u32(header, 8) as usize;
    if body_bytes > BATCH_BODY_BYTES_LIMIT {
        return Err(format!(
            "batch length {body_bytes} exceeds the format limit {BATCH_BODY_BYTES_LIMIT}"
        ));
    }
    if body_bytes > remaining - BATCH_HEADER_BYTES {
        return Err(format!(
            "batch length {body_bytes} runs past the end of the file ({} bytes remain after the header)",
            remaining - BATCH_HEADER_BYTES
        ));
    }
    let record_count = read_u32(header, 12);
    if record_count == 0 || record_count > BATCH_RECORDS_LIMIT {
        return Err(format!(
            "batch record count {record_count} is outside 1..={BATCH_RECORDS_LIMIT}"
        ));
    }
    let body_start = offset + BATCH_HEADER_BYTES;
    let body = &bytes[body_start..body_start + body_bytes];
    let body_hash = *blake3::hash(body).as_bytes();
    if header[56..72] != checksum16(&[&header[0..56], &body_hash]) {
        return Err("batch checksum mismatch".to_string());
    }
    let mut chain = [0u8; 32];
    chain.copy_from_slice(&header[24..56]);
    Ok(FrameView {
        lsn: read_u64(header, 16),
        record_count,
        chain,
        chained_fields: &header[0..24],
        body,
        body_hash,
        frame_bytes: BATCH_HEADER_BYTES + body_bytes,
    })
}

/// Decodes the records of a verified frame. A failure here means a frame with a valid
/// checksum holds malformed records: a writer bug or a foreign file, never a torn write.
pub fn decode_records(frame: &FrameView<'_>) -> Result<Vec<WalRecord>, String> {
    let body = frame.body;
    let mut records = Vec::with_capacity(frame.record_count as usize);
    let mut at = 0usize;
    for index in 0..frame.record_count {
        if body.len() - at < RECORD_HEADER_BYTES {
            return Err(format!(
                "record {index} header runs past the end of the batch body"
            ));
        }
        let tag = body[at];
        let group = read_u64(body, at + 1);
        let payload_bytes = read_u32(body, at + 9) as usize;
        at += RECORD_HEADER_BYTES;
        if payload_bytes > body.len() - at {
            return Err(format!(
                "record {index} payload of {payload_bytes} bytes runs past the end of the batch body"
            ));
        }
        let kind = WalRecordKind::from_tag(tag, group).ok_or_else(|| {
            format!("record {index} has unknown kind tag {tag} (or a group id on a facts record)")
        })?;
        records.push(WalRecord {
            kind,
            payload: body[at..at + payload_bytes].to_vec(),
        });
        at += payload_bytes;
    }
    if at != body.len() {
        return Err(format!(
            "{} bytes left over after the last record of the batch body",
            body.len() - at
        ));
    }
    Ok(records)
}

/// Offset of the first frame at or after `from` that verifies on its own, if any.
/// Recovery uses this to tell a torn tail (nothing valid follows) from damage in the middle.
pub fn find_valid_frame(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while at + BATCH_MAGIC.len() <= bytes.len() {
        let next = memchr_magic(&bytes[at..])?;
        let candidate = at + next;
        if decode_frame(bytes, candidate).is_ok() {
            return Some(candidate);
        }
        at = candidate + 1;
    }
    None
}

fn memchr_magic(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(BATCH_MAGIC.len())
        .position(|window| window == BATCH_MAGIC)
}

/// Whether every byte of `bytes` is zero (the unwritten, preallocated rest of a segment).
pub fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

fn chain_hash(prev_chain: &[u8; 32], chained_fields: &[u8], body_hash: &[u8; 32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(prev_chain);
    hasher.update(chained_fields);
    hasher.update(body_hash);
    *hasher.finalize().as_bytes()
}

fn checksum16(parts: &[&[u8]]) -> [u8; CHECKSUM_BYTES] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = [0u8; CHECKSUM_BYTES];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..CHECKSUM_BYTES]);
    out
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> EncodedBody {
        encode_body(&[
            WalRecord::facts(b"abc".to_vec()),
            WalRecord::raft_vote(7, b"v".to_vec()),
        ])
    }

    #[test]
    fn frame_round_trips_and_chains() {
        let mut out = Vec::new();
        let chain1 = encode_frame(&mut out, &body(), 1, &CHAIN_GENESIS);
        let second_at = out.len();
        let chain2 = encode_frame(&mut out, &body(), 2, &chain1);
        let first = decode_frame(&out, 0).unwrap();
        assert_eq!(first.lsn, 1);
        assert!(first.follows(&CHAIN_GENESIS));
        let second = decode_frame(&out, second_at).unwrap();
        assert_eq!(second.chain, chain2);
        assert!(second.follows(&chain1));
        assert!(
            !second.follows(&CHAIN_GENESIS),
            "same body and a different predecessor must not chain"
        );
        let records = decode_records(&second).unwrap();
        assert_eq!(
            records,
            vec![
                WalRecord::facts(b"abc".to_vec()),
                WalRecord::raft_vote(7, b"v".to_vec())
            ]
        );
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let mut out = Vec::new();
        encode_frame(&mut out, &body(), 1, &CHAIN_GENESIS);
        for at in 0..out.len() {
            let mut damaged = out.clone();
            damaged[at] ^= 0x10;
            assert!(
                decode_frame(&damaged, 0).is_err(),
                "flip at byte {at} went unnoticed"
            );
        }
    }

    #[test]
    fn segment_header_round_trips_and_detects_damage() {
        let header = SegmentHeader {
            segment_id: 9,
            first_lsn: 42,
            chain_start: [3; 32],
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes).unwrap(), header);
        for at in 0..bytes.len() {
            let mut damaged = bytes;
            damaged[at] ^= 1;
            assert!(
                SegmentHeader::decode(&damaged).is_err(),
                "flip at byte {at} went unnoticed"
            );
        }
    }

    #[test]
    fn find_valid_frame_skips_damage() {
        let mut out = vec![0xAB; 10];
        encode_frame(&mut out, &body(), 1, &CHAIN_GENESIS);
        assert_eq!(find_valid_frame(&out, 0), Some(10));
        assert_eq!(find_valid_frame(&out, 11), None);
        out[20] ^= 1;
        assert_eq!(find_valid_frame(&out, 0), None);
    }
}
