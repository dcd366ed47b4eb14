//! Segment files: naming, listing, creation, and the in-memory index of what they hold.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::error::WalError;
use super::format::{SEGMENT_HEADER_BYTES, SegmentHeader};
use super::io::WalIo;

const SEGMENT_PREFIX: &str = "wal-";
const SEGMENT_SUFFIX: &str = ".log";
const SEGMENT_ID_DIGITS: usize = 20;

pub(crate) fn segment_file_name(segment_id: u64) -> String {
    format!("{SEGMENT_PREFIX}{segment_id:0SEGMENT_ID_DIGITS$}{SEGMENT_SUFFIX}")
}

/// The segment id in a file name, or `None` if the name is not a segment's.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_ID_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment files in `dir`, sorted by id. Other files are ignored.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut segments = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| WalError::io("list the WAL directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| WalError::io("list the WAL directory", dir, e))?;
        let name = entry.file_name();
        if let Some(segment_id) = name.to_str().and_then(parse_segment_file_name) {
            segments.push((segment_id, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(segment_id, _)| *segment_id);
    Ok(segments)
}

/// fsync of the directory, so that a created, removed or truncated file's entry is durable.
pub(crate) fn sync_dir(dir_file: &File, dir: &Path) -> Result<(), WalError> {
    dir_file
        .sync_all()
        .map_err(|e| WalError::io("fsync the WAL directory", dir, e))
}

/// Reserves `length_bytes` for `file` without changing what reads return (zeros).
///
/// Preallocation is why the tail of a segment is zeros rather than end-of-file, and it makes
/// an fdatasync cheaper: writes inside the reserved space do not grow the file, so the sync
/// commits no size change (measured here: ~50 µs instead of ~78 µs p50 on ext4). Returns
/// `Ok(false)` when the filesystem cannot preallocate; the WAL then simply appends.
pub(crate) fn preallocate(file: &File, path: &Path, length_bytes: u64) -> Result<bool, WalError> {
    let length =
        libc::off_t::try_from(length_bytes).expect("segment length bounded by SEGMENT_BYTES_LIMIT");
    // SAFETY: fallocate on an fd we own, with no pointers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, length) };
    if rc == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return Ok(false);
    }
    Err(WalError::io("preallocate", path, error))
}

/// Creates segment `header.segment_id` in `dir`: preallocates it, writes and syncs its
/// header, then syncs the directory. When this returns, the empty segment is durable.
pub(crate) fn create_segment(
    dir: &Path,
    dir_file: &File,
    header: SegmentHeader,
    segment_bytes_max: u64,
    preallocate_segment: bool,
    io: &mut dyn WalIo,
) -> Result<(File, PathBuf), WalError> {
    let path = dir.join(segment_file_name(header.segment_id));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| WalError::io("create segment", &path, e))?;
    if preallocate_segment && !preallocate(&file, &path, segment_bytes_max)? {
        tracing::warn!(path = %path.display(), "filesystem cannot preallocate WAL segments; appending instead");
    }
    io.write_durable(&file, 0, &header.encode())
        .map_err(|e| WalError::WriteFailed {
            op: e.op,
            path: path.clone(),
            source: std::sync::Arc::new(e.source),
        })?;
    sync_dir(dir_file, dir)?;
    Ok((file, path))
}

/// What one segment holds, as far as is durable.
#[derive(Debug, Clone)]
pub(crate) struct SegmentMeta {
    pub segment_id: u64,
    pub path: PathBuf,
    pub first_lsn: u64,
    pub chain_start: [u8; 32],
    /// End of the last durable batch (the next frame's offset).
    pub end_offset_bytes: u64,
    /// LSN after the last durable batch in this segment.
    pub next_lsn: u64,
    /// Chain hash of the last durable batch (the chain start if the segment is empty).
    pub end_chain: [u8; 32],
}

impl SegmentMeta {
    pub(crate) fn empty(header: SegmentHeader, path: PathBuf) -> SegmentMeta {
        SegmentMeta {
            segment_id: header.segment_id,
            path,
            first_lsn: header.first_lsn,
            chain_start: header.chain_start,
            end_offset_bytes: SEGMENT_HEADER_BYTES as u64,
            next_lsn: header.first_lsn,
            end_chain: header.chain_start,
        }
    }
}

/// The durable contents of the WAL: segments in id order, the last one active.
/// Shared by the writer (which extends it) and readers (which snapshot it).
#[derive(Debug, Clone)]
pub(crate) struct SegmentIndex {
    pub segments: Vec<SegmentMeta>,
}

impl SegmentIndex {
    pub(crate) fn active(&self) -> &SegmentMeta {
        self.segments
            .last()
            .expect("the WAL always has an active segment")
    }

    pub(crate) fn active_mut(&mut self) -> &mut SegmentMeta {
        self.segments
            .last_mut()
            .expect("the WAL always has an active segment")
    }

    pub(crate) fn check_invariants(&self) {
        assert!(!self.segments.is_empty());
        for pair in self.segments.windows(2) {
            assert_eq!(
                pair[0].segment_id + 1,
                pair[1].segment_id,
                "segment ids are dense"
            );
            assert_eq!(
                pair[0].next_lsn, pair[1].first_lsn,
                "LSNs continue across segments"
            );
            assert_eq!(
                pair[0].end_chain, pair[1].chain_start,
                "the chain continues across segments"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_file_name(1), "wal-00000000000000000001.log");
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_segment_file_name("wal-1.log"), None);
        assert_eq!(
            parse_segment_file_name("wal-0000000000000000000a.log"),
            None
        );
        assert_eq!(parse_segment_file_name("wal.lock"), None);
    }
}
