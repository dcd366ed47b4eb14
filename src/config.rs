//! A node's configuration: TOML file < environment (`CALM_*`) < command-line flags.
//!
//! Every node of a cluster is given the same member list (like etcd's `initial-cluster`):
//! each member's id, peer address (Raft and gossip) and client address (the public API).
//! Every node initializes the groups with that list when its data directory is new, which
//! openraft allows for identical lists; the client addresses let any node tell a client where
//! the leader it should retry at listens.
//!
//! Environment variables nest with `__`: `CALM_RAFT__HEARTBEAT_MS=50`.

use crate::gossip::GossipOptions;
use calm_kernel::NodeId;
use calm_raft::consensus::node::ConsensusError;
use calm_raft::consensus::{ConsensusOptions, DATA_GROUPS_MAX};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Beyond these a gossip interval is a mistake: facts would spread slower than any client
/// of the fast path expects.
const GOSSIP_PUSH_INTERVAL_MS_MAX: u64 = 1_000;
const GOSSIP_ANTI_ENTROPY_INTERVAL_MS_MAX: u64 = 60_000;

/// A required setting nobody gave, named as the flag that gives it; other errors as figment
/// words them.
fn missing_setting(error: figment::Error) -> ConfigError {
    if let figment::error::Kind::MissingField(field) = &error.kind {
        let how = match field.as_ref() {
            "id" => "pass --id N (this node's id, >= 1)",
            "data_dir" => "pass --data-dir DIR",
            "client_addr" => "pass --client-addr HOST:PORT (the public API)",
            "peer_addr" => "pass --peer-addr HOST:PORT (Raft and gossip)",
            "http_addr" => "pass --http-addr HOST:PORT (metrics, health, status page)",
            "members" => {
                "pass --member ID=PEER_ADDR,CLIENT_ADDR once for every member, this node included"
            }
            _ => return ConfigError::Load(Box::new(error)),
        };
        return ConfigError::Invalid(format!(
            "no {field} given: {how}, or set `{field}` in the config file (--config) or CALM_{}",
            field.to_uppercase()
        ));
    }
    ConfigError::Load(Box::new(error))
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

/// One member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: NodeId,
    /// Raft and gossip traffic (`host:port`).
    pub peer: String,
    /// The public gRPC API (`host:port`).
    pub client: String,
}

impl Member {
    /// Parse `ID=PEER,CLIENT`, e.g. `1=127.0.0.1:7101,127.0.0.1:7001`.
    pub fn parse(text: &str) -> Result<Member, String> {
        let (id, addrs) = text
            .split_once('=')
            .ok_or_else(|| format!("member '{text}' is not ID=PEER_ADDR,CLIENT_ADDR"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("member '{text}': '{id}' is not a node id (a number >= 1)"))?;
        let (peer, client) = addrs
            .split_once(',')
            .ok_or_else(|| format!("member '{text}' is not ID=PEER_ADDR,CLIENT_ADDR"))?;
        Ok(Member {
            id,
            peer: peer.trim().to_string(),
            client: client.trim().to_string(),
        })
    }
}

/// Raft timing and sizing (the same on every node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct RaftConfig {
    /// Data groups keys hash onto; fixed when the cluster is created, which records it in the
    /// data directory (`cluster.toml`, see `cluster_record`). Unset: the recorded count, or one
    /// group per member for a new cluster.
    pub data_groups: Option<u64>,
    /// Whether hash tags choose keys' subjects (`{user:7}:a` and `{user:7}:b` share a group;
    /// docs/subjects.md). Fixed per cluster like `data_groups` and recorded with it. Unset: the
    /// recorded rule, or on for a new cluster. Set on a cluster that records the other rule:
    /// the node switches only if no key it holds would change group, else refuses to start.
    pub hash_tags: Option<bool>,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_after_entries: u64,
    pub entries_kept_after_snapshot: u64,
    /// How long a proposal or linearizable read may wait for its group.
    pub request_timeout_ms: u64,
    /// How long a leader may hold a commit notice for a follower so that it rides on other
    /// traffic to that follower instead of costing a round trip of its own; followers apply
    /// up to this much later when nothing else goes to them. 0 sends each at once; at most
    /// 50,000.
    pub commit_notice_hold_us: u64,
    /// How often a node hands groups it is not the preferred leader of to their preferred
    /// leader (leaders spread over nodes); 0 disables it.
    pub balance_leaders_interval_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> RaftConfig {
        let c = ConsensusOptions::default();
        RaftConfig {
            data_groups: None,
            hash_tags: None,
            heartbeat_ms: c.heartbeat_ms,
            election_timeout_min_ms: c.election_timeout_min_ms,
            election_timeout_max_ms: c.election_timeout_max_ms,
            snapshot_after_entries: c.snapshot_after_entries,
            entries_kept_after_snapshot: c.entries_kept_after_snapshot,
            request_timeout_ms: c.request_timeout_ms,
            commit_notice_hold_us: c.commit_notice_hold_us,
            balance_leaders_interval_ms: 3_000,
        }
    }
}

