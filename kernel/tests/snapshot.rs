//! Raft snapshot install per group (`Replica::install_snapshot`, `KeyState::join_snapshot`).
//!
//! Random histories over every key type (counter add/set, bounded add/set/grant/transfer,
//! max raise/set, set add/remove, register put/delete/CAS, LWW in available mode) with one
//! Raft log, reordered/duplicated/partitioned gossip and rule flips. At a random point a
//! replica R installs a snapshot of a random group of keys from a replica S that applied at
//! least as much of the log. Properties:
//! - exactness: R, then brought to S's log position and to the union of both version
//!   vectors, equals (key states, vv, nothing waiting) a copy of R that got there by
//!   applying the log itself, and the outcomes S computed are the ones the log gives;
//! - no double application: facts already inside the installed keys, delivered afterwards,
//!   advance the version vector and change no key;
//! - after the install the cluster keeps running; once everything is delivered and applied,
//!   R equals the other replicas and a copy of R that never installed anything;
//! - escrow bounds and conservation hold on every replica after the install and every step.

mod sim;

use calm_kernel::state::KeyState;
use calm_kernel::{
    Bounds, Delivered, FactRef, HlcTimestamp, Mode, NodeId, Op, Replica, ReplicaError,
    VersionVector,
};
use proptest::prelude::*;
use sim::{Cluster, KEYS, NODES, STOCK};

const ALL_KEYS: [&[u8]; 5] = [KEYS[0], KEYS[1], KEYS[2], KEYS[3], STOCK];

#[derive(Clone, Debug)]
enum Step {
    Client {
        node: usize,
        key: usize,
        op: Op,
    },
    Grant {
        node: usize,
        down: i64,
        up: i64,
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
    FlipRules(Mode),
}

/// Steps with client ops on every key, or (`only`) on one key of `ALL_KEYS` so that its
/// history is dense: many commands cutting many facts.
fn step(only: Option<usize>) -> impl Strategy<Value = Step> {
    let plain: Vec<usize> = match only {
        None => (0..KEYS.len()).collect(),
        Some(k) if k < KEYS.len() => vec![k],
        Some(_) => vec![0],
    };
    let (plain_w, stock_w) = match only {
        None => (5, 3),
        Some(k) if k < KEYS.len() => (8, 0),
        Some(_) => (0, 8),
    };
    let client = (0..NODES, prop::sample::select(plain))
        .prop_flat_map(|(node, key)| sim::op_on(key).prop_map(move |(k, op)| (node, k, op)))
        .prop_map(|(node, key, op)| Step::Client { node, key, op });
    let bounded = (0..NODES, -6i64..=6, 0..7u8).prop_map(|(node, n, kind)| Step::Client {
        node,
        key: KEYS.len(),
        op: match kind {
            0 => Op::BoundedSet { value: n + 10 },
            // A new generation: quotas and spends in flight are left behind.
            6 => Op::RegisterDelete,
            _ => Op::BoundedAdd { delta: n },
        },
    });
    let escrow_w = if stock_w > 0 { 1 } else { 0 };
    prop_oneof![
        plain_w => client,
        stock_w => bounded,
        escrow_w => (0..NODES, 0i64..4, 0i64..6).prop_map(|(node, down, up)| Step::Grant { node, down, up }),
        escrow_w => (0..NODES, 0..NODES, -4i64..=4).prop_map(|(node, to, amount)| Step::Transfer { node, to, amount }),
        6 => (0..NODES, 0..NODES, 1usize..6, any::<usize>(), any::<bool>())
            .prop_map(|(from, to, count, pick, dup)| Step::Deliver { from, to, count, pick, dup }),
        3 => (0..NODES, 1usize..4).prop_map(|(node, count)| Step::Apply { node, count }),
        1 => (0..NODES, 0..NODES, any::<bool>()).prop_map(|(a, b, cut)| Step::Partition { a, b, cut }),
        1 => prop_oneof![4 => Just(Mode::Hybrid), 1 => Just(Mode::Available), 1 => Just(Mode::Strict)]
            .prop_map(Step::FlipRules),
    ]
}

fn run_step(c: &mut Cluster, s: &Step) {
    match s.clone() {
        Step::Client { node, key, op } => c.client_op(node, ALL_KEYS[key], op),
        Step::Grant { node, down, up } => c.grant(node, down, up),
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
        Step::FlipRules(mode) => c.flip_rules(mode),
    }
    for r in &c.replicas {
        sim::check_escrow(r);
    }
}

fn group(mask: u8) -> impl Fn(&[u8]) -> bool {
    move |key: &[u8]| {
        ALL_KEYS
            .iter()
            .position(|k| *k == key)
            .is_some_and(|i| mask & (1 << i) != 0)
    }
}

/// Deliver, in order, every archived fact inside `vv`.
fn deliver_up_to(c: &Cluster, replica: &mut Replica, vv: &VersionVector) {
    for ((origin, seq), encoded) in &c.archive {
        if *seq <= vv.get(*origin) {
            let (fact, _) = calm_kernel::fact::decode_fact(encoded).unwrap();
            replica.deliver(&fact).unwrap();
        }
    }
}

/// The archived fact `(origin, seq)`, if it exists.
fn archived(c: &Cluster, origin: NodeId, seq: u64) -> Option<FactRef<'_>> {
    c.archive
        .get(&(origin, seq))
        .map(|e| calm_kernel::fact::decode_fact(e).unwrap().0)
}

