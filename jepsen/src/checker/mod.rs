//! Checkers: functions from a [`History`] to a [`Verdict`].
//!
//! This module owns the verdict shape every checker returns and the helpers they share
//! (grouping ops by key, reading typed arguments). Each submodule owns one property:
//!
//! - [`linearizable`]: registers (read/write/cas/delete) are linearizable, per key.
//! - [`counter`]: counter reads stay within what the adds allow, final reads agree and equal
//!   the acknowledged adds plus a subset of the indeterminate ones.
//! - [`set`]: no lost acknowledged add, no phantom, no resurrected removed element.
//! - [`bounded`]: escrow counters never leave their bounds and conserve like counters.
//! - [`session`]: read-your-writes across nodes with session tokens.
//! - [`watch`]: every watcher receives each acknowledged write exactly once, in order, across
//!   reconnects.
//! - [`bank`]: transfers conserve the accounts' total; every snapshot shows it, with no
//!   negative balance and no account missing.
//! - [`lock`]: a lease-based lock's fencing tokens increase, no two holders' windows
//!   overlap, and fenced writes succeed only for the current holder, in token order.
//!
//! A checker never says "valid" unless it established validity: running out of a search
//! budget, or lacking the final reads a property needs, yields [`Validity::Unknown`] with the
//! reason in [`Verdict::anomalies`]. A history the checker cannot interpret (an op it does not
//! understand, a malformed value) is a [`CheckError`], not a verdict: it is a harness bug.

pub mod bank;
pub mod bounded;
pub mod counter;
pub mod linearizable;
pub mod lock;
pub mod session;
pub mod set;
pub mod watch;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Serialize, Serializer};

use crate::history::{F, History, PairedOp, Value};

/// A history the checker cannot interpret.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("op {index}: the {checker} checker does not understand f = {f}")]
    UnexpectedOp {
        checker: &'static str,
        index: u64,
        f: F,
    },
    #[error("op {index} ({f}): expected {expected}, got {got}")]
    BadValue {
        index: u64,
        f: F,
        expected: &'static str,
        got: Value,
    },
    #[error("invalid {checker} checker configuration: {reason}")]
    Config {
        checker: &'static str,
        reason: String,
    },
}

/// Jepsen's three-valued `:valid?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Valid,
    Invalid,
    /// The checker could not decide (budget exhausted, missing final reads): never a pass.
    Unknown,
}

impl Validity {
    /// Invalid dominates Unknown, which dominates Valid.
    pub fn and(self, other: Validity) -> Validity {
        use Validity::*;
        match (self, other) {
            (Invalid, _) | (_, Invalid) => Invalid,
            (Unknown, _) | (_, Unknown) => Unknown,
            _ => Valid,
        }
    }
}

impl fmt::Display for Validity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Validity::Valid => "valid",
            Validity::Invalid => "INVALID",
            Validity::Unknown => "unknown",
        })
    }
}

/// Serialized like Jepsen: `true`, `false` or `"unknown"`.
impl Serialize for Validity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Validity::Valid => s.serialize_bool(true),
            Validity::Invalid => s.serialize_bool(false),
            Validity::Unknown => s.serialize_str("unknown"),
        }
    }
}

