//! Reading batches back, from an LSN forward (replay after a checkpoint).
//!
//! A reader works on a snapshot of the segment index taken when it is created, so it reads
//! exactly the batches that were durable then, even while the writer keeps appending. It
//! verifies every frame again (checksum, LSN, chain), one segment in memory at a time.

use std::collections::VecDeque;

use super::error::WalError;
use super::format::{SEGMENT_HEADER_BYTES, SegmentHeader, decode_frame, decode_records};
use super::record::{WalBatch, WalPosition};
use super::recovery::read_segment;
use super::segment::SegmentMeta;

/// Iterator over durable batches with `lsn >= from_lsn`, in LSN order.
/// Yields an error (and then ends) if a segment was removed meanwhile or fails to verify.
pub struct WalReader {
    from_lsn: u64,
    segments: VecDeque<SegmentMeta>,
    current: Option<LoadedSegment>,
    failed: bool,
}

struct LoadedSegment {
    meta: SegmentMeta,
    bytes: Vec<u8>,
    offset: usize,
    next_lsn: u64,
    chain: [u8; 32],
}

impl WalReader {
    pub(crate) fn new(from_lsn: u64, segments: Vec<SegmentMeta>) -> WalReader {
        WalReader {
            from_lsn,
            segments: segments.into(),
            current: None,
            failed: false,
        }
    }

    fn load(meta: SegmentMeta) -> Result<LoadedSegment, WalError> {
        let mut bytes = read_segment(&meta.path)?;
        let end = meta.end_offset_bytes as usize;
        if bytes.len() < end {
            return Err(WalError::corrupt(
                &meta.path,
                bytes.len() as u64,
                format!(
                    "segment is shorter than its durable end at offset {end} (truncated behind the WAL's back?)"
                ),
            ));
        }
        bytes.truncate(end);
        let header = SegmentHeader::decode(&bytes)
            .map_err(|reason| WalError::corrupt(&meta.path, 0, reason))?;
        if header.first_lsn != meta.first_lsn
            || header.chain_start != meta.chain_start
            || header.segment_id != meta.segment_id
        {
            return Err(WalError::corrupt(
                &meta.path,
                0,
                "segment header changed since the WAL was opened",
            ));
        }
        Ok(LoadedSegment {
            next_lsn: meta.first_lsn,
            chain: meta.chain_start,
            meta,
            bytes,
            offset: SEGMENT_HEADER_BYTES,
        })
    }

    fn next_batch(&mut self) -> Result<Option<WalBatch>, WalError> {
        loop {
            let exhausted = match &self.current {
                Some(segment) => segment.offset >= segment.bytes.len(),
                None => true,
            };
            if exhausted {
                if let Some(segment) = &self.current {
                    assert_eq!(
                        segment.next_lsn, segment.meta.next_lsn,
                        "a segment ends at its durable end"
                    );
                }
                match self.segments.pop_front() {
                    Some(meta) => self.current = Some(Self::load(meta)?),
                    None => return Ok(None),
                }
                continue;
            }
            let segment = self.current.as_mut().expect("not exhausted");
            let path = &segment.meta.path;
            let offset = segment.offset;
            let frame = decode_frame(&segment.bytes, offset)
                .map_err(|reason| WalError::corrupt(path, offset as u64, reason))?;
            if frame.lsn != segment.next_lsn || !frame.follows(&segment.chain) {
                return Err(WalError::corrupt(
                    path,
                    offset as u64,
                    format!(
                        "batch LSN {} does not continue the chain at LSN {}",
                        frame.lsn, segment.next_lsn
                    ),
                ));
            }
            segment.offset += frame.frame_bytes;
            segment.next_lsn += 1;
            segment.chain = frame.chain;
            if frame.lsn < self.from_lsn {
                continue;
            }
            let records = decode_records(&frame)
                .map_err(|reason| WalError::corrupt(path, offset as u64, reason))?;
            let position = WalPosition {
                lsn: frame.lsn,
                segment_id: segment.meta.segment_id,
                offset_bytes: offset as u64,
            };
            return Ok(Some(WalBatch { position, records }));
        }
    }
}

impl Iterator for WalReader {
    type Item = Result<WalBatch, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_batch() {
            Ok(batch) => batch.map(Ok),
            Err(error) => {
                self.failed = true;
                Some(Err(error))
            }
        }
    }
}

impl std::fmt::Debug for WalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalReader")
            .field("from_lsn", &self.from_lsn)
            .field("segments_left", &self.segments.len())
            .finish_non_exhaustive()
    }
}
