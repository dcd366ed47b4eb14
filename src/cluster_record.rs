//! What a data directory records about the cluster it was created for: `cluster.toml`.
//!
//! Keys hash onto the data groups (`1 + BLAKE3(subject) mod count`), so the count is fixed
//! when a cluster is created: a node that came back with another count would look for its
//! keys in other groups, and whatever the old groups had committed but not applied would be
//! out of reach. A node therefore writes the count into its data directory the first time it
//! starts, and every later start takes it from there:
//! - no `raft.data_groups` setting: the recorded count;
//! - a setting equal to it: fine;
//! - a different setting: the node refuses to start and says which count the directory holds.
//!
//! A new cluster without the setting gets one data group per member: each node leads one
//! group (the leaders spread over the nodes), and every group's leader coalesces as many
//! commands per log entry as it can (docs/benchmarks.md, "Fewer data groups").
//! Directories written before this record existed hold 8 groups, the default then, unless the
//! setting said otherwise; the record is written for them on their first start with this code.

use std::fs;
use std::path::{Path, PathBuf};

use calm_raft::consensus::DATA_GROUPS_MAX;
use calm_raft::local::WAL_DIR;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The record's file name inside a node's data directory.
pub const CLUSTER_RECORD_FILE: &str = "cluster.toml";

/// The data group count of directories created before the count was recorded (the default
/// then).
pub const LEGACY_DATA_GROUPS: u64 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterRecord {
    data_groups: u64,
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
        "cannot read {path}: {reason}; it records the cluster's data group count (`data_groups = N`, N in 1..={DATA_GROUPS_MAX}): restore it from another node's data directory"
    )]
    Unreadable { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The data group count this node runs with: the one `data_dir` records, or, for a directory
/// without a record, `configured` or the default (see the module docs), recorded durably
/// before this returns. Call it before the node opens its WAL: a directory without a WAL is
/// a new cluster's.
pub fn settle_data_groups(
    data_dir: &Path,
    configured: Option<u64>,
    members: usize,
) -> Result<u64, ClusterRecordError> {
    let path = data_dir.join(CLUSTER_RECORD_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let recorded = parse(&text).map_err(|reason| ClusterRecordError::Unreadable {
                path: path.clone(),
                reason,
            })?;
            match configured {
                Some(configured) if configured != recorded => Err(ClusterRecordError::Changed {
                    path,
                    recorded,
                    configured,
                }),
                _ => Ok(recorded),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let existing = data_dir.join(WAL_DIR).exists();
            let count = configured.unwrap_or(if existing {
                LEGACY_DATA_GROUPS
            } else {
                default_data_groups(members)
            });
            write(&path, count)?;
            Ok(count)
        }
        Err(e) => Err(ClusterRecordError::Unreadable {
            path,
            reason: e.to_string(),
        }),
    }
}

/// A new cluster's data group count without a setting: one per member.
pub fn default_data_groups(members: usize) -> u64 {
    (members as u64).clamp(1, DATA_GROUPS_MAX)
}

fn parse(text: &str) -> Result<u64, String> {
    let record: ClusterRecord = toml::from_str(text).map_err(|e| e.message().to_string())?;
    if !(1..=DATA_GROUPS_MAX).contains(&record.data_groups) {
        return Err(format!(
            "data_groups = {} is not within 1..={DATA_GROUPS_MAX}",
            record.data_groups
        ));
    }
    Ok(record.data_groups)
}

/// Writes the record durably and atomically (`calm_raft::durable_file`).
fn write(path: &Path, data_groups: u64) -> Result<(), ClusterRecordError> {
    let text = format!(
        "# Written when this data directory was created; read on every start.\n\
         # Keys hash onto the data groups, so the count cannot change for an existing cluster.\n\
         {}",
        toml::to_string(&ClusterRecord { data_groups }).expect("a record serializes")
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

    #[test]
    fn a_new_directory_records_one_group_per_member_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(settle_data_groups(dir.path(), None, 3).unwrap(), 3);
        let text = fs::read_to_string(dir.path().join(CLUSTER_RECORD_FILE)).unwrap();
        assert!(text.contains("data_groups = 3"), "{text}");

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(settle_data_groups(dir.path(), Some(16), 3).unwrap(), 16);
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
        assert_eq!(settle_data_groups(dir.path(), Some(5), 3).unwrap(), 5);
        // Unset, or set to the same count: the record wins; the member count no longer matters.
        assert_eq!(settle_data_groups(dir.path(), None, 3).unwrap(), 5);
        assert_eq!(settle_data_groups(dir.path(), Some(5), 7).unwrap(), 5);
        let e = settle_data_groups(dir.path(), Some(3), 3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("records 5 data groups") && e.contains("raft.data_groups = 3"),
            "{e}"
        );
        assert!(e.contains("set it to 5"), "{e}");
    }

    #[test]
    fn a_directory_from_before_the_record_keeps_the_old_default() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(WAL_DIR)).unwrap();
        assert_eq!(
            settle_data_groups(dir.path(), None, 3).unwrap(),
            LEGACY_DATA_GROUPS
        );
        // Recorded now, so a later start without the WAL check gives the same answer.
        assert_eq!(
            settle_data_groups(dir.path(), None, 3).unwrap(),
            LEGACY_DATA_GROUPS
        );
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(WAL_DIR)).unwrap();
        assert_eq!(settle_data_groups(dir.path(), Some(4), 3).unwrap(), 4);
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
        ] {
            fs::write(&path, text).unwrap();
            let e = settle_data_groups(dir.path(), None, 3)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("cannot read") && e.contains("restore it"),
                "{text:?}: {e}"
            );
        }
    }
}
