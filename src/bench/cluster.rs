//! The clusters `calm bench compare` runs against: three `calm serve` processes (this same
//! binary, as `calm dev` starts them) and three `etcd` members, each on loopback addresses of
//! its own, with data in a temporary directory; plus iptables partitions between calm nodes.
//!
//! Every process started here is owned by a [`Processes`] value that stops it by PID when
//! dropped (SIGTERM, then SIGKILL after a grace period), so an error, a panic or Ctrl-C (the
//! caller turns it into an early return) never leaves a node running. The same holds for the
//! iptables chain of a [`Partition`] and the temporary directory of a [`Cluster`].

use anyhow::{Context, Result, bail};
use calm_raft::channel::{ChannelOptions, H2Channel};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a cluster may take to start and elect its leaders.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped process may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Per-call deadline of bench clients: a call that hangs (say, on a partitioned node) counts
/// as an error instead of holding the run past its time bound.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Child processes, stopped by PID when dropped.
#[derive(Default)]
pub struct Processes {
    children: Vec<(String, Child)>,
}

impl Processes {
    pub fn push(&mut self, name: String, child: Child) {
        self.children.push((name, child));
    }

    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(n, c)| (n.clone(), c.id()))
            .collect()
    }

    /// The first child that has exited, if any.
    pub fn exited(&mut self) -> Option<(String, std::process::ExitStatus)> {
        self.children
            .iter_mut()
            .find_map(|(n, c)| c.try_wait().ok().flatten().map(|s| (n.clone(), s)))
    }

    pub fn stop_all(&mut self) {
        for (_, child) in &self.children {
            // SAFETY: kill(2) on our own child's pid, not reaped yet (reaping happens below).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_GRACE;
        for (name, child) in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!(
                    "bench: {name} (pid {}) did not stop; killing it",
                    child.id()
                );
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Three distinct free ports on `ip` (client, peer, HTTP). All three are held while the next
/// is chosen: a port bound and released at once can come back from the very next bind.
fn free_ports(ip: Ipv4Addr) -> Result<[u16; 3]> {
    let mut ports = [0; 3];
    let mut held = Vec::with_capacity(ports.len());
    for port in &mut ports {
        let listener = TcpListener::bind((ip, 0)).with_context(|| format!("cannot bind {ip}"))?;
        *port = listener.local_addr()?.port();
        held.push(listener);
    }
    Ok(ports)
}

/// Loopback addresses 127.X.Y.i for member i, X.Y from our pid so that concurrent runs (and
/// the tests, which use 127.20-219.*) do not collide. `system` tells calm (0) and etcd (1) apart.
fn member_ip(system: u8, i: usize) -> Ipv4Addr {
    let pid = std::process::id();
    Ipv4Addr::new(
        127,
        230 + (pid % 20) as u8,
        system * 100 + (pid / 20 % 100) as u8,
        i as u8,
    )
}

/// The bench's deadlines.
pub fn channel_options() -> ChannelOptions {
    ChannelOptions {
        connect_timeout: Duration::from_secs(2),
        call_timeout: Some(CALL_TIMEOUT),
        ..ChannelOptions::default()
    }
}

/// A lazily connecting channel with the bench's deadlines.
pub fn channel(addr: SocketAddr) -> Result<H2Channel> {
    Ok(H2Channel::lazy(&addr.to_string(), channel_options())?)
}

pub struct Member {
    pub ip: Ipv4Addr,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub http: SocketAddr,
}

/// A running 3-node cluster of one system.
pub struct Cluster {
    pub members: Vec<Member>,
    pub processes: Processes,
    // Dropped after `processes` (field order): nodes stop before their data goes.
    pub dir: TempDir,
}

impl Cluster {
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.client).collect()
    }

    fn log(&self, name: &str) -> String {
        crate::dev::log_tail(&self.dir.path().join(format!("{name}.log")), 15)
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some((name, status)) = self.processes.exited() {
            bail!(
                "{name} exited ({status}); its log ends:\n{}",
                self.log(&name)
            );
        }
        Ok(())
    }
}

fn members(system: u8, n: usize) -> Result<Vec<Member>> {
    (1..=n)
        .map(|i| {
            let ip = member_ip(system, i);
            let [client, peer, http] = free_ports(ip)?;
            Ok(Member {
                ip,
                client: SocketAddr::from((ip, client)),
                peer: SocketAddr::from((ip, peer)),
                http: SocketAddr::from((ip, http)),
            })
        })
        .collect()
}

fn log_file(dir: &Path, name: &str) -> Result<(Stdio, Stdio)> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .with_context(|| format!("cannot create {name}'s log"))?;
    Ok((log.try_clone()?.into(), log.into()))
}

