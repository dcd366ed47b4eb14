//! The counter checker: reads explained by the adds, final reads converged and conserving.
//!
//! This module owns the counter properties and the arithmetic shared with the bounded
//! counter ([`super::bounded`]): read ranges from prefix sums, and the exact "acknowledged
//! adds plus some subset of the indeterminate ones" test (a bounded subset-sum).
//!
//! Per key, with `initial` the value before any add:
//!
//! - Every `ok` read lies in the range the adds allow. Adds that definitely failed never
//!   count. [`ReadBound::Eventual`] (the default: calm admits counter adds on the fast path
//!   and spreads them by gossip, so a read may miss any add not yet delivered) allows any
//!   subset of the adds invoked before the read completed. [`ReadBound::Linearizable`] (keys
//!   in `strict` mode) additionally requires every add acknowledged before the read began.
//!   This is an interval check, a relaxation (not every value in the interval is a subset
//!   sum); the exact test is reserved for final reads.
//! - Final reads (marked `"final": true`, taken after heal and quiescence, typically one per
//!   node) all agree, and each equals `initial` + every add acknowledged before it began +
//!   a subset of the others invoked before it completed (indeterminate adds, or adds still
//!   in flight). The subset test is exact when the bitset of reachable sums fits the limits,
//!   else unknown.
//! - A key with adds but no final read cannot have its conservation checked: unknown.

use std::collections::{BTreeMap, HashMap};

use super::{
    Anomaly, AnomalyKind, CheckError, Checker, Stats, Verdict, abbreviate, int_value, plural,
};
use crate::history::{F, History, Outcome, PairedOp, describe};

const NAME: &str = "counter";

/// What an intermediate (non-final) read must reflect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadBound {
    /// Any subset of the adds invoked before the read completed (fast-path counters).
    #[default]
    Eventual,
    /// Also every add acknowledged before the read began (`strict` keys).
    Linearizable,
}

/// Bounds on the exact subset-sum test. Its cost is one pass over a bitset as wide as the
/// range of possible sums per uncertain add; beyond the limits the final check is unknown.
#[derive(Debug, Clone)]
pub struct SubsetSumLimits {
    /// Width of the range of possible sums (sum of |delta| of the uncertain adds), in bits.
    pub max_range_bits: u64,
    /// Uncertain adds × 64-bit words of the range: the total work.
    pub max_word_ops: u64,
}

