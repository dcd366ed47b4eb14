//! Gossip of fast-path facts between peers (DESIGN.md section 9).
//!
//! A fast-path fact is durable in its origin's WAL before any peer hears of it. This module
//! spreads it to every peer and repairs whatever the spreading missed:
//!
//! - **Push.** [`Gossip::publish`] queues the fact for each peer and returns at once. One
//!   task per peer waits `push_interval_ms` after the first queued fact (a batching window)
//!   and sends what is queued in bounded batches over that peer's one channel (the Raft
//!   traffic uses the same channel). A full queue or an unreachable peer drops facts and
//!   counts them, and a failed push is not retried: anti-entropy repairs both.
//! - **Anti-entropy.** Every `anti_entropy_interval_ms`, with each peer: swap summaries
//!   (version vector, Bloom clock); pull what the peer has and this node lacks by
//!   `(origin, sequence range)`, in bounded chunks, from the peer's fact archive. A peer
//!   relays facts of any origin: the archive holds delivered facts too.
//! - **Fetch.** A Raft command blocked on facts it observed asks for them through
//!   [`FactSource`]: pulled from whichever peer has them.
//! - **Pruning.** Every `prune_interval_ms` the archive drops facts every node keeps through
//!   any recovery (see below).
//!
//! Gossip owns the push queues and the last view learned from each peer. Facts themselves
//! belong to [`LocalState`], which applies, logs, archives and serves them; gossip takes the
//! node's state mutex only inside `spawn_blocking`, never across an `.await` or any network
//! I/O.
//!
//! # Why the Bloom clock is only a hint
//!
//! A Bloom clock has false positives: "my clock dominates yours" means "I probably have
//! every fact you have". A round in which the caller's clock dominates the responder's pulls
//! nothing; that answer is confirmed every `exact_check_every` rounds by comparing exact
//! version vectors (and the first round with a peer is always exact). A false positive
//! therefore delays a fact by at most that many rounds and never loses one; pulls always
//! name exact ranges. Both clocks summarise the same window, the facts above the caller's
//! version vector met with the responder's last known one, and a window larger than
//! [`BLOOM_WINDOW_FACTS_MAX`] (false-positive rate above about 1%) is "unknown": the round
//! goes exact. With a handful of nodes the version vectors are smaller than a Bloom clock
//! and ride in every summary anyway (status and pruning need them); the Bloom clock's worth
//! is the decision it makes cheaply whatever the number of origins, and
//! `exact_check_every = 1` turns it off.
//!
//! # Why pruning uses checkpointed version vectors
//!
//! A peer's live version vector may count facts whose WAL batch is not durable yet
//! (delivered facts are appended without waiting for the fsync), so a crash can take them
//! back; pruning below it could drop the last copies of facts that peer is about to lose.
//! Every node therefore also advertises what its oldest kept checkpoint covers
//! ([`LocalState::checkpointed_vv`](calm_raft::local::LocalState::checkpointed_vv)): facts it
//! keeps through any recovery, even falling back to that checkpoint. The archive floor is the
//! component-wise minimum of every node's checkpointed vector, this node's included, and
//! nothing is pruned until every peer has answered once. The price is a longer archive
//! (facts stay as long as the oldest kept checkpoint lags), cheap next to losing a fact.
//!
//! # Bounds
//!
//! Every message is bounded by a named constant below (facts and bytes per batch, ranges
//! per pull, entries per version vector, the whole message); a peer exceeding one gets
//! INVALID_ARGUMENT. The push queue of each peer is bounded in facts and bytes, one
//! anti-entropy round pulls at most [`PULLS_PER_ROUND_MAX`] chunks, and every RPC has a
//! deadline (`rpc_timeout_ms`).

use calm_kernel::clock::{BloomClock, Hlc};
use calm_kernel::fact::{FACT_HEADER_BYTES_MAX, KEY_BYTES_MAX, PAYLOAD_BYTES_MAX, decode_facts};
use calm_kernel::{HlcTimestamp, KeyState, NodeId, VersionVector};
use calm_raft::channel::H2Channel;
use calm_raft::consensus::network::Peers;
use calm_raft::consensus::{FactSource, GroupId, SharedLocal};
use calm_raft::local::{DeliverReport, LocalError, LocalState};
use futures::future::BoxFuture;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The generated gossip protocol (`proto/calm/internal/v1/gossip.proto`).
pub mod wire {
    tonic::include_proto!("calm.internal.v1");
}

use wire::gossip_peer_client::GossipPeerClient;
use wire::gossip_peer_server::{GossipPeer, GossipPeerServer};

/// Largest encoded fact: header, longest key, longest payload.
pub const FACT_BYTES_MAX: usize = FACT_HEADER_BYTES_MAX + KEY_BYTES_MAX + PAYLOAD_BYTES_MAX;
/// Most facts in one push batch.
pub const PUSH_BATCH_FACTS_MAX: usize = 4096;
/// Most fact bytes in one push batch; a single larger fact travels alone.
pub const PUSH_BATCH_BYTES_MAX: usize = 1 << 20;
/// Most facts queued for one peer; more are dropped (anti-entropy brings them).
pub const PUSH_QUEUE_FACTS_MAX: usize = 64 * 1024;
/// Most fact bytes queued for one peer.
pub const PUSH_QUEUE_BYTES_MAX: usize = 16 << 20;
/// Fact bytes one pull answer carries, plus at most one fact beyond (so that a pull of a
/// fact larger than this still progresses).
pub const PULL_BATCH_BYTES_MAX: usize = 1 << 20;
/// Most `(origin, sequence range)`s in one pull request.
pub const PULL_RANGES_MAX: usize = 64;
/// Most pulls in one anti-entropy round with one peer (or one fetch); the next continues.
pub const PULLS_PER_ROUND_MAX: usize = 16;
/// Most entries of a version vector a peer may send (one per origin: a cluster's nodes).
pub const VERSION_VECTOR_ENTRIES_MAX: usize = 1024;
/// Most facts a Bloom clock window may hold: the default clock's false-positive rate stays
/// under about 1% up to ~390 ids (`calm_kernel::clock`); larger windows go exact.
pub const BLOOM_WINDOW_FACTS_MAX: u64 = 384;
/// Largest gossip message either way (tonic's default limit, stated).
pub const GOSSIP_MESSAGE_BYTES_MAX: usize = 4 << 20;
/// Room in a message for everything but the facts (ids, version vectors, framing).
const MESSAGE_OVERHEAD_BYTES_MAX: usize = 64 * 1024;
const _: () = assert!(
    PULL_BATCH_BYTES_MAX + FACT_BYTES_MAX + MESSAGE_OVERHEAD_BYTES_MAX <= GOSSIP_MESSAGE_BYTES_MAX
);
const _: () = assert!(
    PUSH_BATCH_BYTES_MAX + FACT_BYTES_MAX + MESSAGE_OVERHEAD_BYTES_MAX <= GOSSIP_MESSAGE_BYTES_MAX
);
/// Fact bytes a received batch may hold (the larger of a push and a pull batch).
const RECEIVED_BATCH_BYTES_MAX: usize = PULL_BATCH_BYTES_MAX + FACT_BYTES_MAX;
/// Fact bytes a received batch may hold to be delivered on the async thread that received
/// it. A push carries what one origin admitted in a few milliseconds, and applying it takes
/// microseconds: less than handing it to a blocking thread and back, two thread wake-ups on
/// every push (docs/benchmarks.md, "Pushes delivered in place"). Larger batches (pulls,
/// catch-up) still go to a blocking thread, so that one delivery cannot hold up the node's
/// other requests for long.
pub const DELIVER_INLINE_BYTES_MAX: usize = 64 << 10;
/// How long one [`FactSource::fetch`] tries before handing back to the state machine.
pub const FETCH_WAIT_MAX: Duration = Duration::from_secs(1);
/// Pause after a fetch that brought nothing, so a blocked command does not spin.
pub const FETCH_RETRY_DELAY: Duration = Duration::from_millis(20);

