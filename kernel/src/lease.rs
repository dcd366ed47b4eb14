//! Leases: grants that expire unless kept alive, and the keys attached to them.
//!
//! A lease belongs to one Raft group: the group of the subject it was granted for. Everything
//! about it (its grant, each renewal, its revocation, its expiry and the deletes of its keys)
//! is an entry of that group's log, so every replica holds the same leases at the same log
//! position and deletes the same keys at the same entry.
//!
//! # The log clock
//!
//! Expiry cannot read a clock at apply time (replicas would disagree), so each group keeps a
//! *log clock*: milliseconds advanced only by `Tick` entries, which the group's leader
//! proposes while it leads and the group has leases. A tick claims the time its leader's
//! monotonic clock measured since its previous tick (or since it became leader), at most
//! [`TICK_CLAIM_MS_MAX`]; a lease expires at the first tick whose clock passes its deadline.
//!
//! Why a lease never expires early: a tick never claims more than the real time since the
//! previous tick in the log (a new leader's first claim starts at its election, after every
//! entry of the old term it holds). A grant or renewal applied after tick k sets the deadline
//! to `clock_k + ttl + TICK_CLAIM_MS_MAX`; the next tick was proposed after the renewal was
//! sent and claims at most `TICK_CLAIM_MS_MAX`, so the deadline passes no sooner than `ttl`
//! of real time after the client asked. Ticks that claim less than real time (a slow leader,
//! the gap before an election) only make leases last longer. Wall clocks play no part, so
//! skew cannot expire a lease.
//!
//! Why a lease does expire: a leader ticks while it leads; the first tick of a new term also
//! extends every lease by the election timeout it carries (`extend_ms`), so a leader change
//! never expires a lease its holder kept alive through the old leader, and the remaining TTL
//! (the deadline in log-clock time) survives in the log, snapshots and the state store.
//!
//! A tick is fenced by its term: one whose claimed term is not the term of the entry holding
//! it (a stalled leader's, replayed) changes nothing.

use crate::refusal::DisplayKey;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::BuildHasherDefault;

/// A lease's id: its group in the top 16 bits, the group's grant sequence below.
pub type LeaseId = u64;
const LEASE_SEQ_BITS: u32 = 48;
/// Most leases one group holds at a time.
pub const LEASES_PER_GROUP_MAX: usize = 100_000;
/// Most keys attached to one lease.
pub const KEYS_PER_LEASE_MAX: usize = 1_000;
/// Longest TTL a lease may have (30 days).
pub const LEASE_TTL_MS_MAX: u64 = 30 * 24 * 3_600 * 1_000;
/// Most lease ids one renewal entry names.
pub const RENEW_IDS_MAX: usize = 10_000;
/// Most log-clock time one tick may claim; also the slack every deadline carries (see the
/// module docs). Leaders tick about twice as often.
pub const TICK_CLAIM_MS_MAX: u64 = 1_000;
/// Most a new term's first tick may extend every lease by.
pub const LEADER_CHANGE_EXTEND_MS_MAX: u64 = 60_000;

/// The group a lease id belongs to.
pub const fn lease_group(id: LeaseId) -> u64 {
    id >> LEASE_SEQ_BITS
}

/// One lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl_ms: u64,
    /// Log-clock time at which the lease expires.
    pub expires_at_ms: u64,
    /// Only keys of this subject attach.
    pub subject: Vec<u8>,
    pub keys: BTreeSet<Vec<u8>>,
}

/// A group's log clock and grant sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseClock {
    pub clock_ms: u64,
    /// The sequence the next grant takes (0 until the first grant).
    pub last_seq: u64,
    /// The term of the last tick applied.
    pub term: u64,
}

/// One group's leases, as its snapshot carries them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLeases {
    pub clock: LeaseClock,
    pub leases: BTreeMap<LeaseId, Lease>,
}

/// What a lease entry asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseCommand {
    Grant {
        subject: Vec<u8>,
        ttl_ms: u64,
    },
    Renew {
        ids: Vec<LeaseId>,
    },
    Revoke {
        id: LeaseId,
    },
    Tick {
        term: u64,
        elapsed_ms: u64,
        extend_ms: u64,
    },
}

