//! Per-key state of each type, and how facts and commands change it.
//!
//! Every type keeps, per origin node, just enough to answer two questions exactly:
//! "what is the value?" and "what did a command observe?". Facts of one origin arrive in
//! sequence order (the replica guarantees it), so per-origin state is a running summary, not a
//! log. The frontier a command carries (see `command.rs`) names, per origin, the last fact on
//! the key it saw; applying the command absorbs those facts and leaves later ones on top:
//!
//! - counter: `value = base + Σ_origin (total - covered_total)`: a set replaces `base` and
//!   moves each origin's `covered` mark to the frontier; later adds stay on top.
//! - bounded counter: a counter whose value is also `min + pool_down + Σ holder.down` (and
//!   `max - pool_up - Σ holder.up`). Every change moves rights, never creates them, and no
//!   holder or pool goes negative, so the value cannot leave its bounds on any replica at any
//!   moment. A fact whose origin's quota is not yet visible here waits (`can_apply`).
//! - max: per origin a stack of raises with strictly falling values; a set drops what it
//!   covered. `value = max(base, each stack's first entry)`.
//! - set: per element, the latest add of each origin; a remove drops the adds it covered and
//!   deletes the element when none remain (later adds have higher sequences, so nothing is lost).
//! - register: Raft writes form `base`; last-writer-wins facts (keys in `available` mode) sit
//!   beside it, one per origin, and the newest by `(hlc, origin)` is visible. A command absorbs
//!   the LWW winner it observed (carried in the command), so CAS compares with the same value
//!   on every replica.
//!
//! All arithmetic on counters wraps modulo 2^64: wrapping addition is still commutative and
//! associative, so replicas converge even if concurrent adds overflow; the admission path
//! refuses adds that would overflow the local view.
//!
//! # Raft part and fact part (snapshot install)
//!
//! Every state is a function of two inputs: the Raft log prefix applied (bases, versions,
//! covered marks, `ordered` flags, escrow pool and grants, bounds, and the cut each command
//! made) and, per origin, the prefix of that origin's facts *on this key* (cumulative: the
//! part for seq 8 includes the part for seq 5). [`KeyState::join_snapshot`] relies on this to
//! install a peer's state taken at a later Raft index: the Raft part comes from the snapshot,
//! each origin's fact part from whichever side has seen more of that origin on the key. The
//! cuts commands made in sets, max stacks and registers are not stored; they are recovered
//! from the snapshot instead (see each type's `join_snapshot`), which works because a command
//! applies only after the facts it cut, so every cut is at most the snapshot's seq of that
//! origin. After a join a key may hold facts beyond the replica's version vector;
//! [`KeyState::fact_seq`] lets the replica recognise them when they are delivered later.
//!
//! # Deletes and generations
//!
//! Any key can be deleted, through Raft ([`CommandBody::Delete`]). A delete is an
//! observed-reset like a set: it removes exactly what its frontier names and leaves the facts
//! it did not observe, so it means the same on every replica whatever they had seen. The key
//! keeps its type and becomes a tombstone ([`KeyRecord::tombstone`] holds the cut, a Raft
//! part); reads do not see it until something brings it back:
//!
//! - counter: reset to 0; it is visible again once adds it did not observe change it
//!   (an origin's total differs from the cut's);
//! - max: its base and every raise it observed are dropped; visible again with a raise;
//! - set: every add it observed is dropped; visible again with an element;
//! - register: written absent, as a register delete always was;
//! - bounded counter: escrow quotas cannot be taken back from nodes that may be spending them
//!   right now, so the key starts a new *generation* instead: a fresh state (value closest
//!   to 0 within its bounds, every right in the pool), and every fact of the old generation
//!   still in flight (spends, transfers) is dropped where it arrives. The bound holds for
//!   the new generation because its rights are all new.
//!
//! Any command that takes effect on a tombstone clears it. One of another type recreates the
//! key with that type as the next generation, dropping the old state and, wherever they
//! arrive later, the old generation's facts still in flight. Facts carry the generation
//! their origin admitted them on (`fact.rs`); commands carry it in their frontier
//! (`command.rs`), and a command prepared on an older generation than the key has when it
//! is applied is refused (`KeyRecreated`), identically everywhere. Facts of a newer
//! generation wait for the command that created it. Tombstones are kept: dropping one
//! safely needs every node to have applied every fact of the key, which is not tracked.

use crate::clock::{HlcTimestamp, NodeId};
use crate::command::{CommandBody, FrontierEntry, KeyFrontier, LwwWrite};
use crate::fact::{FactKind, FactRef};
use crate::refusal::{Direction, Refusal};
use crate::value::{Bounds, CasExpect, ValueType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Result of a command, identical on every replica that applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied.
    Done,
    /// A compare-and-set whose condition did not hold: a normal answer, nothing changed.
    CasFailed,
    /// Refused; nothing changed.
    Refused(Refusal),
    /// A delete applied; `existed`: the key was visible as the delete observed it (false
    /// for a key never written, or already deleted with nothing since).
    Deleted { existed: bool },
}

/// A key's value as a read returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Register {
        value: Option<Vec<u8>>,
        version: u64,
        hlc: HlcTimestamp,
    },
    Counter(i64),
    Bounded {
        value: i64,
        bounds: Bounds,
    },
    Max(Option<i64>),
    Set(Vec<Vec<u8>>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    Register(RegisterState),
    Counter(Numeric),
    Bounded(BoundedState),
    Max(MaxState),
    Set(SetState),
}

/// Version byte in front of every encoded key state; bumped on incompatible changes.
/// 2: bounded counters record cumulative grants and transfers (snapshot install).
pub const KEY_STATE_FORMAT: u8 = 2;
/// A [`KeyRecord`] with a generation or a tombstone: the format byte, then the whole record.
/// Records of generation 0 without a tombstone stay format 2 (their bare state).
pub const KEY_RECORD_FORMAT: u8 = 3;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StateCodecError {
    #[error("stored key state is empty; the state store is corrupt, restore from a checkpoint")]
    Empty,
    #[error(
        "stored key state has format {found}, this build reads formats {KEY_STATE_FORMAT} and {KEY_RECORD_FORMAT}; run a matching calm version"
    )]
    Format { found: u8 },
    #[error(
        "stored key state does not decode ({reason}); the state store is corrupt, restore from a checkpoint"
    )]
    Decode { reason: String },
}

/// A key as the replica, the state store and Raft snapshots hold it: its state, its
/// generation and, while deleted, the cut of the delete (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Bumped when the key is recreated with another type, or a bounded counter is deleted.
    pub generation: u64,
    /// The frontier the last delete cut at, until a command takes effect on the key.
    pub tombstone: Option<KeyFrontier>,
    pub state: KeyState,
}

impl KeyRecord {
    /// A key created now: generation 0, not deleted.
    pub fn new(state: KeyState) -> KeyRecord {
        KeyRecord {
            generation: 0,
            tombstone: None,
            state,
        }
    }

