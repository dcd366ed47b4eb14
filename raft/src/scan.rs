//! Ordered reads over one node's keys: the storage side of `Kv.Scan`.
//!
//! # Why the order comes from RocksDB
//!
//! The replica keeps every key in a hash table: the fast path admits a fact with one probe
//! and no allocation, and that is the hot path. Scans need key order. The choices were an
//! ordered index beside the table (a `BTreeSet` of the keys: a second copy of every key plus
//! ~30 B of tree node per key, ~50 B per 16-byte key, paid by every node for every key
//! whether anyone scans or not), replacing the table with an ordered map (every point op
//! pays O(log n) comparisons through pointers, several cache misses at a million keys), or
//! the state store, which already holds every key sorted. We take the store: **no memory
//! per key**, and point ops unchanged.
//!
//! The store lags the replica by at most one persist interval, and only in one way: keys
//! are never removed (a delete leaves a tombstone), so every key the replica holds is in the
//! store, or dirty in the replica, or in a persist job that has not ended. A chunk reads up
//! to `keys_max` keys with their states from a RocksDB iterator *without* the state lock,
//! then, under it, merges the dirty and in-flight keys of the same span. Those keys' values
//! come from the replica; every other key's stored state is the replica's too (a key that
//! changed since it was stored is dirty or in flight). If a persist job ended between the
//! two steps, keys it wrote may be in neither the iterator's snapshot nor the merged set,
//! and a key it stored may have changed since the snapshot without being dirty any more;
//! the chunk notices by the number of ended jobs and reads the store again, and its last
//! attempt holds the lock throughout.
//!
//! Taking stored keys' values from the iterator, not the replica, matters twice: the lock is
//! held only to merge and to read the few unpersisted keys, and the values come in key
//! order from RocksDB blocks instead of one cache miss after another in a hash table
//! (measured: 28% of a scan's CPU was the replica's lookups). RocksDB I/O never happens
//! under the lock on the first attempts, so scans do not stall admissions or applies the
//! way a full copy under the lock would (etcd #22264 is that failure for watchers).
//!
//! Everything one chunk returns comes from one hold of the lock: the values, the version
//! vector and each group's applied index describe one state of this replica.

use crate::consensus::state_machine::{SharedLocal, decode_applied, lock_local};
use crate::local::{LocalError, LocalState};
use calm_kernel::VersionVector;
use calm_kernel::state::{KeyRecord, Value};
use std::collections::BTreeMap;

/// Reads of the store's keys without the lock before a chunk holds it throughout.
const EPOCH_ATTEMPTS_MAX: usize = 3;

