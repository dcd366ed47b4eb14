//! The fact archive of `LocalState`: every fact a node accepted stays servable to peers
//! across restarts, checkpoints and WAL segment deletion, until `prune_archive` drops it.

use calm_kernel::fact::decode_facts;
use calm_kernel::rules::RuleSet;
use calm_kernel::{Admitted, HlcTimestamp, Mode, NodeId, Op, Value, VersionVector};
use calm_raft::local::{LocalError, LocalOptions, LocalState};
use calm_raft::wal::{WalOptions, WalRecord};
use std::path::Path;

const KEY: &[u8] = b"hits";

fn options() -> LocalOptions {
    LocalOptions {
        wal: WalOptions {
            // Small segments so checkpoints really delete WAL files during the test.
            segment_bytes_max: 16 * 1024,
            batch_bytes_max: 4 * 1024,
            group_bytes_max: 8 * 1024,
            preallocate: false,
            ..WalOptions::default()
        },
        checkpoints_kept: 2,
        ..LocalOptions::default()
    }
}

fn open(dir: &Path, node: NodeId) -> LocalState {
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    let (state, _) = LocalState::open(dir, node, rules, options()).expect("recovery succeeds");
    state
}

/// Create the counter as its Raft group would (there is no group here).
fn create_key(state: &mut LocalState) {
    if state.replica().read(KEY).is_some() {
        return;
    }
    let replica = state.replica_mut();
    let cmd = replica
        .prepare_command(KEY, &Op::CounterAdd { delta: 0 }, HlcTimestamp(1))
        .unwrap();
    replica.apply_command(&cmd).unwrap();
}

/// Admit `n` adds of 1, wait until each is durable, return their encodings back to back.
fn admit(state: &mut LocalState, n: u64) -> Vec<u8> {
    let mut facts = Vec::new();
    for i in 0..n {
        let admit = state
            .admit(KEY, &Op::CounterAdd { delta: 1 }, HlcTimestamp(10 + i))
            .unwrap()
            .expect("a hybrid counter add is admitted");
        assert!(matches!(admit.admitted, Admitted::Local { .. }));
        admit.durable.expect("a fact was appended").wait().unwrap();
        facts.extend_from_slice(&admit.fact);
    }
    facts
}

fn counter(state: &LocalState) -> i64 {
    match state.replica().read(KEY) {
        Some(Value::Counter(v)) => v,
        other => panic!("{other:?}"),
    }
}

/// The (origin, seq) of every archived fact of `origin` in `from..=to`.
fn archived(state: &LocalState, origin: NodeId, from: u64, to: u64) -> Vec<(NodeId, u64)> {
    let bytes = state.archived_facts(origin, from, to, usize::MAX).unwrap();
    decode_facts(&bytes)
        .map(|f| {
            let f = f.unwrap();
            (f.id.origin, f.id.seq)
        })
        .collect()
}

fn seqs(origin: NodeId, range: std::ops::RangeInclusive<u64>) -> Vec<(NodeId, u64)> {
    range.map(|s| (origin, s)).collect()
}

/// Node 1 with `own` facts of its own and `peer` facts delivered from node 2.
fn two_origins(dir1: &Path, dir2: &Path, own: u64, peer: u64) -> LocalState {
    let mut n1 = open(dir1, 1);
    let mut n2 = open(dir2, 2);
    create_key(&mut n1);
    create_key(&mut n2);
    admit(&mut n1, own);
    let from_peer = admit(&mut n2, peer);
    let report = n1.deliver(&from_peer).unwrap();
    assert_eq!(report.applied, peer);
    n1
}

