//! Causal session tokens: what a client has seen, in a form any node can wait for.
//!
//! A token names facts (a version vector: per origin, the highest sequence) and Raft
//! positions (per group, a log index). A node serves a CAUSAL read once its replica has
//! applied every named fact and, for the key's group, reached the named index: the client
//! then reads its own writes and never goes back in time, whichever node it asks.
//! Tokens are opaque to clients: a format byte, then postcard.

use calm_kernel::{FactId, VersionVector};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const TOKEN_FORMAT: u8 = 1;
/// Largest token accepted (a version vector of thousands of origins fits).
pub const TOKEN_BYTES_MAX: usize = 64 * 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionToken {
    pub vv: VersionVector,
    /// Raft group -> log index.
    pub groups: BTreeMap<u64, u64>,
}

impl SessionToken {
    pub fn of_fact(id: FactId) -> SessionToken {
        let mut vv = VersionVector::new();
        vv.raise(id.origin, id.seq);
        SessionToken {
            vv,
            groups: BTreeMap::new(),
        }
    }

    pub fn of_entry(group: u64, index: u64) -> SessionToken {
        SessionToken {
            vv: VersionVector::new(),
            groups: BTreeMap::from([(group, index)]),
        }
    }

    /// Everything either token names (what a client holding both has seen).
    pub fn merge(&mut self, other: &SessionToken) {
        self.vv.merge(&other.vv);
        for (&g, &i) in &other.groups {
            let slot = self.groups.entry(g).or_default();
            *slot = (*slot).max(i);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![TOKEN_FORMAT];
        postcard::to_io(self, &mut out).expect("encoding into a Vec cannot fail");
        out
    }

    /// An empty token names nothing (a fresh session).
    pub fn decode(bytes: &[u8]) -> Result<SessionToken, String> {
        if bytes.is_empty() {
            return Ok(SessionToken::default());
        }
        if bytes.len() > TOKEN_BYTES_MAX {
            return Err(format!(
                "the session token is {} bytes, more than any calm node issues ({TOKEN_BYTES_MAX}); pass the token from a response unchanged",
                bytes.len()
            ));
        }
        match bytes.split_first() {
            Some((&TOKEN_FORMAT, body)) => postcard::from_bytes(body).map_err(|e| {
                format!("the session token does not decode ({e}); pass the token from a response unchanged")
            }),
            _ => Err("the session token is not one calm issued (unknown format); pass the token from a response unchanged".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_merge() {
        let mut a = SessionToken::of_fact(FactId { origin: 2, seq: 7 });
        a.merge(&SessionToken::of_entry(3, 40));
        a.merge(&SessionToken::of_entry(3, 12));
        assert_eq!(SessionToken::decode(&a.encode()).unwrap(), a);
        assert_eq!(a.vv.get(2), 7);
        assert_eq!(a.groups[&3], 40);
        assert_eq!(SessionToken::decode(&[]).unwrap(), SessionToken::default());
        assert!(
            SessionToken::decode(&[9, 1, 2])
                .unwrap_err()
                .contains("unknown format")
        );
        assert!(SessionToken::decode(&[TOKEN_FORMAT, 0xff]).is_err());
    }
}
