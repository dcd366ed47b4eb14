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
//!
//! # The fact archive
//!
//! Gossip must be able to send any fact to a peer that lacks it, long after the WAL segment
//! holding it is deleted. So every fact this node accepts — admitted here, delivered by a
//! peer, or re-applied by replay — is kept in memory until the next `persist`, which writes
//! it to the store's `facts` family in the same batch as the key states and version vector
//! that include it: after a crash the archive and the version vector agree.
//! [`LocalState::prune_archive`] deletes facts every node keeps through any recovery (gossip
//! computes that floor from the [`LocalState::checkpointed_vv`] of every node).
//!
//! # The change log
//!
//! The replica journals every key change; each call here that applies something publishes
//! the changes to the node's [`EventLog`] before it returns (under the caller's lock, so in
//! apply order), tagged with what caused them. Raft applies go through
//! [`LocalState::publish_entry`] and [`LocalState::publish_snapshot`].
//!
//! Facts delivered by peers are appended to the WAL too, in the order they were applied, so
//! replay re-applies every durable fact in its original order. Without that, a crash would
//! forget delivered facts newer than the store's last flush while keeping this node's own
//! later facts, and an own escrow spend funded by a peer's transfer would replay unfunded,
//! leaving this node's own sequence stuck behind it.

use crate::checkpoint::{CHECKPOINTS_KEPT_DEFAULT, CheckpointError, Checkpoints};
use crate::consensus::RaftLogs;
use crate::consensus::state_machine::decode_applied;
use crate::dir_lock::{DataDirLock, DirLockError};
use crate::events::{EventLimits, EventLog, Position};
use crate::store::{AppliedMeta, StateStore, StoreError};
use crate::wal::{AppendTicket, Wal, WalError, WalIo, WalOptions, WalRecord, WalRecordKind};
use calm_kernel::fact::{FactRef, decode_fact};
use calm_kernel::rules::CompiledRules;
use calm_kernel::{
    Admitted, Delivered, FactError, FactId, HlcTimestamp, NodeId, Op, RefusedOp, Replica,
    ReplicaError, VersionVector,
};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// The WAL's directory inside a node's data directory.
pub const WAL_DIR: &str = "wal";

#[derive(Debug, Error)]
pub enum LocalError {
    #[error(transparent)]
    DirLock(#[from] DirLockError),
    #[error(
        "the state store at {path} is locked by another process ({reason}); stop the process using this data directory before starting a node on it (nothing was changed)"
    )]
    StoreInUse { path: PathBuf, reason: String },
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    #[error(
        "the state store's fact archive holds a fact that does not decode ({source}); move the store aside and restart to rebuild it from the newest checkpoint"
    )]
    BadArchivedFact {
        #[source]
        source: FactError,
    },
    #[error("Raft log recovery: {0}")]
    RaftLog(#[source] std::io::Error),
    #[error("cannot move the damaged state store {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "a peer sent facts that do not decode ({source}); nothing of the batch was applied. The peer runs another calm version or the message was damaged: run one calm version across the cluster"
    )]
    BadDeliveredFact {
        #[source]
        source: FactError,
    },
    #[error(
        "a peer sent a fact of {bytes} bytes, but this node's WAL records hold at most {record_max} bytes; nothing of the batch was applied. Give every node the same WAL batch_bytes_max"
    )]
    FactTooLarge { bytes: usize, record_max: usize },
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
    /// Facts the store's archive held beyond its version vector (waiting for earlier facts,
    /// their key or escrow rights when it was written), delivered again before replay.
    pub redelivered_facts: u64,
    /// Raft records fed to the groups' log index.
    pub replayed_raft_records: u64,
}

/// What [`LocalState::admit`] did with an op.
pub struct LocalAdmit {
    pub admitted: Admitted,
    /// Set when a fact was appended (fast path): resolves once it is durable.
    pub durable: Option<AppendTicket>,
    /// The fact's encoding (empty when the op needs consensus), for gossip.
    pub fact: Vec<u8>,
}

/// An escrow transfer [`LocalState::transfer`] issued.
pub struct LocalTransfer {
    pub id: FactId,
    /// Resolves once the transfer is durable: only then may the taker hear of it.
    pub durable: AppendTicket,
    /// The fact's encoding, for gossip.
    pub fact: Vec<u8>,
}

