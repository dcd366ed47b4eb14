//! A deterministic in-memory cluster for property tests: replicas, one committed Raft log
//! applied in order by each replica at its own pace, and gossip links that reorder,
//! duplicate and partition. It drives only the kernel's public API.
#![allow(dead_code)]

use calm_kernel::fact::decode_fact;
use calm_kernel::lease::{LeaseCommand, LeaseId, LeaseOutcome};
use calm_kernel::rules::{Rule, RuleSet};
use calm_kernel::state::KeyState;
use calm_kernel::{
    Admitted, Bounds, Command, Delivered, HlcTimestamp, Mode, NodeId, Op, Outcome, Replica,
    ReplicaError, Test, Txn, TxnOutcome, Value, ValueType,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

pub const NODES: usize = 3;
pub const KEYS: [&[u8]; 4] = [b"k:counter", b"k:max", b"k:set", b"k:reg"];
pub const STOCK: &[u8] = b"stock:1";
pub const STOCK_BOUNDS: Bounds = Bounds { min: 0, max: 20 };

pub fn rules(mode: Mode) -> RuleSet {
    RuleSet {
        version: 1,
        rules: vec![Rule {
            pattern: "stock:*".into(),
            mode,
            value_type: Some(ValueType::BoundedCounter),
            bounds: Some(STOCK_BOUNDS),
        }],
        default_mode: mode,
    }
}

/// What a simulated client asked for, and what it was told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// Admitted on the fast path as this fact.
    Fact {
        key: Vec<u8>,
        op: Op,
    },
    /// Committed to the log at this index.
    Logged {
        index: usize,
    },
    Refused,
}

/// One committed log entry: a command on a key, or new rules (as group 0 would order them).
#[derive(Clone, Debug)]
pub enum Entry {
    Command(Command),
    Rules(RuleSet),
    Txn(Txn),
    /// A lease entry of the one group every key of the sim is in ([`LEASE_GROUP`]), in an
    /// entry of Raft term `term`.
    Lease {
        cmd: LeaseCommand,
        term: u64,
    },
    /// A register write attaching its key to `lease` (the key is its own subject).
    Leased {
        cmd: Command,
        lease: LeaseId,
    },
}

/// The group the sim's leases live in.
pub const LEASE_GROUP: u64 = 1;

impl Entry {
    pub fn command(&self) -> Option<&Command> {
        match self {
            Entry::Command(c) | Entry::Leased { cmd: c, .. } => Some(c),
            Entry::Rules(_) | Entry::Txn(_) | Entry::Lease { .. } => None,
        }
    }
}

/// A lease entry's outcome in the one-outcome-per-entry record (the tests compare the
/// lease tables themselves too): `Done` for a grant, a renewal or a tick expiring nothing;
/// `Deleted` for a revoke (`existed`: the lease did) or a tick expiring leases; `CasFailed`
/// for a refusal.
pub fn lease_outcome(outcome: LeaseOutcome) -> Outcome {
    match outcome {
        LeaseOutcome::Granted { .. } | LeaseOutcome::Renewed { .. } => Outcome::Done,
        LeaseOutcome::Ticked { expired } if expired.is_empty() => Outcome::Done,
        LeaseOutcome::Ticked { .. } => Outcome::Deleted { existed: true },
        LeaseOutcome::Revoked { found, .. } => Outcome::Deleted { existed: found },
        LeaseOutcome::Refused(_) => Outcome::CasFailed,
    }
}

pub struct Cluster {
    pub replicas: Vec<Replica>,
    /// The committed Raft log and how far each replica applied it.
    pub log: Vec<Entry>,
    /// Rules of the last logged rules entry (what the next flip replaces).
    pub rules: RuleSet,
    pub applied: Vec<usize>,
    /// Outcome of each log entry as each replica computed it.
    pub outcomes: Vec<Vec<Outcome>>,
    /// Every fact ever admitted, encoded, by origin then sequence (anti-entropy's source).
    pub archive: BTreeMap<(NodeId, u64), Vec<u8>>,
    /// In-flight gossip per (from, to): encoded facts, delivered in any order.
    pub links: BTreeMap<(usize, usize), Vec<Vec<u8>>>,
    pub cut: [[bool; NODES]; NODES],
    pub hlc: u64,
    pub acks: Vec<Ack>,
    /// Per replica: log entries a snapshot install already covered, with the outcome the
    /// snapshot's source computed for them; `raft_apply` skips them.
    pub skip: Vec<BTreeMap<usize, Outcome>>,
    /// Whether any key was ever in `available` mode (register writes were facts then).
    pub ever_available: bool,
}

