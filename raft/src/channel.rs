//! A gRPC channel that sends a call's headers and message in one write.
//!
//! tonic's `Channel` runs on hyper's HTTP/2 client, which queues a request's HEADERS and then
//! waits for the new stream to be granted flow-control capacity before it queues the body.
//! Only the connection task grants that, once it has opened the stream, so the HEADERS frame
//! is flushed alone and the message follows in a second write: two TCP segments, often two
//! wake-ups of the receiver, and a task spawned per call. On this machine every hop is dear
//! (docs/benchmarks.md, "One write per call"), so [`H2Channel`] drives `h2` directly and
//! queues a ready message right behind its headers: h2 buffers data the window does not yet
//! allow and sends it as the window opens, so the connection task writes the whole call at
//! once. A body of more than one chunk (a snapshot stream) is piped by a task that waits for
//! the window before each further chunk, so streaming stays bounded.
//!
//! What it keeps from tonic's channel: one HTTP/2 connection, made on first use and again
//! after it fails; a connect timeout; an optional local address; TCP_NODELAY; keepalive pings
//! that close a connection whose peer stopped answering (a SIGSTOPped process keeps its
//! socket open); the `grpc-timeout` deadline enforced on the client side. What it adds: while
//! a connection attempt waits, fresh ones start beside it, so a link is back within ~100 ms
//! of a partition healing instead of after the kernel's 1 s SYN retry. Every error is a
//! `tonic::Status`. A call that certainly never left this node (no connection could be made)
//! fails with `Unavailable` and a message starting with [`CONNECT_ERROR`]: callers rely on
//! that to retry elsewhere without risking a second application.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use h2::client::SendRequest;
use h2::{Ping, Reason, RecvStream, SendStream};
use http_body::{Body as _, Frame};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tonic::Status;
use tonic::body::Body;

/// How a call that never left this node starts its `Unavailable` message.
pub const CONNECT_ERROR: &str = "connect error";
/// Per-stream receive window (hyper's default, which tonic's channel used).
const STREAM_WINDOW_BYTES: u32 = 2 << 20;
/// Per-connection receive window (hyper's default).
const CONNECTION_WINDOW_BYTES: u32 = 5 << 20;
/// Bytes a piped (streaming) body may have queued before it waits for the window.
const SEND_BUFFER_BYTES_MAX: usize = 1 << 20;
/// How long a connection attempt waits before a fresh one starts beside it ([`connect_tcp`]).
const CONNECT_STAGGER: Duration = Duration::from_millis(100);
/// Connection attempts at most for one connect (all but the first started by the stagger).
const CONNECT_ATTEMPTS_MAX: usize = 8;

/// How an [`H2Channel`] connects and keeps its connection.
#[derive(Clone, Debug)]
pub struct ChannelOptions {
    /// A connection attempt that takes longer fails the call with [`CONNECT_ERROR`].
    pub connect_timeout: Duration,
    /// Connect from this address (peers see one address per node); `None`: the system picks.
    pub local_ip: Option<IpAddr>,
    /// Ping the peer this often, and close the connection when a ping is not answered within
    /// `keepalive_timeout`; `None`: no pings.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// The deadline of a call that carries none (`grpc-timeout`); `None`: no deadline.
    pub call_timeout: Option<Duration>,
    /// Headers every call carries (a peer's cluster id, say).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Default for ChannelOptions {
    fn default() -> ChannelOptions {
        ChannelOptions {
            connect_timeout: Duration::from_secs(5),
            local_ip: None,
            keepalive_interval: None,
            keepalive_timeout: Duration::from_secs(20),
            call_timeout: None,
            headers: Vec::new(),
        }
    }
}

/// A cheap-to-clone gRPC channel to one `host:port` over one HTTP/2 connection; use it
/// wherever a tonic client wants a `Channel` (`FooClient::new(channel)`).
#[derive(Clone)]
pub struct H2Channel {
    shared: Arc<Shared>,
}

struct Shared {
    /// Shared with the response bodies, for their error messages.
    addr: Arc<str>,
    authority: http::uri::Authority,
    options: ChannelOptions,
    /// The live connection, if any.
    conn: Mutex<Option<Conn>>,
    /// Held while connecting, so concurrent calls share one attempt; holds the time and
    /// error of the last failed attempt, which the calls that waited for it share.
    connecting: tokio::sync::Mutex<Option<(tokio::time::Instant, Status)>>,
}

