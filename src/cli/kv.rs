//! `calm put/get/del/cas/add/set/max/sadd/srem/smembers`: one op (or a few on one key) and
//! its answer.

use super::{CliError, Encoding, Exit, Output, channel, json_bytes, path_name, print_json};
use crate::api::pb;
use crate::api::pb::kv_client::KvClient;
use serde_json::json;
use std::io::Write;

/// Send `ops` on `key` in turn through the first endpoint that answers, printing each
/// answer; stops at the first that is not done.
pub async fn write(
    endpoints: &[String],
    key: &[u8],
    ops: Vec<pb::op::Kind>,
    token: &[u8],
    lease: u64,
    output: Output,
    enc: Encoding,
) -> Result<Exit, CliError> {
    let mut kv = KvClient::new(channel(endpoints).await?);
    for op in ops {
        let delete = matches!(op, pb::op::Kind::Delete(_));
        let resp = kv
            .write(pb::WriteRequest {
                key: key.to_vec(),
                op: Some(pb::Op { kind: Some(op) }),
                token: token.to_vec(),
                lease,
            })
            .await
            .map_err(|s| CliError::from_status(&s))?
            .into_inner();
        let exit = print_write(key, &resp, delete, output, enc);
        if exit != Exit::Done {
            return Ok(exit);
        }
    }
    Ok(Exit::Done)
}

/// Print one write's answer. A delete of a key that did not exist is exit 1 ("NOT FOUND",
/// `"deleted": false`), as `calm get` of a missing key is.
fn print_write(
    key: &[u8],
    resp: &pb::WriteResponse,
    delete: bool,
    output: Output,
    enc: Encoding,
) -> Exit {
    let missing = delete && !resp.deleted;
    match output {
        Output::Json => {
            let mut doc = serde_json::Map::new();
            json_bytes(&mut doc, "key", key);
            doc.insert("path".into(), json!(path_name(resp.path)));
            doc.insert("succeeded".into(), json!(resp.succeeded));
            doc.insert("version".into(), json!(resp.version));
            if delete {
                doc.insert("deleted".into(), json!(resp.deleted));
            }
            doc.insert("token".into(), json!(hex::encode(&resp.token)));
            print_json(&serde_json::Value::Object(doc));
        }
        Output::Table => {
            let line = if missing {
                format!(
                    "NOT FOUND: key '{}' did not exist; nothing was deleted",
                    enc.cell(key)
                )
            } else if !resp.succeeded {
                format!(
                    "NOT APPLIED: the condition did not hold (current version {})",
                    resp.version
                )
            } else if resp.version > 0 {
                format!("OK ({}), version {}", path_name(resp.path), resp.version)
            } else {
                format!("OK ({})", path_name(resp.path))
            };
            let _ = writeln!(std::io::stdout(), "{line}");
        }
    }
    if resp.succeeded && !missing {
        Exit::Done
    } else {
        Exit::No
    }
}

/// Read `key`; a missing key is exit 1 (its JSON says `"found": false`).
pub async fn get(
    endpoints: &[String],
    key: &[u8],
    consistency: pb::Consistency,
    token: Vec<u8>,
    output: Output,
    enc: Encoding,
) -> Result<Exit, CliError> {
    let mut kv = KvClient::new(channel(endpoints).await?);
    let resp = kv
        .get(pb::GetRequest {
            key: key.to_vec(),
            consistency: consistency as i32,
            token,
        })
        .await
        .map_err(|s| CliError::from_status(&s))?
        .into_inner();
    let value = resp.value.as_ref().filter(|_| resp.found);
    match output {
        Output::Json => {
            let mut doc = serde_json::Map::new();
            json_bytes(&mut doc, "key", key);
            doc.insert("found".into(), json!(resp.found));
            doc.insert("value".into(), value.map_or(json!(null), value_json));
            doc.insert("token".into(), json!(hex::encode(&resp.token)));
            print_json(&serde_json::Value::Object(doc));
        }
        Output::Table => match value {
            Some(v) => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&value_text(v, enc));
                let _ = out.write_all(b"\n");
            }
            None => {
                return Err(CliError::not_found(format!(
                    "key '{}' not found",
                    enc.cell(key)
                )));
            }
        },
    }
    Ok(if value.is_some() {
        Exit::Done
    } else {
        Exit::No
    })
}

pub(super) fn value_json(v: &pb::Value) -> serde_json::Value {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::Register(r)) => {
            let mut doc = serde_json::Map::new();
            doc.insert("type".into(), json!("register"));
            json_bytes(&mut doc, "value", &r.value);
            doc.insert("version".into(), json!(r.version));
            doc.insert("hlc".into(), json!(r.hlc));
            serde_json::Value::Object(doc)
        }
        Some(Kind::Counter(c)) => json!({"type": "counter", "value": c}),
        Some(Kind::Bounded(b)) => {
            json!({"type": "bounded_counter", "value": b.value, "min": b.min, "max": b.max})
        }
        Some(Kind::Max(m)) => json!({"type": "max", "value": m.value}),
        Some(Kind::Set(s)) => json!({
            "type": "set",
            "elements": s.elements.iter().map(|e| std::str::from_utf8(e).map_or(json!(null), |t| json!(t))).collect::<Vec<_>>(),
            "elements_base64": s.elements.iter().map(|e| super::base64_of(e)).collect::<Vec<_>>(),
        }),
        None => json!(null),
    }
}

/// A value as a table prints it: a register's bytes as they are (or hex), set elements one
/// per line.
pub(super) fn value_text(v: &pb::Value, enc: Encoding) -> Vec<u8> {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::Register(r)) => enc.show(&r.value),
        Some(Kind::Counter(c)) => c.to_string().into_bytes(),
        Some(Kind::Bounded(b)) => {
            format!("{} (bounds [{}, {}])", b.value, b.min, b.max).into_bytes()
        }
        Some(Kind::Max(m)) => m
            .value
            .map_or("(no value)".into(), |v| v.to_string())
            .into_bytes(),
        Some(Kind::Set(s)) => s
            .elements
            .iter()
            .map(|e| enc.show(e))
            .collect::<Vec<_>>()
            .join(&b'\n'),
        None => Vec::new(),
    }
}