/// Facts already inside `replica`'s keys but beyond its version vector, delivered now,
/// only advance the version vector.
fn check_no_double_application(c: &Cluster, replica: &Replica) {
    let mut replica = replica.clone();
    for origin in 1..=NODES as NodeId {
        loop {
            let seq = replica.version_vector().get(origin) + 1;
            let Some(fact) = archived(c, origin, seq) else {
                break;
            };
            let inside = replica
                .key_state(fact.key)
                .is_some_and(|s| s.fact_seq(origin) >= seq);
            if !inside {
                break;
            }
            let before = replica.keys_matching(|_| true);
            let delivered = replica.deliver(&fact).unwrap();
            assert!(
                matches!(delivered, Delivered::Applied { .. }),
                "a fact already on its key counts as applied: {delivered:?}"
            );
            assert!(replica.version_vector().get(origin) >= seq);
            if delivered != (Delivered::Applied { unblocked: 0 }) {
                // It released waiting facts that do change keys; stop comparing here.
                break;
            }
            assert_eq!(
                replica.keys_matching(|_| true),
                before,
                "fact n{origin}:{seq} applied twice"
            );
            // Delivering it once more is a plain duplicate.
            assert_eq!(replica.deliver(&fact).unwrap(), Delivered::Duplicate);
        }
    }
}

fn assert_same(a: &Replica, b: &Replica, what: &str) {
    assert_eq!(
        a.keys_matching(|_| true),
        b.keys_matching(|_| true),
        "{what}: key states differ"
    );
    for key in ALL_KEYS {
        assert_eq!(a.read(key), b.read(key), "{what}: reads differ");
    }
    assert_eq!(
        a.version_vector(),
        b.version_vector(),
        "{what}: version vectors differ"
    );
}

