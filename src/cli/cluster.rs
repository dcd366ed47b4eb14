//! The views over every member: `calm status --cluster` (one row per member, like
//! `etcdctl endpoint status --cluster`) and `calm health` (each member reachable and ready,
//! exit 1 when one is not, like `etcdctl endpoint health --cluster`). The node status page
//! uses the same fetch ([`member_statuses`]).
//!
//! The member list comes from the first endpoint that answers; each member is then asked
//! for its own status at its client address, all at once, each bounded by
//! [`MEMBER_TIMEOUT`], so one stopped member costs that long and no more.

use super::admin::{ago, bytes_text};
use super::{CliError, Exit, Output, channel, print_json};
use crate::api::pb;
use crate::api::pb::admin_client::AdminClient;
use calm_raft::channel::{ChannelOptions, H2Channel};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// How long one member may take to answer its status.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(2);

/// One member as the cluster views see it.
#[derive(Clone, Debug)]
pub struct MemberView {
    pub member: pb::Member,
    /// Its own status, or why it could not be had.
    pub status: Result<pb::StatusResponse, String>,
    /// How long it took to answer.
    pub took: Duration,
}

impl MemberView {
    /// Reachable and ready.
    pub fn healthy(&self) -> bool {
        self.status.as_ref().is_ok_and(|s| s.ready)
    }

    /// Groups it leads, live.
    pub fn leaders_held(&self) -> usize {
        self.status.as_ref().map_or(0, |s| {
            s.groups
                .iter()
                .filter(|g| g.leader == s.node_id && g.leader_live)
                .count()
        })
    }
}

/// Ask each of `members` for its status at its client address, concurrently.
pub async fn member_statuses(members: &[pb::Member]) -> Vec<MemberView> {
    let asks = members.iter().map(|m| async move {
        let started = Instant::now();
        let status = ask(&m.client_addr).await;
        MemberView {
            member: m.clone(),
            status,
            took: started.elapsed(),
        }
    });
    futures::future::join_all(asks).await
}

