//! A write on this node: classify and admit (fast path) or prepare and propose (consensus),
//! escrow top-ups and loans, and the answers: a response with its session token, or a
//! status with the leader hint.

use super::ops::{kernel_op, kernel_op_on};
use super::{BATCH_OPS_PER_LOCK_MAX, check_key, insert_leader_hint, pb, refused};
use crate::node::{Node, fatal, lock};
use crate::token::SessionToken;
use calm_kernel::lease::LeaseId;
use calm_kernel::{Admitted, Command, FactId, KeyState, Op};
use calm_raft::consensus::{ProposeError, Request, Response};
use calm_raft::local::{FastAdmit, LocalAdmit};
use calm_raft::wal::AppendTicket;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Rounds of gathering escrow rights (a pool grant, asks to peers) for one refused spend.
const ESCROW_GATHER_ROUNDS_MAX: usize = 4;

/// Pause between two rounds of asking the peers.
const ESCROW_GATHER_PAUSE: Duration = Duration::from_millis(50);
use tonic::{Code, Status};

/// A Batch's ops on one key, in call order: (index in the call, op, session token).
pub(super) type KeyOps = Vec<(usize, Option<pb::op::Kind>, Vec<u8>)>;

/// A write admitted and waiting for its durability or its Raft round.
pub(super) enum Pending {
    Fast {
        durable: AppendTicket,
        fact: Vec<u8>,
        id: FactId,
        escrow: bool,
        group: u64,
        /// For a delete (an LWW fact): whether the key had a value here.
        deleted: bool,
    },
    Consensus {
        cmd: Command,
        /// To await before proposing (own facts the command observed, not yet durable).
        barrier: Option<(AppendTicket, u64)>,
        /// The lease the write attaches its key to (`api/lease.rs`).
        lease: Option<LeaseId>,
    },
}

impl Node {
    /// Classify and admit (fast path) or prepare (consensus) one op. Synchronous: ops of one
    /// caller are admitted in call order.
    pub(super) fn admit(&self, key: &[u8], op: &Op) -> Result<Pending, Status> {
        self.request_refill(key, op);
        let hlc = self.hlc.now();
        let mut local = lock(&self.local);
        let deleted = deletes_a_value(local.replica(), key, op);
        match local.admit(key, op, hlc) {
            Err(e) => fatal("appending a fact to the WAL", &e),
            Ok(Err(r)) => Err(refused(r)),
            Ok(Ok(LocalAdmit {
                admitted: Admitted::Local { id, escrow },
                durable,
                fact,
            })) => Ok(Pending::Fast {
                durable: durable.expect("a local fact is appended to the WAL"),
                fact,
                id,
                escrow,
                group: self.consensus.group_map().group_of(key),
                deleted,
            }),
            Ok(Ok(LocalAdmit {
                admitted: Admitted::Consensus(_),
                ..
            })) => consensus_pending(&mut local, key, op, hlc, None),
        }
    }

    /// Prepare a write that attaches `key` to `lease`: always a Raft command (a leased key
    /// takes no fast path), checked by `check_leased_write`.
    fn prepare_leased(&self, key: &[u8], op: &Op, lease: LeaseId) -> Result<Pending, Status> {
        let hlc = self.hlc.now();
        consensus_pending(&mut lock(&self.local), key, op, hlc, Some(lease))
    }

    /// Wait until the own facts a command observed are durable (see
    /// `LocalState::own_facts_barrier`): only then may it be proposed.
    pub(crate) async fn own_facts_durable(&self, barrier: Option<(AppendTicket, u64)>) {
        if let Some((ticket, seq)) = barrier {
            if let Err(e) = ticket.await {
                fatal("making own facts durable before a Raft command", &e);
            }
            lock(&self.local).own_facts_durable_through(seq);
        }
    }

    /// A bounded counter op tops up this node's escrow quota in the background (see
    /// escrow.rs).
    fn request_refill(&self, key: &[u8], op: &Op) {
        if matches!(
            op,
            Op::BoundedAdd { .. } | Op::BoundedSet { .. } | Op::BoundedSetBounds { .. }
        ) {
            self.refills.request(key);
        }
    }