/// Fast-path admissions that share WAL appends (from [`LocalState::fast_batch`]).
///
/// Each admitted fact is applied at once, like [`LocalState::admit`]; its bytes are
/// appended when the payload would outgrow one WAL record and at [`FastBatch::finish`].
/// Nothing else sees the replica meanwhile (the batch borrows the state), so the WAL gets
/// the facts in the order they were applied, as with single admissions. Dropping the batch
/// unfinished appends the rest too: an applied fact always reaches the WAL.
#[must_use = "facts are appended and made durable through `finish`"]
pub struct FastBatch<'a> {
    local: &'a mut LocalState,
    /// Encoded facts not appended yet, back to back. Their changes wait in the replica's
    /// journal (nothing else applies meanwhile) and are published with their append.
    payload: Vec<u8>,
    /// Sequence numbers of the own facts in `payload`, in order.
    own_seqs: Vec<u64>,
    /// The last append's ticket: it resolves only once every earlier append is durable.
    durable: Option<AppendTicket>,
}

/// A fact a [`FastBatch`] admitted.
pub struct FastAdmit {
    pub id: FactId,
    /// Spent from this node's escrow rights (a bounded counter).
    pub escrow: bool,
    /// The fact's encoding, for gossip once the batch is durable.
    pub fact: Vec<u8>,
}

impl FastBatch<'_> {
    pub fn replica(&self) -> &Replica {
        &self.local.replica
    }

    /// Admit `op` if the kernel takes it on the fast path. `Ok(None)`: it did not (it
    /// needs consensus or is refused), nothing changed, and the caller admits it alone
    /// with [`LocalState::admit`]. An `Err` is fatal, as for `admit`.
    pub fn admit(
        &mut self,
        key: &[u8],
        op: &Op,
        hlc: HlcTimestamp,
    ) -> Result<Option<FastAdmit>, LocalError> {
        let mut encoded = Vec::new();
        let Ok(Admitted::Local { id, escrow }) =
            self.local.replica.admit(key, op, hlc, &mut encoded)
        else {
            // Classification and refusal change nothing in the replica.
            debug_assert!(encoded.is_empty());
            return Ok(None);
        };
        assert!(!encoded.is_empty(), "a fast-path admission is a fact");
        assert_eq!(
            id.origin,
            self.local.replica.node(),
            "an admitted fact is own"
        );
        if self.payload.len() + encoded.len() > self.local.wal.record_payload_bytes_max() {
            self.append()?;
        }
        self.payload.extend_from_slice(&encoded);
        self.own_seqs.push(id.seq);
        self.local
            .unarchived
            .insert((id.origin, id.seq), encoded.clone());
        Ok(Some(FastAdmit {
            id,
            escrow,
            fact: encoded,
        }))
    }

    /// Append what is left. The ticket resolves once every fact of the batch is durable
    /// (`None`: none was admitted); only then may clients be told and peers sent them.
    pub fn finish(mut self) -> Result<Option<AppendTicket>, LocalError> {
        self.append()?;
        Ok(self.durable.take())
    }

    fn append(&mut self) -> Result<(), LocalError> {
        if self.payload.is_empty() {
            return Ok(());
        }
        let payload = std::mem::take(&mut self.payload);
        let ticket = self.local.wal.append(&[WalRecord::facts(payload)])?;
        for seq in self.own_seqs.drain(..) {
            self.local.note_own_fact(seq, &ticket);
        }
        self.local.publish_facts(ticket.append_no());
        self.durable = Some(ticket);
        Ok(())
    }
}

impl Drop for FastBatch<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.append() {
            // Applied in memory, never to be durable: as fatal as a failed fsync. Abort rather
            // than panic: a panic would end only the caller's task, and the node would go on
            // serving state its WAL does not hold.
            tracing::error!(%error, "appending a batch's facts to the WAL failed; aborting");
            std::process::abort();
        }
    }
}

/// A persist captured by [`LocalState::begin_persist`], to finish without the state.
#[must_use = "a captured persist writes nothing until `write`"]
pub struct PersistJob {
    _gate: GateTicket,
    /// Its number in capture order (see [`LocalState::persisting`]).
    job: u64,
    barrier: AppendTicket,
    vv: VersionVector,
    groups: BTreeMap<u64, Vec<u8>>,
    changed: Arc<ChangedKeys>,
    facts: Vec<(FactId, Vec<u8>)>,
    leases: calm_kernel::lease::LeaseChanges,
    store: Arc<StateStore>,
}

/// Key states a persist captured, in capture order.
type ChangedKeys = Vec<(Vec<u8>, calm_kernel::KeyRecord)>;

/// What a written [`PersistJob`] hands back to [`LocalState::end_persist`].
#[must_use = "pass it to `end_persist`"]
pub struct PersistReceipt {
    job: u64,
    /// The facts now archived in the store.
    pub facts: Vec<FactId>,
}