/// What a finding is about. Most kinds are violations; the `Undecided*` kinds only explain
/// why a verdict is [`Validity::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// No order of a key's register ops respects real time and the register's semantics.
    NotLinearizable,
    /// A counter read outside what the adds that could be visible to it allow.
    ReadOutOfRange,
    /// Final reads of one key disagree: replicas did not converge after heal.
    FinalReadsDiverge,
    /// A final counter value that is not the acknowledged adds plus a subset of the
    /// indeterminate ones: an acknowledged add was lost, or a failed one applied. For the
    /// bank: final balances that no subset of the indeterminate transfers explains.
    FinalValueUnreachable,
    /// A bounded-counter read outside `[min, max]`.
    BoundViolated,
    /// Acknowledged bounded-counter adds alone put the value outside `[min, max]` whatever
    /// the indeterminate adds did: escrow admitted an overdraft.
    Overdrawn,
    /// An acknowledged set add missing from a final read.
    LostElement,
    /// A set read containing an element no add (invoked before the read completed) could
    /// explain.
    PhantomElement,
    /// A set read containing an element whose every add definitely failed.
    FailedAddVisible,
    /// An element present in a final read although an acknowledged remove followed all of
    /// its adds.
    ResurrectedElement,
    /// A causal read with a write's session token that does not reflect that write.
    StaleSessionRead,
    /// An acknowledged write a watcher never received.
    WatchLost,
    /// A write a watcher received twice.
    WatchDuplicate,
    /// A watch event no write explains (or whose write failed, or that came before it).
    WatchPhantom,
    /// Watch events out of the order their writes or their sources impose.
    WatchOrder,
    /// One write delivered to watchers as different facts or entries.
    WatchDisagree,
    /// A snapshot of the bank's accounts whose balances do not sum to the opening total.
    BankWrongTotal,
    /// A snapshot of the bank's accounts with a negative balance.
    BankNegative,
    /// A snapshot of the bank's accounts without one of them.
    BankMissingAccount,
    /// A snapshot of the bank's accounts holding a key that is no account.
    BankUnknownAccount,
    /// Two successful lock acquisitions with one fencing token.
    LockTokenReused,
    /// A lock acquisition that completed before another was invoked, with the larger token.
    LockTokenOrder,
    /// A lock acquired (larger token) before the previous holder's window ended: two holders.
    LockOverlap,
    /// A fenced write that succeeded with a token older than an acquisition completed before
    /// it was invoked.
    LockStaleWrite,
    /// Successful fenced writes, one completed before the other was invoked, whose tokens
    /// decrease.
    LockWriteOrder,
    /// A search or computation stopped at a configured limit.
    UndecidedLimit,
    /// A property needs final reads and the history has none for this key.
    UndecidedNoFinalRead,
    /// The history has no read the property could be checked on (for the lock: no
    /// successful acquisition).
    UndecidedNoReads,
}

impl AnomalyKind {
    pub fn is_violation(self) -> bool {
        !matches!(
            self,
            AnomalyKind::UndecidedLimit
                | AnomalyKind::UndecidedNoFinalRead
                | AnomalyKind::UndecidedNoReads
        )
    }
}

/// One finding, with the ops involved (history indices of their invocations).
#[derive(Debug, Clone, Serialize)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub key: Option<String>,
    pub ops: Vec<u64>,
    pub explanation: String,
}

/// Named counters about the check (ops seen, keys, search steps, ...).
pub type Stats = BTreeMap<&'static str, i64>;

/// Upper bound on anomalies kept per kind, so a badly broken run yields a readable report;
/// the count of all of them stays in the stats.
pub const MAX_ANOMALIES_PER_KIND: usize = 50;

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub checker: &'static str,
    pub valid: Validity,
    pub anomalies: Vec<Anomaly>,
    pub stats: Stats,
}

impl Verdict {
    /// Builds a verdict from findings: Invalid if any is a violation, Unknown if only
    /// undecided findings, else Valid. Keeps at most [`MAX_ANOMALIES_PER_KIND`] per kind and
    /// records per-kind totals in the stats.
    pub fn from_findings(checker: &'static str, findings: Vec<Anomaly>, mut stats: Stats) -> Self {
        let mut valid = Validity::Valid;
        let mut per_kind: BTreeMap<&'static str, i64> = BTreeMap::new();
        let mut anomalies = Vec::new();
        for a in findings {
            valid = valid.and(if a.kind.is_violation() {
                Validity::Invalid
            } else {
                Validity::Unknown
            });
            let n = per_kind.entry(kind_stat_name(a.kind)).or_insert(0);
            *n += 1;
            if *n as usize <= MAX_ANOMALIES_PER_KIND {
                anomalies.push(a);
            }
        }
        stats.extend(per_kind);
        Verdict {
            checker,
            valid,
            anomalies,
            stats,
        }
    }

    pub fn is_valid(&self) -> bool {
        self.valid == Validity::Valid
    }
}

