//! Workloads: the client loops that load the cluster and record the history, one per
//! checker, and the final phase that reads every node after heal.
//!
//! Every loop is bounded in op count and time, every call has a deadline, and an op whose
//! outcome is unknown is recorded `info` and retires its process (the worker continues
//! under a fresh process id), as the history rules require.
//!
//! | workload | keys | ops | checker |
//! |---|---|---|---|
//! | register | `jr-<gen>-<k>`, 4 live keys, a new generation every 10 s | linearizable read, write (unique values), cas from the last value seen | linearizable |
//! | counter | `jc-0..3` | add 1..=5, serializable read | counter |
//! | bounded | `jb-0..1`, bounds [-10, 10] | add ±1..=3, serializable read | bounded |
//! | set | `js-<g>-0..2` (a new generation every 30 s) | set_add (unique), set_remove (an own acked element, with its add's session token), read_set | set |
//! | session | `jt-r-<p>-<n>` / `jt-c-<p>-<n>` | write or add at node A, causal read with its token at node B | session |
//! | watch | `jw-r-0..3`, `jw-s-<g>-0..1` | put (unique), set_add (unique); a watcher per node (`crate::watch`) | watch |
//! | bank | `{jbank}:acct-0..4`, opened with 100 each ([`prepare`]) | transfer (one transaction), atomic linearizable scan of every account (`crate::bank`) | bank |
//! | lock | `{jlock}:lock`, `{jlock}:data` | acquire (lease grant + leased cas expecting absent; the version is the fencing token), renew (KeepAlive every TTL/3), fenced_write (a transaction comparing the lock's version), release (revoke) (`crate::lock`) | lock |

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::checker::Checker;
use crate::checker::bank::BankChecker;
use crate::checker::bounded::BoundedChecker;
use crate::checker::counter::{CounterChecker, ReadBound};
use crate::checker::linearizable::{LinearizableChecker, SearchLimits};
use crate::checker::lock::LockChecker;
use crate::checker::session::SessionChecker;
use crate::checker::set::SetChecker;
use crate::checker::watch::WatchChecker;
use crate::client::{Clients, Completion, int_bytes, read_error, read_value, write_error};
use crate::cluster::node_name;
use crate::history::{F, Op, OpType, Process};
use crate::pb;
use crate::recorder::Recorder;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Register,
    Counter,
    Bounded,
    Set,
    Session,
    Watch,
    Bank,
    Lock,
}

