//! Value types, safety modes and the operations each type accepts.
//!
//! This module owns the data model of DESIGN.md section 2: which types exist, which operations
//! each type has, and — the one fact everything else leans on — whether an operation commutes.
//! Commuting operations may be admitted locally and spread by gossip; the others must be ordered
//! by the key's Raft group. The admission classifier (`admission.rs`) combines this with the
//! key's safety mode and local escrow state.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The type of a key's value. Fixed by the key's first write or by an operator rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum ValueType {
    /// Bytes plus a version; written only through consensus (or last-writer-wins in `available`).
    Register = 1,
    /// A signed 64-bit counter.
    Counter = 2,
    /// A counter that never leaves `[min, max]`, kept there by escrow.
    BoundedCounter = 3,
    /// A signed 64-bit value that only rises on the fast path.
    Max = 4,
    /// A set of byte strings (observed-remove semantics).
    Set = 5,
}

impl ValueType {
    pub const ALL: [ValueType; 5] = [
        ValueType::Register,
        ValueType::Counter,
        ValueType::BoundedCounter,
        ValueType::Max,
        ValueType::Set,
    ];

    /// Human name, as used in error messages and rules files.
    pub const fn name(self) -> &'static str {
        match self {
            ValueType::Register => "register",
            ValueType::Counter => "counter",
            ValueType::BoundedCounter => "bounded counter",
            ValueType::Max => "max",
            ValueType::Set => "set",
        }
    }

    /// "a register", "an ..." — for readable sentences.
    pub const fn with_article(self) -> &'static str {
        match self {
            ValueType::Register => "a register",
            ValueType::Counter => "a counter",
            ValueType::BoundedCounter => "a bounded counter",
            ValueType::Max => "a max",
            ValueType::Set => "a set",
        }
    }

    pub const fn from_u8(raw: u8) -> Option<ValueType> {
        match raw {
            1 => Some(ValueType::Register),
            2 => Some(ValueType::Counter),
            3 => Some(ValueType::BoundedCounter),
            4 => Some(ValueType::Max),
            5 => Some(ValueType::Set),
            _ => None,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-key safety mode chosen by operators (DESIGN.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every op goes through the key's Raft group.
    Strict,
    /// Coordinate only for non-commutative ops; bounded counters use escrow.
    #[default]
    Hybrid,
    /// Never coordinate: registers become last-writer-wins, CAS is refused.
    Available,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Strict, Mode::Hybrid, Mode::Available];

    pub const fn name(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Hybrid => "hybrid",
            Mode::Available => "available",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Inclusive bounds of a bounded counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Bounds {
    pub min: i64,
    pub max: i64,
}

impl Bounds {
    pub const fn new(min: i64, max: i64) -> Option<Bounds> {
        if min <= max {
            Some(Bounds { min, max })
        } else {
            None
        }
    }

    pub const fn contains(self, value: i64) -> bool {
        self.min <= value && value <= self.max
    }
}

impl fmt::Display for Bounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.min, self.max)
    }
}

/// The kind of an operation, without its arguments. Used by the classifier and in encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum OpKind {
    RegisterPut = 1,
    RegisterDelete = 2,
    RegisterCas = 3,
    CounterAdd = 4,
    CounterSet = 5,
    BoundedAdd = 6,
    BoundedSet = 7,
    BoundedSetBounds = 8,
    MaxRaise = 9,
    MaxSet = 10,
    SetAdd = 11,
    SetRemove = 12,
}

impl OpKind {
    pub const ALL: [OpKind; 12] = [
        OpKind::RegisterPut,
        OpKind::RegisterDelete,
        OpKind::RegisterCas,
        OpKind::CounterAdd,
        OpKind::CounterSet,
        OpKind::BoundedAdd,
        OpKind::BoundedSet,
        OpKind::BoundedSetBounds,
        OpKind::MaxRaise,
        OpKind::MaxSet,
        OpKind::SetAdd,
        OpKind::SetRemove,
    ];

    /// The type this op belongs to.
    pub const fn value_type(self) -> ValueType {
        match self {
            OpKind::RegisterPut | OpKind::RegisterDelete | OpKind::RegisterCas => {
                ValueType::Register
            }
            OpKind::CounterAdd | OpKind::CounterSet => ValueType::Counter,
            OpKind::BoundedAdd | OpKind::BoundedSet | OpKind::BoundedSetBounds => {
                ValueType::BoundedCounter
            }
            OpKind::MaxRaise | OpKind::MaxSet => ValueType::Max,
            OpKind::SetAdd | OpKind::SetRemove => ValueType::Set,
        }
    }

