//! Transactions on the simulated cluster: comparisons read what the proposer observed, the
//! chosen branch applies all or nothing, and every replica agrees.

mod sim;

use calm_kernel::refusal::Refusal;
use calm_kernel::txn::TestKind;
use calm_kernel::{Cmp, Mode, Op, Outcome, Test, Value, ValueType};
use sim::{Cluster, KEYS, NODES, STOCK};

const COUNTER: &[u8] = KEYS[0];
const REG: &[u8] = KEYS[3];

fn apply_all(c: &mut Cluster) {
    for n in 0..NODES {
        c.raft_apply(n, usize::MAX);
    }
}

fn last_outcomes(c: &Cluster) -> Vec<Outcome> {
    (0..NODES)
        .map(|n| c.outcomes[n].last().cloned().expect("applied"))
        .collect()
}

#[test]
fn a_counter_test_reads_what_the_proposer_observed_on_every_replica() {
    let mut c = Cluster::new(Mode::Hybrid);
    c.client_op(0, COUNTER, Op::CounterAdd { delta: 0 });
    apply_all(&mut c);
    // Node 1 adds 5 and node 2 learns of it; node 2 adds 7 and proposes with 12 observed.
    c.client_op(0, COUNTER, Op::CounterAdd { delta: 5 });
    c.deliver(0, 1, 1, 0, false);
    c.client_op(1, COUNTER, Op::CounterAdd { delta: 7 });
    c.client_txn(
        1,
        &[(COUNTER, Test::Counter { min: 12, max: 12 })],
        &[(
            REG,
            Op::RegisterPut {
                value: b"yes".to_vec(),
            },
        )],
        &[(
            REG,
            Op::RegisterPut {
                value: b"no".to_vec(),
            },
        )],
    );
    // Node 3 adds 100, which node 1 applies before the transaction (it then holds 105 and
    // must pull the 7); node 3 itself holds 100 and neither of the others.
    c.client_op(2, COUNTER, Op::CounterAdd { delta: 100 });
    c.deliver(2, 0, 1, 0, false);
    apply_all(&mut c);
    assert_eq!(last_outcomes(&c), vec![Outcome::Done; NODES]);
    c.settle();
    for n in 0..NODES {
        assert!(matches!(
            c.replicas[n].read(REG),
            Some(Value::Register { value: Some(v), .. }) if v == b"yes"
        ));
        assert_eq!(c.replicas[n].read(COUNTER), Some(Value::Counter(112)));
    }
}

#[test]
fn a_refused_op_leaves_nothing_of_its_branch() {
    let mut c = Cluster::new(Mode::Strict);
    c.client_op(
        0,
        REG,
        Op::RegisterPut {
            value: b"a".to_vec(),
        },
    );
    c.client_op(0, STOCK, Op::BoundedAdd { delta: 3 });
    apply_all(&mut c);
    // The register is written first, then the bounded add leaves the bounds [0, 20].
    c.client_txn(
        2,
        &[(REG, Test::Exists(true))],
        &[
            (
                REG,
                Op::RegisterPut {
                    value: b"b".to_vec(),
                },
            ),
            (STOCK, Op::BoundedAdd { delta: 30 }),
        ],
        &[],
    );
    apply_all(&mut c);
    for outcome in last_outcomes(&c) {
        assert!(
            matches!(outcome, Outcome::Refused(Refusal::EscrowExhausted { .. })),
            "{outcome:?}"
        );
    }
    for n in 0..NODES {
        assert!(matches!(
            c.replicas[n].read(REG),
            Some(Value::Register { value: Some(v), version: 1, .. }) if v == b"a"
        ));
    }
}

#[test]
fn tests_on_a_missing_key_are_false_except_absence_and_version_zero() {
    let mut c = Cluster::new(Mode::Hybrid);
    let cases = [
        (Test::Exists(false), true),
        (Test::Exists(true), false),
        (Test::Version(Cmp::Equal, 0), true),
        (Test::Value(Cmp::Equal, b"x".to_vec()), false),
        // etcd's rule, kept: a value test on a missing key is false whatever the operator.
        (Test::Value(Cmp::NotEqual, b"x".to_vec()), false),
        (Test::Type(ValueType::Register), false),
        (Test::Counter { min: 0, max: 0 }, false),
    ];
    for (test, holds) in cases {
        c.client_txn(0, &[(b"missing", test.clone())], &[], &[]);
        apply_all(&mut c);
        let want = if holds {
            Outcome::Done
        } else {
            Outcome::CasFailed
        };
        assert_eq!(last_outcomes(&c), vec![want; NODES], "{test:?}");
    }
}

#[test]
fn a_test_of_the_wrong_type_is_refused_everywhere() {
    let mut c = Cluster::new(Mode::Hybrid);
    c.client_op(0, COUNTER, Op::CounterAdd { delta: 1 });
    c.client_op(0, COUNTER, Op::CounterAdd { delta: 0 });
    apply_all(&mut c);
    c.client_txn(
        0,
        &[(COUNTER, Test::Version(Cmp::Equal, 1))],
        &[(
            REG,
            Op::RegisterPut {
                value: b"x".to_vec(),
            },
        )],
        &[],
    );
    apply_all(&mut c);
    let refused = Outcome::Refused(Refusal::CompareMismatch {
        key_type: ValueType::Counter,
        test: TestKind::Version,
    });
    assert_eq!(last_outcomes(&c), vec![refused; NODES]);
    assert_eq!(c.replicas[0].read(REG), None);
}

#[test]
fn a_register_value_and_version_swap_in_one_step() {
    let mut c = Cluster::new(Mode::Hybrid);
    c.client_op(
        0,
        REG,
        Op::RegisterPut {
            value: b"1".to_vec(),
        },
    );
    apply_all(&mut c);
    let cas_like = |c: &mut Cluster, expect: &[u8], next: &[u8]| {
        c.client_txn(
            1,
            &[
                (REG, Test::Value(Cmp::Equal, expect.to_vec())),
                (REG, Test::Version(Cmp::Less, 10)),
            ],
            &[
                (
                    REG,
                    Op::RegisterPut {
                        value: next.to_vec(),
                    },
                ),
                (COUNTER, Op::CounterAdd { delta: 1 }),
            ],
            &[(COUNTER, Op::CounterAdd { delta: 100 })],
        );
    };
    cas_like(&mut c, b"1", b"2");
    // Proposed before the first applied, yet evaluated after it: fails, runs the failure branch.
    cas_like(&mut c, b"1", b"3");
    apply_all(&mut c);
    c.settle();
    for n in 0..NODES {
        assert!(matches!(
            c.replicas[n].read(REG),
            Some(Value::Register { value: Some(v), version: 2, .. }) if v == b"2"
        ));
        // Counter ops in a transaction are Raft-ordered (the key is created by the first).
        assert_eq!(c.replicas[n].read(COUNTER), Some(Value::Counter(101)));
    }
}
