//! `Kv.Scan` against real processes: every key of a prefix or range in order, page after
//! page, on every consistency level and after a restart; deleted keys hidden; keys not yet
//! persisted found; bad requests refused with INVALID_ARGUMENT; and LINEARIZABLE pages that
//! say `atomic` really are one cut of every group while writes go on.

mod support;

use calm::api::pb::{self, Consistency};
use std::collections::BTreeMap;
use std::time::Duration;
use support::{Cluster, await_leaders_balanced, op, write};

/// Persist every few milliseconds, so scans meet persists ending all the time.
const PERSIST_OFTEN: (&str, &str) = ("CALM_STORAGE__PERSIST_INTERVAL_MS", "5");

fn scan_request(prefix: &str, consistency: Consistency, limit: u32) -> pb::ScanRequest {
    pb::ScanRequest {
        prefix: prefix.into(),
        limit,
        consistency: consistency as i32,
        ..Default::default()
    }
}

/// Every page of `req` at node `at`: the entries, and whether each page was atomic.
async fn scan_all(
    c: &Cluster,
    at: usize,
    mut req: pb::ScanRequest,
) -> (Vec<pb::KeyValue>, Vec<bool>) {
    let mut kv = c.kv(at).await;
    let (mut entries, mut atomic) = (Vec::new(), Vec::new());
    for _ in 0..1_000 {
        let page = kv.scan(req.clone()).await.unwrap().into_inner();
        assert!(page.entries.len() <= req.limit.max(1) as usize || req.limit == 0);
        entries.extend(page.entries);
        atomic.push(page.atomic);
        if page.next_page_token.is_empty() {
            return (entries, atomic);
        }
        req.page_token = page.next_page_token;
    }
    panic!("the scan did not end within 1000 pages");
}

fn keys(entries: &[pb::KeyValue]) -> Vec<String> {
    entries
        .iter()
        .map(|e| String::from_utf8(e.key.clone()).unwrap())
        .collect()
}

fn register_of(e: &pb::KeyValue) -> Option<String> {
    match e.value.as_ref()?.kind.as_ref()? {
        pb::value::Kind::Register(r) => Some(String::from_utf8(r.value.clone()).unwrap()),
        _ => None,
    }
}

