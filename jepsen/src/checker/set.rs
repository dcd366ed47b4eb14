//! The set checker: nothing lost, nothing invented, nothing removed comes back.
//!
//! This module owns the set properties. Ops per key: `set_add` and `set_remove` (value: the
//! element, an integer or string) and `read_set` (`ok` value: the array of elements).
//! Elements compare as JSON values.
//!
//! Any `ok` read, at any time (calm's set adds are fast-path, so intermediate reads may lag,
//! but they can never invent):
//! - phantom: an element no `set_add` invoked before the read completed can explain;
//! - failed add visible: an element whose every add definitely failed.
//!
//! Final reads (`"final": true`, after heal and quiescence):
//! - lost: an element with an add acknowledged before the read began is missing, although no
//!   remove could be ordered after that add (every non-failed remove of it completed before
//!   the add was invoked);
//! - resurrected: an element is present although a remove acknowledged before the read began
//!   was invoked after every non-failed add of it had completed (an indeterminate add counts
//!   as completing at infinity, so it may legitimately bring the element back);
//! - divergence: final reads of one key disagree.
//!
//! Removes are Raft-ordered in calm while adds gossip, and a remove takes away exactly the
//! adds its node had observed (observed-remove, DESIGN.md section 2): an add acknowledged at
//! another node moments before, not yet gossiped, survives a remove that never saw it. The
//! rules above are stated in real time, so a workload must make real time imply
//! observation: the set workload removes only its own elements and sends each remove with
//! the session token of the element's add, which the removing node awaits before it admits
//! the remove. A resurrection then is a real bug (a remove that lost the adds it observed,
//! or an add applied after it twice), not the semantics.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{Anomaly, AnomalyKind, CheckError, Checker, Stats, Verdict, abbreviate};
use crate::history::{F, History, Outcome, PairedOp, Value, describe};

const NAME: &str = "set";

#[derive(Debug, Clone, Default)]
pub struct SetChecker;

/// An element by its canonical JSON text (`3`, `"a"`).
type Elem = String;

#[derive(Debug, Clone, Copy)]
struct Attempt {
    index: u64,
    call: u64,
    /// Completion of a determinate op; None = indeterminate (infinity).
    ret: Option<u64>,
    outcome: Outcome,
}

struct SetRead<'a> {
    pair: PairedOp<'a>,
    call: u64,
    ret: u64,
    elems: BTreeSet<Elem>,
}

fn elem(op: &PairedOp<'_>, v: &Value) -> Result<Elem, CheckError> {
    match v {
        Value::Number(_) | Value::String(_) => Ok(v.to_string()),
        _ => Err(CheckError::BadValue {
            index: op.index(),
            f: op.f().clone(),
            expected: "an integer or string element",
            got: v.clone(),
        }),
    }
}

impl Checker for SetChecker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, history: &History) -> Result<Verdict, CheckError> {
        let groups = super::group_by_key(history, NAME, &[F::SetAdd, F::SetRemove, F::ReadSet])?;
        let mut findings = Vec::new();
        let mut stats = Stats::new();
        stats.insert("keys", groups.len() as i64);
        for (key, ops) in &groups {
            check_key(*key, ops, &mut stats, &mut findings)?;
        }
        Ok(Verdict::from_findings(NAME, findings, stats))
    }
}

fn bump(stats: &mut Stats, name: &'static str, by: usize) {
    *stats.entry(name).or_default() += by as i64;
}

