//! Nemeses: the faults a run injects, on a seeded schedule.
//!
//! One fault at a time: a quiet interval, then a fault held for a while, then its repair,
//! each start and stop recorded in the history as a `"process": "nemesis"` op (the report
//! shades these windows). Every random choice comes from the run's seed; choices that
//! depend on live state (which node leads a group) replay as "the leader of group g".
//!
//! - `partition`: one of random halves, isolate the leader of a random group, majorities
//!   ring (every node sees a majority, no two the same one), bridge (two halves joined by one
//!   node), by iptables inside the receiving namespaces;
//! - `kill`: kill -9 a node (half the time a group leader), restart it at the end;
//! - `pause`: SIGSTOP a node (half the time a group leader), SIGCONT at the end;
//! - `clock`: skew one node's wall clock through libfaketime by a random offset;
//! - `rules`: switch the workload's keys to another of `strict`, `hybrid` and (except for
//!   registers) `available`, chosen by the seed (admin SetRules with the expected version),
//!   an instantaneous event.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::Clients;
use crate::cluster::{Cluster, node_name};
use crate::recorder::Recorder;
use crate::rng::Rng;
use crate::workload::RuleSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NemesisKind {
    Partition,
    Kill,
    Pause,
    Clock,
    Rules,
}

impl NemesisKind {
    pub const ALL: [NemesisKind; 5] = [
        NemesisKind::Partition,
        NemesisKind::Kill,
        NemesisKind::Pause,
        NemesisKind::Clock,
        NemesisKind::Rules,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NemesisKind::Partition => "partition",
            NemesisKind::Kill => "kill",
            NemesisKind::Pause => "pause",
            NemesisKind::Clock => "clock",
            NemesisKind::Rules => "rules",
        }
    }

    /// `partition,kill`, `all` or `none`.
    pub fn parse_list(text: &str) -> Result<Vec<NemesisKind>, String> {
        let mut kinds = BTreeSet::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "none" => {}
                "all" => kinds.extend(NemesisKind::ALL),
                _ => {
                    let k = NemesisKind::ALL
                        .into_iter()
                        .find(|k| k.name() == part)
                        .ok_or_else(|| {
                            format!(
                                "unknown nemesis '{part}': use partition, kill, pause, clock, rules, all or none"
                            )
                        })?;
                    kinds.insert(k);
                }
            }
        }
        Ok(kinds.into_iter().collect())
    }
}

impl fmt::Display for NemesisKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Timing of the schedule.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Quiet time between faults, seconds (uniform in the range).
    pub quiet: (u64, u64),
    /// How long a fault is held, seconds.
    pub hold: (u64, u64),
}

impl Default for Schedule {
    fn default() -> Schedule {
        Schedule {
            quiet: (2, 4),
            hold: (3, 6),
        }
    }
}

/// What the nemesis needs of the run.
pub struct NemesisCtx {
    pub cluster: Arc<Mutex<Cluster>>,
    pub clients: Clients,
    pub rec: Arc<Recorder>,
    pub rules: RuleSpec,
    /// The mode the workload's keys are in now (flipped by `rules`).
    pub mode: Mutex<&'static str>,
    pub stop: Arc<AtomicBool>,
}

/// A fault in force and how to undo it.
enum Active {
    Partition,
    Killed(usize),
    Paused(usize),
    Skewed(usize),
}

fn lock(c: &Mutex<Cluster>) -> std::sync::MutexGuard<'_, Cluster> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

impl NemesisCtx {
    fn nodes(&self) -> usize {
        lock(&self.cluster).len()
    }

    /// Leaders of data groups as some reachable node reports them: (group, leader).
    async fn leaders(&self) -> Vec<(u64, usize)> {
        for node in 1..=self.nodes() {
            if let Ok(s) = self.clients.status(node).await {
                return s
                    .groups
                    .iter()
                    .filter(|g| g.id != 0 && g.leader != 0)
                    .map(|g| (g.id, g.leader as usize))
                    .collect();
            }
        }
        Vec::new()
    }

