//! A transaction on this node: checked and parsed, stamped with what this node observed on
//! each key, proposed to its subject's group as one Raft command, and answered.
//!
//! What a transaction means (comparisons on Raft-ordered state plus the facts observed here,
//! all-or-nothing branches) is the kernel's (`calm_kernel::txn`); this module owns the
//! rules a request must meet before anything is proposed: one subject, no `available` key,
//! each key once per branch, the limits. docs/txn.md is the user's account of both.

use super::ops::kernel_op_on;
use super::{check_key, invalid, pb, refused};
use crate::node::{Node, lock};
use crate::token::SessionToken;
use calm_kernel::refusal::DisplayKey;
use calm_kernel::txn::{TXN_COMPARES_MAX, TXN_OPS_MAX};
use calm_kernel::{Cmp, Mode, Op, Test, Txn, ValueType};
use calm_raft::consensus::{Request, Response};
use std::sync::Arc;
use tonic::{Code, Status};

impl Node {
    pub async fn txn(&self, mut req: pb::TxnRequest) -> Result<pb::TxnResponse, Status> {
        crate::faults::drop_txn_op(&mut req);
        if req.compare.len() > TXN_COMPARES_MAX {
            return Err(invalid(format!(
                "the transaction has {} comparisons; at most {TXN_COMPARES_MAX}",
                req.compare.len()
            )));
        }
        for (name, branch) in [("success", &req.success), ("failure", &req.failure)] {
            if branch.len() > TXN_OPS_MAX {
                return Err(invalid(format!(
                    "the transaction's {name} branch has {} ops; at most {TXN_OPS_MAX} per branch",
                    branch.len()
                )));
            }
            for (i, op) in branch.iter().enumerate() {
                if branch[..i].iter().any(|o| o.key == op.key) {
                    return Err(invalid(format!(
                        "the transaction's {name} branch writes key '{}' twice; each key at most once per branch (combine the ops)",
                        DisplayKey(&op.key)
                    )));
                }
            }
        }
        let keys: Vec<&[u8]> = req
            .compare
            .iter()
            .map(|c| c.key.as_slice())
            .chain(
                req.success
                    .iter()
                    .chain(&req.failure)
                    .map(|o| o.key.as_slice()),
            )
            .collect();
        let Some(&first) = keys.first() else {
            return Err(invalid(
                "the transaction names no key; give it at least one comparison or op",
            ));
        };
        for key in &keys {
            check_key(key)?;
        }
        self.check_one_subject(&keys)?;
        let tests = req
            .compare
            .iter()
            .enumerate()
            .map(|(i, c)| test_of(c).map_err(|m| invalid(format!("comparison {i}: {m}"))))
            .collect::<Result<Vec<Test>, Status>>()?;
        let group = self.consensus.group_map().group_of(first);
        let attach = self.txn_attachments(&req, group)?;
        self.await_write_token(first, &req.token).await?;

        let hlc = self.hlc.now();
        let (txn, barrier) = {
            let mut local = lock(&self.local);
            let replica = local.replica();
            for key in &keys {
                if replica.rules().resolve(key).mode == Mode::Available {
                    return Err(Status::failed_precondition(format!(
                        "key '{}' is in {} mode, where transactions are refused because they need consensus; change the key's rule to hybrid or strict",
                        DisplayKey(key),
                        Mode::Available
                    )));
                }
            }
            let prepare = |name: &str, branch: &[pb::TxnOp]| {
                branch
                    .iter()
                    .enumerate()
                    .map(|(i, o)| {
                        let at = |s: Status| Status::new(s.code(), format!("{name} op {i}: {}", s.message()));
                        let op = kernel_op_on(replica, &o.key, o.op.clone().and_then(|o| o.kind)).map_err(at)?;
                        if matches!(op, Op::RegisterCas { .. }) {
                            return Err(invalid(format!(
                                "{name} op {i}: cas inside a transaction; compare the key's value or version and put instead"
                            )));
                        }
                        replica
                            .prepare_command(&o.key, &op, hlc)
                            .map_err(|r| at(refused(r)))
                    })
                    .collect::<Result<Vec<_>, Status>>()
            };
            let txn = Txn {
                hlc,
                proposer: self.id(),
                compares: req
                    .compare
                    .iter()
                    .zip(tests)
                    .map(|(c, test)| replica.prepare_compare(&c.key, test))
                    .collect(),
                success: prepare("success", &req.success)?,
                failure: prepare("failure", &req.failure)?,
            };
            let barrier = local
                .own_facts_barrier()
                .unwrap_or_else(|e| crate::node::fatal("appending a WAL barrier", &e));
            (txn, barrier)
        };
        // The comparisons may have observed own facts not yet durable (as a command may).
        self.own_facts_durable(barrier).await;
        let request = if attach.is_empty() {
            Request::Txn(Arc::new(txn))
        } else {
            Request::TxnLeased {
                txn: Arc::new(txn),
                attach: attach.into(),
            }
        };
        let proposed = self
            .consensus
            .propose_to(group, request)
            .await
            .map_err(|e| self.unavailable(e))?;
        metrics::counter!("calm_txns_total").increment(1);
        self.issue_index(proposed.group, proposed.index);
        let token = SessionToken::of_entry(proposed.group, proposed.index).encode();
        match proposed.response {
            Response::Txn { succeeded, results } => Ok(pb::TxnResponse {
                succeeded,
                results: results
                    .into_iter()
                    .map(|r| match r {
                        Response::Done { version } => pb::TxnResult {
                            version,
                            deleted: false,
                        },
                        Response::Deleted { version, existed } => pb::TxnResult {
                            version,
                            deleted: existed,
                        },
                        _ => pb::TxnResult::default(),
                    })
                    .collect(),
                token,
            }),
            Response::Refused { code, message } => Err(Status::new(Code::from_i32(code), message)),
            other => Err(Status::internal(format!(
                "a transaction was answered {other:?} (a bug); its outcome is unknown, read its keys to see"
            ))),
        }
    }