impl Cluster {
    pub fn new(mode: Mode) -> Cluster {
        let compiled = rules(mode).compile().expect("test rules are valid");
        Cluster {
            replicas: (1..=NODES as NodeId)
                .map(|n| Replica::new(n, compiled.clone()))
                .collect(),
            log: Vec::new(),
            rules: rules(mode),
            applied: vec![0; NODES],
            outcomes: vec![Vec::new(); NODES],
            archive: BTreeMap::new(),
            links: BTreeMap::new(),
            cut: [[false; NODES]; NODES],
            hlc: 0,
            acks: Vec::new(),
            skip: vec![BTreeMap::new(); NODES],
            ever_available: mode == Mode::Available,
        }
    }

    fn tick(&mut self) -> HlcTimestamp {
        self.hlc += 1;
        HlcTimestamp(self.hlc)
    }

    fn gossip(&mut self, from: usize, encoded: Vec<u8>) {
        let (fact, _) = decode_fact(&encoded).expect("kernel encodes valid facts");
        self.archive
            .insert((fact.id.origin, fact.id.seq), encoded.clone());
        for to in 0..NODES {
            if to != from {
                self.links
                    .entry((from, to))
                    .or_default()
                    .push(encoded.clone());
            }
        }
    }

    /// A client sends `op` on `key` to `node`; fast-path facts are gossiped, consensus ops
    /// are proposed by that node (with what it has observed) and committed.
    pub fn client_op(&mut self, node: usize, key: &[u8], op: Op) {
        let hlc = self.tick();
        let mut out = Vec::new();
        match self.replicas[node].admit(key, &op, hlc, &mut out) {
            Ok(Admitted::Local { .. }) => {
                self.gossip(node, out);
                self.acks.push(Ack::Fact {
                    key: key.to_vec(),
                    op,
                });
            }
            Ok(Admitted::Consensus(_)) => {
                match self.replicas[node].prepare_command(key, &op, hlc) {
                    Ok(cmd) => {
                        self.log.push(Entry::Command(cmd));
                        self.acks.push(Ack::Logged {
                            index: self.log.len() - 1,
                        });
                    }
                    Err(_) => self.acks.push(Ack::Refused),
                }
            }
            Err(_) => self.acks.push(Ack::Refused),
        }
    }

    /// A client sends a transaction to `node`, which stamps it with what it observed and
    /// logs it (ops no path can take make it refused at the proposer, as the node would).
    pub fn client_txn(
        &mut self,
        node: usize,
        compares: &[(&[u8], Test)],
        success: &[(&[u8], Op)],
        failure: &[(&[u8], Op)],
    ) {
        let hlc = self.tick();
        let replica = &self.replicas[node];
        let prepare = |ops: &[(&[u8], Op)]| -> Option<Vec<Command>> {
            ops.iter()
                .map(|(k, op)| replica.prepare_command(k, op, hlc).ok())
                .collect()
        };
        let (Some(success), Some(failure)) = (prepare(success), prepare(failure)) else {
            self.acks.push(Ack::Refused);
            return;
        };
        let txn = Txn {
            hlc,
            proposer: node as NodeId + 1,
            compares: compares
                .iter()
                .map(|(k, t)| replica.prepare_compare(k, t.clone()))
                .collect(),
            success,
            failure,
        };
        self.log.push(Entry::Txn(txn));
        self.acks.push(Ack::Logged {
            index: self.log.len() - 1,
        });
    }

    pub fn grant(&mut self, node: usize, down: i64, up: i64) {
        let hlc = self.tick();
        if let Ok(cmd) = self.replicas[node].prepare_grant(STOCK, down, up, hlc) {
            self.log.push(Entry::Command(cmd));
        }
    }

    /// Log a lease entry in Raft term `term`.
    pub fn lease(&mut self, cmd: LeaseCommand, term: u64) {
        self.log.push(Entry::Lease { cmd, term });
    }