    /// Encode for the state store and snapshots; deterministic, like [`KeyState::encode`].
    pub fn encode(&self) -> Vec<u8> {
        if self.generation == 0 && self.tombstone.is_none() {
            return self.state.encode();
        }
        let mut out = vec![KEY_RECORD_FORMAT];
        postcard::to_io(self, &mut out).expect("encoding into a Vec cannot fail");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<KeyRecord, StateCodecError> {
        match bytes.first() {
            Some(&KEY_RECORD_FORMAT) => {
                postcard::from_bytes(&bytes[1..]).map_err(|e| StateCodecError::Decode {
                    reason: e.to_string(),
                })
            }
            _ => KeyState::decode(bytes).map(KeyRecord::new),
        }
    }

    /// Whether reads see the key: not deleted, or brought back by what its delete did not
    /// observe.
    pub fn visible(&self) -> bool {
        let Some(cut) = &self.tombstone else {
            return true;
        };
        match &self.state {
            KeyState::Register(r) => r.visible().0.is_some(),
            KeyState::Max(m) => m.value.is_some(),
            KeyState::Set(s) => !s.elements.is_empty(),
            KeyState::Counter(n) => n.changed_since(cut),
            KeyState::Bounded(b) => b.numeric.changed_since(cut),
        }
    }

    /// Whether a delete observing `frontier` finds the key visible: decided from the
    /// command and Raft-ordered state only, so every replica answers the same.
    pub(crate) fn observed_visible(&self, frontier: &KeyFrontier) -> bool {
        let Some(cut) = &self.tombstone else {
            return true;
        };
        match &self.state {
            KeyState::Counter(_) | KeyState::Bounded(_) => frontier
                .facts()
                .iter()
                .any(|e| e.total != cut.total_of(e.origin)),
            KeyState::Max(_) | KeyState::Set(_) | KeyState::Register(_) => frontier
                .facts()
                .iter()
                .any(|e| e.seq > cut.seq_of(e.origin)),
        }
    }

    /// Apply a command of this key's generation (the caller checks it and strips the
    /// generation from `frontier`; every fact inside `frontier` is applied).
    pub fn apply_command(
        &mut self,
        body: &CommandBody,
        frontier: &KeyFrontier,
        absorb: Option<&LwwWrite>,
        hlc: HlcTimestamp,
        proposer: NodeId,
    ) -> Outcome {
        let Some(body_type) = body.value_type() else {
            return self.delete(frontier, absorb, hlc, proposer);
        };
        let key_type = self.state.value_type();
        if body_type == key_type {
            let outcome = self
                .state
                .apply_command(body, frontier, absorb, hlc, proposer);
            if outcome == Outcome::Done {
                self.tombstone = None;
            }
            return outcome;
        }
        if self.tombstone.is_none() {
            return Outcome::Refused(Refusal::TypeMismatch {
                key_type,
                op: body_op_kind(body),
            });
        }
        // A deleted key recreated with another type: the next generation, from nothing.
        let mut fresh = match KeyState::new(body_type, body.creation_bounds()) {
            Ok(s) => s,
            Err(r) => return Outcome::Refused(r),
        };
        let outcome = fresh.apply_command(body, &KeyFrontier::default(), None, hlc, proposer);
        if !matches!(outcome, Outcome::Refused(_)) {
            *self = KeyRecord {
                generation: self.generation + 1,
                tombstone: None,
                state: fresh,
            };
        }
        outcome
    }

    fn delete(
        &mut self,
        frontier: &KeyFrontier,
        absorb: Option<&LwwWrite>,
        hlc: HlcTimestamp,
        proposer: NodeId,
    ) -> Outcome {
        let mut existed = self.observed_visible(frontier);
        let mut cut = frontier.clone();
        match &mut self.state {
            KeyState::Register(r) => existed = r.delete(frontier, absorb, hlc, proposer),
            KeyState::Counter(n) => n.set(0, frontier),
            KeyState::Max(m) => m.reset(None, frontier),
            KeyState::Set(s) => s.clear(frontier),
            KeyState::Bounded(b) => {
                // A fresh generation holds no facts: its cut is empty.
                cut = KeyFrontier::default();
                if existed {
                    let fresh = KeyState::Bounded(BoundedState::new(b.bounds));
                    self.generation += 1;
                    self.state = fresh;
                }
            }
        }
        self.tombstone = Some(cut);
        Outcome::Deleted { existed }
    }

    /// Whether a peer's snapshot record of this key can be joined here (see
    /// [`join_snapshot`](Self::join_snapshot)); `Err` says why not.
    pub fn check_join(&self, snapshot: &KeyRecord) -> Result<(), String> {
        if snapshot.generation < self.generation {
            return Err(format!(
                "is generation {} in the snapshot but {} here",
                snapshot.generation, self.generation
            ));
        }
        if snapshot.generation == self.generation
            && snapshot.state.value_type() != self.state.value_type()
        {
            return Err(format!(
                "is {} in the snapshot but {} here",
                snapshot.state.value_type(),
                self.state.value_type()
            ));
        }
        Ok(())
    }

    /// Join a snapshot record ([`KeyState::join_snapshot`] within one generation). A newer
    /// generation replaces the local state: this replica has not applied the command that
    /// began it, so it holds none of its facts (they wait), and the old generation's are
    /// dropped anyway. The caller has checked [`check_join`](Self::check_join).
    pub fn join_snapshot(&mut self, snapshot: &KeyRecord) {
        debug_assert!(self.check_join(snapshot).is_ok());
        if snapshot.generation > self.generation {
            self.clone_from(snapshot);
            return;
        }
        self.state.join_snapshot(&snapshot.state);
        self.tombstone.clone_from(&snapshot.tombstone);
    }
}

/// The op kind a command body stands for, in refusals.
pub fn body_op_kind(body: &CommandBody) -> crate::value::OpKind {
    use crate::value::OpKind;
    match body {
        CommandBody::RegisterPut { .. } => OpKind::RegisterPut,
        CommandBody::RegisterDelete | CommandBody::Delete => OpKind::RegisterDelete,
        CommandBody::RegisterCas { .. } => OpKind::RegisterCas,
        CommandBody::Create { value_type, .. } => match value_type {
            ValueType::Register => OpKind::RegisterPut,
            ValueType::Counter => OpKind::CounterAdd,
            ValueType::BoundedCounter => OpKind::BoundedAdd,
            ValueType::Max => OpKind::MaxRaise,
            ValueType::Set => OpKind::SetAdd,
        },
        CommandBody::CounterAdd { .. } => OpKind::CounterAdd,
        CommandBody::CounterSet { .. } => OpKind::CounterSet,
        CommandBody::BoundedAdd { .. } | CommandBody::EscrowGrant { .. } => OpKind::BoundedAdd,
        CommandBody::BoundedSet { .. } => OpKind::BoundedSet,
        CommandBody::BoundedSetBounds { .. } => OpKind::BoundedSetBounds,
        CommandBody::MaxRaise { .. } => OpKind::MaxRaise,
        CommandBody::MaxSet { .. } => OpKind::MaxSet,
        CommandBody::SetAdd { .. } => OpKind::SetAdd,
        CommandBody::SetRemove { .. } => OpKind::SetRemove,
    }
}

impl KeyState {
    /// Encode for the state store: a format byte, then a deterministic postcard encoding
    /// (the same state always gives the same bytes, so replicas can compare digests).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![KEY_STATE_FORMAT];
        postcard::to_io(self, &mut out).expect("encoding into a Vec cannot fail");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<KeyState, StateCodecError> {
        let (&format, body) = bytes.split_first().ok_or(StateCodecError::Empty)?;
        if format != KEY_STATE_FORMAT {
            return Err(StateCodecError::Format { found: format });
        }
        postcard::from_bytes(body).map_err(|e| StateCodecError::Decode {
            reason: e.to_string(),
        })
    }

    /// A fresh key of `value_type`. Bounded counters need bounds.
    pub fn new(value_type: ValueType, bounds: Option<Bounds>) -> Result<KeyState, Refusal> {
        Ok(match value_type {
            ValueType::Register => KeyState::Register(RegisterState::default()),
            ValueType::Counter => KeyState::Counter(Numeric::default()),
            ValueType::BoundedCounter => {
                let bounds = bounds.ok_or(Refusal::MissingBounds)?;
                check_span(bounds)?;
                KeyState::Bounded(BoundedState::new(bounds))
            }
            ValueType::Max => KeyState::Max(MaxState::default()),
            ValueType::Set => KeyState::Set(SetState::default()),
        })
    }

    pub fn value_type(&self) -> ValueType {
        match self {
            KeyState::Register(_) => ValueType::Register,
            KeyState::Counter(_) => ValueType::Counter,
            KeyState::Bounded(_) => ValueType::BoundedCounter,
            KeyState::Max(_) => ValueType::Max,
            KeyState::Set(_) => ValueType::Set,
        }
    }

    pub fn value(&self) -> Value {
        match self {
            KeyState::Register(r) => {
                let (value, hlc) = r.visible();
                Value::Register {
                    value: value.map(<[u8]>::to_vec),
                    version: r.version,
                    hlc,
                }
            }
            KeyState::Counter(n) => Value::Counter(n.value),
            KeyState::Bounded(b) => Value::Bounded {
                value: b.numeric.value,
                bounds: b.bounds,
            },
            KeyState::Max(m) => Value::Max(m.value),
            KeyState::Set(s) => Value::Set(s.members().map(<[u8]>::to_vec).collect()),
        }
    }

    /// The type a fact of `kind` belongs to.
    pub fn fact_type(kind: FactKind) -> ValueType {
        match kind {
            FactKind::CounterAdd => ValueType::Counter,
            FactKind::BoundedAdd | FactKind::EscrowTransfer => ValueType::BoundedCounter,
            FactKind::MaxRaise => ValueType::Max,
            FactKind::SetAdd => ValueType::Set,
            FactKind::RegisterLww | FactKind::RegisterLwwDelete => ValueType::Register,
        }
    }

