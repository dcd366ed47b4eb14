//! The CLI's client side: `calm put/get/del/cas/add/...`, `calm status`, `calm explain`.
//!
//! Each command connects to the first endpoint that accepts a connection (any node serves
//! any key: it forwards to the leader) and prints a table or JSON (`-w json`).

use crate::api::pb;
use crate::api::pb::admin_client::AdminClient;
use crate::api::pb::kv_client::KvClient;
use anyhow::{Context, Result, anyhow};
use calm_raft::channel::{ChannelOptions, H2Channel};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;
use std::time::Duration;

/// Default endpoint: node 1 of `calm dev`.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7001";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// How the CLI's and the bench's channels connect and how long a call may take.
pub fn channel_options() -> ChannelOptions {
    ChannelOptions {
        connect_timeout: Duration::from_secs(2),
        call_timeout: Some(Duration::from_secs(30)),
        ..ChannelOptions::default()
    }
}

/// Connect to the first endpoint that answers.
pub async fn connect(endpoints: &[String]) -> Result<H2Channel> {
    let mut errors = Vec::new();
    for e in endpoints {
        let addr = e.strip_prefix("http://").unwrap_or(e).trim_end_matches('/');
        match H2Channel::connect(addr, channel_options()).await {
            Ok(c) => return Ok(c),
            Err(err) => errors.push(format!("{e}: {}", err.message())),
        }
    }
    Err(anyhow!(
        "no calm node answered ({}); start one with `calm dev` or pass --endpoints",
        errors.join("; ")
    ))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    let leader = s
        .metadata()
        .get(crate::api::LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(|a| format!(" (leader hint: {a})"))
        .unwrap_or_default();
    anyhow!("{:?}: {}{leader}", s.code(), s.message())
}

fn path_name(path: i32) -> &'static str {
    match pb::Path::try_from(path) {
        Ok(pb::Path::Fast) => "fast",
        Ok(pb::Path::Escrow) => "escrow",
        Ok(pb::Path::Consensus) => "consensus",
        _ => "unknown",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse a session token given in hex on the command line.
pub fn parse_hex(text: &str) -> Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return Err(anyhow!("token '{text}' is not hex (odd length)"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .map_err(|_| anyhow!("token '{text}' is not hex"))
        })
        .collect()
}

pub async fn write(
    endpoints: &[String],
    key: &str,
    op: pb::op::Kind,
    token: &[u8],
    output: Output,
) -> Result<()> {
    let mut kv = KvClient::new(connect(endpoints).await?);
    let resp = kv
        .write(pb::WriteRequest {
            key: key.as_bytes().to_vec(),
            op: Some(pb::Op { kind: Some(op) }),
            token: token.to_vec(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "key": key,
                "path": path_name(resp.path),
                "succeeded": resp.succeeded,
                "version": resp.version,
                "token": hex(&resp.token),
            })
        ),
        Output::Table => {
            let mut line = format!("OK ({})", path_name(resp.path));
            if !resp.succeeded {
                line = format!(
                    "NOT APPLIED: the condition did not hold (current version {})",
                    resp.version
                );
            } else if resp.version > 0 {
                line.push_str(&format!(", version {}", resp.version));
            }
            println!("{line}");
        }
    }
    Ok(())
}

fn value_json(v: &pb::Value) -> serde_json::Value {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::Register(r)) => json!({
            "type": "register",
            "value": String::from_utf8_lossy(&r.value),
            "version": r.version,
            "hlc": r.hlc,
        }),
        Some(Kind::Counter(c)) => json!({"type": "counter", "value": c}),
        Some(Kind::Bounded(b)) => {
            json!({"type": "bounded_counter", "value": b.value, "min": b.min, "max": b.max})
        }
        Some(Kind::Max(m)) => json!({"type": "max", "value": m.value}),
        Some(Kind::Set(s)) => json!({
            "type": "set",
            "elements": s.elements.iter().map(|e| String::from_utf8_lossy(e).into_owned()).collect::<Vec<_>>(),
        }),
        None => json!(null),
    }
}

fn value_text(v: &pb::Value) -> String {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::Register(r)) => String::from_utf8_lossy(&r.value).into_owned(),
        Some(Kind::Counter(c)) => c.to_string(),
        Some(Kind::Bounded(b)) => format!("{} (bounds [{}, {}])", b.value, b.min, b.max),
        Some(Kind::Max(m)) => m.value.map_or("(no value)".into(), |v| v.to_string()),
        Some(Kind::Set(s)) => s
            .elements
            .iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect::<Vec<_>>()
            .join("\n"),
        None => String::new(),
    }
}

pub async fn get(
    endpoints: &[String],
    key: &str,
    consistency: pb::Consistency,
    token: Vec<u8>,
    output: Output,
) -> Result<()> {
    let mut kv = KvClient::new(connect(endpoints).await?);
    let resp = kv
        .get(pb::GetRequest {
            key: key.as_bytes().to_vec(),
            consistency: consistency as i32,
            token,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "key": key,
                "found": resp.found,
                "value": resp.value.as_ref().map(value_json),
                "token": hex(&resp.token),
            })
        ),
        Output::Table => match &resp.value {
            Some(v) if resp.found => println!("{}", value_text(v)),
            _ => return Err(anyhow!("key '{key}' not found")),
        },
    }
    Ok(())
}

