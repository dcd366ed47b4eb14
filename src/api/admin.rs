//! The `calm.v1.Admin` service: status, explain, rules and checkpoints.

use super::pb::admin_server::Admin;
use super::{check_key, invalid, pb};
use crate::node::{Node, lock};
use calm_kernel::KeyState;
use calm_raft::consensus::Response;
use std::sync::Arc;
use tonic::{Code, Request, Status};

pub struct AdminService {
    pub(super) node: Arc<Node>,
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
                let health = self.consensus.health(g);
                let last = m.last_log_index.unwrap_or(0);
                let follower_lag: std::collections::HashMap<u64, u64> = m
                    .replication
                    .as_ref()
                    .map(|r| {
                        r.iter()
                            .filter(|(node, _)| **node != self.id())
                            .map(|(node, matched)| {
                                (*node, last.saturating_sub(matched.map_or(0, |l| l.index)))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                pb::Group {
                    id: g,
                    leader: m.current_leader.unwrap_or(0),
                    role: role_name(m.state).into(),
                    term: m.current_term,
                    last_log_index: last,
                    applied_index: m.last_applied.map_or(0, |l| l.index),
                    snapshot_index: m.snapshot.map_or(0, |l| l.index),
                    purged_index: m.purged.map_or(0, |l| l.index),
                    max_follower_lag: follower_lag.values().copied().max().unwrap_or(0),
                    leader_live: health.live,
                    leader_last_contact_ms: health.last_contact.map(|d| d.as_millis() as u64),
                    follower_lag,
                }
            })
            .collect();
        let heard: std::collections::BTreeMap<u64, Option<std::time::Instant>> = self
            .gossip
            .peer_views()
            .into_iter()
            .map(|(node, _, heard)| (node, heard))
            .collect();
        let members = self
            .config
            .members
            .iter()
            .map(|m| pb::Member {
                id: m.id,
                client_addr: m.client.clone(),
                peer_addr: m.peer.clone(),
                last_contact_ms: heard
                    .get(&m.id)
                    .copied()
                    .flatten()
                    .map(|at| at.elapsed().as_millis() as u64),
            })
            .collect();
        let not_ready_reason = self.not_ready_reason();
        let disk_bytes = disk_bytes(&self.config.data_dir);
        let local = lock(&self.local);
        let replica = local.replica();
        pb::StatusResponse {
            node_id: self.id(),
            members,
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
            cluster_id: self.cluster_id.to_string(),
            disk_bytes,
            uptime_seconds: self.started.elapsed().as_secs(),
            ready: not_ready_reason.is_none(),
            not_ready_reason: not_ready_reason.unwrap_or_default(),
            http_addr: self.config.http_addr.to_string(),
            hash_tags: self.consensus.group_map().hash_tags(),
        }
    }
}

/// Most directory entries [`disk_bytes`] visits: a data directory holds a few hundred files
/// (RocksDB's, WAL segments, checkpoints); the bound keeps a status call cheap whatever lies
/// there.
const DISK_WALK_ENTRIES_MAX: usize = 100_000;

/// Disk space the files under `dir` take, as `du` counts it: allocated blocks, each file once
/// (checkpoints hard-link RocksDB's files).
fn disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut total = 0u64;
    let mut visited = 0;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            visited += 1;
            if visited > DISK_WALK_ENTRIES_MAX {
                return total;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    total
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
        let map = self.node.consensus.group_map();
        let group = map.group_of(&key);
        let subject = map.subject(&key).to_vec();
        let (explanation, existing, key_bounds) = {
            let local = lock(&self.node.local);
            let replica = local.replica();
            let state = replica.key_state(&key);
            (
                replica.rules().explain(&key),
                state.map(KeyState::value_type),
                match state {
                    Some(KeyState::Bounded(b)) => Some(b.bounds()),
                    _ => None,
                },
            )
        };
        let bounds = key_bounds.or(explanation.bounds);
        let leader_id = self.node.consensus.leader_id(group).unwrap_or(0);
        Ok(tonic::Response::new(pb::ExplainResponse {
            rule_index: explanation.rule_index.map_or(-1, |i| i as i32),
            pattern: explanation.pattern,
            mode: explanation.mode.to_string(),
            r#type: existing
                .or(explanation.value_type)
                .map_or(String::new(), |t| t.name().to_string()),
            min: bounds.map(|b| b.min),
            max: bounds.map(|b| b.max),
            rule_min: explanation.bounds.map(|b| b.min),
            rule_max: explanation.bounds.map(|b| b.max),
            group,
            leader: leader_id,
            leader_addr: self
                .node
                .client_addr_of(leader_id)
                .unwrap_or_default()
                .to_string(),
            exists: existing.is_some(),
            subject,
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
