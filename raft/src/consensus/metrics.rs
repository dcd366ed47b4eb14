//! What the consensus path reports to the process's `metrics` recorder (Prometheus on
//! `/metrics`): how peer traffic is batched, how long a peer round trip takes (etcd's
//! `etcd_network_peer_round_trip_time_seconds`), and how long a proposal takes on its
//! leader from `client_write` to its applied answer (etcd's `etcd_disk_backend_commit`
//! and `etcd_server_proposals_*` cover parts of that). Read with the WAL's histograms, they
//! say where a replicated write's time goes: docs/benchmarks.md reads them that way.

use metrics::{Unit, describe_counter, describe_histogram};

/// Batches sent to peers, by lane (`raft`, `gossip`, ...).
pub const METRIC_PEER_BATCHES: &str = "calm_peer_batches_total";
/// Calls carried by those batches, by lane.
pub const METRIC_PEER_BATCHED_CALLS: &str = "calm_peer_batched_calls_total";
/// Seconds from sending a peer batch to its answer, by lane (answered batches only).
pub const METRIC_PEER_ROUND_TRIP_SECONDS: &str = "calm_peer_round_trip_seconds";
/// Seconds this node took to answer one call of a peer's batch, by call (`append_entries`,
/// `propose`, ...): a round trip minus this is the network, both HTTP/2 stacks and wake-ups.
pub const METRIC_PEER_SERVE_SECONDS: &str = "calm_peer_serve_seconds";
/// Seconds a proposal took on this node as the group's leader: append, replication to a
/// quorum, commit and apply (successful proposals only; forwarded ones count on the leader).
pub const METRIC_PROPOSAL_SECONDS: &str = "calm_raft_proposal_seconds";

/// Describe the consensus path's metrics to the installed recorder (call once it is
/// installed).
pub fn describe_metrics() {
    describe_counter!(
        METRIC_PEER_BATCHES,
        Unit::Count,
        "Batches of calls sent to peers, by lane"
    );
    describe_counter!(
        METRIC_PEER_BATCHED_CALLS,
        Unit::Count,
        "Calls sent to peers inside batches, by lane"
    );
    describe_histogram!(
        METRIC_PEER_ROUND_TRIP_SECONDS,
        Unit::Seconds,
        "Time from sending a batch of calls to a peer to its answer, by lane"
    );
    describe_histogram!(
        METRIC_PEER_SERVE_SECONDS,
        Unit::Seconds,
        "Time this node took to answer one call of a peer's batch, by call"
    );
    describe_histogram!(
        METRIC_PROPOSAL_SECONDS,
        Unit::Seconds,
        "Time a proposal took on its group's leader: append, replicate, commit and apply"
    );
}