impl Workload {
    pub const ALL: [Workload; 8] = [
        Workload::Register,
        Workload::Counter,
        Workload::Bounded,
        Workload::Set,
        Workload::Session,
        Workload::Watch,
        Workload::Bank,
        Workload::Lock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Counter => "counter",
            Workload::Bounded => "bounded",
            Workload::Set => "set",
            Workload::Session => "session",
            Workload::Watch => "watch",
            Workload::Bank => "bank",
            Workload::Lock => "lock",
        }
    }

    pub fn rules(self) -> RuleSpec {
        match self {
            Workload::Register => RuleSpec {
                modes: &["strict", "hybrid"],
                ..RuleSpec::new("jr-*", "")
            },
            Workload::Counter => RuleSpec::new("jc-*", ""),
            Workload::Bounded => RuleSpec::new(
                "jb-*",
                "type = \"bounded_counter\"\nbounds = { min = -10, max = 10 }\n",
            ),
            Workload::Set => RuleSpec::new("js-*", ""),
            Workload::Session => RuleSpec::new("jt-*", ""),
            // Registers must stay Raft-ordered (in `available` they are last-writer-wins).
            Workload::Watch => RuleSpec {
                modes: &["strict", "hybrid"],
                ..RuleSpec::new("jw-*", "")
            },
            // `available` refuses transactions: every transfer would fail, checking nothing.
            Workload::Bank => RuleSpec {
                modes: &["strict", "hybrid"],
                ..RuleSpec::new(crate::bank::PATTERN, "")
            },
            // Leases refuse to attach keys in `available` (their deletes could be undone by
            // a fact admitted elsewhere), and `available` refuses transactions.
            Workload::Lock => RuleSpec {
                modes: &["strict", "hybrid"],
                ..RuleSpec::new(crate::lock::PATTERN, "")
            },
        }
    }

    /// Whether the checker needs reads of every node after heal.
    pub fn has_final_phase(self) -> bool {
        matches!(
            self,
            Workload::Register
                | Workload::Counter
                | Workload::Bounded
                | Workload::Set
                | Workload::Bank
        )
    }

    /// The keys the final phase reads after a run of length `run` (registers: every
    /// generation's keys, see `register_worker`).
    fn final_keys(self, run: Duration) -> Vec<String> {
        match self {
            Workload::Register => REGISTER_KEYS.through(run),
            Workload::Counter => (0..4).map(|k| format!("jc-{k}")).collect(),
            Workload::Bounded => (0..2).map(|k| format!("jb-{k}")).collect(),
            Workload::Set => SET_KEYS.through(run),
            _ => Vec::new(),
        }
    }

    /// The checker for this workload's history. `linearizable_reads`: counter reads must
    /// reflect every add acknowledged before them (keys strict for the whole run).
    pub fn checker(self, linearizable_reads: bool) -> Box<dyn Checker + Send> {
        match self {
            Workload::Register => Box::new(LinearizableChecker {
                limits: SearchLimits {
                    time_limit: Some(Duration::from_secs(120)),
                    ..SearchLimits::default()
                },
                ..LinearizableChecker::default()
            }),
            Workload::Counter => Box::new(CounterChecker {
                reads: if linearizable_reads {
                    ReadBound::Linearizable
                } else {
                    ReadBound::Eventual
                },
                ..CounterChecker::default()
            }),
            Workload::Bounded => Box::new(BoundedChecker::new(-10, 10, 0)),
            Workload::Set => Box::new(SetChecker),
            Workload::Session => Box::new(SessionChecker),
            Workload::Watch => Box::new(WatchChecker),
            Workload::Bank => Box::new(BankChecker::new(
                crate::bank::accounts(),
                crate::bank::INITIAL_BALANCE,
            )),
            Workload::Lock => Box::new(LockChecker),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The rule the workload's keys live under; its mode is what the rules nemesis flips.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub pattern: &'static str,
    /// Extra TOML lines of the rule (type, bounds).
    pub extra: &'static str,
    /// The modes the rules nemesis may switch the keys to: `available` only where the
    /// checker's property holds in it too (not for registers, which become last-writer-wins
    /// and are checked for linearizability).
    pub modes: &'static [&'static str],
}

/// Every mode: counters, bounded counters, sets and sessions keep their properties in each
/// (in `available`, set removes and bounded adds beyond quota are refused, definitely).
const ALL_MODES: &[&str] = &["strict", "hybrid", "available"];

impl RuleSpec {
    fn new(pattern: &'static str, extra: &'static str) -> RuleSpec {
        RuleSpec {
            pattern,
            extra,
            modes: ALL_MODES,
        }
    }

    pub fn toml(&self, mode: &str) -> String {
        format!(
            "default_mode = \"hybrid\"\n\n[[rules]]\npattern = \"{}\"\nmode = \"{mode}\"\n{}",
            self.pattern, self.extra
        )
    }
}

/// What every worker shares.
pub struct Ctx {
    pub clients: Clients,
    pub rec: Arc<Recorder>,
    pub nodes: usize,
    pub deadline: Instant,
    pub stop: Arc<AtomicBool>,
    /// Most ops one worker issues.
    pub max_ops: u64,
    /// Pause between a worker's ops.
    pub think: Duration,
    /// Counter reads at LINEARIZABLE (keys strict for the whole run, checked as such);
    /// SERIALIZABLE otherwise.
    pub linearizable_counter_reads: bool,
}

impl Ctx {
    pub(crate) fn done(&self, ops: u64) -> bool {
        ops >= self.max_ops || Instant::now() >= self.deadline || self.stop.load(Ordering::Relaxed)
    }

    pub(crate) fn node(&self, rng: &mut Rng) -> usize {
        rng.range(1, self.nodes as u64) as usize
    }

