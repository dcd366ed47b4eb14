//! kill -9 loop over the whole durable fast path: kernel replica + io_uring WAL + RocksDB
//! store + checkpoints.
//!
//! A child process (this test binary re-run with `CALM_LOCAL_CRASH_DIR` set) recovers the data
//! directory, then admits counter adds of 1 on four keys, printing each only after the WAL
//! says it is durable; every 16 acks it persists to the store, every 64 it checkpoints (which
//! also deletes WAL segments). The parent SIGKILLs it at a seeded random moment and recovers
//! the directory itself. Every 10th round it first damages the live store, so recovery must
//! reject it, restore the newest verified checkpoint and replay a longer WAL tail.
//!
//! After every recovery: each key's value is at least the number of acknowledged adds on it
//! (none lost), and the sum of all values equals the number of this node's facts in the
//! version vector (none applied twice, none half-applied).

use calm_kernel::rules::RuleSet;
use calm_kernel::{Admitted, HlcTimestamp, Mode, Op, Value};
use calm_raft::local::{LocalOptions, LocalState, RecoveryReport};
use calm_raft::wal::{WalBackend, WalOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEYS: [&[u8]; 4] = [b"c:0", b"c:1", b"c:2", b"c:3"];
const ROUNDS: u64 = 50;
const NODE: u64 = 1;
/// Bounds every child: it stops by itself after this many acks or this long.
const CHILD_ACKS_MAX: u64 = 200_000;
const CHILD_TIME_MAX: Duration = Duration::from_secs(30);

fn options() -> LocalOptions {
    LocalOptions {
        wal: WalOptions {
            // Small segments so checkpoints really delete WAL files during the test.
            segment_bytes_max: 16 * 1024,
            batch_bytes_max: 4 * 1024,
            group_bytes_max: 8 * 1024,
            backend: WalBackend::IoUring,
            ..WalOptions::default()
        },
        checkpoints_kept: 2,
        ..LocalOptions::default()
    }
}

fn open(dir: &Path) -> (LocalState, RecoveryReport) {
    let rules = RuleSet::new(Mode::Hybrid).compile().unwrap();
    LocalState::open(dir, NODE, rules, options()).expect("recovery succeeds")
}

fn counter(state: &LocalState, key: &[u8]) -> i64 {
    match state.replica().read(key) {
        Some(Value::Counter(v)) => v,
        other => panic!("key {key:?} is {other:?}"),
    }
}

/// The child: recover, create keys on first start, then admit until killed.
#[test]
fn local_crash_child() {
    let Ok(dir) = std::env::var("CALM_LOCAL_CRASH_DIR") else {
        return; // Only meaningful when run by the parent below.
    };
    let (mut state, _) = open(Path::new(&dir));
    if state.replica().read(KEYS[0]).is_none() {
        // Keys are created in Raft order in the real node; here there is no Raft group, so
        // create them locally and make that durable with a checkpoint before any fact.
        for key in KEYS {
            let replica = state.replica_mut();
            let cmd = replica
                .prepare_command(key, &Op::CounterAdd { delta: 0 }, HlcTimestamp(1))
                .unwrap();
            replica.apply_command(&cmd).unwrap();
        }
    }
    // A checkpoint at every start (besides the periodic ones) makes WAL truncation happen
    // regardless of how long each child lives.
    state.checkpoint().unwrap();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "calm-ready").unwrap();
    out.flush().unwrap();
    let started = Instant::now();
    for i in 0..CHILD_ACKS_MAX {
        if started.elapsed() > CHILD_TIME_MAX {
            break;
        }
        let k = (i % KEYS.len() as u64) as usize;
        let admit = state
            .admit(KEYS[k], &Op::CounterAdd { delta: 1 }, HlcTimestamp(2 + i))
            .unwrap()
            .expect("a hybrid counter add is admitted");
        let Admitted::Local { id, .. } = admit.admitted else {
            panic!("fast path expected, got {:?}", admit.admitted);
        };
        admit.durable.expect("a fact was appended").wait().unwrap();
        writeln!(out, "calm-ack {k} {}", id.seq).unwrap();
        out.flush().unwrap();
        if i % 64 == 63 {
            state.checkpoint().unwrap();
        } else if i % 16 == 15 {
            state.persist().unwrap();
        }
    }
}

/// SplitMix64: a seeded, printed source of kill delays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Make the live store unopenable, as a lost or corrupted file would.
fn damage_store(dir: &Path) {
    let current = dir.join("state").join("CURRENT");
    std::fs::write(&current, b"MANIFEST-999999\n").unwrap();
}

#[test]
fn acknowledged_adds_survive_kill_9_exactly_once() {
    let seed = std::env::var("CALM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00C0_FFEE_u64);
    println!("seed {seed} (set CALM_CRASH_SEED to replay)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acked = [0i64; KEYS.len()];
    let mut restores = 0;
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "local_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CALM_LOCAL_CRASH_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the child to have recovered, then let it run a random while.
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("child recovers within a minute");
            // libtest may print "test local_crash_child ... " on the same line first.
            if line.ends_with("calm-ready") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5 + rng.next() % 120));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "round {round}: child must die by SIGKILL"
        );
        reader.join().unwrap();
        for line in rx.try_iter() {
            let Some(at) = line.find("calm-ack ") else {
                continue;
            };
            let mut words = line[at..].split_whitespace().skip(1);
            let k: usize = words.next().unwrap().parse().unwrap();
            acked[k] += 1;
        }

        if round % 10 == 9 {
            damage_store(dir.path());
        }
        let (state, report) = open(dir.path());
        println!("round {round}: {report:?}");
        if round % 10 == 9 {
            assert!(
                report.restored_checkpoint.is_some(),
                "round {round}: a damaged store must be replaced by a checkpoint: {report:?}"
            );
            restores += 1;
        }
        let mut sum = 0;
        for (k, key) in KEYS.iter().enumerate() {
            let value = counter(&state, key);
            assert!(
                value >= acked[k],
                "round {round}: key {k} holds {value} but {} adds were acknowledged (report {report:?})",
                acked[k]
            );
            sum += value;
        }
        let facts = state.replica().version_vector().get(NODE) as i64;
        assert_eq!(
            sum, facts,
            "round {round}: values must count each durable fact exactly once"
        );
    }
    assert_eq!(restores, ROUNDS / 10);
    let (state, _) = open(dir.path());
    let segments: Vec<_> = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".log"))
        .collect();
    assert!(
        state.wal().oldest_lsn() > 1
            && !segments.iter().any(|s| s == "wal-00000000000000000001.log"),
        "checkpoints must have deleted WAL segments during the run: oldest LSN {}, segments {segments:?}",
        state.wal().oldest_lsn()
    );
    println!("acked per key after {ROUNDS} kills: {acked:?}");
}
