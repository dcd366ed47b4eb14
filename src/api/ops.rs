//! Client ops and values on the wire (`calm.v1`) to and from the kernel's.

use super::{check_payload, invalid, pb};
use crate::node::{Node, lock};
use calm_kernel::refusal::Refusal;
use calm_kernel::{Bounds, CasExpect, KeyState, Op, Replica, Value, ValueType};
use tonic::Status;

/// The kernel op for a client op on `key`: counter ops apply to bounded counters too (the
/// key's type, or else its rule's type, decides), and a rule's type is enforced on creation.
pub(super) fn kernel_op(node: &Node, key: &[u8], op: Option<pb::op::Kind>) -> Result<Op, Status> {
    kernel_op_on(lock(&node.local).replica(), key, op)
}

/// [`kernel_op`] against a replica the caller has locked.
pub(super) fn kernel_op_on(
    replica: &Replica,
    key: &[u8],
    op: Option<pb::op::Kind>,
) -> Result<Op, Status> {
    use pb::op::Kind;
    let op = op.ok_or_else(|| {
        invalid("the request has no op; set exactly one of put, delete, cas, add, set_value, set_bounds, raise, set_max, set_add, set_remove")
    })?;
    let existing = replica.key_state(key).map(KeyState::value_type);
    let rule_type = replica.rules().resolve(key).value_type;
    let bounded = existing.or(rule_type) == Some(ValueType::BoundedCounter);
    let op = match op {
        Kind::Put(p) => {
            check_payload("value", &p.value)?;
            Op::RegisterPut { value: p.value }
        }
        Kind::Delete(_) => Op::RegisterDelete,
        Kind::Cas(c) => {
            use pb::cas::Expect;
            let expect = match c.expect {
                None | Some(Expect::Absent(true)) => CasExpect::Version(0),
                Some(Expect::Absent(false)) => {
                    return Err(invalid(
                        "cas: absent = false says nothing; expect a version or a value instead",
                    ));
                }
                Some(Expect::Version(v)) => CasExpect::Version(v),
                Some(Expect::Value(v)) => {
                    check_payload("expected value", &v)?;
                    CasExpect::Value(Some(v))
                }
            };
            check_payload("value", &c.new_value)?;
            if c.delete && !c.new_value.is_empty() {
                return Err(invalid(
                    "cas: delete = true with a new_value; set one of them",
                ));
            }
            Op::RegisterCas {
                expect,
                value: (!c.delete).then_some(c.new_value),
            }
        }
        Kind::Add(a) if bounded => Op::BoundedAdd { delta: a.delta },
        Kind::Add(a) => Op::CounterAdd { delta: a.delta },
        Kind::SetValue(s) if bounded => Op::BoundedSet { value: s.value },
        Kind::SetValue(s) => Op::CounterSet { value: s.value },
        Kind::SetBounds(b) => Op::BoundedSetBounds {
            bounds: Bounds::new(b.min, b.max).ok_or_else(|| {
                invalid(format!("set_bounds: min {} is above max {}", b.min, b.max))
            })?,
        },
        Kind::Raise(r) => Op::MaxRaise { value: r.value },
        Kind::SetMax(s) => Op::MaxSet { value: s.value },
        Kind::SetAdd(s) => {
            check_payload("element", &s.element)?;
            Op::SetAdd { element: s.element }
        }
        Kind::SetRemove(s) => {
            check_payload("element", &s.element)?;
            Op::SetRemove { element: s.element }
        }
    };
    // A delete applies to any type, so a rule's type never refuses it.
    if existing.is_none()
        && !matches!(op, Op::RegisterDelete)
        && let Some(t) = rule_type
        && op_type(&op) != t
    {
        let refusal = Refusal::TypeMismatch {
            key_type: t,
            op: op.kind(),
        };
        return Err(Status::failed_precondition(format!(
            "{} (the key's rule fixes its type)",
            refusal.on_key(key)
        )));
    }
    Ok(op)
}

fn op_type(op: &Op) -> ValueType {
    match op {
        Op::RegisterPut { .. } | Op::RegisterDelete | Op::RegisterCas { .. } => ValueType::Register,
        Op::CounterAdd { .. } | Op::CounterSet { .. } => ValueType::Counter,
        Op::BoundedAdd { .. } | Op::BoundedSet { .. } | Op::BoundedSetBounds { .. } => {
            ValueType::BoundedCounter
        }
        Op::MaxRaise { .. } | Op::MaxSet { .. } => ValueType::Max,
        Op::SetAdd { .. } | Op::SetRemove { .. } => ValueType::Set,
    }
}

/// The client-visible value; `None` for a deleted (or never written) register.
pub(super) fn value_to_pb(value: Value) -> Option<pb::Value> {
    use pb::value::Kind;
    let kind = match value {
        Value::Register { value: None, .. } => return None,
        Value::Register {
            value: Some(value),
            version,
            hlc,
        } => Kind::Register(pb::value::Register {
            value,
            version,
            hlc: hlc.as_u64(),
        }),
        Value::Counter(v) => Kind::Counter(v),
        Value::Bounded { value, bounds } => Kind::Bounded(pb::value::Bounded {
            value,
            min: bounds.min,
            max: bounds.max,
        }),
        Value::Max(value) => Kind::Max(pb::value::MaxValue { value }),
        Value::Set(elements) => Kind::Set(pb::value::SetValue { elements }),
    };
    Some(pb::Value { kind: Some(kind) })
}