    /// Whether `fact` can be applied now. Only escrow facts can wait: their origin spent
    /// rights it held, and until this replica sees how it got them (a grant or transfer
    /// still in flight), applying the spend could show a value past a bound.
    pub fn can_apply(&self, fact: &FactRef<'_>) -> bool {
        match (self, fact.kind) {
            (KeyState::Bounded(b), FactKind::BoundedAdd) => {
                b.holder_rights(fact.id.origin, fact.arg).is_ok()
            }
            (KeyState::Bounded(b), FactKind::EscrowTransfer) => {
                b.holder_rights(fact.id.origin, -fact.arg).is_ok()
            }
            _ => true,
        }
    }

    /// Apply a fact. The caller guarantees: the type matches, facts of each origin come in
    /// sequence order without repeats, and `can_apply` holds.
    pub fn apply_fact(&mut self, fact: &FactRef<'_>) {
        let origin = fact.id.origin;
        let seq = fact.id.seq;
        match (self, fact.kind) {
            (KeyState::Counter(n), FactKind::CounterAdd) => n.add_fact(origin, seq, fact.arg),
            (KeyState::Bounded(b), FactKind::BoundedAdd) => b.add_fact(origin, seq, fact.arg),
            (KeyState::Bounded(b), FactKind::EscrowTransfer) => {
                b.transfer_fact(origin, seq, fact.peer, fact.arg)
            }
            (KeyState::Max(m), FactKind::MaxRaise) => m.raise_fact(origin, seq, fact.arg),
            (KeyState::Set(s), FactKind::SetAdd) => s.add_fact(origin, seq, fact.payload),
            (KeyState::Register(r), FactKind::RegisterLww) => {
                r.lww_fact(origin, seq, fact.hlc, Some(fact.payload))
            }
            (KeyState::Register(r), FactKind::RegisterLwwDelete) => {
                r.lww_fact(origin, seq, fact.hlc, None)
            }
            (state, kind) => panic!(
                "fact kind {kind:?} applied to a {} key: the replica must check types first",
                state.value_type()
            ),
        }
    }

    /// Sequence of the last fact of `origin` applied on this key (0 = none). Facts of one
    /// origin apply in order, so every fact of `origin` on this key up to it is applied. It
    /// can exceed the replica's version vector after a snapshot install.
    pub fn fact_seq(&self, origin: NodeId) -> u64 {
        match self {
            KeyState::Counter(n) => n.fact_seq(origin),
            KeyState::Bounded(b) => b.numeric.fact_seq(origin),
            KeyState::Max(m) => m
                .origins
                .binary_search_by_key(&origin, |o| o.origin)
                .map_or(0, |i| m.origins[i].seq),
            KeyState::Set(s) => seq_of(&s.seqs, origin),
            KeyState::Register(r) => seq_of(&r.seqs, origin),
        }
    }

    /// Join a Raft snapshot of this key into the local state (Raft snapshot install).
    ///
    /// `snapshot` is a peer's state of this key taken when the peer had applied the key's
    /// Raft log up to some index N; `self` has applied a prefix of the same log (index <= N).
    /// The result is the state this replica would have after applying the log up to N on top
    /// of, per origin, the longer of the two fact prefixes on this key: the Raft part comes
    /// from the snapshot, each origin's fact part from the side with the higher
    /// [`fact_seq`](Self::fact_seq) (they are cumulative, so it includes the other). Derived
    /// fields (values, escrow quotas) are recomputed; escrow conservation still holds.
    ///
    /// Panics if the types differ: a key's type is fixed in Raft order, so the caller checks.
    pub fn join_snapshot(&mut self, snapshot: &KeyState) {
        match (self, snapshot) {
            (KeyState::Counter(local), KeyState::Counter(snap)) => local.join_snapshot(snap),
            (KeyState::Bounded(local), KeyState::Bounded(snap)) => local.join_snapshot(snap),
            (KeyState::Max(local), KeyState::Max(snap)) => local.join_snapshot(snap),
            (KeyState::Set(local), KeyState::Set(snap)) => local.join_snapshot(snap),
            (KeyState::Register(local), KeyState::Register(snap)) => local.join_snapshot(snap),
            (local, snap) => panic!(
                "snapshot of a {} key joined into a {} key: the replica must check types first",
                snap.value_type(),
                local.value_type()
            ),
        }
    }

    /// What a command proposed now would observe on this key.
    pub fn frontier(&self) -> KeyFrontier {
        match self {
            KeyState::Counter(n) => n.frontier(),
            KeyState::Bounded(b) => b.numeric.frontier(),
            KeyState::Max(m) => KeyFrontier {
                entries: m
                    .origins
                    .iter()
                    .map(|o| FrontierEntry {
                        origin: o.origin,
                        seq: o.seq,
                        total: 0,
                    })
                    .collect(),
            },
            KeyState::Set(s) => seqs_frontier(&s.seqs),
            KeyState::Register(r) => seqs_frontier(&r.seqs),
        }
    }

    /// The LWW write a command proposed now would absorb.
    pub fn lww_winner(&self) -> Option<LwwWrite> {
        match self {
            KeyState::Register(r) => r.lww_winner().map(|w| LwwWrite {
                hlc: w.hlc,
                origin: w.origin,
                value: w.value.clone(),
            }),
            _ => None,
        }
    }

    /// Apply a Raft-ordered command body. The caller guarantees the types match and that every
    /// fact inside `frontier` has been applied.
    pub fn apply_command(
        &mut self,
        body: &CommandBody,
        frontier: &KeyFrontier,
        absorb: Option<&LwwWrite>,
        hlc: HlcTimestamp,
        proposer: NodeId,
    ) -> Outcome {
        match (self, body) {
            (_, CommandBody::Create { .. }) => Outcome::Done,
            (KeyState::Register(r), body) => r.apply_command(body, frontier, absorb, hlc, proposer),
            (KeyState::Counter(n), CommandBody::CounterAdd { delta }) => {
                n.add_ordered(*delta);
                Outcome::Done
            }
            (KeyState::Counter(n), CommandBody::CounterSet { value }) => {
                n.set(*value, frontier);
                Outcome::Done
            }
            (KeyState::Bounded(b), body) => b.apply_command(body, frontier),
            (KeyState::Max(m), CommandBody::MaxRaise { value }) => {
                m.raise_ordered(*value);
                Outcome::Done
            }
            (KeyState::Max(m), CommandBody::MaxSet { value }) => {
                m.set(*value, frontier);
                Outcome::Done
            }
            (KeyState::Set(s), CommandBody::SetAdd { element }) => {
                s.add_ordered(element);
                Outcome::Done
            }
            (KeyState::Set(s), CommandBody::SetRemove { element }) => {
                s.remove(element, frontier);
                Outcome::Done
            }
            (state, body) => panic!(
                "command {body:?} applied to a {} key: the replica must check types first",
                state.value_type()
            ),
        }
    }
}

/// Rights are counted in i64, so `max - min` must fit one (and bounds must not be inverted).
pub fn check_span(bounds: Bounds) -> Result<(), Refusal> {
    let span = bounds.max as i128 - bounds.min as i128;
    if (0..=i64::MAX as i128).contains(&span) {
        Ok(())
    } else {
        Err(Refusal::BoundsTooWide { bounds })
    }
}

fn seqs_frontier(seqs: &[(NodeId, u64)]) -> KeyFrontier {
    KeyFrontier {
        entries: seqs
            .iter()
            .map(|&(origin, seq)| FrontierEntry {
                origin,
                seq,
                total: 0,
            })
            .collect(),
    }
}

fn seq_of(seqs: &[(NodeId, u64)], origin: NodeId) -> u64 {
    seqs.binary_search_by_key(&origin, |e| e.0)
        .map_or(0, |i| seqs[i].1)
}

/// Per origin, the higher of two `(origin, seq)` lists (both sorted by origin).
fn join_seqs(local: &[(NodeId, u64)], snapshot: &[(NodeId, u64)]) -> Vec<(NodeId, u64)> {
    let mut out: Vec<(NodeId, u64)> = local.iter().chain(snapshot).copied().collect();
    out.sort_unstable();
    // Sorted by (origin, seq): keep the last (highest) entry of each origin.
    out.reverse();
    out.dedup_by_key(|e| e.0);
    out.reverse();
    out
}

/// Record that `origin`'s fact `seq` touched the key (for frontiers of sets and registers).
fn note_seq(seqs: &mut Vec<(NodeId, u64)>, origin: NodeId, seq: u64) {
    match seqs.binary_search_by_key(&origin, |e| e.0) {
        Ok(i) => {
            assert!(seqs[i].1 < seq, "facts of one origin apply in order");
            seqs[i].1 = seq;
        }
        Err(i) => seqs.insert(i, (origin, seq)),
    }
}

// ---------------------------------------------------------------------------------------------
// Counters

/// One origin's adds to a numeric key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Contribution {
    origin: NodeId,
    /// Last fact of this origin on the key.
    seq: u64,
    /// Sum of all its deltas (wrapping).
    total: i64,
    /// Last fact absorbed by a set, and the total at that point.
    covered_seq: u64,
    covered_total: i64,
}

