//! Whether each group's leader is alive as this node sees it: what readiness, `calm status`
//! and the `calm_raft_has_leader` gauge report.
//!
//! openraft keeps the last leader it heard of in its metrics until an election replaces it.
//! With two of three nodes stopped, a follower therefore went on naming a leader that could
//! commit nothing, and `/readyz` said ready, for as long as no election succeeded (forever,
//! without a quorum). A known leader is not enough; this node must have heard from it
//! recently:
//!
//! - as a follower: an AppendEntries (heartbeats included) from the leader it names, accepted
//!   within the election timeout. The peer service stamps every such call
//!   ([`LeaderContacts::heard`]);
//! - as the leader: a quorum acknowledged it within the election timeout (openraft's
//!   `last_quorum_acked`, which is what its lease reads use too); a single voter is its own
//!   quorum.
//!
//! A follower starts an election after at most the election timeout without a heartbeat, so
//! a leader silent for longer has been given up by its followers too.

use super::types::{CalmRaft, GroupId, NodeId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Gauge: 1 while the group has a live leader as this node sees it (etcd's
/// `etcd_server_has_leader`), by group.
pub const METRIC_HAS_LEADER: &str = "calm_raft_has_leader";
/// Counter: leader changes this node has seen, by group (etcd's
/// `etcd_server_leader_changes_seen_total`).
pub const METRIC_LEADER_CHANGES: &str = "calm_raft_leader_changes_total";

/// Per group, the leader this node last accepted an AppendEntries from, and when.
pub struct LeaderContacts {
    epoch: Instant,
    /// Index = group id: (leader id, micros since `epoch` + 1; 0 = never).
    groups: Box<[(AtomicU64, AtomicU64)]>,
}

impl LeaderContacts {
    pub fn new(groups: usize) -> LeaderContacts {
        LeaderContacts {
            epoch: Instant::now(),
            groups: (0..groups)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
        }
    }

    /// This node accepted an AppendEntries of `group` from `leader` just now.
    pub fn heard(&self, group: GroupId, leader: NodeId) {
        let Some((who, when)) = self.groups.get(group as usize) else {
            return;
        };
        let micros = self.epoch.elapsed().as_micros() as u64 + 1;
        // Two stores, not one atomic pair: a reader may see a new leader with the old time
        // for an instant, which only makes it report "not heard lately" a moment early.
        who.store(leader, Ordering::Relaxed);
        when.store(micros, Ordering::Relaxed);
    }

    /// How long ago this node last heard from `leader` in `group` (`None`: never, or it last
    /// heard from another leader).
    pub fn since(&self, group: GroupId, leader: NodeId) -> Option<Duration> {
        let (who, when) = self.groups.get(group as usize)?;
        let micros = when.load(Ordering::Relaxed);
        if micros == 0 || who.load(Ordering::Relaxed) != leader {
            return None;
        }
        Some(
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_micros(micros - 1)),
        )
    }
}

/// One group's leadership as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupHealth {
    /// The leader openraft names (it may be long gone: see `live`).
    pub leader: Option<NodeId>,
    /// How long ago this node last heard from that leader (as the leader: since a quorum
    /// last acknowledged it). `None`: never since it became leader.
    pub last_contact: Option<Duration>,
    /// A leader whose address is known, heard from within the election timeout.
    pub live: bool,
}

/// The health of a group whose metrics are `m`, on node `me`.
pub(crate) fn group_health(
    m: &openraft::RaftMetrics<CalmRaft>,
    me: NodeId,
    group: GroupId,
    contacts: &LeaderContacts,
    election_timeout: Duration,
) -> GroupHealth {
    let Some(leader) = m.current_leader else {
        return GroupHealth {
            leader: None,
            last_contact: None,
            live: false,
        };
    };
    let last_contact = if leader == me {
        let mut voters = m.membership_config.membership().voter_ids();
        let alone = voters.next() == Some(me) && voters.next().is_none();
        if alone {
            Some(Duration::ZERO)
        } else {
            m.last_quorum_acked
                .as_ref()
                .map(|at| openraft::Instant::elapsed(&**at))
        }
    } else {
        contacts.since(group, leader)
    };
    let addressed = m.membership_config.membership().get_node(&leader).is_some();
    GroupHealth {
        leader: Some(leader),
        last_contact,
        live: addressed && last_contact.is_some_and(|c| c <= election_timeout),
    }
}

/// Describe the health metrics to the installed recorder.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(
        METRIC_HAS_LEADER,
        Unit::Count,
        "1 while the group has a leader this node heard from within the election timeout, by group"
    );
    describe_counter!(
        METRIC_LEADER_CHANGES,
        Unit::Count,
        "Leader changes this node has seen, by group"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_is_with_one_leader_and_ages() {
        let contacts = LeaderContacts::new(3);
        assert_eq!(contacts.since(1, 2), None, "never heard");
        contacts.heard(1, 2);
        let since = contacts.since(1, 2).expect("heard from node 2");
        assert!(since < Duration::from_secs(5), "{since:?}");
        assert_eq!(
            contacts.since(1, 3),
            None,
            "node 3 is not who we heard from"
        );
        assert_eq!(contacts.since(2, 2), None, "another group");
        contacts.heard(1, 3);
        assert_eq!(contacts.since(1, 2), None, "a new leader replaces the old");
        assert!(contacts.since(1, 3).is_some());
        // Out of range groups are ignored, not a panic.
        contacts.heard(9, 1);
        assert_eq!(contacts.since(9, 1), None);
    }
}
