//! Convergence and observed-reset determinism, under any delivery order with duplicates.
//!
//! Each case runs a random schedule of client ops at random nodes, partial gossip deliveries
//! (reordered, duplicated, partitioned) and replicas applying the Raft log at their own pace.
//! Then everything heals. Properties:
//! - every replica holds the same value for every key (strong eventual consistency);
//! - every replica computed the same outcome for every log entry (determinism of the ordered
//!   path, whatever facts each had when it applied);
//! - with only commutative ops, values equal the sequential reference (sum, max, union):
//!   no acknowledged fact lost or applied twice.

mod sim;

use calm_kernel::{Cmp, Mode, Op, Test, Value, ValueType};
use proptest::prelude::*;
use sim::{Ack, Cluster, KEYS, NODES};

#[derive(Clone, Debug)]
enum Step {
    Client {
        node: usize,
        key: usize,
        op: Op,
    },
    Deliver {
        from: usize,
        to: usize,
        count: usize,
        pick: usize,
        dup: bool,
    },
    Apply {
        node: usize,
        count: usize,
    },
    Partition {
        a: usize,
        b: usize,
        cut: bool,
    },
    /// Operators switch every key to this mode (a Raft-ordered rules change).
    FlipRules(Mode),
    /// A lease entry, or a put attaching a key to a lease (see `lease_step`).
    Lease(LeaseStep),
    /// A transaction: one comparison, two ops on distinct keys if it holds, one op if not.
    Txn {
        node: usize,
        compare: (usize, Test),
        success: [(usize, Op); 2],
        failure: (usize, Op),
    },
}

/// Every kind of test, on any key (a test of the wrong type is refused everywhere alike).
fn test() -> impl Strategy<Value = Test> {
    let cmp = prop_oneof![
        Just(Cmp::Equal),
        Just(Cmp::NotEqual),
        Just(Cmp::Less),
        Just(Cmp::Greater)
    ];
    prop_oneof![
        any::<bool>().prop_map(Test::Exists),
        Just(Test::Type(ValueType::Counter)),
        (cmp.clone(), 0u64..4).prop_map(|(c, v)| Test::Version(c, v)),
        (cmp, 0u8..4).prop_map(|(c, v)| Test::Value(c, vec![v])),
        (-8i64..8, 0i64..8).prop_map(|(min, span)| Test::Counter {
            min,
            max: min + span
        }),
    ]
}

#[derive(Clone, Debug)]
enum LeaseStep {
    Grant {
        key: usize,
        ttl_ms: u64,
    },
    Put {
        node: usize,
        key: usize,
        pick: u64,
    },
    Renew {
        picks: Vec<u64>,
    },
    Revoke {
        pick: u64,
    },
    /// A tick claiming `elapsed_ms`; `new_term`: the first of a new leader; `fenced`: its
    /// claimed term is not its entry's (a stalled leader's).
    Tick {
        elapsed_ms: u64,
        new_term: bool,
        fenced: bool,
    },
}

/// One of the first few lease ids the sim's group grants (or one never granted).
fn lease_id(pick: u64) -> calm_kernel::LeaseId {
    (sim::LEASE_GROUP << 48) | (1 + pick % 3)
}

/// The register key (only registers attach) most of the time, any key sometimes.
fn register_mostly() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(3usize), 1 => 0..KEYS.len()]
}

fn lease_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (register_mostly(), 1u64..8_000).prop_map(|(key, ttl_ms)| LeaseStep::Grant { key, ttl_ms }),
        3 => (0..NODES, register_mostly(), any::<u64>())
            .prop_map(|(node, key, pick)| LeaseStep::Put { node, key, pick }),
        1 => prop::collection::vec(any::<u64>(), 1..4).prop_map(|picks| LeaseStep::Renew { picks }),
        1 => any::<u64>().prop_map(|pick| LeaseStep::Revoke { pick }),
        2 => (0u64..1_500, prop::bool::weighted(0.2), prop::bool::weighted(0.1))
            .prop_map(|(elapsed_ms, new_term, fenced)| LeaseStep::Tick { elapsed_ms, new_term, fenced }),
    ]
    .prop_map(Step::Lease)
}

