//! Escrow refills: a node asks a bounded counter's pool for quota before it runs out.
//!
//! A node spends only rights it holds (the kernel enforces that), so the bound holds even
//! under partition; a spend beyond its quota goes through Raft and is paid from the key's pool
//! directly. Rights reach a node's quota by its own increments and by grants from the pool,
//! which are Raft commands (`Replica::prepare_grant`). This module issues those grants: after
//! a bounded op on a key, the key is queued; a background task looks at the node's quota and,
//! when it fell below half of the node's fair share, asks the pool for the difference.
//!
//! Fair share: a `1 / (2 × members)` part of all rights of that direction (value − min to
//! decrement, max − value to increment). Half of the rights thus stay in the pool or with
//! other nodes, so a node cut off from the others keeps spending locally until its share runs
//! out, and the rest of the cluster still has rights to spend through Raft.
//!
//! Refills are best effort: a lost or refused grant only means later spends take the Raft
//! path; nothing is ever overdrawn.
//!
//! When the pool cannot cover a spend either (RESOURCE_EXHAUSTED), the API gathers the
//! missing rights into this node's own quota and runs the spend once more, locally: what the
//! pool still holds by a grant, the rest from the peers (`Gossip::ask_escrow`), each giving
//! what it can spare as transfer facts it issues itself, durable before it answers. A spend
//! is paid from one place, so a Raft spend of 2 with 1 in the pool and 1 in this node's quota
//! would be refused for ever although the cluster holds both; gathered, it succeeds. Rights
//! held by other nodes are thus never stranded while those nodes are reachable.

use crate::node::{Node, lock};
use calm_kernel::KeyState;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Keys waiting for a refill check; beyond it, requests are dropped (the next op on the key
/// queues it again).
pub const REFILL_QUEUE_KEYS_MAX: usize = 4096;

/// The quota change `node` should ask the pool for on `state`, if any: `(down, up)`.
pub fn refill_wanted(
    state: &KeyState,
    node: calm_kernel::NodeId,
    members: u64,
) -> Option<(i64, i64)> {
    let KeyState::Bounded(b) = state else {
        return None;
    };
    let members = members.max(1) as i64;
    let bounds = b.bounds();
    let (mine_down, mine_up) = b.rights_of(node);
    let (pool_down, pool_up) = b.pool();
    let want = |total: i64, mine: i64, pool: i64| -> i64 {
        let share = (total / (2 * members)).max(1);
        if pool <= 0 || mine >= share / 2 + share % 2 {
            0
        } else {
            (share - mine).min(pool)
        }
    };
    let down = want(b.value().saturating_sub(bounds.min), mine_down, pool_down);
    let up = want(bounds.max.saturating_sub(b.value()), mine_up, pool_up);
    (down > 0 || up > 0).then_some((down, up))
}

/// The sending side, held by the node.
#[derive(Clone)]
pub struct Refills {
    tx: mpsc::Sender<Vec<u8>>,
}

impl Refills {
    /// Queue `key` for a refill check (never blocks; drops when the queue is full).
    pub fn request(&self, key: &[u8]) {
        if self.tx.try_send(key.to_vec()).is_err() {
            metrics::counter!("calm_escrow_refill_dropped_total").increment(1);
        }
    }
}

pub fn channel() -> (Refills, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel(REFILL_QUEUE_KEYS_MAX);
    (Refills { tx }, rx)
}

/// Serve refill checks until `shutdown`: one grant in flight per key.
pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Vec<u8>>, shutdown: CancellationToken) {
    let in_flight = Arc::new(std::sync::Mutex::new(HashSet::<Vec<u8>>::new()));
    loop {
        let key = tokio::select! {
            key = rx.recv() => match key { Some(k) => k, None => return },
            _ = shutdown.cancelled() => return,
        };
        if !in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            continue;
        }
        let (node, in_flight) = (node.clone(), in_flight.clone());
        tokio::spawn(async move {
            refill(&node, &key).await;
            in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        });
    }
}

async fn refill(node: &Node, key: &[u8]) {
    let members = node.config.members.len() as u64;
    let wanted = lock(&node.local)
        .replica()
        .key_state(key)
        .and_then(|s| refill_wanted(s, node.id(), members));
    if let Some((down, up)) = wanted {
        grant(node, key, down, up).await;
    }
}

