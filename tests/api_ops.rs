//! Every op type of the public API end to end on a real 3-node cluster, driven through gRPC
//! from different nodes, each result read back on every node at every consistency level:
//! registers (put, delete, CAS by version, by value, absent), counters (add, set), bounded
//! counters (add, set, set_bounds), max (raise, set_max), sets (add, remove), a Batch of
//! mixed ops with per-op errors in request order, and causal reads with a session token
//! handed from one node to another.

mod support;

use calm::api::pb::{self, Consistency, Path, value::Kind};
use std::time::Duration;
use support::{Cluster, get_with_token, op, write};
use tonic::Code;

/// Reads every node serves for a value they have: the levels of the API.
const LEVELS: [Consistency; 4] = [
    Consistency::Unspecified,
    Consistency::Linearizable,
    Consistency::Serializable,
    Consistency::Causal,
];

/// How long gossip may take to bring a fast-path fact to every node here.
const CONVERGE: Duration = Duration::from_secs(20);

/// A read value without the register's HLC (checked to be set, then zeroed to compare).
fn comparable(r: &pb::GetResponse) -> Option<Kind> {
    if !r.found {
        assert!(r.value.is_none(), "not found, yet a value: {r:?}");
        return None;
    }
    let kind = r.value.clone().and_then(|v| v.kind);
    match kind {
        Some(Kind::Register(mut reg)) => {
            assert_ne!(reg.hlc, 0, "a register read without its HLC: {reg:?}");
            reg.hlc = 0;
            Some(Kind::Register(reg))
        }
        None => panic!("found, yet no value: {r:?}"),
        other => other,
    }
}

fn reg(value: &str, version: u64) -> Option<Kind> {
    Some(Kind::Register(pb::value::Register {
        value: value.as_bytes().to_vec(),
        version,
        hlc: 0,
    }))
}

fn bounded(value: i64, min: i64, max: i64) -> Option<Kind> {
    Some(Kind::Bounded(pb::value::Bounded { value, min, max }))
}

fn max(value: i64) -> Option<Kind> {
    Some(Kind::Max(pb::value::MaxValue { value: Some(value) }))
}

fn set(elements: &[&str]) -> Option<Kind> {
    Some(Kind::Set(pb::value::SetValue {
        elements: elements.iter().map(|e| e.as_bytes().to_vec()).collect(),
    }))
}

/// What a write did: the node it went through and its response.
struct Written {
    via: usize,
    response: pb::WriteResponse,
    /// Only the Raft path wrote it (every node's linearizable read sees it at once).
    ordered: bool,
}

/// `op` on `key` through node `via`; it must succeed (as a response: a CAS may lose).
async fn step(c: &Cluster, via: usize, key: &str, op: pb::Op) -> Written {
    let mut kv = c.kv(via).await;
    let response = write(&mut kv, key, op.clone())
        .await
        .unwrap_or_else(|s| panic!("{op:?} on {key} via node {via}: {s:?}"));
    let ordered = response.path == Path::Consensus as i32;
    Written {
        via,
        response,
        ordered,
    }
}

/// `op` on `key` through node `via` must fail with `code`.
async fn refused(c: &Cluster, via: usize, key: &str, op: pb::Op, code: Code) {
    let mut kv = c.kv(via).await;
    match write(&mut kv, key, op.clone()).await {
        Err(s) => assert_eq!(s.code(), code, "{op:?} on {key} via node {via}: {s:?}"),
        Ok(r) => panic!("{op:?} on {key} via node {via} succeeded ({r:?}); expected {code:?}"),
    }
}

