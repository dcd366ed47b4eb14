//! Why the kernel refuses an operation, in words a user can act on.
//!
//! Refusals are values, not strings: the classifier and the apply path produce a `Refusal`
//! (cheap, `Copy`, no allocation) and the text is rendered only when someone reads it, with the
//! key it concerns. Each refusal maps to one gRPC status code (DESIGN.md section 10), so the
//! node never has to guess.

use crate::value::{Bounds, Mode, OpKind, ValueType};
use std::fmt;

/// The gRPC status a refusal maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusCode {
    InvalidArgument,
    FailedPrecondition,
    ResourceExhausted,
    /// Transient: retrying shortly succeeds.
    Unavailable,
    /// A conflict with a concurrent change; nothing happened, retrying the whole op is safe.
    Aborted,
}

/// Which escrow rights were short.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Rights to decrement (towards `min`).
    Down,
    /// Rights to increment (towards `max`).
    Up,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The key already has another type.
    TypeMismatch { key_type: ValueType, op: OpKind },
    /// Compare-and-set on a key in `available` mode.
    CasInAvailableMode,
    /// A non-commutative op on a key in `available` mode, which never coordinates.
    NeedsConsensus { key_type: ValueType, op: OpKind },
    /// A bounded add that neither the local quota (in `available` mode) nor the key's pool
    /// (on the consensus path) can cover without crossing a bound.
    EscrowExhausted {
        direction: Direction,
        needed: i64,
        available: i64,
        bounds: Bounds,
    },
    /// A bounded set or add whose target lies outside the bounds.
    OutOfBounds { value: i64, bounds: Bounds },
    /// A bounds change that would strand quota already handed to nodes.
    BoundsChangeStrandsQuota { bounds: Bounds, short_by: i64 },
    /// A bounded counter op arrived without bounds (no rule gives the key bounds).
    MissingBounds,
    /// Arithmetic would overflow a signed 64-bit value.
    Overflow { op: OpKind },
    /// An escrow grant or transfer of a negative amount, or of nothing.
    BadAmount,
    /// Bounds whose span does not fit a signed 64-bit value (escrow counts rights in i64).
    BoundsTooWide { bounds: Bounds },
    /// This node's own earlier facts are still waiting to be re-applied (after a restart,
    /// escrow spends wait for the Raft grants that funded them). A new fact now would take a
    /// sequence number one of them holds, so fast-path admission pauses until they apply.
    OwnFactsPending { waiting: usize },
    /// A command prepared against a key that was deleted and recreated (a new generation)
    /// before it was ordered: what it observed is gone, so it was not applied.
    KeyRecreated,
    /// A transaction's comparison that does not apply to the key's type (a version test on
    /// a counter).
    CompareMismatch {
        key_type: ValueType,
        test: crate::txn::TestKind,
    },
}

impl Refusal {
    pub const fn status(self) -> StatusCode {
        match self {
            Refusal::TypeMismatch { .. }
            | Refusal::CasInAvailableMode
            | Refusal::NeedsConsensus { .. }
            | Refusal::BoundsChangeStrandsQuota { .. }
            | Refusal::MissingBounds
            | Refusal::CompareMismatch { .. } => StatusCode::FailedPrecondition,
            Refusal::EscrowExhausted { .. } => StatusCode::ResourceExhausted,
            Refusal::OutOfBounds { .. }
            | Refusal::Overflow { .. }
            | Refusal::BadAmount
            | Refusal::BoundsTooWide { .. } => StatusCode::InvalidArgument,
            Refusal::OwnFactsPending { .. } => StatusCode::Unavailable,
            Refusal::KeyRecreated => StatusCode::Aborted,
        }
    }

    /// Render with the key it concerns.
    pub fn on_key(self, key: &[u8]) -> KeyRefusal<'_> {
        KeyRefusal { key, refusal: self }
    }
}

/// A refusal with its key, ready to print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRefusal<'a> {
    pub key: &'a [u8],
    pub refusal: Refusal,
}

