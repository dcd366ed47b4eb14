//! The state store: applied key states in RocksDB.
//!
//! The WAL is the source of truth; RocksDB holds what has been *applied*, so that a restart
//! replays only the WAL after the store's position instead of the whole history. Three column
//! families:
//!
//! - `keys`: key bytes -> `KeyRecord::encode()` (format byte + deterministic postcard);
//! - `meta`: the [`AppliedMeta`] — the version vector of facts included, each Raft group's
//!   applied index, and the WAL LSN below which every record is reflected;
//! - `facts`: the fact archive, origin (u64 BE) ++ seq (u64 BE) -> the encoded fact. Gossip
//!   serves anti-entropy pulls from it after the WAL segments holding the facts are gone (and
//!   facts from peers never were in this node's WAL). Big-endian keys sort by (origin, seq),
//!   so a pull is one range scan and pruning one range delete per origin.
//!
//! Data, archived facts and meta are written in one `WriteBatch`, so whatever RocksDB has
//! after a crash is a state together with the exact position it corresponds to and the facts
//! it includes. RocksDB's own WAL is off (our WAL replays anything lost from memtables);
//! `atomic_flush` keeps the column families consistent with each other when they reach disk.

use calm_kernel::lease::{Lease, LeaseChanges, LeaseClock, Leases};
use calm_kernel::state::{KeyRecord, StateCodecError};
use calm_kernel::{FactId, NodeId, VersionVector};
use rocksdb::{
    ColumnFamilyDescriptor, DB, FlushOptions, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteOptions,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

const CF_KEYS: &str = "keys";
const CF_META: &str = "meta";
const CF_FACTS: &str = "facts";
const META_APPLIED: &[u8] = b"applied";
/// `lease/` + lease id (u64 BE): one lease (`calm_kernel::lease::Lease`, postcard).
const META_LEASE: &[u8] = b"lease/";
/// `leaseclock/` + group (u64 BE): the group's lease clock.
const META_LEASE_CLOCK: &[u8] = b"leaseclock/";

fn meta_row(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Where the state in the store stands. Written with every batch of key states.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMeta {
    /// Every fact whose effect the stored states include.
    pub vv: VersionVector,
    /// Raft group id -> its applied position (last applied log id and membership), encoded
    /// by the consensus layer (`consensus::state_machine::encode_applied`).
    pub groups: BTreeMap<u64, Vec<u8>>,
    /// Every WAL record with a smaller LSN is reflected; replay starts here.
    pub wal_lsn: u64,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "cannot open the state store at {path}: {source}; if it is corrupt, move it aside and restart to rebuild it from the newest checkpoint and the WAL"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("state store I/O failed at {path}: {source}; check the disk, then restart the node")]
    Io {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("key {key:?} in the state store at {path}: {source}")]
    Codec {
        path: PathBuf,
        key: String,
        #[source]
        source: StateCodecError,
    },
    #[error(
        "the applied positions in the state store at {path} do not decode ({reason}); the store is corrupt, move it aside and restart to rebuild it"
    )]
    Meta { path: PathBuf, reason: String },
    #[error(
        "the fact archive in the state store at {path} is corrupt ({reason}); move the store aside and restart to rebuild it from the newest checkpoint"
    )]
    Archive { path: PathBuf, reason: String },
}

pub struct StateStore {
    db: DB,
    path: PathBuf,
}