/// What applying a lease entry did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseOutcome {
    Granted {
        id: LeaseId,
        ttl_ms: u64,
    },
    /// Per id renewed, its TTL; 0 when it does not exist (expired or revoked).
    Renewed {
        ttl_ms: Vec<u64>,
    },
    /// `keys`: the attached keys, now deleted.
    Revoked {
        found: bool,
        keys: Vec<Vec<u8>>,
    },
    /// The leases that expired at this tick, with their keys, now deleted.
    Ticked {
        expired: Vec<(LeaseId, Vec<Vec<u8>>)>,
    },
    Refused(LeaseRefusal),
}

/// Why a lease entry or an attach did nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseRefusal {
    NotFound {
        id: LeaseId,
    },
    Full,
    TooManyKeys {
        id: LeaseId,
    },
    WrongSubject {
        id: LeaseId,
        lease_subject: Vec<u8>,
        key_subject: Vec<u8>,
    },
    BadTtl {
        ttl_ms: u64,
    },
    /// Only a register put or compare-and-set attaches a key.
    NotARegisterWrite,
    /// A tick whose claimed term is not its entry's.
    Fenced {
        tick_term: u64,
        entry_term: u64,
    },
    /// An entry of another group's lease (the proposer routed it wrongly).
    WrongGroup {
        id: LeaseId,
        group: u64,
    },
}

impl LeaseRefusal {
    /// The gRPC code a client gets.
    pub fn code(&self) -> i32 {
        match self {
            LeaseRefusal::NotFound { .. } => 5,
            LeaseRefusal::Full | LeaseRefusal::TooManyKeys { .. } => 8,
            LeaseRefusal::BadTtl { .. } | LeaseRefusal::NotARegisterWrite => 3,
            LeaseRefusal::WrongSubject { .. }
            | LeaseRefusal::Fenced { .. }
            | LeaseRefusal::WrongGroup { .. } => 9,
        }
    }
}

impl fmt::Display for LeaseRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseRefusal::NotFound { id } => write!(
                f,
                "lease {id:x} does not exist: it expired or was revoked (its keys are deleted); grant a new lease"
            ),
            LeaseRefusal::Full => write!(
                f,
                "the lease's group holds {LEASES_PER_GROUP_MAX} leases, its limit; revoke unused leases or grant fewer (share one lease among a client's keys)"
            ),
            LeaseRefusal::TooManyKeys { id } => write!(
                f,
                "lease {id:x} has {KEYS_PER_LEASE_MAX} keys attached, its limit; attach further keys to another lease"
            ),
            LeaseRefusal::WrongSubject {
                id,
                lease_subject,
                key_subject,
            } => write!(
                f,
                "lease {id:x} was granted for subject '{}', but the key's subject is '{}'; grant a lease for the key's subject (calm lease grant --subject), or give the key the lease's hash tag",
                DisplayKey(lease_subject),
                DisplayKey(key_subject)
            ),
            LeaseRefusal::BadTtl { ttl_ms } => write!(
                f,
                "a TTL of {ttl_ms} ms is out of range; give 1 ms to {LEASE_TTL_MS_MAX} ms (30 days)"
            ),
            LeaseRefusal::NotARegisterWrite => write!(
                f,
                "only a register put or compare-and-set attaches a key to a lease; counters, max and sets do not expire"
            ),
            LeaseRefusal::Fenced {
                tick_term,
                entry_term,
            } => write!(
                f,
                "a lease tick of term {tick_term} in an entry of term {entry_term} is ignored (a stalled leader's)"
            ),
            LeaseRefusal::WrongGroup { id, group } => write!(
                f,
                "lease {id:x} belongs to group {}, not group {group}; the proposer routed it wrongly (a bug)",
                lease_group(*id)
            ),
        }
    }
}

/// What changed since the last [`Leases::take_dirty`], for the state store: each group's
/// clock, and each lease's new state (`None`: gone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseChanges {
    pub clocks: Vec<(u64, LeaseClock)>,
    pub leases: Vec<(LeaseId, Option<Lease>)>,
}

