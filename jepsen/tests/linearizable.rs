//! The register linearizability checker on known-good and known-bad histories, plus a
//! differential test against brute-force enumeration on thousands of small random histories.

mod common;

use calm_jepsen::checker::linearizable::{LinearizableChecker, SearchLimits};
use calm_jepsen::history::{F, History, Outcome, Value};
use calm_jepsen::{AnomalyKind, Checker, Validity, Verdict};
use common::Hb;
use serde_json::json;

fn check(h: &History) -> Verdict {
    LinearizableChecker::default().check(h).expect("checkable")
}

fn assert_valid(h: &Hb) {
    let v = check(&h.build());
    assert_eq!(v.valid, Validity::Valid, "{v}");
}

fn assert_invalid(h: &Hb) -> Verdict {
    let v = check(&h.build());
    assert_eq!(v.valid, Validity::Invalid, "{v}");
    assert!(
        v.anomalies
            .iter()
            .all(|a| a.kind == AnomalyKind::NotLinearizable)
    );
    v
}

// ---- known good ----

#[test]
fn empty_history_is_valid() {
    assert_valid(&Hb::new());
}

#[test]
fn sequential_writes_and_reads() {
    let mut h = Hb::new();
    h.read(0, "x", Value::Null)
        .write(0, "x", 1)
        .read(1, "x", 1)
        .write(1, "x", 2)
        .read(0, "x", 2);
    assert_valid(&h);
}

#[test]
fn read_concurrent_with_write_may_see_old_value() {
    let mut h = Hb::new();
    h.write(0, "x", 1)
        .invoke(0, F::Write, "x", 2)
        .invoke(1, F::Read, "x", Value::Null)
        .ok(1, 1)
        .ok(0, Value::Null);
    assert_valid(&h);
}

#[test]
fn read_concurrent_with_write_may_see_new_value() {
    let mut h = Hb::new();
    h.write(0, "x", 1)
        .invoke(1, F::Read, "x", Value::Null)
        .invoke(0, F::Write, "x", 2)
        .ok(1, 2)
        .ok(0, Value::Null);
    assert_valid(&h);
}

#[test]
fn concurrent_writes_settle_on_one_value() {
    let mut h = Hb::new();
    h.invoke(0, F::Write, "x", 1)
        .invoke(1, F::Write, "x", 2)
        .ok(1, Value::Null)
        .ok(0, Value::Null)
        .read(2, "x", 1)
        .read(2, "x", 1);
    assert_valid(&h);
}

#[test]
fn cas_chain_with_a_losing_cas() {
    let mut h = Hb::new();
    h.write(0, "x", 0)
        .cas(0, "x", 0, 1)
        .cas(1, "x", 1, 2)
        .invoke(2, F::Cas, "x", json!([1, 3]))
        .fail(2) // lost: the register holds 2
        .read(0, "x", 2);
    assert_valid(&h);
}

#[test]
fn indeterminate_write_that_later_becomes_visible() {
    let mut h = Hb::new();
    h.write(0, "x", 1)
        .invoke(1, F::Write, "x", 2)
        .info(1) // timed out: process 1 is retired
        .read(0, "x", 1) // not applied yet
        .read(2, "x", 2); // applied now, long after the client gave up
    assert_valid(&h);
}

#[test]
fn indeterminate_write_that_never_takes_effect() {
    let mut h = Hb::new();
    h.write(0, "x", 1)
        .invoke(1, F::Write, "x", 2)
        .info(1)
        .read(0, "x", 1)
        .read(0, "x", 1);
    assert_valid(&h);
}

#[test]
fn invocation_pending_at_the_end_is_indeterminate() {
    let mut h = Hb::new();
    h.write(0, "x", 1)
        .invoke(1, F::Cas, "x", json!([1, 5]))
        .read(0, "x", 5);
    assert_valid(&h);
}

#[test]
fn failed_and_unacknowledged_reads_constrain_nothing() {
    let mut h = Hb::new();
    h.write(0, "x", 1)
        .invoke(1, F::Read, "x", Value::Null)
        .fail(1)
        .invoke(2, F::Read, "x", Value::Null)
        .info(2)
        .read(0, "x", 1);
    assert_valid(&h);
}

#[test]
fn delete_makes_the_register_absent() {
    let mut h = Hb::new();
    h.write(0, "x", "a")
        .read(1, "x", "a")
        .invoke(0, F::Delete, "x", Value::Null)
        .ok(0, Value::Null)
        .read(1, "x", Value::Null);
    assert_valid(&h);
}

