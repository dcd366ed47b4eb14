//! Leader-aware routing for clients: each key's consensus-path requests go straight to its
//! group's leader.
//!
//! Any node serves any key. A node that does not lead the key's group forwards a proposal,
//! or asks the leader for a read index, which costs a peer round trip and CPU on both
//! nodes. A client that knows the layout (the members' client addresses, the number of
//! groups, each group's leader: `Admin.Status`) can send those requests to the leader
//! itself, as TiKV's and CockroachDB's clients do with their region and range caches.
//!
//! The layout is read once, from the first endpoint that answers. Leadership moves (a
//! failover, leader balancing), and the router learns of it from the `calm-leader-id`
//! metadata that a node attaches when it served a request by forwarding, or refused one
//! with UNAVAILABLE (see `api`, "Leader hints on success"). A stale entry costs only the
//! forward it would have saved: correctness never depends on the router, and a router that
//! knows nothing sends everything to its first endpoint, like a plain client.
//!
//! Which requests benefit: writes of the consensus path (register put, delete and CAS,
//! counter set, set remove, and every op in `strict` mode) and linearizable reads. The
//! router sends every write of a key to the key's leader, since it cannot tell the path
//! from the client side (rules decide it); a fast-path write served by a leader costs the
//! same as anywhere else.

use crate::api::LEADER_ID_METADATA;
use crate::api::pb;
use crate::api::pb::admin_client::AdminClient;
use crate::api::pb::kv_client::KvClient;
use crate::client::{channel_options, connect};
use anyhow::{Context, Result, bail};
use calm_raft::channel::H2Channel;
use calm_raft::consensus::GroupMap;
use std::collections::BTreeMap;
use tonic::metadata::MetadataMap;
use tonic::{Response, Status};

/// Most groups a router accepts from a node's status (the cluster's group count is fixed at
/// creation; anything larger is a misreport).
pub const GROUPS_MAX: usize = 4096;

/// Sends each key's requests to the node that leads the key's group (module doc). One
/// router is one client: it holds a lazily opened connection to every member. A clone shares
/// those connections and starts with the same leader hints.
#[derive(Clone)]
pub struct Router {
    map: GroupMap,
    /// Per member id, its client connection.
    nodes: BTreeMap<u64, KvClient<H2Channel>>,
    /// Per group (index = group id), the member believed to lead it; 0 when unknown.
    leaders: Vec<u64>,
    /// The endpoint that answered first: used for groups with no known leader.
    fallback: KvClient<H2Channel>,
}

impl Router {
    /// Read the layout from the first of `endpoints` that answers.
    pub async fn connect(endpoints: &[String]) -> Result<Router> {
        let channel = connect(endpoints).await?;
        let status = layout(channel.clone()).await?;
        Router::from_status(&status, channel)
    }

    /// A router that knows no layout: everything goes to `channel`'s node, as with a plain
    /// client (which forwards what it does not lead).
    pub fn unrouted(channel: H2Channel) -> Router {
        Router {
            map: GroupMap::new(1),
            nodes: BTreeMap::new(),
            leaders: vec![0; 2],
            fallback: KvClient::new(channel),
        }
    }

    /// A router for the layout `status` describes; `fallback` serves groups whose leader
    /// is unknown.
    pub fn from_status(status: &pb::StatusResponse, fallback: H2Channel) -> Result<Router> {
        let groups = status.groups.len();
        if !(2..=GROUPS_MAX).contains(&groups) {
            bail!(
                "node {} reports {groups} groups; a cluster has the metadata group and 1..{} data groups",
                status.node_id,
                GROUPS_MAX - 1
            );
        }
        let mut nodes = BTreeMap::new();
        for m in &status.members {
            let channel = H2Channel::lazy(&m.client_addr, channel_options()).map_err(|e| {
                anyhow::anyhow!(
                    "member {} has client address '{}': {}",
                    m.id,
                    m.client_addr,
                    e.message()
                )
            })?;
            nodes.insert(m.id, KvClient::new(channel));
        }
        let mut leaders = vec![0; groups];
        for g in &status.groups {
            if let Some(slot) = leaders.get_mut(g.id as usize) {
                *slot = g.leader;
            }
        }
        Ok(Router {
            map: GroupMap::new(groups as u64 - 1).with_hash_tags(status.hash_tags),
            nodes,
            leaders,
            fallback: KvClient::new(fallback),
        })
    }

    /// The member believed to lead `key`'s group (0 when unknown).
    pub fn leader_of(&self, key: &[u8]) -> u64 {
        self.leaders[self.map.group_of(key) as usize]
    }

    fn kv_for(&mut self, group: usize) -> &mut KvClient<H2Channel> {
        match self.nodes.get_mut(&self.leaders[group]) {
            Some(kv) => kv,
            None => &mut self.fallback,
        }
    }

