//! `calm_raft::scan`: keys in order from the state store merged with what it does not hold
//! yet (dirty keys, keys of a persist job not ended), deleted keys skipped, chunks bounded,
//! and no key missed while persists end during a scan.

use calm_kernel::rules::RuleSet;
use calm_kernel::{HlcTimestamp, Mode, Op, Value};
use calm_raft::local::{LocalOptions, LocalState};
use calm_raft::scan::{ChunkLimits, KeyRange, read_chunk, read_chunk_interleaved};
use std::sync::{Arc, Mutex};

fn open(dir: &std::path::Path) -> LocalState {
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    LocalState::open(dir, 1, rules, LocalOptions::default())
        .expect("recovery succeeds")
        .0
}

/// Apply `op` on `key` as its Raft group would (there is no group here).
fn command(state: &mut LocalState, key: &[u8], op: Op) {
    let replica = state.replica_mut();
    let cmd = replica.prepare_command(key, &op, HlcTimestamp(1)).unwrap();
    replica.apply_command(&cmd).unwrap();
}

fn key(i: usize) -> Vec<u8> {
    format!("k/{i:04}").into_bytes()
}

/// Every key of `range` as `read_chunk` pages it with `keys_max`, with their values; checks
/// each chunk's bound on the way.
fn scan_all(
    local: &Arc<Mutex<LocalState>>,
    range: &KeyRange,
    keys_max: usize,
) -> Vec<(Vec<u8>, Option<Value>)> {
    let limits = ChunkLimits {
        keys_max,
        bytes_max: usize::MAX,
        values: true,
    };
    let mut from = Some(range.start.clone());
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let Some(start) = from else { return out };
        let chunk = read_chunk(local, range, &start, limits).unwrap();
        assert!(chunk.entries.len() <= keys_max);
        out.extend(chunk.entries);
        from = chunk.resume;
    }
    panic!("the scan did not end within 10000 chunks");
}

#[test]
fn keys_come_in_order_from_the_store_dirty_keys_and_unfinished_persists() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = open(dir.path());
    // Stored: 0..100. In a persist job not ended: 100..150. Dirty: 150..200 and a change
    // to stored key 5. Deleted: every tenth key (a tombstone, wherever it is).
    for i in 0..100 {
        command(&mut state, &key(i), Op::CounterAdd { delta: i as i64 });
    }
    state.persist().unwrap();
    for i in 100..150 {
        command(&mut state, &key(i), Op::CounterAdd { delta: i as i64 });
    }
    let job = state.begin_persist().unwrap();
    for i in 150..200 {
        command(&mut state, &key(i), Op::CounterAdd { delta: i as i64 });
    }
    command(&mut state, &key(5), Op::CounterAdd { delta: 1000 });
    for i in (0..200).step_by(10) {
        command(&mut state, &key(i), Op::RegisterDelete);
    }
    command(&mut state, b"other", Op::CounterAdd { delta: 1 });
    let expected: Vec<(Vec<u8>, Option<Value>)> = (0..200)
        .filter(|i| i % 10 != 0)
        .map(|i| {
            let value = if i == 5 { 1005 } else { i as i64 };
            (key(i), Some(Value::Counter(value)))
        })
        .collect();
    let local = Arc::new(Mutex::new(state));
    let range = KeyRange::prefix(b"k/");
    for keys_max in [1, 7, 50, 1000] {
        assert_eq!(
            scan_all(&local, &range, keys_max),
            expected,
            "keys_max {keys_max}"
        );
    }
    let (_, receipt) = job.write().unwrap();
    local.lock().unwrap().end_persist(receipt);
    assert_eq!(
        scan_all(&local, &range, 13),
        expected,
        "after the job ended"
    );
    local.lock().unwrap().persist().unwrap();
    assert_eq!(scan_all(&local, &range, 13), expected, "all in the store");

    // A [start, end) range, keys only, and a byte bound.
    let span = KeyRange {
        start: key(41),
        end: Some(key(47)),
    };
    let chunk = read_chunk(
        &local,
        &span,
        &span.start,
        ChunkLimits {
            keys_max: 100,
            bytes_max: usize::MAX,
            values: false,
        },
    )
    .unwrap();
    let keys: Vec<_> = chunk
        .entries
        .iter()
        .map(|(k, v)| (k.clone(), v.is_none()))
        .collect();
    assert_eq!(keys, (41..47).map(|i| (key(i), true)).collect::<Vec<_>>());
    assert_eq!(chunk.resume, None, "the range is done");
    let small = read_chunk(
        &local,
        &range,
        &range.start,
        ChunkLimits {
            keys_max: 100,
            bytes_max: 1,
            values: true,
        },
    )
    .unwrap();
    assert_eq!(small.entries.len(), 1, "a byte bound still returns one key");
    assert_eq!(small.resume, Some(key(2)));

    // After a restart every key comes from the store.
    drop(local);
    let local = Arc::new(Mutex::new(open(dir.path())));
    assert_eq!(scan_all(&local, &range, 31), expected, "after a restart");
}

