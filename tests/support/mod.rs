//! Real `calm serve` processes for multi-process tests, driven only through the public gRPC
//! API, plus real faults: `kill -9`, SIGSTOP, and iptables partitions between nodes.
//!
//! Each cluster gets its own loopback addresses (127.X.Y.i for node i; all of 127.0.0.0/8 is
//! loopback on Linux), so clusters of tests running at once never collide, and a firewall
//! rule can cut exactly the traffic between two nodes: every node makes its outgoing peer
//! connections from its own address.
#![allow(dead_code)]

use calm::api::pb;
use calm::api::pb::admin_client::AdminClient;
use calm::api::pb::kv_client::KvClient;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// How long a cluster may take to elect every group's leader.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

pub struct NodeAddrs {
    pub ip: Ipv4Addr,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub http: SocketAddr,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeAddrs>,
    children: Vec<Option<Child>>,
    /// Extra `CALM_*` settings every node gets (e.g. `CALM_RAFT__DATA_GROUPS`).
    env: Vec<(String, String)>,
}

/// Three distinct free ports on `ip` (client, peer, HTTP). All three are held while the next
/// is chosen: a port bound and released at once can come back from the very next bind, and a
/// node given the same port twice fails to start with "Address already in use".
fn free_ports(ip: Ipv4Addr) -> [u16; 3] {
    let held: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind((ip, 0)).expect("a loopback port is free"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// Options every test cluster uses: small and quick, for two shared cores.
pub fn test_env() -> Vec<(String, String)> {
    [
        ("CALM_RAFT__DATA_GROUPS", "4"),
        ("CALM_RAFT__HEARTBEAT_MS", "100"),
        ("CALM_RAFT__ELECTION_TIMEOUT_MIN_MS", "800"),
        ("CALM_RAFT__ELECTION_TIMEOUT_MAX_MS", "1600"),
        ("CALM_RAFT__REQUEST_TIMEOUT_MS", "3000"),
        ("CALM_RAFT__BALANCE_LEADERS_INTERVAL_MS", "1000"),
        ("CALM_STORAGE__WAL_SEGMENT_BYTES_MAX", "8388608"),
        ("CALM_LOG", "info,openraft=warn"),
        ("CALM_THREADS", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .map(|(k, v)| match std::env::var("CALM_TEST_LOG") {
        // Diagnosing a test: more of the nodes' logs (e.g. `CALM_TEST_LOG=debug`).
        Ok(filter) if k == "CALM_LOG" => (k, filter),
        _ => (k, v),
    })
    .collect()
}

impl Cluster {
    /// `n` nodes with `extra` settings on top of [`test_env`], started and ready.
    pub async fn start(n: usize, extra: &[(&str, &str)]) -> Cluster {
        let index = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let a = 20 + (std::process::id() % 200) as u8;
        let b = (index % 250) as u8 + 1;
        let nodes = (1..=n)
            .map(|i| {
                let ip = Ipv4Addr::new(127, a, b, i as u8);
                let [client, peer, http] = free_ports(ip);
                NodeAddrs {
                    ip,
                    client: SocketAddr::from((ip, client)),
                    peer: SocketAddr::from((ip, peer)),
                    http: SocketAddr::from((ip, http)),
                }
            })
            .collect();
        let mut env = test_env();
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.to_string()));
        }
        let mut cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            nodes,
            children: (0..n).map(|_| None).collect(),
            env,
        };
        for i in 1..=n {
            cluster.spawn(i);
        }
        cluster.await_ready().await;
        cluster
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}"))
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}.log"))
    }

    /// Start node `i` (1-based) on its addresses and data directory.
    pub fn spawn(&mut self, i: usize) {
        let cmd = self.command(i);
        self.spawn_command(i, cmd);
    }

    /// The `calm serve` command that starts node `i`, for a test to change before
    /// [`spawn_command`](Self::spawn_command).
    pub fn command(&self, i: usize) -> Command {
        self.command_as(i, i as u64, &self.members())
    }

    /// The cluster's member list, as `--member` flags spell it.
    pub fn members(&self) -> Vec<String> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(j, m)| format!("{}={},{}", j + 1, m.peer, m.client))
            .collect()
    }

    /// Node `i`'s command (its addresses and data directory) with another `--id` and member
    /// list: what an operator's mistake looks like.
    pub fn command_as(&self, i: usize, id: u64, members: &[String]) -> Command {
        let me = &self.nodes[i - 1];
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_calm"));
        cmd.arg("serve")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--client-addr", &me.client.to_string()])
            .args(["--peer-addr", &me.peer.to_string()])
            .args(["--http-addr", &me.http.to_string()]);
        for m in members {
            cmd.args(["--member", m]);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Start node `i` with `cmd`, its output appended to its log.
    pub fn spawn_command(&mut self, i: usize, mut cmd: Command) {
        assert!(self.children[i - 1].is_none(), "node {i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.children[i - 1] = Some(cmd.spawn().expect("calm serve starts"));
    }

    /// The PID of node `i`'s process.
    pub fn pid(&self, i: usize) -> u32 {
        self.children[i - 1].as_ref().expect("node is running").id()
    }

    /// Wait (bounded by `timeout`) until node `i` exits; its exit status, or `None` if it
    /// still runs (it is left running).
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.children[i - 1].as_mut().expect("node was started");
            if let Some(status) = child.try_wait().unwrap() {
                self.children[i - 1] = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` node `i`.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.children[i - 1].take().expect("node is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM node `i` and wait until it exited (it persists its state first).
    pub fn stop(&mut self, i: usize) {
        let mut child = self.children[i - 1].take().expect("node is running");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait().unwrap();
    }

    /// Send `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to node `i`.
    pub fn signal(&self, i: usize, signal: i32) {
        let child = self.children[i - 1].as_ref().expect("node is running");
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        match &mut self.children[i - 1] {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    pub async fn channel(&self, i: usize) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.nodes[i - 1].client))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .connect_lazy()
    }

    pub async fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(i).await)
    }

    pub async fn admin(&self, i: usize) -> AdminClient<Channel> {
        AdminClient::new(self.channel(i).await)
    }

    pub async fn status(&self, i: usize) -> Result<pb::StatusResponse, tonic::Status> {
        self.admin(i)
            .await
            .status(pb::StatusRequest {})
            .await
            .map(|r| r.into_inner())
    }

    /// Wait until every running node knows a leader for every group.
    pub async fn await_ready(&mut self) {
        let started = Instant::now();
        loop {
            let mut ready = true;
            for i in 1..=self.nodes.len() {
                if self.children[i - 1].is_none() {
                    continue;
                }
                assert!(
                    self.is_running(i),
                    "node {i} exited while starting:\n{}",
                    self.log(i)
                );
                ready &=
                    matches!(self.status(i).await, Ok(s) if s.groups.iter().all(|g| g.leader != 0));
            }
            if ready {
                return;
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "the cluster did not elect every group's leader within {READY_TIMEOUT:?}; node 1's log:\n{}",
                self.log(1)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until every running node leads some group (leader balancing done).
    pub async fn await_leaders_spread(&mut self) {
        let started = Instant::now();
        loop {
            let s = self.status(1).await.unwrap();
            let leaders: std::collections::BTreeSet<u64> =
                s.groups.iter().map(|g| g.leader).collect();
            if (1..=self.nodes.len() as u64).all(|n| leaders.contains(&n)) {
                return;
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "leaders did not spread over the nodes: {:?}",
                s.groups
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader of `key`'s group as node `asking` sees it (0: none known).
    pub async fn leader_of(&self, asking: usize, key: &str) -> (u64, u64) {
        let e = self
            .admin(asking)
            .await
            .explain(pb::ExplainRequest {
                key: key.as_bytes().to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        (e.group, e.leader)
    }

    /// The first of `prefix0`, `prefix1`, ... (up to `tries` keys) whose group node `leader`
    /// leads, as node 1 sees it; panics naming `what` when there is none.
    pub async fn key_led_by(&self, leader: u64, prefix: &str, tries: usize, what: &str) -> String {
        for i in 0..tries {
            let k = format!("{prefix}{i}");
            if self.leader_of(1, &k).await.1 == leader {
                return k;
            }
        }
        panic!("no {what} among {tries} keys {prefix}0..: node {leader} leads no such group")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failing test's nodes are gone with their temp dir: keep the end of each node's
        // log in the failure output, where CI shows it.
        if std::thread::panicking() {
            if std::env::var_os("CALM_TEST_KEEP_FAILED").is_some() {
                self.dir.disable_cleanup(true);
                eprintln!(
                    "kept the failed cluster's directory: {}",
                    self.dir.path().display()
                );
            }
            for i in 1..=self.nodes.len() {
                let log = self.log(i);
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(FAILED_LOG_LINES_MAX)..];
                eprintln!(
                    "--- node {i}'s log, last {} of {} lines ---\n{}",
                    tail.len(),
                    lines.len(),
                    tail.join("\n")
                );
            }
        }
    }
}

/// How much of each node's log a failing test prints.
const FAILED_LOG_LINES_MAX: usize = 150;

pub fn put(value: &str) -> pb::Op {
    pb::Op {
        kind: Some(pb::op::Kind::Put(pb::Put {
            value: value.as_bytes().to_vec(),
        })),
    }
}

pub async fn write(
    kv: &mut KvClient<Channel>,
    key: &str,
    op: pb::Op,
) -> Result<pb::WriteResponse, tonic::Status> {
    write_with_token(kv, key, op, &[]).await
}

/// A write carrying a session token (empty: none).
pub async fn write_with_token(
    kv: &mut KvClient<Channel>,
    key: &str,
    op: pb::Op,
    token: &[u8],
) -> Result<pb::WriteResponse, tonic::Status> {
    kv.write(pb::WriteRequest {
        key: key.as_bytes().to_vec(),
        op: Some(op),
        token: token.to_vec(),
        lease: 0,
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn get(
    kv: &mut KvClient<Channel>,
    key: &str,
    consistency: pb::Consistency,
) -> Result<Option<pb::value::Kind>, tonic::Status> {
    let r = kv
        .get(pb::GetRequest {
            key: key.as_bytes().to_vec(),
            consistency: consistency as i32,
            token: Vec::new(),
        })
        .await?
        .into_inner();
    Ok(if r.found {
        r.value.and_then(|v| v.kind)
    } else {
        None
    })
}

pub fn register(value: &Option<pb::value::Kind>) -> Option<String> {
    match value {
        Some(pb::value::Kind::Register(r)) => Some(String::from_utf8_lossy(&r.value).into_owned()),
        None => None,
        other => panic!("not a register: {other:?}"),
    }
}

/// `GET path` on `addr` (HTTP/1.0, bounded): the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: calm\r\n\r\n").as_bytes())
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string());
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("HTTP request timed out")))
}

/// Why a test that needs root and iptables cannot run here, if it cannot.
pub fn partition_unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (iptables partitions between nodes)".into());
    }
    match Command::new("iptables")
        .arg("-w")
        .args(["-L", "INPUT", "-n"])
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "iptables does not work here: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!(
            "iptables is not installed ({e}); scripts/test installs it when run as root"
        )),
    }
}

static CHAINS: AtomicU32 = AtomicU32::new(0);

fn iptables(args: &[&str]) -> std::process::Output {
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .expect("iptables runs")
}

/// Packets between node groups dropped by iptables (INPUT, by source and destination
/// address), in a chain of its own that is removed on drop (the partition heals).
pub struct Partition {
    chain: String,
}

impl Partition {
    /// A fresh iptables chain of this process, hooked into INPUT: the partition's rules go in it.
    fn new_chain() -> String {
        let chain = format!(
            "calm-{}-{}",
            std::process::id(),
            CHAINS.fetch_add(1, Ordering::Relaxed)
        );
        let out = iptables(&["-N", &chain]);
        assert!(out.status.success(), "iptables -N: {out:?}");
        let out = iptables(&["-I", "INPUT", "-j", &chain]);
        assert!(out.status.success(), "iptables -I: {out:?}");
        chain
    }

    /// Cut every path between a node in `side` and a node not in it.
    pub fn isolate(cluster: &Cluster, side: &[usize]) -> Partition {
        let chain = Partition::new_chain();
        for a in 1..=cluster.nodes.len() {
            for b in 1..=cluster.nodes.len() {
                if side.contains(&a) != side.contains(&b) {
                    let (src, dst) = (
                        cluster.nodes[a - 1].ip.to_string(),
                        cluster.nodes[b - 1].ip.to_string(),
                    );
                    let out = iptables(&["-A", &chain, "-s", &src, "-d", &dst, "-j", "DROP"]);
                    assert!(out.status.success(), "iptables -A: {out:?}");
                }
            }
        }
        Partition { chain }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        iptables(&["-D", "INPUT", "-j", &self.chain]);
        iptables(&["-F", &self.chain]);
        iptables(&["-X", &self.chain]);
    }
}

/// Whether a TCP connection from `from`'s address to `to`'s peer port succeeds now.
pub async fn can_connect(cluster: &Cluster, from: usize, to: usize) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((cluster.nodes[from - 1].ip, 0)))
        .unwrap();
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            socket.connect(cluster.nodes[to - 1].peer)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Builders for every op of the public API (DESIGN.md section 2).
pub mod op {
    use calm::api::pb;
    use calm::api::pb::op::Kind;

