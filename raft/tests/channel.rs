//! `H2Channel` against a real tonic server on 127.0.0.1: unary and streaming calls, bodies
//! larger than the HTTP/2 windows, deadlines, the "never sent" error, reconnecting after the
//! server restarts, keepalive closing a connection whose peer stopped answering, and the
//! connection closing once every clone of the channel is gone.

use calm_raft::channel::{CONNECT_ERROR, ChannelOptions, H2Channel};
use calm_raft::consensus::wire::raft_peer_client::RaftPeerClient;
use calm_raft::consensus::wire::raft_peer_server::{RaftPeer, RaftPeerServer};
use calm_raft::consensus::wire::{GroupMessage, PeerBatch, PeerBatchReply, SnapshotChunk};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status, Streaming};

/// The longest any test here waits for an answer it expects (a bound on a hang, not a
/// performance figure).
const TEST_BOUND: Duration = Duration::from_secs(20);

/// AppendEntries echoes its message; Vote never answers; InstallSnapshot answers how many
/// chunks and data bytes it received, with a checksum of the data.
struct Echo;

type Unary = Result<Response<GroupMessage>, Status>;

#[tonic::async_trait]
impl RaftPeer for Echo {
    async fn append_entries(&self, req: Request<GroupMessage>) -> Unary {
        Ok(Response::new(req.into_inner()))
    }
    async fn vote(&self, _: Request<GroupMessage>) -> Unary {
        std::future::pending().await
    }
    async fn pre_vote(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::failed_precondition("pre-vote refused"))
    }
    async fn transfer_leader(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::unimplemented("echo only"))
    }
    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Unary {
        let mut chunks = req.into_inner();
        let (mut count, mut bytes, mut hash) = (0u64, 0u64, blake3::Hasher::new());
        while let Some(chunk) = chunks.message().await? {
            count += 1;
            bytes += chunk.data.len() as u64;
            hash.update(&chunk.data);
        }
        let mut payload = count.to_le_bytes().to_vec();
        payload.extend_from_slice(&bytes.to_le_bytes());
        payload.extend_from_slice(hash.finalize().as_bytes());
        Ok(Response::new(GroupMessage { group: 0, payload }))
    }
    async fn propose(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::unimplemented("echo only"))
    }
    async fn read_index(&self, _: Request<GroupMessage>) -> Unary {
        Err(Status::unimplemented("echo only"))
    }
    async fn batch(&self, _: Request<PeerBatch>) -> Result<Response<PeerBatchReply>, Status> {
        Err(Status::unimplemented("echo only"))
    }
}

/// An [`Echo`] server; `stop` shuts it down gracefully (idle connections get a GOAWAY and
/// close, the listener goes).
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

fn serve_on(listener: TcpListener) -> Server {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RaftPeerServer::new(Echo))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Server { stop, task }
}

async fn serve() -> (SocketAddr, Server) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, serve_on(listener))
}

fn options() -> ChannelOptions {
    ChannelOptions {
        connect_timeout: Duration::from_millis(500),
        ..ChannelOptions::default()
    }
}

