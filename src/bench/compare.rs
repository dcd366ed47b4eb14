//! `calm bench compare`: the same workloads against a local 3-node calm cluster and a local
//! 3-member etcd cluster, one after the other in one run, printed side by side with ratios.
//!
//! This module owns the workloads (what each call sends to either system), the load driver
//! (N tasks, each with one call in flight, bounded in calls and time), the partition and
//! convergence measurement, and the table. Clusters come from [`super::cluster`].
//!
//! Both systems get the same client model, chosen with `--route`:
//! - `leader` (the default): each call goes to the member that leads its key, so no member
//!   forwards. calm's tasks use its leader-aware client (`crate::route`: each key to its
//!   group's leader, learned from `Admin.Status`); etcd's tasks send everything to etcd's
//!   one leader (from `Maintenance.Status`).
//! - `spread`: each task holds one connection to every member and sends call n to member
//!   (task + n) mod 3, so on either system about two calls in three reach a member that
//!   forwards them to the leader (calm's groups have leaders on every node; etcd has one).
//!
//! Batch calls span groups, so calm's go to one member in either model (the task's first,
//! or (task + n) mod 3).
//!
//! Both systems are called through the same client, `calm_raft::channel::H2Channel` (one
//! write per call), and the first row, ping, is a grpc.health.v1 Check on each: the floor of
//! one call to either server, against which the other rows read.

use super::cluster::{self, Cluster};
use super::etcd;
use super::{Report, Route, describe_error};
use crate::api::pb;
use crate::route::{Router, layout};
use anyhow::{Context, Result, bail};
use calm_raft::channel::H2Channel;
use comfy_table::{Table, presets};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

type CalmKv = Router;
type EtcdKv = etcd::KvClient<H2Channel>;
type Health = tonic_health::pb::health_client::HealthClient<H2Channel>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum System {
    Calm,
    Etcd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// grpc.health.v1 Check, one client (sequential): no store code on either side, so the
    /// floor of one call to each system (client, gRPC server, HTTP/2, loopback, wake-ups).
    Ping,
    /// Register put, one client (sequential).
    PutSeq,
    /// Register put, 64 in flight.
    Put,
    /// Linearizable get, 64 in flight.
    Get,
    /// Compare-and-set on a key per client, 64 in flight.
    Cas,
    /// Counter increment, 64 in flight: calm's fast-path add; etcd's CAS loop (Range, then
    /// a Txn on the key's mod_revision, retried on conflict).
    Incr,
    /// A transaction of a value comparison and 4 puts on keys of one subject (calm: one
    /// hash tag), 64 in flight; both branches put, so every call writes 4 keys.
    Txn,
    /// Batch calls of 100 ops, 8 in flight: calm Batch of counter adds; etcd Txn of 100 puts.
    BatchAdd,
    /// Batch calls of 100 ops, 8 in flight: calm Batch of register puts; etcd Txn of 100 puts.
    BatchPut,
    /// A 10-second partition of one node with increments on both sides, then the time from
    /// healing until every node reads the same exact sums.
    Partition,
    /// Linearizable pages of 1000 keys with values (calm Scan, etcd Range with a limit),
    /// one client, 100 pages from random keys of 1M registers (times the scale) loaded
    /// first: ops are keys returned. Not in the default set (the load takes a minute and
    /// ~1 GB per member); ask for it with `--workloads scan`.
    Scan,
}

pub const ALL_WORKLOADS: [Workload; 10] = [
    Workload::Ping,
    Workload::PutSeq,
    Workload::Put,
    Workload::Get,
    Workload::Cas,
    Workload::Txn,
    Workload::Incr,
    Workload::BatchAdd,
    Workload::BatchPut,
    Workload::Partition,
];

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Ping => "ping x1 (grpc.health.v1 Check)",
            Workload::PutSeq => "put x1",
            Workload::Put => "put x64",
            Workload::Get => "linearizable get x64",
            Workload::Cas => "cas x64",
            Workload::Txn => "txn compare + 4 puts x64",
            Workload::Incr => "increment x64",
            Workload::BatchAdd => "batch 100 adds x8 (etcd: txn 100 puts)",
            Workload::BatchPut => "batch 100 puts x8 (etcd: txn 100 puts)",
            Workload::Partition => "partition of node 3, heal",
            Workload::Scan => "scan 1000-key pages x1, of 1M keys",
        }
    }

    /// `(calls, concurrency, ops per call)` at full scale.
    fn load(self) -> (u64, u64, u64) {
        match self {
            Workload::Ping => (5_000, 1, 1),
            Workload::PutSeq => (3_000, 1, 1),
            Workload::Put | Workload::Get | Workload::Incr => (30_000, 64, 1),
            Workload::Cas | Workload::Txn => (20_000, 64, 1),
            Workload::BatchAdd => (3_000, 8, BATCH),
            Workload::BatchPut => (1_000, 8, BATCH),
            Workload::Partition => (0, 0, 0),
            Workload::Scan => (100, 1, SCAN_PAGE_KEYS),
        }
    }
}

