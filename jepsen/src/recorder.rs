//! Records a live run's history: assigns indices and times under one lock (so both only
//! grow), hands out fresh process ids, and streams every op to history.jsonl as it happens
//! (a crashed harness still leaves the history behind).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::history::{F, History, HistoryError, Op, OpType, Process, Value};

pub struct Recorder {
    start: Instant,
    processes: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    next: u64,
    ops: Vec<Op>,
    out: Option<BufWriter<File>>,
}

impl Recorder {
    /// A recorder streaming to `path` (or only in memory).
    pub fn new(path: Option<&Path>) -> std::io::Result<Recorder> {
        let out = match path {
            Some(p) => Some(BufWriter::new(File::create(p)?)),
            None => None,
        };
        Ok(Recorder {
            start: Instant::now(),
            processes: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                next: 0,
                ops: Vec::new(),
                out,
            }),
        })
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn elapsed_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// A process id never used before.
    pub fn fresh_process(&self) -> u64 {
        self.processes.fetch_add(1, Ordering::Relaxed)
    }

    /// Append `op` with the next index and the current time; returns the stored op.
    pub fn record(&self, mut op: Op) -> Op {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        op.index = inner.next;
        inner.next += 1;
        // Taken under the lock, so times never decrease along indices.
        op.time_ns = self.elapsed_ns();
        if let Some(out) = inner.out.as_mut() {
            // A failing disk loses the file copy only; the in-memory history is complete.
            let _ = serde_json::to_writer(&mut *out, &op).map(|()| out.write_all(b"\n"));
        }
        inner.ops.push(op.clone());
        op
    }

    /// A nemesis event.
    pub fn nemesis(&self, f: &str, value: Value) -> Op {
        self.record(Op::new(0, 0, Process::Nemesis, OpType::Info, F::parse(f)).with_value(value))
    }

    pub fn flush(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(out) = inner.out.as_mut() {
            let _ = out.flush();
        }
    }

    /// The ops so far as a validated history.
    pub fn history(&self) -> Result<History, HistoryError> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        History::from_ops(inner.ops.iter().cloned())
    }
}
