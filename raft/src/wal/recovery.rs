//! Recovery: validate every segment on open, find the durable end, and repair a provably
//! torn tail — nothing else.
//!
//! # The torn-tail rule
//!
//! A crash can leave the last group commit partly written: only bytes after the last batch
//! that was made durable can be damaged, and only in the last segment (the writer syncs a
//! segment completely before it creates the next one). So recovery cuts bytes off only when
//! all of these hold:
//!
//! 1. the damage is in the **last** segment;
//! 2. every batch before it verifies (checksum, LSN sequence, chain hash);
//! 3. **no frame that verifies on its own starts anywhere after the damaged offset** (a later
//!    valid frame proves the damaged bytes were once followed by durable data, so they may
//!    have been acknowledged);
//! 4. the non-zero bytes after the damaged offset span at most `group_bytes_max` (more than
//!    one group commit's worth of bytes cannot come from one interrupted write).
//!
//! Bytes that are all zero after the last valid batch are the unwritten (preallocated) rest
//! of the segment, not damage. A last segment whose header does not verify and that holds no
//! valid frame at all is an interrupted segment creation (nothing in it was ever
//! acknowledged) and is removed.
//!
//! Anything else — a bad frame in a segment that is not the last, a bad frame followed by a
//! valid one, a valid frame with the wrong LSN or chain hash, a missing segment — stops
//! recovery with [`WalError::Corrupt`] naming the file and byte offset.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::error::WalError;
use super::format::{
    CHAIN_GENESIS, SEGMENT_BYTES_LIMIT, SEGMENT_HEADER_BYTES, SegmentHeader, all_zero,
    decode_frame, decode_records, find_valid_frame,
};
use super::segment::{SegmentMeta, list_segments, preallocate, sync_dir, zero_fill};

/// How a scan of one segment ended.
#[derive(Debug)]
pub(crate) enum SegmentScan {
    /// The segment's batches verified; `torn_at` is set when a provably torn tail follows them.
    Valid {
        meta: SegmentMeta,
        torn_at: Option<(u64, String)>,
    },
    /// The last segment's header is damaged and it holds no valid frame: its creation was
    /// interrupted.
    InterruptedCreation { reason: String },
}

/// What [`Wal::open`](super::Wal::open) found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalRecoveryReport {
    /// Segments kept (before any new one is created for an empty WAL).
    pub segments: usize,
    /// Batches found in them.
    pub batches: u64,
    /// The torn tail that was cut off: the last segment, the offset it was cut at, and why
    /// the bytes there did not verify.
    pub torn_tail: Option<(PathBuf, u64, String)>,
    /// A last segment whose creation was interrupted, removed.
    pub removed_segment: Option<PathBuf>,
}

/// The chain position a segment must continue from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChainPoint {
    pub next_lsn: u64,
    pub chain: [u8; 32],
}

