//! What a data directory records about the cluster it was created for: `cluster.toml`.
//!
//! Written the first time a node starts on a directory, read on every later start:
//!
//! - **the data group count.** Keys hash onto the data groups (`1 + BLAKE3(subject) mod
//!   count`), so the count is fixed when a cluster is created: a node that came back with
//!   another count would look for its keys in other groups, and whatever the old groups had
//!   committed but not applied would be out of reach. No `raft.data_groups` setting: the
//!   recorded count; a different setting: the node refuses to start.
//! - **the hash-tag rule.** Whether a key's subject, which chooses its group, is its hash
//!   tag (`{user:7}:a` -> `user:7`, docs/subjects.md) or the whole key. Fixed like the count,
//!   for the same reason: keys with a tag would change group. New clusters record it on
//!   (`hash_tags = true`); records without the line (every cluster created before hash tags)
//!   mean off. Setting `raft.hash_tags` to the other rule is the opt-in: the node switches
//!   (rewrites the record) only once it has checked that no key it holds changes group
//!   (`calm_raft::consensus::GroupMap::subject`), else it refuses to start and names them.
//! - **the cluster's identity**: its id, this node's id and the member list the cluster was
//!   created with (like etcd's cluster id and member directory). A node started with another
//!   member list (an extra member, a mistyped address, `calm dev --nodes 5` on a 3-node
//!   directory) or another `--id` refuses to start and names both, instead of running with a
//!   membership its peers do not share; every peer call carries the cluster id, and peers
//!   refuse calls of another cluster (`calm_raft::consensus::service::check_cluster`).
//!
//! The cluster id is derived from the initial member list (BLAKE3 of the sorted members), so
//! every node of a new cluster computes the same id without talking to the others, and a
//! node given a different list, on a new directory, computes a different id and is refused
//! by the cluster's peers.
//!
//! A new cluster without the setting gets one data group per member: each node leads one
//! group (the leaders spread over the nodes), and every group's leader coalesces as many
//! commands per log entry as it can (docs/benchmarks.md, "Fewer data groups").
//! Directories written before the record existed hold 8 groups, the default then; those
//! written before it held the identity get it recorded from the first start with this code.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::config::Member;
use calm_kernel::NodeId;
use calm_raft::consensus::DATA_GROUPS_MAX;
use calm_raft::local::WAL_DIR;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The record's file name inside a node's data directory.
pub const CLUSTER_RECORD_FILE: &str = "cluster.toml";

/// The data group count of directories created before the count was recorded (the default
/// then).
pub const LEGACY_DATA_GROUPS: u64 = 8;

/// A cluster's identity: derived from the member list it was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClusterId(pub u64);

impl ClusterId {
    /// The id of a cluster created with `members` (order does not matter).
    pub fn of(members: &[Member]) -> ClusterId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"calm cluster v1\n");
        for m in sorted(members) {
            hasher.update(format!("{}={},{}\n", m.id, m.peer, m.client).as_bytes());
        }
        let hash = hasher.finalize();
        ClusterId(u64::from_le_bytes(
            hash.as_bytes()[..8].try_into().expect("8 bytes"),
        ))
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for ClusterId {
    type Err = String;
    fn from_str(text: &str) -> Result<ClusterId, String> {
        if text.len() != 16 {
            return Err(format!("cluster id '{text}' is not 16 hex digits"));
        }
        u64::from_str_radix(text, 16)
            .map(ClusterId)
            .map_err(|_| format!("cluster id '{text}' is not 16 hex digits"))
    }
}

fn sorted(members: &[Member]) -> Vec<&Member> {
    let mut sorted: Vec<&Member> = members.iter().collect();
    sorted.sort_by_key(|m| m.id);
    sorted
}

/// `1=PEER,CLIENT 2=...`: a member list as the `--member` flags spell it.
pub fn members_text(members: &[Member]) -> String {
    sorted(members)
        .iter()
        .map(|m| format!("{}={},{}", m.id, m.peer, m.client))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterRecord {
    data_groups: u64,
    /// Absent (off) in records written before hash tags.
    #[serde(default, skip_serializing_if = "is_false")]
    hash_tags: bool,
    /// Absent in records written before identities were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_id: Option<NodeId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    members: Vec<Member>,
}

/// What the node runs with, as settled with its data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub data_groups: u64,
    /// The recorded hash-tag rule (see [`switch_hash_tags`] for changing it).
    pub hash_tags: bool,
    pub cluster_id: ClusterId,
    /// True when this start created the directory's record: a new cluster's node (or one
    /// whose directory was wiped).
    pub created: bool,
}