    /// `node` proposes a put of `value` on `key` attached to `lease` (nothing when the
    /// replica refuses to prepare it, e.g. `key` is not a register).
    pub fn leased_put(&mut self, node: usize, key: &[u8], value: &[u8], lease: LeaseId) {
        let hlc = self.tick();
        let op = Op::RegisterPut {
            value: value.to_vec(),
        };
        if let Ok(cmd) = self.replicas[node].prepare_command(key, &op, hlc) {
            self.log.push(Entry::Leased { cmd, lease });
        }
    }

    /// Log a rules change: every key's mode (default and `stock:*`) becomes `mode`.
    pub fn flip_rules(&mut self, mode: Mode) {
        self.ever_available |= mode == Mode::Available;
        let mut rules = rules(mode);
        rules.version = self.rules.version + 1;
        self.rules = rules.clone();
        self.log.push(Entry::Rules(rules));
    }

    pub fn transfer(&mut self, node: usize, to: usize, amount: i64) {
        let hlc = self.tick();
        let mut out = Vec::new();
        if self.replicas[node]
            .transfer(STOCK, to as NodeId + 1, amount, hlc, &mut out)
            .is_ok()
        {
            self.gossip(node, out);
        }
    }

    /// Deliver up to `count` in-flight facts on link (from, to), picking by `pick`; a
    /// duplicate stays in flight when `dup` is set.
    pub fn deliver(&mut self, from: usize, to: usize, count: usize, pick: usize, dup: bool) {
        if from == to || self.cut[from][to] {
            return;
        }
        for i in 0..count {
            let Some(queue) = self.links.get_mut(&(from, to)) else {
                return;
            };
            if queue.is_empty() {
                return;
            }
            let at = (pick + i * 7) % queue.len();
            let encoded = if dup {
                queue[at].clone()
            } else {
                queue.swap_remove(at)
            };
            let (fact, _) = decode_fact(&encoded).unwrap();
            let delivered = self.replicas[to].deliver(&fact).expect("no type conflicts");
            assert_ne!(delivered, Delivered::Dropped, "buffer is large enough here");
        }
    }

    /// Replica `node` applies up to `count` more log entries. A command blocked on facts it
    /// has not seen pulls them from the archive (as the node would from a peer) and retries.
    pub fn raft_apply(&mut self, node: usize, count: usize) {
        for _ in 0..count {
            let index = self.applied[node];
            let Some(entry) = self.log.get(index).cloned() else {
                return;
            };
            if let Some(outcome) = self.skip[node].remove(&index) {
                self.outcomes[node].push(outcome);
                self.applied[node] += 1;
                continue;
            }
            let cmd = match entry {
                Entry::Command(cmd) => cmd,
                Entry::Lease { cmd, term } => {
                    let hlc = HlcTimestamp(index as u64);
                    let outcome = self.replicas[node].apply_lease(LEASE_GROUP, &cmd, term, hlc, 1);
                    self.outcomes[node].push(lease_outcome(outcome));
                    self.applied[node] += 1;
                    continue;
                }
                Entry::Leased { cmd, lease } => {
                    let outcome = loop {
                        match self.replicas[node].apply_leased(&cmd, lease, &cmd.key) {
                            Ok(Ok(outcome)) => break outcome,
                            Ok(Err(_)) => break Outcome::CasFailed,
                            Err(ReplicaError::Blocked { missing, .. }) => {
                                self.pull_missing(node, &missing)
                            }
                            Err(e) => panic!("leased write failed: {e}"),
                        }
                    };
                    self.outcomes[node].push(outcome);
                    self.applied[node] += 1;
                    continue;
                }
                Entry::Rules(rules) => {
                    self.replicas[node].set_rules(rules.compile().expect("valid rules"));
                    self.outcomes[node].push(Outcome::Done);
                    self.applied[node] += 1;
                    continue;
                }
                Entry::Txn(txn) => {
                    let outcome = loop {
                        match self.replicas[node].apply_txn(&txn) {
                            Ok(outcome) => break txn_outcome(outcome),
                            Err(ReplicaError::Blocked { missing, .. }) => {
                                self.pull_missing(node, &missing)
                            }
                            Err(e) => panic!("txn apply failed: {e}"),
                        }
                    };
                    self.outcomes[node].push(outcome);
                    self.applied[node] += 1;
                    continue;
                }
            };
            let outcome = loop {
                match self.replicas[node].apply_command(&cmd) {
                    Ok(outcome) => break outcome,
                    Err(ReplicaError::Blocked { missing, .. }) => self.pull_missing(node, &missing),
                    Err(e) => panic!("apply failed: {e}"),
                }
            };
            self.outcomes[node].push(outcome);
            self.applied[node] += 1;
        }
    }