/// Timing of gossip on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GossipOptions {
    /// Push facts as they become durable. Off: anti-entropy alone spreads them (tests, or to
    /// measure it).
    pub push_enabled: bool,
    /// Batching window: a peer's push task waits this long after the first queued fact
    /// for more before sending. 0 sends at once.
    pub push_interval_ms: u64,
    /// Period of the anti-entropy round with each peer (at least 1).
    pub anti_entropy_interval_ms: u64,
    /// Every this many rounds with a peer, compare exact version vectors even when the Bloom
    /// clocks say there is nothing to pull. 1 = every round (0 counts as 1).
    pub exact_check_every: u32,
    /// Period of archive pruning (at least 1).
    pub prune_interval_ms: u64,
    /// Deadline of one gossip RPC.
    pub rpc_timeout_ms: u64,
}

impl Default for GossipOptions {
    fn default() -> GossipOptions {
        GossipOptions {
            push_enabled: true,
            push_interval_ms: 2,
            anti_entropy_interval_ms: 200,
            exact_check_every: 10,
            prune_interval_ms: 10_000,
            rpc_timeout_ms: 2_000,
        }
    }
}

#[derive(Debug, Error)]
pub enum GossipError {
    #[error(
        "gossip {rpc} to node {peer} at {addr} failed: {status}; anti-entropy retries every round, check that the peer runs and is reachable"
    )]
    Rpc {
        rpc: &'static str,
        peer: NodeId,
        addr: String,
        status: Status,
    },
    #[error(
        "gossip {rpc} to node {peer} at {addr} got no answer within {timeout_ms} ms; anti-entropy retries every round, check the peer's load and the network"
    )]
    Timeout {
        rpc: &'static str,
        peer: NodeId,
        addr: String,
        timeout_ms: u64,
    },
    #[error(
        "the peer at {addr} answers as node {got}, but the members list says node {expected}; give every node the same members list"
    )]
    WrongPeer {
        addr: String,
        expected: NodeId,
        got: NodeId,
    },
    #[error(
        "malformed gossip message: {0}; the peer runs another calm version, run one calm version across the cluster"
    )]
    Malformed(String),
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("the node is shutting down; retry at another node")]
    ShuttingDown,
}