    /// A random node, or half the time the leader of a random group.
    async fn target(&self, rng: &mut Rng) -> (usize, serde_json::Value) {
        let leaders = self.leaders().await;
        if rng.chance(0.5) && !leaders.is_empty() {
            let (g, l) = *rng.pick(&leaders);
            return (l, json!({"node": node_name(l), "leader_of_group": g}));
        }
        let n = rng.range(1, self.nodes() as u64) as usize;
        (n, json!({"node": node_name(n)}))
    }

    async fn start_partition(&self, rng: &mut Rng) -> Result<Active, String> {
        let n = self.nodes();
        let mut order: Vec<usize> = (1..=n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut grudge = vec![BTreeSet::new(); n];
        let cut = |grudge: &mut Vec<BTreeSet<usize>>, a: &[usize], b: &[usize]| {
            for &x in a {
                for &y in b {
                    grudge[x - 1].insert(y);
                    grudge[y - 1].insert(x);
                }
            }
        };
        let kind = *rng.pick(&["halves", "isolate-leader", "ring", "bridge"]);
        let mut desc = json!({"kind": kind});
        match kind {
            "halves" => {
                let (a, b) = order.split_at(n / 2);
                cut(&mut grudge, a, b);
                desc["sides"] = json!([names(a), names(b)]);
            }
            "isolate-leader" => {
                let leaders = self.leaders().await;
                let (g, l) = if leaders.is_empty() {
                    (0, order[0])
                } else {
                    *rng.pick(&leaders)
                };
                let rest: Vec<usize> = (1..=n).filter(|&x| x != l).collect();
                cut(&mut grudge, &[l], &rest);
                desc["isolated"] = json!(node_name(l));
                desc["leader_of_group"] = json!(g);
            }
            "ring" => {
                // Each node sees the k nearest on each side of a random ring: 1 + 2k is a
                // majority, and no two nodes see the same majority.
                let majority = n / 2 + 1;
                let k = majority / 2;
                for (i, &x) in order.iter().enumerate() {
                    for (j, &y) in order.iter().enumerate() {
                        let d = (i as i64 - j as i64).unsigned_abs() as usize;
                        if d.min(n - d) > k {
                            grudge[x - 1].insert(y);
                        }
                    }
                }
                desc["ring"] = json!(names(&order));
            }
            _ => {
                let half = (n - 1) / 2;
                let (a, rest) = order.split_at(half);
                let (bridge, b) = rest.split_first().expect("n >= 3");
                cut(&mut grudge, a, b);
                desc["sides"] = json!([names(a), names(b)]);
                desc["bridge"] = json!(node_name(*bridge));
            }
        }
        let cluster = self.cluster.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut c = lock(&cluster);
            c.partition(&grudge)?;
            Ok::<_, crate::cluster::ClusterError>(c.verify_connectivity())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if !applied.is_empty() {
            desc["connectivity_mismatch"] = json!(applied);
            tracing::warn!(
                ?applied,
                "the partition does not cut exactly the intended paths"
            );
        }
        self.rec.nemesis("start_partition", desc);
        Ok(Active::Partition)
    }

    async fn start(&self, kind: NemesisKind, rng: &mut Rng) -> Result<Option<Active>, String> {
        match kind {
            NemesisKind::Partition => self.start_partition(rng).await.map(Some),
            NemesisKind::Kill => {
                let (n, desc) = self.target(rng).await;
                let cluster = self.cluster.clone();
                tokio::task::spawn_blocking(move || lock(&cluster).kill(n))
                    .await
                    .map_err(|e| e.to_string())?;
                self.rec.nemesis("kill", desc);
                Ok(Some(Active::Killed(n)))
            }
            NemesisKind::Pause => {
                let (n, desc) = self.target(rng).await;
                lock(&self.cluster).pause(n);
                self.rec.nemesis("pause", desc);
                Ok(Some(Active::Paused(n)))
            }
            NemesisKind::Clock => {
                let n = rng.range(1, self.nodes() as u64) as usize;
                let offset = *rng.pick(&[-2.0, -0.25, 0.25, 2.0, 30.0]);
                lock(&self.cluster)
                    .set_clock_offset(n, offset)
                    .map_err(|e| e.to_string())?;
                self.rec.nemesis(
                    "clock_skew",
                    json!({"node": node_name(n), "offset_s": offset}),
                );
                Ok(Some(Active::Skewed(n)))
            }
            NemesisKind::Rules => {
                self.flip_rules(rng).await;
                Ok(None)
            }
        }
    }

    /// Switch the workload's keys to the other mode; recorded whatever the outcome.
    async fn flip_rules(&self, rng: &mut Rng) {
        let current = *self.mode.lock().unwrap_or_else(|e| e.into_inner());
        let others: Vec<&'static str> = self
            .rules
            .modes
            .iter()
            .copied()
            .filter(|m| *m != current)
            .collect();
        let next = *rng.pick(&others);
        let node = rng.range(1, self.nodes() as u64) as usize;
        match set_rules(&self.clients, node, &self.rules, next).await {
            Ok(version) => {
                *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = next;
                self.rec.nemesis(
                    "rules",
                    json!({"mode": next, "version": version, "node": node_name(node)}),
                );
            }
            Err(e) => {
                self.rec.nemesis(
                    "rules_failed",
                    json!({"mode": next, "node": node_name(node), "error": e}),
                );
            }
        }
    }

    async fn stop_fault(&self, active: Active) -> Result<(), String> {
        match active {
            Active::Partition => {
                let cluster = self.cluster.clone();
                tokio::task::spawn_blocking(move || lock(&cluster).heal())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                self.rec.nemesis("stop_partition", json!(null));
            }
            Active::Killed(n) => {
                let cluster = self.cluster.clone();
                tokio::task::spawn_blocking(move || lock(&cluster).spawn(n))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                self.rec.nemesis("restart", json!({"node": node_name(n)}));
            }
            Active::Paused(n) => {
                lock(&self.cluster).resume(n);
                self.rec.nemesis("resume", json!({"node": node_name(n)}));
            }
            Active::Skewed(n) => {
                lock(&self.cluster)
                    .set_clock_offset(n, 0.0)
                    .map_err(|e| e.to_string())?;
                self.rec
                    .nemesis("clock_reset", json!({"node": node_name(n)}));
            }
        }
        Ok(())
    }

    /// Sleep until `until` or the stop flag; false when stopped early.
    async fn sleep_until(&self, until: Instant) -> bool {
        while Instant::now() < until {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// Run the schedule until `deadline` (or the stop flag), then repair what is active.
    pub async fn run(
        &self,
        kinds: &[NemesisKind],
        schedule: Schedule,
        mut rng: Rng,
        deadline: Instant,
    ) -> Result<(), String> {
        if kinds.is_empty() {
            self.sleep_until(deadline).await;
            return Ok(());
        }
        loop {
            let quiet = Duration::from_secs(rng.range(schedule.quiet.0, schedule.quiet.1));
            if Instant::now() + quiet >= deadline || !self.sleep_until(Instant::now() + quiet).await
            {
                break;
            }
            let kind = *rng.pick(kinds);
            let hold = Duration::from_secs(rng.range(schedule.hold.0, schedule.hold.1));
            let active = self.start(kind, &mut rng).await?;
            if let Some(active) = active {
                let until = (Instant::now() + hold).min(deadline);
                self.sleep_until(until).await;
                self.stop_fault(active).await?;
            }
        }
        self.sleep_until(deadline).await;
        Ok(())
    }
}

fn names(nodes: &[usize]) -> Vec<String> {
    nodes.iter().map(|&n| node_name(n)).collect()
}

/// Put the workload's keys in `mode` with a compare-and-set on the rules version; retried at
/// other nodes while no quorum answers. Returns the new version.
pub async fn set_rules(
    clients: &Clients,
    first: usize,
    rules: &RuleSpec,
    mode: &str,
) -> Result<u64, String> {
    let n = clients.len();
    let mut last = String::new();
    for attempt in 0..(2 * n) {
        let node = (first - 1 + attempt) % n + 1;
        let current = match clients.get_rules(node).await {
            Ok(r) => r,
            Err(e) => {
                last = format!("get rules at {}: {}", node_name(node), e.message());
                continue;
            }
        };
        match clients
            .set_rules(node, current.version, rules.toml(mode))
            .await
        {
            Ok(r) => return Ok(r.version),
            Err(e) => last = format!("set rules at {}: {}", node_name(node), e.message()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}
