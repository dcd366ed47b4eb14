//! The `watch` workload: writers on both paths, and one watcher per node that follows every
//! change of the workload's keys across kills, pauses and partitions by resuming with its
//! last token, on the next node when its node fails it.
//!
//! - Writers put unique integers to registers `jw-r-0..3` (Raft-ordered in every mode the
//!   rules nemesis picks: `strict` or `hybrid`) and add unique elements to sets
//!   `jw-s-<g>-0..1` (fast path in `hybrid`, Raft-ordered in `strict`), a new set generation
//!   every 5 s so an event's value (the whole set) stays small.
//! - Watchers open `Kv.Watch` on prefix `jw-` with `prev_value` (a set event's added element
//!   is its value minus its previous value) and progress responses every 500 ms. A stream
//!   that says nothing for 3 s (a paused node), ends, or fails is recorded and resumed with
//!   the last token on the next node. OUT_OF_RANGE (the token is older than that node's
//!   change log, e.g. a node restarted since) moves on too; a watcher that every node turns
//!   away in a row gives up, which the checker reports as undecided.
//! - Every stretch of a stream is one `watch` op (ended after [`EVENTS_PER_STRETCH`] events,
//!   so history lines stay short); `checker::watch` documents the format and the property.
//! - After heal, [`Watchers::finish`] waits until every watcher received every acknowledged
//!   write (bounded), then stops them. Dropping [`Watchers`] stops them too, on every path.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::client::{Completion, bytes_int, int_bytes};
use crate::cluster::node_name;
use crate::history::{F, Op, OpType, Process};
use crate::pb;
use crate::rng::Rng;
use crate::workload::{Ctx, KeyGenerations};

/// The prefix every key of the workload has (and the watchers watch).
pub const PREFIX: &str = "jw-";
/// Register keys: Raft-ordered writes.
const REGISTERS: u64 = 4;
/// Set keys: fast-path adds in `hybrid`.
const SET_KEYS: KeyGenerations = KeyGenerations {
    prefix: "jw-s",
    keys: 2,
    secs: 5,
};
/// Events per recorded stretch of a stream.
pub const EVENTS_PER_STRETCH: usize = 200;
/// A stream silent this long (progress responses come every 500 ms) is abandoned.
const SILENCE_MAX: Duration = Duration::from_secs(3);
const PROGRESS_MS: u32 = 500;
/// Pause before resuming on the next node.
const RESUME_PAUSE: Duration = Duration::from_millis(200);
/// After heal, the wait for missing events ends early once no watcher received anything
/// for this long: what is missing then is not on its way.
const STALL_MAX: Duration = Duration::from_secs(15);
/// How long watchers get to open their streams before the writers start.
const CREATE_LIMIT: Duration = Duration::from_secs(30);

type Seen = (String, i64);

/// What writers and watchers share.
struct Shared {
    /// Writes acknowledged `ok`: what every watcher must receive.
    acked: Mutex<HashSet<Seen>>,
    /// What each watcher received.
    seen: Vec<Mutex<HashSet<Seen>>>,
    /// Watchers whose stream is open (counted once each, at their first `created`).
    created: Mutex<HashSet<usize>>,
    gave_up: Mutex<HashSet<usize>>,
    /// When a watcher last received an event.
    last_event: Mutex<Instant>,
    stop: tokio::sync::watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running watchers.
pub struct Watchers {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Watchers {
    /// Start one watcher per node and wait until each has its stream open, so every write
    /// of the run comes after every watcher's start.
    pub async fn start(ctx: &Arc<Ctx>) -> Watchers {
        let (stop, _) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            acked: Mutex::new(HashSet::new()),
            seen: (0..ctx.nodes).map(|_| Mutex::new(HashSet::new())).collect(),
            created: Mutex::new(HashSet::new()),
            gave_up: Mutex::new(HashSet::new()),
            last_event: Mutex::new(Instant::now()),
            stop,
        });
        let tasks = (0..ctx.nodes)
            .map(|w| {
                let (ctx, shared) = (ctx.clone(), shared.clone());
                tokio::spawn(async move { watcher(&ctx, &shared, w).await })
            })
            .collect();
        let watchers = Watchers { shared, tasks };
        let started = Instant::now();
        while lock(&watchers.shared.created).len() < ctx.nodes && started.elapsed() < CREATE_LIMIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let created = lock(&watchers.shared.created).len();
        if created < ctx.nodes {
            tracing::warn!(
                created,
                "not every watcher opened its stream before the writers start"
            );
        }
        watchers
    }