#[test]
fn keys_are_independent() {
    // Interleaved in time, each key linearizable on its own.
    let mut h = Hb::new();
    h.invoke(0, F::Write, "x", 1)
        .invoke(1, F::Write, "y", 1)
        .ok(0, Value::Null)
        .ok(1, Value::Null)
        .read(2, "y", 1)
        .read(3, "x", 1)
        .write(0, "y", 2)
        .read(3, "y", 2);
    let v = check(&h.build());
    assert_eq!(v.valid, Validity::Valid, "{v}");
    assert_eq!(v.stats["keys"], 2);
}

#[test]
fn nemesis_ops_are_ignored() {
    let mut h = Hb::new();
    h.write(0, "x", 1)
        .nemesis("start_partition")
        .read(1, "x", 1)
        .nemesis("stop_partition");
    assert_valid(&h);
}

// ---- known bad ----

#[test]
fn stale_read_after_completed_write() {
    let mut h = Hb::new();
    h.write(0, "x", 1).write(0, "x", 2).read(1, "x", 1);
    let v = assert_invalid(&h);
    let a = &v.anomalies[0];
    assert_eq!(a.key.as_deref(), Some("x"));
    // The stale read (op 4) is the op that could not be linearized.
    assert_eq!(*a.ops.last().unwrap(), 4, "{}", a.explanation);
    assert!(a.explanation.contains("read → 1"), "{}", a.explanation);
}

#[test]
fn lost_acknowledged_write() {
    let mut h = Hb::new();
    h.write(0, "x", 5).read(1, "x", Value::Null);
    assert_invalid(&h);
}

#[test]
fn read_of_a_value_never_written() {
    let mut h = Hb::new();
    h.write(0, "x", 1).read(1, "x", 7);
    assert_invalid(&h);
}

#[test]
fn two_cas_from_the_same_value_both_succeed() {
    let mut h = Hb::new();
    h.write(0, "x", 0).cas(1, "x", 0, 1).cas(2, "x", 0, 2);
    assert_invalid(&h);
}

#[test]
fn cas_succeeds_against_the_wrong_value() {
    let mut h = Hb::new();
    h.write(0, "x", 5).cas(1, "x", 4, 6).read(0, "x", 6);
    assert_invalid(&h);
}

#[test]
fn new_value_seen_then_old_value_again() {
    // A write of 2 spans two sequential reads: once a read saw 2, no later read may see 1.
    let mut h = Hb::new();
    h.write(0, "x", 1)
        .invoke(1, F::Write, "x", 2)
        .read(2, "x", 2)
        .read(2, "x", 1)
        .ok(1, Value::Null);
    assert_invalid(&h);
}

#[test]
fn indeterminate_write_visible_then_undone() {
    let mut h = Hb::new();
    h.write(0, "x", 1)
        .invoke(1, F::Write, "x", 2)
        .info(1)
        .read(0, "x", 2)
        .read(0, "x", 1);
    assert_invalid(&h);
}

#[test]
fn only_the_bad_key_is_reported() {
    let mut h = Hb::new();
    h.write(0, "good", 1)
        .write(0, "bad", 1)
        .write(0, "bad", 2)
        .read(1, "good", 1)
        .read(1, "bad", 1);
    let v = assert_invalid(&h);
    assert_eq!(v.anomalies.len(), 1);
    assert_eq!(v.anomalies[0].key.as_deref(), Some("bad"));
    assert_eq!(v.stats["keys.linearizable"], 1);
    assert_eq!(v.stats["keys.not_linearizable"], 1);
}

// ---- limits: unknown, never valid ----

#[test]
fn exhausted_step_budget_is_unknown() {
    let mut h = Hb::new();
    for i in 0..20 {
        h.write(0, "x", i).read(1, "x", i);
    }
    let checker = LinearizableChecker {
        limits: SearchLimits {
            max_steps_per_key: 5,
            ..SearchLimits::default()
        },
        ..LinearizableChecker::default()
    };
    let v = checker.check(&h.build()).unwrap();
    assert_eq!(v.valid, Validity::Unknown, "{v}");
    assert_eq!(v.anomalies[0].kind, AnomalyKind::UndecidedLimit);
}

