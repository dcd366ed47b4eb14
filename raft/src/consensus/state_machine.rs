//! A group's state machine: the kernel's `apply_command` on the node's one replica.
//!
//! Determinism contract (what Raft may rely on): given the same log prefix, every replica
//! answers every entry identically and ends with identical key states for the group's keys.
//! The kernel makes that true with one condition: a command applies only after the facts it
//! observed (its frontier). When a replica lacks some, `apply_command` reports `Blocked` and
//! this state machine waits for them through a [`FactSource`] (gossip pulls them) before
//! applying, never skips: skipping would make the answer depend on delivery timing. An entry
//! of several commands (`Request::Commands`, distinct keys) applies only once every one of
//! them can, and then all at once, so no replica ever holds part of an entry.
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
    CalmRaft, EntryPayload, GroupId, LeaseEntry, LogId, Request, Response, Snapshot, SnapshotMeta,
    StoredMembership,
};
use crate::local::LocalState;
use calm_kernel::command::Command;
use calm_kernel::lease::{LeaseId, LeaseOutcome, LeaseRefusal};
use calm_kernel::refusal::StatusCode;
use calm_kernel::rules::{RuleSet, RulesError};
use calm_kernel::txn::{Txn, TxnOutcome};
use calm_kernel::{KeyRecord, KeyState, NodeId, Outcome, ReplicaError};
use futures::TryStreamExt;
use futures::future::BoxFuture;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use serde::{Deserialize, Serialize};
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

/// A group's applied position as stored in `AppliedMeta::groups` (opaque there so the
/// store does not depend on openraft's types): its last applied log id and membership, and
/// for the metadata group the rules in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedPosition {
    pub log_id: Option<LogId>,
    pub membership: StoredMembership,
    /// The rules as their TOML text (see `Request::InitRules` for why text).
    pub rules: Option<String>,
}

/// The rules file text of `rules` (its version included).
pub fn rules_text(rules: &RuleSet) -> String {
    toml::to_string(rules).expect("rules always render as TOML")
}

/// Parse rules file text.
pub fn parse_rules(text: &str) -> Result<RuleSet, String> {
    toml::from_str(text).map_err(|e| {
        format!(
            "the rules are not a valid rules file ({e}); see `calm rules example` for the format"
        )
    })
}

fn stored_rules(text: &str) -> io::Result<RuleSet> {
    parse_rules(text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{e}: the metadata group's stored rules are corrupt"),
        )
    })
}

impl AppliedPosition {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding into a Vec cannot fail")
    }

    pub fn decode(bytes: &[u8]) -> io::Result<AppliedPosition> {
        postcard::from_bytes(bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a group's applied position in the state store does not decode ({e}); the store is corrupt"),
            )
        })
    }
}

/// The last applied log id in an encoded [`AppliedPosition`].
pub fn decode_applied(bytes: &[u8]) -> io::Result<Option<LogId>> {
    AppliedPosition::decode(bytes).map(|p| p.log_id)
}

fn response(outcome: Outcome, version: u64) -> Response {
    match outcome {
        Outcome::Done => Response::Done { version },
        Outcome::CasFailed => Response::CasFailed { version },
        Outcome::Deleted { existed } => Response::Deleted { version, existed },
        Outcome::Refused(r) => Response::Refused {
            code: match r.status() {
                StatusCode::InvalidArgument => 3,
                StatusCode::ResourceExhausted => 8,
                StatusCode::FailedPrecondition => 9,
                StatusCode::Unavailable => 14,
                StatusCode::Aborted => 10,
            },
            message: String::new(),
        },
    }
}

/// The answer to an applied transaction: per op of the branch that ran, its outcome with
/// the register version after it; or the refusal, naming the part and key refused.
fn txn_response(replica: &calm_kernel::Replica, txn: &Txn, outcome: TxnOutcome) -> Response {
    match outcome {
        TxnOutcome::Applied {
            succeeded,
            outcomes,
        } => {
            let branch = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            let results = branch
                .iter()
                .zip(outcomes)
                .map(|(cmd, outcome)| response(outcome, register_version(replica, &cmd.key)))
                .collect();
            Response::Txn { succeeded, results }
        }
        TxnOutcome::Refused { at, key, refusal } => match response(Outcome::Refused(refusal), 0) {
            Response::Refused { code, .. } => Response::Refused {
                code,
                message: format!("transaction refused at {at}: {}", refusal.on_key(&key)),
            },
            other => other,
        },
    }
}

