//! A node's Raft groups: starting them, proposing, linearizable reads, leadership.
//!
//! Any node accepts any command: [`Consensus::propose`] applies it through the local replica
//! of the key's group when this node leads it, and otherwise forwards it over the peer
//! channel to the leader. A proposal is retried only when it certainly was not appended (the
//! answer "not leader"); after a timeout or a broken connection its outcome is unknown and
//! the caller is told so (UNAVAILABLE), never silently retried: that could apply it twice.
//!
//! # Coalescing
//!
//! Concurrent commands of one group share a log entry (`Request::Commands`): a proposal
//! joins its group's queue, and one flush per group takes what has queued up and proposes it
//! as one entry (forwarded as one RPC), then takes what queued meanwhile. Under load, the
//! per-entry costs (openraft's bookkeeping, the forward RPC, replication framing, the
//! apply's lock and position write) are paid once per entry instead of once per command; a
//! lone client pays one task hop. When more waits than one entry takes (a limit, or a second
//! command on a key), a second flush proposes the next entry alongside, up to
//! [`COALESCED_IN_FLIGHT_MAX`] in flight: batches and hot keys keep a pipeline, while steady
//! small commands fill fewer, fuller entries. Commands of one entry have distinct keys, the
//! state machine's condition for applying them all at once; they commit, fail or time out
//! together, and all get the entry's index.
//!
//! Linearizable reads use read-index: the leader confirms its leadership with a quorum and
//! names the log index the read must observe; the reading node waits until its replica of
//! the group has applied that index, then reads locally. Serializable reads skip all of
//! that and read the local replica.

use super::batch::Lane;
use super::health::GroupHealth;
use super::metrics::METRIC_PROPOSAL_SECONDS;
use super::network::{GroupNetwork, Peers};
use super::service::{GroupHandles, PeerService};
use super::state_machine::{FactSource, GroupStateMachine, SharedLocal, lock_local};
use super::types::WatchReceiver;
use super::types::{
    BasicNode, CalmRaft, Config, GroupId, NodeId, RaftMetrics, ReadPolicy, Request, Response,
};
use super::wire::{self, PeerRpc, ProposeReply, ReadIndexReply, raft_peer_server::RaftPeerServer};
use super::{ClientWriteError, GroupMap, Raft};
use calm_kernel::command::Command;
use openraft::SnapshotPolicy;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::oneshot;

/// Commands at most in one coalesced entry.
pub const COALESCED_COMMANDS_MAX: usize = 128;
/// Key and value bytes at most in one coalesced entry (a larger command goes alone): keeps
/// an entry far below the WAL's batch limit.
pub const COALESCED_BYTES_MAX: usize = 256 << 10;
/// Coalesced entries of one group that this node has in flight at once. The second is
/// proposed only while more commands wait than one entry takes: with small commands on
/// distinct keys, one entry in flight at a time carries more commands each (put x64: 9.4
/// against 6.6) and costs ~11% less node CPU per put (docs/benchmarks.md, "One flush per
/// group unless more waits").
pub const COALESCED_IN_FLIGHT_MAX: usize = 2;
/// Commands at most waiting for one group's flush; beyond it a proposal is refused at once
/// (`Overloaded`, RESOURCE_EXHAUSTED to clients) instead of queueing without bound.
pub const COALESCE_QUEUE_MAX: usize = 16_384;
/// Attempts at most for one proposal or read barrier. Each retry follows a definite "not
/// appended" answer and waits for a new leadership or one heartbeat period, so the request's
/// deadline ends it long before this bound (which only keeps the loop finite).
pub const LEADER_ATTEMPTS_MAX: usize = 256;

/// Timing and sizing of every group on a node.
#[derive(Clone, Debug)]
pub struct ConsensusOptions {
    pub data_groups: u64,
    /// Whether hash tags choose keys' subjects (`GroupMap::subject`); fixed per cluster.
    pub hash_tags: bool,
    /// Leader heartbeat period. Idle cost is groups x peers / period RPCs per second.
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// A snapshot is taken after this many applied entries; the log is then purged.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log below the latest snapshot, so that a briefly lagging follower
    /// catches up from the log instead of a whole snapshot.
    pub entries_kept_after_snapshot: u64,
    /// How long a proposal or read waits for its group before answering UNAVAILABLE.
    pub request_timeout_ms: u64,
    /// How long a leader's commit notice to a follower may wait to ride on other traffic to
    /// that follower (`super::commit_notice`); 0 sends each at once. At most
    /// [`COMMIT_NOTICE_HOLD_MAX`](super::commit_notice::COMMIT_NOTICE_HOLD_MAX).
    pub commit_notice_hold_us: u64,
}

impl Default for ConsensusOptions {
    fn default() -> ConsensusOptions {
        ConsensusOptions {
            // One per member of a 3-node cluster: fewer groups coalesce more commands per
            // entry (a node derives its own default from its members; see calm's
            // `cluster_record`).
            data_groups: 3,
            hash_tags: true,
            // Two cores are shared by every node in tests: generous timeouts avoid spurious
            // elections under load, and heartbeats stay a small fraction of idle CPU.
            heartbeat_ms: 100,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_after_entries: 10_000,
            entries_kept_after_snapshot: 1_000,
            request_timeout_ms: 5_000,
            // A client writing in a loop sends its next write well within 1 ms of the last
            // answer; followers apply at most this much later when none comes.
            commit_notice_hold_us: 1_000,
        }
    }
}

