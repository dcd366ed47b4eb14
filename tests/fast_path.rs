//! The fast path with real processes: counter increments and set adds admitted on every
//! node converge to the exact sum and the union on every node; a node cut off by iptables
//! keeps admitting them while partitioned and every node converges after the heal.

mod support;

use calm::api::pb::{self, Consistency, Path};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use support::{
    Cluster, Partition, can_connect, counter, elements, get, op, write, write_with_token,
};

/// How long convergence may take after the last write (or the heal).
const CONVERGE: Duration = Duration::from_secs(60);

/// What one client got acknowledged.
#[derive(Default)]
struct Acked {
    sum: i64,
    elements: BTreeSet<String>,
    /// Ops that failed (their outcome unknown to the client).
    failed: Vec<String>,
}

/// Client `client` on node `at`: `adds` counter increments on `ctr` and `sadds` set adds on
/// `set`, interleaved, plus one Batch of `batch` increments. Every acknowledgement must say
/// fast path.
async fn client(
    c: &Cluster,
    at: usize,
    client: usize,
    (ctr, adds, batch): (&str, i64, i64),
    (set, sadds): (&str, usize),
) -> Acked {
    let mut kv = c.kv(at).await;
    let mut acked = Acked::default();
    for i in 0..adds {
        let delta = (client as i64 * 7 + i) % 5 + 1;
        match write(&mut kv, ctr, op::add(delta)).await {
            Ok(r) => {
                assert_eq!(r.path, Path::Fast as i32, "add on node {at}: {r:?}");
                acked.sum += delta;
            }
            Err(s) => acked
                .failed
                .push(format!("add {delta} on node {at}: {s:?}")),
        }
        if (i as usize) < sadds {
            let element = format!("n{at}-c{client}-{i}");
            match write(&mut kv, set, op::sadd(&element)).await {
                Ok(r) => {
                    assert_eq!(r.path, Path::Fast as i32, "set add on node {at}: {r:?}");
                    acked.elements.insert(element);
                }
                Err(s) => acked
                    .failed
                    .push(format!("sadd {element} on node {at}: {s:?}")),
            }
        }
    }
    if batch > 0 {
        let request = pb::BatchRequest {
            ops: (0..batch)
                .map(|_| pb::WriteRequest {
                    key: ctr.as_bytes().to_vec(),
                    op: Some(op::add(1)),
                    token: Vec::new(),
                    lease: 0,
                })
                .collect(),
        };
        match kv.batch(request).await {
            Ok(r) => {
                for (i, r) in r.into_inner().results.iter().enumerate() {
                    match &r.result {
                        Some(pb::batch_result::Result::Ok(w)) => {
                            assert_eq!(w.path, Path::Fast as i32, "batch op on node {at}");
                            acked.sum += 1;
                        }
                        other => acked
                            .failed
                            .push(format!("batch op {i} on node {at}: {other:?}")),
                    }
                }
            }
            Err(s) => acked.failed.push(format!("batch on node {at}: {s:?}")),
        }
    }
    acked
}

