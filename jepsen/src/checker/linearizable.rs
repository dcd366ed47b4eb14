//! Linearizability of registers, checked per key with a bounded WGL search.
//!
//! This module owns the register model (read / write / cas / delete) and the search. The
//! history is split by key first: linearizability is compositional (Herlihy & Wing's
//! locality, the "P-compositionality" Porcupine exploits), so a history is linearizable iff
//! each key's sub-history is, and small searches are exponentially cheaper than one big one.
//!
//! The search is Wing & Gong's, with Lowe's improvements, as in Porcupine and Knossos:
//! call and return entries sorted by time in a doubly linked list; repeatedly take a pending
//! call whose op is legal in the current state, "lift" it (and its return) out of the list,
//! and backtrack when a return is reached whose op was not lifted (it had to take effect
//! before returning). Lowe's memoization caches every (set of linearized ops, state) reached,
//! as a bitset plus the state, and never explores one twice.
//!
//! Why our own and not porcupine-rs 0.3.0: that crate pulls criterion, rand, regex and paste
//! in as normal dependencies, spawns one thread per key, bounds only wall-clock time (not
//! memory), and its info-collecting mode reports a timed-out search as illegal. A "not
//! linearizable" verdict must mean a real counterexample and a timeout must never pass, so
//! the search here is bounded by ops per key, steps, cache bytes and an optional deadline,
//! each yielding [`Validity::Unknown`](super::Validity::Unknown).
//!
//! Op semantics:
//! - `ok` read: constrains the state; `fail`/`info` reads say nothing and are dropped.
//! - write / cas / delete: `ok` took effect; `fail` did not (dropped; a CAS that lost is a
//!   `fail`); indeterminate ones have no return entry (return time = infinity), so they may
//!   be linearized anywhere after their call, or never.
//! - Values are compared as JSON values (ints, strings, ...); `null` is the absent register,
//!   so a write of null is a delete. Unique written values make searches much cheaper.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::time::{Duration, Instant};

use super::{Anomaly, AnomalyKind, CheckError, Checker, Stats, Verdict};
use crate::history::{F, History, Outcome, PairedOp, Value, describe};

const NAME: &str = "linearizable";

/// Bounds on the search. Each one, when hit, makes that key (and so the verdict) unknown.
#[derive(Debug, Clone)]
pub struct SearchLimits {
    /// Keys with more ops (after dropping failed ops and unacknowledged reads) are not
    /// searched. The search is exponential in concurrency, not length, but the memo cache's
    /// bitset grows with length; a few hundred ops per key is the comfortable range.
    pub max_ops_per_key: usize,
    /// Search steps (a step considers one list entry) per key.
    pub max_steps_per_key: u64,
    /// Approximate memory of the memo cache per key.
    pub max_cache_bytes_per_key: usize,
    /// Wall-clock budget for the whole check (all keys). `None` = steps and bytes only,
    /// which keeps the verdict deterministic.
    pub time_limit: Option<Duration>,
}

impl Default for SearchLimits {
    fn default() -> Self {
        SearchLimits {
            max_ops_per_key: 10_000,
            max_steps_per_key: 20_000_000,
            max_cache_bytes_per_key: 256 << 20,
            time_limit: None,
        }
    }
}

/// Checks that register ops are linearizable, per key.
#[derive(Debug, Clone)]
pub struct LinearizableChecker {
    /// The value every register holds before the first write (null = absent).
    pub initial: Value,
    pub limits: SearchLimits,
}

impl Default for LinearizableChecker {
    fn default() -> Self {
        LinearizableChecker {
            initial: Value::Null,
            limits: SearchLimits::default(),
        }
    }
}

/// The result of searching one key.
#[derive(Debug, Clone)]
pub enum KeyOutcome {
    Linearizable { steps: u64 },
    NotLinearizable(Box<Counterexample>),
    Unknown { reason: String, steps: u64 },
}

/// Why a key is not linearizable: the deepest point the search reached.
#[derive(Debug, Clone)]
pub struct Counterexample {
    /// History indices of the longest linearizable prefix found, in linearization order.
    pub prefix: Vec<u64>,
    /// The register after that prefix, as JSON text (`null` = absent).
    pub state: String,
    /// History index of the op that had to take effect next (its return was reached) but
    /// could not.
    pub blocked: u64,
    /// Human-readable account.
    pub explanation: String,
    pub steps: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegOp {
    Read(u32),
    Write(u32),
    Cas(u32, u32),
}

/// Register state: 0 = absent (null), otherwise an interned value id.
type State = u32;

fn step(state: State, op: RegOp) -> Option<State> {
    match op {
        RegOp::Read(v) => (state == v).then_some(state),
        RegOp::Write(v) => Some(v),
        RegOp::Cas(from, to) => (state == from).then_some(to),
    }
}

struct SearchOp<'a> {
    op: RegOp,
    call: u64,
    ret: Option<u64>,
    pair: PairedOp<'a>,
}

