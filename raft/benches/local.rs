//! Fast-path admission benchmark: durable counter adds through `LocalState`, admitted one op
//! at a time (one WAL append and ticket each, as `Kv.Write` does) against a `FastBatch` of
//! 100 (one append per call, as `Kv.Batch` does).
//!
//! Run: `cargo bench -p calm-raft --bench local` (`WAL_BENCH_DIR` picks the disk, as for the
//! WAL bench). Each mode admits `ROUNDS` rounds of 100 adds on 100 of `KEYS` counters and
//! waits for each round to be durable, like a client waiting for its Batch; it reports facts
//! per second and this process's CPU per fact (the WAL writer thread included).

use std::path::PathBuf;
use std::time::Instant;

use calm_kernel::rules::RuleSet;
use calm_kernel::{HlcTimestamp, Mode, Op};
use calm_raft::local::{LocalOptions, LocalState};

const KEYS: usize = 1_000;
const OPS_PER_ROUND: usize = 100;
const ROUNDS: usize = 2_000;

fn main() {
    let base = std::env::var_os("WAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!(
        "local admission bench in {}: {ROUNDS} rounds of {OPS_PER_ROUND} counter adds on {KEYS} keys",
        base.display()
    );
    for mode in ["one op at a time", "FastBatch of 100"] {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
        let (mut state, _) = LocalState::open(dir.path(), 1, rules, LocalOptions::default())
            .expect("a new data directory opens");
        let keys: Vec<Vec<u8>> = (0..KEYS)
            .map(|k| format!("bench-{k:010}").into_bytes())
            .collect();
        for key in &keys {
            // Create each counter as its Raft group would.
            let replica = state.replica_mut();
            let cmd = replica
                .prepare_command(key, &Op::CounterAdd { delta: 0 }, HlcTimestamp(1))
                .unwrap();
            replica.apply_command(&cmd).unwrap();
        }
        let add = Op::CounterAdd { delta: 1 };
        let cpu_before = process_cpu_us();
        let started = Instant::now();
        let mut hlc = 10;
        for round in 0..ROUNDS {
            let first = round * OPS_PER_ROUND % KEYS;
            let round_keys = (first..first + OPS_PER_ROUND).map(|k| &keys[k % KEYS]);
            let last = if mode == "one op at a time" {
                let mut last = None;
                for key in round_keys {
                    hlc += 1;
                    let admitted = state.admit(key, &add, HlcTimestamp(hlc)).unwrap().unwrap();
                    last = admitted.durable;
                }
                last
            } else {
                let mut batch = state.fast_batch();
                for key in round_keys {
                    hlc += 1;
                    batch.admit(key, &add, HlcTimestamp(hlc)).unwrap().unwrap();
                }
                batch.finish().unwrap()
            };
            // Appends are durable in order: the last ticket covers the round.
            last.expect("facts were appended").wait().unwrap();
        }
        let elapsed = started.elapsed();
        let cpu_us = process_cpu_us() - cpu_before;
        let facts = (ROUNDS * OPS_PER_ROUND) as f64;
        println!(
            "{mode:<18} {:>9.0} facts/s  {:>6.2} µs CPU per fact  ({facts} facts in {:.2} s)",
            facts / elapsed.as_secs_f64(),
            cpu_us as f64 / facts,
            elapsed.as_secs_f64()
        );
    }
}

/// User + system CPU of this process so far, in microseconds.
fn process_cpu_us() -> u64 {
    // SAFETY: getrusage fills the struct we pass.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}
