//! Deletes of every type, facts racing with them, and keys recreated with another type
//! (`state.rs`, "Deletes and generations"), on the simulated cluster.

mod sim;

use calm_kernel::{Mode, Op, Outcome, Refusal, Value};
use sim::{Cluster, KEYS, NODES, STOCK};

const COUNTER: &[u8] = KEYS[0];

fn settled_everywhere(c: &mut Cluster) {
    c.settle();
    let first = c.values(0);
    for node in 1..NODES {
        assert_eq!(c.values(node), first, "replica {node} diverged");
        assert_eq!(
            c.outcomes[node], c.outcomes[0],
            "replica {node} answered otherwise"
        );
        assert_eq!(
            c.states(node),
            c.states(0),
            "replica {node} stores another state"
        );
    }
}

fn last_outcome(c: &Cluster) -> Outcome {
    c.outcomes[0].last().cloned().expect("an entry was applied")
}

#[test]
fn a_delete_of_each_type_hides_the_key_and_says_whether_it_existed() {
    let mut c = Cluster::new(Mode::Hybrid);
    c.client_op(0, KEYS[0], Op::CounterAdd { delta: 3 });
    c.client_op(0, KEYS[1], Op::MaxRaise { value: 9 });
    c.client_op(
        0,
        KEYS[2],
        Op::SetAdd {
            element: b"a".to_vec(),
        },
    );
    c.client_op(
        0,
        KEYS[3],
        Op::RegisterPut {
            value: b"v".to_vec(),
        },
    );
    c.grant(0, 0, 0);
    c.client_op(0, STOCK, Op::BoundedAdd { delta: 4 });
    settled_everywhere(&mut c);
    for key in KEYS.iter().chain([&STOCK]) {
        assert!(c.replicas[1].read(key).is_some(), "{key:?} exists");
        c.client_op(1, key, Op::RegisterDelete);
        settled_everywhere(&mut c);
        assert_eq!(
            last_outcome(&c),
            Outcome::Deleted { existed: true },
            "{key:?}"
        );
        for node in 0..NODES {
            assert_eq!(
                c.replicas[node].read(key),
                None,
                "{key:?} on replica {node}"
            );
        }
        c.client_op(2, key, Op::RegisterDelete);
        settled_everywhere(&mut c);
        assert_eq!(
            last_outcome(&c),
            Outcome::Deleted { existed: false },
            "{key:?} again"
        );
    }
    // A key never written: nothing to delete, and nothing is created.
    c.client_op(0, b"nothing", Op::RegisterDelete);
    settled_everywhere(&mut c);
    assert_eq!(last_outcome(&c), Outcome::Deleted { existed: false });
    assert!(c.replicas[0].key_record(b"nothing").is_none());
}

#[test]
fn adds_the_delete_did_not_observe_survive_it() {
    let mut c = Cluster::new(Mode::Hybrid);
    c.client_op(0, COUNTER, Op::CounterAdd { delta: 0 });
    settled_everywhere(&mut c);
    c.client_op(0, COUNTER, Op::CounterAdd { delta: 5 });
    c.deliver(0, 2, 1, 0, false);
    // Concurrent with the delete below, which node 2 proposes having seen only the +5.
    c.client_op(1, COUNTER, Op::CounterAdd { delta: 7 });
    c.client_op(2, COUNTER, Op::RegisterDelete);
    settled_everywhere(&mut c);
    assert_eq!(last_outcome(&c), Outcome::Deleted { existed: true });
    assert_eq!(
        c.values(0)[0],
        Some(Value::Counter(7)),
        "only the racing add is left"
    );
}

#[test]
fn a_key_recreated_with_another_type_drops_the_old_types_facts_in_flight() {
    for deliver_early in [false, true] {
        let mut c = Cluster::new(Mode::Hybrid);
        c.client_op(0, COUNTER, Op::CounterAdd { delta: 1 });
        settled_everywhere(&mut c);
        // Node 1 adds, unseen by the delete and the recreation; node 2 receives it before
        // the log (deliver_early) or after it: both end the same.
        c.client_op(1, COUNTER, Op::CounterAdd { delta: 7 });
        c.client_op(0, COUNTER, Op::RegisterDelete);
        c.raft_apply(0, usize::MAX);
        c.client_op(
            0,
            COUNTER,
            Op::SetAdd {
                element: b"x".to_vec(),
            },
        );
        if deliver_early {
            c.deliver(1, 2, 1, 0, false);
        }
        c.raft_apply(2, usize::MAX);
        settled_everywhere(&mut c);
        assert_eq!(
            c.values(0)[0],
            Some(Value::Set(vec![b"x".to_vec()])),
            "deliver_early = {deliver_early}"
        );
        let record = c.replicas[2].key_record(COUNTER).unwrap();
        assert_eq!(record.generation, 1);
        // Then back to a counter: generation 2, from nothing.
        c.client_op(1, COUNTER, Op::RegisterDelete);
        c.raft_apply(1, usize::MAX);
        c.client_op(1, COUNTER, Op::CounterAdd { delta: 2 });
        settled_everywhere(&mut c);
        assert_eq!(c.values(0)[0], Some(Value::Counter(2)));
        assert_eq!(c.replicas[0].key_record(COUNTER).unwrap().generation, 2);
    }
}