fn check_key(
    key: Option<&str>,
    ops: &[PairedOp<'_>],
    stats: &mut Stats,
    findings: &mut Vec<Anomaly>,
) -> Result<(), CheckError> {
    let mut adds: HashMap<Elem, Vec<Attempt>> = HashMap::new();
    let mut removes: HashMap<Elem, Vec<Attempt>> = HashMap::new();
    let mut reads = Vec::new();
    for op in ops {
        let attempt = Attempt {
            index: op.index(),
            call: op.call_ns(),
            ret: op.return_ns(),
            outcome: op.outcome(),
        };
        let stat = match (op.f(), op.outcome()) {
            (F::SetAdd, Outcome::Ok) => "adds.ok",
            (F::SetAdd, Outcome::Fail) => "adds.fail",
            (F::SetAdd, Outcome::Indeterminate) => "adds.indeterminate",
            (F::SetRemove, Outcome::Ok) => "removes.ok",
            (F::SetRemove, Outcome::Fail) => "removes.fail",
            (F::SetRemove, Outcome::Indeterminate) => "removes.indeterminate",
            _ => "reads",
        };
        match op.f() {
            F::SetAdd => {
                adds.entry(elem(op, op.arg())?).or_default().push(attempt);
                bump(stats, stat, 1);
            }
            F::SetRemove => {
                removes
                    .entry(elem(op, op.arg())?)
                    .or_default()
                    .push(attempt);
                bump(stats, stat, 1);
            }
            F::ReadSet => match (op.outcome(), op.return_ns()) {
                (Outcome::Ok, Some(ret)) => {
                    let Some(items) = op.result().as_array() else {
                        return Err(CheckError::BadValue {
                            index: op.index(),
                            f: F::ReadSet,
                            expected: "an array of elements",
                            got: op.result().clone(),
                        });
                    };
                    let elems = items
                        .iter()
                        .map(|v| elem(op, v))
                        .collect::<Result<BTreeSet<_>, _>>()?;
                    reads.push(SetRead {
                        pair: *op,
                        call: op.call_ns(),
                        ret,
                        elems,
                    });
                }
                _ => bump(stats, "reads.not_ok", 1),
            },
            f => {
                return Err(CheckError::UnexpectedOp {
                    checker: NAME,
                    index: op.index(),
                    f: f.clone(),
                });
            }
        }
    }
    bump(stats, "reads.ok", reads.len());
    bump(stats, "elements.attempted", adds.len());
    let k = key.map(str::to_owned);

    // Any read: phantoms and failed adds, grouped per element.
    let mut phantom: BTreeMap<&Elem, Vec<&SetRead<'_>>> = BTreeMap::new();
    let mut failed_visible: BTreeMap<&Elem, Vec<&SetRead<'_>>> = BTreeMap::new();
    for r in &reads {
        for e in &r.elems {
            let attempts = adds.get(e).map(Vec::as_slice).unwrap_or(&[]);
            if !attempts.is_empty() && attempts.iter().all(|a| a.outcome == Outcome::Fail) {
                failed_visible.entry(e).or_default().push(r);
            } else if !attempts
                .iter()
                .any(|a| a.outcome != Outcome::Fail && a.call <= r.ret)
            {
                phantom.entry(e).or_default().push(r);
            }
        }
    }
    for (e, rs) in phantom {
        let why = if adds.contains_key(e) {
            "before any add of it was invoked"
        } else {
            "although it was never added"
        };
        findings.push(per_element(
            AnomalyKind::PhantomElement,
            &k,
            &rs,
            format!("element {e} appears in {} {why}", reads_label(&rs)),
        ));
    }
    for (e, rs) in failed_visible {
        let failed: Vec<u64> = adds[e].iter().map(|a| a.index).collect();
        findings.push(per_element(
            AnomalyKind::FailedAddVisible,
            &k,
            &rs,
            format!(
                "element {e} appears in {}, but every add of it failed definitely (ops {}): \
                 an op reported failed took effect",
                reads_label(&rs),
                abbreviate(&failed, 8)
            ),
        ));
    }

    // Final reads.
    let finals: Vec<&SetRead<'_>> = reads.iter().filter(|r| r.pair.is_final()).collect();
    bump(stats, "reads.final", finals.len());
    if finals.is_empty() {
        if !adds.is_empty() {
            findings.push(Anomaly {
                kind: AnomalyKind::UndecidedNoFinalRead,
                key: k,
                ops: Vec::new(),
                explanation: "adds but no successful final read: lost elements, resurrections \
                              and convergence not checked"
                    .to_owned(),
            });
        }
        return Ok(());
    }
    let no_removes = Vec::new();
    let mut lost: BTreeMap<&Elem, (u64, Vec<&SetRead<'_>>)> = BTreeMap::new();
    let mut resurrected: BTreeMap<&Elem, (u64, Vec<&SetRead<'_>>)> = BTreeMap::new();
    for r in &finals {
        for (e, attempts) in &adds {
            let rems = removes.get(e).unwrap_or(&no_removes);
            if r.elems.contains(e) {
                // Latest completion of an add that may be visible (indeterminate = never
                // completes); then an acked remove invoked after it, done before the read.
                let latest_add = attempts
                    .iter()
                    .filter(|a| a.outcome != Outcome::Fail && a.call <= r.ret)
                    .map(|a| a.ret.unwrap_or(u64::MAX))
                    .max();
                let Some(latest_add) = latest_add else {
                    continue; // phantom, reported above
                };
                if let Some(rem) = rems.iter().find(|m| {
                    m.outcome == Outcome::Ok
                        && m.ret.is_some_and(|t| t < r.call)
                        && m.call > latest_add
                }) {
                    resurrected
                        .entry(e)
                        .or_insert((rem.index, Vec::new()))
                        .1
                        .push(r);
                }
            } else {
                // Latest completion of a remove that could be ordered before the read.
                let latest_remove = rems
                    .iter()
                    .filter(|m| m.outcome != Outcome::Fail && m.call <= r.ret)
                    .map(|m| m.ret.unwrap_or(u64::MAX))
                    .max();
                if let Some(add) = attempts.iter().find(|a| {
                    a.outcome == Outcome::Ok
                        && a.ret.is_some_and(|t| t < r.call)
                        && latest_remove.is_none_or(|m| a.call > m)
                }) {
                    lost.entry(e).or_insert((add.index, Vec::new())).1.push(r);
                }
            }
        }
    }
    for (e, (add, rs)) in lost {
        findings.push(per_element(
            AnomalyKind::LostElement,
            &k,
            &rs,
            format!(
                "element {e} is missing from {}, although its add #{add} was acknowledged before \
                 the read began and no remove of it could follow that add",
                reads_label(&rs)
            ),
        ));
    }
    for (e, (rem, rs)) in resurrected {
        findings.push(per_element(
            AnomalyKind::ResurrectedElement,
            &k,
            &rs,
            format!(
                "element {e} is present in {}, although remove #{rem} was invoked after every add \
                 of it completed and was acknowledged before the read began",
                reads_label(&rs)
            ),
        ));
    }
    let distinct: BTreeSet<&BTreeSet<Elem>> = finals.iter().map(|r| &r.elems).collect();
    if distinct.len() > 1 {
        let union: BTreeSet<&Elem> = finals.iter().flat_map(|r| &r.elems).collect();
        let mut gaps: Vec<String> = Vec::new();
        for r in &finals {
            let missing: Vec<&Elem> = union
                .iter()
                .copied()
                .filter(|e| !r.elems.contains(*e))
                .collect();
            if !missing.is_empty() {
                gaps.push(format!(
                    "{} lacks {}",
                    r.pair.node().unwrap_or("?"),
                    abbreviate(&missing, 6)
                ));
            }
        }
        findings.push(Anomaly {
            kind: AnomalyKind::FinalReadsDiverge,
            key: k,
            ops: finals.iter().map(|r| r.pair.index()).collect(),
            explanation: format!(
                "final reads disagree ({}): replicas did not converge after heal",
                gaps.join("; ")
            ),
        });
    }
    Ok(())
}

fn reads_label(rs: &[&SetRead<'_>]) -> String {
    let first = describe(&rs[0].pair);
    if rs.len() == 1 {
        format!("read {first}")
    } else {
        format!("{} reads (first: {first})", rs.len())
    }
}

fn per_element(
    kind: AnomalyKind,
    key: &Option<String>,
    rs: &[&SetRead<'_>],
    explanation: String,
) -> Anomaly {
    Anomaly {
        kind,
        key: key.clone(),
        ops: rs.iter().map(|r| r.pair.index()).collect(),
        explanation,
    }
}
