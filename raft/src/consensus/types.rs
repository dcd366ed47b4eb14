//! openraft's types for calm, in one place.
//!
//! openraft 0.10 is still an alpha line, so its API moves between releases. Everything the
//! rest of calm touches is named here (the type config, aliases, and the request/response
//! that travel through the log) so that an upgrade changes this module, not every caller.

use calm_kernel::command::Command;
use calm_kernel::lease::{LeaseCommand, LeaseId};
use calm_kernel::txn::Txn;
use calm_kernel::{HlcTimestamp, NodeId as KernelNodeId};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

pub use openraft::async_runtime::watch::WatchReceiver;
pub use openraft::impls::BasicNode;
pub use openraft::{
    ChangeMembers, Config, EntryPayload, Membership, RaftMetrics, ReadPolicy, ServerState,
    SnapshotPolicy,
};

openraft::declare_raft_types!(
    /// calm's Raft configuration: u64 node ids, nodes addressed by their peer gRPC address.
    pub CalmRaft:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
);

pub type NodeId = u64;
pub type GroupId = u64;
pub type LogId = openraft::type_config::alias::LogIdOf<CalmRaft>;
pub type Vote = openraft::type_config::alias::VoteOf<CalmRaft>;
pub type Entry = openraft::type_config::alias::EntryOf<CalmRaft>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<CalmRaft>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<CalmRaft>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<CalmRaft, Vec<u8>>;
pub type StorageError = openraft::StorageError<CalmRaft>;
pub type RaftError<E = openraft::errors::Infallible> = openraft::errors::RaftError<CalmRaft, E>;
pub type ClientWriteError = openraft::errors::ClientWriteError<CalmRaft>;
pub type ForwardToLeader = openraft::errors::ForwardToLeader<CalmRaft>;
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<CalmRaft>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<CalmRaft>;
pub type VoteRequest = openraft::raft::VoteRequest<CalmRaft>;
pub type VoteResponse = openraft::raft::VoteResponse<CalmRaft>;
pub type SnapshotResponse = openraft::raft::SnapshotResponse<CalmRaft>;
pub type TransferLeaderRequest = openraft::raft::TransferLeaderRequest<CalmRaft>;
pub type IoFlushed = openraft::storage::IOFlushed<CalmRaft>;

/// What a group's log carries.
///
/// Commands are shared (`Arc`), not owned: openraft clones an entry every time it reads one
/// from the log (once per follower to replicate it, once to apply it), and a deep clone
/// allocates every key and value again. The encoding is that of the plain values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A kernel command on one key (its group is the key's subject's group).
    Command(Arc<Command>),
    /// Metadata group only: the rules a new cluster starts with. Applies only while the
    /// cluster has no rules yet (every node proposes its configured rules once; the first
    /// one ordered wins), as version 1.
    ///
    /// Rules travel as their TOML file text: `RuleSet`'s serde form is made for TOML (it
    /// skips absent fields), which a non-self-describing encoding cannot read back.
    InitRules { toml: String },
    /// Metadata group only: replace the rules in force, which must be at
    /// `expected_version` (see `RuleSet::replace`), with the rules file `toml`.
    SetRules { expected_version: u64, toml: String },
    /// Several commands of one group in one entry, applied in order and all at once (no
    /// persist in between). Their keys are distinct, which makes each command's effect the
    /// same as if it had been its own entry. Concurrent proposals share an entry this way
    /// (see `node.rs`, "Coalescing").
    Commands(Arc<[Command]>),
    /// A transaction on keys of one subject (`calm_kernel::txn`): comparisons, then one
    /// branch's commands, all or none. Appended last: older entries encode as before.
    Txn(Arc<Txn>),
    /// A lease's grant, renewals, revoke, or the group's lease clock tick
    /// (`calm_kernel::lease`). Data groups only: a lease lives in its subject's group.
    Lease(Arc<LeaseEntry>),
    /// A register put or compare-and-set that attaches its key to `lease` (of the key's
    /// subject) once it takes effect.
    Leased { cmd: Arc<Command>, lease: LeaseId },
    /// A transaction some of whose puts attach their keys to leases when they run:
    /// `attach` names each as (in the success branch?, its index there, the lease)
    /// (`Replica::apply_txn_leased`).
    TxnLeased {
        txn: Arc<Txn>,
        attach: Arc<[(bool, u32, LeaseId)]>,
    },
}

/// A lease entry with its proposer's stamp (the deletes a revoke or an expiry makes carry
/// it, as a command's do).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEntry {
    pub hlc: HlcTimestamp,
    pub proposer: KernelNodeId,
    pub cmd: LeaseCommand,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Command(cmd) => write!(
                f,
                "command {:?} on {}",
                cmd.body.value_type(),
                calm_kernel::refusal::DisplayKey(&cmd.key)
            ),
            Request::InitRules { .. } => write!(f, "initial rules"),
            Request::SetRules {
                expected_version, ..
            } => write!(f, "rules replacing version {expected_version}"),
            Request::Commands(cmds) => write!(f, "{} commands", cmds.len()),
            Request::Txn(txn) => write!(
                f,
                "transaction of {} comparisons, {} and {} ops",
                txn.compares.len(),
                txn.success.len(),
                txn.failure.len()
            ),
            Request::Lease(entry) => match &entry.cmd {
                LeaseCommand::Grant { ttl_ms, .. } => write!(f, "lease grant of {ttl_ms} ms"),
                LeaseCommand::Renew { ids } => write!(f, "renewal of {} leases", ids.len()),
                LeaseCommand::Revoke { id } => write!(f, "revoke of lease {id:x}"),
                LeaseCommand::Tick { term, .. } => write!(f, "lease tick of term {term}"),
            },
            Request::TxnLeased { txn, attach } => write!(
                f,
                "transaction of {} comparisons, {} and {} ops, {} of them leased",
                txn.compares.len(),
                txn.success.len(),
                txn.failure.len(),
                attach.len()
            ),
            Request::Leased { cmd, lease } => write!(
                f,
                "register write on {} with lease {lease:x}",
                calm_kernel::refusal::DisplayKey(&cmd.key)
            ),
        }
    }
}