#[test]
fn too_many_ops_per_key_is_unknown() {
    let mut h = Hb::new();
    for i in 0..20 {
        h.write(0, "x", i);
    }
    let checker = LinearizableChecker {
        limits: SearchLimits {
            max_ops_per_key: 10,
            ..SearchLimits::default()
        },
        ..LinearizableChecker::default()
    };
    let v = checker.check(&h.build()).unwrap();
    assert_eq!(v.valid, Validity::Unknown, "{v}");
}

#[test]
fn a_violation_outranks_an_unknown_key() {
    let mut h = Hb::new();
    for i in 0..20 {
        h.write(0, "big", i);
    }
    h.write(0, "bad", 1).read(1, "bad", 2);
    let checker = LinearizableChecker {
        limits: SearchLimits {
            max_ops_per_key: 10,
            ..SearchLimits::default()
        },
        ..LinearizableChecker::default()
    };
    let v = checker.check(&h.build()).unwrap();
    assert_eq!(v.valid, Validity::Invalid, "{v}");
}

#[test]
fn exhausted_cache_budget_is_unknown() {
    let mut h = Hb::new();
    h.write(0, "x", 1).write(0, "x", 2).read(1, "x", 2);
    let checker = LinearizableChecker {
        limits: SearchLimits {
            max_cache_bytes_per_key: 0,
            ..SearchLimits::default()
        },
        ..LinearizableChecker::default()
    };
    let v = checker.check(&h.build()).unwrap();
    assert_eq!(v.valid, Validity::Unknown, "{v}");
    assert!(v.anomalies[0].explanation.contains("memo cache"), "{v}");
}

#[test]
fn exhausted_time_budget_is_unknown() {
    let checker = LinearizableChecker {
        limits: SearchLimits {
            time_limit: Some(std::time::Duration::ZERO),
            ..SearchLimits::default()
        },
        ..LinearizableChecker::default()
    };
    let v = checker.check(&many_indeterminate_writes().build()).unwrap();
    assert_eq!(v.valid, Validity::Unknown, "{v}");
    assert!(v.anomalies[0].explanation.contains("time limit"), "{v}");
}

/// Twelve indeterminate writes, then a read of a value none of them wrote: refuting it
/// means exploring every subset of the writes (the memo cache keeps that to ~12 * 2^11 states).
fn many_indeterminate_writes() -> Hb {
    let mut h = Hb::new();
    for p in 0..12 {
        h.invoke(p, F::Write, "x", p as i64).info(p);
    }
    h.read(100, "x", 99);
    h
}

#[test]
fn read_of_unwritten_value_after_many_indeterminate_writes() {
    let v = check(&many_indeterminate_writes().build());
    assert_eq!(v.valid, Validity::Invalid, "{v}");
    assert!(v.stats["search.steps"] > 4096, "{v}");
}

#[test]
fn malformed_cas_is_an_error_not_a_verdict() {
    let mut h = Hb::new();
    h.invoke(0, F::Cas, "x", 3).ok(0, Value::Null);
    assert!(LinearizableChecker::default().check(&h.build()).is_err());
}

#[test]
fn foreign_op_is_an_error_not_a_verdict() {
    let mut h = Hb::new();
    h.add(0, "x", 1);
    assert!(LinearizableChecker::default().check(&h.build()).is_err());
}

// ---- a larger valid history: many clients, a few keys ----

/// Ten clients; each op takes effect at a point inside its window (here: at invocation
/// order in a round), so the history is linearizable by construction, with heavy overlap.
fn many_clients_history() -> Hb {
    let mut h = Hb::new();
    let mut value = 0i64;
    let mut next_write = 1i64;
    for _round in 0..30 {
        let mut results = Vec::new();
        for p in 0..10u64 {
            if p % 3 == 0 {
                h.invoke(p, F::Write, "x", next_write);
                value = next_write;
                next_write += 1;
                results.push(Value::Null);
            } else {
                h.invoke(p, F::Read, "x", Value::Null);
                results.push(json!(value));
            }
        }
        for p in (0..10u64).rev() {
            h.ok(p, results[p as usize].clone());
        }
    }
    h
}

#[test]
fn simulated_linearizable_register_with_many_clients_is_valid() {
    let v = check(&many_clients_history().build());
    assert_eq!(v.valid, Validity::Valid, "{v}");
}

// ---- differential: the search agrees with brute force on small random histories ----

