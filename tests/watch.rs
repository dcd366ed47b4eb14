//! `Kv.Watch` against real processes: a watcher sees every change of its prefix on both
//! paths (Raft-ordered puts, fast-path adds taken on other nodes); after its node is killed
//! with SIGKILL it resumes with its last token on another node and gets every later change
//! exactly once; filters, previous values and progress responses; a token older than what
//! a node keeps is OUT_OF_RANGE and bad requests are INVALID_ARGUMENT.

mod support;

use calm::api::pb;
use std::collections::BTreeSet;
use std::time::Duration;
use support::{Cluster, op, write};
use tonic::Streaming;

/// How long a test waits for events it expects before failing.
const EVENTS_WAIT: Duration = Duration::from_secs(30);

/// What identifies an event across nodes: its source and key.
type EventId = (u64, u64, u64, u64, Vec<u8>);

fn id_of(e: &pb::Event) -> EventId {
    (e.origin, e.seq, e.group, e.index, e.key.clone())
}

async fn open(
    c: &Cluster,
    at: usize,
    req: pb::WatchRequest,
) -> (Streaming<pb::WatchResponse>, Vec<u8>) {
    let mut stream = c.kv(at).await.watch(req).await.unwrap().into_inner();
    let created = stream.message().await.unwrap().expect("a created response");
    assert!(created.created && created.events.is_empty(), "{created:?}");
    (stream, created.token)
}

/// Read responses until `n` events arrived (whole responses); the events and the last token.
async fn events(stream: &mut Streaming<pb::WatchResponse>, n: usize) -> (Vec<pb::Event>, Vec<u8>) {
    let mut got = Vec::new();
    let mut token = Vec::new();
    let read = async {
        while got.len() < n {
            let r = stream.message().await.unwrap().expect("the stream goes on");
            got.extend(r.events);
            token = r.token;
        }
    };
    tokio::time::timeout(EVENTS_WAIT, read)
        .await
        .unwrap_or_else(|_| panic!("only {} of {n} events arrived", got.len()));
    (got, token)
}

/// Nothing more arrives for a while (no duplicate, no stray event).
async fn quiet(stream: &mut Streaming<pb::WatchResponse>) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        let r = r.unwrap().expect("the stream goes on");
        assert!(r.events.is_empty(), "unexpected events: {:?}", r.events);
    }
}

