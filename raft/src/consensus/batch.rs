//! Multi-Raft batching: unary calls to a peer travel together in `Batch` RPCs.
//!
//! openraft replicates group by group, so a node with G groups sent each follower G
//! AppendEntries RPCs per replication round, each its own HTTP/2 stream with HPACK headers,
//! task wake-ups on both ends and a TCP write: the transport, not Raft or storage, was most of
//! a replicated put's CPU (docs/benchmarks.md). A [`Batcher`] per peer and [`Lane`] queues the
//! calls of every group; its sender takes the first queued call, lets every other task that is
//! ready run (one yield, no timer), and sends that call with everything queued meanwhile. A
//! lone call therefore leaves at once, and the calls that one event produces (the groups'
//! replication tasks woken by one WAL flush, the flushes of many proposals) share a message.
//! The peer runs a batch's calls concurrently and answers when all are done, each call with its
//! own payload or status ([`super::service`]).
//!
//! Two lanes per peer, because a batch is answered when its slowest call is done: Raft
//! messages (AppendEntries, votes, transfers) are answered once the peer's log write is
//! durable, while forwarded proposals and read-index requests are answered only after a
//! commit, which may itself wait for that replication.
//!
//! A call may also be *deferred* ([`Batcher::call_held`]): it does not make a batch leave
//! by itself, but rides on the next batch to its peer, or leaves when its hold ends. Commit
//! notices travel this way ([`super::commit_notice`]).
//!
//! Every call keeps its own deadline: a caller stops waiting when it passes (DEADLINE_EXCEEDED,
//! outcome unknown), a call whose caller gave up before its batch left is not sent, and a
//! batch still unsent when its last deadline passes (say, waiting for a connection) is dropped.

use super::metrics::{
    METRIC_PEER_BATCHED_CALLS, METRIC_PEER_BATCHES, METRIC_PEER_ROUND_TRIP_SECONDS,
};
use super::types::{GroupId, NodeId};
use super::wire::{GroupMessage, PeerBatch, PeerCall, PeerRpc, raft_peer_client::RaftPeerClient};
use crate::channel::H2Channel;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::{Code, Status};

/// Calls at most in one batch (the peer refuses larger batches).
pub const BATCH_CALLS_MAX: usize = 256;
/// Payload bytes after which a batch takes no more calls (a larger call still goes, alone or
/// last): keeps one batch far below the peer service's 64 MiB message limit.
pub const BATCH_BYTES_MAX: usize = 4 << 20;
/// Batches of one lane in flight to one peer at once. A bound, not a batching device: waiting
/// for a free slot delays the calls of every group (measured slower with 2 slots).
pub const BATCHES_IN_FLIGHT_MAX: usize = 64;
/// Calls at most waiting in one lane for one peer; beyond it a call fails at once, unsent.
pub const BATCH_QUEUE_MAX: usize = 8192;
/// How the message of a call that was never sent begins (the peer cannot have seen it).
pub const NOT_SENT: &str = "not sent to the peer";

/// Which of a peer's two queues a call joins (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// AppendEntries, votes, leadership transfers.
    Raft,
    /// Forwarded proposals and read-index requests.
    Client,
}

impl Lane {
    fn name(self) -> &'static str {
        match self {
            Lane::Raft => "raft",
            Lane::Client => "client",
        }
    }
}

/// What a lane's queue carries.
enum Queued {
    Call(Call),
    /// Send the deferred calls waiting now, and those that arrive before `until`, without
    /// waiting out their hold.
    Release {
        until: tokio::time::Instant,
    },
}

struct Call {
    rpc: PeerRpc,
    message: GroupMessage,
    ttl: Duration,
    /// For a deferred call, how long it may wait for a batch to ride on.
    hold: Option<Duration>,
    reply: oneshot::Sender<Result<Vec<u8>, Status>>,
}

/// One lane's queue to one peer. Cheap to clone; the sender task ends when every clone is gone.
#[derive(Clone)]
pub struct Batcher {
    node: NodeId,
    queue: mpsc::Sender<Queued>,
}

impl Batcher {
    /// Start the lane's sender over `client` (a clone of the peer's one channel). Needs a
    /// tokio runtime.
    pub fn start(node: NodeId, lane: Lane, client: RaftPeerClient<H2Channel>) -> Batcher {
        let (queue, calls) = mpsc::channel(BATCH_QUEUE_MAX);
        tokio::spawn(send_batches(lane, client, calls));
        Batcher { node, queue }
    }

    /// One call: `payload` for `group`'s `rpc` on the peer; its reply payload, or the status
    /// the peer (or the transport) failed it with. Waits at most `ttl`.
    pub async fn call(
        &self,
        rpc: PeerRpc,
        group: GroupId,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Vec<u8>, Status> {
        self.call_held(rpc, group, payload, ttl, None).await
    }

    /// Send the deferred calls waiting for the peer now (with whatever else is queued), and
    /// those deferred during the next `window` as if they were not. A node answering a peer's
    /// forwarded proposal calls this, so that the commit notice it owes that peer goes out
    /// with the answer, whether it was queued just before or is queued just after it. Best
    /// effort: a full queue is about to send anyway.
    pub fn release_deferred(&self, window: Duration) {
        let until = tokio::time::Instant::now() + window;
        let _ = self.queue.try_send(Queued::Release { until });
    }

    /// [`Batcher::call`], or with `Some(hold)` a deferred call: it does not make a batch
    /// leave, but goes with the next batch to the peer, or alone once `hold` has passed
    /// (`ttl` counts from now).
    pub async fn call_held(
        &self,
        rpc: PeerRpc,
        group: GroupId,
        payload: Vec<u8>,
        ttl: Duration,
        hold: Option<Duration>,
    ) -> Result<Vec<u8>, Status> {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            rpc,
            message: GroupMessage { group, payload },
            ttl,
            hold,
            reply,
        };
        self.queue.try_send(Queued::Call(call)).map_err(|e| {
            Status::unavailable(match e {
                mpsc::error::TrySendError::Full(_) => format!(
                    "{NOT_SENT}: {BATCH_QUEUE_MAX} calls already wait for node {}; it is slow or the network is",
                    self.node
                ),
                mpsc::error::TrySendError::Closed(_) => format!(
                    "{NOT_SENT}: the sender to node {} stopped (this node is shutting down)",
                    self.node
                ),
            })
        })?;
        match tokio::time::timeout(ttl, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Status::unavailable(format!(
                "the batch carrying a call to node {} ended without its answer",
                self.node
            ))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "node {} did not answer within {} ms",
                self.node,
                ttl.as_millis()
            ))),
        }
    }
}