impl PersistJob {
    /// Wait until the barrier is durable, then write the captured states, facts and
    /// position. Returns the position and a receipt naming the facts now archived in the
    /// store (hand it to [`LocalState::end_persist`]). An error is fatal, as for `persist`.
    pub fn write(self) -> Result<(AppliedMeta, PersistReceipt), LocalError> {
        let barrier = self.barrier.wait()?;
        let meta = AppliedMeta {
            vv: self.vv,
            groups: self.groups,
            wal_lsn: barrier.lsn + 1,
        };
        self.store.write_with_facts(
            self.changed.iter().map(|(k, s)| (k.as_slice(), s)),
            self.facts.iter().map(|(id, f)| (*id, f.as_slice())),
            &self.leases,
            &meta,
        )?;
        let receipt = PersistReceipt {
            job: self.job,
            facts: self.facts.into_iter().map(|(id, _)| id).collect(),
        };
        Ok((meta, receipt))
    }
}

/// Lets one persist at a time past (a mutex whose guard a job can own).
#[derive(Default)]
struct PersistGate {
    busy: std::sync::Mutex<bool>,
    free: std::sync::Condvar,
}

struct GateTicket(Arc<PersistGate>);

impl PersistGate {
    fn enter(self: &Arc<Self>) -> GateTicket {
        // Nothing here leaves the flag half-changed across a panic.
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = self.free.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy = true;
        GateTicket(self.clone())
    }
}

impl Drop for GateTicket {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.free.notify_one();
    }
}

/// What [`LocalState::deliver`] did with a batch of facts from a peer.
#[derive(Debug, Default)]
pub struct DeliverReport {
    /// Facts applied, including waiting facts they released.
    pub applied: u64,
    /// Facts already applied or already waiting here.
    pub duplicates: u64,
    /// Facts waiting for earlier facts of their origin, their key's creation or escrow rights.
    pub buffered: u64,
    /// Facts the full wait buffer refused; anti-entropy brings them again.
    pub dropped: u64,
    /// Resolves once every accepted fact of the batch is durable in the WAL (`None`: none
    /// was accepted). Nothing needs to wait for it: see [`LocalState::deliver`].
    pub durable: Option<AppendTicket>,
}

pub struct LocalOptions {
    pub wal: WalOptions,
    pub checkpoints_kept: usize,
    /// How much of the change log watchers can resume from (see `events`).
    pub events: EventLimits,
}

impl Default for LocalOptions {
    fn default() -> LocalOptions {
        LocalOptions {
            wal: WalOptions::default(),
            checkpoints_kept: CHECKPOINTS_KEPT_DEFAULT,
            events: EventLimits::default(),
        }
    }
}

pub struct LocalState {
    replica: Replica,
    wal: Arc<Wal>,
    store: Arc<StateStore>,
    checkpoints: Checkpoints,
    /// One store write at a time, in the order they were captured (see `begin_persist`).
    persist_gate: Arc<PersistGate>,
    /// Each group's applied position, opaque here (kept so the store's meta stays whole).
    groups: BTreeMap<u64, Vec<u8>>,
    raft_logs: Arc<RaftLogs>,
    /// Facts accepted since the last `persist`, by id: the archive's part not yet in the store.
    unarchived: BTreeMap<(NodeId, u64), Vec<u8>>,
    /// What the oldest kept checkpoint covers (see `checkpointed_vv`).
    checkpointed_vv: VersionVector,
    /// Own facts whose WAL batch was not yet known durable, in sequence order, as `(seq,
    /// append_no)`; every own fact not listed is durable (recovery reads only durable ones).
    /// The archive must not hand them to peers (see `archived_facts`), and a Raft command
    /// observing them waits (see `own_facts_barrier`). Bounded by the WAL's queue, since
    /// durable ones leave it at every admission.
    own_in_flight: VecDeque<(u64, u64)>,
    /// Key states captured by persist jobs not ended yet, by job number: they are in neither
    /// the replica's dirty keys nor (perhaps) the store yet, and a scan must still find them
    /// (see `scan`).
    persisting: Vec<(u64, Arc<ChangedKeys>)>,
    /// Persist jobs captured so far: the next job's number. Less the ones in `persisting`,
    /// the jobs ended so far: a scan that read the store without this state checks that
    /// number did not move meanwhile (see [`LocalState::scan_epoch`]).
    persist_jobs: u64,
    /// Every key change applied, for watchers (see the module docs).
    events: Arc<EventLog>,
    /// The data directory's lock, held for as long as this state is open (see `dir_lock`).
    _dir_lock: DataDirLock,
}

impl LocalState {
    /// Open `dir` (created if new) and recover. Takes the directory's lock first (see
    /// `dir_lock`): a directory another process holds is refused before anything is read.
    pub fn open(
        dir: impl AsRef<Path>,
        node: NodeId,
        rules: CompiledRules,
        options: LocalOptions,
    ) -> Result<(LocalState, RecoveryReport), LocalError> {
        LocalState::open_inner(lock_new_dir(dir.as_ref())?, node, rules, options, None)
    }

