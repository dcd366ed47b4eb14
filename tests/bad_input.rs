//! Bad input gets the documented gRPC code (kv.proto, DESIGN.md section 10) and changes
//! nothing: no op, empty and oversized keys, oversized values, the wrong op type for a key
//! or for its rule, CAS in `available` mode, unknown consistency levels, garbage session
//! tokens, oversized batches, inverted bounds, and raw bytes that are not a protobuf message
//! at all. After every refusal the keys read as before on every node and no node holds a key
//! more. Driven through gRPC only (raw bytes through a pass-through codec).

mod support;

use calm::api::pb::{self, Consistency, value::Kind};
use prost::Message;
use prost::bytes::{Buf, BufMut};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::{Cluster, get_with_token, op};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

/// Sends and receives message bytes as they are: lets a test put anything on the wire.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Call `method` (e.g. "/calm.v1.Kv/Write") on node `at` with `body` as the message bytes.
async fn raw_call(
    c: &Cluster,
    at: usize,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(c.channel(at).await);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("not ready: {e}")))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(method),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

async fn write_req(
    c: &Cluster,
    at: usize,
    req: pb::WriteRequest,
) -> Result<pb::WriteResponse, tonic::Status> {
    c.kv(at).await.write(req).await.map(|r| r.into_inner())
}

fn req(key: &[u8], op: pb::Op) -> pb::WriteRequest {
    pb::WriteRequest {
        key: key.to_vec(),
        op: Some(op),
        token: Vec::new(),
        lease: 0,
    }
}

#[track_caller]
fn expect_code<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, code: Code) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            assert!(!s.message().is_empty(), "{what}: refused without a message");
        }
        Ok(v) => panic!("{what} was accepted ({v:?}); expected {code:?}"),
    }
}

/// Every node's linearizable read of `key` (the response, HLC included).
async fn reads(c: &Cluster, key: &[u8]) -> Vec<pb::GetResponse> {
    let mut out = Vec::new();
    for at in 1..=c.nodes.len() {
        let mut kv = c.kv(at).await;
        out.push(
            get_with_token(&mut kv, key, Consistency::Linearizable, &[])
                .await
                .unwrap_or_else(|s| panic!("read {key:?} at node {at}: {s:?}")),
        );
    }
    out
}

async fn key_counts(c: &Cluster) -> Vec<u64> {
    let mut out = Vec::new();
    for at in 1..=c.nodes.len() {
        out.push(c.status(at).await.unwrap().keys);
    }
    out
}

