//! `calm scan` and `calm del --prefix`: commands over a range of keys, page after page.
//!
//! Both print as they go, so a range of a million keys never sits in the CLI's memory:
//! `scan` reads one ScanStream, `del --prefix` pages with Scan (deleting between pages).
//! With `-w json` they print JSON lines: one document per key (or one with the count),
//! then nothing else; an error ends the stream with its own error document.

use super::{CliError, Encoding, Exit, Output, channel, json_bytes, print_json};
use crate::api::pb;
use crate::api::pb::kv_client::KvClient;
use serde_json::json;
use std::io::Write;

/// Keys per page the CLI asks for (the server's default page).
const PAGE_KEYS: u32 = 1_000;

/// What to scan: a prefix, or `[start, end)` when `range_end` is given.
pub struct Range {
    pub key: Vec<u8>,
    pub range_end: Option<Vec<u8>>,
}

impl Range {
    fn request(&self) -> pb::ScanRequest {
        match &self.range_end {
            Some(end) => pb::ScanRequest {
                start: self.key.clone(),
                end: end.clone(),
                ..Default::default()
            },
            None => pb::ScanRequest {
                prefix: self.key.clone(),
                ..Default::default()
            },
        }
    }
}

pub struct ScanArgs {
    pub range: Range,
    /// Most keys printed; 0: all.
    pub limit: u64,
    pub keys_only: bool,
    pub count: bool,
    pub consistency: pb::Consistency,
}

/// Print the range's keys (and values) in key order, or their count. Exit 1 when the range
/// holds no key, as `calm get` of a missing key is.
pub async fn scan(
    endpoints: &[String],
    args: ScanArgs,
    output: Output,
    enc: Encoding,
) -> Result<Exit, CliError> {
    let mut kv = KvClient::new(channel(endpoints).await?);
    let mut req = args.range.request();
    req.consistency = args.consistency as i32;
    req.keys_only = args.keys_only;
    req.count_only = args.count;
    req.limit = match args.limit {
        0 => PAGE_KEYS,
        n => PAGE_KEYS.min(u32::try_from(n).unwrap_or(u32::MAX)),
    };
    // One stream of pages; dropping it early (the limit reached) cancels the rest.
    let mut pages = kv
        .scan_stream(req)
        .await
        .map_err(|s| CliError::from_status(&s))?
        .into_inner();
    let mut printed = 0u64;
    let mut out = std::io::stdout().lock();
    while let Some(page) = pages
        .message()
        .await
        .map_err(|s| CliError::from_status(&s))?
    {
        if args.count {
            let count = if args.limit == 0 {
                page.count
            } else {
                page.count.min(args.limit)
            };
            match output {
                Output::Json => print_json(&json!({"count": count})),
                Output::Table => {
                    let _ = writeln!(out, "{count}");
                }
            }
            return Ok(if count > 0 { Exit::Done } else { Exit::No });
        }
        for entry in &page.entries {
            if args.limit > 0 && printed == args.limit {
                break;
            }
            print_entry(&mut out, entry, output, enc);
            printed += 1;
        }
        if args.limit > 0 && printed == args.limit {
            break;
        }
    }
    Ok(if printed > 0 { Exit::Done } else { Exit::No })
}

fn print_entry(out: &mut impl Write, entry: &pb::KeyValue, output: Output, enc: Encoding) {
    match output {
        Output::Json => {
            let mut doc = serde_json::Map::new();
            json_bytes(&mut doc, "key", &entry.key);
            if let Some(v) = &entry.value {
                doc.insert("value".into(), super::kv::value_json(v));
            }
            let _ = writeln!(out, "{}", serde_json::Value::Object(doc));
        }
        Output::Table => {
            let _ = out.write_all(&enc.show(&entry.key));
            if let Some(v) = &entry.value {
                let _ = out.write_all(b"\t");
                let _ = out.write_all(&value_line(v, enc));
            }
            let _ = out.write_all(b"\n");
        }
    }
}

/// A value on one line: a register's bytes, a counter's number, a set as `{a, b}`.
pub(super) fn value_line(v: &pb::Value, enc: Encoding) -> Vec<u8> {
    match &v.kind {
        Some(pb::value::Kind::Set(s)) => {
            let mut line = b"{".to_vec();
            for (i, e) in s.elements.iter().enumerate() {
                if i > 0 {
                    line.extend_from_slice(b", ");
                }
                line.extend_from_slice(&enc.show(e));
            }
            line.push(b'}');
            line
        }
        _ => super::kv::value_text(v, enc),
    }
}

/// Delete every key of the range: one Raft delete per key, a page of keys per Batch (not
/// atomic: a key written meanwhile may survive, and an error stops with the keys deleted so
/// far gone). Prints how many keys existed and were deleted; exit 1 when none.
pub async fn delete_range(
    endpoints: &[String],
    range: Range,
    output: Output,
) -> Result<Exit, CliError> {
    let mut kv = KvClient::new(channel(endpoints).await?);
    let mut req = range.request();
    req.keys_only = true;
    req.limit = PAGE_KEYS;
    let mut deleted = 0u64;
    let outcome = loop {
        let page = match kv.scan(req.clone()).await {
            Ok(page) => page.into_inner(),
            Err(s) => break Err(CliError::from_status(&s)),
        };
        let ops = page
            .entries
            .into_iter()
            .map(|e| pb::WriteRequest {
                key: e.key,
                op: Some(pb::Op {
                    kind: Some(pb::op::Kind::Delete(pb::Delete {})),
                }),
                token: Vec::new(),
                lease: 0,
            })
            .collect();
        let results = match kv.batch(pb::BatchRequest { ops }).await {
            Ok(r) => r.into_inner().results,
            Err(s) => break Err(CliError::from_status(&s)),
        };
        let mut failed = None;
        for result in results {
            match result.result {
                Some(pb::batch_result::Result::Ok(ok)) => deleted += u64::from(ok.deleted),
                Some(pb::batch_result::Result::Error(e)) => {
                    failed.get_or_insert(CliError::from_status(&tonic::Status::new(
                        tonic::Code::from(e.code),
                        e.message,
                    )));
                }
                None => {}
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if page.next_page_token.is_empty() {
            break Ok(());
        }
        req.page_token = page.next_page_token;
    };
    if let Err(mut e) = outcome {
        e.message = format!("{} ({deleted} keys were deleted before it)", e.message);
        return Err(e);
    }
    match output {
        Output::Json => print_json(&json!({"deleted": deleted})),
        Output::Table => {
            let _ = writeln!(std::io::stdout(), "{deleted}");
        }
    }
    Ok(if deleted > 0 { Exit::Done } else { Exit::No })
}
