//! Transactions with real `calm serve` processes: compare/then/else on keys of one subject
//! (observing fast-path adds), all-or-nothing branches, every refusal with its code, the
//! `calm txn` command, and concurrent transfers from every node, across a kill of the
//! subject's leader, that conserve the total on every replica.

mod support;

use calm::api::pb;
use calm::api::pb::compare::Test;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Cluster, counter, get, op, register, write_retrying};
use tonic::Code;

fn txn_op(key: &str, op: pb::Op) -> pb::TxnOp {
    pb::TxnOp {
        key: key.as_bytes().to_vec(),
        op: Some(op),
        lease: 0,
    }
}

fn compare(key: &str, test: Test) -> pb::Compare {
    pb::Compare {
        key: key.as_bytes().to_vec(),
        test: Some(test),
    }
}

fn at_least(min: i64) -> Test {
    Test::Counter(pb::CounterRange {
        min: Some(min),
        max: None,
    })
}

/// A transfer of `amount` from `from` to `to` if `from` holds at least `amount`.
fn transfer(from: &str, to: &str, amount: i64) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: vec![compare(from, at_least(amount))],
        success: vec![txn_op(from, op::add(-amount)), txn_op(to, op::add(amount))],
        failure: vec![],
        token: vec![],
    }
}

async fn txn(
    c: &Cluster,
    node: usize,
    req: pb::TxnRequest,
) -> Result<pb::TxnResponse, tonic::Status> {
    c.kv(node).await.txn(req).await.map(|r| r.into_inner())
}

/// A transaction retried while the cluster has no leader to take it (nothing was applied).
async fn txn_retrying(c: &Cluster, node: usize, req: pb::TxnRequest) -> pb::TxnResponse {
    for _ in 0..40 {
        match txn(c, node, req.clone()).await {
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            other => return other.unwrap(),
        }
    }
    panic!("no leader took the transaction in 10 s");
}

