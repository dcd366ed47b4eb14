//! The records both paths write: gossip facts and per-group Raft records.
//!
//! Payloads are opaque bytes: the kernel's fact encoding and the Raft log store own what is
//! inside. The WAL owns only the kind (so replay can route a record without decoding it)
//! and the group id of Raft records (so one stream serves every group in order).

use std::fmt;

/// What a record is, and for Raft records which group it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalRecordKind {
    /// Admitted gossip facts (commutative path).
    Facts,
    /// A Raft group's vote (term and voted-for).
    RaftVote { group: u64 },
    /// Raft log entries appended to a group's log.
    RaftEntries { group: u64 },
    /// A group's log truncated from an index on (conflicting suffix removed).
    RaftTruncate { group: u64 },
    /// A group's log purged up to an index (covered by a snapshot).
    RaftPurge { group: u64 },
    /// A group's committed index.
    RaftCommitted { group: u64 },
}

impl WalRecordKind {
    /// The Raft group this record belongs to; `None` for facts.
    pub fn group(&self) -> Option<u64> {
        match *self {
            WalRecordKind::Facts => None,
            WalRecordKind::RaftVote { group }
            | WalRecordKind::RaftEntries { group }
            | WalRecordKind::RaftTruncate { group }
            | WalRecordKind::RaftPurge { group }
            | WalRecordKind::RaftCommitted { group } => Some(group),
        }
    }

    /// The on-disk tag. Tags are part of the format: never renumber them.
    pub(crate) fn tag(&self) -> u8 {
        match self {
            WalRecordKind::Facts => 1,
            WalRecordKind::RaftVote { .. } => 2,
            WalRecordKind::RaftEntries { .. } => 3,
            WalRecordKind::RaftTruncate { .. } => 4,
            WalRecordKind::RaftPurge { .. } => 5,
            WalRecordKind::RaftCommitted { .. } => 6,
        }
    }

    /// Inverse of [`tag`](Self::tag); `None` for an unknown tag or a facts record that
    /// carries a group id (the writer always stores 0 there).
    pub(crate) fn from_tag(tag: u8, group: u64) -> Option<WalRecordKind> {
        Some(match tag {
            1 if group == 0 => WalRecordKind::Facts,
            2 => WalRecordKind::RaftVote { group },
            3 => WalRecordKind::RaftEntries { group },
            4 => WalRecordKind::RaftTruncate { group },
            5 => WalRecordKind::RaftPurge { group },
            6 => WalRecordKind::RaftCommitted { group },
            _ => return None,
        })
    }
}

/// One record of a batch: a kind and opaque payload bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WalRecord {
    pub kind: WalRecordKind,
    pub payload: Vec<u8>,
}

impl WalRecord {
    pub fn facts(payload: Vec<u8>) -> WalRecord {
        WalRecord {
            kind: WalRecordKind::Facts,
            payload,
        }
    }

    pub fn raft_vote(group: u64, payload: Vec<u8>) -> WalRecord {
        WalRecord {
            kind: WalRecordKind::RaftVote { group },
            payload,
        }
    }

    pub fn raft_entries(group: u64, payload: Vec<u8>) -> WalRecord {
        WalRecord {
            kind: WalRecordKind::RaftEntries { group },
            payload,
        }
    }

    pub fn raft_truncate(group: u64, payload: Vec<u8>) -> WalRecord {
        WalRecord {
            kind: WalRecordKind::RaftTruncate { group },
            payload,
        }
    }

    pub fn raft_purge(group: u64, payload: Vec<u8>) -> WalRecord {
        WalRecord {
            kind: WalRecordKind::RaftPurge { group },
            payload,
        }
    }

    pub fn raft_committed(group: u64, payload: Vec<u8>) -> WalRecord {
        WalRecord {
            kind: WalRecordKind::RaftCommitted { group },
            payload,
        }
    }
}

impl fmt::Debug for WalRecord {
    // Payloads can be megabytes of Raft entries; show their size, not their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WalRecord")
            .field("kind", &self.kind)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// Where a durable batch is: its LSN (batch sequence number, 1-based, dense, in append order
/// across all segments) and the segment and byte offset of its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalPosition {
    pub lsn: u64,
    pub segment_id: u64,
    pub offset_bytes: u64,
}

impl fmt::Display for WalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lsn {} (segment {}, offset {})",
            self.lsn, self.segment_id, self.offset_bytes
        )
    }
}

/// One batch read back from the WAL: where it is and its records, in append order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalBatch {
    pub position: WalPosition,
    pub records: Vec<WalRecord>,
}
