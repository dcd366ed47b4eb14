//! Raft-ordered commands and the frontier they carry.
//!
//! A command is what the consensus path applies: every non-commutative op, every op on a
//! `strict` key, escrow-exhausted adds, pool grants and key creation. Commands are applied in
//! Raft log order on every replica, so anything they compute from *Raft-ordered* state alone is
//! identical everywhere. Fast-path facts are not ordered against them, which is why a command
//! carries a [`KeyFrontier`]: the exact facts on its key that the proposer had applied. The
//! command's effect is defined relative to that frontier (observed-reset, DESIGN.md section 2):
//! facts inside it are absorbed, facts outside it apply on top. A replica applies a command only
//! once it has applied every fact inside the frontier (`Replica::apply_command` reports
//! `Blocked` otherwise), so the effect never depends on delivery timing.

use crate::clock::{HlcTimestamp, NodeId};
use crate::value::{Bounds, CasExpect, ValueType};
use serde::{Deserialize, Serialize};

/// One origin's contribution to a key as the proposer saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FrontierEntry {
    pub origin: NodeId,
    /// Highest sequence of this origin's facts *on this key* the proposer had applied.
    pub seq: u64,
    /// For counters and bounded counters: the sum of those facts' deltas. 0 otherwise.
    pub total: i64,
}

/// The facts on one key a command observed, one entry per origin, sorted by origin.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyFrontier {
    pub entries: Vec<FrontierEntry>,
}

/// Node id 0 is reserved, so an entry for it is never a fact: it carries the generation of
/// the key the frontier was taken on (see `state.rs`, "Deletes and generations"). Commands
/// on generation 0 (every key never recreated with another type) have no such entry, which
/// keeps their encoding what it was before deletes existed.
const GENERATION_ORIGIN: NodeId = 0;

impl KeyFrontier {
    pub fn seq_of(&self, origin: NodeId) -> u64 {
        self.entries
            .iter()
            .find(|e| e.origin == origin)
            .map_or(0, |e| e.seq)
    }

    pub fn total_of(&self, origin: NodeId) -> i64 {
        self.entries
            .iter()
            .find(|e| e.origin == origin)
            .map_or(0, |e| e.total)
    }

    /// The generation of the key this frontier was taken on.
    pub fn generation(&self) -> u64 {
        match self.entries.first() {
            Some(e) if e.origin == GENERATION_ORIGIN => e.seq,
            _ => 0,
        }
    }

    /// Record the key's generation (entries stay sorted by origin: 0 sorts first).
    pub fn with_generation(mut self, generation: u64) -> KeyFrontier {
        debug_assert_eq!(self.generation(), 0, "one generation per frontier");
        if generation > 0 {
            self.entries.insert(
                0,
                FrontierEntry {
                    origin: GENERATION_ORIGIN,
                    seq: generation,
                    total: 0,
                },
            );
        }
        self
    }

    /// The entries that name facts (without the generation's).
    pub fn facts(&self) -> &[FrontierEntry] {
        match self.entries.first() {
            Some(e) if e.origin == GENERATION_ORIGIN => &self.entries[1..],
            _ => &self.entries,
        }
    }
}

/// A register write that won last-writer-wins among the facts a command observed; the
/// command carries it so every replica absorbs the same value (see `state.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LwwWrite {
    pub hlc: HlcTimestamp,
    pub origin: NodeId,
    /// `None` is a delete.
    pub value: Option<Vec<u8>>,
}

/// What a command does. Bodies name their type, so a command on a key that does not exist yet
/// creates it with that type (the key's type is always fixed in Raft order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandBody {
    RegisterPut {
        value: Vec<u8>,
    },
    RegisterDelete,
    RegisterCas {
        expect: CasExpect,
        value: Option<Vec<u8>>,
    },
    /// Create a key of `value_type` (bounded counters need `bounds`) if absent. Proposed before
    /// a key's first fast-path write; a no-op when the key exists with that type.
    Create {
        value_type: ValueType,
        bounds: Option<Bounds>,
    },
    CounterAdd {
        delta: i64,
    },
    CounterSet {
        value: i64,
    },
    /// An add ordered by Raft and paid from the key's pool (strict mode, or beyond the local
    /// quota). Refused when the pool cannot cover it.
    BoundedAdd {
        delta: i64,
        bounds: Bounds,
    },
    BoundedSet {
        value: i64,
        bounds: Bounds,
    },
    BoundedSetBounds {
        bounds: Bounds,
    },
    /// Move rights from the key's pool to `node`'s quota.
    EscrowGrant {
        node: NodeId,
        down: i64,
        up: i64,
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
    /// Delete the key, whatever its type (observed-reset: what the frontier names is gone,
    /// facts it did not observe stay; see `state.rs`, "Deletes and generations"). Appended
    /// last so the encoding of every older body is unchanged.
    Delete,
}

impl CommandBody {
    /// The type a body writes; `None` for a delete, which applies to any type.
    pub const fn value_type(&self) -> Option<ValueType> {
        Some(match self {
            CommandBody::RegisterPut { .. }
            | CommandBody::RegisterDelete
            | CommandBody::RegisterCas { .. } => ValueType::Register,
            CommandBody::Create { value_type, .. } => *value_type,
            CommandBody::CounterAdd { .. } | CommandBody::CounterSet { .. } => ValueType::Counter,
            CommandBody::BoundedAdd { .. }
            | CommandBody::BoundedSet { .. }
            | CommandBody::BoundedSetBounds { .. }
            | CommandBody::EscrowGrant { .. } => ValueType::BoundedCounter,
            CommandBody::MaxRaise { .. } | CommandBody::MaxSet { .. } => ValueType::Max,
            CommandBody::SetAdd { .. } | CommandBody::SetRemove { .. } => ValueType::Set,
            CommandBody::Delete => return None,
        })
    }

    /// Bounds to use if this command creates a bounded counter.
    pub const fn creation_bounds(&self) -> Option<Bounds> {
        match self {
            CommandBody::Create { bounds, .. } => *bounds,
            CommandBody::BoundedAdd { bounds, .. }
            | CommandBody::BoundedSet { bounds, .. }
            | CommandBody::BoundedSetBounds { bounds }
            | CommandBody::EscrowGrant { bounds, .. } => Some(*bounds),
            _ => None,
        }
    }
}

/// A Raft-ordered command on one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub key: Vec<u8>,
    /// Stamped by the proposer; orders Raft register writes against LWW facts.
    pub hlc: HlcTimestamp,
    pub proposer: NodeId,
    pub body: CommandBody,
    /// Facts on `key` the proposer had applied.
    pub frontier: KeyFrontier,
    /// The LWW register write among those facts that the proposer saw winning, if any.
    pub absorb: Option<LwwWrite>,
}