#[test]
fn archived_facts_survive_restart_checkpoints_and_wal_deletion() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut n1 = two_origins(d1.path(), d2.path(), 200, 50);
    assert_eq!(archived(&n1, 1, 1, 200), seqs(1, 1..=200));
    assert_eq!(archived(&n1, 2, 1, 50), seqs(2, 1..=50));

    n1.persist().unwrap();
    assert_eq!(n1.unarchived_facts(), 0);
    drop(n1);
    let mut n1 = open(d1.path(), 1);
    assert_eq!(archived(&n1, 1, 1, 200), seqs(1, 1..=200));
    assert_eq!(archived(&n1, 2, 1, 50), seqs(2, 1..=50));
    assert_eq!(counter(&n1), 250);

    // Checkpoints delete the WAL segments holding the early facts; the archive keeps them.
    for _ in 0..3 {
        admit(&mut n1, 100);
        n1.checkpoint().unwrap();
    }
    assert!(
        n1.wal().oldest_lsn() > 1,
        "checkpoints must have deleted WAL segments (oldest LSN {})",
        n1.wal().oldest_lsn()
    );
    drop(n1);
    let n1 = open(d1.path(), 1);
    assert_eq!(archived(&n1, 1, 1, 500), seqs(1, 1..=500));
    assert_eq!(archived(&n1, 2, 1, 50), seqs(2, 1..=50));
    drop(n1);

    // A damaged live store is replaced by the newest checkpoint: its archive comes along.
    std::fs::write(
        d1.path().join("state").join("CURRENT"),
        b"MANIFEST-999999\n",
    )
    .unwrap();
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    let (n1, report) = LocalState::open(d1.path(), 1, rules, options()).unwrap();
    assert!(report.restored_checkpoint.is_some(), "{report:?}");
    assert_eq!(archived(&n1, 1, 1, 500), seqs(1, 1..=500));
    assert_eq!(archived(&n1, 2, 1, 50), seqs(2, 1..=50));
    assert_eq!(counter(&n1), 550);
}

#[test]
fn facts_replayed_from_the_wal_are_archived() {
    let dir = tempfile::tempdir().unwrap();
    let mut n1 = open(dir.path(), 1);
    create_key(&mut n1);
    n1.checkpoint().unwrap();
    admit(&mut n1, 30);
    // No persist: the store never saw these facts; only the WAL has them.
    drop(n1);
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    let (mut n1, report) = LocalState::open(dir.path(), 1, rules, options()).unwrap();
    assert_eq!(report.replayed_facts, 30);
    assert_eq!(n1.unarchived_facts(), 30);
    assert_eq!(archived(&n1, 1, 1, 30), seqs(1, 1..=30));
    n1.persist().unwrap();
    assert_eq!(n1.unarchived_facts(), 0);
    drop(n1);
    let n1 = open(dir.path(), 1);
    assert_eq!(archived(&n1, 1, 1, 30), seqs(1, 1..=30));
    assert_eq!(counter(&n1), 30);
}

#[test]
fn delivered_facts_survive_a_crash_in_their_order() {
    // Facts from peers go to this node's WAL too: a crash before `persist` replays them, in
    // the order they were applied among this node's own facts.
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut n1 = two_origins(d1.path(), d2.path(), 5, 7);
    n1.checkpoint().unwrap();
    let mut n2 = open(d2.path(), 2);
    // Node 2 replayed its facts from its WAL; they wait for the key (whose creation lives
    // in a Raft group's log, absent here) until it is created again.
    create_key(&mut n2);
    assert_eq!(n2.replica().version_vector().get(2), 7);
    let more = admit(&mut n2, 3);
    let report = n1.deliver(&more).unwrap();
    assert_eq!(report.applied, 3);
    admit(&mut n1, 2);
    // Wait for the delivered facts too (the own facts after them imply it).
    report
        .durable
        .expect("accepted facts are appended")
        .wait()
        .unwrap();
    drop(n1);
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    let (n1, recovery) = LocalState::open(d1.path(), 1, rules, options()).unwrap();
    assert_eq!(recovery.replayed_facts, 5);
    assert_eq!(n1.replica().version_vector().get(2), 10);
    assert_eq!(n1.replica().version_vector().get(1), 7);
    assert_eq!(archived(&n1, 2, 1, 10), seqs(2, 1..=10));
    assert_eq!(counter(&n1), 17);
}

