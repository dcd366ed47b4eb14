//! fdatasync and acknowledgement, through injected I/O backends (the real pwrite backend
//! wrapped): a failed fdatasync is fatal (the batch's callers get the error, the WAL
//! poisons itself, nothing is acknowledged afterwards), and no batch is acknowledged before
//! an fdatasync that covers it has completed.

mod wal_common;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use calm_raft::wal::{
    PwriteIo, Wal, WalBackend, WalError, WalIo, WalIoError, WalIoOp, WalPosition, WalRecord,
};
use wal_common::{reopen_and_read_all, small_options};

/// The real pwrite backend, except that once `fail` is set every fdatasync fails with EIO
/// after the bytes were written (as when the disk rejects the flush).
struct FailingSync {
    inner: PwriteIo,
    fail: Arc<AtomicBool>,
}

impl WalIo for FailingSync {
    fn name(&self) -> &'static str {
        "failing-fdatasync"
    }

    fn write_durable(
        &mut self,
        file: &File,
        offset_bytes: u64,
        bytes: &[u8],
    ) -> Result<(), WalIoError> {
        if !self.fail.load(Ordering::SeqCst) {
            return self.inner.write_durable(file, offset_bytes, bytes);
        }
        file.write_all_at(bytes, offset_bytes)
            .map_err(|source| WalIoError {
                op: WalIoOp::Write,
                source,
            })?;
        Err(WalIoError {
            op: WalIoOp::Fdatasync,
            source: io::Error::from_raw_os_error(libc::EIO),
        })
    }
}

