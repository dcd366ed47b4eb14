//! `calm dev`: a local cluster of `calm serve` processes for trying calm out.
//!
//! Node i (1-based) listens on 127.0.0.1: client API `base + i`, peer traffic `base + 100 + i`,
//! HTTP `base + 200 + i`, with data under `<data-dir>/node-<i>`. The nodes are separate
//! processes (this same binary), so `kill -9` on one is a real crash. Ctrl-C stops them all;
//! their data stays, and the next `calm dev` continues from it.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct DevOptions {
    pub nodes: u64,
    pub data_dir: PathBuf,
    pub base_port: u16,
    pub rules: Option<PathBuf>,
}

/// Most nodes `calm dev` starts.
pub const DEV_NODES_MAX: u64 = 9;
/// How long the cluster may take to elect every group's leader before `calm dev` says so.
const READY_WAIT: Duration = Duration::from_secs(30);

struct Addrs {
    client: String,
    peer: String,
    http: String,
}

fn addrs(base: u16, id: u64) -> Addrs {
    let port = |offset: u64| format!("127.0.0.1:{}", base as u64 + offset + id);
    Addrs {
        client: port(0),
        peer: port(100),
        http: port(200),
    }
}

fn spawn_node(exe: &Path, options: &DevOptions, id: u64, log_dir: &Path) -> Result<Child> {
    let me = addrs(options.base_port, id);
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .args(["--id", &id.to_string()])
        .arg("--data-dir")
        .arg(options.data_dir.join(format!("node-{id}")))
        .args(["--client-addr", &me.client])
        .args(["--peer-addr", &me.peer])
        .args(["--http-addr", &me.http])
        // Several nodes share this machine's cores: one worker each wakes faster (measured
        // in docs/benchmarks.md).
        .args(["--threads", "1"]);
    for m in members(options) {
        cmd.args(["--member", &format!("{}={},{}", m.id, m.peer, m.client)]);
    }
    if let Some(rules) = &options.rules {
        cmd.arg("--rules").arg(rules);
    }
    // Appended to, never truncated: the log of an earlier run (or of a crash being looked
    // into) stays, with this run's lines after it.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join(format!("node-{id}.log")))
        .context("cannot open the node's log file")?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // A node outlives no `calm dev`: killed (or crashed) without its Ctrl-C handling, it
    // would leave the nodes running on their ports and directories. The kernel sends SIGTERM
    // when the thread that started the node exits (a runtime worker: the process's life).
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start node {id} ({})", exe.display()))
}

/// Most bytes [`log_tail`] reads from the end of a log.
const LOG_TAIL_BYTES_MAX: u64 = 64 << 10;

/// The last `lines` lines of a node's log (empty if it cannot be read), from its last
/// `LOG_TAIL_BYTES_MAX` bytes: what a message about a node that stopped shows.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    log_tail_after(path, 0, lines)
}

/// Like [`log_tail`], reading only what was written at or after byte `from` (logs are
/// appended to across runs: a message about this run must not quote an earlier one).
fn log_tail_after(path: &Path, from: u64, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let start = file
            .metadata()?
            .len()
            .saturating_sub(LOG_TAIL_BYTES_MAX)
            .max(from);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        let text = String::from_utf8_lossy(&tail).into_owned();
        // Started mid-file: the first line is a fragment.
        Ok(match text.split_once('\n') {
            Some((_, rest)) if start > from => rest.to_owned(),
            _ => text,
        })
    };
    let text = read().unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn stop_all(nodes: &mut [DevNode]) {
    for DevNode { child, .. } in nodes.iter_mut() {
        // SIGTERM: the node persists its state and exits.
        // SAFETY: kill(2) on a child's pid that we have not reaped yet.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for DevNode { id, child, .. } in nodes.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    eprintln!("calm dev: node {id} did not stop in time; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
}

/// What a node's `/readyz` answered.
enum Readiness {
    /// Nothing answered, or not ready yet.
    No,
    Ready,
    /// Another process answered: its PID (from the `calm-pid` header), if it said.
    Stranger(Option<u32>),
}

/// Ask `http`'s `/readyz`, and check that process `pid` answered.
async fn ready(http: &str, pid: u32) -> Readiness {
    let Ok(mut stream) = tokio::net::TcpStream::connect(http).await else {
        return Readiness::No;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET /readyz HTTP/1.0\r\nHost: {http}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return Readiness::No;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    let Some((head, _)) = text.split_once("\r\n\r\n") else {
        return Readiness::No;
    };
    let answered_by = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case(crate::http::PID_HEADER)
            .then(|| value.trim().parse::<u32>().ok())?
    });
    if answered_by != Some(pid) {
        return Readiness::Stranger(answered_by);
    }
    if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") {
        Readiness::Ready
    } else {
        Readiness::No
    }
}

