//! Raft traffic between nodes: one gRPC channel per peer shared by every group.
//!
//! openraft asks for a client per (group, target); all of them for one target share that
//! target's tonic channel (one HTTP/2 connection, streams multiplexed), so a node with many
//! groups still keeps one connection per peer. Messages name their group; the peer's
//! [`PeerService`](super::service::PeerService) routes them. Unary calls of all groups to
//! one peer share `Batch` RPCs ([`super::batch`]); snapshots stream on their own.
//!
//! Errors: a peer that does not answer (connection refused, deadline passed, stopped process)
//! is `Unreachable`, which makes openraft back off; anything else is a `Network` error.

use super::batch::{Batcher, Lane};
use super::commit_notice::{AppendStream, SendAppend};
use super::types::{
    AppendEntriesRequest, AppendEntriesResponse, CalmRaft, GroupId, NodeId, Snapshot,
    SnapshotResponse, TransferLeaderRequest, Vote, VoteRequest, VoteResponse,
};
use super::wire::{self, PeerRpc, SnapshotChunk, raft_peer_client::RaftPeerClient};
use crate::channel::{ChannelOptions, H2Channel};
use futures::Stream;
use openraft::OptionalSend;
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderResponse;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes of snapshot data per streamed chunk (well under tonic's 4 MiB message limit).
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// How long a connection attempt to a peer may take before the call fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The node's channels to its peers, one per peer, created lazily, and the batchers that
/// carry every unary Raft call over them ([`super::batch`]).
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<NodeId, (String, H2Channel)>>,
    batchers: Mutex<HashMap<(NodeId, Lane), (String, Batcher)>>,
    local_ip: Option<IpAddr>,
    /// Sent with every call (`super::service::CLUSTER_ID_HEADER`), so that peers refuse this
    /// node if it belongs to another cluster.
    cluster_id: Option<http::HeaderValue>,
    /// Sent with every call (`super::service::GROUP_MAP_HEADER`): peers refuse a node that
    /// maps keys to groups otherwise.
    group_map: Option<http::HeaderValue>,
}

impl Peers {
    pub fn new() -> Arc<Peers> {
        Arc::new(Peers::default())
    }

    /// Connections to peers are made from `ip`, the address this node's peer service listens
    /// on, so that peers (and firewall rules) see one address per node.
    pub fn bound_to(ip: IpAddr) -> Arc<Peers> {
        Arc::new(Peers {
            channels: Mutex::default(),
            batchers: Mutex::default(),
            local_ip: (!ip.is_unspecified()).then_some(ip),
            cluster_id: None,
            group_map: None,
        })
    }

    /// Like [`bound_to`](Self::bound_to), naming this node's cluster and its group map
    /// ([`GroupMap::fingerprint`](super::GroupMap::fingerprint)) on every call.
    pub fn for_cluster(ip: IpAddr, cluster_id: &str, group_map: &str) -> Arc<Peers> {
        Arc::new(Peers {
            channels: Mutex::default(),
            batchers: Mutex::default(),
            local_ip: (!ip.is_unspecified()).then_some(ip),
            cluster_id: http::HeaderValue::from_str(cluster_id).ok(),
            group_map: http::HeaderValue::from_str(group_map).ok(),
        })
    }

    /// The queue of `lane` to `node` at `addr`: its unary calls are batched with the lane's
    /// other calls that wait for that peer. A changed address replaces it.
    pub fn batcher(&self, lane: Lane, node: NodeId, addr: &str) -> Result<Batcher, tonic::Status> {
        let mut batchers = self.batchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((known, batcher)) = batchers.get(&(node, lane))
            && known == addr
        {
            return Ok(batcher.clone());
        }
        let batcher = Batcher::start(node, lane, self.client(node, addr)?);
        batchers.insert((node, lane), (addr.to_string(), batcher.clone()));
        Ok(batcher)
    }

    /// Send the deferred calls of the Raft lane to `node` now and during `window`, if there
    /// is such a lane ([`Batcher::release_deferred`]).
    pub fn release_deferred(&self, node: NodeId, window: Duration) {
        let batchers = self.batchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, batcher)) = batchers.get(&(node, Lane::Raft)) {
            batcher.release_deferred(window);
        }
    }

    /// The client for `node` at `addr` (`host:port`). A changed address replaces the channel.
    pub fn client(
        &self,
        node: NodeId,
        addr: &str,
    ) -> Result<RaftPeerClient<H2Channel>, tonic::Status> {
        self.channel(node, addr).map(RaftPeerClient::new)
    }

    /// The one channel to `node` at `addr`, for any peer service (Raft, gossip).
    pub fn channel(&self, node: NodeId, addr: &str) -> Result<H2Channel, tonic::Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((known, channel)) = channels.get(&node)
            && known == addr
        {
            return Ok(channel.clone());
        }
        let options = ChannelOptions {
            connect_timeout: CONNECT_TIMEOUT,
            local_ip: self.local_ip,
            // A stopped (SIGSTOP) peer keeps its TCP connection open: keepalive notices.
            keepalive_interval: Some(Duration::from_secs(1)),
            keepalive_timeout: Duration::from_secs(2),
            // Callers bound their own calls (openraft's TTLs, the batcher's deadlines).
            call_timeout: None,
            headers: [
                (super::service::CLUSTER_ID_HEADER, &self.cluster_id),
                (super::service::GROUP_MAP_HEADER, &self.group_map),
            ]
            .into_iter()
            .filter_map(|(name, value)| Some((http::HeaderName::from_static(name), value.clone()?)))
            .collect(),
        };
        let channel = H2Channel::lazy(addr, options).map_err(|e| {
            tonic::Status::invalid_argument(format!("peer {node}: {}", e.message()))
        })?;
        channels.insert(node, (addr.to_string(), channel.clone()));
        Ok(channel)
    }
}

