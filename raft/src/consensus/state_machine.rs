//! A group's state machine: the kernel's `apply_command` on the node's one replica.
//!
//! Determinism contract (what Raft may rely on): given the same log prefix, every replica
//! answers every entry identically and ends with identical key states for the group's keys.
//! The kernel makes that true with one condition: a command applies only after the facts it
//! observed (its frontier). When a replica lacks some, `apply_command` reports `Blocked` and
//! this state machine waits for them through a [`FactSource`] (gossip pulls them) before
//! applying, never skips: skipping would make the answer depend on delivery timing.
//!
//! State lives in the node's [`LocalState`] (shared with the fast path and every other
//! group). Applying updates memory only; the node persists dirty keys together with each
//! group's applied log id in one RocksDB batch (`LocalState::persist`), and entries after a
//! group's persisted applied id stay in the WAL (see `log_store.rs`), so a crash re-applies
//! them. Installing a snapshot is the exception: it is persisted and flushed before it is
//! acknowledged, because the entries it replaces never existed on this node.

use super::GroupMap;
use super::snapshot::{self, SnapshotBody};
use super::types::{
    CalmRaft, EntryPayload, GroupId, LogId, Request, Response, Snapshot, SnapshotMeta,
    StoredMembership,
};
use crate::local::LocalState;
use calm_kernel::command::Command;
use calm_kernel::refusal::StatusCode;
use calm_kernel::{KeyState, NodeId, Outcome, ReplicaError};
use futures::TryStreamExt;
use futures::future::BoxFuture;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The node's durable state, shared by the fast path and every group's state machine.
pub type SharedLocal = Arc<Mutex<LocalState>>;

pub(crate) fn lock_local(local: &SharedLocal) -> MutexGuard<'_, LocalState> {
    // A panic while applying is a bug that already stopped the group; other groups reading
    // afterwards see the state as the kernel left it (its updates are per key).
    local.lock().unwrap_or_else(|e| e.into_inner())
}

/// Brings facts a blocked command observed: for each `(origin, seq)` in `missing`, that
/// origin's facts after this node's version vector up to `seq`, from any peer (after a
/// snapshot install the proposer may name facts only other peers hold). Gossip implements
/// it; `fetch` returns once it delivered something or gave up for now (the state machine
/// then retries).
pub trait FactSource: Send + Sync + 'static {
    fn fetch<'a>(&'a self, group: GroupId, missing: &'a [(NodeId, u64)]) -> BoxFuture<'a, ()>;
}

/// For nodes without gossip (tests, a single node): wait and retry.
pub struct WaitForFacts;

impl FactSource for WaitForFacts {
    fn fetch<'a>(&'a self, group: GroupId, missing: &'a [(NodeId, u64)]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            tracing::warn!(group, ?missing, "a command waits for facts this node lacks");
            tokio::time::sleep(Duration::from_millis(50)).await;
        })
    }
}

/// What a group's applied position is, as stored in `AppliedMeta::groups` (opaque there so
/// the store does not depend on openraft's types).
pub fn encode_applied(applied: &Option<LogId>, membership: &StoredMembership) -> Vec<u8> {
    postcard::to_stdvec(&(applied, membership)).expect("encoding into a Vec cannot fail")
}

pub fn decode_applied(bytes: &[u8]) -> io::Result<(Option<LogId>, StoredMembership)> {
    postcard::from_bytes(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a group's applied position in the state store does not decode ({e}); the store is corrupt"),
        )
    })
}

fn response(outcome: Outcome, version: u64) -> Response {
    match outcome {
        Outcome::Done => Response::Done { version },
        Outcome::CasFailed => Response::CasFailed { version },
        Outcome::Refused(r) => Response::Refused {
            code: match r.status() {
                StatusCode::InvalidArgument => 3,
                StatusCode::ResourceExhausted => 8,
                StatusCode::FailedPrecondition => 9,
                StatusCode::Unavailable => 14,
            },
            message: String::new(),
        },
    }
}

pub struct GroupStateMachine {
    group: GroupId,
    groups: GroupMap,
    local: SharedLocal,
    facts: Arc<dyn FactSource>,
    snapshot_dir: PathBuf,
    applied: Option<LogId>,
    membership: StoredMembership,
}

impl GroupStateMachine {
    /// The state machine of `group`, positioned where the node's state store says it is.
    pub fn open(
        group: GroupId,
        groups: GroupMap,
        local: SharedLocal,
        facts: Arc<dyn FactSource>,
        snapshot_dir: PathBuf,
    ) -> io::Result<GroupStateMachine> {
        let (applied, membership) = match lock_local(&local).group_applied(group) {
            Some(bytes) => decode_applied(bytes)?,
            None => (None, StoredMembership::default()),
        };
        Ok(GroupStateMachine {
            group,
            groups,
            local,
            facts,
            snapshot_dir,
            applied,
            membership,
        })
    }

