//! WAL benchmark: durable-append latency and group-commit throughput.
//!
//! Run: `cargo bench -p calm-raft --bench wal` (set `WAL_BENCH_DIR` to choose the disk; the
//! default is the system temp dir, which must be a real disk, not tmpfs, for the numbers to
//! mean anything).
//!
//! Reports, for each backend:
//! - the latency of one durable append (single writer, sequential, one 100-byte record):
//!   p50 / p99 / p99.9;
//! - durable records/s with 64 concurrent writers of one 100-byte record per append (group
//!   commit), and their append latency;
//!
//! plus the floor: a raw 100-byte pwrite + fdatasync into a preallocated file.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use calm_raft::wal::{Wal, WalBackend, WalOptions, WalRecord};

const RECORD_BYTES: usize = 100;
const SEQUENTIAL_APPENDS: usize = 5_000;
const WARMUP_APPENDS: usize = 300;
const CONCURRENT_WRITERS: usize = 64;
const CONCURRENT_APPENDS_PER_WRITER: usize = 2_000;

fn main() {
    let base = std::env::var_os("WAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!(
        "WAL bench in {} ({} CPUs)",
        base.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    raw_fdatasync_floor(&base);
    for backend in [WalBackend::IoUring, WalBackend::Pwrite] {
        sequential(&base, backend);
        concurrent(&base, backend);
    }
}

fn raw_fdatasync_floor(base: &Path) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("floor"))
        .unwrap();
    // SAFETY: fallocate on an fd we own.
    assert_eq!(
        unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, 64 << 20) },
        0
    );
    file.sync_all().unwrap();
    let record = [7u8; RECORD_BYTES];
    let mut latencies = Vec::with_capacity(SEQUENTIAL_APPENDS);
    for n in 0..WARMUP_APPENDS + SEQUENTIAL_APPENDS {
        let start = Instant::now();
        file.write_all_at(&record, (n * RECORD_BYTES) as u64)
            .unwrap();
        file.sync_data().unwrap();
        if n >= WARMUP_APPENDS {
            latencies.push(start.elapsed());
        }
    }
    println!(
        "floor   raw pwrite+fdatasync 100 B (preallocated): {}",
        summary(&mut latencies)
    );
}

fn open(base: &Path, backend: WalBackend) -> (tempfile::TempDir, Wal) {
    let dir = tempfile::tempdir_in(base).unwrap();
    let wal = Wal::open(
        dir.path(),
        WalOptions {
            backend,
            ..WalOptions::default()
        },
    )
    .unwrap();
    (dir, wal)
}

fn sequential(base: &Path, backend: WalBackend) {
    let (_dir, wal) = open(base, backend);
    let record = [WalRecord::facts(vec![7; RECORD_BYTES])];
    let mut latencies = Vec::with_capacity(SEQUENTIAL_APPENDS);
    for n in 0..WARMUP_APPENDS + SEQUENTIAL_APPENDS {
        let start = Instant::now();
        wal.append(&record).unwrap().wait().unwrap();
        if n >= WARMUP_APPENDS {
            latencies.push(start.elapsed());
        }
    }
    println!(
        "{:<8}1 writer, durable append of 1 x 100 B: {}",
        wal.backend_name(),
        summary(&mut latencies)
    );
}

fn concurrent(base: &Path, backend: WalBackend) {
    let (_dir, wal) = open(base, backend);
    let wal = Arc::new(wal);
    let barrier = Arc::new(Barrier::new(CONCURRENT_WRITERS + 1));
    let writers: Vec<_> = (0..CONCURRENT_WRITERS)
        .map(|writer| {
            let wal = Arc::clone(&wal);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let record = [WalRecord::raft_entries(
                    writer as u64,
                    vec![writer as u8; RECORD_BYTES],
                )];
                let mut latencies = Vec::with_capacity(CONCURRENT_APPENDS_PER_WRITER);
                barrier.wait();
                for _ in 0..CONCURRENT_APPENDS_PER_WRITER {
                    let start = Instant::now();
                    wal.append(&record).unwrap().wait().unwrap();
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut latencies: Vec<Duration> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let elapsed = start.elapsed();
    let records = CONCURRENT_WRITERS * CONCURRENT_APPENDS_PER_WRITER;
    let batches_per_sync = records as f64 / (wal.durable_next_lsn() - 1) as f64;
    assert!(
        (batches_per_sync - 1.0).abs() < f64::EPSILON,
        "one record per batch"
    );
    println!(
        "{:<8}{CONCURRENT_WRITERS} writers, 1 x 100 B per append: {:.0} durable records/s ({records} in {:.2} s); append latency {}",
        wal.backend_name(),
        records as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        summary(&mut latencies)
    );
}

fn summary(latencies: &mut [Duration]) -> String {
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    format!(
        "p50 {:>4} µs  p99 {:>5} µs  p99.9 {:>5} µs  (n = {})",
        at(0.50).as_micros(),
        at(0.99).as_micros(),
        at(0.999).as_micros(),
        latencies.len()
    )
}
