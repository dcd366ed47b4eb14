//! gRPC clients of every node, with a deadline on every call, and the mapping from a
//! call's result to Jepsen's completion types.
//!
//! Channels use HTTP/2 keepalive and per-call deadlines because a SIGSTOPped node accepts
//! TCP connections and then never answers. A write whose outcome is unknown (deadline,
//! UNAVAILABLE after the request may have reached a leader, a dropped connection) is `info`;
//! only errors that say the op was refused before taking effect are `fail`, and a request
//! that never reached any server (connection refused) is `fail` too.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::cluster::{CLIENT_PORT, node_ip};
use crate::pb;
use crate::pb::admin_client::AdminClient;
use crate::pb::kv_client::KvClient;
use crate::pb::lease_client::LeaseClient;

/// How a client op ended.
#[derive(Debug, Clone)]
pub enum Completion {
    Ok(serde_json::Value),
    /// Definitely did not take effect.
    Fail(String),
    /// Unknown.
    Info(String),
}

/// Clients of nodes 1..=n.
#[derive(Clone)]
pub struct Clients {
    channels: Vec<Channel>,
    pub timeout: Duration,
}

impl Clients {
    pub fn new(n: usize, timeout: Duration) -> Clients {
        let channels = (1..=n)
            .map(|i| {
                Endpoint::from_shared(format!("http://{}:{CLIENT_PORT}", node_ip(i)))
                    .expect("a valid URI")
                    .connect_timeout(Duration::from_millis(500))
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(Duration::from_secs(1))
                    .keep_alive_while_idle(true)
                    .connect_lazy()
            })
            .collect();
        Clients { channels, timeout }
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    pub fn kv(&self, node: usize) -> KvClient<Channel> {
        KvClient::new(self.channels[node - 1].clone())
    }

    pub fn admin(&self, node: usize) -> AdminClient<Channel> {
        AdminClient::new(self.channels[node - 1].clone())
    }

    /// Bounds a call by the timeout even if the transport does not.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(
                "the harness's client timeout passed",
            )),
        }
    }

    pub fn leases(&self, node: usize) -> LeaseClient<Channel> {
        LeaseClient::new(self.channels[node - 1].clone())
    }

    pub async fn write(
        &self,
        node: usize,
        key: &str,
        op: pb::op::Kind,
        token: Vec<u8>,
    ) -> Result<pb::WriteResponse, Status> {
        self.write_leased(node, key, op, token, 0).await
    }

    /// A write attaching `key` to lease `lease` (0: none) once it takes effect.
    pub async fn write_leased(
        &self,
        node: usize,
        key: &str,
        op: pb::op::Kind,
        token: Vec<u8>,
        lease: u64,
    ) -> Result<pb::WriteResponse, Status> {
        let mut kv = self.kv(node);
        let req = pb::WriteRequest {
            key: key.as_bytes().to_vec(),
            op: Some(pb::Op { kind: Some(op) }),
            token,
            lease,
        };
        self.bounded(kv.write(req)).await
    }

    /// A lease for `key`'s subject of at least `ttl_ms` (the cluster raises it to its minimum).
    pub async fn grant(
        &self,
        node: usize,
        key: &str,
        ttl_ms: u64,
    ) -> Result<pb::LeaseGrantResponse, Status> {
        let mut leases = self.leases(node);
        let req = pb::LeaseGrantRequest {
            ttl_ms,
            subject: Vec::new(),
            key: key.as_bytes().to_vec(),
        };
        self.bounded(leases.grant(req)).await
    }

    pub async fn revoke(&self, node: usize, id: u64) -> Result<pb::LeaseRevokeResponse, Status> {
        let mut leases = self.leases(node);
        self.bounded(leases.revoke(pb::LeaseRevokeRequest { id }))
            .await
    }

    /// Open a keep-alive stream fed by `requests`; only the call's start is bounded by the
    /// timeout (the caller bounds each answer).
    pub async fn keep_alive(
        &self,
        node: usize,
        requests: impl futures::Stream<Item = pb::LeaseKeepAliveRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<pb::LeaseKeepAliveResponse>, Status> {
        let mut leases = self.leases(node);
        self.bounded(leases.keep_alive(requests)).await
    }

    pub async fn get(
        &self,
        node: usize,
        key: &str,
        consistency: pb::Consistency,
        token: Vec<u8>,
    ) -> Result<pb::GetResponse, Status> {
        let mut kv = self.kv(node);
        let req = pb::GetRequest {
            key: key.as_bytes().to_vec(),
            consistency: consistency as i32,
            token,
        };
        self.bounded(kv.get(req)).await
    }

    pub async fn txn(&self, node: usize, req: pb::TxnRequest) -> Result<pb::TxnResponse, Status> {
        let mut kv = self.kv(node);
        self.bounded(kv.txn(req)).await
    }

    pub async fn scan(
        &self,
        node: usize,
        req: pb::ScanRequest,
    ) -> Result<pb::ScanResponse, Status> {
        let mut kv = self.kv(node);
        self.bounded(kv.scan(req)).await
    }

    /// Open a watch stream; only the call's start is bounded by the timeout (the caller
    /// bounds each message).
    pub async fn watch(
        &self,
        node: usize,
        req: pb::WatchRequest,
    ) -> Result<tonic::Streaming<pb::WatchResponse>, Status> {
        let mut kv = self.kv(node);
        self.bounded(kv.watch(req)).await
    }

    pub async fn status(&self, node: usize) -> Result<pb::StatusResponse, Status> {
        let mut admin = self.admin(node);
        self.bounded(admin.status(pb::StatusRequest {})).await
    }

    pub async fn get_rules(&self, node: usize) -> Result<pb::Rules, Status> {
        let mut admin = self.admin(node);
        self.bounded(admin.get_rules(pb::GetRulesRequest {})).await
    }

    pub async fn set_rules(
        &self,
        node: usize,
        expected_version: u64,
        toml: String,
    ) -> Result<pb::Rules, Status> {
        let mut admin = self.admin(node);
        self.bounded(admin.set_rules(pb::SetRulesRequest {
            expected_version,
            toml,
        }))
        .await
    }
}

