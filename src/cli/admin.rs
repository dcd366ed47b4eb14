//! `calm status`, `calm explain`, `calm rules get|set` and `calm checkpoint`: one node's
//! view and the cluster's administration.

use super::{CliError, Encoding, Exit, Output, channel, json_bytes, print_json};
use crate::api::pb;
use crate::api::pb::admin_client::AdminClient;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;
use std::io::Write;

fn out(text: impl std::fmt::Display) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// A duration in milliseconds, as a table shows it.
pub fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) if ms < 1_000 => format!("{ms} ms ago"),
        Some(ms) => format!("{:.1} s ago", ms as f64 / 1000.0),
    }
}

/// The leader column: the id when live, else what is remembered of it.
pub fn leader_cell(g: &pb::Group) -> String {
    match (g.leader, g.leader_live) {
        (0, _) => "none".into(),
        (l, true) => l.to_string(),
        (l, false) => format!("none (n{l} last heard {})", ago(g.leader_last_contact_ms)),
    }
}

pub fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    let groups: Vec<_> = s
        .groups
        .iter()
        .map(|g| {
            json!({
                "group": g.id, "leader": g.leader, "leader_live": g.leader_live,
                "leader_last_contact_ms": g.leader_last_contact_ms, "role": g.role,
                "term": g.term, "last_log_index": g.last_log_index,
                "applied_index": g.applied_index, "snapshot_index": g.snapshot_index,
                "max_follower_lag": g.max_follower_lag,
                "follower_lag": g.follower_lag.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    json!({
        "node": s.node_id,
        "cluster_id": s.cluster_id,
        "version": s.version,
        "ready": s.ready,
        "not_ready_reason": s.not_ready_reason,
        "uptime_seconds": s.uptime_seconds,
        "http_addr": s.http_addr,
        "members": s.members.iter().map(|m| json!({"id": m.id, "client": m.client_addr, "peer": m.peer_addr, "last_contact_ms": m.last_contact_ms})).collect::<Vec<_>>(),
        "groups": groups,
        "wal": s.wal.as_ref().map(|w| json!({"backend": w.backend, "next_lsn": w.next_lsn, "oldest_lsn": w.oldest_lsn})),
        "checkpoint": s.checkpoint,
        "keys": s.keys,
        "disk_bytes": s.disk_bytes,
        "rules_version": s.rules_version,
        "version_vector": s.version_vector,
    })
}

/// One node's status (exit 0 whether or not it is ready: `calm health` is the check).
pub async fn status(endpoints: &[String], output: Output) -> Result<Exit, CliError> {
    let mut admin = AdminClient::new(channel(endpoints).await?);
    let s = admin
        .status(pb::StatusRequest {})
        .await
        .map_err(|e| CliError::from_status(&e))?
        .into_inner();
    match output {
        Output::Json => print_json(&status_json(&s)),
        Output::Table => {
            out(format!(
                "node {} of cluster {} (calm {}), {}, {} keys, {} on disk, rules version {}, WAL {}",
                s.node_id,
                s.cluster_id,
                s.version,
                if s.ready { "ready" } else { "NOT READY" },
                s.keys,
                bytes_text(s.disk_bytes),
                s.rules_version,
                s.wal.as_ref().map_or("?", |w| w.backend.as_str())
            ));
            if !s.ready {
                out(&s.not_ready_reason);
            }
            let mut members = Table::new();
            members.load_preset(UTF8_FULL_CONDENSED).set_header([
                "member",
                "client",
                "peer",
                "last contact",
            ]);
            for m in &s.members {
                members.add_row([
                    m.id.to_string(),
                    m.client_addr.clone(),
                    m.peer_addr.clone(),
                    if m.id == s.node_id {
                        "(this node)".into()
                    } else {
                        ago(m.last_contact_ms)
                    },
                ]);
            }
            out(members);
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
                    leader_cell(g),
                    g.role.clone(),
                    g.term.to_string(),
                    g.last_log_index.to_string(),
                    g.applied_index.to_string(),
                    g.max_follower_lag.to_string(),
                ]);
            }
            out(groups);
        }
    }
    Ok(Exit::Done)
}