/// The lane's sender: takes the first waiting call once a slot is free, and with it whatever
/// queued by the time the tasks ready now have run (bounded), as one batch. Deferred calls
/// alone wait first, for a call that is not deferred or the end of the first one's hold.
async fn send_batches(
    lane: Lane,
    client: RaftPeerClient<H2Channel>,
    mut calls: mpsc::Receiver<Queued>,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT_MAX));
    // Until when deferred calls leave at once (`Batcher::release_deferred`).
    let mut released_until = tokio::time::Instant::now();
    while let Some(queued) = calls.recv().await {
        let first = match queued {
            Queued::Call(call) => call,
            Queued::Release { until } => {
                released_until = released_until.max(until);
                continue;
            }
        };
        let mut bytes = first.message.payload.len();
        let mut batch = vec![first];
        let now = tokio::time::Instant::now();
        if let Some(hold) = batch[0].hold.filter(|_| now >= released_until) {
            let until = now + hold;
            while batch.len() < BATCH_CALLS_MAX && bytes < BATCH_BYTES_MAX {
                tokio::select! {
                    queued = calls.recv() => match queued {
                        Some(Queued::Call(call)) => {
                            bytes += call.message.payload.len();
                            let urgent = call.hold.is_none();
                            batch.push(call);
                            if urgent {
                                break;
                            }
                        }
                        Some(Queued::Release { until }) => {
                            released_until = released_until.max(until);
                            break;
                        }
                        None => break,
                    },
                    () = tokio::time::sleep_until(until) => break,
                }
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Let every task that is ready now run first: tokio runs a task woken by another
        // right after it (its LIFO slot), so without this the sender would take each call
        // alone. The groups' replication tasks woken by one WAL flush queue theirs meanwhile.
        tokio::task::yield_now().await;
        while batch.len() < BATCH_CALLS_MAX && bytes < BATCH_BYTES_MAX {
            match calls.try_recv() {
                Ok(Queued::Call(call)) => {
                    bytes += call.message.payload.len();
                    batch.push(call);
                }
                // This batch is leaving now anyway.
                Ok(Queued::Release { until }) => released_until = released_until.max(until),
                Err(_) => break,
            }
        }
        let client = client.clone();
        tokio::spawn(async move {
            send(lane, client, batch).await;
            drop(slot);
        });
    }
}

async fn send(lane: Lane, mut client: RaftPeerClient<H2Channel>, batch: Vec<Call>) {
    // A caller that gave up already reported an unknown outcome; not sending is one.
    let batch: Vec<Call> = batch.into_iter().filter(|c| !c.reply.is_closed()).collect();
    let Some(ttl) = batch.iter().map(|c| c.ttl).max() else {
        return;
    };
    let (replies, calls): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|c| {
            let call = PeerCall {
                rpc: c.rpc as i32,
                message: Some(c.message),
            };
            (c.reply, call)
        })
        .unzip();
    let count = calls.len();
    let lane = lane.name();
    metrics::counter!(METRIC_PEER_BATCHES, "lane" => lane).increment(1);
    metrics::counter!(METRIC_PEER_BATCHED_CALLS, "lane" => lane).increment(count as u64);
    let mut request = tonic::Request::new(PeerBatch { calls });
    let sent_at = Instant::now();
    request.set_timeout(ttl);
    // Bounded here too, not only by each caller's wait: a call queued in the channel behind a
    // connection attempt would otherwise still go out once the network heals, long after its
    // caller was told it failed (dropping the future cancels it in the channel's queue).
    let sent = match tokio::time::timeout(ttl, client.batch(request)).await {
        Ok(sent) => sent,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the batch did not complete within {} ms",
            ttl.as_millis()
        ))),
    };
    match sent {
        Ok(reply) => {
            metrics::histogram!(METRIC_PEER_ROUND_TRIP_SECONDS, "lane" => lane)
                .record(sent_at.elapsed());
            let results = reply.into_inner().results;
            if results.len() != count {
                let status = Status::internal(format!(
                    "the peer answered {} results for a batch of {count} calls (a bug)",
                    results.len()
                ));
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
                return;
            }
            for (reply, result) in replies.into_iter().zip(results) {
                let answer = if result.code == Code::Ok as i32 {
                    Ok(result.payload)
                } else {
                    Err(Status::new(Code::from_i32(result.code), result.message))
                };
                let _ = reply.send(answer);
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(Status::new(
                    status.code(),
                    status.message().to_string(),
                )));
            }
        }
    }
}