pub struct CompareOptions {
    pub systems: Vec<System>,
    /// Where calls go (module doc).
    pub route: Route,
    pub workloads: Vec<Workload>,
    /// Time bound of each workload.
    pub seconds: u64,
    /// Fraction of each workload's calls (1.0: full; smaller for a smoke run).
    pub scale: f64,
    /// Facts both sides of the partition add in all (at most; also bounded by its duration).
    pub partition_facts: u64,
    pub partition_seconds: u64,
    /// Wait this long after a cluster is ready before loading it (to attach `perf`).
    pub wait_before_load: Duration,
    /// Connection sets per workload, shared by its tasks; 0: one per task.
    pub connections: u64,
    pub markdown: bool,
}

const KEYS: u64 = 1_000;
const BATCH: u64 = 100;
/// Registers the scan workload loads at full scale, and keys per page.
const SCAN_KEYS: u64 = 1_000_000;
const SCAN_PAGE_KEYS: u64 = 1_000;
/// Counter keys the partition workload spreads its increments over.
const PARTITION_KEYS: u64 = 16;
/// Adds per Batch call during the partition (facts come faster than one call each).
const PARTITION_BATCH: u64 = 10;
/// Tasks per side of the partition.
const PARTITION_TASKS: u64 = 16;
/// Longest wait for convergence after healing.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts of one etcd increment before it counts as an error.
const CAS_LOOP_MAX: u64 = 100;

/// A 16-byte key: a letter per key family, then the index.
fn key(letter: char, i: u64) -> Vec<u8> {
    format!("{letter}-bench-{i:08}").into_bytes()
}

/// The 4 keys of the `txn` workload's transaction `i`: one hash tag, so one calm subject.
fn txn_keys(i: u64) -> Vec<Vec<u8>> {
    (0..4)
        .map(|j| format!("{{t-bench-{i:08}}}:{j}").into_bytes())
        .collect()
}

/// A 64-byte value.
fn value(i: u64) -> Vec<u8> {
    format!("{i:064}").into_bytes()
}

/// Cheap to clone: clones share the connection (requests multiplex on it as HTTP/2 streams).
#[derive(Clone)]
enum Conn {
    Calm(CalmKv, Health),
    Etcd(EtcdKv, Health),
}

async fn channel(addr: SocketAddr) -> Result<H2Channel> {
    H2Channel::connect(&addr.to_string(), super::cluster::channel_options())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {}", e.message()))
}

/// A connection to the member at `addr` (calm: unrouted, so the member forwards).
async fn connect(system: System, addr: SocketAddr) -> Result<Conn> {
    let channel = channel(addr).await?;
    Ok(match system {
        System::Calm => Conn::Calm(Router::unrouted(channel.clone()), Health::new(channel)),
        System::Etcd => Conn::Etcd(EtcdKv::new(channel.clone()), Health::new(channel)),
    })
}

/// Where a leader-routed task of `system` connects: calm's layout (every task builds its
/// own router from it), or the address of etcd's leader.
enum Layout {
    Calm(Box<pb::StatusResponse>, SocketAddr),
    Etcd(SocketAddr),
}

async fn leader_layout(system: System, endpoints: &[SocketAddr]) -> Result<Layout> {
    match system {
        System::Calm => Ok(Layout::Calm(
            Box::new(layout(channel(endpoints[0]).await?).await?),
            endpoints[0],
        )),
        System::Etcd => {
            let mut leader = None;
            let mut ids = Vec::new();
            for &e in endpoints {
                let s = etcd::MaintenanceClient::new(channel(e).await?)
                    .status(etcd::pb::StatusRequest {})
                    .await
                    .with_context(|| format!("etcd member {e}: Maintenance.Status"))?
                    .into_inner();
                leader = leader.or(Some(s.leader)).filter(|&l| l != 0);
                ids.push((s.header.map_or(0, |h| h.member_id), e));
            }
            let leader = leader.context("no etcd member names a leader")?;
            ids.iter()
                .find(|(id, _)| *id == leader)
                .map(|&(_, e)| Layout::Etcd(e))
                .with_context(|| format!("etcd's leader {leader:x} is none of {endpoints:?}"))
        }
    }
}

/// A task's connections: one per member (`spread`), or the one leader-routed client.
async fn task_conns(
    system: System,
    endpoints: &[SocketAddr],
    layout: Option<&Layout>,
) -> Result<Vec<Conn>> {
    let mut conns = Vec::new();
    match layout {
        None => {
            for &e in endpoints {
                conns.push(connect(system, e).await?);
            }
        }
        Some(Layout::Calm(status, first)) => {
            let channel = channel(*first).await?;
            conns.push(Conn::Calm(
                Router::from_status(status, channel.clone())?,
                Health::new(channel),
            ));
        }
        Some(Layout::Etcd(leader)) => conns.push(connect(System::Etcd, *leader).await?),
    }
    Ok(conns)
}

fn write(key: Vec<u8>, kind: pb::op::Kind) -> pb::WriteRequest {
    pb::WriteRequest {
        key,
        op: Some(pb::Op { kind: Some(kind) }),
        token: Vec::new(),
        lease: 0,
    }
}

/// The first op error of a calm Batch, as a status.
fn batch_error(r: &pb::BatchResponse) -> Result<(), tonic::Status> {
    for r in &r.results {
        if let Some(pb::batch_result::Result::Error(e)) = &r.result {
            return Err(tonic::Status::new(e.code.into(), e.message.clone()));
        }
    }
    Ok(())
}

