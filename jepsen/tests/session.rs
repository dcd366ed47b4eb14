//! The session checker on known-good and known-bad read-your-writes histories.

mod common;

use calm_jepsen::checker::session::SessionChecker;
use calm_jepsen::{AnomalyKind, Checker, F, Validity};
use common::Hb;
use serde_json::{Value, json};

fn check(h: &Hb) -> calm_jepsen::Verdict {
    SessionChecker
        .check(&h.build())
        .expect("a well-formed session history")
}

/// The next op's index (Hb numbers ops by position).
fn next_index(h: &Hb) -> u64 {
    h.ops().len() as u64
}

#[test]
fn register_read_with_the_token_sees_the_write() {
    let mut h = Hb::new();
    let w = next_index(&h);
    h.on("n1").write(0, "k", 1);
    h.on("n2").invoke(0, F::Read, "k", w).ok(0, 1);
    let v = check(&h);
    assert_eq!(v.valid, Validity::Valid, "{v}");
    assert_eq!(v.stats["reads_checked"], 1);
}

#[test]
fn register_read_missing_the_write_is_stale() {
    let mut h = Hb::new();
    h.on("n1").write(0, "k", 1);
    let w = next_index(&h);
    h.write(0, "k", 2);
    // Absent, and the older value: both miss write #w.
    h.on("n2").invoke(0, F::Read, "k", w).ok(0, Value::Null);
    h.on("n3").invoke(0, F::Read, "k", w).ok(0, 1);
    let v = check(&h);
    assert_eq!(v.valid, Validity::Invalid, "{v}");
    assert_eq!(v.anomalies.len(), 2);
    assert!(
        v.anomalies
            .iter()
            .all(|a| a.kind == AnomalyKind::StaleSessionRead && a.ops[0] == w)
    );
}

#[test]
fn register_read_may_see_a_later_or_concurrent_write() {
    let mut h = Hb::new();
    // p1's write is concurrent with p0's, so it may be ordered after it.
    h.invoke(1, F::Write, "k", 9);
    let w = next_index(&h);
    h.on("n1").write(0, "k", 1);
    h.ok(1, Value::Null);
    h.on("n2").invoke(0, F::Read, "k", w).ok(0, 9);
    // A write that completed before #w was invoked cannot be what the token shows.
    let mut bad = Hb::new();
    bad.write(1, "k", 9);
    let w = next_index(&bad);
    bad.on("n1").write(0, "k", 1);
    bad.on("n2").invoke(0, F::Read, "k", w).ok(0, 9);
    assert_eq!(check(&h).valid, Validity::Valid);
    assert_eq!(check(&bad).valid, Validity::Invalid);
}

#[test]
fn counter_read_covers_the_add_and_earlier_adds_at_its_node() {
    let mut h = Hb::new();
    h.on("n1").add(0, "c", 2);
    let w = next_index(&h);
    h.on("n1").add(0, "c", 3);
    h.on("n2").invoke(0, F::Read, "c", w).ok(0, 5);
    assert_eq!(check(&h).valid, Validity::Valid);
    let mut stale = Hb::new();
    stale.on("n1").add(0, "c", 2);
    let w = next_index(&stale);
    stale.on("n1").add(0, "c", 3);
    // Sees the last add but not the earlier one made at the same node: the token covers both.
    stale.on("n2").invoke(0, F::Read, "c", w).ok(0, 3);
    let v = check(&stale);
    assert_eq!(v.valid, Validity::Invalid, "{v}");
    assert_eq!(v.anomalies[0].kind, AnomalyKind::StaleSessionRead);
}

#[test]
fn counter_add_at_another_node_is_not_covered() {
    let mut h = Hb::new();
    h.on("n3").add(0, "c", 2);
    let w = next_index(&h);
    h.on("n1").add(0, "c", 3);
    h.on("n2").invoke(0, F::Read, "c", w).ok(0, 3);
    assert_eq!(check(&h).valid, Validity::Valid);
}

#[test]
fn nothing_checked_is_unknown_and_bad_citations_are_errors() {
    let mut h = Hb::new();
    h.write(0, "k", 1);
    h.invoke(0, F::Read, "k", Value::Null).ok(0, 1);
    assert_eq!(check(&h).valid, Validity::Unknown);
    let mut bad = Hb::new();
    bad.write(0, "k", 1);
    bad.invoke(0, F::Read, "k", 99).ok(0, 1);
    assert!(SessionChecker.check(&bad.build()).is_err());
    let mut failed = Hb::new();
    let w = next_index(&failed);
    failed.invoke(0, F::Write, "k", 1).fail(0);
    failed.invoke(0, F::Read, "k", w).ok(0, json!(1));
    assert!(
        SessionChecker.check(&failed.build()).is_err(),
        "citing a failed write is a harness bug"
    );
}