/// Interns JSON values (by canonical text) so states are small integers.
#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
    texts: Vec<String>,
}

impl Interner {
    fn id(&mut self, v: &Value) -> u32 {
        if v.is_null() {
            return 0;
        }
        let text = v.to_string();
        if let Some(&id) = self.ids.get(&text) {
            return id;
        }
        self.texts.push(text.clone());
        let id = self.texts.len() as u32;
        self.ids.insert(text, id);
        id
    }

    fn text(&self, id: u32) -> String {
        if id == 0 {
            "null (absent)".to_owned()
        } else {
            self.texts[id as usize - 1].clone()
        }
    }
}

impl Checker for LinearizableChecker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, history: &History) -> Result<Verdict, CheckError> {
        let groups = super::group_by_key(history, NAME, &[F::Read, F::Write, F::Cas, F::Delete])?;
        let deadline = self.limits.time_limit.map(|t| Instant::now() + t);
        let mut findings = Vec::new();
        let mut stats = Stats::new();
        let mut total_steps = 0i64;
        let mut max_steps = 0i64;
        let (mut ok_keys, mut bad_keys, mut unknown_keys) = (0, 0, 0);
        stats.insert("keys", groups.len() as i64);
        for (key, ops) in &groups {
            *stats.entry("ops").or_default() += ops.len() as i64;
            *stats.entry("ops.indeterminate").or_default() += ops
                .iter()
                .filter(|o| o.outcome() == Outcome::Indeterminate)
                .count() as i64;
            let outcome = check_key(ops, &self.initial, &self.limits, deadline)?;
            let steps = match &outcome {
                KeyOutcome::Linearizable { steps } | KeyOutcome::Unknown { steps, .. } => *steps,
                KeyOutcome::NotLinearizable(c) => c.steps,
            };
            total_steps += steps as i64;
            max_steps = max_steps.max(steps as i64);
            match outcome {
                KeyOutcome::Linearizable { .. } => ok_keys += 1,
                KeyOutcome::NotLinearizable(c) => {
                    bad_keys += 1;
                    let mut involved: Vec<u64> = c.prefix.iter().rev().take(8).copied().collect();
                    involved.reverse();
                    involved.push(c.blocked);
                    findings.push(Anomaly {
                        kind: AnomalyKind::NotLinearizable,
                        key: key.map(str::to_owned),
                        ops: involved,
                        explanation: c.explanation,
                    });
                }
                KeyOutcome::Unknown { reason, .. } => {
                    unknown_keys += 1;
                    findings.push(Anomaly {
                        kind: AnomalyKind::UndecidedLimit,
                        key: key.map(str::to_owned),
                        ops: Vec::new(),
                        explanation: reason,
                    });
                }
            }
        }
        stats.insert("keys.linearizable", ok_keys);
        stats.insert("keys.not_linearizable", bad_keys);
        stats.insert("keys.unknown", unknown_keys);
        stats.insert("search.steps", total_steps);
        stats.insert("search.max_steps_per_key", max_steps);
        Ok(Verdict::from_findings(NAME, findings, stats))
    }
}