/// A counter: `value = base + Σ (total - covered_total)`, kept up to date incrementally.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Numeric {
    base: i64,
    contributions: Vec<Contribution>,
    value: i64,
}

impl Numeric {
    pub fn value(&self) -> i64 {
        self.value
    }

    fn contribution(&mut self, origin: NodeId) -> &mut Contribution {
        let i = match self
            .contributions
            .binary_search_by_key(&origin, |c| c.origin)
        {
            Ok(i) => i,
            Err(i) => {
                self.contributions.insert(
                    i,
                    Contribution {
                        origin,
                        seq: 0,
                        total: 0,
                        covered_seq: 0,
                        covered_total: 0,
                    },
                );
                i
            }
        };
        &mut self.contributions[i]
    }

    fn find(&self, origin: NodeId) -> Option<&Contribution> {
        self.contributions
            .binary_search_by_key(&origin, |c| c.origin)
            .ok()
            .map(|i| &self.contributions[i])
    }

    fn fact_seq(&self, origin: NodeId) -> u64 {
        self.find(origin).map_or(0, |c| c.seq)
    }

    /// `base` and the covered marks are the Raft part; `(seq, total)` per origin the fact part.
    fn join_snapshot(&mut self, snapshot: &Numeric) {
        let mut origins: Vec<NodeId> = self
            .contributions
            .iter()
            .chain(&snapshot.contributions)
            .map(|c| c.origin)
            .collect();
        origins.sort_unstable();
        origins.dedup();
        let contributions = origins
            .into_iter()
            .map(|origin| {
                let local = self.find(origin);
                let snap = snapshot.find(origin);
                let facts = match (local, snap) {
                    (Some(l), Some(s)) if l.seq > s.seq => l,
                    (_, Some(s)) => s,
                    (Some(l), None) => l,
                    (None, None) => unreachable!("origin taken from one of the two"),
                };
                debug_assert!(
                    local.is_none_or(|l| l.covered_seq <= snap.map_or(0, |s| s.covered_seq)),
                    "the local Raft prefix is a prefix of the snapshot's"
                );
                // No snapshot entry: no command up to the snapshot covered this origin, so
                // neither did the (shorter) local prefix.
                let (covered_seq, covered_total) =
                    snap.map_or((0, 0), |s| (s.covered_seq, s.covered_total));
                Contribution {
                    origin,
                    seq: facts.seq,
                    total: facts.total,
                    covered_seq,
                    covered_total,
                }
            })
            .collect();
        self.contributions = contributions;
        self.base = snapshot.base;
        self.value = self.computed_value();
    }

    /// Whether some origin's adds moved its total away from `cut`'s (a delete's frontier).
    fn changed_since(&self, cut: &KeyFrontier) -> bool {
        self.contributions
            .iter()
            .any(|c| c.total != cut.total_of(c.origin))
    }

    fn computed_value(&self) -> i64 {
        self.contributions.iter().fold(self.base, |v, c| {
            v.wrapping_add(c.total.wrapping_sub(c.covered_total))
        })
    }

    fn add_fact(&mut self, origin: NodeId, seq: u64, delta: i64) {
        let c = self.contribution(origin);
        assert!(c.seq < seq, "facts of one origin apply in order");
        c.seq = seq;
        c.total = c.total.wrapping_add(delta);
        self.value = self.value.wrapping_add(delta);
    }

    fn add_ordered(&mut self, delta: i64) {
        self.base = self.base.wrapping_add(delta);
        self.value = self.value.wrapping_add(delta);
    }

    fn frontier(&self) -> KeyFrontier {
        KeyFrontier {
            entries: self
                .contributions
                .iter()
                .map(|c| FrontierEntry {
                    origin: c.origin,
                    seq: c.seq,
                    total: c.total,
                })
                .collect(),
        }
    }

    /// The change of value a set to `value` at `frontier` makes. Depends only on Raft-ordered
    /// state (base and covered marks) and the command, never on which facts this replica has:
    /// the replica-local totals cancel out. That is what keeps escrow pools identical.
    fn set_delta(&self, value: i64, frontier: &KeyFrontier) -> i64 {
        let mut delta = value.wrapping_sub(self.base);
        for e in &frontier.entries {
            let (covered_seq, covered_total) = self
                .contributions
                .iter()
                .find(|c| c.origin == e.origin)
                .map_or((0, 0), |c| (c.covered_seq, c.covered_total));
            if e.seq > covered_seq {
                delta = delta.wrapping_sub(e.total.wrapping_sub(covered_total));
            }
        }
        delta
    }

    /// The value as a command observing `frontier` sees it: the Raft-ordered base plus
    /// the observed facts' totals beyond what sets covered (what a set's delta leaves out).
    pub(crate) fn observed_value(&self, frontier: &KeyFrontier) -> i64 {
        0i64.wrapping_sub(self.set_delta(0, frontier))
    }

    fn set(&mut self, value: i64, frontier: &KeyFrontier) {
        let before = self.value;
        let delta = self.set_delta(value, frontier);
        for e in &frontier.entries {
            let c = self.contribution(e.origin);
            assert!(
                c.seq >= e.seq,
                "a command applies only after the facts it observed"
            );
            if e.seq > c.covered_seq {
                c.covered_seq = e.seq;
                c.covered_total = e.total;
            }
        }
        self.base = value;
        self.value = self.computed_value();
        assert_eq!(
            self.value.wrapping_sub(before),
            delta,
            "observed-reset must move the value by the Raft-determined delta"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bounded counters and escrow

/// Escrow rights held by one node for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub node: NodeId,
    /// Rights to decrement.
    pub down: i64,
    /// Rights to increment.
    pub up: i64,
}

/// Whether `down`/`up` rights cover moving a value by `delta` (negative = down).
fn rights_cover(delta: i64, down: i64, up: i64, bounds: Bounds) -> Result<(), Refusal> {
    let (direction, available) = if delta < 0 {
        (Direction::Down, down)
    } else {
        (Direction::Up, up)
    };
    let needed = delta.unsigned_abs();
    if needed <= available.max(0) as u64 {
        Ok(())
    } else {
        Err(Refusal::EscrowExhausted {
            direction,
            needed: i64::try_from(needed).unwrap_or(i64::MAX),
            available,
            bounds,
        })
    }
}

/// Rights one origin has given another by transfer facts, cumulative (wrapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Transfer {
    from: NodeId,
    to: NodeId,
    down: i64,
    up: i64,
}

/// A counter kept within `bounds` by escrow (Balegas et al., 2015).
///
/// A holder's quota is kept both incrementally (`holders`, read on every admission) and as
/// its decomposition, so that a snapshot join can rebuild it:
/// `quota(h) = granted(h) + own adds(h) + transfers into h - transfers out of h`, where
/// grants are Raft-ordered, and each origin's adds (its numeric total) and transfers out
/// are cumulative per-origin fact parts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundedState {
    numeric: Numeric,
    bounds: Bounds,
    /// Rights held by the key's Raft group.
    pool_down: i64,
    pool_up: i64,
    /// Cumulative pool grants per node (Raft part), sorted by node; `down`/`up` wrap.
    granted: Vec<Holder>,
    /// Cumulative transfers per (giver, taker), sorted: part of the giver's fact part.
    transfers: Vec<Transfer>,
    /// Current quotas, sorted by node: derived from the fields above.
    holders: Vec<Holder>,
}

impl BoundedState {
    /// A new key starts at the value in its bounds closest to 0, with every right in the pool.
    pub fn new(bounds: Bounds) -> BoundedState {
        let start = 0i64.clamp(bounds.min, bounds.max);
        let mut numeric = Numeric::default();
        numeric.add_ordered(start);
        let state = BoundedState {
            numeric,
            bounds,
            pool_down: start - bounds.min,
            pool_up: bounds.max - start,
            granted: Vec::new(),
            transfers: Vec::new(),
            holders: Vec::new(),
        };
        state.check_invariant();
        state
    }

    pub fn value(&self) -> i64 {
        self.numeric.value
    }