impl From<GossipError> for Status {
    fn from(e: GossipError) -> Status {
        match &e {
            GossipError::Malformed(_) | GossipError::Local(LocalError::BadDeliveredFact { .. }) => {
                Status::invalid_argument(e.to_string())
            }
            GossipError::ShuttingDown => Status::unavailable(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

/// What this node last learned from a peer.
#[derive(Clone, Debug, Default)]
struct PeerView {
    vv: VersionVector,
    /// What the peer's oldest kept checkpoint covers; `None` until it answered once.
    checkpointed: Option<VersionVector>,
    heard: Option<Instant>,
}

/// A peer's view as it arrives on the wire, checked.
struct NodeView {
    node: NodeId,
    vv: VersionVector,
    checkpointed: VersionVector,
}

/// Facts waiting to be pushed to one peer.
struct PushQueue {
    facts: VecDeque<Arc<[u8]>>,
    bytes: usize,
    /// Cleared by a failed push, set by any answer from the peer: while clear, facts for it
    /// are dropped at once instead of queueing behind a dead connection.
    reachable: bool,
}

struct Link {
    id: NodeId,
    addr: String,
    queue: Mutex<PushQueue>,
    wake: Notify,
}

/// Gossip of one node. See the module docs.
pub struct Gossip {
    node: NodeId,
    local: SharedLocal,
    hlc: Arc<Hlc>,
    peers: Arc<Peers>,
    /// Every member but this node, by id.
    links: Vec<Link>,
    options: GossipOptions,
    views: Mutex<BTreeMap<NodeId, PeerView>>,
    /// The last archive floor pruned, so an unchanged floor costs nothing.
    pruned: Mutex<VersionVector>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here leaves a value half-changed across a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn describe_metrics() {
    use metrics::{Unit, describe_counter};
    describe_counter!(
        "calm_gossip_facts_sent_total",
        Unit::Count,
        "Facts sent to peers, by path (push, pull)"
    );
    describe_counter!(
        "calm_gossip_fact_bytes_sent_total",
        Unit::Bytes,
        "Encoded fact bytes sent to peers, by path (push, pull)"
    );
    describe_counter!(
        "calm_gossip_facts_received_total",
        Unit::Count,
        "Facts received from peers, by path (push, pull)"
    );
    describe_counter!(
        "calm_gossip_facts_applied_total",
        Unit::Count,
        "Facts from peers applied here (with waiting facts they released)"
    );
    describe_counter!(
        "calm_gossip_push_dropped_total",
        Unit::Count,
        "Facts not pushed to a peer, by reason (queue_full, peer_unreachable, send_failed); anti-entropy brings them"
    );
    describe_counter!(
        "calm_gossip_push_batches_total",
        Unit::Count,
        "Push batches sent, by outcome (ok, failed)"
    );
    describe_counter!(
        "calm_gossip_exchanges_total",
        Unit::Count,
        "Anti-entropy rounds, by decision (bloom_skip, in_sync, pulled, failed)"
    );
    describe_counter!(
        "calm_gossip_bloom_false_positives_total",
        Unit::Count,
        "Exact rounds that found facts to pull where the Bloom clocks said there were none"
    );
    describe_counter!(
        "calm_gossip_pulls_total",
        Unit::Count,
        "Pull requests sent to peers"
    );
    describe_counter!(
        "calm_gossip_fetches_total",
        Unit::Count,
        "Fetches for blocked Raft commands, by outcome (delivered, nothing)"
    );
    describe_counter!(
        "calm_gossip_clock_skew_total",
        Unit::Count,
        "Fact batches whose HLC stamp was too far ahead of this node's clock (delivered anyway)"
    );
    describe_counter!(
        "calm_gossip_archive_prunes_total",
        Unit::Count,
        "Times the fact archive was pruned to a higher floor"
    );
}

impl Gossip {
    /// Gossip of `node` with the other `members` (id -> peer `host:port`; this node's own
    /// entry is ignored). Nothing runs until [`Gossip::run`].
    pub fn new(
        node: NodeId,
        local: SharedLocal,
        hlc: Arc<Hlc>,
        peers: Arc<Peers>,
        members: BTreeMap<NodeId, String>,
        options: GossipOptions,
    ) -> Arc<Gossip> {
        let links = members
            .into_iter()
            .filter(|&(id, _)| id != node)
            .map(|(id, addr)| Link {
                id,
                addr,
                queue: Mutex::new(PushQueue {
                    facts: VecDeque::new(),
                    bytes: 0,
                    reachable: true,
                }),
                wake: Notify::new(),
            })
            .collect();
        Arc::new(Gossip {
            node,
            local,
            hlc,
            peers,
            links,
            options,
            views: Mutex::new(BTreeMap::new()),
            pruned: Mutex::new(VersionVector::new()),
        })
    }

    /// The gRPC service peers call; serve it beside the Raft peer service.
    pub fn service(self: &Arc<Self>) -> GossipPeerServer<GossipService> {
        GossipPeerServer::new(GossipService {
            gossip: self.clone(),
        })
        .max_decoding_message_size(GOSSIP_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GOSSIP_MESSAGE_BYTES_MAX)
    }

    /// Hand a fact (its encoding, as `LocalState::admit` returned it) to every peer. Call it
    /// only once the fact is durable. Never blocks: a peer whose queue is full or that is
    /// unreachable misses it (counted), and anti-entropy brings it later.
    pub fn publish(&self, fact: Vec<u8>) {
        self.publish_many(std::iter::once(fact.as_slice()));
    }

    /// [`publish`](Self::publish) for many facts, each peer's queue locked once.
    pub fn publish_many<'a>(&self, facts: impl IntoIterator<Item = &'a [u8]>) {
        if !self.options.push_enabled || self.links.is_empty() {
            return;
        }
        let facts: Vec<Arc<[u8]>> = facts
            .into_iter()
            .filter(|f| !f.is_empty())
            .map(Arc::from)
            .collect();
        if facts.is_empty() {
            return;
        }
        for link in &self.links {
            let (mut unreachable, mut full) = (0u64, 0u64);
            {
                let mut queue = lock(&link.queue);
                for fact in &facts {
                    if !queue.reachable {
                        unreachable += 1;
                    } else if queue.facts.len() >= PUSH_QUEUE_FACTS_MAX
                        || queue.bytes + fact.len() > PUSH_QUEUE_BYTES_MAX
                    {
                        full += 1;
                    } else {
                        queue.bytes += fact.len();
                        queue.facts.push_back(fact.clone());
                    }
                }
            }
            if unreachable + full < facts.len() as u64 {
                link.wake.notify_one();
            }
            for (reason, n) in [("peer_unreachable", unreachable), ("queue_full", full)] {
                if n > 0 {
                    metrics::counter!("calm_gossip_push_dropped_total", "reason" => reason)
                        .increment(n);
                }
            }
        }
    }

    /// Push batching, anti-entropy and pruning until `shutdown` is cancelled.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.links.len() {
            if self.options.push_enabled {
                tasks.spawn(self.clone().push_loop(i, shutdown.clone()));
            }
            tasks.spawn(self.clone().anti_entropy_loop(i, shutdown.clone()));
        }
        tasks.spawn(self.clone().prune_loop(shutdown.clone()));
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }

    /// Per peer: the version vector last learned from it, and when (`None`: never heard).
    pub fn peer_views(&self) -> Vec<(NodeId, VersionVector, Option<Instant>)> {
        let views = lock(&self.views);
        self.links
            .iter()
            .map(|link| match views.get(&link.id) {
                Some(v) => (link.id, v.vv.clone(), v.heard),
                None => (link.id, VersionVector::new(), None),
            })
            .collect()
    }

    /// Prune the fact archive to the floor every node keeps through any recovery (see the
    /// module docs); `run` does this every `prune_interval_ms`. Returns the floor, or `None`
    /// while some peer has not answered yet (nothing is pruned then).
    pub async fn prune_archive(&self) -> Result<Option<VersionVector>, GossipError> {
        let own = self
            .with_local(|local| Ok(local.checkpointed_vv().clone()))
            .await?;
        let floor = {
            let views = lock(&self.views);
            archive_floor(
                &own,
                self.links
                    .iter()
                    .map(|l| views.get(&l.id).and_then(|v| v.checkpointed.as_ref())),
            )
        };
        let Some(floor) = floor else {
            return Ok(None);
        };
        if floor.is_empty() || *lock(&self.pruned) == floor {
            return Ok(Some(floor));
        }
        let pruning = floor.clone();
        self.with_local(move |local| Ok(local.prune_archive(&pruning)?))
            .await?;
        metrics::counter!("calm_gossip_archive_prunes_total").increment(1);
        tracing::debug!(floor = %floor, "pruned the fact archive");
        *lock(&self.pruned) = floor.clone();
        Ok(Some(floor))
    }

    // --- local state -------------------------------------------------------------------

    /// Run `f` on the node's state off the async threads, for work that may take long (the
    /// archive, large deliveries) or wait long for the mutex (a `persist` queued behind
    /// another holds it).
    async fn with_local<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut LocalState) -> Result<T, GossipError> + Send + 'static,
    ) -> Result<T, GossipError> {
        let local = self.local.clone();
        match tokio::task::spawn_blocking(move || f(&mut lock(&local))).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(GossipError::ShuttingDown),
        }
    }

    async fn local_vv(&self) -> Result<VersionVector, GossipError> {
        self.with_local(|local| Ok(local.replica().version_vector().clone()))
            .await
    }

    async fn local_view(&self) -> Result<NodeView, GossipError> {
        let node = self.node;
        self.with_local(move |local| {
            Ok(NodeView {
                node,
                vv: local.replica().version_vector().clone(),
                checkpointed: local.checkpointed_vv().clone(),
            })
        })
        .await
    }

    /// Deliver a batch from a peer; returns what happened and this node's view after it.
    async fn accept(
        &self,
        facts: Vec<u8>,
        path: &'static str,
    ) -> Result<(DeliverReport, NodeView), GossipError> {
        let bytes = facts.len();
        if bytes > RECEIVED_BATCH_BYTES_MAX {
            return Err(GossipError::Malformed(format!(
                "a fact batch of {bytes} bytes exceeds the limit of {RECEIVED_BATCH_BYTES_MAX} bytes"
            )));
        }
        // Facts commute, so a stamp from a fast clock is delivered anyway; only this node's
        // clock refuses to jump forward with it.
        let (mut received, mut newest) = (0u64, HlcTimestamp::ZERO);
        for fact in decode_facts(&facts).map_while(Result::ok) {
            received += 1;
            newest = newest.max(fact.hlc);
        }
        if newest != HlcTimestamp::ZERO
            && let Err(e) = self.hlc.observe(newest)
        {
            metrics::counter!("calm_gossip_clock_skew_total").increment(1);
            tracing::warn!(error = %e, "delivering facts stamped ahead of this node's clock");
        }
        let node = self.node;
        let deliver = move |local: &mut LocalState| {
            let report = local.deliver(&facts)?;
            let view = NodeView {
                node,
                vv: local.replica().version_vector().clone(),
                checkpointed: local.checkpointed_vv().clone(),
            };
            Ok((report, view))
        };
        // In place, the node's state mutex is taken on the async thread, as a client's write
        // takes it; a batch this small applies in well under a millisecond.
        let (report, view) = if bytes <= DELIVER_INLINE_BYTES_MAX {
            deliver(&mut lock(&self.local))?
        } else {
            self.with_local(deliver).await?
        };
        metrics::counter!("calm_gossip_facts_received_total", "path" => path).increment(received);
        metrics::counter!("calm_gossip_facts_applied_total").increment(report.applied);
        Ok((report, view))
    }

    // --- peers ---------------------------------------------------------------------------

    fn client(&self, link: &Link) -> Result<GossipPeerClient<H2Channel>, GossipError> {
        let channel =
            self.peers
                .channel(link.id, &link.addr)
                .map_err(|status| GossipError::Rpc {
                    rpc: "connect",
                    peer: link.id,
                    addr: link.addr.clone(),
                    status,
                })?;
        Ok(GossipPeerClient::new(channel)
            .max_decoding_message_size(GOSSIP_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GOSSIP_MESSAGE_BYTES_MAX))
    }

    /// One RPC to `link` with the configured deadline.
    async fn call<T>(
        &self,
        link: &Link,
        rpc: &'static str,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, GossipError> {
        let timeout = Duration::from_millis(self.options.rpc_timeout_ms);
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(GossipError::Rpc {
                rpc,
                peer: link.id,
                addr: link.addr.clone(),
                status,
            }),
            Err(_) => Err(GossipError::Timeout {
                rpc,
                peer: link.id,
                addr: link.addr.clone(),
                timeout_ms: self.options.rpc_timeout_ms,
            }),
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(Duration::from_millis(self.options.rpc_timeout_ms));
        request
    }

    /// Record what `link`'s peer said it has.
    fn learn(&self, link: &Link, view: NodeView) -> Result<(), GossipError> {
        if view.node != link.id {
            return Err(GossipError::WrongPeer {
                addr: link.addr.clone(),
                expected: link.id,
                got: view.node,
            });
        }
        self.record_view(view);
        lock(&link.queue).reachable = true;
        Ok(())
    }

    fn record_view(&self, view: NodeView) {
        let mut views = lock(&self.views);
        let entry = views.entry(view.node).or_default();
        // Replaced, not merged: after a crash a peer's vector may go back, and windows and
        // pulls must start from what it has now.
        entry.vv = view.vv;
        entry.checkpointed = Some(view.checkpointed);
        entry.heard = Some(Instant::now());
    }

    fn known_vv(&self, peer: NodeId) -> VersionVector {
        lock(&self.views)
            .get(&peer)
            .map(|v| v.vv.clone())
            .unwrap_or_default()
    }

    // --- push ----------------------------------------------------------------------------

    async fn push_loop(self: Arc<Self>, i: usize, shutdown: CancellationToken) {
        let link = &self.links[i];
        let window = Duration::from_millis(self.options.push_interval_ms);
        loop {
            tokio::select! {
                _ = link.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            if !window.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(window) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            loop {
                let (batch, facts) = take_batch(&mut lock(&link.queue));
                if facts == 0 {
                    break;
                }
                let sent = tokio::select! {
                    sent = self.push(link, batch) => sent,
                    _ = shutdown.cancelled() => return,
                };
                if let Err(e) = sent {
                    metrics::counter!("calm_gossip_push_batches_total", "outcome" => "failed")
                        .increment(1);
                    let dropped = {
                        let mut queue = lock(&link.queue);
                        queue.reachable = false;
                        queue.bytes = 0;
                        std::mem::take(&mut queue.facts).len()
                    };
                    metrics::counter!("calm_gossip_push_dropped_total", "reason" => "send_failed")
                        .increment((facts + dropped) as u64);
                    tracing::debug!(error = %e, "push failed; anti-entropy will repair");
                    break;
                }
                metrics::counter!("calm_gossip_push_batches_total", "outcome" => "ok").increment(1);
                metrics::counter!("calm_gossip_facts_sent_total", "path" => "push")
                    .increment(facts as u64);
            }
        }
    }

    async fn push(&self, link: &Link, facts: Vec<u8>) -> Result<(), GossipError> {
        let bytes = facts.len() as u64;
        let mut client = self.client(link)?;
        let request = self.request(wire::FactBatch {
            sender: self.node,
            facts,
        });
        let reply = self.call(link, "push", client.push(request)).await?;
        metrics::counter!("calm_gossip_fact_bytes_sent_total", "path" => "push").increment(bytes);
        let view = view_from_wire(reply.view)?;
        self.learn(link, view)
    }

    // --- anti-entropy --------------------------------------------------------------------

    async fn anti_entropy_loop(self: Arc<Self>, i: usize, shutdown: CancellationToken) {
        let link = &self.links[i];
        let period = Duration::from_millis(self.options.anti_entropy_interval_ms.max(1));
        let every = u64::from(self.options.exact_check_every.max(1));
        let mut round: u64 = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => return,
            }
            // The first round with a peer is exact: a restarted node catches up at once.
            let exact = round.is_multiple_of(every);
            round += 1;
            let done = tokio::select! {
                done = self.anti_entropy_round(link, exact) => done,
                _ = shutdown.cancelled() => return,
            };
            if let Err(e) = done {
                metrics::counter!("calm_gossip_exchanges_total", "decision" => "failed")
                    .increment(1);
                tracing::debug!(error = %e, "anti-entropy round failed");
            }
        }
    }

    /// Exchange summaries with `link`'s peer and pull what it has and this node lacks.
    async fn anti_entropy_round(&self, link: &Link, exact: bool) -> Result<(), GossipError> {
        let mine = self.local_view().await?;
        let base = meet(&mine.vv, &self.known_vv(link.id));
        let my_bloom = window_bloom(&base, &mine.vv);
        let summary = wire::Summary {
            view: Some(view_to_wire(&mine)),
            window_base: Some(vv_to_wire(&base)),
            bloom_clock: my_bloom
                .as_ref()
                .map_or_else(Vec::new, |b| b.as_bytes().to_vec()),
        };
        let mut client = self.client(link)?;
        let reply = self
            .call(link, "exchange", client.exchange(self.request(summary)))
            .await?;
        let theirs = view_from_wire(reply.view)?;
        let their_bloom = bloom_from_wire(&reply.bloom_clock)?;
        let target = theirs.vv.clone();
        self.learn(link, theirs)?;
        let bloom_says_nothing =
            bloom_says_nothing_to_pull(my_bloom.as_ref(), their_bloom.as_ref());
        if bloom_says_nothing && !exact {
            metrics::counter!("calm_gossip_exchanges_total", "decision" => "bloom_skip")
                .increment(1);
            return Ok(());
        }
        if mine.vv.missing_from(&target).is_empty() {
            metrics::counter!("calm_gossip_exchanges_total", "decision" => "in_sync").increment(1);
            return Ok(());
        }
        if bloom_says_nothing {
            metrics::counter!("calm_gossip_bloom_false_positives_total").increment(1);
        }
        metrics::counter!("calm_gossip_exchanges_total", "decision" => "pulled").increment(1);
        self.pull_until(link, &target).await?;
        Ok(())
    }

    /// Pull from `link`'s peer, chunk by chunk, what this node lacks of `target` (neither
    /// applied nor waiting here: `Replica::wanted_from`); stops when nothing is missing, the
    /// peer has nothing more, a chunk brought nothing new or after `PULLS_PER_ROUND_MAX`
    /// chunks. Returns the number of new facts accepted (applied or waiting).
    async fn pull_until(&self, link: &Link, target: &VersionVector) -> Result<u64, GossipError> {
        let mut accepted = 0;
        for _ in 0..PULLS_PER_ROUND_MAX {
            let target = target.clone();
            let missing = self
                .with_local(move |local| Ok(local.replica().wanted_from(&target)))
                .await?;
            if missing.is_empty() {
                break;
            }
            let ranges = missing
                .into_iter()
                .take(PULL_RANGES_MAX)
                .map(|(origin, from_seq, to_seq)| wire::FactRange {
                    origin,
                    from_seq,
                    to_seq,
                })
                .collect();
            let mut client = self.client(link)?;
            let request = self.request(wire::PullRequest {
                node: self.node,
                ranges,
            });
            metrics::counter!("calm_gossip_pulls_total").increment(1);
            let batch = self.call(link, "pull", client.pull(request)).await?;
            if batch.facts.is_empty() {
                break;
            }
            let (report, _) = self.accept(batch.facts, "pull").await?;
            let new = report.applied + report.buffered;
            accepted += new;
            if new == 0 {
                break;
            }
        }
        Ok(accepted)
    }

    // --- escrow ----------------------------------------------------------------------------

    /// Ask peers, one after another, for `down` decrement and `up` increment rights on the
    /// bounded counter `key`, until both are covered or `deadline`. Returns the rights
    /// received: transfer facts applied here, so the kernel lets this node spend them.
    pub async fn ask_escrow(
        &self,
        key: &[u8],
        mut down: i64,
        mut up: i64,
        deadline: tokio::time::Instant,
    ) -> (i64, i64) {
        let mut got = (0, 0);
        for link in &self.links {
            if down <= 0 && up <= 0 {
                break;
            }
            let asked = async {
                let mut client = self.client(link)?;
                let request = self.request(wire::EscrowAsk {
                    node: self.node,
                    key: key.to_vec(),
                    down: down.max(0),
                    up: up.max(0),
                });
                let grant = self
                    .call(link, "ask_escrow", client.ask_escrow(request))
                    .await?;
                if grant.through_seq > 0 {
                    let target: VersionVector =
                        [(link.id, grant.through_seq)].into_iter().collect();
                    self.pull_until(link, &target).await?;
                    if !self.local_vv().await?.dominates(&target) {
                        // Anti-entropy brings the transfer later; the rights are ours then.
                        return Ok((0, 0));
                    }
                }
                Ok::<_, GossipError>((grant.down, grant.up))
            };
            match tokio::time::timeout_at(deadline, asked).await {
                Ok(Ok((d, u))) => {
                    got = (got.0 + d, got.1 + u);
                    down -= d;
                    up -= u;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "asking a peer for escrow failed"),
                Err(_) => break,
            }
        }
        metrics::counter!("calm_escrow_peer_rights_received_total")
            .increment(got.0.unsigned_abs() + got.1.unsigned_abs());
        got
    }

    /// Give `asker` what this node can spare of the rights it asks for on `key`: transfer
    /// facts, durable and queued for every peer before the answer.
    async fn serve_escrow_ask(
        &self,
        request: wire::EscrowAsk,
    ) -> Result<wire::EscrowGrant, Status> {
        let asker = request.node;
        if asker == self.node || !self.links.iter().any(|l| l.id == asker) {
            return Err(Status::invalid_argument(format!(
                "node {asker} asks node {} for escrow rights but is not one of its peers; give every node the same members list",
                self.node
            )));
        }
        if request.key.is_empty() || request.key.len() > KEY_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "an escrow ask names a key of {} bytes (1 to {KEY_BYTES_MAX})",
                request.key.len()
            )));
        }
        if request.down < 0 || request.up < 0 {
            return Err(Status::invalid_argument(
                "an escrow ask wants negative rights; ask for >= 0 of each direction",
            ));
        }
        let hlc = self.hlc.clone();
        let issued = self
            .with_local(move |local| {
                let Some(KeyState::Bounded(b)) = local.replica().key_state(&request.key) else {
                    return Ok(Vec::new());
                };
                let (held_down, held_up) = b.rights_of(local.replica().node());
                let mut issued = Vec::new();
                // Decrement rights move as a positive amount, increment rights as negative.
                for (amount, sign) in [
                    (escrow_spare(held_down, request.down), 1),
                    (escrow_spare(held_up, request.up), -1),
                ] {
                    if amount == 0 {
                        continue;
                    }
                    let transferred = local
                        .transfer(&request.key, asker, sign * amount, hlc.now())
                        .unwrap_or_else(|e| crate::node::fatal("logging an escrow transfer", &e));
                    match transferred {
                        Ok(t) => issued.push((sign * amount, t)),
                        // E.g. own facts waiting on a Raft command: nothing to spare now.
                        Err(refused) => tracing::debug!(%refused, "no escrow transfer"),
                    }
                }
                Ok(issued)
            })
            .await
            .map_err(Status::from)?;
        let mut grant = wire::EscrowGrant::default();
        for (amount, t) in issued {
            if let Err(e) = t.durable.await {
                crate::node::fatal("making an escrow transfer durable", &e);
            }
            self.publish(t.fact);
            if amount > 0 {
                grant.down = amount;
            } else {
                grant.up = -amount;
            }
            grant.through_seq = grant.through_seq.max(t.id.seq);
        }
        metrics::counter!("calm_escrow_peer_rights_given_total")
            .increment(grant.down.unsigned_abs() + grant.up.unsigned_abs());
        Ok(grant)
    }

    // --- pruning -------------------------------------------------------------------------

    async fn prune_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let period = Duration::from_millis(self.options.prune_interval_ms.max(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.prune_archive().await {
                tracing::warn!(error = %e, "pruning the fact archive failed; retrying next period");
            }
        }
    }

    // --- serving -------------------------------------------------------------------------

    async fn serve_pull(&self, request: wire::PullRequest) -> Result<wire::FactBatch, GossipError> {
        if request.ranges.len() > PULL_RANGES_MAX {
            return Err(GossipError::Malformed(format!(
                "a pull names {} ranges; the limit is {PULL_RANGES_MAX}",
                request.ranges.len()
            )));
        }
        let mut ranges = Vec::with_capacity(request.ranges.len());
        for r in request.ranges {
            if r.origin == 0 || r.from_seq == 0 || r.from_seq > r.to_seq {
                return Err(GossipError::Malformed(format!(
                    "pull range n{}:{}..={} is not a range of facts (origins and sequences start at 1)",
                    r.origin, r.from_seq, r.to_seq
                )));
            }
            ranges.push((r.origin, r.from_seq, r.to_seq));
        }
        let facts = self
            .with_local(move |local| {
                let mut out = Vec::new();
                for (origin, from, to) in ranges {
                    if out.len() >= PULL_BATCH_BYTES_MAX {
                        break;
                    }
                    let part =
                        local.archived_facts(origin, from, to, PULL_BATCH_BYTES_MAX - out.len())?;
                    out.extend_from_slice(&part);
                }
                Ok(out)
            })
            .await?;
        let count = decode_facts(&facts).count() as u64;
        metrics::counter!("calm_gossip_facts_sent_total", "path" => "pull").increment(count);
        metrics::counter!("calm_gossip_fact_bytes_sent_total", "path" => "pull")
            .increment(facts.len() as u64);
        Ok(wire::FactBatch {
            sender: self.node,
            facts,
        })
    }

    async fn serve_exchange(
        &self,
        summary: wire::Summary,
    ) -> Result<wire::SummaryReply, GossipError> {
        let caller = view_from_wire(summary.view)?;
        let base = vv_from_wire(summary.window_base)?;
        if let Some(link) = self.links.iter().find(|l| l.id == caller.node) {
            // Learning from the caller too halves the time to a complete set of views, and
            // a caller that reaches us is worth pushing to again.
            self.record_view(caller);
            lock(&link.queue).reachable = true;
        }
        let mine = self.local_view().await?;
        let bloom = window_bloom(&base, &mine.vv);
        Ok(wire::SummaryReply {
            view: Some(view_to_wire(&mine)),
            bloom_clock: bloom.map_or_else(Vec::new, |b| b.as_bytes().to_vec()),
        })
    }

    /// Peers in the order a fetch of `target` should ask them: those known to have all of
    /// it, then origins of the missing facts, then the rest.
    fn fetch_order(&self, target: &VersionVector) -> Vec<usize> {
        let views = lock(&self.views);
        let mut order: Vec<(bool, bool, usize)> = self
            .links
            .iter()
            .enumerate()
            .map(|(i, link)| {
                let has_all = views.get(&link.id).is_some_and(|v| v.vv.dominates(target));
                let is_origin = target.get(link.id) > 0;
                (!has_all, !is_origin, i)
            })
            .collect();
        order.sort_unstable();
        order.into_iter().map(|(_, _, i)| i).collect()
    }
}