    fn of(kind: Kind) -> pb::Op {
        pb::Op { kind: Some(kind) }
    }

    pub fn put(value: &str) -> pb::Op {
        super::put(value)
    }

    pub fn delete() -> pb::Op {
        of(Kind::Delete(pb::Delete {}))
    }

    pub fn cas(expect: pb::cas::Expect, new_value: &str) -> pb::Op {
        of(Kind::Cas(pb::Cas {
            expect: Some(expect),
            new_value: new_value.as_bytes().to_vec(),
            delete: false,
        }))
    }

    /// Replace the value if the register is at `version` (0: absent).
    pub fn cas_version(version: u64, new_value: &str) -> pb::Op {
        cas(pb::cas::Expect::Version(version), new_value)
    }

    /// Replace the value if the register holds `expected`.
    pub fn cas_value(expected: &str, new_value: &str) -> pb::Op {
        cas(
            pb::cas::Expect::Value(expected.as_bytes().to_vec()),
            new_value,
        )
    }

    /// Write the value if the key does not exist.
    pub fn cas_absent(new_value: &str) -> pb::Op {
        cas(pb::cas::Expect::Absent(true), new_value)
    }

    /// Delete the register if it is at `version`.
    pub fn cas_delete(version: u64) -> pb::Op {
        of(Kind::Cas(pb::Cas {
            expect: Some(pb::cas::Expect::Version(version)),
            new_value: Vec::new(),
            delete: true,
        }))
    }

