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
    for m in 1..=options.nodes {
        let a = addrs(options.base_port, m);
        cmd.args(["--member", &format!("{m}={},{}", a.peer, a.client)]);
    }
    if let Some(rules) = &options.rules {
        cmd.arg("--rules").arg(rules);
    }
    let log = std::fs::File::create(log_dir.join(format!("node-{id}.log")))
        .context("cannot create the node's log file")?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn()
        .with_context(|| format!("cannot start node {id} ({})", exe.display()))
}

/// Most bytes [`log_tail`] reads from the end of a log.
const LOG_TAIL_BYTES_MAX: u64 = 64 << 10;

/// The last `lines` lines of a node's log (empty if it cannot be read), from its last
/// `LOG_TAIL_BYTES_MAX` bytes: what a message about a node that stopped shows.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let start = file.metadata()?.len().saturating_sub(LOG_TAIL_BYTES_MAX);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        let text = String::from_utf8_lossy(&tail).into_owned();
        // Started mid-file: the first line is a fragment.
        Ok(match text.split_once('\n') {
            Some((_, rest)) if start > 0 => rest.to_owned(),
            _ => text,
        })
    };
    let text = read().unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn stop_all(children: &mut [(u64, Child)]) {
    for (_, child) in children.iter_mut() {
        // SIGTERM: the node persists its state and exits.
        // SAFETY: kill(2) on a child's pid that we have not reaped yet.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (id, child) in children.iter_mut() {
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

async fn ready(http: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(http).await else {
        return false;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET /readyz HTTP/1.0\r\nHost: {http}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut response)).await;
    response.starts_with(b"HTTP/1.0 200") || response.starts_with(b"HTTP/1.1 200")
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
    let exe = std::env::current_exe().context("cannot find the calm binary itself")?;
    let mut children = Vec::new();
    for id in 1..=options.nodes {
        match spawn_node(&exe, &options, id, &options.data_dir) {
            Ok(child) => children.push((id, child)),
            Err(e) => {
                stop_all(&mut children);
                return Err(e);
            }
        }
    }
    println!(
        "calm dev: {} nodes, data under {}",
        options.nodes,
        options.data_dir.display()
    );
    for id in 1..=options.nodes {
        let a = addrs(options.base_port, id);
        println!(
            "  node {id}: client {}  peer {}  http http://{}  log {}",
            a.client,
            a.peer,
            a.http,
            options.data_dir.join(format!("node-{id}.log")).display()
        );
    }
    let started = Instant::now();
    let mut all_ready = false;
    while started.elapsed() < READY_WAIT && !shutdown.is_cancelled() {
        let mut ok = true;
        for id in 1..=options.nodes {
            ok &= ready(&addrs(options.base_port, id).http).await;
        }
        if ok {
            all_ready = true;
            break;
        }
        if let Some((id, status)) = children
            .iter_mut()
            .find_map(|(id, c)| c.try_wait().ok().flatten().map(|s| (*id, s)))
        {
            stop_all(&mut children);
            let log = options.data_dir.join(format!("node-{id}.log"));
            // A start-up error is the node's last line, "calm: error: <reason>".
            let line = log_tail(&log, 1);
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
    if all_ready {
        let first = addrs(options.base_port, 1).client;
        println!(
            "calm dev: ready in {:.1} s. Try:\n  calm put greeting hello\n  calm get greeting\n  calm add hits 1\n  calm status\n(clients use {first} by default; Ctrl-C stops the cluster)",
            started.elapsed().as_secs_f64()
        );
    } else if !shutdown.is_cancelled() {
        println!(
            "calm dev: not every group has a leader after {} s; the nodes keep trying (see their logs)",
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
        for (id, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait()
                && reported.insert(*id)
            {
                println!(
                    "calm dev: node {id} exited ({status}); the others keep running. Its log: {}",
                    options.data_dir.join(format!("node-{id}.log")).display()
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
    stop_all(&mut children);
    Ok(())
}
