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
//! node has applied everything the client's session token names. Scan reads a range at the
//! same levels, one bounded page per call (`scan.rs`; docs/scan.md says what a page
//! guarantees).
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

//!
//! One service per file: `kv.rs` (Write, Batch, Get, Scan, Watch, Txn; their node sides
//! are `write.rs`, `read.rs`, `scan.rs`, `watch.rs`, `txn.rs`), `lease.rs` (Grant, Revoke,
//! KeepAlive, TimeToLive, List), `admin.rs` (status, rules, explain, checkpoints),
//! `health.rs` (readiness, and the gRPC health service that follows it).
//! `write.rs` and `read.rs` hold the node's side of a write and a read, which Batch and
//! other services share; `ops.rs` converts between the wire's ops and values and the
//! kernel's.

mod admin;
mod health;
mod kv;
mod lease;
mod ops;
mod read;
mod scan;
mod txn;
mod watch;
mod write;

pub use health::Unready;

use admin::AdminService;
use kv::KvService;
use pb::admin_server::AdminServer;
use pb::kv_server::KvServer;

use crate::node::Node;
use calm_kernel::fact::{KEY_BYTES_MAX, PAYLOAD_BYTES_MAX};
use calm_kernel::{RefusedOp, StatusCode};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

pub mod pb {
    tonic::include_proto!("calm.v1");
    /// For server reflection (grpcurl).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("calm_descriptor");
}

/// Most ops in one Batch call.
pub const BATCH_OPS_MAX: usize = 10_000;
/// Most fast-path ops of a Batch admitted in one hold of the state lock (~2 µs each).
pub(super) const BATCH_OPS_PER_LOCK_MAX: usize = 1_000;
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
/// Seconds a successful Scan call (one page) took inside this node.
pub const METRIC_SCAN_SECONDS: &str = "calm_scan_seconds";
/// Seconds a successful Txn call took inside this node, by the branch that ran
/// (`success`, `failure`).
pub const METRIC_TXN_SECONDS: &str = "calm_txn_seconds";

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
        METRIC_SCAN_SECONDS,
        Unit::Seconds,
        "Time a successful Scan call (one page) took inside the node"
    );
    describe_histogram!(
        METRIC_TXN_SECONDS,
        Unit::Seconds,
        "Time a successful Txn call took inside the node, by the branch that ran"
    );
    describe_counter!(
        "calm_scan_keys_total",
        Unit::Count,
        "Keys returned by Scan pages"
    );
    describe_metrics_watch();
    metrics::describe_gauge!(
        crate::lease_keeper::METRIC_LEASES,
        Unit::Count,
        "Leases this node's replica holds, over every group"
    );
    describe_counter!(
        "calm_lease_grants_total",
        Unit::Count,
        "Leases granted through this node"
    );
    describe_counter!(
        "calm_lease_renewals_total",
        Unit::Count,
        "Lease renewals this node proposed (one batched entry names many)"
    );
    describe_histogram!(
        METRIC_BATCH_SECONDS,
        Unit::Seconds,
        "Time a Batch call took inside the node"
    );
}

fn describe_metrics_watch() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(
        watch::METRIC_WATCHERS,
        Unit::Count,
        "Watch streams open on this node"
    );
    describe_counter!(
        watch::METRIC_WATCH_EVENTS,
        Unit::Count,
        "Events sent to watch streams"
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
        StatusCode::Aborted => Code::Aborted,
    }
}

fn refused(r: RefusedOp) -> Status {
    Status::new(status_code(r.refusal.status()), r.message)
}

/// Serve the client API on `listener` until `shutdown`: Kv and Admin, `grpc.health.v1`
/// (following readiness, see `health`), and server reflection in both of its versions
/// (`v1`, and `v1alpha` for grpcurl before 1.8.8 and Python's grpcio-reflection), which
/// describe the public API only.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: CancellationToken) {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    tokio::spawn(health::follow_readiness(
        node.clone(),
        health,
        shutdown.clone(),
    ));
    let kv = KvServer::new(KvService {
        node: node.clone(),
        watchers: Arc::default(),
        shutdown: shutdown.clone(),
    })
    .max_decoding_message_size(MESSAGE_BYTES_MAX)
    .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let lease = pb::lease_server::LeaseServer::new(lease::LeaseService {
        node: node.clone(),
        shutdown: shutdown.clone(),
    });
    let admin = AdminServer::new(AdminService { node });
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(kv)
        .add_service(lease)
        .add_service(admin)
        .serve_with_incoming_shutdown(crate::node::incoming(listener), shutdown.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "client API server stopped");
    }
}