#[derive(Debug, Error)]
pub enum ClusterRecordError {
    #[error(
        "{path} records {recorded} data groups for this cluster, but raft.data_groups = {configured}: the count is fixed when a cluster is created (keys hash onto it); remove the setting or set it to {recorded}"
    )]
    Changed {
        path: PathBuf,
        recorded: u64,
        configured: u64,
    },
    #[error(
        "{path} is the data directory of node {recorded} of cluster {cluster}, but this node was started as node {configured}: start node {recorded} on it, or give node {configured} a data directory of its own"
    )]
    OtherNode {
        path: PathBuf,
        cluster: String,
        recorded: NodeId,
        configured: NodeId,
    },
    #[error(
        "{path}: this node's cluster ({cluster}) was created with the members {recorded}, but this node was started with {configured} ({difference}). Start every node with the member list the cluster was created with (the same --member flags); a member list cannot be changed by restarting with other flags. For a new cluster, use empty data directories"
    )]
    OtherMembers {
        path: PathBuf,
        cluster: String,
        recorded: String,
        configured: String,
        difference: String,
    },
    #[error(
        "cannot read {path}: {reason}; it records the cluster's data group count and identity (see a healthy node's copy): restore it from another node's data directory and set node_id to this node's id"
    )]
    Unreadable { path: PathBuf, reason: String },
    #[error(
        "{path} records hash tags {}, and raft.hash_tags = {hash_tags} asks to switch, but {count} keys this node holds would move to another group ({examples}): the switch would leave their state behind. Delete or rename them (without braces, or with the tag as their whole key) before switching, or remove the setting",
        if *hash_tags { "off" } else { "on" }
    )]
    TagsWouldMove {
        path: PathBuf,
        hash_tags: bool,
        count: usize,
        examples: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Check, without writing anything, that a node `node_id` with `members` may start on
/// `data_dir`: a directory without a record may; one with a record must name this node and
/// these members. `calm dev` checks every node before it starts any, so that a mismatch
/// leaves no half-started cluster behind.
pub fn check(
    data_dir: &Path,
    node_id: NodeId,
    members: &[Member],
) -> Result<(), ClusterRecordError> {
    let path = data_dir.join(CLUSTER_RECORD_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ClusterRecordError::Unreadable {
                path,
                reason: e.to_string(),
            });
        }
    };
    let record = parse(&text).map_err(|reason| ClusterRecordError::Unreadable {
        path: path.clone(),
        reason,
    })?;
    match &record.cluster_id {
        Some(cluster) => check_identity(&path, cluster, &record, node_id, members),
        None => Ok(()),
    }
}

fn check_identity(
    path: &Path,
    cluster: &str,
    record: &ClusterRecord,
    node_id: NodeId,
    members: &[Member],
) -> Result<(), ClusterRecordError> {
    if let Some(recorded) = record.node_id
        && recorded != node_id
    {
        return Err(ClusterRecordError::OtherNode {
            path: path.to_path_buf(),
            cluster: cluster.to_string(),
            recorded,
            configured: node_id,
        });
    }
    if sorted(&record.members) != sorted(members) {
        return Err(ClusterRecordError::OtherMembers {
            path: path.to_path_buf(),
            cluster: cluster.to_string(),
            recorded: members_text(&record.members),
            configured: members_text(members),
            difference: difference(&record.members, members),
        });
    }
    Ok(())
}

