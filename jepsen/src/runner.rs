//! One test run end to end: start the cluster, set the workload's rules, prepare its keys
//! (the bank's accounts), run the workload and the nemesis until the deadline, heal, run
//! the final phase, check the history, and write the report directory. The cluster is torn
//! down on every path out of [`run_test`] (its `Drop` runs on errors and panics too).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::checker::{Anomaly, AnomalyKind, Validity, Verdict};
use crate::client::Clients;
use crate::cluster::{Cluster, ClusterError, ClusterSpec, node_name};
use crate::edn::{KeyStyle, write_edn};
use crate::nemesis::{NemesisCtx, NemesisKind, Schedule, set_rules};
use crate::recorder::Recorder;
use crate::report;
use crate::rng::Rng;
use crate::workload::{self, Ctx, Workload};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Run(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

/// How long a workload's preparation (`workload::prepare`) may take on a healthy cluster.
const PREPARE_LIMIT: Duration = Duration::from_secs(30);

/// Everything a run needs; `seed` decides every random choice.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub workload: Workload,
    pub nemesis: Vec<NemesisKind>,
    pub time: Duration,
    pub nodes: usize,
    pub concurrency: usize,
    pub seed: u64,
    /// `strict` or `hybrid`: the mode the workload's keys start in.
    pub mode: &'static str,
    /// `--fault` values for the nodes (test-only bugs).
    pub faults: Vec<String>,
    /// The run passes when the checker finds the history invalid (fault demonstrations).
    pub expect_invalid: bool,
    pub binary: PathBuf,
    pub store: PathBuf,
    pub op_timeout: Duration,
    pub max_ops_per_worker: u64,
    pub think: Duration,
    pub schedule: Schedule,
    pub keep_data: bool,
    /// How long the final phase waits for replicas to agree.
    pub converge_limit: Duration,
}

