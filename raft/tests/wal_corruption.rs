//! Recovery on damaged segments: a torn tail of the last segment is cut off and everything
//! before it survives; any other damage is refused with an error naming file and offset,
//! and the files are left exactly as they were.

mod wal_common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use calm_raft::wal::{Wal, WalBackend, WalError, WalOptions, WalPosition, WalRecord};
use wal_common::{Rng, reopen_and_read_all, segment_paths, small_options};

fn options() -> WalOptions {
    small_options(WalBackend::IoUring)
}

fn record(n: u64) -> WalRecord {
    WalRecord::raft_entries(
        n % 3,
        format!("record {n} ")
            .repeat(20 + (n as usize % 100))
            .into_bytes(),
    )
}

/// Writes `count` single-record batches and returns their positions.
fn write_batches(dir: &Path, count: u64) -> Vec<WalPosition> {
    let wal = Wal::open(dir, options()).unwrap();
    (0..count)
        .map(|n| wal.append(&[record(n)]).unwrap().wait().unwrap())
        .collect()
}

fn segment_path(dir: &Path, position: &WalPosition) -> PathBuf {
    dir.join(format!("wal-{:020}.log", position.segment_id))
}

fn flip_byte(path: &Path, offset_bytes: u64) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset_bytes).unwrap();
    file.write_all_at(&[byte[0] ^ 0x04], offset_bytes).unwrap();
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    segment_paths(dir)
        .into_iter()
        .map(|path| (path.clone(), fs::read(&path).unwrap()))
        .collect()
}

/// Opening must fail with `Corrupt` at `path`/`offset_bytes`, mention both in its message,
/// and leave every segment byte-for-byte unchanged.
fn assert_refused(dir: &Path, path: &Path, offset_bytes: u64) {
    let before = snapshot(dir);
    match Wal::open(dir, options()) {
        Err(error @ WalError::Corrupt { .. }) => {
            let WalError::Corrupt {
                path: error_path,
                offset_bytes: error_offset,
                ..
            } = &error
            else {
                unreachable!()
            };
            assert_eq!(error_path, path);
            assert_eq!(*error_offset, offset_bytes);
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(
                message.contains(&format!("offset {offset_bytes}")),
                "{message}"
            );
            println!("refused as expected: {message}");
        }
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("a damaged WAL was opened"),
    }
    assert_eq!(
        snapshot(dir),
        before,
        "a refused open must not modify any segment"
    );
}

fn assert_records(dir: &Path, count: u64) {
    let batches = reopen_and_read_all(dir, options()).unwrap();
    assert_eq!(batches.len() as u64, count);
    for (n, batch) in batches.iter().enumerate() {
        assert_eq!(batch.records, vec![record(n as u64)]);
    }
}

#[test]
fn a_last_batch_cut_mid_frame_is_cut_off_and_appends_continue() {
    let seed = wal_common::seed("WAL_TORN_SEED");
    let mut rng = Rng(seed);
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let positions = write_batches(dir.path(), 60);
        let last = positions.last().unwrap();
        let path = segment_path(dir.path(), last);
        let frame_end = fs::read(&path).unwrap()[last.offset_bytes as usize..]
            .iter()
            .rposition(|&b| b != 0)
            .unwrap() as u64
            + last.offset_bytes
            + 1;
        // Cut anywhere inside the last frame (header or body).
        let cut = rng.range(last.offset_bytes + 1, frame_end);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        assert_records(dir.path(), 59);
        // The cut is durable: a new append takes the torn batch's LSN and place.
        {
            let wal = Wal::open(dir.path(), options()).unwrap();
            let position = wal.append(&[record(59)]).unwrap().wait().unwrap();
            assert_eq!(position, *last);
        }
        assert_records(dir.path(), 60);
    }
}

#[test]
fn garbage_over_the_last_batch_is_a_torn_tail() {
    let seed = wal_common::seed("WAL_TORN_SEED");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let positions = write_batches(dir.path(), 40);
    let last = positions.last().unwrap();
    let path = segment_path(dir.path(), last);
    // Overwrite the second half of the last frame and some bytes after it with random bytes,
    // as an interrupted write of garbage would.
    let garbage: Vec<u8> = (0..300).map(|_| rng.next_u64() as u8 | 1).collect();
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&garbage, last.offset_bytes + 40).unwrap();
    assert_records(dir.path(), 39);
}