#[test]
fn a_large_delivery_is_split_over_wal_records() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut n1 = open(d1.path(), 1);
    let mut n2 = open(d2.path(), 2);
    create_key(&mut n1);
    create_key(&mut n2);
    n1.checkpoint().unwrap();
    // Far more than one 4 KiB WAL batch.
    let batch = admit(&mut n2, 500);
    assert!(batch.len() > 4 * n1.wal().record_payload_bytes_max());
    let report = n1.deliver(&batch).unwrap();
    assert_eq!(report.applied, 500);
    report.durable.unwrap().wait().unwrap();
    drop(n1);
    let n1 = open(d1.path(), 1);
    assert_eq!(n1.replica().version_vector().get(2), 500);
    assert_eq!(counter(&n1), 500);
}

#[test]
fn a_fast_batch_appends_its_facts_together_and_they_replay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut n1 = open(dir.path(), 1);
    create_key(&mut n1);
    n1.checkpoint().unwrap();
    let before = n1
        .wal()
        .append(&[WalRecord::facts(Vec::new())])
        .unwrap()
        .append_no();
    let mut batch = n1.fast_batch();
    let mut fact_bytes = 0;
    for i in 0..500u64 {
        let admitted = batch
            .admit(KEY, &Op::CounterAdd { delta: 1 }, HlcTimestamp(10 + i))
            .unwrap()
            .expect("a hybrid counter add is admitted on the fast path");
        assert_eq!(admitted.id.seq, i + 1, "own facts are numbered in order");
        fact_bytes += admitted.fact.len();
    }
    // A counter set needs consensus: the batch leaves it alone and changes nothing.
    assert!(
        batch
            .admit(KEY, &Op::CounterSet { value: 7 }, HlcTimestamp(600))
            .unwrap()
            .is_none()
    );
    let durable = batch.finish().unwrap().expect("facts were admitted");
    let appends = durable.append_no() - before;
    durable.wait().unwrap();
    let record_max = n1.wal().record_payload_bytes_max();
    assert!(
        fact_bytes > 4 * record_max,
        "the test must span several records"
    );
    assert!(
        appends <= fact_bytes.div_ceil(record_max / 2) as u64,
        "{appends} appends for {fact_bytes} bytes of facts: the batch did not share appends"
    );
    assert_eq!(counter(&n1), 500);
    assert_eq!(archived(&n1, 1, 1, 500), seqs(1, 1..=500));

    // A batch dropped unfinished still appends what it admitted.
    let mut batch = n1.fast_batch();
    for i in 0..3u64 {
        batch
            .admit(KEY, &Op::CounterAdd { delta: 1 }, HlcTimestamp(700 + i))
            .unwrap()
            .unwrap();
    }
    drop(batch);
    // `None`: the writer made them durable already.
    if let Some((barrier, seq)) = n1.own_facts_barrier().unwrap() {
        assert_eq!(seq, 503);
        barrier.wait().unwrap();
    }

    // No persist: only the WAL has them.
    drop(n1);
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    let (mut n1, report) = LocalState::open(dir.path(), 1, rules, options()).unwrap();
    assert_eq!(report.replayed_facts, 503);
    assert_eq!(counter(&n1), 503);
    assert_eq!(archived(&n1, 1, 1, 503), seqs(1, 1..=503));
    let next = n1
        .admit(KEY, &Op::CounterAdd { delta: 1 }, HlcTimestamp(800))
        .unwrap()
        .unwrap();
    match next.admitted {
        Admitted::Local { id, .. } => assert_eq!(id.seq, 504, "no sequence number reused"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pruning_deletes_only_facts_at_or_below_the_floor() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut n1 = two_origins(d1.path(), d2.path(), 10, 10);
    n1.persist().unwrap();
    // Facts 11..=20 of node 1 only in memory, 1..=10 in the store.
    admit(&mut n1, 10);
    assert_eq!(n1.unarchived_facts(), 10);

    n1.prune_archive(&VersionVector::new()).unwrap();
    assert_eq!(archived(&n1, 1, 1, 20), seqs(1, 1..=20));

    let floor: VersionVector = [(1, 15), (2, 4)].into_iter().collect();
    n1.prune_archive(&floor).unwrap();
    assert_eq!(archived(&n1, 1, 1, 20), seqs(1, 16..=20));
    assert_eq!(archived(&n1, 2, 1, 10), seqs(2, 5..=10));
    // Origins the floor does not name keep everything.
    let floor: VersionVector = [(3, 100)].into_iter().collect();
    n1.prune_archive(&floor).unwrap();
    assert_eq!(archived(&n1, 2, 1, 10), seqs(2, 5..=10));

    n1.persist().unwrap();
    n1.store().flush().unwrap();
    drop(n1);
    let n1 = open(d1.path(), 1);
    assert_eq!(archived(&n1, 1, 1, 20), seqs(1, 16..=20));
    assert_eq!(archived(&n1, 2, 1, 10), seqs(2, 5..=10));
    // Pruning drops archived copies only, never applied state.
    assert_eq!(counter(&n1), 30);
}

#[test]
fn reads_are_bounded_in_bytes_but_always_progress() {
    let dir = tempfile::tempdir().unwrap();
    let mut n1 = open(dir.path(), 1);
    create_key(&mut n1);
    let first = admit(&mut n1, 5);
    n1.persist().unwrap();
    admit(&mut n1, 5);
    let one = first.len() / 5;

    // Smaller than one fact: the first fact alone.
    let bytes = n1.archived_facts(1, 1, 10, 1).unwrap();
    assert_eq!(bytes.len(), one);
    // Three facts' worth, across the store / memory boundary.
    let bytes = n1.archived_facts(1, 4, 10, 3 * one).unwrap();
    let got: Vec<u64> = decode_facts(&bytes).map(|f| f.unwrap().id.seq).collect();
    assert_eq!(got, vec![4, 5, 6]);
    // Empty and inverted ranges, other origins.
    assert!(n1.archived_facts(1, 11, 20, usize::MAX).unwrap().is_empty());
    assert!(n1.archived_facts(1, 5, 4, usize::MAX).unwrap().is_empty());
    assert!(n1.archived_facts(2, 1, 10, usize::MAX).unwrap().is_empty());
    assert_eq!(archived(&n1, 1, 0, u64::MAX), seqs(1, 1..=10));
}

#[test]
fn a_malformed_batch_changes_nothing() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut n1 = open(d1.path(), 1);
    let mut n2 = open(d2.path(), 2);
    create_key(&mut n1);
    create_key(&mut n2);
    let mut batch = admit(&mut n2, 3);
    batch.extend_from_slice(&[1, 2, 3]);
    let err = n1.deliver(&batch).unwrap_err();
    assert!(matches!(err, LocalError::BadDeliveredFact { .. }), "{err}");
    assert_eq!(n1.replica().version_vector().get(2), 0);
    assert_eq!(n1.unarchived_facts(), 0);
    assert_eq!(counter(&n1), 0);
}