    /// Like [`open`](Self::open) on a directory whose lock the caller took already (a node
    /// locks its directory before it writes anything else there).
    pub fn open_locked(
        lock: DataDirLock,
        node: NodeId,
        rules: CompiledRules,
        options: LocalOptions,
    ) -> Result<(LocalState, RecoveryReport), LocalError> {
        LocalState::open_inner(lock, node, rules, options, None)
    }

    /// Like [`open`](Self::open) with a caller-supplied WAL I/O backend (tests hold or fail
    /// its fdatasyncs).
    pub fn open_with_wal_io(
        dir: impl AsRef<Path>,
        node: NodeId,
        rules: CompiledRules,
        options: LocalOptions,
        io: Box<dyn WalIo>,
    ) -> Result<(LocalState, RecoveryReport), LocalError> {
        LocalState::open_inner(lock_new_dir(dir.as_ref())?, node, rules, options, Some(io))
    }

    fn open_inner(
        dir_lock: DataDirLock,
        node: NodeId,
        rules: CompiledRules,
        options: LocalOptions,
        io: Option<Box<dyn WalIo>>,
    ) -> Result<(LocalState, RecoveryReport), LocalError> {
        let dir = dir_lock.dir().to_path_buf();
        let mut report = RecoveryReport::default();
        let checkpoints = Checkpoints::open(dir.join("checkpoints"), options.checkpoints_kept)?;
        let state_dir = dir.join("state");
        let (store, meta, keys) = match open_store(&state_dir) {
            Ok(loaded) => loaded,
            // Another process holds RocksDB's own lock (one that did not take the directory's
            // lock: an older calm, a tool). That is no damage: moving the store aside would
            // destroy a live node's state.
            Err(StoreError::Open { path, source }) if is_lock_held(&source) => {
                return Err(LocalError::StoreInUse {
                    path,
                    reason: source.to_string(),
                });
            }
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
        let wal = Arc::new(match io {
            Some(io) => Wal::open_with_io(dir.join(WAL_DIR), options.wal, io)?,
            None => Wal::open(dir.join(WAL_DIR), options.wal)?,
        });
        let raft_logs = Arc::new(RaftLogs::new(wal.clone()));
        // Events before the recovered state were never in this log: that is its horizon.
        let mut recovered = Position {
            vv: meta.vv.clone(),
            groups: BTreeMap::new(),
        };
        for (group, bytes) in &meta.groups {
            let log_id = decode_applied(bytes).map_err(LocalError::RaftLog)?;
            recovered
                .groups
                .insert(*group, log_id.map_or(0, |l| l.index));
        }
        let events = Arc::new(EventLog::new(
            node,
            options.events,
            recovered,
            wal.subscribe_durable(),
        ));
        let mut replica = Replica::restore(node, rules, meta.vv.clone(), keys).with_journal();
        // Written in the same batches as the keys and the groups' positions, so they agree.
        replica.restore_leases(store.load_leases()?);
        // Facts that were waiting when the store was written (accepted and archived, not
        // applicable yet) come before the store's LSN, where replay does not look: deliver
        // them from the archive first. Without this a restart forgot them, the node's own
        // ones included, and a Raft entry that observed them waited forever (Jepsen finding
        // 9: a restarted node never finished starting its groups). They are bounded by what
        // the replica's wait buffer held then.
        let mut waiting = Vec::new();
        store.archived_beyond(&meta.vv, |encoded| waiting.push(encoded.to_vec()))?;
        for encoded in &waiting {
            let (fact, _) =
                decode_fact(encoded).map_err(|source| LocalError::BadArchivedFact { source })?;
            report.redelivered_facts += 1;
            if let Delivered::Applied { unblocked } = replica.deliver(&fact)? {
                report.replayed_facts += 1 + unblocked as u64;
            }
        }
        events.publish(replica.take_journal(), None, 0);
        let mut unarchived = BTreeMap::new();
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
                for fact in encoded_facts(&record.payload) {
                    let (fact, encoded) = fact.map_err(|source| LocalError::BadFact {
                        lsn: batch.position.lsn,
                        source,
                    })?;
                    let delivered = replica.deliver(&fact)?;
                    if let Delivered::Applied { unblocked } = delivered {
                        report.replayed_facts += 1 + unblocked as u64;
                    }
                    // The store's archive lacks every fact after its LSN: keep what replay
                    // accepted for the next persist.
                    if matches!(delivered, Delivered::Applied { .. } | Delivered::Buffered) {
                        unarchived.insert((fact.id.origin, fact.id.seq), encoded.to_vec());
                    }
                }
            }
            // Replayed facts are durable (replay reads only durable batches).
            events.publish(replica.take_journal(), None, 0);
        }
        let mut applied = BTreeMap::new();
        for (group, bytes) in &meta.groups {
            let log_id = decode_applied(bytes).map_err(LocalError::RaftLog)?;
            applied.insert(*group, log_id);
        }
        raft_logs
            .finish_recovery(&applied)
            .map_err(LocalError::RaftLog)?;
        let checkpointed_vv = oldest_checkpoint_vv(&checkpoints);
        let state = LocalState {
            replica,
            wal,
            store: Arc::new(store),
            checkpoints,
            persist_gate: Arc::default(),
            groups: meta.groups,
            raft_logs,
            unarchived,
            checkpointed_vv,
            own_in_flight: VecDeque::new(),
            persisting: Vec::new(),
            persist_jobs: 0,
            events,
            _dir_lock: dir_lock,
        };
        Ok((state, report))
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    pub fn replica_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }

    /// The node's change log (see the module docs).
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// Publish the changes of applying Raft entry `index` of `group` (its commands' and the
    /// facts they released). Call under the same lock as the apply.
    pub fn publish_entry(&mut self, group: u64, index: u64) {
        let changes = self.replica.take_journal();
        self.events.publish(changes, Some((group, index)), 0);
    }

    /// Publish a Raft snapshot install of `group` at `index` (and the facts it released).
    pub fn publish_snapshot(&mut self, group: u64, index: u64) {
        self.events.snapshot_installed(group, index);
        self.publish_facts(0);
    }

    /// Publish the journaled changes of facts; `own_append`: the WAL append holding this
    /// node's own facts among them (0: durable already).
    fn publish_facts(&mut self, own_append: u64) {
        let changes = self.replica.take_journal();
        self.events.publish(changes, None, own_append);
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

    /// Every group's applied position as its state machine recorded it, by group.
    pub fn group_positions(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.groups.iter().map(|(g, p)| (*g, p.as_slice()))
    }

    /// Record a group's applied position; it reaches the store with the next `persist`.
    pub fn set_group_applied(&mut self, group: u64, applied: Vec<u8>) {
        self.groups.insert(group, applied);
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Admit `op`. A fast-path fact is applied and appended; `durable` resolves when it is
    /// durable, and only then may the client be told and peers sent `fact`.
    ///
    /// An `Err` (or a ticket that fails) is fatal: the fact is applied in memory but will
    /// never be durable, so the node must stop and recover from disk, as with any fsync error.
    pub fn admit(
        &mut self,
        key: &[u8],
        op: &Op,
        hlc: HlcTimestamp,
    ) -> Result<Result<LocalAdmit, RefusedOp>, LocalError> {
        let mut encoded = Vec::new();
        let admitted = match self.replica.admit(key, op, hlc, &mut encoded) {
            Ok(a) => a,
            Err(refused) => return Ok(Err(refused)),
        };
        if encoded.is_empty() {
            return Ok(Ok(LocalAdmit {
                admitted,
                durable: None,
                fact: encoded,
            }));
        }
        let ticket = self.wal.append(&[WalRecord::facts(encoded.clone())])?;
        if let Admitted::Local { id, .. } = admitted {
            self.unarchived.insert((id.origin, id.seq), encoded.clone());
            self.note_own_fact(id.seq, &ticket);
        }
        self.publish_facts(ticket.append_no());
        Ok(Ok(LocalAdmit {
            admitted,
            durable: Some(ticket),
            fact: encoded,
        }))
    }

    /// Start admitting many ops' fast-path facts under this one borrow, appended to the WAL
    /// together (a client Batch): one append, one fsync wait and one ticket instead of one
    /// per op. See [`FastBatch`].
    pub fn fast_batch(&mut self) -> FastBatch<'_> {
        FastBatch {
            local: self,
            payload: Vec::new(),
            own_seqs: Vec::new(),
            durable: None,
        }
    }

    /// What to await before proposing a Raft command prepared from this replica now: the
    /// command records the frontier it observed, which may include own facts whose WAL batch
    /// is not durable yet. Were the command committed (by other nodes) and this node to crash
    /// before that batch is durable, the facts would be gone while the command names them:
    /// every replica would wait for them forever, and this node would reuse their sequence
    /// numbers. `None` when every own fact is durable already; else a barrier and the
    /// sequence it covers, for [`LocalState::own_facts_durable_through`].
    pub fn own_facts_barrier(&mut self) -> Result<Option<(AppendTicket, u64)>, LocalError> {
        let seq = self.replica.version_vector().get(self.replica.node());
        if seq <= self.own_durable_now() {
            return Ok(None);
        }
        // An empty facts record: durable only once every batch before it is.
        let barrier = self.wal.append(&[WalRecord::facts(Vec::new())])?;
        Ok(Some((barrier, seq)))
    }

    /// A barrier from [`LocalState::own_facts_barrier`] is durable.
    pub fn own_facts_durable_through(&mut self, seq: u64) {
        while self.own_in_flight.front().is_some_and(|&(s, _)| s <= seq) {
            self.own_in_flight.pop_front();
        }
    }

    /// Remember own fact `seq`, appended with `ticket`, until its batch is durable; forget
    /// the ones before it that are durable by now.
    fn note_own_fact(&mut self, seq: u64, ticket: &AppendTicket) {
        while let Some(&(_, append_no)) = self.own_in_flight.front() {
            if !self.wal.is_durable(append_no) {
                break;
            }
            self.own_in_flight.pop_front();
        }
        debug_assert!(self.own_in_flight.back().is_none_or(|&(s, _)| s < seq));
        self.own_in_flight.push_back((seq, ticket.append_no()));
    }

    /// The highest own sequence up to which every own fact is durable right now.
    fn own_durable_now(&self) -> u64 {
        match self
            .own_in_flight
            .iter()
            .find(|&&(_, append_no)| !self.wal.is_durable(append_no))
        {
            Some(&(seq, _)) => seq - 1,
            None => self.replica.version_vector().get(self.replica.node()),
        }
    }

    /// Give `amount` of this node's escrow rights on `key` to node `to` (see
    /// [`Replica::transfer`]): applied here at once, logged like an admitted fact.
    pub fn transfer(
        &mut self,
        key: &[u8],
        to: NodeId,
        amount: i64,
        hlc: HlcTimestamp,
    ) -> Result<Result<LocalTransfer, RefusedOp>, LocalError> {
        let mut encoded = Vec::new();
        let id = match self.replica.transfer(key, to, amount, hlc, &mut encoded) {
            Ok(id) => id,
            Err(refused) => return Ok(Err(refused)),
        };
        assert!(!encoded.is_empty(), "a transfer is a fact");
        let durable = self.wal.append(&[WalRecord::facts(encoded.clone())])?;
        self.unarchived.insert((id.origin, id.seq), encoded.clone());
        self.note_own_fact(id.seq, &durable);
        Ok(Ok(LocalTransfer {
            id,
            durable,
            fact: encoded,
        }))
    }

    /// Deliver `facts` (encoded back to back, as a peer sent them) to the replica, append
    /// the ones it accepted (applied or waiting) to the WAL and keep them for the archive.
    /// The whole batch is checked before anything is applied, so a malformed batch changes
    /// nothing.
    ///
    /// Nobody needs to wait for `durable`: a fact's origin holds it durably already, and a
    /// crash before the append is durable only means pulling it again. So the append is
    /// lazy ([`Wal::append_lazy`]): it joins the next group commit instead of paying a disk
    /// flush of its own. The WAL keeps the order (an own fact admitted after a delivered one
    /// is durable only if that one is).
    ///
    /// An `Err(Replica)` (a fact contradicting its key's type) stops at that fact; the ones
    /// before it stay applied and are appended. An `Err(Wal)` is fatal, as for `admit`.
    pub fn deliver(&mut self, facts: &[u8]) -> Result<DeliverReport, LocalError> {
        let record_max = self.wal.record_payload_bytes_max();
        for fact in encoded_facts(facts) {
            let (_, encoded) = fact.map_err(|source| LocalError::BadDeliveredFact { source })?;
            if encoded.len() > record_max {
                return Err(LocalError::FactTooLarge {
                    bytes: encoded.len(),
                    record_max,
                });
            }
        }
        let mut report = DeliverReport::default();
        let mut payload = Vec::new();
        let mut outcome = Ok(());
        for fact in encoded_facts(facts) {
            let (fact, encoded) = fact.expect("checked above");
            match self.replica.deliver(&fact) {
                Ok(Delivered::Applied { unblocked }) => report.applied += 1 + unblocked as u64,
                Ok(Delivered::Duplicate) => {
                    report.duplicates += 1;
                    continue;
                }
                Ok(Delivered::Buffered) => report.buffered += 1,
                Ok(Delivered::Dropped) => {
                    report.dropped += 1;
                    continue;
                }
                Err(e) => {
                    outcome = Err(e.into());
                    break;
                }
            }
            if payload.len() + encoded.len() > record_max {
                report.durable = Some(self.wal.append_lazy(&[WalRecord::facts(payload)])?);
                payload = Vec::new();
            }
            payload.extend_from_slice(encoded);
            self.unarchived
                .insert((fact.id.origin, fact.id.seq), encoded.to_vec());
        }
        if !payload.is_empty() {
            report.durable = Some(self.wal.append_lazy(&[WalRecord::facts(payload)])?);
        }
        // Delivered facts are durable at their origin, and own ones released here were
        // replayed from the WAL.
        self.publish_facts(0);
        outcome.map(|()| report)
    }

    /// Archived facts of `origin` with `from_seq <= seq <= to_seq`, in sequence order,
    /// encoded back to back: at most `bytes_max` bytes, or the first fact alone if it is
    /// larger (so a pull always progresses). Facts this node never had or already pruned
    /// are absent: the result may have gaps and may end before `to_seq`.
    ///
    /// Own facts whose WAL batch is not durable yet are absent too. A peer holding one
    /// would keep it through this node's crash, while this node, recovering without it,
    /// would issue its sequence number again for another fact: two facts with one id,
    /// and every replica that had the first ignoring the second as a duplicate (found by
    /// Jepsen: counters that never converged). Pushes wait for durability for the same
    /// reason.
    pub fn archived_facts(
        &self,
        origin: NodeId,
        from_seq: u64,
        to_seq: u64,
        bytes_max: usize,
    ) -> Result<Vec<u8>, LocalError> {
        let mut out = Vec::new();
        let to_seq = if origin == self.replica.node() {
            to_seq.min(self.own_durable_now())
        } else {
            to_seq
        };
        if from_seq > to_seq {
            return Ok(out);
        }
        let mut memory = self
            .unarchived
            .range((origin, from_seq)..=(origin, to_seq))
            .map(|(&(_, seq), fact)| (seq, fact.as_slice()))
            .peekable();
        // Room for `fact`? Then take it; `false` once the budget is spent.
        let take = |out: &mut Vec<u8>, fact: &[u8]| {
            if !out.is_empty() && out.len() + fact.len() > bytes_max {
                return false;
            }
            out.extend_from_slice(fact);
            true
        };
        let mut full = false;
        self.store
            .archived_facts(origin, from_seq, to_seq, |seq, fact| {
                // Merge by sequence: facts accepted since the last persist come first where older.
                while let Some(&(mem_seq, mem_fact)) = memory.peek() {
                    if mem_seq > seq {
                        break;
                    }
                    memory.next();
                    if mem_seq == seq {
                        continue; // the stored copy is the same fact
                    }
                    if !take(&mut out, mem_fact) {
                        full = true;
                        return false;
                    }
                }
                if !take(&mut out, fact) {
                    full = true;
                    return false;
                }
                true
            })?;
        if !full {
            for (_, fact) in memory {
                if !take(&mut out, fact) {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Delete archived facts at or below `floor` (per origin), in memory and in the store.
    /// Pass only a floor every node keeps through any recovery (gossip computes it).
    pub fn prune_archive(&mut self, floor: &VersionVector) -> Result<(), LocalError> {
        if floor.is_empty() {
            return Ok(());
        }
        self.unarchived
            .retain(|&(origin, seq), _| seq > floor.get(origin));
        self.store.prune_facts(floor)?;
        Ok(())
    }

    /// Facts accepted since the last `persist` (archived in memory only).
    pub fn unarchived_facts(&self) -> usize {
        self.unarchived.len()
    }

    /// The version vector the oldest kept checkpoint covers: the facts this node holds
    /// through any recovery, even falling back to that checkpoint. Empty before the first
    /// checkpoint (or if its manifest is unreadable), which keeps peers from pruning.
    pub fn checkpointed_vv(&self) -> &VersionVector {
        &self.checkpointed_vv
    }

    /// Write every changed key to the store with the position it now covers. Waits for the
    /// WAL first (rule 2 of the module docs).
    pub fn persist(&mut self) -> Result<AppliedMeta, LocalError> {
        let job = self.begin_persist()?;
        let (meta, receipt) = job.write()?;
        self.end_persist(receipt);
        Ok(meta)
    }

    /// The part of `persist` that needs this state: append the barrier, capture the changed
    /// keys, the archive's new facts and the position they cover. The returned job does the
    /// slow part (waiting for the barrier's fsync, writing the store) without this state, so
    /// admissions and applies go on meanwhile; keys changed after the capture stay dirty for
    /// the next persist. Jobs write one at a time, in capture order (a later `persist` waits
    /// here), so the store never goes back to an older capture.
    pub fn begin_persist(&mut self) -> Result<PersistJob, LocalError> {
        let gate = self.persist_gate.enter();
        // Everything the replica reflects was appended before this barrier (batches become
        // durable in order), so once it is durable all of it is, and the store may cover it.
        // The barrier is an empty facts record (replay reads it as no facts), together with
        // the groups' committed ids, which openraft leaves to us to save (see `log_store.rs`).
        let mut records = self.raft_logs.committed_records();
        records.push(WalRecord::facts(Vec::new()));
        let barrier = self.wal.append(&records)?;
        let mut changed = Vec::new();
        self.replica
            .take_dirty(|key, state| changed.push((key.to_vec(), state.clone())));
        let changed = Arc::new(changed);
        let job = self.persist_jobs;
        self.persist_jobs += 1;
        self.persisting.push((job, changed.clone()));
        let facts = self
            .unarchived
            .iter()
            .map(|(&(origin, seq), fact)| (FactId { origin, seq }, fact.clone()))
            .collect();
        Ok(PersistJob {
            _gate: gate,
            job,
            barrier,
            vv: self.replica.version_vector().clone(),
            groups: self.groups.clone(),
            changed,
            facts,
            leases: self.replica.take_lease_changes(),
            store: self.store.clone(),
        })
    }

    /// After a [`PersistJob`] wrote: its keys and facts are in the store now.
    pub fn end_persist(&mut self, receipt: PersistReceipt) {
        for id in &receipt.facts {
            self.unarchived.remove(&(id.origin, id.seq));
        }
        let before = self.persisting.len();
        self.persisting.retain(|(job, _)| *job != receipt.job);
        assert_eq!(
            self.persisting.len() + 1,
            before,
            "each persist job ends once"
        );
    }

    /// Persist jobs ended so far.
    fn persists_ended(&self) -> u64 {
        self.persist_jobs - self.persisting.len() as u64
    }

    /// Where the store stands for [`scan_keys`](Self::scan_keys): the number of persist jobs
    /// ended, and the store. Keys and states read from the store after this call, merged
    /// with `scan_keys` under the same epoch, are every key the replica holds, and its
    /// state for each key `scan_keys` does not list.
    pub fn scan_epoch(&self) -> (u64, Arc<StateStore>) {
        (self.persists_ended(), self.store.clone())
    }

    /// The keys in `[from, end)` that the store may lack or hold an older state of, sorted
    /// and distinct, or `None` when a persist job ended since `epoch` (read the store again:
    /// keys that job wrote may be missing from what was read, or changed since). Every key
    /// the replica holds is in the store as of any moment after the last ended job, with the
    /// replica's state, unless it is dirty or in a persist job not ended (keys are never
    /// removed, so the store's key set only grows).
    pub fn scan_keys(&self, epoch: u64, from: &[u8], end: Option<&[u8]>) -> Option<Vec<Vec<u8>>> {
        if epoch != self.persists_ended() {
            return None;
        }
        let in_range = |k: &[u8]| k >= from && end.is_none_or(|end| k < end);
        let mut keys: Vec<Vec<u8>> = self
            .replica
            .dirty_key_names()
            .chain(
                self.persisting
                    .iter()
                    .flat_map(|(_, changed)| changed.iter().map(|(k, _)| k.as_slice())),
            )
            .filter(|k| in_range(k))
            .map(<[u8]>::to_vec)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        Some(keys)
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
            self.checkpointed_vv = oldest.vv.clone();
            let mut oldest_applied = BTreeMap::new();
            for (group, bytes) in &oldest.groups {
                let log_id = decode_applied(bytes).map_err(LocalError::RaftLog)?;
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

/// Each fact of a buffer of facts back to back, with its encoding.
fn encoded_facts(mut buf: &[u8]) -> impl Iterator<Item = Result<(FactRef<'_>, &[u8]), FactError>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        match decode_fact(buf) {
            Ok((fact, used)) => {
                let encoded = &buf[..used];
                buf = &buf[used..];
                Some(Ok((fact, encoded)))
            }
            Err(e) => {
                buf = &[];
                Some(Err(e))
            }
        }
    })
}

/// What the oldest kept checkpoint covers, from its manifest; empty when unknown (that only
/// delays pruning).
fn oldest_checkpoint_vv(checkpoints: &Checkpoints) -> VersionVector {
    let oldest = match checkpoints.ids() {
        Ok(ids) => ids.last().copied(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list checkpoints; the fact archive is not pruned until the next checkpoint");
            None
        }
    };
    let Some(id) = oldest else {
        return VersionVector::new();
    };
    match checkpoints.read_manifest(id) {
        Ok(manifest) => manifest.applied.vv,
        Err(e) => {
            tracing::warn!(error = %e, "the oldest checkpoint's manifest is unreadable; the fact archive is not pruned until the next checkpoint");
            VersionVector::new()
        }
    }
}

type Loaded = (
    StateStore,
    AppliedMeta,
    Vec<(Vec<u8>, calm_kernel::KeyRecord)>,
);

/// Create `dir` if it is new and take its lock.
fn lock_new_dir(dir: &Path) -> Result<DataDirLock, LocalError> {
    std::fs::create_dir_all(dir).map_err(|source| LocalError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(DataDirLock::acquire(dir)?)
}

/// Whether RocksDB refused to open because another process holds its `LOCK` file
/// ("IO error: While lock file: .../LOCK: Resource temporarily unavailable").
fn is_lock_held(error: &rocksdb::Error) -> bool {
    let text = error.to_string();
    text.contains("lock file") || text.contains("LOCK:")
}

fn open_store(path: &Path) -> Result<Loaded, StoreError> {
    let store = StateStore::open(path)?;
    let meta = store.meta()?;
    let keys = store.load()?;
    Ok((store, meta, keys))
}
