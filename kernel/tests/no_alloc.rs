//! The fast path allocates nothing on a warm key: a counting global allocator around admit.

use calm_kernel::rules::{Rule, RuleSet};
use calm_kernel::{Admitted, Bounds, HlcTimestamp, Mode, Op, Replica};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn admission_on_a_warm_key_does_not_allocate() {
    let mut rules = RuleSet::new(Mode::Hybrid);
    rules.rules = vec![Rule::new("stock:*", Mode::Hybrid).bounded(Bounds::new(0, 1000).unwrap())];
    let mut replica = Replica::new(1, rules.compile().unwrap());
    let cases: [(&[u8], Op); 4] = [
        (b"counter:1", Op::CounterAdd { delta: 3 }),
        (b"max:1", Op::MaxRaise { value: 1 }),
        (
            b"tags:1",
            Op::SetAdd {
                element: b"red".to_vec(),
            },
        ),
        (b"stock:1", Op::BoundedAdd { delta: 1 }),
    ];
    // Warm: create each key through the ordered path, get quota, admit once.
    let mut out = Vec::with_capacity(4096);
    for (key, op) in &cases {
        let cmd = if key.starts_with(b"stock:") {
            replica.prepare_grant(key, 0, 500, HlcTimestamp(1)).unwrap()
        } else {
            replica.prepare_command(key, op, HlcTimestamp(1)).unwrap()
        };
        replica.apply_command(&cmd).unwrap();
        replica.admit(key, op, HlcTimestamp(2), &mut out).unwrap();
    }
    for (key, op) in &cases {
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        for i in 0..100 {
            out.clear();
            let admitted = replica
                .admit(key, op, HlcTimestamp(10 + i), &mut out)
                .unwrap();
            assert!(matches!(admitted, Admitted::Local { .. }), "{admitted:?}");
        }
        let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
        assert_eq!(allocations, 0, "admitting {op:?} on a warm key allocated");
    }
}