    /// The keys the transaction's ops attach to leases: only puts, to leases of `group`
    /// (the transaction's one subject's); the leases themselves are checked where the
    /// transaction applies.
    fn txn_attachments(
        &self,
        req: &pb::TxnRequest,
        group: u64,
    ) -> Result<Vec<(bool, u32, calm_kernel::LeaseId)>, Status> {
        let mut attach = Vec::new();
        for (success, name, branch) in [
            (true, "success", &req.success),
            (false, "failure", &req.failure),
        ] {
            for (i, op) in branch.iter().enumerate().filter(|(_, o)| o.lease != 0) {
                if !matches!(
                    op.op.as_ref().and_then(|o| o.kind.as_ref()),
                    Some(pb::op::Kind::Put(_))
                ) {
                    return Err(invalid(format!(
                        "{name} op {i} carries a lease, but only a put attaches a key to a lease inside a transaction"
                    )));
                }
                self.lease_group_of(op.lease)?;
                if calm_kernel::lease::lease_group(op.lease) != group {
                    return Err(Status::failed_precondition(format!(
                        "{name} op {i}: lease {:x} is not of the transaction's subject (its id is of another group's); grant the lease for the keys' subject",
                        op.lease
                    )));
                }
                attach.push((success, i as u32, op.lease));
            }
        }
        Ok(attach)
    }

    /// FAILED_PRECONDITION unless every key has the subject of the first.
    fn check_one_subject(&self, keys: &[&[u8]]) -> Result<(), Status> {
        let map = self.consensus.group_map();
        let mut subjects: Vec<&[u8]> = keys.iter().map(|k| map.subject(k)).collect();
        subjects.sort_unstable();
        subjects.dedup();
        if subjects.len() <= 1 {
            return Ok(());
        }
        const NAMED_MAX: usize = 4;
        let named: Vec<String> = subjects
            .iter()
            .take(NAMED_MAX)
            .map(|s| format!("'{}'", DisplayKey(s)))
            .collect();
        let more = match subjects.len().saturating_sub(NAMED_MAX) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        let fix = if map.hash_tags() {
            format!(
                "give the keys one hash tag so they share a subject, e.g. '{{{0}}}:a' and '{{{0}}}:b' (docs/subjects.md)",
                DisplayKey(subjects[0])
            )
        } else {
            "this cluster was created without hash tags, so every key is its own subject: enable them as docs/subjects.md describes, then give the keys one hash tag".to_string()
        };
        Err(Status::failed_precondition(format!(
            "a transaction's keys must share one subject (one Raft group orders it), but they have subjects {}{more}; {fix}",
            named.join(", ")
        )))
    }
}

/// The kernel test a wire comparison asks for; `Err` says what is wrong with it.
fn test_of(compare: &pb::Compare) -> Result<Test, String> {
    use pb::compare::Test as T;
    let cmp = |op: i32| match pb::CompareOp::try_from(op) {
        Ok(pb::CompareOp::Equal) => Ok(Cmp::Equal),
        Ok(pb::CompareOp::NotEqual) => Ok(Cmp::NotEqual),
        Ok(pb::CompareOp::Less) => Ok(Cmp::Less),
        Ok(pb::CompareOp::Greater) => Ok(Cmp::Greater),
        Err(_) => Err(format!(
            "operator {op} is not one of EQUAL (0), GREATER (1), LESS (2), NOT_EQUAL (3)"
        )),
    };
    match &compare.test {
        None => Err(
            "no test; set exactly one of exists, type, version, value, counter".to_string(),
        ),
        Some(T::Exists(e)) => Ok(Test::Exists(*e)),
        Some(T::Type(t)) => u8::try_from(*t)
            .ok()
            .and_then(ValueType::from_u8)
            .map(Test::Type)
            .ok_or_else(|| {
                format!("type {t} is not one of REGISTER (1), COUNTER (2), BOUNDED_COUNTER (3), MAX (4), SET (5)")
            }),
        Some(T::Version(v)) => Ok(Test::Version(cmp(v.op)?, v.version)),
        Some(T::Value(v)) => {
            super::check_payload("compared value", &v.value).map_err(|s| s.message().to_string())?;
            Ok(Test::Value(cmp(v.op)?, v.value.clone()))
        }
        Some(T::Counter(r)) => {
            let (min, max) = (r.min.unwrap_or(i64::MIN), r.max.unwrap_or(i64::MAX));
            if min > max {
                return Err(format!("counter range min {min} is above max {max}"));
            }
            Ok(Test::Counter { min, max })
        }
    }
}
