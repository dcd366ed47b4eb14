//! The lock checker: a lease-based lock hands out increasing fencing tokens, never to two
//! holders at once, and writes fenced by those tokens only succeed for the current holder.
//!
//! This module owns the lock property. The history (`crate::lock` records it) holds:
//!
//! - `acquire`: a lease grant, then a compare-and-set of the lock key expecting it absent,
//!   attached to the lease. `ok` value `{"token": n, "lease": id, "ttl_ms": n}`: the token is
//!   the register version the compare-and-set wrote, the TTL the one granted. `fail`: nothing
//!   held (the key existed, or the grant was refused); `info`: unknown, not held.
//! - `renew`: one keep-alive of a held lease, invocation value `{"lease": id, "token": n}`
//!   (the invocation is recorded before the request is sent); `ok` value `{"ttl_ms": n}`, 0
//!   when the lease no longer existed.
//! - `release`: the lease revoked, invocation value `{"lease": id, "token": n}`.
//! - `fenced_write`: a transaction comparing `version(lock) == token` that, on success,
//!   puts the data key; invocation value `{"token": n, "value": s}`, `ok` value
//!   `{"succeeded": bool}` (false: the comparison failed and nothing was written).
//!
//! What the server promises, and what each check derives from it:
//!
//! - A lease granted or renewed by a request sent at time `t` lives at least until
//!   `t + TTL` (docs/leases.md), unless revoked; the lock key attached to it exists until the
//!   lease ends, and the only other writes to the lock key are compare-and-sets expecting it
//!   absent. An `ok` acquisition A therefore holds the lock through its **window**, which ends
//!   at `min(release, last)`: `release` is the invocation time of A's release (left out when
//!   the release definitely failed), `last` is the latest of A's invocation and the
//!   invocations of its renewals answered with a TTL above 0, plus the TTL. Invocation times
//!   are taken before the request leaves, so the window is never longer than the promise.
//! - A register's version grows with every write and every delete of it, so each
//!   acquisition's token exceeds every earlier one's.
//!
//! Findings:
//!
//! 1. **Tokens** (`LockTokenReused`, `LockTokenOrder`): two `ok` acquisitions with the same
//!    token, or one that completed before another was invoked with a token not smaller
//!    than the later one's. Proves: the lock key's versions are unique and increase in
//!    real-time order of the compare-and-sets. Cannot judge acquisitions that overlap in
//!    time: their compare-and-sets may take effect in either order, and a slow acquisition
//!    may legally complete after its own lease ended (its grant and write each take up to a
//!    client timeout), so the order of completions is no order the server promises.
//! 2. **Mutual exclusion** (`LockOverlap`): an `ok` acquisition B with a larger token than
//!    an `ok` acquisition A that completed before A's window ended. B's compare-and-set
//!    found the key absent after A's write, so A's key was deleted first, and that happens
//!    only when A's lease ends: at A's release or at its expiry, never before the window
//!    ends. A finding means a lease ended before its TTL (counted from the client's send
//!    time) or the lock was granted to two clients. Cannot see: overlaps involving
//!    acquisitions whose outcome is unknown (their tokens and windows are not known), an
//!    expiry early by less than the client-side slack (the time between an invocation's
//!    record and the request reaching the server, and between the server's answer and its
//!    record), and a lease that lived too long (that is liveness, not checked here).
//! 3. **Fenced writes** (`LockStaleWrite`, `LockWriteOrder`): a write that succeeded with
//!    token t although an `ok` acquisition with a larger token had completed before the
//!    write was invoked (the lock key's version had moved past t for good, so the
//!    comparison cannot have held); or two successful writes, the first completed before
//!    the second was invoked, whose tokens decrease. Proves: the data key is only written
//!    under the lock's current version, in token order, whatever the leases did; this is
//!    what fencing buys even when check 2 fails. Cannot judge writes that overlap the
//!    acquisition or the write they would conflict with (either order is possible), and
//!    cannot tell a write the holder should not have sent (sent after its own window) from
//!    one it should: the server fences on the version, not on time.
//!
//! No `ok` acquisition at all is unknown: nothing was checked.

use std::collections::{BTreeMap, HashMap};

use super::{Anomaly, AnomalyKind, CheckError, Checker, Stats, Verdict, bad};
use crate::history::{F, History, Outcome, PairedOp, Value, describe};

const NAME: &str = "lock";

#[derive(Debug, Clone, Default)]
pub struct LockChecker;

