//! Real `calm serve` processes, each in its own network namespace, and the faults done to
//! them: iptables partitions, kill -9 / restart, SIGSTOP / SIGCONT, and clock skew through
//! libfaketime.
//!
//! Topology: one bridge `calmj-br` (10.77.0.254/24) in the root namespace; node `i` lives in
//! namespace `calmj-n{i}` with a veth pair (`calmj-v{i}` on the bridge, `eth0` inside) and
//! address 10.77.0.i. The harness stays in the root namespace and reaches every node over the
//! bridge; partitions only drop node-to-node traffic (INPUT by source address inside the
//! receiving namespace), so clients keep reaching every node, as in Jepsen.
//!
//! Every name starts with `calmj`, so [`cleanup_leftovers`] can remove what a crashed run
//! left behind (processes found with `ip netns pids`, killed by PID). [`Cluster`]'s `Drop`
//! kills its nodes and removes its namespaces and bridge on every exit path that unwinds.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Prefix of every namespace, link and bridge the harness creates.
pub const PREFIX: &str = "calmj";
pub const BRIDGE: &str = "calmj-br";
pub const CLIENT_PORT: u16 = 7001;
pub const PEER_PORT: u16 = 7101;
pub const HTTP_PORT: u16 = 7201;
/// The harness's own address on the bridge.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
pub const MAX_NODES: usize = 9;
/// Held (flock) by the run that owns the `calmj` names: two runs would tear down each
/// other's namespaces.
pub const LOCK_FILE: &str = "/run/lock/calm-jepsen.lock";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "needs root: network namespaces, veth links and iptables rules need CAP_NET_ADMIN (run as root, e.g. sudo)"
    )]
    NotRoot,
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error(
        "another calm-jepsen run is active (it holds {LOCK_FILE}); runs share the calmj-* namespaces, so wait for it to end"
    )]
    Busy,
}

/// The exclusive right to the harness's namespaces, released when dropped.
#[derive(Debug)]
pub struct RunLock(#[allow(dead_code)] std::fs::File);

impl RunLock {
    /// Take the lock without waiting.
    pub fn acquire() -> Result<RunLock, ClusterError> {
        use std::os::fd::AsRawFd;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .map_err(io(format!("opening {LOCK_FILE}")))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(ClusterError::Busy);
        }
        Ok(RunLock(file))
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// Run a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String, ClusterError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {program}")))?;
    if !out.status.success() {
        return Err(ClusterError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command whose failure is expected sometimes (cleanup of what may not exist).
fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Why a live run cannot happen on this machine, if it cannot.
pub fn unsupported() -> Option<String> {
    if !is_root() {
        return Some(ClusterError::NotRoot.to_string());
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 iptables)"
            ));
        }
    }
    None
}

pub fn ns_name(i: usize) -> String {
    format!("{PREFIX}-n{i}")
}

pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, i as u8)
}

pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Remove every namespace, link and process a previous run (even a crashed one) left.
pub fn cleanup_leftovers() {
    let namespaces = sh("ip", &["netns", "list"]).unwrap_or_default();
    for line in namespaces.lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        if !ns.starts_with(PREFIX) {
            continue;
        }
        // Kill by PID the processes still living in the namespace, then remove it.
        let pids = sh("ip", &["netns", "pids", ns]).unwrap_or_default();
        for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            tracing::warn!(ns, pid, "killing a leftover process of an earlier run");
            // SAFETY: kill(2) on a PID that lives in our own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if !pids.trim().is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        }
        sh_quiet("ip", &["netns", "del", ns]);
    }
    let links = sh("ip", &["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        if let Some(name) = line.split(':').nth(1) {
            let name = name.trim().split('@').next().unwrap_or("");
            if name.starts_with(PREFIX) {
                sh_quiet("ip", &["link", "del", name]);
            }
        }
    }
}

/// How to start the nodes.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub binary: PathBuf,
    /// Per-node directories (data, log, clock file) go under it.
    pub dir: PathBuf,
    /// Start nodes under libfaketime so their clocks can be skewed during the run.
    pub faketime: bool,
    /// `--fault` values passed to every node (test-only bugs).
    pub faults: Vec<String>,
    /// Extra `CALM_*` settings.
    pub env: Vec<(String, String)>,
}

struct NodeProc {
    child: Option<Child>,
    paused: bool,
}

