//! The node's side of `Kv.Watch`: a stream of one key's or one prefix's changes, read from
//! the node's change log (`calm_raft::events`, which owns ordering, retention and what a
//! token covers).
//!
//! A stream holds a reader (a cursor and a position) and at most one response of events;
//! it reads the log only when tonic polls it for the next response, so a slow client costs
//! the node nothing but its place in the log, and falls out of it (OUT_OF_RANGE) rather
//! than growing a buffer. Reading takes the log's lock for one batch, never the node's
//! state lock: watchers never delay writes.

use super::ops::value_to_pb;
use super::{check_key, invalid, pb};
use crate::node::Node;
use crate::token::SessionToken;
use calm_kernel::fact::KEY_BYTES_MAX;
use calm_raft::events::{Event, EventLog, EventSource, Position, ReadError, Reader};
use calm_raft::scan::KeyRange;
use futures::Stream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Most events in one response (one Raft entry's changes are never split, so a response
/// can hold a few more).
pub(super) const EVENTS_PER_RESPONSE_MAX: usize = 512;
/// Bounds of `progress_ms`.
const PROGRESS_MS_MIN: u32 = 100;
const PROGRESS_MS_MAX: u32 = 3_600_000;
/// Watch streams open on this node (a gauge).
pub(super) const METRIC_WATCHERS: &str = "calm_watchers";
/// Events sent to watchers.
pub(super) const METRIC_WATCH_EVENTS: &str = "calm_watch_events_total";

/// A parsed WatchRequest.
#[derive(Debug)]
pub(super) struct Watch {
    range: KeyRange,
    start: Option<Position>,
    prev_value: bool,
    exclude_put: bool,
    exclude_delete: bool,
    progress: Option<Duration>,
}

impl Watch {
    pub(super) fn parse(req: pb::WatchRequest) -> Result<Watch, Status> {
        let range = match (req.key.is_empty(), req.prefix.is_empty()) {
            (false, false) => {
                return Err(invalid(
                    "the watch names both a key and a prefix; give one (neither: every key)",
                ));
            }
            (false, true) => {
                check_key(&req.key)?;
                let mut end = req.key.clone();
                end.push(0);
                KeyRange {
                    start: req.key,
                    end: Some(end),
                }
            }
            (true, false) => {
                if req.prefix.len() > KEY_BYTES_MAX {
                    return Err(invalid(format!(
                        "the prefix is {} bytes; keys are at most {KEY_BYTES_MAX} bytes",
                        req.prefix.len()
                    )));
                }
                KeyRange::prefix(&req.prefix)
            }
            (true, true) => KeyRange::prefix(b""),
        };
        let start = if req.start_token.is_empty() {
            None
        } else {
            let token = SessionToken::decode(&req.start_token).map_err(invalid)?;
            Some(Position {
                vv: token.vv,
                groups: token.groups,
            })
        };
        let mut exclude_put = false;
        let mut exclude_delete = false;
        for kind in &req.exclude {
            match pb::EventKind::try_from(*kind) {
                Ok(pb::EventKind::Put) => exclude_put = true,
                Ok(pb::EventKind::Delete) => exclude_delete = true,
                _ => {
                    return Err(invalid(format!(
                        "exclude names event kind {kind}; use PUT (1) or DELETE (2)"
                    )));
                }
            }
        }
        let progress = match req.progress_ms {
            0 => None,
            ms @ PROGRESS_MS_MIN..=PROGRESS_MS_MAX => Some(Duration::from_millis(ms.into())),
            ms => {
                return Err(invalid(format!(
                    "progress_ms is {ms}; use 0 (no progress responses) or {PROGRESS_MS_MIN} to {PROGRESS_MS_MAX}"
                )));
            }
        };
        Ok(Watch {
            range,
            start,
            prev_value: req.prev_value,
            exclude_put,
            exclude_delete,
            progress,
        })
    }

    fn wants(&self, event: &Event) -> bool {
        self.range.contains(&event.key)
            && !(event.value.is_some() && self.exclude_put)
            && !(event.value.is_none() && self.exclude_delete)
    }

    fn event_to_pb(&self, event: &Event) -> pb::Event {
        let (origin, seq, group, index) = match event.source {
            EventSource::Fact(id) => (id.origin, id.seq, 0, 0),
            EventSource::Entry { group, index } => (0, 0, group, index),
        };
        let value = event.value.clone().and_then(value_to_pb);
        pb::Event {
            kind: if value.is_some() {
                pb::EventKind::Put
            } else {
                pb::EventKind::Delete
            } as i32,
            key: event.key.to_vec(),
            value,
            prev_value: if self.prev_value {
                event.prev.clone().and_then(value_to_pb)
            } else {
                None
            },
            origin,
            seq,
            group,
            index,
            hlc: event.hlc.as_u64(),
        }
    }
}

fn token_of(reader: &Reader) -> Vec<u8> {
    let position = reader.position();
    SessionToken {
        vv: position.vv.clone(),
        groups: position.groups.clone(),
    }
    .encode()
}

fn status_of(error: ReadError) -> Status {
    match error {
        e @ ReadError::Behind { .. } => Status::out_of_range(e.to_string()),
        e @ ReadError::Gap { .. } => Status::unavailable(e.to_string()),
    }
}

/// One open stream's count in the node's watcher gauge.
struct Registered(Arc<AtomicUsize>);

impl Drop for Registered {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!(METRIC_WATCHERS).set(now as f64);
    }
}

