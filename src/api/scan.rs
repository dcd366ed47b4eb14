//! `Kv.Scan`: the keys of a prefix or range, in key order, one bounded page per call.
//!
//! Keys hash over the data groups, so a range has keys in every group; this node's replica
//! holds all of them, and `calm_raft::scan` reads them in order (from the state store's
//! sorted keys merged with what it has not persisted yet, at no memory cost per key). What
//! this file adds is the consistency of the page:
//!
//! - LINEARIZABLE: read the page, then ask every data group for its read index (in
//!   parallel). If no group's read index is past the applied index the page reflects, every
//!   write acknowledged before the call (committed at or below the read index) is in it, and
//!   nothing committed between the read and the check: the page is linearizable and the
//!   state of every group at one instant (`atomic`), for one round of read indexes. If some
//!   group moved, wait until this node applied its read index and read again, up to
//!   [`CUT_ATTEMPTS_MAX`] checks; a page read after such a wait but not confirmed is still
//!   linearizable key by key (every value reflects a read index taken after the call began),
//!   not one cut. Reading before confirming is what makes the check free: a read index
//!   first and another after would cost two rounds. Without the check, keys of two groups
//!   are read as this node applied them, and a write of group B that began after a write of
//!   group A finished could be seen without it.
//! - SERIALIZABLE: this node's replica as it is.
//! - CAUSAL: once this node applied what the token names, on every group.
//!
//! A page token is the next key to read with a fingerprint of the range, so a token used
//! with another range is refused rather than silently reading the wrong keys.

use super::ops::value_to_pb;
use super::{KEY_BYTES_MAX, invalid, pb};
use crate::node::Node;
use crate::token::SessionToken;
use calm_raft::scan::{Chunk, ChunkLimits, KeyRange, read_chunk};
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::Status;

/// Keys in a page when the request names no limit.
pub const SCAN_LIMIT_DEFAULT: usize = 1_000;
/// Most keys a page may be asked for.
pub const SCAN_LIMIT_MAX: usize = 10_000;
/// A page stops once its keys and values reach this (a 1 MiB value still fits whole).
pub const SCAN_PAGE_BYTES_MAX: usize = 4 << 20;
/// Keys a count_only scan looks at per hold of the state lock.
const COUNT_CHUNK_KEYS: usize = 4_096;
/// Checks of a LINEARIZABLE page before it is answered without being one cut.
pub const CUT_ATTEMPTS_MAX: usize = 3;
/// Format byte in front of a page token.
const PAGE_TOKEN_FORMAT: u8 = 1;
const FINGERPRINT_BYTES: usize = 8;

/// A checked scan request.
struct Scan {
    range: KeyRange,
    /// Where this page starts (inclusive).
    from: Vec<u8>,
    limit: usize,
    keys_only: bool,
    count_only: bool,
    consistency: pb::Consistency,
    token: Vec<u8>,
}

/// What identifies a range in its page tokens.
fn fingerprint(range: &KeyRange) -> [u8; FINGERPRINT_BYTES] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(range.start.len() as u64).to_le_bytes());
    hasher.update(&range.start);
    match &range.end {
        Some(end) => hasher.update(&[1]).update(end),
        None => hasher.update(&[0]),
    };
    hasher.finalize().as_bytes()[..FINGERPRINT_BYTES]
        .try_into()
        .expect("8 bytes")
}

fn page_token(range: &KeyRange, next: &[u8]) -> Vec<u8> {
    let mut token = Vec::with_capacity(1 + FINGERPRINT_BYTES + next.len());
    token.push(PAGE_TOKEN_FORMAT);
    token.extend_from_slice(&fingerprint(range));
    token.extend_from_slice(next);
    token
}