/// What a task carries between calls.
#[derive(Default)]
struct TaskState {
    /// CAS: the version (calm) or mod_revision (etcd) of the task's key as last seen.
    cas: i64,
    /// etcd increments retried after losing their Txn.
    retries: u64,
    /// Scan keys loaded.
    scan_keys: u64,
}

impl Conn {
    /// Read the task's CAS key, so the first timed CAS expects the right version.
    async fn cas_start(&mut self, task: u64) -> Result<i64, tonic::Status> {
        let k = key('c', task);
        match self {
            Conn::Calm(kv, _) => {
                let r = kv
                    .get(pb::GetRequest {
                        key: k,
                        consistency: pb::Consistency::Linearizable as i32,
                        token: Vec::new(),
                    })
                    .await?
                    .into_inner();
                Ok(match r.value.and_then(|v| v.kind) {
                    Some(pb::value::Kind::Register(r)) => r.version as i64,
                    _ => 0,
                })
            }
            Conn::Etcd(kv, _) => {
                let r = kv.range(etcd::range(&k, false)).await?.into_inner();
                Ok(r.kvs.first().map_or(0, |kv| kv.mod_revision))
            }
        }
    }

    async fn call(
        &mut self,
        w: Workload,
        task: u64,
        n: u64,
        st: &mut TaskState,
    ) -> Result<(), tonic::Status> {
        let k = (task * 7919 + n) % KEYS;
        match (self, w) {
            (Conn::Calm(_, health) | Conn::Etcd(_, health), Workload::Ping) => {
                super::ping(health).await?;
            }
            (Conn::Calm(kv, _), Workload::PutSeq | Workload::Put) => {
                let put = pb::op::Kind::Put(pb::Put { value: value(n) });
                kv.write(write(key('r', k), put)).await?;
            }
            (Conn::Etcd(kv, _), Workload::PutSeq | Workload::Put) => {
                kv.put(etcd::put(&key('r', k), &value(n))).await?;
            }
            (Conn::Calm(kv, _), Workload::Get) => {
                kv.get(pb::GetRequest {
                    key: key('r', k),
                    consistency: pb::Consistency::Linearizable as i32,
                    token: Vec::new(),
                })
                .await?;
            }
            (Conn::Etcd(kv, _), Workload::Get) => {
                kv.range(etcd::range(&key('r', k), false)).await?;
            }
            (Conn::Calm(kv, _), Workload::Cas) => {
                let cas = pb::op::Kind::Cas(pb::Cas {
                    expect: Some(pb::cas::Expect::Version(st.cas as u64)),
                    new_value: value(n),
                    delete: false,
                });
                let r = kv.write(write(key('c', task), cas)).await?.into_inner();
                st.cas = r.version as i64;
                if !r.succeeded {
                    return Err(tonic::Status::aborted("cas lost"));
                }
            }
            (Conn::Etcd(kv, _), Workload::Cas) => {
                let k = key('c', task);
                let r = kv.txn(etcd::cas(&k, st.cas, &value(n))).await?.into_inner();
                if !r.succeeded {
                    st.cas = etcd::failure_read(&r)
                        .first()
                        .map_or(0, |kv| kv.mod_revision);
                    return Err(tonic::Status::aborted("cas lost"));
                }
                // The key's new mod_revision is the revision the txn created.
                st.cas = r.header.map_or(0, |h| h.revision);
            }
            (Conn::Calm(kv, _), Workload::Txn) => {
                let keys = txn_keys(k);
                let puts: Vec<pb::TxnOp> = keys
                    .iter()
                    .map(|key| pb::TxnOp {
                        key: key.clone(),
                        op: Some(pb::Op {
                            kind: Some(pb::op::Kind::Put(pb::Put { value: value(n) })),
                        }),
                        lease: 0,
                    })
                    .collect();
                kv.txn(pb::TxnRequest {
                    compare: vec![pb::Compare {
                        key: keys[0].clone(),
                        test: Some(pb::compare::Test::Value(pb::ValueTest {
                            op: pb::CompareOp::NotEqual as i32,
                            value: etcd::TXN_MARKER.to_vec(),
                        })),
                    }],
                    success: puts.clone(),
                    failure: puts,
                    token: Vec::new(),
                })
                .await?;
            }
            (Conn::Etcd(kv, _), Workload::Txn) => {
                kv.txn(etcd::compare_put_all(&txn_keys(k), &value(n)))
                    .await?;
            }
            (Conn::Calm(kv, _), Workload::Incr) => {
                let add = pb::op::Kind::Add(pb::Add { delta: 1 });
                kv.write(write(key('n', k), add)).await?;
            }
            (Conn::Etcd(kv, _), Workload::Incr) => {
                let k = key('n', k);
                let read = kv.range(etcd::range(&k, false)).await?.into_inner();
                let (mut n, mut rev) = etcd::counter(&read.kvs).map_err(tonic::Status::internal)?;
                for attempt in 0.. {
                    if attempt == CAS_LOOP_MAX {
                        return Err(tonic::Status::aborted("increment lost every CAS"));
                    }
                    let v = (n + 1).to_string().into_bytes();
                    let r = kv.txn(etcd::cas(&k, rev, &v)).await?.into_inner();
                    if r.succeeded {
                        break;
                    }
                    st.retries += 1;
                    (n, rev) =
                        etcd::counter(etcd::failure_read(&r)).map_err(tonic::Status::internal)?;
                }
            }
            (Conn::Calm(kv, _), Workload::BatchAdd | Workload::BatchPut) => {
                let ops = (0..BATCH)
                    .map(|j| {
                        let i = (k + j) % KEYS;
                        if w == Workload::BatchAdd {
                            write(key('n', i), pb::op::Kind::Add(pb::Add { delta: 1 }))
                        } else {
                            write(key('r', i), pb::op::Kind::Put(pb::Put { value: value(n) }))
                        }
                    })
                    .collect();
                let r = kv.batch(pb::BatchRequest { ops }).await?.into_inner();
                batch_error(&r)?;
            }
            (Conn::Etcd(kv, _), Workload::BatchAdd | Workload::BatchPut) => {
                let keys: Vec<Vec<u8>> = (0..BATCH).map(|j| key('b', (k + j) % KEYS)).collect();
                kv.txn(etcd::put_all(keys.iter().map(|k| k.as_slice()), &value(n)))
                    .await?;
            }
            (conn, Workload::Scan) => {
                // Pages start where a whole page follows.
                let span = st.scan_keys.saturating_sub(SCAN_PAGE_KEYS).max(1);
                let first = (task * 7919 + n * 104_729) % span;
                let start = key('s', first);
                // The page's own end: with the prefix's end instead, etcd 3.4 counts every
                // key to the end of the range for each page (~100 ms a page at 1M keys).
                let end = key('s', first + SCAN_PAGE_KEYS);
                let got = match conn {
                    Conn::Calm(kv, _) => {
                        let page = kv
                            .scan(pb::ScanRequest {
                                start,
                                end,
                                limit: SCAN_PAGE_KEYS as u32,
                                consistency: pb::Consistency::Linearizable as i32,
                                ..Default::default()
                            })
                            .await?
                            .into_inner();
                        page.entries.len()
                    }
                    Conn::Etcd(kv, _) => {
                        let mut range = etcd::range(&start, false);
                        range.range_end = end;
                        range.limit = SCAN_PAGE_KEYS as i64;
                        kv.range(range).await?.into_inner().kvs.len()
                    }
                };
                if got as u64 != SCAN_PAGE_KEYS.min(st.scan_keys) {
                    return Err(tonic::Status::internal(format!(
                        "a page held {got} keys, {SCAN_PAGE_KEYS} expected"
                    )));
                }
            }
            (_, Workload::Partition) => unreachable!("the partition workload has its own driver"),
        }
        Ok(())
    }
}