/// A register's version (a deleted one's too: deletes are versions); 0 for other types.
fn register_version(replica: &calm_kernel::Replica, key: &[u8]) -> u64 {
    match replica.key_record(key) {
        Some(KeyRecord {
            state: KeyState::Register(r),
            ..
        }) => r.version(),
        _ => 0,
    }
}

/// The answer to one applied command on `cmd`'s key.
fn command_response(replica: &calm_kernel::Replica, cmd: &Command, outcome: Outcome) -> Response {
    let message = match &outcome {
        Outcome::Refused(r) => r.on_key(&cmd.key).to_string(),
        _ => String::new(),
    };
    let mut resp = response(outcome, register_version(replica, &cmd.key));
    if let Response::Refused { message: m, .. } = &mut resp {
        *m = message;
    }
    resp
}

fn lease_refused(refusal: &LeaseRefusal) -> Response {
    Response::Refused {
        code: refusal.code(),
        message: refusal.to_string(),
    }
}

/// How long an apply may wait for facts its commands observed before each warning: a
/// group stalled on facts nobody delivers must be visible at the default log level.
pub const BLOCKED_APPLY_WARN_AFTER: Duration = Duration::from_secs(5);

const FAILED_PRECONDITION: i32 = 9;
const INVALID_ARGUMENT: i32 = 3;

pub struct GroupStateMachine {
    group: GroupId,
    groups: GroupMap,
    local: SharedLocal,
    facts: Arc<dyn FactSource>,
    snapshot_dir: PathBuf,
    applied: Option<LogId>,
    membership: StoredMembership,
    /// Metadata group: the rules in force (`None` until the cluster's first rules apply).
    rules: Option<RuleSet>,
}

