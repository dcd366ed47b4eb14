//! Safety rules live in the metadata Raft group: a new cluster takes its configured rules
//! there, an operator replaces them naming the version they replace, and every node switches
//! a key's mode at the same log position, also across restarts. Driven through gRPC only.

mod support;

use calm::api::pb;
use std::time::{Duration, Instant};
use support::{Cluster, write};
use tonic::Code;

fn add(delta: i64) -> pb::Op {
    pb::Op {
        kind: Some(pb::op::Kind::Add(pb::Add { delta })),
    }
}

async fn rules(c: &Cluster, i: usize) -> pb::Rules {
    c.admin(i)
        .await
        .get_rules(pb::GetRulesRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Wait (bounded) until node `i` has applied rules version `version`.
async fn await_rules_version(c: &Cluster, i: usize, version: u64) {
    let started = Instant::now();
    while rules(c, i).await.version < version {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node {i} did not reach rules version {version}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn path_of(c: &Cluster, i: usize, key: &str) -> pb::Path {
    let mut kv = c.kv(i).await;
    let r = write(&mut kv, key, add(1)).await.unwrap();
    pb::Path::try_from(r.path).unwrap()
}

const STRICT_HITS: &str =
    "default_mode = \"hybrid\"\n[[rules]]\npattern = \"hits\"\nmode = \"strict\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_switches_a_key_from_hybrid_to_strict_on_every_node() {
    let mut c = Cluster::start(3, &[]).await;
    // The configured (embedded) rules become version 1 in the metadata group.
    for i in 1..=3 {
        await_rules_version(&c, i, 1).await;
    }
    assert!(rules(&c, 2).await.toml.contains("stock:*"));
    // Hybrid: the first add creates the key through Raft, later ones take the fast path.
    assert_eq!(path_of(&c, 1, "hits").await, pb::Path::Consensus);
    // A node admits on the fast path once it applied the creation (the add was acknowledged
    // when the group's leader applied it).
    for i in 1..=3 {
        support::await_value(
            &c,
            i,
            "hits",
            pb::Consistency::Serializable,
            Duration::from_secs(30),
            |v| v.is_some(),
            |found| *found,
        )
        .await;
    }
    for i in 1..=3 {
        assert_eq!(path_of(&c, i, "hits").await, pb::Path::Fast, "node {i}");
    }

    // A stale version is refused and changes nothing.
    let mut admin = c.admin(2).await;
    let stale = admin
        .set_rules(pb::SetRulesRequest {
            expected_version: 0,
            toml: STRICT_HITS.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("version 1"), "{}", stale.message());
    // Invalid rules are refused before they reach the log.
    let bad = admin
        .set_rules(pb::SetRulesRequest {
            expected_version: 1,
            toml: "default_mode = \"hybrid\"\n[[rules]]\npattern = \"[\"\nmode = \"strict\"\n"
                .into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert_eq!(rules(&c, 1).await.version, 1);

    let set = admin
        .set_rules(pb::SetRulesRequest {
            expected_version: 1,
            toml: STRICT_HITS.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.version, 2);
    for i in 1..=3 {
        await_rules_version(&c, i, 2).await;
        assert_eq!(
            path_of(&c, i, "hits").await,
            pb::Path::Consensus,
            "node {i}"
        );
    }
    let explained = c
        .admin(3)
        .await
        .explain(pb::ExplainRequest {
            key: b"hits".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.mode, "strict");

    // The rules survive a restart (they are the metadata group's state, not the config).
    c.kill(3);
    c.spawn(3);
    c.await_ready().await;
    await_rules_version(&c, 3, 2).await;
    assert_eq!(path_of(&c, 3, "hits").await, pb::Path::Consensus);
    // Every add was applied exactly once: 1 creation + 3 fast + 4 strict.
    let mut kv = c.kv(2).await;
    let v = support::get(&mut kv, "hits", pb::Consistency::Linearizable)
        .await
        .unwrap();
    assert!(matches!(v, Some(pb::value::Kind::Counter(8))), "{v:?}");
}
