//! The watch checker: every watcher sees each acknowledged write exactly once, in an order
//! the writes allow, across every reconnect.
//!
//! This module owns the watch property. The history holds writes and watch stretches:
//!
//! - `write` (a register put of a unique integer) and `set_add` (a unique integer element),
//!   each on one key, as the other workloads record them;
//! - `watch`: one stretch of one watcher's stream. A watcher is one process: it keeps its
//!   process id across reconnects (reading a stream changes nothing, so a stretch always
//!   ends `ok`), and its stretches in invocation order are everything it received. The `ok`
//!   value is `{"events": [...], "end": "why the stretch ended", "gave_up": bool}`; each event
//!   is `{"k": key, "v": ..., "o": origin, "s": seq, "g": group, "i": index}` with `v` the
//!   register value put (null for a delete) or, for a set, the array of elements the event
//!   added (the watcher's diff of the event's value and previous value). `gave_up` marks a
//!   watcher that no node could resume (OUT_OF_RANGE everywhere): its missing events are
//!   undecided, not lost.
//!
//! Findings, per watcher and key:
//!
//! - **lost**: an acknowledged write the watcher never received (the harness waits for every
//!   watcher to catch up after heal before it stops them);
//! - **duplicate**: a write received twice (across reconnects, or within one stream);
//! - **phantom**: an event no write explains, one whose every write failed, one received
//!   before its write was invoked, or a set event that added several elements;
//! - **order**: a Raft entry's index that does not increase along one key's events, an
//!   origin's fact sequence that does not increase, or (registers, whose writes are all
//!   linearizable) a write received after one that was invoked after it completed;
//! - **disagree**: one write delivered with different sources (origin and sequence, or group
//!   and index) to different watchers: nodes disagree on what the write was.
//!
//! A set event that added nothing is a fact a snapshot install had already put on its key,
//! delivered by gossip afterwards (calm journals it so every node delivers each fact once):
//! such events excuse as many missing elements of that key for that watcher.

use std::collections::{BTreeMap, HashMap};

use super::{
    Anomaly, AnomalyKind, CheckError, Checker, Stats, Verdict, abbreviate, bad, int_value,
};
use crate::history::{F, History, Outcome, PairedOp, Value};

const NAME: &str = "watch";

#[derive(Debug, Clone, Default)]
pub struct WatchChecker;

struct Write {
    index: u64,
    outcome: Outcome,
    call_ns: u64,
    /// `None`: indeterminate (it may complete at any time).
    return_ns: Option<u64>,
    register: bool,
}

/// What made an event: a fast-path fact or a Raft entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Fact { origin: u64, seq: u64 },
    Entry { group: u64, index: u64 },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Fact { origin, seq } => write!(f, "fact {origin}.{seq}"),
            Source::Entry { group, index } => write!(f, "entry {group}/{index}"),
        }
    }
}

struct Received<'a> {
    key: &'a str,
    /// The values this event stands for: the register value, or the set elements added.
    values: Vec<Option<i64>>,
    source: Source,
    recv_ns: u64,
    watch_op: u64,
}

/// One watcher's events and whether it gave up.
#[derive(Default)]
struct Watcher<'a> {
    events: Vec<Received<'a>>,
    gave_up: bool,
    stretches: usize,
}

fn u64_field(op: &PairedOp<'_>, event: &Value, field: &'static str) -> Result<u64, CheckError> {
    event
        .get(field)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(op, "an event with integer o, s, g and i", event))
}