impl ConsensusOptions {
    /// `commit_notice_hold_us` as a duration, if within its limit.
    pub fn commit_notice_hold(&self) -> Result<Duration, ConsensusError> {
        let hold = Duration::from_micros(self.commit_notice_hold_us);
        let max = super::commit_notice::COMMIT_NOTICE_HOLD_MAX;
        if hold > max {
            return Err(ConsensusError::Config(format!(
                "commit_notice_hold_us = {} exceeds {}: followers would apply committed writes that much later; lower it",
                self.commit_notice_hold_us,
                max.as_micros()
            )));
        }
        Ok(hold)
    }

    fn raft_config(&self) -> Result<Arc<Config>, ConsensusError> {
        let config = Config {
            cluster_name: "calm".into(),
            heartbeat_interval: self.heartbeat_ms,
            // Replication traffic proves liveness too: under load, skip the heartbeats it
            // makes redundant (idle groups still get one per period).
            heartbeat_min_interval: Some(self.heartbeat_ms),
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.entries_kept_after_snapshot,
            install_snapshot_timeout: 10_000,
            // A partitioned or restarted node that cannot win must not bump terms and depose
            // a healthy leader when it returns.
            enable_pre_vote: Some(true),
            // Replicate entries as soon as they are queued for the local WAL, so the leader's
            // fdatasync and the followers' overlap instead of adding up.
            broadcast_submitted_on_append: Some(true),
            ..Config::default()
        };
        Ok(Arc::new(
            config
                .validate()
                .map_err(|e| ConsensusError::Config(e.to_string()))?,
        ))
    }
}

#[derive(Debug, Error)]
pub enum ConsensusError {
    #[error("invalid Raft settings: {0}")]
    Config(String),
    #[error("group {group} failed to start: {reason}")]
    Start { group: GroupId, reason: String },
    #[error("group {group} failed to initialize: {reason}")]
    Initialize { group: GroupId, reason: String },
}

/// Why a proposal or a linearizable read got no answer. All map to UNAVAILABLE except
/// `Fatal` (INTERNAL); `leader` is a hint for the client.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProposeError {
    #[error(
        "group {group} has no leader (no quorum reachable from this node){}; retry later or at another node",
        hint(leader, addr)
    )]
    NoLeader {
        group: GroupId,
        leader: Option<NodeId>,
        addr: Option<String>,
    },
    #[error(
        "group {group} did not answer within {timeout_ms} ms{}; the write may or may not have been applied",
        hint(leader, addr)
    )]
    Timeout {
        group: GroupId,
        timeout_ms: u64,
        leader: Option<NodeId>,
        addr: Option<String>,
    },
    #[error(
        "the leader of group {group} (node {leader}) is unreachable ({reason}); the write may or may not have been applied"
    )]
    LeaderUnreachable {
        group: GroupId,
        leader: NodeId,
        reason: String,
    },
    /// Like `LeaderUnreachable`, but the proposal certainly never reached a leader.
    #[error(
        "the leader of group {group} (node {leader}) cannot be reached ({reason}) and no other leader took over in time; nothing was applied: retry later or at another node"
    )]
    NotReached {
        group: GroupId,
        leader: NodeId,
        reason: String,
    },
    /// The entry was appended, then discarded when this node adopted another leader's log
    /// (openraft's `LogEntryDiscarded`): it may still commit through that leader.
    #[error(
        "group {group} changed leader before the write committed{}; the write may or may not have been applied: read the key before retrying",
        hint(leader, &None)
    )]
    Discarded {
        group: GroupId,
        leader: Option<NodeId>,
    },
    /// The request cannot be ordered in this group (`check_request`); nothing was proposed.
    #[error("group {group} refused the proposal: {reason}")]
    Invalid { group: GroupId, reason: String },
    /// The command's request timeout passed while it waited behind earlier entries of its
    /// group on this node; it was never proposed.
    #[error(
        "the write waited {waited_ms} ms behind earlier writes of group {group} on this node and was never proposed; nothing was applied: retry (the group is slow or has no leader)"
    )]
    Expired { group: GroupId, waited_ms: u64 },
    /// Too many commands wait for the group on this node; nothing was proposed.
    #[error(
        "{queued} writes already wait for group {group} on this node; nothing was applied: slow down or retry later"
    )]
    Overloaded { group: GroupId, queued: usize },
    #[error("group {group} stopped: {reason}; the node must be restarted")]
    Fatal { group: GroupId, reason: String },
}

/// The peer address is kept for callers; messages name the node only (clients need its
/// client address, which the node layer adds).
fn hint(leader: &Option<NodeId>, _peer_addr: &Option<String>) -> String {
    match leader {
        Some(l) => format!(" (last known leader: node {l})"),
        None => String::new(),
    }
}

