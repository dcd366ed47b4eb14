//! The bank checker: transfers between accounts neither create nor destroy money, and every
//! snapshot of the accounts shows it.
//!
//! This module owns the bank property. The history holds two kinds of ops:
//!
//! - `transfer`: one transaction moving `amount` from one account to another if the source
//!   holds at least that much. Invocation value `{"from": key, "to": key, "amount": n}`
//!   (`n > 0`, `from != to`); the `ok` value `{"succeeded": bool}` says which branch ran: a
//!   transfer that is `ok` with `succeeded: false` found the balance short and changed
//!   nothing, like a `fail`.
//! - `read_all`: one snapshot of every account; the `ok` value is an object from account key
//!   to balance. The workload records a read `ok` only when it is one cut of the accounts
//!   (an atomic linearizable scan during the run; a serializable scan, one state of its node,
//!   in the final phase), so a torn read can never pass for an anomaly.
//!
//! The checker is told the accounts and each one's opening balance (the workload creates
//! them all in one transaction before any client starts). Findings:
//!
//! - on every `ok` read, final ones included: an account missing, a key that is no account,
//!   a negative balance, or (when exactly the accounts are there) a total other than the
//!   opening total;
//! - final reads (after heal) that disagree with each other;
//! - final balances that are not the opening balances plus every acknowledged successful
//!   transfer plus some subset of the indeterminate ones. The exact search enumerates
//!   subsets, so it runs only when at most [`BankChecker::max_indeterminate`] transfers are
//!   indeterminate (stat `final.conservation_exact` = 1). Beyond that only a necessary
//!   condition is checked (stat 0): each account's own change must be a subset sum of the
//!   indeterminate transfers touching it; a final state can pass it and still be
//!   unreachable, but one that fails it is unreachable for sure.
//!
//! No `ok` read at all is unknown, and so are transfers without any final read.

use std::collections::{BTreeMap, HashMap};

use super::{Anomaly, AnomalyKind, CheckError, Checker, Stats, Verdict, abbreviate, bad};
use crate::history::{F, History, Outcome, PairedOp, Value, describe};

const NAME: &str = "bank";

/// Indeterminate transfers up to which the final balances are searched exactly: 2^20
/// subsets of a few ns each.
pub const MAX_INDETERMINATE_DEFAULT: usize = 20;
/// Distinct subset sums kept per account in the relaxed check; beyond, that account is not
/// checked.
const ACCOUNT_SUMS_MAX: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct BankChecker {
    /// Every account's key.
    pub accounts: Vec<String>,
    /// Each account's opening balance.
    pub initial: i64,
    /// Most indeterminate transfers the final-balance search enumerates the subsets of.
    pub max_indeterminate: usize,
}

impl BankChecker {
    pub fn new(accounts: Vec<String>, initial: i64) -> BankChecker {
        BankChecker {
            accounts,
            initial,
            max_indeterminate: MAX_INDETERMINATE_DEFAULT,
        }
    }
}

/// A transfer, with accounts as positions in [`BankChecker::accounts`].
struct Transfer {
    from: usize,
    to: usize,
    amount: i128,
}

/// One `ok` read: balances by account position (`None`: not in the read).
struct Read<'a> {
    op: PairedOp<'a>,
    balances: Vec<Option<i128>>,
    unknown: Vec<&'a str>,
}

impl Read<'_> {
    fn complete(&self) -> bool {
        self.unknown.is_empty() && self.balances.iter().all(Option::is_some)
    }

    fn values(&self) -> Vec<i128> {
        self.balances
            .iter()
            .map(|b| b.unwrap_or_default())
            .collect()
    }
}

