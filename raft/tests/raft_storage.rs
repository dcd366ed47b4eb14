//! openraft's storage conformance suite against the real WAL log store and the RocksDB-backed
//! state machine, plus what the suite does not cover: recovery of every group's log from the
//! shared WAL, and snapshots carrying real key states between nodes.

use calm_kernel::rules::RuleSet;
use calm_kernel::{Mode, ValueType};
use calm_raft::consensus::types::{
    CalmRaft, Entry, LogId, Membership, Request, StorageError, Vote,
};
use calm_raft::consensus::{GroupLogStore, GroupMap, GroupStateMachine, SharedLocal, WaitForFacts};
use calm_raft::local::{LocalOptions, LocalState};
use calm_raft::wal::WalOptions;
use openraft::entry::RaftEntry;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::vote::RaftLeaderId;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tempfile::TempDir;

fn options() -> LocalOptions {
    LocalOptions {
        wal: WalOptions {
            segment_bytes_max: 4 << 20,
            batch_bytes_max: 1 << 20,
            group_bytes_max: 1 << 20,
            preallocate: false,
            ..WalOptions::default()
        },
        ..LocalOptions::default()
    }
}

fn open(dir: &Path, node: u64) -> SharedLocal {
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    let (local, _) = LocalState::open(dir, node, rules, options()).unwrap();
    Arc::new(Mutex::new(local))
}

fn stores(dir: &Path, node: u64, group: u64, map: GroupMap) -> (GroupLogStore, GroupStateMachine) {
    let local = open(dir, node);
    let logs = local.lock().unwrap().raft_logs().clone();
    let sm = GroupStateMachine::open(
        group,
        map,
        local,
        Arc::new(WaitForFacts),
        dir.join("snapshots"),
    )
    .unwrap();
    (logs.store(group), sm)
}

struct Builder;

impl StoreBuilder<CalmRaft, GroupLogStore, GroupStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, GroupLogStore, GroupStateMachine), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let (log, sm) = stores(dir.path(), 1, 1, GroupMap::new(1));
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).await.unwrap();
}

fn log_id(term: u64, node: u64, index: u64) -> LogId {
    LogId::new(
        openraft::impls::leader_id_adv::LeaderId::new(term, node).to_committed(),
        index,
    )
}

fn command_entry(term: u64, index: u64, key: &str, value: &str) -> Entry {
    let cmd = calm_kernel::Command {
        key: key.as_bytes().to_vec(),
        hlc: calm_kernel::HlcTimestamp(index),
        proposer: 1,
        body: calm_kernel::CommandBody::RegisterPut {
            value: value.as_bytes().to_vec(),
        },
        frontier: Default::default(),
        absorb: None,
    };
    Entry::new_normal(log_id(term, 1, index), Request::Command(cmd.into()))
}

async fn append(log: &mut GroupLogStore, entries: Vec<Entry>) {
    use openraft::type_config::TypeConfigExt;
    let (tx, rx) = CalmRaft::oneshot();
    let cb = openraft::storage::IOFlushed::signal(tx);
    log.append(entries, cb).await.unwrap();
    rx.await.unwrap().unwrap();
}

