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

fn free_port(ip: Ipv4Addr) -> u16 {
    // Bind to port 0 and release: the kernel does not hand the port out again right away.
    TcpListener::bind((ip, 0))
        .expect("a loopback port is free")
        .local_addr()
        .unwrap()
        .port()
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
                NodeAddrs {
                    ip,
                    client: SocketAddr::from((ip, free_port(ip))),
                    peer: SocketAddr::from((ip, free_port(ip))),
                    http: SocketAddr::from((ip, free_port(ip))),
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
        assert!(self.children[i - 1].is_none(), "node {i} is running");
        let me = &self.nodes[i - 1];
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_calm"));
        cmd.arg("serve")
            .args(["--id", &i.to_string()])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--client-addr", &me.client.to_string()])
            .args(["--peer-addr", &me.peer.to_string()])
            .args(["--http-addr", &me.http.to_string()]);
        for (j, m) in self.nodes.iter().enumerate() {
            cmd.args(["--member", &format!("{}={},{}", j + 1, m.peer, m.client)]);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
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
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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
    kv.write(pb::WriteRequest {
        key: key.as_bytes().to_vec(),
        op: Some(op),
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
    /// Cut every path between a node in `side` and a node not in it.
    pub fn isolate(cluster: &Cluster, side: &[usize]) -> Partition {
        let chain = format!(
            "calm-{}-{}",
            std::process::id(),
            CHAINS.fetch_add(1, Ordering::Relaxed)
        );
        let out = iptables(&["-N", &chain]);
        assert!(out.status.success(), "iptables -N: {out:?}");
        let out = iptables(&["-I", "INPUT", "-j", &chain]);
        assert!(out.status.success(), "iptables -I: {out:?}");
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