impl ProposeError {
    /// The last known leader, for clients that want to retry there.
    pub fn leader_hint(&self) -> Option<NodeId> {
        match self {
            ProposeError::NoLeader { leader, .. }
            | ProposeError::Timeout { leader, .. }
            | ProposeError::Discarded { leader, .. } => *leader,
            ProposeError::LeaderUnreachable { leader, .. }
            | ProposeError::NotReached { leader, .. } => Some(*leader),
            ProposeError::Fatal { .. }
            | ProposeError::Overloaded { .. }
            | ProposeError::Expired { .. }
            | ProposeError::Invalid { .. } => None,
        }
    }
}

/// A follower that acknowledged none of the leader's messages for this many heartbeat
/// periods is not handed a group.
pub const TRANSFER_ACKED_HEARTBEATS_MAX: u32 = 3;

/// Whether follower `to` can take over the group whose leader's metrics are `m`: it
/// acknowledged the leader within `acked_within` and holds the leader's whole log.
///
/// A transfer stops the leader's heartbeats and writes until the target is elected, and
/// openraft's target ignores the transfer when its log is behind the leader's. Handed to a
/// follower that is cut off or lagging, the group therefore had no working leader until an
/// election timeout passed, and balancing asked again the next round (found by a test whose
/// remove hung after a heal). A log that grows between this check and the transfer can still
/// make the target ignore it: that costs one election timeout, and balancing is rare.
fn can_take_over(
    m: &openraft::RaftMetrics<super::types::CalmRaft>,
    to: NodeId,
    acked_within: Duration,
) -> bool {
    let acked = m
        .heartbeat
        .as_ref()
        .and_then(|h| h.get(&to))
        .cloned()
        .flatten();
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&to))
        .cloned()
        .flatten();
    acked.is_some_and(|at| openraft::Instant::elapsed(&*at) <= acked_within)
        && matched.map(|l| l.index) == m.last_log_index
}

/// Count `group`'s leader changes on `calm_raft_leader_changes_total` until the group stops.
/// A change is a new leader id, or no leader after one: several changes between two looks at
/// the metrics count once, as etcd's counter counts the changes it saw.
async fn count_leader_changes(
    group: GroupId,
    mut metrics: openraft::type_config::alias::WatchReceiverOf<CalmRaft, RaftMetrics<CalmRaft>>,
) {
    let counter =
        metrics::counter!(super::health::METRIC_LEADER_CHANGES, "group" => group.to_string());
    let mut seen = metrics.borrow_watched().current_leader;
    while metrics.changed().await.is_ok() {
        let leader = metrics.borrow_watched().current_leader;
        if leader != seen {
            if leader.is_some() {
                counter.increment(1);
            }
            seen = leader;
        }
    }
}

/// Whether a failed call certainly never reached the peer's group, so that retrying a
/// proposal elsewhere cannot apply it twice: the connection could not be made or closed
/// before the call was queued ([`crate::channel::CONNECT_ERROR`]), or the peer's groups had
/// not started yet.
fn never_reached_the_group(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && (status.message().starts_with(crate::channel::CONNECT_ERROR)
            || status.message().starts_with(super::batch::NOT_SENT)
            || status
                .message()
                .starts_with(super::service::GROUPS_STARTING))
}

/// A committed and applied proposal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposed {
    /// The state machine's answer (identical on every replica).
    pub response: Response,
    pub group: GroupId,
    /// The log index it was applied at: a read that waits for it observes the write.
    pub index: u64,
}

type Reply = oneshot::Sender<Result<Proposed, ProposeError>>;

/// One leadership of a group: a node leading in a term. Terms only grow, so a retry after
/// "not the leader" waits for a different value (see `Consensus::await_leader_change`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leadership {
    leader: NodeId,
    term: u64,
}

/// When a request that was not taken may be sent again (see `Consensus::await_leader_change`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// The leader answered "not the leader": at a new leadership, or after one heartbeat
    /// period (its lease may be valid again by then).
    AnsweredNotLeader,
    /// The leader could not be reached at all: only at a new leadership. Calling the same
    /// unreachable node again would leave a call pending on a connection attempt that a
    /// healed network may still complete after this request's caller was told it failed.
    Unreachable,
}

/// A command waiting for its group's flush.
struct Queued {
    cmd: Command,
    reply: Reply,
    /// When its caller's request timeout ends: the entry carrying it must be answered by the
    /// earliest deadline among its commands.
    deadline: tokio::time::Instant,
    queued_at: tokio::time::Instant,
}

/// One group's commands waiting to be proposed (see "Coalescing").
#[derive(Default)]
struct Waiting {
    queue: VecDeque<Queued>,
    /// Flushes of this group running now (at most `COALESCED_IN_FLIGHT_MAX`).
    flushing: usize,
    /// Whether the last entry taken left commands waiting (a limit, or a second command on
    /// a key): then a second flush is worth its per-entry cost.
    overflowed: bool,
}