impl Default for SubsetSumLimits {
    fn default() -> Self {
        SubsetSumLimits {
            max_range_bits: 1 << 24,
            max_word_ops: 1 << 30,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct CounterChecker {
    pub initial: i64,
    pub reads: ReadBound,
    pub limits: SubsetSumLimits,
}

impl Checker for CounterChecker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, history: &History) -> Result<Verdict, CheckError> {
        check_counter_keys(
            history,
            NAME,
            self.initial,
            self.reads,
            &self.limits,
            |_, _| {},
        )
    }
}

/// The per-key loop shared by the counter and bounded-counter checkers: group add/read ops by
/// key, run `extra` (checks of the specific checker) and then the counter read checks.
pub(crate) fn check_counter_keys(
    history: &History,
    name: &'static str,
    initial: i64,
    reads: ReadBound,
    limits: &SubsetSumLimits,
    mut extra: impl FnMut(&KeyOps<'_>, &mut Vec<Anomaly>),
) -> Result<Verdict, CheckError> {
    let groups = super::group_by_key(history, name, &[F::Add, F::Read])?;
    let mut findings = Vec::new();
    let mut stats = Stats::new();
    stats.insert("keys", groups.len() as i64);
    for (key, ops) in &groups {
        let k = KeyOps::collect(*key, ops, name)?;
        k.add_stats(&mut stats);
        extra(&k, &mut findings);
        k.check_reads(initial, reads, limits, &mut findings);
    }
    Ok(Verdict::from_findings(name, findings, stats))
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Add {
    pub call: u64,
    /// Completion time of an acknowledged add; None when indeterminate.
    pub ok_ret: Option<u64>,
    pub delta: i64,
}

pub(crate) struct Read<'a> {
    pub pair: PairedOp<'a>,
    pub call: u64,
    pub ret: u64,
    pub value: i64,
}

/// One key's adds and reads, indexed for range queries.
pub(crate) struct KeyOps<'a> {
    pub key: Option<&'a str>,
    /// Adds that did not definitely fail, sorted by call time.
    pub adds: Vec<Add>,
    /// Prefix sums over `adds` of positive and negative deltas.
    cand_pos: Vec<i128>,
    cand_neg: Vec<i128>,
    /// Completion times of acknowledged adds, sorted, with prefix sums likewise.
    acked_rets: Vec<u64>,
    acked_pos: Vec<i128>,
    acked_neg: Vec<i128>,
    pub reads: Vec<Read<'a>>,
    pub failed_adds: usize,
    pub indeterminate_adds: usize,
    pub unfinished_reads: usize,
}

fn prefix_sums(deltas: impl Iterator<Item = i64>) -> (Vec<i128>, Vec<i128>) {
    let (mut pos, mut neg) = (vec![0i128], vec![0i128]);
    for d in deltas {
        let d = i128::from(d);
        pos.push(pos.last().unwrap() + d.max(0));
        neg.push(neg.last().unwrap() + d.min(0));
    }
    (pos, neg)
}

impl<'a> KeyOps<'a> {
    pub fn collect(
        key: Option<&'a str>,
        ops: &[PairedOp<'a>],
        checker: &'static str,
    ) -> Result<KeyOps<'a>, CheckError> {
        let mut adds = Vec::new();
        let mut reads = Vec::new();
        let (mut failed_adds, mut indeterminate_adds, mut unfinished_reads) = (0, 0, 0);
        for op in ops {
            match op.f() {
                F::Add => {
                    let delta = int_value(op, op.arg(), "an integer delta")?;
                    match op.outcome() {
                        Outcome::Fail => failed_adds += 1,
                        Outcome::Ok => adds.push(Add {
                            call: op.call_ns(),
                            ok_ret: op.return_ns(),
                            delta,
                        }),
                        Outcome::Indeterminate => {
                            indeterminate_adds += 1;
                            adds.push(Add {
                                call: op.call_ns(),
                                ok_ret: None,
                                delta,
                            });
                        }
                    }
                }
                F::Read => match (op.outcome(), op.return_ns()) {
                    (Outcome::Ok, Some(ret)) => reads.push(Read {
                        pair: *op,
                        call: op.call_ns(),
                        ret,
                        value: int_value(
                            op,
                            op.result(),
                            "an integer (record an absent counter as its initial value)",
                        )?,
                    }),
                    _ => unfinished_reads += 1,
                },
                f => {
                    return Err(CheckError::UnexpectedOp {
                        checker,
                        index: op.index(),
                        f: f.clone(),
                    });
                }
            }
        }
        adds.sort_by_key(|a| a.call);
        let (cand_pos, cand_neg) = prefix_sums(adds.iter().map(|a| a.delta));
        let mut acked: Vec<(u64, i64)> = adds
            .iter()
            .filter_map(|a| a.ok_ret.map(|r| (r, a.delta)))
            .collect();
        acked.sort_unstable();
        let (acked_pos, acked_neg) = prefix_sums(acked.iter().map(|a| a.1));
        Ok(KeyOps {
            key,
            adds,
            cand_pos,
            cand_neg,
            acked_rets: acked.iter().map(|a| a.0).collect(),
            acked_pos,
            acked_neg,
            reads,
            failed_adds,
            indeterminate_adds,
            unfinished_reads,
        })
    }