/// Bytes in a unit people read (KiB, MiB, GiB).
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub async fn explain(
    endpoints: &[String],
    keys: &[Vec<u8>],
    output: Output,
    enc: Encoding,
) -> Result<Exit, CliError> {
    let mut admin = AdminClient::new(channel(endpoints).await?);
    let mut rows = Vec::new();
    for key in keys {
        rows.push((
            key,
            admin
                .explain(pb::ExplainRequest { key: key.clone() })
                .await
                .map_err(|e| CliError::from_status(&e))?
                .into_inner(),
        ));
    }
    match output {
        Output::Json => {
            let rows: Vec<_> = rows
                .iter()
                .map(|(k, e)| {
                    let mut doc = serde_json::Map::new();
                    json_bytes(&mut doc, "key", k);
                    json_bytes(&mut doc, "subject", &e.subject);
                    for (name, value) in [
                        (
                            "rule",
                            json!((e.rule_index >= 0).then_some(e.rule_index + 1)),
                        ),
                        ("pattern", json!(e.pattern)),
                        ("mode", json!(e.mode)),
                        ("type", json!(e.r#type)),
                        ("min", json!(e.min)),
                        ("max", json!(e.max)),
                        ("rule_min", json!(e.rule_min)),
                        ("rule_max", json!(e.rule_max)),
                        ("group", json!(e.group)),
                        ("leader", json!(e.leader)),
                        ("leader_addr", json!(e.leader_addr)),
                        ("exists", json!(e.exists)),
                    ] {
                        doc.insert(name.into(), value);
                    }
                    serde_json::Value::Object(doc)
                })
                .collect();
            print_json(&json!(rows));
        }
        Output::Table => {
            let mut table = Table::new();
            table
                .load_preset(UTF8_FULL_CONDENSED)
                .set_header(["key", "rule", "mode", "type", "bounds", "group", "leader"]);
            for (k, e) in &rows {
                table.add_row([
                    enc.cell(k),
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
                    match ((e.min, e.max), (e.rule_min, e.rule_max)) {
                        ((Some(min), Some(max)), rule) if rule != (e.min, e.max) => {
                            format!(
                                "[{min}, {max}] (key's own; rule's {})",
                                match rule {
                                    (Some(a), Some(b)) => format!("[{a}, {b}]"),
                                    _ => "none".into(),
                                }
                            )
                        }
                        ((Some(min), Some(max)), _) => format!("[{min}, {max}]"),
                        _ => String::new(),
                    },
                    if e.subject.is_empty() || e.subject == **k {
                        e.group.to_string()
                    } else {
                        format!("{} (subject {})", e.group, enc.cell(&e.subject))
                    },
                    if e.leader == 0 {
                        "none".into()
                    } else {
                        format!("{} ({})", e.leader, e.leader_addr)
                    },
                ]);
            }
            out(table);
        }
    }
    Ok(Exit::Done)
}

pub async fn rules_get(endpoints: &[String], output: Output) -> Result<Exit, CliError> {
    let mut admin = AdminClient::new(channel(endpoints).await?);
    let rules = admin
        .get_rules(pb::GetRulesRequest {})
        .await
        .map_err(|e| CliError::from_status(&e))?
        .into_inner();
    match output {
        Output::Json => print_json(&json!({"version": rules.version, "toml": rules.toml})),
        Output::Table => {
            let _ = write!(
                std::io::stdout(),
                "# rules version {}\n{}",
                rules.version,
                rules.toml
            );
        }
    }
    Ok(Exit::Done)
}

pub async fn rules_set(
    endpoints: &[String],
    file: &std::path::Path,
    expected_version: u64,
    output: Output,
) -> Result<Exit, CliError> {
    let toml = std::fs::read_to_string(file)
        .map_err(|e| CliError::usage(format!("cannot read rules file {}: {e}", file.display())))?;
    let mut admin = AdminClient::new(channel(endpoints).await?);
    let rules = admin
        .set_rules(pb::SetRulesRequest {
            expected_version,
            toml,
        })
        .await
        .map_err(|e| CliError::from_status(&e))?
        .into_inner();
    match output {
        Output::Json => print_json(&json!({"version": rules.version})),
        Output::Table => out(format!(
            "rules version {} accepted; every node switches at the same position of the metadata group's log",
            rules.version
        )),
    }
    Ok(Exit::Done)
}

pub async fn checkpoint(endpoints: &[String], output: Output) -> Result<Exit, CliError> {
    let mut admin = AdminClient::new(channel(endpoints).await?);
    let id = admin
        .checkpoint(pb::CheckpointRequest {})
        .await
        .map_err(|e| CliError::from_status(&e))?
        .into_inner()
        .id;
    match output {
        Output::Json => print_json(&json!({"checkpoint": id})),
        Output::Table => out(format!("checkpoint {id} taken")),
    }
    Ok(Exit::Done)
}
