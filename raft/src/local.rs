//! One node's durable fast path: the kernel replica bound to the WAL, the state store and
//! checkpoints.
//!
//! Order of truth: the WAL is the log of record; the state store holds applied states with
//! the LSN they cover; checkpoints are verified copies of the store. Three rules keep them
//! consistent through any crash:
//!
//! 1. A fact is acknowledged (and may be gossiped) only once its WAL batch is durable.
//! 2. The store is written only with effects of *durable* WAL records (`persist` waits for the
//!    WAL first). Otherwise a crash could leave the store holding a fact whose bytes the WAL
//!    lost, which this node could then never send to a peer.
//! 3. WAL segments are removed only below the oldest kept checkpoint's LSN, so falling back
//!    to an older checkpoint can always replay forward.
//!
//! Recovery (`open`): open the live store; if it cannot be opened or read, move it aside and
//! restore the newest checkpoint that verifies; rebuild the replica from it; replay every
//! fact in the WAL from the store's LSN (idempotent: facts already included are skipped by
//! the version vector). Raft records are replayed from the oldest retained segment into the
//! groups' log index ([`RaftLogs`]); openraft then re-applies each group's entries after the
//! applied id the store holds.

use crate::checkpoint::{CHECKPOINTS_KEPT_DEFAULT, CheckpointError, Checkpoints};
use crate::consensus::RaftLogs;
use crate::consensus::state_machine::decode_applied;
use crate::store::{AppliedMeta, StateStore, StoreError};
use crate::wal::{AppendTicket, Wal, WalError, WalOptions, WalRecord, WalRecordKind};
use calm_kernel::fact::decode_facts;
use calm_kernel::rules::CompiledRules;
use calm_kernel::{
    Admitted, FactError, HlcTimestamp, NodeId, Op, RefusedOp, Replica, ReplicaError,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LocalError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(
        "WAL batch at LSN {lsn} holds a fact that does not decode ({source}); the WAL is corrupt"
    )]
    BadFact {
        lsn: u64,
        #[source]
        source: FactError,
    },
    #[error(
        "the state store at {path} is unusable ({reason}) and no checkpoint verifies; restore the data directory from a backup"
    )]
    NoState { path: PathBuf, reason: String },
    #[error("Raft log recovery: {0}")]
    RaftLog(#[source] std::io::Error),
    #[error("cannot move the damaged state store {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What recovery did, for the log and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Checkpoint restored because the live store was unusable.
    pub restored_checkpoint: Option<u64>,
    /// Newer checkpoints rejected on the way.
    pub rejected_checkpoints: usize,
    /// WAL replay started at this LSN.
    pub replay_from_lsn: u64,
    pub replayed_batches: u64,
    /// Facts applied by replay (the rest were already in the store).
    pub replayed_facts: u64,
    /// Raft records fed to the groups' log index.
    pub replayed_raft_records: u64,
}

pub struct LocalOptions {
    pub wal: WalOptions,
    pub checkpoints_kept: usize,
}

impl Default for LocalOptions {
    fn default() -> LocalOptions {
        LocalOptions {
            wal: WalOptions::default(),
            checkpoints_kept: CHECKPOINTS_KEPT_DEFAULT,
        }
    }
}

pub struct LocalState {
    replica: Replica,
    wal: Arc<Wal>,
    store: StateStore,
    checkpoints: Checkpoints,
    /// Each group's applied position, opaque here (kept so the store's meta stays whole).
    groups: BTreeMap<u64, Vec<u8>>,
    raft_logs: Arc<RaftLogs>,
}

