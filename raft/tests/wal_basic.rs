//! The WAL's normal operation: round trips, rollover, group commit under concurrency,
//! async completion, backpressure, segment removal and option checks.

mod wal_common;

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::thread::{self, Thread};

use calm_raft::wal::{Wal, WalBackend, WalError, WalOptions, WalRecord, WalRecordKind};
use wal_common::{
    expected_uring_name, read_all, reopen_and_read_all, segment_paths, small_options,
};

fn every_kind(n: u64) -> Vec<WalRecord> {
    vec![
        WalRecord::facts(format!("facts {n}").into_bytes()),
        WalRecord::raft_vote(n, format!("vote {n}").into_bytes()),
        WalRecord::raft_entries(n + 1, vec![n as u8; 300]),
        WalRecord::raft_truncate(u64::MAX, Vec::new()),
        WalRecord::raft_purge(0, b"purge".to_vec()),
        WalRecord::raft_committed(7, b"c".to_vec()),
    ]
}

fn round_trip(backend: WalBackend) {
    let dir = tempfile::tempdir().unwrap();
    let mut written = Vec::new();
    {
        let wal = Wal::open(
            dir.path(),
            WalOptions {
                backend,
                ..WalOptions::default()
            },
        )
        .unwrap();
        let expected_backend = if backend == WalBackend::Pwrite {
            "pwrite"
        } else {
            expected_uring_name(dir.path())
        };
        assert_eq!(wal.backend_name(), expected_backend);
        for n in 0..20 {
            let records = every_kind(n);
            let position = wal.append(&records).unwrap().wait().unwrap();
            assert_eq!(position.lsn, n + 1);
            assert_eq!(position.segment_id, 1);
            written.push((position, records));
        }
        assert_eq!(wal.durable_next_lsn(), 21);
        // Read while open, from the middle.
        let from_middle: Vec<_> = wal.read_from(11).unwrap().map(Result::unwrap).collect();
        assert_eq!(from_middle.len(), 10);
        assert_eq!(from_middle[0].position, written[10].0);
    }
    let batches = reopen_and_read_all(
        dir.path(),
        WalOptions {
            backend,
            ..WalOptions::default()
        },
    )
    .unwrap();
    assert_eq!(batches.len(), written.len());
    for (batch, (position, records)) in batches.iter().zip(&written) {
        assert_eq!(&batch.position, position);
        assert_eq!(&batch.records, records);
    }
}

#[test]
fn round_trip_io_uring() {
    round_trip(WalBackend::IoUring);
}

/// The io_uring backend's write + fdatasync mode (what runs where O_DIRECT is refused), with
/// rollover and reopen: direct mode covers the other tests on a disk that allows it.
#[test]
fn round_trip_io_uring_with_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_options(WalBackend::IoUring);
    let payload_of = |n: u64| vec![(n % 251) as u8; 100 + (n as usize * 37) % 3000];
    {
        let io = calm_raft::wal::UringIo::new().unwrap();
        assert!(!io.is_direct());
        let wal = Wal::open_with_io(dir.path(), options.clone(), Box::new(io)).unwrap();
        assert_eq!(wal.backend_name(), "io_uring");
        for n in 0..100u64 {
            let position = wal
                .append(&[WalRecord::raft_entries(n % 3, payload_of(n))])
                .unwrap()
                .wait()
                .unwrap();
            assert_eq!(position.lsn, n + 1);
        }
    }
    let batches = reopen_and_read_all(dir.path(), options).unwrap();
    assert_eq!(batches.len(), 100);
    for (n, batch) in batches.iter().enumerate() {
        assert_eq!(batch.records[0].payload, payload_of(n as u64));
    }
    assert!(
        segment_paths(dir.path()).len() > 1,
        "the records span segments"
    );
}

/// Direct writes start and end inside blocks: every append of odd sizes, across restarts
/// (the first block's durable prefix is then read back, not cached) and rollovers, reads back
/// exactly, in either backend mode's reopen.
#[test]
fn direct_writes_of_unaligned_appends_survive_restarts_and_rollover() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_options(WalBackend::IoUring);
    let payload_of = |n: u64| vec![(n % 253) as u8 + 1; 1 + (n as usize * 977) % 9000];
    let mut lsn = 0u64;
    for restart in 0..4u64 {
        let wal = Wal::open(dir.path(), options.clone()).unwrap();
        assert_eq!(wal.backend_name(), expected_uring_name(dir.path()));
        for n in 0..40u64 {
            let n = restart * 40 + n;
            let position = wal
                .append(&[WalRecord::facts(payload_of(n))])
                .unwrap()
                .wait()
                .unwrap();
            lsn += 1;
            assert_eq!(position.lsn, lsn);
        }
    }
    for options in [options.clone(), small_options(WalBackend::Pwrite)] {
        let batches = reopen_and_read_all(dir.path(), options).unwrap();
        assert_eq!(batches.len() as u64, lsn);
        for (n, batch) in batches.iter().enumerate() {
            assert_eq!(batch.records[0].payload, payload_of(n as u64), "batch {n}");
        }
    }
    assert!(
        segment_paths(dir.path()).len() > 4,
        "the appends span segments"
    );
}