#[derive(Clone)]
struct Conn {
    send: SendRequest<Bytes>,
    /// Set when the connection task ended (error, EOF or a missed keepalive).
    closed: Arc<AtomicBool>,
}

impl H2Channel {
    /// A channel to `addr` (`host:port`); nothing connects until the first call.
    pub fn lazy(addr: &str, options: ChannelOptions) -> Result<H2Channel, Status> {
        let authority: http::uri::Authority = addr.parse().map_err(|e| {
            Status::invalid_argument(format!(
                "address {addr:?} is not host:port ({e}); give it as 127.0.0.1:7401"
            ))
        })?;
        if authority.port_u16().is_none() {
            return Err(Status::invalid_argument(format!(
                "address {addr:?} has no port; give it as host:port, e.g. 127.0.0.1:7401"
            )));
        }
        Ok(H2Channel {
            shared: Arc::new(Shared {
                addr: addr.into(),
                authority,
                options,
                conn: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// A channel to `addr` whose connection is made now, so that a wrong address or a
    /// stopped node shows at once.
    pub async fn connect(addr: &str, options: ChannelOptions) -> Result<H2Channel, Status> {
        let channel = H2Channel::lazy(addr, options)?;
        channel.connection().await?;
        Ok(channel)
    }

    fn live(&self) -> Option<Conn> {
        let conn = self.shared.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.as_ref()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .cloned()
    }

    /// The live connection, connecting first when there is none.
    async fn connection(&self) -> Result<Conn, Status> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let asked = tokio::time::Instant::now();
        let mut failed = self.shared.connecting.lock().await;
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        if let Some((at, status)) = failed.as_ref()
            && *at >= asked
        {
            // An attempt made while this call waited failed: no second one at once.
            return Err(status.clone());
        }
        match connect(&self.shared).await {
            Ok(conn) => {
                *self.shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                Ok(conn)
            }
            Err(status) => {
                *failed = Some((tokio::time::Instant::now(), status.clone()));
                Err(status)
            }
        }
    }

    /// Forget `broken` unless another call already replaced it.
    fn forget(&self, broken: &Conn) {
        broken.closed.store(true, Ordering::Release);
        let mut conn = self.shared.conn.lock().unwrap_or_else(|e| e.into_inner());
        if conn
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.closed, &broken.closed))
        {
            *conn = None;
        }
    }

    /// The `Status` of a call that failed before any of it was queued.
    fn not_sent(&self, e: h2::Error) -> Status {
        Status::unavailable(format!(
            "{CONNECT_ERROR}: {}: the connection closed before the call was sent ({e})",
            self.shared.addr
        ))
    }

    async fn call(self, request: http::Request<Body>) -> Result<http::Response<H2Body>, Status> {
        let deadline = grpc_timeout(request.headers()).or(self.shared.options.call_timeout);
        let work = self.send(request);
        match deadline {
            None => work.await,
            Some(timeout) => tokio::time::timeout(timeout, work)
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "{} did not answer within the call's deadline of {} ms",
                        self.shared.addr,
                        timeout.as_millis()
                    )))
                }),
        }
    }

    async fn send(&self, request: http::Request<Body>) -> Result<http::Response<H2Body>, Status> {
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = http::Uri::builder()
            .scheme("http")
            .authority(self.shared.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| Status::internal(format!("cannot build the call's URI: {e}")))?;
        parts.version = http::Version::HTTP_2;
        for (name, value) in &self.shared.options.headers {
            parts.headers.insert(name.clone(), value.clone());
        }
        let head = http::Request::from_parts(parts, ());
        let end_of_stream = body.is_end_stream();

        // A connection that broke while idle fails `ready` before anything of this call is
        // queued, so one retry on a fresh connection cannot send it twice.
        let mut attempt = 0;
        let mut send = loop {
            attempt += 1;
            let conn = self.connection().await?;
            match conn.send.clone().ready().await {
                Ok(send) => break send,
                Err(_) if attempt < 2 => self.forget(&conn),
                Err(e) => {
                    self.forget(&conn);
                    return Err(self.not_sent(e));
                }
            }
        };
        let (response, stream) = send.send_request(head, end_of_stream).map_err(|e| {
            if e.is_io() || e.is_go_away() || e.reason().is_some() {
                self.not_sent(e)
            } else {
                // The request itself (its headers) is wrong: a bug of the caller.
                Status::internal(format!("cannot send the call to {}: {e}", self.shared.addr))
            }
        })?;
        if !end_of_stream {
            send_body(body, stream);
        }
        let response = response
            .await
            .map_err(|e| status_of(&self.shared.addr, e))?;
        let (parts, recv) = response.into_parts();
        let body = H2Body {
            recv,
            data_done: false,
            done: false,
            addr: self.shared.addr.clone(),
        };
        Ok(http::Response::from_parts(parts, body))
    }
}