impl TestOptions {
    /// The workload's keys stay `strict` for the whole run (no rule flips), so counter reads
    /// are linearizable and checked as such.
    pub fn strict_throughout(&self) -> bool {
        self.mode == "strict" && !self.nemesis.contains(&NemesisKind::Rules)
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let nemesis: Vec<&str> = self.nemesis.iter().map(|k| k.name()).collect();
        let mut cmd = format!(
            "cargo run --release -p calm-jepsen -- test --workload {} --nemesis {} --time {} --nodes {} --concurrency {} --mode {} --seed {}",
            self.workload,
            if nemesis.is_empty() {
                "none".to_string()
            } else {
                nemesis.join(",")
            },
            self.time.as_secs(),
            self.nodes,
            self.concurrency,
            self.mode,
            self.seed
        );
        for f in &self.faults {
            cmd.push_str(&format!(" --fault {f}"));
        }
        if self.expect_invalid {
            cmd.push_str(" --expect-invalid");
        }
        cmd
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    pub dir: PathBuf,
    pub valid: Validity,
    /// Valid, or invalid when invalidity was expected.
    pub passed: bool,
    pub duration: Duration,
    pub summary: serde_json::Value,
}

/// `YYYYMMDDTHHMMSS` in UTC (no date crate needed for a directory name).
pub fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn lock(c: &Mutex<Cluster>) -> std::sync::MutexGuard<'_, Cluster> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Nodes that do not answer a status call with a leader for every group.
async fn not_ready(clients: &Clients) -> Vec<usize> {
    let mut out = Vec::new();
    for node in 1..=clients.len() {
        if !matches!(clients.status(node).await,
            Ok(s) if !s.groups.is_empty() && s.groups.iter().all(|g| g.leader != 0))
        {
            out.push(node);
        }
    }
    out
}

/// Save every node's `Admin.Status` and Prometheus metrics into the report directory
/// (`nI.status.txt`, `nI.metrics.txt`): what a run that did not converge or get ready
/// leaves to diagnose it with (version vectors, applied indexes, blocked fetches, gossip
/// exchange outcomes). A node that does not answer gets the error in its file.
async fn save_diagnostics(clients: &Clients, report: &Path) {
    for node in 1..=clients.len() {
        let status = match clients.status(node).await {
            Ok(s) => format!("{s:#?}\n"),
            Err(e) => format!("Admin.Status failed: {e:?}\n"),
        };
        let metrics = match http_get(crate::cluster::node_ip(node), "/metrics").await {
            Ok(text) => text,
            Err(e) => format!("GET /metrics failed: {e}\n"),
        };
        for (what, text) in [("status", status), ("metrics", metrics)] {
            let path = report.join(format!("{}.{what}.txt", node_name(node)));
            if let Err(e) = std::fs::write(&path, text) {
                println!("   cannot write {}: {e}", path.display());
            }
        }
    }
    println!(
        "   every node's status and metrics are in {}/nI.{{status,metrics}}.txt",
        report.display()
    );
}

/// A bounded HTTP/1.0 GET of `path` from a node's HTTP port; the body.
async fn http_get(ip: std::net::Ipv4Addr, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const RESPONSE_BYTES_MAX: u64 = 16 << 20;
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect((ip, crate::cluster::HTTP_PORT)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream
            .take(RESPONSE_BYTES_MAX)
            .read_to_end(&mut raw)
            .await?;
        std::io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    Ok(text
        .split_once("\r\n\r\n")
        .map_or(text.as_ref(), |(_, body)| body)
        .to_string())
}

/// Save gdb backtraces of the nodes that are still not ready into the report directory,
/// and return, per node, where they went (or why there is none).
async fn save_backtraces(
    cluster: &Arc<Mutex<Cluster>>,
    clients: &Clients,
    report: &Path,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for node in not_ready(clients).await {
        let cluster = cluster.clone();
        let taken = tokio::task::spawn_blocking(move || lock(&cluster).backtrace(node))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let path = report.join(format!("{}.backtrace.txt", node_name(node)));
        let saved = taken.and_then(|text| {
            std::fs::write(&path, text)
                .map(|()| path.display().to_string())
                .map_err(|e| format!("writing {}: {e}", path.display()))
        });
        match &saved {
            Ok(p) => println!(
                "   {} is not ready: its threads' stacks are in {p}",
                node_name(node)
            ),
            Err(e) => println!("   {} is not ready; no backtrace: {e}", node_name(node)),
        }
        out.push(json!({"node": node_name(node), "backtrace": saved.unwrap_or_else(|e| e)}));
    }
    out
}

/// Wait until every node reports a leader for every group.
async fn await_ready(
    cluster: &Arc<Mutex<Cluster>>,
    clients: &Clients,
    limit: Duration,
) -> Result<Duration, RunError> {
    let started = Instant::now();
    loop {
        let crashed = lock(cluster).crashed();
        if let Some((n, status)) = crashed.first() {
            let n = *n;
            return Err(RunError::Run(format!(
                "node {} exited ({status}) while starting; its log ends:\n{}",
                node_name(n),
                lock(cluster).log_tail(n, 20)
            )));
        }
        let not_ready = not_ready(clients).await;
        let Some(&first) = not_ready.first() else {
            return Ok(started.elapsed());
        };
        if started.elapsed() > limit {
            let names: Vec<String> = not_ready.iter().map(|&n| node_name(n)).collect();
            return Err(RunError::Run(format!(
                "{} did not report a leader for every group within {limit:?}; {}'s log ends:\n{}",
                names.join(", "),
                node_name(first),
                lock(cluster).log_tail(first, 12)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn unique_dir(store: &Path, workload: Workload) -> Result<PathBuf, RunError> {
    let stamp = timestamp(SystemTime::now());
    for i in 0.. {
        let name = if i == 0 {
            format!("{workload}-{stamp}")
        } else {
            format!("{workload}-{stamp}-{i}")
        };
        let dir = store.join(name);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
            return Ok(dir);
        }
    }
    unreachable!("some directory name is free")
}

/// Run one test and write its report.
pub async fn run_test(opts: &TestOptions, stop: Arc<AtomicBool>) -> Result<TestOutcome, RunError> {
    let started = Instant::now();
    let dir = unique_dir(&opts.store, opts.workload)?;
    println!(
        "== {} · seed {} · {} nodes · nemesis {} · {} s · report {}",
        opts.workload,
        opts.seed,
        opts.nodes,
        opts.nemesis
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(","),
        opts.time.as_secs(),
        dir.display()
    );
    let rec = Arc::new(
        Recorder::new(Some(&dir.join("history.jsonl"))).map_err(io("creating history.jsonl"))?,
    );
    let spec = ClusterSpec {
        nodes: opts.nodes,
        binary: opts.binary.clone(),
        dir: dir.join("nodes"),
        faketime: opts.nemesis.contains(&NemesisKind::Clock),
        faults: opts.faults.clone(),
        env: Vec::new(),
    };
    let cluster = Arc::new(Mutex::new(
        tokio::task::spawn_blocking(move || Cluster::start(spec))
            .await
            .map_err(|e| RunError::Run(e.to_string()))??,
    ));
    let clients = Clients::new(opts.nodes, opts.op_timeout);
    let result = drive(opts, &cluster, &clients, &rec, stop, started, &dir).await;
    // Tear down before checking: the check wants the cores.
    {
        let mut c = lock(&cluster);
        c.teardown();
        if !opts.keep_data {
            c.remove_data();
        }
    }
    rec.flush();
    let (ready_s, converged, crashes, disagreement) = result?;
    let history = rec
        .history()
        .map_err(|e| RunError::Run(format!("the recorded history is malformed: {e}")))?;
    let workload = opts.workload;
    let strict_throughout = opts.strict_throughout();
    let checked = {
        let history = history.clone();
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            workload
                .checker(strict_throughout)
                .check(&history)
                .map(|v| (v, t.elapsed()))
        })
        .await
        .map_err(|e| RunError::Run(e.to_string()))?
    };
    let (mut verdict, check_time) = checked.map_err(|e| RunError::Run(format!("checker: {e}")))?;
    // The register checker sees values only; replicas that disagree on a version (or on
    // anything, if final reads failed) are a finding of their own. The counter and set
    // checkers compare final reads themselves.
    if let (Workload::Register, Some(d)) = (workload, disagreement) {
        verdict.anomalies.push(Anomaly {
            kind: AnomalyKind::FinalReadsDiverge,
            key: d.split(':').next().map(str::to_owned),
            ops: Vec::new(),
            explanation: format!("replicas still disagree after heal: {d}"),
        });
        verdict.valid = Validity::Invalid;
    }
    write_report(
        opts, &dir, &history, &verdict, check_time, ready_s, converged, crashes, started,
    )
}

/// Seconds to first readiness, convergence time, node crashes seen, and the replicas'
/// disagreement at the end of the final phase (if they never agreed).
type Driven = (
    f64,
    Option<Duration>,
    Vec<serde_json::Value>,
    Option<String>,
);

/// The live part of a run: returns (seconds to first readiness, convergence time, node
/// crashes seen).
async fn drive(
    opts: &TestOptions,
    cluster: &Arc<Mutex<Cluster>>,
    clients: &Clients,
    rec: &Arc<Recorder>,
    stop: Arc<AtomicBool>,
    started: Instant,
    report: &Path,
) -> Result<Driven, RunError> {
    let ready = await_ready(cluster, clients, Duration::from_secs(90)).await?;
    println!(
        "   cluster ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rules = opts.workload.rules();
    let version = set_rules(clients, 1, &rules, opts.mode)
        .await
        .map_err(|e| RunError::Run(format!("setting the workload's rules: {e}")))?;
    rec.nemesis(
        "rules",
        json!({"mode": opts.mode, "version": version, "initial": true}),
    );
    // SetRules answers once the metadata group committed the change; other nodes switch when
    // they apply it. The workload starts only once every node has: a key created by a node
    // still on the old rules would get the old rules' type (e.g. an unbounded counter).
    let waited = Instant::now();
    'nodes: for node in 1..=opts.nodes {
        loop {
            if matches!(clients.status(node).await, Ok(s) if s.rules_version >= version) {
                continue 'nodes;
            }
            if waited.elapsed() > Duration::from_secs(30) {
                return Err(RunError::Run(format!(
                    "{} did not apply rules version {version} within 30 s",
                    node_name(node)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Before the deadline starts and before the nemesis: the load begins on a known state.
    let prepared = workload::prepare(opts.workload, clients, rec, PREPARE_LIMIT)
        .await
        .map_err(|e| RunError::Run(format!("preparing the {} workload: {e}", opts.workload)))?;
    if let Some(took) = prepared {
        println!("   workload prepared in {:.1} s", took.as_secs_f64());
    }
    let mut rng = Rng::new(opts.seed);
    let deadline = Instant::now() + opts.time;
    let ctx = Arc::new(Ctx {
        clients: clients.clone(),
        rec: rec.clone(),
        nodes: opts.nodes,
        deadline,
        stop: stop.clone(),
        max_ops: opts.max_ops_per_worker,
        think: opts.think,
        linearizable_counter_reads: opts.strict_throughout(),
    });
    let nemesis = Arc::new(NemesisCtx {
        cluster: cluster.clone(),
        clients: clients.clone(),
        rec: rec.clone(),
        rules,
        mode: Mutex::new(opts.mode),
        stop: stop.clone(),
    });
    let nemesis_rng = rng.fork(0xE5E5);
    let kinds = opts.nemesis.clone();
    let schedule = opts.schedule;
    let nem = {
        let nemesis = nemesis.clone();
        tokio::spawn(async move { nemesis.run(&kinds, schedule, nemesis_rng, deadline).await })
    };
    let watchers = workload::run(opts.workload, ctx.clone(), opts.concurrency, &mut rng).await;
    let nemesis_result = nem.await.map_err(|e| RunError::Run(e.to_string()))?;
    if let Err(e) = nemesis_result {
        return Err(RunError::Run(format!("nemesis: {e}")));
    }
    // Heal everything: partitions, pauses, clocks, and nodes that died on their own.
    let mut crashes = Vec::new();
    {
        let mut c = lock(cluster);
        c.heal()?;
        for n in 1..=c.len() {
            c.resume(n);
            c.set_clock_offset(n, 0.0)?;
        }
        for (n, status) in c.crashed() {
            let tail = c.log_tail(n, 30);
            tracing::error!(node = n, %status, "node exited on its own during the run");
            rec.nemesis(
                "node_exited",
                json!({"node": node_name(n), "status": status}),
            );
            crashes.push(json!({"node": node_name(n), "status": status, "log_tail": tail}));
            c.kill(n);
        }
        for n in 1..=c.len() {
            c.spawn(n)?;
        }
    }
    rec.nemesis("heal_all", json!(null));
    // A node that never gets ready again after heal is a finding, not a harness error: the
    // history is still checked (its final reads at that node fail).
    if let Err(e) = await_ready(cluster, clients, Duration::from_secs(60)).await {
        tracing::error!(error = %e, "the cluster is not ready after heal");
        rec.nemesis("not_ready_after_heal", json!({"error": e.to_string()}));
        crashes.push(json!({"node": "cluster", "status": "not ready 60 s after heal", "log_tail": e.to_string()}));
        save_diagnostics(clients, report).await;
        crashes.extend(save_backtraces(cluster, clients, report).await);
        // Still read what the nodes that answer have: conservation is checked on those.
        if opts.workload.has_final_phase() {
            let ctx = Ctx {
                deadline: Instant::now() + Duration::from_secs(60),
                ..Ctx::clone_shallow(&ctx)
            };
            let _ = workload::final_phase(opts.workload, &ctx, Duration::from_secs(5)).await;
        }
        if let Some(w) = watchers {
            let _ = w.finish(Duration::from_secs(10)).await;
        }
        return Ok((ready.as_secs_f64(), None, crashes, None));
    }
    let mismatched = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || lock(&cluster).verify_connectivity())
            .await
            .map_err(|e| RunError::Run(e.to_string()))?
    };
    if !mismatched.is_empty() {
        return Err(RunError::Run(format!(
            "after heal these node pairs still cannot connect: {mismatched:?}"
        )));
    }
    let (converged, disagreement) = if let Some(w) = watchers {
        // The watch workload's final phase: every watcher receives every acknowledged write
        // (what it still lacks at the limit, the checker reports as lost).
        match w.finish(opts.converge_limit).await {
            Ok(d) => {
                println!("   watchers caught up {:.2} s after heal", d.as_secs_f64());
                (Some(d), None)
            }
            Err(missing) => {
                println!("   watchers did NOT catch up after heal ({missing})");
                save_diagnostics(clients, report).await;
                (None, None)
            }
        }
    } else if opts.workload.has_final_phase() {
        let ctx = Ctx {
            deadline: Instant::now() + opts.converge_limit + Duration::from_secs(60),
            ..Ctx::clone_shallow(&ctx)
        };
        match workload::final_phase(opts.workload, &ctx, opts.converge_limit).await {
            Ok(d) => {
                println!("   replicas converged {:.2} s after heal", d.as_secs_f64());
                (Some(d), None)
            }
            Err(disagreement) => {
                println!(
                    "   replicas did NOT converge within {:?} after heal ({disagreement})",
                    opts.converge_limit
                );
                save_diagnostics(clients, report).await;
                (None, Some(disagreement))
            }
        }
    } else {
        (None, None)
    };
    Ok((ready.as_secs_f64(), converged, crashes, disagreement))
}

impl Ctx {
    /// A copy sharing the clients and the recorder.
    pub fn clone_shallow(&self) -> Ctx {
        Ctx {
            clients: self.clients.clone(),
            rec: self.rec.clone(),
            nodes: self.nodes,
            deadline: self.deadline,
            stop: self.stop.clone(),
            max_ops: self.max_ops,
            think: self.think,
            linearizable_counter_reads: self.linearizable_counter_reads,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    opts: &TestOptions,
    dir: &Path,
    history: &crate::History,
    verdict: &Verdict,
    check_time: Duration,
    ready_s: f64,
    converged: Option<Duration>,
    crashes: Vec<serde_json::Value>,
    started: Instant,
) -> Result<TestOutcome, RunError> {
    let edn = std::fs::File::create(dir.join("history.edn")).map_err(io("creating history.edn"))?;
    write_edn(history, edn, KeyStyle::Field)
        .map_err(|e| RunError::Run(format!("writing history.edn: {e}")))?;
    let title = format!("calm-jepsen {} (seed {})", opts.workload, opts.seed);
    std::fs::write(
        dir.join("latency.svg"),
        report::latency_svg(history, &title),
    )
    .map_err(io("writing latency.svg"))?;
    std::fs::write(
        dir.join("throughput.svg"),
        report::throughput_svg(history, &title),
    )
    .map_err(io("writing throughput.svg"))?;
    let valid = if crashes.is_empty() {
        verdict.valid
    } else {
        // A node that died on its own is a bug whatever the history says.
        Validity::Invalid
    };
    let passed = if opts.expect_invalid {
        valid == Validity::Invalid
    } else {
        valid == Validity::Valid
    };
    let duration = started.elapsed();
    let counts = report::op_counts(history);
    let windows = report::nemesis_windows(history);
    let summary = json!({
        "workload": opts.workload.name(),
        "seed": opts.seed,
        "nodes": opts.nodes,
        "concurrency": opts.concurrency,
        "nemesis": opts.nemesis.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "time_s": opts.time.as_secs(),
        "mode": opts.mode,
        "faults": opts.faults,
        "expect_invalid": opts.expect_invalid,
        "valid": valid,
        "passed": passed,
        "verdict": verdict,
        "ops": counts,
        "nemesis_windows": windows,
        "ready_after_s": ready_s,
        "converged_after_heal_s": converged.map(|d| d.as_secs_f64()),
        "node_crashes": crashes,
        "check_s": check_time.as_secs_f64(),
        "duration_s": duration.as_secs_f64(),
        "replay": opts.replay_command(),
    });
    let mut text = format!(
        "calm-jepsen {}: {}{}\nseed {} · {} nodes · {} workers · nemesis {} · {} s · mode {} · faults {}\n",
        opts.workload,
        valid,
        if opts.expect_invalid {
            format!(
                " (invalid expected: {})",
                if passed { "PASS" } else { "FAIL" }
            )
        } else {
            String::new()
        },
        opts.seed,
        opts.nodes,
        opts.concurrency,
        summary["nemesis"],
        opts.time.as_secs(),
        opts.mode,
        if opts.faults.is_empty() {
            "none".to_string()
        } else {
            opts.faults.join(",")
        },
    );
    text.push_str(&format!(
        "ops: {} ok, {} fail, {} info; {} nemesis events; {} fault windows\n",
        counts["ok"],
        counts["fail"],
        counts["info"],
        counts["nemesis"],
        windows.len()
    ));
    let converging = if opts.workload == Workload::Watch {
        ("watchers caught up", "watchers did NOT catch up")
    } else {
        ("replicas converged", "replicas did NOT converge")
    };
    match converged {
        Some(d) => text.push_str(&format!(
            "{} {:.2} s after heal\n",
            converging.0,
            d.as_secs_f64()
        )),
        None if opts.workload.has_final_phase() || opts.workload == Workload::Watch => {
            text.push_str(&format!("{} after heal\n", converging.1))
        }
        None => {}
    }
    for c in &crashes {
        text.push_str(&format!(
            "NODE {} EXITED ON ITS OWN ({}); log tail:\n{}\n",
            c["node"],
            c["status"],
            c["log_tail"].as_str().unwrap_or("")
        ));
    }
    text.push_str(&format!(
        "checked in {:.2} s; run took {:.1} s\n\n{verdict}\nreplay: {}\n",
        check_time.as_secs_f64(),
        duration.as_secs_f64(),
        opts.replay_command()
    ));
    std::fs::write(dir.join("summary.txt"), &text).map_err(io("writing summary.txt"))?;
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary).expect("a JSON value serializes"),
    )
    .map_err(io("writing summary.json"))?;
    report::write_index(dir, &title, &text).map_err(io("writing index.html"))?;
    print!("{text}");
    Ok(TestOutcome {
        dir: dir.to_owned(),
        valid,
        passed,
        duration,
        summary,
    })
}