/// Take up to one batch off a push queue: `(facts back to back, how many)`.
fn take_batch(queue: &mut PushQueue) -> (Vec<u8>, usize) {
    let mut batch = Vec::new();
    let mut facts = 0;
    while let Some(fact) = queue.facts.front() {
        if facts == PUSH_BATCH_FACTS_MAX
            || (facts > 0 && batch.len() + fact.len() > PUSH_BATCH_BYTES_MAX)
        {
            break;
        }
        batch.extend_from_slice(fact);
        queue.bytes -= fact.len();
        queue.facts.pop_front();
        facts += 1;
    }
    (batch, facts)
}

impl FactSource for Gossip {
    /// Pull the named facts from the peers likeliest to have them; returns after one peer
    /// delivered some, or after [`FETCH_WAIT_MAX`] (then after a short pause, so a command
    /// blocked on facts nobody reachable has does not spin).
    fn fetch<'a>(&'a self, group: GroupId, missing: &'a [(NodeId, u64)]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let named: VersionVector = missing.iter().copied().collect();
            let deadline = tokio::time::Instant::now() + FETCH_WAIT_MAX;
            for i in self.fetch_order(&named) {
                let link = &self.links[i];
                // Everything the peer is known to have, too: a named fact may already wait
                // here for another origin's fact (an escrow spend for a transfer), which
                // only a wider pull brings.
                let mut target = self.known_vv(link.id);
                for (origin, seq) in named.iter() {
                    target.raise(origin, seq);
                }
                match tokio::time::timeout_at(deadline, self.pull_until(link, &target)).await {
                    Ok(Ok(accepted)) if accepted > 0 => {
                        metrics::counter!("calm_gossip_fetches_total", "outcome" => "delivered")
                            .increment(1);
                        return;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!(group, error = %e, "fetch from a peer failed"),
                    Err(_) => break,
                }
            }
            metrics::counter!("calm_gossip_fetches_total", "outcome" => "nothing").increment(1);
            tracing::debug!(
                group,
                ?missing,
                "no reachable peer had the facts a command waits for"
            );
            let pause = FETCH_RETRY_DELAY
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            tokio::time::sleep(pause.max(Duration::from_millis(1))).await;
        })
    }
}

