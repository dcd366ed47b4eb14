//! What keeps leases moving without a client call: the lease clock's ticks in the groups
//! this node leads, and keep-alive renewals batched per group.
//!
//! Ticks (`calm_kernel::lease` explains the log clock): every [`TICK_INTERVAL`], for each
//! data group this node leads that holds leases, propose a tick claiming the time this
//! node's monotonic clock measured since its previous tick proposal in the same term (or
//! since it first saw itself leading that term, which is after its election). A tick that
//! fails to commit only makes the next claim smaller; one that lands in another term's entry
//! is ignored where it applies. Wall-clock time is never read.
//!
//! Renewals: each keep-alive request joins its group's queue; the first to join schedules a
//! flush [`RENEW_BATCH_WAIT`] later, which proposes one entry renewing every distinct lease
//! queued (at most `RENEW_IDS_MAX`; more wait for the next flush) and answers them all.

use crate::node::{Node, lock};
use calm_kernel::lease::{LeaseCommand, LeaseId, RENEW_IDS_MAX, TICK_CLAIM_MS_MAX};
use calm_raft::consensus::{GroupId, Response};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How often a leader ticks its groups' lease clocks: half the most a tick may claim, so
/// claims are rarely capped.
pub const TICK_INTERVAL: Duration = Duration::from_millis(TICK_CLAIM_MS_MAX / 2);
/// How long the first renewal of a batch waits for others.
pub const RENEW_BATCH_WAIT: Duration = Duration::from_millis(10);
/// Renewals waiting on one node, over all groups; beyond it a keep-alive is refused with
/// RESOURCE_EXHAUSTED (the client retries).
pub const RENEWALS_WAITING_MAX: usize = 200_000;

/// Leases this node's replica holds, over every group (updated every tick interval).
pub const METRIC_LEASES: &str = "calm_leases";

type Answer = oneshot::Sender<Result<u64, Status>>;

/// Keep-alive renewals waiting for their group's next flush.
#[derive(Default)]
pub struct Renewals {
    waiting: Mutex<BTreeMap<GroupId, Vec<(LeaseId, Answer)>>>,
}

impl Renewals {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<GroupId, Vec<(LeaseId, Answer)>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Renew lease `id` to its full TTL; its TTL, or 0 when it no longer exists.
pub async fn renew(node: &Arc<Node>, id: LeaseId) -> Result<u64, Status> {
    let group = node.lease_group_of(id)?;
    let (answer, answered) = oneshot::channel();
    let first = {
        let mut waiting = node.renewals.lock();
        let total: usize = waiting.values().map(Vec::len).sum();
        if total >= RENEWALS_WAITING_MAX {
            return Err(Status::resource_exhausted(format!(
                "{RENEWALS_WAITING_MAX} lease renewals wait on this node already; send keep-alives less often (a third of the TTL is enough) or to other nodes"
            )));
        }
        let queue = waiting.entry(group).or_default();
        queue.push((id, answer));
        queue.len() == 1
    };
    if first {
        // Its own task: the stream that scheduled it may end before it runs.
        tokio::spawn(flush(node.clone(), group));
    }
    answered.await.unwrap_or_else(|_| {
        Err(Status::unavailable(
            "the node stopped before renewing the lease; send the keep-alive again",
        ))
    })
}

/// Propose one renewal entry for what waits in `group`, and answer it.
async fn flush(node: Arc<Node>, group: GroupId) {
    tokio::time::sleep(RENEW_BATCH_WAIT).await;
    loop {
        let batch: Vec<(LeaseId, Answer)> = {
            let mut waiting = node.renewals.lock();
            let Some(queue) = waiting.get_mut(&group) else {
                return;
            };
            if queue.is_empty() {
                waiting.remove(&group);
                return;
            }
            let mut ids = 0;
            let mut taken = 0;
            let mut seen = std::collections::HashSet::new();
            for (id, _) in queue.iter() {
                if seen.insert(*id) {
                    if ids == RENEW_IDS_MAX {
                        break;
                    }
                    ids += 1;
                }
                taken += 1;
            }
            queue.drain(..taken).collect()
        };
        let mut ids: Vec<LeaseId> = batch.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        let count = ids.len();
        let result = node
            .propose_lease(group, LeaseCommand::Renew { ids: ids.clone() })
            .await;
        metrics::counter!("calm_lease_renewals_total").increment(count as u64);
        let ttls: Result<HashMap<LeaseId, u64>, Status> = match result {
            Ok(p) => match p.response {
                Response::LeaseRenewed { ttl_ms } if ttl_ms.len() == count => {
                    Ok(ids.into_iter().zip(ttl_ms).collect())
                }
                other => Err(Status::internal(format!(
                    "a lease renewal was answered {other:?} (a bug); send the keep-alive again"
                ))),
            },
            Err(e) => Err(e),
        };
        for (id, answer) in batch {
            let _ = answer.send(match &ttls {
                Ok(ttls) => Ok(ttls.get(&id).copied().unwrap_or(0)),
                Err(e) => Err(e.clone()),
            });
        }
    }
}

/// Tick the lease clocks of the groups this node leads until `shutdown`.
pub async fn tick_loop(node: Arc<Node>, shutdown: CancellationToken) {
    let extend_ms = node.config.raft.election_timeout_max_ms;
    // Per group: the term this node leads it in, and when it last proposed a tick in it
    // (or first saw itself leading).
    let mut last: HashMap<GroupId, (u64, Instant)> = HashMap::new();
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let mut ticks = Vec::new();
        let data_groups = node.consensus.group_map().data_groups();
        let held: usize = {
            let local = lock(&node.local);
            let leases = local.replica().leases();
            (1..=data_groups).map(|g| leases.count(g)).sum()
        };
        metrics::gauge!(METRIC_LEASES).set(held as f64);
        for group in 1..=data_groups {
            let Some(term) = node.consensus.led_term(group) else {
                last.remove(&group);
                continue;
            };
            let now = Instant::now();
            let since = match last.get(&group) {
                Some(&(t, at)) if t == term => at,
                _ => {
                    last.insert(group, (term, now));
                    continue;
                }
            };
            if lock(&node.local).replica().leases().count(group) == 0 {
                continue;
            }
            let elapsed_ms = (now - since).as_millis() as u64;
            last.insert(group, (term, now));
            // A test-only fault (`--fault lease-early-expiry`) claims more than passed.
            let claims = crate::faults::lease_tick_claims(elapsed_ms, TICK_CLAIM_MS_MAX)
                .unwrap_or_else(|| vec![elapsed_ms.min(TICK_CLAIM_MS_MAX)]);
            let node = node.clone();
            ticks.push(async move {
                for elapsed_ms in claims {
                    let cmd = LeaseCommand::Tick {
                        term,
                        elapsed_ms,
                        extend_ms,
                    };
                    if let Err(e) = node.propose_lease(group, cmd).await {
                        tracing::debug!(group, error = %e, "a lease tick did not commit");
                    }
                }
            });
        }
        futures::future::join_all(ticks).await;
    }
}
