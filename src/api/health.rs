//! Readiness: whether this node can serve every key now, and the `grpc.health.v1` service
//! that reports it (HTTP's `/readyz` reports the same).
//!
//! A node is ready when every group has a live leader as it sees it: a leader whose
//! address it knows and that it heard from within the election timeout, or, if it leads
//! the group itself, that a quorum acknowledged within it (`calm_raft::consensus::health`).
//! A node that merely remembers a leader is not ready: with two of three nodes stopped,
//! openraft goes on naming the old leader, and every consensus write fails.

use super::kv::KvService;
use super::pb::kv_server::KvServer;
use crate::node::Node;
use calm_raft::consensus::GroupId;
use calm_raft::consensus::health::GroupHealth;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the gRPC health status is brought up to date.
const HEALTH_REFRESH: Duration = Duration::from_millis(250);

/// A group this node cannot serve now, and what it knows of its leader.
#[derive(Clone, Debug)]
pub struct Unready {
    pub group: GroupId,
    pub health: GroupHealth,
}

impl std::fmt::Display for Unready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.group;
        match (self.health.leader, self.health.last_contact) {
            (None, _) => write!(f, "group {g}: no leader known"),
            (Some(l), None) => write!(f, "group {g}: leader n{l} not heard from yet"),
            (Some(l), Some(ago)) => write!(
                f,
                "group {g}: leader n{l} last heard from {:.1} s ago",
                ago.as_secs_f64()
            ),
        }
    }
}

impl Node {
    /// Every group without a live leader here (empty: this node is ready).
    pub fn unready_groups(&self) -> Vec<Unready> {
        self.consensus
            .group_map()
            .all()
            .map(|group| Unready {
                group,
                health: self.consensus.health(group),
            })
            .filter(|u| !u.health.live)
            .collect()
    }

    /// Why this node is not ready, in one line (`None`: it is).
    pub fn not_ready_reason(&self) -> Option<String> {
        let unready = self.unready_groups();
        if unready.is_empty() {
            return None;
        }
        let groups: Vec<String> = unready.iter().map(ToString::to_string).collect();
        Some(format!(
            "not ready: {} (no quorum reachable from this node, or an election under way; a leader counts once heard from within the election timeout of {} ms)",
            groups.join("; "),
            self.consensus.election_timeout().as_millis()
        ))
    }
}

/// Keep the health service's status (overall and for `calm.v1.Kv`) equal to readiness until
/// `shutdown`.
pub(super) async fn follow_readiness(
    node: Arc<Node>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut serving = None;
    loop {
        let ready = node.unready_groups().is_empty();
        if serving != Some(ready) {
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            // "" is the whole server's status, the one `grpc_health_probe` and grpcurl's
            // `grpc.health.v1.Health/Check {}` ask for.
            health.set_service_status("", status).await;
            health
                .set_service_status(
                    <KvServer<KvService> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            serving = Some(ready);
        }
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_REFRESH) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