/// Every port the cluster would use, checked free before any node starts: a port another
/// process holds would otherwise stop one node, or worse, answer our readiness checks for
/// it (another `calm dev` on the same base port).
fn check_ports_free(options: &DevOptions) -> Result<()> {
    for id in 1..=options.nodes {
        let a = addrs(options.base_port, id);
        for (addr, what) in [
            (&a.client, "client API"),
            (&a.peer, "peer traffic"),
            (&a.http, "HTTP"),
        ] {
            if let Err(e) = std::net::TcpListener::bind(addr.as_str()) {
                bail!(
                    "port {addr} (node {id}'s {what}) is not free ({e}); another calm dev or another program uses it: stop it, or pick other ports with --base-port (node i uses base+i, base+100+i and base+200+i)"
                );
            }
        }
    }
    Ok(())
}

/// The member list every node is started with.
fn members(options: &DevOptions) -> Vec<crate::config::Member> {
    (1..=options.nodes)
        .map(|id| {
            let a = addrs(options.base_port, id);
            crate::config::Member {
                id,
                peer: a.peer,
                client: a.client,
            }
        })
        .collect()
}

/// Every node's directory from an earlier run must be of this cluster (the same members:
/// `--nodes` and `--base-port` as then), checked before any node starts, so that a mismatch
/// leaves nothing half started (nodes 4 and 5 of `--nodes 5` on a 3-node directory would
/// otherwise record a cluster of their own).
fn check_existing(options: &DevOptions) -> Result<()> {
    let members = members(options);
    for id in 1..=options.nodes {
        let dir = options.data_dir.join(format!("node-{id}"));
        crate::cluster_record::check(&dir, id, &members).with_context(|| {
            format!(
                "{} holds a cluster created with other settings; run calm dev with the --nodes and --base-port it was created with, or pass another --data-dir (or remove {}) for a new cluster",
                options.data_dir.display(),
                options.data_dir.display()
            )
        })?;
    }
    Ok(())
}

/// The nodes of an earlier run whose data this run continues.
fn existing_nodes(options: &DevOptions) -> Vec<u64> {
    (1..=options.nodes)
        .filter(|id| {
            options
                .data_dir
                .join(format!("node-{id}"))
                .join(crate::cluster_record::CLUSTER_RECORD_FILE)
                .exists()
        })
        .collect()
}

/// A started node: its process, and where this run's part of its log begins.
struct DevNode {
    id: u64,
    child: Child,
    log: PathBuf,
    log_from: u64,
}