    pub fn add_stats(&self, stats: &mut Stats) {
        let acked = self.acked_rets.len() as i64;
        *stats.entry("adds.ok").or_default() += acked;
        *stats.entry("adds.fail").or_default() += self.failed_adds as i64;
        *stats.entry("adds.indeterminate").or_default() += self.indeterminate_adds as i64;
        *stats.entry("reads.ok").or_default() += self.reads.len() as i64;
        *stats.entry("reads.final").or_default() +=
            self.reads.iter().filter(|r| r.pair.is_final()).count() as i64;
        *stats.entry("reads.not_ok").or_default() += self.unfinished_reads as i64;
    }

    /// Adds invoked no later than `t` (calls at the completion instant count as possibly
    /// visible): the candidates.
    fn candidates_before(&self, t: u64) -> usize {
        self.adds.partition_point(|a| a.call <= t)
    }

    /// Acknowledged adds completed strictly before `c`: they must be visible.
    fn acked_before(&self, c: u64) -> usize {
        self.acked_rets.partition_point(|&r| r < c)
    }

    /// The interval of values a read can return: `initial` + every must-visible add + any
    /// subset of the other candidates.
    fn range(&self, initial: i64, ncand: usize, nmust: usize) -> (i128, i128) {
        let i = i128::from(initial);
        (
            i + self.cand_neg[ncand] + self.acked_pos[nmust],
            i + self.cand_pos[ncand] + self.acked_neg[nmust],
        )
    }

    /// Range checks for intermediate reads, conservation and agreement for final reads.
    pub fn check_reads(
        &self,
        initial: i64,
        bound: ReadBound,
        limits: &SubsetSumLimits,
        findings: &mut Vec<Anomaly>,
    ) {
        let key = self.key.map(str::to_owned);
        // Subset-sum answers per (candidates, must-visible) prefix: final reads usually all
        // see the same adds.
        let mut reachable_cache: HashMap<(usize, usize), Result<Reachable, String>> =
            HashMap::new();
        let mut finals: BTreeMap<i64, Vec<&Read<'_>>> = BTreeMap::new();
        for r in &self.reads {
            let ncand = self.candidates_before(r.ret);
            if r.pair.is_final() {
                finals.entry(r.value).or_default().push(r);
                let nmust = self.acked_before(r.call);
                let reach = reachable_cache
                    .entry((ncand, nmust))
                    .or_insert_with(|| self.reachable(ncand, nmust, limits));
                if let Some(a) = self.check_final(initial, r, ncand, nmust, reach) {
                    findings.push(a);
                }
                continue;
            }
            let nmust = match bound {
                ReadBound::Eventual => 0,
                ReadBound::Linearizable => self.acked_before(r.call),
            };
            let (lo, hi) = self.range(initial, ncand, nmust);
            let v = i128::from(r.value);
            if v < lo || v > hi {
                let must = if nmust > 0 {
                    format!(", {nmust} of them acknowledged before it began and so visible")
                } else {
                    String::new()
                };
                findings.push(Anomaly {
                    kind: AnomalyKind::ReadOutOfRange,
                    key: key.clone(),
                    ops: vec![r.pair.index()],
                    explanation: format!(
                        "{} is outside [{lo}, {hi}], the values possible from initial {initial} \
                         and the {} invoked before the read completed{must}",
                        describe(&r.pair),
                        plural(ncand, "add"),
                    ),
                });
            }
        }
        if finals.len() > 1 {
            let seen: Vec<String> = finals
                .iter()
                .flat_map(|(v, rs)| {
                    rs.iter()
                        .map(move |r| format!("{}={v}", r.pair.node().unwrap_or("?")))
                })
                .collect();
            findings.push(Anomaly {
                kind: AnomalyKind::FinalReadsDiverge,
                key: key.clone(),
                ops: finals.values().flatten().map(|r| r.pair.index()).collect(),
                explanation: format!(
                    "final reads disagree ({}): replicas did not converge after heal",
                    abbreviate(&seen, 10)
                ),
            });
        }
        if finals.is_empty() && !self.adds.is_empty() {
            findings.push(Anomaly {
                kind: AnomalyKind::UndecidedNoFinalRead,
                key,
                ops: Vec::new(),
                explanation: format!(
                    "{} but no successful final read: conservation and convergence not checked",
                    plural(self.adds.len(), "add"),
                ),
            });
        }
    }

