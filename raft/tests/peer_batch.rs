//! Multi-Raft batching over a real tonic connection: concurrent calls of many groups share
//! `Batch` RPCs, each caller gets its own answer (payload or status), a call keeps its own
//! deadline, a deferred call rides on the next batch (or leaves when its hold ends), and a
//! peer that cannot be reached fails every call with the connect error that tells proposals
//! they were never sent.

use calm_raft::channel::{ChannelOptions, H2Channel};
use calm_raft::consensus::batch::{BATCH_CALLS_MAX, Batcher, Lane};
use calm_raft::consensus::wire::raft_peer_client::RaftPeerClient;
use calm_raft::consensus::wire::raft_peer_server::{RaftPeer, RaftPeerServer};
use calm_raft::consensus::wire::{
    GroupMessage, PeerBatch, PeerBatchReply, PeerResult, PeerRpc, SnapshotChunk,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tonic::{Code, Request, Response, Status, Streaming};

/// A peer that answers batches only, after `hold` (so that calls queue up behind the ones in
/// flight): AppendEntries echoes the group and payload, Vote fails with FAILED_PRECONDITION.
#[derive(Default)]
struct Counts {
    batches: AtomicUsize,
    calls: AtomicUsize,
    largest: AtomicUsize,
    hold: Duration,
}

#[derive(Clone)]
struct Peer(Arc<Counts>);

impl std::ops::Deref for Peer {
    type Target = Counts;
    fn deref(&self) -> &Counts {
        &self.0
    }
}

type Unary = Result<Response<GroupMessage>, Status>;

#[tonic::async_trait]
impl RaftPeer for Peer {
    async fn append_entries(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::unimplemented("batches only"))
    }
    async fn vote(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::unimplemented("batches only"))
    }
    async fn pre_vote(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::unimplemented("batches only"))
    }
    async fn transfer_leader(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::unimplemented("batches only"))
    }
    async fn install_snapshot(&self, _: Request<Streaming<SnapshotChunk>>) -> Unary {
        Err(Status::unimplemented("batches only"))
    }
    async fn propose(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::unimplemented("batches only"))
    }
    async fn read_index(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::unimplemented("batches only"))
    }
    async fn batch(&self, req: Request<PeerBatch>) -> Result<Response<PeerBatchReply>, Status> {
        let calls = req.into_inner().calls;
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.calls.fetch_add(calls.len(), Ordering::Relaxed);
        self.largest.fetch_max(calls.len(), Ordering::Relaxed);
        tokio::time::sleep(self.hold).await;
        let results = calls
            .into_iter()
            .map(|call| {
                let m = call.message.expect("every call has its message");
                match PeerRpc::try_from(call.rpc) {
                    Ok(PeerRpc::AppendEntries) => {
                        let mut payload = m.group.to_le_bytes().to_vec();
                        payload.extend_from_slice(&m.payload);
                        PeerResult {
                            payload,
                            code: 0,
                            message: String::new(),
                        }
                    }
                    other => PeerResult {
                        payload: Vec::new(),
                        code: Code::FailedPrecondition as i32,
                        message: format!("refused {other:?} of group {}", m.group),
                    },
                }
            })
            .collect();
        Ok(Response::new(PeerBatchReply { results }))
    }
}

/// A [`Peer`] holding each batch for `hold`, served on a loopback port, and a Raft-lane
/// batcher to it.
async fn peer_holding(hold: Duration) -> (Peer, Batcher, tokio::task::JoinHandle<()>) {
    let peer = Peer(Arc::new(Counts {
        hold,
        ..Counts::default()
    }));
    let (addr, server) = serve(peer.clone()).await;
    let batcher = Batcher::start(2, Lane::Raft, client(&addr.to_string()));
    (peer, batcher, server)
}

async fn serve(peer: Peer) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RaftPeerServer::new(peer))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    (addr, server)
}