/// An `ok` acquisition and the window it held the lock for.
struct Acquisition<'a> {
    op: PairedOp<'a>,
    token: u64,
    lease: u64,
    ttl_ns: u64,
    invoke_ns: u64,
    complete_ns: u64,
    /// Where the window ends (module docs) and why.
    end_ns: u64,
    end_reason: String,
}

/// A fenced write whose comparison held.
struct Write<'a> {
    op: PairedOp<'a>,
    token: u64,
    invoke_ns: u64,
    complete_ns: u64,
}

fn field(op: &PairedOp<'_>, v: &Value, name: &str, shape: &'static str) -> Result<u64, CheckError> {
    v.get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(op, shape, v))
}

fn secs(ns: u64) -> String {
    format!("{:.3} s", ns as f64 / 1e9)
}

fn bump(stats: &mut Stats, name: &'static str) {
    *stats.entry(name).or_insert(0) += 1;
}

impl Checker for LockChecker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, history: &History) -> Result<Verdict, CheckError> {
        const ACQUIRED: &str = "{\"token\": n, \"lease\": id, \"ttl_ms\": n > 0}";
        const HELD: &str = "{\"lease\": id, \"token\": n}";
        const RENEWED: &str = "{\"ttl_ms\": n}";
        const FENCED: &str = "{\"token\": n, \"value\": s}";
        const WRITTEN: &str = "{\"succeeded\": bool}";
        let mut stats = Stats::new();
        let mut acquired: Vec<(PairedOp<'_>, u64, u64, u64)> = Vec::new();
        // Per lease: the latest acknowledged renewal's invocation plus its TTL.
        let mut renewed: HashMap<u64, (u64, u64)> = HashMap::new();
        // Per lease: the earliest release that may have taken effect.
        let mut released: HashMap<u64, (u64, u64)> = HashMap::new();
        let mut writes: Vec<Write<'_>> = Vec::new();
        for op in history.pairs() {
            match op.f() {
                F::Acquire => match op.outcome() {
                    Outcome::Ok => {
                        let r = op.result();
                        let token = field(&op, r, "token", ACQUIRED)?;
                        let lease = field(&op, r, "lease", ACQUIRED)?;
                        let ttl_ms = field(&op, r, "ttl_ms", ACQUIRED)?;
                        if ttl_ms == 0 {
                            return Err(bad(&op, ACQUIRED, r));
                        }
                        acquired.push((op, token, lease, ttl_ms));
                        bump(&mut stats, "acquire.ok");
                    }
                    Outcome::Fail => bump(&mut stats, "acquire.fail"),
                    Outcome::Indeterminate => bump(&mut stats, "acquire.indeterminate"),
                },
                F::Renew => {
                    let lease = field(&op, op.arg(), "lease", HELD)?;
                    match op.outcome() {
                        Outcome::Ok => {
                            let ttl_ms = field(&op, op.result(), "ttl_ms", RENEWED)?;
                            if ttl_ms == 0 {
                                bump(&mut stats, "renew.lost");
                                continue;
                            }
                            bump(&mut stats, "renew.ok");
                            let until = op.call_ns() + ttl_ms * 1_000_000;
                            let e = renewed.entry(lease).or_insert((until, op.index()));
                            if until > e.0 {
                                *e = (until, op.index());
                            }
                        }
                        Outcome::Fail => bump(&mut stats, "renew.fail"),
                        Outcome::Indeterminate => bump(&mut stats, "renew.indeterminate"),
                    }
                }
                F::Release => {
                    let lease = field(&op, op.arg(), "lease", HELD)?;
                    match op.outcome() {
                        // A release that definitely failed revoked nothing: the lease runs on.
                        Outcome::Fail => bump(&mut stats, "release.fail"),
                        outcome => {
                            bump(
                                &mut stats,
                                if outcome == Outcome::Ok {
                                    "release.ok"
                                } else {
                                    "release.indeterminate"
                                },
                            );
                            let at = op.call_ns();
                            let e = released.entry(lease).or_insert((at, op.index()));
                            if at < e.0 {
                                *e = (at, op.index());
                            }
                        }
                    }
                }
                F::FencedWrite => {
                    let token = field(&op, op.arg(), "token", FENCED)?;
                    match op.outcome() {
                        Outcome::Ok => {
                            match op.result().get("succeeded").and_then(Value::as_bool) {
                                Some(true) => {
                                    bump(&mut stats, "write.ok_succeeded");
                                    writes.push(Write {
                                        op,
                                        token,
                                        invoke_ns: op.call_ns(),
                                        complete_ns: op.return_ns().unwrap_or(u64::MAX),
                                    });
                                }
                                Some(false) => bump(&mut stats, "write.ok_fenced"),
                                None => return Err(bad(&op, WRITTEN, op.result())),
                            }
                        }
                        Outcome::Fail => bump(&mut stats, "write.fail"),
                        Outcome::Indeterminate => bump(&mut stats, "write.indeterminate"),
                    }
                }
                f => {
                    return Err(CheckError::UnexpectedOp {
                        checker: NAME,
                        index: op.index(),
                        f: f.clone(),
                    });
                }
            }
        }

        let mut renewed_holds = 0;
        let acquisitions: Vec<Acquisition<'_>> = acquired
            .into_iter()
            .map(|(op, token, lease, ttl_ms)| {
                let ttl_ns = ttl_ms * 1_000_000;
                let invoke_ns = op.call_ns();
                let mut end_ns = invoke_ns + ttl_ns;
                let mut end_reason = format!(
                    "its invocation at {} plus its {ttl_ms} ms TTL, no renewal acknowledged",
                    secs(invoke_ns)
                );
                if let Some(&(until, renewal)) = renewed.get(&lease) {
                    renewed_holds += 1;
                    if until > end_ns {
                        end_ns = until;
                        end_reason = format!(
                            "its renewal #{renewal}, sent at {}, plus the TTL",
                            secs(until - ttl_ns)
                        );
                    }
                }
                if let Some(&(at, release)) = released.get(&lease)
                    && at < end_ns
                {
                    end_ns = at;
                    end_reason = format!("its release #{release} invoked at {}", secs(at));
                }
                Acquisition {
                    complete_ns: op.return_ns().unwrap_or(u64::MAX),
                    op,
                    token,
                    lease,
                    ttl_ns,
                    invoke_ns,
                    end_ns,
                    end_reason,
                }
            })
            .collect();
        stats.insert("holds.renewed", renewed_holds);

        let mut findings = Vec::new();
        if acquisitions.is_empty() {
            findings.push(Anomaly {
                kind: AnomalyKind::UndecidedNoReads,
                key: None,
                ops: Vec::new(),
                explanation: "no acquisition of the lock succeeded: nothing to check".into(),
            });
        }
        check_tokens(&acquisitions, &mut findings);
        check_exclusion(&acquisitions, &mut stats, &mut findings);
        check_writes(&acquisitions, &writes, &mut findings);
        Ok(Verdict::from_findings(NAME, findings, stats))
    }
}

