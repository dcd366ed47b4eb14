//! The history model: JSON lines in and out, pairing, and the rules a history must follow.

mod common;

use calm_jepsen::edn::{KeyStyle, write_edn};
use calm_jepsen::history::{
    F, History, HistoryError, MAX_LINE_BYTES, Op, OpType, Outcome, Process,
};
use common::Hb;
use serde_json::{Value, json};

const EXAMPLE: &str = r#"{"index":0,"time_ns":5,"process":0,"type":"invoke","f":"cas","key":"r","value":[1,2],"node":"n1"}
{"index":1,"time_ns":7,"process":"nemesis","type":"info","f":"kill","value":["n2"]}

{"index":2,"time_ns":9,"process":0,"type":"ok","f":"cas","key":"r","value":[1,2],"node":"n1"}
{"index":3,"time_ns":11,"process":1,"type":"invoke","f":"read_set","key":"s","final":true}
{"index":4,"time_ns":12,"process":1,"type":"info","f":"read_set","key":"s","error":"timeout","final":true}
{"index":5,"time_ns":13,"process":2,"type":"invoke","f":"add","key":"c","value":-3}
"#;

#[test]
fn reads_the_documented_format() {
    let h = History::read_jsonl(EXAMPLE.as_bytes()).unwrap();
    assert_eq!(h.len(), 6);
    assert_eq!(h.ops()[1].process, Process::Nemesis);
    assert_eq!(h.ops()[1].f, F::Other("kill".into()));
    let pairs: Vec<_> = h.pairs().collect();
    assert_eq!(pairs.len(), 3, "nemesis ops are not paired");
    assert_eq!(pairs[0].outcome(), Outcome::Ok);
    assert_eq!(pairs[0].return_ns(), Some(9));
    assert_eq!(pairs[0].arg(), &json!([1, 2]));
    assert_eq!(pairs[1].outcome(), Outcome::Indeterminate);
    assert_eq!(pairs[1].return_ns(), None, "info returns at infinity");
    assert!(pairs[1].is_final());
    assert_eq!(
        pairs[2].outcome(),
        Outcome::Indeterminate,
        "pending at the end"
    );
    assert_eq!(pairs[2].return_ns(), None);
    assert!(h.retired_processes().contains(&1));
}

#[test]
fn jsonl_round_trip() {
    let h = History::read_jsonl(EXAMPLE.as_bytes()).unwrap();
    let mut out = Vec::new();
    h.write_jsonl(&mut out).unwrap();
    let again = History::read_jsonl(out.as_slice()).unwrap();
    assert_eq!(h.ops(), again.ops());
    // Null values, absent options and false flags are omitted.
    let first = String::from_utf8(out)
        .unwrap()
        .lines()
        .nth(3)
        .unwrap()
        .to_owned();
    assert_eq!(
        first,
        r#"{"index":3,"time_ns":11,"process":1,"type":"invoke","f":"read_set","key":"s","final":true}"#
    );
}