    /// Phase one of a Batch: admit each key's leading fast-path ops (up to its first op
    /// that carries a session token, needs consensus or is refused) under the state lock,
    /// released every `BATCH_OPS_PER_LOCK_MAX` admissions, their facts appended to the WAL
    /// together. An op that does not parse is answered in `done`
    /// and its key goes on, as in `write`. Returns the admitted facts with their op's index
    /// and group, the ticket that makes all of them durable, and each key's remaining ops.
    #[allow(clippy::type_complexity)]
    pub(super) fn admit_leading_fast(
        &self,
        by_key: BTreeMap<Vec<u8>, KeyOps>,
        done: &mut Vec<(usize, Result<pb::WriteResponse, Status>)>,
    ) -> (
        Vec<(usize, FastAdmit, u64, bool)>,
        Option<AppendTicket>,
        Vec<(Vec<u8>, KeyOps)>,
    ) {
        let group_map = self.consensus.group_map();
        let mut fast = Vec::new();
        let mut rest = Vec::new();
        let mut durable = None;
        let mut local = lock(&self.local);
        let mut batch = local.fast_batch();
        let mut admitted_in_hold = 0;
        for (key, mut ops) in by_key {
            if let Err(e) = check_key(&key) {
                done.extend(ops.into_iter().map(|(i, _, _)| (i, Err(e.clone()))));
                continue;
            }
            let group = group_map.group_of(&key);
            let mut taken = 0;
            for (i, raw, token) in &ops {
                if !token.is_empty() {
                    break;
                }
                match kernel_op_on(batch.replica(), &key, raw.clone()) {
                    Err(e) => done.push((*i, Err(e))),
                    Ok(op) => {
                        self.request_refill(&key, &op);
                        let deleted = deletes_a_value(batch.replica(), &key, &op);
                        match batch.admit(&key, &op, self.hlc.now()) {
                            Ok(Some(admitted)) => fast.push((*i, admitted, group, deleted)),
                            Ok(None) => break,
                            Err(e) => fatal("appending a fact to the WAL", &e),
                        }
                        admitted_in_hold += 1;
                    }
                }
                taken += 1;
                if admitted_in_hold == BATCH_OPS_PER_LOCK_MAX {
                    // Let Raft applies and other clients in between (WAL batches are durable
                    // in order, so the last ticket still covers every fact of the call).
                    durable = batch
                        .finish()
                        .unwrap_or_else(|e| fatal("appending a batch's facts to the WAL", &e))
                        .or(durable);
                    drop(local);
                    local = lock(&self.local);
                    batch = local.fast_batch();
                    admitted_in_hold = 0;
                }
            }
            if taken < ops.len() {
                ops.drain(..taken);
                rest.push((key, ops));
            }
        }
        let durable = batch
            .finish()
            .unwrap_or_else(|e| fatal("appending a batch's facts to the WAL", &e))
            .or(durable);
        (fast, durable, rest)
    }

    /// The answer to a fast-path write of fact `id` in `group`, once it is durable.
    pub(super) fn fast_response(
        &self,
        id: FactId,
        escrow: bool,
        group: u64,
        deleted: bool,
    ) -> pb::WriteResponse {
        pb::WriteResponse {
            path: if escrow {
                pb::Path::Escrow
            } else {
                pb::Path::Fast
            } as i32,
            succeeded: true,
            version: 0,
            token: {
                // The fact lands on top of whatever Raft writes this node already
                // acknowledged or applied in the key's group: a reader of the token must see
                // those too.
                let mut token = SessionToken::of_fact(id);
                let index = self.issue_index(group, self.applied_index(group));
                token.merge(&SessionToken::of_entry(group, index));
                token.encode()
            },
            deleted,
        }
    }