    /// Record an invocation, await `call`, record its completion; an `info` retires the
    /// process. Returns the invocation's index and the completion.
    #[allow(clippy::too_many_arguments)] // one per field of the recorded op
    pub(crate) async fn op(
        &self,
        process: &mut u64,
        f: F,
        key: &str,
        arg: Value,
        node: usize,
        is_final: bool,
        call: impl Future<Output = Completion>,
    ) -> (u64, Completion) {
        let invoke = self.rec.record(
            Op::new(0, 0, Process::Client(*process), OpType::Invoke, f.clone())
                .with_key(key)
                .with_value(arg)
                .with_node(node_name(node))
                .with_final(is_final),
        );
        let completion = call.await;
        let base = Op::new(0, 0, Process::Client(*process), OpType::Ok, f)
            .with_key(key)
            .with_node(node_name(node))
            .with_final(is_final);
        let op = match &completion {
            Completion::Ok(v) => base.with_value(v.clone()),
            Completion::Fail(e) => Op {
                kind: OpType::Fail,
                ..base.with_error(e.clone())
            },
            Completion::Info(e) => Op {
                kind: OpType::Info,
                ..base.with_error(e.clone())
            },
        };
        self.rec.record(op);
        if matches!(completion, Completion::Info(_)) {
            *process = self.rec.fresh_process();
        }
        (invoke.index, completion)
    }

    pub(crate) async fn write(&self, node: usize, key: &str, op: pb::op::Kind) -> Completion {
        self.write_in_session(node, key, op, Vec::new(), None).await
    }

    /// A write carrying a session `token` (awaited by the node before it admits the op);
    /// on success the response's token is stored in `out`.
    async fn write_in_session(
        &self,
        node: usize,
        key: &str,
        op: pb::op::Kind,
        token: Vec<u8>,
        out: Option<&std::sync::Mutex<Vec<u8>>>,
    ) -> Completion {
        match self.clients.write(node, key, op, token).await {
            Ok(r) if r.succeeded => {
                if let Some(out) = out {
                    *out.lock().unwrap_or_else(|e| e.into_inner()) = r.token;
                }
                Completion::Ok(Value::Null)
            }
            Ok(_) => Completion::Fail("the compare-and-set condition did not hold".into()),
            Err(e) => write_error(&e),
        }
    }

    /// A serializable read of node `node`'s replica: the value (as the checkers see it) and,
    /// for a register, its version (0 otherwise); `None` if the node did not answer.
    async fn replica_state(&self, node: usize, key: &str) -> Option<(Value, u64)> {
        let r = self
            .clients
            .get(node, key, pb::Consistency::Serializable, Vec::new())
            .await
            .ok()?;
        let version = match r.value.as_ref().and_then(|v| v.kind.as_ref()) {
            Some(pb::value::Kind::Register(reg)) => reg.version,
            _ => 0,
        };
        Some((absent_as(key, read_value(&r).ok()?), version))
    }

    async fn read(&self, node: usize, key: &str, consistency: pb::Consistency) -> Completion {
        match self.clients.get(node, key, consistency, Vec::new()).await {
            Ok(r) => match read_value(&r) {
                Ok(v) => Completion::Ok(absent_as(key, v)),
                Err(e) => Completion::Info(format!("unreadable response: {e}")),
            },
            Err(e) => read_error(&e),
        }
    }
}

/// An absent counter reads as 0 and an absent set as [] (the checkers' initial values).
fn absent_as(key: &str, v: Value) -> Value {
    if !v.is_null() {
        v
    } else if key.starts_with("jc-") || key.starts_with("jb-") || key.starts_with("jt-c-") {
        json!(0)
    } else if key.starts_with("js-") {
        json!([])
    } else {
        v
    }
}

/// What a workload needs in place before its clients and the nemesis start (the bank's
/// accounts), within `limit`; how long it took.
pub async fn prepare(
    workload: Workload,
    clients: &Clients,
    rec: &Recorder,
    limit: Duration,
) -> Result<Option<Duration>, String> {
    match workload {
        Workload::Bank => crate::bank::setup(clients, rec, limit).await.map(Some),
        _ => Ok(None),
    }
}