/// The gossip gRPC service of a node (see [`Gossip::service`]).
pub struct GossipService {
    gossip: Arc<Gossip>,
}

#[tonic::async_trait]
impl GossipPeer for GossipService {
    async fn push(
        &self,
        request: Request<wire::FactBatch>,
    ) -> Result<Response<wire::PushReply>, Status> {
        let batch = request.into_inner();
        let (_, view) = self.gossip.accept(batch.facts, "push").await.map_err(|e| {
            if !matches!(e, GossipError::Malformed(_) | GossipError::Local(LocalError::BadDeliveredFact { .. })) {
                tracing::error!(error = %e, sender = batch.sender, "delivering pushed facts failed");
            }
            Status::from(e)
        })?;
        Ok(Response::new(wire::PushReply {
            view: Some(view_to_wire(&view)),
        }))
    }

    async fn exchange(
        &self,
        request: Request<wire::Summary>,
    ) -> Result<Response<wire::SummaryReply>, Status> {
        Ok(Response::new(
            self.gossip.serve_exchange(request.into_inner()).await?,
        ))
    }

    async fn pull(
        &self,
        request: Request<wire::PullRequest>,
    ) -> Result<Response<wire::FactBatch>, Status> {
        Ok(Response::new(
            self.gossip.serve_pull(request.into_inner()).await?,
        ))
    }

