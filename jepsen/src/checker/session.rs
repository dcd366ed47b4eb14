//! The session checker: read-your-writes across nodes with calm's causal session tokens.
//!
//! This module owns the session property. Ops per key: `write` (a register write of a
//! unique value) or `add` (a counter delta, never negative) done at one node, and `read`
//! (consistency CAUSAL, usually at another node) whose **invocation value is the history
//! index of the write or add invocation whose response token it passed**. An `ok` read
//! citing an acknowledged write `w` must reflect `w`:
//!
//! - register key: it returns `w`'s value, or the value of some write to the key that could
//!   be ordered after `w` (not definitely failed, and not completed before `w` was invoked).
//!   Anything older, or "absent", is a stale session read;
//! - counter key: it returns at least `w`'s delta plus every acknowledged add to the key made
//!   at `w`'s node that completed before `w` was invoked (a token names a position in the
//!   origin node's sequence of facts, which covers those adds too).
//!
//! A read citing an op that is not an acknowledged `write`/`add` of the same key is a harness
//! bug ([`CheckError`]). Reads without a citation (null value) are not checked.

use std::collections::HashMap;

use super::{Anomaly, AnomalyKind, CheckError, Checker, Stats, Verdict, bad, int_value};
use crate::history::{F, History, Outcome, PairedOp, describe};

const NAME: &str = "session";

#[derive(Debug, Clone, Default)]
pub struct SessionChecker;

impl Checker for SessionChecker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, history: &History) -> Result<Verdict, CheckError> {
        let groups = super::group_by_key(history, NAME, &[F::Write, F::Add, F::Read])?;
        let mut findings = Vec::new();
        let mut stats = Stats::new();
        let (mut reads, mut checked) = (0i64, 0i64);
        for (key, ops) in &groups {
            let by_index: HashMap<u64, &PairedOp<'_>> =
                ops.iter().map(|o| (o.index(), o)).collect();
            let writes: Vec<&PairedOp<'_>> = ops.iter().filter(|o| *o.f() == F::Write).collect();
            let adds: Vec<&PairedOp<'_>> = ops.iter().filter(|o| *o.f() == F::Add).collect();
            if !writes.is_empty() && !adds.is_empty() {
                return Err(CheckError::Config {
                    checker: NAME,
                    reason: format!("key {key:?} has both register writes and counter adds"),
                });
            }
            for a in &adds {
                if int_value(a, a.arg(), "an integer delta")? < 0 {
                    return Err(bad(a, "a non-negative delta", a.arg()));
                }
            }
            for read in ops.iter().filter(|o| *o.f() == F::Read) {
                reads += 1;
                if read.outcome() != Outcome::Ok || read.arg().is_null() {
                    continue;
                }
                let cited = read
                    .arg()
                    .as_u64()
                    .ok_or_else(|| bad(read, "the index of the cited write", read.arg()))?;
                let w = by_index
                    .get(&cited)
                    .filter(|w| matches!(w.f(), F::Write | F::Add) && w.outcome() == Outcome::Ok)
                    .ok_or_else(|| {
                        bad(
                            read,
                            "the index of an acknowledged write or add of the same key",
                            read.arg(),
                        )
                    })?;
                checked += 1;
                let w_call = w.call_ns();
                let stale = if *w.f() == F::Write {
                    let got = read.result();
                    let explains = |o: &&PairedOp<'_>| {
                        o.arg() == got
                            && (o.index() == w.index()
                                || (o.outcome() != Outcome::Fail
                                    && o.return_ns().is_none_or(|r| r >= w_call)))
                    };
                    (!writes.iter().any(explains)).then(|| {
                        format!(
                            "read {} with the token of {} returned {got}, which is older than that write (or no write's value)",
                            describe(read),
                            describe(w)
                        )
                    })
                } else {
                    let got = int_value(read, read.result(), "an integer counter value")?;
                    let w_node = w.node();
                    let mut floor = int_value(w, w.arg(), "an integer delta")?;
                    for a in &adds {
                        if a.index() != w.index()
                            && a.outcome() == Outcome::Ok
                            && a.node() == w_node
                            && a.return_ns().is_some_and(|r| r < w_call)
                        {
                            floor += int_value(a, a.arg(), "an integer delta")?;
                        }
                    }
                    (got < floor).then(|| {
                        format!(
                            "read {} with the token of {} returned {got}, below the {floor} that add and the adds acknowledged before it at {} make",
                            describe(read),
                            describe(w),
                            w_node.unwrap_or("the same node")
                        )
                    })
                };
                if let Some(explanation) = stale {
                    findings.push(Anomaly {
                        kind: AnomalyKind::StaleSessionRead,
                        key: key.map(str::to_owned),
                        ops: vec![w.index(), read.index()],
                        explanation,
                    });
                }
            }
        }
        stats.insert("keys", groups.len() as i64);
        stats.insert("reads", reads);
        stats.insert("reads_checked", checked);
        if checked == 0 {
            findings.push(Anomaly {
                kind: AnomalyKind::UndecidedNoReads,
                key: None,
                ops: Vec::new(),
                explanation:
                    "no acknowledged read cited an acknowledged write: nothing was checked".into(),
            });
        }
        Ok(Verdict::from_findings(NAME, findings, stats))
    }
}
