//! A replica: one node's in-memory view of every key, and the rules for changing it.
//!
//! The replica is the kernel's state machine. It owns:
//!
//! - **admission** of local ops (`admit`): classify, and for the fast path assign the next
//!   sequence, apply the fact and encode it for the WAL and gossip — without allocating on a
//!   warm key;
//! - **delivery** of facts from peers (`deliver`): duplicates are dropped by one comparison
//!   with the version vector; facts of each origin are applied strictly in sequence order
//!   (gaps and unfunded escrow spends wait in a bounded buffer); so the applied set is always
//!   exactly a version vector;
//! - **commands** from Raft (`apply_command`): applied only once every fact inside the
//!   command's frontier is applied here (else `Blocked`, naming what is missing), which makes
//!   their effect identical on every replica;
//! - **Raft snapshot install** per group (`install_snapshot`): a lagging replica joins a
//!   peer's key states taken at a later log index of the group (see
//!   `KeyState::join_snapshot`);
//! - the **rules** in force, as a compiled snapshot switched at a Raft log position;
//! - when asked (`with_journal`), a **journal** of every key change in apply order, each
//!   with its cause and the key's value before and after: what watchers are told. A
//!   snapshot install is not journaled (it stands for entries this replica never applied:
//!   the caller tells watchers of the gap).
//!
//! # Facts beyond the version vector
//!
//! The version vector only ever advances contiguously, by delivery. A snapshot install can
//! leave a key holding facts of an origin beyond it (the peer had seen more of that origin);
//! the version vector is left alone (this replica cannot serve those facts to peers), and
//! when such a fact is later delivered it advances the version vector without touching the
//! key again: a fact is "already applied" when its key's [`KeyState::fact_seq`] for its
//! origin reaches it. The same per-key test decides whether a command's frontier is
//! satisfied. Without an install, a key's `fact_seq` never exceeds the version vector, so
//! both tests reduce to the version-vector comparison.
//!
//! # Determinism contract (between Raft and this state machine)
//!
//! Given the same sequence of `apply_command` calls, every replica returns the same outcomes
//! and holds the same Raft-ordered state (register bases and versions, counter bases, escrow
//! pools, key types), whatever facts it has or has not seen; once two replicas have applied the
//! same facts and commands, in any interleaving that respects the rules above, they hold equal
//! values. Nothing here reads a clock, does I/O, iterates a hash map into an output, or
//! depends on memory addresses. The proptests in `kernel/tests/` check this.

use crate::admission::{Admission, ConsensusReason, EscrowView, classify};
use crate::clock::{HlcTimestamp, NodeId};
use crate::command::{Command, CommandBody, KeyFrontier};
use crate::fact::{Fact, FactError, FactId, FactKind, FactRef};
use crate::lease::{
    GroupLeases, LeaseChanges, LeaseCommand, LeaseId, LeaseOutcome, LeaseRefusal, Leases,
};
use crate::refusal::Refusal;
use crate::rules::CompiledRules;
use crate::state::{KeyRecord, KeyState, Outcome, Value};
use crate::txn::{Compare, Test, Txn, TxnOutcome, TxnPart};
use crate::value::{Mode, Op, OpKind, ValueType};
use crate::vv::VersionVector;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use thiserror::Error;

/// Default bound on facts waiting for earlier ones.
pub const PENDING_FACTS_MAX_DEFAULT: usize = 64 * 1024;

/// FNV-1a: fast on short keys, and deterministic (no random seed), so nothing about the
/// replica varies between runs. The table is never iterated into an output.
#[derive(Default)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // Final avalanche so the low bits hashbrown uses depend on every byte.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^ (x >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

type KeyMap = HashMap<Box<[u8]>, KeyEntry, BuildHasherDefault<KeyHasher>>;

#[derive(Clone, Debug)]
struct KeyEntry {
    record: KeyRecord,
    /// The key's mode under `rules_version` (resolving a glob per op would cost more than the
    /// whole fast path).
    rules_version: u64,
    mode: Mode,
    /// Changed since the last `take_dirty`; its key is then in `Replica::dirty`.
    dirty: bool,
}

/// What `admit` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// Applied locally as fact `id`; its encoding was appended to the caller's buffer.
    Local { id: FactId, escrow: bool },
    /// Must be proposed to the key's Raft group (see `Replica::prepare_command`).
    Consensus(ConsensusReason),
}

/// What `deliver` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Applied, together with `unblocked` waiting facts it released: the version vector
    /// advanced. A fact its key already held (installed with a Raft snapshot) counts as
    /// applied too: it advances the version vector and leaves the key unchanged.
    Applied { unblocked: usize },
    /// Already applied here: nothing changed.
    Duplicate,
    /// Waits for earlier facts of its origin, for its key's creation, or for escrow rights.
    Buffered,
    /// The wait buffer is full; the fact was dropped and anti-entropy will bring it again.
    Dropped,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReplicaError {
    #[error(transparent)]
    Refused(#[from] RefusedOp),
    /// A command's frontier names facts not applied here yet. `missing` lists, per origin
    /// (sorted), the sequence this replica needs that origin's facts up to: deliver that
    /// origin's facts after the version vector up to it (from any peer that has them, not
    /// necessarily the proposer), then apply the command again.
    #[error(
        "command on key '{key}' observed facts this replica has not applied yet ({}); deliver each origin's facts after this replica's version vector up to that sequence, then apply the command again",
        display_missing(missing)
    )]
    Blocked {
        key: String,
        missing: Vec<(NodeId, u64)>,
    },
    /// A Raft snapshot that cannot be this replica's group state.
    #[error(
        "Raft snapshot does not fit this replica: key '{key}' {problem}; do not install it: the snapshot or this replica's state store is corrupt or from another cluster, report it"
    )]
    BadSnapshot { key: String, problem: String },
    #[error(transparent)]
    Fact(#[from] FactError),
    #[error(
        "fact {origin}:{seq} is {fact_type} but key '{key}' is {key_type}; a peer sent a fact that contradicts the key's type, which means a bug or corruption: stop the node and report it"
    )]
    TypeConflict {
        origin: NodeId,
        seq: u64,
        key: String,
        fact_type: ValueType,
        key_type: ValueType,
    },
}