/// Persists ending while a scan reads the store are noticed: no key the replica held when
/// the scan began is ever missing. The store holds many keys, so reading a chunk of it takes
/// long enough for whole persists of new keys to end meanwhile.
#[test]
fn no_key_is_missed_while_persists_end_during_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = open(dir.path());
    const STORED: usize = 20_000;
    for i in 0..STORED {
        command(
            &mut state,
            format!("a/{i:06}").as_bytes(),
            Op::CounterAdd { delta: 1 },
        );
    }
    state.persist().unwrap();
    let local = Arc::new(Mutex::new(state));
    const KEYS: usize = 300;
    let writer = {
        let local = local.clone();
        std::thread::spawn(move || {
            for i in 0..KEYS {
                let mut state = local.lock().unwrap();
                command(&mut state, &key(i), Op::CounterAdd { delta: 1 });
                // And a stored key changes: a scan must not return its stored state.
                let stored = format!("a/{:06}", (i * 7919) % STORED);
                command(&mut state, stored.as_bytes(), Op::CounterAdd { delta: 1 });
                drop(state);
                {
                    // As the node persists: capture under the lock, write without it.
                    let job = local.lock().unwrap().begin_persist().unwrap();
                    let (_, receipt) = job.write().unwrap();
                    local.lock().unwrap().end_persist(receipt);
                }
            }
        })
    };
    let range = KeyRange::prefix(b"");
    let mut scans = 0;
    while !writer.is_finished() && scans < 2_000 {
        let (before, sum_before) = {
            let state = local.lock().unwrap();
            let sum: i64 = (0..STORED)
                .map(
                    |i| match state.replica().read(format!("a/{i:06}").as_bytes()) {
                        Some(Value::Counter(n)) => n,
                        other => panic!("{other:?}"),
                    },
                )
                .sum();
            (state.replica().key_count(), sum)
        };
        let seen = scan_all(&local, &range, 100_000);
        assert!(
            seen.len() >= before,
            "a scan saw {} keys, but {before} existed when it began",
            seen.len()
        );
        let sum: i64 = seen
            .iter()
            .filter(|(k, _)| k.starts_with(b"a/"))
            .map(|(_, v)| match v {
                Some(Value::Counter(n)) => *n,
                other => panic!("{other:?}"),
            })
            .sum();
        assert!(
            sum >= sum_before,
            "a scan read counters summing to {sum}, below the {sum_before} they had when it began: an old stored state"
        );
        assert!(
            seen.windows(2).all(|w| w[0].0 < w[1].0),
            "in order, distinct"
        );
        scans += 1;
    }
    writer.join().unwrap();
    assert_eq!(scan_all(&local, &range, 1_000).len(), STORED + KEYS);
}

/// The race the epoch guards, made to happen: between a chunk's read of the store and its
/// merge, a whole persist moves a new key and a changed key into the store. The chunk must
/// notice and read again, so it neither misses the new key nor returns the changed key's
/// old stored state.
#[test]
fn a_persist_ending_between_the_store_read_and_the_merge_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = open(dir.path());
    for i in 0..10 {
        command(&mut state, &key(i), Op::CounterAdd { delta: 1 });
    }
    state.persist().unwrap();
    command(&mut state, &key(3), Op::CounterAdd { delta: 100 });
    command(&mut state, &key(20), Op::CounterAdd { delta: 7 });
    let local = Arc::new(Mutex::new(state));
    let range = KeyRange::prefix(b"k/");
    let limits = ChunkLimits {
        keys_max: 100,
        bytes_max: usize::MAX,
        values: true,
    };
    let mut persists = 0;
    let chunk = read_chunk_interleaved(&local, &range, &range.start, limits, |attempt| {
        if attempt == 0 {
            let job = local.lock().unwrap().begin_persist().unwrap();
            let (_, receipt) = job.write().unwrap();
            local.lock().unwrap().end_persist(receipt);
            persists += 1;
        }
    })
    .unwrap();
    assert_eq!(persists, 1);
    let mut expected: Vec<(Vec<u8>, Option<Value>)> =
        (0..10).map(|i| (key(i), Some(Value::Counter(1)))).collect();
    expected[3].1 = Some(Value::Counter(101));
    expected.push((key(20), Some(Value::Counter(7))));
    assert_eq!(chunk.entries, expected);
}
