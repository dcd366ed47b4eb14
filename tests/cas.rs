//! Compare-and-set is linearizable under concurrent clients on every node: six clients (two
//! per node) each read a register and CAS it to the next value, expecting what they read
//! (half by version, half by value). The history is checked by calm-jepsen's
//! linearizability checker (Wing & Gong search), and directly: every successful CAS moved
//! the register by exactly one version from the one it expected, no two succeeded from the
//! same version, the successes account for the final version, and the value chain has no
//! lost update.

mod support;

use calm::api::pb::{Consistency, Path, value::Kind};
use calm_jepsen::checker::Checker;
use calm_jepsen::checker::linearizable::LinearizableChecker;
use calm_jepsen::{F, History, Op, OpType, Process};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Instant;
use support::{Cluster, get_with_token, op, write};
use tonic::Code;

const KEY: &str = "cas:reg";
const CLIENTS: usize = 6;
const ROUNDS: usize = 30;

/// The history, appended to under one lock so indices and times are in order.
struct Recorder {
    started: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn record(&self, process: u64, kind: OpType, f: F, value: Value) {
        let mut ops = self.ops.lock().unwrap();
        let op = Op::new(
            ops.len() as u64,
            self.started.elapsed().as_nanos() as u64,
            Process::Client(process),
            kind,
            f,
        )
        .with_key(KEY)
        .with_value(value);
        ops.push(op);
    }
}

/// A successful CAS: the version it expected, the one it made, and the value it wrote.
#[derive(Debug)]
struct Success {
    expected: u64,
    version: u64,
    step: u64,
}

#[derive(Default)]
struct ClientLog {
    successes: Vec<Success>,
    lost: usize,
    indeterminate: usize,
}

/// The register's value is `"{step}/{writer}"`: the step counts successful writes.
fn step_of(value: &[u8]) -> u64 {
    let text = std::str::from_utf8(value).unwrap();
    text.split('/').next().unwrap().parse().unwrap()
}