impl fmt::Display for KeyRefusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = DisplayKey(self.key);
        match self.refusal {
            Refusal::TypeMismatch { key_type, op } => write!(
                f,
                "key '{key}' is {}; {} is an operation on {}, use a different key or an operation of {}",
                key_type.with_article(),
                op.verb(),
                op.value_type().with_article(),
                key_type.with_article()
            ),
            Refusal::CasInAvailableMode => write!(
                f,
                "key '{key}' is in {} mode, where compare-and-set is refused because it needs consensus; \
                 change the key's rule to hybrid or strict, or use put",
                Mode::Available
            ),
            Refusal::NeedsConsensus { key_type, op } => write!(
                f,
                "key '{key}' is {}; {} requires consensus, but the key is in {} mode, which never \
                 coordinates; change the key's rule to hybrid or strict",
                key_type.with_article(),
                op.verb(),
                Mode::Available
            ),
            Refusal::EscrowExhausted {
                direction,
                needed,
                available,
                bounds,
            } => {
                let (what, bound) = match direction {
                    Direction::Down => ("decrement", bounds.min),
                    Direction::Up => ("increment", bounds.max),
                };
                write!(
                    f,
                    "key '{key}' is a bounded counter {bounds}: a {what} by {needed} would cross {bound}; \
                     only {available} can be granted now, retry later or with a smaller amount"
                )
            }
            Refusal::OutOfBounds { value, bounds } => write!(
                f,
                "key '{key}' is a bounded counter {bounds}; {value} lies outside the bounds"
            ),
            Refusal::BoundsChangeStrandsQuota { bounds, short_by } => write!(
                f,
                "key '{key}': bounds cannot become {bounds}, nodes hold {short_by} more escrow quota than \
                 the new bounds leave room for; spend or return quota first, or choose wider bounds"
            ),
            Refusal::MissingBounds => write!(
                f,
                "key '{key}' would be a bounded counter but no bounds are known; add a rule with \
                 type bounded_counter and bounds for it"
            ),
            Refusal::Overflow { op } => write!(
                f,
                "key '{key}': {} would overflow a signed 64-bit value",
                op.verb()
            ),
            Refusal::BadAmount => write!(f, "key '{key}': escrow amounts must be positive"),
            Refusal::BoundsTooWide { bounds } => write!(
                f,
                "key '{key}': bounds {bounds} span more than {}; choose narrower bounds",
                i64::MAX
            ),
            Refusal::OwnFactsPending { waiting } => write!(
                f,
                "key '{key}': this node is still re-applying {waiting} of its own earlier writes after a restart \
                 (they wait for escrow rights its Raft groups restore); retry in a moment or at another node"
            ),
            Refusal::KeyRecreated => write!(
                f,
                "key '{key}' was deleted and recreated while this write was on its way, so it was not applied; \
                 read the key again and retry"
            ),
            Refusal::CompareMismatch { key_type, test } => write!(
                f,
                "key '{key}' is {}, but {} applies to {} only; test this key's existence or type instead",
                key_type.with_article(),
                test.name(),
                test.applies_to()
            ),
        }
    }
}

/// Keys are bytes; show them as text when they are printable UTF-8, else escaped.
#[derive(Clone, Copy, Debug)]
pub struct DisplayKey<'a>(pub &'a [u8]);

impl fmt::Display for DisplayKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(self.0) {
            Ok(s) if !s.chars().any(char::is_control) => f.write_str(s),
            _ => {
                for &b in self.0 {
                    for c in std::ascii::escape_default(b) {
                        f.write_str(std::str::from_utf8(&[c]).unwrap_or("?"))?;
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_key_and_the_way_out() {
        let r = Refusal::NeedsConsensus {
            key_type: ValueType::BoundedCounter,
            op: OpKind::BoundedSet,
        };
        assert_eq!(
            r.on_key(b"stock:42").to_string(),
            "key 'stock:42' is a bounded counter; set requires consensus, but the key is in available \
             mode, which never coordinates; change the key's rule to hybrid or strict"
        );
        let r = Refusal::TypeMismatch {
            key_type: ValueType::Counter,
            op: OpKind::SetAdd,
        };
        assert_eq!(
            r.on_key(b"hits").to_string(),
            "key 'hits' is a counter; add element is an operation on a set, use a different key or an \
             operation of a counter"
        );
        assert_eq!(DisplayKey(b"a\x00\xff").to_string(), "a\\x00\\xff");
    }
}
