//! Counter and bounded-counter (escrow) checkers on known-good and known-bad histories.

mod common;

use calm_jepsen::checker::bounded::BoundedChecker;
use calm_jepsen::checker::counter::{CounterChecker, ReadBound, SubsetSumLimits};
use calm_jepsen::history::{F, Value};
use calm_jepsen::{AnomalyKind, Checker, Validity, Verdict};
use common::Hb;

fn counter(h: &Hb) -> Verdict {
    CounterChecker::default()
        .check(&h.build())
        .expect("checkable")
}

fn kinds(v: &Verdict) -> Vec<AnomalyKind> {
    v.anomalies.iter().map(|a| a.kind).collect()
}

fn assert_valid(v: &Verdict) {
    assert_eq!(v.valid, Validity::Valid, "{v}");
}

fn assert_invalid_with(v: &Verdict, kind: AnomalyKind) {
    assert_eq!(v.valid, Validity::Invalid, "{v}");
    assert!(kinds(v).contains(&kind), "expected {kind:?}: {v}");
}

/// Three final reads, one per node, all returning `value`.
fn finals(h: &mut Hb, key: &str, value: i64) {
    h.final_read(100, "n1", key, value)
        .final_read(101, "n2", key, value)
        .final_read(102, "n3", key, value);
}

// ---- counter: known good ----

#[test]
fn acknowledged_adds_all_visible_at_the_end() {
    let mut h = Hb::new();
    h.add(0, "c", 1).add(1, "c", 2).add(2, "c", 3);
    finals(&mut h, "c", 6);
    let v = counter(&h);
    assert_valid(&v);
    assert_eq!(v.stats["adds.ok"], 3);
    assert_eq!(v.stats["reads.final"], 3);
}

#[test]
fn any_subset_of_indeterminate_adds_may_apply() {
    for final_value in [3, 8, 13, 18] {
        let mut h = Hb::new();
        h.add(0, "c", 1)
            .add(0, "c", 2)
            .invoke(1, F::Add, "c", 5)
            .info(1)
            .invoke(2, F::Add, "c", 10)
            .info(2);
        finals(&mut h, "c", final_value);
        assert_valid(&counter(&h));
    }
}

#[test]
fn negative_deltas_and_pending_adds() {
    let mut h = Hb::new();
    h.add(0, "c", 5)
        .add(0, "c", -2)
        .invoke(1, F::Add, "c", -1)
        .info(1);
    finals(&mut h, "c", 2);
    h.invoke(3, F::Add, "c", 4); // still pending when the run ended: indeterminate
    let v = counter(&h);
    assert_valid(&v);
}

#[test]
fn definitely_failed_adds_are_not_counted() {
    let mut h = Hb::new();
    h.add(0, "c", 1).invoke(1, F::Add, "c", 100).fail(1);
    finals(&mut h, "c", 1);
    assert_valid(&counter(&h));
}

#[test]
fn lagging_intermediate_read_is_fine_for_fast_path_counters() {
    let mut h = Hb::new();
    h.add(0, "c", 1)
        .add(0, "c", 1)
        .read(1, "c", 0)
        .read(1, "c", 1);
    finals(&mut h, "c", 2);
    assert_valid(&counter(&h));
}

#[test]
fn read_concurrent_with_an_add_may_include_it() {
    let mut h = Hb::new();
    h.invoke(0, F::Add, "c", 5)
        .invoke(1, F::Read, "c", Value::Null)
        .ok(1, 5)
        .ok(0, Value::Null);
    finals(&mut h, "c", 5);
    let v = CounterChecker {
        reads: ReadBound::Linearizable,
        ..CounterChecker::default()
    }
    .check(&h.build())
    .unwrap();
    assert_valid(&v);
}

#[test]
fn keys_are_checked_separately() {
    let mut h = Hb::new();
    h.add(0, "a", 1).add(0, "b", 10);
    finals(&mut h, "a", 1);
    finals(&mut h, "b", 10);
    assert_valid(&counter(&h));
}

// ---- counter: known bad ----