/// Validates every segment in `dir`, repairs a provably torn tail, and returns the segments.
/// An empty result means a new WAL.
pub(crate) fn recover(
    dir: &Path,
    dir_file: &File,
    group_bytes_max: usize,
    preallocate_bytes: Option<u64>,
) -> Result<(Vec<SegmentMeta>, WalRecoveryReport), WalError> {
    let mut report = WalRecoveryReport::default();
    let listed = list_segments(dir)?;
    for pair in listed.windows(2) {
        if pair[0].0 + 1 != pair[1].0 {
            return Err(WalError::corrupt(
                &pair[1].1,
                0,
                format!(
                    "segment {} is missing: segments must be consecutive",
                    pair[0].0 + 1
                ),
            ));
        }
    }
    let mut metas: Vec<SegmentMeta> = Vec::with_capacity(listed.len());
    for (index, (segment_id, path)) in listed.iter().enumerate() {
        let is_last = index + 1 == listed.len();
        let bytes = read_segment(path)?;
        let expected = metas.last().map(|m| ChainPoint {
            next_lsn: m.next_lsn,
            chain: m.end_chain,
        });
        match scan_segment(
            path,
            *segment_id,
            &bytes,
            expected,
            is_last,
            group_bytes_max,
        )? {
            SegmentScan::InterruptedCreation { reason } => {
                assert!(is_last);
                // Segment N > 1 is only ever created while segment N - 1 exists (it is the
                // active one and is never removed), so a lone damaged segment N > 1 cannot be
                // an interrupted creation: removing it would restart LSNs below a checkpoint.
                if metas.is_empty() && *segment_id != 1 {
                    return Err(WalError::corrupt(
                        path,
                        0,
                        format!(
                            "{reason}; it is the only segment and not segment 1, so it cannot be an interrupted creation"
                        ),
                    ));
                }
                tracing::warn!(path = %path.display(), %reason, "removing WAL segment whose creation was interrupted (it holds no batch)");
                fs::remove_file(path)
                    .map_err(|e| WalError::io("remove interrupted segment", path, e))?;
                sync_dir(dir_file, dir)?;
                report.removed_segment = Some(path.clone());
            }
            SegmentScan::Valid { meta, torn_at } => {
                if let Some((offset_bytes, reason)) = torn_at {
                    assert!(is_last);
                    tracing::warn!(
                        path = %path.display(), offset_bytes, %reason,
                        "truncating the torn tail of the last WAL segment (an interrupted, never acknowledged write)"
                    );
                    cut_torn_tail(path, offset_bytes, preallocate_bytes)?;
                    report.torn_tail = Some((path.clone(), offset_bytes, reason));
                }
                report.batches += meta.next_lsn - meta.first_lsn;
                metas.push(meta);
            }
        }
    }
    report.segments = metas.len();
    Ok((metas, report))
}

/// Reads a whole segment (bounded by [`SEGMENT_BYTES_LIMIT`]).
pub(crate) fn read_segment(path: &Path) -> Result<Vec<u8>, WalError> {
    let length_bytes = fs::metadata(path)
        .map_err(|e| WalError::io("stat segment", path, e))?
        .len();
    if length_bytes > SEGMENT_BYTES_LIMIT {
        return Err(WalError::corrupt(
            path,
            0,
            format!(
                "segment is {length_bytes} bytes, more than the format limit {SEGMENT_BYTES_LIMIT}"
            ),
        ));
    }
    fs::read(path).map_err(|e| WalError::io("read segment", path, e))
}

/// Verifies one segment's header and batches. See the module docs for the rule.
pub(crate) fn scan_segment(
    path: &Path,
    segment_id: u64,
    bytes: &[u8],
    expected: Option<ChainPoint>,
    is_last: bool,
    group_bytes_max: usize,
) -> Result<SegmentScan, WalError> {
    let header = match SegmentHeader::decode(bytes) {
        Ok(header) => header,
        Err(reason) => {
            return match (is_last, find_valid_frame(bytes, 0)) {
                (true, None) => Ok(SegmentScan::InterruptedCreation { reason }),
                (true, Some(frame_at)) => Err(WalError::corrupt(
                    path,
                    0,
                    format!(
                        "{reason}; a valid batch follows at offset {frame_at}, so this is not an interrupted segment creation"
                    ),
                )),
                (false, _) => Err(WalError::corrupt(path, 0, reason)),
            };
        }
    };
    if header.segment_id != segment_id {
        return Err(WalError::corrupt(
            path,
            0,
            format!(
                "header names segment {} but the file name says {segment_id} (renamed or copied file?)",
                header.segment_id
            ),
        ));
    }
    let start = expected.unwrap_or(ChainPoint {
        next_lsn: header.first_lsn,
        chain: header.chain_start,
    });
    if header.first_lsn != start.next_lsn {
        return Err(WalError::corrupt(
            path,
            0,
            format!(
                "segment starts at LSN {} but the previous segment ends before LSN {} (segment missing, replaced or reordered)",
                header.first_lsn, start.next_lsn
            ),
        ));
    }
    if header.chain_start != start.chain {
        return Err(WalError::corrupt(
            path,
            0,
            "segment chain start does not match the chain hash at the end of the previous segment (segment replaced or stale)",
        ));
    }
    if expected.is_none() && header.first_lsn == 1 && header.chain_start != CHAIN_GENESIS {
        return Err(WalError::corrupt(
            path,
            0,
            "the first segment of the WAL does not start from the genesis chain hash",
        ));
    }
    if header.first_lsn == 0 {
        return Err(WalError::corrupt(
            path,
            0,
            "segment header has first LSN 0 (LSNs start at 1)",
        ));
    }

    let mut meta = SegmentMeta::empty(header, path.to_path_buf());
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut torn_at = None;
    while offset < bytes.len() {
        let frame = match decode_frame(bytes, offset) {
            Ok(frame) => frame,
            Err(reason) => {
                torn_at = classify_damage(path, bytes, offset, reason, is_last, group_bytes_max)?;
                break;
            }
        };
        if frame.lsn != meta.next_lsn {
            return Err(WalError::corrupt(
                path,
                offset as u64,
                format!(
                    "batch has LSN {} where LSN {} was expected (reordered or stale batch)",
                    frame.lsn, meta.next_lsn
                ),
            ));
        }
        if !frame.follows(&meta.end_chain) {
            return Err(WalError::corrupt(
                path,
                offset as u64,
                format!(
                    "batch LSN {} breaks the hash chain (reordered, stale or replaced batch)",
                    frame.lsn
                ),
            ));
        }
        if let Err(reason) = decode_records(&frame) {
            return Err(WalError::corrupt(
                path,
                offset as u64,
                format!("batch LSN {}: {reason}", frame.lsn),
            ));
        }
        offset += frame.frame_bytes;
        meta.next_lsn += 1;
        meta.end_chain = frame.chain;
        meta.end_offset_bytes = offset as u64;
    }
    assert!(meta.end_offset_bytes as usize <= bytes.len());
    Ok(SegmentScan::Valid { meta, torn_at })
}