    pub(super) async fn finish(&self, pending: Pending) -> Result<pb::WriteResponse, Status> {
        match pending {
            Pending::Fast {
                durable,
                fact,
                id,
                escrow,
                group,
                deleted,
            } => {
                if let Err(e) = durable.await {
                    fatal("making a fact durable", &e);
                }
                self.gossip.publish(fact);
                metrics::counter!("calm_writes_total", "path" => if escrow { "escrow" } else { "fast" })
                    .increment(1);
                Ok(self.fast_response(id, escrow, group, deleted))
            }
            Pending::Consensus {
                cmd,
                barrier,
                lease,
            } => {
                self.own_facts_durable(barrier).await;
                let proposed = match lease {
                    None => self.consensus.propose(cmd).await,
                    Some(lease) => {
                        let group = self.consensus.group_map().group_of(&cmd.key);
                        let cmd = Arc::new(cmd);
                        self.consensus
                            .propose_to(group, Request::Leased { cmd, lease })
                            .await
                    }
                }
                .map_err(|e| self.unavailable(e))?;
                metrics::counter!("calm_writes_total", "path" => "consensus").increment(1);
                self.issue_index(proposed.group, proposed.index);
                let token = SessionToken::of_entry(proposed.group, proposed.index).encode();
                let (succeeded, version, deleted) = match proposed.response {
                    Response::Done { version } => (true, version, false),
                    Response::CasFailed { version } => (false, version, false),
                    Response::Deleted { version, existed } => (true, version, existed),
                    Response::Refused { code, message } => {
                        return Err(Status::new(Code::from_i32(code), message));
                    }
                    Response::None => (true, 0, false),
                    // `propose` hands each command its own answer; a transaction is not a
                    // write.
                    Response::Batch(_)
                    | Response::Txn { .. }
                    | Response::LeaseGranted { .. }
                    | Response::LeaseRenewed { .. }
                    | Response::LeaseRevoked { .. }
                    | Response::LeaseTicked { .. } => {
                        return Err(Status::internal(
                            "a write was answered for a whole entry, not for itself (a bug); its outcome is unknown",
                        ));
                    }
                };
                Ok(pb::WriteResponse {
                    path: pb::Path::Consensus as i32,
                    succeeded,
                    version,
                    token,
                    deleted,
                })
            }
        }
    }

    /// One op end to end. A non-empty session `token` is awaited first, so the op observes
    /// what the token names (see `WriteRequest.token`).
    pub async fn write(
        &self,
        key: &[u8],
        op: Option<pb::op::Kind>,
        token: &[u8],
        lease: LeaseId,
    ) -> Result<pb::WriteResponse, Status> {
        check_key(key)?;
        let op = kernel_op(self, key, op)?;
        if lease != 0 {
            self.check_leased_write(key, &op, lease)?;
        }
        self.await_write_token(key, token).await?;
        if let Some(fake) = crate::faults::drop_acked_write(&op) {
            return Ok(fake);
        }
        if lease != 0 {
            let pending = self.prepare_leased(key, &op, lease)?;
            return self.finish(pending).await;
        }
        let result = match self.admit(key, &op) {
            Ok(pending) => self.finish(pending).await,
            Err(e) => Err(e),
        };
        self.after_exhausted(key, &op, result).await
    }

    /// A bounded counter spend that neither this node's quota nor the key's pool covers
    /// (RESOURCE_EXHAUSTED) asks peers for the missing rights (DESIGN.md section 5) and, once
    /// this node holds them, runs once more; any other result stands.
    pub(super) async fn after_exhausted(
        &self,
        key: &[u8],
        op: &Op,
        result: Result<pb::WriteResponse, Status>,
    ) -> Result<pb::WriteResponse, Status> {
        match result {
            Err(e) if e.code() == Code::ResourceExhausted && self.borrow_escrow(key, op).await => {
                let pending = self.admit(key, op)?;
                self.finish(pending).await
            }
            result => result,
        }
    }

