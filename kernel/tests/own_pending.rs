//! A node's own facts re-applied by recovery may wait (an escrow spend waits for the Raft
//! grant that funded it). Until they apply, the next own sequence number is taken, so the
//! fast path must refuse (UNAVAILABLE) rather than issue a second fact with the same id.

use calm_kernel::rules::RuleSet;
use calm_kernel::{
    Admitted, FactId, FactKind, FactRef, HlcTimestamp, Mode, Op, Refusal, Replica, StatusCode,
};

fn add(seq: u64, key: &'static [u8]) -> FactRef<'static> {
    FactRef {
        id: FactId { origin: 1, seq },
        kind: FactKind::CounterAdd,
        hlc: HlcTimestamp(seq),
        arg: 1,
        peer: 0,
        generation: 0,
        key,
        payload: b"",
    }
}

#[test]
fn admission_waits_while_own_facts_are_pending() {
    let key: &[u8] = b"hits";
    let mut r = Replica::new(1, RuleSet::new(Mode::Hybrid).compile().unwrap());
    let create = r
        .prepare_command(key, &Op::CounterSet { value: 0 }, HlcTimestamp(1))
        .unwrap();
    r.apply_command(&create).unwrap();
    // Replay brings own fact 2 before own fact 1 (as when 1 waits for its funding).
    r.deliver(&add(2, key)).unwrap();
    assert_eq!(r.own_pending_facts(), 1);
    let mut out = Vec::new();
    let refused = r
        .admit(key, &Op::CounterAdd { delta: 1 }, HlcTimestamp(9), &mut out)
        .unwrap_err();
    assert_eq!(refused.refusal, Refusal::OwnFactsPending { waiting: 1 });
    assert_eq!(refused.refusal.status(), StatusCode::Unavailable);
    assert!(out.is_empty(), "nothing was encoded");
    assert!(
        r.transfer(key, 2, 1, HlcTimestamp(9), &mut out).is_err(),
        "transfers wait too"
    );
    // Ops that go through Raft are not affected.
    assert!(matches!(
        r.admit(key, &Op::CounterSet { value: 3 }, HlcTimestamp(9), &mut out),
        Ok(Admitted::Consensus(_))
    ));
    // Once the gap fills, the next fact takes a fresh sequence.
    r.deliver(&add(1, key)).unwrap();
    assert_eq!(r.own_pending_facts(), 0);
    match r.admit(
        key,
        &Op::CounterAdd { delta: 1 },
        HlcTimestamp(10),
        &mut out,
    ) {
        Ok(Admitted::Local { id, .. }) => assert_eq!(id, FactId { origin: 1, seq: 3 }),
        other => panic!("{other:?}"),
    }
}

/// Recovery may replay more facts than the pending buffer holds before Raft re-creates
/// their keys. Own facts among them must all stay: had one been dropped, the node would
/// have issued its sequence number again for another fact once the others applied, while
/// peers kept the first (found by Jepsen: counters that never converged).
#[test]
fn a_full_buffer_never_drops_own_facts() {
    let key: &[u8] = b"hits";
    let mut r =
        Replica::new(1, RuleSet::new(Mode::Hybrid).compile().unwrap()).with_pending_facts_max(2);
    let foreign = |seq: u64| FactRef {
        id: FactId { origin: 2, seq },
        ..add(seq, key)
    };
    // The key does not exist yet: everything waits.
    r.deliver(&foreign(1)).unwrap();
    r.deliver(&foreign(2)).unwrap();
    for seq in 1..=3 {
        r.deliver(&add(seq, key)).unwrap();
    }
    assert_eq!(r.own_pending_facts(), 3, "no own fact dropped");
    let create = r
        .prepare_command(key, &Op::CounterSet { value: 0 }, HlcTimestamp(1))
        .unwrap();
    r.apply_command(&create).unwrap();
    assert_eq!(r.own_pending_facts(), 0);
    assert_eq!(r.version_vector().get(1), 3);
    let mut out = Vec::new();
    match r.admit(
        key,
        &Op::CounterAdd { delta: 1 },
        HlcTimestamp(10),
        &mut out,
    ) {
        Ok(Admitted::Local { id, .. }) => assert_eq!(id, FactId { origin: 1, seq: 4 }),
        other => panic!("{other:?}"),
    }
}