/// A span of keys: `start <= key`, and `key < end` when there is an end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key starting with `prefix` (every key for an empty prefix).
    pub fn prefix(prefix: &[u8]) -> KeyRange {
        KeyRange {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// The first key after every key starting with `prefix`; `None` when there is none (the
/// prefix is empty or all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The smallest key after `key`.
pub fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// How much one chunk may hold.
#[derive(Clone, Copy, Debug)]
pub struct ChunkLimits {
    /// Most entries.
    pub keys_max: usize,
    /// Entries stop once keys and values add up to this (at least one entry is returned).
    pub bytes_max: usize,
    /// Copy each key's value (else only its key).
    pub values: bool,
}

/// Keys of a range in order, as one state of this replica held them.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Existing keys (tombstones are skipped), with their values if asked for.
    pub entries: Vec<(Vec<u8>, Option<Value>)>,
    /// Keys and values of `entries`, as counted against `bytes_max`.
    pub bytes: usize,
    /// Where the next chunk of the range starts (inclusive); `None`: the range is done.
    pub resume: Option<Vec<u8>>,
    /// The facts this replica had applied.
    pub vv: VersionVector,
    /// Each Raft group's applied index.
    pub applied: BTreeMap<u64, u64>,
}

/// Read the chunk of `range` starting at `from` (inclusive). Blocking (RocksDB I/O): call
/// from a blocking thread. An error is the store's I/O failing.
pub fn read_chunk(
    local: &SharedLocal,
    range: &KeyRange,
    from: &[u8],
    limits: ChunkLimits,
) -> Result<Chunk, LocalError> {
    read_chunk_interleaved(local, range, from, limits, |_| {})
}

/// [`read_chunk`], calling `between(attempt)` after each read of the store without the lock
/// and before taking it: where tests put what may happen there (a whole persist).
#[doc(hidden)]
pub fn read_chunk_interleaved(
    local: &SharedLocal,
    range: &KeyRange,
    from: &[u8],
    limits: ChunkLimits,
    mut between: impl FnMut(usize),
) -> Result<Chunk, LocalError> {
    assert!(limits.keys_max > 0, "a chunk holds at least one key");
    assert!(range.contains(from), "a chunk starts inside its range");
    let end = range.end.as_deref();
    for attempt in 0..EPOCH_ATTEMPTS_MAX {
        let (epoch, store) = lock_local(local).scan_epoch();
        let stored = store.records_from(from, end, limits.keys_max)?;
        between(attempt);
        let state = lock_local(local);
        if let Some(chunk) = merge(&state, epoch, stored, from, end, limits) {
            return Ok(chunk);
        }
    }
    // Persists kept ending in between (a tiny persist interval under load): hold the lock
    // while reading the store, so none can.
    let state = lock_local(local);
    let (epoch, store) = state.scan_epoch();
    let stored = store.records_from(from, end, limits.keys_max)?;
    Ok(merge(&state, epoch, stored, from, end, limits).expect("no persist ends under the lock"))
}

/// The chunk from `stored` (the store's keys from `from`, at most `keys_max`, with their
/// states) and the keys the store may lack; `None` if a persist ended since `epoch`.
fn merge(
    state: &LocalState,
    epoch: u64,
    stored: Vec<(Vec<u8>, KeyRecord)>,
    from: &[u8],
    end: Option<&[u8]>,
    limits: ChunkLimits,
) -> Option<Chunk> {
    // A full read of the store covers the span up to its last key; keys after it are the
    // next chunk's, wherever they are.
    let covered_to = if stored.len() == limits.keys_max {
        stored.last().map(|(k, _)| k.clone())
    } else {
        None
    };
    let mut unstored = state.scan_keys(epoch, from, end)?;
    if let Some(last) = &covered_to {
        unstored.retain(|k| k <= last);
    }
    let replica = state.replica();
    let mut chunk = Chunk {
        vv: replica.version_vector().clone(),
        applied: state
            .group_positions()
            .map(|(group, position)| {
                let index = decode_applied(position)
                    .ok()
                    .flatten()
                    .map_or(0, |log_id| log_id.index);
                (group, index)
            })
            .collect(),
        ..Chunk::default()
    };
    for (key, source) in merge_sorted(stored, unstored) {
        let full = chunk.entries.len() == limits.keys_max
            || (!chunk.entries.is_empty() && chunk.bytes >= limits.bytes_max);
        if full {
            chunk.resume = Some(key);
            return Some(chunk);
        }
        let state = match &source {
            Source::Stored(record) => record.visible().then_some(&record.state),
            Source::Replica => replica.key_state(&key),
        };
        let Some(state) = state else { continue };
        let value = limits.values.then(|| state.value());
        chunk.bytes += key.len() + value.as_ref().map_or(0, value_bytes);
        chunk.entries.push((key, value));
    }
    chunk.resume = covered_to
        .map(|last| key_after(&last))
        .filter(|next| end.is_none_or(|end| next.as_slice() < end));
    Some(chunk)
}

/// Where a merged key's state is read.
enum Source {
    /// The store's state, which is the replica's (the key is neither dirty nor in flight).
    Stored(KeyRecord),
    /// The replica (the store may lack the key or hold an older state).
    Replica,
}

/// The store's keys and the unstored ones as one sorted, distinct list; a key in both is
/// read from the replica.
fn merge_sorted(
    stored: Vec<(Vec<u8>, KeyRecord)>,
    unstored: Vec<Vec<u8>>,
) -> Vec<(Vec<u8>, Source)> {
    let mut out = Vec::with_capacity(stored.len() + unstored.len());
    let (mut a, mut b) = (
        stored.into_iter().peekable(),
        unstored.into_iter().peekable(),
    );
    loop {
        let next = match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some(_), None) => a.next().map(|(k, r)| (k, Source::Stored(r))),
            (None, Some(_)) => b.next().map(|k| (k, Source::Replica)),
            (Some((x, _)), Some(y)) => match x.as_slice().cmp(y.as_slice()) {
                std::cmp::Ordering::Less => a.next().map(|(k, r)| (k, Source::Stored(r))),
                std::cmp::Ordering::Greater => b.next().map(|k| (k, Source::Replica)),
                std::cmp::Ordering::Equal => {
                    a.next();
                    b.next().map(|k| (k, Source::Replica))
                }
            },
        };
        out.extend(next);
    }
}

/// What a value weighs in a response, roughly as encoded.
pub fn value_bytes(value: &Value) -> usize {
    match value {
        Value::Register { value, .. } => 24 + value.as_ref().map_or(0, Vec::len),
        Value::Set(elements) => 4 + elements.iter().map(|e| e.len() + 2).sum::<usize>(),
        Value::Counter(_) | Value::Max(_) => 10,
        Value::Bounded { .. } => 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_end_after_their_last_key() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
        let r = KeyRange::prefix(b"a\xff");
        assert!(r.contains(b"a\xff") && r.contains(b"a\xff\xff\x00"));
        assert!(!r.contains(b"b") && !r.contains(b"a"));
    }

    #[test]
    fn merging_keeps_order_and_reads_unstored_keys_from_the_replica() {
        use calm_kernel::state::{KeyState, Numeric};
        let record = || KeyRecord::new(KeyState::Counter(Numeric::default()));
        let stored = ["a", "c", "d"]
            .map(|k| (k.as_bytes().to_vec(), record()))
            .to_vec();
        let unstored = ["b", "c", "e"].map(|k| k.as_bytes().to_vec()).to_vec();
        let merged: Vec<(String, bool)> = merge_sorted(stored, unstored)
            .into_iter()
            .map(|(k, s)| {
                (
                    String::from_utf8(k).unwrap(),
                    matches!(s, Source::Stored(_)),
                )
            })
            .collect();
        let expect = [
            ("a", true),
            ("b", false),
            ("c", false),
            ("d", true),
            ("e", false),
        ];
        assert_eq!(merged, expect.map(|(k, s)| (k.to_string(), s)).to_vec());
    }
}
