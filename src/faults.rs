//! Test-only fault injection (`calm serve --fault NAME[=FRACTION]`, a hidden flag): bugs the
//! Jepsen harness (jepsen/) must catch, so its checkers are shown to fail on a broken node.
//!
//! - `stale-reads`: linearizable reads skip the read index and serve this node's replica as
//!   it is (a serializable read mislabelled), as a deposed leader or lagging follower would.
//! - `drop-acked-writes[=F]` (F defaults to 0.1): a fraction F of writes is acknowledged as
//!   successful without being admitted, applied or persisted.
//! - `drop-watch-event[=N]` (N defaults to 20): the Nth event this node would send to a
//!   watcher is left out of its response, once per process; the response's token still
//!   covers it, so the watcher never sees it (a gap the watch checker must find).
//! - `txn-drop-op[=N]` (N defaults to 10): every Nth transaction this node is asked to run
//!   loses the last op of its success branch before it is checked and proposed, and is
//!   answered as usual; a bank transfer then debits one account and credits none (a wrong
//!   total the bank checker must find).
//! - `lease-early-expiry[=FACTOR]` (FACTOR defaults to 4): the lease clock of every group
//!   this node leads runs FACTOR times too fast. Each tick interval it proposes ticks
//!   claiming FACTOR times the time that passed, as several ticks of at most the per-tick
//!   cap each (the kernel clamps every tick to `TICK_CLAIM_MS_MAX`, so one bigger claim
//!   would not do), and leases end about FACTOR times too early: a lock holder loses the
//!   lock while it still counts itself the holder (the lock checker must find two holders
//!   at once). With the 3 s minimum TTL and its 1 s slack, a lease then lasts 1-1.5 s at
//!   FACTOR 4 (which renewals every third of the TTL still cover) and 0.5-1 s at 8.
//!
//! Never set in production: the faults are process-wide and installed once at startup.

use crate::api::pb;
use calm_kernel::Op;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
struct Faults {
    stale_reads: bool,
    /// Drop one write in every `drop_every` (0: none).
    drop_every: u64,
    /// Drop the watch event with this 1-based number (0: none).
    drop_watch_event: u64,
    /// Cut the last success op of one transaction in every `drop_txn_op_every` (0: none).
    drop_txn_op_every: u64,
    /// Lease ticks claim this many times the time that passed (0: the fault is off).
    lease_clock_factor: u64,
}

static FAULTS: OnceLock<Faults> = OnceLock::new();
/// Most `lease-early-expiry` may speed the lease clock up: each tick interval proposes up to
/// this many ticks per group.
const LEASE_CLOCK_FACTOR_MAX: u64 = 100;
static WRITES: AtomicU64 = AtomicU64::new(0);
static WATCH_EVENTS: AtomicU64 = AtomicU64::new(0);
static TXNS: AtomicU64 = AtomicU64::new(0);

/// Parse and install the faults named on the command line (call once, before serving).
pub fn install(specs: &[String]) -> Result<(), String> {
    let mut faults = Faults::default();
    for spec in specs {
        let (name, fraction) = match spec.split_once('=') {
            Some((n, f)) => (n, Some(f)),
            None => (spec.as_str(), None),
        };
        match (name, fraction) {
            ("stale-reads", None) => faults.stale_reads = true,
            ("drop-acked-writes", f) => {
                let f: f64 = f.unwrap_or("0.1").parse().map_err(|_| {
                    format!("--fault {spec}: the fraction must be a number in (0, 1]")
                })?;
                if !(f > 0.0 && f <= 1.0) {
                    return Err(format!("--fault {spec}: the fraction must be in (0, 1]"));
                }
                // A deterministic period, so a run drops the same writes of its sequence.
                faults.drop_every = (1.0 / f).round().max(1.0) as u64;
            }
            ("drop-watch-event", n) => {
                faults.drop_watch_event = match n.unwrap_or("20").parse() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        return Err(format!(
                            "--fault {spec}: N must be a positive integer (the Nth event is dropped)"
                        ));
                    }
                };
            }
            ("txn-drop-op", n) => {
                faults.drop_txn_op_every = match n.unwrap_or("10").parse() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        return Err(format!(
                            "--fault {spec}: N must be a positive integer (every Nth transaction loses an op)"
                        ));
                    }
                };
            }
            ("lease-early-expiry", f) => {
                faults.lease_clock_factor = match f.unwrap_or("4").parse() {
                    Ok(f) if (2..=LEASE_CLOCK_FACTOR_MAX).contains(&f) => f,
                    _ => {
                        return Err(format!(
                            "--fault {spec}: FACTOR must be an integer from 2 to {LEASE_CLOCK_FACTOR_MAX} (how many times too fast the lease clock runs)"
                        ));
                    }
                };
            }
            _ => {
                return Err(format!(
                    "--fault {spec}: known faults are stale-reads, drop-acked-writes[=FRACTION], drop-watch-event[=N], txn-drop-op[=N] and lease-early-expiry[=FACTOR]"
                ));
            }
        }
    }
    if faults.stale_reads
        || faults.drop_every > 0
        || faults.drop_watch_event > 0
        || faults.drop_txn_op_every > 0
        || faults.lease_clock_factor > 0
    {
        tracing::warn!(
            ?faults,
            "TEST FAULTS INJECTED: this node is deliberately broken"
        );
    }
    FAULTS
        .set(faults)
        .map_err(|_| "faults are installed once".to_string())
}