#[test]
fn load_names_the_file_on_error() {
    let err = History::load(std::path::Path::new("/nonexistent/h.jsonl")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/h.jsonl"), "{err}");
}

fn push_err(ops: Vec<Op>) -> HistoryError {
    History::from_ops(ops).unwrap_err()
}

fn op(i: u64, t: u64, p: u64, kind: OpType, f: F) -> Op {
    Op::new(i, t, Process::Client(p), kind, f).with_key("k")
}

#[test]
fn rejects_a_second_invoke_while_pending() {
    let e = push_err(vec![
        op(0, 0, 0, OpType::Invoke, F::Read),
        op(1, 1, 0, OpType::Invoke, F::Read),
    ]);
    assert!(
        matches!(
            e,
            HistoryError::DoubleInvoke {
                index: 1,
                pending: 0,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn rejects_reuse_of_a_process_after_info() {
    let e = push_err(vec![
        op(0, 0, 0, OpType::Invoke, F::Write),
        op(1, 1, 0, OpType::Info, F::Write),
        op(2, 2, 0, OpType::Invoke, F::Read),
    ]);
    assert!(
        matches!(
            e,
            HistoryError::ProcessReused {
                index: 2,
                crashed: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("fresh process id"));
}

#[test]
fn rejects_orphan_and_mismatched_completions() {
    let e = push_err(vec![op(0, 0, 0, OpType::Ok, F::Read)]);
    assert!(matches!(e, HistoryError::OrphanCompletion { .. }), "{e}");
    let e = push_err(vec![
        op(0, 0, 0, OpType::Invoke, F::Read),
        op(1, 1, 0, OpType::Ok, F::Write),
    ]);
    assert!(matches!(e, HistoryError::Mismatch { .. }), "{e}");
    let e = push_err(vec![
        op(0, 0, 0, OpType::Invoke, F::Read),
        op(1, 1, 0, OpType::Ok, F::Read).with_key("other"),
    ]);
    assert!(matches!(e, HistoryError::Mismatch { .. }), "{e}");
}

#[test]
fn rejects_disorder() {
    let e = push_err(vec![
        op(1, 0, 0, OpType::Invoke, F::Read),
        op(1, 1, 1, OpType::Invoke, F::Read),
    ]);
    assert!(matches!(e, HistoryError::IndexOrder { .. }), "{e}");
    let e = push_err(vec![
        op(0, 10, 0, OpType::Invoke, F::Read),
        op(1, 9, 1, OpType::Invoke, F::Read),
    ]);
    assert!(matches!(e, HistoryError::TimeOrder { .. }), "{e}");
}

#[test]
fn a_rejected_op_leaves_the_history_unchanged() {
    let mut h = History::new();
    h.push(op(0, 0, 0, OpType::Invoke, F::Read)).unwrap();
    assert!(h.push(op(1, 1, 0, OpType::Invoke, F::Read)).is_err());
    h.push(op(2, 2, 0, OpType::Ok, F::Read)).unwrap();
    assert_eq!(h.pairs().count(), 1);
}

#[test]
fn parse_errors_carry_the_line_number() {
    let text = format!(
        "{}\n{{\"index\": 1, \"nope\": true}}\n",
        EXAMPLE.lines().next().unwrap()
    );
    let e = History::read_jsonl(text.as_bytes()).unwrap_err();
    assert!(matches!(e, HistoryError::Parse { line: 2, .. }), "{e}");
    // Unknown fields are rejected: a typo must not silently drop data.
    assert!(e.to_string().contains("nope"), "{e}");
    let bad_process = r#"{"index":0,"time_ns":0,"process":"bob","type":"invoke","f":"read"}"#;
    let e = History::read_jsonl(bad_process.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("nemesis"), "{e}");
}

#[test]
fn overlong_lines_are_refused() {
    let huge = format!(
        "{{\"index\":0,\"time_ns\":0,\"process\":0,\"type\":\"invoke\",\"f\":\"write\",\"value\":\"{}\"}}\n",
        "x".repeat(MAX_LINE_BYTES)
    );
    let e = History::read_jsonl(huge.as_bytes()).unwrap_err();
    assert!(matches!(e, HistoryError::LineTooLong { line: 1 }), "{e}");
}

#[test]
fn edn_export_one_map_per_line() {
    let mut h = Hb::new();
    h.write(0, "x", 3).nemesis("kill").read(1, "x", 3);
    let h = h.build();
    let mut out = Vec::new();
    write_edn(&h, &mut out, KeyStyle::Field).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(
        lines[0],
        "{:type :invoke, :f :write, :value 3, :process 0, :time 10, :index 0, :key \"x\"}"
    );
    assert_eq!(
        lines[2],
        "{:type :info, :f :kill, :value nil, :process :nemesis, :time 30, :index 2}"
    );
    let mut out = Vec::new();
    write_edn(&h, &mut out, KeyStyle::IndependentTuple).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("{:type :ok, :f :read, :value [\"x\" 3],")
    );
}

#[test]
fn values_of_any_json_shape_survive() {
    let o = Op::new(0, 0, Process::Client(0), OpType::Invoke, F::Write)
        .with_value(json!({"bytes": "aGk=", "n": [1, null, 2.5]}));
    let text = serde_json::to_string(&o).unwrap();
    let back: Op = serde_json::from_str(&text).unwrap();
    assert_eq!(back, o);
    assert_eq!(back.value["n"][2], Value::from(2.5));
}
