//! The RocksDB state store and BLAKE3-verified checkpoints, on real files.

use calm_kernel::rules::RuleSet;
use calm_kernel::{HlcTimestamp, Mode, Op, Replica};
use calm_raft::checkpoint::{CheckpointError, Checkpoints, MANIFEST_FILE};
use calm_raft::store::{AppliedMeta, StateStore};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// A replica with a few keys of every commutative type created and written.
fn replica_with_keys(n: usize) -> Replica {
    let mut r = Replica::new(1, RuleSet::new(Mode::Hybrid).compile().unwrap());
    let mut out = Vec::new();
    for i in 0..n {
        let key = format!("k:{i}");
        let op = match i % 3 {
            0 => Op::CounterAdd { delta: i as i64 },
            1 => Op::MaxRaise { value: i as i64 },
            _ => Op::SetAdd {
                element: key.clone().into_bytes(),
            },
        };
        let cmd = r
            .prepare_command(key.as_bytes(), &op, HlcTimestamp(1))
            .unwrap();
        r.apply_command(&cmd).unwrap();
        r.admit(key.as_bytes(), &op, HlcTimestamp(2), &mut out)
            .unwrap();
    }
    r
}

fn persist(r: &mut Replica, store: &StateStore, wal_lsn: u64) -> AppliedMeta {
    let meta = AppliedMeta {
        vv: r.version_vector().clone(),
        groups: BTreeMap::from([(3, vec![17])]),
        wal_lsn,
    };
    let mut changed = Vec::new();
    r.take_dirty(|k, s| changed.push((k.to_vec(), s.clone())));
    store
        .write(changed.iter().map(|(k, s)| (k.as_slice(), s)), &meta)
        .unwrap();
    meta
}

fn assert_same_state(store: &StateStore, r: &Replica) {
    let loaded = store.load().unwrap();
    assert_eq!(loaded.len(), r.key_count());
    for (key, state) in loaded {
        assert_eq!(Some(&state), r.key_record(&key), "key {key:?}");
    }
}

#[test]
fn state_and_position_round_trip_and_restore_a_replica() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = replica_with_keys(30);
    let meta = {
        let store = StateStore::open(dir.path().join("state")).unwrap();
        assert_eq!(store.meta().unwrap(), AppliedMeta::default());
        let meta = persist(&mut r, &store, 42);
        assert_same_state(&store, &r);
        meta
    };
    // Reopen: RocksDB's own WAL is off, so this also checks that closing flushes.
    let store = StateStore::open(dir.path().join("state")).unwrap();
    assert_eq!(store.meta().unwrap(), meta);
    assert_same_state(&store, &r);
    let restored = Replica::restore(
        1,
        RuleSet::new(Mode::Hybrid).compile().unwrap(),
        meta.vv.clone(),
        store.load().unwrap(),
    );
    for i in 0..30 {
        let key = format!("k:{i}");
        assert_eq!(restored.read(key.as_bytes()), r.read(key.as_bytes()));
    }
    assert_eq!(restored.version_vector(), r.version_vector());
}

#[test]
fn equal_state_gives_equal_digests() {
    let dir = tempfile::tempdir().unwrap();
    let a = StateStore::open(dir.path().join("a")).unwrap();
    let b = StateStore::open(dir.path().join("b")).unwrap();
    let mut ra = replica_with_keys(10);
    let mut rb = replica_with_keys(10);
    persist(&mut ra, &a, 1);
    persist(&mut rb, &b, 99); // positions differ; state does not
    assert_eq!(a.digest().unwrap(), b.digest().unwrap());
    let mut out = Vec::new();
    rb.admit(
        b"k:0",
        &Op::CounterAdd { delta: 1 },
        HlcTimestamp(9),
        &mut out,
    )
    .unwrap();
    persist(&mut rb, &b, 100);
    assert_ne!(a.digest().unwrap(), b.digest().unwrap());
}

#[test]
fn a_checkpoint_verifies_and_restores_the_exact_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path().join("state")).unwrap();
    let mut r = replica_with_keys(50);
    let meta = persist(&mut r, &store, 7);
    let cps = Checkpoints::open(dir.path().join("checkpoints"), 2).unwrap();
    let manifest = cps.create(&store, &meta).unwrap();
    assert_eq!(manifest.applied, meta);
    assert!(manifest.files.iter().any(|f| f.name.ends_with(".sst")));

    let selection = cps.latest_valid().unwrap();
    assert!(selection.rejected.is_empty());
    let chosen = selection.chosen.expect("one valid checkpoint");
    let target = dir.path().join("restored");
    cps.restore(&chosen, &target).unwrap();
    let restored = StateStore::open(&target).unwrap();
    assert_eq!(restored.meta().unwrap(), meta);
    assert_eq!(restored.digest().unwrap(), store.digest().unwrap());
    assert_same_state(&restored, &r);
}

