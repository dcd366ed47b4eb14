//! The admission classifier: which path an operation takes.
//!
//! `classify(mode, key type, op, local escrow)` is a pure function and the single place where
//! calm decides to coordinate. It answers one of:
//!
//! - `FastPath`: the op commutes; admit it locally, make it durable, gossip it.
//! - `EscrowLocal`: a bounded-counter add covered by this node's own quota; same as the fast
//!   path, and the bound still holds because the node only spends rights it holds.
//! - `Consensus`: order it through the key's Raft group (non-commutative, `strict`, quota
//!   exhausted, or the key has no type yet — a key's type is always fixed in Raft order).
//! - `Refused`: no path can take it (type mismatch, CAS or another coordinating op in
//!   `available` mode, or a bounded add beyond quota in `available` mode).
//!
//! It reads no clock and allocates nothing; `Refusal` renders its message only when printed.

use crate::refusal::{Direction, Refusal};
use crate::value::{Bounds, Mode, OpKind, ValueType};

/// Why an op must go through consensus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConsensusReason {
    /// The key is in `strict` mode.
    StrictMode,
    /// The op does not commute with others of its type.
    NonCommutative,
    /// A bounded add this node's quota cannot cover; the key's pool may.
    EscrowExhausted,
    /// The key has no type yet; its first write fixes it in Raft order.
    KeyCreation,
    /// The key is attached to a lease, whose expiry deletes it in Raft order.
    Leased,
}

/// The path an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Admission {
    FastPath,
    EscrowLocal,
    Consensus(ConsensusReason),
    Refused(Refusal),
}

/// This node's escrow rights on a bounded counter key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EscrowView {
    /// Rights to decrement held locally.
    pub down: i64,
    /// Rights to increment held locally.
    pub up: i64,
    pub bounds: Bounds,
}

impl EscrowView {
    /// Whether the local quota covers moving the value by `delta`.
    pub const fn covers(self, delta: i64) -> bool {
        if delta < 0 {
            delta.unsigned_abs() <= self.down as u64
        } else {
            delta as u64 <= self.up as u64
        }
    }

    const fn refusal(self, delta: i64) -> Refusal {
        let (direction, available) = if delta < 0 {
            (Direction::Down, self.down)
        } else {
            (Direction::Up, self.up)
        };
        Refusal::EscrowExhausted {
            direction,
            needed: delta.saturating_abs(),
            available,
            bounds: self.bounds,
        }
    }
}

/// Classify one op. `key_type` is the key's fixed type (`None` if the key does not exist
/// yet); `delta` is the amount of a bounded add (ignored otherwise); `escrow` is this node's
/// quota on the key (`None` when it is not a bounded counter this node knows).
pub const fn classify(
    mode: Mode,
    key_type: Option<ValueType>,
    op: OpKind,
    delta: i64,
    escrow: Option<EscrowView>,
) -> Admission {
    let op_type = op.value_type();
    let key_type = match key_type {
        Some(t) => t,
        None => {
            // Refusals that do not depend on the key existing come first, so a client learns
            // them before a round of consensus.
            if let Mode::Available = mode {
                if let OpKind::RegisterCas = op {
                    return Admission::Refused(Refusal::CasInAvailableMode);
                }
                if !admissible_in_available(op) {
                    return Admission::Refused(Refusal::NeedsConsensus {
                        key_type: op_type,
                        op,
                    });
                }
            }
            return Admission::Consensus(ConsensusReason::KeyCreation);
        }
    };
    if key_type as u8 != op_type as u8 {
        return Admission::Refused(Refusal::TypeMismatch { key_type, op });
    }
    match mode {
        Mode::Strict => Admission::Consensus(ConsensusReason::StrictMode),
        Mode::Hybrid => match op {
            OpKind::CounterAdd | OpKind::MaxRaise | OpKind::SetAdd => Admission::FastPath,
            OpKind::BoundedAdd => match escrow {
                Some(e) if e.covers(delta) => Admission::EscrowLocal,
                _ => Admission::Consensus(ConsensusReason::EscrowExhausted),
            },
            _ => Admission::Consensus(ConsensusReason::NonCommutative),
        },
        Mode::Available => match op {
            OpKind::CounterAdd
            | OpKind::MaxRaise
            | OpKind::SetAdd
            | OpKind::RegisterPut
            | OpKind::RegisterDelete => Admission::FastPath,
            OpKind::BoundedAdd => match escrow {
                Some(e) if e.covers(delta) => Admission::EscrowLocal,
                Some(e) => Admission::Refused(e.refusal(delta)),
                None => Admission::Refused(Refusal::EscrowExhausted {
                    direction: if delta < 0 {
                        Direction::Down
                    } else {
                        Direction::Up
                    },
                    needed: delta.saturating_abs(),
                    available: 0,
                    bounds: Bounds { min: 0, max: 0 },
                }),
            },
            OpKind::RegisterCas => Admission::Refused(Refusal::CasInAvailableMode),
            _ => Admission::Refused(Refusal::NeedsConsensus { key_type, op }),
        },
    }
}

