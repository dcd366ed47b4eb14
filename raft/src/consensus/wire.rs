//! What travels between peers: the generated gRPC code and the payload encoding.
//!
//! Payloads are postcard encodings of openraft's messages and of calm's forwarding replies,
//! behind a one-byte format tag so that mixing incompatible calm versions fails loudly
//! instead of mis-decoding.

use super::types::{NodeId, Response};
use serde::{Deserialize, Serialize};

tonic::include_proto!("calm.internal.v1");

/// Bumped whenever a payload's encoding changes incompatibly.
pub const WIRE_FORMAT: u8 = 2;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![WIRE_FORMAT];
    postcard::to_io(value, &mut out).expect("encoding into a Vec cannot fail");
    out
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&WIRE_FORMAT, body)) => {
            postcard::from_bytes(body).map_err(|e| format!("payload does not decode ({e})"))
        }
        Some((&other, _)) => Err(format!(
            "peer speaks wire format {other}, this node {WIRE_FORMAT}; run the same calm version on every node"
        )),
        None => Err("empty payload".into()),
    }
}

/// The leader's answer to a forwarded proposal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ProposeReply {
    /// Committed and applied at log `index`; the state machine's answer.
    Applied { response: Response, index: u64 },
    /// Not appended: this node is not the leader; retry at `leader` if known.
    NotLeader { leader: Option<NodeId> },
    /// Appended, then discarded on a leader change: it may still commit (unknown outcome).
    Discarded { leader: Option<NodeId> },
}

/// The leader's answer to a read-index request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ReadIndexReply {
    /// Wait until the local state machine applied this index, then read.
    At {
        index: u64,
    },
    NotLeader {
        leader: Option<NodeId>,
    },
}
