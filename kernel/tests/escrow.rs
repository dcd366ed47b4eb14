//! The escrow invariant of bounded counters (Balegas et al., 2015; DESIGN.md section 5).
//!
//! Random schedules of increments and decrements at every node, pool grants and Raft-ordered
//! adds and sets, transfers between nodes, partitions, reordered and duplicated gossip.
//! Properties, checked after *every* step on *every* replica and again after healing:
//! - no replica ever holds a value outside `[min, max]`;
//! - rights are conserved: `value - min = pool_down + Σ quota_down` and
//!   `max - value = pool_up + Σ quota_up`, with nothing negative (no quota created or lost);
//! - after healing all replicas agree, and (without sets) the value is exactly the start plus
//!   every acknowledged add: none lost, none applied twice.

mod sim;

use calm_kernel::{Mode, Op, Outcome, Value};
use proptest::prelude::*;
use sim::{Ack, Cluster, NODES, STOCK, STOCK_BOUNDS};

#[derive(Clone, Debug)]
enum Step {
    Grant {
        node: usize,
        down: i64,
        up: i64,
    },
    Add {
        node: usize,
        delta: i64,
    },
    Set {
        node: usize,
        value: i64,
    },
    Transfer {
        node: usize,
        to: usize,
        amount: i64,
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
}

fn step(with_sets: bool) -> impl Strategy<Value = Step> {
    let sets = if with_sets { 1 } else { 0 };
    prop_oneof![
        2 => (0..NODES, 0i64..4, 0i64..6).prop_map(|(node, down, up)| Step::Grant { node, down, up }),
        6 => (0..NODES, -6i64..=6).prop_map(|(node, delta)| Step::Add { node, delta }),
        sets => (0..NODES, -2i64..=22).prop_map(|(node, value)| Step::Set { node, value }),
        2 => (0..NODES, 0..NODES, -4i64..=4).prop_map(|(node, to, amount)| Step::Transfer { node, to, amount }),
        5 => (0..NODES, 0..NODES, 1usize..5, any::<usize>(), any::<bool>())
            .prop_map(|(from, to, count, pick, dup)| Step::Deliver { from, to, count, pick, dup }),
        3 => (0..NODES, 1usize..4).prop_map(|(node, count)| Step::Apply { node, count }),
        1 => (0..NODES, 0..NODES, any::<bool>()).prop_map(|(a, b, cut)| Step::Partition { a, b, cut }),
    ]
}

fn check_replica(c: &Cluster, node: usize) {
    sim::check_escrow(&c.replicas[node]);
}

fn run(mode: Mode, steps: &[Step]) -> Cluster {
    let mut c = Cluster::new(mode);
    for s in steps {
        match *s {
            Step::Grant { node, down, up } => c.grant(node, down, up),
            Step::Add { node, delta } => c.client_op(node, STOCK, Op::BoundedAdd { delta }),
            Step::Set { node, value } => c.client_op(node, STOCK, Op::BoundedSet { value }),
            Step::Transfer { node, to, amount } => c.transfer(node, to, amount),
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
        }
        for node in 0..NODES {
            check_replica(&c, node);
        }
    }
    c.settle();
    for node in 0..NODES {
        check_replica(&c, node);
        assert_eq!(c.values(node), c.values(0), "replica {node} diverged");
        assert_eq!(
            c.outcomes[node], c.outcomes[0],
            "replica {node} computed other outcomes"
        );
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2048, ..ProptestConfig::default() })]

    #[test]
    fn bounds_hold_and_rights_are_conserved(
        steps in prop::collection::vec(step(true), 0..150),
    ) {
        run(Mode::Hybrid, &steps);
    }

    #[test]
    fn every_acknowledged_add_counts_exactly_once(
        steps in prop::collection::vec(step(false), 0..150),
    ) {
        let c = run(Mode::Hybrid, &steps);
        // The start value (0, the point of [0, 20] closest to 0) plus every add that was
        // acknowledged: fast-path facts, and logged adds whose outcome was Done.
        let mut expected = 0i64;
        for ack in &c.acks {
            match ack {
                Ack::Fact { op: Op::BoundedAdd { delta }, .. } => expected += delta,
                Ack::Logged { index } => {
                    if let Some(calm_kernel::CommandBody::BoundedAdd { delta, .. }) = c.log[*index].command().map(|c| &c.body) {
                        // Find the outcome of this entry (every replica agrees).
                        if c.outcomes[0][*index] == Outcome::Done {
                            expected += delta;
                        }
                    }
                }
                _ => {}
            }
        }
        let got = c.replicas[0].read(STOCK);
        if let Some(Value::Bounded { value, .. }) = got {
            prop_assert_eq!(value, expected);
        } else {
            prop_assert_eq!(expected, 0, "adds acknowledged on a key that does not exist");
        }
    }
}

#[test]
fn a_partitioned_node_spends_only_its_quota() {
    let mut c = Cluster::new(Mode::Available);
    c.grant(0, 0, 10);
    for n in 0..NODES {
        c.raft_apply(n, 1);
    }
    // Node 0 holds all 10 increment rights; cut it off and let it use them.
    for b in 1..NODES {
        c.cut[0][b] = true;
        c.cut[b][0] = true;
    }
    c.client_op(0, STOCK, Op::BoundedAdd { delta: 10 });
    c.client_op(0, STOCK, Op::BoundedAdd { delta: 1 }); // beyond quota: refused in available
    c.client_op(1, STOCK, Op::BoundedAdd { delta: 1 }); // node 1 holds nothing
    assert_eq!(c.acks[1..], [Ack::Refused, Ack::Refused]);
    c.settle();
    for node in 0..NODES {
        assert_eq!(
            c.replicas[node].read(STOCK),
            Some(Value::Bounded {
                value: 10,
                bounds: STOCK_BOUNDS
            })
        );
    }
}
