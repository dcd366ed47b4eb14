//! The history model: what a test run records and what every checker reads.
//!
//! This module owns the operation record ([`Op`]), the JSON-lines file format, and the rules
//! that make a sequence of ops a well-formed history ([`History::push`]). It follows Jepsen:
//! every client operation is an `invoke` followed by one completion from the same process,
//! `ok` (it took effect), `fail` (it definitely did not) or `info` (unknown: it may take
//! effect at any later time, or never). A process whose op ended in `info` may still have
//! that op in flight, so it never issues again; the harness continues with a fresh process
//! id. That rule is what lets a checker treat an indeterminate op as "returns at infinity".
//!
//! Validation happens once, here, so checkers can rely on it: indices strictly increase, time
//! never goes backwards, each completion matches the pending invocation of its process
//! (same `f`, same key). An invocation that never completes (the run ended first) is
//! indeterminate, exactly like `info`.
//!
//! Nemesis ops (`"process": "nemesis"`) are kept in the history for reports but are not
//! paired; checkers skip them.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
pub use serde_json::Value;

/// Longest accepted JSON line. Ops are small; a longer line means a corrupt or foreign file,
/// and reading it whole would let one bad line exhaust memory. It also bounds the size of a
/// single read result (e.g. the elements a set read returns).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Errors from reading, writing or validating a history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("history I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("line {line}: {source}")]
    Parse {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("line {line}: longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong { line: usize },
    #[error("op {index}: index does not increase (the previous op has index {previous})")]
    IndexOrder { index: u64, previous: u64 },
    #[error("op {index}: time {time_ns} ns is before the previous op's {previous_ns} ns")]
    TimeOrder {
        index: u64,
        time_ns: u64,
        previous_ns: u64,
    },
    #[error("op {index}: process {process} invokes while its op {pending} is still pending")]
    DoubleInvoke {
        index: u64,
        process: u64,
        pending: u64,
    },
    #[error(
        "op {index}: process {process} invokes again after op {crashed} ended in info; \
         an indeterminate op retires its process, use a fresh process id"
    )]
    ProcessReused {
        index: u64,
        process: u64,
        crashed: u64,
    },
    #[error("op {index}: {kind} completion for process {process}, which has no pending invocation")]
    OrphanCompletion {
        index: u64,
        process: u64,
        kind: OpType,
    },
    #[error(
        "op {index}: completion ({f} on {key:?}) does not match its invocation {invoke} \
         ({invoke_f} on {invoke_key:?})"
    )]
    Mismatch {
        index: u64,
        f: F,
        key: Option<String>,
        invoke: u64,
        invoke_f: F,
        invoke_key: Option<String>,
    },
}

/// Jepsen's op types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

impl OpType {
    pub fn as_str(self) -> &'static str {
        match self {
            OpType::Invoke => "invoke",
            OpType::Ok => "ok",
            OpType::Fail => "fail",
            OpType::Info => "info",
        }
    }
}

impl fmt::Display for OpType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The function an op applies. The known ones are what the checkers understand; anything
/// else (e.g. a nemesis's `"partition"`) is kept verbatim as [`F::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum F {
    /// Register read, or counter / bounded-counter read (the checker decides).
    Read,
    /// Register write (put).
    Write,
    /// Register compare-and-set; value `[expected, new]`.
    Cas,
    /// Register delete.
    Delete,
    /// Counter or bounded-counter add; value is the delta.
    Add,
    /// Set add; value is the element.
    SetAdd,
    /// Set remove; value is the element.
    SetRemove,
    /// Set read; the `ok` value is the array of elements.
    ReadSet,
    /// One stretch of a watch stream: the invocation's value names where it started, the
    /// `ok` value lists the events received (see `checker::watch`).
    Watch,
    /// A bank transfer, one transaction: value `{"from": key, "to": key, "amount": n}`; the
    /// `ok` value `{"succeeded": bool}` says whether the balance test held (see
    /// `checker::bank`).
    Transfer,
    /// A read of several keys as one snapshot; the `ok` value is an object from key to value.
    ReadAll,
    /// A lock acquisition (a lease, then a leased compare-and-set expecting the key absent):
    /// the `ok` value `{"token": n, "lease": id, "ttl_ms": n}` (see `checker::lock`).
    Acquire,
    /// One keep-alive of a held lock's lease: value `{"lease": id, "token": n}`; the `ok`
    /// value `{"ttl_ms": n}`, 0 when the lease no longer existed.
    Renew,
    /// A lock's release (its lease revoked): value `{"lease": id, "token": n}`.
    Release,
    /// A write fenced by a lock's token (a transaction comparing the lock's version): value
    /// `{"token": n, "value": s}`; the `ok` value `{"succeeded": bool}`.
    FencedWrite,
    Other(String),
}

