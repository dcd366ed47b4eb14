//! The peer-facing gRPC service: routes each message to its group's Raft.
//!
//! The service exists before the groups do (a node must listen before it can be elected),
//! so groups are registered into a [`GroupHandles`] once they started; until then peers get
//! UNAVAILABLE and openraft retries.

use super::commit_notice::RELEASE_WINDOW;
use super::health::LeaderContacts;
use super::network::Peers;
use super::snapshot;
use super::types::{GroupId, ReadPolicy, Request, Snapshot, SnapshotMeta, Vote};
use super::wire::{
    self, GroupMessage, PeerBatch, PeerBatchReply, PeerCall, PeerResult, PeerRpc, ProposeReply,
    ReadIndexReply, SnapshotChunk, raft_peer_server::RaftPeer,
};
use super::{ClientWriteError, GroupMap, Raft};
use std::sync::{Arc, OnceLock};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

/// How an UNAVAILABLE answer from a node whose groups are not running yet begins.
pub const GROUPS_STARTING: &str = "this node's Raft groups are still starting";

/// Header naming the caller's cluster on every peer call (`crate::consensus::network::Peers`).
pub const CLUSTER_ID_HEADER: &str = "calm-cluster-id";
/// How the refusal of a call from another cluster's node begins.
pub const OTHER_CLUSTER: &str = "refused: the caller belongs to another cluster";
/// Header naming how the caller maps keys to groups ([`GroupMap::fingerprint`]).
pub const GROUP_MAP_HEADER: &str = "calm-group-map";
/// How the refusal of a call from a node with another group map begins.
pub const OTHER_GROUP_MAP: &str = "refused: the caller maps keys to groups differently";

/// An interceptor for the peer server: calls naming another cluster than `cluster_id`, or
/// another group map than `group_map`, are refused with FAILED_PRECONDITION before any
/// service sees them. A node started with another member list computes another cluster id,
/// so it can neither vote in, nor send entries or facts to, this cluster; a node whose
/// `cluster.toml` records another group count or hash-tag rule would route commands to
/// groups that do not own their keys. Calls without a header (tools, tests, nodes of
/// versions before the group-map header) pass that check.
pub fn check_cluster(
    cluster_id: String,
    group_map: String,
) -> impl FnMut(GrpcRequest<()>) -> Result<GrpcRequest<()>, Status> + Clone {
    // A refused node retries every heartbeat, in every group: warn once per 10 s.
    let last_warned = Arc::new(std::sync::atomic::AtomicU64::new(0));
    move |request: GrpcRequest<()>| {
        if let Some(theirs) = request.metadata().get(GROUP_MAP_HEADER) {
            let theirs = theirs.to_str().unwrap_or("(not text)");
            if theirs != group_map {
                if warn_now(&last_warned) {
                    tracing::warn!(
                        caller_group_map = theirs,
                        group_map = %group_map,
                        "refused a peer call from a node that maps keys to groups differently (another cluster.toml)"
                    );
                }
                return Err(Status::failed_precondition(format!(
                    "{OTHER_GROUP_MAP} (its cluster.toml: {theirs}; this node's: {group_map}). The group count and hash-tag rule are fixed per cluster: start that node on a data directory whose cluster.toml matches the cluster's (docs/subjects.md)"
                )));
            }
        }
        let Some(theirs) = request.metadata().get(CLUSTER_ID_HEADER) else {
            return Ok(request);
        };
        let theirs = theirs.to_str().unwrap_or("(not text)");
        if theirs == cluster_id {
            return Ok(request);
        }
        let from = request
            .remote_addr()
            .map_or("an unknown address".to_string(), |a| a.to_string());
        if warn_now(&last_warned) {
            tracing::warn!(
            caller = %from,
            caller_cluster = theirs,
            cluster = %cluster_id,
            "refused a peer call from a node of another cluster (started with another member list)"
            );
        }
        Err(Status::failed_precondition(format!(
            "{OTHER_CLUSTER} ({theirs}, this node's is {cluster_id}): it was started with another member list than this cluster was created with. Start it with the cluster's member list (see `calm status` on a member), on an empty data directory if it never was a member"
        )))
    }
}

/// Whether a refusal may be logged now: one warning per 10 s at most.
fn warn_now(last_warned: &std::sync::atomic::AtomicU64) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = last_warned.load(Relaxed);
    now >= last + 10
        && last_warned
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
}