/// Ask the pool of the bounded counter `key` for `down` decrement and `up` increment rights
/// for this node, through the key's Raft group; true when they were granted (the pool is
/// checked when the grant applies, so a short pool refuses it and nothing moves). Either
/// way this node's replica has applied the grant's entry, and every one before it (e.g. a
/// racing refill), when it returns in time.
pub async fn grant(node: &Node, key: &[u8], down: i64, up: i64) -> bool {
    let (cmd, barrier) = {
        let mut local = lock(&node.local);
        let cmd = match local.replica().prepare_grant(key, down, up, node.hlc.now()) {
            Ok(cmd) => cmd,
            Err(_) => return false,
        };
        let barrier = local
            .own_facts_barrier()
            .unwrap_or_else(|e| crate::node::fatal("appending a WAL barrier", &e));
        (cmd, barrier)
    };
    node.own_facts_durable(barrier).await;
    match node.consensus.propose(cmd).await {
        Ok(p) => {
            let deadline = tokio::time::Instant::now()
                + std::time::Duration::from_millis(node.config.raft.request_timeout_ms);
            node.await_applied(p.group, p.index, deadline).await;
            let granted = matches!(p.response, calm_raft::consensus::Response::Done { .. });
            metrics::counter!("calm_escrow_grants_total", "outcome" => if granted { "granted" } else { "refused" })
                .increment(1);
            granted
        }
        Err(e) => {
            metrics::counter!("calm_escrow_grants_total", "outcome" => "unavailable").increment(1);
            tracing::debug!(error = %e, "escrow grant not granted now");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calm_kernel::rules::{Rule, RuleSet};
    use calm_kernel::{Bounds, HlcTimestamp, Mode, Op, Replica, ValueType};

    fn replica(node: u64) -> Replica {
        let mut rules = RuleSet::new(Mode::Hybrid);
        rules.rules.push(
            Rule::new("stock", Mode::Hybrid)
                .with_type(ValueType::BoundedCounter)
                .bounded(Bounds::new(0, 1000).unwrap()),
        );
        Replica::new(node, rules.compile().unwrap())
    }

    #[test]
    fn a_node_below_half_its_share_asks_for_the_rest_and_then_stops() {
        let mut r = replica(1);
        let create = r
            .prepare_command(b"stock", &Op::BoundedSet { value: 600 }, HlcTimestamp(1))
            .unwrap();
        r.apply_command(&create).unwrap();
        // 600 to decrement, 400 to increment, 3 members: shares 100 and 66.
        let state = r.key_state(b"stock").unwrap().clone();
        assert_eq!(refill_wanted(&state, 1, 3), Some((100, 66)));
        let grant = r.prepare_grant(b"stock", 100, 66, HlcTimestamp(2)).unwrap();
        r.apply_command(&grant).unwrap();
        let state = r.key_state(b"stock").unwrap().clone();
        assert_eq!(
            refill_wanted(&state, 1, 3),
            None,
            "a full share needs nothing"
        );
        // Spend most of the decrement share locally: it asks again for the difference.
        let mut out = Vec::new();
        r.admit(
            b"stock",
            &Op::BoundedAdd { delta: -60 },
            HlcTimestamp(3),
            &mut out,
        )
        .unwrap();
        let state = r.key_state(b"stock").unwrap().clone();
        let (down, up) = refill_wanted(&state, 1, 3).unwrap();
        assert!(down > 0 && up == 0, "({down}, {up})");
        // Never more than the pool holds.
        let (pool_down, _) = match &state {
            KeyState::Bounded(b) => b.pool(),
            _ => unreachable!(),
        };
        assert!(down <= pool_down);
    }

    #[test]
    fn other_types_and_empty_pools_want_nothing() {
        let mut r = replica(1);
        let create = r
            .prepare_command(b"stock", &Op::BoundedSet { value: 0 }, HlcTimestamp(1))
            .unwrap();
        r.apply_command(&create).unwrap();
        let state = r.key_state(b"stock").unwrap().clone();
        // Nothing to decrement; increments are wanted.
        assert_eq!(refill_wanted(&state, 1, 3).map(|w| w.0), Some(0));
        let counter = r
            .prepare_command(b"hits", &Op::CounterSet { value: 5 }, HlcTimestamp(2))
            .unwrap();
        r.apply_command(&counter).unwrap();
        assert_eq!(refill_wanted(r.key_state(b"hits").unwrap(), 1, 3), None);
    }
}