#[test]
fn lost_acknowledged_add() {
    let mut h = Hb::new();
    h.add(0, "c", 1).add(1, "c", 2).add(2, "c", 3);
    finals(&mut h, "c", 3);
    let v = counter(&h);
    assert_invalid_with(&v, AnomalyKind::FinalValueUnreachable);
    assert!(v.anomalies[0].explanation.contains("lost"), "{v}");
}

#[test]
fn failed_add_that_applied() {
    let mut h = Hb::new();
    h.add(0, "c", 1).invoke(1, F::Add, "c", 100).fail(1);
    finals(&mut h, "c", 101);
    assert_invalid_with(&counter(&h), AnomalyKind::FinalValueUnreachable);
}

#[test]
fn add_applied_twice() {
    let mut h = Hb::new();
    h.add(0, "c", 1).add(0, "c", 1);
    finals(&mut h, "c", 3);
    assert_invalid_with(&counter(&h), AnomalyKind::FinalValueUnreachable);
}

#[test]
fn acknowledged_add_applied_twice_among_indeterminate_ones() {
    // 1 + {0, 5} can be 1 or 6; 2 is in range but means the acknowledged +1 applied twice
    // (a retried op without deduplication).
    let mut h = Hb::new();
    h.add(0, "c", 1).invoke(1, F::Add, "c", 5).info(1);
    finals(&mut h, "c", 2);
    assert_invalid_with(&counter(&h), AnomalyKind::FinalValueUnreachable);
}

#[test]
fn in_range_but_no_subset_of_indeterminate_adds_sums_to_it() {
    let mut h = Hb::new();
    h.add(0, "c", 1)
        .invoke(1, F::Add, "c", 5)
        .info(1)
        .invoke(2, F::Add, "c", 10)
        .info(2);
    finals(&mut h, "c", 8); // 1 + {0, 5, 10, 15}: 8 is inside [1, 16] but unreachable
    let v = counter(&h);
    assert_invalid_with(&v, AnomalyKind::FinalValueUnreachable);
    assert!(v.anomalies[0].explanation.contains("no subset"), "{v}");
}

#[test]
fn final_reads_diverge() {
    let mut h = Hb::new();
    h.add(0, "c", 1)
        .invoke(1, F::Add, "c", 1)
        .info(1)
        .final_read(100, "n1", "c", 1)
        .final_read(101, "n2", "c", 2);
    let v = counter(&h);
    assert_invalid_with(&v, AnomalyKind::FinalReadsDiverge);
    assert_eq!(
        kinds(&v),
        vec![AnomalyKind::FinalReadsDiverge],
        "both values reachable: {v}"
    );
}

#[test]
fn read_higher_than_every_attempted_add() {
    let mut h = Hb::new();
    h.add(0, "c", 1).read(1, "c", 7);
    finals(&mut h, "c", 1);
    assert_invalid_with(&counter(&h), AnomalyKind::ReadOutOfRange);
}

#[test]
fn read_sees_an_add_from_the_future() {
    let mut h = Hb::new();
    h.read(1, "c", 1).add(0, "c", 1);
    finals(&mut h, "c", 1);
    assert_invalid_with(&counter(&h), AnomalyKind::ReadOutOfRange);
}

#[test]
fn stale_read_violates_linearizable_counters_only() {
    let mut h = Hb::new();
    h.add(0, "c", 1).read(1, "c", 0);
    finals(&mut h, "c", 1);
    assert_valid(&counter(&h));
    let strict = CounterChecker {
        reads: ReadBound::Linearizable,
        ..CounterChecker::default()
    };
    assert_invalid_with(
        &strict.check(&h.build()).unwrap(),
        AnomalyKind::ReadOutOfRange,
    );
}

// ---- counter: unknown ----

#[test]
fn no_final_read_is_unknown() {
    let mut h = Hb::new();
    h.add(0, "c", 1).read(1, "c", 1);
    let v = counter(&h);
    assert_eq!(v.valid, Validity::Unknown, "{v}");
    assert_eq!(kinds(&v), vec![AnomalyKind::UndecidedNoFinalRead]);
}