#[test]
fn round_trip_pwrite() {
    round_trip(WalBackend::Pwrite);
}

#[test]
fn record_kinds_carry_their_group() {
    assert_eq!(WalRecord::facts(Vec::new()).kind.group(), None);
    assert_eq!(
        WalRecord::raft_vote(3, Vec::new()).kind,
        WalRecordKind::RaftVote { group: 3 }
    );
    assert_eq!(
        WalRecord::raft_committed(9, Vec::new()).kind.group(),
        Some(9)
    );
}

#[test]
fn rollover_spans_many_segments_and_reopen_continues() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_options(WalBackend::IoUring);
    let payload_of = |n: u64| vec![(n % 251) as u8; 1000 + (n as usize * 37) % 3000];
    {
        let wal = Wal::open(dir.path(), options.clone()).unwrap();
        let tickets: Vec<_> = (0..300u64)
            .map(|n| {
                wal.append(&[WalRecord::raft_entries(n % 5, payload_of(n))])
                    .unwrap()
            })
            .collect();
        let positions: Vec<_> = tickets.into_iter().map(|t| t.wait().unwrap()).collect();
        for pair in positions.windows(2) {
            assert_eq!(pair[0].lsn + 1, pair[1].lsn);
            assert!(pair[0].segment_id <= pair[1].segment_id);
        }
        assert!(
            positions.last().unwrap().segment_id >= 10,
            "300 KiB-ish of batches in 64 KiB segments"
        );
    }
    let segments = segment_paths(dir.path());
    assert!(segments.len() >= 10);
    for path in &segments {
        assert!(std::fs::metadata(path).unwrap().len() <= options.segment_bytes_max);
    }
    {
        // Reopen: appends continue after the last batch, in the last segment.
        let wal = Wal::open(dir.path(), options.clone()).unwrap();
        assert_eq!(wal.durable_next_lsn(), 301);
        let position = wal
            .append(&[WalRecord::facts(b"after reopen".to_vec())])
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(position.lsn, 301);
        assert_eq!(
            segment_paths(dir.path()).len(),
            segments.len(),
            "no new segment just for reopening"
        );
    }
    let batches = reopen_and_read_all(dir.path(), options).unwrap();
    assert_eq!(batches.len(), 301);
    for (n, batch) in batches.iter().take(300).enumerate() {
        assert_eq!(
            batch.records,
            vec![WalRecord::raft_entries(n as u64 % 5, payload_of(n as u64))]
        );
    }
    assert_eq!(
        batches[300].records,
        vec![WalRecord::facts(b"after reopen".to_vec())]
    );
}

#[test]
fn concurrent_writers_each_acked_record_replays_once_in_order() {
    const WRITERS: u64 = 16;
    const BATCHES_PER_WRITER: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    let options = small_options(WalBackend::IoUring);
    let wal = Arc::new(Wal::open(dir.path(), options.clone()).unwrap());
    let handles: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let wal = Arc::clone(&wal);
            thread::spawn(move || {
                let mut acked = Vec::new();
                for n in 0..BATCHES_PER_WRITER {
                    // 1..=3 records per batch; the payload names (writer, sequence).
                    let records: Vec<_> = (0..1 + n % 3)
                        .map(|i| {
                            WalRecord::raft_entries(
                                writer,
                                format!("{writer}:{n}:{i}").into_bytes(),
                            )
                        })
                        .collect();
                    let position = wal.append(&records).unwrap().wait().unwrap();
                    acked.push((position.lsn, records));
                }
                acked
            })
        })
        .collect();
    let mut acked_by_lsn = HashMap::new();
    for handle in handles {
        for (lsn, records) in handle.join().unwrap() {
            assert!(
                acked_by_lsn.insert(lsn, records).is_none(),
                "two acks for LSN {lsn}"
            );
        }
    }
    drop(wal);
    let batches = reopen_and_read_all(dir.path(), options).unwrap();
    assert_eq!(batches.len() as u64, WRITERS * BATCHES_PER_WRITER);
    let mut next_per_writer = vec![0u64; WRITERS as usize];
    for batch in &batches {
        assert_eq!(
            acked_by_lsn.remove(&batch.position.lsn).as_ref(),
            Some(&batch.records)
        );
        let text = String::from_utf8(batch.records[0].payload.clone()).unwrap();
        let mut parts = text.split(':').map(|p| p.parse::<u64>().unwrap());
        let (writer, n) = (parts.next().unwrap(), parts.next().unwrap());
        assert_eq!(
            n, next_per_writer[writer as usize],
            "writer {writer}'s batches replay in append order"
        );
        next_per_writer[writer as usize] += 1;
    }
    assert!(acked_by_lsn.is_empty());
    assert!(next_per_writer.iter().all(|&n| n == BATCHES_PER_WRITER));
}