impl Checker for BankChecker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, history: &History) -> Result<Verdict, CheckError> {
        if self.accounts.len() < 2 {
            return Err(CheckError::Config {
                checker: NAME,
                reason: format!(
                    "a bank needs at least 2 accounts, got {}",
                    self.accounts.len()
                ),
            });
        }
        if self.initial < 0 {
            return Err(CheckError::Config {
                checker: NAME,
                reason: format!("the opening balance {} is negative", self.initial),
            });
        }
        let position: HashMap<&str, usize> = self
            .accounts
            .iter()
            .enumerate()
            .map(|(i, a)| (a.as_str(), i))
            .collect();
        let mut stats = Stats::new();
        let mut acked: Vec<Transfer> = Vec::new();
        let mut indeterminate: Vec<Transfer> = Vec::new();
        let mut reads: Vec<Read<'_>> = Vec::new();
        for op in history.pairs() {
            match op.f() {
                F::Transfer => {
                    let t = parse_transfer(&op, &position)?;
                    let stat = match op.outcome() {
                        Outcome::Ok => {
                            match op.result().get("succeeded").and_then(Value::as_bool) {
                                Some(true) => {
                                    acked.push(t);
                                    "transfers.ok_succeeded"
                                }
                                Some(false) => "transfers.ok_refused",
                                None => {
                                    return Err(bad(&op, "{\"succeeded\": bool}", op.result()));
                                }
                            }
                        }
                        Outcome::Fail => "transfers.fail",
                        Outcome::Indeterminate => {
                            indeterminate.push(t);
                            "transfers.indeterminate"
                        }
                    };
                    *stats.entry(stat).or_insert(0) += 1;
                }
                F::ReadAll => match op.outcome() {
                    Outcome::Ok => reads.push(parse_read(op, &position)?),
                    _ => *stats.entry("reads.fail").or_insert(0) += 1,
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
        stats.insert("accounts", self.accounts.len() as i64);
        stats.insert("reads.ok", reads.len() as i64);
        let finals: Vec<&Read<'_>> = reads.iter().filter(|r| r.op.is_final()).collect();
        stats.insert("reads.final", finals.len() as i64);

        let mut findings = Vec::new();
        for r in &reads {
            self.check_read(r, &mut findings);
        }
        if reads.is_empty() {
            findings.push(Anomaly {
                kind: AnomalyKind::UndecidedNoReads,
                key: None,
                ops: Vec::new(),
                explanation: "the history has no ok read of the accounts".into(),
            });
        }
        let transfers = acked.len() + indeterminate.len();
        if finals.is_empty() && transfers > 0 {
            findings.push(Anomaly {
                kind: AnomalyKind::UndecidedNoFinalRead,
                key: None,
                ops: Vec::new(),
                explanation: "no final read of the accounts: the final balances are undecided"
                    .into(),
            });
        }
        if let Some(first) = finals.first() {
            for other in &finals[1..] {
                if other.balances != first.balances || other.unknown != first.unknown {
                    findings.push(Anomaly {
                        kind: AnomalyKind::FinalReadsDiverge,
                        key: None,
                        ops: vec![first.op.index(), other.op.index()],
                        explanation: format!(
                            "final reads disagree: {} and {}",
                            describe(&first.op),
                            describe(&other.op)
                        ),
                    });
                }
            }
        }
        let exact = indeterminate.len() <= self.max_indeterminate;
        stats.insert("final.conservation_exact", i64::from(exact));
        self.check_conservation(&finals, &acked, &indeterminate, exact, &mut findings);
        Ok(Verdict::from_findings(NAME, findings, stats))
    }
}

impl BankChecker {
    fn total(&self) -> i128 {
        i128::from(self.initial) * self.accounts.len() as i128
    }

    fn check_read(&self, r: &Read<'_>, findings: &mut Vec<Anomaly>) {
        let finding = |kind, explanation| Anomaly {
            kind,
            key: None,
            ops: vec![r.op.index()],
            explanation,
        };
        let missing: Vec<&str> = self
            .accounts
            .iter()
            .zip(&r.balances)
            .filter(|(_, b)| b.is_none())
            .map(|(a, _)| a.as_str())
            .collect();
        if !missing.is_empty() {
            findings.push(finding(
                AnomalyKind::BankMissingAccount,
                format!(
                    "{} lacks {}, created before any client started",
                    describe(&r.op),
                    abbreviate(&missing, 8)
                ),
            ));
        }
        if !r.unknown.is_empty() {
            findings.push(finding(
                AnomalyKind::BankUnknownAccount,
                format!(
                    "{} holds {}, which no account is",
                    describe(&r.op),
                    abbreviate(&r.unknown, 8)
                ),
            ));
        }
        let negative: Vec<String> = self
            .accounts
            .iter()
            .zip(&r.balances)
            .filter_map(|(a, b)| b.filter(|b| *b < 0).map(|b| format!("{a} = {b}")))
            .collect();
        if !negative.is_empty() {
            findings.push(finding(
                AnomalyKind::BankNegative,
                format!(
                    "{} has a negative balance ({}): a transfer ran without the funds its test required",
                    describe(&r.op),
                    negative.join(", ")
                ),
            ));
        }
        if r.complete() {
            let total: i128 = r.values().iter().sum();
            if total != self.total() {
                findings.push(finding(
                    AnomalyKind::BankWrongTotal,
                    format!(
                        "{} sums to {total}, not the {} the accounts opened with ({:+}): a transfer was not applied whole, or the read is no snapshot",
                        describe(&r.op),
                        self.total(),
                        total - self.total()
                    ),
                ));
            }
        }
    }

    /// Each distinct complete final state must be the opening balances plus every
    /// acknowledged successful transfer plus a subset of the indeterminate ones: searched
    /// when `exact`, else the per-account necessary condition (module docs).
    fn check_conservation(
        &self,
        finals: &[&Read<'_>],
        acked: &[Transfer],
        indeterminate: &[Transfer],
        exact: bool,
        findings: &mut Vec<Anomaly>,
    ) {
        let mut base = vec![i128::from(self.initial); self.accounts.len()];
        for t in acked {
            base[t.from] -= t.amount;
            base[t.to] += t.amount;
        }
        let mut states: BTreeMap<Vec<i128>, Vec<u64>> = BTreeMap::new();
        for r in finals.iter().filter(|r| r.complete()) {
            states.entry(r.values()).or_default().push(r.op.index());
        }
        for (state, ops) in states {
            let explained = if exact {
                reachable(&base, indeterminate, &state)
            } else {
                (0..self.accounts.len()).all(|a| {
                    account_reachable(a, state[a] - base[a], indeterminate).unwrap_or(true)
                })
            };
            if explained {
                continue;
            }
            let shown: Vec<String> = self
                .accounts
                .iter()
                .zip(state.iter().zip(&base))
                .map(|(a, (s, b))| format!("{a} = {s} (the acknowledged transfers alone: {b})"))
                .collect();
            findings.push(Anomaly {
                kind: AnomalyKind::FinalValueUnreachable,
                key: None,
                ops,
                explanation: format!(
                    "the final balances {} are not the opening {} plus the {} acknowledged successful transfers plus any subset of the {} indeterminate ones{}",
                    shown.join(", "),
                    self.initial,
                    acked.len(),
                    indeterminate.len(),
                    if exact {
                        ""
                    } else {
                        " (some account's change is no subset sum of the indeterminate transfers touching it)"
                    }
                ),
            });
        }
    }
}

/// Whether `target` is `base` plus the effect of some subset of `optional`. Walks the
/// subsets in Gray-code order, so each step applies or undoes one transfer.
fn reachable(base: &[i128], optional: &[Transfer], target: &[i128]) -> bool {
    let mut now = base.to_vec();
    if now == target {
        return true;
    }
    let mut included = vec![false; optional.len()];
    for step in 1u64..(1u64 << optional.len()) {
        let i = step.trailing_zeros() as usize;
        let t = &optional[i];
        let sign = if included[i] { -1 } else { 1 };
        included[i] = !included[i];
        now[t.from] -= sign * t.amount;
        now[t.to] += sign * t.amount;
        if now == target {
            return true;
        }
    }
    false
}

/// Whether account `a` can change by `delta` through some subset of `optional`; `None` when
/// the distinct sums exceed [`ACCOUNT_SUMS_MAX`].
fn account_reachable(a: usize, delta: i128, optional: &[Transfer]) -> Option<bool> {
    let mut sums = std::collections::HashSet::from([0i128]);
    for t in optional {
        let effect = match (t.from == a, t.to == a) {
            (true, _) => -t.amount,
            (_, true) => t.amount,
            _ => continue,
        };
        let next: Vec<i128> = sums.iter().map(|s| s + effect).collect();
        sums.extend(next);
        if sums.len() > ACCOUNT_SUMS_MAX {
            return None;
        }
    }
    Some(sums.contains(&delta))
}

fn parse_transfer(
    op: &PairedOp<'_>,
    position: &HashMap<&str, usize>,
) -> Result<Transfer, CheckError> {
    const SHAPE: &str = "{\"from\": account, \"to\": another account, \"amount\": n > 0}";
    let arg = op.arg();
    let account = |field: &str| {
        arg.get(field)
            .and_then(Value::as_str)
            .and_then(|k| position.get(k).copied())
    };
    let amount = arg.get("amount").and_then(Value::as_i64);
    match (account("from"), account("to"), amount) {
        (Some(from), Some(to), Some(amount)) if from != to && amount > 0 => Ok(Transfer {
            from,
            to,
            amount: i128::from(amount),
        }),
        _ => Err(bad(op, SHAPE, arg)),
    }
}

fn parse_read<'a>(
    op: PairedOp<'a>,
    position: &HashMap<&str, usize>,
) -> Result<Read<'a>, CheckError> {
    let result = op.result();
    let map = result
        .as_object()
        .ok_or_else(|| bad(&op, "an object from account to balance", result))?;
    let mut balances = vec![None; position.len()];
    let mut unknown = Vec::new();
    for (key, v) in map {
        let balance = v
            .as_i64()
            .ok_or_else(|| bad(&op, "integer balances", result))?;
        match position.get(key.as_str()) {
            Some(&i) => balances[i] = Some(i128::from(balance)),
            None => unknown.push(key.as_str()),
        }
    }
    Ok(Read {
        op,
        balances,
        unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Validity;
    use crate::history::{Op, OpType, Process};
    use serde_json::json;

    const A: [&str; 3] = ["a", "b", "c"];

    struct H {
        history: History,
        process: u64,
    }

    impl H {
        fn new() -> H {
            H {
                history: History::new(),
                process: 0,
            }
        }

        fn push(&mut self, op: Op) {
            crate::checker::push_numbered(&mut self.history, op);
        }

        /// A transfer completed as `kind`; `succeeded` for an `ok` one.
        fn transfer(&mut self, from: &str, to: &str, amount: i64, kind: OpType, succeeded: bool) {
            let p = Process::Client(self.process);
            self.push(
                Op::new(0, 0, p, OpType::Invoke, F::Transfer)
                    .with_value(json!({"from": from, "to": to, "amount": amount})),
            );
            let done = Op::new(0, 0, p, kind, F::Transfer);
            self.push(match kind {
                OpType::Ok => done.with_value(json!({ "succeeded": succeeded })),
                _ => done,
            });
            if kind == OpType::Info {
                self.process += 1;
            }
        }

        fn read(&mut self, balances: Value, is_final: bool) {
            let p = Process::Client(self.process);
            self.push(Op::new(0, 0, p, OpType::Invoke, F::ReadAll).with_final(is_final));
            self.push(
                Op::new(0, 0, p, OpType::Ok, F::ReadAll)
                    .with_value(balances)
                    .with_final(is_final),
            );
        }

        fn check(&self) -> Verdict {
            BankChecker::new(A.map(String::from).to_vec(), 10)
                .check(&self.history)
                .unwrap()
        }
    }

    fn kinds(v: &Verdict) -> Vec<AnomalyKind> {
        v.anomalies.iter().map(|a| a.kind).collect()
    }

    /// Two transfers that went through, one refused for want of funds, one failed, one
    /// indeterminate that applied; reads and final reads that add up.
    fn good() -> H {
        let mut h = H::new();
        h.read(json!({"a": 10, "b": 10, "c": 10}), false);
        h.transfer("a", "b", 3, OpType::Ok, true);
        h.read(json!({"a": 7, "b": 13, "c": 10}), false);
        h.transfer("c", "a", 11, OpType::Ok, false);
        h.transfer("b", "c", 5, OpType::Fail, false);
        h.transfer("b", "c", 2, OpType::Info, false);
        h.read(json!({"a": 7, "b": 11, "c": 12}), false);
        for _ in 0..3 {
            h.read(json!({"a": 7, "b": 11, "c": 12}), true);
        }
        h
    }

    #[test]
    fn balances_that_add_up_are_valid() {
        let v = good().check();
        assert!(v.is_valid(), "{v}");
        assert_eq!(v.stats["transfers.ok_succeeded"], 1);
        assert_eq!(v.stats["transfers.ok_refused"], 1);
        assert_eq!(v.stats["transfers.indeterminate"], 1);
        assert_eq!(v.stats["reads.final"], 3);
        assert_eq!(v.stats["final.conservation_exact"], 1);
    }

    #[test]
    fn a_debit_without_its_credit_is_a_wrong_total() {
        let mut h = H::new();
        h.transfer("a", "b", 3, OpType::Ok, true);
        h.read(json!({"a": 7, "b": 10, "c": 10}), false);
        h.read(json!({"a": 7, "b": 10, "c": 10}), true);
        let v = h.check();
        assert_eq!(v.valid, Validity::Invalid, "{v}");
        assert_eq!(
            kinds(&v),
            vec![
                AnomalyKind::BankWrongTotal,
                AnomalyKind::BankWrongTotal,
                AnomalyKind::FinalValueUnreachable
            ],
            "{v}"
        );
        assert!(v.anomalies[0].explanation.contains("sums to 27"), "{v}");
    }

    #[test]
    fn a_negative_balance_is_found_even_when_the_total_holds() {
        let mut h = H::new();
        h.transfer("a", "b", 8, OpType::Info, false);
        h.transfer("a", "c", 8, OpType::Info, false);
        h.read(json!({"a": -6, "b": 18, "c": 18}), false);
        h.read(json!({"a": -6, "b": 18, "c": 18}), true);
        let v = h.check();
        assert_eq!(
            kinds(&v),
            vec![AnomalyKind::BankNegative, AnomalyKind::BankNegative],
            "{v}"
        );
        assert!(v.anomalies[0].explanation.contains("a = -6"), "{v}");
    }

    #[test]
    fn missing_and_unknown_accounts_are_found() {
        let mut h = H::new();
        h.read(json!({"a": 10, "b": 20}), false);
        h.read(json!({"a": 10, "b": 10, "c": 10, "d": 0}), false);
        let v = h.check();
        assert_eq!(
            kinds(&v),
            vec![
                AnomalyKind::BankMissingAccount,
                AnomalyKind::BankUnknownAccount
            ],
            "{v}"
        );
    }

    #[test]
    fn final_reads_must_agree_and_be_reachable() {
        let mut h = good();
        h.read(json!({"a": 9, "b": 11, "c": 10}), true);
        let v = h.check();
        assert_eq!(
            kinds(&v),
            vec![
                AnomalyKind::FinalReadsDiverge,
                AnomalyKind::FinalValueUnreachable
            ],
            "{v}"
        );
    }

    #[test]
    fn too_many_indeterminate_transfers_leave_the_per_account_condition() {
        let mut h = H::new();
        h.transfer("a", "b", 1, OpType::Info, false);
        h.transfer("b", "c", 1, OpType::Info, false);
        h.transfer("c", "a", 2, OpType::Info, false);
        // Each account's change alone is explained (a: both of its transfers, b: only b→c,
        // c: none), the whole state is not (a's needs a→b, b's excludes it): only the exact
        // search sees it.
        h.read(json!({"a": 11, "b": 9, "c": 10}), true);
        let checker = |max_indeterminate| BankChecker {
            max_indeterminate,
            ..BankChecker::new(A.map(String::from).to_vec(), 10)
        };
        let v = checker(3).check(&h.history).unwrap();
        assert_eq!(kinds(&v), vec![AnomalyKind::FinalValueUnreachable], "{v}");
        let v = checker(2).check(&h.history).unwrap();
        assert!(v.is_valid(), "{v}");
        assert_eq!(v.stats["final.conservation_exact"], 0);
        // A change no subset of an account's own transfers makes fails even so.
        h.read(json!({"a": 7, "b": 11, "c": 12}), true);
        let v = checker(2).check(&h.history).unwrap();
        assert!(
            kinds(&v).contains(&AnomalyKind::FinalValueUnreachable),
            "{v}"
        );
    }

    #[test]
    fn no_reads_or_no_final_read_is_unknown() {
        let mut h = H::new();
        h.transfer("a", "b", 1, OpType::Ok, true);
        let v = h.check();
        assert_eq!(v.valid, Validity::Unknown, "{v}");
        assert_eq!(
            kinds(&v),
            vec![
                AnomalyKind::UndecidedNoReads,
                AnomalyKind::UndecidedNoFinalRead
            ]
        );
    }

    #[test]
    fn a_transfer_the_harness_could_not_have_sent_is_an_error() {
        let mut h = H::new();
        h.transfer("a", "a", 1, OpType::Ok, true);
        let e = BankChecker::new(A.map(String::from).to_vec(), 10)
            .check(&h.history)
            .unwrap_err();
        assert!(matches!(e, CheckError::BadValue { .. }), "{e}");
    }

    #[test]
    fn the_subset_search_finds_exactly_the_reachable_states() {
        let t = |from, to, amount| Transfer { from, to, amount };
        let optional = [t(0, 1, 1), t(1, 2, 2), t(2, 0, 4)];
        let base = [10, 10, 10];
        // Every subset, brute force.
        let mut states = Vec::new();
        for mask in 0..8u32 {
            let mut s = base.to_vec();
            for (i, t) in optional.iter().enumerate() {
                if mask & (1 << i) != 0 {
                    s[t.from] -= t.amount;
                    s[t.to] += t.amount;
                }
            }
            states.push(s);
        }
        for s in &states {
            assert!(reachable(&base, &optional, s), "{s:?}");
        }
        assert!(!reachable(&base, &optional, &[11, 10, 9]));
    }
}