    async fn ask_escrow(
        &self,
        request: Request<wire::EscrowAsk>,
    ) -> Result<Response<wire::EscrowGrant>, Status> {
        Ok(Response::new(
            self.gossip.serve_escrow_ask(request.into_inner()).await?,
        ))
    }
}

// --- pure helpers ----------------------------------------------------------------------

/// What a node holding `held` rights of one direction gives to a peer that wants `wanted`:
/// what the peer needs if it can, else all it holds, and up to half its holdings beyond the
/// need, so that the next spends there do not ask again at once.
pub fn escrow_spare(held: i64, wanted: i64) -> i64 {
    if held <= 0 || wanted <= 0 {
        return 0;
    }
    wanted.max(held / 2).min(held)
}

/// Component-wise minimum: the facts both vectors cover.
pub fn meet(a: &VersionVector, b: &VersionVector) -> VersionVector {
    a.iter()
        .map(|(origin, seq)| (origin, seq.min(b.get(origin))))
        .collect()
}

/// The archive floor: what `own` and every peer's checkpointed vector cover; `None` while
/// some peer's is unknown.
pub fn archive_floor<'a>(
    own: &VersionVector,
    peers: impl IntoIterator<Item = Option<&'a VersionVector>>,
) -> Option<VersionVector> {
    let mut floor = own.clone();
    for peer in peers {
        floor = meet(&floor, peer?);
    }
    Some(floor)
}