/// openraft's network factory for one group.
pub struct GroupNetwork {
    pub group: GroupId,
    pub peers: Arc<Peers>,
    /// How long a commit notice may wait to ride on the next entries ([`super::commit_notice`]).
    pub commit_notice_hold: Duration,
}

impl RaftNetworkFactory<CalmRaft> for GroupNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &super::types::BasicNode) -> PeerClient {
        PeerClient {
            group: self.group,
            target,
            addr: node.addr.clone(),
            batcher: self.peers.batcher(Lane::Raft, target, &node.addr),
            peers: self.peers.clone(),
            commit_notice_hold: self.commit_notice_hold,
        }
    }
}

/// openraft's client for one (group, target).
pub struct PeerClient {
    group: GroupId,
    target: NodeId,
    addr: String,
    /// The Raft lane to `target`, shared with the node's other groups (openraft makes a new
    /// client when a member's address changes).
    batcher: Result<Batcher, tonic::Status>,
    peers: Arc<Peers>,
    commit_notice_hold: Duration,
}

fn rpc_error(status: tonic::Status) -> RPCError<CalmRaft> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

/// A peer's answer to one of `group`'s calls.
fn decode_reply<Resp: serde::de::DeserializeOwned>(
    group: GroupId,
    target: NodeId,
    reply: &[u8],
) -> Result<Resp, RPCError<CalmRaft>> {
    wire::decode(reply).map_err(|e| {
        RPCError::Network(NetworkError::from_string(format!(
            "group {group} reply from node {target}: {e}"
        )))
    })
}

impl PeerClient {
    fn client(&self) -> Result<RaftPeerClient<H2Channel>, RPCError<CalmRaft>> {
        self.peers
            .client(self.target, &self.addr)
            .map_err(|s| RPCError::Unreachable(Unreachable::new(&s)))
    }

    async fn unary<Req, Resp>(
        &mut self,
        rpc: PeerRpc,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<CalmRaft>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let reply = self
            .batcher
            .as_ref()
            .map_err(|s| rpc_error(s.clone()))?
            .call(rpc, self.group, wire::encode(req), ttl)
            .await
            .map_err(rpc_error)?;
        decode_reply(self.group, self.target, &reply)
    }
}

impl RaftNetworkV2<CalmRaft> for PeerClient {
    type SnapshotData = Vec<u8>;

    /// Requests with entries one at a time, as openraft's default does (a follower must see a
    /// group's appends in order, and a batch's calls run concurrently on the peer); commit
    /// notices ride on other traffic to the peer ([`super::commit_notice`]).
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<CalmRaft>, RPCError<CalmRaft>>>,
            RPCError<CalmRaft>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest> + OptionalSend + Unpin + 'static,
    {
        let (group, target, ttl) = (self.group, self.target, option.hard_ttl());
        let batcher = self.batcher.clone();
        let send: SendAppend = Box::new(move |request, hold| {
            let batcher = batcher.clone();
            Box::pin(async move {
                let batcher = batcher.map_err(rpc_error)?;
                let payload = wire::encode(&request);
                let reply = batcher
                    .call_held(PeerRpc::AppendEntries, group, payload, ttl, hold)
                    .await;
                decode_reply(group, target, &reply.map_err(rpc_error)?)
            })
        });
        let stream = AppendStream::new(input, send, self.commit_notice_hold);
        Box::pin(async move { Ok(Box::pin(stream) as BoxStream<'s, _>) })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse, RPCError<CalmRaft>> {
        self.unary(PeerRpc::AppendEntries, &rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RPCError<CalmRaft>> {
        self.unary(PeerRpc::Vote, &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RPCError<CalmRaft>> {
        self.unary(PeerRpc::PreVote, &rpc, option.hard_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<CalmRaft>, RPCError<CalmRaft>> {
        self.unary(PeerRpc::TransferLeader, &req, option.hard_ttl())
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse, StreamingError<CalmRaft>> {
        let mut client = self
            .client()
            .map_err(|e| StreamingError::Unreachable(Unreachable::from_string(e)))?;
        let header = wire::encode(&(vote, snapshot.meta.clone()));
        let data = snapshot.snapshot;
        let mut chunks = Vec::with_capacity(data.len() / SNAPSHOT_CHUNK_BYTES + 1);
        let mut first = true;
        for piece in data
            .chunks(SNAPSHOT_CHUNK_BYTES)
            .chain(data.is_empty().then_some(&[][..]))
        {
            chunks.push(SnapshotChunk {
                group: self.group,
                header: if first { header.clone() } else { Vec::new() },
                data: piece.to_vec(),
            });
            first = false;
        }
        let mut request = tonic::Request::new(tokio_stream::iter(chunks));
        request.set_timeout(option.hard_ttl());
        let reply = tokio::select! {
            reply = client.install_snapshot(request) => reply,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let reply = reply.map_err(|status| match rpc_error(status) {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Network(n) => StreamingError::Network(n),
            other => StreamingError::Network(NetworkError::from_string(other)),
        })?;
        wire::decode(&reply.into_inner().payload).map_err(|e| {
            StreamingError::Network(NetworkError::from_string(format!(
                "group {} snapshot reply from node {}: {e}",
                self.group, self.target
            )))
        })
    }
}