/// Write every key the workloads read or expect to exist (untimed): registers `r-*` and
/// `c-*`, counters `n-*` and `p-*` at 0.
async fn prepare(system: System, addr: SocketAddr) -> Result<()> {
    let mut conn = connect(system, addr).await?;
    let families: [(char, u64, bool); 4] = [
        ('r', KEYS, false),
        ('c', 64, false),
        ('n', KEYS, true),
        ('p', PARTITION_KEYS, true),
    ];
    for (letter, count, counter) in families {
        for chunk in (0..count).collect::<Vec<_>>().chunks(BATCH as usize) {
            match &mut conn {
                Conn::Calm(kv, _) => {
                    let ops = chunk
                        .iter()
                        .map(|&i| {
                            let kind = if counter {
                                pb::op::Kind::Add(pb::Add { delta: 0 })
                            } else {
                                pb::op::Kind::Put(pb::Put { value: value(i) })
                            };
                            write(key(letter, i), kind)
                        })
                        .collect();
                    let r = kv.batch(pb::BatchRequest { ops }).await?.into_inner();
                    batch_error(&r).context("preparing calm's keys")?;
                }
                Conn::Etcd(kv, _) => {
                    let keys: Vec<Vec<u8>> = chunk.iter().map(|&i| key(letter, i)).collect();
                    let v = if counter { b"0".to_vec() } else { value(0) };
                    kv.txn(etcd::put_all(keys.iter().map(|k| k.as_slice()), &v))
                        .await
                        .context("preparing etcd's keys")?;
                }
            }
        }
    }
    Ok(())
}