    /// Wait (at most `limit`) until every watcher that has not given up received every
    /// acknowledged write, then stop the watchers. Returns how long that took, or what was
    /// still missing at the limit.
    pub async fn finish(self, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let outcome = loop {
            let missing = self.missing();
            if missing.is_empty() {
                break Ok(started.elapsed());
            }
            if started.elapsed() >= limit {
                break Err(missing.join("; "));
            }
            let quiet = lock(&self.shared.last_event).elapsed();
            if quiet >= STALL_MAX {
                break Err(format!(
                    "{}; no watcher received anything for {quiet:.0?}",
                    missing.join("; ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.shared.stop.send_replace(true);
        let mut this = self;
        for t in std::mem::take(&mut this.tasks) {
            // A watcher ends its stretch and returns on stop; a stuck one is aborted on drop.
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        outcome
    }

    fn missing(&self) -> Vec<String> {
        let acked = lock(&self.shared.acked).clone();
        let gave_up = lock(&self.shared.gave_up).clone();
        let mut out = Vec::new();
        for (w, seen) in self.shared.seen.iter().enumerate() {
            if gave_up.contains(&w) {
                continue;
            }
            let seen = lock(seen);
            let missing = acked.iter().filter(|a| !seen.contains(*a)).count();
            if missing > 0 {
                out.push(format!(
                    "watcher {} lacks {missing} acknowledged writes",
                    w + 1
                ));
            }
        }
        out
    }
}

/// The workload: start the watchers, run the writers until the deadline, and hand the
/// watchers back for the final phase.
pub async fn run(ctx: Arc<Ctx>, concurrency: usize, rng: &mut Rng) -> Watchers {
    let watchers = Watchers::start(&ctx).await;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (ctx, shared) = (ctx.clone(), watchers.shared.clone());
        let rng = rng.fork(w as u64);
        tasks.push(tokio::spawn(async move {
            writer(&ctx, &shared, w as u64, rng).await
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(error = %e, "a writer panicked");
        }
    }
    watchers
}

async fn writer(ctx: &Ctx, shared: &Shared, worker: u64, mut rng: Rng) {
    let mut process = ctx.rec.fresh_process();
    let start = ctx.rec.start();
    let mut next = worker * 1_000_000_000;
    let mut ops = 0;
    while !ctx.done(ops) {
        ops += 1;
        next += 1;
        let v = next as i64;
        let node = ctx.node(&mut rng);
        let (f, key, op) = if rng.chance(0.5) {
            let key = format!("{PREFIX}r-{}", rng.below(REGISTERS));
            let op = pb::op::Kind::Put(pb::Put {
                value: int_bytes(v),
            });
            (F::Write, key, op)
        } else {
            let key = SET_KEYS.current(start.elapsed(), &mut rng);
            let op = pb::op::Kind::SetAdd(pb::SetAdd {
                element: int_bytes(v),
            });
            (F::SetAdd, key, op)
        };
        let (_, c) = ctx
            .op(&mut process, f, &key, json!(v), node, false, async {
                ctx.write(node, &key, op).await
            })
            .await;
        if matches!(c, Completion::Ok(_)) {
            lock(&shared.acked).insert((key, v));
        }
        tokio::time::sleep(ctx.think).await;
    }
}

/// One event as the history records it (see `checker::watch`). A value of a type the
/// workload never writes is recorded as its debug text, which the checker rejects.
fn event_json(e: &pb::Event) -> Value {
    use pb::value::Kind;
    let key = String::from_utf8_lossy(&e.key).into_owned();
    let kind = |v: &Option<pb::Value>| v.as_ref().and_then(|v| v.kind.clone());
    let v = match (kind(&e.value), kind(&e.prev_value)) {
        (None, _) => Value::Null,
        (Some(Kind::Register(r)), _) => bytes_int(&r.value).map_or(Value::Null, Into::into),
        (Some(Kind::Set(now)), before) => {
            let before: HashSet<Vec<u8>> = match before {
                Some(Kind::Set(b)) => b.elements.into_iter().collect(),
                _ => HashSet::new(),
            };
            let added: Vec<Value> = now
                .elements
                .iter()
                .filter(|e| !before.contains(*e))
                .map(|e| bytes_int(e).map_or(Value::Null, Into::into))
                .collect();
            Value::Array(added)
        }
        (Some(other), _) => json!(format!("{other:?}")),
    };
    json!({"k": key, "v": v, "o": e.origin, "s": e.seq, "g": e.group, "i": e.index})
}

/// The values of an event a watcher counts as received (for the final wait).
fn received(event: &Value) -> Vec<Seen> {
    let key = event["k"].as_str().unwrap_or_default().to_owned();
    match &event["v"] {
        Value::Array(added) => added
            .iter()
            .filter_map(Value::as_i64)
            .map(|e| (key.clone(), e))
            .collect(),
        v => v.as_i64().map(|v| (key, v)).into_iter().collect(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One stretch of a stream being recorded.
struct Stretch {
    events: Vec<Value>,
}

/// Watcher `w` (0-based): starts on node `w + 1`, moves to the next node whenever its
/// stream fails, and records everything it receives.
async fn watcher(ctx: &Ctx, shared: &Shared, w: usize) {
    let process = ctx.rec.fresh_process();
    let mut stop = shared.stop.subscribe();
    let mut node = w % ctx.nodes + 1;
    let mut token: Vec<u8> = Vec::new();
    // Nodes in a row that turned the token away as too old.
    let mut behind_in_a_row = 0;
    let record_start = |node: usize, token: &[u8]| {
        ctx.rec.record(
            Op::new(0, 0, Process::Client(process), OpType::Invoke, F::Watch)
                .with_value(json!({"token": hex(token)}))
                .with_node(node_name(node)),
        );
    };
    let record_end = |node: usize, stretch: Stretch, end: String, gave_up: bool| {
        ctx.rec.record(
            Op::new(0, 0, Process::Client(process), OpType::Ok, F::Watch)
                .with_value(json!({"events": stretch.events, "end": end, "gave_up": gave_up}))
                .with_node(node_name(node)),
        );
    };
    loop {
        if *stop.borrow() || ctx.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        record_start(node, &token);
        let req = pb::WatchRequest {
            prefix: PREFIX.as_bytes().to_vec(),
            start_token: token.clone(),
            prev_value: true,
            progress_ms: PROGRESS_MS,
            ..Default::default()
        };
        let mut stream = match ctx.clients.watch(node, req).await {
            Ok(s) => s,
            Err(status) => {
                let behind = status.code() == Code::OutOfRange;
                behind_in_a_row = if behind { behind_in_a_row + 1 } else { 0 };
                let gave_up = behind_in_a_row >= ctx.nodes;
                let end = format!("{:?}: {}", status.code(), status.message());
                record_end(node, Stretch { events: Vec::new() }, end, gave_up);
                if gave_up {
                    tracing::error!(watcher = w + 1, "every node turned the watch token away");
                    lock(&shared.gave_up).insert(w);
                    return;
                }
                node = node % ctx.nodes + 1;
                tokio::time::sleep(RESUME_PAUSE).await;
                continue;
            }
        };
        behind_in_a_row = 0;
        let mut stretch = Stretch { events: Vec::new() };
        let end = loop {
            let next = tokio::select! {
                next = tokio::time::timeout(SILENCE_MAX, stream.next()) => next,
                _ = stop.changed() => break "stopped".to_owned(),
            };
            let resp = match next {
                Err(_) => break format!("silent for {SILENCE_MAX:?}"),
                Ok(None) => break "the stream ended".to_owned(),
                Ok(Some(Err(status))) => {
                    break format!("{:?}: {}", status.code(), status.message());
                }
                Ok(Some(Ok(resp))) => resp,
            };
            if resp.created {
                lock(&shared.created).insert(w);
            }
            if !resp.events.is_empty() {
                *lock(&shared.last_event) = Instant::now();
            }
            {
                let mut seen = lock(&shared.seen[w]);
                for e in &resp.events {
                    let e = event_json(e);
                    seen.extend(received(&e));
                    stretch.events.push(e);
                }
            }
            if !resp.token.is_empty() {
                token = resp.token;
            }
            if stretch.events.len() >= EVENTS_PER_STRETCH {
                record_end(
                    node,
                    std::mem::replace(&mut stretch, Stretch { events: Vec::new() }),
                    "stretch full".into(),
                    false,
                );
                record_start(node, &token);
            }
        };
        let stopped = end == "stopped";
        record_end(node, stretch, end, false);
        if stopped {
            return;
        }
        node = node % ctx.nodes + 1;
        tokio::time::sleep(RESUME_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_event_records_the_element_it_added() {
        let set = |elements: &[i64]| pb::Value {
            kind: Some(pb::value::Kind::Set(pb::value::SetValue {
                elements: elements.iter().map(|e| int_bytes(*e)).collect(),
            })),
        };
        let e = pb::Event {
            key: b"jw-s-0-1".to_vec(),
            value: Some(set(&[1, 2, 3])),
            prev_value: Some(set(&[1, 3])),
            origin: 2,
            seq: 9,
            ..Default::default()
        };
        let j = event_json(&e);
        assert_eq!(j["v"], json!([2]));
        assert_eq!(received(&j), vec![("jw-s-0-1".to_owned(), 2)]);
        let first = pb::Event {
            prev_value: None,
            ..e
        };
        assert_eq!(event_json(&first)["v"], json!([1, 2, 3]));
    }
}