/// The node's groups. Each group serves peers as soon as it has started, before the others:
/// a group re-applying its log at start may wait for a command another group must first
/// receive from its leader (see `Consensus::start`).
#[derive(Default)]
pub struct GroupHandles {
    /// One slot per group, filled when that group has started.
    slots: OnceLock<Box<[OnceLock<Raft>]>>,
    /// Every group, once all have started.
    rafts: OnceLock<Vec<Raft>>,
    /// When each group last heard from its leader (see `health`).
    contacts: OnceLock<LeaderContacts>,
    /// How keys map to the groups.
    map: OnceLock<GroupMap>,
}

impl GroupHandles {
    pub fn new() -> Arc<GroupHandles> {
        Arc::new(GroupHandles::default())
    }

    /// Make room for `groups` groups (the metadata group included); once, before any starts.
    pub fn prepare(&self, map: GroupMap) {
        let groups = map.all().count();
        let slots = (0..groups).map(|_| OnceLock::new()).collect();
        assert!(self.slots.set(slots).is_ok(), "groups are prepared once");
        let _ = self.contacts.set(LeaderContacts::new(groups));
        let _ = self.map.set(map);
    }

    /// How keys map to the groups (`None` before the groups are prepared).
    pub fn map(&self) -> Option<GroupMap> {
        self.map.get().copied()
    }

    /// `group` has started: serve its peers' messages from now on.
    pub fn started(&self, group: GroupId, raft: Raft) {
        let slot = &self.slots.get().expect("prepared before any group starts")[group as usize];
        assert!(slot.set(raft).is_ok(), "group {group} starts once");
    }

    /// Every group has started.
    pub fn set(&self, rafts: Vec<Raft>) {
        assert!(self.rafts.set(rafts).is_ok(), "groups are registered once");
    }

    pub fn get(&self, group: GroupId) -> Result<&Raft, Status> {
        let starting = || Status::unavailable(format!("{GROUPS_STARTING}; retry (group {group})"));
        let slots = self.slots.get().ok_or_else(starting)?;
        let slot = slots.get(group as usize).ok_or_else(|| {
            Status::invalid_argument(format!(
                "group {group} does not exist on this node ({} groups); the peers disagree on the group count",
                slots.len()
            ))
        })?;
        slot.get().ok_or_else(starting)
    }

    /// How many groups this node has (0 before they are prepared).
    pub fn count(&self) -> usize {
        self.slots.get().map_or(0, |s| s.len())
    }

    /// When each group last heard from its leader (`None` before the groups are prepared).
    pub fn contacts(&self) -> Option<&LeaderContacts> {
        self.contacts.get()
    }

    /// Every group, once all have started (empty before).
    pub fn all(&self) -> &[Raft] {
        self.rafts.get().map_or(&[], Vec::as_slice)
    }
}

pub struct PeerService {
    pub handles: Arc<GroupHandles>,
    /// This node's queues to its peers (to release a commit notice with a proposal's answer).
    pub peers: Arc<Peers>,
}

