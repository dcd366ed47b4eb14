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
pub const KEY_STATE_FORMAT: u8 = 1;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StateCodecError {
    #[error("stored key state is empty; the state store is corrupt, restore from a checkpoint")]
    Empty,
    #[error(
        "stored key state has format {found}, this build reads format {KEY_STATE_FORMAT}; run a matching calm version"
    )]
    Format { found: u8 },
    #[error(
        "stored key state does not decode ({reason}); the state store is corrupt, restore from a checkpoint"
    )]
    Decode { reason: String },
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
        self.value = self.contributions.iter().fold(self.base, |v, c| {
            v.wrapping_add(c.total.wrapping_sub(c.covered_total))
        });
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

/// A counter kept within `bounds` by escrow (Balegas et al., 2015).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundedState {
    numeric: Numeric,
    bounds: Bounds,
    /// Rights held by the key's Raft group.
    pool_down: i64,
    pool_up: i64,
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
            holders: Vec::new(),
        };
        state.check_invariant();
        state
    }

    pub fn value(&self) -> i64 {
        self.numeric.value
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
        let i = match self.holders.binary_search_by_key(&node, |h| h.node) {
            Ok(i) => i,
            Err(i) => {
                self.holders.insert(
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
        &mut self.holders[i]
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
                Outcome::Done
            }
            ref other => panic!("{other:?} is not a bounded counter command"),
        };
        self.check_invariant();
        outcome
    }
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

    fn raise_ordered(&mut self, value: i64) {
        self.base = Some(self.base.map_or(value, |b| b.max(value)));
        self.value = Some(self.value.map_or(value, |v| v.max(value)));
    }

    fn set(&mut self, value: i64, frontier: &KeyFrontier) {
        for o in &mut self.origins {
            let cut = frontier.seq_of(o.origin);
            assert!(
                o.seq >= cut,
                "a command applies only after the facts it observed"
            );
            o.stack.retain(|&(seq, _)| seq > cut);
        }
        self.base = Some(value);
        self.value = self
            .origins
            .iter()
            .filter_map(|o| o.stack.first().map(|&(_, v)| v))
            .fold(value, i64::max)
            .into();
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

    fn apply_command(
        &mut self,
        body: &CommandBody,
        frontier: &KeyFrontier,
        absorb: Option<&LwwWrite>,
        hlc: HlcTimestamp,
        proposer: NodeId,
    ) -> Outcome {
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
            key: b"k",
            payload: b"",
        }
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
