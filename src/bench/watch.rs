//! `calm bench watch`: watch fan-out. `--watchers` streams watch one prefix (spread over
//! the endpoints, up to 100 streams on one connection), while `--concurrency` clients put
//! registers under it (Raft writes). Every put's value carries the time it was sent, and
//! every watcher records, for each event, how long after its put was sent it arrived. The
//! report's ops are events delivered and its latencies are delivery times; events a watcher
//! never received within 30 s of the last put are errors.

use super::{BenchOptions, Report, describe_error, write};
use crate::api::pb;
use crate::api::pb::kv_client::KvClient;
use crate::client::connect;
use anyhow::{Result, bail};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Most watch streams one run opens.
pub const WATCHERS_MAX: u64 = 10_000;
/// Watch streams sharing one HTTP/2 connection.
const STREAMS_PER_CONNECTION: u64 = 100;
/// How long watchers wait for the last events after the last put.
const DRAIN_TIME_MAX: Duration = Duration::from_secs(30);
const PREFIX: &str = "w-bench-";

/// The send time (nanoseconds since `base`) as a 64-byte value.
fn stamped(base: Instant) -> Vec<u8> {
    format!("{:064}", base.elapsed().as_nanos()).into_bytes()
}

fn sent_at(value: &pb::Value) -> Option<u128> {
    match value.kind.as_ref()? {
        pb::value::Kind::Register(r) => std::str::from_utf8(&r.value).ok()?.parse().ok(),
        _ => None,
    }
}

pub(super) async fn run(endpoints: &[String], o: &BenchOptions) -> Result<Report> {
    if !(1..=WATCHERS_MAX).contains(&o.watchers) {
        bail!("--watchers must be within 1..={WATCHERS_MAX}");
    }
    let base = Instant::now();
    let connections = o.watchers.div_ceil(STREAMS_PER_CONNECTION);
    let mut channels = Vec::new();
    for c in 0..connections {
        channels.push(connect(&[endpoints[c as usize % endpoints.len()].clone()]).await?);
    }
    // Every stream is in place (its `created` response read) before the first put.
    let mut streams = Vec::new();
    for w in 0..o.watchers {
        let mut kv = KvClient::new(channels[(w / STREAMS_PER_CONNECTION) as usize].clone());
        let mut stream = kv
            .watch(pb::WatchRequest {
                prefix: PREFIX.as_bytes().to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner();
        match stream.message().await? {
            Some(r) if r.created => {}
            other => bail!("watch stream {w} did not start: {other:?}"),
        }
        streams.push(stream);
    }
    // Set to the number of puts acknowledged once the writers are done.
    let (target_tx, target_rx) = tokio::sync::watch::channel(None::<u64>);
    let mut watchers = Vec::new();
    for mut stream in streams {
        let mut target = target_rx.clone();
        watchers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut received = 0u64;
            let mut deadline = None;
            loop {
                if let Some(t) = *target.borrow() {
                    if received >= t {
                        break;
                    }
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + DRAIN_TIME_MAX);
                }
                let until = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    message = stream.message() => match message {
                        Ok(Some(r)) => {
                            let now = base.elapsed().as_nanos();
                            for e in &r.events {
                                received += 1;
                                if let Some(sent) = e.value.as_ref().and_then(sent_at) {
                                    latencies.push((now.saturating_sub(sent) / 1_000) as u64);
                                }
                            }
                        }
                        _ => break,
                    },
                    _ = target.changed() => {}
                    () = until => break,
                }
            }
            (latencies, received)
        }));
    }
    let started = Instant::now();
    let per_client = o.ops.div_ceil(o.concurrency);
    let acked = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for client in 0..o.concurrency {
        let ep = vec![endpoints[client as usize % endpoints.len()].clone()];
        let (acked, keys, duration) = (acked.clone(), o.keys, o.duration);
        writers.push(tokio::spawn(async move {
            let mut kv = KvClient::new(connect(&ep).await?);
            let mut errors = 0u64;
            let mut first_error = None;
            for n in 0..per_client {
                if started.elapsed() > duration {
                    break;
                }
                let key = format!("{PREFIX}{client:03}-{:04}", n % keys).into_bytes();
                let put = pb::op::Kind::Put(pb::Put {
                    value: stamped(base),
                });
                let t = Instant::now();
                match kv.write(write(key, put)).await {
                    Ok(_) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| describe_error(&e, t.elapsed()));
                    }
                }
            }
            anyhow::Ok((errors, first_error))
        }));
    }
    let mut errors = 0;
    let mut first_error = None;
    for w in writers {
        let (e, f) = w.await??;
        errors += e;
        first_error = first_error.or(f);
    }
    let puts = acked.load(Ordering::Relaxed);
    target_tx.send_replace(Some(puts));
    let mut latencies_us = Vec::new();
    let mut missing = 0;
    for w in watchers {
        let (l, received) = w.await?;
        missing += puts.saturating_sub(received);
        latencies_us.extend(l);
    }
    if missing > 0 {
        first_error.get_or_insert_with(|| format!("{missing} events never reached their watcher"));
    }
    let elapsed = started.elapsed();
    latencies_us.sort_unstable();
    Ok(Report {
        ops: latencies_us.len() as u64,
        errors: errors + missing,
        first_error,
        elapsed,
        latencies_us,
        ops_per_call: 1,
    })
}