impl RaftConfig {
    /// The options of every group; `data_groups` is the setting or, unset, the Raft crate's
    /// default: the node replaces it with the count its data directory records.
    pub fn consensus_options(&self) -> ConsensusOptions {
        ConsensusOptions {
            data_groups: self
                .data_groups
                .unwrap_or(ConsensusOptions::default().data_groups),
            hash_tags: self.hash_tags.unwrap_or(true),
            heartbeat_ms: self.heartbeat_ms,
            election_timeout_min_ms: self.election_timeout_min_ms,
            election_timeout_max_ms: self.election_timeout_max_ms,
            snapshot_after_entries: self.snapshot_after_entries,
            entries_kept_after_snapshot: self.entries_kept_after_snapshot,
            request_timeout_ms: self.request_timeout_ms,
            commit_notice_hold_us: self.commit_notice_hold_us,
        }
    }
}

/// Local durability and housekeeping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct StorageConfig {
    /// How often applied state is written to RocksDB (the WAL makes it durable before that;
    /// this bounds replay after a crash).
    pub persist_interval_ms: u64,
    /// How often a BLAKE3-verified checkpoint is taken (and old WAL segments dropped).
    pub checkpoint_interval_s: u64,
    pub wal_segment_bytes_max: u64,
    /// `auto` (io_uring, else pwrite), `io_uring` or `pwrite`.
    pub wal_backend: String,
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig {
            persist_interval_ms: 200,
            checkpoint_interval_s: 300,
            wal_segment_bytes_max: 64 << 20,
            wal_backend: "auto".into(),
        }
    }
}

/// Fact gossip timing (may differ per node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct GossipConfig {
    /// Batching window of pushes: a peer's push task waits this long after the first fact
    /// it has queued before sending, so facts admitted meanwhile share one RPC and one WAL
    /// append on the receiver. 0 sends at once. Longer windows cost receivers less CPU and
    /// delay convergence by as much.
    pub push_interval_ms: u64,
    /// Period of the anti-entropy round with each peer (repairs what pushes missed).
    pub anti_entropy_interval_ms: u64,
}

impl Default for GossipConfig {
    fn default() -> GossipConfig {
        let g = GossipOptions::default();
        GossipConfig {
            push_interval_ms: g.push_interval_ms,
            anti_entropy_interval_ms: g.anti_entropy_interval_ms,
        }
    }
}

impl GossipConfig {
    pub fn gossip_options(&self) -> GossipOptions {
        GossipOptions {
            push_interval_ms: self.push_interval_ms,
            anti_entropy_interval_ms: self.anti_entropy_interval_ms,
            ..GossipOptions::default()
        }
    }
}

