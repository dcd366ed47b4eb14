//! The bounded-counter (escrow) checker: bounds never crossed, value conserved.
//!
//! This module owns the escrow-specific properties; the counter arithmetic is shared with
//! [`super::counter`]. Escrow's promise (DESIGN §5) is that the bound holds even under
//! partition, so it is checked on every read, not only at the end:
//!
//! - No `ok` read anywhere, at any time, returns a value outside `[min, max]`.
//! - The acknowledged adds fit: whatever subset of the indeterminate adds applied, the
//!   final state is `initial` + all acknowledged adds + that subset; if no such value lies
//!   in `[min, max]`, escrow admitted an overdraft, even if no read caught it.
//! - Everything the counter checker checks: reads within what the adds allow, final reads
//!   agreeing and equal to the acknowledged adds plus a subset of the indeterminate ones.
//!   Adds refused definitely (`fail`, e.g. RESOURCE_EXHAUSTED) never count.

use super::counter::{KeyOps, ReadBound, SubsetSumLimits, check_counter_keys};
use super::{Anomaly, AnomalyKind, CheckError, Checker, Verdict};
use crate::history::{History, describe};

const NAME: &str = "bounded";

#[derive(Debug, Clone)]
pub struct BoundedChecker {
    pub min: i64,
    pub max: i64,
    pub initial: i64,
    pub reads: ReadBound,
    pub limits: SubsetSumLimits,
}

impl BoundedChecker {
    pub fn new(min: i64, max: i64, initial: i64) -> BoundedChecker {
        BoundedChecker {
            min,
            max,
            initial,
            reads: ReadBound::default(),
            limits: SubsetSumLimits::default(),
        }
    }
}

impl Checker for BoundedChecker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, history: &History) -> Result<Verdict, CheckError> {
        if !(self.min <= self.initial && self.initial <= self.max) {
            return Err(CheckError::Config {
                checker: NAME,
                reason: format!(
                    "initial {} must lie within [min {}, max {}]",
                    self.initial, self.min, self.max
                ),
            });
        }
        check_counter_keys(
            history,
            NAME,
            self.initial,
            self.reads,
            &self.limits,
            |k, findings| self.check_bounds(k, findings),
        )
    }
}

impl BoundedChecker {
    fn check_bounds(&self, k: &KeyOps<'_>, findings: &mut Vec<Anomaly>) {
        let key = k.key.map(str::to_owned);
        for r in &k.reads {
            if r.value < self.min || r.value > self.max {
                findings.push(Anomaly {
                    kind: AnomalyKind::BoundViolated,
                    key: key.clone(),
                    ops: vec![r.pair.index()],
                    explanation: format!(
                        "{} is outside the bounds [{}, {}]",
                        describe(&r.pair),
                        self.min,
                        self.max
                    ),
                });
            }
        }
        let (mut acked, mut neg, mut pos) = (0i128, 0i128, 0i128);
        for a in &k.adds {
            let d = i128::from(a.delta);
            if a.ok_ret.is_some() {
                acked += d;
            } else if d < 0 {
                neg += d;
            } else {
                pos += d;
            }
        }
        let base = i128::from(self.initial) + acked;
        let (lo, hi) = (base + neg, base + pos);
        if hi < i128::from(self.min) || lo > i128::from(self.max) {
            findings.push(Anomaly {
                kind: AnomalyKind::Overdrawn,
                key,
                ops: Vec::new(),
                explanation: format!(
                    "initial {} + the acknowledged adds ({acked}) + any subset of the \
                     indeterminate adds lies in [{lo}, {hi}], entirely outside the bounds \
                     [{}, {}]: escrow acknowledged more than the bounds allow",
                    self.initial, self.min, self.max
                ),
            });
        }
    }
}