impl PeerService {
    /// One Raft message: decode it for its group's Raft, let `f` hand it over, encode the
    /// answer.
    async fn call<Req, Resp, E, F, Fut>(
        &self,
        req: GrpcRequest<GroupMessage>,
        f: F,
    ) -> Result<GrpcResponse<GroupMessage>, Status>
    where
        Req: serde::de::DeserializeOwned,
        Resp: serde::Serialize,
        E: std::fmt::Display,
        F: FnOnce(Raft, Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp, E>>,
    {
        let msg = req.into_inner();
        let raft = self.handles.get(msg.group)?.clone();
        let rpc = wire::decode(&msg.payload).map_err(bad)?;
        let resp = f(raft, rpc).await.map_err(raft_failed)?;
        reply(msg.group, &resp)
    }

    /// One call of a batch, answered like the unary RPC it names.
    async fn batched(&self, call: PeerCall) -> PeerResult {
        let started = std::time::Instant::now();
        let rpc = PeerRpc::try_from(call.rpc);
        let answer = match (call.message, rpc) {
            (None, _) => Err(Status::invalid_argument(
                "a batched call without its message",
            )),
            (Some(m), Ok(PeerRpc::AppendEntries)) => self.append_entries(GrpcRequest::new(m)).await,
            (Some(m), Ok(PeerRpc::Vote)) => self.vote(GrpcRequest::new(m)).await,
            (Some(m), Ok(PeerRpc::PreVote)) => self.pre_vote(GrpcRequest::new(m)).await,
            (Some(m), Ok(PeerRpc::TransferLeader)) => {
                self.transfer_leader(GrpcRequest::new(m)).await
            }
            (Some(m), Ok(PeerRpc::Propose)) => self.propose(GrpcRequest::new(m)).await,
            (Some(m), Ok(PeerRpc::ReadIndex)) => self.read_index(GrpcRequest::new(m)).await,
            (Some(_), Ok(PeerRpc::Unspecified) | Err(_)) => Err(Status::invalid_argument(format!(
                "unknown batched call kind {}; run the same calm version on every node",
                call.rpc
            ))),
        };
        if let Ok(rpc) = rpc {
            metrics::histogram!(super::metrics::METRIC_PEER_SERVE_SECONDS, "rpc" => rpc_name(rpc))
                .record(started.elapsed());
        }
        match answer {
            Ok(reply) => PeerResult {
                payload: reply.into_inner().payload,
                code: tonic::Code::Ok as i32,
                message: String::new(),
            },
            Err(status) => PeerResult {
                payload: Vec::new(),
                code: status.code() as i32,
                message: status.message().to_string(),
            },
        }
    }
}

/// The label of `rpc` on [`super::metrics::METRIC_PEER_SERVE_SECONDS`].
fn rpc_name(rpc: PeerRpc) -> &'static str {
    match rpc {
        PeerRpc::Unspecified => "unspecified",
        PeerRpc::AppendEntries => "append_entries",
        PeerRpc::Vote => "vote",
        PeerRpc::PreVote => "pre_vote",
        PeerRpc::TransferLeader => "transfer_leader",
        PeerRpc::Propose => "propose",
        PeerRpc::ReadIndex => "read_index",
    }
}

fn bad(e: String) -> Status {
    Status::invalid_argument(e)
}

fn raft_failed(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the group cannot serve this now: {e}"))
}