impl F {
    pub fn as_str(&self) -> &str {
        match self {
            F::Read => "read",
            F::Write => "write",
            F::Cas => "cas",
            F::Delete => "delete",
            F::Add => "add",
            F::SetAdd => "set_add",
            F::SetRemove => "set_remove",
            F::ReadSet => "read_set",
            F::Watch => "watch",
            F::Transfer => "transfer",
            F::ReadAll => "read_all",
            F::Acquire => "acquire",
            F::Renew => "renew",
            F::Release => "release",
            F::FencedWrite => "fenced_write",
            F::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> F {
        match s {
            "read" => F::Read,
            "write" => F::Write,
            "cas" => F::Cas,
            "delete" => F::Delete,
            "add" => F::Add,
            "set_add" => F::SetAdd,
            "set_remove" => F::SetRemove,
            "read_set" => F::ReadSet,
            "watch" => F::Watch,
            "transfer" => F::Transfer,
            "read_all" => F::ReadAll,
            "acquire" => F::Acquire,
            "renew" => F::Renew,
            "release" => F::Release,
            "fenced_write" => F::FencedWrite,
            other => F::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for F {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for F {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for F {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Err(serde::de::Error::custom("empty f"));
        }
        Ok(F::parse(&s))
    }
}

/// Who issued an op: a client process (a logical, single-threaded client) or the nemesis.
/// JSON: an integer, or the string `"nemesis"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Process {
    Client(u64),
    Nemesis,
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Process::Client(p) => write!(f, "{p}"),
            Process::Nemesis => f.write_str("nemesis"),
        }
    }
}

impl Serialize for Process {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Process::Client(p) => s.serialize_u64(*p),
            Process::Nemesis => s.serialize_str("nemesis"),
        }
    }
}

impl<'de> Deserialize<'de> for Process {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(p) => Ok(Process::Client(p)),
            Raw::Str(s) if s == "nemesis" => Ok(Process::Nemesis),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "process must be a non-negative integer or \"nemesis\", got {s:?}"
            ))),
        }
    }
}

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Op {
    /// Position in the history; strictly increasing.
    pub index: u64,
    /// Nanoseconds since the start of the run, from one monotonic clock; never decreasing.
    pub time_ns: u64,
    pub process: Process,
    #[serde(rename = "type")]
    pub kind: OpType,
    pub f: F,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The argument on `invoke`, the result on `ok` (absent = null).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub value: Value,
    /// The node the client talked to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Marks a read of the final phase (after heal and quiescence), which the counter, set
    /// and bounded-counter checkers hold to convergence and conservation.
    #[serde(default, rename = "final", skip_serializing_if = "is_false")]
    pub is_final: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Op {
    pub fn new(index: u64, time_ns: u64, process: Process, kind: OpType, f: F) -> Op {
        Op {
            index,
            time_ns,
            process,
            kind,
            f,
            key: None,
            value: Value::Null,
            node: None,
            error: None,
            is_final: false,
        }
    }

    pub fn with_key(mut self, key: impl Into<String>) -> Op {
        self.key = Some(key.into());
        self
    }

    pub fn with_value(mut self, value: impl Into<Value>) -> Op {
        self.value = value.into();
        self
    }

    pub fn with_node(mut self, node: impl Into<String>) -> Op {
        self.node = Some(node.into());
        self
    }

    pub fn with_error(mut self, error: impl Into<String>) -> Op {
        self.error = Some(error.into());
        self
    }

    pub fn with_final(mut self, is_final: bool) -> Op {
        self.is_final = is_final;
        self
    }
}

/// How a client op ended, as far as anyone can know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Acknowledged: it took effect.
    Ok,
    /// Definitely did not take effect.
    Fail,
    /// `info`, or no completion before the history ended: it may take effect at any time
    /// after its invocation, or never.
    Indeterminate,
}