fn describe_acquisition(a: &Acquisition<'_>) -> String {
    format!(
        "{} (token {}, lease {:x})",
        describe(&a.op),
        a.token,
        a.lease
    )
}

/// Check 1: tokens unique, and increasing along real-time precedence.
fn check_tokens(acquisitions: &[Acquisition<'_>], findings: &mut Vec<Anomaly>) {
    let mut first: HashMap<u64, &Acquisition<'_>> = HashMap::new();
    for a in acquisitions {
        if let Some(other) = first.get(&a.token) {
            findings.push(Anomaly {
                kind: AnomalyKind::LockTokenReused,
                key: a.op.key().map(String::from),
                ops: vec![other.op.index(), a.op.index()],
                explanation: format!(
                    "{} and {} were both granted token {}: one version of the lock key written twice",
                    describe_acquisition(other),
                    describe_acquisition(a),
                    a.token
                ),
            });
        } else {
            first.insert(a.token, a);
        }
    }
    for_each_preceded(
        acquisitions,
        |a| a.complete_ns,
        acquisitions,
        |b| b.invoke_ns,
        |a| a.token,
        |b, a| {
            if b.token < a.token {
                findings.push(Anomaly {
                    kind: AnomalyKind::LockTokenOrder,
                    key: b.op.key().map(String::from),
                    ops: vec![a.op.index(), b.op.index()],
                    explanation: format!(
                        "{} completed before {} was invoked, yet its token is larger: the lock key's version went backwards",
                        describe_acquisition(a),
                        describe_acquisition(b)
                    ),
                });
            }
        },
    );
}

/// Check 2: an acquisition with a larger token never completes inside an earlier window.
fn check_exclusion(
    acquisitions: &[Acquisition<'_>],
    stats: &mut Stats,
    findings: &mut Vec<Anomaly>,
) {
    let mut by_token: BTreeMap<u64, Vec<&Acquisition<'_>>> = BTreeMap::new();
    for a in acquisitions {
        by_token.entry(a.token).or_default().push(a);
    }
    // The acquisition with the latest window end among all smaller tokens.
    let mut latest: Option<&Acquisition<'_>> = None;
    let mut min_gap_ns: Option<i128> = None;
    for group in by_token.values() {
        if let Some(a) = latest {
            for b in group {
                if b.complete_ns < a.invoke_ns {
                    // B came first in real time: a token order finding (check 1), not an
                    // overlap.
                    continue;
                }
                let gap = i128::from(b.complete_ns) - i128::from(a.end_ns);
                min_gap_ns = Some(min_gap_ns.map_or(gap, |g| g.min(gap)));
                if b.complete_ns < a.end_ns {
                    findings.push(Anomaly {
                        kind: AnomalyKind::LockOverlap,
                        key: b.op.key().map(String::from),
                        ops: vec![a.op.index(), b.op.index()],
                        explanation: format!(
                            "{} completed at {}, {:.0} ms before the window of {} ended at {} ({}): two holders at once, so a lease ended before its TTL or the lock was granted twice",
                            describe_acquisition(b),
                            secs(b.complete_ns),
                            (a.end_ns - b.complete_ns) as f64 / 1e6,
                            describe_acquisition(a),
                            secs(a.end_ns),
                            a.end_reason
                        ),
                    });
                }
            }
        }
        for a in group {
            if latest.is_none_or(|l| a.end_ns > l.end_ns) {
                latest = Some(a);
            }
        }
    }
    if let Some(g) = min_gap_ns {
        // Milliseconds from a window's end to the next holder's acquisition; negative: overlap.
        stats.insert("handover.min_gap_ms", (g / 1_000_000) as i64);
    }
    let longest = acquisitions
        .iter()
        .map(|a| a.end_ns.saturating_sub(a.complete_ns))
        .max();
    if let Some(ns) = longest {
        stats.insert("holds.longest_ms", (ns / 1_000_000) as i64);
    }
    if let Some(a) = acquisitions.first() {
        stats.insert("ttl_ms", (a.ttl_ns / 1_000_000) as i64);
    }
}

/// Check 3: successful fenced writes carry the current token, in token order.
fn check_writes(
    acquisitions: &[Acquisition<'_>],
    writes: &[Write<'_>],
    findings: &mut Vec<Anomaly>,
) {
    for_each_preceded(
        acquisitions,
        |a| a.complete_ns,
        writes,
        |w| w.invoke_ns,
        |a| a.token,
        |w, a| {
            if w.token < a.token {
                findings.push(Anomaly {
                    kind: AnomalyKind::LockStaleWrite,
                    key: w.op.key().map(String::from),
                    ops: vec![a.op.index(), w.op.index()],
                    explanation: format!(
                        "{} succeeded with token {} although {} had completed before it was invoked: the fence let a former holder write",
                        describe(&w.op),
                        w.token,
                        describe_acquisition(a)
                    ),
                });
            }
        },
    );
    for_each_preceded(
        writes,
        |w| w.complete_ns,
        writes,
        |w| w.invoke_ns,
        |w| w.token,
        |later, earlier| {
            if later.token < earlier.token {
                findings.push(Anomaly {
                    kind: AnomalyKind::LockWriteOrder,
                    key: later.op.key().map(String::from),
                    ops: vec![earlier.op.index(), later.op.index()],
                    explanation: format!(
                        "{} (token {}) completed before {} (token {}) was invoked: successful fenced writes went back to an older token",
                        describe(&earlier.op),
                        earlier.token,
                        describe(&later.op),
                        later.token
                    ),
                });
            }
        },
    );
}

/// For each `b` of `bs`, the element of `as_` with the largest `key` among those that ended
/// (`end`) before `b` began (`start`), if any: `visit(b, a)`. O((n + m) log(n + m)).
fn for_each_preceded<'x, A, B>(
    as_: &'x [A],
    end: impl Fn(&A) -> u64,
    bs: &'x [B],
    start: impl Fn(&B) -> u64,
    key: impl Fn(&A) -> u64,
    mut visit: impl FnMut(&'x B, &'x A),
) {
    let mut ended: Vec<&A> = as_.iter().collect();
    ended.sort_by_key(|a| end(a));
    let mut begun: Vec<&B> = bs.iter().collect();
    begun.sort_by_key(|b| start(b));
    let mut next = 0;
    let mut best: Option<&A> = None;
    for b in begun {
        while next < ended.len() && end(ended[next]) < start(b) {
            let a = ended[next];
            if best.is_none_or(|x| key(a) > key(x)) {
                best = Some(a);
            }
            next += 1;
        }
        if let Some(a) = best {
            visit(b, a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Validity;
    use crate::history::{Op, OpType, Process};
    use serde_json::json;

    const TTL_MS: u64 = 100;

    /// A history builder with explicit times (ms), one process per op.
    struct H {
        ops: Vec<Op>,
        process: u64,
    }

    impl H {
        fn new() -> H {
            H {
                ops: Vec::new(),
                process: 0,
            }
        }

        /// An op invoked at `from` ms completed as `kind` with `result` at `to` ms.
        fn op(&mut self, f: F, arg: Value, from: u64, to: u64, kind: OpType, result: Value) {
            let p = Process::Client(self.process);
            self.process += 1;
            self.ops.push(
                Op::new(0, from * 1_000_000, p, OpType::Invoke, f.clone())
                    .with_key("{jlock}:lock")
                    .with_value(arg),
            );
            self.ops.push(
                Op::new(0, to * 1_000_000, p, kind, f)
                    .with_key("{jlock}:lock")
                    .with_value(result),
            );
        }

        fn acquire(&mut self, from: u64, to: u64, token: u64, lease: u64) {
            self.op(
                F::Acquire,
                json!({"holder": "w"}),
                from,
                to,
                OpType::Ok,
                json!({"token": token, "lease": lease, "ttl_ms": TTL_MS}),
            );
        }

        fn renew(&mut self, from: u64, to: u64, lease: u64, ttl_ms: u64) {
            self.op(
                F::Renew,
                json!({"lease": lease, "token": 0}),
                from,
                to,
                OpType::Ok,
                json!({ "ttl_ms": ttl_ms }),
            );
        }

        fn release(&mut self, from: u64, to: u64, lease: u64, kind: OpType) {
            self.op(
                F::Release,
                json!({"lease": lease, "token": 0}),
                from,
                to,
                kind,
                json!({"found": true}),
            );
        }

        fn write(&mut self, from: u64, to: u64, token: u64, succeeded: bool) {
            self.op(
                F::FencedWrite,
                json!({"token": token, "value": format!("{token}:0")}),
                from,
                to,
                OpType::Ok,
                json!({ "succeeded": succeeded }),
            );
        }

        /// The ops in time order (stable: an op's invocation stays before its completion).
        fn history(mut self) -> History {
            self.ops.sort_by_key(|o| o.time_ns);
            let mut history = History::new();
            for (i, op) in self.ops.into_iter().enumerate() {
                history
                    .push(Op {
                        index: i as u64,
                        ..op
                    })
                    .unwrap();
            }
            history
        }

        fn check(self) -> Verdict {
            LockChecker.check(&self.history()).unwrap()
        }
    }

    fn kinds(v: &Verdict) -> Vec<AnomalyKind> {
        v.anomalies.iter().map(|a| a.kind).collect()
    }

    /// Three holders in turn: one released, one kept alive past its first TTL and then
    /// released, one that let its lease run out before the next acquired; fenced writes,
    /// one of a former holder refused.
    fn good() -> H {
        let mut h = H::new();
        h.acquire(0, 5, 2, 1);
        h.write(10, 12, 2, true);
        h.release(40, 45, 1, OpType::Ok);
        h.acquire(46, 50, 4, 2);
        h.renew(80, 82, 2, TTL_MS);
        h.write(120, 125, 4, true);
        // Acquired at 46: the renewal sent at 80 holds it to 180.
        h.release(170, 171, 2, OpType::Ok);
        h.acquire(172, 175, 6, 3);
        h.write(180, 185, 6, true);
        // Nobody renews lease 3: its window ends at 272; the next holder comes after.
        h.acquire(260, 280, 8, 4);
        h.write(285, 290, 6, false);
        h.write(291, 295, 8, true);
        h
    }

    #[test]
    fn holders_in_turn_with_increasing_tokens_are_valid() {
        let v = good().check();
        assert!(v.is_valid(), "{v}");
        assert_eq!(v.stats["acquire.ok"], 4);
        assert_eq!(v.stats["holds.renewed"], 1);
        assert_eq!(v.stats["write.ok_succeeded"], 4);
        assert_eq!(v.stats["write.ok_fenced"], 1);
        assert_eq!(v.stats["handover.min_gap_ms"], 5);
    }

    #[test]
    fn an_acquisition_inside_the_previous_window_is_an_overlap() {
        let mut h = H::new();
        h.acquire(0, 5, 2, 1);
        h.renew(60, 61, 1, TTL_MS);
        // Lease 1 was renewed at 60: it must live to 160.
        h.acquire(120, 130, 4, 2);
        let v = h.check();
        assert_eq!(kinds(&v), vec![AnomalyKind::LockOverlap], "{v}");
        assert!(v.anomalies[0].explanation.contains("30 ms before"), "{v}");
        assert!(v.anomalies[0].explanation.contains("renewal"), "{v}");
        assert_eq!(v.stats["handover.min_gap_ms"], -30);
    }

    #[test]
    fn only_acknowledged_renewals_and_releases_that_may_have_applied_count() {
        let mut h = H::new();
        h.acquire(0, 5, 2, 1);
        // A renewal answered "no such lease" extends nothing; a failed release ends nothing.
        h.renew(60, 61, 1, 0);
        h.release(62, 63, 1, OpType::Fail);
        h.acquire(101, 110, 4, 2);
        let v = h.check();
        assert!(v.is_valid(), "{v}");
        let mut h = H::new();
        h.acquire(0, 5, 2, 1);
        h.release(30, 40, 1, OpType::Info);
        h.acquire(35, 50, 4, 2);
        let v = h.check();
        assert!(v.is_valid(), "{v}");
    }

    #[test]
    fn overlapping_acquisitions_may_complete_in_either_order_but_tokens_must_not_repeat() {
        let mut h = H::new();
        // A slow acquisition (its lease ran out at 100 while it waited) completes after one
        // that took the lock at 150: no order of completions is promised.
        h.acquire(0, 160, 2, 1);
        h.acquire(140, 150, 4, 2);
        h.release(151, 152, 2, OpType::Ok);
        let v = h.check();
        assert!(v.is_valid(), "{v}");
        let mut h = H::new();
        h.acquire(0, 5, 2, 1);
        h.release(6, 7, 1, OpType::Ok);
        h.acquire(8, 10, 2, 2);
        let v = h.check();
        assert_eq!(kinds(&v), vec![AnomalyKind::LockTokenReused], "{v}");
    }

    #[test]
    fn a_token_smaller_than_an_earlier_acquisitions_is_out_of_order() {
        let mut h = H::new();
        h.acquire(0, 5, 4, 1);
        h.release(6, 7, 1, OpType::Ok);
        h.acquire(8, 10, 2, 2);
        let v = h.check();
        assert_eq!(kinds(&v), vec![AnomalyKind::LockTokenOrder], "{v}");
    }

    #[test]
    fn a_successful_write_of_a_former_holder_breaks_the_fence() {
        let mut h = H::new();
        h.acquire(0, 5, 2, 1);
        h.release(6, 7, 1, OpType::Ok);
        h.acquire(8, 10, 4, 2);
        h.write(20, 25, 4, true);
        h.write(30, 35, 2, true);
        let v = h.check();
        assert_eq!(
            kinds(&v),
            vec![AnomalyKind::LockStaleWrite, AnomalyKind::LockWriteOrder],
            "{v}"
        );
        // Overlapping the acquisition it conflicts with, the same write may have come first.
        let mut h = H::new();
        h.acquire(0, 5, 2, 1);
        h.release(6, 7, 1, OpType::Ok);
        h.write(7, 12, 2, true);
        h.acquire(8, 10, 4, 2);
        let v = h.check();
        assert!(v.is_valid(), "{v}");
    }

    #[test]
    fn no_successful_acquisition_is_unknown() {
        let mut h = H::new();
        h.op(
            F::Acquire,
            json!({"holder": "w"}),
            0,
            5,
            OpType::Fail,
            Value::Null,
        );
        let v = h.check();
        assert_eq!(v.valid, Validity::Unknown, "{v}");
        assert_eq!(v.stats["acquire.fail"], 1);
    }

    #[test]
    fn an_acquisition_without_its_token_is_an_error() {
        let mut h = H::new();
        h.op(
            F::Acquire,
            json!({"holder": "w"}),
            0,
            5,
            OpType::Ok,
            json!({"lease": 1, "ttl_ms": 3}),
        );
        let e = LockChecker.check(&h.history()).unwrap_err();
        assert!(matches!(e, CheckError::BadValue { .. }), "{e}");
    }
}