/// Roughly the bytes `cmd` adds to an entry.
fn command_bytes(cmd: &Command) -> usize {
    use calm_kernel::command::CommandBody;
    let payload = match &cmd.body {
        CommandBody::RegisterPut { value } => value.len(),
        CommandBody::RegisterCas { value, .. } => value.as_ref().map_or(0, Vec::len),
        CommandBody::SetAdd { element } | CommandBody::SetRemove { element } => element.len(),
        _ => 0,
    };
    64 + cmd.key.len() + payload + 16 * cmd.frontier.entries.len()
}

impl Waiting {
    /// The next entry's commands: the queue's head, FIFO, until a limit or a key already
    /// taken (an entry's keys are distinct; the second command on a key goes in a later
    /// entry). A command whose caller went away is dropped unproposed (that caller already
    /// reported an unknown outcome), and one whose deadline passed while it waited is answered
    /// `Expired`: it was never proposed.
    fn take(&mut self, group: GroupId, now: tokio::time::Instant) -> Vec<Queued> {
        let mut taken: Vec<Queued> = Vec::new();
        let mut keys = HashSet::new();
        let mut bytes = 0;
        while let Some(q) = self.queue.front() {
            if q.reply.is_closed() || q.deadline <= now {
                let q = self.queue.pop_front().expect("front exists");
                let waited_ms = now.saturating_duration_since(q.queued_at).as_millis() as u64;
                let _ = q
                    .reply
                    .send(Err(ProposeError::Expired { group, waited_ms }));
                continue;
            }
            let size = command_bytes(&q.cmd);
            if !taken.is_empty()
                && (taken.len() == COALESCED_COMMANDS_MAX
                    || bytes + size > COALESCED_BYTES_MAX
                    || keys.contains(&q.cmd.key))
            {
                break;
            }
            bytes += size;
            keys.insert(q.cmd.key.clone());
            taken.push(self.queue.pop_front().expect("front exists"));
        }
        taken
    }
}

/// The node's groups. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct Consensus {
    node: NodeId,
    map: GroupMap,
    handles: Arc<GroupHandles>,
    peers: Arc<Peers>,
    local: SharedLocal,
    request_timeout: Duration,
    heartbeat: Duration,
    /// A leader not heard from for longer is not live (`super::health`).
    election_timeout: Duration,
    /// Per group (index = group id), the proposals waiting to be coalesced.
    waiting: Arc<[Mutex<Waiting>]>,
}