/// Wait (bounded) until every node holds `n` keys.
async fn await_key_counts(c: &Cluster, n: u64) {
    let started = Instant::now();
    loop {
        let counts = key_counts(c).await;
        if counts.iter().all(|&k| k == n) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the nodes hold {counts:?} keys, expected {n} each"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One key per group, found through Explain on node 1.
async fn key_per_group(c: &Cluster, prefix: &str) -> BTreeMap<u64, String> {
    let groups = c.status(1).await.unwrap().groups.len() - 1;
    let mut keys = BTreeMap::new();
    for i in 0..1000 {
        let key = format!("{prefix}{i}");
        let (g, _) = c.leader_of(1, &key).await;
        keys.entry(g).or_insert(key);
        if keys.len() == groups {
            break;
        }
    }
    assert_eq!(keys.len(), groups, "a key for every data group");
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_code_and_changes_nothing() {
    let c = Cluster::start(3, &[]).await;
    support::await_leaders_balanced(&c).await;

    // Keys of every kind that bad input must leave alone.
    let mut kv = c.kv(1).await;
    let setup: [(&str, pb::Op); 6] = [
        ("bad:reg", op::put("keep")),
        ("bad:ctr", op::add(7)),
        ("bad:set", op::sadd("e")),
        ("bad:max", op::raise(4)),
        ("stock:bad", op::set_value(10)),
        ("session:bad", op::put("s1")),
    ];
    for (key, o) in &setup {
        support::write(&mut kv, key, o.clone())
            .await
            .unwrap_or_else(|s| panic!("setup {key}: {s:?}"));
    }
    let before_keys = key_counts(&c).await[0];
    await_key_counts(&c, before_keys).await;
    let mut before = BTreeMap::new();
    for (key, _) in &setup {
        let r = reads(&c, key.as_bytes()).await;
        assert!(r.iter().all(|r| r.found), "{key}: {r:?}");
        assert!(
            r.windows(2).all(|w| w[0].value == w[1].value),
            "{key}: {r:?}"
        );
        before.insert(key.to_string(), r[0].value.clone());
    }
    // Keys bad input would create.
    let never = [
        "bad:new",
        "bad:big",
        "stock:1",
        "session:new",
        "bad:batch",
        "stock:new",
    ];

    // --- No op kind (the oneof unset, or no Op message at all).
    expect_code(
        "op without a kind",
        write_req(&c, 1, req(b"bad:reg", op::none())).await,
        Code::InvalidArgument,
    );
    expect_code(
        "request without an op",
        write_req(
            &c,
            2,
            pb::WriteRequest {
                key: b"bad:new".to_vec(),
                op: None,
                token: Vec::new(),
                lease: 0,
            },
        )
        .await,
        Code::InvalidArgument,
    );

    // --- Keys: empty, one byte over 4096 (writes and reads).
    expect_code(
        "empty key",
        write_req(&c, 3, req(b"", op::put("x"))).await,
        Code::InvalidArgument,
    );
    let long_key = vec![b'k'; 4097];
    expect_code(
        "4097-byte key",
        write_req(&c, 1, req(&long_key, op::put("x"))).await,
        Code::InvalidArgument,
    );
    expect_code(
        "4097-byte key add",
        write_req(&c, 2, req(&long_key, op::add(1))).await,
        Code::InvalidArgument,
    );
    let mut kv3 = c.kv(3).await;
    expect_code(
        "get of a 4097-byte key",
        get_with_token(&mut kv3, &long_key, Consistency::Linearizable, &[]).await,
        Code::InvalidArgument,
    );
    expect_code(
        "get of an empty key",
        get_with_token(&mut kv3, b"", Consistency::Serializable, &[]).await,
        Code::InvalidArgument,
    );

    // --- Values, elements and CAS operands over 1 MiB.
    let big = "v".repeat((1 << 20) + 1);
    expect_code(
        "1 MiB + 1 value on an existing register",
        write_req(&c, 3, req(b"bad:reg", op::put(&big))).await,
        Code::InvalidArgument,
    );
    expect_code(
        "1 MiB + 1 value on a new key",
        write_req(&c, 1, req(b"bad:big", op::put(&big))).await,
        Code::InvalidArgument,
    );
    expect_code(
        "1 MiB + 1 CAS value",
        write_req(&c, 2, req(b"bad:reg", op::cas_value("keep", &big))).await,
        Code::InvalidArgument,
    );
    expect_code(
        "1 MiB + 1 CAS expected value",
        write_req(&c, 3, req(b"bad:reg", op::cas_value(&big, "x"))).await,
        Code::InvalidArgument,
    );
    expect_code(
        "1 MiB + 1 set element",
        write_req(&c, 1, req(b"bad:set", op::sadd(&big))).await,
        Code::InvalidArgument,
    );
    expect_code(
        "1 MiB + 1 set element to remove",
        write_req(&c, 2, req(b"bad:set", op::srem(&big))).await,
        Code::InvalidArgument,
    );

    // --- Malformed CAS conditions.
    expect_code(
        "cas absent = false",
        write_req(
            &c,
            3,
            req(b"bad:reg", op::cas(pb::cas::Expect::Absent(false), "x")),
        )
        .await,
        Code::InvalidArgument,
    );
    expect_code(
        "cas delete with a new value",
        write_req(
            &c,
            1,
            req(
                b"bad:reg",
                pb::Op {
                    kind: Some(pb::op::Kind::Cas(pb::Cas {
                        expect: Some(pb::cas::Expect::Version(1)),
                        new_value: b"x".to_vec(),
                        delete: true,
                    })),
                },
            ),
        )
        .await,
        Code::InvalidArgument,
    );

    // --- The wrong op type for an existing key, from every node.
    let wrong: [(&str, pb::Op); 9] = [
        ("bad:reg", op::add(1)),
        ("bad:reg", op::raise(1)),
        ("bad:reg", op::sadd("x")),
        ("bad:ctr", op::put("x")),
        ("bad:ctr", op::sadd("x")),
        ("bad:ctr", op::set_bounds(0, 10)),
        ("bad:set", op::cas_version(1, "x")),
        ("bad:max", op::add(1)),
        ("bad:max", op::put("x")),
    ];
    for (i, (key, o)) in wrong.iter().enumerate() {
        expect_code(
            &format!("{o:?} on {key}"),
            write_req(&c, 1 + i % 3, req(key.as_bytes(), o.clone())).await,
            Code::FailedPrecondition,
        );
    }
    // --- Ops contradicting the key's rule type (`stock:*` are bounded counters).
    for (i, (key, o)) in [
        ("stock:1", op::put("x")),
        ("stock:1", op::sadd("x")),
        ("stock:1", op::raise(1)),
        ("stock:bad", op::put("x")),
        ("stock:bad", op::cas_absent("x")),
    ]
    .iter()
    .enumerate()
    {
        expect_code(
            &format!("{o:?} on {key}"),
            write_req(&c, 1 + i % 3, req(key.as_bytes(), o.clone())).await,
            Code::FailedPrecondition,
        );
    }
    // --- CAS in `available` mode (`session:*`), on an existing key and a new one.
    for (i, o) in [
        op::cas_value("s1", "s2"),
        op::cas_version(1, "s2"),
        op::cas_absent("s2"),
    ]
    .into_iter()
    .enumerate()
    {
        expect_code(
            &format!("{o:?} on session:bad"),
            write_req(&c, 1 + i, req(b"session:bad", o.clone())).await,
            Code::FailedPrecondition,
        );
        expect_code(
            &format!("{o:?} on session:new"),
            write_req(&c, 1 + i, req(b"session:new", o)).await,
            Code::FailedPrecondition,
        );
    }

    // --- Bounds with min > max.
    expect_code(
        "set_bounds min > max",
        write_req(&c, 2, req(b"stock:bad", op::set_bounds(10, 5))).await,
        Code::InvalidArgument,
    );
    expect_code(
        "set_bounds min > max on a new key",
        write_req(&c, 3, req(b"stock:new", op::set_bounds(1, -1))).await,
        Code::InvalidArgument,
    );
    // --- A counter add that would overflow i64.
    expect_code(
        "add overflowing i64",
        write_req(&c, 1, req(b"bad:ctr", op::add(i64::MAX))).await,
        Code::InvalidArgument,
    );

    // --- Reads: unknown consistency values, garbage session tokens.
    for (i, level) in [4, 99, -1, i32::MAX].into_iter().enumerate() {
        let r = c
            .kv(1 + i % 3)
            .await
            .get(pb::GetRequest {
                key: b"bad:reg".to_vec(),
                consistency: level,
                token: Vec::new(),
            })
            .await;
        expect_code(&format!("consistency {level}"), r, Code::InvalidArgument);
    }
    let garbage: [Vec<u8>; 4] = [
        vec![9, 1, 2],
        vec![
            1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ],
        b"not a token".to_vec(),
        vec![1; 64 * 1024 + 1],
    ];
    for (i, token) in garbage.iter().enumerate() {
        let mut kv = c.kv(1 + i % 3).await;
        expect_code(
            &format!("session token {:?}", &token[..token.len().min(12)]),
            get_with_token(&mut kv, b"bad:ctr", Consistency::Causal, token).await,
            Code::InvalidArgument,
        );
    }

    // The same garbage as a write's session token: refused before the op is admitted.
    for (i, token) in garbage.iter().enumerate() {
        let mut r = req(b"bad:ctr", op::add(1));
        r.token = token.clone();
        expect_code(
            &format!("write session token {:?}", &token[..token.len().min(12)]),
            write_req(&c, 1 + i % 3, r).await,
            Code::InvalidArgument,
        );
    }

    // --- A Batch over 10,000 ops: refused as a whole, none applied.
    let batch = pb::BatchRequest {
        ops: (0..10_001)
            .map(|i| {
                req(
                    if i % 2 == 0 { b"bad:batch" } else { b"bad:ctr" },
                    op::add(1),
                )
            })
            .collect(),
    };
    expect_code(
        "a batch of 10,001 ops",
        c.kv(2).await.batch(batch).await,
        Code::InvalidArgument,
    );

    // --- Raw bytes that are no WriteRequest: an error, and the node keeps serving.
    // A well-formed request through the same raw path works (the harness is sound).
    let ok = raw_call(
        &c,
        3,
        "/calm.v1.Kv/Write",
        req(b"bad:raw-ok", op::put("raw")).encode_to_vec(),
    )
    .await
    .expect("a well-formed raw request");
    let ok = pb::WriteResponse::decode(&ok[..]).expect("a WriteResponse");
    assert!(ok.succeeded);
    let malformed: [(&str, Vec<u8>); 6] = [
        ("a truncated length-delimited key", vec![0x0a, 0x05, b'a']),
        (
            "a length beyond the message",
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ),
        ("a tag that is an overlong varint", vec![0xff; 11]),
        ("the key as a varint (wrong wire type)", vec![0x08, 0x01]),
        ("field number 0", vec![0x00, 0x01]),
        (
            "an op whose length runs past the end",
            [vec![0x0a, 0x01, b'k', 0x12, 0x09], vec![0x0a; 3]].concat(),
        ),
    ];
    for (i, (what, body)) in malformed.iter().enumerate() {
        let at = 1 + i % 3;
        match raw_call(&c, at, "/calm.v1.Kv/Write", body.clone()).await {
            // tonic answers INTERNAL for a request that does not decode, as gRPC's status
            // code guide says; INVALID_ARGUMENT would be as good.
            Err(s) => assert!(
                matches!(s.code(), Code::Internal | Code::InvalidArgument),
                "{what} at node {at}: {s:?}"
            ),
            Ok(r) => panic!("{what} at node {at} was accepted: {r:?}"),
        }
        assert!(c.status(at).await.is_ok(), "node {at} stopped serving");
    }
    for method in ["/calm.v1.Kv/Batch", "/calm.v1.Kv/Get"] {
        let r = raw_call(&c, 1, method, vec![0x0a, 0x05, b'a']).await;
        assert!(
            matches!(&r, Err(s) if matches!(s.code(), Code::Internal | Code::InvalidArgument)),
            "{method}: {r:?}"
        );
    }
    // An op of a type this build does not know (an unknown oneof field, 15) decodes as an
    // op without a kind: INVALID_ARGUMENT.
    let unknown_op = [
        vec![0x0a, 7],
        b"bad:reg".to_vec(),
        vec![0x12, 2, 15 << 3, 1],
    ]
    .concat();
    expect_code(
        "an op of an unknown type",
        raw_call(&c, 2, "/calm.v1.Kv/Write", unknown_op).await,
        Code::InvalidArgument,
    );

    // --- Nothing changed: every key reads as before on every node, none was created, and
    // every node holds the same keys as before (plus bad:raw-ok). A write to each group,
    // awaited everywhere, first flushes anything a refusal might have left in a log.
    let sync = key_per_group(&c, "bad:sync-").await;
    for key in sync.values() {
        support::write(&mut kv, key, op::put("sync")).await.unwrap();
    }
    await_key_counts(&c, before_keys + 1 + sync.len() as u64).await;
    for (key, value) in &before {
        for (i, r) in reads(&c, key.as_bytes()).await.iter().enumerate() {
            assert!(r.found, "{key} vanished at node {}", i + 1);
            assert_eq!(&r.value, value, "{key} changed at node {}", i + 1);
        }
    }
    for key in never {
        for (i, r) in reads(&c, key.as_bytes()).await.iter().enumerate() {
            assert!(!r.found, "{key} was created at node {}: {r:?}", i + 1);
        }
    }
    assert!(matches!(
        before["bad:ctr"].as_ref().and_then(|v| v.kind.clone()),
        Some(Kind::Counter(7))
    ));

    // --- At the limits, keys and values are accepted.
    let key = vec![b'k'; 4096];
    let value = "v".repeat(1 << 20);
    let r = write_req(&c, 1, req(&key, op::put(&value))).await.unwrap();
    assert!(r.succeeded);
    let r = reads(&c, &key).await;
    assert!(
        matches!(&r[0].value, Some(pb::Value { kind: Some(Kind::Register(reg)) }) if reg.value.len() == 1 << 20)
    );
}