#[test]
fn facts_waiting_for_their_key_are_archived_and_duplicates_are_not() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut n1 = open(d1.path(), 1);
    let mut n2 = open(d2.path(), 2);
    create_key(&mut n2);
    let batch = admit(&mut n2, 4);
    // The key's creation has not reached node 1: the facts wait, and are archived.
    let report = n1.deliver(&batch).unwrap();
    assert_eq!((report.applied, report.buffered), (0, 4));
    assert_eq!(archived(&n1, 2, 1, 4), seqs(2, 1..=4));
    create_key(&mut n1);
    assert_eq!(n1.replica().version_vector().get(2), 4);
    assert_eq!(counter(&n1), 4);
    let report = n1.deliver(&batch).unwrap();
    assert_eq!(report.duplicates, 4);
    assert_eq!(n1.unarchived_facts(), 4);
}

#[test]
fn checkpointed_vv_is_what_the_oldest_kept_checkpoint_covers() {
    let dir = tempfile::tempdir().unwrap();
    let mut n1 = open(dir.path(), 1);
    create_key(&mut n1);
    assert!(n1.checkpointed_vv().is_empty());
    let at = |seq: u64| -> VersionVector { [(1, seq)].into_iter().collect() };
    admit(&mut n1, 5);
    n1.checkpoint().unwrap();
    assert_eq!(n1.checkpointed_vv(), &at(5));
    admit(&mut n1, 5);
    n1.checkpoint().unwrap();
    // Two kept: recovery may fall back to the older one, so that is what counts.
    assert_eq!(n1.checkpointed_vv(), &at(5));
    admit(&mut n1, 5);
    n1.checkpoint().unwrap();
    assert_eq!(n1.checkpointed_vv(), &at(10));
    drop(n1);
    let n1 = open(dir.path(), 1);
    assert_eq!(n1.checkpointed_vv(), &at(10));
}