impl Consensus {
    /// The gRPC service peers call; serve it before `start` so peers can reach this node.
    pub fn peer_service(
        handles: Arc<GroupHandles>,
        peers: Arc<Peers>,
    ) -> RaftPeerServer<PeerService> {
        RaftPeerServer::new(PeerService { handles, peers })
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// Start every group of this node from its recovered state. `peers` holds the node's one
    /// channel per peer (gossip shares it).
    pub async fn start(
        node: NodeId,
        local: SharedLocal,
        facts: Arc<dyn FactSource>,
        snapshot_dir: PathBuf,
        options: &ConsensusOptions,
        handles: Arc<GroupHandles>,
        peers: Arc<Peers>,
    ) -> Result<Consensus, ConsensusError> {
        let map = GroupMap::new(options.data_groups).with_hash_tags(options.hash_tags);
        let config = options.raft_config()?;
        let commit_notice_hold = options.commit_notice_hold()?;
        let logs = lock_local(&local).raft_logs().clone();
        // Every group starts at once, not one after another, and serves its peers as soon as
        // it has started: `Raft::new` re-applies a group's committed entries, and an entry
        // may wait for facts that in turn wait for their key's creation, a command of another
        // group, which that group may still have to receive from its leader. Started in
        // order, group 1 waited forever for group 2, which never started (found by Jepsen: a
        // restarted node hung).
        handles.prepare(map);
        let mut starting = Vec::new();
        for group in map.all() {
            let start = move |reason: String| ConsensusError::Start { group, reason };
            let sm = GroupStateMachine::open(
                group,
                map,
                local.clone(),
                facts.clone(),
                snapshot_dir.clone(),
            )
            .map_err(|e| start(e.to_string()))?;
            let network = GroupNetwork {
                group,
                peers: peers.clone(),
                commit_notice_hold,
            };
            let raft = Raft::new(node, config.clone(), network, logs.store(group), sm);
            let handles = &handles;
            starting.push(async move {
                let raft = raft.await.map_err(|e| start(e.to_string()))?;
                handles.started(group, raft.clone());
                Ok(raft)
            });
        }
        let rafts = futures::future::try_join_all(starting).await?;
        for (group, raft) in rafts.iter().enumerate() {
            tokio::spawn(count_leader_changes(group as GroupId, raft.metrics()));
        }
        handles.set(rafts);
        Ok(Consensus {
            node,
            map,
            handles,
            peers,
            local,
            request_timeout: Duration::from_millis(options.request_timeout_ms),
            heartbeat: Duration::from_millis(options.heartbeat_ms),
            election_timeout: Duration::from_millis(options.election_timeout_max_ms),
            waiting: map.all().map(|_| Mutex::default()).collect(),
        })
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn group_map(&self) -> GroupMap {
        self.map
    }

    pub fn local(&self) -> &SharedLocal {
        &self.local
    }

    pub fn raft(&self, group: GroupId) -> &Raft {
        &self.handles.all()[group as usize]
    }

    /// Make `members` the voters of every group. Run once, on one node, for a new cluster;
    /// groups already initialized are left alone, so running it again is harmless.
    pub async fn initialize(
        &self,
        members: &BTreeMap<NodeId, BasicNode>,
    ) -> Result<(), ConsensusError> {
        for (group, raft) in self.handles.all().iter().enumerate() {
            let group = group as GroupId;
            match raft.initialize(members.clone()).await {
                Ok(()) => {}
                Err(openraft::errors::RaftError::APIError(
                    openraft::errors::InitializeError::NotAllowed(_),
                )) => {}
                Err(e) => {
                    return Err(ConsensusError::Initialize {
                        group,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The leader of `group` as this node knows it (no allocation: for per-request hints).
    pub fn leader_id(&self, group: GroupId) -> Option<NodeId> {
        self.raft(group).metrics().borrow_watched().current_leader
    }

    /// The leader of `group` as this node knows it, with its peer address: `None` until this
    /// node knows both.
    ///
    /// The two can arrive apart. A node whose group is still empty learns the leader from a
    /// heartbeat (it carries the leader's committed vote) while the leader's replication to
    /// it may still be backing off (its first appends met "still starting"); the address is in
    /// the membership entry, which only that replication brings. A leader without an address
    /// cannot be forwarded to, so for routing and readiness it is no leader yet.
    pub fn leader_of(&self, group: GroupId) -> Option<(NodeId, String)> {
        let metrics = self.raft(group).metrics();
        let m = metrics.borrow_watched();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader)?;
        Some((leader, node.addr.clone()))
    }

    /// Whether `group`'s leader is alive as this node sees it (see `super::health`).
    pub fn health(&self, group: GroupId) -> GroupHealth {
        let metrics = self.raft(group).metrics();
        let m = metrics.borrow_watched();
        match self.handles.contacts() {
            Some(contacts) => {
                super::health::group_health(&m, self.node, group, contacts, self.election_timeout)
            }
            None => GroupHealth {
                leader: m.current_leader,
                last_contact: None,
                live: false,
            },
        }
    }

    /// The election timeout a live leader was heard from within.
    pub fn election_timeout(&self) -> Duration {
        self.election_timeout
    }

    /// Which leadership of `group` this node knows: its leader and the term it leads in.
    fn leadership(&self, group: GroupId) -> Option<Leadership> {
        let metrics = self.raft(group).metrics();
        let m = metrics.borrow_watched();
        Some(Leadership {
            leader: m.current_leader?,
            term: m.current_term,
        })
    }

    fn no_leader(&self, group: GroupId) -> ProposeError {
        ProposeError::NoLeader {
            group,
            leader: self.leader_id(group),
            addr: self.leader_of(group).map(|h| h.1),
        }
    }

    fn timeout(&self, group: GroupId) -> ProposeError {
        ProposeError::Timeout {
            group,
            timeout_ms: self.request_timeout.as_millis() as u64,
            leader: self.leader_id(group),
            addr: self.leader_of(group).map(|h| h.1),
        }
    }

    /// Wait (bounded) until `group` knows a leader and its address ([`Self::leader_of`]).
    async fn await_leader(
        &self,
        group: GroupId,
        deadline: tokio::time::Instant,
    ) -> Option<(NodeId, String)> {
        loop {
            if let Some(l) = self.leader_of(group) {
                return Some(l);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Order `cmd` in its key's group and apply it; the answer is the state machine's.
    /// Concurrent commands of a group may share a log entry (see "Coalescing").
    pub async fn propose(&self, cmd: Command) -> Result<Proposed, ProposeError> {
        let group = self.map.group_of(&cmd.key);
        let (reply, answer) = oneshot::channel();
        let flush = {
            let mut waiting = self.waiting(group);
            if waiting.queue.len() >= COALESCE_QUEUE_MAX {
                return Err(ProposeError::Overloaded {
                    group,
                    queued: waiting.queue.len(),
                });
            }
            let queued_at = tokio::time::Instant::now();
            waiting.queue.push_back(Queued {
                cmd,
                reply,
                deadline: queued_at + self.request_timeout,
                queued_at,
            });
            let flush = waiting.flushing == 0;
            waiting.flushing += usize::from(flush);
            flush
        };
        if flush {
            self.spawn_flush(group);
        }
        answer.await.unwrap_or_else(|_| {
            Err(ProposeError::Fatal {
                group,
                reason: "the proposal's flush ended without an answer (the node is stopping)"
                    .into(),
            })
        })
    }

    fn waiting(&self, group: GroupId) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting[group as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_flush(&self, group: GroupId) {
        // Boxed: a flush spawns flushes, and a recursive future's type must be named.
        let flush: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> =
            Box::pin(self.clone().flush(group));
        tokio::spawn(flush);
    }

    /// Propose `group`'s waiting commands, one entry at a time, until none wait or another
    /// flush can take them all (see "Coalescing").
    ///
    /// No command is left without a flush: the queue is only left to others while
    /// `flushing > 1`, and the last flush leaves only when the queue is empty.
    async fn flush(self, group: GroupId) {
        loop {
            let (taken, second) = {
                let mut waiting = self.waiting(group);
                let taken = waiting.take(group, tokio::time::Instant::now());
                if taken.is_empty() {
                    waiting.flushing -= 1;
                    return;
                }
                waiting.overflowed = !waiting.queue.is_empty();
                // More waits than this entry took: propose the next entry alongside it.
                let second = waiting.overflowed && waiting.flushing < COALESCED_IN_FLIGHT_MAX;
                waiting.flushing += usize::from(second);
                (taken, second)
            };
            if second {
                self.spawn_flush(group);
            }
            let deadline = taken
                .iter()
                .map(|q| q.deadline)
                .min()
                .expect("a flush takes at least one command");
            let (mut cmds, replies): (Vec<Command>, Vec<Reply>) =
                taken.into_iter().map(|q| (q.cmd, q.reply)).unzip();
            let count = cmds.len();
            let request = if count == 1 {
                Request::Command(Arc::new(cmds.pop().expect("one command")))
            } else {
                Request::Commands(cmds.into())
            };
            let answers = match self.propose_by(group, request, deadline).await {
                Ok(Proposed {
                    response, index, ..
                }) => {
                    let responses = match response {
                        Response::Batch(responses) if count > 1 => responses,
                        single if count == 1 => vec![single],
                        other => vec![other],
                    };
                    if responses.len() == count {
                        responses
                            .into_iter()
                            .map(|response| {
                                Ok(Proposed {
                                    response,
                                    group,
                                    index,
                                })
                            })
                            .collect()
                    } else {
                        let e = ProposeError::Fatal {
                            group,
                            reason: format!(
                                "entry {index} answered {} responses for {count} commands (a bug)",
                                responses.len()
                            ),
                        };
                        vec![Err(e); count]
                    }
                }
                Err(e) => vec![Err(e); count],
            };
            for (reply, answer) in replies.into_iter().zip(answers) {
                // A caller that went away no longer wants the answer.
                let _ = reply.send(answer);
            }
            let mut waiting = self.waiting(group);
            if waiting.flushing > 1 && !waiting.overflowed {
                // The other flush takes what waits, in one entry: fewer, fuller entries.
                waiting.flushing -= 1;
                return;
            }
        }
    }

    /// Order `request` in `group` (commands go to their key's group, rules to the metadata
    /// group) and apply it.
    pub async fn propose_to(
        &self,
        group: GroupId,
        request: Request,
    ) -> Result<Proposed, ProposeError> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        self.propose_by(group, request, deadline).await
    }

    /// [`Consensus::propose_to`], answered by `deadline`.
    async fn propose_by(
        &self,
        group: GroupId,
        request: Request,
        deadline: tokio::time::Instant,
    ) -> Result<Proposed, ProposeError> {
        if let Err(reason) = super::check_request(self.map, group, &request) {
            return Err(ProposeError::Invalid { group, reason });
        }
        for _ in 0..LEADER_ATTEMPTS_MAX {
            let Some((leader, addr)) = self.await_leader(group, deadline).await else {
                return Err(self.no_leader(group));
            };
            // What a "not the leader" answer says is over (read before asking: the answer
            // may come after this node already learned of the next leadership).
            let seen = self.leadership(group);
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                // Retries used the time up; nothing was taken (a "not here" answer or none).
                return Err(self.no_leader(group));
            }
            if leader == self.node {
                let started = std::time::Instant::now();
                let write = self.raft(group).client_write(request.clone());
                match tokio::time::timeout(remaining, write).await {
                    Err(_) => return Err(self.timeout(group)),
                    Ok(Ok(resp)) => {
                        metrics::histogram!(METRIC_PROPOSAL_SECONDS).record(started.elapsed());
                        return Ok(Proposed {
                            group,
                            index: resp.log_id.index(),
                            response: resp.data,
                        });
                    }
                    Ok(Err(openraft::errors::RaftError::APIError(
                        ClientWriteError::ForwardToLeader(_),
                    ))) => {
                        self.await_leader_change(group, seen, deadline, Retry::AnsweredNotLeader)
                            .await;
                        continue;
                    }
                    Ok(Err(openraft::errors::RaftError::APIError(
                        ClientWriteError::LogEntryDiscarded(f),
                    ))) => {
                        return Err(ProposeError::Discarded {
                            group,
                            leader: f.leader_id,
                        });
                    }
                    Ok(Err(e)) => {
                        return Err(ProposeError::Fatal {
                            group,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            let forwarded = match self.peers.batcher(Lane::Client, leader, &addr) {
                Ok(batcher) => {
                    batcher
                        .call(PeerRpc::Propose, group, wire::encode(&request), remaining)
                        .await
                }
                Err(status) => Err(status),
            };
            match forwarded {
                Ok(reply) => match wire::decode::<ProposeReply>(&reply) {
                    Ok(ProposeReply::Applied { response, index }) => {
                        return Ok(Proposed {
                            response,
                            group,
                            index,
                        });
                    }
                    Ok(ProposeReply::NotLeader { .. }) => {
                        self.await_leader_change(group, seen, deadline, Retry::AnsweredNotLeader)
                            .await;
                        continue;
                    }
                    Ok(ProposeReply::Discarded { leader }) => {
                        return Err(ProposeError::Discarded { group, leader });
                    }
                    Err(reason) => {
                        return Err(ProposeError::LeaderUnreachable {
                            group,
                            leader,
                            reason,
                        });
                    }
                },
                Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                    return Err(self.timeout(group));
                }
                Err(status) if never_reached_the_group(&status) => {
                    // Certainly not appended: wait for another leader and try there.
                    self.await_leader_change(group, seen, deadline, Retry::Unreachable)
                        .await;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ProposeError::NotReached {
                            group,
                            leader,
                            reason: status.message().to_string(),
                        });
                    }
                    continue;
                }
                Err(status) => {
                    return Err(ProposeError::LeaderUnreachable {
                        group,
                        leader,
                        reason: status.message().to_string(),
                    });
                }
            }
        }
        Err(self.no_leader(group))
    }

    /// Wait before retrying at `group`'s leader a request that was not taken there: until
    /// this node knows another leadership than `old` (another leader, or the same node
    /// leading in a later term), or `deadline`; after a "not the leader" answer, also at most
    /// one heartbeat period.
    ///
    /// The period matters: a leader whose lease lapsed (no quorum ack within the election
    /// timeout, as right after its election until a follower answers) refuses writes yet stays
    /// the leader in the same term, and takes them again once its next heartbeat is answered.
    /// A step-down followed by re-election of the same node (its log is the longest) also
    /// looks like "no other leader"; the term tells.
    async fn await_leader_change(
        &self,
        group: GroupId,
        old: Option<Leadership>,
        deadline: tokio::time::Instant,
        retry: Retry,
    ) {
        let retry_at = match retry {
            Retry::AnsweredNotLeader => deadline.min(tokio::time::Instant::now() + self.heartbeat),
            Retry::Unreachable => deadline,
        };
        while tokio::time::Instant::now() < retry_at {
            match self.leadership(group) {
                Some(now) if Some(now) != old => return,
                _ => {
                    let pause = retry_at.saturating_duration_since(tokio::time::Instant::now());
                    tokio::time::sleep(pause.min(Duration::from_millis(10))).await;
                }
            }
        }
    }

    /// Wait until a read of `group` on this node's replica is linearizable (read-index).
    pub async fn read_barrier(&self, group: GroupId) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let index = self.read_index_by(group, deadline).await?;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.raft(group)
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|_| self.timeout(group))
    }

    /// The read index of `group`: the leader's commit index once it confirmed its
    /// leadership. Every write acknowledged before this call is at or below it; a read of a
    /// replica that applied exactly this index is linearizable. Does not wait for this node
    /// to apply it (see `read_barrier`).
    pub async fn read_index(&self, group: GroupId) -> Result<u64, ProposeError> {
        self.read_index_by(group, tokio::time::Instant::now() + self.request_timeout)
            .await
    }

    async fn read_index_by(
        &self,
        group: GroupId,
        deadline: tokio::time::Instant,
    ) -> Result<u64, ProposeError> {
        for _ in 0..LEADER_ATTEMPTS_MAX {
            let Some((leader, addr)) = self.await_leader(group, deadline).await else {
                return Err(self.no_leader(group));
            };
            // What a "not the leader" answer says is over (read before asking: the answer
            // may come after this node already learned of the next leadership).
            let seen = self.leadership(group);
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                // Retries used the time up; nothing was taken (a "not here" answer or none).
                return Err(self.no_leader(group));
            }
            let index = if leader == self.node {
                match tokio::time::timeout(
                    remaining,
                    self.raft(group).get_read_linearizer(ReadPolicy::ReadIndex),
                )
                .await
                {
                    Err(_) => return Err(self.timeout(group)),
                    Ok(Ok(lin)) => lin.read_log_id().index(),
                    Ok(Err(e)) if e.forward_to_leader().is_some() => {
                        self.await_leader_change(group, seen, deadline, Retry::AnsweredNotLeader)
                            .await;
                        continue;
                    }
                    Ok(Err(_)) => return Err(self.no_leader(group)),
                }
            } else {
                let asked = match self.peers.batcher(Lane::Client, leader, &addr) {
                    Ok(batcher) => {
                        batcher
                            .call(PeerRpc::ReadIndex, group, Vec::new(), remaining)
                            .await
                    }
                    Err(status) => Err(status),
                };
                match asked {
                    Ok(reply) => match wire::decode::<ReadIndexReply>(&reply) {
                        Ok(ReadIndexReply::At { index }) => index,
                        Ok(ReadIndexReply::NotLeader { .. }) => {
                            self.await_leader_change(
                                group,
                                seen,
                                deadline,
                                Retry::AnsweredNotLeader,
                            )
                            .await;
                            continue;
                        }
                        Err(reason) => {
                            return Err(ProposeError::LeaderUnreachable {
                                group,
                                leader,
                                reason,
                            });
                        }
                    },
                    // A read changes nothing: any failure may be retried at the next leader.
                    Err(status) => {
                        self.await_leader_change(group, seen, deadline, Retry::Unreachable)
                            .await;
                        if tokio::time::Instant::now() >= deadline {
                            return Err(ProposeError::LeaderUnreachable {
                                group,
                                leader,
                                reason: status.message().to_string(),
                            });
                        }
                        continue;
                    }
                }
            };
            return Ok(index);
        }
        Err(self.no_leader(group))
    }

    /// Ask `to` to take over leadership of `group` (this node must lead it).
    pub async fn transfer_leader(&self, group: GroupId, to: NodeId) -> Result<(), ProposeError> {
        self.raft(group)
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| ProposeError::Fatal {
                group,
                reason: e.to_string(),
            })
    }

    /// Spread leaders: the preferred leader of data group g is the (g mod n)-th voter, and
    /// of group 0 the first. A node that leads a group it is not preferred for hands it over,
    /// once the preferred node can take it (see [`can_take_over`]). Returns how many
    /// transfers it asked for.
    pub async fn balance_leaders(&self) -> usize {
        let acked_within = self.heartbeat * TRANSFER_ACKED_HEARTBEATS_MAX;
        let mut asked = 0;
        for (group, raft) in self.handles.all().iter().enumerate() {
            let preferred = {
                let metrics = raft.metrics();
                let m = metrics.borrow_watched();
                if m.current_leader != Some(self.node) {
                    continue;
                }
                let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
                if voters.is_empty() {
                    continue;
                }
                let preferred = voters[group % voters.len()];
                if preferred == self.node || !can_take_over(&m, preferred, acked_within) {
                    continue;
                }
                preferred
            };
            if raft.trigger().transfer_leader(preferred).await.is_ok() {
                asked += 1;
            }
        }
        asked
    }

    /// Groups this node currently leads.
    pub fn led_groups(&self) -> Vec<GroupId> {
        self.handles
            .all()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.metrics().borrow_watched().current_leader == Some(self.node))
            .map(|(g, _)| g as GroupId)
            .collect()
    }

    /// The term this node leads `group` in, if it leads it.
    pub fn led_term(&self, group: GroupId) -> Option<u64> {
        let metrics = self.raft(group).metrics();
        let m = metrics.borrow_watched();
        (m.current_leader == Some(self.node)).then_some(m.current_term)
    }

    /// Stop every group (their state stays on disk).
    pub async fn shutdown(&self) {
        for raft in self.handles.all() {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(error = %e, "a Raft group did not stop cleanly");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calm_kernel::HlcTimestamp;
    use calm_kernel::command::CommandBody;

    fn queued(
        key: &str,
        deadline: tokio::time::Instant,
    ) -> (Queued, oneshot::Receiver<Result<Proposed, ProposeError>>) {
        let (reply, answer) = oneshot::channel();
        let cmd = Command {
            key: key.as_bytes().to_vec(),
            hlc: HlcTimestamp(1),
            proposer: 1,
            body: CommandBody::RegisterPut { value: vec![0; 8] },
            frontier: Default::default(),
            absorb: None,
        };
        let queued_at = deadline - Duration::from_secs(5);
        (
            Queued {
                cmd,
                reply,
                deadline,
                queued_at,
            },
            answer,
        )
    }

    #[tokio::test]
    async fn take_answers_expired_commands_skips_abandoned_ones_and_keeps_keys_distinct() {
        let now = tokio::time::Instant::now();
        let later = now + Duration::from_secs(1);
        let mut waiting = Waiting::default();
        let (a, mut a_answer) = queued("a", later);
        let (expired, mut expired_answer) = queued("b", now);
        let (abandoned, abandoned_answer) = queued("c", later);
        drop(abandoned_answer);
        let (b, _b_answer) = queued("b", later);
        let (a_again, _a_again_answer) = queued("a", later);
        for q in [a, expired, abandoned, b, a_again] {
            waiting.queue.push_back(q);
        }

        let keys = |taken: &[Queued]| -> Vec<Vec<u8>> {
            taken.iter().map(|q| q.cmd.key.clone()).collect()
        };
        let first = waiting.take(3, now);
        assert_eq!(keys(&first), [b"a".to_vec(), b"b".to_vec()]);
        match expired_answer.try_recv() {
            Ok(Err(ProposeError::Expired {
                group: 3,
                waited_ms: 5000,
            })) => {}
            other => panic!("the expired command's answer: {other:?}"),
        }
        assert!(
            a_answer.try_recv().is_err(),
            "a taken command is answered by its flush"
        );
        // The second command on "a" waits for the next entry.
        assert_eq!(keys(&waiting.take(3, now)), [b"a".to_vec()]);
        assert!(waiting.take(3, now).is_empty());
    }
}