/// The Bloom clock of the facts in `vv` above `base`, or `None` when that window holds more
/// than `BLOOM_WINDOW_FACTS_MAX` facts (too full to say anything useful).
pub fn window_bloom(base: &VersionVector, vv: &VersionVector) -> Option<BloomClock> {
    let window: u64 = vv
        .iter()
        .map(|(origin, seq)| seq.saturating_sub(base.get(origin)))
        .sum();
    if window > BLOOM_WINDOW_FACTS_MAX {
        return None;
    }
    let mut bloom = BloomClock::new();
    for (origin, seq) in vv.iter() {
        for s in base.get(origin) + 1..=seq {
            bloom.insert(origin, s);
        }
    }
    Some(bloom)
}

/// Whether the Bloom clocks say the responder probably has nothing the caller lacks. An
/// unknown clock (window too large) says nothing.
pub fn bloom_says_nothing_to_pull(mine: Option<&BloomClock>, theirs: Option<&BloomClock>) -> bool {
    match (mine, theirs) {
        (Some(mine), Some(theirs)) => mine.dominates(theirs),
        _ => false,
    }
}

fn bloom_from_wire(bytes: &[u8]) -> Result<Option<BloomClock>, GossipError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    BloomClock::from_bytes(bytes)
        .map(Some)
        .map_err(|e| GossipError::Malformed(e.to_string()))
}

fn vv_to_wire(vv: &VersionVector) -> wire::VersionVector {
    wire::VersionVector {
        entries: vv
            .iter()
            .map(|(origin, seq)| wire::VersionEntry { origin, seq })
            .collect(),
    }
}

fn vv_from_wire(vv: Option<wire::VersionVector>) -> Result<VersionVector, GossipError> {
    let entries = vv.map(|v| v.entries).unwrap_or_default();
    if entries.len() > VERSION_VECTOR_ENTRIES_MAX {
        return Err(GossipError::Malformed(format!(
            "a version vector of {} entries exceeds the limit of {VERSION_VECTOR_ENTRIES_MAX}",
            entries.len()
        )));
    }
    if entries.iter().any(|e| e.origin == 0) {
        return Err(GossipError::Malformed(
            "a version vector names origin 0, which is reserved".into(),
        ));
    }
    Ok(entries.into_iter().map(|e| (e.origin, e.seq)).collect())
}

fn view_to_wire(view: &NodeView) -> wire::NodeView {
    wire::NodeView {
        node: view.node,
        version_vector: Some(vv_to_wire(&view.vv)),
        checkpointed: Some(vv_to_wire(&view.checkpointed)),
    }
}

