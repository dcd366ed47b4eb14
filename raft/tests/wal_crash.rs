//! kill -9 loop on the real io_uring writer.
//!
//! A child process (`wal-crash-child`) appends from several threads and prints each record
//! id only after its batch is acknowledged. The parent SIGKILLs it at a random moment (seeded;
//! some kills land while the child is still opening/recovering the WAL), reopens the WAL and
//! checks that every record ever acknowledged is present exactly once, that no record appears
//! twice, and that each thread's records replay in the order they were appended.

mod wal_common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use calm_raft::wal::{Wal, WalBackend, WalOptions};
use wal_common::Rng;

const KILLS: u64 = 100;
const THREADS: u64 = 4;
/// Generous bound for a child to open the WAL; only reached if the child hangs.
const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// (iteration, thread, sequence)
type RecordId = (u64, u64, u64);

enum ChildLine {
    Ready(String),
    Ack(RecordId),
}

fn parse_line(line: &str) -> ChildLine {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("ready") => ChildLine::Ready(words.next().unwrap_or_default().to_string()),
        Some("ack") => {
            let mut number = || {
                words
                    .next()
                    .and_then(|w| w.parse::<u64>().ok())
                    .expect("ack line has three numbers")
            };
            ChildLine::Ack((number(), number(), number()))
        }
        _ => panic!("unexpected child output line {line:?}"),
    }
}

/// The same options as the child (it uses io_uring explicitly; so does the parent's reopen).
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

#[test]
fn every_acknowledged_record_survives_kill_9() {
    let seed = wal_common::seed("WAL_CRASH_SEED");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let expected_backend = wal_common::expected_uring_name(dir.path());
    let mut acked_ever: HashSet<RecordId> = HashSet::new();
    let mut torn_tails = 0;
    let mut kills_before_ready = 0;

    for iteration in 0..KILLS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wal-crash-child"))
            .arg(dir.path())
            .arg(iteration.to_string())
            .arg(THREADS.to_string())
            .arg(rng.next_u64().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wal-crash-child");
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines_rx) = mpsc::channel();
        let reader = thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match stdout.read_until(b'\n', &mut line) {
                    // A line without its newline was cut by the kill: it is no claim.
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.last() != Some(&b'\n') => return,
                    Ok(_) => {
                        if lines_tx
                            .send(parse_line(std::str::from_utf8(&line).unwrap()))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });

        // One kill in five lands at once, possibly during the child's open and recovery; the
        // rest after the child is appending.
        let kill_early = rng.range(0, 5) == 0;
        let mut acked_now = Vec::new();
        if kill_early {
            kills_before_ready += 1;
            thread::sleep(Duration::from_micros(rng.range(0, 3000)));
        } else {
            match lines_rx.recv_timeout(CHILD_READY_TIMEOUT) {
                Ok(ChildLine::Ready(backend)) => assert_eq!(
                    backend, expected_backend,
                    "the crash test runs the real io_uring writer"
                ),
                Ok(ChildLine::Ack(_)) => panic!("child acknowledged before it was ready"),
                Err(error) => panic!("child did not become ready: {error}"),
            }
            thread::sleep(Duration::from_micros(rng.range(1000, 40_000)));
        }
        child.kill().expect("SIGKILL the child");
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the child must die by our SIGKILL, not exit: {status}"
        );
        reader.join().unwrap();
        for line in lines_rx.try_iter() {
            match line {
                ChildLine::Ready(backend) => assert_eq!(backend, expected_backend),
                ChildLine::Ack(id) => acked_now.push(id),
            }
        }
        acked_ever.extend(acked_now.iter().copied());

        // Recover as a restarted node would, and check everything ever acknowledged.
        let wal = Wal::open(dir.path(), options())
            .unwrap_or_else(|e| panic!("iteration {iteration} (seed {seed}): {e}"));
        if wal.recovery_report().torn_tail.is_some() {
            torn_tails += 1;
        }
        let mut seen: HashMap<RecordId, u64> = HashMap::new();
        let mut last_sequence: HashMap<(u64, u64), u64> = HashMap::new();
        for batch in wal.read_from(1).unwrap() {
            let batch =
                batch.unwrap_or_else(|e| panic!("iteration {iteration} (seed {seed}): {e}"));
            for record in batch.records {
                let word = |i: usize| {
                    u64::from_le_bytes(record.payload[i * 8..i * 8 + 8].try_into().unwrap())
                };
                let id = (word(0), word(1), word(2));
                *seen.entry(id).or_default() += 1;
                if let Some(previous) = last_sequence.insert((id.0, id.1), id.2) {
                    assert!(
                        previous < id.2,
                        "seed {seed}: thread {:?} replays {} after {previous}",
                        (id.0, id.1),
                        id.2
                    );
                }
            }
        }
        for (id, count) in &seen {
            assert_eq!(
                *count, 1,
                "seed {seed}: record {id:?} replayed {count} times"
            );
        }
        for id in &acked_ever {
            assert!(
                seen.contains_key(id),
                "seed {seed}, iteration {iteration}: acknowledged record {id:?} is lost"
            );
        }
        drop(wal);
    }
    println!(
        "{KILLS} kills ({kills_before_ready} early), {} acknowledged records all recovered, {torn_tails} torn tails cut",
        acked_ever.len()
    );
    assert!(
        !acked_ever.is_empty(),
        "the children acknowledged nothing: the test exercised nothing"
    );
}
