//! Errors of the WAL. Each says what went wrong and what the operator or caller can do.
//!
//! `WalError` is `Clone` because one failed group commit fails every caller in the group.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// The I/O step that failed inside a [`WalIo`](super::WalIo) backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalIoOp {
    Write,
    Fdatasync,
}

impl fmt::Display for WalIoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WalIoOp::Write => "write",
            WalIoOp::Fdatasync => "fdatasync",
        })
    }
}

/// A failure reported by a [`WalIo`](super::WalIo) backend.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed: {source}")]
pub struct WalIoError {
    pub op: WalIoOp,
    #[source]
    pub source: io::Error,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WalError {
    #[error("invalid WAL options: {reason}")]
    InvalidOptions { reason: String },

    #[error(
        "WAL I/O error: could not {action} {path}: {source}; check the disk, permissions and free space"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    #[error(
        "WAL directory {dir} is in use by another process (lock {source}); stop the other process or use another data directory"
    )]
    Locked {
        dir: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    #[error(
        "WAL corruption in {path} at byte offset {offset_bytes}: {reason}. This is not a provably torn tail, so the \
         WAL will not cut it off (that could lose acknowledged records). Restore this node from a checkpoint or a \
         replica, or move the damaged files aside after inspecting them"
    )]
    Corrupt {
        path: PathBuf,
        offset_bytes: u64,
        reason: String,
    },

    #[error(
        "the io_uring WAL backend was requested but io_uring is unavailable ({source}); allow io_uring (e.g. the \
         container's seccomp profile) or use WalBackend::Auto or WalBackend::Pwrite"
    )]
    IoUringUnavailable {
        #[source]
        source: Arc<io::Error>,
    },

    #[error(
        "WAL {op} failed on {path}: {source}. This batch is NOT durable and the WAL is now poisoned: no later append \
         will be accepted. Restart the node; recovery replays the durable prefix"
    )]
    WriteFailed {
        op: WalIoOp,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    #[error(
        "WAL is poisoned by an earlier fatal I/O error ({cause}); appends are refused because durability can no \
         longer be proven. Restart the node; recovery replays the durable prefix"
    )]
    Poisoned { cause: String },

    #[error("WAL is closed")]
    Closed,

    #[error("an append needs at least one record")]
    EmptyBatch,

    #[error(
        "batch has {records} records, more than batch_records_max = {batch_records_max}; split it"
    )]
    TooManyRecords {
        records: usize,
        batch_records_max: u32,
    },

    #[error(
        "batch frame would be {frame_bytes} bytes, more than batch_bytes_max = {batch_bytes_max}; split it or raise \
         batch_bytes_max"
    )]
    BatchTooLarge {
        frame_bytes: usize,
        batch_bytes_max: u32,
    },

    #[error(
        "WAL queue is full ({queued_records} records, {queued_bytes} bytes queued; queue_records_max = \
         {queue_records_max}, queue_bytes_max = {queue_bytes_max}); retry once earlier appends are durable"
    )]
    QueueFull {
        queued_records: usize,
        queued_bytes: usize,
        queue_records_max: usize,
        queue_bytes_max: usize,
    },

    #[error(
        "LSN {requested_lsn} is no longer in the WAL: the oldest kept segment starts at LSN {oldest_lsn} (older \
         segments were removed after a checkpoint); replay from a checkpoint that covers it"
    )]
    LsnRemoved { requested_lsn: u64, oldest_lsn: u64 },
}

impl WalError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: io::Error,
    ) -> WalError {
        WalError::Io {
            action,
            path: path.into(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        offset_bytes: u64,
        reason: impl Into<String>,
    ) -> WalError {
        WalError::Corrupt {
            path: path.into(),
            offset_bytes,
            reason: reason.into(),
        }
    }
}
