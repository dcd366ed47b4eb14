//! The etcd side of `calm bench compare`: the generated clients of etcd's v3 KV and
//! Maintenance services (proto/etcd/rpc.proto) and the requests the workloads send, built by pure functions so
//! they can be tested without an etcd.

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
pub use pb::kv_client::KvClient;
pub use pb::maintenance_client::MaintenanceClient;
use pb::request_op::Request;

/// A Range of one key; `serializable: false` is a linearizable read (etcd's default).
pub fn range(key: &[u8], serializable: bool) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.to_vec(),
        serializable,
        ..Default::default()
    }
}

pub fn put(key: &[u8], value: &[u8]) -> pb::PutRequest {
    pb::PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        ..Default::default()
    }
}

fn put_op(key: &[u8], value: &[u8]) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Request::RequestPut(put(key, value))),
    }
}

/// Write `value` only if `key` was last modified at `mod_revision` (etcd's compare-and-set);
/// on failure the key is read back in the same transaction, so a retry needs no extra call.
pub fn cas(key: &[u8], mod_revision: i64, value: &[u8]) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: vec![pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: key.to_vec(),
            target_union: Some(TargetUnion::ModRevision(mod_revision)),
            range_end: Vec::new(),
        }],
        success: vec![put_op(key, value)],
        failure: vec![pb::RequestOp {
            request: Some(Request::RequestRange(range(key, false))),
        }],
    }
}

/// One transaction putting every key (distinct: etcd refuses a key twice in a txn).
pub fn put_all<'a>(keys: impl IntoIterator<Item = &'a [u8]>, value: &[u8]) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: Vec::new(),
        success: keys.into_iter().map(|k| put_op(k, value)).collect(),
        failure: Vec::new(),
    }
}

/// A transaction of one value comparison (the first key is not `absent-marker`, which
/// holds for a missing key too in neither system, so both branches put) and a put of every
/// key in each branch: what `txn x64` measures on both systems.
pub fn compare_put_all(keys: &[Vec<u8>], value: &[u8]) -> pb::TxnRequest {
    let puts: Vec<pb::RequestOp> = keys.iter().map(|k| put_op(k, value)).collect();
    pb::TxnRequest {
        compare: vec![pb::Compare {
            result: CompareResult::NotEqual as i32,
            target: CompareTarget::Value as i32,
            key: keys[0].clone(),
            target_union: Some(TargetUnion::Value(TXN_MARKER.to_vec())),
            range_end: Vec::new(),
        }],
        success: puts.clone(),
        failure: puts,
    }
}

/// The value the `txn` workload's comparison tests against (never written).
pub const TXN_MARKER: &[u8] = b"absent-marker";

/// A counter as the bench stores it in etcd: decimal text; `(value, mod_revision)`, with an
/// absent key as 0 at revision 0 (etcd's mod_revision of a missing key).
pub fn counter(kvs: &[pb::KeyValue]) -> Result<(i64, i64), String> {
    let Some(kv) = kvs.first() else {
        return Ok((0, 0));
    };
    let text = std::str::from_utf8(&kv.value).map_err(|_| "counter is not text".to_string())?;
    let n = text
        .parse()
        .map_err(|_| format!("counter '{text}' is not a number"))?;
    Ok((n, kv.mod_revision))
}

/// The key-values a failed [`cas`] read back.
pub fn failure_read(r: &pb::TxnResponse) -> &[pb::KeyValue] {
    match r.responses.first().and_then(|o| o.response.as_ref()) {
        Some(pb::response_op::Response::ResponseRange(range)) => &range.kvs,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn cas_compares_the_mod_revision_and_reads_back_on_failure() {
        let t = cas(b"k", 42, b"v");
        assert_eq!(t.compare.len(), 1);
        assert_eq!(t.compare[0].target, CompareTarget::Mod as i32);
        assert_eq!(t.compare[0].result, CompareResult::Equal as i32);
        assert_eq!(
            t.compare[0].target_union,
            Some(TargetUnion::ModRevision(42))
        );
        assert!(matches!(&t.success[0].request, Some(Request::RequestPut(p)) if p.value == b"v"));
        assert!(
            matches!(&t.failure[0].request, Some(Request::RequestRange(r)) if r.key == b"k" && !r.serializable)
        );
    }

    #[test]
    fn wire_bytes_use_etcds_field_numbers() {
        // Compare.mod_revision is field 6 (varint): tag (6 << 3) | 0 = 0x30.
        let c = &cas(b"k", 5, b"v").compare[0];
        let bytes = c.encode_to_vec();
        // target MOD (2) is field 2: 0x10 0x02; key field 3: 0x1a 0x01 'k'; mod_revision 0x30 0x05.
        assert_eq!(bytes, vec![0x10, 0x02, 0x1a, 0x01, b'k', 0x30, 0x05]);
        // RangeRequest.serializable is field 7: 0x38 0x01.
        assert_eq!(
            range(b"a", true).encode_to_vec(),
            vec![0x0a, 0x01, b'a', 0x38, 0x01]
        );
    }

    #[test]
    fn put_all_has_one_put_per_key_and_no_condition() {
        let keys: Vec<Vec<u8>> = (0..100).map(|i| format!("k{i}").into_bytes()).collect();
        let t = put_all(keys.iter().map(|k| k.as_slice()), b"v");
        assert!(t.compare.is_empty() && t.failure.is_empty());
        assert_eq!(t.success.len(), 100);
    }

    #[test]
    fn counters_parse_and_absent_is_zero() {
        assert_eq!(counter(&[]), Ok((0, 0)));
        let kv = pb::KeyValue {
            value: b"17".to_vec(),
            mod_revision: 9,
            ..Default::default()
        };
        assert_eq!(counter(&[kv]), Ok((17, 9)));
        let bad = pb::KeyValue {
            value: b"x".to_vec(),
            ..Default::default()
        };
        assert!(counter(&[bad]).is_err());
    }
}