    /// Gather the rights `op` lacks into this node's quota: what the key's pool holds (a
    /// grant; not in available mode, which never coordinates), the rest from the peers; true
    /// once this node holds them.
    async fn borrow_escrow(&self, key: &[u8], op: &Op) -> bool {
        let Op::BoundedAdd { delta } = *op else {
            return false;
        };
        let missing = |local: &calm_raft::local::LocalState| -> Option<((i64, i64), (i64, i64))> {
            let replica = local.replica();
            let Some(KeyState::Bounded(b)) = replica.key_state(key) else {
                return None;
            };
            let (held_down, held_up) = b.rights_of(self.id());
            let (pool_down, pool_up) = b.pool();
            let (down, up) = if delta < 0 {
                (delta.saturating_neg().saturating_sub(held_down), 0)
            } else {
                (0, delta.saturating_sub(held_up))
            };
            let from_pool = if replica.rules().resolve(key).mode == calm_kernel::Mode::Hybrid {
                (down.min(pool_down).max(0), up.min(pool_up).max(0))
            } else {
                (0, 0)
            };
            Some(((down, up), from_pool))
        };
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.config.raft.request_timeout_ms);
        // A grant refused because this replica's view of the pool was stale leaves the
        // replica current (`escrow::grant`), so the next round asks for what is really there.
        for _ in 0..ESCROW_GATHER_ROUNDS_MAX {
            let Some(((down, up), (pool_down, pool_up))) = missing(&lock(&self.local)) else {
                return false;
            };
            if down <= 0 && up <= 0 {
                // Rights arrived meanwhile (a pool grant, a peer's transfer).
                return true;
            }
            if pool_down > 0 || pool_up > 0 {
                crate::escrow::grant(self, key, pool_down, pool_up).await;
                continue;
            }
            let (got_down, got_up) = self.gossip.ask_escrow(key, down, up, deadline).await;
            if got_down >= down && got_up >= up {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // A transfer a peer issued may still be on its way (`ask_escrow` counts only
            // what arrived): the next round sees it in the replica.
            tokio::time::sleep(ESCROW_GATHER_PAUSE).await;
        }
        false
    }

    /// UNAVAILABLE (INTERNAL for a stopped group, RESOURCE_EXHAUSTED for a full queue) with
    /// the leader hint.
    pub(crate) fn unavailable(&self, e: ProposeError) -> Status {
        let code = match e {
            ProposeError::Fatal { .. } => Code::Internal,
            ProposeError::Overloaded { .. } => Code::ResourceExhausted,
            ProposeError::Invalid { .. } => Code::InvalidArgument,
            _ => Code::Unavailable,
        };
        // This node naming itself helps nobody: it just said it cannot serve.
        let leader = e.leader_hint().filter(|&l| l != self.id());
        let addr = leader.and_then(|l| self.client_addr_of(l));
        let message = match (leader, addr) {
            (Some(l), Some(a)) => format!("{e}; node {l} serves clients at {a}"),
            // No leader to name: say where else to try.
            _ => {
                let others: Vec<String> = self
                    .config
                    .members
                    .iter()
                    .filter(|m| m.id != self.id())
                    .map(|m| format!("node {} at {}", m.id, m.client))
                    .collect();
                if others.is_empty() {
                    e.to_string()
                } else {
                    format!("{e}; other members: {}", others.join(", "))
                }
            }
        };
        let mut status = Status::new(code, message);
        if let (Some(l), Some(a)) = (leader, addr) {
            insert_leader_hint(status.metadata_mut(), l, a);
        }
        status
    }

    /// `response` with the leader hint when another node leads `key`'s group (see the
    /// module doc, "Leader hints on success").
    pub(super) fn hinted<T>(&self, key: &[u8], response: T) -> tonic::Response<T> {
        let mut response = tonic::Response::new(response);
        let group = self.consensus.group_map().group_of(key);
        let leader = self.consensus.leader_id(group);
        if let Some(l) = leader.filter(|&l| l != self.id())
            && let Some(addr) = self.client_addr_of(l)
        {
            insert_leader_hint(response.metadata_mut(), l, addr);
        }
        response
    }
}

/// `op` on `key` as the Raft command to propose, stamped with what this node observed, with
/// the WAL barrier of the own facts it observed.
fn consensus_pending(
    local: &mut calm_raft::local::LocalState,
    key: &[u8],
    op: &Op,
    hlc: calm_kernel::HlcTimestamp,
    lease: Option<LeaseId>,
) -> Result<Pending, Status> {
    let cmd = local
        .replica()
        .prepare_command(key, op, hlc)
        .map_err(refused)?;
    let barrier = local
        .own_facts_barrier()
        .unwrap_or_else(|e| fatal("appending a WAL barrier", &e));
    Ok(Pending::Consensus {
        cmd,
        barrier,
        lease,
    })
}

/// Whether `op` is a delete of a key that has a value on `replica` (what a last-writer-wins
/// delete, admitted here without coordination, reports as `deleted`).
fn deletes_a_value(replica: &calm_kernel::Replica, key: &[u8], op: &Op) -> bool {
    matches!(op, Op::RegisterDelete)
        && replica
            .read(key)
            .and_then(super::ops::value_to_pb)
            .is_some()
}