async fn client(c: &Cluster, j: usize, rec: &Recorder, fresh: &Mutex<u64>) -> ClientLog {
    let at = 1 + j % 3;
    let by_version = j.is_multiple_of(2);
    let mut kv = c.kv(at).await;
    let mut process = j as u64;
    let mut log = ClientLog::default();
    for round in 0..ROUNDS {
        rec.record(process, OpType::Invoke, F::Read, Value::Null);
        let r = get_with_token(&mut kv, KEY.as_bytes(), Consistency::Linearizable, &[]).await;
        let (value, version) = match r.map(|r| r.value.and_then(|v| v.kind)) {
            Ok(Some(Kind::Register(reg))) => {
                let text = String::from_utf8(reg.value.clone()).unwrap();
                rec.record(process, OpType::Ok, F::Read, json!(text));
                (text, reg.version)
            }
            Ok(other) => panic!("{KEY} at node {at} reads {other:?}"),
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                rec.record(process, OpType::Fail, F::Read, Value::Null);
                continue;
            }
            Err(s) => panic!("read at node {at}: {s:?}"),
        };
        let step = step_of(value.as_bytes()) + 1;
        let new = format!("{step}/c{j}r{round}");
        let cas = if by_version {
            op::cas_version(version, &new)
        } else {
            op::cas_value(&value, &new)
        };
        rec.record(process, OpType::Invoke, F::Cas, json!([value, new]));
        match write(&mut kv, KEY, cas).await {
            Ok(w) if w.succeeded => {
                assert_eq!(w.path, Path::Consensus as i32);
                rec.record(process, OpType::Ok, F::Cas, json!([value, new]));
                log.successes.push(Success {
                    expected: version,
                    version: w.version,
                    step,
                });
            }
            Ok(w) => {
                assert!(
                    w.version > version,
                    "a CAS expecting version {version} lost, yet the register is at {}",
                    w.version
                );
                rec.record(process, OpType::Fail, F::Cas, json!([value, new]));
                log.lost += 1;
            }
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                // Unknown outcome: the process may not be reused.
                rec.record(process, OpType::Info, F::Cas, json!([value, new]));
                log.indeterminate += 1;
                let mut f = fresh.lock().unwrap();
                process = *f;
                *f += 1;
            }
            Err(s) => panic!("cas at node {at}: {s:?}"),
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_is_linearizable_under_concurrent_clients() {
    let c = Cluster::start(3, &[]).await;
    support::await_leaders_balanced(&c).await;
    let mut kv = c.kv(1).await;
    let initial = write(&mut kv, KEY, op::put("0/init")).await.unwrap();
    let v0 = initial.version;

    let rec = Recorder {
        started: Instant::now(),
        ops: Mutex::new(Vec::new()),
    };
    let fresh = Mutex::new(CLIENTS as u64);
    let clients = (0..CLIENTS).map(|j| client(&c, j, &rec, &fresh));
    let logs = futures::future::join_all(clients).await;

    // The final state, the same on every node.
    let mut finals = Vec::new();
    for at in 1..=3 {
        let mut kv = c.kv(at).await;
        let r = get_with_token(&mut kv, KEY.as_bytes(), Consistency::Linearizable, &[])
            .await
            .unwrap();
        match r.value.and_then(|v| v.kind) {
            Some(Kind::Register(reg)) => finals.push((reg.value, reg.version)),
            other => panic!("final read at node {at}: {other:?}"),
        }
    }
    assert!(finals.windows(2).all(|w| w[0] == w[1]), "{finals:?}");
    let (final_value, final_version) = finals[0].clone();

    let successes: Vec<&Success> = logs.iter().flat_map(|l| &l.successes).collect();
    let lost: usize = logs.iter().map(|l| l.lost).sum();
    let indeterminate: usize = logs.iter().map(|l| l.indeterminate).sum();
    eprintln!(
        "{} successful CAS, {lost} lost, {indeterminate} indeterminate; version {v0} -> {final_version}",
        successes.len()
    );
    assert!(!successes.is_empty());
    // Every success moved the register one version up from the one it expected (by-value
    // ones too: the value read came with its version), and no two from the same one.
    let mut from = BTreeSet::new();
    let mut to = BTreeSet::new();
    for s in &successes {
        assert_eq!(s.version, s.expected + 1, "{s:?}");
        assert!(
            from.insert(s.expected),
            "two CAS succeeded from version {}",
            s.expected
        );
        assert!(to.insert(s.version));
    }
    // The successes account for every version (indeterminate ones may have applied too).
    let moved = (final_version - v0) as usize;
    assert!(
        (successes.len()..=successes.len() + indeterminate).contains(&moved),
        "{} successes and {indeterminate} indeterminate CAS, but the version moved by {moved}",
        successes.len()
    );
    // The value chain: each write stepped the value read by one, so the final step is the
    // number of writes after the initial put: no lost update.
    assert_eq!(
        step_of(&final_value) as usize,
        moved,
        "final value {final_value:?}"
    );
    let steps: BTreeSet<u64> = successes.iter().map(|s| s.step).collect();
    assert_eq!(
        steps.len(),
        successes.len(),
        "two successes wrote the same step"
    );

    let history = History::from_ops(rec.ops.into_inner().unwrap()).expect("a valid history");
    let checker = LinearizableChecker {
        initial: json!("0/init"),
        ..LinearizableChecker::default()
    };
    let verdict = checker
        .check(&history)
        .expect("the checker reads the history");
    assert!(verdict.is_valid(), "{verdict}");
}

/// The history as this file records it is one the checker can fault: a read of the value a
/// completed CAS replaced is not linearizable.
#[test]
fn the_checker_faults_a_stale_read_in_such_a_history() {
    let rec = Recorder {
        started: Instant::now(),
        ops: Mutex::new(Vec::new()),
    };
    let cas = json!(["0/init", "1/c0r0"]);
    rec.record(0, OpType::Invoke, F::Cas, cas.clone());
    rec.record(0, OpType::Ok, F::Cas, cas);
    rec.record(1, OpType::Invoke, F::Read, Value::Null);
    rec.record(1, OpType::Ok, F::Read, json!("0/init"));
    let history = History::from_ops(rec.ops.into_inner().unwrap()).unwrap();
    let checker = LinearizableChecker {
        initial: json!("0/init"),
        ..LinearizableChecker::default()
    };
    let verdict = checker.check(&history).unwrap();
    assert_eq!(verdict.valid, calm_jepsen::Validity::Invalid, "{verdict}");
}