#[test]
fn garbage_after_the_last_batch_is_cut_off_and_all_batches_survive() {
    let dir = tempfile::tempdir().unwrap();
    let options_without_preallocation = WalOptions {
        preallocate: false,
        ..options()
    };
    {
        let wal = Wal::open(dir.path(), options_without_preallocation.clone()).unwrap();
        for n in 0..30 {
            wal.append(&[record(n)]).unwrap().wait().unwrap();
        }
    }
    let last_segment = segment_paths(dir.path()).pop().unwrap();
    let length_before = fs::metadata(&last_segment).unwrap().len();
    fs::OpenOptions::new()
        .append(true)
        .open(&last_segment)
        .unwrap()
        .write_all(b"CALMWALB half a frame header")
        .unwrap();
    let batches = reopen_and_read_all(dir.path(), options_without_preallocation).unwrap();
    assert_eq!(batches.len(), 30);
    // Cut at the last batch's end (a direct-mode WAL had padded its last block with zeros,
    // so that end may lie before `length_before`).
    let after = fs::read(&last_segment).unwrap();
    assert!(
        after.len() as u64 <= length_before,
        "the garbage was cut off"
    );
    let garbage = b"half a frame header";
    assert!(
        !after.windows(garbage.len()).any(|w| w == garbage),
        "the garbage was cut off"
    );
}

#[test]
fn a_bit_flip_in_a_middle_segment_is_refused_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write_batches(dir.path(), 400);
    let victim = positions.iter().find(|p| p.segment_id == 2).unwrap();
    let path = segment_path(dir.path(), victim);
    flip_byte(&path, victim.offset_bytes + 80);
    assert_refused(dir.path(), &path, victim.offset_bytes);
}

#[test]
fn a_bit_flip_in_the_last_segment_followed_by_valid_batches_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write_batches(dir.path(), 400);
    let last_segment_id = positions.last().unwrap().segment_id;
    let in_last: Vec<_> = positions
        .iter()
        .filter(|p| p.segment_id == last_segment_id)
        .collect();
    assert!(in_last.len() >= 3);
    // The second-to-last batch: damaged, but a valid batch follows it, so not provably torn.
    let victim = in_last[in_last.len() - 2];
    let path = segment_path(dir.path(), victim);
    flip_byte(&path, victim.offset_bytes + 75);
    assert_refused(dir.path(), &path, victim.offset_bytes);
    // Damage to a frame header's length field is refused the same way.
    flip_byte(&path, victim.offset_bytes + 75);
    flip_byte(&path, victim.offset_bytes + 9);
    assert_refused(dir.path(), &path, victim.offset_bytes);
}

#[test]
fn a_bit_flip_in_a_segment_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write_batches(dir.path(), 400);
    let last = positions.last().unwrap();
    let path = segment_path(dir.path(), last);
    flip_byte(&path, 20);
    assert_refused(dir.path(), &path, 0);
}

#[test]
fn a_missing_middle_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), 400);
    let segments = segment_paths(dir.path());
    assert!(segments.len() >= 4);
    fs::remove_file(&segments[1]).unwrap();
    assert_refused(dir.path(), &segments[2], 0);
}

#[test]
fn a_stale_segment_from_another_life_breaks_the_chain() {
    // Two WALs with the same shape but different contents: segment 3 of one dropped into the
    // other verifies on its own, but does not continue the other's hash chain.
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    write_batches(ours.path(), 400);
    {
        let wal = Wal::open(theirs.path(), options()).unwrap();
        for n in 0..400 {
            let mut changed = record(n);
            changed.payload[0] ^= 1;
            wal.append(&[changed]).unwrap().wait().unwrap();
        }
    }
    let target = ours.path().join("wal-00000000000000000003.log");
    fs::copy(theirs.path().join("wal-00000000000000000003.log"), &target).unwrap();
    assert_refused(ours.path(), &target, 0);
}

#[test]
fn reordered_batches_in_a_segment_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Batches of equal size, so swapping two keeps every frame aligned and individually valid.
    let positions = {
        let wal = Wal::open(dir.path(), options()).unwrap();
        (0..20u64)
            .map(|n| {
                wal.append(&[WalRecord::facts(format!("{n:04}").into_bytes())])
                    .unwrap()
                    .wait()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (positions[5], positions[6]);
    let path = segment_path(dir.path(), &a);
    let bytes = fs::read(&path).unwrap();
    let frame_bytes = (b.offset_bytes - a.offset_bytes) as usize;
    let (a_at, b_at) = (a.offset_bytes as usize, b.offset_bytes as usize);
    let mut swapped = bytes.clone();
    swapped[a_at..a_at + frame_bytes].copy_from_slice(&bytes[b_at..b_at + frame_bytes]);
    swapped[b_at..b_at + frame_bytes].copy_from_slice(&bytes[a_at..a_at + frame_bytes]);
    fs::write(&path, swapped).unwrap();
    assert_refused(dir.path(), &path, a.offset_bytes);
}

#[test]
fn an_interrupted_segment_creation_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let positions = write_batches(dir.path(), 100);
    let last = positions.last().unwrap();
    // A crash after creating the next segment file but before its header was durable.
    let next = dir
        .path()
        .join(format!("wal-{:020}.log", last.segment_id + 1));
    fs::write(&next, vec![0u8; 4096]).unwrap();
    assert_records(dir.path(), 100);
    assert!(!next.exists());
}