impl StateStore {
    /// Open (or create) the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<StateStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_atomic_flush(true);
        // Checksums on every block read: a flipped bit is an error, never a wrong value.
        options.set_paranoid_checks(true);
        // A store written before the archive existed opens too: the family is created empty.
        let cfs = [CF_KEYS, CF_META, CF_FACTS]
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db =
            DB::open_cf_descriptors(&options, &path, cfs).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(StateStore { db, path })
    }

    /// Open an existing store for reading only (nothing is written, not even RocksDB's own
    /// files), e.g. a stopped node's, for `calm debug`.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<StateStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut options = Options::default();
        options.set_paranoid_checks(true);
        let db = DB::open_cf_for_read_only(&options, &path, [CF_KEYS, CF_META, CF_FACTS], false)
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(StateStore { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl Fn(rocksdb::Error) -> StoreError + '_ {
        |source| StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Write changed key states and the position they bring the store to, atomically.
    pub fn write<'a>(
        &self,
        keys: impl IntoIterator<Item = (&'a [u8], &'a KeyRecord)>,
        meta: &AppliedMeta,
    ) -> Result<(), StoreError> {
        self.write_with_facts(keys, std::iter::empty(), &LeaseChanges::default(), meta)
    }

    /// `write`, also archiving `facts` (each one encoded fact) and writing the changed
    /// leases in the same batch.
    pub fn write_with_facts<'a>(
        &self,
        keys: impl IntoIterator<Item = (&'a [u8], &'a KeyRecord)>,
        facts: impl IntoIterator<Item = (FactId, &'a [u8])>,
        leases: &LeaseChanges,
        meta: &AppliedMeta,
    ) -> Result<(), StoreError> {
        let keys_cf = self.db.cf_handle(CF_KEYS).expect("opened with this family");
        let meta_cf = self.db.cf_handle(CF_META).expect("opened with this family");
        let facts_cf = self
            .db
            .cf_handle(CF_FACTS)
            .expect("opened with this family");
        let mut batch = WriteBatch::default();
        for (key, state) in keys {
            batch.put_cf(&keys_cf, key, state.encode());
        }
        for (id, fact) in facts {
            batch.put_cf(&facts_cf, fact_key(id.origin, id.seq), fact);
        }
        for (group, clock) in &leases.clocks {
            let encoded = postcard::to_stdvec(clock).expect("encoding into a Vec cannot fail");
            batch.put_cf(&meta_cf, meta_row(META_LEASE_CLOCK, *group), encoded);
        }
        for (id, lease) in &leases.leases {
            match lease {
                Some(lease) => {
                    let encoded =
                        postcard::to_stdvec(lease).expect("encoding into a Vec cannot fail");
                    batch.put_cf(&meta_cf, meta_row(META_LEASE, *id), encoded);
                }
                None => batch.delete_cf(&meta_cf, meta_row(META_LEASE, *id)),
            }
        }
        let encoded = postcard::to_stdvec(meta).expect("encoding into a Vec cannot fail");
        batch.put_cf(&meta_cf, META_APPLIED, encoded);
        let mut options = WriteOptions::default();
        // Our WAL is the log of record; replay covers anything not yet flushed.
        options.disable_wal(true);
        self.db.write_opt(batch, &options).map_err(self.io())
    }

    /// The applied position (default when the store is new).
    pub fn meta(&self) -> Result<AppliedMeta, StoreError> {
        let meta_cf = self.db.cf_handle(CF_META).expect("opened with this family");
        match self.db.get_cf(&meta_cf, META_APPLIED).map_err(self.io())? {
            None => Ok(AppliedMeta::default()),
            Some(bytes) => postcard::from_bytes(&bytes).map_err(|e| StoreError::Meta {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// How many keys the store holds (their states are not decoded).
    pub fn key_count(&self) -> Result<usize, StoreError> {
        let keys_cf = self.db.cf_handle(CF_KEYS).expect("opened with this family");
        let mut count = 0;
        for item in self.db.iterator_cf(&keys_cf, IteratorMode::Start) {
            item.map_err(self.io())?;
            count += 1;
        }
        Ok(count)
    }

    /// Up to `limit` stored keys `k` with `from <= k` (and `k < end` when given), in key
    /// order, with their states. The iterator reads one RocksDB snapshot, taken when it
    /// starts.
    pub fn records_from(
        &self,
        from: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, KeyRecord)>, StoreError> {
        let keys_cf = self.db.cf_handle(CF_KEYS).expect("opened with this family");
        let mut options = ReadOptions::default();
        if let Some(end) = end {
            options.set_iterate_upper_bound(end.to_vec());
        }
        let mut it = self.db.raw_iterator_cf_opt(&keys_cf, options);
        it.seek(from);
        let mut out = Vec::with_capacity(limit.min(4096));
        while out.len() < limit && it.valid() {
            let key = it.key().expect("a valid iterator has a key");
            let value = it.value().expect("a valid iterator has a value");
            let record = KeyRecord::decode(value).map_err(|source| StoreError::Codec {
                path: self.path.clone(),
                key: String::from_utf8_lossy(key).into_owned(),
                source,
            })?;
            out.push((key.to_vec(), record));
            it.next();
        }
        it.status().map_err(self.io())?;
        Ok(out)
    }

    /// Every stored key state, in key order.
    pub fn load(&self) -> Result<Vec<(Vec<u8>, KeyRecord)>, StoreError> {
        let keys_cf = self.db.cf_handle(CF_KEYS).expect("opened with this family");
        let mut out = Vec::new();
        for item in self.db.iterator_cf(&keys_cf, IteratorMode::Start) {
            let (key, value) = item.map_err(self.io())?;
            let state = KeyRecord::decode(&value).map_err(|source| StoreError::Codec {
                path: self.path.clone(),
                key: String::from_utf8_lossy(&key).into_owned(),
                source,
            })?;
            out.push((key.into_vec(), state));
        }
        Ok(out)
    }

    /// Every group's leases and lease clock, as the last write left them.
    pub fn load_leases(&self) -> Result<Leases, StoreError> {
        let meta_cf = self.db.cf_handle(CF_META).expect("opened with this family");
        let bad = |what: &str, e: postcard::Error| StoreError::Meta {
            path: self.path.clone(),
            reason: format!("a stored {what} does not decode ({e})"),
        };
        let rows = |prefix: &[u8]| -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
            let mut out = Vec::new();
            let mode = IteratorMode::From(prefix, rocksdb::Direction::Forward);
            for item in self.db.iterator_cf(&meta_cf, mode) {
                let (key, value) = item.map_err(self.io())?;
                let Some(id) = key.strip_prefix(prefix) else {
                    break;
                };
                let id = <[u8; 8]>::try_from(id).map_err(|_| StoreError::Meta {
                    path: self.path.clone(),
                    reason: format!("a lease row key of {} bytes", key.len()),
                })?;
                out.push((u64::from_be_bytes(id), value.into_vec()));
            }
            Ok(out)
        };
        let clocks = rows(META_LEASE_CLOCK)?
            .into_iter()
            .map(|(group, v)| {
                postcard::from_bytes::<LeaseClock>(&v)
                    .map(|c| (group, c))
                    .map_err(|e| bad("lease clock", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let leases = rows(META_LEASE)?
            .into_iter()
            .map(|(_, v)| postcard::from_bytes::<Lease>(&v).map_err(|e| bad("lease", e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Leases::restore(clocks, leases))
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<KeyRecord>, StoreError> {
        let keys_cf = self.db.cf_handle(CF_KEYS).expect("opened with this family");
        let Some(bytes) = self.db.get_cf(&keys_cf, key).map_err(self.io())? else {
            return Ok(None);
        };
        KeyRecord::decode(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Codec {
                path: self.path.clone(),
                key: String::from_utf8_lossy(key).into_owned(),
                source,
            })
    }

    /// BLAKE3 over every (key, state) in key order: equal on replicas holding equal state,
    /// so they can detect divergence by comparing 32 bytes.
    pub fn digest(&self) -> Result<blake3::Hash, StoreError> {
        let keys_cf = self.db.cf_handle(CF_KEYS).expect("opened with this family");
        let mut hasher = blake3::Hasher::new();
        for item in self.db.iterator_cf(&keys_cf, IteratorMode::Start) {
            let (key, value) = item.map_err(self.io())?;
            hasher.update(&(key.len() as u64).to_le_bytes());
            hasher.update(&key);
            hasher.update(&(value.len() as u64).to_le_bytes());
            hasher.update(&value);
        }
        Ok(hasher.finalize())
    }

    /// Archived facts of `origin` with `from_seq <= seq <= to_seq`, in sequence order, each
    /// handed to `sink` as `(seq, encoded fact)`; stops early when `sink` returns `false`.
    pub fn archived_facts(
        &self,
        origin: NodeId,
        from_seq: u64,
        to_seq: u64,
        mut sink: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        if from_seq > to_seq {
            return Ok(());
        }
        let facts_cf = self
            .db
            .cf_handle(CF_FACTS)
            .expect("opened with this family");
        let mut options = ReadOptions::default();
        if let Some(end) = to_seq.checked_add(1) {
            options.set_iterate_upper_bound(fact_key(origin, end));
        } else if let Some(next) = origin.checked_add(1) {
            options.set_iterate_upper_bound(fact_key(next, 0));
        }
        let mut it = self.db.raw_iterator_cf_opt(&facts_cf, options);
        it.seek(fact_key(origin, from_seq));
        while it.valid() {
            let (Some(key), Some(value)) = (it.key(), it.value()) else {
                break;
            };
            let Some((o, seq)) = parse_fact_key(key) else {
                return Err(StoreError::Archive {
                    path: self.path.clone(),
                    reason: format!("key {key:02x?} is not 16 bytes"),
                });
            };
            if o != origin || seq > to_seq || !sink(seq, value) {
                break;
            }
            it.next();
        }
        it.status().map_err(self.io())
    }

    /// Every archived fact beyond `vv` (seq above `vv`'s entry for its origin), in (origin,
    /// seq) order, each handed to `sink` as its encoding. These are the facts a persist found
    /// waiting in the replica (accepted, not yet applicable): recovery delivers them again,
    /// since WAL replay starts after them. One seek per origin, so the applied facts below
    /// `vv` are skipped, not read.
    pub fn archived_beyond(
        &self,
        vv: &VersionVector,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), StoreError> {
        let facts_cf = self
            .db
            .cf_handle(CF_FACTS)
            .expect("opened with this family");
        let mut it = self.db.raw_iterator_cf(&facts_cf);
        it.seek_to_first();
        while it.valid() {
            let Some(key) = it.key() else { break };
            let Some((origin, seq)) = parse_fact_key(key) else {
                return Err(StoreError::Archive {
                    path: self.path.clone(),
                    reason: format!("key {key:02x?} is not 16 bytes"),
                });
            };
            let floor = vv.get(origin);
            if seq <= floor {
                match floor.checked_add(1) {
                    Some(next) => it.seek(fact_key(origin, next)),
                    None => match origin.checked_add(1) {
                        Some(o) => it.seek(fact_key(o, 0)),
                        None => break,
                    },
                }
                continue;
            }
            if let Some(value) = it.value() {
                sink(value);
            }
            it.next();
        }
        it.status().map_err(self.io())
    }

    /// Delete every archived fact at or below `floor` (per origin). Not synced: a crash may
    /// bring some back, and the next prune removes them again.
    pub fn prune_facts(&self, floor: &VersionVector) -> Result<(), StoreError> {
        let facts_cf = self
            .db
            .cf_handle(CF_FACTS)
            .expect("opened with this family");
        let mut batch = WriteBatch::default();
        for (origin, seq) in floor.iter() {
            // Sequences start at 1; `seq + 1` cannot overflow for any real sequence, and
            // u64::MAX would mean "everything of this origin".
            let end = match seq.checked_add(1) {
                Some(end) => fact_key(origin, end),
                None => match origin.checked_add(1) {
                    Some(next) => fact_key(next, 0),
                    None => continue,
                },
            };
            batch.delete_range_cf(&facts_cf, fact_key(origin, 0), end);
        }
        let mut options = WriteOptions::default();
        options.disable_wal(true);
        self.db.write_opt(batch, &options).map_err(self.io())
    }

    /// Persist memtables (every family together) to SST files.
    pub fn flush(&self) -> Result<(), StoreError> {
        let keys_cf = self.db.cf_handle(CF_KEYS).expect("opened with this family");
        let meta_cf = self.db.cf_handle(CF_META).expect("opened with this family");
        let facts_cf = self
            .db
            .cf_handle(CF_FACTS)
            .expect("opened with this family");
        let mut options = FlushOptions::default();
        options.set_wait(true);
        self.db
            .flush_cfs_opt(&[&keys_cf, &meta_cf, &facts_cf], &options)
            .map_err(self.io())
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }
}

/// Archive key of a fact: origin then sequence, big-endian, so keys sort by (origin, seq).
fn fact_key(origin: NodeId, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&origin.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn parse_fact_key(key: &[u8]) -> Option<(NodeId, u64)> {
    let key: &[u8; 16] = key.try_into().ok()?;
    let (origin, seq) = key.split_at(8);
    Some((
        u64::from_be_bytes(origin.try_into().ok()?),
        u64::from_be_bytes(seq.try_into().ok()?),
    ))
}
