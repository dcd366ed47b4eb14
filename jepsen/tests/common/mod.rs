//! A small history builder for tests: every event gets the next timestamp (10 ns apart) and
//! index, and a completion takes `f`/key from its process's pending invocation, so a test
//! reads as the interleaving it describes.

#![allow(dead_code)] // each test file uses a different part

use std::collections::HashMap;

use calm_jepsen::history::{F, History, Op, OpType, Process, Value};
use serde_json::json;

#[derive(Default)]
pub struct Hb {
    ops: Vec<Op>,
    pending: HashMap<u64, (F, Option<String>, bool)>,
    node: Option<String>,
}

impl Hb {
    pub fn new() -> Hb {
        Hb::default()
    }

    fn next(&self, process: Process, kind: OpType, f: F) -> Op {
        let i = self.ops.len() as u64;
        let mut op = Op::new(i, (i + 1) * 10, process, kind, f);
        op.node = self.node.clone();
        op
    }

    /// Node recorded on the following ops.
    pub fn on(&mut self, node: &str) -> &mut Hb {
        self.node = Some(node.to_owned());
        self
    }

    pub fn invoke(&mut self, p: u64, f: F, key: &str, arg: impl Into<Value>) -> &mut Hb {
        self.invoke_inner(p, f, key, arg.into(), false)
    }

    /// Invocation of a final-phase read.
    pub fn invoke_final(&mut self, p: u64, f: F, key: &str) -> &mut Hb {
        self.invoke_inner(p, f, key, Value::Null, true)
    }

    fn invoke_inner(&mut self, p: u64, f: F, key: &str, arg: Value, fin: bool) -> &mut Hb {
        let op = self
            .next(Process::Client(p), OpType::Invoke, f.clone())
            .with_key(key)
            .with_value(arg)
            .with_final(fin);
        self.pending.insert(p, (f, Some(key.to_owned()), fin));
        self.ops.push(op);
        self
    }

    fn complete(&mut self, p: u64, kind: OpType, value: Value) -> &mut Hb {
        let (f, key, fin) = self
            .pending
            .remove(&p)
            .expect("completion without invocation");
        let mut op = self
            .next(Process::Client(p), kind, f)
            .with_value(value)
            .with_final(fin);
        op.key = key;
        self.ops.push(op);
        self
    }

    pub fn ok(&mut self, p: u64, result: impl Into<Value>) -> &mut Hb {
        self.complete(p, OpType::Ok, result.into())
    }

    pub fn fail(&mut self, p: u64) -> &mut Hb {
        self.complete(p, OpType::Fail, Value::Null)
    }

    pub fn info(&mut self, p: u64) -> &mut Hb {
        self.complete(p, OpType::Info, Value::Null)
    }

    pub fn nemesis(&mut self, f: &str) -> &mut Hb {
        let op = self.next(Process::Nemesis, OpType::Info, F::Other(f.to_owned()));
        self.ops.push(op);
        self
    }

    // Sequential shorthands: invoke and complete `ok` at once.

    pub fn write(&mut self, p: u64, key: &str, v: impl Into<Value>) -> &mut Hb {
        self.invoke(p, F::Write, key, v).ok(p, Value::Null)
    }

    pub fn read(&mut self, p: u64, key: &str, v: impl Into<Value>) -> &mut Hb {
        self.invoke(p, F::Read, key, Value::Null).ok(p, v)
    }

    pub fn cas(
        &mut self,
        p: u64,
        key: &str,
        from: impl Into<Value>,
        to: impl Into<Value>,
    ) -> &mut Hb {
        self.invoke(p, F::Cas, key, json!([from.into(), to.into()]))
            .ok(p, Value::Null)
    }

    pub fn add(&mut self, p: u64, key: &str, delta: i64) -> &mut Hb {
        self.invoke(p, F::Add, key, delta).ok(p, Value::Null)
    }

    pub fn final_read(&mut self, p: u64, node: &str, key: &str, v: impl Into<Value>) -> &mut Hb {
        self.on(node).invoke_final(p, F::Read, key).ok(p, v)
    }

    pub fn final_read_set(&mut self, p: u64, node: &str, key: &str, v: Value) -> &mut Hb {
        self.on(node).invoke_final(p, F::ReadSet, key).ok(p, v)
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.clone()
    }

    pub fn build(&self) -> History {
        History::from_ops(self.ops.clone()).expect("test history is well-formed")
    }
}
