//! `calm watch`: follow a key's or a prefix's changes, one line (or JSON document) per
//! event, until interrupted or `--count` events.
//!
//! Resuming: the JSON document of a response's last event carries `token` (hex), and on
//! exit the last token is printed to stderr as `token: <hex>`; `calm watch --from <hex>` (against any node) goes on
//! after it with no event missed or repeated.

use super::scan::value_line;
use super::{CliError, Encoding, Exit, Output, channel, json_bytes};
use crate::api::pb;
use crate::api::pb::kv_client::KvClient;
use serde_json::json;
use std::io::Write;

pub struct WatchArgs {
    /// A key, or with `prefix` a prefix.
    pub key: Vec<u8>,
    pub prefix: bool,
    /// Resume token (hex), from an earlier watch or scan.
    pub from: Option<String>,
    pub prev: bool,
    /// Stop after this many events (0: never).
    pub count: u64,
    pub progress_ms: u32,
}

pub async fn watch(
    endpoints: &[String],
    args: WatchArgs,
    output: Output,
    enc: Encoding,
) -> Result<Exit, CliError> {
    let start_token = match &args.from {
        Some(text) => hex::decode(text).map_err(|e| {
            CliError::usage(format!(
                "--from '{text}' is not a hex token ({e}); pass the token a watch printed"
            ))
        })?,
        None => Vec::new(),
    };
    let mut req = pb::WatchRequest {
        start_token,
        prev_value: args.prev,
        progress_ms: args.progress_ms,
        ..Default::default()
    };
    if args.prefix {
        req.prefix = args.key;
    } else {
        req.key = args.key;
    }
    let mut kv = KvClient::new(channel(endpoints).await?);
    let mut stream = kv
        .watch(req)
        .await
        .map_err(|s| CliError::from_status(&s))?
        .into_inner();
    let mut seen = 0u64;
    let mut token = Vec::new();
    let result = loop {
        let response = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(Exit::Done),
            Err(s) => break Err(CliError::from_status(&s)),
        };
        token = response.token.clone();
        let mut out = std::io::stdout().lock();
        if response.created && output == Output::Table {
            let _ = writeln!(
                std::io::stderr(),
                "watching; token: {}",
                hex::encode(&token)
            );
        }
        // A response's token covers all its events: it goes on the last one only, and a
        // count reached inside a response still prints the rest of it, so every printed
        // token is a resume point.
        for (i, event) in response.events.iter().enumerate() {
            let last = i + 1 == response.events.len();
            print_event(
                &mut out,
                event,
                last.then_some(&response.token[..]),
                output,
                enc,
            );
        }
        seen += response.events.len() as u64;
        let _ = out.flush();
        if args.count > 0 && seen >= args.count {
            break Ok(Exit::Done);
        }
    };
    if output == Output::Table && !token.is_empty() {
        let _ = writeln!(std::io::stderr(), "token: {}", hex::encode(&token));
    }
    result
}

fn kind_name(kind: i32) -> &'static str {
    match pb::EventKind::try_from(kind) {
        Ok(pb::EventKind::Delete) => "DELETE",
        _ => "PUT",
    }
}

fn print_event(
    out: &mut impl Write,
    event: &pb::Event,
    token: Option<&[u8]>,
    output: Output,
    enc: Encoding,
) {
    match output {
        Output::Json => {
            let mut doc = serde_json::Map::new();
            doc.insert("kind".into(), json!(kind_name(event.kind)));
            json_bytes(&mut doc, "key", &event.key);
            if let Some(v) = &event.value {
                doc.insert("value".into(), super::kv::value_json(v));
            }
            if let Some(v) = &event.prev_value {
                doc.insert("prev_value".into(), super::kv::value_json(v));
            }
            if event.group > 0 {
                doc.insert("group".into(), json!(event.group));
                doc.insert("index".into(), json!(event.index));
            } else {
                doc.insert("origin".into(), json!(event.origin));
                doc.insert("seq".into(), json!(event.seq));
            }
            doc.insert("hlc".into(), json!(event.hlc));
            if let Some(token) = token {
                doc.insert("token".into(), json!(hex::encode(token)));
            }
            let _ = writeln!(out, "{}", serde_json::Value::Object(doc));
        }
        Output::Table => {
            let _ = out.write_all(kind_name(event.kind).as_bytes());
            let _ = out.write_all(b"\t");
            let _ = out.write_all(&enc.show(&event.key));
            if let Some(v) = &event.value {
                let _ = out.write_all(b"\t");
                let _ = out.write_all(&value_line(v, enc));
            }
            if let Some(v) = &event.prev_value {
                let _ = out.write_all(b"\t(was ");
                let _ = out.write_all(&value_line(v, enc));
                let _ = out.write_all(b")");
            }
            let _ = out.write_all(b"\n");
        }
    }
}