/// Watch streams and the change log they follow (see docs/watch.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct WatchConfig {
    /// Key changes kept in memory for watchers to resume from: a watcher whose token is
    /// older than what this node kept gets OUT_OF_RANGE.
    pub retain_events: usize,
    /// Bytes of those changes kept (keys and values, with ~96 B per event besides).
    pub retain_bytes: usize,
    /// Most watch streams open on this node at once; more are refused (RESOURCE_EXHAUSTED).
    pub watchers_max: usize,
}

impl Default for WatchConfig {
    fn default() -> WatchConfig {
        WatchConfig {
            retain_events: calm_raft::events::EVENTS_MAX_DEFAULT,
            retain_bytes: calm_raft::events::EVENT_BYTES_MAX_DEFAULT,
            watchers_max: 10_000,
        }
    }
}

/// A node's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: NodeId,
    pub data_dir: PathBuf,
    /// Listen address of the public gRPC API.
    pub client_addr: SocketAddr,
    /// Listen address of peer traffic (Raft, gossip). Outgoing peer connections are made from
    /// this address's IP too, so peers see this node under one address.
    pub peer_addr: SocketAddr,
    /// Listen address of /metrics, /healthz, /readyz and the status page.
    pub http_addr: SocketAddr,
    /// Every member, this node included.
    pub members: Vec<Member>,
    /// Rules file used when the cluster is created; the embedded default rules otherwise.
    #[serde(default)]
    pub rules_file: Option<PathBuf>,
    /// Async worker threads (0: one per core). `calm dev` runs its nodes with 1: three
    /// nodes sharing a few cores wake each other faster with fewer threads.
    #[serde(default)]
    pub threads: usize,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub gossip: GossipConfig,
    #[serde(default)]
    pub watch: WatchConfig,
}

/// What flags may override (all optional).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<NodeId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<Member>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
}

/// The top-level settings of [`NodeConfig`], as `CALM_*` variables name them (lower case).
const SETTINGS: [&str; 12] = [
    "id",
    "data_dir",
    "client_addr",
    "peer_addr",
    "http_addr",
    "members",
    "rules_file",
    "threads",
    "raft",
    "storage",
    "gossip",
    "watch",
];