/// Ops that `available` mode can take without coordination (given a key and quota).
const fn admissible_in_available(op: OpKind) -> bool {
    matches!(
        op,
        OpKind::CounterAdd
            | OpKind::MaxRaise
            | OpKind::SetAdd
            | OpKind::RegisterPut
            | OpKind::RegisterDelete
            | OpKind::BoundedAdd
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use Admission::*;
    use ConsensusReason::*;

    /// What the contract (DESIGN.md sections 2, 3, 5) says for an op on a key *of its own
    /// type*, per mode: (with local quota covering it, without). Written out by hand as the
    /// specification; `classify` must agree with it on every combination.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Expect {
        Fast,
        Escrow,
        Raft(ConsensusReason),
        CasRefused,
        NeedsRaftRefused,
        ExhaustedRefused,
    }
    use Expect::*;

    const TABLE: &[(Mode, OpKind, Expect, Expect)] = &[
        // strict: everything through Raft
        (
            Mode::Strict,
            OpKind::RegisterPut,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::RegisterDelete,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::RegisterCas,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::CounterAdd,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::CounterSet,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::BoundedAdd,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::BoundedSet,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::BoundedSetBounds,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::MaxRaise,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::MaxSet,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::SetAdd,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        (
            Mode::Strict,
            OpKind::SetRemove,
            Raft(StrictMode),
            Raft(StrictMode),
        ),
        // hybrid: coordinate only what does not commute; escrow for bounded adds
        (
            Mode::Hybrid,
            OpKind::RegisterPut,
            Raft(NonCommutative),
            Raft(NonCommutative),
        ),
        (
            Mode::Hybrid,
            OpKind::RegisterDelete,
            Raft(NonCommutative),
            Raft(NonCommutative),
        ),
        (
            Mode::Hybrid,
            OpKind::RegisterCas,
            Raft(NonCommutative),
            Raft(NonCommutative),
        ),
        (Mode::Hybrid, OpKind::CounterAdd, Fast, Fast),
        (
            Mode::Hybrid,
            OpKind::CounterSet,
            Raft(NonCommutative),
            Raft(NonCommutative),
        ),
        (
            Mode::Hybrid,
            OpKind::BoundedAdd,
            Escrow,
            Raft(EscrowExhausted),
        ),
        (
            Mode::Hybrid,
            OpKind::BoundedSet,
            Raft(NonCommutative),
            Raft(NonCommutative),
        ),
        (
            Mode::Hybrid,
            OpKind::BoundedSetBounds,
            Raft(NonCommutative),
            Raft(NonCommutative),
        ),
        (Mode::Hybrid, OpKind::MaxRaise, Fast, Fast),
        (
            Mode::Hybrid,
            OpKind::MaxSet,
            Raft(NonCommutative),
            Raft(NonCommutative),
        ),
        (Mode::Hybrid, OpKind::SetAdd, Fast, Fast),
        (
            Mode::Hybrid,
            OpKind::SetRemove,
            Raft(NonCommutative),
            Raft(NonCommutative),
        ),
        // available: never coordinate
        (Mode::Available, OpKind::RegisterPut, Fast, Fast),
        (Mode::Available, OpKind::RegisterDelete, Fast, Fast),
        (Mode::Available, OpKind::RegisterCas, CasRefused, CasRefused),
        (Mode::Available, OpKind::CounterAdd, Fast, Fast),
        (
            Mode::Available,
            OpKind::CounterSet,
            NeedsRaftRefused,
            NeedsRaftRefused,
        ),
        (
            Mode::Available,
            OpKind::BoundedAdd,
            Escrow,
            ExhaustedRefused,
        ),
        (
            Mode::Available,
            OpKind::BoundedSet,
            NeedsRaftRefused,
            NeedsRaftRefused,
        ),
        (
            Mode::Available,
            OpKind::BoundedSetBounds,
            NeedsRaftRefused,
            NeedsRaftRefused,
        ),
        (Mode::Available, OpKind::MaxRaise, Fast, Fast),
        (
            Mode::Available,
            OpKind::MaxSet,
            NeedsRaftRefused,
            NeedsRaftRefused,
        ),
        (Mode::Available, OpKind::SetAdd, Fast, Fast),
        (
            Mode::Available,
            OpKind::SetRemove,
            NeedsRaftRefused,
            NeedsRaftRefused,
        ),
    ];

    fn matches(expect: Expect, got: Admission) -> bool {
        match (expect, got) {
            (Fast, FastPath) | (Escrow, EscrowLocal) => true,
            (Raft(a), Consensus(b)) => a == b,
            (CasRefused, Refused(Refusal::CasInAvailableMode)) => true,
            (NeedsRaftRefused, Refused(Refusal::NeedsConsensus { .. })) => true,
            (ExhaustedRefused, Refused(Refusal::EscrowExhausted { .. })) => true,
            _ => false,
        }
    }

    #[test]
    fn every_combination_follows_the_table() {
        assert_eq!(TABLE.len(), Mode::ALL.len() * OpKind::ALL.len());
        let bounds = Bounds::new(0, 100).unwrap();
        let delta = -5;
        let covered = EscrowView {
            down: 5,
            up: 0,
            bounds,
        };
        let short = EscrowView {
            down: 4,
            up: 0,
            bounds,
        };
        let mut checked = 0;
        for mode in Mode::ALL {
            for op in OpKind::ALL {
                let &(_, _, with_quota, without_quota) = TABLE
                    .iter()
                    .find(|row| row.0 == mode && row.1 == op)
                    .expect("table covers every (mode, op)");
                for key_type in [None]
                    .into_iter()
                    .chain(ValueType::ALL.into_iter().map(Some))
                {
                    for (escrow, expect) in [
                        (Some(covered), with_quota),
                        (Some(short), without_quota),
                        (None, without_quota),
                    ] {
                        let got = classify(mode, key_type, op, delta, escrow);
                        checked += 1;
                        match key_type {
                            // A key of another type: always a type mismatch.
                            Some(t) if t != op.value_type() => assert_eq!(
                                got,
                                Refused(Refusal::TypeMismatch { key_type: t, op }),
                                "{mode} {op:?} on a {t} key"
                            ),
                            // Same type: the table.
                            Some(_) => assert!(
                                matches(expect, got),
                                "{mode} {op:?} escrow {escrow:?}: expected {expect:?}, got {got:?}"
                            ),
                            // No key yet: what would be refused anyway is refused, everything
                            // else creates the key through Raft.
                            None => match expect {
                                CasRefused | NeedsRaftRefused => assert!(
                                    matches(expect, got),
                                    "{mode} {op:?} on a new key: expected {expect:?}, got {got:?}"
                                ),
                                _ => assert_eq!(
                                    got,
                                    Consensus(KeyCreation),
                                    "{mode} {op:?} on a new key"
                                ),
                            },
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 3 * 12 * 6 * 3);
    }

    #[test]
    fn escrow_covers_both_directions() {
        let bounds = Bounds::new(-10, 10).unwrap();
        let e = EscrowView {
            down: 3,
            up: 2,
            bounds,
        };
        assert!(e.covers(-3) && !e.covers(-4));
        assert!(e.covers(2) && !e.covers(3));
        assert!(e.covers(0));
        assert!(!e.covers(i64::MIN));
    }

    #[test]
    fn refusals_carry_the_numbers() {
        let bounds = Bounds::new(0, 10).unwrap();
        let got = classify(
            Mode::Available,
            Some(ValueType::BoundedCounter),
            OpKind::BoundedAdd,
            -7,
            Some(EscrowView {
                down: 2,
                up: 0,
                bounds,
            }),
        );
        let Refused(r) = got else { panic!("{got:?}") };
        assert_eq!(
            r.on_key(b"stock:42").to_string(),
            "key 'stock:42' is a bounded counter [0, 10]: a decrement by 7 would cross 0; only 2 can \
             be granted now, retry later or with a smaller amount"
        );
    }
}
