//! `calm bench`: load against a running cluster over the public API, with latency
//! percentiles and throughput. Keys are 16 bytes, values 64 bytes (as in etcd's benchmarks).
//!
//! Every run is bounded by an op count and a duration, whichever comes first.
//!
//! `calm bench compare` ([`compare`]) starts its own calm and etcd clusters ([`cluster`]) and
//! runs the same workloads against both, with etcd's client in [`etcd`].

pub mod cluster;
pub mod compare;
pub mod etcd;
pub mod keepalive;
pub mod watch;

use crate::api::pb;
use crate::client::connect;
use crate::route::{Router, layout};
use anyhow::{Result, bail};
use calm_raft::channel::H2Channel;
use serde_json::json;
use std::time::{Duration, Instant};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Register put (Raft).
    Put,
    /// Linearizable get of keys written first.
    Get,
    /// Serializable (local) get: the API's own cost.
    GetLocal,
    /// Compare-and-set on a register, expecting its current version (Raft).
    Cas,
    /// Counter add (fast path).
    Add,
    /// Batch calls of `--batch` counter adds.
    Batch,
    /// Batch calls of `--batch` register puts (Raft; a Batch is not a transaction).
    BatchPut,
    /// Linearizable Scan pages of `--batch` keys (at most 10000) with their values, each
    /// from a random key of `--keys` registers; ops are keys returned.
    Scan,
    /// Watch fan-out: `--watchers` streams on one prefix while `--concurrency` clients put
    /// registers under it; ops are events delivered, latencies from a put's send to each
    /// watcher's receipt (see `watch`).
    Watch,
    /// Lease keep-alives: `--keys` leases (TTL 9 s) granted first, then `--concurrency`
    /// streams renew each one every 3 s; ops are renewals answered (see `keepalive`).
    Keepalive,
    /// grpc.health.v1 Check: no calm code at all, so the floor of one call (client, tonic,
    /// HTTP/2, loopback, the node's wake-up) that every other workload pays too.
    Ping,
}

/// Where a bench client sends each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Route {
    /// To the leader of the key's group (calm's leader-aware client, `crate::route`);
    /// batches to the client's own node.
    Leader,
    /// To the client's own node, which forwards what it does not lead (a plain gRPC
    /// client). Clients are spread over the endpoints.
    Spread,
}

pub struct BenchOptions {
    pub workload: Workload,
    pub route: Route,
    pub ops: u64,
    pub concurrency: u64,
    pub duration: Duration,
    pub keys: u64,
    pub batch: u64,
    /// Watch streams, for the watch workload.
    pub watchers: u64,
}

/// Most concurrent clients; each holds a connection.
pub const CONCURRENCY_MAX: u64 = 1024;

pub struct Report {
    pub ops: u64,
    pub errors: u64,
    /// The first failed call's error, to say what went wrong.
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Per call, in microseconds, sorted.
    pub latencies_us: Vec<u64>,
    /// Ops per call (1, or the batch size).
    pub ops_per_call: u64,
}

impl Report {
    pub fn percentile_us(&self, p: f64) -> u64 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i]
    }

    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// A 16-byte key, with the workload's letter first (workloads need keys of their own type).
fn key(w: Workload, i: u64) -> Vec<u8> {
    let letter = match w {
        Workload::Put
        | Workload::Get
        | Workload::GetLocal
        | Workload::Ping
        | Workload::BatchPut => 'r',
        Workload::Cas => 'c',
        Workload::Add | Workload::Batch => 'n',
        Workload::Scan => 's',
        Workload::Watch => 'w',
        Workload::Keepalive => 'l',
    };
    format!("{letter}-bench-{i:08}").into_bytes()
}

fn value(i: u64) -> Vec<u8> {
    let mut v = format!("{i:064}").into_bytes();
    v.truncate(64);
    v
}

fn write(key: Vec<u8>, kind: pb::op::Kind) -> pb::WriteRequest {
    pb::WriteRequest {
        key,
        op: Some(pb::Op { kind: Some(kind) }),
        token: Vec::new(),
        lease: 0,
    }
}