/// Wait (bounded) until node `at` reads `sum` for `ctr` and `union` for `set`, serializably;
/// every counter read on the way must lie in `[low, sum]` (all deltas are positive). Then,
/// unless `at` is cut off from a quorum, a linearizable read must agree.
async fn await_converged(
    c: &Cluster,
    at: usize,
    partitioned: bool,
    (ctr, low, sum): (&str, i64, i64),
    (set, union): (&str, &BTreeSet<String>),
) {
    let mut kv = c.kv(at).await;
    let started = Instant::now();
    let want: Vec<String> = union.iter().cloned().collect();
    for _ in 0..5_000 {
        // Not there yet (no fact has arrived): zero, which `low` may allow.
        let n = counter(&get(&mut kv, ctr, Consistency::Serializable).await.unwrap());
        let n = n.unwrap_or(0);
        assert!(
            (low..=sum).contains(&n),
            "node {at} reads {ctr} = {n}, outside [{low}, {sum}]: a phantom or a lost add"
        );
        let e = elements(&get(&mut kv, set, Consistency::Serializable).await.unwrap());
        let e = e.unwrap_or_default();
        let phantom: Vec<&String> = e.iter().filter(|x| !union.contains(*x)).collect();
        assert!(
            phantom.is_empty(),
            "node {at}: phantom elements {phantom:?}"
        );
        if n == sum && e == want {
            if partitioned {
                return;
            }
            // Linearizable reads agree once converged.
            let l = get(&mut kv, ctr, Consistency::Linearizable).await;
            assert_eq!(counter(&l.unwrap()), Some(sum), "node {at}");
            return;
        }
        assert!(
            started.elapsed() < CONVERGE,
            "node {at} did not converge within {CONVERGE:?}: {ctr} = {n} of {sum}, {} of {} elements",
            e.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node {at} did not converge");
}

/// Create `ctr` (= 1) and `set` (= {"init"}) through node 1 and wait until every node has them.
async fn create(c: &Cluster, ctr: &str, set: &str) -> BTreeSet<String> {
    let mut kv = c.kv(1).await;
    write(&mut kv, ctr, op::add(1)).await.unwrap();
    write(&mut kv, set, op::sadd("init")).await.unwrap();
    let init = BTreeSet::from(["init".to_string()]);
    for at in 1..=c.nodes.len() {
        await_converged(c, at, false, (ctr, 0, 1), (set, &init)).await;
    }
    init
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_and_set_adds_on_every_node_converge_to_the_exact_sum_and_union() {
    let c = Cluster::start(3, &[]).await;
    let (ctr, set) = ("fp:hits", "fp:members");
    let mut union = create(&c, ctr, set).await;
    // Two clients per node at once.
    let clients = (0..6).map(|j| {
        let c = &c;
        async move { client(c, 1 + j % 3, j, (ctr, 60, 20), (set, 20)).await }
    });
    let mut sum = 1;
    for acked in futures::future::join_all(clients).await {
        assert!(acked.failed.is_empty(), "{:?}", acked.failed);
        sum += acked.sum;
        union.extend(acked.elements);
    }
    assert_eq!(union.len(), 1 + 6 * 20);
    for at in 1..=3 {
        await_converged(&c, at, false, (ctr, 1, sum), (set, &union)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_keeps_accepting_fast_path_writes_and_converges_after_heal() {
    if let Some(why) = support::partition_unsupported() {
        eprintln!(
            "skipping a_partitioned_node_keeps_accepting_fast_path_writes_and_converges_after_heal: {why}"
        );
        return;
    }
    let c = Cluster::start(3, &[]).await;
    let (ctr, set) = ("pp:hits", "pp:members");
    let init = create(&c, ctr, set).await;

    for (a, b) in [(1, 2), (1, 3), (2, 3)] {
        assert!(can_connect(&c, a, b).await && can_connect(&c, b, a).await);
    }
    let partition = Partition::isolate(&c, &[3]);
    assert!(!can_connect(&c, 3, 1).await && !can_connect(&c, 1, 3).await);
    assert!(!can_connect(&c, 3, 2).await && !can_connect(&c, 2, 3).await);
    assert!(can_connect(&c, 1, 2).await && can_connect(&c, 2, 1).await);

    // Both sides write at once: two clients on node 3, one on each majority node.
    let clients = [(3, 0), (3, 1), (1, 2), (2, 3)].map(|(at, j)| {
        let c = &c;
        async move { (at, client(c, at, j, (ctr, 50, 25), (set, 25)).await) }
    });
    let (mut minority, mut majority) = ((0, init.clone()), (0, init.clone()));
    for (at, acked) in futures::future::join_all(clients).await {
        // The isolated node keeps accepting: nothing on the fast path needs a peer.
        assert!(
            acked.failed.is_empty(),
            "node {at} refused fast-path writes while partitioned: {:?}",
            acked.failed
        );
        let side = if at == 3 {
            &mut minority
        } else {
            &mut majority
        };
        side.0 += acked.sum;
        side.1.extend(acked.elements);
    }
    // Each side sees exactly its own writes: node 3 at once, the majority after gossip.
    await_converged(&c, 3, true, (ctr, 1, 1 + minority.0), (set, &minority.1)).await;
    for at in [1, 2] {
        await_converged(&c, at, false, (ctr, 1, 1 + majority.0), (set, &majority.1)).await;
    }
    let mut kv3 = c.kv(3).await;
    let n3 = counter(&get(&mut kv3, ctr, Consistency::Serializable).await.unwrap());
    assert_eq!(n3, Some(1 + minority.0), "node 3 saw majority writes");

    drop(partition);
    let sum = 1 + minority.0 + majority.0;
    let union: BTreeSet<String> = minority.1.union(&majority.1).cloned().collect();
    assert_eq!(union.len(), 1 + 4 * 25);
    for at in 1..=3 {
        await_converged(&c, at, false, (ctr, 1, sum), (set, &union)).await;
    }
    // And the partition left Raft intact: a consensus write works from node 3 again.
    let r = support::write_retrying(&c, 3, ctr, op::set_value(0)).await;
    assert!(r.is_ok(), "{r:?}");
}

/// Observed-remove across nodes: a set add acknowledged at node 1 has not reached node 2 (cut
/// off), and a remove sent to node 2 with the add's session token waits until node 2 has
/// seen the add, then removes it. Without the token node 2 would remove only what it had
/// seen, and the add, arriving after the heal, would survive the remove everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remove_with_the_adds_token_removes_an_element_its_node_had_not_seen() {
    if let Some(why) = support::partition_unsupported() {
        eprintln!(
            "skipping a_remove_with_the_adds_token_removes_an_element_its_node_had_not_seen: {why}"
        );
        return;
    }
    // The remove waits for the token through the partition: give it time.
    let c = Cluster::start(3, &[("CALM_RAFT__REQUEST_TIMEOUT_MS", "15000")]).await;
    let set = "or:members";
    let mut kv1 = c.kv(1).await;
    write(&mut kv1, set, op::sadd("init")).await.unwrap();
    for at in 1..=3 {
        await_elements(&c, at, set, &["init"]).await;
    }

    let partition = Partition::isolate(&c, &[2]);
    let added = write(&mut kv1, set, op::sadd("x")).await.unwrap();
    assert_eq!(added.path, Path::Fast as i32);
    let mut kv2 = c.kv(2).await;
    let remove =
        tokio::spawn(
            async move { write_with_token(&mut kv2, set, op::srem("x"), &added.token).await },
        );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !remove.is_finished(),
        "node 2 took the remove before it could have seen the add: {:?}",
        remove.await
    );
    drop(partition);
    let removed = remove
        .await
        .unwrap()
        .expect("the remove, once node 2 caught up");
    assert!(removed.succeeded);
    assert_eq!(removed.path, Path::Consensus as i32);
    for at in 1..=3 {
        await_elements(&c, at, set, &["init"]).await;
    }
    // Nothing left in flight brings it back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for at in 1..=3 {
        await_elements(&c, at, set, &["init"]).await;
    }
}

/// Wait (bounded) until node `at` reads exactly `want` for `set`, linearizably.
async fn await_elements(c: &Cluster, at: usize, set: &str, want: &[&str]) {
    let mut kv = c.kv(at).await;
    let want: Vec<String> = want.iter().map(|e| e.to_string()).collect();
    let started = Instant::now();
    loop {
        let got = match get(&mut kv, set, Consistency::Linearizable).await {
            Ok(v) => elements(&v).unwrap_or_default(),
            Err(s) => panic!("read {set} at node {at}: {s:?}"),
        };
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < CONVERGE,
            "node {at} reads {set} = {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