/// Searches one key's ops (all of one key, in invocation order). `deadline` is absolute so
/// one budget can span many keys.
pub fn check_key(
    ops: &[PairedOp<'_>],
    initial: &Value,
    limits: &SearchLimits,
    deadline: Option<Instant>,
) -> Result<KeyOutcome, CheckError> {
    let mut values = Interner::default();
    let init = values.id(initial);
    let mut search_ops = Vec::with_capacity(ops.len());
    for pair in ops {
        let op = match (pair.f(), pair.outcome()) {
            (_, Outcome::Fail) => continue,
            (F::Read, Outcome::Ok) => RegOp::Read(values.id(pair.result())),
            (F::Read, _) => continue,
            (F::Write, _) => RegOp::Write(values.id(pair.arg())),
            (F::Delete, _) => RegOp::Write(0),
            (F::Cas, _) => match pair.arg().as_array().map(Vec::as_slice) {
                Some([from, to]) => RegOp::Cas(values.id(from), values.id(to)),
                _ => {
                    return Err(CheckError::BadValue {
                        index: pair.index(),
                        f: F::Cas,
                        expected: "[expected, new]",
                        got: pair.arg().clone(),
                    });
                }
            },
            (f, _) => {
                return Err(CheckError::UnexpectedOp {
                    checker: NAME,
                    index: pair.index(),
                    f: f.clone(),
                });
            }
        };
        search_ops.push(SearchOp {
            op,
            call: pair.call_ns(),
            ret: pair.return_ns(),
            pair: *pair,
        });
    }
    if search_ops.len() > limits.max_ops_per_key {
        return Ok(KeyOutcome::Unknown {
            reason: format!(
                "{} register ops to linearize, over the limit of {} per key; not checked",
                search_ops.len(),
                limits.max_ops_per_key
            ),
            steps: 0,
        });
    }
    Ok(Search::new(&search_ops, init).run(limits, deadline, &values))
}

const NIL: u32 = u32::MAX;

/// Zobrist-style hashes: the cache key's hash is the XOR of its ops' random words, updated
/// in O(1) per lift instead of rehashing the bitset.
fn op_hash(i: usize) -> u64 {
    // splitmix64
    let mut z = (i as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(PartialEq, Eq)]
struct CacheKey {
    hash: u64,
    state: State,
    bits: Box<[u64]>,
}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash ^ op_hash(self.state as usize).rotate_left(17));
    }
}

/// Passes the precomputed hash through.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Search<'s, 'a> {
    ops: &'s [SearchOp<'a>],
    init: State,
    /// Circular doubly linked list over entries; index `sentinel` is the head.
    next: Vec<u32>,
    prev: Vec<u32>,
    sentinel: u32,
    /// Per entry: the op, and whether it is the call (else the return).
    entry_op: Vec<u32>,
    entry_is_call: Vec<bool>,
    /// Per op: its return entry, or NIL when indeterminate.
    ret_entry: Vec<u32>,
}