pub async fn run(options: DevOptions, shutdown: CancellationToken) -> Result<()> {
    if !(1..=DEV_NODES_MAX).contains(&options.nodes) {
        bail!("--nodes must be within 1..={DEV_NODES_MAX}");
    }
    if options.base_port as u64 + 200 + options.nodes > u16::MAX as u64 {
        bail!(
            "--base-port {} leaves no room for the HTTP ports",
            options.base_port
        );
    }
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("cannot create {}", options.data_dir.display()))?;
    // One `calm dev` per directory: a second one would start nodes on directories in use
    // (they refuse) and write into the running cluster's logs. Held until we return.
    let _dir_lock = calm_raft::dir_lock::DataDirLock::acquire(&options.data_dir)?;
    check_existing(&options)?;
    check_ports_free(&options)?;
    let existing = existing_nodes(&options);
    let exe = std::env::current_exe().context("cannot find the calm binary itself")?;
    let mut nodes: Vec<DevNode> = Vec::new();
    for id in 1..=options.nodes {
        let log = options.data_dir.join(format!("node-{id}.log"));
        let log_from = std::fs::metadata(&log).map_or(0, |m| m.len());
        match spawn_node(&exe, &options, id, &options.data_dir) {
            Ok(child) => nodes.push(DevNode {
                id,
                child,
                log,
                log_from,
            }),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e);
            }
        }
    }
    let data = options.data_dir.display();
    if existing.is_empty() {
        println!(
            "calm dev: a new {}-node cluster, data under {data}",
            options.nodes
        );
    } else {
        println!(
            "calm dev: {} nodes, continuing the cluster whose data is under {data} (nodes {} have data from an earlier run; remove {data} for a fresh cluster)",
            options.nodes,
            existing
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for n in &nodes {
        let a = addrs(options.base_port, n.id);
        println!(
            "  node {}: client {}  peer {}  http http://{}  log {}  (PID {})",
            n.id,
            a.client,
            a.peer,
            a.http,
            n.log.display(),
            n.child.id()
        );
    }
    let started = Instant::now();
    let mut all_ready = false;
    while started.elapsed() < READY_WAIT && !shutdown.is_cancelled() {
        let mut ok = true;
        let mut stranger = None;
        for n in &nodes {
            let a = addrs(options.base_port, n.id);
            match ready(&a.http, n.child.id()).await {
                Readiness::Ready => {}
                Readiness::No => ok = false,
                Readiness::Stranger(pid) => {
                    stranger = Some((n.id, a.http, pid));
                    break;
                }
            }
        }
        if let Some((id, http, pid)) = stranger {
            stop_all(&mut nodes);
            bail!(
                "{http} (node {id}'s HTTP port) is answered by another process{}, not by this cluster's node; stop it, or pick other ports with --base-port",
                pid.map(|p| format!(" (PID {p})")).unwrap_or_default()
            );
        }
        if ok {
            all_ready = true;
            break;
        }
        if let Some((id, status, log, log_from)) = nodes.iter_mut().find_map(|n| {
            let status = n.child.try_wait().ok().flatten()?;
            Some((n.id, status, n.log.clone(), n.log_from))
        }) {
            stop_all(&mut nodes);
            // A start-up error is the node's last line, "calm: error: <reason>".
            let line = log_tail_after(&log, log_from, 1);
            let line = line.trim();
            if line.is_empty() {
                bail!(
                    "node {id} exited ({status}) while starting and wrote nothing to its log {}; is its disk full?",
                    log.display()
                );
            }
            bail!(
                "node {id} exited ({status}) while starting: {}\n(the node's log: {})",
                line.strip_prefix("calm: error: ").unwrap_or(line),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let endpoints: Vec<String> = (1..=options.nodes)
        .map(|id| addrs(options.base_port, id).client)
        .collect();
    let endpoints = endpoints.join(",");
    if all_ready {
        println!(
            "calm dev: ready in {:.1} s. In another shell:\n  export CALM_ENDPOINTS={endpoints}\n  calm put greeting hello\n  calm get greeting\n  calm add hits 1\n  calm status --cluster\n(Ctrl-C here stops the cluster; its data stays for the next calm dev)",
            started.elapsed().as_secs_f64()
        );
    } else if !shutdown.is_cancelled() {
        println!(
            "calm dev: not every group has a leader after {} s; the nodes keep trying (see their logs). Clients: export CALM_ENDPOINTS={endpoints}",
            READY_WAIT.as_secs()
        );
    }
    // Until Ctrl-C. A node that dies (say, `kill -9` while experimenting) is reported; the
    // others keep running.
    let mut reported = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for n in nodes.iter_mut() {
            if let Ok(Some(status)) = n.child.try_wait()
                && reported.insert(n.id)
            {
                println!(
                    "calm dev: node {} exited ({status}); the others keep running. Its log: {}",
                    n.id,
                    n.log.display()
                );
            }
        }
        if reported.len() as u64 == options.nodes {
            bail!(
                "every node exited; see their logs under {}",
                options.data_dir.display()
            );
        }
    }
    println!("calm dev: stopping");
    stop_all(&mut nodes);
    Ok(())
}