    /// Pull what a `Blocked` error names from the archive, as the node would from peers.
    fn pull_missing(&mut self, node: usize, missing: &[(NodeId, u64)]) {
        assert!(!missing.is_empty(), "blocked command with nothing to pull");
        for &(origin, up_to) in missing {
            let have = self.replicas[node].version_vector().get(origin);
            assert!(have < up_to, "Blocked names only facts not applied");
        }
        for &(origin, up_to) in missing {
            // Delivering one origin's facts can apply another origin's that waited on them,
            // so a later entry may be covered by now.
            let have = self.replicas[node].version_vector().get(origin);
            for seq in have + 1..=up_to {
                let encoded = self.archive[&(origin, seq)].clone();
                let (fact, _) = decode_fact(&encoded).unwrap();
                self.replicas[node].deliver(&fact).unwrap();
            }
        }
    }

    /// Replica `to` installs a Raft snapshot of the group `in_group` taken from replica
    /// `from` (which must have applied at least as much of the log). The group's entries
    /// between the two positions are then covered: `to` skips them, keeping `from`'s outcomes.
    pub fn install_snapshot(&mut self, to: usize, from: usize, in_group: &dyn Fn(&[u8]) -> bool) {
        assert!(self.applied[to] <= self.applied[from]);
        let keys = self.replicas[from].keys_matching(in_group);
        self.replicas[to]
            .install_snapshot(keys, in_group)
            .expect("a snapshot from a replica further along fits");
        for index in self.applied[to]..self.applied[from] {
            let in_it = match &self.log[index] {
                Entry::Command(cmd) => in_group(&cmd.key),
                Entry::Txn(txn) => txn.keys().any(in_group),
                Entry::Leased { cmd, .. } => in_group(&cmd.key),
                // Leases travel with their group's snapshot; the snapshot schedules make
                // no lease entries.
                Entry::Rules(_) | Entry::Lease { .. } => false,
            };
            if in_it {
                self.skip[to].insert(index, self.outcomes[from][index].clone());
            }
        }
    }

    /// Heal every partition, apply the whole log and deliver every fact everywhere.
    pub fn settle(&mut self) {
        self.cut = [[false; NODES]; NODES];
        for node in 0..NODES {
            for encoded in self
                .archive
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .iter()
                .rev()
            {
                let (fact, _) = decode_fact(encoded).unwrap();
                self.replicas[node].deliver(&fact).unwrap();
            }
            self.raft_apply(node, usize::MAX);
            assert_eq!(
                self.replicas[node].pending_facts(),
                0,
                "every fact applies once all are delivered and the log is applied"
            );
        }
        self.links.clear();
    }

    /// Every key's full state on `node`, sorted by key.
    pub fn states(&self, node: usize) -> Vec<(Vec<u8>, calm_kernel::KeyRecord)> {
        self.replicas[node].keys_matching(|_| true)
    }

    pub fn values(&self, node: usize) -> Vec<Option<Value>> {
        KEYS.iter()
            .chain([&STOCK])
            .map(|k| self.replicas[node].read(k))
            .collect()
    }
}

/// Apply one log entry to a replica outside a cluster; every fact its frontier names must
/// already be delivered.
pub fn apply_entry(replica: &mut Replica, entry: &Entry) -> Outcome {
    match entry {
        Entry::Command(cmd) => replica
            .apply_command(cmd)
            .unwrap_or_else(|e| panic!("entry does not apply: {e}")),
        Entry::Rules(rules) => {
            if rules.version > replica.rules_version() {
                replica.set_rules(rules.compile().expect("valid rules"));
            }
            Outcome::Done
        }
        Entry::Txn(txn) => txn_outcome(
            replica
                .apply_txn(txn)
                .unwrap_or_else(|e| panic!("txn does not apply: {e}")),
        ),
        Entry::Lease { cmd, term } => {
            lease_outcome(replica.apply_lease(LEASE_GROUP, cmd, *term, HlcTimestamp(0), 1))
        }
        Entry::Leased { cmd, lease } => match replica
            .apply_leased(cmd, *lease, &cmd.key)
            .unwrap_or_else(|e| panic!("leased write does not apply: {e}"))
        {
            Ok(outcome) => outcome,
            Err(_) => Outcome::CasFailed,
        },
    }
}