/// Decides what bytes that do not decode as a frame at `offset` are: the clean end
/// (`Ok(None)`), a provably torn tail (`Ok(Some(..))`), or corruption (`Err`).
fn classify_damage(
    path: &Path,
    bytes: &[u8],
    offset: usize,
    reason: String,
    is_last: bool,
    group_bytes_max: usize,
) -> Result<Option<(u64, String)>, WalError> {
    let rest = &bytes[offset..];
    if all_zero(rest) {
        return Ok(None);
    }
    if !is_last {
        return Err(WalError::corrupt(
            path,
            offset as u64,
            format!(
                "{reason}, in a segment that is not the last (only the last segment can have a torn tail)"
            ),
        ));
    }
    if let Some(frame_at) = find_valid_frame(bytes, offset + 1) {
        return Err(WalError::corrupt(
            path,
            offset as u64,
            format!(
                "{reason}; a valid batch follows at offset {frame_at}, so this is not a torn tail"
            ),
        ));
    }
    let nonzero_end = offset
        + rest
            .iter()
            .rposition(|&b| b != 0)
            .expect("rest is not all zero")
        + 1;
    let damaged_bytes = nonzero_end - offset;
    if damaged_bytes > group_bytes_max {
        return Err(WalError::corrupt(
            path,
            offset as u64,
            format!(
                "{reason}; {damaged_bytes} damaged bytes follow, more than one group commit (group_bytes_max = {group_bytes_max}) can leave, so this is not a torn tail"
            ),
        ));
    }
    Ok(Some((offset as u64, reason)))
}

