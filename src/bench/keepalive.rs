//! `calm bench keepalive`: the cost of keeping leases alive. `--keys` leases (each for its
//! own subject, so they spread over the groups) are granted first, unmeasured; then
//! `--concurrency` keep-alive streams, spread over the endpoints, renew every lease once per
//! third of its TTL (as `calm lease keepalive` does) until `--ops` renewals were answered or
//! `--seconds` passed. Ops are renewals answered, latencies from a renewal's send to its
//! answer; an answer saying the lease is gone is an error.

use super::{BenchOptions, Report, describe_error};
use crate::api::pb;
use crate::api::pb::lease_client::LeaseClient;
use crate::client::connect;
use anyhow::{Result, bail};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The TTL the bench's leases get; each is renewed every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(9);
/// Most leases one run grants.
pub const LEASES_MAX: u64 = 100_000;
/// Grants in flight while preparing.
const GRANTS_IN_FLIGHT: usize = 64;

pub(super) async fn run(endpoints: &[String], o: &BenchOptions) -> Result<Report> {
    if !(1..=LEASES_MAX).contains(&o.keys) {
        bail!("--keys (leases) must be within 1..={LEASES_MAX}");
    }
    let granted_in = Instant::now();
    let channel = connect(endpoints).await?;
    let ids: Vec<u64> = {
        use futures::StreamExt;
        futures::stream::iter(0..o.keys)
            .map(|i| {
                let mut leases = LeaseClient::new(channel.clone());
                async move {
                    leases
                        .grant(pb::LeaseGrantRequest {
                            ttl_ms: LEASE_TTL.as_millis() as u64,
                            subject: format!("l-bench-{i:08}").into_bytes(),
                            key: Vec::new(),
                        })
                        .await
                        .map(|r| r.into_inner().id)
                }
            })
            .buffer_unordered(GRANTS_IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?
    };
    eprintln!(
        "granted {} leases in {:.1} s; renewing each every {} ms on {} streams",
        ids.len(),
        granted_in.elapsed().as_secs_f64(),
        LEASE_TTL.as_millis() / 3,
        o.concurrency
    );
    let started = Instant::now();
    let per_stream = o.ops.div_ceil(o.concurrency);
    let mut tasks = Vec::new();
    for s in 0..o.concurrency {
        let mine: Vec<u64> = ids
            .iter()
            .copied()
            .skip(s as usize)
            .step_by(o.concurrency as usize)
            .collect();
        let ep = vec![endpoints[s as usize % endpoints.len()].clone()];
        let duration = o.duration;
        tasks.push(tokio::spawn(async move {
            let mut leases = LeaseClient::new(connect(&ep).await?);
            let (requests, rx) = tokio::sync::mpsc::channel(mine.len().max(1));
            let mut answers = leases
                .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let mut latencies = Vec::new();
            let (mut errors, mut first_error) = (0u64, None);
            'rounds: while !mine.is_empty() {
                let round = Instant::now();
                let mut sent = VecDeque::with_capacity(mine.len());
                for &id in &mine {
                    sent.push_back(Instant::now());
                    if requests
                        .send(pb::LeaseKeepAliveRequest { id })
                        .await
                        .is_err()
                    {
                        bail!("the keep-alive stream closed");
                    }
                }
                // Answers come in request order.
                while let Some(at) = sent.pop_front() {
                    match answers.message().await {
                        Ok(Some(a)) if a.ttl_ms > 0 => {
                            latencies.push(at.elapsed().as_micros() as u64)
                        }
                        Ok(Some(a)) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| {
                                format!("lease {:x} was gone when renewed", a.id)
                            });
                        }
                        Ok(None) => bail!("the node ended the keep-alive stream"),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| describe_error(&e, at.elapsed()));
                            break 'rounds;
                        }
                    }
                }
                if latencies.len() as u64 >= per_stream || started.elapsed() >= duration {
                    break;
                }
                let pause = (LEASE_TTL / 3).saturating_sub(round.elapsed());
                if started.elapsed() + pause >= duration {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            anyhow::Ok((latencies, errors, first_error))
        }));
    }
    let (latencies_us, errors, first_error) = super::gather(tasks).await?;
    let elapsed = started.elapsed();
    Ok(Report {
        ops: latencies_us.len() as u64,
        errors,
        first_error,
        elapsed,
        latencies_us,
        ops_per_call: 1,
    })
}