    /// The deltas of candidates that are not must-visible.
    fn uncertain_deltas(&self, ncand: usize, nmust: usize) -> Vec<i64> {
        let cutoff = if nmust == 0 {
            None
        } else {
            Some(self.acked_rets[nmust - 1])
        };
        self.adds[..ncand]
            .iter()
            .filter(|a| match (a.ok_ret, cutoff) {
                (Some(r), Some(c)) => r > c,
                _ => true,
            })
            .map(|a| a.delta)
            .collect()
    }

    fn reachable(
        &self,
        ncand: usize,
        nmust: usize,
        limits: &SubsetSumLimits,
    ) -> Result<Reachable, String> {
        Reachable::new(self.uncertain_deltas(ncand, nmust), limits)
    }

    fn check_final(
        &self,
        initial: i64,
        r: &Read<'_>,
        ncand: usize,
        nmust: usize,
        reach: &Result<Reachable, String>,
    ) -> Option<Anomaly> {
        let must_sum = self.acked_pos[nmust] + self.acked_neg[nmust];
        let base = i128::from(initial) + must_sum;
        let target = i128::from(r.value) - base;
        let (lo, hi) = self.range(initial, ncand, nmust);
        let uncertain = ncand - nmust;
        let context = format!(
            "initial {initial} + {} acknowledged before it began (sum {base}) + a subset of \
             {} indeterminate or concurrent with it",
            plural(nmust, "add"),
            plural(uncertain, "add"),
        );
        let anomaly = |explanation: String| Anomaly {
            kind: AnomalyKind::FinalValueUnreachable,
            key: self.key.map(str::to_owned),
            ops: vec![r.pair.index()],
            explanation,
        };
        let v = i128::from(r.value);
        if v < lo {
            return Some(anomaly(format!(
                "{} is below {lo}, the least it can be ({context}): an acknowledged add was \
                 lost, or a failed or duplicated negative add applied",
                describe(&r.pair)
            )));
        }
        if v > hi {
            return Some(anomaly(format!(
                "{} is above {hi}, the most it can be ({context}): an add that was never \
                 attempted or definitely failed applied, an add applied twice, or an \
                 acknowledged negative add was lost",
                describe(&r.pair)
            )));
        }
        match reach {
            Ok(reach) if reach.contains(target) => None,
            Ok(reach) => Some(anomaly(format!(
                "{} cannot be {context}: no subset of those (deltas {}) sums to {target}",
                describe(&r.pair),
                abbreviate(&reach.deltas, 12)
            ))),
            Err(why) => Some(Anomaly {
                kind: AnomalyKind::UndecidedLimit,
                key: self.key.map(str::to_owned),
                ops: vec![r.pair.index()],
                explanation: format!(
                    "{} is within [{lo}, {hi}], but whether it is {context} was not decided: \
                     {why}",
                    describe(&r.pair)
                ),
            }),
        }
    }
}

/// The set of sums of subsets of some deltas, as a bitset over `[neg, pos]`.
pub(crate) struct Reachable {
    pub deltas: Vec<i64>,
    neg: i128,
    pos: i128,
    bits: Vec<u64>,
}

impl Reachable {
    pub fn new(deltas: Vec<i64>, limits: &SubsetSumLimits) -> Result<Reachable, String> {
        let neg: i128 = deltas.iter().map(|&d| i128::from(d.min(0))).sum();
        let pos: i128 = deltas.iter().map(|&d| i128::from(d.max(0))).sum();
        let width = pos - neg + 1;
        if width > i128::from(limits.max_range_bits) {
            return Err(format!(
                "the {} uncertain adds span {width} possible sums, over the limit of {}",
                deltas.len(),
                limits.max_range_bits
            ));
        }
        let width = width as u64;
        let words = width.div_ceil(64);
        let nonzero = deltas.iter().filter(|&&d| d != 0).count() as u64;
        if nonzero.saturating_mul(words) > limits.max_word_ops {
            return Err(format!(
                "{nonzero} uncertain adds over {width} possible sums exceed the work limit of {} \
                 word operations",
                limits.max_word_ops
            ));
        }
        let mut bits = vec![0u64; words as usize];
        let zero = (-neg) as u64;
        bits[(zero / 64) as usize] |= 1 << (zero % 64);
        for &d in &deltas {
            match d.cmp(&0) {
                std::cmp::Ordering::Greater => or_shift_up(&mut bits, d.unsigned_abs()),
                std::cmp::Ordering::Less => or_shift_down(&mut bits, d.unsigned_abs()),
                std::cmp::Ordering::Equal => {}
            }
        }
        Ok(Reachable {
            deltas,
            neg,
            pos,
            bits,
        })
    }