async fn ask(addr: &str) -> Result<pb::StatusResponse, String> {
    let options = ChannelOptions {
        connect_timeout: MEMBER_TIMEOUT,
        call_timeout: Some(MEMBER_TIMEOUT),
        ..ChannelOptions::default()
    };
    let channel = H2Channel::lazy(addr, options).map_err(|e| e.message().to_string())?;
    let mut admin = AdminClient::new(channel);
    match tokio::time::timeout(MEMBER_TIMEOUT, admin.status(pb::StatusRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{}: {}", super::code_name(s.code()), s.message())),
        Err(_) => Err(format!(
            "no answer within {} ms",
            MEMBER_TIMEOUT.as_millis()
        )),
    }
}

/// The members as the first endpoint that answers lists them, with that node's status.
async fn members_of(endpoints: &[String]) -> Result<pb::StatusResponse, CliError> {
    let mut admin = AdminClient::new(channel(endpoints).await?);
    Ok(admin
        .status(pb::StatusRequest {})
        .await
        .map_err(|e| CliError::from_status(&e))?
        .into_inner())
}

/// Per follower, the largest lag behind the groups `s`'s node leads: `2:0 3:12`.
fn follower_lag(s: &pb::StatusResponse) -> BTreeMap<u64, u64> {
    let mut lag = BTreeMap::new();
    for g in s.groups.iter().filter(|g| g.leader == s.node_id) {
        for (&node, &l) in &g.follower_lag {
            let e = lag.entry(node).or_insert(0);
            *e = (*e).max(l);
        }
    }
    lag
}

/// How far each member's groups are behind their leaders, as the leaders report it.
fn lag_behind_leaders(views: &[MemberView]) -> BTreeMap<u64, u64> {
    let mut lag = BTreeMap::new();
    for v in views {
        if let Ok(s) = &v.status {
            for (node, l) in follower_lag(s) {
                let e = lag.entry(node).or_insert(0);
                *e = (*e).max(l);
            }
        }
    }
    lag
}

fn out(text: impl std::fmt::Display) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// `calm status --cluster`.
pub async fn status(endpoints: &[String], output: Output) -> Result<Exit, CliError> {
    let first = members_of(endpoints).await?;
    let views = member_statuses(&first.members).await;
    let contact = |id: u64| {
        first
            .members
            .iter()
            .find(|m| m.id == id)
            .and_then(|m| m.last_contact_ms)
    };
    match output {
        Output::Json => {
            let rows: Vec<_> = views
                .iter()
                .map(|v| {
                    let mut row = json!({
                        "id": v.member.id,
                        "client": v.member.client_addr,
                        "peer": v.member.peer_addr,
                        "reachable": v.status.is_ok(),
                        "last_contact_ms": contact(v.member.id),
                        "seen_from": first.node_id,
                    });
                    match &v.status {
                        Ok(s) => {
                            row["status"] = super::admin::status_json(s);
                            row["leaders_held"] = json!(v.leaders_held());
                            row["follower_lag"] = json!(
                                follower_lag(s)
                                    .into_iter()
                                    .map(|(k, l)| (k.to_string(), json!(l)))
                                    .collect::<serde_json::Map<_, _>>()
                            );
                        }
                        Err(e) => row["error"] = json!(e),
                    }
                    row
                })
                .collect();
            print_json(&json!({"cluster_id": first.cluster_id, "members": rows}));
        }
        Output::Table => {
            let mut table = Table::new();
            table
                .load_preset(UTF8_FULL_CONDENSED)
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_header([
                    "id",
                    "client",
                    "peer",
                    "version",
                    "ready",
                    "keys",
                    "disk",
                    "leaders",
                    &format!("last contact (from n{})", first.node_id),
                    "follower lag",
                ]);
            for v in &views {
                let id = v.member.id;
                let contact = if id == first.node_id {
                    "(answered the list)".to_string()
                } else {
                    ago(contact(id))
                };
                match &v.status {
                    Ok(s) => table.add_row([
                        id.to_string(),
                        v.member.client_addr.clone(),
                        v.member.peer_addr.clone(),
                        s.version.clone(),
                        if s.ready { "yes".into() } else { "NO".into() },
                        s.keys.to_string(),
                        bytes_text(s.disk_bytes),
                        v.leaders_held().to_string(),
                        contact,
                        follower_lag(s)
                            .iter()
                            .map(|(n, l)| format!("n{n}:{l}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ]),
                    Err(_) => table.add_row([
                        id.to_string(),
                        v.member.client_addr.clone(),
                        v.member.peer_addr.clone(),
                        "unreachable".into(),
                        "NO".into(),
                        String::new(),
                        String::new(),
                        String::new(),
                        contact,
                        String::new(),
                    ]),
                };
            }
            out(format!("cluster {}", first.cluster_id));
            out(table);
            for v in &views {
                if let Err(e) = &v.status {
                    out(format!("node {} is unreachable: {e}", v.member.id));
                }
            }
        }
    }
    Ok(Exit::Done)
}

/// `calm health`: exit 0 when every member is reachable and ready, 1 otherwise.
pub async fn health(endpoints: &[String], output: Output) -> Result<Exit, CliError> {
    let first = members_of(endpoints).await?;
    let views = member_statuses(&first.members).await;
    let lag = lag_behind_leaders(&views);
    let all = views.iter().all(MemberView::healthy);
    let reason = |v: &MemberView| match &v.status {
        Ok(s) if s.ready => String::new(),
        Ok(s) => s.not_ready_reason.clone(),
        Err(e) => format!("unreachable: {e}"),
    };
    match output {
        Output::Json => {
            let rows: Vec<_> = views
                .iter()
                .map(|v| {
                    json!({
                        "id": v.member.id,
                        "endpoint": v.member.client_addr,
                        "reachable": v.status.is_ok(),
                        "ready": v.status.as_ref().is_ok_and(|s| s.ready),
                        "healthy": v.healthy(),
                        "took_ms": v.took.as_millis() as u64,
                        "lag": lag.get(&v.member.id).copied().unwrap_or(0),
                        "error": reason(v),
                    })
                })
                .collect();
            print_json(&json!({"healthy": all, "members": rows}));
        }
        Output::Table => {
            for v in &views {
                let lag = lag.get(&v.member.id).copied().unwrap_or(0);
                if v.healthy() {
                    out(format!(
                        "{} (node {}) is healthy: took {:.1} ms, lag {lag} entries",
                        v.member.client_addr,
                        v.member.id,
                        v.took.as_secs_f64() * 1000.0
                    ));
                } else {
                    out(format!(
                        "{} (node {}) is unhealthy: {}",
                        v.member.client_addr,
                        v.member.id,
                        reason(v)
                    ));
                }
            }
        }
    }
    Ok(if all { Exit::Done } else { Exit::No })
}