impl LocalState {
    /// Open `dir` (created if new) and recover.
    pub fn open(
        dir: impl AsRef<Path>,
        node: NodeId,
        rules: CompiledRules,
        options: LocalOptions,
    ) -> Result<(LocalState, RecoveryReport), LocalError> {
        let dir = dir.as_ref();
        let mut report = RecoveryReport::default();
        let checkpoints = Checkpoints::open(dir.join("checkpoints"), options.checkpoints_kept)?;
        let state_dir = dir.join("state");
        let (store, meta, keys) = match open_store(&state_dir) {
            Ok(loaded) => loaded,
            Err(damage) => {
                tracing::error!(error = %damage, "state store unusable; restoring a checkpoint");
                let selection = checkpoints.latest_valid()?;
                report.rejected_checkpoints = selection.rejected.len();
                let Some(chosen) = selection.chosen else {
                    return Err(LocalError::NoState {
                        path: state_dir,
                        reason: damage.to_string(),
                    });
                };
                // Kept for the operator to inspect; never overwrite an earlier one.
                let aside = (1u32..)
                    .map(|n| state_dir.with_extension(format!("damaged-{n}")))
                    .find(|p| !p.exists())
                    .expect("some name is free");
                std::fs::rename(&state_dir, &aside).map_err(|source| LocalError::MoveAside {
                    path: state_dir.clone(),
                    source,
                })?;
                checkpoints.restore(&chosen, &state_dir)?;
                report.restored_checkpoint = Some(chosen.manifest.id);
                open_store(&state_dir)?
            }
        };
        let wal = Arc::new(Wal::open(dir.join("wal"), options.wal)?);
        let raft_logs = Arc::new(RaftLogs::new(wal.clone()));
        let mut replica = Replica::restore(node, rules, meta.vv.clone(), keys);
        report.replay_from_lsn = meta.wal_lsn;
        // Raft records are needed from the oldest segment; facts only from the store's LSN.
        // If segments the store still needs were deleted, reading fails (LsnRemoved) rather
        // than silently skipping facts.
        let from = wal.oldest_lsn().min(meta.wal_lsn);
        for batch in wal.read_from(from)? {
            let batch = batch?;
            report.replayed_batches += 1;
            let lsn = batch.position.lsn;
            for record in &batch.records {
                if record.kind != WalRecordKind::Facts {
                    raft_logs
                        .replay(record.kind, &record.payload, lsn)
                        .map_err(LocalError::RaftLog)?;
                    report.replayed_raft_records += 1;
                    continue;
                }
                if lsn < meta.wal_lsn {
                    continue;
                }
                for fact in decode_facts(&record.payload) {
                    let fact = fact.map_err(|source| LocalError::BadFact {
                        lsn: batch.position.lsn,
                        source,
                    })?;
                    if let calm_kernel::Delivered::Applied { unblocked } = replica.deliver(&fact)? {
                        report.replayed_facts += 1 + unblocked as u64;
                    }
                }
            }
        }
        let mut applied = BTreeMap::new();
        for (group, bytes) in &meta.groups {
            let (log_id, _) = decode_applied(bytes).map_err(LocalError::RaftLog)?;
            applied.insert(*group, log_id);
        }
        raft_logs
            .finish_recovery(&applied)
            .map_err(LocalError::RaftLog)?;
        let state = LocalState {
            replica,
            wal,
            store,
            checkpoints,
            groups: meta.groups,
            raft_logs,
        };
        Ok((state, report))
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn replica_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }

    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }

    /// Every Raft group's log on this node (rebuilt by recovery).
    pub fn raft_logs(&self) -> &Arc<RaftLogs> {
        &self.raft_logs
    }

    /// A group's applied position as its state machine recorded it.
    pub fn group_applied(&self, group: u64) -> Option<&[u8]> {
        self.groups.get(&group).map(Vec::as_slice)
    }

    /// Record a group's applied position; it reaches the store with the next `persist`.
    pub fn set_group_applied(&mut self, group: u64, applied: Vec<u8>) {
        self.groups.insert(group, applied);
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Admit `op`. A fast-path fact is applied and appended; the returned ticket resolves
    /// when it is durable, and only then may the client be told (and peers sent the fact).
    ///
    /// An `Err` (or a ticket that fails) is fatal: the fact is applied in memory but will
    /// never be durable, so the node must stop and recover from disk, as with any fsync error.
    pub fn admit(
        &mut self,
        key: &[u8],
        op: &Op,
        hlc: HlcTimestamp,
    ) -> Result<Result<(Admitted, Option<AppendTicket>), RefusedOp>, LocalError> {
        let mut encoded = Vec::new();
        let admitted = match self.replica.admit(key, op, hlc, &mut encoded) {
            Ok(a) => a,
            Err(refused) => return Ok(Err(refused)),
        };
        if encoded.is_empty() {
            return Ok(Ok((admitted, None)));
        }
        let ticket = self.wal.append(&[WalRecord::facts(encoded)])?;
        Ok(Ok((admitted, Some(ticket))))
    }

    /// Write every changed key to the store with the position it now covers. Waits for the
    /// WAL first (rule 2 of the module docs).
    pub fn persist(&mut self) -> Result<AppliedMeta, LocalError> {
        // Everything the replica reflects was appended before this barrier (batches become
        // durable in order), so once it is durable all of it is, and the store may cover it.
        // The barrier is an empty facts record: replay reads it as no facts.
        let barrier = self.wal.append(&[WalRecord::facts(Vec::new())])?.wait()?;
        let wal_lsn = barrier.lsn + 1;
        let meta = AppliedMeta {
            vv: self.replica.version_vector().clone(),
            groups: self.groups.clone(),
            wal_lsn,
        };
        let mut changed = Vec::new();
        self.replica
            .take_dirty(|key, state| changed.push((key.to_vec(), state.clone())));
        self.store
            .write(changed.iter().map(|(k, s)| (k.as_slice(), s)), &meta)?;
        Ok(meta)
    }

    /// `persist`, then flush the store to disk: for state that no WAL record can rebuild
    /// (an installed Raft snapshot).
    pub fn persist_durable(&mut self) -> Result<AppliedMeta, LocalError> {
        let meta = self.persist()?;
        self.store.flush()?;
        Ok(meta)
    }

    /// Persist, capture a verified checkpoint, and drop WAL segments that neither a kept
    /// checkpoint nor a Raft group needs. Returns the checkpoint id.
    pub fn checkpoint(&mut self) -> Result<u64, LocalError> {
        let meta = self.persist()?;
        let manifest = self.checkpoints.create(&self.store, &meta)?;
        if let Some(oldest) = self.checkpoints.oldest_kept_applied()? {
            let mut oldest_applied = BTreeMap::new();
            for (group, bytes) in &oldest.groups {
                let (log_id, _) = decode_applied(bytes).map_err(LocalError::RaftLog)?;
                oldest_applied.insert(*group, log_id.map_or(0, |l| l.index));
            }
            // Votes, committed ids and purge points may sit in the segments about to go.
            self.raft_logs
                .rewrite_records()
                .map_err(LocalError::RaftLog)?;
            let floor = match self.raft_logs.retention_floor(&oldest_applied) {
                Some(raft) => raft.min(oldest.wal_lsn),
                None => oldest.wal_lsn,
            };
            self.wal.remove_segments_below_lsn(floor)?;
            self.raft_logs.forget_below(self.wal.oldest_lsn());
        }
        Ok(manifest.id)
    }
}

type Loaded = (
    StateStore,
    AppliedMeta,
    Vec<(Vec<u8>, calm_kernel::KeyState)>,
);

fn open_store(path: &Path) -> Result<Loaded, StoreError> {
    let store = StateStore::open(path)?;
    let meta = store.meta()?;
    let keys = store.load()?;
    Ok((store, meta, keys))
}