/// Run `concurrency` workers of `workload` until the deadline. The watch workload's
/// watchers outlive the writers: they are returned for the final phase.
pub async fn run(
    workload: Workload,
    ctx: Arc<Ctx>,
    concurrency: usize,
    rng: &mut Rng,
) -> Option<crate::watch::Watchers> {
    if workload == Workload::Watch {
        return Some(crate::watch::run(ctx, concurrency, rng).await);
    }
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let ctx = ctx.clone();
        let rng = rng.fork(w as u64);
        tasks.push(tokio::spawn(async move {
            match workload {
                Workload::Register => register_worker(&ctx, w as u64, rng).await,
                Workload::Counter | Workload::Bounded => counter_worker(&ctx, workload, rng).await,
                Workload::Set => set_worker(&ctx, w as u64, rng).await,
                Workload::Session => session_worker(&ctx, rng).await,
                Workload::Bank => crate::bank::client(&ctx, rng).await,
                Workload::Lock => crate::lock::client(&ctx, w as u64, rng).await,
                Workload::Watch => unreachable!("run above"),
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "a worker panicked");
        }
    }
    None
}

/// Keys replaced by fresh ones every `secs`: `<prefix>-<generation>-<k>`, `keys` at a time.
/// Small per-key histories keep the register search cheap and set reads (which record the
/// whole set) bounded.
pub(crate) struct KeyGenerations {
    pub(crate) prefix: &'static str,
    pub(crate) keys: u64,
    pub(crate) secs: u64,
}

impl KeyGenerations {
    fn generation(&self, elapsed: Duration) -> u64 {
        elapsed.as_secs() / self.secs
    }

    fn key(&self, generation: u64, k: u64) -> String {
        format!("{}-{generation}-{k}", self.prefix)
    }

    /// A random key of the generation current at `elapsed`.
    pub(crate) fn current(&self, elapsed: Duration, rng: &mut Rng) -> String {
        self.key(self.generation(elapsed), rng.below(self.keys))
    }

    /// Every key of every generation up to the one at `run`.
    fn through(&self, run: Duration) -> Vec<String> {
        (0..=self.generation(run))
            .flat_map(|g| (0..self.keys).map(move |k| self.key(g, k)))
            .collect()
    }
}

/// Register keys: 4 live at a time, new every 10 s.
const REGISTER_KEYS: KeyGenerations = KeyGenerations {
    prefix: "jr",
    keys: 4,
    secs: 10,
};

async fn register_worker(ctx: &Ctx, worker: u64, mut rng: Rng) {
    let mut process = ctx.rec.fresh_process();
    let mut last_seen: HashMap<String, i64> = HashMap::new();
    let mut next_value = worker * 1_000_000_000;
    let mut ops = 0;
    let start = ctx.rec.start();
    while !ctx.done(ops) {
        ops += 1;
        // Fresh keys every 10 s keep each key's history small for the linearizability search.
        let key = REGISTER_KEYS.current(start.elapsed(), &mut rng);
        let node = ctx.node(&mut rng);
        let dice = rng.below(10);
        if dice < 4 {
            let (_, c) = ctx
                .op(
                    &mut process,
                    F::Read,
                    &key,
                    Value::Null,
                    node,
                    false,
                    async { ctx.read(node, &key, pb::Consistency::Linearizable).await },
                )
                .await;
            if let Completion::Ok(Value::Number(n)) = c {
                last_seen.insert(key.clone(), n.as_i64().unwrap_or_default());
            }
        } else {
            next_value += 1;
            let value = next_value as i64;
            let expected = last_seen.get(&key).copied();
            if let (false, Some(from)) = (dice < 7, expected) {
                let (_, c) = ctx
                    .op(
                        &mut process,
                        F::Cas,
                        &key,
                        json!([from, value]),
                        node,
                        false,
                        async {
                            let op = pb::op::Kind::Cas(pb::Cas {
                                expect: Some(pb::cas::Expect::Value(int_bytes(from))),
                                new_value: int_bytes(value),
                                delete: false,
                            });
                            ctx.write(node, &key, op).await
                        },
                    )
                    .await;
                if matches!(c, Completion::Ok(_)) {
                    last_seen.insert(key.clone(), value);
                }
            } else {
                let (_, c) = ctx
                    .op(
                        &mut process,
                        F::Write,
                        &key,
                        json!(value),
                        node,
                        false,
                        async {
                            let op = pb::op::Kind::Put(pb::Put {
                                value: int_bytes(value),
                            });
                            ctx.write(node, &key, op).await
                        },
                    )
                    .await;
                if matches!(c, Completion::Ok(_)) {
                    last_seen.insert(key.clone(), value);
                }
            }
        }
        tokio::time::sleep(ctx.think).await;
    }
}

async fn counter_worker(ctx: &Ctx, workload: Workload, mut rng: Rng) {
    let mut process = ctx.rec.fresh_process();
    let keys = workload.final_keys(Duration::ZERO);
    let mut ops = 0;
    while !ctx.done(ops) {
        ops += 1;
        let key = rng.pick(&keys).clone();
        let node = ctx.node(&mut rng);
        if rng.below(10) < 7 {
            let delta = if workload == Workload::Bounded {
                let d = rng.range(1, 3) as i64;
                if rng.chance(0.5) { -d } else { d }
            } else {
                rng.range(1, 5) as i64
            };
            ctx.op(
                &mut process,
                F::Add,
                &key,
                json!(delta),
                node,
                false,
                async {
                    ctx.write(node, &key, pb::op::Kind::Add(pb::Add { delta }))
                        .await
                },
            )
            .await;
        } else {
            let consistency = if ctx.linearizable_counter_reads {
                pb::Consistency::Linearizable
            } else {
                pb::Consistency::Serializable
            };
            ctx.op(
                &mut process,
                F::Read,
                &key,
                Value::Null,
                node,
                false,
                async { ctx.read(node, &key, consistency).await },
            )
            .await;
        }
        tokio::time::sleep(ctx.think).await;
    }
}

/// Set keys: 3 live at a time, new every 30 s. Every read records the whole set, so one set
/// per key for a whole run made the history grow with the square of its length: a 10-minute
/// run on 3 keys wrote 3.6 GB, which the harness ran out of memory loading. Fresh keys every
/// 30 s bound each set (about a thousand elements here).
const SET_KEYS: KeyGenerations = KeyGenerations {
    prefix: "js",
    keys: 3,
    secs: 30,
};

async fn set_worker(ctx: &Ctx, worker: u64, mut rng: Rng) {
    let mut process = ctx.rec.fresh_process();
    let start = ctx.rec.start();
    // Own acknowledged elements, each with its add's session token: the remove carries it, so
    // it observes the add wherever the add was taken (observed-remove, see checker::set).
    let mut added: Vec<(String, i64, Vec<u8>)> = Vec::new();
    let mut next = worker * 1_000_000_000;
    let mut ops = 0;
    while !ctx.done(ops) {
        ops += 1;
        let node = ctx.node(&mut rng);
        let dice = rng.below(10);
        if dice < 1 && !added.is_empty() {
            let (key, e, token) = added.swap_remove(rng.below(added.len() as u64) as usize);
            ctx.op(
                &mut process,
                F::SetRemove,
                &key,
                json!(e),
                node,
                false,
                async {
                    let op = pb::op::Kind::SetRemove(pb::SetRemove {
                        element: int_bytes(e),
                    });
                    ctx.write_in_session(node, &key, op, token, None).await
                },
            )
            .await;
        } else if dice < 8 {
            next += 1;
            let e = next as i64;
            let key = SET_KEYS.current(start.elapsed(), &mut rng);
            let token = std::sync::Mutex::new(Vec::new());
            let (_, c) = ctx
                .op(
                    &mut process,
                    F::SetAdd,
                    &key,
                    json!(e),
                    node,
                    false,
                    async {
                        let op = pb::op::Kind::SetAdd(pb::SetAdd {
                            element: int_bytes(e),
                        });
                        ctx.write_in_session(node, &key, op, Vec::new(), Some(&token))
                            .await
                    },
                )
                .await;
            if matches!(c, Completion::Ok(_)) {
                let token = token.into_inner().unwrap_or_else(|e| e.into_inner());
                added.push((key, e, token));
            }
        } else {
            let key = SET_KEYS.current(start.elapsed(), &mut rng);
            ctx.op(
                &mut process,
                F::ReadSet,
                &key,
                Value::Null,
                node,
                false,
                async { ctx.read(node, &key, pb::Consistency::Serializable).await },
            )
            .await;
        }
        tokio::time::sleep(ctx.think).await;
    }
}

async fn session_worker(ctx: &Ctx, mut rng: Rng) {
    let mut process = ctx.rec.fresh_process();
    let mut ops = 0;
    let mut round = 0u64;
    while !ctx.done(ops) {
        ops += 2;
        round += 1;
        let a = ctx.node(&mut rng);
        let b = (a + rng.range(0, ctx.nodes as u64 - 2) as usize) % ctx.nodes + 1;
        let counter = rng.chance(0.5);
        let key = format!("jt-{}-{process}-{round}", if counter { "c" } else { "r" });
        let token = std::sync::Mutex::new(Vec::new());
        let (f, arg, op) = if counter {
            (F::Add, json!(1), pb::op::Kind::Add(pb::Add { delta: 1 }))
        } else {
            let v = (process * 1_000_000 + round) as i64;
            (
                F::Write,
                json!(v),
                pb::op::Kind::Put(pb::Put {
                    value: int_bytes(v),
                }),
            )
        };
        let (w, c) = ctx
            .op(&mut process, f, &key, arg, a, false, async {
                ctx.write_in_session(a, &key, op, Vec::new(), Some(&token))
                    .await
            })
            .await;
        if matches!(c, Completion::Ok(_)) {
            let token = token.into_inner().unwrap_or_else(|e| e.into_inner());
            ctx.op(&mut process, F::Read, &key, json!(w), b, false, async {
                match ctx
                    .clients
                    .get(b, &key, pb::Consistency::Causal, token)
                    .await
                {
                    Ok(r) => match read_value(&r) {
                        Ok(v) => Completion::Ok(absent_as(&key, v)),
                        Err(e) => Completion::Info(format!("unreadable response: {e}")),
                    },
                    Err(e) => read_error(&e),
                }
            })
            .await;
        }
        tokio::time::sleep(ctx.think).await;
    }
}

/// After heal: wait until every node's replica of every key agrees (bounded by `limit`),
/// then record one final read per node and key. Replicas agree when they read the same
/// value and, for registers, the same version (a replica that applied an entry twice
/// shows the right value under a wrong version). Returns how long convergence took, or
/// the disagreement still seen at the limit. The bank reads all its accounts at once
/// (`crate::bank::final_phase`).
pub async fn final_phase(
    workload: Workload,
    ctx: &Ctx,
    limit: Duration,
) -> Result<Duration, String> {
    if workload == Workload::Bank {
        return crate::bank::final_phase(ctx, limit).await;
    }
    let keys = workload.final_keys(ctx.rec.start().elapsed());
    let started = Instant::now();
    let mut outcome = Err("no round of reads completed".to_owned());
    while started.elapsed() < limit {
        let mut disagreement = None;
        for key in &keys {
            let mut seen: Vec<(usize, Option<(Value, u64)>)> = Vec::new();
            for node in 1..=ctx.nodes {
                seen.push((node, ctx.replica_state(node, key).await));
            }
            let first = &seen[0].1;
            if first.is_none() || seen.iter().any(|(_, s)| s != first) {
                let views: Vec<String> = seen
                    .iter()
                    .map(|(n, s)| match s {
                        Some((v, 0)) => format!("n{n} {v}"),
                        Some((v, version)) => format!("n{n} {v} (version {version})"),
                        None => format!("n{n} unreadable"),
                    })
                    .collect();
                disagreement = Some(format!("{key}: {}", views.join(", ")));
                break;
            }
        }
        match disagreement {
            None => {
                outcome = Ok(started.elapsed());
                break;
            }
            Some(d) => outcome = Err(d),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let f = if workload == Workload::Set {
        F::ReadSet
    } else {
        F::Read
    };
    for key in &keys {
        for node in 1..=ctx.nodes {
            let mut process = ctx.rec.fresh_process();
            ctx.op(
                &mut process,
                f.clone(),
                key,
                Value::Null,
                node,
                true,
                async { ctx.read(node, key, pb::Consistency::Serializable).await },
            )
            .await;
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_generations_advance_with_time_and_the_final_phase_reads_them_all() {
        let mut rng = Rng::new(7);
        assert!(
            REGISTER_KEYS
                .current(Duration::from_secs(9), &mut rng)
                .starts_with("jr-0-")
        );
        assert!(
            SET_KEYS
                .current(Duration::from_secs(65), &mut rng)
                .starts_with("js-2-")
        );
        let all = SET_KEYS.through(Duration::from_secs(65));
        assert_eq!(all.len(), 9);
        assert_eq!(all.first().map(String::as_str), Some("js-0-0"));
        assert_eq!(all.last().map(String::as_str), Some("js-2-2"));
        assert_eq!(
            Workload::Register.final_keys(Duration::from_secs(25)).len(),
            12
        );
    }
}