fn run(mode: Mode, before: &[Step], after: &[Step], pair: (usize, usize), extra: usize, mask: u8) {
    let mut c = Cluster::new(mode);
    // The four plain keys are created by commutative ops; the escrow key by its first
    // bounded op or grant.
    let creators = [
        Op::CounterAdd { delta: 1 },
        Op::MaxRaise { value: -100 },
        Op::SetAdd {
            element: b"seed".to_vec(),
        },
        Op::RegisterPut {
            value: b"seed".to_vec(),
        },
    ];
    for (key, op) in KEYS.iter().zip(creators) {
        c.client_op(0, key, op);
    }
    for s in before {
        run_step(&mut c, s);
    }
    let (a, b) = (pair.0, (pair.0 + pair.1) % NODES);
    let (r, s) = if c.applied[a] <= c.applied[b] {
        (a, b)
    } else {
        (b, a)
    };
    c.raft_apply(s, extra);
    let in_group = group(mask);

    let shadow = c.replicas[r].clone();
    let shadow_applied = c.applied[r];
    let (r_applied, s_applied) = (c.applied[r], c.applied[s]);
    let mut union_vv = c.replicas[r].version_vector().clone();
    union_vv.merge(c.replicas[s].version_vector());
    let r_vv = c.replicas[r].version_vector().clone();

    c.install_snapshot(r, s, &in_group);
    // Only waiting facts the install released (e.g. on keys it created) move the vv.
    assert!(c.replicas[r].version_vector().dominates(&r_vv));
    for rep in &c.replicas {
        sim::check_escrow(rep);
    }
    check_no_double_application(&c, &c.replicas[r]);

    // Exactness: bring R (installed) and a copy of R from before the install to the same
    // log position and the same facts; they must be identical.
    {
        let mut installed = c.replicas[r].clone();
        let mut reference = shadow.clone();
        deliver_up_to(&c, &mut installed, &union_vv);
        deliver_up_to(&c, &mut reference, &union_vv);
        for index in r_applied..s_applied {
            let entry = &c.log[index];
            let outcome = sim::apply_entry(&mut reference, entry);
            assert_eq!(
                outcome, c.outcomes[s][index],
                "the log gives the outcomes the snapshot's source computed"
            );
            if !c.skip[r].contains_key(&index) {
                sim::apply_entry(&mut installed, entry);
            }
        }
        // Facts R held waiting may now apply or still wait (gaps): the same on both.
        assert_eq!(installed.pending_facts(), reference.pending_facts());
        assert!(reference.version_vector().dominates(&union_vv));
        assert_same(
            &installed,
            &reference,
            "installed vs applied at the same position",
        );
        sim::check_escrow(&installed);
    }

    // The cluster keeps running with R as it is now.
    for st in after {
        run_step(&mut c, st);
    }
    c.settle();
    for node in 0..NODES {
        sim::check_escrow(&c.replicas[node]);
        assert_eq!(c.states(node), c.states(0), "replica {node} diverged");
        assert_eq!(c.outcomes[node], c.outcomes[0], "replica {node}: outcomes");
        assert_eq!(
            c.replicas[node].version_vector(),
            c.replicas[0].version_vector()
        );
    }
    // And equals a copy of itself that never installed anything.
    let mut shadow = shadow;
    let all = c.replicas[r].version_vector().clone();
    deliver_up_to(&c, &mut shadow, &all);
    for entry in &c.log[shadow_applied..] {
        sim::apply_entry(&mut shadow, entry);
    }
    assert_eq!(shadow.pending_facts(), 0);
    assert_same(&c.replicas[r], &shadow, "installed vs never installed");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, max_shrink_iters: 4096, ..ProptestConfig::default() })]

    #[test]
    fn snapshot_install_equals_applying_the_log(
        before in prop::collection::vec(step(None), 0..120),
        after in prop::collection::vec(step(None), 0..60),
        pair in (0..NODES, 1..NODES),
        extra in 0usize..30,
        mask in 0u8..32,
        mode in prop_oneof![3 => Just(Mode::Hybrid), 1 => Just(Mode::Available), 1 => Just(Mode::Strict)],
    ) {
        run(mode, &before, &after, pair, extra, mask);
    }

    #[test]
    fn snapshot_install_on_dense_single_key_histories(
        (only, before, after) in (0..ALL_KEYS.len()).prop_flat_map(|only| (
            Just(only),
            prop::collection::vec(step(Some(only)), 0..150),
            prop::collection::vec(step(Some(only)), 0..40),
        )),
        pair in (0..NODES, 1..NODES),
        extra in 0usize..30,
        mode in prop_oneof![3 => Just(Mode::Hybrid), 1 => Just(Mode::Available)],
    ) {
        // The group is the dense key (plus, half the time, one other).
        let mask = (1u8 << only) | if extra % 2 == 0 { 1 << ((only + 1) % ALL_KEYS.len()) } else { 0 };
        run(mode, &before, &after, pair, extra, mask);
    }


}

// ---------------------------------------------------------------------------------------------
// Hand-written cases

fn replica(node: NodeId) -> Replica {
    Replica::new(node, sim::rules(Mode::Hybrid).compile().unwrap())
}