fn view_from_wire(view: Option<wire::NodeView>) -> Result<NodeView, GossipError> {
    let view =
        view.ok_or_else(|| GossipError::Malformed("a reply lacks the node's view".into()))?;
    if view.node == 0 {
        return Err(GossipError::Malformed(
            "a view names node 0, which is reserved".into(),
        ));
    }
    Ok(NodeView {
        node: view.node,
        vv: vv_from_wire(view.version_vector)?,
        checkpointed: vv_from_wire(view.checkpointed)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use calm_kernel::Mode;
    use calm_kernel::rules::RuleSet;
    use calm_raft::local::LocalOptions;

    fn vv(entries: &[(NodeId, u64)]) -> VersionVector {
        entries.iter().copied().collect()
    }

    #[test]
    fn a_giver_spares_the_need_and_half_beyond_it_never_more_than_it_holds() {
        assert_eq!(
            escrow_spare(100, 10),
            50,
            "half of the holdings when the need is small"
        );
        assert_eq!(
            escrow_spare(100, 70),
            70,
            "the need when it is larger than half"
        );
        assert_eq!(
            escrow_spare(30, 70),
            30,
            "all it holds when that is less than the need"
        );
        assert_eq!(escrow_spare(1, 1), 1);
        assert_eq!(escrow_spare(0, 5), 0);
        assert_eq!(escrow_spare(-3, 5), 0);
        assert_eq!(escrow_spare(50, 0), 0, "nothing asked, nothing given");
    }

    #[test]
    fn meet_and_archive_floor() {
        let a = vv(&[(1, 5), (2, 9)]);
        let b = vv(&[(1, 7), (3, 2)]);
        assert_eq!(meet(&a, &b), vv(&[(1, 5)]));
        assert_eq!(meet(&a, &VersionVector::new()), VersionVector::new());
        let c = vv(&[(1, 4), (2, 20)]);
        assert_eq!(
            archive_floor(&a, [Some(&c), Some(&a)]),
            Some(vv(&[(1, 4), (2, 9)]))
        );
        // A peer not heard from yet holds everything back.
        assert_eq!(archive_floor(&a, [Some(&c), None]), None);
        assert_eq!(archive_floor(&a, []), Some(a.clone()));
    }

    #[test]
    fn bloom_windows_decide_only_when_they_can() {
        let base = vv(&[(1, 100), (2, 50)]);
        let mine = vv(&[(1, 110), (2, 55)]);
        let same = window_bloom(&base, &mine).unwrap();
        assert!(same.may_contain(1, 101) && same.may_contain(2, 55));
        assert!(
            !same.may_contain(1, 100),
            "the window starts above the base"
        );
        let theirs = window_bloom(&base, &mine).unwrap();
        assert!(bloom_says_nothing_to_pull(Some(&same), Some(&theirs)));
        // The responder has a fact the caller lacks: dominance fails unless the missing
        // fact's bits happen to be set already (they are not in a window this small; the
        // hashes are deterministic, so this never flakes).
        let ahead = window_bloom(&base, &vv(&[(1, 110), (2, 56)])).unwrap();
        assert!(!bloom_says_nothing_to_pull(Some(&same), Some(&ahead)));
        assert!(bloom_says_nothing_to_pull(Some(&ahead), Some(&same)));
        // Too large a window is unknown, and unknown never skips.
        let huge = vv(&[(1, 100 + BLOOM_WINDOW_FACTS_MAX + 1)]);
        assert!(window_bloom(&base, &huge).is_none());
        assert!(window_bloom(&base, &vv(&[(1, 100 + BLOOM_WINDOW_FACTS_MAX)])).is_some());
        assert!(!bloom_says_nothing_to_pull(None, Some(&same)));
        assert!(!bloom_says_nothing_to_pull(Some(&same), None));
        // A vector behind the base (a peer that lost facts in a crash) has an empty window.
        assert!(window_bloom(&base, &vv(&[(1, 3)])).unwrap().is_empty());
    }

    #[test]
    fn push_batches_are_bounded_in_facts_and_bytes() {
        let mut queue = PushQueue {
            facts: VecDeque::new(),
            bytes: 0,
            reachable: true,
        };
        let push = |q: &mut PushQueue, len: usize, n: usize| {
            for _ in 0..n {
                q.bytes += len;
                q.facts.push_back(vec![7u8; len].into());
            }
        };
        push(&mut queue, 10, PUSH_BATCH_FACTS_MAX + 3);
        let (batch, facts) = take_batch(&mut queue);
        assert_eq!(
            (batch.len(), facts),
            (10 * PUSH_BATCH_FACTS_MAX, PUSH_BATCH_FACTS_MAX)
        );
        assert_eq!(take_batch(&mut queue).1, 3);
        assert_eq!((queue.facts.len(), queue.bytes), (0, 0));
        assert_eq!(take_batch(&mut queue).1, 0);
        // A fact larger than a batch travels alone; bytes bound the rest.
        push(&mut queue, PUSH_BATCH_BYTES_MAX + 1, 1);
        push(&mut queue, PUSH_BATCH_BYTES_MAX / 2, 3);
        assert_eq!(take_batch(&mut queue).1, 1);
        assert_eq!(take_batch(&mut queue).1, 2);
        assert_eq!(take_batch(&mut queue).1, 1);
    }

    #[test]
    fn version_vectors_from_peers_are_checked() {
        let ok = vv_from_wire(Some(vv_to_wire(&vv(&[(1, 3), (4, 9)])))).unwrap();
        assert_eq!(ok, vv(&[(1, 3), (4, 9)]));
        assert_eq!(vv_from_wire(None).unwrap(), VersionVector::new());
        let zero = wire::VersionVector {
            entries: vec![wire::VersionEntry { origin: 0, seq: 1 }],
        };
        assert!(matches!(
            vv_from_wire(Some(zero)),
            Err(GossipError::Malformed(_))
        ));
        let many = wire::VersionVector {
            entries: (1..=VERSION_VECTOR_ENTRIES_MAX as u64 + 1)
                .map(|origin| wire::VersionEntry { origin, seq: 1 })
                .collect(),
        };
        assert!(matches!(
            vv_from_wire(Some(many)),
            Err(GossipError::Malformed(_))
        ));
        assert!(matches!(
            view_from_wire(None),
            Err(GossipError::Malformed(_))
        ));
        assert!(matches!(
            bloom_from_wire(&[1, 2, 3]),
            Err(GossipError::Malformed(_))
        ));
    }

    #[test]
    fn publish_never_blocks_and_drops_beyond_the_queue_bound() {
        let dir = tempfile::tempdir().unwrap();
        let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
        let (local, _) = LocalState::open(dir.path(), 1, rules, LocalOptions::default()).unwrap();
        let members = [
            (1, "127.0.0.1:1".to_string()),
            (2, "127.0.0.1:2".to_string()),
        ];
        let gossip = Gossip::new(
            1,
            Arc::new(Mutex::new(local)),
            Arc::new(Hlc::new(1)),
            Peers::new(),
            members.into_iter().collect(),
            GossipOptions::default(),
        );
        assert_eq!(gossip.links.len(), 1, "a node does not gossip with itself");
        for _ in 0..PUSH_QUEUE_FACTS_MAX + 5 {
            gossip.publish(vec![1]);
        }
        assert_eq!(
            lock(&gossip.links[0].queue).facts.len(),
            PUSH_QUEUE_FACTS_MAX
        );
        {
            let mut queue = lock(&gossip.links[0].queue);
            queue.facts.clear();
            queue.bytes = 0;
            queue.reachable = false;
        }
        gossip.publish(vec![1]);
        assert!(lock(&gossip.links[0].queue).facts.is_empty());
        let views = gossip.peer_views();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].0, 2);
        assert!(views[0].2.is_none());
    }
}
