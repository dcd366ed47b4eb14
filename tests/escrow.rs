//! Bounded counters (escrow, DESIGN.md section 5) with real processes and a real partition:
//! while node 3 is cut off by iptables and clients decrement concurrently on both sides, no
//! node ever shows a value outside the bounds; node 3 spends the quota it holds and then
//! fails (it cannot reach the pool), the majority spends its quotas and the pool and then
//! gets RESOURCE_EXHAUSTED; nothing is overdrawn; after the heal every node agrees and the
//! value is the start plus the acknowledged deltas plus some subset of the indeterminate ones.

mod support;

use calm::api::pb::{Consistency, Path};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::{Cluster, Partition, bounded, get, op, write};
use tonic::Code;

/// The embedded rules' bounds for `stock:*`.
const MIN: i64 = 0;
const MAX: i64 = 1_000_000;
const START: i64 = 600;

/// What a group of decrements did.
#[derive(Debug, Default)]
struct Outcomes {
    /// Sum of acknowledged deltas.
    acked: i64,
    /// Acknowledged on this node's own quota (path ESCROW).
    escrow: usize,
    /// Deltas whose outcome is unknown (UNAVAILABLE, DEADLINE_EXCEEDED).
    indeterminate: Vec<i64>,
    /// Definitely refused: nothing changed.
    exhausted: usize,
    /// Whether the client stopped on a refusal (rather than running out of attempts).
    stopped_on_error: bool,
}

impl Outcomes {
    fn merge(&mut self, o: Outcomes) {
        self.acked += o.acked;
        self.escrow += o.escrow;
        self.indeterminate.extend(o.indeterminate);
        self.exhausted += o.exhausted;
    }
}

/// Decrement `key` by `delta` through node `at` until `refusals_max` refusals (definite or
/// not) or `attempts` tries. Unknown outcomes are kept; other errors fail the test.
async fn decrement(
    c: &Cluster,
    at: usize,
    key: &str,
    delta: i64,
    attempts: usize,
    refusals_max: usize,
) -> Outcomes {
    let mut kv = c.kv(at).await;
    let mut o = Outcomes::default();
    let mut refusals = 0;
    for _ in 0..attempts {
        match write(&mut kv, key, op::add(-delta)).await {
            Ok(r) => {
                assert!(r.succeeded);
                o.acked -= delta;
                if r.path == Path::Escrow as i32 {
                    o.escrow += 1;
                }
                continue;
            }
            Err(s) if s.code() == Code::ResourceExhausted => o.exhausted += 1,
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                o.indeterminate.push(-delta);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("decrement by {delta} at node {at}: {s:?}"),
        }
        refusals += 1;
        if refusals >= refusals_max {
            o.stopped_on_error = true;
            break;
        }
    }
    o
}