/// After `w`, `key` reads `expected` on every node at every level. A CAUSAL read with the
/// write's token, a linearizable read of a Raft-ordered write, and any read at the node that
/// took the write must see it at once; the others (fast-path facts still travelling by
/// gossip, a follower's serializable replica) within a bounded wait.
async fn check_everywhere(c: &Cluster, key: &str, w: &Written, expected: Option<Kind>) {
    for at in 1..=c.nodes.len() {
        let mut kv = c.kv(at).await;
        for level in LEVELS {
            let token = if level == Consistency::Causal {
                w.response.token.clone()
            } else {
                Vec::new()
            };
            let at_once = level == Consistency::Causal
                || at == w.via
                || (w.ordered && level != Consistency::Serializable);
            let started = std::time::Instant::now();
            let mut tries = 0;
            loop {
                tries += 1;
                let r = get_with_token(&mut kv, key.as_bytes(), level, &token)
                    .await
                    .unwrap_or_else(|s| panic!("get {key} at node {at} ({level:?}): {s:?}"));
                let got = comparable(&r);
                if got == expected {
                    break;
                }
                assert!(
                    !at_once,
                    "{key} at node {at} ({level:?}, written via node {}) reads {got:?}, expected {expected:?} at once",
                    w.via
                );
                assert!(
                    started.elapsed() < CONVERGE && tries < 2_000,
                    "{key} at node {at} ({level:?}) still reads {got:?} after {CONVERGE:?}, expected {expected:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One Batch call of `(key, op, token)` through node `via`; the call itself must succeed.
async fn batch<'a>(
    c: &Cluster,
    via: usize,
    ops: impl Iterator<Item = (&'a str, &'a pb::Op, &'a [u8])>,
) -> Vec<pb::BatchResult> {
    let request = pb::BatchRequest {
        ops: ops
            .map(|(key, op, token)| pb::WriteRequest {
                key: key.as_bytes().to_vec(),
                op: Some(op.clone()),
                token: token.to_vec(),
                lease: 0,
            })
            .collect(),
    };
    c.kv(via)
        .await
        .batch(request)
        .await
        .expect("the batch call succeeds")
        .into_inner()
        .results
}

fn path(w: &Written) -> Path {
    Path::try_from(w.response.path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_type_end_to_end_from_every_node_at_every_consistency_level() {
    let c = Cluster::start(3, &[]).await;
    support::await_leaders_balanced(&c).await;

    // --- Registers: put, CAS by version / by value / absent, delete (all through Raft).
    let k = "reg";
    let w = step(&c, 1, k, op::put("v1")).await;
    assert_eq!(path(&w), Path::Consensus);
    assert!(w.response.succeeded);
    assert_eq!(w.response.version, 1);
    assert!(!w.response.token.is_empty());
    check_everywhere(&c, k, &w, reg("v1", 1)).await;

    let w = step(&c, 2, k, op::put("v2")).await;
    assert_eq!((w.response.succeeded, w.response.version), (true, 2));
    check_everywhere(&c, k, &w, reg("v2", 2)).await;

    let w = step(&c, 3, k, op::cas_version(2, "v3")).await;
    assert_eq!((w.response.succeeded, w.response.version), (true, 3));
    check_everywhere(&c, k, &w, reg("v3", 3)).await;

    // A CAS that loses is a normal response naming the current version; nothing changes.
    let w = step(&c, 1, k, op::cas_version(2, "lost")).await;
    assert_eq!((w.response.succeeded, w.response.version), (false, 3));
    check_everywhere(&c, k, &w, reg("v3", 3)).await;

    let w = step(&c, 2, k, op::cas_value("v3", "v4")).await;
    assert_eq!((w.response.succeeded, w.response.version), (true, 4));
    check_everywhere(&c, k, &w, reg("v4", 4)).await;

    let w = step(&c, 3, k, op::cas_value("v3", "lost")).await;
    assert_eq!((w.response.succeeded, w.response.version), (false, 4));
    let w = step(&c, 1, k, op::cas_absent("lost")).await;
    assert_eq!((w.response.succeeded, w.response.version), (false, 4));
    check_everywhere(&c, k, &w, reg("v4", 4)).await;

    let w = step(&c, 2, k, op::delete()).await;
    assert!(w.response.succeeded);
    assert_eq!(path(&w), Path::Consensus);
    check_everywhere(&c, k, &w, None).await;
    let deleted_at = w.response.version;
    assert!(
        deleted_at > 4,
        "a delete is a new version: {:?}",
        w.response
    );

    // A deleted register does not exist: CAS "absent" creates it again.
    let w = step(&c, 3, k, op::cas_absent("v5")).await;
    assert!(
        w.response.succeeded,
        "cas absent on a deleted register lost: {:?}",
        w.response
    );
    assert!(w.response.version > deleted_at);
    let v5 = w.response.version;
    check_everywhere(&c, k, &w, reg("v5", v5)).await;
    // CAS with delete = true, by version.
    let w = step(&c, 1, k, op::cas_delete(v5)).await;
    assert!(w.response.succeeded, "{:?}", w.response);
    check_everywhere(&c, k, &w, None).await;
    // And version 0 ("does not exist") holds for it now, as for a key never written.
    let w = step(&c, 2, k, op::cas_version(0, "v6")).await;
    assert!(w.response.succeeded, "{:?}", w.response);
    check_everywhere(&c, k, &w, reg("v6", w.response.version)).await;
    let w = step(&c, 3, "reg-fresh", op::cas_absent("f1")).await;
    assert_eq!((w.response.succeeded, w.response.version), (true, 1));
    check_everywhere(&c, "reg-fresh", &w, reg("f1", 1)).await;
    let w = step(&c, 1, "reg-fresh-0", op::cas_version(0, "g1")).await;
    assert_eq!((w.response.succeeded, w.response.version), (true, 1));
    check_everywhere(&c, "reg-fresh-0", &w, reg("g1", 1)).await;

    // --- Counter: add (the first creates the key through Raft, later ones are fast), set.
    let k = "ctr";
    let w = step(&c, 1, k, op::add(5)).await;
    assert_eq!(path(&w), Path::Consensus, "the first write creates the key");
    check_everywhere(&c, k, &w, Some(Kind::Counter(5))).await;
    let w = step(&c, 2, k, op::add(3)).await;
    assert_eq!(path(&w), Path::Fast);
    assert_eq!(w.response.version, 0);
    check_everywhere(&c, k, &w, Some(Kind::Counter(8))).await;
    let w = step(&c, 3, k, op::add(-2)).await;
    assert_eq!(path(&w), Path::Fast);
    check_everywhere(&c, k, &w, Some(Kind::Counter(6))).await;
    let w = step(&c, 1, k, op::set_value(100)).await;
    assert_eq!(path(&w), Path::Consensus);
    check_everywhere(&c, k, &w, Some(Kind::Counter(100))).await;
    let w = step(&c, 2, k, op::add(1)).await;
    assert_eq!(path(&w), Path::Fast);
    check_everywhere(&c, k, &w, Some(Kind::Counter(101))).await;

    // --- Bounded counter (`stock:*`: bounds [0, 1000000] by the embedded rules).
    let k = "stock:e2e";
    let w = step(&c, 1, k, op::set_value(50)).await;
    assert_eq!(path(&w), Path::Consensus);
    check_everywhere(&c, k, &w, bounded(50, 0, 1_000_000)).await;
    // Bounds change through Raft. Widening them (narrowing could strand escrow quota the
    // nodes already took, which is refused).
    let w = step(&c, 2, k, op::set_bounds(-100, 2_000_000)).await;
    assert_eq!(path(&w), Path::Consensus);
    check_everywhere(&c, k, &w, bounded(50, -100, 2_000_000)).await;
    let w = step(&c, 3, k, op::add(-10)).await;
    assert!(
        matches!(path(&w), Path::Escrow | Path::Consensus),
        "{:?}",
        w.response
    );
    check_everywhere(&c, k, &w, bounded(40, -100, 2_000_000)).await;
    let w = step(&c, 1, k, op::add(5)).await;
    check_everywhere(&c, k, &w, bounded(45, -100, 2_000_000)).await;
    // A set within the bounds, small enough for the key's pool whatever quota the nodes
    // took meanwhile (a set cannot take back quota nodes hold).
    let w = step(&c, 2, k, op::set_value(60)).await;
    assert_eq!(path(&w), Path::Consensus);
    check_everywhere(&c, k, &w, bounded(60, -100, 2_000_000)).await;
    let w = step(&c, 3, k, op::add(-3)).await;
    check_everywhere(&c, k, &w, bounded(57, -100, 2_000_000)).await;
    // Beyond a bound, either way and from any node: refused, nothing changes.
    refused(&c, 1, k, op::add(-158), Code::ResourceExhausted).await;
    refused(&c, 2, k, op::add(2_000_000), Code::ResourceExhausted).await;
    refused(&c, 3, k, op::add(i64::MIN), Code::ResourceExhausted).await;
    check_everywhere(&c, k, &w, bounded(57, -100, 2_000_000)).await;

    // --- Max: raise (first through Raft, then fast), set_max (Raft, may lower it).
    let k = "mx";
    let w = step(&c, 1, k, op::raise(10)).await;
    assert_eq!(path(&w), Path::Consensus);
    check_everywhere(&c, k, &w, max(10)).await;
    let w = step(&c, 2, k, op::raise(5)).await;
    assert_eq!(path(&w), Path::Fast);
    check_everywhere(&c, k, &w, max(10)).await;
    let w = step(&c, 3, k, op::raise(20)).await;
    assert_eq!(path(&w), Path::Fast);
    check_everywhere(&c, k, &w, max(20)).await;
    let w = step(&c, 1, k, op::set_max(7)).await;
    assert_eq!(path(&w), Path::Consensus);
    check_everywhere(&c, k, &w, max(7)).await;
    let w = step(&c, 2, k, op::raise(8)).await;
    assert_eq!(path(&w), Path::Fast);
    check_everywhere(&c, k, &w, max(8)).await;

    // --- Set: add (first through Raft, then fast; idempotent), remove (Raft), re-add.
    let k = "st";
    let w = step(&c, 1, k, op::sadd("a")).await;
    assert_eq!(path(&w), Path::Consensus);
    check_everywhere(&c, k, &w, set(&["a"])).await;
    let w = step(&c, 2, k, op::sadd("c")).await;
    assert_eq!(path(&w), Path::Fast);
    check_everywhere(&c, k, &w, set(&["a", "c"])).await;
    let w = step(&c, 3, k, op::sadd("b")).await;
    assert_eq!(path(&w), Path::Fast);
    check_everywhere(&c, k, &w, set(&["a", "b", "c"])).await;
    let w = step(&c, 2, k, op::sadd("a")).await;
    check_everywhere(&c, k, &w, set(&["a", "b", "c"])).await;
    let w = step(&c, 3, k, op::srem("b")).await;
    assert_eq!(path(&w), Path::Consensus);
    check_everywhere(&c, k, &w, set(&["a", "c"])).await;
    let w = step(&c, 1, k, op::sadd("b")).await;
    assert_eq!(path(&w), Path::Fast);
    check_everywhere(&c, k, &w, set(&["a", "b", "c"])).await;
    let w = step(&c, 1, k, op::srem("zzz")).await;
    assert!(
        w.response.succeeded,
        "removing an absent element is a no-op"
    );
    check_everywhere(&c, k, &w, set(&["a", "b", "c"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_causal_tokens_handed_between_nodes() {
    let c = Cluster::start(3, &[]).await;
    support::await_leaders_balanced(&c).await;

    // --- A Batch of mixed ops: each answered on its own, in request order.
    let ops: Vec<(&str, pb::Op)> = vec![
        ("batch:reg", op::put("x")),
        ("batch:ctr", op::add(1)),
        ("batch:reg", op::add(1)),
        ("batch:set", op::sadd("e")),
        ("", op::put("no key")),
        ("batch:ctr", op::none()),
        ("batch:reg", op::cas_version(1, "y")),
        ("batch:ctr", op::add(2)),
        ("batch:reg", op::cas_version(1, "z")),
        (
            "stock:batch",
            op::put("a register on a bounded counter key"),
        ),
        ("batch:set", op::sadd("f")),
        ("batch:set", op::srem("e")),
        ("batch:max", op::raise(3)),
        ("batch:max", op::sadd("wrong type")),
        ("batch:max", op::raise(9)),
    ];
    let results = batch(&c, 2, ops.iter().map(|(k, o)| (*k, o, &[][..]))).await;
    assert_eq!(results.len(), ops.len(), "{results:?}");
    use pb::batch_result::Result as R;
    let ok = |i: usize| match &results[i].result {
        Some(R::Ok(r)) => r.clone(),
        other => panic!("op {i} ({:?}) failed: {other:?}", ops[i]),
    };
    let err = |i: usize, code: Code| match &results[i].result {
        Some(R::Error(e)) => {
            assert_eq!(e.code, code as i32, "op {i} ({:?}): {e:?}", ops[i]);
            assert!(!e.message.is_empty(), "op {i}: an error without a message");
        }
        other => panic!("op {i} ({:?}) should fail with {code:?}: {other:?}", ops[i]),
    };
    let r = ok(0);
    assert_eq!((r.succeeded, r.version), (true, 1));
    assert!(ok(1).succeeded);
    err(2, Code::FailedPrecondition);
    assert!(ok(3).succeeded);
    err(4, Code::InvalidArgument);
    err(5, Code::InvalidArgument);
    let r = ok(6);
    assert_eq!((r.succeeded, r.version), (true, 2));
    assert!(ok(7).succeeded);
    let r = ok(8);
    assert_eq!((r.succeeded, r.version), (false, 2), "op 8 ran after op 6");
    err(9, Code::FailedPrecondition);
    assert!(ok(10).succeeded);
    assert!(ok(11).succeeded);
    assert!(ok(12).succeeded);
    err(13, Code::FailedPrecondition);
    assert!(ok(14).succeeded);
    let last = |i: usize| Written {
        via: 2,
        response: ok(i),
        ordered: false,
    };
    check_everywhere(&c, "batch:reg", &last(6), reg("y", 2)).await;
    check_everywhere(&c, "batch:ctr", &last(7), Some(Kind::Counter(3))).await;
    check_everywhere(&c, "batch:set", &last(11), set(&["f"])).await;
    check_everywhere(&c, "batch:max", &last(14), max(9)).await;
    check_everywhere(&c, "stock:batch", &last(14), None).await;

    // --- A Batch on keys that exist: each key's leading fast-path ops are admitted together
    // (one WAL append); from a key's first op that needs consensus or carries a token, the
    // rest of that key runs op by op, in order. A refused op does not stop its key.
    let token = ok(14).token;
    let ops: Vec<(&str, pb::Op, Vec<u8>)> = vec![
        ("batch:ctr", op::add(10), vec![]),
        ("batch:set", op::sadd("g"), vec![]),
        ("batch:ctr", op::set_value(100), vec![]),
        ("batch:ctr", op::add(5), vec![]),
        ("batch:max", op::raise(20), vec![]),
        ("batch:max", op::sadd("wrong type"), vec![]),
        ("batch:max", op::raise(30), vec![]),
        ("batch:set", op::srem("f"), vec![]),
        ("batch:set", op::sadd("h"), vec![]),
        ("batch:max", op::raise(40), token),
    ];
    let results = batch(&c, 2, ops.iter().map(|(k, o, t)| (*k, o, t.as_slice()))).await;
    assert_eq!(results.len(), ops.len(), "{results:?}");
    let ok = |i: usize| match &results[i].result {
        Some(R::Ok(r)) => {
            assert!(r.succeeded, "op {i} ({:?}): {r:?}", ops[i]);
            r.clone()
        }
        other => panic!("op {i} ({:?}) failed: {other:?}", ops[i]),
    };
    let paths: Vec<Option<Path>> = (0..ops.len())
        .map(|i| (i != 5).then(|| Path::try_from(ok(i).path).unwrap()))
        .collect();
    use Path::{Consensus, Fast};
    assert_eq!(
        paths,
        [
            Some(Fast),
            Some(Fast),
            Some(Consensus),
            Some(Fast),
            Some(Fast),
            None,
            Some(Fast),
            Some(Consensus),
            Some(Fast),
            Some(Fast),
        ]
    );
    match &results[5].result {
        Some(R::Error(e)) => assert_eq!(e.code, Code::FailedPrecondition as i32, "{e:?}"),
        other => panic!("a set add on a max key must fail: {other:?}"),
    }
    let last = |i: usize| Written {
        via: 2,
        response: ok(i),
        ordered: false,
    };
    check_everywhere(&c, "batch:ctr", &last(3), Some(Kind::Counter(105))).await;
    check_everywhere(&c, "batch:set", &last(8), set(&["g", "h"])).await;
    check_everywhere(&c, "batch:max", &last(9), max(40)).await;

    // --- More fast-path ops than one hold of the state lock admits: all of them land.
    let adds = 2_500;
    let add = op::add(1);
    let results = batch(&c, 3, (0..adds).map(|_| ("batch:ctr", &add, &[][..]))).await;
    assert_eq!(results.len(), adds);
    let mut last_response = None;
    for (i, r) in results.iter().enumerate() {
        match &r.result {
            Some(R::Ok(w)) => {
                assert_eq!(w.path, Path::Fast as i32, "add {i}: {w:?}");
                last_response = Some(w.clone());
            }
            other => panic!("add {i} failed: {other:?}"),
        }
    }
    let last = Written {
        via: 3,
        response: last_response.expect("the batch has ops"),
        ordered: false,
    };
    check_everywhere(
        &c,
        "batch:ctr",
        &last,
        Some(Kind::Counter(105 + adds as i64)),
    )
    .await;

    // --- Read-your-writes across nodes: a fast-path add on node 1, read CAUSAL on node 3
    // with its token, then on node 2 with the token node 3's read returned (monotonic).
    let k = "causal:ctr";
    let w = step(&c, 1, k, op::add(1)).await;
    check_everywhere(&c, k, &w, Some(Kind::Counter(1))).await;
    let (mut kv1, mut kv2, mut kv3) = (c.kv(1).await, c.kv(2).await, c.kv(3).await);
    for i in 2..=30 {
        let w = write(&mut kv1, k, op::add(1)).await.unwrap();
        assert_eq!(w.path, Path::Fast as i32);
        let r3 = get_with_token(&mut kv3, k.as_bytes(), Consistency::Causal, &w.token)
            .await
            .unwrap();
        assert_eq!(
            comparable(&r3),
            Some(Kind::Counter(i)),
            "node 3 with node 1's token missed the add"
        );
        let r2 = get_with_token(&mut kv2, k.as_bytes(), Consistency::Causal, &r3.token)
            .await
            .unwrap();
        assert_eq!(
            comparable(&r2),
            Some(Kind::Counter(i)),
            "node 2 with node 3's token went back in time"
        );
    }
    // A consensus write's token too: a put on node 1, read CAUSAL on node 3 at once.
    for i in 0..10 {
        let value = format!("c{i}");
        let w = write(&mut kv1, "causal:reg", op::put(&value))
            .await
            .unwrap();
        let r3 = get_with_token(&mut kv3, b"causal:reg", Consistency::Causal, &w.token)
            .await
            .unwrap();
        assert_eq!(comparable(&r3), reg(&value, w.version));
    }
    // The token of a fast-path add covers what the add was admitted on top of: a counter
    // set (Raft) then an add on node 1, read on node 3 with the add's token; on keys whose
    // group each node leads.
    let mut keys = std::collections::BTreeMap::new();
    for i in 0..200 {
        let key = format!("causal:led-{i}");
        let (_, leader) = c.leader_of(1, &key).await;
        keys.entry(leader).or_insert(key);
    }
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in keys.values() {
        let w = step(&c, 1, key, op::add(1)).await;
        check_everywhere(&c, key, &w, Some(Kind::Counter(1))).await;
        for i in 1..=20 {
            write(&mut kv1, key, op::set_value(1000 * i)).await.unwrap();
            let w = write(&mut kv1, key, op::add(1)).await.unwrap();
            assert_eq!(w.path, Path::Fast as i32);
            let r3 = get_with_token(&mut kv3, key.as_bytes(), Consistency::Causal, &w.token)
                .await
                .unwrap();
            assert_eq!(
                comparable(&r3),
                Some(Kind::Counter(1000 * i + 1)),
                "{key}: node 3 with the token of node 1's add (after its set to {}) does not read that session's writes",
                1000 * i
            );
        }
    }
    for i in 1..=10 {
        let set = write(&mut kv1, k, op::set_value(1000 * i)).await.unwrap();
        assert_eq!(set.path, Path::Consensus as i32);
        let w = write(&mut kv1, k, op::add(1)).await.unwrap();
        assert_eq!(w.path, Path::Fast as i32);
        let r3 = get_with_token(&mut kv3, k.as_bytes(), Consistency::Causal, &w.token)
            .await
            .unwrap();
        assert_eq!(
            comparable(&r3),
            Some(Kind::Counter(1000 * i + 1)),
            "node 3 with the token of node 1's add (after its set to {}) does not read that write",
            1000 * i
        );
    }
}

/// The token of a fast-path write covers the Raft writes its node acknowledged before it: a
/// session that sets a counter (Raft) and then adds to it on node 1, and hands the add's
/// token to node 3 while node 3 lags on the key's group (its leader, node 2, cannot reach
/// node 3), reads the set and the add there, or gets UNAVAILABLE ("not caught up with the
/// session token"), never the add without the set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_of_a_fast_path_add_covers_the_set_before_it_on_a_lagging_node() {
    if let Some(why) = support::partition_unsupported() {
        eprintln!("skipping: {why}");
        return;
    }
    let c = Cluster::start(3, &[]).await;
    support::await_leaders_balanced(&c).await;
    let key = c
        .key_led_by(2, "ryw:", 200, "a key whose group node 2 leads")
        .await;
    let (mut kv1, mut kv3) = (c.kv(1).await, c.kv(3).await);
    let w = step(&c, 1, &key, op::add(1)).await;
    check_everywhere(&c, &key, &w, Some(Kind::Counter(1))).await;
    let cut = support::Partition::one_way(&c, 2, 3);
    write(&mut kv1, &key, op::set_value(1000)).await.unwrap();
    let add = write(&mut kv1, &key, op::add(1)).await.unwrap();
    assert_eq!(add.path, Path::Fast as i32);
    let r3 = get_with_token(&mut kv3, key.as_bytes(), Consistency::Causal, &add.token).await;
    drop(cut);
    match r3 {
        Ok(r) => assert_eq!(
            comparable(&r),
            Some(Kind::Counter(1001)),
            "node 3 read the session's add without its set"
        ),
        Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
    }
}

/// The value of the first Prometheus sample line named exactly `name` (labels included).
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Node `i`'s `/metrics` page.
async fn scrape(c: &Cluster, i: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut http = tokio::net::TcpStream::connect(c.nodes[i].http)
        .await
        .expect("the node serves HTTP");
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: calm\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_group_commits_and_where_a_writes_time_goes() {
    let c = Cluster::start(3, &[]).await;
    let mut kv = c.kv(1).await;
    for i in 0..20 {
        let key = format!("metrics:{i}");
        write(&mut kv, &key, op::put("v")).await.expect("a put");
    }
    get_with_token(&mut kv, b"metrics:0", Consistency::Linearizable, &[])
        .await
        .expect("a linearizable get");
    kv.batch(pb::BatchRequest {
        ops: vec![pb::WriteRequest {
            key: b"metrics:batch".to_vec(),
            op: Some(op::add(1)),
            token: Vec::new(),
            lease: 0,
        }],
    })
    .await
    .expect("a batch");
    let body = &scrape(&c, 0).await;

    // Node 1's WAL made the cluster's start and these puts durable, in group commits.
    let commits = sample(body, "calm_wal_group_commits_total").expect("group commits counted");
    assert!(commits >= 1.0, "{body}");
    let batches = sample(body, "calm_wal_group_batches_sum").expect("batches per group");
    assert!(
        batches >= commits,
        "each group commits at least one batch: {body}"
    );
    assert_eq!(
        sample(body, "calm_wal_group_batches_count"),
        Some(commits),
        "{body}"
    );
    // Durable write times are a histogram with buckets, one observation per write.
    let writes = sample(body, "calm_wal_durable_write_seconds_count").expect("write times");
    assert!(writes >= commits, "{body}");
    assert_eq!(
        sample(body, r#"calm_wal_durable_write_seconds_bucket{le="+Inf"}"#),
        Some(writes),
        "{body}"
    );
    assert!(
        body.contains("# TYPE calm_wal_durable_write_seconds histogram"),
        "{body}"
    );
    assert!(sample(body, "calm_wal_written_bytes_total").is_some_and(|b| b > 0.0));

    // Where a write's time goes, stage by stage. Node 1 answered every put (whichever node
    // led the key's group) and appended each entry, as leader or follower.
    assert_eq!(
        sample(body, r#"calm_write_seconds_count{path="consensus"}"#),
        Some(20.0),
        "{body}"
    );
    assert_eq!(
        sample(
            body,
            r#"calm_write_seconds_bucket{path="consensus",le="+Inf"}"#
        ),
        Some(20.0),
        "{body}"
    );
    assert!(
        sample(body, "calm_wal_append_seconds_count").is_some_and(|n| n >= 20.0),
        "{body}"
    );
    assert_eq!(
        sample(
            body,
            r#"calm_read_seconds_count{consistency="linearizable"}"#
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(body, "calm_batch_seconds_count"),
        Some(1.0),
        "{body}"
    );
    // The leaders proposed each put once and sent their entries to peers.
    let mut proposals = 0.0;
    let mut raft_round_trips = 0.0;
    for i in 0..3 {
        let body = scrape(&c, i).await;
        proposals += sample(&body, "calm_raft_proposal_seconds_count").unwrap_or(0.0);
        raft_round_trips +=
            sample(&body, r#"calm_peer_round_trip_seconds_count{lane="raft"}"#).unwrap_or(0.0);
        for histogram in [
            "calm_raft_proposal_seconds",
            "calm_peer_round_trip_seconds",
            "calm_wal_append_seconds",
        ] {
            assert!(
                !body.contains(&format!("{histogram}_count"))
                    || body.contains(&format!("# TYPE {histogram} histogram")),
                "{histogram} has buckets: {body}"
            );
        }
    }
    // (At least: a cluster's start proposes its rules too.)
    assert!(
        proposals >= 20.0,
        "one proposal per put on the leaders: {proposals}"
    );
    assert!(raft_round_trips >= 1.0, "entries went to followers");
}
