//! Subjects and hash tags with real `calm serve` processes: keys with one hash tag share a
//! group, explain shows the subject, the rule is recorded per cluster, a node whose record
//! disagrees is refused by its peers, and switching an old cluster's rule is refused while
//! a key it holds would move.

mod support;

use calm::api::pb;
use calm_raft::consensus::GroupMap;
use std::time::{Duration, Instant};
use support::{Cluster, get, put, register, write_retrying};

async fn explain(c: &Cluster, node: usize, key: &str) -> pb::ExplainResponse {
    c.admin(node)
        .await
        .explain(pb::ExplainRequest {
            key: key.as_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn await_log(c: &Cluster, node: usize, text: &str) {
    let started = Instant::now();
    while !c.log(node).contains(text) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node {node} never logged {text:?}:\n{}",
            c.log(node)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_one_hash_tag_share_a_group_and_the_rule_is_fixed_per_cluster() {
    let mut c = Cluster::start(3, &[]).await;
    let status = c.status(1).await.unwrap();
    assert!(status.hash_tags, "a new cluster has hash tags");
    let groups = status.groups.len() as u64 - 1;
    let map = GroupMap::new(groups);
    let old = map.with_hash_tags(false);
    // A tagged key whose group differs with and without the tag (so the switch below has
    // something to refuse), and a sibling with the same tag.
    let (tag, balance) = (0..100)
        .map(|i| (format!("user:{i}"), format!("{{user:{i}}}:balance")))
        .find(|(_, k)| map.group_of(k.as_bytes()) != old.group_of(k.as_bytes()))
        .expect("some tagged key moves");
    let history = format!("{{{tag}}}:history");
    for key in [&balance, &history] {
        write_retrying(&c, 1, key, put("1")).await.unwrap();
        let e = explain(&c, 2, key).await;
        assert_eq!(e.subject, tag.as_bytes(), "{key}");
        assert_eq!(e.group, map.group_of(tag.as_bytes()), "{key}");
    }
    let plain = explain(&c, 3, "plain").await;
    assert_eq!(plain.subject, b"plain");
    assert_eq!(
        plain.group,
        old.group_of(b"plain"),
        "untagged keys map as before"
    );
    let text = std::fs::read_to_string(c.data_dir(1).join("cluster.toml")).unwrap();
    assert!(text.contains("hash_tags = true"), "{text}");

    // Node 3 restarted on a record without the rule (as a cluster from before hash tags
    // has): its peers refuse it, and the cluster keeps working on the other two.
    c.stop(3);
    let record = c.data_dir(3).join("cluster.toml");
    let recorded = std::fs::read_to_string(&record).unwrap();
    std::fs::write(&record, recorded.replace("hash_tags = true\n", "")).unwrap();
    c.spawn(3);
    await_log(&c, 1, "maps keys to groups differently").await;
    write_retrying(&c, 1, &balance, put("2")).await.unwrap();
    assert!(!c.status(3).await.unwrap().hash_tags);

    // Opting that node in is refused while it holds a key that would move, naming it.
    c.stop(3);
    let mut opt_in = c.command(3);
    opt_in.env("CALM_RAFT__HASH_TAGS", "true");
    c.spawn_command(3, opt_in);
    let exit = c
        .wait_exit(3, Duration::from_secs(30))
        .expect("node 3 refuses to switch");
    assert_eq!(exit.code(), Some(1));
    let log = c.log(3);
    assert!(
        log.contains("would move to another group") && log.contains(&balance),
        "{log}"
    );
    assert!(
        !std::fs::read_to_string(&record)
            .unwrap()
            .contains("hash_tags")
    );

    // With its record restored it rejoins and catches up.
    std::fs::write(&record, &recorded).unwrap();
    c.spawn(3);
    c.await_ready().await;
    let started = Instant::now();
    loop {
        let v = get(&mut c.kv(3).await, &balance, pb::Consistency::Linearizable).await;
        if matches!(&v, Ok(v) if register(v).as_deref() == Some("2")) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{v:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