/// Settle what this node runs with against what `data_dir` records (see the module docs),
/// recording it durably first if the directory has no record, or a record without the
/// identity. Call it before the node opens its WAL: a directory without one is a new
/// cluster's.
pub fn settle(
    data_dir: &Path,
    node_id: NodeId,
    members: &[Member],
    configured_groups: Option<u64>,
    configured_tags: Option<bool>,
) -> Result<Settled, ClusterRecordError> {
    let path = data_dir.join(CLUSTER_RECORD_FILE);
    let configured_id = ClusterId::of(members);
    let recorded = match fs::read_to_string(&path) {
        Ok(text) => Some(
            parse(&text).map_err(|reason| ClusterRecordError::Unreadable {
                path: path.clone(),
                reason,
            })?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(ClusterRecordError::Unreadable {
                path,
                reason: e.to_string(),
            });
        }
    };
    let Some(mut record) = recorded else {
        let existing = data_dir.join(WAL_DIR).exists();
        let data_groups = configured_groups.unwrap_or(if existing {
            LEGACY_DATA_GROUPS
        } else {
            default_data_groups(members.len())
        });
        // A directory with data but no record predates hash tags.
        let hash_tags = configured_tags.unwrap_or(!existing);
        write(&path, &identity(data_groups, hash_tags, node_id, members))?;
        return Ok(Settled {
            data_groups,
            hash_tags,
            cluster_id: configured_id,
            created: true,
        });
    };
    if let Some(configured) = configured_groups
        && configured != record.data_groups
    {
        return Err(ClusterRecordError::Changed {
            path,
            recorded: record.data_groups,
            configured,
        });
    }
    let Some(cluster) = &record.cluster_id else {
        // Recorded before identities were: what this start was given becomes the identity.
        record = identity(record.data_groups, record.hash_tags, node_id, members);
        write(&path, &record)?;
        return Ok(Settled {
            data_groups: record.data_groups,
            hash_tags: record.hash_tags,
            cluster_id: configured_id,
            created: false,
        });
    };
    let cluster_id: ClusterId =
        cluster
            .parse()
            .map_err(|reason| ClusterRecordError::Unreadable {
                path: path.clone(),
                reason,
            })?;
    check_identity(&path, cluster, &record, node_id, members)?;
    Ok(Settled {
        data_groups: record.data_groups,
        hash_tags: record.hash_tags,
        cluster_id,
        created: false,
    })
}

fn identity(
    data_groups: u64,
    hash_tags: bool,
    node_id: NodeId,
    members: &[Member],
) -> ClusterRecord {
    ClusterRecord {
        data_groups,
        hash_tags,
        cluster_id: Some(ClusterId::of(members).to_string()),
        node_id: Some(node_id),
        members: sorted(members).into_iter().cloned().collect(),
    }
}

