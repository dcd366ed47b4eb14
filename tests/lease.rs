//! Leases with real `calm serve` processes: grant, attach, revoke, detach by a later write,
//! every refusal with its code, the `calm lease` commands; a lease kept alive through a
//! SIGKILL of its group's leader survives (and is still there after the killed node
//! restarts), while leases nobody renews expire, deleting their keys, within their TTL plus
//! the election timeout (and never before their TTL).

mod support;

use calm::api::pb;
use calm::api::pb::lease_client::LeaseClient;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{Cluster, get, op, register};
use tonic::Code;
use tonic::transport::Channel;

/// The election timeout test clusters run with (`support::test_env`), and the lease
/// minimum that follows from it (1.5x).
const ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(1600);
const TTL_MIN_MS: u64 = 2400;

async fn leases(c: &Cluster, node: usize) -> LeaseClient<Channel> {
    LeaseClient::new(c.channel(node).await)
}

async fn grant(c: &Cluster, node: usize, key: &str, ttl_ms: u64) -> pb::LeaseGrantResponse {
    for _ in 0..40 {
        match leases(c, node)
            .await
            .grant(pb::LeaseGrantRequest {
                ttl_ms,
                subject: Vec::new(),
                key: key.as_bytes().to_vec(),
            })
            .await
        {
            Ok(r) => return r.into_inner(),
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(s) => panic!("grant for {key}: {s:?}"),
        }
    }
    panic!("no leader granted a lease in 10 s")
}

async fn leased_write(
    c: &Cluster,
    node: usize,
    key: &str,
    op: pb::Op,
    lease: u64,
    token: &[u8],
) -> Result<pb::WriteResponse, tonic::Status> {
    c.kv(node)
        .await
        .write(pb::WriteRequest {
            key: key.as_bytes().to_vec(),
            op: Some(op),
            token: token.to_vec(),
            lease,
        })
        .await
        .map(|r| r.into_inner())
}

async fn ttl(
    c: &Cluster,
    node: usize,
    id: u64,
) -> Result<pb::LeaseTimeToLiveResponse, tonic::Status> {
    leases(c, node)
        .await
        .time_to_live(pb::LeaseTimeToLiveRequest { id, keys: true })
        .await
        .map(|r| r.into_inner())
}