/// Wakes a parked thread: enough of an executor to drive one future.
struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

fn block_on<F: Future>(future: F) -> F::Output {
    let waker = Arc::new(ThreadWaker(thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => return output,
            Poll::Pending => thread::park(),
        }
    }
}

#[test]
fn tickets_are_futures() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let positions = block_on(async {
        let first = wal
            .append(&[WalRecord::raft_vote(1, b"term 2".to_vec())])
            .unwrap();
        let second = wal
            .append(&[WalRecord::raft_entries(1, b"entry".to_vec())])
            .unwrap();
        (second.await.unwrap(), first.await.unwrap())
    });
    assert_eq!((positions.1.lsn, positions.0.lsn), (1, 2));
}

#[test]
fn try_append_reports_a_full_queue_and_append_waits_for_space() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        queue_records_max: 64,
        batch_records_max: 64,
        ..small_options(WalBackend::Pwrite)
    };
    let wal = Wal::open(dir.path(), options).unwrap();
    let batch: Vec<_> = (0..64).map(|i| WalRecord::facts(vec![i; 10])).collect();
    // Keep the queue saturated: each 64-record batch fills it, so while one is queued the
    // next try_append must be refused. Retry until a refusal is observed (the writer may
    // drain the queue in between); every append must still complete.
    let mut tickets = Vec::new();
    let mut refused = None;
    for _ in 0..10_000 {
        match wal.try_append(&batch) {
            Ok(ticket) => tickets.push(ticket),
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
    }
    match refused {
        Some(WalError::QueueFull {
            queue_records_max: 64,
            ..
        }) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
    // The blocking append waits for space rather than failing.
    tickets.push(wal.append(&batch).unwrap());
    let count = tickets.len() as u64;
    let last = tickets
        .into_iter()
        .map(|t| t.wait().unwrap())
        .last()
        .unwrap();
    assert_eq!(last.lsn, count);
}

#[test]
fn batch_limits_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small_options(WalBackend::Pwrite)).unwrap();
    assert!(matches!(wal.append(&[]), Err(WalError::EmptyBatch)));
    let too_many: Vec<_> = (0..65).map(|_| WalRecord::facts(Vec::new())).collect();
    assert!(matches!(
        wal.append(&too_many),
        Err(WalError::TooManyRecords {
            records: 65,
            batch_records_max: 64
        })
    ));
    let too_big = [WalRecord::facts(vec![0; 16 * 1024])];
    assert!(matches!(
        wal.append(&too_big),
        Err(WalError::BatchTooLarge {
            batch_bytes_max: 16384,
            ..
        })
    ));
    // The largest batch that fits is accepted.
    let fits = [WalRecord::facts(vec![0; 16 * 1024 - 72 - 13])];
    wal.append(&fits).unwrap().wait().unwrap();
}

#[test]
fn invalid_options_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        WalOptions {
            segment_bytes_max: 10,
            ..WalOptions::default()
        },
        WalOptions {
            batch_bytes_max: 128 << 20,
            ..WalOptions::default()
        },
        WalOptions {
            batch_records_max: 0,
            ..WalOptions::default()
        },
        WalOptions {
            group_bytes_max: 1024,
            ..WalOptions::default()
        },
        WalOptions {
            queue_records_max: 1,
            ..WalOptions::default()
        },
        WalOptions {
            queue_bytes_max: 1,
            ..WalOptions::default()
        },
    ];
    for options in cases {
        match Wal::open(dir.path(), options.clone()) {
            Err(WalError::InvalidOptions { reason }) => assert!(!reason.is_empty()),
            other => panic!("{options:?} was accepted: {other:?}"),
        }
    }
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert!(matches!(
        Wal::open(dir.path(), WalOptions::default()),
        Err(WalError::Locked { .. })
    ));
}