/// The request never reached a server: it cannot have taken effect.
fn never_sent(status: &Status) -> bool {
    let text = format!("{status:?}");
    status.code() == Code::Unavailable
        && (text.contains("tcp connect error") || text.contains("Connection refused"))
}

/// A transaction's answer as a completion: `ok` with the branch that ran, or the error.
pub fn txn_completion(answer: Result<pb::TxnResponse, Status>) -> Completion {
    match answer {
        Ok(r) => Completion::Ok(serde_json::json!({"succeeded": r.succeeded})),
        Err(e) => write_error(&e),
    }
}

/// A write's error as a completion.
pub fn write_error(status: &Status) -> Completion {
    let text = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::ResourceExhausted
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unimplemented => Completion::Fail(text),
        _ if never_sent(status) => Completion::Fail(text),
        _ => Completion::Info(text),
    }
}

/// A read's error: reads change nothing, so every failed read is a `fail`.
pub fn read_error(status: &Status) -> Completion {
    Completion::Fail(format!("{:?}: {}", status.code(), status.message()))
}

/// Integers travel as decimal bytes (registers, set elements).
pub fn int_bytes(v: i64) -> Vec<u8> {
    v.to_string().into_bytes()
}

pub fn bytes_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The JSON value of a read: registers as their integer (or null), counters as integers
/// (absent = 0), sets as sorted integer arrays (absent = []).
pub fn read_value(resp: &pb::GetResponse) -> Result<serde_json::Value, String> {
    use pb::value::Kind;
    if !resp.found {
        return Ok(serde_json::Value::Null);
    }
    match resp.value.as_ref().and_then(|v| v.kind.as_ref()) {
        Some(Kind::Register(r)) => bytes_int(&r.value)
            .map(Into::into)
            .ok_or_else(|| format!("register value {:?} is not an integer", r.value)),
        Some(Kind::Counter(c)) => Ok((*c).into()),
        Some(Kind::Bounded(b)) => Ok(b.value.into()),
        Some(Kind::Max(m)) => Ok(m.value.into()),
        Some(Kind::Set(s)) => s
            .elements
            .iter()
            .map(|e| bytes_int(e).ok_or_else(|| format!("set element {e:?} is not an integer")))
            .collect::<Result<Vec<i64>, _>>()
            .map(Into::into),
        None => Err("a found key without a value".into()),
    }
}