    pub fn add(delta: i64) -> pb::Op {
        of(Kind::Add(pb::Add { delta }))
    }

    pub fn set_value(value: i64) -> pb::Op {
        of(Kind::SetValue(pb::SetValue { value }))
    }

    pub fn set_bounds(min: i64, max: i64) -> pb::Op {
        of(Kind::SetBounds(pb::SetBounds { min, max }))
    }

    pub fn raise(value: i64) -> pb::Op {
        of(Kind::Raise(pb::Raise { value }))
    }

    pub fn set_max(value: i64) -> pb::Op {
        of(Kind::SetMax(pb::SetMax { value }))
    }

    pub fn sadd(element: &str) -> pb::Op {
        of(Kind::SetAdd(pb::SetAdd {
            element: element.as_bytes().to_vec(),
        }))
    }

    pub fn srem(element: &str) -> pb::Op {
        of(Kind::SetRemove(pb::SetRemove {
            element: element.as_bytes().to_vec(),
        }))
    }

    /// An op with no kind set.
    pub fn none() -> pb::Op {
        pb::Op { kind: None }
    }
}

/// A Get with a session token; the whole response.
pub async fn get_with_token(
    kv: &mut KvClient<Channel>,
    key: &[u8],
    consistency: pb::Consistency,
    token: &[u8],
) -> Result<pb::GetResponse, tonic::Status> {
    kv.get(pb::GetRequest {
        key: key.to_vec(),
        consistency: consistency as i32,
        token: token.to_vec(),
    })
    .await
    .map(|r| r.into_inner())
}