#[test]
fn remove_segments_before_keeps_what_a_checkpoint_does_not_cover() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_options(WalBackend::IoUring);
    let wal = Wal::open(dir.path(), options.clone()).unwrap();
    let positions: Vec<_> = (0..200u64)
        .map(|n| {
            wal.append(&[WalRecord::facts(vec![n as u8; 2000])])
                .unwrap()
                .wait()
                .unwrap()
        })
        .collect();
    let checkpoint = positions[120];
    let segments_before = segment_paths(dir.path()).len();
    let removed = wal.remove_segments_before(checkpoint).unwrap();
    assert_eq!(removed as u64, checkpoint.segment_id - 1);
    assert_eq!(segment_paths(dir.path()).len(), segments_before - removed);
    assert!(wal.oldest_lsn() <= checkpoint.lsn);
    // Replay from the checkpoint still works; before the oldest kept segment it is refused.
    let replayed: Vec<_> = wal
        .read_from(checkpoint.lsn)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(replayed.first().unwrap().position, checkpoint);
    assert_eq!(replayed.len(), 200 - 120);
    assert!(matches!(
        wal.read_from(1),
        Err(WalError::LsnRemoved {
            requested_lsn: 1,
            ..
        })
    ));
    // The active segment is never removed, even for a position past it.
    let last = *positions.last().unwrap();
    wal.remove_segments_before(calm_raft::wal::WalPosition {
        segment_id: last.segment_id + 5,
        ..last
    })
    .unwrap();
    assert_eq!(segment_paths(dir.path()).len(), 1);
    drop(wal);
    // A WAL whose oldest segments were removed reopens and keeps its LSNs.
    let wal = Wal::open(dir.path(), options).unwrap();
    assert_eq!(wal.durable_next_lsn(), 201);
    let batches = read_all(&wal);
    assert_eq!(batches.last().unwrap().position, last);
}

#[test]
fn remove_segments_below_lsn_keeps_the_segment_holding_that_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small_options(WalBackend::Pwrite)).unwrap();
    let positions: Vec<_> = (0..200u64)
        .map(|n| {
            wal.append(&[WalRecord::facts(vec![n as u8; 2000])])
                .unwrap()
                .wait()
                .unwrap()
        })
        .collect();
    let keep_from = positions[150];
    assert!(keep_from.segment_id > 2);
    // Below the oldest LSN nothing goes.
    assert_eq!(wal.remove_segments_below_lsn(1).unwrap(), 0);
    let removed = wal.remove_segments_below_lsn(keep_from.lsn).unwrap();
    assert_eq!(removed as u64, keep_from.segment_id - 1);
    assert!(wal.oldest_lsn() <= keep_from.lsn);
    let replayed: Vec<_> = wal
        .read_from(keep_from.lsn)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(replayed.len(), 50);
    assert_eq!(replayed[0].position, keep_from);
}

/// Waits for a ticket on another thread, failing (instead of hanging the suite) if it does not
/// resolve within `bound_s` seconds: a liveness bound, not a timing assertion.
fn wait_bounded(ticket: calm_raft::wal::AppendTicket, bound_s: u64) -> calm_raft::wal::WalPosition {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(ticket.wait());
    });
    rx.recv_timeout(std::time::Duration::from_secs(bound_s))
        .expect("the ticket resolves")
        .unwrap()
}

fn facts_record(tag: &str) -> Vec<WalRecord> {
    vec![WalRecord::facts(tag.as_bytes().to_vec())]
}

#[test]
fn a_lazy_append_alone_is_written_after_its_wait() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    // Nothing else is appended: the writer writes it once LAZY_WRITE_AFTER has passed.
    let position = wait_bounded(wal.append_lazy(&facts_record("lazy")).unwrap(), 30);
    assert_eq!(position.lsn, 1);
    assert_eq!(wal.durable_next_lsn(), 2);
    drop(wal);
    let batches = reopen_and_read_all(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].records, facts_record("lazy"));
}

#[test]
fn lazy_and_eager_appends_keep_append_order() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small_options(WalBackend::Auto)).unwrap();
    let mut tickets = Vec::new();
    let mut expected = Vec::new();
    for n in 0..200 {
        let tag = format!("batch {n}");
        // Runs of lazy appends between eager ones, some long enough to wait out their time.
        let ticket = if n % 7 == 0 || n % 50 == 49 {
            wal.append(&facts_record(&tag)).unwrap()
        } else {
            wal.append_lazy(&facts_record(&tag)).unwrap()
        };
        tickets.push(ticket);
        expected.push(facts_record(&tag));
    }
    let positions: Vec<_> = tickets.into_iter().map(|t| wait_bounded(t, 30)).collect();
    for (n, position) in positions.iter().enumerate() {
        assert_eq!(position.lsn, n as u64 + 1, "LSNs follow append order");
    }
    drop(wal);
    let batches = reopen_and_read_all(dir.path(), small_options(WalBackend::Auto)).unwrap();
    let records: Vec<_> = batches.into_iter().map(|b| b.records).collect();
    assert_eq!(records, expected);
}

#[test]
fn closing_writes_the_lazy_appends_still_queued() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let tickets: Vec<_> = (0..10)
        .map(|n| {
            wal.append_lazy(&facts_record(&format!("lazy {n}")))
                .unwrap()
        })
        .collect();
    drop(wal);
    for ticket in tickets {
        wait_bounded(ticket, 30);
    }
    let batches = reopen_and_read_all(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(batches.len(), 10);
}