/// Versions of the CAS keys as each client last saw them (one key per client, so CAS
/// contention measures the path, not conflicts).
async fn one_call(
    kv: &mut Router,
    health: &mut HealthClient<H2Channel>,
    o: &BenchOptions,
    client: u64,
    n: u64,
    cas_version: &mut u64,
) -> Result<(), tonic::Status> {
    let k = (client * 7919 + n) % o.keys;
    match o.workload {
        Workload::Put => {
            kv.write(write(
                key(o.workload, k),
                pb::op::Kind::Put(pb::Put { value: value(n) }),
            ))
            .await?;
        }
        Workload::Get | Workload::GetLocal => {
            let consistency = if o.workload == Workload::Get {
                pb::Consistency::Linearizable
            } else {
                pb::Consistency::Serializable
            };
            kv.get(pb::GetRequest {
                key: key(o.workload, k),
                consistency: consistency as i32,
                token: Vec::new(),
            })
            .await?;
        }
        Workload::Cas => {
            let r = kv
                .write(write(
                    key(o.workload, o.keys + client),
                    pb::op::Kind::Cas(pb::Cas {
                        expect: Some(pb::cas::Expect::Version(*cas_version)),
                        new_value: value(n),
                        delete: false,
                    }),
                ))
                .await?
                .into_inner();
            *cas_version = r.version;
        }
        Workload::Ping => ping(health).await?,
        Workload::Watch => unreachable!("`run` hands the watch workload to `watch::run`"),
        Workload::Keepalive => {
            unreachable!("`run` hands the keepalive workload to `keepalive::run`")
        }
        Workload::Scan => {
            // Pages start where a whole page follows, so every call returns `--batch` keys.
            let k = k % o.keys.saturating_sub(o.batch).max(1);
            let page = kv
                .scan(pb::ScanRequest {
                    start: key(o.workload, k),
                    end: b"s-bench.".to_vec(),
                    limit: o.batch as u32,
                    consistency: pb::Consistency::Linearizable as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            // The bench counts `--batch` ops per call: a short page is a failed call.
            let wanted = o.batch.min(o.keys - k) as usize;
            if page.entries.len() < wanted {
                return Err(tonic::Status::internal(format!(
                    "a scan page from key {k} held {} keys, {wanted} expected",
                    page.entries.len()
                )));
            }
        }
        Workload::Add => {
            kv.write(write(
                key(o.workload, k),
                pb::op::Kind::Add(pb::Add { delta: 1 }),
            ))
            .await?;
        }
        Workload::Batch | Workload::BatchPut => {
            let ops = (0..o.batch)
                .map(|j| {
                    let op = if o.workload == Workload::Batch {
                        pb::op::Kind::Add(pb::Add { delta: 1 })
                    } else {
                        pb::op::Kind::Put(pb::Put { value: value(n) })
                    };
                    write(key(o.workload, (k + j) % o.keys), op)
                })
                .collect();
            let r = kv.batch(pb::BatchRequest { ops }).await?.into_inner();
            if let Some(pb::batch_result::Result::Error(e)) = r.results.iter().find_map(|r| {
                r.result
                    .clone()
                    .filter(|r| matches!(r, pb::batch_result::Result::Error(_)))
            }) {
                return Err(tonic::Status::new(tonic::Code::from_i32(e.code), e.message));
            }
        }
    }
    Ok(())
}

/// One grpc.health.v1 Check of the server as a whole; an answer other than SERVING is an
/// error. Both `calm bench ping` and `calm bench compare`'s ping row call this.
pub(crate) async fn ping(health: &mut HealthClient<H2Channel>) -> Result<(), tonic::Status> {
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    if status != ServingStatus::Serving as i32 {
        return Err(tonic::Status::unavailable(format!(
            "the health check answered status {status} (not SERVING)"
        )));
    }
    Ok(())
}

/// Create the keys the workload needs (so the measured ops are not key creations).
async fn prepare(endpoints: &[String], o: &BenchOptions) -> Result<()> {
    if o.workload == Workload::Ping {
        return Ok(());
    }
    let mut kv = Router::unrouted(connect(endpoints).await?);
    let chunk = 500;
    let mut i = 0;
    let total = match o.workload {
        Workload::Cas => o.keys + o.concurrency,
        _ => o.keys,
    };
    while i < total {
        let ops = (i..(i + chunk).min(total))
            .map(|k| {
                let kind = match o.workload {
                    Workload::Add | Workload::Batch => pb::op::Kind::Add(pb::Add { delta: 0 }),
                    _ => pb::op::Kind::Put(pb::Put { value: value(k) }),
                };
                write(key(o.workload, k), kind)
            })
            .collect();
        let r = kv.batch(pb::BatchRequest { ops }).await?.into_inner();
        for r in r.results {
            if let Some(pb::batch_result::Result::Error(e)) = r.result {
                bail!("preparing the keys failed: {}", e.message);
            }
        }
        i += chunk;
    }
    Ok(())
}

pub async fn run(endpoints: &[String], o: BenchOptions) -> Result<Report> {
    if o.concurrency == 0 || o.concurrency > CONCURRENCY_MAX {
        bail!("--concurrency must be within 1..={CONCURRENCY_MAX}");
    }
    if o.keys == 0 {
        bail!("--keys must be at least 1");
    }
    if o.workload == Workload::Watch {
        return watch::run(endpoints, &o).await;
    }
    if o.workload == Workload::Keepalive {
        return keepalive::run(endpoints, &o).await;
    }
    if o.workload == Workload::Scan && !(1..=10_000).contains(&o.batch) {
        bail!("--batch (keys per scan page) must be within 1..=10000");
    }
    prepare(endpoints, &o).await?;
    let status = match o.route {
        Route::Leader => Some(std::sync::Arc::new(
            layout(connect(endpoints).await?).await?,
        )),
        Route::Spread => None,
    };
    // CAS keys were just written once: version 1.
    let o = std::sync::Arc::new(o);
    let started = Instant::now();
    let per_client = o.ops.div_ceil(o.concurrency);
    let mut tasks = Vec::new();
    for client in 0..o.concurrency {
        // Spread clients over the endpoints, each on its own connection.
        let ep = vec![endpoints[client as usize % endpoints.len()].clone()];
        let o = o.clone();
        let status = status.clone();
        tasks.push(tokio::spawn(async move {
            let channel = connect(&ep).await?;
            let mut health = HealthClient::new(channel.clone());
            let mut kv = match &status {
                Some(status) => Router::from_status(status, channel)?,
                None => Router::unrouted(channel),
            };
            let mut latencies = Vec::with_capacity(per_client as usize);
            let mut errors = 0u64;
            let mut first_error = None;
            let mut cas_version = 1;
            for n in 0..per_client {
                if started.elapsed() > o.duration {
                    break;
                }
                let t = Instant::now();
                match one_call(&mut kv, &mut health, &o, client, n, &mut cas_version).await {
                    Ok(()) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| describe_error(&e, t.elapsed()));
                    }
                }
            }
            anyhow::Ok((latencies, errors, first_error))
        }));
    }
    let (latencies_us, errors, first_error) = gather(tasks).await?;
    let elapsed = started.elapsed();
    let ops_per_call = if matches!(
        o.workload,
        Workload::Batch | Workload::BatchPut | Workload::Scan
    ) {
        o.batch
    } else {
        1
    };
    Ok(Report {
        ops: latencies_us.len() as u64 * ops_per_call,
        errors,
        first_error,
        elapsed,
        latencies_us,
        ops_per_call,
    })
}