#[test]
fn a_store_from_before_the_archive_opens() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The column families of the store before the archive existed.
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let db =
            rocksdb::DB::open_cf(&options, dir.path().join("state"), ["keys", "meta"]).unwrap();
        drop(db);
    }
    let mut n1 = open(dir.path(), 1);
    create_key(&mut n1);
    admit(&mut n1, 3);
    n1.persist().unwrap();
    drop(n1);
    let n1 = open(dir.path(), 1);
    assert_eq!(archived(&n1, 1, 1, 3), seqs(1, 1..=3));
    assert_eq!(counter(&n1), 3);
}

/// A persist in two steps (`begin_persist`, then `write` without the state, as the node runs
/// it): facts admitted in between are not lost, stay in the archive, and are in the store
/// after the next persist; a `persist` started while a job is unwritten waits for it and
/// writes after it, so the store never goes back to the older capture.
#[test]
fn a_persist_written_without_the_state_loses_nothing_and_keeps_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let state = std::sync::Arc::new(std::sync::Mutex::new(open(dir.path(), 1)));
    let job = {
        let mut s = state.lock().unwrap();
        create_key(&mut s);
        admit(&mut s, 10);
        s.begin_persist().unwrap()
    };
    // The state is free while the job is pending: admissions go on.
    admit(&mut state.lock().unwrap(), 5);
    // A full persist now must wait for the job (it holds the state lock meanwhile).
    let later = {
        let state = state.clone();
        std::thread::spawn(move || state.lock().unwrap().persist().unwrap())
    };
    while !later.is_finished() && state.try_lock().is_ok() {
        std::thread::yield_now();
    }
    let (first, written) = job.write().unwrap();
    assert_eq!(first.vv.get(1), 10, "the job covers what it captured");
    assert_eq!(written.facts.len(), 10);
    let second = later.join().unwrap();
    assert_eq!(second.vv.get(1), 15);
    assert!(second.wal_lsn > first.wal_lsn);
    let mut s = state.lock().unwrap();
    s.end_persist(written);
    assert_eq!(
        s.store().meta().unwrap(),
        second,
        "the newer capture was written last"
    );
    assert_eq!(archived(&s, 1, 1, 15), seqs(1, 1..=15));
    assert_eq!(s.unarchived_facts(), 0);
    drop(s);
    drop(state);
    let reopened = open(dir.path(), 1);
    assert_eq!(counter(&reopened), 15);
    assert_eq!(archived(&reopened, 1, 1, 15), seqs(1, 1..=15));
}