async fn batch(c: &Cluster, at: usize, ops: Vec<(String, pb::Op)>) {
    let ops = ops
        .into_iter()
        .map(|(key, op)| pb::WriteRequest {
            key: key.into_bytes(),
            op: Some(op),
            token: Vec::new(),
            lease: 0,
        })
        .collect();
    let results = c
        .kv(at)
        .await
        .batch(pb::BatchRequest { ops })
        .await
        .unwrap()
        .into_inner()
        .results;
    for r in results {
        assert!(
            matches!(r.result, Some(pb::batch_result::Result::Ok(_))),
            "{r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_page_every_key_of_a_range_in_order_at_every_consistency() {
    let mut c = Cluster::start(3, &[PERSIST_OFTEN]).await;
    await_leaders_balanced(&c).await;
    const REGISTERS: usize = 2_500;
    for chunk in (0..REGISTERS).collect::<Vec<_>>().chunks(500) {
        let ops = chunk
            .iter()
            .map(|i| (format!("s/{i:05}"), op::put(&format!("v{i}"))))
            .collect();
        batch(&c, 1, ops).await;
    }
    // Other types, a deleted range, and keys outside the prefix.
    let mut others: Vec<(String, pb::Op)> = (0..20)
        .map(|i| (format!("s/c{i:02}"), op::add(i + 1)))
        .collect();
    others.push(("s/set".into(), op::sadd("x")));
    others.push(("t/outside".into(), op::put("no")));
    others.push(("s".into(), op::put("the prefix itself is not under s/")));
    batch(&c, 1, others).await;
    let deletes = (10..20)
        .map(|i| (format!("s/{i:05}"), op::delete()))
        .collect();
    batch(&c, 1, deletes).await;
    let mut expected: Vec<String> = (0..REGISTERS)
        .filter(|i| !(10..20).contains(i))
        .map(|i| format!("s/{i:05}"))
        .chain((0..20).map(|i| format!("s/c{i:02}")))
        .chain(["s/set".to_string()])
        .collect();
    expected.sort();

    // LINEARIZABLE on a node that took none of the writes, in pages of 700.
    let (entries, atomic) =
        scan_all(&c, 2, scan_request("s/", Consistency::Linearizable, 700)).await;
    assert_eq!(keys(&entries), expected);
    assert!(atomic.len() >= 4, "{} pages", atomic.len());
    assert!(
        atomic.iter().all(|a| *a),
        "with no write going on every page is one cut: {atomic:?}"
    );
    let by_key: BTreeMap<String, &pb::KeyValue> =
        keys(&entries).into_iter().zip(entries.iter()).collect();
    assert_eq!(register_of(by_key["s/00042"]).as_deref(), Some("v42"));
    assert_eq!(
        by_key["s/c03"].value.as_ref().unwrap().kind,
        Some(pb::value::Kind::Counter(4))
    );

    // The same pages as one stream; a bad request is the call's error.
    let mut stream = c
        .kv(3)
        .await
        .scan_stream(scan_request("s/", Consistency::Linearizable, 500))
        .await
        .unwrap()
        .into_inner();
    let (mut streamed, mut pages) = (Vec::new(), 0);
    while let Some(page) = stream.message().await.unwrap() {
        assert!(page.entries.len() <= 500);
        streamed.extend(page.entries);
        pages += 1;
    }
    assert_eq!(keys(&streamed), expected);
    assert!(pages >= 5, "{pages} pages");
    let e = c
        .kv(3)
        .await
        .scan_stream(scan_request("s/", Consistency::Linearizable, 20_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Keys only, counts, a [start, end) range, the default page.
    let mut req = scan_request("s/", Consistency::Linearizable, 0);
    req.keys_only = true;
    let (entries, _) = scan_all(&c, 3, req).await;
    assert_eq!(keys(&entries), expected);
    assert!(entries.iter().all(|e| e.value.is_none()));
    let mut kv = c.kv(3).await;
    let mut count = scan_request("s/", Consistency::Linearizable, 0);
    count.count_only = true;
    let counted = kv.scan(count.clone()).await.unwrap().into_inner();
    assert_eq!(counted.count, expected.len() as u64);
    assert!(counted.entries.is_empty() && counted.next_page_token.is_empty());
    let range = pb::ScanRequest {
        start: b"s/00100".to_vec(),
        end: b"s/00200".to_vec(),
        count_only: true,
        ..Default::default()
    };
    assert_eq!(kv.scan(range).await.unwrap().into_inner().count, 100);

    // CAUSAL: a fast-path add taken on node 1 is in node 3's scan with its token.
    let mut kv1 = c.kv(1).await;
    let w = write(&mut kv1, "s/zz", op::add(7)).await.unwrap();
    let mut causal = scan_request("s/zz", Consistency::Causal, 10);
    causal.token = w.token;
    let page = kv.scan(causal).await.unwrap().into_inner();
    assert_eq!(keys(&page.entries), ["s/zz"]);
    assert_eq!(
        page.entries[0].value.as_ref().unwrap().kind,
        Some(pb::value::Kind::Counter(7))
    );
    expected.push("s/zz".into());

    // SERIALIZABLE: node 3's replica as it is, which has every key by now.
    let (entries, atomic) =
        scan_all(&c, 3, scan_request("s/", Consistency::Serializable, 999)).await;
    assert_eq!(keys(&entries), expected);
    assert!(
        atomic.iter().all(|a| !a),
        "only LINEARIZABLE pages claim a cut"
    );

    // After a restart the keys come from the state store.
    c.stop(2);
    c.spawn(2);
    c.await_ready().await;
    let (entries, _) = scan_all(&c, 2, scan_request("s/", Consistency::Linearizable, 1_000)).await;
    assert_eq!(keys(&entries), expected);

    // Bad requests: INVALID_ARGUMENT saying what to fix.
    let refused = |req: pb::ScanRequest| {
        let mut kv = kv.clone();
        async move {
            let e = kv.scan(req).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            e.message().to_string()
        }
    };
    let mut both = scan_request("s/", Consistency::Linearizable, 0);
    both.start = b"a".to_vec();
    assert!(refused(both).await.contains("both a prefix"));
    let backwards = pb::ScanRequest {
        start: b"b".to_vec(),
        end: b"a".to_vec(),
        ..Default::default()
    };
    assert!(refused(backwards).await.contains("not after its start"));
    assert!(
        refused(scan_request("s/", Consistency::Linearizable, 20_000))
            .await
            .contains("at most")
    );
    let mut foreign = scan_request("t/", Consistency::Linearizable, 0);
    foreign.page_token = c
        .kv(3)
        .await
        .scan(scan_request("s/", Consistency::Linearizable, 5))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(refused(foreign).await.contains("page_token"));
    let mut bad = scan_request("s/", Consistency::Linearizable, 0);
    bad.consistency = 9;
    assert!(refused(bad).await.contains("consistency"));
    let mut bad = scan_request("s/", Consistency::Causal, 0);
    bad.token = b"junk".to_vec();
    refused(bad).await;
}

/// Writer: `a = i`, then `b = i` (keys of two groups), one after the other. A LINEARIZABLE
/// page that says `atomic` is one instant of both groups, so it never shows `b = i` without
/// `a >= i`; every page shows at least what was acknowledged before it was asked for. The
/// scanning node leads b's group and follows a's: it applies b at once and learns of a's
/// commit a little later, which is when a page that is not one cut shows b without a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_pages_are_one_cut_while_writes_go_on() {
    let c = Cluster::start(3, &[PERSIST_OFTEN]).await;
    await_leaders_balanced(&c).await;
    let a = c
        .key_led_by(3, "cut/a", 64, "a key of a group node 3 leads")
        .await;
    let b = c
        .key_led_by(2, "cut/b", 64, "a key of a group node 2 leads")
        .await;
    const WRITES: i64 = 150;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let writer = {
        let (c_kv, a, b, acked) = (c.kv(1).await, a.clone(), b.clone(), acked.clone());
        tokio::spawn(async move {
            let mut kv = c_kv;
            for i in 1..=WRITES {
                write(&mut kv, &a, op::put(&i.to_string())).await.unwrap();
                write(&mut kv, &b, op::put(&i.to_string())).await.unwrap();
                acked.store(i, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let value = |entries: &[pb::KeyValue], key: &str| -> i64 {
        entries
            .iter()
            .find(|e| e.key == key.as_bytes())
            .and_then(register_of)
            .map_or(0, |v| v.parse().unwrap())
    };
    let mut kv = c.kv(2).await;
    let (mut pages, mut atomic_pages) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !writer.is_finished() && tokio::time::Instant::now() < deadline {
        let before = acked.load(std::sync::atomic::Ordering::SeqCst);
        let page = kv
            .scan(scan_request("cut/", Consistency::Linearizable, 10))
            .await
            .unwrap()
            .into_inner();
        let (va, vb) = (value(&page.entries, &a), value(&page.entries, &b));
        assert!(
            va >= before && vb >= before,
            "a page missed an acknowledged write: a={va} b={vb}, {before} acknowledged before"
        );
        if page.atomic {
            atomic_pages += 1;
            assert!(
                vb <= va,
                "an atomic page showed b={vb}, written after a={}, without a={vb}",
                va
            );
        }
        pages += 1;
    }
    writer.await.unwrap();
    let page = kv
        .scan(scan_request("cut/", Consistency::Linearizable, 10))
        .await
        .unwrap()
        .into_inner();
    assert!(page.atomic, "with the writes over, a page is one cut");
    assert_eq!(
        (value(&page.entries, &a), value(&page.entries, &b)),
        (WRITES, WRITES)
    );
    eprintln!("{pages} pages during the writes, {atomic_pages} of them atomic");
}