impl NodeConfig {
    /// Layer the file (if any), `CALM_*` variables and flags, then validate.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<NodeConfig, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only variables naming a setting: CALM_ENDPOINTS, CALM_LOG and the test harnesses'
        // CALM_* belong to other tools. A misspelt setting inside a section
        // (CALM_GOSSIP__PUSH_INTERVAL) is then refused by name, not silently ignored.
        let settings = Env::prefixed("CALM_").split("__").filter(|key| {
            // Keys are still as written here (figment lower-cases them later).
            let top = key.as_str().split('.').next().unwrap_or_default();
            SETTINGS.iter().any(|s| s.eq_ignore_ascii_case(top))
        });
        let config: NodeConfig = figment
            .merge(settings)
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(missing_setting)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(invalid("id must be >= 1 (0 is reserved)"));
        }
        let mut ids = BTreeSet::new();
        for m in &self.members {
            if m.id == 0 {
                return Err(invalid(format!("member {m:?}: ids start at 1")));
            }
            if !ids.insert(m.id) {
                return Err(invalid(format!(
                    "member id {} is listed twice; every member needs its own id",
                    m.id
                )));
            }
            for addr in [&m.peer, &m.client] {
                let port = addr.rsplit_once(':').and_then(|(host, port)| {
                    (!host.is_empty())
                        .then(|| port.parse::<u16>().ok())
                        .flatten()
                });
                if port.is_none() {
                    return Err(invalid(format!(
                        "member {}: '{addr}' is not host:port",
                        m.id
                    )));
                }
            }
        }
        let Some(me) = self.members.iter().find(|m| m.id == self.id) else {
            return Err(invalid(format!(
                "node {} is not in the member list; list every member, this node included",
                self.id
            )));
        };
        // A member's peer address may be a host name (docker compose); when it is an IP
        // address and this node listens on a specific one, they must agree.
        if let Ok(listed) = me.peer.parse::<SocketAddr>()
            && !self.peer_addr.ip().is_unspecified()
            && listed != self.peer_addr
        {
            return Err(invalid(format!(
                "node {}: peer_addr {} differs from its member entry's peer address {}",
                self.id, self.peer_addr, me.peer
            )));
        }
        if let Some(groups) = self.raft.data_groups
            && !(1..=DATA_GROUPS_MAX).contains(&groups)
        {
            return Err(invalid(format!(
                "raft.data_groups = {groups} must be within 1..={DATA_GROUPS_MAX}"
            )));
        }
        if self.raft.heartbeat_ms == 0
            || self.raft.election_timeout_min_ms <= self.raft.heartbeat_ms
            || self.raft.election_timeout_max_ms <= self.raft.election_timeout_min_ms
        {
            return Err(invalid(format!(
                "raft timing: need 0 < heartbeat_ms ({}) < election_timeout_min_ms ({}) < election_timeout_max_ms ({})",
                self.raft.heartbeat_ms,
                self.raft.election_timeout_min_ms,
                self.raft.election_timeout_max_ms
            )));
        }
        if let Err(ConsensusError::Config(reason)) =
            self.raft.consensus_options().commit_notice_hold()
        {
            return Err(invalid(format!("raft.{reason}")));
        }
        if self.storage.persist_interval_ms == 0 || self.storage.checkpoint_interval_s == 0 {
            return Err(invalid(
                "storage.persist_interval_ms and storage.checkpoint_interval_s must be > 0",
            ));
        }
        if self.gossip.push_interval_ms > GOSSIP_PUSH_INTERVAL_MS_MAX
            || !(1..=GOSSIP_ANTI_ENTROPY_INTERVAL_MS_MAX)
                .contains(&self.gossip.anti_entropy_interval_ms)
        {
            return Err(invalid(format!(
                "gossip timing: need push_interval_ms ({}) <= {GOSSIP_PUSH_INTERVAL_MS_MAX} and 1 <= anti_entropy_interval_ms ({}) <= {GOSSIP_ANTI_ENTROPY_INTERVAL_MS_MAX}",
                self.gossip.push_interval_ms, self.gossip.anti_entropy_interval_ms
            )));
        }
        if self.watch.retain_events == 0
            || self.watch.retain_bytes < 1 << 20
            || self.watch.watchers_max == 0
        {
            return Err(invalid(format!(
                "watch: need retain_events ({}) >= 1, retain_bytes ({}) >= 1048576 and watchers_max ({}) >= 1",
                self.watch.retain_events, self.watch.retain_bytes, self.watch.watchers_max
            )));
        }
        if !["auto", "io_uring", "pwrite"].contains(&self.storage.wal_backend.as_str()) {
            return Err(invalid(format!(
                "storage.wal_backend = '{}': use auto, io_uring or pwrite",
                self.storage.wal_backend
            )));
        }
        Ok(())
    }

    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides() -> Overrides {
        Overrides {
            id: Some(1),
            data_dir: Some("d".into()),
            client_addr: Some("127.0.0.1:7001".parse().unwrap()),
            peer_addr: Some("127.0.0.1:7101".parse().unwrap()),
            http_addr: Some("127.0.0.1:7201".parse().unwrap()),
            members: Some(vec![
                Member::parse("1=127.0.0.1:7101,127.0.0.1:7001").unwrap(),
                Member::parse("2=127.0.0.1:7102,127.0.0.1:7002").unwrap(),
            ]),
            rules_file: None,
            threads: None,
        }
    }

    #[test]
    fn flags_make_a_whole_config_with_defaults() {
        let c = NodeConfig::load(None, overrides()).unwrap();
        assert_eq!(c.raft, RaftConfig::default());
        assert_eq!(c.member(2).unwrap().client, "127.0.0.1:7002");
    }

    #[test]
    fn file_values_are_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calm.toml");
        std::fs::write(
            &path,
            "id = 2\ndata_dir = \"x\"\n[raft]\nheartbeat_ms = 40\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n",
        )
        .unwrap();
        let c = NodeConfig::load(Some(&path), overrides()).unwrap();
        assert_eq!(c.id, 1, "the flag wins over the file");
        assert_eq!(c.raft.heartbeat_ms, 40, "the file wins over defaults");
    }

    #[test]
    fn gossip_timing_comes_from_the_file_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calm.toml");
        std::fs::write(&path, "[gossip]\npush_interval_ms = 10\n").unwrap();
        let c = NodeConfig::load(Some(&path), overrides()).unwrap();
        let g = c.gossip.gossip_options();
        assert_eq!(g.push_interval_ms, 10);
        assert_eq!(
            g.anti_entropy_interval_ms,
            GossipOptions::default().anti_entropy_interval_ms,
            "unset fields keep their defaults"
        );
        std::fs::write(&path, "[gossip]\nanti_entropy_interval_ms = 0\n").unwrap();
        let e = NodeConfig::load(Some(&path), overrides())
            .unwrap_err()
            .to_string();
        assert!(e.contains("anti_entropy_interval_ms (0)"), "{e}");
    }

    #[test]
    fn a_misspelt_setting_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calm.toml");
        for (text, name) in [
            ("[gossip]\npush_intreval_ms = 5\n", "push_intreval_ms"),
            ("[raft]\nheartbeat = 50\n", "heartbeat"),
            ("[storgae]\npersist_interval_ms = 100\n", "storgae"),
            ("thread = 2\n", "thread"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = NodeConfig::load(Some(&path), overrides())
                .unwrap_err()
                .to_string();
            assert!(e.contains("unknown field") && e.contains(name), "{e}");
        }
    }

    #[test]
    fn every_top_level_setting_can_come_from_the_environment() {
        // `CALM_*` variables reach only the settings listed in SETTINGS.
        let c = NodeConfig::load(None, overrides()).unwrap();
        let serde_json::Value::Object(fields) = serde_json::to_value(&c).unwrap() else {
            panic!("a config serializes to a map");
        };
        let mut fields: Vec<_> = fields.keys().map(String::as_str).collect();
        let mut settings = SETTINGS.to_vec();
        fields.sort_unstable();
        settings.sort_unstable();
        assert_eq!(fields, settings);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let mut o = overrides();
        o.id = Some(3);
        let e = NodeConfig::load(None, o).unwrap_err().to_string();
        assert!(e.contains("not in the member list"), "{e}");
        assert!(
            Member::parse("x=1,2")
                .unwrap_err()
                .contains("not a node id")
        );
        assert!(
            Member::parse("1=127.0.0.1:1")
                .unwrap_err()
                .contains("ID=PEER_ADDR")
        );
        let mut o = overrides();
        o.members = Some(vec![
            Member::parse("1=127.0.0.1:7101,127.0.0.1:7001").unwrap(),
            Member::parse("1=127.0.0.1:7102,127.0.0.1:7002").unwrap(),
        ]);
        let e = NodeConfig::load(None, o).unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn the_commit_notice_hold_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calm.toml");
        std::fs::write(&path, "[raft]\ncommit_notice_hold_us = 0\n").unwrap();
        let c = NodeConfig::load(Some(&path), overrides()).unwrap();
        assert_eq!(c.raft.consensus_options().commit_notice_hold_us, 0);
        std::fs::write(&path, "[raft]\ncommit_notice_hold_us = 50001\n").unwrap();
        let e = NodeConfig::load(Some(&path), overrides())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("raft.commit_notice_hold_us = 50001 exceeds 50000"),
            "{e}"
        );
    }
}