/// What applying a log entry answered. Identical on every replica (it depends only on the
/// log and the facts the command observed), so the leader's answer is everyone's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry.
    #[default]
    None,
    Done {
        /// A register's version after the command (0 for other types).
        version: u64,
    },
    /// A compare-and-set whose condition did not hold: a normal answer, nothing changed.
    CasFailed { version: u64 },
    /// The command was refused; `code` is the gRPC status code to answer with.
    Refused { code: i32, message: String },
    /// A `Request::Commands` entry: one answer per command, in order.
    Batch(Vec<Response>),
    /// A delete applied; `existed`: the key was there to delete (etcd's `deleted: 1`).
    /// Appended last: the encoding of the other answers is unchanged.
    Deleted { version: u64, existed: bool },
    /// A transaction applied: `succeeded` says which branch ran; one answer per op of that
    /// branch (`Done` or `Deleted`). A refused transaction is answered `Refused`.
    Txn {
        succeeded: bool,
        results: Vec<Response>,
    },
    /// A lease was granted (`ttl_ms`: the TTL it got).
    LeaseGranted { id: LeaseId, ttl_ms: u64 },
    /// Per lease renewed, its TTL; 0: it no longer exists.
    LeaseRenewed { ttl_ms: Vec<u64> },
    /// A revoke applied: whether the lease existed, and how many keys it deleted.
    LeaseRevoked { found: bool, keys: u64 },
    /// A tick applied: how many leases expired at it.
    LeaseTicked { expired: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::state_machine::{AppliedPosition, rules_text};
    use calm_kernel::rules::{Rule, RuleSet};
    use calm_kernel::{Bounds, CommandBody, HlcTimestamp, Mode, ValueType};

    /// Every request round-trips through the encoding of the WAL and the wire (postcard is
    /// not self-describing: a type whose serde form skips fields would not decode).
    #[test]
    fn requests_and_positions_round_trip_through_postcard() {
        let mut rules = RuleSet::new(Mode::Hybrid);
        rules.rules.push(
            Rule::new("stock:*", Mode::Hybrid)
                .with_type(ValueType::BoundedCounter)
                .bounded(Bounds::new(0, 10).unwrap()),
        );
        rules.rules.push(Rule::new("plain", Mode::Strict));
        let requests = [
            Request::Command(Arc::new(Command {
                key: b"k".to_vec(),
                hlc: HlcTimestamp(7),
                proposer: 2,
                body: CommandBody::SetRemove {
                    element: b"e".to_vec(),
                },
                frontier: Default::default(),
                absorb: None,
            })),
            Request::InitRules {
                toml: rules_text(&rules),
            },
            Request::SetRules {
                expected_version: 3,
                toml: rules_text(&rules),
            },
            Request::Commands(Arc::from(vec![
                Command {
                    key: b"a".to_vec(),
                    hlc: HlcTimestamp(8),
                    proposer: 1,
                    body: CommandBody::RegisterPut {
                        value: b"v".to_vec(),
                    },
                    frontier: Default::default(),
                    absorb: None,
                },
                Command {
                    key: b"b".to_vec(),
                    hlc: HlcTimestamp(9),
                    proposer: 1,
                    body: CommandBody::RegisterDelete,
                    frontier: Default::default(),
                    absorb: None,
                },
            ])),
            Request::Txn(Arc::new(calm_kernel::Txn {
                hlc: HlcTimestamp(10),
                proposer: 3,
                compares: vec![calm_kernel::Compare {
                    key: b"{t}:a".to_vec(),
                    test: calm_kernel::Test::Counter { min: 1, max: 9 },
                    frontier: Default::default(),
                    absorb: None,
                }],
                success: vec![Command {
                    key: b"{t}:a".to_vec(),
                    hlc: HlcTimestamp(10),
                    proposer: 3,
                    body: CommandBody::CounterAdd { delta: -1 },
                    frontier: Default::default(),
                    absorb: None,
                }],
                failure: vec![],
            })),
            Request::Lease(Arc::new(LeaseEntry {
                hlc: HlcTimestamp(11),
                proposer: 1,
                cmd: LeaseCommand::Tick {
                    term: 4,
                    elapsed_ms: 500,
                    extend_ms: 1_500,
                },
            })),
            Request::Leased {
                cmd: Arc::new(Command {
                    key: b"{t}:lock".to_vec(),
                    hlc: HlcTimestamp(12),
                    proposer: 2,
                    body: CommandBody::RegisterPut {
                        value: b"me".to_vec(),
                    },
                    frontier: Default::default(),
                    absorb: None,
                }),
                lease: (1 << 48) | 3,
            },
        ];
        for r in requests {
            let bytes = postcard::to_stdvec(&r).unwrap();
            assert_eq!(postcard::from_bytes::<Request>(&bytes).unwrap(), r);
        }
        let position = AppliedPosition {
            rules: Some(rules_text(&rules)),
            ..AppliedPosition::default()
        };
        assert_eq!(
            AppliedPosition::decode(&position.encode()).unwrap(),
            position
        );
    }
}
