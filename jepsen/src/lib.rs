//! calm-jepsen: a Jepsen-style harness for calm.
//!
//! What exists today is the part that needs no live node: the history model and the
//! checkers. A run (later: nodes in network namespaces, nemeses, workloads talking gRPC)
//! records a [`History`] of Jepsen-style ops as JSON lines; checkers turn it into a
//! [`Verdict`]. Keeping the recording format and the checkers independent of the runner
//! means any history, recorded live or written by hand in a test, is judged the same way.
//!
//! - [`history`]: ops, the JSON-lines format, invoke/completion pairing and its rules.
//! - [`edn`]: export to Jepsen's EDN, one op map per line.
//! - [`checker`]: linearizability per key for registers, counter, set and bounded-counter
//!   (escrow) properties; each says `valid`, `invalid` with explained anomalies, or
//!   `unknown` when a budget ran out.

pub mod checker;
pub mod edn;
pub mod history;

pub use checker::{Anomaly, AnomalyKind, CheckError, Checker, Validity, Verdict};
pub use history::{F, History, HistoryError, Op, OpType, Outcome, PairedOp, Process};