impl LeaseChanges {
    pub fn is_empty(&self) -> bool {
        self.clocks.is_empty() && self.leases.is_empty()
    }
}

type KeyIndex = HashMap<Box<[u8]>, LeaseId, BuildHasherDefault<crate::replica::KeyHasher>>;

/// Every group's leases on this replica, with the index from key to lease.
#[derive(Clone, Debug, Default)]
pub struct Leases {
    groups: BTreeMap<u64, GroupLeases>,
    key_lease: KeyIndex,
    dirty_leases: BTreeSet<LeaseId>,
    dirty_clocks: BTreeSet<u64>,
}

impl Leases {
    /// Rebuild from the state store's rows.
    pub fn restore(
        clocks: impl IntoIterator<Item = (u64, LeaseClock)>,
        leases: impl IntoIterator<Item = Lease>,
    ) -> Leases {
        let mut out = Leases::default();
        for (group, clock) in clocks {
            out.groups.entry(group).or_default().clock = clock;
        }
        for lease in leases {
            for key in &lease.keys {
                out.key_lease.insert(key.as_slice().into(), lease.id);
            }
            out.groups
                .entry(lease_group(lease.id))
                .or_default()
                .leases
                .insert(lease.id, lease);
        }
        out
    }

    pub fn group(&self, group: u64) -> Option<&GroupLeases> {
        self.groups.get(&group)
    }

    /// How many leases `group` holds.
    pub fn count(&self, group: u64) -> usize {
        self.groups.get(&group).map_or(0, |g| g.leases.len())
    }

    pub fn get(&self, id: LeaseId) -> Option<&Lease> {
        self.groups.get(&lease_group(id))?.leases.get(&id)
    }

    /// Every lease of every group, by id.
    pub fn all(&self) -> impl Iterator<Item = &Lease> {
        self.groups.values().flat_map(|g| g.leases.values())
    }

    /// The lease `key` is attached to.
    pub fn lease_of(&self, key: &[u8]) -> Option<LeaseId> {
        if self.key_lease.is_empty() {
            return None;
        }
        self.key_lease.get(key).copied()
    }

    /// Milliseconds until `lease` expires, by its group's log clock.
    pub fn remaining_ms(&self, lease: &Lease) -> u64 {
        let clock = self
            .groups
            .get(&lease_group(lease.id))
            .map_or(0, |g| g.clock.clock_ms);
        lease.expires_at_ms.saturating_sub(clock)
    }

    fn group_mut(&mut self, group: u64) -> &mut GroupLeases {
        self.groups.entry(group).or_default()
    }

    /// Grant a lease in `group`.
    pub fn grant(
        &mut self,
        group: u64,
        subject: &[u8],
        ttl_ms: u64,
    ) -> Result<(LeaseId, u64), LeaseRefusal> {
        if !(1..=LEASE_TTL_MS_MAX).contains(&ttl_ms) {
            return Err(LeaseRefusal::BadTtl { ttl_ms });
        }
        let g = self.group_mut(group);
        if g.leases.len() >= LEASES_PER_GROUP_MAX {
            return Err(LeaseRefusal::Full);
        }
        assert!(
            g.clock.last_seq < (1 << LEASE_SEQ_BITS) - 1,
            "a group's lease sequence fits in 48 bits"
        );
        g.clock.last_seq += 1;
        let id = (group << LEASE_SEQ_BITS) | g.clock.last_seq;
        let lease = Lease {
            id,
            ttl_ms,
            expires_at_ms: g.clock.clock_ms + ttl_ms + TICK_CLAIM_MS_MAX,
            subject: subject.to_vec(),
            keys: BTreeSet::new(),
        };
        let previous = g.leases.insert(id, lease);
        assert!(previous.is_none(), "lease ids are never reused");
        self.dirty_clocks.insert(group);
        self.dirty_leases.insert(id);
        Ok((id, ttl_ms))
    }