/// A counter's value (`None`: the key does not exist).
pub fn counter(value: &Option<pb::value::Kind>) -> Option<i64> {
    match value {
        Some(pb::value::Kind::Counter(n)) => Some(*n),
        None => None,
        other => panic!("not a counter: {other:?}"),
    }
}

/// A bounded counter's `(value, min, max)`.
pub fn bounded(value: &Option<pb::value::Kind>) -> Option<(i64, i64, i64)> {
    match value {
        Some(pb::value::Kind::Bounded(b)) => Some((b.value, b.min, b.max)),
        None => None,
        other => panic!("not a bounded counter: {other:?}"),
    }
}

/// A set's elements, as text, sorted.
pub fn elements(value: &Option<pb::value::Kind>) -> Option<Vec<String>> {
    match value {
        Some(pb::value::Kind::Set(s)) => Some(
            s.elements
                .iter()
                .map(|e| String::from_utf8_lossy(e).into_owned())
                .collect(),
        ),
        None => None,
        other => panic!("not a set: {other:?}"),
    }
}

/// Read `key` at node `at` (bounded: `timeout`, 50 ms apart) until `done` holds for what it
/// reads; returns that value, or panics with the last read.
pub async fn await_value<T: std::fmt::Debug>(
    c: &Cluster,
    at: usize,
    key: &str,
    consistency: pb::Consistency,
    timeout: Duration,
    mut extract: impl FnMut(&Option<pb::value::Kind>) -> T,
    mut done: impl FnMut(&T) -> bool,
) -> T {
    let mut kv = c.kv(at).await;
    let started = Instant::now();
    let mut last = None;
    for _ in 0..10_000 {
        match get(&mut kv, key, consistency).await {
            Ok(v) => {
                let v = extract(&v);
                if done(&v) {
                    return v;
                }
                last = Some(Ok(v));
            }
            Err(s) => last = Some(Err(s)),
        }
        if started.elapsed() > timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "node {at} did not read the expected {key} at {consistency:?} within {timeout:?}; last read {last:?}"
    )
}