async fn balance(c: &Cluster, node: usize, key: &str, consistency: pb::Consistency) -> i64 {
    counter(&get(&mut c.kv(node).await, key, consistency).await.unwrap()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_compare_what_was_observed_and_apply_all_or_nothing() {
    let c = Cluster::start(3, &[]).await;
    let (a, b, name) = ("{acct}:a", "{acct}:b", "{acct}:name");
    // Fast-path adds on two nodes: the transaction's comparison observes them once they
    // reached the proposing node (the token makes sure).
    write_retrying(&c, 1, a, op::add(0)).await.unwrap();
    write_retrying(&c, 1, b, op::add(0)).await.unwrap();
    let w = write_retrying(&c, 2, a, op::add(30)).await.unwrap();
    assert_eq!(w.path, pb::Path::Fast as i32);
    let mut req = transfer(a, b, 25);
    req.token = w.token.clone();
    let r = txn_retrying(&c, 3, req).await;
    assert!(r.succeeded, "a holds 30 >= 25");
    assert_eq!(r.results.len(), 2);
    assert!(!r.token.is_empty());
    // 5 left: the same transfer takes the (empty) failure branch and changes nothing.
    let r = txn_retrying(&c, 1, transfer(a, b, 25)).await;
    assert!(!r.succeeded);
    assert!(r.results.is_empty());
    assert_eq!(balance(&c, 2, a, pb::Consistency::Linearizable).await, 5);
    assert_eq!(balance(&c, 3, b, pb::Consistency::Linearizable).await, 25);

    // Register tests: absent, then value and version; the response carries each op's version.
    let create = pb::TxnRequest {
        compare: vec![compare(name, Test::Exists(false))],
        success: vec![txn_op(name, op::put("ann"))],
        failure: vec![],
        token: vec![],
    };
    let r = txn_retrying(&c, 2, create.clone()).await;
    assert!(r.succeeded);
    assert_eq!(r.results[0].version, 1);
    assert!(!txn_retrying(&c, 2, create).await.succeeded, "exists now");
    let rename = |expect: &str, next: &str| pb::TxnRequest {
        compare: vec![
            compare(
                name,
                Test::Value(pb::ValueTest {
                    op: pb::CompareOp::Equal as i32,
                    value: expect.as_bytes().to_vec(),
                }),
            ),
            compare(
                name,
                Test::Version(pb::VersionTest {
                    op: pb::CompareOp::Less as i32,
                    version: 5,
                }),
            ),
        ],
        success: vec![txn_op(name, op::put(next)), txn_op(a, op::add(1))],
        failure: vec![txn_op(b, op::add(100))],
        token: vec![],
    };
    let r = txn_retrying(&c, 3, rename("ann", "bob")).await;
    assert!(r.succeeded);
    assert_eq!(r.results[0].version, 2);
    let r = txn_retrying(&c, 1, rename("ann", "cid")).await;
    assert!(
        !r.succeeded,
        "the value is bob now: the failure branch runs"
    );
    let mut kv = c.kv(1).await;
    let value = get(&mut kv, name, pb::Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(register(&value).as_deref(), Some("bob"));
    assert_eq!(balance(&c, 1, a, pb::Consistency::Linearizable).await, 6);
    assert_eq!(balance(&c, 1, b, pb::Consistency::Linearizable).await, 125);

    // A value test on a missing key is false even for NOT_EQUAL (etcd's rule).
    let r = txn_retrying(
        &c,
        1,
        pb::TxnRequest {
            compare: vec![compare(
                "{acct}:nobody",
                Test::Value(pb::ValueTest {
                    op: pb::CompareOp::NotEqual as i32,
                    value: b"x".to_vec(),
                }),
            )],
            success: vec![txn_op(a, op::add(1000))],
            failure: vec![],
            token: vec![],
        },
    )
    .await;
    assert!(!r.succeeded);

    // A refused op refuses the whole branch: the stock rule's bounded counter cannot leave
    // [0, 1000000], so the register write before it does not happen either.
    let (tagged_stock, note) = ("stock:{s1}", "{s1}:note");
    write_retrying(&c, 1, tagged_stock, op::add(5))
        .await
        .unwrap();
    let e = txn(
        &c,
        2,
        pb::TxnRequest {
            compare: vec![],
            success: vec![
                txn_op(note, op::put("sold")),
                txn_op(tagged_stock, op::add(-6)),
            ],
            failure: vec![],
            token: vec![],
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("success op 1"), "{}", e.message());
    let value = get(&mut kv, note, pb::Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(value, None, "nothing of a refused transaction applies");

    // Refusals, each with its code and the way out.
    let refusals: Vec<(pb::TxnRequest, Code, &str)> = vec![
        (
            transfer(a, "{other}:b", 1),
            Code::FailedPrecondition,
            "share one subject",
        ),
        (
            transfer("session:1", "session:1x", 1),
            Code::FailedPrecondition,
            "share one subject",
        ),
        (
            pb::TxnRequest {
                success: vec![txn_op("session:1", op::put("x"))],
                ..Default::default()
            },
            Code::FailedPrecondition,
            "available mode",
        ),
        (
            pb::TxnRequest {
                success: vec![txn_op(a, op::add(1)), txn_op(a, op::add(2))],
                ..Default::default()
            },
            Code::InvalidArgument,
            "twice",
        ),
        (
            pb::TxnRequest {
                success: vec![txn_op(name, op::cas_version(2, "x"))],
                ..Default::default()
            },
            Code::InvalidArgument,
            "cas inside a transaction",
        ),
        (
            pb::TxnRequest {
                compare: vec![compare(
                    a,
                    Test::Version(pb::VersionTest { op: 0, version: 1 }),
                )],
                ..Default::default()
            },
            Code::FailedPrecondition,
            "applies to registers only",
        ),
        (
            pb::TxnRequest {
                success: (0..129)
                    .map(|i| txn_op(&format!("{{acct}}:k{i}"), op::add(1)))
                    .collect(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "at most 128",
        ),
        (
            pb::TxnRequest::default(),
            Code::InvalidArgument,
            "names no key",
        ),
        (
            pb::TxnRequest {
                compare: vec![pb::Compare {
                    key: a.as_bytes().to_vec(),
                    test: None,
                }],
                ..Default::default()
            },
            Code::InvalidArgument,
            "no test",
        ),
    ];
    for (req, code, text) in refusals {
        let e = txn(&c, 1, req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e:?}");
        assert!(
            e.message().contains(text),
            "{text:?} not in {:?}",
            e.message()
        );
    }

    // `calm txn` from stdin: exit 0 on success (JSON answer), 1 when the failure branch ran.
    let cli = |text: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_calm"))
            .args([
                "txn",
                "-w",
                "json",
                "--endpoints",
                &c.nodes[0].client.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), doc)
    };
    let text = "compare:\n  counter {acct}:a 6..6\n  value {acct}:name = bob\nsuccess:\n  add {acct}:a -6\n  del {acct}:name\n";
    let (code, doc) = cli(text);
    assert_eq!(code, Some(0), "{doc}");
    assert_eq!(doc["succeeded"], true);
    assert_eq!(doc["results"][1]["deleted"], true);
    let (code, doc) = cli(text);
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(doc["succeeded"], false);
    let (code, doc) = cli("success:\n  add {acct}:a 1\n  add {x}:b 1\n");
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(doc["error"]["code"], "FAILED_PRECONDITION");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_conserve_the_total_across_a_leader_kill() {
    const ACCOUNTS: usize = 4;
    const START: i64 = 100;
    const CLIENTS: usize = 6;
    const TRANSFERS: usize = 25;
    let mut c = Cluster::start(3, &[]).await;
    let accounts: Vec<String> = (0..ACCOUNTS).map(|i| format!("{{bank}}:{i}")).collect();
    for a in &accounts {
        write_retrying(&c, 1, a, op::add(START)).await.unwrap();
    }
    let (_, leader) = c.leader_of(1, &accounts[0]).await;
    assert_ne!(
        leader, 0,
        "the bank's group has a leader once the cluster is ready"
    );
    let victim = leader as usize;
    let survivors: Vec<usize> = (1..=3).filter(|&n| n != victim).collect();
    let started = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let clients = (0..CLIENTS).map(|client| {
        let c = &c;
        let accounts = &accounts;
        let survivors = &survivors;
        let done = &done;
        async move {
            let (mut applied, mut after_kill) = (0, 0);
            for i in 0..TRANSFERS {
                let from = &accounts[(client + i) % ACCOUNTS];
                let to = &accounts[(client + 2 * i + 1) % ACCOUNTS];
                if from == to {
                    continue;
                }
                let node = survivors[(client + i) % survivors.len()];
                // Unknown outcomes (the leader was killed mid-call) are fine: every state a
                // transaction can leave conserves the total.
                let killed = done.load(std::sync::atomic::Ordering::SeqCst) >= KILL_AFTER;
                if let Ok(r) = txn(c, node, transfer(from, to, 1 + (i as i64 % 40))).await
                    && r.succeeded
                {
                    applied += 1;
                    after_kill += usize::from(killed);
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "transfers take too long"
                );
            }
            (applied, after_kill)
        }
    });
    // The subject's leader dies a third of the way through.
    const KILL_AFTER: usize = CLIENTS * TRANSFERS / 3;
    let kill = async {
        while done.load(std::sync::atomic::Ordering::SeqCst) < KILL_AFTER {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.signal(victim, libc::SIGKILL);
    };
    let (results, ()) = tokio::join!(futures::future::join_all(clients), kill);
    let applied: usize = results.iter().map(|r| r.0).sum();
    let after_kill: usize = results.iter().map(|r| r.1).sum();
    eprintln!("{applied} transfers applied, {after_kill} of them after the kill");
    assert!(after_kill > 0, "no transfer succeeded after the kill");
    c.kill(victim);
    c.spawn(victim);
    c.await_ready().await;
    // Linearizable reads: the total is conserved and nobody went negative.
    let mut total = 0;
    for a in &accounts {
        let v = balance(&c, 1, a, pb::Consistency::Linearizable).await;
        assert!(v >= 0, "{a} is {v}");
        total += v;
    }
    assert_eq!(total, START * ACCOUNTS as i64);
    // Every replica, the restarted one included, converges on the same balances.
    let want: Vec<i64> = {
        let mut v = Vec::new();
        for a in &accounts {
            v.push(balance(&c, 1, a, pb::Consistency::Linearizable).await);
        }
        v
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in 1..=3 {
        loop {
            let mut have = Vec::new();
            for a in &accounts {
                have.push(balance(&c, node, a, pb::Consistency::Serializable).await);
            }
            if have == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} holds {have:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