fn fact(origin: NodeId, seq: u64, key: &'static [u8], delta: i64) -> FactRef<'static> {
    FactRef {
        id: calm_kernel::FactId { origin, seq },
        kind: calm_kernel::FactKind::CounterAdd,
        hlc: HlcTimestamp(seq),
        arg: delta,
        peer: 0,
        generation: 0,
        key,
        payload: b"",
    }
}

fn create(r: &mut Replica, key: &[u8]) {
    let cmd = r
        .prepare_command(key, &Op::CounterSet { value: 0 }, HlcTimestamp(1))
        .unwrap();
    r.apply_command(&cmd).unwrap();
}

#[test]
fn facts_inside_a_snapshot_only_advance_the_version_vector() {
    let k: &[u8] = b"k:a";
    let other: &[u8] = b"k:b";
    let (mut r, mut s) = (replica(1), replica(2));
    let cmd = s
        .prepare_command(k, &Op::CounterSet { value: 0 }, HlcTimestamp(1))
        .unwrap();
    let cmd_other = s
        .prepare_command(other, &Op::CounterSet { value: 0 }, HlcTimestamp(1))
        .unwrap();
    for rep in [&mut r, &mut s] {
        rep.apply_command(&cmd).unwrap();
        rep.apply_command(&cmd_other).unwrap();
    }
    // Origin 3 wrote 3:1 on k, 3:2 on the other key, 3:3 on k. S has all, R only 3:1.
    let facts = [fact(3, 1, k, 5), fact(3, 2, other, 7), fact(3, 3, k, 11)];
    for f in &facts {
        s.deliver(f).unwrap();
    }
    r.deliver(&facts[0]).unwrap();
    // A snapshot of the group holding only k.
    let in_group = |key: &[u8]| key == k;
    assert_eq!(
        r.install_snapshot(s.keys_matching(in_group), in_group),
        Ok(0)
    );
    assert_eq!(r.read(k), s.read(k));
    assert_eq!(r.version_vector().get(3), 1);
    assert_eq!(r.key_state(k).unwrap().fact_seq(3), 3);
    // 3:2 is on a key outside the group: applied normally. 3:3 is already on k.
    assert_eq!(
        r.deliver(&facts[1]).unwrap(),
        Delivered::Applied { unblocked: 0 }
    );
    let before = r.key_state(k).cloned();
    assert_eq!(
        r.deliver(&facts[2]).unwrap(),
        Delivered::Applied { unblocked: 0 }
    );
    assert_eq!(r.key_state(k).cloned(), before, "3:3 applied twice");
    assert_eq!(r.version_vector().get(3), 3);
    assert_eq!(r.deliver(&facts[2]).unwrap(), Delivered::Duplicate);
    // The next fact applies normally.
    r.deliver(&fact(3, 4, k, 100)).unwrap();
    s.deliver(&fact(3, 4, k, 100)).unwrap();
    assert_eq!(r.read(k), s.read(k));
    assert_eq!(r.keys_matching(|_| true), s.keys_matching(|_| true));
}

#[test]
fn a_waiting_fact_already_inside_the_snapshot_is_released_by_the_install() {
    let k: &[u8] = b"k:a";
    let (mut r, mut s) = (replica(1), replica(2));
    create(&mut s, k);
    let cmd = s
        .prepare_command(k, &Op::CounterSet { value: 0 }, HlcTimestamp(1))
        .unwrap();
    r.apply_command(&cmd).unwrap();
    s.apply_command(&cmd).unwrap();
    for seq in 1..=2 {
        s.deliver(&fact(3, seq, k, 1)).unwrap();
    }
    // R got 3:2 but not 3:1: it waits.
    assert_eq!(r.deliver(&fact(3, 2, k, 1)).unwrap(), Delivered::Buffered);
    let in_group = |_: &[u8]| true;
    // 3:2 stays waiting (3:1 is missing from R's vv) even though k already holds it.
    assert_eq!(
        r.install_snapshot(s.keys_matching(in_group), in_group),
        Ok(0)
    );
    assert_eq!(r.pending_facts(), 1);
    assert_eq!(
        r.deliver(&fact(3, 1, k, 1)).unwrap(),
        Delivered::Applied { unblocked: 1 }
    );
    assert_eq!(r.pending_facts(), 0);
    assert_eq!(r.keys_matching(in_group), s.keys_matching(in_group));
    assert_eq!(r.version_vector(), s.version_vector());
}

#[test]
fn a_command_after_the_install_is_not_blocked_on_facts_the_key_holds() {
    let k: &[u8] = b"k:a";
    let (mut r, mut s) = (replica(1), replica(2));
    create(&mut r, k);
    create(&mut s, k);
    s.deliver(&fact(3, 1, k, 4)).unwrap();
    let in_group = |_: &[u8]| true;
    r.install_snapshot(s.keys_matching(in_group), in_group)
        .unwrap();
    let set = s
        .prepare_command(k, &Op::CounterSet { value: 10 }, HlcTimestamp(5))
        .unwrap();
    assert_eq!(set.frontier.seq_of(3), 1);
    // R's vv lacks 3:1 but its key holds it: the command applies.
    assert_eq!(r.version_vector().get(3), 0);
    r.apply_command(&set).unwrap();
    s.apply_command(&set).unwrap();
    assert_eq!(r.read(k), s.read(k));
    // A replica that has neither is blocked, and told exactly what to pull.
    let mut t = replica(3);
    create(&mut t, k);
    match t.apply_command(&set) {
        Err(ReplicaError::Blocked { missing, .. }) => assert_eq!(missing, vec![(3, 1)]),
        other => panic!("{other:?}"),
    }
    let message = t.apply_command(&set).unwrap_err().to_string();
    assert!(message.contains("n3 up to 1"), "{message}");
}

#[test]
fn a_snapshot_that_does_not_fit_is_refused_and_changes_nothing() {
    let (mut r, mut s) = (replica(1), replica(2));
    create(&mut r, b"k:a");
    create(&mut s, b"k:b");
    let before = r.keys_matching(|_| true);
    let all = |_: &[u8]| true;
    // R's k:a is missing from the snapshot.
    let err = r.install_snapshot(s.keys_matching(all), all).unwrap_err();
    assert!(matches!(err, ReplicaError::BadSnapshot { .. }), "{err}");
    assert!(err.to_string().contains("k:a"), "{err}");
    // A key outside the group.
    let only_a = |key: &[u8]| key == b"k:a";
    let err = r
        .install_snapshot(s.keys_matching(all), only_a)
        .unwrap_err();
    assert!(
        err.to_string().contains("not in the snapshot's group"),
        "{err}"
    );
    // A type that differs from the local key's.
    let wrong =
        calm_kernel::KeyRecord::new(KeyState::new(calm_kernel::ValueType::Max, None).unwrap());
    let err = r
        .install_snapshot([(b"k:a".to_vec(), wrong)], all)
        .unwrap_err();
    assert!(err.to_string().contains("max"), "{err}");
    assert_eq!(r.keys_matching(|_| true), before);
    assert_eq!(r.dirty_keys(), 1, "only the creation is dirty");
}

#[test]
fn installed_bounded_quotas_recompute_from_grants_adds_and_transfers() {
    let bounds = Bounds::new(0, 20).unwrap();
    let (mut r, mut s) = (replica(1), replica(2));
    let grant = s.prepare_grant(STOCK, 0, 10, HlcTimestamp(1)).unwrap();
    r.apply_command(&grant).unwrap();
    s.apply_command(&grant).unwrap();
    // n2 (S itself) spends its quota and gives n1 some: facts R has not seen.
    let mut out = Vec::new();
    let mut gossip = Vec::new();
    s.admit(
        STOCK,
        &Op::BoundedAdd { delta: 3 },
        HlcTimestamp(2),
        &mut out,
    )
    .unwrap();
    gossip.push(std::mem::take(&mut out));
    let a = s.prepare_grant(STOCK, 0, 5, HlcTimestamp(3)).unwrap();
    s.apply_command(&a).unwrap(); // R is one command behind
    s.transfer(STOCK, 1, -4, HlcTimestamp(4), &mut out).unwrap();
    gossip.push(std::mem::take(&mut out));
    let in_group = |key: &[u8]| key == STOCK;
    r.install_snapshot(s.keys_matching(in_group), in_group)
        .unwrap();
    sim::check_escrow(&r);
    assert_eq!(r.keys_matching(in_group), s.keys_matching(in_group));
    assert_eq!(r.escrow_view(STOCK).unwrap().up, 4);
    assert_eq!(
        r.read(STOCK),
        Some(calm_kernel::Value::Bounded { value: 3, bounds })
    );
    // R spends the transferred quota before it has seen the transfer fact itself.
    r.admit(
        STOCK,
        &Op::BoundedAdd { delta: 4 },
        HlcTimestamp(5),
        &mut out,
    )
    .unwrap();
    let spend = std::mem::take(&mut out);
    for g in &gossip {
        let (f, _) = calm_kernel::fact::decode_fact(g).unwrap();
        assert!(matches!(r.deliver(&f).unwrap(), Delivered::Applied { .. }));
    }
    let (f, _) = calm_kernel::fact::decode_fact(&spend).unwrap();
    s.deliver(&f).unwrap();
    assert_eq!(r.keys_matching(in_group), s.keys_matching(in_group));
    assert_eq!(r.version_vector(), s.version_vector());
    assert_eq!(
        r.read(STOCK),
        Some(calm_kernel::Value::Bounded { value: 7, bounds })
    );
}
