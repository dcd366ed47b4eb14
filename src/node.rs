//! One running calm node: recovery, the peer and client servers, and housekeeping.
//!
//! [`Node::start`] recovers the node's state from its data directory (WAL replay into the
//! replica and every Raft group's log), starts every group, serves peers (Raft and gossip on
//! one port), initializes the groups with the configured members when the data directory is
//! new, then serves clients (the public gRPC API, health, reflection) and HTTP (metrics,
//! health, status). Background tasks persist applied state to RocksDB, take checkpoints and
//! spread group leaders over the nodes. Everything stops when the shutdown token is
//! cancelled, passed in by the caller (mini-redis style), and [`Running::wait`] returns once
//! state is persisted.
//!
//! Fatal errors: a WAL write or fsync that fails, or a state store that cannot be written,
//! leaves memory ahead of disk. The node then logs the error and exits (code 70) so that
//! recovery rebuilds from what is durable; it never keeps acknowledging.

use crate::config::NodeConfig;
use crate::gossip::Gossip;
use calm_kernel::clock::Hlc;
use calm_kernel::rules::{CompiledRules, RuleSet};
use calm_kernel::{NodeId, VersionVector};
use calm_raft::consensus::network::Peers;
use calm_raft::consensus::service::GroupHandles;
use calm_raft::consensus::types::{BasicNode, RaftMetrics, WatchReceiver};
use calm_raft::consensus::{
    CalmRaft, Consensus, ConsensusOptions, FactSource, GroupId, GroupMap, SharedLocal,
};
use calm_raft::local::{LocalOptions, LocalState};
use calm_raft::wal::{WalBackend, WalOptions};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The rules `calm` uses when none are given: also the starting rules of `calm dev`.
pub const DEFAULT_RULES: &str = include_str!("default-rules.toml");

