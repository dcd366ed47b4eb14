//! The set checker on known-good and known-bad histories.

mod common;

use calm_jepsen::checker::set::SetChecker;
use calm_jepsen::history::{F, Value};
use calm_jepsen::{AnomalyKind, Checker, Validity, Verdict};
use common::Hb;
use serde_json::json;

fn check(h: &Hb) -> Verdict {
    SetChecker.check(&h.build()).expect("checkable")
}

fn add(h: &mut Hb, p: u64, e: i64) {
    h.invoke(p, F::SetAdd, "s", e).ok(p, Value::Null);
}

fn remove(h: &mut Hb, p: u64, e: i64) {
    h.invoke(p, F::SetRemove, "s", e).ok(p, Value::Null);
}

fn read(h: &mut Hb, p: u64, v: Value) {
    h.invoke(p, F::ReadSet, "s", Value::Null).ok(p, v);
}

fn finals(h: &mut Hb, v: Value) {
    h.final_read_set(100, "n1", "s", v.clone())
        .final_read_set(101, "n2", "s", v.clone())
        .final_read_set(102, "n3", "s", v);
}

fn assert_valid(h: &Hb) {
    let v = check(h);
    assert_eq!(v.valid, Validity::Valid, "{v}");
}

fn assert_invalid_with(h: &Hb, kind: AnomalyKind) -> Verdict {
    let v = check(h);
    assert_eq!(v.valid, Validity::Invalid, "{v}");
    assert!(
        v.anomalies.iter().any(|a| a.kind == kind),
        "expected {kind:?}: {v}"
    );
    v
}

// ---- known good ----

#[test]
fn every_acknowledged_add_is_in_every_final_read() {
    let mut h = Hb::new();
    for e in 1..=5 {
        add(&mut h, e as u64 % 2, e);
    }
    read(&mut h, 2, json!([1, 2])); // lagging intermediate read: fine
    finals(&mut h, json!([1, 2, 3, 4, 5]));
    let v = check(&h);
    assert_eq!(v.valid, Validity::Valid, "{v}");
    assert_eq!(v.stats["adds.ok"], 5);
    assert_eq!(v.stats["reads.final"], 3);
}

#[test]
fn indeterminate_add_may_or_may_not_be_present() {
    for fin in [json!([1]), json!([1, 2])] {
        let mut h = Hb::new();
        add(&mut h, 0, 1);
        h.invoke(1, F::SetAdd, "s", 2).info(1);
        finals(&mut h, fin);
        assert_valid(&h);
    }
}

#[test]
fn removed_element_stays_removed_and_can_be_added_again() {
    let mut h = Hb::new();
    add(&mut h, 0, 1);
    add(&mut h, 0, 2);
    remove(&mut h, 1, 1);
    remove(&mut h, 1, 2);
    add(&mut h, 0, 2);
    finals(&mut h, json!([2]));
    assert_valid(&h);
}

#[test]
fn remove_concurrent_with_add_goes_either_way() {
    for fin in [json!([]), json!([7])] {
        let mut h = Hb::new();
        h.invoke(0, F::SetAdd, "s", 7)
            .invoke(1, F::SetRemove, "s", 7)
            .ok(0, Value::Null)
            .ok(1, Value::Null);
        finals(&mut h, fin);
        assert_valid(&h);
    }
}

#[test]
fn indeterminate_remove_may_or_may_not_apply() {
    for fin in [json!([]), json!([7])] {
        let mut h = Hb::new();
        add(&mut h, 0, 7);
        h.invoke(1, F::SetRemove, "s", 7).info(1);
        finals(&mut h, fin);
        assert_valid(&h);
    }
}

#[test]
fn string_elements() {
    let mut h = Hb::new();
    h.invoke(0, F::SetAdd, "s", "a").ok(0, Value::Null);
    finals(&mut h, json!(["a"]));
    assert_valid(&h);
}

// ---- known bad ----

#[test]
fn lost_acknowledged_add() {
    let mut h = Hb::new();
    add(&mut h, 0, 1);
    add(&mut h, 0, 2);
    add(&mut h, 1, 3);
    finals(&mut h, json!([1, 2]));
    let v = assert_invalid_with(&h, AnomalyKind::LostElement);
    assert!(v.anomalies[0].explanation.contains("element 3"), "{v}");
    assert_eq!(
        v.anomalies[0].ops.len(),
        3,
        "one anomaly lists all three final reads"
    );
}

#[test]
fn phantom_element_never_added() {
    let mut h = Hb::new();
    add(&mut h, 0, 1);
    read(&mut h, 1, json!([1, 9]));
    finals(&mut h, json!([1]));
    assert_invalid_with(&h, AnomalyKind::PhantomElement);
}

#[test]
fn phantom_element_from_the_future() {
    let mut h = Hb::new();
    read(&mut h, 1, json!([4]));
    add(&mut h, 0, 4);
    finals(&mut h, json!([4]));
    assert_invalid_with(&h, AnomalyKind::PhantomElement);
}

#[test]
fn failed_add_visible() {
    let mut h = Hb::new();
    h.invoke(0, F::SetAdd, "s", 5).fail(0);
    finals(&mut h, json!([5]));
    assert_invalid_with(&h, AnomalyKind::FailedAddVisible);
}

#[test]
fn removed_element_resurrected() {
    let mut h = Hb::new();
    add(&mut h, 0, 2);
    remove(&mut h, 1, 2);
    finals(&mut h, json!([2]));
    assert_invalid_with(&h, AnomalyKind::ResurrectedElement);
}

#[test]
fn final_reads_diverge() {
    let mut h = Hb::new();
    add(&mut h, 0, 1);
    h.invoke(1, F::SetAdd, "s", 2).info(1);
    h.final_read_set(100, "n1", "s", json!([1, 2]))
        .final_read_set(101, "n2", "s", json!([1]));
    let v = assert_invalid_with(&h, AnomalyKind::FinalReadsDiverge);
    assert!(v.anomalies[0].explanation.contains("n2 lacks 2"), "{v}");
}

// ---- unknown and errors ----

#[test]
fn no_final_read_is_unknown() {
    let mut h = Hb::new();
    add(&mut h, 0, 1);
    read(&mut h, 1, json!([1]));
    let v = check(&h);
    assert_eq!(v.valid, Validity::Unknown, "{v}");
}

#[test]
fn phantom_found_even_without_final_reads() {
    let mut h = Hb::new();
    read(&mut h, 1, json!([3]));
    let v = check(&h);
    assert_eq!(v.valid, Validity::Invalid, "{v}");
}

#[test]
fn read_that_is_not_an_array_is_an_error() {
    let mut h = Hb::new();
    read(&mut h, 1, json!(3));
    assert!(SetChecker.check(&h.build()).is_err());
}