/// Cuts the last segment at `offset_bytes` (durably), then re-reserves its space so that the
/// rest reads as zeros and appends can continue at `offset_bytes`.
fn cut_torn_tail(
    path: &PathBuf,
    offset_bytes: u64,
    preallocate_bytes: Option<u64>,
) -> Result<(), WalError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| WalError::io("open segment", path, e))?;
    file.set_len(offset_bytes)
        .map_err(|e| WalError::io("truncate torn tail of", path, e))?;
    file.sync_all()
        .map_err(|e| WalError::io("fsync segment", path, e))?;
    if let Some(length_bytes) = preallocate_bytes {
        let length_bytes = length_bytes.max(offset_bytes);
        if preallocate(&file, path, length_bytes)? {
            zero_fill(path, offset_bytes, length_bytes)?;
        }
        file.sync_all()
            .map_err(|e| WalError::io("fsync segment", path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::format::{encode_body, encode_frame};
    use crate::wal::record::WalRecord;

    const GROUP_BYTES_MAX: usize = 1 << 20;

    fn segment(frames: u64, tail: &[u8]) -> (Vec<u8>, Vec<usize>) {
        let header = SegmentHeader {
            segment_id: 1,
            first_lsn: 1,
            chain_start: CHAIN_GENESIS,
        };
        let mut bytes = header.encode().to_vec();
        let mut chain = CHAIN_GENESIS;
        let mut starts = Vec::new();
        for lsn in 1..=frames {
            starts.push(bytes.len());
            let body = encode_body(&[WalRecord::facts(vec![lsn as u8; 40])]);
            chain = encode_frame(&mut bytes, &body, lsn, &chain);
        }
        bytes.extend_from_slice(tail);
        (bytes, starts)
    }

    fn scan(bytes: &[u8], is_last: bool) -> Result<SegmentScan, WalError> {
        scan_segment(
            Path::new("wal-00000000000000000001.log"),
            1,
            bytes,
            None,
            is_last,
            GROUP_BYTES_MAX,
        )
    }

    #[test]
    fn zeros_after_the_last_batch_are_a_clean_end() {
        let (bytes, _) = segment(3, &[0; 500]);
        match scan(&bytes, false).unwrap() {
            SegmentScan::Valid {
                meta,
                torn_at: None,
            } => assert_eq!(meta.next_lsn, 4),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_partial_last_frame_is_torn_only_in_the_last_segment() {
        let (full, starts) = segment(3, &[]);
        let cut = starts[2] + 30;
        let mut bytes = full[..cut].to_vec();
        bytes.extend_from_slice(&[0; 100]);
        match scan(&bytes, true).unwrap() {
            SegmentScan::Valid {
                meta,
                torn_at: Some((at, _)),
            } => {
                assert_eq!(at as usize, starts[2]);
                assert_eq!(meta.next_lsn, 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            matches!(scan(&bytes, false), Err(WalError::Corrupt { offset_bytes, .. }) if offset_bytes as usize == starts[2])
        );
    }

    #[test]
    fn damage_followed_by_a_valid_frame_is_corruption() {
        let (mut bytes, starts) = segment(3, &[]);
        bytes[starts[1] + 80] ^= 0xFF;
        assert!(
            matches!(scan(&bytes, true), Err(WalError::Corrupt { offset_bytes, .. }) if offset_bytes as usize == starts[1])
        );
    }

    #[test]
    fn too_much_garbage_is_not_a_torn_tail() {
        let (bytes, _) = segment(1, &vec![0x5A; GROUP_BYTES_MAX + 1]);
        assert!(matches!(scan(&bytes, true), Err(WalError::Corrupt { .. })));
        let (bytes, _) = segment(1, &vec![0x5A; GROUP_BYTES_MAX]);
        assert!(matches!(
            scan(&bytes, true),
            Ok(SegmentScan::Valid {
                torn_at: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn a_reordered_frame_breaks_the_sequence() {
        let (bytes, starts) = segment(3, &[]);
        // Swap frames 2 and 3 (equal sizes): each verifies alone, the sequence does not.
        let len = starts[2] - starts[1];
        let mut swapped = bytes[..starts[1]].to_vec();
        swapped.extend_from_slice(&bytes[starts[2]..starts[2] + len]);
        swapped.extend_from_slice(&bytes[starts[1]..starts[2]]);
        assert!(
            matches!(scan(&swapped, true), Err(WalError::Corrupt { offset_bytes, .. }) if offset_bytes as usize == starts[1])
        );
    }

    #[test]
    fn a_damaged_header_without_frames_is_an_interrupted_creation() {
        let (mut bytes, _) = segment(0, &[0; 64]);
        bytes[3] ^= 1;
        assert!(matches!(
            scan(&bytes, true),
            Ok(SegmentScan::InterruptedCreation { .. })
        ));
        assert!(matches!(scan(&bytes, false), Err(WalError::Corrupt { .. })));
        let (mut bytes, _) = segment(2, &[]);
        bytes[3] ^= 1;
        assert!(matches!(
            scan(&bytes, true),
            Err(WalError::Corrupt {
                offset_bytes: 0,
                ..
            })
        ));
    }
}
