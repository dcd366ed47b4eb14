//! The ordered path: per-subject openraft groups on the node's shared WAL.
//!
//! A key's *subject* hashes with BLAKE3 onto one of a fixed number of data groups chosen
//! when the cluster is created; group 0 holds cluster metadata (rules, membership). The
//! subject is the key, or with hash tags (Redis Cluster's rule, on in new clusters) the
//! part between the key's first `{` and the first `}` after it, when that part is not
//! empty: `{user:7}:balance` and `{user:7}:history` share a group (see [`GroupMap::subject`]). Every node hosts a replica of every group, so with three nodes each group has
//! three voters, and leaders spread over the nodes.
//!
//! Each group is an ordinary openraft instance with:
//! - a log store that is a handle on the node's one WAL (`log_store.rs`): no second fsync
//!   stream, and group commit covers facts and every group's entries at once;
//! - a state machine that applies commands through the kernel on the node's one replica
//!   (`state_machine.rs`), with the determinism contract written there;
//! - snapshots that are that group's key states, BLAKE3-framed (`snapshot.rs`).
//!
//! openraft's types stay in `types.rs`.

pub mod batch;
pub mod commit_notice;
pub mod health;
pub mod log_store;
pub mod metrics;
pub mod network;
pub mod node;
pub mod service;
pub mod snapshot;
pub mod state_machine;
pub mod types;
pub mod wire;

pub use log_store::{GroupLogStore, RaftLogs};
pub use node::{Consensus, ConsensusOptions, ProposeError, Proposed};
pub use state_machine::{FactSource, GroupStateMachine, SharedLocal, WaitForFacts};
pub use types::{CalmRaft, ClientWriteError, GroupId, Request, Response};

/// One group's openraft instance on this node.
pub type Raft = openraft::Raft<CalmRaft, GroupStateMachine>;

/// Most data groups a cluster may have (each costs heartbeats and memory on every node).
pub const DATA_GROUPS_MAX: u64 = 1024;

/// How keys map to groups: the data group count and whether hash tags choose subjects.
/// Fixed at cluster creation (recorded in each node's `cluster.toml`): changing either would
/// move keys between groups without moving their state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupMap {
    data_groups: u64,
    hash_tags: bool,
}

impl GroupMap {
    /// The metadata group (rules, membership).
    pub const METADATA: GroupId = 0;

    /// A map over `data_groups` groups, with hash tags (what new clusters get).
    pub fn new(data_groups: u64) -> GroupMap {
        assert!(
            (1..=DATA_GROUPS_MAX).contains(&data_groups),
            "data group count must be in 1..={DATA_GROUPS_MAX}"
        );
        GroupMap {
            data_groups,
            hash_tags: true,
        }
    }

    /// The same map with hash tags on or off (off: every key is its own subject, as in
    /// clusters created before hash tags).
    pub fn with_hash_tags(self, hash_tags: bool) -> GroupMap {
        GroupMap { hash_tags, ..self }
    }

    pub fn data_groups(&self) -> u64 {
        self.data_groups
    }

    pub fn hash_tags(&self) -> bool {
        self.hash_tags
    }

    /// What peers compare to agree on the map (`service::GROUP_MAP_HEADER`).
    pub fn fingerprint(&self) -> String {
        format!(
            "{} groups, hash tags {}",
            self.data_groups,
            if self.hash_tags { "on" } else { "off" }
        )
    }

    /// The subject of `key`, which chooses its group. With hash tags: the bytes between the
    /// first `{` and the first `}` after it, if there are any (`{user:7}:a` -> `user:7`;
    /// `a{}b{c}` -> the whole key, as the first pair is empty; `{a` -> the whole key), else
    /// the whole key. Without: the whole key.
    pub fn subject<'k>(&self, key: &'k [u8]) -> &'k [u8] {
        if !self.hash_tags {
            return key;
        }
        let Some(open) = key.iter().position(|&b| b == b'{') else {
            return key;
        };
        match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        }
    }

    /// The data group owning `key`: 1 + BLAKE3(subject of the key) mod the group count.
    pub fn group_of(&self, key: &[u8]) -> GroupId {
        let hash = blake3::hash(self.subject(key));
        let head = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
        1 + head % self.data_groups
    }

    /// Every group, metadata first.
    pub fn all(&self) -> impl Iterator<Item = GroupId> + use<> {
        0..=self.data_groups
    }
}