/// Start 3 `calm serve` nodes with calm's defaults (durable acknowledgements, one data group
/// per node) and `calm dev`'s one worker thread each; wait until every group has a leader and
/// the leaders sit on their preferred nodes (so no leader transfer happens during the run).
pub async fn start_calm(calm_exe: &Path) -> Result<Cluster> {
    let dir = TempDir::new("calm-bench-calm")?;
    let mut cluster = Cluster {
        members: members(0, 3)?,
        processes: Processes::default(),
        dir,
    };
    for (i, me) in cluster.members.iter().enumerate() {
        let id = i + 1;
        let name = format!("calm-{id}");
        let mut cmd = Command::new(calm_exe);
        cmd.arg("serve")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(cluster.dir.path().join(&name))
            .args(["--client-addr", &me.client.to_string()])
            .args(["--peer-addr", &me.peer.to_string()])
            .args(["--http-addr", &me.http.to_string()])
            .args(["--threads", "1"]);
        for (j, m) in cluster.members.iter().enumerate() {
            cmd.args(["--member", &format!("{}={},{}", j + 1, m.peer, m.client)]);
        }
        let (out, err) = log_file(cluster.dir.path(), &name)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", calm_exe.display()))?;
        cluster.processes.push(name, child);
    }
    let started = Instant::now();
    loop {
        cluster.check_running()?;
        let mut balanced = true;
        for m in &cluster.members {
            let mut admin = crate::api::pb::admin_client::AdminClient::new(channel(m.client)?);
            balanced &= match admin.status(crate::api::pb::StatusRequest {}).await {
                // Group g's preferred leader is member g mod n + 1 (node.rs balances to it).
                Ok(s) => s
                    .into_inner()
                    .groups
                    .iter()
                    .all(|g| g.leader != 0 && g.leader == g.id % 3 + 1),
                Err(_) => false,
            };
        }
        if balanced {
            return Ok(cluster);
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "calm: leaders not settled within {READY_TIMEOUT:?}; calm-1's log ends:\n{}",
                cluster.log("calm-1")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `etcd` runs here, and its version line.
pub fn etcd_version() -> Option<String> {
    let out = Command::new("etcd").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "etcd Version: 3.4.23"
    let line = text.lines().next()?.trim();
    Some(line.replace(" Version:", ""))
}

/// Start 3 etcd members with etcd's defaults (fdatasync of the WAL before every
/// acknowledgement, snapshot every 100k entries) and a 100 ms heartbeat as calm's; wait until
/// a linearizable read succeeds on every member.
pub async fn start_etcd() -> Result<Cluster> {
    let dir = TempDir::new("calm-bench-etcd")?;
    let mut cluster = Cluster {
        members: members(1, 3)?,
        processes: Processes::default(),
        dir,
    };
    let initial: Vec<String> = cluster
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| format!("etcd-{}=http://{}", i + 1, m.peer))
        .collect();
    for (i, me) in cluster.members.iter().enumerate() {
        let name = format!("etcd-{}", i + 1);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &name])
            .arg("--data-dir")
            .arg(cluster.dir.path().join(&name))
            .args(["--listen-client-urls", &format!("http://{}", me.client)])
            .args(["--advertise-client-urls", &format!("http://{}", me.client)])
            .args(["--listen-peer-urls", &format!("http://{}", me.peer)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", me.peer),
            ])
            .args(["--listen-metrics-urls", &format!("http://{}", me.http)])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "calm-bench"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"]);
        let (out, err) = log_file(cluster.dir.path(), &name)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().context(
            "cannot start etcd (install it: apt-get install etcd-server, or run scripts/bench)",
        )?;
        cluster.processes.push(name, child);
    }
    let started = Instant::now();
    loop {
        cluster.check_running()?;
        let mut ready = true;
        for m in &cluster.members {
            let mut kv = super::etcd::KvClient::new(channel(m.client)?);
            ready &= kv.range(super::etcd::range(b"ready", false)).await.is_ok();
        }
        if ready {
            return Ok(cluster);
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "etcd: no quorum within {READY_TIMEOUT:?}; etcd-1's log ends:\n{}",
                cluster.log("etcd-1")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Why calm cannot be partitioned here, if it cannot (needs root and a working iptables).
pub fn partition_unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root for iptables".into());
    }
    match Command::new("iptables")
        .args(["-w", "-L", "INPUT", "-n"])
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "iptables fails: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("iptables is missing ({e})")),
    }
}

fn iptables(args: &[&str]) -> Result<()> {
    let out = Command::new("iptables").arg("-w").args(args).output()?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Packets between `side` and the other members dropped (INPUT, by source and destination
/// address: calm nodes make their peer connections from their own address), in a chain of
/// its own that is removed when this is dropped or healed.
pub struct Partition {
    chain: Option<String>,
}

impl Partition {
    pub fn isolate(cluster: &Cluster, side: &[usize]) -> Result<Partition> {
        let chain = format!("calm-bench-{}", std::process::id());
        iptables(&["-N", &chain])?;
        // From here on, dropping `p` removes the chain whatever fails below.
        let p = Partition {
            chain: Some(chain.clone()),
        };
        iptables(&["-I", "INPUT", "-j", &chain])?;
        for (a, ma) in cluster.members.iter().enumerate() {
            for (b, mb) in cluster.members.iter().enumerate() {
                if side.contains(&(a + 1)) != side.contains(&(b + 1)) {
                    let (src, dst) = (ma.ip.to_string(), mb.ip.to_string());
                    iptables(&["-A", &chain, "-s", &src, "-d", &dst, "-j", "DROP"])?;
                }
            }
        }
        Ok(p)
    }

    pub fn heal(&mut self) {
        if let Some(chain) = self.chain.take() {
            let _ = iptables(&["-D", "INPUT", "-j", &chain]);
            let _ = iptables(&["-F", &chain]);
            let _ = iptables(&["-X", &chain]);
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}