    pub fn contains(&self, sum: i128) -> bool {
        if sum < self.neg || sum > self.pos {
            return false;
        }
        let i = (sum - self.neg) as u64;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
}

/// `bits |= bits << k` (towards higher sums).
fn or_shift_up(bits: &mut [u64], k: u64) {
    let (ws, bs) = ((k / 64) as usize, (k % 64) as u32);
    // Downwards, so every source word is read before it is updated.
    for i in (ws..bits.len()).rev() {
        let mut v = bits[i - ws] << bs;
        if bs > 0 && i > ws {
            v |= bits[i - ws - 1] >> (64 - bs);
        }
        bits[i] |= v;
    }
}

/// `bits |= bits >> k` (towards lower sums).
fn or_shift_down(bits: &mut [u64], k: u64) {
    let (ws, bs) = ((k / 64) as usize, (k % 64) as u32);
    let n = bits.len();
    for i in 0..n.saturating_sub(ws) {
        let mut v = bits[i + ws] >> bs;
        if bs > 0 && i + ws + 1 < n {
            v |= bits[i + ws + 1] << (64 - bs);
        }
        bits[i] |= v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(deltas: &[i64]) -> std::collections::BTreeSet<i128> {
        let mut sums = std::collections::BTreeSet::new();
        for mask in 0u32..(1 << deltas.len()) {
            let s: i128 = (0..deltas.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| i128::from(deltas[i]))
                .sum();
            sums.insert(s);
        }
        sums
    }

    #[test]
    fn subset_sums_match_brute_force() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..400 {
            let n = (rnd() % 11) as usize;
            // Mix small deltas with ones that cross 64-bit word boundaries.
            let deltas: Vec<i64> = (0..n)
                .map(|_| {
                    let mag = if rnd() % 4 == 0 {
                        rnd() % 300
                    } else {
                        rnd() % 9
                    };
                    if rnd() % 3 == 0 {
                        -(mag as i64)
                    } else {
                        mag as i64
                    }
                })
                .collect();
            let expected = brute(&deltas);
            let r = Reachable::new(deltas.clone(), &SubsetSumLimits::default()).unwrap();
            let lo = r.neg - 3;
            let hi = r.pos + 3;
            for s in lo..=hi {
                assert_eq!(
                    r.contains(s),
                    expected.contains(&s),
                    "deltas {deltas:?}, sum {s}"
                );
            }
        }
    }

    #[test]
    fn subset_sum_limits_refuse_instead_of_guessing() {
        let limits = SubsetSumLimits {
            max_range_bits: 100,
            max_word_ops: 1 << 20,
        };
        assert!(Reachable::new(vec![60, 50], &limits).is_err());
        assert!(Reachable::new(vec![60, -30], &limits).is_ok());
    }
}