#[test]
fn a_command_prepared_on_an_older_generation_is_refused_everywhere() {
    let mut c = Cluster::new(Mode::Hybrid);
    c.client_op(0, COUNTER, Op::CounterAdd { delta: 1 });
    settled_everywhere(&mut c);
    c.client_op(0, COUNTER, Op::RegisterDelete);
    c.raft_apply(0, usize::MAX);
    c.client_op(
        0,
        COUNTER,
        Op::SetAdd {
            element: b"x".to_vec(),
        },
    );
    // Node 2 has applied neither: its set is prepared on generation 0, a set of a live
    // counter would be refused as a type mismatch, but it is ordered after the recreation.
    c.client_op(2, COUNTER, Op::CounterSet { value: 9 });
    settled_everywhere(&mut c);
    assert_eq!(last_outcome(&c), Outcome::Refused(Refusal::KeyRecreated));
    assert_eq!(c.values(0)[0], Some(Value::Set(vec![b"x".to_vec()])));
}

#[test]
fn a_deleted_bounded_counter_starts_a_new_generation_and_drops_spends_in_flight() {
    let mut c = Cluster::new(Mode::Hybrid);
    c.client_op(0, STOCK, Op::BoundedAdd { delta: 10 });
    settled_everywhere(&mut c);
    c.grant(1, 5, 5);
    settled_everywhere(&mut c);
    // Node 2 spends its quota, racing the delete node 0 proposes without seeing it.
    c.client_op(1, STOCK, Op::BoundedAdd { delta: -3 });
    c.client_op(0, STOCK, Op::RegisterDelete);
    settled_everywhere(&mut c);
    assert_eq!(last_outcome(&c), Outcome::Deleted { existed: true });
    assert_eq!(c.values(0)[4], None);
    for replica in &c.replicas {
        sim::check_escrow(replica);
        let record = replica.key_record(STOCK).unwrap();
        assert_eq!(record.generation, 1);
        let calm_kernel::KeyState::Bounded(b) = &record.state else {
            panic!("still a bounded counter")
        };
        assert_eq!(b.value(), 0, "fresh: the racing spend was left behind");
        assert!(b.holders().is_empty(), "no quota survives");
    }
    // Writable again through the pool.
    c.client_op(2, STOCK, Op::BoundedAdd { delta: 2 });
    settled_everywhere(&mut c);
    assert!(matches!(
        c.values(0)[4],
        Some(Value::Bounded { value: 2, .. })
    ));
}

#[test]
fn records_with_generations_and_tombstones_survive_encoding_and_snapshots() {
    let mut c = Cluster::new(Mode::Hybrid);
    c.client_op(0, COUNTER, Op::CounterAdd { delta: 1 });
    settled_everywhere(&mut c);
    for op in [
        Op::RegisterDelete,
        Op::SetAdd {
            element: b"x".to_vec(),
        },
        Op::RegisterDelete,
    ] {
        c.client_op(0, COUNTER, op);
        c.raft_apply(0, usize::MAX);
    }
    for node in [0, 1] {
        c.raft_apply(node, usize::MAX);
    }
    let record = c.replicas[0].key_record(COUNTER).unwrap().clone();
    assert_eq!(record.generation, 1);
    assert!(record.tombstone.is_some());
    let bytes = record.encode();
    assert_eq!(bytes[0], calm_kernel::state::KEY_RECORD_FORMAT);
    assert_eq!(calm_kernel::KeyRecord::decode(&bytes).unwrap(), record);
    // Node 2, still a generation behind, installs node 1's snapshot.
    c.install_snapshot(2, 1, &|_| true);
    settled_everywhere(&mut c);
    assert_eq!(c.replicas[2].key_record(COUNTER), Some(&record));
    assert_eq!(c.values(2)[0], None);
}
