//! Admission on a warm key: classify + apply + encode of one commutative fact; and the
//! apply of one Raft-ordered command on a warm key.
//!
//! This is the whole per-op cost of the kernel on the fast path; the node adds the WAL append
//! and the RPC. Target on the reference machine (2 cores): <= 100 ns, no heap allocation
//! (the allocation part is asserted by `tests/no_alloc.rs`, not here).

use calm_kernel::rules::{Rule, RuleSet};
use calm_kernel::{Admitted, Bounds, CommandBody, HlcTimestamp, Mode, Op, Replica};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn replica_with_rules() -> Replica {
    let mut rules = RuleSet::new(Mode::Hybrid);
    // A realistic rule list, so resolution is not trivially the default.
    rules.rules = vec![
        Rule::new("session:*", Mode::Available),
        Rule::new("account:*", Mode::Strict),
        Rule::new("stock:*", Mode::Hybrid).bounded(Bounds::new(0, 1 << 40).unwrap()),
    ];
    Replica::new(1, rules.compile().unwrap())
}

fn warm(replica: &mut Replica, key: &[u8], op: &Op) {
    let hlc = HlcTimestamp(1);
    let cmd = replica.prepare_command(key, op, hlc).unwrap();
    replica.apply_command(&cmd).unwrap();
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission");

    let mut replica = replica_with_rules();
    let key = b"counter:0000042";
    warm(&mut replica, key, &Op::CounterAdd { delta: 1 });
    let op = Op::CounterAdd { delta: 1 };
    let mut out = Vec::with_capacity(1 << 16);
    let mut hlc = 2u64;
    group.bench_function("counter_add_warm_key", |b| {
        b.iter(|| {
            out.clear();
            hlc += 1;
            let admitted = replica
                .admit(black_box(key), black_box(&op), HlcTimestamp(hlc), &mut out)
                .unwrap();
            debug_assert!(matches!(admitted, Admitted::Local { .. }));
            black_box(admitted)
        })
    });

    let mut replica = replica_with_rules();
    let key = b"stock:000000042";
    let cmd = replica
        .prepare_grant(key, 0, 1 << 39, HlcTimestamp(1))
        .unwrap();
    assert!(matches!(cmd.body, CommandBody::EscrowGrant { .. }));
    replica.apply_command(&cmd).unwrap();
    let op = Op::BoundedAdd { delta: 1 };
    group.bench_function("escrow_add_warm_key", |b| {
        b.iter(|| {
            out.clear();
            hlc += 1;
            black_box(
                replica
                    .admit(black_box(key), black_box(&op), HlcTimestamp(hlc), &mut out)
                    .unwrap(),
            )
        })
    });

    let mut replica = replica_with_rules();
    let key = b"tags:0000000042";
    warm(
        &mut replica,
        key,
        &Op::SetAdd {
            element: b"x".to_vec(),
        },
    );
    let op = Op::SetAdd {
        element: b"x".to_vec(),
    };
    group.bench_function("set_add_existing_element", |b| {
        b.iter(|| {
            out.clear();
            hlc += 1;
            black_box(
                replica
                    .admit(black_box(key), black_box(&op), HlcTimestamp(hlc), &mut out)
                    .unwrap(),
            )
        })
    });
    group.finish();

    // The Raft path's per-command cost on every replica: apply a register put to a warm key
    // among 100k (so the key lookup misses the cache as it does in a node).
    let mut group = c.benchmark_group("apply");
    let mut replica = replica_with_rules();
    let keys: Vec<Vec<u8>> = (0..100_000u32)
        .map(|i| format!("reg:{i:011}").into_bytes())
        .collect();
    let put = Op::RegisterPut { value: vec![7; 64] };
    for key in &keys {
        warm(&mut replica, key, &put);
    }
    let cmds: Vec<_> = keys
        .iter()
        .step_by(97)
        .map(|key| replica.prepare_command(key, &put, HlcTimestamp(2)).unwrap())
        .collect();
    let mut next = 0usize;
    group.bench_function("register_put_warm_key", |b| {
        b.iter(|| {
            next = (next + 1) % cmds.len();
            black_box(replica.apply_command(black_box(&cmds[next])).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