/// A client invocation and its completion, borrowed from a [`History`].
#[derive(Debug, Clone, Copy)]
pub struct PairedOp<'a> {
    pub invoke: &'a Op,
    pub completion: Option<&'a Op>,
}

impl<'a> PairedOp<'a> {
    pub fn outcome(&self) -> Outcome {
        match self.completion.map(|c| c.kind) {
            Some(OpType::Ok) => Outcome::Ok,
            Some(OpType::Fail) => Outcome::Fail,
            _ => Outcome::Indeterminate,
        }
    }

    /// History index of the invocation; identifies the op in reports.
    pub fn index(&self) -> u64 {
        self.invoke.index
    }

    pub fn process(&self) -> Process {
        self.invoke.process
    }

    pub fn f(&self) -> &'a F {
        &self.invoke.f
    }

    pub fn key(&self) -> Option<&'a str> {
        self.invoke.key.as_deref()
    }

    /// The argument the client sent.
    pub fn arg(&self) -> &'a Value {
        &self.invoke.value
    }

    /// The result of an `ok` completion (null otherwise).
    pub fn result(&self) -> &'a Value {
        match self.completion {
            Some(c) if c.kind == OpType::Ok => &c.value,
            _ => &Value::Null,
        }
    }

    pub fn node(&self) -> Option<&'a str> {
        self.completion
            .and_then(|c| c.node.as_deref())
            .or(self.invoke.node.as_deref())
    }

    pub fn is_final(&self) -> bool {
        self.invoke.is_final || self.completion.is_some_and(|c| c.is_final)
    }

    pub fn call_ns(&self) -> u64 {
        self.invoke.time_ns
    }

    /// When the op's effect window closes: the completion time for `ok` and `fail`, `None`
    /// (infinity) when indeterminate, even if an `info` completion was recorded.
    pub fn return_ns(&self) -> Option<u64> {
        match self.outcome() {
            Outcome::Indeterminate => None,
            _ => self.completion.map(|c| c.time_ns),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pair {
    invoke: usize,
    completion: Option<usize>,
}

/// A validated history: the ops in order plus the pairing of client invocations with their
/// completions.
#[derive(Debug, Clone, Default)]
pub struct History {
    ops: Vec<Op>,
    pairs: Vec<Pair>,
    /// process -> position in `pairs` of its pending invocation.
    pending: HashMap<u64, usize>,
    /// process -> index of the op whose `info` retired it.
    retired: HashMap<u64, u64>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// Validates and appends one op; on error the history is unchanged.
    pub fn push(&mut self, op: Op) -> Result<(), HistoryError> {
        if let Some(last) = self.ops.last() {
            if op.index <= last.index {
                return Err(HistoryError::IndexOrder {
                    index: op.index,
                    previous: last.index,
                });
            }
            if op.time_ns < last.time_ns {
                return Err(HistoryError::TimeOrder {
                    index: op.index,
                    time_ns: op.time_ns,
                    previous_ns: last.time_ns,
                });
            }
        }
        let pos = self.ops.len();
        if let Process::Client(p) = op.process {
            if op.kind == OpType::Invoke {
                if let Some(&crashed) = self.retired.get(&p) {
                    return Err(HistoryError::ProcessReused {
                        index: op.index,
                        process: p,
                        crashed,
                    });
                }
                if let Some(&pair) = self.pending.get(&p) {
                    return Err(HistoryError::DoubleInvoke {
                        index: op.index,
                        process: p,
                        pending: self.ops[self.pairs[pair].invoke].index,
                    });
                }
                self.pending.insert(p, self.pairs.len());
                self.pairs.push(Pair {
                    invoke: pos,
                    completion: None,
                });
            } else {
                let Some(&pair) = self.pending.get(&p) else {
                    return Err(HistoryError::OrphanCompletion {
                        index: op.index,
                        process: p,
                        kind: op.kind,
                    });
                };
                let invoke = &self.ops[self.pairs[pair].invoke];
                if invoke.f != op.f || invoke.key != op.key {
                    return Err(HistoryError::Mismatch {
                        index: op.index,
                        f: op.f.clone(),
                        key: op.key.clone(),
                        invoke: invoke.index,
                        invoke_f: invoke.f.clone(),
                        invoke_key: invoke.key.clone(),
                    });
                }
                self.pending.remove(&p);
                self.pairs[pair].completion = Some(pos);
                if op.kind == OpType::Info {
                    self.retired.insert(p, op.index);
                }
            }
        }
        self.ops.push(op);
        Ok(())
    }

    pub fn from_ops(ops: impl IntoIterator<Item = Op>) -> Result<History, HistoryError> {
        let mut h = History::new();
        for op in ops {
            h.push(op)?;
        }
        Ok(h)
    }

    /// All ops, nemesis ops included, in history order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Client ops with their completions, in invocation order. Invocations still pending at
    /// the end of the history come out indeterminate.
    pub fn pairs(&self) -> impl Iterator<Item = PairedOp<'_>> {
        self.pairs.iter().map(|p| PairedOp {
            invoke: &self.ops[p.invoke],
            completion: p.completion.map(|c| &self.ops[c]),
        })
    }

    /// Client processes that were retired by an `info` completion.
    pub fn retired_processes(&self) -> HashSet<u64> {
        self.retired.keys().copied().collect()
    }

    /// Reads JSON lines (blank lines are skipped) and validates them.
    pub fn read_jsonl<R: Read>(reader: R) -> Result<History, HistoryError> {
        let mut reader = BufReader::new(reader);
        let mut history = History::new();
        let mut buf = Vec::new();
        let mut line = 0;
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)?;
            if n == 0 {
                break;
            }
            line += 1;
            if buf.last() != Some(&b'\n') && n > MAX_LINE_BYTES {
                return Err(HistoryError::LineTooLong { line });
            }
            let text = buf.trim_ascii();
            if text.is_empty() {
                continue;
            }
            let op: Op = serde_json::from_slice(text)
                .map_err(|source| HistoryError::Parse { line, source })?;
            history.push(op)?;
        }
        Ok(history)
    }

    pub fn load(path: &Path) -> Result<History, HistoryError> {
        let file = File::open(path).map_err(|source| HistoryError::File {
            path: path.to_owned(),
            source,
        })?;
        History::read_jsonl(file)
    }

    /// Writes one JSON object per line.
    pub fn write_jsonl<W: Write>(&self, writer: W) -> Result<(), HistoryError> {
        let mut w = BufWriter::new(writer);
        for op in &self.ops {
            serde_json::to_writer(&mut w, op).map_err(std::io::Error::from)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        Ok(())
    }
}

