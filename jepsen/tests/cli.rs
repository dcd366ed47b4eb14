//! The `calm-jepsen` binary: verdicts and exit codes on the fixture histories.

use std::path::PathBuf;
use std::process::{Command, Output};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_calm-jepsen"))
        .args(args)
        .output()
        .expect("runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn counter_ok_exits_zero() {
    let path = data("counter-ok.jsonl");
    let o = run(&["check", "--checker", "counter", path.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout(&o).contains("counter checker: valid"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn counter_lost_add_exits_one_with_explanation() {
    let path = data("counter-lost-add.jsonl");
    let o = run(&["check", "--checker", "counter", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(
        out.contains("INVALID") && out.contains("FinalValueUnreachable"),
        "{out}"
    );
    assert!(out.contains("FinalReadsDiverge"), "{out}");
}

#[test]
fn register_stale_read_json_verdict() {
    let path = data("register-stale-read.jsonl");
    let o = run(&[
        "check",
        "--checker",
        "linearizable",
        "--json",
        path.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON verdict");
    assert_eq!(v["valid"], false);
    assert_eq!(v["anomalies"][0]["kind"], "not_linearizable");
    assert_eq!(v["anomalies"][0]["key"], "r1");
}

#[test]
fn unknown_exits_three() {
    // A counter history checked without final reads: conservation is undecided.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.jsonl");
    std::fs::write(
        &path,
        r#"{"index":0,"time_ns":1,"process":0,"type":"invoke","f":"add","key":"c","value":1}
{"index":1,"time_ns":2,"process":0,"type":"ok","f":"add","key":"c","value":1}
"#,
    )
    .unwrap();
    let o = run(&["check", "--checker", "counter", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
}

#[test]
fn wrong_checker_for_the_history_exits_two() {
    let path = data("counter-ok.jsonl");
    let o = run(&["check", "--checker", "set", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not understand f = add"));
}

#[test]
fn bounded_needs_bounds() {
    let path = data("counter-ok.jsonl");
    let o = run(&["check", "--checker", "bounded", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&[
        "check",
        "--checker",
        "bounded",
        "--min",
        "-5",
        "--max",
        "5",
        path.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

#[test]
fn edn_subcommand() {
    let path = data("register-stale-read.jsonl");
    let o = run(&["edn", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 6);
    assert!(
        out.starts_with("{:type :invoke, :f :write, :value 1, :process 0, :time 100, :index 0")
    );
}
