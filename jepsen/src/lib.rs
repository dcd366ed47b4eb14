//! calm-jepsen: a Jepsen-style harness for calm.
//!
//! A run starts real `calm` nodes in network namespaces, drives a workload over the public
//! gRPC API while a nemesis injects faults, records a [`History`] of Jepsen-style ops as
//! JSON lines, and judges it with a checker into a [`Verdict`]. The recording format and the
//! checkers are independent of the runner, so any history, recorded live or written by hand
//! in a test, is judged the same way.
//!
//! - [`history`]: ops, the JSON-lines format, invoke/completion pairing and its rules.
//! - [`edn`]: export to Jepsen's EDN, one op map per line.
//! - [`checker`]: linearizability per key for registers, counter, set, bounded-counter
//!   (escrow), session (read-your-writes), watch, bank and lock properties; each says `valid`,
//!   `invalid` with explained anomalies, or `unknown` when a budget ran out.
//! - [`cluster`]: nodes in network namespaces and the faults done to them.
//! - [`nemesis`]: which faults, on a seeded schedule.
//! - [`client`], [`pb`]: the gRPC client and the mapping of results to ok/fail/info.
//! - [`workload`], [`recorder`]: the client loops and the live history; [`watch`]: the
//!   watch workload's writers and reconnecting watchers; [`bank`]: the bank workload's
//!   accounts, transfers and snapshot reads; [`lock`]: the lock workload's lease-based
//!   lock, its renewals and its fenced writes.
//! - [`runner`], [`report`]: one run end to end and its report directory.

pub mod bank;
pub mod checker;
pub mod client;
pub mod cluster;
pub mod edn;
pub mod history;
pub mod lock;
pub mod nemesis;
pub mod pb;
pub mod recorder;
pub mod report;
pub mod rng;
pub mod runner;
pub mod watch;
pub mod workload;

pub use checker::{Anomaly, AnomalyKind, CheckError, Checker, Validity, Verdict};
pub use history::{F, History, HistoryError, Op, OpType, Outcome, PairedOp, Process};