/// What one bench client measured: its latencies (µs), its errors and the first of them.
type ClientMeasures = (Vec<u64>, u64, Option<String>);

/// Every client's measures together, latencies sorted.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<Result<ClientMeasures>>>,
) -> Result<ClientMeasures> {
    let (mut latencies_us, mut errors, mut first_error) = (Vec::new(), 0, None);
    for t in tasks {
        let (l, e, f) = t.await??;
        latencies_us.extend(l);
        errors += e;
        first_error = first_error.or(f);
    }
    latencies_us.sort_unstable();
    Ok((latencies_us, errors, first_error))
}

/// A failed call for a report: its code, how long it took, and its message.
pub fn describe_error(e: &tonic::Status, after: Duration) -> String {
    format!(
        "{:?} after {} ms: {}",
        e.code(),
        after.as_millis(),
        e.message()
    )
}

pub fn print(workload: Workload, o_concurrency: u64, r: &Report, json_out: bool) {
    let name = format!("{workload:?}").to_lowercase();
    if json_out {
        println!(
            "{}",
            json!({
                "workload": name, "concurrency": o_concurrency, "ops": r.ops, "errors": r.errors,
                "seconds": r.elapsed.as_secs_f64(), "ops_per_sec": r.ops_per_sec(),
                "p50_us": r.percentile_us(0.5), "p99_us": r.percentile_us(0.99),
                "ops_per_call": r.ops_per_call, "first_error": r.first_error,
            })
        );
    } else {
        println!(
            "{name:>6} x{o_concurrency:<4} {:>9.0} ops/s  p50 {:>6} µs  p99 {:>6} µs  ({} ops, {} errors, {:.1} s)",
            r.ops_per_sec(),
            r.percentile_us(0.5),
            r.percentile_us(0.99),
            r.ops,
            r.errors,
            r.elapsed.as_secs_f64()
        );
        if let Some(e) = &r.first_error {
            println!("       first error: {e}");
        }
    }
}