    /// Renew `ids` (of `group`): each one's deadline moves to a full TTL from now.
    pub fn renew(&mut self, group: u64, ids: &[LeaseId]) -> Vec<u64> {
        let Some(g) = self.groups.get_mut(&group) else {
            return vec![0; ids.len()];
        };
        let clock = g.clock.clock_ms;
        ids.iter()
            .map(|id| match g.leases.get_mut(id) {
                Some(lease) if lease_group(*id) == group => {
                    let deadline = clock + lease.ttl_ms + TICK_CLAIM_MS_MAX;
                    if deadline > lease.expires_at_ms {
                        lease.expires_at_ms = deadline;
                        self.dirty_leases.insert(*id);
                    }
                    lease.ttl_ms
                }
                _ => 0,
            })
            .collect()
    }

    /// End lease `id`; its keys, which the caller deletes.
    pub fn revoke(&mut self, id: LeaseId) -> Option<Vec<Vec<u8>>> {
        let lease = self.groups.get_mut(&lease_group(id))?.leases.remove(&id)?;
        self.dirty_leases.insert(id);
        for key in &lease.keys {
            self.key_lease.remove(key.as_slice());
        }
        Some(lease.keys.into_iter().collect())
    }

    /// Advance `group`'s log clock (see the module docs); the leases that expired, by id,
    /// each with its keys (the caller deletes them), already removed.
    pub fn tick(
        &mut self,
        group: u64,
        term: u64,
        elapsed_ms: u64,
        extend_ms: u64,
    ) -> Vec<(LeaseId, Vec<Vec<u8>>)> {
        let g = self.groups.entry(group).or_default();
        if term > g.clock.term {
            // A new leader: what its predecessor measured since its last tick is lost, so
            // every lease gets the election timeout back.
            let extend_ms = extend_ms.min(LEADER_CHANGE_EXTEND_MS_MAX);
            for lease in g.leases.values_mut() {
                lease.expires_at_ms += extend_ms;
                self.dirty_leases.insert(lease.id);
            }
            g.clock.term = term;
        }
        g.clock.clock_ms += elapsed_ms.min(TICK_CLAIM_MS_MAX);
        self.dirty_clocks.insert(group);
        let now = g.clock.clock_ms;
        let expired: Vec<LeaseId> = g
            .leases
            .values()
            .filter(|l| l.expires_at_ms <= now)
            .map(|l| l.id)
            .collect();
        expired
            .into_iter()
            .map(|id| (id, self.revoke(id).expect("listed above")))
            .collect()
    }

    /// Whether `key` (of subject `key_subject`) may attach to lease `id`.
    pub fn check_attach(
        &self,
        id: LeaseId,
        key: &[u8],
        key_subject: &[u8],
    ) -> Result<(), LeaseRefusal> {
        let lease = self.get(id).ok_or(LeaseRefusal::NotFound { id })?;
        if lease.subject != key_subject {
            return Err(LeaseRefusal::WrongSubject {
                id,
                lease_subject: lease.subject.clone(),
                key_subject: key_subject.to_vec(),
            });
        }
        if lease.keys.len() >= KEYS_PER_LEASE_MAX && !lease.keys.contains(key) {
            return Err(LeaseRefusal::TooManyKeys { id });
        }
        Ok(())
    }

    /// Attach `key` to lease `id` (checked with `check_attach`), detaching it from any other.
    pub fn attach(&mut self, id: LeaseId, key: &[u8]) {
        if self.lease_of(key) == Some(id) {
            return;
        }
        self.detach(key);
        let lease = self
            .groups
            .get_mut(&lease_group(id))
            .and_then(|g| g.leases.get_mut(&id))
            .expect("attach follows check_attach");
        lease.keys.insert(key.to_vec());
        self.key_lease.insert(key.into(), id);
        self.dirty_leases.insert(id);
    }

    /// Detach `key` from its lease, if any (a later write without the lease owns it now).
    pub fn detach(&mut self, key: &[u8]) {
        let Some(id) = self.lease_of(key) else {
            return;
        };
        self.key_lease.remove(key);
        if let Some(lease) = self
            .groups
            .get_mut(&lease_group(id))
            .and_then(|g| g.leases.get_mut(&id))
        {
            lease.keys.remove(key);
            self.dirty_leases.insert(id);
        }
    }

