//! The public gRPC API (`calm.v1`): typed writes, batches, reads, and administration.
//!
//! A write meets the kernel's classifier under the node's state lock
//! (`LocalState::admit`): commutative ops become facts, are acknowledged once the WAL says
//! durable and are then handed to gossip; everything else becomes a Raft command stamped
//! with what this node observed on the key and is proposed to the key's group (forwarded to
//! its leader when this node does not lead it). The lock is never held across an `.await`.
//!
//! Reads: `LINEARIZABLE` (the default) waits for a read index of the key's group, then reads
//! this node's replica; `SERIALIZABLE` reads it as it is; `CAUSAL` waits (bounded) until this
//! node has applied everything the client's session token names.
//!
//! Every refusal carries the gRPC code of DESIGN.md section 10 and a message saying what to
//! do; UNAVAILABLE answers name the last known leader in the message and in the
//! `calm-leader` (client address) and `calm-leader-id` response metadata.
//!
//! Leader hints on success. A consensus-path write or a linearizable get that this node
//! served for a group another node leads (it forwarded the proposal, or asked the leader
//! for a read index) carries the same two metadata entries: a client that sends such
//! requests to the leader itself saves that peer round trip (`crate::route`). Requests
//! served by the leader, and fast-path ones, carry none.

use crate::node::{Node, fatal, lock};
use crate::token::SessionToken;
use calm_kernel::fact::{KEY_BYTES_MAX, PAYLOAD_BYTES_MAX};
use calm_kernel::refusal::Refusal;
use calm_kernel::{
    Admitted, Bounds, CasExpect, Command, FactId, KeyState, Op, RefusedOp, Replica, StatusCode,
    Value, ValueType,
};
use calm_raft::consensus::{ProposeError, Response};
use calm_raft::local::{FastAdmit, LocalAdmit};
use calm_raft::wal::AppendTicket;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status};

pub mod pb {
    tonic::include_proto!("calm.v1");
    /// For server reflection (grpcurl).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("calm_descriptor");
}

use pb::admin_server::{Admin, AdminServer};
use pb::kv_server::{Kv, KvServer};

/// Most ops in one Batch call.
pub const BATCH_OPS_MAX: usize = 10_000;
/// Most fast-path ops of a Batch admitted in one hold of the state lock (~2 µs each).
const BATCH_OPS_PER_LOCK_MAX: usize = 1_000;
/// Largest request or response message on the client API.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Metadata key naming the last known leader's client address (on UNAVAILABLE, and on a
/// success this node served by forwarding).
pub const LEADER_METADATA: &str = "calm-leader";
/// Metadata key naming that leader's node id.
pub const LEADER_ID_METADATA: &str = "calm-leader-id";

/// Seconds a successful Write call took inside this node, by the path it took (`fast`,
/// `escrow`, `consensus`): from the request's arrival to its answer, without the network.
pub const METRIC_WRITE_SECONDS: &str = "calm_write_seconds";
/// Seconds a successful Get call took inside this node, by consistency (`linearizable`,
/// `serializable`, `causal`).
pub const METRIC_READ_SECONDS: &str = "calm_read_seconds";
/// Seconds a Batch call took inside this node (whatever its ops' outcomes).
pub const METRIC_BATCH_SECONDS: &str = "calm_batch_seconds";

/// Describe the API's metrics to the installed recorder.
pub(crate) fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "calm_writes_total",
        Unit::Count,
        "Writes acknowledged, by path (fast, escrow, consensus)"
    );
    describe_histogram!(
        METRIC_WRITE_SECONDS,
        Unit::Seconds,
        "Time a successful Write call took inside the node, by path (fast, escrow, consensus)"
    );
    describe_histogram!(
        METRIC_READ_SECONDS,
        Unit::Seconds,
        "Time a successful Get call took inside the node, by consistency"
    );
    describe_histogram!(
        METRIC_BATCH_SECONDS,
        Unit::Seconds,
        "Time a Batch call took inside the node"
    );
}