/// Load `count` registers `s-*` for the scan workload (untimed), 4 calls in flight: calm
/// Batch calls of 1000 puts, etcd Txns of 100 (etcd's default limit is 128 ops). A failed
/// call is sent again (a put of the same value twice loads the same key), a few times.
async fn prepare_scan(system: System, addr: SocketAddr, count: u64) -> Result<()> {
    const LOADERS: u64 = 4;
    const ATTEMPTS_MAX: u32 = 5;
    let per_call = match system {
        System::Calm => 1_000,
        System::Etcd => BATCH,
    };
    let calls = count.div_ceil(per_call);
    let mut tasks = Vec::new();
    for loader in 0..LOADERS {
        let mut conn = connect(system, addr).await?;
        tasks.push(tokio::spawn(async move {
            for call in (loader..calls).step_by(LOADERS as usize) {
                let keys: Vec<u64> =
                    (call * per_call..((call + 1) * per_call).min(count)).collect();
                let mut attempt = 1;
                while let Err(e) = load_keys(&mut conn, &keys).await {
                    if attempt == ATTEMPTS_MAX {
                        return Err(e);
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn load_keys(conn: &mut Conn, keys: &[u64]) -> Result<()> {
    match conn {
        Conn::Calm(kv, _) => {
            let ops = keys
                .iter()
                .map(|&i| write(key('s', i), pb::op::Kind::Put(pb::Put { value: value(i) })))
                .collect();
            let r = kv.batch(pb::BatchRequest { ops }).await?.into_inner();
            batch_error(&r).context("loading calm's scan keys")?;
        }
        Conn::Etcd(kv, _) => {
            let keys: Vec<Vec<u8>> = keys.iter().map(|&i| key('s', i)).collect();
            kv.txn(etcd::put_all(keys.iter().map(|k| k.as_slice()), &value(0)))
                .await
                .context("loading etcd's scan keys")?;
        }
    }
    Ok(())
}

struct Outcome {
    report: Report,
    retries: u64,
}

/// How hard one workload drives a system.
struct Load {
    /// Calls in all.
    calls: u64,
    /// Tasks, each with one call in flight.
    concurrency: u64,
    /// Connection sets the tasks share; 0: one per task.
    connections: u64,
    /// Time bound.
    duration: Duration,
    /// Scan keys loaded (for the scan workload).
    scan_keys: u64,
}

/// Run `w` as `load` says.
async fn drive(
    system: System,
    endpoints: &[SocketAddr],
    layout: Option<Arc<Layout>>,
    w: Workload,
    load: Load,
) -> Result<Outcome> {
    let Load {
        calls,
        concurrency,
        connections,
        duration,
        scan_keys,
    } = load;
    let per_task = calls.div_ceil(concurrency);
    // Shared connection sets, if asked for: task t clones set t mod N.
    let mut shared = Vec::new();
    for _ in 0..connections.min(concurrency) {
        shared.push(task_conns(system, endpoints, layout.as_deref()).await?);
    }
    let shared = Arc::new(shared);
    // Connections and CAS versions first, untimed; then every task starts at once.
    let start = Arc::new(tokio::sync::Barrier::new(concurrency as usize + 1));
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let endpoints = endpoints.to_vec();
        let start = start.clone();
        let layout = layout.clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let setup = async {
                let mut conns = match shared.len() {
                    0 => task_conns(system, &endpoints, layout.as_deref()).await?,
                    n => shared[task as usize % n].clone(),
                };
                let mut st = TaskState {
                    scan_keys,
                    ..TaskState::default()
                };
                if w == Workload::Cas {
                    st.cas = conns[0].cas_start(task).await?;
                }
                anyhow::Ok((conns, st))
            }
            .await;
            // Reach the barrier even after a failed setup, so the others are not held.
            start.wait().await;
            let (mut conns, mut st) = setup?;
            let started = Instant::now();
            let mut latencies = Vec::with_capacity(per_task as usize);
            let mut errors = 0u64;
            let mut first_error = None;
            for n in 0..per_task {
                if started.elapsed() > duration {
                    break;
                }
                let count = conns.len() as u64;
                let conn = &mut conns[((task + n) % count) as usize];
                let t = Instant::now();
                match conn.call(w, task, n, &mut st).await {
                    Ok(()) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| describe_error(&e, t.elapsed()));
                    }
                }
            }
            anyhow::Ok((latencies, errors, first_error, st.retries))
        }));
    }
    start.wait().await;
    let started = Instant::now();
    let mut latencies_us = Vec::new();
    let (mut errors, mut retries, mut first_error) = (0, 0, None);
    for t in tasks {
        let (l, e, f, r) = t.await??;
        latencies_us.extend(l);
        errors += e;
        retries += r;
        first_error = first_error.or(f);
    }
    let elapsed = started.elapsed();
    latencies_us.sort_unstable();
    let ops_per_call = w.load().2;
    Ok(Outcome {
        report: Report {
            ops: latencies_us.len() as u64 * ops_per_call,
            errors,
            first_error,
            elapsed,
            latencies_us,
            ops_per_call,
        },
        retries,
    })
}

/// The result of the partition workload on calm.
struct Convergence {
    /// Increments acknowledged on the majority (nodes 1, 2) and minority (node 3) sides.
    acked: (u64, u64),
    /// Increments whose outcome is unknown (the call failed).
    indeterminate: u64,
    /// How long node 3 was cut off.
    seconds: u64,
    /// Each node's sum just before healing.
    sums_at_heal: Vec<i64>,
    /// From healing until every node read the same sum, equal to what was acknowledged
    /// (`None`: not within [`CONVERGE_TIMEOUT`]).
    converged_after: Option<Duration>,
    sums_at_end: Vec<i64>,
}

/// The sum of the partition counters as node `conn` has them (serializable reads).
async fn local_sum(kv: &mut CalmKv) -> Result<i64, tonic::Status> {
    let mut sum = 0;
    for i in 0..PARTITION_KEYS {
        let r = kv
            .get(pb::GetRequest {
                key: key('p', i),
                consistency: pb::Consistency::Serializable as i32,
                token: Vec::new(),
            })
            .await?
            .into_inner();
        if let Some(pb::value::Kind::Counter(n)) = r.value.and_then(|v| v.kind) {
            sum += n;
        }
    }
    Ok(sum)
}

async fn sums(kvs: &mut [CalmKv]) -> Vec<i64> {
    let reads = kvs.iter_mut().map(|kv| async move {
        // A node that cannot answer reads as -1: never equal to a real sum.
        local_sum(kv).await.unwrap_or(-1)
    });
    futures::future::join_all(reads).await
}

/// Isolate node 3 for `seconds` while both sides add (node 3 alone, and nodes 1 and 2),
/// then heal and time convergence.
async fn partition(c: &Cluster, facts: u64, seconds: u64) -> Result<Convergence> {
    let addrs = c.client_addrs();
    let mut readers = Vec::new();
    for &a in &addrs {
        match connect(System::Calm, a).await? {
            Conn::Calm(kv, _) => readers.push(kv),
            Conn::Etcd(..) => unreachable!(),
        }
    }
    let base = sums(&mut readers).await;
    if base.iter().any(|&s| s != base[0]) {
        bail!("the partition counters differ before the partition: {base:?}");
    }
    let mut cut = cluster::Partition::isolate(c, &[3])?;
    let cut_at = Instant::now();
    let window = Duration::from_secs(seconds);
    let per_task_facts = (facts / 2).div_ceil(PARTITION_TASKS);
    let mut tasks = Vec::new();
    for side in 0..2u64 {
        for task in 0..PARTITION_TASKS {
            // Majority tasks alternate between nodes 1 and 2; minority tasks use node 3.
            let addr = if side == 0 {
                addrs[(task % 2) as usize]
            } else {
                addrs[2]
            };
            tasks.push(tokio::spawn(async move {
                let Conn::Calm(mut kv, _) = connect(System::Calm, addr).await? else {
                    unreachable!()
                };
                let (mut acked, mut unknown, mut sent) = (0u64, 0u64, 0u64);
                while sent < per_task_facts && cut_at.elapsed() < window {
                    let n = PARTITION_BATCH.min(per_task_facts - sent);
                    let ops = (0..n)
                        .map(|j| {
                            let k = (task * 7 + sent + j) % PARTITION_KEYS;
                            write(key('p', k), pb::op::Kind::Add(pb::Add { delta: 1 }))
                        })
                        .collect();
                    sent += n;
                    match kv.batch(pb::BatchRequest { ops }).await {
                        Ok(r) => {
                            // An op refused on its own was not applied.
                            acked += r
                                .into_inner()
                                .results
                                .iter()
                                .filter(|r| {
                                    matches!(r.result, Some(pb::batch_result::Result::Ok(_)))
                                })
                                .count() as u64;
                        }
                        Err(_) => unknown += n,
                    }
                }
                anyhow::Ok((side, acked, unknown))
            }));
        }
    }
    let (mut acked, mut indeterminate) = ((0, 0), 0);
    for t in tasks {
        let (side, a, u) = t.await??;
        if side == 0 {
            acked.0 += a;
        } else {
            acked.1 += a;
        }
        indeterminate += u;
    }
    tokio::time::sleep(window.saturating_sub(cut_at.elapsed())).await;
    let sums_at_heal = sums(&mut readers).await;
    cut.heal();
    let healed = Instant::now();
    let expected = base[0] + (acked.0 + acked.1) as i64;
    let mut converged_after = None;
    let mut last = Vec::new();
    while healed.elapsed() < CONVERGE_TIMEOUT {
        last = sums(&mut readers).await;
        let same = last.iter().all(|&s| s == last[0]);
        if same && last[0] >= expected && last[0] <= expected + indeterminate as i64 {
            converged_after = Some(healed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Convergence {
        seconds,
        acked,
        indeterminate,
        sums_at_heal: sums_at_heal.iter().map(|s| s - base[0]).collect(),
        converged_after,
        sums_at_end: last.iter().map(|s| s - base[0]).collect(),
    })
}

/// One system's results, by workload.
#[derive(Default)]
struct Results {
    runs: Vec<(Workload, Outcome)>,
    convergence: Option<Convergence>,
    /// Why a workload did not run on this system.
    skipped: Vec<(Workload, String)>,
}

impl Results {
    fn get(&self, w: Workload) -> Option<&Outcome> {
        self.runs.iter().find(|(x, _)| *x == w).map(|(_, o)| o)
    }
}

async fn run_system(system: System, c: &Cluster, o: &CompareOptions) -> Result<Results> {
    let endpoints = c.client_addrs();
    prepare(system, endpoints[0]).await?;
    if !o.wait_before_load.is_zero() {
        eprintln!(
            "bench: {system:?} ready; loading in {:?}",
            o.wait_before_load
        );
        tokio::time::sleep(o.wait_before_load).await;
    }
    let mut results = Results::default();
    for &w in &o.workloads {
        if w == Workload::Partition {
            match (system, cluster::partition_unsupported()) {
                (System::Etcd, _) => results.skipped.push((
                    w,
                    "n/a: a minority member refuses increments (no quorum)".into(),
                )),
                (System::Calm, Some(why)) => results.skipped.push((w, format!("skipped: {why}"))),
                (System::Calm, None) => {
                    eprintln!("bench: {system:?} {}", w.label());
                    results.convergence =
                        Some(partition(c, o.partition_facts, o.partition_seconds).await?);
                }
            }
            continue;
        }
        let (calls, concurrency, _) = w.load();
        let calls = ((calls as f64 * o.scale).ceil() as u64).max(concurrency);
        let scan_keys = ((SCAN_KEYS as f64 * o.scale).ceil() as u64).max(SCAN_PAGE_KEYS);
        if w == Workload::Scan {
            eprintln!("bench: {system:?} loading {scan_keys} keys to scan");
            prepare_scan(system, endpoints[0], scan_keys).await?;
        }
        eprintln!("bench: {system:?} {}", w.label());
        // Read per workload: leader balancing may still move leaders after start-up.
        let layout = match o.route {
            Route::Leader => Some(Arc::new(leader_layout(system, &endpoints).await?)),
            Route::Spread => None,
        };
        let outcome = drive(
            system,
            &endpoints,
            layout,
            w,
            Load {
                calls,
                concurrency,
                connections: o.connections,
                duration: Duration::from_secs(o.seconds),
                scan_keys,
            },
        )
        .await?;
        results.runs.push((w, outcome));
    }
    Ok(results)
}

/// Run the comparison and print the table; `calm_exe` is the binary whose `serve` the calm
/// nodes run.
pub async fn run(calm_exe: &std::path::Path, o: CompareOptions) -> Result<()> {
    let load_before = loadavg();
    let mut calm = None;
    let mut etcd = None;
    let etcd_version = cluster::etcd_version();
    // Before any system runs: finding out after calm's half wastes its minutes.
    if o.systems.contains(&System::Etcd) && etcd_version.is_none() {
        bail!(
            "etcd is not installed: apt-get install etcd-server, or run scripts/bench (which installs it), or pass --systems calm"
        );
    }
    for &system in &o.systems {
        let started = Instant::now();
        let c = match system {
            System::Calm => cluster::start_calm(calm_exe).await?,
            System::Etcd => cluster::start_etcd().await?,
        };
        let pids: Vec<String> = c
            .processes
            .pids()
            .iter()
            .map(|(n, p)| format!("{n}={p}"))
            .collect();
        eprintln!(
            "bench: {system:?} cluster ready in {:.1} s, pids {}, data under {}",
            started.elapsed().as_secs_f64(),
            pids.join(" "),
            c.dir.path().display()
        );
        let r = run_system(system, &c, &o).await?;
        drop(c);
        match system {
            System::Calm => calm = Some(r),
            System::Etcd => etcd = Some(r),
        }
    }
    println!(
        "calm bench compare: 3 calm nodes vs 3 {} members on loopback, {} cores, load average {} before, {} after; 16-byte keys, 64-byte values, {} s per workload; calls routed {}; {}",
        etcd_version.unwrap_or_else(|| "etcd".into()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before,
        loadavg(),
        o.seconds,
        match o.route {
            Route::Leader => "to the leader",
            Route::Spread => "round-robin over the members",
        },
        match o.connections {
            0 => "one connection set per task".to_string(),
            n => format!("{n} connection sets shared by the tasks"),
        },
    );
    println!(
        "{}",
        table(&o.workloads, calm.as_ref(), etcd.as_ref(), o.markdown)
    );
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A latency: µs below 1 ms, ms above.
pub fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else {
        format!("{:.2} ms", us as f64 / 1000.0)
    }
}

/// A rate with thousands separators.
pub fn fmt_rate(per_sec: f64) -> String {
    let n = per_sec.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{out}/s")
}

/// calm ÷ etcd, or "—" when either is missing or etcd's is zero.
pub fn ratio(calm: Option<f64>, etcd: Option<f64>) -> String {
    match (calm, etcd) {
        (Some(c), Some(e)) if e > 0.0 => format!("{:.2}x", c / e),
        _ => "—".into(),
    }
}

#[derive(Clone, Copy)]
enum Metric {
    Rate,
    P50,
    P99,
}

impl Metric {
    fn name(self, batch: bool) -> &'static str {
        match (self, batch) {
            (Metric::Rate, _) => "ops/s",
            (Metric::P50, false) => "p50",
            (Metric::P99, false) => "p99",
            (Metric::P50, true) => "p50 per call",
            (Metric::P99, true) => "p99 per call",
        }
    }

    fn of(self, r: &Report) -> f64 {
        match self {
            Metric::Rate => r.ops_per_sec(),
            Metric::P50 => r.percentile_us(0.5) as f64,
            Metric::P99 => r.percentile_us(0.99) as f64,
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Metric::Rate => fmt_rate(v),
            _ => fmt_us(v as u64),
        }
    }
}

fn notes(system: &str, o: &Outcome) -> Option<String> {
    let mut parts = Vec::new();
    if o.report.errors > 0 {
        match &o.report.first_error {
            Some(first) => parts.push(format!("{} errors (first: {first})", o.report.errors)),
            None => parts.push(format!("{} errors", o.report.errors)),
        }
    }
    if o.retries > 0 {
        parts.push(format!("{} CAS retries", o.retries));
    }
    (!parts.is_empty()).then(|| format!("{system}: {}", parts.join(", ")))
}

fn table(
    workloads: &[Workload],
    calm: Option<&Results>,
    etcd: Option<&Results>,
    markdown: bool,
) -> Table {
    let mut t = Table::new();
    t.load_preset(if markdown {
        presets::ASCII_MARKDOWN
    } else {
        presets::UTF8_FULL_CONDENSED
    });
    t.set_header(["workload", "metric", "calm", "etcd", "calm ÷ etcd", "notes"]);
    for &w in workloads {
        if w == Workload::Partition {
            partition_rows(&mut t, calm, etcd);
            continue;
        }
        let c = calm.and_then(|r| r.get(w));
        let e = etcd.and_then(|r| r.get(w));
        let metrics: &[Metric] = if w == Workload::PutSeq {
            &[Metric::P50, Metric::P99, Metric::Rate]
        } else {
            &[Metric::Rate, Metric::P50, Metric::P99]
        };
        let batch = w.load().2 > 1;
        let note: Vec<String> = [
            c.and_then(|o| notes("calm", o)),
            e.and_then(|o| notes("etcd", o)),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (i, &m) in metrics.iter().enumerate() {
            let cv = c.map(|o| m.of(&o.report));
            let ev = e.map(|o| m.of(&o.report));
            t.add_row([
                if i == 0 {
                    w.label().to_string()
                } else {
                    String::new()
                },
                m.name(batch).to_string(),
                cv.map_or("—".into(), |v| m.show(v)),
                ev.map_or("—".into(), |v| m.show(v)),
                ratio(cv, ev),
                if i == 0 {
                    note.join("; ")
                } else {
                    String::new()
                },
            ]);
        }
    }
    t
}

fn partition_rows(t: &mut Table, calm: Option<&Results>, etcd: Option<&Results>) {
    let skipped = |r: Option<&Results>| {
        r.and_then(|r| {
            r.skipped
                .iter()
                .find(|(w, _)| *w == Workload::Partition)
                .map(|(_, why)| why.clone())
        })
    };
    let (calm_cell, facts, calm_note) = match calm.and_then(|r| r.convergence.as_ref()) {
        Some(cv) => (
            cv.converged_after
                .map_or("not in 60 s".into(), |d| fmt_us(d.as_micros() as u64)),
            format!(
                "{} (nodes 1+2: {}, node 3: {})",
                cv.acked.0 + cv.acked.1,
                cv.acked.0,
                cv.acked.1
            ),
            format!(
                "cut off {} s; node sums at heal {:?}, converged {:?}{}",
                cv.seconds,
                cv.sums_at_heal,
                cv.sums_at_end,
                if cv.indeterminate > 0 {
                    format!(", {} indeterminate", cv.indeterminate)
                } else {
                    String::new()
                }
            ),
        ),
        None => ("—".into(), "—".into(), skipped(calm).unwrap_or_default()),
    };
    let etcd_note = skipped(etcd).unwrap_or_default();
    let label = Workload::Partition.label();
    t.add_row([
        label.to_string(),
        "increments acknowledged".into(),
        facts,
        "n/a".into(),
        "—".into(),
        calm_note,
    ]);
    t.add_row([
        String::new(),
        "heal to same exact sum".into(),
        calm_cell,
        "n/a".into(),
        "—".into(),
        if etcd.is_some() {
            format!("etcd: {etcd_note}")
        } else {
            String::new()
        },
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_switch_to_ms_at_one_ms() {
        assert_eq!(fmt_us(0), "0 µs");
        assert_eq!(fmt_us(999), "999 µs");
        assert_eq!(fmt_us(1000), "1.00 ms");
        assert_eq!(fmt_us(12_345), "12.35 ms");
    }

    #[test]
    fn rates_group_thousands() {
        assert_eq!(fmt_rate(0.0), "0/s");
        assert_eq!(fmt_rate(999.4), "999/s");
        assert_eq!(fmt_rate(1000.0), "1,000/s");
        assert_eq!(fmt_rate(12_345_678.0), "12,345,678/s");
    }

    #[test]
    fn ratio_needs_both_sides() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x");
        assert_eq!(ratio(Some(3.0), None), "—");
        assert_eq!(ratio(None, Some(2.0)), "—");
        assert_eq!(ratio(Some(3.0), Some(0.0)), "—");
    }

    #[test]
    fn keys_and_values_have_the_benchmark_sizes() {
        assert_eq!(key('r', 7).len(), 16);
        assert_eq!(key('p', KEYS - 1).len(), 16);
        assert_eq!(value(123).len(), 64);
    }

    #[test]
    fn a_table_with_one_system_shows_dashes_for_the_other() {
        let r = Report {
            ops: 2,
            errors: 0,
            first_error: None,
            elapsed: Duration::from_secs(1),
            latencies_us: vec![100, 300],
            ops_per_call: 1,
        };
        let calm = Results {
            runs: vec![(
                Workload::Put,
                Outcome {
                    report: r,
                    retries: 0,
                },
            )],
            ..Default::default()
        };
        let text = table(&[Workload::Put], Some(&calm), None, true).to_string();
        assert!(text.contains("put x64"), "{text}");
        assert!(text.contains("2/s"), "{text}");
        assert!(text.contains("—"), "{text}");
    }
}