#[test]
fn fdatasync_failure_poisons_the_wal() {
    const WRITERS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let options = small_options(WalBackend::Pwrite);
    let fail = Arc::new(AtomicBool::new(false));
    let io = Box::new(FailingSync {
        inner: PwriteIo,
        fail: Arc::clone(&fail),
    });
    let wal = Arc::new(Wal::open_with_io(dir.path(), options.clone(), io).unwrap());
    assert_eq!(wal.backend_name(), "failing-fdatasync");

    let before: Vec<_> = (0..10u64)
        .map(|n| {
            wal.append(&[WalRecord::facts(vec![n as u8; 50])])
                .unwrap()
                .wait()
                .unwrap()
        })
        .collect();
    assert_eq!(before.last().unwrap().lsn, 10);

    fail.store(true, Ordering::SeqCst);
    // Several callers at once: each must get an error, whichever group its batch landed in.
    let barrier = Arc::new(Barrier::new(WRITERS));
    let handles: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let wal = Arc::clone(&wal);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                let mut results = Vec::new();
                for n in 0..5u8 {
                    match wal.append(&[WalRecord::raft_entries(writer as u64, vec![n; 50])]) {
                        Ok(ticket) => results.push(ticket.wait()),
                        Err(error) => results.push(Err(error)),
                    }
                }
                results
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .flat_map(|handle| handle.join().unwrap())
        .collect();
    assert_eq!(results.len(), WRITERS * 5);
    let mut saw_sync_failure = false;
    for result in results {
        match result {
            Ok(position) => panic!("acknowledged {position} after fdatasync failed"),
            Err(WalError::WriteFailed {
                op: WalIoOp::Fdatasync,
                ref path,
                ..
            }) => {
                assert!(path.starts_with(dir.path()));
                saw_sync_failure = true;
            }
            Err(WalError::Poisoned { ref cause }) => {
                assert!(cause.contains("fdatasync"), "{cause}")
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert!(
        saw_sync_failure,
        "the callers of the failed group get the fdatasync error itself"
    );

    // Even with the disk healthy again the WAL stays poisoned: after a failed fdatasync the
    // kernel may have dropped the pages, so no later sync could prove them durable.
    fail.store(false, Ordering::SeqCst);
    let error = wal
        .append(&[WalRecord::facts(b"later".to_vec())])
        .unwrap_err();
    assert!(matches!(error, WalError::Poisoned { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("poisoned") && message.contains("Restart"),
        "{message}"
    );
    assert!(matches!(
        wal.try_append(&[WalRecord::facts(b"later".to_vec())]),
        Err(WalError::Poisoned { .. })
    ));
    drop(wal);

    // A restart recovers the durable prefix. The failed batches were written but never
    // acknowledged, so they may or may not be replayed; the acknowledged ones must be.
    let batches = reopen_and_read_all(dir.path(), options).unwrap();
    assert!(batches.len() >= 10);
    for (n, batch) in batches.iter().take(10).enumerate() {
        assert_eq!(batch.records, vec![WalRecord::facts(vec![n as u8; 50])]);
    }
}

#[test]
fn fdatasync_failure_while_creating_a_segment_poisons_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_options(WalBackend::Pwrite);
    let fail = Arc::new(AtomicBool::new(false));
    let io = Box::new(FailingSync {
        inner: PwriteIo,
        fail: Arc::clone(&fail),
    });
    let wal = Wal::open_with_io(dir.path(), options.clone(), io).unwrap();
    // Fill the first segment until the next batch no longer fits, then fail: that batch
    // needs a rollover, whose segment header sync fails.
    const FRAME_BYTES: u64 = 72 + 13 + 4000;
    let mut last = None;
    while last
        .is_none_or(|p: WalPosition| p.offset_bytes + 2 * FRAME_BYTES <= options.segment_bytes_max)
    {
        last = Some(
            wal.append(&[WalRecord::facts(vec![1; 4000])])
                .unwrap()
                .wait()
                .unwrap(),
        );
    }
    assert_eq!(last.unwrap().segment_id, 1);
    fail.store(true, Ordering::SeqCst);
    match wal
        .append(&[WalRecord::facts(vec![2; 4000])])
        .unwrap()
        .wait()
    {
        Err(WalError::WriteFailed {
            op: WalIoOp::Fdatasync,
            path,
            ..
        }) => {
            assert_eq!(path, dir.path().join("wal-00000000000000000002.log"));
        }
        other => panic!("expected the new segment's fdatasync to fail, got {other:?}"),
    }
    assert!(matches!(
        wal.append(&[WalRecord::facts(vec![3])]),
        Err(WalError::Poisoned { .. })
    ));
    drop(wal);
    // Restart: the acknowledged batches are all there.
    let batches = reopen_and_read_all(dir.path(), options).unwrap();
    assert!(batches.len() as u64 >= last.unwrap().lsn);
}

/// The pwrite backend, recording per file (inode) how far it has been written and synced.
struct RecordingSync {
    inner: PwriteIo,
    synced_end_by_inode: Arc<std::sync::Mutex<std::collections::HashMap<u64, u64>>>,
}

impl WalIo for RecordingSync {
    fn name(&self) -> &'static str {
        "recording-fdatasync"
    }

    fn write_durable(
        &mut self,
        file: &File,
        offset_bytes: u64,
        bytes: &[u8],
    ) -> Result<(), WalIoError> {
        self.inner.write_durable(file, offset_bytes, bytes)?;
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap());
        let mut synced = self.synced_end_by_inode.lock().unwrap();
        let end = synced.entry(inode).or_default();
        *end = (*end).max(offset_bytes + bytes.len() as u64);
        Ok(())
    }
}

#[test]
fn every_acknowledgement_follows_the_fdatasync_that_covers_it() {
    const WRITERS: u64 = 8;
    const APPENDS_PER_WRITER: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let synced_end_by_inode = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let io = Box::new(RecordingSync {
        inner: PwriteIo,
        synced_end_by_inode: Arc::clone(&synced_end_by_inode),
    });
    let wal =
        Arc::new(Wal::open_with_io(dir.path(), small_options(WalBackend::Pwrite), io).unwrap());
    let handles: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let wal = Arc::clone(&wal);
            let synced_end_by_inode = Arc::clone(&synced_end_by_inode);
            let dir = dir.path().to_path_buf();
            thread::spawn(move || {
                for n in 0..APPENDS_PER_WRITER {
                    let payload_bytes = 10 + ((writer * 31 + n * 7) % 500) as usize;
                    let record = WalRecord::raft_entries(writer, vec![n as u8; payload_bytes]);
                    let position = wal.append(&[record]).unwrap().wait().unwrap();
                    let frame_end = position.offset_bytes + 72 + 13 + payload_bytes as u64;
                    let segment = dir.join(format!("wal-{:020}.log", position.segment_id));
                    let inode =
                        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(segment).unwrap());
                    let synced_end = synced_end_by_inode.lock().unwrap().get(&inode).copied();
                    assert!(
                        synced_end.is_some_and(|end| end >= frame_end),
                        "{position} acknowledged before an fdatasync covered it (synced to {synced_end:?})"
                    );
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    assert_eq!(wal.durable_next_lsn(), WRITERS * APPENDS_PER_WRITER + 1);
}