/// Write through node `via`, retrying (bounded) while it answers UNAVAILABLE or
/// DEADLINE_EXCEEDED (a leader change). Only for ops whose retry is harmless to the test
/// (idempotent, or counted as possibly applied by the caller).
pub async fn write_retrying(
    c: &Cluster,
    via: usize,
    key: &str,
    op: pb::Op,
) -> Result<pb::WriteResponse, tonic::Status> {
    let mut kv = c.kv(via).await;
    let mut last = None;
    for _ in 0..40 {
        match write(&mut kv, key, op.clone()).await {
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    || s.code() == tonic::Code::DeadlineExceeded =>
            {
                last = Some(s);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
    Err(last.unwrap())
}

/// Every value the sum of a subset of `deltas` can take, plus `base` (for counters whose
/// indeterminate adds may or may not have been applied).
pub fn reachable_sums(base: i64, deltas: &[i64]) -> std::collections::BTreeSet<i64> {
    let mut sums = std::collections::BTreeSet::from([base]);
    for d in deltas {
        let more: Vec<i64> = sums.iter().map(|s| s + d).collect();
        sums.extend(more);
    }
    sums
}

/// Wait (bounded) until every group is led by its preferred node (the `g mod n`-th member,
/// see `balance_leaders`), as every running node sees it: no leader transfer is in flight
/// or still to come, so writes do not meet a leader change.
pub async fn await_leaders_balanced(c: &Cluster) {
    let n = c.nodes.len() as u64;
    let started = Instant::now();
    loop {
        let mut balanced = true;
        let mut seen = Vec::new();
        for i in 1..=c.nodes.len() {
            match c.status(i).await {
                Ok(s) => {
                    balanced &= s.groups.iter().all(|g| g.leader == g.id % n + 1);
                    seen.push((i, s.groups));
                }
                Err(_) => balanced = false,
            }
        }
        if balanced {
            return;
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "leaders did not settle on their preferred nodes: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Partition {
    /// Drop only the packets node `from` sends to node `to` (TCP between the two then stalls
    /// both ways, while each still reaches the third node): a partial partition.
    pub fn one_way(cluster: &Cluster, from: usize, to: usize) -> Partition {
        let chain = Partition::new_chain();
        let (src, dst) = (
            cluster.nodes[from - 1].ip.to_string(),
            cluster.nodes[to - 1].ip.to_string(),
        );
        let out = iptables(&["-A", &chain, "-s", &src, "-d", &dst, "-j", "DROP"]);
        assert!(out.status.success(), "iptables -A: {out:?}");
        Partition { chain }
    }
}
