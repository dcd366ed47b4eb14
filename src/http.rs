//! HTTP for operators: `/metrics` (Prometheus), `/healthz` (the process runs), `/readyz`
//! (every group has a leader this node knows, so every key can be served), and `/` (a small
//! status page: members, groups, leaders, lag).

use crate::node::Node;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::fmt::Write;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How often histogram observations are folded into their buckets between scrapes.
const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder (once; every node a process runs shares
/// it) and returns its handle. A node calls this before it opens its WAL, so that what
/// recovery and start-up write is counted too.
pub(crate) fn install_metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        use calm_raft::{consensus, wal};
        // Histograms with buckets (not summaries) aggregate across nodes, as etcd's do.
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &wal::SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(wal::METRIC_GROUP_BATCHES.to_string()),
                    &wal::GROUP_BATCHES_BUCKETS,
                )
            })
            .expect("the bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (e.g. by a test harness); the
        // handle then renders nothing, which is visible on /metrics.
        let _ = metrics::set_global_recorder(recorder);
        // The recorder keeps every histogram observation until it is folded into buckets, by
        // a scrape or by this upkeep: without it, a node nobody scrapes grows by a few dozen
        // bytes per write, forever. A thread, not a task: the recorder outlives any one
        // runtime (tests run many nodes in one process).
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("calm-metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the metrics upkeep thread; histograms are folded only when /metrics is scraped");
        }
        wal::describe_metrics();
        consensus::metrics::describe_metrics();
        consensus::health::describe_metrics();
        crate::api::describe_metrics();
        crate::gossip::describe_metrics();
        handle
    })
}

/// Response header naming the PID of the process that served an HTTP request.
pub const PID_HEADER: &str = "calm-pid";

#[derive(Clone)]
struct AppState {
    node: Arc<Node>,
}

pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: CancellationToken) {
    let handle = install_metrics();
    let app = Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(move |State(state): State<AppState>| async move {
                record_raft_gauges(&state.node);
                handle.render()
            }),
        )
        .with_state(AppState { node })
        // Who answered: `calm dev` checks that its own node did, not another process that
        // holds the port.
        .layer(axum::middleware::map_response(
            |mut response: axum::response::Response| async move {
                response.headers_mut().insert(
                    PID_HEADER,
                    axum::http::HeaderValue::from(std::process::id()),
                );
                response
            },
        ));
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

/// Per-group gauges, sampled when scraped.
fn record_raft_gauges(node: &Node) {
    for g in node.consensus.group_map().all() {
        let m = node.metrics(g);
        let group = g.to_string();
        let leader = m.current_leader == Some(node.id());
        metrics::gauge!("calm_raft_is_leader", "group" => group.clone()).set(if leader {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("calm_raft_term", "group" => group.clone()).set(m.current_term as f64);
        let live = node.consensus.health(g).live;
        metrics::gauge!(calm_raft::consensus::health::METRIC_HAS_LEADER, "group" => group.clone())
            .set(if live { 1.0 } else { 0.0 });
        metrics::gauge!("calm_raft_applied_index", "group" => group)
            .set(m.last_applied.map_or(0, |l| l.index) as f64);
    }
}

/// 200 while every group has a live leader (see `crate::api::health`), else 503 saying
/// which groups lack one.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.node.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// How often the status page reloads itself.
const STATUS_PAGE_REFRESH_SECONDS: u32 = 5;

async fn status_page(State(state): State<AppState>) -> Html<String> {
    let s = state.node.status();
    // Every member's own answer (bounded per member), for up/down and the links to their
    // pages: only a member's own status knows its HTTP address.
    let views = crate::cli::cluster::member_statuses(&s.members).await;
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html><html><head><meta charset=utf-8><title>calm node {id}</title>\
         <meta http-equiv=refresh content={refresh}>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}\
         .down{{color:#b00;font-weight:bold}}.up{{color:#070}}</style></head><body>\
         <h1>calm node {id}</h1><p>cluster {cluster}, {ready}, version {version}, up {up} s, \
         {keys} keys, {disk} on disk, rules version {rules}, WAL {backend} (next LSN {lsn}), \
         last checkpoint {cp}. This page reloads every {refresh} s.</p><h2>Members</h2><table>\
         <tr><th>id</th><th>state</th><th>client</th><th>peer</th><th>last contact</th>\
         <th>ready</th><th>page</th></tr>",
        id = s.node_id,
        refresh = STATUS_PAGE_REFRESH_SECONDS,
        cluster = escape(&s.cluster_id),
        ready = if s.ready {
            "ready".to_string()
        } else {
            format!("<span class=down>{}</span>", escape(&s.not_ready_reason))
        },
        version = escape(&s.version),
        up = s.uptime_seconds,
        keys = s.keys,
        disk = crate::cli::admin::bytes_text(s.disk_bytes),
        rules = s.rules_version,
        backend = s.wal.as_ref().map_or(String::new(), |w| escape(&w.backend)),
        lsn = s.wal.as_ref().map_or(0, |w| w.next_lsn),
        cp = s.checkpoint,
    );
    for v in &views {
        let m = &v.member;
        let (state_cell, ready, link) = match &v.status {
            Ok(other) => (
                "<span class=up>up</span>".to_string(),
                if other.ready { "yes" } else { "no" },
                format!("<a href=\"http://{0}/\">{0}</a>", escape(&other.http_addr)),
            ),
            Err(e) => (
                format!("<span class=down title=\"{}\">down</span>", escape(e)),
                "",
                String::new(),
            ),
        };
        let contact = if m.id == s.node_id {
            "(this node)".to_string()
        } else {
            crate::cli::admin::ago(m.last_contact_ms)
        };
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{state_cell}</td><td>{}</td><td>{}</td><td>{contact}</td><td>{ready}</td><td>{link}</td></tr>",
            m.id,
            escape(&m.client_addr),
            escape(&m.peer_addr)
        );
    }
    page.push_str(
        "</table><h2>Groups</h2><table><tr><th>group</th><th>role</th><th>leader</th>\
         <th>term</th><th>last log</th><th>applied</th><th>snapshot</th><th>max follower lag</th></tr>",
    );
    for g in &s.groups {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            g.id,
            g.role,
            escape(&crate::cli::admin::leader_cell(g)),
            g.term,
            g.last_log_index,
            g.applied_index,
            g.snapshot_index,
            g.max_follower_lag
        );
    }
    page.push_str(
        "</table><h2>Facts applied per origin</h2><table><tr><th>origin</th><th>seq</th></tr>",
    );
    let mut vv: Vec<_> = s.version_vector.iter().collect();
    vv.sort();
    for (origin, seq) in vv {
        let _ = write!(page, "<tr><td>{origin}</td><td>{seq}</td></tr>");
    }
    page.push_str(
        "</table><p><a href=/metrics>metrics</a> · <a href=/readyz>readiness</a></p></body></html>",
    );
    Html(page)
}