/// The `Status` of an HTTP/2 error on a call to `addr`.
fn status_of(addr: &str, e: h2::Error) -> Status {
    match e.reason() {
        Some(Reason::REFUSED_STREAM) => Status::unavailable(format!(
            "{addr} refused the call before processing it ({e}); retry"
        )),
        Some(Reason::CANCEL) => Status::cancelled(format!("the call to {addr} was cancelled: {e}")),
        _ if e.is_io() || e.is_go_away() => Status::unavailable(format!(
            "the connection to {addr} failed during the call: {e}"
        )),
        _ => Status::internal(format!("HTTP/2 error on a call to {addr}: {e}")),
    }
}

/// The client-side deadline a call carries in its `grpc-timeout` header, if any.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// TCP connections to `target`: a first attempt, and while none has connected, a fresh one
/// every [`CONNECT_STAGGER`] (at most [`CONNECT_ATTEMPTS_MAX`] in all); the first to connect
/// wins. A lost SYN is sent again only after 1 s (Linux), so without fresh attempts a
/// connection begun while a partition dropped packets would wait out the whole connect
/// timeout after the partition healed. The caller bounds the whole by its connect timeout.
async fn connect_tcp(shared: &Shared, target: SocketAddr) -> Result<TcpStream, String> {
    let attempt = || async move {
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(|e| format!("cannot open a socket: {e}"))?;
        if let Some(ip) = shared.options.local_ip {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("cannot bind the local address {ip}: {e}"))?;
        }
        socket
            .set_nodelay(true)
            .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
        socket.connect(target).await.map_err(|e| e.to_string())
    };
    let mut attempts = futures::stream::FuturesUnordered::new();
    attempts.push(attempt());
    let mut started = 1;
    loop {
        tokio::select! {
            Some(result) = attempts.next() => match result {
                Ok(tcp) => return Ok(tcp),
                // A refusal or other error is the answer, unless another attempt still waits.
                Err(e) if attempts.is_empty() => return Err(e),
                Err(_) => {}
            },
            () = tokio::time::sleep(CONNECT_STAGGER), if started < CONNECT_ATTEMPTS_MAX => {
                attempts.push(attempt());
                started += 1;
            }
        }
    }
}

async fn connect(shared: &Shared) -> Result<Conn, Status> {
    let addr = &shared.addr;
    let fail = |what: String| Status::unavailable(format!("{CONNECT_ERROR}: {addr}: {what}"));
    let attempt = async {
        let target: SocketAddr = tokio::net::lookup_host(&**addr)
            .await
            .map_err(|e| fail(format!("cannot resolve the address: {e}")))?
            .next()
            .ok_or_else(|| fail("the address resolves to nothing".into()))?;
        let tcp = connect_tcp(shared, target).await.map_err(fail)?;
        h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_send_buffer_size(SEND_BUFFER_BYTES_MAX)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| fail(format!("HTTP/2 handshake failed: {e}")))
    };
    let (send, mut connection) = tokio::time::timeout(shared.options.connect_timeout, attempt)
        .await
        .map_err(|_| {
            fail(format!(
                "no connection within {} ms",
                shared.options.connect_timeout.as_millis()
            ))
        })??;
    let closed = Arc::new(AtomicBool::new(false));
    let keepalive = shared
        .options
        .keepalive_interval
        .zip(connection.ping_pong());
    let keepalive_timeout = shared.options.keepalive_timeout;
    let addr = addr.clone();
    let ended = closed.clone();
    tokio::spawn(async move {
        let pinger = async move {
            let Some((interval, mut pings)) = keepalive else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(interval).await;
                match tokio::time::timeout(keepalive_timeout, pings.ping(Ping::opaque())).await {
                    Ok(Ok(_pong)) => {}
                    Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
                    Err(_) => {
                        return format!(
                            "no keepalive answer within {} ms",
                            keepalive_timeout.as_millis()
                        );
                    }
                }
            }
        };
        let reason = tokio::select! {
            ended = &mut connection => match ended {
                Ok(()) => "closed".to_string(),
                Err(e) => e.to_string(),
            },
            reason = pinger => reason,
        };
        // Dropping the connection fails the calls still on it.
        ended.store(true, Ordering::Release);
        tracing::debug!(peer = %addr, %reason, "HTTP/2 connection ended");
    });
    Ok(Conn { send, closed })
}