    /// Take a leader hint in `md` for `group` (a hint naming an unknown member, or none,
    /// changes nothing).
    fn learn(&mut self, group: usize, md: &MetadataMap) {
        let hinted = md
            .get(LEADER_ID_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(leader) = hinted.filter(|l| self.nodes.contains_key(l)) {
            self.leaders[group] = leader;
        }
    }

    /// `Kv.Write`, sent to the key's leader.
    pub async fn write(
        &mut self,
        request: pb::WriteRequest,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let group = self.map.group_of(&request.key) as usize;
        let result = self.kv_for(group).write(request).await;
        self.learn_from(group, &result);
        result
    }

    /// `Kv.Get`, sent to the key's leader.
    pub async fn get(
        &mut self,
        request: pb::GetRequest,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let group = self.map.group_of(&request.key) as usize;
        let result = self.kv_for(group).get(request).await;
        self.learn_from(group, &result);
        result
    }

    /// `Kv.Txn`, sent to the leader of its keys' group (they share one subject); the
    /// first key named decides.
    pub async fn txn(
        &mut self,
        request: pb::TxnRequest,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let first = request
            .compare
            .first()
            .map(|c| c.key.as_slice())
            .or_else(|| request.success.first().map(|o| o.key.as_slice()))
            .or_else(|| request.failure.first().map(|o| o.key.as_slice()))
            .unwrap_or_default();
        let group = self.map.group_of(first) as usize;
        let result = self.kv_for(group).txn(request).await;
        self.learn_from(group, &result);
        result
    }

    /// `Kv.Batch`: its ops may span groups, so it goes to the first endpoint, which
    /// proposes each op to its own group.
    pub async fn batch(
        &mut self,
        request: pb::BatchRequest,
    ) -> Result<Response<pb::BatchResponse>, Status> {
        self.fallback.batch(request).await
    }

    /// `Kv.Scan`: a range spans every group, so it goes to the first endpoint.
    pub async fn scan(
        &mut self,
        request: pb::ScanRequest,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        self.fallback.scan(request).await
    }

    fn learn_from<T>(&mut self, group: usize, result: &Result<Response<T>, Status>) {
        match result {
            Ok(r) => self.learn(group, r.metadata()),
            Err(s) => self.learn(group, s.metadata()),
        }
    }
}

/// The layout a router needs, as the node behind `channel` sees it (`Admin.Status`).
pub async fn layout(channel: H2Channel) -> Result<pb::StatusResponse> {
    Ok(AdminClient::new(channel)
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))
        .context("reading the cluster's layout (Admin.Status) for leader routing")?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(groups: &[(u64, u64)]) -> pb::StatusResponse {
        pb::StatusResponse {
            node_id: 1,
            members: (1..=3)
                .map(|i| pb::Member {
                    id: i,
                    client_addr: format!("127.0.0.1:{}", 7000 + i),
                    peer_addr: format!("127.0.0.1:{}", 7100 + i),
                    last_contact_ms: None,
                })
                .collect(),
            groups: groups
                .iter()
                .map(|&(id, leader)| pb::Group {
                    id,
                    leader,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn lazy() -> H2Channel {
        H2Channel::lazy("127.0.0.1:1", calm_raft::channel::ChannelOptions::default()).unwrap()
    }

    #[tokio::test]
    async fn routes_by_the_layout_and_learns_hints_for_known_members_only() {
        let s = status(&[(0, 1), (1, 2), (2, 3), (3, 0)]);
        let mut r = Router::from_status(&s, lazy()).unwrap();
        let map = GroupMap::new(3);
        let key_in = |g: u64| {
            (0..)
                .map(|i| format!("k{i}").into_bytes())
                .find(|k| map.group_of(k) == g)
                .unwrap()
        };
        assert_eq!(r.leader_of(&key_in(1)), 2);
        assert_eq!(r.leader_of(&key_in(2)), 3);
        assert_eq!(r.leader_of(&key_in(3)), 0, "no leader known");

        let mut md = MetadataMap::new();
        md.insert(LEADER_ID_METADATA, "1".parse().unwrap());
        r.learn(3, &md);
        assert_eq!(r.leader_of(&key_in(3)), 1);
        assert_eq!(r.leader_of(&key_in(1)), 2, "other groups keep their leader");

        md.insert(LEADER_ID_METADATA, "9".parse().unwrap());
        r.learn(3, &md);
        assert_eq!(r.leader_of(&key_in(3)), 1, "node 9 is not a member");
        r.learn(3, &MetadataMap::new());
        assert_eq!(r.leader_of(&key_in(3)), 1, "no hint, no change");
    }

    #[tokio::test]
    async fn refuses_a_layout_without_data_groups_or_with_bad_addresses() {
        let e = Router::from_status(&status(&[(0, 1)]), lazy())
            .err()
            .unwrap();
        assert!(e.to_string().contains("reports 1 groups"), "{e}");
        let mut s = status(&[(0, 1), (1, 1)]);
        s.members[1].client_addr = "no where".into();
        let e = Router::from_status(&s, lazy()).err().unwrap();
        assert!(e.to_string().contains("'no where'"), "{e}");
    }
}