fn parse_stretch<'a>(op: &PairedOp<'a>, into: &mut Watcher<'a>) -> Result<(), CheckError> {
    into.stretches += 1;
    // A stretch the run ended before it completed received nothing the harness recorded.
    let (Outcome::Ok, Some(recv_ns)) = (op.outcome(), op.return_ns()) else {
        return Ok(());
    };
    let result = op.result();
    if result.get("gave_up").and_then(Value::as_bool) == Some(true) {
        into.gave_up = true;
    }
    let events = result
        .get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(op, "an object with an events array", result))?;
    for event in events {
        let key = event
            .get("k")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(op, "an event with a string key k", event))?;
        let values = match event.get("v") {
            None | Some(Value::Null) => vec![None],
            Some(Value::Array(added)) => added
                .iter()
                .map(|e| int_value(op, e, "integer set elements").map(Some))
                .collect::<Result<_, _>>()?,
            Some(v) => vec![Some(int_value(op, v, "an integer register value")?)],
        };
        let (origin, seq) = (u64_field(op, event, "o")?, u64_field(op, event, "s")?);
        let (group, index) = (u64_field(op, event, "g")?, u64_field(op, event, "i")?);
        let source = match (origin, group) {
            (0, g) if g > 0 => Source::Entry { group, index },
            (o, 0) if o > 0 => Source::Fact { origin, seq },
            _ => return Err(bad(op, "an event from a fact or an entry", event)),
        };
        into.events.push(Received {
            key,
            values,
            source,
            recv_ns,
            watch_op: op.index(),
        });
    }
    Ok(())
}

fn finding(kind: AnomalyKind, key: &str, ops: Vec<u64>, explanation: String) -> Anomaly {
    Anomaly {
        kind,
        key: Some(key.to_owned()),
        ops,
        explanation,
    }
}