#[test]
fn subset_sum_beyond_limits_is_unknown_not_valid() {
    let mut h = Hb::new();
    h.invoke(1, F::Add, "c", 1000)
        .info(1)
        .invoke(2, F::Add, "c", 2000)
        .info(2);
    finals(&mut h, "c", 1000);
    let checker = CounterChecker {
        limits: SubsetSumLimits {
            max_range_bits: 64,
            ..SubsetSumLimits::default()
        },
        ..CounterChecker::default()
    };
    let v = checker.check(&h.build()).unwrap();
    assert_eq!(v.valid, Validity::Unknown, "{v}");
    // Out of range is still decided without the subset test.
    let mut h2 = Hb::new();
    h2.invoke(1, F::Add, "c", 1000)
        .info(1)
        .invoke(2, F::Add, "c", 2000)
        .info(2);
    finals(&mut h2, "c", 5000);
    assert_eq!(checker.check(&h2.build()).unwrap().valid, Validity::Invalid);
}

#[test]
fn non_integer_read_is_an_error() {
    let mut h = Hb::new();
    h.read(0, "c", "five");
    assert!(CounterChecker::default().check(&h.build()).is_err());
}

// ---- bounded counter (escrow) ----

fn escrow(h: &Hb) -> Verdict {
    BoundedChecker::new(0, 10, 10)
        .check(&h.build())
        .expect("checkable")
}

#[test]
fn escrow_refuses_what_it_cannot_cover() {
    let mut h = Hb::new();
    h.add(0, "b", -3)
        .add(1, "b", -3)
        .read(2, "b", 4)
        .add(0, "b", -3)
        .invoke(1, F::Add, "b", -3)
        .fail(1) // RESOURCE_EXHAUSTED: only 1 left
        .invoke(2, F::Add, "b", -1)
        .info(2);
    finals(&mut h, "b", 1); // the indeterminate -1 did not apply
    assert_valid(&escrow(&h));
}

#[test]
fn escrow_increments_and_indeterminate_spends() {
    let mut h = Hb::new();
    h.add(0, "b", -8)
        .add(1, "b", 5)
        .invoke(2, F::Add, "b", -7)
        .info(2);
    finals(&mut h, "b", 0); // 10 - 8 + 5 - 7
    assert_valid(&escrow(&h));
}

#[test]
fn escrow_read_below_the_lower_bound() {
    let mut h = Hb::new();
    h.add(0, "b", -6)
        .invoke(1, F::Add, "b", -6)
        .info(1)
        .read(2, "b", -2);
    finals(&mut h, "b", 4);
    let v = escrow(&h);
    assert_invalid_with(&v, AnomalyKind::BoundViolated);
}

#[test]
fn escrow_overdraft_detected_without_any_read() {
    let mut h = Hb::new();
    h.add(0, "b", -6).add(1, "b", -6); // both acknowledged: 10 - 12 < 0
    let v = escrow(&h);
    assert_invalid_with(&v, AnomalyKind::Overdrawn);
}

#[test]
fn escrow_refused_spend_that_applied() {
    let mut h = Hb::new();
    h.add(0, "b", -6).invoke(1, F::Add, "b", -3).fail(1);
    finals(&mut h, "b", 1);
    assert_invalid_with(&escrow(&h), AnomalyKind::FinalValueUnreachable);
}

#[test]
fn escrow_lost_acknowledged_spend() {
    let mut h = Hb::new();
    h.add(0, "b", -6).add(0, "b", -1);
    finals(&mut h, "b", 4);
    assert_invalid_with(&escrow(&h), AnomalyKind::FinalValueUnreachable);
}

#[test]
fn escrow_upper_bound() {
    let mut h = Hb::new();
    h.add(0, "b", -5).add(1, "b", 3).read(2, "b", 11);
    finals(&mut h, "b", 8);
    assert_invalid_with(&escrow(&h), AnomalyKind::BoundViolated);
}

#[test]
fn escrow_initial_outside_bounds_is_a_config_error() {
    let h = Hb::new();
    assert!(BoundedChecker::new(0, 10, 11).check(&h.build()).is_err());
}
