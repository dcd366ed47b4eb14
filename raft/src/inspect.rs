//! Reading a stopped node's data directory, for `calm debug`.
//!
//! When replicas disagree or a restarted node waits forever, the answer is usually in the
//! data: which facts a key holds per origin, which facts the archive and the WAL hold, what
//! a Raft entry's command observed. This module reads all of it **without writing**: the
//! state store is opened read-only and the WAL is read segment by segment (no lock, no torn
//! tail cut), so inspecting can never change what a restart will recover. It owns no
//! formatting: the CLI prints what it returns.

use crate::consensus::state_machine::decode_applied;
use crate::consensus::types::{Entry, EntryPayload, GroupId, LogId};
use crate::store::{AppliedMeta, StateStore, StoreError};
use crate::wal::{self, WalError, WalOptions, WalRecordKind};
use calm_kernel::NodeId;
use calm_kernel::fact::{Fact, FactError, FactRef, decode_fact, decode_facts};
use openraft::entry::RaftEntry;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Facts or entries one query returns at most; narrow the range to see others.
pub const INSPECT_ROWS_MAX: usize = 100_000;

#[derive(Debug, Error)]
pub enum InspectError {
    #[error(
        "{path} is not a calm data directory (no `state` or `wal` in it); pass the node's --data-dir"
    )]
    NotDataDir { path: PathBuf },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("the WAL batch at LSN {lsn} holds a fact that does not decode: {source}")]
    BadFact {
        lsn: u64,
        #[source]
        source: FactError,
    },
    #[error("the WAL batch at LSN {lsn} holds a Raft record that does not decode: {reason}")]
    BadRaftRecord { lsn: u64, reason: String },
    #[error("the store's applied position of group {group} does not decode: {reason}")]
    BadApplied { group: GroupId, reason: String },
}

/// Where a fact was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactSource {
    /// The state store's fact archive.
    Archive,
    /// A facts record of the WAL batch with this LSN.
    Wal { lsn: u64 },
}

/// A Raft log entry as the WAL holds it.
pub struct LoggedEntry {
    pub lsn: u64,
    pub group: GroupId,
    pub entry: Entry,
}

impl LoggedEntry {
    pub fn log_id(&self) -> LogId {
        self.entry.log_id()
    }

    /// The entry's request, when it is a normal entry (not blank or membership).
    pub fn request(&self) -> Option<&crate::consensus::Request> {
        match &self.entry.payload {
            EntryPayload::Normal(request) => Some(request),
            _ => None,
        }
    }
}

/// A node's data directory, opened for reading.
pub struct DataDir {
    store: StateStore,
    wal_dir: PathBuf,
    wal_options: WalOptions,
}

impl DataDir {
    /// Open `dir` (a node's `--data-dir`). The node must be stopped: RocksDB's read-only
    /// mode sees what was flushed, and the WAL what was written, at open.
    pub fn open(dir: impl AsRef<Path>) -> Result<DataDir, InspectError> {
        let dir = dir.as_ref();
        let (state, wal_dir) = (dir.join("state"), dir.join(crate::local::WAL_DIR));
        if !state.is_dir() || !wal_dir.is_dir() {
            return Err(InspectError::NotDataDir {
                path: dir.to_path_buf(),
            });
        }
        Ok(DataDir {
            store: StateStore::open_read_only(&state)?,
            wal_dir,
            wal_options: WalOptions::default(),
        })
    }

    /// The store's position: version vector, WAL LSN, each group's applied position.
    pub fn meta(&self) -> Result<AppliedMeta, InspectError> {
        Ok(self.store.meta()?)
    }

    /// Each group's last applied log id in the store.
    pub fn applied(&self) -> Result<BTreeMap<GroupId, Option<LogId>>, InspectError> {
        let meta = self.store.meta()?;
        meta.groups
            .iter()
            .map(|(&group, bytes)| {
                decode_applied(bytes)
                    .map(|id| (group, id))
                    .map_err(|e| InspectError::BadApplied {
                        group,
                        reason: e.to_string(),
                    })
            })
            .collect()
    }

    /// How many keys the store holds.
    pub fn key_count(&self) -> Result<usize, InspectError> {
        Ok(self.store.key_count()?)
    }

    /// A key's stored state.
    pub fn key(&self, key: &[u8]) -> Result<Option<calm_kernel::KeyRecord>, InspectError> {
        Ok(self.store.get(key)?)
    }