    /// Replace `group`'s leases with a snapshot's.
    pub fn install(&mut self, group: u64, installed: GroupLeases) {
        if let Some(old) = self.groups.remove(&group) {
            for lease in old.leases.values() {
                self.dirty_leases.insert(lease.id);
                for key in &lease.keys {
                    self.key_lease.remove(key.as_slice());
                }
            }
        }
        for lease in installed.leases.values() {
            self.dirty_leases.insert(lease.id);
            for key in &lease.keys {
                self.key_lease.insert(key.as_slice().into(), lease.id);
            }
        }
        self.dirty_clocks.insert(group);
        self.groups.insert(group, installed);
    }

    /// What changed since the last call.
    pub fn take_dirty(&mut self) -> LeaseChanges {
        let clocks = std::mem::take(&mut self.dirty_clocks)
            .into_iter()
            .map(|g| (g, self.groups.get(&g).map(|g| g.clock).unwrap_or_default()))
            .collect();
        let leases = std::mem::take(&mut self.dirty_leases)
            .into_iter()
            .map(|id| (id, self.get(id).cloned()))
            .collect();
        LeaseChanges { clocks, leases }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_renewals_and_ticks_expire_on_the_log_clock() {
        let mut leases = Leases::default();
        let (id, ttl) = leases.grant(3, b"s", 5_000).unwrap();
        assert_eq!((lease_group(id), ttl), (3, 5_000));
        leases.attach(id, b"{s}:a");
        assert_eq!(leases.lease_of(b"{s}:a"), Some(id));
        // Term 1's first tick extends by 2 s; then 5 s of claims (capped per tick).
        assert!(leases.tick(3, 1, 900, 2_000).is_empty());
        for _ in 0..6 {
            assert!(leases.tick(3, 1, 5_000, 2_000).is_empty());
        }
        // 900 + 6 * 1000 = 6900 of 5000 + 1000 + 2000.
        assert_eq!(leases.remaining_ms(leases.get(id).unwrap()), 1_100);
        assert_eq!(leases.renew(3, &[id, id + 1]), vec![5_000, 0]);
        assert_eq!(leases.remaining_ms(leases.get(id).unwrap()), 6_000);
        for _ in 0..5 {
            assert!(leases.tick(3, 1, 1_000, 2_000).is_empty());
        }
        let expired = leases.tick(3, 1, 1_000, 2_000);
        assert_eq!(expired, vec![(id, vec![b"{s}:a".to_vec()])]);
        assert_eq!(leases.lease_of(b"{s}:a"), None);
        assert_eq!(leases.renew(3, &[id]), vec![0]);
        let changes = leases.take_dirty();
        assert_eq!(changes.leases, vec![(id, None)]);
        assert_eq!(changes.clocks.len(), 1);
        assert!(leases.take_dirty().is_empty());
    }

    #[test]
    fn attach_checks_subject_and_limits_and_moves_keys() {
        let mut leases = Leases::default();
        let (a, _) = leases.grant(1, b"s", 10_000).unwrap();
        let (b, _) = leases.grant(1, b"s", 10_000).unwrap();
        assert!(matches!(
            leases.check_attach(a, b"k", b"t"),
            Err(LeaseRefusal::WrongSubject { .. })
        ));
        assert_eq!(
            leases.check_attach(a + 7, b"k", b"s"),
            Err(LeaseRefusal::NotFound { id: a + 7 })
        );
        leases.attach(a, b"k");
        leases.attach(b, b"k");
        assert!(leases.get(a).unwrap().keys.is_empty());
        assert_eq!(leases.revoke(b), Some(vec![b"k".to_vec()]));
        assert_eq!(leases.revoke(b), None);
        assert_eq!(
            leases.grant(1, b"s", 0),
            Err(LeaseRefusal::BadTtl { ttl_ms: 0 })
        );
        let restored = Leases::restore(
            [(1, leases.group(1).unwrap().clock)],
            leases.all().cloned().collect::<Vec<_>>(),
        );
        assert_eq!(restored.group(1), leases.group(1));
    }
}