/// A Raft command may observe own facts only once they are durable: `own_facts_barrier`
/// answers a barrier while an admitted fact's batch may not be, and nothing once a barrier
/// covering it, or the fact's own batch, is durable (or after recovery, which reads only
/// durable facts).
#[test]
fn own_facts_a_command_observes_are_made_durable_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(dir.path(), 1);
    create_key(&mut s);
    assert!(s.own_facts_barrier().unwrap().is_none(), "no own fact yet");
    let admitted = s
        .admit(KEY, &Op::CounterAdd { delta: 1 }, HlcTimestamp(5))
        .unwrap()
        .unwrap();
    let (barrier, seq) = s
        .own_facts_barrier()
        .unwrap()
        .expect("a fact not known durable");
    assert_eq!(seq, 1);
    barrier.wait().unwrap();
    // The barrier is durable only after the fact's batch (the WAL keeps order).
    assert!(admitted.durable.unwrap().wait().is_ok());
    s.own_facts_durable_through(seq);
    assert!(s.own_facts_barrier().unwrap().is_none());
    admit(&mut s, 2);
    // Both were awaited: the WAL's durable watermark says so, no barrier needed.
    assert!(s.own_facts_barrier().unwrap().is_none());
    drop(s);
    let mut reopened = open(dir.path(), 1);
    assert!(
        reopened.own_facts_barrier().unwrap().is_none(),
        "recovered facts are durable"
    );
}

/// A WAL backend whose fdatasyncs wait while `held` is true.
struct HeldSync {
    inner: calm_raft::wal::PwriteIo,
    held: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl calm_raft::wal::WalIo for HeldSync {
    fn name(&self) -> &'static str {
        "held-fdatasync"
    }

    fn write_durable(
        &mut self,
        file: &std::fs::File,
        offset_bytes: u64,
        bytes: &[u8],
    ) -> Result<(), calm_raft::wal::WalIoError> {
        let (lock, released) = &*self.held;
        let mut held = lock.lock().unwrap();
        while *held {
            held = released.wait(held).unwrap();
        }
        drop(held);
        self.inner.write_durable(file, offset_bytes, bytes)
    }
}

/// Lets held fdatasyncs go when dropped.
struct Release(std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Drop for Release {
    fn drop(&mut self) {
        *self.0.0.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.1.notify_all();
    }
}

/// An own fact is not served to peers until its WAL batch is durable: a peer holding it
/// would keep it through this node's crash while this node, recovering without it, issued
/// its sequence number again for another fact (found by Jepsen: counters that never
/// converged). A Raft command observing it still waits for it through the barrier.
#[test]
fn own_facts_are_served_only_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let io = HeldSync {
        inner: calm_raft::wal::PwriteIo,
        held: held.clone(),
    };
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    let (mut state, _) =
        LocalState::open_with_wal_io(dir.path(), 1, rules, options(), Box::new(io)).unwrap();
    // Declared after `state`, so dropped before it: a failing assertion must release the
    // writer, or dropping the WAL would wait for it forever.
    let _release = Release(held.clone());
    create_key(&mut state);
    admit(&mut state, 2);
    assert_eq!(archived(&state, 1, 1, 10), seqs(1, 1..=2));

    *held.0.lock().unwrap() = true;
    let pending = state
        .admit(KEY, &Op::CounterAdd { delta: 1 }, HlcTimestamp(100))
        .unwrap()
        .unwrap();
    assert_eq!(counter(&state), 3, "applied here at once");
    assert_eq!(
        archived(&state, 1, 1, 10),
        seqs(1, 1..=2),
        "fact 3 is not durable: not served"
    );
    assert_eq!(archived(&state, 1, 3, 3), vec![]);
    let barrier = state.own_facts_barrier().unwrap();
    assert!(barrier.is_some(), "a command must wait for fact 3");

    *held.0.lock().unwrap() = false;
    held.1.notify_all();
    pending.durable.unwrap().wait().unwrap();
    assert_eq!(archived(&state, 1, 1, 10), seqs(1, 1..=3));
    let (ticket, seq) = barrier.unwrap();
    ticket.wait().unwrap();
    state.own_facts_durable_through(seq);
    assert!(state.own_facts_barrier().unwrap().is_none());
}