/// 10 register puts (Raft) and 20 counter adds taken on nodes 2 and 3 (fast path after the
/// counter's creation), all under `w/`, in round `round`.
async fn writes(c: &Cluster, round: usize) {
    let mut kv2 = c.kv(2).await;
    let mut kv3 = c.kv(3).await;
    for i in 0..10 {
        write(
            &mut kv2,
            &format!("w/r{round}-{i}"),
            op::put(&format!("v{i}")),
        )
        .await
        .unwrap();
        write(&mut kv2, "w/count", op::add(1)).await.unwrap();
        write(&mut kv3, "w/count", op::add(1)).await.unwrap();
    }
    write(&mut kv3, "outside", op::put("x")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_resumes_on_another_node_after_a_kill_with_no_gap_or_duplicate() {
    let mut c = Cluster::start(3, &[]).await;
    let watch = pb::WatchRequest {
        prefix: b"w/".to_vec(),
        ..Default::default()
    };
    let (mut on_1, _) = open(&c, 1, watch.clone()).await;
    writes(&c, 1).await;
    let (first, token) = events(&mut on_1, 30).await;
    assert_eq!(first.len(), 30, "one event per change: {first:?}");
    quiet(&mut on_1).await;

    c.kill(1);
    writes(&c, 2).await;
    let (mut on_2, _) = open(
        &c,
        2,
        pb::WatchRequest {
            start_token: token,
            ..watch
        },
    )
    .await;
    let (second, _) = events(&mut on_2, 30).await;
    quiet(&mut on_2).await;

    let all: Vec<&pb::Event> = first.iter().chain(&second).collect();
    let ids: BTreeSet<EventId> = all.iter().map(|e| id_of(e)).collect();
    assert_eq!(ids.len(), 60, "no event twice across the resume");
    for round in 1..=2 {
        for i in 0..10 {
            let key = format!("w/r{round}-{i}").into_bytes();
            let puts: Vec<_> = all.iter().filter(|e| e.key == key).collect();
            assert_eq!(puts.len(), 1, "{key:?} once");
            assert!(puts[0].group > 0, "a register put is a Raft entry's change");
        }
    }
    let counts: Vec<i64> = all
        .iter()
        .filter(|e| e.key == b"w/count")
        .map(|e| match e.value.as_ref().and_then(|v| v.kind.as_ref()) {
            Some(pb::value::Kind::Counter(n)) => *n,
            other => panic!("a counter event holds the counter: {other:?}"),
        })
        .collect();
    assert_eq!(counts.len(), 40, "every add, once");
    assert_eq!(counts.iter().max(), Some(&40));
    // Each origin's adds arrive in sequence order, across the resume too.
    for origin in [2, 3] {
        let seqs: Vec<u64> = all
            .iter()
            .filter(|e| e.key == b"w/count" && e.origin == origin)
            .map(|e| e.seq)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "n{origin}: {seqs:?}");
    }
    assert!(all.iter().all(|e| e.key.starts_with(b"w/")));
    c.stop(2);
    c.stop(3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_prev_values_progress_and_refusals() {
    let mut c = Cluster::start(3, &[("CALM_WATCH__RETAIN_EVENTS", "16")]).await;
    let mut kv = c.kv(1).await;
    write(&mut kv, "k", op::put("one")).await.unwrap();
    // A watch from now starts at what node 2 applied: make that include the first put.
    let first = support::get(&mut c.kv(2).await, "k", pb::Consistency::Linearizable).await;
    assert_eq!(support::register(&first.unwrap()).as_deref(), Some("one"));

    // One key, with previous values, deletes left out, progress when idle.
    let (mut stream, old_token) = open(
        &c,
        2,
        pb::WatchRequest {
            key: b"k".to_vec(),
            prev_value: true,
            exclude: vec![pb::EventKind::Delete as i32],
            progress_ms: 200,
            ..Default::default()
        },
    )
    .await;
    write(&mut kv, "k/other", op::put("not this key"))
        .await
        .unwrap();
    write(&mut kv, "k", op::put("two")).await.unwrap();
    write(&mut kv, "k", op::delete()).await.unwrap();
    write(&mut kv, "k", op::put("three")).await.unwrap();
    let (got, _) = events(&mut stream, 2).await;
    let registers: Vec<(Option<String>, Option<String>)> = got
        .iter()
        .map(|e| {
            let text =
                |v: &Option<pb::Value>| support::register(&v.as_ref().and_then(|v| v.kind.clone()));
            (text(&e.prev_value), text(&e.value))
        })
        .collect();
    assert_eq!(
        registers,
        [
            (Some("one".into()), Some("two".into())),
            (None, Some("three".into()))
        ]
    );
    assert!(got.iter().all(|e| e.kind == pb::EventKind::Put as i32));
    let progress = tokio::time::timeout(EVENTS_WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        progress.progress && progress.events.is_empty(),
        "{progress:?}"
    );

    // The node keeps 16 events: a token from before 20 more is too old.
    for i in 0..20 {
        write(&mut kv, &format!("more/{i}"), op::put("x"))
            .await
            .unwrap();
    }
    let status = c
        .kv(2)
        .await
        .watch(pb::WatchRequest {
            start_token: old_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("keeps the last 16"), "{status:?}");

    let bad = [
        pb::WatchRequest {
            key: b"a".to_vec(),
            prefix: b"a".to_vec(),
            ..Default::default()
        },
        pb::WatchRequest {
            start_token: vec![200, 1, 2],
            ..Default::default()
        },
        pb::WatchRequest {
            progress_ms: 1,
            ..Default::default()
        },
    ];
    for req in bad {
        let status = c.kv(3).await.watch(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    for i in 1..=3 {
        c.stop(i);
    }
}