fn txn_step() -> impl Strategy<Value = Step> {
    (
        0..NODES,
        0..KEYS.len(),
        test(),
        0..KEYS.len(),
        1..KEYS.len(),
    )
        .prop_flat_map(|(node, compared, test, a, offset)| {
            let b = (a + offset) % KEYS.len();
            (sim::op_on(a), sim::op_on(b), sim::op_on(compared)).prop_map(
                move |(op_a, op_b, op_f)| Step::Txn {
                    node,
                    compare: (compared, test.clone()),
                    success: [op_a, op_b],
                    failure: op_f,
                },
            )
        })
}

fn step(commutative_only: bool) -> impl Strategy<Value = Step> {
    let flips = if commutative_only { 0 } else { 1 };
    let client = (0..NODES, 0..KEYS.len())
        .prop_flat_map(move |(node, key)| {
            // The sequential reference knows nothing of deletes or recreations.
            let ops = if commutative_only {
                sim::typed_op_on(key)
            } else {
                sim::op_on(key)
            };
            ops.prop_map(move |(k, op)| (node, k, op))
        })
        .prop_filter_map("commutative only", move |(node, key, op)| {
            (!commutative_only || op.kind().commutes()).then_some(Step::Client { node, key, op })
        });
    prop_oneof![
        5 => client,
        4 => (0..NODES, 0..NODES, 1usize..6, any::<usize>(), any::<bool>())
            .prop_map(|(from, to, count, pick, dup)| Step::Deliver { from, to, count, pick, dup }),
        2 => (0..NODES, 1usize..4).prop_map(|(node, count)| Step::Apply { node, count }),
        1 => (0..NODES, 0..NODES, any::<bool>()).prop_map(|(a, b, cut)| Step::Partition { a, b, cut }),
        flips => prop_oneof![Just(Mode::Available), Just(Mode::Hybrid), Just(Mode::Strict)]
            .prop_map(Step::FlipRules),
        flips => txn_step(),
        flips * 2 => lease_step(),
    ]
}

fn run(mode: Mode, steps: &[Step]) -> Cluster {
    let mut c = Cluster::new(mode);
    let mut term = 1;
    // Every key is created through Raft first (its type is fixed in Raft order); the creating
    // op is an ordinary commutative op, so the references below still hold.
    for (i, key) in KEYS.iter().enumerate() {
        let op = match i {
            0 => Op::CounterAdd { delta: 0 },
            1 => Op::MaxRaise { value: -100 },
            2 => Op::SetAdd {
                element: b"seed".to_vec(),
            },
            _ => Op::RegisterPut {
                value: b"seed".to_vec(),
            },
        };
        c.client_op(0, key, op);
    }
    for node in 0..NODES {
        c.raft_apply(node, KEYS.len());
    }
    for s in steps {
        match s.clone() {
            Step::Client { node, key, op } => c.client_op(node, KEYS[key], op),
            Step::Deliver {
                from,
                to,
                count,
                pick,
                dup,
            } => c.deliver(from, to, count, pick, dup),
            Step::Apply { node, count } => c.raft_apply(node, count),
            Step::Partition { a, b, cut } => {
                c.cut[a][b] = cut;
                c.cut[b][a] = cut;
            }
            Step::FlipRules(mode) => c.flip_rules(mode),
            Step::Lease(l) => {
                use calm_kernel::LeaseCommand;
                match l {
                    LeaseStep::Grant { key, ttl_ms } => c.lease(
                        LeaseCommand::Grant {
                            subject: KEYS[key].to_vec(),
                            ttl_ms,
                        },
                        term,
                    ),
                    LeaseStep::Put { node, key, pick } => {
                        c.leased_put(node, KEYS[key], b"leased", lease_id(pick))
                    }
                    LeaseStep::Renew { picks } => c.lease(
                        LeaseCommand::Renew {
                            ids: picks.into_iter().map(lease_id).collect(),
                        },
                        term,
                    ),
                    LeaseStep::Revoke { pick } => {
                        c.lease(LeaseCommand::Revoke { id: lease_id(pick) }, term)
                    }
                    LeaseStep::Tick {
                        elapsed_ms,
                        new_term,
                        fenced,
                    } => {
                        term += u64::from(new_term);
                        let claimed = if fenced { term - 1 } else { term };
                        c.log.push(sim::Entry::Lease {
                            cmd: LeaseCommand::Tick {
                                term: claimed,
                                elapsed_ms,
                                extend_ms: 800,
                            },
                            term,
                        });
                    }
                }
            }
            Step::Txn {
                node,
                compare: (k, test),
                success,
                failure,
            } => {
                let [(a, op_a), (b, op_b)] = success;
                c.client_txn(
                    node,
                    &[(KEYS[k], test)],
                    &[(KEYS[a], op_a), (KEYS[b], op_b)],
                    &[(KEYS[failure.0], failure.1)],
                );
            }
        }
    }
    c.settle();
    c
}