/// A transaction's outcome in the one-outcome-per-entry record: which branch ran (`Done`
/// for success, `CasFailed` for failure) or its refusal. The ops' own outcomes follow from
/// the branch and the states, which the tests compare anyway.
pub fn txn_outcome(outcome: TxnOutcome) -> Outcome {
    match outcome {
        TxnOutcome::Applied {
            succeeded: true, ..
        } => Outcome::Done,
        TxnOutcome::Applied { .. } => Outcome::CasFailed,
        TxnOutcome::Refused { refusal, .. } => Outcome::Refused(refusal),
    }
}

/// Bounds and conservation of the escrow key on one replica, from its public state.
pub fn check_escrow(replica: &Replica) {
    let Some(KeyState::Bounded(b)) = replica.key_state(STOCK) else {
        return;
    };
    let node = replica.node();
    let bounds = b.bounds();
    assert!(
        bounds.contains(b.value()),
        "n{node} shows {} outside {bounds}",
        b.value()
    );
    let (pool_down, pool_up) = b.pool();
    let down: i64 = pool_down + b.holders().iter().map(|h| h.down).sum::<i64>();
    let up: i64 = pool_up + b.holders().iter().map(|h| h.up).sum::<i64>();
    assert_eq!(
        b.value() - bounds.min,
        down,
        "n{node}: decrement rights not conserved"
    );
    assert_eq!(
        bounds.max - b.value(),
        up,
        "n{node}: increment rights not conserved"
    );
    assert!(pool_down >= 0 && pool_up >= 0, "n{node}: negative pool");
    assert!(
        b.holders().iter().all(|h| h.down >= 0 && h.up >= 0),
        "n{node}: negative quota"
    );
}

/// Ops on the test keys, weighted towards the fast path; now and then a delete (any type) or
/// an op of the next key's type (refused on a live key, recreating a deleted one).
pub fn op_on(key_index: usize) -> BoxedStrategy<(usize, Op)> {
    let other = (key_index + 1) % KEYS.len();
    prop_oneof![
        12 => typed_op_on(key_index),
        1 => Just((key_index, Op::RegisterDelete)),
        1 => typed_op_on(other).prop_map(move |(_, op)| (key_index, op)),
    ]
    .boxed()
}

/// Ops of the key's own type only.
pub fn typed_op_on(key_index: usize) -> BoxedStrategy<(usize, Op)> {
    let small = -5i64..=5;
    match key_index {
        0 => prop_oneof![
            4 => small.clone().prop_map(|delta| Op::CounterAdd { delta }),
            1 => small.clone().prop_map(|value| Op::CounterSet { value }),
        ]
        .prop_map(|op| (0, op))
        .boxed(),
        1 => prop_oneof![
            4 => (-20i64..20).prop_map(|value| Op::MaxRaise { value }),
            1 => (-20i64..20).prop_map(|value| Op::MaxSet { value }),
        ]
        .prop_map(|op| (1, op))
        .boxed(),
        2 => prop_oneof![
            3 => (0u8..4).prop_map(|e| Op::SetAdd { element: vec![b'a' + e] }),
            1 => (0u8..4).prop_map(|e| Op::SetRemove { element: vec![b'a' + e] }),
        ]
        .prop_map(|op| (2, op))
        .boxed(),
        _ => prop_oneof![
            2 => (0u8..4).prop_map(|v| Op::RegisterPut { value: vec![v] }),
            1 => Just(Op::RegisterDelete),
            2 => ((0u64..4), (0u8..4)).prop_map(|(v, n)| Op::RegisterCas {
                expect: calm_kernel::CasExpect::Version(v),
                value: Some(vec![n]),
            }),
        ]
        .prop_map(|op| (3, op))
        .boxed(),
    }
}