/// Every node's serializable view, until `stop`: any value outside the bounds is recorded.
async fn watch_bounds(c: &Cluster, key: &str, stop: Arc<AtomicBool>) -> (usize, Vec<String>) {
    let mut kvs = Vec::new();
    for at in 1..=c.nodes.len() {
        kvs.push(c.kv(at).await);
    }
    let (mut reads, mut violations) = (0, Vec::new());
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
        for (i, kv) in kvs.iter_mut().enumerate() {
            if let Ok(v) = get(kv, key, Consistency::Serializable).await {
                reads += 1;
                match bounded(&v) {
                    Some((value, min, max)) if (MIN, MAX) == (min, max) => {
                        if !(min..=max).contains(&value) {
                            violations.push(format!("node {}: {value}", i + 1));
                        }
                    }
                    other => violations.push(format!("node {}: read {other:?}", i + 1)),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (reads, violations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_counter_never_leaves_its_bounds_while_partitioned() {
    if let Some(why) = support::partition_unsupported() {
        eprintln!("skipping a_bounded_counter_never_leaves_its_bounds_while_partitioned: {why}");
        return;
    }
    let c = Cluster::start(3, &[]).await;
    support::await_leaders_balanced(&c).await;
    // A key whose group the majority side leads: its pool stays reachable there.
    let key = c
        .key_led_by(1, "stock:p", 100, "a stock key led by node 1")
        .await;
    let key = key.as_str();
    let mut kv1 = c.kv(1).await;
    write(&mut kv1, key, op::set_value(START)).await.unwrap();

    // Every node takes quota from the pool (a refill follows its bounded ops): decrement by
    // one on each until one is paid from the node's own quota.
    let mut total = Outcomes::default();
    for at in 1..=3 {
        let mut kv = c.kv(at).await;
        let mut on_quota = false;
        for _ in 0..100 {
            match write(&mut kv, key, op::add(-1)).await {
                Ok(r) => {
                    total.acked -= 1;
                    if r.path == Path::Escrow as i32 {
                        on_quota = true;
                        break;
                    }
                }
                Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                    total.indeterminate.push(-1)
                }
                Err(s) => panic!("warm-up decrement at node {at}: {s:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(on_quota, "node {at} never got escrow quota");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_bounds(&c, key, stop.clone());
    let scenario = async {
        let partition = Partition::isolate(&c, &[3]);
        assert!(!support::can_connect(&c, 3, 1).await && !support::can_connect(&c, 1, 3).await);
        // Concurrent decrements on both sides: two clients on node 3 (by 3), two on each
        // majority node (by 7), far more than the 600 there are.
        let minority = (0..2).map(|_| decrement(&c, 3, key, 3, 400, 1));
        let majority = (0..4).map(|j| decrement(&c, 1 + j % 2, key, 7, 400, 4));
        let (minority, majority) = futures::future::join(
            futures::future::join_all(minority),
            futures::future::join_all(majority),
        )
        .await;
        let mut min_side = Outcomes::default();
        for o in minority {
            assert!(o.stopped_on_error, "node 3 spent 1200 from a quota: {o:?}");
            min_side.merge(o);
        }
        let mut maj_side = Outcomes::default();
        for o in majority {
            maj_side.merge(o);
        }
        // Node 3 spent what it held, locally, and nothing beyond.
        assert!(min_side.escrow > 0, "node 3 spent nothing: {min_side:?}");
        assert_eq!(
            min_side.escrow as i64 * -3,
            min_side.acked,
            "node 3 acknowledged a decrement it could not pay from its quota: {min_side:?}"
        );
        assert!(
            maj_side.exhausted > 0,
            "the majority never ran out: {maj_side:?}"
        );
        // Acknowledged decrements alone never overdraw.
        let acked = START + total.acked + min_side.acked + maj_side.acked;
        assert!(
            acked >= MIN,
            "acknowledged decrements overdrew: {acked} (minority {min_side:?}, majority {maj_side:?})"
        );
        eprintln!("while partitioned: minority {min_side:?}; majority {maj_side:?}");
        drop(partition);
        total.merge(min_side);
        total.merge(maj_side);

        // After the heal, every node agrees on a value the outcomes explain.
        let start = START + total.acked;
        let possible = support::reachable_sums(start, &total.indeterminate);
        let started = Instant::now();
        loop {
            let mut values = Vec::new();
            for at in 1..=3 {
                let mut kv = c.kv(at).await;
                let v = get(&mut kv, key, Consistency::Serializable).await.unwrap();
                values.push(bounded(&v).map(|b| b.0));
            }
            if let Some(v) = values[0]
                && values.iter().all(|x| *x == values[0])
                && possible.contains(&v)
            {
                for at in 1..=3 {
                    let l = support::await_value(
                        &c,
                        at,
                        key,
                        Consistency::Linearizable,
                        Duration::from_secs(30),
                        |v| bounded(v).map(|b| b.0),
                        |_| true,
                    )
                    .await;
                    assert_eq!(l, Some(v), "node {at}, linearizably");
                }
                assert!(v >= MIN);
                eprintln!(
                    "after the heal: {v} on every node; acknowledged {start}, indeterminate {:?}",
                    total.indeterminate
                );
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the nodes did not agree on a value the outcomes explain: {values:?}; \
                 acknowledged {start}, indeterminate {:?}",
                total.indeterminate
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
    };
    let ((reads, violations), ()) = futures::future::join(watcher, scenario).await;
    assert!(reads > 0);
    assert!(
        violations.is_empty(),
        "values outside [{MIN}, {MAX}] were read: {violations:?}"
    );
}

/// Rights held by other nodes are not stranded: once the pool is empty, a node that runs
/// out asks its peers, who transfer what they hold (DESIGN.md section 5). Node 1 alone spends
/// the counter down to exactly its minimum although nodes 2 and 3 held quota, and the next
/// spend is RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_out_of_rights_gets_them_from_its_peers() {
    let c = Cluster::start(3, &[]).await;
    support::await_leaders_balanced(&c).await;
    let key = "stock:peers";
    let mut kv1 = c.kv(1).await;
    write(&mut kv1, key, op::set_value(START)).await.unwrap();
    // Nodes 2 and 3 take quota from the pool: decrement by one until a spend is paid from
    // the node's own quota.
    let mut value = START;
    for at in 2..=3 {
        let mut kv = c.kv(at).await;
        let mut on_quota = false;
        for _ in 0..100 {
            let r = write(&mut kv, key, op::add(-1)).await.unwrap();
            value -= 1;
            if r.path == Path::Escrow as i32 {
                on_quota = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(on_quota, "node {at} never got escrow quota");
    }
    // Node 1 spends everything: by 10, then by 1. A refusal while rights remain somewhere
    // can only be passing (a peer's own facts waiting on a Raft command): a few are allowed.
    let mut refusals = 0;
    for delta in [10, 1] {
        for _ in 0..(2 * START) {
            if value < delta {
                break;
            }
            match write(&mut kv1, key, op::add(-delta)).await {
                Ok(r) => {
                    assert!(r.succeeded);
                    value -= delta;
                }
                Err(s) if s.code() == Code::ResourceExhausted => {
                    refusals += 1;
                    assert!(
                        refusals <= 20,
                        "node 1 cannot spend {delta} of the {value} left: {s:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => panic!("decrement by {delta} at node 1 with {value} left: {s:?}"),
            }
        }
    }
    assert_eq!(value, MIN, "node 1 did not spend everything");
    let s = write(&mut kv1, key, op::add(-1)).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    for at in 1..=3 {
        let v = support::await_value(
            &c,
            at,
            key,
            Consistency::Linearizable,
            Duration::from_secs(30),
            |v| bounded(v).map(|b| b.0),
            |v| *v == Some(MIN),
        )
        .await;
        assert_eq!(v, Some(MIN), "node {at}");
    }
}

/// A spend the cluster's rights cover succeeds, however the rights are spread: with value 2
/// in bounds [0, 10] on three nodes, a refill leaves one right with each of two nodes and
/// none in the pool, and `add -2` was refused ("only 1 can be granted now") for as long as
/// anyone tried, while two `add -1` succeeded. `explain` shows the key's own bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_the_cluster_covers_succeeds_however_its_rights_are_spread() {
    let c = Cluster::start(3, &[]).await;
    support::await_leaders_balanced(&c).await;
    let key = "stock:42";
    let mut kv1 = c.kv(1).await;
    write(&mut kv1, key, op::set_bounds(0, 10)).await.unwrap();
    write(&mut kv1, key, op::set_value(2)).await.unwrap();
    // Node 1's refill takes one right of each direction; one of each stays in the pool.
    // Two spends of 1 at node 1 succeed, on its quota once the refill is in.
    let mut escrow = false;
    for _ in 0..50 {
        write(&mut kv1, key, op::add(1)).await.unwrap();
        let r = write(&mut kv1, key, op::add(-1)).await.unwrap();
        if r.path == Path::Escrow as i32 {
            escrow = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(escrow, "node 1 never got escrow quota");

    let explained = c
        .admin(1)
        .await
        .explain(calm::api::pb::ExplainRequest { key: key.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (explained.min, explained.max),
        (Some(0), Some(10)),
        "explain shows the rule's bounds, not the key's: {explained:?}"
    );
    assert_eq!(
        (explained.rule_min, explained.rule_max),
        (Some(MIN), Some(MAX))
    );

    for at in 1..=3 {
        let mut kv = c.kv(at).await;
        let r = write(&mut kv, key, op::add(-2)).await;
        assert!(
            r.as_ref().is_ok_and(|r| r.succeeded),
            "node {at}: a spend of 2 with 2 left was refused: {r:?}"
        );
        write(&mut kv, key, op::add(2)).await.unwrap();
    }
    // Exactly the rights there are, no more.
    write(&mut kv1, key, op::add(-2)).await.unwrap();
    let s = write(&mut kv1, key, op::add(-1)).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
}
