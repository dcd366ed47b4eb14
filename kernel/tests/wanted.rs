//! What a replica asks peers for: the facts it neither applied nor holds waiting.

use calm_kernel::rules::RuleSet;
use calm_kernel::{FactId, FactKind, FactRef, HlcTimestamp, Mode, Op, Replica, VersionVector};

fn add(origin: u64, seq: u64, key: &'static [u8]) -> FactRef<'static> {
    FactRef {
        id: FactId { origin, seq },
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
fn waiting_facts_right_after_the_version_vector_are_not_asked_for_again() {
    let mut r = Replica::new(1, RuleSet::new(Mode::Hybrid).compile().unwrap());
    let create = r
        .prepare_command(b"hits", &Op::CounterSet { value: 0 }, HlcTimestamp(1))
        .unwrap();
    r.apply_command(&create).unwrap();
    r.deliver(&add(2, 1, b"hits")).unwrap();
    // n2's 3 and 4 wait for its 2; n3's 1 and 2 wait for their key's creation; n3's 4 waits
    // for its 3.
    for fact in [
        add(2, 3, b"hits"),
        add(2, 4, b"hits"),
        add(3, 1, b"new"),
        add(3, 2, b"new"),
        add(3, 4, b"new"),
    ] {
        r.deliver(&fact).unwrap();
    }
    let target: VersionVector = [(2, 6), (3, 5), (4, 2), (5, 0)].into_iter().collect();
    assert_eq!(
        r.wanted_from(&target),
        // n2: 2 is the gap (3 and 4 come again: only the run after the vector is skipped).
        // n3: 1 and 2 wait here, so from 3. n4: everything. n5: nothing to want.
        [(2, 2, 6), (3, 3, 5), (4, 1, 2)]
    );
    assert_eq!(
        r.version_vector().missing_from(&target),
        [(2, 2, 6), (3, 1, 5), (4, 1, 2)],
        "the plain difference asks for n3's waiting facts again"
    );
}