/// Whether a linearizable read should skip its read index.
pub fn skip_read_barrier() -> bool {
    FAULTS.get().is_some_and(|f| f.stale_reads)
}

/// A fake success for a write to drop, or `None` to process it normally.
pub fn drop_acked_write(op: &Op) -> Option<pb::WriteResponse> {
    let every = FAULTS.get().map_or(0, |f| f.drop_every);
    if every == 0 || WRITES.fetch_add(1, Ordering::Relaxed) % every != every - 1 {
        return None;
    }
    let path = match op {
        Op::CounterAdd { .. } | Op::MaxRaise { .. } | Op::SetAdd { .. } => pb::Path::Fast,
        Op::BoundedAdd { .. } => pb::Path::Escrow,
        _ => pb::Path::Consensus,
    };
    tracing::warn!(
        ?path,
        "fault drop-acked-writes: acknowledging a write that is dropped"
    );
    Some(pb::WriteResponse {
        path: path as i32,
        succeeded: true,
        version: 0,
        token: Vec::new(),
        deleted: matches!(op, Op::RegisterDelete),
    })
}

/// Whether to leave out the watch event about to be sent (counts every event sent).
pub fn drop_watch_event() -> bool {
    let nth = FAULTS.get().map_or(0, |f| f.drop_watch_event);
    if nth == 0 || WATCH_EVENTS.fetch_add(1, Ordering::Relaxed) + 1 != nth {
        return false;
    }
    tracing::warn!("fault drop-watch-event: leaving event {nth} out of a watch response");
    true
}

/// Cut the last op of the success branch of every Nth transaction (counts every call).
pub fn drop_txn_op(req: &mut pb::TxnRequest) {
    let every = FAULTS.get().map_or(0, |f| f.drop_txn_op_every);
    if every == 0 || TXNS.fetch_add(1, Ordering::Relaxed) % every != every - 1 {
        return;
    }
    if req.success.pop().is_some() {
        tracing::warn!("fault txn-drop-op: proposing a transaction without its last success op");
    }
}

/// With `lease-early-expiry`, the claims of the ticks to propose for `elapsed_ms` of measured
/// time (their sum is FACTOR times it, each at most `cap`, the kernel's per-tick clamp);
/// `None` when the fault is off (the caller claims `elapsed_ms.min(cap)` as one tick).
pub fn lease_tick_claims(elapsed_ms: u64, cap: u64) -> Option<Vec<u64>> {
    let factor = FAULTS.get().map_or(0, |f| f.lease_clock_factor);
    if factor == 0 {
        return None;
    }
    Some(split_claim(elapsed_ms.min(cap) * factor, cap))
}

/// `total` as claims of at most `cap` each (one zero claim for a zero total: the tick still
/// carries its term).
fn split_claim(total: u64, cap: u64) -> Vec<u64> {
    let cap = cap.max(1);
    let mut claims = vec![cap; (total / cap) as usize];
    if !total.is_multiple_of(cap) || claims.is_empty() {
        claims.push(total % cap);
    }
    claims
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sped_up_claim_is_split_into_ticks_the_kernel_accepts_whole() {
        assert_eq!(split_claim(2_000, 1_000), vec![1_000, 1_000]);
        assert_eq!(split_claim(2_200, 1_000), vec![1_000, 1_000, 200]);
        assert_eq!(split_claim(300, 1_000), vec![300]);
        assert_eq!(split_claim(0, 1_000), vec![0]);
    }
}