/// Whether `request` may be ordered in `group`: commands in their keys' group (a request in
/// the wrong group would stop that group when applied), rules in the metadata group, and a
/// coalesced entry with at least one command and distinct keys (see `Request::Commands`).
pub fn check_request(map: GroupMap, group: GroupId, request: &Request) -> Result<(), String> {
    let wrong = |belongs: GroupId| {
        Err(format!(
            "this request belongs to group {belongs}, not group {group}; the peers disagree on the group count"
        ))
    };
    match request {
        Request::Command(cmd) if map.group_of(&cmd.key) != group => wrong(map.group_of(&cmd.key)),
        Request::Command(_) => Ok(()),
        Request::Commands(cmds) => {
            let mut keys = std::collections::HashSet::new();
            if cmds.is_empty() || !cmds.iter().all(|c| keys.insert(&c.key)) {
                return Err(format!(
                    "a coalesced proposal of {} commands must name at least one command and distinct keys",
                    cmds.len()
                ));
            }
            match cmds
                .iter()
                .map(|c| map.group_of(&c.key))
                .find(|&g| g != group)
            {
                Some(other) => wrong(other),
                None => Ok(()),
            }
        }
        Request::Txn(txn) => check_txn(map, group, txn),
        Request::TxnLeased { txn, attach } => {
            check_txn(map, group, txn)?;
            if attach.is_empty() || attach.len() > 2 * calm_kernel::txn::TXN_OPS_MAX {
                return Err(format!(
                    "a leased transaction attaches 1 to {} keys, not {}",
                    2 * calm_kernel::txn::TXN_OPS_MAX,
                    attach.len()
                ));
            }
            let len = |success: bool| {
                if success {
                    txn.success.len()
                } else {
                    txn.failure.len()
                }
            };
            if let Some((success, index, _)) =
                attach.iter().find(|(s, i, _)| *i as usize >= len(*s))
            {
                return Err(format!(
                    "a leased transaction names op {index} of its {} branch, which it does not have",
                    if *success { "success" } else { "failure" }
                ));
            }
            match attach
                .iter()
                .find(|(_, _, lease)| calm_kernel::lease::lease_group(*lease) != group)
            {
                Some((_, _, lease)) => Err(format!(
                    "lease {lease:x} belongs to group {}, not the transaction's group {group}",
                    calm_kernel::lease::lease_group(*lease)
                )),
                None => Ok(()),
            }
        }
        Request::Lease(entry) => check_lease(map, group, &entry.cmd),
        Request::Leased { cmd, lease } => {
            if map.group_of(&cmd.key) != group {
                return wrong(map.group_of(&cmd.key));
            }
            if calm_kernel::lease::lease_group(*lease) != group {
                return Err(format!(
                    "lease {lease:x} belongs to group {}, but key {} to group {group}; a key attaches only to a lease of its subject",
                    calm_kernel::lease::lease_group(*lease),
                    calm_kernel::refusal::DisplayKey(&cmd.key)
                ));
            }
            Ok(())
        }
        Request::InitRules { .. } | Request::SetRules { .. } if group != GroupMap::METADATA => {
            wrong(GroupMap::METADATA)
        }
        Request::InitRules { .. } | Request::SetRules { .. } => Ok(()),
    }
}

/// Whether a lease entry may be ordered in `group`: a data group, which owns the subject a
/// grant names and every lease a renewal or revoke names, within the limits.
pub fn check_lease(
    map: GroupMap,
    group: GroupId,
    cmd: &calm_kernel::lease::LeaseCommand,
) -> Result<(), String> {
    use calm_kernel::lease::{LeaseCommand, RENEW_IDS_MAX, lease_group};
    if group == GroupMap::METADATA || group > map.data_groups() {
        return Err(format!(
            "leases live in data groups 1..={}, not group {group}",
            map.data_groups()
        ));
    }
    match cmd {
        LeaseCommand::Grant { subject, .. } if map.group_of(subject) != group => Err(format!(
            "a lease for subject {} belongs to group {}, not group {group}; the peers disagree on the group count",
            calm_kernel::refusal::DisplayKey(subject),
            map.group_of(subject)
        )),
        LeaseCommand::Renew { ids } if ids.len() > RENEW_IDS_MAX => Err(format!(
            "a renewal names {} leases; at most {RENEW_IDS_MAX}",
            ids.len()
        )),
        LeaseCommand::Renew { ids } => match ids.iter().find(|&&id| lease_group(id) != group) {
            Some(id) => Err(format!(
                "lease {id:x} belongs to group {}, not group {group}",
                lease_group(*id)
            )),
            None => Ok(()),
        },
        LeaseCommand::Revoke { id } if lease_group(*id) != group => Err(format!(
            "lease {id:x} belongs to group {}, not group {group}",
            lease_group(*id)
        )),
        _ => Ok(()),
    }
}