/// Exit code of a node that stopped on a fatal storage error.
pub const EXIT_FATAL: i32 = 70;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    DirLock(#[from] calm_raft::dir_lock::DirLockError),
    #[error("rules: {0}")]
    Rules(String),
    #[error("{0}")]
    ClusterRecord(#[from] crate::cluster_record::ClusterRecordError),
    #[error("recovering the node's state: {0}")]
    Recover(#[from] calm_raft::local::LocalError),
    #[error("starting the Raft groups: {0}")]
    Consensus(#[from] calm_raft::consensus::node::ConsensusError),
    #[error("cannot listen on {addr} ({what}): {source}; is another calm (or anything) using it?")]
    Listen {
        addr: std::net::SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Log a fatal storage error and stop the process (see the module docs).
pub fn fatal(what: &str, error: &dyn std::fmt::Display) -> ! {
    tracing::error!(
        "fatal: {what}: {error}; stopping so that recovery starts from what is durable"
    );
    // Not `eprintln!`: it panics when stderr cannot be written (the node's log on a full
    // disk), and the process would end with a panic's exit code instead of EXIT_FATAL.
    let _ = writeln!(
        std::io::stderr(),
        "calm: fatal: {what}: {error}; stopping so that recovery starts from what is durable"
    );
    std::process::exit(EXIT_FATAL)
}

pub fn lock(local: &SharedLocal) -> MutexGuard<'_, LocalState> {
    // Kernel updates are per key and complete; a panic elsewhere leaves nothing half done.
    local.lock().unwrap_or_else(|e| e.into_inner())
}

/// Load and compile the rules a new cluster starts with.
pub fn load_rules(file: Option<&Path>) -> Result<RuleSet, String> {
    let (text, origin) = match file {
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read rules file {}: {e}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            DEFAULT_RULES.to_string(),
            "the embedded example rules".to_string(),
        ),
    };
    toml::from_str(&text).map_err(|e| {
        format!("{origin} is not a valid rules file ({e}); see `calm rules example` for the format")
    })
}

fn compile_rules(rules: &RuleSet) -> Result<CompiledRules, StartError> {
    rules.compile().map_err(|e| {
        StartError::Rules(format!(
            "{e}; run `calm rules check` on the file to see every problem"
        ))
    })
}

/// What the services share.
pub struct Node {
    pub config: NodeConfig,
    pub local: SharedLocal,
    pub consensus: Consensus,
    pub gossip: Arc<Gossip>,
    pub hlc: Arc<Hlc>,
    pub started: Instant,
    /// Newest checkpoint this process took (0: none yet).
    pub last_checkpoint: AtomicU64,
    /// Bounded counter keys to check for an escrow refill.
    pub refills: crate::escrow::Refills,
    /// Per group (index = group id): the highest log index named in a token this node handed
    /// out. Fast-path write tokens carry it, so a session's add covers the Raft writes the
    /// same node acknowledged before it, even ones this replica has not applied yet.
    pub tokens_issued: Vec<AtomicU64>,
    /// The cluster this node belongs to (see `cluster_record`).
    pub cluster_id: crate::cluster_record::ClusterId,
    /// Keep-alive renewals waiting for their group's next entry (`lease_keeper`).
    pub renewals: crate::lease_keeper::Renewals,
}

impl Node {
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The client address of `node`, from the member list.
    pub fn client_addr_of(&self, node: NodeId) -> Option<&str> {
        self.config.member(node).map(|m| m.client.as_str())
    }

    /// A copy of `group`'s Raft metrics.
    pub fn metrics(&self, group: GroupId) -> RaftMetrics<CalmRaft> {
        self.consensus
            .raft(group)
            .metrics()
            .borrow_watched()
            .clone()
    }

    /// Last applied log index of `group` on this node.
    pub fn applied_index(&self, group: GroupId) -> u64 {
        self.consensus
            .raft(group)
            .metrics()
            .borrow_watched()
            .last_applied
            .map_or(0, |l| l.index)
    }

    /// Wait until this node applied `group` through `index`, or `deadline`; whether it did.
    pub async fn await_applied(
        &self,
        group: GroupId,
        index: u64,
        deadline: tokio::time::Instant,
    ) -> bool {
        let mut metrics = self.consensus.raft(group).metrics();
        loop {
            let applied = metrics
                .borrow_watched()
                .last_applied
                .is_some_and(|l| l.index >= index);
            if applied {
                return true;
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    /// Note that a token naming `index` of `group` went to a client; returns the watermark.
    pub fn issue_index(&self, group: GroupId, index: u64) -> u64 {
        let slot = &self.tokens_issued[group as usize];
        slot.fetch_max(index, Ordering::AcqRel).max(index)
    }

    pub fn version_vector(&self) -> VersionVector {
        lock(&self.local).replica().version_vector().clone()
    }

    /// Persist applied state now (blocking: call from a blocking thread).
    /// Persist without holding the state through the fsync and the store write: clients
    /// and Raft applies would stall on the mutex meanwhile (see `LocalState::begin_persist`).
    fn persist_blocking(local: &SharedLocal) {
        let job = lock(local)
            .begin_persist()
            .unwrap_or_else(|e| fatal("persisting applied state", &e));
        let (_, receipt) = job
            .write()
            .unwrap_or_else(|e| fatal("persisting applied state", &e));
        lock(local).end_persist(receipt);
    }

    /// Take a checkpoint now (blocking: call from a blocking thread).
    pub fn checkpoint_blocking(&self) -> u64 {
        let id = match lock(&self.local).checkpoint() {
            Ok(id) => id,
            Err(e) => fatal("taking a checkpoint", &e),
        };
        self.last_checkpoint.store(id, Ordering::Relaxed);
        id
    }
}

/// A started node and its tasks.
pub struct Running {
    pub node: Arc<Node>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: CancellationToken,
}

fn wal_backend(name: &str) -> WalBackend {
    match name {
        "io_uring" => WalBackend::IoUring,
        "pwrite" => WalBackend::Pwrite,
        _ => WalBackend::Auto,
    }
}

/// Accepted connections of `listener` with Nagle's algorithm off. tonic sets TCP_NODELAY
/// only on listeners it binds itself; without it, small gRPC replies wait for delayed ACKs
/// (tens of milliseconds).
pub fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

async fn listen(addr: std::net::SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, what, source })
}

impl Node {
    /// Recover, start every group and serve; see the module docs.
    pub async fn start(
        config: NodeConfig,
        shutdown: CancellationToken,
    ) -> Result<Running, StartError> {
        crate::http::install_metrics();
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        // Before anything else in the directory is read or written: a second process on a
        // directory in use must stop here, not after it touched the live node's files.
        let dir_lock = calm_raft::dir_lock::DataDirLock::acquire(&config.data_dir)?;
        let initial_rules = load_rules(config.rules_file.as_deref()).map_err(StartError::Rules)?;
        let rules = compile_rules(&initial_rules)?;
        // Listen first: a port in use is the most common start failure, and peers can reach
        // this node as soon as its groups exist.
        let peer_listener = listen(config.peer_addr, "peer traffic").await?;
        let client_listener = listen(config.client_addr, "client API").await?;
        let http_listener = listen(config.http_addr, "HTTP").await?;

        let options = LocalOptions {
            wal: WalOptions {
                segment_bytes_max: config.storage.wal_segment_bytes_max,
                backend: wal_backend(&config.storage.wal_backend),
                ..WalOptions::default()
            },
            events: calm_raft::events::EventLimits {
                events_max: config.watch.retain_events,
                bytes_max: config.watch.retain_bytes,
            },
            ..LocalOptions::default()
        };
        // Before the WAL exists: a directory without one is a new cluster's.
        let settled = crate::cluster_record::settle(
            &config.data_dir,
            config.id,
            &config.members,
            config.raft.data_groups,
            config.raft.hash_tags,
        )?;
        let data_groups = settled.data_groups;
        let id = config.id;
        let (local, report) = tokio::task::spawn_blocking(move || {
            LocalState::open_locked(dir_lock, id, rules, options)
        })
        .await
        .expect("recovery does not panic")?;
        tracing::info!(
            node = id,
            replayed_batches = report.replayed_batches,
            replayed_facts = report.replayed_facts,
            redelivered_facts = report.redelivered_facts,
            waiting_facts = local.replica().pending_facts(),
            waiting_own_facts = local.replica().own_pending_facts(),
            replayed_raft_records = report.replayed_raft_records,
            wal = local.wal().backend_name(),
            cluster = %settled.cluster_id,
            new_directory = settled.created,
            "recovered"
        );
        let mut group_map = GroupMap::new(data_groups).with_hash_tags(settled.hash_tags);
        if let Some(wanted) = config.raft.hash_tags
            && wanted != settled.hash_tags
        {
            // The opt-in of a cluster created with the other rule: only if no key moves.
            let keys = local.replica().keys_matching(|_| true);
            crate::cluster_record::switch_hash_tags(
                &config.data_dir,
                group_map,
                wanted,
                keys.iter().map(|(k, _)| k.as_slice()),
            )?;
            tracing::warn!(
                hash_tags = wanted,
                "switched this node's hash-tag rule (no key it holds changes group); every node of the cluster must switch"
            );
            group_map = group_map.with_hash_tags(wanted);
        }
        let local: SharedLocal = Arc::new(Mutex::new(local));
        let hlc = Arc::new(Hlc::new(id));
        let peers = Peers::for_cluster(
            config.peer_addr.ip(),
            &settled.cluster_id.to_string(),
            &group_map.fingerprint(),
        );
        let gossip = Gossip::new(
            id,
            local.clone(),
            hlc.clone(),
            peers.clone(),
            config
                .members
                .iter()
                .map(|m| (m.id, m.peer.clone()))
                .collect(),
            config.gossip.gossip_options(),
        );

        let handles = GroupHandles::new();
        let mut tasks = Vec::new();
        let peer_server = tonic::transport::Server::builder()
            // A node of another cluster (another member list) is refused before any of its
            // calls reaches a group or gossip.
            .layer(tonic::service::InterceptorLayer::new(
                calm_raft::consensus::service::check_cluster(
                    settled.cluster_id.to_string(),
                    group_map.fingerprint(),
                ),
            ))
            .add_service(Consensus::peer_service(handles.clone(), peers.clone()))
            .add_service(gossip.service())
            .serve_with_incoming_shutdown(
                incoming(peer_listener),
                shutdown.clone().cancelled_owned(),
            );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = peer_server.await {
                tracing::error!(error = %e, "peer server stopped");
            }
        }));

        let consensus = Consensus::start(
            id,
            local.clone(),
            gossip.clone() as Arc<dyn FactSource>,
            config.data_dir.join("snapshots"),
            &ConsensusOptions {
                data_groups,
                hash_tags: group_map.hash_tags(),
                ..config.raft.consensus_options()
            },
            handles,
            peers,
        )
        .await?;
        let members: BTreeMap<NodeId, BasicNode> = config
            .members
            .iter()
            .map(|m| (m.id, BasicNode::new(m.peer.clone())))
            .collect();
        // Every node initializes with the same members; groups that already have a log
        // (restart, or a peer's leader reached us first) are left alone.
        consensus.initialize(&members).await?;

        let (refills, refill_requests) = crate::escrow::channel();
        let tokens_issued = consensus
            .group_map()
            .all()
            .map(|_| AtomicU64::new(0))
            .collect();
        let node = Arc::new(Node {
            config,
            local,
            consensus,
            gossip: gossip.clone(),
            hlc,
            started: Instant::now(),
            last_checkpoint: AtomicU64::new(0),
            refills,
            tokens_issued,
            cluster_id: settled.cluster_id,
            renewals: Default::default(),
        });
        tasks.push(tokio::spawn(crate::escrow::run(
            node.clone(),
            refill_requests,
            shutdown.clone(),
        )));

        tasks.push(tokio::spawn(init_rules_loop(
            node.clone(),
            initial_rules,
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(gossip.run(shutdown.clone())));
        tasks.push(tokio::spawn(persist_loop(node.clone(), shutdown.clone())));
        tasks.push(tokio::spawn(crate::lease_keeper::tick_loop(
            node.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(checkpoint_loop(
            node.clone(),
            shutdown.clone(),
        )));
        if node.config.raft.balance_leaders_interval_ms > 0 {
            tasks.push(tokio::spawn(balance_loop(node.clone(), shutdown.clone())));
        }
        tasks.push(tokio::spawn(crate::api::serve(
            node.clone(),
            client_listener,
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(crate::http::serve(
            node.clone(),
            http_listener,
            shutdown.clone(),
        )));
        Ok(Running {
            node,
            tasks,
            shutdown,
        })
    }
}

impl Running {
    /// Wait for shutdown, stop every task and group, and persist what was applied.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        for task in self.tasks {
            let _ = task.await;
        }
        self.node.consensus.shutdown().await;
        let local = self.node.local.clone();
        let _ = tokio::task::spawn_blocking(move || Node::persist_blocking(&local)).await;
        tracing::info!(node = self.node.id(), "stopped");
    }
}

/// A new cluster's rules live in the metadata group from its first moments: every node
/// proposes its configured rules until some node's are in force (the first ordered wins;
/// the others apply as no-ops). Until then nodes use their configured rules.
async fn init_rules_loop(node: Arc<Node>, rules: RuleSet, shutdown: CancellationToken) {
    use calm_raft::consensus::{GroupMap, Request};
    while lock(&node.local).replica().rules_version() == 0 {
        let proposal = node.consensus.propose_to(
            GroupMap::METADATA,
            Request::InitRules {
                toml: calm_raft::consensus::state_machine::rules_text(&rules),
            },
        );
        tokio::select! {
            result = proposal => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "initial rules not proposed yet; retrying");
                }
            }
            _ = shutdown.cancelled() => return,
        }
        if lock(&node.local).replica().rules_version() > 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Write applied state to RocksDB every `persist_interval_ms` when something changed.
async fn persist_loop(node: Arc<Node>, shutdown: CancellationToken) {
    let period = Duration::from_millis(node.config.storage.persist_interval_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.cancelled() => return,
        }
        let local = node.local.clone();
        // Facts waiting for an earlier fact or their key dirty no key, but still belong in
        // the store's archive.
        let dirty = {
            let l = lock(&local);
            l.replica().dirty_keys() > 0 || l.unarchived_facts() > 0
        };
        if dirty {
            let _ = tokio::task::spawn_blocking(move || Node::persist_blocking(&local)).await;
        }
    }
}

async fn checkpoint_loop(node: Arc<Node>, shutdown: CancellationToken) {
    let period = Duration::from_secs(node.config.storage.checkpoint_interval_s);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.cancelled() => return,
        }
        let n = node.clone();
        let _ = tokio::task::spawn_blocking(move || n.checkpoint_blocking()).await;
    }
}

async fn balance_loop(node: Arc<Node>, shutdown: CancellationToken) {
    let period = Duration::from_millis(node.config.raft.balance_leaders_interval_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.cancelled() => return,
        }
        let asked = node.consensus.balance_leaders().await;
        if asked > 0 {
            tracing::debug!(asked, "handed groups to their preferred leaders");
        }
    }
}