struct State {
    watch: Watch,
    log: Arc<EventLog>,
    reader: Reader,
    published: tokio::sync::watch::Receiver<u64>,
    durable: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
    /// When the next progress response is due.
    progress_due: Option<Instant>,
    created_sent: bool,
    done: bool,
    _registered: Registered,
}

impl State {
    fn respond(
        &mut self,
        events: Vec<pb::Event>,
        created: bool,
        progress: bool,
    ) -> pb::WatchResponse {
        self.progress_due = self.watch.progress.map(|p| Instant::now() + p);
        pb::WatchResponse {
            events,
            token: token_of(&self.reader),
            created,
            progress,
        }
    }

    /// The next response, or the error that ends the stream.
    async fn next(&mut self) -> Result<pb::WatchResponse, Status> {
        if !self.created_sent {
            self.created_sent = true;
            return Ok(self.respond(Vec::new(), true, false));
        }
        let mut progress_due = false;
        loop {
            // Mark both seen before reading: a change after the read then wakes the wait.
            self.published.borrow_and_update();
            self.durable.borrow_and_update();
            let watch = &self.watch;
            let events = self
                .log
                .read(&mut self.reader, EVENTS_PER_RESPONSE_MAX, |e| {
                    watch.wants(e)
                })
                .map_err(status_of)?;
            if !events.is_empty() {
                let events: Vec<pb::Event> = events
                    .iter()
                    .filter(|_| !crate::faults::drop_watch_event())
                    .map(|e| self.watch.event_to_pb(e))
                    .collect();
                metrics::counter!(METRIC_WATCH_EVENTS).increment(events.len() as u64);
                return Ok(self.respond(events, false, false));
            }
            if progress_due {
                // After a read, so the token covers what the filters left out meanwhile.
                return Ok(self.respond(Vec::new(), false, true));
            }
            let progress = async {
                match self.progress_due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            let closing = || {
                Status::unavailable(
                    "the node is shutting down; resume the watch with the last token on another node",
                )
            };
            tokio::select! {
                changed = self.published.changed() => changed.map_err(|_| closing())?,
                changed = self.durable.changed() => changed.map_err(|_| closing())?,
                () = progress => progress_due = true,
                () = self.shutdown.cancelled() => return Err(closing()),
            }
        }
    }
}

/// Open a watch stream on `node`'s change log; `watchers` counts the node's open streams.
/// Refusals (a bad request, a token this node cannot serve, too many watchers) are the
/// call's error; later failures end the stream.
pub(super) fn open(
    node: &Node,
    req: pb::WatchRequest,
    watchers: Arc<AtomicUsize>,
    shutdown: CancellationToken,
) -> Result<impl Stream<Item = Result<pb::WatchResponse, Status>> + Send + 'static, Status> {
    let watch = Watch::parse(req)?;
    let watchers_max = node.config.watch.watchers_max;
    let open = watchers.fetch_add(1, Ordering::AcqRel) + 1;
    let registered = Registered(watchers);
    if open > watchers_max {
        return Err(Status::resource_exhausted(format!(
            "this node serves {watchers_max} watch streams already ([watch] watchers_max); close some, watch a common prefix with one stream, or watch on another node"
        )));
    }
    metrics::gauge!(METRIC_WATCHERS).set(open as f64);
    let log = crate::node::lock(&node.local).events().clone();
    let reader = log.reader(watch.start.clone()).map_err(status_of)?;
    let state = State {
        published: log.subscribe(),
        durable: log.subscribe_durable(),
        progress_due: watch.progress.map(|p| Instant::now() + p),
        watch,
        log,
        reader,
        shutdown,
        created_sent: false,
        done: false,
        _registered: registered,
    };
    Ok(futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let next = state.next().await;
        state.done = next.is_err();
        Some((next, state))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(req: pb::WatchRequest) -> Result<Watch, Status> {
        Watch::parse(req)
    }

    #[test]
    fn bad_requests_say_what_to_change() {
        let both = pb::WatchRequest {
            key: b"a".to_vec(),
            prefix: b"a".to_vec(),
            ..Default::default()
        };
        assert!(parse(both).unwrap_err().message().contains("one"));
        let progress = pb::WatchRequest {
            progress_ms: 5,
            ..Default::default()
        };
        assert!(parse(progress).unwrap_err().message().contains("100"));
        let kind = pb::WatchRequest {
            exclude: vec![7],
            ..Default::default()
        };
        assert!(parse(kind).unwrap_err().message().contains("PUT"));
        let token = pb::WatchRequest {
            start_token: vec![99, 1],
            ..Default::default()
        };
        assert_eq!(
            parse(token).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn a_key_watch_is_that_key_only() {
        let watch = parse(pb::WatchRequest {
            key: b"app".to_vec(),
            ..Default::default()
        })
        .unwrap();
        assert!(watch.range.contains(b"app"));
        assert!(!watch.range.contains(b"app/x"));
        assert!(!watch.range.contains(b"apo"));
        let prefix = parse(pb::WatchRequest {
            prefix: b"app".to_vec(),
            ..Default::default()
        })
        .unwrap();
        assert!(prefix.range.contains(b"app/x"));
        assert!(!prefix.range.contains(b"apq"));
    }
}