/// Every group's log, vote, committed id and purge point come back from the one WAL after a
/// restart, groups do not see each other's records, and truncation survives too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_logs_recover_from_the_shared_wal() {
    let dir = tempfile::tempdir().unwrap();
    {
        let local = open(dir.path(), 1);
        let logs = local.lock().unwrap().raft_logs().clone();
        for group in 1..=3u64 {
            let mut log = logs.store(group);
            log.save_vote(&Vote::new(group, 1)).await.unwrap();
            let entries = (1..=10)
                .map(|i| command_entry(1, i, &format!("g{group}"), &format!("v{i}")))
                .collect();
            append(&mut log, entries).await;
        }
        let mut g2 = logs.store(2);
        g2.truncate_after(Some(log_id(1, 1, 6))).await.unwrap();
        append(&mut g2, vec![command_entry(2, 7, "g2", "after-truncate")]).await;
        let mut g3 = logs.store(3);
        g3.purge(log_id(1, 1, 4)).await.unwrap();
        g3.save_committed(Some(log_id(1, 1, 9))).await.unwrap();
        // Make the unwaited purge record durable too, as any later batch would.
        g3.save_vote(&Vote::new(3, 1)).await.unwrap();
        // Committed ids reach the WAL with the node's persist barrier.
        local.lock().unwrap().persist().unwrap();
    }
    let local = open(dir.path(), 1);
    let logs = local.lock().unwrap().raft_logs().clone();
    let mut g1 = logs.store(1);
    let state = g1.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 1, 10)));
    assert_eq!(state.last_purged_log_id, None);
    assert_eq!(g1.read_vote().await.unwrap(), Some(Vote::new(1, 1)));

    let mut g2 = logs.store(2);
    let entries = g2.try_get_log_entries(1..).await.unwrap();
    assert_eq!(entries.len(), 7);
    assert_eq!(
        entries[6].log_id(),
        log_id(2, 1, 7),
        "the truncated suffix stays gone"
    );

    let mut g3 = logs.store(3);
    let state = g3.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 4)));
    assert_eq!(g3.try_get_log_entries(0..5).await.unwrap().len(), 0);
    assert_eq!(g3.try_get_log_entries(5..).await.unwrap().len(), 6);
    assert_eq!(g3.read_committed().await.unwrap(), Some(log_id(1, 1, 9)));
    assert!(
        logs.groups().iter().all(|g| (1..=3).contains(g)),
        "{:?}",
        logs.groups()
    );
}

/// A snapshot carries real key states: built on one node after applying commands, verified
/// and installed on a fresh node, it answers reads identically and survives a restart there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_carry_key_states_and_survive_restart() {
    let map = GroupMap::new(1);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (_log_a, mut sm_a) = stores(dir_a.path(), 1, 1, map);
    let members = Membership::new_with_defaults(vec![BTreeSet::from([1, 2, 3])], []);
    let mut entries = vec![Entry::new_membership(log_id(1, 1, 1), members)];
    for i in 2..=20 {
        entries.push(command_entry(
            1,
            i,
            &format!("k{}", i % 5),
            &format!("v{i}"),
        ));
    }
    sm_a.apply(futures::stream::iter(
        entries.into_iter().map(|e| Ok((e, None))),
    ))
    .await
    .unwrap();
    let snap = sm_a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1, 20)));

    // A flipped bit anywhere is refused before anything is installed.
    {
        let (_log_b, mut sm_b) = stores(dir_b.path(), 2, 1, map);
        let mut bad = snap.snapshot.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        let err = sm_b.install_snapshot(&snap.meta, bad).await.unwrap_err();
        assert!(err.to_string().contains("BLAKE3"), "{err}");
        assert_eq!(sm_b.applied_state().await.unwrap().0, None);
        sm_b.install_snapshot(&snap.meta, snap.snapshot.clone())
            .await
            .unwrap();
    }
    // Reopen B: the installed state was made durable before install returned.
    let local_b = open(dir_b.path(), 2);
    let (log_b, mut sm_b) = {
        let logs = local_b.lock().unwrap().raft_logs().clone();
        let sm = GroupStateMachine::open(
            1,
            map,
            local_b.clone(),
            Arc::new(WaitForFacts),
            dir_b.path().join("snapshots"),
        )
        .unwrap();
        (logs.store(1), sm)
    };
    drop(log_b);
    assert_eq!(
        sm_b.applied_state().await.unwrap().0,
        Some(log_id(1, 1, 20))
    );
    // B serves the installed snapshot as its current one (to lagging peers of its own).
    let current = sm_b.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);
    for k in 0..5 {
        let key = format!("k{k}");
        let b = local_b.lock().unwrap().replica().read(key.as_bytes());
        let expected = (2..=20).filter(|i| i % 5 == k).max().unwrap();
        match b {
            Some(calm_kernel::Value::Register { value, .. }) => {
                assert_eq!(value, Some(format!("v{expected}").into_bytes()))
            }
            other => panic!("key {key}: {other:?}"),
        }
    }
    assert_eq!(
        local_b
            .lock()
            .unwrap()
            .replica()
            .key_state(b"k1")
            .map(|s| s.value_type()),
        Some(ValueType::Register)
    );
}