fn client(addr: SocketAddr, options: ChannelOptions) -> RaftPeerClient<H2Channel> {
    RaftPeerClient::new(H2Channel::lazy(&addr.to_string(), options).unwrap())
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_BOUND, f)
        .await
        .expect("the call neither answered nor failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_connection_and_each_gets_its_own_answer() {
    let (addr, server) = serve().await;
    let kv = client(addr, options());
    let answers = bounded(futures::future::join_all((0..300u64).map(|i| {
        let mut kv = kv.clone();
        async move {
            let payload = i.to_le_bytes().repeat(1 + (i as usize % 50));
            let reply = kv
                .append_entries(GroupMessage {
                    group: i,
                    payload: payload.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            (i, payload, reply)
        }
    })))
    .await;
    for (i, payload, reply) in answers {
        assert_eq!((reply.group, reply.payload), (i, payload));
    }
    // A status from the server comes back as it was sent.
    let refused = bounded(kv.clone().pre_vote(GroupMessage::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(refused.message(), "pre-vote refused");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_larger_than_the_windows_arrive_whole() {
    let (addr, server) = serve().await;
    let mut kv = client(addr, options());
    // Past the 2 MiB stream window and (over a few calls) the 5 MiB connection window: the
    // part the window does not allow yet is buffered and follows as the peer reads.
    for round in 0..4u8 {
        let payload: Vec<u8> = (0..3 << 20).map(|i: u32| (i as u8) ^ round).collect();
        let reply = bounded(kv.append_entries(GroupMessage {
            group: round as u64,
            payload: payload.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
        assert!(reply.payload == payload, "round {round}: the echo differs");
    }
    // A 24 MiB client stream: piped chunk by chunk as the window opens.
    let chunks: Vec<SnapshotChunk> = (0..24u8)
        .map(|i| SnapshotChunk {
            group: 1,
            header: Vec::new(),
            data: vec![i; 1 << 20],
        })
        .collect();
    let mut expect = blake3::Hasher::new();
    for c in &chunks {
        expect.update(&c.data);
    }
    let reply = bounded(kv.install_snapshot(futures::stream::iter(chunks)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.payload[..8], 24u64.to_le_bytes());
    assert_eq!(reply.payload[8..16], (24u64 << 20).to_le_bytes());
    assert_eq!(&reply.payload[16..], expect.finalize().as_bytes());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_ends_a_call_the_server_never_answers() {
    let (addr, server) = serve().await;
    let mut kv = client(addr, options());
    let mut request = Request::new(GroupMessage::default());
    request.set_timeout(Duration::from_millis(100));
    let err = bounded(kv.vote(request)).await.unwrap_err();
    // tonic's server enforces `grpc-timeout` too and answers CANCELLED; whichever side's
    // timer fires first decides the code.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // The channel's own deadline, for calls that carry none, is this side's alone.
    let mut kv = client(
        addr,
        ChannelOptions {
            call_timeout: Some(Duration::from_millis(100)),
            ..options()
        },
    );
    let err = bounded(kv.vote(GroupMessage::default())).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listener_is_a_connect_error_and_a_restarted_server_is_reached_again() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut kv = client(addr, options());
    let err = bounded(kv.append_entries(GroupMessage::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().starts_with(CONNECT_ERROR), "{err:?}");
    assert!(err.message().contains(&addr.to_string()), "{err:?}");
    // Connecting eagerly says the same at once.
    let err = H2Channel::connect(&addr.to_string(), options())
        .await
        .err()
        .expect("nothing listens");
    assert!(err.message().starts_with(CONNECT_ERROR), "{err:?}");

    let server = serve_on(TcpListener::bind(addr).await.unwrap());
    let echo = GroupMessage {
        group: 7,
        payload: b"up".to_vec(),
    };
    let reply = bounded(kv.append_entries(echo.clone())).await.unwrap();
    assert_eq!(reply.into_inner(), echo);

    // The server goes away and comes back on the same port: calls fail meanwhile (with any
    // code: a call may have been on the wire), then succeed on a new connection.
    server.stop().await;
    let down = bounded(kv.append_entries(echo.clone())).await;
    assert!(down.is_err(), "nothing serves {addr}");
    let server = serve_on(TcpListener::bind(addr).await.unwrap());
    let reply = bounded(kv.append_entries(echo.clone())).await.unwrap();
    assert_eq!(reply.into_inner(), echo);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_fails_calls_to_a_peer_that_stopped_answering() {
    // A peer that accepts connections and then never reads or writes, like a SIGSTOPped
    // process whose kernel still holds the socket.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            sockets.push(socket);
        }
    });
    let mut kv = client(
        addr,
        ChannelOptions {
            keepalive_interval: Some(Duration::from_millis(100)),
            keepalive_timeout: Duration::from_millis(200),
            ..options()
        },
    );
    let err = bounded(kv.append_entries(GroupMessage::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    held.abort();
}

/// A server connection, counted in `open` while the server keeps it.
struct Tracked {
    socket: tokio::net::TcpStream,
    open: std::sync::Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl tonic::transport::server::Connected for Tracked {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for Tracked {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.socket).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tracked {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.socket).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.socket).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_clone_closes_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    let incoming = futures::stream::unfold(listener, move |listener| {
        let open = counter.clone();
        async move {
            let accepted = listener.accept().await.map(|(socket, _)| {
                open.fetch_add(1, Ordering::SeqCst);
                Tracked { socket, open }
            });
            Some((accepted, listener))
        }
    });
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RaftPeerServer::new(Echo))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    let kv = client(
        addr,
        ChannelOptions {
            keepalive_interval: Some(Duration::from_millis(50)),
            ..options()
        },
    );
    let mut clone = kv.clone();
    bounded(clone.append_entries(GroupMessage::default()))
        .await
        .unwrap();
    assert_eq!(open.load(Ordering::SeqCst), 1, "one connection, in use");
    drop((kv, clone));
    // The connection task ends (keepalive pings do not hold it) and the server drops the
    // socket once the client closed it.
    bounded(async {
        while open.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    server.abort();
}

/// A listener whose accept queue is full drops new SYNs, as a partition does, and Linux sends
/// a lost SYN again only after 1 s. So a connect made while the queue was full, with a 900 ms
/// timeout, succeeds after the queue drains only if the channel starts fresh attempts while
/// the first waits (it does, every 100 ms): how a link is back at once after a partition heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_attempt_whose_syn_was_dropped_is_overtaken_by_a_fresh_one() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the accept queue: connections complete until it is full, then a SYN goes unanswered.
    let mut fillers = Vec::new();
    loop {
        assert!(fillers.len() < 16, "the accept queue never filled");
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
    }
    let connecting = tokio::spawn(async move {
        let options = ChannelOptions {
            connect_timeout: Duration::from_millis(900),
            ..ChannelOptions::default()
        };
        H2Channel::connect(&addr.to_string(), options).await
    });
    // The first SYN is dropped; then the queue drains (the server accepts the fillers, which
    // closed) well before the kernel would resend it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(fillers);
    let server = serve_on(listener);
    let channel = bounded(connecting)
        .await
        .unwrap()
        .expect("a fresh attempt connects once the queue has room");
    let mut kv = RaftPeerClient::new(channel);
    let reply = bounded(kv.append_entries(GroupMessage {
        group: 7,
        payload: b"back".to_vec(),
    }))
    .await
    .unwrap();
    assert_eq!(reply.into_inner().payload, b"back");
    server.stop().await;
}