/// The running cluster. Node numbers are 1-based, as in calm.
pub struct Cluster {
    pub spec: ClusterSpec,
    procs: Vec<NodeProc>,
    /// Per receiving node: the nodes whose packets it drops.
    blocked: Vec<BTreeSet<usize>>,
    torn_down: bool,
    /// Dropped after `teardown` (fields drop after `Drop::drop`).
    _lock: RunLock,
}

/// Settings for a few shared cores: generous election timeouts, few groups. The nodes' log
/// filter is `CALM_JEPSEN_NODE_LOG` when set (e.g. `info,calm=debug` to debug a run).
fn default_env() -> Vec<(String, String)> {
    let log = std::env::var("CALM_JEPSEN_NODE_LOG").unwrap_or_else(|_| "info,openraft=warn".into());
    let mut env: Vec<(String, String)> = [
        ("CALM_RAFT__DATA_GROUPS", "4"),
        ("CALM_RAFT__HEARTBEAT_MS", "100"),
        ("CALM_RAFT__ELECTION_TIMEOUT_MIN_MS", "1000"),
        ("CALM_RAFT__ELECTION_TIMEOUT_MAX_MS", "2000"),
        ("CALM_RAFT__REQUEST_TIMEOUT_MS", "3000"),
        ("CALM_RAFT__BALANCE_LEADERS_INTERVAL_MS", "3000"),
        ("CALM_STORAGE__WAL_SEGMENT_BYTES_MAX", "8388608"),
        ("CALM_THREADS", "1"),
        // Plain logs: they end up in reports.
        ("NO_COLOR", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.push(("CALM_LOG".into(), log));
    env
}

impl Cluster {
    /// Create the network and start every node (not yet waiting for leaders).
    pub fn start(spec: ClusterSpec) -> Result<Cluster, ClusterError> {
        if !is_root() {
            return Err(ClusterError::NotRoot);
        }
        if !(3..=MAX_NODES).contains(&spec.nodes) {
            return Err(ClusterError::Setup(format!(
                "--nodes {}: use 3 to {MAX_NODES}",
                spec.nodes
            )));
        }
        if !spec.binary.exists() {
            return Err(ClusterError::Setup(format!(
                "the node binary {} does not exist; build it with `cargo build --release -p calm --bin calm` or pass --binary",
                spec.binary.display()
            )));
        }
        let lock = RunLock::acquire()?;
        if spec.faketime {
            ensure_faketime()?;
        }
        cleanup_leftovers();
        let n = spec.nodes;
        let mut cluster = Cluster {
            spec,
            procs: (0..n)
                .map(|_| NodeProc {
                    child: None,
                    paused: false,
                })
                .collect(),
            blocked: vec![BTreeSet::new(); n],
            torn_down: false,
            _lock: lock,
        };
        cluster.create_network()?;
        for i in 1..=n {
            std::fs::create_dir_all(cluster.node_dir(i))
                .map_err(io(format!("creating {}", cluster.node_dir(i).display())))?;
            cluster.set_clock_offset(i, 0.0)?;
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    fn create_network(&self) -> Result<(), ClusterError> {
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        sh(
            "ip",
            &["addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE],
        )?;
        sh("ip", &["link", "set", BRIDGE, "up"])?;
        for i in 1..=self.spec.nodes {
            let ns = ns_name(i);
            let (v, p) = (format!("{PREFIX}-v{i}"), format!("{PREFIX}-p{i}"));
            sh("ip", &["netns", "add", &ns])?;
            sh(
                "ip",
                &["link", "add", &v, "type", "veth", "peer", "name", &p],
            )?;
            sh("ip", &["link", "set", &p, "netns", &ns])?;
            sh("ip", &["link", "set", &v, "master", BRIDGE, "up"])?;
            sh("ip", &["-n", &ns, "link", "set", &p, "name", "eth0"])?;
            sh(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", node_ip(i)),
                    "dev",
                    "eth0",
                ],
            )?;
            sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.spec.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.spec.nodes == 0
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.spec.dir.join(node_name(i))
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("node.log")
    }

    fn clock_file(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("faketime")
    }

    /// Start node `i` on its data directory (kept across restarts).
    pub fn spawn(&mut self, i: usize) -> Result<(), ClusterError> {
        if self.procs[i - 1].child.is_some() {
            return Ok(());
        }
        let ip = node_ip(i);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns_name(i)])
            .arg(&self.spec.binary)
            .arg("serve")
            .args(["--id", &i.to_string()])
            .arg("--data-dir")
            .arg(self.node_dir(i).join("data"))
            .args(["--client-addr", &format!("{ip}:{CLIENT_PORT}")])
            .args(["--peer-addr", &format!("{ip}:{PEER_PORT}")])
            .args(["--http-addr", &format!("{ip}:{HTTP_PORT}")]);
        for j in 1..=self.spec.nodes {
            let ip = node_ip(j);
            cmd.args([
                "--member",
                &format!("{j}={ip}:{PEER_PORT},{ip}:{CLIENT_PORT}"),
            ]);
        }
        for f in &self.spec.faults {
            cmd.args(["--fault", f]);
        }
        for (k, v) in default_env().iter().chain(&self.spec.env) {
            cmd.env(k, v);
        }
        if self.spec.faketime {
            // `ip netns exec` execs the node, so the node inherits these. Monotonic time stays
            // real: the skew attacks wall clocks (HLC), not Raft's timers. libfaketime 0.9.10
            // reads only the FAKETIME_-prefixed name; with the bare `DONT_FAKE_MONOTONIC`
            // the monotonic clock stepped back with the wall clock, which no real machine does.
            cmd.env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", self.clock_file(i))
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .map_err(io(format!("opening {}", self.log_path(i).display())))?;
        let err = log.try_clone().map_err(io("duplicating the log file"))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(err);
        let child = cmd.spawn().map_err(io("starting a node"))?;
        tracing::debug!(node = i, pid = child.id(), "started");
        self.procs[i - 1] = NodeProc {
            child: Some(child),
            paused: false,
        };
        Ok(())
    }

    /// Whether node `i`'s process is running (possibly paused).
    pub fn is_running(&mut self, i: usize) -> bool {
        match &mut self.procs[i - 1].child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i - 1].child.as_ref().map(Child::id)
    }

    /// Nodes whose process exited on its own (not killed by the harness), with how.
    pub fn crashed(&mut self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for i in 1..=self.len() {
            if let Some(c) = self.procs[i - 1].child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                out.push((i, status.to_string()));
            }
        }
        out
    }

    fn signal(&self, i: usize, sig: i32) {
        if let Some(pid) = self.pid(i) {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    /// `kill -9` node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.procs[i - 1].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.procs[i - 1].paused = false;
    }

    pub fn pause(&mut self, i: usize) {
        if self.procs[i - 1].child.is_some() {
            self.signal(i, libc::SIGSTOP);
            self.procs[i - 1].paused = true;
        }
    }

    pub fn resume(&mut self, i: usize) {
        if self.procs[i - 1].paused {
            self.signal(i, libc::SIGCONT);
            self.procs[i - 1].paused = false;
        }
    }

    /// Set node `i`'s wall-clock offset (libfaketime re-reads the file on every call).
    pub fn set_clock_offset(&self, i: usize, seconds: f64) -> Result<(), ClusterError> {
        if !self.spec.faketime {
            return Ok(());
        }
        // Replaced by a rename, never rewritten in place: the node re-reads the file on every
        // clock call and must never see it truncated or half written.
        let path = self.clock_file(i);
        let next = path.with_extension("next");
        std::fs::write(&next, format!("{seconds:+.3}\n"))
            .map_err(io(format!("writing {}", next.display())))?;
        std::fs::rename(&next, &path).map_err(io(format!("replacing {}", path.display())))
    }

    /// Apply a grudge: node `i + 1` drops every packet from the nodes in `grudge[i]`.
    /// Replaces any earlier partition.
    pub fn partition(&mut self, grudge: &[BTreeSet<usize>]) -> Result<(), ClusterError> {
        self.heal()?;
        for (i, drops) in grudge.iter().enumerate() {
            let node = i + 1;
            for &from in drops {
                sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &ns_name(node),
                        "iptables",
                        "-w",
                        "-A",
                        "INPUT",
                        "-s",
                        &node_ip(from).to_string(),
                        "-j",
                        "DROP",
                    ],
                )?;
            }
            self.blocked[i] = drops.clone();
        }
        Ok(())
    }

    /// Remove every partition rule.
    pub fn heal(&mut self) -> Result<(), ClusterError> {
        for i in 1..=self.len() {
            if !self.blocked[i - 1].is_empty() {
                sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &ns_name(i),
                        "iptables",
                        "-w",
                        "-F",
                        "INPUT",
                    ],
                )?;
                self.blocked[i - 1].clear();
            }
        }
        Ok(())
    }

    /// Checks that exactly the intended paths are cut (a TCP connect from each node's
    /// namespace to each other node's peer port, all probes at once, bounded by 1 s each):
    /// returns the (from, to, connected) triples that disagree with the grudge.
    pub fn verify_connectivity(&self) -> Vec<(usize, usize, bool)> {
        let mut probes = Vec::new();
        for a in 1..=self.len() {
            for b in 1..=self.len() {
                if a == b || self.procs[b - 1].child.is_none() || self.procs[b - 1].paused {
                    continue;
                }
                let script = format!("exec 3<>/dev/tcp/{}/{PEER_PORT}", node_ip(b));
                let probe = Command::new("ip")
                    .args(["netns", "exec", &ns_name(a), "timeout", "1", "bash", "-c"])
                    .arg(script)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                probes.push((a, b, probe));
            }
        }
        let mut wrong = Vec::new();
        for (a, b, probe) in probes {
            let ok = probe.and_then(|mut p| p.wait()).is_ok_and(|s| s.success());
            // Packets from a to b are dropped at b's INPUT; the handshake needs both ways.
            let cut = self.blocked[b - 1].contains(&a) || self.blocked[a - 1].contains(&b);
            if ok == cut {
                wrong.push((a, b, ok));
            }
        }
        wrong
    }

    /// Every thread's stack of node `i`, taken by gdb in batch mode: the one piece of
    /// evidence a wedged node leaves. The node keeps running afterwards.
    pub fn backtrace(&self, i: usize) -> Result<String, ClusterError> {
        let pid = self
            .pid(i)
            .ok_or_else(|| ClusterError::Command {
                command: format!("gdb on {}", node_name(i)),
                stderr: "the node is not running".into(),
            })?
            .to_string();
        if self.procs[i - 1].paused {
            return Err(ClusterError::Command {
                command: format!("gdb on {}", node_name(i)),
                stderr: "the node is paused (SIGSTOP); resume it first".into(),
            });
        }
        // `timeout` bounds a gdb that cannot attach (ptrace refused, node in D state).
        sh(
            "timeout",
            &[
                "120",
                "gdb",
                "-batch",
                "-nx",
                "-p",
                &pid,
                "-ex",
                "set pagination off",
                "-ex",
                "thread apply all bt",
            ],
        )
    }

    /// Last lines of node `i`'s log, for error messages.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = strip_ansi(&std::fs::read_to_string(self.log_path(i)).unwrap_or_default());
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stop every node (resuming paused ones first so SIGKILL is not delayed) and remove
    /// the network. Idempotent.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for i in 1..=self.len() {
            self.resume(i);
            self.kill(i);
        }
        for i in 1..=self.len() {
            sh_quiet("ip", &["netns", "del", &ns_name(i)]);
            sh_quiet("ip", &["link", "del", &format!("{PREFIX}-v{i}")]);
        }
        sh_quiet("ip", &["link", "del", BRIDGE]);
    }

    /// Delete node data directories (logs stay), to keep report directories small.
    pub fn remove_data(&self) {
        for i in 1..=self.len() {
            let _ = std::fs::remove_dir_all(self.node_dir(i).join("data"));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Text without ANSI colour escapes (`ESC [ ... letter`), from logs written before NO_COLOR.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Install Debian's `faketime` package (libfaketime) when it is missing.
pub fn ensure_faketime() -> Result<(), ClusterError> {
    if Path::new(LIBFAKETIME).exists() {
        return Ok(());
    }
    tracing::info!("installing libfaketime (apt-get install faketime) for the clock nemesis");
    let started = Instant::now();
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "faketime"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let mut out = install().map_err(io("running apt-get"))?;
    if !out.status.success() {
        sh_quiet("apt-get", &["update", "-q"]);
        out = install().map_err(io("running apt-get"))?;
    }
    if !Path::new(LIBFAKETIME).exists() {
        return Err(ClusterError::Setup(format!(
            "the clock nemesis needs libfaketime ({LIBFAKETIME}) and `apt-get install faketime` did not provide it after {:?}: {}",
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ansi_escapes_are_stripped() {
        assert_eq!(
            super::strip_ansi("\u{1b}[2m12:00\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x"),
            "12:00  WARN x"
        );
    }
}