/// Put the leader hint on `md`.
fn insert_leader_hint(md: &mut tonic::metadata::MetadataMap, leader: u64, addr: &str) {
    if let Ok(v) = addr.parse() {
        md.insert(LEADER_METADATA, v);
    }
    if let Ok(v) = leader.to_string().parse() {
        md.insert(LEADER_ID_METADATA, v);
    }
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

fn check_key(key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(invalid(format!(
            "the key is empty; keys are 1 to {KEY_BYTES_MAX} bytes"
        )));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(invalid(format!(
            "the key is {} bytes; keys are at most {KEY_BYTES_MAX} bytes",
            key.len()
        )));
    }
    Ok(())
}

fn check_payload(what: &str, bytes: &[u8]) -> Result<(), Status> {
    if bytes.len() > PAYLOAD_BYTES_MAX {
        return Err(invalid(format!(
            "the {what} is {} bytes; at most {PAYLOAD_BYTES_MAX} bytes are accepted",
            bytes.len()
        )));
    }
    Ok(())
}

fn status_code(code: StatusCode) -> Code {
    match code {
        StatusCode::InvalidArgument => Code::InvalidArgument,
        StatusCode::FailedPrecondition => Code::FailedPrecondition,
        StatusCode::ResourceExhausted => Code::ResourceExhausted,
        StatusCode::Unavailable => Code::Unavailable,
    }
}

fn refused(r: RefusedOp) -> Status {
    Status::new(status_code(r.refusal.status()), r.message)
}

/// A Batch's ops on one key, in call order: (index in the call, op, session token).
type KeyOps = Vec<(usize, Option<pb::op::Kind>, Vec<u8>)>;

/// A write admitted and waiting for its durability or its Raft round.
enum Pending {
    Fast {
        durable: AppendTicket,
        fact: Vec<u8>,
        id: FactId,
        escrow: bool,
        group: u64,
    },
    Consensus {
        cmd: Command,
        /// To await before proposing (own facts the command observed, not yet durable).
        barrier: Option<(AppendTicket, u64)>,
    },
}

/// The kernel op for a client op on `key`: counter ops apply to bounded counters too (the
/// key's type, or else its rule's type, decides), and a rule's type is enforced on creation.
fn kernel_op(node: &Node, key: &[u8], op: Option<pb::op::Kind>) -> Result<Op, Status> {
    kernel_op_on(lock(&node.local).replica(), key, op)
}