#[derive(Clone, Copy, Debug)]
enum Model {
    Read(Option<i64>),
    Write(Option<i64>),
    Cas(Option<i64>, Option<i64>),
}

struct Brute {
    op: Model,
    call: u64,
    ret: Option<u64>,
}

fn as_reg(v: &Value) -> Option<i64> {
    v.as_i64()
}

fn brute_force(h: &History) -> bool {
    let mut ops = Vec::new();
    for p in h.pairs() {
        let op = match (p.f(), p.outcome()) {
            (_, Outcome::Fail) => continue,
            (F::Read, Outcome::Ok) => Model::Read(as_reg(p.result())),
            (F::Read, _) => continue,
            (F::Write, _) => Model::Write(as_reg(p.arg())),
            (F::Cas, _) => {
                let a = p.arg().as_array().unwrap();
                Model::Cas(as_reg(&a[0]), as_reg(&a[1]))
            }
            _ => unreachable!(),
        };
        ops.push(Brute {
            op,
            call: p.call_ns(),
            ret: p.return_ns(),
        });
    }
    let mut used = vec![false; ops.len()];
    search(&ops, &mut used, None)
}

/// Some order of a subset (all determinate ops, any indeterminate ones) that respects real
/// time and the register: pick any unused op no unused determinate op must precede.
fn search(ops: &[Brute], used: &mut [bool], state: Option<i64>) -> bool {
    if ops
        .iter()
        .zip(used.iter())
        .all(|(o, &u)| u || o.ret.is_none())
    {
        return true;
    }
    for i in 0..ops.len() {
        if used[i] {
            continue;
        }
        // An unused op that returned before i was called must come first.
        let blocked = (0..ops.len())
            .any(|j| !used[j] && j != i && ops[j].ret.is_some_and(|r| r < ops[i].call));
        if blocked {
            continue;
        }
        let next = match ops[i].op {
            Model::Read(v) => (v == state).then_some(state),
            Model::Write(v) => Some(v),
            Model::Cas(f, t) => (f == state).then_some(t),
        };
        if let Some(s) = next {
            used[i] = true;
            let found = search(ops, used, s);
            used[i] = false;
            if found {
                return true;
            }
        }
    }
    false
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn value(&mut self) -> Value {
        match self.below(4) {
            0 => Value::Null,
            v => json!(v),
        }
    }
}

fn random_history(rng: &mut Rng) -> Hb {
    let mut h = Hb::new();
    let mut busy: Vec<Option<F>> = Vec::new(); // by process id
    let mut live: Vec<u64> = (0..3).collect();
    busy.resize(3, None);
    let mut invoked = 0;
    let max_ops = 3 + rng.below(5) as usize; // 3..=7 ops
    for _ in 0..40 {
        let slot = rng.below(live.len() as u64) as usize;
        let p = live[slot];
        match busy[p as usize].take() {
            None if invoked < max_ops => {
                invoked += 1;
                let (f, arg) = match rng.below(3) {
                    0 => (F::Read, Value::Null),
                    1 => (F::Write, json!(rng.below(3) + 1)),
                    _ => (F::Cas, json!([rng.value(), rng.below(3) + 1])),
                };
                h.invoke(p, f.clone(), "k", arg);
                busy[p as usize] = Some(f);
            }
            None => {}
            Some(f) => match rng.below(8) {
                0 => {
                    h.info(p);
                    let fresh = busy.len() as u64;
                    busy.push(None);
                    live[slot] = fresh;
                }
                1 => {
                    h.fail(p);
                }
                _ => {
                    let result = if f == F::Read {
                        rng.value()
                    } else {
                        Value::Null
                    };
                    h.ok(p, result);
                }
            },
        }
    }
    h
}

#[test]
fn agrees_with_brute_force_on_random_small_histories() {
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let (mut valid, mut invalid) = (0, 0);
    for case in 0..3000 {
        let h = random_history(&mut rng).build();
        let expected = brute_force(&h);
        let got = check(&h);
        assert_ne!(got.valid, Validity::Unknown, "case {case}");
        assert_eq!(
            got.valid == Validity::Valid,
            expected,
            "case {case}: brute force says {expected}, checker says {got}\n{:#?}",
            h.ops()
        );
        if expected {
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    // The generator must exercise both sides, or this test proves little.
    assert!(
        valid > 300 && invalid > 300,
        "valid {valid}, invalid {invalid}"
    );
}
