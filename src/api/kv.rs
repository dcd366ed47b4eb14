//! The `calm.v1.Kv` service: Write, Batch, Get, Scan, Watch and Txn.

use super::ops::kernel_op;
use super::pb::kv_server::Kv;
use super::write::{KeyOps, Pending};
use super::{
    BATCH_OPS_MAX, METRIC_BATCH_SECONDS, METRIC_READ_SECONDS, METRIC_SCAN_SECONDS,
    METRIC_TXN_SECONDS, METRIC_WRITE_SECONDS, invalid, pb,
};
use crate::node::{Node, fatal};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Status};

pub struct KvService {
    pub(super) node: Arc<Node>,
    /// Watch streams open (see `watch.rs`).
    pub(super) watchers: Arc<std::sync::atomic::AtomicUsize>,
    /// Ends watch streams when the node stops (the server waits for open streams).
    pub(super) shutdown: tokio_util::sync::CancellationToken,
}

fn error_of(status: &Status) -> pb::Error {
    pb::Error {
        code: status.code() as i32,
        message: status.message().to_string(),
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<tonic::Response<pb::WriteResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let op = req.op.and_then(|o| o.kind);
        let response = self.node.write(&req.key, op, &req.token, req.lease).await?;
        let path = match pb::Path::try_from(response.path) {
            Ok(pb::Path::Consensus) => "consensus",
            Ok(pb::Path::Escrow) => "escrow",
            _ => "fast",
        };
        metrics::histogram!(METRIC_WRITE_SECONDS, "path" => path).record(started.elapsed());
        Ok(if response.path == pb::Path::Consensus as i32 {
            self.node.hinted(&req.key, response)
        } else {
            tonic::Response::new(response)
        })
    }

    /// Ops of one key are admitted and proposed in request order; different keys proceed
    /// concurrently, and fast-path ops share group commits.
    async fn batch(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<tonic::Response<pb::BatchResponse>, Status> {
        let started = Instant::now();
        let ops = request.into_inner().ops;
        if ops.len() > BATCH_OPS_MAX {
            return Err(invalid(format!(
                "the batch has {} ops; send at most {BATCH_OPS_MAX} per call",
                ops.len()
            )));
        }
        let mut by_key: BTreeMap<Vec<u8>, KeyOps> = BTreeMap::new();
        let mut results = Vec::with_capacity(ops.len());
        for (i, op) in ops.into_iter().enumerate() {
            if op.lease != 0 {
                results.push((
                    i,
                    Err(invalid(
                        "a Batch op carries a lease; attach keys to leases with Write (one leased write per call)",
                    )),
                ));
                continue;
            }
            by_key
                .entry(op.key)
                .or_default()
                .push((i, op.op.and_then(|o| o.kind), op.token));
        }
        let node = &self.node;
        let (admitted, durable, rest) = node.admit_leading_fast(by_key, &mut results);
        let fast = async {
            if let Some(durable) = durable
                && let Err(e) = durable.await
            {
                fatal("making a batch's facts durable", &e);
            }
            node.gossip
                .publish_many(admitted.iter().map(|(_, f, _, _)| f.fact.as_slice()));
            let escrow = admitted.iter().filter(|(_, f, _, _)| f.escrow).count() as u64;
            metrics::counter!("calm_writes_total", "path" => "escrow").increment(escrow);
            metrics::counter!("calm_writes_total", "path" => "fast")
                .increment(admitted.len() as u64 - escrow);
            admitted
                .iter()
                .map(|(i, f, group, deleted)| {
                    (*i, Ok(node.fast_response(f.id, f.escrow, *group, *deleted)))
                })
                .collect::<Vec<_>>()
        };
        // The rest of each key, in order, one op at a time (as `write` would); phase one
        // checked the key already.
        let per_key = rest.into_iter().map(|(key, ops)| async move {
            let mut done = Vec::with_capacity(ops.len());
            let mut fast = Vec::new();
            for (i, op, token) in ops {
                let op = match kernel_op(node, &key, op) {
                    Ok(op) => op,
                    Err(e) => {
                        done.push((i, Err(e)));
                        continue;
                    }
                };
                if let Err(e) = node.await_write_token(&key, &token).await {
                    done.push((i, Err(e)));
                    continue;
                }
                let result = match node.admit(&key, &op) {
                    // Durability is awaited below, together: later ops need not wait for it.
                    Ok(p @ Pending::Fast { .. }) => {
                        fast.push((i, p));
                        continue;
                    }
                    Ok(p @ Pending::Consensus { .. }) => node.finish(p).await,
                    Err(e) => Err(e),
                };
                done.push((i, node.after_exhausted(&key, &op, result).await));
            }
            for (i, p) in fast {
                done.push((i, node.finish(p).await));
            }
            done
        });
        let (fast, rest) = tokio::join!(fast, futures::future::join_all(per_key));
        results.extend(fast);
        results.extend(rest.into_iter().flatten());
        results.sort_unstable_by_key(|(i, _)| *i);
        let results = results
            .into_iter()
            .map(|(_, r)| pb::BatchResult {
                result: Some(match r {
                    Ok(ok) => pb::batch_result::Result::Ok(ok),
                    Err(e) => pb::batch_result::Result::Error(error_of(&e)),
                }),
            })
            .collect();
        metrics::histogram!(METRIC_BATCH_SECONDS).record(started.elapsed());
        Ok(tonic::Response::new(pb::BatchResponse { results }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<tonic::Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        let consistency = pb::Consistency::try_from(req.consistency).map_err(|_| {
            invalid(format!(
                "consistency {} is not one of LINEARIZABLE (1), SERIALIZABLE (2), CAUSAL (3)",
                req.consistency
            ))
        })?;
        let started = Instant::now();
        let response = self.node.get(&req.key, consistency, &req.token).await?;
        let label = match consistency {
            pb::Consistency::Unspecified | pb::Consistency::Linearizable => "linearizable",
            pb::Consistency::Serializable => "serializable",
            pb::Consistency::Causal => "causal",
        };
        metrics::histogram!(METRIC_READ_SECONDS, "consistency" => label).record(started.elapsed());
        Ok(match consistency {
            pb::Consistency::Unspecified | pb::Consistency::Linearizable => {
                self.node.hinted(&req.key, response)
            }
            _ => tonic::Response::new(response),
        })
    }

    type ScanStreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::ScanResponse, Status>> + Send + 'static>,
    >;

    /// Page after page of `scan`, each read when the client polls for it. The first page is
    /// read before answering, so a bad request is the call's error, not the stream's.
    async fn scan_stream(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<tonic::Response<Self::ScanStreamStream>, Status> {
        let req = request.into_inner();
        let first = timed_scan(&self.node, req.clone()).await?;
        let node = self.node.clone();
        // State: the page to send (read already, or to read from `req`), or `None`: done.
        let pages = futures::stream::try_unfold(Some((Some(first), req)), move |state| {
            let node = node.clone();
            async move {
                let Some((page, mut req)) = state else {
                    return Ok(None);
                };
                let page = match page {
                    Some(page) => page,
                    None => timed_scan(&node, req.clone()).await?,
                };
                let next = (!page.next_page_token.is_empty()).then(|| {
                    req.page_token = page.next_page_token.clone();
                    (None, req)
                });
                Ok(Some((page, next)))
            }
        });
        Ok(tonic::Response::new(Box::pin(pages)))
    }

    type WatchStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::WatchResponse, Status>> + Send + 'static>,
    >;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, Status> {
        let stream = super::watch::open(
            &self.node,
            request.into_inner(),
            self.watchers.clone(),
            self.shutdown.clone(),
        )?;
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<tonic::Response<pb::TxnResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        // The leader hint is the first key's: every key of a transaction shares its group.
        let first = req
            .compare
            .first()
            .map(|c| c.key.clone())
            .or_else(|| req.success.first().map(|o| o.key.clone()))
            .or_else(|| req.failure.first().map(|o| o.key.clone()))
            .unwrap_or_default();
        let response = self.node.txn(req).await?;
        let branch = if response.succeeded {
            "success"
        } else {
            "failure"
        };
        metrics::histogram!(METRIC_TXN_SECONDS, "branch" => branch).record(started.elapsed());
        Ok(self.node.hinted(&first, response))
    }

    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<tonic::Response<pb::ScanResponse>, Status> {
        let response = timed_scan(&self.node, request.into_inner()).await?;
        Ok(tonic::Response::new(response))
    }
}

/// One page of a scan, its time recorded in [`METRIC_SCAN_SECONDS`] when it succeeds.
async fn timed_scan(node: &Node, req: pb::ScanRequest) -> Result<pb::ScanResponse, Status> {
    let started = Instant::now();
    let page = node.scan(req).await?;
    metrics::histogram!(METRIC_SCAN_SECONDS).record(started.elapsed());
    Ok(page)
}
