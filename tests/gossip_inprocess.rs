//! Gossip between three in-process nodes: each a real `LocalState` (WAL, RocksDB) in a temp
//! dir and a `Gossip` served by a real tonic server on 127.0.0.1. No Raft: keys are created
//! by applying the same command on every replica, as the key's group would.
//!
//! Every wait is bounded in rounds and time and fails with what each node holds; nothing
//! asserts how long anything takes.

use calm::gossip::{DELIVER_INLINE_BYTES_MAX, Gossip, GossipOptions};
use calm_kernel::clock::Hlc;
use calm_kernel::fact::decode_facts;
use calm_kernel::rules::{Rule, RuleSet};
use calm_kernel::{Bounds, HlcTimestamp, Mode, NodeId, Op, Value, VersionVector};
use calm_raft::consensus::network::Peers;
use calm_raft::consensus::{FactSource, SharedLocal};
use calm_raft::local::{LocalOptions, LocalState};
use calm_raft::wal::WalOptions;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Bounds of every wait: this many polls, this far apart (30 s in all).
const POLLS_MAX: u32 = 600;
const POLL_EVERY: Duration = Duration::from_millis(50);

fn lock(local: &SharedLocal) -> MutexGuard<'_, LocalState> {
    local.lock().unwrap_or_else(|e| e.into_inner())
}

struct Task {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl Task {
    async fn stop(self) {
        self.stop.cancel();
        let abort = self.handle.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

struct Node {
    id: NodeId,
    addr: SocketAddr,
    local: SharedLocal,
    hlc: Arc<Hlc>,
    gossip: Arc<Gossip>,
    server: Option<Task>,
    runner: Option<Task>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn serve(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(self.gossip.service())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        let handle = tokio::spawn(async move {
            server.await.expect("the gossip server runs");
        });
        self.server = Some(Task { stop, handle });
    }

    /// Serve again on the same address (after `stop_server`).
    async fn restart_server(&mut self) {
        let mut bound = None;
        for _ in 0..POLLS_MAX {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    bound = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(POLL_EVERY).await,
            }
        }
        self.serve(bound.expect("the node's port becomes free again"));
    }

    async fn stop_server(&mut self) {
        if let Some(task) = self.server.take() {
            task.stop().await;
        }
    }

    fn run_gossip(&mut self) {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(self.gossip.clone().run(stop.clone()));
        self.runner = Some(Task { stop, handle });
    }

    async fn stop_gossip(&mut self) {
        if let Some(task) = self.runner.take() {
            task.stop().await;
        }
    }

    fn counter(&self, key: &[u8]) -> i64 {
        match lock(&self.local).replica().read(key) {
            Some(Value::Counter(v)) => v,
            other => panic!("node {}: key {key:?} is {other:?}", self.id),
        }
    }

    fn vv(&self) -> VersionVector {
        lock(&self.local).replica().version_vector().clone()
    }

    /// Archived facts of `origin` in `from..=to`, by sequence.
    fn archived(&self, origin: NodeId, from: u64, to: u64) -> Vec<u64> {
        let bytes = lock(&self.local)
            .archived_facts(origin, from, to, usize::MAX)
            .unwrap();
        decode_facts(&bytes).map(|f| f.unwrap().id.seq).collect()
    }

    fn checkpoint(&self) {
        lock(&self.local).checkpoint().unwrap();
    }
}

/// What one node needs to admit and publish from a spawned task.
#[derive(Clone)]
struct Writer {
    local: SharedLocal,
    hlc: Arc<Hlc>,
    gossip: Arc<Gossip>,
}

impl Writer {
    fn of(node: &Node) -> Writer {
        Writer {
            local: node.local.clone(),
            hlc: node.hlc.clone(),
            gossip: node.gossip.clone(),
        }
    }