impl<'s, 'a> Search<'s, 'a> {
    fn new(ops: &'s [SearchOp<'a>], init: State) -> Self {
        // (time, calls before returns at equal times so touching ops count as concurrent
        // and no false violation comes from clock granularity, op)
        let mut entries: Vec<(u64, u8, u32)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            entries.push((op.call, 0, i as u32));
            if let Some(r) = op.ret {
                entries.push((r, 1, i as u32));
            }
        }
        entries.sort_unstable();
        let m = entries.len() as u32;
        let mut ret_entry = vec![NIL; ops.len()];
        let mut entry_op = Vec::with_capacity(entries.len());
        let mut entry_is_call = Vec::with_capacity(entries.len());
        for (e, &(_, kind, i)) in entries.iter().enumerate() {
            entry_op.push(i);
            entry_is_call.push(kind == 0);
            if kind == 1 {
                ret_entry[i as usize] = e as u32;
            }
        }
        let len = m as usize + 1;
        let next = (0..len as u32).map(|e| (e + 1) % len as u32).collect();
        let prev = (0..len as u32).map(|e| (e + m) % len as u32).collect();
        Search {
            ops,
            init,
            next,
            prev,
            sentinel: m,
            entry_op,
            entry_is_call,
            ret_entry,
        }
    }

    fn unlink(&mut self, e: u32) {
        let (p, n) = (self.prev[e as usize], self.next[e as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
    }

    fn relink(&mut self, e: u32) {
        let (p, n) = (self.prev[e as usize], self.next[e as usize]);
        self.next[p as usize] = e;
        self.prev[n as usize] = e;
    }

    fn lift(&mut self, call: u32) {
        self.unlink(call);
        let ret = self.ret_entry[self.entry_op[call as usize] as usize];
        if ret != NIL {
            self.unlink(ret);
        }
    }

    /// Exact reverse of [`Search::lift`] (dancing links: relink in reverse order).
    fn unlift(&mut self, call: u32) {
        let ret = self.ret_entry[self.entry_op[call as usize] as usize];
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(call);
    }

    fn run(
        mut self,
        limits: &SearchLimits,
        deadline: Option<Instant>,
        values: &Interner,
    ) -> KeyOutcome {
        let words = self.ops.len().div_ceil(64);
        // Box + key fields + hash-table slot, roughly.
        let entry_bytes = words * 8 + 48;
        let mut bits = vec![0u64; words];
        let mut hash = 0u64;
        let mut cache: HashSet<CacheKey, BuildHasherDefault<IdentityHasher>> = HashSet::default();
        let mut stack: Vec<(u32, State)> = Vec::new();
        let mut state = self.init;
        let mut steps: u64 = 0;
        // Deepest dead end: (prefix of call entries, state, blocked op).
        let mut deepest: Option<(Vec<u32>, State, u32)> = None;
        let mut entry = self.next[self.sentinel as usize];
        loop {
            if entry == self.sentinel {
                // Every return was passed: all remaining entries are calls of indeterminate
                // ops, which may simply never take effect.
                return KeyOutcome::Linearizable { steps };
            }
            steps += 1;
            if steps > limits.max_steps_per_key {
                return self.unknown(
                    format!(
                        "search stopped after {} steps (the limit)",
                        limits.max_steps_per_key
                    ),
                    steps,
                );
            }
            if steps.is_multiple_of(1024)
                && let Some(d) = deadline
                && Instant::now() > d
            {
                return self.unknown("the time limit of the check ran out".to_owned(), steps);
            }
            if cache.len().saturating_mul(entry_bytes) > limits.max_cache_bytes_per_key {
                return self.unknown(
                    format!(
                        "the memo cache reached its limit of {} MiB ({} states)",
                        limits.max_cache_bytes_per_key >> 20,
                        cache.len()
                    ),
                    steps,
                );
            }
            let e = entry as usize;
            if self.entry_is_call[e] {
                let i = self.entry_op[e] as usize;
                if let Some(new_state) = step(state, self.ops[i].op) {
                    bits[i / 64] |= 1 << (i % 64);
                    hash ^= op_hash(i);
                    let key = CacheKey {
                        hash,
                        state: new_state,
                        bits: bits.clone().into_boxed_slice(),
                    };
                    if cache.insert(key) {
                        stack.push((entry, state));
                        state = new_state;
                        self.lift(entry);
                        entry = self.next[self.sentinel as usize];
                        continue;
                    }
                    bits[i / 64] &= !(1 << (i % 64));
                    hash ^= op_hash(i);
                }
                entry = self.next[e];
            } else {
                if deepest.as_ref().is_none_or(|d| stack.len() > d.0.len()) {
                    let prefix = stack.iter().map(|&(c, _)| c).collect();
                    deepest = Some((prefix, state, self.entry_op[e]));
                }
                let Some((call, prev_state)) = stack.pop() else {
                    let (prefix, dead_state, blocked) =
                        deepest.expect("a dead end was just recorded");
                    return KeyOutcome::NotLinearizable(Box::new(
                        self.counterexample(&prefix, dead_state, blocked, values, steps),
                    ));
                };
                let i = self.entry_op[call as usize] as usize;
                bits[i / 64] &= !(1 << (i % 64));
                hash ^= op_hash(i);
                state = prev_state;
                self.unlift(call);
                entry = self.next[call as usize];
            }
        }
    }

    fn unknown(&self, why: String, steps: u64) -> KeyOutcome {
        KeyOutcome::Unknown {
            reason: format!(
                "{why}, with {} ops to linearize; no verdict (fewer concurrent clients or ops \
                 per key make the search cheaper)",
                self.ops.len()
            ),
            steps,
        }
    }

    fn counterexample(
        &self,
        prefix_calls: &[u32],
        state: State,
        blocked: u32,
        values: &Interner,
        steps: u64,
    ) -> Counterexample {
        const SHOWN: usize = 8;
        let prefix: Vec<&SearchOp<'_>> = prefix_calls
            .iter()
            .map(|&c| &self.ops[self.entry_op[c as usize] as usize])
            .collect();
        let blocked_op = &self.ops[blocked as usize];
        let mut text = format!("no linearization of its {} ops exists. ", self.ops.len());
        if prefix.is_empty() {
            text.push_str(&format!(
                "From the initial state {}, ",
                values.text(self.init)
            ));
        } else {
            let skipped = prefix.len().saturating_sub(SHOWN);
            let shown: Vec<String> = prefix[skipped..]
                .iter()
                .map(|o| describe(&o.pair))
                .collect();
            text.push_str(&format!(
                "The longest linearizable prefix has {} ops{}: {}; it leaves the register at {}. \
                 Then ",
                prefix.len(),
                if skipped > 0 {
                    format!(" (last {SHOWN} shown)")
                } else {
                    String::new()
                },
                shown.join("; "),
                values.text(state)
            ));
        }
        text.push_str(&format!(
            "{} must take effect before it completes, but it is not legal there, and no other \
             order of the ops concurrent with it makes it legal.",
            describe(&blocked_op.pair)
        ));
        Counterexample {
            prefix: prefix.iter().map(|o| o.pair.index()).collect(),
            state: values.text(state),
            blocked: blocked_op.pair.index(),
            explanation: text,
            steps,
        }
    }
}