fn check_bound(what: &str, bytes: &[u8]) -> Result<(), Status> {
    // A bound may be one byte longer than a key: the end of a prefix of a longest key.
    if bytes.len() > KEY_BYTES_MAX + 1 {
        return Err(invalid(format!(
            "the scan's {what} is {} bytes; keys are at most {KEY_BYTES_MAX} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

impl Scan {
    fn linearizable(&self) -> bool {
        matches!(
            self.consistency,
            pb::Consistency::Unspecified | pb::Consistency::Linearizable
        )
    }

    fn parse(req: pb::ScanRequest) -> Result<Scan, Status> {
        check_bound("prefix", &req.prefix)?;
        check_bound("start", &req.start)?;
        check_bound("end", &req.end)?;
        let range = if req.prefix.is_empty() {
            if !req.end.is_empty() && req.end <= req.start {
                return Err(invalid(
                    "the scan's end is not after its start; give end > start, or an empty end for no upper bound",
                ));
            }
            KeyRange {
                start: req.start,
                end: (!req.end.is_empty()).then_some(req.end),
            }
        } else {
            if !req.start.is_empty() || !req.end.is_empty() {
                return Err(invalid(
                    "the scan has both a prefix and a start or end; give a prefix, or a [start, end) range",
                ));
            }
            KeyRange::prefix(&req.prefix)
        };
        let limit = match req.limit as usize {
            0 => SCAN_LIMIT_DEFAULT,
            n if n > SCAN_LIMIT_MAX => {
                return Err(invalid(format!(
                    "the scan's limit is {n}; ask for at most {SCAN_LIMIT_MAX} keys per page and follow next_page_token"
                )));
            }
            n => n,
        };
        let consistency = pb::Consistency::try_from(req.consistency).map_err(|_| {
            invalid(format!(
                "consistency {} is not one of LINEARIZABLE (1), SERIALIZABLE (2), CAUSAL (3)",
                req.consistency
            ))
        })?;
        let from = if req.page_token.is_empty() {
            range.start.clone()
        } else {
            let t = &req.page_token;
            let valid = t.len() > FINGERPRINT_BYTES
                && t[0] == PAGE_TOKEN_FORMAT
                && t[1..=FINGERPRINT_BYTES] == fingerprint(&range);
            let from = t.get(1 + FINGERPRINT_BYTES..).unwrap_or_default();
            if !valid || !range.contains(from) {
                return Err(invalid(
                    "the page_token is not one this range's scan returned; pass the next_page_token of the previous page with the same prefix, start and end",
                ));
            }
            from.to_vec()
        };
        Ok(Scan {
            range,
            from,
            limit,
            keys_only: req.keys_only,
            count_only: req.count_only,
            consistency,
            token: req.token,
        })
    }
}

impl Node {
    pub async fn scan(&self, req: pb::ScanRequest) -> Result<pb::ScanResponse, Status> {
        let scan = Scan::parse(req)?;
        let groups: Vec<u64> = (1..=self.consensus.group_map().data_groups()).collect();
        let linearizable = scan.linearizable();
        let stale_reads = linearizable && crate::faults::skip_read_barrier();
        match scan.consistency {
            // A count reads many chunks: the read index comes first, as for Get.
            _ if linearizable && scan.count_only && !stale_reads => {
                let barriers = groups.iter().map(|&g| self.consensus.read_barrier(g));
                for result in futures::future::join_all(barriers).await {
                    result.map_err(|e| self.unavailable(e))?;
                }
            }
            pb::Consistency::Causal => {
                let token = SessionToken::decode(&scan.token).map_err(invalid)?;
                for &group in &groups {
                    self.await_token(&token, group).await?;
                }
            }
            _ => {}
        }
        if scan.count_only {
            return self.count(&scan, &groups).await;
        }
        let limits = ChunkLimits {
            keys_max: scan.limit,
            bytes_max: SCAN_PAGE_BYTES_MAX,
            values: !scan.keys_only,
        };
        // LINEARIZABLE pages are read first and confirmed after (module docs): when no group's
        // read index is past what the page reflects, one round of read indexes made the page
        // linearizable and one cut at once. Otherwise wait to apply those indexes and read
        // again; the last read, after such a wait, is linearizable key by key.
        let mut checks = 0;
        let (chunk, atomic) = loop {
            let chunk = self.read_chunk(&scan.range, &scan.from, limits).await?;
            if !linearizable || stale_reads {
                break (chunk, false);
            }
            if checks == CUT_ATTEMPTS_MAX {
                break (chunk, false);
            }
            checks += 1;
            let moved = self.moved_past(&groups, &chunk.applied).await?;
            if moved.is_empty() {
                break (chunk, true);
            }
            let deadline = tokio::time::Instant::now()
                + Duration::from_millis(self.config.raft.request_timeout_ms);
            for (group, index) in moved {
                if !self.await_applied(group, index, deadline).await {
                    return Err(Status::unavailable(format!(
                        "node {} did not apply group {group} up to its read index {index} within {} ms (it is behind its leader); retry, or scan on another node",
                        self.id(),
                        self.config.raft.request_timeout_ms
                    )));
                }
            }
        };
        metrics::counter!("calm_scan_keys_total").increment(chunk.entries.len() as u64);
        Ok(pb::ScanResponse {
            next_page_token: chunk
                .resume
                .as_deref()
                .map(|next| page_token(&scan.range, next))
                .unwrap_or_default(),
            token: token_of(&chunk),
            atomic,
            count: 0,
            entries: chunk
                .entries
                .into_iter()
                .map(|(key, value)| pb::KeyValue {
                    key,
                    value: value.and_then(value_to_pb),
                })
                .collect(),
        })
    }

    /// count_only: chunk after chunk to the range's end. One cut only if no group's applied
    /// index moved between the chunks and none committed past them.
    async fn count(&self, scan: &Scan, groups: &[u64]) -> Result<pb::ScanResponse, Status> {
        let limits = ChunkLimits {
            keys_max: COUNT_CHUNK_KEYS,
            bytes_max: usize::MAX,
            values: false,
        };
        let mut from = Some(scan.from.clone());
        let (mut count, mut first, mut last) = (0u64, None, None);
        while let Some(start) = from {
            let chunk = self.read_chunk(&scan.range, &start, limits).await?;
            count += chunk.entries.len() as u64;
            from = chunk.resume.clone();
            first.get_or_insert_with(|| chunk.applied.clone());
            last = Some(chunk);
        }
        let last = last.expect("a count reads at least one chunk");
        let atomic = scan.linearizable()
            && first.as_ref() == Some(&last.applied)
            && self.moved_past(groups, &last.applied).await?.is_empty();
        Ok(pb::ScanResponse {
            entries: Vec::new(),
            count,
            next_page_token: Vec::new(),
            token: token_of(&last),
            atomic,
        })
    }

    async fn read_chunk(
        &self,
        range: &KeyRange,
        from: &[u8],
        limits: ChunkLimits,
    ) -> Result<Chunk, Status> {
        let (local, range, from) = (self.local.clone(), range.clone(), from.to_vec());
        let read = tokio::task::spawn_blocking(move || read_chunk(&local, &range, &from, limits));
        match read.await {
            Ok(Ok(chunk)) => Ok(chunk),
            Ok(Err(e)) => Err(Status::internal(format!(
                "node {} cannot read its state store for the scan: {e}",
                self.id()
            ))),
            Err(e) => Err(Status::internal(format!(
                "node {}: the scan's read stopped: {e}",
                self.id()
            ))),
        }
    }

    /// The groups whose read index is past what `applied` reflects, with that index.
    async fn moved_past(
        &self,
        groups: &[u64],
        applied: &BTreeMap<u64, u64>,
    ) -> Result<Vec<(u64, u64)>, Status> {
        let asked = groups.iter().map(|&g| async move {
            let index = self.consensus.read_index(g).await;
            (g, index)
        });
        let mut moved = Vec::new();
        for (group, index) in futures::future::join_all(asked).await {
            let index = index.map_err(|e| self.unavailable(e))?;
            if index > applied.get(&group).copied().unwrap_or(0) {
                moved.push((group, index));
            }
        }
        Ok(moved)
    }
}

/// The causal token of what a chunk observed: its facts and every group's position.
fn token_of(chunk: &Chunk) -> Vec<u8> {
    SessionToken {
        vv: chunk.vv.clone(),
        groups: chunk.applied.clone(),
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prefix: &str, start: &str, end: &str) -> pb::ScanRequest {
        pb::ScanRequest {
            prefix: prefix.into(),
            start: start.into(),
            end: end.into(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_ranges_and_tokens_are_refused_with_what_to_do() {
        let e = |r| Scan::parse(r).err().expect("refused");
        assert!(e(request("a", "b", "")).message().contains("both a prefix"));
        assert!(
            e(request("", "b", "a"))
                .message()
                .contains("end is not after")
        );
        assert!(
            e(request("", "b", "b"))
                .message()
                .contains("end is not after")
        );
        let mut big = request("a", "", "");
        big.limit = SCAN_LIMIT_MAX as u32 + 1;
        assert!(e(big).message().contains("at most 10000"));
        let range = KeyRange::prefix(b"a/");
        let mut other = request("b/", "", "");
        other.page_token = page_token(&range, b"a/x");
        assert!(e(other).message().contains("page_token"));
        let mut outside = request("a/", "", "");
        outside.page_token = page_token(&range, b"b");
        assert_eq!(e(outside).code(), tonic::Code::InvalidArgument);
        let mut good = request("a/", "", "");
        good.page_token = page_token(&range, b"a/x");
        let scan = Scan::parse(good).unwrap();
        assert_eq!((scan.from.as_slice(), scan.limit), (&b"a/x"[..], 1_000));
        let all = Scan::parse(request("", "", "")).unwrap();
        assert_eq!(
            all.range,
            KeyRange {
                start: vec![],
                end: None
            }
        );
    }
}