/// A short human description of a paired op for explanations, e.g.
/// `#12 p3 cas 1→2 ok [1200..1450 ns] on n2`.
pub fn describe(op: &PairedOp<'_>) -> String {
    let mut s = format!("#{} p{} {}", op.index(), op.process(), op.f());
    match op.f() {
        F::Read | F::ReadSet | F::ReadAll => {
            if op.outcome() == Outcome::Ok {
                match op.result().as_array() {
                    // A set read can hold thousands of elements: count them instead.
                    Some(items) if items.len() > 8 => {
                        s.push_str(&format!(" → {} elements", items.len()))
                    }
                    _ => s.push_str(&format!(" → {}", op.result())),
                }
            }
        }
        F::Cas => {
            if let Some([from, to]) = op.arg().as_array().map(Vec::as_slice) {
                s.push_str(&format!(" {from}→{to}"));
            } else {
                s.push_str(&format!(" {}", op.arg()));
            }
        }
        _ => {
            if !op.arg().is_null() {
                s.push_str(&format!(" {}", op.arg()));
            }
        }
    }
    let outcome = match op.outcome() {
        Outcome::Ok => "ok",
        Outcome::Fail => "fail",
        Outcome::Indeterminate => "info",
    };
    s.push(' ');
    s.push_str(outcome);
    match op.return_ns() {
        Some(r) => s.push_str(&format!(" [{}..{} ns]", op.call_ns(), r)),
        None => s.push_str(&format!(" [{}..∞)", op.call_ns())),
    }
    if let Some(n) = op.node() {
        s.push_str(&format!(" on {n}"));
    }
    s
}
