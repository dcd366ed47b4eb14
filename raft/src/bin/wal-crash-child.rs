//! Test helper for `raft/tests/wal_crash.rs`: appends to a WAL from several threads through
//! the real io_uring writer and prints each record id to stdout only after its batch is
//! acknowledged, until it is killed.
//!
//! Usage: `wal-crash-child DIR ITERATION THREADS SEED`
//!
//! Output lines: `ready <backend>` once the WAL is open, then `ack <iteration> <thread>
//! <sequence>` per acknowledged record. A record's payload starts with those three numbers
//! (little-endian u64s) followed by filler, so the parent can match replayed records to acks.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use calm_raft::wal::{Wal, WalBackend, WalOptions, WalRecord};

/// Stops a child that nobody killed (the parent always kills much earlier).
const RECORDS_PER_THREAD_MAX: u64 = 1_000_000;
const FILLER_BYTES_MAX: u64 = 400;

/// The options of the crash test: small segments so that kills land around rollovers too.
fn options() -> WalOptions {
    WalOptions {
        segment_bytes_max: 256 * 1024,
        batch_bytes_max: 16 * 1024,
        batch_records_max: 8,
        group_bytes_max: 64 * 1024,
        backend: WalBackend::IoUring,
        ..WalOptions::default()
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: wal-crash-child DIR ITERATION THREADS SEED");
        return ExitCode::from(2);
    }
    let dir = &args[1];
    let parse = |index: usize| -> u64 {
        args[index]
            .parse()
            .unwrap_or_else(|_| panic!("argument {index} must be an unsigned integer"))
    };
    let (iteration, threads, seed) = (parse(2), parse(3), parse(4));
    let wal = match Wal::open(dir, options()) {
        Ok(wal) => Arc::new(wal),
        Err(error) => {
            eprintln!("wal-crash-child: cannot open the WAL: {error}");
            return ExitCode::from(3);
        }
    };
    println!("ready {}", wal.backend_name());
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || append_until_killed(&wal, iteration, thread, seed))
        })
        .collect();
    for handle in handles {
        if let Err(error) = handle.join().expect("appender thread panicked") {
            eprintln!("wal-crash-child: {error}");
            return ExitCode::from(4);
        }
    }
    ExitCode::SUCCESS
}

fn append_until_killed(wal: &Wal, iteration: u64, thread: u64, seed: u64) -> Result<(), String> {
    let mut rng = seed ^ (thread + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ iteration;
    let mut sequence = 0u64;
    let mut line = String::new();
    while sequence < RECORDS_PER_THREAD_MAX {
        let records_in_batch = 1 + next(&mut rng) % 4;
        let records: Vec<WalRecord> = (sequence..sequence + records_in_batch)
            .map(|record_sequence| {
                let mut payload = Vec::new();
                payload.extend_from_slice(&iteration.to_le_bytes());
                payload.extend_from_slice(&thread.to_le_bytes());
                payload.extend_from_slice(&record_sequence.to_le_bytes());
                payload.resize(
                    24 + (next(&mut rng) % FILLER_BYTES_MAX) as usize,
                    record_sequence as u8,
                );
                if record_sequence % 2 == 0 {
                    WalRecord::facts(payload)
                } else {
                    WalRecord::raft_entries(thread, payload)
                }
            })
            .collect();
        let ticket = wal
            .append(&records)
            .map_err(|e| format!("append failed: {e}"))?;
        ticket
            .wait()
            .map_err(|e| format!("append was not acknowledged: {e}"))?;
        // Only now, after the ack, does the parent learn about these records.
        line.clear();
        for record_sequence in sequence..sequence + records_in_batch {
            line.push_str(&format!("ack {iteration} {thread} {record_sequence}\n"));
        }
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(line.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|e| format!("stdout: {e}"))?;
        sequence += records_in_batch;
    }
    Ok(())
}

/// splitmix64.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