/// Whether `txn` may be ordered in `group`: within the limits, each key written at most once
/// per branch, and every key of one subject, which `group` owns.
pub fn check_txn(map: GroupMap, group: GroupId, txn: &calm_kernel::txn::Txn) -> Result<(), String> {
    use calm_kernel::txn::{TXN_COMPARES_MAX, TXN_OPS_MAX};
    if txn.compares.len() > TXN_COMPARES_MAX
        || txn.success.len() > TXN_OPS_MAX
        || txn.failure.len() > TXN_OPS_MAX
    {
        return Err(format!(
            "a transaction has at most {TXN_COMPARES_MAX} comparisons and {TXN_OPS_MAX} ops per branch"
        ));
    }
    if let Some((branch, key)) = txn.repeated_key() {
        return Err(format!(
            "a transaction's {branch} branch writes key {} twice; each key at most once per branch",
            calm_kernel::refusal::DisplayKey(key)
        ));
    }
    let mut subjects = txn.keys().map(|k| map.subject(k));
    match subjects.next() {
        None => return Err("a transaction must name at least one key".into()),
        Some(first) if subjects.any(|s| s != first) => {
            return Err("a transaction's keys must share one subject".into());
        }
        Some(_) => {}
    }
    match txn.keys().map(|k| map.group_of(k)).find(|&g| g != group) {
        Some(other) => Err(format!(
            "this transaction belongs to group {other}, not group {group}; the peers disagree on the group count"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_spread_over_data_groups_only() {
        let map = GroupMap::new(8);
        let mut seen = [0u32; 9];
        for i in 0..8000u32 {
            let g = map.group_of(format!("key-{i}").as_bytes());
            assert!((1..=8).contains(&g));
            seen[g as usize] += 1;
        }
        assert_eq!(seen[0], 0, "no key lands in the metadata group");
        // 1000 expected per group; BLAKE3 is uniform, so ±20% never fails by chance here.
        assert!(
            seen[1..].iter().all(|&n| (800..1200).contains(&n)),
            "{seen:?}"
        );
        assert_eq!(map.group_of(b"same"), map.group_of(b"same"));
    }

    #[test]
    fn hash_tags_choose_the_subject_as_redis_cluster_does() {
        let map = GroupMap::new(64);
        let subject = |k: &str| String::from_utf8(map.subject(k.as_bytes()).to_vec()).unwrap();
        assert_eq!(subject("{user:7}:balance"), "user:7");
        assert_eq!(subject("orders/{user:7}"), "user:7");
        assert_eq!(subject("{a}{b}"), "a");
        assert_eq!(subject("plain"), "plain");
        assert_eq!(
            subject("{}x{y}"),
            "{}x{y}",
            "an empty first tag: the whole key"
        );
        assert_eq!(subject("{open"), "{open");
        assert_eq!(subject("close}{"), "close}{");
        assert_eq!(subject("x{y}z}"), "y");
        assert_eq!(
            map.group_of(b"{user:7}:balance"),
            map.group_of(b"{user:7}:history")
        );
        assert_eq!(map.group_of(b"{user:7}:balance"), map.group_of(b"user:7"));
        // Keys without a tag map as they always did; with tags off, braces mean nothing.
        let old = map.with_hash_tags(false);
        assert_eq!(old.group_of(b"plain"), map.group_of(b"plain"));
        assert_eq!(old.subject(b"{user:7}:balance"), b"{user:7}:balance");
        let spread: std::collections::HashSet<_> = (0..64)
            .map(|i| old.group_of(format!("{{user:7}}:{i}").as_bytes()))
            .collect();
        assert!(spread.len() > 1);
        assert_ne!(map.fingerprint(), old.fingerprint());
    }
}