    /// Admit a counter add, wait until it is durable, then publish it (as the API does).
    async fn add(&self, key: &[u8], delta: i64) {
        let admit = lock(&self.local)
            .admit(key, &Op::CounterAdd { delta }, self.hlc.now())
            .unwrap()
            .expect("a counter add on an existing hybrid key is admitted");
        assert!(!admit.fact.is_empty(), "a fast-path fact");
        admit.durable.expect("a fact was appended").await.unwrap();
        self.gossip.publish(admit.fact);
    }
}

struct Cluster {
    nodes: Vec<Node>,
}

fn local_options(checkpoints_kept: usize) -> LocalOptions {
    LocalOptions {
        wal: WalOptions {
            segment_bytes_max: 4 << 20,
            batch_bytes_max: 1 << 20,
            group_bytes_max: 2 << 20,
            preallocate: false,
            ..WalOptions::default()
        },
        checkpoints_kept,
        ..LocalOptions::default()
    }
}

fn fast_options() -> GossipOptions {
    GossipOptions {
        anti_entropy_interval_ms: 50,
        exact_check_every: 4,
        rpc_timeout_ms: 2_000,
        ..GossipOptions::default()
    }
}

impl Cluster {
    /// Three nodes, servers listening, gossip not running yet.
    async fn new(options: GossipOptions, checkpoints_kept: usize) -> Cluster {
        let mut listeners = Vec::new();
        let mut members = BTreeMap::new();
        for id in 1..=3u64 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            members.insert(id, listener.local_addr().unwrap().to_string());
            listeners.push(listener);
        }
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let id = i as u64 + 1;
            let dir = tempfile::tempdir().unwrap();
            let rules = rules();
            let (local, _) =
                LocalState::open(dir.path(), id, rules, local_options(checkpoints_kept)).unwrap();
            let local: SharedLocal = Arc::new(Mutex::new(local));
            let hlc = Arc::new(Hlc::new(id));
            let gossip = Gossip::new(
                id,
                local.clone(),
                hlc.clone(),
                Peers::new(),
                members.clone(),
                options.clone(),
            );
            let mut node = Node {
                id,
                addr: listener.local_addr().unwrap(),
                local,
                hlc,
                gossip,
                server: None,
                runner: None,
                _dir: dir,
            };
            node.serve(listener);
            nodes.push(node);
        }
        Cluster { nodes }
    }

    fn run_gossip(&mut self) {
        for node in &mut self.nodes {
            node.run_gossip();
        }
    }

    async fn stop(mut self) {
        for node in &mut self.nodes {
            node.stop_gossip().await;
            node.stop_server().await;
        }
    }

    /// Create counter `key` on every replica, as its Raft group would.
    fn create_counter(&self, key: &[u8]) {
        let cmd = lock(&self.nodes[0].local)
            .replica()
            .prepare_command(key, &Op::CounterAdd { delta: 0 }, HlcTimestamp(1))
            .unwrap();
        for node in &self.nodes {
            lock(&node.local).replica_mut().apply_command(&cmd).unwrap();
        }
    }

    fn writer(&self, i: usize) -> Writer {
        Writer::of(&self.nodes[i])
    }

    /// Wait until every node in `which` holds `expected` and the same version vector.
    async fn wait_converged(&self, which: &[usize], expected: &BTreeMap<Vec<u8>, i64>) {
        for _ in 0..POLLS_MAX {
            let vvs: Vec<VersionVector> = which.iter().map(|&i| self.nodes[i].vv()).collect();
            let values_ok = which.iter().all(|&i| {
                expected
                    .iter()
                    .all(|(key, &want)| self.nodes[i].counter(key) == want)
            });
            if values_ok && vvs.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        let mut report = String::new();
        for &i in which {
            let node = &self.nodes[i];
            let values: Vec<i64> = expected.keys().map(|k| node.counter(k)).collect();
            report.push_str(&format!(
                "\n  node {}: values {values:?}, vv {}, pending {}, views {:?}",
                node.id,
                node.vv(),
                lock(&node.local).replica().pending_facts(),
                node.gossip.peer_views()
            ));
        }
        panic!(
            "nodes {which:?} did not converge to {:?} within {POLLS_MAX} polls:{report}",
            expected.values().collect::<Vec<_>>()
        );
    }

    /// Wait until node `i` heard from every peer after `since`.
    async fn wait_heard_after(&self, i: usize, since: Instant) {
        for _ in 0..POLLS_MAX {
            let views = self.nodes[i].gossip.peer_views();
            if views
                .iter()
                .all(|(_, _, heard)| heard.is_some_and(|h| h > since))
            {
                return;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        panic!(
            "node {} did not hear from every peer: {:?}",
            self.nodes[i].id,
            self.nodes[i].gossip.peer_views()
        );
    }
}

/// Every key hybrid; `stock:*` bounded counters.
fn rules() -> calm_kernel::rules::CompiledRules {
    RuleSet {
        version: 1,
        rules: vec![Rule::new("stock:*", Mode::Hybrid).bounded(Bounds::new(0, 1_000_000).unwrap())],
        default_mode: Mode::Hybrid,
    }
    .compile()
    .unwrap()
}

fn keys(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("hits:{i}").into_bytes()).collect()
}

/// Every node adds `adds` deltas concurrently over `keys`; returns the expected sums.
async fn add_everywhere(
    cluster: &Cluster,
    which: &[usize],
    keys: &[Vec<u8>],
    adds: u64,
    expected: &mut BTreeMap<Vec<u8>, i64>,
) {
    let mut tasks = Vec::new();
    for &i in which {
        let writer = cluster.writer(i);
        let keys = keys.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut sums = BTreeMap::new();
            for n in 0..adds {
                let key = &keys[(n as usize + i) % keys.len()];
                let delta = (n % 7) as i64 - 2 + i as i64;
                writer.add(key, delta).await;
                *sums.entry(key.clone()).or_insert(0) += delta;
            }
            sums
        }));
    }
    for task in tasks {
        for (key, sum) in task.await.unwrap() {
            *expected.entry(key).or_insert(0) += sum;
        }
    }
}