fn assert_converged(c: &Cluster) {
    let first = c.values(0);
    for node in 1..NODES {
        assert_eq!(
            c.values(node),
            first,
            "replica {node} diverged from replica 0"
        );
        assert_eq!(
            c.outcomes[node], c.outcomes[0],
            "replica {node} computed other outcomes for the log"
        );
        assert_eq!(
            c.replicas[node].version_vector(),
            c.replicas[0].version_vector()
        );
        assert_eq!(
            c.replicas[node].leases().group(sim::LEASE_GROUP),
            c.replicas[0].leases().group(sim::LEASE_GROUP),
            "replica {node} holds other leases"
        );
        // Every attached key is attached to the lease that names it, and exists: a write
        // or delete ordered after the attach detaches it, and an expiry deletes it. (With
        // `available` mode in the run, a register's last-writer-wins delete fact may hide
        // an attached key: facts are not ordered with the attach.)
        for lease in c.replicas[node].leases().all() {
            for key in &lease.keys {
                assert_eq!(c.replicas[node].leases().lease_of(key), Some(lease.id));
                assert!(
                    c.ever_available || c.replicas[node].read(key).is_some(),
                    "an attached key is deleted"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2048, ..ProptestConfig::default() })]

    #[test]
    fn commutative_ops_converge_to_the_sequential_result(
        steps in prop::collection::vec(step(true), 0..120),
        mode in prop_oneof![Just(Mode::Hybrid), Just(Mode::Available), Just(Mode::Strict)],
    ) {
        let c = run(mode, &steps);
        assert_converged(&c);
        // Reference: sum of acknowledged adds, max of raises, union of adds.
        let mut sum = 0i64;
        let mut max = -100i64;
        let mut set = std::collections::BTreeSet::from([b"seed".to_vec()]);
        for s in &steps {
            if let Step::Client { op, .. } = s {
                match op {
                    Op::CounterAdd { delta } => sum += delta,
                    Op::MaxRaise { value } => max = max.max(*value),
                    Op::SetAdd { element } => { set.insert(element.clone()); }
                    _ => unreachable!(),
                }
            }
        }
        prop_assert!(c.acks.iter().all(|a| *a != Ack::Refused));
        let values = c.values(0);
        prop_assert_eq!(values[0].clone(), Some(Value::Counter(sum)));
        prop_assert_eq!(values[1].clone(), Some(Value::Max(Some(max))));
        prop_assert_eq!(values[2].clone(), Some(Value::Set(set.into_iter().collect())));
    }

    #[test]
    fn observed_reset_is_deterministic(
        steps in prop::collection::vec(step(false), 0..150),
        mode in prop_oneof![Just(Mode::Hybrid), Just(Mode::Strict)],
    ) {
        let c = run(mode, &steps);
        assert_converged(&c);
    }

    #[test]
    fn rule_flips_under_load_keep_replicas_deterministic(
        steps in prop::collection::vec(step(false), 0..150),
        mode in prop_oneof![Just(Mode::Hybrid), Just(Mode::Available), Just(Mode::Strict)],
    ) {
        // Same schedules as above, starting from each mode; flips are part of `step`.
        let c = run(mode, &steps);
        assert_converged(&c);
    }

    #[test]
    fn available_mode_registers_converge_last_writer_wins(
        steps in prop::collection::vec(step(false), 0..150),
    ) {
        // In available mode CAS and sets are refused, puts are LWW facts.
        let c = run(Mode::Available, &steps);
        assert_converged(&c);
    }
}

#[test]
fn a_counter_set_keeps_concurrent_adds_on_top_everywhere() {
    let mut c = Cluster::new(Mode::Hybrid);
    c.client_op(0, KEYS[0], Op::CounterAdd { delta: 0 });
    for n in 0..NODES {
        c.raft_apply(n, 1);
    }
    c.client_op(0, KEYS[0], Op::CounterAdd { delta: 5 });
    c.client_op(1, KEYS[0], Op::CounterAdd { delta: 7 }); // concurrent with the set below
    c.deliver(0, 2, 1, 0, false);
    c.client_op(2, KEYS[0], Op::CounterSet { value: 100 }); // node 2 observed only the +5
    c.settle();
    assert_converged(&c);
    assert_eq!(c.values(0)[0], Some(Value::Counter(107)));
}

#[test]
fn a_command_absorbs_the_last_writer_wins_value_it_observed() {
    use calm_kernel::{CasExpect, Outcome};
    let reg = KEYS[3];
    let mut c = Cluster::new(Mode::Available);
    c.client_op(
        0,
        reg,
        Op::RegisterPut {
            value: b"seed".to_vec(),
        },
    );
    for n in 0..NODES {
        c.raft_apply(n, 1);
    }
    c.client_op(
        1,
        reg,
        Op::RegisterPut {
            value: b"x".to_vec(),
        },
    ); // LWW fact
    c.flip_rules(Mode::Hybrid);
    c.settle();
    let seen = |c: &Cluster| match c.replicas[2].read(reg) {
        Some(Value::Register { value, .. }) => value,
        other => panic!("{other:?}"),
    };
    assert_eq!(seen(&c), Some(b"x".to_vec()));
    // A failing CAS changes nothing: the observed LWW value stays.
    c.client_op(
        2,
        reg,
        Op::RegisterCas {
            expect: CasExpect::Version(99),
            value: None,
        },
    );
    c.settle();
    assert_eq!(c.outcomes[0].last(), Some(&Outcome::CasFailed));
    assert_eq!(seen(&c), Some(b"x".to_vec()));
    // And CAS compares with it.
    c.client_op(
        0,
        reg,
        Op::RegisterCas {
            expect: CasExpect::Value(Some(b"x".to_vec())),
            value: Some(b"y".to_vec()),
        },
    );
    c.settle();
    assert_eq!(c.outcomes[0].last(), Some(&Outcome::Done));
    assert_converged(&c);
    assert_eq!(seen(&c), Some(b"y".to_vec()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 2048, ..ProptestConfig::default() })]

    /// What the node persists (dirty keys' encoded state plus the version vector) rebuilds a
    /// replica that keeps converging: encode/decode is lossless and restore is complete.
    #[test]
    fn persisted_state_restores_an_equal_replica(
        steps in prop::collection::vec(step(false), 0..100),
    ) {
        let mut c = run(Mode::Hybrid, &steps);
        let mut stored = std::collections::BTreeMap::new();
        c.replicas[1].take_dirty(|key, state| {
            stored.insert(key.to_vec(), state.encode());
        });
        prop_assert_eq!(c.replicas[1].dirty_keys(), 0);
        let restored = calm_kernel::Replica::restore(
            2,
            c.rules.compile().unwrap(),
            c.replicas[1].version_vector().clone(),
            stored.iter().map(|(k, v)| (k.clone(), calm_kernel::KeyRecord::decode(v).unwrap())),
        );
        for key in KEYS {
            prop_assert_eq!(restored.read(key), c.replicas[1].read(key));
            prop_assert_eq!(restored.key_state(key), c.replicas[1].key_state(key));
        }
        // Encoding is deterministic: equal states, equal bytes (replicas compare digests).
        let mut again = std::collections::BTreeMap::new();
        c.replicas[0].take_dirty(|key, state| {
            again.insert(key.to_vec(), state.encode());
        });
        prop_assert_eq!(again, stored);
    }
}