    /// Archived facts of `origin` with `from <= seq <= to`, at most [`INSPECT_ROWS_MAX`].
    pub fn archived_facts(
        &self,
        origin: NodeId,
        from: u64,
        to: u64,
    ) -> Result<Vec<Fact>, InspectError> {
        let mut facts = Vec::new();
        let mut bad = None;
        self.store.archived_facts(origin, from, to, |_, bytes| {
            match decode_fact(bytes) {
                Ok((fact, _)) => facts.push(fact.to_owned()),
                Err(e) => bad = Some(e),
            }
            bad.is_none() && facts.len() < INSPECT_ROWS_MAX
        })?;
        match bad {
            // The archive has no LSN; 0 says "not the WAL".
            Some(source) => Err(InspectError::BadFact { lsn: 0, source }),
            None => Ok(facts),
        }
    }

    /// Every fact in the WAL for which `keep` holds, in WAL order with its batch's LSN, at
    /// most [`INSPECT_ROWS_MAX`].
    pub fn wal_facts(
        &self,
        mut keep: impl FnMut(&FactRef<'_>) -> bool,
    ) -> Result<Vec<(u64, Fact)>, InspectError> {
        let mut out = Vec::new();
        for batch in wal::read_dir_readonly(&self.wal_dir, &self.wal_options)? {
            let batch = batch?;
            let lsn = batch.position.lsn;
            for record in batch
                .records
                .iter()
                .filter(|r| r.kind == WalRecordKind::Facts)
            {
                for fact in decode_facts(&record.payload) {
                    let fact = fact.map_err(|source| InspectError::BadFact { lsn, source })?;
                    if keep(&fact) {
                        out.push((lsn, fact.to_owned()));
                        if out.len() == INSPECT_ROWS_MAX {
                            return Ok(out);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Raft entries of `group` with `from <= index <= to` in the WAL, in WAL order (an index
    /// appears again when a new leader overwrote it), at most [`INSPECT_ROWS_MAX`].
    pub fn wal_entries(
        &self,
        group: GroupId,
        from: u64,
        to: u64,
    ) -> Result<Vec<LoggedEntry>, InspectError> {
        let mut out = Vec::new();
        for batch in wal::read_dir_readonly(&self.wal_dir, &self.wal_options)? {
            let batch = batch?;
            let lsn = batch.position.lsn;
            for record in &batch.records {
                if record.kind != (WalRecordKind::RaftEntries { group }) {
                    continue;
                }
                let entries: Vec<Entry> = postcard::from_bytes(&record.payload).map_err(|e| {
                    InspectError::BadRaftRecord {
                        lsn,
                        reason: e.to_string(),
                    }
                })?;
                for entry in entries {
                    let index = entry.index();
                    if (from..=to).contains(&index) {
                        out.push(LoggedEntry { lsn, group, entry });
                        if out.len() == INSPECT_ROWS_MAX {
                            return Ok(out);
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{LocalOptions, LocalState};
    use calm_kernel::rules::RuleSet;
    use calm_kernel::{HlcTimestamp, Mode, Op};

    #[test]
    fn reads_what_a_node_wrote_without_changing_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
            let (mut local, _) =
                LocalState::open(dir.path(), 1, rules, LocalOptions::default()).unwrap();
            // Create the counter as its Raft group would (there is no group here).
            let replica = local.replica_mut();
            let create = replica
                .prepare_command(b"c", &Op::CounterAdd { delta: 0 }, HlcTimestamp(1))
                .unwrap();
            replica.apply_command(&create).unwrap();
            for i in 1..=3 {
                let admitted = local
                    .admit(
                        b"c",
                        &Op::CounterAdd { delta: i },
                        HlcTimestamp(10 + i as u64),
                    )
                    .unwrap()
                    .expect("admitted");
                admitted.durable.unwrap().wait().unwrap();
            }
            local.persist_durable().unwrap();
        }
        let before = dir_digest(dir.path());
        let data = DataDir::open(dir.path()).unwrap();
        assert_eq!(data.meta().unwrap().vv.get(1), 3);
        let wal: Vec<u64> = data
            .wal_facts(|f| f.key == b"c")
            .unwrap()
            .iter()
            .map(|(_, f)| f.id.seq)
            .collect();
        assert_eq!(wal, [1, 2, 3]);
        let archived: Vec<i64> = data
            .archived_facts(1, 2, 3)
            .unwrap()
            .iter()
            .map(|f| f.arg)
            .collect();
        assert_eq!(archived, [2, 3]);
        assert!(matches!(
            data.key(b"c").unwrap().map(|r| r.state),
            Some(calm_kernel::KeyState::Counter(_))
        ));
        assert_eq!(data.key(b"absent").unwrap(), None);
        drop(data);
        assert_eq!(dir_digest(dir.path()), before, "inspecting wrote nothing");
    }

    #[test]
    fn a_directory_without_state_is_refused_with_the_flag_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let e = DataDir::open(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("--data-dir"), "{e}");
    }

    /// Every file's name, length and modification time under `dir`.
    fn dir_digest(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    stack.push(e.path());
                } else {
                    out.push((e.path(), meta.len(), meta.modified().unwrap()));
                }
            }
        }
        out.sort();
        out
    }
}