fn reply<T: serde::Serialize>(
    group: GroupId,
    value: &T,
) -> Result<GrpcResponse<GroupMessage>, Status> {
    Ok(GrpcResponse::new(GroupMessage {
        group,
        payload: wire::encode(value),
    }))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        req: GrpcRequest<GroupMessage>,
    ) -> Result<GrpcResponse<GroupMessage>, Status> {
        use openraft::vote::RaftLeaderId;
        let group = req.get_ref().group;
        let contacts = self.handles.contacts();
        self.call(
            req,
            |raft, rpc: super::types::AppendEntriesRequest| async move {
                let leader = *rpc.vote.leader_id().node_id();
                let answer = raft.append_entries(rpc).await;
                // Accepted from a leader this node recognises (not refused for a stale term):
                // the leader is alive as far as this node can tell (`health`).
                if let Ok(resp) = &answer
                    && !matches!(resp, super::types::AppendEntriesResponse::HigherVote(_))
                    && let Some(contacts) = contacts
                {
                    contacts.heard(group, leader);
                }
                answer
            },
        )
        .await
    }

    async fn vote(
        &self,
        req: GrpcRequest<GroupMessage>,
    ) -> Result<GrpcResponse<GroupMessage>, Status> {
        self.call(req, |raft, rpc| async move { raft.vote(rpc).await })
            .await
    }

    async fn pre_vote(
        &self,
        req: GrpcRequest<GroupMessage>,
    ) -> Result<GrpcResponse<GroupMessage>, Status> {
        self.call(req, |raft, rpc| async move { raft.pre_vote(rpc).await })
            .await
    }

    async fn transfer_leader(
        &self,
        req: GrpcRequest<GroupMessage>,
    ) -> Result<GrpcResponse<GroupMessage>, Status> {
        self.call(req, |raft, rpc| async move {
            raft.handle_transfer_leader(rpc).await
        })
        .await
    }

    async fn install_snapshot(
        &self,
        req: GrpcRequest<Streaming<SnapshotChunk>>,
    ) -> Result<GrpcResponse<GroupMessage>, Status> {
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("snapshot stream ended before its first chunk")
        })?;
        let group = first.group;
        let (vote, meta): (Vote, SnapshotMeta) = wire::decode(&first.header).map_err(bad)?;
        let mut data = first.data;
        while let Some(chunk) = stream.message().await? {
            if chunk.group != group {
                return Err(Status::invalid_argument(
                    "snapshot chunks name different groups",
                ));
            }
            if (data.len() + chunk.data.len()) as u64 > snapshot::SNAPSHOT_BYTES_MAX {
                return Err(Status::resource_exhausted(format!(
                    "snapshot exceeds {} bytes; refusing it",
                    snapshot::SNAPSHOT_BYTES_MAX
                )));
            }
            data.extend_from_slice(&chunk.data);
        }
        // Verify before openraft sees it: a corrupt transfer must not reach install.
        let body = snapshot::decode(&data).map_err(|e| Status::data_loss(e.to_string()))?;
        if body.group != group || body.meta != meta {
            return Err(Status::invalid_argument(
                "snapshot header and body disagree",
            ));
        }
        let raft = self.handles.get(group)?;
        let resp = raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: data,
                },
            )
            .await
            .map_err(raft_failed)?;
        reply(group, &resp)
    }

    async fn batch(
        &self,
        req: GrpcRequest<PeerBatch>,
    ) -> Result<GrpcResponse<PeerBatchReply>, Status> {
        let calls = req.into_inner().calls;
        if calls.len() > super::batch::BATCH_CALLS_MAX {
            return Err(Status::invalid_argument(format!(
                "a batch of {} calls exceeds {}; run the same calm version on every node",
                calls.len(),
                super::batch::BATCH_CALLS_MAX
            )));
        }
        let results = futures::future::join_all(calls.into_iter().map(|c| self.batched(c))).await;
        Ok(GrpcResponse::new(PeerBatchReply { results }))
    }

    async fn propose(
        &self,
        req: GrpcRequest<GroupMessage>,
    ) -> Result<GrpcResponse<GroupMessage>, Status> {
        let msg = req.into_inner();
        let raft = self.handles.get(msg.group)?;
        let request: Request = wire::decode(&msg.payload).map_err(bad)?;
        let map = self
            .handles
            .map()
            .ok_or_else(|| Status::unavailable("this node's groups are still starting"))?;
        super::check_request(map, msg.group, &request).map_err(bad)?;
        let proposer = match &request {
            Request::Command(cmd) => Some(cmd.proposer),
            Request::Commands(cmds) => cmds.first().map(|c| c.proposer),
            Request::Txn(txn) | Request::TxnLeased { txn, .. } => Some(txn.proposer),
            Request::Lease(entry) => Some(entry.proposer),
            Request::Leased { cmd, .. } => Some(cmd.proposer),
            Request::InitRules { .. } | Request::SetRules { .. } => None,
        };
        let started = std::time::Instant::now();
        let answer = match raft.client_write(request).await {
            Ok(resp) => {
                metrics::histogram!(super::metrics::METRIC_PROPOSAL_SECONDS)
                    .record(started.elapsed());
                // The proposer usually reads what it wrote next: its commit notice goes with
                // this answer, not a hold later (`super::commit_notice`).
                if let Some(node) = proposer {
                    self.peers.release_deferred(node, RELEASE_WINDOW);
                }
                ProposeReply::Applied {
                    index: resp.log_id.index(),
                    response: resp.data,
                }
            }
            Err(openraft::errors::RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                ProposeReply::NotLeader {
                    leader: f.leader_id,
                }
            }
            Err(openraft::errors::RaftError::APIError(ClientWriteError::LogEntryDiscarded(f))) => {
                ProposeReply::Discarded {
                    leader: f.leader_id,
                }
            }
            Err(e) => return Err(raft_failed(e)),
        };
        reply(msg.group, &answer)
    }

    async fn read_index(
        &self,
        req: GrpcRequest<GroupMessage>,
    ) -> Result<GrpcResponse<GroupMessage>, Status> {
        let msg = req.into_inner();
        let raft = self.handles.get(msg.group)?;
        let answer = match raft.get_read_linearizer(ReadPolicy::ReadIndex).await {
            Ok(linearizer) => ReadIndexReply::At {
                index: linearizer.read_log_id().index(),
            },
            Err(e) => match e.forward_to_leader() {
                Some(f) => ReadIndexReply::NotLeader {
                    leader: f.leader_id,
                },
                None => return Err(raft_failed(e)),
            },
        };
        reply(msg.group, &answer)
    }
}