    /// See [`Numeric::observed_value`].
    pub(crate) fn observed_value(&self, frontier: &KeyFrontier) -> i64 {
        self.numeric.observed_value(frontier)
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    pub fn pool(&self) -> (i64, i64) {
        (self.pool_down, self.pool_up)
    }

    pub fn holders(&self) -> &[Holder] {
        &self.holders
    }

    /// Rights `node` holds here: (down, up).
    pub fn rights_of(&self, node: NodeId) -> (i64, i64) {
        self.holders
            .iter()
            .find(|h| h.node == node)
            .map_or((0, 0), |h| (h.down, h.up))
    }

    /// Check that `node` holds the rights to move the value by `delta`.
    pub fn holder_rights(&self, node: NodeId, delta: i64) -> Result<(), Refusal> {
        let (down, up) = self.rights_of(node);
        rights_cover(delta, down, up, self.bounds)
    }

    fn holder(&mut self, node: NodeId) -> &mut Holder {
        holder_in(&mut self.holders, node)
    }

    /// `node`'s quota from its decomposition (see the type's docs); wrapping sums are exact
    /// because the true quota fits an i64.
    fn derived_rights(&self, node: NodeId) -> (i64, i64) {
        let (mut down, mut up) = self
            .granted
            .iter()
            .find(|g| g.node == node)
            .map_or((0, 0), |g| (g.down, g.up));
        let added = self.numeric.find(node).map_or(0, |c| c.total);
        down = down.wrapping_add(added);
        up = up.wrapping_sub(added);
        for t in &self.transfers {
            if t.to == node {
                down = down.wrapping_add(t.down);
                up = up.wrapping_add(t.up);
            }
            if t.from == node {
                down = down.wrapping_sub(t.down);
                up = up.wrapping_sub(t.up);
            }
        }
        (down, up)
    }

    /// Quotas rebuilt from their decomposition: one per node that was granted rights, issued
    /// a fact on the key or received a transfer (exactly the nodes the incremental path
    /// creates a holder for).
    fn derived_holders(&self) -> Vec<Holder> {
        let mut nodes: Vec<NodeId> = self
            .granted
            .iter()
            .map(|g| g.node)
            .chain(self.numeric.contributions.iter().map(|c| c.origin))
            .chain(self.transfers.iter().flat_map(|t| [t.from, t.to]))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
            .into_iter()
            .map(|node| {
                let (down, up) = self.derived_rights(node);
                Holder { node, down, up }
            })
            .collect()
    }

    /// Join a snapshot of this key (see `KeyState::join_snapshot`): pool, grants, bounds and
    /// the numeric Raft part from the snapshot; each origin's adds and transfers out from the
    /// side that has seen more of its facts on the key; quotas recomputed. Conservation
    /// holds because it reduces to an identity between Raft-ordered fields alone (every
    /// fact moves rights between holders or between the value and a holder), which the
    /// snapshot satisfies. No quota goes negative: each origin's own part comes from a side
    /// where it was non-negative, and grants and incoming transfers only grow with a longer
    /// prefix, so the join holds at least what that side held.
    fn join_snapshot(&mut self, snapshot: &BoundedState) {
        let local_ahead =
            |origin| self.numeric.fact_seq(origin) > snapshot.numeric.fact_seq(origin);
        let mut transfers: Vec<Transfer> = self
            .transfers
            .iter()
            .filter(|t| local_ahead(t.from))
            .chain(snapshot.transfers.iter().filter(|t| !local_ahead(t.from)))
            .copied()
            .collect();
        transfers.sort_unstable_by_key(|t| (t.from, t.to));
        self.numeric.join_snapshot(&snapshot.numeric);
        self.transfers = transfers;
        self.bounds = snapshot.bounds;
        self.pool_down = snapshot.pool_down;
        self.pool_up = snapshot.pool_up;
        self.granted.clone_from(&snapshot.granted);
        self.holders = self.derived_holders();
        self.check_invariant();
    }

    /// The escrow identity: every unit between the value and each bound is a right held by
    /// exactly one holder or the pool, and none is negative. Checked after every change.
    fn check_invariant(&self) {
        let value = self.numeric.value as i128;
        let down: i128 =
            self.pool_down as i128 + self.holders.iter().map(|h| h.down as i128).sum::<i128>();
        let up: i128 =
            self.pool_up as i128 + self.holders.iter().map(|h| h.up as i128).sum::<i128>();
        assert_eq!(
            value - self.bounds.min as i128,
            down,
            "down rights conserved"
        );
        assert_eq!(self.bounds.max as i128 - value, up, "up rights conserved");
        assert!(
            self.pool_down >= 0 && self.pool_up >= 0,
            "pool never negative"
        );
        assert!(
            self.holders.iter().all(|h| h.down >= 0 && h.up >= 0),
            "quotas never negative"
        );
        assert!(
            self.bounds.contains(self.numeric.value),
            "value within bounds"
        );
        // Kept out of release builds: it is quadratic in holders and runs on every spend.
        #[cfg(debug_assertions)]
        for h in &self.holders {
            assert_eq!(
                self.derived_rights(h.node),
                (h.down, h.up),
                "quota of n{} matches its decomposition",
                h.node
            );
        }
    }

    fn add_fact(&mut self, origin: NodeId, seq: u64, delta: i64) {
        assert!(
            self.holder_rights(origin, delta).is_ok(),
            "escrow add applied without rights"
        );
        let h = self.holder(origin);
        h.down += delta;
        h.up -= delta;
        self.numeric.add_fact(origin, seq, delta);
        self.check_invariant();
    }

    /// `amount > 0` gives decrement rights, `amount < 0` increment rights.
    fn transfer_fact(&mut self, giver: NodeId, seq: u64, taker: NodeId, amount: i64) {
        assert!(
            self.holder_rights(giver, -amount).is_ok(),
            "escrow transfer applied without rights"
        );
        let g = self.holder(giver);
        if amount > 0 {
            g.down -= amount;
        } else {
            g.up += amount;
        }
        let t = self.holder(taker);
        if amount > 0 {
            t.down += amount;
        } else {
            t.up -= amount;
        }
        let i = match self
            .transfers
            .binary_search_by_key(&(giver, taker), |t| (t.from, t.to))
        {
            Ok(i) => i,
            Err(i) => {
                self.transfers.insert(
                    i,
                    Transfer {
                        from: giver,
                        to: taker,
                        down: 0,
                        up: 0,
                    },
                );
                i
            }
        };
        let t = &mut self.transfers[i];
        if amount > 0 {
            t.down = t.down.wrapping_add(amount);
        } else {
            t.up = t.up.wrapping_sub(amount);
        }
        // A transfer is a fact on the key: it moves the origin's frontier, not the value.
        self.numeric.add_fact(giver, seq, 0);
        self.check_invariant();
    }

    /// Check the pool can move the value by `delta`.
    fn pool_covers(&self, delta: i64) -> Result<(), Refusal> {
        rights_cover(delta, self.pool_down, self.pool_up, self.bounds)
    }

    fn apply_command(&mut self, body: &CommandBody, frontier: &KeyFrontier) -> Outcome {
        let outcome = match *body {
            CommandBody::BoundedAdd { delta, .. } => match self.pool_covers(delta) {
                Ok(()) => {
                    self.pool_down += delta;
                    self.pool_up -= delta;
                    self.numeric.add_ordered(delta);
                    Outcome::Done
                }
                Err(r) => Outcome::Refused(r),
            },
            CommandBody::BoundedSet { value, .. } => {
                if !self.bounds.contains(value) {
                    return Outcome::Refused(Refusal::OutOfBounds {
                        value,
                        bounds: self.bounds,
                    });
                }
                let delta = self.numeric.set_delta(value, frontier);
                match self.pool_covers(delta) {
                    Ok(()) => {
                        self.pool_down += delta;
                        self.pool_up -= delta;
                        self.numeric.set(value, frontier);
                        Outcome::Done
                    }
                    Err(r) => Outcome::Refused(r),
                }
            }
            CommandBody::BoundedSetBounds { bounds } => {
                if let Err(r) = check_span(bounds) {
                    return Outcome::Refused(r);
                }
                let pool_down =
                    self.pool_down as i128 + self.bounds.min as i128 - bounds.min as i128;
                let pool_up = self.pool_up as i128 + bounds.max as i128 - self.bounds.max as i128;
                if pool_down < 0 || pool_up < 0 {
                    let short_by = (-pool_down.min(pool_up)).min(i64::MAX as i128) as i64;
                    return Outcome::Refused(Refusal::BoundsChangeStrandsQuota {
                        bounds,
                        short_by,
                    });
                }
                match (i64::try_from(pool_down), i64::try_from(pool_up)) {
                    (Ok(d), Ok(u)) => {
                        self.pool_down = d;
                        self.pool_up = u;
                        self.bounds = bounds;
                        Outcome::Done
                    }
                    _ => Outcome::Refused(Refusal::Overflow {
                        op: crate::value::OpKind::BoundedSetBounds,
                    }),
                }
            }
            CommandBody::EscrowGrant { node, down, up, .. } => {
                if down < 0 || up < 0 || (down == 0 && up == 0) {
                    return Outcome::Refused(Refusal::BadAmount);
                }
                if down > self.pool_down {
                    return Outcome::Refused(Refusal::EscrowExhausted {
                        direction: Direction::Down,
                        needed: down,
                        available: self.pool_down,
                        bounds: self.bounds,
                    });
                }
                if up > self.pool_up {
                    return Outcome::Refused(Refusal::EscrowExhausted {
                        direction: Direction::Up,
                        needed: up,
                        available: self.pool_up,
                        bounds: self.bounds,
                    });
                }
                self.pool_down -= down;
                self.pool_up -= up;
                let h = self.holder(node);
                h.down += down;
                h.up += up;
                let g = holder_in(&mut self.granted, node);
                g.down = g.down.wrapping_add(down);
                g.up = g.up.wrapping_add(up);
                Outcome::Done
            }
            ref other => panic!("{other:?} is not a bounded counter command"),
        };
        self.check_invariant();
        outcome
    }
}

/// The entry of `node` in a list sorted by node, inserted (at zero) if absent.
fn holder_in(holders: &mut Vec<Holder>, node: NodeId) -> &mut Holder {
    let i = match holders.binary_search_by_key(&node, |h| h.node) {
        Ok(i) => i,
        Err(i) => {
            holders.insert(
                i,
                Holder {
                    node,
                    down: 0,
                    up: 0,
                },
            );
            i
        }
    };
    &mut holders[i]
}

// ---------------------------------------------------------------------------------------------
// Max

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MaxOrigin {
    origin: NodeId,
    seq: u64,
    /// Raises not yet covered by a set: sequences rising, values strictly falling, so the
    /// first entry is this origin's largest and a set's cut keeps a suffix.
    stack: Vec<(u64, i64)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxState {
    base: Option<i64>,
    origins: Vec<MaxOrigin>,
    value: Option<i64>,
}

impl MaxState {
    fn raise_fact(&mut self, origin: NodeId, seq: u64, value: i64) {
        let i = match self.origins.binary_search_by_key(&origin, |o| o.origin) {
            Ok(i) => i,
            Err(i) => {
                self.origins.insert(
                    i,
                    MaxOrigin {
                        origin,
                        seq: 0,
                        stack: Vec::new(),
                    },
                );
                i
            }
        };
        let o = &mut self.origins[i];
        assert!(o.seq < seq, "facts of one origin apply in order");
        o.seq = seq;
        while o.stack.last().is_some_and(|&(_, v)| v <= value) {
            o.stack.pop();
        }
        o.stack.push((seq, value));
        self.value = Some(self.value.map_or(value, |v| v.max(value)));
    }

    /// `base` is the Raft part; each origin's raises its fact part, minus what sets cut.
    ///
    /// The cut of origin `o` (the highest frontier seq of a set so far) is not stored, but a
    /// stack is the right-to-left maxima of `o`'s raises after the cut, and the snapshot's
    /// cut is at most its `seq` for `o`. So when the local side is ahead, its entries after the
    /// snapshot's `seq` are kept as they are, and an entry at or before it is kept exactly when
    /// the snapshot's stack still has it (it would be a right-to-left maximum there too).
    fn join_snapshot(&mut self, snapshot: &MaxState) {
        let mut origins: Vec<NodeId> = self
            .origins
            .iter()
            .chain(&snapshot.origins)
            .map(|o| o.origin)
            .collect();
        origins.sort_unstable();
        origins.dedup();
        fn find(list: &[MaxOrigin], origin: NodeId) -> Option<&MaxOrigin> {
            list.binary_search_by_key(&origin, |o| o.origin)
                .ok()
                .map(|i| &list[i])
        }
        let joined = origins
            .into_iter()
            .map(
                |origin| match (find(&self.origins, origin), find(&snapshot.origins, origin)) {
                    (Some(l), s) if l.seq > s.map_or(0, |s| s.seq) => {
                        let (snap_seq, snap_stack) =
                            s.map_or((0, &[][..]), |s| (s.seq, &s.stack[..]));
                        MaxOrigin {
                            origin,
                            seq: l.seq,
                            stack: l
                                .stack
                                .iter()
                                .filter(|&&(seq, _)| {
                                    seq > snap_seq || snap_stack.iter().any(|e| e.0 == seq)
                                })
                                .copied()
                                .collect(),
                        }
                    }
                    (_, Some(s)) => s.clone(),
                    (Some(l), None) => l.clone(),
                    (None, None) => unreachable!("origin taken from one of the two"),
                },
            )
            .collect();
        self.origins = joined;
        self.base = snapshot.base;
        self.value = self
            .origins
            .iter()
            .filter_map(|o| o.stack.first().map(|&(_, v)| v))
            .fold(self.base, |acc, v| Some(acc.map_or(v, |a| a.max(v))));
    }

    fn raise_ordered(&mut self, value: i64) {
        self.base = Some(self.base.map_or(value, |b| b.max(value)));
        self.value = Some(self.value.map_or(value, |v| v.max(value)));
    }

    fn set(&mut self, value: i64, frontier: &KeyFrontier) {
        self.reset(Some(value), frontier);
    }

    /// Drop what `frontier` observed and make `base` the Raft-ordered part (`None`: a delete).
    fn reset(&mut self, base: Option<i64>, frontier: &KeyFrontier) {
        for o in &mut self.origins {
            let cut = frontier.seq_of(o.origin);
            assert!(
                o.seq >= cut,
                "a command applies only after the facts it observed"
            );
            o.stack.retain(|&(seq, _)| seq > cut);
        }
        self.base = base;
        self.value = self
            .origins
            .iter()
            .filter_map(|o| o.stack.first().map(|&(_, v)| v))
            .fold(base, |m, v| Some(m.map_or(v, |m| m.max(v))));
    }
}

// ---------------------------------------------------------------------------------------------
// Set

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Element {
    /// Latest add of each origin not covered by a remove.
    adds: Vec<(NodeId, u64)>,
    /// Added through Raft and not removed since.
    ordered: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetState {
    elements: BTreeMap<Vec<u8>, Element>,
    /// Last fact of each origin on this key.
    seqs: Vec<(NodeId, u64)>,
}

impl SetState {
    pub fn members(&self) -> impl Iterator<Item = &[u8]> {
        self.elements.keys().map(Vec::as_slice)
    }

    pub fn contains(&self, element: &[u8]) -> bool {
        self.elements.contains_key(element)
    }

    fn element(&mut self, element: &[u8]) -> &mut Element {
        if !self.elements.contains_key(element) {
            self.elements.insert(element.to_vec(), Element::default());
        }
        self.elements.get_mut(element).expect("inserted above")
    }

    fn add_fact(&mut self, origin: NodeId, seq: u64, element: &[u8]) {
        note_seq(&mut self.seqs, origin, seq);
        // One lookup on the hot path (an element that exists); insert only when new.
        match self.elements.get_mut(element) {
            Some(e) => match e.adds.binary_search_by_key(&origin, |a| a.0) {
                Ok(i) => e.adds[i].1 = seq,
                Err(i) => e.adds.insert(i, (origin, seq)),
            },
            None => {
                let e = Element {
                    adds: vec![(origin, seq)],
                    ordered: false,
                };
                self.elements.insert(element.to_vec(), e);
            }
        }
    }

    fn add_ordered(&mut self, element: &[u8]) {
        self.element(element).ordered = true;
    }

    /// `ordered` is the Raft part; each origin's latest add per element its fact part, minus
    /// what removes cut. Removes' cuts are not stored, but each is at most the snapshot's seq
    /// of that origin: so a local add (of an origin the local side is ahead on) after that
    /// seq is kept, and one at or before it is the origin's latest add there too, kept
    /// exactly when the snapshot still has it.
    fn join_snapshot(&mut self, snapshot: &SetState) {
        let local_ahead = |origin| seq_of(&self.seqs, origin) > seq_of(&snapshot.seqs, origin);
        let mut elements: BTreeMap<Vec<u8>, Element> = snapshot
            .elements
            .iter()
            .map(|(element, e)| {
                let adds = e
                    .adds
                    .iter()
                    .filter(|&&(origin, _)| !local_ahead(origin))
                    .copied()
                    .collect();
                (
                    element.clone(),
                    Element {
                        adds,
                        ordered: e.ordered,
                    },
                )
            })
            .collect();
        for (element, e) in &self.elements {
            let in_snapshot = snapshot.elements.get(element);
            for &(origin, seq) in &e.adds {
                let keep = local_ahead(origin)
                    && (seq > seq_of(&snapshot.seqs, origin)
                        || in_snapshot.is_some_and(|s| s.adds.contains(&(origin, seq))));
                if keep {
                    let joined = elements.entry(element.clone()).or_default();
                    let at = joined
                        .adds
                        .binary_search_by_key(&origin, |a| a.0)
                        .expect_err("an origin's adds come from one side");
                    joined.adds.insert(at, (origin, seq));
                }
            }
        }
        elements.retain(|_, e| e.ordered || !e.adds.is_empty());
        self.elements = elements;
        self.seqs = join_seqs(&self.seqs, &snapshot.seqs);
    }

    /// Remove every element as far as `frontier` observed it (a delete).
    fn clear(&mut self, frontier: &KeyFrontier) {
        self.elements.retain(|_, e| {
            e.ordered = false;
            e.adds
                .retain(|&(origin, seq)| seq > frontier.seq_of(origin));
            !e.adds.is_empty()
        });
    }

    fn remove(&mut self, element: &[u8], frontier: &KeyFrontier) {
        let Some(e) = self.elements.get_mut(element) else {
            return;
        };
        e.ordered = false;
        e.adds
            .retain(|&(origin, seq)| seq > frontier.seq_of(origin));
        if e.adds.is_empty() {
            // Every later add of this element carries a higher sequence than the frontier
            // (the command applied after all facts inside it), so forgetting is exact.
            self.elements.remove(element);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Register

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Written {
    hlc: HlcTimestamp,
    origin: NodeId,
    seq: u64,
    value: Option<Vec<u8>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterState {
    /// The Raft-ordered write (or absorbed LWW write), if any.
    base: Option<Written>,
    /// Bumped by every Raft-ordered change; never reused, so CAS on it has no ABA.
    version: u64,
    /// Latest LWW write of each origin not absorbed by a command, sorted by origin.
    lww: Vec<Written>,
    seqs: Vec<(NodeId, u64)>,
}

impl RegisterState {
    pub fn version(&self) -> u64 {
        self.version
    }

    fn lww_winner(&self) -> Option<&Written> {
        self.lww.iter().max_by_key(|w| (w.hlc, w.origin))
    }

    /// Newest by `(hlc, origin)` of the base and the LWW writes.
    fn visible(&self) -> (Option<&[u8]>, HlcTimestamp) {
        let winner = match (self.base.as_ref(), self.lww_winner()) {
            (Some(b), Some(w)) => Some(if (w.hlc, w.origin) > (b.hlc, b.origin) {
                w
            } else {
                b
            }),
            (b, w) => b.or(w),
        };
        winner.map_or((None, HlcTimestamp::default()), |w| {
            (w.value.as_deref(), w.hlc)
        })
    }

    fn lww_fact(&mut self, origin: NodeId, seq: u64, hlc: HlcTimestamp, value: Option<&[u8]>) {
        note_seq(&mut self.seqs, origin, seq);
        let written = Written {
            hlc,
            origin,
            seq,
            value: value.map(<[u8]>::to_vec),
        };
        match self.lww.binary_search_by_key(&origin, |w| w.origin) {
            Ok(i) => {
                // An origin stamps its facts with a rising HLC, so its newest write wins.
                self.lww[i] = written;
            }
            Err(i) => self.lww.insert(i, written),
        }
    }

    /// `base` and `version` are the Raft part; each origin's latest LWW write its fact part,
    /// minus what commands absorbed. Where the local side is ahead on an origin, its write
    /// (if a local command has not absorbed it) is that origin's latest fact on the key, later
    /// than anything the snapshot saw, so no command up to the snapshot absorbed it: keep it.
    fn join_snapshot(&mut self, snapshot: &RegisterState) {
        let local_ahead = |origin| seq_of(&self.seqs, origin) > seq_of(&snapshot.seqs, origin);
        let mut lww: Vec<Written> = snapshot
            .lww
            .iter()
            .filter(|w| !local_ahead(w.origin))
            .cloned()
            .collect();
        for w in &self.lww {
            if local_ahead(w.origin) {
                debug_assert!(w.seq > seq_of(&snapshot.seqs, w.origin));
                lww.push(w.clone());
            }
        }
        lww.sort_unstable_by_key(|w| w.origin);
        self.lww = lww;
        self.base.clone_from(&snapshot.base);
        self.version = snapshot.version;
        self.seqs = join_seqs(&self.seqs, &snapshot.seqs);
    }

    fn write(&mut self, hlc: HlcTimestamp, proposer: NodeId, value: Option<Vec<u8>>) {
        // A Raft write follows everything it observed, so it must win over it even if the
        // proposer's clock lags: stamp it after the base.
        let floor = self.base.as_ref().map_or(0, |b| b.hlc.0.saturating_add(1));
        self.base = Some(Written {
            hlc: HlcTimestamp(hlc.0.max(floor)),
            origin: proposer,
            seq: 0,
            value,
        });
        self.version += 1;
    }

    /// A delete: absorb what the command observed, then write absent if the register had a
    /// value as observed. Returns whether it had.
    fn delete(
        &mut self,
        frontier: &KeyFrontier,
        absorb: Option<&LwwWrite>,
        hlc: HlcTimestamp,
        proposer: NodeId,
    ) -> bool {
        self.absorb(frontier, absorb);
        let existed = self.base.as_ref().is_some_and(|b| b.value.is_some());
        if existed {
            self.write(hlc, proposer, None);
        }
        existed
    }

    /// The value and version a command observing `frontier` (and absorbing `absorb`) would
    /// compare with, as compare-and-set does; nothing changes.
    pub(crate) fn observed(
        &self,
        frontier: &KeyFrontier,
        absorb: Option<&LwwWrite>,
    ) -> (Option<Vec<u8>>, u64) {
        let mut view = self.clone();
        view.absorb(frontier, absorb);
        (view.base.and_then(|b| b.value), view.version)
    }

    /// Drop the LWW writes `frontier` covers, and take the winner the command saw as base.
    fn absorb(&mut self, frontier: &KeyFrontier, absorb: Option<&LwwWrite>) {
        self.lww.retain(|w| w.seq > frontier.seq_of(w.origin));
        if let Some(a) = absorb {
            let newer = self
                .base
                .as_ref()
                .is_none_or(|b| (a.hlc, a.origin) > (b.hlc, b.origin));
            if newer {
                self.base = Some(Written {
                    hlc: a.hlc,
                    origin: a.origin,
                    seq: 0,
                    value: a.value.clone(),
                });
                self.version += 1;
            }
        }
    }

    fn apply_command(
        &mut self,
        body: &CommandBody,
        frontier: &KeyFrontier,
        absorb: Option<&LwwWrite>,
        hlc: HlcTimestamp,
        proposer: NodeId,
    ) -> Outcome {
        self.absorb(frontier, absorb);
        match body {
            CommandBody::RegisterPut { value } => {
                self.write(hlc, proposer, Some(value.clone()));
                Outcome::Done
            }
            CommandBody::RegisterDelete => {
                self.write(hlc, proposer, None);
                Outcome::Done
            }
            CommandBody::RegisterCas { expect, value } => {
                let current = self.base.as_ref().and_then(|b| b.value.as_deref());
                let holds = match expect {
                    // Version 0 means "absent": a register never written, or deleted
                    // (a delete is a new version, yet the key no longer exists).
                    CasExpect::Version(0) => current.is_none(),
                    CasExpect::Version(v) => *v == self.version,
                    CasExpect::Value(v) => v.as_deref() == current,
                };
                if holds {
                    self.write(hlc, proposer, value.clone());
                    Outcome::Done
                } else {
                    Outcome::CasFailed
                }
            }
            other => panic!("{other:?} is not a register command"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fact::FactId;

    fn fact(origin: NodeId, seq: u64, kind: FactKind, arg: i64) -> FactRef<'static> {
        FactRef {
            id: FactId { origin, seq },
            kind,
            hlc: HlcTimestamp(seq),
            arg,
            peer: 0,
            generation: 0,
            key: b"k",
            payload: b"",
        }
    }

    #[test]
    fn cas_expecting_absent_holds_on_a_deleted_register() {
        let mut s = KeyState::new(ValueType::Register, None).unwrap();
        let none = KeyFrontier::default();
        let apply = |s: &mut KeyState, body: CommandBody| {
            s.apply_command(&body, &none, None, HlcTimestamp(1), 1)
        };
        let cas = |expect, value: &[u8]| CommandBody::RegisterCas {
            expect,
            value: Some(value.to_vec()),
        };
        let put = CommandBody::RegisterPut {
            value: b"a".to_vec(),
        };
        assert_eq!(apply(&mut s, put), Outcome::Done);
        assert_eq!(
            apply(&mut s, cas(CasExpect::Version(0), b"x")),
            Outcome::CasFailed,
            "the register exists"
        );
        assert_eq!(apply(&mut s, CommandBody::RegisterDelete), Outcome::Done);
        assert_eq!(
            apply(&mut s, cas(CasExpect::Version(0), b"b")),
            Outcome::Done
        );
        assert_eq!(apply(&mut s, CommandBody::RegisterDelete), Outcome::Done);
        assert_eq!(
            apply(&mut s, cas(CasExpect::Value(None), b"c")),
            Outcome::Done
        );
        // Versions are never reused: the register is at version 5, not 1.
        assert_eq!(
            apply(&mut s, cas(CasExpect::Version(5), b"d")),
            Outcome::Done
        );
    }

    #[test]
    fn counter_set_absorbs_what_it_observed_and_keeps_the_rest() {
        let mut s = KeyState::new(ValueType::Counter, None).unwrap();
        s.apply_fact(&fact(1, 1, FactKind::CounterAdd, 5));
        let observed = s.frontier();
        s.apply_fact(&fact(2, 1, FactKind::CounterAdd, 7));
        let out = s.apply_command(
            &CommandBody::CounterSet { value: 100 },
            &observed,
            None,
            HlcTimestamp(9),
            1,
        );
        assert_eq!(out, Outcome::Done);
        assert_eq!(s.value(), Value::Counter(107));
    }

    #[test]
    fn bounded_counter_refuses_grants_beyond_the_pool() {
        let bounds = Bounds::new(0, 10).unwrap();
        let mut s = KeyState::new(ValueType::BoundedCounter, Some(bounds)).unwrap();
        let grant = |down| CommandBody::EscrowGrant {
            node: 1,
            down,
            up: 3,
            bounds,
        };
        let none = KeyFrontier::default();
        // Starts at 0: no decrement rights exist.
        assert!(matches!(
            s.apply_command(&grant(1), &none, None, HlcTimestamp(1), 1),
            Outcome::Refused(Refusal::EscrowExhausted { .. })
        ));
        assert_eq!(
            s.apply_command(&grant(0), &none, None, HlcTimestamp(1), 1),
            Outcome::Done
        );
        let spend = fact(1, 1, FactKind::BoundedAdd, 3);
        assert!(s.can_apply(&spend));
        s.apply_fact(&spend);
        assert!(!s.can_apply(&fact(1, 2, FactKind::BoundedAdd, -4)));
        assert!(s.can_apply(&fact(1, 2, FactKind::BoundedAdd, -3)));
        assert_eq!(s.value(), Value::Bounded { value: 3, bounds });
    }

    #[test]
    fn bounds_wider_than_i64_are_refused() {
        let wide = Bounds::new(i64::MIN, i64::MAX).unwrap();
        assert_eq!(
            KeyState::new(ValueType::BoundedCounter, Some(wide)),
            Err(Refusal::BoundsTooWide { bounds: wide })
        );
        let ok = Bounds::new(-(1 << 61), 1 << 61).unwrap();
        let mut s = KeyState::new(ValueType::BoundedCounter, Some(ok)).unwrap();
        let out = s.apply_command(
            &CommandBody::BoundedSetBounds { bounds: wide },
            &KeyFrontier::default(),
            None,
            HlcTimestamp(1),
            1,
        );
        assert_eq!(
            out,
            Outcome::Refused(Refusal::BoundsTooWide { bounds: wide })
        );
    }

    fn set_fact(origin: NodeId, seq: u64, element: &'static [u8]) -> FactRef<'static> {
        FactRef {
            payload: element,
            ..fact(origin, seq, FactKind::SetAdd, 0)
        }
    }

    fn lww(origin: NodeId, seq: u64, value: &'static [u8]) -> FactRef<'static> {
        FactRef {
            payload: value,
            ..fact(origin, seq, FactKind::RegisterLww, 0)
        }
    }

    fn command(s: &mut KeyState, body: CommandBody, frontier: &KeyFrontier) -> Outcome {
        let absorb = s.lww_winner();
        s.apply_command(&body, frontier, absorb.as_ref(), HlcTimestamp(100), 9)
    }

    /// `local` and `snap` share a Raft prefix; `snap` then applies `body` observing its own
    /// facts. The join must equal `snap` after both catch up on each other's facts.
    fn join_matches(
        mut local: KeyState,
        mut snap: KeyState,
        body: CommandBody,
        local_only: &[FactRef<'static>],
        snap_only: &[FactRef<'static>],
    ) {
        let observed = snap.frontier();
        command(&mut snap, body, &observed);
        local.join_snapshot(&snap);
        let mut reference = snap.clone();
        for f in local_only {
            if reference.fact_seq(f.id.origin) < f.id.seq {
                reference.apply_fact(f);
            }
        }
        for f in snap_only {
            if local.fact_seq(f.id.origin) < f.id.seq {
                local.apply_fact(f);
            }
        }
        assert_eq!(local, reference);
        assert_eq!(local.value(), reference.value());
    }

    #[test]
    fn joins_take_the_raft_part_from_the_snapshot_and_the_longer_fact_prefix() {
        // Counter: origin 1 is ahead locally (after the set's cut), origin 2 in the snapshot.
        let mut base = KeyState::new(ValueType::Counter, None).unwrap();
        base.apply_fact(&fact(1, 1, FactKind::CounterAdd, 5));
        let (mut local, mut snap) = (base.clone(), base);
        snap.apply_fact(&fact(2, 1, FactKind::CounterAdd, 7));
        let local_only = [fact(1, 2, FactKind::CounterAdd, 11)];
        local.apply_fact(&local_only[0]);
        join_matches(
            local,
            snap,
            CommandBody::CounterSet { value: 100 },
            &local_only,
            &[fact(2, 1, FactKind::CounterAdd, 7)],
        );

        // Max: the set cuts origin 1's raises up to seq 2; local has seq 3 on top.
        let mut base = KeyState::new(ValueType::Max, None).unwrap();
        base.apply_fact(&fact(1, 1, FactKind::MaxRaise, 50));
        base.apply_fact(&fact(1, 2, FactKind::MaxRaise, 40));
        let (mut local, snap) = (base.clone(), base);
        let local_only = [fact(1, 3, FactKind::MaxRaise, 30)];
        local.apply_fact(&local_only[0]);
        join_matches(
            local,
            snap,
            CommandBody::MaxSet { value: 10 },
            &local_only,
            &[],
        );

        // Set: a remove cut origin 1's add of "a" at seq 1; local added "b" again at seq 3.
        let mut base = KeyState::new(ValueType::Set, None).unwrap();
        base.apply_fact(&set_fact(1, 1, b"a"));
        base.apply_fact(&set_fact(1, 2, b"b"));
        let (mut local, snap) = (base.clone(), base);
        // "a" stays removed: its local add (seq 1) is at or before the snapshot's seq 2.
        let local_only = [set_fact(1, 3, b"b"), set_fact(3, 1, b"c")];
        for f in &local_only {
            local.apply_fact(f);
        }
        join_matches(
            local,
            snap,
            CommandBody::SetRemove {
                element: b"a".to_vec(),
            },
            &local_only,
            &[],
        );

        // Register: a put absorbs origin 1's write at seq 1; local has its write at seq 2.
        let mut base = KeyState::new(ValueType::Register, None).unwrap();
        base.apply_fact(&lww(1, 1, b"x"));
        base.apply_fact(&lww(2, 1, b"y"));
        let (mut local, snap) = (base.clone(), base);
        let local_only = [lww(1, 2, b"z")];
        local.apply_fact(&local_only[0]);
        join_matches(
            local,
            snap,
            CommandBody::RegisterPut {
                value: b"w".to_vec(),
            },
            &local_only,
            &[],
        );
    }

    #[test]
    fn max_set_keeps_unobserved_raises() {
        let mut s = KeyState::new(ValueType::Max, None).unwrap();
        s.apply_fact(&fact(1, 1, FactKind::MaxRaise, 50));
        let observed = s.frontier();
        s.apply_fact(&fact(1, 2, FactKind::MaxRaise, 20));
        s.apply_command(
            &CommandBody::MaxSet { value: 10 },
            &observed,
            None,
            HlcTimestamp(3),
            2,
        );
        assert_eq!(s.value(), Value::Max(Some(20)));
    }
}