impl Checker for WatchChecker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, history: &History) -> Result<Verdict, CheckError> {
        let mut writes: HashMap<(&str, i64), Write> = HashMap::new();
        let mut watchers: BTreeMap<u64, Watcher<'_>> = BTreeMap::new();
        for op in history.pairs() {
            match op.f() {
                F::Write | F::SetAdd => {
                    let key = op.key().ok_or_else(|| bad(&op, "a key", op.arg()))?;
                    let value = int_value(&op, op.arg(), "a unique integer")?;
                    let write = Write {
                        index: op.index(),
                        outcome: op.outcome(),
                        call_ns: op.call_ns(),
                        return_ns: op.return_ns(),
                        register: *op.f() == F::Write,
                    };
                    if writes.insert((key, value), write).is_some() {
                        return Err(CheckError::Config {
                            checker: NAME,
                            reason: format!(
                                "key {key:?} is written the value {value} twice; the watch workload writes unique values"
                            ),
                        });
                    }
                }
                F::Watch => {
                    let crate::history::Process::Client(p) = op.process() else {
                        continue;
                    };
                    parse_stretch(&op, watchers.entry(p).or_default())?;
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
        let mut findings = Vec::new();
        let mut stats = Stats::new();
        stats.insert("watchers", watchers.len() as i64);
        stats.insert(
            "writes.ok",
            writes.values().filter(|w| w.outcome == Outcome::Ok).count() as i64,
        );
        stats.insert(
            "writes.indeterminate",
            writes
                .values()
                .filter(|w| w.outcome == Outcome::Indeterminate)
                .count() as i64,
        );
        if watchers.is_empty() {
            findings.push(Anomaly {
                kind: AnomalyKind::UndecidedNoReads,
                key: None,
                ops: Vec::new(),
                explanation: "the history has no watch stream".into(),
            });
        }
        // The source each write was delivered with, by the first watcher that received it.
        let mut sources: HashMap<(&str, i64), (Source, u64)> = HashMap::new();
        let (mut events_total, mut unchanged_total) = (0i64, 0i64);
        for (&process, watcher) in &watchers {
            let who = format!("watcher (process {process})");
            // Per key: what this watcher received, in order.
            let mut seen: HashMap<&str, HashMap<i64, u64>> = HashMap::new();
            let mut order: HashMap<&str, Vec<(i64, u64)>> = HashMap::new();
            let mut unchanged: HashMap<&str, usize> = HashMap::new();
            let mut last_index: HashMap<&str, (u64, u64)> = HashMap::new();
            let mut last_seq: HashMap<(&str, u64), u64> = HashMap::new();
            for e in &watcher.events {
                events_total += 1;
                let key = e.key;
                match e.source {
                    Source::Entry { group, index } => {
                        if let Some(&(g, i)) = last_index.get(key)
                            && (g != group || i >= index)
                        {
                            findings.push(finding(
                                AnomalyKind::WatchOrder,
                                key,
                                vec![e.watch_op],
                                format!("{who} received entry {group}/{index} after entry {g}/{i} of the same key: one key's entries come from one group, in increasing index order"),
                            ));
                        }
                        last_index.insert(key, (group, index));
                    }
                    Source::Fact { origin, seq } => {
                        if let Some(&s) = last_seq.get(&(key, origin))
                            && s >= seq
                        {
                            findings.push(finding(
                                AnomalyKind::WatchOrder,
                                key,
                                vec![e.watch_op],
                                format!("{who} received fact {origin}.{seq} after fact {origin}.{s} of the same key: each origin's facts apply in sequence order"),
                            ));
                        }
                        last_seq.insert((key, origin), seq);
                    }
                }
                if e.values.is_empty() {
                    unchanged_total += 1;
                    *unchanged.entry(key).or_default() += 1;
                    continue;
                }
                if e.values.len() > 1 {
                    findings.push(finding(
                        AnomalyKind::WatchPhantom,
                        key,
                        vec![e.watch_op],
                        format!("{who} received one event ({}) that added {} elements; each set add is its own event", e.source, e.values.len()),
                    ));
                }
                for value in &e.values {
                    let Some(value) = *value else {
                        findings.push(finding(
                            AnomalyKind::WatchPhantom,
                            key,
                            vec![e.watch_op],
                            format!(
                                "{who} received a delete ({}) that no op of the history made",
                                e.source
                            ),
                        ));
                        continue;
                    };
                    let Some(w) = writes.get(&(key, value)) else {
                        findings.push(finding(
                            AnomalyKind::WatchPhantom,
                            key,
                            vec![e.watch_op],
                            format!(
                                "{who} received value {value} ({}), which no op wrote",
                                e.source
                            ),
                        ));
                        continue;
                    };
                    if w.outcome == Outcome::Fail {
                        findings.push(finding(
                            AnomalyKind::WatchPhantom,
                            key,
                            vec![w.index, e.watch_op],
                            format!(
                                "{who} received value {value} ({}), whose write failed",
                                e.source
                            ),
                        ));
                    }
                    if w.call_ns > e.recv_ns {
                        findings.push(finding(
                            AnomalyKind::WatchPhantom,
                            key,
                            vec![w.index, e.watch_op],
                            format!(
                                "{who} received value {value} ({}) before its write was invoked",
                                e.source
                            ),
                        ));
                    }
                    if let Some(&first) = seen.entry(key).or_default().get(&value) {
                        findings.push(finding(
                            AnomalyKind::WatchDuplicate,
                            key,
                            vec![w.index, first, e.watch_op],
                            format!(
                                "{who} received value {value} twice (watch ops {first} and {}, {})",
                                e.watch_op, e.source
                            ),
                        ));
                        continue;
                    }
                    seen.entry(key).or_default().insert(value, e.watch_op);
                    order.entry(key).or_default().push((value, e.watch_op));
                    match sources.get(&(key, value)) {
                        Some(&(s, other)) if s != e.source => findings.push(finding(
                            AnomalyKind::WatchDisagree,
                            key,
                            vec![w.index, e.watch_op],
                            format!("{who} received value {value} as {}, watcher (process {other}) as {s}: nodes disagree on what the write was", e.source),
                        )),
                        Some(_) => {}
                        None => {
                            sources.insert((key, value), (e.source, process));
                        }
                    }
                }
            }
            // Registers: a write received after one invoked after it completed.
            for (&key, received) in &order {
                let mut earliest_return_after = u64::MAX;
                let mut earliest_value = None;
                for &(value, watch_op) in received.iter().rev() {
                    let w = &writes[&(key, value)];
                    if !w.register {
                        continue;
                    }
                    if earliest_return_after < w.call_ns {
                        let later = earliest_value.expect("set with the time");
                        findings.push(finding(
                            AnomalyKind::WatchOrder,
                            key,
                            vec![w.index, writes[&(key, later)].index, watch_op],
                            format!("{who} received {value} before {later}, but the write of {later} completed before the write of {value} was invoked"),
                        ));
                    }
                    if let Some(r) = w.return_ns
                        && r < earliest_return_after
                    {
                        earliest_return_after = r;
                        earliest_value = Some(value);
                    }
                }
            }
            // Lost: acknowledged writes this watcher never received.
            let mut missing: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
            for (&(key, value), w) in &writes {
                let received = seen.get(key).is_some_and(|s| s.contains_key(&value));
                if w.outcome == Outcome::Ok && !received {
                    missing.entry(key).or_default().push(value);
                }
            }
            for (key, mut values) in missing {
                values.sort_unstable();
                let excused = unchanged.get(key).copied().unwrap_or(0);
                if values.len() <= excused {
                    continue;
                }
                let ops = values.iter().map(|v| writes[&(key, *v)].index).collect();
                let list = abbreviate(&values, 8);
                if watcher.gave_up {
                    findings.push(finding(
                        AnomalyKind::UndecidedLimit,
                        key,
                        ops,
                        format!("{who} fell out of every node's change-log retention, so it cannot have received {list}"),
                    ));
                } else {
                    findings.push(finding(
                        AnomalyKind::WatchLost,
                        key,
                        ops,
                        format!("{who} never received the acknowledged {list} (in {} stretches; {excused} events that changed nothing)", watcher.stretches),
                    ));
                }
            }
        }
        stats.insert("events", events_total);
        stats.insert("events.unchanged", unchanged_total);
        Ok(Verdict::from_findings(NAME, findings, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Op, OpType, Process};
    use serde_json::json;

    struct H {
        history: History,
    }

    impl H {
        fn new() -> H {
            H {
                history: History::new(),
            }
        }

        fn push(&mut self, op: Op) {
            crate::checker::push_numbered(&mut self.history, op);
        }

        fn write(&mut self, p: u64, f: F, key: &str, v: i64, kind: OpType) {
            self.push(
                Op::new(0, 0, Process::Client(p), OpType::Invoke, f.clone())
                    .with_key(key)
                    .with_value(v),
            );
            self.push(Op::new(0, 0, Process::Client(p), kind, f).with_key(key));
        }

        fn watch(&mut self, p: u64, events: Value) {
            self.push(Op::new(0, 0, Process::Client(p), OpType::Invoke, F::Watch));
            self.push(
                Op::new(0, 0, Process::Client(p), OpType::Ok, F::Watch)
                    .with_value(json!({"events": events, "end": "stream ended"})),
            );
        }

        fn check(&self) -> Verdict {
            WatchChecker.check(&self.history).unwrap()
        }
    }

    fn reg(v: i64, index: u64) -> Value {
        json!({"k": "r", "v": v, "o": 0, "s": 0, "g": 2, "i": index})
    }

    fn add(e: i64, origin: u64, seq: u64) -> Value {
        json!({"k": "s", "v": [e], "o": origin, "s": seq, "g": 0, "i": 0})
    }

    /// Two register writes, two set adds, two watchers that saw them all (one over two
    /// stretches, as after a reconnect).
    fn good() -> H {
        let mut h = H::new();
        h.write(1, F::Write, "r", 10, OpType::Ok);
        h.write(1, F::Write, "r", 11, OpType::Ok);
        h.write(2, F::SetAdd, "s", 20, OpType::Ok);
        h.write(2, F::SetAdd, "s", 21, OpType::Ok);
        h.watch(
            100,
            json!([reg(10, 5), add(20, 1, 1), reg(11, 6), add(21, 3, 1)]),
        );
        h.watch(101, json!([reg(10, 5), add(21, 3, 1)]));
        h.watch(101, json!([add(20, 1, 1), reg(11, 6)]));
        h
    }

    #[test]
    fn every_write_once_in_order_is_valid() {
        let v = good().check();
        assert!(v.is_valid(), "{v}");
        assert_eq!(v.stats["events"], 8);
    }

    #[test]
    fn a_dropped_event_is_lost() {
        let mut h = good();
        h.watch(102, json!([reg(10, 5), add(20, 1, 1)]));
        let v = h.check();
        assert_eq!(v.valid, crate::Validity::Invalid, "{v}");
        let lost: Vec<_> = v
            .anomalies
            .iter()
            .filter(|a| a.kind == AnomalyKind::WatchLost)
            .collect();
        assert_eq!(lost.len(), 2, "{v}");
        assert!(lost.iter().any(|a| a.explanation.contains("11")), "{v}");
    }

    #[test]
    fn a_redelivery_after_reconnect_is_a_duplicate() {
        let mut h = good();
        h.watch(101, json!([add(21, 3, 1)]));
        let v = h.check();
        assert!(
            v.anomalies
                .iter()
                .any(|a| a.kind == AnomalyKind::WatchDuplicate),
            "{v}"
        );
    }

    #[test]
    fn register_events_must_follow_real_time_and_index_order() {
        let mut h = H::new();
        h.write(1, F::Write, "r", 10, OpType::Ok);
        h.write(1, F::Write, "r", 11, OpType::Ok);
        // 11 was invoked after 10 completed, yet arrives first, and with a lower index.
        h.watch(100, json!([reg(11, 5), reg(10, 6)]));
        let v = h.check();
        let kinds: Vec<_> = v.anomalies.iter().map(|a| a.kind).collect();
        assert_eq!(kinds, vec![AnomalyKind::WatchOrder], "{v}");
        let mut h = H::new();
        h.write(1, F::Write, "r", 10, OpType::Ok);
        h.write(1, F::Write, "r", 11, OpType::Ok);
        h.watch(100, json!([reg(10, 6), reg(11, 5)]));
        let v = h.check();
        assert!(
            v.anomalies[0].explanation.contains("increasing index"),
            "{v}"
        );
    }

    #[test]
    fn facts_of_one_origin_arrive_in_sequence() {
        let mut h = H::new();
        h.write(2, F::SetAdd, "s", 20, OpType::Ok);
        h.write(2, F::SetAdd, "s", 21, OpType::Ok);
        h.watch(100, json!([add(21, 1, 2), add(20, 1, 1)]));
        let v = h.check();
        assert!(v.anomalies[0].explanation.contains("sequence order"), "{v}");
    }

    #[test]
    fn phantoms_failed_writes_and_disagreeing_sources_are_found() {
        let mut h = H::new();
        h.write(1, F::Write, "r", 10, OpType::Fail);
        h.write(2, F::SetAdd, "s", 20, OpType::Info);
        h.watch(100, json!([reg(10, 5), reg(99, 6), add(20, 1, 1)]));
        h.watch(101, json!([add(20, 2, 1)]));
        let v = h.check();
        let kinds: Vec<_> = v.anomalies.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            vec![
                AnomalyKind::WatchPhantom,
                AnomalyKind::WatchPhantom,
                AnomalyKind::WatchDisagree
            ],
            "{v}"
        );
    }

    #[test]
    fn an_unchanged_event_excuses_one_missing_element_and_giving_up_is_undecided() {
        let mut h = H::new();
        h.write(2, F::SetAdd, "s", 20, OpType::Ok);
        h.watch(
            100,
            json!([{"k": "s", "v": [], "o": 1, "s": 1, "g": 0, "i": 0}]),
        );
        assert!(h.check().is_valid());
        h.push(Op::new(
            0,
            0,
            Process::Client(101),
            OpType::Invoke,
            F::Watch,
        ));
        h.push(
            Op::new(0, 0, Process::Client(101), OpType::Ok, F::Watch)
                .with_value(json!({"events": [], "gave_up": true})),
        );
        let v = h.check();
        assert_eq!(v.valid, crate::Validity::Unknown, "{v}");
    }
}
