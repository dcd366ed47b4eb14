//! Facts waiting in the replica when the store is written survive a restart.
//!
//! A persist writes the store at a WAL position past every fact accepted so far, applied or
//! not; replay starts there. Facts still waiting (for an earlier fact of their origin, their
//! key's creation or escrow rights) are only in the store's archive then, and recovery must
//! deliver them again from it. Jepsen finding 9: it did not, so a node restarted twice
//! forgot its own unfunded escrow spends; a Raft entry that observed them waited forever,
//! and admission would have issued their sequence numbers again.

use calm_kernel::fact::{FactKind, FactRef};
use calm_kernel::rules::{Rule, RuleSet};
use calm_kernel::{Bounds, FactId, HlcTimestamp, Mode, NodeId, Op, Value};
use calm_raft::local::{LocalOptions, LocalState};
use std::path::Path;

const STOCK: &[u8] = b"stock:1";

fn open(dir: &Path, node: NodeId) -> LocalState {
    let rules = RuleSet {
        version: 1,
        rules: vec![Rule::new("stock:*", Mode::Hybrid).bounded(Bounds::new(0, 100).unwrap())],
        default_mode: Mode::Hybrid,
    }
    .compile()
    .unwrap();
    let (state, _) =
        LocalState::open(dir, node, rules, LocalOptions::default()).expect("recovery succeeds");
    state
}

fn encoded(fact: &FactRef<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    fact.encode_into(&mut out).unwrap();
    out
}

fn add_fact(origin: NodeId, seq: u64, key: &'static [u8], delta: i64) -> FactRef<'static> {
    FactRef {
        id: FactId { origin, seq },
        kind: FactKind::CounterAdd,
        hlc: HlcTimestamp(seq),
        arg: delta,
        peer: 0,
        generation: 0,
        key,
        payload: b"",
    }
}

#[test]
fn a_peer_fact_waiting_for_an_earlier_one_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut state = open(dir.path(), 1);
        let replica = state.replica_mut();
        let create = replica
            .prepare_command(b"hits", &Op::CounterAdd { delta: 0 }, HlcTimestamp(1))
            .unwrap();
        replica.apply_command(&create).unwrap();
        // n2's second fact arrives first and waits for its first.
        let report = state
            .deliver(&encoded(&add_fact(2, 2, b"hits", 5)))
            .unwrap();
        assert_eq!(report.buffered, 1);
        report.durable.unwrap().wait().unwrap();
        state.persist_durable().unwrap();
    }
    let mut state = open(dir.path(), 1);
    assert_eq!(
        state.replica().pending_facts(),
        1,
        "still waiting after the restart"
    );
    state
        .deliver(&encoded(&add_fact(2, 1, b"hits", 1)))
        .unwrap();
    assert_eq!(state.replica().version_vector().get(2), 2);
    assert_eq!(state.replica().read(b"hits"), Some(Value::Counter(6)));
}

#[test]
fn an_own_spend_waiting_for_its_grant_survives_a_second_restart() {
    let dir = tempfile::tempdir().unwrap();
    let late_grant;
    {
        let mut state = open(dir.path(), 1);
        let replica = state.replica_mut();
        let first = replica.prepare_grant(STOCK, 0, 2, HlcTimestamp(1)).unwrap();
        replica.apply_command(&first).unwrap();
        // The store covers the first grant only; the second is re-applied by the group.
        state.persist_durable().unwrap();
        let replica = state.replica_mut();
        late_grant = replica.prepare_grant(STOCK, 0, 3, HlcTimestamp(2)).unwrap();
        replica.apply_command(&late_grant).unwrap();
        let spend = state
            .admit(STOCK, &Op::BoundedAdd { delta: 4 }, HlcTimestamp(3))
            .unwrap()
            .expect("funded by both grants");
        spend.durable.unwrap().wait().unwrap();
        // kill -9: nothing more is persisted.
    }
    {
        // Replay finds the spend before the group re-applied its grant: it waits, and the
        // node's persist loop writes the store meanwhile.
        let mut state = open(dir.path(), 1);
        assert_eq!(state.replica().own_pending_facts(), 1);
        state.persist_durable().unwrap();
    }
    let mut state = open(dir.path(), 1);
    assert_eq!(
        state.replica().own_pending_facts(),
        1,
        "the own spend is remembered, so its sequence number is not issued again"
    );
    assert_eq!(state.replica().version_vector().get(1), 0);
    state.replica_mut().apply_command(&late_grant).unwrap();
    assert_eq!(state.replica().version_vector().get(1), 1);
    assert_eq!(
        state.replica().read(STOCK),
        Some(Value::Bounded {
            value: 4,
            bounds: Bounds::new(0, 100).unwrap()
        })
    );
}
