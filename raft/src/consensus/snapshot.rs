//! Per-group snapshots: one group's key states, framed and BLAKE3-verified.
//!
//! A snapshot is what a lagging replica installs instead of log entries the leader purged.
//! It holds the state of every key of one group at one applied log id. Bytes on disk and on
//! the wire are the same frame:
//!
//! ```text
//! magic "CALMSNAP" | format u32 LE | body length u64 LE | body (postcard) | BLAKE3(body) 32 bytes
//! ```
//!
//! The receiver verifies length and hash before decoding anything, so a truncated or altered
//! transfer is rejected with a clear error and nothing is installed. The current snapshot of a
//! group is a file written to a temporary name, fsynced, then renamed over the old one.

use super::types::{GroupId, SnapshotMeta};
use calm_kernel::KeyRecord;
use calm_kernel::lease::GroupLeases;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"CALMSNAP";
/// 2: the metadata group's snapshot carries the rules. 3: data groups' carry their leases.
pub const SNAPSHOT_FORMAT: u32 = 3;
/// The oldest format this build reads (as the current one, without leases).
const SNAPSHOT_FORMAT_MIN: u32 = 2;
const HEADER_BYTES: usize = 8 + 4 + 8;
const HASH_BYTES: usize = 32;
/// Largest snapshot accepted, on disk or over the network.
pub const SNAPSHOT_BYTES_MAX: u64 = 1 << 32;

/// What a snapshot frame holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub group: GroupId,
    pub meta: SnapshotMeta,
    /// Key bytes and their `KeyRecord::encode()` bytes, sorted by key.
    pub keys: Vec<(Vec<u8>, Vec<u8>)>,
    /// The metadata group's state: the rules in force as their TOML text (`None` before
    /// they are set, and in data groups).
    pub rules: Option<String>,
    /// A data group's leases and lease clock (empty in the metadata group).
    pub leases: GroupLeases,
}

/// Format 2's body: the same without leases.
#[derive(Deserialize)]
struct SnapshotBodyV2 {
    group: GroupId,
    meta: SnapshotMeta,
    keys: Vec<(Vec<u8>, Vec<u8>)>,
    rules: Option<String>,
}

impl SnapshotBody {
    pub fn key_states(&self) -> io::Result<Vec<(Vec<u8>, KeyRecord)>> {
        self.keys
            .iter()
            .map(|(k, v)| {
                KeyRecord::decode(v).map(|s| (k.clone(), s)).map_err(|e| {
                    invalid(format!(
                        "snapshot of group {} holds a key state that does not decode ({e})",
                        self.group
                    ))
                })
            })
            .collect()
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Frame `body` for disk or the wire.
pub fn encode(body: &SnapshotBody) -> Vec<u8> {
    let payload = postcard::to_stdvec(body).expect("encoding into a Vec cannot fail");
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len() + HASH_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    out
}

/// Verify and decode a frame. Every check happens before the body is trusted.
pub fn decode(frame: &[u8]) -> io::Result<SnapshotBody> {
    if frame.len() < HEADER_BYTES + HASH_BYTES || &frame[..8] != MAGIC {
        return Err(invalid(
            "not a calm snapshot (bad magic or too short); it was truncated or is another file"
                .into(),
        ));
    }
    let format = u32::from_le_bytes(frame[8..12].try_into().expect("4 bytes"));
    if !(SNAPSHOT_FORMAT_MIN..=SNAPSHOT_FORMAT).contains(&format) {
        return Err(invalid(format!(
            "snapshot format {format}, this build reads {SNAPSHOT_FORMAT_MIN} to {SNAPSHOT_FORMAT}; run matching calm versions"
        )));
    }
    let len = u64::from_le_bytes(frame[12..20].try_into().expect("8 bytes"));
    if len > SNAPSHOT_BYTES_MAX
        || frame.len() as u64 != HEADER_BYTES as u64 + len + HASH_BYTES as u64
    {
        return Err(invalid(format!(
            "snapshot says its body is {len} bytes but the frame is {} bytes; it was truncated in transfer",
            frame.len()
        )));
    }
    let body = &frame[HEADER_BYTES..HEADER_BYTES + len as usize];
    let hash = &frame[HEADER_BYTES + len as usize..];
    if blake3::hash(body).as_bytes() != hash {
        return Err(invalid(
            "snapshot BLAKE3 hash does not match its body; it was corrupted, the leader will send it again"
                .into(),
        ));
    }
    let undecodable = |e: postcard::Error| invalid(format!("snapshot body does not decode ({e})"));
    if format == SNAPSHOT_FORMAT {
        return postcard::from_bytes(body).map_err(undecodable);
    }
    let old: SnapshotBodyV2 = postcard::from_bytes(body).map_err(undecodable)?;
    Ok(SnapshotBody {
        group: old.group,
        meta: old.meta,
        keys: old.keys,
        rules: old.rules,
        leases: GroupLeases::default(),
    })
}

/// Where one group's current snapshot lives.
pub fn path(dir: &Path, group: GroupId) -> PathBuf {
    dir.join(format!("group-{group:05}.snap"))
}

/// Make `frame` the current snapshot of its group: temp file, fsync, rename, fsync dir.
pub fn write(dir: &Path, group: GroupId, frame: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    crate::durable_file::replace(&path(dir, group), frame)
}

/// The current snapshot of `group`, verified; `None` when it has none.
pub fn read(dir: &Path, group: GroupId) -> io::Result<Option<(Vec<u8>, SnapshotBody)>> {
    let frame = match fs::read(path(dir, group)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let body = decode(&frame)?;
    if body.group != group {
        return Err(invalid(format!(
            "snapshot file of group {group} holds group {}; the data directory was tampered with",
            body.group
        )));
    }
    Ok(Some((frame, body)))
}
