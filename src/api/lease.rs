//! The Lease service: grant, revoke, keep alive, time to live, list.
//!
//! A lease lives in the Raft group of the subject it is granted for (`calm_kernel::lease`
//! says what its entries mean and why it never expires early); this module checks requests
//! and turns them into those entries. Renewals from every keep-alive stream of this node
//! are batched per group (`crate::lease_keeper`), so 10,000 kept-alive leases cost a few
//! Raft entries per second, not 10,000. docs/leases.md is the user's account.

use super::{check_key, invalid, pb};
use crate::node::{Node, lock};
use crate::token::SessionToken;
use calm_kernel::lease::{LEASE_TTL_MS_MAX, Lease, LeaseCommand, LeaseId, lease_group};
use calm_kernel::refusal::DisplayKey;
use calm_raft::consensus::types::LeaseEntry;
use calm_raft::consensus::{Request, Response};
use futures::StreamExt;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

/// Renewals of one keep-alive stream in flight at once (answered in request order).
const KEEPALIVE_IN_FLIGHT_MAX: usize = 256;
/// Most leases one List answer names.
pub const LEASE_LIST_MAX: usize = 100_000;

pub struct LeaseService {
    pub node: Arc<Node>,
    pub shutdown: CancellationToken,
}

type KeepAliveStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    async fn grant(
        &self,
        request: tonic::Request<pb::LeaseGrantRequest>,
    ) -> Result<tonic::Response<pb::LeaseGrantResponse>, Status> {
        let response = self.node.grant_lease(request.into_inner()).await?;
        Ok(tonic::Response::new(response))
    }

    async fn revoke(
        &self,
        request: tonic::Request<pb::LeaseRevokeRequest>,
    ) -> Result<tonic::Response<pb::LeaseRevokeResponse>, Status> {
        let response = self.node.revoke_lease(request.into_inner().id).await?;
        Ok(tonic::Response::new(response))
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        request: tonic::Request<tonic::Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<tonic::Response<KeepAliveStream>, Status> {
        let node = self.node.clone();
        let answers = request
            .into_inner()
            .take_until(self.shutdown.clone().cancelled_owned())
            .map(move |req| {
                let node = node.clone();
                async move {
                    let id = req?.id;
                    let ttl_ms = crate::lease_keeper::renew(&node, id).await?;
                    Ok(pb::LeaseKeepAliveResponse { id, ttl_ms })
                }
            })
            .buffered(KEEPALIVE_IN_FLIGHT_MAX);
        Ok(tonic::Response::new(Box::pin(answers)))
    }

    async fn time_to_live(
        &self,
        request: tonic::Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<tonic::Response<pb::LeaseTimeToLiveResponse>, Status> {
        let req = request.into_inner();
        let response = self.node.lease_time_to_live(req.id, req.keys).await?;
        Ok(tonic::Response::new(response))
    }

    async fn list(
        &self,
        _request: tonic::Request<pb::LeaseListRequest>,
    ) -> Result<tonic::Response<pb::LeaseListResponse>, Status> {
        let local = lock(&self.node.local);
        let leases = local.replica().leases();
        let leases = leases
            .all()
            .take(LEASE_LIST_MAX)
            .map(|l| lease_info(leases, l, false))
            .collect();
        Ok(tonic::Response::new(pb::LeaseListResponse { leases }))
    }
}

fn lease_info(leases: &calm_kernel::Leases, lease: &Lease, keys: bool) -> pb::LeaseInfo {
    pb::LeaseInfo {
        id: lease.id,
        ttl_ms: lease.ttl_ms,
        remaining_ms: leases.remaining_ms(lease),
        subject: lease.subject.clone(),
        key_count: lease.keys.len() as u64,
        keys: if keys {
            lease.keys.iter().cloned().collect()
        } else {
            Vec::new()
        },
    }
}

impl Node {
    /// The shortest TTL a lease gets: 1.5x the longest election timeout, so that a leader
    /// change alone (which extends leases by an election timeout) cannot decide expiry.
    pub fn lease_ttl_min_ms(&self) -> u64 {
        self.config
            .raft
            .election_timeout_max_ms
            .saturating_mul(3)
            .div_ceil(2)
    }

    /// The group of lease `id`, or NOT_FOUND when no lease can have that id.
    pub(crate) fn lease_group_of(&self, id: LeaseId) -> Result<u64, Status> {
        let group = lease_group(id);
        if group == 0 || group > self.consensus.group_map().data_groups() {
            return Err(Status::not_found(format!(
                "lease {id:x} does not exist: no group of this cluster grants such ids; give an id from Lease.Grant or `calm lease list`"
            )));
        }
        Ok(group)
    }

    /// Propose a lease entry to `group`.
    pub(crate) async fn propose_lease(
        &self,
        group: u64,
        cmd: LeaseCommand,
    ) -> Result<calm_raft::consensus::Proposed, Status> {
        let entry = LeaseEntry {
            hlc: self.hlc.now(),
            proposer: self.id(),
            cmd,
        };
        let proposed = self
            .consensus
            .propose_to(group, Request::Lease(Arc::new(entry)))
            .await
            .map_err(|e| self.unavailable(e))?;
        self.issue_index(proposed.group, proposed.index);
        if let Response::Refused { code, message } = proposed.response {
            return Err(Status::new(Code::from_i32(code), message));
        }
        Ok(proposed)
    }

    pub async fn grant_lease(
        &self,
        req: pb::LeaseGrantRequest,
    ) -> Result<pb::LeaseGrantResponse, Status> {
        let map = self.consensus.group_map();
        let subject = match (req.subject.is_empty(), req.key.is_empty()) {
            (false, true) => {
                check_key(&req.subject)?;
                // A subject is its own subject; a string that is not (it holds a hash tag)
                // names another one, which would surprise.
                if map.subject(&req.subject) != req.subject.as_slice() {
                    return Err(invalid(format!(
                        "'{}' is not a subject: its subject is '{}'; pass it as the key instead, or give the subject itself",
                        DisplayKey(&req.subject),
                        DisplayKey(map.subject(&req.subject))
                    )));
                }
                req.subject
            }
            (true, false) => {
                check_key(&req.key)?;
                map.subject(&req.key).to_vec()
            }
            _ => {
                return Err(invalid(
                    "name what the lease is for: exactly one of a subject or a key (keys of that subject attach to it)",
                ));
            }
        };
        if req.ttl_ms == 0 || req.ttl_ms > LEASE_TTL_MS_MAX {
            return Err(invalid(format!(
                "a TTL of {} ms is out of range; give 1 ms to {LEASE_TTL_MS_MAX} ms (30 days)",
                req.ttl_ms
            )));
        }
        let ttl_ms = req.ttl_ms.max(self.lease_ttl_min_ms());
        let group = map.group_of(&subject);
        let proposed = self
            .propose_lease(
                group,
                LeaseCommand::Grant {
                    subject: subject.clone(),
                    ttl_ms,
                },
            )
            .await?;
        metrics::counter!("calm_lease_grants_total").increment(1);
        match proposed.response {
            Response::LeaseGranted { id, ttl_ms } => Ok(pb::LeaseGrantResponse {
                id,
                ttl_ms,
                subject,
                token: SessionToken::of_entry(proposed.group, proposed.index).encode(),
            }),
            other => Err(unexpected("a lease grant", &other)),
        }
    }

    pub async fn revoke_lease(&self, id: LeaseId) -> Result<pb::LeaseRevokeResponse, Status> {
        let group = self.lease_group_of(id)?;
        let proposed = self
            .propose_lease(group, LeaseCommand::Revoke { id })
            .await?;
        match proposed.response {
            Response::LeaseRevoked { found, keys } => Ok(pb::LeaseRevokeResponse {
                found,
                keys_deleted: keys,
                token: SessionToken::of_entry(proposed.group, proposed.index).encode(),
            }),
            other => Err(unexpected("a lease revoke", &other)),
        }
    }

    pub async fn lease_time_to_live(
        &self,
        id: LeaseId,
        keys: bool,
    ) -> Result<pb::LeaseTimeToLiveResponse, Status> {
        let group = self.lease_group_of(id)?;
        self.consensus
            .read_barrier(group)
            .await
            .map_err(|e| self.unavailable(e))?;
        let local = lock(&self.local);
        let leases = local.replica().leases();
        Ok(match leases.get(id) {
            Some(lease) => pb::LeaseTimeToLiveResponse {
                found: true,
                lease: Some(lease_info(leases, lease, keys)),
            },
            None => pb::LeaseTimeToLiveResponse {
                found: false,
                lease: None,
            },
        })
    }

    /// Check a write that attaches `key` to `lease` before anything is proposed: a register
    /// put or value-writing compare-and-set, of a lease of the key's subject, not in
    /// `available` mode.
    pub(super) fn check_leased_write(
        &self,
        key: &[u8],
        op: &calm_kernel::Op,
        lease: LeaseId,
    ) -> Result<(), Status> {
        use calm_kernel::{Mode, Op};
        if !matches!(
            op,
            Op::RegisterPut { .. } | Op::RegisterCas { value: Some(_), .. }
        ) {
            return Err(invalid(
                "only a put or a compare-and-set that writes a value attaches a key to a lease; counters, max and sets do not expire",
            ));
        }
        self.lease_group_of(lease)?;
        let local = lock(&self.local);
        let replica = local.replica();
        if replica.mode_of(key) == Mode::Available {
            return Err(Status::failed_precondition(format!(
                "key '{}' is in {} mode, whose writes are not ordered, so a lease's delete could be undone by a write ordered after it; change the key's rule to hybrid or strict to attach it to a lease",
                DisplayKey(key),
                Mode::Available
            )));
        }
        let map = self.consensus.group_map();
        let subject = map.subject(key);
        if lease_group(lease) != map.group_of(key) {
            return Err(Status::failed_precondition(format!(
                "lease {lease:x} is not of key '{}''s subject '{}' (its id is of another group's); grant a lease for the key's subject, or give the key the lease's hash tag",
                DisplayKey(key),
                DisplayKey(subject)
            )));
        }
        match replica.leases().get(lease) {
            Some(l) if l.subject != subject => Err(Status::failed_precondition(format!(
                "lease {lease:x} was granted for subject '{}', but key '{}' has subject '{}'; grant a lease for the key's subject, or give the key the lease's hash tag",
                DisplayKey(&l.subject),
                DisplayKey(key),
                DisplayKey(subject)
            ))),
            // A lease this node has not applied yet (granted through another node just
            // now) is checked where it counts: when the write applies.
            _ => Ok(()),
        }
    }
}

fn unexpected(what: &str, response: &Response) -> Status {
    Status::internal(format!(
        "{what} was answered {response:?} (a bug); its outcome is unknown, check with `calm lease list`"
    ))
}
