//! Three nodes' groups in one process, talking over real gRPC on 127.0.0.1: election,
//! proposals from any node (forwarded to the leader), read-index reads on followers, leaders
//! spread over nodes, and a stopped node catching up from a snapshot after the leader purged
//! its log. (The multi-process tests in tests/ do the same with real `calm` processes.)

use calm_kernel::rules::RuleSet;
use calm_kernel::{Command, CommandBody, HlcTimestamp, Mode, Value};
use calm_raft::consensus::network::Peers;
use calm_raft::consensus::node::ConsensusOptions;
use calm_raft::consensus::service::GroupHandles;
use calm_raft::consensus::types::BasicNode;
use calm_raft::consensus::{Consensus, GroupMap, Response, SharedLocal, WaitForFacts};
use calm_raft::local::{LocalOptions, LocalState};
use calm_raft::wal::WalOptions;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const GROUPS: u64 = 4;

fn options() -> ConsensusOptions {
    ConsensusOptions {
        data_groups: GROUPS,
        hash_tags: true,
        heartbeat_ms: 50,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
        snapshot_after_entries: 20,
        entries_kept_after_snapshot: 5,
        request_timeout_ms: 5_000,
        commit_notice_hold_us: 1_000,
    }
}

struct Node {
    consensus: Consensus,
    stop_server: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

fn open_local(dir: &Path, id: u64) -> SharedLocal {
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    let options = LocalOptions {
        wal: WalOptions {
            segment_bytes_max: 4 << 20,
            batch_bytes_max: 1 << 20,
            group_bytes_max: 1 << 20,
            preallocate: false,
            ..WalOptions::default()
        },
        ..LocalOptions::default()
    };
    let (local, _) = LocalState::open(dir, id, rules, options).unwrap();
    Arc::new(Mutex::new(local))
}

/// Start node `id`: its peer server at once, its groups `groups_after` later (meanwhile the
/// server answers "still starting", as a `calm serve` does while it recovers).
async fn start(id: u64, dir: &Path, listener: TcpListener, groups_after: Duration) -> Node {
    let local = open_local(dir, id);
    let handles = GroupHandles::new();
    let peers = Peers::new();
    let service = Consensus::peer_service(handles.clone(), peers.clone());
    let (stop_server, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    tokio::time::sleep(groups_after).await;
    let consensus = Consensus::start(
        id,
        local,
        Arc::new(WaitForFacts),
        dir.join("snapshots"),
        &options(),
        handles,
        peers,
    )
    .await
    .unwrap();
    Node {
        consensus,
        stop_server,
        server,
    }
}

async fn stop(node: Node) {
    node.consensus.shutdown().await;
    let _ = node.stop_server.send(());
    node.server.await.unwrap();
}

fn put(key: &str, value: &str, proposer: u64) -> Command {
    Command {
        key: key.as_bytes().to_vec(),
        hlc: HlcTimestamp(1),
        proposer,
        body: CommandBody::RegisterPut {
            value: value.as_bytes().to_vec(),
        },
        frontier: Default::default(),
        absorb: None,
    }
}

fn read(node: &Node, key: &str) -> Option<Vec<u8>> {
    let local = node.consensus.local().lock().unwrap();
    match local.replica().read(key.as_bytes()) {
        Some(Value::Register { value, .. }) => value,
        None => None,
        other => panic!("{key} is not a register: {other:?}"),
    }
}

fn metric<T>(
    node: &Node,
    group: u64,
    f: impl FnOnce(&calm_raft::consensus::types::RaftMetrics<calm_raft::consensus::CalmRaft>) -> T,
) -> T {
    use calm_raft::consensus::types::WatchReceiver;
    f(&node.consensus.raft(group).metrics().borrow_watched())
}

/// Wait (bounded) until every group of every node knows a leader.
async fn await_leaders(nodes: &[&Node]) {
    for _ in 0..200 {
        if nodes.iter().all(|n| {
            GroupMap::new(GROUPS)
                .all()
                .all(|g| n.consensus.leader_of(g).is_some())
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("groups did not elect leaders within 10 s");
}

/// Three nodes with elected leaders: their data directories, peer addresses and nodes.
async fn three_nodes() -> (Vec<tempfile::TempDir>, Vec<SocketAddr>, Vec<Node>) {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (listeners, addrs, members) = listeners().await;
    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        nodes.push(start(i as u64 + 1, dirs[i].path(), listener, Duration::ZERO).await);
    }
    // Every node initializes with the same members, as `calm serve` does.
    for n in &nodes {
        n.consensus.initialize(&members).await.unwrap();
    }
    await_leaders(&nodes.iter().collect::<Vec<_>>()).await;
    (dirs, addrs, nodes)
}

/// Three peer listeners on 127.0.0.1, their addresses, and the members they make.
async fn listeners() -> (Vec<TcpListener>, Vec<SocketAddr>, BTreeMap<u64, BasicNode>) {
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let members = (0..3)
        .map(|i| (i as u64 + 1, BasicNode::new(addrs[i].to_string())))
        .collect();
    (listeners, addrs, members)
}

/// Entries in every data group's log on `node`.
fn data_entries(node: &Node) -> u64 {
    GroupMap::new(GROUPS)
        .all()
        .skip(1)
        .map(|g| metric(node, g, |m| m.last_log_index.unwrap_or(0)))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_share_entries_and_each_gets_its_own_answer() {
    let (_dirs, _addrs, nodes) = three_nodes().await;
    // From every node (so most are forwarded), 300 puts at once: 100 distinct keys, each
    // written three times by different nodes.
    let before = data_entries(&nodes[0]);
    let proposals = (0..300).map(|i| {
        let n = &nodes[i % 3];
        let key = format!("c{}", i % 100);
        async move {
            let answer = n
                .consensus
                .propose(put(&key, &format!("v{i}"), n.consensus.node()))
                .await;
            (key, answer)
        }
    });
    let answers = futures::future::join_all(proposals).await;
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (key, answer) in answers {
        match answer.unwrap().response {
            Response::Done { version } => versions.entry(key).or_default().push(version),
            other => panic!("put on {key} answered {other:?}"),
        }
    }
    // Each put got its own answer: a key's three puts saw versions 1, 2 and 3.
    for (key, mut v) in versions {
        v.sort_unstable();
        assert_eq!(v, [1, 2, 3], "versions answered for {key}");
    }
    // Every node has the same last value of every key.
    for key in (0..100).map(|k| format!("c{k}")) {
        let group = nodes[0].consensus.group_map().group_of(key.as_bytes());
        let mut seen = Vec::new();
        for n in &nodes {
            n.consensus.read_barrier(group).await.unwrap();
            seen.push(read(n, &key).expect("the key was written"));
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{key}: {seen:?}");
    }
    // They shared entries: 300 commands took fewer than 300 entries.
    let entries = data_entries(&nodes[0]) - before;
    assert!(entries < 300, "300 concurrent puts took {entries} entries");

    // A coalesced request must name distinct keys: refused before it is proposed, and the
    // group keeps working.
    let group = nodes[0].consensus.group_map().group_of(b"dup");
    let twice = calm_raft::consensus::Request::Commands(
        vec![put("dup", "a", 1), put("dup", "b", 1)].into(),
    );
    let refused = nodes[0]
        .consensus
        .propose_to(group, twice)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, calm_raft::consensus::ProposeError::Invalid { .. }),
        "{refused:?}"
    );
    let after = nodes[0]
        .consensus
        .propose(put("dup", "c", 1))
        .await
        .unwrap();
    assert_eq!(after.response, Response::Done { version: 1 });
    for n in nodes {
        stop(n).await;
    }
}

/// A leader whose lease lapsed (no quorum answered it within the election timeout) refuses
/// writes with "not the leader" while it stays the leader in the same term, and takes them
/// again once a quorum answers its next heartbeat. Proposals made meanwhile, at it or forwarded
/// to it, must be retried there within their deadline: they once waited for a *different*
/// leader and timed out after 5 s. (The same happens for a moment after every election, and
/// when a node steps down and is re-elected.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_to_a_leader_whose_lease_lapsed_are_retried_there() {
    let (_dirs, _addrs, nodes) = three_nodes().await;
    let map = nodes[0].consensus.group_map();
    let group = map.group_of(b"lease0");
    let keys: Vec<String> = (0..1000)
        .map(|k| format!("lease{k}"))
        .filter(|k| map.group_of(k.as_bytes()) == group)
        .take(6)
        .collect();
    let leader = nodes
        .iter()
        .position(|n| n.consensus.leader_id(group) == Some(n.consensus.node()))
        .expect("the group has a leader on one of the nodes");
    let term = metric(&nodes[leader], group, |m| m.current_term);
    // The leader stops heartbeating and the followers do not campaign: its lease (the 600 ms
    // election timeout) lapses and it stays the leader.
    for (i, n) in nodes.iter().enumerate() {
        if i == leader {
            n.consensus.raft(group).runtime_config().heartbeat(false);
        } else {
            n.consensus.raft(group).runtime_config().elect(false);
        }
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    let proposals = keys.iter().enumerate().map(|(i, key)| {
        let n = &nodes[i % 3];
        async move {
            let answer = n.consensus.propose(put(key, "v", n.consensus.node())).await;
            (key, answer)
        }
    });
    let heal = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        nodes[leader]
            .consensus
            .raft(group)
            .runtime_config()
            .heartbeat(true);
    };
    let (answers, ()) = tokio::join!(futures::future::join_all(proposals), heal);
    for (key, answer) in answers {
        match answer {
            Ok(p) => assert_eq!(p.response, Response::Done { version: 1 }, "put on {key}"),
            Err(e) => panic!("put on {key} failed: {e:?}"),
        }
    }
    assert_eq!(
        metric(&nodes[leader], group, |m| (
            m.current_term,
            m.current_leader
        )),
        (term, Some(nodes[leader].consensus.node())),
        "the same leadership took the puts"
    );
    for n in &nodes {
        n.consensus.raft(group).runtime_config().elect(true);
    }
    for n in nodes {
        stop(n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_forward_read_and_catch_up_from_a_snapshot() {
    let (dirs, addrs, mut nodes) = three_nodes().await;

    // Leaders spread: after balancing, each node leads some group.
    for _ in 0..50 {
        for n in &nodes {
            n.consensus.balance_leaders().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if nodes.iter().all(|n| !n.consensus.led_groups().is_empty()) {
            break;
        }
    }
    for n in &nodes {
        assert!(
            !n.consensus.led_groups().is_empty(),
            "node {} leads no group after balancing",
            n.consensus.node()
        );
    }

    // Proposals from every node, on keys of every group: each is applied everywhere, and a
    // read-index read on any node sees it.
    for i in 0..30 {
        let proposer = &nodes[i % 3];
        let key = format!("k{i}");
        let resp = proposer
            .consensus
            .propose(put(&key, &format!("v{i}"), proposer.consensus.node()))
            .await
            .unwrap();
        assert_eq!(resp.response, Response::Done { version: 1 });
        let reader = &nodes[(i + 1) % 3];
        let group = reader.consensus.group_map().group_of(key.as_bytes());
        reader.consensus.read_barrier(group).await.unwrap();
        assert_eq!(read(reader, &key), Some(format!("v{i}").into_bytes()));
    }

    // Stop node 3; write until both others purged every data group's log past node 3's end.
    let third = nodes.pop().unwrap();
    let third_last: Vec<u64> = GroupMap::new(GROUPS)
        .all()
        .map(|g| metric(&third, g, |m| m.last_log_index.unwrap_or(0)))
        .collect();
    stop(third).await;
    let purged_past_third = |n: &Node| {
        GroupMap::new(GROUPS)
            .all()
            .skip(1)
            .all(|g| metric(n, g, |m| m.purged.map_or(0, |p| p.index)) > third_last[g as usize])
    };
    let mut written = 0;
    while !nodes.iter().all(purged_past_third) {
        assert!(
            written < 2_000,
            "the running nodes did not purge their logs"
        );
        let key = format!("k{}", written % 40);
        let n = &nodes[written % 2];
        n.consensus
            .propose(put(&key, &format!("late{written}"), n.consensus.node()))
            .await
            .unwrap();
        written += 1;
    }

    // Node 3 restarts on the same address and data and must catch up: its log ends before
    // the leaders' purge points, so only a snapshot install can bring it there.
    let listener = TcpListener::bind(addrs[2]).await.unwrap();
    let third = start(3, dirs[2].path(), listener, Duration::ZERO).await;
    nodes.push(third);
    for i in written.saturating_sub(40)..written {
        let key = format!("k{}", i % 40);
        let group = nodes[2].consensus.group_map().group_of(key.as_bytes());
        nodes[2].consensus.read_barrier(group).await.unwrap();
        assert_eq!(
            read(&nodes[2], &key),
            Some(format!("late{i}").into_bytes()),
            "node 3 after catching up"
        );
    }
    for n in nodes {
        stop(n).await;
    }
}

/// A node that starts late learns its group's leader from a heartbeat while the leader's
/// replication to it is still backing off (its first appends met "still starting"), so for a
/// while it knows the leader but not the membership that holds the leader's address. A
/// proposal made then waits for the address rather than forwarding to "" (CI saw `calm
/// bench` fail so right after start-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_at_a_node_that_has_just_learned_its_leader_is_forwarded() {
    use calm_raft::consensus::types::WatchReceiver;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (listeners, _, members) = listeners().await;
    let mut listeners = listeners.into_iter();
    let (l1, l2, l3) = (
        listeners.next().unwrap(),
        listeners.next().unwrap(),
        listeners.next().unwrap(),
    );
    // Node 2's groups start a second after its server; only node 1 initializes, so it
    // leads every group (node 3 votes) and node 2 learns everything from it.
    let late = tokio::spawn({
        let dir = dirs[1].path().to_path_buf();
        async move { start(2, &dir, l2, Duration::from_secs(1)).await }
    });
    let first = start(1, dirs[0].path(), l1, Duration::ZERO).await;
    let third = start(3, dirs[2].path(), l3, Duration::ZERO).await;
    first.consensus.initialize(&members).await.unwrap();
    let second = late.await.unwrap();

    let key = "just-started";
    let group = second.consensus.group_map().group_of(key.as_bytes());
    let mut metrics = second.consensus.raft(group).metrics();
    tokio::time::timeout(Duration::from_secs(10), async {
        while metrics.borrow_watched().current_leader.is_none() {
            metrics.changed().await.unwrap();
        }
    })
    .await
    .expect("node 2 learned no leader of the key's group within 10 s");

    let resp = second.consensus.propose(put(key, "v", 2)).await.unwrap();
    assert_eq!(resp.response, Response::Done { version: 1 });
    first.consensus.read_barrier(group).await.unwrap();
    assert_eq!(read(&first, key), Some(b"v".to_vec()));
    for n in [first, second, third] {
        stop(n).await;
    }
}