/// [`kernel_op`] against a replica the caller has locked.
fn kernel_op_on(replica: &Replica, key: &[u8], op: Option<pb::op::Kind>) -> Result<Op, Status> {
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
    if existing.is_none()
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

impl Node {
    /// Classify and admit (fast path) or prepare (consensus) one op. Synchronous: ops of one
    /// caller are admitted in call order.
    fn admit(&self, key: &[u8], op: &Op) -> Result<Pending, Status> {
        self.request_refill(key, op);
        let hlc = self.hlc.now();
        let mut local = lock(&self.local);
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
            }),
            Ok(Ok(LocalAdmit {
                admitted: Admitted::Consensus(_),
                ..
            })) => {
                let cmd = local
                    .replica()
                    .prepare_command(key, op, hlc)
                    .map_err(refused)?;
                let barrier = local
                    .own_facts_barrier()
                    .unwrap_or_else(|e| fatal("appending a WAL barrier", &e));
                Ok(Pending::Consensus { cmd, barrier })
            }
        }
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
    fn admit_leading_fast(
        &self,
        by_key: BTreeMap<Vec<u8>, KeyOps>,
        done: &mut Vec<(usize, Result<pb::WriteResponse, Status>)>,
    ) -> (
        Vec<(usize, FastAdmit, u64)>,
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
                        match batch.admit(&key, &op, self.hlc.now()) {
                            Ok(Some(admitted)) => fast.push((*i, admitted, group)),
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
    fn fast_response(&self, id: FactId, escrow: bool, group: u64) -> pb::WriteResponse {
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
        }
    }

    async fn finish(&self, pending: Pending) -> Result<pb::WriteResponse, Status> {
        match pending {
            Pending::Fast {
                durable,
                fact,
                id,
                escrow,
                group,
            } => {
                if let Err(e) = durable.await {
                    fatal("making a fact durable", &e);
                }
                self.gossip.publish(fact);
                metrics::counter!("calm_writes_total", "path" => if escrow { "escrow" } else { "fast" })
                    .increment(1);
                Ok(self.fast_response(id, escrow, group))
            }
            Pending::Consensus { cmd, barrier } => {
                self.own_facts_durable(barrier).await;
                let proposed = self
                    .consensus
                    .propose(cmd)
                    .await
                    .map_err(|e| self.unavailable(e))?;
                metrics::counter!("calm_writes_total", "path" => "consensus").increment(1);
                self.issue_index(proposed.group, proposed.index);
                let token = SessionToken::of_entry(proposed.group, proposed.index).encode();
                let (succeeded, version) = match proposed.response {
                    Response::Done { version } => (true, version),
                    Response::CasFailed { version } => (false, version),
                    Response::Refused { code, message } => {
                        return Err(Status::new(Code::from_i32(code), message));
                    }
                    Response::None => (true, 0),
                    // `propose` hands each command its own answer.
                    Response::Batch(_) => {
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
    ) -> Result<pb::WriteResponse, Status> {
        check_key(key)?;
        let op = kernel_op(self, key, op)?;
        self.await_write_token(key, token).await?;
        if let Some(fake) = crate::faults::drop_acked_write(&op) {
            return Ok(fake);
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
    async fn after_exhausted(
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

    /// Ask peers for the rights `op` lacks here; true once this node holds them.
    async fn borrow_escrow(&self, key: &[u8], op: &Op) -> bool {
        let Op::BoundedAdd { delta } = *op else {
            return false;
        };
        let (down, up) = {
            let local = lock(&self.local);
            let Some(KeyState::Bounded(b)) = local.replica().key_state(key) else {
                return false;
            };
            let (held_down, held_up) = b.rights_of(self.id());
            if delta < 0 {
                (delta.saturating_neg().saturating_sub(held_down), 0)
            } else {
                (0, delta.saturating_sub(held_up))
            }
        };
        if down <= 0 && up <= 0 {
            // Rights arrived meanwhile (a pool grant, a peer's transfer).
            return true;
        }
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.config.raft.request_timeout_ms);
        let (got_down, got_up) = self.gossip.ask_escrow(key, down, up, deadline).await;
        got_down >= down && got_up >= up
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
    fn hinted<T>(&self, key: &[u8], response: T) -> tonic::Response<T> {
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

    /// Wait (bounded) until this node applied what `token` names for `group`.
    async fn await_token(&self, token: &SessionToken, group: u64) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.config.raft.request_timeout_ms);
        let index = token.groups.get(&group).copied().unwrap_or(0);
        loop {
            let caught_up = lock(&self.local)
                .replica()
                .version_vector()
                .dominates(&token.vv)
                && self.applied_index(group) >= index;
            if caught_up {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "node {} has not caught up with the session token within {} ms (it may be partitioned from the writer); retry, or send the request to the node that wrote",
                    self.id(),
                    self.config.raft.request_timeout_ms
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A write's optional session token: decoded (INVALID_ARGUMENT if malformed) and awaited
    /// for the key's group before admission.
    pub(crate) async fn await_write_token(&self, key: &[u8], token: &[u8]) -> Result<(), Status> {
        if token.is_empty() {
            return Ok(());
        }
        let token = SessionToken::decode(token).map_err(invalid)?;
        self.await_token(&token, self.consensus.group_map().group_of(key))
            .await
    }

    pub async fn get(
        &self,
        key: &[u8],
        consistency: pb::Consistency,
        token: &[u8],
    ) -> Result<pb::GetResponse, Status> {
        check_key(key)?;
        let group = self.consensus.group_map().group_of(key);
        match consistency {
            pb::Consistency::Unspecified | pb::Consistency::Linearizable
                if crate::faults::skip_read_barrier() => {}
            pb::Consistency::Unspecified | pb::Consistency::Linearizable => self
                .consensus
                .read_barrier(group)
                .await
                .map_err(|e| self.unavailable(e))?,
            pb::Consistency::Serializable => {}
            pb::Consistency::Causal => {
                let token = SessionToken::decode(token).map_err(invalid)?;
                self.await_token(&token, group).await?;
            }
        }
        let (value, vv) = {
            let local = lock(&self.local);
            (
                local.replica().read(key),
                local.replica().version_vector().clone(),
            )
        };
        let token = SessionToken {
            vv,
            groups: BTreeMap::from([(group, self.applied_index(group))]),
        }
        .encode();
        let value = value.and_then(value_to_pb);
        Ok(pb::GetResponse {
            found: value.is_some(),
            value,
            token,
        })
    }
}

/// The client-visible value; `None` for a deleted (or never written) register.
fn value_to_pb(value: Value) -> Option<pb::Value> {
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

pub struct KvService {
    node: Arc<Node>,
}

fn error_of(status: &Status) -> pb::Error {
    pb::Error {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<tonic::Response<pb::WriteResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let op = req.op.and_then(|o| o.kind);
        let response = self.node.write(&req.key, op, &req.token).await?;
        let path = match pb::Path::try_from(response.path) {
            Ok(pb::Path::Consensus) => "consensus",
            Ok(pb::Path::Escrow) => "escrow",
            _ => "fast",
        };
        metrics::histogram!(METRIC_WRITE_SECONDS, "path" => path).record(started.elapsed());
        Ok(if response.path == pb::Path::Consensus as i32 {
            self.node.hinted(&req.key, response)
        } else {
            tonic::Response::new(response)
        })
    }

    /// Ops of one key are admitted and proposed in request order; different keys proceed
    /// concurrently, and fast-path ops share group commits.
    async fn batch(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<tonic::Response<pb::BatchResponse>, Status> {
        let started = Instant::now();
        let ops = request.into_inner().ops;
        if ops.len() > BATCH_OPS_MAX {
            return Err(invalid(format!(
                "the batch has {} ops; send at most {BATCH_OPS_MAX} per call",
                ops.len()
            )));
        }
        let mut by_key: BTreeMap<Vec<u8>, KeyOps> = BTreeMap::new();
        for (i, op) in ops.into_iter().enumerate() {
            by_key
                .entry(op.key)
                .or_default()
                .push((i, op.op.and_then(|o| o.kind), op.token));
        }
        let node = &self.node;
        let mut results = Vec::with_capacity(by_key.len());
        let (admitted, durable, rest) = node.admit_leading_fast(by_key, &mut results);
        let fast = async {
            if let Some(durable) = durable
                && let Err(e) = durable.await
            {
                fatal("making a batch's facts durable", &e);
            }
            node.gossip
                .publish_many(admitted.iter().map(|(_, f, _)| f.fact.as_slice()));
            let escrow = admitted.iter().filter(|(_, f, _)| f.escrow).count() as u64;
            metrics::counter!("calm_writes_total", "path" => "escrow").increment(escrow);
            metrics::counter!("calm_writes_total", "path" => "fast")
                .increment(admitted.len() as u64 - escrow);
            admitted
                .iter()
                .map(|(i, f, group)| (*i, Ok(node.fast_response(f.id, f.escrow, *group))))
                .collect::<Vec<_>>()
        };
        // The rest of each key, in order, one op at a time (as `write` would); phase one
        // checked the key already.
        let per_key = rest.into_iter().map(|(key, ops)| async move {
            let mut done = Vec::with_capacity(ops.len());
            let mut fast = Vec::new();
            for (i, op, token) in ops {
                let op = match kernel_op(node, &key, op) {
                    Ok(op) => op,
                    Err(e) => {
                        done.push((i, Err(e)));
                        continue;
                    }
                };
                if let Err(e) = node.await_write_token(&key, &token).await {
                    done.push((i, Err(e)));
                    continue;
                }
                let result = match node.admit(&key, &op) {
                    // Durability is awaited below, together: later ops need not wait for it.
                    Ok(p @ Pending::Fast { .. }) => {
                        fast.push((i, p));
                        continue;
                    }
                    Ok(p @ Pending::Consensus { .. }) => node.finish(p).await,
                    Err(e) => Err(e),
                };
                done.push((i, node.after_exhausted(&key, &op, result).await));
            }
            for (i, p) in fast {
                done.push((i, node.finish(p).await));
            }
            done
        });
        let (fast, rest) = tokio::join!(fast, futures::future::join_all(per_key));
        results.extend(fast);
        results.extend(rest.into_iter().flatten());
        results.sort_unstable_by_key(|(i, _)| *i);
        let results = results
            .into_iter()
            .map(|(_, r)| pb::BatchResult {
                result: Some(match r {
                    Ok(ok) => pb::batch_result::Result::Ok(ok),
                    Err(e) => pb::batch_result::Result::Error(error_of(&e)),
                }),
            })
            .collect();
        metrics::histogram!(METRIC_BATCH_SECONDS).record(started.elapsed());
        Ok(tonic::Response::new(pb::BatchResponse { results }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<tonic::Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        let consistency = pb::Consistency::try_from(req.consistency).map_err(|_| {
            invalid(format!(
                "consistency {} is not one of LINEARIZABLE (1), SERIALIZABLE (2), CAUSAL (3)",
                req.consistency
            ))
        })?;
        let started = Instant::now();
        let response = self.node.get(&req.key, consistency, &req.token).await?;
        let label = match consistency {
            pb::Consistency::Unspecified | pb::Consistency::Linearizable => "linearizable",
            pb::Consistency::Serializable => "serializable",
            pb::Consistency::Causal => "causal",
        };
        metrics::histogram!(METRIC_READ_SECONDS, "consistency" => label).record(started.elapsed());
        Ok(match consistency {
            pb::Consistency::Unspecified | pb::Consistency::Linearizable => {
                self.node.hinted(&req.key, response)
            }
            _ => tonic::Response::new(response),
        })
    }
}

pub struct AdminService {
    node: Arc<Node>,
}

fn role_name(state: calm_raft::consensus::types::ServerState) -> &'static str {
    use calm_raft::consensus::types::ServerState;
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl Node {
    /// The status this node reports (also the HTTP status page's data).
    pub fn status(&self) -> pb::StatusResponse {
        let groups = self
            .consensus
            .group_map()
            .all()
            .map(|g| {
                let m = self.metrics(g);
                let last = m.last_log_index.unwrap_or(0);
                let max_follower_lag = m
                    .replication
                    .as_ref()
                    .map(|r| {
                        r.values()
                            .map(|matched| last.saturating_sub(matched.map_or(0, |l| l.index)))
                            .max()
                            .unwrap_or(0)
                    })
                    .unwrap_or(0);
                pb::Group {
                    id: g,
                    leader: m.current_leader.unwrap_or(0),
                    role: role_name(m.state).into(),
                    term: m.current_term,
                    last_log_index: last,
                    applied_index: m.last_applied.map_or(0, |l| l.index),
                    snapshot_index: m.snapshot.map_or(0, |l| l.index),
                    purged_index: m.purged.map_or(0, |l| l.index),
                    max_follower_lag,
                }
            })
            .collect();
        let local = lock(&self.local);
        let replica = local.replica();
        pb::StatusResponse {
            node_id: self.id(),
            members: self
                .config
                .members
                .iter()
                .map(|m| pb::Member {
                    id: m.id,
                    client_addr: m.client.clone(),
                    peer_addr: m.peer.clone(),
                })
                .collect(),
            groups,
            wal: Some(pb::Wal {
                backend: local.wal().backend_name().into(),
                next_lsn: local.wal().durable_next_lsn(),
                oldest_lsn: local.wal().oldest_lsn(),
            }),
            checkpoint: self
                .last_checkpoint
                .load(std::sync::atomic::Ordering::Relaxed),
            version_vector: replica.version_vector().iter().collect(),
            keys: replica.key_count() as u64,
            rules_version: replica.rules_version(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusResponse>, Status> {
        Ok(tonic::Response::new(self.node.status()))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<tonic::Response<pb::ExplainResponse>, Status> {
        let key = request.into_inner().key;
        check_key(&key)?;
        let group = self.node.consensus.group_map().group_of(&key);
        let (explanation, existing) = {
            let local = lock(&self.node.local);
            let replica = local.replica();
            (
                replica.rules().explain(&key),
                replica.key_state(&key).map(KeyState::value_type),
            )
        };
        let leader_id = self.node.consensus.leader_id(group).unwrap_or(0);
        Ok(tonic::Response::new(pb::ExplainResponse {
            rule_index: explanation.rule_index.map_or(-1, |i| i as i32),
            pattern: explanation.pattern,
            mode: explanation.mode.to_string(),
            r#type: existing
                .or(explanation.value_type)
                .map_or(String::new(), |t| t.name().to_string()),
            min: explanation.bounds.map(|b| b.min),
            max: explanation.bounds.map(|b| b.max),
            group,
            leader: leader_id,
            leader_addr: self
                .node
                .client_addr_of(leader_id)
                .unwrap_or_default()
                .to_string(),
            exists: existing.is_some(),
        }))
    }

    async fn get_rules(
        &self,
        _: Request<pb::GetRulesRequest>,
    ) -> Result<tonic::Response<pb::Rules>, Status> {
        let rules = lock(&self.node.local).replica().rules().rule_set().clone();
        let toml = toml::to_string(&rules)
            .map_err(|e| Status::internal(format!("the rules do not render as TOML: {e}")))?;
        Ok(tonic::Response::new(pb::Rules {
            version: rules.version,
            toml,
        }))
    }

    async fn set_rules(
        &self,
        request: Request<pb::SetRulesRequest>,
    ) -> Result<tonic::Response<pb::Rules>, Status> {
        use calm_raft::consensus::{GroupMap, Request as RaftRequest};
        let req = request.into_inner();
        let set = calm_raft::consensus::state_machine::parse_rules(&req.toml).map_err(invalid)?;
        if let Err(e) = set.compile() {
            return Err(invalid(format!(
                "{e}; run `calm rules check` on the file to see every problem"
            )));
        }
        let proposed = self
            .node
            .consensus
            .propose_to(
                GroupMap::METADATA,
                RaftRequest::SetRules {
                    expected_version: req.expected_version,
                    toml: req.toml,
                },
            )
            .await
            .map_err(|e| self.node.unavailable(e))?;
        match proposed.response {
            Response::Done { version } => {
                let rules = calm_kernel::rules::RuleSet { version, ..set };
                Ok(tonic::Response::new(pb::Rules {
                    version,
                    toml: toml::to_string(&rules).map_err(|e| {
                        Status::internal(format!("the rules do not render as TOML: {e}"))
                    })?,
                }))
            }
            Response::Refused { code, message } => Err(Status::new(Code::from_i32(code), message)),
            other => Err(Status::internal(format!(
                "the metadata group answered {other:?} to a rules change"
            ))),
        }
    }

    async fn checkpoint(
        &self,
        _: Request<pb::CheckpointRequest>,
    ) -> Result<tonic::Response<pb::CheckpointResponse>, Status> {
        let node = self.node.clone();
        let id = tokio::task::spawn_blocking(move || node.checkpoint_blocking())
            .await
            .map_err(|e| Status::internal(format!("the checkpoint task failed: {e}")))?;
        Ok(tonic::Response::new(pb::CheckpointResponse { id }))
    }
}

/// Serve the client API on `listener` until `shutdown`.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: CancellationToken) {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");
    // Health follows readiness: SERVING once every group has a leader this node knows.
    let health_node = node.clone();
    let health_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut serving = None;
        loop {
            let ready = health_node.groups_without_leader().is_empty();
            if serving != Some(ready) {
                if ready {
                    health.set_serving::<KvServer<KvService>>().await;
                } else {
                    health.set_not_serving::<KvServer<KvService>>().await;
                }
                serving = Some(ready);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = health_shutdown.cancelled() => return,
            }
        }
    });
    let kv = KvServer::new(KvService { node: node.clone() })
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let admin = AdminServer::new(AdminService { node });
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(kv)
        .add_service(admin)
        .serve_with_incoming_shutdown(crate::node::incoming(listener), shutdown.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "client API server stopped");
    }
}