/// What differs between the recorded and the configured member lists, in words.
fn difference(recorded: &[Member], configured: &[Member]) -> String {
    let by_id = |members: &[Member]| -> BTreeMap<NodeId, Member> {
        members.iter().map(|m| (m.id, m.clone())).collect()
    };
    let (old, new) = (by_id(recorded), by_id(configured));
    let mut parts = Vec::new();
    for (id, m) in &new {
        match old.get(id) {
            None => parts.push(format!("node {id} is not a member")),
            Some(o) if o.peer != m.peer => parts.push(format!(
                "node {id}'s peer address is {} here but {} in the cluster",
                m.peer, o.peer
            )),
            Some(o) if o.client != m.client => parts.push(format!(
                "node {id}'s client address is {} here but {} in the cluster",
                m.client, o.client
            )),
            Some(_) => {}
        }
    }
    for id in old.keys().filter(|id| !new.contains_key(id)) {
        parts.push(format!("member {id} is missing"));
    }
    parts.join("; ")
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Switch the recorded hash-tag rule of `data_dir` to `hash_tags`, the opt-in of a cluster
/// created with the other rule. `keys` are every key the node holds (its recovered replica):
/// if any would change group, nothing is written and the error names them (rename or delete
/// them under the old rule first). Every node of the cluster must switch (peers with
/// another rule refuse each other's calls), so stop them all cleanly, set `raft.hash_tags`
/// on each and start them.
pub fn switch_hash_tags<'k>(
    data_dir: &Path,
    map: calm_raft::consensus::GroupMap,
    hash_tags: bool,
    keys: impl Iterator<Item = &'k [u8]>,
) -> Result<(), ClusterRecordError> {
    let path = data_dir.join(CLUSTER_RECORD_FILE);
    let new = map.with_hash_tags(hash_tags);
    let mut moved = Vec::new();
    let mut count = 0usize;
    for key in keys {
        if map.group_of(key) != new.group_of(key) {
            count += 1;
            if moved.len() < 5 {
                moved.push(calm_kernel::refusal::DisplayKey(key).to_string());
            }
        }
    }
    if count > 0 {
        return Err(ClusterRecordError::TagsWouldMove {
            path,
            hash_tags,
            count,
            examples: moved.join(", "),
        });
    }
    let text = fs::read_to_string(&path).map_err(|e| ClusterRecordError::Unreadable {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut record = parse(&text).map_err(|reason| ClusterRecordError::Unreadable {
        path: path.clone(),
        reason,
    })?;
    record.hash_tags = hash_tags;
    write(&path, &record)
}

/// A new cluster's data group count without a setting: one per member.
pub fn default_data_groups(members: usize) -> u64 {
    (members as u64).clamp(1, DATA_GROUPS_MAX)
}

fn parse(text: &str) -> Result<ClusterRecord, String> {
    let record: ClusterRecord = toml::from_str(text).map_err(|e| e.message().to_string())?;
    if !(1..=DATA_GROUPS_MAX).contains(&record.data_groups) {
        return Err(format!(
            "data_groups = {} is not within 1..={DATA_GROUPS_MAX}",
            record.data_groups
        ));
    }
    Ok(record)
}

/// Writes the record durably and atomically (`calm_raft::durable_file`).
fn write(path: &Path, record: &ClusterRecord) -> Result<(), ClusterRecordError> {
    let text = format!(
        "# Written when this data directory was created; read on every start.\n\
         # Keys hash onto the data groups, so the count cannot change for an existing cluster;\n\
         # the cluster id is derived from the members it was created with.\n\
         {}",
        toml::to_string(record).expect("a record serializes")
    );
    calm_raft::durable_file::replace(path, text.as_bytes()).map_err(|source| {
        ClusterRecordError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u64) -> Vec<Member> {
        (1..=n)
            .map(|id| Member {
                id,
                peer: format!("127.0.0.1:{}", 7100 + id),
                client: format!("127.0.0.1:{}", 7000 + id),
            })
            .collect()
    }

    #[test]
    fn a_new_directory_records_one_group_per_member_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let settled = settle(dir.path(), 1, &members(3), None, None).unwrap();
        assert_eq!(settled.data_groups, 3);
        assert!(settled.created);
        let text = fs::read_to_string(dir.path().join(CLUSTER_RECORD_FILE)).unwrap();
        assert!(text.contains("data_groups = 3"), "{text}");
        assert!(text.contains("node_id = 1"), "{text}");

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            settle(dir.path(), 1, &members(3), Some(16), None)
                .unwrap()
                .data_groups,
            16
        );
        assert_eq!(default_data_groups(1), 1);
        assert_eq!(default_data_groups(0), 1);
        assert_eq!(
            default_data_groups(DATA_GROUPS_MAX as usize + 5),
            DATA_GROUPS_MAX
        );
    }

    #[test]
    fn later_starts_keep_the_recorded_count_and_refuse_another() {
        let dir = tempfile::tempdir().unwrap();
        let m = members(3);
        assert_eq!(
            settle(dir.path(), 2, &m, Some(5), None)
                .unwrap()
                .data_groups,
            5
        );
        // Unset, or set to the same count: the record wins.
        let again = settle(dir.path(), 2, &m, None, None).unwrap();
        assert_eq!((again.data_groups, again.created), (5, false));
        assert_eq!(
            settle(dir.path(), 2, &m, Some(5), None)
                .unwrap()
                .data_groups,
            5
        );
        let e = settle(dir.path(), 2, &m, Some(3), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("records 5 data groups") && e.contains("raft.data_groups = 3"),
            "{e}"
        );
        assert!(e.contains("set it to 5"), "{e}");
    }

    #[test]
    fn every_node_of_a_new_cluster_derives_the_same_id_and_another_list_another() {
        let m = members(3);
        let mut reversed = m.clone();
        reversed.reverse();
        assert_eq!(ClusterId::of(&m), ClusterId::of(&reversed));
        let mut typo = m.clone();
        typo[1].peer = "127.0.0.1:7112".into();
        assert_ne!(ClusterId::of(&m), ClusterId::of(&typo));
        assert_ne!(ClusterId::of(&m), ClusterId::of(&members(5)));
        let id = ClusterId::of(&m);
        assert_eq!(id.to_string().parse::<ClusterId>().unwrap(), id);
        assert!("xyz".parse::<ClusterId>().is_err());

        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = settle(a.path(), 1, &m, None, None).unwrap();
        let sb = settle(b.path(), 2, &reversed, None, None).unwrap();
        assert_eq!(sa.cluster_id, sb.cluster_id);
        // The id stays what it was at creation.
        assert_eq!(settle(a.path(), 1, &m, None, None).unwrap().cluster_id, id);
    }

    #[test]
    fn another_member_list_or_node_id_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let m = members(3);
        settle(dir.path(), 1, &m, None, None).unwrap();

        let e = settle(dir.path(), 1, &members(5), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&members_text(&m)), "{e}");
        assert!(e.contains(&members_text(&members(5))), "{e}");
        assert!(
            e.contains("node 4 is not a member") && e.contains("node 5 is not a member"),
            "{e}"
        );
        assert!(e.contains("empty data directories"), "{e}");

        let mut typo = m.clone();
        typo[2].client = "127.0.0.1:7013".into();
        let e = settle(dir.path(), 1, &typo, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node 3's client address is 127.0.0.1:7013 here but 127.0.0.1:7003"),
            "{e}"
        );
        let e = settle(dir.path(), 1, &m[..2], None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("member 3 is missing"), "{e}");

        let e = settle(dir.path(), 2, &m, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("node 1 of cluster") && e.contains("started as node 2"),
            "{e}"
        );
        // Nothing of that changed the record.
        assert!(settle(dir.path(), 1, &m, None, None).is_ok());
    }

    #[test]
    fn a_directory_from_before_the_record_keeps_the_old_default() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(WAL_DIR)).unwrap();
        let m = members(3);
        assert_eq!(
            settle(dir.path(), 1, &m, None, None).unwrap().data_groups,
            LEGACY_DATA_GROUPS
        );
        // Recorded now, so a later start without the WAL check gives the same answer.
        assert_eq!(
            settle(dir.path(), 1, &m, None, None).unwrap().data_groups,
            LEGACY_DATA_GROUPS
        );
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(WAL_DIR)).unwrap();
        assert_eq!(
            settle(dir.path(), 1, &m, Some(4), None)
                .unwrap()
                .data_groups,
            4
        );
    }

    #[test]
    fn new_clusters_record_hash_tags_old_ones_keep_them_off_until_a_checked_switch() {
        use calm_raft::consensus::GroupMap;
        let m = members(3);
        let dir = tempfile::tempdir().unwrap();
        let new = settle(dir.path(), 1, &m, None, None).unwrap();
        assert!(new.hash_tags);
        let text = fs::read_to_string(dir.path().join(CLUSTER_RECORD_FILE)).unwrap();
        assert!(text.contains("hash_tags = true"), "{text}");
        // A record from before hash tags (no line) means off, whatever is configured: the
        // node switches only through `switch_hash_tags`.
        let old = tempfile::tempdir().unwrap();
        let path = old.path().join(CLUSTER_RECORD_FILE);
        fs::write(&path, "data_groups = 8\n").unwrap();
        assert!(
            !settle(old.path(), 1, &m, None, Some(true))
                .unwrap()
                .hash_tags
        );
        let map = GroupMap::new(8).with_hash_tags(false);
        // Find a braced key that would move, and one that would not.
        let moving = (0..64)
            .map(|i| format!("{{user:{i}}}:balance"))
            .find(|k| map.group_of(k.as_bytes()) != map.with_hash_tags(true).group_of(k.as_bytes()))
            .unwrap();
        let keys = [b"plain".as_slice(), moving.as_bytes()];
        let e = switch_hash_tags(old.path(), map, true, keys.into_iter())
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 keys") && e.contains(&moving), "{e}");
        assert!(
            !settle(old.path(), 1, &m, None, None).unwrap().hash_tags,
            "unchanged"
        );
        switch_hash_tags(old.path(), map, true, [b"plain".as_slice()].into_iter()).unwrap();
        assert!(settle(old.path(), 1, &m, None, None).unwrap().hash_tags);
        // A directory with data but no record predates hash tags too.
        let legacy = tempfile::tempdir().unwrap();
        fs::create_dir(legacy.path().join(WAL_DIR)).unwrap();
        assert!(!settle(legacy.path(), 1, &m, None, None).unwrap().hash_tags);
    }

    #[test]
    fn a_record_without_identity_gets_it_from_the_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLUSTER_RECORD_FILE);
        fs::write(&path, "data_groups = 5\n").unwrap();
        let m = members(3);
        let settled = settle(dir.path(), 3, &m, None, None).unwrap();
        assert_eq!(
            (settled.data_groups, settled.cluster_id, settled.created),
            (5, ClusterId::of(&m), false)
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("node_id = 3") && text.contains("[[members]]"),
            "{text}"
        );
        assert!(settle(dir.path(), 3, &members(4), None, None).is_err());
    }

    #[test]
    fn a_damaged_record_stops_the_start_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLUSTER_RECORD_FILE);
        for text in [
            "data_groups = 0\n",
            "data_groups = \"x\"\n",
            "groups = 3\n",
            "",
            "data_groups = 3\ncluster_id = \"nothex\"\n",
        ] {
            fs::write(&path, text).unwrap();
            let e = settle(dir.path(), 1, &members(3), None, None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("cannot read") && e.contains("restore it"),
                "{text:?}: {e}"
            );
        }
    }
}