fn zeroes(keys: &[Vec<u8>]) -> BTreeMap<Vec<u8>, i64> {
    keys.iter().map(|k| (k.clone(), 0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_converge_to_the_exact_sum() {
    let mut cluster = Cluster::new(fast_options(), 2).await;
    cluster.run_gossip();
    let keys = keys(4);
    for key in &keys {
        cluster.create_counter(key);
    }
    let mut expected = zeroes(&keys);
    add_everywhere(&cluster, &[0, 1, 2], &keys, 300, &mut expected).await;
    cluster.wait_converged(&[0, 1, 2], &expected).await;
    let vv = cluster.nodes[0].vv();
    assert_eq!((vv.get(1), vv.get(2), vv.get(3)), (300, 300, 300));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_keeps_admitting_and_converges_after_it_returns() {
    let mut cluster = Cluster::new(fast_options(), 2).await;
    cluster.run_gossip();
    let keys = keys(2);
    for key in &keys {
        cluster.create_counter(key);
    }
    let mut expected = zeroes(&keys);
    add_everywhere(&cluster, &[0, 1, 2], &keys, 50, &mut expected).await;
    cluster.wait_converged(&[0, 1, 2], &expected).await;

    // Node 3 drops off the network: its server and its gossip stop.
    cluster.nodes[2].stop_gossip().await;
    cluster.nodes[2].stop_server().await;
    let mut majority = expected.clone();
    add_everywhere(&cluster, &[0, 1], &keys, 100, &mut majority).await;
    let mut all = majority.clone();
    let mut alone = BTreeMap::new();
    add_everywhere(&cluster, &[2], &keys, 100, &mut alone).await;
    for (key, sum) in alone {
        *all.get_mut(&key).unwrap() += sum;
    }
    cluster.wait_converged(&[0, 1], &majority).await;
    assert_eq!(
        cluster.nodes[2].vv().get(1),
        50,
        "node 3 is cut off from node 1's new facts"
    );
    assert_eq!(cluster.nodes[0].vv().get(3), 50, "and node 1 from node 3's");

    cluster.nodes[2].restart_server().await;
    cluster.nodes[2].run_gossip();
    cluster.wait_converged(&[0, 1, 2], &all).await;
    let vv = cluster.nodes[2].vv();
    assert_eq!((vv.get(1), vv.get(2), vv.get(3)), (150, 150, 150));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_alone_converges() {
    let options = GossipOptions {
        push_enabled: false,
        ..fast_options()
    };
    let mut cluster = Cluster::new(options, 2).await;
    cluster.run_gossip();
    let keys = keys(3);
    for key in &keys {
        cluster.create_counter(key);
    }
    let mut expected = zeroes(&keys);
    add_everywhere(&cluster, &[0, 1, 2], &keys, 200, &mut expected).await;
    cluster.wait_converged(&[0, 1, 2], &expected).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facts_published_before_peers_are_up_arrive_by_anti_entropy() {
    let mut cluster = Cluster::new(fast_options(), 2).await;
    let keys = keys(2);
    for key in &keys {
        cluster.create_counter(key);
    }
    // Only node 1 runs; the others' servers are down, so its pushes fail.
    cluster.nodes[1].stop_server().await;
    cluster.nodes[2].stop_server().await;
    cluster.nodes[0].run_gossip();
    let mut expected = zeroes(&keys);
    add_everywhere(&cluster, &[0], &keys, 150, &mut expected).await;
    assert_eq!(cluster.nodes[1].vv().get(1), 0);

    for i in [1, 2] {
        cluster.nodes[i].restart_server().await;
        cluster.nodes[i].run_gossip();
    }
    cluster.wait_converged(&[0, 1, 2], &expected).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_too_large_to_deliver_in_place_arrives_whole() {
    // Pushes are delivered on the async thread that receives them; a batch above
    // DELIVER_INLINE_BYTES_MAX goes to a blocking thread. Node 2 misses more than that bound
    // of node 1's facts, so its anti-entropy pull brings them back in batches above it.
    let mut cluster = Cluster::new(fast_options(), 2).await;
    let keys = keys(3);
    for key in &keys {
        cluster.create_counter(key);
    }
    cluster.nodes[1].stop_server().await;
    cluster.nodes[0].run_gossip();
    let mut expected = zeroes(&keys);
    add_everywhere(&cluster, &[0], &keys, 2_000, &mut expected).await;
    let missed = lock(&cluster.nodes[0].local)
        .archived_facts(1, 1, 2_000, usize::MAX)
        .expect("node 1 serves its archive");
    assert!(
        missed.len() > DELIVER_INLINE_BYTES_MAX,
        "node 2 must miss more than {DELIVER_INLINE_BYTES_MAX} bytes of facts, not {}",
        missed.len()
    );
    assert_eq!(cluster.nodes[1].vv().get(1), 0);

    cluster.nodes[1].restart_server().await;
    cluster.nodes[1].run_gossip();
    cluster.wait_converged(&[0, 1], &expected).await;
    assert_eq!(cluster.nodes[1].vv().get(1), 2_000);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_brings_named_facts_from_any_peer_that_has_them() {
    // Gossip does not run: only `FactSource::fetch` moves facts.
    let mut cluster = Cluster::new(fast_options(), 2).await;
    let key = b"hits".to_vec();
    cluster.create_counter(&key);
    let writer = cluster.writer(0);
    for _ in 0..40 {
        writer.add(&key, 2).await;
    }

    let node2 = &cluster.nodes[1];
    for _ in 0..POLLS_MAX {
        if node2.vv().get(1) >= 40 {
            break;
        }
        let fetch = FactSource::fetch(&*node2.gossip, 1, &[(1, 40)]);
        tokio::time::timeout(Duration::from_secs(30), fetch)
            .await
            .expect("a fetch returns after a bounded wait");
    }
    assert_eq!(node2.vv().get(1), 40);
    assert_eq!(node2.counter(&key), 80);

    // With the origin unreachable, node 3 gets node 1's facts relayed from node 2's archive.
    cluster.nodes[0].stop_server().await;
    let node3 = &cluster.nodes[2];
    for _ in 0..POLLS_MAX {
        if node3.vv().get(1) >= 40 {
            break;
        }
        let fetch = FactSource::fetch(&*node3.gossip, 1, &[(1, 40)]);
        tokio::time::timeout(Duration::from_secs(30), fetch)
            .await
            .expect("a fetch returns after a bounded wait");
    }
    assert_eq!(node3.vv().get(1), 40);
    assert_eq!(node3.counter(&key), 80);

    // Facts nobody has: the fetch gives up for now and changes nothing.
    let fetch = FactSource::fetch(&*node3.gossip, 1, &[(1, 1_000)]);
    tokio::time::timeout(Duration::from_secs(30), fetch)
        .await
        .expect("a fetch returns after a bounded wait");
    assert_eq!(node3.vv().get(1), 40);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_pulls_past_facts_already_waiting_here() {
    // Node 3 holds a run of node 1's escrow spends, more than one pull brings, waiting for
    // the transfer from node 2 that funded them. Pulls that ask for the waiting run again
    // bring only duplicates and stop before reaching node 2's range: node 3 never
    // converged (Jepsen finding 9, where every origin's next fact waited so).
    const SPENDS: i64 = 25_000;
    // Facts of a power-of-two size fill a pull batch exactly, so a peer's answer holds node
    // 1's waiting facts and nothing of node 2's range after them.
    let fact_bytes = (calm_kernel::fact::FACT_HEADER_BYTES + b"stock:1".len()).next_power_of_two();
    let key_string = format!(
        "stock:{}",
        "x".repeat(fact_bytes - calm_kernel::fact::FACT_HEADER_BYTES - "stock:".len())
    );
    let key = key_string.as_bytes();
    let mut cluster = Cluster::new(fast_options(), 2).await;
    let grant = lock(&cluster.nodes[1].local)
        .replica()
        .prepare_grant(key, 0, SPENDS, HlcTimestamp(1))
        .unwrap();
    for node in &cluster.nodes {
        lock(&node.local)
            .replica_mut()
            .apply_command(&grant)
            .unwrap();
    }
    let to_node1 = lock(&cluster.nodes[1].local)
        .transfer(key, 1, -SPENDS, HlcTimestamp(2))
        .unwrap()
        .expect("node 2 holds the rights it gives");
    to_node1.durable.await.unwrap();
    lock(&cluster.nodes[0].local)
        .deliver(&to_node1.fact)
        .unwrap();
    let mut spends = Vec::new();
    let mut last = None;
    for i in 0..SPENDS {
        let admit = lock(&cluster.nodes[0].local)
            .admit(
                key,
                &Op::BoundedAdd { delta: 1 },
                HlcTimestamp(10 + i as u64),
            )
            .unwrap()
            .expect("node 1 spends the transferred rights");
        spends.extend_from_slice(&admit.fact);
        last = admit.durable;
    }
    last.expect("spends are facts").await.unwrap();
    assert!(
        spends.len() > calm::gossip::PULL_BATCH_BYTES_MAX,
        "the waiting run must fill more than one pull to show anything"
    );
    // Node 2 has them too, so both peers answer a pull with node 1's range first.
    let report = lock(&cluster.nodes[1].local).deliver(&spends).unwrap();
    assert_eq!(report.applied, SPENDS as u64);
    let report = lock(&cluster.nodes[2].local).deliver(&spends).unwrap();
    assert_eq!(report.buffered, SPENDS as u64, "all wait for the transfer");
    cluster.run_gossip();
    let node3 = &cluster.nodes[2];
    for _ in 0..POLLS_MAX {
        if node3.vv().get(1) == SPENDS as u64 && node3.vv().get(2) == 1 {
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    assert_eq!(
        (node3.vv().get(1), node3.vv().get(2)),
        (SPENDS as u64, 1),
        "node 3 pulled the transfer and applied the spends ({} still waiting)",
        lock(&node3.local).replica().pending_facts()
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_is_pruned_only_below_what_every_node_checkpointed() {
    let options = GossipOptions {
        // Pruned by hand below, so each step is observed exactly.
        prune_interval_ms: 3_600_000,
        ..fast_options()
    };
    let mut cluster = Cluster::new(options, 1).await;
    cluster.run_gossip();
    let keys = keys(2);
    for key in &keys {
        cluster.create_counter(key);
    }
    let mut expected = zeroes(&keys);
    add_everywhere(&cluster, &[0, 1, 2], &keys, 30, &mut expected).await;
    cluster.wait_converged(&[0, 1, 2], &expected).await;

    // Nodes 1 and 2 checkpoint; node 3 has not: nothing may go.
    cluster.nodes[0].checkpoint();
    cluster.nodes[1].checkpoint();
    let since = Instant::now();
    cluster.wait_heard_after(0, since).await;
    let floor = cluster.nodes[0].gossip.prune_archive().await.unwrap();
    assert_eq!(
        floor,
        Some(VersionVector::new()),
        "node 3 checkpointed nothing"
    );
    for origin in 1..=3 {
        assert_eq!(
            cluster.nodes[0].archived(origin, 1, 30),
            (1..=30).collect::<Vec<_>>()
        );
    }

    // Node 3 checkpoints too: every node keeps facts 1..=30 of every origin for good.
    cluster.nodes[2].checkpoint();
    let all: VersionVector = [(1, 30), (2, 30), (3, 30)].into_iter().collect();
    // A view in flight may predate a checkpoint: poll until node 1 has learned both.
    let mut floor = None;
    for _ in 0..POLLS_MAX {
        floor = cluster.nodes[0].gossip.prune_archive().await.unwrap();
        if floor.as_ref() == Some(&all) {
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    assert_eq!(floor, Some(all.clone()));
    for origin in 1..=3 {
        assert!(cluster.nodes[0].archived(origin, 1, 30).is_empty());
    }

    // Newer facts stay until a checkpoint of every node covers them.
    let mut more = expected.clone();
    add_everywhere(&cluster, &[1], &keys, 10, &mut more).await;
    cluster.wait_converged(&[0, 1, 2], &more).await;
    cluster.nodes[0].checkpoint();
    cluster.nodes[1].checkpoint();
    let since = Instant::now();
    cluster.wait_heard_after(0, since).await;
    let floor = cluster.nodes[0].gossip.prune_archive().await.unwrap();
    assert_eq!(floor, Some(all));
    assert_eq!(
        cluster.nodes[0].archived(2, 1, 40),
        (31..=40).collect::<Vec<_>>()
    );
    // Pruning never touches applied state.
    cluster.wait_converged(&[0, 1, 2], &more).await;
    cluster.stop().await;
}