pub async fn status(endpoints: &[String], output: Output) -> Result<()> {
    let mut admin = AdminClient::new(connect(endpoints).await?);
    let s = admin
        .status(pb::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    match output {
        Output::Json => {
            let groups: Vec<_> = s
                .groups
                .iter()
                .map(|g| {
                    json!({
                        "group": g.id, "leader": g.leader, "role": g.role, "term": g.term,
                        "last_log_index": g.last_log_index, "applied_index": g.applied_index,
                        "snapshot_index": g.snapshot_index, "max_follower_lag": g.max_follower_lag,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "node": s.node_id,
                    "version": s.version,
                    "members": s.members.iter().map(|m| json!({"id": m.id, "client": m.client_addr, "peer": m.peer_addr})).collect::<Vec<_>>(),
                    "groups": groups,
                    "wal": s.wal.as_ref().map(|w| json!({"backend": w.backend, "next_lsn": w.next_lsn, "oldest_lsn": w.oldest_lsn})),
                    "checkpoint": s.checkpoint,
                    "keys": s.keys,
                    "rules_version": s.rules_version,
                    "version_vector": s.version_vector,
                }))?
            );
        }
        Output::Table => {
            println!(
                "node {} (calm {}), {} keys, rules version {}, WAL {}",
                s.node_id,
                s.version,
                s.keys,
                s.rules_version,
                s.wal.as_ref().map_or("?", |w| w.backend.as_str())
            );
            let mut members = Table::new();
            members
                .load_preset(UTF8_FULL_CONDENSED)
                .set_header(["member", "client", "peer"]);
            for m in &s.members {
                members.add_row([m.id.to_string(), m.client_addr.clone(), m.peer_addr.clone()]);
            }
            println!("{members}");
            let mut groups = Table::new();
            groups
                .load_preset(UTF8_FULL_CONDENSED)
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_header([
                    "group",
                    "leader",
                    "role here",
                    "term",
                    "last log",
                    "applied",
                    "max lag",
                ]);
            for g in &s.groups {
                groups.add_row([
                    g.id.to_string(),
                    if g.leader == 0 {
                        "none".into()
                    } else {
                        g.leader.to_string()
                    },
                    g.role.clone(),
                    g.term.to_string(),
                    g.last_log_index.to_string(),
                    g.applied_index.to_string(),
                    g.max_follower_lag.to_string(),
                ]);
            }
            println!("{groups}");
        }
    }
    Ok(())
}

pub async fn explain(endpoints: &[String], keys: &[String], output: Output) -> Result<()> {
    let mut admin = AdminClient::new(connect(endpoints).await?);
    let mut rows = Vec::new();
    for key in keys {
        rows.push((
            key,
            admin
                .explain(pb::ExplainRequest {
                    key: key.as_bytes().to_vec(),
                })
                .await
                .map_err(status_error)?
                .into_inner(),
        ));
    }
    match output {
        Output::Json => {
            let rows: Vec<_> = rows
                .iter()
                .map(|(k, e)| {
                    json!({
                        "key": k, "rule": (e.rule_index >= 0).then_some(e.rule_index + 1),
                        "pattern": e.pattern, "mode": e.mode, "type": e.r#type,
                        "min": e.min, "max": e.max, "group": e.group, "leader": e.leader,
                        "leader_addr": e.leader_addr, "exists": e.exists,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            let mut table = Table::new();
            table
                .load_preset(UTF8_FULL_CONDENSED)
                .set_header(["key", "rule", "mode", "type", "group", "leader"]);
            for (k, e) in &rows {
                table.add_row([
                    k.to_string(),
                    if e.rule_index < 0 {
                        "default".into()
                    } else {
                        format!("#{} '{}'", e.rule_index + 1, e.pattern)
                    },
                    e.mode.clone(),
                    if e.r#type.is_empty() {
                        "set by first write".into()
                    } else {
                        e.r#type.clone()
                    },
                    e.group.to_string(),
                    if e.leader == 0 {
                        "none".into()
                    } else {
                        format!("{} ({})", e.leader, e.leader_addr)
                    },
                ]);
            }
            println!("{table}");
        }
    }
    Ok(())
}

pub async fn rules_get(endpoints: &[String], output: Output) -> Result<()> {
    let mut admin = AdminClient::new(connect(endpoints).await?);
    let rules = admin
        .get_rules(pb::GetRulesRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    match output {
        Output::Json => println!("{}", json!({"version": rules.version, "toml": rules.toml})),
        Output::Table => print!("# rules version {}\n{}", rules.version, rules.toml),
    }
    Ok(())
}

pub async fn checkpoint(endpoints: &[String]) -> Result<()> {
    let mut admin = AdminClient::new(connect(endpoints).await?);
    let id = admin
        .checkpoint(pb::CheckpointRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .id;
    println!("checkpoint {id} taken");
    Ok(())
}

pub async fn rules_set(
    endpoints: &[String],
    file: &std::path::Path,
    expected_version: u64,
    output: Output,
) -> Result<()> {
    let toml = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read rules file {}", file.display()))?;
    let mut admin = AdminClient::new(connect(endpoints).await?);
    let rules = admin
        .set_rules(pb::SetRulesRequest {
            expected_version,
            toml,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    match output {
        Output::Json => println!("{}", json!({"version": rules.version})),
        Output::Table => println!(
            "rules version {} accepted; every node switches at the same position of the metadata group's log",
            rules.version
        ),
    }
    Ok(())
}