    async fn apply_command(&self, cmd: &Command) -> io::Result<Response> {
        if self.groups.group_of(&cmd.key) != self.group {
            return Err(io::Error::other(format!(
                "group {} was asked to apply a command on key {} of group {}; the proposer routed it wrongly (a bug)",
                self.group,
                calm_kernel::refusal::DisplayKey(&cmd.key),
                self.groups.group_of(&cmd.key)
            )));
        }
        loop {
            let missing = {
                let mut local = lock_local(&self.local);
                match local.replica_mut().apply_command(cmd) {
                    Ok(outcome) => {
                        let message = match &outcome {
                            Outcome::Refused(r) => r.on_key(&cmd.key).to_string(),
                            _ => String::new(),
                        };
                        let version = match local.replica().key_state(&cmd.key) {
                            Some(KeyState::Register(r)) => r.version(),
                            _ => 0,
                        };
                        let mut resp = response(outcome, version);
                        if let Response::Refused { message: m, .. } = &mut resp {
                            *m = message;
                        }
                        return Ok(resp);
                    }
                    Err(ReplicaError::Blocked { missing, .. }) => missing,
                    Err(e) => return Err(io::Error::other(e)),
                }
            };
            self.facts.fetch(self.group, &missing).await;
        }
    }

    fn record_applied(&self) {
        let bytes = encode_applied(&self.applied, &self.membership);
        lock_local(&self.local).set_group_applied(self.group, bytes);
    }

    fn capture(&self) -> SnapshotBody {
        let (groups, group) = (self.groups, self.group);
        let keys = lock_local(&self.local)
            .replica()
            .keys_matching(|k| groups.group_of(k) == group)
            .into_iter()
            .map(|(k, s)| (k, s.encode()))
            .collect();
        SnapshotBody {
            group,
            meta: SnapshotMeta {
                last_log_id: self.applied,
                last_membership: self.membership.clone(),
            },
            keys,
        }
    }
}

/// Builds a snapshot from state captured when openraft asked for the builder (the state
/// machine keeps applying meanwhile).
pub struct GroupSnapshotBuilder {
    body: SnapshotBody,
    dir: PathBuf,
}

impl RaftSnapshotBuilder<CalmRaft> for GroupSnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let frame = snapshot::encode(&self.body);
        let (dir, group) = (self.dir.clone(), self.body.group);
        let frame = tokio::task::spawn_blocking(move || {
            snapshot::write(&dir, group, &frame).map(|()| frame)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Snapshot {
            meta: self.body.meta.clone(),
            snapshot: frame,
        })
    }
}

impl RaftStateMachine<CalmRaft> for GroupStateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = GroupSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<CalmRaft>, io::Error>> + Unpin + Send,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id;
            let reply = match entry.payload {
                EntryPayload::Blank => Response::None,
                EntryPayload::Normal(Request::Command(cmd)) => self.apply_command(&cmd).await?,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(log_id), m);
                    Response::None
                }
            };
            self.applied = Some(log_id);
            self.record_applied();
            if let Some(responder) = responder {
                responder.send(reply);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        GroupSnapshotBuilder {
            body: self.capture(),
            dir: self.snapshot_dir.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        data: Vec<u8>,
    ) -> Result<(), io::Error> {
        let body = snapshot::decode(&data)?;
        if body.group != self.group || body.meta != *meta {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "snapshot for group {} at {:?} was offered to group {} at {:?}; refusing it",
                    body.group, body.meta.last_log_id, self.group, meta.last_log_id
                ),
            ));
        }
        let keys = body.key_states()?;
        let (groups, group) = (self.groups, self.group);
        {
            let mut local = lock_local(&self.local);
            local
                .replica_mut()
                .install_snapshot(keys, |k| groups.group_of(k) == group)
                .map_err(io::Error::other)?;
            local.set_group_applied(
                group,
                encode_applied(&meta.last_log_id, &meta.last_membership),
            );
            // The entries this snapshot stands for never reached this node's WAL: make the
            // installed state durable before openraft purges its log up to it.
            local.persist_durable().map_err(io::Error::other)?;
        }
        snapshot::write(&self.snapshot_dir, group, &data)?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(
            snapshot::read(&self.snapshot_dir, self.group)?.map(|(frame, body)| Snapshot {
                meta: body.meta,
                snapshot: frame,
            }),
        )
    }
}