fn client(addr: &str) -> RaftPeerClient<H2Channel> {
    let options = ChannelOptions {
        connect_timeout: Duration::from_millis(500),
        ..ChannelOptions::default()
    };
    RaftPeerClient::new(H2Channel::lazy(addr, options).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_of_many_groups_share_batches_and_each_gets_its_own_answer() {
    let (peer, batcher, server) = peer_holding(Duration::from_millis(20)).await;

    let calls = 600u64;
    let answers = futures::future::join_all((0..calls).map(|i| {
        let batcher = batcher.clone();
        async move {
            let group = i % 9;
            let rpc = if i % 10 == 0 {
                PeerRpc::Vote
            } else {
                PeerRpc::AppendEntries
            };
            let payload = i.to_le_bytes().to_vec();
            let answer = batcher
                .call(rpc, group, payload.clone(), Duration::from_secs(10))
                .await;
            (i, group, rpc, payload, answer)
        }
    }))
    .await;
    for (i, group, rpc, payload, answer) in answers {
        match rpc {
            PeerRpc::AppendEntries => {
                let mut want = group.to_le_bytes().to_vec();
                want.extend_from_slice(&payload);
                assert_eq!(answer.expect("an echoed call"), want, "call {i}");
            }
            _ => {
                let status = answer.expect_err("a refused call");
                assert_eq!(status.code(), Code::FailedPrecondition, "call {i}");
                assert_eq!(
                    status.message(),
                    format!("refused Ok(Vote) of group {group}"),
                    "call {i}"
                );
            }
        }
    }
    let batches = peer.batches.load(Ordering::Relaxed);
    assert_eq!(peer.calls.load(Ordering::Relaxed), calls as usize);
    assert!(
        batches * 4 <= calls as usize,
        "{calls} concurrent calls took {batches} batches"
    );
    assert!(peer.largest.load(Ordering::Relaxed) <= BATCH_CALLS_MAX);

    // A lone call leaves at once, in a batch of its own.
    let before = peer.batches.load(Ordering::Relaxed);
    let alone = batcher
        .call(PeerRpc::AppendEntries, 7, vec![1], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(alone, [7u64.to_le_bytes().as_slice(), &[1]].concat());
    assert_eq!(peer.batches.load(Ordering::Relaxed), before + 1);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_keeps_its_own_deadline() {
    let (_peer, batcher, server) = peer_holding(Duration::from_millis(500)).await;
    let (short, long) = tokio::join!(
        batcher.call(PeerRpc::AppendEntries, 1, vec![], Duration::from_millis(50)),
        batcher.call(PeerRpc::AppendEntries, 2, vec![], Duration::from_secs(10)),
    );
    let status = short.expect_err("the peer holds every batch for 500 ms");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(long.unwrap(), 2u64.to_le_bytes());
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_fails_every_call_with_its_connect_error() {
    // A port nothing listens on: bound, then released.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let batcher = Batcher::start(3, Lane::Client, client(&addr.to_string()));
    let answers = futures::future::join_all(
        (0..20).map(|g| batcher.call(PeerRpc::Propose, g, vec![], Duration::from_secs(5))),
    )
    .await;
    for answer in answers {
        let status = answer.expect_err("nothing listens");
        // Proposals are retried elsewhere only on this: they certainly were not sent.
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("connect error"), "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_call_rides_on_the_next_batch_or_leaves_when_its_hold_ends_or_released() {
    let (peer, batcher, server) = peer_holding(Duration::ZERO).await;
    let ttl = Duration::from_secs(30);
    let echo = |group: u64, payload: &[u8]| [group.to_le_bytes().as_slice(), payload].concat();

    // A deferred call of `group`, with a hold far longer than the test, in a task of its own.
    let spawn_deferred = |group: u64| {
        let batcher = batcher.clone();
        tokio::spawn(async move {
            batcher
                .call_held(
                    PeerRpc::AppendEntries,
                    group,
                    vec![group as u8],
                    ttl,
                    Some(ttl),
                )
                .await
        })
    };

    // It waits for other traffic.
    let deferred = spawn_deferred(3);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        peer.batches.load(Ordering::Relaxed),
        0,
        "a deferred call waits"
    );
    assert!(!deferred.is_finished());

    // A call that is not deferred leaves at once and takes the deferred one along.
    let urgent = batcher
        .call(PeerRpc::AppendEntries, 4, vec![4], ttl)
        .await
        .unwrap();
    assert_eq!(urgent, echo(4, &[4]));
    assert_eq!(deferred.await.unwrap().unwrap(), echo(3, &[3]));
    assert_eq!(
        peer.batches.load(Ordering::Relaxed),
        1,
        "one batch carried both"
    );
    assert_eq!(peer.calls.load(Ordering::Relaxed), 2);

    // Alone, a deferred call leaves when its hold ends.
    let alone = batcher
        .call_held(
            PeerRpc::AppendEntries,
            5,
            vec![5],
            ttl,
            Some(Duration::from_millis(20)),
        )
        .await
        .unwrap();
    assert_eq!(alone, echo(5, &[5]));
    assert_eq!(peer.batches.load(Ordering::Relaxed), 2);

    // Released, it leaves at once, hold or not.
    let released = spawn_deferred(6);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(peer.batches.load(Ordering::Relaxed), 2, "still waiting");
    batcher.release_deferred(Duration::ZERO);
    assert_eq!(released.await.unwrap().unwrap(), echo(6, &[6]));
    assert_eq!(peer.batches.load(Ordering::Relaxed), 3);
    // A release sends nothing by itself, but what is deferred within its window leaves at
    // once.
    batcher.release_deferred(ttl);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(peer.batches.load(Ordering::Relaxed), 3);
    let after = batcher
        .call_held(PeerRpc::AppendEntries, 7, vec![7], ttl, Some(ttl))
        .await
        .unwrap();
    assert_eq!(after, echo(7, &[7]));
    assert_eq!(peer.batches.load(Ordering::Relaxed), 4);
    server.abort();
}
