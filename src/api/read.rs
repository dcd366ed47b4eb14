//! A read on this node: the consistency levels of Get, and session tokens.

use super::ops::value_to_pb;
use super::{check_key, invalid, pb};
use crate::node::{Node, lock};
use crate::token::SessionToken;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::Status;

impl Node {
    /// Wait (bounded) until this node applied what `token` names for `group`.
    pub(super) async fn await_token(&self, token: &SessionToken, group: u64) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.config.raft.request_timeout_ms);
        let index = token.groups.get(&group).copied().unwrap_or(0);
        loop {
            let caught_up = lock(&self.local)
                .replica()
                .version_vector()
                .dominates(&token.vv)
                && self.applied_index(group) >= index;
            if caught_up {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "node {} has not caught up with the session token within {} ms (it may be partitioned from the writer); retry, or send the request to the node that wrote",
                    self.id(),
                    self.config.raft.request_timeout_ms
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A write's optional session token: decoded (INVALID_ARGUMENT if malformed) and awaited
    /// for the key's group before admission.
    pub(crate) async fn await_write_token(&self, key: &[u8], token: &[u8]) -> Result<(), Status> {
        if token.is_empty() {
            return Ok(());
        }
        let token = SessionToken::decode(token).map_err(invalid)?;
        self.await_token(&token, self.consensus.group_map().group_of(key))
            .await
    }

    pub async fn get(
        &self,
        key: &[u8],
        consistency: pb::Consistency,
        token: &[u8],
    ) -> Result<pb::GetResponse, Status> {
        check_key(key)?;
        let group = self.consensus.group_map().group_of(key);
        match consistency {
            pb::Consistency::Unspecified | pb::Consistency::Linearizable
                if crate::faults::skip_read_barrier() => {}
            pb::Consistency::Unspecified | pb::Consistency::Linearizable => self
                .consensus
                .read_barrier(group)
                .await
                .map_err(|e| self.unavailable(e))?,
            pb::Consistency::Serializable => {}
            pb::Consistency::Causal => {
                let token = SessionToken::decode(token).map_err(invalid)?;
                self.await_token(&token, group).await?;
            }
        }
        let (value, vv) = {
            let local = lock(&self.local);
            (
                local.replica().read(key),
                local.replica().version_vector().clone(),
            )
        };
        let token = SessionToken {
            vv,
            groups: BTreeMap::from([(group, self.applied_index(group))]),
        }
        .encode();
        let value = value.and_then(value_to_pb);
        Ok(pb::GetResponse {
            found: value.is_some(),
            value,
            token,
        })
    }
}