/// Queue `body` on `stream`. A body that is one chunk ready now (a unary call) is queued
/// whole right behind the headers, so the call leaves in one write. Anything more (a client
/// stream) is piped by a task that waits for the window before each further chunk, so a
/// stream whose chunks are all ready at once is not buffered whole.
fn send_body(mut body: Body, mut stream: SendStream<Bytes>) {
    // The chunk is held back one step so that, when it is the last, it carries END_STREAM.
    let mut held: Option<Bytes> = None;
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).now_or_never();
        match next {
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if let Some(first) = held.replace(data) {
                        // A second chunk: a stream. The first goes now, the rest as the
                        // window opens.
                        if stream.send_data(first, false).is_ok() {
                            tokio::spawn(pipe_body(held.take(), body, stream));
                        }
                        return;
                    }
                }
                Err(frame) => {
                    if let Some(chunk) = held.take()
                        && stream.send_data(chunk, false).is_err()
                    {
                        return;
                    }
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                        return;
                    }
                }
            },
            Some(None) => {
                let _ = stream.send_data(held.take().unwrap_or_default(), true);
                return;
            }
            Some(Some(Err(_))) => {
                stream.send_reset(Reason::CANCEL);
                return;
            }
            None => {
                if let Some(chunk) = held.take()
                    && stream.send_data(chunk, false).is_err()
                {
                    return;
                }
                tokio::spawn(pipe_body(None, body, stream));
                return;
            }
        }
    }
}

/// The rest of a streaming body, starting with `next` if given: each chunk is queued once
/// the stream's window has room, so at most about one chunk waits beyond the window.
async fn pipe_body(mut next: Option<Bytes>, mut body: Body, mut stream: SendStream<Bytes>) {
    loop {
        let data = match next.take() {
            Some(data) => data,
            None => {
                let frame = tokio::select! {
                    frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => frame,
                    // The peer reset the stream: stop reading the body.
                    _ = std::future::poll_fn(|cx| stream.poll_reset(cx)) => return,
                };
                match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                let _ = stream.send_trailers(trailers);
                                return;
                            }
                            continue;
                        }
                    },
                    None => {
                        let _ = stream.send_data(Bytes::new(), true);
                        return;
                    }
                    Some(Err(_)) => {
                        stream.send_reset(Reason::CANCEL);
                        return;
                    }
                }
            }
        };
        stream.reserve_capacity(1);
        while stream.capacity() == 0 {
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
        if stream.send_data(data, false).is_err() {
            return;
        }
    }
}

/// A response body read from an h2 stream: its DATA, then its trailers (where gRPC puts the
/// status). Received bytes are released to the flow-control window as they are handed on.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    done: bool,
    addr: Arc<str>,
}

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status_of(&this.addr, e))));
                }
                None => this.data_done = true,
            }
        }
        let trailers = std::task::ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(status_of(&this.addr, e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl tower_service::Service<http::Request<Body>> for H2Channel {
    type Response = http::Response<H2Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<http::Response<H2Body>, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Calls wait for a stream slot inside `call` (`SendRequest::ready`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", timeout.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(
            grpc_timeout(&headers("2H")),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(grpc_timeout(&headers("3M")), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout(&headers("4S")), Some(Duration::from_secs(4)));
        assert_eq!(
            grpc_timeout(&headers("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(grpc_timeout(&headers("7u")), Some(Duration::from_micros(7)));
        assert_eq!(grpc_timeout(&headers("9n")), Some(Duration::from_nanos(9)));
        assert_eq!(grpc_timeout(&headers("9x")), None);
        assert_eq!(grpc_timeout(&headers("m")), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn an_address_without_a_port_is_refused_with_an_example() {
        let err = H2Channel::lazy("127.0.0.1", ChannelOptions::default())
            .err()
            .expect("no port");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("host:port"), "{}", err.message());
    }
}