    /// Whether the op commutes with every other op of its type (the algebra of DESIGN.md
    /// section 2). A bounded add commutes only while it stays inside an escrow quota; the
    /// classifier checks that part, so it counts as commutative here.
    pub const fn commutes(self) -> bool {
        matches!(
            self,
            OpKind::CounterAdd | OpKind::BoundedAdd | OpKind::MaxRaise | OpKind::SetAdd
        )
    }

    /// Short verb used in messages ("set requires consensus").
    pub const fn verb(self) -> &'static str {
        match self {
            OpKind::RegisterPut => "put",
            OpKind::RegisterDelete => "delete",
            OpKind::RegisterCas => "compare-and-set",
            OpKind::CounterAdd | OpKind::BoundedAdd => "add",
            OpKind::CounterSet | OpKind::BoundedSet | OpKind::MaxSet => "set",
            OpKind::BoundedSetBounds => "change bounds",
            OpKind::MaxRaise => "raise",
            OpKind::SetAdd => "add element",
            OpKind::SetRemove => "remove element",
        }
    }

    pub const fn from_u8(raw: u8) -> Option<OpKind> {
        let mut i = 0;
        while i < OpKind::ALL.len() {
            if OpKind::ALL[i] as u8 == raw {
                return Some(OpKind::ALL[i]);
            }
            i += 1;
        }
        None
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.verb())
    }
}

/// Compare-and-set condition for registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CasExpect {
    /// The register's version (0 = absent) must equal this.
    Version(u64),
    /// The register's value must equal these bytes (`None` = absent).
    Value(Option<Vec<u8>>),
}

/// A typed operation as a client asks for it. Keys travel beside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    RegisterPut {
        value: Vec<u8>,
    },
    RegisterDelete,
    RegisterCas {
        expect: CasExpect,
        value: Option<Vec<u8>>,
    },
    CounterAdd {
        delta: i64,
    },
    CounterSet {
        value: i64,
    },
    BoundedAdd {
        delta: i64,
    },
    BoundedSet {
        value: i64,
    },
    BoundedSetBounds {
        bounds: Bounds,
    },
    MaxRaise {
        value: i64,
    },
    MaxSet {
        value: i64,
    },
    SetAdd {
        element: Vec<u8>,
    },
    SetRemove {
        element: Vec<u8>,
    },
}

impl Op {
    pub const fn kind(&self) -> OpKind {
        match self {
            Op::RegisterPut { .. } => OpKind::RegisterPut,
            Op::RegisterDelete => OpKind::RegisterDelete,
            Op::RegisterCas { .. } => OpKind::RegisterCas,
            Op::CounterAdd { .. } => OpKind::CounterAdd,
            Op::CounterSet { .. } => OpKind::CounterSet,
            Op::BoundedAdd { .. } => OpKind::BoundedAdd,
            Op::BoundedSet { .. } => OpKind::BoundedSet,
            Op::BoundedSetBounds { .. } => OpKind::BoundedSetBounds,
            Op::MaxRaise { .. } => OpKind::MaxRaise,
            Op::MaxSet { .. } => OpKind::MaxSet,
            Op::SetAdd { .. } => OpKind::SetAdd,
            Op::SetRemove { .. } => OpKind::SetRemove,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_kind_round_trips_through_u8() {
        for kind in OpKind::ALL {
            assert_eq!(OpKind::from_u8(kind as u8), Some(kind));
        }
        assert_eq!(OpKind::from_u8(0), None);
        assert_eq!(OpKind::from_u8(200), None);
        for ty in ValueType::ALL {
            assert_eq!(ValueType::from_u8(ty as u8), Some(ty));
        }
    }

    #[test]
    fn exactly_the_documented_ops_commute() {
        let commuting: Vec<OpKind> = OpKind::ALL.into_iter().filter(|k| k.commutes()).collect();
        assert_eq!(
            commuting,
            vec![
                OpKind::CounterAdd,
                OpKind::BoundedAdd,
                OpKind::MaxRaise,
                OpKind::SetAdd
            ]
        );
    }
}