fn display_missing(missing: &[(NodeId, u64)]) -> String {
    missing
        .iter()
        .map(|(origin, seq)| format!("n{origin} up to {seq}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many of `node`'s own facts wait in `pending`.
fn own_pending(pending: &BTreeMap<(NodeId, u64), Fact>, node: NodeId) -> usize {
    pending.range((node, 0)..=(node, u64::MAX)).count()
}

/// A refusal with its key, as an owned error.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{message}")]
pub struct RefusedOp {
    pub refusal: Refusal,
    pub message: String,
}

impl RefusedOp {
    fn new(key: &[u8], refusal: Refusal) -> RefusedOp {
        RefusedOp {
            refusal,
            message: refusal.on_key(key).to_string(),
        }
    }
}

/// Why a key changed (see [`Replica::with_journal`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeCause {
    /// A fast-path fact: admitted here, delivered by a peer or replayed. A fact a snapshot
    /// install had already put on its key is journaled too when it is delivered (its value
    /// then does not change), so every node journals each applied fact once.
    Fact(FactId),
    /// A Raft command that took effect (a failed compare-and-set or a refusal changes
    /// nothing and is not journaled); the caller knows its group and log index.
    Command,
}

/// One change of one key, as the journal records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: Box<[u8]>,
    pub cause: ChangeCause,
    /// The fact's or command's timestamp.
    pub hlc: HlcTimestamp,
    /// The value before and after; `None`: the key did not exist or was deleted.
    pub prev: Option<Value>,
    pub value: Option<Value>,
}

/// What `journal_change` needs of a key before a change: its value, when journaling.
fn value_before(journal: &Option<Vec<Change>>, record: &KeyRecord) -> Option<Option<Value>> {
    journal.as_ref().map(|_| visible_value(record))
}

/// Journal (when journaling: `prev` is from `value_before`) the change of `key` to what
/// `record` holds now.
fn journal_change(
    journal: &mut Option<Vec<Change>>,
    key: &[u8],
    cause: ChangeCause,
    hlc: HlcTimestamp,
    prev: Option<Option<Value>>,
    record: &KeyRecord,
) {
    if let (Some(journal), Some(prev)) = (journal, prev) {
        journal.push(Change {
            key: key.into(),
            cause,
            hlc,
            prev,
            value: visible_value(record),
        });
    }
}

/// The value a read of `record` returns (`None`: absent or deleted).
fn visible_value(record: &KeyRecord) -> Option<Value> {
    if !record.visible() {
        return None;
    }
    match record.state.value() {
        Value::Register { value: None, .. } => None,
        value => Some(value),
    }
}

#[derive(Clone)]
pub struct Replica {
    node: NodeId,
    vv: VersionVector,
    keys: KeyMap,
    /// Facts waiting for earlier ones, by (origin, seq).
    pending: BTreeMap<(NodeId, u64), Fact>,
    pending_facts_max: usize,
    rules: CompiledRules,
    rules_version: u64,
    /// Keys changed since the last `take_dirty`, for the node to persist in one batch.
    dirty: Vec<Box<[u8]>>,
    /// Changes since the last `take_journal`, in apply order; `None`: not journaling.
    journal: Option<Vec<Change>>,
    /// Every group's leases (Raft-ordered, like commands; see `lease.rs`).
    leases: Leases,
}

impl Replica {
    pub fn new(node: NodeId, rules: CompiledRules) -> Replica {
        assert!(node != 0, "node id 0 is reserved");
        let rules_version = rules.version();
        Replica {
            node,
            vv: VersionVector::new(),
            keys: KeyMap::default(),
            pending: BTreeMap::new(),
            pending_facts_max: PENDING_FACTS_MAX_DEFAULT,
            rules,
            rules_version,
            dirty: Vec::new(),
            journal: None,
            leases: Leases::default(),
        }
    }

    /// Journal every key change from now on (see [`Change`]); the caller takes them with
    /// [`take_journal`](Self::take_journal) after each call that may change keys. Costs a
    /// copy of the key and of its value before and after per change.
    pub fn with_journal(mut self) -> Replica {
        self.journal = Some(Vec::new());
        self
    }

    /// The changes journaled since the last call, in apply order (empty when not journaling).
    pub fn take_journal(&mut self) -> Vec<Change> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Rebuild from persisted state: every key's state and the version vector of facts
    /// applied (written in the same batch, so they agree; after a snapshot install keys may
    /// hold facts beyond it, which replay then only counts). Facts after it are replayed with
    /// `deliver`, commands after the group's applied index with `apply_command`.
    pub fn restore(
        node: NodeId,
        rules: CompiledRules,
        vv: VersionVector,
        keys: impl IntoIterator<Item = (Vec<u8>, KeyRecord)>,
    ) -> Replica {
        let mut replica = Replica::new(node, rules);
        replica.vv = vv;
        for (key, record) in keys {
            let mode = replica.rules.resolve(&key).mode;
            let previous = replica.keys.insert(
                key.into_boxed_slice(),
                KeyEntry {
                    record,
                    rules_version: replica.rules_version,
                    mode,
                    dirty: false,
                },
            );
            assert!(previous.is_none(), "state store yields each key once");
        }
        replica
    }

    /// Hand every key changed since the last call to `sink` (with its state), oldest change
    /// first, and mark them clean. The node writes them with the version vector and applied
    /// indexes in one batch.
    pub fn take_dirty(&mut self, mut sink: impl FnMut(&[u8], &KeyRecord)) {
        for key in self.dirty.drain(..) {
            let entry = self.keys.get_mut(&key).expect("dirty keys exist");
            debug_assert!(entry.dirty);
            entry.dirty = false;
            sink(&key, &entry.record);
        }
    }

    pub fn dirty_keys(&self) -> usize {
        self.dirty.len()
    }

    /// The keys changed since the last `take_dirty`, in no particular order: with the store's
    /// keys, every key this replica holds (a key is never removed, only made a tombstone).
    pub fn dirty_key_names(&self) -> impl Iterator<Item = &[u8]> {
        self.dirty.iter().map(|k| &k[..])
    }

    pub fn with_pending_facts_max(mut self, pending_facts_max: usize) -> Replica {
        assert!(pending_facts_max > 0);
        self.pending_facts_max = pending_facts_max;
        self
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Every fact applied here, exactly.
    pub fn version_vector(&self) -> &VersionVector {
        &self.vv
    }

    pub fn pending_facts(&self) -> usize {
        self.pending.len()
    }

    pub fn rules(&self) -> &CompiledRules {
        &self.rules
    }

    pub fn rules_version(&self) -> u64 {
        self.rules_version
    }

    /// Switch rules. Called at the same Raft log position on every node.
    pub fn set_rules(&mut self, rules: CompiledRules) {
        assert!(
            rules.version() > self.rules_version,
            "rules versions only rise"
        );
        self.rules_version = rules.version();
        self.rules = rules;
    }

    /// The key's value; `None` when it does not exist or is deleted.
    pub fn read(&self, key: &[u8]) -> Option<Value> {
        self.key_state(key).map(KeyState::value)
    }

    /// The key's state; `None` when it does not exist or is deleted.
    pub fn key_state(&self, key: &[u8]) -> Option<&KeyState> {
        self.keys
            .get(key)
            .filter(|e| e.record.visible())
            .map(|e| &e.record.state)
    }

    /// The key as stored, deleted or not.
    pub fn key_record(&self, key: &[u8]) -> Option<&KeyRecord> {
        self.keys.get(key).map(|e| &e.record)
    }

    /// Keys stored, deleted ones' tombstones included.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Every key `pred` selects with a copy of its state, sorted by key: what a Raft group
    /// snapshot of this replica holds (pass the group's membership test).
    pub fn keys_matching(&self, pred: impl Fn(&[u8]) -> bool) -> Vec<(Vec<u8>, KeyRecord)> {
        let mut out: Vec<(Vec<u8>, KeyRecord)> = self
            .keys
            .iter()
            .filter(|(key, _)| pred(key))
            .map(|(key, entry)| (key.to_vec(), entry.record.clone()))
            .collect();
        // The map's order is arbitrary; outputs must not depend on it.
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Install a Raft snapshot of one group: `keys` is every key of the group (`in_group`)
    /// with its state on the peer that took the snapshot at log index N, and this replica
    /// has applied a prefix (index <= N) of the group's log. Afterwards the group's keys are
    /// as if this replica had applied the log up to N itself, on top of, per key and origin,
    /// the longer of its own and the peer's fact prefixes (`KeyState::join_snapshot`). The
    /// version vector does not change; facts the keys now hold beyond it are recognised
    /// when delivered (see the module docs). Installed keys are marked dirty; waiting facts
    /// that became applicable are applied, and their count is returned.
    ///
    /// Everything is checked before anything changes: a snapshot key outside the group, a
    /// key twice, a type differing from the local key's, or a local key of the group missing
    /// from the snapshot (keys are created in Raft order, so the snapshot holds every key of
    /// this replica's prefix) is `BadSnapshot` and leaves the replica untouched.
    pub fn install_snapshot(
        &mut self,
        keys: impl IntoIterator<Item = (Vec<u8>, KeyRecord)>,
        in_group: impl Fn(&[u8]) -> bool,
    ) -> Result<usize, ReplicaError> {
        let bad = |key: &[u8], problem: String| ReplicaError::BadSnapshot {
            key: crate::refusal::DisplayKey(key).to_string(),
            problem,
        };
        let snapshot: BTreeMap<Vec<u8>, KeyRecord> = {
            let mut map = BTreeMap::new();
            for (key, state) in keys {
                if !in_group(&key) {
                    return Err(bad(&key, "is not in the snapshot's group".into()));
                }
                if let Some(local) = self.keys.get(key.as_slice())
                    && let Err(problem) = local.record.check_join(&state)
                {
                    return Err(bad(&key, problem));
                }
                if map.contains_key(&key) {
                    return Err(bad(&key, "appears twice".into()));
                }
                map.insert(key, state);
            }
            map
        };
        let mut absent: Vec<&[u8]> = self
            .keys
            .keys()
            .map(|k| &k[..])
            .filter(|k| in_group(k) && !snapshot.contains_key(*k))
            .collect();
        absent.sort_unstable();
        if let Some(key) = absent.first() {
            return Err(bad(
                key,
                format!(
                    "exists here but not in the snapshot ({} such keys); this replica applied group commands the snapshot lacks",
                    absent.len()
                ),
            ));
        }
        for (key, state) in snapshot {
            match self.keys.get_mut(key.as_slice()) {
                Some(entry) => {
                    entry.record.join_snapshot(&state);
                    mark_dirty(&mut self.dirty, entry, &key);
                }
                None => {
                    let mode = self.rules.resolve(&key).mode;
                    let key: Box<[u8]> = key.into_boxed_slice();
                    self.dirty.push(key.clone());
                    self.keys.insert(
                        key,
                        KeyEntry {
                            record: state,
                            rules_version: self.rules_version,
                            mode,
                            dirty: true,
                        },
                    );
                }
            }
        }
        Ok(if self.pending.is_empty() {
            0
        } else {
            self.drain()
        })
    }

    /// This node's quota on a bounded counter key.
    pub fn escrow_view(&self, key: &[u8]) -> Option<EscrowView> {
        match self.keys.get(key).map(|e| &e.record.state) {
            Some(KeyState::Bounded(b)) => {
                let (down, up) = b.rights_of(self.node);
                Some(EscrowView {
                    down,
                    up,
                    bounds: b.bounds(),
                })
            }
            _ => None,
        }
    }

    /// The mode of `key` under the rules in force.
    pub fn mode_of(&self, key: &[u8]) -> Mode {
        match self.keys.get(key) {
            Some(e) if e.rules_version == self.rules_version => e.mode,
            _ => self.rules.resolve(key).mode,
        }
    }

    /// For each origin where this replica lacks facts of `target`, the range `(origin, from,
    /// to)` it should pull: like [`VersionVector::missing_from`], but starting after the run
    /// of facts already waiting here right after the version vector. Asking for those again
    /// would bring only duplicates, and a pull that brings nothing new stops, so the fact
    /// they wait for (often another origin's) was never asked for: found by Jepsen, a
    /// restarted node whose every origin's next fact waited on a transfer it never pulled.
    pub fn wanted_from(&self, target: &VersionVector) -> Vec<(NodeId, u64, u64)> {
        target
            .iter()
            .filter_map(|(origin, to)| {
                let mut from = self.vv.get(origin) + 1;
                if !self.pending.is_empty() {
                    for (&(o, seq), _) in self.pending.range((origin, from)..) {
                        if o != origin || seq != from {
                            break;
                        }
                        from += 1;
                    }
                }
                (from <= to).then_some((origin, from, to))
            })
            .collect()
    }

    /// Facts of this node still waiting here (only possible while recovery re-applies them).
    pub fn own_pending_facts(&self) -> usize {
        own_pending(&self.pending, self.node)
    }

    /// A new own fact takes sequence `vv[self] + 1`: with own facts waiting, that number is
    /// taken, so admission must wait until they applied.
    fn check_no_own_pending(&self, key: &[u8]) -> Result<(), RefusedOp> {
        match self.own_pending_facts() {
            0 => Ok(()),
            waiting => Err(RefusedOp::new(key, Refusal::OwnFactsPending { waiting })),
        }
    }

    /// Admit a local op. On the fast path the fact is applied and its encoding appended to
    /// `out` (for the WAL and gossip); the caller acknowledges it once the WAL says durable.
    pub fn admit(
        &mut self,
        key: &[u8],
        op: &Op,
        hlc: HlcTimestamp,
        out: &mut Vec<u8>,
    ) -> Result<Admitted, RefusedOp> {
        // A fact admitted after the lease's delete would bring the key back on the replicas
        // that apply it later: writes to an attached key are ordered like the delete.
        if self.leases.lease_of(key).is_some() {
            return Ok(Admitted::Consensus(ConsensusReason::Leased));
        }
        let kind = op.kind();
        let (arg, payload, fact_kind) = match op {
            Op::CounterAdd { delta } => (*delta, &[][..], FactKind::CounterAdd),
            Op::BoundedAdd { delta } => (*delta, &[][..], FactKind::BoundedAdd),
            Op::MaxRaise { value } => (*value, &[][..], FactKind::MaxRaise),
            Op::SetAdd { element } => (0, element.as_slice(), FactKind::SetAdd),
            Op::RegisterPut { value } => (0, value.as_slice(), FactKind::RegisterLww),
            Op::RegisterDelete => (0, &[][..], FactKind::RegisterLwwDelete),
            // Never on the fast path; classify below decides between Raft and refusal.
            _ => (0, &[][..], FactKind::CounterAdd),
        };
        let rules_version = self.rules_version;
        let Some(entry) = self.keys.get_mut(key) else {
            let mode = self.rules.resolve(key).mode;
            return match classify(mode, None, kind, arg, None) {
                Admission::Consensus(reason) => Ok(Admitted::Consensus(reason)),
                Admission::Refused(r) => Err(RefusedOp::new(key, r)),
                other => unreachable!("a key without a type is never admitted locally: {other:?}"),
            };
        };
        if entry.rules_version != rules_version {
            entry.mode = self.rules.resolve(key).mode;
            entry.rules_version = rules_version;
        }
        let key_type = entry.record.state.value_type();
        // A delete of any other type than a register: through Raft, like a set.
        if kind == OpKind::RegisterDelete && key_type != ValueType::Register {
            return match entry.mode {
                Mode::Available => Err(RefusedOp::new(
                    key,
                    Refusal::NeedsConsensus { key_type, op: kind },
                )),
                _ => Ok(Admitted::Consensus(ConsensusReason::NonCommutative)),
            };
        }
        // A deleted key written with another type is created anew, in Raft order.
        if entry.record.tombstone.is_some() && kind.value_type() != key_type {
            return match classify(entry.mode, None, kind, arg, None) {
                Admission::Consensus(reason) => Ok(Admitted::Consensus(reason)),
                Admission::Refused(r) => Err(RefusedOp::new(key, r)),
                other => unreachable!("a key without a type is never admitted locally: {other:?}"),
            };
        }
        let escrow = match &entry.record.state {
            KeyState::Bounded(b) => {
                let (down, up) = b.rights_of(self.node);
                Some(EscrowView {
                    down,
                    up,
                    bounds: b.bounds(),
                })
            }
            _ => None,
        };
        let escrow_path = match classify(entry.mode, Some(key_type), kind, arg, escrow) {
            Admission::FastPath => false,
            Admission::EscrowLocal => true,
            Admission::Consensus(reason) => return Ok(Admitted::Consensus(reason)),
            Admission::Refused(r) => return Err(RefusedOp::new(key, r)),
        };
        if kind == OpKind::CounterAdd
            && let KeyState::Counter(n) = &entry.record.state
            && n.value().checked_add(arg).is_none()
        {
            return Err(RefusedOp::new(key, Refusal::Overflow { op: kind }));
        }
        if let waiting @ 1.. = own_pending(&self.pending, self.node) {
            return Err(RefusedOp::new(key, Refusal::OwnFactsPending { waiting }));
        }
        let id = FactId {
            origin: self.node,
            seq: self.vv.get(self.node) + 1,
        };
        let fact = FactRef {
            id,
            kind: fact_kind,
            hlc,
            arg,
            peer: 0,
            generation: entry.record.generation,
            key,
            payload,
        };
        fact.encode_into(out).map_err(|e| RefusedOp {
            refusal: Refusal::BadAmount,
            message: e.to_string(),
        })?;
        debug_assert!(entry.record.state.can_apply(&fact));
        let prev = value_before(&self.journal, &entry.record);
        entry.record.state.apply_fact(&fact);
        mark_dirty(&mut self.dirty, entry, key);
        let cause = ChangeCause::Fact(id);
        journal_change(&mut self.journal, key, cause, hlc, prev, &entry.record);
        self.vv.advance(self.node, id.seq);
        Ok(Admitted::Local {
            id,
            escrow: escrow_path,
        })
    }

    /// Give `amount` escrow rights on `key` to node `to` (`amount > 0`: decrement rights,
    /// `< 0`: increment rights). Only the giver issues a transfer, from rights it holds.
    pub fn transfer(
        &mut self,
        key: &[u8],
        to: NodeId,
        amount: i64,
        hlc: HlcTimestamp,
        out: &mut Vec<u8>,
    ) -> Result<FactId, RefusedOp> {
        if amount == 0 || amount == i64::MIN || to == self.node || to == 0 {
            return Err(RefusedOp::new(key, Refusal::BadAmount));
        }
        self.check_no_own_pending(key)?;
        let Some((KeyState::Bounded(b), generation)) = self
            .keys
            .get(key)
            .map(|e| (&e.record.state, e.record.generation))
        else {
            let refusal = match self.keys.get(key) {
                Some(e) => Refusal::TypeMismatch {
                    key_type: e.record.state.value_type(),
                    op: OpKind::BoundedAdd,
                },
                None => Refusal::MissingBounds,
            };
            return Err(RefusedOp::new(key, refusal));
        };
        b.holder_rights(self.node, -amount)
            .map_err(|r| RefusedOp::new(key, r))?;
        let id = FactId {
            origin: self.node,
            seq: self.vv.get(self.node) + 1,
        };
        let fact = FactRef {
            id,
            kind: FactKind::EscrowTransfer,
            hlc,
            arg: amount,
            peer: to,
            generation,
            key,
            payload: &[],
        };
        fact.encode_into(out).map_err(|e| RefusedOp {
            refusal: Refusal::BadAmount,
            message: e.to_string(),
        })?;
        let entry = self.keys.get_mut(key).expect("checked above");
        entry.record.state.apply_fact(&fact);
        mark_dirty(&mut self.dirty, entry, key);
        self.vv.advance(self.node, id.seq);
        Ok(id)
    }

    /// Turn an op that needs consensus into the command to propose, stamped with what this
    /// replica has observed on the key. Returns a refusal for ops no path can take.
    pub fn prepare_command(
        &self,
        key: &[u8],
        op: &Op,
        hlc: HlcTimestamp,
    ) -> Result<Command, RefusedOp> {
        let resolved = self.rules.resolve(key);
        let record = self.keys.get(key).map(|e| &e.record);
        let generation = record.map_or(0, |r| r.generation);
        let existing = record.map(|r| &r.state);
        let bounds = match existing {
            Some(KeyState::Bounded(b)) => Some(b.bounds()),
            _ => resolved.bounds,
        };
        let need_bounds = || bounds.ok_or_else(|| RefusedOp::new(key, Refusal::MissingBounds));
        let body = match op.clone() {
            Op::RegisterPut { value } => CommandBody::RegisterPut { value },
            // Applies to a key of any type (`CommandBody::RegisterDelete` is what older
            // logs hold).
            Op::RegisterDelete => CommandBody::Delete,
            Op::RegisterCas { expect, value } => CommandBody::RegisterCas { expect, value },
            Op::CounterAdd { delta } => CommandBody::CounterAdd { delta },
            Op::CounterSet { value } => CommandBody::CounterSet { value },
            Op::BoundedAdd { delta } => CommandBody::BoundedAdd {
                delta,
                bounds: need_bounds()?,
            },
            Op::BoundedSet { value } => CommandBody::BoundedSet {
                value,
                bounds: need_bounds()?,
            },
            Op::BoundedSetBounds { bounds } => CommandBody::BoundedSetBounds { bounds },
            Op::MaxRaise { value } => CommandBody::MaxRaise { value },
            Op::MaxSet { value } => CommandBody::MaxSet { value },
            Op::SetAdd { element } => CommandBody::SetAdd { element },
            Op::SetRemove { element } => CommandBody::SetRemove { element },
        };
        let mut existing = existing;
        if let (Some(record), Some(body_type)) = (record, body.value_type())
            && record.state.value_type() != body_type
        {
            if record.tombstone.is_none() {
                return Err(RefusedOp::new(
                    key,
                    Refusal::TypeMismatch {
                        key_type: record.state.value_type(),
                        op: op.kind(),
                    },
                ));
            }
            // Recreates the deleted key with another type: it observes nothing of the old.
            existing = None;
        }
        Ok(Command {
            key: key.to_vec(),
            hlc,
            proposer: self.node,
            frontier: existing
                .map(KeyState::frontier)
                .unwrap_or_default()
                .with_generation(generation),
            absorb: existing.and_then(KeyState::lww_winner),
            body,
        })
    }

    /// A transaction comparison on `key`, stamped with what this replica observed on it
    /// (as `prepare_command` stamps a command).
    pub fn prepare_compare(&self, key: &[u8], test: Test) -> Compare {
        let record = self.keys.get(key).map(|e| &e.record);
        Compare {
            key: key.to_vec(),
            test,
            frontier: record
                .map(|r| r.state.frontier().with_generation(r.generation))
                .unwrap_or_default(),
            absorb: record.and_then(|r| r.state.lww_winner()),
        }
    }

    /// A command asking the key's pool for escrow rights for this node.
    pub fn prepare_grant(
        &self,
        key: &[u8],
        down: i64,
        up: i64,
        hlc: HlcTimestamp,
    ) -> Result<Command, RefusedOp> {
        let generation = self.keys.get(key).map_or(0, |e| e.record.generation);
        let bounds = match self.keys.get(key).map(|e| &e.record.state) {
            Some(KeyState::Bounded(b)) => b.bounds(),
            Some(other) => {
                return Err(RefusedOp::new(
                    key,
                    Refusal::TypeMismatch {
                        key_type: other.value_type(),
                        op: OpKind::BoundedAdd,
                    },
                ));
            }
            None => self
                .rules
                .resolve(key)
                .bounds
                .ok_or_else(|| RefusedOp::new(key, Refusal::MissingBounds))?,
        };
        Ok(Command {
            key: key.to_vec(),
            hlc,
            proposer: self.node,
            body: CommandBody::EscrowGrant {
                node: self.node,
                down,
                up,
                bounds,
            },
            frontier: KeyFrontier::default().with_generation(generation),
            absorb: None,
        })
    }

    /// The facts inside `cmd`'s frontier that this replica has not applied, as `(origin,
    /// seq)`: empty when `apply_command` would not report `Blocked`. Applying commands on
    /// other keys does not change the answer (a command touches its own key only).
    pub fn missing_facts(&self, cmd: &Command) -> Vec<(NodeId, u64)> {
        self.missing_on(&cmd.key, &cmd.frontier)
    }

    /// The facts `frontier`, taken on `key`, names that this replica has not applied.
    fn missing_on(&self, key: &[u8], frontier: &KeyFrontier) -> Vec<(NodeId, u64)> {
        let mut beyond_vv = frontier
            .facts()
            .iter()
            .filter(|e| self.vv.get(e.origin) < e.seq)
            .peekable();
        // Nearly always empty (a register's frontier names no facts; a counter's, facts the
        // version vector covers): then the key lookup, a cache miss per command, is skipped.
        if beyond_vv.peek().is_none() {
            return Vec::new();
        }
        // The frontier names facts on this key: the key holding them is what counts (after
        // a snapshot install it may hold facts beyond the version vector).
        let state = self.keys.get(key).map(|e| &e.record.state);
        beyond_vv
            .filter(|e| state.is_none_or(|s| s.fact_seq(e.origin) < e.seq))
            .map(|e| (e.origin, e.seq))
            .collect()
    }

    /// Apply a Raft-ordered command. `Err(Blocked)` means facts inside its frontier are not
    /// applied here yet: nothing changed; deliver them and call again.
    pub fn apply_command(&mut self, cmd: &Command) -> Result<Outcome, ReplicaError> {
        let missing = self.missing_facts(cmd);
        if !missing.is_empty() {
            return Err(ReplicaError::Blocked {
                key: crate::refusal::DisplayKey(&cmd.key).to_string(),
                missing,
            });
        }
        let outcome = match self.keys.get_mut(cmd.key.as_slice()) {
            Some(entry) => {
                let prev = value_before(&self.journal, &entry.record);
                let (outcome, _) = run_command(Some(&mut entry.record), cmd);
                mark_dirty(&mut self.dirty, entry, &cmd.key);
                if took_effect(&outcome) {
                    let (cause, hlc) = (ChangeCause::Command, cmd.hlc);
                    journal_change(&mut self.journal, &cmd.key, cause, hlc, prev, &entry.record);
                }
                if detaches(&outcome) {
                    // A write without the lease owns the key now (as in etcd).
                    self.leases.detach(&cmd.key);
                }
                outcome
            }
            None => {
                let (outcome, created) = run_command(None, cmd);
                if let Some(record) = created {
                    self.store_created(cmd, &outcome, record);
                }
                outcome
            }
        };
        if !self.pending.is_empty() {
            self.drain();
        }
        Ok(outcome)
    }

    /// Store the record a command created on a key that did not exist.
    fn store_created(&mut self, cmd: &Command, outcome: &Outcome, record: KeyRecord) {
        if took_effect(outcome) {
            let prev = self.journal.as_ref().map(|_| None);
            let (cause, hlc) = (ChangeCause::Command, cmd.hlc);
            journal_change(&mut self.journal, &cmd.key, cause, hlc, prev, &record);
        }
        self.keys.insert(
            cmd.key.clone().into_boxed_slice(),
            KeyEntry {
                record,
                rules_version: self.rules_version,
                mode: self.rules.resolve(&cmd.key).mode,
                dirty: true,
            },
        );
        self.dirty.push(cmd.key.clone().into_boxed_slice());
    }

    /// The facts a transaction's comparisons and commands (both branches) observed that
    /// this replica has not applied: empty when `apply_txn` would not report `Blocked`.
    pub fn txn_missing_facts(&self, txn: &Txn) -> Vec<(NodeId, u64)> {
        let mut missing: Vec<(NodeId, u64)> = txn
            .compares
            .iter()
            .flat_map(|c| self.missing_on(&c.key, &c.frontier))
            .chain(
                txn.success
                    .iter()
                    .chain(&txn.failure)
                    .flat_map(|c| self.missing_facts(c)),
            )
            .collect();
        // One entry per origin, the highest sequence (what `Blocked` promises).
        missing.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        missing.dedup_by_key(|m| m.0);
        missing
    }

    /// Apply a Raft-ordered transaction (see `txn.rs`): evaluate every comparison, then
    /// apply the chosen branch's commands all or none. `Err(Blocked)`: facts it observed are
    /// not applied here yet; nothing changed.
    pub fn apply_txn(&mut self, txn: &Txn) -> Result<TxnOutcome, ReplicaError> {
        let missing = self.txn_missing_facts(txn);
        if !missing.is_empty() {
            let key = txn.keys().next().unwrap_or_default();
            return Err(ReplicaError::Blocked {
                key: crate::refusal::DisplayKey(key).to_string(),
                missing,
            });
        }
        let mut succeeded = true;
        // Every comparison is evaluated, so a malformed one is refused whatever the others say.
        for (i, compare) in txn.compares.iter().enumerate() {
            let record = self.keys.get(compare.key.as_slice()).map(|e| &e.record);
            match crate::txn::evaluate(record, compare) {
                Ok(holds) => succeeded &= holds,
                Err(refusal) => {
                    return Ok(TxnOutcome::Refused {
                        at: TxnPart::Compare(i),
                        key: compare.key.clone(),
                        refusal,
                    });
                }
            }
        }
        let branch = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        // Staged on copies: a refused command leaves no trace of the others.
        let mut staged = Vec::with_capacity(branch.len());
        for (index, cmd) in branch.iter().enumerate() {
            let mut copy = self.keys.get(cmd.key.as_slice()).map(|e| e.record.clone());
            let (outcome, created) = run_command(copy.as_mut(), cmd);
            if let Outcome::Refused(refusal) = outcome {
                return Ok(TxnOutcome::Refused {
                    at: TxnPart::Op { succeeded, index },
                    key: cmd.key.clone(),
                    refusal,
                });
            }
            staged.push((created.or(copy), outcome));
        }
        let mut outcomes = Vec::with_capacity(staged.len());
        for (cmd, (after, outcome)) in branch.iter().zip(staged) {
            match (self.keys.get_mut(cmd.key.as_slice()), after) {
                (Some(entry), Some(record)) => {
                    let prev = value_before(&self.journal, &entry.record);
                    entry.record = record;
                    mark_dirty(&mut self.dirty, entry, &cmd.key);
                    if took_effect(&outcome) {
                        let (cause, hlc) = (ChangeCause::Command, cmd.hlc);
                        journal_change(
                            &mut self.journal,
                            &cmd.key,
                            cause,
                            hlc,
                            prev,
                            &entry.record,
                        );
                    }
                }
                (None, Some(record)) => self.store_created(cmd, &outcome, record),
                // A delete of a key that does not exist: nothing to store.
                (_, None) => {}
            }
            if detaches(&outcome) {
                self.leases.detach(&cmd.key);
            }
            outcomes.push(outcome);
        }
        if !self.pending.is_empty() {
            self.drain();
        }
        Ok(TxnOutcome::Applied {
            succeeded,
            outcomes,
        })
    }

    /// Every group's leases.
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Put back the leases the state store holds (at open, with `restore`).
    pub fn restore_leases(&mut self, leases: Leases) {
        self.leases = leases;
    }

    /// The lease rows changed since the last call, for the node to persist with the keys.
    pub fn take_lease_changes(&mut self) -> LeaseChanges {
        self.leases.take_dirty()
    }

    /// Replace `group`'s leases with a Raft snapshot's (with `install_snapshot`).
    pub fn install_group_leases(&mut self, group: u64, leases: GroupLeases) {
        self.leases.install(group, leases);
    }

    /// Apply a Raft-ordered lease entry of `group` whose log entry is of `entry_term`. A
    /// revoke or an expiry deletes the lease's keys here, in the same step (see `lease.rs`).
    pub fn apply_lease(
        &mut self,
        group: u64,
        cmd: &LeaseCommand,
        entry_term: u64,
        hlc: HlcTimestamp,
        proposer: NodeId,
    ) -> LeaseOutcome {
        match cmd {
            LeaseCommand::Grant { subject, ttl_ms } => {
                match self.leases.grant(group, subject, *ttl_ms) {
                    Ok((id, ttl_ms)) => LeaseOutcome::Granted { id, ttl_ms },
                    Err(refusal) => LeaseOutcome::Refused(refusal),
                }
            }
            LeaseCommand::Renew { ids } => LeaseOutcome::Renewed {
                ttl_ms: self.leases.renew(group, ids),
            },
            LeaseCommand::Revoke { id } => {
                if crate::lease::lease_group(*id) != group {
                    return LeaseOutcome::Refused(LeaseRefusal::WrongGroup { id: *id, group });
                }
                match self.leases.revoke(*id) {
                    Some(keys) => {
                        self.delete_lease_keys(&keys, hlc, proposer);
                        LeaseOutcome::Revoked { found: true, keys }
                    }
                    None => LeaseOutcome::Revoked {
                        found: false,
                        keys: Vec::new(),
                    },
                }
            }
            LeaseCommand::Tick {
                term,
                elapsed_ms,
                extend_ms,
            } => {
                if *term != entry_term {
                    return LeaseOutcome::Refused(LeaseRefusal::Fenced {
                        tick_term: *term,
                        entry_term,
                    });
                }
                let expired = self.leases.tick(group, *term, *elapsed_ms, *extend_ms);
                for (_, keys) in &expired {
                    self.delete_lease_keys(keys, hlc, proposer);
                }
                LeaseOutcome::Ticked { expired }
            }
        }
    }

    /// Delete the keys of a lease that ended: a delete observing no facts (attached keys
    /// take no fast path, so there are none to observe), at the key's generation.
    fn delete_lease_keys(&mut self, keys: &[Vec<u8>], hlc: HlcTimestamp, proposer: NodeId) {
        for key in keys {
            let Some(record) = self.key_record(key) else {
                continue;
            };
            let cmd = Command {
                key: key.clone(),
                hlc,
                proposer,
                body: CommandBody::Delete,
                frontier: KeyFrontier::default().with_generation(record.generation),
                absorb: None,
            };
            let outcome = self.apply_command(&cmd);
            debug_assert!(outcome.is_ok(), "a delete observing no facts never blocks");
        }
    }

    /// Apply a register put or compare-and-set that attaches its key (of subject
    /// `key_subject`) to lease `lease` once it takes effect. The lease is checked first: a
    /// refusal changes nothing.
    pub fn apply_leased(
        &mut self,
        cmd: &Command,
        lease: LeaseId,
        key_subject: &[u8],
    ) -> Result<Result<Outcome, LeaseRefusal>, ReplicaError> {
        if !matches!(
            cmd.body,
            CommandBody::RegisterPut { .. } | CommandBody::RegisterCas { value: Some(_), .. }
        ) {
            return Ok(Err(LeaseRefusal::NotARegisterWrite));
        }
        if let Err(refusal) = self.leases.check_attach(lease, &cmd.key, key_subject) {
            return Ok(Err(refusal));
        }
        let outcome = self.apply_command(cmd)?;
        if outcome == Outcome::Done {
            self.leases.attach(lease, &cmd.key);
        }
        Ok(Ok(outcome))
    }

    /// Apply a transaction some of whose puts attach their keys to leases if they run and
    /// take effect: `attach` names each such op as (success branch?, index in its branch,
    /// lease, the key's subject). Every attach is checked first, in both branches: a
    /// refusal refuses the whole transaction and changes nothing.
    pub fn apply_txn_leased(
        &mut self,
        txn: &Txn,
        attach: &[(bool, usize, LeaseId, &[u8])],
    ) -> Result<Result<TxnOutcome, LeaseRefusal>, ReplicaError> {
        let op_of = |success: bool, index: usize| {
            if success {
                txn.success.get(index)
            } else {
                txn.failure.get(index)
            }
        };
        for &(success, index, lease, subject) in attach {
            let Some(cmd) = op_of(success, index) else {
                return Ok(Err(LeaseRefusal::NotARegisterWrite));
            };
            if !matches!(cmd.body, CommandBody::RegisterPut { .. }) {
                return Ok(Err(LeaseRefusal::NotARegisterWrite));
            }
            if let Err(refusal) = self.leases.check_attach(lease, &cmd.key, subject) {
                return Ok(Err(refusal));
            }
        }
        let outcome = self.apply_txn(txn)?;
        if let TxnOutcome::Applied {
            succeeded,
            outcomes,
        } = &outcome
        {
            let branch = if *succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            for (index, (cmd, outcome)) in branch.iter().zip(outcomes).enumerate() {
                let lease = attach
                    .iter()
                    .find(|a| a.0 == *succeeded && a.1 == index)
                    .map(|a| a.2);
                if let (Some(lease), Outcome::Done) = (lease, outcome) {
                    self.leases.attach(lease, &cmd.key);
                }
            }
        }
        Ok(Ok(outcome))
    }

    /// Deliver a fact from a peer (or from the WAL on recovery).
    pub fn deliver(&mut self, fact: &FactRef<'_>) -> Result<Delivered, ReplicaError> {
        let FactId { origin, seq } = fact.id;
        if seq <= self.vv.get(origin) || self.pending.contains_key(&(origin, seq)) {
            return Ok(Delivered::Duplicate);
        }
        if seq == self.vv.get(origin) + 1 && self.try_apply(fact)? {
            let unblocked = if self.pending.is_empty() {
                0
            } else {
                self.drain()
            };
            return Ok(Delivered::Applied { unblocked });
        }
        // Own facts are never dropped, and never make room: this node's sequence numbers
        // past its version vector belong to them, and admission refuses while any waits
        // (`OwnFactsPending`). A dropped one would let admission issue its number again
        // for a different fact, while peers hold the first: two facts with one id, each
        // replica keeping whichever it saw first (found by Jepsen: a restart replayed more
        // facts than the buffer holds before Raft re-created their keys, and counters
        // never converged). They are bounded by the own facts recovery replays.
        if origin != self.node && self.pending.len() >= self.pending_facts_max {
            // Keep the facts closest to being applicable; drop the one furthest ahead.
            let furthest = self
                .pending
                .keys()
                .filter(|&&(o, _)| o != self.node)
                .max_by_key(|&&(o, s)| s - self.vv.get(o))
                .copied();
            match furthest {
                Some(f) if f.1 - self.vv.get(f.0) > seq - self.vv.get(origin) => {
                    self.pending.remove(&f);
                }
                _ => return Ok(Delivered::Dropped),
            }
        }
        self.pending.insert((origin, seq), fact.to_owned());
        Ok(Delivered::Buffered)
    }

    /// Apply `fact` (the next of its origin) if its key exists and it is funded.
    fn try_apply(&mut self, fact: &FactRef<'_>) -> Result<bool, ReplicaError> {
        let Some(entry) = self.keys.get_mut(fact.key) else {
            // Its key is created by a Raft command not applied here yet.
            return Ok(false);
        };
        match fact.generation.cmp(&entry.record.generation) {
            // Of a generation the key has left (deleted, or recreated with another type):
            // counted as applied, and dropped, on every replica alike.
            std::cmp::Ordering::Less => {
                self.vv.advance(fact.id.origin, fact.id.seq);
                return Ok(true);
            }
            // Its origin applied the command that began a newer generation; this replica
            // has not yet.
            std::cmp::Ordering::Greater => return Ok(false),
            std::cmp::Ordering::Equal => {}
        }
        let state = &mut entry.record.state;
        let fact_type = KeyState::fact_type(fact.kind);
        if state.value_type() != fact_type {
            return Err(ReplicaError::TypeConflict {
                origin: fact.id.origin,
                seq: fact.id.seq,
                key: crate::refusal::DisplayKey(fact.key).to_string(),
                fact_type,
                key_type: state.value_type(),
            });
        }
        if state.fact_seq(fact.id.origin) >= fact.id.seq {
            // Already on the key (installed with a snapshot): count it, do not apply it again.
            let prev = value_before(&self.journal, &entry.record);
            let cause = ChangeCause::Fact(fact.id);
            journal_change(
                &mut self.journal,
                fact.key,
                cause,
                fact.hlc,
                prev,
                &entry.record,
            );
            self.vv.advance(fact.id.origin, fact.id.seq);
            return Ok(true);
        }
        if !state.can_apply(fact) {
            return Ok(false);
        }
        let prev = value_before(&self.journal, &entry.record);
        entry.record.state.apply_fact(fact);
        mark_dirty(&mut self.dirty, entry, fact.key);
        let cause = ChangeCause::Fact(fact.id);
        journal_change(
            &mut self.journal,
            fact.key,
            cause,
            fact.hlc,
            prev,
            &entry.record,
        );
        self.vv.advance(fact.id.origin, fact.id.seq);
        Ok(true)
    }

    /// Apply every waiting fact that has become applicable; returns how many.
    fn drain(&mut self) -> usize {
        let mut applied = 0;
        loop {
            let mut progressed = false;
            let mut cursor = (0, 0);
            while let Some((&(origin, seq), _)) = self.pending.range(cursor..).next() {
                cursor = (origin.saturating_add(1), 0);
                if seq != self.vv.get(origin) + 1 {
                    continue;
                }
                let fact = self.pending.remove(&(origin, seq)).expect("just seen");
                match self.try_apply(&fact.as_ref()) {
                    Ok(true) => {
                        applied += 1;
                        progressed = true;
                        // Look at this origin again: its next fact may be waiting too.
                        cursor = (origin, 0);
                    }
                    // Not yet applicable, or contradicting its key's type (reported when it is
                    // delivered again by anti-entropy): keep it waiting.
                    Ok(false) | Err(_) => {
                        self.pending.insert((origin, seq), fact);
                    }
                }
                if origin == NodeId::MAX {
                    break;
                }
            }
            if !progressed {
                return applied;
            }
        }
    }
}

/// What `cmd` does to its key's `record` (`None`: the key does not exist here): the whole
/// of a command's effect on one key, shared by single commands and transactions. `record`
/// is changed in place; for an absent key, the record the command creates (if it takes
/// effect) is returned. The caller has checked that every fact in the frontier is applied.
fn run_command(record: Option<&mut KeyRecord>, cmd: &Command) -> (Outcome, Option<KeyRecord>) {
    let generation = cmd.frontier.generation();
    // Facts only: the state's observed-reset never sees the generation entry.
    let stripped;
    let frontier = if generation == 0 {
        &cmd.frontier
    } else {
        stripped = KeyFrontier {
            entries: cmd.frontier.facts().to_vec(),
        };
        &stripped
    };
    match record {
        // Prepared on an earlier generation: what it observed is gone.
        Some(record) if record.generation != generation => {
            (Outcome::Refused(Refusal::KeyRecreated), None)
        }
        Some(record) => {
            let outcome = record.apply_command(
                &cmd.body,
                frontier,
                cmd.absorb.as_ref(),
                cmd.hlc,
                cmd.proposer,
            );
            (outcome, None)
        }
        // A generation is only ever taken from a key that exists.
        None if generation != 0 => (Outcome::Refused(Refusal::KeyRecreated), None),
        // Nothing to delete, and a delete creates nothing.
        None if cmd.body == CommandBody::Delete => (Outcome::Deleted { existed: false }, None),
        None => {
            let value_type = cmd.body.value_type().expect("a delete is handled above");
            let mut state = match KeyState::new(value_type, cmd.body.creation_bounds()) {
                Ok(s) => s,
                Err(r) => return (Outcome::Refused(r), None),
            };
            let outcome = state.apply_command(
                &cmd.body,
                frontier,
                cmd.absorb.as_ref(),
                cmd.hlc,
                cmd.proposer,
            );
            // A refused first command leaves no key behind, so the key's type is fixed only
            // by a command that took effect.
            let created = (!matches!(outcome, Outcome::Refused(_))).then(|| KeyRecord::new(state));
            (outcome, created)
        }
    }
}

/// Whether a command's outcome changed its key (what the journal records).
fn took_effect(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Done | Outcome::Deleted { existed: true })
}

/// Whether a command with `outcome` takes its key from its lease: any write or delete that
/// was not refused and whose condition held, whether or not it changed the value (a delete of
/// a key a fact already hid is still a write ordered after the attach; outcomes are the same
/// on every replica, which the key's visibility alone is not).
fn detaches(outcome: &Outcome) -> bool {
    !matches!(outcome, Outcome::Refused(_) | Outcome::CasFailed)
}

/// Note that `entry` changed; allocates only when a clean key becomes dirty.
fn mark_dirty(dirty: &mut Vec<Box<[u8]>>, entry: &mut KeyEntry, key: &[u8]) {
    if !entry.dirty {
        entry.dirty = true;
        dirty.push(key.into());
    }
}