fn flip_byte(path: &Path, at_fraction: f64) {
    let mut bytes = fs::read(path).unwrap();
    let at = ((bytes.len() as f64) * at_fraction) as usize;
    bytes[at] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_corrupt_checkpoint_is_rejected_for_an_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path().join("state")).unwrap();
    let cps = Checkpoints::open(dir.path().join("checkpoints"), 3).unwrap();
    let mut r = replica_with_keys(20);
    let first = persist(&mut r, &store, 10);
    cps.create(&store, &first).unwrap();
    let mut out = Vec::new();
    r.admit(
        b"k:0",
        &Op::CounterAdd { delta: 5 },
        HlcTimestamp(5),
        &mut out,
    )
    .unwrap();
    let second = persist(&mut r, &store, 20);
    let newest = cps.create(&store, &second).unwrap();
    assert_eq!(cps.ids().unwrap(), vec![2, 1]);

    // A flipped bit in one of the newest checkpoint's files (not a hard link shared with
    // the first checkpoint: take a file only the newest has, else the manifest).
    let newest_path = cps.path_of(newest.id);
    let only_newest = newest
        .files
        .iter()
        .find(|f| !cps.path_of(1).join(&f.name).exists())
        .map(|f| newest_path.join(&f.name))
        .unwrap_or_else(|| newest_path.join(MANIFEST_FILE));
    flip_byte(&only_newest, 0.5);

    let selection = cps.latest_valid().unwrap();
    let chosen = selection
        .chosen
        .expect("the older checkpoint still verifies");
    assert_eq!(chosen.manifest.id, 1);
    assert_eq!(chosen.manifest.applied.wal_lsn, 10, "replay starts earlier");
    assert_eq!(selection.rejected.len(), 1);
    let reason = selection.rejected[0].to_string();
    assert!(
        matches!(selection.rejected[0], CheckpointError::Corrupt { .. }),
        "{reason}"
    );
    assert!(reason.contains("ckpt-00000000000000000002"), "{reason}");
    // The rejected checkpoint is kept for the operator, not deleted.
    assert!(newest_path.exists());
}

#[test]
fn a_tampered_manifest_fails_the_root_hash() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path().join("state")).unwrap();
    let cps = Checkpoints::open(dir.path().join("checkpoints"), 2).unwrap();
    let mut r = replica_with_keys(5);
    let meta = persist(&mut r, &store, 3);
    let m = cps.create(&store, &meta).unwrap();
    // Claim a later WAL position (which would skip replay): the root hash must catch it.
    let path = cps.path_of(m.id).join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("\"wal_lsn\": 3", "\"wal_lsn\": 4")).unwrap();
    let err = cps.verify(m.id).unwrap_err().to_string();
    assert!(err.contains("root hash"), "{err}");
    assert!(cps.latest_valid().unwrap().chosen.is_none());
}

#[test]
fn unfinished_checkpoints_are_cleaned_and_old_ones_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path().join("state")).unwrap();
    let cp_dir = dir.path().join("checkpoints");
    let mut r = replica_with_keys(5);
    {
        let cps = Checkpoints::open(&cp_dir, 2).unwrap();
        for lsn in [1, 2, 3] {
            let meta = persist(&mut r, &store, lsn);
            cps.create(&store, &meta).unwrap();
        }
        assert_eq!(
            cps.ids().unwrap(),
            vec![3, 2],
            "only the newest two are kept"
        );
        assert_eq!(cps.oldest_kept_wal_lsn().unwrap(), Some(2));
    }
    // A crash mid-create leaves a tmp directory: ignored and removed on open.
    fs::create_dir_all(cp_dir.join("tmp-00000000000000000004")).unwrap();
    fs::write(cp_dir.join("tmp-00000000000000000004/000001.sst"), b"half").unwrap();
    let cps = Checkpoints::open(&cp_dir, 2).unwrap();
    assert!(!cp_dir.join("tmp-00000000000000000004").exists());
    assert_eq!(cps.latest_valid().unwrap().chosen.unwrap().manifest.id, 3);
}