/// Compile `rules` and make them the replica's (versions only rise; a replica that already
/// has them, e.g. after a restart re-applies nothing, is left alone).
fn install_rules(local: &SharedLocal, rules: &RuleSet) -> io::Result<()> {
    let compiled = rules.compile().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the stored rules (version {}) do not compile ({e}); the metadata group's state is corrupt", rules.version),
        )
    })?;
    let mut local = lock_local(local);
    if compiled.version() > local.replica().rules_version() {
        local.replica_mut().set_rules(compiled);
    }
    Ok(())
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
        let position = match lock_local(&local).group_applied(group) {
            Some(bytes) => AppliedPosition::decode(bytes)?,
            None => AppliedPosition::default(),
        };
        // The metadata group opens first: the cluster's rules are in force before any data
        // group re-applies a command.
        let rules = position.rules.as_deref().map(stored_rules).transpose()?;
        if let Some(rules) = &rules {
            install_rules(&local, rules)?;
        }
        Ok(GroupStateMachine {
            group,
            groups,
            local,
            facts,
            snapshot_dir,
            applied: position.log_id,
            membership: position.membership,
            rules,
        })
    }

    fn metadata_only(&self, what: &str) -> io::Result<()> {
        if self.group == GroupMap::METADATA {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "group {} was asked to apply {what}, which belongs to the metadata group; the proposer routed it wrongly (a bug)",
            self.group
        )))
    }

    fn init_rules(&mut self, text: &str) -> io::Result<Response> {
        self.metadata_only("initial rules")?;
        if let Some(current) = &self.rules {
            // Another node's initial rules were ordered first: nothing to do.
            return Ok(Response::Done {
                version: current.version,
            });
        }
        let mut rules = match parse_rules(text) {
            Ok(r) => r,
            Err(message) => {
                return Ok(Response::Refused {
                    code: INVALID_ARGUMENT,
                    message,
                });
            }
        };
        rules.version = 1;
        if let Err(e) = rules.compile() {
            return Ok(Response::Refused {
                code: INVALID_ARGUMENT,
                message: format!("the initial rules are invalid: {e}"),
            });
        }
        install_rules(&self.local, &rules)?;
        self.rules = Some(rules);
        Ok(Response::Done { version: 1 })
    }

    fn set_rules(&mut self, expected_version: u64, text: &str) -> io::Result<Response> {
        self.metadata_only("a rules change")?;
        let proposed = match parse_rules(text) {
            Ok(r) => r,
            Err(message) => {
                return Ok(Response::Refused {
                    code: INVALID_ARGUMENT,
                    message,
                });
            }
        };
        let Some(current) = &self.rules else {
            return Ok(Response::Refused {
                code: FAILED_PRECONDITION,
                message: "the cluster's initial rules are not in force yet (it is still starting); retry in a moment".into(),
            });
        };
        match current.replace(expected_version, proposed.rules, proposed.default_mode) {
            Ok(next) => {
                install_rules(&self.local, &next)?;
                let version = next.version;
                self.rules = Some(next);
                Ok(Response::Done { version })
            }
            Err(e @ RulesError::VersionMismatch { .. }) => Ok(Response::Refused {
                code: FAILED_PRECONDITION,
                message: e.to_string(),
            }),
            Err(e) => Ok(Response::Refused {
                code: INVALID_ARGUMENT,
                message: e.to_string(),
            }),
        }
    }

    /// Apply `cmds`, the commands of the entry at `log_id`, in order. Their keys' new states
    /// and the group's applied position change under one lock: a persist in between would
    /// store an effect without the position (or the position without every effect), and a
    /// restart would apply the entry twice or only in part (a replica diverging on a
    /// register's version, a strict counter counting twice).
    ///
    /// The lock is taken only once every command's frontier is applied here; until then the
    /// missing facts are fetched with the lock released.
    async fn apply_commands(&self, cmds: &[Command], log_id: LogId) -> io::Result<Vec<Response>> {
        for (i, cmd) in cmds.iter().enumerate() {
            self.check_key_group(&cmd.key)?;
            // Distinct keys make one command's effect independent of the others' in the
            // entry, which the all-at-once application below relies on.
            if cmds[..i].iter().any(|c| c.key == cmd.key) {
                return Err(io::Error::other(format!(
                    "group {} was asked to apply an entry with two commands on key {}; proposers coalesce distinct keys only (a bug)",
                    self.group,
                    calm_kernel::refusal::DisplayKey(&cmd.key),
                )));
            }
        }
        self.apply_when_facts_here(log_id, "an entry", |local| {
            let missing: Vec<(NodeId, u64)> = cmds
                .iter()
                .flat_map(|cmd| local.replica().missing_facts(cmd))
                .collect();
            if !missing.is_empty() {
                return Ok(Err(missing));
            }
            let mut responses = Vec::with_capacity(cmds.len());
            for cmd in cmds {
                let outcome = match local.replica_mut().apply_command(cmd) {
                    Ok(outcome) => outcome,
                    // Checked above under this lock, and commands touch their own key
                    // only: a block here would apply the entry in part.
                    Err(e @ ReplicaError::Blocked { .. }) => {
                        return Err(io::Error::other(format!(
                            "a command blocked after its facts were checked, with earlier commands of its entry applied (a bug): {e}"
                        )));
                    }
                    Err(e) => return Err(io::Error::other(e)),
                };
                responses.push(command_response(local.replica(), cmd, outcome));
            }
            Ok(Ok(responses))
        })
        .await
    }

    /// An error unless `key` belongs to this group.
    fn check_key_group(&self, key: &[u8]) -> io::Result<()> {
        if self.groups.group_of(key) == self.group {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "group {} was asked to apply a command on key {} of group {}; the proposer routed it wrongly (a bug)",
            self.group,
            calm_kernel::refusal::DisplayKey(key),
            self.groups.group_of(key)
        )))
    }

    /// Run `step` on the node's state under one lock with recording the group's applied
    /// position as `log_id`, once the facts the entry observed are here: `step` answers
    /// `Err(missing)` (having changed nothing) while this node lacks facts, which are then
    /// fetched with the lock released, and `step` runs again.
    async fn apply_when_facts_here<T>(
        &self,
        log_id: LogId,
        what: &str,
        mut step: impl FnMut(&mut LocalState) -> io::Result<Result<T, Vec<(NodeId, u64)>>>,
    ) -> io::Result<T> {
        let position = AppliedPosition {
            log_id: Some(log_id),
            membership: self.membership.clone(),
            rules: self.rules.as_ref().map(rules_text),
        }
        .encode();
        let blocked_since = std::time::Instant::now();
        let mut next_warning = BLOCKED_APPLY_WARN_AFTER;
        loop {
            let missing = {
                let mut local = lock_local(&self.local);
                match step(&mut local)? {
                    Ok(answer) => {
                        local.set_group_applied(self.group, position);
                        local.publish_entry(self.group, log_id.index());
                        return Ok(answer);
                    }
                    Err(missing) => missing,
                }
            };
            let waited = blocked_since.elapsed();
            if waited >= next_warning {
                let vv = lock_local(&self.local).replica().version_vector().clone();
                tracing::warn!(
                    group = self.group,
                    index = log_id.index(),
                    waited_s = waited.as_secs(),
                    ?missing,
                    have = ?vv,
                    "applying {what} waits for facts it observed and this node lacks; no peer delivered them yet"
                );
                next_warning = waited + BLOCKED_APPLY_WARN_AFTER * 2;
            }
            self.facts.fetch(self.group, &missing).await;
        }
    }

    /// Apply the transaction of the entry at `log_id` (attaching the keys in `attach` to
    /// their leases): like `apply_commands`, once every fact it observed is here, under one
    /// lock with the group's applied position.
    async fn apply_txn(
        &self,
        txn: &Txn,
        attach: &[(bool, u32, LeaseId)],
        log_id: LogId,
    ) -> io::Result<Response> {
        if let Err(reason) = super::check_txn(self.groups, self.group, txn) {
            return Err(io::Error::other(format!(
                "group {} was asked to apply a malformed transaction; the proposer checks this (a bug): {reason}",
                self.group
            )));
        }
        // `check_txn` and `check_request` keep the indexes within the branches.
        let attach: Vec<(bool, usize, LeaseId, &[u8])> = attach
            .iter()
            .filter_map(|&(success, index, lease)| {
                let branch = if success { &txn.success } else { &txn.failure };
                let cmd = branch.get(index as usize)?;
                Some((
                    success,
                    index as usize,
                    lease,
                    self.groups.subject(&cmd.key),
                ))
            })
            .collect();
        self.apply_when_facts_here(log_id, "a transaction", |local| {
            match local.replica_mut().apply_txn_leased(txn, &attach) {
                Ok(Ok(outcome)) => Ok(Ok(txn_response(local.replica(), txn, outcome))),
                Ok(Err(refusal)) => Ok(Ok(lease_refused(&refusal))),
                Err(ReplicaError::Blocked { missing, .. }) => Ok(Err(missing)),
                Err(e) => Err(io::Error::other(e)),
            }
        })
        .await
    }

    /// Apply a register write that attaches its key to `lease`: like a command, once the
    /// facts it observed are here.
    async fn apply_leased(
        &self,
        cmd: &Command,
        lease: LeaseId,
        log_id: LogId,
    ) -> io::Result<Response> {
        self.check_key_group(&cmd.key)?;
        let subject = self.groups.subject(&cmd.key);
        self.apply_when_facts_here(log_id, "a leased write", |local| {
            match local.replica_mut().apply_leased(cmd, lease, subject) {
                Ok(Ok(outcome)) => Ok(Ok(command_response(local.replica(), cmd, outcome))),
                Ok(Err(refusal)) => Ok(Ok(lease_refused(&refusal))),
                Err(ReplicaError::Blocked { missing, .. }) => Ok(Err(missing)),
                Err(e) => Err(io::Error::other(e)),
            }
        })
        .await
    }

    /// Apply a lease entry (it observes no facts) at `log_id`.
    async fn apply_lease(&self, entry: &LeaseEntry, log_id: LogId) -> io::Result<Response> {
        if let Err(reason) = super::check_lease(self.groups, self.group, &entry.cmd) {
            return Err(io::Error::other(format!(
                "group {} was asked to apply a malformed lease entry; the proposer checks this (a bug): {reason}",
                self.group
            )));
        }
        let term = log_id.committed_leader_id().term;
        self.apply_when_facts_here(log_id, "a lease entry", |local| {
            let outcome = local.replica_mut().apply_lease(
                self.group,
                &entry.cmd,
                term,
                entry.hlc,
                entry.proposer,
            );
            Ok(Ok(match outcome {
                LeaseOutcome::Granted { id, ttl_ms } => Response::LeaseGranted { id, ttl_ms },
                LeaseOutcome::Renewed { ttl_ms } => Response::LeaseRenewed { ttl_ms },
                LeaseOutcome::Revoked { found, keys } => Response::LeaseRevoked {
                    found,
                    keys: keys.len() as u64,
                },
                LeaseOutcome::Ticked { expired } => {
                    if !expired.is_empty() {
                        tracing::debug!(
                            group = self.group,
                            expired = expired.len(),
                            "leases expired"
                        );
                    }
                    Response::LeaseTicked {
                        expired: expired.len() as u64,
                    }
                }
                LeaseOutcome::Refused(refusal) => lease_refused(&refusal),
            }))
        })
        .await
    }

    fn position(&self) -> AppliedPosition {
        AppliedPosition {
            log_id: self.applied,
            membership: self.membership.clone(),
            rules: self.rules.as_ref().map(rules_text),
        }
    }

    fn record_applied(&self) {
        let bytes = self.position().encode();
        let mut local = lock_local(&self.local);
        local.set_group_applied(self.group, bytes);
        if let Some(applied) = self.applied {
            local.events().applied(self.group, applied.index());
        }
    }

    fn capture(&self) -> SnapshotBody {
        let (groups, group) = (self.groups, self.group);
        // Keys and leases under one lock: a lease's keys are in the same cut.
        let (keys, leases) = {
            let local = lock_local(&self.local);
            let keys = local
                .replica()
                .keys_matching(|k| groups.group_of(k) == group)
                .into_iter()
                .map(|(k, s)| (k, s.encode()))
                .collect();
            let leases = local.replica().leases().group(group).cloned();
            (keys, leases.unwrap_or_default())
        };
        SnapshotBody {
            leases,
            group,
            meta: SnapshotMeta {
                last_log_id: self.applied,
                last_membership: self.membership.clone(),
            },
            keys,
            rules: self.rules.as_ref().map(rules_text),
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
                EntryPayload::Normal(Request::Command(cmd)) => {
                    let mut responses = self
                        .apply_commands(std::slice::from_ref(&*cmd), log_id)
                        .await?;
                    responses.pop().expect("one answer per command")
                }
                EntryPayload::Normal(Request::Commands(cmds)) => {
                    Response::Batch(self.apply_commands(&cmds, log_id).await?)
                }
                EntryPayload::Normal(Request::Txn(txn)) => {
                    self.apply_txn(&txn, &[], log_id).await?
                }
                EntryPayload::Normal(Request::TxnLeased { txn, attach }) => {
                    self.apply_txn(&txn, &attach, log_id).await?
                }
                EntryPayload::Normal(Request::Lease(entry)) => {
                    self.apply_lease(&entry, log_id).await?
                }
                EntryPayload::Normal(Request::Leased { cmd, lease }) => {
                    self.apply_leased(&cmd, lease, log_id).await?
                }
                EntryPayload::Normal(Request::InitRules { toml }) => self.init_rules(&toml)?,
                EntryPayload::Normal(Request::SetRules {
                    expected_version,
                    toml,
                }) => self.set_rules(expected_version, &toml)?,
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
        if body.rules.is_some() {
            self.metadata_only("a snapshot with rules")?;
        }
        let installed_rules = body.rules.as_deref().map(stored_rules).transpose()?;
        if let Some(rules) = &installed_rules {
            install_rules(&self.local, rules)?;
        }
        let (groups, group) = (self.groups, self.group);
        let rules = installed_rules.or_else(|| self.rules.clone());
        let position = AppliedPosition {
            log_id: meta.last_log_id,
            membership: meta.last_membership.clone(),
            rules: rules.as_ref().map(rules_text),
        };
        {
            let mut local = lock_local(&self.local);
            local
                .replica_mut()
                .install_snapshot(keys, |k| groups.group_of(k) == group)
                .map_err(io::Error::other)?;
            local
                .replica_mut()
                .install_group_leases(group, body.leases.clone());
            let index = meta.last_log_id.map_or(0, |l| l.index());
            local.publish_snapshot(group, index);
            local.set_group_applied(group, position.encode());
            // The entries this snapshot stands for never reached this node's WAL: make the
            // installed state durable before openraft purges its log up to it.
            local.persist_durable().map_err(io::Error::other)?;
        }
        snapshot::write(&self.snapshot_dir, group, &data)?;
        self.applied = position.log_id;
        self.membership = position.membership;
        self.rules = rules;
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