fn kind_stat_name(kind: AnomalyKind) -> &'static str {
    match kind {
        AnomalyKind::NotLinearizable => "anomalies.not_linearizable",
        AnomalyKind::ReadOutOfRange => "anomalies.read_out_of_range",
        AnomalyKind::FinalReadsDiverge => "anomalies.final_reads_diverge",
        AnomalyKind::FinalValueUnreachable => "anomalies.final_value_unreachable",
        AnomalyKind::BoundViolated => "anomalies.bound_violated",
        AnomalyKind::Overdrawn => "anomalies.overdrawn",
        AnomalyKind::LostElement => "anomalies.lost_element",
        AnomalyKind::PhantomElement => "anomalies.phantom_element",
        AnomalyKind::FailedAddVisible => "anomalies.failed_add_visible",
        AnomalyKind::ResurrectedElement => "anomalies.resurrected_element",
        AnomalyKind::StaleSessionRead => "anomalies.stale_session_read",
        AnomalyKind::WatchLost => "anomalies.watch_lost",
        AnomalyKind::WatchDuplicate => "anomalies.watch_duplicate",
        AnomalyKind::WatchPhantom => "anomalies.watch_phantom",
        AnomalyKind::WatchOrder => "anomalies.watch_order",
        AnomalyKind::WatchDisagree => "anomalies.watch_disagree",
        AnomalyKind::BankWrongTotal => "anomalies.bank_wrong_total",
        AnomalyKind::BankNegative => "anomalies.bank_negative",
        AnomalyKind::BankMissingAccount => "anomalies.bank_missing_account",
        AnomalyKind::BankUnknownAccount => "anomalies.bank_unknown_account",
        AnomalyKind::LockTokenReused => "anomalies.lock_token_reused",
        AnomalyKind::LockTokenOrder => "anomalies.lock_token_order",
        AnomalyKind::LockOverlap => "anomalies.lock_overlap",
        AnomalyKind::LockStaleWrite => "anomalies.lock_stale_write",
        AnomalyKind::LockWriteOrder => "anomalies.lock_write_order",
        AnomalyKind::UndecidedLimit => "undecided.limit",
        AnomalyKind::UndecidedNoReads => "undecided.no_reads",
        AnomalyKind::UndecidedNoFinalRead => "undecided.no_final_read",
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} checker: {}", self.checker, self.valid)?;
        for (name, value) in &self.stats {
            writeln!(f, "  {name}: {value}")?;
        }
        if !self.anomalies.is_empty() {
            writeln!(f, "findings ({} shown):", self.anomalies.len())?;
            for a in &self.anomalies {
                let key = match &a.key {
                    Some(k) => format!(" key {k:?}"),
                    None => String::new(),
                };
                writeln!(f, "- [{:?}]{key}: {}", a.kind, a.explanation)?;
            }
        }
        Ok(())
    }
}

/// A checker over a whole history.
pub trait Checker {
    fn name(&self) -> &'static str;
    fn check(&self, history: &History) -> Result<Verdict, CheckError>;
}

/// Client ops grouped by key (ops without a key form the `None` group), in invocation order.
/// Every op's `f` must be one of `accepted`: a workload mixing types is a harness bug.
pub(crate) fn group_by_key<'a>(
    history: &'a History,
    checker: &'static str,
    accepted: &[F],
) -> Result<BTreeMap<Option<&'a str>, Vec<PairedOp<'a>>>, CheckError> {
    let mut groups: BTreeMap<Option<&'a str>, Vec<PairedOp<'a>>> = BTreeMap::new();
    for op in history.pairs() {
        if !accepted.contains(op.f()) {
            return Err(CheckError::UnexpectedOp {
                checker,
                index: op.index(),
                f: op.f().clone(),
            });
        }
        groups.entry(op.key()).or_default().push(op);
    }
    Ok(groups)
}

/// `op` holds `got` where the checker expected `expected`: a harness bug.
pub(crate) fn bad(op: &PairedOp<'_>, expected: &'static str, got: &Value) -> CheckError {
    CheckError::BadValue {
        index: op.index(),
        f: op.f().clone(),
        expected,
        got: got.clone(),
    }
}

pub(crate) fn int_value(
    op: &PairedOp<'_>,
    v: &Value,
    what: &'static str,
) -> Result<i64, CheckError> {
    v.as_i64().ok_or_else(|| bad(op, what, v))
}

/// `"1 add"`, `"3 adds"`.
pub(crate) fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// At most `n` items of a list for an explanation, with a count of the rest.
pub(crate) fn abbreviate<T: fmt::Display>(items: &[T], n: usize) -> String {
    let mut s: Vec<String> = items.iter().take(n).map(ToString::to_string).collect();
    if items.len() > n {
        s.push(format!("… {} more", items.len() - n));
    }
    s.join(", ")
}

/// Checker tests: append `op` as the history's next op (index and a time 10 ns apart).
#[cfg(test)]
pub(crate) fn push_numbered(history: &mut History, op: crate::history::Op) {
    let next = history.len() as u64;
    let op = crate::history::Op {
        index: next,
        time_ns: next * 10,
        ..op
    };
    history.push(op).unwrap();
}
