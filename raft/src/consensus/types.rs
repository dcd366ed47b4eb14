//! openraft's types for calm, in one place.
//!
//! openraft 0.10 is still an alpha line, so its API moves between releases. Everything the
//! rest of calm touches is named here (the type config, aliases, and the request/response
//! that travel through the log) so that an upgrade changes this module, not every caller.

use calm_kernel::command::Command;
use serde::{Deserialize, Serialize};
use std::fmt;

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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A kernel command on one key (its group is the key's subject's group).
    Command(Command),
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
}