async fn value_at(c: &Cluster, node: usize, key: &str) -> Option<String> {
    let v = get(&mut c.kv(node).await, key, pb::Consistency::Linearizable)
        .await
        .unwrap();
    register(&v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_attach_revoke_detach_and_refuse_with_the_right_codes() {
    let c = Cluster::start(3, &[]).await;

    // Granted through node 1 for the key's subject; attached through node 2 with the
    // grant's token; its TTL is raised to the minimum.
    let g = grant(&c, 1, "{svc}:a", 100).await;
    assert_eq!(g.ttl_ms, TTL_MIN_MS);
    assert_eq!(g.subject, b"svc");
    let w = leased_write(&c, 2, "{svc}:a", op::put("1"), g.id, &g.token)
        .await
        .unwrap();
    assert_eq!(w.path, pb::Path::Consensus as i32);
    leased_write(&c, 3, "{svc}:b", op::put("2"), g.id, &[])
        .await
        .unwrap();
    let t = ttl(&c, 3, g.id).await.unwrap();
    let info = t.lease.unwrap();
    assert!(t.found);
    assert_eq!(info.key_count, 2);
    assert_eq!(info.keys, vec![b"{svc}:a".to_vec(), b"{svc}:b".to_vec()]);
    assert!(info.remaining_ms > 0 && info.remaining_ms <= TTL_MIN_MS + 1_000 + 1_600);

    // A later write without the lease takes {svc}:b back: revoking deletes only {svc}:a.
    leased_write(&c, 1, "{svc}:b", op::put("3"), 0, &[])
        .await
        .unwrap();
    let r = leases(&c, 2)
        .await
        .revoke(pb::LeaseRevokeRequest { id: g.id })
        .await
        .unwrap()
        .into_inner();
    assert!(r.found);
    assert_eq!(r.keys_deleted, 1);
    assert_eq!(value_at(&c, 3, "{svc}:a").await, None);
    assert_eq!(value_at(&c, 3, "{svc}:b").await.as_deref(), Some("3"));
    let again = leases(&c, 1)
        .await
        .revoke(pb::LeaseRevokeRequest { id: g.id })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.found);
    assert!(!ttl(&c, 1, g.id).await.unwrap().found);

    // A compare-and-set that creates the key attaches it too (the lock recipe's step).
    let g2 = grant(&c, 2, "{svc}:lock", 60_000).await;
    let cas = leased_write(&c, 1, "{svc}:lock", op::cas_absent("me"), g2.id, &g2.token)
        .await
        .unwrap();
    assert!(cas.succeeded);
    let lost = leased_write(&c, 2, "{svc}:lock", op::cas_absent("you"), g2.id, &[])
        .await
        .unwrap();
    assert!(!lost.succeeded, "the key exists: the second cas fails");
    assert_eq!(
        ttl(&c, 1, g2.id).await.unwrap().lease.unwrap().keys,
        vec![b"{svc}:lock".to_vec()]
    );

    // A transaction's put attaches its key when its branch runs: the lock recipe as one
    // command (create the key only if missing, with the lease).
    let g3 = grant(&c, 3, "{svc}:t", 60_000).await;
    let attached = c
        .kv(2)
        .await
        .txn(pb::TxnRequest {
            compare: vec![pb::Compare {
                key: b"{svc}:t".to_vec(),
                test: Some(pb::compare::Test::Exists(false)),
            }],
            success: vec![pb::TxnOp {
                key: b"{svc}:t".to_vec(),
                op: Some(op::put("mine")),
                lease: g3.id,
            }],
            failure: vec![pb::TxnOp {
                key: b"{svc}:t-lost".to_vec(),
                op: Some(op::put("lost")),
                lease: g3.id,
            }],
            token: g3.token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(attached.succeeded);
    let keys = ttl(&c, 1, g3.id).await.unwrap().lease.unwrap().keys;
    assert_eq!(
        keys,
        vec![b"{svc}:t".to_vec()],
        "only the branch that ran attaches"
    );
    let not_a_put = c
        .kv(1)
        .await
        .txn(pb::TxnRequest {
            compare: vec![],
            success: vec![pb::TxnOp {
                key: b"{svc}:n".to_vec(),
                op: Some(op::add(1)),
                lease: g3.id,
            }],
            failure: vec![],
            token: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(not_a_put.code(), Code::InvalidArgument, "{not_a_put:?}");
    let revoked = leases(&c, 1)
        .await
        .revoke(pb::LeaseRevokeRequest { id: g3.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.keys_deleted, 1);
    assert_eq!(value_at(&c, 2, "{svc}:t").await, None);

    // Refusals: each with its code and a message naming the fix, none changing anything.
    let no_subject = leases(&c, 1)
        .await
        .grant(pb::LeaseGrantRequest {
            ttl_ms: 5_000,
            subject: Vec::new(),
            key: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(no_subject.code(), Code::InvalidArgument, "{no_subject:?}");
    let zero_ttl = leases(&c, 1)
        .await
        .grant(pb::LeaseGrantRequest {
            ttl_ms: 0,
            subject: b"svc".to_vec(),
            key: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(zero_ttl.code(), Code::InvalidArgument, "{zero_ttl:?}");
    // A lease id of another group than {svc}'s (groups are 1..=4 in test clusters).
    let other_group = ((g2.id >> 48) % 4 + 1) << 48 | 1;
    let cases = [
        (
            "{other}:x",
            op::put("v"),
            g2.id,
            Code::FailedPrecondition,
            "subject",
        ),
        (
            "{svc}:n",
            op::add(1),
            g2.id,
            Code::InvalidArgument,
            "only a put",
        ),
        (
            "{svc}:x",
            op::put("v"),
            g2.id + 999_999,
            Code::NotFound,
            "does not exist",
        ),
        (
            "{svc}:x",
            op::put("v"),
            other_group,
            Code::FailedPrecondition,
            "subject",
        ),
        (
            "{svc}:x",
            op::put("v"),
            77 << 48,
            Code::NotFound,
            "no group",
        ),
        (
            "session:x",
            op::put("v"),
            g2.id,
            Code::FailedPrecondition,
            "available",
        ),
    ];
    for (key, op, lease, code, text) in cases {
        let e = leased_write(&c, 1, key, op.clone(), lease, &[])
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{key} {op:?}: {e:?}");
        assert!(
            e.message().contains(text),
            "{text:?} not in {:?}",
            e.message()
        );
        assert_eq!(value_at(&c, 1, key).await, None, "{key} was written");
    }
    let batch = c
        .kv(1)
        .await
        .batch(pb::BatchRequest {
            ops: vec![pb::WriteRequest {
                key: b"{svc}:batched".to_vec(),
                op: Some(op::put("v")),
                token: Vec::new(),
                lease: g2.id,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        &batch.results[0].result,
        Some(pb::batch_result::Result::Error(e)) if e.code == Code::InvalidArgument as i32
    ));

    // The CLI: grant, put --lease, ttl --keys, keepalive --once, list, revoke.
    let calm = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_calm"))
            .args(args)
            .args(["-w", "json", "--endpoints", &c.nodes[1].client.to_string()])
            .output()
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), doc)
    };
    let (code, granted) = calm(&["lease", "grant", "30s", "--key", "{cli}:k"]);
    assert_eq!(code, Some(0), "{granted}");
    let id = granted["id"].as_str().unwrap().to_string();
    assert_eq!(granted["ttl_ms"], 30_000);
    let (code, put) = calm(&["put", "{cli}:k", "v", "--lease", &id]);
    assert_eq!(code, Some(0), "{put}");
    let (code, t) = calm(&["lease", "ttl", &id, "--keys"]);
    assert_eq!(code, Some(0), "{t}");
    assert_eq!(t["keys"], serde_json::json!(["{cli}:k"]));
    let (code, kept) = calm(&["lease", "keepalive", &id, "--once"]);
    assert_eq!(
        (code, kept["ttl_ms"].as_u64()),
        (Some(0), Some(30_000)),
        "{kept}"
    );
    let (code, list) = calm(&["lease", "list"]);
    assert_eq!(code, Some(0));
    assert!(
        list["leases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["id"] == id.as_str()),
        "{list}"
    );
    let (code, revoked) = calm(&["lease", "revoke", &id]);
    assert_eq!(
        (code, revoked["keys_deleted"].as_u64()),
        (Some(0), Some(1)),
        "{revoked}"
    );
    let (code, gone) = calm(&["lease", "ttl", &id]);
    assert_eq!(code, Some(1), "{gone}");
    assert_eq!(gone["error"]["code"], "NOT_FOUND");
    let (code, bad) = calm(&["put", "{cli}:k", "v", "--lease", "nothex"]);
    assert_eq!(code, Some(2), "{bad}");
}

/// Poll `key` through `node` until it is gone; the time it took from `since`.
async fn await_deleted(
    c: &Cluster,
    node: usize,
    key: &str,
    since: Instant,
    limit: Duration,
) -> Duration {
    loop {
        let v = get(&mut c.kv(node).await, key, pb::Consistency::Linearizable).await;
        // An error (no leader for a moment) is asked again.
        if let Ok(None) = v {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "{key} still exists {:?} after its lease was granted",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_lease_survives_a_leader_kill_and_unkept_leases_expire() {
    let mut c = Cluster::start(3, &[]).await;
    // Leader balancing done first: every leader change extends leases by an election timeout.
    c.await_leaders_spread().await;
    let ttl_ms = 3_000;

    // No faults: a lease nobody renews ends within ttl + election timeout of *log-clock*
    // time (its deadline: ttl plus the one tick of slack, plus at most one new term's
    // extension), which the leader's ticks turn into real time as fast as the machine lets
    // them (a loaded CI machine ticks late, which only delays expiry); then its key is gone,
    // and never before its TTL. The wall-clock bound below is liveness, generous on purpose:
    // the measured time is printed and docs/leases.md records it.
    let quiet = grant(&c, 1, "{quiet}:k", ttl_ms).await;
    let granted_at = Instant::now();
    leased_write(&c, 1, "{quiet}:k", op::put("v"), quiet.id, &quiet.token)
        .await
        .unwrap();
    let remaining = ttl(&c, 1, quiet.id)
        .await
        .unwrap()
        .lease
        .unwrap()
        .remaining_ms;
    assert!(
        remaining <= ttl_ms + 1_000 + ELECTION_TIMEOUT_MAX.as_millis() as u64,
        "a fresh {ttl_ms} ms lease has {remaining} ms of log-clock time left"
    );
    let bound = Duration::from_secs(60);
    let took = await_deleted(&c, 2, "{quiet}:k", granted_at, bound).await;
    eprintln!("an unrenewed {ttl_ms} ms lease expired after {took:?}");
    assert!(
        took >= Duration::from_millis(ttl_ms),
        "expired early: {took:?}"
    );

    // Kept alive through a node that survives, across a SIGKILL of the group's leader.
    let subject_key = "{kept}:k";
    let (_, leader) = c.leader_of(1, subject_key).await;
    assert_ne!(leader, 0);
    let victim = leader as usize;
    let via = if victim == 1 { 2 } else { 1 };
    let kept = grant(&c, via, subject_key, ttl_ms).await;
    let dropped = grant(&c, via, "{kept}:dropped", ttl_ms).await;
    let dropped_at = Instant::now();
    leased_write(&c, via, subject_key, op::put("alive"), kept.id, &kept.token)
        .await
        .unwrap();
    leased_write(
        &c,
        via,
        "{kept}:dropped",
        op::put("v"),
        dropped.id,
        &dropped.token,
    )
    .await
    .unwrap();

    let (mut requests, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = leases(&c, via)
        .await
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let renew_every = Duration::from_millis(ttl_ms / 3);
    let keep_for = Duration::from_millis(ttl_ms * 4);
    let started = Instant::now();
    let mut killed = false;
    let mut renewed = 0;
    while started.elapsed() < keep_for {
        if !killed && started.elapsed() >= Duration::from_millis(ttl_ms / 2) {
            c.kill(victim);
            killed = true;
        }
        requests
            .send(pb::LeaseKeepAliveRequest { id: kept.id })
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), answers.message()).await {
            Ok(Ok(Some(a))) => {
                assert_eq!(
                    a.ttl_ms, ttl_ms,
                    "the kept lease is gone after {renewed} renewals"
                );
                renewed += 1;
            }
            // The leader died under a renewal: open another stream and go on.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                answers = leases(&c, via)
                    .await
                    .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                requests = tx;
                continue;
            }
        }
        tokio::time::sleep(renew_every).await;
    }
    assert!(renewed >= 3, "only {renewed} renewals were answered");
    assert_eq!(
        value_at(&c, via, subject_key).await.as_deref(),
        Some("alive")
    );

    // The unrenewed lease of the same group expired across the leader change, later than a
    // quiet one may (the new leader extends every lease by an election timeout) but not
    // kept alive for ever.
    let bound = Duration::from_secs(90);
    let took = await_deleted(&c, via, "{kept}:dropped", dropped_at, bound).await;
    eprintln!("an unrenewed lease expired {took:?} after its grant, across a leader kill");
    assert!(
        took >= Duration::from_millis(ttl_ms),
        "expired early: {took:?}"
    );

    // The killed node restarts with the kept lease and its key, from its own store and WAL.
    c.spawn(victim);
    c.await_ready().await;
    let t = ttl(&c, victim, kept.id).await.unwrap();
    assert!(t.found, "the restarted node lost the lease");
    assert_eq!(t.lease.unwrap().keys, vec![subject_key.as_bytes().to_vec()]);
    let list = leases(&c, victim)
        .await
        .list(pb::LeaseListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.leases.iter().any(|l| l.id == kept.id));
    assert!(!list.leases.iter().any(|l| l.id == dropped.id));
}

/// A `calm` client process against node 1, its stdout read line by line on a thread.
struct CliProcess {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl CliProcess {
    fn start(c: &Cluster, args: &[&str]) -> CliProcess {
        // The client flags go first: after `--`, everything is the locked command's.
        let mut child = Command::new(env!("CARGO_BIN_EXE_calm"))
            .args(&args[..1])
            .args(["-w", "json", "--endpoints", &c.nodes[0].client.to_string()])
            .args(&args[1..])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        CliProcess { child, lines }
    }

    /// The next JSON line it prints, within `timeout`.
    fn next(&self, timeout: Duration) -> Option<serde_json::Value> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
    }

    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn interrupt(&self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calm_lock_serializes_holders_with_growing_fencing_tokens_and_calm_elect_hands_over() {
    let c = Cluster::start(3, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("holders.log");
    // Three holders, each appending its token, sleeping, then appending it again: held
    // one at a time, the log is pairs of equal tokens, growing.
    let script = format!(
        "echo start $CALM_LOCK_FENCING_TOKEN >> {0}; sleep 0.5; echo end $CALM_LOCK_FENCING_TOKEN >> {0}",
        log.display()
    );
    let mut holders: Vec<CliProcess> = (0..3)
        .map(|_| {
            CliProcess::start(
                &c,
                &[
                    "lock",
                    "{jobs}:nightly",
                    "--ttl",
                    "3s",
                    "--",
                    "sh",
                    "-c",
                    &script,
                ],
            )
        })
        .collect();
    for h in &mut holders {
        assert_eq!(h.wait(Duration::from_secs(60)), Some(0), "a holder failed");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<(&str, u64)> = text
        .lines()
        .map(|l| {
            let (what, token) = l.split_once(' ').unwrap();
            (what, token.parse().unwrap())
        })
        .collect();
    assert_eq!(lines.len(), 6, "{text}");
    for pair in lines.chunks(2) {
        assert_eq!(
            (pair[0].0, pair[1].0),
            ("start", "end"),
            "holders interleaved:\n{text}"
        );
        assert_eq!(pair[0].1, pair[1].1, "holders interleaved:\n{text}");
    }
    assert!(
        lines.windows(3).step_by(2).all(|w| w[0].1 < w[2].1),
        "fencing tokens did not grow:\n{text}"
    );
    assert_eq!(
        value_at(&c, 2, "{jobs}:nightly").await,
        None,
        "released on exit"
    );

    // CMD's exit code is the command's; a revoked lease stops CMD and exits 1.
    let mut failing = CliProcess::start(&c, &["lock", "{jobs}:x", "--", "sh", "-c", "exit 7"]);
    assert_eq!(failing.wait(Duration::from_secs(30)), Some(7));
    let mut sleeper = CliProcess::start(
        &c,
        &["lock", "{jobs}:x", "--ttl", "3s", "--", "sleep", "60"],
    );
    let held = sleeper
        .next(Duration::from_secs(30))
        .expect("the lock was reported held");
    let lease = u64::from_str_radix(held["lease"].as_str().unwrap(), 16).unwrap();
    leases(&c, 2)
        .await
        .revoke(pb::LeaseRevokeRequest { id: lease })
        .await
        .unwrap();
    assert_eq!(
        sleeper.wait(Duration::from_secs(20)),
        Some(1),
        "the lost lock was not noticed"
    );

    // Elections: a listener sees a, then b once a resigns (Ctrl-C).
    let listener = CliProcess::start(&c, &["elect", "--listen", "{svc}:leader"]);
    assert_eq!(
        listener.next(Duration::from_secs(30)).unwrap()["leader"],
        serde_json::Value::Null
    );
    let mut a = CliProcess::start(&c, &["elect", "{svc}:leader", "a", "--ttl", "3s"]);
    let elected_a = a.next(Duration::from_secs(30)).expect("a was elected");
    assert_eq!(elected_a["leader"], "a");
    assert_eq!(
        listener.next(Duration::from_secs(30)).unwrap()["leader"],
        "a"
    );
    let mut b = CliProcess::start(&c, &["elect", "{svc}:leader", "b", "--ttl", "3s"]);
    assert!(
        b.next(Duration::from_secs(2)).is_none(),
        "b was elected while a leads"
    );
    a.interrupt();
    assert_eq!(a.wait(Duration::from_secs(20)), Some(0));
    let elected_b = b
        .next(Duration::from_secs(30))
        .expect("b was elected after a resigned");
    assert_eq!(elected_b["leader"], "b");
    assert!(elected_b["fencing_token"].as_u64() > elected_a["fencing_token"].as_u64());
    // The listener may see the gap between them (no leader) or not, then b.
    let mut seen = listener.next(Duration::from_secs(30)).unwrap();
    if seen["leader"].is_null() {
        seen = listener.next(Duration::from_secs(30)).unwrap();
    }
    assert_eq!(seen["leader"], "b");
    b.interrupt();
    assert_eq!(b.wait(Duration::from_secs(20)), Some(0));
}
